"""Named architecture shapes with random weights (`model="shape:llama-3.1-8b"`), so benchmarks and
GPU tests need no download: the same config a real checkpoint has, weights drawn at load time."""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, ctx: int,
           rope: dict[str, Any] | None, theta: float, tie: bool = False) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hidden // heads, "vocab_size": vocab,
            "max_position_embeddings": ctx, "rms_norm_eps": 1e-5, "rope_theta": theta, "rope_scaling": rope,
            "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, 131072, _LLAMA3_ROPE, 500000.0),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128256, 131072, _LLAMA3_ROPE, 500000.0),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, 131072,
                           {**_LLAMA3_ROPE, "factor": 32.0}, 500000.0, tie=True),
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096, None, 10000.0),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, 8192, None, 100000.0, tie=True),
    "llama-tiny": _llama(64, 128, 2, 4, 2, 512, 2048, None, 10000.0),  # smoke tests
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
