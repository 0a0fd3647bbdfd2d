#!/usr/bin/env bash
# Submit a distrt command to a running Ray cluster as a Ray job (`ray job submit`): this checkout is
# uploaded as the job's working directory, the driver (the coordinator) runs on the head node, and
# the workers become Ray actors anywhere in the cluster.
#
#   launch/ray-submit.sh [--address ADDR] [RAY JOB SUBMIT OPTIONS] -- DISTRT SUBCOMMAND [FLAGS]
#
#   # a cluster started with `ray start --head` (or `ray up cluster_configs/ray-onprem.yaml`):
#   export RAY_ADDRESS=http://head-node:8265
#   launch/ray-submit.sh -- generate --model /models/Meta-Llama-3.1-8B-Instruct --tp 2 --prompt "Hello"
#   launch/ray-submit.sh --address head-node:6379 --no-wait -- serve --config llama-8b-tp2
#
# ADDR is the dashboard's http://host:8265 or the GCS host:port (default: $RAY_ADDRESS). Options
# before `--` go to `ray job submit` (--no-wait, --submission-id, --entrypoint-num-cpus, ...). The
# entrypoint is `python -m distrt ...`: the uploaded code, run by the `python` on the head's PATH as
# Ray was started (start Ray from the activated venv, or set ENTRYPOINT_PYTHON to the cluster's
# interpreter), with `--executor ray` added unless the flags name an executor. Paths (--model) are
# paths on the head node.
#
# Environment: WORKING_DIR (default: this checkout), RAY (the ray CLI; default the venv's),
# RAY_AUTH_MODE/RAY_AUTH_TOKEN for clusters with token authentication (Ray 2.60's `ray start` turns
# it on when ~/.ray/auth_token exists): if RAY_AUTH_MODE is unset and a token is at hand, token mode
# is used.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
WORKING_DIR=${WORKING_DIR:-$root}
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$root/.venv/bin/ray" ]]; then RAY="$root/.venv/bin/ray"; else RAY=$(command -v ray || true); fi
fi
[[ -n "$RAY" ]] || { echo "ray-submit.sh: no ray CLI found (pip install 'ray[default]', or set RAY)" >&2; exit 2; }

submit_args=(); address=${RAY_ADDRESS:-}; has_runtime_env=0
while (( $# )) && [[ "$1" != "--" ]]; do
    case "$1" in
        --address) address=$2; shift 2; continue ;;
        --address=*) address=${1#*=}; shift; continue ;;
        --runtime-env|--runtime-env=*|--runtime-env-json|--runtime-env-json=*) has_runtime_env=1 ;;
    esac
    submit_args+=("$1"); shift
done
(( $# )) && shift  # the --
(( $# )) || { sed -n '2,/^set -e/{/^#/p}' "${BASH_SOURCE[0]}" >&2; exit 2; }
[[ -n "$address" ]] || { echo "ray-submit.sh: give --address or set RAY_ADDRESS (http://head:8265 or head:6379)" >&2; exit 2; }
distrt_args=("$@")
has_executor=0
for a in "${distrt_args[@]}"; do [[ "$a" == --executor || "$a" == --executor=* ]] && has_executor=1; done
(( has_executor )) || distrt_args+=(--executor ray)

if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
    export RAY_AUTH_MODE=token
fi
if (( ! has_runtime_env )); then
    # Keep the upload small: no virtualenv, VCS data or caches (.gitignore'd files are skipped too).
    submit_args+=(--runtime-env-json '{"excludes": [".git", ".venv", "venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", ".device", ".whl", "__pycache__", "*.egg-info", "benchmarks/results"]}')
fi

py=${ENTRYPOINT_PYTHON:-python}
echo "[ray-submit.sh] + $RAY job submit --address $address --working-dir $WORKING_DIR ${submit_args[*]} -- $py -m distrt ${distrt_args[*]}" >&2
exec "$RAY" job submit --address "$address" --working-dir "$WORKING_DIR" "${submit_args[@]}" -- "$py" -m distrt "${distrt_args[@]}"
