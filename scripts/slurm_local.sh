#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian's SLURM 22.05) with everything under one directory.
#
#   scripts/slurm_local.sh start DIR    # munged, MariaDB + slurmdbd (accounting), slurmctld, slurmd
#   scripts/slurm_local.sh status DIR   # daemons up/down, sinfo, squeue
#   scripts/slurm_local.sh stop DIR     # cancel jobs, wait for their steps, stop every daemon (idempotent)
#
# `start` prints one line on stdout, `export SLURM_CONF=DIR/slurm.conf` (also written to DIR/env.sh), so
# `eval "$(scripts/slurm_local.sh start /tmp/slurm)"` works; progress and errors go to stderr. It returns
# once the node is idle, or fails naming the log of the daemon that did not come up (and stops the rest).
# Needs root and the packages of `make setup` (slurmctld slurmd slurm-client munge slurmdbd mariadb-server).
#
# Ports are picked free (below the kernel's ephemeral range) on every start, so two clusters, or a
# leftover one, never clash. Nothing is written outside DIR. Environment knobs:
#   SLURM_LOCAL_ACCOUNTING=0   no MariaDB/slurmdbd (faster start; then `sacct` fails and submitit's
#                              job.state reads UNKNOWN once a job left the queue)
#   SLURM_LOCAL_TIMEOUT=60     seconds each daemon (and the idle node) may take to come up
#   SLURM_LOCAL_KILLWAIT=10    slurm.conf KillWait: seconds between SIGTERM and SIGKILL of a cancelled job
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
if [ "$cmd" = start ]; then mkdir -p "$2"; fi
if [ ! -d "$2" ]; then
  [ "$cmd" = start ] && { echo "[slurm_local] ERROR: cannot create directory $2" >&2; exit 1; }
  echo "[slurm_local] no cluster in $2 (no such directory)" >&2
  [ "$cmd" = stop ] && exit 0 || exit 1
fi
DIR=$(cd "$2" && pwd -P)

ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
KILLWAIT=${SLURM_LOCAL_KILLWAIT:-10}
CLUSTER=unfused
CONF=$DIR/slurm.conf
DBDCONF=$DIR/slurmdbd.conf
MYCNF=$DIR/mysql/my.cnf
MUNGE_SOCKET=$DIR/munge/munge.socket
MYSQL_SOCKET=$DIR/mysql/mysqld.sock
DAEMONS="munged mariadbd slurmdbd slurmctld slurmd"   # start order; stop runs the reverse

log() { echo "[slurm_local] $*" >&2; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }
pidfile() { echo "$DIR/run/$1.pid"; }
logfile() {
  case $1 in
    munged) echo "$DIR/log/munged.log" ;;
    mariadbd) echo "$DIR/log/mariadb.err" ;;
    *) echo "$DIR/log/$1.log" ;;
  esac
}
# pid of a daemon if its pid file names a live process of that program
alive_pid() {
  local f pid comm
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  # a zombie (exited, not yet reaped by init) is not running
  [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || return 1
  case $comm in "$1"|"${1:0:15}"|mysqld) echo "$pid"; return 0 ;; esac
  return 1
}
export SLURM_CONF=$CONF

# --------------------------------------------------------------------------------------------- stop
# Processes that belong to this cluster: daemons whose command line, environment (SLURM_LOCAL_DIR,
# set when we start them) or open files point into DIR (slurmstepd: its step socket and log), and
# everything below a slurmstepd (the job's tasks). Never this script or its ancestors.
cluster_pids() {
  python3 - "$DIR" "$$" <<'EOF'
import os, sys
d, me = sys.argv[1].rstrip("/") + "/", int(sys.argv[2])
names = {"munged", "mariadbd", "mysqld", "slurmdbd", "slurmctld", "slurmd", "slurmstepd"}
mark = ("SLURM_LOCAL_DIR=" + d[:-1]).encode()
skip, p = set(), me
while p > 1:  # ancestors (the caller, e.g. pytest, may hold files in DIR)
    skip.add(p)
    try:
        p = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
    except Exception:
        break
skip.add(os.getpid())
procs = {}
for e in os.listdir("/proc"):
    if not e.isdigit():
        continue
    pid = int(e)
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except Exception:
        continue
    procs[pid] = (comm, ppid)
# unix sockets bound under DIR (munge, mariadb, slurmstepd's step sockets in the spool): their inodes
socks = set()
try:
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7].startswith(d):
            socks.add(f"socket:[{f[6]}]")
