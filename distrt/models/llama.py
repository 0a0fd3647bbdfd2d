"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias), SmolLM2; tied or untied LM head."""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn

from distrt.config import ModelConfig
from distrt.layers.attention import Attention, AttentionMetadata
from distrt.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distrt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from distrt.layers.norm import RMSNorm
from distrt.layers.rotary import RotaryEmbedding
from distrt.layers.tp_norm import all_reduce_then_norm
from distrt.models.shard import ShardContext

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    # forward(..., reduce=False) returns this rank's partial sum: the decoder layer then all-reduces it
    # together with the following RMSNorm (layers/tp_norm.py)
    defers_reduce = True

    def __init__(self, cfg: ModelConfig, ctx: ShardContext, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.ctx = ctx
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size,
                                          dtype=ctx.dtype)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False,
                                        tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, dtype=ctx.dtype, name="o_proj")
        self.rope = rope
        self.fused_rope_kv = os.environ.get("DISTRT_FUSED_ROPE_KV", "1") != "0"
        self.attn = Attention(self.qkv_proj.q_heads, self.qkv_proj.kv_heads, cfg.head_dim, cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                reduce: bool = True) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2*Hkv) * D] on this rank
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        if self.fused_rope_kv:  # rope applied inside attention, fused with the KV-cache write (one kernel)
            out = self.o_proj(self.attn(q, k, v, kv_cache, meta, positions=positions, rope=self.rope))
        else:  # DISTRT_FUSED_ROPE_KV=0 (A/B runs): the rotary kernel, then attention's KV write
            d = self.attn.head_dim
            q, k = self.rope(positions, q.reshape(q.shape[0], -1, d), k.reshape(k.shape[0], -1, d))
            out = self.o_proj(self.attn(q, k, v, kv_cache, meta))
        if self.ctx.tp_size > 1 and reduce:
            out = self.ctx.tp_comm.all_reduce(out)
        return out


