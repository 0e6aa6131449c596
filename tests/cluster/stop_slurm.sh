#!/usr/bin/env bash
# Stop the cluster tests/cluster/start_slurm.sh started: cancel what is still queued or
# running, then end slurmd, slurmctld and munged by the PIDs in their PID files. Stopping
# a cluster that is not running does nothing. Logs and state stay in $MOW_SLURM_DIR.
set -uo pipefail

DIR=${MOW_SLURM_DIR:-/tmp/mow-slurm}

stop() {  # stop NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    # a stale file can name a recycled PID: only signal the daemon it was written for
    if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stop_slurm.sh: stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

# jobs of a stopped slurmd would keep running unattended (slurmstepd outlives it)
if [[ -s $DIR/slurmctld.pid ]] && command -v scancel >/dev/null; then
    scancel --user "$(id -un)" 2>/dev/null || true
fi
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged /run/munge/munged.pid
exit 0
