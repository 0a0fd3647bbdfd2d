#!/usr/bin/env bash
# distrt under mpirun, without a scheduler: one rank per GPU (or CPU worker), rank 0 the coordinator
# (scheduler, KV allocator, HTTP server for `serve`), ranks 1..N-1 the workers.
#
#   launch/mpirun.sh [MPIRUN OPTIONS] -- DISTRT SUBCOMMAND [FLAGS]
#
#   # tp=3 on this host's CPUs, one greedy completion:
#   launch/mpirun.sh -- generate --model default --tp 3 --device cpu --dtype float32 --prompt "The capital of France is"
#   # two 8-GPU hosts (MPICH hydra over ssh; same venv path on both), tp=8 x pp=2, server on the first host:
#   launch/mpirun.sh -f hosts.txt -ppn 8 -- serve --model /models/Llama-3.1-70B --tp 8 --pp 2 --host 0.0.0.0
#
# Everything before `--` goes to mpirun as is; without -n/-np the rank count is tp x pp from the
# distrt flags or the --config preset. `--executor mpi` is added unless the flags name an executor.
# mpirun is the venv's (pip's `mpich`: hydra) when present, else the first on PATH ($MPIRUN
# overrides); the interpreter is the venv's python ($PYTHON overrides). Under Slurm use
# launch/slurm/distrt-mpi.sbatch instead.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=$(command -v python3); fi
fi
if [[ -z "${MPIRUN:-}" ]]; then
    if [[ -x "$(dirname "$PYTHON")/mpirun" ]]; then MPIRUN="$(dirname "$PYTHON")/mpirun"; else MPIRUN=$(command -v mpirun || true); fi
fi
[[ -n "$MPIRUN" ]] || { echo "mpirun.sh: no mpirun found (pip install mpich, or set MPIRUN)" >&2; exit 2; }

mpi_args=()
while (( $# )) && [[ "$1" != "--" ]]; do mpi_args+=("$1"); shift; done
(( $# )) && shift  # the --
(( $# )) || { sed -n '2,/^set -e/{/^#/p}' "${BASH_SOURCE[0]}" >&2; exit 2; }
distrt_args=("$@")

has_np=0; tp=; pp=; config=; has_executor=0
for a in "${mpi_args[@]}"; do [[ "$a" == -n || "$a" == -np || "$a" == -n=* || "$a" == -np=* ]] && has_np=1; done
for (( i = 0; i < ${#distrt_args[@]}; i++ )); do
    a=${distrt_args[i]}; next=${distrt_args[i + 1]:-}
    case "$a" in
        --tp|--tensor-parallel-size) tp=$next ;;
        --tp=*|--tensor-parallel-size=*) tp=${a#*=} ;;
        --pp|--pipeline-parallel-size) pp=$next ;;
        --pp=*|--pipeline-parallel-size=*) pp=${a#*=} ;;
        --config) config=$next ;;
        --config=*) config=${a#*=} ;;
        --executor|--executor=*) has_executor=1 ;;
    esac
done
if (( ! has_np )) && [[ -n "$config" && ( -z "$tp" || -z "$pp" ) ]]; then  # the layout of a --config preset
    read -r file_tp file_pp < <("$PYTHON" - "$config" <<'EOF'
import sys

import yaml
from distrt.config_file import find_preset

d = {str(k).replace("-", "_"): v for k, v in (yaml.safe_load(open(find_preset(sys.argv[1]))) or {}).items()}
print(d.get("tp", d.get("tensor_parallel_size", 1)), d.get("pp", d.get("pipeline_parallel_size", 1)))
EOF
    )
    tp=${tp:-$file_tp}; pp=${pp:-$file_pp}
fi
(( has_np )) || mpi_args=(-n "$(( ${tp:-1} * ${pp:-1} ))" "${mpi_args[@]}")
(( has_executor )) || distrt_args+=(--executor mpi)

# Open MPI refuses to run as root without these; MPICH ignores them.
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
echo "[mpirun.sh] + $MPIRUN ${mpi_args[*]} $PYTHON -m distrt ${distrt_args[*]}" >&2
exec "$MPIRUN" "${mpi_args[@]}" "$PYTHON" -m distrt "${distrt_args[@]}"
