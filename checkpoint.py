"""Checkpoints that a run resumes from exactly, the folders each stage exports, and reading them
back with proof that they are whole.

A checkpoint is written to ckpt-NNNNNN.tmp/, its manifest (sha256 of every file) last, then
renamed (atomic.py). On resume the newest checkpoint whose files match its manifest is used; a
damaged one is moved aside to ckpt-NNNNNN.corrupt. A finished stage's DONE.json carries the same
digest of the stage's files. Weights go through safetensors; the rest loads with
torch.load(weights_only=True).
"""
import json
import random
import shutil
import sys
from pathlib import Path

import torch

from atomic import (MANIFEST, atomic_dir, commit_dir, damage, disk_errors, folder_digest,
                    fresh_dir, read_json, tmp_path, write_json)
from distributed import barrier
from hf_io import save_pretrained


# 2: every checkpoint has a manifest.json (1: bori before manifests, which wrote none)
CHECKPOINT_FORMAT = 2


def rng_state(device) -> dict:
    """The RNG states a bit-exact resume needs: torch's, Python's and this GPU's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    """Restore rng_state(); a GPU's state is left out when the run resumes on a CPU."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(phase_dir: Path, raw_model, optimizer, scaler, trainer: dict,
                    data_state: dict, keep: int, rank: int, device):
    """Model, optimizer, GradScaler and trainer counters (trainer["step"] among them) from rank
    0; data_state (this rank's mixture at that step) and RNG state from every rank."""
    final = phase_dir / f"ckpt-{trainer['step']:06d}"
    tmp = tmp_path(final)
    if (final / MANIFEST).is_file():  # saved already (a SIGTERM just after a periodic save)
        return
    if rank == 0:
        fresh_dir(final)
    barrier()  # no rank writes into the .tmp folder before rank 0 has cleared a stale one
    try:
        # every rank: each reads its own share of the data (split_dataset_by_node)
        torch.save({"data": data_state, "rng": rng_state(device)}, tmp / f"rank{rank}.pt")
        if rank == 0:
            save_pretrained(raw_model, tmp)  # raw: no "module." or "_orig_mod." in the keys
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            # GradScaler's scale and growth count: without them a resume restarts at 2**16 and
            # skips steps on overflow while it backs off, and no longer matches the unbroken run
            torch.save({**trainer, "scaler": scaler.state_dict(), "format": CHECKPOINT_FORMAT},
                       tmp / "trainer.pt")
        barrier()
        if rank == 0:  # last, once every rank's file is there: the proof of a whole checkpoint
            (tmp / MANIFEST).write_text(json.dumps(folder_digest(tmp)))
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
        # only now, with the new one whole; zero-padded names make string order step order
        for old in sorted(phase_dir.glob("ckpt-??????"))[:-keep]:
            shutil.rmtree(old)
    barrier()  # no rank trains on while the checkpoint could still be missing


def latest_checkpoint(phase_dir: Path):
    """The newest finished checkpoint folder, or None; .tmp and .corrupt folders never count
    (nor does a folder with no trainer.pt: bori before manifests wrote that one last)."""
    found = sorted(p for p in phase_dir.glob("ckpt-??????") if (p / "trainer.pt").is_file())
    return found[-1] if found else None


def checkpoint_damage(ckpt: Path) -> str:
    """'' when a checkpoint's files match its manifest, else what is wrong. A checkpoint
    without a manifest is whole only if trainer.pt says it was written before manifests (no
    "format" field): decided by what the checkpoint says of itself, not by what is missing."""
    if not (ckpt / MANIFEST).is_file():
        try:
            written = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # cut short or not a torch file: pickle and zip errors alike
            return f"its trainer.pt is unreadable ({str(e).splitlines()[0][:100]})"
        return f"its {MANIFEST} is missing" if written.get("format", 1) >= 2 else ""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    return damage(ckpt, files)


