#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on this machine, for tests and for trying the sbatch scripts.
#
#   launch/testing/start-local-slurm.sh [STATE_DIR]     # install (root, Debian/Ubuntu) if missing, start
#   launch/testing/start-local-slurm.sh --stop [STATE_DIR]
#   export SLURM_CONF=STATE_DIR/slurm.conf              # then: sinfo, sbatch, srun, squeue ...
#
# Idempotent: if the cluster of STATE_DIR (default /tmp/distrt-slurm) answers already, it is reused.
# Its own munged (socket in STATE_DIR), slurmctld and slurmd run as root on free ports; one node (this
# host, NodeAddr 127.0.0.1, CPUs=$DISTRT_SLURM_CPUS or 2), one partition "debug". Nothing under /etc is
# changed; apt-get installs slurm-wlm and munge when they are missing. Prints `export SLURM_CONF=...`.
set -euo pipefail

STOP=0
if [[ "${1:-}" == "--stop" ]]; then STOP=1; shift; fi
DIR="$(realpath -m "${1:-/tmp/distrt-slurm}")"
CPUS="${DISTRT_SLURM_CPUS:-2}"
export SLURM_CONF="$DIR/slurm.conf"

stop_pidfile() {  # TERM the daemon of one pid file, KILL it after 10 s
    local f=$1 pid
    [[ -s "$f" ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if (( STOP )); then
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munged.pid"
    echo "stopped the local Slurm cluster of $DIR"
    exit 0
fi

node_state() { timeout 10 sinfo -h -N -o %T 2>/dev/null | head -1; }

if [[ -f "$SLURM_CONF" ]] && command -v sinfo >/dev/null && [[ "$(node_state)" == idle* || "$(node_state)" == mix* || "$(node_state)" == alloc* ]]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "start-local-slurm: slurm-wlm/munge are not installed and this is not root" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "start-local-slurm: the daemons run as root here; run this script as root" >&2
    exit 3
fi

# A fresh start: whatever an earlier run of this DIR left behind is stopped first.
stop_pidfile "$DIR/slurmd.pid"; stop_pidfile "$DIR/slurmctld.pid"; stop_pidfile "$DIR/munged.pid"
rm -rf "$DIR/state" "$DIR/spool" "$DIR/munge"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
chmod 700 "$DIR/munge"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
while [[ "$SLURMD_PORT" == "$CTLD_PORT" ]]; do SLURMD_PORT=$(free_port); done
HOST=$(hostname -s)

dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"

cat > "$SLURM_CONF" <<CONF
# written by launch/testing/start-local-slurm.sh
ClusterName=distrt-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=300
SchedulerType=sched/backfill
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$HOST"

for _ in $(seq 120); do
    state=$(node_state || true)
    if [[ "$state" == idle* ]]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "start-local-slurm: the node did not become idle (state: '${state:-?}'); logs in $DIR/log:" >&2
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
