"""Collective checks shared by the gloo, MPI and NCCL tests, and a spawn harness with timeouts.

Every expected value is computed here with plain torch from every rank's input (each rank can
rebuild any rank's input from its rank number), never by another communicator.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import torch

from distrt.parallel.comm import Communicator
from distrt.parallel.state import ParallelLayout

SUM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def _input(rank: int, shape: Sequence[int], dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    # Small integers: sums are exact in every dtype, including bfloat16.
    n = int(torch.Size(shape).numel())
    return ((torch.arange(n) * (rank + 1) + rank + salt) % 17).reshape(tuple(shape)).to(dtype)


def _eq(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: got {got} want {want}"


def _total(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    out = ts[0].clone()
    for t in ts[1:]:
        out = out + t
    return out


def _a2a_rows(src: int, dst: int) -> int:
    return (src + 2 * dst) % 3  # uneven per pair, zero rows for some pairs


def _a2a_piece(src: int, dst: int, dtype: torch.dtype) -> torch.Tensor:
    return _input(src, (_a2a_rows(src, dst), 4), dtype, salt=10 * dst)


def check_collectives(comm: Communicator) -> None:
    rank, world, dev = comm.rank, comm.size, comm.device

    for dtype in SUM_DTYPES:
        want = _total([_input(r, (3, 5), dtype) for r in range(world)])
        _eq(comm.all_reduce(_input(rank, (3, 5), dtype).to(dev)), want, f"all_reduce {dtype}")
    base = _input(rank, (5, 3), torch.float32).to(dev)
    want = _total([_input(r, (5, 3), torch.float32) for r in range(world)]).t()
    _eq(comm.all_reduce(base.t()), want, "all_reduce of a non-contiguous view")

    for dim in (0, 1, -1):
        for dtype in (torch.float32, torch.bfloat16):
            want = torch.cat([_input(r, (2, 3), dtype) for r in range(world)], dim=dim)
            _eq(comm.all_gather(_input(rank, (2, 3), dtype).to(dev), dim=dim), want, f"all_gather dim={dim} {dtype}")

    for dim in (0, 1):
        shape = (2 * world, 3) if dim == 0 else (3, 2 * world)
        total = _total([_input(r, shape, torch.float32) for r in range(world)])
        want = total.chunk(world, dim=dim)[rank].contiguous()
        _eq(comm.reduce_scatter(_input(rank, shape, torch.float32).to(dev), dim=dim), want, f"reduce_scatter dim={dim}")

    for src in range(world):
        mine = _input(rank, (4, 2), torch.float16).to(dev)
        _eq(comm.broadcast(mine, src), _input(src, (4, 2), torch.float16), f"broadcast from {src}")

    if world > 1:
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        payload = _input(rank, (3, 7), torch.bfloat16, salt=5).to(dev)
        # Even ranks send first, odd ranks receive first: no rank waits on a rank that waits on it.
        if rank % 2 == 0:
            comm.send(payload, nxt)
            got = comm.recv((3, 7), torch.bfloat16, prev)
        else:
            got = comm.recv((3, 7), torch.bfloat16, prev)
            comm.send(payload, nxt)
        _eq(got, _input(prev, (3, 7), torch.bfloat16, salt=5), "send/recv ring")

    for dtype in (torch.float32, torch.int64):
        inputs = [_a2a_piece(rank, dst, dtype).to(dev) for dst in range(world)]
        wants = [_a2a_piece(src, rank, dtype) for src in range(world)]
        for got, w, src in zip(comm.all_to_all(inputs), wants, range(world), strict=True):
            _eq(got, w, f"all_to_all {dtype} from {src} (shapes exchanged)")
        shapes = [tuple(w.shape) for w in wants]
        for got, w, src in zip(comm.all_to_all(inputs, recv_shapes=shapes), wants, range(world), strict=True):
            _eq(got, w, f"all_to_all {dtype} from {src} (recv_shapes given)")

    for src in (0, world - 1):
        obj = {"uid": bytes(range(128)), "from": src, "tag": ("x", 1.5)}
        got_obj = comm.broadcast_object(obj if rank == src else None, src)
        assert got_obj == obj, f"broadcast_object from {src}: {got_obj!r}"

    comm.barrier()


def check_split(comm: Communicator) -> None:
    """Sub-communicators from a partition: group ranks follow the listing order, collectives stay
    inside the group, and the full check passes on each sub-communicator."""
    rank, world, dev = comm.rank, comm.size, comm.device
    assert world % 2 == 0, "check_split pairs ranks up"
    # Interleaved pairs (0, 2), (1, 3) when world == 4, so group rank != parent rank.
    half = world // 2
    pairs = [[r, r + half] for r in range(half)]
    sub = comm.split(pairs)
    members = next(g for g in pairs if rank in g)
    assert (sub.rank, sub.size) == (members.index(rank), 2), f"split {pairs}: rank {rank} got {sub.rank}/{sub.size}"
    got = sub.all_reduce(torch.tensor([float(rank)], device=dev))
    _eq(got, torch.tensor([float(sum(members))]), "all_reduce inside a pair")
    _eq(sub.all_gather(torch.tensor([rank], device=dev)), torch.tensor(members), "pair members in order")
    check_collectives(sub)

    singles = comm.split([[r] for r in range(world)])
    assert (singles.rank, singles.size) == (0, 1)
    _eq(singles.all_gather(torch.tensor([rank], device=dev)), torch.tensor([rank]), "all_gather in a group of one")

    for bad in ([[r] for r in range(world - 1)], [list(range(world))[::-1]]):
        try:
            comm.split(bad)
        except ValueError:
            continue
        raise AssertionError(f"split({bad}) should raise ValueError")


def check_layout_groups(comm: Communicator, layout: ParallelLayout) -> None:
    """Sub-communicators built from the grid's listings agree with ``ParallelState``."""
    state = layout.state(comm.rank)
    for kind in ("tp", "pp", "ep", "etp"):
        info = getattr(state, kind)
        sub = comm.split(layout.groups(kind))
        assert (sub.rank, sub.size) == (info.rank, info.size), f"{kind}: comm {sub.rank}/{sub.size} vs state {info}"
        members = sub.all_gather(torch.tensor([comm.rank], device=comm.device))
        _eq(members, torch.tensor(info.ranks), f"{kind} group members")


