"""Schemathesis over /openapi.json: generated requests (valid and invalid) never get a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from server_helpers import ServerProcess, wait_idle

MAX_EXAMPLES = 30


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(server: ServerProcess, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "GET /v1/models", "GET /health", "GET /metrics"}
    statuses: dict[str, list[int]] = {}
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "llama-gqa"  # else nearly every valid body is a 404 for its random model
            response = case.call(headers=server.headers, timeout=60)
            statuses.setdefault(op.label, []).append(response.status_code)
            assert response.status_code < 500, (op.label, case.body, case.query, response.text[:500])
            if response.status_code >= 400 and case.path.startswith("/v1"):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to make invalid, e.g. GET /health
    print({label: (len(codes), sorted(set(codes))) for label, codes in statuses.items()})
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert len(statuses[label]) >= MAX_EXAMPLES // 2


def test_engine_healthy_after_fuzzing(server: ServerProcess) -> None:
    state = wait_idle(server, timeout=60.0)
    assert state["integrity"] == "ok"
