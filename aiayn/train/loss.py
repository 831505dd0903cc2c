"""Label-smoothed cross-entropy (§5.4) in one fused pass over the logits.

`F.cross_entropy(logits.float(), target, label_smoothing=eps)` casts the whole (N, V) logit matrix
to fp32, keeps its log-softmax for the backward pass and runs several full passes over it: on a CPU
that is ~30% of a small model's bf16 training step. Here each block of rows is read once, in the
forward pass, which also writes the gradient (in the logits' dtype, scaled for the reduction)

    d loss_i / d z_ij = softmax(z_i)_j - (1 - eps) [j = t_i] - eps / V

and the backward pass passes it on (a reduced loss with a unit upstream gradient: training) or
scales it. Same loss and gradients as F.cross_entropy, about 3x
faster at (3.5k, 8k) in bf16 (tests/train/test_loss.py checks both in float64). On a CPU, fp32 and
bf16, the forward pass is one multithreaded C kernel (aiayn.kernels.cross_entropy: each row read
once; in a base model's bf16 step 49 -> 18 ms); `_blockwise` below, in PyTorch's operators, is its
reference and the fallback. R-Drop's
symmetric KL term is computed the same way (fwd+bwd at (7.2k, 8k) bf16, 1 thread: 200 ms with
autograd's passes, 145 ms here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aiayn import kernels
from aiayn.errors import InputError

ROWS = 128  # rows a block on a CPU: the block's fp32 copy (4 MB at V = 8k) is reused, never reallocated
GPU_BLOCK = 2**25  # values a block on a GPU (128 MB in fp32): each block is ~15 kernel launches, and
# blocks of 128 rows made a base model's loss ~3,000 launches a step at 25k tokens (H200: its step
# was bound by launching kernels)
LOG2_E = math.log2(math.e)


def block_rows(logits: Tensor) -> int:
    """Rows of `logits` (N, V) worked on at once: ROWS on a CPU (a block stays in its caches), as many
    as GPU_BLOCK values on a GPU."""
    return ROWS if logits.device.type == "cpu" else max(ROWS, GPU_BLOCK // max(1, logits.size(1)))


def _exp_(x: Tensor) -> Tensor:
    """exp, in place, as 2 ** (x log2 e): torch's CPU `exp` on fp32 goes through MKL's vector math,
    which is slow on AMD CPUs (0.64 ms for 1M values here, 1 thread), its `exp2` through its own
    vectorized kernel (0.15 ms). The argument's rounding costs ~1e-7 relative per unit of |x|."""
    return x.mul_(LOG2_E).exp2_()


