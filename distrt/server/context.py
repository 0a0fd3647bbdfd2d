"""ServerContext: what every route needs (engine, settings, gate state, metrics), kept on app.state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from distrt.engine.async_engine import AsyncLLMEngine
from distrt.server.errors import APIError, engine_dead
from distrt.server.gate import GateState
from distrt.server.metrics import ServerMetrics
from distrt.server.settings import ServerSettings


@dataclass
class ServerContext:
    engine: AsyncLLMEngine
    settings: ServerSettings
    gate: GateState = field(default_factory=GateState)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine, self.model_name, lambda: self.gate.generating)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_serving(self) -> None:
        if self.engine.is_dead:
            raise engine_dead(self.engine.dead_error)


def get_context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx
