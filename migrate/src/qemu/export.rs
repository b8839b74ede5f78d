//! The side-by-side comparison out: the medians table, the attribution table (every ratio
//! split into scheduler and transport), what tracing cost QEMU, the targets, a JSON document
//! and an SVG (medians with min–max whiskers of request p50 and p99, blocktime, the vCPUs'
//! blocked time added up and CPU per
//! GiB, per link and workload).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::compare::TraceProbe;
use super::side::{self, Anchor, Figure, Series, SideRow, Split, Spread, Target};
use crate::harness::export::{esc, fmt_ms, fmt_us};

/// A link as measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// A QEMU of the comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QemuInfo {
    /// `QEMU 11.1.3`.
    pub label: String,
    /// Its `--version` line.
    pub version: String,
    /// The binary run.
    pub binary: String,
    /// "before the hint" or "the hint, as merged (the anchor)".
    pub role: String,
    /// Where its request latency comes from.
    pub latency_from: String,
}

/// Everything one comparison produced.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The QEMUs.
    pub qemus: Vec<QemuInfo>,
    /// What the ratios compare.
    pub anchor: Option<Anchor>,
    /// Guest and run settings, in words.
    pub setup: String,
    /// The links.
    pub links: Vec<LinkInfo>,
    /// Every run.
    pub rows: Vec<SideRow>,
    /// Each configuration over the repeats.
    pub series: Vec<Series>,
    /// What tracing cost QEMU.
    pub probes: Vec<TraceProbe>,
    /// Every ratio, split.
    pub splits: Vec<Split>,
    /// The targets, checked.
    pub targets: Vec<Target>,
    /// Wall-clock seconds of the whole comparison.
    pub seconds: f64,
}

/// One line per run, as it finishes.
pub fn run_line(r: &SideRow) -> String {
    let who = format!("{} {} [{}]", r.peer, r.mode, r.transport);
    let head = format!(
        "  #{} {:<4} {:<7} {:<38}",
        r.repeat, r.link, r.workload, who
    );
    if !r.completed {
        return format!("{head} FAILED: {}", r.error.as_deref().unwrap_or("?"));
    }
    let (p50, p99, src) = r
        .latency
        .as_ref()
        .map_or(("-".into(), "-".into(), ""), |l| {
            (fmt_us(l.p50_us), fmt_us(l.p99_us), l.source.label())
        });
    format!(
        "{head} {:>6} req, p50 {:>8}, p99 {:>8} ({src}), blocktime {:>8}, vCPUs blocked {:>8} ({}), total {:>8}, CPU {:>5.0} ms/GiB, guest {}",
        r.requests,
        p50,
        p99,
        fmt_ms(r.blocktime_ms),
        r.vcpus_blocked_ms().map_or("-".into(), fmt_ms),
        r.vcpu_blocktime_ms
            .iter()
            .map(|&v| fmt_ms(v))
            .collect::<Vec<_>>()
            .join(" + "),
        r.span_ms.map_or("-".into(), fmt_ms),
        r.cpu_ms_per_gib,
        if r.guest_alive { "alive" } else { "NOT ALIVE" }
    )
}

fn cell(f: Figure, s: &Option<Spread>) -> String {
    s.map_or("-".into(), |s| f.fmt(s.median))
}

/// The medians table: one line per configuration.
pub fn medians(series: &[Series]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<5} {:<7} {:<32} {:<9} {:>7} {:>9} {:>9} {:>10} {:>13} {:>9} {:>9} {:>6}  runs",
        "link",
        "work",
        "peer / mode",
        "transport",
        "reqs",
        "p50",
        "p99",
        "blocktime",
        "vCPUs blocked",
        "total",
        "CPU/GiB",
        "MiB"
    );
    let mut last = (String::new(), String::new());
    for x in series {
        let c = &x.config;
        let key = (c.link.clone(), c.workload.clone());
        if key != last && !last.0.is_empty() {
            s.push('\n');
        }
        last = key;
        let f = |i: usize| cell(Figure::ALL[i], &x.figures[i]);
        let _ = writeln!(
            s,
            "{:<5} {:<7} {:<32} {:<9} {:>7} {:>9} {:>9} {:>10} {:>13} {:>9} {:>9} {:>6}  {}/{}{}",
            c.link,
            c.workload,
            format!("{} {}", c.peer, c.mode),
            c.transport.name(),
            x.requests
                .map_or("-".into(), |r| format!("{:.0}", r.median)),
            f(0),
            f(1),
            f(2),
            f(3),
            f(4),
            f(5),
            x.mib_sent
                .map_or("-".into(), |m| format!("{:.0}", m.median)),
            x.ok,
            x.runs,
            if x.ok < x.runs { " FAILED" } else { "" }
        );
    }
    s
}

