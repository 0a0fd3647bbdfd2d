"""The one-shot IPC all-reduce (distrt/parallel/custom_allreduce.py).

CPU: the size/chunk decisions, the factory saying "unsupported" on every rank, and the kernel's
protocol under TRITON_INTERPRET=1 with the peers emulated in host memory (their publish + signal
written by the test, the way their kernels would): slots by parity, flag values, the rank-order sum,
bitwise-equal results across ranks, and the spin limit setting the error word instead of hanging.
GPU (2 devices): correctness against a torch sum for several sizes and dtypes, the NCCL fallback,
CUDA-graph replays with fresh inputs, bitwise equality across ranks, and the timeout path.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from comm_checks import nccl_pair, run_ranks, run_rendezvous_ranks

from distrt.parallel import custom_allreduce as car
from distrt.parallel.comm import SingleRankComm

# --------------------------------------------------------------------------------------------- CPU


def test_should_use_decisions() -> None:
    assert car.should_use(8 << 10, 2)
    assert car.should_use(64 << 10, 8)
    assert not car.should_use(8 << 10, 1)  # nothing to reduce
    assert not car.should_use(8 << 10, 9)  # beyond one NVLink node's 8 GPUs
    assert not car.should_use(0, 2)
    assert not car.should_use(8 << 10 | 8, 2)  # not a multiple of 16 bytes
    assert not car.should_use(2 << 20, 2)  # above max_bytes
    assert not car.should_use(256 << 10, 8)  # one-shot reads 7 x 256 KB per rank: NCCL's size
    assert car.should_use(256 << 10, 2, max_bytes=256 << 10) and not car.should_use(256 << 10, 2, max_bytes=128 << 10)
    assert car.should_use(16 << 20, 2, max_bytes=16 << 20)  # two ranks: one-shot at every size the buffer holds
    assert not car.should_use(1 << 20, 4, max_bytes=16 << 20)  # four: 3 x 1 MB into every rank, NCCL's size


def test_chunking() -> None:
    assert car.launch_grid(8 << 10, 4096) == 2 and car.launch_grid(8 << 10 | 16, 4096) == 3
    assert car.launch_grid(4 << 20, 4096, programs=132) == 132  # 1024 chunks: every program loops
    assert car.launch_grid(8 << 10, 4096, programs=132) == 2
    assert car.default_max_bytes(2, 4096, 2048) == 16 << 20  # a 2048-token bf16 prefill step of an 8B model
    assert car.default_max_bytes(4, 4096, 2048) == car.DEFAULT_MAX_BYTES
    assert car.default_max_bytes(2, 8192, 16384) == car.MAX_BYTES_CAP  # 256 MB prefill steps: capped
    assert [car.num_warps_for(c) for c in (512, 2048, 4096, 16384)] == [1, 4, 8, 8]


def test_env_config() -> None:
    assert car.env_config({}) == {} and car.env_config({"DISTRT_IPC_ALLREDUCE": ""}) == {}
    assert car.env_config({"DISTRT_IPC_ALLREDUCE": "push:16384"}) == {"push": True, "chunk_bytes": 16384}
    assert car.env_config({"DISTRT_IPC_ALLREDUCE": "pull"}) == {"push": False}
    with pytest.raises(ValueError, match="DISTRT_IPC_ALLREDUCE"):
        car.env_config({"DISTRT_IPC_ALLREDUCE": "fast:4k"})


def test_factory_none_for_single_rank() -> None:
    assert car.create_ipc_all_reduce(SingleRankComm()) is None


def _factory_rank(rank: int, world: int, init: str) -> None:
    from distrt.parallel.comm_factory import create_communicator

    comm = create_communicator("gloo", rank=rank, world_size=world, init_method=init, timeout=timedelta(seconds=60))
    try:
        assert car.create_ipc_all_reduce(comm) is None  # gloo's device is the CPU
        if not torch.cuda.is_available():
            assert car.create_ipc_all_reduce(comm, device="cuda:0") is None
        comm.barrier()
    finally:
        comm.destroy()


def test_factory_none_on_cpu(tmp_path: Path) -> None:
    run_rendezvous_ranks(_factory_rank, 2, tmp_path, timeout_s=90)


_interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="emulated peers need the Triton interpreter (host memory)")


class _Emulated:
    """``world`` ranks' IPC areas in host memory; rank 0's kernel runs for real, the others' halves
    (publish + signal) are written by ``publish`` before rank 0 runs, then their kernels run too."""

    def __init__(self, world: int, max_bytes: int, chunk: int, push: bool, programs: int | None = None) -> None:
        self.world, self.max_bytes, self.chunk, self.push = world, max_bytes, chunk, push
        self.programs = programs or max_bytes // chunk
        self.data = [torch.zeros(2 * world * max_bytes, dtype=torch.uint8) for _ in range(world)]
        self.flags = [torch.zeros(self.programs, car.FLAG_STRIDE, dtype=torch.int64) for _ in range(world)]
        self.data_ptrs = [d.data_ptr() for d in self.data]
        self.flag_ptrs = [f.data_ptr() for f in self.flags]
        self.counters = [torch.zeros(self.programs, dtype=torch.int64) for _ in range(world)]
        self.errs = [torch.zeros(1, dtype=torch.int32) for _ in range(world)]

    def _slot(self, holder: int, slot: int, src: int, dtype: torch.dtype) -> torch.Tensor:
        cap = self.max_bytes // torch.empty(0, dtype=dtype).element_size()
        return self.data[holder].view(dtype)[(slot * self.world + src) * cap:(slot * self.world + src + 1) * cap]

    def publish(self, src: int, x: torch.Tensor) -> None:
        """What rank ``src``'s kernel does before it waits: each program p publishes its chunks
        (p, p + programs, ...) in slot (its call number) % 2 and signals that call number to every peer."""
        holders = [d for d in range(self.world) if d != src] if self.push else [src]
        per = self.chunk // x.element_size()
        nchunks = car.launch_grid(x.numel() * x.element_size(), self.chunk)
        for p in range(car.launch_grid(x.numel() * x.element_size(), self.chunk, self.programs)):
            call = int(self.counters[src][p]) + 1
            for b in range(p, nchunks, self.programs):
                chunk = x[b * per:(b + 1) * per]
                for h in holders:
                    self._slot(h, call % 2, src, x.dtype)[b * per:b * per + chunk.numel()] = chunk
            for d in range(self.world):
                if d != src:
                    self.flags[d][p, src] = call

    def run(self, rank: int, x: torch.Tensor, spin_limit: int = 50) -> torch.Tensor:
        return car.launch(x, self.data_ptrs, self.flag_ptrs, self.counters[rank], self.errs[rank], rank=rank,
                          world=self.world, max_bytes=self.max_bytes, chunk_bytes=self.chunk, push=self.push,
                          spin_limit=spin_limit, programs=self.programs)


@_interpreted
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_protocol_emulated_peers(dtype: torch.dtype, push: bool) -> None:
    pytest.importorskip("triton")
    world, max_bytes, chunk = 3, 4096, 1024
    em = _Emulated(world, max_bytes, chunk, push)
    es = torch.empty(0, dtype=dtype).element_size()
    numels = [max_bytes // es - 8, 24, chunk // es + 8]  # full, one program's tail, two programs
    for call, numel in enumerate(numels, start=1):
        grid = car.launch_grid(numel * es, chunk)
        g = torch.Generator().manual_seed(call)
        xs = [torch.randn(numel, generator=g).to(dtype) for _ in range(world)]
        for src in range(1, world):
            em.publish(src, xs[src])
        outs = [em.run(r, xs[r].clone()) for r in range(world)]
        assert [int(e) for e in em.errs] == [0] * world
        # the programs that ran advance their counters, the same on every rank: call 1 ran all 4,
        # call 2 only program 0, call 3 programs 0 and 1 (which now use different slots)
        for r in range(world):
            assert torch.equal(em.counters[r], em.counters[0])
        assert em.counters[0].tolist() == {1: [1, 1, 1, 1], 2: [2, 1, 1, 1], 3: [3, 2, 1, 1]}[call]
        # rank 0's programs published their chunks and signalled every peer with their call numbers
        per = chunk // es
        for p in range(grid):
            mine = int(em.counters[0][p])
            assert all(int(em.flags[d][p, 0]) == mine for d in range(1, world))
            piece = xs[0][p * per:(p + 1) * per]
            holder = 1 if push else 0
            assert torch.equal(em._slot(holder, mine % 2, 0, dtype)[p * per:p * per + piece.numel()], piece)
        want = xs[0].float()
        for x in xs[1:]:
            want = want + x.float()
        for r in range(1, world):
            assert torch.equal(outs[r], outs[0]), f"rank {r} differs from rank 0 (call {call})"
        if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest)
            torch.testing.assert_close(outs[0].float(), want, atol=0.1, rtol=2 ** -7)
        else:
            assert torch.equal(outs[0], want.to(dtype)), f"call {call}"


@_interpreted
def test_kernel_spin_limit_sets_error_instead_of_hanging() -> None:
    pytest.importorskip("triton")
    em = _Emulated(world=2, max_bytes=4096, chunk=1024, push=False)
    em.run(0, torch.ones(64), spin_limit=20)  # rank 1 never signals
    assert int(em.errs[0]) == 2  # 1 + the rank it gave up on
    assert em.flags[1][0, 0] == 1  # its own signal went out all the same


@_interpreted
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_kernel_loops_when_chunks_exceed_programs(push: bool) -> None:
    """3 programs own 8 chunks (0,3,6 / 1,4,7 / 2,5): every chunk is published, reduced and summed
    exactly; a following 1-chunk call runs program 0 only, with its own parity."""
    pytest.importorskip("triton")
    world, max_bytes, chunk = 2, 8192, 1024
    em = _Emulated(world, max_bytes, chunk, push, programs=3)
    for call, numel in enumerate([max_bytes // 4 - 4, 200], start=1):
        xs = [torch.randn(numel, generator=torch.Generator().manual_seed(10 * call + r)) for r in range(world)]
        em.publish(1, xs[1])
        outs = [em.run(r, xs[r].clone()) for r in range(world)]
        assert [int(e) for e in em.errs] == [0] * world
        assert em.counters[0].tolist() == {1: [1, 1, 1], 2: [2, 1, 1]}[call]
        assert torch.equal(em.counters[1], em.counters[0])
        assert torch.equal(outs[0], xs[0] + xs[1]) and torch.equal(outs[1], outs[0]), f"call {call}"


def _shm_rank(rank: int, world: int, names: list[str], push: bool) -> None:
    """One rank in its own process: every rank's area is a shared-memory block mapped here (the
    host stand-in for cudaIpcOpenMemHandle), and the interpreted kernels of all ranks run at once."""
    from multiprocessing import shared_memory

    max_bytes, chunk = 4096, 1024
    blocks = [shared_memory.SharedMemory(name=n) for n in names]
    try:
        bases = [torch.frombuffer(b.buf, dtype=torch.uint8).data_ptr() for b in blocks]
        data_bytes = 2 * world * max_bytes
        counters = torch.zeros(max_bytes // chunk, dtype=torch.int64)
        err = torch.zeros(1, dtype=torch.int32)
        for call, (dtype, numel) in enumerate([(torch.float32, 1016), (torch.float16, 24), (torch.float32, 264),
                                              (torch.float16, 2040), (torch.float32, 4), (torch.float32, 1016)]):
            xs = [torch.randn(numel, generator=torch.Generator().manual_seed(call * 10 + r)).to(dtype)
                  for r in range(world)]
            got = car.launch(xs[rank].clone(), bases, [b + data_bytes for b in bases], counters, err, rank=rank,
                             world=world, max_bytes=max_bytes, chunk_bytes=chunk, push=push, spin_limit=200_000)
            assert int(err) == 0, f"call {call}: gave up waiting for rank {int(err) - 1}"
            want = xs[0].float()
            for x in xs[1:]:
                want = want + x.float()
            assert torch.equal(got, want.to(dtype)), f"rank {rank} call {call}: {got[:4]} vs {want[:4]}"
    finally:
        for b in blocks:
            b.close()


@_interpreted
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_kernel_protocol_concurrent_processes(push: bool) -> None:
    """Three ranks really racing each other (sizes change between calls, so the programs' parities
    diverge), each result exactly the fp32 sum."""
    pytest.importorskip("triton")
    from multiprocessing import shared_memory

    world = 3
    size = 2 * world * 4096 + (4096 // 1024) * car.FLAG_STRIDE * 8
    blocks = [shared_memory.SharedMemory(create=True, size=size) for _ in range(world)]
    try:
        for b in blocks:
            b.buf[:size] = bytes(size)
        run_ranks(_shm_rank, world, (world, [b.name for b in blocks], push), timeout_s=120)
    finally:
        for b in blocks:
            b.close()
            b.unlink()


# --------------------------------------------------------------------------------------------- GPU

_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _input(rank: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed * 100 + rank)).to(dtype)


def _want(world: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    acc = _input(0, numel, dtype, seed).float()
    for r in range(1, world):
        acc = acc + _input(r, numel, dtype, seed).float()
    return acc.to(dtype)


def _check_eager(comm, ar, rank: int, world: int) -> None:  # type: ignore[no-untyped-def]
    dev = comm.device
    cases = [(dtype, nbytes) for dtype in car.DTYPES for nbytes in (16, 8 << 10, (8 << 10) + 16, 64 << 10, 256 << 10)]
    cases += [(torch.bfloat16, 14), (torch.float32, 512 << 10)]  # not 16-byte sized / above max_bytes: NCCL
    for seed, (dtype, nbytes) in enumerate(cases):
        numel = nbytes // torch.empty(0, dtype=dtype).element_size()
        got = ar.all_reduce(_input(rank, numel, dtype, seed).to(dev))
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), _want(world, numel, dtype, seed)), f"{dtype} {nbytes} B"
        both = comm.all_gather(got.unsqueeze(0))  # [ranks, numel]
        assert all(torch.equal(both[0], both[r]) for r in range(world)), f"ranks differ: {dtype} {nbytes} B"
    # a non-contiguous view and a misaligned one take the kernel path through a copy
    base = _input(rank, 64 * 33, torch.float32, 99).to(dev)
    got = ar.all_reduce(base.view(64, 33)[:, 1:].t())
    assert torch.equal(got.cpu(), _want(world, 64 * 33, torch.float32, 99).view(64, 33)[:, 1:].t())
    got = ar.all_reduce(base[1:1 + 1024])  # 4 bytes past a 16-byte boundary
    assert torch.equal(got.cpu(), _want(world, 64 * 33, torch.float32, 99)[1:1 + 1024])
    ar.check()


def _check_graph(comm, ar, rank: int, world: int,  # type: ignore[no-untyped-def]
                 specs: list[tuple[torch.dtype, int]] | None = None, steps: int = 25, base: int = 1000) -> None:
    """(dtype, numel) calls captured in one graph, replayed with fresh inputs; every 5th replay is
    followed by an eager call, which shifts the parity of some programs."""
    dev = comm.device
    specs = specs or [(torch.bfloat16, 4096), (torch.float32, 2048), (torch.bfloat16, 64 << 9)]  # 3 calls: odd
    bufs = [torch.zeros(n, dtype=d, device=dev) for d, n in specs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [ar.all_reduce(b) for b in bufs]
    for step in range(steps):
        for i, b in enumerate(bufs):
            b.copy_(_input(rank, b.numel(), b.dtype, base + 10 * step + i))
        graph.replay()
        if step % 5 == 4:
            ar.all_reduce(torch.ones(8 << 10, dtype=torch.bfloat16, device=dev))
        torch.cuda.synchronize()
        for i, (b, o) in enumerate(zip(bufs, outs, strict=True)):
            assert torch.equal(o.cpu(), _want(world, b.numel(), b.dtype, base + 10 * step + i)), f"replay {step} #{i}"
            both = comm.all_gather(o.unsqueeze(0))
            assert torch.equal(both[0], both[1]), f"replay {step} #{i}: ranks differ"
    ar.check()
    del graph


def _check_large(comm, ar, rank: int, world: int) -> None:  # type: ignore[no-untyped-def]
    """Messages of more chunks than programs (each program loops), mixed with small ones, eager and
    in a graph: a 2048-token prefill step's 16 MB, a 512-sequence decode's 4 MB, 8 KB."""
    dev = comm.device
    assert ar.programs <= torch.cuda.get_device_properties(dev).multi_processor_count
    sizes = [(torch.bfloat16, 16 << 20), (torch.bfloat16, 8 << 10), (torch.float32, (4 << 20) + 16),
             (torch.bfloat16, 4 << 20)]
    for seed, (dtype, nbytes) in enumerate(sizes):
        numel = nbytes // torch.empty(0, dtype=dtype).element_size()
        assert ar.supports(torch.empty(numel, dtype=dtype, device=dev))
        got = ar.all_reduce(_input(rank, numel, dtype, 500 + seed).to(dev))
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), _want(world, numel, dtype, 500 + seed)), f"{dtype} {nbytes} B"
    # 4 MB, 8 KB, 16 MB of bf16 in one graph
    _check_graph(comm, ar, rank, world, [(torch.bfloat16, n // 2) for n in (4 << 20, 8 << 10, 16 << 20)], 6, 2000)


def _gpu_rank(rank: int, world: int, init: str) -> None:
    gloo, comm = nccl_pair(rank, world, init)
    for push in (False, True):
        ar = car.create_ipc_all_reduce(comm, max_bytes=256 << 10, push=push, spin_limit=1 << 22)
        assert ar is not None, "2 GPUs of one host should support the IPC all-reduce"
        _check_eager(comm, ar, rank, world)
        _check_graph(comm, ar, rank, world)
        ar.close()
    ar = car.create_ipc_all_reduce(comm, max_bytes=16 << 20, spin_limit=1 << 22)
    assert ar is not None
    _check_large(comm, ar, rank, world)
    ar.close()
    comm.destroy()
    gloo.destroy()


@pytest.mark.gpu
@_two_gpus
def test_two_gpus(tmp_path: Path) -> None:
    run_rendezvous_ranks(_gpu_rank, 2, tmp_path, timeout_s=240)


def _timeout_rank(rank: int, world: int, init: str) -> None:
    gloo, comm = nccl_pair(rank, world, init)
    ar = car.IpcAllReduce(comm, comm.device, 64 << 10)
    ar.spin_limit = 1000  # after the collective warm-up
    if rank == 0:  # rank 1 never joins this call
        ar.all_reduce(torch.ones(1024, device=comm.device))
        with pytest.raises(RuntimeError, match="timed out waiting for rank 1"):
            ar.check()
    ar.close()
    comm.destroy()
    gloo.destroy()


@pytest.mark.gpu
@_two_gpus
def test_spin_limit_on_gpu(tmp_path: Path) -> None:
    run_rendezvous_ranks(_timeout_rank, 2, tmp_path, timeout_s=180)
