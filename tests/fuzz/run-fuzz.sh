#!/usr/bin/env bash
# Build the libFuzzer targets (tests/fuzz/fuzz_*.c, rules in module.mk) and
# run each for a bounded time over a copy of its seed corpus, so the repo's
# corpus is never modified. Seeds: tests/fuzz/corpus/ for fuzz_gguf,
# tests/fuzz/corpus_<name>/ for fuzz_<name> (started empty when absent).
#   tests/fuzz/run-fuzz.sh [SECONDS] [TARGET...]   SECONDS per target, default 60
# Env: MODE (build mode, default release), FUZZ_ARGS (extra libFuzzer flags).
# Exit status: 0 when every target ran out its time with no finding;
# non-zero on a build failure, crash, leak, timeout or sanitizer report (the
# reproducer is kept and its path printed).
set -euo pipefail
secs=${1:-60}
shift || true
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
mode=${MODE:-release}
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=()
    for f in tests/fuzz/fuzz_*.c; do
        targets+=("$(basename "$f" .c)")
    done
fi

failed=0
for t in "${targets[@]}"; do
    bin="build/$mode/fuzz/$t"
    if ! make -s MODE="$mode" SAN= "$bin"; then
        echo "$t: BUILD FAILED"
        failed=1
        continue
    fi
    seeds=tests/fuzz/corpus_${t#fuzz_}
    [[ $t == fuzz_gguf ]] && seeds=tests/fuzz/corpus
    work=$(mktemp -d "${TMPDIR:-/tmp}/gorgon-fuzz.XXXXXX")
    mkdir -p "$work/corpus" "$work/artifacts"
    if [[ -d $seeds ]]; then
        cp "$seeds"/* "$work/corpus/" 2>/dev/null || true
    fi
    echo "$t: ${secs}s over $(ls "$work/corpus" | wc -l) seeds in $work"
    set +e
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$secs" -max_len=131072 -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/" ${FUZZ_ARGS:-} \
        "$work/corpus" >"$work/log" 2>&1
    rc=$?
    set -e
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$work/log" || true
    if [[ $rc -ne 0 ]] || ls "$work/artifacts"/* >/dev/null 2>&1; then
        tail -n 60 "$work/log"
        echo "$t: FAILED (exit $rc); reproducers in $work/artifacts:"
        ls -l "$work/artifacts"
        failed=1
        continue
    fi
    rm -rf "$work"
    echo "$t: no findings"
done
exit $failed
