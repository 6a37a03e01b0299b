#!/usr/bin/env bash
# Makes the local Docker engine a ONE-node swarm manager, for the swarm
# backend (RTMANAGER_BACKEND=swarm) on a single machine. Idempotent.
#
#   bash scripts/swarm-local.sh            # init (exit 0 when already a manager)
#   bash scripts/swarm-local.sh status     # print the swarm state; exit 0 only when a manager
#   bash scripts/swarm-local.sh leave      # undo: leave the swarm (one-node swarms only)
#
# The engine is DOCKER_HOST (default unix:///var/run/docker.sock). `init` runs
#
#   docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377
#
# Docker 20.10 accepts a loopback advertise address; with it the swarm's
# control plane (2377/tcp) and gossip (7946) listen on loopback only and no
# other machine can ever join: deliberately a swarm of one. Set
# SWARM_ADVERTISE_ADDR to use another address of this host (then the ports
# are reachable from wherever that address is).
#
# What swarm mode adds beside the engine's ordinary use (plain containers,
# bridge networks, the event stream keep working as before): the `ingress`
# overlay network (10.0.0.0/24 by default) and, once a swarm task runs, a
# `docker_gwbridge` bridge with an address from the engine's default pools;
# overlay networks use VXLAN (4789/udp). `docker swarm init` changes no
# iptables rules when dockerd runs with --iptables=false, as here.
#
# Exit codes: 0 a manager (now or already); 1 error, or the engine belongs
# to a swarm as a worker, or is pending/locked (nothing is changed then).
set -euo pipefail

LOG_TAG=swarm-local
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ADVERTISE_ADDR=${SWARM_ADVERTISE_ADDR:-127.0.0.1}
SWARM_PORT=${SWARM_PORT:-2377}
export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}

# The engine's swarm state: "<LocalNodeState> <ControlAvailable> <NodeID>".
swarm_state() {
  timeout 20 docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} {{.Swarm.NodeID}}'
}

require_engine() {
  command -v docker >/dev/null 2>&1 || die "the docker CLI is not on PATH"
  timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "the Docker engine at $DOCKER_HOST does not answer"
}

# Succeeds (printing a line) when the engine is a manager; fails with a
# reason when it cannot become one without undoing something.
check_manager() {
  local state control node_id
  read -r state control node_id < <(swarm_state) || die "cannot read the swarm state of $DOCKER_HOST"
  case "$state" in
    active)
      if [[ $control == true ]]; then
        log "$DOCKER_HOST is a swarm manager (node $node_id)"
        return 0
      fi
      die "$DOCKER_HOST is a worker of another swarm (node $node_id); not changing it"
      ;;
    inactive) return 1 ;;
    *) die "$DOCKER_HOST is in swarm state '$state'; resolve it first (docker info)" ;;
  esac
}

init_swarm() {
  check_manager && return 0
  # Serialise concurrent runs; the loser then finds a manager.
  if command -v flock >/dev/null 2>&1; then
    exec 9>"${TMPDIR:-/tmp}/galaxy-swarm-local.lock"
    flock -w 60 9 || die "another swarm-local.sh holds the lock"
    check_manager && return 0
  fi
  log "initialising a one-node swarm on $DOCKER_HOST (advertise $ADVERTISE_ADDR)"
  local out
  if ! out=$(timeout 60 docker swarm init \
    --advertise-addr "$ADVERTISE_ADDR" \
    --listen-addr "$ADVERTISE_ADDR:$SWARM_PORT" 2>&1); then
    # Another process may have won the race without the lock.
    check_manager && return 0
    die "docker swarm init failed: $out"
  fi
  wait_for 30 "the swarm manager" manager_ready
  check_manager
}

manager_ready() {
  [[ $(timeout 10 docker node ls --format '{{.Status}}' 2>/dev/null) == Ready ]]
}

leave_swarm() {
  local state control node_id nodes
  read -r state control node_id < <(swarm_state) || die "cannot read the swarm state of $DOCKER_HOST"
  if [[ $state == inactive ]]; then
    log "$DOCKER_HOST is not in a swarm"
    return 0
  fi
  if [[ $control == true ]]; then
    nodes=$(timeout 20 docker node ls -q | wc -l)
    ((nodes <= 1)) || die "the swarm has $nodes nodes; not leaving a swarm of more than one"
  fi
  log "leaving the swarm (node $node_id); its services and overlay networks go with it"
  timeout 60 docker swarm leave --force >/dev/null
  # The bridge swarm made for its tasks' outside traffic stays behind otherwise.
  if timeout 20 docker network inspect docker_gwbridge >/dev/null 2>&1; then
    timeout 20 docker network rm docker_gwbridge >/dev/null || log "could not remove docker_gwbridge"
  fi
}

main() {
  require_engine
  case "${1:-init}" in
    init) init_swarm ;;
    status)
      swarm_state
      check_manager || { log "$DOCKER_HOST is not in a swarm"; exit 1; }
      ;;
    leave) leave_swarm ;;
    *) die "usage: $0 [init|status|leave]" ;;
  esac
}

main "$@"
