"""Builds the world communicator of a backend by name; backends are imported only when chosen."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import torch

from distrt.parallel.comm import Communicator, SingleRankComm

Backend = Literal["gloo", "mpi", "nccl", "single"]
BACKENDS: tuple[Backend, ...] = ("gloo", "mpi", "nccl", "single")


def create_communicator(
    backend: Backend,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    unique_id: bytes | None = None,
    device: torch.device | int | str | None = None,
    timeout: timedelta = timedelta(minutes=5),
) -> Communicator:
    """The world communicator of ``backend``; collective for every backend but "single".

    gloo:   rank, world_size, init_method (tcp://host:port or file://path).
    mpi:    nothing (rank and size come from mpirun); rank/world_size, if given, are checked.
    nccl:   rank, world_size, unique_id (bytes from ``nccl_unique_id()`` on one rank), device.
    single: nothing; device defaults to cpu.
    """
    if backend == "single":
        if world_size not in (None, 1) or rank not in (None, 0):
            raise ValueError(f"the single backend is rank 0 of 1, not rank {rank} of {world_size}")
        return SingleRankComm("cpu" if device is None else device)
    if backend == "gloo":
        if rank is None or world_size is None or init_method is None:
            raise ValueError("the gloo backend needs rank, world_size and init_method")
        from distrt.parallel.comm_torch_dist import TorchDistComm

        return TorchDistComm.create(rank, world_size, init_method, timeout=timeout)
    if backend == "mpi":
        from distrt.parallel.comm_mpi import MpiComm

        comm = MpiComm.world()
        if (rank is not None and rank != comm.rank) or (world_size is not None and world_size != comm.size):
            raise ValueError(
                f"asked for rank {rank} of {world_size}, but mpirun started rank {comm.rank} of {comm.size}"
            )
        return comm
    if backend == "nccl":
        if rank is None or world_size is None or unique_id is None or device is None:
            raise ValueError("the nccl backend needs rank, world_size, unique_id and device")
        from distrt.parallel.comm_nccl import NcclComm

        return NcclComm(world_size, unique_id, rank, device)
    raise ValueError(f"unknown communicator backend {backend!r}; expected one of {BACKENDS}")
