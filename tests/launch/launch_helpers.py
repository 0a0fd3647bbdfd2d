"""Helpers of the launcher tests (imported by tests/launch/*.py; fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
PROMPT_ARGS = ["--prompt", "w5 w6 w7", "--max-tokens", "12", "--ignore-eos", "--device", "cpu", "--dtype", "float32",
               "--max-model-len", "128", "--kv-cache-memory", "4000000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env(**extra: str) -> dict[str, str]:
    """This interpreter's bin first on PATH (distrt, ray, mpirun of the venv), plus `extra`."""
    return {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "PYTHON": sys.executable, **extra}


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str = REPO,
        on_timeout: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `cmd` to completion, or fails the test at `timeout` (after running `on_timeout`, e.g. scancel)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        if on_timeout:
            subprocess.run(on_timeout, capture_output=True, timeout=30, env=env)
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    sys.stderr.write(f"[{time.perf_counter() - t0:.1f}s] {' '.join(cmd)[:300]}\n")
    return proc


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def which(name: str) -> str:
    found = shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))
    assert found, f"{name} not found"
    return found


def local_generate(argv: list[str]) -> str:
    """`distrt generate ARGV --tp 1 --executor local` in this process; the generated text (stdout's first line)."""
    from distrt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["generate", *argv, "--tp", "1", "--executor", "local"])
    assert rc == 0, out.getvalue()
    text = out.getvalue().splitlines()[0].strip()
    assert text, out.getvalue()
    return text
