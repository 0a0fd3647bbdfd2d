"""The scheduler with several plans in flight (no model): disjoint micro-batches that take turns,
in-flight requests skipped and never preempted, stale results of aborted requests discarded, and
the tokens each plan hands the workers (the token invariant in messages.py)."""

from __future__ import annotations

from distrt.config import SchedulerConfig
from distrt.engine.kv_allocator import KVAllocator
from distrt.engine.request import Request, RequestStatus
from distrt.engine.sampling_params import SamplingParams
from distrt.engine.scheduler import Scheduler
from distrt.messages import RequestId, StepPlan, StepResult


def _req(rid: str, n_prompt: int, max_tokens: int = 6) -> Request:
    return Request(RequestId(rid), list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   seed=0, eos_token_ids=(), max_model_len=1000)


def _result(plan: StepPlan, s: Scheduler, token: int = 7) -> StepResult:
    """A token for every request whose chunk reaches the end of its known tokens (as a worker would)."""
    sampled = {}
    for rid, n in plan.num_scheduled_tokens.items():
        r = s.requests.get(rid)
        if r is not None and r.num_computed_tokens + n == r.num_tokens:
            sampled[rid] = token
    return StepResult(plan.step_id, sampled)


def _sched(pp: int, blocks: int = 64, block_size: int = 4, **kw: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=1000, **kw), KVAllocator(blocks, block_size), max_in_flight=pp)


def test_two_disjoint_micro_batches_take_turns() -> None:
    s = _sched(2)
    for r in "abcdef":
        s.add_request(_req(r, 3))
    p1 = s.schedule()
    p2 = s.schedule()  # p1 still in flight
    assert list(p1.num_scheduled_tokens) == ["a", "b", "c"]
    assert list(p2.num_scheduled_tokens) == ["d", "e", "f"]
    assert s.num_in_flight == 6
    assert s.schedule().is_empty  # everything is in flight: nothing to add
    r1 = _result(p1, s)
    s.update(p1, r1)
    p3 = s.schedule()  # a, b, c are back: their decode, carrying the token p1 sampled
    assert list(p3.num_scheduled_tokens) == ["a", "b", "c"]
    assert [c.new_token_ids for c in p3.cached_requests] == [(7,)] * 3
    assert [c.num_computed_tokens for c in p3.cached_requests] == [3] * 3
    s.update(p2, _result(p2, s, token=8))
    p4 = s.schedule()
    assert list(p4.num_scheduled_tokens) == ["d", "e", "f"]
    assert [c.new_token_ids for c in p4.cached_requests] == [(8,)] * 3


def test_pp1_schedules_everything_at_once() -> None:
    s = _sched(1)
    for r in "abcdef":
        s.add_request(_req(r, 3))
    assert list(s.schedule().num_scheduled_tokens) == list("abcdef")


def test_a_request_left_out_of_a_plan_gets_its_token_later() -> None:
    s = _sched(2)
    for r in "abcd":
        s.add_request(_req(r, 3))
    p1 = s.schedule()
    p2 = s.schedule()
    assert list(p1.num_scheduled_tokens) == ["a", "b"] and list(p2.num_scheduled_tokens) == ["c", "d"]
    s.update(p1, _result(p1, s, token=5))
    s.finish_requests([RequestId("c"), RequestId("d")], "abort")  # 2 active left: one per micro-batch
    p3 = s.schedule()
    p4 = s.schedule()
    assert list(p3.num_scheduled_tokens) == ["a"] and list(p4.num_scheduled_tokens) == ["b"]
    assert p3.finished_ids == ("c", "d") and p4.finished_ids == ()
    assert p4.cached_requests[0].new_token_ids == (5,)  # b was skipped by p3, its token rides p4
    s.update(p2, _result(p2, s))  # c and d were aborted in flight: nothing applied
    assert s.stats.generation_tokens == 2


