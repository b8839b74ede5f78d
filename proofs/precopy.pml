/*
 * precopy.pml: I7, no lost dirtying. A dirty-log merger thread (DirtyBitmap::merge_dirty_log,
 * as KVM's log is harvested during precopy) runs concurrently with a background scanner
 * (BackgroundScanner::next_claim, hints off) and an urgent claimer
 * (DirtyBitmap::claim_host_page, as PageScheduler::serve does).
 *
 *   I7  every bit a merge sets is collected by a claim that runs after it, or is still
 *       claimable when every thread has finished: a final drain (claim_host_page on every
 *       host page, the same claim protocol) must collect every bit that no claim collected.
 *       Ghost: gw[i] = bits of word i marked and not yet collected by any claim.
 *
 * Merges: NMERGE logs; each log has, per page word, either nothing or one dirty page (any of
 * the word's 4), so a log may dirty a host page the scanner or the urgent path is claiming.
 * merge_dirty_log for the wide block ORs both page words, then sets the summary bit (the
 * order "page bits, then summary" of bitmap.rs).
 *
 * Mutants: MUT_SUMMARY_FIRST (the merger sets the summary bit before the page bits),
 * MUT_NONATOMIC_CLAIM (in pagehint.pml: a claim's load and store are two steps).
 */

#ifndef P_I7
#define P_I7
#endif
#include "pagehint.pml"

#ifndef NMERGE
#define NMERGE 1
#endif
#ifndef NURGENT
#define NURGENT 1
#endif

/* One page word's share of a log: nothing, or one of its four pages. */
inline pick(x) {
    if
    :: x = 0
    :: x = 1
    :: x = 2
    :: x = 4
    :: x = 8
    fi
}

proctype Merger() {
    byte i, l0, l1, l2;
    for (i : 1 .. NMERGE) {
        pick(l0); pick(l1); pick(l2);
        printf("T4: merges a log: block 0 word %d, block 1 words %d %d\n", l0, l1, l2);
        /* merge_dirty_log(block 0, [l0]): one fetch_or per non-zero word */
        if
        :: l0 != 0 -> atomic { w[0] = w[0] | l0; gw[0] = gw[0] | l0 }
        :: else -> skip
        fi;
        /* merge_dirty_log(block 1, [l1, l2]): page words, then the summary bit */
#ifdef MUT_SUMMARY_FIRST
        if
        :: (l1 | l2) != 0 -> atomic { sum = sum | 1; printf("T4: sets the summary bit\n") }
        :: else -> skip
        fi;
#endif
        if
        :: l1 != 0 -> atomic { w[1] = w[1] | l1; gw[1] = gw[1] | l1; printf("T4: fetch_or block 1 word 0\n") }
        :: else -> skip
        fi;
        if
        :: l2 != 0 -> atomic { w[2] = w[2] | l2; gw[2] = gw[2] | l2; printf("T4: fetch_or block 1 word 1\n") }
        :: else -> skip
        fi;
#ifndef MUT_SUMMARY_FIRST
        if
        :: (l1 | l2) != 0 -> atomic { sum = sum | 1; printf("T4: sets the summary bit\n") }
        :: else -> skip
        fi;
#endif
        atomic { l0 = 0; l1 = 0; l2 = 0 }
    }
}

/* The background scanner, one round (the sends are not I7's business). */
proctype Scanner() {
    byte blk = 0, pg = 0, swept = 0;
    byte v, tb, cand, s, got, x, end, k;
    byte tid = 2, mine, cfirst, cmask, cwi, cold;
    do
    :: swept >= TOTAL -> break
    :: else ->
        scan_claim();
        atomic { v = 0; tb = 0; cand = 0; s = 0; got = 0; x = 0; end = 0; k = 0 }
    od
}

/* The urgent path claiming requested host pages. */
proctype Urgent() {
    byte i, h, b, p, got;
    byte tid = 1, mine, cfirst, cmask, cwi, cold;
    for (i : 1 .. NURGENT) {
        select (h : 0 .. NHP - 1);
        atomic { b = (h == 2 -> 1 : 0); p = (h == 1 -> 2 : 0) };
        claim_chunk(b, p, HSHIFT(b), got);
        atomic { h = 0; b = 0; p = 0; got = 0 }
    }
}

init {
    byte h, b, p, got;
    byte tid = 3, mine, cfirst, cmask, cwi, cold;
    /* precopy starts with every page dirty (mark_all: page words, then the summary bit) */
    atomic {
        w[0] = 15; w[1] = 15; w[2] = 15; gw[0] = 15; gw[1] = 15; gw[2] = 15; sum = 1;
        run Merger();
        run Scanner();
        run Urgent()
    };
    (_nr_pr == 1);
    /* the drain: claim every host page; whatever is still uncollected was lost */
    for (h : 0 .. NHP - 1) {
        atomic { b = (h == 2 -> 1 : 0); p = (h == 1 -> 2 : 0) };
        claim_chunk(b, p, HSHIFT(b), got)
    };
    assert(gw[0] == 0 && gw[1] == 0 && gw[2] == 0)
}
