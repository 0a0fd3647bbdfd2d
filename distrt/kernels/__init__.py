"""Kernels: Triton on CUDA tensors, the plain-torch reference beside each kernel otherwise.

The `*_op` functions are what layers call; they pick the implementation per call from the tensor's
device (`use_triton`); CPU attention takes attention_torch.py's SDPA path (the reference stays the
oracle). Triton is imported on first launch only (see _lazy_triton), so the package works without it
and the CPU path never imports it.
DISTRT_FORCE_TRITON=1 routes CPU tensors to Triton too (tests under TRITON_INTERPRET=1).
The KV cache may be float8 e4m3 instead of the model dtype (kv_cache.py); k_scale/v_scale are its
per-tensor dequantization scales (1.0 unless calibrated scales are loaded; ignored for other caches).
"""

from __future__ import annotations

import os

import torch

from distrt.kernels._lazy_triton import triton_available
from distrt.kernels.activation import silu_and_mul, silu_and_mul_ref
from distrt.kernels.attention_torch import paged_attention_torch
from distrt.kernels.kv_cache import write_kv_cache, write_kv_cache_ref
from distrt.kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from distrt.kernels.paged_attention import paged_attention_decode, paged_attention_prefill, paged_attention_ref
from distrt.kernels.rotary import apply_rotary, apply_rotary_ref, build_rope_cache
from distrt.kernels.rotary_kv import rotary_write_kv, rotary_write_kv_ref
from distrt.kernels.fused_moe import fused_moe_op, fused_moe_ref  # noqa: E402,F401

__all__ = [
    "use_triton", "write_kv_cache_op", "attention_op", "rms_norm_op", "fused_add_rms_norm_op",
    "apply_rotary_op", "rotary_write_kv_op", "silu_and_mul_op", "build_rope_cache", "fused_moe_op",
]


def use_triton(t: torch.Tensor) -> bool:
    """True when t lives on CUDA and triton imports, or DISTRT_FORCE_TRITON=1 (interpreter tests)."""
    wanted = t.is_cuda or os.environ.get("DISTRT_FORCE_TRITON", "0") == "1"
    return wanted and triton_available()  # find_spec only: the CPU path never imports triton


def write_kv_cache_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    if use_triton(k):
        write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                 is_decode_only: bool, k_scale: float = 1.0, v_scale: float = 1.0,
                 plan_cache: dict | None = None) -> torch.Tensor:  # type: ignore[type-arg]
    """q: [T, H, D] -> [T, H, D]. is_decode_only: every sequence has exactly one query token (T == B).
    plan_cache: a dict living as long as the step's metadata (the CPU path keeps its gather plan there).

    A mixed batch (prompt chunks and decodes) goes to the prefill kernel whole: its programs for the
    decode rows (memory-bound) run beside those of the prompt rows (compute-bound) in one launch.
    Sending the decode rows to the decode kernel instead, before the prefill kernel or beside it on a
    second stream, made mixed steps 1.2-1.5x slower on an H100 (benchmarks/results/h100/mixed_split_ab.json)."""
    if not use_triton(q):
        return paged_attention_torch(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                     k_scale, v_scale, plan_cache=plan_cache)
    if is_decode_only:
        return paged_attention_decode(q, k_cache, v_cache, seq_lens, block_tables, scale,
                                      k_scale=k_scale, v_scale=v_scale)
    return paged_attention_prefill(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                   max_query_len, k_scale=k_scale, v_scale=v_scale)


def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); inputs are not modified."""
    if use_triton(x):
        return fused_add_rms_norm(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def apply_rotary_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated (q, k). The Triton path rotates in place and returns the same tensors: callers
    must use the return values and not rely on the inputs being left untouched (or being modified)."""
    if use_triton(q):
        return apply_rotary(q, k, positions, cos_sin)
    return apply_rotary_ref(q, k, positions, cos_sin)


def rotary_write_kv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """apply_rotary_op then write_kv_cache_op (of the rotated k) in one kernel; returns rotated q.
    The cache gets the rotated k; k and v are left as they are. The Triton path rotates q in place and
    returns it, the reference returns a copy: callers must use the return value, as with apply_rotary_op."""
    if use_triton(q):
        return rotary_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return rotary_write_kv_ref(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return silu_and_mul(x)
    return silu_and_mul_ref(x)
