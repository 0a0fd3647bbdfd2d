"""Clients that leave: their requests are aborted and their KV blocks freed at once; the rest are unaffected."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server_helpers import ServerProcess, wait_idle


def _metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rpartition(" ")[2])
    raise KeyError(name)


@pytest.fixture()
def slow_steps(server: ServerProcess) -> Iterator[None]:
    def fault(kind: str, seconds: float = 0.0) -> None:
        r = httpx.post(server.url + "/debug/fault", json={"kind": kind, "seconds": seconds}, headers=server.headers)
        assert r.status_code == 200, r.text

    fault("delay", 0.05)
    try:
        yield
    finally:
        fault("none")


def test_200_concurrent_with_20_cancelled(server: ServerProcess) -> None:
    rng = random.Random(0)
    cancelled = set(rng.sample(range(200), 20))
    budgets = [100 if i in cancelled else rng.randint(4, 24) for i in range(200)]
    aborted_before = _metric(server, "distrt_request_aborted_total")

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None, str]:
        prompt = " ".join(f"w{rng.randint(3, 200)}" for _ in range(rng.randint(1, 6)))
        stream = await client.completions.create(
            model="llama-gqa", prompt=prompt, max_tokens=budgets[i], temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage, finish, text = -1, None, ""
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
            if i in cancelled and text:
                await stream.close()  # mid-stream: the request still had ~100 tokens to go
                break
        return i, usage, finish, text

    async def run() -> list[tuple[int, int, str | None, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0,
                                      timeout=120.0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    for i, usage, finish, text in results:
        if i in cancelled:
            assert usage == -1 and finish is None and text
        else:
            assert usage == budgets[i] and finish == "length", (i, usage, finish)
    state = wait_idle(server)
    assert state["integrity"] == "ok" and state["num_running"] == 0 and state["num_waiting"] == 0
    assert _metric(server, "distrt_kv_cache_usage_ratio") == 0.0
    assert _metric(server, "distrt_num_requests_running") == 0.0
    assert _metric(server, "distrt_request_aborted_total") - aborted_before == 20
    assert time.monotonic() - t0 < 90


def _kv_free(server: ServerProcess) -> tuple[int, int]:
    s = httpx.get(server.url + "/debug/state", headers=server.headers).json()
    return s["num_free_blocks"], s["num_blocks"]


def test_disconnect_frees_blocks_at_once(server: ServerProcess, slow_steps: None) -> None:
    body: dict[str, Any] = {"prompt": "w5 w6 w7", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30.0) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            free, total = _kv_free(server)
            assert free < total  # the request holds blocks while it streams (120 tokens x 50 ms)
    t0 = time.monotonic()
    wait_idle(server, timeout=2.0)  # well before the ~6 s it would take to finish
    assert time.monotonic() - t0 < 2.0

    # non-streaming: the client times out and closes the connection
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, headers=server.headers,
                   timeout=httpx.Timeout(30.0, read=0.5))
    wait_idle(server, timeout=2.0)
