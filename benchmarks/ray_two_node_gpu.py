"""launch/slurm/distrt-ray.sbatch in its two-node form on one host (issue 7): two Ray nodes, one GPU
each, NCCL forced onto sockets (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1), `distrt serve --tp 2
--executor ray` on them, one HTTP completion, greedy text compared with a tp=1 run on one GPU.

The sbatch script itself runs, unchanged, under two stand-ins written to a temp dir: `scontrol show
hostnames` names two nodes, and `srun` runs each step on this host, the head's step (`-w node1`)
with CUDA_VISIBLE_DEVICES=0 and the other node's (`--exclude=node1`) with CUDA_VISIBLE_DEVICES=1,
so each `ray start --num-gpus 1` raylet sees one GPU. If that cluster does not come up, the fallback
(`--mode auto`) is ray.cluster_utils.Cluster: two Ray nodes in this process, one GPU each, and
`distrt serve` joins them through RAY_ADDRESS.

    python benchmarks/ray_two_node_gpu.py [--mode auto|sbatch|cluster] [--out PATH]
    python benchmarks/ray_two_node_gpu.py --device cpu --out /tmp/r.json   # the same flow on CPUs

Checks (each a field of the result, and the exit status): two Ray nodes alive, the two WorkerHost
actors on different nodes, HTTP 200 with text, the text equal to the tp=1 run's, Ray stopped
(no process left with the job's temp dir). Writes benchmarks/results/h200x2/ray_two_node.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "gpu")]  # tiny_models, gpu_checks
from proc_utils import processes_with  # noqa: E402

SBATCH = os.path.join(REPO, "launch", "slurm", "distrt-ray.sbatch")
PROMPT = "w5 w6 w7 w8 w9 w10 w11"

SRUN = """#!/usr/bin/env bash
# srun stand-in: every step runs on this host; -w NODE is the head's step, --exclude=NODE another node's
gpus=${SHIM_HEAD_GPUS:-}
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    -w) shift ;;
    --exclude=*) gpus=${SHIM_WORKER_GPUS:-} ;;
  esac
  shift
done
[[ -n $gpus ]] && export CUDA_VISIBLE_DEVICES=$gpus
echo "[srun stand-in] CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}: $*" >&2
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo node1; echo node2; exit 0; fi
echo "scontrol stand-in: unsupported: $*" >&2; exit 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:2000]


def engine_args(a: argparse.Namespace) -> list[str]:
    return ["--device", a.device, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
            "--kv-cache-memory", "0.3" if a.device == "cuda" else "4000000"]


def serve_args(a: argparse.Namespace, port: int) -> list[str]:
    return engine_args(a) + ["--port", str(port), "--host", "127.0.0.1"]


def reference_text(a: argparse.Namespace, ckpt: str, env: dict[str, str]) -> str:
    """`distrt generate` at tp=1 on one device (GPU 0), in a process of its own: the text to match."""
    cmd = [sys.executable, "-m", "distrt", "generate", "--model", ckpt, "--prompt", PROMPT, "--max-tokens",
           str(a.max_tokens), "--ignore-eos", "--tp", "1", "--executor", "local", *engine_args(a)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "CUDA_VISIBLE_DEVICES": "0"})
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"reference run failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout.splitlines()[0].strip()


