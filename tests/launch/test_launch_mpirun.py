"""launch/mpirun.sh: `mpirun -n 2 python -m distrt generate ... --tp 2 --executor mpi` (the rank count
from --tp; rank 0 the coordinator) prints the same text as a local tp=1 run."""

from __future__ import annotations

import os

import pytest

from launch_helpers import PROMPT_ARGS, REPO, launch_env, lines, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_mpirun_tp2_matches_local(tiny_ckpt: str, local_text: str) -> None:
    if any(k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")):
        pytest.skip("already under an MPI launcher")
    proc = run(["bash", os.path.join(REPO, "launch", "mpirun.sh"), "--", "generate", "--model", tiny_ckpt, "--tp", "2",
                *PROMPT_ARGS], timeout=240, env=launch_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " -n 2 " in proc.stderr and "--executor mpi" in proc.stderr, proc.stderr[-2000:]
    assert local_text in lines(proc.stdout), f"want {local_text!r}\n{proc.stdout}\n{proc.stderr[-3000:]}"
