"""Whole runs of the recipe: exact resume after clean stops, signals, kills, full disks and
damaged checkpoints; DDP over torchrun/gloo; the presets end to end.

After any fault, running the same command again must end in exactly the weights and metrics of
an uninterrupted run."""
import gzip
import json
import os
import random
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

import bori
import checkpoint
import data
from errors import EXIT_INTERRUPTED, TrainingStopped
from gguf_io import read_gguf
from helpers import (ENV, ROOT, assert_same_run, command, flip_bit, free_port, logged,
                     n_train_records, one_error, process_tree, run_until, send, tiny_flags, weights,
                     write_source)
from hf_io import from_pretrained


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


def random_docs_gz(path: Path, n: int = 3000) -> bytes:
    """Short documents of random common Hangul syllables: Korean text (as data_new must be)
    that gzip cannot shrink much, so that a cut at 45% of the file lies past what is
    checked before training (prepare.SCRIPT_CHECK_LETTERS) and is met after several steps."""
    import random
    rng = random.Random(0)
    syllables = "가나다라마바사아자차카타파하고는이을를의에서한국어문장입니다오늘"
    text = "".join(json.dumps({"text": "".join(rng.choices(syllables, k=12))},
                              ensure_ascii=False) + "\n" for _ in range(n))
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path.read_bytes()


@pytest.mark.slow
def test_a_gzip_cut_short_mid_training_checkpoints_first_then_resumes_exactly(tmp_path,
                                                                               tiny_base, capsys,
                                                                               fresh):
    flags = dict(tokenizer_data=data.BUNDLED["ko_train"], mix_1b="ko=1.0", ckpt_every=100,
                 batch_tokens=3072)
    whole = random_docs_gz(tmp_path / "whole.jsonl.gz")
    ref = fresh(tmp_path / "ref", data_ko=tmp_path / "whole.jsonl.gz", **flags)
    assert bori.main(tiny_flags(ref, tiny_base, data_ko=tmp_path / "whole.jsonl.gz",
                                **flags)) == 0
    corpus = tmp_path / "corpus.jsonl.gz"
    corpus.write_bytes(whole[: len(whole) * 9 // 20])
    out = fresh(tmp_path / "run", data_ko=corpus, **flags)
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


@pytest.mark.slow
def test_ctrl_c_is_a_clean_stop_with_a_checkpoint(tmp_path, tiny_base, tiny_run, fresh):
    out = fresh(tmp_path / "run")
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
def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_base, fresh):
    out = fresh(tmp_path / "run")
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
def test_under_torchrun_only_the_rank_that_knows_says_why(tmp_path, tiny_base, fresh):
    """A second run on a locked out_dir: rank 0 says so; rank 1 stops without a traceback."""
    out = fresh(tmp_path / "run")
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


@pytest.mark.slow
def test_under_torchrun_a_rank_s_own_failure_is_its_one_sentence(tmp_path, tiny_base, fresh):
    """Two classes on 2 gloo processes: a --report_to package missing (rank 0 opens the sink)
    and a source with fewer documents than processes (rank 1 alone has none of it). Each is
    one sentence from the rank that knows; the other rank exits quietly, with no traceback
    through bori (torchrun prints its own summary of the failed workers)."""
    fake = tmp_path / "no_wandb" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    one_doc = tmp_path / "one.jsonl"
    one_doc.write_text('{"text": "The only English document."}\n')
    cases = [
        (dict(report_to="wandb"), {"PYTHONPATH": str(fake.parent)},
         r"error: report_to=wandb needs the wandb package: pip install wandb"),
        (dict(data_en=one_doc, mix_1a="ko=0.5,en=0.5"), {},
         r"error: --data_en: source en \(.*one.jsonl\) has no text for rank 1; give it more "
         r"documents \(at least one per process\)"),
    ]
    for n, (flags, env, message) in enumerate(cases):
        out = fresh(tmp_path / f"run{n}")
        run = subprocess.run(command(out, tiny_base, 2, **flags), env={**ENV, **env},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode != 0, run.stderr[-3000:]
        assert run.stderr.count("error: ") == 1, run.stderr[-3000:]
        assert re.search(message, run.stderr), run.stderr[-3000:]
        assert f'File "{ROOT}' not in run.stderr  # no traceback through bori: torchrun's own only


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


@pytest.mark.slow
def test_a_refused_hand_over_write_is_rank_1_s_sentence_and_loses_nothing(tmp_path, tiny_base,
                                                                          ddp_reference, fresh):
    """Phase 1A's end on 2 gloo processes, where the kernel refuses data-rank*.pt (a folder
    stands at its path): refused on both ranks, rank 0's one sentence; on rank 1 alone, rank
    1's one sentence, none from rank 0. No half-written file, the phase not marked done and
    its checkpoints kept; once the path is free, the same command ends in the uninterrupted
    run's weights."""
    out = fresh(tmp_path / "run")
    blockers = [out / "phase1a" / f"data-rank{r}.pt" for r in (0, 1)]
    for blocker in blockers:
        (blocker / "inside").mkdir(parents=True)
    # both ranks refused alike (one disk for all): rank 0's sentence alone, not one per rank;
    # then rank 1's alone: its own sentence
    for rank in (0, 1):
        code, err, _ = run_until(command(out, tiny_base, 2), lambda: False)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code != 0 and len(lines) == 1, err[-3000:]
        assert re.search(rf"could not write .*phase1a/data-rank{rank}.pt \(Is a directory\); a "
                         r"file stands where a folder should \(or the other way round\): move it",
                         lines[0])
        assert f'File "{ROOT}' not in err  # no traceback through bori on either rank
        assert not (out / "phase1a" / "DONE.json").exists() and list(out.glob("phase1a/ckpt-*"))
        assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.tmp.*"))
        shutil.rmtree(blockers[rank])
    code, err, _ = run_until(command(out, tiny_base, 2), lambda: False)
    assert code == 0, err[-2000:]
    assert_same_run(out, ddp_reference)


def writing_checkpoint(out: Path) -> bool:
    return any(out.glob("phase1?/ckpt-*.tmp"))


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_base, fresh):
    out = fresh(tmp_path_factory.mktemp("ddp_ref") / "run")
    code, err, _ = run_until(command(out, tiny_base, 2), lambda: False)
    assert code == 0, err[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_anywhere_then_rerun_is_bit_identical(world, tmp_path, tiny_base, tiny_run,
                                                      request, fresh):
    reference = tiny_run if world == 1 else request.getfixturevalue("ddp_reference")
    out, rng = fresh(tmp_path / "run"), random.Random(world)
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
                                                                   tiny_run, fresh):
    out = fresh(tmp_path / "run")
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
def test_one_rank_dying_ends_the_other(tmp_path, tiny_base, fresh):
    out = fresh(tmp_path / "run")
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
                                                          tiny_run, fresh):
    out = fresh((small_disk or tmp_path) / "run")
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


