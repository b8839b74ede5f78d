#!/usr/bin/env bash
# scripts/test-all.sh: every test of the project, in one command (the README's test command).
#
#   0. installs what this machine lacks (`scripts/install-deps.sh`: spin, gcc, iproute2,
#      QEMU 10.0 from bookworm-backports, QEMU 11.1 into .deps/qemu-11.1, nightly miri and
#      rust-src);
#   1. clippy over every target with all features, warnings denied (its `incompatible_msrv`
#      lint checks the workspace's rust-version), rustdoc with warnings denied (with and
#      without features), and a build of the library with the MSRV toolchain its own
#      rust-version names;
#   2. unit, property, integration, example and bench-smoke tests (debug), all features,
#      among them the migration harness's end-to-end tests of a KVM guest (they need root
#      for userfaultfd, KVM and hugetlb pages; wherever /dev/kvm opens they must run:
#      PAGEHINT_REQUIRE_KVM turns a skipped KVM test into a failure) and the short QEMU
#      side-by-side against QEMU 11.1 (PAGEHINT_REQUIRE_QEMU, set where install-deps brought
#      QEMU 11.1 into .deps/qemu-11.1);
#   3. examples/kvm_migration.rs on real KVM, with KVM's own and manual dirty-log clearing
#      (release), then doc tests;
#   4. loom models and their mutants      (`cargo loom`,    release, target/loom; the dirty
#      count's own: `cargo loom-count`, target/loom-count);
#   5. shuttle models and their mutants   (`cargo shuttle`, release, target/shuttle; the dirty
#      count's own: `cargo shuttle-count`, target/shuttle-count);
#   6. Spin models and their mutants      (`proofs/check.sh`; needs `spin` and gcc);
#   7. Miri over the crate's unit tests and one stress round (`scripts/sanitize.sh miri`).
#
# ThreadSanitizer and fuzzing run too when TEST_ALL_SANITIZE=1 (as CI does):
# `scripts/sanitize.sh tsan fuzz` with FUZZ_SECONDS (default 20) per fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
scripts/install-deps.sh

# A KVM test may skip (saying why) only where /dev/kvm does not open.
if [[ -z "${PAGEHINT_REQUIRE_KVM:-}" ]] && { exec 3<>/dev/kvm; } 2>/dev/null; then
    exec 3>&-
    export PAGEHINT_REQUIRE_KVM=1
    echo "/dev/kvm opens: the KVM tests must run (PAGEHINT_REQUIRE_KVM=1)"
fi
if [[ -n "${PAGEHINT_REQUIRE_KVM:-}" && -z "${PAGEHINT_REQUIRE_QEMU:-}" && $(id -u) == 0 ]] &&
    .deps/qemu-11.1/bin/qemu-system-x86_64 --version >/dev/null 2>&1; then
    export PAGEHINT_REQUIRE_QEMU=1
    echo "QEMU 11.1 and root too: the QEMU side-by-side test must run (PAGEHINT_REQUIRE_QEMU=1)"
fi
step() {
    echo
    echo "==> $* ($(($(date +%s) - start)) s elapsed)"
}
# Room to build and to write test guests' memory files: said up front, so a run that ends in
# "No space left on device" shows where the space was short. Tests keep their scratch only
# when they fail; the largest (a 256 MiB snapshot) goes to /dev/shm where it has room.
df -h . "${TMPDIR:-/tmp}" /dev/shm 2>/dev/null || true

step "formatting (cargo fmt --check), clippy (all targets, all features), rustdoc warnings, and the library's MSRV build"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --all-features --quiet
msrv=$(sed -n '/^\[package\]/,/^\[/s/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
cargo "+$msrv" check -p pagehint --features vm-memory --lib --target-dir target/msrv
step "unit, property, integration, example and bench smoke tests"
cargo test --workspace --all-targets --all-features
step "the KVM example, both dirty-log modes (a real guest migrated; skips, saying why, without /dev/kvm unless KVM is required)"
cargo run --release --example kvm_migration --features vm-memory,kvm
cargo run --release --example kvm_migration --features vm-memory,kvm -- --dirty-log manual
step "doc tests"
cargo test --workspace --doc --all-features
step "loom models (cargo loom; the dirty count's own: cargo loom-count)"
cargo loom
cargo loom-count
step "shuttle models (cargo shuttle; the dirty count's own: cargo shuttle-count)"
cargo shuttle
cargo shuttle-count
step "Spin models (proofs/check.sh)"
proofs/check.sh
step "Miri (scripts/sanitize.sh miri)"
scripts/sanitize.sh miri
if [[ "${TEST_ALL_SANITIZE:-0}" == 1 ]]; then
    step "ThreadSanitizer and fuzzing (scripts/sanitize.sh tsan fuzz)"
    FUZZ_SECONDS="${FUZZ_SECONDS:-20}" scripts/sanitize.sh tsan fuzz
fi
step "all tests passed"
