"""Memory plan: what one GPU holds while training, worked out before anything is allocated.

    python plan.py [--gpu_gib=14.75] [--seq_len=2048] [--vocab=58133] [--dtype=float16]

Weights, gradients and AdamW state are counted exactly; activations are measured: one decoder
block runs on the CPU at two sequence lengths under the training dtype, and the bytes autograd
saves per extra token are scaled to the real batch. With checkpointing a block keeps only its
fp32 input, and one block at a time is recomputed during backward. Under DDP the gradients are
the communication buckets themselves (gradient_as_bucket_view=True), so buckets cost nothing.
The sum gets a stated 10% margin for the caching allocator. The plan is an estimate until
`python bench.py --recipe` on a GPU measures the step against it (README: not yet on a T4).
"""
import argparse
import dataclasses
import functools
from pathlib import Path

import torch

from atomic import read_json
from config import sequences_per_rank
from distributed import print0
from errors import warn
from hf_io import config_from_hf
from loss import loss_chunk_rows
from model import MODEL_PRESETS, Block, ModelConfig, flops_per_token, preset, rope_tables
from tokenizer import REFERENCE_NEW_TOKENS

GIB = 2**30
# torch.cuda.get_device_properties().total_memory of a 16 GB T4: 15,835,398,144 bytes
T4_GIB = 14.75  # that byte count in GiB (16 decimal GB would already be only 14.9 GiB)
SEED_VOCAB = MODEL_PRESETS["smollm2-135m"].vocab_size + REFERENCE_NEW_TOKENS  # 58,133
CUDA_CONTEXT_GIB = 0.5  # driver and kernels, outside PyTorch's allocator (~0.3-0.5 GiB on a T4)
MARGIN = 1.10  # the stated margin for the caching allocator's reserve, on top of the tensors


# ----------------------------------------------------------------------------------------------
# Measuring one block, summing the parts

def saved_bytes_per_token(cfg: ModelConfig, dtype) -> float:
    """Bytes autograd keeps per token for one decoder block, measured at T=32 and T=64."""
    return _saved_bytes(cfg.dim, cfg.n_heads, cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, dtype=dtype)


@functools.lru_cache
def _saved_bytes(dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int, dtype) -> float:
    """saved_bytes_per_token on plain numbers: lru_cache needs hashable arguments, and
    largest_micro_batch asks again for every candidate micro-batch."""
    small = ModelConfig(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                        n_layers=1, max_seq_len=64)
    torch.manual_seed(0)
    block, cos, sin = Block(small, 0), *rope_tables(small)
    # weights are counted once under "weights", not as activations the block saved
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def saved(T: int) -> int:
        storages = {}

        # the hook sees exactly what autograd keeps for backward; keyed by storage, so several
        # views of one tensor count once
        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(1, T, dim, requires_grad=True)
        # the training dtype decides what is saved: half-size activations, plus fp32 ones
        # where model.py keeps the residual stream and the MLP product in fp32
        amp = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            block(x, cos[:T], sin[:T])
        return sum(storages.values())
    return (saved(64) - saved(32)) / 32  # the difference drops per-call constants (weight casts)


def count_params(cfg: ModelConfig) -> int:
    """The blocks, the embedding (once when tied: SmolLM2 ties it to the LM head), the final
    norm."""
    return (sum(p.numel() for p in Block(cfg, 0).parameters()) * cfg.n_layers
            + cfg.padded_vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim)


