"""Rotary position embedding, NeoX / Hugging Face style (rotate_half over the full head_dim).

cos_sin cache: [max_position, head_dim] = [cos(pos * inv_freq) | sin(pos * inv_freq)],
each half head_dim // 2 wide; inv_freq follows transformers' ROPE_INIT_FUNCTIONS.
"""

from __future__ import annotations

from typing import Any

import math

import torch

from distrt.kernels._lazy_triton import jit_kernels

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_cos_sin_row', '_rotate_halves', '_rotate_heads', '_rotary_kernel')


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, computed exactly as transformers does."""
    assert head_dim % 2 == 0, head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default" if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise NotImplementedError(f"rope_scaling type {rope_type!r}")


def build_rope_cache(head_dim: int, max_position: int, base: float, rope_scaling: dict | None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_position, head_dim]: first half cos, second half sin."""
    inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3, (q.shape, k.shape)
    assert q.shape[0] == k.shape[0] == positions.shape[0], (q.shape, k.shape, positions.shape)
    assert q.shape[2] == k.shape[2] == cos_sin.shape[1], (q.shape, k.shape, cos_sin.shape)
    assert q.dtype == k.dtype, (q.dtype, k.dtype)
    assert positions.dim() == 1 and positions.dtype == torch.int64, (positions.shape, positions.dtype)
    assert q.device == k.device == positions.device == cos_sin.device


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D] -> rotated copies (fp32 math, input dtype out)."""
    _check(q, k, positions, cos_sin)
    half = q.shape[-1] // 2
    cs = cos_sin[positions].float()  # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, D/2]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


# triton.jit, applied by _jit()
def _cos_sin_row(cos_sin_ptr, pos, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin of position pos as fp32 [1, BLOCK_HALF] rows (padding lanes 0)."""
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    return cos, sin


# triton.jit, applied by _jit()
def _rotate_halves(x_ptr, row, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotated halves of the heads of one row (x_ptr + row), in fp32 math rounded to x's dtype, with
    the first half's pointers and the mask (rotary_kv.py writes them to the cache instead)."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HALF)
    ptr1 = x_ptr + row + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    x1f = x1.to(tl.float32)
    return (x1f * cos - x2 * sin).to(x1.dtype), (x2 * cos + x1f * sin).to(x1.dtype), ptr1, mask


# triton.jit, applied by _jit()
def _rotate_heads(x_ptr, t, stride_t, stride_h, cos, sin,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    r1, r2, ptr1, mask = _rotate_halves(x_ptr, t * stride_t, stride_h, cos, sin, NUM_HEADS, HALF, BLOCK_H,
                                        BLOCK_HALF)
    tl.store(ptr1, r1, mask=mask)
    tl.store(ptr1 + HALF, r2, mask=mask)


# triton.jit, applied by _jit()
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cs, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    cos, sin = _cos_sin_row(cos_sin_ptr, pos, stride_cs, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of apply_rotary_ref, IN PLACE: q and k are overwritten and returned.
    q/k may be strided views (e.g. of a fused qkv output) with a contiguous last dim."""
    _jit()
    _check(q, k, positions, cos_sin)
    assert q.stride(2) == 1 and k.stride(2) == 1, (q.stride(), k.stride())
    assert cos_sin.stride(1) == 1 and positions.is_contiguous()
    num_tokens, num_q_heads, head_dim = q.shape
    assert head_dim % 2 == 0, head_dim
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
    return q, k
