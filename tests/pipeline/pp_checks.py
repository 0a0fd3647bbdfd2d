"""Shared by the pipeline tests: a worker-level decode loop with two plans in flight, and helpers."""

from __future__ import annotations

from typing import Any, Callable

from distrt.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from distrt.messages import CachedRequest, NewRequest, RequestId, SamplingSpec, StepPlan
from distrt.worker.worker import Worker

PROMPTS = [[5, 9, 3, 44, 17, 8, 100, 2, 61], list(range(3, 40))]


def engine_config(path: str, pp: int, split: tuple[int, ...] | None) -> EngineConfig:
    from distrt.models.loader import load_hf_config

    mc = ModelConfig.from_hf_dict(load_hf_config(path), path=path, kind="hf", dtype="float32")
    return EngineConfig(mc, CacheConfig(num_kv_blocks=16), ParallelConfig(pipeline_parallel_size=pp, pp_layer_split=split),
                        SchedulerConfig(max_model_len=128), DeviceConfig("cpu"))


def worker_decode(path: str, stage: int, pp: int, comm: Any, split: tuple[int, ...] | None, steps: int,
                  share: Callable[[Any], Any]) -> list[tuple[str, int, float]]:
    """Two requests, each its own micro-batch, alternating with two plans in flight: the way the
    coordinator drives the workers. `share(obj)` hands the last stage's object to every stage (what
    the coordinator does by putting sampled tokens in the next plan). Returns the last stage's
    (request, token, logprob) per step, in order."""
    w = Worker(engine_config(path, pp, split), pp_rank=stage, pp_size=pp, pp_comm=comm)
    w.init_kv_cache(16)
    spec = SamplingSpec(seed=0, logprobs=2)
    ids = [RequestId("a"), RequestId("b")]
    computed = {rid: 0 for rid in ids}
    step = 0
    out: list[tuple[str, int, float]] = []

    def run(plan: StepPlan) -> Any:
        res = w.execute(plan)
        for rid, n in plan.num_scheduled_tokens.items():
            computed[rid] += n
        return res

    pending = []
    for i, (rid, p) in enumerate(zip(ids, PROMPTS)):
        step += 1
        new = NewRequest(rid, tuple(p), len(p), tuple(range(8 * i, 8 * i + 8)), 0, spec)  # type: ignore[arg-type]
        pending.append(run(StepPlan(step, new_requests=(new,), num_scheduled_tokens={rid: len(p)})))
    for k in range(steps):
        rid = ids[k % 2]
        res = pending.pop(0)
        tok, lp = share((res.sampled[rid], res.logprobs[rid].sampled_logprob) if w.samples else None)
        out.append((rid, tok, lp))
        step += 1
        cached = CachedRequest(rid, computed[rid], (), (tok,))
        pending.append(run(StepPlan(step, cached_requests=(cached,), num_scheduled_tokens={rid: 1})))
    for res in pending:  # drain (the results past `steps` are not compared)
        share(None)
    return out


