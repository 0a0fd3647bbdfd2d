"""The Python API: prompt forms, outputs, n > 1, stops, logprobs, seeds, and bad input."""

from __future__ import annotations

import pytest

from distrt import LLM, SamplingParams
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("api")), "llama-gqa")
    return LLM(path, dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=4)


def _ok(llm: LLM) -> None:
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_prompt_forms(llm: LLM) -> None:
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    a = llm.generate("w5 w6 w7", sp, use_tqdm=False)
    b = llm.generate(["w5 w6 w7", "w9"], sp, use_tqdm=False)
    ids = a[0].prompt_token_ids
    c = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
    d = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
    assert len(a) == 1 and len(b) == 2
    assert a[0].prompt == "w5 w6 w7"
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids == c[0].outputs[0].token_ids == d[0].outputs[0].token_ids
    assert len(a[0].outputs[0].token_ids) == 4 and a[0].outputs[0].finish_reason == "length"
    assert a[0].outputs[0].text == llm.tokenizer.decode(a[0].outputs[0].token_ids, skip_special_tokens=True)
    _ok(llm)


def test_chat_applies_template(llm: LLM) -> None:
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "w10 w11"}], sp, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("w10 w11 ", add_special_tokens=False)
    _ok(llm)


def test_n_samples_and_seeds(llm: LLM) -> None:
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=42, ignore_eos=True)
    out1 = llm.generate("w5 w6", sp, use_tqdm=False)[0]
    assert [o.index for o in out1.outputs] == [0, 1, 2]
    texts = [tuple(o.token_ids) for o in out1.outputs]
    assert len(set(texts)) > 1  # distinct samples
    # same seed, now in a mixed batch with other requests: same tokens
    mixed = llm.generate(["w9 w9 w9", "w5 w6", "w3"],
                         [SamplingParams(temperature=0.7, max_tokens=5, seed=1), sp,
                          SamplingParams(temperature=0.0, max_tokens=6)], use_tqdm=False)
    assert [tuple(o.token_ids) for o in mixed[1].outputs] == texts
    other = llm.generate("w5 w6", SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=43, ignore_eos=True),
                         use_tqdm=False)[0]
    assert [tuple(o.token_ids) for o in other.outputs] != texts
    _ok(llm)


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    base = llm.generate("w5 w6", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    toks = base.outputs[0].token_ids
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = llm.generate("w5 w6", SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == toks[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    _ok(llm)


def test_stop_strings(llm: LLM) -> None:
    base = llm.generate("w5 w6", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    words = text.split()
    stop = words[2]
    cut = text.find(stop)
    out = llm.generate("w5 w6", SamplingParams(temperature=0.0, max_tokens=10, stop=[stop], ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].text == text[:cut]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    inc = llm.generate("w5 w6", SamplingParams(temperature=0.0, max_tokens=10, stop=stop, ignore_eos=True,
                                              include_stop_str_in_output=True), use_tqdm=False)[0]
    assert inc.outputs[0].text == text[: cut + len(stop)]
    _ok(llm)


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("w5 w6", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) == 3  # greedy token is the top-1
        best = max(lp.values(), key=lambda x: x.logprob)
        assert best is lp[tok] and best.rank == 1
    assert out.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)))


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
    ({"min_p": 2.0}, "min_p"), ({"logprobs": -1}, "logprobs"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_invalid_sampling_params(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize("prompt, match", [
    ("", "empty"), ({"prompt_token_ids": []}, "empty"), ({"prompt_token_ids": [5, 10**6]}, "vocabulary"),
    ({"prompt_token_ids": [-1]}, "vocabulary"), ({"prompt_token_ids": [5] * 128}, "max_model_len"),
])
def test_bad_prompts_leave_engine_usable(llm: LLM, prompt: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(["w5", prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # type: ignore[list-item]
    _ok(llm)  # nothing queued, nothing leaked
    assert llm.generate("w5", SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0].outputs[0].token_ids
    _ok(llm)


def test_engine_config_errors(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path) + "/nope", device="cpu")
    path = make_tiny_checkpoint(str(tmp_path), "llama-gqa")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, device="cpu", max_model_len=10**6)
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, device="cpu", dtype="int3")
    with pytest.raises(ValueError, match="KV cache holds"):
        LLM(path, device="cpu", max_model_len=256, num_kv_blocks=2)


def test_unsupported_architecture_and_corrupt_weights(tmp_path: pytest.TempPathFactory) -> None:
    import json
    import os

    path = make_tiny_checkpoint(str(tmp_path), "llama-gqa")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="FrobnicatorForCausalLM"):
        LLM(path, device="cpu")
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(path, device="cpu", max_model_len=64)
    gguf = os.path.join(str(tmp_path), "broken.gguf")
    open(gguf, "wb").write(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(gguf, device="cpu")
