#!/usr/bin/env bash
# scripts/install-deps.sh: installs what the tests need and this machine lacks (as root on
# Debian; elsewhere it says what is missing). scripts/test-all.sh runs it first.
#
#   Debian packages: spin and gcc (the Spin models), iproute2 (ip, tc: the shaped link of the
#   QEMU comparison), QEMU 10.0 (`qemu-system-x86`) from bookworm-backports, added by copying
#   the machine's own Debian source entry with its suite changed (no host name is written);
#   QEMU 11.1 (the page hint, as merged) from trixie-backports into a private prefix,
#   .deps/qemu-11.1/ (git-ignored; the system's libc untouched; see below);
#   rustup components: nightly miri and rust-src (Miri, ThreadSanitizer's -Zbuild-std),
#   stable clippy, and the library's MSRV toolchain (the `rust-version` of `pagehint` in
#   Cargo.toml, minimal profile) for the MSRV build;
#   cargo-fuzz when INSTALL_FUZZ=1 (CI's fuzz run).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "install-deps: $*"; }
root=0
[[ $(id -u) == 0 ]] && root=1

missing=()
command -v spin >/dev/null 2>&1 || missing+=(spin)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
{ command -v ip && command -v tc; } >/dev/null 2>&1 || missing+=(iproute2)
if ((${#missing[@]})); then
    if ((root)) && command -v apt-get >/dev/null 2>&1; then
        say "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}"
    else
        say "missing: ${missing[*]} (not root, or no apt-get: install them yourself)"
    fi
fi

qemu_ok() { qemu-system-x86_64 --version 2>/dev/null | grep -Eq 'version (1[0-9]|[2-9][0-9])\.'; }
if ! qemu_ok; then
    sources=/etc/apt/sources.list.d/debian.sources
    backports=/etc/apt/sources.list.d/pagehint-backports.sources
    if ((root)) && [[ -f $sources ]] && grep -q '^Suites:.*bookworm' "$sources"; then
        if [[ ! -f $backports ]]; then
            # The first stanza that names the bookworm suite (not security), suite changed.
            awk 'BEGIN { RS = ""; ORS = "\n\n" }
                 /Suites:[^\n]*bookworm([ \n]|$)/ && $0 !~ /security/ { print; exit }' "$sources" |
                sed -E 's/^Suites:.*/Suites: bookworm-backports/' >"$backports"
            say "added bookworm-backports ($backports, copied from $sources)"
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq -t bookworm-backports qemu-system-x86
        qemu-system-x86_64 --version | head -1
    else
        say "QEMU 10 is missing and cannot be installed here (needs root and Debian bookworm's" \
            "apt sources); the QEMU comparison test will skip"
    fi
fi

# QEMU 11.1 (it has the page hint: QEMU >= 10.1) from Debian's trixie-backports, into a
# private prefix: its closure needs trixie's libc, which must not replace this machine's.
# Own apt state and cache; the closure resolved against an empty dpkg status and only
# downloaded; each .deb unpacked with dpkg -x; the interpreter and rpath of a copy of the
# binary pointed into the prefix (patchelf; --force-rpath: a RUNPATH is not inherited by
# libidn2 -> libunistring); a wrapper that finds modules and firmware there and execs it, so
# that the pid stays QEMU's.
qemu11=$PWD/.deps/qemu-11.1
qemu11_ok() { "$qemu11/bin/qemu-system-x86_64" --version 2>/dev/null | grep -q 'version 11\.1\.'; }
if qemu11_ok; then
    say "QEMU 11.1 present: $qemu11/bin/qemu-system-x86_64"
elif ((root)) && [[ -f /etc/apt/sources.list.d/debian.sources ]] && command -v apt-get >/dev/null; then
    if ! command -v patchelf >/dev/null; then
        say "apt-get install patchelf"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf
    fi
    apt=$qemu11/apt
    prefix=$qemu11/root
    rm -rf "$apt" "$prefix" "$qemu11/bin"
    mkdir -p "$apt"/sources.list.d "$apt"/preferences.d "$apt"/apt.conf.d \
        "$apt"/state/lists/partial "$apt"/cache/archives/partial "$prefix" "$qemu11/bin"
    : >"$apt/status"
    # The machine's first Debian stanza that is not security's, comments dropped, suites changed.
    awk 'BEGIN { RS = ""; ORS = "\n\n" } /Suites:/ && $0 !~ /security/ { print; exit }' \
        /etc/apt/sources.list.d/debian.sources |
        sed -E -e '/^#/d' -e 's/^Suites:.*/Suites: trixie trixie-backports/' \
            >"$apt/sources.list.d/trixie.sources"
    printf '%s\n' \
        "Dir::State \"$apt/state\";" \
        "Dir::State::status \"$apt/status\";" \
        "Dir::Cache \"$apt/cache\";" \
        "Dir::Etc::SourceList \"/dev/null\";" \
        "Dir::Etc::SourceParts \"$apt/sources.list.d\";" \
        "Dir::Etc::Preferences \"/dev/null\";" \
        "Dir::Etc::PreferencesParts \"$apt/preferences.d\";" \
        "Dir::Etc::Parts \"$apt/apt.conf.d\";" \
        'APT::Architecture "amd64";' \
        'APT::Architectures { "amd64"; };' \
        'APT::Install-Recommends "false";' \
        'Debug::NoLocking "true";' >"$apt/apt.conf"
    say "QEMU 11.1: resolving qemu-system-x86 from trixie-backports (apt state in $apt)"
    APT_CONFIG=$apt/apt.conf apt-get update -qq
    APT_CONFIG=$apt/apt.conf apt-get install -qq -y --download-only --no-install-recommends \
        -t trixie-backports qemu-system-x86 >/dev/null
    debs=("$apt"/cache/archives/*.deb)
    say "QEMU 11.1: unpacking ${#debs[@]} packages into $prefix (dpkg -x; nothing installed)"
    for d in "${debs[@]}"; do dpkg -x "$d" "$prefix"; done
    lib=$prefix/usr/lib/x86_64-linux-gnu
    cp "$prefix/usr/bin/qemu-system-x86_64" "$qemu11/bin/qemu-system-x86_64.real"
    patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" \
        "$qemu11/bin/qemu-system-x86_64.real"
    printf '%s\n' '#!/bin/sh' \
        '# QEMU 11.1 from a private prefix (scripts/install-deps.sh): modules and firmware from there.' \
        "QEMU_MODULE_DIR=$lib/qemu" \
        'export QEMU_MODULE_DIR' \
        "exec $qemu11/bin/qemu-system-x86_64.real -L $prefix/usr/share/qemu -L $prefix/usr/share/seabios \"\$@\"" \
        >"$qemu11/bin/qemu-system-x86_64"
    chmod +x "$qemu11/bin/qemu-system-x86_64"
    rm -rf "$apt/cache/archives" "$apt/state/lists"
    if qemu11_ok; then
        say "QEMU 11.1: $("$qemu11/bin/qemu-system-x86_64" --version | head -1)"
        say "QEMU 11.1: $qemu11/bin/qemu-system-x86_64 (a wrapper; the system's libc untouched)"
    else
        say "QEMU 11.1: the wrapper does not run:"
        "$qemu11/bin/qemu-system-x86_64" --version 2>&1 | head -3 >&2 || true
        exit 1
    fi
else
    say "QEMU 11.1 is missing and cannot be installed here (needs root and Debian's apt" \
        "sources); compare-qemu needs it (--qemu11)"
fi

if command -v rustup >/dev/null 2>&1; then
    for c in miri rust-src; do
        rustup component list --toolchain nightly --installed 2>/dev/null | grep -q "^$c" ||
            rustup component add "$c" --toolchain nightly
    done
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    msrv=$(sed -n '/^\[package\]/,/^\[/s/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
    rustup run "$msrv" rustc --version >/dev/null 2>&1 ||
        rustup toolchain install "$msrv" --profile minimal
fi
if [[ "${INSTALL_FUZZ:-0}" == 1 ]]; then
    cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
fi
