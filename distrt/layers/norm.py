from __future__ import annotations

import torch
from torch import nn

from distrt.kernels import fused_add_rms_norm_op, rms_norm_op


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, residual-to-carry): with a residual, adds it first (fused)."""
        if residual is None:
            return rms_norm_op(x, self.weight, self.eps), x
        return fused_add_rms_norm_op(x, residual, self.weight, self.eps)
