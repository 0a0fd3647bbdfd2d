"""Teacher-forced agreement of generated tokens with transformers on the same weights (GPU tests)."""

from __future__ import annotations

from typing import Any

import torch

LLAMA3_SHAPED = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=4, head_dim=128, vocab_size=32000, rope_theta=500000.0,
                     max_position_embeddings=4096,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})


def make_llama3_shaped(root: str) -> str:
    from tiny_models import ARCH_DEFAULTS, make_tiny_checkpoint

    ARCH_DEFAULTS.setdefault("llama3-shaped", {"arch": "llama", **LLAMA3_SHAPED})
    # Llama's own init scale (0.02) keeps the residual stream well conditioned, as in a trained model;
    # a larger LM head spreads the logits so top-1 is rarely a near-tie.
    return make_tiny_checkpoint(root, "llama3-shaped", std=0.02, head_std=0.5, tie_word_embeddings=False)


def prompts(vocab: int, n: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [17, 64, 200, 5, 333, 128, 90, 40][:n]
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


def teacher_forced(hf: Any, prompt_ids: list[list[int]], generated: list[list[int]],
                   ours_logprobs: list[list[float]] | None = None) -> dict[str, float]:
    """HF's top-1 at every generated position given our tokens as context; agreement and logprob error."""
    agree = total = 0
    errs: list[float] = []
    dev = next(hf.parameters()).device
    for i, (p, gen) in enumerate(zip(prompt_ids, generated)):
        ids = torch.tensor([p + gen], device=dev)
        with torch.no_grad():
            logits = hf(ids).logits[0, len(p) - 1: len(p) + len(gen) - 1].float()
        lp = torch.log_softmax(logits, dim=-1)
        top = lp.argmax(-1).tolist()
        agree += sum(int(a == b) for a, b in zip(top, gen))
        total += len(gen)
        if ours_logprobs is not None:
            ref = lp.gather(1, torch.tensor(gen, device=dev)[:, None]).squeeze(1).tolist()
            errs += [abs(a - b) for a, b in zip(ours_logprobs[i], ref)]
    out = {"top1_agreement": agree / total, "positions": float(total)}
    if errs:
        out["logprob_err_mean"] = sum(errs) / len(errs)
        out["logprob_err_max"] = max(errs)
    return out
