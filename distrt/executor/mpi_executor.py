"""The MPI executor. Two ways in:

  spawn    (a plain Python process): MPI.COMM_SELF.Spawn starts world_size worker ranks; this process
           is only the coordinator and talks to them over the intercommunicator.
  launched (`mpirun -n N python -m distrt ...` / srun): rank 0 is the coordinator and also runs
           worker 0 in a thread; ranks 1..N-1 run the worker loop (distrt.cli sends them there).

Replies are awaited by polling with a deadline (the step watchdog): a worker that raises, dies, or
hangs in a collective fails the engine with EngineDeadError instead of blocking it.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from distrt.config import EngineConfig
from distrt.executor.base import EngineDeadError, Executor
from distrt.executor.mpi_worker import TAG_FAIL, TAG_REPLY, init_host_comm, make_host, serve
from distrt.messages import StepPlan, StepResult

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def under_mpi_launcher() -> bool:
    return any(k in os.environ for k in _LAUNCHER_VARS)


class MpiExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        from mpi4py import MPI

        from distrt.executor.worker_host import output_rank

        self.MPI = MPI
        self.config = config
        self.world = config.parallel.world_size
        self.out_rank = output_rank(config)
        self._dead: str | None = None
        self._pids: list[int] = []
        self._thread: threading.Thread | None = None
        launched = under_mpi_launcher() and MPI.COMM_WORLD.Get_size() > 1
        if launched:
            if MPI.COMM_WORLD.Get_size() != self.world:
                raise ValueError(f"mpirun started {MPI.COMM_WORLD.Get_size()} ranks but the layout needs "
                                 f"{self.world} (tp x pp)")
            if MPI.COMM_WORLD.Get_rank() != 0:
                raise RuntimeError("only MPI rank 0 builds the executor; other ranks run distrt.executor.mpi_worker")
            self.cmd, self.ctrl = _control_comms(MPI)
            self.cmd.bcast(config, root=0)
            self._cmds: queue.Queue[Any] = queue.Queue()
            self._host = make_host(config, 0)
            self._thread = threading.Thread(target=self._rank0_worker, name="distrt-worker-0", daemon=True)
            self._thread.start()
            self._mode = "launched"
        else:
            self.ctrl = MPI.COMM_SELF.Spawn(sys.executable, args=["-m", "distrt.executor.mpi_worker"],
                                            maxprocs=self.world)
            self.cmd = self.ctrl
            self._mode = "spawn"
            self.ctrl.bcast(config, root=MPI.ROOT)
        try:
            ready = self._collect(self.world, config.parallel.init_timeout_s, "start")
            if self._mode == "spawn":
                self._pids = self._ask("pid")
            del ready
        except BaseException:
            self.shutdown()
            raise

    # -- transport ------------------------------------------------------------------------------
    def _send_cmd(self, op: str, *args: Any) -> None:
        if self._mode == "spawn":
            self.ctrl.bcast((op, args), root=self.MPI.ROOT)
        else:
            self._cmds.put((op, args))

    def _rank0_worker(self) -> None:
        from distrt.executor.worker_host import output_rank

        ctrl, cmd = self.ctrl, self.cmd
        try:
            init_host_comm(self._host)
            ctrl.send(("ready", 0), dest=0, tag=TAG_REPLY)
        except BaseException as e:
            ctrl.send(f"rank 0: {type(e).__name__}: {e}", dest=0, tag=TAG_FAIL)
            return

        def recv_cmd() -> Any:
            return cmd.bcast(self._cmds.get(), root=0)

        serve(self._host, recv_cmd, lambda obj, tag: ctrl.send(obj, dest=0, tag=tag), 0, output_rank(self.config))

    def _collect(self, n: int, timeout: float, what: str) -> list[Any]:
        MPI = self.MPI
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        status = MPI.Status()
        spins = 0
        while len(out) < n:
            if self.ctrl.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                src, tag = status.Get_source(), status.Get_tag()
                msg = self.ctrl.recv(source=src, tag=tag)
                if tag == TAG_FAIL:
                    self._fail(f"worker {msg}")
                out[src] = msg
                spins = 0
                continue
            spins += 1
            if spins > 2000:  # busy-poll about a millisecond, then back off a little
                time.sleep(0.0002)
                if spins % 500 == 0:
                    self._check_pids()
            if time.monotonic() > deadline:
                self._fail(f"{what} timed out after {timeout:.0f}s: a worker or a collective hung "
                           f"(got {len(out)} of {n} replies)")
        return [out[k] for k in sorted(out)]

    def _ask(self, op: str, *args: Any) -> list[Any]:
        self._send_cmd(op, *args)
        return self._collect(self.world, self.config.parallel.init_timeout_s, op)

    def _check_pids(self) -> None:
        for r, pid in enumerate(self._pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._fail(f"worker rank {r} (pid {pid}) died")
            except PermissionError:
                pass

    def _fail(self, why: str) -> None:
        self._dead = why
        self._kill_workers()
        raise EngineDeadError(why)

    # -- Executor ----------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        return min(self._ask("determine_num_blocks"))

    def init_kv_cache(self, num_blocks: int) -> None:
        self._ask("init_kv_cache", num_blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self._send_cmd("execute", plan)
        (result,) = self._collect(1, self.config.parallel.step_timeout_s, f"step {plan.step_id}")
        return result

    def inject_fault(self, rank: int, kind: str, at_step: int = 1) -> None:
        """Test hook: every rank receives the command; only `rank` arms it (others get at_step huge)."""
        self._send_cmd("inject_fault_on", rank, kind, at_step)
        self._collect(self.world, 30, "inject_fault")

    def worker_pids(self) -> list[int]:
        return list(self._pids) if self._pids else self._ask("pid")

    def _kill_workers(self) -> None:
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self._dead is None:
            try:
                self._ask("shutdown")
            except EngineDeadError:
                pass
        else:
            self._kill_workers()
        if self._mode == "spawn" and self._dead is None:
            self.ctrl.Disconnect()


def _control_comms(MPI: Any) -> tuple[Any, Any]:
    """(commands: bcast from rank 0, replies: point-to-point to rank 0), kept apart because rank 0
    uses them from two threads."""
    return MPI.COMM_WORLD.Dup(), MPI.COMM_WORLD.Dup()


def is_launched_worker_rank() -> bool:
    """True on ranks 1..N-1 of an mpirun/srun job of several ranks."""
    if not under_mpi_launcher():
        return False
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size() > 1 and MPI.COMM_WORLD.Get_rank() != 0


def launched_worker_main() -> None:
    """Ranks 1..N-1 under mpirun: serve the coordinator on rank 0 until it shuts down."""
    from mpi4py import MPI

    from distrt.executor.worker_host import output_rank

    cmd, ctrl = _control_comms(MPI)
    config = cmd.bcast(None, root=0)
    rank = MPI.COMM_WORLD.Get_rank()
    host = make_host(config, rank)
    try:
        init_host_comm(host)
        ctrl.send(("ready", rank), dest=0, tag=TAG_REPLY)
    except BaseException as e:
        ctrl.send(f"rank {rank}: {type(e).__name__}: {e}", dest=0, tag=TAG_FAIL)
        raise
    serve(host, lambda: cmd.bcast(None, root=0), lambda obj, tag: ctrl.send(obj, dest=0, tag=tag),
          rank, output_rank(config))
