"""Scheduler unit tests with exact block ids (no model: a fake worker returns fixed tokens)."""

from distrt.config import SchedulerConfig
from distrt.engine.kv_allocator import KVAllocator
from distrt.engine.request import Request, RequestStatus
from distrt.engine.sampling_params import SamplingParams
from distrt.engine.scheduler import Scheduler
from distrt.messages import RequestId, StepPlan, StepResult


def _req(rid: str, n_prompt: int, max_tokens: int = 4) -> Request:
    return Request(RequestId(rid), list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   seed=0, eos_token_ids=(), max_model_len=1000)


def _result(plan: StepPlan, sched: Scheduler, token: int = 7) -> StepResult:
    """Sample for every request whose scheduled chunk reaches the end of its known tokens."""
    sampled = {}
    for rid, n in plan.num_scheduled_tokens.items():
        r = sched.requests[rid]
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[rid] = token
    return StepResult(plan.step_id, sampled)


def _step(s: Scheduler) -> StepPlan:
    plan = s.schedule()
    s.update(plan, _result(plan, s))
    return plan


def test_prefill_then_decode_with_block_deltas() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=1000, max_num_batched_tokens=64), KVAllocator(10, 4))
    s.add_request(_req("a", 6))
    p1 = _step(s)
    assert [n.req_id for n in p1.new_requests] == ["a"]
    assert p1.new_requests[0].block_ids == (0, 1)
    assert p1.num_scheduled_tokens == {"a": 6}
    p2 = _step(s)  # token 7 at position 6 -> still block 1
    assert p2.new_requests == () and p2.cached_requests[0].new_block_ids == ()
    assert p2.cached_requests[0].num_computed_tokens == 6
    p3 = _step(s)  # position 7
    assert p3.cached_requests[0].new_block_ids == ()
    p4 = _step(s)  # position 8 -> new block 2; this is the 4th token: finishes (max_tokens=4)
    assert p4.cached_requests[0].new_block_ids == (2,)
    assert not s.has_unfinished()
    assert s.allocator.num_free_blocks == 10
    p5 = s.schedule()
    assert p5.finished_ids == ("a",) and p5.is_empty


def test_chunked_prefill_mixed_with_decode_under_budget() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=1000, max_num_batched_tokens=8), KVAllocator(20, 4))
    s.add_request(_req("a", 3, max_tokens=10))
    _step(s)  # a prefilled (3 tokens)
    s.add_request(_req("b", 20))
    p = _step(s)
    assert p.num_scheduled_tokens == {"a": 1, "b": 7}  # decode first, then a 7-token chunk of b
    assert "b" not in [r for r, _ in []]
    b = s.requests[RequestId("b")]
    assert b.num_computed_tokens == 7 and b.output_token_ids == []  # partial chunk: no token
    p = _step(s)
    assert p.num_scheduled_tokens == {"a": 1, "b": 7}
    p = _step(s)
    assert p.num_scheduled_tokens == {"a": 1, "b": 6}
    assert b.output_token_ids == [7]


def test_max_num_seqs_limits_admission() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=1000, max_num_seqs=2, max_num_batched_tokens=100), KVAllocator(20, 4))
    for r in "abc":
        s.add_request(_req(r, 2))
    p = _step(s)
    assert list(p.num_scheduled_tokens) == ["a", "b"]
    assert s.num_waiting == 1


def test_preemption_newest_first_and_recompute() -> None:
    # 4 blocks of 2 tokens: a and b each prefill 3 tokens (2 blocks each); pool full.
    s = Scheduler(SchedulerConfig(max_model_len=100, max_num_batched_tokens=100), KVAllocator(4, 2))
    s.add_request(_req("a", 3, max_tokens=3))
    s.add_request(_req("b", 3, max_tokens=3))
    p = _step(s)
    assert [n.block_ids for n in p.new_requests] == [(0, 1), (2, 3)]
    # decode: a (4 tokens) fits in its 2 blocks; b too
    _step(s)
    # next: a needs a 3rd block -> b (newest) is preempted, its blocks freed and given to a
    p = s.schedule()
    assert p.finished_ids == ("b",)
    assert p.num_scheduled_tokens == {"a": 1}
    assert p.cached_requests[0].new_block_ids == (2,)
    b = s.waiting[0]
    assert b.request_id == "b" and b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.stats.num_preemptions == 1
    s.update(p, _result(p, s))  # a finishes (3 tokens)
    # b comes back whole: prompt + its 2 generated tokens, recomputed from 0
    p = s.schedule()
    assert p.finished_ids == ("a",)
    nb = p.new_requests[0]
    assert nb.req_id == "b" and len(nb.token_ids) == 5 and nb.num_computed_tokens == 0
    assert p.num_scheduled_tokens == {"b": 5}
    s.update(p, _result(p, s))
    assert not s.has_unfinished()
    s.allocator.check_integrity()
    assert s.allocator.num_free_blocks == 4


def test_finish_requests_frees_waiting_and_running() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=100, max_num_seqs=1, max_num_batched_tokens=100), KVAllocator(8, 2))
    s.add_request(_req("a", 3))
    s.add_request(_req("b", 3))
    _step(s)
    done = s.finish_requests([RequestId("a"), RequestId("b")], "abort")
    assert {r.request_id for r in done} == {"a", "b"}
    assert all(r.finish_reason == "abort" for r in done)
    assert s.allocator.num_free_blocks == 8
    assert s.schedule().finished_ids == ("a",)  # only a had been sent to workers
    s.allocator.check_integrity()