def short_docs(path: Path, words: list, n: int = 400) -> str:
    rng = random.Random(path.name)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, 6)))},
                                       ensure_ascii=False) + "\n" for _ in range(n)))
    return str(path)


def settings(tmp_path: Path) -> dict:
    return dict(
        data_ko=short_docs(tmp_path / "ko.jsonl", "한국어 문서 짧은 글 하나 둘 셋 바다 산 강물".split()),  # noqa: E501 (wide characters)
        data_en=short_docs(tmp_path / "en.jsonl", "a short text of plain English words".split()),
        tokenizer_data=data.BUNDLED["ko_train"], ckpt_every=100)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base, fresh):
    root = tmp_path_factory.mktemp("short_docs")
    flags = settings(root)
    fresh(root / "ref", **flags)
    assert bori.main(tiny_flags(root / "ref", tiny_base, **flags)) == 0
    return root / "ref", flags


@pytest.mark.slow
def test_a_clean_stop_after_every_step_resumes_exactly(reference, tiny_base, tmp_path, fresh):
    ref, flags = reference
    fresh(tmp_path / "run", **flags)
    codes, argv = [], tiny_flags(tmp_path / "run", tiny_base, stop_after_steps=1, **flags)
    while not codes or codes[-1] == EXIT_INTERRUPTED:
        codes.append(bori.main(argv))  # the same command again and again
        assert len(codes) <= 12
    # a stop after each of the 12 steps but the last: stop_after_steps counts the whole
    # invocation, so after Phase 1A's last step Phase 1B stops before its first; 1B's last
    # step ends the run
    assert codes == [EXIT_INTERRUPTED] * 11 + [0]
    assert_same_run(tmp_path / "run", ref)


