#!/usr/bin/env bash
# A one-node slurm cluster on localhost, for the tests of launch/slurm/*.sbatch.
#   bash tests/slurm/local_slurm.sh start DIR   # install if missing, configure, start, wait until idle
#   bash tests/slurm/local_slurm.sh stop DIR    # stop what `start DIR` started (by pid)
# After `start`, use the cluster with `export SLURM_CONF=DIR/slurm.conf`.
#
# Everything lives under DIR (config, state, spool, logs, pids, munge socket), with ports chosen free, so
# it never touches a system slurm or munge. Installs Debian's slurm-wlm and munge with apt-get when the
# daemons are missing (needs root). Runs as root (SlurmUser=root) with proctrack/linuxproc and task/none:
# no cgroups, so it works in containers. Short credential lifetime and scheduler intervals, so that a
# requeued job starts again within seconds (slurm's defaults hold it back for about two minutes).
set -euo pipefail

cmd="${1:?usage: local_slurm.sh start|stop DIR}"
dir="$(mkdir -p "${2:?usage: local_slurm.sh start|stop DIR}" && cd "$2" && pwd)"
conf="$dir/slurm.conf"

log() { echo "[local-slurm] $*" >&2; }

install_if_missing() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) -eq 0 ]] || { log "slurm-wlm/munge missing and not root: cannot install"; exit 3; }
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$dir/apt.log" 2>&1
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$dir/apt.log" 2>&1 \
    || { log "apt-get install failed, see $dir/apt.log"; exit 3; }
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local host cpus mem_mb
  host="$(hostname -s)"
  cpus="$(nproc --all)"  # not nproc: it obeys OMP_NUM_THREADS
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
  cat >"$conf" <<EOF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MinJobAge=120
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  local i
  for i in $(seq 1 60); do
    if [[ "$(SLURM_CONF="$conf" sinfo -h -o %T 2>/dev/null)" == idle* ]]; then
      log "node idle after ${i}s ($(SLURM_CONF="$conf" sinfo --version), conf $conf)"
      return
    fi
    sleep 1
  done
  log "node not idle after 60 s; last lines of the logs:"
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  exit 4
}

start() {
  install_if_missing
  write_conf
  munged --force --socket="$dir/run/munge.socket" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/run/munge.seed"
  SLURM_CONF="$conf" slurmctld -f "$conf"
  SLURM_CONF="$conf" slurmd -f "$conf"
  wait_idle
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    [[ -f "$dir/run/$name.pid" ]] || continue
    pid="$(cat "$dir/run/$name.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/run/$name.pid"
  done
  log "stopped ($dir)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: local_slurm.sh start|stop DIR" >&2; exit 2 ;;
esac
