#!/usr/bin/env bash
# The GPU check: one script for a lent GPU machine (a few minutes on an
# H100/H200), run from the repository root. It
#   1. builds everything with the CUDA and NCCL backends (WERROR=1), and
#      the test binaries whose names contain cuda, device or nccl;
#   2. runs those tests (tests/run-tests.sh): any failure fails the check,
#      and so does any skip, since on this machine every device test must
#      run; the only skips allowed are the tests of machines WITHOUT a
#      device, whose reason says "this machine has N CUDA device(s)";
#   3. measures, on cuda:0, a synthetic 7B (no file: weights generated on
#      the device) in F16 and Q8_0: batch-1 and batch-64 decode, 2048-token
#      prefill, HBM read bandwidth and cuBLASLt's GEMM peak for its shapes
#      (gorgon-bench engine), and the Medusa verification cost at batch
#      1/8/32 for the 8-node tree T8 and mc_sim_7b_63 (gorgon-bench medusa);
#   4. writes gpu-check.json (every figure, the GPU's name and driver, git
#      describe, the date) and gpu-check.txt (the table and the targets,
#      PASS/FAIL each) under $OUT, or ./gpu-check-out/ when $OUT is unset,
#      beside the logs of each step.
#
#   deploy/gpu-check.sh                 # from the repository root
#   GPU_CHECK_BUDGET_S=300 deploy/gpu-check.sh
#
# Every step runs under `timeout`, its limit cut to what is left of the
# whole budget (GPU_CHECK_BUDGET_S, default 470 s: the check ends within
# 8 minutes), so a hang costs one step, not the session.
#
# Exit status: 0 when the build, the tests and every benchmark run
# succeeded; 1 otherwise. Missed performance targets are reported (FAIL in
# the table) and do not change the exit status.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

out=${OUT:-./gpu-check-out}
mkdir -p "$out" || exit 1
exec > >(tee "$out/gpu-check.log") 2>&1
exec 3>&1 # the log, for step's own lines while a step's output goes to a file

budget=${GPU_CHECK_BUDGET_S:-470}
deadline=$((SECONDS + budget))
B=build/release
bench=$B/bin/gorgon-bench
failed=()

# step NAME LIMIT_S CMD...: run CMD under timeout, LIMIT_S cut to the
# budget left (less 15 s for the summary); its exit status (124: timed out).
# Its own lines go to the log (fd 3), whatever CMD's output is redirected to.
step() {
    local name=$1 limit=$2 left rc
    shift 2
    left=$((deadline - SECONDS - 15))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "gpu-check: $name: skipped, the time budget (${budget}s) is spent" >&3
        return 124
    fi
    echo "::: $name (at most ${limit}s)" >&3
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "gpu-check: $name: timed out after ${limit}s" >&3
        rc=124
    fi
    echo "::: $name: exit $rc, $((SECONDS - t0))s" >&3
    return "$rc"
}

echo "::: gpu-check $(date -u +%FT%TZ), budget ${budget}s, output in $out"
gpu_name="" gpu_driver="" gpu_mem=""
if smi=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader 2>/dev/null | head -n 1) && [[ -n $smi ]]; then
    IFS=',' read -r gpu_name gpu_driver gpu_mem <<<"$smi"
    gpu_name=${gpu_name# } gpu_driver=${gpu_driver# } gpu_mem=${gpu_mem# }
    echo "device: $gpu_name, driver $gpu_driver, $gpu_mem"
else
    echo "gpu-check: nvidia-smi gave nothing (no driver, or not on PATH)"
fi
timeout 60 deploy/install-deps.sh --check >/dev/null 2>&1 ||
    echo "gpu-check: some build dependencies are missing (no network here to install them)"

# The device tests, named by their sources: tests/DIR/test_NAME.c is the
# binary test-DIR-NAME (tests/module.mk).
tests=()
for f in tests/*/test_*.c; do
    name=$(basename "$f" .c)
    dir=$(basename "$(dirname "$f")")
    case $name in
    *cuda* | *device* | *nccl*) tests+=("$B/tests/test-$dir-${name#test_}") ;;
    esac
done
echo "device tests: ${tests[*]##*/}"

build_rc=0
step build 270 make -j"$(nproc)" CUDA=1 NCCL=1 WERROR=1 all "${tests[@]}" \
    >"$out/build.log" 2>&1 || build_rc=$?
