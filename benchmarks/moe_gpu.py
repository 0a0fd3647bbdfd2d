"""Mixture of experts on GPUs (issue 6), about 2-3 minutes on 2 H200s. Three parts:

  kernel   the Triton fused MoE (bf16) against the per-expert torch loop (fused_moe_ref with bf16
           GEMMs, one expert at a time, as transformers' eager experts run) on the expert shapes of
           Mixtral-8x7B (E 8, top-2, H 4096, I 14336) and Qwen3-30B-A3B (E 128, top-8, H 2048, I 768):
           time per call (decode T <= 64 as a CUDA-graph replay), TFLOP/s = 2*T*k*3*H*I / time and
           its fraction of the measured bf16 GEMM rate, bytes/time against the measured copy
           bandwidth, the loop's time over the kernel's, and both errors against the fp32 reference;
  load     one Mixtral-shaped FusedMoE layer at ep=2 with 2 redundant slots under a skewed router
           (experts 2-4, all on EP rank 0 at first, get most tokens): max/mean routed (token, expert)
           pairs per EP rank, counted from the layer's own dispatch, with the initial placement and
           after one rebalance computed from an earlier batch's load (both on a fresh batch);
  model    a Mixtral-shaped random bf16 model (shape:mixtral-8x7b-16l: 8 experts, H 4096, 16 layers)
           on 2 GPUs under MPI: tp=2 (every expert split by rows) against tp=2 x ep=2 (whole experts
           per GPU), saturated offline throughput (N requests, 128 in / 128 out).

    python benchmarks/moe_gpu.py [--quick] [--skip-model] [--requests N] [--out PATH]
    python benchmarks/moe_gpu.py --cpu-smoke   # every path at tiny shapes on the CPU: runs, measures nothing

Writes {"device", "date", "commit", "command", "metrics", "details"} to benchmarks/results/<slug>x2/moe.json
(<slug> without x2 when fewer than 2 GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

if "--cpu-smoke" in sys.argv:  # Triton picks interpreter or compiler at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distrt.bench.kernels import bench_ms, device_slug, graph_ms, measure_copy_bandwidth, measure_gemm_tflops  # noqa: E402
from distrt.bench.results import write_result  # noqa: E402
from distrt.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402

SHAPES = {
    "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, inter=14336),
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768),
}
SMOKE_SHAPES = {"mixtral-8x7b": dict(experts=8, top_k=2, hidden=64, inter=96),
                "qwen3-30b-a3b": dict(experts=16, top_k=4, hidden=32, inter=24)}
SKEW = (0.0, 0.0, 2.0, 1.6, 1.2, 0.0, 0.0, 0.0)  # router logit offsets per expert (load part)


class Run:
    """Where and how big: the GPU at full size, or the CPU at tiny shapes (--cpu-smoke)."""

    def __init__(self, smoke: bool, quick: bool) -> None:
        self.smoke, self.quick = smoke, quick
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16

    def ms(self, fn: Callable[[], Any], graph: bool = False) -> float:
        if self.smoke:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return graph_ms([fn]) if graph else bench_ms(fn, self.quick)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@torch.inference_mode()
def kernel_case(run: Run, name: str, s: dict[str, int], tokens: int, copy_gbps: float, gemm_tflops: float) -> dict[str, Any]:
    e, k, h, i = s["experts"], s["top_k"], s["hidden"], s["inter"]
    g = torch.Generator(device=run.device).manual_seed(tokens)
    x = torch.randn(tokens, h, device=run.device, dtype=run.dtype, generator=g)
    w13 = torch.randn(e, 2 * i, h, device=run.device, dtype=run.dtype, generator=g) * h ** -0.5
    w2 = torch.randn(e, h, i, device=run.device, dtype=run.dtype, generator=g) * i ** -0.5
    probs = torch.softmax(torch.randn(tokens, e, device=run.device, generator=g), -1)
    weights, ids = probs.topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).contiguous()
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    row: dict[str, Any] = dict(model=name, tokens=tokens,
                               rel_err_fused=rel_err(fused_moe(x, w13, w2, weights, ids), ref),
                               rel_err_loop=rel_err(fused_moe_ref(x, w13, w2, weights, ids, math_dtype=None), ref))
    decode = tokens <= 64  # decode runs inside the engine's CUDA graphs
    row["ms"] = run.ms(lambda: fused_moe(x, w13, w2, weights, ids), graph=decode)
    row["eager_ms"] = row["ms"] if not decode else run.ms(lambda: fused_moe(x, w13, w2, weights, ids))
    row["loop_ms"] = run.ms(lambda: fused_moe_ref(x, w13, w2, weights, ids, math_dtype=None))
    row["speedup_vs_loop"] = row["loop_ms"] / row["eager_ms"]  # both eager: launch overheads alike
    touched = int(torch.unique(ids).numel())
    nbytes = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size() + 2 * x.numel() * x.element_size()
    row.update(experts_touched=touched, tflops=2 * tokens * k * 3 * h * i / (row["ms"] * 1e-3) / 1e12,
               gbps=nbytes / (row["ms"] * 1e-3) / 1e9)
    row.update(gemm_fraction=row["tflops"] / gemm_tflops, hbm_fraction=row["gbps"] / copy_gbps)
    return row


def bench_kernel(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    copy_gbps = 1.0 if run.smoke else measure_copy_bandwidth(run.quick)
    gemm_tflops = 1.0 if run.smoke else measure_gemm_tflops(run.quick)
    counts = [1, 16, 80] if run.smoke else [1, 64, 2048] if run.quick else [1, 16, 64, 512, 2048, 8192]
    rows = []
    for name, s in (SMOKE_SHAPES if run.smoke else SHAPES).items():
        for t in counts:
            rows.append(kernel_case(run, name, s, t, copy_gbps, gemm_tflops))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
            if not run.smoke:
                torch.cuda.empty_cache()
    m: dict[str, Any] = {"hbm_copy_gbps": copy_gbps, "gemm_bf16_tflops": gemm_tflops,
                         "kernel_max_rel_err_vs_ref": max(r["rel_err_fused"] for r in rows)}
    for name in SHAPES:
        mine = [r for r in rows if r["model"] == name]
        big = max(mine, key=lambda r: r["tokens"])
        m[f"{name}_prefill_tflops"] = big["tflops"]  # at the largest token count
        m[f"{name}_prefill_gemm_fraction"] = big["gemm_fraction"]
        m[f"{name}_prefill_speedup_vs_loop"] = big["speedup_vs_loop"]
        m[f"{name}_decode_hbm_fraction_best"] = max(r["hbm_fraction"] for r in mine if r["tokens"] <= 64)
        m[f"{name}_speedup_vs_loop_min"] = min(r["speedup_vs_loop"] for r in mine)
    return m, rows


@torch.inference_mode()
def bench_load(run: Run, tokens: int = 8192, ep: int = 2, redundant: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    from distrt.layers.moe import FusedMoE, select_experts

    hidden = 64 if run.smoke else 4096
    experts = len(SKEW)
    layer = FusedMoE(experts, 2, hidden, 16, renormalize=True, dtype=run.dtype, tp_size=ep, ep_size=ep,
                     num_redundant_experts=redundant).to(run.device)  # rank 0's view; routing is the same on every rank
    g = torch.Generator(device=run.device).manual_seed(7)
    mean = torch.randn(hidden, device=run.device, generator=g)  # activations have a mean direction
    unit = mean / mean.norm()
    gate = torch.randn(experts, hidden, device=run.device, generator=g) * hidden ** -0.5
    gate -= (gate @ unit)[:, None] * unit  # logit e = noise + SKEW[e] exactly:
    gate += torch.tensor(SKEW, device=run.device)[:, None] * unit / mean.norm()
    layer.gate.weight.copy_(gate.to(run.dtype))
    for p in (layer.w13, layer.w2):
        p.normal_(0.0, 0.02, generator=g)

    def batch() -> torch.Tensor:
        return (torch.randn(tokens, hidden, device=run.device, generator=g) + mean).to(run.dtype)

    def per_rank(x: torch.Tensor) -> list[int]:
        """(token, expert) pairs each EP rank computes: the slots the layer's dispatch picks."""
        _, ids = select_experts(layer.gate(x), layer.top_k, layer.renormalize)
        ranks = layer._physical_slots(ids) // layer.slots_per_rank
        return torch.bincount(ranks.reshape(-1), minlength=ep).tolist()

    layer.forward_partial(batch())  # the load report the coordinator gets from the workers
    seen = layer.take_expert_load().tolist()
    before = per_rank(fresh := batch())
    old = layer.placement
    layer.placement = old.rebalance(seen)  # the table apply_placement installs on every rank
    layer._write_tables()
    after = per_rank(fresh)

    def imbalance(loads: list[int]) -> float:
        return max(loads) / (sum(loads) / len(loads))

    metrics = {"ep_load_imbalance_before_rebalance": imbalance(before),
               "ep_load_imbalance_after_rebalance": imbalance(after)}
    details = {"ep": ep, "redundant_slots": redundant, "tokens": tokens, "skew_logit_offsets": list(SKEW),
               "expert_load": seen, "rank_pairs_before": before, "rank_pairs_after": after,
               "slots_before": list(old.slot_to_expert), "slots_after": list(layer.placement.slot_to_expert)}
    print(metrics, details, flush=True)
    return metrics, details


