"""schedule.py: WSD values at the points that matter, computed by hand."""
import math

import pytest

from schedule import lr_at


ARGS = dict(peak_lr=1e-3, total_steps=100, warmup_steps=10, decay_steps=20, min_lr_ratio=0.1)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_values(shape):
    lr = [lr_at(s, shape=shape, **ARGS) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4)  # warmup start: 1/10 of peak
    assert lr[4] == pytest.approx(5e-4)
    assert lr[9] == 1e-3  # warmup end
    assert lr[10] == lr[50] == lr[79] == 1e-3  # stable
    assert lr[99] == pytest.approx(1e-4)  # decay end: 10% of peak
    assert all(a >= b for a, b in zip(lr[79:], lr[80:]))  # decay never rises
    p = 1 / 20  # decay start: the first decay step has progressed 1/20
    fall = {"linear": p, "cosine": 0.5 * (1 - math.cos(math.pi * p)), "1-sqrt": math.sqrt(p)}
    assert lr[80] == pytest.approx(1e-3 * (1 - 0.9 * fall[shape]))
    p = 10 / 20  # halfway through the decay
    fall = {"linear": 0.5, "cosine": 0.5, "1-sqrt": math.sqrt(0.5)}
    assert lr[89] == pytest.approx(1e-3 * (1 - 0.9 * fall[shape]))


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown decay shape"):
        lr_at(90, shape="step", **ARGS)
