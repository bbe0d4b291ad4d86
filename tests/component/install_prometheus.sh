#!/usr/bin/env bash
# Installs Debian's prometheus for the canary-analysis tests (tests/component/test_canary_analysis.py), and does
# nothing when it is there (so `make test` pays only a check). The tests start their own server on 127.0.0.1;
# the package's own service (which would listen on every address) is stopped and disabled where systemd runs.
set -euo pipefail
command -v prometheus >/dev/null 2>&1 && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "tests: installing Debian's prometheus" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
