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

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root privileges to run: $*"
        exit 1
    fi
}

packages_missing() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
            return 0
        fi
    done
    return 1
}

# Fast path: everything already in place.
if [[ -x "${BINARY}" ]] && command -v etcd >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
    echo "${BINARY}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

# Print deb-src lines (one-line format) for every Debian-style `deb` entry of
# the machine's apt configuration whose suite belongs to this release.
derive_deb_src_lines() {
    local codename="$1" f
    # One-line format: /etc/apt/sources.list and *.list.
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "${f}" && "${f}" != "${SRC_LIST}" ]] || continue
        awk -v cn="${codename}" '
            $1 == "deb" {
                i = 2
                opts = ""
                if ($2 ~ /^\[/) {
                    while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } ; i++ }
                }
                uri = $i; suite = $(i + 1)
                if (index(suite, cn) != 1) next
                comps = ""
                for (j = i + 2; j <= NF; j++) comps = comps " " $j
                print "deb-src" opts " " uri " " suite comps
            }' "${f}"
    done
    # deb822 format: *.sources.
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "${f}" ]] || continue
        awk -v cn="${codename}" '
            function flush(   n, s, u, suites, uris, k, l, opts) {
                if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris_s != "" && suites_s != "") {
                    opts = ""
                    if (signed != "") opts = " [signed-by=" signed "]"
                    n = split(suites_s, suites, " ")
                    u = split(uris_s, uris, " ")
                    for (k = 1; k <= u; k++)
                        for (l = 1; l <= n; l++)
                            if (index(suites[l], cn) == 1)
                                print "deb-src" opts " " uris[k] " " suites[l] " " comps_s
                }
                types = ""; uris_s = ""; suites_s = ""; comps_s = ""; signed = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                key = tolower($1); sub(/:$/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "types") types = val
                else if (key == "uris") uris_s = val
                else if (key == "suites") suites_s = val
                else if (key == "components") comps_s = val
                else if (key == "signed-by") signed = val
                else if (key == "enabled") enabled = tolower(val)
            }
            END { flush() }' "${f}"
    done
}

ensure_deb_src() {
    if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
        return
    fi
    local codename
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME}")"
    local lines
    lines="$(derive_deb_src_lines "${codename}" | sort -u)"
    if [[ -z "${lines}" ]]; then
        log "could not derive deb-src lines from the apt configuration"
        exit 1
    fi
    log "adding deb-src entries to ${SRC_LIST}:"
    echo "${lines}" >&2
    echo "${lines}" | as_root tee "${SRC_LIST}" >/dev/null
    as_root apt-get update -qq
}

if packages_missing; then
    log "installing apt packages: ${APT_PACKAGES[*]}"
    if ! as_root apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2; then
        as_root apt-get update -qq
        as_root apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
    fi
fi

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

log "downloading Debian source package kubernetes into ${WORK}"
(cd "${WORK}" && apt-get source --download-only kubernetes >&2 \
    && dpkg-source -x ./kubernetes_*.dsc src >&2)
SRC="${WORK}/src"
if [[ ! -d "${SRC}/cmd/kube-apiserver" ]]; then
    log "unexpected source layout in ${SRC}"
    exit 1
fi

# The vendored modern-go/reflect2 (and the json-iterator using it) crash under
# Go >= 1.18 on the first JSON request; use Debian's fixed versions instead.
REFLECT2_SRC="/usr/share/gocode/src/github.com/modern-go/reflect2"
JSONITER_SRC="/usr/share/gocode/src/github.com/json-iterator/go"
for d in "${REFLECT2_SRC}" "${JSONITER_SRC}"; do
    [[ -d "${d}" ]] || { log "missing ${d}"; exit 1; }
done
log "replacing vendored reflect2 and json-iterator with Debian's versions"
replace_vendored() {
    local from="$1" to="$2"
    rm -rf "${to}"
    mkdir -p "${to}"
    # Copy only the package sources (no tests, no nested dirs needed).
    find "${from}" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name 'LICENSE' \) \
        ! -name '*_test.go' -exec cp -L {} "${to}/" \;
}
replace_vendored "${REFLECT2_SRC}" "${SRC}/vendor/github.com/modern-go/reflect2"
replace_vendored "${JSONITER_SRC}" "${SRC}/vendor/github.com/json-iterator/go"

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
