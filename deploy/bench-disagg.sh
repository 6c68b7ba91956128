#!/bin/bash
# Colocated against disaggregated serving, in one run, through gorgond
# (docs/disaggregation.md; results in docs/benchmarks.md).
#
#   deploy/bench-disagg.sh MODEL.gguf [OUT_DIR]
#
# colocated:     one worker group, --threads 2
# disaggregated: one prefill and one decode group, --threads 1 each
# For each mode: the unloaded TPOT (one request at a time), then Poisson
# arrivals at each rate of $RATES with prompts of $INPUT random tokens and
# $OUTPUT output tokens, greedy. The TPOT SLO is $SLO_X times the colocated
# unloaded TPOT, the TTFT SLO $TTFT_SLO_MS. Writes one JSON line per run to
# OUT_DIR/runs.jsonl, a markdown table to OUT_DIR/table.md and a plot to
# OUT_DIR/disagg.png (gnuplot).
set -euo pipefail
model=${1:?usage: $0 MODEL.gguf [OUT_DIR]}
out=${2:-bench-disagg-out}
RATES=${RATES:-0.4,0.7,1.0}
INPUT=${INPUT:-512:1024}
OUTPUT=${OUTPUT:-128}
PROMPTS=${PROMPTS:-30}
SLO_X=${SLO_X:-2}
TTFT_SLO_MS=${TTFT_SLO_MS:-3000}
bin=${GORGON_BINDIR:-build/bin}
mkdir -p "$out"
: > "$out/runs.jsonl"
sock=$(mktemp -u /tmp/gorgon-bench-disagg.XXXXXX.sock)
pid=
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap stop EXIT

start() {
    "$bin/gorgond" --foreground --socket "$sock" --model "$model" --log-level warn "$@" &
    pid=$!
    for _ in $(seq 600); do
        "$bin/gorgon-bench" serve --socket "$sock" --num-prompts 1 --input-len 8 \
            --output-len 2 >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "gorgond did not come up" >&2
    exit 1
}

# The unloaded TPOT of a mode: one request at a time.
unloaded() {
    "$bin/gorgon-bench" serve --socket "$sock" --num-prompts 4 --concurrency 1 \
        --input-len "$INPUT" --output-len "$OUTPUT" --json |
        python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["tpot_ms"]["median"])'
}

declare -A base
for mode in colocated disaggregated; do
    if [ $mode = colocated ]; then start --threads 2; else start --threads 1 --mode disaggregated; fi
    base[$mode]=$(unloaded)
    stop
done
slo=$(python3 -c "print(round(${base[colocated]} * $SLO_X, 2))")
echo "unloaded TPOT: colocated ${base[colocated]} ms, disaggregated ${base[disaggregated]} ms;" \
     "SLO tpot:$slo ttft:$TTFT_SLO_MS" >&2

for mode in colocated disaggregated; do
    if [ $mode = colocated ]; then start --threads 2; else start --threads 1 --mode disaggregated; fi
    "$bin/gorgon-bench" serve --socket "$sock" --num-prompts "$PROMPTS" --request-rate "$RATES" \
        --input-len "$INPUT" --output-len "$OUTPUT" --goodput "ttft:$TTFT_SLO_MS" "tpot:$slo" \
        --seed 1 --json |
        python3 -c 'import json,sys
for l in sys.stdin:
    r = json.loads(l); r["mode"] = sys.argv[1]; r["unloaded_tpot_ms"] = float(sys.argv[2])
    print(json.dumps(r))' "$mode" "${base[$mode]}" >> "$out/runs.jsonl"
    stop
done

python3 - "$out" "$slo" "$TTFT_SLO_MS" <<'EOF'
import json, subprocess, sys
out, slo, ttft_slo = sys.argv[1], sys.argv[2], sys.argv[3]
runs = [json.loads(l) for l in open(out + "/runs.jsonl")]
def p(r, k, q):
    return r[k][q] if k in r else float("nan")
with open(out + "/table.md", "w") as f:
    f.write("| mode | rate (req/s) | done | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
            "ITL p50 / p99 (ms) | goodput (fraction, TTFT <= %s ms and TPOT <= %s ms) |\n"
            % (ttft_slo, slo))
    f.write("|---|---|---|---|---|---|---|\n")
    for r in runs:
        frac = r.get("goodput_fraction")
        if frac is None and r.get("request_throughput"):
            frac = r.get("request_goodput", 0) / r["request_throughput"]
        f.write("| %s | %s | %d | %.0f / %.0f | %.1f / %.1f | %.1f / %.1f | %.2f |\n" % (
            r["mode"], r.get("request_rate", "?"), r.get("completed", 0),
            p(r, "ttft_ms", "median"), p(r, "ttft_ms", "p99"),
            p(r, "tpot_ms", "median"), p(r, "tpot_ms", "p99"),
            p(r, "itl_ms", "median"), p(r, "itl_ms", "p99"), frac or 0.0))
        r["_frac"] = frac or 0.0
data = out + "/plot.dat"
with open(data, "w") as f:
    for mode in ("colocated", "disaggregated"):
        f.write("# %s\n" % mode)
        for r in runs:
            if r["mode"] == mode:
                f.write("%s %f %f %f\n" % (r.get("request_rate", 0), p(r, "tpot_ms", "p99"),
                                           p(r, "itl_ms", "p99"), r["_frac"]))
        f.write("\n\n")
gp = """set terminal pngcairo size 1100,420
set output '%s/disagg.png'
set multiplot layout 1,2
set xlabel 'request rate (req/s)'
set ylabel 'TPOT p99 (ms)'
set title 'TPOT p99'
plot '%s' index 0 using 1:2 with linespoints title 'colocated (1 group, 2 threads)', \\
     '%s' index 1 using 1:2 with linespoints title 'disaggregated (1 + 1, 1 thread each)'
set ylabel 'goodput (fraction)'
set yrange [0:1.05]
set title 'goodput (TTFT and TPOT SLOs)'
plot '%s' index 0 using 1:4 with linespoints title 'colocated', \\
     '%s' index 1 using 1:4 with linespoints title 'disaggregated'
unset multiplot
""" % (out, data, data, data, data)
try:
    subprocess.run(["gnuplot"], input=gp.encode(), check=True)
except (OSError, subprocess.CalledProcessError) as e:
    print("no plot (gnuplot: %s)" % e, file=sys.stderr)
print(open(out + "/table.md").read())
EOF
