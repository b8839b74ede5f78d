/*
 * qemu_seed.pml: QEMU's postcopy-preempt scheduler as the seed patch (commit 20d82622812d,
 * ../shared/seed/) leaves it, over the same scaled layout as pagehint.pml:
 *   block 0: 4 target pages, host pages of 2; block 1: 8 target pages, one host page.
 *
 * Everything QEMU does under bitmap_mutex is one atomic step here: the return path's urgent
 * send of one host page plus ram_page_hint_update, and one whole ram_find_and_save_block
 * call (hint collection, the find_dirty_block loop, ram_save_host_page) of the migration
 * thread. (In preempt mode QEMU drops the lock between the target pages of one host page;
 * that only makes the urgent path back off via pss_overlap and does not touch the scan
 * position logic modelled here.)
 *
 * ram_find_and_save_block (migration/ram.c with the seed patch):
 *   start = hint if valid (consume it) else (last_seen_block, last_page); complete_round = 0
 *   loop: page = find_next_bit(block, page)
 *         if complete_round && block == last_seen_block && page >= last_page: ALL_CLEAN
 *         if page >= block end: next block (wrapping sets complete_round); again
 *         else send the host page containing page (pss->page = host page end); stop
 *   last_seen_block/last_page = where the scan stopped
 * The completion test compares with the OLD last_seen position even when the scan started
 * from the hint: the weak spot of ../shared/notes/qemu-postcopy.md.
 *
 * Properties:
 *   ALLCLEAN  ram_find_and_save_block returns "all clean" only when no page is dirty
 *             (EXPECTED VIOLATED: the weak spot; check.sh requires the counterexample);
 *   I1        each dirty host page is sent exactly once;
 *   I3        the migration completes only when no page is dirty. QEMU's migration thread
 *             completes postcopy on its dirty-page count (migration_dirty_pages, exact under
 *             the mutex), not on one "all clean" answer, so this holds;
 *   L5term    (LTL, weak fairness) the migration completes: after a spurious "all clean" the
 *             next call restarts from where that scan stopped and finds the pages.
 * Mutant MUT_TRUST_ALL_CLEAN: a driver that completes on the first "all clean" (as a flush
 * loop that stops at the first 0 pages would), rejected by I3.
 */

#ifndef NREQ
#define NREQ 2
#endif

#define NBLK  2
#define PAGES(b)  ((b) == 0 -> 4 : 8)
#define HPAGES(b) ((b) == 0 -> 2 : 8)
#define HPID(b, p) ((b) == 0 -> ((p) >> 1) : 2)

byte bm[2];             /* rb->bmap per block, one bit per target page */
byte dirty_pages;       /* rs->migration_dirty_pages */
bit  hvalid;            /* rs->page_hint.valid */
byte hblk, hpage;       /* rs->page_hint.location */
byte last_blk, last_page;
byte sent[3];           /* ghost */
bit  done;              /* ghost: migration completed */

inline count_bits(x, n) {
    n = 0;
    do
    :: x != 0 -> n = n + (x & 1); x = x >> 1
    :: else -> break
    od
}

/* Send the host page containing (b, p): test-and-clear its target pages. Out: pages sent. */
inline save_host_page(b, p, n) {
    first = p & ~(HPAGES(b) - 1);
    mask = ((1 << HPAGES(b)) - 1) << first;
    k = bm[b] & mask;
    count_bits(k, n);
    bm[b] = bm[b] & ~mask;
    dirty_pages = dirty_pages - n;
    if
    :: n > 0 -> sent[HPID(b, p)]++;
#ifdef P_I1
                assert(sent[HPID(b, p)] == 1)
#else
                skip
#endif
    :: else -> skip
    fi
}

proctype ReturnPath() {
    byte i, h, b, p, n, first, mask, k;
    for (i : 1 .. NREQ) {
        select (h : 0 .. 2);
        /* ram_save_host_page_urgent + ram_page_hint_update, under bitmap_mutex */
        atomic {
            b = (h == 2 -> 1 : 0); p = (h == 1 -> 2 : 0);
            save_host_page(b, p, n);
            printf("return path: request for host page %d, sent %d target pages\n", h, n);
            if
            :: n > 0 && !hvalid ->
                hvalid = 1; hblk = b;
                hpage = (p & ~(HPAGES(b) - 1)) + HPAGES(b);  /* pss->page = host page end */
                printf("return path: hint (%d,%d)\n", hblk, hpage)
            :: else -> skip
            fi;
            h = 0; b = 0; p = 0; n = 0; first = 0; mask = 0; k = 0
        }
    }
}

