"""The worker side of the MPI executor: a loop that receives commands, runs them on a WorkerHost
and replies. Spawned ranks run it as `python -m distrt.executor.mpi_worker`; under mpirun, ranks
other than 0 run it from `distrt.cli` (rank 0 is the coordinator and runs worker 0 in a thread).

    coordinator --bcast (op, args)--> every worker rank
    worker ranks --send reply, TAG_REPLY--> coordinator   (for "execute", only the output rank)
    any worker --send error text, TAG_FAIL--> coordinator  (then it keeps serving; peers may hang,
                                                             which the coordinator's watchdog catches)
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

logger = logging.getLogger(__name__)

TAG_REPLY = 11
TAG_FAIL = 12


def make_host(config: Any, rank: int) -> Any:
    from distrt.executor.worker_host import WorkerHost

    return WorkerHost(config, rank)


def init_host_comm(host: Any) -> None:
    """Collective over the workers' own MPI world: gloo-free CPU path, or NCCL with an id sent over MPI."""
    from distrt.parallel.comm_mpi import MpiComm

    data = MpiComm.world()
    if host.config.device.is_cuda:
        uid = host.nccl_unique_id() if data.rank == 0 else None
        uid = data.broadcast_object(uid, src=0)
        local = _local_rank(data.rank)
        host.init_comm("nccl", unique_id=uid, local_rank=local)
        data.destroy()
    else:
        host.init_comm("mpi", comm=data)


def _local_rank(rank: int) -> int:
    import os

    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return rank


def serve(host: Any, recv_cmd: Callable[[], Any], reply: Callable[[Any, int], None], rank: int,
          out_rank: int) -> None:
    """Run commands until ("shutdown",)."""
    while True:
        op, args = recv_cmd()
        try:
            result = getattr(host, op)(*args)
        except BaseException as e:  # report and keep serving: the coordinator decides the engine is dead
            reply(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}", TAG_FAIL)
            if op == "shutdown":
                return
            continue
        if op != "execute" or rank == out_rank:
            reply(result, TAG_REPLY)
        if op == "shutdown":
            return


def spawned_main() -> None:
    from mpi4py import MPI

    from distrt.executor.worker_host import output_rank

    parent = MPI.Comm.Get_parent()
    rank = MPI.COMM_WORLD.Get_rank()
    config = parent.bcast(None, root=0)
    host = make_host(config, rank)
    try:
        init_host_comm(host)
        parent.send(("ready", rank), dest=0, tag=TAG_REPLY)
    except BaseException as e:
        parent.send(f"rank {rank}: {type(e).__name__}: {e}", dest=0, tag=TAG_FAIL)
        raise
    serve(host, lambda: parent.bcast(None, root=0), lambda obj, tag: parent.send(obj, dest=0, tag=tag),
          rank, output_rank(config))
    parent.Disconnect()


if __name__ == "__main__":
    spawned_main()
