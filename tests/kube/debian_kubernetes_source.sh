# Shared by build_apiserver.sh and build_cluster.sh (sourced, not run): root for apt, deb-src entries derived
# from the machine's apt configuration, and Debian's `kubernetes` source tree unpacked and made buildable with
# the Go in Debian 12. The caller defines log() and sets SRC_LIST and APT_PACKAGES.

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

# Install APT_PACKAGES (the caller's array) unless all are installed; apt-get update only if needed.
ensure_apt_packages() {
    if packages_missing; then
        log "installing apt packages: ${APT_PACKAGES[*]}"
        if ! as_root apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2; then
            as_root apt-get update -qq
            as_root apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
        fi
    fi
}

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

# Unpack Debian's kubernetes source package into "$1/src" and swap the vendored reflect2/json-iterator.
prepare_kubernetes_source() {
    local work="$1"
    log "downloading Debian source package kubernetes into ${work}"
    (cd "${work}" && apt-get source --download-only kubernetes >&2 \
        && dpkg-source -x ./kubernetes_*.dsc src >&2)
    SRC="${work}/src"
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
}
