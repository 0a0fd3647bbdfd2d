"""Paged attention over a ragged batch: writes this step's K/V into the cache (applying RoPE to q
and k on the way when given the rotary embedding: one fused kernel), then attends.

Per-layer cache: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block ids are
the coordinator's global ids (see engine/kv_allocator.py). The cache is in the model dtype or in
float8 e4m3 (CacheConfig.kv_cache_dtype; the kernels quantize on write and dequantize on read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distrt.kernels import attention_op, rotary_write_kv_op, write_kv_cache_op
from distrt.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]; -1 = padding token, not written
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B], context length after this step
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool
    # what every layer's attention can share within this step (the CPU path's gather plan)
    cpu_cache: dict = field(default_factory=dict, compare=False, repr=False)  # type: ignore[type-arg]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Per-tensor scales of an fp8 KV cache (cache = x / scale): 1.0, as vLLM uses when the checkpoint
        # has no calibrated k_scale/v_scale; a loader could set calibrated ones here. Unused otherwise.
        self.k_scale = self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, positions: torch.Tensor | None = None,
                rope: RotaryEmbedding | None = None) -> torch.Tensor:
        """q, k, v: this step's projections ([T, H*D] or [T, H, D]). With rope (and positions), q and k
        arrive un-rotated and one kernel rotates them and writes the cache (rotary_write_kv_op: q may be
        rotated in place, k and v are left as they are); without, they arrive rotated already."""
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        if rope is None:
            write_kv_cache_op(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        else:
            assert positions is not None, "rope needs positions"
            q = rotary_write_kv_op(q, k, v, positions, rope.cos_sin, k_cache, v_cache, meta.slot_mapping,
                                   self.k_scale, self.v_scale)
        out = attention_op(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                           self.scale, meta.max_query_len, meta.is_decode_only, self.k_scale, self.v_scale,
                           plan_cache=meta.cpu_cache)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)  # [T, H*D]
