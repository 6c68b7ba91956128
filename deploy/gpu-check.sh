#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the `device` tool):
# builds with the NCCL backend and runs every test that needs a device, so
# that nothing is reported as skipped for want of one. Results go to stdout
# and, when $OUT is set, to $OUT/gpu-check.txt.
#
#   deploy/gpu-check.sh            # from the repository root
#
# Today that is comm's NCCL backend (tests/comm/test_nccl.c: a one-rank group,
# its collectives on the device, abort). The CUDA worker backend (issue 12)
# adds its tests here.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${OUT:+$OUT/gpu-check.txt}
exec > >(tee ${log:+"$log"}) 2>&1

echo "::: device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
deploy/install-deps.sh --check >/dev/null || deploy/install-deps.sh >/dev/null || echo "gpu-check: some build dependencies are missing (no network here?)"

echo "::: build (NCCL=1)"
make -j"$(nproc)" WERROR=1 NCCL=1 build/release/tests/test-comm-nccl >/dev/null

echo "::: tests that need a GPU"
out=$(build/release/tests/test-comm-nccl --verbose 2>&1) || true
printf '%s\n' "$out" | grep -E '\[(PASS|FAIL|SKIP)\]|Synthesis|^\[----\] .*:[0-9]+:' || true
if grep -q '\[SKIP\]' <<<"$out"; then
    echo "gpu-check: a GPU test was skipped on the GPU machine (see the reason above)"
    exit 1
fi
grep -q 'Failing: 0 | Crashing: 0' <<<"$out"
echo "::: gpu-check passed"
