"""bori: teach an English small language model a new language, in one resumable command.

    python bori.py --preset=demo                       # Korean, offline, CPU, minutes
    torchrun --nproc_per_node=2 bori.py --preset=bori  # the seed recipe on two T4s
    python bori.py --preset=demo-ja                    # demo-vi, bori-ja, bori-vi: the same

Stages: a BPE of the new language merged into the base tokenizer -> vocabulary expansion with
EEVE init (Kim et al. 2024, arXiv:2402.14714) -> Phase 1A, embeddings only, the new language ->
Phase 1B, every parameter, 90% new language / 10% English replay, WSD schedule -> export. Each
stage leaves a DONE marker; running the same command again skips finished stages and resumes
from the last checkpoint. Every knob of the recipe is in Config below; `--key=value` overrides
any of them. The defaults are the seed recipe: Korean.
"""
import dataclasses
import functools
import math
import os
import shutil
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import tokenizer
from atomic import atomic_file, disk_errors, read_json
from checkpoint import (export_folder, latest_checkpoint, load_checkpoint, read_done,
                        save_checkpoint, set_aside_damaged, take_over_streams, write_done)
from config import (PRESETS, fit_micro_batch, grad_accum, help_text, load_config, parse_flags,
                    validate)
from distributed import (DistEnv, all_max, all_sum, autocast, barrier, launched, on_each_rank,
                         on_master, print0, setup_distributed, shutdown, stop_on_signals)
from errors import CorpusError, PeerStopped, TrainingDiverged, TrainingStopped, exit_code
from evaluate import evaluate, samples
from final import export_run, summary
from hf_io import from_pretrained
from inputs import check_sources
from model import Llama, flops_per_token
from plan import plan_for_run
from prepare import (check_training_text, eval_sets, prepare_model, probe_texts,
                     read_probes, stage_distill)
from rundir import RENAMED, add_to_record, record_run
from runlog import Metrics, Progress, bytes_per_token, open_sink
from schedule import lr_at

