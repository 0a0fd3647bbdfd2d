"""One-shot all-reduce between the GPUs of one node: CUDA IPC buffers + a Triton kernel.

Tensor-parallel decode all-reduces 8-64 KB twice per layer; NCCL takes ~18 us for that on two
NVLink-connected H200s, this kernel ~4 us, and 18 us against NCCL's 44 for the 4 MB of a
512-sequence step. Every rank maps every peer's buffer (``cudaIpcOpenMemHandle``) and one kernel
launch does the whole reduction: no proxy thread, no protocol negotiation, capturable in a CUDA
graph. With 2 ranks it takes any size the buffer holds; with more, decode-sized messages (a one-shot
then moves more than a ring). Anything the kernel does not handle goes to the wrapped communicator.

Each rank owns one IPC allocation; data for source rank ``s`` sits at ``[slot][s]``::

    data   [2 slots][world][max_bytes]   slot = parity of the call (per program, see below)
    flags  [programs][8] int64           flags[p][s]: the last call in which rank s's program p
                                         published its chunk to this rank (only s writes it)

    pull          : rank r writes its chunk to its OWN data[slot][r]; peers read it over NVLink.
    push (default): rank r writes its chunk into EVERY PEER's data[slot][r]; reads are local. On 2 H200s
                    it was the fastest at 8-64 KB and 4 MB (results/h200x2/custom_allreduce_large.json).

The message is cut into chunks of ``chunk`` bytes; chunk ``b`` always belongs to program
``b % P``, where ``P = programs`` is fixed per object (at most the GPU's SM count, so every program
of a call is resident at once: a program spins on its peers' same program). A call launches
``min(chunks, P)`` programs; a message of more than ``P`` chunks makes each program loop over its
chunks ``p, p + P, p + 2P, ...`` (2 GPUs: a 4 MB call is 1024 chunks over 132 programs):

    c = counters[p] + 1; counters[p] = c          # local memory: graphs freeze args, not memory
    store my chunks at data[c % 2][rank]          # own buffer (pull) or each peer's (push)
    debug_barrier                                 # every thread's stores precede ...
    atomic_xchg(peer.flags[p][rank], c, release, sys)   # ... the signal (one thread per program)
    spin: atomic_add(my.flags[p][s], 0, acquire, sys) >= c for every peer s (bounded, see below)
    debug_barrier; per chunk: sum data[c % 2][s] over s = 0..world-1 in fp32, in rank order; store in place

Why two slots suffice: rank A's program p can only *start* call k+2 after it finished call k+1,
and it finished k+1 only after seeing every peer's k+1 signal; a peer sends its k+1 signal only after
its own call k ended, i.e. after it finished reading the slot of call k. So when A writes slot
(k+2) % 2 == k % 2, nobody reads call k's data any more. For the same reason a flag holds c or c+1
while its reader waits for c (hence ``>=``, not ``==``). Program p always owns the same bytes, so
the per-program counters of all ranks stay equal as long as every rank makes the same sequence of
calls (the same contract as NCCL: same order, same sizes, one stream at a time).

Every rank computes ``((x_0 + x_1) + x_2) + ...`` in fp32 from the same bits, so results are
bitwise identical across ranks (for two ranks also identical to NCCL's sum). Every rank's buffer
addresses (as mapped in this process) are kernel arguments, tuples indexed by compile-time ranks:
nothing on the critical path loads a pointer table, and a CUDA graph may freeze them (they never
change); only the call counter has to live in memory.

The wait is bounded by ``spin_limit`` polls (a poll is a local L2 load, well under a microsecond);
past it the program records ``1 + peer`` in an error word and carries on with garbage, so a dead
peer cannot hang the GPU forever: ``check()`` raises after a sync. The object is unusable then
(the per-program counters no longer agree across ranks): close it.

Not capturable: construction and ``close()`` (collective, they synchronize). Warm-up compiles the
kernel for fp16/bf16/fp32 during construction, so the first capture does not compile.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import socket
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from distrt.kernels.device_info import sm_count
from distrt.parallel.comm import Communicator

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20
MAX_WORLD = 8
FLAG_STRIDE = 8  # int64 flags per program: one per source rank, one 64-byte line per program
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALIGN = 16  # bytes: one vector per thread; sizes and pointers must be multiples of it
DEFAULT_SPIN_LIMIT = 1 << 26  # polls before a program gives up on a peer (tens of seconds)
# One-shot moves (world - 1) x nbytes into every rank; beyond these sizes a ring/two-shot wins. With
# two ranks a one-shot moves what a ring does (nbytes each way), without NCCL's latency, so it takes
# every size the buffer holds (2 H200s: benchmarks/results/h200x2/custom_allreduce*.json).
_ONE_SHOT_LIMIT = {2: 1 << 62, 3: 256 << 10, 4: 256 << 10}
_ONE_SHOT_LIMIT_LARGE_WORLD = 128 << 10
CHUNK_BYTES = 4096  # per program and loop iteration: 256 threads x 16 B
_CUDA_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_CU_P2P_NATIVE_ATOMIC = 3  # CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED

# Bound on first launch (the kernel module pattern of distrt.kernels: importing this module never
# imports triton, so TRITON_INTERPRET can still be chosen late and CPU-only use never pays for it).
triton: Any = None
tl: Any = None


def should_use(nbytes: int, world: int, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Whether a one-shot IPC all-reduce of ``nbytes`` over ``world`` GPUs should beat NCCL."""
    if not 2 <= world <= MAX_WORLD or nbytes <= 0 or nbytes % ALIGN:
        return False
    return nbytes <= min(max_bytes, _ONE_SHOT_LIMIT.get(world, _ONE_SHOT_LIMIT_LARGE_WORLD))


