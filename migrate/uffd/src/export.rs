//! The comparison as an SVG: the work the guest did in the window after restore per case,
//! one bar per policy (the median over the repetitions, with a whisker from the smallest to
//! the largest).

use super::compare::{Comparison, Summary};
use super::policy::Policy;
use pagehint_migrate::svg::{Anchor, Box2, Canvas, Style};

/// Each policy's colour (exhaustive: a new policy must be given one).
fn colour(p: Policy) -> &'static str {
    match p {
        Policy::OnDemand => "#d62728",
        Policy::Linear => "#ff7f0e",
        Policy::PagehintNoHint => "#9467bd",
        Policy::Pagehint => "#1f77b4",
        Policy::Record => "#8c564b",
        Policy::Recorded => "#7f7f7f",
        Policy::RecordedPagehint => "#2ca02c",
    }
}
/// Width of one workload's group of bars.
const GROUP_W: f64 = 160.0;
/// Height of the plot.
const PLOT_H: f64 = 260.0;

/// A grouped bar chart (scaled to the largest whisker).
pub fn svg(c: &Comparison) -> String {
    picture(c).finish()
}

/// The picture [`svg`] writes, for tests to measure.
pub fn picture(c: &Comparison) -> Canvas {
    let workloads: Vec<&str> = c.ratios.iter().map(|r| r.case.as_str()).collect();
    let mut policies: Vec<Policy> = Vec::new();
    for r in &c.summaries {
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    let mut canvas = Canvas::new();
    let (left, plot_w) = (60.0, GROUP_W * workloads.len().max(1) as f64 + 20.0);
    let title = format!(
        "Work done in the first {:.0} ms after snapshot restore (guest operations, all vCPUs; median of {} with min-max; {} MiB, {} vCPUs, {} KiB pages)",
        c.window_ms,
        c.repeat,
        c.mem >> 20,
        c.vcpus,
        c.host_page >> 10
    );
    // The title over the plot and its legend, wrapped to their width.
    let legend_w = 170.0;
    let top = canvas.text_wrapped(left, 20.0, plot_w + legend_w, Style::new(12.0), &title) + 10.0;
    let plot = Box2 {
        x0: left,
        y0: top,
        x1: left + plot_w,
        y1: top + PLOT_H,
    };
    let max = c
        .summaries
        .iter()
        .map(|r| r.work.max)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    canvas.line((plot.x0, plot.y1), (plot.x1, plot.y1), "black");
    let small = Style::new(10.0).anchor(Anchor::End).color("#555");
    canvas.text(plot.x0 - 4.0, plot.y1, small, "0");
    canvas.text(plot.x0 - 4.0, plot.y0 + 8.0, small, &format!("{max:.0}"));
    let bar = 120.0 / policies.len().max(1) as f64;
    for (i, wl) in workloads.iter().enumerate() {
        let x0 = plot.x0 + 10.0 + i as f64 * GROUP_W;
        for (j, p) in policies.iter().enumerate() {
            let found = c.summaries.iter().find(|r| r.case == *wl && r.policy == *p);
            if let Some(r) = found {
                let x = x0 + j as f64 * bar;
                whisker_bar(&mut canvas, plot, x, bar - 2.0, max, r, colour(*p));
            }
        }
        let mid = Style::new(12.0).anchor(Anchor::Middle);
        canvas.text(x0 + 60.0, plot.y1 + 20.0, mid, wl);
    }
    let entries: Vec<(&'static str, String)> = policies
        .iter()
        .map(|p| (colour(*p), p.name().to_string()))
        .collect();
    canvas.legend(
        plot.x1 + 10.0,
        plot.y0 + 11.0,
        legend_w - 10.0,
        12.0,
        &entries,
    );
    canvas
}

/// One policy's bar at `x`, `w` wide: its median, and a whisker from its smallest to its
/// largest restore.
fn whisker_bar(c: &mut Canvas, plot: Box2, x: f64, w: f64, max: f64, r: &Summary, fill: &str) {
    let h = plot.y1 - plot.y0;
    let y = |v: f64| plot.y1 - h * v / max;
    let b = r.work;
    let xm = x + w / 2.0;
    c.line((xm, y(b.min)), (xm, y(b.max)), "black");
    let title = format!("{} {}: {:.0} operations", r.case, r.policy, b.median);
    let bar = Box2 {
        x0: x,
        y0: y(b.median),
        x1: x + w,
        y1: plot.y1,
    };
    c.rect(bar, fill, "none", Some(&title));
}

#[cfg(test)]
mod tests {
    use super::super::compare::{comparison_of, Row};
    use super::*;
    use pagehint_migrate::options::Workload;

    #[test]
    fn the_picture_fits_its_text_with_one_workload_or_all() {
        let row = |w: Workload, policy: Policy, repetition: usize| Row {
            case: w.to_string(),
            workload: w.to_string(),
            policy,
            repetition,
            window_ms: 500.0,
            work: 1000 * (repetition as u64 + 1),
            work_adjusted: 1050.0,
            vcpu_run_ms: 900.0,
            vcpu_queue_ms: 50.0,
            first_op_ms: Some(3.0),
            faults_window: 1234,
            faults_after: 50000,
            blocktime_window_ms: 400.0,
            blocktime_window_bound_ms: 410.0,
            all_blocked_window_ms: 100.0,
            blocktime_after_ms: 2000.0,
            faults_bounded_by_sleep: 3,
            completion_ms: 500.0,
            all_loaded_ms: Some(450.0),
            guest_errors: 0,
            eexist: 0,
            placed_once: true,
            fault_placed: 1000,
            prefetched: 5000,
            record_pages: 0,
            record_placed: 0,
            prefetch_cpu_ms: 12.0,
            prefetch_wait_ms: 1.0,
        };
        for workloads in [&[Workload::Kv][..], Workload::ALL] {
            let mut rows = Vec::new();
            for &w in workloads {
                for p in Policy::ALL {
                    rows.extend((0..3).map(|k| row(w, p, k)));
                }
            }
            let c = comparison_of(rows, 256 << 20, 2, 4096, 1, 3);
            let pic = picture(&c);
            if let Some(p) = std::env::var_os("PAGEHINT_SVG_OUT") {
                std::fs::write(p, pic.finish()).unwrap();
            }
            assert!(pic.problems().is_empty(), "{:#?}", pic.problems());
            assert!(pic.finish().contains("recorded+pagehint"));
        }
    }
}
