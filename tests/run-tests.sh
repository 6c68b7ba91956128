#!/usr/bin/env bash
# Run each Criterion test binary given, print its summary, then one total line.
# Exit status: non-zero when any suite failed or crashed.
set -u
pass=0 fail=0 skip=0 bad=0
for t in "$@"; do
    name=$(basename "$t")
    echo "=== $name"
    out=$("$t" --jobs="${GORGON_TEST_JOBS:-2}" 2>&1)
    rc=$?
    printf '%s\n' "$out" | grep -E '\[FAIL\]|\[SKIP\]|^\[----\] .*:[0-9]+:|CRASH|Timed out|Synthesis' || true
    syn=$(printf '%s\n' "$out" | grep 'Synthesis' | tail -n 1)
    if [[ -z "$syn" ]]; then
        echo "$name: no Criterion summary (exit $rc)"
        printf '%s\n' "$out" | tail -n 20
        bad=$((bad + 1))
        continue
    fi
    p=$(sed -n 's/.*Passing: \([0-9]*\).*/\1/p' <<<"$syn")
    f=$(sed -n 's/.*Failing: \([0-9]*\).*/\1/p' <<<"$syn")
    c=$(sed -n 's/.*Crashing: \([0-9]*\).*/\1/p' <<<"$syn")
    tested=$(sed -n 's/.*Tested: \([0-9]*\).*/\1/p' <<<"$syn")
    s=$(grep -c '\[SKIP\]' <<<"$out" || true)
    pass=$((pass + ${p:-0}))
    fail=$((fail + ${f:-0} + ${c:-0}))
    skip=$((skip + s))
    if [[ $rc -ne 0 ]]; then bad=$((bad + 1)); fi
    : "$tested"
done
echo "tests: $pass passed, $fail failed, $skip skipped"
[[ $fail -eq 0 && $bad -eq 0 ]]
