"""plan.py: memory estimates against measurements, the T4 plan and its warnings."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bori
import plan
from distributed import DistEnv
from helpers import ENV, ROOT
from hf_io import config_to_hf
from model import Llama, preset


def test_plan_activations_match_a_whole_model_measurement():
    """The plan scales one block measured at T=32/64; here the whole model is measured at
    another batch and length, through the same autograd hook, with the loss's own tensors."""
    cfg = preset("smollm2-135m", n_layers=3, vocab_size=1000)
    model = Llama(cfg)
    constants = [*model.parameters(), *model.buffers()]  # weights and the RoPE tables
    params = {p.untyped_storage().data_ptr() for p in constants}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    B, T = 2, 96
    idx = torch.randint(0, 1000, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    predicted = plan.memory_plan(cfg, T, B, checkpointing=False, dtype=torch.float32)
    # the loss keeps dh (B*T*C) and dW (V*C) for backward; the plan counts those under logits
    loss_saved = (B * T * cfg.dim + cfg.padded_vocab_size * cfg.dim) * 4
    measured = (sum(storages.values()) - loss_saved) / 2**30
    assert abs(predicted["activations"] - measured) <= 0.05 * measured, (predicted, measured)


def test_seed_settings_fit_a_t4():
    """bori preset: 58,133-token vocabulary, seq 2048, FP16, checkpointing, micro_batch 8."""
    # a T4's memory as torch.cuda.get_device_properties reports it: 15,835,398,144 bytes
    assert plan.T4_GIB == pytest.approx(15_835_398_144 / 2**30, abs=0.005)
    cfg = preset("smollm2-135m", vocab_size=58133, pad_vocab_to=64)
    need = plan.memory_plan(cfg, 2048, 8, checkpointing=True, dtype=torch.float16)
    assert need["total"] <= plan.T4_GIB - plan.CUDA_CONTEXT_GIB
    assert need["weights (fp32 master)"] == sum(p.numel() for p in Llama(cfg).parameters()) \
        * 4 / 2**30
    best = plan.largest_micro_batch(cfg, 2048, True, plan.T4_GIB, torch.float16, limit=32)
    assert best >= 8
    no_ckpt = plan.memory_plan(cfg, 2048, 8, checkpointing=False, dtype=torch.float16)
    assert no_ckpt["total"] > plan.T4_GIB  # without checkpointing the seed's micro-batch cannot fit


def test_seed_settings_plan_counts_what_the_audit_found():
    """The plan for the bori preset on a T4: the gradient temporaries of the (tied) embedding
    counted, DDP's buckets free (gradient_as_bucket_view), a 10% margin, 14.25 GiB usable; the
    numbers the README states: micro-batch 8 needs about 6.0 GiB, and micro_batch=0 picks 32
    (13.9 GiB), since the next candidate, 64, does not fit."""
    cfg = preset("smollm2-135m", vocab_size=58133, pad_vocab_to=64)
    need = plan.memory_plan(cfg, 2048, 8, checkpointing=True, dtype=torch.float16)
    # by hand: two fp32 (padded vocabulary x 576) temporaries of the tied embedding's gradient
    assert need["embedding gradients"] == pytest.approx(2 * 4 * 58176 * 576 / 2**30)
    assert need["total"] == pytest.approx(sum(v for k, v in need.items() if k != "total") * 1.1)
    assert round(need["total"], 1) == 6.0
    usable = plan.T4_GIB - plan.CUDA_CONTEXT_GIB
    assert usable == 14.25
    # limit 64: the candidates are the divisors of 64, so a bigger one (64) is really tried
    best = plan.largest_micro_batch(cfg, 2048, True, plan.T4_GIB, torch.float16, limit=64)
    assert best == 32
    assert round(plan.memory_plan(cfg, 2048, best, True, torch.float16)["total"], 1) == 13.9
    assert plan.memory_plan(cfg, 2048, best, True, torch.float16)["total"] <= usable
    bigger = [mb for mb in (best + 1, 2 * best) if 64 % mb == 0]
    assert bigger == [64]
    assert all(plan.memory_plan(cfg, 2048, mb, True)["total"] > usable for mb in bigger)


def test_compile_on_a_t4_is_warned_about(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=15_835_398_144))
    monkeypatch.setattr(plan, "read_json", lambda path, fix: config_to_hf(
        preset("tiny", vocab_size=1000)))
    cfg = bori.Config(compile=True, seq_len=64, micro_batch=2, batch_tokens=128)
    env = DistEnv(device=torch.device("cuda"), rank=1)  # rank 1: no config.json to write
    plan.plan_for_run(cfg, env, Path("init"), torch.float16)
    err = capsys.readouterr().err
    assert "compile=true on a GPU of compute capability 7.5 (a T4 is 7.5)" in err


@pytest.mark.slow
def test_plan_with_an_unknown_model_is_one_sentence():
    out = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--model", "foo"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown model preset 'foo'; choose one of" in out.stderr


@pytest.mark.slow
def test_the_time_estimate_is_the_seed_run_s_tokens_at_hand_counted_flops():
    """plan.py's time lines: the bori preset's tokens (its defaults are Config's), each at
    6N + 12·L·H·Q·T FLOPs counted here by hand, x 4/3 for the recompute in Phase 1B and x 1
    in Phase 1A (no weight gradients in the blocks), at the stated MFU of two T4s."""
    cfg = preset("smollm2-135m", vocab_size=58133, pad_vocab_to=64)
    n = sum(p.numel() for p in Llama(cfg).parameters())  # the tied matrix once
    full = 6 * n + 12 * 30 * 9 * 64 * 2048
    seed = bori.Config()
    tokens = {"1A": seed.steps_1a * seed.batch_tokens, "1B": seed.steps_1b * seed.batch_tokens}
    assert tokens == {"1A": 1000 * 131_072, "1B": 10_000 * 131_072}
    rate = 2 * seed.peak_tflops * 1e12 * plan.ASSUMED_MFU * 3600  # FLOPs per hour, two GPUs
    hours = {"1A": tokens["1A"] * full / rate, "1B": tokens["1B"] * full * 4 / 3 / rate}
    assert 1.0 < hours["1A"] < 1.5 and 14 < hours["1B"] < 17  # what the README quotes
    out = subprocess.run([sys.executable, str(ROOT / "plan.py")], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for phase, h in hours.items():
        line = next(line for line in lines if line.strip().startswith(f"Phase {phase}"))
        assert line.split()[2:6] == [f"{h:.1f}", "h", f"{tokens[phase] / 1e6:,.0f}M", "tokens"]
    assert lines[-2].split() == ["total", f"{hours['1A'] + hours['1B']:.1f}", "h"]
    # token distillation of every new token, at Config's settings: per window, 6 forward and
    # backward passes of 33 tokens (2/3 each), one forward of 33 (1/3) and the teacher's of
    # 33 + 7.4 - 1 (1/3); attention at 33 positions
    assert (seed.distill_contexts, seed.distill_before, seed.distill_after,
            seed.distill_steps, seed.distill_tokens) == (16, 16, 16, 6, 0)
    window_flops = 6 * n + 12 * 30 * 9 * 64 * 33
    per_token = 16 * window_flops * (33 * 12 / 3 + 33 / 3 + (33 + 6.4) / 3)
    distill_hours = 8981 * per_token / rate
    assert distill_hours < 0.15 * hours["1A"]  # small beside Phase 1A, as #25 asks
    assert lines[-1].split()[6:8] == [f"{distill_hours:.2f}", "h"]
