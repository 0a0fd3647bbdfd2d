"""The Cluster API: where workers run.

    with Cluster.ray(address="auto") as cluster:        # connect (or address=None: start locally)
        print(cluster.nodes())
        llm = LLM(model, tensor_parallel_size=2, cluster=cluster)
        ...
    # leaving the block shuts down every engine built on it, then a Ray instance it started

`Cluster.mpi()` describes the MPI world this process belongs to (under mpirun/srun) or the ranks the
MPI executor will spawn from this process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

from distrt.config import EngineConfig
from distrt.executor.base import Executor


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    node_id: str
    host: str
    cpus: float
    gpus: float
    alive: bool = True


class Cluster:
    def __init__(self, backend: str = "ray", *, address: str | None = None, num_cpus: int | None = None,
                 num_gpus: int | None = None, placement_strategy: str = "PACK", channel: str = "compiled",
                 step_timeout_s: float | None = None) -> None:
        if backend not in ("ray", "mpi"):
            raise ValueError(f"Cluster backend must be 'ray' or 'mpi', got {backend!r}")
        if placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {placement_strategy!r}")
        self.backend = backend
        self.address = address
        self.placement_strategy = placement_strategy
        self.channel = channel
        self.step_timeout_s = step_timeout_s
        self._executors: list[Executor] = []
        self._started_ray = False
        if backend == "ray":
            import ray

            if not ray.is_initialized():
                kw: dict[str, Any] = {"include_dashboard": False}
                if address is None:
                    kw.update(num_cpus=num_cpus, num_gpus=num_gpus)
                ray.init(address=address, **kw)
                self._started_ray = address is None

    @classmethod
    def ray(cls, address: str | None = "auto", **kw: Any) -> "Cluster":
        """Connect to a running Ray cluster (address="auto" or "host:port"), or start one (None)."""
        return cls("ray", address=address, **kw)

    @classmethod
    def mpi(cls, **kw: Any) -> "Cluster":
        return cls("mpi", **kw)

    def nodes(self) -> list[NodeInfo]:
        if self.backend == "ray":
            import ray

            return [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), n["Resources"].get("CPU", 0.0),
                             n["Resources"].get("GPU", 0.0), bool(n.get("Alive", False))) for n in ray.nodes()]
        from distrt.executor.mpi_executor import under_mpi_launcher

        size = 1
        if under_mpi_launcher():
            from mpi4py import MPI

            size = MPI.COMM_WORLD.Get_size()
        gpus = _local_gpus()
        return [NodeInfo(socket.gethostname(), socket.gethostname(), float(os.cpu_count() or 1), float(gpus))] * (1 if size else 0)

    @property
    def num_gpus(self) -> float:
        return sum(n.gpus for n in self.nodes() if n.alive)

    def create_executor(self, config: EngineConfig) -> Executor:
        config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, executor=self.backend))
        if self.backend == "ray":
            from distrt.executor.ray_executor import RayExecutor

            ex: Executor = RayExecutor(config, address=self.address, placement_strategy=self.placement_strategy,
                                       channel=self.channel, step_timeout_s=self.step_timeout_s)
        else:
            from distrt.executor.mpi_executor import MpiExecutor

            ex = MpiExecutor(config)
        self._executors.append(ex)
        return ex

    def shutdown(self) -> None:
        for ex in self._executors:
            ex.shutdown()
        self._executors.clear()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0
