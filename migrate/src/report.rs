//! Results: one [`RunResult`] per mode × workload, the comparison table, the target checks,
//! the JSON list and the SVG plot of fault-latency distributions (hand-written SVG: no
//! system libraries, no fonts).

use std::fmt::Write as _;

use serde::Serialize;

/// What one migration run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// `vanilla`, `preempt` or `preempt-hint`.
    pub mode: String,
    /// `seq`, `random`, `stream` or `kv`.
    pub workload: String,
    /// How faults were caught (userfaultfd or the software path, and why).
    pub fault_path: String,
    /// Guest accesses that found their page missing and waited.
    pub faults: u64,
    /// Fault events read from userfaultfd (0 on the software path).
    pub uffd_faults: u64,
    /// Page requests the destination sent.
    pub requests_sent: u64,
    /// Median fault latency, µs.
    pub fault_p50_us: f64,
    /// 99th-percentile fault latency, µs.
    pub fault_p99_us: f64,
    /// Longest fault, µs.
    pub fault_max_us: f64,
    /// Total time the guest waited on faults, ms.
    pub stall_ms: f64,
    /// stream: longest time behind schedule; others: the longest single fault, ms.
    pub longest_pause_ms: f64,
    /// From postcopy start to the last page placed, ms.
    pub duration_ms: f64,
    /// How long the workload ran, ms.
    pub workload_ms: f64,
    /// Guest RAM over migration time, MiB/s.
    pub throughput_mib_s: f64,
    /// Pages read or lookups done by the workload.
    pub ops: u64,
    /// Target pages sent by the urgent path.
    pub pages_urgent: u64,
    /// Target pages sent by the background path.
    pub pages_background: u64,
    /// Requests for pages the background path had already claimed (preempt).
    pub already_claimed: u64,
    /// Valid requests the source served.
    pub requests: u64,
    /// Hints offered by the urgent path.
    pub hints_offered: u64,
    /// Hints accepted into the empty slot.
    pub hints_accepted: u64,
    /// Hints the background scan took.
    pub hints_taken: u64,
    /// Queued requests the background scan jumped to (vanilla).
    pub queued_followed: u64,
    /// Malformed or out-of-range requests the source rejected.
    pub bad_requests: u64,
    /// The source's messages for the first rejected requests.
    pub rejected: Vec<String>,
    /// All-zero host pages sent without payload.
    pub zero_host_pages: u64,
    /// Host pages placed twice (must be 0).
    pub placed_twice: u64,
    /// Source clock minus destination clock as measured by pings, µs.
    pub clock_offset_us: f64,
    /// Source and destination share `CLOCK_MONOTONIC` (same boot), so no offset is applied.
    pub same_clock: bool,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Host page bytes.
    pub host_page: u64,
    /// Every page matches the source, the guest read correct data, nothing placed twice.
    pub verified: bool,
    /// What failed verification.
    pub problems: Vec<String>,
    /// Sorted fault latencies (ns), for the plot.
    #[serde(skip)]
    pub latencies_ns: Vec<u64>,
}

