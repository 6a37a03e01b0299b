#!/usr/bin/env bash
# Builds a Debian bookworm base image with python3 (3.11) and python3-venv
# from Debian's packages (debootstrap, then `docker import`), for building
# the service image where no registry is reachable:
#   docker build --build-arg BASE=rtmanager-local/bookworm-python:1 ...
# Idempotent: does nothing when the image exists. Prints the image name.
# Usage: scripts/build-base-image.sh [IMAGE]   (as root; DOCKER_HOST is honoured)
set -euo pipefail

IMAGE=${1:-rtmanager-local/bookworm-python:1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_TAG=base-image
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"
  exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is missing (scripts/bootstrap.sh installs it)"
# The mirror apt uses here, so the base comes from where packages come from.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/rtmanager-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -n 20 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  die "debootstrap failed"
}
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
log "imported $IMAGE"
echo "$IMAGE"
