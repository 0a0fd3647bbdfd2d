"""FastAllReduceComm: all-reduce goes to the IPC kernel object, every other collective to the
wrapped communicator, and teardown closes the kernel's buffers before the communicator."""

from __future__ import annotations

import torch

from distrt.parallel.comm import SingleRankComm
from distrt.parallel.fast_allreduce import FastAllReduceComm


class _FakeIpc:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.log.append("ipc.all_reduce")
        return t * 2

    def close(self) -> None:
        self.log.append("ipc.close")


def test_routes_all_reduce_and_delegates_the_rest() -> None:
    log: list[str] = []
    inner = SingleRankComm()
    comm = FastAllReduceComm(inner, _FakeIpc(log))
    x = torch.arange(4.0)
    assert torch.equal(comm.all_reduce(x), x * 2) and log == ["ipc.all_reduce"]
    assert comm.rank == 0 and comm.size == 1 and comm.device == inner.device
    assert torch.equal(comm.all_gather(x), inner.all_gather(x))
    assert torch.equal(comm.broadcast(x.clone(), src=0), x)
    comm.destroy()
    assert log == ["ipc.all_reduce", "ipc.close"]