/// The `p`-th percentile (nearest rank) of sorted `v`; 0 if empty.
pub fn percentile_ns(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt_us(us: f64) -> String {
    if us <= 0.0 {
        "-".into()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn fmt_ms(ms: f64) -> String {
    fmt_us(ms * 1e3)
}

/// The comparison table, one row per run.
pub fn table(rows: &[RunResult]) -> String {
    let mut out = String::new();
    let head = [
        "workload",
        "mode",
        "faults",
        "p50",
        "p99",
        "max",
        "stall",
        "longest pause",
        "migration",
        "urgent/bg pages",
        "hints off/taken",
        "verified",
    ];
    let mut cells: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        cells.push(vec![
            r.workload.clone(),
            r.mode.clone(),
            r.faults.to_string(),
            fmt_us(r.fault_p50_us),
            fmt_us(r.fault_p99_us),
            fmt_us(r.fault_max_us),
            fmt_ms(r.stall_ms),
            fmt_ms(r.longest_pause_ms),
            fmt_ms(r.duration_ms),
            format!("{}/{}", r.pages_urgent, r.pages_background),
            format!("{}/{}", r.hints_offered, r.hints_taken),
            if r.verified {
                "yes".into()
            } else {
                "NO".into()
            },
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| {
            cells
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in cells.iter().enumerate() {
        if i == 1 || (i > 1 && rows[i - 1].workload != rows[i - 2].workload) {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, w))| {
                let pad = w - s.chars().count();
                if c < 2 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// One target of the issue, checked on this run's results.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetCheck {
    /// What is compared.
    pub what: String,
    /// The measured ratio (None if a run is missing).
    pub ratio: Option<f64>,
    /// Whether it meets the target.
    pub pass: bool,
    /// The target, in words.
    pub target: String,
}

fn find<'a>(rows: &'a [RunResult], w: &str, m: &str) -> Option<&'a RunResult> {
    rows.iter().find(|r| r.workload == w && r.mode == m)
}

/// Checks the targets that the runs present allow.
pub fn targets(rows: &[RunResult]) -> Vec<TargetCheck> {
    let ratio = |w: &str, a: &str, b: &str, f: fn(&RunResult) -> f64| {
        let (x, y) = (find(rows, w, a)?, find(rows, w, b)?);
        let (x, y) = (f(x), f(y));
        Some(if y > 0.0 { x / y } else { f64::INFINITY })
    };
    let mut out = Vec::new();
    let mut push = |what: &str, r: Option<f64>, target: &str, ok: fn(f64) -> bool| {
        out.push(TargetCheck {
            what: what.into(),
            ratio: r,
            pass: r.is_some_and(ok),
            target: target.into(),
        })
    };
    push(
        "random fault p50: vanilla / preempt",
        ratio("random", "vanilla", "preempt", |r| r.fault_p50_us),
        ">= 5x",
        |x| x >= 5.0,
    );
    push(
        "seq total stall: preempt / preempt-hint",
        ratio("seq", "preempt", "preempt-hint", |r| r.stall_ms),
        ">= 5x",
        |x| x >= 5.0,
    );
    push(
        "stream longest pause: preempt / preempt-hint",
        ratio("stream", "preempt", "preempt-hint", |r| r.longest_pause_ms),
        ">= 5x (well below)",
        |x| x >= 5.0,
    );
    push(
        "random fault p50: preempt-hint / preempt",
        ratio("random", "preempt-hint", "preempt", |r| r.fault_p50_us),
        "<= 1.25x",
        |x| x <= 1.25,
    );
    if !rows.is_empty() {
        let n = rows.iter().filter(|r| r.verified).count();
        out.push(TargetCheck {
            what: format!("runs verified: {n} of {}", rows.len()),
            ratio: None,
            pass: n == rows.len(),
            target: "all".into(),
        });
    }
    out
}

/// The target checks as text lines.
pub fn targets_text(checks: &[TargetCheck]) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = if c.pass {
            "PASS"
        } else if c.ratio.is_none() && c.target != "all" {
            "n/a "
        } else {
            "MISS"
        };
        let val = match c.ratio {
            Some(r) if r.is_finite() => format!(" = {r:.2}x"),
            Some(_) => " = inf".into(),
            None if c.target == "all" => String::new(),
            None => " (not run)".into(),
        };
        let _ = writeln!(out, "  [{mark}] {}{val}   (target {})", c.what, c.target);
    }
    out
}

/// The results as a JSON list of objects.
pub fn json(rows: &[RunResult]) -> String {
    serde_json::to_string_pretty(rows).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn mode_color(mode: &str) -> &'static str {
    match mode {
        "vanilla" => "#d62728",
        "preempt" => "#1f77b4",
        "preempt-hint" => "#2ca02c",
        _ => "#7f7f7f",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG of the fault-latency distributions (CDF, log time axis): one panel per workload,
/// one line per mode.
pub fn svg(rows: &[RunResult], subtitle: &str) -> String {
    let mut workloads: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    let (pw, ph) = (460.0, 350.0);
    let cols = 2usize;
    let nrows = workloads.len().div_ceil(cols).max(1);
    let (w, h) = (pw * cols as f64 + 20.0, ph * nrows as f64 + 70.0);
    let all: Vec<u64> = rows
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    let lo = all.iter().copied().min().unwrap_or(1_000).max(100) as f64;
    let hi = all.iter().copied().max().unwrap_or(1_000_000).max(10_000) as f64;
    let (d0, d1) = (
        (lo / 1e3).log10().floor(),
        (hi / 1e3)
            .log10()
            .ceil()
            .max((lo / 1e3).log10().floor() + 1.0),
    );
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="10" y="20" font-size="15" font-weight="bold">pagehint-migrate: fault latency (fraction of faults at or below a latency)</text>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">{}</text>"##,
        esc(subtitle)
    );
    for (i, wl) in workloads.iter().enumerate() {
        let ox = 10.0 + pw * (i % cols) as f64;
        let oy = 50.0 + ph * (i / cols) as f64;
        let (l, t, pr, pb) = (ox + 45.0, oy + 25.0, ox + pw - 15.0, oy + ph - 90.0);
        let x_of = |ns: f64| l + ((ns / 1e3).max(1e-3).log10() - d0) / (d1 - d0) * (pr - l);
        let y_of = |f: f64| pb - f * (pb - t);
        let _ = writeln!(
            s,
            r##"<text x="{l}" y="{}" font-size="13" font-weight="bold">{}</text>"##,
            oy + 15.0,
            esc(wl)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
            pr - l,
            pb - t
        );
        let mut d = d0;
        while d <= d1 + 1e-9 {
            let x = l + (d - d0) / (d1 - d0) * (pr - l);
            let label = match 10f64.powf(d) {
                v if v < 1000.0 => format!("{v:.0} µs"),
                v if v < 1e6 => format!("{:.0} ms", v / 1e3),
                v => format!("{:.0} s", v / 1e6),
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{t}" x2="{x}" y2="{pb}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
                pb + 14.0
            );
            d += 1.0;
        }
        for f in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = y_of(f);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{y}" x2="{pr}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{f}</text>"##,
                l - 4.0,
                y + 4.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">fault latency</text>"##,
            (l + pr) / 2.0,
            pb + 28.0
        );
        let mut legend_y = pb + 46.0;
        for r in rows.iter().filter(|r| r.workload == *wl) {
            let c = mode_color(&r.mode);
            let n = r.latencies_ns.len();
            if n > 0 {
                let step = (n / 400).max(1);
                let mut pts = String::new();
                let mut prev_y = y_of(0.0);
                for k in (0..n).step_by(step).chain(std::iter::once(n - 1)) {
                    let x = x_of(r.latencies_ns[k] as f64);
                    let y = y_of((k + 1) as f64 / n as f64);
                    let _ = write!(pts, "{x:.1},{prev_y:.1} {x:.1},{y:.1} ");
                    prev_y = y;
                }
                let _ = writeln!(
                    s,
                    r##"<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{pts}"/>"##
                );
            }
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{}" width="10" height="3" fill="{c}"/><text x="{}" y="{}">{} — {} faults, p50 {}</text>"##,
                l + 8.0,
                legend_y - 4.0,
                l + 22.0,
                legend_y,
                esc(&r.mode),
                n,
                esc(&fmt_us(r.fault_p50_us))
            );
            legend_y += 14.0;
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(w: &str, m: &str, p50: f64, stall: f64, pause: f64) -> RunResult {
        RunResult {
            mode: m.into(),
            workload: w.into(),
            fault_path: "x".into(),
            faults: 1,
            uffd_faults: 0,
            requests_sent: 0,
            fault_p50_us: p50,
            fault_p99_us: p50,
            fault_max_us: p50,
            stall_ms: stall,
            longest_pause_ms: pause,
            duration_ms: 1.0,
            workload_ms: 1.0,
            throughput_mib_s: 1.0,
            ops: 1,
            pages_urgent: 0,
            pages_background: 0,
            already_claimed: 0,
            requests: 0,
            hints_offered: 0,
            hints_accepted: 0,
            hints_taken: 0,
            queued_followed: 0,
            bad_requests: 0,
            rejected: vec![],
            zero_host_pages: 0,
            placed_twice: 0,
            clock_offset_us: 0.0,
            same_clock: true,
            mem_bytes: 0,
            host_page: 4096,
            verified: true,
            problems: vec![],
            latencies_ns: vec![1000, 2000, 300_000],
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_ns(&v, 50.0), 50);
        assert_eq!(percentile_ns(&v, 99.0), 99);
        assert_eq!(percentile_ns(&[7], 99.0), 7);
        assert_eq!(percentile_ns(&[], 50.0), 0);
    }

    #[test]
    fn targets_are_computed_from_the_rows_and_can_fail() {
        let mut rows = vec![
            row("random", "vanilla", 6000.0, 1.0, 1.0),
            row("random", "preempt", 200.0, 1.0, 1.0),
            row("random", "preempt-hint", 210.0, 1.0, 1.0),
            row("seq", "preempt", 200.0, 400.0, 1.0),
            row("seq", "preempt-hint", 5.0, 20.0, 1.0),
        ];
        let t = targets(&rows);
        assert!(t[0].pass && t[1].pass && t[3].pass);
        assert!(!t[2].pass && t[2].ratio.is_none()); // stream not run
        rows[2].fault_p50_us = 300.0;
        rows[4].stall_ms = 100.0;
        let t = targets(&rows);
        assert!(!t[1].pass && !t[3].pass);
        assert!(svg(&rows, "test").contains("<polyline"));
        assert!(table(&rows).contains("preempt-hint"));
        let j: serde_json::Value = serde_json::from_str(&json(&rows)).unwrap();
        assert_eq!(j[0]["mode"], "vanilla");
        assert!(j[0].get("latencies_ns").is_none());
    }
}
