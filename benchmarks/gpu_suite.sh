#!/usr/bin/env bash
# The GPU benchmark suite in one device call on one H100/H200: about 8.5 minutes, and never more than
# SUITE_BUDGET_S (default 540 s) from its start; results under benchmarks/results/<device>/.
# Usage (on the GPU machine, from the repo root; no .git there, so the commit comes in by env):
#   DISTRT_COMMIT=<hash> bash benchmarks/gpu_suite.sh [quick]
# Steps run most important first. Each has its own time limit, cut to what is left of the budget, so
# one slow step cannot sink the rest and the suite always ends in time; a step that would get under
# 20 s is skipped. steps.tsv records each step's exit code and seconds; suite.json (suite_summary.py)
# the headline metrics; suite.log everything printed. With $OUT set, results_<device>.tar.gz (this run's
# files of the results folder), suite.json and suite.log are copied there.
# `quick`: smaller workloads (about 6 minutes), for checking that every step runs. Workload sizes can be
# set by env: N1000 HF_N HF_CAP N128 N2048 EO_STEPS E2E_SHAPES.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
suite_t0=$(date +%s)
budget=${SUITE_BUDGET_S:-540}
quick=${1:-}
slug=${SUITE_DEVICE:-$(python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))")}
out=benchmarks/results/$slug
mkdir -p "$out"
exec > >(tee "$out/suite.log") 2>&1
since=$(date +%s)  # only files written from now on are this run's (suite.json, the tarball)
echo "== gpu_suite on $slug, commit ${DISTRT_COMMIT:-<unset: results say 'unknown' without git>}, budget ${budget}s, $(date -u +%FT%TZ)"
: > "$out/steps.tsv"

if [[ -n "$quick" ]]; then
  N1000=${N1000:-224} HF_N=${HF_N:-64} HF_CAP=${HF_CAP:-30} N128=${N128:-256} N2048=${N2048:-48} EO_STEPS=${EO_STEPS:-128}
fi
if [[ -n "${SUITE_SHAPE:-}" && "$SUITE_SHAPE" != llama-3.1-8b ]]; then
  echo "!! shape $SUITE_SHAPE: the headline names in suite.json still say 8b"
fi

# step NAME TIMEOUT CMD...: runs CMD under min(TIMEOUT, budget left - 12 s); '{T}' in CMD becomes that limit
step() {
  local name=$1 t=$2; shift 2
  local left=$(( budget - ($(date +%s) - suite_t0) - 12 ))  # 12 s: timeout's kill grace and the summary
  (( t > left )) && t=$left
  if (( t < 20 )); then
    echo "!! [$name] skipped: ${left}s of the suite budget left"
    printf '%s\tskipped\t0\t%s\n' "$name" "$t" >> "$out/steps.tsv"
    return
  fi
  local args=() x
  for x in "$@"; do args+=("${x//\{T\}/$t}"); done
  echo "== [$name] limit ${t}s: ${args[*]}"
  local s0=$(date +%s.%N) rc
  timeout -k 10 "$t" "${args[@]}"; rc=$?
  local secs=$(python3 -c "import time; print(f'{time.time() - $s0:.1f}')")
  (( rc != 0 )) && echo "!! [$name] failed or timed out (rc $rc)"
  echo "== [$name] ${secs}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$t" >> "$out/steps.tsv"
}

shape=${SUITE_SHAPE:-llama-3.1-8b}  # SUITE_SHAPE=llama-tiny SUITE_DEVICE=cpu-smoke: a CPU dry run of the script
# Limits add up to 540 s; the estimates (one H100) assume ~25 s per 8B engine init (weights drawn on the
# GPU, KV profile, 20 decode graphs; Triton's cache is warm after the first step).
# 1. Offline throughput 1000 in / 1000 out (~215 s). distrt: 512 prompts (512k output tokens, ~90 s at
#    ~7k tok/s). KV is 128 KiB/token: 224 x 2000 tokens = 55 GiB fill the ~56 GiB that 0.9 of the free
#    memory after 15 GiB of weights gives; lookahead admission (engine/admission.py) runs up to 512 at
#    once, admitted as older ones free blocks, without preempting (preemptions are recorded). H100: 7,393
#    tok/s against 7,151 for greedy admission at 224 (results/h100/throughput_1000_1000_n512_*.json).
#    Then transformers' generate_batch on the first 128 prompts, identical weights and lengths, timed
#    after its warm-up (~30 s, CUDA graphs) for at most 60 s, cut to end 25 s before this step's limit
#    (streamed, so unfinished requests' tokens count), reported per output token.
step tput_1000_1000 220 python3 -m distrt bench throughput --shape $shape --input-len 1000 --output-len 1000 \
    --num-prompts "${N1000:-512}" --max-num-seqs 512 --admission lookahead --baseline generate_batch --hf-num-prompts "${HF_N:-128}" \
    --hf-time-cap-s "${HF_CAP:-60}" --time-budget-s '{T}' \
    --out "$out/throughput_1000_1000.json" --plot "$out/throughput_1000_1000.png"
