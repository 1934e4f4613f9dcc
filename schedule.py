"""Warmup-Stable-Decay learning rate: linear warmup, a constant stretch, then a short decay.

WSD: Hu et al. 2024 (MiniCPM, arXiv:2404.06395); the cooldown shapes are compared by Hägele et
al. 2024 (arXiv:2405.18392), who find 1-sqrt best. A pure function of the step, so a resumed run
needs no scheduler state.
"""
import math

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int, decay_steps: int,
          min_lr_ratio: float = 0.1, shape: str = "1-sqrt") -> float:
    """Learning rate of optimizer step `step` (0-based) of a total_steps run.

    Steps 0..warmup-1 rise linearly to peak_lr (step warmup-1 is the first at peak); the last
    decay_steps steps fall to min_lr_ratio * peak_lr, reached exactly at step total_steps-1."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak_lr
    progress = min((step - decay_start + 1) / decay_steps, 1.0)  # in (0, 1]
    if shape == "linear":
        fall = progress
    elif shape == "cosine":
        fall = 0.5 * (1 - math.cos(math.pi * progress))
    elif shape == "1-sqrt":
        fall = math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay shape {shape!r}; choose one of {DECAY_SHAPES}")
    return peak_lr * (1 - (1 - min_lr_ratio) * fall)
