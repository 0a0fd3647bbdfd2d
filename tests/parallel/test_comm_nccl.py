"""The NCCL (cupy) backend on 2 GPUs: every collective, CUDA-graph capture, and clean exit.

Run on a machine with 2+ GPUs: ``python -m pytest -m gpu tests/parallel/test_comm_nccl.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from comm_checks import check_collectives, check_split, run_rendezvous_ranks

if TYPE_CHECKING:
    from distrt.parallel.comm_nccl import NcclComm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for 2 NCCL ranks"),
]

REPO = Path(__file__).resolve().parents[2]


def _check_graph_capture(comm: NcclComm) -> None:
    rank, world, dev = comm.rank, comm.size, comm.device
    x = torch.zeros(4096, device=dev)
    comm.all_reduce(x)  # warm-up outside capture: NCCL connects its peers lazily
    sends = [torch.zeros(rank + 2 * dst + 1, 8, device=dev) for dst in range(world)]
    shapes = [(src + 2 * rank + 1, 8) for src in range(world)]
    comm.all_to_all(sends, recv_shapes=shapes)
    torch.cuda.synchronize(dev)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = comm.all_reduce(x)
        received = comm.all_to_all(sends, recv_shapes=shapes)
    for step in range(1, 4):
        x.fill_(float((rank + 1) * step))
        for dst, t in enumerate(sends):
            t.fill_(float(100 * rank + 10 * dst + step))
        graph.replay()
        torch.cuda.synchronize(dev)
        want = float(sum((r + 1) * step for r in range(world)))
        assert torch.equal(y.cpu(), torch.full((4096,), want)), f"graph all_reduce step {step}: {y[:4]}"
        for src, got in enumerate(received):
            w = torch.full(shapes[src], float(100 * src + 10 * rank + step))
            assert torch.equal(got.cpu(), w), f"graph all_to_all from {src} step {step}"
    del graph


def _nccl_rank(rank: int, world_size: int, rendezvous: str) -> None:
    from distrt.parallel.comm_factory import create_communicator
    from distrt.parallel.comm_nccl import NcclComm, nccl_unique_id

    # The unique id travels as bytes over another communicator, as an executor carries it.
    gloo = create_communicator("gloo", rank=rank, world_size=world_size, init_method=rendezvous,
                               timeout=timedelta(seconds=60))
    uid = gloo.broadcast_object(nccl_unique_id() if rank == 0 else None, 0)
    assert isinstance(uid, bytes) and len(uid) == 128
    torch.cuda.set_device(rank)
    comm = create_communicator("nccl", rank=rank, world_size=world_size, unique_id=uid, device=rank)
    assert isinstance(comm, NcclComm) and comm.device == torch.device("cuda", rank)
    check_collectives(comm)
    check_split(comm)
    _check_graph_capture(comm)
    comm.destroy()
    gloo.destroy()


def test_nccl_two_gpus(tmp_path: Path) -> None:
    run_rendezvous_ranks(_nccl_rank, 2, tmp_path, timeout_s=180)


_NO_DESTROY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from datetime import timedelta
    from distrt.parallel.comm_factory import create_communicator
    from distrt.parallel.comm_nccl import nccl_unique_id
    rank, init = int(sys.argv[1]), sys.argv[2]
    gloo = create_communicator("gloo", rank=rank, world_size=2, init_method=init, timeout=timedelta(seconds=60))
    uid = gloo.broadcast_object(nccl_unique_id() if rank == 0 else None, 0)
    comm = create_communicator("nccl", rank=rank, world_size=2, unique_id=uid, device=rank)
    x = comm.all_reduce(torch.ones(8, device=f"cuda:{rank}"))
    torch.cuda.synchronize()
    print("sum", int(x[0].item()), flush=True)
    # no comm.destroy(): the atexit hook must release NCCL so the process exits
    """
)


def test_nccl_process_exits_without_explicit_destroy(tmp_path: Path) -> None:
    from distrt.parallel.comm_torch_dist import file_init_method

    init = file_init_method(tmp_path / "rendezvous")
    procs = [
        subprocess.Popen([sys.executable, "-c", _NO_DESTROY_SCRIPT, str(r), init], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a process with a live NCCL communicator did not exit within 120 s")
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "sum 2" in out, out
