"""`distrt bench throughput|latency`: offline engine benchmarks on random-weight shapes or real models.

    distrt bench throughput --shape llama-3.1-8b --input-len 1000 --output-len 1000 --num-prompts 1000 \
        --baseline generate_batch --out results.json --plot tput.png
    distrt bench latency --shape llama-3.1-8b --batch-sizes 1,8,32,128 --input-len 128 --output-len 128

Results are JSON ({"device","date","commit","command","metrics","details"}) and, with --plot, a PNG,
written once distrt's run is done and again after the baselines. The transformers baselines
(`generate`: padded static batches; `generate_batch`: its continuous batching; bench/hf_baselines.py)
run on identical weights and lengths in the same process, after distrt has released the GPU,
optionally on the first --hf-num-prompts prompts and under --hf-time-cap-s, reported per output token.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any

from distrt.bench.results import write_result


def add_offline_subcommands(bench_sub: argparse._SubParsersAction) -> None:
    from distrt.cli import _add_engine_args

    for name, fn, hlp in (("throughput", run_throughput, "offline throughput (output tokens/s) at fixed lengths or a dataset"),
                          ("latency", run_latency, "per-step decode latency (p50/p99) across batch sizes")):
        p = bench_sub.add_parser(name, help=hlp)
        _add_engine_args(p)
        p.add_argument("--shape", default=None, help="random-weight architecture, e.g. llama-3.1-8b (see distrt.models.shapes)")
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--out", default=None, help="write the JSON result here")
        p.add_argument("--plot", default=None, help="write a PNG plot here")
        if name == "throughput":
            p.add_argument("--num-prompts", type=int, default=256)
            p.add_argument("--dataset", default=None, help="JSONL: {prompt | prompt_token_ids, [output_len]} per line")
            p.add_argument("--baseline", default="none", choices=["none", "generate", "generate_batch", "both"])
            p.add_argument("--hf-batch-size", type=int, default=64)
            p.add_argument("--hf-num-prompts", type=int, default=0,
                           help="run the transformers baselines on the first N prompts only (0: all)")
            p.add_argument("--hf-time-cap-s", type=float, default=0.0,
                           help="stop a transformers baseline after this many seconds and count what it produced (0: none)")
            p.add_argument("--time-budget-s", type=float, default=0.0,
                           help="the whole command's wall-clock budget: baselines are cut (or skipped) to end 25 s before it")
        else:
            p.add_argument("--batch-sizes", default="1,8,32,128")
        p.set_defaults(func=fn)


def _llm(a: argparse.Namespace, max_len: int) -> Any:
    from distrt import LLM
    from distrt.cli import engine_kwargs

    kw = engine_kwargs(a)
    kw["max_model_len"] = kw["max_model_len"] or max_len
    return LLM(f"shape:{a.shape}" if a.shape else a.model, **kw)


def _gpu_memory() -> dict[str, float]:
    """This process's GPU memory after the run (what kv_cache_memory left free; in-process workers only)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_free_gib_after_run": free / 2**30, "gpu_total_gib": total / 2**30,
            "torch_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


def _workload(a: argparse.Namespace, vocab: int) -> tuple[list[dict[str, Any]], list[int]]:
    if getattr(a, "dataset", None):
        prompts, outs = [], []
        with open(a.dataset) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    prompts.append({k: row[k] for k in ("prompt", "prompt_token_ids") if k in row})
                    outs.append(int(row.get("output_len", a.output_len)))
        return prompts, outs
    n = a.num_prompts
    prompts = [{"prompt_token_ids": [(i * 131 + j * 7) % (vocab - 10) + 5 for j in range(a.input_len)]} for i in range(n)]
    return prompts, [a.output_len] * n


