"""One worker in this process (tests, CPU, one GPU)."""

from __future__ import annotations

from distrt.config import EngineConfig
from distrt.executor.base import Executor
from distrt.messages import StepPlan, StepResult
from distrt.worker.worker import Worker


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.world_size != 1:
            raise ValueError("the local executor runs one worker; use executor='ray' or 'mpi' for parallel layouts")
        self.worker = Worker(config)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.worker.execute(plan)

    def shutdown(self) -> None:
        self.worker.shutdown()
