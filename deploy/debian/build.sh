#!/bin/sh
# Builds the Debian package: the binaries (release by default), the example config with each
# plugin pinned to the hash of the file the package installs, then `cargo deb`.
#
#   deploy/debian/build.sh [--profile release|dev] [--no-build] [--output DIR] [--fast]
#
# Needs cargo-deb (cargo install cargo-deb). The package lands in target/debian/ (or DIR).
set -eu

profile=release
build=yes
output=
fast=no
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=no; shift ;;
        --output) output=$2; shift 2 ;;
        --fast) fast=yes; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"
dir=target/$([ "$profile" = dev ] && echo debug || echo "$profile")
if [ "$build" = yes ]; then
    cargo build --profile "$profile" --workspace --bins
fi

# What goes into the package, stripped once here (cargo-deb is told not to strip again), so
# the hashes pinned in the config are those of the installed files.
stage=target/deb
rm -rf "$stage"
mkdir -p "$stage/bin"
for bin in keywarden keywarden-broker keywarden-plugin-aws keywarden-plugin-http keywarden-plugin-db; do
    cp "$dir/$bin" "$stage/bin/$bin"
    if [ "$profile" != dev ]; then
        strip --strip-unneeded "$stage/bin/$bin"
    fi
done
sha() { sha256sum "$stage/bin/keywarden-plugin-$1" | cut -d' ' -f1; }
sed -e "s|@LIBEXEC@|/usr/libexec/keywarden|g" -e "s|@SHA256_AWS@|$(sha aws)|" \
    -e "s|@SHA256_HTTP@|$(sha http)|" -e "s|@SHA256_DB@|$(sha db)|" \
    deploy/keywarden.toml.in > "$stage/keywarden.toml"

set -- --no-build --no-strip -p keywarden
if [ -n "$output" ]; then
    set -- "$@" --output "$output"
fi
if [ "$fast" = yes ]; then
    set -- "$@" --fast
fi
cargo deb "$@"
