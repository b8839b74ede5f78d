/*
 * pagehint.pml: the shared part of the Spin models of pagehint's protocol
 * (src/bitmap/, src/hint.rs, src/scheduler.rs), included by postcopy.pml and precopy.pml.
 *
 * Granularity: every atomic operation of the Rust code is one Promela step (one `atomic`
 * block holding the shared access plus the thread-local arithmetic around it, and the ghost
 * bookkeeping of that access). Thread-local work is invisible to other threads, so folding it
 * into the adjacent shared step hides no interleaving. Spin explores sequentially consistent
 * interleavings only: the memory orderings (release/acquire/relaxed) are loom's job
 * (loom-tests/), not these models'.
 *
 * The layout (scaled down, see README.md "Scale mapping"):
 *   W = 4 target pages per bitmap word (Rust: 64).
 *   block 0: 4 target pages, host pages of 2 target pages  -> narrow: host page <= word
 *            word w[0]; host page 0 = bits 0..1, host page 1 = bits 2..3.
 *   block 1: 8 target pages, one host page of 8 pages      -> wide: a host page spans 2 words
 *            words w[1] (pages 0..3), w[2] (pages 4..7); summary bit 0 of `sum`.
 * Host page ids (ghost only): 0 = block 0 pages 0-1, 1 = block 0 pages 2-3, 2 = block 1.
 */

#define W       4       /* target pages per word */
#define WSHIFT  2       /* log2 W; a block is wide when its host shift > WSHIFT */
#define NBLK    2
#define NW      3       /* page words */
#define NHP     3       /* host pages */
#define TOTAL   12      /* target pages in the layout */

#define PAGES(b)  ((b) == 0 -> 4 : 8)
#define HSHIFT(b) ((b) == 0 -> 1 : 3)
#define WBASE(b)  ((b) == 0 -> 0 : 1)
#define NWORDS(b) ((b) == 0 -> 1 : 2)
#define WIDE(b)   (HSHIFT(b) > WSHIFT)
#define HPID(b, p) ((b) == 0 -> ((p) >> 1) : 2)

/* Claim batch (ClaimBatch, log2 target pages): 1 = one host page of block 0, 2 = a word. */
#ifndef BATCH
#define BATCH 1
#endif
/* DirtyBitmap::scan_step's chunk: wide blocks claim one host page; narrow ones clamp(batch, host, word). */
#define CHUNK(b) (WIDE(b) -> HSHIFT(b) : (BATCH < HSHIFT(b) -> HSHIFT(b) : (BATCH > WSHIFT -> WSHIFT : BATCH)))

/* Property switches: a run enables the assertions of one property (check.sh passes -DP_xx). */
#ifdef P_I1
#define ASSERT_I1(e) assert(e)
#else
#define ASSERT_I1(e) skip
#endif
#ifdef P_I2
#define ASSERT_I2(e) assert(e)
#else
#define ASSERT_I2(e) skip
#endif
#ifdef P_I3
#define ASSERT_I3(e) assert(e)
#else
#define ASSERT_I3(e) skip
#endif
#ifdef P_I3BITS
#define ASSERT_I3BITS(e) assert(e)
#else
#define ASSERT_I3BITS(e) skip
#endif
#ifdef P_I4
#define ASSERT_I4(e) assert(e)
#else
#define ASSERT_I4(e) skip
#endif
#ifdef P_I7
#define ASSERT_I7(e) assert(e)
#else
#define ASSERT_I7(e) skip
#endif

/* ---- shared state: the Rust atomics ---- */
byte w[NW];         /* DirtyBitmap::words  */
byte sum;           /* DirtyBitmap::summary (bit 0: block 1's host page) */
byte cell;          /* PageHint::cell: 0 = empty, else 1 + block*8 + page */

/* ---- ghost state: what the properties talk about ---- */
byte owner[NHP];    /* the thread whose claim took host page h's bits (0: none yet) */
bit  claimed[NHP];  /* h has an owner: its bits were taken, or (wide) its election was won */
byte sent[NHP];     /* times host page h was sent */
bit  dirty0[NHP];   /* h had dirty pages when postcopy started */
byte hpend;         /* accepted hints not yet taken (I4) */
byte hval;          /* the value of the pending accepted hint (I4) */
byte gw[NW];        /* precopy: marked bits not yet collected by a claim (I7) */

#define ENC(b, p)   (1 + (b) * 8 + (p))
#define DECB(v)     (((v) - 1) / 8)
#define DECP(v)     (((v) - 1) % 8)

/*
 * The claim of thread `tid` got bits `bits` of word `wi` (I1/I2 ghost): the first time one
 * claim takes bits of host page h, nobody may have taken bits of h before. `mine` is the
 * claim's own set of host pages (a claim may take one host page's bits in several words).
 */
