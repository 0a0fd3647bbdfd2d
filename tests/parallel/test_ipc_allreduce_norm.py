"""All-reduce + residual add + RMSNorm in one IPC kernel (distrt/parallel/ipc_allreduce_norm.py).

CPU (TRITON_INTERPRET=1): the row-mode protocol with peers emulated in host memory (their publish +
signal written the way their kernels would) and with ranks racing in processes over shared memory;
results against a plain-torch reference: the fp32 rank-order sum rounded to the dtype, then
fused_add_rms_norm_ref. GPU (2 devices): bitwise equal to IpcAllReduce.all_reduce followed by the
fused add + RMSNorm kernel, eager and inside a CUDA graph, interleaved with plain all-reduces, and in
back-to-back calls that change the row size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from comm_checks import nccl_pair, run_ranks, run_rendezvous_ranks

from distrt.kernels.norm import fused_add_rms_norm_ref
from distrt.parallel import custom_allreduce as car
from distrt.parallel import ipc_allreduce_norm as arn

_interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="emulated peers need the Triton interpreter (host memory)")
EPS = 1e-5


def _want(xs: list[torch.Tensor], residual: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    return fused_add_rms_norm_ref(acc.to(xs[0].dtype), residual, w, EPS)


def _check(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    assert torch.equal(got[1], want[1]), f"{what}: residual"
    # the norm itself: the interpreter's rsqrt/sum order may differ from torch's by an ulp
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-3 if got[0].dtype == torch.float16 else 1e-6,
                               atol=1e-3 if got[0].dtype == torch.float16 else 1e-6, msg=what)


class _Emulated:
    def __init__(self, world: int, max_bytes: int, programs: int, push: bool) -> None:
        self.world, self.max_bytes, self.programs, self.push = world, max_bytes, programs, push
        self.data = [torch.zeros(2 * world * max_bytes, dtype=torch.uint8) for _ in range(world)]
        self.flags = [torch.zeros(programs, car.FLAG_STRIDE, dtype=torch.int64) for _ in range(world)]
        self.counters = [torch.zeros(programs, dtype=torch.int64) for _ in range(world)]
        self.errs = [torch.zeros(1, dtype=torch.int32) for _ in range(world)]

    def _slot(self, holder: int, slot: int, src: int, dtype: torch.dtype) -> torch.Tensor:
        cap = self.max_bytes // torch.empty(0, dtype=dtype).element_size()
        return self.data[holder].view(dtype)[(slot * self.world + src) * cap:(slot * self.world + src + 1) * cap]

    def publish(self, src: int, x: torch.Tensor, advance: bool = False) -> None:
        """Rank src's kernel before it waits: program p writes rows p, p + P, ... into its own range
        of the area (j-th row at p * region + j * hidden) and signals. advance: src is emulated only
        (no kernel of its own runs this call), so the publish also counts the call."""
        rows, hidden = x.shape
        holders = [d for d in range(self.world) if d != src] if self.push else [src]
        region = arn.region_bytes(self.max_bytes, self.programs) // x.element_size()
        for p in range(min(rows, self.programs)):
            call = int(self.counters[src][p]) + 1
            if advance:
                self.counters[src][p] = call
            for j, row in enumerate(range(p, rows, self.programs)):
                at = p * region + j * hidden
                for h in holders:
                    self._slot(h, call % 2, src, x.dtype)[at:at + hidden] = x[row]
            for d in range(self.world):
                if d != src:
                    self.flags[d][p, src] = call

    def run(self, rank: int, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
            spin_limit: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        return arn.launch(x, residual, w, EPS, torch.empty_like(x), torch.empty_like(x),
                          [d.data_ptr() for d in self.data], [f.data_ptr() for f in self.flags], self.counters[rank],
                          self.errs[rank], rank=rank, world=self.world, max_bytes=self.max_bytes, push=self.push,
                          spin_limit=spin_limit, programs=self.programs)


@_interpreted
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("world", [2, 3])
def test_row_mode_emulated_peers(world: int, dtype: torch.dtype, push: bool) -> None:
    pytest.importorskip("triton")
    hidden, programs = 40, 3  # 80/160-byte rows, not a power of two; 3 programs loop over up to 7 rows
    em = _Emulated(world, 12 * hidden * 4, programs, push)
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(5)).to(dtype)
    for call, rows in enumerate([7, 1, 2, 7], start=1):
        g = torch.Generator().manual_seed(call)
        xs = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world)]
        residual = torch.randn(rows, hidden, generator=g).to(dtype)
        for src in range(1, world):
            em.publish(src, xs[src])
        outs = [em.run(r, xs[r], residual, w) for r in range(world)]
        assert [int(e) for e in em.errs] == [0] * world, f"call {call}"
        for r in range(world):
            assert torch.equal(em.counters[r], em.counters[0])
        want = _want(xs, residual, w)
        for r in range(world):
            assert torch.equal(outs[r][0], outs[0][0]) and torch.equal(outs[r][1], outs[0][1]), f"rank {r} call {call}"
        _check(outs[0], want, f"call {call}")
    # calls ran programs [0..2], [0], [0, 1], [0..2]: counters (call numbers) per program
    assert em.counters[0].tolist() == [4, 3, 2]


@_interpreted
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_row_mode_peer_a_call_ahead(push: bool) -> None:
    """The latest a program may read: rank 0 finished call k (it saw every program's signal, sent
    before that program reads) and has published call k + 1 while rank 1 still reads call k. Calls
    change the row size (dtype), so rows sit at other offsets in every call: no program's publish may
    land where another program reads (custom_allreduce's two-slot argument, per program)."""
    pytest.importorskip("triton")
    hidden, programs = 24, 2  # 48/96-byte rows
    em = _Emulated(2, 1024, programs, push)
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(7))
    seq = [(torch.float32, 5), (torch.float16, 1), (torch.float32, 3), (torch.float16, 8), (torch.float32, 2),
           (torch.float16, 7), (torch.float16, 2), (torch.float32, 4)]
    calls = []
    for i, (dtype, rows) in enumerate(seq):
        g = torch.Generator().manual_seed(100 + i)
        calls.append(([torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(2)],
                      torch.randn(rows, hidden, generator=g).to(dtype)))
    for k in range(0, len(seq), 2):
        em.publish(0, calls[k][0][0], advance=True)
        em.publish(0, calls[k + 1][0][0], advance=True)  # rank 0 is a call ahead of rank 1
        for xs, residual in calls[k:k + 2]:
            got = em.run(1, xs[1], residual, w.to(xs[1].dtype))
            assert int(em.errs[1]) == 0, f"call {k}"
            _check(got, _want(xs, residual, w.to(xs[1].dtype)), f"call {k} ({xs[1].dtype}, {xs[1].shape[0]} rows)")
    assert torch.equal(em.counters[0], em.counters[1])


