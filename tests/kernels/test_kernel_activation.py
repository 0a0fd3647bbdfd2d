from __future__ import annotations

import pytest
import torch
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton, rel_err, tol

from distrt.kernels import silu_and_mul_op
from distrt.kernels.activation import silu_and_mul_ref


def test_ref_against_definition() -> None:
    x = torch.randn(4, 2 * 50)
    gate, up = x[:, :50], x[:, 50:]
    expect = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(silu_and_mul_ref(x), expect)


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("inter", [48, 1000, 2500])  # 2500: several column blocks, masked tail
def test_triton_matches_ref(dtype: torch.dtype, inter: int) -> None:
    from distrt.kernels.activation import silu_and_mul

    wide = torch.randn(5, 2 * inter + 8).to(dtype).to(DEVICE)
    x = wide[:, :2 * inter]  # row-strided input
    out = torch.full((5, inter), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x, out=out)
    torch.testing.assert_close(out, silu_and_mul_ref(x), **tol(dtype))


@needs_triton
def test_op_dispatch(force_triton: None) -> None:
    x = torch.randn(3, 64, device=DEVICE)
    torch.testing.assert_close(silu_and_mul_op(x), silu_and_mul_ref(x))


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16() -> None:
    from distrt.kernels.activation import silu_and_mul

    x = torch.randn(2048, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    out = torch.full((2048, 14336), float("nan"), device="cuda", dtype=torch.bfloat16)
    silu_and_mul(x, out=out)
    assert rel_err(out, silu_and_mul_ref(x)) < 1e-2
