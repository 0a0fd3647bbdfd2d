"""A MoE layer's routed experts: router, top-k, experts sharded over EP x ETP ranks, and the combine.

Attention stays tensor parallel across the EP group (EP lives inside the TP group and never grows
the world, parallel/state.py): every rank keeps its TP slice of the KV cache and the coordinator
schedules one batch per stage. Data-parallel attention would need one KV pool and batch per DP rank,
which the scheduler does not do. So after attention's all-reduce every rank of the TP group holds
the same activations [T, H], and its ranks are split ep_size x etp_size:

    tp_rank = etp_rank * ep_size + ep_rank
    EP shard ep_rank  holds physical slots [ep_rank * S_local, (ep_rank + 1) * S_local)
                      (S_local = num_slots / ep_size; a slot holds one logical expert, see
                       parallel/experts.py: hot experts can have several slots)
    ETP shard         holds rows [etp_rank * I/etp, ...) of each expert's gate/up and the
                      matching columns of its down projection

    w13 [S_local, 2*I/etp, H]   (this rank's gate slice, then its up slice)
    w2  [S_local, H, I/etp]

Every rank returns a partial [T, H]; the sum over the TP group is the layer's output, so the
caller's one all-reduce (which a shared expert's partial sum joins) finishes it.

Two dispatch modes, equal up to rounding:
  "allreduce" (default): every rank runs its slots on ALL tokens routed to them (the activations
      are already replicated, so nothing needs dispatching); zeros elsewhere. The all-reduce of
      [T, H] that a dense TP MLP ends with anyway combines. No host sync: CUDA-graph capturable.
  "all2all": EP rank r takes token chunk r, sends each (token, expert) pair to the EP rank holding
      its slot (comm.all_to_all, uneven splits), gets the weighted expert outputs back and writes
      its chunk of the partial; the same TP all-reduce then re-replicates the output for the next
      attention. Same expert compute per rank, but extra traffic while attention is tensor
      parallel: it is the dispatch a data-parallel-attention layout would keep (and drop the
      all-reduce). It reads split sizes on the host, so while a CUDA graph is being captured the
      layer takes the all-reduce path (decode graphs) and all2all runs in eager steps.

Routing counts per logical expert accumulate in `expert_load` (int64 [E], on the device) for the
coordinator's placement; `take_expert_load()` reads and clears them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distrt.kernels.fused_moe import fused_moe_op
from distrt.layers.linear import materialize, narrow
from distrt.parallel.experts import ExpertPlacement

Dispatch = Literal["allreduce", "all2all"]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax (fp32) over the router logits, top-k, optionally renormalised to sum to 1 (Mixtral;
    Qwen's norm_topk_prob). Returns (weights fp32 [T, k], expert ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class ReplicatedLinear(nn.Module):
    """The router: small, the same full weight on every rank."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FusedMoE(nn.Module):
    """One MoE layer's router and routed experts on this rank (see the module docstring)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1, ep_size: int = 1,
                 tp_comm: Any = None, ep_comm: Any = None, num_redundant_experts: int = 0,
                 dispatch: Dispatch = "allreduce") -> None:
        super().__init__()
        if tp_size % ep_size:
            raise ValueError(f"expert_parallel_size ({ep_size}) must divide tensor_parallel_size ({tp_size})")
        etp = tp_size // ep_size
        if intermediate_size % etp:
            raise ValueError(f"expert intermediate size ({intermediate_size}) is not divisible by the expert "
                             f"tensor parallel size tp/ep = {etp}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts = {num_experts}]")
        if dispatch not in ("allreduce", "all2all"):
            raise ValueError(f"MoE dispatch must be 'allreduce' or 'all2all', got {dispatch!r}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.tp_rank, self.tp_size, self.tp_comm = tp_rank, tp_size, tp_comm
        self.ep_size, self.etp_size = ep_size, etp
        self.ep_rank, self.etp_rank = tp_rank % ep_size, tp_rank // ep_size
        self.ep_comm = ep_comm
        self.dispatch: Dispatch = dispatch
        self.placement = ExpertPlacement.initial(num_experts, ep_size, num_redundant_experts)
        self.slots_per_rank = self.placement.slots_per_rank
        self.inter_per_rank = intermediate_size // etp
        self.gate = ReplicatedLinear(hidden_size, num_experts, dtype)
        self.w13 = nn.Parameter(torch.empty(self.slots_per_rank, 2 * self.inter_per_rank, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.slots_per_rank, hidden_size, self.inter_per_rank, dtype=dtype),
                               requires_grad=False)
        self.w13.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # replica i of expert e (physical slot replicas[e, i], i < num_replicas[e]) serves tokens t % R == i;
        # fixed shapes, updated in place, so captured CUDA graphs see a new placement
        max_replicas = self.placement.num_slots - num_experts + 1
        self.register_buffer("replicas", torch.zeros(num_experts, max_replicas, dtype=torch.int64), persistent=False)
        self.register_buffer("num_replicas", torch.ones(num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self._write_tables()
        self._loaded: set[tuple[int, str]] = set()

    # -- placement ------------------------------------------------------------------------------
    def local_experts(self) -> tuple[int, ...]:
        """The logical expert in each of this rank's slots."""
        return self.placement.experts_on_rank(self.ep_rank)

    def holds(self, expert: int) -> bool:
        return expert in self.local_experts()

    def _write_tables(self) -> None:
        reps = self.placement.replica_table()
        table = torch.tensor([list(r) + [r[0]] * (self.replicas.shape[1] - len(r)) for r in reps], dtype=torch.int64)
        self.replicas.copy_(table)
        self.num_replicas.copy_(torch.tensor([len(r) for r in reps], dtype=torch.int64))

    @torch.no_grad()
    def apply_placement(self, new: ExpertPlacement, comm: Any = None) -> None:
        """Collective over the TP group (`comm`, default tp_comm): moves expert weights so this rank's
        slots hold `new`'s experts. Each ETP slice travels inside its EP group; weights are written
        in place (same storage), so CUDA graphs stay valid."""
        moves = self.placement.moves_to(new)
        comm = comm if comm is not None else self.tp_comm
        base = self.etp_rank * self.ep_size  # tp rank of EP rank 0 in this rank's EP group
        staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for mv in moves:  # the same order on every rank: matched send/recv pairs cannot deadlock
            if mv.src_rank == mv.dst_rank:
                if mv.dst_rank == self.ep_rank:
                    staged[mv.dst_slot] = (self.w13[mv.src_slot].clone(), self.w2[mv.src_slot].clone())
            elif mv.src_rank == self.ep_rank:
                comm.send(self.w13[mv.src_slot], base + mv.dst_rank)
                comm.send(self.w2[mv.src_slot], base + mv.dst_rank)
            elif mv.dst_rank == self.ep_rank:
                a = comm.recv(self.w13.shape[1:], self.w13.dtype, base + mv.src_rank)
                b = comm.recv(self.w2.shape[1:], self.w2.dtype, base + mv.src_rank)
                staged[mv.dst_slot] = (a.to(self.w13.device), b.to(self.w2.device))
        for slot, (a, b) in staged.items():  # after every read of the old weights
            self.w13[slot].copy_(a)
            self.w2[slot].copy_(b)
        self.placement = new
        self._write_tables()

    # -- weights --------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
        """shard_id: ("gate" | "up" | "down", expert) for one HF expert matrix ([I, H] or [H, I]), or
        ("gate_up" | "down", None) for all experts stacked ([E, 2I, H] / [E, H, I], transformers 5)."""
        part, expert = shard_id
        n = self.inter_per_rank
        start = self.etp_rank * n
        experts = range(self.num_experts) if expert is None else (expert,)
        full = materialize(loaded) if expert is None else None
        for e in experts:
            slots = [s for s, x in enumerate(self.local_experts()) if x == e]
            if not slots:
                continue
            src = loaded if full is None else full[e]
            if part in ("gate", "up"):
                pieces = [(0 if part == "gate" else n, narrow(src, 0, start, n))]
            elif part == "gate_up":
                pieces = [(0, src.narrow(0, start, n)), (n, src.narrow(0, self.intermediate_size + start, n))]
            elif part == "down":
                pieces = [(None, narrow(src, 1, start, n))]
            else:
                raise ValueError(f"unknown expert weight part {part!r}")
            for offset, piece in pieces:
                for s in slots:
                    dst = param.data[s] if offset is None else param.data[s].narrow(0, offset, n)
                    if tuple(dst.shape) != tuple(piece.shape):
                        raise ValueError(f"expert {e} {part}: checkpoint slice {tuple(piece.shape)} != {tuple(dst.shape)}")
                    dst.copy_(piece)
            for p in (("gate", "up") if part == "gate_up" else (part,)):
                self._loaded.add((e, p))

    def check_loaded(self) -> None:
        """Raises unless every local slot's expert got its gate, up and down weights."""
        missing = sorted({(e, p) for e in self.local_experts() for p in ("gate", "up", "down")} - self._loaded)
        if missing:
            raise ValueError(f"MoE layer lacks expert weights (expert, part): {missing[:6]}")

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (the same on every TP rank) -> the layer's output [T, H], reduced over the TP group."""
        out = self.forward_partial(x)
        if self.tp_size > 1:
            out = self.tp_comm.all_reduce(out)
        return out

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output: the TP group's sum of these is the layer's output."""
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)  # [T, k] each
        self.expert_load.scatter_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        slots = self._physical_slots(ids)  # [T, k]
        if self.dispatch == "all2all" and self.ep_size > 1 and not _capturing(x):
            return self._all2all(x, weights, slots)
        local = slots - self.ep_rank * self.slots_per_rank
        local = torch.where((local >= 0) & (local < self.slots_per_rank), local, -1)  # -1: another rank's
        return fused_moe_op(x, self.w13, self.w2, weights, local)

    def _physical_slots(self, ids: torch.Tensor) -> torch.Tensor:
        tok = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)  # [T, 1]
        replica = tok % self.num_replicas[ids]  # [T, k]
        return self.replicas[ids, replica]

    def _all2all(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        comm = self.ep_comm if self.ep_comm is not None else self.tp_comm
        assert comm is not None and comm.size == self.ep_size, "all2all dispatch needs the EP communicator"
        num_tokens, hidden = x.shape
        lo = self.ep_rank * num_tokens // self.ep_size
        hi = (self.ep_rank + 1) * num_tokens // self.ep_size
        k = self.top_k
        flat_slot = slots[lo:hi].reshape(-1)  # [n*k]
        dest = flat_slot // self.slots_per_rank
        order = torch.sort(dest, stable=True).indices  # pairs grouped by destination rank
        tok = order // k  # chunk row of each sent pair
        send_counts = torch.bincount(dest, minlength=self.ep_size).tolist()
        x_send = x[lo:hi][tok]  # [n*k, H]
        # (local slot, weight) as fp32 rows: slot ids < 2^24 are exact
        meta_send = torch.stack([(flat_slot[order] % self.slots_per_rank).float(),
                                 weights[lo:hi].reshape(-1)[order]], dim=1)  # [n*k, 2]
        x_recv = comm.all_to_all(list(x_send.split(send_counts)))
        recv_counts = [t.shape[0] for t in x_recv]
        meta_recv = torch.cat(comm.all_to_all(list(meta_send.split(send_counts)), [(c, 2) for c in recv_counts]))
        y = fused_moe_op(torch.cat(x_recv), self.w13, self.w2, meta_recv[:, 1:].contiguous(),
                         meta_recv[:, :1].long())  # [m, H], weighted
        y_back = torch.cat(comm.all_to_all(list(y.split(recv_counts)), [(c, hidden) for c in send_counts]))
        out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
        out[lo:hi].index_put_((tok,), y_back.float(), accumulate=True)  # (index_add_ crawls on busy CPUs)
        return out.to(x.dtype)

    def take_expert_load(self) -> torch.Tensor:
        """Tokens routed to each logical expert since the last call (int64 [E], on the host); clears."""
        out = self.expert_load.to("cpu", copy=True)
        self.expert_load.zero_()
        return out
