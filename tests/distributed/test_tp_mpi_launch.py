"""Runs the MPI tests of this folder under `mpirun -n 2 python -m pytest --with-mpi`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mpirun_tp_parity() -> None:
    if "PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        pytest.skip("already under an MPI launcher")
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert mpirun, "mpirun not found: `pip install mpich` (make test installs it)"
    cmd = [mpirun, "-n", "2", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--with-mpi",
           os.path.join(HERE, "test_tp_mpi.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("1 passed") == 2, out[-4000:]  # both ranks ran it, neither skipped
