"""Dropout (§5.4) that is fast on a CPU.

On a CPU, drawing the random mask dominates nn.Dropout's cost (one generator call per element:
~8 ms for 1M bf16 elements, more than a 4096x256x1024 matmul). Here the mask is cut from 64-bit
random words, four 16-bit lanes each, which is 4x faster; the keep probability is exact to 2^-16.
On CUDA, PyTorch's own fused kernel is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return x
    if x.is_cuda or p >= 1.0:
        return F.dropout(x, p, training=True)
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    lanes = words.view(torch.int16)[:n].view(x.shape)       # uniform over [-2^15, 2^15)
    keep = lanes >= round(p * 65536) - 32768                  # P(keep) = 1 - p
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
