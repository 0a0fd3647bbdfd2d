"""Predict offline throughput of scheduler settings without a GPU: distrt's own Scheduler and
KVAllocator run the workload, and each step is charged by a cost model of one GPU.

    python benchmarks/sched_sim.py --input-len 1000 --output-len 1000 --num-prompts 512 \
        --max-num-seqs 224,256,288 --kv-blocks 28573                       # H100, bf16 KV cache
    python benchmarks/sched_sim.py ... --max-num-seqs 448,512 --kv-blocks 57260 --kv-bytes-per-token 65536   # fp8
    python benchmarks/sched_sim.py ... --num-prompts 3000 --max-num-seqs 512 --admission lookahead

Ranked with it (bf16 1000/1000, H100 pool): greedy admission at 224 sequences 6,954 tok/s (512 prompts)
and 7,352 (3000 prompts); lookahead admission (engine/admission.py, PACE_FACTOR 1.5) 7,259 and 7,724.

Cost of a step (ms), defaults calibrated on an H100 with the Llama-3.1-8B shape
(benchmarks/results/h100: batch-1 6.2 ms, batch-128 decode 8.0 ms, 1000/1000 runs):
    linear = max(weights_ms + per_token_ms x tokens, tokens x flops_per_token / gemm_rate)
    + decode rows' KV bytes / bandwidth + prompt rows' attention FLOPs / attention rate + overhead
It is a model: use it to rank settings (it predicted 73.8 s for a bf16 1000/1000 run measured at
71.5-72 s, and missed fp8-cache runs by ~25%, whose steps with prompt tokens are slower than modelled),
then measure the best ones on the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrt.config import SchedulerConfig  # noqa: E402
from distrt.engine.kv_allocator import KVAllocator  # noqa: E402
from distrt.engine.request import Request  # noqa: E402
from distrt.engine.sampling_params import SamplingParams  # noqa: E402
from distrt.engine.scheduler import Scheduler  # noqa: E402
from distrt.messages import StepResult  # noqa: E402


def step_ms(plan: Any, requests: dict[str, Request], a: argparse.Namespace) -> float:
    tokens = sum(plan.num_scheduled_tokens.values())
    linear = max(a.weights_ms + a.per_token_ms * tokens, tokens * a.flops_per_token / a.gemm_tflops * 1e-9)
    kv_tokens, attn_flops = 0, 0.0
    for rid, n in plan.num_scheduled_tokens.items():
        r = requests[rid]
        if n == 1:
            kv_tokens += r.num_computed_tokens + 1
        else:  # causal attention of n new tokens over the cached prefix and themselves
            attn_flops += 4.0 * n * (r.num_computed_tokens + n / 2) * a.attn_width
    return (linear + kv_tokens * a.kv_bytes_per_token / (a.bandwidth_gbps * 1e6)
            + attn_flops / a.attn_tflops * 1e-9 + a.overhead_ms)


def simulate(a: argparse.Namespace, max_num_seqs: int) -> dict[str, float]:
    cfg = SchedulerConfig(max_model_len=a.input_len + a.output_len + 8, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=a.max_num_batched_tokens, admission=a.admission)
    sched = Scheduler(cfg, KVAllocator(a.kv_blocks, a.block_size))
    for i in range(a.num_prompts):
        sched.add_request(Request(str(i), [1] * a.input_len, SamplingParams(max_tokens=a.output_len, ignore_eos=True),
                                  0, (2,), cfg.max_model_len))
    ms, out = 0.0, 0
    while sched.has_unfinished():
        plan = sched.schedule()
        live = dict(sched.requests)
        ms += step_ms(plan, live, a)
        sampled = {rid: 7 for rid, n in plan.num_scheduled_tokens.items()
                   if live[rid].num_computed_tokens + n >= live[rid].num_tokens}
        sched.update(plan, StepResult(step_id=plan.step_id, sampled=sampled))
        out += len(sampled)
    return {"max_num_seqs": max_num_seqs, "seconds": ms / 1e3, "output_tok_s": out / ms * 1e3,
            "steps": sched.stats.num_steps, "preemptions": sched.stats.num_preemptions}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-num-seqs", default="224", help="comma list: one simulation each")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--admission", default="greedy", choices=["greedy", "lookahead"])
    p.add_argument("--kv-blocks", type=int, default=28573, help="the engine's num_kv_blocks (H100 8B bf16: 28573)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-bytes-per-token", type=int, default=131072, help="8B bf16: 32 layers x 2 x 8 x 128 x 2 B")
    p.add_argument("--weights-ms", type=float, default=6.2, help="a decode step's fixed cost (weights read)")
    p.add_argument("--per-token-ms", type=float, default=0.0138, help="added per token while memory-bound")
    p.add_argument("--flops-per-token", type=float, default=16.06e9, help="2 x parameters")
    p.add_argument("--gemm-tflops", type=float, default=620.0)
    p.add_argument("--bandwidth-gbps", type=float, default=2900.0, help="decode attention's achieved HBM rate")
    p.add_argument("--attn-width", type=float, default=4096 * 32, help="hidden size x layers")
    p.add_argument("--attn-tflops", type=float, default=400.0)
    p.add_argument("--overhead-ms", type=float, default=0.2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    a = parse(argv)
    rows = [simulate(a, int(s)) for s in a.max_num_seqs.split(",")]
    print(f"{'max_num_seqs':>12} {'seconds':>8} {'tok/s':>8} {'steps':>6} {'preempt':>7}")
    for r in rows:
        print(f"{r['max_num_seqs']:>12} {r['seconds']:>8.1f} {r['output_tok_s']:>8.0f} {r['steps']:>6} "
              f"{r['preemptions']:>7}")
    return rows


if __name__ == "__main__":
    main()
