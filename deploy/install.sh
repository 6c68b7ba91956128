#!/usr/bin/env bash
# Install (or uninstall) a built tree: what `make install` / `make uninstall`
# run, with the build directory of the current MODE/SAN.
#   PREFIX=/usr/local DESTDIR= deploy/install.sh BUILD_DIR
#   PREFIX=/usr/local DESTDIR= deploy/install.sh --uninstall BUILD_DIR
#
#   PREFIX/bin/                    gorgond, gorgon, gorgon-run, gorgon-bench, gorgon-mkmodel,
#                                  gorgon-medusa-train, gorgon-sidecar (those built)
#   PREFIX/libexec/gorgon/         gorgon-worker (gorgond looks there)
#   PREFIX/include/gorgon.h
#   PREFIX/lib/                    libgorgon.a, libgorgon.so.0, libgorgon.so -> libgorgon.so.0
#   PREFIX/lib/pkgconfig/          gorgon.pc (links libgorgon.so), gorgon-static.pc (libgorgon.a)
#   PREFIX/lib/systemd/system/     gorgond.service, gorgon-sidecar.service (when the sidecar
#                                  is built); paths rewritten for PREFIX
#   PREFIX/lib/sysusers.d/         gorgon.conf (the system user "gorgon")
#   PREFIX/lib/tmpfiles.d/         gorgon.conf (/run/gorgon, /var/lib/gorgon)
#   PREFIX/share/doc/gorgon/       deploy.md
#   SYSCONFDIR/gorgon/             gorgond.ini (example; an existing one is kept)
# SYSCONFDIR is /etc for PREFIX=/usr, else PREFIX/etc.
# Installed as root into the live system (no DESTDIR), it also creates the
# user gorgon (systemd-sysusers, else useradd) and the directories of
# gorgon.conf (systemd-tmpfiles), and reloads systemd when it runs.
set -euo pipefail
uninstall=0
if [[ ${1:-} == --uninstall ]]; then
    uninstall=1
    shift
