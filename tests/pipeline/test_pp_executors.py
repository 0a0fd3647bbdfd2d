"""LLM(..., pipeline_parallel_size=N) under the MPI and Ray executors: pp=2, pp=3 with an uneven
layer split, and tp=2 x pp=2 (4 ranks) give the greedy tokens of pp=1 and transformers, with the
same log-probabilities; micro-batches really overlap (pp of them in flight); preemption and
aborts of requests whose plan is in flight leave the allocator whole."""

from __future__ import annotations


import pytest

from distrt import LLM, SamplingParams
from proc_utils import wait_gone
from tiny_models import assert_same_outputs, hf_greedy, load_hf_model, make_tiny_checkpoint

# 6 prompts: pp=2 runs micro-batches of 3, pp=3 of 2
PROMPTS = [[5, 9, 3, 44, 17, 8, 100, 2, 61], list(range(3, 40)), [7] * 5, [11, 12, 13], list(range(50, 70)),
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
SP = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
LAYOUTS = [pytest.param(2, 1, None, id="pp2"), pytest.param(3, 1, (1, 3, 1), id="pp3-split131"),
           pytest.param(2, 2, None, id="tp2xpp2")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ppx")), "llama-gqa", num_hidden_layers=5)


@pytest.fixture(scope="module")
def reference(ckpt: str) -> list:
    hf = load_hf_model(ckpt)
    want = [hf_greedy(hf, p, SP.max_tokens) for p in PROMPTS]  # type: ignore[arg-type]
    with LLM(ckpt, dtype="float32", device="cpu", max_model_len=128) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want  # pp=1 == transformers
    return outs




def _clean(llm: LLM) -> None:
    eng = llm.engine
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks
    assert eng.scheduler.num_in_flight == 0 and not eng.has_unfinished_requests()


def _run_layout(ckpt: str, reference: list, executor: str, pp: int, tp: int, split: tuple[int, ...] | None,
                **kw: object) -> LLM:
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, pipeline_parallel_size=pp,
              tensor_parallel_size=tp, pp_layer_split=split, executor=executor, step_timeout_s=60, **kw)
    try:
        assert_same_outputs(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False), reference)
        # every stage had a micro-batch (the default: pp plans in flight), or pipeline_micro_batches
        assert llm.engine.max_in_flight_seen == kw.get("pipeline_micro_batches", pp)
        _clean(llm)
    except BaseException:
        llm.shutdown()
        raise
    return llm


# -- MPI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pp,tp,split", LAYOUTS[1:])
def test_mpi_pp_matches_pp1(ckpt: str, reference: list, pp: int, tp: int, split: tuple[int, ...] | None) -> None:
    llm = _run_layout(ckpt, reference, "mpi", pp, tp, split)
    pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
    assert len(pids) == pp * tp
    llm.shutdown()
    assert wait_gone(pids, 20), "MPI workers left behind after shutdown"



def test_mpi_pp2_three_micro_batches(ckpt: str, reference: list) -> None:
    """pipeline_micro_batches=3 on pp=2: one plan queued beyond the stages, same tokens."""
    _run_layout(ckpt, reference, "mpi", 2, 1, None, pipeline_micro_batches=3).shutdown()

@pytest.fixture(scope="module")
def mpi_pp2_small_kv(ckpt: str, reference: list) -> LLM:
    """pp=2 under MPI with a KV pool too small for all six requests (preemption by recompute)."""
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, pipeline_parallel_size=2, executor="mpi",
              block_size=4, num_kv_blocks=32, step_timeout_s=60)
    yield llm
    pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
    llm.shutdown()
    assert wait_gone(pids, 20), "MPI workers left behind after shutdown"


def test_mpi_pp2_matches_pp1_under_preemption(mpi_pp2_small_kv: LLM, reference: list) -> None:
    llm = mpi_pp2_small_kv
    assert_same_outputs(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False), reference)
    assert llm.engine.max_in_flight_seen == 2
    assert llm.engine.scheduler.stats.num_preemptions > 0
    _clean(llm)


def test_mpi_pp2_abort_while_in_flight(mpi_pp2_small_kv: LLM, reference: list) -> None:
    eng = mpi_pp2_small_kv.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"x{i}", {"prompt_token_ids": p}, SP)
    eng.step()
    eng.step()  # one plan is in flight now
    assert len(eng._in_flight) == 1
    plan = eng._in_flight[0][0]
    victim = next(iter(plan.num_scheduled_tokens))
    assert eng.scheduler.is_in_flight(victim)
    eng.abort_request([victim])
    eng.check_integrity()
    eng.add_request(victim, {"prompt_token_ids": PROMPTS[3]}, SP)  # same id while the old one's plan runs
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done.pop(victim) == reference[3].outputs[0].token_ids
    for rid, toks in done.items():
        assert toks == reference[int(rid[1:])].outputs[0].token_ids
    assert len(done) == len(PROMPTS) - 1
    _clean(mpi_pp2_small_kv)


# -- Ray ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local() -> object:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=5, include_dashboard=False)  # our own, not a cluster this host runs
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("pp,tp,split", [LAYOUTS[0], pytest.param(3, 1, (2, 1, 2), id="pp3-split212"), LAYOUTS[2]])
def test_ray_pp_matches_pp1(ckpt: str, reference: list, ray_local: object, pp: int, tp: int,
                            split: tuple[int, ...] | None) -> None:
    _run_layout(ckpt, reference, "ray", pp, tp, split).shutdown()


def test_bad_pipeline_layouts_fail_before_any_worker_starts(ckpt: str) -> None:
    kw = dict(dtype="float32", device="cpu", max_model_len=64, executor="mpi")
    with pytest.raises(ValueError, match="covers 4 layers; the model has 5"):
        LLM(ckpt, pipeline_parallel_size=2, pp_layer_split=(1, 3), **kw)
    with pytest.raises(ValueError, match="one per pipeline stage"):
        LLM(ckpt, pipeline_parallel_size=2, pp_layer_split=(1, 2, 2), **kw)
    with pytest.raises(ValueError, match="one per pipeline stage"):
        LLM(ckpt, pipeline_parallel_size=2, pp_layer_split=(0, 5), **kw)
    with pytest.raises(ValueError, match="exceeds the number of layers"):
        LLM(ckpt, pipeline_parallel_size=6, **kw)
    with pytest.raises(ValueError, match="pipeline_micro_batches must be an integer >= 1"):
        LLM(ckpt, pipeline_parallel_size=2, pipeline_micro_batches=0, **kw)
