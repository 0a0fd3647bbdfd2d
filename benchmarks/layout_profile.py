"""Where a layout loses throughput: offline throughput of one workload under layout variants, each
with a torch-profiler window over its workers' steps (distrt/worker/profiling.py).

    python benchmarks/layout_profile.py --shape llama-3.1-8b --variants tp1,tp4,tp4:noipc,tp4:sync \
        --workload 128x128x512 --profile-steps 20:4 --out-dir /tmp/prof

Variant = a gpu_multi layout plus options: `noipc` (custom_all_reduce=False: NCCL for every TP
all-reduce), `sync` (async_scheduling=False). Writes <out-dir>/summary.json and, per variant,
<out-dir>/<variant>/worker_tp<r>_pp<s>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from gpu_multi import device_kwargs, parse_layout, parse_workloads, release, throughput  # noqa: E402


def run_variant(a: argparse.Namespace, variant: str, inp: int, out: int, n: int) -> dict[str, Any]:
    from distrt import LLM

    spec, *opts = variant.split(":")
    lay = parse_layout(spec)
    kw: dict[str, Any] = dict(custom_all_reduce="noipc" not in opts, async_scheduling="sync" not in opts)
    kw.update(device_kwargs(a.device, a.kv_cache_memory, cpu_kv_blocks=256))
    os.environ["DISTRT_TORCH_PROFILE"] = os.path.join(a.out_dir, variant.replace(":", "_"))
    os.environ["DISTRT_PROFILE_STEPS"] = a.profile_steps
    t0 = time.perf_counter()
    llm = LLM(f"shape:{a.shape}", **lay.llm_kwargs(), max_model_len=inp + out + 16, max_num_seqs=a.max_num_seqs,
              step_timeout_s=300.0, **kw)
    up = time.perf_counter() - t0
    try:
        r = throughput(llm, n, inp, out)
        r.update(startup_s=up, kv_blocks=llm.engine.allocator.num_blocks)
        if hasattr(llm._executor, "describe_workers"):
            r["workers"] = llm._executor.describe_workers()
        return r
    finally:
        release(llm)
        os.environ.pop("DISTRT_TORCH_PROFILE", None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--variants", default="tp1,tp4,tp4:noipc")
    p.add_argument("--workload", default="128x128x512")
    p.add_argument("--profile-steps", default="20:4")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-memory", type=float, default=0.6)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out-dir", required=True)
    a = p.parse_args()
    (inp, out, n), = parse_workloads(a.workload)
    os.makedirs(a.out_dir, exist_ok=True)
    summary: dict[str, Any] = {"shape": a.shape, "workload": a.workload, "variants": {}}
    for v in a.variants.split(","):
        try:
            r = run_variant(a, v, inp, out, n)
            print(f"{v}: {r['output_tok_s']:.0f} output tok/s in {r['seconds']:.1f}s, {r['steps']:.0f} steps, "
                  f"idle {r['gpu_idle_fraction']:.3f}", flush=True)
        except Exception as e:
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
            print(f"{v}: FAILED {r['error']}", flush=True)
        summary["variants"][v] = r
        with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
