"""Paged attention over a ragged batch (mixed prefill chunks and decodes), causal, with GQA.

Batch layout::

    q:               [T, num_heads, head_dim]  tokens of all sequences back to back
    query_start_loc: [B+1] int32               sequence b owns q[qsl[b]:qsl[b+1]]
    seq_lens:        [B] int32                 context length of b INCLUDING this step's tokens
    block_tables:    [B, max_blocks] int32     logical block j of b -> physical block id
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    sequence b, q_len = qsl[b+1] - qsl[b]:
    cache positions  0 ............................ seq_len-q_len ...... seq_len-1
                     |<-- cached prefix (earlier steps) -->|<-- this step -->|
    query i sits at position seq_len - q_len + i and sees cache positions 0..that position.
    Query head h reads kv head h // (num_heads // num_kv_heads).

K/V caches are in q's dtype or in float8 e4m3 (see kv_cache.py): an fp8 tile is converted to q's
dtype as it is loaded (exact: every e4m3 value is an fp16/bf16/fp32 value), so the dots and the fp32
softmax/accumulation are those of a q-dtype cache. Dequantization scales are folded in: k_scale
into the softmax scale, v_scale into the accumulator (fp8 only; both 1.0 until calibrated scales exist).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels
from distrt.kernels.device_info import sm_count
from distrt.kernels.kv_cache import FP8_KV_DTYPE, check_kv_scales

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_kv_tile_offsets', '_prefill_kernel', '_decode_item', '_decode_kernel', '_decode_persistent_kernel',
            '_decode_reduce_kernel')


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
           block_tables: torch.Tensor) -> None:
    assert q.dim() == 3, q.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert q.shape[2] == k_cache.shape[3], (q.shape, k_cache.shape)
    assert q.shape[1] % k_cache.shape[2] == 0, (q.shape, k_cache.shape)
    assert k_cache.dtype == v_cache.dtype in (q.dtype, FP8_KV_DTYPE), (q.dtype, k_cache.dtype, v_cache.dtype)
    assert seq_lens.dim() == 1 and seq_lens.dtype == torch.int32, (seq_lens.shape, seq_lens.dtype)
    assert block_tables.dim() == 2 and block_tables.shape[0] == seq_lens.shape[0], block_tables.shape
    assert block_tables.dtype == torch.int32, block_tables.dtype
    assert q.device == k_cache.device == seq_lens.device == block_tables.device


def _check_ragged(q: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
    assert query_start_loc.dim() == 1 and query_start_loc.shape[0] == seq_lens.shape[0] + 1
    assert query_start_loc.dtype == torch.int32, query_start_loc.dtype
    assert query_start_loc.device == q.device


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Vectorised reference (and CPU path): pad queries to max q_len, keys to max seq_len, one masked softmax.
    An fp8 cache is dequantized (to q's dtype, times its scale) after the gather."""
    _check(q, k_cache, v_cache, seq_lens, block_tables)
    check_kv_scales(k_cache, k_scale, v_scale)
    _check_ragged(q, query_start_loc, seq_lens)
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    batch = seq_lens.shape[0]
    device = q.device
    if num_tokens == 0 or batch == 0:
        return q.new_empty(q.shape)
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    s_lens = seq_lens.long()
    max_q = int(q_lens.max())
    max_s = int(s_lens.max())
    n_blk = (max_s + block_size - 1) // block_size

    # token t -> (sequence b, row i); padded query rows are never read back.
    tok = torch.arange(num_tokens, device=device)
    tok_seq = torch.searchsorted(qsl[1:], tok, right=True)  # [T]
    tok_row = tok - qsl[tok_seq]  # [T]
    q_pad = q.new_zeros(batch, max_q, num_heads, head_dim)
    q_pad[tok_seq, tok_row] = q
    q_pad = q_pad.float().view(batch, max_q, num_kv_heads, group, head_dim)  # [B, Q, Hkv, G, D]

    # Table entries past a sequence's blocks are arbitrary: clamp so the gather is in range, mask later.
    blocks = block_tables[:, :n_blk].long().clamp(0, num_blocks - 1)  # [B, n_blk]
    keys = k_cache[blocks].view(batch, n_blk * block_size, num_kv_heads, head_dim)[:, :max_s]  # [B, S, Hkv, D]
    vals = v_cache[blocks].view(batch, n_blk * block_size, num_kv_heads, head_dim)[:, :max_s]  # [B, S, Hkv, D]
    if k_cache.dtype != q.dtype:  # fp8 -> q's dtype is exact; the scales are applied below, as the kernels do
        keys, vals = keys.to(q.dtype), vals.to(q.dtype)
    key_pos = torch.arange(max_s, device=device)
    key_valid = key_pos[None, :] < s_lens[:, None]  # [B, S]
    # Zero unused slots: garbage (even NaN) there must not leak through 0 * NaN.
    keys = torch.where(key_valid[:, :, None, None], keys.float(), 0.0)
    vals = torch.where(key_valid[:, :, None, None], vals.float(), 0.0)

    q_pos = (s_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [B, Q]
    allowed = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]  # [B, Q, S]

    scores = torch.einsum("bqhgd,bshd->bhgqs", q_pad, keys) * (scale * k_scale)  # [B, Hkv, G, Q, S]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no allowed key (padding rows only)
    out = torch.einsum("bhgqs,bshd->bqhgd", probs, vals)  # [B, Q, Hkv, G, D]
    if v_scale != 1.0:
        out = out * v_scale
    out = out.reshape(batch, max_q, num_heads, head_dim)  # [B, Q, H, D]
    return out[tok_seq, tok_row].to(q.dtype)


