#!/usr/bin/env bash
# `make run`: start a real gorgond on a private socket, talk to it through
# libgorgon (ping + stats), stop it with SIGTERM; then generate text in-process
# with the engine (gorgon-run) on MODEL (default: the stories260K test model,
# else a random-weight model from gorgon-mkmodel — its text is noise).
#
# Serving generation *through* gorgond arrives with the serving issue; until
# then the daemon answers PING/STATS only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/bin
MODEL=${MODEL:-}
PROMPT=${PROMPT:-Once upon a time}
STEPS=${STEPS:-128}

sock_dir=$(mktemp -d /tmp/gorgon-run.XXXXXX)
sock="$sock_dir/gorgon.sock"
cleanup() {
    [[ -n "${gpid:-}" ]] && kill "$gpid" 2>/dev/null && wait "$gpid" 2>/dev/null || true
    rm -rf "$sock_dir"
}
trap cleanup EXIT

echo "== starting gorgond on $sock"
"$BIN/gorgond" --foreground --socket "$sock" --poll-us 50 &
gpid=$!
for _ in $(seq 100); do [[ -S "$sock" ]] && break; sleep 0.05; done
[[ -S "$sock" ]] || { echo "gorgond did not come up" >&2; exit 1; }

echo "== gorgon ping (shared-memory round trip through gorgond)"
"$BIN/gorgon" ping --socket "$sock" -c 5
echo "== gorgon stats"
"$BIN/gorgon" stats --socket "$sock"

echo "== stopping gorgond (SIGTERM)"
kill -TERM "$gpid"
wait "$gpid"; rc=$?; gpid=
echo "gorgond exited with status $rc"

if [[ -x "$BIN/gorgon-run" ]]; then
    if [[ -z "$MODEL" ]]; then
        models=${GORGON_TEST_MODELS:-../shared/models}
        if [[ -f "$models/stories260K/stories260K.gguf" ]]; then
            MODEL="$models/stories260K/stories260K.gguf"
        else
            MODEL="$sock_dir/random.gguf"
            echo "== no model given: writing a random-weight model (its text will be noise;"
            echo "   run 'make run MODEL=/path/to/model.gguf' for a real one)"
            "$BIN/gorgon-mkmodel" --out "$MODEL" --preset tiny
        fi
    fi
    echo "== gorgon-run --model $MODEL -p \"$PROMPT\" -n $STEPS"
    "$BIN/gorgon-run" --model "$MODEL" -p "$PROMPT" -n "$STEPS"
    echo
fi
