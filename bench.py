"""Side-by-side benchmark: our train step vs transformers' LlamaForCausalLM, memory, data, MFU.

    python bench.py [--batch 1] [--seq_len 512] [--rounds 7] [--compile] [--json out.json]

Both models hold the same SmolLM2-135M weights (the converted offline base unless --base says
otherwise), dtype, batch and sequence, and take turns in one process, so that machine noise hits
all alike. Three train steps (forward + backward + AdamW) are timed:
  ours           our model with fused AdamW, as bori builds them (bori also clips gradients)
  reference      transformers' model with torch.optim.AdamW(params), as its examples write it
  reference+fus  transformers' model with fused AdamW (the HF Trainer's default on torch >= 2.8)
With --compile two more: ours+compile (bori's --compile=true) and reference+fus+compile.
`speedup` in the JSON is ours over reference; `speedup_model` ours over reference+fus, which
isolates the model. With --compile both use ours+compile, and `speedup_model` compares it with
reference+fus+compile: the same optimizer and the same compiler, so again the model alone.
Peak memory (eager, fused AdamW): CUDA's max_memory_allocated, or on the CPU the peak resident
size (VmHWM) of a fresh subprocess training one model alone.

    python bench.py --recipe [--steps 30] [--compile]   # on a GPU: the bori preset's step vs plan

runs the seed's settings (58,133-token vocabulary, seq 2048, FP16 + GradScaler, checkpointing,
the plan's micro-batch) on random token ids and reports tokens/s, MFU and peak memory vs plan.

    python bench.py --loss               # the chunked loss against full logits: time, peak memory
    python bench.py --probes runs/demo   # seconds to score 1,000 probe pairs on a run's model
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer

import bori
import data
import plan
from inputs import OFFLINE_BASE, resolve_base
from distributed import DistEnv
from hf_io import from_pretrained
from model import expand_vocab, flops_per_token
from tokenizer import REFERENCE_NEW_TOKENS

# below it: rows that both models hold, as loaded from the base before any expansion
BASE_VOCAB = 49152  # SmolLM2's: the random token ids of the timed steps


# ----------------------------------------------------------------------------------------------
# One train step, of either model

def load(which: str, base_dir, device):
    """Our Llama or transformers' (SDPA attention), fp32 weights, in train mode."""
    if which == "ours":
        model = from_pretrained(base_dir)
    else:
        from transformers import AutoModelForCausalLM
        # SDPA, the kernel ours calls too (F.scaled_dot_product_attention): attention is the
        # same work on both sides, so the comparison is of everything around it
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa")
    return model.to(device).train()


def make_step(which: str, model, device, amp: bool, fused: bool = True):
    """One optimizer step on a fixed batch."""
    # bori's betas; a tiny lr keeps the weights nearly where they were, so every round times
    # the same model. fused: one kernel over every parameter (a 3.4x faster optimizer step on
    # this project's CPU); fused=False is torch.optim.AdamW as transformers' examples write it.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95),
                            **({"fused": True} if fused else {}))
    # both disabled without --amp: the same calls run either way, as pass-throughs
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    ctx = torch.autocast(device.type, dtype=torch.float16) if amp else torch.autocast(
        device.type, enabled=False)

    def step(x, y):
        with ctx:
            loss = model(x, y) if which == "ours" else model(input_ids=x, labels=x).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)  # freed, not zeroed, between steps, as in bori's loop
        return loss
    return step


def sync(device):
    """Wait for CUDA's queued kernels: unsynchronised, a timer would measure only launches."""
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Ours against transformers: speed and peak memory