_LOG2E = 1.4426950408889634


# triton.jit, applied by _jit()
def _kv_tile_offsets(bt_row_ptr, pos, mask, kv_head, d, stride_cb, stride_co, stride_ch, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] cache offsets of one kv head at logical positions `pos`, via the block table
    (shared by the K and V loads)."""
    blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return blk[:, None] * stride_cb + (pos % BLOCK_SIZE)[:, None] * stride_co + kv_head * stride_ch + d[None, :]


# triton.jit, applied by _jit()
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, scale_log2e, v_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_co, stride_ch, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                    FP16_MATH: tl.constexpr):
    # One program: BLOCK_Q queries of one sequence x the GROUP query heads of one kv head, packed
    # as BLOCK_M rows (row r = query r // GROUP, head r % GROUP), so K/V tiles are loaded once per group.
    b = tl.program_id(0)
    # last query tiles have the most causal work: launch them first to shorten the tail
    q_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_Q
    kv_head = tl.program_id(2)
    q_begin = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_begin
    if q_start >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + b) - q_len  # cached prefix before this chunk

    r = tl.arange(0, BLOCK_M)
    qi = q_start + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_valid = (r < BLOCK_Q * GROUP) & (qi < q_len)
    q_pos = ctx_len + qi
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    tok = (q_begin + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    if FP16_MATH:  # fp8 cache, bf16 model: e4m3 -> fp16 is one cvt per two values, -> bf16 is not
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    n = tl.arange(0, BLOCK_N)
    # Keys before the tile's first query position are visible to every row: no causal mask there.
    full_end = (ctx_len + q_start) // BLOCK_N * BLOCK_N
    last_pos = ctx_len + tl.minimum(q_start + BLOCK_Q, q_len) - 1
    for start in range(0, full_end, BLOCK_N):
        pos = start + n
        all_k = pos >= 0
        offs = _kv_tile_offsets(bt_row, pos, all_k, kv_head, d, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
        kv_mask = all_k[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    for start in range(full_end, last_pos + 1, BLOCK_N):
        pos = start + n
        in_ctx = pos <= last_pos
        offs = _kv_tile_offsets(bt_row, pos, in_ctx, kv_head, d, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
        kv_mask = in_ctx[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * v_scale
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


# triton.jit, applied by _jit()
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, bt_ptr,
                   scale_log2e, v_scale, stride_qb, stride_qh, stride_ob, stride_oh,
                   stride_cb, stride_co, stride_ch, stride_bt,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   KV_FP8: tl.constexpr, FP16_MATH: tl.constexpr, HEADS_FASTEST: tl.constexpr):
    # One program: all GROUP query heads of one kv head, one split of one sequence's context.
    # HEADS_FASTEST: grid (kv_heads, batch, splits), so the programs running side by side read the
    # other kv heads of the same cache rows (one contiguous block row) instead of other sequences' blocks.
    if HEADS_FASTEST:
        b, kv_head = tl.program_id(1), tl.program_id(0)
    else:
        b, kv_head = tl.program_id(0), tl.program_id(1)
    _decode_item(b, kv_head, tl.program_id(2),
                 q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, bt_ptr,
                 scale_log2e, v_scale, stride_qb, stride_qh, stride_ob, stride_oh,
                 stride_cb, stride_co, stride_ch, stride_bt, NUM_HEADS, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D,
                 BLOCK_SIZE, BLOCK_N, NUM_SPLITS, DOT_PRECISION, KV_FP8, FP16_MATH)


# triton.jit, applied by _jit()
def _decode_persistent_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr,
                              bt_ptr, scale_log2e, v_scale, stride_qb, stride_qh, stride_ob, stride_oh,
                              stride_cb, stride_co, stride_ch, stride_bt, batch,
                              NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                              BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, FP16_MATH: tl.constexpr):
    # A fixed grid (e.g. a few SMs' worth, leaving the rest to a concurrent GEMM on another stream)
    # walks the (sequence, kv head, split) items with a stride of the grid size.
    items = batch * NUM_KV_HEADS * NUM_SPLITS
    pid = tl.program_id(0)
    for i in range(0, tl.cdiv(items - pid, tl.num_programs(0))):
        w = pid + i * tl.num_programs(0)  # a tensor (the loop index is a plain int when interpreted)
        _decode_item(w // (NUM_KV_HEADS * NUM_SPLITS), (w // NUM_SPLITS) % NUM_KV_HEADS, w % NUM_SPLITS,
                     q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, bt_ptr,
                     scale_log2e, v_scale, stride_qb, stride_qh, stride_ob, stride_oh,
                     stride_cb, stride_co, stride_ch, stride_bt, NUM_HEADS, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D,
                     BLOCK_SIZE, BLOCK_N, NUM_SPLITS, DOT_PRECISION, KV_FP8, FP16_MATH)


# triton.jit, applied by _jit()
def _decode_item(b, kv_head, split, q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                 seq_lens_ptr, bt_ptr, scale_log2e, v_scale, stride_qb, stride_qh, stride_ob, stride_oh,
                 stride_cb, stride_co, stride_ch, stride_bt,
                 NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 KV_FP8: tl.constexpr, FP16_MATH: tl.constexpr):
    """Items of the decode grid: all GROUP query heads of one kv head, one split of sequence b's context."""
    seq_len = tl.load(seq_lens_ptr + b)
    # each sequence splits its own context evenly, so no host-side max(seq_lens) is needed
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if FP16_MATH:  # fp8 cache, bf16 model: e4m3 -> fp16 is one cvt per two values, -> bf16 is not
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    n = tl.arange(0, BLOCK_N)
    for tile in range(start, end, BLOCK_N):
        pos = tile + n
        valid = pos < end
        offs = _kv_tile_offsets(bt_row, pos, valid, kv_head, d, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * v_scale  # the split merge only rescales and divides by l: fold v_scale in here
    store_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # partials: acc [B, H, S, D] unnormalised, ml [B, H, S, 2] = (running max in log2 units, sum)
        row = (b.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=store_mask)
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


# triton.jit, applied by _jit()
def _decode_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row = (b * NUM_HEADS + h) * NUM_SPLITS + s  # [BLOCK_S]
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    # empty splits carry m = -inf, l = 0, acc = 0 and get weight 0
    w = tl.exp2(m - tl.max(m, 0))
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _check_kernel_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor) -> None:
    _jit()
    assert q.dtype in _SUPPORTED, q.dtype
    assert q.stride(2) == 1, q.stride()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape[1] & (k_cache.shape[1] - 1) == 0, f"block_size {k_cache.shape[1]} must be a power of 2"
    assert seq_lens.is_contiguous() and block_tables.stride(1) == 1, (seq_lens.stride(), block_tables.stride())


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Preallocated outputs (CUDA graphs, poisoned-output tests) must match q's shape and dtype."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, (out.shape, out.dtype)
    assert out.stride(2) == 1, out.stride()
    return out


