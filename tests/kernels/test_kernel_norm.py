from __future__ import annotations

import pytest
import torch
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton, rel_err, tol
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from distrt.kernels import fused_add_rms_norm_op, rms_norm_op
from distrt.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref


def _hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ref_against_transformers(dtype: torch.dtype) -> None:
    x = torch.randn(5, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), _hf_norm(x, w, 1e-6), **tol(dtype))
    r = torch.randn(5, 96).to(dtype)
    out, new_res = fused_add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(new_res, x + r, atol=0, rtol=0)
    torch.testing.assert_close(out, _hf_norm(x + r, w, 1e-6), **tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hidden", [64, 200, 1024])
def test_triton_matches_ref(dtype: torch.dtype, hidden: int) -> None:
    from distrt.kernels.norm import fused_add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(hidden)
    wide = torch.randn(7, hidden + 16, generator=g).to(dtype).to(DEVICE)
    x = wide[:, :hidden]  # row-strided input
    r = torch.randn(7, hidden, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    out = torch.full((7, hidden), float("nan"), dtype=dtype, device=DEVICE)
    rms_norm(x, w, 1e-5, out=out)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), **tol(dtype))
    out.fill_(float("nan"))
    new_res = torch.full_like(out, float("nan"))
    fused_add_rms_norm(x, r, w, 1e-5, out=out, residual_out=new_res)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **tol(dtype))


@needs_triton
def test_ops_dispatch(force_triton: None) -> None:
    x, r, w = torch.randn(3, 80, device=DEVICE), torch.randn(3, 80, device=DEVICE), torch.randn(80, device=DEVICE)
    torch.testing.assert_close(rms_norm_op(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    for got, ref in zip(fused_add_rms_norm_op(x, r, w, 1e-6), fused_add_rms_norm_ref(x, r, w, 1e-6)):
        torch.testing.assert_close(got, ref)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hidden", [4096, 5120, 8192])
def test_gpu_bf16(hidden: int) -> None:
    from distrt.kernels.norm import fused_add_rms_norm, rms_norm

    x = torch.randn(1000, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, w, 1e-6, out=out)
    assert rel_err(out, rms_norm_ref(x, w, 1e-6)) < 1e-2
    out.fill_(float("nan"))
    res = torch.full_like(x, float("nan"))
    fused_add_rms_norm(x, r, w, 1e-6, out=out, residual_out=res)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-6)
    assert rel_err(out, ref_out) < 1e-2 and torch.equal(res, ref_res)
