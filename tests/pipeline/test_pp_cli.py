"""The CLI with --pp 2 launched as `mpirun -n 2 python -m distrt generate` (rank 0 coordinates and
runs stage 0; its result forwarder shares the in-process link): the same greedy text as pp=1 in
this process. (The spawned MPI path is what test_pp_executors.py runs.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distrt import LLM, SamplingParams
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ppc")), "llama-gqa", num_hidden_layers=3)


def test_cli_mpirun_pp2_matches_pp1(ckpt: str) -> None:
    with LLM(ckpt, dtype="float32", device="cpu", max_model_len=64) as llm:
        want = llm.generate("w5 w6 w7", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    args = ["-m", "distrt", "generate", "--model", ckpt, "--pp", "2", "--device", "cpu", "--dtype", "float32",
            "--max-model-len", "64", "--prompt", "w5 w6 w7", "--max-tokens", "8", "--ignore-eos"]
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    mpirun = shutil.which("mpirun", path=env["PATH"])
    assert mpirun, "mpirun not found: `pip install mpich` (make test installs it)"
    cmd = [mpirun, "-n", "2", sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[0] == want
