//! Verification of a finished run, apart from running it: what must hold, checked from the
//! evidence the run left.
//!
//! 1. **Exactly once**: every host page missing at the switch-over was placed in postcopy,
//!    and nothing was placed twice (`EEXIST`).
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

use crate::dest::{Evidence, GuestOutcome};
use crate::guest::image::{check_page, generation, page_checksum, PageFault, WORDS};
use std::ops::Range;

use crate::guest::layout::{GENTAB_GPA, STACKS_GPA, TARGET_PAGE};
use crate::options::{RunConfig, Workload};

/// The problems found in a run of `workload` with `cfg` (empty: verified).
pub fn verify(cfg: &RunConfig, workload: Workload, e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    let layout = cfg.layout();
    let mem = &e.mem;
    // 1. Exactly once.
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
    // 2. Same memory. The KVM guest writes at the destination: its data pages through
    // `write_page` (their generation moves on), its stacks, and the generation table; every
    // other page must be the source's. A data page whose generation moved must pass the
    // signature check at its new generation, and the table may only move generations on.
    let ram = mem.all_bytes();
    let kvm = matches!(e.outcome, GuestOutcome::Kvm { .. });
    let src_gen = &e.summary.generations;
    let guest_written: Range<u64> = if kvm {
        let stacks = STACKS_GPA / TARGET_PAGE;
        stacks..stacks + u64::from(layout.vcpus())
    } else {
        0..0
    };
    let table: Range<u64> = if kvm {
        GENTAB_GPA / TARGET_PAGE..(GENTAB_GPA + layout.pages() * 4).div_ceil(TARGET_PAGE)
    } else {
        0..0
    };
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
        let (mut differ, mut first_differ) = (0u64, None);
        let (mut bad_sig, mut first_bad) = (0u64, None);
        let (mut backwards, mut first_back) = (0u64, None);
        let mut words = vec![0u64; WORDS];
        for (p, page) in ram.chunks_exact(TARGET_PAGE as usize).enumerate() {
            let p = p as u64;
            if guest_written.contains(&p) || table.contains(&p) {
                continue;
            }
            let moved = kvm && layout.data.contains(&p) && {
                let (now, then) = (generation(ram, p), src_gen[p as usize]);
                if now < then || now % 2 != 0 {
                    backwards += 1;
                    first_back.get_or_insert((p, then, now));
                }
                now != then
            };
            if !moved {
                if page_checksum(page) != e.summary.checksums[p as usize] {
                    differ += 1;
                    first_differ.get_or_insert(p);
                }
            } else {
                for (w, b) in words.iter_mut().zip(page.chunks_exact(8)) {
                    *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                }
                if let Err(f) = check_page(&words, layout.gpa(p) / TARGET_PAGE, generation(ram, p))
                {
                    bad_sig += 1;
                    first_bad.get_or_insert((p, f));
                }
            }
        }
        if let Some(p) = first_differ {
            problems.push(format!(
                "{differ} pages differ from the source at the switch-over (first: page {p})"
            ));
        }
        if let Some((p, f)) = first_bad {
            problems.push(format!(
                "{bad_sig} pages the guest wrote fail the signature check (first: page {p}, {})",
                f.describe()
            ));
        }
        if let Some((p, then, now)) = first_back {
            problems.push(format!(
                "{backwards} generations went backwards or stayed odd (first: page {p}, {then} at the switch-over, {now} now)"
            ));
        }
    }
    // 3. The guest's own checks.
    match &e.outcome {
        GuestOutcome::Kvm { counters, .. } => {
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
        GuestOutcome::Thread { report, .. } => {
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
    }
    // 4. Bad input.
    if e.summary.stats.bad_requests != cfg.inject_bad {
        problems.push(format!(
            "the source rejected {} requests, {} malformed ones were sent",
            e.summary.stats.bad_requests, cfg.inject_bad
        ));
    }
    problems
}
