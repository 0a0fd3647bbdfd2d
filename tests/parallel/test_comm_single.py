"""The size-1 communicator, the factory's argument checks, and the NCCL backend's CPU-side parts."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from comm_checks import check_collectives

from distrt.parallel.comm import SingleRankComm
from distrt.parallel.comm_factory import create_communicator
from distrt.parallel.comm_nccl import UNIQUE_ID_BYTES, NcclComm, _init_communicator


def test_single_rank_collectives_are_identities() -> None:
    comm = create_communicator("single")
    assert isinstance(comm, SingleRankComm)
    assert (comm.rank, comm.size, comm.device) == (0, 1, torch.device("cpu"))
    t = torch.arange(6.0).reshape(2, 3)
    assert comm.all_reduce(t) is t
    assert comm.all_gather(t, dim=1) is t
    assert comm.reduce_scatter(t) is t
    assert comm.broadcast(t, 0) is t
    assert comm.all_to_all([t]) == [t]
    assert comm.broadcast_object({"a": 1}, 0) == {"a": 1}
    assert comm.split([[0]]) is comm
    check_collectives(comm)
    comm.barrier()
    comm.destroy()


def test_single_rank_rejects_peers_and_bad_arguments() -> None:
    comm = SingleRankComm()
    with pytest.raises(ValueError, match="itself"):
        comm.send(torch.zeros(1), 0)
    with pytest.raises(ValueError, match="outside"):
        comm.recv((1,), torch.float32, 1)
    with pytest.raises(ValueError, match="outside"):
        comm.broadcast(torch.zeros(1), 1)
    with pytest.raises(ValueError, match="one per rank"):
        comm.all_to_all([torch.zeros(1), torch.zeros(1)])
    with pytest.raises(ValueError, match="partition"):
        comm.split([[0], [1]])
    with pytest.raises(ValueError, match="at least one dim"):
        comm.all_gather(torch.tensor(1.0))
    with pytest.raises(TypeError):
        comm.all_reduce([1.0])  # type: ignore[arg-type]


def test_factory_argument_checks() -> None:
    with pytest.raises(ValueError, match="unknown communicator backend"):
        create_communicator("ucx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs rank, world_size and init_method"):
        create_communicator("gloo", rank=0, world_size=2)
    with pytest.raises(ValueError, match="needs rank, world_size, unique_id and device"):
        create_communicator("nccl", rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 0 of 1"):
        create_communicator("single", world_size=2)


class _FakeNcclCommunicator:
    """Stands in for cupy's constructor: cupy >= 14 takes bytes, older cupy a tuple whose entries
    it converts to C chars, signed (x86-64) or unsigned (aarch64)."""

    takes: str = "bytes"

    def __init__(self, ndev: int, comm_id: bytes | tuple[int, ...], rank: int) -> None:
        if self.takes == "bytes":
            if not isinstance(comm_id, bytes):
                raise TypeError("Argument 'commId' has incorrect type (expected bytes, got tuple)")
        else:
            if not isinstance(comm_id, tuple):
                raise TypeError("Argument 'commId' has incorrect type (expected tuple, got bytes)")
            lo, hi = (-128, 127) if self.takes == "signed" else (0, 255)
            if not all(lo <= b <= hi for b in comm_id):
                raise OverflowError("value too large to convert to char")
        self.comm_id = comm_id


@pytest.mark.parametrize("takes", ["bytes", "signed", "unsigned"])
def test_unique_id_bytes_reach_nccl(takes: str) -> None:
    uid = bytes((i * 37) % 256 for i in range(UNIQUE_ID_BYTES))
    fake_cls = type("Fake", (_FakeNcclCommunicator,), {"takes": takes})
    comm = _init_communicator(SimpleNamespace(NcclCommunicator=fake_cls), 2, uid, 0)  # type: ignore[arg-type]
    assert bytes(b & 0xFF for b in comm.comm_id) == uid
    with pytest.raises(ValueError, match="128 bytes"):
        _init_communicator(SimpleNamespace(NcclCommunicator=fake_cls), 2, uid[:-1], 0)  # type: ignore[arg-type]


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
def test_nccl_backend_imports_without_cupy_and_says_what_is_missing() -> None:
    with pytest.raises(ImportError, match="cupy"):
        NcclComm(2, bytes(UNIQUE_ID_BYTES), 0, 0)
