"""Communicator over NCCL through ``cupy.cuda.nccl`` (GPU): the production path.

Every operation is enqueued on torch's current stream of the communicator's device, so it orders
with the torch kernels around it and can be captured in a CUDA graph. Not capturable (they sync
the host): ``all_to_all`` without ``recv_shapes``, ``broadcast_object``, ``barrier``, ``split``.

The unique id is made once (``nccl_unique_id()`` on one rank) and carried to the others by the
executor (a Ray object, an MPI bcast, ``Communicator.broadcast_object``) as 128 bytes.
"""

from __future__ import annotations

import atexit
import pickle
import threading
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from distrt.parallel.comm import Communicator, Shape, SingleRankComm, T, bytes_view, cat_rank_major, rank_major

UNIQUE_ID_BYTES = 128

# ncclDataType_t / ncclRedOp_t values from nccl.h, used where cupy lacks the constant (older cupy
# has no NCCL_BFLOAT16; the type exists since NCCL 2.10).
_NCCL_TYPE_CODES: dict[torch.dtype, tuple[str, int]] = {
    torch.int8: ("NCCL_INT8", 0),
    torch.uint8: ("NCCL_UINT8", 1),
    torch.int32: ("NCCL_INT32", 2),
    torch.int64: ("NCCL_INT64", 4),
    torch.float16: ("NCCL_FLOAT16", 6),
    torch.float32: ("NCCL_FLOAT32", 7),
    torch.float64: ("NCCL_FLOAT64", 8),
    torch.bfloat16: ("NCCL_BFLOAT16", 9),
}
_NCCL_SUM = ("NCCL_SUM", 0)


def _nccl() -> ModuleType:
    # Imported on first use so this module (and everything importing it) loads without cupy.
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError("the nccl backend needs cupy with NCCL (pip install cupy-cuda12x or cupy-cuda13x)") from e
    if not getattr(nccl, "available", True):
        raise ImportError("cupy was built without NCCL")
    return nccl


def _const(nccl: ModuleType, name_and_value: tuple[str, int]) -> int:
    name, value = name_and_value
    return int(getattr(nccl, name, value))