@dataclass
class Config:
    # where things come from and go (a data path may end in #FIELD: the JSON key of its text)
    out_dir: str = "runs/bori"
    base: str = "HuggingFaceTB/SmolLM2-135M"  # hub id, local folder, .gguf, or OFFLINE_BASE
    lang: str = "ko"  # the new language's code (data.LANGUAGES): it names its source and scores
    data_new: str = "hf:HuggingFaceFW/fineweb-2:kor_Hang:train"  # hf:NAME[:CONFIG[:SPLIT]] or files
    data_en: str = "hf:HuggingFaceTB/smollm-corpus:fineweb-edu-dedup:train"  # the replay
    text_field: str = "text"  # the JSON key of the text, where a path names none
    eval_new: str = "hf:HuggingFaceFW/fineweb-2:kor_Hang:test"
    eval_en: str = "hf:HuggingFaceTB/smollm-corpus:fineweb-edu-dedup:train"  # = data_en: held out
    eval_bytes: int = 200_000  # UTF-8 bytes of held-out text per language
    # grammar probes (probes.py): minimal pairs from the first probe_bytes of each held-out
    # source (held out from training too), at most probe_pairs per probe, each with as many
    # tokens of the merged tokenizer on both sides (about one Korean particle pair per KB of
    # text keeps that: 112 from the bundled 113 KB); 0 bytes: no probes
    probe_bytes: int = 1_000_000
    probe_pairs: int = 1000
    # tokenizer and vocabulary expansion
    new_tokens: int = tokenizer.REFERENCE_NEW_TOKENS  # 49,152 + 8,981 = 58,133
    unicode_script: str = "hangul"  # every new token holds this script (tokenizer.SCRIPTS)
    tokenizer_data: str = ""  # the new language's text for the BPE (empty: data_new)
    tokenizer_bytes: int = 100_000_000  # how much of it the BPE is trained on (0: all)
    init: str = "eeve"  # eeve | distill (EEVE, then token distillation: distill.py) | mean | random
    # init=distill: distill_contexts windows of distill_before + 1 + distill_after base tokens
    distill_tokens: int = 0  # the most frequent new tokens distilled (0: all)
    distill_contexts: int = 16
    distill_before: int = 16
    distill_after: int = 16
    distill_steps: int = 6  # Adam steps on each group of tokens' windows
    distill_lr: float = 3e-3  # 1e-2 overshoots (docs/distill-sweep.txt)
    distill_bytes: int = 20_000_000  # training text the windows are taken from
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
    decay_shape: str = "1-sqrt"  # linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # the transformer blocks' matrices
    embed_weight_decay: float = 0.01  # the embedding's: 0.1 shrinks it 0.77x in 1B, +8% English
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # hardware
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto: float16 on CUDA (a T4 has no fast bf16), float32 on CPU
    grad_checkpointing: bool = True
    gpu_gib: float = 0.0  # memory per GPU for the plan; 0: the GPU's own (a T4's on a CPU)
    compile: bool = False  # torch.compile: ~1.2x faster steps on a CPU; unmeasured on a GPU
    peak_tflops: float = 65.0  # T4 FP16 tensor-core peak, for the MFU estimate
    # logging, evaluation, checkpoints, what the run leaves
    log_every: int = 10
    eval_every: int = 250
    ckpt_every: int = 250
    keep_ckpts: int = 2
    report_to: str = "none"  # none | tensorboard | wandb (W&B: WANDB_MODE=offline works)
    sample_prompts: str = "대한민국의 수도는|옛날 옛적에 한 마을에|The capital of France is"
    sample_tokens: int = 40
    gguf_type: str = "f16"  # final.gguf: f16 | q8_0 | f32
    keep_stage_models: bool = False  # keep init/ and phase*/ models after the final export
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    max_hours: float = 0.0  # stop cleanly, with a checkpoint, this long after the command began
    stop_after_steps: int = 0  # stop cleanly after this many steps in this invocation
    seed: int = 1337
    debug: bool = False  # show tracebacks


@dataclass(frozen=True)
class Phase:
    """One training phase: what trains, on which data, for how long, at which learning rate."""
    name: str  # as recipe() names it; its folder is out_dir/phase{name}
    steps: int
    lr: float  # the WSD schedule's peak
    warmup: int
    decay: int
    mix: str  # source weights by name (the new language's code, en), e.g. "ko=0.9,en=0.1"
    trains: str  # "embeddings", "new_rows" (of the embedding) or "all"
    seed: int  # of the mixture's draws

    @property
    def folder(self) -> str:
        """Its folder in out_dir: checkpoints, the hand-over of its data streams, its model."""
        return f"phase{self.name}"


def recipe(cfg: Config) -> list:
    """The two phases, from Config's flat fields (so --lr_1b=... sets Phase 1B's lr). The one
    place that names them: every other module reads these records (or config.json's copy)."""
    return [Phase(name="1a", steps=cfg.steps_1a, lr=cfg.lr_1a, warmup=cfg.warmup_1a,
                  decay=cfg.decay_1a, mix=cfg.mix_1a,
                  trains="new_rows" if cfg.new_rows_only else "embeddings", seed=cfg.seed),
            Phase(name="1b", steps=cfg.steps_1b, lr=cfg.lr_1b, warmup=cfg.warmup_1b,
                  decay=cfg.decay_1b, mix=cfg.mix_1b, trains="all", seed=cfg.seed + 1)]


def sources(cfg: Config) -> list:
    """The run's two corpora: the new language first (its code names it in a mix), then the
    English replay; each with the held-out source its score reads."""
    return [data.Corpus(name=cfg.lang, train=cfg.data_new, held_out=cfg.eval_new,
                        train_flag="data_new", held_out_flag="eval_new",
                        script=cfg.unicode_script),
            data.Corpus(name="en", train=cfg.data_en, held_out=cfg.eval_en,
                        train_flag="data_en", held_out_flag="eval_en", script="latin")]


