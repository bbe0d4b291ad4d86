#!/usr/bin/env bash
# Build (once per machine) and cache what the single-node cluster tier (tests/cluster) runs: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kubectl from Debian's `kubernetes` source
# package (the same 1.20.2 tree and vendor swap as build_apiserver.sh), and the pause image built from the tree's
# build/pause/linux/pause.c as an OCI archive for `ctr images import` (no registry is reachable). Also installs
# the node's runtime from Debian: containerd, runc, the CNI plugins, conntrack, dnsmasq, iptables.
#
# The binaries are built with GOFLAGS=-tags=providerless: without it kubelet and kube-controller-manager carry
# the cloud providers, and kubelet's cAdvisor probes the cloud metadata address at start.
#
# Idempotent: with everything cached it only prints the cache directory. Runs as root (or sudo for apt).
#
# Environment overrides:
#   LANEPROXY_CACHE_DIR   cache root (default: ~/.cache/laneproxy)
#   LANEPROXY_KEEP_BUILD  if set to 1, keep the source tree after the build
#
# Output: the cache directory ("${CACHE_DIR}/kube-cluster-1.20.2", holding bin/ and pause.oci.tar) on the last
# line of stdout.
set -euo pipefail

K8S_VERSION="1.20.2"
PAUSE_VERSION="3.4.1"
CACHE_DIR="${LANEPROXY_CACHE_DIR:-${HOME}/.cache/laneproxy}"
TARGET="${CACHE_DIR}/kube-cluster-${K8S_VERSION}"
BUILD_ROOT="${CACHE_DIR}/build"
SRC_LIST="/etc/apt/sources.list.d/laneproxy-deb-src.list"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

APT_PACKAGES=(
    golang-go
    etcd-server
    dpkg-dev
    openssl
    make
    rsync
    jq
    gcc
    libc6-dev
    golang-github-modern-go-reflect2-dev
    golang-github-json-iterator-go-dev
    containerd
    runc
    containernetworking-plugins
    conntrack
    dnsmasq-base
    iptables
    iproute2
)

log() { echo "[build_cluster] $*" >&2; }
# shellcheck source=tests/kube/debian_kubernetes_source.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian_kubernetes_source.sh"

complete() {
    local c
    for c in "${COMPONENTS[@]}"; do [[ -x "${TARGET}/bin/${c}" ]] || return 1; done
    [[ -s "${TARGET}/pause.oci.tar" ]]
}

export DEBIAN_FRONTEND=noninteractive
ensure_apt_packages

if complete; then
    echo "${TARGET}"
    exit 0
fi

ensure_deb_src

mkdir -p "${BUILD_ROOT}"
WORK="$(mktemp -d "${BUILD_ROOT}/kube-cluster.XXXXXX")"
cleanup() {
    if [[ "${LANEPROXY_KEEP_BUILD:-0}" != "1" ]]; then
        # The Go build cache is read-only; make it removable.
        chmod -R u+w "${WORK}" 2>/dev/null || true
        rm -rf "${WORK}"
    fi
}
trap cleanup EXIT

prepare_kubernetes_source "${WORK}"

log "building ${COMPONENTS[*]} ${K8S_VERSION} with $(go version)"
start=$(date +%s)
(
    # Debian's debian/rules recipe (GOPATH mode, vendor/k8s.io symlinks into staging/, `make` generates the
    # code missing from the tarball), as in build_apiserver.sh, with the cloud providers left out.
    cd "${SRC}"
    mkdir -p .go/src/k8s.io "${WORK}/home"
    ln -sfn ../../.. .go/src/k8s.io/kubernetes
    export GOPATH="${SRC}/.go" GOCACHE="${WORK}/gocache" HOME="${WORK}/home"
    export GOPROXY=off GOFLAGS=-tags=providerless GO111MODULE=off CGO_ENABLED=0
    what=""
    for c in "${COMPONENTS[@]}"; do what="${what} cmd/${c}"; done
    make WHAT="${what# }" >&2
)
log "Go build took $(( $(date +%s) - start ))s"

STAGE="${WORK}/stage"
mkdir -p "${STAGE}/bin"
for c in "${COMPONENTS[@]}"; do
    install -m 0755 "${SRC}/_output/bin/${c}" "${STAGE}/bin/${c}"
done
"${STAGE}/bin/kubelet" --version >&2

# The pause container: a static binary in a one-layer image, written as an OCI image layout by hand (the format
# is small, and this keeps the tier independent of buildah's storage).
log "building the pause image ${PAUSE_VERSION} from build/pause/linux/pause.c"
OCI="${WORK}/pause-oci"
mkdir -p "${OCI}/blobs/sha256" "${WORK}/pause-rootfs"
gcc -Os -Wall -Werror -static -DVERSION="v${PAUSE_VERSION}-laneproxy" \
    -o "${WORK}/pause-rootfs/pause" "${SRC}/build/pause/linux/pause.c"
strip "${WORK}/pause-rootfs/pause"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "${WORK}/pause-rootfs" -cf "${WORK}/layer.tar" pause
blob() {  # move a file into blobs/ under its digest; print "<digest> <size>"
    local digest size
    digest="$(sha256sum "$1" | cut -d' ' -f1)"
    size="$(stat -c %s "$1")"
    mv "$1" "${OCI}/blobs/sha256/${digest}"
    echo "${digest} ${size}"
}
read -r layer_digest layer_size < <(blob "${WORK}/layer.tar")
printf '{"architecture":"%s","os":"linux","config":{"Entrypoint":["/pause"],"User":"65535:65535"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"laneproxy tests/kube/build_cluster.sh"}]}' \
    "$(go env GOARCH)" "${layer_digest}" > "${WORK}/config.json"
read -r config_digest config_size < <(blob "${WORK}/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "${config_digest}" "${config_size}" "${layer_digest}" "${layer_size}" > "${WORK}/manifest.json"
read -r manifest_digest manifest_size < <(blob "${WORK}/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"localhost/pause:%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "${manifest_digest}" "${manifest_size}" "${PAUSE_VERSION}" "${PAUSE_VERSION}" > "${OCI}/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "${OCI}/oci-layout"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "${OCI}" -cf "${STAGE}/pause.oci.tar" .
echo "localhost/pause:${PAUSE_VERSION}" > "${STAGE}/pause.name"

# The API-server tier (tests/kube, build_apiserver.sh) caches the same kube-apiserver on its own: give it this one
# when it has none yet, so that a cold `make test` builds Kubernetes once (the cloud providers, which this one
# leaves out, play no part there).
APISERVER="${CACHE_DIR}/kube-apiserver-${K8S_VERSION}"
if [[ ! -x "${APISERVER}" ]]; then
    install -m 0755 "${STAGE}/bin/kube-apiserver" "${APISERVER}.tmp"
    mv -f "${APISERVER}.tmp" "${APISERVER}"
fi

# Publish atomically: a half-written cache directory is never seen as complete.
rm -rf "${TARGET}.old"
[[ -e "${TARGET}" ]] && mv "${TARGET}" "${TARGET}.old"
mv "${STAGE}" "${TARGET}"
rm -rf "${TARGET}.old"
log "cached in ${TARGET}: $(du -sh "${TARGET}" | cut -f1)"
echo "${TARGET}"