def _type_code(nccl: ModuleType, dtype: torch.dtype) -> int:
    if dtype not in _NCCL_TYPE_CODES:
        raise ValueError(f"NCCL reductions support {sorted(str(d) for d in _NCCL_TYPE_CODES)}, not {dtype}")
    return _const(nccl, _NCCL_TYPE_CODES[dtype])


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id as bytes. The calling process hosts NCCL's bootstrap root for it,
    so it must stay alive until every rank has constructed its NcclComm."""
    uid = _nccl().get_unique_id()
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid)
    return bytes(b & 0xFF for b in uid)  # cupy < 14: a tuple of C chars


def _init_communicator(nccl: ModuleType, world_size: int, unique_id: bytes, rank: int) -> Any:
    if len(unique_id) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
    try:
        return nccl.NcclCommunicator(world_size, unique_id, rank)
    except TypeError:
        pass  # raised by the argument check, before NCCL is called: cupy < 14 wants a tuple
    # ... of C chars: signed on x86-64, unsigned on aarch64. Converting an out-of-range value
    # raises OverflowError, again before NCCL is called, so try signed first.
    signed = tuple(b - 256 if b > 127 else b for b in unique_id)
    try:
        return nccl.NcclCommunicator(world_size, signed, rank)
    except OverflowError:
        return nccl.NcclCommunicator(world_size, tuple(unique_id), rank)


def _cuda_device(device: torch.device | int | str) -> torch.device:
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"NcclComm needs a cuda device, got {dev}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


_live: list[weakref.ref[NcclComm]] = []
_live_lock = threading.Lock()
_atexit_registered = False


def _destroy_live_at_exit() -> None:
    # A process exiting with a live NCCL communicator has hung in interpreter teardown, where
    # cupy's __dealloc__ destroys it with CUDA half gone; destroy them while everything is up.
    # (Not reproduced with cupy 14.2 / NCCL 2.28 on H200, where exit was clean either way.)
    with _live_lock:
        refs = list(reversed(_live))
        _live.clear()
    for ref in refs:
        comm = ref()
        if comm is None:
            continue
        try:
            comm.destroy()
        except Exception:
            comm.abort()


def _track(comm: NcclComm) -> None:
    global _atexit_registered
    with _live_lock:
        _live.append(weakref.ref(comm))
        if not _atexit_registered:
            atexit.register(_destroy_live_at_exit)
            _atexit_registered = True


class NcclComm(Communicator):
    """One rank of an NCCL communicator on one GPU.

    The constructor is collective: it returns once all ``world_size`` ranks have constructed
    theirs with the same ``unique_id``, so executors construct on every rank concurrently.
    """

    def __init__(self, world_size: int, unique_id: bytes, rank: int, device: torch.device | int | str) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if not isinstance(unique_id, (bytes, bytearray)):
            raise TypeError(f"unique_id must be bytes (see nccl_unique_id()), got {type(unique_id).__name__}")
        self._nccl = _nccl()
        import cupy

        self._device = _cuda_device(device)
        self._rank = rank
        self._size = world_size
        self._children: list[Communicator] = []
        self._destroyed = False
        # ncclCommInitRank binds the communicator to the current device.
        with cupy.cuda.Device(self._device.index):
            self._comm = _init_communicator(self._nccl, world_size, bytes(unique_id), rank)
        self._u8 = _type_code(self._nccl, torch.uint8)
        self._sum = _const(self._nccl, _NCCL_SUM)
        _track(self)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self._device).cuda_stream)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._check_tensor(t, "all_reduce input")
        code = _type_code(self._nccl, t.dtype)
        t = t.contiguous()
        self._comm.allReduce(t.data_ptr(), t.data_ptr(), t.numel(), code, self._sum, self._stream())
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_tensor(t, "all_gather input")
        dim = self._split_dim(t, dim, "all_gather")
        t = t.contiguous()
        out = torch.empty((self._size, *t.shape), dtype=t.dtype, device=self._device)  # [ranks, *shape]
        nbytes = t.numel() * t.element_size()
        self._comm.allGather(t.data_ptr(), out.data_ptr(), nbytes, self._u8, self._stream())
        return cat_rank_major(out, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_tensor(t, "reduce_scatter input")
        dim = self._split_dim(t, dim, "reduce_scatter")
        code = _type_code(self._nccl, t.dtype)
        chunks = rank_major(t, dim, self._size)  # [ranks, *chunk_shape]
        out = torch.empty(chunks.shape[1:], dtype=t.dtype, device=self._device)
        self._comm.reduceScatter(chunks.data_ptr(), out.data_ptr(), out.numel(), code, self._sum, self._stream())
        return out

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_tensor(t, "broadcast input")
        self._check_root(src)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        self._comm.broadcast(t.data_ptr(), t.data_ptr(), nbytes, self._u8, src, self._stream())
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_tensor(t, "send input")
        self._check_peer(dst)
        t = t.contiguous()
        self._comm.send(t.data_ptr(), t.numel() * t.element_size(), self._u8, dst, self._stream())

    def recv_into(self, out: torch.Tensor, src: int) -> torch.Tensor:
        return self._recv_through(out, src, lambda buf: self._comm.recv(
            buf.data_ptr(), buf.numel() * buf.element_size(), self._u8, src, self._stream()))

    def _all_to_all(
        self, inputs: list[torch.Tensor], recv_shapes: list[Shape], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        outs = [torch.empty(s, dtype=dtype, device=self._device) for s in recv_shapes]
        stream = self._stream()
        # One group, so the pairwise sends and receives progress together instead of deadlocking.
        self._nccl.groupStart()
        try:
            for peer in range(self._size):
                if peer == self._rank:
                    continue
                src, dst = bytes_view(inputs[peer]), bytes_view(outs[peer])
                if src.numel():
                    self._comm.send(src.data_ptr(), src.numel(), self._u8, peer, stream)
                if dst.numel():
                    self._comm.recv(dst.data_ptr(), dst.numel(), self._u8, peer, stream)
        finally:
            self._nccl.groupEnd()
        outs[self._rank].copy_(inputs[self._rank])
        return outs

    def barrier(self) -> None:
        self.all_reduce(torch.ones(1, device=self._device))
        torch.cuda.current_stream(self._device).synchronize()

    def broadcast_object(self, obj: T, src: int) -> T:
        self._check_root(src)
        payload = pickle.dumps(obj) if self._rank == src else b""
        length = self.broadcast(torch.tensor([len(payload)], dtype=torch.int64, device=self._device), src)
        n = int(length.item())
        if self._rank == src:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self._device)
        buf = self.broadcast(buf, src)
        return pickle.loads(buf.cpu().numpy().tobytes())  # type: ignore[no-any-return]

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        index, position = self._group_position(groups)
        members = list(groups[index])
        # Each group's first rank makes its id; one all_gather of fixed-size records hands every
        # rank its leader's id.
        record = torch.zeros(UNIQUE_ID_BYTES, dtype=torch.uint8)
        if position == 0 and len(members) > 1:
            record = torch.frombuffer(bytearray(nccl_unique_id()), dtype=torch.uint8)
        ids = self.all_gather(record.to(self._device).unsqueeze(0)).cpu()  # [ranks, UNIQUE_ID_BYTES]
        child: Communicator
        if len(members) == 1:
            child = SingleRankComm(self._device)
        else:
            child = NcclComm(len(members), ids[members[0]].numpy().tobytes(), position, self._device)
        self._children.append(child)
        return child

    def destroy(self) -> None:
        """Destroys sub-communicators, then this one. Destroy any CUDA graph that captured its
        operations first: replaying one afterwards uses a freed communicator."""
        if not self._destroy_children():
            return
        torch.cuda.synchronize(self._device)
        self._comm.destroy()
        self._destroyed = True

    def abort(self) -> None:
        """Tears the communicator down without waiting for peers (after an error or a timeout)."""
        if not self._destroyed:
            self._comm.abort()
            self._destroyed = True

    def __repr__(self) -> str:
        return f"NcclComm(rank={self._rank}, size={self._size}, device={self._device})"
