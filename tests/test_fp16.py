"""The FP16 path (simulated on the CPU with torch.autocast(dtype=float16)), the head's new rows,
padding, the memory plan's counts, and a bits-per-byte that scores each document from its own
start."""
import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import PARAGRAPH, tiny_flags

import bori
from errors import EXIT_INTERRUPTED
import data
import evaluate
import model as model_module
import plan
from distributed import DistEnv
from hf_io import config_to_hf, from_pretrained, save_pretrained
from loss import IGNORE_INDEX
from model import Llama, expand_vocab, preset


def loss_of(model, idx, dtype=None):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        return model(idx[:, :-1], idx[:, 1:]).item()


def test_fp16_forward_cannot_overflow_where_smollm2_comes_close(base_model, base_tok,
                                                                monkeypatch):
    """Layer 11's MLP output is the real model's largest (~30,000 at position 0, 45% of fp16's
    65,504). Three times larger weights push it past fp16: the plain fp16 forward turns inf or
    NaN, bori's stays finite and within 1e-2 of fp32."""
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.layers[11].mlp.down_proj.weight *= 3
    idx = torch.tensor([base_tok.encode(PARAGRAPH).ids[:48]])
    reference = loss_of(model, idx)
    ours = loss_of(model, idx, torch.float16)
    assert math.isfinite(ours) and abs(ours - reference) <= 1e-2, (ours, reference)
    monkeypatch.setattr(model_module, "residual_linear", lambda linear, x: linear(x))
    assert not math.isfinite(loss_of(model, idx, torch.float16))  # without the fix


def test_the_watch_reports_each_layers_fp16_headroom(base_model, base_tok):
    headroom = []
    texts = [PARAGRAPH]
    evaluate.evaluate(base_model, base_tok, {"en": texts}, 64, torch.device("cpu"),
                      torch.autocast("cpu", enabled=False), headroom=headroom)
    assert len(headroom) == base_model.cfg.n_layers and all(0 < p < 1 for p in headroom)
    # by hand: the largest |q|, |k|, |v|, |gate|, |up| of layer 0 over the same windows
    peaks = []
    hooks = [getattr(m, n).register_forward_hook(lambda mod, i, o: peaks.append(o.abs().max()))
             for m, names in ((base_model.layers[0].self_attn, "q_proj k_proj v_proj"),
                              (base_model.layers[0].mlp, "gate_proj up_proj"))
             for n in names.split()]
    evaluate.bits_per_byte(base_model, base_tok, texts, 64, torch.device("cpu"),
                           torch.autocast("cpu", enabled=False))
    for h in hooks:
        h.remove()
    assert headroom[0] == pytest.approx(float(max(peaks)) / 65504, rel=1e-6)


def test_a_layer_near_the_fp16_limit_is_warned_about(tmp_path, capsys):
    from runlog import Metrics, Progress
    with Progress(Metrics(tmp_path / "m.jsonl", True), "1a", 10, 0, 1, True, 3.0) as progress:
        progress.eval(0, {"ko_bpb": 1.0}, [0.1, 0.62, 0.3])
    assert "warning: layer 1's activations reach 62% of fp16's largest number" in \
        capsys.readouterr().err
    assert '"fp16_peak": [0.1, 0.62, 0.3]' in (tmp_path / "m.jsonl").read_text()


def test_untied_head_rows_start_from_the_first_pieces_output_row():
    torch.manual_seed(0)
    model = Llama(preset("tiny", tie_embeddings=False))
    embed, head = (m.weight.detach().clone() for m in (model.embed_tokens, model.lm_head))
    pieces = [[5, 9], [7], [300, 2, 11]]
    expand_vocab(model, pieces, "eeve")
    for i, p in enumerate(pieces):
        assert torch.allclose(model.embed_tokens.weight[512 + i], embed[p].mean(0))
        assert torch.equal(model.lm_head.weight[512 + i], head[p[0]])
    assert model.lm_head.weight is not model.embed_tokens.weight


def test_padding_rows_are_zero_after_loading(tmp_path):
    save_pretrained(Llama(preset("tiny", vocab_size=500)), tmp_path)
    model = from_pretrained(tmp_path, pad_vocab_to=64)
    assert model.embed_tokens.weight.shape[0] == 512
    assert model.embed_tokens.weight[500:].abs().max() == 0
    assert model.embed_tokens.weight[:500].abs().max() > 0


@pytest.mark.slow
def test_a_cpu_fp32_run_resumes_in_fp16(tmp_path, tiny_base):
    """The hand-over an fp32 checkpoint makes to an fp16 run: a fresh GradScaler, no error."""
    assert bori.main(tiny_flags(tmp_path, tiny_base, stop_after_steps=2)) == EXIT_INTERRUPTED
    assert bori.main(tiny_flags(tmp_path, tiny_base, dtype="float16")) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scales = [r["scale"] for r in records if r["kind"] == "train" and r["phase"] == "1a"]
    assert scales[:2] == [1.0, 1.0] and scales[2] == 65536.0  # fp32: no scaler; fp16: fresh


