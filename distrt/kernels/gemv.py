"""Skinny GEMM / GEMV for decode (M <= 16 rows): out = x @ w.T (+ bias), w [N, K] row-major.

Batch-1..16 decode is bound by reading the weights, and cuBLAS's small-M kernels lose a fixed ramp
and tail per launch. Each program here computes BLOCK_N output columns for all M rows, looping over K
in BLOCK_K steps with wide loads along w's rows, so w is read from memory exactly once:

    mode "fma": acc[BLOCK_M, BLOCK_N, BLOCK_K] += x * w elementwise, reduced over K once at the end
                (no per-step cross-lane shuffles; registers grow with BLOCK_M: small M only)
    mode "dot": tl.dot on x padded to 16 rows (tensor cores; w goes through shared memory, pipelined)

When N / BLOCK_N gives too few programs to fill the GPU, K is split over `split_k` programs that write
fp32 partials [split, M, N]; a second small kernel sums them in a fixed order (deterministic, no
atomics) and applies bias / activation. The fused gate-up variant reads w = [gate; up] ([2I, K]) and
writes silu(x @ gate.T) * (x @ up.T) [M, I] directly (no [M, 2I] round trip, no silu_and_mul launch).
Launch configs come from a table per (kind, M bucket, N, K) that a tuning result can override
(`load_tuned`, or DISTRT_SKINNY_GEMV_TUNED=path to benchmarks/gemv_probe.py's JSON); otherwise
`default_config`. fp32 accumulation; output in x.dtype. Graph-capturable: no host syncs.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels
from distrt.kernels.device_info import sm_count

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_skinny_kernel', '_splitk_reduce_kernel')

MAX_M = 16
CONFIG_KEYS = ("mode", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "split_k")
_TUNED: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


# ----------------------------------------------------------------------------------------- references

def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], w [N, K] -> x @ w.T (+ bias) [M, N], computed in fp32, returned in x.dtype."""
    out = x.float() @ w.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def skinny_gate_up_silu_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """w = [gate; up] [2I, K] -> silu(x @ gate.T) * (x @ up.T) [M, I], all in fp32 (the silu as
    activation.silu_and_mul_ref computes it), returned in x.dtype. Unlike linear + silu_and_mul, the
    [M, 2I] projection is not rounded to x.dtype in between."""
    assert w.shape[0] % 2 == 0, w.shape
    gu = x.float() @ w.float().t()
    if bias is not None:
        gu = gu + bias.float()
    inter = w.shape[0] // 2
    return (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)


# ---------------------------------------------------------------------------------------------- configs

def m_bucket(m: int) -> int:
    """1, 2, 4, 8, 16: the power of two at or above m."""
    assert 1 <= m <= MAX_M, m
    return 1 << (m - 1).bit_length()


def num_sms(device: torch.device) -> int:
    return sm_count(device, cpu=132)  # H100's count: CPU (interpreter) runs only need a plausible number


