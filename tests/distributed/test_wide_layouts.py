"""4- and 8-rank layouts on CPU (what issue 10 runs on 4 and 8 GPUs): tp=8, tp=4 x pp=2 and a MoE
with tp=4 x ep=4 through the MPI executor give the greedy tokens and log-probabilities of one
process (whose tokens the parity tests tie to transformers; checked here too for the dense model)."""

from __future__ import annotations

import os
import sys

import pytest

from distrt import LLM, SamplingParams
from tiny_models import hf_greedy, load_hf_model, make_tiny_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe"))
from moe_testutil import make_moe_checkpoint  # noqa: E402

PROMPTS = [[5, 9, 3, 44, 17, 8], list(range(3, 30)), [7] * 4]
SP = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
KW = dict(dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64)


def _gen(llm: LLM) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)


def _same(outs: list, ref: list) -> None:
    for o, r in zip(outs, ref, strict=True):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for lp, rlp in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert all(abs(lp[k].logprob - rlp[k].logprob) < 1e-4 for k in rlp)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("wide")), "llama-gqa", num_attention_heads=8,
                                num_key_value_heads=2, hidden_size=64, num_hidden_layers=4)
    ref = _gen(LLM(path, **KW))  # type: ignore[arg-type]
    hf = load_hf_model(path)
    assert [r.outputs[0].token_ids for r in ref] == [hf_greedy(hf, p, 8) for p in PROMPTS]
    return path, ref


@pytest.mark.parametrize("tp,pp", [(8, 1), (4, 2)], ids=["tp8", "tp4xpp2"])
def test_eight_ranks_match_one(dense: tuple[str, list], tp: int, pp: int) -> None:
    path, ref = dense
    with LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, executor="mpi", **KW) as llm:  # type: ignore[arg-type]
        _same(_gen(llm), ref)
        llm.engine.check_integrity()


def test_moe_tp4_ep4_matches_one(tmp_path: object) -> None:
    path = make_moe_checkpoint(str(tmp_path), "mixtral")
    ref = _gen(LLM(path, **KW))  # type: ignore[arg-type]
    with LLM(path, tensor_parallel_size=4, expert_parallel_size=4, executor="mpi", **KW) as llm:  # type: ignore[arg-type]
        _same(_gen(llm), ref)