def test_chunked_prefill_sends_no_tokens_until_sampled() -> None:
    s = _sched(2, max_num_batched_tokens=4)
    s.add_request(_req("a", 10))
    p = s.schedule()
    assert p.num_scheduled_tokens == {"a": 4}
    assert s.schedule().is_empty  # a's next chunk waits for this one
    s.update(p, _result(p, s))
    p = s.schedule()
    assert p.num_scheduled_tokens == {"a": 4} and p.cached_requests[0].new_token_ids == ()


def test_in_flight_requests_are_never_preempted() -> None:
    # 6 blocks of 2 tokens; a, b, c prefill 3 tokens each (2 blocks each): the pool is full.
    s = _sched(2, blocks=6, block_size=2, max_num_seqs=4)
    for r in "abc":
        s.add_request(_req(r, 3))
    s.add_request(_req("d", 1))
    pa = s.schedule()
    pb = s.schedule()
    assert list(pa.num_scheduled_tokens) == ["a", "b"] and list(pb.num_scheduled_tokens) == ["c"]
    s.update(pa, _result(pa, s))
    # a and b decode at position 3 (their 2nd block has room), then position 4 needs a 3rd block
    pa = s.schedule()
    assert list(pa.num_scheduled_tokens) == ["a", "b"]
    s.update(pa, _result(pa, s))
    pa2 = s.schedule()  # a needs a block; c (newest) is in flight: b, not c, is preempted
    assert pa2.finished_ids == ("b",)
    assert list(pa2.num_scheduled_tokens) == ["a"]
    assert s.requests[RequestId("c")].status is RequestStatus.RUNNING
    assert s.stats.num_preemptions == 1
    s.allocator.check_integrity()


def test_a_request_waits_when_only_in_flight_requests_hold_blocks() -> None:
    s = _sched(2, blocks=4, block_size=2)
    s.add_request(_req("a", 4))
    s.add_request(_req("b", 4))
    pa = s.schedule()
    pb = s.schedule()
    assert list(pa.num_scheduled_tokens) == ["a"] and list(pb.num_scheduled_tokens) == ["b"]
    s.update(pa, _result(pa, s))
    p = s.schedule()  # a needs a 3rd block; only b (in flight) could give one back: wait, no preemption
    assert p.is_empty and not p.finished_ids
    assert s.stats.num_preemptions == 0
    s.update(pb, _result(pb, s))
    p = s.schedule()  # now b is back and can be preempted for a
    assert p.finished_ids == ("b",) and list(p.num_scheduled_tokens) == ["a"]
    s.allocator.check_integrity()


def test_abort_in_flight_frees_blocks_and_discards_the_late_result() -> None:
    s = _sched(2, blocks=8, block_size=4)
    s.add_request(_req("a", 3))
    s.add_request(_req("b", 3))
    pa = s.schedule()
    pb = s.schedule()
    s.finish_requests([RequestId("a")], "abort")  # a's plan is still in flight
    assert s.allocator.num_free_blocks == 7
    s.add_request(_req("a", 5))  # the id is reused while the old plan is in flight
    pc = s.schedule()
    assert pc.finished_ids == ("a",)  # workers drop the old a before taking the new one
    assert [n.req_id for n in pc.new_requests] == ["a"] and pc.new_requests[0].token_ids == tuple(range(10, 15))
    new_a = s.requests[RequestId("a")]
    s.update(pa, _result(pa, s))  # the old a's result: stale, discarded
    assert new_a.num_computed_tokens == 0 and new_a.output_token_ids == []
    s.update(pb, _result(pb, s))
    s.update(pc, _result(pc, s))
    assert new_a.num_computed_tokens == 5 and new_a.output_token_ids == [7]
    s.finish_requests([RequestId("a"), RequestId("b")], "abort")
    assert s.num_in_flight == 0
    s.allocator.check_integrity()
    assert s.allocator.num_free_blocks == 8
