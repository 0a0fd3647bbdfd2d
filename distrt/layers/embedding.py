"""Vocab-parallel embedding and LM head. The vocabulary is padded up to a multiple of tp_size;
rank r holds rows [r*V/tp, (r+1)*V/tp) of the padded table (padding rows are zero)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from distrt.layers.linear import narrow


def pad_vocab(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, *, tp_rank: int, tp_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.per_rank = pad_vocab(vocab_size, tp_size) // tp_size
        self.start = tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        shape = getattr(loaded, "shape")
        if tuple(shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"embedding: checkpoint shape {tuple(shape)} does not match ({self.vocab_size}, {param.shape[1]})")
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(narrow(loaded, 0, self.start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of other ranks come out zero; the caller all-reduces when tp > 1."""
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        return out.masked_fill(mask.unsqueeze(-1), 0)


class ParallelLMHead(VocabParallelEmbedding):
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocab slice of the logits, [tokens, V/tp]; the caller all-gathers."""
        return F.linear(hidden, self.weight)
