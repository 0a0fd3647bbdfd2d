from __future__ import annotations

import math

import pytest
import torch
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton, rel_err, tol

from distrt.kernels import attention_op
from distrt.kernels.paged_attention import paged_attention_ref


def make_batch(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: str, seed: int = 0,
               spare_blocks: int = 3) -> dict[str, torch.Tensor]:
    """Ragged batch with scrambled block tables, garbage table tails and NaN in every cache slot
    that no sequence owns (unused blocks and the tail of partially filled last blocks)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(q_lens)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.randint(10**6, 10**7, (batch, max_blocks), generator=g, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for b, (nblk, slen) in enumerate(zip(blocks_per_seq, seq_lens)):
        block_tables[b, :nblk] = perm[used:used + nblk].int()
        used += nblk
        for pos in range(slen):
            blk, off = int(block_tables[b, pos // block_size]), pos % block_size
            k_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=g)
            v_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=g)
    num_tokens = sum(q_lens)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return dict(
        q=torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype).to(device),
        k_cache=k_cache.to(dtype).to(device), v_cache=v_cache.to(dtype).to(device),
        query_start_loc=qsl.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        block_tables=block_tables.to(device),
    )


def naive_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Independent oracle: per sequence, per query, per head, straight from the definition."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(seq_lens.shape[0]):
        start, end, slen = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        for i in range(end - start):
            pos = slen - (end - start) + i
            for h in range(q.shape[1]):
                keys = torch.stack([k_cache[block_tables[b, j // block_size], j % block_size, h // group]
                                    for j in range(pos + 1)]).double()
                vals = torch.stack([v_cache[block_tables[b, j // block_size], j % block_size, h // group]
                                    for j in range(pos + 1)]).double()
                p = torch.softmax(keys @ q[start + i, h].double() * scale, dim=0)
                out[start + i, h] = p @ vals
    return out


# (q_lens, seq_lens): decodes, a fresh prefill, chunks with a cached prefix, partial last blocks
MIXED = ([1, 7, 5, 1, 12], [9, 7, 21, 1, 30])
DECODE_SEQ_LENS = [1, 17, 40, 5, 64]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 1), (8, 2)])
def test_ref_against_naive(num_heads: int, num_kv_heads: int) -> None:
    batch = make_batch(*MIXED, num_heads, num_kv_heads, 16, block_size=4, dtype=torch.float32, device="cpu")
    out = paged_attention_ref(**batch, scale=0.37)
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out.double(), naive_attention(**batch, scale=0.37), atol=1e-5, rtol=1e-5)


def test_ref_keeps_dtype() -> None:
    batch = make_batch(*MIXED, 4, 2, 16, block_size=4, dtype=torch.float16, device="cpu")
    out = paged_attention_ref(**batch, scale=0.25)
    assert out.dtype == torch.float16
    ref = naive_attention(**{k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}, scale=0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])  # GQA 1, 4, 8
def test_prefill_matches_ref(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    from distrt.kernels.paged_attention import paged_attention_prefill

    batch = make_batch(*MIXED, num_heads, num_kv_heads, head_dim, block_size=4, dtype=dtype, device=DEVICE)
    scale = head_dim ** -0.5
    ref = paged_attention_ref(**batch, scale=scale)
    out = torch.full_like(batch["q"], float("nan"))
    paged_attention_prefill(**batch, scale=scale, max_query_len=max(MIXED[0]), out=out)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_matches_ref(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int,
                            num_splits: int | None) -> None:
    from distrt.kernels.paged_attention import paged_attention_decode

    q_lens = [1] * len(DECODE_SEQ_LENS)
    batch = make_batch(q_lens, DECODE_SEQ_LENS, num_heads, num_kv_heads, head_dim, block_size=8,
                       dtype=dtype, device=DEVICE)
    scale = head_dim ** -0.5
    ref = paged_attention_ref(**batch, scale=scale)
    out = torch.full_like(batch["q"], float("nan"))
    paged_attention_decode(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"], batch["block_tables"],
                           scale, num_splits=num_splits, out=out)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))


@needs_triton
@pytest.mark.parametrize("num_splits,max_programs", [(1, 1), (3, 2), (3, 5), (None, 3)])
def test_decode_persistent_grid_matches_full_grid(num_splits: int | None, max_programs: int) -> None:
    """A capped (persistent) grid walks the same items as the full grid: bitwise the same output."""
    from distrt.kernels.paged_attention import paged_attention_decode

    batch = make_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, 8, 2, 64, block_size=8,
                       dtype=torch.float32, device=DEVICE)
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"], batch["block_tables"], 0.125)
    full = paged_attention_decode(*args, num_splits=num_splits)
    capped = torch.full_like(batch["q"], float("nan"))
    paged_attention_decode(*args, num_splits=num_splits, out=capped, max_programs=max_programs)
    assert torch.equal(capped, full)
    torch.testing.assert_close(capped, paged_attention_ref(**batch, scale=0.125), **tol(torch.float32))


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_heads_fastest_grid_matches(num_splits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The (kv_heads, batch, splits) grid order computes the same items: bitwise the same output."""
    import distrt.kernels.paged_attention as pa

    batch = make_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, 8, 2, 64, block_size=8,
                       dtype=torch.float32, device=DEVICE)
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"], batch["block_tables"], 0.125)
    monkeypatch.setattr(pa, "DECODE_HEADS_FASTEST", False)
    seq_major = pa.paged_attention_decode(*args, num_splits=num_splits)
    monkeypatch.setattr(pa, "DECODE_HEADS_FASTEST", True)
    heads_major = pa.paged_attention_decode(*args, num_splits=num_splits)
    assert torch.equal(heads_major, seq_major)
    torch.testing.assert_close(heads_major, paged_attention_ref(**batch, scale=0.125), **tol(torch.float32))


