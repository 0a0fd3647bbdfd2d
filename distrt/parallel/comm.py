"""The Communicator interface shared by the NCCL, gloo and MPI backends, and the size-1 one.

Ranks are group ranks ``0..size-1`` of the communicator. Every collective must be entered by all
ranks of the group in the same order. Results are returned; an input tensor may be overwritten in
place (all_reduce, broadcast, recv), so callers always use the return value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Shape = tuple[int, ...]
T = TypeVar("T")

# Fixed-width shape records let all_to_all exchange shapes with one all_gather even when the
# sender's tensors have more dims than the receiver expects.
_MAX_NDIM = 8


class Communicator(ABC):
    """Collectives on torch tensors over one fixed group of processes."""

    # set by backends that split into sub-communicators (see _destroy_children)
    _children: list[Communicator]
    _destroyed: bool

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where this backend's tensors live (cpu for gloo/MPI, cuda:N for NCCL)."""

    @abstractmethod
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks."""

    @abstractmethod
    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``t`` (same shape everywhere) concatenated along ``dim`` in rank order."""

    @abstractmethod
    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, then rank r keeps chunk r of ``size`` equal chunks along ``dim``."""

    @abstractmethod
    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """``src``'s tensor on every rank; others pass a tensor of the same shape and dtype."""

    @abstractmethod
    def send(self, t: torch.Tensor, dst: int) -> None:
        """Blocking point-to-point send; pair it with ``recv`` on ``dst`` in an order that cannot
        deadlock (a send may wait for its receive to be posted)."""

    @abstractmethod
    def recv_into(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Receives ``src``'s send into ``out`` (its shape and dtype must match) and returns it."""

    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        return self.recv_into(torch.empty(tuple(shape), dtype=dtype, device=self.device), src)

    def all_to_all(
        self, inputs: Sequence[torch.Tensor], recv_shapes: Sequence[Sequence[int]] | None = None
    ) -> list[torch.Tensor]:
        """Rank i sends ``inputs[j]`` to rank j and returns what it got, indexed by source rank.

        Shapes may differ per pair. Without ``recv_shapes`` the shapes are exchanged first (one
        extra all_gather and a host sync, so not capturable in a CUDA graph); pass them when known.
        All inputs share one dtype, which the received tensors take.
        """
        if len(inputs) != self.size:
            raise ValueError(f"all_to_all needs {self.size} inputs (one per rank), got {len(inputs)}")
        dtype = inputs[0].dtype
        for i, t in enumerate(inputs):
            self._check_tensor(t, f"all_to_all input {i}")
            if t.dtype != dtype:
                raise ValueError(f"all_to_all inputs share one dtype: input 0 is {dtype}, input {i} is {t.dtype}")
        if recv_shapes is None:
            shapes = self._exchange_shapes(inputs)
        else:
            if len(recv_shapes) != self.size:
                raise ValueError(f"all_to_all needs {self.size} recv_shapes, got {len(recv_shapes)}")
            shapes = [tuple(int(d) for d in s) for s in recv_shapes]
        if tuple(inputs[self.rank].shape) != shapes[self.rank]:
            raise ValueError(
                f"rank {self.rank} sends itself {tuple(inputs[self.rank].shape)} but expects {shapes[self.rank]}"
            )
        return self._all_to_all([t.contiguous() for t in inputs], shapes, dtype)

    @abstractmethod
    def _all_to_all(
        self, inputs: list[torch.Tensor], recv_shapes: list[Shape], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Backend part of all_to_all: inputs are contiguous, validated, and shapes are known."""

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def broadcast_object(self, obj: T, src: int) -> T:
        """A small picklable object from ``src`` to every rank (others pass anything, e.g. None)."""

    @abstractmethod
    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        """Collective: every rank passes the same partition of ``range(size)`` into groups, each
        listed in ascending order (e.g. ``ParallelLayout.tp_groups()``), and gets the communicator
        of the group that holds it; its group rank is its position in that listing."""

    @abstractmethod
    def destroy(self) -> None:
        """Releases the backend's resources (idempotent); sub-communicators from ``split`` first."""

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _recv_through(self, out: torch.Tensor, src: int,
                      receive: Callable[[torch.Tensor], object]) -> torch.Tensor:
        """recv_into's common part: checks, then `receive` fills a contiguous buffer (out itself when
        contiguous, else a copy-back temporary)."""
        self._check_tensor(out, "recv output")
        self._check_peer(src)
        buf = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
        receive(buf)
        if buf is not out:
            out.copy_(buf)
        return out

    def _destroy_children(self) -> bool:
        """destroy()'s common start for backends that split (they set `_children` and `_destroyed`):
        False when already destroyed; else destroys the sub-communicators, newest first, and returns True."""
        if self._destroyed:
            return False
        for child in reversed(self._children):
            child.destroy()
        self._children.clear()
        return True

    def _check_tensor(self, t: torch.Tensor, what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{what} is on {t.device}, this communicator works on {self.device}")

    def _check_root(self, src: int) -> None:
        if not 0 <= src < self.size:
            raise ValueError(f"root rank {src} outside [0, {self.size})")

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size:
            raise ValueError(f"peer rank {peer} outside [0, {self.size})")
        if peer == self.rank:
            raise ValueError(f"rank {self.rank} cannot send to or receive from itself")

    def _split_dim(self, t: torch.Tensor, dim: int, what: str) -> int:
        if t.dim() == 0:
            raise ValueError(f"{what} needs a tensor with at least one dim")
        dim = dim % t.dim()
        if what == "reduce_scatter" and t.shape[dim] % self.size != 0:
            raise ValueError(f"reduce_scatter: dim {dim} of {tuple(t.shape)} is not divisible by {self.size} ranks")
        return dim

    def _group_position(self, groups: Sequence[Sequence[int]]) -> tuple[int, int]:
        """(index of the group holding this rank, this rank's position in it), checking that
        ``groups`` partitions ``range(size)``."""
        seen: list[int] = [r for g in groups for r in g]
        if sorted(seen) != list(range(self.size)):
            raise ValueError(f"groups {groups} must partition ranks 0..{self.size - 1}, each exactly once")
        # torch.distributed numbers a new group's ranks in ascending order whatever the listing;
        # requiring that order keeps "group rank == position" true on every backend.
        for g in groups:
            if list(g) != sorted(g):
                raise ValueError(f"group {list(g)} must list its ranks in ascending order")
        for gi, g in enumerate(groups):
            if self.rank in g:
                return gi, list(g).index(self.rank)
        raise AssertionError("unreachable: the partition covers every rank")

    def _exchange_shapes(self, inputs: Sequence[torch.Tensor]) -> list[Shape]:
        records = torch.full((self.size, _MAX_NDIM + 1), -1, dtype=torch.int64)  # [dst, ndim + dims]
        for j, t in enumerate(inputs):
            if t.dim() > _MAX_NDIM:
                raise ValueError(f"all_to_all supports up to {_MAX_NDIM} dims, input {j} has {t.dim()}")
            records[j, 0] = t.dim()
            records[j, 1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        gathered = self.all_gather(records.to(self.device).unsqueeze(0)).cpu()  # [src, dst, ndim + dims]
        mine = gathered[:, self.rank].tolist()
        return [tuple(rec[1 : 1 + rec[0]]) for rec in mine]


def rank_major(t: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """``t`` split into ``parts`` chunks along ``dim``, chunks stacked first and contiguous:
    [parts, *chunk_shape], the layout flat reduce-scatter primitives expect."""
    chunk = t.shape[dim] // parts
    return t.unflatten(dim, (parts, chunk)).movedim(dim, 0).contiguous()


def cat_rank_major(stacked: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of gathering into [ranks, *shape]: concatenation along ``dim`` in rank order."""
    if dim == 0:
        return stacked.flatten(0, 1)
    return torch.cat(stacked.unbind(0), dim=dim)


def bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor sharing its memory."""
    if not t.is_contiguous():
        raise ValueError("bytes_view needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


class SingleRankComm(Communicator):
    """The communicator of a group of one: every collective is the identity."""

    def __init__(self, device: torch.device | int | str = "cpu") -> None:
        self._device = torch.device(device)

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        return self._device

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._check_tensor(t, "all_reduce input")
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_tensor(t, "all_gather input")
        self._split_dim(t, dim, "all_gather")
        return t

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_tensor(t, "reduce_scatter input")
        self._split_dim(t, dim, "reduce_scatter")
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_tensor(t, "broadcast input")
        self._check_root(src)
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_peer(dst)

    def recv_into(self, out: torch.Tensor, src: int) -> torch.Tensor:
        self._check_peer(src)
        return out

    def _all_to_all(
        self, inputs: list[torch.Tensor], recv_shapes: list[Shape], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        return list(inputs)

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: T, src: int) -> T:
        self._check_root(src)
        return obj

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        self._group_position(groups)
        return self

    def destroy(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"SingleRankComm(device={self._device})"

