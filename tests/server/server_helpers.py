"""Helpers for the HTTP tests: `python -m distrt.server serve` subprocesses on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

API_KEY = "test-key"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One `serve` subprocess in its own session (so the test can check nothing of it is left)."""

    def __init__(self, model: str, *extra: str, api_key: str | None = API_KEY, log_path: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "distrt.server", "serve", "--model", model, "--device", "cpu",
               "--dtype", "float32", "--port", str(self.port), "--log-level", "warning", *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=REPO)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s: {self.log()}")

    def log(self) -> str:
        if not self.log_path:
            return "(no log)"
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def tiny_server_args(*extra: str) -> list[str]:
    return ["--max-model-len", "128", "--block-size", "8", "--num-kv-blocks", "384", "--max-num-seqs", "256",
            "--enable-debug-routes", *extra]


def wait_idle(srv: ServerProcess, timeout: float = 30.0) -> dict[str, object]:
    """Waits until the engine holds no request, then returns /debug/state (which checks KV integrity)."""
    deadline = time.monotonic() + timeout
    state: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = httpx.get(srv.url + "/debug/state", headers=srv.headers, timeout=10.0)
        assert r.status_code == 200, r.text
        state = r.json()
        if state["num_unfinished_requests"] == 0 and state["num_free_blocks"] == state["num_blocks"]:
            return state
        time.sleep(0.1)
    raise AssertionError(f"engine not idle after {timeout}s: {state}")
