"""Kernel benchmarks on one GPU, as ratios against limits measured in the same run.

    python benchmarks/kernels_gpu.py [--quick] [--tune] [--out PATH]

Measures the HBM copy bandwidth (device-to-device copy, bytes read + written) and the bf16 GEMM rate
(8192^3), then: decode attention achieved bandwidth (Llama-3-8B-like: 32 q heads, 8 kv heads,
head_dim 128, block_size 16) over batch x context, prefill attention against torch SDPA, and the
bandwidth fractions of RMSNorm, fused add + RMSNorm, RoPE, SiLU-and-mul, the KV-cache write and
RoPE fused with the KV-cache write (rotary_write_kv).
Writes benchmarks/results/<device-slug>/kernels.json and prints a table. --tune also sweeps the
decode/prefill launch configs and records the best ones under details.tune.
Decode is timed as CUDA-graph replays (as the engine runs it; inputs rotated past L2), the rest with
triton.testing.do_bench (L2 flushed between runs). Reads alone can beat the copy rate, so a decode
fraction slightly above 1 is expected at large batch.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from distrt.bench.results import write_result
from distrt.kernels import paged_attention as pa  # noqa: E402
from distrt.kernels.activation import silu_and_mul  # noqa: E402
from distrt.kernels.kv_cache import write_kv_cache  # noqa: E402
from distrt.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from distrt.kernels.rotary import apply_rotary, build_rope_cache  # noqa: E402
from distrt.kernels.rotary_kv import rotary_write_kv  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
GB = 1e9


def device_slug(name: str) -> str:
    known = re.search(r"\b(h100|h200|h20|gh200|b200|b100|a100|a10g|l40s|l4|v100)\b", name.lower())
    if known:
        return known.group(1)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bench_ms(fn: Callable[[], Any], quick: bool = False) -> float:
    """Median milliseconds over repeated launches (events; triton's do_bench flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                         return_mode="median"))


def measure_copy_bandwidth(quick: bool) -> float:
    n = (1 << 30) if quick else (2 << 30)  # bytes per buffer
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), quick)
    del src, dst
    return 2 * n / (ms * 1e-3) / GB


def measure_gemm_tflops(quick: bool) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = bench_ms(lambda: a @ b, quick)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def graph_ms(fns: list[Callable[[], Any]], reps: int = 20) -> float:
    """Milliseconds per call of fns, all captured in one CUDA graph and replayed: no launch gaps (as the
    engine runs decode), and fns over different buffers keep the data from staying in L2."""
    for fn in fns:  # compile outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2] / len(fns)


