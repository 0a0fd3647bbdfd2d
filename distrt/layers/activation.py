from __future__ import annotations

import torch
from torch import nn

from distrt.kernels import silu_and_mul_op


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        return silu_and_mul_op(x)
