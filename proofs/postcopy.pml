/*
 * postcopy.pml: pagehint's postcopy-preempt protocol (src/scheduler.rs): one return-path
 * thread (PageScheduler::serve + urgent_sent) and one background thread
 * (BackgroundScanner::next_claim) over the dirty bitmap, the hint cell and the scan position.
 * Nothing re-dirties a page after the switch to postcopy.
 *
 * Checked (see check.sh for the runs, README.md for the mapping to Rust and to loom tests):
 *   I1  every host page dirty at the start is sent exactly once (assertion at each send,
 *       and "nothing lost" when every thread has finished);
 *   I2  a host page's bits all go to one claim (assertion at each RMW that returns bits);
 *   I3  the background reports the round complete only when every host page dirty at the
 *       start has been claimed (is owned by a sender);
 *   I3BITS  the literal reading "no bit is set in the bitmap when the round completes";
 *   I4  the hint cell never holds two hints, each accepted hint is taken at most once and
 *       a taken value is exactly the pending accepted one;
 *   L5req  (LTL, weak fairness) a requested host page is eventually at the destination;
 *   L5term (LTL, weak fairness) the background thread finishes its round.
 * With -DSTRAY_HINTS a third thread offers arbitrary locations (any block, any page, also
 * mid host page): I6, hints are advisory, so I1-I3 and L5 must hold for any hint sequence.
 *
 * Mutants (-DMUT_...): NONATOMIC_CLAIM, NO_ELECTION (in pagehint.pml), OVERWRITE_OFFER,
 * TAKE_KEEPS_HINT (pagehint.pml), NO_SWEPT_RESET (the jump keeps the clean count: the
 * completion check trusts the hint), DROP_CLAIM_ON_HINT (the background abandons a claimed
 * chunk when it sees a hint).
 */

#include "pagehint.pml"

#ifndef NREQ
#define NREQ 2          /* page requests the return path serves */
#endif
#ifndef NSTRAY
#define NSTRAY 2        /* arbitrary hints offered by the stray thread */
#endif

bit  requested[NHP];    /* ghost: the destination asked for host page h */
bit  bg_done;           /* ghost: the background reported the round complete */

/* The destination holds host page h: it was clean at the switch, or it has been sent. */
#define HAVE(h) (dirty0[h] == 0 || sent[h] > 0)

/* The return-path thread: serve(req) then, on a won claim, send and urgent_sent(&claim). */
proctype Urgent() {
    byte i, h, b, p, got, acc, e, hv;
    byte tid = 1, mine, cfirst, cmask, cwi, cold;
    for (i : 1 .. NREQ) {
        /* a request for any target page of host page h (claims round down to the host page) */
        select (h : 0 .. NHP - 1);
        atomic { requested[h] = 1; b = (h == 2 -> 1 : 0); p = (h == 1 -> 2 : 0);
                 printf("T1: request for host page %d\n", h) };
        claim_chunk(b, p, HSHIFT(b), got);     /* claim_host_page: chunk = the host page */
        if
        :: got != 0 ->
            send_claim(b, got);
            /* urgent_sent: offer after(claim.end()) */
            atomic { e = ((p >> HSHIFT(b)) + 1) << HSHIFT(b); hv = ENC(AFTER_B(b, e), AFTER_P(b, e)) };
            offer(hv, acc)
        :: else -> skip                          /* AlreadyClaimed */
        fi;
        atomic { h = 0; b = 0; p = 0; got = 0; acc = 0; e = 0; hv = 0 }
    }
}

#ifdef STRAY_HINTS
/* I6: hints from anywhere: any valid location, at any time. */
proctype Stray() {
    byte i, b, p, acc, hv, tid = 3;
    for (i : 1 .. NSTRAY) {
        select (b : 0 .. NBLK - 1);
        if
        :: b == 0 -> select (p : 0 .. 3)
        :: else -> select (p : 0 .. 7)
        fi;
        hv = ENC(b, p);
        offer(hv, acc);
        atomic { b = 0; p = 0; acc = 0; hv = 0 }
    }
}
#endif

