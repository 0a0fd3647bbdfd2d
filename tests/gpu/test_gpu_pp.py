"""2 GPUs: pp=2 (NCCL send/recv between stages, two micro-batches in flight) matches transformers
teacher-forced (fp32: the 99% bar measures the pipeline path, not bf16 rounding)."""

from __future__ import annotations

import pytest
import torch

from distrt import LLM, SamplingParams
from gpu_checks import make_llama3_shaped, prompts, teacher_forced

pytestmark = pytest.mark.gpu


def test_pp2_mpi_matches_transformers(tmp_path: object) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    from transformers import AutoModelForCausalLM

    ckpt = make_llama3_shaped(str(tmp_path))
    ps = prompts(32000)
    sp = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    with LLM(ckpt, dtype="float32", device="cuda", max_model_len=1024, pipeline_parallel_size=2,
             executor="mpi", kv_cache_memory=0.3) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        assert llm.engine.max_in_flight_seen == 2
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to("cuda:0").eval()
    m = teacher_forced(hf, ps, [o.outputs[0].token_ids for o in outs])
    print("pp=2:", m)
    assert m["top1_agreement"] >= 0.99, m
