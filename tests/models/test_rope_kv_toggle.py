"""DISTRT_FUSED_ROPE_KV=0 (A/B runs) takes the separate rotary kernel and attention's KV write instead of
the fused rotary_write_kv kernel: the same greedy tokens as the default path, and as transformers."""

from __future__ import annotations

import pytest

from distrt import LLM, SamplingParams
from tiny_models import hf_greedy, load_hf_model, make_tiny_checkpoint


def test_unfused_rope_kv_gives_the_same_tokens(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = make_tiny_checkpoint(str(tmp_path), "llama-gqa", seed=5)
    prompts = [[3 + (11 * i + j) % 180 for j in range(n)] for i, n in enumerate((4, 33, 19))]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for value in ("1", "0"):
        monkeypatch.setenv("DISTRT_FUSED_ROPE_KV", value)
        llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=128)
        layer = next(iter(llm._executor.worker.runner.model.layers.values()))  # type: ignore[attr-defined]
        assert layer.self_attn.fused_rope_kv == (value == "1")
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)])
    assert outs[0] == outs[1]
    assert outs[1][1] == hf_greedy(load_hf_model(ckpt), prompts[1], 12)
