import math

import pytest
import torch

from distrt.layers.sampler import Sampler, SamplerRow, hashed_uniform
from distrt.messages import SamplingSpec


def _row(i: int = 0, prompt: list[int] | None = None, out: list[int] | None = None, **kw: object) -> SamplerRow:
    spec = SamplingSpec(**{"seed": 0, "temperature": 1.0, **kw})  # type: ignore[arg-type]
    return SamplerRow(spec, i, prompt or [], out or [])


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits.clone(), [_row(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_hashed_uniform_in_range_and_deterministic() -> None:
    seeds = torch.tensor([0, 1, 2**31 - 1], dtype=torch.int64)
    steps = torch.tensor([0, 5, 9], dtype=torch.int64)
    u = hashed_uniform(seeds, steps, 1000)
    assert bool((u > 0).all() and (u < 1).all())
    assert torch.equal(u, hashed_uniform(seeds, steps, 1000))
    assert abs(u.mean().item() - 0.5) < 0.03
    assert not torch.equal(u[0], u[1])


def test_seeded_sampling_is_batch_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g)
    rows = [_row(seed=s) for s in (11, 12, 13, 14)]
    full = Sampler()(logits.clone(), rows).token_ids
    alone = [Sampler()(logits[i : i + 1].clone(), [rows[i]]).token_ids[0] for i in range(4)]
    assert full == alone
    # a different mix around the same request gives the same token for it
    mixed = Sampler()(torch.stack([logits[2], logits[0]]), [rows[2], _row(temperature=0.0)]).token_ids
    assert mixed[0] == full[2]


def test_sampling_matches_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    rows = [_row(seed=s) for s in range(4000)]
    toks = torch.tensor(Sampler()(logits, rows).token_ids)
    freq = torch.bincount(toks, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_different_seeds_differ_same_seed_repeats() -> None:
    logits = torch.zeros(1, 1000)
    a = [Sampler()(logits.clone(), [_row(i, seed=5)]).token_ids[0] for i in range(20)]
    b = [Sampler()(logits.clone(), [_row(i, seed=5)]).token_ids[0] for i in range(20)]
    c = [Sampler()(logits.clone(), [_row(i, seed=6)]).token_ids[0] for i in range(20)]
    assert a == b and a != c


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_leave_only_the_top_token(kw: dict) -> None:
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(3))
    out = Sampler()(logits.clone(), [_row(seed=i, **kw) for i in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_and_top_p_support() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(500, 4).clone()
    toks = set(Sampler()(logits.clone(), [_row(seed=s, top_k=2) for s in range(500)]).token_ids)
    assert toks == {0, 1}
    # top_p=0.65: smallest prefix with mass >= 0.65 is {0, 1}
    toks = set(Sampler()(logits.clone(), [_row(seed=s, top_p=0.65) for s in range(500)]).token_ids)
    assert toks == {0, 1}
    # min_p=0.6: keep p >= 0.24 -> {0, 1}
    toks = set(Sampler()(logits.clone(), [_row(seed=s, min_p=0.6) for s in range(500)]).token_ids)
    assert toks == {0, 1}


def test_repetition_penalty_matches_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 30, generator=g) * 3
    prompt, out = [1, 5, 7], [7, 9]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + out]), logits.clone())
    got = Sampler._penalize(logits.clone(), [_row(0, prompt, out, repetition_penalty=1.3)])
    assert torch.allclose(got, ref)


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(1, 10)
    got = Sampler._penalize(logits.clone(), [_row(0, [3], [4, 4, 5], presence_penalty=0.5, frequency_penalty=0.25)])
    want = torch.zeros(10)
    want[4] = -(0.5 + 2 * 0.25)
    want[5] = -(0.5 + 0.25)  # prompt token 3 untouched (OpenAI semantics: generated tokens only)
    assert torch.allclose(got[0], want)


def test_min_tokens_suppresses_eos() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 2] = 10.0
    spec = dict(temperature=0.0, min_tokens=2, suppress_ids=(2,))
    assert Sampler()(logits.clone(), [_row(0, **spec)]).token_ids[0] != 2
    assert Sampler()(logits.clone(), [_row(2, **spec)]).token_ids[0] == 2


def test_logprobs_top_n() -> None:
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(5))
    out = Sampler()(logits.clone(), [_row(temperature=0.0, logprobs=3), _row(temperature=0.0)])
    ref = torch.log_softmax(logits[0], -1)
    lp, ids, tops = out.logprobs[0]
    assert ids == ref.topk(3).indices.tolist()
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(tops, ref.topk(3).values.tolist()))
    assert math.isclose(lp, ref.max().item(), rel_tol=1e-5)
    assert out.logprobs[1] is None
