#!/usr/bin/env bash
# `make run`: start a real gorgond with a model on a private socket, talk to
# it through libgorgon (ping, stats), generate text through it (gorgond ->
# gorgon-worker -> streamed back over shared memory), start gorgon-sidecar
# (the OpenAI-compatible HTTP server) beside it and send it one curl
# request, then stop both with SIGTERM.
#
# The model, unless MODEL=/path/to/model.gguf is given: stories15M (Q4_0,
# llama2.c's TinyStories model) pulled from Hugging Face with `gorgon pull`
# when the network is there; else the test models next to the repository
# ($GORGON_TEST_MODELS, else ../shared/models: stories15M, then
# stories260K); else a random-weight model from gorgon-mkmodel, whose text
# is noise. The script says which it uses and why.
#
# PROMPT="...", STEPS=N (new tokens), MEDUSA=DIR (heads from
# gorgon-medusa-train: greedy decoding speculates) and SIDECAR_PORT (default
# 8080; 0 picks a free port) come from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/bin
MODEL=${MODEL:-}
PROMPT=${PROMPT:-Once upon a time}
STEPS=${STEPS:-128}
MEDUSA=${MEDUSA:-}
SIDECAR_PORT=${SIDECAR_PORT:-8080}
PULL=hf://ggml-org/models/tinyllamas/stories15M-q4_0.gguf

sock_dir=$(mktemp -d /tmp/gorgon-run.XXXXXX)
sock="$sock_dir/gorgon.sock"
cleanup() {
    [[ -n "${spid:-}" ]] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null || true
    [[ -n "${gpid:-}" ]] && kill "$gpid" 2>/dev/null && wait "$gpid" 2>/dev/null || true
    rm -rf "$sock_dir"
}
trap cleanup EXIT

if [[ -z "$MODEL" ]]; then
    # A quick probe first, so that an offline machine falls back at once
    # instead of waiting on a download that cannot start.
    if curl -sS -o /dev/null --max-time 5 -I https://huggingface.co 2>"$sock_dir/probe.err"; then
        echo "== gorgon pull $PULL"
        mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}"
        if MODEL=$("$BIN/gorgon" pull "$PULL"); then
            echo "== model: stories15M (Q4_0) from Hugging Face: $MODEL"
        else
            echo "== gorgon pull failed (see above): falling back to a local model"
            MODEL=
        fi
    else
        echo "== no network to huggingface.co ($(tail -n 1 "$sock_dir/probe.err")): using a local model"
    fi
fi
if [[ -z "$MODEL" ]]; then
    models=${GORGON_TEST_MODELS:-../shared/models}
    for m in stories15M/stories15M.gguf stories15M/stories15M-q4_0.gguf stories260K/stories260K.gguf; do
        if [[ -f "$models/$m" ]]; then
            MODEL="$models/$m"
            echo "== model: the local test model $MODEL"
            break
        fi
    done
fi
if [[ -z "$MODEL" ]]; then
    MODEL="$sock_dir/random.gguf"
    echo "== model: no network and no test model in ${GORGON_TEST_MODELS:-../shared/models}:"
    echo "   writing a random-weight model; its text will be noise."
    echo "   Run 'make run MODEL=/path/to/model.gguf' for a real one."
    "$BIN/gorgon-mkmodel" --out "$MODEL" --preset tiny
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

echo "== starting gorgon-sidecar --listen 127.0.0.1:$SIDECAR_PORT --socket $sock (OpenAI-compatible HTTP)"
"$BIN/gorgon-sidecar" --listen "127.0.0.1:$SIDECAR_PORT" --socket "$sock" >"$sock_dir/sidecar.out" &
spid=$!
url=
for _ in $(seq 100); do
    url=$(sed -n 's/.*listening on //p' "$sock_dir/sidecar.out")
    [[ -n "$url" ]] && break
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.05
done
[[ -n "$url" ]] || { echo "gorgon-sidecar did not come up (port $SIDECAR_PORT in use? SIDECAR_PORT=0 picks a free one)" >&2; exit 1; }
esc=${PROMPT//\\/\\\\}
esc=${esc//\"/\\\"}
body=$(printf '{"model":"gorgon","prompt":"%s","max_tokens":48,"temperature":0}' "$esc")
echo "\$ curl -s $url/v1/completions -H 'Content-Type: application/json' -d '$body'"
curl -sS "$url/v1/completions" -H 'Content-Type: application/json' -d "$body"
echo "   (any OpenAI client works: base URL $url/v1; see docs/sidecar.md)"

echo "== stopping gorgon-sidecar and gorgond (SIGTERM)"
kill -TERM "$spid"
src=0
wait "$spid" || src=$?
spid=
kill -TERM "$gpid"
rc=0
wait "$gpid" || rc=$?
gpid=
echo "gorgon-sidecar exited with status $src, gorgond with status $rc"
[[ $src -eq 0 ]] || exit "$src"
exit "$rc"
