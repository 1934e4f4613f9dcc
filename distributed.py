"""Processes and devices: the ranks torchrun starts, the process group, autocast.

    torchrun --nproc_per_node=2 bori.py   # RANK, LOCAL_RANK and WORLD_SIZE come from torchrun

NCCL joins the GPUs; gloo joins CPU processes, so DDP runs (and is tested) on a CPU too.
"""
import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistEnv:
    """Rank and device from torchrun's variables; device is auto, cuda or cpu."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu")
    env = DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                  int(os.environ.get("WORLD_SIZE", 1)))
    env.device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(env.device)
    if env.world_size > 1:  # an hour: rank 0 alone builds the tokenizer while the others wait
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return env


def print0(env: DistEnv, *args):
    if env.is_master:
        print(*args, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list, device) -> list:
    """Element-wise sum over ranks (float64), or the values themselves in one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def autocast(dtype: str, device: torch.device):
    """(autocast context, its dtype or None for fp32) for dtype auto, float16, bfloat16 or
    float32; auto is float16 on CUDA and float32 on a CPU. bf16 only when asked: a T4 emulates
    it (slowly) though torch.cuda.is_bf16_supported() says True."""
    name = dtype if dtype != "auto" else "float16" if device.type == "cuda" else "float32"
    if name == "float32":
        return nullcontext(), None
    return torch.autocast(device.type, dtype=getattr(torch, name)), getattr(torch, name)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
