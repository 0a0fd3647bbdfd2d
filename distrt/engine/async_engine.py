"""AsyncLLMEngine: an asyncio front end over LLMEngine, which runs in one background thread.

    event loop (server)                                   engine thread (owns LLMEngine)
    generate() ── _Add ──► commands (queue.Queue) ──────► drained between steps:
    abort()    ── _Abort ─►                                 add_request / abort_request / run(fn)
    per-request asyncio.Queue ◄── call_soon_threadsafe ──── step() -> [RequestOutput]

The engine is not thread-safe, so nothing but the engine thread calls it, with two exceptions that
only read config and the tokenizer: `tokenize` and `validate_prompt_ids`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from distrt.engine.llm_engine import LLMEngine, PromptInput
from distrt.engine.outputs import RequestOutput
from distrt.engine.sampling_params import SamplingParams
from distrt.executor.base import EngineDeadError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot the engine thread publishes after every loop turn."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt: PromptInput
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class _Abort:
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Run:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future[Any]


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Command = _Add | _Abort | _Run | _Stop


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.stats = EngineStats()
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: EngineDeadError | None = None
        self._stopped = False
        self._publish_stats()
        self._thread = threading.Thread(target=self._run_loop, name="distrt-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_llm(cls, llm: Any) -> "AsyncLLMEngine":
        return cls(llm.engine)

    # -- read-only helpers, safe from any thread ----------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model.vocab_size

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        return self.engine.tokenize_prompt(prompt)

    def validate_prompt_ids(self, ids: list[int]) -> None:
        self.engine.validate_prompt_ids(ids)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def num_active_requests(self) -> int:
        return len(self._queues)

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs for one request until it finishes; leaving early aborts it."""
        if self._dead is not None:
            raise self._dead
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        self._commands.put(_Add(request_id, prompt, params))
        finished = False
        try:
            while not finished:
                item = await q.get()
                while not q.empty() and not isinstance(item, BaseException):
                    item = q.get_nowait()  # outputs are cumulative: only the newest matters
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort((request_id,)))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort((request_id,)))

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs fn(engine) on the engine thread between steps (debugging, fault injection)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put(_Run(fn, fut))
        return await asyncio.wrap_future(fut)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Fails what is in flight, stops the loop, and shuts the executor (workers) down."""
        if self._stopped:
            return
        self._stopped = True
        self._commands.put(_Stop())
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("engine thread did not stop within %.0fs", timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _run_loop(self) -> None:
        try:
            while self._serve_once():
                pass
        except BaseException as e:  # a bug here must not leave clients waiting forever
            logger.exception("engine loop crashed")
            self._die(e)
        finally:
            self._deliver_to_all(EngineDeadError("the engine is shut down"))
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("executor shutdown failed")

    def _serve_once(self) -> bool:
        busy = self._dead is None and self.engine.has_unfinished_requests()
        for cmd in self._take_commands(block=not busy):
            if isinstance(cmd, _Stop):
                return False
            self._apply(cmd)
        if self._dead is None and self.engine.has_unfinished_requests():
            try:
                outs = self.engine.step()
            except Exception as e:
                self._die(e)
                outs = []
            if outs:
                self._call_in_loop(self._dispatch, outs)
        self._publish_stats()
        return True

    def _take_commands(self, block: bool) -> list[_Command]:
        cmds: list[_Command] = []
        if block:
            cmds.append(self._commands.get())
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, cmd: _Command) -> None:
        if isinstance(cmd, _Add):
            try:
                if self._dead is not None:
                    raise self._dead  # the loop no longer steps: an added request would wait forever
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
            except Exception as e:
                self._call_in_loop(self._deliver, cmd.request_id, e)
        elif isinstance(cmd, _Abort):
            self.engine.abort_request(list(cmd.request_ids))
        elif isinstance(cmd, _Run):
            try:
                cmd.future.set_result(cmd.fn(self.engine))
            except Exception as e:
                cmd.future.set_exception(e)

    def _die(self, err: BaseException) -> None:
        if self._dead is None:
            logger.error("engine failed: %s: %s", type(err).__name__, err)
            dead = err if isinstance(err, EngineDeadError) else EngineDeadError(f"the engine failed: {err}")
            dead.__cause__ = err if dead is not err else None
            self._dead = dead
        self._deliver_to_all(self._dead)

    def _publish_stats(self) -> None:
        sched, alloc = self.engine.scheduler, self.engine.allocator
        self.stats = EngineStats(num_running=sched.num_running, num_waiting=sched.num_waiting,
                                 num_blocks=alloc.num_blocks, num_free_blocks=alloc.num_free_blocks,
                                 num_preemptions=sched.stats.num_preemptions,
                                 prompt_tokens=sched.stats.prompt_tokens,
                                 generation_tokens=sched.stats.generation_tokens,
                                 num_steps=sched.stats.num_steps)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver_to_all(self, err: BaseException) -> None:
        self._call_in_loop(self._fail_all, err)

    # -- on the event loop ---------------------------------------------------------------------
    def _dispatch(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _fail_all(self, err: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(err)
