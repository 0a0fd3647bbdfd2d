"""TensorRT-LLM's published offline throughput for the shapes distrt benchmarks on several GPUs
(benchmarks/gpu_multi.py bench --trtllm attaches the entry of its shape to the result and computes
distrt's per-GPU ratio against each config). Figures are copied from the sources named in each
entry, with their input/output lengths, GPU model and count, and precision; nothing here is derived.
"""

from __future__ import annotations

from typing import Any

# TensorRT-LLM's published offline throughput (trtllm-bench, requests at an infinite rate; "Total Output
# Throughput (tokens/sec)"), as stored in NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md at
# commit 00f37686aa854010d68bcbd0f4ab000221541ca6. FP8 weights (ModelOpt checkpoints): half the weight
# bytes of the bf16 distrt runs, so per-GPU ratios flatter TensorRT-LLM. No BF16/FP16 70B figure for
# H100/H200 was found in the documents retrieved (this perf-overview lists FP8 and FP4 models only).
_PERF_OVERVIEW = ("https://github.com/NVIDIA/TensorRT-LLM/blob/00f37686aa854010d68bcbd0f4ab000221541ca6/"
                  "docs/source/performance/perf-overview.md")
TRTLLM_REFERENCE: dict[str, dict[str, Any]] = {
    "llama-3.1-70b": {
        "source": _PERF_OVERVIEW,
        "published_page": "https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html",
        "model": "Llama 3.3 70B (nvidia/Llama-3.3-70B-Instruct-FP8; the Llama-3.1-70B architecture)",
        "metric": "Total Output Throughput (tokens/sec), all requests queued at once; "
                  "TensorRT-LLM's request counts: 30000 (128/128), 3000 (1000/1000, 2048/128)",
        "precision": "FP8 weights",
        "configs": {  # config -> GPUs, "<in>x<out>" -> output tokens/s
            "h200_tp1_fp8": {"gpus": 1, "128x128": 3803, "128x2048": 4336, "128x4096": 2872, "500x2000": 3666,
                             "1000x1000": 2909, "1000x2000": 2994, "2048x128": 442, "2048x2048": 2003},
            "h100_tp2_fp8": {"gpus": 2, "128x128": 6378, "128x2048": 6651, "128x4096": 4199, "500x2000": 5222,
                             "1000x1000": 4205, "1000x2000": 4146, "2048x128": 762, "2048x2048": 3082},
        },
        "older": {  # static batching (pre-v0.10 methodology), Llama-2 70B (vocab 32000)
            "source": "https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/release/0.5.0/docs/source/performance.md",
            "model": "LLaMA 70B (Llama 2)", "config": "H100, FP8, TP4, batch 64",
            "128x128": 3317, "128x2048": 2616, "2048x128": 843, "2048x2048": 1583,
        },
        "caveats": "FP8 vs distrt bf16 (weight bytes halved), 1-2 GPUs vs 4-8, 3000-30000 requests vs a few "
                   "hundred here; compare per GPU and read the ratio as an upper bound of the gap in kind.",
    },
    "llama-3.1-8b": {
        "source": _PERF_OVERVIEW,
        "model": "Llama 3.1 8B (nvidia/Llama-3.1-8B-Instruct-FP8)",
        "metric": "Total Output Throughput (tokens/sec)",
        "precision": "FP8 weights",
        "configs": {
            "h200_tp1_fp8": {"gpus": 1, "128x128": 27911, "128x2048": 26221, "1000x1000": 17744, "2048x128": 3538},
            "h100_tp1_fp8": {"gpus": 1, "128x128": 28312, "128x2048": 22714, "1000x1000": 15220, "2048x128": 3450},
        },
    },
}
