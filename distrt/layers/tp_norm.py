"""The RMSNorm after a tensor-parallel all-reduce, in one call: the comm's fused kernel when it has
one (FastAllReduceComm over IPC buffers: parallel/ipc_allreduce_norm.py), else all-reduce then norm.
Both give the same bits: the fused kernel rounds the sum to the dtype before adding the residual,
exactly as the all-reduce result would be."""

from __future__ import annotations

from typing import Any

import torch

from distrt.layers.norm import RMSNorm


def all_reduce_then_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
                         comm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """norm(all_reduce(x), residual) -> (normed, residual to carry). comm None: x is already reduced."""
    if comm is None:
        return norm(x, residual)
    fused = getattr(comm, "all_reduce_add_rms_norm", None)
    if fused is not None and residual is not None:
        return fused(x, residual, norm.weight, norm.eps)
    return norm(comm.all_reduce(x), residual)
