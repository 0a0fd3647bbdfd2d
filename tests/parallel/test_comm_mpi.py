"""Every collective under mpi4py. Runs only under MPI:

    mpirun -n 2 python -m pytest --with-mpi tests/parallel/test_comm_mpi.py

Without --with-mpi, pytest-mpi skips these ("need --with-mpi option to run");
test_comm_mpi_launch.py runs the command above from a plain pytest session.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import pytest
from comm_checks import check_collectives, check_layout_groups, check_split

from distrt.parallel.state import ParallelLayout

pytestmark = pytest.mark.mpi(min_size=2)


def _on_every_rank(check: Callable[[], None]) -> None:
    # A rank that fails while the others go on into the next collective would hang the job, so a
    # failure aborts every rank at once, its traceback printed first.
    from mpi4py import MPI

    try:
        check()
    except BaseException:
        sys.stderr.write(f"rank {MPI.COMM_WORLD.Get_rank()} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


def test_mpi_collectives() -> None:
    from distrt.parallel.comm_factory import create_communicator
    from distrt.parallel.comm_mpi import MpiComm

    comm = create_communicator("mpi")
    assert isinstance(comm, MpiComm)
    _on_every_rank(lambda: check_collectives(comm))


def test_mpi_split() -> None:
    from distrt.parallel.comm_mpi import MpiComm

    comm = MpiComm.world()

    def check() -> None:
        if comm.size % 2 == 0:
            check_split(comm)
        check_layout_groups(comm, ParallelLayout(tp_size=comm.size, ep_size=comm.size))
        check_layout_groups(comm, ParallelLayout(tp_size=1, pp_size=comm.size))
        comm.destroy()

    _on_every_rank(check)


def test_mpi_factory_checks_the_launched_world() -> None:
    from distrt.parallel.comm_factory import create_communicator

    with pytest.raises(ValueError, match="mpirun started"):
        create_communicator("mpi", world_size=10_000)
