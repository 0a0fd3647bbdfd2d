"""Deferred `import triton` and `@triton.jit`.

Triton fixes interpreter-vs-compiler mode (TRITON_INTERPRET) when it is imported (its standard
library is jitted then) and when each kernel is decorated. Kernel modules therefore keep kernels
as plain functions and decorate them on first launch: importing distrt never imports triton,
CPU-only use never pays for it, and a test session can still choose the interpreter late.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked)
        return False


def jit_kernels(module_globals: dict[str, Any], names: tuple[str, ...]) -> None:
    """Bind `triton`/`tl` in the kernel module and replace the named functions by jitted ones (once)."""
    if module_globals.get("triton") is not None:
        return
    import triton
    import triton.language as tl

    for name in names:
        module_globals[name] = triton.jit(module_globals[name])
    module_globals["tl"] = tl
    module_globals["triton"] = triton  # last: marks the module as done