inline own(h, tid, mine) {
    if
    :: (mine & (1 << h)) == 0 -> ASSERT_I2(owner[h] == 0); owner[h] = tid; claimed[h] = 1;
                                 mine = mine | (1 << h)
    :: else -> skip
    fi
}

inline collect(wi, bits, tid, mine) {
    if
    :: wi == 0 ->
        if
        :: (bits & 3) != 0 -> own(0, tid, mine)
        :: else -> skip
        fi;
        if
        :: (bits & 12) != 0 -> own(1, tid, mine)
        :: else -> skip
        fi
    :: else ->
        if
        :: bits != 0 -> own(2, tid, mine)
        :: else -> skip
        fi
    fi;
    gw[wi] = gw[wi] & ~bits
}

/* Forget a finished claim's scratch variables (they would only multiply the states). */
#define CLAIM_RESET mine = 0; cfirst = 0; cmask = 0; cwi = 0; cold = 0

/*
 * claim_chunk (bitmap.rs) for block `b`, the chunk of 2^s target pages around page `p`.
 * Narrow: one fetch_and. Wide (claim_wide): fetch_and on the summary bit elects the only
 * claimer, which then swaps the host page's words to zero, one atomic each.
 * Out: `got` = the claimed bits (narrow: word bits; wide: OR of the page words taken).
 * The caller declares the scratch bytes `tid` (its thread id, 1 or 2), mine, cfirst, cmask,
 * cwi, cold.
 */
inline claim_chunk(b, p, s, got) {
    if
    :: !WIDE(b) ->
#ifdef MUT_NONATOMIC_CLAIM
        /* MUTANT: load, then store the cleared word (not one RMW). */
        atomic { mine = 0; cfirst = p & ~((1 << s) - 1);
                 cmask = ((1 << (1 << s)) - 1) << (cfirst % W);
                 cwi = WBASE(b) + cfirst / W; cold = w[cwi] };
        atomic { w[cwi] = cold & ~cmask; got = cold & cmask; collect(cwi, got, tid, mine);
                 printf("T%d: stores the cleared word (load was earlier): got bits %d\n", tid, got);
                 CLAIM_RESET }
#else
        atomic { mine = 0; cfirst = p & ~((1 << s) - 1);
                 cmask = ((1 << (1 << s)) - 1) << (cfirst % W);
                 cwi = WBASE(b) + cfirst / W;
                 got = w[cwi] & cmask; w[cwi] = w[cwi] & ~cmask; collect(cwi, got, tid, mine);
                 printf("T%d: fetch_and claims block %d pages %d..%d: got bits %d\n",
                        tid, b, cfirst, cfirst + (1 << s) - 1, got);
                 CLAIM_RESET }
#endif
    :: else ->
        got = 0;
#ifdef MUT_NO_ELECTION
        /* MUTANT: no summary election; every claimer swaps the page words itself. */
        atomic { mine = 0; sum = 0; cold = 1 };
#elif defined(MUT_NONATOMIC_CLAIM)
        atomic { mine = 0; cold = sum & 1 };
        atomic { sum = sum & ~1 };
#else
        atomic { mine = 0; cold = sum & 1; sum = sum & ~1;
                 if :: cold != 0 && (w[1] | w[2]) != 0 -> claimed[2] = 1 :: else -> skip fi;
                 printf("T%d: summary fetch_and for block 1's host page: elected=%d\n", tid, cold) };
#endif
        if
        :: cold != 0 ->
#ifdef MUT_NONATOMIC_CLAIM
            atomic { cold = w[1] };
            atomic { w[1] = 0; got = got | cold; collect(1, cold, tid, mine) };
            atomic { cold = w[2] };
            atomic { w[2] = 0; got = got | cold; collect(2, cold, tid, mine); CLAIM_RESET }
#else
            atomic { cold = w[1]; w[1] = 0; got = got | cold; collect(1, cold, tid, mine);
                     printf("T%d: swaps block 1 word 0: got %d\n", tid, cold) };
            atomic { cold = w[2]; w[2] = 0; got = got | cold; collect(2, cold, tid, mine);
                     printf("T%d: swaps block 1 word 1: got %d\n", tid, cold);
                     CLAIM_RESET }
#endif
        :: else -> CLAIM_RESET
        fi
    fi
}

/* Host pages of a claim, by word bits: send each (ghost) once. */
inline send_claim(b, got) {
    atomic {
        if
        :: b == 0 && (got & 3) != 0 -> sent[0]++; ASSERT_I1(sent[0] == 1);
                                        printf("T%d: sends host page 0 (block 0 pages 0-1)\n", tid)
        :: else -> skip
        fi;
        if
        :: b == 0 && (got & 12) != 0 -> sent[1]++; ASSERT_I1(sent[1] == 1);
                                         printf("T%d: sends host page 1 (block 0 pages 2-3)\n", tid)
        :: else -> skip
        fi;
        if
        :: b == 1 && got != 0 -> sent[2]++; ASSERT_I1(sent[2] == 1);
                                  printf("T%d: sends host page 2 (block 1)\n", tid)
        :: else -> skip
        fi
    }
}

