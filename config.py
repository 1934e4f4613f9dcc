"""bori's presets, and filling its Config from a preset, a TOML file and --key=value flags,
then checking it.

    load_config(Config, PRESETS, ["--preset=demo", "--config=run.toml", "--lr_1b=1e-4"])

Defaults, then the preset, then the TOML file, then the flags: the last one wins. Each flag is
parsed by its field's type (booleans are true/false); no config file is ever executed (tomllib,
not nanoGPT's exec'd configurator). validate() runs before any process group or allocation, so
a wrong value costs seconds rather than a GPU session.
"""
import dataclasses
import difflib
import inspect
import math
import tomllib
from dataclasses import fields
from pathlib import Path

import data
from gguf_io import OFFLINE_BASE
from schedule import DECAY_SHAPES
from tokenizer import SCRIPTS

# ----------------------------------------------------------------------------------------------
# Presets

# Named sets of bori.Config's values (--preset=NAME); the defaults are the seed recipe.
# The demo is the seed recipe shrunk to minutes on 2 CPU cores (6.5 min for Korean, docs/demo.txt):
# micro_batch 2 x seq 256 = batch_tokens 512, so one process takes one micro-step per step;
# decay is 6 of 30 steps, the seed's last 20%; tokenizer_bytes=0 trains the BPE on the whole
# bundled corpus (2.5 MB of Korean, under the seed's 100 MB cut); no checkpointing: at seq 256 a
# CPU has memory to spare, and the recompute costs a third more work.
DEMO = dict(base=OFFLINE_BASE, data_en=data.BUNDLED["en_train"], eval_en=data.BUNDLED["en_eval"],
            eval_bytes=4000, tokenizer_bytes=0, seq_len=256, micro_batch=2, batch_tokens=512,
            steps_1a=30, lr_1a=3e-4, warmup_1a=3, decay_1a=6, steps_1b=30, lr_1b=2e-4,
            warmup_1b=3, decay_1b=6, grad_checkpointing=False, log_every=5, eval_every=15,
            ckpt_every=10, sample_tokens=24,  # offline, on a CPU: the bundled corpora
            # 200 pairs per probe (± about 5 points): scoring them 4 times costs about 2 of the
            # demo's minutes on 2 cores, most of it the base model's long Korean token strings;
            # 200,000 bytes hold each bundled held-out file whole (the largest is 150 KB)
            probe_pairs=200, probe_bytes=200_000,
            # init=distill: the 128 most frequent new tokens, 4 windows of 8 + 1 + 8 tokens each
            distill_tokens=128, distill_contexts=4, distill_before=8, distill_after=8)


def language(code: str, demo: bool) -> dict:
    """The recipe for another language: its fineweb-2 text (or for the demo the bundled one),
    its script's rule, its prompts, and the same 90/10 replay."""
    lang, hub = data.LANGUAGES[code], "hf:HuggingFaceFW/fineweb-2"
    # 10% English replay: in the README's 60-step experiment English ends +1.6% over the base
    # with it and +10.1% (still climbing) without; the English prompt shows what is left of it.
    # Each language gets its own out_dir: a folder holds one run's settings, and a ko run's
    # finished stages must not be taken for a ja run's.
    values = dict(lang=code, unicode_script=lang.script, new_tokens=lang.new_tokens,
                  mix_1a=f"{code}=1.0", mix_1b=f"{code}=0.9,en=0.1",
                  sample_prompts=lang.prompts + "|The capital of France is",
                  data_new=f"{hub}:{lang.fineweb2}:train", eval_new=f"{hub}:{lang.fineweb2}:test",
                  out_dir=f"runs/bori-{code}")
    if demo:
        values.update(DEMO, data_new=data.BUNDLED[f"{code}_train"], out_dir=f"runs/demo-{code}",
                      eval_new=data.BUNDLED[f"{code}_eval"])
    return values


PRESETS = {  # the first is the default
    # "bori" is Config's own defaults; "demo" keeps runs/demo, the folder README's examples name
    "bori": {}, "demo": {**language("ko", True), "out_dir": "runs/demo"},
    **{f"{kind}-{code}": language(code, kind == "demo") for code in data.LANGUAGES
       for kind in ("bori", "demo")}}


# ----------------------------------------------------------------------------------------------
# Flags and TOML into a Config

META_FLAGS = ("preset", "config")  # flags that choose other values rather than set a field


def parse_value(field, text: str):
    """One flag's text as its field's type."""
    # bool("false") is True in Python, and 0/1 flags are what STYLE avoids: spelled out only
    if field.type is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--{field.name}={text}: expected true or false")
        return text.lower() == "true"
    try:
        return field.type(text)
    except ValueError:
        raise ValueError(f"--{field.name}={text}: expected {field.type.__name__}") from None


