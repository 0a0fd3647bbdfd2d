"""Mixtral (top-2 of 8 experts every layer), and the MoE scaffolding qwen_moe.py builds on.

A MoE model here is the Llama model with each decoder layer's MLP chosen per layer (routed experts,
routed + shared, or dense) and the attention class chosen per model; attention, embeddings, norms,
the LM head, `forward`, `compute_logits` and `load_weights` are LlamaForCausalLM's.

Checkpoint names (per-expert tensors, as Mixtral and Qwen checkpoints ship them, or stacked as
transformers 5 holds them in memory) -> our stacked expert parameters:

    model.layers.{i}.{moe}.experts.{e}.{w1|gate_proj}.weight  [I, H] -> layers.{i}.mlp.w13[slot, :I/etp]
    model.layers.{i}.{moe}.experts.{e}.{w3|up_proj}.weight    [I, H] -> layers.{i}.mlp.w13[slot, I/etp:]
    model.layers.{i}.{moe}.experts.{e}.{w2|down_proj}.weight  [H, I] -> layers.{i}.mlp.w2[slot]
    model.layers.{i}.{moe}.experts.gate_up_proj           [E, 2I, H] -> layers.{i}.mlp.w13 (every local slot)
    model.layers.{i}.{moe}.experts.down_proj               [E, H, I] -> layers.{i}.mlp.w2
    model.layers.{i}.{moe}.gate.weight                         [E, H] -> layers.{i}.mlp.gate.weight

({moe} is "block_sparse_moe" in Mixtral checkpoints, "mlp" otherwise.) A rank reads only the
experts its slots hold (`checkpoint_names_wanted`).

Expert parallelism comes from the ShardContext: `ep_size`, `num_redundant_experts` and
`moe_dispatch` ("allreduce" | "all2all"); a context without those fields means ep=1, no
redundant slots, all-reduce dispatch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from distrt.config import ModelConfig
from distrt.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distrt.layers.moe import Dispatch, FusedMoE
from distrt.layers.norm import RMSNorm
from distrt.layers.rotary import RotaryEmbedding
from distrt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from distrt.models.shard import ShardContext
from distrt.parallel.experts import ExpertPlacement, moe_layers_of, num_experts_of

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class MoeParallel:
    ep_size: int = 1
    num_redundant_experts: int = 0
    dispatch: Dispatch = "allreduce"

    @staticmethod
    def of(ctx: ShardContext) -> MoeParallel:
        return MoeParallel(int(getattr(ctx, "ep_size", 1)), int(getattr(ctx, "num_redundant_experts", 0)),
                           getattr(ctx, "moe_dispatch", "allreduce"))


def ep_communicator(ctx: ShardContext, par: MoeParallel) -> Any:
    """The EP group's communicator, only for all2all dispatch: the context's `ep_comm` (split from the
    world by the worker) or, with one pipeline stage, split here from the TP group (collective)."""
    if par.dispatch != "all2all" or par.ep_size == 1:
        return None
    given = getattr(ctx, "ep_comm", None)
    if given is not None or par.ep_size == ctx.tp_size:
        return given if given is not None else ctx.tp_comm
    if ctx.pp_size > 1:  # torch.distributed's new_group must be entered by every world rank
        raise ValueError("all2all MoE dispatch with pipeline parallelism needs ShardContext.ep_comm "
                         "(split from the world communicator with ParallelLayout.ep_groups())")
    etp = ctx.tp_size // par.ep_size
    return ctx.tp_comm.split([[a * par.ep_size + r for r in range(par.ep_size)] for a in range(etp)])


class MoeDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer (its forward) with the MLP and the attention class given by the model."""

    def __init__(self, cfg: ModelConfig, ctx: ShardContext, rope: RotaryEmbedding, mlp: nn.Module,
                 attention_cls: type[LlamaAttention] = LlamaAttention) -> None:
        nn.Module.__init__(self)
        self.self_attn = attention_cls(cfg, ctx, rope)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype)
        self.set_deferred_reduce(ctx)  # the MoE block reduces its own output; the attention defers


