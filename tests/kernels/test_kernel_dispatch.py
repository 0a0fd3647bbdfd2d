from __future__ import annotations

import os
import subprocess
import sys

import torch

from distrt.kernels import use_triton


def test_cpu_tensors_use_reference(monkeypatch) -> None:
    monkeypatch.delenv("DISTRT_FORCE_TRITON", raising=False)
    assert not use_triton(torch.zeros(1))


def test_cpu_path_never_imports_triton() -> None:
    code = (
        "import sys, torch\n"
        "from distrt.kernels import rms_norm_op, attention_op\n"
        "rms_norm_op(torch.randn(2, 8), torch.ones(8), 1e-6)\n"
        "assert 'triton' not in sys.modules, 'importing or using distrt.kernels on CPU imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "DISTRT_FORCE_TRITON": "0"})


def test_package_works_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import os; os.environ['DISTRT_FORCE_TRITON'] = '1'\n"
        "import torch\n"
        "from distrt.kernels import use_triton, rms_norm_op, silu_and_mul_op\n"
        "assert not use_triton(torch.zeros(1))\n"
        "x = torch.randn(2, 8)\n"
        "assert rms_norm_op(x, torch.ones(8), 1e-6).shape == (2, 8)\n"
        "assert silu_and_mul_op(x).shape == (2, 4)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
