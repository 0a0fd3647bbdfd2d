"""What a worker keeps per request between steps (tokens arrive in the plans: see messages.py)."""

from __future__ import annotations

from dataclasses import dataclass

from distrt.messages import NewRequest, RequestId, SamplingSpec


@dataclass(slots=True)
class RequestState:
    req_id: RequestId
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingSpec
    num_pending: int = 0  # trailing token_ids that are placeholders for samples still on the device
    row: int = -1  # this request's row in the runner's BlockTableRows (-1: none yet)
    table_len: int = 0  # how many of block_ids that row holds

    def add_tokens(self, new: tuple[int, ...] | list[int]) -> None:
        """Tokens from the coordinator fill placeholders first, then extend the sequence."""
        for t in new:
            if self.num_pending:
                self.token_ids[len(self.token_ids) - self.num_pending] = t
                self.num_pending -= 1
            else:
                self.token_ids.append(t)

    @staticmethod
    def from_new(r: NewRequest) -> "RequestState":
        return RequestState(r.req_id, list(r.token_ids), r.num_prompt_tokens, list(r.block_ids),
                            r.num_computed_tokens, r.sampling)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
