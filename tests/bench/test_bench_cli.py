"""`distrt bench throughput|latency` end to end on a small random-weight shape (CPU)."""

from __future__ import annotations

import json
import os

from distrt.cli import main


def test_bench_throughput_writes_json_and_plot(tmp_path: os.PathLike) -> None:
    out, png = os.path.join(tmp_path, "t.json"), os.path.join(tmp_path, "t.png")
    rc = main(["bench", "throughput", "--shape", "llama-tiny", "--device", "cpu", "--dtype", "float32",
               "--input-len", "8", "--output-len", "4", "--num-prompts", "4", "--baseline", "generate",
               "--hf-batch-size", "4", "--out", out, "--plot", png])
    assert rc == 0
    doc = json.load(open(out))
    assert {"device", "date", "commit", "command", "metrics"} <= doc.keys()
    m = doc["metrics"]
    assert m["output_tok_s"] > 0 and m["hf_generate_output_tok_s"] > 0
    assert abs(m["throughput_vs_hf_generate"] - m["output_tok_s"] / m["hf_generate_output_tok_s"]) < 1e-9
    assert doc["details"]["num_prompts"] == 4
    assert os.path.getsize(png) > 1000


def test_bench_latency_rows(tmp_path: os.PathLike) -> None:
    out = os.path.join(tmp_path, "l.json")
    assert main(["bench", "latency", "--shape", "llama-tiny", "--device", "cpu", "--dtype", "float32",
                 "--input-len", "8", "--output-len", "4", "--batch-sizes", "1,2", "--out", out]) == 0
    rows = json.load(open(out))["details"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["step_ms_p99"] >= r["step_ms_p50"] > 0 for r in rows)