def parse_flags(cls, argv: list, renamed: dict) -> dict:
    """['--key=value' or '--key', 'value', ...] -> {'key': 'value'}; an unknown key names the
    closest known one; renamed maps old names to the fields that replaced them."""
    known = [f.name for f in fields(cls)] + list(META_FLAGS)
    flags, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        # "-1e-4" is taken as a value: only "--" starts a flag
        if not eq and arg.startswith("--") and args and not args[0].startswith("--"):
            value, eq = args.pop(0), "="  # --key value
        if not arg.startswith("--") or not eq:
            raise ValueError(f"argument {arg!r} is not --key=value or --key value (booleans: "
                             "--key=true); python bori.py --help lists them all")
        key = renamed.get(key, key)  # data_ko/eval_ko/script: commands from before --lang
        if key not in known:  # a typo fails here, not as a silently ignored option
            raise ValueError(f"unknown option --{key}{suggestion(key, known)}")
        flags[key] = value
    return flags


def suggestion(key: str, known: list, flag: str = "--") -> str:
    """'; did you mean --X?' for an unknown key, or ''. data_ja / eval_vi name a language the
    way data_en does, but a run has one new language and its text is data_new / eval_new: the
    closest spelling (data_en) would be the wrong fix."""
    kind, _, code = key.partition("_")
    if kind in ("data", "eval") and code != "en" and code.isalpha() and len(code) in (2, 3):
        return (f"; did you mean {flag}{kind}_new? (the new language's text; {flag}lang={code} "
                f"or {flag}preset=demo-{code} / bori-{code} names the language)")
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {flag}{close[0]}?" if close else ""


def read_toml(cls, path: Path, renamed: dict) -> dict:
    """A TOML file's values, each checked against the field's type."""
    known = {f.name: f for f in fields(cls)}
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} is not a file; give the path of a .toml "
                                "file")
    try:
        values = {renamed.get(k, k): v for k, v in tomllib.loads(path.read_text()).items()}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid TOML ({e}); fix it or leave --config out") from None
    for key, value in values.items():
        if key == "preset":
            continue  # load_config applies it first
        if key not in known:
            raise ValueError(f"unknown key {key!r} in {path}"
                             + suggestion(key, list(known), flag=""))
        want = known[key].type  # bool is an int in Python, and TOML true is no number
        # TOML's `lr = 1` is an int; a float field takes it, as Python's float(1) would
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want) and not (
                want is float and isinstance(value, int)):
            raise ValueError(f"{key} = {value!r} in {path}: expected {want.__name__}")
    return values


def help_text(cls, presets: dict, intro: str) -> str:
    """--help: intro, the presets, then every field with its default and the comment beside it
    in the class's source, under the class's own section comments."""
    lines = [intro.strip(), "", f"presets (--preset=NAME): {', '.join(presets)} (the first is "
             "the default); --config=FILE.toml sets fields from a file, flags go on top", "",
             "options (--key=value or --key value; booleans are true or false):"]
    # The help is read off bori.Config's source: a knob is documented once, by the comment
    # beside its field, and --help cannot drift from it.
    defaults = {f.name: f.default for f in fields(cls)}
    for line in inspect.getsource(cls).splitlines()[1:]:
        code, _, comment = line.strip().partition("# ")
        name = code.split(":")[0].strip()
        if not code:  # a section comment
            lines += ["", comment]
        elif name in defaults:
            flag = f"  --{name}={defaults[name]}"
            # a 36-column flag keeps the comments aligned; a longer one is not cut
            lines.append((flag.ljust(36) if len(flag) < 36 else flag + "  ") + comment)
    return "\n".join(lines)


def load_config(cls, presets: dict, argv: list, renamed: dict = None):
    """Defaults, then --preset (the first of presets when not given), then --config=FILE.toml,
    then the other --key=value flags."""
    renamed = renamed or {}
    flags = parse_flags(cls, argv, renamed)
    toml = read_toml(cls, Path(flags.pop("config")), renamed) if "config" in flags else {}
    name = flags.pop("preset", toml.pop("preset", next(iter(presets))))  # the command line wins
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    values = {**presets[name], **toml}  # the more specific source wins
    known = {f.name: f for f in fields(cls)}
    # only flags are text; TOML values arrived typed and read_toml has checked them
    values.update({k: parse_value(known[k], v) for k, v in flags.items()})
    if values.get("out_dir", "").startswith("~"):  # as a shell would: a folder named "~" is
        values["out_dir"] = str(Path(values["out_dir"]).expanduser())  # no one's wish
    return cls(**values)


