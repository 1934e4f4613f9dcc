"""Fill bori's Config from a preset, a TOML file and --key=value flags, then check it.

    load_config(Config, PRESETS, ["--preset=demo", "--config=run.toml", "--lr_1b=1e-4"])

Defaults, then the preset, then the TOML file, then the flags: the last one wins. Each flag is
parsed by its field's type (booleans are true/false); no config file is ever executed.
"""
import difflib
import json
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import data
from schedule import DECAY_SHAPES
from tokenizer import SCRIPTS

META_FLAGS = ("preset", "config")  # flags that choose other values rather than set a field


def parse_value(field, text: str):
    if field.type is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--{field.name}={text}: expected true or false")
        return text.lower() == "true"
    try:
        return field.type(text)
    except ValueError:
        raise ValueError(f"--{field.name}={text}: expected {field.type.__name__}") from None


def parse_flags(cls, argv: list, renamed: dict) -> dict:
    """['--key=value', ...] -> {'key': 'value'}; an unknown key names the closest known one;
    renamed maps old names to the fields that replaced them."""
    known = [f.name for f in fields(cls)] + list(META_FLAGS)
    flags = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"argument {arg!r} is not --key=value (booleans: --key=true)")
        key = renamed.get(key, key)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"unknown option --{key}"
                             + (f"; did you mean --{close[0]}?" if close else ""))
        flags[key] = value
    return flags


def read_toml(cls, path: Path, renamed: dict) -> dict:
    """A TOML file's values, each checked against the field's type."""
    known = {f.name: f for f in fields(cls)}
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = {renamed.get(k, k): v for k, v in tomllib.loads(path.read_text()).items()}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown key {key!r} in {path}")
        want = known[key].type
        if not isinstance(value, want) and not (want is float and isinstance(value, int)):
            raise ValueError(f"{key} = {value!r} in {path}: expected {want.__name__}")
    return values


def load_config(cls, presets: dict, argv: list, renamed: dict = None):
    """Defaults, then --preset (the first of presets when not given), then --config=FILE.toml,
    then the other --key=value flags."""
    renamed = renamed or {}
    flags = parse_flags(cls, argv, renamed)
    name = flags.pop("preset", next(iter(presets)))
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    values = dict(presets[name])
    if "config" in flags:
        values.update(read_toml(cls, Path(flags.pop("config")), renamed))
    known = {f.name: f for f in fields(cls)}
    values.update({k: parse_value(known[k], v) for k, v in flags.items()})
    return cls(**values)


def validate(cfg, phases: list, world_size: int):
    """Every check that needs no model, no data and no process group."""
    per_step = max(cfg.micro_batch, 1) * cfg.seq_len * world_size
    if cfg.micro_batch < 0 or cfg.seq_len < 1 or cfg.batch_tokens % per_step:
        good = max(1, round(cfg.batch_tokens / max(per_step, 1))) * per_step
        raise ValueError(f"batch_tokens={cfg.batch_tokens} is not a multiple of {per_step} "
                         f"(micro_batch*seq_len*world_size); try batch_tokens={good}")
    for phase in phases:
        steps, warm, dec = phase.steps, phase.warmup, phase.decay
        if steps < 1 or warm < 0 or dec < 1 or warm + dec > steps:
            raise ValueError(f"phase {phase.name}: need steps >= 1, decay >= 1 and warmup + "
                             f"decay <= steps (got steps {steps}, warmup {warm}, decay {dec})")
        data.parse_weights(phase.mix)
    checks = [(cfg.init in ("eeve", "mean", "random"), "init must be eeve, mean or random"),
              (cfg.unicode_script in SCRIPTS,
               f"unicode_script must be one of {sorted(SCRIPTS)}"),
              (cfg.dtype in ("auto", "float16", "bfloat16", "float32"),
               "dtype must be auto, float16, bfloat16 or float32"),
              (cfg.device in ("auto", "cuda", "cpu"), "device must be auto, cuda or cpu"),
              (cfg.decay_shape in DECAY_SHAPES, f"decay_shape must be one of {DECAY_SHAPES}"),
              (0 < cfg.min_lr_ratio <= 1, "min_lr_ratio must be in (0, 1]"),
              (cfg.new_tokens > 0 and cfg.eval_bytes > 0 and cfg.pad_vocab_to > 0,
               "new_tokens, eval_bytes and pad_vocab_to must be positive"),
              (min(cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.keep_ckpts,
                   cfg.max_bad_steps) > 0,
               "log_every, eval_every, ckpt_every, keep_ckpts and max_bad_steps must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_resume(cfg, out: Path, world_size: int, fixed: tuple, renamed: dict):
    """Refuse to continue a run whose saved config differs in a field that breaks it."""
    if not (out / "config.json").is_file():
        return
    saved = {renamed.get(k, k): v for k, v in json.loads((out / "config.json").read_text()).items()}
    now = asdict(cfg)
    changed = [k for k in fixed if k in saved and saved[k] != now[k]]
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"{out} holds a run made with other settings ({diff}); use a new "
                         "out_dir or the original values")
    if saved.get("world_size", world_size) != world_size:
        raise ValueError(f"{out} was started with {saved['world_size']} processes; resume it "
                         "with as many (data streams and checkpoints are per rank)")
