"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE.

    Qwen2-MoE layer MLP:  routed experts (top-k of softmax, renormalised iff norm_topk_prob)
                          + sigmoid(shared_expert_gate(x)) * shared_expert(x)     (a dense SwiGLU)
    Qwen3-MoE layer MLP:  routed experts only; attention has RMSNorm on q and k per head (q_norm/k_norm)
    both:                 layer i is dense (intermediate_size) when i is in mlp_only_layers or
                          (i + 1) % decoder_sparse_step != 0

The shared expert is tensor parallel over the whole TP group like a dense MLP; its partial sum is
added to the routed experts' partial before the layer's single all-reduce (the gate is a per-token
scalar, identical on every rank, so it commutes with the sum).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distrt.config import ModelConfig
from distrt.layers.attention import AttentionMetadata
from distrt.layers.moe import FusedMoE, ReplicatedLinear
from distrt.layers.norm import RMSNorm
from distrt.layers.rotary import RotaryEmbedding
from distrt.models.llama import KVCache, LlamaAttention, LlamaMLP
from distrt.models.mixtral import MoeCausalLM
from distrt.models.shard import ShardContext


class SharedExpertMoE(FusedMoE):
    """Routed experts plus a gated shared expert (Qwen2-MoE)."""

    def __init__(self, *args: object, shared_expert: LlamaMLP, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(self.hidden_size, 1, self.w13.dtype)

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        se = self.shared_expert
        shared = se.down_proj(se.gate_up_proj.forward_silu(x))  # [T, H], partial over the TP group
        return super().forward_partial(x) + torch.sigmoid(self.shared_expert_gate(x)) * shared


class QKNormAttention(LlamaAttention):
    """Llama attention with RMSNorm over head_dim on each query and key head before RoPE (Qwen3)."""

    def __init__(self, cfg: ModelConfig, ctx: ShardContext, rope: RotaryEmbedding) -> None:
        super().__init__(cfg, ctx, rope)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ctx.dtype)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ctx.dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                reduce: bool = True) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2*Hkv) * D] on this rank
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        d = self.attn.head_dim
        q, _ = self.q_norm(q.reshape(-1, d))  # [T * Hq, D]
        k, _ = self.k_norm(k.reshape(-1, d))  # [T * Hkv, D]
        # rope (after the norms) is applied inside attention, fused with the KV-cache write
        out = self.o_proj(self.attn(q, k, v, kv_cache, meta, positions=positions, rope=self.rope))
        if self.ctx.tp_size > 1 and reduce:
            out = self.ctx.tp_comm.all_reduce(out)
        return out


class Qwen2MoeForCausalLM(MoeCausalLM):
    def adapt_config(self, cfg: ModelConfig) -> ModelConfig:
        hf = cfg.hf_config
        if hf.get("use_sliding_window"):
            raise ValueError(f"{cfg.architecture} with use_sliding_window=true is not supported")
        # Qwen2-MoE's q/k/v always carry biases (config key qkv_bias since transformers 5)
        return dataclasses.replace(cfg, attention_bias=bool(hf.get("qkv_bias", hf.get("attention_bias", True))))

    def _routed(self, cls: type[FusedMoE], **extra: object) -> FusedMoE:
        hf = self.cfg.hf_config
        return cls(self.num_experts(), int(hf["num_experts_per_tok"]), self.cfg.hidden_size,
                   int(hf["moe_intermediate_size"]), renormalize=bool(hf.get("norm_topk_prob", False)),
                   **self.moe_kwargs(), **extra)  # type: ignore[arg-type]

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if not self.is_moe_layer(layer_idx):
            return LlamaMLP(self.cfg, self.ctx)
        shared = int(self.cfg.hf_config.get("shared_expert_intermediate_size") or 0)
        if shared == 0:
            return self._routed(FusedMoE)
        return self._routed(SharedExpertMoE,
                            shared_expert=LlamaMLP(dataclasses.replace(self.cfg, intermediate_size=shared), self.ctx))


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    attention_cls = QKNormAttention

    def adapt_config(self, cfg: ModelConfig) -> ModelConfig:
        if cfg.hf_config.get("use_sliding_window"):
            raise ValueError(f"{cfg.architecture} with use_sliding_window=true is not supported")
        return dataclasses.replace(cfg, attention_bias=bool(cfg.hf_config.get("attention_bias", False)))