# ----------------------------------------------------------------------------------------------
# The batch: tokens per step = micro_batch * seq_len * world_size * grad_accum (llm.c's check)

def sequences_per_rank(cfg, world_size: int) -> int:
    """Sequences each process contributes to one optimizer step (micro-batches x accumulation)."""
    return cfg.batch_tokens // (cfg.seq_len * world_size)


def grad_accum(cfg, world_size: int) -> int:
    """Micro-batches per optimizer step on each process: batch_tokens = micro_batch * seq_len *
    world_size * grad_accum, which validate() has checked divides exactly."""
    return sequences_per_rank(cfg, world_size) // cfg.micro_batch


def fit_micro_batch(cfg, world_size: int, is_master: bool = True):
    """cfg with a smaller micro_batch when its own does not divide batch_tokens for this many
    processes (a preset made for one process then runs on two); the batch stays the same."""
    if cfg.micro_batch < 1 or cfg.seq_len < 1 or cfg.batch_tokens % (cfg.seq_len * world_size):
        return cfg  # validate says what is wrong
    per_rank = sequences_per_rank(cfg, world_size)
    if per_rank < 1 or per_rank % cfg.micro_batch == 0:
        return cfg
    # the largest divisor: the fewest micro-steps, and batch_tokens (so the recipe) unchanged
    fitted = max(m for m in range(1, cfg.micro_batch + 1) if per_rank % m == 0)
    if is_master:
        print(f"micro_batch={cfg.micro_batch} does not divide batch_tokens={cfg.batch_tokens} "
              f"over {world_size} processes; using micro_batch={fitted}", flush=True)
    return dataclasses.replace(cfg, micro_batch=fitted)


# ----------------------------------------------------------------------------------------------
# Checks, before any process group, allocation or write

def validate(cfg, phases: list, corpora: list, world_size: int):
    """Every check of the values that needs no model, no data and no process group; phases
    and corpora are bori.recipe(cfg) and bori.sources(cfg)."""
    if cfg.seq_len < 1 or cfg.micro_batch < 0:
        raise ValueError(f"seq_len must be >= 1 and micro_batch >= 0 (0: the largest that "
                         f"fits); got seq_len={cfg.seq_len}, micro_batch={cfg.micro_batch}")
    per_step = max(cfg.micro_batch, 1) * cfg.seq_len * world_size
    if cfg.batch_tokens % per_step or cfg.batch_tokens < per_step:  # 0 is a multiple, of nothing
        # the nearest multiple, so the error names a value that works (STYLE's example)
        good = max(1, round(cfg.batch_tokens / max(per_step, 1))) * per_step
        what = ("is less than one micro-batch on each process" if cfg.batch_tokens < per_step
                else "is not a multiple of")
        raise ValueError(f"batch_tokens={cfg.batch_tokens} {what} {per_step} "
                         f"(micro_batch*seq_len*world_size); try batch_tokens={good}")
    for phase in phases:
        steps, warm, dec = phase.steps, phase.warmup, phase.decay
        # WSD (schedule.py): warmup, a stable stretch, then decay; the two ends must fit
        if steps < 1 or warm < 0 or dec < 1 or warm + dec > steps:
            raise ValueError(f"phase {phase.name}: need steps >= 1, decay >= 1 and warmup + "
                             f"decay <= steps (got steps {steps}, warmup {warm}, decay {dec})")
        data.parse_weights(phase.mix)  # a malformed mix fails now, not when its phase starts
    check_out_dir(cfg, corpora)
    for ok, message in value_checks(cfg, phases):
        if not ok:
            raise ValueError(message)
    # A mix names sources by language code; a wrong one would otherwise surface only when its
    # phase starts, hours into a run (Phase 1B follows 1,000 steps of Phase 1A).
    names = {corpus.name for corpus in corpora}
    hint = (f"--preset=demo-{cfg.lang} or bori-{cfg.lang} sets them" if cfg.lang in data.LANGUAGES
            else "name it in " + " and ".join(f"--mix_{p.name}" for p in phases))
    for phase in phases:
        unknown = set(data.parse_weights(phase.mix)) - names
        if unknown:
            raise ValueError(f"mix_{phase.name}={phase.mix!r} names {sorted(unknown)}; the "
                             f"sources are {sorted(names)} (--lang={cfg.lang} names the new "
                             f"language's; {hint})")


