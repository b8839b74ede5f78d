//! The baseline: a port of QEMU's source-side page scheduling state and its `bitmap_mutex`
//! discipline (QEMU 10.1, `migration/ram.c`, with the page hint of commit 20d82622812d), for
//! one RAMBlock. It is what `pagehint` replaces, so every figure is "ours vs this".
//!
//! # What is ported
//! Everything QEMU protects with `rs->bitmap_mutex`, behind one [`std::sync::Mutex`] (a futex
//! lock, like the `pthread_mutex_t` inside `QemuMutex`, and a little kinder: it spins briefly
//! before sleeping):
//! * `RAMBlock::bmap` → [`RamState::bmap`]: a plain `Vec<u64>`, one bit per target page;
//! * `RAMState::migration_dirty_pages` → [`RamState::dirty_pages`];
//! * the background page search state (`pss[RAM_CHANNEL_PRECOPY].page`, `rs->last_page`,
//!   `complete_round`) → [`RamState::last_page`];
//! * `RAMState::page_hint` (`PageLocationHint`) → [`RamState::hint`];
//! * `rs->src_page_requests` → [`RamState::requests`] (QEMU guards it with its own
//!   `src_page_req_mutex` and reads its emptiness without a lock; here it sits under the one
//!   lock, which only makes the baseline's per-host-page check cheaper).
//!
//! # Locking rules (check them against ram.c)
//! 1. **Background** (`ram_save_iterate`): takes `bitmap_mutex`, calls
//!    `ram_find_and_save_block` in a loop, and checks every 64 calls whether to stop
//!    (`(i & 63) == 0`, the 50 ms `MAX_WAIT` check); then drops the lock. Here
//!    [`QemuPort::background_batch`] takes the lock, sends host pages until at least
//!    [`YIELD_EVERY`] target pages are done (or all is clean) and drops the lock: one lock
//!    round trip per 64 pages, the cheapest cadence QEMU has. (In preempt mode QEMU also drops
//!    the lock around each target page's *send*, `ram_save_host_page`; there is no send here,
//!    so that would only add lock round trips to the baseline.)
//! 2. **`ram_find_and_save_block`**: takes a valid hint (`ram_page_hint_collect`: the scan
//!    restarts there, `valid = false`), else unqueues a request whose page is dirty
//!    (`get_queued_page`), else `find_dirty_block`: `pss_find_next_dirty` = `find_next_bit`
//!    from the position; at the end of the block wrap to 0 and set `complete_round`; a second
//!    miss past the starting position means "all clean".
//! 3. **`ram_save_host_page`**: for each dirty target page of the host page (`find_next_bit`
//!    bounded by the host page end), `migration_bitmap_clear_dirty` = plain `test_and_clear_bit`
//!    and `migration_dirty_pages -= 1`, then send it. The position moves past the host page.
//! 4. **Urgent** (return-path thread, preempt mode: `ram_save_queue_pages` →
//!    `ram_save_host_page_urgent`): takes `bitmap_mutex` for the whole request, clears and
//!    sends the host page (step 3), flushes, and with the hint patch sets the hint if none is
//!    valid (`ram_page_hint_update`); then unlocks. The `pss_overlap` back-off never triggers
//!    here: the port's background finishes each host page inside one lock hold.
//! 5. **Dirty-log sync** (`migration_bitmap_sync` → `ramblock_sync_dirty_bitmap` →
//!    `cpu_physical_memory_sync_dirty_bitmap`): under `bitmap_mutex`, OR each non-zero word of
//!    the log into `bmap`, counting newly dirty pages into `migration_dirty_pages`.
//!
//! # Not ported
//! Sending (socket writes, rate limiting, flushes), `clear_bmap` (KVM's deferred clear-log),
//! multiple RAMBlocks, XBZRLE/compression. Each of these only lengthens QEMU's lock holds, so
//! leaving them out gives the baseline its best case.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// Target pages the background sends per lock hold (ram_save_iterate's `(i & 63) == 0`).
pub const YIELD_EVERY: u64 = 64;

const BITS: u64 = 64;

