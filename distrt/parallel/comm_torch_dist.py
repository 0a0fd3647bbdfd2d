"""Communicator over torch.distributed's gloo backend (CPU): the backend of the CPU test suite."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distrt.parallel.comm import (
    Communicator,
    Shape,
    SingleRankComm,
    T,
    bytes_view,
    cat_rank_major,
    rank_major,
)

# torch 2.13 renamed the flat-buffer collectives and deprecated the old names; 2.4 has only those.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now; another process may still take it before rendezvous,
    which is why ``file_init_method`` exists for single-host use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_init_method(host: str = "127.0.0.1", port: int | None = None) -> str:
    return f"tcp://{host}:{find_free_port(host) if port is None else port}"


def file_init_method(path: str | Path) -> str:
    """A rendezvous through a file that must not exist yet (on a filesystem all ranks share)."""
    path = Path(path).resolve()
    if path.exists():
        raise ValueError(f"rendezvous file {path} already exists; a stale one would mix two runs")
    return path.as_uri()


class TorchDistComm(Communicator):
    """A torch.distributed process group; the world one owns the default group."""

    def __init__(self, group: dist.ProcessGroup | None, global_ranks: Sequence[int], rank: int) -> None:
        self._group = group
        self._global_ranks = tuple(global_ranks)
        self._rank = rank
        self._children: list[Communicator] = []
        self._destroyed = False

    @classmethod
    def create(
        cls, rank: int, world_size: int, init_method: str, timeout: timedelta = timedelta(minutes=5)
    ) -> TorchDistComm:
        """Joins the world group; blocks until all ``world_size`` ranks have joined or ``timeout``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process")
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        return cls(group=None, global_ranks=range(world_size), rank=rank)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return len(self._global_ranks)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _g(self, group_rank: int) -> int:
        return self._global_ranks[group_rank]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._check_tensor(t, "all_reduce input")
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_tensor(t, "all_gather input")
        dim = self._split_dim(t, dim, "all_gather")
        t = t.contiguous()
        out = torch.empty((self.size, *t.shape), dtype=t.dtype)  # [ranks, *shape]
        _all_gather_flat(out.view(-1), t.view(-1), group=self._group)
        return cat_rank_major(out, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_tensor(t, "reduce_scatter input")
        dim = self._split_dim(t, dim, "reduce_scatter")
        chunks = rank_major(t, dim, self.size)  # [ranks, *chunk_shape]
        out = torch.empty(chunks.shape[1:], dtype=t.dtype)
        _reduce_scatter_flat(out.view(-1), chunks.view(-1), op=dist.ReduceOp.SUM, group=self._group)
        return out

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_tensor(t, "broadcast input")
        self._check_root(src)
        t = t.contiguous()
        dist.broadcast(t, src=self._g(src), group=self._group)
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_tensor(t, "send input")
        self._check_peer(dst)
        dist.send(t.contiguous(), dst=self._g(dst), group=self._group)

    def recv_into(self, out: torch.Tensor, src: int) -> torch.Tensor:
        return self._recv_through(out, src, lambda buf: dist.recv(buf, src=self._g(src), group=self._group))

    def _all_to_all(
        self, inputs: list[torch.Tensor], recv_shapes: list[Shape], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        # Bytes, so every dtype and every per-pair shape goes through one all_to_all_single.
        send_bytes = [bytes_view(t) for t in inputs]
        itemsize = torch.empty((), dtype=dtype).element_size()
        recv_numels = [int(torch.Size(s).numel()) for s in recv_shapes]
        out = torch.empty(sum(recv_numels) * itemsize, dtype=torch.uint8)
        dist.all_to_all_single(
            out,
            torch.cat(send_bytes),
            output_split_sizes=[n * itemsize for n in recv_numels],
            input_split_sizes=[b.numel() for b in send_bytes],
            group=self._group,
        )
        pieces = out.split([n * itemsize for n in recv_numels])
        return [p.view(dtype).reshape(s) for p, s in zip(pieces, recv_shapes, strict=True)]

    def barrier(self) -> None:
        dist.barrier(group=self._group)

    def broadcast_object(self, obj: T, src: int) -> T:
        self._check_root(src)
        box: list[object] = [obj if self._rank == src else None]
        dist.broadcast_object_list(box, src=self._g(src), group=self._group)
        return box[0]  # type: ignore[return-value]

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        index, position = self._group_position(groups)
        mine: Communicator | None = None
        for gi, members in enumerate(groups):
            if len(members) == 1:
                # A group of one needs no process group; every rank skips the same ones, so the
                # new_group calls stay matched across ranks.
                if gi == index:
                    mine = SingleRankComm()
                continue
            global_members = [self._g(r) for r in members]
            pg = dist.new_group(ranks=global_members, backend="gloo")
            if gi == index:
                mine = TorchDistComm(group=pg, global_ranks=global_members, rank=position)
        assert mine is not None
        self._children.append(mine)
        return mine

    def destroy(self) -> None:
        if not self._destroy_children():
            return
        if self._group is None:
            if dist.is_initialized():
                dist.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._destroyed = True

    def __repr__(self) -> str:
        return f"TorchDistComm(rank={self._rank}, size={self.size}, global_ranks={self._global_ranks})"
