"""Optional torch-profiler window over a worker's steps, for finding where a layout loses time.

    DISTRT_TORCH_PROFILE=/tmp/prof DISTRT_PROFILE_STEPS=20:5 distrt bench ...

profiles launches 20..24 of every worker (steps with work only; both CPU and CUDA activity) and
writes `<dir>/worker_tp<r>_pp<s>.txt`: the top ops by device time and by host time, and each
profiled step's host time in launch and the wall time since the previous launch started (the
gap shows a rank that waits for its commands). Off (no cost) unless the variable is set.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch


class StepProfiler:
    def __init__(self, out_dir: str, start: int, count: int, name: str) -> None:
        self.out_dir, self.start, self.count, self.name = out_dir, start, count, name
        self.n = 0
        self.prof: Any = None
        self.rows: list[tuple[int, float, float]] = []  # (launch index, host s in launch, s since last start)
        self._last_start: float | None = None

    @staticmethod
    def from_env(name: str) -> StepProfiler | None:
        out = os.environ.get("DISTRT_TORCH_PROFILE")
        if not out:
            return None
        spec = os.environ.get("DISTRT_PROFILE_STEPS", "20:5")
        try:
            start, count = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ValueError(f"DISTRT_PROFILE_STEPS must be <first>:<count>, got {spec!r}") from None
        return StepProfiler(out, start, count, name)

    def before(self) -> float:
        t = time.perf_counter()
        if self.n == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        return t

    def after(self, t0: float) -> None:
        t1 = time.perf_counter()
        if self.prof is not None:
            gap = t0 - self._last_start if self._last_start is not None else 0.0
            self.rows.append((self.n, t1 - t0, gap))
        self._last_start = t0
        self.n += 1
        if self.prof is not None and self.n >= self.start + self.count:
            self._write()

    def _write(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        ka = self.prof.key_averages()
        dev_key = "device_time_total" if hasattr(next(iter(ka), None), "device_time_total") else "cuda_time_total"
        with open(os.path.join(self.out_dir, f"{self.name}.txt"), "w") as f:
            f.write(f"# {self.name} launches {self.start}..{self.start + self.count - 1}\n")
            f.write("# launch  host_ms_in_launch  ms_since_previous_launch_start\n")
            for n, dt, gap in self.rows:
                f.write(f"{n} {dt * 1e3:.3f} {gap * 1e3:.3f}\n")
            f.write("\n# by device time\n" + ka.table(sort_by=dev_key, row_limit=30, max_name_column_width=70))
            f.write("\n# by host time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=30,
                                                  max_name_column_width=70))
        self.prof = None
        self.start = -1  # once
