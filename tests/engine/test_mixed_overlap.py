"""Mixed-step overlap (worker/model_runner.py MixedSplit): a mixed batch's leading decode rows run as
a decode graph on a side stream beside the eager forward of its prompt chunks. On CPU the graph
plumbing runs eagerly (DISTRT_EAGER_GRAPHS) and the two parts one after the other: the split must give
exactly the tokens and log-probabilities of the unsplit forward, and transformers' greedy tokens."""

from __future__ import annotations

import pytest

from distrt import LLM, SamplingParams
from distrt.worker.model_runner import ModelRunner
from tiny_models import assert_same_outputs, hf_greedy, load_hf_model, make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("mixed")), "llama-gqa", seed=4)


def _prompts() -> list[list[int]]:
    return [[3 + (11 * i + j) % 180 for j in range(n)] for i, n in enumerate((4, 33, 19, 52, 7, 40, 26, 61))]


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, ignore_eos=True)
    return [greedy if i % 2 == 0 else sampled for i in range(8)]


def _run(ckpt: str, monkeypatch: pytest.MonkeyPatch, overlap: bool, async_scheduling: bool) -> tuple[list, int]:
    monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    monkeypatch.setenv("DISTRT_OVERLAP_MIXED", "1" if overlap else "0")
    monkeypatch.setattr(ModelRunner, "SPLIT_MIN_DECODE_ROWS", 2)
    monkeypatch.setattr(ModelRunner, "SPLIT_MIN_OTHER_TOKENS", 4)
    calls = [0]
    inner = ModelRunner._forward_split

    def counted(self, inputs, sp):  # type: ignore[no-untyped-def]
        calls[0] += 1
        assert sp.nd >= 2 and inputs.meta.query_start_loc.shape[0] - 1 > sp.nd
        return inner(self, inputs, sp)

    monkeypatch.setattr(ModelRunner, "_forward_split", counted)
    # a small token budget: later prompts are prefilled in chunks while earlier ones decode
    llm = LLM(ckpt, dtype="float32", device="cpu", async_scheduling=async_scheduling, num_kv_blocks=96,
              max_model_len=128, max_num_seqs=8, max_num_batched_tokens=24)
    outs = llm.generate(_prompts(), _params(), use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks
    return outs, calls[0]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_mixed_split_matches_unsplit_and_transformers(ckpt: str, monkeypatch: pytest.MonkeyPatch,
                                                      async_scheduling: bool) -> None:
    ref, ref_calls = _run(ckpt, monkeypatch, False, async_scheduling)
    assert ref_calls == 0
    outs, calls = _run(ckpt, monkeypatch, True, async_scheduling)
    assert calls >= 5  # the mixed steps really split
    assert_same_outputs([outs[i] for i in (0, 2, 4, 6)], [ref[i] for i in (0, 2, 4, 6)])
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
    hf = load_hf_model(ckpt)
    for i in (0, 6):
        assert outs[i].outputs[0].token_ids == hf_greedy(hf, _prompts()[i], 24)


def test_split_needs_enough_rows(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the thresholds (the defaults are sized for GPUs) a mixed step is not split."""
    monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=96, max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=24)
    runner = llm._executor.worker.runner  # type: ignore[attr-defined]
    assert runner.overlap_mixed and runner.graphs is not None
    seen = []
    inner = runner.prepare

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        inputs = inner(*a, **k)
        seen.append(inputs.split)
        return inputs

    runner.prepare = spy
    llm.generate(_prompts(), _params(), use_tqdm=False)
    assert seen and all(s is None for s in seen)
