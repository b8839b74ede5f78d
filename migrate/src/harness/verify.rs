//! Verification of a finished run, apart from running it: what must hold, checked from the
//! evidence the run left.
//!
//! 1. **Exactly once, across all connections**: every host page missing at the switch-over
//!    was placed in postcopy by exactly one connection (the first, or one resumed after a
//!    break), no other page was placed in postcopy, and nothing was placed twice (`EEXIST`).
//!    After each break, the source's rebuild from the received bitmap left exactly the pages
//!    this side still lacked, and the source resumed as many times as this side did.
//! 2. **Same memory**: every page the guest did not write at the destination equals the
//!    source's page at the switch-over (the source sends a checksum of every page). The KVM
//!    guest writes only its stacks, its generation table and the data pages whose generation
//!    it moved on (the source sends its table too): those must pass the signature check at
//!    their new generation, and no generation may go backwards.
//! 3. **The guest's own checks**: the KVM guest's programs found no lost, misplaced, stale or
//!    corrupt page, at the source or at the destination, and each verified its whole share of
//!    the data area; the thread guest read the source's contents and every key lookup was
//!    right.
//! 4. **Bad input was harmless**: the source rejected exactly the malformed requests sent.
//! 5. **No queued request lost** (vanilla, I5): every request the source queued for its
//!    background path was followed or dropped as already sent. A cut drops the broken
//!    connection's queue on purpose (the pages are asked again), so runs with cuts skip it.

use std::ops::Range;

use crate::dest::thread_guest::WorkloadReport;
use crate::dest::{Evidence, GuestOutcome};
use crate::guest::image::{check_page, generation, page_checksum, PageFault, WORDS};
use crate::guest::kvm::GuestCounters;
use crate::guest::layout::{GuestLayout, GENTAB_GPA, STACKS_GPA, TARGET_PAGE};
use crate::options::{RunConfig, Workload};

/// The problems found in a run of `workload` with `cfg` (empty: verified): each of the
/// checks above, in order.
pub fn verify(cfg: &RunConfig, workload: Workload, e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    exactly_once(e, &mut problems);
    same_memory(cfg.layout(), e, &mut problems);
    match &e.outcome {
        GuestOutcome::Kvm { counters, .. } => kvm_checks(cfg.layout(), e, counters, &mut problems),
        GuestOutcome::Thread { report, .. } => thread_checks(workload, e, report, &mut problems),
    }
    // 4. Bad input (counted by the source that served the start of postcopy: not after a
    // takeover, whose source counts from there on).
    if !taken_over(e) && e.summary.stats.bad_requests != cfg.hooks.inject_bad {
        problems.push(format!(
            "the source rejected {} requests, {} malformed ones were sent",
            e.summary.stats.bad_requests, cfg.hooks.inject_bad
        ));
    }
    // 5. No queued request lost.
    if e.summary.recoveries.is_empty() {
        problems.extend(lost_requests(&e.summary.stats));
    }
    problems
}

/// Whether a new source session took the paused session over after a break: the summary's
/// counters are then that session's only, from its takeover on.
fn taken_over(e: &Evidence) -> bool {
    e.cuts.iter().any(|c| c.new_source)
}

/// Check 1: exactly once, across all connections.
fn exactly_once(e: &Evidence, problems: &mut Vec<String>) {
    let mem = &e.mem;
    let (twice, first) = mem.placed_twice();
    if twice > 0 {
        problems.push(format!(
            "{twice} host pages placed twice ({})",
            first.unwrap_or_default()
        ));
    }
    if mem.placed() != mem.pending() || e.switch.pending_host_pages() != mem.pending() {
        problems.push(format!(
            "{} host pages placed in postcopy, {} were missing at the switch-over ({} pending at the source)",
            mem.placed(),
            mem.pending(),
            e.switch.pending_host_pages()
        ));
    }
    connections(e, problems);
    duplicates(e, problems);
}

/// Check 2, same memory. The KVM guest writes at the destination: its data pages through
/// `write_page` (their generation moves on), its stacks, and the generation table; every
/// other page must be the source's. A data page whose generation moved must pass the
/// signature check at its new generation, and the table may only move generations on.
fn same_memory(layout: &GuestLayout, e: &Evidence, problems: &mut Vec<String>) {
    let kvm = matches!(e.outcome, GuestOutcome::Kvm { .. });
    let src_gen = &e.summary.generations;
    if kvm && src_gen.len() as u64 != layout.pages() {
        problems.push(format!(
            "the source sent {} generations for {} pages",
            src_gen.len(),
            layout.pages()
        ));
    } else if e.summary.checksums.len() as u64 != layout.pages() {
        problems.push(format!(
            "the source sent {} checksums for {} pages",
            e.summary.checksums.len(),
            layout.pages()
        ));
    } else {
        problems.extend(Compared::run(layout, e, kvm).problems());
    }
}

