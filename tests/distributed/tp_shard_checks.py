"""Shared by the gloo and MPI tests: a TP shard's prefill logits for fixed prompts."""

from __future__ import annotations

import torch

from distrt.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from distrt.messages import SamplingSpec
from distrt.worker.request_state import RequestState
from distrt.worker.worker import Worker

PROMPTS = [[5, 9, 3, 44, 17, 8, 100, 2, 61], list(range(3, 40))]


def engine_config(path: str, tp: int) -> EngineConfig:
    from distrt.models.loader import load_hf_config

    mc = ModelConfig.from_hf_dict(load_hf_config(path), path=path, kind="hf", dtype="float32")
    return EngineConfig(mc, CacheConfig(num_kv_blocks=32), ParallelConfig(tensor_parallel_size=tp),
                        SchedulerConfig(max_model_len=128), DeviceConfig("cpu"))


def shard_logits(path: str, tp_rank: int, tp_size: int, comm: object) -> list[torch.Tensor]:
    """Build this rank's shard (it reads only its slices) and return full-vocab logits per prompt."""
    w = Worker(engine_config(path, tp_size), tp_rank=tp_rank, tp_size=tp_size, tp_comm=comm if tp_size > 1 else None)
    w.init_kv_cache(32)
    out = []
    for i, p in enumerate(PROMPTS):
        st = RequestState(f"r{i}", list(p), len(p), list(range(16 * i, 16 * i + 4)), 0, SamplingSpec(seed=0))  # type: ignore[arg-type]
        inputs = w.runner.prepare([st], [len(p)])
        inputs.sample_token_idx = torch.arange(len(p))
        out.append(w.runner.forward_logits(inputs))
    return out
