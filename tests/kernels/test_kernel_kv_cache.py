from __future__ import annotations

import pytest
import torch
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton

from distrt.kernels import write_kv_cache_op
from distrt.kernels.kv_cache import write_kv_cache_ref


def _inputs(num_tokens: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
            dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # k/v as strided views of a fused qkv buffer, as the attention layer produces them
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=g).to(dtype)
    k = qkv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1  # padding tokens
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    return (k.to(device), v.to(device), k_cache.to(device), v_cache.to(device), slots.to(device))


def test_ref_against_loop() -> None:
    k, v, k_cache, v_cache, slots = _inputs(11, 2, 8, 6, 4, torch.float32, "cpu")
    write_kv_cache_ref(k, v, k_cache, v_cache, slots)
    expect_k = torch.full_like(k_cache, float("nan"))
    expect_v = torch.full_like(v_cache, float("nan"))
    for t in range(k.shape[0]):
        s = int(slots[t])
        if s >= 0:
            expect_k[s // 4, s % 4] = k[t]
            expect_v[s // 4, s % 4] = v[t]
    assert torch.equal(k_cache.isnan(), expect_k.isnan()) and int((~k_cache.isnan()).sum()) > 0
    assert torch.equal(k_cache.nan_to_num(), expect_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), expect_v.nan_to_num())


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 80), (3, 96)])
def test_triton_matches_ref(dtype: torch.dtype, num_kv_heads: int, head_dim: int, force_triton: None) -> None:
    k, v, k_cache, v_cache, slots = _inputs(13, num_kv_heads, head_dim, 5, 4, dtype, DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k, v, ref_k, ref_v, slots)
    write_kv_cache_op(k, v, k_cache, v_cache, slots)  # routed to triton by force_triton
    # untouched slots must stay NaN, written ones must be bit-exact
    assert torch.equal(k_cache.isnan(), ref_k.isnan()) and torch.equal(v_cache.isnan(), ref_v.isnan())
    assert torch.equal(k_cache.nan_to_num(), ref_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num())


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16() -> None:
    from distrt.kernels.kv_cache import write_kv_cache

    k, v, k_cache, v_cache, slots = _inputs(4099, 8, 128, 600, 16, torch.bfloat16, "cuda")
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k, v, ref_k, ref_v, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.isnan(), ref_k.isnan())
    assert torch.equal(k_cache.nan_to_num(), ref_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num())