def test_compile_on_a_t4_is_warned_about(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=15_835_398_144))
    monkeypatch.setattr(plan, "read_json", lambda path, fix: config_to_hf(
        preset("tiny", vocab_size=1000)))
    cfg = bori.Config(compile=True, seq_len=64, micro_batch=2, batch_tokens=128)
    env = DistEnv(device=torch.device("cuda"), rank=1)  # rank 1: no config.json to write
    plan.plan_for_run(cfg, env, Path("init"), torch.float16)
    err = capsys.readouterr().err
    assert "compile=true on a GPU of compute capability 7.5 (a T4 is 7.5)" in err


def test_seed_settings_plan_counts_what_the_audit_found():
    """The plan for the bori preset on a T4: the gradient temporaries of the (tied) embedding
    counted, DDP's buckets free (gradient_as_bucket_view), a 10% margin, 14.25 GiB usable."""
    cfg = preset("smollm2-135m", vocab_size=58133, pad_vocab_to=64)
    need = plan.memory_plan(cfg, 2048, 8, checkpointing=True, dtype=torch.float16)
    assert need["embedding gradients"] == pytest.approx(2 * 4 * 58176 * 576 / 2**30)
    assert need["total"] == pytest.approx(sum(v for k, v in need.items() if k != "total") * 1.1)
    usable = plan.T4_GIB - plan.CUDA_CONTEXT_GIB
    best = plan.largest_micro_batch(cfg, 2048, True, plan.T4_GIB, torch.float16, limit=32)
    assert plan.memory_plan(cfg, 2048, best, True, torch.float16)["total"] <= usable
    bigger = [mb for mb in (best + 1, 2 * best) if 32 % mb == 0]
    assert all(plan.memory_plan(cfg, 2048, mb, True)["total"] > usable for mb in bigger)

# ----------------------------------------------------------------------------------------------
# Bits per byte, each document from its own start


def test_bits_per_byte_scores_each_document_from_its_own_start(base_model, base_tok):
    """By hand: the summed loss of [EOS] + each document's tokens, over the texts' bytes."""
    texts = ["The cat sat on the mat.", "한국어 문장 하나.", "A third, slightly longer text."]
    total = 0.0
    for text in texts:
        ids = torch.tensor([[0] + base_tok.encode(text).ids])
        with torch.no_grad():
            logits = base_model(ids[:, :-1])
        total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    expected = total / math.log(2) / sum(len(t.encode()) for t in texts)
    got = evaluate.bits_per_byte(base_model, base_tok, texts, 64, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False))
    assert got == pytest.approx(expected, rel=1e-5)


def test_a_long_document_is_scored_in_strided_windows(base_model, base_tok):
    """By hand for a 137-token document at seq_len 32, stride 16: every token once, each with
    at least 16 tokens of context (but in the first window)."""
    text = PARAGRAPH + " " + PARAGRAPH
    ids = [0] + base_tok.encode(text).ids
    assert len(ids) == 137
    total = 0.0
    for start, end, first in [(0, 33, 1), (16, 49, 33), (32, 65, 49), (48, 81, 65),
                              (64, 97, 81), (80, 113, 97), (96, 129, 113), (104, 137, 129)]:
        x = torch.tensor([ids[start:end]])
        with torch.no_grad():
            logits = base_model(x[:, :-1])[0]
        y = x[0, 1:].clone()
        y[:first - start - 1] = IGNORE_INDEX
        total += F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX).item()
    got = evaluate.bits_per_byte(base_model, base_tok, [text], 32, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False), stride=16)
    assert got == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)


def test_a_source_that_is_also_eval_skips_the_held_out_documents(tmp_path, base_tok):
    texts = [f"문서 {i}: " + "가나다 " * (5 + i) for i in range(20)]
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    held = data.eval_docs(str(path), 200)
    source = data.training_source(data.Corpus("ko", str(path), str(path), "data_new", "eval_new"),
                                  eval_bytes=200, text_field="text")
    assert source.skip == len(held) > 0
    stream = data.PackedStream(source, base_tok, 0)
    first = stream.take(5)
    assert first == base_tok.encode(texts[len(held)]).ids[:5]  # the first not held out
    other = data.Corpus("ko", str(path), "other.jsonl", "data_new", "eval_new")
    assert data.training_source(other, eval_bytes=200, text_field="text").skip == 0


def test_english_is_held_out_from_the_replay_by_default():
    cfg = bori.Config()
    assert cfg.eval_en == cfg.data_en and cfg.eval_new != cfg.data_new  # fineweb-2: a test split
