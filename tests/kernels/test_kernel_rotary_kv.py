"""Rotary embedding fused with the KV-cache write (kernels/rotary_kv.py): bit for bit what apply_rotary
followed by write_kv_cache gives, for model-dtype and fp8 caches, strided qkv views, GQA, unsorted
positions and padding slots (-1, never written); the attention layer's rope path equals rotating first."""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton, rel_err, tol
# autouse there; imported, it is autouse here too: exact fp32 -> e4m3 casts under the interpreter
from test_kernel_kv_cache_fp8 import _exact_interpreter_fp8_cast  # noqa: F401

from distrt.kernels import apply_rotary_op, rotary_write_kv_op
from distrt.kernels.kv_cache import FP8_KV_DTYPE, write_kv_cache
from distrt.kernels.rotary import apply_rotary, apply_rotary_ref, build_rope_cache
from distrt.kernels.rotary_kv import rotary_write_kv, rotary_write_kv_ref

MAX_POS = 300
EXACT_REF = DEVICE == "cpu"  # interpreter: the same fp32 operations as torch, see _assert_matches_ref


def _inputs(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
            cache_dtype: torch.dtype, device: str, wide: bool = False, num_blocks: int = 9, block_size: int = 4,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """q/k/v as strided views of one fused qkv buffer; positions unsorted; every third slot -1 (padding);
    caches all NaN. wide: magnitudes 2^-12 .. 2^10 (e4m3 subnormals, normals and overflow past 448)."""
    g = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    shape = (num_tokens, q_size + 2 * kv_size)
    qkv = torch.randn(shape, generator=g)
    if wide:
        qkv = qkv * 2.0 ** torch.randint(-12, 11, shape, generator=g)
    qkv = qkv.to(dtype).to(device)
    positions = torch.randint(0, MAX_POS, (num_tokens,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan")).to(cache_dtype)
    return dict(
        qkv=qkv,
        q=qkv[:, :q_size].view(num_tokens, num_heads, head_dim),
        k=qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim),
        v=qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim),
        positions=positions.to(device), cos_sin=build_rope_cache(head_dim, MAX_POS, 10000.0, None).to(device),
        k_cache=k_cache.to(device), v_cache=k_cache.clone().to(device), slot_mapping=slots.to(device),
    )


def _args(x: dict[str, torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x["q"], x["k"], x["v"], x["positions"], x["cos_sin"], k_cache, v_cache, x["slot_mapping"]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality for any dtype (NaN bytes included; torch.equal has no fp8 kernel)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    return torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


def _unfused(x: dict[str, torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float,
             v_scale: float) -> torch.Tensor:
    """The two Triton kernels the fused one replaces (what the model ran before), on copies of q and k."""
    q, k = x["q"].clone(), x["k"].clone()
    apply_rotary(q, k, x["positions"], x["cos_sin"])
    write_kv_cache(k, x["v"], k_cache, v_cache, x["slot_mapping"], k_scale, v_scale)
    return q


def _assert_matches_ref(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit for bit under the interpreter (plain fp32 ops, as torch). Compiled code may contract
    x1 * cos - x2 * sin into an fma: an ulp off now and then (and so, rarely, a different bf16/e4m3)."""
    if EXACT_REF:
        assert _same_bytes(out, ref)
    elif out.dtype == FP8_KV_DTYPE:  # an e4m3 step is 2^-3 relative: few values land on the other side
        assert (out.view(torch.uint8) != ref.view(torch.uint8)).float().mean().item() < 1e-2
        assert rel_err(out.float().nan_to_num(), ref.float().nan_to_num()) < 1e-2
    else:
        torch.testing.assert_close(out, ref, equal_nan=True, **tol(out.dtype))


def _check_against_ref(x: dict[str, torch.Tensor], k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Runs the kernel on x: bit for bit the unfused kernels, and the reference (see _assert_matches_ref)."""
    qkv_before = x["qkv"].clone()
    ref_k, ref_v = x["k_cache"].clone(), x["v_cache"].clone()
    ref_q = rotary_write_kv_ref(*_args(x, ref_k, ref_v), k_scale, v_scale)
    assert _same_bytes(x["qkv"], qkv_before)  # the reference leaves its inputs alone
    un_k, un_v = x["k_cache"].clone(), x["v_cache"].clone()
    un_q = _unfused(x, un_k, un_v, k_scale, v_scale)
    out = rotary_write_kv(*_args(x, x["k_cache"], x["v_cache"]), k_scale, v_scale)
    assert out.data_ptr() == x["q"].data_ptr()  # documented: q rotated in place and returned
    assert _same_bytes(out, un_q) and _same_bytes(x["k_cache"], un_k) and _same_bytes(x["v_cache"], un_v)
    for got, ref in ((out, ref_q), (x["k_cache"], ref_k), (x["v_cache"], ref_v)):
        _assert_matches_ref(got, ref)
    q_size = x["q"].shape[1] * x["q"].shape[2]
    assert _same_bytes(x["qkv"][:, q_size:], qkv_before[:, q_size:])  # k and v not modified
    nan = x["k_cache"].float().isnan().flatten(2).all(-1).flatten().cpu()  # [slots]: slot never written
    valid = x["slot_mapping"][x["slot_mapping"] >= 0].cpu()
    assert not nan[valid].any()
    written = torch.zeros_like(nan)
    written[valid] = True
    assert nan[~written].all()  # padding tokens (-1) wrote nowhere, other slots untouched


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (32, 8), (6, 1), (4, 4)])
def test_triton_matches_ref(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    # fp32 and fp16: the interpreter's fp32 -> fp16 cast rounds to nearest even like torch's (bf16's
    # truncates, hence bf16 in test_gpu_bf16_fp8 only)
    _check_against_ref(_inputs(13, num_heads, num_kv_heads, head_dim, dtype, dtype, DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.5, 4.0)])
def test_triton_matches_ref_fp8(dtype: torch.dtype, k_scale: float, v_scale: float) -> None:
    x = _inputs(29, 8, 2, 64, dtype, FP8_KV_DTYPE, DEVICE, wide=True, num_blocks=12)
    _check_against_ref(x, k_scale, v_scale)
    written = x["k_cache"].cpu().float()
    written = written[~written.isnan()].abs()
    assert (written == 448).sum() > 10 and ((written > 0) & (written < 2**-6)).sum() > 10  # saturated, subnormal


@needs_triton
def test_all_padding_and_empty() -> None:
    x = _inputs(5, 4, 2, 64, torch.float32, torch.float32, DEVICE)
    x["slot_mapping"].fill_(-1)
    _check_against_ref(x)  # q still rotated (attention runs on padding rows too), caches all NaN
    assert x["k_cache"].isnan().all() and x["v_cache"].isnan().all()
    e = _inputs(0, 4, 2, 64, torch.float32, torch.float32, DEVICE)
    assert rotary_write_kv(*_args(e, e["k_cache"], e["v_cache"])).shape == (0, 4, 64)


def test_ref_is_rotary_then_write() -> None:
    """The reference (CPU path of the op) against its definition, on a loop over tokens."""
    x = _inputs(11, 4, 2, 64, torch.float32, torch.float32, "cpu")
    q_rot, k_rot = apply_rotary_ref(x["q"], x["k"], x["positions"], x["cos_sin"])
    expect_k, expect_v = x["k_cache"].clone(), x["v_cache"].clone()
    for t, s in enumerate(x["slot_mapping"].tolist()):
        if s >= 0:
            expect_k[s // 4, s % 4], expect_v[s // 4, s % 4] = k_rot[t], x["v"][t]
    out = rotary_write_kv_op(*_args(x, x["k_cache"], x["v_cache"]))
    assert _same_bytes(out, q_rot) and _same_bytes(x["k_cache"], expect_k) and _same_bytes(x["v_cache"], expect_v)
    assert not _same_bytes(out, x["q"])  # reference path: a rotated copy, q untouched


@needs_triton
def test_op_dispatch(force_triton: None) -> None:
    x = _inputs(7, 4, 2, 64, torch.float32, torch.float32, DEVICE)
    ref_k, ref_v = x["k_cache"].clone(), x["v_cache"].clone()
    ref_q = rotary_write_kv_ref(*_args(x, ref_k, ref_v))
    out = rotary_write_kv_op(*_args(x, x["k_cache"], x["v_cache"]))
    assert out.data_ptr() == x["q"].data_ptr()  # the Triton path ran (in place)
    _assert_matches_ref(out, ref_q)
    _assert_matches_ref(x["k_cache"], ref_k)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["ref", "triton"])
@pytest.mark.parametrize("qk_shape", ["flat", "heads"])
def test_attention_layer_rope_path(use_kernel: bool, qk_shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention.forward(..., positions, rope) == rotating q/k first (apply_rotary_op, as the models did)
    and calling it without rope."""
    from distrt.layers.attention import Attention, AttentionMetadata
    from distrt.layers.rotary import RotaryEmbedding

    if use_kernel:
        pytest.importorskip("triton")
        monkeypatch.setenv("DISTRT_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("DISTRT_FORCE_TRITON", raising=False)
    device = DEVICE if use_kernel else "cpu"
    num_heads, num_kv_heads, head_dim, block_size, num_tokens = 4, 2, 32, 4, 10
    x = _inputs(num_tokens, num_heads, num_kv_heads, head_dim, torch.float32, torch.float32, device,
                block_size=block_size)
    block_table = torch.tensor([[5, 1, 7, 2]], dtype=torch.int32)
    pos = torch.arange(num_tokens)
    meta = AttentionMetadata(
        slot_mapping=(block_table[0, pos // block_size].long() * block_size + pos % block_size).to(device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device), block_tables=block_table.to(device),
        max_query_len=num_tokens, max_seq_len=num_tokens, is_decode_only=False)
    rope = RotaryEmbedding(head_dim, MAX_POS, 10000.0, None, device)
    positions = (pos + 100).to(device)
    attn = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5)
    q_rot, k_rot = apply_rotary_op(x["q"].clone(), x["k"].clone(), positions, rope.cos_sin)
    caches = (x["k_cache"].clone(), x["v_cache"].clone())
    expect = attn(q_rot.clone(), k_rot, x["v"].clone(), caches, meta)
    q, k, v = x["q"], x["k"], x["v"]
    if qk_shape == "flat":
        q, k, v = q.flatten(1), k.flatten(1), v.flatten(1)  # [T, H*D] strided views, as split() gives them
    out = attn(q, k, v, (x["k_cache"], x["v_cache"]), meta, positions=positions, rope=rope)
    assert torch.equal(out, expect)
    assert torch.equal(x["k_cache"].nan_to_num(), caches[0].nan_to_num())
    assert torch.equal(x["v_cache"].nan_to_num(), caches[1].nan_to_num())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_KV_DTYPE], ids=["bf16", "fp8"])
def test_gpu_bf16_fp8(cache_dtype: torch.dtype) -> None:
    """Compiled, bf16 activations at Llama-3-8B shapes: bit for bit the two kernels it replaces, close
    to the torch reference (see _assert_matches_ref)."""
    fp8 = cache_dtype == FP8_KV_DTYPE
    x = _inputs(4099, 32, 8, 128, torch.bfloat16, cache_dtype, "cuda", wide=fp8, num_blocks=600, block_size=16)
    _check_against_ref(x, *((0.5, 2.0) if fp8 else (1.0, 1.0)))
