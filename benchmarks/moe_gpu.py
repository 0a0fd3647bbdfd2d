"""Fused MoE on one GPU, as ratios against limits measured in the same run and against transformers.

    python benchmarks/moe_gpu.py [--quick] [--out PATH]

Shapes (bf16, all experts on this GPU): Mixtral-8x7B (E 8, top-2, H 4096, I 14336) and
Qwen3-30B-A3B (E 128, top-8, H 2048, I 768). For each, over token counts:

  decode (T <= 64): time per call as a CUDA-graph replay; bytes = the weights of the experts the
      batch touches + activations; fraction of the measured HBM copy bandwidth (the roofline);
  prefill (T >= 512): TFLOP/s = 2 * T * k * 3 * H * I / time; fraction of the measured bf16 GEMM rate;
  against transformers' own experts module on the same weights and routing (its "eager" per-expert
  loop, and "grouped_mm" where torch has it): speed-ups compare eager launches on both sides.

Also records each case's relative error against fused_moe_ref. Writes
benchmarks/results/<device-slug>/moe.json ({"device", "date", "commit", "command", "metrics", "details"}).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distrt.bench.kernels import (  # noqa: E402
    bench_ms, device_slug, git_commit, graph_ms, measure_copy_bandwidth, measure_gemm_tflops,
)
from distrt.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402

DTYPE = torch.bfloat16
GB = 1e9
SHAPES = {
    "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, inter=14336),
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768),
}


def make_problem(experts: int, top_k: int, hidden: int, inter: int, tokens: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=DTYPE, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=DTYPE, generator=g) * inter ** -0.5
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return x, w13, w2, (weights / weights.sum(-1, keepdim=True)).contiguous(), ids


def hf_experts(w13: torch.Tensor, w2: torch.Tensor, impl: str) -> Any:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    e, two_i, h = w13.shape
    cfg = MixtralConfig(hidden_size=h, intermediate_size=two_i // 2, num_local_experts=e)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)  # same layout: [E, 2I, H], [E, H, I]
    mod.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return mod.eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@torch.inference_mode()
def bench_case(name: str, shape: dict[str, int], tokens: int, copy_gbps: float, gemm_tflops: float,
               quick: bool) -> dict[str, Any]:
    e, k, h, i = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    x, w13, w2, weights, ids = make_problem(e, k, h, i, tokens)
    row: dict[str, Any] = dict(model=name, tokens=tokens)
    out = fused_moe(x, w13, w2, weights, ids)
    row["rel_err_vs_ref"] = rel_err(out, fused_moe_ref(x, w13, w2, weights, ids))
    eager_ms = bench_ms(lambda: fused_moe(x, w13, w2, weights, ids), quick)
    # decode runs inside the engine's CUDA graphs: the roofline fraction uses the replay time
    ms = graph_ms([lambda: fused_moe(x, w13, w2, weights, ids)]) if tokens <= 64 else eager_ms
    touched = int(torch.unique(ids).numel())
    bytes_moved = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size() + 2 * x.numel() * x.element_size()
    flops = 2 * tokens * k * 3 * h * i
    row.update(ms=ms, eager_ms=eager_ms, experts_touched=touched, gbps=bytes_moved / (ms * 1e-3) / GB,
               tflops=flops / (ms * 1e-3) / 1e12)
    row["hbm_fraction"] = row["gbps"] / copy_gbps
    row["gemm_fraction"] = row["tflops"] / gemm_tflops
    for impl in ("eager", "grouped_mm"):
        try:
            mod = hf_experts(w13, w2, impl)
            hf_out = mod(x, ids, weights)
            hf_ms = bench_ms(lambda: mod(x, ids, weights), quick)
        except Exception as exc:  # an implementation this torch/transformers lacks
            row[f"hf_{impl}"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
            continue
        row[f"hf_{impl}_ms"] = hf_ms
        row[f"hf_{impl}_rel_err"] = rel_err(hf_out, out)
        row[f"speedup_vs_hf_{impl}"] = hf_ms / eager_ms  # both eager: launch overheads alike
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer token counts and repetitions")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<slug>/moe.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("moe_gpu.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    copy_gbps = measure_copy_bandwidth(args.quick)
    gemm_tflops = measure_gemm_tflops(args.quick)
    token_counts = [1, 16, 64, 2048] if args.quick else [1, 4, 16, 64, 512, 2048, 8192]
    rows = []
    for m, s in SHAPES.items():
        for t in token_counts:
            rows.append(bench_case(m, s, t, copy_gbps, gemm_tflops, args.quick))
            torch.cuda.empty_cache()  # the case's weights are gone with its frame

    def pick(model: str, key: str, decode: bool) -> list[float]:
        return [r[key] for r in rows if r["model"] == model and (r["tokens"] <= 64) == decode and key in r]

    metrics: dict[str, Any] = {"hbm_copy_gbps": copy_gbps, "gemm_bf16_tflops": gemm_tflops,
                               "max_rel_err_vs_ref": max(r["rel_err_vs_ref"] for r in rows)}
    for m in SHAPES:
        metrics[f"{m}_decode_hbm_fraction_best"] = max(pick(m, "hbm_fraction", True))
        metrics[f"{m}_prefill_gemm_fraction_best"] = max(pick(m, "gemm_fraction", False))
        for impl in ("eager", "grouped_mm"):
            sp = pick(m, f"speedup_vs_hf_{impl}", False) + pick(m, f"speedup_vs_hf_{impl}", True)
            if sp:
                metrics[f"{m}_speedup_vs_hf_{impl}_min"] = min(sp)
    result = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "metrics": metrics,
        "details": {"cases": rows, "shapes": SHAPES, "dtype": str(DTYPE),
                    "versions": dict(torch=torch.__version__, triton=__import__("triton").__version__)},
    }
    out = args.out or Path("benchmarks") / "results" / device_slug(name) / "moe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{name}  copy {copy_gbps:.0f} GB/s  bf16 GEMM {gemm_tflops:.0f} TFLOP/s")
    print(f"{'model':>14} {'T':>5} {'us':>9} {'GB/s':>7} {'hbm':>5} {'TFLOP/s':>8} {'gemm':>5} {'x eager':>8} {'x grouped':>9}")
    for r in rows:
        print(f"{r['model']:>14} {r['tokens']:>5} {r['ms'] * 1e3:>9.1f} {r['gbps']:>7.0f} {r['hbm_fraction']:>5.2f} "
              f"{r['tflops']:>8.1f} {r['gemm_fraction']:>5.2f} {r.get('speedup_vs_hf_eager', float('nan')):>8.2f} "
              f"{r.get('speedup_vs_hf_grouped_mm', float('nan')):>9.2f}")
    for key, v in metrics.items():
        print(f"  {key} = {v:.3f}" if isinstance(v, float) else f"  {key} = {v}")


if __name__ == "__main__":
    main()
