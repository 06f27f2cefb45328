//! The self-contained HTML report: machine, comparison (summary, goals, ratios), charts over
//! time and of latency (inline SVG), and per-run tables.
//!
//! Owns the page's layout and the SVG chart primitive. Must not compute figures beyond what a
//! chart plots (rates from cumulative counters): everything else comes from the results.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::compare::{CPU_AT_SAME_RATE, Comparison};
use super::{Run, mib, si};
use crate::messages::{ConnectSummary, FanoutSummary, Machine, PhaseResult};

/// A value in a table cell, formatted the same way everywhere.
trait Cell {
    fn cell(&self) -> String;
}

impl Cell for f64 {
    fn cell(&self) -> String {
        if !self.is_finite() {
            "-".into()
        } else if self.fract() == 0.0 && self.abs() < 1e15 {
            format!("{self:.0}")
        } else {
            format!("{self:.3}")
        }
    }
}

impl Cell for u64 {
    fn cell(&self) -> String {
        self.to_string()
    }
}

impl Cell for u32 {
    fn cell(&self) -> String {
        self.to_string()
    }
}

impl Cell for usize {
    fn cell(&self) -> String {
        self.to_string()
    }
}

impl Cell for bool {
    fn cell(&self) -> String {
        if *self { "yes".into() } else { "no".into() }
    }
}

impl Cell for str {
    fn cell(&self) -> String {
        esc(self)
    }
}

impl Cell for String {
    fn cell(&self) -> String {
        esc(self)
    }
}

impl<T: Cell> Cell for Option<T> {
    fn cell(&self) -> String {
        self.as_ref().map_or_else(|| "-".into(), Cell::cell)
    }
}

/// The HTML report of one or more runs (and their comparison, if any).
pub(crate) fn html(runs: &[(String, Run)], comparison: Option<&Comparison>) -> String {
    let mut body = String::new();
    let machine = runs
        .first()
        .map(|(_, r)| r.machine().clone())
        .unwrap_or_default();
    machine_note(&mut body, &machine);
    if let Some(c) = comparison {
        comparison_section(&mut body, c);
    }
    let connects: Vec<(&str, &ConnectSummary)> = runs
        .iter()
        .filter_map(|(l, r)| match r {
            Run::Connect(c) => Some((l.as_str(), &**c)),
            Run::Fanout(_) => None,
        })
        .collect();
    let fanouts: Vec<(&str, &FanoutSummary)> = runs
        .iter()
        .filter_map(|(l, r)| match r {
            Run::Fanout(f) => Some((l.as_str(), &**f)),
            Run::Connect(_) => None,
        })
        .collect();
    if matches!(runs.first(), Some((_, Run::Connect(_)))) {
        connect_section(&mut body, &connects);
    } else {
        over_time_section(&mut body, &fanouts);
        latency_section(&mut body, &fanouts);
        runs_section(&mut body, &fanouts);
    }
    let title = comparison.map_or_else(
        || {
            format!(
                "herald-bench: {}",
                runs.iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        |c| format!("herald-bench: {}", c.scenario),
    );
    page(&title, &body)
}

fn machine_note(body: &mut String, m: &Machine) {
    let _ = write!(
        body,
        "<p>Machine: {} CPUs ({}), {}, kernel {}. All figures come from the same machine, which is shared: compare ratios within one report, not absolute numbers across reports.</p>",
        m.cpus.cell(),
        m.cpu.cell(),
        m.memory.cell(),
        m.kernel.cell()
    );
}

fn comparison_section(body: &mut String, c: &Comparison) {
    let _ = write!(
        body,
        "<h2>Summary</h2><p class=summary>{}</p>",
        esc(&c.summary)
    );
    if !c.goals.is_empty() {
        let rows: Vec<Vec<String>> = c
            .goals
            .iter()
            .map(|g| {
                vec![
                    g.metric.cell(),
                    g.baseline.cell(),
                    g.target.cell(),
                    ratio_cell(g.ratio),
                    match g.met {
                        Some(true) => "<b class=ok>met</b>".into(),
                        Some(false) => "<b class=bad>not met</b>".into(),
                        None => "n/a".into(),
                    },
                ]
            })
            .collect();
        body.push_str(&table(
            &["figure", "baseline", "target", "ratio", "verdict"],
            &rows,
        ));
    }
    let _ = write!(body, "<h3>Ratios: {} / baseline</h3>", c.subject.cell());
    let mut keys: BTreeSet<&str> = c
        .ratios
        .values()
        .flat_map(|r| r.figures.keys().map(String::as_str))
        .collect();
    if c.ratios.values().any(|r| r.cpu_at_same_rate.is_some()) {
        // A map of ratios, not one ratio: listed, with no value of its own.
        keys.insert(CPU_AT_SAME_RATE);
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let mut row = vec![esc(k)];
            for r in c.ratios.values() {
                row.push(ratio_cell(r.figures.get(*k).copied()));
            }
            row
        })
        .collect();
    let mut head = vec!["figure"];
    head.extend(c.ratios.keys().map(String::as_str));
    body.push_str(&table(&head, &rows));
}

fn ratio_cell(r: Option<f64>) -> String {
    r.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.2}x"))
}

