#!/usr/bin/env bash
# Offline 1000 in / 1000 out (Llama-3.1-8B shape, bf16, one GPU) under both admission policies, in one
# device call, one after the other: greedy at the worst-case 224 sequences (the suite's old setting) and
# lookahead (engine/admission.py) allowed up to 512. Results: $OUT/ (default benchmarks/results/<device>/)
# as throughput_1000_1000_n<N>_<policy>.json.
#   DISTRT_COMMIT=<hash> N1000=512 bash benchmarks/gpu_admission_ab.sh [greedy,lookahead]
# N1000=3000 is TensorRT-LLM's request count for this workload (benchmarks/trtllm_reference.py): ~400 s
# per policy on an H100, so run one policy per call then (first argument). BASELINE=generate_batch adds
# transformers' continuous batching on the first HF_N prompts, same run.
set -u
variants=""
policies=${1:-greedy,lookahead}
for policy in ${policies//,/ }; do
  seqs=224; [[ $policy == lookahead ]] && seqs=512
  variants+="$policy::--admission $policy --max-num-seqs $seqs;"
done
exec bash "$(dirname "$0")/gpu_env_ab.sh" "$variants"
