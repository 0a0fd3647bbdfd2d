"""4 and 8 GPUs (issue 10): parity and throughput of the wide layouts, one subcommand per suite step
(benchmarks/gpu_x4_suite.sh runs them, each in its own process under its own time limit; the parity
part lives in gpu_multi_parity.py, TensorRT-LLM's published figures in trtllm_reference.py).

  parity   greedy generation on random fp32 checkpoints under each layout (MPI executor), scored
           teacher-forced: transformers fp32's top-1 at every generated position given the layout's
           tokens as context, and one GPU's distrt top-1 (its prefill logits over the same tokens);
           both must be >= 0.99 (fp32, so the bar measures the parallel path, not rounding).
           Dense: the Llama-3-shaped checkpoint of tests/gpu/gpu_checks.py; MoE: a Mixtral-shaped
           checkpoint (8 experts, top-2, GQA) written by transformers (tests/moe/moe_testutil.py).
  bench    one random-weight shape (bf16) per call, each layout in turn: start-up time, batch-1 ms/token
           (benchmarks/gpu_tp.py's bench_bs1: 128-token prompt, N new tokens), offline throughput per
           workload (P prompts of I tokens, O new tokens each, all queued at once), the output rank's
           GPU idle share (with pp: the last stage's bubble), ratios against the first layout, and with
           --trtllm TensorRT-LLM's published figures for the shape and distrt's per-GPU ratio to them.
  summary  the headline metrics of result files, one line each (the suite's summary.txt).

    python benchmarks/gpu_multi.py parity --layouts tp4,tp2xpp2 --moe-layouts tp4xep4 --out PATH
    python benchmarks/gpu_multi.py bench --shape llama-3.1-70b --layouts tp4 \
        --workloads 128x128x512,1000x1000x256 --trtllm --out PATH
    python benchmarks/gpu_multi.py parity --device cpu            # tiny checkpoints, CPU ranks
    python benchmarks/gpu_multi.py bench --device cpu --shape llama-tiny --layouts tp1,tp4,tp2xpp2

Layouts: tp<N>[xpp<N>][xep<N>][@executor], e.g. tp4, tp2xpp2, tp4xep4, tp4@ray (default executor: local
for one rank, else mpi). Every result is written after each layout, so a step cut off by its time limit
keeps what it finished; a layout that fails is recorded with its error and the next one runs.
GPU_MULTI_PGID_FILE=PATH: the process group of every MPI job started is appended there (the suite
kills what a cut-off step left behind).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "gpu"),
                os.path.join(REPO, "tests", "moe")]  # gpu_tp; tiny_models, gpu_checks, moe_testutil

from distrt.bench.results import write_result  # noqa: E402
from trtllm_reference import TRTLLM_REFERENCE  # noqa: E402


# -- layouts and workloads ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    executor: str = "local"

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def name(self) -> str:
        s = f"tp{self.tp}" + (f"xpp{self.pp}" if self.pp > 1 else "") + (f"xep{self.ep}" if self.ep > 1 else "")
        default = "local" if self.world == 1 else "mpi"
        return s + ("" if self.executor == default else f"@{self.executor}")

    def llm_kwargs(self) -> dict[str, Any]:
        return dict(tensor_parallel_size=self.tp, pipeline_parallel_size=self.pp, expert_parallel_size=self.ep,
                    executor=self.executor)


def parse_layout(text: str) -> Layout:
    spec, _, executor = text.strip().partition("@")
    sizes = {"tp": 1, "pp": 1, "ep": 1}
    for part in spec.split("x"):
        m = re.fullmatch(r"(tp|pp|ep)(\d+)", part)
        if not m:
            raise ValueError(f"bad layout {text!r}: expected tp<N>[xpp<N>][xep<N>][@executor]")
        sizes[m.group(1)] = int(m.group(2))
    world = sizes["tp"] * sizes["pp"]
    return Layout(sizes["tp"], sizes["pp"], sizes["ep"], executor or ("local" if world == 1 else "mpi"))


def parse_layouts(text: str) -> list[Layout]:
    return [parse_layout(s) for s in text.split(",") if s.strip()]


def parse_workloads(text: str) -> list[tuple[int, int, int]]:
    """"128x128x512,1000x1000x256" -> [(input_len, output_len, prompts), ...]."""
    out = []
    for w in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", w.strip())
        if not m:
            raise ValueError(f"bad workload {w!r}: expected <input>x<output>x<prompts>")
        out.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return out


def note_process_group(llm: Any) -> None:
    """The MPI job's process group (its mpirun runs in a session of its own), for the suite's cleanup."""
    path = os.environ.get("GPU_MULTI_PGID_FILE")
    proc = getattr(llm._executor, "_proc", None)
    if path and proc is not None:
        with open(path, "a") as f:
            f.write(f"{proc.pid}\n")


def release(llm: Any) -> None:
    llm.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- throughput ----------------------------------------------------------------------------------------
def throughput(llm: Any, n: int, inp: int, out: int) -> dict[str, float]:
    """All n prompts queued at once; output tokens/s over the whole run (prefill included)."""
    from distrt import SamplingParams
    from gpu_tp import _Timed

    vocab = llm.config.model.vocab_size
    prompts = [{"prompt_token_ids": [(i * 131 + j * 7) % (vocab - 10) + 5 for j in range(inp)]} for i in range(n)]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer = _Timed(llm._executor)
    t = time.perf_counter()
    try:
        res = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True), use_tqdm=False)
    finally:
        timer.restore()
    dt = time.perf_counter() - t
    tokens = sum(len(r.outputs[0].token_ids) for r in res)
    idle = sum(i for _, i, _ in timer.samples if i is not None)
    return {"output_tok_s": tokens / dt, "seconds": dt, "output_tokens": float(tokens),
            "steps": float(len(timer.samples)), "gpu_idle_fraction": idle / dt}


def device_kwargs(device: str, kv_cache_memory: float, cpu_kv_blocks: int) -> dict[str, Any]:
    """LLM kwargs of a bench run: fp32 with a fixed block count on CPU, bf16 with a KV memory share on GPU."""
    if device == "cpu":
        return dict(dtype="float32", device="cpu", num_kv_blocks=cpu_kv_blocks)
    return dict(dtype="bfloat16", device="cuda", kv_cache_memory=kv_cache_memory)


def bench_layout(a: argparse.Namespace, lay: Layout, workloads: list[tuple[int, int, int]], max_len: int,
                 row: dict[str, Any], save: Any) -> None:
    """Fills `row` measurement by measurement, calling save() after each (a step cut off by its time
    limit keeps what this layout had measured)."""
    from distrt import LLM
    from gpu_tp import bench_bs1

    kw = device_kwargs(a.device, a.kv_cache_memory, a.cpu_kv_blocks)
    t0 = time.perf_counter()
    llm = LLM(f"shape:{a.shape}", **lay.llm_kwargs(), max_model_len=max_len, max_num_seqs=a.max_num_seqs,
              step_timeout_s=a.step_timeout_s, **kw)
    note_process_group(llm)
    row.update(startup_s=time.perf_counter() - t0, gpus=lay.world, kv_blocks=llm.engine.allocator.num_blocks,
               kv_tokens=llm.engine.allocator.num_blocks * llm.config.cache.block_size)
    save()
    print(f"{lay.name}: up in {row['startup_s']:.1f}s, KV for {row['kv_tokens']} tokens", flush=True)
    try:
        if a.bs1_tokens > 0:
            t = time.perf_counter()
            ms, overhead = bench_bs1(llm, prompt_len=a.bs1_prompt, new=a.bs1_tokens)
            row.update(bs1_ms_per_token=ms, step_overhead_ms=overhead, bs1_seconds=time.perf_counter() - t)
            print(f"{lay.name}: batch 1 {ms:.2f} ms/token (GPU idle between steps {overhead:.3f} ms)", flush=True)
            save()
        for inp, out, n in workloads:
            r = throughput(llm, n, inp, out)
            row[f"{inp}x{out}"] = {**r, "prompts": n}
            print(f"{lay.name}: {n} x {inp}/{out}: {r['output_tok_s']:.0f} output tok/s in {r['seconds']:.1f}s "
                  f"(idle {r['gpu_idle_fraction']:.3f})", flush=True)
            save()
        row["max_in_flight_seen"] = llm.engine.max_in_flight_seen
    finally:
        release(llm)


def _bench_metrics(runs: dict[str, dict[str, Any]], workloads: list[tuple[int, int, int]], shape: str,
                   trtllm: bool) -> dict[str, Any]:
    m: dict[str, Any] = {}
    up = [k for k, r in runs.items() if "startup_s" in r]
    base = up[0] if up else None  # the first layout that started (a failed one keeps what it measured)
    ref = TRTLLM_REFERENCE.get(shape) if trtllm else None
    for name, r in runs.items():
        if "error" in r:
            m[f"{name}_error"] = True
        if "startup_s" not in r:
            continue
        m[f"{name}_startup_s"] = r["startup_s"]
        if "bs1_ms_per_token" in r:
            m[f"{name}_bs1_ms_per_token"] = r["bs1_ms_per_token"]
            m[f"{name}_step_overhead_ms"] = r["step_overhead_ms"]
            if base and name != base and "bs1_ms_per_token" in runs[base]:
                m[f"{name}_vs_{base}_bs1_latency"] = r["bs1_ms_per_token"] / runs[base]["bs1_ms_per_token"]
        for inp, out, _ in workloads:
            w = f"{inp}x{out}"
            if w not in r:
                continue
            tok_s = r[w]["output_tok_s"]
            m[f"{name}_tok_s_{w}"] = tok_s
            m[f"{name}_tok_s_per_gpu_{w}"] = tok_s / r["gpus"]
            m[f"{name}_gpu_idle_fraction_{w}"] = r[w]["gpu_idle_fraction"]
            if base and name != base and w in runs[base]:
                m[f"{name}_vs_{base}_throughput_{w}"] = tok_s / runs[base][w]["output_tok_s"]
            for cfg, figs in (ref or {}).get("configs", {}).items():
                if w in figs:
                    m[f"{name}_per_gpu_vs_trtllm_{cfg}_{w}"] = (tok_s / r["gpus"]) / (figs[w] / figs["gpus"])
    return m


def cmd_bench(a: argparse.Namespace) -> int:
    cpu = a.device == "cpu"
    layouts = parse_layouts(a.layouts)
    workloads = parse_workloads(a.workloads)
    if a.bs1_prompt is None:
        a.bs1_prompt = 16 if cpu else 128
    max_len = max([i + o for i, o, _ in workloads] + [a.bs1_prompt + a.bs1_tokens + 8]) + 16
    slug = "" if cpu else _results_slug()
    out = a.out or (os.path.join(tempfile.gettempdir(), f"gpu_multi_{a.shape}_cpu.json") if cpu
                    else os.path.join(HERE, "results", slug, f"{a.shape}.json"))
    details: dict[str, Any] = {"shape": a.shape, "dtype": "float32" if cpu else "bfloat16",
                               "workloads": [{"input_len": i, "output_len": o, "prompts": n} for i, o, n in workloads],
                               "bs1": {"prompt_len": a.bs1_prompt, "new_tokens": a.bs1_tokens},
                               "max_num_seqs": a.max_num_seqs, "max_model_len": max_len,
                               "kv_cache_memory": a.kv_cache_memory, "layouts": [x.name for x in layouts],
                               "baseline_layout": layouts[0].name if layouts else None}
    if a.trtllm:
        details["trtllm_reference"] = TRTLLM_REFERENCE.get(a.shape, {"note": f"no published figure recorded for {a.shape}"})
    if not cpu:
        details["versions"] = {"torch": torch.__version__, "gpus": torch.cuda.device_count(),
                               "gpu": torch.cuda.get_device_name(0)}
    runs: dict[str, dict[str, Any]] = {}
    details["runs"] = runs
    failed = False
    def save() -> None:
        write_result(out, _bench_metrics(runs, workloads, a.shape, a.trtllm), details)

    for lay in layouts:
        row: dict[str, Any] = {}
        runs[lay.name] = row
        try:
            bench_layout(a, lay, workloads, max_len, row, save)
        except Exception as e:  # record it, go on with the next layout
            failed = True
            row.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
            print(f"{lay.name}: ERROR {type(e).__name__}: {e}", flush=True)
        save()
    metrics = _bench_metrics(runs, workloads, a.shape, a.trtllm)
    write_result(out, metrics, details)
    for k, v in metrics.items():
        print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
    print(f"wrote {out}", flush=True)
    return 1 if failed else 0


# -- summary -------------------------------------------------------------------------------------------
_HEADLINE = re.compile(r"(_pass$|all_pass|top1_vs|bs1_ms_per_token|_tok_s_\d|_vs_tp\d|_vs_trtllm_|_error$|startup_s)")


def _headline(key: str) -> bool:
    if "_vs_trtllm_" in key:
        return "h200" in key  # the same GPU model; the H100 ratios stay in the file
    return bool(_HEADLINE.search(key))


def cmd_summary(a: argparse.Namespace) -> int:
    for path in a.files:
        try:
            doc = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"{os.path.basename(path)}: unreadable ({e})")
            continue
        items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in doc.get("metrics", {}).items() if _headline(k)]
        print(f"{os.path.basename(path)} ({doc.get('device')}, {doc.get('commit', '')[:12]}): " + ", ".join(items))
    return 0


def _results_slug() -> str:
    from distrt.bench.kernels import device_slug

    return f"{device_slug(torch.cuda.get_device_name(0))}x{torch.cuda.device_count()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity", help="fp32 teacher-forced top-1 of each layout vs transformers and one device")
    p.add_argument("--layouts", default="tp4,tp2xpp2", help="dense (Llama-3-shaped) layouts")
    p.add_argument("--moe-layouts", default="tp4xep4", help="MoE (Mixtral-shaped) layouts; '' skips the MoE")
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens per prompt (0: 48 on GPU, 12 on CPU)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None)
    p.set_defaults(func=lambda a: __import__("gpu_multi_parity").cmd_parity(a))
    b = sub.add_parser("bench", help="batch-1 latency and offline throughput of one shape, per layout")
    b.add_argument("--shape", default="llama-3.1-8b")
    b.add_argument("--layouts", default="tp1,tp4,tp2xpp2")
    b.add_argument("--workloads", default=None, help="<in>x<out>x<prompts>,... (default 128x128x512; CPU 16x8x8)")
    b.add_argument("--bs1-tokens", type=int, default=None, help="batch-1 new tokens (0: skip; default 256, CPU 16)")
    b.add_argument("--bs1-prompt", type=int, default=None, help="batch-1 prompt length (default 128, CPU 16)")
    b.add_argument("--max-num-seqs", type=int, default=256)
    b.add_argument("--kv-cache-memory", type=float, default=0.6, help="fraction of free GPU memory for the KV pool")
    b.add_argument("--cpu-kv-blocks", type=int, default=256)
    b.add_argument("--step-timeout-s", type=float, default=300.0, help="the engine's step watchdog")
    b.add_argument("--trtllm", action="store_true", help="attach TensorRT-LLM's published figures and per-GPU ratios")
    b.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    b.add_argument("--out", default=None)
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("summary", help="headline metrics of result files")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_summary)
    a = ap.parse_args(argv)
    if a.cmd == "bench":
        cpu = a.device == "cpu"
        a.workloads = a.workloads or ("16x8x8" if cpu else "128x128x512")
        a.bs1_tokens = (16 if cpu else 256) if a.bs1_tokens is None else a.bs1_tokens
    if a.cmd != "summary" and a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_multi.py needs CUDA GPUs (or --device cpu)")
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
