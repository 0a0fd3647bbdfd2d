"""The TP communicator with all-reduces through the one-shot IPC kernel (custom_allreduce.py).

Inside CUDA graphs on 2 H200s (benchmarks/results/h200x2/custom_allreduce_large.json): 8 KB 4.0 us
against NCCL's 17.8, 4 MB (a 512-sequence decode step) 18.0 against 43.7, 16 MB 59 against 97. With
2 ranks every message the buffer holds goes through it; with more only small (decode) ones, since a
one-shot then moves more than a ring. Unsupported tensors (odd sizes, other dtypes) go to the
wrapped communicator, as does every other collective. Workers use it
when every GPU of the TP group is visible to every rank of it (MPI workers; Ray actors, whose
CUDA_VISIBLE_DEVICES the Ray executor widens to their node's workers' GPUs, own GPU first), unless
`custom_all_reduce=False`.
"""

from __future__ import annotations

from typing import Any

import torch


class FastAllReduceComm:
    def __init__(self, comm: Any, ipc: Any, norm: Any = None) -> None:
        self.comm = comm
        self.ipc = ipc
        self.norm = norm  # IpcAllReduceNorm (its own IPC buffers) or None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.ipc.all_reduce(t)  # falls back to self.comm when the kernel does not apply

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(all_reduce(x) + residual) * weight, all_reduce(x) + residual): one kernel when the
        row-mode IPC kernel takes x, else the all-reduce then the fused add + norm kernel (same bits)."""
        if self.norm is not None and self.norm.supports(x, residual):
            return self.norm.all_reduce_add_rms_norm(x, residual, weight, eps)
        from distrt.kernels import fused_add_rms_norm_op

        return fused_add_rms_norm_op(self.all_reduce(x), residual, weight, eps)

    def close_fast_path(self) -> None:
        """Collective over the group; after the CUDA graphs that captured it are gone."""
        if self.norm is not None:
            self.norm.close()
        self.ipc.close()

    def destroy(self) -> None:
        self.close_fast_path()
        self.comm.destroy()

    def __getattr__(self, name: str) -> Any:  # rank, size, device, broadcast, all_gather, ...
        return getattr(self.comm, name)
