#!/usr/bin/env bash
# What gorgon-sidecar adds per output token: 256-token greedy streams of the
# same prompt through `gorgon generate` (shared memory) and through the
# sidecar with `curl -N` (HTTP + SSE), interleaved on the same gorgond,
# REPS times; prints the medians. Not part of `make test` (timings on a
# shared machine are noise-prone); docs/sidecar.md quotes its output.
#
#   tests/sidecar/measure_overhead.sh [REPS=40] [MODEL=...gguf]
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-40}
M=${MODEL:-${GORGON_TEST_MODELS:-../shared/models}/stories260K/stories260K.gguf}
N=256
D=$(mktemp -d)
trap 'kill $SP $GP 2>/dev/null; wait 2>/dev/null; rm -rf $D' EXIT
build/bin/gorgond --foreground --socket $D/g.sock --model "$M" --log-level error & GP=$!
for _ in $(seq 100); do [[ -S $D/g.sock ]] && break; sleep 0.05; done
build/bin/gorgon-sidecar --socket $D/g.sock --listen 127.0.0.1:0 >$D/out 2>/dev/null & SP=$!
URL=
for _ in $(seq 100); do URL=$(sed -n 's/.*listening on //p' $D/out); [[ -n $URL ]] && break; sleep 0.05; done
body="{\"prompt\":\"Once upon a time\",\"max_tokens\":$N,\"temperature\":0,\"stream\":true}"
ns() { date +%s%N; }
for _ in $(seq "$REPS"); do
    t0=$(ns)
    gt=$(build/bin/gorgon generate --socket $D/g.sock -p "Once upon a time" -n $N 2>&1 >/dev/null |
         sed -n 's/.*total \([0-9.]*\) ms.*/\1/p')
    t1=$(ns)
    w=$(curl -sN -o /dev/null -w '%{time_starttransfer} %{time_total}' "$URL/v1/completions" -d "$body")
    t2=$(ns)
    echo "$(( (t1 - t0) / 1000 )) $gt $(( (t2 - t1) / 1000 )) $w"
done >$D/samples
python3 - "$D/samples" "$N" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
n = int(sys.argv[2])
gw = st.median(int(r[0]) for r in rows); gt = st.median(float(r[1]) * 1e3 for r in rows)
cw = st.median(int(r[2]) for r in rows); cf = st.median(float(r[3]) * 1e6 for r in rows)
ct = st.median(float(r[4]) * 1e6 for r in rows)
print(f"{len(rows)} runs of {n} tokens, medians:")
print(f"  gorgon generate  wall {gw:8.0f} us   gorgond's own total (submit -> final) {gt:8.0f} us")
print(f"  curl -N sidecar  wall {cw:8.0f} us   curl time_total {ct:8.0f} us   first byte {cf:6.0f} us")
print(f"  per token: wall difference {(cw - gw) / n:+.2f} us;"
      f" curl total - gorgond total {(ct - gt) / n:+.2f} us")
PY