def check_out_dir(cfg, corpora: list):
    """out_dir must not lie inside a local data folder: bori's own files (metrics.jsonl, the
    tokenizer's JSON) would be read back as text of the run."""
    out = Path(cfg.out_dir).expanduser().resolve()
    specs = {c.train_flag: c.train for c in corpora} | {c.held_out_flag: c.held_out
                                                        for c in corpora}
    for flag, spec in {**specs, "tokenizer_data": cfg.tokenizer_data}.items():
        folder = Path(spec.split("#")[0]).expanduser() if spec and not spec.startswith("hf:") \
            else None
        if folder is not None and folder.is_dir() and out.is_relative_to(folder.resolve()):
            raise ValueError(f"out_dir={cfg.out_dir} is inside --{flag}={spec}, whose files "
                             "are read as text: bori's own files would become training data; "
                             "choose an out_dir outside it")


def value_checks(cfg, phases: list) -> list:
    """(holds, the sentence when it does not) for every choice and range of Config's values."""
    checks = [(cfg.init in ("eeve", "distill", "mean", "random"),
               "init must be eeve, distill, mean or random"),
              (min(cfg.distill_contexts, cfg.distill_before, cfg.distill_steps) > 0
               and min(cfg.distill_tokens, cfg.distill_after, cfg.distill_bytes) >= 0,
               "distill_contexts, distill_before and distill_steps must be > 0; distill_tokens,"
               " distill_after and distill_bytes >= 0"),
              (math.isfinite(cfg.distill_lr) and cfg.distill_lr > 0,
               "distill_lr must be finite and > 0"),
              (cfg.unicode_script in SCRIPTS,
               f"unicode_script must be one of {sorted(SCRIPTS)} (or add its rule there)"),
              # "en" is the replay's source name: a new language called en would collide
              (cfg.lang != "en" and cfg.lang.isalpha() and cfg.lang.islower(),
               f"lang={cfg.lang!r} must be the new language's code, such as ko, ja or vi"),
              (cfg.report_to in ("none", "tensorboard", "wandb"),
               "report_to must be none, tensorboard or wandb"),
              (cfg.gguf_type in ("f16", "q8_0", "f32"), "gguf_type must be f16, q8_0 or f32"),
              (cfg.dtype in ("auto", "float16", "bfloat16", "float32"),
               "dtype must be auto, float16, bfloat16 or float32"),
              (cfg.device in ("auto", "cuda", "cpu"), "device must be auto, cuda or cpu"),
              (cfg.decay_shape in DECAY_SHAPES, f"decay_shape must be one of {DECAY_SHAPES}"),
              (0 < cfg.min_lr_ratio <= 1, "min_lr_ratio must be in (0, 1]"),
              (cfg.new_tokens > 0 and cfg.eval_bytes > 0 and cfg.pad_vocab_to > 0,
               "new_tokens, eval_bytes and pad_vocab_to must be positive"),
              (cfg.probe_bytes >= 0 and cfg.probe_pairs > 0,
               "probe_bytes must be >= 0 (0: no grammar probes) and probe_pairs > 0"),
              (min(cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.keep_ckpts,
                   cfg.max_bad_steps) > 0,
               "log_every, eval_every, ckpt_every, keep_ckpts and max_bad_steps must be > 0")]
    # inf > 0 is True, so finiteness is its own check
    finite = all(map(math.isfinite, [p.lr for p in phases] + [cfg.grad_clip, cfg.weight_decay]))
    checks += [(finite and all(p.lr > 0 for p in phases), "learning rates must be finite and > 0"),
               (finite and cfg.grad_clip > 0, "grad_clip must be finite and > 0"),
               (0 <= cfg.weight_decay, "weight_decay must be finite and >= 0"),
               # a negative decay grows the embedding every step instead of shrinking it
               (math.isfinite(cfg.embed_weight_decay) and cfg.embed_weight_decay >= 0,
                "embed_weight_decay must be finite and >= 0"),
               # beta = 1 makes AdamW's bias correction 1 - beta^t zero, a division by zero
               (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
               (cfg.peak_tflops > 0 and cfg.gpu_gib >= 0, "peak_tflops must be > 0, gpu_gib >= 0"),
               (cfg.max_hours >= 0 and cfg.stop_after_steps >= 0,
                "max_hours and stop_after_steps must be >= 0 (0: no limit)"),
               (cfg.sample_tokens >= 0 and cfg.tokenizer_bytes >= 0,
                "sample_tokens and tokenizer_bytes must be >= 0"),
               (cfg.out_dir.strip() != "", "out_dir must name a folder"),
               (not Path(cfg.out_dir).exists() or Path(cfg.out_dir).is_dir(),
                f"out_dir={cfg.out_dir} is a file, not a folder; choose another out_dir")]
    return checks
