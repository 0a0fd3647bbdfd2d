"""benchmarks/gemv_probe.py --device cpu --quick: every path of the GPU GEMV probe (sweep, split-K,
fused gate_up, JSON, tuned-config round trip) at tiny shapes under the Triton interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_gemv_probe_cpu_quick(tmp_path: object) -> None:
    pytest.importorskip("triton")
    out = os.path.join(str(tmp_path), "gemv.json")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gemv_probe.py"), "--device", "cpu",
                           "--quick", "--out", out], capture_output=True, text=True, timeout=280, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        doc = json.load(f)
    assert {"device", "date", "commit", "command", "metrics", "details"} <= set(doc)
    m = doc["metrics"]
    assert m["cases"] == 10 and m["cases_failed"] == 0  # 4 projections + fused gate_up, M 1 and 3
    assert m["max_rel_err"] < 1e-4  # fp32
    cases = doc["details"]["cases"]
    assert any(s["config"]["split_k"] > 1 and "us" in s for c in cases for s in c["sweep"])
    assert {c["kind"] for c in cases} == {"linear", "gate_up"}

    from distrt.kernels import gemv

    saved = dict(gemv._TUNED)
    try:
        assert gemv.load_tuned(out) == len(doc["details"]["best_configs"]) > 0
    finally:
        gemv._TUNED.clear()
        gemv._TUNED.update(saved)
