"""Collects the headline numbers of one gpu_suite.sh run into suite.json, with where each came from.

    python benchmarks/suite_summary.py DIR [--since EPOCH_S] [--steps DIR/steps.tsv] [--out DIR/suite.json]

Metrics (absent where the step that makes them did not finish):
  throughput_tok_s_8b_{1000_1000,128_128,2048_128}   distrt offline output tokens/s, Llama-3.1-8B shape
  throughput_tok_s_8b_1000_1000_fp8kv                 the same 1000/1000 with the FP8 KV cache (448 at once)
  throughput_vs_hf_generate_batch, hf_generate_batch_output_tok_s, hf_first_token_agreement   (1000/1000)
  engine_vs_bare_graph_decode[_bs{B}]                 engine decode tok/s over the bare graph loop
  latency step_ms_p50_bs{B}, the e2e batch-1 roofline fractions and speed-ups, copy bandwidth, GEMM
  rate, and the kernels' decode-attention bandwidth fraction and prefill-attention ratio to SDPA
details: per source file its command, date, commit and workload ("missing", or "stale" when written
before --since: an earlier run's file is never quoted as this run's); the suite's step times (steps.tsv).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrt.bench.results import write_result  # noqa: E402

# file -> [(metric in the file, headline name)]; a name ending in '*' copies every metric with that prefix
SOURCES: dict[str, list[tuple[str, str]]] = {
    "throughput_1000_1000.json": [("output_tok_s", "throughput_tok_s_8b_1000_1000"),
                                  ("throughput_vs_hf_generate_batch", "throughput_vs_hf_generate_batch"),
                                  ("hf_generate_batch_output_tok_s", "hf_generate_batch_output_tok_s"),
                                  ("hf_first_token_agreement", "hf_first_token_agreement")],
    "throughput_1000_1000_fp8kv.json": [("output_tok_s", "throughput_tok_s_8b_1000_1000_fp8kv")],
    "throughput_128_128.json": [("output_tok_s", "throughput_tok_s_8b_128_128")],
    "throughput_2048_128.json": [("output_tok_s", "throughput_tok_s_8b_2048_128")],
    "engine_overhead.json": [("engine_vs_bare_graph_decode*", "")],
    "latency.json": [("step_ms_p50_bs*", "latency_")],
    "e2e.json": [("bs1_decode_roofline_fraction_*", ""), ("bs1_speedup_vs_hf_generate_*", ""),
                 ("bs1_async_vs_sync_scheduling_*", ""),
                 ("copy_bandwidth_gbps", "copy_bandwidth_gbps"), ("bf16_gemm_tflops", "bf16_gemm_tflops")],
    "kernels.json": [("decode_attention_hbm_fraction", "kernels_decode_attention_hbm_fraction"),
                     ("prefill_attention_vs_sdpa", "kernels_prefill_attention_vs_sdpa")],
}
WORKLOAD_KEYS = ("num_prompts", "input_len", "output_len", "max_num_seqs", "preemptions", "seconds", "hf_generate_batch",
                 "batch_sizes", "prompt_len", "decode_steps", "bare_mode", "async_scheduling", "new_tokens")


def summarize(folder: str, steps_path: str | None, since: float = 0.0) -> tuple[dict[str, float], dict[str, Any]]:
    metrics: dict[str, float] = {}
    sources: dict[str, Any] = {}
    for name, picks in SOURCES.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            sources[name] = "missing"
            continue
        if os.path.getmtime(path) < since:
            sources[name] = "stale"
            continue
        doc = json.load(open(path))
        m = doc.get("metrics", {})
        for key, new in picks:
            if key.endswith("*"):
                metrics.update({new + k: v for k, v in m.items() if k.startswith(key[:-1])})
            elif key in m:
                metrics[new] = m[key]
        d = doc.get("details", {})
        sources[name] = {"command": doc.get("command"), "date": doc.get("date"), "commit": doc.get("commit"),
                         **{k: d[k] for k in WORKLOAD_KEYS if isinstance(d, dict) and k in d}}
    details: dict[str, Any] = {"sources": sources}
    if steps_path and os.path.exists(steps_path):
        rows = [line.rstrip("\n").split("\t") for line in open(steps_path) if line.strip()]
        details["steps"] = [{"step": r[0], "rc": r[1], "seconds": float(r[2]), "timeout_s": float(r[3])}
                            for r in rows if len(r) == 4]
        details["steps_total_s"] = sum(s["seconds"] for s in details["steps"])
    return metrics, details


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--since", type=float, default=0.0, help="ignore result files older than this (epoch seconds)")
    ap.add_argument("--steps", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    metrics, details = summarize(a.folder, a.steps or os.path.join(a.folder, "steps.tsv"), a.since)
    out = a.out or os.path.join(a.folder, "suite.json")
    write_result(out, metrics, details)
    for k, v in metrics.items():
        print(f"{k:<45} {v:,.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