class _LabelSmoothedCE(torch.autograd.Function):
    # Each block of logits is cast once into one reused fp32 buffer and worked on in place there.
    # (A fresh fp32 temporary per block, which `z - m` with a bf16 z would make, is a large
    # allocation: fresh pages from the OS each time, and the loss of a bf16 step took ~40% longer.)
    # The gradient is written during the forward pass, while the block's exponentials are at hand,
    # already scaled for the reduction (1/N for "mean"): for a reduced loss whose upstream gradient
    # is 1, as in training, backward returns it untouched (no pass over the (N, V) matrix at all);
    # otherwise it scales it. The logits need not be kept: with overwrite, the gradient takes their
    # memory (no (N, V) buffer of its own, and no fresh pages for one: the loss of a small fp32 step
    # 37 -> 25 ms on AVX2, 30 -> 19 ms on AVX-512, bf16 22 -> 18 ms, at (4k, 8k), one thread).
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, eps: float, reduction: str, overwrite: bool) -> Tensor:
        n = logits.size(0)
        scale = 1.0
        if reduction == "mean":
            scale = 1.0 / n if n else float("nan")  # the mean of no rows, as torch gives it
        want_grad, overwrite = ctx.needs_input_grad[0], overwrite and logits.is_contiguous()
        # on a CPU, the same in one multithreaded C kernel (aiayn/kernels/train_step.c)
        result = kernels.cross_entropy(logits, target, eps, scale, want_grad, overwrite)
        losses, grad = result if result is not None else _blockwise(logits, target, eps, scale, want_grad, overwrite)
        ctx.save_for_backward(grad)
        if reduction == "none":
            return losses
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        if grad_loss.dim():  # reduction "none": one upstream gradient per row
            return grad * grad_loss[:, None].to(grad.dtype), None, None, None, None
        if not grad.is_cuda and grad_loss.item() == 1.0:  # (.item() would make CUDA wait)
            return grad, None, None, None, None
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def _blockwise(logits: Tensor, target: Tensor, eps: float, scale: float, want_grad: bool,
               overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
    """_LabelSmoothedCE's forward pass in PyTorch's operators: its losses and its gradient (written
    over the logits with overwrite)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    n, vocab = logits.shape
    losses = torch.empty(n, dtype=compute, device=logits.device)
    grad = (logits if overwrite else torch.empty_like(logits)) if want_grad else None
    # in fp32 each block is worked on in the gradient's own rows: no copy of it at the end
    in_grad = grad is not None and grad.dtype == compute
    block = block_rows(logits)
    work = None if in_grad else torch.empty(min(n, block), vocab, dtype=compute, device=logits.device)
    for i in range(0, n, block):
        rows, t = slice(i, i + block), target[i:i + block, None]
        if in_grad and overwrite:
            z = logits[rows]  # worked on where it lies: it becomes the gradient
        else:
            z = (grad[rows] if in_grad else work[:min(block, n - i)]).copy_(logits[rows])
        m = z.amax(dim=1, keepdim=True)
        # -(1 - eps) log p_t - eps * mean_j log p_j  =  lse - (1 - eps) z_t - eps * mean_j z_j
        z_t = z.gather(1, t)
        z_mean = z.sum(dim=1, keepdim=True).div_(vocab)
        e = _exp_(z.sub_(m))
        total = e.sum(dim=1, keepdim=True)
        losses[rows] = (total.log().add_(m) - (1 - eps) * z_t - eps * z_mean).squeeze(1)
        if grad is not None:  # scale * (softmax - (1 - eps) [j = t] - eps / V)
            p = e.mul_(scale / total)
            p.scatter_add_(1, t, p.new_full(t.shape, scale * (eps - 1.0))).sub_(scale * eps / vocab)
            if not in_grad:
                grad[rows].copy_(p)
    return losses, grad


def label_smoothed_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                                 reduction: str = "mean", *, overwrite_logits: bool = False) -> Tensor:
    """Cross-entropy of (N, V) logits against (N,) class ids, the target distribution smoothed as in
    §5.4 (1 - eps on the true class, eps spread uniformly over all V classes: F.cross_entropy's
    convention). reduction: "mean", "sum" or "none". The result is fp32 (float64 for float64 logits).
    overwrite_logits: where the gradient is wanted, it is written over `logits` (contiguous ones),
    which hold it from then on: for a caller that reads them no more, and whose graph keeps no
    reference to them (a linear layer's output: its backward needs its inputs only)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise InputError(f"expected (N, V) logits and (N,) targets, got {tuple(logits.shape)} and {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise InputError(f"unknown reduction {reduction!r}")
    return _LabelSmoothedCE.apply(logits, target, float(label_smoothing), reduction, overwrite_logits)


class _SymmetricKL(torch.autograd.Function):
    # The same blockwise scheme as _LabelSmoothedCE, for two (N, V) halves of one logit matrix.
    # With d = log p - log q per row: loss = sum_j (p_j - q_j) d_j = KL(p||q) + KL(q||p), and
    #   d loss / d z_p = p (d - KL(p||q)) + p - q,   d loss / d z_q = q (-d - KL(q||p)) + q - p.
    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        n, vocab = logits.shape[0] // 2, logits.shape[1]
        losses = torch.empty(n, dtype=compute, device=logits.device)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        block = block_rows(logits)
        rows = min(n, block)
        lp, lq, p, q = (torch.empty(rows, vocab, dtype=compute, device=logits.device) for _ in range(4))
        for i in range(0, n, block):
            k = min(block, n - i)
            a, b, e, f = lp[:k], lq[:k], p[:k], q[:k]
            for z, lz, pz in ((logits[i:i + k], a, e), (logits[n + i:n + i + k], b, f)):
                lz.copy_(z)
                lz.sub_(lz.amax(dim=1, keepdim=True))              # z - max
                total = _exp_(pz.copy_(lz)).sum(dim=1, keepdim=True)
                pz.div_(total)                                     # softmax
                lz.sub_(total.log_())                              # log-softmax
            d = a.sub_(b)                                          # lp - lq, in lp's buffer
            kl_pq = (e * d).sum(dim=1, keepdim=True)
            kl_qp = (f * d).sum(dim=1, keepdim=True).neg_()
            losses[i:i + k] = (kl_pq + kl_qp).squeeze(1)
            if grad is not None:
                diff = b.copy_(e).sub_(f)                          # p - q, in lq's buffer
                grad[i:i + k].copy_(e.mul_(d - kl_pq).add_(diff))
                grad[n + i:n + i + k].copy_(f.mul_(d.neg_().sub_(kl_qp)).sub_(diff))
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        (grad,) = ctx.saved_tensors
        g = grad_losses[:, None].to(grad.dtype)  # (N, 1): the same row scale for both halves
        return (grad.view(2, *g.shape[:1], -1) * g).view(grad.shape)


def symmetric_kl(logits: Tensor) -> Tensor:
    """KL(p || q) + KL(q || p) for each row pair of a (2N, V) logit matrix: p from its first N rows,
    q from its last N. R-Drop's consistency term (Liang et al., 2021), computed in fp32 blocks like
    the cross-entropy above; gradients flow into both halves, as in the authors' code. -> (N,)"""
    if logits.dim() != 2 or logits.shape[0] % 2:
        raise InputError(f"expected (2N, V) logits, got {tuple(logits.shape)}")
    return _SymmetricKL.apply(logits)
