#!/usr/bin/env bash
# Install the Debian packages gorgon's build and tests need, only when missing.
#   deploy/install-deps.sh           install what is missing (idempotent)
#   deploy/install-deps.sh --check   exit 0 when everything is present, 1 otherwise
#
# Why each package:
#   build-essential, pkg-config  compiler, make, libc headers
#   liburing-dev                 gorgond's io_uring event loop
#   libnuma-dev                  NUMA placement of regions and workers
#   libcriterion-dev             unit and integration tests
#   libinih-dev                  INI config files (common/cm_config.c) rather than a hand-written parser
#   clang, libclang-rt-14-dev    libFuzzer targets under tests/fuzz/
#   libjansson-dev               strict JSON (safetensors headers, Medusa config.json and trees)
#   libcurl4-openssl-dev         `gorgon pull` downloads (HTTP, TLS, redirects, ranges)
#   libssl-dev                   SHA-256 of pulled files (libcrypto, the TLS library libcurl uses)
#   python3                      the local HTTP servers of the pull and bench tests, the Python
#                                package's tests (standard library only)
#   python3-venv, python3-pip,   the Python package's test installs it offline into a venv
#   python3-setuptools,          (pip install --no-index --no-build-isolation)
#   python3-wheel
#   python3-yaml                 the deploy tests read the Kubernetes manifests
#   libsystemd-dev               gorgond's sd_notify (Type=notify units)
#   systemd                      systemd-analyze verify/security, sysusers, tmpfiles in the deploy tests
#   strace, iproute2, util-linux the deploy tests: syscalls against the unit's filter, a private
#                                network namespace (unshare) for the live install
#   curl                         the sidecar and deploy tests talk HTTP with it
#   libmicrohttpd-dev            gorgon-sidecar's HTTP server (epoll, suspend/resume for streaming)
#   nodejs, npm                  the sidecar tests run the official openai npm client (npm is
#                                checked as a command: NodeSource's nodejs carries its own npm
#                                and conflicts with Debian's npm package)
#   gnuplot-nox                  gorgon-bench --plot
set -euo pipefail

PKGS=(build-essential pkg-config liburing-dev libnuma-dev libcriterion-dev libinih-dev clang libclang-rt-14-dev libjansson-dev libcurl4-openssl-dev libssl-dev python3
      python3-venv python3-pip python3-setuptools python3-wheel python3-yaml libsystemd-dev systemd strace iproute2 util-linux curl libmicrohttpd-dev nodejs
      gnuplot-nox)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

if ! command -v npm >/dev/null 2>&1; then
    missing+=(npm)
fi

if [[ "${1:-}" == "--check" ]]; then
    if ((${#missing[@]})); then
        echo "missing: ${missing[*]}"
        exit 1
    fi
    exit 0
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists yet; refresh them once when an install fails.
if ! $SUDO apt-get install -y -q "${missing[@]}" >&2; then
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q "${missing[@]}" >&2
fi
