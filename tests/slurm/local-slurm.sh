#!/usr/bin/env bash
# A real single-node SLURM for the tests marked `slurm` (and for trying the recipes of
# deploy/slurm/ on one machine). Everything lives under one folder; the daemons are stopped by
# their PIDs. Needs root (slurmd) and Debian's slurm-wlm + munge (installed when missing).
#
#   tests/slurm/local-slurm.sh start DIR   # prints `export SLURM_CONF=...`; sinfo works after it
#   tests/slurm/local-slurm.sh stop DIR
#
# Facts this follows: ../shared/GUIDE.md §4 (SLURM 22.05 on Debian bookworm).
set -euo pipefail
cmd=${1:?usage: local-slurm.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: local-slurm.sh start|stop DIR}")

stop() {
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: local-slurm.sh start|stop DIR" >&2; exit 2; }

if [ "$(id -u)" != 0 ]; then
    echo "local-slurm: not root: slurmd needs root; the slurm tests will skip" >&2; exit 3
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "local-slurm: installing slurm-wlm and munge from Debian's packages" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge) >"$dir.apt.log" 2>&1 || { echo "local-slurm: apt-get failed, see $dir.apt.log" >&2; exit 3; }
fi

mkdir -p "$dir"/{spool,state,log,munge,munge-key}
stop
# munge: a key of our own, a socket of our own
# (munged wants its key private and its socket's folder open to all)
key=$dir/munge-key/munge.key
if [ ! -s "$key" ]; then
    if [ -s /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$key"
    else dd if=/dev/urandom bs=1 count=1024 of="$key" 2>/dev/null; fi
    chmod 0400 "$key"
fi
chmod 0700 "$dir/munge-key"
chmod 0755 "$dir" "$dir/munge"
munged -F --key-file="$key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
    >/dev/null 2>&1 &
echo $! >"$dir/munged.pid"
for _ in $(seq 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
if [ ! -S "$dir/munge/munge.socket" ]; then
    echo "local-slurm: munged did not start; see $dir/log/munged.log" >&2; stop; exit 3
fi

host=$(hostname -s)
# ports of our own (free now), so that a second SLURM on this machine does not collide
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port=${SLURMCTLD_PORT:-$(free_port)}
slurmd_port=${SLURMD_PORT:-$(free_port)}
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat >"$dir/slurm.conf" <<CONF
ClusterName=scatacdist
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid.d
SlurmdPidFile=$dir/slurmd.pid.d
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -D -i -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
echo $! >"$dir/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
echo $! >"$dir/slurmd.pid"
for _ in $(seq 60); do
    if timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
    sleep 0.5
done
echo "local-slurm: the node did not come up; logs in $dir/log" >&2
sinfo >&2 || true
stop
exit 3
