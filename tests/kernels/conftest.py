"""Kernel tests: Triton kernels run under the interpreter when no GPU is present.

Shared helpers live in kernel_testutil.py (a unique module name: `conftest` is ambiguous across test dirs).

triton.jit picks interpreter vs compiler when a kernel is *decorated* (module import), so the
env var is set here, before the tests import distrt.kernels; kernel modules that another test
directory already imported without it are reloaded. With CUDA present nothing is changed.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_FAMILIES = ("kv_cache", "paged_attention", "norm", "rotary", "activation")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in _FAMILIES:
        _mod = sys.modules.get(f"distrt.kernels.{_name}")
        if _mod is not None:
            importlib.reload(_mod)


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRT_FORCE_TRITON", "1")
