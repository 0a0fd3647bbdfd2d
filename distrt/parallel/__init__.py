"""Rank grid and communicators. Backends (gloo, MPI, NCCL) live in their own modules and are
imported by ``create_communicator`` only when chosen."""

from distrt.parallel.comm import Communicator, SingleRankComm
from distrt.parallel.comm_factory import Backend, create_communicator
from distrt.parallel.state import GroupInfo, ParallelLayout, ParallelState, make_parallel_state

__all__ = [
    "Backend",
    "Communicator",
    "GroupInfo",
    "ParallelLayout",
    "ParallelState",
    "SingleRankComm",
    "create_communicator",
    "make_parallel_state",
]
