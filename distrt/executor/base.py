"""The one interface the engine sees: something that runs StepPlans on workers."""

from __future__ import annotations

from abc import ABC, abstractmethod

from distrt.messages import StepPlan, StepResult


class EngineDeadError(RuntimeError):
    """A worker died or failed; every in-flight and later request fails with this."""


class Executor(ABC):
    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks every worker can hold (the minimum over workers)."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepResult: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