@dataclass
class Run:
    """What every stage of one run shares."""
    cfg: Config
    env: DistEnv
    metrics: Metrics
    evals: dict  # held-out texts per language
    stop: threading.Event  # set by SIGTERM or Ctrl-C; read at step boundaries and between stages
    phases: list = None  # recipe(cfg), unless given
    corpora: list = None  # sources(cfg), unless given
    held_out: frozenset = frozenset()  # data.text_key of each held-out example: never trained on
    probe_texts: dict = dataclasses.field(default_factory=dict)  # per language: the probes'
    probes: dict = dataclasses.field(default_factory=dict)  # {probe name: pairs}: from tokenizer/
    # the invocation's budget (max_hours, stop_after_steps) spans every stage and phase: a Kaggle
    # session of 12 hours must stop before it ends whichever phase it is in
    started: float = dataclasses.field(default_factory=time.time)  # when the command began
    steps_taken: int = 0  # optimizer steps this invocation, over all phases

    def __post_init__(self):
        self.out = Path(self.cfg.out_dir)
        self.ctx, self.amp_dtype = autocast(self.cfg.dtype, self.env.device)
        self.phases = self.phases or recipe(self.cfg)
        self.corpora = self.corpora or sources(self.cfg)

    def check_stop(self, before: str):
        if self.stop.is_set():
            raise TrainingStopped(f"stopped by a signal before {before}; finished stages are "
                                  "kept: run the same command to go on")


# ----------------------------------------------------------------------------------------------
# One training phase: set-up, the loop, the finish


@dataclass
class Training:
    """What a phase trains with, and its counters."""
    phase_dir: Path
    raw_model: Llama  # what is saved: the model before DDP and torch.compile wrap it
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mixture: data.Mixture
    step: int = 0  # optimizer steps done (skipped ones included)
    applied: int = 0  # steps whose update was applied (not skipped as non-finite)
    bad_steps: int = 0  # the current streak of non-finite steps, carried across phases


def set_trainable(raw_model: Llama, phase: Phase, n_old_rows: int):
    """Phase 1A: only the embedding (= the tied LM head), or only its new rows; 1B: all."""
    for name, p in raw_model.named_parameters():
        p.requires_grad = phase.trains == "all" or name in ("embed_tokens.weight",
                                                            "lm_head.weight")
    if phase.trains == "new_rows":  # old rows' gradient zeroed before DDP sees it
        for p in {raw_model.embed_tokens.weight, raw_model.lm_head.weight}:
            p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:n_old_rows]),
                                                 g[n_old_rows:]]))