def _release(llm: Any) -> None:
    llm.shutdown()
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def run_throughput(a: argparse.Namespace) -> int:
    from distrt import SamplingParams

    deadline = time.perf_counter() + a.time_budget_s - 25 if a.time_budget_s else None  # room to stop, free, write
    llm = _llm(a, a.input_len + a.output_len + 8)
    prompts, out_lens = _workload(a, llm.config.model.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    steps = _StepLog(llm._executor)
    t0 = time.perf_counter()
    try:
        res = llm.generate(prompts, params, use_tqdm=False)
    finally:
        dt = time.perf_counter() - t0
        steps.detach()
    out_tokens = sum(len(r.outputs[0].token_ids) for r in res)
    in_tokens = sum(len(r.prompt_token_ids) for r in res)
    metrics: dict[str, float] = {"output_tok_s": out_tokens / dt, "total_tok_s": (in_tokens + out_tokens) / dt,
                                 "requests_s": len(res) / dt}
    stats = getattr(getattr(llm.engine, "scheduler", None), "stats", None)
    details: dict[str, Any] = {"model": a.shape or a.model, "num_prompts": len(res), "input_len": a.input_len,
                               "output_len": a.output_len, "seconds": dt, "tp": a.tp, "pp": a.pp,
                               "max_num_seqs": a.max_num_seqs, "kv_cache_memory": a.kv_cache_memory,
                               "kv_cache_dtype": getattr(a, "kv_cache_dtype", "auto"),
                               "admission": getattr(a, "admission", "greedy"),
                               "num_kv_blocks": llm.engine.allocator.num_blocks if hasattr(llm.engine, "allocator") else None,
                               "block_size": a.block_size,
                               "preemptions": getattr(stats, "num_preemptions", None),
                               "steps": steps.summary(), **_gpu_memory()}
    _report(a, metrics, details, plot=lambda path: _plot_bars(path, metrics))  # distrt's numbers are safe now
    raw_cfg = dict(llm.config.model.hf_config)
    ids = [r.prompt_token_ids for r in res]
    ours_first = [r.outputs[0].token_ids[:1] for r in res]
    _release(llm)
    del llm, res
    gc.collect()
    if a.baseline == "none":
        return 0
    if deadline is not None and deadline - time.perf_counter() < 30:  # no time to build the model and run
        details["hf_baselines"] = "skipped: the time budget was spent"
        _report(a, metrics, details, plot=lambda path: _plot_bars(path, metrics))
        return 0
    k = a.hf_num_prompts or len(ids)
    sub_ids, sub_lens = ids[:k], out_lens[:k]
    from distrt.bench import hf_baselines as hb

    model = hb.hf_model(raw_cfg, a.model, a.shape)
    details["hf_weights"] = "identical (shape checkpoint filled by name)" if a.shape else "the same checkpoint"
    if a.baseline in ("generate", "both"):
        r = hb.hf_generate(model, sub_ids, sub_lens, a.hf_batch_size, a.hf_time_cap_s, deadline)
        if r is None:
            details["hf_generate"] = "skipped: the time budget was spent"
        else:
            metrics["hf_generate_output_tok_s"] = r["output_tok_s"]
            metrics["throughput_vs_hf_generate"] = metrics["output_tok_s"] / r["output_tok_s"]
            details["hf_generate"] = {**r, "num_prompts": len(sub_ids), "batch": a.hf_batch_size}
    if a.baseline in ("generate_batch", "both"):
        _generate_batch_baseline(hb.hf_generate_batch(model, sub_ids, sub_lens, a.hf_time_cap_s, deadline),
                                 ours_first, metrics, details, a.hf_time_cap_s)
    hb.release(model)
    _report(a, metrics, details, plot=lambda path: _plot_bars(path, metrics))
    if a.time_budget_s and hb.lingering_threads():  # results are written; do not wait out the budget on a stuck thread
        print(f"!! exiting with threads still running: {hb.lingering_threads()}", flush=True)
        os._exit(0)
    return 0


class _StepLog:
    """Where a throughput run's time goes: each step's interval (from the previous step's result to
    its own, which is the step time with plans queued back to back), split into decode-only steps and
    steps with prompt tokens, with their average batch. Wraps the executor's submit/wait."""

    def __init__(self, ex: Any) -> None:
        self.ex, self.submit, self.collect = ex, ex.execute_async, ex.wait
        self.plans: dict[int, tuple[int, int]] = {}  # step id -> (one-token rows, tokens)
        self.done: list[tuple[float, int]] = []

        def submit(plan: Any) -> Any:
            n = plan.num_scheduled_tokens
            self.plans[plan.step_id] = (sum(1 for v in n.values() if v == 1), sum(n.values()))
            return self.submit(plan)

        def wait(handle: Any) -> Any:
            r = self.collect(handle)
            self.done.append((time.perf_counter(), handle.step_id))
            return r

        ex.execute_async, ex.wait = submit, wait

    def detach(self) -> None:
        self.ex.execute_async, self.ex.wait = self.submit, self.collect

    def intervals(self) -> list[tuple[float, int, int]]:
        """(seconds since the previous result, one-token rows, tokens) of every step but the first."""
        return [(t - t_prev, *self.plans.get(sid, (0, 0))) for (t_prev, _), (t, sid) in zip(self.done, self.done[1:])]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("decode_only", "with_prompt_tokens"):
            rows = [r for r in self.intervals() if (r[1] == r[2]) == (kind == "decode_only")]
            if rows:
                secs = sum(r[0] for r in rows)
                out[kind] = {"steps": len(rows), "seconds": secs, "ms_per_step": secs / len(rows) * 1e3,
                             "mean_decode_rows": sum(r[1] for r in rows) / len(rows),
                             "mean_tokens": sum(r[2] for r in rows) / len(rows)}
        return out


def _generate_batch_baseline(r: dict[str, Any] | None, ours_first: list[list[int]], metrics: dict[str, float],
                             details: dict[str, Any], cap: float) -> None:
    if r is None:
        details["hf_generate_batch"] = "skipped: the time budget was spent"
        return
    toks = r.pop("tokens")
    details["hf_generate_batch"] = {**r, "num_prompts": len(toks), "time_cap_s": cap}
    if not r["output_tokens"]:
        return  # nothing came back within the cap: no rate to quote
    pairs = [(o, t) for o, t in zip(ours_first, toks) if o and t]
    metrics["hf_generate_batch_output_tok_s"] = r["output_tok_s"]
    metrics["throughput_vs_hf_generate_batch"] = metrics["output_tok_s"] / r["output_tok_s"]
    # same weights => the same greedy first token, up to bf16 rounding on near-ties
    metrics["hf_first_token_agreement"] = sum(o[0] == t[0] for o, t in pairs) / max(1, len(pairs))
    details["hf_generate_batch"]["compared_first_tokens"] = len(pairs)


def run_latency(a: argparse.Namespace) -> int:
    """Decode step time = the interval between consecutive results of decode-only plans, which is
    the step time whether the engine keeps one plan in flight or more."""
    from distrt import SamplingParams

    sizes = [int(x) for x in a.batch_sizes.split(",")]
    a.max_num_seqs = max(a.max_num_seqs, max(sizes))
    llm = _llm(a, a.input_len + a.output_len + 8)
    vocab = llm.config.model.vocab_size
    engine_budget = llm.config.scheduler.max_num_batched_tokens
    rows = []
    for bs in sizes:
        prompts = [{"prompt_token_ids": [(i * 31 + j) % (vocab - 10) + 5 for j in range(a.input_len)]} for i in range(bs)]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        log = _StepLog(llm._executor)
        t0 = time.perf_counter()
        try:
            llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True), use_tqdm=False)
        finally:
            e2e = time.perf_counter() - t0
            log.detach()
        # steps of the batch being measured: every one of its bs sequences decodes one token (with long
        # prompts the first sequences can finish while later ones are still in prefill: not counted)
        steps = sorted(dt for dt, ones, tokens in log.intervals() if ones == tokens == bs)
        if not steps:
            _release(llm)  # the workers go down with the error
            chunks = -(-bs * a.input_len // engine_budget)
            raise ValueError(f"batch {bs}: no step decoded all {bs} sequences at once: the first ones finish their "
                             f"{a.output_len} tokens while the last prompts are still in prefill (about {chunks} "
                             f"steps of {engine_budget} prompt tokens); raise --output-len well above {chunks}")
        rows.append({"batch": bs, "step_ms_p50": 1e3 * statistics.median(steps),
                     "step_ms_p99": 1e3 * steps[min(len(steps) - 1, int(0.99 * len(steps)))],
                     "decode_steps": len(steps), "e2e_s": e2e, "output_tok_s": bs * a.output_len / e2e})
        print(rows[-1], flush=True)
    _release(llm)
    metrics = {f"step_ms_p50_bs{r['batch']}": r["step_ms_p50"] for r in rows}
    metrics.update({f"step_ms_p99_bs{r['batch']}": r["step_ms_p99"] for r in rows})
    metrics.update({f"output_tok_s_bs{r['batch']}": r["output_tok_s"] for r in rows})
    _report(a, metrics, {"model": a.shape or a.model, "rows": rows}, plot=lambda path: _plot_latency(path, rows))
    return 0


def _report(a: argparse.Namespace, metrics: dict[str, float], details: dict[str, Any], plot: Any) -> None:
    width = max(map(len, metrics))
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:,.3f}")
    if a.out:
        write_result(a.out, metrics, details)
        print(f"wrote {a.out}")
    if a.plot:
        try:
            plot(a.plot)
            print(f"wrote {a.plot}")
        except ImportError:
            print("matplotlib is not installed (pip install 'distrt[bench]'); no plot written")


def _plot_bars(path: str, metrics: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("output_tok_s", "hf_generate_output_tok_s", "hf_generate_batch_output_tok_s") if k in metrics]
    labels = {"output_tok_s": "distrt", "hf_generate_output_tok_s": "HF generate",
              "hf_generate_batch_output_tok_s": "HF generate_batch"}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([labels[k] for k in keys], [metrics[k] for k in keys], color=["#2b6cb0", "#a0aec0", "#718096"][: len(keys)])
    ax.set_ylabel("output tokens/s")
    ax.set_title("offline throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_latency(path: str, rows: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    b = [r["batch"] for r in rows]
    ax1.plot(b, [r["output_tok_s"] for r in rows], "o-")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("output tokens/s")
    ax2.plot(b, [r["step_ms_p50"] for r in rows], "o-", label="p50")
    ax2.plot(b, [r["step_ms_p99"] for r in rows], "s--", label="p99")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("decode step (ms)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
