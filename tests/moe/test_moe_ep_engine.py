"""Expert parallelism through the engine: LLM(tp=2, ep=2) on a tiny Mixtral gives tp=1's tokens."""

from __future__ import annotations

import pytest

from distrt import LLM, SamplingParams
from moe_testutil import make_moe_checkpoint

PROMPTS = [[5, 9, 3, 44, 17, 8], list(range(3, 30)), [7] * 4]
SP = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)


def test_mixtral_ep2_matches_ep1(tmp_path: object) -> None:
    path = make_moe_checkpoint(str(tmp_path), "mixtral")
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    ref = LLM(path, **kw).generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)  # type: ignore[arg-type]
    with LLM(path, tensor_parallel_size=2, expert_parallel_size=2, executor="mpi", **kw) as llm:  # type: ignore[arg-type]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for lp, rlp in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert all(abs(lp[k].logprob - rlp[k].logprob) < 1e-5 for k in rlp)


def test_ep_must_divide_tp_and_experts(tmp_path: object) -> None:
    path = make_moe_checkpoint(str(tmp_path), "mixtral")
    with pytest.raises(ValueError, match="expert_parallel_size"):
        LLM(path, device="cpu", max_model_len=64, tensor_parallel_size=2, expert_parallel_size=3, executor="mpi")


def test_generation_straddling_rebalances_matches_none(tmp_path: object) -> None:
    """The coordinator collects expert load every 2 steps and moves experts between the 2 EP ranks
    (2 spare slots for replicas) mid-generation: tokens and log-probs equal a run without any."""
    path = make_moe_checkpoint(str(tmp_path), "mixtral")
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    ref = LLM(path, **kw).generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)  # type: ignore[arg-type]
    with LLM(path, tensor_parallel_size=2, expert_parallel_size=2, executor="mpi", num_redundant_experts=2,
             expert_rebalance_interval=2, **kw) as llm:  # type: ignore[arg-type]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
        assert llm.engine.experts.num_rebalances >= 1
        assert all(p.epoch >= 2 for p in llm.engine.experts.placements.values())
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for lp, rlp in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert all(abs(lp[k].logprob - rlp[k].logprob) < 1e-5 for k in rlp)
