"""What the tests share besides fixtures: texts, the tiny run's flags, readers of a run's output,
processes started and stopped, files damaged."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import data

ROOT = Path(__file__).resolve().parent.parent

ENGLISH = [
    "The history of the city goes back to Roman times, when a small settlement was built on the "
    "banks of the river. Over the following centuries it grew into an important trading centre.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; the trip took about 76 hours.",
]
# For perplexity: the converted model gives 7.2; without the Q/K un-permutation, 43.5.
PARAGRAPH = (
    "The history of the city goes back to Roman times, when a small settlement was built on the "
    "banks of the river. Over the following centuries it grew into an important trading centre, "
    "and by the Middle Ages it had become one of the largest towns in the region. Today it is "
    "known for its old cathedral, its university and its markets.")
KOREAN = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "오늘은 날씨가 맑아서 친구들과 함께 한강 공원에 가서 자전거를 탔습니다.",
]


def tiny_flags(out_dir, base_dir, **overrides) -> list:
    """A complete but tiny run: a random 2-layer model with the real tokenizer, bundled text."""
    flags = dict(out_dir=out_dir, base=base_dir, data_ko=data.BUNDLED["ko_train"],
                 data_en=data.BUNDLED["en_train"], eval_ko=data.BUNDLED["ko_eval"],
                 eval_en=data.BUNDLED["en_eval"], eval_bytes=1500, probe_bytes=3000,
                 probe_pairs=20, new_tokens=300,
                 tokenizer_bytes=300_000, seq_len=32, micro_batch=2, batch_tokens=128,
                 steps_1a=6, lr_1a=1e-2, warmup_1a=1, decay_1a=2, steps_1b=6, lr_1b=1e-2,
                 warmup_1b=1, decay_1b=2, grad_checkpointing=True, eval_every=3,
                 ckpt_every=2, log_every=1, sample_tokens=4, device="cpu",
                 keep_stage_models=True)  # the tests look into every stage
    flags.update(overrides)
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()]


def weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def logged(out) -> list:
    """Every metrics record but the wall-clock ones."""
    clock = ("tok_per_s", "mfu", "time")
    return [{k: v for k, v in r.items() if k not in clock}
            for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]


def free_port() -> int:
    """A TCP port nothing listens on now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same thread count as the in-process reference run (conftest): reductions then match.
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def command(out, base, world: int, **overrides) -> list:
    flags = tiny_flags(out, base, **overrides)
    if world == 1:
        return [sys.executable, str(ROOT / "bori.py"), *flags]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
            f"--master_port={free_port()}", str(ROOT / "bori.py"), *flags]


def n_train_records(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"kind": "train"' in ln for ln in open(path)) if path.is_file() else 0


def process_tree(pid: int) -> list:
    """pid and all its descendants (torchrun starts each worker in a session of its own)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def send(pid: int, sig):
    """SIGKILL: the whole machine dies, workers included. SIGTERM: to the process group, as a
    notebook or scheduler sends it; torchrun forwards it to its workers."""
    if sig == signal.SIGKILL:
        for p in process_tree(pid):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
    else:
        os.killpg(pid, sig)


def run_until(cmd, until, sig=signal.SIGKILL, preexec_fn=None, timeout=300):
    """Run cmd in its own session; when until() holds, send it sig (see send()).
    Returns (exit code, stderr, whether the signal was sent)."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=preexec_fn)
    sent, t0 = False, time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if not sent and until():
            send(proc.pid, sig)
            sent = True
        time.sleep(0.002)
    if proc.poll() is None:
        send(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    return proc.returncode, err, sent


def utility(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)


def one_error(capsys) -> str:
    """The single `error:` line a failed run printed (and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def assert_same_run(out: Path, ref: Path):
    """Bit for bit the same final weights, and the same metrics but the wall-clock ones."""
    for key, value in weights(ref / "final").items():
        assert torch.equal(value, weights(out / "final")[key]), key
    assert logged(out) == logged(ref)


def flip_bit(path: Path, offset_from_end: int = 1000):
    data_ = bytearray(path.read_bytes())
    data_[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data_))


def cut_short(path: Path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def write_source(folder: Path, kind: str, n_files: int, texts: list) -> Path:
    """texts spread round-robin over n_files local files of kind jsonl or parquet in folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True)
    for f in range(n_files):
        part = texts[f::n_files]
        if kind == "parquet":
            pq.write_table(pa.table({"text": part}), folder / f"part-{f}.parquet")
        else:
            (folder / f"part-{f}.jsonl").write_text("".join(
                json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in part))
    return folder
