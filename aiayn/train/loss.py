"""Label-smoothed cross-entropy (§5.4) in one fused pass over the logits.

`F.cross_entropy(logits.float(), target, label_smoothing=eps)` casts the whole (N, V) logit matrix
to fp32, keeps its log-softmax for the backward pass and runs several full passes over it: on a CPU
that is ~30% of a small model's bf16 training step. Here each block of rows is read once forward
(keeping only its logsumexp) and once backward, where the gradient

    d loss_i / d z_ij = softmax(z_i)_j - (1 - eps) [j = t_i] - eps / V

is written straight in the logits' dtype. Same loss and gradients as F.cross_entropy, about 3x
faster at (3.5k, 8k) in bf16 (tests/train/test_loss.py checks both in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROWS = 256  # rows a block: a block's fp32 copy stays in cache


class _LabelSmoothedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, eps: float) -> Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        n, vocab = logits.shape
        losses = torch.empty(n, dtype=compute, device=logits.device)
        lse = torch.empty(n, dtype=compute, device=logits.device)
        for i in range(0, n, ROWS):
            z = logits[i:i + ROWS]
            # logsumexp in fp32 without an fp32 copy of the block: z - max promotes on the fly
            m = z.amax(dim=1).to(compute)
            lse[i:i + ROWS] = (z - m[:, None]).exp_().sum(dim=1).log_().add_(m)
            # -(1 - eps) log p_t - eps * mean_j log p_j  =  lse - (1 - eps) z_t - eps * mean_j z_j
            z_t = z.gather(1, target[i:i + ROWS, None]).squeeze(1).to(compute)
            z_mean = z.sum(dim=1, dtype=compute) / vocab
            losses[i:i + ROWS] = lse[i:i + ROWS] - (1 - eps) * z_t - eps * z_mean
        ctx.save_for_backward(logits, target, lse)
        ctx.eps = eps
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        logits, target, lse = ctx.saved_tensors
        eps, vocab = ctx.eps, logits.shape[1]
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ROWS):
            rows = slice(i, i + ROWS)
            p = (logits[rows] - lse[rows, None]).exp_()  # softmax, in fp32
            p.scatter_add_(1, target[rows, None], p.new_full((p.shape[0], 1), eps - 1.0))
            g = grad_losses[rows, None].to(p.dtype)
            # (p - eps / V) * g, written straight in the logits' dtype: one pass
            torch.addcmul(g * (-eps / vocab), p, g, out=grad[rows])
        return grad, None, None


def label_smoothed_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                                 reduction: str = "mean") -> Tensor:
    """Cross-entropy of (N, V) logits against (N,) class ids, the target distribution smoothed as in
    §5.4 (1 - eps on the true class, eps spread uniformly over all V classes: F.cross_entropy's
    convention). reduction: "mean", "sum" or "none". The result is fp32 (float64 for float64 logits)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected (N, V) logits and (N,) targets, got {tuple(logits.shape)} and {tuple(target.shape)}")
    losses = _LabelSmoothedCE.apply(logits, target, float(label_smoothing))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"unknown reduction {reduction!r}")
