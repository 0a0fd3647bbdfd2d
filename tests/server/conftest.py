"""Fixtures for the HTTP tests: a tiny checkpoint and the main server (a subprocess, shared by the session)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # server_helpers

from server_helpers import ServerProcess, tiny_server_args  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("srv")), "llama-gqa")


@pytest.fixture(scope="session")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("logs") / "main_server.log")
    srv = ServerProcess(tiny_model, *tiny_server_args("--max-request-bytes", "65536"), log_path=log)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def tokenizer(tiny_model: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60.0)
    yield c
    c.close()
