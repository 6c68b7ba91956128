#!/bin/bash
# The container's default command (deploy/Containerfile): gorgond and
# gorgon-sidecar in one container. gorgond starts first; the sidecar starts
# once gorgond's socket listens, and SIGTERM reaches both (gorgond drains its
# requests in flight). Either exiting stops the container with its status.
#   GORGON_MODEL   the model (default /var/lib/gorgon/model.gguf)
#   GORGON_LISTEN  the sidecar's address (default 0.0.0.0:8080)
#   GORGON_API_KEY when set, the sidecar requires it (Authorization: Bearer)
#   GORGON_BINDIR  where the programs are (default /usr/bin)
#   GORGON_CONFIG  gorgond's config (default /etc/gorgon/gorgond.ini)
set -eu -o pipefail
bin=${GORGON_BINDIR:-/usr/bin}
config=${GORGON_CONFIG:-/etc/gorgon/gorgond.ini}
model=${GORGON_MODEL:-/var/lib/gorgon/model.gguf}
listen=${GORGON_LISTEN:-0.0.0.0:8080}
sock=${GORGON_SOCKET:-/run/gorgon/gorgon.sock}
if [ ! -r "$model" ]; then
    echo "gorgon-container-run: no model at $model: mount one there" \
        "(-v FILE.gguf:$model:ro) or set GORGON_MODEL" >&2
    exit 2
fi
"$bin/gorgond" --foreground --config "$config" --model "$model" \
    --socket "$sock" &
gd=$!
stopping=0
trap 'stopping=1; kill -TERM "$gd" ${sc:+"$sc"} 2>/dev/null || true' TERM INT
# gorgond answers a ping once it listens (the worker may still be loading:
# the sidecar's /health says when generation is ready).
while ! "$bin/gorgon" ping --socket "$sock" -c 1 >/dev/null 2>&1; do
    if ! kill -0 "$gd" 2>/dev/null; then
        rc=0
        wait "$gd" || rc=$?
        echo "gorgon-container-run: gorgond exited ($rc) before it listened" >&2
        exit $((rc ? rc : 1))
    fi
    sleep 0.2
done
if [ -n "${GORGON_API_KEY:-}" ]; then
    "$bin/gorgon-sidecar" --listen "$listen" --socket "$sock" --api-key "$GORGON_API_KEY" &
else
    "$bin/gorgon-sidecar" --listen "$listen" --socket "$sock" &
fi
sc=$!
# The first of the two to end ends the container.
while kill -0 "$gd" 2>/dev/null && kill -0 "$sc" 2>/dev/null; do
    wait -n || true
done
first=gorgon-sidecar
if kill -0 "$sc" 2>/dev/null; then first=gorgond; fi
kill -TERM "$gd" "$sc" 2>/dev/null || true
rc_gd=0
wait "$gd" || rc_gd=$?
rc_sc=0
wait "$sc" || rc_sc=$?
if ((stopping)); then
    exit "$rc_gd"
fi
echo "gorgon-container-run: $first exited (gorgond: $rc_gd, gorgon-sidecar: $rc_sc);" \
    "stopping the container" >&2
if [[ $first == gorgon-sidecar ]]; then exit $((rc_sc ? rc_sc : 1)); fi
exit $((rc_gd ? rc_gd : 1))