except OSError:
    pass
hits = set()
for pid, (comm, _) in procs.items():
    if pid in skip or comm not in names:
        continue
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except Exception:
        continue
    ours = d in cmdline + " " or mark in env
    if not ours:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            ours = any(x.startswith(d) or x in socks for x in links)
        except Exception:
            pass
    if ours:
        hits.add(pid)
# descendants of our slurmstepds (job tasks left behind)
steps = {p for p in hits if procs[p][0] == "slurmstepd"}
changed = True
while changed:
    changed = False
    for pid, (_, ppid) in procs.items():
        if ppid in steps and pid not in steps and pid not in skip:
            steps.add(pid); hits.add(pid); changed = True
for pid in sorted(hits):
    print(pid, procs[pid][0])
EOF
}

stop_pid() {  # name pid: SIGTERM, then SIGKILL after a timeout
  local name=$1 pid=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || return 0
    [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" = Z ] && return 0  # exited
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

cancel_jobs() {
  local ids i
  alive_pid slurmctld >/dev/null || return 0
  ids=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
  [ -n "${ids// /}" ] || return 0
  log "cancelling jobs: $ids"
  timeout 10 scancel $ids 2>/dev/null || true
  if ! alive_pid slurmd >/dev/null; then
    log "slurmd is not running: its job steps cannot end through SLURM (they are killed below)"
    return 0
  fi
  # A job leaves squeue once every step ended (COMPLETING -> gone): SIGTERM, KillWait, SIGKILL.
  for i in $(seq 1 $(( (KILLWAIT + 30) * 5 ))); do
    [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.2
  done
  log "jobs still in the queue after $((KILLWAIT + 30)) s: $(timeout 10 squeue -h -o '%i %T' | tr '\n' ' ')"
}

do_stop() {
  local name pid left
  cancel_jobs
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    if pid=$(alive_pid "$name"); then stop_pid "$name" "$pid"; fi
    rm -f "$(pidfile "$name")"
  done
  left=$(cluster_pids)
  if [ -n "$left" ]; then
    log "left-over processes of $DIR, killing: $(echo "$left" | tr '\n' ' ')"
    echo "$left" | awk '{print $1}' | xargs -r kill -KILL 2>/dev/null || true
    for _ in $(seq 1 50); do left=$(cluster_pids); [ -z "$left" ] && break; sleep 0.1; done
    [ -z "$left" ] || die "processes of $DIR survived SIGKILL: $(echo "$left" | tr '\n' ' ')"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MYSQL_SOCKET"
}

# -------------------------------------------------------------------------------------------- start
free_ports() {  # N distinct ports, free on every address, outside the kernel's ephemeral range
  python3 - "$1" <<'EOF'
import random, socket, sys
lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
lo_, hi_ = (10000, lo - 1) if lo > 12000 else (hi + 1, 65535)
held, out, rng = [], [], random.SystemRandom()
while len(out) < int(sys.argv[1]):
    port = rng.randint(lo_, hi_)
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    out.append(port)
print(" ".join(map(str, out)))
EOF
}

launch() {  # name cmd...: in the foreground of its own session; our pid file; output to DIR/log/NAME.out
  local name=$1; shift
  SLURM_LOCAL_DIR=$DIR setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$(pidfile "$name")"
}

fail_start() {  # name reason
  local name=$1 lf
  lf=$(logfile "$name")
  {
    echo "[slurm_local] ERROR: $name $2; see $lf (and $DIR/log/$name.out). Last lines:"
    tail -n 15 "$lf" 2>/dev/null | sed 's/^/    /'  || true
    tail -n 5 "$DIR/log/$name.out" 2>/dev/null | sed 's/^/    /' || true
  } >&2
  do_stop || true
  exit 1
}

wait_up() {  # name description cmd...: poll cmd until it succeeds, the daemon dies, or TIMEOUT
  local name=$1 what=$2 deadline; shift 2
  deadline=$(( $(date +%s) + TIMEOUT ))
  while ! "$@" >/dev/null 2>&1; do
    alive_pid "$name" >/dev/null || { sleep 0.3; alive_pid "$name" >/dev/null || fail_start "$name" "exited during start-up"; }
    [ "$(date +%s)" -lt "$deadline" ] || fail_start "$name" "did not come up ($what) within ${TIMEOUT} s"
    sleep 0.2
  done
}

PHASES=""; _phase_t=0
phase() {  # record how long the step since the previous call took: phase NAME
  local now; now=$(date +%s%N)
  [ "$_phase_t" = 0 ] || PHASES="$PHASES $1 $(( (now - _phase_t) / 100000000 ))"
  _phase_t=$now
}
node_idle() { [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ]; }

check_prereqs() {
  [ "$(id -u)" = 0 ] || die "needs root (SlurmUser=root, as on this machine); run as root"
  local missing="" b
  for b in munged munge slurmctld slurmd sinfo sbatch scontrol squeue scancel python3; do
    command -v "$b" >/dev/null || missing="$missing $b"
  done
  if [ "$ACCOUNTING" = 1 ]; then
    for b in slurmdbd sacct sacctmgr mariadbd mariadb-install-db mariadb-admin; do
      command -v "$b" >/dev/null || missing="$missing $b"
    done
  fi
  [ -z "$missing" ] || die "missing programs:$missing. Run \`make setup\` (installs slurmctld slurmd slurm-client munge slurmdbd mariadb-server)"
  # unix sockets (munge, mariadb, slurmd's step sockets) must fit in sun_path (108 bytes)
  [ ${#DIR} -le 70 ] || die "DIR path is too long for unix sockets (${#DIR} > 70 chars): $DIR"
}

write_configs() {
  local ctld_port=$1 slurmd_port=$2 dbd_port=$3 db_port=$4 host cpus mem acct=""
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh start $DIR (rewritten on every start: ports are picked anew).
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$(logfile slurmctld)
SlurmdLogFile=$(logfile slurmd)
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=$KILLWAIT
InactiveLimit=0
MinJobAge=300
MailProg=/bin/true
PlugStackConfig=$DIR/plugstack.conf
$acct
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  : >"$DIR/plugstack.conf"   # not the system's /etc/slurm/plugstack.conf
  if [ "$ACCOUNTING" = 1 ]; then
    (umask 077; cat >"$DBDCONF" <<EOF
# Written by scripts/slurm_local.sh start $DIR
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$(logfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$(cat "$DIR/mysql/slurm.pw")
StorageLoc=slurm_acct_db
EOF
    )
    cat >"$MYCNF" <<EOF
# Written by scripts/slurm_local.sh start $DIR
[mysqld]
user=root
datadir=$DIR/mysql/data
socket=$MYSQL_SOCKET
port=$db_port
bind-address=127.0.0.1
pid-file=$(pidfile mariadbd)
log-error=$(logfile mariadbd)
init-file=$DIR/mysql/init.sql
skip-name-resolve
skip-log-bin
performance_schema=OFF
innodb_buffer_pool_size=128M
innodb_log_file_size=16M
innodb_autoextend_increment=8
innodb_lock_wait_timeout=900
innodb_flush_log_at_trx_commit=2
innodb_doublewrite=0
innodb_use_native_aio=0
max_connections=100
EOF
  fi
}

do_start() {
  local name up=0 down=0 t0 ctld_port slurmd_port dbd_port db_port
  check_prereqs
  for name in $DAEMONS; do
    if [ "$ACCOUNTING" != 1 ] && { [ "$name" = mariadbd ] || [ "$name" = slurmdbd ]; }; then continue; fi
    if alive_pid "$name" >/dev/null; then up=$((up + 1)); else down=$((down + 1)); fi
  done
  if [ "$up" -gt 0 ] && [ "$down" -eq 0 ] && node_idle; then
    log "already running in $DIR"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  [ "$up" -eq 0 ] || die "a cluster is partly running in $DIR; run \`$0 stop $DIR\` first"
  t0=$(date +%s.%N)
  phase start
  trap 'log "interrupted: stopping what was started"; do_stop || true; exit 130' INT TERM HUP
  mkdir -p "$DIR"/{munge,state,spool/slurmd,log,run}
  chmod 0755 "$DIR/munge"
  # the cluster's own munge key (kept across restarts of the same DIR)
  [ -s "$DIR/munge/munge.key" ] || (umask 077; head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
  chmod 0600 "$DIR/munge/munge.key"
  read -r ctld_port slurmd_port dbd_port db_port < <(free_ports 4)
  if [ "$ACCOUNTING" = 1 ]; then
    mkdir -p "$DIR/mysql"
    [ -s "$DIR/mysql/slurm.pw" ] || (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/mysql/slurm.pw")
    (umask 077; cat >"$DIR/mysql/init.sql" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/mysql/slurm.pw")';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
    )
  fi
  write_configs "$ctld_port" "$slurmd_port" "$dbd_port" "$db_port"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"

  launch munged munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$(pidfile munged)" --log-file="$(logfile munged)" --seed-file="$DIR/munge/munged.seed"
  wait_up munged "credential round trip" bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
  phase munged

  if [ "$ACCOUNTING" = 1 ]; then
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
      rm -rf "$DIR/mysql/data"
      mariadb-install-db --defaults-file="$MYCNF" --skip-test-db --auth-root-authentication-method=socket \
        >"$DIR/log/mariadb-install-db.out" 2>&1 \
        || { do_stop; die "mariadb-install-db failed; see $DIR/log/mariadb-install-db.out"; }
      phase mariadb-install-db
    fi
    rm -f "$MYSQL_SOCKET"
    launch mariadbd mariadbd --defaults-file="$MYCNF"
    wait_up mariadbd "ping on $MYSQL_SOCKET" \
      mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" --user=root --connect-timeout=2 ping
    phase mariadbd
    launch slurmdbd slurmdbd -D   # reads slurmdbd.conf next to $SLURM_CONF
    # slurmdbd creates its tables on a first start, then listens
    wait_up slurmdbd "sacctmgr answer on 127.0.0.1:$dbd_port" timeout 10 sacctmgr -n -P list cluster format=cluster
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
      sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || fail_start slurmdbd "refused \`sacctmgr add cluster $CLUSTER\`"
    fi
    phase slurmdbd
  fi

  launch slurmctld slurmctld -D -f "$CONF"
  wait_up slurmctld "scontrol ping" bash -c "timeout 5 scontrol ping | grep -q UP"
  phase slurmctld
  launch slurmd slurmd -D -f "$CONF" -N "$(hostname -s)"
  wait_up slurmd "node idle in sinfo" node_idle
  phase slurmd

  trap - INT TERM HUP
  echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
  log "up in $(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 1))") s: $DIR (slurmctld :$ctld_port," \
    "slurmd :$slurmd_port$( [ "$ACCOUNTING" = 1 ] && echo ", slurmdbd :$dbd_port, mariadb :$db_port"))"
  log "seconds per step:$(echo "$PHASES" | awk '{for (i = 1; i < NF; i += 2) printf " %s %.1f", $i, $(i+1) / 10}')"
  echo "export SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------------------------------- status
do_status() {
  local name pid rc=0
  for name in $DAEMONS; do
    if pid=$(alive_pid "$name"); then
      echo "$name: up (pid $pid)"
    elif [ "$name" = mariadbd ] || [ "$name" = slurmdbd ]; then
      if grep -q accounting_storage/slurmdbd "$CONF" 2>/dev/null; then echo "$name: down"; rc=1; else echo "$name: not configured"; fi
    else
      echo "$name: down"; rc=1
    fi
  done
  if alive_pid slurmctld >/dev/null; then
    timeout 10 sinfo || true
    timeout 10 squeue || true
  fi
  return $rc
}

case $cmd in
  start) do_start ;;
  stop) do_stop; log "stopped: $DIR" ;;
  status) do_status ;;
  *) usage ;;
esac
