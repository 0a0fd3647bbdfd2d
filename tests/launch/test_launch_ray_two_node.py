"""launch/slurm/distrt-ray.sbatch in its two-node form on one host, without Slurm: the script runs
unchanged under srun/scontrol stand-ins (benchmarks/ray_two_node_gpu.py, which on 2 GPUs gives each
Ray node one GPU; see benchmarks/gpu_x2_suite.sh). Here on CPUs: two Ray nodes of one CPU each,
`distrt serve --tp 2 --executor ray`, one HTTP completion equal to a tp=1 run's text, Ray stopped."""

from __future__ import annotations

import json
import os
import sys

import pytest

from launch_helpers import REPO, launch_env, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SCRIPT = os.path.join(REPO, "benchmarks", "ray_two_node_gpu.py")


def test_sbatch_two_node_form_serves_the_tp1_text(tmp_path: object) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("fastapi")
    out = os.path.join(str(tmp_path), "ray_two_node.json")
    proc = run([sys.executable, SCRIPT, "--device", "cpu", "--mode", "sbatch", "--max-tokens", "12", "--out", out,
                "--log-dir", str(tmp_path)], timeout=360, env=launch_env())
    log = os.path.join(str(tmp_path), "ray_two_node_sbatch.log")
    tail = (open(log).read()[-3000:] if os.path.exists(log) else "") + proc.stdout[-3000:] + proc.stderr[-2000:]
    assert os.path.exists(out), tail
    with open(out) as f:
        doc = json.load(f)
    m = doc["metrics"]
    assert doc["details"]["mode"] == "sbatch" and not doc["details"]["errors"], (doc["details"], tail)
    assert m["ray_nodes_alive"] == 2 and m["workers_on_different_nodes"], (doc, tail)
    assert m["http_status"] == 200 and m["greedy_matches_tp1"], (doc["details"], tail)
    assert m["ray_stopped"] and m["ok"] and proc.returncode == 0, (doc, tail)
