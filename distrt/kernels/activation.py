"""SiLU-and-mul (SwiGLU gate): out = silu(x[:, :I]) * x[:, I:]."""

from __future__ import annotations

from typing import Any

import torch

from distrt.kernels._lazy_triton import jit_kernels

# Bound on first launch by _jit() (see _lazy_triton: importing triton here would fix its mode too early).
triton: Any = None
tl: Any = None
_KERNELS = ('_silu_and_mul_kernel',)


def _jit() -> None:
    jit_kernels(globals(), _KERNELS)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] -> [T, I], computed in fp32, returned in x.dtype."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, x.shape
    inter = x.shape[1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[:, :inter]) * xf[:, inter:]).to(x.dtype)


# triton.jit, applied by _jit()
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    tl.store(out_ptr + row * INTER + cols, (g * tl.sigmoid(g) * up).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of silu_and_mul_ref; x may have a row stride, output is contiguous (or `out`)."""
    _jit()
    assert x.dim() == 2 and x.shape[1] % 2 == 0, x.shape
    assert x.stride(1) == 1, x.stride()
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, inter) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    if num_tokens == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out, x.stride(0), INTER=inter, BLOCK=block, num_warps=4)
    return out
