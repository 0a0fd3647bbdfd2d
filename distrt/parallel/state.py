"""The rank grid for tensor (tp) × pipeline (pp) × expert (ep) parallelism.

The world holds ``pp_size * tp_size`` ranks; ``rank = pp_rank * tp_size + tp_rank``, so the ranks of
one pipeline stage are contiguous (one node holds whole stages when tp_size divides its GPU count).

Expert parallelism lives inside the TP group of a stage and never grows the world: a MoE layer
splits its stage's ``tp_size`` ranks into ``ep_size`` expert shards × ``etp_size = tp_size //
ep_size`` tensor shards of each expert (TensorRT-LLM's ``moe_ep × moe_tp = tp``). Attention stays
tensor parallel, so ``ep_size > tp_size`` (which needs data-parallel attention) is rejected.
Inside a TP group ``tp_rank = etp_rank * ep_size + ep_rank``: EP groups are contiguous blocks.

    tp=4, pp=2, ep=2 (so etp=2), world = 8

                      tp_rank:   0     1     2     3
                              +-----------+-----------+
        pp_rank 0 (stage 0)   |  0     1  |  2     3  |   TP group (0, 1, 2, 3)
                              +-----------+-----------+
        pp_rank 1 (stage 1)   |  4     5  |  6     7  |   TP group (4, 5, 6, 7)
                              +-----------+-----------+
        EP groups  (boxes: ep_size contiguous ranks):  (0, 1) (2, 3) (4, 5) (6, 7)
        ETP groups (same ep_rank, stride ep_size):     (0, 2) (1, 3) (4, 6) (5, 7)
        PP groups  (columns):                          (0, 4) (1, 5) (2, 6) (3, 7)

ep_size == 1: every rank holds all experts, each sliced tp ways (ETP group == TP group).
ep_size == tp_size: each rank holds whole experts, 1/ep of them (EP group == TP group).

Group ranks are positions in the tuples above; every ``*_groups()`` listing is the same on every
rank, in the same order, as creating sub-communicators collectively requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GroupKind = Literal["tp", "pp", "ep", "etp"]
Groups = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class GroupInfo:
    """This rank's place in one process group: its group rank, the size, members' global ranks."""

    rank: int
    size: int
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.size < 1 or len(self.ranks) != self.size:
            raise ValueError(f"group of size {self.size} lists {len(self.ranks)} ranks: {self.ranks}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"group rank {self.rank} outside [0, {self.size})")
        if len(set(self.ranks)) != self.size:
            raise ValueError(f"group lists a rank twice: {self.ranks}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    def global_rank_of(self, group_rank: int) -> int:
        if not 0 <= group_rank < self.size:
            raise ValueError(f"group rank {group_rank} outside [0, {self.size})")
        return self.ranks[group_rank]


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class ParallelLayout:
    """The grid's shape, the same on every rank; lists the global ranks of every group."""

    tp_size: int = 1
    pp_size: int = 1
    ep_size: int = 1

    def __post_init__(self) -> None:
        _check_size("tp_size", self.tp_size)
        _check_size("pp_size", self.pp_size)
        _check_size("ep_size", self.ep_size)
        if self.tp_size % self.ep_size != 0:
            raise ValueError(
                f"ep_size ({self.ep_size}) must divide tp_size ({self.tp_size}): experts are "
                "spread over the TP ranks of one pipeline stage (ep_size > tp_size would need "
                "data-parallel attention, which distrt does not do)"
            )

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size

    @property
    def etp_size(self) -> int:
        return self.tp_size // self.ep_size

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        if not (0 <= pp_rank < self.pp_size and 0 <= tp_rank < self.tp_size):
            raise ValueError(f"(pp_rank={pp_rank}, tp_rank={tp_rank}) outside pp={self.pp_size} × tp={self.tp_size}")
        return pp_rank * self.tp_size + tp_rank

    def tp_groups(self) -> Groups:
        return tuple(
            tuple(self.global_rank(pp, tp) for tp in range(self.tp_size)) for pp in range(self.pp_size)
        )

    def pp_groups(self) -> Groups:
        return tuple(
            tuple(self.global_rank(pp, tp) for pp in range(self.pp_size)) for tp in range(self.tp_size)
        )

    def ep_groups(self) -> Groups:
        return tuple(
            tuple(self.global_rank(pp, etp * self.ep_size + ep) for ep in range(self.ep_size))
            for pp in range(self.pp_size)
            for etp in range(self.etp_size)
        )

    def etp_groups(self) -> Groups:
        return tuple(
            tuple(self.global_rank(pp, etp * self.ep_size + ep) for etp in range(self.etp_size))
            for pp in range(self.pp_size)
            for ep in range(self.ep_size)
        )

    def groups(self, kind: GroupKind) -> Groups:
        listings = {"tp": self.tp_groups, "pp": self.pp_groups, "ep": self.ep_groups, "etp": self.etp_groups}
        if kind not in listings:
            raise ValueError(f"unknown group kind {kind!r}; expected one of {sorted(listings)}")
        return listings[kind]()

    def group_info(self, kind: GroupKind, world_rank: int) -> GroupInfo:
        self._check_world_rank(world_rank)
        for ranks in self.groups(kind):
            if world_rank in ranks:
                return GroupInfo(rank=ranks.index(world_rank), size=len(ranks), ranks=ranks)
        raise AssertionError(f"{kind} groups do not cover rank {world_rank}")

    def state(self, world_rank: int) -> ParallelState:
        self._check_world_rank(world_rank)
        return ParallelState(
            world_rank=world_rank,
            world_size=self.world_size,
            tp=self.group_info("tp", world_rank),
            pp=self.group_info("pp", world_rank),
            ep=self.group_info("ep", world_rank),
            etp=self.group_info("etp", world_rank),
            layout=self,
        )

    def _check_world_rank(self, world_rank: int) -> None:
        if isinstance(world_rank, bool) or not isinstance(world_rank, int):
            raise ValueError(f"world_rank must be an int, got {type(world_rank).__name__}")
        if not 0 <= world_rank < self.world_size:
            raise ValueError(
                f"world_rank {world_rank} outside [0, {self.world_size}) for "
                f"tp={self.tp_size} × pp={self.pp_size}"
            )


@dataclass(frozen=True)
class ParallelState:
    """One rank's view of the grid: which tp/pp/ep/etp group it is in and where."""

    world_rank: int
    world_size: int
    tp: GroupInfo
    pp: GroupInfo
    ep: GroupInfo
    etp: GroupInfo
    layout: ParallelLayout


def make_parallel_state(world_rank: int, tp_size: int = 1, pp_size: int = 1, ep_size: int = 1) -> ParallelState:
    return ParallelLayout(tp_size=tp_size, pp_size=pp_size, ep_size=ep_size).state(world_rank)
