#!/usr/bin/env bash
# Issues 6 (MoE) and 7 (Ray two-node) on one 2-GPU host, plus the TP benchmark and GPU tests, in one
# device call. Usage (repo root of the 2-GPU machine, after `source .device/bootstrap.sh`):
#   DISTRT_COMMIT=<sha> bash benchmarks/gpu_x2_suite.sh
# Steps, in this order (STEPS="..." picks and orders them), each under its own time limit, cut to what
# is left of SUITE_BUDGET_S (default 470 s; a step with under 30 s left is skipped):
#   moe_tests   pytest -m gpu tests/moe       Triton fused MoE vs torch (bf16), ep=2 vs one GPU      150 s
#   moe_bench   benchmarks/moe_gpu.py         kernel vs per-expert loop, EP load, ep=2 vs tp=2 model  200 s
#   ray         benchmarks/ray_two_node_gpu.py  distrt-ray.sbatch two-node form, serve + HTTP         200 s
#   gpu_tp      benchmarks/gpu_tp.py --max-num-seqs 512 --executors mpi,ray (2048 x 128/128)          240 s
#   gpu_tests   pytest -m gpu tests/gpu                                                              150 s
# Results go to benchmarks/results/<gpu>x2/ and, with the logs (logs.tar.gz, refreshed after every
# step) and summary.txt, to $OUT (at most 8 files come back from a device run: 7 are written).
set -u
SECONDS=0  # the budget counts from here
cd "$(dirname "$0")/.."
source benchmarks/suite_common.sh
suite_init gpu_x2 470
steps=${STEPS:-moe_tests moe_bench ray gpu_tp gpu_tests}
slug=$(timeout 60 python3 -c "import torch; from distrt.bench.kernels import device_slug; print(device_slug(torch.cuda.get_device_name(0)))" 2>/dev/null || echo h200)
res=${RESULTS_DIR:-benchmarks/results/${slug}x2}
mkdir -p "$res"
pack() {  # what has come so far, in $OUT (also if a later step is cut off by the call's limit)
    for f in moe.json ray_two_node.json tp.json gpu_tests.log moe_tests.log; do
        [[ -f $res/$f && $res/$f -nt $logs/.start ]] && cp "$res/$f" "$OUT/results/"
    done
    tar -C "$logs" -czf "$OUT/logs.tar.gz" . 2>/dev/null
}
step() {  # step NAME LIMIT_S CMD...: output to $logs/NAME.log, a line in summary.txt
    local name=$1 limit=$2; shift 2
    local left=$(( budget - SECONDS ))
    (( limit > left - 5 )) && limit=$(( left - 5 ))
    if (( limit < 30 )); then note "-- $name: skipped, ${left}s of the ${budget}s budget left"; return; fi
    local t0=$SECONDS
    timeout -k 45 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    note "-- $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo " (timed out at ${limit}s)") in $(( SECONDS - t0 ))s: $*"
    tail -n 6 "$logs/$name.log" | sed 's/^/     /' | cut -c1-300 | tee -a "$summary"
    pack
}

# A machine still warm from a call with an older .device bundle has Ray but not the server's wheels.
if ! timeout 60 python3 -c "import fastapi, uvicorn" 2>/dev/null && [[ -d .device/wheels ]]; then
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .device/wheels/*.whl
fi
touch "$logs/.start"
note "== gpu_x2_suite: commit ${DISTRT_COMMIT:-unknown}, $(date -u +%FT%TZ), budget ${budget}s, results in $res"
timeout 30 nvidia-smi -L 2>&1 | tee -a "$summary"
timeout 60 python3 -c "import torch, triton, cupy, mpi4py, transformers, fastapi, uvicorn, ray; print('gpus', torch.cuda.device_count(), 'torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 2 | tee -a "$summary"

for s in $steps; do
    case $s in
        moe_tests) step moe_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/moe
                   [[ -f $logs/moe_tests.log ]] && cp "$logs/moe_tests.log" "$res/moe_tests.log"; pack ;;
        moe_bench) step moe_bench 200 python3 benchmarks/moe_gpu.py --quick --requests 256 --out "$res/moe.json" ;;
        ray)       RAY2N_PGID_FILE=$logs/ray.pgid step ray 200 python3 benchmarks/ray_two_node_gpu.py \
                       --out "$res/ray_two_node.json" --log-dir "$logs"
                   if [[ -s $logs/ray.pgid ]]; then  # the launcher's process group, if the step was cut off
                       pg=$(cat "$logs/ray.pgid"); kill -0 -- "-$pg" 2>/dev/null && { note "   killing leftover group $pg"; kill -KILL -- "-$pg"; }
                   fi ;;
        gpu_tp)    step gpu_tp 240 python3 benchmarks/gpu_tp.py --max-num-seqs 512 --executors mpi,ray --out "$res/tp.json" ;;
        gpu_tests) step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu
                   [[ -f $logs/gpu_tests.log ]] && cp "$logs/gpu_tests.log" "$res/gpu_tests.log"; pack ;;
        *)         note "-- unknown step $s" ;;
    esac
done
note "== done in ${SECONDS}s"
pack
ls -l "$OUT" "$OUT/results"
