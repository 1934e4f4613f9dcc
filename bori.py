"""bori: teach an English small language model Korean, in one resumable command.

    python bori.py --preset=demo                       # offline, CPU, minutes
    torchrun --nproc_per_node=2 bori.py --preset=bori  # the seed recipe on two T4s

Stages: Korean BPE merged into the base tokenizer -> vocabulary expansion with EEVE init
(Kim et al. 2024, arXiv:2402.14714) -> Phase 1A, embeddings only, Korean -> Phase 1B, every
parameter, 90% Korean / 10% English replay, WSD schedule -> export. Each stage leaves a DONE
marker; running the same command again skips finished stages and resumes from the last
checkpoint. Every knob of the recipe is in Config below; `--key=value` overrides any of them.
"""
import dataclasses
import difflib
import json
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

import data
from checkpoint import (Metrics, all_sum, barrier, export_folder, latest_checkpoint,
                        load_checkpoint, save_checkpoint, write_json_atomic)
from convert_gguf import OFFLINE_BASE, resolve_base
from evaluate import evaluate, samples
from model import Llama, ModelConfig, expand_vocab, flops_per_token
from schedule import SHAPES, lr_at

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers and notebooks expect


@dataclass
class Config:
    # where things come from and go
    out_dir: str = "runs/bori"
    base: str = "HuggingFaceTB/SmolLM2-135M"  # hub id, local folder, .gguf, or OFFLINE_BASE
    data_ko: str = "hf:HuggingFaceFW/fineweb-2:kor_Hang:train"
    data_en: str = "hf:HuggingFaceTB/smollm-corpus:fineweb-edu-dedup:train"
    text_field: str = "text"
    eval_ko: str = "hf:HuggingFaceFW/fineweb-2:kor_Hang:test"
    eval_en: str = data.BUNDLED["en_eval"]
    eval_bytes: int = 200_000  # UTF-8 bytes of held-out text per language
    # tokenizer and vocabulary expansion
    new_tokens: int = 8981  # 49,152 + 8,981 = 58,133
    script: str = "hangul"  # new tokens must hold this script (tokenizer.SCRIPTS)
    tokenizer_data: str = ""  # Korean text for the BPE (empty: data_ko)
    tokenizer_bytes: int = 100_000_000  # how much of it the BPE is trained on (0: all)
    init: str = "eeve"  # eeve | mean | random
    pad_vocab_to: int = 64  # tensor-core friendly rows; padding is never a target
    # batch: tokens per optimizer step = micro_batch * seq_len * world_size * grad_accum
    seq_len: int = 2048
    micro_batch: int = 8  # per GPU; 0: the largest the memory plan fits
    batch_tokens: int = 131_072
    # Phase 1A: embedding warm-up, backbone frozen
    steps_1a: int = 1000
    lr_1a: float = 5e-4  # 1e-3 and above raised English bpb 8%+ in 30 demo steps (tied rows)
    warmup_1a: int = 50
    decay_1a: int = 200
    mix_1a: str = "ko=1.0"
    new_rows_only: bool = False  # train only the new rows; old ones stay bit-identical
    # Phase 1B: full continued pre-training
    steps_1b: int = 10000
    lr_1b: float = 3e-4
    warmup_1b: int = 200
    decay_1b: int = 2000  # the last 20% (Hägele et al. 2024)
    mix_1b: str = "ko=0.9,en=0.1"
    # optimizer (AdamW, Loshchilov & Hutter 2019, arXiv:1711.05101)
    decay_shape: str = "1-sqrt"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # hardware
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto: float16 on CUDA (a T4 has no fast bf16), float32 on CPU
    grad_checkpointing: bool = True
    gpu_gib: float = 0.0  # memory per GPU for the plan; 0: the GPU's own (on a CPU, a T4's 15)
    compile: bool = False  # torch.compile the training model: ~1.2x faster steps on a CPU
    # (bench.py --compile), after a minute of compiling per phase; not yet measured on a GPU
    peak_tflops: float = 65.0  # T4 FP16 tensor-core peak, for the MFU estimate
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 250
    ckpt_every: int = 250
    keep_ckpts: int = 2
    sample_prompts: str = "대한민국의 수도는|옛날 옛적에 한 마을에|The capital of France is"
    sample_tokens: int = 40
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    max_hours: float = 0.0  # stop cleanly, with a checkpoint, after this long (0: no limit)
    stop_after_steps: int = 0  # stop cleanly after this many steps in this invocation
    seed: int = 1337
    debug: bool = False  # show tracebacks


