#!/usr/bin/env bash
# A one-node Slurm on this machine, for tests and trying things out: slurmctld + slurmd as root, no
# systemd, no munge (auth/none), config and state in one folder this script owns.
#
#   slurm/local_cluster.sh start    # install if missing (apt), write the config, start both daemons
#   slurm/local_cluster.sh status   # the daemons and `sinfo`
#   slurm/local_cluster.sh stop     # stop both daemons (the folder stays, for the logs)
#   slurm/local_cluster.sh env      # print the line that points Slurm's commands at this cluster
#
# The folder is $TITANS_SLURM_DIR (default /tmp/titans-slurm); clients find the config through
# SLURM_CONF=$TITANS_SLURM_DIR/slurm.conf (`start` prints the export line; the tests look there).
# Ports: $TITANS_SLURM_CTLD_PORT (6817) and $TITANS_SLURM_D_PORT (6818). Never use auth/none on a
# machine others can reach: anyone could submit jobs as root.
set -euo pipefail

DIR="${TITANS_SLURM_DIR:-/tmp/titans-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${TITANS_SLURM_CTLD_PORT:-6817}"
D_PORT="${TITANS_SLURM_D_PORT:-6818}"
NODE="localnode"
export SLURM_CONF="$CONF"

die() { echo "local_cluster: $*" >&2; exit 1; }

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root (apt-get)"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    echo "local_cluster: installing slurmctld slurmd slurm-client (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/apt.log" 2>&1 || die "apt-get update failed, see $DIR/apt.log"
    apt-get install -y -qq slurmctld slurmd slurm-client >>"$DIR/apt.log" 2>&1 \
        || die "apt-get install failed, see $DIR/apt.log"
}

# The node as slurmd sees it (CPUs and topology), under our fixed node name and the loopback address.
node_line() {
    local cpus detected
    cpus="$(nproc)"
    detected="$(slurmd -C 2>/dev/null | head -n 1 | sed -e 's/^NodeName=[^ ]* //')"
    if [[ "$detected" == "CPUs=$cpus "* ]]; then
        echo "NodeName=$NODE NodeAddr=127.0.0.1 $detected State=UNKNOWN"
    else  # a cpuset smaller than the machine: trust nproc
        echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
    fi
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF.new" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster (see the script's header).
ClusterName=titans-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
# finished jobs stay visible 10 s: sbatch --wait then polls every 8 s instead of every 32 s
MinJobAge=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$(node_line)
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"  # whole, never half-written under a running client
}

running() {  # running <daemon>: its pid file names a live process
    local pid
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

wait_idle() {  # until the node takes jobs
    local i
    for i in $(seq 1 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not become idle within 30 s (logs above, in $DIR/log)"
}

start() {
    mkdir -p "$DIR"
    install_slurm
    if running slurmctld && running slurmd; then
        echo "local_cluster: already running (config $CONF)"
    else
        stop_daemons quiet
        write_config
        slurmctld -f "$CONF" -i || die "slurmctld did not start, see $DIR/log/slurmctld.log"
        slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start, see $DIR/log/slurmd.log"
    fi
    wait_idle
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true  # a node drained earlier
    echo "local_cluster: up: node $NODE ($(nproc) CPUs), partition local"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local daemon pid
    for daemon in slurmd slurmctld; do
        if running "$daemon"; then
            pid="$(cat "$DIR/$daemon.pid")"
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            [ "${1:-}" = quiet ] || echo "local_cluster: stopped $daemon ($pid)"
        fi
    done
}

status() {
    local daemon ok=0
    for daemon in slurmctld slurmd; do
        if running "$daemon"; then echo "$daemon: running (pid $(cat "$DIR/$daemon.pid"))"
        else echo "$daemon: not running"; ok=1; fi
    done
    [ "$ok" = 0 ] && sinfo -N -l
    echo "export SLURM_CONF=$CONF"
    return "$ok"
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
