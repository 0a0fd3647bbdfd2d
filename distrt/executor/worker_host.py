"""A worker in its own process (a Ray actor or an MPI rank): builds the world communicator, its
TP/PP sub-communicators and its model shard, then executes StepPlans.

Only the output rank (TP rank 0 of the last pipeline stage) samples, and only its result goes
back; every rank learns the sampled tokens from the next plan (messages.py), so all keep the same
request state. Plans run in the order they were submitted, which pipelining relies on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import torch

from distrt.config import EngineConfig
from distrt.messages import StepPlan, StepResult
from distrt.parallel.comm import Communicator
from distrt.parallel.state import ParallelLayout

logger = logging.getLogger(__name__)


def layout_of(config: EngineConfig) -> ParallelLayout:
    p = config.parallel
    return ParallelLayout(tp_size=p.tensor_parallel_size, pp_size=p.pipeline_parallel_size,
                          ep_size=p.expert_parallel_size)


def output_rank(config: EngineConfig) -> int:
    """The rank whose StepResult the coordinator reads: TP rank 0 of the last pipeline stage."""
    layout = layout_of(config)
    return layout.global_rank(layout.pp_size - 1, 0)


def local_device(config: EngineConfig, local_rank: int) -> str:
    if not config.device.is_cuda:
        return "cpu"
    n = torch.cuda.device_count()
    if n == 0:
        raise RuntimeError("device='cuda' but this worker sees no GPU")
    return f"cuda:{local_rank % n}"


class WorkerHost:
    def __init__(self, config: EngineConfig, rank: int) -> None:
        self.config = config
        self.rank = rank
        self.world_size = config.parallel.world_size
        self.comm: Communicator | None = None
        self.worker: Any = None
        self._fault: tuple[str, int] | None = None
        self._steps = 0
        self._turn = threading.Condition()
        self._launched: deque[Any] = deque()  # output rank: launched steps not yet collected
        self._next_seq = 1

    # -- bootstrap (each call is collective across ranks where noted) -------------------------
    def address(self) -> tuple[str, int]:
        from distrt.parallel.comm_torch_dist import find_free_port

        import socket

        host = socket.gethostbyname(socket.gethostname())
        return host, find_free_port("0.0.0.0")

    def nccl_unique_id(self) -> bytes:
        from distrt.parallel.comm_nccl import nccl_unique_id

        return nccl_unique_id()

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def init_comm(self, backend: str, *, init_method: str | None = None, unique_id: bytes | None = None,
                  local_rank: int = 0, comm: Communicator | None = None) -> None:
        """Collective: creates the world communicator (or adopts `comm`), then the model shard."""
        device = local_device(self.config, local_rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if comm is None:
            from distrt.parallel.comm_factory import create_communicator

            comm = create_communicator(backend, rank=self.rank, world_size=self.world_size,  # type: ignore[arg-type]
                                       init_method=init_method, unique_id=unique_id, device=device)
        self.comm = comm
        self._build_worker(device)

    def _build_worker(self, device: str) -> None:
        from distrt.worker.worker import Worker

        layout = layout_of(self.config)
        state = layout.state(self.rank)
        assert self.comm is not None
        tp_comm = self.comm.split(layout.tp_groups()) if layout.tp_size > 1 else None
        if tp_comm is not None and device.startswith("cuda") and self.config.parallel.custom_all_reduce:
            from distrt.parallel.custom_allreduce import create_ipc_all_reduce, default_max_bytes, env_config
            from distrt.parallel.fast_allreduce import FastAllReduceComm

            sc = self.config.scheduler
            max_bytes = default_max_bytes(tp_comm.size, self.config.model.hidden_size,
                                          min(sc.max_num_batched_tokens, sc.max_model_len))
            ipc = create_ipc_all_reduce(tp_comm, torch.device(device), max_bytes, **env_config())  # collective (TP group)
            logger.info("rank %d: TP all-reduce %s", self.rank,
                        f"through the IPC one-shot kernel up to {max_bytes >> 10} KB" if ipc is not None else "through NCCL")
            if ipc is not None:
                norm = None
                # All-reduce + add + RMSNorm in one kernel: opt-in (DISTRT_FUSED_AR_NORM=1). 8B TP=2 engines
                # at max_num_seqs 512 used to fail their graph warm-up with it (cuBLAS EXECUTION_FAILED, then
                # "misaligned address" in this kernel): a program's threads could disagree on the call number
                # (load + store of its counter, fixed with one atomic in 31d52a8). After the fix the 512-sequence
                # engine and the batch-1 runs work on 2 H200s (results/h200x2/diag_fused_512_after_counter_fix.log,
                # tp_bs1_fused_fixed.json); the TP engine GPU tests have not been re-run with it on by default.
                if os.environ.get("DISTRT_FUSED_AR_NORM", "0") == "1":
                    from distrt.parallel.ipc_allreduce_norm import create_ipc_all_reduce_norm

                    norm = create_ipc_all_reduce_norm(tp_comm, torch.device(device), max_bytes,
                                                      self.config.model.hidden_size, **env_config())  # collective
                tp_comm = FastAllReduceComm(tp_comm, ipc, norm)
        pp_comm = self.comm.split(layout.pp_groups()) if layout.pp_size > 1 else None
        self.worker = Worker(self.config, tp_rank=state.tp.rank, tp_size=state.tp.size, pp_rank=state.pp.rank,
                             pp_size=state.pp.size, tp_comm=tp_comm, pp_comm=pp_comm, device=device)

    # -- engine-facing ---------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        return int(self.worker.determine_num_blocks())

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute(self, plan: StepPlan, seq: int | None = None) -> StepResult | None:
        """Runs a plan. Callers that may deliver plans concurrently (Ray actor calls on a threaded
        actor) number them 1, 2, ... in `seq`, and each waits here for its turn."""
        if seq is None:
            return self._execute(plan)
        with self._turn:
            self._turn.wait_for(lambda: self._next_seq == seq)
        try:
            return self._execute(plan)
        finally:
            with self._turn:
                self._next_seq += 1
                self._turn.notify_all()

    def _execute(self, plan: StepPlan) -> StepResult | None:
        self._fault_point()
        result = self.worker.execute(plan)
        return result if self.rank == output_rank(self.config) else None

    def _fault_point(self) -> None:
        self._steps += 1
        if self._fault is not None and self._steps >= self._fault[1]:
            kind = self._fault[0]
            if kind == "hang":  # a peer that never joins the next collective
                threading.Event().wait()
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {self.rank} at step {self._steps}")
            if kind == "exit":
                os._exit(17)

    # -- async scheduling: launch now, collect later (the output rank keeps what it launched) ------
    def launch(self, plan: StepPlan) -> None:
        self._fault_point()
        pending = self.worker.launch(plan)
        if self.rank == output_rank(self.config):
            self._launched.append(pending)

    @property
    def num_launched(self) -> int:
        return len(self._launched)

    def oldest_ready(self) -> bool:
        p = self._launched[0]
        return p.launched is None or p.launched.sample is None or p.launched.sample.ready()

    def finish_oldest(self) -> StepResult:
        return self.worker.finish(self._launched.popleft())

    def step_lagged(self, plan: StepPlan | None) -> StepResult | None:
        """One call per compiled-graph execution: launches `plan` (None: launch nothing), then on the
        output rank returns the oldest step still uncollected if a newer one is queued behind it (or
        if `plan` is None), so the GPU always has the next step while the host waits for a result."""
        if plan is not None:
            self.launch(plan)
        if self._launched and (plan is None or len(self._launched) > 1):
            return self.finish_oldest()
        return None

    def inject_fault(self, kind: str, at_step: int) -> None:
        """Test hook: from step `at_step` on, hang / raise / exit instead of executing."""
        if kind not in ("hang", "raise", "exit"):
            raise ValueError(f"fault kind must be hang, raise or exit, got {kind!r}")
        self._fault = (kind, self._steps + at_step)

    def inject_fault_on(self, rank: int, kind: str, at_step: int) -> None:
        if rank == self.rank:
            self.inject_fault(kind, at_step)

    def describe(self) -> dict[str, Any]:
        """What this worker runs on: rank, device, and the TP all-reduce path (ipc / the backend)."""
        w = self.worker
        tp = getattr(getattr(w, "ctx", None), "tp_comm", None)
        path = "none" if tp is None else ("ipc" if hasattr(tp, "close_fast_path") else type(tp).__name__)
        info: dict[str, Any] = {"rank": self.rank, "pid": os.getpid(),
                                "device": str(getattr(getattr(w, "ctx", None), "device", "")), "tp_all_reduce": path}
        if path == "ipc":  # 0, or 1 + the peer a kernel gave up waiting for (synchronizes the device)
            info["ipc_error"] = tp.ipc.error()
            info["ipc_config"] = f"{'push' if tp.ipc.push else 'pull'}:{tp.ipc.chunk_bytes}, {tp.ipc.programs} programs, " \
                                 f"up to {tp.ipc.max_bytes >> 10} KB"
            info["ipc_ar_norm"] = tp.norm is not None  # all-reduce + add + RMSNorm fused (ipc_allreduce_norm.py)
            if tp.norm is not None:
                info["ipc_error"] = max(info["ipc_error"], tp.norm.buf.error())
        return info

    def ping(self) -> float:
        return time.time()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