MAX_BYTES_CAP = 32 << 20  # per message; the IPC area is 2 slots x world of it (128 MB per GPU at 2 ranks)


def default_max_bytes(world: int, hidden_size: int = 8192, max_tokens: int = 2048) -> int:
    """The buffer a TP group's one-shot all-reduce needs: 2 ranks take every size (a prefill step's
    max_tokens x hidden bf16 activations) up to MAX_BYTES_CAP, where the step's GEMMs dwarf the
    all-reduce and NCCL may take it; more ranks only small (decode) messages."""
    if world == 2:
        need = -(-hidden_size * max_tokens * 2 // CHUNK_BYTES) * CHUNK_BYTES
        return min(max(DEFAULT_MAX_BYTES, need), MAX_BYTES_CAP)
    return DEFAULT_MAX_BYTES


def env_config(environ: Any = None) -> dict[str, Any]:
    """Kernel settings from DISTRT_IPC_ALLREDUCE="pull|push[:chunk_bytes]" (empty: the defaults), so a
    run can try what benchmarks/custom_allreduce_probe.py found fastest without a code change."""
    import os

    raw = ((environ if environ is not None else os.environ).get("DISTRT_IPC_ALLREDUCE") or "").strip()
    if not raw:
        return {}
    mode, _, chunk = raw.partition(":")
    if mode not in ("pull", "push") or (chunk and not chunk.isdigit()):
        raise ValueError(f"DISTRT_IPC_ALLREDUCE={raw!r}: expected pull or push, optionally :chunk_bytes (e.g. push:16384)")
    cfg: dict[str, Any] = {"push": mode == "push"}
    if chunk:
        cfg["chunk_bytes"] = int(chunk)
    return cfg


def num_warps_for(chunk_bytes: int) -> int:
    return max(1, min(8, chunk_bytes // (ALIGN * 32)))


def launch_grid(nbytes: int, chunk_bytes: int, programs: int | None = None) -> int:
    """Programs a call of nbytes launches: one per chunk, at most ``programs`` (they then loop)."""
    n = -(-nbytes // chunk_bytes)
    return n if programs is None else min(n, programs)


def _kernel(x_ptr, data_ptrs, flag_ptrs, counter_ptr, err_ptr, numel, spin_limit,
            RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
            CAP: tl.constexpr, FLAGS: tl.constexpr, PUSH: tl.constexpr, STRIDE: tl.constexpr):
    # data_ptrs / flag_ptrs: tuples of every rank's addresses, kernel arguments (no loads on the
    # critical path), indexed by compile-time ranks. Program pid owns chunks pid, pid + STRIDE, ...
    pid = tl.program_id(0)
    elem = x_ptr.dtype.element_ty
    n = (numel // VEC) * VEC  # == numel (the host checks); the product tells the compiler VEC | n
    nblk = tl.cdiv(n, BLOCK)
    lane = tl.arange(0, BLOCK)

    # One atomic (one thread; Triton broadcasts its result to the whole program): a plain load + store
    # lets a late warp load the counter after another warp stored call, so the program's threads could
    # disagree on call (slot, flag values, spin-loop exits: divergent barriers).
    call = tl.atomic_add(counter_ptr + pid, 1) + 1
    slot = call % 2
    mine = tl.multiple_of(data_ptrs[RANK].to(tl.int64).to(tl.pointer_type(elem)), 16)
    my_flags = flag_ptrs[RANK].to(tl.int64).to(tl.pointer_type(tl.int64)) + pid * FLAGS

    # publish: [slot][RANK] in my buffer (pull) or in every peer's (push)
    for b in range(pid, nblk, STRIDE):
        offs = b * BLOCK + lane
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if PUSH:
            for r in tl.static_range(WORLD):
                if r != RANK:
                    peer = tl.multiple_of(data_ptrs[r].to(tl.int64).to(tl.pointer_type(elem)), 16)
                    tl.store(peer + (slot * WORLD + RANK) * CAP + offs, x, mask=mask)
        else:
            tl.store(mine + (slot * WORLD + RANK) * CAP + offs, x, mask=mask)
    tl.debug_barrier()  # all threads' stores happen-before the (single-thread) release below
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer_flags = flag_ptrs[r].to(tl.int64).to(tl.pointer_type(tl.int64)) + pid * FLAGS
            tl.atomic_xchg(peer_flags + RANK, call, sem="release", scope="sys")

    # wait for every peer's chunk of this call; the loop condition is uniform over the program
    for r in tl.static_range(WORLD):
        if r != RANK:
            seen = tl.atomic_add(my_flags + r, 0, sem="acquire", scope="sys")
            spins = 0
            while (seen < call) & (spins < spin_limit):
                seen = tl.atomic_add(my_flags + r, 0, sem="acquire", scope="sys")
                spins += 1
            if seen < call:
                tl.store(err_ptr, r + 1)
    tl.debug_barrier()  # the acquire (one thread) happens-before every thread's loads below

    for b in range(pid, nblk, STRIDE):
        offs = b * BLOCK + lane
        mask = offs < n
        for r in tl.static_range(WORLD):
            if r == RANK:
                v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                if PUSH:
                    src = mine
                else:
                    src = tl.multiple_of(data_ptrs[r].to(tl.int64).to(tl.pointer_type(elem)), 16)
                v = tl.load(src + (slot * WORLD + r) * CAP + offs, mask=mask, other=0.0,
                            cache_modifier=".cg").to(tl.float32)
            if r == 0:
                acc = v
            else:
                acc = acc + v
        tl.store(x_ptr + offs, acc.to(elem), mask=mask)


def _jit() -> None:
    global triton, tl, _kernel
    if triton is not None:
        return
    import triton as _triton
    import triton.language as _tl

    tl = _tl
    _kernel = _triton.jit(do_not_specialize=["numel", "spin_limit"])(_kernel)
    triton = _triton  # last: marks the module as done


def launch(x: torch.Tensor, data_ptrs: Sequence[int], flag_ptrs: Sequence[int], counters: torch.Tensor,
           err: torch.Tensor, *, rank: int, world: int, max_bytes: int, chunk_bytes: int, push: bool,
           spin_limit: int, programs: int | None = None, warmup_only: bool = False) -> torch.Tensor:
    """Reduces ``x`` in place (the kernel alone; ``IpcAllReduce`` owns the buffers and checks).

    ``data_ptrs``/``flag_ptrs``: every rank's data and flag areas (its own included) as addresses
    this process can use, 16-byte aligned; ``programs``: the ownership stride P (chunk b belongs to
    program b % P; default max_bytes // chunk_bytes, one chunk each); ``counters``: int64 [P];
    ``err``: int32 [1]."""
    _jit()
    nbytes = x.numel() * x.element_size()
    programs = programs or max_bytes // chunk_bytes
    assert x.dtype in DTYPES and x.is_contiguous() and nbytes % ALIGN == 0 and 0 < nbytes <= max_bytes
    assert max_bytes % chunk_bytes == 0 and chunk_bytes % ALIGN == 0, (max_bytes, chunk_bytes)
    assert len(data_ptrs) == len(flag_ptrs) == world and all(p % ALIGN == 0 for p in (*data_ptrs, *flag_ptrs))
    assert counters.dtype == torch.int64 and counters.numel() >= programs and err.dtype == torch.int32
    grid = (launch_grid(nbytes, chunk_bytes, programs),)
    args = (x, tuple(data_ptrs), tuple(flag_ptrs), counters, err, x.numel(), spin_limit)
    meta = dict(RANK=rank, WORLD=world, BLOCK=chunk_bytes // x.element_size(), VEC=ALIGN // x.element_size(),
                CAP=max_bytes // x.element_size(), FLAGS=FLAG_STRIDE, PUSH=push, STRIDE=programs,
                num_warps=num_warps_for(chunk_bytes))
    if warmup_only:
        _kernel.warmup(*args, grid=grid, **meta)
    else:
        _kernel[grid](*args, **meta)
    return x


def _as_device(device: torch.device | int | str) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _all_gather_object(comm: Communicator, obj: Any) -> list[Any]:
    return [comm.broadcast_object(obj if comm.rank == src else None, src) for src in range(comm.size)]


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _native_peer_atomics(dev: int, peer: int) -> bool:
    """CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED through the driver API (cupy's runtime module
    lacks cudaDeviceGetP2PAttribute). The signal is a remote atomic: over PCIe it may not exist."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        cuda.cuInit(0)
        d, p, value = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(d), dev) or cuda.cuDeviceGet(ctypes.byref(p), peer):
            return False
        return cuda.cuDeviceGetP2PAttribute(ctypes.byref(value), _CU_P2P_NATIVE_ATOMIC, d, p) == 0 and value.value == 1
    except OSError:
        return False


def _local_info(device: torch.device) -> dict[str, Any] | None:
    """What peers need to check that this rank can join, or None when it cannot."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:  # nothing may raise on one rank only: the others would wait in the next exchange
        import cupy
        import triton as _triton  # noqa: F401

        idx = device.index if device.index is not None else torch.cuda.current_device()
        return {"host": _host_id(), "bus": cupy.cuda.runtime.deviceGetPCIBusId(idx)}
    except Exception:
        logger.debug("IPC all-reduce: no cupy/triton or no CUDA device here", exc_info=True)
        return None


def _peer_ok(idx: int, bus: str) -> bool:
    import cupy

    rt = cupy.cuda.runtime
    try:
        peer = rt.deviceGetByPCIBusId(bus)  # raises when the peer GPU is not visible here
        return peer != idx and bool(rt.deviceCanAccessPeer(idx, peer)) and _native_peer_atomics(idx, peer)
    except Exception:
        return False


def create_ipc_all_reduce(comm: Communicator, device: torch.device | int | str | None = None,
                          max_bytes: int = DEFAULT_MAX_BYTES, **kwargs: Any) -> IpcAllReduce | None:
    """Collective: an ``IpcAllReduce`` on every rank, or None on every rank when unsupported
    (fewer than 2 or more than 8 ranks, CPU, no cupy/triton, ranks on different hosts, peer GPUs not
    visible or without peer access and native peer atomics, or any failure while mapping)."""
    if not 2 <= comm.size <= MAX_WORLD:
        return None
    dev = _as_device(comm.device if device is None else device)
    infos = _all_gather_object(comm, _local_info(dev))
    if any(i is None for i in infos) or len({i["host"] for i in infos}) != 1:
        logger.info("IPC all-reduce unsupported: %s", infos)
        return None
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    ok = all(_peer_ok(idx, info["bus"]) for r, info in enumerate(infos) if r != comm.rank)
    if not all(_all_gather_object(comm, ok)):
        logger.info("IPC all-reduce unsupported: no peer access (or peer atomics) between some GPUs")
        return None
    ar: IpcAllReduce | None = None
    try:
        ar = IpcAllReduce(comm, torch.device("cuda", idx), max_bytes, **kwargs)
    except Exception:
        logger.warning("IPC all-reduce setup failed on rank %d; using the communicator", comm.rank, exc_info=True)
    if all(_all_gather_object(comm, ar is not None)):
        return ar
    if ar is not None:  # some other rank failed: no collective teardown with it
        ar.close(collective=False)
    return None


def _sm_count(dev: torch.device) -> int:
    return sm_count(dev, cpu=1 << 30)  # no CUDA device (interpreter tests): no cap


class _SetupError(RuntimeError):
    pass


_live: list[weakref.ref[IpcAllReduce]] = []
_live_lock = threading.Lock()


@atexit.register
def _unmap_live_at_exit() -> None:
    with _live_lock:
        refs = list(_live)
        _live.clear()
    for ref in refs:
        ar = ref()
        if ar is not None:
            ar.close(collective=False)


class IpcAllReduce:
    """One rank's one-shot all-reduce over CUDA IPC buffers; built and closed collectively.

    ``all_reduce(t)`` sums ``t`` over ranks in place (like ``NcclComm``; use the return value) when
    it is bf16/fp16/fp32, a multiple of 16 bytes, within ``max_bytes`` and the one-shot limit for the
    world size (``should_use``); anything else goes
    to ``comm.all_reduce``. The choice depends only on shape and dtype, the same on every
    rank. Calls must come in the same order on every rank, on one stream at a time.
    """

    def __init__(self, comm: Communicator, device: torch.device | int | str, max_bytes: int = DEFAULT_MAX_BYTES,
                 *, chunk_bytes: int | None = None, push: bool = True, spin_limit: int = DEFAULT_SPIN_LIMIT,
                 warmup: bool = True) -> None:
        import cupy

        self._rt = cupy.cuda.runtime
        self.comm, self.rank, self.world = comm, comm.rank, comm.size
        if not 2 <= self.world <= MAX_WORLD:
            raise ValueError(f"IpcAllReduce needs 2..{MAX_WORLD} ranks, got {self.world}")
        dev = _as_device(device)
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES
        if self.chunk_bytes % ALIGN or self.chunk_bytes & (self.chunk_bytes - 1):
            raise ValueError(f"chunk_bytes must be a power of two >= {ALIGN}, got {self.chunk_bytes}")
        self.max_bytes = -(-max_bytes // self.chunk_bytes) * self.chunk_bytes
        # Every program of a call spins until the same program of each peer has published, so all of
        # them must be resident at once: a grid wider than the SMs can wait on programs that never get
        # an SM while the resident ones spin (seen on 4 H200s: 256 programs of 1 MB calls stalled until
        # the spin limit). So at most one program per SM; larger calls loop (chunk b -> program b % P).
        self.programs = min(self.max_bytes // self.chunk_bytes, _sm_count(self.device))
        self.push, self.spin_limit = push, spin_limit
        self._closed = False
        self._peer_ptrs: list[int] = []
        self._base = 0
        data_bytes = 2 * self.world * self.max_bytes
        flag_bytes = self.programs * FLAG_STRIDE * 8
        idx = self.device.index

        handle, error = None, ""
        with cupy.cuda.Device(idx):
            try:
                self._base = self._rt.malloc(data_bytes + flag_bytes)
                self._rt.memset(self._base, 0, data_bytes + flag_bytes)
                self._rt.deviceSynchronize()  # flags are zero before any peer can signal
                handle = self._rt.ipcGetMemHandle(self._base)
            except Exception as e:  # every rank still takes part in the exchanges below
                error = f"rank {self.rank}: {e!r}"
            config = (self.max_bytes, self.chunk_bytes, self.push, self.programs)
            exchanged = _all_gather_object(comm, (handle, config))
            handles = [h for h, _ in exchanged]
            if any(cfg != config for _, cfg in exchanged):
                error = f"ranks disagree on (max_bytes, chunk_bytes, push, programs): {[cfg for _, cfg in exchanged]}"
            bases = [0] * self.world
            if not error and all(h is not None for h in handles):
                try:
                    for r, h in enumerate(handles):
                        if r == self.rank:
                            bases[r] = self._base
                        else:
                            bases[r] = self._rt.ipcOpenMemHandle(h, _CUDA_IPC_LAZY_PEER_ACCESS)
                            self._peer_ptrs.append(bases[r])
                except Exception as e:
                    error = f"rank {self.rank}: {e!r}"
            errors = [e for e in _all_gather_object(comm, error) if e]
        if errors or any(h is None for h in handles):
            self._release()
            raise _SetupError("; ".join(errors) or "a rank could not allocate its buffer")

        self._data_ptrs = tuple(bases)
        self._flag_ptrs = tuple(b + data_bytes for b in bases)
        self._counters = torch.zeros(self.programs, dtype=torch.int64, device=self.device)
        self._err = torch.zeros(1, dtype=torch.int32, device=self.device)
        with _live_lock:
            _live.append(weakref.ref(self))
        if warmup:
            self._warmup()

    def supports(self, t: torch.Tensor) -> bool:
        nbytes = t.numel() * t.element_size()
        return (not self._closed and t.dtype in DTYPES and t.device == self.device
                and should_use(nbytes, self.world, self.max_bytes))

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not self.supports(t):
            return self._fallback(t)
        if not t.is_contiguous() or t.data_ptr() % ALIGN:
            t = t.clone(memory_format=torch.contiguous_format)  # a fresh allocation is aligned
        if torch.cuda.current_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self._launch(t)
        return self._launch(t)

    def _launch(self, t: torch.Tensor, warmup_only: bool = False) -> torch.Tensor:
        return launch(t, self._data_ptrs, self._flag_ptrs, self._counters, self._err, rank=self.rank,
                      world=self.world, max_bytes=self.max_bytes, chunk_bytes=self.chunk_bytes, push=self.push,
                      spin_limit=self.spin_limit, programs=self.programs, warmup_only=warmup_only)

    def _fallback(self, t: torch.Tensor) -> torch.Tensor:
        if self.comm.device == t.device:
            return self.comm.all_reduce(t)
        return self.comm.all_reduce(t.to(self.comm.device)).to(t.device)

    def _warmup(self) -> None:
        """Compiles every dtype's kernel, then runs each once (collectively), outside any capture."""
        with torch.cuda.device(self.device):
            samples = [torch.zeros(ALIGN // torch.empty(0, dtype=d).element_size(), dtype=d, device=self.device)
                       for d in DTYPES]
            for s in samples:
                try:
                    self._launch(s, warmup_only=True)
                except Exception:  # no warmup API in this triton: the first launch compiles instead
                    logger.debug("triton warmup() failed; compiling on first launch", exc_info=True)
            self.comm.barrier()  # nobody spins on a peer that is still compiling
            for s in samples:
                self._launch(s)
        self.check()

    def error(self) -> int:
        """0, or 1 + the rank a program gave up waiting for (synchronizes the device)."""
        return int(self._err.item())

    def check(self) -> None:
        code = self.error()
        if code:
            raise RuntimeError(f"IPC all-reduce on rank {self.rank}: timed out waiting for rank {code - 1}; "
                               "the ranks' call sequences diverged or a peer died; close this object")

    def close(self, collective: bool = True) -> None:
        """Unmaps the peers' buffers and frees this rank's. Collective (two barriers, so no peer
        still reads this buffer) unless ``collective=False``, which only unmaps (for exit paths).
        Destroy CUDA graphs that captured ``all_reduce`` first, and close before ``comm.destroy()``."""
        if self._closed:
            return
        self._closed = True
        try:
            torch.cuda.synchronize(self.device)
        except Exception:
            logger.debug("sync before close failed", exc_info=True)
        if collective:
            try:
                self.comm.barrier()  # every rank's kernels are done: nobody reads a peer's buffer
            except Exception:
                logger.warning("IpcAllReduce.close: barrier failed; unmapping only", exc_info=True)
                collective = False
        self._release(free_own=False)
        if collective:
            try:
                self.comm.barrier()  # every peer has unmapped this rank's buffer
            except Exception:
                logger.warning("IpcAllReduce.close: second barrier failed; freeing anyway", exc_info=True)
            self._release(free_own=True)

    def _release(self, free_own: bool = True) -> None:
        import cupy

        with cupy.cuda.Device(self.device.index):
            while self._peer_ptrs:
                ptr = self._peer_ptrs.pop()
                try:
                    self._rt.ipcCloseMemHandle(ptr)
                except Exception:
                    logger.debug("ipcCloseMemHandle failed", exc_info=True)
            if free_own and self._base:
                try:
                    self._rt.free(self._base)
                except Exception:
                    logger.debug("cudaFree failed", exc_info=True)
                self._base = 0

    def __enter__(self) -> IpcAllReduce:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"IpcAllReduce(rank={self.rank}, world={self.world}, device={self.device}, max_bytes={self.max_bytes}, "
                f"chunk_bytes={self.chunk_bytes}, push={self.push})")


__all__ = ["IpcAllReduce", "create_ipc_all_reduce", "should_use", "launch", "default_max_bytes", "DEFAULT_MAX_BYTES"]
