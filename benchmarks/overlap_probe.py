"""Can a mixed step's decode-row attention hide behind its prompt rows' GEMMs? (NanoFlow-style overlap)

    python benchmarks/overlap_probe.py [--prompt 1000] [--decode 272] [--ctx 1000:2000] [--layers 8] [--out PATH]

One step of the Llama-3.1-8B shape (bf16, block size 16) with a prompt chunk of P tokens and D decode
rows whose contexts are uniform in --ctx, over --layers distinct layers' weights and KV caches (far
past L2). Per layer only what dominates: the four projections (qkv, o, gate_up, down) and attention.
Times (CUDA events, eager launches, median of reps, ms per layer):

  fused        GEMMs over P + D rows, then one prefill-kernel launch for the whole ragged batch
               (what the engine runs today);
  split_serial GEMMs(P), prefill attention(P), GEMMs(D), decode attention(D), one stream;
  overlap_*    the D rows' chain (GEMMs + decode attention with its grid capped to `programs`) on a
               high-priority stream beside the P rows' chain on a low-priority one, optionally with
               cuBLAS told to leave `carveout` SMs free (torch._C._set_sm_carveout_experimental).

Also the parts alone (gemm_P, gemm_D, attn_decode_D at several grid caps, gemm_P under each carveout:
a carveout that cuBLAS honours makes gemm_P slower). The answer is overlap_best / fused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemv_probe import SHAPES  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336
BLOCK = 16
PROJ = {name: n for name, (n, _) in SHAPES[1].items()}  # output width per projection
PROJ_K = {name: k for name, (_, k) in SHAPES[1].items()}  # input width


def time_ms(fn: Callable[[], Any], reps: int, layers: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / layers)
    return statistics.median(times)


class Layer:
    """One layer's weights and KV cache for the P prompt tokens (one sequence) and D decode rows."""

    def __init__(self, p: int, d: int, ctx: list[int], dev: Any) -> None:
        import torch

        self.w = {k: torch.randn(n, PROJ_K[k], dtype=torch.bfloat16, device=dev) * 0.02 for k, n in PROJ.items()}
        max_blocks = -(-max(max(ctx), p) // BLOCK)
        nseq = d + 1
        self.k = torch.randn(nseq * max_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
        self.v = torch.randn_like(self.k)
        self.bt = torch.randperm(nseq * max_blocks, device=dev, dtype=torch.int64).to(torch.int32).view(nseq, max_blocks)


def gemms(layer: Layer, x: Any, out: dict[str, Any]) -> None:
    import torch

    torch.mm(x, layer.w["qkv"].t(), out=out["qkv"])
    torch.mm(out["attn"].view(x.shape[0], -1), layer.w["o"].t(), out=out["o"])
    torch.mm(out["o"], layer.w["gate_up"].t(), out=out["gate_up"])
    torch.mm(out["gate_up"][:, :INTER], layer.w["down"].t(), out=out["down"])


def buffers(rows: int, dev: Any) -> dict[str, Any]:
    import torch

    b = {k: torch.empty(rows, n, dtype=torch.bfloat16, device=dev) for k, n in PROJ.items()}
    b["attn"] = torch.randn(rows, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    b["q"] = torch.randn(rows, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    b["x"] = torch.randn(rows, HIDDEN, dtype=torch.bfloat16, device=dev)
    return b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--decode", type=int, default=272)
    ap.add_argument("--ctx", default="1000:2000")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--programs", default="full,16,32,48,66,132")
    ap.add_argument("--carveouts", default="0,16,32,48")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from distrt.bench.results import write_result
    from distrt.kernels.paged_attention import paged_attention_decode, paged_attention_prefill

    if not torch.cuda.is_available():
        sys.exit("overlap_probe.py needs a CUDA GPU")
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):
        torch._C._set_sm_carveout_experimental = lambda c: None  # older torch: carveouts become no-ops
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    t0 = time.time()
    P, D, L = a.prompt, a.decode, a.layers
    lo, hi = (int(v) for v in a.ctx.split(":"))
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(lo, hi + 1, (D,), generator=g).tolist()
    layers = [Layer(P, D, ctx, dev) for _ in range(L)]
    scale = HEAD_DIM ** -0.5
    # the ragged batch: D decode rows (q_len 1) then the prompt chunk (q_len P, no cached prefix)
    qsl_mixed = torch.tensor([0, *range(1, D + 1), D + P], dtype=torch.int32, device=dev)
    sl_mixed = torch.tensor([*ctx, P], dtype=torch.int32, device=dev)
    qsl_p = torch.tensor([0, P], dtype=torch.int32, device=dev)
    sl_p = torch.tensor([P], dtype=torch.int32, device=dev)
    sl_d = torch.tensor(ctx, dtype=torch.int32, device=dev)
    buf_all, buf_p, buf_d = buffers(P + D, dev), buffers(P, dev), buffers(D, dev)

    def fused() -> None:
        for ly in layers:
            gemms(ly, buf_all["x"], buf_all)
            paged_attention_prefill(buf_all["q"], ly.k, ly.v, qsl_mixed, sl_mixed, ly.bt, scale, max_query_len=P,
                                    out=buf_all["attn"])

    def p_chain(ly: Layer) -> None:
        gemms(ly, buf_p["x"], buf_p)
        paged_attention_prefill(buf_p["q"], ly.k, ly.v, qsl_p, sl_p, ly.bt[D:], scale, max_query_len=P,
                                out=buf_p["attn"])

    def d_chain(ly: Layer, programs: int | None) -> None:
        gemms(ly, buf_d["x"], buf_d)
        paged_attention_decode(buf_d["q"], ly.k, ly.v, sl_d, ly.bt[:D], scale, out=buf_d["attn"],
                               max_programs=programs)

    def split_serial() -> None:
        for ly in layers:
            p_chain(ly)
            d_chain(ly, None)

    s_hi = torch.cuda.Stream(priority=-1)
    s_lo = torch.cuda.Stream(priority=0)

    def overlap(programs: int | None, carveout: int) -> Callable[[], None]:
        def run() -> None:
            main_s = torch.cuda.current_stream()
            s_hi.wait_stream(main_s)
            s_lo.wait_stream(main_s)
            for ly in layers:
                with torch.cuda.stream(s_hi):
                    torch._C._set_sm_carveout_experimental(None)
                    d_chain(ly, programs)
                with torch.cuda.stream(s_lo):
                    torch._C._set_sm_carveout_experimental(carveout or None)
                    p_chain(ly)
            torch._C._set_sm_carveout_experimental(None)
            main_s.wait_stream(s_hi)
            main_s.wait_stream(s_lo)
        return run

    res: dict[str, float] = {}

    def rec(name: str, fn: Callable[[], Any]) -> None:
        res[name] = time_ms(fn, a.reps, L)
        print(f"{name:36s} {res[name]:8.3f} ms/layer", flush=True)

    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        for c in (int(v) for v in a.carveouts.split(",")):
            def gp(c: int = c) -> None:
                torch._C._set_sm_carveout_experimental(c or None)
                for ly in layers:
                    gemms(ly, buf_p["x"], buf_p)
                torch._C._set_sm_carveout_experimental(None)
            rec(f"{blas}_gemm_P_carveout{c}", gp)
    best_blas = min(("cublas", "cublaslt"), key=lambda b: res[f"{b}_gemm_P_carveout0"])
    torch.backends.cuda.preferred_blas_library(best_blas)
    rec("gemm_all", lambda: [gemms(ly, buf_all["x"], buf_all) for ly in layers])
    rec("gemm_D", lambda: [gemms(ly, buf_d["x"], buf_d) for ly in layers])
    rec("attn_prefill_P", lambda: [paged_attention_prefill(buf_p["q"], ly.k, ly.v, qsl_p, sl_p, ly.bt[D:], scale,
                                                           max_query_len=P, out=buf_p["attn"]) for ly in layers])
    progs = [None if v == "full" else int(v) for v in a.programs.split(",")]
    for pr in progs:
        rec(f"attn_decode_D_programs{pr or 'full'}",
            lambda pr=pr: [paged_attention_decode(buf_d["q"], ly.k, ly.v, sl_d, ly.bt[:D], scale, out=buf_d["attn"],
                                                  max_programs=pr) for ly in layers])
    rec("attn_mixed_prefill_kernel", lambda: [paged_attention_prefill(
        buf_all["q"], ly.k, ly.v, qsl_mixed, sl_mixed, ly.bt, scale, max_query_len=P, out=buf_all["attn"])
        for ly in layers])
    rec("fused", fused)
    rec("split_serial", split_serial)
    for pr in progs:
        for c in (int(v) for v in a.carveouts.split(",")):
            rec(f"overlap_programs{pr or 'full'}_carveout{c}", overlap(pr, c))
    overlaps = {k: v for k, v in res.items() if k.startswith("overlap_")}
    best = min(overlaps, key=overlaps.get)
    metrics = dict(fused_ms_per_layer=res["fused"], split_serial_ms_per_layer=res["split_serial"],
                   overlap_best_ms_per_layer=overlaps[best], overlap_best_vs_fused=overlaps[best] / res["fused"],
                   split_serial_vs_fused=res["split_serial"] / res["fused"], wall_s=time.time() - t0)
    details = dict(times_ms_per_layer=res, overlap_best=best, blas=best_blas, prompt=P, decode=D, ctx=a.ctx,
                   layers=L, sms=sms, block_size=BLOCK, shape="llama-3.1-8b")
    out = a.out
    if out is None:
        from distrt.bench.kernels import device_slug

        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           device_slug(torch.cuda.get_device_name()), "overlap_probe.json")
    write_result(out, metrics, details)
    print(f"best {best}: {overlaps[best]:.3f} vs fused {res['fused']:.3f} ms/layer "
          f"({metrics['overlap_best_vs_fused']:.3f}); {metrics['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