proctype Migration() {
    byte blk, pg, n, first, mask, k, pages;
    bit round, allclean;
    do
    :: atomic { dirty_pages == 0 && !done } ->
        /* migration_iteration_run: nothing pending, complete */
        atomic {
#ifdef P_I3
            assert(bm[0] == 0 && bm[1] == 0);
#endif
            printf("migration: dirty count 0, complete\n");
            done = 1
        };
        break
    :: atomic { dirty_pages != 0 } ->
        /* ram_find_and_save_block, under bitmap_mutex */
        atomic {
            if
            :: hvalid -> blk = hblk; pg = hpage; hvalid = 0;     /* ram_page_hint_collect */
                printf("migration: ram_find_and_save_block from the hint (%d,%d); last_seen (%d,%d)\n",
                       blk, pg, last_blk, last_page)
            :: else -> blk = last_blk; pg = last_page;
                printf("migration: ram_find_and_save_block from last_seen (%d,%d)\n", blk, pg)
            fi;
            round = 0; pages = 0; allclean = 0;
            do
            :: /* find_dirty_block: pss_find_next_dirty */
                do
                :: pg < PAGES(blk) && ((bm[blk] >> pg) & 1) == 0 -> pg++
                :: else -> break
                od;
                if
                :: round && blk == last_blk && pg >= last_page ->
                    allclean = 1;                                 /* PAGE_ALL_CLEAN */
                    printf("migration: ALL_CLEAN at (%d,%d) (>= last_seen); bitmaps %d %d, dirty count %d\n",
                           blk, pg, bm[0], bm[1], dirty_pages);
#ifdef P_ALLCLEAN
                    assert(bm[0] == 0 && bm[1] == 0);
#endif
                    break
                :: else -> skip
                fi;
                if
                :: pg >= PAGES(blk) ->                            /* PAGE_TRY_AGAIN */
                    pg = 0; blk = (blk + 1) % NBLK;
                    if
                    :: blk == 0 -> round = 1
                    :: else -> skip
                    fi
                :: else ->                                        /* PAGE_DIRTY_FOUND */
                    save_host_page(blk, pg, n);
                    printf("migration: sends the host page at (%d,%d): %d target pages\n", blk, pg, n);
                    pages = n;
                    pg = (pg & ~(HPAGES(blk) - 1)) + HPAGES(blk);
                    if
                    :: pages > 0 -> break
                    :: else -> skip
                    fi
                fi
            od;
            last_blk = blk; last_page = pg;
#ifdef MUT_TRUST_ALL_CLEAN
            /* MUTANT: "no page sent" taken as "migration complete" */
            if
            :: allclean ->
#ifdef P_I3
                assert(bm[0] == 0 && bm[1] == 0);
#endif
                done = 1
            :: else -> skip
            fi;
#endif
            n = 0; first = 0; mask = 0; k = 0; pages = 0; round = 0
        };
        if
        :: done -> break
        :: else -> skip
        fi
    od
}

init {
    byte h;
    /* the bitmap at the switch to postcopy: canonicalised to whole host pages
     * (postcopy_chunk_hostpages), any subset dirty */
    atomic {
        select (h : 0 .. 7);
        bm[0] = (h & 1 -> 3 : 0) | (h & 2 -> 12 : 0);
        bm[1] = (h & 4 -> 255 : 0);
        dirty_pages = (h & 1 -> 2 : 0) + (h & 2 -> 2 : 0) + (h & 4 -> 8 : 0);
        printf("start: bitmaps block 0 = %d, block 1 = %d\n", bm[0], bm[1]);
        /* last_seen starts anywhere the previous calls may have left it */
        select (h : 0 .. 2);
        last_blk = (h == 2 -> 1 : 0); last_page = (h == 1 -> 2 : 0);
        printf("start: last_seen (%d,%d)\n", last_blk, last_page);
        run ReturnPath();
        run Migration()
    }
}

ltl L5term { <> done }
