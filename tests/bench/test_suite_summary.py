"""benchmarks/suite_summary.py: headline names from the suite's per-step result files and step times."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _summary():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("suite_summary", os.path.join(ROOT, "benchmarks", "suite_summary.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_summary_collects_headlines(tmp_path: os.PathLike) -> None:
    def put(name: str, metrics: dict, details: dict | None = None) -> None:
        json.dump({"device": "d", "date": "t", "commit": "c", "command": f"make {name}", "metrics": metrics,
                   "details": details or {}}, open(os.path.join(tmp_path, name), "w"))

    put("throughput_1000_1000.json", {"output_tok_s": 7000.0, "throughput_vs_hf_generate_batch": 9.5,
                                      "hf_generate_batch_output_tok_s": 737.0, "hf_first_token_agreement": 0.9},
        {"num_prompts": 512, "hf_generate_batch": {"num_prompts": 224, "capped": True}})
    put("throughput_128_128.json", {"output_tok_s": 20000.0})
    put("engine_overhead.json", {"engine_vs_bare_graph_decode": 0.96, "engine_vs_bare_graph_decode_bs64": 0.97,
                                 "engine_decode_tok_s_bs64": 1.0})
    put("e2e.json", {"bs1_decode_roofline_fraction_31_8b": 0.8})
    os.utime(os.path.join(tmp_path, "e2e.json"), (1000.0, 1000.0))  # an earlier run's file
    with open(os.path.join(tmp_path, "steps.tsv"), "w") as f:
        f.write("tput_1000_1000\t0\t201.5\t230\nkernels\tskipped\t0\t12\n")
    out = os.path.join(tmp_path, "suite.json")
    assert _summary().main([str(tmp_path), "--since", "2000", "--out", out]) == 0
    doc = json.load(open(out))
    m = doc["metrics"]
    assert m == {"throughput_tok_s_8b_1000_1000": 7000.0, "throughput_vs_hf_generate_batch": 9.5,
                 "hf_generate_batch_output_tok_s": 737.0, "hf_first_token_agreement": 0.9,
                 "throughput_tok_s_8b_128_128": 20000.0, "engine_vs_bare_graph_decode": 0.96,
                 "engine_vs_bare_graph_decode_bs64": 0.97}
    src = doc["details"]["sources"]
    assert src["throughput_2048_128.json"] == "missing" and src["e2e.json"] == "stale"
    assert src["throughput_1000_1000.json"]["num_prompts"] == 512
    assert src["throughput_1000_1000.json"]["hf_generate_batch"]["num_prompts"] == 224
    assert [s["step"] for s in doc["details"]["steps"]] == ["tput_1000_1000", "kernels"]
    assert doc["details"]["steps_total_s"] == 201.5
