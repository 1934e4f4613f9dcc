"""Durable files for bori.py: atomic checkpoints, Hugging Face exports, metrics.jsonl.

A checkpoint is written to ckpt-NNNNNN.tmp/, every file fsynced, then renamed: a run killed at
any moment leaves either the complete new checkpoint or none, and the previous one intact.
Weights go through safetensors; the rest loads with torch.load(weights_only=True).
"""
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list, device) -> list:
    """Element-wise sum over ranks (float64), or the values themselves in one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def write_text_atomic(path: Path, text: str):
    """Write a whole file or, if killed midway, leave the old one: a rename is atomic."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def fsync_dir(path: Path, files: bool = False):
    """Flush a folder entry (and its files) to disk, so that a rename after it is durable."""
    for f in sorted(path.iterdir()) if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(phase_dir: Path, step: int, raw, optimizer, scaler, mixture, keep: int,
                    rank: int, device):
    """Model, optimizer, GradScaler and step from rank 0; data and RNG state from every rank."""
    final = phase_dir / f"ckpt-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if (final / "trainer.pt").is_file():  # this step is saved already
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        torch.save({"data": mixture.state_dict(), "rng": rng_state(device)}, tmp / f"rank{rank}.pt")
        if rank == 0:
            raw.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"step": step, "scaler": scaler.state_dict()}, tmp / "trainer.pt")
            fsync_dir(tmp, files=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(phase_dir)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(f"could not write checkpoint {final.name} ({reason}); free disk "
                      f"space or set out_dir elsewhere; the last checkpoint "
                      f"({last.name if last else 'none yet'}) is intact") from None
    barrier()
    if rank == 0:
        tmp.rename(final)
        fsync_dir(phase_dir)
        for old in sorted(phase_dir.glob("ckpt-??????"))[:-keep]:
            shutil.rmtree(old)
    barrier()


def latest_checkpoint(phase_dir: Path):
    """The newest complete checkpoint folder, or None; .tmp folders never count."""
    found = sorted(p for p in phase_dir.glob("ckpt-??????") if (p / "trainer.pt").is_file())
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, optimizer, scaler, mixture, rank: int, device) -> int:
    """Restore everything but the weights (loaded with the model); returns the step."""
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    scaler.load_state_dict(trainer["scaler"])
    mine = torch.load(ckpt / f"rank{rank}.pt", weights_only=True)
    mixture.load_state_dict(mine["data"])
    set_rng_state(mine["rng"], device)
    return trainer["step"]


def export_folder(raw, tok_dir: Path, dest: Path):
    """A Hugging Face folder: weights, config, tokenizer, generation config (atomic rename)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        raw.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok_dir / name).is_file():
                shutil.copy(tok_dir / name, tmp / name)
        hf = json.loads((tmp / "config.json").read_text())
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        fsync_dir(tmp, files=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write {dest} ({e.strerror or e}); free disk space and run "
                      "the same command again") from None
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


class Metrics:
    """metrics.jsonl, one JSON record per line, written by rank 0."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def log(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def truncate_after(self, phase: str, step: int):
        """Drop what a killed run logged past its checkpoint, so that no record appears twice."""
        if not (self.enabled and self.path.is_file()):
            return
        lines = self.path.read_text().splitlines()
        if lines and not lines[-1].endswith("}"):  # a kill cut the last record short
            lines.pop()
        records = [json.loads(line) for line in lines if line]
        keep = [r for r in records if r.get("phase") != phase or r["step"] < step
                or (r["step"] == step and r["kind"] == "train")]  # the eval at step reruns
        write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in keep))
