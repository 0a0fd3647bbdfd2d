"""RMSNorm and fused residual-add + RMSNorm (fp32 math, output in the input dtype)."""

from __future__ import annotations

from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_rms_norm_kernel',)


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2, x.shape
    assert weight.dim() == 1 and weight.shape[0] == x.shape[1], (x.shape, weight.shape)
    assert x.device == weight.device


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, hidden] -> x / rms(x) * weight, computed in fp32, returned in x.dtype."""
    _check(x, weight)
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to x.dtype first, as HF does."""
    _check(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual


# triton.jit, applied by _jit()
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, stride_x, stride_r, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # round the sum to the input dtype before normalising, as the reference (and HF) does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * HIDDEN + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + cols, (xf * rstd * w).to(x.dtype), mask=mask)


def _new_or_checked(buf: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if buf is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert buf.shape == x.shape and buf.dtype == x.dtype and buf.is_contiguous(), (buf.shape, buf.dtype)
    return buf


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor | None, residual_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    _jit()
    _check(x, weight)
    assert x.stride(1) == 1 and weight.is_contiguous(), (x.stride(), weight.stride())
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    num_tokens, hidden = x.shape
    out = _new_or_checked(out, x)
    new_res = _new_or_checked(residual_out, x) if residual is not None else None
    if num_tokens == 0:
        return out, new_res
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 512, 1), 16)
    _rms_norm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out, new_res if new_res is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
    )
    return out, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of rms_norm_ref; x may have a row stride, output is contiguous (or `out`)."""
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of fused_add_rms_norm_ref: one pass reads x and residual, writes both outputs.
    residual_out may alias residual (in-place update, as vLLM does); out must not alias x."""
    out, new_res = _launch(x, residual, weight, eps, out, residual_out)
    assert new_res is not None
    return out, new_res
