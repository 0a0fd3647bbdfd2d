"""SiLU-and-mul (SwiGLU gate): out = silu(x[:, :I]) * x[:, I:]."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package must import without triton (CPU path)
    triton = None
    tl = None


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] -> [T, I], computed in fp32, returned in x.dtype."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, x.shape
    inter = x.shape[1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[:, :inter]) * xf[:, inter:]).to(x.dtype)


if triton is not None:

    @triton.jit
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
