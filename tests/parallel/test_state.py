"""The rank grid: exact group listings and each rank's GroupInfo."""

from __future__ import annotations

import dataclasses

import pytest

from distrt.parallel.state import GroupInfo, ParallelLayout, make_parallel_state


def test_tp2_pp2_groups() -> None:
    layout = ParallelLayout(tp_size=2, pp_size=2)
    assert layout.world_size == 4
    assert layout.tp_groups() == ((0, 1), (2, 3))
    assert layout.pp_groups() == ((0, 2), (1, 3))
    assert layout.ep_groups() == ((0,), (1,), (2,), (3,))
    assert layout.etp_groups() == ((0, 1), (2, 3))


def test_tp2_pp2_states() -> None:
    s = make_parallel_state(3, tp_size=2, pp_size=2)
    assert (s.world_rank, s.world_size) == (3, 4)
    assert s.tp == GroupInfo(rank=1, size=2, ranks=(2, 3))
    assert s.pp == GroupInfo(rank=1, size=2, ranks=(1, 3))
    assert s.tp.is_last and not s.tp.is_first and s.pp.is_last
    s1 = make_parallel_state(1, tp_size=2, pp_size=2)
    assert s1.tp == GroupInfo(rank=1, size=2, ranks=(0, 1))
    assert s1.pp == GroupInfo(rank=0, size=2, ranks=(1, 3))
    assert s1.pp.is_first and s1.pp.global_rank_of(1) == 3 and s1.pp.global_rank == 1


def test_tp4() -> None:
    layout = ParallelLayout(tp_size=4)
    assert layout.tp_groups() == ((0, 1, 2, 3),)
    assert layout.pp_groups() == ((0,), (1,), (2,), (3,))
    for r in range(4):
        s = layout.state(r)
        assert s.tp == GroupInfo(rank=r, size=4, ranks=(0, 1, 2, 3))
        assert s.pp == GroupInfo(rank=0, size=1, ranks=(r,))
        assert s.pp.is_first and s.pp.is_last


def test_ep_equal_tp_is_the_tp_group() -> None:
    layout = ParallelLayout(tp_size=4, pp_size=2, ep_size=4)
    assert layout.ep_groups() == layout.tp_groups() == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert layout.etp_groups() == tuple((r,) for r in range(8))
    assert make_parallel_state(6, 4, 2, 4).ep == GroupInfo(rank=2, size=4, ranks=(4, 5, 6, 7))


def test_ep_inside_tp() -> None:
    layout = ParallelLayout(tp_size=4, pp_size=2, ep_size=2)
    assert layout.etp_size == 2
    assert layout.ep_groups() == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.etp_groups() == ((0, 2), (1, 3), (4, 6), (5, 7))
    s = layout.state(6)
    assert s.ep == GroupInfo(rank=0, size=2, ranks=(6, 7))
    assert s.etp == GroupInfo(rank=1, size=2, ranks=(4, 6))
    assert s.tp.rank == s.etp.rank * layout.ep_size + s.ep.rank


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (4, 3, 2), (8, 2, 4), (6, 1, 3)])
def test_every_listing_partitions_the_world(tp: int, pp: int, ep: int) -> None:
    layout = ParallelLayout(tp, pp, ep)
    for kind in ("tp", "pp", "ep", "etp"):
        groups = layout.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size)), kind
    for r in range(layout.world_size):
        s = layout.state(r)
        assert s.tp.global_rank == s.pp.global_rank == s.ep.global_rank == s.etp.global_rank == r
        assert r == s.pp.rank * tp + s.tp.rank
        assert s.ep.size * s.etp.size == s.tp.size


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp_size": 0}, "tp_size must be >= 1"),
        ({"pp_size": -1}, "pp_size must be >= 1"),
        ({"ep_size": 0}, "ep_size must be >= 1"),
        ({"tp_size": 4, "ep_size": 3}, "must divide tp_size"),
        ({"tp_size": 2, "ep_size": 4}, "must divide tp_size"),
        ({"tp_size": 2.0}, "must be an int"),
        ({"tp_size": True}, "must be an int"),
    ],
)
def test_invalid_sizes(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelLayout(**kwargs)  # type: ignore[arg-type]


def test_invalid_world_rank() -> None:
    with pytest.raises(ValueError, match="outside"):
        make_parallel_state(4, tp_size=2, pp_size=2)
    with pytest.raises(ValueError, match="outside"):
        make_parallel_state(-1, tp_size=2)


def test_invalid_group_info_and_kind() -> None:
    with pytest.raises(ValueError):
        GroupInfo(rank=2, size=2, ranks=(0, 1))
    with pytest.raises(ValueError):
        GroupInfo(rank=0, size=2, ranks=(0,))
    with pytest.raises(ValueError):
        ParallelLayout().groups("dp")  # type: ignore[arg-type]


def test_frozen() -> None:
    s = make_parallel_state(0, tp_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tp.rank = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.world_rank = 1  # type: ignore[misc]
