#!/usr/bin/env bash
# Offline 1000 in / 1000 out (Llama-3.1-8B shape, bf16, one GPU; lookahead admission up to 512 sequences
# unless a variant says otherwise) under variants, one after the other in one device call. Results:
# $OUT/ (default benchmarks/results/<device>/) as throughput_1000_1000_n<N>_<label>.json.
#   DISTRT_COMMIT=<hash> N1000=512 bash benchmarks/gpu_env_ab.sh "off:DISTRT_SKINNY_GEMV=0;on:DISTRT_SKINNY_GEMV=1"
# A variant is label:VAR=V[,VAR=V...][:extra bench arguments] (';' between variants; later arguments
# win, e.g. "greedy::--admission greedy --max-num-seqs 224"). ~95 s each at 512 prompts on an H100.
# BASELINE=generate_batch adds transformers (HF_N prompts, HF_CAP seconds).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
slug=$(python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))")
out=${OUT:-benchmarks/results/$slug}
mkdir -p "$out"
n=${N1000:-512}
IFS=';' read -ra variants <<< "$1"
for variant in "${variants[@]}"; do
  [[ -z $variant ]] && continue
  IFS=':' read -r label envs extra <<< "$variant"
  echo "== $label (env: ${envs:-none}; args: ${extra:-none}), $n prompts, $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086  # envs and extra are word lists
  env ${envs//,/ } python3 -m distrt bench throughput --shape llama-3.1-8b --input-len 1000 --output-len 1000 \
      --num-prompts "$n" --max-num-seqs 512 --admission lookahead --baseline "${BASELINE:-none}" \
      --hf-num-prompts "${HF_N:-128}" --hf-time-cap-s "${HF_CAP:-60}" $extra \
      --out "$out/throughput_1000_1000_n${n}_${label}.json"
done
