"""FusedMoE in one process: against transformers' own MoE blocks, EP shards summing to the whole,
weight loading of both checkpoint layouts, and local expert moves."""

from __future__ import annotations

import pytest
import torch

from distrt.layers.moe import FusedMoE, select_experts
from distrt.parallel.experts import ExpertPlacement
from moe_checks import E, H, INTER, K, T, full_weights, make_layer, reference_output
from moe_testutil import moe_config


def test_select_experts_matches_hf_routers() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    x = torch.randn(11, 64)
    for cfg, cls, renorm in ((moe_config("mixtral"), MixtralTopKRouter, True),
                             (moe_config("qwen2_moe"), Qwen2MoeTopKRouter, False),
                             (moe_config("qwen2_moe", norm_topk_prob=True), Qwen2MoeTopKRouter, True)):
        router = cls(cfg)
        torch.nn.init.normal_(router.weight)
        _, want_w, want_ids = router(x)
        w, ids = select_experts(x @ router.weight.detach().t(), cfg.num_experts_per_tok, renorm)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w.float())


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_layer_matches_hf_sparse_block(name: str) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = moe_config(name)
    block = (MixtralSparseMoeBlock if name == "mixtral" else Qwen3MoeSparseMoeBlock)(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    n_exp = cfg.num_local_experts if name == "mixtral" else cfg.num_experts
    inter = cfg.intermediate_size if name == "mixtral" else cfg.moe_intermediate_size
    layer = FusedMoE(n_exp, cfg.num_experts_per_tok, cfg.hidden_size, inter, dtype=torch.float32,
                     renormalize=name == "mixtral" or cfg.norm_topk_prob)
    with torch.no_grad():
        layer.gate.weight.copy_(block.gate.weight)
        layer.weight_loader(layer.w13, block.experts.gate_up_proj.detach(), ("gate_up", None))  # stacked layout
        layer.weight_loader(layer.w2, block.experts.down_proj.detach(), ("down", None))
    layer.check_loaded()
    x = torch.randn(2, 9, cfg.hidden_size)
    with torch.no_grad():
        want = block(x).reshape(-1, cfg.hidden_size)
    torch.testing.assert_close(layer(x.reshape(-1, cfg.hidden_size)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp,ep,redundant", [(2, 2, 0), (2, 1, 0), (4, 2, 0), (4, 4, 4), (2, 2, 2)])
def test_partials_of_all_ranks_sum_to_the_output(tp: int, ep: int, redundant: int) -> None:
    w = full_weights()
    ref = reference_output()
    parts = [make_layer(w, tp_rank=r, tp_size=tp, ep_size=ep, redundant=redundant).forward_partial(w["x"])
             for r in range(tp)]
    torch.testing.assert_close(sum(parts), ref, rtol=1e-5, atol=1e-5)


def test_shards_hold_their_slice_of_their_experts() -> None:
    w = full_weights()
    layer = make_layer(w, tp_rank=3, tp_size=4, ep_size=2)  # ep_rank 1, etp_rank 1
    assert (layer.ep_rank, layer.etp_rank) == (1, 1)
    assert layer.local_experts() == (4, 5, 6, 7)
    n = INTER // 2
    assert layer.w13.shape == (4, 2 * n, H) and layer.w2.shape == (4, H, n)
    torch.testing.assert_close(layer.w13[1, :n], w["w1"][5][n:])
    torch.testing.assert_close(layer.w13[1, n:], w["w3"][5][n:])
    torch.testing.assert_close(layer.w2[1], w["w2"][5][:, n:])


def test_missing_expert_weights_are_reported() -> None:
    layer = FusedMoE(E, K, H, INTER, renormalize=True, dtype=torch.float32)
    w = full_weights()
    for e in range(E - 1):
        layer.weight_loader(layer.w13, w["w1"][e], ("gate", e))
        layer.weight_loader(layer.w13, w["w3"][e], ("up", e))
        layer.weight_loader(layer.w2, w["w2"][e], ("down", e))
    with pytest.raises(ValueError, match="lacks expert weights"):
        layer.check_loaded()


def test_expert_load_and_replicas_share_tokens() -> None:
    w = full_weights()
    layer = make_layer(w, redundant=E)  # every expert twice, on one rank
    out = layer(w["x"])
    torch.testing.assert_close(out, reference_output(), rtol=1e-5, atol=1e-5)
    _, ids = select_experts(layer.gate(w["x"]), K, True)
    load = layer.take_expert_load()
    assert load.tolist() == torch.bincount(ids.reshape(-1), minlength=E).tolist()
    slots = layer._physical_slots(ids)
    for t in range(T):  # replica t % R of the chosen expert: replicas share its tokens evenly
        for j in range(K):
            reps = layer.placement.replicas(int(ids[t, j]))
            assert len(reps) == 2 and int(slots[t, j]) == reps[t % 2]
    assert layer.take_expert_load().sum() == 0


def test_local_rebalance_permutes_slots_and_keeps_output() -> None:
    w = full_weights()
    layer = make_layer(w, redundant=4)
    new = ExpertPlacement(E, 1, [7, 6, 5, 4, 3, 2, 1, 0, 7, 7, 3, 0], epoch=1)
    layer.apply_placement(new)
    assert layer.local_experts() == new.slot_to_expert
    for s, e in enumerate(new.slot_to_expert):
        torch.testing.assert_close(layer.w2[s], w["w2"][e])
    torch.testing.assert_close(layer(w["x"]), reference_output(), rtol=1e-5, atol=1e-5)


def test_layer_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError, match="must divide"):
        FusedMoE(E, K, H, INTER, renormalize=True, dtype=torch.float32, tp_size=4, ep_size=3)
    with pytest.raises(ValueError, match="not divisible"):
        FusedMoE(E, K, H, 25, renormalize=True, dtype=torch.float32, tp_size=2)
    with pytest.raises(ValueError, match="divisible by ep_size"):
        FusedMoE(E, K, H, INTER, renormalize=True, dtype=torch.float32, tp_size=2, ep_size=2,
                 num_redundant_experts=1)
    with pytest.raises(ValueError, match="dispatch"):
        FusedMoE(E, K, H, INTER, renormalize=True, dtype=torch.float32, dispatch="nccl")  # type: ignore[arg-type]
