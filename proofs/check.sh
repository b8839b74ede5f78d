#!/usr/bin/env bash
# proofs/check.sh: run every Spin model of pagehint's protocol and every mutant.
#
# Needs `spin` (Debian package `spin`) and a C compiler (`gcc`, or $CC); installs nothing.
# Prints one line per model and property:
#     MODEL PROPERTY ok
#     MODEL PROPERTY violated (expected: WHY)         a mutant, or a documented weak spot
# and exits non-zero if a model fails a property it must satisfy, if a mutant passes (a
# check that cannot fail proves nothing), or if a search is incomplete.
#
# Every search is exhaustive (no bitstate hashing); -DCOLLAPSE only compresses stored states.
# Counterexample trails and their replays (spin -t, the printf story of the run) are kept in
# $PROOFS_OUT (default: a fresh temporary directory, printed at the end).
#
# Usage: proofs/check.sh [FILTER]   (FILTER: run only the lines whose MODEL contains it)
set -u

here="$(cd "$(dirname "$0")" && pwd)"
filter="${1:-}"
CC="${CC:-gcc}"
for tool in spin "$CC"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "check.sh: '$tool' not found (Debian: apt-get install spin gcc)" >&2
        exit 2
    fi
done
out="${PROOFS_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/pagehint-proofs.XXXXXX")}"
mkdir -p "$out"
failures=0
start_all=$(date +%s)

# run KIND MODEL PROPS EXPECT WHY FILE [SPIN_DEFINES...]
#   KIND: safety (assertions) or an LTL claim name (liveness, weak fairness).
#   PROPS: space-separated property names; safety properties are enabled with -DP_<NAME>.
#          When several are given and all hold, one search proves them all; if that search
#          finds a violation, each property is searched alone to say which one fails.
#   EXPECT: ok or violated.
run() {
    local kind="$1" model="$2" props="$3" expect="$4" why="$5" file="$6"
    shift 6
    if [[ -n "$filter" && "$model" != *"$filter"* ]]; then
        return
    fi
    local res
    if [[ "$kind" == safety ]]; then
        local defs=()
        for p in $props; do defs+=("-DP_$p"); done
        res=$(search "$model.${props// /+}" safety "$file" "${defs[@]}" "$@")
        if [[ "$res" == violated && $(wc -w <<<"$props") -gt 1 ]]; then
            for p in $props; do
                report "$model" "$p" "$(search "$model.$p" safety "$file" "-DP_$p" "$@")" \
                    "$expect" "$why"
            done
            return
        fi
    else
        res=$(search "$model.$kind" "$kind" "$file" "$@")
    fi
    for p in $props; do
        report "$model" "$p" "$res" "$expect" "$why"
    done
}

# search TAG KIND FILE DEFINES... -> prints ok | violated | incomplete
search() {
    local tag="$1" kind="$2" file="$3"
    shift 3
    local dir="$out/$tag"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$here"/*.pml "$dir"/
    (
        cd "$dir" || exit 1
        spin -a "$@" "$file" >spin.log 2>&1 || { echo incomplete; exit; }
        if [[ "$kind" == safety ]]; then
            "$CC" -O2 -w -DCOLLAPSE -DSAFETY -DNOCLAIM -o pan pan.c >cc.log 2>&1 \
                || { echo incomplete; exit; }
            ./pan -m1000000 >pan.log 2>&1
        else
            "$CC" -O2 -w -DCOLLAPSE -o pan pan.c >cc.log 2>&1 || { echo incomplete; exit; }
            ./pan -m1000000 -a -f -N "$kind" >pan.log 2>&1
        fi
        if grep -q "errors: [1-9]" pan.log; then
            # keep the counterexample and its story
            spin -t "$@" "$file" >trail.txt 2>&1
            echo violated
        elif grep -q "errors: 0" pan.log && ! grep -qiE "search not completed|max search depth too small|out of memory" pan.log; then
            echo ok
        else
            echo incomplete
        fi
    )
}

report() {
    local model="$1" prop="$2" res="$3" expect="$4" why="$5"
    if [[ "$res" == "$expect" ]]; then
        if [[ "$res" == violated ]]; then
            echo "$model $prop violated (expected: $why)"
        else
            echo "$model $prop ok"
        fi
    else
        failures=$((failures + 1))
        case "$res" in
            ok) echo "$model $prop ok (UNEXPECTED: must be violated: $why)" ;;
            violated) echo "$model $prop violated (UNEXPECTED; trail in $out)" ;;
            *) echo "$model $prop incomplete (search failed or truncated; logs in $out)" ;;
        esac
    fi
}

echo "# $(spin -V | head -1); models in proofs/, work files in $out"

# --- the hint cell alone: two offerers, two takers ----------------------------------------
run safety hint "I4" ok "" hint.pml
run safety hint.mutant_overwrite_offer I4 violated "a plain store overwrites a pending hint" \
    hint.pml -DMUT_OVERWRITE_OFFER
