"""Engine overhead at decode: the engine's decode tokens/s over a bare loop of the model's own
captured decode CUDA graph, at the same batch, context lengths and weights, in one process.

    python benchmarks/engine_overhead.py [--shape llama-3.1-8b] [--batch-sizes 64,256] [--prompt-len 32]
                                         [--decode-steps 256] [--repeats 3] [--out PATH]
    python benchmarks/engine_overhead.py --shape llama-tiny --device cpu --out /tmp/eo.json   # smoke test

engine  B requests (P-token prompts, ignore_eos, max_tokens N) added at once (the token budget holds
        every prompt, so one step prefills all B). Timed from the return of the step that gave the
        last request its first token to the return of the last step before any request finished
        (the finishing step also detokenizes): B tokens per step in between, with sampling, input
        copies, scheduling and result handling, and the GPU's idle time per step where the worker
        reports it.
bare    the graph captured for B (runner.graphs, worker/cuda_graph.py) replayed N-1 times back to back,
        synchronized only at the end, on its static inputs advanced on the device like the engine's
        (positions, seq lens and KV slots +1 per step; each row owns contiguous blocks). Without a
        graph (CPU, enforce_eager) the same loop runs the model eagerly: a smoke test, not a measure.

engine_vs_bare_graph_decode_bs{B} = engine tok/s / bare tok/s (best of --repeats each, interleaved);
engine_vs_bare_graph_decode = the smallest over the batch sizes (goal >= 0.95). Written as
{"device", "date", "commit", "command", "metrics", "details"} (default: results/<device>/engine_overhead.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from distrt.bench.results import write_result  # noqa: E402


def build_llm(a: argparse.Namespace) -> Any:
    from distrt import LLM

    sizes = [int(x) for x in a.batch_sizes.split(",")]
    kw: dict[str, Any] = {}
    if a.no_async_scheduling:
        kw["async_scheduling"] = False
    return LLM(f"shape:{a.shape}", dtype=a.dtype, device=a.device, max_model_len=a.prompt_len + a.decode_steps + 16,
               max_num_seqs=max(sizes), max_num_batched_tokens=max(2048, max(sizes) * a.prompt_len),
               kv_cache_memory=a.kv_cache_memory, **kw)


def _runner(llm: Any) -> Any:
    worker = getattr(llm._executor, "worker", None)
    if worker is None:
        raise RuntimeError("engine_overhead needs the local executor (one process, one device)")
    return worker.runner


def _prompts(b: int, p: int, vocab: int, salt: int) -> list[list[int]]:
    return [[(i * 131 + j * 7 + salt * 17) % (vocab - 10) + 5 for j in range(p)] for i in range(b)]


def engine_decode(llm: Any, b: int, p: int, n: int, salt: int) -> dict[str, Any]:
    """One timed engine run of b requests; see the module docstring for the window."""
    from distrt import SamplingParams

    eng = llm.engine
    ex = llm._executor
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for ids in _prompts(b, p, llm.config.model.vocab_size, salt):
        eng.add_request(eng.next_request_id(), {"prompt_token_ids": ids}, sp, stream=False)
    idle: list[float | None] = []
    collect = ex.wait

    def wait(handle: Any) -> Any:
        r = collect(handle)
        idle.append(getattr(r, "gpu_idle_s", None))
        return r

    ex.wait = wait
    stamps: list[float] = []  # when each step() call returned
    outs: list[tuple[int, Any]] = []  # (the call that returned it, finished output)
    try:
        while eng.has_unfinished_requests():
            got = eng.step()
            stamps.append(time.monotonic())
            outs.extend((len(stamps) - 1, o) for o in got)
    finally:
        ex.wait = collect
    if len(outs) != b or any(len(o.outputs[0].token_ids) != n for _, o in outs):
        raise RuntimeError(f"expected {b} requests of {n} tokens each")
    firsts = [o.metrics.get("first_token_time") for _, o in outs]
    # f: the call after which every request had its first token; e: the last call before any finished
    f = 0 if None in firsts else next(i for i, t in enumerate(stamps) if t >= max(firsts))  # type: ignore[type-var]
    e = min(i for i, _ in outs) - 1
    if e - f < 1:
        raise RuntimeError(f"no step decoded all {b} requests (first tokens by call {f}, first finish at {e + 1})")
    steps, dt = e - f, stamps[e] - stamps[f]  # calls f+1 .. e: one token for each of the b requests
    window = [x for x in idle[f + 1: e + 1] if x is not None]
    return {"tok_s": b * steps / dt, "step_ms": 1e3 * dt / steps, "steps": steps, "step_calls": len(stamps),
            "prefill_calls": f + 1, "gpu_idle_ms_per_step": 1e3 * sum(window) / len(window) if window else None}


def _contiguous_inputs(b: int, p: int, n: int, block_size: int, num_blocks: int, vocab: int, dev: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i owns blocks [i*nb, (i+1)*nb): its KV slot for position t is i*nb*block_size + t."""
    nb = -(-(p + n + 1) // block_size)
    if b * nb > num_blocks:
        raise RuntimeError(f"the KV pool has {num_blocks} blocks; the bare loop needs {b * nb}")
    rows = torch.arange(b, device=dev)
    tables = (rows[:, None] * nb + torch.arange(nb, device=dev)).to(torch.int32)  # [B, nb]
    ids = ((rows * 37 + 100) % vocab).to(torch.int64)
    pos = torch.full((b,), p, dtype=torch.int64, device=dev)
    seq = torch.full((b,), p + 1, dtype=torch.int32, device=dev)
    slot = rows.to(torch.int64) * nb * block_size + p
    return ids, pos, seq, slot, tables


@torch.inference_mode()
def bare_decode(llm: Any, b: int, p: int, n: int) -> dict[str, Any]:
    """n-1 forwards at batch b, the captured graph's when there is one."""
    runner = _runner(llm)
    steps = n - 1
    block, vocab = llm.config.cache.block_size, llm.config.model.vocab_size
    g = runner.graphs
    if g is not None and g.padded_size(b) is not None:
        gbs = g.padded_size(b)
        ids, pos, seq, slot, tables = _contiguous_inputs(b, p, n, block, runner.num_blocks, vocab, g.input_ids.device)
        if tables.shape[1] > g.max_blocks:
            raise RuntimeError("decode steps exceed the graphs' max_model_len")

        def reset() -> None:
            g.input_ids[:b].copy_(ids)
            g.positions[:b].copy_(pos)
            g.seq_lens[:b].copy_(seq)
            g.slot_mapping[:b].copy_(slot)
            g.block_tables[:b].zero_()
            g.block_tables[:b, : tables.shape[1]].copy_(tables)
            if gbs > b:  # padding rows, as DecodeGraphs.run leaves them
                g.slot_mapping[b:gbs].fill_(-1)
                g.seq_lens[b:gbs].fill_(1)

        graph = g.graphs[gbs]
        gp, gs, gm = g.positions[:b], g.seq_lens[:b], g.slot_mapping[:b]
        cuda = g.input_ids.device.type == "cuda"  # else DISTRT_EAGER_GRAPHS=1: the same plumbing, eager (tests)
        reset()
        graph.replay()
        reset()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
            gp.add_(1)
            gs.add_(1)
            gm.add_(1)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        mode = "cuda_graph" if cuda else "eager_graph_emulation"
    else:
        from distrt.layers.attention import AttentionMetadata

        model = runner.model
        ids, pos, seq, slot, tables = _contiguous_inputs(b, p, n, block, runner.num_blocks, vocab, runner.device)
        qsl = torch.arange(b + 1, dtype=torch.int32, device=runner.device)
        cuda = runner.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(steps):
            meta = AttentionMetadata(slot_mapping=slot, query_start_loc=qsl, seq_lens=seq, block_tables=tables,
                                     max_query_len=1, max_seq_len=p + 1 + k, is_decode_only=True)
            hidden, _ = model(ids, pos, runner.kv_caches, meta)
            model.compute_logits(hidden)
            pos.add_(1)
            seq.add_(1)
            slot.add_(1)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        mode = "eager"
    return {"tok_s": b * steps / dt, "step_ms": 1e3 * dt / steps, "steps": steps, "mode": mode}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=256, help="max_tokens per request (N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-memory", type=float, default=0.9)
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.decode_steps < 4:
        ap.error("--decode-steps must be at least 4")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    t_init = time.perf_counter()
    llm = build_llm(a)
    init_s = time.perf_counter() - t_init
    p, n = a.prompt_len, a.decode_steps
    metrics: dict[str, float] = {}
    rows = []
    salt = 0
    for b in sizes:
        from distrt import SamplingParams

        warm = [{"prompt_token_ids": ids} for ids in _prompts(b, p, llm.config.model.vocab_size, 99)]
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        eng_runs, bare_runs = [], []
        for _ in range(a.repeats):
            salt += 1
            eng_runs.append(engine_decode(llm, b, p, n, salt))
            bare_runs.append(bare_decode(llm, b, p, n))
        e = max(eng_runs, key=lambda r: r["tok_s"])
        g = max(bare_runs, key=lambda r: r["tok_s"])
        metrics[f"engine_decode_tok_s_bs{b}"] = e["tok_s"]
        metrics[f"bare_graph_decode_tok_s_bs{b}"] = g["tok_s"]
        metrics[f"engine_step_ms_bs{b}"] = e["step_ms"]
        metrics[f"bare_graph_step_ms_bs{b}"] = g["step_ms"]
        metrics[f"engine_vs_bare_graph_decode_bs{b}"] = e["tok_s"] / g["tok_s"]
        rows.append({"batch": b, "engine": eng_runs, "bare": bare_runs})
        print(f"batch {b}: engine {e['tok_s']:,.0f} tok/s ({e['step_ms']:.3f} ms/step), bare {g['mode']} "
              f"{g['tok_s']:,.0f} tok/s ({g['step_ms']:.3f} ms/step), ratio {e['tok_s'] / g['tok_s']:.3f}", flush=True)
    metrics["engine_vs_bare_graph_decode"] = min(metrics[f"engine_vs_bare_graph_decode_bs{b}"] for b in sizes)
    details = {"shape": a.shape, "dtype": llm.config.model.dtype, "prompt_len": p, "decode_steps": n,
               "repeats": a.repeats, "batch_sizes": sizes, "bare_mode": rows[0]["bare"][0]["mode"],
               "async_scheduling": getattr(llm.config.scheduler, "async_scheduling", None),
               "init_s": init_s, "rows": rows}
    llm.shutdown()
    out = a.out
    if out is None and torch.cuda.is_available():
        from distrt.bench.kernels import device_slug

        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           device_slug(torch.cuda.get_device_name(0)), "engine_overhead.json")
    doc = write_result(out, metrics, details) if out else {"metrics": metrics, "details": details}
    for k, v in metrics.items():
        print(f"{k:<40} {v:,.3f}")
    if out:
        print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
