"""Tensor-parallel linear layers. Each sizes its own shard at construction and loads only its slice.

    ColumnParallelLinear   W [out, in] split by rows:    rank r holds W[r*out/tp : (r+1)*out/tp, :]
    RowParallelLinear      W [out, in] split by columns: rank r holds W[:, r*in/tp : (r+1)*in/tp]
                           (partial sums: the caller all-reduces, written out in the model's forward)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
import torch.nn.functional as F


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
        return F.linear(x, self.weight, self.bias)


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
        return F.linear(x, self.weight, bias)
