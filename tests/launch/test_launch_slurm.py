"""The sbatch scripts against a real single-node Slurm on localhost (slurm-wlm + munge from the
distribution, installed and started by launch/testing/start-local-slurm.sh, stopped at the end):
launch/slurm/distrt-mpi.sbatch (srun --mpi=pmi2, and mpirun inside the allocation) and
launch/slurm/distrt-ray.sbatch each run `distrt generate` at tp=2 on two CPUs, and print the
same text as a local tp=1 run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from launch_helpers import PROMPT_ARGS, REPO, launch_env, lines, run
from proc_utils import processes_with

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

START = os.path.join(REPO, "launch", "testing", "start-local-slurm.sh")
MPI_SBATCH = os.path.join(REPO, "launch", "slurm", "distrt-mpi.sbatch")
RAY_SBATCH = os.path.join(REPO, "launch", "slurm", "distrt-ray.sbatch")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> object:
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (apt-get install slurm-wlm munge; root-run daemons): not root")
    state = str(tmp_path_factory.mktemp("slurm"))
    proc = run(["bash", START, state], timeout=600)
    assert proc.returncode == 0, f"start-local-slurm.sh failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    env = launch_env(SLURM_CONF=os.path.join(state, "slurm.conf"))
    try:
        yield env
    finally:
        run(["bash", START, "--stop", state], timeout=120)


_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def _sbatch(env: dict[str, str], script: str, sbatch_args: list[str], distrt_args: list[str], out: str,
            timeout: float = 420) -> tuple[str, str]:
    """sbatch, then wait for the job (polling scontrol every 0.5 s: `sbatch --wait` sleeps 2, 8, then 32 s
    between its checks, which would add up to half a minute per job); returns the job id and its output."""
    cmd = ["sbatch", "--parsable", f"--output={out}", "--nodes=1", "--gpus-per-node=0", *sbatch_args, script,
           *distrt_args]
    proc = run(cmd, timeout=60, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    job = proc.stdout.strip().split(";")[0]
    t0 = time.monotonic()
    state, info = "?", ""
    while state not in _DONE:
        if time.monotonic() - t0 > timeout:
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
            text = open(out).read() if os.path.exists(out) else ""
            pytest.fail(f"job {job} still {state} after {timeout:.0f}s; cancelled\n{text[-4000:]}")
        time.sleep(0.5)
        info = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                              timeout=30).stdout
        m = re.search(r"JobState=(\S+)", info)
        state = m.group(1) if m else state
    sys.stderr.write(f"[{time.monotonic() - t0:.1f}s] job {job} {state}: {' '.join(cmd)[:300]}\n")
    text = open(out).read() if os.path.exists(out) else "(no job output)"
    code = re.search(r"ExitCode=(\d+:\d+)", info)
    assert state == "COMPLETED" and code and code.group(1) == "0:0", (
        f"job {job} {state} (exit {code.group(1) if code else '?'}): {' '.join(cmd)}\n--- job output\n{text[-6000:]}")
    return job, text


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_mpi_tp2_matches_local(slurm: dict[str, str], tiny_ckpt: str, local_text: str, tmp_path: object,
                                      launcher: str) -> None:
    env = {**slurm, "MODEL": tiny_ckpt, "TP": "2", "LAUNCHER": launcher}
    _, out = _sbatch(env, MPI_SBATCH, ["--ntasks-per-node=2", "--cpus-per-task=1"], ["generate", *PROMPT_ARGS],
                  os.path.join(str(tmp_path), "mpi.out"))
    assert "--executor mpi" in out and "--tp 2" in out, out[-3000:]
    assert local_text in lines(out), f"want {local_text!r}\n--- job output\n{out[-4000:]}"


def test_sbatch_ray_tp2_matches_local(slurm: dict[str, str], tiny_ckpt: str, local_text: str, tmp_path: object) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="ray-t", dir="/tmp")  # short: Ray's unix socket paths live under it
    env = {**slurm, "MODEL": tiny_ckpt, "TP": "2", "RAY_WAIT_TIMEOUT": "180", "RAY_TEMP_DIR": ray_tmp}
    try:
        job, out = _sbatch(env, RAY_SBATCH, ["--ntasks-per-node=1", "--cpus-per-task=2"], ["generate", *PROMPT_ARGS],
                           os.path.join(str(tmp_path), "ray.out"))
        assert "1 Ray node(s) up: 2 CPUs" in out, out[-3000:]
        assert local_text in lines(out), f"want {local_text!r}\n--- job output\n{out[-4000:]}"
        # The workers were actors of the Ray cluster the job started, not of a Ray of the driver's own.
        assert "WorkerHost x2" in out, ("distrt's workers did not run on the Slurm job's Ray cluster (does the Ray "
                                        "executor join $RAY_ADDRESS?)\n" + out[-3000:])
        assert f"[distrt-ray] Ray stopped; its logs are in {ray_tmp}" in out, out[-2000:]
        deadline = time.monotonic() + 30
        while (left := processes_with(f"--temp-dir={ray_tmp}")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes of job {job} still running: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