@pytest.mark.slow
def test_sigkill_after_every_checkpoint_and_at_the_handover_resumes_exactly(
        reference, tiny_base, tmp_path, fresh):
    ref, flags = reference
    out = fresh(tmp_path / "run", **flags)
    cmd = command(out, tiny_base, 1, **{**flags, "ckpt_every": 1})
    seen = set()

    def boundaries() -> set:
        """Finished checkpoints (a rename makes them appear whole) and the hand-over."""
        found = {p.relative_to(out).as_posix() for p in out.glob("phase1?/ckpt-??????")}
        return found | ({"handover"} if (out / "phase1a" / "DONE.json").is_file() else set())
    kills = 0
    while True:
        code, err, sent = run_until(cmd, lambda: bool(boundaries() - seen))
        seen |= boundaries()
        if not sent:
            assert code == 0, err[-2000:]
            break
        kills += 1
        assert kills <= 13, err[-2000:]
    assert {"handover", "phase1a/ckpt-000005", "phase1b/ckpt-000005"} <= seen
    assert kills >= 11  # steps 1-5 of each phase, and the hand-over
    assert_same_run(out, ref)


@pytest.mark.slow
def test_stopping_and_rerunning_equals_an_uninterrupted_run(tmp_path, tiny_base, tiny_run,
                                                            fresh):
    flags = tiny_flags(fresh(tmp_path), tiny_base, stop_after_steps=2)
    codes = []
    while not codes or codes[-1] == EXIT_INTERRUPTED:
        codes.append(bori.main(flags))  # the same command, again and again
        assert len(codes) < 20
    assert codes[-1] == 0 and len(codes) > 4
    for key, value in weights(tiny_run / "final").items():
        assert torch.equal(value, weights(tmp_path / "final")[key]), key
    assert logged(tmp_path) == logged(tiny_run)


@pytest.mark.slow
def test_a_cpu_fp32_run_resumes_in_fp16(tmp_path, tiny_base, fresh):
    """The hand-over an fp32 checkpoint makes to an fp16 run: a fresh GradScaler, no error."""
    fresh(tmp_path)
    assert bori.main(tiny_flags(tmp_path, tiny_base, stop_after_steps=2)) == EXIT_INTERRUPTED
    assert bori.main(tiny_flags(tmp_path, tiny_base, dtype="float16")) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scales = [r["scale"] for r in records if r["kind"] == "train" and r["phase"] == "1a"]
    assert scales[:2] == [1.0, 1.0] and scales[2] == 65536.0  # fp32: no scaler; fp16: fresh


