"""Cross-entropy of the LM head without the full logits: (N, C) hidden states, a (V, C) head.

The (N, V) logits never exist at once: a chunk of rows at a time, the forward pass turns each
chunk's gradient of the summed loss, softmax - onehot, into dh and dW, and backward only scales
them. The same idea as Liger Kernel's fused linear cross-entropy (arXiv:2410.10989). At 2,048
tokens and 58,133 tokens of vocabulary this halves the loss's peak memory (tests/test_plan.py).
"""
import torch

IGNORE_INDEX = -100  # targets with this id add nothing to the loss (PyTorch's convention)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ W.T over W's first vocab_size rows, a chunk of rows
    at a time. The matmul runs over all of W's rows (a padded count, aligned for tensor cores,
    as nanoGPT pads 50,257 to 50,304); the padding rows' logits are masked to -inf."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, rows: int, with_grad: bool):
        loss = torch.zeros((), device=h.device)
        dh = torch.empty_like(h, dtype=torch.float32) if with_grad else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        w, fp16 = weight, torch.is_autocast_enabled(h.device.type)
        for s in range(0, h.shape[0], rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            ignored = tc == IGNORE_INDEX
            tc = tc.masked_fill(ignored, 0)
            # under autocast the matmul runs in fp16; the softmax always in fp32
            logits = (hc @ w.T).float()  # (rows, padded V)
            logits[:, vocab_size:] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(1, tc[:, None]).squeeze(1)
            loss += nll.masked_fill(ignored, 0.0).sum()
            if not with_grad:
                continue
            g = logp.exp_()  # d(sum of nll)/d(logits) = softmax - onehot, in place
            g.scatter_add_(1, tc[:, None], torch.full_like(g[:, :1], -1.0))
            g.masked_fill_(ignored[:, None], 0.0)  # no boolean-index write: no host sync
            if fp16:
                # Scale g by a power of two (exact) so that g @ W and g.T @ h stay below
                # fp16's max, 65504, as GradScaler does for the rest of the model.
                bound = torch.maximum(g.abs().sum(0).max() * hc.abs().max(),
                                      g.abs().sum(1).max() * w.abs().max())
                scale = torch.exp2(torch.floor(torch.log2(2.0**15 / bound.clamp_min(1e-30))))
                g *= scale
                dh[s:s + rows] = (g @ w).float() / scale
                dw += (g.T @ hc).float() / scale
            else:
                torch.mm(g, w, out=dh[s:s + rows])
                dw.addmm_(g.T, hc)
        if with_grad:
            ctx.save_for_backward(dh, dw)
            ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss).to(ctx.dtypes[0]), (dw * grad_loss).to(ctx.dtypes[1]), \
            None, None, None, None


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of the loss: 128 MiB of fp32 logits (vocab_size: the padded count)."""
    return max(1, 2**25 // vocab_size)


def cross_entropy_sum(h, weight, targets, vocab_size: int, chunk_rows: int = 0):
    """Summed cross-entropy in nats of (N, C) hidden states against (N,) target ids; rows of
    weight past vocab_size (padding) take no part."""
    rows = chunk_rows or loss_chunk_rows(weight.shape[0])
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(h, weight, targets, vocab_size, rows, with_grad)
