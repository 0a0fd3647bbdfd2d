"""Fixtures of the launcher tests: a tiny checkpoint, the local tp=1 reference text, and a timing
line per test in the terminal summary. Helpers are in launch_helpers.py."""

from __future__ import annotations

import pytest

from launch_helpers import PROMPT_ARGS, local_generate

_timings: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Setup + call + teardown of each test here, module fixtures (Slurm, Ray head) included."""
    if "tests/launch/" in report.nodeid.replace("\\", "/") or report.nodeid.startswith("test_launch"):
        _timings[report.nodeid] = _timings.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: object) -> None:
    if _timings:
        tr = terminalreporter
        tr.write_sep("-", f"tests/launch timings: {sum(_timings.values()):.1f}s in all")  # type: ignore[attr-defined]
        for nodeid, dt in _timings.items():
            tr.write_line(f"{dt:7.1f}s  {nodeid}")  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("launch-ckpt")), "llama-gqa")


@pytest.fixture(scope="session")
def local_text(tiny_ckpt: str) -> str:
    """What `distrt generate` prints for PROMPT_ARGS on one process (tp=1, local executor)."""
    text = local_generate(["--model", tiny_ckpt, *PROMPT_ARGS])
    assert len(text.split()) == 12, text  # word-level tokenizer: one word per token
    return text
