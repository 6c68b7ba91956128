#!/usr/bin/env bash
# `make run`: start a real gorgond with a model on a private socket, talk to
# it through libgorgon (ping, stats), generate text through it (gorgond ->
# gorgon-worker -> streamed back over shared memory), then stop it with
# SIGTERM.
#
# MODEL=/path/to/model.gguf (default: the stories260K test model, else a
# random-weight model from gorgon-mkmodel, whose text is noise),
# PROMPT="...", STEPS=N (new tokens) and MEDUSA=DIR (heads from
# gorgon-medusa-train: greedy decoding speculates) come from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/bin
MODEL=${MODEL:-}
PROMPT=${PROMPT:-Once upon a time}
STEPS=${STEPS:-128}
MEDUSA=${MEDUSA:-}

sock_dir=$(mktemp -d /tmp/gorgon-run.XXXXXX)
sock="$sock_dir/gorgon.sock"
cleanup() {
    [[ -n "${gpid:-}" ]] && kill "$gpid" 2>/dev/null && wait "$gpid" 2>/dev/null || true
    rm -rf "$sock_dir"
}
trap cleanup EXIT

if [[ -z "$MODEL" ]]; then
    models=${GORGON_TEST_MODELS:-../shared/models}
    if [[ -f "$models/stories260K/stories260K.gguf" ]]; then
        MODEL="$models/stories260K/stories260K.gguf"
    else
        MODEL="$sock_dir/random.gguf"
        echo "== no model found: writing a random-weight model; its text will be noise."
        echo "   Run 'make run MODEL=/path/to/model.gguf' for a real one."
        "$BIN/gorgon-mkmodel" --out "$MODEL" --preset tiny
    fi
fi

medusa_args=()
[[ -n "$MEDUSA" ]] && medusa_args=(--medusa "$MEDUSA")
echo "== starting gorgond --model $MODEL ${medusa_args[*]} on $sock"
"$BIN/gorgond" --foreground --socket "$sock" --poll-us 50 --model "$MODEL" "${medusa_args[@]}" &
gpid=$!
for _ in $(seq 100); do [[ -S "$sock" ]] && break; sleep 0.05; done
[[ -S "$sock" ]] || { echo "gorgond did not come up" >&2; exit 1; }

echo "== gorgon ping (shared-memory round trip through gorgond; spaced pings let gorgond sleep)"
"$BIN/gorgon" ping --socket "$sock" -c 5 -i 50
echo "== gorgon ping -c 2000 -i 0 (back to back: both sides stay in busy-poll)"
"$BIN/gorgon" ping --socket "$sock" -c 2000 -i 0 | tail -n 2

echo "== gorgon generate -p \"$PROMPT\" -n $STEPS (greedy, streamed through gorgond)"
printf '%s' "$PROMPT"
"$BIN/gorgon" generate --socket "$sock" -p "$PROMPT" -n "$STEPS"

echo "== gorgon generate, sampled: --temp 0.8 --top-p 0.9 --seed 42 -n 48"
printf '%s' "$PROMPT"
"$BIN/gorgon" generate --socket "$sock" -p "$PROMPT" -n 48 --temp 0.8 --top-p 0.9 --seed 42

echo "== gorgon stats"
"$BIN/gorgon" stats --socket "$sock"

echo "== stopping gorgond (SIGTERM)"
kill -TERM "$gpid"
rc=0
wait "$gpid" || rc=$?
gpid=
echo "gorgond exited with status $rc"
exit "$rc"
