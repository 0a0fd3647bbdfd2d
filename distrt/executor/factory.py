"""Picks and builds the executor named by ParallelConfig.executor ("auto" resolved by the caller)."""

from __future__ import annotations

import os

from distrt.config import EngineConfig
from distrt.executor.base import Executor

EXECUTORS = ("auto", "local", "ray", "mpi")


def resolve_executor_name(name: str, world_size: int) -> str:
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if name != "auto":
        return name
    if world_size == 1:
        return "local"
    under_mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))
    return "mpi" if under_mpi else "ray"


def create_executor(config: EngineConfig) -> Executor:
    name = config.parallel.executor
    if name == "local":
        from distrt.executor.local import LocalExecutor

        return LocalExecutor(config)
    raise ValueError(
        f"executor {name!r} with tensor_parallel_size={config.parallel.tensor_parallel_size}, "
        f"pipeline_parallel_size={config.parallel.pipeline_parallel_size} is not yet supported in this build"
    )
