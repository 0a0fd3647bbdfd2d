"""`gpu_multi.py parity` (issue 10): greedy generation on random fp32 checkpoints under each wide layout
(MPI executor), scored teacher-forced against transformers fp32 and against a one-device engine; every
layout must reach BAR on both. See gpu_multi.py for the command line and the suite that runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from typing import Any

import torch

from distrt.bench.results import write_result
from gpu_multi import HERE, Layout, _results_slug, note_process_group, parse_layouts, release

BAR = 0.99  # teacher-forced top-1 agreement every layout must reach (issue 10)


@torch.inference_mode()
def distrt_teacher_forced(llm: Any, prompt_ids: list[list[int]], generated: list[list[int]]) -> dict[str, float]:
    """A one-device engine's top-1 at every generated position given these tokens as context: one
    prefill of prompt + generated per sequence through its model runner (the engine is idle: nothing
    else uses the KV blocks this writes)."""
    from distrt.messages import SamplingSpec
    from distrt.worker.request_state import RequestState

    runner = llm._executor.worker.runner
    bs = llm.config.cache.block_size
    agree = total = 0
    for i, (p, gen) in enumerate(zip(prompt_ids, generated)):
        ids = list(p) + list(gen)
        n = len(ids)
        blocks = -(-n // bs)
        if blocks > runner.num_blocks:
            raise RuntimeError(f"sequence of {n} tokens needs {blocks} KV blocks, the pool has {runner.num_blocks}")
        st = RequestState(f"tf{i}", ids, n, list(range(blocks)), 0, SamplingSpec(seed=0))  # type: ignore[arg-type]
        inputs = runner.prepare([st], [n])
        inputs.sample_token_idx = torch.arange(len(p) - 1, n - 1, device=runner.device)
        top = runner.forward_logits(inputs).argmax(-1).tolist()
        agree += sum(int(a == b) for a, b in zip(top, gen))
        total += len(gen)
    return {"top1_agreement": agree / total, "positions": float(total)}


def _checkpoints(root: str, cpu: bool) -> dict[str, tuple[str, int]]:
    """name -> (checkpoint dir, vocab). GPU: Llama-3-shaped (hidden 2048, 4 layers, GQA 16:4, vocab
    32000) and a Mixtral-shaped MoE (hidden 512, 4 layers, 8 experts top-2, GQA 16:8, vocab 32000);
    CPU: the tiny ones of tests/distributed/test_wide_layouts.py (8 heads, so tp=8 divides them)."""
    from moe_testutil import make_moe_checkpoint
    from tiny_models import make_tiny_checkpoint

    if cpu:
        dense = make_tiny_checkpoint(root, "llama-gqa", num_attention_heads=8, num_key_value_heads=2,
                                     hidden_size=64, num_hidden_layers=4)
        moe = make_moe_checkpoint(root, "mixtral", num_attention_heads=8, num_key_value_heads=4)
        return {"dense": (dense, 211), "moe": (moe, 211)}
    from gpu_checks import make_llama3_shaped

    dense = make_llama3_shaped(root)
    moe = make_moe_checkpoint(root, "mixtral", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                              max_position_embeddings=2048, std=0.05)
    return {"dense": (dense, 32000), "moe": (moe, 32000)}


def _generate(llm: Any, ps: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    from distrt import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
    gen = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return gen, lps


def parity_group(name: str, path: str, vocab: int, layouts: list[Layout], a: argparse.Namespace,
                 metrics: dict[str, Any], details: dict[str, Any], save: Any) -> bool:
    """One checkpoint: transformers fp32 and a one-device engine as teachers, then each layout."""
    from transformers import AutoModelForCausalLM

    from distrt import LLM
    from gpu_checks import prompts, teacher_forced

    cpu = a.device == "cpu"
    dev = "cpu" if cpu else "cuda:0"
    ps = prompts(vocab, n=4 if cpu else 8)
    max_tokens = a.max_tokens or (12 if cpu else 48)
    kw: dict[str, Any] = dict(dtype="float32", device=a.device, max_model_len=256 if cpu else 1024, max_num_seqs=16)
    if cpu:
        kw["num_kv_blocks"] = 128
    else:
        kw["kv_cache_memory"] = 0.2
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    ok = True
    t0 = time.perf_counter()
    with LLM(path, **kw) as ref:
        ref_gen, ref_lps = _generate(ref, ps, max_tokens)
        one = teacher_forced(hf, ps, ref_gen, ref_lps)
        metrics[f"{name}_one_device_top1_vs_transformers"] = one["top1_agreement"]
        details[f"{name}_one_device"] = {**one, "seconds": time.perf_counter() - t0}
        print(f"{name} one device vs transformers: {one}", flush=True)
        save()
        for lay in layouts:
            key = f"{name}_{lay.name}"
            t1 = time.perf_counter()
            try:
                llm = LLM(path, **lay.llm_kwargs(), **kw)
                note_process_group(llm)
                try:
                    gen, lps = _generate(llm, ps, max_tokens)
                    in_flight = llm.engine.max_in_flight_seen
                finally:
                    release(llm)
                vs_hf = teacher_forced(hf, ps, gen, lps)
                vs_one = distrt_teacher_forced(ref, ps, gen)
                same = sum(int(g == r) for g, r in zip(gen, ref_gen)) / len(gen)
                passed = vs_hf["top1_agreement"] >= BAR and vs_one["top1_agreement"] >= BAR
                metrics[f"{key}_top1_vs_transformers"] = vs_hf["top1_agreement"]
                metrics[f"{key}_top1_vs_one_device"] = vs_one["top1_agreement"]
                metrics[f"{key}_identical_sequences_vs_one_device"] = same
                metrics[f"{key}_logprob_err_max_vs_transformers"] = vs_hf.get("logprob_err_max", float("nan"))
                metrics[f"{key}_pass"] = passed
                details[key] = {"vs_transformers": vs_hf, "vs_one_device": vs_one, "max_in_flight_seen": in_flight,
                                "seconds": time.perf_counter() - t1, "layout": lay.llm_kwargs()}
                print(f"{key}: vs transformers {vs_hf['top1_agreement']:.4f}, vs one device "
                      f"{vs_one['top1_agreement']:.4f}, identical sequences {same:.2f} -> "
                      f"{'PASS' if passed else 'FAIL'} ({time.perf_counter() - t1:.0f}s)", flush=True)
            except Exception as e:  # record it, go on with the next layout
                passed = False
                metrics[f"{key}_pass"] = False
                details[key] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
                print(f"{key}: ERROR {type(e).__name__}: {e}", flush=True)
            ok = ok and passed
            save()
    del hf
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    return ok


def cmd_parity(a: argparse.Namespace) -> int:
    cpu = a.device == "cpu"
    out = a.out or (os.path.join(tempfile.gettempdir(), "gpu_multi_parity_cpu.json") if cpu
                    else os.path.join(HERE, "results", _results_slug(), "parity.json"))
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {"bar": BAR, "dtype": "float32", "device": a.device,
                               "teachers": "transformers fp32 on one device; distrt on one device (prefill logits)"}

    def save() -> None:
        write_result(out, metrics, details)

    groups = [("dense", parse_layouts(a.layouts)), ("moe", parse_layouts(a.moe_layouts))]
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu_multi_parity_") as root:
        t = time.perf_counter()
        ckpts = _checkpoints(root, cpu)
        details["checkpoint_seconds"] = time.perf_counter() - t
        details["checkpoints"] = {k: json.load(open(os.path.join(p, "config.json"))) for k, (p, _) in ckpts.items()}
        for name, layouts in groups:
            if layouts:
                path, vocab = ckpts[name]
                ok = parity_group(name, path, vocab, layouts, a, metrics, details, save) and ok
    metrics["all_pass"] = ok
    save()
    print(f"parity: {'all layouts >= ' + str(BAR) if ok else 'FAILED'}; wrote {out}", flush=True)
    return 0 if ok else 1
