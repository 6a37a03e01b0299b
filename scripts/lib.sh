# Shell helpers shared by scripts/bootstrap.sh and scripts/dockerd.sh.
# Source it after setting LOG_TAG (the prefix of every message).

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not come up within ${seconds}s"
    sleep 0.3
  done
}

# Whether the process runs. A zombie does not: an exited daemon whose parent
# has not reaped it yet (pid 1 may reap orphans late) holds its pid but
# nothing else, and must not be waited for or taken for a live daemon.
pid_alive() {
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}
