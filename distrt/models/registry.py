"""Maps a checkpoint's `architectures` entry to the class that implements it."""

from __future__ import annotations

from torch import nn

from distrt.models.llama import LlamaForCausalLM
from distrt.models.mixtral import MixtralForCausalLM
from distrt.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(architecture: str) -> type[nn.Module]:
    cls = _REGISTRY.get(architecture)
    if cls is None:
        raise ValueError(f"unsupported model architecture {architecture!r}; distrt supports: "
                         + ", ".join(supported_architectures()))
    return cls