if ((build_rc != 0)); then
    tail -n 40 "$out/build.log"
    failed+=("build (exit $build_rc, $out/build.log)")
fi

tests_rc=-1 bad_skips=0
if ((build_rc == 0)); then
    tests_rc=0
    step "device tests" 110 tests/run-tests.sh "${tests[@]}" >"$out/tests.log" 2>&1 || tests_rc=$?
    grep -E '\[FAIL\]|^skipped:|^  |^failed:|^tests:' "$out/tests.log"
    ((tests_rc != 0)) && failed+=("device tests (exit $tests_rc, $out/tests.log)")
    # Skips are listed under "skipped:", one indented line each; on this
    # machine only the tests of device-less machines may skip.
    bad_skips=$(sed -n '/^skipped:/,/^[^ ]/p' "$out/tests.log" | grep '^  ' |
        grep -cvE 'this machine has [1-9][0-9]* CUDA device')
    if ((bad_skips > 0)); then
        echo "gpu-check: $bad_skips device test(s) skipped on the GPU machine (the device was not seen):"
        sed -n '/^skipped:/,/^[^ ]/p' "$out/tests.log" | grep '^  ' |
            grep -vE 'this machine has [1-9][0-9]* CUDA device'
        failed+=("$bad_skips device test(s) skipped")
    fi
    step devices 60 "$bench" engine --list-devices
fi

# bench NAME LIMIT ARGS...: gorgon-bench ARGS --json > $out/NAME.json
runs=()
run_bench() {
    local name=$1 limit=$2 rc=0
    shift 2
    runs+=("$name")
    step "$name" "$limit" "$bench" "$@" --json >"$out/$name.json" 2>"$out/$name.err" || rc=$?
    cat "$out/$name.json" "$out/$name.err"
    ((rc != 0)) && failed+=("$name (exit $rc, $out/$name.err)")
    return 0
}
T8='[[0],[0,0],[0,0,0],[0,0,0,0],[1],[0,1],[1,0]]' # 8 nodes, depth 4 (docs/benchmarks.md)
if ((build_rc == 0)); then
    for dt in f16 q8_0; do
        run_bench "engine-7b-$dt" 75 engine --device cuda --synthetic 7b --dtype "$dt" \
            --batch 1,64 --prompt-len 2048 --decode-tokens 128 --reps 3
    done
    run_bench medusa-7b-tree8 50 medusa --device cuda --synthetic 7b --dtype f16 \
        --tree "$T8" --batch 1,8,32 --context 256 --steps 16 --reps 3
    run_bench medusa-7b-mc_sim_7b_63 50 medusa --device cuda --synthetic 7b --dtype f16 \
        --tree mc_sim_7b_63 --batch 1,8,32 --context 256 --steps 16 --reps 3
fi

echo "::: summary"
git_desc=$(git describe --always --dirty --tags 2>/dev/null || echo unknown)
if command -v python3 >/dev/null; then
    GC_OUT=$out GC_DATE=$(date -u +%FT%TZ) GC_GIT=$git_desc GC_GPU="$gpu_name" \
        GC_DRIVER="$gpu_driver" GC_MEM="$gpu_mem" GC_BUILD_RC=$build_rc GC_TESTS_RC=$tests_rc \
        GC_BAD_SKIPS=$bad_skips GC_RUNS="${runs[*]}" GC_FAILED="$(printf '%s\n' "${failed[@]}")" \
        timeout 30 python3 - <<'PY' || echo "gpu-check: the summary failed"
import json, os

out = os.environ["GC_OUT"]
runs = {}
for name in os.environ["GC_RUNS"].split():
    try:
        with open(os.path.join(out, name + ".json")) as f:
            runs[name] = json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        runs[name] = None
        print(f"gpu-check: {name}: no JSON ({e})")

def decode(r, b):
    for row in (r or {}).get("decode") or []:
        if row.get("batch") == b:
            return row.get("tok_s")
    return None

def ratio(r, b):
    for row in (r or {}).get("batches") or []:
        if row.get("batch") == b:
            return row.get("step_cost_ratio")
    return None

targets = []
def target(name, value, op, limit):
    ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
    targets.append({"target": name, "value": value, "op": op, "limit": limit,
                    "pass": ok})