def _run_rank(fn: Callable[..., None], rank: int, args: tuple[Any, ...], errors: Queue[tuple[int, str]]) -> None:
    try:
        fn(rank, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_ranks(fn: Callable[..., None], world_size: int, args: tuple[Any, ...] = (), timeout_s: float = 60.0) -> None:
    """Runs ``fn(rank, *args)`` in ``world_size`` spawned processes; fails on the first rank that
    fails (killing the rest, which would otherwise wait in a collective) or after ``timeout_s``."""
    ctx = mp.get_context("spawn")
    errors: Queue[tuple[int, str]] = ctx.Queue()
    procs = [ctx.Process(target=_run_rank, args=(fn, r, args, errors), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs):
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks still running after {timeout_s:.0f} s (a hang?)")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    reports = []
    while not errors.empty():
        reports.append(errors.get_nowait())
    codes = [p.exitcode for p in procs]
    if reports or any(c != 0 for c in codes):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(reports))
        raise AssertionError(f"rank exit codes {codes}\n{details}")


def run_rendezvous_ranks(fn: Callable[..., None], world: int, tmp_path: Path, timeout_s: float = 60.0) -> None:
    """run_ranks with ``fn(rank, world, init)``: init is a torch.distributed file rendezvous in tmp_path."""
    from distrt.parallel.comm_torch_dist import file_init_method

    run_ranks(fn, world, (world, file_init_method(tmp_path / "rendezvous")), timeout_s=timeout_s)


def nccl_pair(rank: int, world: int, init: str) -> tuple[Communicator, Communicator]:
    """(gloo, nccl) communicators of one GPU test rank: the NCCL unique id travels over gloo
    (init: a torch.distributed init method), and the rank's device is cuda:rank."""
    from datetime import timedelta

    from distrt.parallel.comm_factory import create_communicator
    from distrt.parallel.comm_nccl import nccl_unique_id

    gloo = create_communicator("gloo", rank=rank, world_size=world, init_method=init, timeout=timedelta(seconds=60))
    uid = gloo.broadcast_object(nccl_unique_id() if rank == 0 else None, 0)
    torch.cuda.set_device(rank)
    return gloo, create_communicator("nccl", rank=rank, world_size=world, unique_id=uid, device=rank)
