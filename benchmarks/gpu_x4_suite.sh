#!/usr/bin/env bash
# Issue 10 on one 4-GPU (or 8-GPU) host in one device call: wide-layout parity, then throughput of the
# Llama-3.1-70B shape, the Llama-3.1-8B shape and a Mixtral-shaped MoE (benchmarks/gpu_multi.py).
# Usage (repo root of the GPU machine, after `source .device/bootstrap.sh`):
#   DISTRT_COMMIT=<sha> bash benchmarks/gpu_x4_suite.sh          # GPUS=4|8 forces a layout set
# GPUs are counted with torch (>= 8: the 8-GPU steps; >= 4: the 4-GPU steps). Steps, in this order
# (STEPS="..." picks and orders them), each under its own time limit, cut to what is left of
# SUITE_BUDGET_S (default 500 s; a step with under 30 s left is skipped):
#  4 GPUs:
#   parity    fp32 teacher-forced top-1 >= 0.99 vs transformers and vs one GPU: Llama-3-shaped at
#             tp=4 and tp=2 x pp=2, Mixtral-shaped MoE at tp=4 x ep=4                         170 s
#   bench70b  shape:llama-3.1-70b (bf16) at tp=4: batch-1 ms/token, 512 x 128/128, 256 x 1000/1000,
#             TensorRT-LLM's published figures and the per-GPU ratio                          230 s
#   bench8b   shape:llama-3.1-8b at tp=1 (local), tp=4, tp=2 x pp=2: batch 1, 512 x 128/128   170 s
#   moe       shape:mixtral-8x7b-16l at tp=4 and tp=4 x ep=4: 512 x 128/128                    130 s
#  8 GPUs:
#   parity    tp=8 and tp=4 x pp=2 (dense), tp=8 x ep=8 (MoE)                                  170 s
#   bench70b  shape:llama-3.1-70b at tp=8 and tp=4 x pp=2 (same workloads)                     330 s
#   bench70b_tp4  (not in the default list) tp=4 on the same host, for scaling                 200 s
#  Not in the default lists, on GPUs 0 and 1 of the host (issue 4/5 figures on 2 of its H200s):
#   tp_tests  tests/gpu/test_gpu_tp.py (MPI and Ray tp=2 vs transformers, IPC all-reduce taken) and
#             the custom all-reduce GPU tests                                                 120 s
#   tp2       benchmarks/gpu_tp.py: tp=1, tp=2 (MPI, Ray), pp=2; 512 x 128/128 at max_num_seqs 512 200 s
# Overrides: LAYOUTS_70B, W70 (workloads <in>x<out>x<prompts>,...), W8, WMOE.
# SUITE_DEVICE=cpu GPUS=4|8: the same steps on CPU ranks at tiny shapes (llama-tiny, mixtral-tiny, tiny
# parity checkpoints), results in /tmp: a smoke test of this script and of gpu_multi.py without a GPU.
# Results go to benchmarks/results/<gpu>x<N>/ and, with the logs (logs.tar.gz, refreshed after every
# step) and summary.txt, to $OUT (at most 8 files come back from a device run: 6 or 7 are written).
set -u
SECONDS=0  # the budget counts from here
cd "$(dirname "$0")/.."
source benchmarks/suite_common.sh
suite_init gpu_x4 500

if [[ ${SUITE_DEVICE:-cuda} == cpu ]]; then
    found=${GPUS:-4}
    DEV=(--device cpu) SHAPE70=llama-tiny SHAPE8=llama-tiny SHAPEMOE=mixtral-tiny
    W70=${W70:-16x8x8,32x16x4} W8=${W8:-16x8x8} WMOE=${WMOE:-16x8x8}
    slug=cpu
else
    found=$(timeout 60 python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    DEV=() SHAPE70=llama-3.1-70b SHAPE8=llama-3.1-8b SHAPEMOE=mixtral-8x7b-16l
    W70=${W70:-128x128x512,1000x1000x256} W8=${W8:-128x128x512} WMOE=${WMOE:-128x128x512}
    slug=$(timeout 60 python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))" 2>/dev/null || echo h200)
fi
gpus=${GPUS:-$found}
if (( gpus >= 8 )); then gpus=8; elif (( gpus >= 4 )); then gpus=4; else
    note "== gpu_x4_suite: needs 4 or 8 GPUs, torch sees ${found}"; exit 1
fi
if (( found < gpus )); then note "== gpu_x4_suite: GPUS=$gpus but torch sees ${found}"; exit 1; fi
res=${RESULTS_DIR:-$([[ $slug == cpu ]] && echo "$logs/results" || echo "benchmarks/results/${slug}x${gpus}")}
mkdir -p "$res"
if (( gpus == 8 )); then
    steps=${STEPS:-parity bench70b}
    PARITY_DENSE=tp8,tp4xpp2 PARITY_MOE=tp8xep8 LAYOUTS_70B=${LAYOUTS_70B:-tp8,tp4xpp2} LIMIT_70B=330
