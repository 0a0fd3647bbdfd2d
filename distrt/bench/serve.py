"""`distrt bench serve`: load-test any OpenAI-compatible server.

Requests arrive as a Poisson process (exponential gaps at --rate per second; inf sends all at once),
--num-requests in all, each streaming from /v1/completions (or /v1/chat/completions). Per request it
records the time to first token (first chunk with text), the gaps between text chunks (inter-token
latency), the end-to-end latency, and the token counts the server reports in `usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

# common English words: about one token each for BPE vocabularies, so input_len words ~ input_len tokens
_WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
          "or has had not but first one their its new after who they have two been other when there all "
          "during into school time may years more most only over city some world would where later up such "
          "used many can state about national out known university united then made").split()


@dataclass(frozen=True)
class BenchConfig:
    url: str
    num_requests: int = 100
    rate: float = math.inf
    input_len: int = 128
    output_len: int = 128
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "completions"
    max_concurrency: int | None = None
    ignore_eos: bool = True
    seed: int = 0
    timeout: float = 600.0


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)


def _prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _body(cfg: BenchConfig, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": cfg.output_len, "temperature": 0.0}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    out = ""
    for c in chunk.get("choices") or []:
        out += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return out


async def _one(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    res.error = str(chunk["error"].get("message"))
                    return res
                now = time.perf_counter()
                if _chunk_text(chunk):
                    chunks += 1
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def _pcts(xs: list[float], name: str) -> dict[str, float | None]:
    if not xs:
        return {f"mean_{name}_ms": None, f"p50_{name}_ms": None, f"p99_{name}_ms": None}
    a = np.asarray(xs) * 1000.0
    return {f"mean_{name}_ms": float(a.mean()), f"p50_{name}_ms": float(np.percentile(a, 50)),
            f"p99_{name}_ms": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
    }
    summary.update(_pcts([r.ttft for r in ok if r.ttft is not None], "ttft"))
    summary.update(_pcts([x for r in ok for x in r.itls], "itl"))
    summary.update(_pcts([r.latency for r in ok], "e2el"))
    summary["errors"] = sorted({r.error for r in results if r.error})[:10]
    return summary


async def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.num_requests < 1 or cfg.input_len < 1 or cfg.output_len < 1 or not cfg.rate > 0:
        raise ValueError("num_requests, input_len, output_len and rate must be positive")
    rng = random.Random(cfg.seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency or cfg.num_requests, max_keepalive_connections=64)
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    sem = asyncio.Semaphore(cfg.max_concurrency or cfg.num_requests)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(cfg.timeout)) as client:
        model = cfg.model or await _model(client)
        bodies = [_body(cfg, model, _prompt(rng, cfg.input_len)) for _ in range(cfg.num_requests)]

        async def limited(body: dict[str, Any]) -> RequestResult:
            async with sem:
                return await _one(client, path, body)

        tasks = []
        start = time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.ensure_future(limited(body)))
            if math.isfinite(cfg.rate):
                await asyncio.sleep(rng.expovariate(cfg.rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "model": model,
            "config": {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in asdict(cfg).items() if k != "api_key"},
            **summarize(list(results), duration)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--rate", type=float, default=math.inf, help="requests per second (Poisson); inf = all at once")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (about tokens)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that reject it)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--output", default=None, help="write the results as JSON here")


def run_from_args(a: argparse.Namespace) -> int:
    cfg = BenchConfig(url=a.url, num_requests=a.num_requests, rate=a.rate, input_len=a.input_len,
                      output_len=a.output_len, model=a.model, api_key=a.api_key, endpoint=a.endpoint,
                      max_concurrency=a.max_concurrency, ignore_eos=a.ignore_eos, seed=a.seed, timeout=a.timeout)
    result = asyncio.run(run_benchmark(cfg))
    result["command"] = " ".join(sys.argv)
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "mean_ttft_ms",
                "p50_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms"):
        v = result[key]
        print(f"{key:>22}: {v:.2f}" if isinstance(v, float) else f"{key:>22}: {v}")
    for err in result["errors"]:
        print(f"error: {err}", file=sys.stderr)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["failed"] == 0 else 1
