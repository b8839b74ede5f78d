//! The machine's own curve: what placing guest RAM with `UFFDIO_COPY` costs on this machine
//! at each size, with no migration around it, to set beside the harness's postcopy figures.
//!
//! For each size N: the same warm-up as the harness (2 × N touched once and freed), then a
//! resident N-byte copy that stands for the source's RAM (a one-process run holds both), and
//! a fresh N-byte anonymous mapping registered with userfaultfd in which every 4 KiB page is
//! placed with one `UFFDIO_COPY`, in address order, from a 1 MiB buffer of non-zero data
//! (as the destination places pages from its receive buffers). It reports MiB/s over the
//! whole mapping and over each eighth of it, and the kernel's counters (`/proc/vmstat`) over
//! the loop: page allocations, faults, THP, reclaim, compaction.
//!
//! Variants (`--variant`): `fresh` (the destination's case: the mapping never touched),
//! `dontneed` (every page written first, then discarded with `MADV_DONTNEED`, so each copy
//! allocates again, as after a precopy discard), `thp` (the mapping advised
//! `MADV_HUGEPAGE` first).
//!
//! ```sh
//! cargo run --release -p pagehint-migrate --example uffd_curve -- 256M 1G 4G --json curve.json
//! ```

use std::time::Instant;

use clap::{Parser, ValueEnum};
use memmap2::{MmapMut, MmapOptions};
use pagehint::layout::parse_size;
use pagehint_migrate::sys::uffd::Userfault;
use pagehint_migrate::sys::vmstat::Vmstat;
use pagehint_migrate::sys::warm;
use serde::Serialize;

const PAGE: usize = 4096;
const EIGHTHS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Variant {
    /// A fresh mapping, never touched (the destination's case).
    Fresh,
    /// Every page written, then discarded with MADV_DONTNEED, then placed.
    Dontneed,
    /// The mapping advised MADV_HUGEPAGE before it is registered.
    Thp,
}

/// Place every page of fresh anonymous memory with UFFDIO_COPY, per size: the machine's curve.
#[derive(Parser, Debug)]
struct Cli {
    /// Sizes (256M, 1G, ...).
    #[arg(required = true)]
    sizes: Vec<String>,
    /// Which variants to run, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fresh")]
    variant: Vec<Variant>,
    /// Skip the warm-up (2 × size touched once) before each size.
    #[arg(long)]
    no_warm_up: bool,
    /// Write the results as a JSON list to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

/// One size in one variant.
#[derive(Debug, Serialize)]
struct Curve {
    variant: Variant,
    mem_bytes: u64,
    /// Whole mapping placed, MiB/s.
    throughput_mib_s: f64,
    /// Each eighth of the mapping, in order, MiB/s.
    throughput_eighths_mib_s: Vec<f64>,
    /// Mean time per page, ns.
    ns_per_page: f64,
    /// The kernel's counters over the loop (machine-wide).
    vmstat: Vmstat,
    /// The warm-up, s.
    warm_up_s: f64,
}

fn main() -> Result<(), String> {
    let cli = Cli::parse();
    let sizes = cli
        .sizes
        .iter()
        .map(|s| parse_size(s).map_err(|e| format!("{s}: {e}")))
        .collect::<Result<Vec<u64>, String>>()?;
    let mut out = Vec::new();
    for &size in &sizes {
        if size == 0 || size % PAGE as u64 != 0 {
            return Err(format!("{size} bytes is not a whole number of 4 KiB pages"));
        }
        warm::check_fits(
            &format!("{} MiB (two copies)", size >> 20),
            2 * size,
            warm::mem_available(),
        )?;
        for &v in &cli.variant {
            let c = curve(size, v, !cli.no_warm_up)?;
            println!(
                "{:>6} MiB {:<8} {:>7.0} MiB/s  {:>5.0} ns/page  eighths {}  pgalloc {} pgfault {} thp {} scan {}+{} stall {}+{}",
                size >> 20,
                format!("{v:?}").to_lowercase(),
                c.throughput_mib_s,
                c.ns_per_page,
                c.throughput_eighths_mib_s
                    .iter()
                    .map(|t| format!("{t:.0}"))
                    .collect::<Vec<_>>()
                    .join("/"),
                c.vmstat.pgalloc,
                c.vmstat.pgfault,
                c.vmstat.thp_fault_alloc,
                c.vmstat.pgscan_kswapd,
                c.vmstat.pgscan_direct,
                c.vmstat.allocstall,
                c.vmstat.compact_stall,
            );
            out.push(c);
        }
    }
    if let Some(p) = &cli.json {
        let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Places every page of a `size`-byte mapping in `variant`.
fn curve(size: u64, variant: Variant, warm_up: bool) -> Result<Curve, String> {
    let len = size as usize;
    let warm_up_s = if warm_up {
        warm::warm_up(2 * size, 0)?
    } else {
        0.0
    };
    // The source's copy, resident (a one-process run holds it through postcopy).
    let mut source = MmapOptions::new()
        .len(len)
        .populate()
        .map_anon()
        .map_err(|e| format!("mapping the source's copy: {e}"))?;
    source.iter_mut().step_by(PAGE).for_each(|b| *b = 1);
    let mut dst = MmapMut::map_anon(len).map_err(|e| format!("mapping {size} bytes: {e}"))?;
    match variant {
        Variant::Fresh => {}
        Variant::Dontneed => {
            dst.iter_mut().step_by(PAGE).for_each(|b| *b = 1);
            // SAFETY: our own private mapping; nothing holds a reference into it.
            unsafe { dst.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }
                .map_err(|e| format!("MADV_DONTNEED: {e}"))?;
        }
        Variant::Thp => dst
            .advise(memmap2::Advice::HugePage)
            .map_err(|e| format!("MADV_HUGEPAGE: {e}"))?,
    }
    let uffd = Userfault::open().map_err(|e| format!("userfaultfd: {e}"))?;
    let base = dst.as_mut_ptr() as u64;
    // SAFETY: `dst` is a private anonymous mapping that outlives the descriptor's use here.
    unsafe { uffd.register(base, size) }.map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let pages = len / PAGE;
    let per_eighth = pages.div_ceil(EIGHTHS);
    let mut marks = Vec::with_capacity(EIGHTHS);
    let before = Vmstat::read().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    for p in 0..pages {
        let at = (p % (buf.len() / PAGE)) * PAGE;
        // SAFETY: page `p` lies in the registered range.
        unsafe { uffd.copy(base + (p * PAGE) as u64, &buf[at..at + PAGE]) }
            .map_err(|e| format!("UFFDIO_COPY of page {p}: {e}"))?;
        if (p + 1) % per_eighth == 0 || p + 1 == pages {
            marks.push((p + 1, t0.elapsed().as_secs_f64()));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let vmstat = Vmstat::read().map_err(|e| e.to_string())?.since(&before);
    drop(source);
    let mib = |pages: usize| (pages * PAGE) as f64 / (1 << 20) as f64;
    let mut eighths = Vec::new();
    let mut prev = (0, 0.0);
    for &(n, t) in &marks {
        eighths.push(mib(n - prev.0) / (t - prev.1).max(1e-9));
        prev = (n, t);
    }
    Ok(Curve {
        variant,
        mem_bytes: size,
        throughput_mib_s: mib(pages) / secs,
        throughput_eighths_mib_s: eighths,
        ns_per_page: secs * 1e9 / pages as f64,
        vmstat,
        warm_up_s,
    })
}
