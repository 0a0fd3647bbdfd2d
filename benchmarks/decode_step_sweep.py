"""What a 1000/1000 decode step is made of, swept: the decode-attention launch config and the GEMM rows.

    python benchmarks/decode_step_sweep.py [--batch 260] [--ctx 1000:2000] [--ms 192,...] [--out PATH]

Llama-3.1-8B shape, bf16, block size 16. (1) The decode kernel over --batch sequences whose contexts
are uniform in --ctx (block tables scrambled over the pool), per (BLOCK_N, num_warps, num_stages,
programs per SM): ms per layer in a CUDA graph and the fraction of the measured copy bandwidth
(K+V bytes read). (2) One layer's four projections (qkv, o, gate_up, down) at M rows, over 8 layers'
weights, under cuBLAS and cuBLASLt: us per layer and TFLOP/s, to see where tile sizes make rows cheap.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemv_probe import SHAPES  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
PROJ = SHAPES[1]  # Llama-3.1-8B per projection: (N, K) of the weight


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=260)
    ap.add_argument("--ctx", default="1000:2000")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--per-sm", default="2,4,8")
    ap.add_argument("--orders", default="seq,heads",
                    help="decode grid orders: seq = (batch, kv_heads, splits), heads = (kv_heads, batch, splits)")
    ap.add_argument("--ms", default="192,224,240,256,264,272,288,320")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    import distrt.kernels.paged_attention as pa
    from distrt.bench.kernels import device_slug, graph_ms, measure_copy_bandwidth
    from distrt.bench.results import write_result

    if not torch.cuda.is_available():
        sys.exit("decode_step_sweep.py needs a CUDA GPU")
    t0 = time.time()
    dev = torch.device("cuda")
    copy = measure_copy_bandwidth(quick=False)
    g = torch.Generator().manual_seed(0)
    lo, hi = (int(v) for v in a.ctx.split(":"))
    ctx = torch.randint(lo, hi + 1, (a.batch,), generator=g)
    mb = -(-hi // BLOCK)
    nblocks = a.batch * mb
    k = torch.randn(nblocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    bt = torch.randperm(nblocks, generator=g).to(torch.int32).view(a.batch, mb).to(dev)
    sl = ctx.to(torch.int32).to(dev)
    q = torch.randn(a.batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(q)
    kv_bytes = int(ctx.sum()) * KV_HEADS * HEAD_DIM * 2 * 2
    ref = pa.paged_attention_decode(q, k, v, sl, bt, HEAD_DIM ** -0.5)
    orig = pa.DECODE_CONFIG, pa.DECODE_PROGRAMS_PER_SM, pa.DECODE_HEADS_FASTEST
    default = pa.decode_config(HEAD_DIM, torch.bfloat16, dev, torch.bfloat16)
    attn: list[dict[str, Any]] = []
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    for order, bn, w, st, per_sm in itertools.product(a.orders.split(","), ints(a.block_n), ints(a.warps),
                                                       ints(a.stages), ints(a.per_sm)):
        pa.DECODE_CONFIG, pa.DECODE_PROGRAMS_PER_SM = (bn, w, st), per_sm
        pa.DECODE_HEADS_FASTEST = order == "heads"
        row: dict[str, Any] = dict(order=order, block_n=bn, warps=w, stages=st, per_sm=per_sm,
                                   splits=pa.decode_num_splits(a.batch, KV_HEADS, mb * BLOCK, dev, bn))
        try:
            got = pa.paged_attention_decode(q, k, v, sl, bt, HEAD_DIM ** -0.5, out=out)
            row["max_abs_diff_vs_default"] = float((got.float() - ref.float()).abs().max())
            ms = graph_ms([lambda: pa.paged_attention_decode(q, k, v, sl, bt, HEAD_DIM ** -0.5, out=out)] * 4)
            row.update(ms=ms, hbm_fraction=kv_bytes / (ms * 1e-3) / 1e9 / copy)
        except Exception as e:  # out of shared memory etc.
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        attn.append(row)
        print(row, flush=True)
    pa.DECODE_CONFIG, pa.DECODE_PROGRAMS_PER_SM, pa.DECODE_HEADS_FASTEST = orig
    ok = [r for r in attn if "ms" in r]
    best = min(ok, key=lambda r: r["ms"])
    dflt = [r for r in ok if (r["block_n"], r["warps"], r["stages"]) == default
            and r["per_sm"] == orig[1] and r["order"] == ("heads" if orig[2] else "seq")]
    by_order = {o: min((r["ms"] for r in ok if r["order"] == o), default=None) for o in a.orders.split(",")}
    weights = [{n: torch.randn(*shape, dtype=torch.bfloat16, device=dev) for n, shape in PROJ.items()}
               for _ in range(8)]
    gemm: list[dict[str, Any]] = []
    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        for m in ints(a.ms):
            xs = {n: torch.randn(m, kk, dtype=torch.bfloat16, device=dev) for n, (_, kk) in PROJ.items()}
            fns = [lambda w=w, n=n: torch.mm(xs[n], w[n].t()) for w in weights for n in PROJ]
            us = graph_ms(fns) * 1e3 * len(PROJ)  # graph_ms is per call; a layer is len(PROJ) calls
            flops = 2 * m * sum(nn * kk for nn, kk in PROJ.values())
            gemm.append(dict(blas=blas, m=m, us_per_layer=us, tflops=flops / (us * 1e-6) / 1e12,
                             us_per_row=us / m))
            print(gemm[-1], flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    metrics = dict(copy_gbps=copy, attn_default_ms=dflt[0]["ms"] if dflt else None,
                   attn_default_hbm_fraction=dflt[0]["hbm_fraction"] if dflt else None,
                   attn_best_ms=best["ms"], attn_best_hbm_fraction=best["hbm_fraction"],
                   attn_best_vs_default=best["ms"] / dflt[0]["ms"] if dflt else None,
                   **{f"attn_best_ms_order_{o}": v for o, v in by_order.items()}, wall_s=time.time() - t0)
    details = dict(batch=a.batch, ctx=a.ctx, block_size=BLOCK, kv_bytes=kv_bytes, default_config=default,
                   default_per_sm=orig[1], best_attn=best, attn=attn, gemm=gemm, shape="llama-3.1-8b")
    path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 device_slug(torch.cuda.get_device_name()), "decode_step_sweep.json")
    write_result(path, metrics, details)
    print(f"attention: default {metrics['attn_default_ms']} ms, best {best} -> {path}")


if __name__ == "__main__":
    main()
