#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for trying and testing `hydra/launcher=slurm`.
#
#   sudo bash scripts/slurm_local.sh start    # install Debian packages if missing, start the daemons
#   source /tmp/automodel-slurm/env.sh        # SLURM_CONF for sbatch, squeue, sacct and submitit
#   sudo bash scripts/slurm_local.sh stop     # cancel jobs, stop only the daemons this script started
#   (a start forgets the jobs of any earlier lifetime: slurmctld -c)
#   bash scripts/slurm_local.sh status        # exit 0 when the cluster answers and the node is usable
#
# Why accounting: submitit asks `sacct` for the state of finished jobs; without slurmdbd it cannot tell
# a cancelled job from a running one and waits forever. So MariaDB + slurmdbd come up too.
# Why no systemd/cgroups: containers and CI machines have neither; linuxproc tracking and no task
# plugin are enough for one node. Everything (config, state, logs, database) lives under
# AUTOMODEL_SLURM_DIR; the ports are not SLURM's defaults, so a cluster started by other means is left
# alone. Both commands are idempotent. Needs root and Debian/Ubuntu (apt-get).
set -euo pipefail

DIR=${AUTOMODEL_SLURM_DIR:-/tmp/automodel-slurm}
WAIT_S=${AUTOMODEL_SLURM_WAIT_S:-90}
CLUSTER=automodel
CTLD_PORT=6917 SLURMD_PORT=6918 DBD_PORT=6919 DB_PORT=3317
ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log
export SLURM_CONF=$ETC/slurm.conf
# jobs inherit the submitter's environment: a PATH that reaches the SLURM tools must be in it
export PATH="${PATH:+$PATH:}/usr/sbin:/usr/bin:/sbin:/bin"

say() { echo "slurm_local: $*" >&2; }
fail() {
  say "error: $*"
  # what SLURM itself says: jobs and why they wait, nodes and why they are down
  { squeue -h -o '%i %T %r' && sinfo -h -N -o '%N %t %E'; } 2>/dev/null | sed 's/^/slurm_local: /' >&2 || true
  for f in "$LOG"/*.log; do [ -f "$f" ] && { echo "--- last lines of $f" >&2; tail -n 5 "$f" >&2; }; done
  exit 1
}
running() { # running PIDFILE: a live, non-zombie process is recorded there
  local pid state
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] || return 1
  state=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}
wait_until() { # wait_until WHAT COMMAND...: retry for WAIT_S seconds
  local what=$1 deadline=$((SECONDS + WAIT_S))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "no $what after ${WAIT_S}s"
    sleep 0.3
  done
}
terminate() { # terminate NAME PIDFILE: SIGTERM what the pid file names, SIGKILL after 15 s
  local pid i
  running "$2" || { rm -f "$2"; return 0; }
  pid=$(cat "$2")
  say "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 75; i++)); do running "$2" || break; sleep 0.2; done
  running "$2" && kill -KILL "$pid" 2>/dev/null
  rm -f "$2"
}

install_packages() {
  local wanted=(munge slurm-client slurmctld slurmd slurmdbd slurm-wlm-mysql-plugin mariadb-server) missing=() p
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # bounded: an unreachable mirror must fail (and let the tests skip), not hang
  local apt=(timeout 240 apt-get -o Acquire::Retries=1 -o Acquire::http::Timeout=20)
  "${apt[@]}" update -qq >"$LOG/apt.log" 2>&1 || fail "apt-get update failed (see $LOG/apt.log)"
  "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 ||
    fail "apt-get install failed (see $LOG/apt.log)"
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0 # a munged is already serving
  say "starting munged"
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$RUN/munged.pid" # ours, so `stop` may stop it
  wait_until "munged" bash -c 'munge -n </dev/null | unmunge'
}

write_config() {
  # the node as slurmd sees it (CPUs, sockets, cores, threads, memory)
  local hw
  hw=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
  local mem_mb
  mem_mb=$(slurmd -C | head -n 1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
  cat >"$ETC/slurm.conf" <<EOF
# written by scripts/slurm_local.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
# RPCs between srun, slurmctld and slurmd on a machine whose cores other work keeps busy (CI's second test worker,
# a training beside it): past the default 10 s, srun gives up launching the job's step, and the job ends FAILED
# before any task ran, with nothing in its output
MessageTimeout=60
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 $hw RealMemory=$((mem_mb * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "export SLURM_CONF=$ETC/slurm.conf" >"$DIR/env.sh"
}

start_accounting() {
  local sock=$RUN/mariadb.sock
  if ! running "$RUN/mariadb.pid"; then
    if [ ! -d "$DIR/db/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --skip-test-db \
        --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
        fail "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    say "starting mariadbd (127.0.0.1:$DB_PORT)"
    setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DIR/db" --socket="$sock" --port="$DB_PORT" \
      --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
      --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    wait_until "mariadbd" mariadb-admin --no-defaults --socket="$sock" -uroot ping
  fi
  mariadb --no-defaults --socket="$sock" -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  (umask 077 && cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  )
  if ! running "$RUN/slurmdbd.pid"; then
    say "starting slurmdbd"
    slurmdbd # finds slurmdbd.conf next to $SLURM_CONF
    wait_until "slurmdbd" sacctmgr -n -P show cluster
  fi
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

node_usable() {
  case $(sinfo -h -n localhost -o %t 2>/dev/null) in
    idle | mix | alloc | comp) return 0 ;;
    drain* | drng | down*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

start() {
  [ "$(id -u)" = 0 ] || fail "needs root (it installs packages and starts system daemons)"
  mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state/ctld" "$DIR/state/slurmd"
  install_packages
  start_munge
  write_config
  start_accounting
  if ! running "$RUN/slurmctld.pid"; then
    # -c: jobs and node states saved by an earlier lifetime of this cluster (a killed CI run, a reboot) would
    # hold the node or queue ahead of new jobs; nothing from before a start is wanted
    say "starting slurmctld"
    slurmctld -c -f "$SLURM_CONF"
    wait_until "answer from slurmctld" scontrol ping
  fi
  if ! running "$RUN/slurmd.pid"; then
    say "starting slurmd"
    slurmd -f "$SLURM_CONF" -N localhost
  fi
  wait_until "usable node" node_usable
  # slurmctld schedules batch jobs only after its first pass (a few seconds after start): wait for a
  # real batch job to run, so callers can submit right away
  rm -f "$RUN/probe.out"
  local job
  job=$(sbatch --parsable -Q -J probe -t 1 -o "$RUN/probe.out" --wrap 'echo probe-ok') || fail "sbatch refused a job"
  WAIT_S=$((WAIT_S * 2)) wait_until "output from probe job $job" grep -qx probe-ok "$RUN/probe.out"
  say "up: $(sinfo -h -o '%P %D node(s) %c cpus %t') ; now: source $DIR/env.sh"
}

stop() {
  if running "$RUN/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  terminate slurmd "$RUN/slurmd.pid"
  terminate slurmctld "$RUN/slurmctld.pid"
  terminate slurmdbd "$RUN/slurmdbd.pid"
  terminate mariadbd "$RUN/mariadb.pid"
  # munged serves the whole machine: stop it only if this script started it and it is still that one
  if running "$RUN/munged.pid" && cmp -s "$RUN/munged.pid" /run/munge/munged.pid; then
    terminate munged "$RUN/munged.pid"
  fi
  rm -f "$RUN/munged.pid"
  say "stopped (state kept in $DIR; delete it to start from nothing)"
}

status() {
  [ -f "$SLURM_CONF" ] && running "$RUN/slurmctld.pid" && scontrol ping >/dev/null 2>&1 && node_usable
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
