"""In-flight batching scheduler, in token counts.

Each step gets a token budget (max_num_batched_tokens). Running requests are served first, in
admission order: a decode needs 1 token, an unfinished prefill its next chunk. When the KV pool
cannot hold a running request's next tokens, the newest running request is preempted (its blocks
freed, to be recomputed later) until it fits. Waiting requests are admitted with what budget and
blocks remain (their prompts chunked to fit), unless this step preempted anything.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distrt.config import SchedulerConfig
from distrt.engine.kv_allocator import KVAllocator
from distrt.engine.request import Request, RequestStatus
from distrt.messages import (
    CachedRequest,
    NewRequest,
    RequestId,
    SamplingSpec,
    StepPlan,
    StepResult,
)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass
class _Pending:
    """Ids whose worker state must be dropped at the next step."""

    ids: list[RequestId] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: KVAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[RequestId, Request] = {}
        self.stats = SchedulerStats()
        self._to_drop = _Pending()
        self._step_id = 0
        self._sent: set[RequestId] = set()  # requests whose state the workers hold

    # -- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, req_ids: list[RequestId], reason: str) -> list[Request]:
        """Finish (abort, stop string, error) requests wherever they are; frees their blocks now."""
        done = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.finish_reason = req.finish_reason or reason
            self._release(req)
            done.append(req)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        num_sched: dict[RequestId, int] = {}
        new_reqs: list[NewRequest] = []
        cached: list[CachedRequest] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            new_blocks = self.allocator.allocate(req.request_id, req.num_computed_tokens + n)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                new_blocks = self.allocator.allocate(req.request_id, req.num_computed_tokens + n)
            if new_blocks is None:
                break
            if req.request_id in self._sent:
                cached.append(CachedRequest(req.request_id, req.num_computed_tokens, tuple(new_blocks)))
            else:
                new_reqs.append(self._new_request(req))
            num_sched[req.request_id] = n
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            n = min(remaining, budget)
            if self.allocator.allocate(req.request_id, req.num_computed_tokens + n) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            new_reqs.append(self._new_request(req))
            num_sched[req.request_id] = n
            budget -= n

        self._step_id += 1
        drop, self._to_drop = tuple(self._to_drop.ids), _Pending()
        return StepPlan(
            step_id=self._step_id,
            new_requests=tuple(new_reqs),
            cached_requests=tuple(cached),
            num_scheduled_tokens=num_sched,
            finished_ids=drop,
        )

    def update(self, plan: StepPlan, result: StepResult) -> tuple[list[Request], list[Request]]:
        """Apply a step's result: returns (requests that got a token, requests that finished)."""
        self.stats.num_steps += 1
        got_token: list[Request] = []
        finished: list[Request] = []
        for rid, n in plan.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished or preempted meanwhile; the worker's sample is discarded
            req.num_computed_tokens += n
            self.stats.prompt_tokens += max(0, min(n, req.num_prompt_tokens - (req.num_computed_tokens - n)))
            token = result.sampled.get(rid)
            if token is None:
                continue
            req.output_token_ids.append(token)
            if rid in result.logprobs:
                req.output_logprobs.append(result.logprobs[rid])
            self.stats.generation_tokens += 1
            got_token.append(req)
            if req.check_token_stop(token):
                self.running.remove(req)
                self._release(req)
                finished.append(req)
        return got_token, finished

    # -- internals ----------------------------------------------------------------------------
    def _new_request(self, req: Request) -> NewRequest:
        self._sent.add(req.request_id)
        p = req.params
        suppress = () if p.min_tokens == 0 else tuple(set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(req.eos_token_ids)))
        spec = SamplingSpec(
            seed=req.seed,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logprobs=p.logprobs,
            min_tokens=p.min_tokens,
            suppress_ids=suppress,
        )
        return NewRequest(
            req_id=req.request_id,
            token_ids=tuple(req.all_token_ids),
            num_prompt_tokens=req.num_prompt_tokens,
            block_ids=tuple(self.allocator.block_table(req.request_id)),
            num_computed_tokens=req.num_computed_tokens,
            sampling=spec,
        )

    def _preempt(self, req: Request) -> None:
        self.allocator.free(req.request_id)
        self._forget(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED
        self.allocator.free(req.request_id)
        self._forget(req.request_id)
        del self.requests[req.request_id]

    def _forget(self, rid: RequestId) -> None:
        if rid in self._sent:
            self._sent.discard(rid)
            self._to_drop.ids.append(rid)
