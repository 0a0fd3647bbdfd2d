"""Every collective under torch.distributed gloo, in 2 and 4 spawned processes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from comm_checks import check_collectives, check_layout_groups, check_split, run_ranks

from distrt.parallel.comm_factory import create_communicator
from distrt.parallel.comm_torch_dist import TorchDistComm, file_init_method, find_free_port, tcp_init_method
from distrt.parallel.state import ParallelLayout


def _gloo_rank(rank: int, world_size: int, init_method: str, layout: ParallelLayout) -> None:
    comm = create_communicator(
        "gloo", rank=rank, world_size=world_size, init_method=init_method, timeout=timedelta(seconds=60)
    )
    try:
        assert isinstance(comm, TorchDistComm)
        assert (comm.rank, comm.size) == (rank, world_size)
        check_collectives(comm)
        check_split(comm)
        check_layout_groups(comm, layout)
    finally:
        comm.destroy()


def test_gloo_two_ranks_tcp() -> None:
    run_ranks(_gloo_rank, 2, (2, tcp_init_method(), ParallelLayout(tp_size=2, ep_size=2)))


def test_gloo_four_ranks_file(tmp_path: Path) -> None:
    init = file_init_method(tmp_path / "rendezvous")
    run_ranks(_gloo_rank, 4, (4, init, ParallelLayout(tp_size=2, pp_size=2, ep_size=2)), timeout_s=90)


def test_find_free_port_is_bindable() -> None:
    import socket

    port = find_free_port()
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
    assert tcp_init_method(port=port) == f"tcp://127.0.0.1:{port}"


def test_file_init_method_refuses_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "store"
    stale.write_text("")
    with pytest.raises(ValueError, match="already exists"):
        file_init_method(stale)
    assert file_init_method(tmp_path / "fresh").startswith("file://")


def test_create_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="outside"):
        TorchDistComm.create(2, 2, tcp_init_method())
