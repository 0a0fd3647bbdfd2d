"""The worker side of the MPI executor. Every rank runs `worker_loop`; rank 0 also holds the link to
the coordinator (a socket when the coordinator spawned the job, an in-process queue when the
coordinator is rank 0 of an mpirun job) and relays over MPI:

    coordinator --link--> rank 0 --MPI bcast (op, args)--> every rank
    every rank  --MPI gather (or the output rank's send)--> rank 0 --link--> coordinator

A rank that raises aborts the MPI job (no silent retry); the coordinator sees the link close, or
its watchdog fires if a collective hangs, and fails the engine.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import traceback
from typing import Any, Protocol


class Link(Protocol):
    def send(self, obj: Any) -> None: ...
    def recv(self) -> Any: ...
    def poll(self, timeout: float) -> bool: ...


class QueueLink:
    """One end of an in-process pair (launched mode: coordinator thread <-> rank-0 worker thread)."""

    def __init__(self, inbox: "queue.Queue[Any]", outbox: "queue.Queue[Any]") -> None:
        self.inbox, self.outbox = inbox, outbox
        self._peeked: list[Any] = []

    @staticmethod
    def pair() -> tuple["QueueLink", "QueueLink"]:
        a: queue.Queue[Any] = queue.Queue()
        b: queue.Queue[Any] = queue.Queue()
        return QueueLink(a, b), QueueLink(b, a)

    def send(self, obj: Any) -> None:
        self.outbox.put(obj)

    def recv(self) -> Any:
        return self._peeked.pop() if self._peeked else self.inbox.get()

    def poll(self, timeout: float) -> bool:
        if self._peeked:
            return True
        try:
            self._peeked.append(self.inbox.get(timeout=timeout))
            return True
        except queue.Empty:
            return False


def init_host_comm(host: Any, world: Any) -> None:
    """Collective: CPU workers use MPI itself; GPU workers build NCCL with an id sent over MPI."""
    from distrt.parallel.comm_mpi import MpiComm

    data = MpiComm(world.Dup(), owned=True)
    if host.config.device.is_cuda:
        uid = data.broadcast_object(host.nccl_unique_id() if data.rank == 0 else None, src=0)
        host.init_comm("nccl", unique_id=uid, local_rank=_local_rank(data.rank))
        data.destroy()
    else:
        host.init_comm("mpi", comm=data)


def _local_rank(rank: int) -> int:
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return rank


def worker_loop(world: Any, link: Link | None, config: Any = None) -> None:
    """Run by every rank of the worker job; `link` on rank 0 only. Returns after "shutdown"."""
    from distrt.executor.worker_host import WorkerHost, output_rank

    rank = world.Get_rank()
    ctrl = world.Dup()
    config = ctrl.bcast(link.recv() if rank == 0 else None, root=0) if config is None else config
    out = output_rank(config)
    host = WorkerHost(config, rank)
    try:
        init_host_comm(host, world)
        pids = ctrl.gather(os.getpid(), root=0)
        if rank == 0:
            link.send(("ok", pids))  # type: ignore[union-attr]
        while True:
            op, args = ctrl.bcast(link.recv() if rank == 0 else None, root=0)  # type: ignore[union-attr]
            result = getattr(host, op)(*args)
            if op == "execute":
                if out != 0 and rank == out:
                    ctrl.send(result, dest=0)
                if rank == 0:
                    link.send(("ok", result if out == 0 else ctrl.recv(source=out)))  # type: ignore[union-attr]
            else:
                replies = ctrl.gather(result, root=0)
                if rank == 0:
                    link.send(("ok", replies))  # type: ignore[union-attr]
            if op == "shutdown":
                return
    except BaseException as e:
        text = f"MPI worker rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        if rank == 0 and link is not None:
            try:
                link.send(("fail", text))
            except OSError:
                pass
        sys.stderr.write(text)
        sys.stderr.flush()
        if isinstance(link, QueueLink):  # launched mode: rank 0 is the coordinator's process; keep it
            return
        world.Abort(1)


def main(argv: list[str] | None = None) -> None:
    """`mpirun -n N python -m distrt.executor.mpi_worker --connect HOST:PORT` (started by MpiExecutor)."""
    from multiprocessing.connection import Client

    from mpi4py import MPI

    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    a = ap.parse_args(argv)
    link = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        host, port = a.connect.rsplit(":", 1)
        link = Client((host, int(port)), authkey=bytes.fromhex(os.environ["DISTRT_MPI_AUTHKEY"]))
    worker_loop(MPI.COMM_WORLD, link)


if __name__ == "__main__":
    main()
