"""runlog.py: metrics.jsonl, the progress line, TensorBoard and W&B."""
import json
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

import bori
import runlog
from helpers import ENV, command, tiny_flags


def test_metrics_after_a_kill_mid_record_keep_every_whole_record_up_to_the_checkpoint(tmp_path):
    rec = [{"kind": "train", "phase": "1a", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    rec.insert(2, {"kind": "eval", "phase": "1a", "step": 2, "ko_bpb": 1.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rec) + '{"kind": "train", "pha')
    runlog.Metrics(path, True).truncate_after("1a", 2)  # resuming from step 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rec[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left


def test_a_layer_near_the_fp16_limit_is_warned_about(tmp_path, capsys):
    from runlog import Metrics, Progress
    with Progress(Metrics(tmp_path / "m.jsonl", True), "1a", 10, 0, 1, True, 3.0) as progress:
        progress.eval(0, {"ko_bpb": 1.0}, [0.1, 0.62, 0.3])
    assert "warning: layer 1's activations reach 62% of fp16's largest number" in \
        capsys.readouterr().err
    assert '"fp16_peak": [0.1, 0.62, 0.3]' in (tmp_path / "m.jsonl").read_text()


@pytest.mark.slow
def test_a_log_that_is_not_a_terminal_gets_plain_lines(tmp_path, tiny_base):
    out = tmp_path / "run"
    run = subprocess.run(command(out, tiny_base, 1, log_every=2), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = re.findall(r"^phase 1b step (\d+)/6 \| loss [\d.]+ \| bits/byte ~[\d.]+ \| lr "
                       r"[\d.e+-]+ \| tok/s [\d,]+ \| phase time \d\d:\d\d:\d\d \| eta "
                       r"\d\d:\d\d:\d\d \(the whole run\)$", run.stderr, flags=re.M)
    assert lines == ["2", "4", "6"], run.stderr[-2000:]
    assert "\r" not in run.stderr and "mfu" not in run.stderr  # no bar; no MFU on a CPU
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(abs(r["time"] - time.time()) < 600 for r in records)
    assert not any("mfu" in r for r in records)


@pytest.mark.slow
def test_tensorboard_and_wandb_offline_get_every_number(tmp_path, tiny_base, monkeypatch, fresh):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for sink in ("tensorboard", "wandb"):
        assert bori.main(tiny_flags(fresh(tmp_path / sink), tiny_base, report_to=sink)) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard" / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 13))  # Phase 1B after Phase 1A's 6 steps
    train = [json.loads(line) for line in open(tmp_path / "tensorboard" / "metrics.jsonl")]
    train = [r["loss"] for r in train if r["kind"] == "train"]
    assert [e.value for e in losses] == pytest.approx(train)
    assert "eval/ko_bpb" in events.Tags()["scalars"]
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 1000
    rows = wandb_history(runs[0])  # the values W&B would upload, read back from its own file
    logged_losses = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    train = [json.loads(line) for line in open(tmp_path / "wandb" / "metrics.jsonl")]
    evals = [r for r in train if r["kind"] == "eval" and r["phase"] in ("1a", "1b")]
    train = [r for r in train if r["kind"] == "train"]
    assert [s for s, _ in logged_losses] == list(range(1, 13))
    assert [v for _, v in logged_losses] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [r["train/lr"] for r in rows if "train/lr" in r] == pytest.approx(
        [r["lr"] for r in train], rel=1e-6)
    # W&B keeps one row per step: Phase 1B's step-0 eval lands on Phase 1A's last step (6)
    # and, logged later, is the value that row keeps
    expected = {r["step"] + (6 if r["phase"] == "1b" else 0): r["ko_bpb"] for r in evals}
    got = {r["_step"]: r["eval/ko_bpb"] for r in rows if "eval/ko_bpb" in r}
    assert got.keys() == expected.keys() and len(got) >= 4, (got, expected)
    assert [got[k] for k in sorted(got)] == pytest.approx([expected[k] for k in sorted(got)],
                                                          rel=1e-6)


def wandb_history(path: Path) -> list:
    """The history rows ({key: value}, with _step) of an offline W&B run, parsed from its .wandb
    file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of records, each a 7-byte
    header of crc32, length and type, FULL=1 or FIRST=2, MIDDLE=3, LAST=4) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B", raw[:7]
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the block is unused
            pos += block - pos % block
            continue
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
