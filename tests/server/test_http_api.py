"""The OpenAI API through the official client: text, streaming, usage, logprobs, stop, seed, n."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from server_helpers import ServerProcess, wait_idle

PROMPT = "w5 w6 w7"
MSGS: list[Any] = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w10 w11 w12"}]


def _stream_completion(client: openai.OpenAI, model: str, **kw: Any) -> tuple[dict[int, str], dict[int, list[str]], Any]:
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    usage = None
    for chunk in client.completions.create(model=model, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    return texts, finishes, usage


def test_models_version_health(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["llama-gqa"]
    assert client.models.retrieve("llama-gqa").id == "llama-gqa"
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_completion_stream_equals_non_stream(client: openai.OpenAI, tokenizer: Any) -> None:
    kw = dict(prompt=PROMPT, max_tokens=12, temperature=0.0)
    full = client.completions.create(model="llama-gqa", **kw)
    texts, finishes, usage = _stream_completion(client, "llama-gqa", **kw)
    assert texts[0] == full.choices[0].text and full.choices[0].text
    assert finishes == {0: [full.choices[0].finish_reason]}  # exactly one chunk carries it
    prompt_ids = tokenizer.encode(PROMPT)
    for u in (full.usage, usage):
        assert u.prompt_tokens == len(prompt_ids)
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert full.usage.completion_tokens == usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 12


def test_completion_usage_counts_generated_tokens(client: openai.OpenAI, tokenizer: Any) -> None:
    out = client.completions.create(model="llama-gqa", prompt=PROMPT, max_tokens=9, temperature=0.0, logprobs=0,
                                    extra_body={"ignore_eos": True, "skip_special_tokens": False})
    c = out.choices[0]
    assert out.usage.completion_tokens == 9 == len(c.logprobs.tokens)
    assert c.finish_reason == "length"
    assert c.text == tokenizer.decode(tokenizer.convert_tokens_to_ids(c.logprobs.tokens))


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model="llama-gqa", prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[tok] == val
        assert val == max(top.values())  # greedy picks the most likely token
    streamed = list(client.completions.create(model="llama-gqa", prompt=PROMPT, max_tokens=6, temperature=0.0,
                                              logprobs=3, stream=True, extra_body={"ignore_eos": True}))
    assert [t for ch in streamed for c in ch.choices if c.logprobs for t in c.logprobs.tokens] == lp.tokens


def test_chat_stream_equals_non_stream_and_logprobs(client: openai.OpenAI, tokenizer: Any) -> None:
    kw: dict[str, Any] = dict(model="llama-gqa", messages=MSGS, max_completion_tokens=10, temperature=0.0,
                              logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob for e in content)
    expected_ids = tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert full.usage.prompt_tokens == len(tokenizer.encode(expected_ids, add_special_tokens=False))
    text, finishes, roles, usage = "", [], [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            roles += [c.delta.role] if c.delta.role else []
            finishes += [c.finish_reason] if c.finish_reason else []
    assert text == msg.content
    assert roles == ["assistant"] and finishes == [full.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_strings(client: openai.OpenAI) -> None:
    base = client.completions.create(model="llama-gqa", prompt=PROMPT, max_tokens=12, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    stop = words[3]  # cut before the first occurrence of the 4th word
    cut = base[: base.index(" " + stop)]
    kw: dict[str, Any] = dict(prompt=PROMPT, max_tokens=12, temperature=0.0, stop=[" " + stop, "w999"],
                              extra_body={"ignore_eos": True})
    out = client.completions.create(model="llama-gqa", **kw).choices[0]
    assert out.text == cut and out.finish_reason == "stop"
    texts, finishes, _ = _stream_completion(client, "llama-gqa", **kw)
    assert texts[0] == cut and finishes == {0: ["stop"]}


def test_seed_n_and_sampling_knobs(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="llama-gqa", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                              n=3, presence_penalty=0.5, frequency_penalty=0.3,
                              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 24
    texts, finishes, usage = _stream_completion(client, **kw)
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]
    assert finishes == {i: ["length"] for i in range(3)} and usage.completion_tokens == 24


def test_multiple_prompts(client: openai.OpenAI, tokenizer: Any) -> None:
    prompts = ["w5 w6", "w9 w9 w9"]
    out = client.completions.create(model="llama-gqa", prompt=prompts, max_tokens=4, temperature=0.0, n=2,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    single = [client.completions.create(model="llama-gqa", prompt=p, max_tokens=4, temperature=0.0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    by_index = {c.index: c.text for c in out.choices}
    assert [by_index[0], by_index[2]] == single
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    ids = tokenizer.encode("w5 w6")
    assert client.completions.create(model="llama-gqa", prompt=ids, max_tokens=4, temperature=0.0,
                                      extra_body={"ignore_eos": True}).choices[0].text == single[0]


def test_metrics_exposition(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model="llama-gqa", prompt=PROMPT, max_tokens=3, temperature=0.0)
    wait_idle(server)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    lab = '{model_name="llama-gqa"}'
    assert values[f"distrt_num_requests_running{lab}"] == 0
    assert values[f"distrt_num_requests_waiting{lab}"] == 0
    assert values[f"distrt_kv_cache_usage_ratio{lab}"] == 0
    assert values[f"distrt_generation_tokens_total{lab}"] >= 3
    assert values[f"distrt_prompt_tokens_total{lab}"] >= 4
    assert f"distrt_num_preemptions_total{lab}" in values
    for h in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        count = values[f"distrt_{h}_seconds_count{lab}"]
        assert count >= 1 and values[f'distrt_{h}_seconds_bucket{{model_name="llama-gqa",le="+Inf"}}'] == count
