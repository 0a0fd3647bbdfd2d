"""Expert parallelism under gloo: FusedMoE and whole MoE models sharded over 2 and 4 ranks (ep x etp)
equal one rank within 1e-5 in both dispatch modes, and moving experts between ranks (rebalancing by
send/recv) leaves the output unchanged."""

from __future__ import annotations

import pytest
import torch

from moe_checks import E, layer_rank_main, model_rank_main, reference_output
from moe_testutil import MoeShardContext, make_moe_checkpoint, run_ranks, shard_prefill_logits

TOL = dict(rtol=1e-5, atol=1e-5)
LAYER_EPS = {2: [2, 1], 4: [4, 2, 1]}  # ep sizes per world (etp = world / ep)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def layer_results(request: pytest.FixtureRequest) -> tuple[int, dict[int, dict]]:
    world = request.param
    return world, run_ranks(layer_rank_main, world, (LAYER_EPS[world],))


def test_fused_moe_ep_matches_single_rank(layer_results: tuple[int, dict[int, dict]]) -> None:
    world, results = layer_results
    ref = reference_output()
    for rank, out in results.items():
        for ep in LAYER_EPS[world]:
            for dispatch in ("allreduce", "all2all"):
                got = torch.tensor(out[f"ep{ep}-{dispatch}"])
                torch.testing.assert_close(got, ref, **TOL, msg=f"rank {rank} ep={ep} {dispatch}")


def test_expert_load_counts_every_routed_pair(layer_results: tuple[int, dict[int, dict]]) -> None:
    world, results = layer_results
    from moe_checks import K, T

    loads = [out[f"ep{ep}-{d}-load"] for out in results.values() for ep in LAYER_EPS[world]
             for d in ("allreduce", "all2all")]
    assert all(load == loads[0] for load in loads)  # the same routing on every rank and mode
    assert len(loads[0]) == E and sum(loads[0]) == T * K


def test_rebalance_moves_experts_and_keeps_output(layer_results: tuple[int, dict[int, dict]]) -> None:
    world, results = layer_results
    ref = reference_output()
    for ep in [e for e in LAYER_EPS[world] if e > 1]:
        tables = results[0][f"ep{ep}-tables"]
        assert len(set(tables)) == len(tables), f"each rebalance changed the table: {tables}"
        hot_slots = [s for s, e in enumerate(tables[1]) if e in (0, 1)]
        assert len(hot_slots) > 2, "hot experts 0 and 1 got replicas"
        for rank, out in results.items():
            assert out[f"ep{ep}-slots-ok"], f"rank {rank}: a slot holds the wrong expert's weights"
            for i, step in enumerate(out[f"ep{ep}-rebalance"]):
                torch.testing.assert_close(torch.tensor(step), ref, **TOL, msg=f"rank {rank} ep={ep} step {i}")


# -- whole models -------------------------------------------------------------------------------------
MODEL_CONFIGS = {2: [(2, "allreduce", 0), (2, "all2all", 0), (2, "allreduce", 2), (1, "allreduce", 0)],
                 4: [(2, "all2all", 0), (4, "allreduce", 4)]}


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("moe_ep"))
    return {name: make_moe_checkpoint(root, name, seed=i) for i, name in enumerate(["mixtral", "qwen2_moe"])}


@pytest.mark.parametrize("world", [2, 4])
def test_moe_model_ep_matches_single_rank(moe_ckpts: dict[str, str], world: int) -> None:
    configs = MODEL_CONFIGS[world]
    results = run_ranks(model_rank_main, world, (moe_ckpts, configs))
    for name, path in moe_ckpts.items():
        ref = shard_prefill_logits(path, MoeShardContext(dtype=torch.float32, device=torch.device("cpu")))
        for rank, out in results.items():
            for ep, dispatch, redundant in configs:
                key = f"{name}-ep{ep}-{dispatch}-r{redundant}"
                for suffix in ("", "-rebalanced") if redundant else ("",):
                    for got, want in zip(out[key + suffix], ref):
                        torch.testing.assert_close(torch.tensor(got), want, **TOL, msg=f"rank {rank} {key}{suffix}")