def _fp16_math(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """bf16 queries over an fp8 cache run the dots in fp16 (more mantissa than bf16; attention queries
    and probabilities sit far inside fp16's range): the fp8 -> fp16 conversion is the cheap one, and
    fp8 -> bf16 conversions kept the decode kernel at 0.52-0.74 of HBM bandwidth on an H100."""
    return k_cache.dtype == FP8_KV_DTYPE and q.dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently go through tf32 on Hopper; keep them exact (tests, debugging)
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_query_len: int,
                            out: torch.Tensor | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """Triton flash attention over a ragged batch (chunked prefill + decodes), reading K/V through
    block_tables. Same semantics as paged_attention_ref; max_query_len >= max(q_len) sizes the grid.
    out: optional preallocated [T, H, D] output."""
    _check(q, k_cache, v_cache, seq_lens, block_tables)
    check_kv_scales(k_cache, k_scale, v_scale)
    _check_ragged(q, query_start_loc, seq_lens)
    _check_kernel_inputs(q, k_cache, v_cache, seq_lens, block_tables)
    assert query_start_loc.is_contiguous()
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    batch = seq_lens.shape[0]
    out = _output(out, q)
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    block_m, block_n, num_warps, num_stages = prefill_config(head_dim, q.dtype, q.device)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (batch, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale * k_scale * _LOG2E, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype),
        KV_FP8=k_cache.dtype == FP8_KV_DTYPE, FP16_MATH=_fp16_math(q, k_cache), num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# (BLOCK_N, num_warps, num_stages) of the decode kernel over a 16/32-bit cache (None: the default in
# decode_config; benchmarks/decode_step_sweep.py sets it) and over an fp8 cache (set from
# `benchmarks/kernels_gpu.py --tune-fp8`; None: the bf16 config)
DECODE_CONFIG: tuple[int, int, int] | None = None
DECODE_CONFIG_FP8: tuple[int, int, int] | None = None


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                  kv_dtype: torch.dtype | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel; benchmarks/kernels_gpu.py --tune sweeps these."""
    if device.type != "cuda":
        return 16, 4, 1  # interpreter: small tiles keep the simulated work low
    if kv_dtype == FP8_KV_DTYPE and DECODE_CONFIG_FP8 is not None:
        return DECODE_CONFIG_FP8
    if kv_dtype != FP8_KV_DTYPE and DECODE_CONFIG is not None:
        return DECODE_CONFIG
    return 64, 2, 3  # H200 sweep: 0.87-1.0 of copy bandwidth at batch 16-64, context 4k-16k


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel (BLOCK_M rows = queries x group heads)."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return 128, 32, 8, 2  # H200 sweep, 4 x 2048 causal, head_dim 128


def _num_sms(device: torch.device) -> int:
    return sm_count(device, cpu=4)  # interpreter: a small grid


# Split policy of the decode kernel (benchmarks/kernels_gpu.py --tune sweeps it).
DECODE_PROGRAMS_PER_SM = 4
# Grid order of the non-persistent decode kernel: kv heads fastest (benchmarks/decode_step_sweep.py A/Bs it).
DECODE_HEADS_FASTEST = os.environ.get("DISTRT_DECODE_HEADS_FASTEST", "0") == "1"
DECODE_MIN_TILES_PER_SPLIT = 4


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device,
                      block_n: int = 64) -> int:
    """Enough (batch, kv_head, split) programs to give each SM DECODE_PROGRAMS_PER_SM of them, but at least
    DECODE_MIN_TILES_PER_SPLIT key tiles per split. Depends on shapes only (block-table width, not the
    seq_lens values), so it is fixed for a captured CUDA graph."""
    programs = batch * num_kv_heads
    target = DECODE_PROGRAMS_PER_SM * _num_sms(device)
    splits = -(-target // programs)
    max_useful = max(1, max_context // (DECODE_MIN_TILES_PER_SPLIT * block_n))
    return max(1, min(splits, max_useful, 128))


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, num_splits: int | None = None,
                           out: torch.Tensor | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0, max_programs: int | None = None) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] -> [B, H, D]. Flash-decoding: the grid is
    (B, kv_heads, num_splits); each program reads its kv head's K/V once for all GROUP query heads,
    partial results are merged by a second kernel. num_splits=None picks it from B, kv heads and
    the block-table width (the context upper bound). max_programs caps the grid: fewer programs
    than items walk them in a loop (a persistent grid that leaves SMs to a concurrent kernel)."""
    _check(q, k_cache, v_cache, seq_lens, block_tables)
    check_kv_scales(k_cache, k_scale, v_scale)
    _check_kernel_inputs(q, k_cache, v_cache, seq_lens, block_tables)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert seq_lens.shape[0] == batch, (seq_lens.shape, q.shape)
    group = num_heads // num_kv_heads
    out = _output(out, q)
    if batch == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    block_n, num_warps, num_stages = decode_config(head_dim, q.dtype, q.device, k_cache.dtype)
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device, block_n)
    assert num_splits >= 1, num_splits
    if num_splits > 1:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    args = (q, k_cache, v_cache, out, part_acc, part_ml, seq_lens, block_tables, scale * k_scale * _LOG2E,
            float(v_scale), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    items = batch * num_kv_heads * num_splits
    if max_programs is not None and max_programs < items:
        assert max_programs >= 1, max_programs
        kernel, grid = _decode_persistent_kernel, (max_programs,)
        args = (*args, batch)
        extra: dict[str, Any] = {"NUM_KV_HEADS": num_kv_heads}
    else:
        heads_fastest = DECODE_HEADS_FASTEST and batch <= 65535  # grid dims after the first are capped
        grid = (num_kv_heads, batch, num_splits) if heads_fastest else (batch, num_kv_heads, num_splits)
        kernel, extra = _decode_kernel, {"HEADS_FASTEST": heads_fastest}
    kernel[grid](
        *args, **extra,
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(q.dtype),
        KV_FP8=k_cache.dtype == FP8_KV_DTYPE, FP16_MATH=_fp16_math(q, k_cache), num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out
