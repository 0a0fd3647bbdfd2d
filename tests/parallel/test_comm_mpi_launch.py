"""Runs the MPI communicator tests under ``mpirun -n 2`` from a plain pytest session."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MPI_TESTS = Path(__file__).with_name("test_comm_mpi.py")
_LAUNCHED_BY_MPI = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _mpirun() -> str | None:
    # The venv's bin first: pip's mpich puts mpirun there, and it matches the MPI mpi4py loads.
    beside = Path(sys.executable).with_name("mpirun")
    return str(beside) if beside.exists() else shutil.which("mpirun")


def test_mpi_suite_under_mpirun(request: pytest.FixtureRequest) -> None:
    if any(v in os.environ for v in _LAUNCHED_BY_MPI) or request.config.getoption("--with-mpi", default=False):
        pytest.skip("already running under MPI; this test launches mpirun itself")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")
    if importlib.util.find_spec("pytest_mpi") is None:
        pytest.skip("pytest-mpi is not installed (pip install pytest-mpi)")
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun on PATH or beside the interpreter (pip install mpich)")

    pytest_args = ["--with-mpi", "-q", "-p", "no:cacheprovider", str(MPI_TESTS)]
    cmd = [mpirun, "-n", "2", sys.executable, "-m", "pytest", *pytest_args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        partial = [x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        pytest.fail("mpirun timed out after 120 s\n" + "\n".join(partial))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out}"
    # the two ranks share stdout, so their summary lines may run together on one line
    summaries = re.findall(r"(\d+) passed", out)
    assert summaries == ["3", "3"], f"expected '3 passed' from each rank\n{out}"
    assert not re.search(r"\d+ (skipped|failed|error)", out), out