def time_steps(args, base_dir, device) -> dict:
    """Rotate the three steps, `rounds` timed steps each after a warm-up."""
    torch.manual_seed(0)
    x = torch.randint(0, BASE_VOCAB, (args.batch, args.seq_len), device=device)
    y = x.roll(-1, dims=1)  # ours is given targets; transformers shifts the labels itself
    ours, ref = load("ours", base_dir, device), load("reference", base_dir, device)
    steps = {"ours": make_step("ours", ours, device, args.amp),
             "reference": make_step("reference", ref, device, args.amp, fused=False),
             "reference+fus": make_step("reference", ref, device, args.amp)}
    if args.compile:  # the compiled modules share the weights; compiling is in the warm-up
        steps["ours+compile"] = make_step("ours", torch.compile(ours), device, args.amp)
        steps["reference+fus+compile"] = make_step("reference", torch.compile(ref), device,
                                                   args.amp)
    times = {w: [] for w in steps}
    for r in range(args.rounds + args.warmup):
        # rotated each round: no step always runs first after the others warmed the caches,
        # and machine noise (a 2-core CPU shared with other work) falls on all of them alike
        n = r % len(steps)
        order = list(steps)[n:] + list(steps)[:n]
        for w in order:
            sync(device)
            t0 = time.perf_counter()
            steps[w](x, y)
            sync(device)
            if r >= args.warmup:
                times[w].append(time.perf_counter() - t0)
    out = {}
    for w, ts in times.items():
        # the median: eager rounds swing widely (2.28 s to 3.88 s for ours, docs/bench.json)
        med = statistics.median(ts)
        out[w] = {"median_s": med, "min_s": min(ts), "max_s": max(ts),
                  "tokens_per_s": args.batch * args.seq_len / med}
    ours_row, same_row = ("ours+compile", "reference+fus+compile") if args.compile else (
        "ours", "reference+fus")
    out["speedup"] = out[ours_row]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    out["speedup_model"] = out[ours_row]["tokens_per_s"] / out[same_row]["tokens_per_s"]
    out["speedup_eager"] = out["ours"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    # MFU: 6N + 12·L·H·Q·T FLOPs per token (PaLM, arXiv:2204.02311, appendix B) at the rate
    # measured, over the device's peak; on a CPU, against the T4's 65 TFLOP/s, it means little
    flops = flops_per_token(ours.cfg, sum(p.numel() for p in ours.parameters()), args.seq_len)
    out["mfu_ours"] = out[ours_row]["tokens_per_s"] * flops / (args.peak_tflops * 1e12)
    return out


def peak_memory(args, base_dir, device, which: str) -> float:
    """Peak memory in GiB of `which` training alone (CPU: a fresh subprocess's peak RSS)."""
    if device.type == "cuda":  # the counter starts afresh, so only this model's steps count
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = load(which, base_dir, device)
        step = make_step(which, model, device, args.amp)
        x = torch.randint(0, BASE_VOCAB, (args.batch, args.seq_len), device=device)
        # two steps: the second runs with AdamW's moments allocated, a steady step's peak
        for _ in range(2):
            step(x, x.roll(-1, dims=1))
        del model, step
        return torch.cuda.max_memory_allocated() / 2**30
    # A process's peak RSS never falls: in this process the second model would report the
    # first's peak, so each model trains alone in a fresh interpreter.
    cmd = [sys.executable, __file__, f"--_peak={which}", f"--batch={args.batch}",
           f"--seq_len={args.seq_len}", f"--base={args.base}"]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


# ----------------------------------------------------------------------------------------------
# bori's own step at the seed's settings, against the memory plan (a GPU's check)

def recipe_steps(args, base_dir, device) -> dict:
    """bori's own Phase 1B step (accumulation to one GPU's share of the seed's 131,072-token
    batch, unscale, clip, AdamW) at the seed's settings on random ids; peak memory, allocated
    and reserved, against the plan. On a GPU larger than a T4 it is capped to a T4's memory."""
    model = from_pretrained(base_dir, pad_vocab_to=64)
    expand_vocab(model, [[0]] * REFERENCE_NEW_TOKENS, "random")  # 58,133 rows; any init does
    model.to(device).train()
    model.grad_checkpointing = True  # the seed's setting; without it micro-batch 8 cannot fit
    # FP16 autocast + GradScaler on CUDA, never bf16: a T4 emulates bf16 slowly even though
    # torch.cuda.is_bf16_supported() says True
    amp = device.type == "cuda" or args.amp
    dtype = torch.float16 if amp else torch.float32
    gpu_gib = plan.T4_GIB
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        # a larger GPU capped to a T4's 14.75 GiB: an out-of-memory here is one on a T4
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.T4_GIB / total), device)
    mb = args.batch or plan.largest_micro_batch(model.cfg, args.seq_len, checkpointing=True,
                                                gpu_gib=gpu_gib, dtype=dtype, limit=64)
    accum = args.accum or max(1, 131_072 // 2 // (mb * args.seq_len))  # one of two GPUs' share
    cfg = bori.Config(micro_batch=mb, seq_len=args.seq_len)
    run = SimpleNamespace(cfg=cfg, env=DistEnv(device=device),
                          ctx=torch.autocast(device.type, dtype=dtype, enabled=amp))
    # Phase 1B trains every parameter: the largest gradients and AdamW state of the recipe
    optimizer = bori.make_optimizer(model, cfg, bori.recipe(cfg)[-1])  # the phase training all
    training = bori.Training(phase_dir=Path("."), raw_model=model,
                             model=torch.compile(model) if args.compile else model,
                             optimizer=optimizer, mixture=None,  # batches come from below
                             scaler=torch.amp.GradScaler(device.type, enabled=amp))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        # ids over the whole merged vocabulary, new rows included; made on the CPU and moved
        # by train_step, as real batches are
        batches = [(x, x.roll(-1, dims=1)) for x in (
            torch.randint(0, model.cfg.vocab_size, (mb, args.seq_len)) for _ in range(accum))]
        sync(device)
        t0 = time.perf_counter()
        bori.train_step(run, training, batches)
        sync(device)
        times.append(time.perf_counter() - t0)
    tok_s = accum * mb * args.seq_len / statistics.median(times[args.warmup:])
    flops = flops_per_token(model.cfg, sum(p.numel() for p in model.parameters()), args.seq_len)
    cuda = device.type == "cuda"
    # reserved, not allocated, is what the caching allocator takes from the driver: it is
    # what must fit, and what the plan's 10% margin stands for
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    need = plan.memory_plan(model.cfg, args.seq_len, micro_batch=mb, checkpointing=True,
                            dtype=dtype)
    return {"device": str(device), "compile": args.compile, "micro_batch": mb, "accum": accum,
            "seq": args.seq_len, "tokens_per_s": tok_s,
            "mfu": tok_s * flops / (args.peak_tflops * 1e12), "peak_gib": peak,
            "reserved_gib": reserved, "plan_gib": need["total"],
            "fits_16gb_t4": None if reserved is None
            else reserved <= plan.T4_GIB - plan.CUDA_CONTEXT_GIB}


# ----------------------------------------------------------------------------------------------
# The loss, the data stream and the tokenizer

def loss_setup() -> dict:
    """{way: a function computing the mean loss}: the chunked LM-head loss and F.cross_entropy
    over full logits, on N=2048 tokens, the seed's 58,133-token vocabulary padded to 58,176,
    fp32, seeded."""
    import torch.nn.functional as F

    from loss import cross_entropy_sum
    torch.manual_seed(0)
    N, V, C = 2048, plan.SEED_VOCAB, 576  # C: SmolLM2-135M's hidden size
    h = torch.randn(N, C, requires_grad=True)
    # rows rounded up to a multiple of 64, as pad_vocab_to pads them; 0.02: GPT-2's init std
    w = (torch.randn(-(-V // 64) * 64, C) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,))

    def no_grads():  # each run starts with no gradient to accumulate into
        h.grad = w.grad = None
    # the same mean loss both ways; the naive one holds (N, V) logits, their softmax and their
    # gradient at once (about 1.4 GiB of fp32 here), the chunked one a chunk at a time
    return {"chunked": lambda: cross_entropy_sum(h, w, y, V) / N,
            "naive": lambda: F.cross_entropy((h @ w.T)[:, :V], y), "no_grads": no_grads}


def loss_steps(args) -> dict:
    """The chunked loss (forward + backward) against full logits, taking turns; then each one's
    peak resident memory, alone in a fresh process (the inputs' share is the same in both)."""
    steps = loss_setup()
    times = {k: [] for k in ("chunked", "naive")}
    for r in range(args.rounds + args.warmup):
        for name in times:
            t0 = time.perf_counter()
            steps[name]().backward()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            steps["no_grads"]()
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {way: float(subprocess.run([sys.executable, __file__, "--_loss_peak", way],
                                      capture_output=True, text=True, check=True).stdout)
            for way in times}
    return {"chunked_s": med["chunked"], "naive_s": med["naive"],
            "speedup_over_naive": med["naive"] / med["chunked"],
            "chunked_peak_mib": peak["chunked"], "naive_peak_mib": peak["naive"]}


def probe_speed(run: Path, n: int = 1000) -> dict:
    """Seconds to score n grammar-probe pairs of a finished run's language on its final model
    (probes.py, drawn as the run draws them, its word order filling up to n; batched as every
    eval scores them), and the pairs' mean tokens per side."""
    from evaluate import probe_loglikelihoods
    from probes import make_probes, same_length
    cfg = json.loads((run / "config.json").read_text())
    tok = Tokenizer.from_file(str(run / "final" / "tokenizer.json"))
    texts = data.eval_docs(cfg["eval_new"], cfg["probe_bytes"], cfg["text_field"])
    made = make_probes(cfg["lang"], texts, max_pairs=n, keep=same_length(tok))
    pairs = [pair for probe in made.values() for pair in probe][:n]
    model = from_pretrained(run / "final").eval()
    torch.set_num_threads(os.cpu_count())
    t0 = time.perf_counter()
    probe_loglikelihoods(model, tok, pairs, torch.device("cpu"), torch.autocast("cpu",
                                                                              enabled=False))
    seconds = time.perf_counter() - t0
    tokens = sum(len(tok.encode(p.context + p.good).ids) for p in pairs) / len(pairs)
    return {"pairs": len(pairs), "seconds": seconds, "tokens_per_side": tokens,
            "probes": {name: len(probe) for name, probe in made.items()}}


def packed_tokens_per_s(tokenizer_dir, seconds: float = 10.0) -> float:
    """Packed tokens per second from the bundled Korean corpus on one core (data.Mixture)."""
    # One core, the worst case: the stream must outpace training with whatever the model
    # leaves (docs/bench.json: 1.9M tokens/s, 9,600x what our step trains on that CPU).
    os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' thread pool, read at first use
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    mix = data.Mixture({"ko": data.Source("ko", data.BUNDLED["ko_train"])}, {"ko": 1.0}, tok,
                       tok.token_to_id(data.EOS_TOKEN), seq_len=2048, batch_size=8)
    mix.next_batch()  # warm-up: opening the file and the first fill are not the rate
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += mix.next_batch()[0].numel()
    return n / (time.perf_counter() - t0)


def encode_tokens_per_s(tokenizer_dir, texts: list, repeat: int = 3) -> float:
    """Tokens per second of encode_batch on texts, best of `repeat` runs."""
    # the best run, not the median: the least disturbed one is the tokenizer's own speed
    tok, best = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")), float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(len(e.ids) for e in tok.encode_batch(texts))
        best = min(best, time.perf_counter() - t0)
    return n / best


# ----------------------------------------------------------------------------------------------
# The command line

def parse_args():
    """bench.py's flags; --batch defaults to 1, or with --recipe to the plan's largest (0)."""
    p = argparse.ArgumentParser(description="ours vs transformers: train-step speed and memory")
    p.add_argument("--base", default=OFFLINE_BASE, help="the model both steps train")
    p.add_argument("--batch", type=int, help="micro-batch (default 1; with --recipe the "
                   "plan's largest)")
    p.add_argument("--accum", type=int, default=0, help="with --recipe: micro-batches a step "
                   "(0: one of two T4s' share of the seed's 131,072 tokens)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every step)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler (CUDA)")
    p.add_argument("--compile", action="store_true", help="also time both models compiled")
    p.add_argument("--peak_tflops", type=float, default=65.0, help="for MFU; T4 FP16: 65")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--recipe", action="store_true", help="the bori preset's step vs the plan")
    p.add_argument("--steps", type=int, default=30, help="timed steps with --recipe")
    p.add_argument("--loss", action="store_true", help="the chunked loss vs full logits")
    p.add_argument("--probes", help="a finished run's out_dir: seconds to score 1,000 of its "
                   "language's probe pairs on its final model")
    p.add_argument("--merged", help="a merged tokenizer folder (out_dir/tokenizer): its Korean "
                   "encoding speed beside the base's")
    p.add_argument("--_peak", help=argparse.SUPPRESS)  # peak_memory's own subprocess call
    p.add_argument("--_loss_peak", help=argparse.SUPPRESS)  # loss_steps' own subprocess call
    args = p.parse_args()
    args.batch = args.batch if args.batch is not None else 0 if args.recipe else 1
    return args


def print_steps(result: dict, args, device):
    """The train-step table of time_steps' result, then the speed-ups, MFU and data speeds."""
    print(f"train step, {args.batch}x{args.seq_len} tokens on {device}, {args.rounds} rounds")
    print(f"{'':<23}{'median s':>10}{'min s':>8}{'max s':>8}{'tokens/s':>10}{'peak GiB':>10}")
    for w in [k for k in result if isinstance(result[k], dict) and "median_s" in result[k]]:
        # Both peaks are measured with fused AdamW, eager.
        r, peak = result[w], {"ours": result["peak_gib"]["ours"],
                              "reference+fus": result["peak_gib"]["reference"]}.get(w)
        print(f"{w:<23}{r['median_s']:>10.3f}{r['min_s']:>8.3f}{r['max_s']:>8.3f}"
              f"{r['tokens_per_s']:>10.0f}{'' if peak is None else f'{peak:.2f}':>10}")
    ours = "ours+compile" if args.compile else "ours"
    print(f"speedup, {ours} / reference: {result['speedup']:.2f}x; with the same fused AdamW"
          f"{' and compiler' if args.compile else ''} (the model alone): "
          f"{result['speedup_model']:.2f}x")
    if args.compile:
        print(f"speedup, ours (eager) / reference: {result['speedup_eager']:.2f}x")
    print(f"our MFU against {args.peak_tflops} TFLOP/s: {result['mfu_ours']:.2%}")
    speeds = ", ".join(f"{k} {v:,.0f}" for k, v in result["encode_tokens_per_s"].items())
    print(f"Korean encode_batch tokens/s: {speeds}")
    print(f"data stream: {result['data_tokens_per_s']:,.0f} tokens/s on one core, "
          f"{result['data_tokens_per_s'] / result['ours']['tokens_per_s']:,.0f}x what this "
          "device trains")


def main():
    """Run the benchmark the flags ask for, print it, and write --json."""
    args = parse_args()
    if args._loss_peak:  # the subprocess of loss_steps(): one step of one loss, peak RSS
        loss_setup()[args._loss_peak]().backward()
        hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
        print(int(hwm.split()[1]) / 2**10)  # KiB -> MiB
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_dir = resolve_base(args.base)
    if args._peak:  # the subprocess of peak_memory(): train a few steps, print peak RSS
        model = load(args._peak, base_dir, device)
        step = make_step(args._peak, model, device, False)
        x = torch.randint(0, BASE_VOCAB, (args.batch, args.seq_len))
        for _ in range(2):
            step(x, x.roll(-1, dims=1))
        # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
        hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
        print(int(hwm.split()[1]) / 2**20)  # KiB -> GiB
        return
    if args.recipe or args.loss or args.probes:
        result = (recipe_steps(args, base_dir, device) if args.recipe else loss_steps(args)
                  if args.loss else probe_speed(Path(args.probes)))
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    result = time_steps(args, base_dir, device)
    result["peak_gib"] = {w: peak_memory(args, base_dir, device, w)
                          for w in ("ours", "reference")}
    # packed with the base tokenizer, so that bench needs no run folder
    result["data_tokens_per_s"] = packed_tokens_per_s(base_dir, seconds=5)
    korean = list(data.iter_texts([data.BUNDLED["ko_eval"]]))
    result["encode_tokens_per_s"] = {"base": encode_tokens_per_s(base_dir, korean)}
    if args.merged:
        result["encode_tokens_per_s"]["merged"] = encode_tokens_per_s(args.merged, korean)
    result.update(device=str(device), batch=args.batch, seq=args.seq_len, rounds=args.rounds,
                  compile=args.compile)
    print_steps(result, args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
