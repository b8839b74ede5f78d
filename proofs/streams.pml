/*
 * streams.pml: pagehint's postcopy protocol with two fault streams, one hint slot each
 * (HintPolicy::PerStream: src/streams.rs, src/cursors.rs, src/scheduler/per_stream.rs).
 *
 * One return-path thread serves NREQ requests, each from stream 0 or 1 (serve_from, send,
 * urgent_sent_from: the offer goes into the stream's own slot, set-if-empty). One background
 * thread polls both slots before each step; a hint (re)starts its stream's cursor with a run
 * of RUN host pages. While a cursor is live, turns go to the cursors in round robin, one claim
 * each, and after SHARE cursor claims the linear scan takes one step (scan_claim, as in
 * postcopy.pml). A cursor claims the host page at its edge (ClaimBatch::HOST_PAGE), passing
 * over host pages with nothing to claim (each counts against its run), and retires at its
 * block's end or when its run is spent; a run spent by a claim hands its edge to the linear
 * scan, which jumps there and restarts its clean count (one spent passing over hands nothing
 * off). A hint inside what the live run has claimed continues the run with a fresh budget. Completion is the linear scan's alone: swept >= TOTAL after a step that claimed
 * nothing.
 *
 * Same scaled layout as pagehint.pml (block 0: two narrow host pages; block 1: one wide host
 * page of two words and a summary bit). Cursors run forward only (the bubbling of backward
 * streams only changes where a claim is made, and claims go through the same claim_chunk).
 *
 * Checked (check.sh):
 *   I1 I2 I3  as in postcopy.pml;
 *   I4S       per slot: at most one hint pending in each slot; a take from slot s returns
 *             the value stream s's accepted offer stored; an offer of stream s is refused only
 *             while stream s's own hint is pending (another stream's never is in the way);
 *   L5term    (LTL, weak fairness) the background finishes its round.
 * Mutants:
 *   MUT_SHARED_SLOT       both streams offer into, and the background takes from, slot 0
 *                         (streams mapped to one slot): rejected by I4S;
 *   MUT_CURSOR_COUNTS     the host pages a cursor claims count as verified clean by the linear
 *                         scan (its count is no longer contiguous): done while a host page is
 *                         dirty, rejected by I3;
 * A hint in the other block while a run is live is a detour (its host page claimed at the
 * cursor's next turn, the run goes on), a second one in a row a new run ("far" is the other
 * block in this layout; src/cursors.rs measures a run's reach; reached with -DRUN=2).
 * Not reached in this layout: a run continued by a hint inside what it claimed (a cursor's
 * run ends at its block's end after one host page here); shuttle's six-stream case reaches it.
 * Not modelled here: a hand-off jump that keeps the clean count (loom's and shuttle's
 * JumpKeepsCount). In this layout the only hand-off point, (0,2), directly follows the
 * cursor's own host page, so the pages such a jump skips are always claimed; see README.md.
 */

#include "pagehint.pml"

#ifndef NREQ
#define NREQ 2
#endif
#ifndef RUN
#define RUN 1           /* host pages per run */
#endif
#ifndef SHARE
#define SHARE 1         /* cursor claims per linear step */
#endif

#ifdef P_I4S
#define ASSERT_I4S(e) assert(e)
#else
#define ASSERT_I4S(e) skip
#endif

#ifdef MUT_SHARED_SLOT
#define SLOT(s) 0
#else
#define SLOT(s) (s)
#endif

byte cells[2];          /* HintSlots: slot s's PageHint cell, 0 = empty */
byte spend[2];          /* ghost: accepted hints of stream s not yet taken */
byte sval[2];           /* ghost: the value of stream s's pending accepted hint */
bit  bg_done;

/* PageHint::offer into stream s's slot: a load pre-check, then a CAS from empty. A refusal,
 * at either step, must be stream s's own pending hint (checked atomically with the access). */
