#!/bin/bash
# `make install` into the live system as root, the way an administrator runs
# it, but inside a private mount namespace (tests/deploy/test_live_install.c
# runs this under `unshare --mount --net`): /etc is a copy, /usr/local, /run
# and /var/lib are empty tmpfs, the network is a private loopback, so the
# machine itself is not touched. Then the installed units' ExecStart= lines
# run as the units would run them (user gorgon, no new privileges) with the
# installed config: gorgond serves a generation, and so does the sidecar
# over HTTP when it is built.
#   live_install.sh BUILD_DIR MODEL.gguf WORK_DIR
set -euo pipefail
build=$1 model=$2 work=$3
repo=$PWD
say() { echo "live_install: $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

ip link set lo up
cp -a /etc "$work/etc"
mount --bind "$work/etc" /etc
mount -t tmpfs -o mode=0755 tmpfs /usr/local
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/lib
getent passwd gorgon >/dev/null && fail "a user gorgon exists before the install"

PREFIX=/usr/local "$repo/deploy/install.sh" "$build"

# the user, the directories, the unit
pw=$(getent passwd gorgon) || fail "make install made no user gorgon"
[[ $(stat -c '%U:%G %a' /run/gorgon) == "gorgon:gorgon 750" ]] ||
    fail "/run/gorgon is $(stat -c '%U:%G %a' /run/gorgon), not gorgon:gorgon 750"
[[ -d /var/lib/gorgon ]] || fail "make install made no /var/lib/gorgon"
unit=/usr/local/lib/systemd/system/gorgond.service
out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $out"
[[ -z $out ]] || fail "systemd-analyze verify complained: $out"

# the model where the config and docs/deploy.md put it
grep -q '^model = /var/lib/gorgon/model.gguf$' /usr/local/etc/gorgon/gorgond.ini ||
    fail "the installed config has no model = /var/lib/gorgon/model.gguf"
install -m 0644 -o root -g gorgon "$model" /var/lib/gorgon/model.gguf

# ExecStart= as the unit runs it
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
read -r -a argv <<<"$exec_start"
setpriv --reuid gorgon --regid gorgon --init-groups --no-new-privs -- "${argv[@]}" \
    --log-level warn &
gd=$!
sock=/run/gorgon/gorgon.sock
for ((i = 0; ; i++)); do
    /usr/local/bin/gorgon ping --socket "$sock" -c 1 >/dev/null 2>&1 && break
    kill -0 "$gd" 2>/dev/null || fail "gorgond ($exec_start) exited before it listened"
    ((i < 600)) || fail "gorgond did not listen on $sock within 60 s"
    sleep 0.1
done
[[ $(stat -c '%U:%G %a' "$sock") == "gorgon:gorgon 660" ]] ||
    fail "$sock is $(stat -c '%U:%G %a' "$sock"), not gorgon:gorgon 660"
text=$(/usr/local/bin/gorgon generate --socket "$sock" -p "Once upon a time" -n 8 2>/dev/null) ||
    fail "gorgon generate through the installed gorgond failed"
[[ -n $text ]] || fail "gorgon generate printed nothing"
# Outside group gorgon the socket stays shut.
if setpriv --reuid nobody --regid nogroup --clear-groups -- \
    /usr/local/bin/gorgon ping --socket "$sock" -c 1 >/dev/null 2>&1; then
    fail "user nobody reached gorgond's socket"
fi

# The sidecar's unit, when the sidecar is built: verified with gorgond's,
# its ExecStart= answers /health and a completion.
sunit=/usr/local/lib/systemd/system/gorgon-sidecar.service
if [[ -x /usr/local/bin/gorgon-sidecar ]]; then
    [[ -e $sunit ]] || fail "gorgon-sidecar is installed but its unit is not"
    out=$(systemd-analyze verify "$sunit" "$unit" 2>&1) || fail "systemd-analyze verify: $out"
    [[ -z $out ]] || fail "systemd-analyze verify complained: $out"
    sexec=$(sed -n 's/^ExecStart=//p' "$sunit")
    read -r -a sargv <<<"$sexec"
    listen=$(sed -n 's/.*--listen \([^ ]*\).*/\1/p' <<<"$sexec")
    [[ -n $listen ]] || fail "the sidecar's ExecStart= has no --listen"
    setpriv --reuid gorgon --regid gorgon --init-groups --no-new-privs -- "${sargv[@]}" &
    sc=$!
    for ((i = 0; ; i++)); do
        curl -fsS -o /dev/null "http://$listen/health" 2>/dev/null && break
        kill -0 "$sc" 2>/dev/null || fail "gorgon-sidecar ($sexec) exited"
        ((i < 600)) || fail "the sidecar's /health on $listen did not answer within 60 s"
        sleep 0.1
    done
    resp=$(curl -fsS "http://$listen/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt":"Once upon a time","max_tokens":8}') ||
        fail "POST /v1/completions through the sidecar failed"
    grep -q '"choices"' <<<"$resp" || fail "the sidecar answered without choices: $resp"
    say "sidecar: $resp"
    kill -TERM "$sc"
    wait "$sc" || true
fi

kill -TERM "$gd"
rc=0
wait "$gd" || rc=$?
((rc == 0)) || fail "gorgond exited $rc on SIGTERM"
[[ ! -e $sock ]] || fail "gorgond left $sock"

PREFIX=/usr/local "$repo/deploy/install.sh" --uninstall "$build"
[[ ! -e $unit ]] || fail "uninstall left $unit"
say "generated: $text"
echo "live install ok"