def auto_split_k(n_out: int, k: int, block_n: int, block_k: int, sms: int, max_split: int = 16) -> int:
    """Splits of K so that programs >= ~2 waves, each split at least 4 BLOCK_K steps long."""
    programs = -(-n_out // block_n)
    if programs >= 2 * sms:
        return 1
    want = -(-2 * sms // programs)
    k_steps = -(-k // block_k)
    return max(1, min(want, max_split, k_steps // 4))


def default_config(kind: str, m: int, n_out: int, k: int, sms: int = 132) -> dict[str, Any]:
    """Launch config before (or without) tuning. kind: "linear" or "gate_up" (n_out = I there)."""
    mb = m_bucket(m)
    per_tile = 2 if kind == "gate_up" else 1  # gate_up loads a gate and an up tile per step
    if mb <= 2:
        cfg = dict(mode="fma", BLOCK_N=8 // per_tile, BLOCK_K=512, num_warps=4, num_stages=2)
    elif mb <= 4:
        cfg = dict(mode="fma", BLOCK_N=4 // per_tile, BLOCK_K=512, num_warps=4, num_stages=2)
    else:
        cfg = dict(mode="dot", BLOCK_N=32 // per_tile, BLOCK_K=256, num_warps=4, num_stages=3)
    cfg["split_k"] = auto_split_k(n_out, k, cfg["BLOCK_N"], cfg["BLOCK_K"], sms)
    return cfg


def load_tuned(source: str | dict[str, Any]) -> int:
    """Add tuned configs: a path to (or the dict of) benchmarks/gemv_probe.py's JSON, whose
    details.best_configs is a list of {"kind", "m_bucket", "N", "K", "config"}. Returns how many."""
    doc = source
    if isinstance(source, str):
        with open(source) as f:
            doc = json.load(f)
    assert isinstance(doc, dict)
    rows = doc.get("details", doc).get("best_configs", [])
    for row in rows:
        cfg = {key: row["config"][key] for key in CONFIG_KEYS}
        _TUNED[(row["kind"], int(row["m_bucket"]), int(row["N"]), int(row["K"]))] = cfg
    return len(rows)


@functools.cache
def _load_env_tuned() -> None:
    path = os.environ.get("DISTRT_SKINNY_GEMV_TUNED")
    if path:
        load_tuned(path)


def get_config(kind: str, m: int, n_out: int, k: int, device: torch.device) -> dict[str, Any]:
    _load_env_tuned()
    tuned = _TUNED.get((kind, m_bucket(m), n_out, k))
    return dict(tuned) if tuned is not None else default_config(kind, m, n_out, k, num_sms(device))


# ---------------------------------------------------------------------------------------------- kernels

# triton.jit, applied by _jit()
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   K_PER_SPLIT, UP_OFF, HAS_BIAS: tl.constexpr, GATE_UP: tl.constexpr, PARTIALS: tl.constexpr,
                   USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_N output columns x all M rows, over K_PER_SPLIT of K (split pid 1).
    GATE_UP: columns n of gate (w row n) and of up (w row N + n, UP_OFF = N * stride_wn elements
    further); N is then I, w has 2N rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if USE_DOT:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc_g3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
        else:
            k_mask = kk < K
            x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if EVEN_N and EVEN_K:  # no mask: full-width vector loads
            wg = tl.load(w_rows + kk[None, :])
            if GATE_UP:
                wu = tl.load(w_rows + UP_OFF + kk[None, :])
        else:
            if EVEN_K:
                w_mask = n_mask[:, None]
            elif EVEN_N:
                w_mask = k_mask[None, :]
            else:
                w_mask = n_mask[:, None] & k_mask[None, :]
            wg = tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0)
            if GATE_UP:
                wu = tl.load(w_rows + UP_OFF + kk[None, :], mask=w_mask, other=0.0)
        if USE_DOT:
            acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision=PRECISION)
            if GATE_UP:
                acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision=PRECISION)
        else:
            xf = x.to(tl.float32)[:, None, :]
            acc_g3 += xf * wg.to(tl.float32)[None, :, :]
            if GATE_UP:
                acc_u3 += xf * wu.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc_g = tl.sum(acc_g3, axis=2)
        if GATE_UP:
            acc_u = tl.sum(acc_u3, axis=2)
    if PARTIALS:  # fp32 partials [split, M, N_total], N_total = 2N for GATE_UP (gate | up)
        n_total = 2 * N if GATE_UP else N
        p = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * n_total + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        tl.store(p, acc_g, mask=mask)
        if GATE_UP:
            tl.store(p + N, acc_u, mask=mask)
    else:
        if HAS_BIAS:
            acc_g += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if GATE_UP:
                acc_u += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATE_UP:
            acc_g = acc_g * tl.sigmoid(acc_g) * acc_u
        o = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(o, acc_g.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# triton.jit, applied by _jit()
def _splitk_reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLIT, HAS_BIAS: tl.constexpr,
                          GATE_UP: tl.constexpr, BLOCK: tl.constexpr):
    """Sums the split partials of one row in split order (deterministic), then bias / silu * up."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n_total = 2 * N if GATE_UP else N
    g = tl.zeros([BLOCK], dtype=tl.float32)
    u = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        p = part_ptr + (s * M + row).to(tl.int64) * n_total + offs
        g += tl.load(p, mask=mask, other=0.0)
        if GATE_UP:
            u += tl.load(p + N, mask=mask, other=0.0)
    if HAS_BIAS:
        g += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATE_UP:
            u += tl.load(b_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
    if GATE_UP:
        g = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * stride_om + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launch

def _launch(kind: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
            config: dict[str, Any] | None, out: torch.Tensor | None) -> torch.Tensor:
    _jit()
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.dtype == w.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32), (x.dtype, w.dtype)
    assert x.device == w.device
    m, k = x.shape
    gate_up = kind == "gate_up"
    n_rows = w.shape[0]
    n_out = n_rows // 2 if gate_up else n_rows
    assert not gate_up or n_rows % 2 == 0, w.shape
    assert m <= MAX_M, f"skinny kernels take at most {MAX_M} rows, got {m}"
    if bias is not None:
        assert bias.shape == (n_rows,) and bias.is_contiguous(), bias.shape
    if out is None:
        out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n_out) and out.dtype == x.dtype and out.stride(1) == 1, (out.shape, out.dtype)
    if m == 0 or n_out == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    cfg = config if config is not None else get_config(kind, m, n_out, k, x.device)
    use_dot = cfg["mode"] == "dot"
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    assert not use_dot or min(block_n, block_k) >= 16, f"tl.dot needs blocks of at least 16: {cfg}"
    block_m = max(16, m_bucket(m)) if use_dot else m_bucket(m)
    split = max(1, int(cfg.get("split_k", 1)))
    k_per_split = -(-(-(-k // split)) // block_k) * block_k  # ceil(K / split) rounded up to BLOCK_K
    split = -(-k // k_per_split)  # drop splits that would be empty
    partials = torch.empty(split, m, n_rows, dtype=torch.float32, device=x.device) if split > 1 else out
    b_arg = bias if bias is not None else w
    _skinny_kernel[(triton.cdiv(n_out, block_n), split)](
        x, w, b_arg, out, partials, m, n_out, k, x.stride(0), w.stride(0), out.stride(0), k_per_split,
        n_out * w.stride(0),
        HAS_BIAS=bias is not None, GATE_UP=gate_up, PARTIALS=split > 1, USE_DOT=use_dot,
        EVEN_N=n_out % block_n == 0, EVEN_K=k % block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        block = min(1024, triton.next_power_of_2(n_out))
        _splitk_reduce_kernel[(m, triton.cdiv(n_out, block))](
            partials, b_arg, out, m, n_out, out.stride(0), split,
            HAS_BIAS=bias is not None, GATE_UP=gate_up, BLOCK=block, num_warps=4)
    return out


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: dict[str, Any] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of skinny_linear_ref for x [M <= 16, K], w [N, K]; config overrides the table."""
    return _launch("linear", x, w, bias, config, out)


def skinny_gate_up_silu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                        config: dict[str, Any] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of skinny_gate_up_silu_ref: w = [gate; up] [2I, K] -> [M, I]."""
    return _launch("gate_up", x, w, bias, config, out)
