"""CPU: LLM.generate vs transformers generate on the embedded SmolLM2-135M (16 prompts x 64 tokens, fp32).

    python benchmarks/cpu_smollm2.py [--rounds 3] [--out benchmarks/results/cpu-smollm2.json]

Small shared machines move both rates by +-15% between minutes, so the two alternate for --rounds
rounds (distrt, then transformers, in each) and the metrics are the medians; every round is in details.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_result  # noqa: E402

TOPICS = ["the ocean", "volcanoes", "bread", "chess", "the moon", "bicycles", "coffee", "rain", "music", "trees",
          "trains", "honey", "glass", "maps", "clocks", "snow"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-smollm2.json"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from distrt import LLM, SamplingParams
    from distrt.models.default_model import default_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    msgs = [[{"role": "user", "content": f"Write a short paragraph about {t}."}] for t in TOPICS[: a.num_prompts]]
    llm = LLM("default", dtype="float32", device="cpu", max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    llm.chat(msgs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    outs = llm.chat(msgs, params, use_tqdm=False)  # the prompts' token ids, for transformers
    ours_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    path = default_model_path()
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = [o.prompt_token_ids for o in outs]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False)  # warm-up
    rounds = []
    for _ in range(max(1, a.rounds)):
        t0 = time.perf_counter()
        outs = llm.chat(msgs, params, use_tqdm=False)
        ours_s = time.perf_counter() - t0
        with torch.no_grad():
            t0 = time.perf_counter()
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id)
            hf_s = time.perf_counter() - t0
        hf_tokens = (gen.shape[1] - width) * gen.shape[0]
        rounds.append({"distrt_tok_s": ours_tokens / ours_s, "hf_tok_s": hf_tokens / hf_s,
                       "speedup_vs_hf": (ours_tokens / ours_s) / (hf_tokens / hf_s)})
    agree = sum(o.outputs[0].token_ids[:8] == gen[i, width:width + 8].tolist() for i, o in enumerate(outs))

    ours, theirs = (statistics.median(r[k] for r in rounds) for k in ("distrt_tok_s", "hf_tok_s"))
    metrics = {"tok_per_s": ours, "hf_tok_per_s": theirs, "speedup_vs_hf": ours / theirs}
    doc = write_result(a.out, metrics, {"num_prompts": len(msgs), "max_tokens": a.max_tokens, "dtype": "float32",
                                        "rounds": rounds, "metrics_are": "medians over rounds",
                                        "threads": torch.get_num_threads(),
                                        "first8_token_agreement": f"{agree}/{len(outs)}",
                                        "hf_mode": "generate, left-padded batch"})
    per_round = ", ".join(f"{r['speedup_vs_hf']:.2f}" for r in rounds)
    print(f"distrt {metrics['tok_per_s']:.1f} tok/s | transformers {metrics['hf_tok_per_s']:.1f} tok/s | "
          f"speedup {metrics['speedup_vs_hf']:.2f}x (medians of {len(rounds)} rounds; per round {per_round})"
          f"  -> {a.out}")
    print(doc["details"])


if __name__ == "__main__":
    main()
