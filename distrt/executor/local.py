"""One worker in this process (tests, CPU, one GPU). `execute_async` queues the plan's device work
and returns; `wait` collects its tokens, so with two plans in flight the host prepares step k+1
while the GPU runs step k."""

from __future__ import annotations

from distrt.config import EngineConfig
from distrt.executor.base import Executor, StepHandle, step_depth
from distrt.messages import StepPlan, StepResult
from distrt.worker.worker import Worker


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.world_size != 1:
            raise ValueError("the local executor runs one worker; use executor='ray' or 'mpi' for parallel layouts")
        self.worker = Worker(config)
        self._depth = step_depth(config)

    @property
    def max_concurrent_steps(self) -> int:
        return self._depth

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_async(self, plan: StepPlan) -> StepHandle:
        return StepHandle(plan.step_id, self.worker.launch(plan))

    def wait(self, handle: StepHandle) -> StepResult:
        return self.worker.finish(handle.ref)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.wait(self.execute_async(plan))

    def shutdown(self) -> None:
        self.worker.shutdown()
