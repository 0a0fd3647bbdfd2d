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


def test_bench_latency_counts_only_full_batch_decode_steps(capsys) -> None:  # type: ignore[no-untyped-def]
    """64 prompts of 400 tokens take 13 prefill steps of 2048 tokens; with 8 new tokens the first
    sequences are done before the last start decoding, so no step measures batch 64: a clear error
    (exit code 2), not the step time of a smaller batch."""
    rc = main(["bench", "latency", "--shape", "llama-tiny", "--device", "cpu", "--dtype", "float32",
               "--input-len", "400", "--output-len", "8", "--batch-sizes", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "no step decoded all 64 sequences" in err and "raise --output-len" in err


def test_bench_throughput_records_where_the_time_goes(tmp_path: os.PathLike) -> None:
    out = os.path.join(tmp_path, "s.json")
    assert main(["bench", "throughput", "--shape", "llama-tiny", "--device", "cpu", "--dtype", "float32",
                 "--input-len", "64", "--output-len", "16", "--num-prompts", "40", "--max-num-seqs", "16",
                 "--out", out]) == 0
    steps = json.load(open(out))["details"]["steps"]
    dec, pre = steps["decode_only"], steps["with_prompt_tokens"]
    assert dec["mean_decode_rows"] == dec["mean_tokens"] and pre["mean_tokens"] > pre["mean_decode_rows"]
    # 640 output tokens, at most 16 per step (the first step has no interval before it, so it is not
    # counted); 40 prompts, 16 at a time, need several steps with prompt tokens
    assert dec["steps"] + pre["steps"] >= 640 // 16 - 1 and pre["steps"] >= 2 and dec["seconds"] > 0


def test_bench_throughput_generate_batch_baseline_on_a_subset(tmp_path: os.PathLike) -> None:
    """transformers' continuous batching on the first 2 prompts, on distrt's weights: its greedy first
    tokens are distrt's (fp32), and the subset and cap are recorded."""
    out = os.path.join(tmp_path, "t.json")
    assert main(["bench", "throughput", "--shape", "llama-tiny", "--device", "cpu", "--dtype", "float32",
                 "--input-len", "8", "--output-len", "4", "--num-prompts", "4", "--baseline", "generate_batch",
                 "--hf-num-prompts", "2", "--hf-time-cap-s", "120", "--out", out]) == 0
    doc = json.load(open(out))
    m, d = doc["metrics"], doc["details"]
    assert m["hf_generate_batch_output_tok_s"] > 0
    assert abs(m["throughput_vs_hf_generate_batch"] - m["output_tok_s"] / m["hf_generate_batch_output_tok_s"]) < 1e-9
    assert m["hf_first_token_agreement"] == 1.0
    hb = d["hf_generate_batch"]
    assert hb["num_prompts"] == 2 and hb["compared_first_tokens"] == 2 and hb["time_cap_s"] == 120
    assert not hb["capped"] and hb["finished"] == 2 and hb["output_tokens"] == 2 * 4
    assert d["num_prompts"] == 4 and d["preemptions"] == 0
