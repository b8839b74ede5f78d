//! The side-by-side comparison out: a table, a JSON document and an SVG (request p50 and
//! p99, and blocktime, QEMU's bars beside pagehint's, per link and workload).

use std::fmt::Write as _;

use serde::Serialize;

use super::side::SideRow;
use crate::harness::export::{esc, fmt_ms, fmt_us, TargetCheck};

/// A link as measured.
#[derive(Clone, Debug, Serialize)]
pub struct LinkInfo {
    /// `10G`, `1G`.
    pub name: String,
    /// `tbf` rate, bits/s.
    pub rate_bps: u64,
    /// What the probe got through it, bits/s.
    pub measured_bps: f64,
    /// The shaping, as `tc` was told.
    pub shaping: String,
}

/// Everything one comparison produced.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// QEMU's `--version` line.
    pub qemu_version: String,
    /// Guest and run settings, in words.
    pub setup: String,
    /// The links.
    pub links: Vec<LinkInfo>,
    /// Every run.
    pub rows: Vec<SideRow>,
    /// The targets, checked.
    pub targets: Vec<TargetCheck>,
    /// Wall-clock seconds of the whole comparison.
    pub seconds: f64,
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / (1u64 << 20) as f64)
}

/// The table, one line per run.
pub fn table(rows: &[SideRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<5} {:<7} {:<26} {:>7} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>6} {:>6}  guest",
        "link",
        "work",
        "peer / mode",
        "reqs",
        "req p50",
        "req p99",
        "blocktime",
        "total",
        "downtime",
        "ops/s",
        "pre",
        "post"
    );
    let mut last = (String::new(), String::new());
    for r in rows {
        let key = (r.link.clone(), r.workload.clone());
        if key != last && !last.0.is_empty() {
            s.push('\n');
        }
        last = key;
        let who = format!("{} {}", r.peer, r.mode);
        if !r.completed {
            let _ = writeln!(
                s,
                "{:<5} {:<7} {:<26} FAILED: {}",
                r.link,
                r.workload,
                who,
                r.error.as_deref().unwrap_or("?")
            );
            continue;
        }
        let _ = writeln!(
            s,
            "{:<5} {:<7} {:<26} {:>7} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>6} {:>6}  {}",
            r.link,
            r.workload,
            who,
            r.requests,
            fmt_us(r.request_p50_us),
            fmt_us(r.request_p99_us),
            fmt_ms(r.blocktime_ms),
            fmt_ms(r.total_ms),
            fmt_ms(r.downtime_ms),
            r.ops_postcopy_per_s
                .map_or("-".into(), |v| format!("{:.0}k", v / 1e3)),
            mib(r.precopy_bytes),
            mib(r.postcopy_bytes),
            if r.guest_alive {
                "alive".to_string()
            } else {
                format!("NOT ALIVE ({})", r.error.as_deref().unwrap_or("see JSON"))
            }
        );
    }
    s
}

/// The comparison as a JSON document.
pub fn json(c: &Comparison) -> String {
    serde_json::to_string_pretty(c).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn color(r: &SideRow) -> &'static str {
    match (r.is_qemu(), r.mode.as_str()) {
        (true, "vanilla") => "#f4a582",
        (true, _) => "#92c5de",
        (false, "vanilla") => "#b2182b",
        (false, "preempt") => "#2166ac",
        (false, _) => "#1a9850",
    }
}

