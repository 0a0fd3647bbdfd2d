"""The CPU engine's attention (attention_torch.paged_attention_torch, SDPA over each sequence's own
slots) against the independent oracles: the straight-from-the-definition loop and paged_attention_ref.
The caches come from make_batch, with NaN in every slot no sequence owns: this path must never read one."""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import tol
from test_kernel_paged_attention import DECODE_SEQ_LENS, MIXED, make_batch, naive_attention

from distrt.kernels import attention_op
from distrt.kernels.attention_torch import paged_attention_torch
from distrt.kernels.kv_cache import FP8_KV_DTYPE
from distrt.kernels.paged_attention import paged_attention_ref

CASES = {"mixed": MIXED, "decode": ([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS),
         "prefill_only": ([9, 4], [9, 20]), "one_token": ([1], [1])}


def _args(batch: dict[str, torch.Tensor], scale: float) -> tuple:  # type: ignore[type-arg]
    return (batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
            batch["block_tables"], scale)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(case: str, num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> None:
    q_lens, seq_lens = CASES[case]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, block_size=8, dtype=dtype, device="cpu")
    got = paged_attention_torch(*_args(batch, 0.125))
    assert got.dtype == dtype and got.shape == batch["q"].shape
    assert not got.isnan().any()
    torch.testing.assert_close(got, paged_attention_ref(*_args(batch, 0.125)), **tol(dtype))
    if dtype == torch.float32:
        naive = naive_attention(*_args(batch, 0.125))
        torch.testing.assert_close(got.double(), naive, atol=1e-5, rtol=1e-5)


def test_fp8_cache_with_scales() -> None:
    batch = make_batch(*MIXED, 8, 2, 64, block_size=8, dtype=torch.float32, device="cpu")
    k8 = (batch["k_cache"] / 2.0).to(FP8_KV_DTYPE)  # NaN garbage stays NaN in e4m3fn
    v8 = (batch["v_cache"] / 0.5).to(FP8_KV_DTYPE)
    args = (batch["q"], k8, v8, batch["query_start_loc"], batch["seq_lens"], batch["block_tables"], 0.125)
    got = paged_attention_torch(*args, k_scale=2.0, v_scale=0.5)
    torch.testing.assert_close(got, paged_attention_ref(*args, k_scale=2.0, v_scale=0.5), **tol(torch.float32))


def test_empty_batch() -> None:
    batch = make_batch([1], [3], 4, 2, 64, block_size=8, dtype=torch.float32, device="cpu")
    q = batch["q"][:0]
    out = paged_attention_torch(q, batch["k_cache"], batch["v_cache"], torch.zeros(1, dtype=torch.int32),
                                torch.zeros(0, dtype=torch.int32), batch["block_tables"][:0], 0.125)
    assert out.shape == (0, 4, 64)


def test_attention_op_cpu_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take this path (any cache layout); the reference is only the oracle."""
    import distrt.kernels as kernels

    monkeypatch.delenv("DISTRT_FORCE_TRITON", raising=False)
    calls: list[str] = []
    monkeypatch.setattr(kernels, "paged_attention_torch",
                        lambda *a, **k: calls.append("torch") or paged_attention_torch(*a, **k))
    batch = make_batch(*MIXED, 8, 2, 64, block_size=8, dtype=torch.float32, device="cpu")
    want = paged_attention_ref(*_args(batch, 0.125))
    got = attention_op(*_args(batch, 0.125), max_query_len=12, is_decode_only=False)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    strided_k = batch["k_cache"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided_k.is_contiguous()
    got = attention_op(batch["q"], strided_k, batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
                       batch["block_tables"], 0.125, max_query_len=12, is_decode_only=False)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    assert calls == ["torch", "torch"]


def test_plan_shared_across_layers() -> None:
    """Layers of one step share the gather plan through plan_cache: the second layer (other cache
    values, other queries, same metadata) reuses it and still equals the reference; a new step's dict
    starts empty."""
    step = dict()  # type: ignore[var-annotated]
    batch = make_batch(*MIXED, 8, 2, 64, block_size=8, dtype=torch.float32, device="cpu")
    layers = [batch, dict(batch, q=batch["q"].flip(0) * 0.5, k_cache=batch["k_cache"] * 2 - 1,
                          v_cache=batch["v_cache"].neg())]  # NaN garbage stays NaN
    for layer in layers:
        got = paged_attention_torch(*_args(layer, 0.125), plan_cache=step)
        torch.testing.assert_close(got, paged_attention_ref(*_args(layer, 0.125)), **tol(torch.float32))
        assert list(step) == ["attention_torch"]
    decode = make_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, 8, 2, 64, block_size=8,
                        dtype=torch.float32, device="cpu")
    fresh: dict = {}  # type: ignore[type-arg]
    got = paged_attention_torch(*_args(decode, 0.125), plan_cache=fresh)
    assert fresh["attention_torch"] is not step["attention_torch"]
    torch.testing.assert_close(got, paged_attention_ref(*_args(decode, 0.125)), **tol(torch.float32))
