"""Named architecture shapes with random weights (`model="shape:llama-3.1-8b"`), so benchmarks and
GPU tests need no download: the same config a real checkpoint has, weights drawn at load time.

The weights are a virtual checkpoint: tensor `name` is drawn from a generator seeded by (seed, name)
on the loading device (`RandomTensor`), and loaded through the model's ordinary `load_weights`.
So every consumer of a name gets the same values: this model under any TP/PP layout, and a
transformers model filled by `fill_random_` (the benchmarks' baseline runs on identical weights).
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, ctx: int,
           rope: dict[str, Any] | None, theta: float, tie: bool = False) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hidden // heads, "vocab_size": vocab,
            "max_position_embeddings": ctx, "rms_norm_eps": 1e-5, "rope_theta": theta, "rope_scaling": rope,
            "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def _mixtral(layers: int, hidden: int = 4096, inter: int = 14336, heads: int = 32, kv: int = 8, experts: int = 8,
             top_k: int = 2, vocab: int = 32000) -> dict[str, Any]:
    return {**_llama(hidden, inter, layers, heads, kv, vocab, 32768, None, 1000000.0),
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts,
            "num_experts_per_tok": top_k}


SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, 131072, _LLAMA3_ROPE, 500000.0),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128256, 131072, _LLAMA3_ROPE, 500000.0),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, 131072,
                           {**_LLAMA3_ROPE, "factor": 32.0}, 500000.0, tie=True),
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096, None, 10000.0),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, 8192, None, 100000.0, tie=True),
    "llama-tiny": _llama(64, 128, 2, 4, 2, 512, 2048, None, 10000.0),  # smoke tests
    "mixtral-8x7b": _mixtral(32),
    "mixtral-8x7b-16l": _mixtral(16),  # half the layers: ~24B parameters, fits one H200 per EP/TP rank with room
    "mixtral-tiny": _mixtral(2, hidden=64, inter=96, heads=4, kv=2, vocab=512),  # smoke tests
}

PREFIX = "shape:"


def is_shape(model: str) -> bool:
    return model.startswith(PREFIX)


def shape_config(model: str, **overrides: Any) -> dict[str, Any]:
    name = model[len(PREFIX):] if is_shape(model) else model
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}")
    return {**SHAPES[name], **overrides}


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over "t0" .. "t{V-1}" (text in and out works; ids are what matter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


_HF_SKIP = ("architectures", "torch_dtype", "model_type", "eos_token_ids")


def hf_config(raw: dict[str, Any]) -> Any:
    """The transformers config of a shape (or any config.json-like dict)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(raw.get("model_type", "llama"), **{k: v for k, v in raw.items() if k not in _HF_SKIP})


def checkpoint_names(raw: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the architecture's checkpoint, as transformers names them
    (built on the meta device: no memory, no init)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(raw))
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


class RandomTensor:
    """Checkpoint tensor `name` of a shape's random checkpoint, made when loaded (the lazy-tensor
    protocol of models/loader.py): matrices ~ N(0, std), norm weights 1, biases 0."""

    __slots__ = ("name", "shape", "dtype", "device", "seed", "std")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any, device: Any, seed: int = 0,
                 std: float = 0.02) -> None:
        self.name, self.shape, self.dtype, self.device, self.seed, self.std = name, shape, dtype, device, seed, std

    def load(self) -> Any:
        import torch

        if len(self.shape) >= 2:
            g = torch.Generator(device=self.device).manual_seed((self.seed << 32) + zlib.crc32(self.name.encode()))
            return torch.empty(self.shape, dtype=self.dtype, device=self.device).normal_(0.0, self.std, generator=g)
        fill = 0.0 if self.name.endswith("bias") else 1.0
        return torch.full(self.shape, fill, dtype=self.dtype, device=self.device)

    def load_slice(self, dim: int, start: int, end: int) -> Any:
        return self.load().narrow(dim, start, end - start)  # the whole tensor decides every slice's values

    def __repr__(self) -> str:
        return f"RandomTensor({self.name!r}, shape={self.shape}, seed={self.seed})"


def random_checkpoint(raw: dict[str, Any], dtype: Any, device: Any, seed: int = 0) -> Iterator[tuple[str, RandomTensor]]:
    for name, shape in checkpoint_names(raw):
        yield name, RandomTensor(name, shape, dtype, device, seed)


def fill_random_(model: Any, seed: int = 0) -> Any:
    """Gives a transformers model the weights distrt loads for the same shape (same device and dtype)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(RandomTensor(name, tuple(p.shape), p.dtype, p.device, seed).load())
    return model