@_interpreted
def test_row_mode_spin_limit_sets_error() -> None:
    pytest.importorskip("triton")
    em = _Emulated(2, 1024, 2, push=True)
    x = torch.ones(2, 16)
    em.run(0, x, x.clone(), torch.ones(16), spin_limit=20)  # rank 1 never signals
    assert int(em.errs[0]) == 2


def _shm_rank(rank: int, world: int, names: list[str], push: bool) -> None:
    from multiprocessing import shared_memory

    max_bytes, programs, hidden = 4096, 2, 24
    blocks = [shared_memory.SharedMemory(name=n) for n in names]
    try:
        bases = [torch.frombuffer(b.buf, dtype=torch.uint8).data_ptr() for b in blocks]
        data_bytes = 2 * world * max_bytes
        counters = torch.zeros(programs, dtype=torch.int64)
        err = torch.zeros(1, dtype=torch.int32)
        w = torch.randn(hidden, generator=torch.Generator().manual_seed(3))
        for call, (dtype, rows) in enumerate([(torch.float32, 5), (torch.float16, 1), (torch.float32, 3),
                                              (torch.float16, 8), (torch.float32, 2)]):
            g = [torch.Generator().manual_seed(call * 10 + r) for r in range(world)]
            xs = [torch.randn(rows, hidden, generator=g[r]).to(dtype) for r in range(world)]
            residual = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(call)).to(dtype)
            got = arn.launch(xs[rank], residual, w.to(dtype), EPS, torch.empty_like(xs[rank]), torch.empty_like(residual),
                             bases, [b + data_bytes for b in bases], counters, err, rank=rank, world=world,
                             max_bytes=max_bytes, push=push, spin_limit=200_000, programs=programs)
            assert int(err) == 0, f"call {call}: gave up waiting for rank {int(err) - 1}"
            _check(got, _want(xs, residual, w.to(dtype)), f"rank {rank} call {call}")
    finally:
        for b in blocks:
            b.close()


@_interpreted
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_row_mode_concurrent_processes(push: bool) -> None:
    pytest.importorskip("triton")
    from multiprocessing import shared_memory

    world = 2
    size = 2 * world * 4096 + 2 * car.FLAG_STRIDE * 8
    blocks = [shared_memory.SharedMemory(create=True, size=size) for _ in range(world)]
    try:
        for b in blocks:
            b.buf[:size] = bytes(size)
        run_ranks(_shm_rank, world, (world, [b.name for b in blocks], push), timeout_s=120)
    finally:
        for b in blocks:
            b.close()
            b.unlink()


