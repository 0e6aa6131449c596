#!/usr/bin/env bash
# Install (Debian packages, as root) and start a real one-node SLURM cluster on this
# machine: munged, slurmctld and slurmd, one partition `debug` holding this host. Used by
# .ci/run before `make test` (tests/test_cluster.py runs the pipeline through it); stop it
# with tests/cluster/stop_slurm.sh. A second start while it runs changes nothing.
#
# Everything it writes lives under $MOW_SLURM_DIR (default /tmp/mow-slurm): state, spool,
# daemon logs (slurmctld.log, slurmd.log, munged.log), PID files, and jobcomp.log, one
# line per finished job (id, name, state, exit code, work dir): the job history a cluster
# without a slurmdbd keeps. The only file outside it is /etc/slurm/slurm.conf (the path
# every SLURM command reads); an existing one that this script did not write is never
# replaced.
#
# Exit status 0 when `sinfo` shows the node idle; otherwise 1 with one line saying why
# (not root, no apt-get, a foreign slurm.conf, a daemon that did not come up).
set -euo pipefail

DIR=${MOW_SLURM_DIR:-/tmp/mow-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by mow tests/cluster/start_slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "start_slurm.sh: $*" >&2; exit 1; }
t0=$(date +%s%N)
elapsed() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# -- packages ------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
   || ! command -v munged >/dev/null; then
    [[ $(id -u) == 0 ]] || die "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    echo "start_slurm.sh: installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # quiet, no recommends (they pull mail servers and docs); the package scripts cannot
    # start services here (no init system), which is what we want: we start them below
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/mow-slurm-apt.log" 2>&1 \
        || die "apt-get install ${PACKAGES[*]} failed (log: ${TMPDIR:-/tmp}/mow-slurm-apt.log)"
    echo "start_slurm.sh: installed in $(elapsed) s"
fi
[[ $(id -u) == 0 ]] || die "starting munged, slurmctld and slurmd needs root"

mkdir -p "$DIR"/{ctld,spool} /run/munge /etc/slurm
chown munge:munge /run/munge
chmod 0755 /run/munge

# -- slurm.conf: this host as the one node, its CPUs and memory as slurmd sees them ----------
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not replacing it"
fi
host=$(hostname -s)
# `slurmd -C` prints `NodeName=... CPUs=... RealMemory=...`: keep the hardware fields
node=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
[[ $node == *CPUs=* ]] || die "slurmd -C did not report this host's CPUs"
conf=$(cat <<EOF
$MARK; state and logs in $DIR
ClusterName=mow
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# no cgroups in a container: track job processes by their parent, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# CPUs and memory are consumable, so jobs share the node up to its cores
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# no slurmdbd: finished jobs are recorded in a text file instead (the test reads it)
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
MailProg=/bin/true
ReturnToService=2
# start a submitted job at once instead of after the default batching delay
SchedulerParameters=batch_sched_delay=0
# squeue keeps a finished job for 5 minutes: Snakemake's status checks find its end state
MinJobAge=300
# a job that names no memory gets 1 GB per CPU, not the whole node (which would block the rest)
DefMemPerCPU=1000
NodeName=$host $node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -e $CONF ]] || [[ $(cat "$CONF") != "$conf" ]]; then
    printf '%s\n' "$conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
fi

# -- daemons, each started only when its PID file names no live process ---------------------
if ! alive /run/munge/munged.pid; then
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    touch "$DIR/munged.log" && chown munge:munge "$DIR/munged.log"   # munged runs as munge
    runuser -u munge -- /usr/sbin/munged --log-file="$DIR/munged.log" || die "munged did not start (log: $DIR/munged.log)"
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer (log: $DIR/munged.log)"
alive "$DIR/slurmctld.pid" || slurmctld || die "slurmctld did not start (log: $DIR/slurmctld.log)"
alive "$DIR/slurmd.pid" || slurmd || die "slurmd did not start (log: $DIR/slurmd.log)"

# -- ready when the node is idle (or already running jobs) ---------------------------------
for _ in $(seq 100); do
    state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
    if [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then
        echo "start_slurm.sh: SLURM up in $(elapsed) s (node $host: $state; state and logs in $DIR)"
        exit 0
    fi
    sleep 0.2
done
die "node $host is '${state:-not listed}' after 20 s (logs: $DIR/slurmctld.log, $DIR/slurmd.log)"
