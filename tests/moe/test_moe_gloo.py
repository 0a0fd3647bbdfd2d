"""Expert parallelism under gloo: FusedMoE and whole MoE models sharded over 2 and 4 ranks (ep x etp)
equal one rank within 1e-5 in both dispatch modes, and moving experts between ranks (rebalancing by
send/recv) leaves the output unchanged. One spawn per world size runs every check."""

from __future__ import annotations

import pytest
import torch

from moe_checks import E, K, T, rank_main, reference_output
from moe_testutil import MoeShardContext, shard_prefill_logits
from proc_utils import run_gloo_ranks

TOL = dict(rtol=1e-5, atol=1e-5)
LAYER_EPS = {2: [2, 1], 4: [4, 2, 1]}  # ep sizes per world (etp = world / ep)
# (ep, dispatch, redundant slots) for whole models; world 4: ep 2 x etp 2 (EP communicator split from TP)
MODEL_CONFIGS = {2: [(2, "allreduce", 0), (2, "all2all", 0), (2, "allreduce", 2), (1, "allreduce", 0)],
                 4: [(2, "all2all", 0)]}
MODEL_NAMES = ("mixtral", "qwen2_moe")


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request: pytest.FixtureRequest, moe_ckpts: dict[str, str]) -> tuple[int, dict[int, dict]]:
    world = request.param
    paths = {n: moe_ckpts[n] for n in MODEL_NAMES}
    return world, run_gloo_ranks(rank_main, world, (LAYER_EPS[world], paths, MODEL_CONFIGS[world]))


def test_fused_moe_ep_matches_single_rank(results: tuple[int, dict[int, dict]]) -> None:
    world, res = results
    ref = reference_output()
    for rank, out in res.items():
        for ep in LAYER_EPS[world]:
            for dispatch in ("allreduce", "all2all"):
                got = torch.tensor(out[f"ep{ep}-{dispatch}"])
                torch.testing.assert_close(got, ref, **TOL, msg=f"rank {rank} ep={ep} {dispatch}")


def test_expert_load_counts_every_routed_pair(results: tuple[int, dict[int, dict]]) -> None:
    world, res = results
    loads = [out[f"ep{ep}-{d}-load"] for out in res.values() for ep in LAYER_EPS[world]
             for d in ("allreduce", "all2all")]
    assert all(load == loads[0] for load in loads)  # the same routing on every rank and mode
    assert len(loads[0]) == E and sum(loads[0]) == T * K


def test_rebalance_moves_experts_and_keeps_output(results: tuple[int, dict[int, dict]]) -> None:
    world, res = results
    ref = reference_output()
    for ep in [e for e in LAYER_EPS[world] if e > 1]:
        tables = res[0][f"ep{ep}-tables"]
        assert len(set(tables)) == len(tables), f"each rebalance changed the table: {tables}"
        assert tables[1].count(5) >= 2, f"hot expert 5 got a replica: {tables[1]}"
        for rank, out in res.items():
            assert out[f"ep{ep}-tables"] == tables
            assert out[f"ep{ep}-slots-ok"], f"rank {rank}: a slot holds the wrong expert's weights"
            for i, step in enumerate(out[f"ep{ep}-rebalance"]):
                torch.testing.assert_close(torch.tensor(step), ref, **TOL, msg=f"rank {rank} ep={ep} step {i}")


def test_moe_model_ep_matches_single_rank(results: tuple[int, dict[int, dict]], moe_ckpts: dict[str, str]) -> None:
    world, res = results
    for name in MODEL_NAMES:
        ref = shard_prefill_logits(moe_ckpts[name], MoeShardContext(dtype=torch.float32, device=torch.device("cpu")))
        for rank, out in res.items():
            for ep, dispatch, redundant in MODEL_CONFIGS[world]:
                key = f"{name}-ep{ep}-{dispatch}-r{redundant}"
                if redundant:
                    assert out[key + "-moves"] > 0, f"{key}: rebalancing moved no expert"
                for suffix in ("", "-rebalanced") if redundant else ("",):
                    for got, want in zip(out[key + suffix], ref):
                        torch.testing.assert_close(torch.tensor(got), want, **TOL, msg=f"rank {rank} {key}{suffix}")
