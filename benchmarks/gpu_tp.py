"""2 GPUs: tensor parallelism on the Llama-3.1-8B shape (random bf16 weights), in one run:
batch-1 ms/token for tp=1 and tp=2, saturated throughput (2048 requests, 128 in / 128 out), NCCL
(cupy) all-reduce latency for decode-sized messages, and each executor's per-step control overhead:
the time the GPU sits idle between consecutive decode steps (CUDA events on the output rank,
StepResult.gpu_idle_s), median over a batch-1 generation.

    python benchmarks/gpu_tp.py [--shape llama-3.1-8b] [--executors mpi,ray] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels_gpu import device_slug  # noqa: E402
from results_io import write_result  # noqa: E402


def _llm(shape: str, tp: int, executor: str, max_num_seqs: int, max_len: int, pp: int = 1, mb: int | None = None) -> Any:
    from distrt import LLM

    return LLM(f"shape:{shape}", dtype="bfloat16", device="cuda", tensor_parallel_size=tp, executor=executor,
               pipeline_parallel_size=pp, max_model_len=max_len, max_num_seqs=max_num_seqs, kv_cache_memory=0.6,
               pipeline_micro_batches=mb)


class _Timed:
    """Wraps executor.execute_async/wait to record (wall from submit to result, worker exec, tokens)."""

    def __init__(self, ex: Any) -> None:
        self.ex, self.samples = ex, []
        self.inner_submit, self.inner_wait = ex.execute_async, ex.wait
        self._t: dict[int, tuple[float, Any]] = {}
        ex.execute_async, ex.wait = self.submit, self.wait

    def submit(self, plan: Any) -> Any:
        t = time.perf_counter()
        h = self.inner_submit(plan)
        self._t[id(h)] = (t, plan)
        return h

    def wait(self, handle: Any) -> Any:
        r = self.inner_wait(handle)
        t, plan = self._t.pop(id(handle), (None, None))
        if t is not None:
            self.samples.append((time.perf_counter() - t, r.gpu_idle_s, plan.total_tokens))
        return r

    def restore(self) -> None:
        self.ex.execute_async, self.ex.wait = self.inner_submit, self.inner_wait


def bench_bs1(llm: Any, prompt_len: int = 128, new: int = 256) -> tuple[float, float]:
    from distrt import SamplingParams

    eng = llm.engine
    prompt = {"prompt_token_ids": list(range(100, 100 + prompt_len))}
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    timer = _Timed(llm._executor)
    eng.add_request("bs1", prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    eng.step()
    timer.samples.clear()
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    ms = (time.perf_counter() - t0) / steps * 1e3
    idle = [i for _, i, _ in timer.samples if i is not None]
    overhead = statistics.median(idle) * 1e3 if idle else float("nan")
    timer.restore()
    return ms, overhead


def bench_throughput(llm: Any, n: int = 512, inp: int = 128, out: int = 128) -> tuple[float, float]:
    """(output tokens/s, the output rank's GPU idle share: with pp the last stage's pipeline bubble)."""
    from distrt import SamplingParams

    prompts = [{"prompt_token_ids": [(i * 7 + j) % 30000 + 10 for j in range(inp)]} for i in range(n)]
    sp = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    timer = _Timed(llm._executor)
    t = time.perf_counter()
    res = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    timer.restore()
    idle = sum(i for _, i, _ in timer.samples if i is not None)
    return sum(len(r.outputs[0].token_ids) for r in res) / dt, idle / dt


def _allreduce_rank(rank: int, uid: bytes, sizes: list[int], q: Any) -> None:
    from distrt.parallel.comm_nccl import NcclComm

    torch.cuda.set_device(rank)
    comm = NcclComm(2, uid, rank, torch.device("cuda", rank))
    out = {}
    for nbytes in sizes:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(20):
            comm.all_reduce(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(50):
                comm.all_reduce(x)
        g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        graph_us = e0.elapsed_time(e1) / 500 * 1e3
        t = time.perf_counter()
        for _ in range(200):
            comm.all_reduce(x)
        torch.cuda.synchronize()
        eager_us = (time.perf_counter() - t) / 200 * 1e6
        out[nbytes] = (graph_us, eager_us)
    if rank == 0:
        q.put(out)
    del g
    comm.destroy()


def bench_allreduce(sizes: list[int]) -> dict[int, tuple[float, float]]:
    from distrt.parallel.comm_nccl import nccl_unique_id

    uid = nccl_unique_id()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_allreduce_rank, args=(r, uid, sizes, q)) for r in range(2)]
    for p in ps:
        p.start()
    res = q.get(timeout=300)
    for p in ps:
        p.join(60)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--executors", default="mpi,ray")
    ap.add_argument("--requests", type=int, default=2048,
                    help="saturated 128/128 run; 512 lasts ~3 s on 2 H200s and moved TP=1 by up to 13%% between calls")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-pp", action="store_true", help="TP layouts only (no pp=2 run)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the scheduler's batch cap, every layout")
    ap.add_argument("--pp-micro-batches", default="",
                    help="extra pp=2 runs with these micro-batch counts (comma list; the default, pp, always runs)")
    ap.add_argument("--tp2-env-variants", default="",
                    help="extra tp=2 runs (first executor) under env settings, e.g. 'fused:DISTRT_FUSED_AR_NORM=1' "
                         "(';' between variants, ',' between settings); named tp2_<executor>_<label>")
    ap.add_argument("--all-throughput", action="store_true",
                    help="throughput under every executor (default: the first executor and tp=1 only)")
    a = ap.parse_args()
    slug = device_slug(torch.cuda.get_device_name(0))
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{slug}x2", "tp.json")
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"shape": a.shape, "requests": a.requests, "in": 128, "out": 128,
                               "max_num_seqs": a.max_num_seqs}

    ar = bench_allreduce([8 << 10, 16 << 10, 32 << 10, 64 << 10])
    for nbytes, (g_us, e_us) in ar.items():
        metrics[f"allreduce_us_graph_{nbytes >> 10}kb"] = g_us
        metrics[f"allreduce_us_eager_{nbytes >> 10}kb"] = e_us
    print("allreduce", ar, flush=True)

    runs: dict[str, dict[str, float]] = {}
    extra_mb = [int(x) for x in a.pp_micro_batches.split(",") if x.strip()]
    layouts = ([(1, 1, "local", None, "")] + [(2, 1, e, None, "") for e in a.executors.split(",")]
               + [(2, 1, a.executors.split(",")[0], None, v) for v in a.tp2_env_variants.split(";") if v.strip()]
               + ([] if a.skip_pp else [(1, 2, "mpi", None, "")] + [(1, 2, "mpi", m, "") for m in extra_mb]))
    for tp, pp, ex, mb, variant in layouts:
        name = f"tp{tp}_{ex}" if pp == 1 else f"pp{pp}_{ex}" + (f"_mb{mb}" if mb else "")
        saved: dict[str, str | None] = {}
        if variant:
            label, _, settings = variant.partition(":")
            name += f"_{label}"
            for kv in settings.split(","):
                k, _, v = kv.partition("=")
                saved[k] = os.environ.get(k)
                os.environ[k] = v  # workers are spawned after this: they inherit it
            details.setdefault("variants", {})[name] = settings
        llm = _llm(a.shape, tp, ex, a.max_num_seqs, 512, pp=pp, mb=mb)
        describe = getattr(llm._executor, "describe_workers", None)
        details.setdefault("workers", {})[name] = describe() if describe else "local"
        print(name, "workers", details["workers"][name], flush=True)
        ms, ovh = bench_bs1(llm)
        measure = a.all_throughput or ex in ("local", a.executors.split(",")[0]) or pp > 1
        thr, idle = bench_throughput(llm, a.requests) if measure else (float("nan"), float("nan"))
        runs[name] = {"bs1_ms_per_token": ms, "step_overhead_ms": ovh, "throughput_tok_s": thr,
                      "gpu_idle_fraction_saturated": idle}
        print(name, runs[name], flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if variant:
            metrics[f"{name}_vs_tp1_bs1_latency"] = runs[name]["bs1_ms_per_token"] / runs["tp1_local"]["bs1_ms_per_token"]
    first = a.executors.split(",")[0]
    t1, t2 = runs["tp1_local"], runs[f"tp2_{first}"]
    metrics["tp1_bs1_ms_per_token"] = t1["bs1_ms_per_token"]
    metrics["tp2_bs1_ms_per_token"] = t2["bs1_ms_per_token"]
    metrics["tp2_vs_tp1_bs1_latency"] = t2["bs1_ms_per_token"] / t1["bs1_ms_per_token"]
    metrics["tp1_throughput_tok_s"] = t1["throughput_tok_s"]
    metrics["tp2_throughput_tok_s"] = t2["throughput_tok_s"]
    metrics["tp2_vs_tp1_throughput"] = t2["throughput_tok_s"] / t1["throughput_tok_s"]
    for ex in a.executors.split(","):
        metrics[f"step_overhead_ms_{ex}"] = runs[f"tp2_{ex}"]["step_overhead_ms"]
        metrics[f"tp2_{ex}_vs_tp1_bs1_latency"] = runs[f"tp2_{ex}"]["bs1_ms_per_token"] / t1["bs1_ms_per_token"]
        if runs[f"tp2_{ex}"]["throughput_tok_s"] == runs[f"tp2_{ex}"]["throughput_tok_s"]:  # not NaN
            metrics[f"tp2_{ex}_vs_tp1_throughput"] = runs[f"tp2_{ex}"]["throughput_tok_s"] / t1["throughput_tok_s"]
    metrics["step_overhead_ms_local"] = t1["step_overhead_ms"]
    p2 = runs.get("pp2_mpi")
    if p2 is None:
        details["runs"] = runs
        print(write_result(out, metrics, details))
        return
    metrics["pp2_bs1_ms_per_token"] = p2["bs1_ms_per_token"]
    metrics["pp2_vs_pp1_bs1_latency"] = p2["bs1_ms_per_token"] / t1["bs1_ms_per_token"]
    metrics["pp2_throughput_tok_s"] = p2["throughput_tok_s"]
    metrics["pp2_vs_tp1_throughput"] = p2["throughput_tok_s"] / t1["throughput_tok_s"]
    metrics["pp2_bubble_fraction"] = p2["gpu_idle_fraction_saturated"]  # last stage idle share, saturated
    metrics["pp2_vs_tp2_throughput"] = p2["throughput_tok_s"] / t2["throughput_tok_s"]
    for m in extra_mb:
        r = runs[f"pp2_mpi_mb{m}"]
        metrics[f"pp2_mb{m}_vs_tp1_throughput"] = r["throughput_tok_s"] / t1["throughput_tok_s"]
        metrics[f"pp2_mb{m}_bubble_fraction"] = r["gpu_idle_fraction_saturated"]
    details["runs"] = runs
    print(write_result(out, metrics, details))


if __name__ == "__main__":
    main()
