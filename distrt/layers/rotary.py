from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distrt.kernels import apply_rotary_op
from distrt.kernels.rotary import build_rope_cache


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None,
                 device: torch.device | str) -> None:
        super().__init__()
        cache = build_rope_cache(head_dim, max_position, base, scaling).to(device)
        self.register_buffer("cos_sin", cache, persistent=False)  # [max_position, head_dim] fp32

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_op(q, k, positions, self.cos_sin)
