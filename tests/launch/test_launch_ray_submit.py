"""launch/ray-submit.sh: `ray job submit --working-dir <checkout> -- python -m distrt generate ...`
against a Ray head this test starts (with its dashboard/job server, token authentication, free
ports and a private temp dir), stopped at the end. Same text as a local tp=1 run, and the workers
are actors of that cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from launch_helpers import PROMPT_ARGS, REPO, free_port, launch_env, lines, run, which

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_head() -> object:
    pytest.importorskip("ray.dashboard")  # ray[default]: the job server lives in the dashboard
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths live under it
    port, dash = free_port(), free_port()
    env = launch_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "head.log"), "w")
    cmd = [which("ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert head.poll() is None, f"ray start exited with {head.returncode}:\n{open(log.name).read()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # e.g. 401 without the token: the server answers, it is up
                break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the Ray dashboard did not come up:\n{open(log.name).read()[-4000:]}"
            time.sleep(0.5)
        yield url, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes (no global `ray stop`)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of that session still left
        except ProcessLookupError:
            pass
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_tp2_matches_local(ray_head: tuple[str, dict[str, str]], tiny_ckpt: str,
                                          local_text: str) -> None:
    url, env = ray_head
    submit = os.path.join(REPO, "launch", "ray-submit.sh")
    proc = run(["bash", submit, "--address", url, "--", "generate", "--model", tiny_ckpt, "--tp", "2", *PROMPT_ARGS],
               timeout=420, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "--executor ray" in out and "succeeded" in out, out[-4000:]
    assert local_text in lines(proc.stdout), f"want {local_text!r}\n{out[-4000:]}"

    # The job's workers were actors of this cluster (not of a Ray the driver started for itself).
    probe = ("import json, sys\nfrom ray.util.state import list_actors\n"
             "print(json.dumps([a.class_name for a in list_actors(address=sys.argv[1], limit=1000)]))")
    p = run([sys.executable, "-c", probe, url], timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    classes = json.loads(p.stdout.strip().splitlines()[-1])
    assert classes.count("WorkerHost") == 2, f"actors on the cluster: {classes} (does the Ray executor join $RAY_ADDRESS?)"