def set_aside_damaged(phase_dir: Path):
    """Check the checkpoints newest first; move each damaged one aside to ckpt-NNNNNN.corrupt
    and say so, until a whole one (or none) is the newest."""
    moved = []
    while (ckpt := latest_checkpoint(phase_dir)) is not None:
        problem = checkpoint_damage(ckpt)
        if not problem:
            return
        aside = ckpt.with_name(ckpt.name + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        moved.append(aside.name)
        print(f"warning: checkpoint {ckpt} is damaged ({problem}); moved it to {aside.name} "
              "and resuming from the one before", file=sys.stderr, flush=True)
    if moved:
        raise ValueError(f"every checkpoint in {phase_dir} is damaged (moved to "
                         f"{', '.join(moved)}); delete {phase_dir} to start the phase over")


def load_checkpoint(ckpt: Path, optimizer, scaler, mixture, rank: int, device) -> dict:
    """Restore everything but the weights (loaded with the model) onto this rank's device;
    returns the trainer counters (step among them)."""
    # weights_only=True: unpickling runs no code from a checkpoint someone handed over
    state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state)
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    scaler_state = trainer.pop("scaler")
    trainer.pop("format", None)  # what the checkpoint is, not a counter
    if scaler_state:  # empty from an fp32 run: an fp16 run resuming it starts a fresh scale
        scaler.load_state_dict(scaler_state)
    trainer.setdefault("applied", trainer["step"])  # bori before counters saved only the step
    mine = torch.load(ckpt / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    mixture.load_state_dict(mine["data"])
    set_rng_state(mine["rng"], device)
    return trainer


def take_over_streams(mixture, last_phase_dir: Path, rank: int) -> int:
    """Start mixture's streams where the last phase stopped reading them (no text is read
    twice); returns the non-finite streak it ended with, which goes on counting."""
    handover = last_phase_dir / f"data-rank{rank}.pt"
    if not handover.is_file():
        raise FileNotFoundError(f"{handover}, where the last phase stopped reading, is missing: "
                                f"restore it, or delete {last_phase_dir} to redo that phase "
                                "(else its text would be read twice)")
    streams = torch.load(handover, map_location="cpu", weights_only=True)["streams"]
    # Phase 1A reads only the new language: English starts from its beginning in Phase 1B
    for name in streams.keys() & mixture.streams.keys():
        mixture.streams[name].load_state_dict(streams[name])
    return read_done(last_phase_dir).get("bad_steps", 0)


def export_folder(raw_model, tok_dir: Path, dest: Path):
    """A Hugging Face folder: weights, config, generation config, tokenizer (atomic)."""
    with disk_errors(dest), atomic_dir(dest) as tmp:
        save_pretrained(raw_model, tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # what AutoTokenizer reads
            if (tok_dir / name).is_file():
                shutil.copy(tok_dir / name, tmp / name)

# ----------------------------------------------------------------------------------------------
# A stage's DONE.json: its results and the digest of its files


def write_done(folder: Path, record: dict):
    """DONE.json, written last: record plus the digest of every file of the stage."""
    files = {k: v for k, v in folder_digest(folder).items()
             if k != "DONE.json" and not k.startswith("ckpt-")}  # deleted right after this file
    with disk_errors(folder / "DONE.json"):
        write_json(folder / "DONE.json", {**record, "files": files})


def prune_stage(folder: Path, names: list):
    """Remove a finished stage's big files (it stays finished: its DONE.json no longer lists
    them, and says they were pruned)."""
    if not (folder / "DONE.json").is_file():
        return
    done = read_json(folder / "DONE.json", f"delete {folder}")
    for name in names:
        shutil.rmtree(folder / name, ignore_errors=True)  # a folder (a phase's model/)
        (folder / name).unlink(missing_ok=True)  # or a file (init's model.safetensors)
    files = {k: v for k, v in done.get("files", {}).items()
             if not any(k == n or k.startswith(n + "/") for n in names)}
    with disk_errors(folder / "DONE.json"):
        write_json(folder / "DONE.json", {**done, "files": files,
                                          "pruned": sorted({*done.get("pruned", []), *names})})


def read_done(folder: Path) -> dict:
    """A finished stage's DONE.json, after checking that its files are still what it wrote."""
    hint = f"delete {folder} to redo that stage (the same settings rebuild it the same)"
    done = read_json(folder / "DONE.json", hint)
    problem = damage(folder, done.get("files", {}))
    if problem:
        raise ValueError(f"{folder}: {problem} since the stage finished; restore it or {hint}")
    return done
