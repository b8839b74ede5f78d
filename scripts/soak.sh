#!/usr/bin/env bash
# scripts/soak.sh: the long soak of a listening source (the CI runs the short one).
#
# One source process serves SESSIONS destination sessions back to back (--sessions N) while a
# hostile client holds silent and half-hello connections open and sends garbage, bogus tokens
# and connect-and-close scans, and cuts are injected at random (0 to 2 per session); every
# session must verify, none wait long to start, and the source's RSS must stay within 10%
# from the second session to the last. Then the flood: 500 silent connections and 20 half
# hellos during a migration with 3 cuts, while a new destination arrives.
#
#   scripts/soak.sh            # 100 sessions, release build
#   SESSIONS=500 SEED=42 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PAGEHINT_SOAK_SESSIONS="${SESSIONS:-100}"
if [[ -n "${SEED:-}" ]]; then
    export PAGEHINT_SOAK_SEED="$SEED"
fi
exec cargo test --release -p pagehint-migrate --test soak -- --nocapture --test-threads 1
