"""Communicator over mpi4py (CPU tensors), for runs under mpirun/srun.

Buffers are numpy views of contiguous CPU tensors, so nothing is pickled on the tensor path.
Data movement goes as MPI.BYTE (any dtype, bfloat16 included); sums of float16/bfloat16, which
MPI has no standard type for, are taken in float32 and rounded back.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from distrt.parallel.comm import Communicator, Shape, T, bytes_view, cat_rank_major, rank_major

if TYPE_CHECKING:
    from mpi4py import MPI

_UPCAST_FOR_SUM = (torch.float16, torch.bfloat16)


def _mpi() -> ModuleType:
    # Imported on first use: importing mpi4py.MPI initialises MPI, which a process that never uses
    # this backend (or one started without mpirun) should not pay for.
    from mpi4py import MPI

    return MPI


class MpiComm(Communicator):
    """An MPI intracommunicator; ``MpiComm.world()`` wraps COMM_WORLD, ``split`` makes the rest."""

    def __init__(self, comm: MPI.Comm, owned: bool) -> None:
        self._comm = comm
        self._owned = owned
        self._rank = int(comm.Get_rank())
        self._size = int(comm.Get_size())
        self._children: list[MpiComm] = []
        self._destroyed = False

    @classmethod
    def world(cls) -> MpiComm:
        return cls(_mpi().COMM_WORLD, owned=False)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        MPI = _mpi()
        self._check_tensor(t, "all_reduce input")
        if t.dtype in _UPCAST_FOR_SUM:
            acc = t.float().contiguous()
            self._comm.Allreduce(MPI.IN_PLACE, acc.numpy(), op=MPI.SUM)
            return acc.to(t.dtype)
        t = t.contiguous()
        self._comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        MPI = _mpi()
        self._check_tensor(t, "all_gather input")
        dim = self._split_dim(t, dim, "all_gather")
        t = t.contiguous()
        out = torch.empty((self._size, *t.shape), dtype=t.dtype)  # [ranks, *shape]
        self._comm.Allgather([bytes_view(t).numpy(), MPI.BYTE], [bytes_view(out).numpy(), MPI.BYTE])
        return cat_rank_major(out, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        MPI = _mpi()
        self._check_tensor(t, "reduce_scatter input")
        dim = self._split_dim(t, dim, "reduce_scatter")
        acc_dtype = torch.float32 if t.dtype in _UPCAST_FOR_SUM else t.dtype
        chunks = rank_major(t.to(acc_dtype), dim, self._size)  # [ranks, *chunk_shape]
        out = torch.empty(chunks.shape[1:], dtype=acc_dtype)
        self._comm.Reduce_scatter_block(chunks.numpy(), out.numpy(), op=MPI.SUM)
        return out.to(t.dtype)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        MPI = _mpi()
        self._check_tensor(t, "broadcast input")
        self._check_root(src)
        t = t.contiguous()
        self._comm.Bcast([bytes_view(t).numpy(), MPI.BYTE], root=src)
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        MPI = _mpi()
        self._check_tensor(t, "send input")
        self._check_peer(dst)
        self._comm.Send([bytes_view(t.contiguous()).numpy(), MPI.BYTE], dest=dst)

    def recv_into(self, out: torch.Tensor, src: int) -> torch.Tensor:
        MPI = _mpi()

        def receive(buf: torch.Tensor) -> None:
            status = MPI.Status()
            self._comm.Recv([bytes_view(buf).numpy(), MPI.BYTE], source=src, status=status)
            got = status.Get_count(MPI.BYTE)
            if got != buf.numel() * buf.element_size():
                raise RuntimeError(f"recv from {src}: expected {buf.numel() * buf.element_size()} bytes, got {got}")

        return self._recv_through(out, src, receive)

    def _all_to_all(
        self, inputs: list[torch.Tensor], recv_shapes: list[Shape], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        MPI = _mpi()
        itemsize = torch.empty((), dtype=dtype).element_size()
        send_counts = [t.numel() * itemsize for t in inputs]
        recv_counts = [int(torch.Size(s).numel()) * itemsize for s in recv_shapes]
        send = torch.cat([bytes_view(t) for t in inputs])
        recv = torch.empty(sum(recv_counts), dtype=torch.uint8)
        send_displs = [0, *accumulate(send_counts)][:-1]
        recv_displs = [0, *accumulate(recv_counts)][:-1]
        self._comm.Alltoallv(
            [send.numpy(), (send_counts, send_displs), MPI.BYTE],
            [recv.numpy(), (recv_counts, recv_displs), MPI.BYTE],
        )
        return [p.view(dtype).reshape(s) for p, s in zip(recv.split(recv_counts), recv_shapes, strict=True)]

    def barrier(self) -> None:
        self._comm.Barrier()

    def broadcast_object(self, obj: T, src: int) -> T:
        self._check_root(src)
        return self._comm.bcast(obj if self._rank == src else None, root=src)

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        index, position = self._group_position(groups)
        child = MpiComm(self._comm.Split(color=index, key=position), owned=True)
        self._children.append(child)
        return child

    def destroy(self) -> None:
        if not self._destroy_children():
            return
        if self._owned and not _mpi().Is_finalized():
            self._comm.Free()
        self._destroyed = True

    def __repr__(self) -> str:
        return f"MpiComm(rank={self._rank}, size={self._size})"