fn color(i: usize) -> &'static str {
    COLORS[i % COLORS.len()]
}

/// One series per run.
fn series<T>(runs: &[(&str, &T)], points: impl Fn(&T) -> Vec<(f64, f64)>) -> Vec<Series> {
    runs.iter()
        .enumerate()
        .map(|(i, (label, run))| Series {
            label: (*label).to_owned(),
            color: color(i),
            points: points(run),
        })
        .collect()
}

fn as_f64(v: &[u64]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn connect_section(body: &mut String, runs: &[(&str, &ConnectSummary)]) {
    body.push_str(&chart(
        "Handshakes per second",
        "seconds",
        "handshakes/s",
        &series(runs, |c| {
            rate_of(&c.timeline.t, &as_f64(&c.timeline.completed))
        }),
        XScale::Linear,
        false,
    ));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|(l, c)| {
            vec![
                esc(l),
                c.target.cell(),
                c.completed.cell(),
                c.failed.cell(),
                si(c.rate_per_s),
                c.handshake_ms.p50.cell(),
                c.handshake_ms.p99.cell(),
                c.server.cpu_ms_per_1000.cell(),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "run",
            "target",
            "handshakes",
            "failed",
            "per second",
            "p50 ms",
            "p99 ms",
            "server CPU ms per 1000",
        ],
        &rows,
    ));
}

fn over_time_section(body: &mut String, runs: &[(&str, &FanoutSummary)]) {
    body.push_str("<h2>Over time</h2>");
    body.push_str(&chart(
        "Open connections",
        "seconds",
        "connections",
        &series(runs, |f| {
            let tl = &f.timeline;
            tl.t.iter().copied().zip(as_f64(&tl.open)).collect()
        }),
        XScale::Linear,
        false,
    ));
    body.push_str(&chart(
        "Delivery rate (events received by all subscribers)",
        "seconds",
        "messages/s",
        &series(runs, |f| {
            rate_of(&f.timeline.t, &as_f64(&f.timeline.delivered))
        }),
        XScale::Linear,
        false,
    ));
    if !runs
        .iter()
        .any(|(_, f)| f.timeline.server_rss.iter().any(|&x| x > 0))
    {
        return;
    }
    body.push_str(&chart(
        "Server resident memory",
        "seconds",
        "MiB",
        &series(runs, |f| {
            let tl = &f.timeline;
            tl.t.iter()
                .copied()
                .zip(tl.server_rss.iter().copied())
                .filter(|(_, r)| *r > 0)
                .map(|(t, r)| (t, r as f64 / f64::from(1 << 20)))
                .collect()
        }),
        XScale::Linear,
        false,
    ));
    body.push_str(&chart(
        "Server CPU (cores busy)",
        "seconds",
        "cores",
        &series(runs, |f| rate_of(&f.timeline.t, &f.timeline.server_cpu)),
        XScale::Linear,
        false,
    ));
}

/// The latency curve of the last phase `pick` accepts.
fn phase_curve(f: &FanoutSummary, pick: impl Fn(&PhaseResult) -> bool) -> Vec<(f64, f64)> {
    f.phases
        .iter()
        .rev()
        .find(|p| pick(p))
        .map(|p| p.latency_curve.clone())
        .unwrap_or_default()
}

fn latency_section(body: &mut String, runs: &[(&str, &FanoutSummary)]) {
    body.push_str("<h2>Latency</h2>");
    body.push_str(&chart(
        "End-to-end latency at the highest rate kept up with",
        "percentile",
        "ms",
        &series(runs, |f| {
            let best = f.max_sustained.as_ref().and_then(|m| m.phase);
            phase_curve(f, |p| Some(p.id) == best)
        }),
        XScale::Percentile,
        true,
    ));
    body.push_str(&chart(
        "End-to-end latency of single events",
        "percentile",
        "ms",
        &series(runs, |f| phase_curve(f, |p| p.kind == "single")),
        XScale::Percentile,
        true,
    ));
    body.push_str(&chart(
        "End-to-end latency during churn",
        "percentile",
        "ms",
        &series(runs, |f| phase_curve(f, |p| p.kind == "churn")),
        XScale::Percentile,
        true,
    ));
}