inline offer_s(s, v, acc) {
    acc = 0;
    atomic {
        seen = cells[SLOT(s)];
        if
        :: seen != 0 -> ASSERT_I4S(spend[s] > 0)      /* pre-check: Pending */
        :: else -> skip
        fi
    };
    if
    :: seen == 0 ->
        atomic {
            if
            :: cells[SLOT(s)] == 0 -> cells[SLOT(s)] = v; acc = 1; spend[s]++; sval[s] = v;
                                      ASSERT_I4S(spend[s] == 1);
                                      printf("T1: stream %d offers (%d,%d): accepted\n", s, DECB(v), DECP(v))
            :: else -> ASSERT_I4S(spend[s] > 0)       /* CAS failed: Pending */
            fi
        }
    :: else -> skip
    fi;
    seen = 0
}

/* PageHint::take from stream s's slot: load pre-check, then swap(EMPTY). */
inline take_s(s, v) {
    v = 0;
    if
    :: cells[SLOT(s)] == 0 -> skip
    :: else ->
        atomic {
            v = cells[SLOT(s)]; cells[SLOT(s)] = 0;
            if
            :: v != 0 -> ASSERT_I4S(spend[s] == 1 && v == sval[s]); spend[s]--;
                         printf("T2: takes stream %d's hint (%d,%d)\n", s, DECB(v), DECP(v))
            :: else -> skip
            fi
        }
    fi
}

proctype Urgent() {
    byte i, s, h, b, p, got, acc, e, hv, seen;
    byte tid = 1, mine, cfirst, cmask, cwi, cold;
    for (i : 1 .. NREQ) {
        select (s : 0 .. 1);
        select (h : 0 .. NHP - 1);
        atomic { b = (h == 2 -> 1 : 0); p = (h == 1 -> 2 : 0);
                 printf("T1: stream %d requests host page %d\n", s, h) };
        claim_chunk(b, p, HSHIFT(b), got);
        if
        :: got != 0 ->
            send_claim(b, got);
            atomic { e = ((p >> HSHIFT(b)) + 1) << HSHIFT(b); hv = ENC(AFTER_B(b, e), AFTER_P(b, e)) };
            offer_s(s, hv, acc)
        :: else -> skip
        fi;
        atomic { s = 0; h = 0; b = 0; p = 0; got = 0; acc = 0; e = 0; hv = 0 }
    }
}

/* Starts stream s's cursor at the hint v (any valid page; the cursor claims its host page).
 * A hint inside what the live run claimed (cf..cp) continues the run: a fresh budget, the
 * same edge. */
#define CONT(s, v) (clive[s] && cb[s] == DECB(v) && cf[s] <= DECP(v) && DECP(v) < cp[s])
#define FAR(s, v)  (clive[s] && !cdet[s] && cb[s] != DECB(v))
inline start(s, v) {
    atomic {
        if
        :: DECP(v) < PAGES(DECB(v)) && CONT(s, v) ->
            cbud[s] = RUN; cdet[s] = 0; printf("T2: stream %d's run continues\n", s)
        :: DECP(v) < PAGES(DECB(v)) && !CONT(s, v) && FAR(s, v) ->
            cdv[s] = v; cdet[s] = 1; printf("T2: stream %d detours to (%d,%d)\n", s, DECB(v), DECP(v))
        :: DECP(v) < PAGES(DECB(v)) && !CONT(s, v) && !FAR(s, v) ->
            cb[s] = DECB(v); cp[s] = DECP(v); cf[s] = DECP(v); clive[s] = 1; cbud[s] = RUN;
            cdet[s] = 0; cdv[s] = 0
        :: else -> skip
        fi
    }
}

