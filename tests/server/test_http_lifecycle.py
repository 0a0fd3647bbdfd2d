"""Process-level behaviour: the concurrency limit (429), a worker dying mid-stream, and the SIGTERM drain."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server_helpers import ServerProcess, tiny_server_args


def _fault(srv: ServerProcess, kind: str, seconds: float = 0.0) -> None:
    r = httpx.post(srv.url + "/debug/fault", json={"kind": kind, "seconds": seconds}, headers=srv.headers)
    assert r.status_code == 200, r.text


def _stream_events(srv: ServerProcess, max_tokens: int, started: concurrent.futures.Future[None]) -> list[Any]:
    """A streaming completion over raw HTTP; returns its SSE payloads (dicts, then "[DONE]")."""
    body = {"prompt": "w5 w6 w7", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    events: list[Any] = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=srv.headers, timeout=60.0) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                if not started.done():
                    started.set_result(None)
    return events


def _start_stream(pool: concurrent.futures.ThreadPoolExecutor, srv: ServerProcess,
                  max_tokens: int) -> concurrent.futures.Future[list[Any]]:
    started: concurrent.futures.Future[None] = concurrent.futures.Future()
    fut = pool.submit(_stream_events, srv, max_tokens, started)
    concurrent.futures.wait([started, fut], timeout=30, return_when=concurrent.futures.FIRST_COMPLETED)
    assert started.done(), fut.result()
    return fut


def _tokens(events: list[Any]) -> int:
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    return usage[-1]["completion_tokens"] if usage else -1


@pytest.fixture(scope="module")
def small(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("logs") / "small_server.log")
    srv = ServerProcess(tiny_model, *tiny_server_args("--max-concurrent-requests", "2", "--drain-timeout", "20"),
                        log_path=log).wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


def test_concurrency_limit(small: ServerProcess) -> None:
    _fault(small, "delay", 0.03)
    client = openai.OpenAI(base_url=small.url + "/v1", api_key=small.api_key, max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [_start_stream(pool, small, 40) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="llama-gqa", prompt="w5", max_tokens=2)
        assert info.value.code == "too_many_requests"
        assert httpx.get(small.url + "/v1/models", headers=small.headers).status_code == 200  # not generation
        assert [_tokens(f.result()) for f in running] == [40, 40]
    assert client.completions.create(model="llama-gqa", prompt="w5", max_tokens=2).usage.completion_tokens >= 1


def test_sigterm_drains_then_exits(small: ServerProcess) -> None:
    _fault(small, "delay", 0.03)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = _start_stream(pool, small, 100)  # about 3 s of steps
        small.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert not long.done()
        r = httpx.post(small.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 2}, headers=small.headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
        assert httpx.get(small.url + "/health").status_code == 503
        events = long.result(timeout=60)
    assert events[-1] == "[DONE]" and _tokens(events) == 100
    assert [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"]
            if c["finish_reason"]] == ["length"]
    assert small.proc.wait(30) == 0
    time.sleep(0.2)
    assert not small.group_alive()


def test_worker_death_mid_stream(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    log = str(tmp_path_factory.mktemp("logs") / "doomed_server.log")
    srv = ServerProcess(tiny_model, *tiny_server_args(), log_path=log).wait_ready()
    try:
        _fault(srv, "delay", 0.03)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0, timeout=30.0)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [_start_stream(pool, srv, 100) for _ in range(3)]
            t0 = time.monotonic()
            _fault(srv, "raise")
            for f in streams:
                events = f.result(timeout=30)
                errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
                assert len(errors) == 1 and errors[0]["code"] == "engine_unavailable", events[-3:]
                assert events[-1] == "[DONE]" and _tokens(events) == -1
            assert time.monotonic() - t0 < 10
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="llama-gqa", prompt="w5", max_tokens=2)
        assert info.value.status_code == 503
        with pytest.raises(openai.APIError):  # the official client raises on the error event mid-stream
            for _ in client.completions.create(model="llama-gqa", prompt="w5", max_tokens=2, stream=True):
                pass
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'distrt_engine_healthy{model_name="llama-gqa"} 0' in metrics
    finally:
        assert srv.stop() == 0
    assert not srv.group_alive()


def test_sigterm_drain_timeout_fails_what_is_left(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    log = str(tmp_path_factory.mktemp("logs") / "drain_timeout_server.log")
    srv = ServerProcess(tiny_model, *tiny_server_args("--drain-timeout", "1"), log_path=log).wait_ready()
    _fault(srv, "delay", 0.1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = _start_stream(pool, srv, 100)  # about 10 s of steps: outlives the 1 s drain
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        events = long.result(timeout=30)
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "engine_unavailable" and events[-1] == "[DONE]"
    assert srv.proc.wait(30) == 0 and time.monotonic() - t0 < 8
    time.sleep(0.2)
    assert not srv.group_alive()
    assert srv.stop() == 0


def test_killed_mpi_worker_mid_stream(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A real worker process (TP rank 1 under the MPI executor) is SIGKILLed while requests stream."""
    pytest.importorskip("mpi4py")
    from distrt.executor.mpi_executor import find_mpirun

    try:
        find_mpirun()
    except RuntimeError as e:
        pytest.skip(str(e))
    log = str(tmp_path_factory.mktemp("logs") / "mpi_server.log")
    srv = ServerProcess(tiny_model, *tiny_server_args("--tp", "2", "--executor", "mpi", "--step-timeout", "4"),
                        log_path=log).wait_ready()
    try:
        pids = httpx.get(srv.url + "/debug/state", headers=srv.headers).json()["worker_pids"]
        assert len(pids) == 2 and srv.proc.pid not in pids
        _fault(srv, "delay", 0.03)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [_start_stream(pool, srv, 100) for _ in range(3)]
            t0 = time.monotonic()
            os.kill(pids[1], signal.SIGKILL)
            for f in streams:
                events = f.result(timeout=30)
                errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
                assert len(errors) == 1 and errors[0]["code"] == "engine_unavailable", events[-3:]
                assert events[-1] == "[DONE]"
            assert time.monotonic() - t0 < 10
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 2}, headers=srv.headers)
        assert r.status_code == 503
    finally:
        assert srv.stop() == 0
    assert not srv.group_alive()
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "worker processes left behind"
