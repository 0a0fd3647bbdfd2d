"""POST /v1/chat/completions: messages rendered with the model's chat template, then generation."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from distrt.engine.outputs import CompletionOutput
from distrt.engine.tokenizer import apply_chat_template
from distrt.server.context import ServerContext, get_context
from distrt.server.errors import APIError
from distrt.server.generation import ChunkPiece, EnginePrompt, Job, respond
from distrt.server.logprobs import chat_logprobs
from distrt.server.protocol import ChatCompletionRequest
from distrt.server.request_params import build_sampling_params, check_common, resolve_max_tokens, unsupported

router = APIRouter()

_MAX_TOP_LOGPROBS = 20


class ChatFormat:
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, top_logprobs: int) -> None:
        self.top_logprobs = top_logprobs

    def full_choice(self, index: int, out: CompletionOutput) -> dict[str, Any]:
        lps = (chat_logprobs(out.logprobs, out.token_ids, 0, len(out.token_ids), self.top_logprobs)
               if out.logprobs is not None else None)
        return {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": lps,
                "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}

    def chunk_choice(self, piece: ChunkPiece) -> dict[str, Any]:
        out = piece.output
        delta: dict[str, Any] = {"role": "assistant", "content": piece.text} if piece.first else {}
        if piece.text and not piece.first:
            delta["content"] = piece.text
        lps = (chat_logprobs(out.logprobs, out.token_ids, piece.token_start, len(out.token_ids), self.top_logprobs)
               if out.logprobs is not None else None)
        return {"index": piece.index, "delta": delta, "logprobs": lps, "finish_reason": piece.finish_reason,
                "stop_reason": out.stop_reason if piece.finish_reason else None}


def _logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= _MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    return (body.top_logprobs or 0) if body.logprobs else None


def _prompt_ids(body: ChatCompletionRequest, ctx: ServerContext) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return apply_chat_template(ctx.engine.tokenizer, messages, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    except Exception as e:  # jinja's TemplateError (e.g. "roles must alternate") is the client's input
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages",
                       code="invalid_value") from None


def _prepare(body: ChatCompletionRequest, ctx: ServerContext) -> tuple[Job, int]:
    ctx.check_model(body.model)
    check_common(body)
    if body.tools:
        raise unsupported("tools", "tool calling")
    logprobs = _logprobs(body)
    ctx.check_serving()
    engine = ctx.engine
    ids = _prompt_ids(body, ctx)
    requested: int | None
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = body.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, True, None, len(ids), engine.max_model_len, param, "messages")
    try:
        engine.validate_prompt_ids(ids)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    params = build_sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, vocab_size=engine.vocab_size,
                                   renames={"logprobs": "top_logprobs", "max_tokens": param})
    job = Job(f"chatcmpl-{uuid.uuid4().hex}", ctx.model_name, int(time.time()),
              [EnginePrompt(None, ids, params)], body.n)
    return job, logprobs or 0


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 ctx: ServerContext = Depends(get_context)) -> Response:
    job, top_n = _prepare(body, ctx)
    fmt = ChatFormat(top_n)
    return await respond(request, ctx, job, fmt, body.stream, body.include_usage)