else
    steps=${STEPS:-parity bench70b bench8b moe}
    PARITY_DENSE=tp4,tp2xpp2 PARITY_MOE=tp4xep4 LAYOUTS_70B=${LAYOUTS_70B:-tp4} LIMIT_70B=230
fi
GM=(python3 benchmarks/gpu_multi.py)

pack() {  # what has come so far, in $OUT (also if a later step is cut off by the call's limit)
    for f in "$res"/*.json; do
        [[ -f $f && $f -nt $logs/.start ]] && cp "$f" "$OUT/results/"
    done
    tar -C "$logs" -czf "$OUT/logs.tar.gz" . 2>/dev/null
}
reap() {  # MPI jobs a cut-off step left behind (each mpirun leads a process group of its own)
    local f=$logs/$1.pgid pg
    [[ -s $f ]] || return 0
    while read -r pg; do
        [[ $pg =~ ^[0-9]+$ ]] || continue
        if kill -0 -- "-$pg" 2>/dev/null; then note "   killing leftover MPI job (process group $pg)"; kill -KILL -- "-$pg"; fi
    done < "$f"
}
step() {  # step NAME LIMIT_S CMD...: output to $logs/NAME.log, a line in summary.txt
    local name=$1 limit=$2; shift 2
    local left=$(( budget - SECONDS ))
    (( limit > left - 5 )) && limit=$(( left - 5 ))
    if (( limit < 30 )); then note "-- $name: skipped, ${left}s of the ${budget}s budget left"; return; fi
    local t0=$SECONDS
    GPU_MULTI_PGID_FILE=$logs/$name.pgid timeout -k 20 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    note "-- $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo " (timed out at ${limit}s)") in $(( SECONDS - t0 ))s: $*"
    grep -E "PASS|FAIL|ERROR|up in|batch 1|output tok/s" "$logs/$name.log" | cut -c1-240 | sed 's/^/     /' | tee -a "$summary"
    tail -n 3 "$logs/$name.log" | sed 's/^/     | /' | cut -c1-300 | tee -a "$summary"
    reap "$name"
    pack
}

touch "$logs/.start"
note "== gpu_x4_suite: commit ${DISTRT_COMMIT:-unknown}, $(date -u +%FT%TZ), ${gpus} of ${found} GPUs, budget ${budget}s, steps: ${steps}; results in $res"
if [[ $slug != cpu ]]; then
    timeout 30 nvidia-smi -L 2>&1 | tee -a "$summary"
    timeout 30 nvidia-smi topo -m > "$logs/topo.txt" 2>&1
    head -n $(( found + 1 )) "$logs/topo.txt" | cut -c1-160 | tee -a "$summary"
    timeout 60 python3 -c "import torch, triton, cupy, mpi4py, transformers; print('gpus', torch.cuda.device_count(), 'torch', torch.__version__, 'triton', triton.__version__, 'cupy', cupy.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 2 | tee -a "$summary"
fi
timeout 30 mpirun --version 2>&1 | head -n 1 | tee -a "$summary"

for s in $steps; do
    case $s in
        parity)   step parity 170 "${GM[@]}" parity "${DEV[@]}" --layouts "$PARITY_DENSE" --moe-layouts "$PARITY_MOE" \
                      --out "$res/parity.json" ;;
        bench70b) step bench70b "$LIMIT_70B" "${GM[@]}" bench "${DEV[@]}" --shape $SHAPE70 --layouts "$LAYOUTS_70B" \
                      --workloads "$W70" --trtllm --out "$res/llama-3.1-70b.json" ;;
        bench70b_tp4) step bench70b_tp4 200 "${GM[@]}" bench "${DEV[@]}" --shape $SHAPE70 --layouts tp4 --workloads "$W70" \
                      --trtllm --out "$res/llama-3.1-70b_tp4.json" ;;
        bench8b)  step bench8b 170 "${GM[@]}" bench "${DEV[@]}" --shape $SHAPE8 --layouts tp1,tp4,tp2xpp2 --workloads "$W8" \
                      --trtllm --out "$res/llama-3.1-8b.json" ;;
        tp_tests) step tp_tests 120 env CUDA_VISIBLE_DEVICES=0,1 python3 -m pytest -q -p no:cacheprovider -m gpu \
                      tests/gpu/test_gpu_tp.py tests/parallel/test_custom_allreduce.py -k "not two_ray_nodes" ;;
        tp2)      step tp2 200 env CUDA_VISIBLE_DEVICES=0,1 python3 benchmarks/gpu_tp.py --requests 512 --max-num-seqs 512 \
                      --all-throughput --executors mpi,ray --out "$res/tp2_of_4.json" ;;
        moe)      step moe 130 "${GM[@]}" bench "${DEV[@]}" --shape $SHAPEMOE --layouts tp4,tp4xep4 --workloads "$WMOE" \
                      --out "$res/mixtral-8x7b-16l.json" ;;
        *)        note "-- unknown step $s" ;;
    esac
done
note "== headline metrics"
timeout 60 "${GM[@]}" summary "$OUT"/results/*.json 2>&1 | sed 's/^/   /' | tee -a "$summary"
note "== done in ${SECONDS}s"
pack
ls -l "$OUT" "$OUT/results"