def make_optimizer(raw_model: Llama, cfg: Config, phase: Phase):
    """AdamW: matrices decay, norms don't, nor do frozen old rows (decay would shrink them);
    the embedding has its own decay. Fused: one kernel for all, GradScaler-aware on CUDA."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    embedding = {raw_model.embed_tokens.weight, raw_model.lm_head.weight}
    groups = [{"params": [p for p in params if p in embedding], "weight_decay":
               0.0 if phase.trains == "new_rows" else cfg.embed_weight_decay},
              {"params": [p for p in params if p.ndim >= 2 and p not in embedding],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0,
                             betas=(cfg.beta1, cfg.beta2), fused=True)


def setup_phase(run: Run, phase: Phase, start_dir: Path, tok, n_old_rows: int) -> Training:
    """The model from start_dir or the newest whole checkpoint, and all that resumes with it."""
    cfg, env, phase_dir = run.cfg, run.env, run.out / phase.folder
    phase_dir.mkdir(parents=True, exist_ok=True)
    on_master(env, set_aside_damaged, phase_dir)
    ckpt = latest_checkpoint(phase_dir)
    raw_model = from_pretrained(ckpt or start_dir, pad_vocab_to=cfg.pad_vocab_to).to(env.device)
    raw_model.grad_checkpointing = cfg.grad_checkpointing
    set_trainable(raw_model, phase, n_old_rows)
    model = raw_model
    if env.world_size > 1:  # wrapped after freezing: DDP fixes its gradient hooks here
        model = DDP(raw_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)  # the gradients are the buckets: no copy
    model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(raw_model, cfg, phase)
    scaler = torch.amp.GradScaler(env.device.type, enabled=run.amp_dtype == torch.float16)
    streams = {corpus.name: data.training_source(corpus, cfg.text_field)
               for corpus in run.corpora}
    mixture = data.Mixture(streams, data.parse_weights(phase.mix), tok,
                           eos_id=tok.token_to_id(data.EOS_TOKEN), seq_len=cfg.seq_len,
                           batch_size=cfg.micro_batch, seed=phase.seed, rank=env.rank,
                           world_size=env.world_size, held_out=run.held_out)
    training = Training(phase_dir=phase_dir, raw_model=raw_model, model=model,
                        optimizer=optimizer, scaler=scaler, mixture=mixture)
    if ckpt:
        counters = load_checkpoint(ckpt, optimizer, scaler, mixture, rank=env.rank,
                                   device=env.device)
        training.step, training.applied = counters["step"], counters["applied"]
        training.bad_steps = counters["bad_steps"]
        print0(env, f"phase {phase.name}: resuming from {ckpt} at step {training.step}")
        if training.step > phase.steps:
            raise ValueError(f"{ckpt} is at step {training.step}, past steps_{phase.name}="
                             f"{phase.steps}; use steps_{phase.name}>={training.step}, or "
                             f"delete {phase_dir} to train the phase again")
    elif start_dir.name == "model":  # a phase's export: its streams go on where they stopped
        training.bad_steps = take_over_streams(mixture, start_dir.parent, env.rank)
    run.metrics.truncate_after(phase.name, training.step)  # a killed run's log after its ckpt
    return training


def save(run: Run, training: Training, data_state: dict = None):
    """A checkpoint of this step; data_state: the mixture's state at it (default: now)."""
    counters = {"step": training.step, "applied": training.applied,
                "bad_steps": training.bad_steps}
    save_checkpoint(training.phase_dir, training.raw_model, training.optimizer,
                    scaler=training.scaler, trainer=counters,
                    data_state=data_state or training.mixture.state_dict(),
                    keep=run.cfg.keep_ckpts, rank=run.env.rank, device=run.env.device)


def save_handover(path: Path, data_state: dict):
    with disk_errors(path), atomic_file(path) as tmp:  # whole, or a sentence
        torch.save(data_state, tmp)


def next_batches(run: Run, training: Training, accum: int) -> list:
    """This step's micro-batches; a corpus breaking on any rank: every rank saves first."""
    before = training.mixture.state_dict()
    try:
        batches, error = [training.mixture.next_batch() for _ in range(accum)], None
    except CorpusError as e:
        batches, error = None, e
    if all_sum([float(error is not None)], run.env.device)[0] > 0:
        save(run, training, before)
        raise error or PeerStopped()
    return batches


def train_step(run: Run, training: Training, batches: list):
    """Gradient accumulation, unscale, clip, step. Returns (loss, grad norm, skipped)."""
    env, accum = run.env, len(batches)
    model, scaler, optimizer = training.model, training.scaler, training.optimizer
    loss_sum = torch.zeros((), device=env.device)
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        # DDP averages gradients across ranks once per step, on the last micro-batch only
        sync = model.no_sync() if env.world_size > 1 and micro < accum - 1 else nullcontext()
        with sync:
            with run.ctx:
                loss = model(x, y) / accum  # the step's mean: each micro-batch is 1/accum of it
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in training.raw_model.parameters() if p.requires_grad], run.cfg.grad_clip)
    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
    scale_before = scaler.get_scale()
    if finite or scaler.is_enabled():  # GradScaler skips a non-finite step by itself
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # fp16: GradScaler lowers its scale exactly when it skipped the step for an inf or a NaN
    skipped = not finite or scaler.get_scale() < scale_before
    return loss_sum.item(), float(grad_norm), skipped