fn runs_section(body: &mut String, runs: &[(&str, &FanoutSummary)]) {
    body.push_str("<h2>Runs</h2>");
    for (label, f) in runs {
        run_heading(body, label, f);
        body.push_str(&phase_table(&f.phases));
        let rows: Vec<Vec<String>> = f
            .memory
            .iter()
            .map(|(k, s)| {
                vec![
                    esc(k),
                    mib(s.map(|s| s.rss as f64)),
                    s.map(|s| s.cpu).cell(),
                ]
            })
            .collect();
        body.push_str(&table(&["server at", "RSS", "CPU s"], &rows));
    }
}

fn run_heading(body: &mut String, label: &str, f: &FanoutSummary) {
    let c = &f.connect;
    let _ = write!(
        body,
        "<h3>{}</h3><p><code>{}</code></p><p>{} of {} connections opened in {:.1} s ({}/s, {} workers); handshake p50 {} ms, p99 {} ms; herald-bench RSS {} in total.</p>",
        esc(label),
        esc(&f.command),
        c.connected.cell(),
        c.requested.cell(),
        c.duration_s,
        si(c.rate_per_s),
        f.workers.cell(),
        c.handshake_ms.p50.cell(),
        c.handshake_ms.p99.cell(),
        mib(Some(f.bench.rss_total as f64)),
    );
    if !c.failures.is_empty() {
        let failures = serde_json::to_string(&c.failures).unwrap_or_default();
        let _ = write!(
            body,
            "<p class=bad>Connection failures: {}</p>",
            esc(&failures)
        );
    }
}

fn phase_table(phases: &[PhaseResult]) -> String {
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|p| {
            vec![
                p.id.cell(),
                p.kind.cell(),
                p.label.cell(),
                format!("{} ({}/s)", p.published.cell(), si(p.achieved_rate)),
                format!("{} / {}", p.delivered.cell(), p.expected.cell()),
                p.missing.cell(),
                p.duplicates.cell(),
                p.lost_connections.cell(),
                si(p.delivered_per_s),
                p.drain_s.cell(),
                format!(
                    "{} / {} / {}",
                    p.latency_ms.p50.cell(),
                    p.latency_ms.p99.cell(),
                    p.latency_ms.max.cell()
                ),
                p.time_to_last_subscriber_ms.p99.cell(),
                p.server.cpu_s.cell(),
                if p.is_rate() {
                    if p.sustained {
                        "kept up".into()
                    } else {
                        "<span class=bad>no</span>".into()
                    }
                } else if p.clean {
                    "clean".into()
                } else {
                    "<span class=bad>LOSS</span>".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "#",
            "kind",
            "load",
            "published",
            "delivered / expected",
            "missing",
            "dup",
            "conns lost",
            "msg/s",
            "drain s",
            "latency p50/p99/max ms",
            "last subscriber p99 ms",
            "server CPU s",
            "verdict",
        ],
        &rows,
    )
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>{t}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}figure{{margin:1em 0}}
.ok{{color:#1a7f37}}.bad{{color:#c62828}}.summary{{font-family:monospace;background:#f6f8fa;padding:.6em}}
code{{font-size:12px;word-break:break-all}}</style></head><body><h1>{t}</h1>{body}</body></html>"#,
        t = esc(title)
    )
}

// ---------------------------------------------------------------------------------------------
// SVG and tables

const COLORS: [&str; 8] = [
    "#1f6fb4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Series {
    label: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy, PartialEq)]
enum XScale {
    Linear,
    /// Percentiles, spread as -log10(1 - p): 0, 90, 99, 99.9, ...
    Percentile,
}

fn x_pos(scale: XScale, x: f64) -> f64 {
    match scale {
        XScale::Linear => x,
        XScale::Percentile => (-(1.0 - (x / 100.0).min(0.999_999)).log10()).min(6.0),
    }
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| (hi - lo) / s <= 6.0)
        .unwrap_or(mag * 10.0);
    let mut out = Vec::new();
    let mut v = (lo / step).ceil() * step;
    while v <= hi + step * 1e-9 {
        out.push(v);
        v += step;
    }
    out
}

