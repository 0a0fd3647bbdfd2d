"""Process helpers for tests that start workers: is a pid alive, wait until pids are gone, which
processes have a string in their command line."""

from __future__ import annotations

import os
import time
from typing import Any


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return not any(alive(p) for p in pids)


def processes_with(needle: str) -> list[int]:
    """Pids whose command line contains `needle` (e.g. a job's private Ray temp dir)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def run_gloo_ranks(target: Any, world: int, args: tuple, timeout: float = 180.0) -> dict[int, Any]:
    """Runs target(rank, world, init_method, *args, queue) in `world` spawned processes; returns
    {rank: what it put on the queue}."""
    import multiprocessing as mp

    from distrt.parallel.comm_torch_dist import tcp_init_method

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = tcp_init_method()
    procs = [ctx.Process(target=target, args=(r, world, init, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results
