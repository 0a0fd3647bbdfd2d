"""The worker side of the MPI executor. Every rank runs `worker_loop`; rank 0 also holds the link to
the coordinator (a socket when the coordinator spawned the job, an in-process queue when the
coordinator is rank 0 of an mpirun job) and relays over MPI:

    coordinator --link--> rank 0 --MPI bcast (op, args)--> every rank
    every rank  --MPI gather (or the output rank's send)--> rank 0 --link--> coordinator

With pipeline parallelism (pp > 1) several plans are in flight and the stages work on different
ones, so nothing on the step path may be collective across stages: rank 0 hands each command to
every rank with a non-blocking send (each rank receives them in order), and a forwarding thread
on rank 0 relays the output rank's step results to the coordinator while rank 0 itself already
runs its stage of the next plan:

    coordinator --link--> rank 0 --isend (op, args)--> rank r   (each rank: recv, run, next)
    output rank --send result--> rank 0's forwarder thread --link--> coordinator

Async scheduling (pp == 1, two plans in flight): every rank launches a plan's device work without
waiting for it; rank 0 (the output rank) sends step k's result once step k+1 is queued behind it,
or, when no next plan comes, as soon as step k's tokens are ready:

    rank 0:  launch k+1 -> send result k -> (no command yet? result k+1 when ready) -> recv k+2 ...

A rank that raises aborts the MPI job (no silent retry); the coordinator sees the link close, or
its watchdog fires if a collective hangs, and fails the engine.
"""

from __future__ import annotations

import argparse
import os
import pickle
import queue
import sys
import threading
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


def no_delay(conn: Any) -> None:
    """TCP_NODELAY on a multiprocessing Connection's socket: plans and results are small messages
    in a request/response rhythm, which Nagle's algorithm would hold back waiting for ACKs."""
    import socket

    s = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)  # a dup: closing it keeps conn
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    finally:
        s.close()


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


class _LockedLink:
    """Rank 0's link when two threads (the loop and the result forwarder) send on it."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.lock = threading.Lock()

    def send(self, obj: Any) -> None:
        with self.lock:
            self.link.send(obj)

    def recv(self) -> Any:
        return self.link.recv()

    def poll(self, timeout: float) -> bool:
        return self.link.poll(timeout)


class _ResultForwarder:
    """Rank 0, pp > 1: relays the output rank's step results, in order, to the coordinator."""

    def __init__(self, comm: Any, source: int, link: Link) -> None:
        self.comm, self.source, self.link = comm, source, link
        self.tickets: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="distrt-mpi-results")
        self.thread.start()

    def expect(self) -> None:
        self.tickets.put(True)

    def close(self) -> None:
        self.tickets.put(False)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while self.tickets.get():
            self.link.send(("ok", self.comm.recv(source=self.source)))


class _Commands:
    """How commands reach every rank: a bcast when one plan is in flight at a time (pp == 1), else
    point-to-point sends from rank 0 that never wait for a rank still busy with an earlier plan."""

    def __init__(self, ctrl: Any, rank: int, link: Link | None, pipelined: bool) -> None:
        self.ctrl, self.rank, self.link, self.pipelined = ctrl, rank, link, pipelined
        self.sending: list[Any] = []  # rank 0's unfinished isends (each holds its pickled command)

    def next(self) -> tuple[str, tuple[Any, ...]]:
        """Rank 0 relays the command as the bytes that came over the socket (no second pickling);
        a command is a tuple, so bytes always mean "unpickle me" (the in-process link sends objects)."""
        if not self.pipelined:
            msg = self.ctrl.bcast(_recv_raw(self.link) if self.rank == 0 else None, root=0)
            return pickle.loads(msg) if isinstance(msg, bytes) else msg
        if self.rank != 0:
            msg = self.ctrl.recv(source=0)
            return pickle.loads(msg) if isinstance(msg, bytes) else msg
        msg = _recv_raw(self.link)
        self.sending = [r for r in self.sending if not r.Test()]
        self.sending += [self.ctrl.isend(msg, dest=r) for r in range(1, self.ctrl.Get_size())]
        return pickle.loads(msg) if isinstance(msg, bytes) else msg

    def flush(self) -> None:
        for r in self.sending:
            r.wait()
        self.sending = []