/// The attribution table, per link.
pub fn attribution(splits: &[Split], anchor: &Anchor) -> String {
    let mut s = String::new();
    let mut tables: Vec<(&str, &str)> = Vec::new();
    for x in splits {
        if !tables.contains(&(x.mode.as_str(), x.link.as_str())) {
            tables.push((&x.mode, &x.link));
        }
    }
    let before = anchor.before.as_deref().unwrap_or("-");
    for (mode, link) in tables {
        let _ = writeln!(
            s,
            "link {link}: {} preempt / pagehint {mode} (above 1: pagehint lower); median (min-max) over the repeats",
            anchor.qemu
        );
        let _ = writeln!(
            s,
            "  {:<7} {:<13} {:>20} {:>20} {:>20} {:>20} {:>20} {:>20}",
            "work",
            "figure",
            "as shipped",
            "sched@QEMU transp",
            "sched@pagehint tr",
            "transport:pagehint",
            "transport:QEMU",
            format!("{before} shipped")
        );
        for x in splits.iter().filter(|x| x.link == link && x.mode == mode) {
            let _ = writeln!(
                s,
                "  {:<7} {:<13} {:>20} {:>20} {:>20} {:>20} {:>20} {:>20}",
                x.workload,
                x.figure.name(),
                x.shipped.text(),
                x.sched_qemu_transport.text(),
                x.sched_pagehint_transport.text(),
                x.transport_pagehint.text(),
                x.transport_qemu.text(),
                x.shipped_before.text()
            );
        }
        s.push('\n');
    }
    s
}

fn change(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => format!(
            "{} -> {} ({:+.1}%)",
            fmt_ms(a),
            fmt_ms(b),
            (b / a - 1.0) * 100.0
        ),
        _ => "-".into(),
    }
}

