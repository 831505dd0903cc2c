"""fp32 training with the linear layers' GEMMs on oneDNN.

torch's CPU build sends fp32 matrix products to MKL, which takes an AVX2 path on AMD CPUs (~100
GFLOP/s a core here, against ~230 for oneDNN on the same data; bf16 already goes to oneDNN).
`OneDNNTrainingLinear` computes the forward product and both backward products (dx = dy W,
dW = dyᵀ x) with `torch.ops.mkldnn._linear_pointwise`: the same IEEE fp32 arithmetic, another GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.inference import onednn_available

_gemm = torch.ops.mkldnn._linear_pointwise  # (x (N, in), w (out, in), b) -> x wᵀ + b


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
        if ctx.needs_input_grad[0]:  # dy (N, out) @ W (out, in)
            dx = _gemm(dy2, weight.t().contiguous(), None, "none", [], "").view(*dy.shape[:-1], x2.shape[1])
        if ctx.needs_input_grad[1]:  # dyᵀ (out, N) @ x (N, in)
            dw = _gemm(dy2.t().contiguous(), x2.t().contiguous(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


class OneDNNTrainingLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose products run on oneDNN, with gradients."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return super().forward(x)  # oneDNN already serves bf16; this class is for fp32
        return _LinearFn.apply(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module, precision: str, device: str) -> nn.Module:
    """In place: on a CPU in fp32, every nn.Linear of `model` becomes a OneDNNTrainingLinear (where
    this torch build has oneDNN). Other precisions and devices: the model as it is."""
    if precision == "fp32" and torch.device(device).type == "cpu" and onednn_available():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = OneDNNTrainingLinear
    return model
