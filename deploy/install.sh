#!/bin/sh
# Installs keywarden from a build tree with the same layout as the Debian package, for other
# distributions. Idempotent: run it again after an upgrade; a config you changed is kept (the
# new default is written beside it as keywarden.toml.new).
#
#   deploy/install.sh [--prefix /usr] [--bindir DIR] [--profile release]
#   DESTDIR=/tmp/root deploy/install.sh     # stage into a directory (users are then not created)
#
# Build first: cargo build --release --workspace --bins
set -eu

prefix=/usr
profile=release
bindir=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --bindir) bindir=$2; shift 2 ;;
        --bindir=*) bindir=${1#*=}; shift ;;
        --profile) profile=$2; shift 2 ;;
        --profile=*) profile=${1#*=}; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
built=${bindir:-$here/target/$profile}
destdir=${DESTDIR:-}
libexec=$prefix/libexec/keywarden
case "$prefix" in
    /usr) systemd_dir=/usr/lib/systemd ;;
    *) systemd_dir=$prefix/lib/systemd ;;
esac

for bin in keywarden keywarden-broker keywarden-plugin-aws keywarden-plugin-http keywarden-plugin-db; do
    if [ ! -x "$built/$bin" ]; then
        echo "install.sh: $built/$bin is missing; build first: cargo build --release --workspace --bins" >&2
        exit 1
    fi
done

install -d -m 0755 "$destdir$prefix/bin" "$destdir$libexec" \
    "$destdir$systemd_dir/system" "$destdir$prefix/lib/sysusers.d" \
    "$destdir$prefix/lib/tmpfiles.d" "$destdir$prefix/share/doc/keywarden"
install -m 0755 "$built/keywarden" "$built/keywarden-broker" "$destdir$prefix/bin/"
for plugin in aws http db; do
    install -m 0755 "$built/keywarden-plugin-$plugin" "$destdir$libexec/"
done
sed "s|/usr/bin/keywarden|$prefix/bin/keywarden|" "$here/deploy/systemd/keywarden.service" \
    > "$destdir$systemd_dir/system/keywarden.service"
chmod 0644 "$destdir$systemd_dir/system/keywarden.service"
install -m 0644 "$here/deploy/systemd/keywarden.sysusers" "$destdir$prefix/lib/sysusers.d/keywarden.conf"
install -m 0644 "$here/deploy/systemd/keywarden.tmpfiles" "$destdir$prefix/lib/tmpfiles.d/keywarden.conf"
install -m 0644 "$here/README.md" "$destdir$prefix/share/doc/keywarden/README.md"

# The config, with each plugin pinned to the hash of the file just installed.
sha() { sha256sum "$destdir$libexec/keywarden-plugin-$1" | cut -d' ' -f1; }
config=$(mktemp)
trap 'rm -f "$config"' EXIT
sed -e "s|@LIBEXEC@|$libexec|g" -e "s|@SHA256_AWS@|$(sha aws)|" \
    -e "s|@SHA256_HTTP@|$(sha http)|" -e "s|@SHA256_DB@|$(sha db)|" \
    "$here/deploy/keywarden.toml.in" > "$config"
install -d -m 0750 "$destdir/etc/keywarden"
target=$destdir/etc/keywarden/keywarden.toml
if [ ! -e "$target" ]; then
    install -m 0640 "$config" "$target"
elif ! cmp -s "$config" "$target"; then
    install -m 0640 "$config" "$target.new"
    echo "install.sh: kept your $target; the new default is $target.new"
fi

# Users and directories, on the live system only.
if [ -z "$destdir" ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$prefix/lib/sysusers.d/keywarden.conf"
        systemd-tmpfiles --create "$prefix/lib/tmpfiles.d/keywarden.conf"
    fi
    chgrp keywarden /etc/keywarden /etc/keywarden/keywarden.toml* 2>/dev/null || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
fi
echo "install.sh: installed keywarden under $destdir$prefix"
