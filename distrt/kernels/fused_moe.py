"""Fused MoE: the routed experts of one layer as two grouped GEMMs over tokens grouped by expert.

    x [T, H], topk_ids/topk_weights [T, k]  (ids outside [0, E) are other ranks' experts: skipped)
    w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]

    out[t] = sum_j  w_tj * w2[e_tj] @ (silu(gate[e_tj] @ x[t]) * (up[e_tj] @ x[t]))

The Triton path (`fused_moe`) runs

    moe_align_block_size   flat pair ids (t*k + j) sorted by expert, each expert's run padded to
                           BLOCK_M with the sentinel T*k; one expert id per BLOCK_M block (-1: idle)
        sorted_ids:  [ e0 e0 e0 pad | e1 pad pad pad | e3 e3 e3 e3 | e3 pad pad pad | pad ... ]
        block_ids:   [     0        |       1        |      3      |       3       |  -1 ... ]
    grouped GEMM 1         cache1[p] = x[p // k] @ w13[e].T          [T*k, 2I]
    silu_and_mul_op        cache2[p] = silu(gate) * up               [T*k, I]
    grouped GEMM 2         cache3[p] = w_p * (cache2[p] @ w2[e].T)   [T*k, H] (skipped pairs stay 0)
    combine                out[t] = sum_j cache3[t*k + j]            (the scatter-add by token, in order)

Buffers are sized for the worst case (T*k + E*(BLOCK_M-1) sorted slots), so nothing reads a count
back to the host: the whole thing is capturable in a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_grouped_gemm_kernel',)


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor) -> None:
    assert x.dim() == 2 and w13.dim() == 3 and w2.dim() == 3, (x.shape, w13.shape, w2.shape)
    num_experts, two_inter, hidden = w13.shape
    assert two_inter % 2 == 0 and hidden == x.shape[1], (x.shape, w13.shape)
    assert w2.shape == (num_experts, hidden, two_inter // 2), (w13.shape, w2.shape)
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0], (x.shape, topk_ids.shape)
    assert topk_weights.shape == topk_ids.shape, (topk_weights.shape, topk_ids.shape)
    assert topk_weights.dtype == torch.float32, topk_weights.dtype
    assert topk_ids.dtype in (torch.int32, torch.int64), topk_ids.dtype
    assert x.dtype == w13.dtype == w2.dtype, (x.dtype, w13.dtype, w2.dtype)
    assert x.device == w13.device == w2.device == topk_ids.device == topk_weights.device


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, math_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Plain torch, one expert at a time; [T, H] in x.dtype. The oracle and the CPU path (fp32 math);
    math_dtype=None keeps the GEMMs in x.dtype (the per-expert loop the benchmarks compare against)."""
    _check(x, w13, w2, topk_weights, topk_ids)
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    dt = math_dtype or x.dtype
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    for e in torch.unique(topk_ids[valid]).tolist():
        tok, j = torch.nonzero(topk_ids == e, as_tuple=True)
        h = x[tok].to(dt) @ w13[e].to(dt).t()  # [n, 2I]
        y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].to(dt).t()  # [n, H]
        out.index_put_((tok,), y.float() * topk_weights[tok, j].unsqueeze(1), accumulate=True)
    return out.to(x.dtype)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups the T*k (token, choice) pairs by expert without a host sync.

    Returns (sorted_ids int32 [S], block_expert int32 [S // block_m], num_padded int32 [1]) where
    S = roundup(T*k + E*(block_m - 1), block_m): sorted_ids holds flat pair ids t*k + j, expert by
    expert, each run padded to a multiple of block_m with T*k; block_expert[b] is the expert of rows
    [b*block_m, (b+1)*block_m) or -1 past the last run. Pairs whose id is outside [0, E) are dropped.
    """
    assert topk_ids.dim() == 2, topk_ids.shape
    assert block_m >= 1 and num_experts >= 1
    dev = topk_ids.device
    n = topk_ids.numel()
    size = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    flat = topk_ids.reshape(-1).to(torch.int64)
    eid = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # E: not ours
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, eid, torch.ones_like(eid))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts  # [E + 1], unpadded run starts
    order = torch.sort(eid, stable=True).indices  # [n]
    sorted_e = eid[order]
    rank_in_run = torch.arange(n, device=dev) - start[sorted_e]
    mine = sorted_e < num_experts
    # pairs that are not ours all land in the extra last slot, sliced off below
    dest = torch.where(mine, padded_start[sorted_e.clamp(max=num_experts - 1)] + rank_in_run, size)
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int64, device=dev)
    sorted_ids.scatter_(0, dest, order)
    block_start = torch.arange(0, size, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # first run ending past the start
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return (sorted_ids[:size].to(torch.int32), block_expert.to(torch.int32),
            padded_end[-1:].to(torch.int32))


# triton.jit, applied by _jit()
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, num_pairs,
                         N, K, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                         A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """c[p, n] = (w[p] *) sum_k a[p // A_ROW_DIV, k] * b[e, n, k] for the BLOCK_M pairs p of one block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = pairs < num_pairs
    rows = pairs // A_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently go through tf32 on Hopper; keep them exact (tests, debugging)
    return "ieee" if dtype == torch.float32 else "tf32"


def moe_config(num_pairs: int, num_experts: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Launch config: BLOCK_M follows the tokens per expert (decode: few; prefill: many)."""
    per_expert = num_pairs / max(1, num_experts)
    if device.type != "cuda":  # the interpreter: small tiles keep it fast on tiny test shapes
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    big = dtype != torch.float32
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128 if big else 64, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 if big else 32, num_warps=8, num_stages=3)


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
                  sorted_ids: torch.Tensor, block_expert: torch.Tensor, num_pairs: int, a_row_div: int,
                  mul_weight: bool, cfg: dict[str, int]) -> None:
    n, k = b.shape[1], b.shape[2]
    assert a.stride(1) == 1 and b.stride(2) == 1 and c.stride(1) == 1, (a.stride(), b.stride(), c.stride())
    grid = (block_expert.shape[0], triton.cdiv(n, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_expert, num_pairs, n, k,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=mul_weight, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=_dot_precision(a.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """Triton version of fused_moe_ref (same contract): [T, H] in x.dtype."""
    from distrt.kernels import silu_and_mul_op  # not at import: kernels/__init__ may be importing us

    _jit()
    _check(x, w13, w2, topk_weights, topk_ids)
    assert x.stride(1) == 1, x.stride()
    assert w13.is_contiguous() and w2.is_contiguous(), (w13.stride(), w2.stride())
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    cfg = config or moe_config(num_pairs, num_experts, x.dtype, x.device)
    assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16 and cfg["BLOCK_K"] >= 16, cfg  # tl.dot minimum
    sorted_ids, block_expert, _ = moe_align_block_size(topk_ids, num_experts, cfg["BLOCK_M"])
    weights = topk_weights.contiguous()
    cache1 = torch.empty(num_pairs, 2 * inter, dtype=x.dtype, device=x.device)  # [T*k, 2I]
    _grouped_gemm(x, w13, cache1, weights, sorted_ids, block_expert, num_pairs, top_k, False, cfg)
    cache2 = silu_and_mul_op(cache1)  # [T*k, I]; rows of skipped pairs are garbage, never read
    cache3 = torch.zeros(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]
    _grouped_gemm(cache2, w2, cache3, weights, sorted_ids, block_expert, num_pairs, 1, True, cfg)
    return cache3.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, H]


def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
    """Dispatch as kernels/__init__ does: Triton on CUDA (or DISTRT_FORCE_TRITON=1), else the reference."""
    from distrt.kernels import use_triton

    if use_triton(x):
        return fused_moe(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