@needs_triton
@pytest.mark.parametrize("is_decode_only", [False, True])
def test_attention_op_dispatch(is_decode_only: bool, force_triton: None) -> None:
    q_lens, seq_lens = ([1, 1, 1], [3, 9, 20]) if is_decode_only else MIXED
    batch = make_batch(q_lens, seq_lens, 4, 2, 64, block_size=4, dtype=torch.float32, device=DEVICE)
    out = attention_op(**batch, scale=0.125, max_query_len=max(q_lens), is_decode_only=is_decode_only)
    torch.testing.assert_close(out, paged_attention_ref(**batch, scale=0.125), **tol(torch.float32))


def test_chunked_prefill_equals_whole_prefill() -> None:
    """Attention of a prompt computed in two chunks (second chunk sees the first through the cache)
    equals the rows of a single full prefill."""
    batch = make_batch([24], [24], 4, 2, 64, block_size=4, dtype=torch.float32, device="cpu")
    whole = paged_attention_ref(**batch, scale=0.125)
    tail = dict(batch, q=batch["q"][10:], query_start_loc=torch.tensor([0, 14], dtype=torch.int32))
    torch.testing.assert_close(paged_attention_ref(**tail, scale=0.125), whole[10:])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8), (64, 8)])
def test_gpu_prefill_bf16(head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    from distrt.kernels.paged_attention import paged_attention_prefill

    q_lens, seq_lens = [1, 300, 77, 1, 513, 64], [700, 300, 1077, 33, 1025, 64]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size=16,
                       dtype=torch.bfloat16, device="cuda")
    ref = paged_attention_ref(**batch, scale=head_dim ** -0.5)
    out = torch.full_like(batch["q"], float("nan"))
    paged_attention_prefill(**batch, scale=head_dim ** -0.5, max_query_len=max(q_lens), out=out)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8), (64, 8)])
@pytest.mark.parametrize("num_splits", [1, 7, None])
def test_gpu_decode_bf16(head_dim: int, num_heads: int, num_kv_heads: int, num_splits: int | None) -> None:
    from distrt.kernels.paged_attention import paged_attention_decode

    seq_lens = [1, 4096, 333, 17, 2048, 1000, 15, 16]
    batch = make_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim, block_size=16,
                       dtype=torch.bfloat16, device="cuda")
    ref = paged_attention_ref(**batch, scale=head_dim ** -0.5)
    out = torch.full_like(batch["q"], float("nan"))
    paged_attention_decode(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"], batch["block_tables"],
                           head_dim ** -0.5, num_splits=num_splits, out=out)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("max_programs", [1, 16, 132])
def test_gpu_decode_persistent_bf16(max_programs: int) -> None:
    from distrt.kernels.paged_attention import paged_attention_decode

    seq_lens = [1, 4096, 333, 17, 2048, 1000, 15, 16]
    batch = make_batch([1] * len(seq_lens), seq_lens, 32, 8, 128, block_size=16, dtype=torch.bfloat16, device="cuda")
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"], batch["block_tables"], 128 ** -0.5)
    full = paged_attention_decode(*args)
    capped = paged_attention_decode(*args, max_programs=max_programs)
    assert torch.equal(capped, full)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("heads_fastest", [False, True])
def test_gpu_decode_grid_order_bf16(heads_fastest: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both grid orders on the GPU: bitwise equal to each other and close to the reference."""
    import distrt.kernels.paged_attention as pa

    seq_lens = [1, 4096, 333, 17, 2048, 1000, 15, 16]
    batch = make_batch([1] * len(seq_lens), seq_lens, 32, 8, 128, block_size=16, dtype=torch.bfloat16, device="cuda")
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"], batch["block_tables"], 128 ** -0.5)
    monkeypatch.setattr(pa, "DECODE_HEADS_FASTEST", not heads_fastest)
    other = pa.paged_attention_decode(*args)
    monkeypatch.setattr(pa, "DECODE_HEADS_FASTEST", heads_fastest)
    out = pa.paged_attention_decode(*args)
    assert torch.equal(out, other)
    ref = paged_attention_ref(**batch, scale=128 ** -0.5)
    assert rel_err(out, ref) < 1e-2
