"""DISTRT_TORCH_PROFILE: a torch-profiler window over a worker's steps writes one report per worker."""

from __future__ import annotations

import os

import pytest

from distrt import LLM, SamplingParams
from distrt.worker.profiling import StepProfiler


def test_profile_window_writes_a_report(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    out = os.path.join(str(tmp_path), "prof")
    monkeypatch.setenv("DISTRT_TORCH_PROFILE", out)
    monkeypatch.setenv("DISTRT_PROFILE_STEPS", "1:2")
    with LLM("shape:llama-tiny", dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=64) as llm:
        llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                     use_tqdm=False)
    text = open(os.path.join(out, "worker_tp0_pp0.txt")).read()
    rows = [line.split() for line in text.splitlines()[2:4]]
    assert [int(r[0]) for r in rows] == [1, 2]  # launches 1 and 2, host ms and gap each
    assert all(float(r[1]) > 0 for r in rows)
    assert "# by device time" in text and "# by host time" in text and "aten::" in text


def test_bad_window_spec_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRT_TORCH_PROFILE", "/tmp/x")
    monkeypatch.setenv("DISTRT_PROFILE_STEPS", "five")
    with pytest.raises(ValueError, match="DISTRT_PROFILE_STEPS must be <first>:<count>"):
        StepProfiler.from_env("w")


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTRT_TORCH_PROFILE", raising=False)
    assert StepProfiler.from_env("w") is None