/// What comparing every page with the source found: a count and the first of each kind.
#[derive(Default)]
struct Compared {
    differ: (u64, Option<u64>),
    bad_sig: (u64, Option<(u64, PageFault)>),
    backwards: (u64, Option<(u64, u32, u32)>),
}

impl Compared {
    /// Compares every page of `e`'s memory the guest did not write here with the source's.
    fn run(layout: &GuestLayout, e: &Evidence, kvm: bool) -> Self {
        let ram = e.mem.all_bytes();
        let src_gen = &e.summary.generations;
        // What the KVM guest writes besides its data pages: its stacks and the table.
        let (guest_written, table): (Range<u64>, Range<u64>) = if kvm {
            let stacks = STACKS_GPA / TARGET_PAGE;
            (
                stacks..stacks + u64::from(layout.vcpus()),
                GENTAB_GPA / TARGET_PAGE..(GENTAB_GPA + layout.pages() * 4).div_ceil(TARGET_PAGE),
            )
        } else {
            (0..0, 0..0)
        };
        let mut c = Self::default();
        let mut words = vec![0u64; WORDS];
        for (p, page) in ram.chunks_exact(TARGET_PAGE as usize).enumerate() {
            let p = p as u64;
            if guest_written.contains(&p) || table.contains(&p) {
                continue;
            }
            let moved = kvm && layout.data.contains(&p) && {
                let (now, then) = (generation(ram, p), src_gen[p as usize]);
                if now < then || now % 2 != 0 {
                    c.backwards.0 += 1;
                    c.backwards.1.get_or_insert((p, then, now));
                }
                now != then
            };
            if !moved {
                if page_checksum(page) != e.summary.checksums[p as usize] {
                    c.differ.0 += 1;
                    c.differ.1.get_or_insert(p);
                }
            } else {
                for (w, b) in words.iter_mut().zip(page.chunks_exact(8)) {
                    *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                }
                if let Err(f) = check_page(&words, layout.gpa(p) / TARGET_PAGE, generation(ram, p))
                {
                    c.bad_sig.0 += 1;
                    c.bad_sig.1.get_or_insert((p, f));
                }
            }
        }
        c
    }

    fn problems(self) -> Vec<String> {
        let mut out = Vec::new();
        if let (n, Some(p)) = self.differ {
            out.push(format!(
                "{n} pages differ from the source at the switch-over (first: page {p})"
            ));
        }
        if let (n, Some((p, f))) = self.bad_sig {
            out.push(format!(
                "{n} pages the guest wrote fail the signature check (first: page {p}, {})",
                f.describe()
            ));
        }
        if let (n, Some((p, then, now))) = self.backwards {
            out.push(format!(
                "{n} generations went backwards or stayed odd (first: page {p}, {then} at the switch-over, {now} now)"
            ));
        }
        out
    }
}

/// Check 3: the KVM guest's own checks, at the source and here, and its whole share verified.
fn kvm_checks(
    layout: &GuestLayout,
    e: &Evidence,
    counters: &[GuestCounters],
    problems: &mut Vec<String>,
) {
    let src_errors = e.switch.guest[2];
    if src_errors > 0 {
        let kind = PageFault::from_code(e.switch.guest[3]).map_or("?", |k| k.describe());
        problems.push(format!(
            "the guest found {src_errors} bad pages at the source (first: {kind} at page {})",
            e.switch.guest[4]
        ));
    }
    let errors: u64 = counters.iter().map(|c| c.errors).sum();
    if errors > 0 {
        let first = counters
            .iter()
            .find_map(|c| c.first_error_text())
            .unwrap_or_default();
        problems.push(format!(
            "the guest's checks failed {errors} times (first: {first})"
        ));
    }
    let verified: u64 = counters.iter().map(|c| c.verified).sum();
    if verified != layout.data.end - layout.data.start {
        problems.push(format!(
            "the guest verified {verified} of {} data pages",
            layout.data.end - layout.data.start
        ));
    }
}

/// Check 3, the thread guest's: what it read was the source's, every lookup right, the workload
/// complete.
fn thread_checks(
    workload: Workload,
    e: &Evidence,
    report: &WorkloadReport,
    problems: &mut Vec<String>,
) {
    let seen_bad = report
        .observed
        .iter()
        .filter(|&&(p, sum)| e.summary.checksums.get(p as usize) != Some(&sum))
        .count();
    if seen_bad > 0 {
        problems.push(format!(
            "the guest read {seen_bad} pages with wrong contents"
        ));
    }
    if report.wrong > 0 {
        problems.push(format!("{} key lookups gave wrong answers", report.wrong));
    }
    if !report.completed {
        problems.push(format!("the {} workload did not complete", workload));
    }
}

/// Vanilla (I5): the queued requests neither followed nor dropped as already sent, once the
/// queue is drained.
fn lost_requests(st: &pagehint::SchedulerStats) -> Option<String> {
    let taken = st.queued_followed + st.queued_stale;
    (taken != st.requests_queued).then(|| {
        format!(
            "I5: {} requests queued, {} followed and {} dropped as already sent: {} lost",
            st.requests_queued,
            st.queued_followed,
            st.queued_stale,
            st.requests_queued as i128 - taken as i128
        )
    })
}

