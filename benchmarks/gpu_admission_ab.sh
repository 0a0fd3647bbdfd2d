#!/usr/bin/env bash
# Offline 1000 in / 1000 out (Llama-3.1-8B shape, bf16, one GPU) under both admission policies, in one
# device call, one after the other: greedy at the worst-case 224 sequences (the suite's setting) and
# lookahead (engine/admission.py) allowed up to 512. Results: $OUT/ (default benchmarks/results/<device>/).
#   DISTRT_COMMIT=<hash> N1000=512 bash benchmarks/gpu_admission_ab.sh [greedy,lookahead]
# N1000=3000 is TensorRT-LLM's request count for this workload (benchmarks/trtllm_reference.py): ~400 s
# per policy on an H100, so run one policy per call then (second argument).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
slug=$(python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))")
out=${OUT:-benchmarks/results/$slug}
mkdir -p "$out"
n=${N1000:-512}
policies=${1:-greedy,lookahead}
baseline=${BASELINE:-none}  # generate_batch: transformers' continuous batching on the first HF_N prompts, same run
for policy in ${policies//,/ }; do
  seqs=224; [[ $policy == lookahead ]] && seqs=512
  echo "== $policy, $n prompts, max_num_seqs $seqs, $(date -u +%FT%TZ)"
  python3 -m distrt bench throughput --shape llama-3.1-8b --input-len 1000 --output-len 1000 --num-prompts "$n" \
      --max-num-seqs $seqs --admission "$policy" --baseline "$baseline" --hf-num-prompts "${HF_N:-128}" \
      --hf-time-cap-s "${HF_CAP:-60}" --out "$out/throughput_1000_1000_n${n}_${policy}.json"
done