def _recv_raw(link: Any) -> Any:
    """The next message: its pickled bytes from a socket link, the object from an in-process one."""
    inner = link.link if isinstance(link, _LockedLink) else link
    recv_bytes = getattr(inner, "recv_bytes", None)
    return recv_bytes() if recv_bytes is not None else inner.recv()


def _send_ready_results(host: Any, link: Any) -> None:
    """Rank 0, async scheduling: until the next command arrives, send each launched step's result
    as soon as its tokens are on the host."""
    while host.num_launched:
        if host.oldest_ready():
            link.send(("ok", host.finish_oldest()))
        elif link.poll(5e-5):
            return


def worker_loop(world: Any, link: Link | None, config: Any = None) -> None:
    """Run by every rank of the worker job; `link` on rank 0 only. Returns after "shutdown"."""
    from distrt.executor.worker_host import WorkerHost, output_rank

    rank = world.Get_rank()
    ctrl = world.Dup()
    config = ctrl.bcast(link.recv() if rank == 0 else None, root=0) if config is None else config
    out = output_rank(config)
    pipelined = config.parallel.pipeline_parallel_size > 1
    lagged = not pipelined and config.scheduler.async_scheduling  # launch now, send results later (above)
    host = WorkerHost(config, rank)
    results = ctrl.Dup() if pipelined else None  # output rank -> rank 0, one message per step
    forwarder: _ResultForwarder | None = None
    try:
        init_host_comm(host, world)
        pids = ctrl.gather(os.getpid(), root=0)
        if rank == 0:
            if pipelined:
                link = _LockedLink(link)  # type: ignore[arg-type]
                forwarder = _ResultForwarder(results, out, link)
            link.send(("ok", pids))  # type: ignore[union-attr]
        commands = _Commands(ctrl, rank, link, pipelined)
        while True:
            if lagged and rank == 0:
                _send_ready_results(host, link)
            op, args = commands.next()
            if op == "execute" and forwarder is not None:
                forwarder.expect()
            if lagged and op == "execute":
                host.launch(*args)
                while rank == 0 and host.num_launched > 1:
                    link.send(("ok", host.finish_oldest()))  # type: ignore[union-attr]
                continue
            if lagged and rank == 0:
                while host.num_launched:
                    link.send(("ok", host.finish_oldest()))  # type: ignore[union-attr]
            result = getattr(host, op)(*args)
            if op == "execute":
                if pipelined:
                    if rank == out:
                        results.send(result, dest=0)
                else:
                    if out != 0 and rank == out:
                        ctrl.send(result, dest=0)
                    if rank == 0:
                        link.send(("ok", result if out == 0 else ctrl.recv(source=out)))  # type: ignore[union-attr]
            else:
                replies = ctrl.gather(result, root=0)
                if rank == 0:
                    link.send(("ok", replies))  # type: ignore[union-attr]
            if op == "shutdown":
                commands.flush()
                if forwarder is not None:
                    forwarder.close()
                return
    except BaseException as e:
        # the innermost frames say which op failed (the outer ones are always this loop's)
        text = f"MPI worker rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-16)}"
        if rank == 0 and link is not None:
            try:
                link.send(("fail", text))
            except OSError:
                pass
        sys.stderr.write(text)
        sys.stderr.flush()
        if isinstance(link, QueueLink) or isinstance(getattr(link, "link", None), QueueLink):
            return  # launched mode: rank 0 is the coordinator's process; keep it
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
        no_delay(link)
    worker_loop(MPI.COMM_WORLD, link)


if __name__ == "__main__":
    main()