run safety hint.mutant_racy_offer I4 violated "load-then-store offer: two offers both land" \
    hint.pml -DMUT_RACY_OFFER
run safety hint.mutant_racy_take I4 violated "load-then-store take: one hint taken twice" \
    hint.pml -DMUT_RACY_TAKE

# --- postcopy: return path + background over bitmap, hint and scan position ----------------
run safety postcopy "I1 I2 I3 I4" ok "" postcopy.pml
run safety postcopy I3BITS violated \
    "a wide host page whose summary bit the urgent path has cleared still has page bits set until its swaps; it is owned, not lost (see README)" \
    postcopy.pml
run L5req postcopy L5req ok "" postcopy.pml
run L5term postcopy L5term ok "" postcopy.pml
run safety postcopy_word_batch "I1 I2 I3 I4" ok "" postcopy.pml -DBATCH=2
run L5term postcopy_word_batch L5term ok "" postcopy.pml -DBATCH=2
run safety postcopy_3_requests "I1 I2 I3 I4" ok "" postcopy.pml -DNREQ=3
run safety postcopy_stray_hints "I1 I2 I3 I4" ok "" postcopy.pml -DSTRAY_HINTS -DNSTRAY=1
run L5term postcopy_stray_hints L5term ok "" postcopy.pml -DSTRAY_HINTS -DNSTRAY=1

run safety postcopy.mutant_nonatomic_claim I1 violated "load-then-store claim: a page sent twice" \
    postcopy.pml -DMUT_NONATOMIC_CLAIM
run safety postcopy.mutant_nonatomic_claim I2 violated "load-then-store claim: two owners" \
    postcopy.pml -DMUT_NONATOMIC_CLAIM
run safety postcopy.mutant_no_election I2 violated "wide host page split across claimers" \
    postcopy.pml -DMUT_NO_ELECTION
run safety postcopy.mutant_no_swept_reset I3 violated "completion trusts the hint: done while dirty" \
    postcopy.pml -DMUT_NO_SWEPT_RESET
run safety postcopy.mutant_overwrite_offer I4 violated "a plain store overwrites a pending hint" \
    postcopy.pml -DMUT_OVERWRITE_OFFER
run L5term postcopy.mutant_take_keeps_hint L5term violated "take never empties the cell: the scan re-jumps forever" \
    postcopy.pml -DMUT_TAKE_KEEPS_HINT
run L5req postcopy.mutant_drop_claim_on_hint L5req violated "a claimed chunk dropped for a hint is never sent" \
    postcopy.pml -DMUT_DROP_CLAIM_ON_HINT

# --- two fault streams, one hint slot each, cursors beside the linear scan -----------------
run safety streams "I1 I2 I3 I4S" ok "" streams.pml
run L5term streams L5term ok "" streams.pml
run safety streams_3_requests "I1 I2 I3 I4S" ok "" streams.pml -DNREQ=3
run safety streams_run2_share2 "I1 I2 I3 I4S" ok "" streams.pml -DRUN=2 -DSHARE=2
run safety streams.mutant_shared_slot I4S violated \
    "streams mapped to one slot: a stream's offer refused by another stream's pending hint" \
    streams.pml -DMUT_SHARED_SLOT
run safety streams.mutant_cursor_counts I3 violated \
    "a cursor's claims counted as the scan's verified pages: done while a page is dirty" \
    streams.pml -DMUT_CURSOR_COUNTS

# --- precopy: dirty-log merger against claims -------------------------------------------
run safety precopy I7 ok "" precopy.pml -DNMERGE=2
run safety precopy.mutant_summary_first I7 violated "summary bit before page bits: a dirtying lost" \
    precopy.pml -DNMERGE=2 -DMUT_SUMMARY_FIRST
run safety precopy.mutant_nonatomic_claim I7 violated "load-then-store claim erases a concurrent mark" \
    precopy.pml -DNMERGE=2 -DMUT_NONATOMIC_CLAIM

# --- QEMU's scheduler as the seed patch leaves it ----------------------------------------
run safety qemu_seed ALLCLEAN violated \
    "QEMU weak spot: a scan started from the hint reports all clean while pages are dirty" \
    qemu_seed.pml
run safety qemu_seed "I1 I3" ok "" qemu_seed.pml
run L5term qemu_seed L5term ok "" qemu_seed.pml
run safety qemu_seed.mutant_trust_all_clean I3 violated "completion on one 'all clean' answer" \
    qemu_seed.pml -DMUT_TRUST_ALL_CLEAN

if [[ $failures -eq 0 && -z "${PROOFS_OUT:-}" ]]; then
    # Nothing unexpected: the scratch (compiled verifiers, the mutants' expected trails) goes;
    # PROOFS_OUT=DIR keeps it.
    rm -rf "$out"
    echo "# 0 unexpected results; $(($(date +%s) - start_all)) s (PROOFS_OUT=DIR keeps the trails)"
else
    echo "# $((failures)) unexpected result(s); $(($(date +%s) - start_all)) s; trails in $out"
fi
[[ $failures -eq 0 ]]
