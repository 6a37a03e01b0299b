#!/usr/bin/env bash
# Starts, stops or restarts the machine's Docker engine, as root, the one way
# the project runs it: `dockerd --iptables=false --ip-masq=false
# --bridge=none`, detached, logging to /var/log/rtmanager-dockerd.log.
#
#   bash scripts/dockerd.sh start            # idempotent; used by scripts/bootstrap.sh
#   bash scripts/dockerd.sh stop             # SIGTERM, wait for it (and its containerd) to exit
#   bash scripts/dockerd.sh restart [DOWN]   # stop, stay down DOWN seconds (default 2), start
#
# `start` copes with what a killed daemon leaves behind: a stale pid file,
# its socket, the pid file and socket of its managed containerd. `restart`
# is what the chaos soak (bench/soak.py) uses to take the shared daemon away.
set -euo pipefail

DOCKERD_LOG=/var/log/rtmanager-dockerd.log
DOCKERD_PIDFILE=/var/run/docker.pid
CONTAINERD_PIDFILE=/var/run/docker/containerd/containerd.pid

LOG_TAG=dockerd
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

docker_up() { timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# Whether pid is the machine's own dockerd: a dockerd in this network
# namespace with the default data root. Other daemons on the machine (the
# nodes of a multi-node swarm test, each in a namespace of its own with its
# own data root, socket and pid file) are never taken for it.
is_host_dockerd() {
  local pid=$1
  pid_alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]] || return 1
  [[ $(readlink "/proc/$pid/ns/net" 2>/dev/null) == "$(readlink /proc/self/ns/net)" ]] || return 1
  ! tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE '^--(data-root|pidfile|exec-root)(=|$)'
}

# The pid of the machine's running dockerd (its pid file, else by name and
# namespace); fails when none runs.
dockerd_pid() {
  local pid
  if [[ -f $DOCKERD_PIDFILE ]]; then
    pid=$(cat "$DOCKERD_PIDFILE")
    if is_host_dockerd "$pid"; then
      echo "$pid"
      return 0
    fi
  fi
  for pid in $(pgrep -x dockerd); do
    if is_host_dockerd "$pid"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

start_docker() {
  docker_up && return 0
  local pid
  if dockerd_pid >/dev/null; then
    # A live dockerd that does not answer yet: give it time before giving up.
    wait_for 60 "the running dockerd" docker_up
    return 0
  fi
  rm -f "$DOCKERD_PIDFILE" /var/run/docker.sock
  # The managed containerd of a killed dockerd may linger or leave its files.
  if [[ -f $CONTAINERD_PIDFILE ]]; then
    pid=$(cat "$CONTAINERD_PIDFILE")
    pid_alive "$pid" || rm -f "$CONTAINERD_PIDFILE"
  fi
  if [[ -S /run/containerd/containerd.sock ]] && ! pgrep -x containerd >/dev/null; then
    rm -f /run/containerd/containerd.sock
  fi
  log "starting dockerd"
  # In swarm mode (scripts/swarm-local.sh), a task of an image present here
  # runs it as it is instead of asking a registry first: none is reachable.
  DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 \
    setsid nohup dockerd --iptables=false --ip-masq=false --bridge=none \
    >>"$DOCKERD_LOG" 2>&1 </dev/null &
  wait_for 90 dockerd docker_up
}

stop_docker() {
  local pid containerd="" deadline
  if ! pid=$(dockerd_pid); then
    log "dockerd is not running"
    return 0
  fi
  [[ -f $CONTAINERD_PIDFILE ]] && containerd=$(cat "$CONTAINERD_PIDFILE")
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid"
  # dockerd stops its containers first (their stop timeout, 10 s by default).
  deadline=$((SECONDS + 60))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$pid"; then
    log "dockerd did not exit within 60s; killing it"
    kill -KILL "$pid"
    sleep 0.5
  fi
  # Its managed containerd exits with it; a lingering one is killed, so the
  # next start finds no stale pid file or socket.
  if pid_alive "$containerd" && [[ $(cat "/proc/$containerd/comm" 2>/dev/null) == containerd ]]; then
    deadline=$((SECONDS + 15))
    while pid_alive "$containerd" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$containerd" && kill -KILL "$containerd"
  fi
  return 0
}

main() {
  [[ $(id -u) -eq 0 ]] || die "run as root (it starts and stops the system's dockerd)"
  case "${1:-start}" in
    start) start_docker ;;
    stop) stop_docker ;;
    restart)
      stop_docker
      sleep "${2:-2}"
      start_docker
      ;;
    *) die "usage: $0 start|stop|restart [DOWN_SECONDS]" ;;
  esac
}

# Sourced (by a test of is_host_dockerd), it only defines the functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
