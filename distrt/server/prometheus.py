"""A small Prometheus text-format (0.0.4) exposition: counters, gauges, histograms, constant labels."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help

    def samples(self, labels: str) -> list[str]:
        raise NotImplementedError

    def render(self, labels: str) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples(labels))


class Counter(_Metric):
    """A monotonic count, kept here (inc) or read from a source of truth (fn)."""

    kind = "counter"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help)
        self._value = 0.0
        self._fn = fn

    def inc(self, amount: float = 1.0) -> None:
        self._value += amount

    @property
    def value(self) -> float:
        return self._fn() if self._fn is not None else self._value

    def samples(self, labels: str) -> list[str]:
        return [f"{self.name}{labels} {_num(self.value)}"]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help)
        self._fn = fn

    def samples(self, labels: str) -> list[str]:
        return [f"{self.name}{labels} {_num(self._fn())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help)
        self.buckets = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self._counts[bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def samples(self, labels: str) -> list[str]:
        inner = labels[1:-1] + "," if labels else ""
        out, acc = [], 0
        for le, c in zip([*self.buckets, math.inf], self._counts):
            acc += c
            out.append(f'{self.name}_bucket{{{inner}le="{_num(le)}"}} {acc}')
        out.append(f"{self.name}_sum{labels} {_num(self.sum)}")
        out.append(f"{self.name}_count{labels} {self.count}")
        return out


M = TypeVar("M", bound=_Metric)


class Registry:
    def __init__(self, const_labels: dict[str, str] | None = None) -> None:
        self.metrics: list[_Metric] = []
        pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in (const_labels or {}).items())
        self._labels = f"{{{pairs}}}" if pairs else ""

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "".join(m.render(self._labels) for m in self.metrics)