def stop_requested(run: Run) -> bool:
    """A signal, max_hours or stop_after_steps (both for the whole invocation), on any rank:
    then every rank stops."""
    cfg = run.cfg
    local = (run.stop.is_set()
             or (cfg.max_hours and time.time() - run.started > cfg.max_hours * 3600)
             or (cfg.stop_after_steps and run.steps_taken >= cfg.stop_after_steps))
    return all_sum([float(bool(local))], run.env.device)[0] > 0


def probes_due(run: Run, phase: Phase, step: int) -> dict:
    """The grammar probes after init (the first phase's step 0) and at each phase's end; at
    the evals between, bits per byte alone (a probe scoring costs as much as many steps)."""
    due = step == phase.steps or (step == 0 and phase is run.phases[0])
    return run.probes if due else {}


def train(run: Run, phase: Phase, training: Training, tok) -> dict:
    """The loop: evaluate, save or stop, step, log; returns the last held-out scores."""
    cfg, env, state = run.cfg, run.env, training
    accum = grad_accum(cfg, env.world_size)
    n_params = sum(p.numel() for p in state.raw_model.parameters())
    flops = flops_per_token(state.raw_model.cfg, n_params, cfg.seq_len)
    start_step = state.step
    later = sum(p.steps for p in run.phases[run.phases.index(phase) + 1:])  # the run's ETA
    with Progress(run.metrics, phase=phase.name, steps=phase.steps, step=state.step,
                  log_every=cfg.log_every, show=env.is_master, later_steps=later,
                  bytes_per_token=bytes_per_token(run.out, data.parse_weights(phase.mix))
                  ) as progress:
        while True:
            # evaluate: held-out bits per byte every eval_every steps and after the last one
            if state.step % cfg.eval_every == 0 or state.step == phase.steps:
                headroom = []  # each layer's fp16 activation peak / fp16's maximum
                scores = evaluate(state.raw_model, tok, run.evals, seq_len=cfg.seq_len,
                                  device=env.device, ctx=run.ctx, rank=env.rank,
                                  world_size=env.world_size, headroom=headroom,
                                  probes=probes_due(run, phase, state.step))
                progress.eval(state.step, scores, mix=state.mixture.realised(),
                              fp16_peak=headroom)
            if state.step == phase.steps:
                return scores
            # save or stop; never save inside a streak of non-finite steps (keep a good one)
            stop = stop_requested(run)
            if state.step > start_step and (stop or state.bad_steps == 0
                                            and state.step % cfg.ckpt_every == 0):
                save(run, state)
            if stop:
                raise TrainingStopped(f"stopped at phase {phase.name} step {state.step}; the "
                                      f"checkpoint is in {state.phase_dir}: run the same "
                                      "command to resume")
            # step: the scheduled learning rate, accumulation, clipping, AdamW
            lr = lr_at(state.step, peak_lr=phase.lr, total_steps=phase.steps,
                       warmup_steps=phase.warmup, decay_steps=phase.decay,
                       min_lr_ratio=cfg.min_lr_ratio, shape=cfg.decay_shape)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            step_started = time.time()  # tokens/s of the step alone, not evals and checkpoints
            loss, grad_norm, skipped = train_step(run, state, next_batches(run, state, accum))
            state.bad_steps = state.bad_steps + 1 if skipped else 0
            state.applied += not skipped
            if state.bad_steps >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"phase {phase.name}: loss or gradients were non-finite for "
                    f"{state.bad_steps} steps in a row, up to step {state.step}; the last good "
                    f"checkpoint is {latest_checkpoint(state.phase_dir) or 'none'}; lower "
                    f"lr_{phase.name} (now {phase.lr}) or check the data, then run the same "
                    "command")
            state.step += 1
            run.steps_taken += 1
            # log: the loss averaged over ranks, tokens/s and MFU of this step
            tok_s = cfg.batch_tokens / max(time.time() - step_started, 1e-9)
            mfu = tok_s * flops / (cfg.peak_tflops * 1e12 * env.world_size)  # of a T4: GPUs only
            progress.train(state.step, loss=all_sum([loss], env.device)[0] / env.world_size,
                           lr=lr, grad_norm=grad_norm, skipped=skipped,
                           scale=state.scaler.get_scale(), tokens=state.step * cfg.batch_tokens,
                           tok_per_s=tok_s, **({"mfu": mfu} if env.device.type == "cuda" else {}))


