"""What crosses between the coordinator and the workers, and nothing else.

A StepPlan is a diff against what every worker already holds:

    step k:   new_requests=[A(prompt, blocks [3, 7])]   scheduled={A: 12}
    step k+1: cached=[A(+blocks [])]                    scheduled={A: 1}       (decode)
    step k+2: cached=[A(+blocks [9])]                   scheduled={A: 1}       (crossed a block)
    step k+3: finished_ids=[A]                                                 (worker drops A)

A request's tokens are sent once (in `NewRequest`); afterwards each worker appends the token it
sampled itself. A preempted request is dropped through `finished_ids` and later re-sent whole as a
`NewRequest` carrying its prompt and every token generated so far (recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

RequestId = NewType("RequestId", str)
BlockId = NewType("BlockId", int)


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """The part of SamplingParams a worker needs; seed is always resolved by the coordinator."""

    seed: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    min_tokens: int = 0
    suppress_ids: tuple[int, ...] = ()  # EOS/stop ids banned until min_tokens are out

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True, slots=True)
class NewRequest:
    req_id: RequestId
    token_ids: tuple[int, ...]  # prompt + tokens already generated (non-empty after a preemption)
    num_prompt_tokens: int
    block_ids: tuple[BlockId, ...]
    num_computed_tokens: int
    sampling: SamplingSpec


@dataclass(frozen=True, slots=True)
class CachedRequest:
    req_id: RequestId
    num_computed_tokens: int
    new_block_ids: tuple[BlockId, ...]


@dataclass(frozen=True, slots=True)
class StepPlan:
    step_id: int
    new_requests: tuple[NewRequest, ...] = ()
    cached_requests: tuple[CachedRequest, ...] = ()
    # Batch order: req_id -> tokens to compute this step (new and cached requests both appear).
    num_scheduled_tokens: dict[RequestId, int] = field(default_factory=dict)
    finished_ids: tuple[RequestId, ...] = ()

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    sampled_logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class StepResult:
    step_id: int
    sampled: dict[RequestId, int] = field(default_factory=dict)
    logprobs: dict[RequestId, TokenLogprobs] = field(default_factory=dict)
    exec_time_s: float = 0.0  # the worker's time inside execute (step overhead = wall - this)
