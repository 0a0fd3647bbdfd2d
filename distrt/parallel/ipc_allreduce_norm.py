"""All-reduce + residual add + RMSNorm in one kernel, over the one-shot IPC buffers of custom_allreduce.

A tensor-parallel decoder layer ends its attention and its MLP with an all-reduce that an RMSNorm
follows (the residual add fused into it). Done apart that is two launches, each a few microseconds of
a batch-1 decode step at any TP size; here it is one. The protocol is custom_allreduce's, in "row
mode": program p owns whole token rows p, p + P, p + 2P, ... (P = at most the SM count, so all
programs are resident and may spin on each other), which lets one program normalize the rows it
summed:

    publish my rows at data[slot][RANK] (push: into every peer's buffer; pull: my own), row p + jP
        at byte p * R + j * row_bytes, R = (area bytes / P) rounded down to 16: program p's range
    signal flags[p][RANK] = call on every peer; wait until every peer's flags[p][s] >= call (bounded)
    per owned row:  s    = sum over ranks, in rank order, in fp32, rounded to the dtype  (= all_reduce)
                    res' = (s + residual) in fp32, rounded                  -> residual_out
                    out  = res' * rsqrt(mean(res'^2) + eps) * weight        -> out (fp32 math)

So it is bitwise what ``IpcAllReduce.all_reduce`` followed by ``kernels.fused_add_rms_norm`` returns.
custom_allreduce's two-slot argument holds per program only if a program owns the same bytes in
every call: a rank may start call k+1 while a peer's program q still reads call k, so program p of
call k+1 must not write where q read. Rows placed at row * row_bytes would move between programs
when the row size changes (another dtype or hidden size; the warm-up's fp32 calls), hence the
fixed ranges; a call takes the kernel when each program's ceil(rows / P) rows fit R, and
``create_ipc_all_reduce_norm`` sizes the area so that every message of max_bytes does.
It must not share data slots, flags or counters with the chunk-mode kernel: a rank finishes a call
as soon as its peers signalled, while a peer may still be reading that call's data out of its own
buffer (push), so only calls of one sequence may alternate two slots. ``IpcAllReduceNorm`` therefore
owns a second ``IpcAllReduce`` (its own allocation) and only uses its buffers and counters.
Workers build it only with DISTRT_FUSED_AR_NORM=1 (see executor/worker_host.py for why it is not the
default yet); without it the layers' deferred all-reduce takes the fallback below, which is the
unfused order. Rows beyond its buffer, rows that are not a multiple of 16 bytes, other dtypes or no
residual (the first layer's input norm: nothing to fuse there) go to the fallback (``all_reduce``
then the norm kernels); the choice depends on shapes only, the same on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from distrt.parallel import custom_allreduce as car

logger = logging.getLogger(__name__)

triton: Any = None
tl: Any = None


def _ar_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, data_ptrs, flag_ptrs, counter_ptr, err_ptr,
                    rows, eps, spin_limit,
                    RANK: tl.constexpr, WORLD: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
                    CAP: tl.constexpr, REGION: tl.constexpr, FLAGS: tl.constexpr, PUSH: tl.constexpr,
                    STRIDE: tl.constexpr):
    # REGION: elements of program pid's fixed byte range of a [slot][source] area; its j-th row
    # (row = pid + j * STRIDE) sits at pid * REGION + j * HIDDEN there, whatever the dtype and hidden
    pid = tl.program_id(0)
    elem = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < HIDDEN

    # One atomic (one thread; Triton broadcasts its result to the whole program): a plain load + store
    # lets a late warp load the counter after another warp stored call, so the program's threads could
    # disagree on call (slot, flag values, spin-loop exits: divergent barriers).
    call = tl.atomic_add(counter_ptr + pid, 1) + 1
    slot = call % 2
    mine = tl.multiple_of(data_ptrs[RANK].to(tl.int64).to(tl.pointer_type(elem)), 16)
    my_flags = flag_ptrs[RANK].to(tl.int64).to(tl.pointer_type(tl.int64)) + pid * FLAGS

    for row in range(pid, rows, STRIDE):
        offs = row * HIDDEN + cols  # < 2^31: the buffer caps rows x hidden
        boffs = pid * REGION + (row // STRIDE) * HIDDEN + cols
        x = tl.load(x_ptr + offs, mask=cmask, other=0.0)
        if PUSH:
            for r in tl.static_range(WORLD):
                if r != RANK:
                    peer = tl.multiple_of(data_ptrs[r].to(tl.int64).to(tl.pointer_type(elem)), 16)
                    tl.store(peer + (slot * WORLD + RANK) * CAP + boffs, x, mask=cmask)
        else:
            tl.store(mine + (slot * WORLD + RANK) * CAP + boffs, x, mask=cmask)
    tl.debug_barrier()  # every thread's stores happen-before the single-thread release below
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer_flags = flag_ptrs[r].to(tl.int64).to(tl.pointer_type(tl.int64)) + pid * FLAGS
            tl.atomic_xchg(peer_flags + RANK, call, sem="release", scope="sys")
    for r in tl.static_range(WORLD):
        if r != RANK:
            seen = tl.atomic_add(my_flags + r, 0, sem="acquire", scope="sys")
            spins = 0
            while (seen < call) & (spins < spin_limit):
                seen = tl.atomic_add(my_flags + r, 0, sem="acquire", scope="sys")
                spins += 1
            if seen < call:
                tl.store(err_ptr, r + 1)
    tl.debug_barrier()  # the acquire happens-before every thread's loads below

    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for row in range(pid, rows, STRIDE):
        offs = row * HIDDEN + cols  # < 2^31: the buffer caps rows x hidden
        boffs = pid * REGION + (row // STRIDE) * HIDDEN + cols
        for r in tl.static_range(WORLD):
            if r == RANK:
                v = tl.load(x_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
            else:
                if PUSH:
                    src = mine
                else:
                    src = tl.multiple_of(data_ptrs[r].to(tl.int64).to(tl.pointer_type(elem)), 16)
                v = tl.load(src + (slot * WORLD + r) * CAP + boffs, mask=cmask, other=0.0,
                            cache_modifier=".cg").to(tl.float32)
            if r == 0:
                acc = v
            else:
                acc = acc + v
        s = acc.to(elem)  # what the plain all-reduce returns
        res = tl.load(res_ptr + offs, mask=cmask, other=0.0)
        h = (s.to(tl.float32) + res.to(tl.float32)).to(elem)  # rounded, as fused_add_rms_norm does
        tl.store(res_out_ptr + offs, h, mask=cmask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / HIDDEN + eps)
        tl.store(out_ptr + offs, (hf * rstd * w).to(elem), mask=cmask)


def _jit() -> None:
    global triton, tl, _ar_norm_kernel
    if triton is not None:
        return
    import triton as _triton
    import triton.language as _tl

    tl = _tl
    _ar_norm_kernel = _triton.jit(do_not_specialize=["rows", "spin_limit"])(_ar_norm_kernel)
    triton = _triton


def num_warps_for(hidden: int) -> int:
    return max(1, min(16, (hidden * 2) // 1024))


def region_bytes(max_bytes: int, programs: int) -> int:
    """Bytes of each program's fixed range in a [slot][source] area of max_bytes."""
    return (max_bytes // programs) // car.ALIGN * car.ALIGN


def fits(rows: int, row_bytes: int, max_bytes: int, programs: int) -> bool:
    """Whether every program's rows (at most ceil(rows / programs)) fit its range."""
    per_program = -(-rows // programs) * row_bytes
    return rows > 0 and row_bytes % car.ALIGN == 0 and per_program <= region_bytes(max_bytes, programs)


def buffer_bytes(max_bytes: int, hidden_size: int, max_programs: int) -> int:
    """The area size under which every message of at most max_bytes in rows of hidden_size elements
    (any dtype, up to 4 bytes) fits: a program's ceil(rows / P) rows take at most max_bytes / P + one row."""
    return max_bytes + max_programs * hidden_size * 4


def launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
           residual_out: torch.Tensor, data_ptrs: Any, flag_ptrs: Any, counters: torch.Tensor, err: torch.Tensor, *,
           rank: int, world: int, max_bytes: int, push: bool, spin_limit: int, programs: int,
           warmup_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel alone (``IpcAllReduceNorm`` owns the buffers and checks). x, residual, out,
    residual_out: contiguous [rows, hidden]; residual_out may be residual (in place)."""
    _jit()
    rows, hidden = x.shape
    es = x.element_size()
    assert x.dtype in car.DTYPES and x.is_contiguous() and (hidden * es) % car.ALIGN == 0, (x.dtype, x.shape)
    assert fits(rows, hidden * es, max_bytes, programs), (rows, hidden, max_bytes, programs)
    for t in (residual, out, residual_out):
        assert t.shape == x.shape and t.dtype == x.dtype and t.is_contiguous(), (t.shape, t.dtype)
    assert weight.shape == (hidden,) and weight.is_contiguous()
    assert counters.dtype == torch.int64 and counters.numel() >= programs and err.dtype == torch.int32
    grid = (min(rows, programs),)
    args = (x, residual, weight, out, residual_out, tuple(data_ptrs), tuple(flag_ptrs), counters, err, rows,
            float(eps), spin_limit)
    meta = dict(RANK=rank, WORLD=world, HIDDEN=hidden, BLOCK_H=triton.next_power_of_2(hidden),
                CAP=max_bytes // es, REGION=region_bytes(max_bytes, programs) // es, FLAGS=car.FLAG_STRIDE,
                PUSH=push, STRIDE=programs,
                num_warps=num_warps_for(hidden))
    if warmup_only:
        _ar_norm_kernel.warmup(*args, grid=grid, **meta)
    else:
        _ar_norm_kernel[grid](*args, **meta)
    return out, residual_out


class IpcAllReduceNorm:
    """``all_reduce_add_rms_norm(x, residual, weight, eps) -> (normed, new_residual)`` over ``buf``, an
    ``IpcAllReduce`` of its own (built collectively with warmup=False; this object warms its kernel up).
    Same call contract as the all-reduce: every rank, same order and shapes, one stream."""

    def __init__(self, buf: car.IpcAllReduce, hidden_size: int, warmup: bool = True) -> None:
        self.buf = buf
        self.hidden_size = hidden_size
        if warmup:
            self._warmup()

    def supports(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        b = self.buf
        if b._closed or residual is None or x.dim() != 2 or x.dtype not in car.DTYPES or x.device != b.device:
            return False
        rows, hidden = x.shape
        return fits(rows, hidden * x.element_size(), b.max_bytes, b.programs)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        residual = residual.contiguous()
        out = torch.empty_like(x)
        new_res = torch.empty_like(x)
        if torch.cuda.current_device() != self.buf.device.index:
            with torch.cuda.device(self.buf.device):
                return self._launch(x, residual, weight, eps, out, new_res)
        return self._launch(x, residual, weight, eps, out, new_res)

    def _launch(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                out: torch.Tensor, new_res: torch.Tensor, warmup_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.buf
        return launch(x, residual, weight, eps, out, new_res, b._data_ptrs, b._flag_ptrs, b._counters, b._err,
                      rank=b.rank, world=b.world, max_bytes=b.max_bytes, push=b.push, spin_limit=b.spin_limit,
                      programs=b.programs, warmup_only=warmup_only)

    def _warmup(self) -> None:
        """Compiles the kernel for each dtype and runs it once (collectively), outside any capture."""
        b = self.buf
        with torch.cuda.device(b.device):
            samples = []
            for d in car.DTYPES:
                z = torch.zeros(1, self.hidden_size, dtype=d, device=b.device)
                w = torch.ones(self.hidden_size, dtype=d, device=b.device)
                samples.append((z, w))
                try:
                    self._launch(z, z.clone(), w, 1e-6, torch.empty_like(z), torch.empty_like(z), warmup_only=True)
                except Exception:
                    logger.debug("triton warmup() failed; compiling on first launch", exc_info=True)
            b.comm.barrier()
            for z, w in samples:
                self._launch(z, z.clone(), w, 1e-6, torch.empty_like(z), torch.empty_like(z))
        b.check()

    def close(self, collective: bool = True) -> None:
        self.buf.close(collective)


def create_ipc_all_reduce_norm(comm: Any, device: Any, max_bytes: int, hidden_size: int,
                               **kwargs: Any) -> IpcAllReduceNorm | None:
    """Collective: an ``IpcAllReduceNorm`` on every rank or None on every rank (as create_ipc_all_reduce).
    Its buffer is sized so that every [rows, hidden_size] message of at most max_bytes takes the kernel."""
    programs = min(car._sm_count(car._as_device(comm.device if device is None else device)), 1024)  # >= its P
    buf = car.create_ipc_all_reduce(comm, device, buffer_bytes(max_bytes, hidden_size, programs), warmup=False,
                                    **kwargs)
    if buf is None:
        return None
    try:
        return IpcAllReduceNorm(buf, hidden_size)
    except Exception:
        logger.warning("IPC all-reduce + norm warm-up failed on rank %d", comm.rank, exc_info=True)
        buf.close(collective=False)
        raise
