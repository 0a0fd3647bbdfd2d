"""The embedded SmolLM2-135M-Instruct (real tokenizer and chat template) served in-process: the HTTP
path reproduces the offline LLM API's greedy text, streamed and not."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from distrt import LLM, SamplingParams
from distrt.engine.async_engine import AsyncLLMEngine
from distrt.engine.tokenizer import apply_chat_template
from distrt.server.serve import build_server
from distrt.server.settings import ServerSettings

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three primary colours are"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[openai.OpenAI, dict[str, Any]]]:
    llm = LLM("default", device="cpu", max_model_len=256, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    chat_ids = apply_chat_template(llm.tokenizer, CHAT)
    chat, text = llm.generate([{"prompt_token_ids": chat_ids}, PROMPT], greedy, use_tqdm=False)
    ref = {"chat": chat, "text": text}
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
    kw: dict[str, Any] = dict(model="SmolLM2-135M-Instruct", max_tokens=MAX_TOKENS, temperature=0.0)

    def chat(stream: bool) -> Any:
        out = client.chat.completions.create(messages=CHAT, stream=stream, **kw)
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream else out

    def complete(stream: bool) -> Any:
        out = client.completions.create(prompt=PROMPT, stream=stream, **kw)
        return "".join(c.choices[0].text for c in out if c.choices) if stream else out

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # one batch: CPU decode of this model is slow
        chat_full, chat_streamed, comp_full, comp_streamed = [
            f.result() for f in [pool.submit(chat, False), pool.submit(chat, True),
                                 pool.submit(complete, False), pool.submit(complete, True)]]
    want = ref["chat"].outputs[0]
    assert chat_full.choices[0].message.content == want.text and want.text.strip()
    assert chat_full.usage.prompt_tokens == len(ref["chat"].prompt_token_ids)
    assert chat_full.usage.completion_tokens == len(want.token_ids)
    assert chat_streamed == want.text
    assert comp_full.choices[0].text == ref["text"].outputs[0].text
    assert comp_streamed == comp_full.choices[0].text
