"""In-flight batching scheduler, in token counts.

Each step gets a token budget (max_num_batched_tokens). Running requests are served first, in
admission order: a decode needs 1 token, an unfinished prefill its next chunk. When the KV pool
cannot hold a running request's next tokens, the newest running request is preempted (its blocks
freed, to be recomputed later) until it fits. Waiting requests are admitted with what budget and
blocks remain (their prompts chunked to fit), unless this step preempted anything; with
`admission="lookahead"` only when the projected peak of the pool fits as well (admission.py).

Pipeline parallelism (`max_in_flight` = pp > 1): up to that many plans (micro-batches) are in
flight at once. A request in an in-flight plan is skipped until `update` returns its result, is
never chosen as a preemption victim, and each micro-batch takes at most ceil(active / pp)
requests, so the requests spread over pp disjoint groups that take turns:

    pp=2, 6 decoding requests:   plan k   {a, b, c}  -> stage 0 -> stage 1 -> token back
                                 plan k+1 {d, e, f}  ->            stage 0 -> stage 1 -> ...
                                 plan k+2 {a, b, c}  (scheduled once plan k's tokens are back)

If a request needs blocks that only in-flight requests could give back, it waits for them (no
preemption). Aborting an in-flight request frees its blocks at once (messages.py says why that
is safe) and its late result is discarded. With max_in_flight == 1 nothing is ever in flight while
scheduling and all of this reduces to the plain loop.

Async scheduling (`ahead`, pp == 1, two plans in flight): plan k+1 is built while plan k runs, over
the same requests. A request whose in-flight plan samples it is scheduled for one more token,
`deferred` (its input is that sample, still on the device: messages.py), unless the pending
sample may already end it by length or it needs penalties (which read the token history); a
request in the middle of a chunked prefill gets its next chunk. A request is in at most two plans:

    plan k   {a: 1, b: 1, c: 40 of 100 prompt tokens}     in flight
    plan k+1 {a: 1 deferred, b: 1 deferred, c: next 60}   built before k's tokens are back

If plan k's token ends a request (EOS, stop string), its token from plan k+1 is discarded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distrt.config import SchedulerConfig
from distrt.engine.admission import LookaheadAdmission
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
    def __init__(self, config: SchedulerConfig, allocator: KVAllocator, max_in_flight: int = 1,
                 ahead: bool = False) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.config = config
        self.allocator = allocator
        self.max_in_flight = max_in_flight
        self.ahead = ahead and max_in_flight > 1
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[RequestId, Request] = {}
        self.stats = SchedulerStats()
        self._to_drop = _Pending()
        self._step_id = 0
        self._sent: dict[RequestId, int] = {}  # requests whose state the workers hold -> tokens they hold
        # request -> the in-flight plans it is in, oldest first: (step id, tokens, samples it), until update()
        self._in_flight: dict[RequestId, list[tuple[int, int, bool]]] = {}
        self._lookahead = (LookaheadAdmission(allocator.num_blocks, allocator.block_size, config.max_num_batched_tokens)
                           if config.admission == "lookahead" else None)

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

    @property
    def num_in_flight(self) -> int:
        """Requests in plans whose results are not back yet."""
        return len(self._in_flight)

    def is_in_flight(self, rid: RequestId) -> bool:
        return rid in self._in_flight

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        cap = self._micro_batch_cap()
        num_sched: dict[RequestId, int] = {}
        new_reqs: list[NewRequest] = []
        cached: list[CachedRequest] = []
        preempted = False
        if self._lookahead is not None:
            self._lookahead.tick(self.waiting[0] if self.waiting else None)

        i = 0
        while i < len(self.running) and budget > 0 and len(num_sched) < cap:
            req = self.running[i]
            start, n, deferred = self._next_tokens(req, budget)
            if n == 0:
                i += 1
                continue
            new_blocks = self.allocator.allocate(req.request_id, start + n)
            while new_blocks is None:
                j = self._victim_index(i)
                if j == i and self._in_flight:
                    preempted = True  # in-flight requests hold the blocks; wait for them to come back
                    break
                victim = self.running.pop(j)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                new_blocks = self.allocator.allocate(req.request_id, start + n)
            if new_blocks is None:
                break
            if req.request_id in self._sent:
                cached.append(CachedRequest(req.request_id, start, tuple(new_blocks), self._unsent_tokens(req),
                                            deferred))
            else:
                new_reqs.append(self._new_request(req))
            num_sched[req.request_id] = n
            budget -= n
            i += 1

        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted
               and len(num_sched) < cap):
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            n = min(remaining, budget)
            if self._lookahead is not None and not self._lookahead.allows(self.running, req):
                break
            if self.allocator.allocate(req.request_id, req.num_computed_tokens + n) is None:
                break
            if self._lookahead is not None:
                self._lookahead.took()
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            new_reqs.append(self._new_request(req))
            num_sched[req.request_id] = n
            budget -= n

        self._step_id += 1
        requests, in_flight = self.requests, self._in_flight
        for rid, n in num_sched.items():
            req = requests[rid]
            flights = in_flight.get(rid)
            if flights is None:
                flights = in_flight[rid] = []
            end = req.num_computed_tokens + n
            for f in flights:  # at most one earlier plan (async scheduling)
                end += f[1]
            flights.append((self._step_id, n, end >= len(req.prompt_token_ids) + len(req.output_token_ids)))
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
            flights = self._in_flight.get(rid)
            if not flights or flights[0][0] != plan.step_id:
                continue  # finished (aborted) while in flight, maybe re-added since: the result is stale
            flights.pop(0)
            if not flights:
                del self._in_flight[rid]
            req = self.requests[rid]
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
    def abandon_in_flight(self) -> None:
        """The executor lost the in-flight plans (the engine is dead): nothing will come back."""
        self._in_flight.clear()

    def _next_tokens(self, req: Request, budget: int) -> tuple[int, int, bool]:
        """(first position, tokens, deferred) of a running request's next step; 0 tokens: skip it."""
        flights = self._in_flight.get(req.request_id)
        num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
        if not flights:
            return req.num_computed_tokens, min(num_tokens - req.num_computed_tokens, budget), False
        if not self.ahead or len(flights) > 1:
            return 0, 0, False
        start = req.num_computed_tokens + flights[0][1]
        if not flights[0][2]:  # the in-flight plan is a prefill chunk: the next chunk's tokens are known
            return start, min(num_tokens - start, budget), False
        p = req.params
        if (num_tokens + 1 >= req.max_model_len
                or (p.max_tokens is not None and len(req.output_token_ids) + 1 >= p.max_tokens)
                or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0):
            return 0, 0, False  # the pending token may end it by length; penalties read the history
        return start, 1, True

    def _micro_batch_cap(self) -> int:
        """Requests per plan: all of them, or with pp plans in flight an even share of the active ones."""
        if self.max_in_flight == 1 or self.ahead:
            return self.config.max_num_seqs
        active = min(len(self.running) + len(self.waiting), self.config.max_num_seqs)
        return max(1, -(-active // self.max_in_flight))

    def _victim_index(self, i: int) -> int:
        """The newest running request at index >= i that is not in flight (at worst running[i])."""
        for j in range(len(self.running) - 1, i, -1):
            if self.running[j].request_id not in self._in_flight:
                return j
        return i

    def _unsent_tokens(self, req: Request) -> tuple[int, ...]:
        """Tokens the workers lack (see messages.py): what came back since the request was last sent."""
        held = self._sent[req.request_id]
        out = req.output_token_ids
        total = len(req.prompt_token_ids) + len(out)
        self._sent[req.request_id] = total
        return tuple(out[held - len(req.prompt_token_ids):]) if held < total else ()

    def _new_request(self, req: Request) -> NewRequest:
        self._sent[req.request_id] = req.num_tokens
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
        self._in_flight.pop(rid, None)
        if self._sent.pop(rid, None) is not None:
            self._to_drop.ids.append(rid)
