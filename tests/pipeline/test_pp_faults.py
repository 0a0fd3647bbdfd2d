"""Faults with two plans in flight (pp=2 under MPI): a killed last-stage worker, or a stage that
hangs, fail the engine with EngineDeadError within the watchdog, and no worker is left behind."""

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
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ppf")), "llama-gqa", num_hidden_layers=4)


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_pp2_fault_fails_engine(ckpt: str, fault: str) -> None:
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, pipeline_parallel_size=2, executor="mpi",
              step_timeout_s=4.0)
    try:
        pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
        if fault == "kill":
            assert llm.generate("w5", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
            threading.Timer(0.3, lambda: os.kill(pids[1], signal.SIGKILL)).start()
        else:
            llm._executor.inject_fault(1, "hang", 3)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate(["w5 w6"] * 16, LONG, use_tqdm=False)
        assert time.monotonic() - t0 < 10.0
        assert not llm.engine.has_unfinished_requests()  # every in-flight request was failed
        with pytest.raises(EngineDeadError, match="dead"):
            llm.generate("w5", LONG, use_tqdm=False)
    finally:
        llm.shutdown()
    assert wait_gone(pids, 15), "worker processes left behind"
