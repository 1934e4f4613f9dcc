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
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

import data
from convert_gguf import OFFLINE_BASE, resolve_base
from model import IGNORE_INDEX, Llama, expand_vocab, flops_per_token
from schedule import SHAPES, lr_at

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers and notebooks expect
EOS_TOKEN = "<|endoftext|>"  # SmolLM2's document separator in pre-training


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
    tokenizer_data: str = ""  # Korean text for the BPE (empty: data_ko)
    tokenizer_bytes: int = 100_000_000  # how much of it the BPE is trained on (0: all)
    init: str = "eeve"  # eeve | mean | random
    pad_vocab_to: int = 64  # tensor-core friendly rows; padding is never a target
    # batch: tokens per optimizer step = micro_batch * seq_len * world_size * grad_accum
    seq_len: int = 2048
    micro_batch: int = 8
    batch_tokens: int = 131_072
    # Phase 1A: embedding warm-up, backbone frozen
    steps_1a: int = 1000
    lr_1a: float = 1e-3
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
    compile: bool = False
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
                 batch_tokens=512, steps_1a=30, lr_1a=3e-3, warmup_1a=3, decay_1a=6,
                 steps_1b=30, lr_1b=2e-4, warmup_1b=3, decay_1b=6, grad_checkpointing=False,
                 log_every=5, eval_every=15, ckpt_every=10, sample_tokens=24),
}
# Changing these after a run has started would make its saved state meaningless.
RESUME_FIXED = ("base", "data_ko", "data_en", "text_field", "new_tokens", "tokenizer_data",
                "tokenizer_bytes",
                "init", "pad_vocab_to", "seq_len", "micro_batch", "batch_tokens", "mix_1a",
                "mix_1b", "new_rows_only", "seed")

# ----------------------------------------------------------------------------------------------
# Configuration from presets, a TOML file and --key=value flags


def parse_value(field, text: str):
    kind = field.type
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--{field.name}={text}: expected true or false")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{field.name}={text}: expected {kind.__name__}") from None


def load_config(argv: list) -> Config:
    """Defaults, then --preset, then --config=FILE.toml, then the other --key=value flags."""
    known = {f.name: f for f in fields(Config)}
    flags = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"argument {arg!r} is not --key=value")
        if key not in known and key not in ("preset", "config"):
            close = difflib.get_close_matches(key, list(known) + ["preset", "config"], n=1)
            raise ValueError(f"unknown option --{key}" + (f"; did you mean --{close[0]}?"
                                                           if close else ""))
        flags[key] = value
    name = flags.pop("preset", "bori")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    if "config" in flags:
        import tomllib
        with open(flags.pop("config"), "rb") as f:
            for key, value in tomllib.load(f).items():
                if key not in known:
                    raise ValueError(f"unknown key {key!r} in the config file")
                values[key] = value
    values.update({k: parse_value(known[k], v) for k, v in flags.items()})
    return Config(**values)


