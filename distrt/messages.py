"""What crosses between the coordinator and the workers, and nothing else.

A StepPlan is a diff against what every worker already holds:

    step k:   new_requests=[A(prompt, blocks [3, 7])]   scheduled={A: 12}
    step k+1: cached=[A(+tokens [t12], +blocks [])]     scheduled={A: 1}       (decode)
    step k+2: cached=[A(+tokens [t13], +blocks [9])]    scheduled={A: 1}       (crossed a block)
    step k+3: finished_ids=[A]                                                 (worker drops A)

Token invariant: a worker's token ids come only from the coordinator. A `NewRequest` carries every
token known so far; each later `CachedRequest` carries `new_token_ids`, the tokens the coordinator
got back since it last sent that request (the one sampled by its previous step). Workers never
append what they sampled themselves: the output rank's sample is a proposal that becomes part of
the request when the coordinator sends it back. So every rank, every pipeline stage (which never
samples unless it is the last) and every TP rank, holds the same token ids, by construction. This
holds for every layout, pp=1 included (one rule, one code path; the cost is an int per decode).

Pipelining (pp > 1): up to pp plans are in flight at once, each a disjoint group of requests; a
request is in at most one in-flight plan (the scheduler skips it until its result is back), so its
previous token is always known when it is scheduled again. Every worker (each stage, each TP rank)
executes plans strictly in submission order, and each touches only its own layers' slice of a KV
block. That is why the coordinator may free the blocks of a request aborted while in flight at
once: the in-flight plan's writes to them happen, on every worker, before those of any later plan
that gives them to a new owner; the late result of the aborted request is discarded.

Async scheduling (pp == 1, `SchedulerConfig.async_scheduling`): two plans are in flight, and plan
k+1 is built before plan k's tokens are back. A request that plan k samples may be scheduled in
plan k+1 for one more token with `deferred=True`: the worker appends a placeholder for the token
plan k samples, and takes the input id of that position from plan k's sampled ids on the device
(the output rank broadcasts them over the TP group). The placeholder is overwritten when the
coordinator sends the real token in a later plan's `new_token_ids` (which always fill placeholders
first). So the invariant still holds for every token a worker reads on the host; only the device
ever sees a sample before the coordinator has it. If plan k's token ends the request (EOS, stop),
plan k+1's extra token is discarded like an aborted request's.

A preempted request is dropped through `finished_ids` and later re-sent whole as a `NewRequest`
carrying its prompt and every token generated so far (recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, NewType

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


class CachedRequest(NamedTuple):  # a NamedTuple: hundreds per plan are built and unpickled every step
    req_id: RequestId
    num_computed_tokens: int
    new_block_ids: tuple[BlockId, ...]
    new_token_ids: tuple[int, ...] = ()  # tokens sampled since the request was last sent (see above)
    deferred: bool = False  # the input token is the previous step's sample, still on the device (above)


@dataclass(frozen=True, slots=True)
class PlacementUpdate:
    """A MoE layer's new expert table (physical slot -> logical expert), applied before the step."""

    layer: int
    epoch: int
    slot_to_expert: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepPlan:
    step_id: int  # unique and increasing; results come back under it
    new_requests: tuple[NewRequest, ...] = ()
    cached_requests: tuple[CachedRequest, ...] = ()
    # Batch order: req_id -> tokens to compute this step (new and cached requests both appear).
    num_scheduled_tokens: dict[RequestId, int] = field(default_factory=dict)
    finished_ids: tuple[RequestId, ...] = ()
    expert_placements: tuple[PlacementUpdate, ...] = ()
    collect_expert_load: bool = False  # report tokens per expert since the last report

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles the cached requests as columns: a plan crosses one to three pickle hops per step
        (socket, MPI bcast, Ray channel), and 512 slotted objects cost ~1 ms each way where five
        tuples cost ~0.1 ms."""
        c = self.cached_requests
        cols = (tuple(r.req_id for r in c), tuple(r.num_computed_tokens for r in c),
                tuple(r.new_block_ids for r in c), tuple(r.new_token_ids for r in c), bytes(r.deferred for r in c))
        return _plan_from_columns, (self.step_id, self.new_requests, cols, self.num_scheduled_tokens,
                                    self.finished_ids, self.expert_placements, self.collect_expert_load)


def _plan_from_columns(step_id: int, new_requests: tuple[NewRequest, ...], cols: tuple[Any, ...],
                       num_scheduled_tokens: dict[RequestId, int], finished_ids: tuple[RequestId, ...],
                       expert_placements: tuple[PlacementUpdate, ...], collect_expert_load: bool) -> StepPlan:
    ids, computed, blocks, tokens, deferred = cols
    cached = tuple(map(CachedRequest._make, zip(ids, computed, blocks, tokens, map(bool, deferred))))
    return StepPlan(step_id, new_requests, cached, num_scheduled_tokens, finished_ids, expert_placements,
                    collect_expert_load)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    sampled_logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class StepResult:
    """From the output rank (TP rank 0 of the last stage); other ranks return an empty one."""

    step_id: int
    sampled: dict[RequestId, int] = field(default_factory=dict)
    logprobs: dict[RequestId, TokenLogprobs] = field(default_factory=dict)
    exec_time_s: float = 0.0  # the worker's time from taking the plan to returning its tokens
    # CUDA: how long the GPU sat idle between the end of the previous step's work and this one's
    # start (CUDA events on the output rank; a later pipeline stage counts the wait for the previous
    # stage's activations as idle: its bubble); None for the first step or off CUDA
    gpu_idle_s: float | None = None
    expert_load: dict[int, tuple[int, ...]] | None = None  # layer -> tokens per logical expert
