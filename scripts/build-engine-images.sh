#!/usr/bin/env bash
# Build the local test engine images from Debian's static busybox.
#
# No registry is reachable where the tests run, so the engine images are
# assembled from a tiny root filesystem with `docker import`:
#
#   galaxy/engine-stub:1.0.0, :1.0.1, :1.1.0
#       writes "$GALAXY_STATE_DIR/started", then serves HTTP on
#       ${ENGINE_PORT:-8080} with busybox httpd; exits promptly on SIGTERM.
#   galaxy/engine-crash:1.0.0
#       prints "engine-crash: fatal: refusing to start" to stderr and exits 3.
#
# Idempotent and fast: an image is rebuilt only when its tag is missing or
# its `com.galaxy.recipe` label differs from the hash of this script plus the
# busybox binary, so editing the recipe (or upgrading busybox) rebuilds.
#
# Usage: scripts/build-engine-images.sh [--force]
set -euo pipefail

BUSYBOX="${BUSYBOX:-/usr/bin/busybox}"
RECIPE_LABEL="com.galaxy.recipe"
STUB_REPO="galaxy/engine-stub"
STUB_TAGS=(1.0.0 1.0.1 1.1.0)
CRASH_IMAGE="galaxy/engine-crash:1.0.0"

force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--force]" >&2
    exit 2
fi

die() {
    echo "build-engine-images: $*" >&2
    exit 1
}

command -v docker >/dev/null 2>&1 || die "the docker CLI is not on PATH"
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX not found: install it with 'apt-get install -y busybox-static'"
# A dynamically linked busybox would not run in an empty root filesystem.
ldd_out="$(ldd "$BUSYBOX" 2>&1 || true)"
if [[ "$ldd_out" == *"=>"* ]]; then
    die "$BUSYBOX is dynamically linked: install the busybox-static package"
fi
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (is dockerd running?)"

# The recipe is this script and the busybox binary: any change to either
# gives a new hash, and images carrying an old hash are rebuilt.
recipe="$( { sha256sum <"${BASH_SOURCE[0]}"; sha256sum <"$BUSYBOX"; } | sha256sum | cut -c1-16)"

# Serialise concurrent runs (e.g. parallel CI jobs) so each image is built once.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${TMPDIR:-/tmp}/galaxy-build-engine-images.lock"
    flock 9
fi

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

up_to_date() {
    local image="$1" have
    [[ $force -eq 0 ]] || return 1
    have="$(docker image inspect --format "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" "$image" 2>/dev/null)" || return 1
    [[ "$have" == "$recipe" ]]
}

# make_rootfs DIR: the common root filesystem (busybox, /bin/sh, /tmp).
make_rootfs() {
    local root="$1"
    mkdir -p "$root/bin" "$root/tmp" "$root/www" "$root/etc"
    cp "$BUSYBOX" "$root/bin/busybox"
    chmod 0755 "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    chmod 1777 "$root/tmp"
    echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
}

# import_rootfs DIR IMAGE [CHANGE...]: tar DIR (root-owned) into IMAGE.
import_rootfs() {
    local root="$1" image="$2"
    shift 2
    local changes=()
    local change
    for change in "$@" "LABEL $RECIPE_LABEL=$recipe"; do
        changes+=(-c "$change")
    done
    local old
    old="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
    tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . |
        docker import "${changes[@]}" - "$image" >/dev/null
    echo "built $image (recipe $recipe)"
    # Drop the previous build the tag moved away from; it stays while a
    # container (or another tag) still uses it.
    if [[ -n "$old" && "$old" != "$(docker image inspect --format '{{.Id}}' "$image")" ]]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

build_stub() {
    local tag="$1" image="$STUB_REPO:$1" root
    if up_to_date "$image"; then
        echo "up to date: $image"
        return
    fi
    root="$workdir/stub-$tag"
    make_rootfs "$root"
    echo "galaxy engine stub $tag" >"$root/www/index.html"
    echo "ok" >"$root/www/healthz"
    # The shell stays PID 1's child (under docker-init) or PID 1 itself; it
    # traps TERM/INT so the engine stops promptly even without an init.
    cat >"$root/bin/engine" <<'ENGINE'
#!/bin/sh
port="${ENGINE_PORT:-8080}"
echo "engine-stub ${ENGINE_VERSION:-unknown}: starting on port ${port} (game ${GALAXY_GAME_ID:-?})"
if [ -n "${GALAXY_STATE_DIR:-}" ]; then
    if echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ) version=${ENGINE_VERSION:-unknown}" \
        >"${GALAXY_STATE_DIR}/started"; then
        echo "engine-stub: wrote ${GALAXY_STATE_DIR}/started"
    else
        echo "engine-stub: warning: cannot write to ${GALAXY_STATE_DIR}" >&2
    fi
fi
busybox httpd -f -p "${port}" -h /www &
httpd=$!
trap 'echo "engine-stub: stopping"; kill -TERM "$httpd" 2>/dev/null; wait "$httpd"; exit 0' TERM INT
wait "$httpd"
status=$?
echo "engine-stub: httpd exited with status ${status}" >&2
exit "$status"
ENGINE
    chmod 0755 "$root/bin/engine"
    import_rootfs "$root" "$image" \
        "ENV ENGINE_VERSION=$tag" \
        "ENV ENGINE_PORT=8080" \
        "EXPOSE 8080" \
        'CMD ["/bin/engine"]'
}

build_crash() {
    local image="$CRASH_IMAGE" root
    if up_to_date "$image"; then
        echo "up to date: $image"
        return
    fi
    root="$workdir/crash"
    make_rootfs "$root"
    cat >"$root/bin/engine" <<'ENGINE'
#!/bin/sh
echo "engine-crash: fatal: refusing to start" >&2
exit 3
ENGINE
    chmod 0755 "$root/bin/engine"
    import_rootfs "$root" "$image" \
        "ENV ENGINE_VERSION=1.0.0" \
        'CMD ["/bin/engine"]'
}

for tag in "${STUB_TAGS[@]}"; do
    build_stub "$tag"
done
build_crash
