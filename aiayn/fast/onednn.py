"""fp32 training with the linear layers' GEMMs on oneDNN, on the CPUs where that is faster.

torch's CPU build sends fp32 matrix products to MKL, which takes an AVX2 path on AMD CPUs (~100
GFLOP/s a core on a Zen 5, against ~230 for oneDNN on the same data; bf16 already goes to oneDNN).
On an Intel Xeon with AMX, MKL's own GEMMs were 5-25% faster than oneDNN's. So which one trains is
measured on the machine, once (the "gemm" family of aiayn.kernels.tuning).

`OneDNNTrainingLinear` computes the forward product and dx = dy W with
`torch.ops.mkldnn._linear_pointwise`, and dW = dyᵀ x with it too (`_weight_grads`): the same IEEE
fp32 arithmetic, other GEMMs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.fast.inference import onednn_available

_gemm = torch.ops.mkldnn._linear_pointwise  # (x (N, in), w (out, in), b) -> x wᵀ + b


def _weight_grads(dy: Tensor, x: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """dW = dyᵀ x and (with a bias) db = sum of dy's rows, for dy (N, out) and x (N, in).

    `_gemm` reads its second operand transposed as it lies (a strided view), so only the smaller of
    dy and x is copied, transposed, as its first operand: dWᵀ = xᵀ dy when in <= out, else dyᵀ x. 1
    thread, fp32, against oneDNN's inner-product backward (which needed both as oneDNN copies):
    base (7000 rows) 512 -> 2048 101 -> 78 ms, 2048 -> 512 99 -> 72, generator 512 -> 8000 377 ->
    267; small (3600 rows) generator 256 -> 8000 126 -> 68."""
    if x.shape[1] <= dy.shape[1]:
        dw = _gemm(x.t().contiguous(), dy.t(), None, "none", [], "").t()  # (autograd lays it out as W)
    else:
        dw = _gemm(dy.t().contiguous(), x.t(), None, "none", [], "")
    return dw, dy.sum(0) if bias else None


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _gemm(x2, weight, bias, "none", [], "").view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dy (N, out) @ W (out, in): Wᵀ read as it lies, no copy
            dx = _gemm(dy2, weight.t(), None, "none", [], "").view(*dy.shape[:-1], x2.shape[1])
        bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:  # dW = dyᵀ (out, N) @ x (N, in), with db = sum of dy if needed
            dw, db = _weight_grads(dy2, x2, bias_grad)
        elif bias_grad:
            db = dy2.sum(0)
        return dx, dw, db


class OneDNNTrainingLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose products run on oneDNN, with gradients."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_rows(x, slice(None))

    def forward_rows(self, x: Tensor, rows: slice) -> Tensor:
        """The outputs `rows` only (aiayn.model.attention.linear_rows: cross-attention's projections)."""
        weight, bias = self.weight, self.bias
        if rows != slice(None):  # (a full slice would cost its backward a copy)
            weight, bias = weight[rows], bias[rows] if bias is not None else None
        return _linear(x, weight, bias)

    def product(self, x: Tensor) -> Tensor:
        """x Wᵀ without the bias (for a kernel that adds it: aiayn.fast.modules.FastFeedForward)."""
        return _linear(x, self.weight, None)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)  # oneDNN already serves bf16; this class is for fp32
    return _LinearFn.apply(x, weight, bias)


def faster_here() -> bool:
    """Whether oneDNN's GEMMs train fp32 linear layers faster than PyTorch's own on this machine
    (measured once: aiayn.kernels.tuning). AIAYN_KERNELS=all: yes (tests take the same path
    everywhere), AIAYN_KERNELS=0: no (nothing of aiayn's own)."""
    from aiayn.kernels import tuning

    forced = tuning.forced("gemm")
    if forced is not None:
        return forced
    switch = os.environ.get("AIAYN_KERNELS", "1")
    if switch in ("all", "0"):
        return switch == "all"
    return bool(tuning.for_torch("gemm_f32"))


def use_onednn_linears(model: nn.Module, precision: str, device: str) -> nn.Module:
    """In place: on a CPU in fp32, every nn.Linear of `model` becomes a OneDNNTrainingLinear (where
    this torch build has oneDNN, and its GEMMs are faster here). Other precisions and devices: the
    model as it is."""
    if precision == "fp32" and torch.device(device).type == "cpu" and onednn_available() and faster_here():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = OneDNNTrainingLinear
    return model