def test_fast_comm_falls_back_without_kernel() -> None:
    """No row-mode object (or a shape it does not take): all_reduce then fused add + RMSNorm."""
    from distrt.layers.norm import RMSNorm
    from distrt.layers.tp_norm import all_reduce_then_norm
    from distrt.parallel.comm import SingleRankComm
    from distrt.parallel.fast_allreduce import FastAllReduceComm

    class _Ipc:
        def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
            return t * 2  # stands for the sum over two ranks holding the same x

    comm = FastAllReduceComm(SingleRankComm(), _Ipc())
    norm = RMSNorm(8, EPS, torch.float32)
    norm.weight.data = torch.randn(8)
    x, res = torch.randn(3, 8), torch.randn(3, 8)
    got = all_reduce_then_norm(norm, x, res, comm)
    want = fused_add_rms_norm_ref(x * 2, res, norm.weight, EPS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = all_reduce_then_norm(norm, x, None, comm)  # no residual: all-reduce, then the plain norm
    assert torch.equal(got[1], x * 2)


# --------------------------------------------------------------------------------------------- GPU

_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _gpu_rank(rank: int, world: int, init: str) -> None:
    from distrt.kernels import fused_add_rms_norm

    gloo, comm = nccl_pair(rank, world, init)
    dev = comm.device
    hidden = 4096
    for push in (True, False):
        ar = car.create_ipc_all_reduce(comm, max_bytes=16 << 20, push=push, spin_limit=1 << 22)
        norm = arn.create_ipc_all_reduce_norm(comm, dev, 16 << 20, hidden, push=push, spin_limit=1 << 22)
        assert ar is not None and norm is not None
        w = torch.randn(hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(dev)

        def inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed * 10 + rank))
            res = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))
            return x.to(torch.bfloat16).to(dev), res.to(torch.bfloat16).to(dev)

        def reference(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return fused_add_rms_norm(ar.all_reduce(x.clone()), res, w, EPS)

        for seed, rows in enumerate([1, 3, 8, 200, 2048]):  # decode sizes, a 512-ish batch, a prefill step
            x, res = inputs(rows, seed)
            got = norm.all_reduce_add_rms_norm(x, res, w, EPS)
            want = reference(x, res)
            torch.cuda.synchronize()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"push={push} rows={rows}"
        # in a CUDA graph, interleaved with plain all-reduces, replayed with fresh inputs
        xb, rb = inputs(4, 100)
        pb = torch.zeros(8 << 10, dtype=torch.bfloat16, device=dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o1 = norm.all_reduce_add_rms_norm(xb, rb, w, EPS)
            p1 = ar.all_reduce(pb)
            o2 = norm.all_reduce_add_rms_norm(o1[0], o1[1], w, EPS)
        for step in range(12):
            x, res = inputs(4, 200 + step)
            xb.copy_(x)
            rb.copy_(res)
            pb.copy_(torch.full_like(pb, float(rank + step)))
            graph.replay()
            if step % 4 == 3:  # an eager call between replays shifts the parities
                norm.all_reduce_add_rms_norm(*inputs(2, 300 + step), w, EPS)
            torch.cuda.synchronize()
            w1 = reference(x, res)
            w2 = fused_add_rms_norm(ar.all_reduce(w1[0].clone()), w1[1], w, EPS)
            assert torch.equal(o1[0], w1[0]) and torch.equal(o1[1], w1[1]), f"replay {step}: first"
            assert torch.equal(o2[0], w2[0]) and torch.equal(o2[1], w2[1]), f"replay {step}: second"
            assert torch.equal(p1, torch.full_like(pb, float(2 * step + 1))), f"replay {step}: plain all-reduce"
        norm.buf.check()
        del graph
        norm.close()
        ar.close()
    # the engine's sizing for a 512-token budget (default_max_bytes: 4 MB), filled by 512 rows
    ar = car.create_ipc_all_reduce(comm, max_bytes=4 << 20, spin_limit=1 << 22)
    norm = arn.create_ipc_all_reduce_norm(comm, dev, 4 << 20, hidden, spin_limit=1 << 22)
    assert ar is not None and norm is not None
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(dev)
    for seed, rows in enumerate([512, 1, 511, 64, 512]):
        x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed * 10 + rank)).to(torch.bfloat16).to(dev)
        res = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(dev)
        got = norm.all_reduce_add_rms_norm(x, res, w, EPS)
        want = fused_add_rms_norm(ar.all_reduce(x.clone()), res, w, EPS)
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"4 MB buffer, rows={rows}"
    # back-to-back calls whose row size changes (fp32 / bf16 rows), nothing in between: a rank runs
    # ahead into the next call while its peer still reads this one (per-program byte ranges)
    mixed = []
    for seed, (dtype, rows) in enumerate([(torch.float32, 200), (torch.bfloat16, 512), (torch.float32, 7),
                                          (torch.bfloat16, 300), (torch.float32, 133), (torch.bfloat16, 1)] * 2):
        x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed * 10 + rank)).to(dtype).to(dev)
        res = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype).to(dev)
        assert norm.supports(x, res), (dtype, rows)
        mixed.append((x, res, w.to(dtype)))
    torch.cuda.synchronize()
    outs = [norm.all_reduce_add_rms_norm(x, res, wd, EPS) for x, res, wd in mixed]
    for (x, res, wd), got in zip(mixed, outs):
        want = fused_add_rms_norm(ar.all_reduce(x.clone()), res, wd, EPS)
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"mixed {x.dtype} rows={x.shape[0]}"
    norm.buf.check()
    norm.close()
    ar.close()
    comm.destroy()
    gloo.destroy()


@pytest.mark.gpu
@_two_gpus
def test_two_gpus_bitwise(tmp_path: Path) -> None:
    run_rendezvous_ranks(_gpu_rank, 2, tmp_path, timeout_s=300)
