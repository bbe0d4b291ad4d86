#!/usr/bin/env bash
# Build the laneproxy image without a Docker daemon or a registry, and without network inside the build:
#   1. a wheelhouse in build/wheelhouse: laneproxy's wheel and every dependency, pinned to the versions
#      installed in the development environment (pip on the host does the downloading);
#   2. a base image (unless BASE_IMAGE names one): a minimal Debian 12 with python3, python3-venv and iptables,
#      made by debootstrap once, cached as a tarball in ~/.cache/laneproxy/, imported into podman;
#   3. podman build --network=none (OCI isolation: each RUN step in a network namespace with only loopback),
#      with the Dockerfile at the repository root.
# The image's name is printed on the last line of stdout.
#
# Environment:
#   IMAGE          name of the result (default localhost/laneproxy:<version from pyproject.toml>)
#   BASE_IMAGE     build on this image instead of the debootstrap one (e.g. python:3.11-slim-bookworm;
#                  that one needs network in the build for iptables, so NETWORK=default is set for you)
#   TOOL           podman (default) or docker
#   CONTAINER_RUNTIME  podman's OCI runtime (default runc: crun refuses hosts with hybrid cgroups)
#   PYTHON         the environment whose package versions the image pins (default .venv/bin/python)
#   DEBIAN_MIRROR  for debootstrap (default http://deb.debian.org/debian)
#   LANEPROXY_CACHE_DIR  cache root (default ~/.cache/laneproxy)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
CACHE_DIR="${LANEPROXY_CACHE_DIR:-${HOME}/.cache/laneproxy}"
TOOL="${TOOL:-podman}"
PYTHON="${PYTHON:-${REPO}/.venv/bin/python}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,iptables
DEBOOTSTRAP_BASE="localhost/laneproxy-base:${SUITE}"
TARBALL="${CACHE_DIR}/debian-${SUITE}-minbase-${BASE_PACKAGES//,/-}.tar"
VERSION="$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
IMAGE="${IMAGE:-localhost/laneproxy:${VERSION}}"

log() { echo "[build_image] $*" >&2; }
as_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

if [[ "$TOOL" == podman ]] && ! command -v podman >/dev/null; then
    "${REPO}/tests/image/install_tools.sh" "$PYTHON"
fi

# 1. The wheelhouse --------------------------------------------------------------------------------------------
started=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "${work}/src"
# A clean copy of the sources: setuptools' build/ directory in the checkout may hold files deleted since.
cp pyproject.toml README.md "${work}/src/"
tar -C "$REPO" --exclude=__pycache__ -cf - laneproxy | tar -C "${work}/src" -xf -
"$PYTHON" -m pip freeze --exclude-editable | grep -viE '^(laneproxy|pip|setuptools|wheel)==' > "${work}/constraints.txt" || true
rm -rf build/wheelhouse
mkdir -p build/wheelhouse
mkdir -p "$CACHE_DIR"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir build/wheelhouse \
    --constraint "${work}/constraints.txt" "${work}/src[kubernetes,otlp,xds]" > "${CACHE_DIR}/wheelhouse.log" 2>&1 \
    || { tail -30 "${CACHE_DIR}/wheelhouse.log" >&2; exit 1; }
log "wheelhouse: $(ls build/wheelhouse | wc -l) wheels in $((SECONDS - started))s"

# 2. The base image ---------------------------------------------------------------------------------------------
build_network=none
if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE="$DEBOOTSTRAP_BASE"
    if ! "$TOOL" image exists "$BASE_IMAGE" 2>/dev/null && ! "$TOOL" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        if [[ ! -s "$TARBALL" ]]; then
            command -v debootstrap >/dev/null || "${REPO}/tests/image/install_tools.sh" "$PYTHON"
            started=$SECONDS
            log "debootstrap ${SUITE} (${BASE_PACKAGES}) from ${MIRROR}, once per machine: about 2 minutes"
            mkdir -p "$CACHE_DIR"
            rootfs="${work}/rootfs"
            as_root debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
                > "${CACHE_DIR}/debootstrap.log" 2>&1 || { tail -20 "${CACHE_DIR}/debootstrap.log" >&2; exit 1; }
            # What an image never needs: the package cache and lists, documentation, translations.
            as_root rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/* \
                "${rootfs}"/usr/share/doc/* "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/locale/* \
                "${rootfs}"/var/log/*.log "${rootfs}"/var/log/apt/*
            as_root tar --numeric-owner -C "$rootfs" -cf "${TARBALL}.partial" .
            mv "${TARBALL}.partial" "$TARBALL"
            as_root rm -rf "$rootfs"
            log "base tarball ${TARBALL} ($(du -h "$TARBALL" | cut -f1)) in $((SECONDS - started))s"
        fi
        "$TOOL" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' "$TARBALL" "$BASE_IMAGE" >/dev/null
        log "imported ${TARBALL} as ${BASE_IMAGE}"
    fi
else
    build_network="${NETWORK:-default}"  # a foreign base may need apt-get for iptables
fi

# 3. The image --------------------------------------------------------------------------------------------------
started=$SECONDS
runtime=()
# crun (podman's default) refuses hosts with cgroup v1 and v2 mounted side by side ("hybrid"); runc copes.
[[ "$TOOL" == podman ]] && runtime=(--runtime "${CONTAINER_RUNTIME:-runc}")
network=()
# RUN steps get a network namespace of their own with nothing but loopback: the build cannot download.
[[ "$build_network" == none ]] && network=(--network=none)
"$TOOL" build "${runtime[@]}" "${network[@]}" --quiet \
    --build-arg "BASE_IMAGE=${BASE_IMAGE}" --build-arg "LANEPROXY_VERSION=${VERSION}" \
    --tag "$IMAGE" --file Dockerfile . >&2
log "built ${IMAGE} on ${BASE_IMAGE} in $((SECONDS - started))s"
echo "$IMAGE"