/// What `bitmap_mutex` protects, for one RAMBlock.
#[derive(Debug)]
pub struct RamState {
    /// `RAMBlock::bmap`: one plain bit per target page.
    pub bmap: Vec<u64>,
    /// Target pages in the block.
    pub pages: u64,
    /// log2 of target pages per host page.
    pub host_shift: u32,
    /// `RAMState::migration_dirty_pages`.
    pub dirty_pages: u64,
    /// Where the background search resumes (`rs->last_page`).
    pub last_page: u64,
    /// `RAMState::page_hint`: `Some(page)` is `valid = true`.
    pub hint: Option<u64>,
    /// `src_page_requests` (vanilla postcopy; empty in preempt mode).
    pub requests: VecDeque<u64>,
}

/// QEMU's scheduling state behind its one lock.
#[derive(Debug)]
pub struct QemuPort {
    state: Mutex<RamState>,
}

/// QEMU's `find_next_bit` (util/bitops.c), ported line by line: the first set bit at or after
/// `offset` and below `size`, or `size`.
#[inline]
pub fn find_next_bit(addr: &[u64], size: u64, offset: u64) -> u64 {
    if offset >= size {
        return size;
    }
    let mut p = (offset / BITS) as usize;
    let mut result = offset & !(BITS - 1);
    let mut size = size - result;
    let offset = offset % BITS;
    let tmp;
    'found_middle: {
        'found_first: {
            if offset != 0 {
                let t = addr[p] & (!0u64 << offset);
                p += 1;
                if size < BITS {
                    tmp = t;
                    break 'found_first;
                }
                if t != 0 {
                    tmp = t;
                    break 'found_middle;
                }
                size -= BITS;
                result += BITS;
            }
            while size >= 4 * BITS {
                let (t, d1, d2, d3) = (addr[p], addr[p + 1], addr[p + 2], addr[p + 3]);
                if t != 0 {
                    tmp = t;
                    break 'found_middle;
                }
                if d1 | d2 | d3 != 0 {
                    break;
                }
                p += 4;
                result += 4 * BITS;
                size -= 4 * BITS;
            }
            while size >= BITS {
                let t = addr[p];
                p += 1;
                if t != 0 {
                    tmp = t;
                    break 'found_middle;
                }
                result += BITS;
                size -= BITS;
            }
            if size == 0 {
                return result;
            }
            tmp = addr[p];
        }
        // found_first:
        let t = tmp & (!0u64 >> (BITS - size));
        if t == 0 {
            return result + size;
        }
        return result + u64::from(t.trailing_zeros());
    }
    // found_middle:
    result + u64::from(tmp.trailing_zeros())
}

/// QEMU's non-atomic `test_and_clear_bit` (include/qemu/bitops.h).
#[inline]
fn test_and_clear_bit(bmap: &mut [u64], page: u64) -> bool {
    let w = &mut bmap[(page / BITS) as usize];
    let mask = 1u64 << (page % BITS);
    let old = *w;
    *w = old & !mask;
    old & mask != 0
}

impl RamState {
    /// `ram_save_host_page`: clears and sends every dirty target page of the host page that
    /// holds `page`; returns the target pages sent and moves the position past the host page.
    #[inline]
    fn save_host_page(&mut self, page: u64, send: &mut impl FnMut(u64)) -> u64 {
        let start = page & !((1u64 << self.host_shift) - 1);
        let end = (start + (1 << self.host_shift)).min(self.pages);
        let mut sent = 0;
        let mut p = find_next_bit(&self.bmap, end, start);
        while p < end {
            // migration_bitmap_clear_dirty
            if test_and_clear_bit(&mut self.bmap, p) {
                self.dirty_pages -= 1;
                send(p);
                sent += 1;
            }
            p = find_next_bit(&self.bmap, end, p + 1);
        }
        self.last_page = end;
        sent
    }

    /// `ram_find_and_save_block`: one host page found and sent; 0 when all is clean.
    #[inline]
    fn find_and_save_block(&mut self, send: &mut impl FnMut(u64)) -> u64 {
        // The hint patch: a valid hint restarts the search there and is consumed.
        if let Some(h) = self.hint.take() {
            self.last_page = h;
        }
        let start = self.last_page;
        let mut page = start;
        let mut complete_round = false;
        loop {
            // get_queued_page: follow a request whose page is still dirty.
            if let Some(req) = self.requests.pop_front() {
                if self.bmap[(req / BITS) as usize] & (1 << (req % BITS)) != 0 {
                    return self.save_host_page(req, send);
                }
                continue;
            }
            // find_dirty_block
            page = find_next_bit(&self.bmap, self.pages, page);
            if complete_round && page >= start {
                return 0; // PAGE_ALL_CLEAN
            }
            if page >= self.pages {
                page = 0;
                complete_round = true;
                continue; // PAGE_TRY_AGAIN
            }
            let sent = self.save_host_page(page, send);
            if sent > 0 {
                return sent;
            }
            page = self.last_page;
        }
    }
}