PRESETS = {
    "bori": {},
    "demo": dict(out_dir="runs/demo", base=OFFLINE_BASE, data_ko=data.BUNDLED["ko_train"],
                 data_en=data.BUNDLED["en_train"], eval_ko=data.BUNDLED["ko_eval"],
                 eval_bytes=4000, tokenizer_bytes=0, seq_len=256, micro_batch=2,
                 batch_tokens=512, steps_1a=30, lr_1a=3e-4, warmup_1a=3, decay_1a=6,
                 steps_1b=30, lr_1b=2e-4, warmup_1b=3, decay_1b=6, grad_checkpointing=False,
                 log_every=5, eval_every=15, ckpt_every=10, sample_tokens=24),
}
# Changing these after a run has started would make its saved state meaningless.
RESUME_FIXED = ("base", "data_ko", "data_en", "text_field", "new_tokens", "script",
                "tokenizer_data", "tokenizer_bytes", "init", "pad_vocab_to", "seq_len",
                "micro_batch", "batch_tokens", "mix_1a", "mix_1b", "new_rows_only", "seed")

# ----------------------------------------------------------------------------------------------
# Configuration from presets, a TOML file and --key=value flags


def parse_value(field, text: str):
    if field.type is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--{field.name}={text}: expected true or false")
        return text.lower() == "true"
    try:
        return field.type(text)
    except ValueError:
        raise ValueError(f"--{field.name}={text}: expected {field.type.__name__}") from None


def load_config(argv: list) -> Config:
    """Defaults, then --preset, then --config=FILE.toml, then the other --key=value flags."""
    known = {f.name: f for f in fields(Config)}
    flags = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"argument {arg!r} is not --key=value (booleans: --key=true)")
        if key not in known and key not in ("preset", "config"):
            close = difflib.get_close_matches(key, [*known, "preset", "config"], n=1)
            raise ValueError(f"unknown option --{key}"
                             + (f"; did you mean --{close[0]}?" if close else ""))
        flags[key] = value
    name = flags.pop("preset", "bori")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    if "config" in flags:
        import tomllib
        path = Path(flags.pop("config"))
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        for key, value in tomllib.loads(path.read_text()).items():
            if key not in known:
                raise ValueError(f"unknown key {key!r} in {path}")
            if not isinstance(value, known[key].type) and not (
                    known[key].type is float and isinstance(value, int)):
                raise ValueError(f"{key} = {value!r} in {path}: expected "
                                 f"{known[key].type.__name__}")
            values[key] = value
    values.update({k: parse_value(known[k], v) for k, v in flags.items()})
    return Config(**values)


