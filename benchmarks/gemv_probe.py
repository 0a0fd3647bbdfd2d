"""Skinny GEMV (distrt/kernels/gemv.py) vs cuBLAS at decode batch sizes, Llama-3.1-8B shapes.

    python benchmarks/gemv_probe.py [--tp 1,2] [--ms 1,2,4,8,16] [--quick] [--out PATH]
    python benchmarks/gemv_probe.py --device cpu --quick --out /tmp/gemv.json   # smoke test (interpreter)

Per tensor-parallel size and projection (qkv, o, gate_up, down; weights [N, K] bf16) and M rows:
F.linear vs skinny_linear under a sweep of launch configs, and for gate_up also F.linear +
silu_and_mul vs the fused skinny_gate_up_silu. On a GPU each op is timed as one CUDA graph of
CALLS back-to-back calls over distinct weight copies (together >= 400 MB, far past L2, so every call
reads its weights from HBM, as in decode), median of replays, per call. Achieved GB/s counts the
weights + x + output once; frac = that over the copy bandwidth measured here (1 GB torch copy,
bytes read + written). Each config's output is checked against the fp32 reference (max abs diff,
relative error). details.best_configs is the fastest config per (kind, M bucket, N, K), loadable
with distrt.kernels.gemv.load_tuned (or DISTRT_SKINNY_GEMV_TUNED=path).
On the CPU (--device cpu, Triton interpreter, fp32, tiny shapes) the timings mean nothing: it only
checks that every path of the script runs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 1e9
CALLS = 20  # calls per captured graph
MIN_WEIGHT_BYTES = 400 * 2 ** 20  # distinct weight copies per op: together at least this much
SHAPES = {  # Llama-3.1-8B per rank: name -> (N, K)
    1: {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    2: {"qkv": (3072, 4096), "o": (4096, 2048), "gate_up": (14336, 4096), "down": (4096, 7168)},
}
CPU_SHAPES = {1: {"qkv": (96, 64), "o": (64, 64), "gate_up": (192, 64), "down": (64, 96)}}


def candidates(kind: str, m: int, n_out: int, k: int, sms: int, quick: bool, cpu: bool) -> list[dict[str, Any]]:
    """A handful of launch configs per case (the default first), each with split_k 1 and auto."""
    from distrt.kernels.gemv import auto_split_k, default_config, m_bucket

    mb = m_bucket(m)
    if cpu:
        base = [("fma", 8, 32, 4, 1), ("dot", 16, 32, 4, 1)]
    else:  # few, so that the compiles (most of the wall time on a fresh machine) stay under a minute
        fma = [("fma", 4, 512, 4, 2), ("fma", 8, 512, 4, 2), ("fma", 2, 512, 4, 2)]
        dot = [("dot", 16, 256, 4, 3), ("dot", 32, 256, 4, 3), ("dot", 32, 128, 4, 4), ("dot", 64, 128, 4, 3)]
        per_tile = 2 if kind == "gate_up" else 1
        # fma keeps BLOCK_M x BLOCK_N x BLOCK_K fp32 per tile in registers: <= 64 a thread
        fma = [c for c in fma if mb * c[1] * c[2] * per_tile <= 64 * 32 * c[3]][:2]
        base = (fma if mb <= 4 else []) + (dot[:2] if mb <= 2 else dot)
        if quick:
            base = base[:1] + base[-1:]
    default = default_config(kind, m, n_out, k, sms)
    out = [default]
    for mode, bn, bk, warps, stages in base:
        cfg = dict(mode=mode, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        for split in sorted({1, auto_split_k(n_out, k, bn, bk, sms)}):
            c = {**cfg, "split_k": split}
            if c not in out:
                out.append(c)
    if cpu:  # tiny K never asks for a split: force one so the smoke test runs the reduction kernel
        out.append({**out[-1], "split_k": 2})
    return out


class Timer:
    def __init__(self, cpu: bool, reps: int) -> None:
        self.cpu, self.reps = cpu, reps

    def per_call_us(self, fns: list[Callable[[], Any]]) -> float:
        """Microseconds per call: on CUDA distrt.bench.kernels.graph_ms (all fns in one CUDA graph,
        median of replays); on CPU (interpreter smoke runs) the median of timed eager loops."""
        if not self.cpu:
            from distrt.bench.kernels import graph_ms

            return graph_ms(fns, self.reps) * 1e3
        for fn in fns:  # warm up
            fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            for fn in fns:
                fn()
            times.append((time.perf_counter() - t0) / len(fns))
        return statistics.median(times) * 1e6


def copy_gbps(timer: Timer, cpu: bool) -> float:
    import torch

    n = (16 << 20) if cpu else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device="cpu" if cpu else "cuda").random_()
    dst = torch.empty_like(src)
    calls = 1 if cpu else 4
    us = timer.per_call_us([lambda: dst.copy_(src)] * calls)
    return 2 * n / (us * 1e-6) / GB


def check(out: Any, ref: Any) -> dict[str, float]:
    diff = (out.float() - ref.float())
    return dict(max_abs_diff=diff.abs().max().item(), rel_err=(diff.norm() / ref.float().norm().clamp_min(1e-30)).item())


def run_case(tp: int, proj: str, kind: str, n_rows: int, k: int, m: int, args: argparse.Namespace,
             timer: Timer, copy: float, sms: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from distrt.kernels.activation import silu_and_mul, silu_and_mul_ref
    from distrt.kernels.gemv import (m_bucket, skinny_gate_up_silu, skinny_gate_up_silu_ref, skinny_linear,
                                     skinny_linear_ref)

    cpu = args.device == "cpu"
    dev, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    gen = torch.Generator(device=dev).manual_seed(1000 * tp + 10 * m + len(proj))
    w_bytes = n_rows * k * dtype.itemsize
    copies = 1 if cpu else min(CALLS, max(2, math.ceil(MIN_WEIGHT_BYTES / w_bytes)))
    ws = [(torch.randn(n_rows, k, device=dev, generator=gen) / math.sqrt(k)).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
    calls = 1 if cpu else CALLS
    order = [ws[i % copies] for i in range(calls)]
    gate_up = kind == "gate_up"
    n_out = n_rows // 2 if gate_up else n_rows
    nbytes = w_bytes + (m * k + m * n_out) * dtype.itemsize
    if gate_up:
        torch_fns = [lambda w=w: silu_and_mul(F.linear(x, w)) if not cpu else silu_and_mul_ref(F.linear(x, w))
                     for w in order]
        ref = skinny_gate_up_silu_ref(x, ws[0])
        torch_out = torch_fns[0]()
        kernel, name = skinny_gate_up_silu, "F.linear+silu_and_mul"
    else:
        torch_fns = [lambda w=w: F.linear(x, w) for w in order]
        ref = skinny_linear_ref(x, ws[0])
        torch_out = torch_fns[0]()
        kernel, name = skinny_linear, "F.linear"
    torch_us = timer.per_call_us(torch_fns)
    row: dict[str, Any] = dict(tp=tp, proj=proj, kind=kind, M=m, m_bucket=m_bucket(m), N=n_out, K=k, bytes=nbytes,
                               weight_copies=copies, baseline=name, torch_us=torch_us,
                               torch_gbps=nbytes / (torch_us * 1e-6) / GB, torch_check=check(torch_out, ref))
    row["torch_frac"] = row["torch_gbps"] / copy
    sweep = []
    for cfg in candidates(kind, m, n_out, k, sms, args.quick, cpu):
        try:
            out = kernel(x, ws[0], config=cfg)
            chk = check(out, ref)
            us = timer.per_call_us([lambda w=w, c=cfg: kernel(x, w, config=c) for w in order])
        except Exception as exc:  # a config the compiler rejects (resources): recorded, not fatal
            sweep.append(dict(config=cfg, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        gbps = nbytes / (us * 1e-6) / GB
        sweep.append(dict(config=cfg, us=us, gbps=gbps, frac=gbps / copy, **chk))
    ok = [s for s in sweep if "us" in s and s["rel_err"] < (1e-4 if cpu else 2e-2)]
    row["sweep"] = sweep
    row["default"] = sweep[0]
    if ok:
        best = min(ok, key=lambda s: s["us"])
        row["best"] = best
        row["speedup"] = torch_us / best["us"]
        row["default_speedup"] = torch_us / sweep[0]["us"] if "us" in sweep[0] else None
    del ws
    if not cpu:
        torch.cuda.empty_cache()
    return row


def summarize(rows: list[dict[str, Any]], copy: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {"copy_gbps": copy}
    for r in rows:
        key = f"tp{r['tp']}_{r['proj']}{'_silu' if r['kind'] == 'gate_up' else ''}_m{r['M']}"
        metrics[f"{key}_torch_us"] = r["torch_us"]
        if "best" in r:
            metrics[f"{key}_skinny_us"] = r["best"]["us"]
            metrics[f"{key}_skinny_frac"] = r["best"]["frac"]
            metrics[f"{key}_speedup"] = r["speedup"]
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    metrics["cases"] = len(rows)
    metrics["cases_failed"] = sum("best" not in r for r in rows)
    if speedups:
        metrics["speedup_geomean"] = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        metrics["speedup_min"] = min(speedups)
        metrics["cases_faster_than_torch"] = sum(s > 1 for s in speedups)
    metrics["max_rel_err"] = max((s["rel_err"] for r in rows for s in r["sweep"] if "rel_err" in s), default=None)
    for m in sorted({r["M"] for r in rows}):
        sp = [r["speedup"] for r in rows if r["M"] == m and "speedup" in r]
        if sp:
            metrics[f"speedup_geomean_m{m}"] = math.exp(sum(math.log(s) for s in sp) / len(sp))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer configs (cpu: tiny shapes, M 1 and 3)")
    parser.add_argument("--tp", default="1,2", help="tensor-parallel sizes whose per-rank shapes to run")
    parser.add_argument("--ms", default=None, help="rows M (default 1,2,4,8,16; cpu 1,3)")
    parser.add_argument("--reps", type=int, default=None, help="timed graph replays per measurement")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<slug>/gemv.json)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    from distrt.bench.results import write_result
    from distrt.kernels.gemv import num_sms

    if not cpu and not torch.cuda.is_available():
        sys.exit("gemv_probe.py needs a CUDA GPU (or --device cpu --quick)")
    ms = [int(v) for v in (args.ms or ("1,3" if cpu else "1,2,4,8,16")).split(",")]
    tps = [int(v) for v in args.tp.split(",")]
    shapes = CPU_SHAPES if cpu else {tp: SHAPES[tp] for tp in tps}
    timer = Timer(cpu, args.reps or (2 if cpu else 20))
    sms = num_sms(torch.device("cpu" if cpu else "cuda"))
    t0 = time.time()
    copy = copy_gbps(timer, cpu)
    rows = []
    for tp, projs in shapes.items():
        for proj, (n, k) in projs.items():
            kinds = ["linear", "gate_up"] if proj == "gate_up" else ["linear"]
            for kind in kinds:
                for m in ms:
                    r = run_case(tp, proj, kind, n, k, m, args, timer, copy, sms)
                    rows.append(r)
                    best = r.get("best")
                    print(f"tp{tp} {proj:8s} {kind:8s} M={m:2d} N={r['N']:6d} K={k:6d}  torch {r['torch_us']:8.1f} us"
                          f" ({r['torch_frac']:.2f})  skinny "
                          + (f"{best['us']:8.1f} us ({best['frac']:.2f}) x{r['speedup']:.2f}  {best['config']}"
                             if best else "FAILED"), flush=True)
    metrics = summarize(rows, copy)
    metrics["wall_s"] = time.time() - t0
    best_configs = [dict(kind=r["kind"], m_bucket=r["m_bucket"], N=r["N"], K=r["K"], config=r["best"]["config"],
                         us=r["best"]["us"], speedup=r["speedup"]) for r in rows if "best" in r]
    # several M share a bucket only in custom --ms lists: keep the first (smallest M) per key
    seen, uniq = set(), []
    for b in best_configs:
        key = (b["kind"], b["m_bucket"], b["N"], b["K"])
        if key not in seen:
            seen.add(key)
            uniq.append(b)
    details = dict(cases=rows, best_configs=uniq, calls_per_graph=1 if cpu else CALLS,
                   min_weight_bytes_per_op=MIN_WEIGHT_BYTES, dtype="float32" if cpu else "bfloat16", sms=sms)
    if args.out:
        out = args.out
    elif cpu:
        out = "/tmp/gemv_probe_cpu.json"
    else:
        from distrt.bench.kernels import device_slug

        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           device_slug(torch.cuda.get_device_name()), "gemv.json")
    write_result(out, metrics, details)
    print(f"copy {copy:.0f} GB/s; geomean speedup {metrics.get('speedup_geomean', float('nan')):.3f}, "
          f"min {metrics.get('speedup_min', float('nan')):.3f}; failed cases {metrics['cases_failed']}; "
          f"{metrics['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
