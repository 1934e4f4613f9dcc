"""Checkpoints that a run resumes from exactly, and the Hugging Face folders each stage exports.

A checkpoint is written to ckpt-NNNNNN.tmp/, every file fsynced, then renamed (atomic.py): a run
killed at any moment leaves either the complete new checkpoint or none, and the previous one
intact. Weights go through safetensors; the rest loads with torch.load(weights_only=True).
"""
import random
import shutil
from pathlib import Path

import torch

from atomic import atomic_dir, commit_dir, fresh_dir, tmp_path
from distributed import barrier
from hf_io import save_pretrained


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


def save_checkpoint(phase_dir: Path, step: int, raw_model, optimizer, scaler, mixture,
                    keep: int, rank: int, device):
    """Model, optimizer, GradScaler and step from rank 0; data and RNG state from every rank."""
    final = phase_dir / f"ckpt-{step:06d}"
    tmp = tmp_path(final)
    if (final / "trainer.pt").is_file():  # this step is saved already
        return
    if rank == 0:
        fresh_dir(final)
    barrier()
    try:
        torch.save({"data": mixture.state_dict(), "rng": rng_state(device)}, tmp / f"rank{rank}.pt")
        if rank == 0:
            save_pretrained(raw_model, tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"step": step, "scaler": scaler.state_dict()}, tmp / "trainer.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(phase_dir)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(f"could not write checkpoint {final.name} ({reason}); free disk "
                      f"space or set out_dir elsewhere; the last checkpoint "
                      f"({last.name if last else 'none yet'}) is intact") from None
    barrier()
    if rank == 0:
        commit_dir(tmp, final)
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


def export_folder(raw_model, tok_dir: Path, dest: Path):
    """A Hugging Face folder: weights, config, generation config, tokenizer (atomic)."""
    try:
        with atomic_dir(dest) as tmp:
            save_pretrained(raw_model, tmp)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (tok_dir / name).is_file():
                    shutil.copy(tok_dir / name, tmp / name)
    except OSError as e:
        raise OSError(f"could not write {dest} ({e.strerror or e}); free disk space and run "
                      "the same command again") from None