/// Deliberate duplicates (the urgent path's resend of a background claim, dropped because
/// the other copy came first) are harmless only if they are what they claim: no more than
/// the source resent, and each identical to the source's page at the switch-over. A real
/// double placement is not one of them: it reaches `UFFDIO_COPY` and is counted above.
fn duplicates(e: &Evidence, problems: &mut Vec<String>) {
    let (pages, _) = e.mem.duplicates();
    let sums = e.mem.duplicate_sums();
    // (After a takeover the earlier source's resends are not in the summary's count.)
    if pages > e.summary.resent_host_pages && !taken_over(e) {
        problems.push(format!(
            "{pages} duplicate host pages dropped, the source resent only {}",
            e.summary.resent_host_pages
        ));
    }
    let differ: Vec<u64> = sums
        .iter()
        .filter(|&&(p, sum)| e.summary.checksums.get(p as usize) != Some(&sum))
        .map(|&(p, _)| p)
        .collect();
    if let Some(p) = differ.first() {
        problems.push(format!(
            "{} pages of dropped duplicates differ from the source's (first: page {p}): not identical copies",
            differ.len()
        ));
    }
}

/// Exactly once across all connections: each pending host page placed by one connection,
/// none other placed in postcopy; each recovery agreed on what was missing.
fn connections(e: &Evidence, problems: &mut Vec<String>) {
    let mem = &e.mem;
    let mut per_conn: Vec<u64> = vec![0; e.cuts.len() + 1];
    let (mut unplaced, mut first_unplaced) = (0u64, None);
    let (mut stray, mut first_stray) = (0u64, None);
    let (mut beyond, mut first_beyond) = (0u64, None);
    let mut hp = 0u64;
    for set in &e.switch.pending {
        let mut words = set.words();
        let mut word = 0;
        for i in 0..set.host_pages() {
            if i % 64 == 0 {
                word = words.next().unwrap_or(0);
            }
            let pending = word & (1 << (i % 64)) != 0;
            let by = if hp < mem.host_pages() {
                mem.placed_by(hp)
            } else {
                0
            };
            match (pending, by) {
                (true, 0) => {
                    unplaced += 1;
                    first_unplaced.get_or_insert(hp);
                }
                (true, c) if usize::from(c) <= per_conn.len() => per_conn[usize::from(c) - 1] += 1,
                (true, _) => {
                    beyond += 1;
                    first_beyond.get_or_insert(hp);
                }
                (false, 0) => {}
                (false, _) => {
                    stray += 1;
                    first_stray.get_or_insert(hp);
                }
            }
            hp += 1;
        }
    }
    if let Some(p) = first_unplaced {
        problems.push(format!(
            "{unplaced} pending host pages were placed by no connection (first: host page {p})"
        ));
    }
    if let Some(p) = first_stray {
        problems.push(format!(
            "{stray} host pages not pending at the switch-over were placed in postcopy (first: host page {p})"
        ));
    }
    if let Some(p) = first_beyond {
        problems.push(format!(
            "{beyond} host pages were placed by a connection that never existed (first: host page {p})"
        ));
    }
    let placed: u64 = per_conn.iter().sum();
    if placed != mem.placed() {
        problems.push(format!(
            "the connections placed {placed} host pages ({per_conn:?}), the count says {}",
            mem.placed()
        ));
    }
    // The source that sent the summary resumed at every break since it took the session
    // over (its takeover is its first rebuild), or at every break.
    let rec = &e.summary.recoveries;
    let since = e.cuts.iter().rposition(|c| c.new_source).unwrap_or(0);
    let cuts = &e.cuts[since..];
    if rec.len() != cuts.len() {
        problems.push(format!(
            "the destination resumed {} times{}, the source {} times",
            cuts.len(),
            if since > 0 { " since the takeover" } else { "" },
            rec.len()
        ));
    }
    let per = mem.host_page_size() / crate::guest::layout::TARGET_PAGE;
    for (i, (c, &left)) in cuts.iter().zip(rec).enumerate() {
        let i = i + since;
        if c.missing_host_pages * per != left {
            problems.push(format!(
                "after break {}: the destination lacked {} host pages ({} target pages), the source's rebuild left {left} to send",
                i + 1,
                c.missing_host_pages,
                c.missing_host_pages * per
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_request_neither_followed_nor_dropped_is_reported_lost() {
        let mut st = pagehint::SchedulerStats::default();
        st.requests_queued = 10;
        st.queued_followed = 7;
        st.queued_stale = 3;
        assert_eq!(lost_requests(&st), None);
        st.queued_stale = 2;
        let p = lost_requests(&st).expect("one request lost");
        assert!(
            p.contains("10 requests queued") && p.ends_with("1 lost"),
            "{p}"
        );
    }
}
