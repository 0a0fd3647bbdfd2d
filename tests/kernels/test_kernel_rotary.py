from __future__ import annotations

import pytest
import torch
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton, rel_err, tol
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from distrt.kernels import apply_rotary_op
from distrt.kernels.rotary import apply_rotary_ref, build_rope_cache

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _hf_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    params = {"rope_theta": base, **(scaling or {"rope_type": "default"})}
    if "type" in params:
        params["rope_type"] = params.pop("type")
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_parameters=params,
                      max_position_embeddings=4096)
    rope_type = params["rope_type"]
    if rope_type == "default":  # transformers keeps the default init on the rotary module, not in the table
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    assert attention_factor == 1.0
    return inv_freq


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("base,scaling", [
    (10000.0, None), (10000.0, {"rope_type": "default"}), (500000.0, LLAMA3),
    (500000.0, {**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"}),
    (10000.0, {"rope_type": "linear", "factor": 4.0}),
])
def test_cache_against_transformers(head_dim: int, base: float, scaling: dict | None) -> None:
    cos_sin = build_rope_cache(head_dim, 300, base, scaling)
    assert cos_sin.shape == (300, head_dim) and cos_sin.dtype == torch.float32
    freqs = torch.outer(torch.arange(300).float(), _hf_inv_freq(head_dim, base, scaling))
    torch.testing.assert_close(cos_sin[:, :head_dim // 2], freqs.cos())
    torch.testing.assert_close(cos_sin[:, head_dim // 2:], freqs.sin())


def test_llama3_actually_scales() -> None:
    plain = build_rope_cache(64, 200, 500000.0, None)
    scaled = build_rope_cache(64, 200, 500000.0, LLAMA3)
    assert not torch.allclose(plain, scaled)
    torch.testing.assert_close(plain[:, :2], scaled[:, :2])  # highest frequencies are untouched


@pytest.mark.parametrize("head_dim", [64, 80])
def test_apply_ref_against_transformers(head_dim: int) -> None:
    cos_sin = build_rope_cache(head_dim, 100, 10000.0, LLAMA3)
    positions = torch.randint(0, 100, (9,))
    q, k = torch.randn(9, 4, head_dim), torch.randn(9, 2, head_dim)
    q_out, k_out = apply_rotary_ref(q, k, positions, cos_sin)
    half = head_dim // 2
    cos = cos_sin[positions, :half].repeat(1, 2)  # HF layout: [T, D] = cat(freqs, freqs)
    sin = cos_sin[positions, half:].repeat(1, 2)
    # HF wants [batch, heads, seq, D] and cos/sin [batch, seq, D]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(q_out, hq[0].transpose(0, 1))
    torch.testing.assert_close(k_out, hk[0].transpose(0, 1))


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_triton_matches_ref(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    from distrt.kernels.rotary import apply_rotary

    cos_sin = build_rope_cache(head_dim, 64, 10000.0, None).to(DEVICE)
    num_tokens = 11
    # q, k as strided views into one fused qkv buffer, as the attention layer produces them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    positions = torch.randint(1, 64, (num_tokens,)).to(DEVICE)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos_sin)
    q_out, k_out = apply_rotary(q, k, positions, cos_sin)
    assert q_out.data_ptr() == q.data_ptr()  # documented: in place
    torch.testing.assert_close(q, ref_q, **tol(dtype))
    torch.testing.assert_close(k, ref_k, **tol(dtype))
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched


@needs_triton
def test_op_dispatch(force_triton: None) -> None:
    cos_sin = build_rope_cache(64, 32, 10000.0, None).to(DEVICE)
    q, k = torch.randn(5, 4, 64, device=DEVICE), torch.randn(5, 2, 64, device=DEVICE)
    pos = torch.arange(5, device=DEVICE)
    ref_q, ref_k = apply_rotary_ref(q, k, pos, cos_sin)
    q_out, k_out = apply_rotary_op(q, k, pos, cos_sin)
    torch.testing.assert_close(q_out, ref_q)
    torch.testing.assert_close(k_out, ref_k)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_bf16(head_dim: int) -> None:
    from distrt.kernels.rotary import apply_rotary

    cos_sin = build_rope_cache(head_dim, 8192, 500000.0, {**LLAMA3, "original_max_position_embeddings": 8192}).cuda()
    q = torch.randn(4096, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4096, 8, head_dim, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 8192, (4096,), device="cuda")
    ref_q, ref_k = apply_rotary_ref(q, k, pos, cos_sin)
    apply_rotary(q, k, pos, cos_sin)
    assert rel_err(q, ref_q) < 1e-2 and rel_err(k, ref_k) < 1e-2
