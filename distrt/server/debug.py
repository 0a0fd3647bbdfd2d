"""Debug routes, mounted only with --enable-debug-routes (tests): engine state with an integrity check,
and fault injection into the executor (a slow step, or a worker that dies)."""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from distrt.engine.llm_engine import LLMEngine
from distrt.executor.base import StepHandle
from distrt.messages import StepPlan
from distrt.server.context import ServerContext, get_context

router = APIRouter(prefix="/debug", include_in_schema=False)


class Fault(BaseModel):
    kind: Literal["delay", "raise", "none"]
    seconds: float = Field(0.0, ge=0.0, le=10.0)


def _state(engine: LLMEngine) -> dict[str, Any]:
    engine.check_integrity()
    pids = getattr(engine.executor, "worker_pids", None)
    return {"num_blocks": engine.allocator.num_blocks, "num_free_blocks": engine.allocator.num_free_blocks,
            "worker_pids": pids() if callable(pids) else [os.getpid()],
            "num_unfinished_requests": engine.num_unfinished_requests,
            "num_running": engine.scheduler.num_running, "num_waiting": engine.scheduler.num_waiting,
            "integrity": "ok"}


def _install(fault: Fault) -> Any:
    def install(engine: LLMEngine) -> str:
        executor = engine.executor
        executor.__dict__.pop("execute_async", None)  # back to the class's method
        real = executor.execute_async
        if fault.kind == "delay":
            def slow(plan: StepPlan) -> StepHandle:
                time.sleep(fault.seconds)
                return real(plan)

            executor.execute_async = slow  # type: ignore[method-assign]
        elif fault.kind == "raise":
            def dead(plan: StepPlan) -> StepHandle:
                raise RuntimeError("injected fault: a worker died")

            executor.execute_async = dead  # type: ignore[method-assign]
        return fault.kind

    return install


@router.get("/state")
async def state(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    return await ctx.engine.run_in_engine(_state)


@router.post("/fault")
async def fault(body: Fault, ctx: ServerContext = Depends(get_context)) -> dict[str, str]:
    return {"fault": await ctx.engine.run_in_engine(_install(body))}
