"""Bad input gets OpenAI-style error JSON with the right status, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from server_helpers import ServerProcess, wait_idle


def _post(server: ServerProcess, path: str, body: Any, headers: dict[str, str] | None = None,
          raw: bytes | None = None) -> httpx.Response:
    h = dict(server.headers if headers is None else headers)
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers={**h, "content-type": "application/json"},
                          timeout=30.0)
    return httpx.post(server.url + path, json=body, headers=h, timeout=30.0)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_context_length_exceeded(server: ServerProcess, client: openai.OpenAI) -> None:
    err = _error(_post(server, "/v1/completions", {"prompt": "w5 w6 w7", "max_tokens": 126}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    long_prompt = " ".join(["w7"] * 130)
    err = _error(_post(server, "/v1/completions", {"prompt": long_prompt}), 400)
    assert err["code"] == "context_length_exceeded"
    chat = {"messages": [{"role": "user", "content": "w5 w6"}], "max_completion_tokens": 500}
    err = _error(_post(server, "/v1/chat/completions", chat), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="llama-gqa", prompt="w5 w6 w7", max_tokens=126)
    assert info.value.code == "context_length_exceeded"
    assert _post(server, "/v1/completions", {"prompt": "w5 w6 w7", "max_tokens": 125}).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "w5", "top_p": 5}, "top_p"),
    ("/v1/completions", {"prompt": "w5", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "w5", "presence_penalty": 9}, "presence_penalty"),
    ("/v1/completions", {"prompt": "w5", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "w5", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "seed": -3}, "seed"),
    ("/v1/completions", {"prompt": "w5", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "w5", "stop_token_ids": [10**12]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [5, 10**9]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "many"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "logprobs": True,
                              "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "min_p": 2}, "min_p"),
])
def test_invalid_parameter_names_the_field(server: ServerProcess, path: str, body: dict[str, Any],
                                           param: str) -> None:
    err = _error(_post(server, path, body), 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_invalid_json_and_openai_client_error(server: ServerProcess, client: openai.OpenAI) -> None:
    err = _error(_post(server, "/v1/completions", None, raw=b'{"prompt": "w5", '), 400)
    assert err["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="llama-gqa", prompt="w5", top_p=7.0)
    assert info.value.param == "top_p"


def test_unknown_model_and_route(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="w5")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "w5"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    _error(httpx.get(server.url + "/v1/nothing-here", headers=server.headers), 404)
    _error(httpx.get(server.url + "/v1/completions", headers=server.headers), 405)


def test_body_too_large(server: ServerProcess) -> None:
    big = {"prompt": "w5 " * 40_000}  # 120 kB > the 64 kB limit of this server
    err = _error(_post(server, "/v1/completions", big), 413)
    assert err["code"] == "request_too_large"

    def chunked() -> Any:  # no content-length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"w5 " * 300
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunked(),
                   headers={**server.headers, "content-type": "application/json"}, timeout=30.0)
    _error(r, 413)


def test_api_key(server: ServerProcess) -> None:
    body = {"prompt": "w5", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"},
                    {"Authorization": "Basic test-key"}):
        assert _error(_post(server, "/v1/completions", body, headers=headers), 401)["code"] == "invalid_api_key"
        _error(httpx.get(server.url + "/v1/models", headers=headers), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert _post(server, "/v1/completions", body).status_code == 200


def test_no_leak_after_errors(server: ServerProcess) -> None:
    wait_idle(server)