# 1b. The same workload with the FP8 (e4m3) KV cache (~80 s): twice the blocks, up to 512 sequences at once;
#    its own metric (bf16 weights, fp8 KV), not the bf16 headline; no transformers baseline.
step tput_1000_1000_fp8kv 100 python3 -m distrt bench throughput --shape $shape --input-len 1000 --output-len 1000 \
    --num-prompts "${N1000:-512}" --max-num-seqs 512 --admission lookahead --kv-cache-dtype fp8 --out "$out/throughput_1000_1000_fp8kv.json"
# 2. Engine overhead (~45 s): engine decode vs the bare decode-graph loop at batch 64 and 256, 256 steps, best of 2.
step engine_overhead 60 python3 benchmarks/engine_overhead.py --shape $shape --batch-sizes 64,256 --prompt-len 32 \
    --decode-steps "${EO_STEPS:-256}" --repeats 2 --out "$out/engine_overhead.json"
# 3. Offline throughput 128/128 (~37 s): 1000 prompts, 256 at once (KV 256 x 256 tokens: small).
step tput_128_128 45 python3 -m distrt bench throughput --shape $shape --input-len 128 --output-len 128 \
    --num-prompts "${N128:-1000}" --max-num-seqs 256 --out "$out/throughput_128_128.json" --plot "$out/throughput_128_128.png"
# 4. Offline throughput 2048/128 (~45 s): prefill-bound, 200 prompts (410k prompt tokens), 192 at once
#    (192 x 2176 tokens = 51 GiB of KV).
step tput_2048_128 55 python3 -m distrt bench throughput --shape $shape --input-len 2048 --output-len 128 \
    --num-prompts "${N2048:-200}" --max-num-seqs 192 --out "$out/throughput_2048_128.json"
# 5. Decode step latency percentiles (~32 s): batch 1, 8, 32, 128; 128-token prompts, 64 new tokens.
step latency 45 python3 -m distrt bench latency --shape $shape --batch-sizes 1,8,32,128 --input-len 128 \
    --output-len 64 --out "$out/latency.json" --plot "$out/latency.png"
# 6. Kernels (~35 s): copy bandwidth, GEMM rate, attention, elementwise (quick configs).
step kernels 40 python3 -m distrt bench kernels --quick --out "$out/kernels.json"
# 7. Batch-1 decode of the 8B shape vs the bandwidth roofline and transformers generate, async and sync
#    scheduling (~70 s: two engine inits, transformers at ~80 ms/token; 128 new tokens). The 1B shape
#    (another ~40 s) is left to a separate `python3 benchmarks/gpu_e2e.py` run.
step e2e 75 python3 benchmarks/gpu_e2e.py --shapes "${E2E_SHAPES:-$shape}" --new-tokens 128 --out "$out/e2e.json"

python3 benchmarks/suite_summary.py "$out" --since "$since" --out "$out/suite.json" || echo "!! summary failed"
echo "== gpu_suite done in $(( $(date +%s) - suite_t0 ))s"
if [[ -n "${OUT:-}" ]]; then
  sleep 1  # let tee flush the log
  (cd benchmarks/results && find "$slug" -type f -newermt "@$since" -print0 | tar -czf "$OUT/results_$slug.tar.gz" --null -T -)
  cp "$out/suite.json" "$out/suite.log" "$OUT/" 2>/dev/null
  ls -l "$OUT"
fi
