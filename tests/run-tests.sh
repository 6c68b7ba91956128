#!/usr/bin/env bash
# Run each Criterion test binary given, print its failures and skips, then
# one total line.
#
# Exit status: non-zero when any suite failed or crashed, printed a
# sanitizer report (ThreadSanitizer warning, ASan/LSan error, UBSan runtime
# error: these do not always change an exit status), when a binary
# given is missing or printed no summary, or when a test skipped because
# something it needs was not built (a skip whose reason says "not built":
# that is a broken build, not an intended skip). Intended skips (no GPU,
# an instruction set this CPU lacks: cr_skip_test with a reason) are listed
# with their reason and counted in the total line.
#
# Criterion prints [SKIP] lines only with --verbose, and leaves skipped tests
# out of its "Tested" count: without --verbose a skip was invisible.
set -u
pass=0 fail=0 skip=0 bad=0 broken=0
skips=()
failed=()
for t in "$@"; do
    name=$(basename "$t")
    echo "=== $name"
    if [[ ! -x $t ]]; then
        echo "$name: MISSING: $t is not an executable (not built?)"
        bad=$((bad + 1)) broken=$((broken + 1))
        continue
    fi
    out=$("$t" --jobs="${GORGON_TEST_JOBS:-2}" --verbose 2>&1)
    rc=$?
    printf '%s\n' "$out" | grep -E '\[FAIL\]|\[SKIP\]|^\[----\] .*:[0-9]+:|^\[----\]   [^ ]|CRASH|Timed out|Synthesis' || true
    syn=$(printf '%s\n' "$out" | grep 'Synthesis' | tail -n 1)
    if [[ -z "$syn" ]]; then
        echo "$name: no Criterion summary (exit $rc)"
        printf '%s\n' "$out" | tail -n 20
        bad=$((bad + 1)) broken=$((broken + 1))
        continue
    fi
    # A sanitizer report fails the suite even when every test passed (a
    # report in Criterion's forked test process, or in a program a test
    # started, does not always change an exit status).
    san=$(grep -E '^WARNING: ThreadSanitizer|^==[0-9]+==ERROR: [A-Za-z]+Sanitizer|: runtime error: ' \
        <<<"$out" | head -n 4)
    if [[ -n $san ]]; then
        echo "$name: sanitizer report(s), counted as a failure:"
        printf '%s\n' "$out" | grep -E -A12 '^WARNING: ThreadSanitizer|^==[0-9]+==ERROR: [A-Za-z]+Sanitizer|: runtime error: ' | head -n 60
        fail=$((fail + 1))
        while IFS= read -r line; do failed+=("$name: $line"); done <<<"$san"
    fi
    p=$(sed -n 's/.*Passing: \([0-9]*\).*/\1/p' <<<"$syn")
    f=$(sed -n 's/.*Failing: \([0-9]*\).*/\1/p' <<<"$syn")
    c=$(sed -n 's/.*Crashing: \([0-9]*\).*/\1/p' <<<"$syn")
    pass=$((pass + ${p:-0}))
    fail=$((fail + ${f:-0} + ${c:-0}))
    if [[ $(( ${f:-0} + ${c:-0} )) -gt 0 || $rc -ne 0 ]]; then
        n=${#failed[@]}
        while IFS= read -r line; do failed+=("$name: $line"); done \
            < <(grep -E '\[FAIL\]|CRASH|Timed out|^\[----\] .*:[0-9]+:' <<<"$out" | head -n 8)
        [[ ${#failed[@]} -gt $n ]] || failed+=("$name: exit $rc")
    fi
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        if [[ $line == *"not built"* ]]; then
            echo "$name: a test needs a program that was not built: counted as a failure"
            fail=$((fail + 1))
            continue
        fi
        skip=$((skip + 1))
        skips+=("$name ${line#\[SKIP\] }")
    done < <(grep -F '[SKIP]' <<<"$out")
    if [[ $rc -ne 0 ]]; then bad=$((bad + 1)); fi
done
if [[ ${#skips[@]} -gt 0 ]]; then
    echo "skipped:"
    printf '  %s\n' "${skips[@]}"
fi
if [[ ${#failed[@]} -gt 0 ]]; then
    # Repeated here so that the last lines of a long log name what failed.
    echo "failed:"
    printf '  %s\n' "${failed[@]}"
fi
echo "tests: $pass passed, $fail failed, $skip skipped"
if [[ $broken -gt 0 ]]; then
    echo "tests: $broken suite(s) missing or ended without a summary"
fi
[[ $fail -eq 0 && $bad -eq 0 ]]
