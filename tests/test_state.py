"""Nothing silently wrong: damaged state, two runs at once, values that cannot work, hostile
files. Every case is real: a file really cut short, a bit really flipped, a second process
really started, a write that the kernel really refused. Each ends in one sentence (exit 2) or
in exactly the uninterrupted run."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, ROOT, command, logged, n_train_records, run_until, tiny_flags, weights

import bori
from errors import EXIT_INTERRUPTED
import data
from gguf_io import read_gguf, write_gguf
from inputs import resolve_base


def one_error(capsys) -> str:
    """The single `error:` line a failed run printed (and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def assert_same_run(out: Path, ref: Path):
    for key, value in weights(ref / "final").items():
        assert torch.equal(value, weights(out / "final")[key]), key
    assert logged(out) == logged(ref)


@pytest.fixture
def stopped(tmp_path, tiny_base):
    """A tiny run stopped after Phase 1A step 4, with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    assert bori.main(tiny_flags(out, tiny_base, stop_after_steps=4)) == EXIT_INTERRUPTED
    assert sorted(p.name for p in (out / "phase1a").glob("ckpt-*")) == ["ckpt-000002",
                                                                         "ckpt-000004"]
    return out

# ----------------------------------------------------------------------------------------------
# Checkpoints that prove they are whole


def flip_bit(path: Path, offset_from_end: int = 1000):
    data_ = bytearray(path.read_bytes())
    data_[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data_))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip a weight bit", "flip an optimizer bit",
                                    "truncate optimizer.pt", "delete rank0.pt"])
def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_resumes(
        damage, stopped, tiny_base, tiny_run, capsys):
    ckpt = stopped / "phase1a" / "ckpt-000004"
    if damage == "flip a weight bit":  # a bit inside a weight, not the header: loads fine
        flip_bit(ckpt / "model.safetensors")
    elif damage == "flip an optimizer bit":
        flip_bit(ckpt / "optimizer.pt", 5000)
    elif damage == "truncate optimizer.pt":
        with open(ckpt / "optimizer.pt", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    else:
        (ckpt / "rank0.pt").unlink()
    capsys.readouterr()
    assert bori.main(tiny_flags(stopped, tiny_base)) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: checkpoint .*ckpt-000004 is damaged \(.*\); moved it to "
                     r"ckpt-000004.corrupt and resuming from the one before", err), err
    assert (stopped / "phase1a" / "ckpt-000004.corrupt").is_dir()
    assert_same_run(stopped, tiny_run)


@pytest.mark.slow
def test_no_whole_checkpoint_left_is_one_sentence(stopped, tiny_base, capsys):
    for ckpt in (stopped / "phase1a").glob("ckpt-*"):
        flip_bit(ckpt / "model.safetensors")
    capsys.readouterr()
    assert bori.main(tiny_flags(stopped, tiny_base)) == 2
    assert re.search(r"every checkpoint in .*phase1a is damaged \(moved to ckpt-000004.corrupt, "
                     r"ckpt-000002.corrupt\); delete .*phase1a to start the phase over",
                     one_error(capsys))

# ----------------------------------------------------------------------------------------------
# Non-finite never finishes


def poison_weights_at(monkeypatch, phase: str, step: int):
    """After the given step, set one weight to NaN (the step itself stays finite)."""
    original = bori.train_step

    def step_then_poison(run, t, batches):
        out = original(run, t, batches)
        if t.phase_dir.name == f"phase{phase}" and t.step + 1 == step:
            with torch.no_grad():
                t.raw_model.norm.weight[0] = float("nan")
        return out
    monkeypatch.setattr(bori, "train_step", step_then_poison)


@pytest.mark.slow
def test_a_phase_ending_with_nan_weights_is_not_marked_done(monkeypatch, tmp_path, tiny_base,
                                                            capsys):
    poison_weights_at(monkeypatch, "1a", 6)  # the last step of Phase 1A
    assert bori.main(tiny_flags(tmp_path, tiny_base)) == 2
    assert re.search(r"phase 1a ended with non-finite weights, so it is not marked done",
                     one_error(capsys))
    assert not (tmp_path / "phase1a" / "DONE.json").exists()
    assert not (tmp_path / "phase1a" / "model").exists() and not (tmp_path / "final").exists()


def poison_losses(monkeypatch, phase: str, steps: set):
    """Make the loss of the given steps (1-based, counted from the phase's start) infinite."""
    original = bori.train_step

    def poisoned(run, t, batches):
        if t.phase_dir.name == f"phase{phase}" and t.step + 1 in steps:
            model_forward = t.model.forward
            t.model.forward = lambda *a, **k: model_forward(*a, **k) * float("inf")
            try:
                return original(run, t, batches)
            finally:
                del t.model.forward
        return original(run, t, batches)
    monkeypatch.setattr(bori, "train_step", poisoned)


@pytest.mark.slow
def test_a_phase_whose_every_step_was_skipped_fails(monkeypatch, tmp_path, tiny_base, capsys):
    poison_losses(monkeypatch, "1a", set(range(1, 7)))
    assert bori.main(tiny_flags(tmp_path, tiny_base, max_bad_steps=100)) == 2
    assert "phase 1a ended with no step applied" in one_error(capsys)
    assert not (tmp_path / "phase1a" / "DONE.json").exists()


@pytest.mark.slow
def test_the_non_finite_streak_goes_on_across_the_phase_boundary(monkeypatch, tmp_path,
                                                                   tiny_base, capsys):
    poison_losses(monkeypatch, "1a", {5, 6})
    poison_losses(monkeypatch, "1b", {1})
    assert bori.main(tiny_flags(tmp_path, tiny_base, max_bad_steps=3)) == 2
    assert re.search(r"phase 1b: loss or gradients were non-finite for 3 steps in a row, up to "
                     r"step 0", one_error(capsys))

# ----------------------------------------------------------------------------------------------
# One run per out_dir; a first start that fails locks nothing


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_stops_at_once_naming_the_first(tmp_path, tiny_base,
                                                                          capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, tiny_base, 1, steps_1a=500, decay_1a=2),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        t0 = time.time()
        while n_train_records(out) < 1 and time.time() - t0 < 120:
            time.sleep(0.05)
        before = (out / "metrics.jsonl").read_text()
        capsys.readouterr()
        t0 = time.time()
        assert bori.main(tiny_flags(out, tiny_base, steps_1a=500, decay_1a=2)) == 2
        assert time.time() - t0 < 10
        line = one_error(capsys)
        assert f"is in use by another bori run (pid {proc.pid} on " in line
        assert (out / "metrics.jsonl").read_text().startswith(before)  # nothing of ours in it
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the OS drops the lock of a killed process: the same command now runs
    assert bori.main(tiny_flags(out, tiny_base, steps_1a=500, decay_1a=2,
                                stop_after_steps=1)) == EXIT_INTERRUPTED


@pytest.mark.slow
@pytest.mark.parametrize("typo, message", [
    (dict(data_en="/no/such/english.jsonl"), r"--data_en: data path .* matches no files"),
    (dict(new_tokens=100_000), r"yields only .* new hangul tokens, fewer than new_tokens"),
])
def test_a_failed_first_start_does_not_block_the_corrected_command(
        typo, message, tmp_path, tiny_base, capsys):
    out = tmp_path / "run"
    assert bori.main(tiny_flags(out, tiny_base, **typo)) == 2
    assert re.search(message, one_error(capsys))
    if "data_en" in typo:  # refused before anything was written
        assert not (out / "config.json").exists()
    assert bori.main(tiny_flags(out, tiny_base, stop_after_steps=1)) == EXIT_INTERRUPTED

# ----------------------------------------------------------------------------------------------
# Resume and re-run tell the truth


@pytest.mark.slow
def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(stopped, tiny_base, capsys):
    assert bori.main(tiny_flags(stopped, tiny_base, steps_1a=3)) == 2
    assert re.search(r"ckpt-000004 is at step 4, past steps_1a=3; use steps_1a>=4, or delete "
                     r".*phase1a to train the phase again", one_error(capsys))


@pytest.mark.slow
def test_changing_the_held_out_text_mid_run_is_refused(stopped, tiny_base, capsys):
    assert bori.main(tiny_flags(stopped, tiny_base, eval_bytes=1000)) == 2
    assert re.search(r"holds a run started with other settings \(eval_bytes: 1500 -> 1000\)",
                     one_error(capsys))


@pytest.mark.slow
def test_a_finished_run_is_never_rewritten_with_other_values(tiny_run, tiny_base, tmp_path,
                                                             capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / ".lock").unlink(missing_ok=True)
    files = {p: p.read_bytes() for p in [out / "config.json", out / "final" / "README.md"]}
    assert bori.main(tiny_flags(out, tiny_base, lr_1b=0.5)) == 2
    assert re.search(r"holds a finished run made with other settings \(.*lr_1b: 0.01 -> 0.5\)",
                     one_error(capsys))
    assert bori.main(tiny_flags(out, tiny_base, log_every=7)) == 0  # changes no result
    assert "holds a finished run with these settings" in capsys.readouterr().out
    assert all(p.read_bytes() == b for p, b in files.items())


@pytest.mark.slow
def test_a_missing_handover_file_is_said(tiny_run, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("phase1b", "final*"))
    (out / "phase1a" / "data-rank0.pt").unlink()
    assert bori.main(tiny_flags(out, tiny_base)) == 2
    assert re.search(r"phase1a: data-rank0.pt is missing since the stage finished; restore it "
                     r"or delete .*phase1a to redo that stage", one_error(capsys))

# ----------------------------------------------------------------------------------------------
# Every state file, named


def cut_short(path: Path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda out: cut_short(out / "tokenizer" / "DONE.json"),
     r"tokenizer/DONE.json is unreadable \(.*\); delete .*tokenizer to redo that stage"),
    (lambda out: cut_short(out / "init" / "DONE.json"),
     r"init/DONE.json is unreadable \(.*\); delete .*init to redo that stage"),
    (lambda out: flip_bit(out / "tokenizer" / "tokenizer.json", 100),
     r"tokenizer: tokenizer.json differs from what was written \(checksum\) since the stage "
     r"finished; restore it or delete .*tokenizer"),
    (lambda out: cut_short(out / "tokenizer" / "eeve_map.json"),
     r"tokenizer: eeve_map.json has [\d,]+ bytes, not [\d,]+ since the stage finished"),
    (lambda out: (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text().replace("}\n", "\n", 1)),
     r"metrics.jsonl line 1 is not a JSON record; remove that line"),
    (lambda out: (out / "config.json").write_text("{\"seq_len\": 3"),
     r"config.json is unreadable \(.*\); delete it"),
])
def test_a_damaged_state_file_is_named_with_its_fix(damage, message, stopped, tiny_base,
                                                    capsys):
    damage(stopped)
    capsys.readouterr()
    assert bori.main(tiny_flags(stopped, tiny_base)) == 2
    assert re.search(message, one_error(capsys))

