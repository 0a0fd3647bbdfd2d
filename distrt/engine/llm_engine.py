"""The coordinator: scheduler + global KV allocator + tokenizer around an executor.

    step():  plan = scheduler.schedule();  result = executor.execute(plan);  scheduler.update(plan, result)

With pipeline parallelism the executor takes up to pp plans at once (`max_concurrent_steps`), so
`step()` first tops the pipeline up (submits plans while fewer than pp are in flight and the
scheduler has something), then waits for the oldest and applies it:

    in flight:  [k, k+1]  --wait k, update-->  [k+1]  --schedule, submit k+2-->  [k+1, k+2]  ...

With pp == 1 and async scheduling the same loop keeps two plans in flight: plan k+1 (built
before plan k's tokens are back, scheduler.py) runs on the GPU while the host collects plan k,
updates the requests and builds plan k+2. Without async scheduling it is one submit and one wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distrt.config import EngineConfig
from distrt.engine.expert_balancer import ExpertBalancer
from distrt.engine.kv_allocator import KVAllocator
from distrt.engine.outputs import CompletionOutput, Logprob, RequestOutput
from distrt.engine.request import Request
from distrt.engine.sampling_params import SamplingParams
from distrt.engine.scheduler import Scheduler
from distrt.executor.base import EngineDeadError, Executor, StepHandle
from distrt.messages import RequestId, StepPlan

logger = logging.getLogger(__name__)

PromptInput = str | dict[str, Any] | list[int]


@dataclass
class _Group:
    """One user request; n > 1 fans out into n child Requests."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    params: SamplingParams
    finished_children: set[int] = field(default_factory=set)
    stream: bool = True  # False: only the final output is wanted (no per-step text, no per-step outputs)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any, executor: Executor) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.executor = executor
        num_blocks = executor.determine_num_blocks()
        bs = config.cache.block_size
        if num_blocks * bs < config.scheduler.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * bs} tokens ({num_blocks} blocks of {bs}), fewer than "
                f"max_model_len={config.scheduler.max_model_len}; raise kv_cache_memory or lower max_model_len"
            )
        executor.init_kv_cache(num_blocks)
        self.allocator = KVAllocator(num_blocks, bs)
        self.max_in_flight = max(1, executor.max_concurrent_steps)
        self.scheduler = Scheduler(config.scheduler, self.allocator, self.max_in_flight,
                                   ahead=config.parallel.pipeline_parallel_size == 1)
        self.experts = ExpertBalancer(config)
        self._in_flight: deque[tuple[StepPlan, StepHandle]] = deque()
        self.max_in_flight_seen = 0  # the most plans ever in flight at once (pipeline occupancy)
        self._rng = random.Random(config.seed)
        self._groups: dict[str, _Group] = {}
        self._child_to_group: dict[RequestId, _Group] = {}
        self._dead: BaseException | None = None
        self._counter = 0
        logger.info("KV cache: %d blocks x %d tokens", num_blocks, bs)

    # -- requests ---------------------------------------------------------------------------
    def next_request_id(self) -> str:
        self._counter += 1
        return str(self._counter - 1)

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one token of text")
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}; give str, list[int] or dict")

    def validate_prompt_ids(self, ids: list[int]) -> None:
        vocab = self.config.model.vocab_size
        max_len = self.config.scheduler.max_model_len
        if not ids:
            raise ValueError("prompt is empty (0 tokens); give at least one token")
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is out of the vocabulary range [0, {vocab})")
        if len(ids) >= max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; it must be shorter than max_model_len={max_len} "
                             "to leave room for at least one generated token")

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
                    stream: bool = True) -> None:
        """stream=False (offline generate): text is decoded once at the end unless stop strings need it
        per token, and step() reports the request only when it finishes."""
        self._check_alive()
        params = params or SamplingParams()
        params.validate()
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_prompt_ids(ids)
        children = []
        for i in range(params.n):
            seed = (params.seed + i) & 0x7FFFFFFF if params.seed is not None else self._rng.getrandbits(31)
            rid = RequestId(request_id if params.n == 1 else f"{request_id}#{i}")
            children.append(Request(request_id=rid, prompt_token_ids=list(ids), params=params, seed=seed,
                                    eos_token_ids=self.config.model.eos_token_ids,
                                    max_model_len=self.config.scheduler.max_model_len, prompt=text,
                                    parent_id=request_id, index=i))
        group = _Group(request_id, text, ids, children, params, stream=stream)
        for c in children:
            c.detok = self._make_detok(ids, params)
            self.scheduler.add_request(c)
            self._child_to_group[c.request_id] = group
        self._groups[request_id] = group

    def abort_request(self, request_ids: str | list[str]) -> None:
        for gid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self._groups.pop(gid, None)
            if group is None:
                continue
            self.scheduler.finish_requests([c.request_id for c in group.children], "abort")
            for c in group.children:
                self._child_to_group.pop(c.request_id, None)

    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a plan (maybe of aborted requests) is in flight."""
        return bool(self._groups) or bool(self._in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._check_alive()
        try:
            while len(self._in_flight) < self.max_in_flight:
                plan = self.scheduler.schedule()
                if plan.is_empty and not plan.finished_ids:
                    break
                plan = self.experts.decorate(plan)
                self._in_flight.append((plan, self.executor.execute_async(plan)))
                self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._in_flight))
            if not self._in_flight:
                return []
            plan, handle = self._in_flight[0]
            result = self.executor.wait(handle)
            self._in_flight.popleft()
        except BaseException as e:  # a dead worker fails everything in flight, and later calls
            self._fail_all(e)
            raise
        self.experts.observe(result)
        got_token, finished = self.scheduler.update(plan, result)
        touched: dict[str, _Group] = {}
        now = time.monotonic()
        for req in got_token:
            if req.first_token_time is None:
                req.first_token_time = now
            g = self._child_to_group.get(req.request_id)
            if g is None:
                continue
            if g.stream or req.params.stop_strings:
                self._detokenize(req)
            if g.stream or req.is_finished:
                touched[g.request_id] = g
        for req in finished:
            g = self._child_to_group.get(req.request_id)
            if g is not None:
                touched[g.request_id] = g
        outs = [self._emit(g) for g in touched.values() if g.stream or all(c.is_finished for c in g.children)]
        if self._in_flight and not self._groups:
            self._drain()  # what is left in flight holds no live request: collect it so the engine is idle
        return outs

    def _drain(self) -> None:
        try:
            while self._in_flight:
                plan, handle = self._in_flight[0]
                result = self.executor.wait(handle)
                self._in_flight.popleft()
                self.scheduler.update(plan, result)
        except BaseException as e:
            self._fail_all(e)
            raise

    def _detokenize(self, req: Request) -> None:
        prev_len = len(req.output_text)
        delta = req.detok.add_tokens([req.output_token_ids[-1]])
        req.output_text += delta
        stops = req.params.stop_strings
        if not stops or req.is_finished or not delta:
            return
        longest = max(len(s) for s in stops)
        window_start = max(0, prev_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            j = req.output_text.find(s, window_start)
            if j != -1 and (best is None or j < best[0]):
                best = (j, s)
        if best is not None:
            j, s = best
            req.output_text = req.output_text[: j + (len(s) if req.params.include_stop_str_in_output else 0)]
            req.stop_reason = s
            req.finish_reason = "stop"
            self.scheduler.finish_requests([req.request_id], "stop")

    def _emit(self, g: _Group) -> RequestOutput:
        outs = []
        for c in g.children:
            if c.is_finished and not isinstance(c.stop_reason, str):
                text = self.tokenizer.decode(c.output_token_ids, skip_special_tokens=c.params.skip_special_tokens)
                c.output_text = text
            outs.append(CompletionOutput(
                index=c.index, text=c.output_text, token_ids=list(c.output_token_ids),
                cumulative_logprob=(sum(lp.sampled_logprob for lp in c.output_logprobs)
                                    if c.params.logprobs is not None else None),
                logprobs=self._logprobs(c) if c.params.logprobs is not None else None,
                finish_reason=c.finish_reason if c.is_finished else None,
                stop_reason=c.stop_reason,
            ))
        finished = all(c.is_finished for c in g.children)
        if finished:
            self._groups.pop(g.request_id, None)
            for c in g.children:
                self._child_to_group.pop(c.request_id, None)
        first = min((c.first_token_time for c in g.children if c.first_token_time), default=None)
        metrics = {"arrival_time": g.children[0].arrival_time}
        if first is not None:
            metrics["first_token_time"] = first
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, outs, finished, metrics)

    def _logprobs(self, c: Request) -> list[dict[int, Logprob]]:
        out = []
        for tok, lp in zip(c.output_token_ids, c.output_logprobs):
            d = {tid: Logprob(v, rank=r + 1) for r, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
            if tok not in d:
                d[tok] = Logprob(lp.sampled_logprob)
            for tid, entry in d.items():
                entry.decoded_token = self.tokenizer.decode([tid])
            out.append(d)
        return out

    def _make_detok(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        from distrt.engine.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)

    # -- failure and shutdown --------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}") from self._dead

    def _fail_all(self, err: BaseException) -> None:
        self._dead = err
        self._in_flight.clear()
        self.scheduler.abandon_in_flight()
        for g in list(self._groups.values()):
            self.scheduler.finish_requests([c.request_id for c in g.children], "error")
        self._groups.clear()
        self._child_to_group.clear()

    def check_integrity(self) -> None:
        self.allocator.check_integrity()

    def shutdown(self) -> None:
        """Collects plans still in flight (only aborted requests can be left in them), then stops the workers."""
        try:
            if self._dead is None:
                self._drain()
        except Exception as e:
            logger.warning("collecting in-flight steps at shutdown: %s", e)
        finally:
            self._in_flight.clear()
            self.executor.shutdown()