def validate(cfg: Config, world_size: int):
    """Every check that needs no model and no process group."""
    per_step = cfg.micro_batch * cfg.seq_len * world_size
    if cfg.batch_tokens % per_step:
        good = max(1, round(cfg.batch_tokens / per_step)) * per_step
        raise ValueError(f"batch_tokens={cfg.batch_tokens} is not a multiple of {per_step} "
                         f"(micro_batch*seq_len*world_size); try {good}")
    for phase in ("1a", "1b"):
        steps, warm, dec = (getattr(cfg, f"{k}_{phase}") for k in ("steps", "warmup", "decay"))
        if steps < 1 or warm < 0 or dec < 1 or warm + dec > steps:
            raise ValueError(f"phase {phase}: need warmup_{phase} + decay_{phase} <= steps_"
                             f"{phase} and decay >= 1 (got {warm} + {dec} > {steps})")
        data.parse_weights(getattr(cfg, f"mix_{phase}"))
    checks = [(cfg.init in ("eeve", "mean", "random"), "init must be eeve, mean or random"),
              (cfg.dtype in ("auto", "float16", "bfloat16", "float32"),
               "dtype must be auto, float16, bfloat16 or float32"),
              (cfg.device in ("auto", "cuda", "cpu"), "device must be auto, cuda or cpu"),
              (cfg.decay_shape in SHAPES, f"decay_shape must be one of {SHAPES}"),
              (0 < cfg.min_lr_ratio <= 1, "min_lr_ratio must be in (0, 1]"),
              (cfg.new_tokens > 0 and cfg.seq_len > 0 and cfg.eval_bytes > 0,
               "new_tokens, seq_len and eval_bytes must be positive"),
              (min(cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.keep_ckpts) > 0,
               "log_every, eval_every, ckpt_every and keep_ckpts must be positive")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_resume(cfg: Config, out: Path):
    """Refuse to continue a run whose saved config differs in a field that breaks it."""
    saved_path = out / "config.json"
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            diff = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise ValueError(f"{out} holds a run made with other settings ({diff}); use a new "
                             "out_dir or the original values")

# ----------------------------------------------------------------------------------------------
# Distributed setup and small helpers


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
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
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


def barrier(d: Dist):
    if d.world_size > 1:
        dist.barrier()


def all_sum(d: Dist, values: list) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def amp_dtype(cfg: Config, d: Dist):
    """The autocast dtype, or None for plain fp32. Never bf16 unless asked: T4s emulate it."""
    name = cfg.dtype if cfg.dtype != "auto" else ("float16" if d.device.type == "cuda"
                                                  else "float32")
    return None if name == "float32" else getattr(torch, name)


def write_json_atomic(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Metrics:
    """metrics.jsonl, one JSON record per line, written by rank 0."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def log(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def truncate_after(self, phase: str, step: int):
        """Drop what a killed run logged past its last checkpoint, so no step appears twice."""
        if not (self.enabled and self.path.is_file()):
            return
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        keep = [r for r in records if r.get("phase") != phase or r["step"] < step
                or (r["step"] == step and r["kind"] == "train")]  # the eval at step reruns
        self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

# ----------------------------------------------------------------------------------------------
# Evaluation: bits per byte, comparable across tokenizers


@torch.no_grad()
def bits_per_byte(model: Llama, tok, texts: list, seq_len: int, d: Dist, ctx) -> float:
    """Summed cross-entropy of texts, in bits, over their UTF-8 bytes.

    The documents are joined as in training (EOS before each one); windows of seq_len
    predictions cover every token once, and EOS targets are skipped: they are not text."""
    eos = tok.token_to_id(EOS_TOKEN)
    ids = [eos]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    was_training, total = model.training, 0.0
    model.eval()
    for start in range(0, len(ids) - 1, seq_len)[d.rank::d.world_size]:
        window = torch.tensor(ids[start:start + seq_len + 1], device=d.device)
        x, y = window[None, :-1], window[None, 1:].clone()
        y[y == eos] = IGNORE_INDEX
        with ctx:
            total += model(x, y, reduction="sum").item()
    model.train(was_training)
    return all_sum(d, [total])[0] / (math.log(2) * n_bytes)


def evaluate(model, tok, evals: dict, cfg: Config, d: Dist, ctx) -> dict:
    return {f"{lang}_bpb": bits_per_byte(model, tok, texts, cfg.seq_len, d, ctx)
            for lang, texts in evals.items()}


@torch.no_grad()
def samples(model: Llama, tok, cfg: Config, d: Dist, ctx) -> list:
    """Completions of the sample prompts (temperature 0.8, top-p 0.9, fixed seed)."""
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
    out, was_training = [], model.training
    model.eval()
    for prompt in filter(None, cfg.sample_prompts.split("|")):
        idx = torch.tensor([tok.encode(prompt).ids], device=d.device)
        with ctx:
            ids = model.generate(idx, cfg.sample_tokens, temperature=0.8, top_p=0.9,
                                 eos_ids=[tok.token_to_id(EOS_TOKEN)], generator=gen)
        out.append(prompt + tok.decode(ids[0, idx.shape[1]:].tolist()))
    model.train(was_training)
    return out

# ----------------------------------------------------------------------------------------------
# Checkpoints: written to NAME.tmp, fsynced, renamed; the newest complete one is resumed


def fsync_dir(path: Path, files: bool = False):
    """Flush a folder entry (and its files) to disk, so a rename after it is durable."""
    for f in sorted(path.iterdir()) if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def rng_state(d: Dist) -> dict:
    import random
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if d.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(d.device)
    return state


def set_rng_state(state: dict, d: Dist):
    import random
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and d.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], d.device)


def save_checkpoint(d: Dist, phase_dir: Path, step: int, raw: Llama, optimizer, scaler,
                    mixture, keep: int):
    final = phase_dir / f"ckpt-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if (final / "trainer.pt").is_file():  # this step is saved already
        return
    if d.is_master:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    try:
        torch.save({"data": mixture.state_dict(), "rng": rng_state(d)}, tmp / f"rank{d.rank}.pt")
        if d.is_master:
            raw.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"step": step, "scaler": scaler.state_dict()}, tmp / "trainer.pt")
    except OSError as e:
        raise OSError(f"could not write checkpoint {tmp} ({e.strerror or e}); free disk space "
                      "or use another out_dir: the previous checkpoint is intact") from e
    barrier(d)
    if d.is_master:
        import shutil
        fsync_dir(tmp, files=True)
        tmp.rename(final)
        fsync_dir(phase_dir)
        for old in sorted(phase_dir.glob("ckpt-??????"))[:-keep]:
            shutil.rmtree(old)
    barrier(d)


def latest_checkpoint(phase_dir: Path):
    found = sorted(p for p in phase_dir.glob("ckpt-??????") if (p / "trainer.pt").is_file())
    return found[-1] if found else None

# ----------------------------------------------------------------------------------------------
# One training phase


STOP = {"signal": None}  # set by the SIGTERM handler, read at the next step boundary


class TrainingStopped(Exception):
    """A clean stop (signal, time or step limit) after a checkpoint was written."""


class TrainingDiverged(Exception):
    """Loss or gradients stayed non-finite; carries the message for the user."""


def set_trainable(raw: Llama, phase: str, cfg: Config, n_old_rows: int):
    """Phase 1A: only the embedding (= the tied LM head); Phase 1B: everything."""
    for name, p in raw.named_parameters():
        p.requires_grad = phase == "1b" or name in ("embed_tokens.weight", "lm_head.weight")
    if phase == "1a" and cfg.new_rows_only:  # zero the old rows' gradient before DDP sees it
        for p in {raw.embed_tokens.weight, raw.lm_head.weight}:
            p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:n_old_rows]),
                                                 g[n_old_rows:]]))


def make_optimizer(raw: Llama, cfg: Config, phase: str, d: Dist):
    """AdamW; matrices decay, norm weights don't, and masked old rows are kept out of decay."""
    params = [p for p in raw.parameters() if p.requires_grad]
    decay = 0.0 if phase == "1a" and cfg.new_rows_only else cfg.weight_decay
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0,
                             betas=(cfg.beta1, cfg.beta2), fused=d.device.type == "cuda")


def run_phase(phase: str, cfg: Config, d: Dist, start_dir: Path, tok, evals: dict,
              metrics: Metrics, n_old_rows: int) -> Path:
    """Train one phase from start_dir (or its newest checkpoint); return its exported folder."""
    import shutil

    from tqdm import tqdm
    out = Path(cfg.out_dir)
    phase_dir, export = out / f"phase{phase}", out / f"phase{phase}" / "model"
    if (phase_dir / "DONE.json").is_file():
        print0(d, f"phase {phase}: done already, {export}")
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
    if cfg.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(raw, cfg, phase, d)
    dtype = amp_dtype(cfg, d)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    ctx = torch.autocast(d.device.type, dtype=dtype) if dtype else nullcontext()
    sources = {n: data.Source(n, getattr(cfg, f"data_{n}"), cfg.text_field) for n in ("ko", "en")}
    mixture = data.Mixture(sources, data.parse_weights(getattr(cfg, f"mix_{phase}")), tok,
                           tok.token_to_id(EOS_TOKEN), cfg.seq_len, cfg.micro_batch,
                           cfg.seed + (phase == "1b"), d.rank, d.world_size)
    step = 0
    if ckpt:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
        step = trainer["step"]
        scaler.load_state_dict(trainer["scaler"])
        mine = torch.load(ckpt / f"rank{d.rank}.pt", weights_only=True)
        mixture.load_state_dict(mine["data"])
        set_rng_state(mine["rng"], d)
        metrics.truncate_after(phase, step)
        print0(d, f"phase {phase}: resuming from {ckpt} at step {step}")
    elif phase == "1b" and (out / "phase1a" / f"data-rank{d.rank}.pt").is_file():
        # Korean continues where Phase 1A stopped reading, so no document is seen twice.
        prev = torch.load(out / "phase1a" / f"data-rank{d.rank}.pt", weights_only=True)
        mixture.streams["ko"].load_state_dict(prev["streams"]["ko"])
    accum = cfg.batch_tokens // (cfg.micro_batch * cfg.seq_len * d.world_size)
    n_params = sum(p.numel() for p in raw.parameters())
    flops = flops_per_token(raw.cfg, n_params, cfg.seq_len)
    start_step, t_start, bad_steps, t_last = step, time.time(), 0, time.time()
    bar = tqdm(total=steps, initial=step, desc=f"phase {phase}", disable=not d.is_master)
    while True:
        # eval, save, micro-steps, clip, step, log
        if step % cfg.eval_every == 0 or step == steps:
            scores = evaluate(raw, tok, evals, cfg, d, ctx)
            metrics.log(kind="eval", phase=phase, step=step, **scores)
            bar.write(f"phase {phase} step {step}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in scores.items()))
        if step == steps:
            break
        if step > start_step and step % cfg.ckpt_every == 0:
            save_checkpoint(d, phase_dir, step, raw, optimizer, scaler, mixture, cfg.keep_ckpts)
        local_stop = (STOP["signal"] is not None
                      or (cfg.max_hours and time.time() - t_start > cfg.max_hours * 3600)
                      or (cfg.stop_after_steps and step - start_step >= cfg.stop_after_steps))
        if all_sum(d, [float(bool(local_stop))])[0]:  # every rank stops at the same step
            if step > start_step:
                save_checkpoint(d, phase_dir, step, raw, optimizer, scaler, mixture,
                                cfg.keep_ckpts)
            raise TrainingStopped(f"stopped at phase {phase} step {step} with a checkpoint in "
                                  f"{phase_dir}; run the same command to resume")
        lr = lr_at(step, peak, steps, warmup, decay, cfg.min_lr_ratio, cfg.decay_shape)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = (t.to(d.device, non_blocking=True) for t in mixture.next_batch())
            sync = model.no_sync() if d.world_size > 1 and micro < accum - 1 else nullcontext()
            with sync:
                with ctx:
                    loss = model(x, y) / accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        params = [p for p in raw.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_sum))
        scale_before = scaler.get_scale()
        if finite or scaler.is_enabled():  # GradScaler skips non-finite steps itself
            scaler.step(optimizer)
        scaler.update()
        skipped = not finite or scaler.get_scale() < scale_before
        optimizer.zero_grad(set_to_none=True)
        bad_steps = bad_steps + 1 if skipped else 0
        if bad_steps >= cfg.max_bad_steps:
            last = latest_checkpoint(phase_dir)
            raise TrainingDiverged(
                f"phase {phase}: loss or gradients were non-finite for {bad_steps} steps in a "
                f"row, up to step {step}; last good checkpoint: {last or 'none'}. Lower "
                f"lr_{phase} (now {peak}) or check the data, then run the same command again")
        step += 1
        loss_avg = all_sum(d, [loss_sum.item()])[0] / d.world_size
        tok_s = cfg.batch_tokens / max(time.time() - t_last, 1e-9)
        t_last = time.time()
        mfu = tok_s * flops / (cfg.peak_tflops * 1e12 * d.world_size)
        metrics.log(kind="train", phase=phase, step=step, loss=loss_avg, lr=lr,
                    grad_norm=float(grad_norm), skipped=skipped, scale=scaler.get_scale(),
                    tokens=step * cfg.batch_tokens, tok_per_s=tok_s, mfu=mfu)
        bar.update(1)
        if step % cfg.log_every == 0 or skipped:
            bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{mfu:.1%}", skipped=skipped)
    bar.close()
    done = {"steps": steps, "tokens": steps * cfg.batch_tokens, **scores,
            "mix": mixture.realised(),
            "bad_bytes": {n: s.bad_bytes for n, s in mixture.streams.items()},
            "epochs": {n: s.epoch for n, s in mixture.streams.items()}}
    torch.save(mixture.state_dict(), phase_dir / f"data-rank{d.rank}.pt")
    barrier(d)
    if d.is_master:
        metrics.log(kind="samples", phase=phase, step=steps, text=samples(raw, tok, cfg, d, ctx))
        export_folder(raw, tok_dir_of(cfg), export)
        write_json_atomic(phase_dir / "DONE.json", done)
        for old in phase_dir.glob("ckpt-*"):  # the export holds everything now
            shutil.rmtree(old)
    barrier(d)
    return export

# ----------------------------------------------------------------------------------------------
# Stages: tokenizer -> expanded model -> Phase 1A -> Phase 1B -> final


def tok_dir_of(cfg: Config) -> Path:
    return Path(cfg.out_dir) / "tokenizer"


def export_folder(raw: Llama, tok_dir: Path, dest: Path):
    """A Hugging Face folder: weights, config, tokenizer, generation config (atomic rename)."""
    import shutil
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    raw.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, tmp / name)
    hf = json.loads((tmp / "config.json").read_text())
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    fsync_dir(tmp, files=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def korean_sample(cfg: Config):
    """The Korean text the BPE trains on: the first tokenizer_bytes of it (0: all)."""
    total = 0
    for text in data.iter_texts([cfg.tokenizer_data or cfg.data_ko], cfg.text_field, True):
        yield text
        total += len(text.encode("utf-8"))
        if cfg.tokenizer_bytes and total >= cfg.tokenizer_bytes:
            return


def stage_tokenizer(cfg: Config, base_dir: Path, evals: dict) -> dict:
    import tokenizer
    tok_dir = tok_dir_of(cfg)
    if not (tok_dir / "DONE.json").is_file():
        report = tokenizer.build(base_dir, tok_dir, korean_sample(cfg), cfg.new_tokens, evals)
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
    ctx = nullcontext() if amp_dtype(cfg, d) is None else torch.autocast(
        d.device.type, dtype=amp_dtype(cfg, d))
    solo = Dist(device=d.device)  # rank 0 alone: no collectives
    scores = evaluate(base, base_tok, evals, cfg, solo, ctx)
    metrics.log(kind="eval", phase="base", step=0, **scores)
    print(f"base model: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    expand_vocab(base, emap["pieces"], cfg.init, cfg.seed)
    export_folder(base, tok_dir, init_dir)
    info = {"base_bpb": scores, "n_old_rows": emap["base_vocab_size"],
            "vocab_size": base.cfg.vocab_size}
    write_json_atomic(init_dir / "DONE.json", info)
    return info


def run(cfg: Config, d: Dist) -> int:
    from tokenizers import Tokenizer
    out = Path(cfg.out_dir)
    accum = cfg.batch_tokens // (cfg.micro_batch * cfg.seq_len * d.world_size)
    resolved = {**dataclasses.asdict(cfg), "world_size": d.world_size, "grad_accum": accum,
                "device_name": str(d.device), "amp_dtype": str(amp_dtype(cfg, d))}
    if d.is_master:
        out.mkdir(parents=True, exist_ok=True)
        check_resume(cfg, out)
        saved = out / "config.json"
        if saved.is_file() and json.loads(saved.read_text()).get("world_size") != d.world_size:
            raise ValueError(f"{out} was started with world_size="
                             f"{json.loads(saved.read_text())['world_size']}; resume it with "
                             "the same number of processes (data and checkpoints are per rank)")
        write_json_atomic(saved, resolved)
        print("config:\n" + "\n".join(f"  {k} = {v}" for k, v in resolved.items()), flush=True)
    barrier(d)
    metrics = Metrics(out / "metrics.jsonl", d.is_master)
    base_dir = resolve_base(cfg.base) if d.is_master else None
    evals = {"ko": data.eval_docs(cfg.eval_ko, cfg.eval_bytes, cfg.text_field),
             "en": data.eval_docs(cfg.eval_en, cfg.eval_bytes, cfg.text_field)}
    if d.is_master:  # rank 0 builds the tokenizer and the expanded model; the others wait
        max_pos = json.loads((base_dir / "config.json").read_text()).get(
            "max_position_embeddings", cfg.seq_len)
        if cfg.seq_len > max_pos:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the base model's {max_pos} "
                             f"positions; use seq_len<={max_pos}")
        stage_tokenizer(cfg, base_dir, evals)
        stage_init(cfg, base_dir, evals, metrics, d)
    barrier(d)
    info = json.loads((out / "init" / "DONE.json").read_text())
    tok = Tokenizer.from_file(str(tok_dir_of(cfg) / "tokenizer.json"))
    model_1a = run_phase("1a", cfg, d, out / "init", tok, evals, metrics, info["n_old_rows"])
    final = run_phase("1b", cfg, d, model_1a, tok, evals, metrics, info["n_old_rows"])
    if d.is_master:
        import shutil
        if not (out / "final" / "config.json").is_file():
            shutil.copytree(final, out / "final.tmp", dirs_exist_ok=True)
            (out / "final.tmp").rename(out / "final")
        summary(cfg, out, info)
    barrier(d)
    return 0


def summary(cfg: Config, out: Path, info: dict):
    """The closing table: base vs final bits per byte, tokens per Korean character, files."""
    report = json.loads((tok_dir_of(cfg) / "DONE.json").read_text())
    final = json.loads((out / "phase1b" / "DONE.json").read_text())
    base = info["base_bpb"]
    ko = report.get("ko", {})
    rows = [("Korean bits/byte", base["ko_bpb"], final["ko_bpb"]),
            ("English bits/byte", base["en_bpb"], final["en_bpb"])]
    if ko:
        rows.append(("Korean tokens/char", 1 / ko["base"]["chars_per_token"],
                     1 / ko["merged"]["chars_per_token"]))
    print(f"\n{'':<20}{'base':>10}{'final':>10}")
    for name, a, b in rows:
        print(f"{name:<20}{a:>10.3f}{b:>10.3f}")
    print(f"\nmodel:   {out / 'final'}\nmetrics: {out / 'metrics.jsonl'}\n"
          f"config:  {out / 'config.json'}\ntokenizer report: {tok_dir_of(cfg) / 'report.json'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug=true" in argv
    d = None
    try:
        cfg = load_config(argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        d = setup_distributed(cfg)
        torch.manual_seed(cfg.seed)
        STOP["signal"] = None
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP.update(signal=signum))
        return run(cfg, d)
    except TrainingStopped as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except torch.cuda.OutOfMemoryError:
        if debug:
            raise
        print("error: out of GPU memory; lower micro_batch and raise batch_tokens' grad "
              "accumulation instead, or set grad_checkpointing=true", file=sys.stderr)
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