def memory_plan(cfg: ModelConfig, seq_len: int, micro_batch: int, checkpointing: bool,
                dtype=torch.float16) -> dict:
    """GiB per GPU for each part of a Phase 1B step (every parameter trains); 'total' includes
    allocator slack."""
    n_params = count_params(cfg)
    tokens = micro_batch * seq_len
    per_block = saved_bytes_per_token(cfg, dtype) * tokens
    if checkpointing:  # block inputs (fp32 residual stream), plus one block being recomputed
        activations = cfg.n_layers * tokens * cfg.dim * 4 + per_block
    else:
        activations = cfg.n_layers * per_block
    half, vocab_rows = (2 if dtype != torch.float32 else 0), cfg.padded_vocab_size
    # the chunked loss never holds more than one chunk of logits (128 MiB of fp32, loss.py)
    rows = min(tokens, loss_chunk_rows(vocab_rows))
    parts = {
        "weights (fp32 master)": 4 * n_params,
        "weights (autocast copies)": half * n_params,  # cached for the step, the head's too
        "gradients (fp32)": 4 * n_params,
        "AdamW moments (fp32)": 8 * n_params,  # exp_avg and exp_avg_sq, 4 bytes each
        "activations": activations,
        "backward working set": per_block,  # gradients of one block's activations at a time
        # one chunk of logits in fp16 and fp32, its softmax, and dh, dW kept for backward
        "logits and loss": rows * vocab_rows * (half + 8 + half) + tokens * cfg.dim * 4
        + 4 * vocab_rows * cfg.dim,
        # the head's and the embedding's (V, C) gradients, before autograd sums them
        "embedding gradients": 2 * 4 * vocab_rows * cfg.dim,
    }
    plan = {k: v / GIB for k, v in parts.items()}
    # DDP adds nothing: gradient_as_bucket_view=True makes the gradients its buckets
    plan["total"] = sum(plan.values()) * MARGIN
    return plan


def largest_micro_batch(cfg: ModelConfig, seq_len: int, checkpointing: bool, gpu_gib: float,
                        dtype=torch.float16, limit: int = 64) -> int:
    """The largest micro-batch dividing `limit` whose plan fits gpu_gib (0: not even 1 fits).
    A divisor, so that the accumulation steps are a whole number and batch_tokens is kept."""
    fits = [mb for mb in range(1, limit + 1) if limit % mb == 0 and memory_plan(
        cfg, seq_len, micro_batch=mb, checkpointing=checkpointing, dtype=dtype)["total"]
        <= gpu_gib - CUDA_CONTEXT_GIB]
    return max(fits, default=0)


