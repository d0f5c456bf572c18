#!/usr/bin/env bash
# Install (Debian) and start a single-node Slurm cluster with accounting on this machine.
#
#   sudo bash slurm/single_node_cluster.sh          # install if needed, start, wait until idle
#
# For tests and CI only: one node, one partition `debug`, slurmdbd on a local MariaDB so that
# `sacct` works (submitit needs it to see failed jobs; without it a client waits forever).
# Idempotent: daemons that already answer are reused, config files are rewritten only when
# they differ. Needs root.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "single_node_cluster.sh: needs root (it installs packages and starts daemons)" >&2
  exit 1
fi

log() { echo "[slurm-setup] $*"; }

packages=(slurm-wlm munge slurmdbd mariadb-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# Write $2 to $1 only when it differs; echo 1 when it changed.
write_if_changed() {
  local path=$1 content=$2
  if [ ! -f "$path" ] || [ "$(cat "$path")" != "$content" ]; then
    printf '%s\n' "$content" >"$path"
    echo 1
  fi
}

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm

slurm_conf="ClusterName=ci
SlurmctldHost=${host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmUser=root
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MaxArraySize=10001
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
JobAcctGatherType=jobacct_gather/linux
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP"

dbd_conf="AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-ci
StorageLoc=slurm_acct_db
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log"

conf_changed=$(write_if_changed /etc/slurm/slurm.conf "$slurm_conf")
dbd_changed=$(write_if_changed /etc/slurm/slurmdbd.conf "$dbd_conf")
chmod 600 /etc/slurm/slurmdbd.conf

# munge
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c "/usr/sbin/munged"
  for _ in $(seq 30); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null || { echo "munge does not answer" >&2; exit 1; }

# MariaDB for slurmdbd
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if ! mysqladmin ping >/dev/null 2>&1; then
  log "starting mariadb"
  (setsid mysqld_safe --user=mysql >/var/log/slurm/mysqld_safe.log 2>&1 &)
  for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
mysqladmin ping >/dev/null 2>&1 || { echo "mariadb did not start (see /var/log/slurm/mysqld_safe.log)" >&2; exit 1; }
mysql -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-ci';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# Restart a daemon when its config changed, start it when it is not running.
running() { pgrep -x "$1" >/dev/null; }
if [ -n "$dbd_changed" ] && running slurmdbd; then pkill -x slurmdbd; sleep 1; fi
if ! running slurmdbd; then
  log "starting slurmdbd"
  slurmdbd
  for _ in $(seq 40); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
fi
if [ -n "$conf_changed" ]; then
  pkill -x slurmctld || true
  pkill -x slurmd || true
  sleep 1
fi
if ! running slurmctld; then log "starting slurmctld"; slurmctld; fi
if ! running slurmd; then log "starting slurmd"; slurmd; fi

for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$state" in idle|mix|alloc) break ;; esac
  sleep 0.5
done
case "$state" in
  idle|mix|alloc) ;;
  *) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true; sleep 1
     state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true) ;;
esac
sacctmgr -i add cluster ci >/dev/null 2>&1 || true
sacct -n >/dev/null || { echo "sacct does not answer: accounting is not working" >&2; exit 1; }
log "node ${host} is ${state:-unknown}; partition debug; accounting on"
