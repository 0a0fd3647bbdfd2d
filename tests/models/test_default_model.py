"""The embedded SmolLM2-135M-Instruct (GGUF): our greedy chat answers equal transformers' on the same file."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distrt import LLM, SamplingParams

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in two sentences.",
]
NEW = 24


@pytest.fixture(scope="module")
def llm(smollm2_gguf_path: str) -> LLM:
    return LLM("default", dtype="float32", device="cpu", max_model_len=512)


def test_greedy_chat_matches_transformers(llm: LLM, hf_gguf_model: Any, hf_gguf_tokenizer: Any) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW)
    outs = llm.chat([[{"role": "user", "content": c}] for c in CHATS], params, use_tqdm=False)
    eos = list(llm.config.model.eos_token_ids)
    assert eos, "the GGUF must declare an end-of-sequence token"
    for chat, out in zip(CHATS, outs):
        ref_prompt = hf_gguf_tokenizer.apply_chat_template([{"role": "user", "content": chat}],
                                                           add_generation_prompt=True, tokenize=True)
        ref_prompt = list(ref_prompt["input_ids"] if isinstance(ref_prompt, dict) or hasattr(ref_prompt, "keys") else ref_prompt)
        assert out.prompt_token_ids == ref_prompt
        with torch.no_grad():
            ref = hf_gguf_model.generate(torch.tensor([ref_prompt]), do_sample=False, max_new_tokens=NEW,
                                         eos_token_id=eos, pad_token_id=eos[0])[0, len(ref_prompt):].tolist()
        got = out.outputs[0].token_ids
        assert got == ref, f"{chat!r}: {got} != {ref}"
        assert out.outputs[0].text == hf_gguf_tokenizer.decode(ref, skip_special_tokens=True)
    llm.engine.check_integrity()


def test_default_answer_is_sensible(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
