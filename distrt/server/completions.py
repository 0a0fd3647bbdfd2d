"""POST /v1/completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from distrt.engine.outputs import CompletionOutput
from distrt.engine.llm_engine import PromptInput
from distrt.server.context import ServerContext, get_context
from distrt.server.errors import APIError
from distrt.server.generation import ChunkPiece, EnginePrompt, Job, respond
from distrt.server.logprobs import completion_logprobs
from distrt.server.protocol import CompletionRequest
from distrt.server.request_params import build_sampling_params, check_common, resolve_max_tokens, unsupported

router = APIRouter()


class CompletionFormat:
    object_full = "text_completion"
    object_chunk = "text_completion"

    def full_choice(self, index: int, out: CompletionOutput) -> dict[str, Any]:
        lps = (completion_logprobs(out.logprobs, out.token_ids, 0, len(out.token_ids), 0)
               if out.logprobs is not None else None)
        return {"index": index, "text": out.text, "logprobs": lps, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def chunk_choice(self, piece: ChunkPiece) -> dict[str, Any]:
        out = piece.output
        lps = (completion_logprobs(out.logprobs, out.token_ids, piece.token_start, len(out.token_ids),
                                   piece.text_start) if out.logprobs is not None else None)
        return {"index": piece.index, "text": piece.text, "logprobs": lps, "finish_reason": piece.finish_reason,
                "stop_reason": out.stop_reason if piece.finish_reason else None}


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[PromptInput]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _prepare(body: CompletionRequest, ctx: ServerContext) -> Job:
    ctx.check_model(body.model)
    check_common(body)
    if body.echo:
        raise unsupported("echo", "echo=true")
    if body.suffix:
        raise unsupported("suffix", "a suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise unsupported("best_of", "best_of != n")
    ctx.check_serving()
    engine = ctx.engine
    explicit = "max_tokens" in body.model_fields_set
    prompts = []
    for p in _prompts(body.prompt):
        try:
            text, ids = engine.tokenize(p)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        max_tokens = resolve_max_tokens(body.max_tokens, explicit, 16, len(ids), engine.max_model_len,
                                        "max_tokens", "prompt")
        try:
            engine.validate_prompt_ids(ids)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        params = build_sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs,
                                       vocab_size=engine.vocab_size)
        prompts.append(EnginePrompt(text, ids, params))
    return Job(f"cmpl-{uuid.uuid4().hex}", ctx.model_name, int(time.time()), prompts, body.n)


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request,
                            ctx: ServerContext = Depends(get_context)) -> Response:
    job = _prepare(body, ctx)
    fmt = CompletionFormat()
    return await respond(request, ctx, job, fmt, body.stream, body.include_usage)
