#!/bin/bash
# A real single-machine Slurm (Debian's slurmctld + slurmd + munge) for trying the templates and for
# the tests: N fake nodes on this host, optionally with fake GPUs.
#
#   slurm/local_cluster.sh start [--nodes N] [--cpus C] [--gpus G] [--partition NAME]
#   slurm/local_cluster.sh stop
#   slurm/local_cluster.sh status
#
# start installs the Debian packages when missing (root), writes slurm.conf under $LOCAL_SLURM_DIR
# (default /tmp/llama-local-slurm), starts munged (if not already running), slurmctld and one
# `slurmd -N nodeI` per node, and waits until every node is idle. Fake nodes all run on 127.0.0.1
# and are named node1..nodeN (added to /etc/hosts between marker lines, so job scripts can resolve
# them). Fake GPUs are character devices (major 195, like /dev/nvidiaN) under the state dir; jobs
# asking for --gres=gpu:G get CUDA_VISIBLE_DEVICES. stop kills only the daemons whose pids start
# recorded, and removes the /etc/hosts block. start on a running cluster restarts it.
set -euo pipefail

STATE_DIR=${LOCAL_SLURM_DIR:-/tmp/llama-local-slurm}
CONF_DIR=$STATE_DIR/etc
PIDS=$STATE_DIR/pids
HOSTS_BEGIN="# BEGIN llama local slurm"
HOSTS_END="# END llama local slurm"
SLURMD_PORT_BASE=17000

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

usage() { sed -n '5,7p' "$0" | sed 's/^# *//' >&2; exit 2; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed; run as root to install Debian's slurmctld slurmd slurm-client munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null || {
        apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; }
}

start_munge() {
    # One munged per machine; reuse a running one (it may serve other software too).
    if munge -n </dev/null >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall the munge package)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    su -s /bin/sh munge -c "/usr/sbin/munged" || die "munged did not start"
    # Only record it when we started it: stop must not kill a munged it did not start.
    sleep 0.2
    pgrep -u munge -x munged | head -n 1 | sed 's/^/munged /' >>"$PIDS"
}

write_conf() {
    local nodes=$1 cpus=$2 gpus=$3 partition=$4 mem_mb
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
    local gres_line="" gres_types=""
    if [ "$gpus" -gt 0 ]; then
        gres_line=" Gres=gpu:$gpus"
        gres_types="GresTypes=gpu"
        mkdir -p "$STATE_DIR/dev"
        local i
        for ((i = 0; i < gpus; i++)); do
            [ -c "$STATE_DIR/dev/nvidia$i" ] || mknod "$STATE_DIR/dev/nvidia$i" c 195 "$i"
        done
        echo "NodeName=node[1-$nodes] Name=gpu File=$STATE_DIR/dev/nvidia[0-$((gpus - 1))]" >"$CONF_DIR/gres.conf"
    else
        : >"$CONF_DIR/gres.conf"
    fi
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: $nodes fake node(s) on this machine.
ClusterName=llama-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
MinJobAge=600
ReturnToService=2
SlurmdTimeout=300
KillWait=10
$gres_types
NodeName=node[1-$nodes] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((SLURMD_PORT_BASE + 1))-$((SLURMD_PORT_BASE + nodes))] CPUs=$cpus RealMemory=$mem_mb$gres_line State=UNKNOWN
PartitionName=$partition Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP
EOF
    # sbatch/srun/scontrol find the config through /etc/slurm; keep a user's own config aside.
    mkdir -p /etc/slurm
    if [ -e /etc/slurm/slurm.conf ] && ! grep -q "Written by slurm/local_cluster.sh" /etc/slurm/slurm.conf; then
        die "/etc/slurm/slurm.conf exists and was not written by this script; not touching it"
    fi
    cp "$CONF_DIR/slurm.conf" /etc/slurm/slurm.conf
    cp "$CONF_DIR/gres.conf" /etc/slurm/gres.conf
}

