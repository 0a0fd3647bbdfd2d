"""`bench serve` against the test server: bounded count, streaming, latency percentiles, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from server_helpers import REPO, ServerProcess


def test_bench_serve_cli(server: ServerProcess, tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "bench.json")
    cmd = [sys.executable, "-m", "distrt.server", "bench", "serve", "--url", server.url, "--api-key", "test-key",
           "--rate", "50", "--num-requests", "12", "--input-len", "6", "--output-len", "5", "--output", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.load(open(out))
    assert res["completed"] == 12 and res["failed"] == 0 and res["model"] == "llama-gqa"
    assert res["total_output_tokens"] == 12 * 5
    assert res["total_input_tokens"] >= 12 * 6  # unknown words are one <unk> token each here
    assert 0 < res["p50_ttft_ms"] <= res["p99_ttft_ms"]
    assert 0 < res["p50_itl_ms"] <= res["p99_itl_ms"]
    assert res["output_throughput"] > 0 and "p99_ttft_ms" in proc.stdout


def test_bench_serve_reports_failures(server: ServerProcess, tmp_path: object) -> None:
    cmd = [sys.executable, "-m", "distrt.server", "bench", "serve", "--url", server.url, "--api-key", "wrong",
           "--model", "llama-gqa", "--num-requests", "3", "--output-len", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr
