#!/usr/bin/env bash
# Build (once per machine) and cache a kube-apiserver binary for the
# Kubernetes integration tests, and install etcd.
#
# Neither PyPI nor Debian ships kube-apiserver, so this script builds it from
# Debian's `kubernetes` source package (Go dependencies are vendored) with
# Debian's `golang-go`.  No network access is needed besides apt.
#
# Runs as root (or uses sudo for apt) on Debian 12.  Idempotent: if the
# cached binary exists and etcd is installed, it only prints the binary path.
#
# Environment overrides:
#   LANEPROXY_CACHE_DIR   cache root (default: ~/.cache/laneproxy)
#   LANEPROXY_KEEP_BUILD  if set to 1, keep the source tree after the build
#
# Output: the absolute path of the kube-apiserver binary on the last line of
# stdout.
set -euo pipefail

K8S_VERSION="1.20.2"
CACHE_DIR="${LANEPROXY_CACHE_DIR:-${HOME}/.cache/laneproxy}"
BINARY="${CACHE_DIR}/kube-apiserver-${K8S_VERSION}"
BUILD_ROOT="${CACHE_DIR}/build"
SRC_LIST="/etc/apt/sources.list.d/laneproxy-deb-src.list"

APT_PACKAGES=(
    golang-go
    etcd-server
    dpkg-dev
    openssl
    make
    rsync
    jq
    golang-github-modern-go-reflect2-dev
    golang-github-json-iterator-go-dev
)

log() { echo "[build_apiserver] $*" >&2; }
# shellcheck source=tests/kube/debian_kubernetes_source.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian_kubernetes_source.sh"

# Fast path: everything already in place.
if [[ -x "${BINARY}" ]] && command -v etcd >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
    echo "${BINARY}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

ensure_apt_packages

if [[ -x "${BINARY}" ]]; then
    echo "${BINARY}"
    exit 0
fi

ensure_deb_src

mkdir -p "${BUILD_ROOT}"
WORK="$(mktemp -d "${BUILD_ROOT}/kube-apiserver.XXXXXX")"
cleanup() {
    if [[ "${LANEPROXY_KEEP_BUILD:-0}" != "1" ]]; then
        # The Go module/build cache is read-only; make it removable.
        chmod -R u+w "${WORK}" 2>/dev/null || true
        rm -rf "${WORK}"
    fi
}
trap cleanup EXIT

prepare_kubernetes_source "${WORK}"

GO_VERSION="$(go version)"
log "building kube-apiserver ${K8S_VERSION} with ${GO_VERSION}"
start=$(date +%s)
(
    # Same recipe as Debian's debian/rules: Kubernetes 1.20 builds in GOPATH
    # mode (GO111MODULE=off, vendor/k8s.io symlinks into staging/), and `make`
    # first generates the code missing from the source tarball (OpenAPI
    # definitions, ...).  The version is taken from the git-archive metadata.
    cd "${SRC}"
    mkdir -p .go/src/k8s.io "${WORK}/home"
    ln -sfn ../../.. .go/src/k8s.io/kubernetes
    export GOPATH="${SRC}/.go" GOCACHE="${WORK}/gocache" HOME="${WORK}/home"
    export GOPROXY=off GOFLAGS= GO111MODULE=off CGO_ENABLED=0
    make WHAT=cmd/kube-apiserver >&2
    cp _output/bin/kube-apiserver "${WORK}/kube-apiserver"
)
log "build took $(( $(date +%s) - start ))s"

"${WORK}/kube-apiserver" --version >&2
install -m 0755 "${WORK}/kube-apiserver" "${BINARY}.tmp"
mv -f "${BINARY}.tmp" "${BINARY}"
echo "${BINARY}"
