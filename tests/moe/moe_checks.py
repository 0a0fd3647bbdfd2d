"""Per-rank work for the gloo tests (spawned processes import this module), and its single-process
references: FusedMoE layers loaded from one seeded set of per-expert weights."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))):
    if p not in sys.path:
        sys.path.insert(0, p)

from distrt.layers.moe import FusedMoE  # noqa: E402

E, K, H, INTER, T = 8, 2, 32, 24, 37


def full_weights(seed: int = 0) -> dict[str, Any]:
    """HF-layout weights of one layer: router [E, H], w1/w3 [E, I, H], w2 [E, H, I]; input x [T, H]."""
    g = torch.Generator().manual_seed(seed)
    return dict(gate=torch.randn(E, H, generator=g), w1=torch.randn(E, INTER, H, generator=g) * 0.2,
                w3=torch.randn(E, INTER, H, generator=g) * 0.2, w2=torch.randn(E, H, INTER, generator=g) * 0.2,
                x=torch.randn(T, H, generator=g))


def load_layer(layer: FusedMoE, w: dict[str, Any]) -> FusedMoE:
    with torch.no_grad():
        layer.gate.weight.copy_(w["gate"])
        for e in range(E):
            layer.weight_loader(layer.w13, w["w1"][e], ("gate", e))
            layer.weight_loader(layer.w13, w["w3"][e], ("up", e))
            layer.weight_loader(layer.w2, w["w2"][e], ("down", e))
    layer.check_loaded()
    return layer


def make_layer(w: dict[str, Any], *, tp_rank: int = 0, tp_size: int = 1, ep_size: int = 1, comm: Any = None,
               ep_comm: Any = None, redundant: int = 0, dispatch: str = "allreduce") -> FusedMoE:
    layer = FusedMoE(E, K, H, INTER, renormalize=True, dtype=torch.float32, tp_rank=tp_rank, tp_size=tp_size,
                     ep_size=ep_size, tp_comm=comm, ep_comm=ep_comm, num_redundant_experts=redundant,
                     dispatch=dispatch)  # type: ignore[arg-type]
    return load_layer(layer, w)


def reference_output(seed: int = 0) -> torch.Tensor:
    w = full_weights(seed)
    return make_layer(w)(w["x"])


def skewed_counts(hot: tuple[int, ...], total: int = 10_000) -> list[int]:
    """Most tokens on the `hot` experts, a trickle on the rest."""
    cold = [e for e in range(E) if e not in hot]
    counts = [0] * E
    for e in hot:
        counts[e] = int(total * 0.85 / len(hot))
    for e in cold:
        counts[e] = int(total * 0.15 / len(cold))
    return counts


def _slot_weights_ok(layer: FusedMoE, w: dict[str, Any]) -> bool:
    n = layer.inter_per_rank
    lo = layer.etp_rank * n
    for s, e in enumerate(layer.local_experts()):
        want13 = torch.cat([w["w1"][e][lo:lo + n], w["w3"][e][lo:lo + n]])
        if not (torch.equal(layer.w13[s], want13) and torch.equal(layer.w2[s], w["w2"][e][:, lo:lo + n])):
            return False
    return True


def rank_main(rank: int, world: int, init: str, eps: list[int], paths: dict[str, str],
              configs: list[tuple[int, str, int]], q: Any) -> None:
    """One spawned rank: the layer checks, then the model checks; puts {check: result} on q."""
    from distrt.parallel.comm_torch_dist import TorchDistComm

    torch.set_num_threads(1)  # several ranks share a few test cores
    comm = TorchDistComm.create(rank, world, init)
    try:
        out = layer_checks(rank, world, comm, eps)
        out.update(model_checks(rank, world, comm, paths, configs))
        q.put((rank, out))
    finally:
        comm.destroy()


def layer_checks(rank: int, world: int, comm: Any, eps: list[int]) -> dict[str, Any]:
    """For each ep in eps and both dispatch modes: the layer's output; then, with ep redundant slots,
    the output before and after two rebalances (weights moved by send/recv)."""
    out: dict[str, Any] = {}
    w = full_weights()
    for ep in eps:
        etp = world // ep
        ep_comm = comm if ep == world else comm.split([[a * ep + r for r in range(ep)] for a in range(etp)])
        for dispatch in ("allreduce", "all2all"):
            layer = make_layer(w, tp_rank=rank, tp_size=world, ep_size=ep, comm=comm, ep_comm=ep_comm,
                               dispatch=dispatch)
            out[f"ep{ep}-{dispatch}"] = layer(w["x"]).tolist()
            out[f"ep{ep}-{dispatch}-load"] = layer.take_expert_load().tolist()
        if ep == 1:
            continue
        layer = make_layer(w, tp_rank=rank, tp_size=world, ep_size=ep, comm=comm, ep_comm=ep_comm, redundant=ep)
        steps = [layer(w["x"]).tolist()]
        tables = [layer.placement.slot_to_expert]
        for hot in ((5,), (1, 4)):
            new = layer.placement.rebalance(skewed_counts(hot))
            layer.apply_placement(new)
            steps.append(layer(w["x"]).tolist())
            layer.dispatch = "all2all"
            steps.append(layer(w["x"]).tolist())
            layer.dispatch = "allreduce"
            tables.append(layer.placement.slot_to_expert)
        out[f"ep{ep}-rebalance"] = steps
        out[f"ep{ep}-tables"] = tables
        out[f"ep{ep}-slots-ok"] = _slot_weights_ok(layer, w)
    return out


def model_checks(rank: int, world: int, comm: Any, paths: dict[str, str],
                 configs: list[tuple[int, str, int]]) -> dict[str, Any]:
    """Prefill logits of each checkpoint under each (ep, dispatch, redundant slots) with tp = world;
    with redundant slots, again after rebalancing every MoE layer to the load that prefill recorded."""
    from moe_testutil import MoeShardContext, shard_prefill_logits

    out: dict[str, Any] = {}
    for name, path in paths.items():
        for ep, dispatch, redundant in configs:
            ctx = MoeShardContext(dtype=torch.float32, device=torch.device("cpu"), tp_rank=rank, tp_size=world,
                                  tp_comm=comm, ep_size=ep, num_redundant_experts=redundant,
                                  moe_dispatch=dispatch)
            key = f"{name}-ep{ep}-{dispatch}-r{redundant}"
            logits, runner = shard_prefill_logits(path, ctx, return_runner=True)
            out[key] = [t.tolist() for t in logits]
            if redundant:
                model = runner.model
                moves = 0
                for i, counts in model.take_expert_load().items():
                    old = model.moe_layers()[i].placement
                    new = old.rebalance(counts.tolist())
                    moves += len(old.moves_to(new))
                    model.apply_expert_placement(i, new)
                out[key + "-moves"] = moves
                again = shard_prefill_logits(path, ctx, runner=runner)
                out[key + "-rebalanced"] = [t.tolist() for t in again]
    return out
