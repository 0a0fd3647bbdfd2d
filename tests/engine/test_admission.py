"""Lookahead admission (engine/admission.py): the projection against a step-by-step replay, and the
scheduler under it (no preemption where greedy preempts, more sequences than a worst-case cap)."""

from __future__ import annotations

import random

import pytest

from distrt.config import SchedulerConfig
from distrt.engine.admission import LookaheadAdmission, final_tokens
from distrt.engine.kv_allocator import KVAllocator
from distrt.engine.request import Request
from distrt.engine.sampling_params import SamplingParams
from distrt.engine.scheduler import Scheduler
from distrt.messages import RequestId, StepPlan, StepResult


def _req(rid: str, n_prompt: int, max_tokens: int | None, max_model_len: int = 4096) -> Request:
    return Request(RequestId(rid), [5] * n_prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                   seed=0, eos_token_ids=(), max_model_len=max_model_len)


def _decoding(rid: str, n_prompt: int, n_out: int, max_tokens: int) -> Request:
    r = _req(rid, n_prompt, max_tokens)
    r.output_token_ids = [7] * n_out
    r.num_computed_tokens = n_prompt + n_out - 1
    return r


def _replay_peak(reqs: list[Request], block_size: int) -> int:
    """Independent of the projection's closed form: advance decoding requests one token per step
    (each holds its tokens until it reaches its final length) and take the largest total of blocks."""
    tokens = {r.request_id: r.num_tokens for r in reqs}
    final = {r.request_id: final_tokens(r) for r in reqs}
    peak = 0
    while tokens:
        peak = max(peak, sum(-(-n // block_size) for n in tokens.values()))
        for rid in list(tokens):
            tokens[rid] += 1
            if tokens[rid] >= final[rid]:  # the last sampled token never gets a KV slot
                del tokens[rid]
    return peak


def test_final_tokens_caps() -> None:
    assert final_tokens(_req("a", 10, 5)) == 15
    assert final_tokens(_req("a", 10, 5000, max_model_len=100)) == 100
    assert final_tokens(_req("a", 10, None, max_model_len=100)) == 100


@pytest.mark.parametrize("seed", range(6))
def test_projection_matches_replay_for_decoding_requests(seed: int) -> None:
    rng = random.Random(seed)
    bs = 4
    running = [_decoding(f"r{i}", rng.randint(1, 30), rng.randint(1, 20), rng.randint(20, 60)) for i in range(rng.randint(1, 8))]
    cand = _decoding("c", rng.randint(1, 30), 1, rng.randint(1, 60))
    peak = _replay_peak([*running, cand], bs)
    for blocks in (peak - 1, peak, peak + 5):
        la = LookaheadAdmission(num_blocks=blocks + max(1, int(blocks * 0.01)), block_size=bs, token_budget=64)
        la.limit = blocks  # no watermark: compare the projection itself
        assert la.fits(running, cand) == (peak <= blocks), (blocks, peak)


def test_nothing_running_always_admits() -> None:
    la = LookaheadAdmission(num_blocks=4, block_size=4, token_budget=64)
    assert la.allows([], _req("huge", 100, 100))  # longer than the pool: the greedy policy's case


def test_pacing_credit() -> None:
    la = LookaheadAdmission(num_blocks=1000, block_size=16, token_budget=2048)
    long_req = _req("a", 1000, 1000)
    rate = la.pace_rate(long_req)
    assert 0 < rate < 1  # 1000 in / 1000 out: one admission every few steps
    assert la.pace_rate(_req("b", 16, 16)) > 1  # short requests are not held back
    running = [_decoding("r", 4, 1, 8)]
    la.tick(long_req)
    assert la._credit >= 1.0 and la.allows(running, _req("small", 4, 4))
    la.took()
    la.tick(long_req)
    assert la._credit < 1.0 and not la.allows(running, _req("small", 4, 4))


def _result(plan: StepPlan, sched: Scheduler) -> StepResult:
    sampled = {}
    for rid, n in plan.num_scheduled_tokens.items():
        r = sched.requests[rid]
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[rid] = 7
    return StepResult(plan.step_id, sampled)


def _run(admission: str, num_blocks: int, max_num_seqs: int, n_req: int = 40, prompt: int = 32,
         out: int = 64) -> tuple[Scheduler, int, int]:
    cfg = SchedulerConfig(max_model_len=prompt + out + 8, max_num_seqs=max_num_seqs, max_num_batched_tokens=128,
                          admission=admission)
    s = Scheduler(cfg, KVAllocator(num_blocks, 16))
    for i in range(n_req):
        s.add_request(_req(str(i), prompt, out, cfg.max_model_len))
    most, steps, done = 0, 0, 0
    while s.has_unfinished():
        plan = s.schedule()
        most = max(most, len(s.running))
        _, finished = s.update(plan, _result(plan, s))
        done += len(finished)
        s.allocator.check_integrity()
        steps += 1
        assert steps < 10_000, "no progress"
    assert done == n_req and s.allocator.num_free_blocks == num_blocks
    return s, most, steps


def test_lookahead_runs_more_sequences_without_preempting() -> None:
    # 96-token requests = 6 blocks; 60 blocks hold 10 at their peak (the worst-case cap).
    greedy, _, _ = _run("greedy", 60, max_num_seqs=40, n_req=200)
    assert greedy.stats.num_preemptions > 0  # over-admits, then recomputes
    capped, most_capped, steps_capped = _run("greedy", 60, max_num_seqs=10, n_req=200)
    assert capped.stats.num_preemptions == 0 and most_capped == 10
    la, most, steps = _run("lookahead", 60, max_num_seqs=40, n_req=200)
    assert la.stats.num_preemptions == 0
    assert most > 10  # older requests free blocks before younger ones peak
    assert steps < steps_capped


def test_config_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="admission must be one of"):
        SchedulerConfig(max_model_len=10, admission="fifo")


def test_engine_with_lookahead_admission_matches_greedy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A small pool and many requests: the lookahead engine gives the same greedy tokens as the
    default policy, without preempting, and returns every block."""
    from distrt import LLM, SamplingParams
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path), "llama-gqa")
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(12)]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = {}
    for adm in ("greedy", "lookahead"):
        with LLM(path, dtype="float32", device="cpu", max_model_len=64, num_kv_blocks=24, block_size=4,
                 admission=adm) as llm:
            outs[adm] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
            stats = llm.engine.scheduler.stats
            assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks
            if adm == "lookahead":
                assert stats.num_preemptions == 0
            else:
                assert stats.num_preemptions > 0  # the pool is small: greedy over-admits
    assert outs["lookahead"] == outs["greedy"]
