"""2 GPUs: the one-shot IPC all-reduce (distrt/parallel/custom_allreduce.py) against NCCL (cupy).

One process per GPU (spawned). It times NCCL first, then for each kernel configuration (pull/push,
bytes per program) checks 8/16/32/64/256 KB in bf16 and fp32 against NCCL's result and against a
torch sum of both ranks' inputs (each rank regenerates its peer's inputs from seeds), that both
ranks hold bitwise-identical results, and the same inside a CUDA graph replayed with fresh inputs;
then times it. Timing: eager calls (200 back to back) and graph replays (50 calls captured,
replayed 10x), both with CUDA events, bf16.

    python benchmarks/custom_allreduce_probe.py [--out PATH] [--timeout 120] [--configs pull:4096,push:4096]

Metrics (bf16, the decode dtype; ``custom_*`` is the first config, ``*_best_*`` the fastest):
custom_allreduce_us_{graph,eager}_<kb>kb, nccl_allreduce_us_{graph,eager}_<kb>kb,
custom_vs_nccl_<kb>kb = NCCL graph us / custom graph us (> 1: the custom kernel is faster).
A watchdog kills both ranks after --timeout seconds (a hung collective otherwise holds the GPUs)
and the JSON then carries "error" in details with whatever was measured before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_io import write_result  # noqa: E402

WORLD = 2
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _inputs(rank: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(numel, generator=g).to(dtype)


def _reference(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    acc = _inputs(0, numel, dtype, seed).float()
    for r in range(1, WORLD):
        acc = acc + _inputs(r, numel, dtype, seed).float()
    return acc.to(dtype)


class _Child:
    def __init__(self, rank: int, q: Any) -> None:
        self.rank, self.q = rank, q

    def say(self, *parts: Any) -> None:
        msg = " ".join(str(p) for p in parts)
        print(f"[rank {self.rank} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
        self.q.put(("progress", self.rank, msg))

    def put(self, kind: str, key: str, value: Any) -> None:
        if self.rank == 0:
            self.q.put((kind, key, value))


def _time_us(comm: Any, fn: Any, x: torch.Tensor) -> tuple[float, float]:
    """(eager us/call over 200 back-to-back calls, graph us/call: 50 captured, replayed 10x)."""
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    comm.barrier()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(200):
        fn(x)
    e1.record()
    torch.cuda.synchronize()
    eager = e0.elapsed_time(e1) / 200 * 1e3
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(50):
            fn(x)
    comm.barrier()
    g.replay()
    torch.cuda.synchronize()
    comm.barrier()
    e0.record()
    for _ in range(10):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    graph = e0.elapsed_time(e1) / 500 * 1e3
    del g
    return eager, graph


def _check(c: _Child, comm: Any, ar: Any, tag: str, sizes: list[int], dev: torch.device) -> dict[str, Any]:
    worst_rel, all_bitwise, all_exact, all_nccl = 0.0, True, True, True
    for dname, dtype in DTYPES.items():
        for kb in sizes:
            numel = (kb << 10) // torch.empty(0, dtype=dtype).element_size()
            seed = kb * 7 + len(dname)
            x = _inputs(c.rank, numel, dtype, seed).to(dev)
            nccl = comm.all_reduce(x.clone())
            got = ar.all_reduce(x.clone())
            torch.cuda.synchronize()
            ar.check()
            both = comm.all_gather(got.unsqueeze(0))  # [ranks, numel]
            bitwise = all(torch.equal(both[0], both[r]) for r in range(1, WORLD))
            exact = torch.equal(got.cpu(), _reference(numel, dtype, seed))
            same_as_nccl = torch.equal(got, nccl)
            rel = ((got.float() - nccl.float()).abs().max() / nccl.float().abs().max().clamp_min(1e-30)).item()
            worst_rel = max(worst_rel, rel)
            all_bitwise, all_exact, all_nccl = all_bitwise and bitwise, all_exact and exact, all_nccl and same_as_nccl
            c.say(f"{tag} {dname} {kb}KB: rel err vs NCCL {rel:.2e}, equal to NCCL {same_as_nccl}, "
                  f"equal to torch sum {exact}, ranks bitwise equal {bitwise}")
    # inside a graph: 3 calls per replay (odd, so every call position sees both parity slots)
    kbs = [8, 64, sizes[-1]]
    bufs = [torch.zeros((kb << 10) // 2, dtype=torch.bfloat16, device=dev) for kb in kbs]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [ar.all_reduce(b) for b in bufs]
    graph_ok = True
    for step in range(8):
        for kb, b in zip(kbs, bufs, strict=True):
            b.copy_(_inputs(c.rank, b.numel(), torch.bfloat16, 10_000 + 100 * step + kb))
        comm.barrier()
        g.replay()
        torch.cuda.synchronize()
        ar.check()
        for kb, b, o in zip(kbs, bufs, outs, strict=True):
            want = _reference(b.numel(), torch.bfloat16, 10_000 + 100 * step + kb)
            ok = torch.equal(o.cpu(), want)
            both = comm.all_gather(o.unsqueeze(0))
            graph_ok = graph_ok and ok and torch.equal(both[0], both[1])
    del g
    c.say(f"{tag} graph replays with fresh inputs: correct and bitwise equal across ranks = {graph_ok}")
    return {"max_rel_err_vs_nccl": worst_rel, "ranks_bitwise_equal": all_bitwise, "equal_to_torch_sum": all_exact,
            "equal_to_nccl": all_nccl, "graph_correct": graph_ok}


def _rank(rank: int, uid: bytes, args: dict[str, Any], q: Any) -> None:
    c = _Child(rank, q)
    try:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        from distrt.parallel.comm_nccl import NcclComm
        from distrt.parallel.custom_allreduce import IpcAllReduce, create_ipc_all_reduce

        comm = NcclComm(WORLD, uid, rank, dev)
        comm.barrier()
        c.say("nccl up on", torch.cuda.get_device_name(dev))
        sizes: list[int] = args["sizes"]
        max_bytes = max(sizes) << 10
        # NCCL first: its numbers survive a failure of the custom kernel further down
        for kb in sizes:
            x = torch.zeros((kb << 10) // 2, dtype=torch.bfloat16, device=dev)
            t = _time_us(comm, comm.all_reduce, x)
            c.say(f"nccl {kb}KB bf16: eager {t[0]:.2f} us, graph {t[1]:.2f} us")
            c.put("timing", f"nccl|{kb}", t)
        probe = create_ipc_all_reduce(comm, dev, max_bytes=max_bytes, warmup=False)
        c.put("detail", "factory_supported", probe is not None)
        if probe is not None:
            probe.close()
        timings: dict[str, dict[int, tuple[float, float]]] = {}
        for cfg in args["configs"]:
            mode, chunk = cfg.split(":")
            t0 = time.perf_counter()
            ar = IpcAllReduce(comm, dev, max_bytes, chunk_bytes=int(chunk), push=mode == "push",
                              spin_limit=args["spin_limit"])
            c.say(f"{cfg}: {ar} built and warmed up in {time.perf_counter() - t0:.1f} s")
            c.put("correctness", cfg, _check(c, comm, ar, cfg, sizes, dev))
            timings[cfg] = {}
            for kb in sizes:
                x = torch.zeros((kb << 10) // 2, dtype=torch.bfloat16, device=dev)
                timings[cfg][kb] = _time_us(comm, ar.all_reduce, x)
                ar.check()
                c.say(f"{cfg} {kb}KB bf16: eager {timings[cfg][kb][0]:.2f} us, graph {timings[cfg][kb][1]:.2f} us")
                c.put("timing", f"{cfg}|{kb}", timings[cfg][kb])
            ar.close()
        comm.destroy()
        c.q.put(("done", rank, None))
    except BaseException:
        tb = traceback.format_exc()
        print(f"[rank {rank}] FAILED\n{tb}", flush=True)
        q.put(("error", rank, tb))
        raise


def _collect(procs: list[Any], q: Any, timeout_s: float) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """Drains the queue until every rank is done; kills them all on the first failure or at the deadline."""
    msgs: list[tuple[str, Any, Any]] = []
    deadline, error, done = time.monotonic() + timeout_s, None, set()
    last = "nothing yet"

    def drain() -> None:
        nonlocal error, last
        while True:
            try:
                m = q.get(timeout=0.2)
            except Exception:  # queue.Empty
                return
            msgs.append(m)
            if m[0] == "progress":
                last = f"rank {m[1]}: {m[2]}"
            elif m[0] == "done":
                done.add(m[1])
            elif m[0] == "error" and error is None:
                error = f"rank {m[1]} failed:\n{m[2]}"

    while error is None:
        drain()
        if error is not None:
            break
        if not any(p.is_alive() for p in procs):
            drain()  # what the ranks' queue feeders flushed last
            if error is None and len(done) < len(procs):
                error = f"ranks exited with codes {[p.exitcode for p in procs]} before finishing (last: {last})"
            break
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            drain()
            error = error or f"ranks {failed} exited with codes {[procs[r].exitcode for r in failed]} (last: {last})"
            break
        if time.monotonic() > deadline:
            error = f"watchdog: still running after {timeout_s:.0f} s, killed (last progress: {last})"
            break
    for p in procs:
        if p.is_alive():
            p.join(timeout=15 if error is None else 2)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
    return msgs, error


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "h200x2",
                                                  "custom_allreduce.json"))
    ap.add_argument("--timeout", type=float, default=120.0, help="watchdog for the whole 2-process run (s)")
    ap.add_argument("--sizes", default="8,16,32,64,256", help="message sizes in KB")
    ap.add_argument("--configs", default="pull:4096,push:4096,pull:2048,pull:16384",
                    help="mode:chunk_bytes per kernel configuration; the first gives the custom_* metrics")
    ap.add_argument("--spin-limit", type=int, default=1 << 22, help="polls before a kernel gives up on a peer")
    a = ap.parse_args()
    from distrt.parallel.comm_nccl import nccl_unique_id

    args = {"sizes": [int(s) for s in a.sizes.split(",")], "configs": a.configs.split(","), "spin_limit": a.spin_limit}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    uid = nccl_unique_id()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_rank, args=(r, uid, args, q), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    msgs, error = _collect(procs, q, a.timeout)

    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {"world": WORLD, "args": args, "wall_s": round(time.perf_counter() - t0, 1),
                               "custom_vs_nccl": "NCCL graph us / custom graph us (> 1: custom faster)",
                               "correctness": {}, "timings_us_eager_graph": {}}
    for kind, key, value in msgs:
        if kind == "detail":
            details[key] = value
        elif kind == "correctness":
            details["correctness"][key] = value
        elif kind == "timing":
            details["timings_us_eager_graph"][key] = value
    corr = details["correctness"]
    if corr:
        metrics["custom_allreduce_max_rel_err_vs_nccl"] = max(v["max_rel_err_vs_nccl"] for v in corr.values())
        for flag in ("ranks_bitwise_equal", "equal_to_torch_sum", "equal_to_nccl", "graph_correct"):
            metrics[f"custom_allreduce_{flag}"] = all(v[flag] for v in corr.values())
    tim = details["timings_us_eager_graph"]
    first = args["configs"][0]
    for kb in args["sizes"]:
        nccl = tim.get(f"nccl|{kb}")
        mine = tim.get(f"{first}|{kb}")
        cands = {cfg: tim[f"{cfg}|{kb}"] for cfg in args["configs"] if f"{cfg}|{kb}" in tim}
        if mine:
            metrics[f"custom_allreduce_us_eager_{kb}kb"] = mine[0]
            metrics[f"custom_allreduce_us_graph_{kb}kb"] = mine[1]
        if cands:
            best = min(cands, key=lambda k: cands[k][1])
            metrics[f"custom_allreduce_us_graph_best_{kb}kb"] = cands[best][1]
            details[f"best_config_{kb}kb"] = best
        if nccl:
            metrics[f"nccl_allreduce_us_eager_{kb}kb"] = nccl[0]
            metrics[f"nccl_allreduce_us_graph_{kb}kb"] = nccl[1]
        if nccl and mine:
            metrics[f"custom_vs_nccl_{kb}kb"] = nccl[1] / mine[1]
        if nccl and cands:
            metrics[f"custom_best_vs_nccl_{kb}kb"] = nccl[1] / metrics[f"custom_allreduce_us_graph_best_{kb}kb"]
    if error:
        details["error"] = error
    details["versions"] = {"torch": torch.__version__}
    try:
        import cupy
        import triton

        details["versions"].update(triton=triton.__version__, cupy=cupy.__version__)
    except ImportError:
        pass
    write_result(a.out, metrics, details)
    print("metrics", metrics, flush=True)
    print("wrote", a.out, "error:" if error else "", error or "", flush=True)
    sys.exit(1 if error else 0)


if __name__ == "__main__":
    main()