# ----------------------------------------------------------------------------------------------
# Corpora that are not what they claim


def random_docs_gz(path: Path, n: int = 3000) -> bytes:
    """Short documents of random letters: text that gzip cannot shrink much, so that the
    reader meets a cut in the file only after several training steps."""
    import gzip
    import random
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text = "".join(json.dumps({"text": "".join(rng.choices(letters, k=40))}) + "\n"
                   for _ in range(n))
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path.read_bytes()


@pytest.mark.slow
def test_a_gzip_cut_short_mid_training_checkpoints_first_then_resumes_exactly(tmp_path,
                                                                               tiny_base, capsys):
    flags = dict(tokenizer_data=data.BUNDLED["ko_train"], mix_1b="ko=1.0", ckpt_every=100,
                 batch_tokens=1024)
    whole = random_docs_gz(tmp_path / "whole.jsonl.gz")
    ref = tmp_path / "ref"
    assert bori.main(tiny_flags(ref, tiny_base, data_ko=tmp_path / "whole.jsonl.gz",
                                **flags)) == 0
    corpus = tmp_path / "corpus.jsonl.gz"
    corpus.write_bytes(whole[: len(whole) // 12])
    out = tmp_path / "run"
    capsys.readouterr()
    assert bori.main(tiny_flags(out, tiny_base, data_ko=corpus, **flags)) == 2
    assert re.search(r"corpus.jsonl.gz is a damaged or cut-short gzip file \(.*\); download it "
                     r"again", one_error(capsys))
    failed_at = [r for r in logged(out) if r["kind"] == "train"][-1]
    assert failed_at["phase"] == "1b" or failed_at["step"] >= 2, failed_at  # mid-training
    ckpt = sorted((out / f"phase{failed_at['phase']}").glob("ckpt-*"))[-1]
    assert ckpt.name == f"ckpt-{failed_at['step']:06d}"  # saved at the step it stopped at
    corpus.write_bytes(whole)  # the file downloaded again
    assert bori.main(tiny_flags(out, tiny_base, data_ko=corpus, **flags)) == 0
    assert_same_run(out, ref)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
@pytest.mark.parametrize("language", ["ko", "en"])
def test_utf16_or_32_text_is_refused_naming_the_file(encoding, language, tmp_path, tiny_base,
                                                     capsys):
    text = {"ko": "한국어 문서입니다. 둘째 문장.", "en": "An English document."}[language]
    path = tmp_path / f"corpus.{encoding}.txt"
    path.write_bytes(("\n\n".join([text] * 50)).encode(encoding))
    out = tmp_path / "run"
    assert bori.main(tiny_flags(out, tiny_base, **{f"data_{language}": path})) == 2
    line = one_error(capsys)
    flag = {"ko": "data_new", "en": "data_en"}[language]
    assert f"--{flag}: {path} is not UTF-8 text (it looks like UTF-16 or UTF-32)" in line
    assert "iconv -f UTF-16 -t UTF-8" in line
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("value, shown", [("12", "int '12'"), ("null", "NoneType 'None'"),
                                          ('["a", "b"]', "list \"['a', 'b']\"")])
def test_a_text_field_that_is_not_text_is_said(value, shown, tmp_path, base_tok):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "좋은 문서"}\n{"text": ' + value + "}\n")
    with pytest.raises(ValueError, match=re.escape(f"c.jsonl line 2: field 'text' holds {shown}, "
                                                   "not text; fix or drop that line")):
        data.PackedStream(data.Source("ko", str(path)), base_tok, 0).take(100)


def test_one_huge_line_stays_bounded_and_round_trips(tmp_path, base_tok):
    """A 3 MB document on one line, .txt and .jsonl: pieces of at most 256 KiB, a token
    buffer far below the document's size, and the same text back."""
    doc = "".join(f"{i}번째 문장은 아주 길다. " for i in range(120_000))  # ~3.2 MB of UTF-8
    short = "짧은 문서."
    for name, content in [
            ("huge.txt", f"{doc}\n\n{short}\n"),
            ("huge.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                   for t in (doc, short)))]:
        (tmp_path / name).write_text(content)
        pieces = list(data.iter_pieces(str(tmp_path / name)))
        assert max(len(p.encode()) for p, _ in pieces) <= 2**18 + 3  # + a cut character
        assert "".join(p for p, _ in pieces[:-1]) == doc and pieces[-2][1] and pieces[-1][1]
        stream = data.PackedStream(data.Source("ko", str(tmp_path / name)), base_tok, 0)
        tokens, peak = [], 0
        while 0 not in tokens[-1000:]:  # up to the first document's EOS
            tokens += stream.take(1000)
            peak = max(peak, len(stream.state_dict()["buffer"]))
        first_doc = tokens[:tokens.index(0)]
        assert base_tok.decode(first_doc) == doc
        assert peak < 600_000 and len(first_doc) > 1_500_000, (peak, len(first_doc))


def test_tokenizer_bytes_is_honoured_inside_a_document(tmp_path):
    import threading
    from types import SimpleNamespace

    import prepare
    (tmp_path / "one.txt").write_text("가나다라 " * 100_000 + "\n")  # 1.3 MB, one document
    cfg = bori.Config(tokenizer_data=str(tmp_path / "one.txt"), data_new="", text_field="text",
                      tokenizer_bytes=10_000)
    run = SimpleNamespace(cfg=cfg, check_stop=lambda before: None, stop=threading.Event(),
                          corpora=bori.sources(cfg))
    got = "".join(prepare.bpe_training_text(run))
    assert 9_997 <= len(got.encode()) <= 10_000

# ----------------------------------------------------------------------------------------------
# The converted-GGUF cache is keyed by content


def test_gguf_cache_is_keyed_by_content_and_shared_safely(tiny_run, tmp_path):
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    a.parent.mkdir(), b.parent.mkdir()
    write_gguf(tiny_run / "final", a, "f32")
    write_gguf(tiny_run / "final", b, "f16")
    cache = tmp_path / "cache"
    folder_a, folder_b = resolve_base(str(a), cache), resolve_base(str(b), cache)
    assert folder_a != folder_b  # the same name, other content: two conversions
    embed = "model.embed_tokens.weight"  # f16 rounds it: the two are really different files
    assert not torch.equal(weights(folder_a)[embed], weights(folder_b)[embed])
    shutil.copy(b, a)  # replaced in place: converted anew
    assert resolve_base(str(a), cache) == folder_b
    # two first-time conversions at once: both succeed, one folder stands, whole
    c = tmp_path / "c.gguf"
    write_gguf(tiny_run / "final", c, "f32")
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from inputs import "
              f"resolve_base; print(resolve_base({str(c)!r}, {str(cache)!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    folder = Path(outs[0][0].strip())
    assert torch.equal(weights(folder)["model.norm.weight"],
                       weights(tiny_run / "final")["model.norm.weight"])
    assert not list(cache.glob("*.tmp")) and len(list(cache.iterdir())) == 3

# ----------------------------------------------------------------------------------------------
# Ctrl-C, and a rank that stops the others


@pytest.mark.slow
def test_ctrl_c_is_a_clean_stop_with_a_checkpoint(tmp_path, tiny_base, tiny_run):
    out = tmp_path / "run"
    cmd = command(out, tiny_base, 1, ckpt_every=100)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.time()
    while n_train_records(out) < 3 and time.time() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err[-2000:]
    step = int(re.search(r"interrupted: stopped at phase 1a step (\d+)", err).group(1))
    assert (out / "phase1a" / f"ckpt-{step:06d}").is_dir()
    code, err, _ = run_until(cmd, lambda: False)
    assert code == 0, err[-2000:]
    assert_same_run(out, tiny_run)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_base):
    out = tmp_path / "run"
    # long steps (64 micro-batches), so that the second signal comes inside the same step
    proc = subprocess.Popen(command(out, tiny_base, 1, steps_1a=500, decay_1a=2,
                                    batch_tokens=8192), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    t0 = time.time()
    while n_train_records(out) < 1 and time.time() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    while not any("Ctrl-C again stops at once" in line for line in err):
        time.sleep(0.01)  # the first one is handled: it said so
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    time.sleep(0.5)
    err = "".join(err)
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err[-2000:]
    assert "interrupted at once by a second Ctrl-C; the last checkpoint stands" in err


@pytest.mark.slow
def test_under_torchrun_only_the_rank_that_knows_says_why(tmp_path, tiny_base):
    """A second run on a locked out_dir: rank 0 says so; rank 1 stops without a traceback."""
    out = tmp_path / "run"
    holder = subprocess.Popen(command(out, tiny_base, 1, steps_1a=500, decay_1a=2), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        t0 = time.time()
        while n_train_records(out) < 1 and time.time() - t0 < 120:
            time.sleep(0.05)
        two = subprocess.run(command(out, tiny_base, 2, steps_1a=500, decay_1a=2), env=ENV,
                             capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert two.returncode != 0
    assert two.stderr.count("error: ") == 1, two.stderr[-3000:]
    assert re.search(r"error: .* is in use by another bori run \(pid \d+", two.stderr)
    assert f'File "{ROOT}' not in two.stderr  # no traceback through bori: torchrun's own only

# ----------------------------------------------------------------------------------------------
# A write the kernel refuses, anywhere: one sentence, no .tmp left, and the run finishes after


def limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("stage, limit, message", [
    ("tokenizer", 1_000_000, r"could not write .*run/tokenizer \(File too large"),
    ("card", 20_000, r"could not write the model card or plots in .*run \(File too large\)"),
    ("gguf", 4_000_000, r"could not write .*run/final.gguf \(.*written\)"),
])
def test_a_refused_write_in_any_stage_is_one_sentence(stage, limit, message, tmp_path, tiny_base,
                                                      tiny_run):
    out = tmp_path / "run"
    if stage != "tokenizer":  # a finished run that lost its final files: only they are written
        shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("final.gguf", "plots"))
        (out / "final" / "README.md").unlink()
    cmd = command(out, tiny_base, 1)
    code, err, _ = run_until(cmd, lambda: False, preexec_fn=limit_file_size(limit))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.tmp.*"))
    code, err, _ = run_until(cmd, lambda: False)  # space is back
    assert code == 0, err[-2000:]
    assert_same_run(out, tiny_run)
    (_, ours, meta), (_, theirs, their_meta) = (read_gguf(r / "final.gguf")
                                                for r in (out, tiny_run))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {**meta, "general.name": ""} == {**their_meta, "general.name": ""}  # named after the run

# ----------------------------------------------------------------------------------------------
# The utilities take what a user has at hand


def utility(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.slow
def test_the_utilities_take_a_run_folder_and_name_what_is_wrong(tiny_run, stopped, tmp_path):
    out = utility("sample.py", tiny_run, "--prompt", "한국어", "--max_tokens", "3",
                  "--temperature", "0")
    assert out.returncode == 0 and f"model: {tiny_run / 'final'}" in out.stdout, out.stderr
    out = utility("sample.py", stopped, "--max_tokens", "2")  # a run still in Phase 1A
    assert out.returncode == 0 and "phase1a/ckpt-000004" in out.stdout, out.stderr
    out = utility("sample.py", tiny_run, "--max_tokens=-5")
    assert out.returncode == 2 and "argument --max_tokens: -5 is below 1" in out.stderr
    out = utility("export_gguf.py", tiny_run, tmp_path / "x.gguf", "--dtype", "f32")
    assert out.returncode == 0 and (tmp_path / "x.gguf").stat().st_size > 1_000_000, out.stderr
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "final", broken)
    cut_short(broken / "model.safetensors")
    for script, args in [("sample.py", [broken]),
                         ("export_gguf.py", [broken, tmp_path / "y.gguf"])]:
        out = utility(script, *args)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert re.search(r"error: .*broken/model.safetensors is damaged or cut short",
                         out.stderr.splitlines()[-1])
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "y.gguf.tmp").exists()
    out = utility("sample.py", tmp_path)
    assert "holds no model: pass a model folder" in out.stderr


@pytest.mark.slow
def test_report_says_what_it_wrote_for_a_partial_run_and_a_cut_log(stopped, tiny_run, tmp_path):
    out = utility("report.py", stopped)  # Phase 1A only: a plot, no card
    assert out.returncode == 0, out.stderr
    assert f"wrote {stopped / 'plots' / 'training.png'}\n" in out.stdout
    assert "no model card: the run has no final model yet" in out.stdout
    assert not (stopped / "final").exists()
    run = tmp_path / "finished"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "pha')  # a record a kill cut short
    (run / "final" / "README.md").unlink()
    out = utility("report.py", run)
    assert out.returncode == 0 and str(run / "final" / "README.md") in out.stdout, out.stderr
    card = (tiny_run / "final" / "README.md").read_text()  # the card names the run's folder
    card = card.replace(str(tiny_run), str(run)).replace(f"bori-{tiny_run.name}", "bori-finished")
    assert (run / "final" / "README.md").read_text() == card
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    out = utility("report.py", run)
    assert out.returncode == 1 and "metrics.jsonl line 4 is not a JSON record" in out.stderr