impl QemuPort {
    /// A clean RAMBlock of `bytes` with host pages of `host_page` bytes (4 KiB target pages).
    pub fn new(bytes: u64, host_page: u64) -> Self {
        let pages = bytes / super::PAGE;
        Self {
            state: Mutex::new(RamState {
                bmap: vec![0; pages.div_ceil(BITS) as usize],
                pages,
                host_shift: (host_page / super::PAGE).trailing_zeros(),
                dirty_pages: 0,
                last_page: 0,
                hint: None,
                requests: VecDeque::new(),
            }),
        }
    }

    /// Takes `bitmap_mutex`.
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, RamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Target pages in the block.
    pub fn pages(&self) -> u64 {
        self.lock().pages
    }

    /// Every page dirty and the scan at page 0 (`ram_list_init_bitmaps`, `ram_state_reset`).
    pub fn mark_all(&self) {
        let mut st = self.lock();
        let pages = st.pages;
        for (i, w) in st.bmap.iter_mut().enumerate() {
            let left = pages - i as u64 * BITS;
            *w = if left >= BITS { !0 } else { (1 << left) - 1 };
        }
        st.dirty_pages = pages;
        st.last_page = 0;
        st.hint = None;
    }

    /// One `ram_save_iterate` lock hold: host pages found and sent until at least
    /// [`YIELD_EVERY`] target pages are sent; returns the pages sent (0: all clean).
    #[inline]
    pub fn background_batch(&self, mut send: impl FnMut(u64)) -> u64 {
        let mut st = self.lock();
        let mut sent = 0;
        while sent < YIELD_EVERY {
            let n = st.find_and_save_block(&mut send);
            if n == 0 {
                break;
            }
            sent += n;
        }
        sent
    }

    /// The urgent path for a request of target page `page`: under the lock, clear and send its
    /// host page, then leave a hint if none is pending. Returns the target pages sent (0: the
    /// host page was already sent).
    #[inline]
    pub fn urgent(&self, page: u64, mut send: impl FnMut(u64)) -> u64 {
        let mut st = self.lock();
        let background_pos = st.last_page;
        let sent = st.save_host_page(page, &mut send);
        // save_host_page moved the *urgent* PSS; the background position is separate.
        let after = st.last_page;
        st.last_page = background_pos;
        if sent > 0 && st.hint.is_none() {
            // ram_page_hint_update: set-if-empty, after the flush.
            st.hint = Some(if after >= st.pages { 0 } else { after });
        }
        sent
    }

    /// Dirty-log sync for the block: OR the log's non-zero words into `bmap`, counting newly
    /// dirty pages; returns how many were new.
    #[inline]
    pub fn merge_log(&self, log: &[u64]) -> u64 {
        let mut st = self.lock();
        let mut new_dirty = 0;
        for (dst, &src) in st.bmap.iter_mut().zip(log) {
            // As cpu_physical_memory_sync_dirty_bitmap: every non-zero word is ORed in.
            if src != 0 {
                let new = !*dst & src;
                *dst |= src;
                new_dirty += u64::from(new.count_ones());
            }
        }
        st.dirty_pages += new_dirty;
        new_dirty
    }

    /// Claims `count` target pages from `first` under one lock hold, one plain
    /// `test_and_clear_bit` each (the per-page claim cost under QEMU's 64-page lock cadence).
    #[inline]
    pub fn claim_pages(&self, first: u64, count: u64, mut send: impl FnMut(u64)) -> u64 {
        let mut st = self.lock();
        let mut n = 0;
        for p in first..first + count {
            if test_and_clear_bit(&mut st.bmap, p) {
                st.dirty_pages -= 1;
                send(p);
                n += 1;
            }
        }
        n
    }

    /// Claims the host page holding `page` under one lock hold (`ram_save_host_page`).
    #[inline]
    pub fn claim_host_page(&self, page: u64, mut send: impl FnMut(u64)) -> u64 {
        self.lock().save_host_page(page, &mut send)
    }

