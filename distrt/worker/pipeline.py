"""Activations between neighbouring pipeline stages, over the PP communicator (group rank = stage).

    stage 0                      stage 1                      stage pp-1 (last)
    embed, layers [0, a)  ──►    layers [a, b)         ──►    layers [.., L), norm, LM head, sample
             send [2, T, hidden] (hidden; residual)   recv the same shape

T is the plan's token count, which every rank derives from the plan, so no shape travels: one
message per hop per step. Every rank of a stage sends to the rank with its TP rank in the next
stage (the PP groups are the columns of the rank grid in parallel/state.py); TP ranks of a stage
hold the same (all-reduced) activations.

Stages run plans in the order they were submitted, so a stage's sends and its successor's receives
pair up in order; a blocking send waits at most for the successor to finish its previous plan.
"""

from __future__ import annotations

from typing import Any

import torch


class StageLink:
    def __init__(self, comm: Any, hidden_size: int, dtype: torch.dtype) -> None:
        self.comm = comm
        self.stage = comm.rank
        self.num_stages = comm.size
        self.hidden_size = hidden_size
        self.dtype = dtype

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def recv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual), each [T, hidden], from the previous stage."""
        buf = self.recv_stacked(num_tokens)
        return buf[0], buf[1]

    def recv_stacked(self, num_tokens: int) -> torch.Tensor:
        """[2, T, hidden] (hidden; residual) from the previous stage."""
        assert not self.is_first, "the first stage embeds its input ids"
        return self.comm.recv((2, num_tokens, self.hidden_size), self.dtype, self.stage - 1)

    def send_stacked(self, buf: torch.Tensor) -> None:
        """Hands [2, T, hidden] (hidden; residual) to the next stage."""
        assert not self.is_last, "the last stage samples; it has no one to send to"
        assert buf.dim() == 3 and buf.shape[0] == 2 and buf.shape[-1] == self.hidden_size, buf.shape
        self.comm.send(buf.to(self.dtype), self.stage + 1)

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Hands (hidden, residual), each [T, hidden], to the next stage."""
        assert not self.is_last, "the last stage samples; it has no one to send to"
        assert hidden.shape == residual.shape and hidden.shape[-1] == self.hidden_size, (hidden.shape, residual.shape)
        self.comm.send(torch.stack((hidden, residual)).to(self.dtype), self.stage + 1)  # [2, T, hidden]
