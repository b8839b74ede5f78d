//! The design, written once: words, the numbered guarantees I1–I8, the ordering contract, the
//! data flow, and where each guarantee is checked. The README, the crate root, the models
//! (`loom-tests/`) and the Spin proofs (`proofs/`) refer here. This module holds no code.
//!
//! # Words
//! * **target page**: the unit of dirty tracking (4 KiB by default); one bit in the
//!   [`DirtyBitmap`](crate::DirtyBitmap).
//! * **host page**: the unit of sending and placing (4 KiB, 2 MiB or 1 GiB; a power-of-two
//!   multiple of the target page, fixed per RAM block); always sent whole, on one channel.
//! * **RAM block**: a contiguous range of guest memory with its own host page size
//!   ([`RamBlock`](crate::RamBlock)).
//! * **claim**: the atomic act that takes dirty pages out of the bitmap and makes the caller
//!   their only sender ([`Claim`](crate::Claim)); an obligation, hence `#[must_use]`.
//! * **urgent path**: the return-path thread serving the destination's page requests (faults):
//!   [`PageScheduler::serve`](crate::PageScheduler::serve).
//! * **background path**: a scanner sending dirty pages in address order, wrapping at the end:
//!   [`BackgroundScanner`](crate::BackgroundScanner).
//! * **hint**: the single-slot cell through which the urgent path tells the background path
//!   where the guest works, so the scan continues right after the last faulted page
//!   ([`PageHint`](crate::PageHint); QEMU's page-hint patch, commit 20d82622812d).
//! * **stream**: a source of faults with its own locality, a vCPU (known from the faulting
//!   thread) or any id the caller chooses below the configured count; with
//!   [`HintPolicy::PerStream`](crate::HintPolicy::PerStream) each stream has its own hint slot
//!   ([`HintSlots`](crate::HintSlots)), and requests name their stream
//!   ([`PageScheduler::serve_from`](crate::PageScheduler::serve_from)).
//! * **cursor**: a background scanner's follower of one stream: after a hint from that stream
//!   it claims a bounded *run* from the faulted page (forward, or bubbling both ways for a
//!   stream running backward), in turn with the other streams' cursors, beside the linear scan
//!   ([`cursors`](crate::cursors)).
//! * **round**: one pass of a background scan over the whole layout.
//! * **vanilla / preempt / preempt-hint**: QEMU's three postcopy behaviours
//!   ([`SchedulerConfig`](crate::SchedulerConfig)): one channel and a request queue; a
//!   separate urgent channel; the urgent channel plus the hint.
//!
//! # Guarantees
//! Postcopy (nothing re-dirties pages after the switch):
//!
//! * **I1 exactly once** — every page dirty at the start is sent exactly once, by the urgent
//!   or a background path; never twice, never lost. A user may send a page the background
//!   path claimed once more on purpose, as a marked duplicate (the source is stopped, so it is
//!   identical): [`overtake`](crate::overtake)'s `CopyLedger` then has the destination place
//!   exactly one of the two copies.
//! * **I2 whole host pages** — all target pages of one host page are sent by one path, in one
//!   claim, also when the host page spans many bitmap words (2 MiB, 1 GiB).
//! * **I3 no false completion** — a background scanner reports a round complete only when no
//!   page is dirty, whatever hints it followed (stale, repeated, out of order, pointing
//!   anywhere). QEMU's scan, started from a hint, can wrap early: see `proofs/README.md`.
//! * **I4 the hint slot** — at most one hint is pending; an offer never overwrites a pending
//!   hint (set-if-empty); each accepted hint is taken at most once; a taken value is exactly
//!   one that was offered (never torn); taking from an empty slot yields nothing. With one
//!   slot per stream, all of this holds per slot, and one stream's pending hint never refuses
//!   or overwrites another stream's.
//! * **I5 progress** — a request for a page not yet sent is served by the urgent path or by
//!   the background path that already claimed it (in vanilla mode: every queued request is
//!   taken off the queue, followed or found already sent); every round ends. With several
//!   streams: no stream starves the others (cursors take turns, one claim each) or the linear
//!   scan (at most `share` cursor claims between two of its steps), and a cursor's run after
//!   each fault is bounded.
//! * **I6 hints are advisory** — any hint value changes only the order of sending, never which
//!   pages are sent (I1–I3 hold for every hint sequence).
//!
//! Precopy and dirty tracking:
//!
//! * **I7 no lost dirtying** — a page marked dirty after it was claimed is claimable again;
//!   merging dirty logs or rings, or draining with `get_and_clear`, concurrently with claims
//!   never drops a bit.
//! * **I8 bad input is harmless** — an out-of-range or malformed request, layout, log or ring
//!   entry gets a typed error and is counted; no panic, no state change, no page lost.
//!
//! # Ordering contract
//! Marking is a release and claiming an acquire: guest memory written before a page is marked
//! is visible to the sender whose claim collects the mark. Lookups (`find_next_*`, counts) are
//! relaxed snapshots that decide nothing irrevocable; `is_dirty` is an acquire load, as
//! vm-memory's `dirty_at`. Every atomic operation in `src/` carries a comment saying why its
//! ordering is enough, and goes through the one shim module (`src/sync.rs`) that selects
//! std, loom or shuttle primitives.
//!
//! # Data flow
//! [`layout`](crate::layout) (blocks, page sizes, locations) → [`bitmap`](crate::bitmap)
//! (dirty bits, claims, search) and [`hint`](crate::hint) (the slot), siblings that do not
//! know each other → [`streams`](crate::streams) (one slot per stream) → [`cursors`](crate::cursors)
//! (the scan policy following several streams) → [`scheduler`](crate::scheduler) (background
//! scan, urgent path, counters)
//! → [`vmm`](crate::vmm) (vm-memory, KVM, guest physical addresses) → users: the migration
//! harness, the benchmarks, a VMM. Lower modules never name higher ones.
//!
//! # Where each guarantee is checked
//! Unit tests are in `src/` (`cargo test --lib`), integration tests and proptests in `tests/`,
//! loom and shuttle models in `loom-tests/` (`cargo loom`, `cargo shuttle`; every model has
//! `#[should_panic]` mutants), Spin models in `proofs/` (`proofs/check.sh`; every property
//! has a mutant Spin must reject). Test names start with the guarantees they check.
//!
//! | id | unit / integration / proptest | loom | shuttle | Spin |
//! |----|-------------------------------|------|---------|------|
//! | I1 | `tests/protocol.rs` `i1_i2_i3_*`, `tests/stress.rs` `i1_i2_i3_*`, `tests/precopy.rs` `i1_*`, `tests/senders.rs`, `tests/recovery.rs` `i1_*`, `tests/proptest_bitmap.rs`, `tests/ranges.rs` `i1_*` (range requests, also racing scanners), `examples/kvm_migration.rs` (a real KVM guest: every page dirty at the switch sent once) | `loom_bitmap::i1_*`, `loom_protocol::i1_*`, `loom_multi::i1_*`, `loom_vanilla::i1_*`, `loom_recovery::i1_*`, `loom_range::i1_*` (a range request racing the scanner; mutant: first host page only), `loom_overtake` (deliberate duplicates: placed once, no stale overwrite, no lost request) | `shuttle_protocol`, `shuttle_multi`, `shuttle_vanilla`, `shuttle_recovery`, `shuttle_range`, `shuttle_overtake` | `postcopy.pml` I1 |
//! | I2 | `tests/protocol.rs` `i2_*`, `tests/precopy.rs` `i2_*`, `tests/proptest_bitmap.rs`, `tests/ranges.rs` `i1_i2_*` | `loom_bitmap::i1_i2_*` (narrow, wide, drain), `loom_range::i1_i2_*` (narrow and wide host pages) | `shuttle_protocol` (2 MiB pages), `shuttle_range` | `postcopy.pml` I2 |
//! | I3 | `tests/protocol.rs` `i3_*`, `tests/recovery.rs` `i3_*`, `tests/senders.rs` | `loom_protocol::i1_i2_i3_*`, `loom_multi`, `loom_vanilla` | `shuttle_protocol`, `shuttle_multi` | `postcopy.pml` I3 (and `qemu_seed.pml`: QEMU's weak spot) |
//! | I4 | `tests/proptest_hint.rs`, `src/hint.rs` unit tests | `loom_hint::i4_*` | — | `hint.pml`, `postcopy.pml` I4 |
//! | I5 | `tests/protocol.rs` `i1_i2_i3_i5_vanilla_*`, `i3_i5_*`; `tests/ranges.rs` `*i5_*` (every host page of a range reported once; vanilla queues each); `tests/recovery.rs` `i5_*` (queued requests dropped by a recovery counted: followed + stale + dropped = queued); every vanilla run of `pagehint-migrate` (its verification: queued = followed + stale) | `loom_vanilla::i1_i3_i5_*` (requests never lost), `loom_range::*i5_*` (mutant: a range served for its first host page only) | `shuttle_vanilla`, `shuttle_range` | `postcopy.pml` L5req, L5term (liveness, weak fairness) |
//! | I6 | `tests/protocol.rs` `i4_i6_*` | `loom_protocol::i6_*` | `shuttle_protocol` (stray hints) | `postcopy_stray_hints` |
//! | I7 | `tests/stress.rs` `i7_*`, `tests/precopy.rs` `i7_*`, `tests/kvm_slots.rs` `i7_*`, `tests/kvm.rs` (a real KVM guest; with manual dirty-log clearing, a write after the clear is logged again), `examples/kvm_migration.rs` (precopy on real KVM, both dirty-log modes; destination equal byte for byte) | `loom_bitmap::i7_*` (marks, logs, rings, drain) | `shuttle_precopy::i7_*` | `precopy.pml` I7 |
//! | I8 | `tests/protocol.rs` `i8_*`, `tests/precopy.rs` `i8_*`, `tests/kvm_slots.rs` `i8_*`, `tests/recovery.rs` `i8_*`, `tests/ranges.rs` `i8_*` (zero lengths refused where built), `tests/proptest_gpa.rs` (GPA conversions and dirty ranges against a `u128` model, blocks at the top of the address space), `tests/proptest_layout.rs`, `src/layout.rs` and `src/request.rs` unit tests, `fuzz/` | — | — | — |
//!
//! Beyond I1–I8, the O(1) dirty count ([`DirtyBitmap::dirty_count`](crate::DirtyBitmap::dirty_count):
//! exact when quiet, within `0..=pages` while threads run, `pages_dirtied` monotonic; kept in
//! per-thread slots) is checked by `tests/proptest_bitmap.rs` (against the set model after
//! every operation), `tests/dirty_count.rs` (std threads, more threads than owned slots,
//! threads coming and going), the bitmap's unit tests (a slot given back at thread exit and
//! continued by the next owner) and `loom_count` / `shuttle_count` (owned and shared slots on
//! the real bitmap; mutants: a count taken from a load instead of the atomic's own result, on
//! the claim side and the mark side; two threads adding to one owned slot; a relaxed hand-over
//! of a slot from an exiting thread to the next).
//!
//! `proofs/README.md` maps each Spin model action to the Rust function it stands for, and
//! each Spin mutant to its loom or shuttle counterpart.
//!
//! ## Several fault streams
//! With [`HintPolicy::PerStream`](crate::HintPolicy::PerStream) (one hint slot per stream,
//! cursors beside the linear scan) the same guarantees are checked by:
//!
//! | id | unit / integration | loom | shuttle | Spin |
//! |----|--------------------|------|---------|------|
//! | I1, I2 | `tests/streams.rs` `i1_i2_i3_*` (real threads), `tests/streams_demo.rs` | `loom_streams::i1_*` (two streams and the scanner, exhaustive) | `shuttle_streams` (six streams, narrow and wide host pages) | `streams.pml` I1, I2 |
//! | I3 | `tests/streams.rs` | `loom_streams` (mutant: a hand-off jump keeping the clean count) | `shuttle_streams` (same mutant) | `streams.pml` I3 (mutant: a cursor's claims counted as scanned) |
//! | I4, per slot | `src/streams.rs` unit tests, the `HintSlots` doctest | `loom_streams::i4_per_slot_*` (mutants: streams sharing one slot, set-if-empty or overwriting) | `shuttle_streams` (per-stream ledger of accepted and taken hints) | `streams.pml` I4S (mutant: a shared slot) |
//! | I5 | `src/cursors.rs` unit tests, `tests/streams_demo.rs` | `loom_streams` (mutants: a cursor never yielding to the linear scan, a run never bounded, a cursor keeping the turn) | `shuttle_streams` (same mutants) | `streams.pml` L5term |
//! | I6 | `src/cursors.rs` `i6_*` | — | `shuttle_streams` (stray hints into the slots, also outside the layout) | — |
//! | I8 | `tests/streams.rs` `i8_*`, `src/streams.rs` unit tests, the `serve_from` doctest | — | — | — |
