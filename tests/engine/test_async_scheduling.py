"""Async scheduling (two plans in flight, deferred decode inputs) gives exactly the tokens of the
synchronous loop, which the parity tests tie to transformers; and its bookkeeping stays exact."""

from __future__ import annotations

import pytest

from distrt import LLM, SamplingParams
from distrt.messages import StepPlan
from tiny_models import assert_same_outputs, hf_greedy, load_hf_model, make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("async")), "llama-gqa", seed=3)


def _llm(path: str, async_scheduling: bool, **kw: object) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("max_model_len", 256)
    return LLM(path, dtype="float32", device="cpu", async_scheduling=async_scheduling,
               **kw)  # type: ignore[arg-type]


class _PlanLog:
    """Records the plans the engine submits (to see that deferred decodes really happened)."""

    def __init__(self, llm: LLM) -> None:
        ex = llm._executor
        self.plans: list[StepPlan] = []
        inner = ex.execute_async

        def submit(plan: StepPlan):  # type: ignore[no-untyped-def]
            self.plans.append(plan)
            return inner(plan)

        ex.execute_async = submit  # type: ignore[method-assign]

    @property
    def deferred(self) -> int:
        return sum(c.deferred for p in self.plans for c in p.cached_requests)


def _prompts() -> list[list[int]]:
    return [[5 + (7 * i + j) % 190 for j in range(n)] for i, n in enumerate((3, 20, 41, 9, 15, 2))]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),  # ends with its first token
        SamplingParams(temperature=0.7, top_k=20, seed=5, max_tokens=18, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=9, max_tokens=22, min_tokens=4, ignore_eos=False),
        SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
    ]


def test_async_matches_sync_and_transformers(ckpt: str) -> None:
    ref_llm = _llm(ckpt, False)
    ref = ref_llm.generate(_prompts(), _params(), use_tqdm=False)
    assert ref_llm.engine.max_in_flight_seen == 1
    llm = _llm(ckpt, True)
    log = _PlanLog(llm)
    outs = llm.generate(_prompts(), _params(), use_tqdm=False)
    assert llm.engine.max_in_flight_seen == 2
    assert log.deferred > 50  # most decodes were built before the previous token was back
    assert_same_outputs(outs[:1], ref[:1])  # tokens and top log-probabilities
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert o.outputs[0].finish_reason == r.outputs[0].finish_reason
    hf = load_hf_model(ckpt)
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, _prompts()[0], 30)
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


@pytest.mark.parametrize("kw", [dict(num_kv_blocks=10, max_model_len=96), dict(max_num_batched_tokens=16, num_kv_blocks=40)],
                         ids=["preemption", "chunked-prefill"])
def test_async_under_preemption_and_chunking(ckpt: str, kw: dict) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = _llm(ckpt, False, **kw).generate(_prompts(), params, use_tqdm=False)
    llm = _llm(ckpt, True, **kw)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    if "max_model_len" in kw:
        assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


def test_eos_discards_the_token_computed_ahead(ckpt: str) -> None:
    """A request that stops on a token while its next step is already in flight: the extra token
    is dropped and the output equals the synchronous run's."""
    probe = _llm(ckpt, False).generate([_prompts()[1]], SamplingParams(temperature=0.0, max_tokens=12,
                                                                       ignore_eos=True), use_tqdm=False)
    stop_tok = probe[0].outputs[0].token_ids[5]
    params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_tok])
    ref = _llm(ckpt, False).generate(_prompts(), params, use_tqdm=False)
    llm = _llm(ckpt, True)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids[-1] == stop_tok and outs[1].outputs[0].finish_reason == "stop"
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


def test_abort_while_in_flight(ckpt: str) -> None:
    llm = _llm(ckpt, True)
    eng = llm.engine
    for i, p in enumerate(_prompts()):
        eng.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        eng.step()
    (plan, _), = eng._in_flight  # after step() one plan is still in flight, holding the requests
    assert {"1", "3"} <= set(plan.num_scheduled_tokens)
    eng.abort_request(["1", "3"])
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert sorted(done) == ["0", "2", "4", "5"]
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks
    # the engine stays usable and exact after the aborts
    again = llm.generate([_prompts()[1]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    ref = _llm(ckpt, False).generate([_prompts()[1]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                                     use_tqdm=False)
    assert again[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


def test_decode_graph_plumbing_on_cpu(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode-graph path (static buffers, padded batch sizes, deferred inputs copied in) with
    each replay run eagerly (DISTRT_EAGER_GRAPHS: CPU has no CUDA graphs) gives the eager tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = _llm(ckpt, False).generate(_prompts(), params, use_tqdm=False)
    monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    llm = _llm(ckpt, True, max_num_seqs=8)
    assert llm._executor.worker.runner.graphs is not None  # type: ignore[attr-defined]
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