def bench_model(run: Run, shape: str, ep: int, requests: int, inp: int = 128, out: int = 128) -> dict[str, float]:
    from distrt import LLM, SamplingParams

    kw: dict[str, Any] = (dict(device="cpu", dtype="float32", num_kv_blocks=256) if run.smoke
                          else dict(device="cuda", dtype="bfloat16", kv_cache_memory=0.6))
    sp = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    t0 = time.perf_counter()
    with LLM(f"shape:{shape}", tensor_parallel_size=2, expert_parallel_size=ep, executor="mpi", max_num_seqs=256,
             max_model_len=inp + out + 16, **kw) as llm:
        vocab = llm.config.model.vocab_size
        prompts = [{"prompt_token_ids": [(i * 131 + j * 7) % (vocab - 10) + 5 for j in range(inp)]}
                   for i in range(requests)]
        llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        t1 = time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t1
    tokens = sum(len(r.outputs[0].token_ids) for r in res)
    row = {"output_tok_s": tokens / dt, "seconds": dt, "startup_s": t1 - t0, "output_tokens": tokens}
    print(f"{shape} tp=2 ep={ep}: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer token counts and repetitions")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check that every path runs")
    ap.add_argument("--skip-model", action="store_true", help="no 2-GPU model throughput part")
    ap.add_argument("--requests", type=int, default=512, help="requests in the model throughput part")
    ap.add_argument("--shape", default="mixtral-8x7b-16l", help="model shape of the throughput part")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        sys.exit("moe_gpu.py needs a CUDA GPU (or --cpu-smoke)")
    run = Run(a.cpu_smoke, a.quick)
    metrics, kernel_rows = bench_kernel(run)
    load_metrics, load_details = bench_load(run)
    metrics.update(load_metrics)
    details: dict[str, Any] = {"kernel_cases": kernel_rows, "shapes": SMOKE_SHAPES if run.smoke else SHAPES,
                               "dtype": str(run.dtype), "load": load_details, "smoke": run.smoke,
                               "versions": dict(torch=torch.__version__, triton=__import__("triton").__version__)}
    two = run.smoke or torch.cuda.device_count() >= 2
    if two and not a.skip_model:
        shape = "mixtral-tiny" if run.smoke else a.shape
        requests = 8 if run.smoke else a.requests
        runs = {f"tp2_ep{ep}": bench_model(run, shape, ep, requests) for ep in (1, 2)}
        metrics["model_tp2_output_tok_s"] = runs["tp2_ep1"]["output_tok_s"]
        metrics["model_tp2_ep2_output_tok_s"] = runs["tp2_ep2"]["output_tok_s"]
        metrics["model_ep2_vs_tp2_throughput"] = runs["tp2_ep2"]["output_tok_s"] / runs["tp2_ep1"]["output_tok_s"]
        details["model"] = {"shape": shape, "requests": requests, "input_len": 128, "output_len": 128,
                            "executor": "mpi", "runs": runs}
    slug = "" if run.smoke else device_slug(torch.cuda.get_device_name(0)) + ("x2" if two else "")
    default = Path("/tmp/moe_cpu_smoke.json") if run.smoke else Path(__file__).resolve().parent / "results" / slug / "moe.json"
    out = a.out or default
    write_result(str(out), metrics, details)
    for key, v in metrics.items():
        print(f"  {key} = {v:.3f}" if isinstance(v, float) else f"  {key} = {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
