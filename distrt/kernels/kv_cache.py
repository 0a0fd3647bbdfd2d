"""Paged KV-cache write: scatter this step's K/V rows into their cache slots.

Cache layout (one tensor for K, one for V, per layer)::

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset      (slot_mapping[t] for token t, < 0: padding, skipped)

The cache is in the model's dtype (stored as is) or in float8 e4m3 (`kv_cache_dtype="fp8"`): then
cache = e4m3(clamp(x / scale, -448, 448)), rounded to nearest even, and readers use cache * scale.
The per-tensor k_scale = v_scale = 1.0 for now: vLLM's default when a checkpoint brings no calibrated
scales. e4m3 then holds |x| in [2^-6, 448] within 2^-4 relative error; smaller values lose relative
precision (subnormals, steps of 2^-9) and larger ones are clamped: clamping before the cast turns an
overflow into +-448 rather than NaN (e4m3fn has no infinity).
"""

from __future__ import annotations

from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_write_kv_cache_kernel',)

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def _check(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    assert k.dim() == 3 and k.shape == v.shape, (k.shape, v.shape)
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k.shape[1:] == k_cache.shape[2:], (k.shape, k_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.dtype == v.dtype and k_cache.dtype == v_cache.dtype in (k.dtype, FP8_KV_DTYPE), (k.dtype, k_cache.dtype)
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] == k.shape[0], slot_mapping.shape
    assert slot_mapping.dtype == torch.int64, slot_mapping.dtype
    assert k.device == k_cache.device == slot_mapping.device


def check_kv_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    assert k_cache.dtype == FP8_KV_DTYPE or k_scale == v_scale == 1.0, "KV scales apply to an fp8 cache only"
    assert k_scale > 0 and v_scale > 0, (k_scale, v_scale)


def quantize_kv_ref(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """What an fp8 cache stores for x: e4m3(clamp(x / scale, -448, 448)), rounded to nearest even."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """In place: k_cache.flat[slot_mapping[t]] = k[t] (same for v; quantized for an fp8 cache);
    slots < 0 are skipped."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [slots, kv_heads, head_dim]
    v_flat = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [slots, kv_heads, head_dim]
    if k_cache.dtype == FP8_KV_DTYPE:  # index_copy_ has no fp8 kernel: copy the bytes
        k_flat.view(torch.uint8).index_copy_(0, slots, quantize_kv_ref(k[valid], k_scale).view(torch.uint8))
        v_flat.view(torch.uint8).index_copy_(0, slots, quantize_kv_ref(v[valid], v_scale).view(torch.uint8))
        return
    k_flat.index_copy_(0, slots, k[valid])
    v_flat.index_copy_(0, slots, v[valid])


# triton.jit, applied by _jit()
def _write_kv_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr):
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
    k = tl.load(k_ptr + src_k, mask=mask)
    v = tl.load(v_ptr + src_v, mask=mask)
    if FP8:
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    # .to: round to nearest even into e4m3 (FP8), a no-op otherwise
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Triton version of write_kv_cache_ref. k/v may be strided views (e.g. of a fused qkv output)
    as long as the last dim is contiguous."""
    _jit()
    _check(k, v, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    assert k.stride(2) == 1 and v.stride(2) == 1, (k.stride(), v.stride())
    assert slot_mapping.is_contiguous()
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=k_cache.dtype == FP8_KV_DTYPE,
        num_warps=4,
    )