def finish_phase(run: Run, phase: Phase, training: Training, tok, scores: dict) -> Path:
    """Hand-over, samples, export, DONE.json; not for non-finite weights or no step applied."""
    cfg, env, state = run.cfg, run.env, training
    finite = all(bool(torch.isfinite(p).all()) for p in state.raw_model.parameters())
    problem = ("non-finite weights" if not finite else "no step applied" if not state.applied
               else "a non-finite held-out score" if not all(map(math.isfinite, scores.values()))
               else "")
    if problem:
        raise TrainingDiverged(
            f"phase {phase.name} ended with {problem}, so it is not marked done; lower "
            f"lr_{phase.name} (now {phase.lr}) or check the data, then run again: it resumes "
            f"from {latest_checkpoint(state.phase_dir) or 'its start'} (delete "
            f"{state.phase_dir} to start the phase over)")
    # where each rank's streams stopped: the next phase reads on from there (no text twice)
    on_each_rank(env, save_handover, state.phase_dir / f"data-rank{env.rank}.pt",
                 state.mixture.state_dict())
    # every rank's passes and dropped bytes, not rank 0's alone: shares of a source can differ
    streams = state.mixture.streams
    epochs = all_max([s.epoch for s in streams.values()], env.device)
    bad_bytes = all_sum([s.bad_bytes for s in streams.values()], env.device)
    left_out = all_sum([s.left_out for s in streams.values()], env.device)
    if env.is_master:
        prompts = [p for p in cfg.sample_prompts.split("|") if p]
        texts = samples(state.raw_model, tok, prompts, max_tokens=cfg.sample_tokens,
                        seed=cfg.seed, device=env.device, ctx=run.ctx)
        run.metrics.log(kind="samples", phase=phase.name, step=phase.steps, text=texts)
        print(f"phase {phase.name} samples:\n" + "\n".join(f"  {s!r}" for s in texts), flush=True)
        export_folder(state.raw_model, run.out / "tokenizer", state.phase_dir / "model")
        write_done(state.phase_dir, {
            "steps": phase.steps, "tokens": phase.steps * cfg.batch_tokens, **scores,
            "mix": state.mixture.realised(), "epochs": dict(zip(streams, map(int, epochs))),
            "bad_bytes": dict(zip(streams, map(int, bad_bytes))),
            "held_out_left_out": dict(zip(streams, map(int, left_out))),
            "bad_steps": state.bad_steps})
        for old in state.phase_dir.glob("ckpt-??????"):  # the export holds all (.corrupt stay)
            shutil.rmtree(old)
    barrier()
    return state.phase_dir / "model"


def run_phase(run: Run, phase: Phase, start_dir: Path, tok, n_old_rows: int) -> Path:
    """Train one phase from start_dir (or its newest checkpoint); return its exported folder."""
    export = run.out / phase.folder / "model"
    if (export.parent / "DONE.json").is_file():
        on_master(run.env, read_done, export.parent)  # its files are still what it wrote
        print0(run.env, f"phase {phase.name}: done already ({export})")
        return export
    run.check_stop(f"phase {phase.name}")
    training = setup_phase(run, phase, start_dir=start_dir, tok=tok, n_old_rows=n_old_rows)
    scores = train(run, phase, training, tok)
    return finish_phase(run, phase, training, tok=tok, scores=scores)

