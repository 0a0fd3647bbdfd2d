"""benchmarks/moe_gpu.py --cpu-smoke: every path of the GPU MoE benchmark (kernel vs per-expert loop,
EP load before/after rebalancing, tp=2 vs tp=2 x ep=2 model under MPI) at tiny shapes on the CPU, so
the script that only runs on GPUs does not rot between device runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_moe_gpu_cpu_smoke(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "moe.json")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "moe_gpu.py"), "--cpu-smoke", "--out", out],
                          capture_output=True, text=True, timeout=360, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        doc = json.load(f)
    m = doc["metrics"]
    assert m["kernel_max_rel_err_vs_ref"] < 1e-4  # fp32 on the CPU
    assert m["ep_load_imbalance_before_rebalance"] > 1.25 >= m["ep_load_imbalance_after_rebalance"]
    assert m["model_tp2_output_tok_s"] > 0 and m["model_tp2_ep2_output_tok_s"] > 0
    assert {"device", "date", "commit", "command", "details"} <= set(doc)
