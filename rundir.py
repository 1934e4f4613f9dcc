"""A run's folder (out_dir) as a record of the run: who holds it, the settings it was made with
(config.json), and whether a command may go on with it.

    record_run(cfg, phases, env, held)   # rank 0, before any stage: lock, check, write

One out_dir holds one run. Its settings are written to config.json before anything else, and a
later command on the same out_dir is checked against them: a setting that a finished stage used
cannot change under it (the stage's output would no longer be what the settings say), while
settings that change no result (log_every, max_hours...) may.
"""
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from atomic import disk_errors, lock_dir, read_json, write_json
from data import parse_weights
from distributed import autocast


# The names older bori used, and the fields that replaced them: old commands (config.parse_flags
# reads this table) and old runs' config.json keep working. The only place they are spelled.
RENAMED = {"script": "unicode_script", "data_ko": "data_new", "eval_ko": "eval_new"}


def saved_config(path: Path, hint: str) -> dict:
    """A run's config.json in today's names: old names mapped (RENAMED), and a run from
    before --lang existed is Korean (the only language bori had then)."""
    saved = read_json(path, hint)
    return {"lang": "ko", **{RENAMED.get(k, k): v for k, v in saved.items()}}


def fixed_by_stage(phases: list) -> dict:
    """{stage folder: the settings its output was made from}. Once a stage has written state,
    changing one of them would make that state meaningless (or, for the held-out texts, make
    the base-vs-final table compare other texts); a setting no stage with state has used stays
    free, so the fix an error suggests (another --data_en before Phase 1B reads it) is taken."""
    fixed = {
        # the held-out texts too: the BPE leaves them out, and its report measures them
        "tokenizer": ["base", "lang", "data_new", "text_field", "new_tokens", "unicode_script",
                      "tokenizer_data", "tokenizer_bytes", "eval_new", "eval_en", "eval_bytes",
                      "probe_bytes", "probe_pairs"],
        "init": ["init"],
        "distill": ["distill_tokens", "distill_contexts", "distill_before", "distill_after",
                    "distill_steps", "distill_lr", "distill_bytes"],
        # the batch's shape and the streams' seeds: every later phase takes the streams over
        phases[0].folder: ["pad_vocab_to", "seq_len", "micro_batch", "batch_tokens",
                           "new_rows_only", "seed"],
    }
    english_read = False
    for phase in phases:
        fixed.setdefault(phase.folder, []).append(f"mix_{phase.name}")
        if "en" in parse_weights(phase.mix) and not english_read:  # the replay's first reader
            fixed[phase.folder].append("data_en")
            english_read = True
    return fixed


# What a finished run may be run again with: settings that change no result
NO_RESULT = ("out_dir", "debug", "log_every", "max_hours", "stop_after_steps", "keep_ckpts",
             "ckpt_every", "device", "gpu_gib")


def has_state(stage: Path) -> bool:
    """Whether a stage folder holds what a run would resume from: a DONE.json, a checkpoint or
    a group of distilled rows."""
    return (stage / "DONE.json").is_file() or any(stage.glob("ckpt-*")) or \
        any(stage.glob("groups/group-*"))


def check_resume(cfg, phases: list, out: Path, world_size: int) -> bool:
    """Refuse settings that contradict what out_dir already holds. True when out_dir holds a
    finished run made with these settings (there is nothing to do)."""
    if not (out / "config.json").is_file():
        return False
    saved = saved_config(out / "config.json",
                         "delete it (it is written again) or use a new out_dir")
    now = asdict(cfg)
    if (out / "final.gguf").is_file():
        changed = [k for k in now if k not in NO_RESULT and k in saved and saved[k] != now[k]]
        what, why = "a finished run made", ""
    else:
        used = {k: stage for stage, keys in fixed_by_stage(phases).items()
                if has_state(out / stage) for k in keys}
        changed = [k for k in used if k in saved and saved[k] != now[k]]
        stages = sorted({used[k] for k in changed})
        what = "a run started"
        why = (f", which its {' and '.join(stages)} stage{'s' * (len(stages) > 1)} used and "
               "keep state made from")
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"{out} holds {what} with other settings ({diff}){why}; use a new "
                         "out_dir or the original values")
    # data streams and checkpoints are per rank: another process count cannot resume them
    if has_state(out / phases[0].folder) and saved.get("world_size", world_size) != world_size:
        raise ValueError(f"{out} was started with {saved['world_size']} processes; resume it "
                         "with as many (data streams and checkpoints are per rank)")
    return (out / "final.gguf").is_file()


def record_run(cfg, phases: list, env, held: ExitStack):
    """Rank 0: lock out_dir for this run (held until it ends), check the settings against
    what it holds, and write them, with the phases they make, to config.json unless the run is
    finished already."""
    out = Path(cfg.out_dir)
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    held.enter_context(lock_dir(out))
    if check_resume(cfg, phases, out, env.world_size):
        print(f"{out} holds a finished run with these settings:", flush=True)
        return
    record = {**asdict(cfg), "world_size": env.world_size, "device_name": str(env.device),
              "amp_dtype": str(autocast(cfg.dtype, env.device)[1])}
    with disk_errors(out / "config.json"):
        # the phases as the run reads them: the card, the plot and the exports need no names
        write_json(out / "config.json", {**record, "phases": [
            {**asdict(p), "folder": p.folder} for p in phases]})
    print("config:\n" + "\n".join(f"  {k} = {v}" for k, v in record.items()), flush=True)


def add_to_record(out: Path, values: dict):
    """Rank 0: add values decided once the run has started (the micro-batch the memory plan
    chose) to out_dir/config.json."""
    record = out / "config.json"
    with disk_errors(record):
        write_json(record, {**read_json(record, "delete it: the next run writes it again"),
                            **values})