add_hosts() {
    local nodes=$1 i
    remove_hosts
    {
        echo "$HOSTS_BEGIN"
        for ((i = 1; i <= nodes; i++)); do echo "127.0.0.1 node$i"; done
        echo "$HOSTS_END"
    } >>/etc/hosts
}

remove_hosts() {
    # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace it.
    if grep -q "^$HOSTS_BEGIN" /etc/hosts; then
        local kept
        kept=$(sed "/^$HOSTS_BEGIN/,/^$HOSTS_END/d" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

stop() {
    if [ -f "$PIDS" ]; then
        local name pid
        while read -r name pid; do
            [ "$name" = munged ] && continue
            kill "$pid" 2>/dev/null || true
        done <"$PIDS"
        # slurmd leaves its job steps' slurmstepd running; they exit with their jobs.
        sleep 1
        while read -r name pid; do
            if [ "$name" = munged ]; then kill "$pid" 2>/dev/null || true; continue; fi
            kill -9 "$pid" 2>/dev/null || true
        done <"$PIDS"
        rm -f "$PIDS"
    fi
    remove_hosts
}

wait_idle() {
    local nodes=$1 deadline=$((SECONDS + 60)) idle
    while [ $SECONDS -lt $deadline ]; do
        idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
        [ "$idle" -ge "$nodes" ] && return 0
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes did not become idle in 60 s; logs in $STATE_DIR/log"
}

start() {
    local nodes=1 cpus gpus=0 partition=local
    cpus=$(nproc)
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) nodes=$2; shift 2 ;;
            --cpus) cpus=$2; shift 2 ;;
            --gpus) gpus=$2; shift 2 ;;
            --partition) partition=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]*$ && $cpus =~ ^[1-9][0-9]*$ && $gpus =~ ^[0-9]+$ ]] \
        || die "--nodes, --cpus must be positive integers and --gpus >= 0"
    install_packages
    stop
    rm -rf "$STATE_DIR/state" "$STATE_DIR/spool"
    mkdir -p "$CONF_DIR" "$STATE_DIR/state" "$STATE_DIR/log" "$STATE_DIR/spool"
    : >"$PIDS"
    start_munge
    write_conf "$nodes" "$cpus" "$gpus" "$partition"
    add_hosts "$nodes"
    slurmctld -c -f "$CONF_DIR/slurm.conf" || die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log"
    local i
    for ((i = 0; i < 50; i++)); do [ -s "$STATE_DIR/slurmctld.pid" ] && break; sleep 0.1; done
    echo "slurmctld $(cat "$STATE_DIR/slurmctld.pid")" >>"$PIDS"
    for ((i = 1; i <= nodes; i++)); do
        mkdir -p "$STATE_DIR/spool/node$i"
        slurmd -N "node$i" -f "$CONF_DIR/slurm.conf" || die "slurmd node$i did not start; see $STATE_DIR/log"
    done
    for ((i = 1; i <= nodes; i++)); do
        local f=$STATE_DIR/slurmd.node$i.pid n
        for ((n = 0; n < 100; n++)); do [ -s "$f" ] && break; sleep 0.1; done
        echo "slurmd $(cat "$f")" >>"$PIDS"
    done
    wait_idle "$nodes"
    echo "local Slurm up: $nodes node(s) x $cpus CPUs, $gpus fake GPU(s) each, partition '$partition'; state in $STATE_DIR"
}

status() {
    [ -f "$PIDS" ] || { echo "not running (no $PIDS)"; return 1; }
    local name pid alive=0 dead=0
    while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then alive=$((alive + 1)); else dead=$((dead + 1)); echo "$name $pid is gone"; fi
    done <"$PIDS"
    echo "$alive daemon(s) running, $dead gone"
    sinfo
    [ "$dead" -eq 0 ]
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop; echo "local Slurm stopped" ;;
    status) status ;;
    *) usage ;;
esac
