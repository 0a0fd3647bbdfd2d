"""The embedded SmolLM2-135M-Instruct (real tokenizer and chat template) served in-process: the HTTP
path reproduces the offline LLM API's greedy text, streamed and not."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from distrt import LLM, SamplingParams
from distrt.engine.async_engine import AsyncLLMEngine
from distrt.server.serve import build_server
from distrt.server.settings import ServerSettings

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[openai.OpenAI, dict[str, Any]]]:
    llm = LLM("default", device="cpu", max_model_len=256, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    ref = {"chat": llm.chat(CHAT, greedy, use_tqdm=False)[0], "text": llm.generate(PROMPT, greedy, use_tqdm=False)[0]}
    engine = AsyncLLMEngine.from_llm(llm)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(engine, ServerSettings(served_model_name="SmolLM2-135M-Instruct", port=port,
                                                 log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield client, ref
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
        sock.close()


def test_default_model_chat_and_completion(served: tuple[openai.OpenAI, dict[str, Any]]) -> None:
    client, ref = served
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=24,
                                          temperature=0.0)
    want = ref["chat"].outputs[0]
    assert chat.choices[0].message.content == want.text and want.text.strip()
    assert chat.usage.prompt_tokens == len(ref["chat"].prompt_token_ids)
    assert chat.usage.completion_tokens == len(want.token_ids)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=24, temperature=0.0, stream=True) if c.choices)
    assert streamed == want.text
    comp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0.0)
    assert comp.choices[0].text == ref["text"].outputs[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0.0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text
