#!/usr/bin/env bash
# The GPU benchmark suite in one device call (< 10 minutes on one H100/H200), results under
# benchmarks/results/<device>/.  Usage (on the GPU machine, from the repo root):
#   DISTRT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_suite.sh [quick]
# Each step has its own time limit so one slow step cannot sink the rest.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
slug=$(python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))")
out=benchmarks/results/$slug
mkdir -p "$out"
quick=${1:-}
step() { local t=$1; shift; echo "== $*"; timeout "$t" "$@" || echo "!! step failed or timed out: $*"; }

step 150 python3 -m distrt bench kernels ${quick:+--quick} --out "$out/kernels.json"
step 150 python3 benchmarks/gpu_e2e.py --out "$out/e2e.json"
# Offline throughput, Llama-3.1-8B shape; the transformers baseline runs on a subset of the same
# workload (it is one to two orders of magnitude slower) and is reported per output token.
step 150 python3 -m distrt bench throughput --shape llama-3.1-8b --input-len 128 --output-len 128 \
    --num-prompts ${N128:-1000} --max-num-seqs 256 --out "$out/throughput_128_128.json" --plot "$out/throughput_128_128.png"
step 120 python3 -m distrt bench latency --shape llama-3.1-8b --batch-sizes 1,8,32,128 --input-len 128 \
    --output-len 64 --out "$out/latency.json" --plot "$out/latency.png"
if [[ -z "$quick" ]]; then
  step 240 python3 -m distrt bench throughput --shape llama-3.1-8b --input-len 1000 --output-len 1000 \
      --num-prompts ${N1000:-1000} --max-num-seqs 256 --out "$out/throughput_1000_1000.json"
fi
ls -l "$out"