def digits_corpus(path, n_docs=64):
    """Documents of exactly 32 single-digit tokens: with EOS each fills one 33-token block."""
    gen = torch.Generator().manual_seed(0)
    docs = ["".join(map(str, torch.randint(0, 10, (32,), generator=gen).tolist()))
            for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


DDP_SETTINGS = dict(mix_1b="ko=1.0", micro_batch=2, batch_tokens=128, ckpt_every=100,
                    eval_every=100, steps_1a=3, steps_1b=3, lr_1a=1e-3, lr_1b=1e-3)


def one_and_two_processes(tmp_path, tiny_base, fresh, env=None, **two_flags):
    """The same tiny run by torchrun with 2 gloo processes and by one process (2x accumulation)."""
    corpus = digits_corpus(tmp_path / "digits.jsonl")
    common = dict(data_ko=corpus, tokenizer_data=data.BUNDLED["ko_train"], **DDP_SETTINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    fresh(tmp_path / "two", **common, **two_flags)
    fresh(tmp_path / "one", **common)
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
def test_two_process_ddp_equals_one_process_with_double_accumulation(tmp_path, tiny_base,
                                                                      fresh):
    two, one = one_and_two_processes(tmp_path, tiny_base, fresh)
    a, b = weights(two / "final"), weights(one / "final")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    assert not torch.equal(a["model.norm.weight"], weights(tiny_base)["model.norm.weight"])


@pytest.mark.slow
def test_two_process_ddp_compiled_equals_one_eager_process(tmp_path, tiny_base, fresh):
    """torch.compile over DDP (the graph is split at DDP's gradient buckets) in both phases."""
    cache = tmp_path / "inductor"  # where the compiled kernels land: proof that it compiled
    two, one = one_and_two_processes(tmp_path, tiny_base, fresh, {"TORCHINDUCTOR_CACHE_DIR":
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
def test_compiled_run_equals_the_eager_run(tmp_path, tiny_base, tiny_run, fresh):
    """--compile=true (both phases, checkpointing) trains the same model: the compiler
    reorders float sums, so equal to rounding, not bit for bit."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # other tests' compiled graphs count toward the recompile limit
    counters.clear()
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, compile=True)) == 0
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
def test_a_finished_run_keeps_only_what_a_user_needs(tmp_path, tiny_base, fresh):
    out = fresh(tmp_path / "run")
    assert bori.main(tiny_flags(out, tiny_base, keep_stage_models=False)) == 0
    assert not (out / "init" / "model.safetensors").exists()
    assert not (out / "phase1a" / "model").exists() and not (out / "phase1b" / "model").exists()
    assert (out / "final" / "model.safetensors").is_file() and (out / "final.gguf").is_file()
    assert json.loads((out / "phase1b" / "DONE.json").read_text())["pruned"] == ["model"]
    assert bori.main(tiny_flags(out, tiny_base, keep_stage_models=False)) == 0  # still finished


DEMO_FLAGS = ["--preset=demo", "--steps_1a=2", "--warmup_1a=1", "--decay_1a=1", "--steps_1b=2",
              "--warmup_1b=1", "--decay_1b=1", "--eval_bytes=1500", "--sample_tokens=4"]


@pytest.fixture(scope="module")
def demo_stages(tmp_path_factory):
    """The demo preset's tokenizer and init stages (the real base, the reference merge), built
    once: the run stopped just before Phase 1A, then copied aside (the demo prunes
    init/model.safetensors when it finishes)."""
    out = tmp_path_factory.mktemp("demo") / "demo"

    def stop_before_training(*args, **kwargs):
        raise TrainingStopped("the prepared stages end here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bori, "run_phase", stop_before_training)
        assert bori.main([*DEMO_FLAGS, f"--out_dir={out}"]) == EXIT_INTERRUPTED
    stages = out.parent / "stages"
    for stage in ("tokenizer", "init"):
        shutil.copytree(out / stage, stages / stage)
    shutil.copy(out / "metrics.jsonl", stages / "metrics.jsonl")
    return out, stages


@pytest.fixture(scope="module")
def demo_run(demo_stages):
    """The demo preset, shortened, in this process, run on to its end."""
    out, _ = demo_stages
    assert bori.main([*DEMO_FLAGS, f"--out_dir={out}"]) == 0
    return out


@pytest.mark.slow
def test_demo_preset_end_to_end_and_loads_in_transformers(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = demo_run
    hf = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert hf.config.vocab_size == len(tok) == 58133
    ids = tok("대한민국의 수도는", return_tensors="pt")
    gen = hf.generate(**ids, max_new_tokens=8, do_sample=False)[0]
    ours = from_pretrained(out / "final").generate(ids["input_ids"], 8, temperature=0)[0]
    n = len(gen)
    assert n > ids["input_ids"].shape[1]
    assert gen.tolist() == ours[:n].tolist()  # transformers' greedy tokens are ours


@pytest.mark.slow
def test_the_demo_preset_runs_on_two_processes_as_it_is(tmp_path, demo_stages):
    out = tmp_path / "demo"  # the same settings: the in-process demo's first stages serve
    shutil.copytree(demo_stages[1], out)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(ROOT / "bori.py"), *DEMO_FLAGS, f"--out_dir={out}"],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert said.count("does not divide batch_tokens=512 over 2 processes; using "
                      "micro_batch=1") == 1
    assert said.count("phase 1a step 0: ") == 1 and said.count("Korean bits/byte") == 1
    assert json.loads((out / "config.json").read_text())["grad_accum"] == 1


def trained_documents(records: list, tok, eos_id: int) -> list:
    """(pass, text) of each whole document one source's streams on one rank handed to
    training (traced_run.py), phase after phase: each stream's tokens cut to those it took,
    then split at EOS. Phase 1B's stream starts with what 1A's read and did not take (its
    buffer), so the phases join into one stream; a last piece without its EOS was not trained
    whole."""
    tokens = []
    for record in records:
        tokens += [(epoch, i) for epoch, ids in record["read"] for i in ids][:record["taken"]]
    docs, doc = [], []
    for epoch, i in tokens:
        if i == eos_id:
            docs.append((epoch, tok.decode(doc, skip_special_tokens=False)))
            doc = []
        else:
            doc.append(i)
    return docs


@pytest.mark.slow
@pytest.mark.parametrize("world, ko_files, en_files", [
    (1, (1, "jsonl"), (4, "parquet")),
    (2, (2, "parquet"), (4, "parquet")),  # the reproduced case: 4 shards split over 2 ranks
    (3, (4, "jsonl"), (2, "jsonl")),
])
def test_no_rank_trains_on_held_out_text_in_a_real_run(world, ko_files, en_files, tmp_path,
                                                      tiny_base):
    """bori.py itself, under torchrun with `world` gloo processes: each rank records every token
    its training streams give (tests/traced_run.py). Each source is also its own eval source,
    spelled another way (a relative path, DIR/./FILE, a symlink; a glob for English, as eval_en
    defaults to data_en). No rank trains on a held-out document, and neither the BPE nor token
    distillation reads one; the ranks' documents in each pass are disjoint, and with the
    held-out ones the whole source."""
    from tokenizers import Tokenizer
    korean = [f"문서 {i}번: " + "한국어 문장을 여기에 씁니다. " * (2 + i % 4) for i in range(60)]
    english = [f"Document {i}: " + "some words of text. " * (1 + i % 3) for i in range(60)]
    ko = write_source(tmp_path / "ko", ko_files[1], ko_files[0], korean)
    en = write_source(tmp_path / "en", en_files[1], en_files[0], english)
    first_ko = sorted(ko.iterdir())[0]
    link = tmp_path / f"link{first_ko.suffix}"
    link.symlink_to(first_ko)
    eval_ko = {1: os.path.relpath(first_ko, ROOT), 2: f"{tmp_path}/./ko/{first_ko.name}",
               3: link}[world]
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    flags = tiny_flags(out, tiny_base, data_ko=ko, eval_ko=eval_ko, data_en=en,
                       eval_en=f"{en}/*.{en_files[1]}", mix_1b="ko=0.5,en=0.5", steps_1a=8,
                       steps_1b=16, batch_tokens=768, micro_batch=4, eval_every=100,
                       ckpt_every=100, tokenizer_bytes=0, new_tokens=20, init="distill",
                       distill_tokens=4, distill_contexts=2, distill_before=4, distill_after=4,
                       distill_steps=1)
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={world}",
                                      f"--master_port={free_port()}"]
    run = subprocess.run([sys.executable, *launcher, str(ROOT / "tests" / "traced_run.py"),
                          str(trace), *flags], env={**ENV, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eos_id = tok.token_to_id(data.EOS_TOKEN)
    ranks = [json.loads((trace / f"rank-{r}.json").read_text()) for r in range(world)]
    keys = set(ranks[0]["held_out_keys"])
    assert all(set(r["held_out_keys"]) == keys for r in ranks)  # the same on each rank
    for language, texts in (("ko", korean), ("en", english)):
        # the eval texts' documents and the grammar probes' (more of the same source)
        held = {t for t in texts if data.text_key(t).hex() in keys}
        assert set(ranks[0]["held_out"][language]) <= held < set(texts), language
        shares = [trained_documents([record for name, record in r["streams"].items()
                                     if name.startswith(f"{language}-")], tok, eos_id)
                  for r in ranks]
        for rank, share in enumerate(shares):
            texts_trained = {text for _, text in share}
            assert texts_trained <= set(texts), (language, rank, sorted(texts_trained)[:2])
            assert not texts_trained & held, (language, rank, sorted(texts_trained & held)[:2])
        # in each pass the ranks' documents are disjoint and, with the held-out ones, the whole
        # source (a parquet source's file order changes from pass to pass: so may the shares)
        finished = min(max(e for e, _ in share) for share in shares)  # passes all ranks ended
        assert finished >= 1, language
        for epoch in range(finished):
            passes = [{text for e, text in share if e == epoch} for share in shares]
            assert sum(map(len, passes)) == len(set().union(*passes)), (language, epoch)
            assert set().union(*passes) | held == set(texts), (language, epoch)
    bpe = ranks[0]["bpe"]
    assert bpe and set(bpe) <= set(korean) and not {data.text_key(t).hex() for t in bpe} & keys
    for rank, r in enumerate(ranks):  # token distillation's windows, on every rank: none either
        read = set(r["distill"])
        assert read and read <= set(korean), rank
        assert not {data.text_key(t).hex() for t in read} & keys, rank
