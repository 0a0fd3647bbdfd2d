"""Picks and builds the executor named by ParallelConfig.executor ("auto" resolved by the caller)."""

from __future__ import annotations

from distrt.config import EngineConfig
from distrt.executor.base import Executor

EXECUTORS = ("auto", "local", "ray", "mpi")


def resolve_executor_name(name: str, world_size: int) -> str:
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    from distrt.executor.mpi_executor import under_mpi_launcher

    if under_mpi_launcher():
        from mpi4py import MPI

        ranks = MPI.COMM_WORLD.Get_size()
        if ranks > 1 and ranks != world_size:
            raise ValueError(f"mpirun/srun started {ranks} ranks but tensor_parallel_size x "
                             f"pipeline_parallel_size = {world_size}; start one rank per worker")
    if name != "auto":
        return name
    if world_size == 1:
        return "local"
    return "mpi" if under_mpi_launcher() else "ray"


def create_executor(config: EngineConfig) -> Executor:
    name = config.parallel.executor
    config.parallel.stage_layers(config.model.num_layers)  # a bad pipeline split fails here, not on a worker
    if name == "local":
        from distrt.executor.local import LocalExecutor

        return LocalExecutor(config)
    if name == "ray":
        from distrt.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    if name == "mpi":
        from distrt.executor.mpi_executor import MpiExecutor

        return MpiExecutor(config)
    raise ValueError(f"unknown executor {name!r}")
