"""Tiny random MoE checkpoints written by transformers itself, and shared helpers for tests/moe."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from distrt.models.shard import ShardContext  # noqa: E402
from tiny_models import write_word_tokenizer  # noqa: E402

MOE_ARCHS: dict[str, dict[str, Any]] = {
    # 8 experts, top-2, renormalised; GQA 4:2; odd vocab
    "mixtral": dict(arch="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=211),
    # 6 experts, top-2, not renormalised, gated shared expert; layer 1 dense (mlp_only_layers); qkv bias
    "qwen2_moe": dict(arch="qwen2_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                      norm_topk_prob=False, vocab_size=203),
    # 8 experts, top-3, renormalised; q/k norm; head_dim 24 != hidden / heads; layer 0 dense (sparse step 2)
    "qwen3_moe": dict(arch="qwen3_moe", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
                      num_experts_per_tok=3, moe_intermediate_size=32, decoder_sparse_step=2,
                      norm_topk_prob=True, vocab_size=197),
}


def moe_config(name: str, **overrides: Any):  # type: ignore[no-untyped-def]
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    spec = dict(MOE_ARCHS[name])
    spec.update(overrides)
    cls = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig}[spec.pop("arch")]
    spec.setdefault("max_position_embeddings", 512)
    spec.setdefault("rms_norm_eps", 1e-5)
    spec.setdefault("bos_token_id", 1)
    spec.setdefault("eos_token_id", 2)
    spec.setdefault("tie_word_embeddings", False)
    return cls(**spec)


def make_moe_checkpoint(root: str, name: str, seed: int = 0, std: float = 0.08, **overrides: Any) -> str:
    from transformers import AutoModelForCausalLM

    cfg = moe_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so logits are far from flat and ties are rare
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif p.dim() == 1:
                p.uniform_(0.8, 1.2)  # norms (and biases) away from their defaults, so a missed load shows
    path = os.path.join(root, name)
    model.save_pretrained(path)
    write_word_tokenizer(path, cfg.vocab_size)
    return path


@dataclass(frozen=True)
class MoeShardContext(ShardContext):
    """ShardContext plus the expert-parallel fields the lead is to add to ShardContext itself."""

    ep_size: int = 1
    num_redundant_experts: int = 0
    moe_dispatch: str = "allreduce"


def engine_config(path: str, tp: int = 1, ep: int = 1):  # type: ignore[no-untyped-def]
    from distrt.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from distrt.models.loader import load_hf_config

    mc = ModelConfig.from_hf_dict(load_hf_config(path), path=path, kind="hf", dtype="float32")
    return EngineConfig(mc, CacheConfig(num_kv_blocks=32), ParallelConfig(tensor_parallel_size=tp,
                                                                           expert_parallel_size=ep),
                        SchedulerConfig(max_model_len=128), DeviceConfig("cpu"))


PROMPTS = [[5, 9, 3, 44, 17, 8, 100, 2, 61], list(range(3, 40)), [7]]


def shard_prefill_logits(path: str, ctx: ShardContext, *, runner: Any = None,
                         return_runner: bool = False) -> Any:
    """This rank's model shard (reading only its slices) -> full-vocab prefill logits per prompt.
    Pass `runner` to reuse a built shard; return_runner=True returns (logits, runner)."""
    from distrt.messages import SamplingSpec
    from distrt.worker.model_runner import ModelRunner
    from distrt.worker.request_state import RequestState

    if runner is None:
        runner = ModelRunner(engine_config(path, ctx.tp_size, getattr(ctx, "ep_size", 1)), ctx)
        runner.init_kv_cache(32)
    out = []
    for i, p in enumerate(PROMPTS):
        st = RequestState(f"r{i}", list(p), len(p), list(range(8 * i, 8 * i + 4)), 0, SamplingSpec(seed=0))  # type: ignore[arg-type]
        inputs = runner.prepare([st], [len(p)])
        inputs.sample_token_idx = torch.arange(len(p))
        out.append(runner.forward_logits(inputs))
    return (out, runner) if return_runner else out
