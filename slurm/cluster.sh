#!/usr/bin/env bash
# A two-node SLURM on localhost for trying slurm/submit.py and slurm/train.sbatch (and for
# tests/test_slurm.py): munged + slurmctld + one slurmd per node (`slurmd -N n1`, `slurmd -N n2`),
# started by hand (no systemd needed).
#
#   slurm/cluster.sh start    # install if missing, configure, start, wait for an idle node
#   eval "$(slurm/cluster.sh env)"   # or copy the `export SLURM_CONF=...` line that start prints
#   slurm/cluster.sh status
#   slurm/cluster.sh stop     # cancels jobs, waits for the queue to drain, then slurmd, slurmctld, munged
#
# Everything SLURM writes (config, state, spool, logs, pid files) lives in $SLURM_DIR
# (default /tmp/resnet-slurm). The config is tuned for tests: a requeued job comes back in
# seconds (cred_expire=5, a 2 s scheduler interval) and KillWait=5 (submitit ignores SIGTERM, so
# the default 30 s would be spent on every cancel or requeue of a multi-task job).
#
# The nodes: n1 and n2, two slurmd daemons on this one host (NodeAddr=127.0.0.1, a port each;
# ../shared/SLURM.md), so `--nodes=2` jobs run one task per "node" here, as on a real cluster.
# Each node declares all of the host's CPUs (what `slurmd -C` reports), not half: a 2-task job
# on one node (`--nodes=1 --ntasks-per-node=2` on a 2-CPU host) must still fit. The price is that
# SLURM may run one job on each node at once, i.e. up to twice as many tasks as the host has CPUs
# (the tests run one job at a time; a sweep's --array-parallelism limits its tasks).
# Must run as root (installs packages, writes /etc/munge and /etc/hosts).
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/resnet-slurm}
CONF=$SLURM_DIR/slurm.conf
export SLURM_CONF=$CONF
NODES=(n1 n2)

log() { echo "[cluster] $*" >&2; }

pid_alive() {  # pid file → running?
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2
}

setup_host() {
    local host
    host=$(hostname -s)
    if ! getent hosts "$host" >/dev/null; then
        log "adding $host to /etc/hosts"
        echo "127.0.0.1 $host" >>/etc/hosts
    fi
}

start_munge() {
    mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mungekey -c -k /etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    if pid_alive /run/munge/munged.pid; then
        return
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"
    exit 1
}

node_lines() {  # one NodeName line per node: this host's hardware, its own port, address 127.0.0.1
    local host hw i
    host=$(hostname -s)
    hw=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')  # CPUs=... Boards=... RealMemory=...
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17821 + i)) $hw"
    done
}

write_conf() {
    local host name
    host=$(hostname -s)
    mkdir -p "$SLURM_DIR"/{state,log}
    for name in "${NODES[@]}"; do mkdir -p "$SLURM_DIR/spool$name"; done
    cat >"$CONF.new" <<EOF
# Written by slurm/cluster.sh: two nodes on one host, no cgroups, no accounting, fast requeue.
ClusterName=resnet
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=5
MinJobAge=300
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool%n
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log
SlurmctldPort=17817
SlurmdPort=17818
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then
        rm "$CONF.new"
        return 1  # unchanged
    fi
    mv "$CONF.new" "$CONF"
    return 0
}

wait_idle() {  # every node up (idle, or running jobs)
    local states="" up node state
    for _ in $(seq 150); do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
        up=0
        while read -r node state; do
            case $state in
                idle|mix|alloc|comp) up=$((up + 1)) ;;
                drain*|down*)  # e.g. after an unclean stop; ReturnToService=2 usually fixes it
                    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
            esac
        done <<<"$states"
        ((up == ${#NODES[@]})) && return 0
        sleep 0.2
    done
    log "nodes did not become idle (${states//$'\n'/, }); see $SLURM_DIR/log/"
    exit 1
}

daemon_pid_files() {  # slurmd of every node (and a single-node setup's slurmd.pid), then slurmctld
    local name
    for name in "${NODES[@]}"; do echo "$SLURM_DIR/slurmd-$name.pid"; done
    echo "$SLURM_DIR/slurmd.pid"
    echo "$SLURM_DIR/slurmctld.pid"
}

any_daemon_alive() {
    local pidf
    for pidf in $(daemon_pid_files); do pid_alive "$pidf" && return 0; done
    return 1
}

stop_daemons() {  # the slurmd daemons, then slurmctld, by pid file
    local pidf
    for pidf in $(daemon_pid_files); do
        if pid_alive "$pidf"; then
            kill "$(cat "$pidf")"
            for _ in $(seq 100); do pid_alive "$pidf" || break; sleep 0.1; done
            if pid_alive "$pidf"; then kill -9 "$(cat "$pidf")" 2>/dev/null || true; fi
        fi
        rm -f "$pidf"
    done
}

cmd_start() {
    install
    setup_host
    start_munge
    local changed=0 name
    write_conf && changed=1
    if ((changed)); then
        if any_daemon_alive; then
            log "slurm.conf changed: restarting the daemons"
            stop_daemons
        fi
        rm -rf "${SLURM_DIR:?}/state"/*  # the controller's saved nodes and jobs belong to the old config
    fi
    pid_alive "$SLURM_DIR/slurmctld.pid" || slurmctld -f "$CONF" >&2
    for name in "${NODES[@]}"; do
        pid_alive "$SLURM_DIR/slurmd-$name.pid" || slurmd -f "$CONF" -N "$name" >&2
    done
    wait_idle
    log "up: $(sinfo -h -o '%P %D node(s) %N %t, %c CPUs each' | head -n1)"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    if pid_alive "$SLURM_DIR/slurmctld.pid"; then
        # jobs first: stopping munged or slurmd under a running job can leave a hung slurmstepd
        scancel --user="$(id -un)" >/dev/null 2>&1 || true
        for _ in $(seq 300); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop_daemons
    if pid_alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)"
        for _ in $(seq 50); do pid_alive /run/munge/munged.pid || break; sleep 0.1; done
    fi
    log "stopped"
}

cmd_status() {
    local rc=0 name pidf
    for name in slurmctld "${NODES[@]/#/slurmd-}"; do  # slurmctld slurmd-n1 slurmd-n2
        pidf=$SLURM_DIR/$name.pid
        if pid_alive "$pidf"; then echo "$name: running (pid $(cat "$pidf"))"
        else echo "$name: stopped"; rc=1; fi
    done
    if pid_alive /run/munge/munged.pid; then echo "munged: running (pid $(cat /run/munge/munged.pid))"
    else echo "munged: stopped"; rc=1; fi
    if ((rc == 0)); then
        sinfo 2>/dev/null || true
        squeue 2>/dev/null || true
    fi
    echo "export SLURM_CONF=$CONF"
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
