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
#   PREFIX/lib/systemd/system/     gorgond.service (paths rewritten for PREFIX)
#   SYSCONFDIR/gorgon/             gorgond.ini (example; an existing one is kept)
# SYSCONFDIR is /etc for PREFIX=/usr, else PREFIX/etc.
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
       lib/systemd/system/gorgond.service)

if ((uninstall)); then
    for p in "${progs[@]}"; do rm -f "$R/bin/$p"; done
    for f in "${files[@]}"; do rm -f "$R/$f"; done
    rmdir "$R/libexec/gorgon" 2>/dev/null || true
    # the config is the administrator's now: left in place, and said so
    if [[ -e $DESTDIR$SYSCONFDIR/gorgon/gorgond.ini ]]; then
        echo "uninstall: kept $DESTDIR$SYSCONFDIR/gorgon/gorgond.ini (remove it by hand)" >&2
    fi
    exit 0
fi

[[ -x $B/bin/gorgond && -x $B/bin/gorgon-worker && -f $B/lib/libgorgon.so.0 ]] ||
    { echo "install: $B is not a complete build (run make first)" >&2; exit 1; }
install -d "$R/bin" "$R/libexec/gorgon" "$R/include" "$R/lib/pkgconfig" \
    "$R/lib/systemd/system" "$DESTDIR$SYSCONFDIR/gorgon"
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
sed -e "s|/usr/local/bin/|$PREFIX/bin/|g" -e "s|/etc/gorgon/|$SYSCONFDIR/gorgon/|g" \
    "$root/deploy/gorgond.service" >"$R/lib/systemd/system/gorgond.service"
chmod 0644 "$R/lib/systemd/system/gorgond.service"
if [[ ! -e $DESTDIR$SYSCONFDIR/gorgon/gorgond.ini ]]; then
    install -m 0644 "$root/deploy/gorgond.ini" "$DESTDIR$SYSCONFDIR/gorgon/gorgond.ini"
fi
echo "installed gorgon $version into $DESTDIR$PREFIX" >&2
