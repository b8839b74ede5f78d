//! The comparison as an SVG: total vCPU blocktime per workload, one bar per policy (the
//! median over the repetitions, with a whisker from the smallest to the largest).

use super::compare::Comparison;

const COLOURS: [&str; 4] = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"];

/// A grouped bar chart (log-free, scaled to the largest bar).
pub fn svg(c: &Comparison) -> String {
    let workloads: Vec<&str> = c.ratios.iter().map(|r| r.workload.as_str()).collect();
    let mut policies = Vec::new();
    for r in &c.summaries {
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    let max = c
        .summaries
        .iter()
        .map(|r| r.blocktime_total_ms.max)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (w, h, left, top, bottom) = (
        160.0 * workloads.len() as f64 + 200.0,
        360.0,
        60.0,
        40.0,
        60.0,
    );
    let plot = h - top - bottom;
    let bar = 120.0 / policies.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"20\">vCPU blocktime after snapshot restore (ms, sum over vCPUs, median of {} with min-max; {} MiB, {} vCPUs, {} KiB pages)</text>\n",
        c.repeat,
        c.mem >> 20,
        c.vcpus,
        c.host_page >> 10
    );
    s += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + plot,
        w - 180.0,
        top + plot
    );
    for (i, wl) in workloads.iter().enumerate() {
        let x0 = left + 10.0 + i as f64 * 160.0;
        for (j, p) in policies.iter().enumerate() {
            let Some(r) = c
                .summaries
                .iter()
                .find(|r| r.workload == *wl && r.policy == *p)
            else {
                continue;
            };
            let b = r.blocktime_total_ms;
            let bh = plot * b.median / max;
            let x = x0 + j as f64 * bar;
            let (y_lo, y_hi) = (
                top + plot - plot * b.min / max,
                top + plot - plot * b.max / max,
            );
            s += &format!(
                "<line x1=\"{xm:.1}\" y1=\"{y_lo:.1}\" x2=\"{xm:.1}\" y2=\"{y_hi:.1}\" stroke=\"black\"/>\n",
                xm = x + (bar - 2.0) / 2.0
            );
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{wl} {p}: {:.2} ms</title></rect>\n",
                top + plot - bh,
                bar - 2.0,
                COLOURS[j % COLOURS.len()],
                b.median
            );
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{wl}</text>\n",
            x0 + 40.0,
            top + plot + 20.0
        );
    }
    for (j, p) in policies.iter().enumerate() {
        let y = top + 20.0 * j as f64;
        s += &format!(
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{p}</text>\n",
            w - 170.0,
            COLOURS[j % COLOURS.len()],
            w - 152.0,
            y + 11.0
        );
    }
    s += "</svg>\n";
    s
}
