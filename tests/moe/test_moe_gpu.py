"""GPU: the MoE models end to end on CUDA (Triton fused MoE, CUDA-graph decode) against transformers."""

from __future__ import annotations

import pytest
import torch

from moe_testutil import MOE_ARCHS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT_LENS = (5, 17, 33, 9)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("name", list(MOE_ARCHS))
def test_fp32_greedy_matches_transformers_with_graphs(moe_ckpts: dict[str, str], name: str) -> None:
    """fp32 on the GPU path (Triton kernels with ieee dots, decode CUDA graphs): the same tokens as
    transformers fp32 on the same GPU."""
    from distrt import LLM, SamplingParams
    from tiny_models import load_hf_model

    hf = load_hf_model(moe_ckpts[name]).cuda()
    ps = _prompts(hf.config.vocab_size)
    want = []
    with torch.no_grad():
        for p in ps:
            ids = list(p)
            for _ in range(24):
                ids.append(int(hf(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
            want.append(ids[len(p):])
    with LLM(moe_ckpts[name], dtype="float32", device="cuda", max_model_len=128, max_num_seqs=8,
             kv_cache_memory=0.1) as llm:
        assert llm._executor.worker.runner.graphs is not None  # type: ignore[attr-defined]
        outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_fused_moe_layer_in_a_cuda_graph() -> None:
    """The layer (routing, align, two grouped GEMMs, combine, load counting) replays in a graph."""
    from moe_checks import full_weights, make_layer, reference_output

    w = full_weights()
    layer = make_layer(w).cuda()
    x = w["x"].cuda()
    layer(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(x)
    layer.take_expert_load()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu(), reference_output(), rtol=1e-4, atol=1e-4)
    assert int(layer.take_expert_load().sum()) == x.shape[0] * layer.top_k
