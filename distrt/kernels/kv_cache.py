"""Paged KV-cache write: scatter this step's K/V rows into their cache slots.

Cache layout (one tensor for K, one for V, per layer)::

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset      (slot_mapping[t] for token t, < 0: padding, skipped)
"""

from __future__ import annotations

from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_write_kv_cache_kernel',)


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def _check(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    assert k.dim() == 3 and k.shape == v.shape, (k.shape, v.shape)
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k.shape[1:] == k_cache.shape[2:], (k.shape, k_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, (k.dtype, k_cache.dtype)
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] == k.shape[0], slot_mapping.shape
    assert slot_mapping.dtype == torch.int64, slot_mapping.dtype
    assert k.device == k_cache.device == slot_mapping.device


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """In place: k_cache.flat[slot_mapping[t]] = k[t] (same for v); slots < 0 are skipped."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [slots, kv_heads, head_dim]
    v_flat = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [slots, kv_heads, head_dim]
    k_flat.index_copy_(0, slots, k[valid])
    v_flat.index_copy_(0, slots, v[valid])


# triton.jit, applied by _jit()
def _write_kv_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    src_k = t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :]
    # cache is contiguous: slot s starts at s * num_kv_heads * head_dim
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src_v, mask=mask), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Triton version of write_kv_cache_ref. k/v may be strided views (e.g. of a fused qkv output)
    as long as the last dim is contiguous."""
    _jit()
    _check(k, v, k_cache, v_cache, slot_mapping)
    assert k.stride(2) == 1 and v.stride(2) == 1, (k.stride(), v.stride())
    assert slot_mapping.is_contiguous()
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
