"""Engine logprobs (per output token: {token id: Logprob}) in the two OpenAI shapes."""

from __future__ import annotations

import math
from typing import Any

from distrt.engine.outputs import Logprob

_FLOOR = -9999.0  # JSON has no -inf


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


def _token(entry: Logprob) -> str:
    return entry.decoded_token or ""


def _ranked(d: dict[int, Logprob]) -> list[Logprob]:
    return sorted((e for e in d.values() if e.rank is not None), key=lambda e: e.rank or 0)


def completion_logprobs(lps: list[dict[int, Logprob]], token_ids: list[int], start: int, end: int,
                        text_offset: int) -> dict[str, Any]:
    """The /v1/completions shape for output tokens [start, end); offsets count from text_offset."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top: list[dict[str, float]] = []
    offsets: list[int] = []
    for i in range(start, min(end, len(lps), len(token_ids))):
        d = lps[i]
        chosen = d[token_ids[i]]
        s = _token(chosen)
        tokens.append(s)
        token_logprobs.append(_finite(chosen.logprob))
        top.append({_token(e): _finite(e.logprob) for e in [*_ranked(d), chosen]})
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_entry(e: Logprob) -> dict[str, Any]:
    s = _token(e)
    return {"token": s, "logprob": _finite(e.logprob), "bytes": list(s.encode("utf-8"))}


def chat_logprobs(lps: list[dict[int, Logprob]], token_ids: list[int], start: int, end: int,
                  top_n: int) -> dict[str, Any]:
    """The /v1/chat/completions shape for output tokens [start, end)."""
    content = []
    for i in range(start, min(end, len(lps), len(token_ids))):
        d = lps[i]
        entry = _chat_entry(d[token_ids[i]])
        entry["top_logprobs"] = [_chat_entry(e) for e in _ranked(d)[:top_n]]
        content.append(entry)
    return {"content": content}