    /// Dirty pages (`migration_dirty_pages`).
    pub fn dirty_pages(&self) -> u64 {
        self.lock().dirty_pages
    }
}

/// Self-checks of the port, run by the report's smoke test: `find_next_bit` against a naive
/// scan, and a background round sending each page once while the urgent path takes some.
pub fn self_check() {
    let mut rng = super::XorShift::new(7);
    for size in [0u64, 1, 63, 64, 65, 200, 256, 257, 1000] {
        let words = size.div_ceil(64).max(1) as usize + 1;
        let mut bmap = vec![0u64; words];
        for _ in 0..(size / 16) {
            if size > 0 {
                let p = rng.below(size);
                bmap[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        for off in 0..=size {
            let naive = (off..size)
                .find(|&p| bmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
                .unwrap_or(size);
            assert_eq!(
                find_next_bit(&bmap, size, off),
                naive,
                "size {size} offset {off}"
            );
        }
    }
    for host_page in [4096u64, 2 << 20] {
        let port = QemuPort::new(64 << 20, host_page);
        port.mark_all();
        let pages = port.pages();
        let mut seen = vec![false; pages as usize];
        let mut mark = |p: u64| {
            assert!(
                !std::mem::replace(&mut seen[p as usize], true),
                "page {p} sent twice"
            );
        };
        let mut i = 0u64;
        loop {
            if i % 3 == 0 {
                let p = rng.below(pages);
                port.urgent(p, &mut mark);
            }
            i += 1;
            if port.background_batch(&mut mark) == 0 {
                break;
            }
        }
        assert_eq!(port.dirty_pages(), 0);
        assert!(seen.iter().all(|&s| s), "a page was never sent");
    }
}

/// The floor of any locked design: QEMU's locking discipline (one lock round trip per
/// [`YIELD_EVERY`] pages) around nothing but plain bit operations: find the next set bit with
/// `trailing_zeros`, clear it, send it. None of `ram_find_and_save_block`'s bookkeeping (hint,
/// request queue, host-page loop, dirty-page count, round detection beyond "found nothing").
/// This is the "plain bit ops under a lock taken per 64 pages" figure of the notes.
#[derive(Debug)]
pub struct PlainBitops {
    state: Mutex<(Vec<u64>, u64)>,
    pages: u64,
}

impl PlainBitops {
    /// A clean bitmap of `bytes` of 4 KiB pages.
    pub fn new(bytes: u64) -> Self {
        let pages = bytes / super::PAGE;
        Self {
            state: Mutex::new((vec![0; pages.div_ceil(BITS) as usize], 0)),
            pages,
        }
    }

    /// Every page dirty, scan at 0.
    pub fn mark_all(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pages = self.pages;
        for (i, w) in st.0.iter_mut().enumerate() {
            let left = pages - i as u64 * BITS;
            *w = if left >= BITS { !0 } else { (1 << left) - 1 };
        }
        st.1 = 0;
    }

    /// One lock hold: up to [`YIELD_EVERY`] pages found, cleared and sent from the scan
    /// position (no wrap: a round is one pass); returns the pages sent (0: the pass is done).
    #[inline]
    pub fn background_batch(&self, mut send: impl FnMut(u64)) -> u64 {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (bmap, pos) = &mut *guard;
        let mut sent = 0;
        let mut i = (*pos / BITS) as usize;
        let mut mask = !0u64 << (*pos % BITS);
        while sent < YIELD_EVERY && i < bmap.len() {
            let w = bmap[i] & mask;
            if w == 0 {
                i += 1;
                mask = !0;
                continue;
            }
            let bit = w.trailing_zeros();
            bmap[i] &= !(1 << bit);
            send(i as u64 * BITS + u64::from(bit));
            sent += 1;
            mask = !0u64 << bit;
        }
        *pos = i as u64 * BITS + u64::from(mask.trailing_zeros().min(63));
        sent
    }

    /// An urgent claim of target page `page`: lock, test-and-clear, unlock; true if it was dirty.
    #[inline]
    pub fn urgent(&self, page: u64, mut send: impl FnMut(u64)) -> bool {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let dirty = test_and_clear_bit(&mut guard.0, page);
        if dirty {
            send(page);
        }
        dirty
    }

    /// ORs a dirty log in under the lock.
    #[inline]
    pub fn merge_log(&self, log: &[u64]) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (dst, &src) in guard.0.iter_mut().zip(log) {
            *dst |= src;
        }
    }
}