/// What tracing cost QEMU: one line per probe, and the median change per peer and link.
pub fn tracing(probes: &[TraceProbe]) -> String {
    let mut s = String::new();
    for p in probes {
        if let Some(e) = &p.error {
            let _ = writeln!(s, "  #{} {} {}: FAILED: {e}", p.repeat, p.link, p.peer);
            continue;
        }
        let mut line = format!(
            "  #{} {:<4} {} {} {}: untraced -> traced: total {}, blocktime {}",
            p.repeat,
            p.link,
            p.peer,
            p.mode,
            p.workload,
            change(p.span_ms.0, p.span_ms.1),
            change(Some(p.blocktime_ms.0), Some(p.blocktime_ms.1)),
        );
        if let (Some(q), Some(t)) = (&p.qmp_latency, &p.trace_latency) {
            let _ = write!(
                line,
                "; same run: QEMU's own p50/p99 {}/{} ({} samples) vs trace {}/{} ({} samples)",
                fmt_us(q.p50_us),
                fmt_us(q.p99_us),
                q.samples,
                fmt_us(t.p50_us),
                fmt_us(t.p99_us),
                t.samples
            );
        }
        let _ = writeln!(s, "{line}");
    }
    let mut keys: Vec<(String, String)> = Vec::new();
    for p in probes {
        let k = (p.link.clone(), p.peer.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (link, peer) in keys {
        let of = |f: &dyn Fn(&TraceProbe) -> Option<f64>| {
            Spread::of(
                probes
                    .iter()
                    .filter(|p| p.link == link && p.peer == peer && p.error.is_none())
                    .filter_map(f),
            )
        };
        let total = of(&|p| Some(p.span_ms.1? / p.span_ms.0? - 1.0));
        let bt =
            of(&|p| (p.blocktime_ms.0 > 0.0).then(|| p.blocktime_ms.1 / p.blocktime_ms.0 - 1.0));
        let pct = |s: Option<Spread>| {
            s.map_or("-".into(), |s| {
                format!(
                    "{:+.1}% ({:+.1}..{:+.1})",
                    s.median * 100.0,
                    s.min * 100.0,
                    s.max * 100.0
                )
            })
        };
        let _ = writeln!(
            s,
            "  {link} {peer}: tracing the requests changes total time by {}, blocktime by {} (median, range over repeats)",
            pct(total),
            pct(bt)
        );
    }
    s
}

/// The comparison as a JSON document.
pub fn json(c: &Comparison) -> String {
    serde_json::to_string_pretty(c).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The fill of configuration `x`'s bars and legend entry.
fn color(x: &Series) -> &'static str {
    use super::ours::Transport::{Pagehint, Qemu};
    let c = &x.config;
    let qemu = c.peer.starts_with("QEMU");
    match (qemu, c.mode.as_str(), c.transport) {
        (true, "vanilla", _) if c.peer.contains(" 10.") => "#fddbc7",
        (true, _, _) if c.peer.contains(" 10.") => "#d1e5f0",
        (true, "vanilla", Qemu) => "#f4a582",
        (true, "vanilla", Pagehint) => "#d6604d",
        (true, _, Qemu) => "#92c5de",
        (true, _, Pagehint) => "#4393c3",
        (false, "vanilla", Qemu) => "#de77ae",
        (false, "vanilla", Pagehint) => "#b2182b",
        (false, "preempt", Qemu) => "#9e9ac8",
        (false, "preempt", Pagehint) => "#2166ac",
        (false, _, Qemu) => "#a6dba0",
        (false, _, Pagehint) => "#1a9850",
    }
}

/// A configuration of the chart: peer, mode and transport.
type Kind<'a> = (&'a str, &'a str, super::ours::Transport);

/// The vertical extent of one panel's plot area and its log-scale axis, from decade `d0`
/// to `d1`.
struct Plot {
    /// Top.
    t: f64,
    /// Bottom.
    b: f64,
    /// The lowest decade (log10).
    d0: f64,
    /// The highest decade (log10).
    d1: f64,
}

impl Plot {
    /// The y of value `v` (values below the axis at its bottom).
    fn y(&self, v: f64) -> f64 {
        self.b
            - (v.max(10f64.powf(self.d0)).log10() - self.d0) / (self.d1 - self.d0)
                * (self.b - self.t)
    }
}

/// The chart of a comparison: its workloads and configurations, in the order they first
/// appear, and the size of a panel.
struct Chart<'a> {
    /// The comparison.
    c: &'a Comparison,
    /// The workloads.
    workloads: Vec<&'a str>,
    /// The configurations.
    kinds: Vec<Kind<'a>>,
    /// A panel's width.
    pw: f64,
    /// A panel's height.
    ph: f64,
}

impl<'a> Chart<'a> {
    /// The workloads and configurations of `c`.
    fn new(c: &'a Comparison) -> Self {
        let mut workloads: Vec<&str> = Vec::new();
        let mut kinds: Vec<Kind<'a>> = Vec::new();
        for x in &c.series {
            if !workloads.contains(&x.config.workload.as_str()) {
                workloads.push(&x.config.workload);
            }
            let k = (
                x.config.peer.as_str(),
                x.config.mode.as_str(),
                x.config.transport,
            );
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        Chart {
            c,
            workloads,
            kinds,
            pw: 720.0,
            ph: 250.0,
        }
    }

    /// Writes the title and the setup (wrapped at about 150 characters); returns where
    /// the legend goes.
    fn heading(&self, s: &mut String) -> f64 {
        let names: Vec<String> = self.c.qemus.iter().map(|q| q.label.clone()).collect();
        let _ = writeln!(
            s,
            r##"<text x="10" y="20" font-size="15" font-weight="bold">{} and pagehint, side by side: the same guest over the same shaped link, each on both transports</text>"##,
            esc(&names.join(", "))
        );
        let mut lines: Vec<String> = vec![String::new()];
        for part in self.c.setup.split("; ") {
            let last = lines.last_mut().expect("one line");
            if !last.is_empty() && last.len() + part.len() > 150 {
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
        40.0 + 13.0 * lines.len() as f64
    }

    /// Writes the legend, four configurations a row, from `top`.
    fn legend(&self, s: &mut String, top: f64) {
        for (i, &(peer, mode, t)) in self.kinds.iter().enumerate() {
            let Some(x) = self.c.series.iter().find(|x| {
                x.config.peer == peer && x.config.mode == mode && x.config.transport == t
            }) else {
                continue;
            };
            let (lx, ly) = (10.0 + 260.0 * (i % 4) as f64, top + 16.0 * (i / 4) as f64);
            let _ = writeln!(
                s,
                r##"<rect x="{lx}" y="{ly}" width="12" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"##,
                color(x),
                lx + 16.0,
                ly + 9.0,
                esc(&format!("{peer} {mode} [{t} transport]"))
            );
        }
    }

    /// Writes the panel of figure `f` on `link` at (`ox`, `oy`): title, decades, one group
    /// of bars per workload, axis and the link's measured rate.
    fn panel(&self, s: &mut String, f: Figure, link: &LinkInfo, ox: f64, oy: f64) {
        let (l, t, r, b) = (
            ox + 55.0,
            oy + 22.0,
            ox + self.pw - 15.0,
            oy + self.ph - 40.0,
        );
        let series: Vec<&Series> = self
            .c
            .series
            .iter()
            .filter(|x| x.config.link == link.name)
            .collect();
        let fidx = Figure::ALL.iter().position(|g| *g == f).expect("a figure");
        let vals: Vec<f64> = series
            .iter()
            .filter_map(|x| x.figures[fidx])
            .flat_map(|sp| [sp.min, sp.max])
            .filter(|v| *v > 0.0)
            .collect();
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
        let p = Plot { t, b, d0, d1 };
        let unit = match f {
            Figure::P50 | Figure::P99 => "µs",
            Figure::CpuPerGib => "CPU ms per GiB",
            _ => "ms",
        };
        let _ = writeln!(
            s,
            r##"<text x="{l}" y="{}" font-weight="bold">{} ({unit}) — {} link</text>"##,
            oy + 14.0,
            esc(f.name()),
            esc(&link.name)
        );
        let mut d = d0;
        while d <= d1 + 1e-9 {
            let yy = p.y(10f64.powf(d));
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{yy:.1}" x2="{r}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                l - 4.0,
                yy + 4.0,
                10f64.powf(d)
            );
            d += 1.0;
        }
        let gw = (r - l) / self.workloads.len().max(1) as f64;
        for (wi, wl) in self.workloads.iter().enumerate() {
            self.group(s, &p, &series, fidx, wl, l + gw * wi as f64 + 6.0, gw);
        }
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/><text x="{l}" y="{}" fill="#555" font-size="10">measured {:.2} Gbit/s; bars: medians, whiskers: min-max over the repeats</text>"##,
            b + 28.0,
            link.measured_bps / 1e9
        );
    }

    /// Writes workload `wl`'s group of bars (one per configuration, its median, with a
    /// min-max whisker) of figure `fidx` in `p`, the group at `gx`, `gw` wide.
    #[allow(clippy::too_many_arguments)]
    fn group(
        &self,
        s: &mut String,
        p: &Plot,
        series: &[&Series],
        fidx: usize,
        wl: &str,
        gx: f64,
        gw: f64,
    ) {
        let bw = (gw - 12.0) / self.kinds.len().max(1) as f64;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            gx + (gw - 12.0) / 2.0,
            p.b + 14.0,
            esc(wl)
        );
        for (si, &(peer, mode, tr)) in self.kinds.iter().enumerate() {
            let Some(x) = series.iter().find(|x| {
                x.config.workload == *wl
                    && x.config.peer == peer
                    && x.config.mode == mode
                    && x.config.transport == tr
            }) else {
                continue;
            };
            let Some(sp) = x.figures[fidx] else {
                continue;
            };
            if sp.median <= 0.0 {
                continue;
            }
            let (yy, bx) = (p.y(sp.median), gx + bw * si as f64);
            let _ = writeln!(
                s,
                r##"<rect x="{bx:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {} [{}] {}: {:.1} ({:.1}-{:.1})</title></rect>"##,
                (bw - 1.0).max(1.0),
                (p.b - yy).max(0.5),
                color(x),
                esc(peer),
                esc(mode),
                tr,
                esc(wl),
                sp.median,
                sp.min,
                sp.max
            );
            if sp.n > 1 && sp.min > 0.0 {
                let cx = bx + (bw - 1.0).max(1.0) / 2.0;
                let _ = writeln!(
                    s,
                    r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#333"/>"##,
                    p.y(sp.min),
                    p.y(sp.max)
                );
            }
        }
    }
}

/// One panel per (figure, link): for each workload, a log-scale bar per configuration (its
/// median) with a whisker from min to max.
pub fn svg(c: &Comparison) -> String {
    let figures = [
        Figure::P50,
        Figure::P99,
        Figure::Blocktime,
        Figure::VcpusBlocked,
        Figure::CpuPerGib,
    ];
    let chart = Chart::new(c);
    let (pw, ph) = (chart.pw, chart.ph);
    let cols = c.links.len().max(1);
    let legend_rows = chart.kinds.len().div_ceil(4).max(1);
    let (w, h) = (
        pw * cols as f64 + 20.0,
        ph * figures.len() as f64 + 80.0 + 16.0 * legend_rows as f64 + 40.0,
    );
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let mut top = chart.heading(&mut s);
    chart.legend(&mut s, top);
    top += 16.0 * legend_rows as f64 + 8.0;
    for (fi, &f) in figures.iter().enumerate() {
        for (li, link) in c.links.iter().enumerate() {
            chart.panel(&mut s, f, link, 10.0 + pw * li as f64, top + ph * fi as f64);
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Every run completed with the guest alive, in words.
pub fn alive_line(rows: &[SideRow]) -> (bool, String) {
    let (ok, all) = side::alive(rows);
    (
        ok == all,
        format!("runs completed with the guest alive: {ok} of {all}"),
    )
}