def validate(cfg: Config, world_size: int):
    """Every check that needs no model and no process group."""
    per_step = max(cfg.micro_batch, 1) * cfg.seq_len * world_size
    if cfg.micro_batch < 0 or cfg.seq_len < 1 or cfg.batch_tokens % per_step:
        good = max(1, round(cfg.batch_tokens / max(per_step, 1))) * per_step
        raise ValueError(f"batch_tokens={cfg.batch_tokens} is not a multiple of {per_step} "
                         f"(micro_batch*seq_len*world_size); try batch_tokens={good}")
    for phase in ("1a", "1b"):
        steps, warm, dec = (getattr(cfg, f"{k}_{phase}") for k in ("steps", "warmup", "decay"))
        if steps < 1 or warm < 0 or dec < 1 or warm + dec > steps:
            raise ValueError(f"phase {phase}: need steps >= 1, decay >= 1 and warmup + decay "
                             f"<= steps (got steps {steps}, warmup {warm}, decay {dec})")
        data.parse_weights(getattr(cfg, f"mix_{phase}"))
    from tokenizer import SCRIPTS
    checks = [(cfg.init in ("eeve", "mean", "random"), "init must be eeve, mean or random"),
              (cfg.script in SCRIPTS, f"script must be one of {sorted(SCRIPTS)}"),
              (cfg.dtype in ("auto", "float16", "bfloat16", "float32"),
               "dtype must be auto, float16, bfloat16 or float32"),
              (cfg.device in ("auto", "cuda", "cpu"), "device must be auto, cuda or cpu"),
              (cfg.decay_shape in SHAPES, f"decay_shape must be one of {SHAPES}"),
              (0 < cfg.min_lr_ratio <= 1, "min_lr_ratio must be in (0, 1]"),
              (cfg.new_tokens > 0 and cfg.eval_bytes > 0 and cfg.pad_vocab_to > 0,
               "new_tokens, eval_bytes and pad_vocab_to must be positive"),
              (min(cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.keep_ckpts,
                   cfg.max_bad_steps) > 0,
               "log_every, eval_every, ckpt_every, keep_ckpts and max_bad_steps must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_resume(cfg: Config, out: Path, world_size: int):
    """Refuse to continue a run whose saved config differs in a field that breaks it."""
    if not (out / "config.json").is_file():
        return
    saved = json.loads((out / "config.json").read_text())
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"{out} holds a run made with other settings ({diff}); use a new "
                         "out_dir or the original values")
    if saved.get("world_size", world_size) != world_size:
        raise ValueError(f"{out} was started with {saved['world_size']} processes; resume it "
                         "with as many (data streams and checkpoints are per rank)")

# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Dist:
    """Rank and device from torchrun's variables; NCCL on CUDA, gloo on CPU."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu")
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
             int(os.environ.get("WORLD_SIZE", 1)))
    d.device = torch.device(f"cuda:{d.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(d.device)
    if d.world_size > 1:
        import datetime
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return d


def print0(d: Dist, *args):
    if d.is_master:
        print(*args, flush=True)


def amp_context(cfg: Config, d: Dist):
    """(autocast context, its dtype or None for fp32). bf16 only when asked: T4s emulate it."""
    name = cfg.dtype if cfg.dtype != "auto" else ("float16" if d.device.type == "cuda"
                                                  else "float32")
    if name == "float32":
        return nullcontext(), None
    return torch.autocast(d.device.type, dtype=getattr(torch, name)), getattr(torch, name)

# ----------------------------------------------------------------------------------------------
# One training phase


STOP = {"signal": None, "in_loop": False}  # the SIGTERM handler's flag, read at step boundaries


class TrainingStopped(Exception):
    """A clean stop (signal, time or step limit), after a checkpoint where one was due."""


class TrainingDiverged(Exception):
    """Loss or gradients stayed non-finite for max_bad_steps steps."""


def on_sigterm(signum, frame):
    STOP["signal"] = signum
    if not STOP["in_loop"]:  # between stages nothing is half-written: stop at once
        raise TrainingStopped("stopped by SIGTERM between stages; finished stages are kept")


def set_trainable(raw: Llama, phase: str, cfg: Config, n_old_rows: int):
    """Phase 1A: only the embedding (= the tied LM head); Phase 1B: everything."""
    for name, p in raw.named_parameters():
        p.requires_grad = phase == "1b" or name in ("embed_tokens.weight", "lm_head.weight")
    if phase == "1a" and cfg.new_rows_only:  # old rows' gradient zeroed before DDP sees it
        for p in {raw.embed_tokens.weight, raw.lm_head.weight}:
            p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:n_old_rows]),
                                                 g[n_old_rows:]]))


def make_optimizer(raw: Llama, cfg: Config, phase: str, d: Dist):
    """AdamW (arXiv:1711.05101): matrices decay, norms don't, nor do masked old rows. Fused:
    one kernel for all parameters (3x faster here on the CPU), and GradScaler-aware on CUDA."""
    params = [p for p in raw.parameters() if p.requires_grad]
    decay = 0.0 if phase == "1a" and cfg.new_rows_only else cfg.weight_decay
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0,
                             betas=(cfg.beta1, cfg.beta2), fused=True)


def train_step(model, raw, optimizer, scaler, mixture, accum: int, cfg: Config, d: Dist, ctx):
    """Gradient accumulation, unscale, clip, step. Returns (loss, grad norm, skipped)."""
    loss_sum = torch.zeros((), device=d.device)
    for micro in range(accum):
        x, y = (t.to(d.device, non_blocking=True) for t in mixture.next_batch())
        sync = model.no_sync() if d.world_size > 1 and micro < accum - 1 else nullcontext()
        with sync:
            with ctx:
                loss = model(x, y) / accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in raw.parameters() if p.requires_grad], cfg.grad_clip)
    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
    scale_before = scaler.get_scale()
    if finite or scaler.is_enabled():  # GradScaler skips a non-finite step by itself
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    skipped = not finite or scaler.get_scale() < scale_before
    return loss_sum.item(), float(grad_norm), skipped


def run_phase(phase: str, cfg: Config, d: Dist, start_dir: Path, tok, evals: dict,
              metrics: Metrics, n_old_rows: int) -> Path:
    """Train one phase from start_dir (or its newest checkpoint); return its exported folder."""
    from tqdm import tqdm
    out = Path(cfg.out_dir)
    phase_dir, export = out / f"phase{phase}", out / f"phase{phase}" / "model"
    if (phase_dir / "DONE.json").is_file():
        print0(d, f"phase {phase}: done already ({export})")
        return export
    steps, peak, warmup, decay = (getattr(cfg, f"{k}_{phase}") for k in
                                  ("steps", "lr", "warmup", "decay"))
    phase_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(phase_dir)
    raw = Llama.from_pretrained(ckpt or start_dir, pad_vocab_to=cfg.pad_vocab_to).to(d.device)
    raw.grad_checkpointing = cfg.grad_checkpointing
    set_trainable(raw, phase, cfg, n_old_rows)
    model = raw
    if d.world_size > 1:  # wrapped after freezing: DDP fixes its gradient hooks here
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(raw, cfg, phase, d)
    ctx, dtype = amp_context(cfg, d)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    sources = {n: data.Source(n, getattr(cfg, f"data_{n}"), cfg.text_field) for n in ("ko", "en")}
    mixture = data.Mixture(sources, data.parse_weights(getattr(cfg, f"mix_{phase}")), tok,
                           tok.token_to_id(data.EOS_TOKEN), cfg.seq_len, cfg.micro_batch,
                           cfg.seed + (phase == "1b"), d.rank, d.world_size)
    step = 0
    if ckpt:
        step = load_checkpoint(ckpt, optimizer, scaler, mixture, d.rank, d.device)
        print0(d, f"phase {phase}: resuming from {ckpt} at step {step}")
    elif phase == "1b" and (out / "phase1a" / f"data-rank{d.rank}.pt").is_file():
        # Korean continues where Phase 1A stopped reading: no document is seen twice.
        prev = torch.load(out / "phase1a" / f"data-rank{d.rank}.pt", weights_only=True)
        mixture.streams["ko"].load_state_dict(prev["streams"]["ko"])
    metrics.truncate_after(phase, step)  # what a killed run logged after its checkpoint
    accum = cfg.batch_tokens // (cfg.micro_batch * cfg.seq_len * d.world_size)
    flops = flops_per_token(raw.cfg, sum(p.numel() for p in raw.parameters()), cfg.seq_len)
    start_step, t_start, bad_steps = step, time.time(), 0
    bar = tqdm(total=steps, initial=step, desc=f"phase {phase}", disable=not d.is_master)
    STOP["in_loop"] = True
    while True:  # eval, save, (stop?), micro-steps, clip, step, log
        if step % cfg.eval_every == 0 or step == steps:
            scores = evaluate(raw, tok, evals, cfg.seq_len, d.device, ctx, d.rank, d.world_size)
            metrics.log(kind="eval", phase=phase, step=step, **scores, mix=mixture.realised())
            bar.write(f"phase {phase} step {step}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if step == steps:
            break
        # No checkpoint inside a streak of non-finite steps: the last one stays the good one.
        saving = step > start_step and step % cfg.ckpt_every == 0 and bad_steps == 0
        local_stop = (STOP["signal"] is not None
                      or (cfg.max_hours and time.time() - t_start > cfg.max_hours * 3600)
                      or (cfg.stop_after_steps and step - start_step >= cfg.stop_after_steps))
        stop = all_sum([float(bool(local_stop))], d.device)[0] > 0  # every rank agrees
        if saving or (stop and step > start_step):
            save_checkpoint(phase_dir, step, raw, optimizer, scaler, mixture, cfg.keep_ckpts,
                            d.rank, d.device)
        if stop:
            raise TrainingStopped(f"stopped at phase {phase} step {step}; the checkpoint is in "
                                  f"{phase_dir}: run the same command to resume")
        lr = lr_at(step, peak, steps, warmup, decay, cfg.min_lr_ratio, cfg.decay_shape)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step = time.time()  # tokens/s of the step alone, not of evals and checkpoints
        loss, grad_norm, skipped = train_step(model, raw, optimizer, scaler, mixture, accum,
                                              cfg, d, ctx)
        bad_steps = bad_steps + 1 if skipped else 0
        if bad_steps >= cfg.max_bad_steps:
            last = latest_checkpoint(phase_dir)
            raise TrainingDiverged(
                f"phase {phase}: loss or gradients were non-finite for {bad_steps} steps in a "
                f"row, up to step {step}; the last good checkpoint is {last or 'none'}; lower "
                f"lr_{phase} (now {peak}) or check the data, then run the same command")
        step += 1
        loss = all_sum([loss], d.device)[0] / d.world_size
        tok_s = cfg.batch_tokens / max(time.time() - t_step, 1e-9)
        mfu = tok_s * flops / (cfg.peak_tflops * 1e12 * d.world_size)
        metrics.log(kind="train", phase=phase, step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                    skipped=skipped, scale=scaler.get_scale(), tokens=step * cfg.batch_tokens,
                    tok_per_s=tok_s, mfu=mfu)
        bar.update(1)
        if step % cfg.log_every == 0 or skipped:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{mfu:.1%}", skipped=skipped)
    STOP["in_loop"] = False
    bar.close()
    torch.save(mixture.state_dict(), phase_dir / f"data-rank{d.rank}.pt")
    barrier()
    if d.is_master:
        prompts = [p for p in cfg.sample_prompts.split("|") if p]
        texts = samples(raw, tok, prompts, cfg.sample_tokens, cfg.seed, d.device, ctx)
        metrics.log(kind="samples", phase=phase, step=steps, text=texts)
        print(f"phase {phase} samples:\n" + "\n".join(f"  {t!r}" for t in texts), flush=True)
        export_folder(raw, tok_dir_of(cfg), export)
        write_json_atomic(phase_dir / "DONE.json", {
            "steps": steps, "tokens": steps * cfg.batch_tokens, **scores,
            "mix": mixture.realised(), "epochs": {n: s.epoch for n, s in mixture.streams.items()},
            "bad_bytes": {n: s.bad_bytes for n, s in mixture.streams.items()}})
        for old in phase_dir.glob("ckpt-*"):  # the export holds everything now
            shutil.rmtree(old)
    barrier()
    return export

# ----------------------------------------------------------------------------------------------
# Stages: tokenizer -> expanded model -> Phase 1A -> Phase 1B -> final


def tok_dir_of(cfg: Config) -> Path:
    return Path(cfg.out_dir) / "tokenizer"


def korean_sample(cfg: Config):
    """The Korean text the BPE trains on: the first tokenizer_bytes of it (0: all)."""
    path, total = cfg.tokenizer_data or cfg.data_ko, 0
    for text in data.iter_texts([path], cfg.text_field, progress=True):
        yield text
        total += len(text.encode("utf-8"))
        if cfg.tokenizer_bytes and total >= cfg.tokenizer_bytes:
            return
    if total == 0:
        raise ValueError(f"tokenizer data {path!r} has no text; point data_ko (or "
                         "tokenizer_data) at Korean text")


def stage_tokenizer(cfg: Config, base_dir: Path, evals: dict) -> dict:
    import tokenizer
    tok_dir = tok_dir_of(cfg)
    if not (tok_dir / "DONE.json").is_file():
        report = tokenizer.build(base_dir, tok_dir, korean_sample(cfg), cfg.new_tokens, evals,
                                 cfg.script)
        tokenizer.print_report(report)
        write_json_atomic(tok_dir / "DONE.json", report)
    return json.loads((tok_dir / "DONE.json").read_text())


def stage_init(cfg: Config, base_dir: Path, evals: dict, metrics: Metrics, d: Dist) -> dict:
    """Base model bits per byte (the reference line), then the expanded, EEVE-initialised model."""
    from tokenizers import Tokenizer

    import tokenizer
    init_dir, tok_dir = Path(cfg.out_dir) / "init", tok_dir_of(cfg)
    if (init_dir / "DONE.json").is_file():
        return json.loads((init_dir / "DONE.json").read_text())
    base = Llama.from_pretrained(base_dir).to(d.device)
    base_tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    emap = json.loads((tok_dir / "eeve_map.json").read_text())
    if base_tok.get_vocab_size() > base.cfg.vocab_size:
        raise ValueError(f"{base_dir}: tokenizer.json has {base_tok.get_vocab_size()} tokens but "
                         f"the model only {base.cfg.vocab_size} rows; they do not belong together")
    if (emap["base_vocab_size"] != base.cfg.vocab_size or emap["base_fingerprint"] !=
            tokenizer.fingerprint(json.loads(base_tok.to_str()))):
        raise ValueError(f"the merged tokenizer in {tok_dir} was built on another base than "
                         f"{base_dir}; delete {tok_dir} (or use a new out_dir) to rebuild it")
    ctx, _ = amp_context(cfg, d)
    metrics.truncate_after("base", 0)
    scores = evaluate(base, base_tok, evals, cfg.seq_len, d.device, ctx)  # rank 0 alone
    metrics.log(kind="eval", phase="base", step=0, **scores)
    print("base model: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    expand_vocab(base, emap["pieces"], cfg.init, cfg.seed)
    export_folder(base, tok_dir, init_dir)
    info = {"base_bpb": scores, "n_old_rows": emap["base_vocab_size"],
            "vocab_size": base.cfg.vocab_size}
    write_json_atomic(init_dir / "DONE.json", info)
    return info


def plan_memory(cfg: Config, d: Dist, model_cfg) -> int:
    """Print the memory plan; pick micro_batch when it is 0; refuse a plan that cannot fit."""
    import plan
    on_gpu = d.device.type == "cuda"
    gpu_gib = cfg.gpu_gib or (torch.cuda.get_device_properties(d.device).total_memory / 2**30
                              if on_gpu else 15.0)
    dtype = amp_context(cfg, d)[1] if on_gpu or cfg.dtype != "auto" else torch.float16
    limit = cfg.batch_tokens // (cfg.seq_len * d.world_size)
    best = plan.largest_micro_batch(model_cfg, cfg.seq_len, cfg.grad_checkpointing, gpu_gib,
                                    dtype or torch.float32, limit)
    micro_batch = cfg.micro_batch or max(best, 1)
    need = plan.memory_plan(model_cfg, cfg.seq_len, micro_batch, cfg.grad_checkpointing,
                            dtype or torch.float32)
    where = str(d.device) if on_gpu else f"a {gpu_gib:g} GiB GPU such as a T4"
    print0(d, plan.format_plan(need, gpu_gib, micro_batch, best, where))
    usable = gpu_gib - plan.CUDA_CONTEXT_GIB
    if on_gpu and need["total"] > usable:
        raise ValueError(f"micro_batch={micro_batch} needs about {need['total']:.1f} GiB per GPU, "
                         f"more than the {usable:.1f} GiB usable here; use micro_batch={best} "
                         "(0 picks it) or grad_checkpointing=true")
    return micro_batch


def check_base(cfg: Config, base_dir: Path):
    """The base folder has a config and a tokenizer bori can extend; seq_len fits."""
    if not (base_dir / "config.json").is_file() or not (base_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"base model folder {base_dir} lacks config.json or "
                                "tokenizer.json; pass a Hugging Face model folder or hub id")
    tok = json.loads((base_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"].get("vocab", {}),
             **{t["content"]: t["id"] for t in tok.get("added_tokens", [])}}
    if (tok["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(tok["pre_tokenizer"])
            or data.EOS_TOKEN not in vocab):
        raise ValueError(f"the base tokenizer in {base_dir} is not a byte-level BPE with "
                         f"{data.EOS_TOKEN} as its document separator (SmolLM2's kind), which "
                         "the tokenizer merge and the packing need; use a SmolLM/SmolLM2 base")
    max_pos = json.loads((base_dir / "config.json").read_text()).get(
        "max_position_embeddings", cfg.seq_len)
    if cfg.seq_len > max_pos:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the base model's {max_pos} positions; "
                         f"use seq_len<={max_pos}")


def run(cfg: Config, d: Dist) -> int:
    from tokenizers import Tokenizer
    out = Path(cfg.out_dir)
    resolved = {**dataclasses.asdict(cfg), "world_size": d.world_size,
                "device_name": str(d.device), "amp_dtype": str(amp_context(cfg, d)[1])}
    if d.is_master:
        out.mkdir(parents=True, exist_ok=True)
        check_resume(cfg, out, d.world_size)
        write_json_atomic(out / "config.json", resolved)
        print("config:\n" + "\n".join(f"  {k} = {v}" for k, v in resolved.items()), flush=True)
    barrier()
    metrics = Metrics(out / "metrics.jsonl", d.is_master)
    evals = {"ko": data.eval_docs(cfg.eval_ko, cfg.eval_bytes, cfg.text_field),
             "en": data.eval_docs(cfg.eval_en, cfg.eval_bytes, cfg.text_field)}
    if d.is_master:  # rank 0 builds the tokenizer and the expanded model; the others wait
        base_dir = resolve_base(cfg.base)
        check_base(cfg, base_dir)
        stage_tokenizer(cfg, base_dir, evals)
        stage_init(cfg, base_dir, evals, metrics, d)
    barrier()
    info = json.loads((out / "init" / "DONE.json").read_text())
    init_cfg = ModelConfig.from_hf_config(json.loads((out / "init" / "config.json").read_text()))
    init_cfg = ModelConfig(**{**dataclasses.asdict(init_cfg), "pad_vocab_to": cfg.pad_vocab_to})
    cfg = dataclasses.replace(cfg, micro_batch=plan_memory(cfg, d, init_cfg))
    if d.is_master:
        resolved.update(micro_batch_resolved=cfg.micro_batch, grad_accum=cfg.batch_tokens // (
            cfg.micro_batch * cfg.seq_len * d.world_size))
        write_json_atomic(out / "config.json", resolved)
    tok = Tokenizer.from_file(str(tok_dir_of(cfg) / "tokenizer.json"))
    model_1a = run_phase("1a", cfg, d, out / "init", tok, evals, metrics, info["n_old_rows"])
    final = run_phase("1b", cfg, d, model_1a, tok, evals, metrics, info["n_old_rows"])
    if d.is_master:
        stage_final(final, out)
        summary(cfg, out, info)
    barrier()
    return 0


def stage_final(model_dir: Path, out: Path):
    """out/final (Hugging Face folder with a model card), out/final.gguf, out/plots/."""
    import export_gguf
    import report
    if not (out / "final" / "config.json").is_file():
        shutil.rmtree(out / "final.tmp", ignore_errors=True)
        shutil.copytree(model_dir, out / "final.tmp")
        (out / "final.tmp").rename(out / "final")
    report.write(out)
    if not (out / "final.gguf").is_file():
        export_gguf.export(out / "final", out / "final.gguf.tmp", "f16")
        (out / "final.gguf.tmp").rename(out / "final.gguf")


def summary(cfg: Config, out: Path, info: dict):
    """The closing table: base vs final bits per byte, tokens per Korean character, files."""
    ko = json.loads((tok_dir_of(cfg) / "DONE.json").read_text()).get("ko")
    final = json.loads((out / "phase1b" / "DONE.json").read_text())
    rows = [("Korean bits/byte", info["base_bpb"]["ko_bpb"], final["ko_bpb"]),
            ("English bits/byte", info["base_bpb"]["en_bpb"], final["en_bpb"])]
    if ko:
        rows.append(("Korean tokens/char", 1 / ko["base"]["chars_per_token"],
                     1 / ko["merged"]["chars_per_token"]))
    print(f"\n{'':<20}{'base':>10}{'final':>10}")
    for name, before, after in rows:
        print(f"{name:<20}{before:>10.3f}{after:>10.3f}")
    print(f"\nmodel:   {out / 'final'} (card: README.md), {out / 'final.gguf'}\n"
          f"metrics: {out / 'metrics.jsonl'}, plots: {out / 'plots'}\n"
          f"config:  {out / 'config.json'}\ntokenizer report: {tok_dir_of(cfg) / 'report.json'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug=true" in argv
    STOP.update(signal=None, in_loop=False)
    try:
        cfg = load_config(argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        signal.signal(signal.SIGTERM, on_sigterm)
        d = setup_distributed(cfg)
        torch.manual_seed(cfg.seed)
        return run(cfg, d)
    except TrainingStopped as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except torch.cuda.OutOfMemoryError:
        if debug:
            raise
        print("error: out of GPU memory; lower micro_batch (batch_tokens stays, gradient "
              "accumulation grows) or set grad_checkpointing=true", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, OSError, TrainingDiverged) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
