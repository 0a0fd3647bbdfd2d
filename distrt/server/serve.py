"""Running the server: uvicorn with a SIGTERM drain, then the engine and its workers shut down.

    SIGTERM/SIGINT ─► draining: new /v1 requests get 503, /health 503
                      wait until no request is in flight, or drain_timeout
                  ─► past the timeout: the engine stops, failing what is left (an error event / 503)
                  ─► uvicorn stops
                  ─► AsyncLLMEngine.shutdown(): engine thread stops, executor (workers) shut down
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType
from collections.abc import Callable
from typing import Any

import uvicorn

from distrt.engine.async_engine import AsyncLLMEngine
from distrt.server.app import build_app
from distrt.server.context import ServerContext
from distrt.server.gate import GateState
from distrt.server.settings import ServerSettings

logger = logging.getLogger(__name__)

_GRACE_AFTER_DRAIN = 2  # seconds uvicorn waits for connections once the drain is over


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gate: GateState, drain_timeout: float,
                 on_drain_timeout: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.gate = gate
        self.drain_timeout = drain_timeout
        self.on_drain_timeout = on_drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit code would be 143
        if self.gate.draining or self._loop is None:
            if sig == signal.SIGINT and self.gate.draining:
                self.force_exit = True
            self.should_exit = True
            return
        logger.info("signal %d: draining %d request(s) for up to %.0fs", sig, self.gate.in_flight,
                    self.drain_timeout)
        self.begin_drain()

    def begin_drain(self) -> None:
        """Thread- and signal-safe: start draining, then exit."""
        self.gate.draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self._wait_in_flight(self.drain_timeout)
        if self.gate.in_flight and self.on_drain_timeout is not None:
            logger.warning("drain timeout: failing %d request(s) still in flight", self.gate.in_flight)
            await asyncio.get_running_loop().run_in_executor(None, self.on_drain_timeout)
            await self._wait_in_flight(_GRACE_AFTER_DRAIN)
        self.should_exit = True

    async def _wait_in_flight(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.gate.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def build_server(engine: AsyncLLMEngine, settings: ServerSettings, **uvicorn_kwargs: Any) -> DrainingServer:
    ctx = ServerContext(engine, settings)
    config = uvicorn.Config(build_app(ctx), host=settings.host, port=settings.port, log_level=settings.log_level,
                            lifespan="off", timeout_graceful_shutdown=_GRACE_AFTER_DRAIN, **uvicorn_kwargs)
    return DrainingServer(config, ctx.gate, settings.drain_timeout, on_drain_timeout=engine.shutdown)


def run_server(engine: AsyncLLMEngine, settings: ServerSettings) -> int:
    server = build_server(engine, settings)
    try:
        server.run()
    finally:
        engine.shutdown()
    if server.started:
        logger.info("server stopped")
        return 0
    return 1