/*
 * PageHint::offer: a relaxed load pre-check, then compare_exchange(EMPTY -> v).
 * Out: `acc` = 1 when accepted.
 */
inline offer(v, acc) {
    acc = 0;
#ifdef MUT_OVERWRITE_OFFER
    /* MUTANT: "latest hint wins": a plain store over whatever is pending. */
    atomic { cell = v; acc = 1; hpend++; hval = v;
             printf("T%d: stores hint (%d,%d) over whatever was pending\n", tid, DECB(v), DECP(v));
             ASSERT_I4(hpend <= 1) }
#else
    if
    :: cell != 0 -> skip                        /* load pre-check: Pending */
    :: else ->
        atomic {
            if
            :: cell == 0 -> cell = v; acc = 1; hpend++; hval = v; ASSERT_I4(hpend == 1);
                            printf("T%d: offer (%d,%d) accepted\n", tid, DECB(v), DECP(v))
            :: else -> skip                     /* CAS failed: Pending */
            fi
        }
    fi
#endif
}

/*
 * PageHint::take: a relaxed load pre-check, then swap(EMPTY). Out: `v` (0 = none).
 */
inline take(v) {
    v = 0;
    if
    :: cell == 0 -> skip                        /* load pre-check: None */
    :: else ->
#ifdef MUT_TAKE_KEEPS_HINT
        /* MUTANT: a lost hint reset: the value is read but the cell is not emptied. */
        atomic { v = cell; printf("T%d: reads hint (%d,%d), leaves it in the cell\n", tid, DECB(v), DECP(v)) }
#else
        atomic {
            v = cell; cell = 0;
            printf("T%d: takes hint (%d,%d)\n", tid, DECB(v), DECP(v));
            if
            :: v != 0 -> ASSERT_I4(hpend == 1 && v == hval); hpend--
            :: else -> skip
            fi
        }
#endif
    fi
}

/*
 * One step of BackgroundScanner::next_claim after follow(), i.e. DirtyBitmap::scan_step:
 * next_host_candidate (one relaxed load of the block's word, or of its summary word when
 * wide), then claim_chunk on the chunk around
 * the candidate and the advance of the scan position and of the contiguous clean count
 * `swept`; or, with no candidate, the rest of the block counted clean and the move to the
 * next block. Uses the caller's variables blk, pg, swept, v, tb, cand, s, got, x, end, k
 * (and claim_chunk's scratch). Leaves `cand` = 255 when there was no candidate; `tb` = the
 * block of the claim.
 */
inline scan_claim() {
        /* next_host_candidate(blk, pg): first host page at/after pg's host page that may be dirty */
        if
        :: !WIDE(blk) ->
            /* find_set over the block's words (block 0 has one word): one load */
            atomic {
                x = pg & ~((1 << HSHIFT(blk)) - 1);
                v = w[WBASE(blk)] & ~((1 << x) - 1);
                if
                :: v == 0 -> cand = 255
                :: else ->
                    k = 0;
                    do
                    :: ((v >> k) & 1) != 0 -> break
                    :: else -> k++
                    od;
                    cand = k & ~((1 << HSHIFT(blk)) - 1)
                fi
            }
        :: else ->
            /* find_set over the summary word: one load (one host page in block 1) */
            atomic { if :: (sum & 1) != 0 -> cand = 0 :: else -> cand = 255 fi }
        fi;
        if
        :: cand != 255 ->
            s = CHUNK(blk);
            claim_chunk(blk, cand, s, got);
            atomic {
                tb = blk;
                end = ((cand >> s) + 1) << s;
                swept = swept + end - pg;
                pg = end;
                if
                :: end >= PAGES(blk) -> blk = (blk + 1) % NBLK; pg = 0
                :: else -> skip
                fi;
                printf("T%d: scan now at (%d,%d), clean count %d\n", tid, blk, pg, swept)
            }
        :: else ->
            atomic { swept = swept + PAGES(blk) - pg; blk = (blk + 1) % NBLK; pg = 0;
                     printf("T%d: no candidate; scan now at (%d,%d), clean count %d\n", tid, blk, pg, swept) }
        fi
}

/* PageScheduler::after: `end` if inside the layout, else page 0 of the next block. */
#define AFTER_B(b, e)  ((e) < PAGES(b) -> (b) : ((b) + 1) % NBLK)
#define AFTER_P(b, e)  ((e) < PAGES(b) -> (e) : 0)
