"""Faults: processes really killed, disks really full, losses really infinite, inputs really bad.

Each run is the tiny pipeline of conftest.tiny_flags; after any fault, running the same command
again must end in exactly the weights and metrics of an uninterrupted run."""
import json
import os
import random
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (ENV, ROOT, command, logged, n_train_records, process_tree, run_until, send,
                     tiny_flags, weights)

import bori
from errors import EXIT_INTERRUPTED
import checkpoint
import model as model_module
import runlog

def writing_checkpoint(out: Path) -> bool:
    return any(out.glob("phase1?/ckpt-*.tmp"))


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("ddp_ref")
    code, err, _ = run_until(command(out, tiny_base, 2), lambda: False)
    assert code == 0, err[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_anywhere_then_rerun_is_bit_identical(world, tmp_path, tiny_base, tiny_run,
                                                      request):
    reference = tiny_run if world == 1 else request.getfixturevalue("ddp_reference")
    out, rng = tmp_path / "run", random.Random(world)
    # 1) killed in the middle of writing a checkpoint
    code, err, sent = run_until(command(out, tiny_base, world),
                                lambda: writing_checkpoint(out))
    assert sent and code != 0, err[-2000:]
    assert list(out.glob("phase1?/ckpt-*.tmp"))  # killed with a checkpoint half-written
    # 2) killed at a random later step, counted in logged training steps
    target = n_train_records(out) + rng.randint(1, 4)
    code, err, sent = run_until(command(out, tiny_base, world),
                                lambda: n_train_records(out) >= target)
    assert sent, err[-2000:]
    # 3) the same command again, to the end
    code, err, _ = run_until(command(out, tiny_base, world), lambda: False)
    assert code == 0, err[-2000:]
    for key, value in weights(reference / "final").items():
        assert torch.equal(value, weights(out / "final")[key]), key
    assert logged(out) == logged(reference)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_checkpoints_the_current_step_and_says_interrupted(world, tmp_path, tiny_base,
                                                                   tiny_run):
    out = tmp_path / "run"
    cmd = command(out, tiny_base, world, ckpt_every=100)  # only the SIGTERM one
    code, err, sent = run_until(cmd, lambda: n_train_records(out) >= 3, signal.SIGTERM)
    assert sent and "interrupted: stopped at phase 1a step" in err, err[-2000:]
    assert code == (EXIT_INTERRUPTED if world == 1 else 1)  # torchrun: 1 if any fails
    step = int(re.search(r"stopped at phase 1a step (\d+)", err).group(1))
    records = [r for r in logged(out) if r["kind"] == "train"]
    assert records[-1]["step"] == step  # the checkpoint holds every logged step
    ckpt = checkpoint.latest_checkpoint(out / "phase1a")
    assert ckpt.name == f"ckpt-{step:06d}"
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(world)]
    if world == 1:
        code, err, _ = run_until(cmd, lambda: False)
        assert code == 0, err[-2000:]
        for key, value in weights(tiny_run / "final").items():
            assert torch.equal(value, weights(out / "final")[key]), key


