#!/usr/bin/env bash
# Brings up everything rtmanager needs on a Debian 12 machine, as root:
# system packages, PostgreSQL, Redis, the Docker engine, the Python virtual
# environment, the buf CLI, the database and its migrations, and the local
# test engine images. Idempotent, and quick when everything is already there.
# Copes with stale pid files and sockets left behind by a killed daemon.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PG_ROLE=rtmanager
PG_PASSWORD=rtmanager
PG_DB=rtmanager
REDIS_PORT=6379
REDIS_PIDFILE=/run/rtmanager-redis.pid
STATE_ROOT=${RTMANAGER_STATE_ROOT:-/var/lib/galaxy/games}

LOG_TAG=bootstrap
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts system daemons)"

install_packages() {
  local missing=()
  command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v dockerd >/dev/null || missing+=(docker.io)
  [[ -x /usr/bin/busybox ]] || missing+=(busybox-static)
  command -v npm >/dev/null || missing+=(npm)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v ip >/dev/null || missing+=(iproute2)
  python3.11 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3.11-venv)
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_postgres() {
  local version cluster_dir pidfile pid
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
    log "creating PostgreSQL $version cluster"
    pg_createcluster "$version" main >/dev/null
  fi
  if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online; then
    cluster_dir=$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $6}')
    pidfile="$cluster_dir/postmaster.pid"
    if [[ -f $pidfile ]]; then
      pid=$(head -n 1 "$pidfile")
      if ! pid_alive "$pid" || ! grep -q postgres "/proc/$pid/comm" 2>/dev/null; then
        log "removing stale PostgreSQL pid file"
        rm -f "$pidfile"
      fi
    fi
    # A killed server leaves its socket lock behind; postgres refuses to
    # reuse a lock whose pid belongs to a live process, so clear dead ones.
    for lock in /var/run/postgresql/.s.PGSQL.*.lock; do
      [[ -f $lock ]] || continue
      pid=$(head -n 1 "$lock")
      pid_alive "$pid" || rm -f "$lock" "${lock%.lock}"
    done
    mkdir -p /var/run/postgresql && chown postgres:postgres /var/run/postgresql
    log "starting PostgreSQL $version"
    pg_ctlcluster "$version" main start
  fi
  wait_for 60 PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
  runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname='$PG_ROLE'" | grep -q 1 \
    || runuser -u postgres -- psql -qc "CREATE ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD'"
  runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname='$PG_DB'" | grep -q 1 \
    || runuser -u postgres -- createdb -O "$PG_ROLE" "$PG_DB"
}

start_redis() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0
  if [[ -f $REDIS_PIDFILE ]] && ! pid_alive "$(cat "$REDIS_PIDFILE")"; then
    rm -f "$REDIS_PIDFILE"
  fi
  log "starting Redis"
  # Lobby's job streams and their pending entries must survive a restart:
  # an append-only file, fsynced every second.
  mkdir -p /var/lib/rtmanager-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
    --dir /var/lib/rtmanager-redis --appendonly yes --appendfsync everysec \
    --pidfile "$REDIS_PIDFILE" --logfile /var/log/rtmanager-redis.log
  wait_for 30 Redis sh -c "redis-cli -h 127.0.0.1 -p $REDIS_PORT ping | grep -q PONG"
}

# The one way dockerd is started here; the chaos soak (bench/soak.py) restarts it the same way.
start_docker() { bash scripts/dockerd.sh start; }

setup_python() {
  local stamp=.venv/.rtmanager-installed want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
  if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3.11 -m venv .venv
  fi
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" || ! -x .venv/bin/rtmanager ]]; then
    log "installing rtmanager and its dev tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
    echo "$want" >"$stamp"
  fi
}

setup_node_tools() {
  local stamp=node_modules/.rtmanager-installed want
  want=$(cat package.json package-lock.json | sha256sum | cut -c1-16)
  if [[ ! -x node_modules/.bin/buf || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    log "installing buf from npm"
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
    echo "$want" >"$stamp"
  fi
}

main() {
  install_packages
  start_postgres
  start_redis
  start_docker
  setup_python
  setup_node_tools
  mkdir -p "$STATE_ROOT"
  .venv/bin/rtmanager migrate
  bash scripts/build-engine-images.sh
  log "ready: PostgreSQL, Redis and Docker are up; .venv is installed"
}

main "$@"
