"""Tensor-parallel linear layers. Each sizes its own shard at construction and loads only its slice.

    ColumnParallelLinear   W [out, in] split by rows:    rank r holds W[r*out/tp : (r+1)*out/tp, :]
    RowParallelLinear      W [out, in] split by columns: rank r holds W[:, r*in/tp : (r+1)*in/tp]
                           (partial sums: the caller all-reduces, written out in the model's forward)

Decode-sized inputs (M <= SKINNY_MAX_M rows) go to the Triton skinny GEMV (distrt/kernels/gemv.py)
instead of cuBLAS on CUDA fp16/bf16: on an H100 it is 1.00-1.12x cuBLAS per projection at the 8B
shapes (benchmarks/gemv_probe.py) and cut the engine's batch-1 step from 6.35 to 5.95 ms (same run,
results/h100/latency_bs1_skinny_{off,on}.json). DISTRT_SKINNY_GEMV=0 / 1 forces it off / on (on also
routes CPU tensors under DISTRT_FORCE_TRITON, for the interpreter tests). MergedColumnParallelLinear.
forward_silu gives the MLP silu(gate) * up, fused into the gate_up GEMV when that path is taken.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from distrt.kernels import silu_and_mul_op, use_triton

SKINNY_MAX_M = 16  # rows up to which the skinny GEMV replaces F.linear (the kernel's own limit too)
SKINNY_DEFAULT = True  # on CUDA, without DISTRT_SKINNY_GEMV set (CPU: only when it is set to 1)


def skinny_enabled(x: torch.Tensor) -> bool:
    env = os.environ.get("DISTRT_SKINNY_GEMV", "")
    return (SKINNY_DEFAULT and x.is_cuda) if env == "" else env == "1"


def _skinny_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CUDA fp16/bf16 (or, under DISTRT_FORCE_TRITON on CPU, also fp32) with 1..SKINNY_MAX_M rows.
    Decided from shapes and dtypes only, so the choice is fixed per captured CUDA-graph batch size."""
    if not skinny_enabled(x) or x.dim() < 2 or x.dtype != weight.dtype or weight.stride(-1) != 1:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 1 <= rows <= SKINNY_MAX_M or not use_triton(x):
        return False
    return x.dtype in (torch.float16, torch.bfloat16) or (not x.is_cuda and x.dtype == torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the skinny GEMV for decode-sized inputs (see the module docstring)."""
    if _skinny_eligible(x, weight):
        from distrt.kernels.gemv import skinny_linear

        out = skinny_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def narrow(t: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Slice a loaded tensor, or read only the slice from a lazy checkpoint handle."""
    if hasattr(t, "load_slice"):
        return t.load_slice(dim, start, start + length)
    return t.narrow(dim, start, length)


def materialize(t: Any) -> torch.Tensor:
    return t.load() if hasattr(t, "load") else t


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


def _check_divisible(what: str, n: int, tp_size: int) -> None:
    if n % tp_size:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({tp_size})")


def _copy(param: nn.Parameter, src: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(src.shape):
        raise ValueError(f"weight {name}: checkpoint shape {tuple(src.shape)} does not match model shape {tuple(param.shape)}")
    param.data.copy_(src)


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp_rank: int, tp_size: int,
                 dtype: torch.dtype, name: str = "linear") -> None:
        super().__init__()
        _check_divisible(f"{name} output features", out_features, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.out_per_rank = out_features // tp_size
        self.weight = _param((self.out_per_rank, in_features), dtype)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.bias = _param((self.out_per_rank,), dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        n = param.shape[0]
        _copy(param, narrow(loaded, 0, self.tp_rank * n, n), "column-parallel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (gate|up); each rank holds its slice of each."""

    def __init__(self, in_features: int, out_sizes: list[int], *, bias: bool, tp_rank: int, tp_size: int,
                 dtype: torch.dtype, name: str = "merged") -> None:
        for s in out_sizes:
            _check_divisible(f"{name} output features", s, tp_size)
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias=bias, tp_rank=tp_rank, tp_size=tp_size, dtype=dtype, name=name)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int)
        size = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        src = narrow(loaded, 0, self.tp_rank * size, size)
        _copy(param.data.narrow(0, offset, size), src, f"merged shard {shard_id}")  # type: ignore[arg-type]

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a [gate, up] pair of equal sizes: [..., in] -> [..., out_per_rank / 2].
        The skinny path fuses the activation into the GEMV (no [M, 2I] intermediate; the projection
        is then not rounded to x.dtype before the silu); otherwise linear + silu_and_mul_op."""
        assert len(self.out_sizes) == 2 and self.out_sizes[0] == self.out_sizes[1], self.out_sizes
        if _skinny_eligible(x, self.weight):
            from distrt.kernels.gemv import skinny_gate_up_silu

            out = skinny_gate_up_silu(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
            return out.view(*x.shape[:-1], self.out_per_rank // 2)
        gate_up = F.linear(x, self.weight, self.bias)
        return silu_and_mul_op(gate_up.reshape(-1, gate_up.shape[-1])).view(*x.shape[:-1], self.out_per_rank // 2)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused. Query heads are split over ranks; KV heads are split when
    tp <= num_kv_heads, else each rank holds one KV head replicated tp / num_kv_heads times."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool,
                 tp_rank: int, tp_size: int, dtype: torch.dtype) -> None:
        if num_heads % tp_size:
            raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by tensor_parallel_size ({tp_size})")
        if num_kv_heads >= tp_size and num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) is not divisible by tensor_parallel_size ({tp_size})")
        if num_kv_heads < tp_size and tp_size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({tp_size}) is not a multiple of num_key_value_heads ({num_kv_heads})")
        self.head_dim = head_dim
        self.q_heads = num_heads // tp_size
        self.kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        out = (self.q_heads + 2 * self.kv_heads) * head_dim
        super().__init__(hidden, out * tp_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size, dtype=dtype, name="qkv")
        self.q_size = self.q_heads * head_dim
        self.kv_size = self.kv_heads * head_dim

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, start = self.kv_size, (self.tp_rank // self.kv_replicas) * self.kv_size
        _copy(param.data.narrow(0, offset, size), narrow(loaded, 0, start, size), f"qkv shard {shard_id}")  # type: ignore[arg-type]


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp_rank: int, tp_size: int,
                 dtype: torch.dtype, name: str = "linear") -> None:
        super().__init__()
        _check_divisible(f"{name} input features", in_features, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_per_rank = in_features // tp_size
        self.weight = _param((out_features, self.in_per_rank), dtype)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.bias = _param((out_features,), dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._bias_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        n = param.shape[1]
        _copy(param, narrow(loaded, 1, self.tp_rank * n, n), "row-parallel")

    def _bias_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        _copy(param, materialize(loaded), "row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sums; the bias is added on rank 0 only so the all-reduce adds it once."""
        bias = self.bias if self.tp_rank == 0 else None
        return linear(x, self.weight, bias)
