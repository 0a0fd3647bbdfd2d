"""The one interface the engine sees: something that runs StepPlans on workers.

Plans can be submitted ahead of their results, so that with pipeline parallelism every stage has a
micro-batch to work on:

    h1 = ex.execute_async(plan1); h2 = ex.execute_async(plan2)   # up to max_concurrent_steps
    r1 = ex.wait(h1); ...                                          # in submission order

Workers run plans in submission order. `execute(plan)` is `wait(execute_async(plan))`. An executor
with one worker process (local) runs the plan inside `execute_async` and hands back the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distrt.messages import StepPlan, StepResult

if TYPE_CHECKING:
    from distrt.config import EngineConfig


def step_depth(config: "EngineConfig") -> int:
    """Plans in flight at once: with pp > 1 the micro-batches (default pp), else 2 with async
    scheduling, else 1."""
    pp = config.parallel.pipeline_parallel_size
    if pp > 1:
        mb = config.parallel.pipeline_micro_batches
        return pp if mb is None else mb
    return 2 if config.scheduler.async_scheduling else 1


class EngineDeadError(RuntimeError):
    """A worker died or failed; every in-flight and later request fails with this."""


@dataclass(slots=True)
class StepHandle:
    """A submitted plan: its step id and whatever the executor needs to collect the result."""

    step_id: int
    ref: Any = None


class Executor(ABC):
    @property
    def max_concurrent_steps(self) -> int:
        """How many plans the engine may keep in flight: the pipeline depth (1 without pp)."""
        return 1

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks every worker can hold (the minimum over workers)."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None: ...

    def execute_async(self, plan: StepPlan) -> StepHandle:
        """Submits a plan. Default: run it now (synchronous executors)."""
        return StepHandle(plan.step_id, self.execute(plan))

    def wait(self, handle: StepHandle) -> StepResult:
        """The result of a submitted plan; raises EngineDeadError if a worker failed or hung."""
        result = handle.ref
        assert isinstance(result, StepResult), "a synchronous executor's handle holds the result"
        return result

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepResult: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
