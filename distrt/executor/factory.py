"""Picks and builds the executor named by ParallelConfig.executor ("auto" resolved by the caller)."""

from __future__ import annotations

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
    from distrt.executor.mpi_executor import under_mpi_launcher

    return "mpi" if under_mpi_launcher() else "ray"


def create_executor(config: EngineConfig) -> Executor:
    name = config.parallel.executor
    if config.parallel.pipeline_parallel_size > 1:
        raise ValueError("pipeline_parallel_size > 1 is not yet supported in this build")
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
