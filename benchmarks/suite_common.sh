# Sourced by the multi-GPU suites (gpu_x2_suite.sh, gpu_x4_suite.sh) after `cd` to the repo root:
#   suite_init NAME DEFAULT_BUDGET_S
# sets the environment they share (repo on PYTHONPATH, unbuffered output, NVLink multicast off),
# OUT (default /tmp/NAME_out, with OUT/results), budget (SUITE_BUDGET_S or the default), logs (a
# fresh temp dir), summary (OUT/summary.txt, emptied), and note(): a line to stdout and the summary.
suite_init() {
    local name=$1
    export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
    OUT=${OUT:-/tmp/${name}_out}
    budget=${SUITE_BUDGET_S:-$2}
    logs=$(mktemp -d "/tmp/${name}_logs.XXXX")
    mkdir -p "$OUT/results"
    summary=$OUT/summary.txt
    : > "$summary"
}

note() { echo "$*" | tee -a "$summary"; }
