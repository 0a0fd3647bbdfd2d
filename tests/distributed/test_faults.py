"""A worker killed mid-generation, or a collective that never completes: every in-flight request
fails with EngineDeadError within 10 s, later calls raise it too, and no worker process is left."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from distrt import LLM, EngineDeadError, SamplingParams
from proc_utils import wait_gone
from tiny_models import make_tiny_checkpoint

LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("fault")), "llama-gqa")


def _llm(ckpt: str, executor: str) -> LLM:
    return LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, tensor_parallel_size=2,
               executor=executor, step_timeout_s=4.0)


def _expect_dead(llm: LLM, within: float) -> None:
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError):
        llm.generate(["w5 w6"] * 64, LONG, use_tqdm=False)
    assert time.monotonic() - t0 < within
    assert not llm.engine.has_unfinished_requests()  # every in-flight request was failed
    with pytest.raises(EngineDeadError, match="dead"):
        llm.generate("w5", LONG, use_tqdm=False)


@pytest.fixture(params=["mpi", "ray"], ids=["mpi_executor", "ray_executor"])
def executor(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        pytest.importorskip("ray")
    return request.param


def test_killed_worker_fails_engine(ckpt: str, executor: str) -> None:
    llm = _llm(ckpt, executor)
    try:
        assert llm.generate("w5", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
        pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
        threading.Timer(0.3, lambda: os.kill(pids[1], signal.SIGKILL)).start()
        _expect_dead(llm, within=10.0)
    finally:
        llm.shutdown()
    assert wait_gone(pids, 15), "worker processes left behind"


def test_hung_collective_is_caught_by_watchdog(ckpt: str, executor: str) -> None:
    llm = _llm(ckpt, executor)
    try:
        pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
        llm._executor.inject_fault(1, "hang", 3)  # type: ignore[attr-defined]
        _expect_dead(llm, within=10.0)  # step_timeout_s=4
    finally:
        llm.shutdown()
    assert wait_gone(pids, 15), "worker processes left behind"


def test_worker_exception_fails_engine(ckpt: str) -> None:
    llm = _llm(ckpt, "mpi")
    try:
        pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
        llm._executor.inject_fault(0, "raise", 2)  # type: ignore[attr-defined]
        _expect_dead(llm, within=10.0)
    finally:
        llm.shutdown()
    assert wait_gone(pids, 15)
