"""Writes a benchmark result as {"device", "date", "commit", "command", "metrics", "details"}."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from typing import Any


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def commit() -> str:
    env = os.environ.get("DISTRT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(path: str, metrics: dict[str, Any], details: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = {
        "device": device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": " ".join([f"{k}={v}" for k, v in sorted(os.environ.items())
                             if k.startswith("DISTRT_") and k != "DISTRT_COMMIT"]
                            + [os.path.basename(sys.executable)] + sys.argv),
        "metrics": metrics,
        "details": details or {},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    return doc
