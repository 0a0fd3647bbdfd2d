"""Running one API request on the engine: its prompts (x n samples) to a full response or an SSE stream.

The endpoint-specific shapes come from a ChoiceFormat (completions.py, chat.py). Choice index =
prompt index * n + sample index. Streamed text is held back while it could still be cut by a stop
string or ends in a split UTF-8 character, so the streamed deltas join to the non-streamed text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from distrt.engine.async_engine import AsyncLLMEngine
from distrt.engine.outputs import CompletionOutput, RequestOutput
from distrt.engine.sampling_params import SamplingParams
from distrt.executor.base import EngineDeadError
from distrt.server.context import ServerContext
from distrt.server.errors import APIError, engine_dead, from_value_error
from distrt.server.metrics import ServerMetrics
from distrt.server.streams import SSE_DONE, ClientDisconnected, merge, sse, until_disconnected

logger = logging.getLogger(__name__)

_SPLIT_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class EnginePrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    model: str
    created: int
    prompts: list[EnginePrompt]
    n: int


@dataclass(frozen=True, slots=True)
class ChunkPiece:
    """What one streamed chunk carries for one choice."""

    index: int
    output: CompletionOutput
    text: str
    text_start: int
    token_start: int
    first: bool
    finish_reason: str | None


class ChoiceFormat(Protocol):
    object_full: str
    object_chunk: str

    def full_choice(self, index: int, out: CompletionOutput) -> dict[str, Any]: ...

    def chunk_choice(self, piece: ChunkPiece) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Progress:
    text: int = 0
    tokens: int = 0
    started: bool = False
    finished: bool = False


def _outputs(engine: AsyncLLMEngine, job: Job, metrics: ServerMetrics) -> list[AsyncIterator[RequestOutput]]:
    return [metrics.track(engine.generate({"prompt": p.text, "prompt_token_ids": p.token_ids}, p.params,
                                          f"{job.request_id}-{i}"))
            for i, p in enumerate(job.prompts)]


def _usage(job: Job, finals: dict[int, RequestOutput]) -> dict[str, int]:
    prompt = sum(len(p.token_ids) for p in job.prompts)
    completion = sum(len(o.token_ids) for r in finals.values() for o in r.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_finish(out: CompletionOutput) -> None:
    if out.finish_reason in ("error", "abort"):
        raise EngineDeadError(f"the request ended with {out.finish_reason!r}")


async def collect(engine: AsyncLLMEngine, job: Job, fmt: ChoiceFormat, metrics: ServerMetrics) -> dict[str, Any]:
    finals: dict[int, RequestOutput] = {}
    async for i, out in merge(_outputs(engine, job, metrics)):
        finals[i] = out
    choices = []
    for i in range(len(job.prompts)):
        for o in finals[i].outputs:
            _check_finish(o)
            choices.append(fmt.full_choice(i * job.n + o.index, o))
    return {"id": job.request_id, "object": fmt.object_full, "created": job.created, "model": job.model,
            "choices": choices, "usage": _usage(job, finals)}


def _stable_end(text: str, sent: int, finished: bool, holdback: int) -> int:
    if finished:
        return len(text)
    end = len(text) - holdback
    while end > sent and text[end - 1] == _SPLIT_CHAR:
        end -= 1
    return max(end, sent)


async def stream(engine: AsyncLLMEngine, job: Job, fmt: ChoiceFormat, metrics: ServerMetrics,
                 include_usage: bool) -> AsyncIterator[str]:
    progress: dict[int, _Progress] = {}
    finals: dict[int, RequestOutput] = {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": job.request_id, "object": fmt.object_chunk, "created": job.created, "model": job.model,
                    "choices": choices, **extra})

    try:
        async for i, out in merge(_outputs(engine, job, metrics)):
            finals[i] = out
            params = job.prompts[i].params
            holdback = max((len(s) for s in params.stop_strings), default=1) - 1
            choices = []
            for o in out.outputs:
                _check_finish(o)
                idx = i * job.n + o.index
                p = progress.setdefault(idx, _Progress())
                if p.finished:
                    continue
                finish = o.finish_reason
                end = _stable_end(o.text, p.text, finish is not None, holdback)
                new_tokens = len(o.token_ids) > p.tokens and params.logprobs is not None
                if end == p.text and finish is None and p.started and not new_tokens:
                    continue
                choices.append(fmt.chunk_choice(ChunkPiece(idx, o, o.text[p.text:end], p.text, p.tokens,
                                                           not p.started, finish)))
                p.text, p.tokens, p.started, p.finished = end, len(o.token_ids), True, finish is not None
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], usage=_usage(job, finals))
    except EngineDeadError as e:
        yield sse(engine_dead(e).body())
    except APIError as e:
        yield sse(e.body())
    except ValueError as e:
        yield sse(from_value_error(e).body())
    except Exception as e:  # a bug: the client still gets an error event, not a silently cut stream
        logger.exception("streaming failed")
        yield sse(APIError(500, f"internal server error: {type(e).__name__}", type="server_error").body())
    yield SSE_DONE


async def respond(request: Request, ctx: ServerContext, job: Job, fmt: ChoiceFormat, streamed: bool,
                  include_usage: bool) -> Response:
    """The endpoint's HTTP response: an SSE stream, or the collected JSON (499 if the client left first)."""
    if streamed:
        return StreamingResponse(stream(ctx.engine, job, fmt, ctx.metrics, include_usage),
                                 media_type="text/event-stream")
    try:
        result = await until_disconnected(request, collect(ctx.engine, job, fmt, ctx.metrics))
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(result)