def start_sbatch(a: argparse.Namespace, ckpt: str, port: int, work: str, env: dict[str, str]) -> tuple[Any, str, str]:
    """The sbatch script under the stand-ins; returns (process, RAY_ADDRESS, ray temp dir)."""
    shims = os.path.join(work, "bin")
    os.makedirs(shims)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        with open(os.path.join(shims, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(shims, name), 0o755)
    ray_tmp = tempfile.mkdtemp(prefix="ray-2n-", dir="/tmp")  # short: Ray's socket paths live under it
    gpu = a.device == "cuda"
    ray_port = free_port()
    head_ip = subprocess.run([sys.executable, "-c", "import ray.util; print(ray.util.get_node_ip_address())"],
                             capture_output=True, text=True, timeout=60, env=env).stdout.strip() or "127.0.0.1"
    env = {**env, "PATH": shims + os.pathsep + env["PATH"], "PYTHON": sys.executable, "SLURM_JOB_ID": f"2n{os.getpid()}",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": REPO, "RAY_PORT": str(ray_port), "RAY_HEAD_IP": head_ip,
           "RAY_TEMP_DIR": ray_tmp, "RAY_WAIT_TIMEOUT": str(a.cluster_timeout), "RAY_CPUS_PER_NODE": "2" if gpu else "1",
           "RAY_GPUS_PER_NODE": "1" if gpu else "0", "SHIM_HEAD_GPUS": "0" if gpu else "", "SHIM_WORKER_GPUS": "1" if gpu else "",
           "MODEL": ckpt, "TP": "2", "EXTRA_ARGS": " ".join(serve_args(a, port))}
    proc = subprocess.Popen(["bash", SBATCH, "serve"], stdout=open(a.log_path("sbatch"), "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)
    return proc, f"{head_ip}:{ray_port}", ray_tmp


def start_cluster(a: argparse.Namespace, ckpt: str, port: int, env: dict[str, str]) -> tuple[Any, str, Any]:
    """Fallback: ray.cluster_utils.Cluster, two nodes (one GPU each) in this process; serve joins it."""
    from ray.cluster_utils import Cluster as RayTestCluster

    gpu = a.device == "cuda"
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    rc = RayTestCluster()
    for dev in ("0", "1"):
        if gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = dev  # what this node's raylet sees
        rc.add_node(num_cpus=2 if gpu else 1, num_gpus=1 if gpu else 0)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None) if saved is None else os.environ.__setitem__("CUDA_VISIBLE_DEVICES", saved)
    rc.wait_for_nodes(timeout=a.cluster_timeout)
    cmd = [sys.executable, "-m", "distrt", "serve", "--model", ckpt, "--tp", "2", "--executor", "ray",
           *serve_args(a, port)]
    proc = subprocess.Popen(cmd, stdout=open(a.log_path("cluster"), "w"), stderr=subprocess.STDOUT,
                            env={**env, "RAY_ADDRESS": rc.address}, cwd=REPO, start_new_session=True)
    return proc, rc.address, rc


def wait_ready(proc: Any, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server's launcher exited ({proc.returncode}) before /health answered")
        try:
            if http(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"/health did not answer 200 within {timeout:.0f}s")


def worker_placement(address: str) -> dict[str, Any]:
    """Ray's view while serving: alive nodes and the node of each alive WorkerHost actor."""
    import ray
    from ray._private import state

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        actors = [x for x in state.actors().values() if x.get("ActorClassName") == "WorkerHost" and x.get("State") == "ALIVE"]
        return {"ray_nodes_alive": len(nodes), "ray_gpus": ray.cluster_resources().get("GPU", 0.0),
                "worker_nodes": [x.get("Address", {}).get("NodeID", "?") for x in actors],
                "node_gpus": [n.get("Resources", {}).get("GPU", 0.0) for n in nodes]}
    finally:
        ray.shutdown()


def stop(proc: Any, timeout: float = 60) -> int | None:
    """SIGTERM to the launcher (the sbatch script drains distrt, then stops Ray), SIGKILL to its group after timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return None
    return proc.returncode


def nccl_on_sockets(log: str) -> bool | None:
    """Whether NCCL's INFO lines (NCCL_DEBUG=INFO; Ray forwards the workers' output to the driver,
    `distrt serve`, whose output is this log) show the socket transport; None: no NCCL line."""
    with open(log, errors="replace") as f:
        text = f.read()
    return ("NET/Socket" in text or "Using network Socket" in text) if "NCCL INFO" in text else None


def run(a: argparse.Namespace, mode: str, ckpt: str, work: str, env: dict[str, str], m: dict[str, Any]) -> None:
    port = free_port()
    t0 = time.monotonic()
    handle: Any = None
    if mode == "sbatch":
        proc, address, ray_tmp = start_sbatch(a, ckpt, port, work, env)
    else:
        proc, address, handle = start_cluster(a, ckpt, port, env)
        ray_tmp = None
    m["mode"], m["ray_address"] = mode, address
    if os.environ.get("RAY2N_PGID_FILE"):  # for the suite: the launcher's process group, to end if we are cut off
        with open(os.environ["RAY2N_PGID_FILE"], "w") as f:
            f.write(str(proc.pid))
    try:
        wait_ready(proc, port, a.ready_timeout)
        m["server_ready_s"] = time.monotonic() - t0
        placement = worker_placement(address)
        m.update(placement)
        m["workers_on_different_nodes"] = len(placement["worker_nodes"]) == 2 and len(set(placement["worker_nodes"])) == 2
        t1 = time.monotonic()
        status, body = http(f"http://127.0.0.1:{port}/v1/completions",
                            {"model": os.path.basename(ckpt), "prompt": PROMPT, "max_tokens": a.max_tokens,
                             "temperature": 0, "ignore_eos": True}, timeout=120)
        m["request_s"] = time.monotonic() - t1
        m["http_status"] = status
        text = body["choices"][0]["text"].strip() if status == 200 else ""
        m["text"] = text if status == 200 else str(body)[:500]
        m["greedy_matches_tp1"] = status == 200 and bool(text) and text == m["tp1_text"]
        pairs = list(zip(text.split(), m["tp1_text"].split()))
        m["matching_prefix_tokens"] = next((i for i, (x, y) in enumerate(pairs) if x != y), len(pairs))
    finally:
        m["launcher_exit"] = stop(proc)
        if handle is not None:
            handle.shutdown()
        m["nccl_socket_transport_seen"] = nccl_on_sockets(a.log_path(mode))
        if ray_tmp:
            deadline = time.monotonic() + 30
            while (left := processes_with(f"--temp-dir={ray_tmp}")) and time.monotonic() < deadline:
                time.sleep(0.5)
            m["ray_stopped"] = not left
            shutil.rmtree(ray_tmp, ignore_errors=True)
        m["total_s"] = time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="auto", choices=["auto", "sbatch", "cluster"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cluster-timeout", type=int, default=45, help="seconds for the two Ray nodes to register")
    ap.add_argument("--ready-timeout", type=int, default=120, help="seconds from launch to /health == 200")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "h200x2", "ray_two_node.json"))
    ap.add_argument("--log-dir", default=os.environ.get("OUT") or tempfile.gettempdir())
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's SIGTERM still stops the launcher
    a.log_path = lambda mode: os.path.join(a.log_dir, f"ray_two_node_{mode}.log")  # the launcher's output
    from distrt.bench.results import write_result
    from tiny_models import make_tiny_checkpoint

    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="ray2n-")
    token = secrets.token_hex(32)
    env = {**os.environ, "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_DEBUG": "INFO",
           "NCCL_DEBUG_SUBSYS": "INIT,NET", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.environ.update({k: env[k] for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    m: dict[str, Any] = {}
    errors = []
    try:
        if a.device == "cuda":
            from gpu_checks import make_llama3_shaped  # a well-conditioned Llama-3-shaped random checkpoint

            ckpt = make_llama3_shaped(work)
        else:
            ckpt = make_tiny_checkpoint(work, "llama-gqa")
        m["checkpoint_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        m["tp1_text"] = reference_text(a, ckpt, env)
        m["tp1_reference_s"] = time.monotonic() - t1
        print("tp=1:", m["tp1_text"], flush=True)
    except Exception as e:
        errors.append(f"setup: {type(e).__name__}: {e}"[:3000])
        print("!!", errors[-1], flush=True)
    modes = [] if errors else ["sbatch", "cluster"] if a.mode == "auto" else [a.mode]
    for mode in modes:
        try:
            run(a, mode, ckpt, work, env, m)
            break
        except Exception as e:  # the next mode, if any; the error stays in the result
            errors.append(f"{mode}: {type(e).__name__}: {e}"[:1500])
            print("!!", errors[-1], flush=True)
    m["errors"] = errors
    checks = ("workers_on_different_nodes", "greedy_matches_tp1")
    m["ok"] = all(m.get(k) is True for k in checks) and m.get("http_status") == 200 and m.get("ray_stopped", True) is True
    details = {k: m.pop(k) for k in [k for k, v in m.items() if not isinstance(v, (bool, int, float)) or v is None]}
    details.update(prompt=PROMPT, max_tokens=a.max_tokens, ray_version=_ray_version(),
                   served=f"distrt serve --tp 2 --executor ray --device {a.device} --dtype float32 on two Ray nodes "
                          "(one GPU each), NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1",
                   checkpoint="tests/gpu/gpu_checks.LLAMA3_SHAPED" if a.device == "cuda" else "tiny llama-gqa")
    print(json.dumps(write_result(a.out, m, details), indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if m["ok"] else 1


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    sys.exit(main())