class MoeCausalLM(LlamaForCausalLM):
    """Base of the MoE models: subclasses say how each layer's MLP is built (`make_mlp`)."""

    attention_cls: type[LlamaAttention] = LlamaAttention
    checkpoint_moe_module = "mlp"  # the MoE block's name in checkpoints
    expert_parts = {"w1": "gate", "w3": "up", "w2": "down",
                    "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def __init__(self, cfg: ModelConfig, ctx: ShardContext) -> None:
        nn.Module.__init__(self)  # LlamaForCausalLM.__init__ would build dense MLPs; same members below
        cfg = self.adapt_config(cfg)
        self.cfg, self.ctx = cfg, ctx
        self.moe_parallel = MoeParallel.of(ctx)
        self.ep_comm = ep_communicator(ctx, self.moe_parallel)
        self.first_layer, self.last_layer = ctx.layer_range(cfg.num_layers)
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, ctx.device)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank=ctx.tp_rank,
                                                    tp_size=ctx.tp_size, dtype=ctx.dtype) if ctx.is_first_stage else None)
        self.layers = nn.ModuleDict({str(i): MoeDecoderLayer(cfg, ctx, rope, self.make_mlp(i), self.attention_cls)
                                     for i in range(self.first_layer, self.last_layer)})
        if ctx.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank=ctx.tp_rank,
                                          tp_size=ctx.tp_size, dtype=ctx.dtype)

    # -- per-model choices --------------------------------------------------------------------------
    def adapt_config(self, cfg: ModelConfig) -> ModelConfig:
        """Fixes ModelConfig fields this family spells differently in config.json."""
        return cfg

    def make_mlp(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def num_experts(self) -> int:
        return num_experts_of(self.cfg.hf_config)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in moe_layers_of(self.cfg.hf_config, self.cfg.num_layers)

    def moe_kwargs(self) -> dict[str, Any]:
        """FusedMoE arguments shared by every MoE layer of this rank."""
        ctx, par = self.ctx, self.moe_parallel
        return dict(dtype=ctx.dtype, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, ep_size=par.ep_size,
                    tp_comm=ctx.tp_comm, ep_comm=self.ep_comm, num_redundant_experts=par.num_redundant_experts,
                    dispatch=par.dispatch)

    # -- expert placement (the worker's hooks) ---------------------------------------------------------
    def moe_layers(self) -> dict[int, FusedMoE]:
        """This stage's MoE layers by global layer index."""
        return {int(i): layer.mlp for i, layer in self.layers.items() if isinstance(layer.mlp, FusedMoE)}

    def take_expert_load(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each logical expert per MoE layer since the last call (int64 [E]); clears."""
        return {i: m.take_expert_load() for i, m in self.moe_layers().items()}

    def apply_expert_placement(self, layer_idx: int, placement: ExpertPlacement) -> None:
        """Collective over the TP group: moves layer `layer_idx`'s expert weights to `placement`."""
        self.moe_layers()[layer_idx].apply_placement(placement)

    # -- weights ------------------------------------------------------------------------------------------
    def _canonical(self, name: str) -> str:
        moe = self.checkpoint_moe_module
        return name.replace(f".{moe}.", ".mlp.") if moe != "mlp" else name

    def checkpoint_names_wanted(self, name: str) -> bool:
        m = _EXPERT.match(self._canonical(name))
        if m:
            layer = self.layers[m.group(1)] if m.group(1) in self.layers else None
            return layer is not None and isinstance(layer.mlp, FusedMoE) and layer.mlp.holds(int(m.group(2)))
        return super().checkpoint_names_wanted(name)

    def _targets(self, name: str) -> list[tuple[str, Any]]:
        name = self._canonical(name)
        m = _EXPERT.match(name)
        if m:
            part = self.expert_parts.get(m.group(3))
            if part is None:
                return []
            return [(f"layers.{m.group(1)}.mlp.{'w2' if part == 'down' else 'w13'}", (part, int(m.group(2))))]
        m = _STACKED_EXPERTS.match(name)
        if m:
            if m.group(2) == "gate_up_proj":
                return [(f"layers.{m.group(1)}.mlp.w13", ("gate_up", None))]
            return [(f"layers.{m.group(1)}.mlp.w2", ("down", None))]
        return super()._targets(name)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(weights)
        for moe in self.moe_layers().values():
            moe.check_loaded()


class MixtralForCausalLM(MoeCausalLM):
    checkpoint_moe_module = "block_sparse_moe"

    def make_mlp(self, layer_idx: int) -> nn.Module:
        hf = self.cfg.hf_config
        return FusedMoE(self.num_experts(), int(hf["num_experts_per_tok"]), self.cfg.hidden_size,
                        self.cfg.intermediate_size, renormalize=True, **self.moe_kwargs())
