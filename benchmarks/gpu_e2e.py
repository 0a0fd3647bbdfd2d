"""One GPU: batch-1 decode of random-weight Llama-3.1-8B and Llama-3.2-1B shapes (bf16, 128-token
prompt, 512 new tokens) against the bandwidth roofline measured in the same run, and transformers
`generate` on the same shapes.

    python benchmarks/gpu_e2e.py [--new-tokens 512] [--shapes llama-3.1-8b,llama-3.2-1b] [--out PATH]

bs1_decode_roofline_fraction = (bytes read per step / measured copy bandwidth) / measured time per
token, bytes = every weight a decode step reads (not the input embedding table, of which it reads
one row) + the KV cache read at the mean context.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels_gpu import device_slug, measure_copy_bandwidth, measure_gemm_tflops  # noqa: E402
from results_io import write_result  # noqa: E402


def decode_bytes(cfg: Any, model: torch.nn.Module, context: float) -> float:
    params = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if not (n.startswith("embed_tokens") and not cfg.tie_word_embeddings))
    kv = context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return params + kv


def bench_ours(shape: str, prompt_len: int, new: int, async_scheduling: bool = True) -> dict[str, float]:
    from distrt import LLM, SamplingParams

    llm = LLM(f"shape:{shape}", dtype="bfloat16", device="cuda", max_model_len=prompt_len + new + 16,
              max_num_seqs=4, kv_cache_memory=0.2, async_scheduling=async_scheduling)
    eng = llm.engine
    prompt = {"prompt_token_ids": list(range(100, 100 + prompt_len))}
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    eng.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    eng.step()  # prefill + first token
    torch.cuda.synchronize()
    steps = 0
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    dt = (time.perf_counter() - t0) / steps
    runner = llm._executor.worker.runner  # type: ignore[attr-defined]
    model = runner.model
    replay_ms = float("nan")
    if runner.graphs is not None:  # the GPU's own time per decode step: the graph alone, back to back
        g = runner.graphs.graphs[runner.graphs.padded_size(1)]
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        e0.record()
        for _ in range(50):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        replay_ms = e0.elapsed_time(e1) / 50
    nbytes = decode_bytes(llm.config.model, model, prompt_len + new / 2)
    llm.shutdown()
    del llm, eng, model
    gc.collect()
    torch.cuda.empty_cache()
    return {"ms_per_token": dt * 1e3, "bytes_per_step": nbytes, "steps": steps, "graph_replay_ms": replay_ms}


def bench_hf(shape: str, prompt_len: int, new: int) -> float:
    from transformers import AutoModelForCausalLM

    from distrt.models.shapes import fill_random_, hf_config, shape_config

    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config(shape_config(shape)), dtype=torch.bfloat16).eval()
    fill_random_(hf)  # the weights distrt ran
    ids = torch.arange(100, 100 + prompt_len, device="cuda")[None]

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(8)
    per_token = (run(new + 1) - run(1)) / new
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return per_token * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-3.1-8b,llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    slug = device_slug(torch.cuda.get_device_name(0))
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", slug, "e2e.json")
    bw = measure_copy_bandwidth(False)  # GB/s, read + write
    gemm = measure_gemm_tflops(False)
    metrics: dict[str, float] = {"copy_bandwidth_gbps": bw, "bf16_gemm_tflops": gemm}
    details: dict[str, Any] = {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    for shape in a.shapes.split(","):
        key = shape.replace("llama-", "").replace(".", "").replace("-", "_")  # 31_8b, 32_1b
        ours = bench_ours(shape, a.prompt_len, a.new_tokens)
        roofline_ms = ours["bytes_per_step"] / (bw * 1e9) * 1e3
        metrics[f"bs1_ms_per_token_{key}"] = ours["ms_per_token"]
        metrics[f"bs1_decode_roofline_fraction_{key}"] = roofline_ms / ours["ms_per_token"]
        metrics[f"bs1_graph_only_roofline_fraction_{key}"] = roofline_ms / ours["graph_replay_ms"]
        metrics[f"bs1_host_overhead_ms_{key}"] = ours["ms_per_token"] - ours["graph_replay_ms"]
        sync = bench_ours(shape, a.prompt_len, a.new_tokens, async_scheduling=False)
        metrics[f"bs1_ms_per_token_sync_scheduling_{key}"] = sync["ms_per_token"]
        metrics[f"bs1_async_vs_sync_scheduling_{key}"] = ours["ms_per_token"] / sync["ms_per_token"]
        details[shape] = {**ours, "roofline_ms": roofline_ms, "sync_scheduling": sync}
        if not a.skip_hf:
            hf_ms = bench_hf(shape, a.prompt_len, a.new_tokens)
            metrics[f"hf_generate_ms_per_token_{key}"] = hf_ms
            metrics[f"bs1_speedup_vs_hf_generate_{key}"] = hf_ms / ours["ms_per_token"]
        print(shape, {k: v for k, v in metrics.items() if key in k}, flush=True)
    doc = write_result(out, metrics, details)
    print(doc)


if __name__ == "__main__":
    main()