/// An SVG line chart.
fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    scale: XScale,
    log_y: bool,
) -> String {
    const W: f64 = 760.0;
    const H: f64 = 300.0;
    const L: f64 = 70.0;
    const R: f64 = 20.0;
    const T: f64 = 30.0;
    const B: f64 = 45.0;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
        .collect();
    let mut svg = format!(
        r#"<figure><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"><title>{}</title>"#,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<text x="{}" y="18" text-anchor="middle" font-weight="bold">{}</text>"##,
        W / 2.0,
        esc(title)
    );
    if pts.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg></figure>"#,
            W / 2.0,
            H / 2.0
        );
        return svg;
    }
    let fy = |y: f64| if log_y { y.log10() } else { y };
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x_pos(scale, x));
        x1 = x1.max(x_pos(scale, x));
        y0 = y0.min(fy(y));
        y1 = y1.max(fy(y));
    }
    if !log_y {
        y0 = y0.min(0.0);
    } else {
        y0 = y0.floor();
        y1 = y1.ceil().max(y0 + 1.0);
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if log_y { y1 } else { y1 * 1.05 };
    let px = |x: f64| L + (x_pos(scale, x) - x0) / (x1 - x0) * (W - L - R);
    let py = |y: f64| H - B - (fy(y) - y0) / (y1 - y0) * (H - T - B);
    // Axes and grid.
    let _ = write!(
        svg,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        W - L - R,
        H - T - B
    );
    let yticks: Vec<f64> = if log_y {
        (y0 as i32..=y1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        ticks(y0, y1)
    };
    for v in yticks {
        let y = py(v);
        let _ = write!(
            svg,
            r##"<line x1="{L}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            W - R,
            L - 5.0,
            y + 4.0,
            si(v)
        );
    }
    let xticks: Vec<(f64, String)> = match scale {
        XScale::Linear => ticks(x0, x1).into_iter().map(|v| (v, si(v))).collect(),
        XScale::Percentile => [0.0, 90.0, 99.0, 99.9, 99.99, 99.999]
            .iter()
            .filter(|&&p| x_pos(scale, p) <= x1 + 1e-9)
            .map(|&p| (p, format!("{p}")))
            .collect(),
    };
    for (v, text) in xticks {
        let x = px(v);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{T}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="11">{}</text>"##,
            H - B,
            H - B + 15.0,
            esc(&text)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="12">{}</text><text x="14" y="{}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {})">{}</text>"#,
        (L + W - R) / 2.0,
        H - 8.0,
        esc(x_label),
        (T + H - B) / 2.0,
        (T + H - B) / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/>"#,
                s.color,
                path.join(" ")
            );
        }
        let ly = T + 14.0 + i as f64 * 15.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
            L + 10.0,
            ly - 9.0,
            s.color,
            L + 24.0,
            ly,
            esc(&s.label)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Rate per second from a cumulative counter, over a sliding window of about a second (the
/// counters are reported every 200 ms and sampled every 250 ms; shorter windows alias).
fn rate_of(t: &[f64], counter: &[f64]) -> Vec<(f64, f64)> {
    const WINDOW: f64 = 1.0;
    let n = t.len().min(counter.len());
    let mut out = Vec::new();
    let mut j = 0;
    for i in 1..n {
        while j + 1 < i && t[i] - t[j + 1] >= WINDOW {
            j += 1;
        }
        let dt = t[i] - t[j];
        if dt >= 0.5 * WINDOW {
            out.push((t[i], ((counter[i] - counter[j]) / dt).max(0.0)));
        }
    }
    out
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::si;

    #[test]
    fn nice_ticks_and_numbers() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(0.5), "0.500");
        assert_eq!(si(0.0), "0");
        assert_eq!(si(10.0), "10");
        let t: Vec<f64> = (0..9).map(|i| f64::from(i) * 0.25).collect();
        let c: Vec<f64> = (0..9).map(|i| f64::from(i) * 100.0).collect();
        let r = rate_of(&t, &c);
        assert!(r.iter().all(|&(_, v)| (v - 400.0).abs() < 1e-6), "{r:?}");
    }

    #[test]
    fn renders_without_data() {
        let page = html(&[("x".into(), Run::Fanout(Box::default()))], None);
        assert!(page.contains("<svg"));
        assert!(!page.contains("http://") || page.contains("http://www.w3.org/2000/svg"));
    }
}
