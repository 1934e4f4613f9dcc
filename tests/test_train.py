"""bori.py: the phases, EEVE init, DDP equivalence, exact resume and the demo preset."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ENGLISH, ROOT, free_port, logged, tiny_flags, weights

import bori
from errors import EXIT_INTERRUPTED
import data
from hf_io import from_pretrained
from model import expand_vocab


@pytest.mark.slow
def test_phase_1a_trains_only_embeddings_and_1b_everything(tiny_run):
    init, a, b = (weights(tiny_run / p) for p in ("init", "phase1a/model", "phase1b/model"))
    assert set(init) == set(a) == set(b)
    for key in init:
        changed = not torch.equal(init[key], a[key])
        assert changed == (key == "model.embed_tokens.weight"), key
        assert not torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_phase_1a_new_rows_only_keeps_old_rows_bit_identical(tmp_path, tiny_base, compiled):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # other tests' compiled graphs count toward the recompile limit
    counters.clear()
    assert bori.main(tiny_flags(tmp_path, tiny_base, new_rows_only=True, steps_1b=1,
                                warmup_1b=0, decay_1b=1, compile=compiled)) == 0
    assert (counters["stats"]["unique_graphs"] > 0) == compiled
    before = weights(tmp_path / "init")["model.embed_tokens.weight"]
    after = weights(tmp_path / "phase1a/model")["model.embed_tokens.weight"]
    assert torch.equal(after[:49152], before[:49152])
    assert (after[49152:] != before[49152:]).any(dim=1).all()  # every new row moved


@pytest.mark.slow
def test_eeve_rows_are_the_mean_of_their_pieces(tiny_run, tiny_base):
    emap = json.loads((tiny_run / "tokenizer" / "eeve_map.json").read_text())
    base = weights(tiny_base)["model.embed_tokens.weight"]
    init = weights(tiny_run / "init")["model.embed_tokens.weight"]
    assert init.shape[0] == 49152 + 300
    assert torch.equal(init[:49152], base)
    for i, pieces in enumerate(emap["pieces"]):
        expected = base[pieces].double().mean(0).float()
        assert torch.allclose(init[49152 + i], expected, atol=1e-7), i


def test_expanded_real_model_keeps_base_logits_on_english(base_model, merged, emap):
    expanded = expand_vocab(copy.deepcopy(base_model), emap["pieces"], "eeve")
    assert expanded.cfg.vocab_size == 58133
    for text in ENGLISH:
        ids = merged.encode(text).ids
        assert max(ids) < 49152  # English uses base tokens only
        idx = torch.tensor([ids])
        with torch.no_grad():
            new, old = expanded(idx), base_model(idx)
        assert torch.equal(new[..., :49152], old)


def digits_corpus(path, n_docs=64):
    """Documents of exactly 32 single-digit tokens: with EOS each fills one 33-token block."""
    gen = torch.Generator().manual_seed(0)
    docs = ["".join(map(str, torch.randint(0, 10, (32,), generator=gen).tolist()))
            for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


DDP_SETTINGS = dict(mix_1b="ko=1.0", micro_batch=2, batch_tokens=128, ckpt_every=100,
                    eval_every=100, steps_1a=3, steps_1b=3, lr_1a=1e-3, lr_1b=1e-3)


def one_and_two_processes(tmp_path, tiny_base, env=None, **two_flags):
    """The same tiny run by torchrun with 2 gloo processes and by one process (2x accumulation)."""
    corpus = digits_corpus(tmp_path / "digits.jsonl")
    common = dict(data_ko=corpus, tokenizer_data=data.BUNDLED["ko_train"], **DDP_SETTINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "bori.py"),
                          *tiny_flags(tmp_path / "two", tiny_base, **common, **two_flags)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["grad_accum"] == 1
    assert bori.main(tiny_flags(tmp_path / "one", tiny_base, **common)) == 0
    assert json.loads((tmp_path / "one" / "config.json").read_text())["grad_accum"] == 2
    return tmp_path / "two", tmp_path / "one"


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_double_accumulation(tmp_path, tiny_base):
    two, one = one_and_two_processes(tmp_path, tiny_base)
    a, b = weights(two / "final"), weights(one / "final")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    assert not torch.equal(a["model.norm.weight"], weights(tiny_base)["model.norm.weight"])


@pytest.mark.slow
def test_two_process_ddp_compiled_equals_one_eager_process(tmp_path, tiny_base):
    """torch.compile over DDP (the graph is split at DDP's gradient buckets) in both phases."""
    cache = tmp_path / "inductor"  # where the compiled kernels land: proof that it compiled
    two, one = one_and_two_processes(tmp_path, tiny_base, {"TORCHINDUCTOR_CACHE_DIR":
                                                                  str(cache)}, compile=True)
    assert any(cache.rglob("*.py")), "nothing was compiled"
    losses = [(a["loss"], b["loss"]) for a, b in zip(logged(two), logged(one))
              if a["kind"] == "train"]
    assert len(losses) == 6
    for a, b in losses:
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    a, b = weights(two / "final"), weights(one / "final")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4, key


@pytest.mark.slow
def test_compiled_run_equals_the_eager_run(tmp_path, tiny_base, tiny_run):
    """--compile=true (both phases, checkpointing) trains the same model: the compiler
    reorders float sums, so equal to rounding, not bit for bit."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # other tests' compiled graphs count toward the recompile limit
    counters.clear()
    assert bori.main(tiny_flags(tmp_path, tiny_base, compile=True)) == 0
    assert counters["stats"]["unique_graphs"] >= 2, "not compiled"  # forward, once per phase
    eager, compiled = logged(tiny_run), logged(tmp_path)
    assert [r["kind"] for r in eager] == [r["kind"] for r in compiled]
    train = [(a["loss"], b["loss"]) for a, b in zip(eager, compiled) if a["kind"] == "train"]
    assert len(train) == 12
    for a, b in train:
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    # At lr 1e-2 a 1e-7 gradient difference can flip a near-zero coordinate's AdamW update,
    # so the weights agree to a tenth of how far Phase 1B moved each tensor (measured: 3%).
    a, b = weights(tiny_run / "final"), weights(tmp_path / "final")
    start = weights(tiny_run / "phase1a" / "model")
    for key in a:
        moved = (a[key] - start[key]).abs().max()
        assert (a[key] - b[key]).abs().max() <= 0.1 * moved, key


@pytest.mark.slow
def test_stopping_and_rerunning_equals_an_uninterrupted_run(tmp_path, tiny_base, tiny_run):
    flags = tiny_flags(tmp_path, tiny_base, stop_after_steps=2)
    codes = []
    while not codes or codes[-1] == EXIT_INTERRUPTED:
        codes.append(bori.main(flags))  # the same command, again and again
        assert len(codes) < 20
    assert codes[-1] == 0 and len(codes) > 4
    for key, value in weights(tiny_run / "final").items():
        assert torch.equal(value, weights(tmp_path / "final")[key]), key
    assert logged(tmp_path) == logged(tiny_run)


@pytest.mark.slow
def test_demo_preset_end_to_end_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "demo"
    code = bori.main(["--preset=demo", f"--out_dir={out}", "--steps_1a=2", "--warmup_1a=1",
                      "--decay_1a=1", "--steps_1b=2", "--warmup_1b=1", "--decay_1b=1",
                      "--eval_bytes=1500", "--sample_tokens=4"])
    assert code == 0
    hf = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert hf.config.vocab_size == len(tok) == 58133
    ids = tok("대한민국의 수도는", return_tensors="pt")
    gen = hf.generate(**ids, max_new_tokens=8, do_sample=False)[0]
    ours = from_pretrained(out / "final").generate(ids["input_ids"], 8, temperature=0)[0]
    n = len(gen)
    assert n > ids["input_ids"].shape[1]
    assert gen.tolist() == ours[:n].tolist()  # transformers' greedy tokens are ours