# ----------------------------------------------------------------------------------------------
# The whole run


def run_all(cfg: Config, env: DistEnv, stop: threading.Event, started: float) -> int:
    """config check -> tokenizer -> init -> the phases -> final; a finished stage is skipped."""
    out, phases, corpora = Path(cfg.out_dir), recipe(cfg), sources(cfg)
    with ExitStack() as held:  # rank 0 holds out_dir's lock until the run ends
        on_master(env, functools.partial(record_run, cfg, phases, env=env, held=held))
        if (out / "final.gguf").is_file():  # finished already, with these settings
            return on_master(env, summary, out) or 0
        # TensorBoard/W&B's x axis runs on across phases: each starts after the steps before
        offsets = {p.name: sum(q.steps for q in phases[:i]) for i, p in enumerate(phases)}
        # on rank 0 only, with every rank told if it fails (a missing W&B package under
        # torchrun is rank 0's sentence, not a lost-connection traceback on the others)
        sink = on_master(env, functools.partial(open_sink, cfg.report_to, out, cfg,
                                                phase_offsets=offsets, held=held, is_master=True))
        evals, held_out = eval_sets(corpora, cfg.eval_bytes, cfg.text_field, env.is_master)
        probe_sources, probe_keys = probe_texts(corpora, cfg.probe_bytes, cfg.text_field)
        held_out |= probe_keys
        check_training_text(corpora, held_out, cfg.text_field)  # before any stage: seconds
        run = Run(cfg, env, metrics=Metrics(out / "metrics.jsonl", env.is_master, sink),
                  evals=evals, stop=stop, phases=phases, corpora=corpora, held_out=held_out,
                  probe_texts=probe_sources, started=started)
        on_master(env, prepare_model, run)  # base model, tokenizer, expanded model
        run.probes = read_probes(out / "tokenizer")  # made by the tokenizer stage
        n_old_rows = read_json(out / "init" / "DONE.json", f"delete {out / 'init'}")["n_old_rows"]
        micro_batch = plan_for_run(cfg, env, out / "init", run.amp_dtype)
        cfg = run.cfg = dataclasses.replace(cfg, micro_batch=micro_batch)
        on_master(env, add_to_record, out, {"micro_batch_resolved": micro_batch,
                                            "grad_accum": grad_accum(cfg, env.world_size)})
        tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
        model_dir = stage_distill(run) if cfg.init == "distill" else out / "init"
        for phase in phases:
            model_dir = run_phase(run, phase, start_dir=model_dir, tok=tok, n_old_rows=n_old_rows)
        run.check_stop("the final export")
        on_master(env, export_run, model_dir, out)  # final/, final.gguf, card, plots, summary
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text(Config, PRESETS, __doc__))
        return 0
    debug, launch = False, launched()  # torchrun's rank and process count, before any group
    started = time.time()  # max_hours counts from here: every stage spends the same budget
    try:
        debug = parse_flags(Config, argv, RENAMED).get("debug", "").lower() == "true"
        cfg = load_config(Config, PRESETS, argv, RENAMED)
        debug = cfg.debug
        cfg = fit_micro_batch(cfg, launch.world_size, launch.is_master)
        validate(cfg, recipe(cfg), sources(cfg), launch.world_size)
        check_sources(cfg, sources(cfg))  # local files readable, hub sources reachable: seconds
        stop = stop_on_signals()
        # before CUDA starts: the allocator grows segments instead of reserving new ones
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env = setup_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        return run_all(cfg, env, stop, started)
    except (Exception, KeyboardInterrupt) as e:
        if debug and not isinstance(e, (TrainingStopped, PeerStopped)):
            raise
        return exit_code(e, launch.rank)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