def make_paged_kv(batch: int, context: int, gen: torch.Generator,
                  kv_dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches holding exactly batch*context tokens, block tables scrambled over the whole pool."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE).to(kv_dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE).to(kv_dtype)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq).cuda()
    return k_cache, v_cache, block_tables


class DecodeCase:
    """Decode inputs for one (batch, context), replicated until they exceed 4x the L2 cache."""

    def __init__(self, batch: int, context: int, gen: torch.Generator, kv_dtype: torch.dtype = DTYPE) -> None:
        self.batch, self.context, self.kv_dtype = batch, context, kv_dtype
        self.kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * kv_dtype.itemsize
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = min(64, max(1, math.ceil(4 * l2 / self.kv_bytes)))
        self.sets = []
        for _ in range(copies):
            k_cache, v_cache, block_tables = make_paged_kv(batch, context, gen, kv_dtype)
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
            self.sets.append((q, k_cache, v_cache, block_tables, torch.empty_like(q)))
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.bytes = self.kv_bytes + 2 * batch * NUM_HEADS * HEAD_DIM * DTYPE.itemsize

    @staticmethod
    def fits(batch: int, context: int) -> bool:
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        return kv_bytes * 1.2 + (1 << 30) < torch.cuda.mem_get_info()[0]

    def run(self, copy_gbps: float) -> dict[str, Any]:
        fns = [lambda s=s: pa.paged_attention_decode(s[0], s[1], s[2], self.seq_lens, s[3], HEAD_DIM ** -0.5,
                                                     out=s[4]) for s in self.sets]
        ms = graph_ms(fns)
        eager_ms = bench_ms(fns[0], quick=True)
        block_n = pa.decode_config(HEAD_DIM, DTYPE, self.seq_lens.device, self.kv_dtype)[0]
        splits = pa.decode_num_splits(self.batch, NUM_KV_HEADS, self.sets[0][3].shape[1] * BLOCK_SIZE,
                                      self.seq_lens.device, block_n)
        gbps = self.bytes / (ms * 1e-3) / GB
        return dict(batch=self.batch, context=self.context, kv_dtype=str(self.kv_dtype).replace("torch.", ""),
                    num_splits=splits, ms=ms, eager_ms=eager_ms, gbps=gbps, hbm_fraction=gbps / copy_gbps)


def bench_decode(batches: list[int], contexts: list[int], copy_gbps: float,
                 kv_dtype: torch.dtype = DTYPE) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for context in contexts:
        for batch in batches:
            if not DecodeCase.fits(batch, context):
                rows.append(dict(batch=batch, context=context, skipped="does not fit in GPU memory"))
                continue
            case = DecodeCase(batch, context, gen, kv_dtype)
            rows.append(case.run(copy_gbps))
            del case
            torch.cuda.empty_cache()
    return rows


def bench_prefill(num_seqs: int, seq_len: int, quick: bool) -> dict[str, Any]:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, block_tables = make_paged_kv(num_seqs, seq_len, gen)
    tokens = num_seqs * seq_len
    q = torch.randn(tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    qsl = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    ms = bench_ms(lambda: pa.paged_attention_prefill(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale,
                                                     seq_len), quick)
    # SDPA on the same data, contiguous: [B, H, S, D]
    qs = q.view(num_seqs, seq_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    ks = torch.randn(num_seqs, NUM_KV_HEADS, seq_len, HEAD_DIM, device="cuda", dtype=DTYPE)
    vs = torch.randn_like(ks)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True), quick)
    flops = num_seqs * 4 * seq_len * seq_len * HEAD_DIM * NUM_HEADS / 2  # causal: half of QK^T and PV
    return dict(num_seqs=num_seqs, seq_len=seq_len, ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                sdpa_ms=sdpa_ms, sdpa_tflops=flops / (sdpa_ms * 1e-3) / 1e12, vs_sdpa=sdpa_ms / ms)


def bench_elementwise(copy_gbps: float, quick: bool) -> dict[str, dict[str, float]]:
    tokens, hidden, inter = 8192, 4096, 14336
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=DTYPE)
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    res = {}

    def record(name: str, fn: Callable[[], Any], nbytes: int) -> None:
        ms = bench_ms(fn, quick)
        gbps = nbytes / (ms * 1e-3) / GB
        res[name] = dict(ms=ms, gbps=gbps, hbm_fraction=gbps / copy_gbps)

    act = x.element_size()
    record("rms_norm", lambda: rms_norm(x, w, 1e-6, out=out), 2 * x.numel() * act)
    record("fused_add_rms_norm", lambda: fused_add_rms_norm(x, r, w, 1e-6, out=out, residual_out=res_out),
           4 * x.numel() * act)
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=DTYPE)
    act_out = torch.empty(tokens, inter, device="cuda", dtype=DTYPE)
    record("silu_and_mul", lambda: silu_and_mul(gate_up, out=act_out), 3 * tokens * inter * act)
    del gate_up, act_out
    cos_sin = build_rope_cache(HEAD_DIM, 8192, 500000.0, None).cuda()
    q = torch.randn(tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    record("rope", lambda: apply_rotary(q, k, pos, cos_sin),
           2 * (q.numel() + k.numel()) * act + tokens * HEAD_DIM * cos_sin.element_size())
    k_cache = torch.empty(tokens // BLOCK_SIZE + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device="cuda")[:tokens]
    kk, vv = k.clone(), k.clone()
    record("write_kv_cache", lambda: write_kv_cache(kk, vv, k_cache, v_cache, slots), 4 * kk.numel() * act)
    # q read + written in place, k and v read, both written to the cache, one cos_sin row per token
    record("rotary_write_kv", lambda: rotary_write_kv(q, kk, vv, pos, cos_sin, k_cache, v_cache, slots),
           2 * q.numel() * act + 4 * kk.numel() * act + tokens * HEAD_DIM * cos_sin.element_size())
    return res


def tune(copy_gbps: float) -> dict[str, Any]:
    """Sweep launch configs of the attention kernels; the defaults in paged_attention.py come from here."""
    results: dict[str, Any] = {"decode_shapes": [[16, 4096], [64, 4096], [16, 16384], [1, 16384]],
                               "decode": [], "prefill": []}
    gen = torch.Generator().manual_seed(2)
    cases = [DecodeCase(b, c, gen) for b, c in results["decode_shapes"]]
    orig = pa.decode_config, pa.prefill_config, pa.DECODE_PROGRAMS_PER_SM
    try:
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3):
                    for per_sm in (4, 8, 16):
                        pa.decode_config = lambda *_a, c=(block_n, warps, stages): c
                        pa.DECODE_PROGRAMS_PER_SM = per_sm
                        cfg = [block_n, warps, stages, per_sm]
                        try:
                            fr = [case.run(copy_gbps)["hbm_fraction"] for case in cases]
                        except Exception as e:  # out of shared memory etc.: record and go on
                            results["decode"].append(dict(config=cfg, error=repr(e)[:200]))
                            continue
                        results["decode"].append(dict(config=cfg, fractions=fr))
        pa.decode_config, _, pa.DECODE_PROGRAMS_PER_SM = orig
        del cases
        torch.cuda.empty_cache()
        for block_m in (64, 128):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        cfg = [block_m, block_n, warps, stages]
                        pa.prefill_config = lambda *_a, c=tuple(cfg): c
                        try:
                            r = bench_prefill(4, 2048, quick=True)
                        except Exception as e:
                            results["prefill"].append(dict(config=cfg, error=repr(e)[:200]))
                            continue
                        results["prefill"].append(dict(config=cfg, tflops=r["tflops"]))
    finally:
        pa.decode_config, pa.prefill_config, pa.DECODE_PROGRAMS_PER_SM = orig
    ok_dec = [r for r in results["decode"] if "fractions" in r]
    ok_pre = [r for r in results["prefill"] if "tflops" in r]
    results["best_decode"] = max(ok_dec, key=lambda r: min(r["fractions"][:3]), default=None)
    results["best_prefill"] = max(ok_pre, key=lambda r: r["tflops"], default=None)
    return results


def tune_fp8(copy_gbps: float) -> dict[str, Any]:
    """Sweep the decode kernel's launch config over an fp8 (e4m3) cache at the engine's large-batch
    shapes (a tile of fp8 holds half the bytes of a bf16 one, so the bf16 config need not carry over)."""
    results: dict[str, Any] = {"decode_shapes": [[64, 4096], [224, 1536], [448, 1536]], "decode": []}
    gen = torch.Generator().manual_seed(3)
    cases = [DecodeCase(b, c, gen, pa.FP8_KV_DTYPE) for b, c in results["decode_shapes"]]
    orig = pa.DECODE_CONFIG_FP8, pa.DECODE_PROGRAMS_PER_SM
    try:
        for block_n in (64, 128, 256):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4):
                    for per_sm in (4, 8):
                        pa.DECODE_CONFIG_FP8, pa.DECODE_PROGRAMS_PER_SM = (block_n, warps, stages), per_sm
                        cfg = [block_n, warps, stages, per_sm]
                        try:
                            fr = [case.run(copy_gbps)["hbm_fraction"] for case in cases]
                        except Exception as e:
                            results["decode"].append(dict(config=cfg, error=repr(e)[:200]))
                            continue
                        results["decode"].append(dict(config=cfg, fractions=fr))
    finally:
        pa.DECODE_CONFIG_FP8, pa.DECODE_PROGRAMS_PER_SM = orig
    ok = [r for r in results["decode"] if "fractions" in r]
    results["best_decode"] = max(ok, key=lambda r: min(r["fractions"]), default=None)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer configs and repetitions")
    parser.add_argument("--tune", action="store_true", help="also sweep attention launch configs")
    parser.add_argument("--kv-dtype", choices=["auto", "fp8"], default="auto",
                        help="fp8: also time decode attention over an fp8 (e4m3) cache (decode_fp8 rows)")
    parser.add_argument("--tune-fp8", action="store_true", help="sweep the decode config over an fp8 cache")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<slug>/)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernels_gpu.py needs a CUDA GPU")

    name = torch.cuda.get_device_name()
    copy_gbps = measure_copy_bandwidth(args.quick)
    gemm_tflops = measure_gemm_tflops(args.quick)
    batches = [1, 16, 64] if args.quick else [1, 16, 64, 256]
    contexts = [512, 4096] if args.quick else [512, 4096, 16384, 32768]
    decode = bench_decode(batches, contexts, copy_gbps)
    prefill = bench_prefill(4, 2048, args.quick)
    elementwise = bench_elementwise(copy_gbps, args.quick)
    big = [r["hbm_fraction"] for r in decode if "hbm_fraction" in r and r["context"] >= 4096 and r["batch"] >= 16]
    decode_fp8: list[dict[str, Any]] = []
    if args.kv_dtype == "fp8":
        decode_fp8 = bench_decode(batches, contexts, copy_gbps, pa.FP8_KV_DTYPE)
        decode_fp8 += bench_decode([224, 448], [1536], copy_gbps, pa.FP8_KV_DTYPE)  # the 1000/1000 batches
    big8 = [r["hbm_fraction"] for r in decode_fp8 if "hbm_fraction" in r and r["context"] >= 1536 and r["batch"] >= 16]

    metrics = {
        "hbm_copy_gbps": copy_gbps,
        "gemm_bf16_tflops": gemm_tflops,
        "decode_attention_hbm_fraction": max(big) if big else None,
        "decode_attention_hbm_fraction_min": min(big) if big else None,
        "prefill_attention_tflops": prefill["tflops"],
        "prefill_attention_vs_sdpa": prefill["vs_sdpa"],
        "prefill_attention_gemm_fraction": prefill["tflops"] / gemm_tflops,
        **{f"{k}_hbm_fraction": v["hbm_fraction"] for k, v in elementwise.items()},
    }
    if big8:  # bytes of the fp8 cache read per second, against the same copy rate
        metrics["decode_attention_fp8_hbm_fraction"] = max(big8)
        metrics["decode_attention_fp8_hbm_fraction_min"] = min(big8)
    details: dict[str, Any] = {"decode": decode, "prefill": prefill, "elementwise": elementwise,
                               "shapes": dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                                              block_size=BLOCK_SIZE, dtype=str(DTYPE)),
                               "versions": dict(torch=torch.__version__, triton=__import__("triton").__version__)}
    if decode_fp8:
        details["decode_fp8"] = decode_fp8
    if args.tune:
        details["tune"] = tune(copy_gbps)
    if args.tune_fp8:
        details["tune_fp8"] = tune_fp8(copy_gbps)
    out = args.out or Path("benchmarks") / "results" / device_slug(name) / "kernels.json"
    write_result(str(out), metrics, details)

    print(f"\n{name}  copy {copy_gbps:.0f} GB/s  bf16 GEMM {gemm_tflops:.0f} TFLOP/s")
    print(f"{'decode batch':>12} {'context':>8} {'splits':>6} {'us':>9} {'eager us':>9} {'GB/s':>7} {'frac':>6}")
    for r in decode + decode_fp8:
        if "skipped" in r:
            print(f"{r['batch']:>12} {r['context']:>8}  skipped: {r['skipped']}")
        else:
            print(f"{r['batch']:>12} {r['context']:>8} {r['num_splits']:>6} {r['ms'] * 1e3:>9.1f} "
                  f"{r['eager_ms'] * 1e3:>9.1f} {r['gbps']:>7.0f} {r['hbm_fraction']:>6.2f}")
    print(f"prefill {prefill['num_seqs']}x{prefill['seq_len']}: {prefill['tflops']:.0f} TFLOP/s, "
          f"SDPA {prefill['sdpa_tflops']:.0f} TFLOP/s, ratio {prefill['vs_sdpa']:.2f}")
    for k, v in elementwise.items():
        print(f"{k:>20}: {v['gbps']:7.0f} GB/s  {v['hbm_fraction']:.2f} of copy")
    for k, v in metrics.items():
        print(f"  {k} = {v:.3f}" if isinstance(v, float) else f"  {k} = {v}")
    if args.tune:
        print("best decode config", details["tune"]["best_decode"])
        print("best prefill config", details["tune"]["best_prefill"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
