"""Kernel tests: without a GPU the Triton kernels run in the interpreter on CPU tensors.

Triton fixes interpreter-vs-compiler mode when it is first imported, so TRITON_INTERPRET=1 is set
here at collection time. distrt never imports triton before a kernel's first launch (see
distrt/kernels/_lazy_triton.py), so this is early enough unless some other test module imported
triton at import time: then the kernel tests fail with that explanation rather than a cryptic
"Cannot call @triton.jit'd outside of the scope of a kernel". With CUDA present nothing is changed.
Shared helpers live in kernel_testutil.py (`conftest` is an ambiguous module name across test dirs).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_IMPORTED_TOO_EARLY = False
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    _IMPORTED_TOO_EARLY = "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _interpreter_usable() -> None:
    if _IMPORTED_TOO_EARLY:
        pytest.fail("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                    "set it in the environment or in tests/conftest.py (CPU runs)")


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRT_FORCE_TRITON", "1")
