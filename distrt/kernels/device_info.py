"""The GPU's streaming-multiprocessor count, cached per device, for sizing kernel grids.

Kernels that run under the Triton interpreter on CPU (tests) get a caller-chosen stand-in instead:
each caller picks what keeps its interpreted grid small or realistic.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device, cpu: int) -> int:
    """SMs of a CUDA device; `cpu` for any other device (or when no CUDA device answers)."""
    if device.type != "cuda":
        return cpu
    try:
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    except (RuntimeError, AssertionError):  # a CUDA device named where none is present
        return cpu