for dt in ("f16", "q8_0"):
    r = runs.get("engine-7b-" + dt)
    target(f"7b {dt}: batch-1 decode roofline_fraction",
           (r or {}).get("roofline_fraction"), ">=", 0.85)
    b1, b64 = decode(r, 1), decode(r, 64)
    target(f"7b {dt}: batch-64 / batch-1 decode tok/s",
           b64 / b1 if b1 and b64 else None, ">=", 20)
    target(f"7b {dt}: prefill_fraction (2048 tokens)",
           (r or {}).get("prefill_fraction"), ">=", 0.6)
target("7b f16: tree8 verification / plain step at batch 1",
       ratio(runs.get("medusa-7b-tree8"), 1), "<=", 1.1)

failed = [l for l in os.environ["GC_FAILED"].splitlines() if l]
summary = {
    "date": os.environ["GC_DATE"], "git": os.environ["GC_GIT"],
    "gpu": {"name": os.environ["GC_GPU"] or None, "driver": os.environ["GC_DRIVER"] or None,
            "memory": os.environ["GC_MEM"] or None},
    "build_rc": int(os.environ["GC_BUILD_RC"]),
    "tests_rc": int(os.environ["GC_TESTS_RC"]),
    "tests_bad_skips": int(os.environ["GC_BAD_SKIPS"]),
    "runs": runs, "targets": targets, "failed": failed, "ok": not failed,
}
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(summary, f, indent=1)
    f.write("\n")

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

lines = [f"gpu-check {summary['date']}  {summary['git']}  "
         f"{summary['gpu']['name'] or 'GPU unknown'} (driver {summary['gpu']['driver'] or '?'})",
         "", f"  {'engine, synthetic 7b':<24}{'f16':>8}  {'q8_0':>12}"]
e = {dt: runs.get("engine-7b-" + dt) or {} for dt in ("f16", "q8_0")}
gb = lambda r, k: None if r.get(k) is None else r[k] * 1e-9
tf = lambda r: None if not r.get("gemm_peak") else r["gemm_peak"]["weighted"] * 1e-12
for label, get, spec in (
        ("weights GB", lambda r: None if r.get("weight_bytes") is None else r["weight_bytes"] * 1e-9, ".2f"),
        ("HBM read GB/s", lambda r: gb(r, "hbm_read_bw"), ".0f"),
        ("decode b1 tok/s", lambda r: decode(r, 1), ".1f"),
        ("decode b64 tok/s", lambda r: decode(r, 64), ".1f"),
        ("b1 roofline fraction", lambda r: r.get("roofline_fraction"), ".3f"),
        ("prefill tok/s", lambda r: r.get("prefill_tok_s"), ".0f"),
        ("prefill TFLOP/s", lambda r: None if r.get("prefill_flop_s") is None else r["prefill_flop_s"] * 1e-12, ".1f"),
        ("GEMM peak TFLOP/s", tf, ".1f"),
        ("prefill fraction", lambda r: r.get("prefill_fraction"), ".3f")):
    lines.append(f"  {label:<24}{fmt(get(e['f16']), spec):>8}  {fmt(get(e['q8_0']), spec):>12}")
lines += ["", f"  {'medusa, 7b f16: tree / plain step':<40}" + "".join(f"{'b' + str(b):>8}" for b in (1, 8, 32))]
for name, label in (("medusa-7b-tree8", "T8 (8 nodes)"), ("medusa-7b-mc_sim_7b_63", "mc_sim_7b_63 (64 nodes)")):
    r = runs.get(name)
    lines.append(f"  {label:<40}" + "".join(f"{fmt(ratio(r, b), '.3f'):>8}" for b in (1, 8, 32)))
lines += ["", "targets"]
for t in targets:
    verdict = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
    lines.append(f"  {verdict}  {t['target']}: {fmt(t['value'], '.3f')} {t['op']} {t['limit']}")
lines += ["", "check: " + ("ok" if not failed else "FAILED: " + "; ".join(failed))]
text = "\n".join(lines) + "\n"
with open(os.path.join(out, "gpu-check.txt"), "w") as f:
    f.write(text)
print(text, end="")
PY
else
    echo "gpu-check: no python3: the raw figures are in $out/*.json, no summary written"
fi

if ((${#failed[@]} > 0)); then
    printf 'gpu-check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "::: gpu-check passed ($((SECONDS))s)"
