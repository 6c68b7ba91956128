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
#   python3                      the local HTTP servers of the pull tests (standard library only)
set -euo pipefail

PKGS=(build-essential pkg-config liburing-dev libnuma-dev libcriterion-dev libinih-dev clang libclang-rt-14-dev libjansson-dev libcurl4-openssl-dev libssl-dev python3)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

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
