"""benchmarks/gpu_multi.py on CPU ranks at tiny shapes: the parity check (tp=4, tp=2 x pp=2, a MoE at
tp=4 x ep=4 through the MPI executor, scored teacher-forced against transformers and one process) and
the throughput bench (tp=1, tp=4, tp=2 x pp=2), so the 4/8-GPU suite's scripts do not rot between
device runs; and the bench's ratios against TensorRT-LLM's recorded figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_multi.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=540, env=env,
                          cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parity_cpu_four_ranks(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "parity.json")
    proc = _run("parity", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.load(open(out))
    m = doc["metrics"]
    assert m["all_pass"] is True
    for key in ("dense_tp4", "dense_tp2xpp2", "moe_tp4xep4"):
        assert m[f"{key}_top1_vs_transformers"] >= 0.99 and m[f"{key}_top1_vs_one_device"] >= 0.99, m
        assert doc["details"][key]["vs_transformers"]["positions"] > 0
    assert doc["details"]["dense_tp2xpp2"]["max_in_flight_seen"] == 2  # two micro-batches in flight
    assert {"device", "date", "commit", "command"} <= set(doc)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_cpu_layouts(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "bench.json")
    proc = _run("bench", "--device", "cpu", "--shape", "llama-tiny", "--layouts", "tp1,tp4,tp2xpp2", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.load(open(out))["metrics"]
    for lay in ("tp1", "tp4", "tp2xpp2"):
        assert m[f"{lay}_tok_s_16x8"] > 0 and m[f"{lay}_bs1_ms_per_token"] > 0
    assert m["tp4_vs_tp1_throughput_16x8"] > 0 and m["tp2xpp2_vs_tp1_bs1_latency"] > 0


def test_trtllm_ratios_and_layout_names() -> None:
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_multi as gm
    from trtllm_reference import TRTLLM_REFERENCE

    assert [x.name for x in gm.parse_layouts("tp4,tp2xpp2,tp4xep4,tp1,tp4@ray")] == \
        ["tp4", "tp2xpp2", "tp4xep4", "tp1", "tp4@ray"]
    with pytest.raises(ValueError):
        gm.parse_layout("tp4xdp2")
    assert gm.parse_workloads("128x128x512,1000x1000x256") == [(128, 128, 512), (1000, 1000, 256)]
    runs = {"tp4": {"startup_s": 1.0, "gpus": 4, "128x128": {"output_tok_s": 4000.0, "gpu_idle_fraction": 0.0}},
            "tp8": {"error": "boom"}}
    m = gm._bench_metrics(runs, [(128, 128, 512)], "llama-3.1-70b", trtllm=True)
    h200 = TRTLLM_REFERENCE["llama-3.1-70b"]["configs"]["h200_tp1_fp8"]
    assert m["tp4_per_gpu_vs_trtllm_h200_tp1_fp8_128x128"] == pytest.approx(1000.0 / h200["128x128"])
    assert m["tp8_error"] is True and "tp8_tok_s_128x128" not in m
