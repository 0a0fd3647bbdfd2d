"""Kernels: Triton on CUDA tensors, the plain-torch reference beside each kernel otherwise.

The `*_op` functions are what layers call; they pick the implementation per call from the tensor's
device (`use_triton`). Triton is imported on first launch only (see _lazy_triton), so the package
works without it and the CPU path never imports it.
DISTRT_FORCE_TRITON=1 routes CPU tensors to Triton too (tests under TRITON_INTERPRET=1).
The KV cache may be float8 e4m3 instead of the model dtype (kv_cache.py); k_scale/v_scale are its
per-tensor dequantization scales (1.0 unless calibrated scales are loaded; ignored for other caches).
"""

from __future__ import annotations

import os

import torch

from distrt.kernels._lazy_triton import triton_available
from distrt.kernels.activation import silu_and_mul, silu_and_mul_ref
from distrt.kernels.kv_cache import write_kv_cache, write_kv_cache_ref
from distrt.kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from distrt.kernels.paged_attention import paged_attention_decode, paged_attention_prefill, paged_attention_ref
from distrt.kernels.rotary import apply_rotary, apply_rotary_ref, build_rope_cache
from distrt.kernels.fused_moe import fused_moe_op, fused_moe_ref  # noqa: E402,F401

__all__ = [
    "use_triton", "write_kv_cache_op", "attention_op", "rms_norm_op", "fused_add_rms_norm_op",
    "apply_rotary_op", "silu_and_mul_op", "build_rope_cache", "fused_moe_op",
]


# DISTRT_SPLIT_MIXED_DECODE=1 runs a mixed batch's leading decode rows through the decode kernel on a
# side stream, concurrently with the prefill kernel over the rest (A/B runs; see attention_op)
_SPLIT_MIXED_DECODE = os.environ.get("DISTRT_SPLIT_MIXED_DECODE", "0") == "1"
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


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


_force_split = False  # tests: exercise the split path on CPU (interpreter) without the env variable


class _no_stream:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                 is_decode_only: bool, k_scale: float = 1.0, v_scale: float = 1.0, num_decode_rows: int = 0,
                 tail_query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]. is_decode_only: every sequence has exactly one query token (T == B).

    A mixed batch may say its first `num_decode_rows` rows have one query token each. By default the
    prefill kernel takes every row: its programs for decode rows (memory-bound) run beside those of
    the prompt rows (compute-bound) in one launch. Run one after the other, decode kernel then prefill
    kernel, mixed steps took 1.2-1.4x longer on an H100 (1000/1000 runs, benchmarks/results/h100/
    mixed_split_ab.json). With DISTRT_SPLIT_MIXED_DECODE=1 the decode rows go to the decode kernel on a
    side stream, concurrently with the prefill kernel over the rest. `tail_query_start_loc` is the
    rest's query_start_loc, starting at 0 (made on the host, so no device arithmetic or sync here)."""
    if not use_triton(q):
        return paged_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                   k_scale, v_scale)
    if is_decode_only:
        return paged_attention_decode(q, k_cache, v_cache, seq_lens, block_tables, scale,
                                      k_scale=k_scale, v_scale=v_scale)
    nd = num_decode_rows
    if (_SPLIT_MIXED_DECODE or _force_split) and nd > 0 and tail_query_start_loc is not None and nd < seq_lens.shape[0]:
        out = torch.empty_like(q)
        side = _side_stream(q.device) if q.is_cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(q.device))  # q and this layer's KV writes are queued
        with torch.cuda.stream(side) if side is not None else _no_stream():
            paged_attention_decode(q[:nd], k_cache, v_cache, seq_lens[:nd], block_tables[:nd], scale,
                                   out=out[:nd], k_scale=k_scale, v_scale=v_scale)
        paged_attention_prefill(q[nd:], k_cache, v_cache, tail_query_start_loc, seq_lens[nd:], block_tables[nd:],
                                scale, max_query_len, out=out[nd:], k_scale=k_scale, v_scale=v_scale)
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)  # out, q and the inputs outlive the side work
        return out
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


def silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return silu_and_mul(x)
    return silu_and_mul_ref(x)
