"""MoE models against Hugging Face transformers on tiny random checkpoints (fp32, CPU): Mixtral,
Qwen2-MoE (shared expert, a dense layer) and Qwen3-MoE (q/k norm, sparse step 2)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from distrt import LLM, SamplingParams
from distrt.messages import SamplingSpec
from distrt.worker.request_state import RequestState
from moe_testutil import MOE_ARCHS
from tiny_models import load_hf_model

ARCHS = list(MOE_ARCHS)
PROMPT_LENS = (5, 17, 33, 9)
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _llm(path: str, **kw: object) -> LLM:
    kw.setdefault("max_model_len", 128)
    return LLM(path, dtype="float32", device="cpu", **kw)  # type: ignore[arg-type]


def _prefill_rel_errors(llm: LLM, hf: torch.nn.Module) -> list[float]:
    runner = llm._executor.worker.runner  # type: ignore[attr-defined]
    errs = []
    for prompt in _prompts(hf.config.vocab_size):
        st = RequestState("p", prompt, len(prompt), list(range(-(-len(prompt) // 16))), 0, SamplingSpec(seed=0))  # type: ignore[arg-type]
        inputs = runner.prepare([st], [len(prompt)])
        inputs.sample_token_idx = torch.arange(len(prompt))
        ours = runner.forward_logits(inputs)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        errs.append(((ours - ref).norm() / ref.norm()).item())
    return errs


def _hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding with transformers' own KV cache (EOS ignored, like ignore_eos)."""
    out: list[int] = []
    with torch.no_grad():
        step = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = hf(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_prefill_logits_match_transformers(moe_ckpts: dict[str, str], name: str) -> None:
    errs = _prefill_rel_errors(_llm(moe_ckpts[name], num_kv_blocks=64), load_hf_model(moe_ckpts[name]))
    assert max(errs) < 1e-4, f"{name}: relative logits errors {errs}"


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_batch_matches_transformers(moe_ckpts: dict[str, str], name: str) -> None:
    hf = load_hf_model(moe_ckpts[name])
    prompts = _prompts(hf.config.vocab_size)
    want = [_hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    kw = dict(max_num_batched_tokens=16, block_size=8) if name == "qwen2_moe" else {}  # chunked prefill too
    llm = _llm(moe_ckpts[name], **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


def test_stacked_expert_checkpoint_loads(moe_ckpts: dict[str, str], tmp_path: object) -> None:
    """transformers 5 keeps experts stacked in memory (experts.gate_up_proj [E, 2I, H]); a checkpoint
    saved straight from that state dict loads too."""
    from safetensors.torch import save_file

    src = moe_ckpts["mixtral"]
    hf = load_hf_model(src)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    dst = os.path.join(str(tmp_path), "stacked")
    os.makedirs(dst)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".json.index"):
            shutil.copy(os.path.join(src, f), dst)
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["architectures"] == ["MixtralForCausalLM"]
    errs = _prefill_rel_errors(_llm(dst, num_kv_blocks=64), hf)
    assert max(errs) < 1e-4, errs


def test_moe_model_reports_expert_load(moe_ckpts: dict[str, str]) -> None:
    llm = _llm(moe_ckpts["qwen3_moe"], num_kv_blocks=64)
    model = llm._executor.worker.runner.model  # type: ignore[attr-defined]
    model.take_expert_load()  # drop whatever engine start-up routed
    prompts = _prompts(llm.config.model.vocab_size)
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False)
    load = model.take_expert_load()
    assert list(load) == [1]  # decoder_sparse_step 2: only layer 1 is MoE
    top_k = MOE_ARCHS["qwen3_moe"]["num_experts_per_tok"]
    assert int(load[1].sum()) == sum(PROMPT_LENS) * top_k  # one prefill step, every (token, choice) pair
    assert int(model.take_expert_load()[1].sum()) == 0


def test_shard_reads_only_its_stage_and_experts(moe_ckpts: dict[str, str]) -> None:
    """Pipeline stage 1 of 2, EP rank 1 of 2 (tp 2): only layer 2's MoE and experts 3..5 are built/read."""
    from distrt.config import ModelConfig
    from distrt.models.loader import load_hf_config
    from distrt.models.model_loader import build_model
    from moe_testutil import MoeShardContext

    path = moe_ckpts["qwen2_moe"]  # 3 layers, 6 experts, layer 1 dense
    cfg = ModelConfig.from_hf_dict(load_hf_config(path), path=path, kind="hf", dtype="float32")
    ctx = MoeShardContext(dtype=torch.float32, device=torch.device("cpu"), tp_rank=1, tp_size=2, pp_rank=1,
                          pp_size=2, ep_size=2)
    model = build_model(cfg, ctx)
    assert list(model.layers) == ["2"] and list(model.moe_layers()) == [2]
    moe = model.moe_layers()[2]
    assert moe.local_experts() == (3, 4, 5) and moe.w13.shape == (3, 2 * 32, 64)
    wanted = model.checkpoint_names_wanted
    assert wanted("model.layers.2.mlp.experts.4.up_proj.weight")
    assert not wanted("model.layers.2.mlp.experts.1.up_proj.weight")
    assert not wanted("model.layers.0.mlp.experts.4.up_proj.weight")
    assert wanted("model.layers.2.mlp.shared_expert.down_proj.weight") and wanted("lm_head.weight")