/* The background thread: PageScheduler::background_from(blk, pg), then
 * BackgroundScanner::next_claim in a loop until it returns None. */
proctype Background(byte blk; byte pg) {
    byte swept = 0;
    byte v, tb, tp, cand, s, got, x, end, k;
    byte tid = 2, mine, cfirst, cmask, cwi, cold;
    do
    :: /* follow(): take the pending hint and jump there */
        take(v);
        if
        :: v != 0 ->
            atomic {
                tb = DECB(v); tp = DECP(v);
                if
                :: tp < PAGES(tb) ->                    /* layout.check(to) */
                    if
                    :: tb != blk || tp != pg ->
                        blk = tb; pg = tp;
                        printf("T2: jumps to (%d,%d)\n", blk, pg);
#ifndef MUT_NO_SWEPT_RESET
                        swept = 0                       /* jump(): restart the clean count */
#else
                        skip                            /* MUTANT: keep counting across jumps */
#endif
                    :: else -> skip
                    fi
                :: else -> skip
                fi
            }
        :: else -> skip
        fi;
        scan_claim();
        if
        :: cand != 255 ->
            if
            :: got != 0 ->
#ifdef MUT_DROP_CLAIM_ON_HINT
                /* MUTANT: a pending hint pre-empts the chunk just claimed: it is dropped. */
                if
                :: cell != 0 -> skip
                :: else -> send_claim(tb, got)
                fi
#else
                send_claim(tb, got)
#endif
            :: else -> skip                           /* lost the claim: counted, go on */
            fi
        :: else -> skip
        fi;
        if
        :: (cand == 255 || got == 0) && swept >= TOTAL ->
            /* the round is complete: I3 */
            atomic {
                ASSERT_I3((dirty0[0] == 0 || claimed[0]) && (dirty0[1] == 0 || claimed[1])
                          && (dirty0[2] == 0 || claimed[2]));
                ASSERT_I3BITS(w[0] == 0 && w[1] == 0 && w[2] == 0);
                printf("T2: round complete; words %d %d %d, owned %d %d %d, dirty at start %d %d %d\n",
                       w[0], w[1], w[2], claimed[0], claimed[1], claimed[2], dirty0[0], dirty0[1], dirty0[2]);
                bg_done = 1
            };
            break
        :: else -> skip
        fi;
        atomic { v = 0; tb = 0; tp = 0; cand = 0; s = 0; got = 0; x = 0; end = 0; k = 0 }
    od
}

init {
    byte h;
    /* The bitmap at the switch: any host page of block 0 dirty or clean, block 1's host page
     * with either word (or both, or none) dirty; the summary bit set iff it has dirty bits. */
    atomic {
        select (h : 0 .. 3);
        w[0] = (h & 1 -> 3 : 0) | (h & 2 -> 12 : 0);
        select (h : 0 .. 3);
        w[1] = (h & 1 -> 15 : 0);
        w[2] = (h & 2 -> 15 : 0);
        sum = (w[1] | w[2] -> 1 : 0);
        dirty0[0] = (w[0] & 3 -> 1 : 0);
        dirty0[1] = (w[0] & 12 -> 1 : 0);
        dirty0[2] = sum;
        printf("start: words %d %d %d (block 0; block 1 word 0, word 1)\n", w[0], w[1], w[2]);
        run Urgent();
        /* background_from(start): the scan may start at any host page */
        select (h : 0 .. NHP - 1);
        run Background((h == 2 -> 1 : 0), (h == 1 -> 2 : 0));
        printf("start: background_from host page %d\n", h);
#ifdef STRAY_HINTS
        run Stray()
#endif
    };
    /* every thread has finished: I1, nothing lost */
    (_nr_pr == 1);
    ASSERT_I1(HAVE(0) && HAVE(1) && HAVE(2))
}

/* Liveness (check with pan -a -f -N NAME). */
ltl L5req { [] ((requested[0] -> <> HAVE(0)) && (requested[1] -> <> HAVE(1))
               && (requested[2] -> <> HAVE(2))) }
ltl L5term { <> bg_done }
