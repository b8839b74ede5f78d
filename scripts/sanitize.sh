#!/usr/bin/env bash
# scripts/sanitize.sh: the dynamic checks beyond `cargo test` (see proofs/README.md):
#   miri  - `cargo +nightly miri test --lib`: the unit tests, including src/storage.rs's
#           unsafe code, under Miri (undefined behaviour, data races, leaks); plus the postcopy
#           stress tests with one round (Miri's own race detector and weak-memory emulation;
#           about 3 minutes; the precopy one spins too long under Miri and runs under TSan);
#   tsan  - tests/stress.rs under ThreadSanitizer (-Zsanitizer=thread -Zbuild-std), with
#           PAGEHINT_STRESS_ROUNDS rounds (default 300: about 3 million protocol operations, ~15 s);
#   fuzz  - every cargo-fuzz target for FUZZ_SECONDS seconds each (default 30), from the
#           checked-in seed corpus fuzz/corpus/<target>/ (new inputs go to a scratch dir).
#
# Usage: scripts/sanitize.sh [--install] [miri] [tsan] [fuzz]   (no step named: all three)
#   --install  first add what is missing: nightly's miri and rust-src components (rustup)
#              and cargo-fuzz (cargo install). Without it nothing is installed; a missing
#              tool stops the script with the command that installs it.
# Environment: CARGO_TARGET_DIR (default target/sanitize), FUZZ_SECONDS,
#              PAGEHINT_STRESS_ROUNDS, MIRI_STRESS_ROUNDS (default 1; 0 skips that part).
set -euo pipefail

cd "$(dirname "$0")/.."
root="$(pwd)"
install=0
steps=()
for arg in "$@"; do
    case "$arg" in
        --install) install=1 ;;
        miri | tsan | fuzz) steps+=("$arg") ;;
        *) echo "usage: $0 [--install] [miri] [tsan] [fuzz]" >&2; exit 2 ;;
    esac
done
[[ ${#steps[@]} -eq 0 ]] && steps=(miri tsan fuzz)
target="${CARGO_TARGET_DIR:-$root/target/sanitize}"
host="$(rustc +nightly -vV | sed -n 's/^host: //p')"

need_component() {
    if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q "^$1"; then
        if [[ $install -eq 1 ]]; then
            rustup component add "$1" --toolchain nightly
        else
            echo "sanitize.sh: nightly component $1 missing: rustup component add $1 --toolchain nightly (or pass --install)" >&2
            exit 2
        fi
    fi
}

step() {
    local name="$1" t0
    shift
    t0=$(date +%s)
    echo "== $name"
    "$@"
    echo "== $name ok ($(($(date +%s) - t0)) s)"
}

miri() {
    need_component miri
    need_component rust-src
    CARGO_TARGET_DIR="$target/miri" cargo +nightly miri test --lib
    local rounds="${MIRI_STRESS_ROUNDS:-1}"
    if [[ "$rounds" != 0 ]]; then
        PAGEHINT_STRESS_ROUNDS="$rounds" CARGO_TARGET_DIR="$target/miri" \
            cargo +nightly miri test --test stress postcopy
    fi
}

tsan() {
    need_component rust-src
    # halt_on_error: the first race report fails the run.
    RUSTFLAGS="-Zsanitizer=thread" RUSTDOCFLAGS="-Zsanitizer=thread" \
        TSAN_OPTIONS="halt_on_error=1 ${TSAN_OPTIONS:-}" \
        PAGEHINT_STRESS_ROUNDS="${PAGEHINT_STRESS_ROUNDS:-300}" \
        cargo +nightly test -Zbuild-std --target "$host" --target-dir "$target/tsan" \
        --test stress -- --nocapture
}

fuzz() {
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        if [[ $install -eq 1 ]]; then
            cargo install cargo-fuzz --locked
        else
            echo "sanitize.sh: cargo-fuzz missing: cargo install cargo-fuzz (or pass --install)" >&2
            exit 2
        fi
    fi
    local secs="${FUZZ_SECONDS:-30}" scratch
    scratch="$(mktemp -d "${TMPDIR:-/tmp}/pagehint-fuzz.XXXXXX")"
    cd "$root/fuzz"
    for t in $(cargo +nightly fuzz list); do
        mkdir -p "$scratch/$t"
        # The first corpus dir receives new inputs; the checked-in seeds stay untouched.
        cargo +nightly fuzz run --target-dir "$target/fuzz" "$t" "$scratch/$t" "corpus/$t" \
            -- -max_total_time="$secs"
    done
    rm -rf "$scratch"
    cd "$root"
}

for s in "${steps[@]}"; do
    step "$s" "$s"
done