fi
B=${1:?usage: deploy/install.sh [--uninstall] BUILD_DIR}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
[[ $PREFIX == /* ]] || { echo "install: PREFIX must be absolute: $PREFIX" >&2; exit 2; }
if [[ $PREFIX == /usr ]]; then SYSCONFDIR=/etc; else SYSCONFDIR=$PREFIX/etc; fi
root=$(cd "$(dirname "$0")/.." && pwd)
R=$DESTDIR$PREFIX
version=$(git -C "$root" describe --always --dirty --tags 2>/dev/null || echo unknown)

progs=(gorgond gorgon gorgon-run gorgon-bench gorgon-mkmodel gorgon-medusa-train gorgon-sidecar)
files=(libexec/gorgon/gorgon-worker include/gorgon.h lib/libgorgon.a lib/libgorgon.so.0
       lib/libgorgon.so lib/pkgconfig/gorgon.pc lib/pkgconfig/gorgon-static.pc
       lib/systemd/system/gorgond.service lib/systemd/system/gorgon-sidecar.service
       lib/sysusers.d/gorgon.conf lib/tmpfiles.d/gorgon.conf share/doc/gorgon/deploy.md)

if ((uninstall)); then
    for p in "${progs[@]}"; do rm -f "$R/bin/$p"; done
    for f in "${files[@]}"; do rm -f "$R/$f"; done
    rmdir "$R/libexec/gorgon" "$R/share/doc/gorgon" 2>/dev/null || true
    # the config is the administrator's now: left in place, and said so
    if [[ -e $DESTDIR$SYSCONFDIR/gorgon/gorgond.ini ]]; then
        echo "uninstall: kept $DESTDIR$SYSCONFDIR/gorgon/gorgond.ini (remove it by hand)" >&2
    fi
    exit 0
fi

[[ -x $B/bin/gorgond && -x $B/bin/gorgon-worker && -f $B/lib/libgorgon.so.0 ]] ||
    { echo "install: $B is not a complete build (run make first)" >&2; exit 1; }
install -d "$R/bin" "$R/libexec/gorgon" "$R/include" "$R/lib/pkgconfig" \
    "$R/lib/systemd/system" "$R/lib/sysusers.d" "$R/lib/tmpfiles.d" "$R/share/doc/gorgon" \
    "$DESTDIR$SYSCONFDIR/gorgon"
for p in "${progs[@]}"; do
    if [[ -x $B/bin/$p ]]; then install -m 0755 "$B/bin/$p" "$R/bin/$p"; fi
done
install -m 0755 "$B/bin/gorgon-worker" "$R/libexec/gorgon/gorgon-worker"
install -m 0644 "$root/clients/gorgon.h" "$R/include/gorgon.h"
install -m 0644 "$B/lib/libgorgon.a" "$R/lib/libgorgon.a"
install -m 0755 "$B/lib/libgorgon.so.0" "$R/lib/libgorgon.so.0"
ln -sfn libgorgon.so.0 "$R/lib/libgorgon.so"
cat >"$R/lib/pkgconfig/gorgon.pc" <<PC
prefix=$PREFIX
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: gorgon
Description: libgorgon, the client of the gorgon inference appliance (shared-memory rings to gorgond)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lgorgon
Libs.private: -luring -lnuma -lm
PC
# libgorgon.a is self-contained; -Bstatic picks it over the .so (and keeps
# -L, which pkg-config's sysroot handling rewrites, unlike a plain path).
cat >"$R/lib/pkgconfig/gorgon-static.pc" <<PC
prefix=$PREFIX
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: gorgon-static
Description: libgorgon linked statically (libgorgon.a)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-Bstatic -lgorgon -Wl,-Bdynamic -luring -lnuma -lm
PC
# The units name the installed paths of this PREFIX and SYSCONFDIR.
unit() {
    sed -e "s|/usr/local/bin/|$PREFIX/bin/|g" -e "s|/etc/gorgon/|$SYSCONFDIR/gorgon/|g" \
        -e "s|/usr/local/share/doc/gorgon/|$PREFIX/share/doc/gorgon/|g" \
        "$root/deploy/$1" >"$R/lib/systemd/system/$1"
    chmod 0644 "$R/lib/systemd/system/$1"
}
unit gorgond.service
if [[ -x $B/bin/gorgon-sidecar ]]; then
    unit gorgon-sidecar.service
else
    echo "install: gorgon-sidecar is not built; its unit is not installed" >&2
fi
install -m 0644 "$root/deploy/gorgon.sysusers" "$R/lib/sysusers.d/gorgon.conf"
install -m 0644 "$root/deploy/gorgon.tmpfiles" "$R/lib/tmpfiles.d/gorgon.conf"
install -m 0644 "$root/docs/deploy.md" "$R/share/doc/gorgon/deploy.md"
case $PREFIX in
/usr | /usr/local) ;;
*) echo "install: note: systemd looks for units, sysusers.d and tmpfiles.d under /usr and" \
        "/usr/local, not $PREFIX: link or copy them to /etc/systemd/system," \
        "/etc/sysusers.d and /etc/tmpfiles.d" >&2 ;;
esac
if [[ ! -e $DESTDIR$SYSCONFDIR/gorgon/gorgond.ini ]]; then
    install -m 0644 "$root/deploy/gorgond.ini" "$DESTDIR$SYSCONFDIR/gorgon/gorgond.ini"
fi

# The live system: the user, the directories, systemd's view of the units.
if [[ -z $DESTDIR && $(id -u) == 0 ]]; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$R/lib/sysusers.d/gorgon.conf"
    elif ! getent passwd gorgon >/dev/null; then
        getent group gorgon >/dev/null || groupadd --system gorgon
        useradd --system --gid gorgon --home-dir /var/lib/gorgon --no-create-home \
            --shell /usr/sbin/nologin --comment "gorgon inference appliance" gorgon
    fi
    if command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles --create "$R/lib/tmpfiles.d/gorgon.conf"
    else
        install -d -m 0750 -o gorgon -g gorgon /run/gorgon
        install -d -m 0755 -o root -g gorgon /var/lib/gorgon
    fi
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
    fi
    echo "install: user gorgon and /run/gorgon, /var/lib/gorgon are ready; put the model at" \
        "/var/lib/gorgon/model.gguf, then: systemctl enable --now gorgond" >&2
fi
echo "installed gorgon $version into $DESTDIR$PREFIX" >&2
