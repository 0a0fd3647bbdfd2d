"""Rotary embedding fused with the paged KV-cache write: one launch instead of two per layer.

Per token t (one program each): rotate q[t] in place (every q head), rotate k[t] and store it with
v[t] into cache slot slot_mapping[t] (skipped when < 0, a padding token; q is rotated regardless).
The math is apply_rotary's then write_kv_cache's, step for step: fp32 rotation rounded to the input
dtype, then for an fp8 cache e4m3(clamp(k / k_scale, -448, 448)) of that rounded value (see
rotary.py and kv_cache.py for the layouts). Inputs: q is overwritten (and returned); k and v are
only read: the rotated k exists in the cache alone, attention reads K from there.
"""

from __future__ import annotations

from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels
from distrt.kernels.kv_cache import FP8_KV_DTYPE, check_kv_scales, write_kv_cache_ref
from distrt.kernels.kv_cache import _check as _check_kv
import distrt.kernels.rotary as rotary
from distrt.kernels.rotary import _check as _check_rotary
from distrt.kernels.rotary import apply_rotary_ref

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_rotary_write_kv_kernel',)
# rotary.py's device helpers (jitted there): cos/sin of a position, one row's heads rotated
_cos_sin_row: Any = None
_rotate_halves: Any = None


def _jit() -> None:
    global _cos_sin_row, _rotate_halves
    if triton is None:
        rotary._jit()
        _cos_sin_row, _rotate_halves = rotary._cos_sin_row, rotary._rotate_halves
    jit_kernels(globals(), _KERNELS)


def rotary_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """apply_rotary_ref then write_kv_cache_ref (rotated k): returns a rotated copy of q; q, k, v untouched."""
    q_rot, k_rot = apply_rotary_ref(q, k, positions, cos_sin)
    write_kv_cache_ref(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot


# triton.jit, applied by _jit()
def _rotary_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                            k_scale, v_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_cs, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                            BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                            FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    cos, sin = _cos_sin_row(cos_sin_ptr, pos, stride_cs, HALF, BLOCK_HALF)
    q1, q2, q_ptrs, q_mask = _rotate_halves(q_ptr, t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF,
                                            BLOCK_QH, BLOCK_HALF)
    tl.store(q_ptrs, q1, mask=q_mask)
    tl.store(q_ptrs + HALF, q2, mask=q_mask)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        k1, k2, _, kv_mask = _rotate_halves(k_ptr, t * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF,
                                            BLOCK_KH, BLOCK_HALF)
        h = tl.arange(0, BLOCK_KH)
        v_ptrs = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
        v1 = tl.load(v_ptrs, mask=kv_mask)
        v2 = tl.load(v_ptrs + HALF, mask=kv_mask)
        if FP8:  # as write_kv_cache: scale, clamp, then round to nearest even into e4m3 by the store's .to
            k1 = tl.clamp(k1.to(tl.float32) / k_scale, -448.0, 448.0)
            k2 = tl.clamp(k2.to(tl.float32) / k_scale, -448.0, 448.0)
            v1 = tl.clamp(v1.to(tl.float32) / v_scale, -448.0, 448.0)
            v2 = tl.clamp(v2.to(tl.float32) / v_scale, -448.0, 448.0)
        # cache is contiguous: slot s starts at s * num_kv_heads * head_dim
        dst = slot * (NUM_KV_HEADS * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
        cache_ty = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst, k1.to(cache_ty), mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF, k2.to(cache_ty), mask=kv_mask)
        tl.store(v_cache_ptr + dst, v1.to(cache_ty), mask=kv_mask)
        tl.store(v_cache_ptr + dst + HALF, v2.to(cache_ty), mask=kv_mask)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Triton version of rotary_write_kv_ref. q is rotated IN PLACE and returned; k and v are not modified.
    q/k/v may be strided views (e.g. of a fused qkv output) with a contiguous last dim."""
    _jit()
    _check_rotary(q, k, positions, cos_sin)
    _check_kv(k, v, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, (q.stride(), k.stride(), v.stride())
    assert cos_sin.stride(1) == 1 and positions.is_contiguous() and slot_mapping.is_contiguous()
    num_tokens, num_q_heads, head_dim = q.shape
    assert head_dim % 2 == 0, head_dim
    if num_tokens == 0:
        return q
    half, num_kv_heads = head_dim // 2, k.shape[1]
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), FP8=k_cache.dtype == FP8_KV_DTYPE, num_warps=4,
    )
    return q
