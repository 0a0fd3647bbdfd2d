"""Where each MoE expert lives: logical experts -> physical slots on the EP ranks of one layer.

The coordinator owns one ExpertPlacement per MoE layer. Workers hold a copy of its table and the
weights of their slots; the coordinator feeds it per-expert token counts (from StepResults),
calls `rebalance()` now and then, and sends the new table (with its epoch) in a StepPlan; workers
move expert weights (`FusedMoE.apply_placement`) before they run that step.

    num_experts = 6, ep_size = 2, slots_per_rank = 4 (num_slots = 8: 2 redundant slots)

    physical slot:     0  1  2  3 | 4  5  6  7
    rank:              0  0  0  0 | 1  1  1  1
    slot_to_expert:    0  1  2  3 | 4  5  0  1     initial: experts in order, then replicas of 0, 1
    tokens per expert (0..5): 10 10 10 10 60 10
        rank loads  5 + 5 + 10 + 10 = 30 | 60 + 10 + 5 + 5 = 80          max/mean 1.45
    after rebalance:   0  1  2  4 | 4  5  0  3     hot expert 4 on both ranks
        rank loads  5 + 10 + 10 + 30 = 55 | 30 + 10 + 5 + 10 = 55        max/mean 1.0

Invariants: every expert has >= 1 slot; a token routed to expert e goes to one of e's replicas
(chosen by token index, so replicas share e's tokens evenly); ranks hold the same number of slots.
Load is in tokens (routed (token, expert) pairs); a replica carries its expert's load / replicas.
Pure Python: no torch, safe to import on the coordinator.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def num_experts_of(hf_config: dict[str, Any]) -> int:
    """Routed experts per MoE layer from a config.json dict (0: a dense model)."""
    return int(hf_config.get("num_local_experts") or hf_config.get("num_experts") or 0)


def moe_layers_of(hf_config: dict[str, Any], num_layers: int) -> list[int]:
    """Indices of the MoE layers: all of them (Mixtral), or Qwen's rule: not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0. The coordinator keeps one ExpertPlacement per entry."""
    if num_experts_of(hf_config) == 0:
        return []
    step = int(hf_config.get("decoder_sparse_step") or 1)
    dense = set(hf_config.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


@dataclass(frozen=True, slots=True)
class ExpertMove:
    """Copy expert `expert`'s weights from (src_rank, src_slot) to (dst_rank, dst_slot); local slots."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


class ExpertPlacement:
    """One MoE layer's expert table (immutable) and the load recorded against it (accumulated)."""

    def __init__(self, num_experts: int, ep_size: int, slot_to_expert: Sequence[int], epoch: int = 0) -> None:
        if num_experts < 1 or ep_size < 1:
            raise ValueError(f"need num_experts >= 1 and ep_size >= 1, got {num_experts}, {ep_size}")
        table = tuple(int(e) for e in slot_to_expert)
        if len(table) % ep_size:
            raise ValueError(f"{len(table)} slots do not split evenly over {ep_size} ranks")
        if len(table) < num_experts:
            raise ValueError(f"{len(table)} slots cannot hold {num_experts} experts")
        if any(not 0 <= e < num_experts for e in table) or len(set(table)) != num_experts:
            raise ValueError(f"slot table {table} must name every expert 0..{num_experts - 1} and only those")
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.slot_to_expert = table
        self.epoch = epoch
        self.load = [0.0] * num_experts

    @classmethod
    def initial(cls, num_experts: int, ep_size: int, num_redundant: int = 0) -> ExpertPlacement:
        """Experts in order over the ranks (rank r: a contiguous block), then replicas of 0, 1, ...
        in the redundant slots. num_experts + num_redundant must be a multiple of ep_size."""
        if num_redundant < 0:
            raise ValueError(f"num_redundant must be >= 0, got {num_redundant}")
        num_slots = num_experts + num_redundant
        if num_slots % ep_size:
            raise ValueError(f"num_experts + redundant slots ({num_slots}) must be divisible by ep_size ({ep_size})")
        return cls(num_experts, ep_size, [s % num_experts for s in range(num_slots)])

    # -- the table ----------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.slot_to_expert)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def experts_on_rank(self, rank: int) -> tuple[int, ...]:
        """The expert in each local slot of `rank`."""
        n = self.slots_per_rank
        return self.slot_to_expert[rank * n:(rank + 1) * n]

    def replicas(self, expert: int) -> tuple[int, ...]:
        """Physical slots holding `expert`, ascending (replica i serves tokens t with t % R == i)."""
        return tuple(s for s, e in enumerate(self.slot_to_expert) if e == expert)

    def replica_table(self) -> tuple[tuple[int, ...], ...]:
        """replicas(e) for every expert."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, e in enumerate(self.slot_to_expert):
            out[e].append(s)
        return tuple(tuple(r) for r in out)

    # -- load -----------------------------------------------------------------------------------
    def record_load(self, counts: Sequence[float]) -> None:
        """Adds tokens routed to each logical expert (one step's or one interval's counts)."""
        if len(counts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} counts, got {len(counts)}")
        for e, c in enumerate(counts):
            if c < 0:
                raise ValueError(f"negative load {c} for expert {e}")
            self.load[e] += float(c)

    def rank_loads(self, counts: Sequence[float] | None = None) -> list[float]:
        """Tokens each rank computes under this table (counts default to the recorded load)."""
        counts = self.load if counts is None else counts
        if len(counts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} counts, got {len(counts)}")
        reps = [len(r) for r in self.replica_table()]
        loads = [0.0] * self.ep_size
        for s, e in enumerate(self.slot_to_expert):
            loads[self.rank_of_slot(s)] += counts[e] / reps[e]
        return loads

    def max_over_mean_load(self, counts: Sequence[float] | None = None) -> float:
        """max / mean tokens per rank: 1.0 is perfect balance, ep_size is one rank doing everything."""
        loads = self.rank_loads(counts)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    # -- rebalancing -------------------------------------------------------------------------------
    def rebalance(self, counts: Sequence[float] | None = None, min_gain: float = 0.05) -> ExpertPlacement:
        """A new placement (epoch + 1, load cleared) for `counts` (default: the recorded load).

        1. replicas: every expert gets one slot; the first m spare slots go, one by one, to the expert
           with the most tokens per replica (at most ep_size replicas each), the other spare slots to
           the coldest experts (harmless fillers); every m is tried and the best packing kept;
        2. bin-packing: replicas in decreasing load, each onto the least-loaded rank with a free slot
           that does not hold the expert yet (LPT), then pairwise swaps off the busiest rank while
           they lower the maximum;
        3. bins go to the ranks that already hold most of their experts, and inside a rank an expert
           already there keeps its slot, so few weights move;
        4. unless that lowers max/mean load by more than `min_gain`, the table stays as it is (no churn).
        """
        counts = list(self.load if counts is None else counts)
        if len(counts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} counts, got {len(counts)}")
        if sum(counts) <= 0:
            counts = [1.0] * self.num_experts
        home = [self.experts_on_rank(r) for r in range(self.ep_size)]
        bins = min((_packed(counts, reps, self.ep_size, self.slots_per_rank, home)
                    for reps in _replica_choices(counts, self.num_slots, self.ep_size)),
                   key=lambda b: max(sum(w for w, _ in rank) for rank in b))
        ranked = _match_ranks([[e for _, e in b] for b in bins], home)
        table: list[int] = []
        for r in range(self.ep_size):
            table.extend(_keep_slots(self.experts_on_rank(r), ranked[r]))
        new = ExpertPlacement(self.num_experts, self.ep_size, table, epoch=self.epoch + 1)
        if new.max_over_mean_load(counts) > self.max_over_mean_load(counts) - min_gain:
            return ExpertPlacement(self.num_experts, self.ep_size, self.slot_to_expert, epoch=self.epoch + 1)
        return new

    def moves_to(self, new: ExpertPlacement) -> list[ExpertMove]:
        """The copies that turn this table's weights into `new`'s, in one order every rank agrees on.
        A slot whose expert is already on its rank copies locally; otherwise it receives from a rank
        that holds the expert now, spreading the sends over the replicas."""
        if (new.num_experts, new.ep_size, new.num_slots) != (self.num_experts, self.ep_size, self.num_slots):
            raise ValueError("placements differ in experts, ranks or slots")
        n = self.slots_per_rank
        holders = self.replica_table()
        sends = [0] * self.ep_size
        moves: list[ExpertMove] = []
        for slot, e in enumerate(new.slot_to_expert):
            if self.slot_to_expert[slot] == e:
                continue
            dst = slot // n
            local = [s for s in holders[e] if s // n == dst]
            src = local[0] if local else min(holders[e], key=lambda s: (sends[s // n], s))
            if not local:
                sends[src // n] += 1
            moves.append(ExpertMove(e, src // n, src % n, dst, slot % n))
        return moves

    def __repr__(self) -> str:
        return (f"ExpertPlacement(epoch={self.epoch}, experts={self.num_experts}, ep={self.ep_size}, "
                f"slots={self.slot_to_expert})")


def _replica_choices(counts: Sequence[float], num_slots: int, ep_size: int) -> list[list[int]]:
    """Replica counts with the first m spare slots spent on the hottest experts, for every m."""
    spare = num_slots - len(counts)
    coldest = sorted(range(len(counts)), key=lambda e: (counts[e], e))
    out = []
    for m in range(spare + 1):
        reps = _replica_counts(counts, len(counts) + m, ep_size)
        for i in range(spare - m):  # fillers: one more replica for each of the coldest experts, in turn
            reps[coldest[i % len(coldest)]] += 1
        out.append(reps)
    return out


def _packed(counts: Sequence[float], reps: list[int], num_bins: int, capacity: int,
            home: Sequence[Sequence[int]]) -> list[list[tuple[float, int]]]:
    items = sorted(((counts[e] / reps[e], e) for e in range(len(counts)) for _ in range(reps[e])),
                   key=lambda it: (-it[0], it[1]))
    bins = _pack(items, num_bins, capacity, home)
    _improve(bins)
    return bins


def _replica_counts(counts: Sequence[float], num_slots: int, ep_size: int) -> list[int]:
    reps = [1] * len(counts)
    heap = [(-c, e) for e, c in enumerate(counts)]  # max tokens per replica first
    heapq.heapify(heap)
    capped: list[int] = []
    for _ in range(num_slots - len(counts)):
        while heap and reps[heap[0][1]] >= ep_size:  # a second replica on one rank buys nothing
            capped.append(heapq.heappop(heap)[1])
        if not heap:  # more slots than experts x ranks: replicate anyway
            heap = [(-counts[e] / reps[e], e) for e in capped]
            heapq.heapify(heap)
            capped = []
            ep_size = len(counts) * num_slots  # lift the cap
        _, e = heapq.heappop(heap)
        reps[e] += 1
        heapq.heappush(heap, (-counts[e] / reps[e], e))
    return reps


def _pack(items: list[tuple[float, int]], num_bins: int, capacity: int,
          home: Sequence[Sequence[int]] = ()) -> list[list[tuple[float, int]]]:
    """LPT with capacities; an expert goes back to a bin in `home` (its rank now) when that costs at
    most its own weight over the least-loaded choice (fewer moves; _improve trims the rest)."""
    bins: list[list[tuple[float, int]]] = [[] for _ in range(num_bins)]
    loads = [0.0] * num_bins
    for w, e in items:
        free = [b for b in range(num_bins) if len(bins[b]) < capacity]
        fresh = [b for b in free if all(x != e for _, x in bins[b])] or free
        b = min(fresh, key=lambda i: (loads[i], i))
        stay = [i for i in fresh if i < len(home) and e in home[i] and loads[i] <= loads[b] + w]
        if stay:
            b = min(stay, key=lambda i: (loads[i], i))
        bins[b].append((w, e))
        loads[b] += w
    return bins


def _improve(bins: list[list[tuple[float, int]]], max_rounds: int = 1000) -> None:
    """Swap one replica of the busiest bin with one of another bin while that lowers the pair's max."""
    loads = [sum(w for w, _ in b) for b in bins]
    for _ in range(max_rounds):
        hi = max(range(len(bins)), key=lambda i: (loads[i], -i))
        best: tuple[float, int, int, int] | None = None
        for i, (wa, ea) in enumerate(bins[hi]):
            for lo in range(len(bins)):
                if lo == hi:
                    continue
                for j, (wb, eb) in enumerate(bins[lo]):
                    if wb >= wa or ea == eb:
                        continue
                    if any(e == eb for _, e in bins[hi]) or any(e == ea for _, e in bins[lo]):
                        continue
                    new_max = max(loads[hi] - wa + wb, loads[lo] - wb + wa)
                    if new_max < loads[hi] - 1e-12 and (best is None or new_max < best[0]):
                        best = (new_max, i, lo, j)
        if best is None:
            return
        _, i, lo, j = best
        (wa, ea), (wb, eb) = bins[hi][i], bins[lo][j]
        bins[hi][i], bins[lo][j] = (wb, eb), (wa, ea)
        loads[hi] += wb - wa
        loads[lo] += wa - wb


def _match_ranks(bins: list[list[int]], current: list[Sequence[int]]) -> list[list[int]]:
    """Gives each bin to a rank (greedily, most experts already there first): bins are interchangeable."""
    pairs = sorted(((-sum(min(b.count(e), list(cur).count(e)) for e in set(b)), bi, r)
                    for bi, b in enumerate(bins) for r, cur in enumerate(current)))
    out: list[list[int] | None] = [None] * len(current)
    used: set[int] = set()
    for _, bi, r in pairs:
        if bi not in used and out[r] is None:
            out[r] = bins[bi]
            used.add(bi)
    return [b for b in out if b is not None]


def _keep_slots(old: Sequence[int], experts: list[int]) -> list[int]:
    """Orders `experts` into a rank's slots keeping each one that is already in a slot there."""
    remaining = list(experts)
    slots: list[int | None] = [None] * len(old)
    for s, e in enumerate(old):
        if e in remaining:
            remaining.remove(e)
            slots[s] = e
    fill = iter(sorted(remaining))
    return [e if e is not None else next(fill) for e in slots]
