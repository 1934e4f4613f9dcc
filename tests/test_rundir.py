"""rundir.py: one run per out_dir, config.json and the resume decisions: what a run may be
resumed or re-run with, and every state file named when it is damaged."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import bori
import checkpoint
import data
from errors import EXIT_INTERRUPTED
from helpers import ENV, command, cut_short, flip_bit, n_train_records, one_error, tiny_flags


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_stops_at_once_naming_the_first(tmp_path, tiny_base,
                                                                          capsys, fresh):
    out = fresh(tmp_path / "run")
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


@pytest.mark.slow
def test_changing_the_held_out_text_mid_run_is_refused(stopped, tiny_base, capsys):
    assert bori.main(tiny_flags(stopped, tiny_base, eval_bytes=1000)) == 2
    assert re.search(r"holds a run started with other settings \(eval_bytes: 1500 -> 1000\)",
                     one_error(capsys))


@pytest.mark.slow
def test_the_held_out_file_edited_mid_run_is_refused(tmp_path, fresh, tiny_base, capsys):
    """The same settings, but the text eval_new reads is no longer what the tokenizer stage
    recorded (its digest in DONE.json; here edited in place of the file, which gives the same
    mismatch): the scores would go on on other text than the base line's, so it is refused."""
    out = fresh(tmp_path / "run")
    done_file = out / "tokenizer" / "DONE.json"
    done = json.loads(done_file.read_text())
    # what every later command is held to: the eval texts and the grammar probes' texts
    assert set(done["held_out"]) == {"ko", "en", "ko_probes", "en_probes"}
    done_file.write_text(json.dumps({**done, "held_out": {**done["held_out"], "ko": "0" * 16}}))
    assert bori.main(tiny_flags(out, tiny_base, stop_after_steps=1)) == 2
    assert re.search(r"--eval_new: its first eval_bytes of text are not what this run began "
                     r"with .*; restore .*ko_eval.jsonl, or use a new out_dir", one_error(capsys))
    assert not (out / "phase1a").exists()


@pytest.mark.slow
def test_a_setting_is_fixed_only_by_a_stage_that_used_it(stopped, tiny_base, capsys):
    """stopped is in Phase 1A, which reads no English: the fix an English error suggests
    (PATH#KEY, another file) is taken; a setting Phase 1A used is refused, naming it."""
    english = f"{data.BUNDLED['en_train']}#text"
    assert bori.main(tiny_flags(stopped, tiny_base, data_en=english, mix_1b="ko=0.8,en=0.2",
                                stop_after_steps=1)) == EXIT_INTERRUPTED
    assert bori.main(tiny_flags(stopped, tiny_base, data_en=english, mix_1b="ko=0.8,en=0.2",
                                seq_len=64)) == 2
    assert re.search(r"other settings \(seq_len: 32 -> 64\), which its phase1a stage used and "
                     r"keep state made from; use a new out_dir", one_error(capsys))


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
def test_resume_refuses_breaking_changes_but_allows_safe_ones(tmp_path, tiny_base, capsys,
                                                              fresh):
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, stop_after_steps=2)) == EXIT_INTERRUPTED
    assert bori.main(tiny_flags(tmp_path, tiny_base, new_tokens=301, seq_len=64)) == 2
    err = capsys.readouterr().err
    assert re.search(r"holds a run started with other settings \(new_tokens: 300 -> 301, "
                     r"seq_len: 32 -> 64\)", err), err
    assert bori.main(tiny_flags(tmp_path, tiny_base, log_every=5, eval_every=2)) == 0


@pytest.mark.slow
def test_resume_refuses_another_process_count_or_a_tokenizer_of_another_base(
        tmp_path, tiny_base, capsys, fresh):
    import shutil
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, stop_after_steps=2)) == EXIT_INTERRUPTED
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
