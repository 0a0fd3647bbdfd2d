"""The engine's pipelining logic in one process: an executor that defers each plan until it is
waited for (workers run plans in submission order, as real stages do) with two in flight, over a
real model. Greedy tokens equal the pp=1 engine's; preemption and aborts of requests whose plan is
in flight leave the allocator whole."""

from __future__ import annotations

import pytest

from distrt import LLM, SamplingParams
from distrt.engine.llm_engine import LLMEngine
from distrt.executor.base import Executor, StepHandle
from distrt.messages import StepPlan, StepResult
from tiny_models import make_tiny_checkpoint

PROMPTS = [[5, 9, 3, 44, 17, 8, 100, 2, 61], list(range(3, 40)), [7] * 5, [11, 12, 13], list(range(50, 70)),
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
SP = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


class DeferredExecutor(Executor):
    """Holds submitted plans and runs them, oldest first, only when a result is waited for."""

    def __init__(self, inner: Executor, depth: int) -> None:
        self.inner, self.depth = inner, depth
        self.queued: list[StepPlan] = []
        self.done: dict[int, StepResult] = {}
        self.max_queued = 0

    @property
    def max_concurrent_steps(self) -> int:
        return self.depth

    def determine_num_blocks(self) -> int:
        return self.inner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.inner.init_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.wait(self.execute_async(plan))

    def execute_async(self, plan: StepPlan) -> StepHandle:
        self.queued.append(plan)
        self.max_queued = max(self.max_queued, len(self.queued))
        return StepHandle(plan.step_id)

    def wait(self, handle: StepHandle) -> StepResult:
        while handle.step_id not in self.done:
            plan = self.queued.pop(0)
            self.done[plan.step_id] = self.inner.execute(plan)
        return self.done.pop(handle.step_id)

    def shutdown(self) -> None:
        self.inner.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ppe")), "llama-gqa", num_hidden_layers=5)


@pytest.fixture(scope="module")
def want(ckpt: str) -> dict[int, list[int]]:
    with LLM(ckpt, dtype="float32", device="cpu", max_model_len=128) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
    return {i: o.outputs[0].token_ids for i, o in enumerate(outs)}


def _pipelined(ckpt: str, num_kv_blocks: int) -> tuple[LLM, LLMEngine, DeferredExecutor]:
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, block_size=4, num_kv_blocks=num_kv_blocks)
    ex = DeferredExecutor(llm._executor, depth=2)
    llm.engine = LLMEngine(llm.config, llm.tokenizer, ex)
    return llm, llm.engine, ex


def _drain(eng: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def _clean(eng: LLMEngine) -> None:
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks
    assert eng.scheduler.num_in_flight == 0 and not eng.has_unfinished_requests()


def test_two_in_flight_same_tokens_with_preemption(ckpt: str, want: dict[int, list[int]]) -> None:
    llm, eng, ex = _pipelined(ckpt, num_kv_blocks=32)  # 128 tokens of KV for ~150 needed: preemption
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
    assert {i: o.outputs[0].token_ids for i, o in enumerate(outs)} == want
    assert eng.max_in_flight_seen == 2 and ex.max_queued == 2
    assert eng.scheduler.stats.num_preemptions > 0
    _clean(eng)
    llm.shutdown()


def test_abort_while_in_flight_and_reuse_the_id(ckpt: str, want: dict[int, list[int]]) -> None:
    llm, eng, ex = _pipelined(ckpt, num_kv_blocks=64)
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), {"prompt_token_ids": p}, SP)
    eng.step()
    eng.step()  # a few decodes in, one plan in flight
    assert len(ex.queued) == 1
    in_flight = [rid for rid in ex.queued[0].num_scheduled_tokens]
    victim, other = in_flight[0], in_flight[-1]
    eng.abort_request([victim])
    assert eng.scheduler.is_in_flight(other) and not eng.scheduler.is_in_flight(victim)
    eng.add_request(victim, {"prompt_token_ids": PROMPTS[0]}, SP)  # same id, while the old plan runs
    done = _drain(eng)
    assert done[victim] == want[0]  # the old request's late token was not mixed in
    for i in range(len(PROMPTS)):
        if str(i) != victim:
            assert done[str(i)] == want[i]
    _clean(eng)
    llm.shutdown()


def test_abort_everything_in_flight_then_drain(ckpt: str) -> None:
    llm, eng, ex = _pipelined(ckpt, num_kv_blocks=64)
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), {"prompt_token_ids": p}, SP)
    eng.step()
    assert len(ex.queued) == 1
    eng.abort_request([str(i) for i in range(len(PROMPTS))])
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks  # freed at once (workers run in order)
    assert eng.has_unfinished_requests()  # a plan is still in flight
    assert _drain(eng) == {}
    _clean(eng)
    assert not ex.queued
    llm.shutdown()
