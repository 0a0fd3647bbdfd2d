"""Tensor parallelism under MPI (run by test_tp_mpi_launch.py as `mpirun -n 2 pytest --with-mpi`)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.mark.mpi(min_size=2)
def test_tp2_logits_match_tp1_under_mpi(tmp_path_factory: pytest.TempPathFactory) -> None:
    from mpi4py import MPI

    from distrt.parallel.comm_mpi import MpiComm
    from tiny_models import make_tiny_checkpoint
    from tp_shard_checks import shard_logits

    world = MPI.COMM_WORLD
    root = world.bcast(str(tmp_path_factory.mktemp("tpm")) if world.rank == 0 else None, root=0)
    path = os.path.join(root, "llama-gqa")
    if world.rank == 0:
        make_tiny_checkpoint(root, "llama-gqa")
    world.Barrier()
    comm = MpiComm.world().split([list(range(2))] + [[r] for r in range(2, world.size)])
    try:
        if world.rank < 2:
            got = shard_logits(path, world.rank, 2, comm)
            ref = shard_logits(path, 0, 1, None)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    finally:
        comm.destroy()
        world.Barrier()