def format_plan(plan: dict, gpu_gib: float, micro_batch: int, best: int, where: str) -> str:
    """The plan as printed before training: a line per part, then the verdict."""
    lines = [f"memory plan per GPU at micro_batch={micro_batch}:"]
    lines += [f"  {k:<28}{v:>7.2f} GiB" for k, v in plan.items() if k != "total"]
    usable = gpu_gib - CUDA_CONTEXT_GIB
    verdict = "fits" if plan["total"] <= usable else "DOES NOT FIT"
    lines.append(f"  {'total (+10% margin)':<28}{plan['total']:>7.2f} GiB of {usable:.1f} usable "
                 f"on {where}: {verdict}; the largest micro_batch that fits is {best}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Time: the tokens of a phase, the FLOPs of each, and an assumed share of the GPUs' peak

# Model FLOPs utilisation assumed for a T4 until `python bench.py --recipe` measures it there:
# the time below is an estimate that scales with it, not a timing
ASSUMED_MFU = 0.30


def train_flops_per_token(cfg: ModelConfig, seq_len: int, checkpointing: bool,
                          whole_model: bool) -> float:
    """FLOPs one training token costs. 6N + 12·L·H·Q·T (model.flops_per_token; PaLM, appendix B)
    is a forward pass (a third) and a backward pass (two thirds: the activations' gradients and
    the weights'). Checkpointing runs each block's forward again in backward (+ a third); a
    phase that trains only the embedding skips the blocks' weight gradients (- a third)."""
    full = flops_per_token(cfg, count_params(cfg), seq_len)
    return full * (3 + checkpointing - (not whole_model)) / 3


def phase_hours(tokens: int, flops: float, n_gpus: int, peak_tflops: float, mfu: float) -> float:
    """Hours to train on `tokens` at `flops` each, on n_gpus running at mfu of peak_tflops."""
    return tokens * flops / (n_gpus * peak_tflops * 1e12 * mfu) / 3600


def format_time(cfg: ModelConfig, seq_len: int, phases: list, checkpointing: bool, n_gpus: int,
                peak_tflops: float, mfu: float) -> str:
    """The time estimate of phases [(name, tokens, whole_model)], a line each and the total."""
    lines, total = [f"time of {count_params(cfg) / 1e6:.1f}M parameters at {mfu:.0%} MFU of "
                    f"{n_gpus} x {peak_tflops:g} TFLOP/s (an assumption, not a timing; --mfu "
                    "changes it):"], 0.0
    for name, tokens, whole in phases:
        flops = train_flops_per_token(cfg, seq_len, checkpointing, whole_model=whole)
        hours = phase_hours(tokens, flops, n_gpus=n_gpus, peak_tflops=peak_tflops, mfu=mfu)
        total += hours
        lines.append(f"  {name:<9}{hours:>6.1f} h  {tokens / 1e6:,.0f}M tokens x "
                     f"{flops / 1e9:.2f} GFLOP ({'every parameter' if whole else 'the embedding'}"
                     f" trains{', with the recompute' if checkpointing else ''})")
    lines.append(f"  {'total':<9}{total:>6.1f} h")
    return "\n".join(lines)


def distill_flops(cfg: ModelConfig, contexts: int, window: int, steps: int,
                  pieces: float) -> float:
    """FLOPs token distillation (distill.py) spends on one new token: per window of `window`
    tokens, `steps` forward and backward passes of the student (2/3 of a training token: no
    weight gradients, as in Phase 1A, and no recompute), one more forward to measure (1/3),
    and one forward of the teacher, longer by the token's pieces but one (1/3). Each position
    is counted with the LM head, which only one position per window uses: an overestimate."""
    full = flops_per_token(cfg, count_params(cfg), window)
    return contexts * full * (window * (2 * steps + 1) + window + pieces - 1) / 3


# ----------------------------------------------------------------------------------------------
# The plan for a run

def compile_warning(capability: tuple) -> str:
    """Why compile=true is risky on a GPU older than sm_80, such as the T4 (sm_75)."""
    return (f"compile=true on a GPU of compute capability {capability[0]}.{capability[1]} (a T4 "
            "is 7.5): recent Triton supports only 8.0 and later well, so compiling may fail or "
            "run slower; compile=false is the safe choice there")


def plan_for_run(cfg, env, model_dir: Path, dtype) -> int:
    """Print the plan for a bori Config and the model in model_dir on this device; return the
    micro_batch to train with (cfg's, or when it is 0 the largest that fits); refuse a plan that
    cannot fit. dtype is the autocast dtype (None: fp32)."""
    hint = f"delete {model_dir} to redo that stage"
    model_cfg = config_from_hf(read_json(model_dir / "config.json", hint))
    # config.json holds the true vocabulary; the padding to 64 rows is the run's setting
    model_cfg = dataclasses.replace(model_cfg, pad_vocab_to=cfg.pad_vocab_to)
    on_gpu = env.device.type == "cuda"
    gpu_gib = cfg.gpu_gib or (torch.cuda.get_device_properties(env.device).total_memory / GIB
                              if on_gpu else T4_GIB)
    dtype = dtype if on_gpu or cfg.dtype != "auto" else torch.float16  # a CPU plans for a T4
    dtype = dtype or torch.float32
    best = largest_micro_batch(model_cfg, cfg.seq_len, checkpointing=cfg.grad_checkpointing,
                               gpu_gib=gpu_gib, dtype=dtype,
                               limit=sequences_per_rank(cfg, env.world_size))
    micro_batch = cfg.micro_batch or max(best, 1)  # 1 when none fits: the plan then says why
    need = memory_plan(model_cfg, cfg.seq_len, micro_batch=micro_batch,
                       checkpointing=cfg.grad_checkpointing, dtype=dtype)
    where = str(env.device) if on_gpu else f"a {gpu_gib:g} GiB GPU such as a T4"
    print0(env, format_plan(need, gpu_gib=gpu_gib, micro_batch=micro_batch, best=best,
                            where=where))
    if on_gpu and cfg.compile and torch.cuda.get_device_capability(env.device) < (8, 0):
        warn(compile_warning(torch.cuda.get_device_capability(env.device)))
    usable = gpu_gib - CUDA_CONTEXT_GIB
    # only a GPU refuses: a CPU run is a rehearsal, and its plan is advice for the T4
    if on_gpu and need["total"] > usable:
        raise ValueError(f"micro_batch={micro_batch} needs about {need['total']:.1f} GiB per GPU, "
                         f"more than the {usable:.1f} GiB usable here; use micro_batch={best} "
                         "(0 picks it) or grad_checkpointing=true")
    return micro_batch


# ----------------------------------------------------------------------------------------------
# The command line: the plan for any setting, without a model folder

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a model.MODEL_PRESETS name")
    p.add_argument("--vocab", type=int, default=SEED_VOCAB, help="tokens in the vocabulary")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro_batch", type=int, default=0, help="0: the largest that fits")
    p.add_argument("--gpu_gib", type=float, default=T4_GIB, help="a 16 GB T4: 14.75 GiB")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="the autocast dtype")
    p.add_argument("--no_checkpointing", action="store_true", help="plan without "
                   "gradient checkpointing")
    # the time estimate: the bori preset's phases (tests/test_plan.py holds them equal)
    p.add_argument("--steps_1a", type=int, default=1000, help="Phase 1A's steps (embedding)")
    p.add_argument("--steps_1b", type=int, default=10_000, help="Phase 1B's steps (all)")
    p.add_argument("--batch_tokens", type=int, default=131_072, help="tokens per step")
    p.add_argument("--gpus", type=int, default=2, help="GPUs training together")
    p.add_argument("--peak_tflops", type=float, default=65.0, help="a T4's fp16 peak: 65")
    p.add_argument("--mfu", type=float, default=ASSUMED_MFU, help="the share of it assumed")
    p.add_argument("--distill_tokens", type=int, default=REFERENCE_NEW_TOKENS,
                   help="new tokens distilled (init=distill)")
    p.add_argument("--distill_contexts", type=int, default=16, help="windows per token")
    p.add_argument("--distill_before", type=int, default=16, help="tokens before it")
    p.add_argument("--distill_after", type=int, default=16, help="tokens after it")
    p.add_argument("--distill_steps", type=int, default=6, help="Adam steps")
    # the Korean demo tokenizer's 8,981 new tokens: 7.4 base pieces each on average
    p.add_argument("--pieces", type=float, default=7.4, help="base pieces per new token")
    a = p.parse_args()
    try:
        cfg = preset(a.model, vocab_size=a.vocab, pad_vocab_to=64)
    except ValueError as e:
        p.error(str(e))
    dtype, ckpt = getattr(torch, a.dtype), not a.no_checkpointing
    best = largest_micro_batch(cfg, a.seq_len, checkpointing=ckpt, gpu_gib=a.gpu_gib,
                               dtype=dtype)
    mb = a.micro_batch or max(best, 1)
    need = memory_plan(cfg, a.seq_len, micro_batch=mb, checkpointing=ckpt, dtype=dtype)
    print(format_plan(need, gpu_gib=a.gpu_gib, micro_batch=mb, best=best,
                      where=f"a {a.gpu_gib:g} GiB GPU"))
    print(format_time(cfg, a.seq_len, [("Phase 1A", a.steps_1a * a.batch_tokens, False),
                                       ("Phase 1B", a.steps_1b * a.batch_tokens, True)],
                      checkpointing=ckpt, n_gpus=a.gpus, peak_tflops=a.peak_tflops, mfu=a.mfu))
    window = a.distill_before + 1 + a.distill_after
    flops = distill_flops(cfg, a.distill_contexts, window, a.distill_steps, a.pieces)
    hours = phase_hours(a.distill_tokens, flops, a.gpus, a.peak_tflops, a.mfu)
    print(f"  and with --init=distill, before Phase 1A: {hours:.2f} h for {a.distill_tokens:,} "
          f"tokens x {a.distill_contexts} windows of {window} tokens x {a.distill_steps} steps "
          f"({flops / 1e9:,.0f} GFLOP a token, {a.pieces:g} pieces each)")
