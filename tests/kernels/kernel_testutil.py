"""Helpers shared by the kernel tests (imported after conftest.py has set TRITON_INTERPRET)."""

from __future__ import annotations

import pytest
import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# CPU: kernels run in the interpreter on CPU tensors; GPU: compiled, on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]  # interpreter tl.dot on bf16 returns garbage

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]
