/*
 * hint.pml: the hint cell alone (src/hint.rs, PageHint), I4, with two offering threads and
 * two taking threads (the Rust type is Sync: several return-path threads may offer and
 * several scanners may take).
 *
 *   I4  at most one hint is pending; an offer never overwrites a pending hint; each accepted
 *       hint is taken at most once; a taken value is exactly the pending accepted one
 *       (never torn: the cell is one word, one Promela variable); an empty cell takes nothing.
 *
 * Each offerer offers two distinct values; each taker takes twice. Ghost: `hpend` counts
 * accepted, untaken hints; `hval` is the pending one; `taken[v]` counts takes of value v.
 *
 * Mutants: MUT_OVERWRITE_OFFER (a plain store: "latest hint wins"), MUT_RACY_OFFER (the
 * pre-check load then a plain store, no compare-exchange), MUT_RACY_TAKE (a load then a
 * plain store of EMPTY, no swap).
 */

#define P_I4
#define ASSERT_I4(e) assert(e)

byte cell;              /* PageHint::cell: 0 = empty */
byte hpend;             /* ghost: accepted hints not yet taken */
byte hval;              /* ghost: the pending accepted value */
byte taken[5];          /* ghost: takes of each value 1..4 */
bit  accepted[5];       /* ghost: value v was accepted */

proctype Offerer(byte first) {
    byte i, v;
    for (i : 0 .. 1) {
        v = first + i;
#if defined(MUT_OVERWRITE_OFFER)
        atomic { cell = v; hpend++; hval = v; accepted[v] = 1; ASSERT_I4(hpend <= 1) }
#elif defined(MUT_RACY_OFFER)
        if
        :: cell != 0 -> skip
        :: else ->
            atomic { cell = v; hpend++; hval = v; accepted[v] = 1; ASSERT_I4(hpend <= 1) }
        fi
#else
        if
        :: cell != 0 -> skip                                    /* load pre-check */
        :: else ->
            atomic {                                            /* compare_exchange */
                if
                :: cell == 0 -> cell = v; hpend++; hval = v; accepted[v] = 1;
                                ASSERT_I4(hpend == 1)
                :: else -> skip
                fi
            }
        fi
#endif
    }
}

proctype Taker() {
    byte i, v;
    for (i : 0 .. 1) {
        v = 0;
        if
        :: cell == 0 -> skip                                    /* load pre-check */
        :: else ->
#ifdef MUT_RACY_TAKE
            atomic { v = cell };
            atomic {
                cell = 0;
#else
            atomic {                                            /* swap(EMPTY) */
                v = cell; cell = 0;
#endif
                if
                :: v != 0 ->
                    taken[v]++;
                    ASSERT_I4(accepted[v] && taken[v] == 1 && hpend == 1 && v == hval);
                    hpend--
                :: else -> skip
                fi
            }
        fi
    }
}

init {
    atomic {
        run Offerer(1);
        run Offerer(3);
        run Taker();
        run Taker()
    }
}
