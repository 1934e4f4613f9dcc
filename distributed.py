"""Processes and devices: the ranks torchrun starts, the process group, autocast.

    torchrun --nproc_per_node=2 bori.py   # RANK, LOCAL_RANK and WORLD_SIZE come from torchrun

NCCL joins the GPUs; gloo joins CPU processes, so DDP runs (and is tested) on a CPU too.
"""
import datetime
import os
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import PeerStopped, RankError, TrainingStopped


@dataclass
class DistEnv:
    """This process's place among the ranks, and the device it computes on."""
    rank: int = 0
    local_rank: int = 0  # the GPU index on this machine; rank counts across machines
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        """Rank 0: the one rank that prints, builds shared files and writes the weights."""
        return self.rank == 0


def launched() -> DistEnv:
    """This process's rank and the process count as torchrun set them (one process without
    torchrun), before any process group or device exists: the one reader of its variables."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


def setup_distributed(device: str = "auto") -> DistEnv:
    """Rank and device from torchrun's variables; device is auto, cuda or cpu."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu")
    env = launched()
    env.device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:  # before the process group: NCCL binds a rank to the current device, and
        torch.cuda.set_device(env.device)  # without this every rank would land on cuda:0
    if env.world_size > 1:  # an hour: rank 0 alone builds the tokenizer while the others wait
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return env


def print0(env: DistEnv, *args):
    """print on rank 0 only, flushed: torchrun pipes stdout, which Python then buffers."""
    if env.is_master:
        print(*args, flush=True)


def barrier():
    """Wait until every rank is here (nothing to wait for in one process)."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list, device) -> list:
    """Element-wise sum over ranks (float64), or the values themselves in one process."""
    # float64: a loss summed over thousands of tokens keeps its low digits through the reduce
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def stop_on_signals() -> threading.Event:
    """An Event that SIGTERM (what notebooks and schedulers send) and Ctrl-C set: the run
    stops at the next step boundary with a checkpoint. A second Ctrl-C stops at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        # torchrun passes the signal to every rank: one line, from rank 0 (no env here)
        if not stop.is_set() and launched().is_master:
            print(f"\n{signal.Signals(signum).name}: stopping at the next step boundary, with a "
                  "checkpoint (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def on_master(env: DistEnv, work, *args):
    """work(*args) on rank 0 while the others wait; its result on rank 0, None elsewhere. If
    it fails there, every rank stops: rank 0 with its sentence, the others quietly (or as
    interrupted, if rank 0 was)."""
    error = result = None
    if env.is_master:
        try:
            result = work(*args)
        except Exception as e:  # handed on below, on every rank
            error = e
    # A collective every rank reaches: the others learn now that rank 0 failed, rather than
    # after the next barrier's 60-minute timeout. 2: interrupted, so they stop as interrupted.
    code = all_sum([0.0 if error is None else 2.0 if isinstance(error, TrainingStopped)
                    else 1.0], env.device)[0]
    if error is not None:
        raise error
    if code:
        raise TrainingStopped("rank 0 stopped") if code == 2 else PeerStopped()
    return result


def on_each_rank(env: DistEnv, work, *args):
    """work(*args) on every rank (a file each writes of its own); its result. If it fails on
    any rank, every rank stops: rank 0 with its sentence if it failed too (a full disk shared
    by all: one sentence, not one per rank), else each failing rank with its own; the others
    quietly."""
    error = result = None
    try:
        result = work(*args)
    except (ValueError, OSError) as e:  # a user's problem with its fix: handed on below
        error = e
    failed = [0.0] * env.world_size
    failed[env.rank] = float(error is not None)
    failed = all_sum(failed, env.device)  # which ranks failed, known to every rank
    if any(failed):
        if error is None or (failed[0] and env.rank != 0):
            raise PeerStopped()
        # rank 0 speaks as ever; another rank's own failure is a RankError, which it says
        raise error if env.rank == 0 else RankError(str(error)) from None
    return result


def autocast(dtype: str, device: torch.device):
    """(autocast context, its dtype or None for fp32) for dtype auto, float16, bfloat16 or
    float32; auto is float16 on CUDA and float32 on a CPU. bf16 only when asked: a T4 emulates
    it (slowly) though torch.cuda.is_bf16_supported() says True."""
    name = dtype if dtype != "auto" else "float16" if device.type == "cuda" else "float32"
    if name == "float32":  # None also tells the caller that GradScaler stays off
        return nullcontext(), None
    return torch.autocast(device.type, dtype=getattr(torch, name)), getattr(torch, name)


def all_max(values: list, device) -> list:
    """Element-wise maximum over ranks (fp16 headroom: the rank closest to overflow counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def shutdown():
    """Leave the process group and give SIGINT and SIGTERM their defaults back, so the Python
    process that ran bori (pytest, a notebook) stops on Ctrl-C again."""
    if dist.is_initialized():
        dist.destroy_process_group()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
