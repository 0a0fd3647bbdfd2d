"""Tiny random Hugging Face checkpoints (written by transformers itself) for parity tests."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # GQA 4:2, head_dim 16
    "llama-gqa": dict(arch="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=211),
    # MHA, odd head count, untied head
    "llama-mha": dict(arch="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=3, vocab_size=199),
    # head_dim not hidden/heads (odd head_dim 24), llama3 rope scaling, tied embeddings
    "llama3-odd": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=24, vocab_size=257,
                       tie_word_embeddings=True, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(arch="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=203, tie_word_embeddings=False),
    "mistral": dict(arch="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=181, sliding_window=None),
}


def _config(name: str, **overrides: Any):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    spec = dict(ARCH_DEFAULTS[name])
    spec.update(overrides)
    arch = spec.pop("arch")
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    spec.setdefault("max_position_embeddings", 512)
    spec.setdefault("rms_norm_eps", 1e-5)
    spec.setdefault("bos_token_id", 1)
    spec.setdefault("eos_token_id", 2)
    return cls(**spec)


def write_word_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer whose vocabulary is exactly vocab_size tokens: <unk>, w1 .. w{V-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="w1", eos_token="w2")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def make_tiny_checkpoint(root: str, name: str, seed: int = 0, max_shard_size: str | None = None,
                         std: float = 0.08, head_std: float | None = None, **overrides: Any) -> str:
    from transformers import AutoModelForCausalLM

    cfg = _config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so logits are far from flat and ties are rare
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, head_std if head_std is not None and n.startswith("lm_head") else std)
    path = os.path.join(root, name)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    write_word_tokenizer(path, cfg.vocab_size)
    with open(os.path.join(path, "config.json")) as f:
        json.load(f)  # written and readable
    return path


def load_hf_model(path: str):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, one full forward per token (the independent reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def assert_same_outputs(outs: list, ref: list, abs_tol: float = 1e-5) -> None:
    """Same tokens, and the same top log-probabilities within abs_tol, request by request."""
    import math

    for o, r in zip(outs, ref, strict=True):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for lp, rlp in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert lp.keys() == rlp.keys()
            for k in lp:
                assert math.isclose(lp[k].logprob, rlp[k].logprob, abs_tol=abs_tol)