class LlamaMLP(nn.Module):
    defers_reduce = True  # as LlamaAttention's

    def __init__(self, cfg: ModelConfig, ctx: ShardContext) -> None:
        super().__init__()
        self.ctx = ctx
        mlp_bias = bool(cfg.hf_config.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=mlp_bias,
                                                       tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, dtype=ctx.dtype,
                                                       name="gate_up_proj")
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=mlp_bias,
                                           tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, dtype=ctx.dtype, name="down_proj")

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        out = self.down_proj(self.gate_up_proj.forward_silu(x))  # fused into the GEMV for decode-sized x
        if self.ctx.tp_size > 1 and reduce:
            out = self.ctx.tp_comm.all_reduce(out)
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ShardContext, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, ctx, rope)
        self.mlp = LlamaMLP(cfg, ctx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype)
        self.set_deferred_reduce(ctx)

    def set_deferred_reduce(self, ctx: ShardContext) -> None:
        """With tp > 1 the attention's and the MLP's all-reduces move into the RMSNorm after each
        (one fused kernel where the comm has it); a block that reduces itself (MoE) keeps doing so.
        defer_mlp: this layer returns its MLP output unreduced (the next norm reduces it)."""
        self.tp_comm = ctx.tp_comm if ctx.tp_size > 1 else None
        self.defer_attn = self.tp_comm is not None and getattr(self.self_attn, "defers_reduce", False)
        self.defer_mlp = self.tp_comm is not None and getattr(self.mlp, "defers_reduce", False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache, meta: AttentionMetadata, x_partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x_partial: x is the previous layer's unreduced MLP output (its defer_mlp)."""
        h, residual = all_reduce_then_norm(self.input_layernorm, x, residual, self.tp_comm if x_partial else None)
        if self.defer_attn:
            h = self.self_attn(positions, h, kv_cache, meta, reduce=False)
            h, residual = all_reduce_then_norm(self.post_attention_layernorm, h, residual, self.tp_comm)
        else:
            h = self.self_attn(positions, h, kv_cache, meta)
            h, residual = self.post_attention_layernorm(h, residual)
        return (self.mlp(h, reduce=False) if self.defer_mlp else self.mlp(h)), residual


class LlamaForCausalLM(nn.Module):
    """Holds the layers of this rank's pipeline stage (all of them when pp == 1)."""

    # checkpoint name piece -> (our parameter name piece, shard id)
    stacked = (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
               ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))

    def __init__(self, cfg: ModelConfig, ctx: ShardContext) -> None:
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.first_layer, self.last_layer = ctx.layer_range(cfg.num_layers)
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, ctx.device)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank=ctx.tp_rank,
                                                    tp_size=ctx.tp_size, dtype=ctx.dtype) if ctx.is_first_stage else None)
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(cfg, ctx, rope)
                                     for i in range(self.first_layer, self.last_layer)})
        if ctx.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank=ctx.tp_rank,
                                          tp_size=ctx.tp_size, dtype=ctx.dtype)

    @property
    def kv_heads_per_rank(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.ctx.tp_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None
        h = self.embed_tokens(input_ids)
        if self.ctx.tp_size > 1:
            h = self.ctx.tp_comm.all_reduce(h)
        return h

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, hidden: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs this stage's layers. First stage: from input_ids; later stages: from (hidden, residual).
        Last stage returns (normed hidden, None); others return (hidden, residual) to send on."""
        h = self.embed(input_ids) if hidden is None else hidden  # [T, hidden]
        partial = False  # h is reduced: the embedding's output, or what the previous stage sent
        for i, layer in enumerate(self.layers.values()):
            h, residual = layer(positions, h, residual, kv_caches[i], meta, x_partial=partial)
            partial = layer.defer_mlp
        if not self.ctx.is_last_stage:
            return (self.ctx.tp_comm.all_reduce(h) if partial else h), residual
        h, _ = all_reduce_then_norm(self.norm, h, residual, self.ctx.tp_comm if partial else None)
        return h, None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits (gathered over tp ranks, padding dropped)."""
        logits = self.lm_head.logits(hidden)
        if self.ctx.tp_size > 1:
            logits = self.ctx.tp_comm.all_gather(logits, dim=-1)
        return logits[:, : self.cfg.vocab_size].float()

    # -- weights ---------------------------------------------------------------------------
    def checkpoint_names_wanted(self, name: str) -> bool:
        """Whether this rank needs a checkpoint tensor (pp stages skip other stages' layers)."""
        if name.startswith("model.layers."):
            idx = int(name.split(".")[2])
            return self.first_layer <= idx < self.last_layer
        if name.startswith("model.embed_tokens."):
            return self.embed_tokens is not None or (self.ctx.is_last_stage and self.cfg.tie_word_embeddings)
        if name.startswith(("model.norm.", "lm_head.")):
            return self.ctx.is_last_stage
        return not any(s in name for s in ("rotary_emb.inv_freq",))

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            if "rotary_emb.inv_freq" in ckpt_name or not self.checkpoint_names_wanted(ckpt_name):
                continue
            targets = self._targets(ckpt_name)
            if not targets:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of {self.cfg.architecture}")
            for pname, shard in targets:
                if pname not in params:
                    continue
                p = params[pname]
                loader = getattr(p, "weight_loader", None)
                if loader is None:
                    src = tensor.load() if hasattr(tensor, "load") else tensor
                    if tuple(src.shape) != tuple(p.shape):
                        raise ValueError(f"weight {ckpt_name}: checkpoint shape {tuple(src.shape)} != model {tuple(p.shape)}")
                    p.data.copy_(src)
                elif shard is None:
                    loader(p, tensor)
                else:
                    loader(p, tensor, shard)
                loaded.add(pname)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint at {self.cfg.path} lacks weights for: {', '.join(missing[:6])}"
                             + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))

    def _targets(self, name: str) -> list[tuple[str, Any]]:
        if name.startswith("model.embed_tokens."):
            out = []
            if self.embed_tokens is not None:
                out.append(("embed_tokens.weight", None))
            if self.ctx.is_last_stage and self.cfg.tie_word_embeddings:
                out.append(("lm_head.weight", None))
            return out
        if name.startswith("lm_head."):
            return [("lm_head.weight", None)]
        if name.startswith("model.norm."):
            return [("norm.weight", None)]
        if name.startswith("model.layers."):
            rest = name[len("model."):]
            for ckpt, ours, shard in self.stacked:
                if f".{ckpt}." in rest:
                    return [(rest.replace(f".{ckpt}.", f".{ours}."), shard)]
            return [(rest, None)]
        return []
