#!/usr/bin/env bash
# scripts/install-deps.sh: installs what the tests need and this machine lacks (as root on
# Debian; elsewhere it says what is missing). scripts/test-all.sh runs it first.
#
#   Debian packages: spin and gcc (the Spin models), iproute2 (ip, tc: the shaped link of the
#   QEMU comparison), QEMU 10.0 (`qemu-system-x86`) from bookworm-backports, added by copying
#   the machine's own Debian source entry with its suite changed (no host name is written);
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

if command -v rustup >/dev/null 2>&1; then
    for c in miri rust-src; do
        rustup component list --toolchain nightly --installed 2>/dev/null | grep -q "^$c" ||
            rustup component add "$c" --toolchain nightly
    done
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
    msrv=$(sed -n '/^\[package\]/,/^\[/s/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
    rustup run "$msrv" rustc --version >/dev/null 2>&1 ||
        rustup toolchain install "$msrv" --profile minimal
fi
if [[ "${INSTALL_FUZZ:-0}" == 1 ]]; then
    cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
fi
