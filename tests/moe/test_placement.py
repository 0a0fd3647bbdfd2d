"""ExpertPlacement: the table, load accounting, greedy rebalancing (replicate hot experts, then pack
slots onto ranks) and the weight moves between two tables."""

from __future__ import annotations

import random

import pytest

from distrt.parallel.experts import ExpertPlacement, moe_layers_of, num_experts_of


def _zipf(num_experts: int, s: float, total: float = 1e6, shuffle_seed: int | None = None) -> list[float]:
    counts = [total / (i + 1) ** s for i in range(num_experts)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(counts)
    return counts


def _few_hot(num_experts: int, hot: list[int], share: float = 0.8, total: float = 1e6) -> list[float]:
    """`share` of the tokens on the `hot` experts, the rest spread over the others."""
    cold = num_experts - len(hot)
    return [total * share / len(hot) if e in hot else total * (1 - share) / cold for e in range(num_experts)]


def test_initial_table() -> None:
    p = ExpertPlacement.initial(6, 2, num_redundant=2)
    assert p.slot_to_expert == (0, 1, 2, 3, 4, 5, 0, 1)
    assert (p.num_slots, p.slots_per_rank, p.epoch) == (8, 4, 0)
    assert p.experts_on_rank(1) == (4, 5, 0, 1)
    assert p.replicas(0) == (0, 6) and p.replicas(5) == (5,)
    assert [p.rank_of_slot(s) for s in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("args", [(4, 3, [0, 1, 2, 3]), (4, 2, [0, 1, 2, 2]), (4, 2, [0, 1, 2, 4]), (5, 1, [0, 1])])
def test_bad_tables_are_rejected(args: tuple) -> None:
    with pytest.raises(ValueError):
        ExpertPlacement(*args)


def test_record_load_and_rank_loads() -> None:
    p = ExpertPlacement.initial(4, 2, num_redundant=2)  # slots: 0 1 2 | 3 0 1
    p.record_load([10, 20, 30, 40])
    p.record_load([10, 0, 0, 0])
    assert p.load == [20, 20, 30, 40]
    # expert 0 and 1 have two replicas, each taking half
    assert p.rank_loads() == [10 + 10 + 30, 40 + 10 + 10]
    assert p.max_over_mean_load() == pytest.approx(60 / 55)
    with pytest.raises(ValueError):
        p.record_load([1, 2, 3])
    with pytest.raises(ValueError):
        p.record_load([1, 2, 3, -4])


@pytest.mark.parametrize("experts,ep,redundant,hot", [
    (16, 4, 4, [4, 5]),            # the two hot experts share rank 1
    (16, 4, 4, [0, 1]),            # ... or rank 0, and already have a replica each on rank 3
    (64, 8, 8, [9, 10, 11, 12]),   # Qwen3/DeepSeek-like counts, four hot experts on one rank
    (8, 2, 2, [3]),                # Mixtral at ep 2: one expert takes 80%
    (60, 4, 4, [20, 21, 22]),      # Qwen1.5-MoE: 60 experts
])
def test_rebalance_meets_the_goal_on_skewed_load(experts: int, ep: int, redundant: int, hot: list[int]) -> None:
    p = ExpertPlacement.initial(experts, ep, redundant)
    counts = _few_hot(experts, hot)
    p.record_load(counts)
    before = p.max_over_mean_load()
    new = p.rebalance()
    after = new.max_over_mean_load(counts)
    assert before >= 1.7, before
    assert after <= 1.25, (before, after, new)
    assert new.epoch == 1 and new.load == [0.0] * experts
    _check_table(new)
    for e in hot:
        assert len(new.replicas(e)) >= 2, f"hot expert {e} was not replicated: {new}"


@pytest.mark.parametrize("seed", range(5))
def test_rebalance_zipf_load(seed: int) -> None:
    p = ExpertPlacement.initial(64, 8, 8)
    counts = _zipf(64, 1.1, shuffle_seed=seed)
    new = p.rebalance(counts)
    assert p.max_over_mean_load(counts) > 1.5
    assert new.max_over_mean_load(counts) <= 1.25
    _check_table(new)


def test_rebalance_without_spare_slots_packs_experts() -> None:
    p = ExpertPlacement.initial(16, 4)
    counts = [100.0] * 4 + [10.0] * 12  # the 4 hot experts all start on rank 0
    assert p.max_over_mean_load(counts) > 2.5
    new = p.rebalance(counts)
    assert new.max_over_mean_load(counts) == pytest.approx(1.0)
    assert sorted(new.slot_to_expert) == list(range(16))


def test_uniform_load_moves_nothing() -> None:
    p = ExpertPlacement.initial(8, 2)
    new = p.rebalance([5.0] * 8)
    assert new.max_over_mean_load([5.0] * 8) == 1.0
    assert p.moves_to(new) == []
    assert p.rebalance([0.0] * 8).slot_to_expert == p.slot_to_expert  # no load recorded: uniform


def test_moves_rebuild_the_new_table() -> None:
    p = ExpertPlacement.initial(16, 4, 4)
    new = p.rebalance(_few_hot(16, [0, 1]))
    moves = p.moves_to(new)
    # apply the moves to a model of each rank's slots, reading old contents only
    old = [list(p.experts_on_rank(r)) for r in range(4)]
    cur = [row[:] for row in old]
    for mv in moves:
        assert old[mv.src_rank][mv.src_slot] == mv.expert
        cur[mv.dst_rank][mv.dst_slot] = mv.expert
    assert [tuple(r) for r in cur] == [new.experts_on_rank(r) for r in range(4)]
    kept = sum(a == b for a, b in zip(p.slot_to_expert, new.slot_to_expert))
    assert len(moves) == p.num_slots - kept
    assert kept > 0  # experts that stay on their rank keep their slot


def _check_table(p: ExpertPlacement) -> None:
    assert set(p.slot_to_expert) == set(range(p.num_experts))
    for e in range(p.num_experts):
        ranks = [p.rank_of_slot(s) for s in p.replicas(e)]
        assert len(ranks) == len(set(ranks)), f"expert {e} twice on one rank: {p}"


def test_moe_layer_rules_match_transformers() -> None:
    import torch
    from moe_testutil import moe_config
    from transformers import AutoModelForCausalLM

    for name, overrides in (("mixtral", {}), ("qwen2_moe", {}), ("qwen3_moe", {}),
                            ("qwen2_moe", dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))):
        cfg = moe_config(name, **overrides)
        hf = cfg.to_dict()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        want = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
        assert moe_layers_of(hf, cfg.num_hidden_layers) == want, (name, overrides)
        assert num_experts_of(hf) == model.model.layers[want[0]].mlp.experts.num_experts
    assert moe_layers_of({"num_hidden_layers": 4}, 4) == [] and num_experts_of({}) == 0
