"""benchmarks/engine_overhead.py end to end at a tiny shape on CPU (no graph: the bare loop runs
eagerly), and the shape checkpoint that makes the transformers baselines run on distrt's weights."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("engine_overhead", os.path.join(ROOT, "benchmarks", "engine_overhead.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_overhead_writes_ratios(tmp_path: os.PathLike) -> None:
    out = os.path.join(tmp_path, "eo.json")
    doc = _load_script().main(["--shape", "llama-tiny", "--device", "cpu", "--batch-sizes", "2,4", "--prompt-len", "8",
                               "--decode-steps", "6", "--repeats", "1", "--out", out])
    on_disk = json.load(open(out))
    assert on_disk == json.loads(json.dumps(doc))
    assert {"device", "date", "commit", "command", "metrics", "details"} <= on_disk.keys()
    m = on_disk["metrics"]
    for b in (2, 4):
        eng, bare = m[f"engine_decode_tok_s_bs{b}"], m[f"bare_graph_decode_tok_s_bs{b}"]
        assert eng > 0 and bare > 0
        assert abs(m[f"engine_vs_bare_graph_decode_bs{b}"] - eng / bare) < 1e-9
        assert m[f"engine_step_ms_bs{b}"] > 0 and m[f"bare_graph_step_ms_bs{b}"] > 0
    assert m["engine_vs_bare_graph_decode"] == min(m["engine_vs_bare_graph_decode_bs2"], m["engine_vs_bare_graph_decode_bs4"])
    d = on_disk["details"]
    assert d["bare_mode"] == "eager" and d["batch_sizes"] == [2, 4]
    row = d["rows"][0]["engine"][0]
    # one prefill step, then decodes of all requests; the finishing step is left out
    assert row["prefill_calls"] == 1 and row["steps"] == 6 - 2


def test_engine_overhead_bare_loop_through_the_graph_buffers(tmp_path: os.PathLike, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """DISTRT_EAGER_GRAPHS=1: the runner builds its decode graphs' static buffers on CPU and replays
    eagerly, so the bare loop's graph path (buffer filling, padding rows, device-side advance) runs."""
    monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    doc = _load_script().main(["--shape", "llama-tiny", "--device", "cpu", "--batch-sizes", "3", "--prompt-len", "8",
                               "--decode-steps", "6", "--repeats", "1", "--out", os.path.join(tmp_path, "eo.json")])
    assert doc["details"]["bare_mode"] == "eager_graph_emulation"
    assert doc["metrics"]["bare_graph_decode_tok_s_bs3"] > 0 and doc["metrics"]["engine_decode_tok_s_bs3"] > 0


def test_shape_weights_match_transformers_filled_by_name() -> None:
    """distrt's shape model and a transformers model filled by fill_random_ are the same model:
    the same greedy tokens as transformers' own forward."""
    from transformers import AutoModelForCausalLM

    from distrt import LLM, SamplingParams
    from distrt.models.shapes import fill_random_, hf_config, shape_config
    from tiny_models import hf_greedy

    llm = LLM("shape:llama-tiny", device="cpu", dtype="float32", max_model_len=64)
    prompt = [5, 17, 99, 3, 42, 7]
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()
    hf = fill_random_(AutoModelForCausalLM.from_config(hf_config(shape_config("llama-tiny")), dtype=torch.float32).eval())
    assert ours == hf_greedy(hf, prompt, 8)
    # and the weights are not the transformers default init: filling changed them
    other = AutoModelForCausalLM.from_config(hf_config(shape_config("llama-tiny")), dtype=torch.float32).eval()
    assert not torch.equal(other.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)