/// One panel per (figure, link): for each workload, a log-scale bar per run.
pub fn svg(c: &Comparison) -> String {
    type Figure = (&'static str, fn(&SideRow) -> f64);
    let figures: [Figure; 3] = [
        ("request p50 (µs)", |r| r.request_p50_us),
        ("request p99 (µs)", |r| r.request_p99_us),
        ("vCPU blocktime (ms)", |r| r.blocktime_ms),
    ];
    let mut workloads: Vec<&str> = Vec::new();
    let mut series: Vec<(bool, &str, &str)> = Vec::new();
    for r in &c.rows {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
        let k = (r.is_qemu(), r.peer.as_str(), r.mode.as_str());
        if !series.contains(&k) {
            series.push(k);
        }
    }
    series.sort_by_key(|&(q, _, m)| (!q, m != "vanilla", m == "preempt-hint"));
    let (pw, ph) = (430.0, 240.0);
    let cols = c.links.len().max(1);
    let (w, h) = (pw * cols as f64 + 20.0, ph * figures.len() as f64 + 140.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="10" y="20" font-size="15" font-weight="bold">{} and pagehint, side by side: the same guest over the same shaped link</text>"##,
        esc(&c
            .qemu_version
            .split(" (")
            .next()
            .unwrap_or("QEMU")
            .replace("QEMU emulator version", "QEMU"))
    );
    // The setup, wrapped at its "; " clauses.
    let mut lines: Vec<String> = vec![String::new()];
    for part in c.setup.split("; ") {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.len() + part.len() > 120 {
            lines.push(part.to_string());
        } else {
            if !last.is_empty() {
                last.push_str("; ");
            }
            last.push_str(part);
        }
    }
    for (i, l) in lines.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="10" y="{}" fill="#555" font-size="10">{}</text>"##,
            34 + 13 * i,
            esc(l)
        );
    }
    let top = 34.0 + 13.0 * lines.len() as f64;
    // Legend.
    let mut lx = 10.0;
    for &(q, peer, mode) in &series {
        let probe = c
            .rows
            .iter()
            .find(|r| r.is_qemu() == q && r.peer == peer && r.mode == mode);
        if let Some(r) = probe {
            let label = format!("{} {}", if q { peer } else { "pagehint" }, mode);
            let _ = writeln!(
                s,
                r##"<rect x="{lx}" y="{top}" width="12" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"##,
                color(r),
                lx + 16.0,
                top + 9.0,
                esc(&label)
            );
            lx += 22.0 + 6.5 * label.len() as f64;
        }
    }
    for (fi, (fname, f)) in figures.iter().enumerate() {
        for (li, link) in c.links.iter().enumerate() {
            let ox = 10.0 + pw * li as f64;
            let oy = top + 24.0 + ph * fi as f64;
            let (l, t, r, b) = (ox + 50.0, oy + 22.0, ox + pw - 15.0, oy + ph - 40.0);
            let rows: Vec<&SideRow> = c
                .rows
                .iter()
                .filter(|r| r.link == link.name && r.completed)
                .collect();
            let vals: Vec<f64> = rows.iter().map(|r| f(r)).filter(|v| *v > 0.0).collect();
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().copied().fold(0.0, f64::max);
            let (d0, d1) = if vals.is_empty() {
                (0.0, 1.0)
            } else {
                (
                    lo.log10().floor(),
                    hi.log10().ceil().max(lo.log10().floor() + 1.0),
                )
            };
            let y = |v: f64| b - (v.max(10f64.powf(d0)).log10() - d0) / (d1 - d0) * (b - t);
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" font-weight="bold">{} — {} link</text>"##,
                l,
                oy + 14.0,
                esc(fname),
                esc(&link.name)
            );
            let mut d = d0;
            while d <= d1 + 1e-9 {
                let yy = y(10f64.powf(d));
                let _ = writeln!(
                    s,
                    r##"<line x1="{l}" y1="{yy:.1}" x2="{r}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                    l - 4.0,
                    yy + 4.0,
                    10f64.powf(d)
                );
                d += 1.0;
            }
            let gw = (r - l) / workloads.len().max(1) as f64;
            let bw = (gw - 12.0) / series.len().max(1) as f64;
            for (wi, wl) in workloads.iter().enumerate() {
                let gx = l + gw * wi as f64 + 6.0;
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                    gx + (gw - 12.0) / 2.0,
                    b + 14.0,
                    esc(wl)
                );
                for (si, &(q, peer, mode)) in series.iter().enumerate() {
                    let Some(row) = rows.iter().find(|x| {
                        x.workload == *wl && x.is_qemu() == q && x.peer == peer && x.mode == mode
                    }) else {
                        continue;
                    };
                    let v = f(row);
                    if v <= 0.0 {
                        continue;
                    }
                    let yy = y(v);
                    let _ = writeln!(
                        s,
                        r##"<rect x="{:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {} {}: {v:.1}</title></rect>"##,
                        gx + bw * si as f64,
                        (bw - 1.0).max(1.0),
                        (b - yy).max(0.5),
                        color(row),
                        esc(&row.peer),
                        esc(&row.mode),
                        esc(wl)
                    );
                }
            }
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/><text x="{l}" y="{}" fill="#555" font-size="10">measured {:.2} Gbit/s</text>"##,
                b + 28.0,
                link.measured_bps / 1e9
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