proctype Background(byte blk; byte pg) {
    byte swept = 0, since = 0, last = 1;
    byte v, tb, cand, s, got, x, end, k, q;
    byte cb[2], cp[2], cf[2], cbud[2], cdv[2], db, dp;
    bit  clive[2], cdet[2], served;
    byte tid = 2, mine, cfirst, cmask, cwi, cold;
    do
    :: /* poll both slots */
        take_s(0, v);
        if :: v != 0 -> start(0, v) :: else -> skip fi;
        take_s(1, v);
        if :: v != 0 -> start(1, v) :: else -> skip fi;
        /* the cursors' turn: round robin after `last`, unless the linear scan is due */
        served = 0;
        if
        :: (clive[0] || clive[1] || cdv[0] != 0 || cdv[1] != 0) && since < SHARE ->
            for (q : 1 .. 2) {
                s = (last + q) % 2;
                /* a detour first: the chunk at a far hint, then the run goes on */
                if
                :: !served && cdv[s] != 0 ->
                    atomic { db = DECB(cdv[s]); dp = DECP(cdv[s]); cdv[s] = 0 };
                    claim_chunk(db, dp, HSHIFT(db), got);
                    if
                    :: got != 0 ->
                        send_claim(db, got);
                        atomic { served = 1; last = s; since++; db = 0; dp = 0 }
                    :: else -> atomic { db = 0; dp = 0 }
                    fi
                :: else -> skip
                fi;
                if
                :: !served && clive[s] ->
                    /* the edge passes over host pages with nothing to claim, within the run;
                     * a run spent that way, or at the block's end, retires (no hand-off) */
                    do
                    :: claim_chunk(cb[s], cp[s], HSHIFT(cb[s]), got);
                        if
                        :: got != 0 -> break
                        :: else ->
                            atomic {
                                end = ((cp[s] >> HSHIFT(cb[s])) + 1) << HSHIFT(cb[s]);
                                if
                                :: end >= PAGES(cb[s]) || cbud[s] <= 1 -> clive[s] = 0;
                                    printf("T2: stream %d's cursor retires\n", s)
                                :: else -> cp[s] = end; cbud[s]--;
                                    printf("T2: stream %d's cursor passes over a taken host page\n", s)
                                fi
                            };
                            if :: !clive[s] -> break :: else -> skip fi
                        fi
                    od;
                    if
                    :: got != 0 ->
                        send_claim(cb[s], got);
                        atomic {
                            served = 1; last = s; since++;
                            end = ((cp[s] >> HSHIFT(cb[s])) + 1) << HSHIFT(cb[s]);
                            cbud[s]--;
#ifdef MUT_CURSOR_COUNTS
                            /* MUTANT: the cursor's host page counts as verified by the scan */
                            swept = swept + (1 << HSHIFT(cb[s]));
#endif
                            if
                            :: end >= PAGES(cb[s]) -> clive[s] = 0       /* block edge */
                            :: else -> cp[s] = end;
                                if
                                :: cbud[s] == 0 ->                       /* spent: hand-off */
                                    clive[s] = 0;
                                    if
                                    :: cb[s] != blk || end != pg ->
                                        blk = cb[s]; pg = end;
                                        swept = 0;
                                        printf("T2: stream %d's run spent; scan jumps to (%d,%d), clean count %d\n", s, blk, pg, swept)
                                    :: else -> skip
                                    fi
                                :: else -> skip
                                fi
                            fi
                        }
                    :: else -> skip
                    fi
                :: else -> skip
                fi
            }
        :: else -> skip
        fi;
        if
        :: served -> skip
        :: else ->
            since = 0;
            scan_claim();
            if
            :: cand != 255 && got != 0 -> send_claim(tb, got)
            :: else -> skip
            fi;
            if
            :: (cand == 255 || got == 0) && swept >= TOTAL ->
                atomic {
                    ASSERT_I3((dirty0[0] == 0 || claimed[0]) && (dirty0[1] == 0 || claimed[1])
                              && (dirty0[2] == 0 || claimed[2]));
                    printf("T2: round complete; owned %d %d %d, dirty at start %d %d %d\n",
                           claimed[0], claimed[1], claimed[2], dirty0[0], dirty0[1], dirty0[2]);
                    bg_done = 1
                };
                break
            :: else -> skip
            fi
        fi;
        atomic { v = 0; tb = 0; cand = 0; got = 0; x = 0; end = 0; k = 0; s = 0; q = 0; served = 0 }
    od
}

init {
    byte h;
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
        printf("start: words %d %d %d\n", w[0], w[1], w[2]);
        run Urgent();
        select (h : 0 .. NHP - 1);
        run Background((h == 2 -> 1 : 0), (h == 1 -> 2 : 0));
        printf("start: background_from host page %d\n", h)
    };
    (_nr_pr == 1);
    ASSERT_I1((dirty0[0] == 0 || sent[0] > 0) && (dirty0[1] == 0 || sent[1] > 0)
              && (dirty0[2] == 0 || sent[2] > 0))
}

ltl L5term { <> bg_done }
