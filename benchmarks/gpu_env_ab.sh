#!/usr/bin/env bash
# Offline 1000 in / 1000 out (Llama-3.1-8B shape, bf16, one GPU, lookahead admission up to 512 sequences)
# under environment variants, one after the other in one device call. Results: $OUT/ (default
# benchmarks/results/<device>/) as throughput_1000_1000_n<N>_<label>.json.
#   DISTRT_COMMIT=<hash> N1000=512 bash benchmarks/gpu_env_ab.sh "unsplit:DISTRT_OVERLAP_MIXED=0 split:DISTRT_OVERLAP_MIXED=1"
# A variant is label:VAR=V[,VAR=V...]; ~95 s each at 512 prompts on an H100.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
slug=$(python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))")
out=${OUT:-benchmarks/results/$slug}
mkdir -p "$out"
n=${N1000:-512}
for variant in $1; do
  label=${variant%%:*}
  envs=${variant#*:}
  echo "== $label ($envs), $n prompts, $(date -u +%FT%TZ)"
  env ${envs//,/ } python3 -m distrt bench throughput --shape llama-3.1-8b --input-len 1000 --output-len 1000 \
      --num-prompts "$n" --max-num-seqs 512 --admission lookahead --baseline "${BASELINE:-none}" \
      --hf-num-prompts "${HF_N:-128}" --hf-time-cap-s "${HF_CAP:-60}" \
      --out "$out/throughput_1000_1000_n${n}_${label}.json"
done
