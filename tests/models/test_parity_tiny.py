"""Whole-model parity with Hugging Face transformers on tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from distrt import LLM, SamplingParams
from distrt.worker.request_state import RequestState
from distrt.messages import SamplingSpec
from tiny_models import ARCH_DEFAULTS, load_hf_model, make_tiny_checkpoint
from tiny_models import hf_greedy as greedy_reference

ARCHS = list(ARCH_DEFAULTS)
PROMPT_LENS = (5, 17, 33, 9)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("tiny"))
    return {name: make_tiny_checkpoint(root, name, seed=i) for i, name in enumerate(ARCHS)}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(ckpts: dict[str, str]) -> dict[str, list[list[int]]]:
    out = {}
    for name, path in ckpts.items():
        hf = load_hf_model(path)
        out[name] = [greedy_reference(hf, p, NEW_TOKENS) for p in _prompts(hf.config.vocab_size)]
    return out


def _llm(path: str, **kw: object) -> LLM:
    kw.setdefault("max_model_len", 256)
    return LLM(path, dtype="float32", device="cpu", **kw)  # type: ignore[arg-type]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("name", ARCHS)
def test_prefill_logits_match_transformers(ckpts: dict[str, str], name: str) -> None:
    llm = _llm(ckpts[name], num_kv_blocks=64)
    hf = load_hf_model(ckpts[name])
    runner = llm._executor.worker.runner  # type: ignore[attr-defined]
    for prompt in _prompts(hf.config.vocab_size):
        st = RequestState("p", prompt, len(prompt), list(range(-(-len(prompt) // 16))), 0, SamplingSpec(seed=0))  # type: ignore[arg-type]
        inputs = runner.prepare([st], [len(prompt)])
        inputs.sample_token_idx = torch.arange(len(prompt))
        ours = runner.forward_logits(inputs)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"{name}: relative logits error {rel:.2e}"


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_batch_matches_transformers(ckpts: dict[str, str], hf_greedy: dict, name: str) -> None:
    llm = _llm(ckpts[name])
    prompts = _prompts(llm.config.model.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for out, want in zip(outs, hf_greedy[name]):
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].finish_reason == "length"
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_chunked_prefill_matches_transformers(ckpts: dict[str, str], hf_greedy: dict, name: str) -> None:
    llm = _llm(ckpts[name], max_num_batched_tokens=8, block_size=4)
    prompts = _prompts(llm.config.model.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy[name]
    assert llm.engine.scheduler.stats.num_steps > NEW_TOKENS + 8  # prompts really went in chunks


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-odd"])
def test_preemption_matches_transformers(ckpts: dict[str, str], hf_greedy: dict, name: str) -> None:
    # the 4 requests end needing 10 + 13 + 17 + 11 = 51 blocks of 4; 30 blocks cannot hold them at once.
    llm = _llm(ckpts[name], block_size=4, num_kv_blocks=30, max_model_len=70)
    prompts = _prompts(llm.config.model.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy[name]
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == 30
