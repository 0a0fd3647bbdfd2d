"""Builds this rank's model shard on its device and fills it from the checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from distrt.config import ModelConfig
from distrt.models.registry import model_class
from distrt.models.shard import ShardContext


def build_model(cfg: ModelConfig, ctx: ShardContext) -> nn.Module:
    cls = model_class(cfg.architecture)
    with torch.device(ctx.device):
        model = cls(cfg, ctx)
    if cfg.kind == "shape":
        from distrt.models.shapes import random_checkpoint

        model.load_weights(random_checkpoint(cfg.hf_config, ctx.dtype, ctx.device))
    else:
        model.load_weights(_weights(cfg, model))
    return model.eval()


def _weights(cfg: ModelConfig, model: nn.Module):  # type: ignore[no-untyped-def]
    wanted = getattr(model, "checkpoint_names_wanted", None)
    if cfg.kind == "gguf":
        from distrt.models.gguf_loader import iter_gguf_weights

        return ((n, t) for n, t in iter_gguf_weights(cfg.path) if wanted is None or wanted(n))
    from distrt.models.loader import iter_safetensors_lazy

    return iter_safetensors_lazy(cfg.path, names_filter=wanted)