@pytest.mark.slow
def test_one_rank_dying_ends_the_other(tmp_path, tiny_base):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, tiny_base, 2, steps_1a=200, decay_1a=2),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    t0 = time.time()
    while n_train_records(out) < 2 and time.time() - t0 < 120:
        time.sleep(0.05)
    workers = [p for p in process_tree(proc.pid)[1:]
               if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{p}/environ").read_bytes()]
    assert workers, "no rank-1 worker found"
    survivors = [p for p in process_tree(proc.pid)[1:] if p not in workers]
    os.kill(workers[0], signal.SIGKILL)
    t_kill = time.time()
    try:
        proc.wait(timeout=90)
    finally:
        send(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - t_kill < 90
    assert not any(Path(f"/proc/{p}").exists() for p in survivors)  # rank 0 is gone too


@pytest.fixture
def small_disk(tmp_path):
    """A 400 MB tmpfs where the machine allows mounting; else None (a file-size limit then)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400M", "tmpfs", str(mnt)],
                        capture_output=True).returncode == 0
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_full_disk_while_saving_keeps_the_last_checkpoint(small_disk, tmp_path, tiny_base,
                                                          tiny_run):
    out = (small_disk or tmp_path) / "run"
    cmd = command(out, tiny_base, 1, stop_after_steps=2)
    code, err, _ = run_until(cmd, lambda: False)
    assert code == EXIT_INTERRUPTED, err[-2000:]
    assert checkpoint.latest_checkpoint(out / "phase1a").name == "ckpt-000002"
    if small_disk:  # fill the disk, leaving less than a checkpoint needs
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        (small_disk / "filler").write_bytes(b"\0" * (free - 6 * 2**20))
        limit = None
    else:  # no mount here: cap the size of any file the run writes (a real EFBIG from write)
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))
    code, err, _ = run_until(cmd, lambda: False, preexec_fn=limit)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert re.search(r"error: could not write checkpoint ckpt-000004 \(.*\); free disk space .*"
                     r"the last checkpoint \(ckpt-000002\) is intact", err), err[-2000:]
    assert checkpoint.latest_checkpoint(out / "phase1a").name == "ckpt-000002"
    assert not list(out.glob("phase1a/*.tmp"))
    if small_disk:
        (small_disk / "filler").unlink()
    while code != 0:  # space is back: the same command finishes the run
        code, err, _ = run_until(cmd, lambda: False)
        assert code in (0, EXIT_INTERRUPTED), err[-2000:]
    for key, value in weights(tiny_run / "final").items():
        assert torch.equal(value, weights(out / "final")[key]), key


def poison_loss(monkeypatch, calls: set, value=float("inf")):
    """Multiply the training loss of the given forward calls (1-based) by inf or nan."""
    original, count = model_module.Llama.forward, [0]

    def forward(self, idx, targets=None, *args, **kwargs):
        out = original(self, idx, targets, *args, **kwargs)
        if targets is not None and self.training:
            count[0] += 1
            if count[0] in calls or (-1 in calls and count[0] > 4):
                out = out * value
        return out
    monkeypatch.setattr(model_module.Llama, "forward", forward)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_overflowing_steps_are_skipped_and_logged(dtype, monkeypatch, tmp_path, tiny_base):
    poison_loss(monkeypatch, {3, 4})  # step 2 (two micro-batches a step) overflows
    assert bori.main(tiny_flags(tmp_path, tiny_base, dtype=dtype)) == 0
    train = [r for r in logged(tmp_path) if r["kind"] == "train" and r["phase"] == "1a"]
    assert [r["skipped"] for r in train[:3]] == [False, True, False]
    if dtype == "float16":  # GradScaler halved its scale on the overflow
        assert train[1]["scale"] == train[0]["scale"] / 2
    else:  # without a scaler, bori skips the step itself
        assert train[1]["grad_norm"] != train[1]["grad_norm"] or train[1]["grad_norm"] > 1e30


@pytest.mark.slow
def test_a_loss_that_stays_nan_stops_the_run(monkeypatch, tmp_path, tiny_base, capsys):
    poison_loss(monkeypatch, {-1}, float("nan"))
    code = bori.main(tiny_flags(tmp_path, tiny_base, max_bad_steps=3, dtype="float16"))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"error: phase 1a: loss or gradients were non-finite for 3 steps in a row, "
                     r"up to step 4; the last good checkpoint is .*ckpt-000002", err), err


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence naming the problem and the fix, exit code 2, no traceback


def broken_base(tmp_path, tiny_base, what: str) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / f"base_{what}"
    shutil.copytree(tiny_base, folder)
    state = load_file(folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    if what == "no_config":
        (folder / "config.json").unlink()
    elif what == "missing_tensor":
        del state["model.layers.0.self_attn.q_proj.weight"]
    elif what == "wrong_shape":
        state["model.norm.weight"] = torch.ones(7)
    elif what == "small_vocab":  # a model with fewer rows than its tokenizer has tokens
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:1000]
        (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))
    elif what == "other_tokenizer":  # Llama 3 calls its separator <|end_of_text|>
        tok = folder / "tokenizer.json"
        tok.write_text(tok.read_text().replace("<|endoftext|>", "<|end_of_text|>"))
    save_file(state, folder / "model.safetensors")
    return folder


def flags(**overrides):
    return lambda tmp_path, base: tiny_flags(tmp_path / "out", base, **overrides)


def extra(*args):
    return lambda tmp_path, base: [*tiny_flags(tmp_path / "out", base), *args]


def corpus(content: str):
    def build(tmp_path, base):
        (tmp_path / "corpus.jsonl").write_text(content)
        return tiny_flags(tmp_path / "out", base, data_ko=tmp_path / "corpus.jsonl")
    return build


def corpus_bytes(content: bytes):
    def build(tmp_path, base):
        (tmp_path / "corpus.txt").write_bytes(content)
        return tiny_flags(tmp_path / "out", base, data_ko=tmp_path / "corpus.txt")
    return build


def file_as_out_dir(tmp_path, base):
    (tmp_path / "afile").write_text("not a folder")
    return tiny_flags(tmp_path / "afile", base)


def toml(content: str):
    def build(tmp_path, base):
        (tmp_path / "run.toml").write_text(content)
        return [*tiny_flags(tmp_path / "out", base), f"--config={tmp_path / 'run.toml'}"]
    return build


def base_with(what: str):
    return lambda tmp_path, base: tiny_flags(tmp_path / "out", broken_base(tmp_path, base, what))


BAD_INPUTS = {  # name: (argv builder, the sentence expected)
    "missing base": (flags(base="/no/such/base"), r"base model '/no/such/base' is neither"),
    "unreachable hub base": (flags(base="nobody-here/no-such-model"),
                             r"--base: could not reach 'nobody-here/no-such-model' on the Hugging"),
    "no config.json": (base_with("no_config"), r"lacks config.json or tokenizer.json"),
    "missing tensor": (base_with("missing_tensor"),
                       r"lacks tensor 'model.layers.0.self_attn.q_proj"),
    "wrong shape": (base_with("wrong_shape"), r"tensor 'model.norm.weight' has shape \(7,\)"),
    "tokenizer vs model": (base_with("small_vocab"),
                           r"tokenizer.json has 49152 tokens but the model only"),
    "other tokenizer": (base_with("other_tokenizer"),
                        r"is not a byte-level BPE with <\|endoftext\|>"),
    "missing corpus": (flags(data_ko="/no/such/*.jsonl"), r"matches no files"),
    "empty corpus": (corpus(""), r"tokenizer data .* has no text"),
    "no text field": (corpus('{"body": "한국어"}\n'),
                      r"line 1 has no text field 'text' \(it has \['body'\]\)"),
    "unknown preset": (extra("--preset=huge"), r"unknown preset 'huge'; choose one of"),
    "unknown key": (extra("--seq_lenn=5"), r"unknown option --seq_lenn; did you mean --seq_len\?"),
    "wrong type": (extra("--micro_batch=two"), r"--micro_batch=two: expected int"),
    "bad boolean": (extra("--compile=yes"), r"--compile=yes: expected true or false"),
    "seq_len too long": (flags(seq_len=1024, batch_tokens=2048),
                         r"seq_len=1024 exceeds the base model's 512 positions"),
    "bad batch": (flags(batch_tokens=100), r"batch_tokens=100 is not a multiple of 64"),
    "zero weight": (flags(mix_1b="ko=0.9,en=0"), r"every source needs a weight > 0"),
    "config file key": (toml("lr = 0.1\n"), r"unknown key 'lr' in"),
    "infinite lr": (flags(lr_1a="inf"), r"learning rates must be finite and > 0"),
    "zero lr": (flags(lr_1b=0), r"learning rates must be finite and > 0"),
    "zero grad_clip": (flags(grad_clip=0), r"grad_clip must be finite and > 0"),
    "beta2 of 1": (flags(beta2=1.0), r"beta1 and beta2 must be in \[0, 1\)"),
    "zero peak_tflops": (flags(peak_tflops=0), r"peak_tflops must be > 0"),
    "negative max_hours": (flags(max_hours=-1), r"max_hours and stop_after_steps must be >= 0"),
    "negative stop_after_steps": (flags(stop_after_steps=-2), r"must be >= 0 \(0: no limit\)"),
    "no seq_len": (flags(seq_len=0), r"seq_len must be >= 1 and micro_batch >= 0"),
    "empty out_dir": (extra("--out_dir="), r"out_dir must name a folder"),
    "unknown source in mix": (flags(mix_1b="ko=0.9,fr=0.1"),
                              r"mix_1b='ko=0.9,fr=0.1' names \['fr'\]; the sources are"),
    "TOML number for a boolean": (toml("compile = 1\n"), r"compile = 1 in .*: expected bool"),
    "TOML boolean for a number": (toml("seq_len = true\n"), r"seq_len = True in .*: expected int"),
    "broken TOML": (toml("seq_len = \n"), r"run.toml is not valid TOML \(.*\); fix it"),
    "a source named twice": (flags(mix_1b="ko=0.5,ko=0.5"), r"names 'ko' twice"),
    "out_dir is a file": (file_as_out_dir, r"out_dir=.*afile is a file, not a folder"),
    "CP949 corpus": (corpus_bytes("한국어 문서입니다. 둘째 문장입니다.".encode("cp949") * 40),
                     r"--data_new: .* is not UTF-8 text \(most of its first bytes are not UTF-8"),
}
REFUSED_BEFORE_WRITING = [k for k in BAD_INPUTS if k not in (
    "no config.json", "missing tensor", "wrong shape",
    "tokenizer vs model", "other tokenizer", "empty corpus", "no text field", "seq_len too long",
    "missing base")]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_sentence(case, tmp_path, tiny_base, capsys):
    build, message = BAD_INPUTS[case]
    code = bori.main(build(tmp_path, tiny_base))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(message, lines[0]), lines[0]
    if case in REFUSED_BEFORE_WRITING:  # checked before anything was written
        assert not (tmp_path / "out" / "config.json").exists()


def test_debug_flag_shows_the_traceback(tmp_path, tiny_base):
    with pytest.raises(ValueError, match="unknown preset"):
        bori.main([*tiny_flags(tmp_path, tiny_base), "--preset=huge", "--debug=true"])


def test_out_of_gpu_memory_names_the_fix(monkeypatch, tmp_path, tiny_base, capsys):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(bori, "run_phase", oom)
    assert bori.main(tiny_flags(tmp_path, tiny_base)) == 3
    assert "lower micro_batch" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_refuses_breaking_changes_but_allows_safe_ones(tmp_path, tiny_base, capsys):
    assert bori.main(tiny_flags(tmp_path, tiny_base, stop_after_steps=2)) == EXIT_INTERRUPTED
    assert bori.main(tiny_flags(tmp_path, tiny_base, new_tokens=301, seq_len=64)) == 2
    err = capsys.readouterr().err
    assert re.search(r"holds a run started with other settings \(new_tokens: 300 -> 301, "
                     r"seq_len: 32 -> 64\)", err), err
    assert bori.main(tiny_flags(tmp_path, tiny_base, log_every=5, eval_every=2)) == 0


@pytest.mark.slow
def test_resume_refuses_another_process_count_or_a_tokenizer_of_another_base(
        tmp_path, tiny_base, capsys):
    import shutil
    assert bori.main(tiny_flags(tmp_path, tiny_base, stop_after_steps=2)) == EXIT_INTERRUPTED
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "world_size": 2}))
    assert bori.main(tiny_flags(tmp_path, tiny_base)) == 2
    assert re.search(r"was started with 2 processes; resume it with as many",
                     capsys.readouterr().err)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    # A tokenizer folder brought from a run on another base, before the init stage:
    shutil.rmtree(tmp_path / "init"), shutil.rmtree(tmp_path / "phase1a")
    emap_path = tmp_path / "tokenizer" / "eeve_map.json"
    emap = json.loads(emap_path.read_text())
    emap_path.write_text(json.dumps({**emap, "base_fingerprint": "another base"}))
    done = json.loads((tmp_path / "tokenizer" / "DONE.json").read_text())  # a whole folder,
    checkpoint.write_done(tmp_path / "tokenizer", done)  # as another run would have left it
    assert bori.main(tiny_flags(tmp_path, tiny_base)) == 2
    assert re.search(r"the merged tokenizer in .*tokenizer was built on another base than .*; "
                     r"delete .*tokenizer \(or use a new out_dir\) to rebuild it",
                     capsys.readouterr().err)


def test_metrics_after_a_kill_mid_record_keep_every_whole_record_up_to_the_checkpoint(tmp_path):
    rec = [{"kind": "train", "phase": "1a", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    rec.insert(2, {"kind": "eval", "phase": "1a", "step": 2, "ko_bpb": 1.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rec) + '{"kind": "train", "pha')
    runlog.Metrics(path, True).truncate_after("1a", 2)  # resuming from step 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rec[:2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_no_pickle_of_untrusted_data():
    """Weights go through safetensors; every torch.load passes weights_only=True."""
    for path in ROOT.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    assert re.findall(r"torch\.load\(", (ROOT / "checkpoint.py").read_text())
