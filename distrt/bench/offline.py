"""`distrt bench throughput|latency`: offline engine benchmarks on random-weight shapes or real models.

    distrt bench throughput --shape llama-3.1-8b --input-len 1000 --output-len 1000 --num-prompts 1000 \
        --baseline generate_batch --out results.json --plot tput.png
    distrt bench latency --shape llama-3.1-8b --batch-sizes 1,8,32,128 --input-len 128 --output-len 128

Results are JSON ({"device","date","commit","command","metrics","details"}) and, with --plot, a PNG.
The transformers baselines (`generate`: padded static batches; `generate_batch`: its continuous
batching) run on the same shapes in the same process, after distrt has released the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
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
        else:
            p.add_argument("--batch-sizes", default="1,8,32,128")
        p.set_defaults(func=fn)


def _llm(a: argparse.Namespace, max_len: int) -> Any:
    from distrt import LLM
    from distrt.cli import engine_kwargs

    kw = engine_kwargs(a)
    kw["max_model_len"] = kw["max_model_len"] or max_len
    return LLM(f"shape:{a.shape}" if a.shape else a.model, **kw)


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

    llm = _llm(a, a.input_len + a.output_len + 8)
    prompts, out_lens = _workload(a, llm.config.model.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    out_tokens = sum(len(r.outputs[0].token_ids) for r in res)
    in_tokens = sum(len(r.prompt_token_ids) for r in res)
    metrics: dict[str, float] = {"output_tok_s": out_tokens / dt, "total_tok_s": (in_tokens + out_tokens) / dt,
                                 "requests_s": len(res) / dt}
    details: dict[str, Any] = {"model": a.shape or a.model, "num_prompts": len(res), "input_len": a.input_len,
                               "output_len": a.output_len, "seconds": dt, "tp": a.tp, "pp": a.pp}
    raw_cfg = dict(llm.config.model.hf_config)
    ids = [r.prompt_token_ids for r in res]
    _release(llm)
    if a.baseline in ("generate", "both"):
        hf = _hf_generate(raw_cfg, ids, out_lens, a.hf_batch_size)
        metrics["hf_generate_output_tok_s"] = hf
        metrics["throughput_vs_hf_generate"] = metrics["output_tok_s"] / hf
    if a.baseline in ("generate_batch", "both"):
        hf = _hf_generate_batch(raw_cfg, ids, out_lens)
        metrics["hf_generate_batch_output_tok_s"] = hf
        metrics["throughput_vs_hf_generate_batch"] = metrics["output_tok_s"] / hf
    _report(a, metrics, details, plot=lambda path: _plot_bars(path, metrics))
    return 0


def run_latency(a: argparse.Namespace) -> int:
    from distrt import SamplingParams

    sizes = [int(x) for x in a.batch_sizes.split(",")]
    a.max_num_seqs = max(a.max_num_seqs, max(sizes))
    llm = _llm(a, a.input_len + a.output_len + 8)
    vocab = llm.config.model.vocab_size
    ex = llm._executor
    inner = ex.execute
    rows = []
    for bs in sizes:
        prompts = [{"prompt_token_ids": [(i * 31 + j) % (vocab - 10) + 5 for j in range(a.input_len)]} for i in range(bs)]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        steps: list[float] = []

        def timed(plan: Any) -> Any:
            t = time.perf_counter()
            r = inner(plan)
            if plan.num_scheduled_tokens and max(plan.num_scheduled_tokens.values()) == 1:
                steps.append(time.perf_counter() - t)
            return r

        ex.execute = timed
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True), use_tqdm=False)
        e2e = time.perf_counter() - t0
        ex.execute = inner
        steps.sort()
        rows.append({"batch": bs, "step_ms_p50": 1e3 * statistics.median(steps),
                     "step_ms_p99": 1e3 * steps[min(len(steps) - 1, int(0.99 * len(steps)))],
                     "e2e_s": e2e, "output_tok_s": bs * a.output_len / e2e})
        print(rows[-1], flush=True)
    _release(llm)
    metrics = {f"step_ms_p50_bs{r['batch']}": r["step_ms_p50"] for r in rows}
    metrics.update({f"step_ms_p99_bs{r['batch']}": r["step_ms_p99"] for r in rows})
    metrics.update({f"output_tok_s_bs{r['batch']}": r["output_tok_s"] for r in rows})
    _report(a, metrics, {"model": a.shape or a.model, "rows": rows}, plot=lambda path: _plot_latency(path, rows))
    return 0


def _hf_model(raw_cfg: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(raw_cfg.get("model_type", "llama"),
                               **{k: v for k, v in raw_cfg.items() if k not in ("architectures", "torch_dtype", "model_type",
                                                                                "eos_token_ids")})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval(), dev


def _hf_generate(raw_cfg: dict[str, Any], prompts: list[list[int]], out_lens: list[int], batch: int) -> float:
    import torch

    model, dev = _hf_model(raw_cfg)
    total = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
        n = max(out_lens[i: i + batch])
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        total += n * len(chunk)
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    return total / dt


def _hf_generate_batch(raw_cfg: dict[str, Any], prompts: list[list[int]], out_lens: list[int]) -> float:
    from transformers import GenerationConfig

    model, _ = _hf_model(raw_cfg)
    gen = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen)
    dt = time.perf_counter() - t0
    total = sum(len(o.generated_tokens) for o in out.values())
    del model
    gc.collect()
    return total / dt


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
