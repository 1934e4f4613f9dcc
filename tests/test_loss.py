"""loss.py: the chunked LM-head cross-entropy against the naive one, in fp32, fp16 and peak
memory."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT
from loss import IGNORE_INDEX
from loss import cross_entropy_sum


def test_chunked_loss_under_fp16_autocast_does_not_overflow():
    """dW = g.T @ h reaches 65,604 here, past fp16's 65,504: an unscaled fp16 matmul gives inf.
    The loss scales g by a power of two first, so it matches fp32 to fp16's rounding."""
    torch.manual_seed(0)
    N, C, V = 4096, 64, 3000
    h = (20 + torch.randn(N, C)).requires_grad_()
    w = (torch.randn(V, C) * 0.01).requires_grad_()
    t = torch.zeros(N, dtype=torch.long)  # most rows want token 0: its row of dW piles up
    t[::5] = torch.randint(0, V, (len(t[::5]),))
    with torch.autocast("cpu", dtype=torch.float16):
        ours = cross_entropy_sum(h, w, t, V)
        g = torch.softmax((h @ w.T).float(), -1) - F.one_hot(t, V)
        assert not torch.isfinite(g.half().T @ h.half()).all()  # the naive fp16 product
    ours.backward()
    h16, w16 = (x.detach().half().float().requires_grad_() for x in (h, w))
    ref = F.cross_entropy(h16 @ w16.T, t, reduction="sum")  # fp32 on the fp16-rounded inputs
    ref.backward()
    assert w16.grad.abs().max() > 65504
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert (h.grad - h16.grad).abs().max() <= 2e-3 * h16.grad.abs().max()
    assert (w.grad - w16.grad).abs().max() <= 2e-3 * w16.grad.abs().max()


@pytest.mark.parametrize("chunk_rows", [0, 64])
def test_chunked_loss_matches_naive_cross_entropy(chunk_rows):
    torch.manual_seed(0)
    V, padded = 1000, 1024  # padding rows must not enter the softmax
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(padded, 32, requires_grad=True)
    t = torch.randint(0, V, (300,))
    t[::7] = IGNORE_INDEX
    ours = cross_entropy_sum(h, w, t, V, chunk_rows) / (t != IGNORE_INDEX).sum()
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T)[:, :V], t, ignore_index=IGNORE_INDEX)
    ref.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert (gh - h.grad).abs().max() <= 1e-5 * h.grad.abs().max()
    assert (gw - w.grad).abs().max() <= 1e-5 * w.grad.abs().max()
    assert w.grad[V:].abs().max() == 0


PEAK_SCRIPT = """
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from loss import cross_entropy_sum
torch.manual_seed(0)
N, V, C = 2048, 58133, 576
h = torch.randn(N, C, requires_grad=True)
w = (torch.randn(V, C) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,))
if sys.argv[1] == "naive":
    loss = F.cross_entropy(h @ w.T, t)
else:
    loss = cross_entropy_sum(h, w, t, V) / N
loss.backward()
torch.save((loss.detach(), h.grad, w.grad), sys.argv[2])
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
"""


@pytest.mark.slow
def test_chunked_loss_lowers_peak_memory_with_equal_results(tmp_path):
    peaks, results = {}, {}
    for way in ("naive", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(root=str(ROOT)), way,
                              str(tmp_path / way)], capture_output=True, text=True, check=True)
        peaks[way] = int(out.stdout) / 2**10  # MiB
        results[way] = torch.load(tmp_path / way, weights_only=True)
    for a, b in zip(results["naive"], results["chunked"]):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # the naive loss holds (N, V) fp32 logits, their log-softmax and their gradient: ~1.4 GiB
    assert peaks["chunked"] < peaks["naive"] - 700, peaks
