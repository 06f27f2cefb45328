//! Results across runs: `compare` (key figures, ratios against baselines, one summary line)
//! and the self-contained HTML report (inline SVG charts, no scripts, no network fetches).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub(crate) struct CompareArgs {
    /// fanout | channels | churn | connect (how to read the results).
    #[arg(long)]
    scenario: String,
    /// The label of the server under test (default: the first run).
    #[arg(long)]
    subject: Option<String>,
    /// Write a self-contained HTML report of every run here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Append the comparison as one JSON line to this file.
    #[arg(long)]
    append: Option<PathBuf>,
    /// Leave out the issue's targets (for smoke runs, where ratios mean nothing).
    #[arg(long)]
    no_goals: bool,
    /// Result files of `fanout` or `connect` runs, as LABEL=FILE.
    #[arg(required = true)]
    runs: Vec<String>,
}

/// A ratio target: `subject / baseline` of `metric` compared with `bound`.
struct Goal {
    baseline: &'static str,
    metric: &'static str,
    at_least: bool,
    bound: f64,
}

const FANOUT_GOALS: [Goal; 3] = [
    Goal {
        baseline: "kernel",
        metric: "delivered_per_s",
        at_least: true,
        bound: 0.7,
    },
    Goal {
        baseline: "naive",
        metric: "delivered_per_s",
        at_least: true,
        bound: 5.0,
    },
    Goal {
        baseline: "kernel",
        metric: "ttl_p99_ms",
        at_least: false,
        bound: 1.5,
    },
];

/// The figures of one run that comparisons use.
fn metrics(scenario: &str, v: &Value) -> Value {
    match scenario {
        "connect" => json!({
            "handshakes_per_s": v["rate_per_s"],
            "handshake_p50_ms": v["handshake_ms"]["p50"],
            "handshake_p99_ms": v["handshake_ms"]["p99"],
            "server_cpu_ms_per_1000": v["server"]["cpu_ms_per_1000"],
            "completed": v["completed"],
            "failed": v["failed"],
        }),
        _ => {
            let churn = v["phases"]
                .as_array()
                .and_then(|p| p.iter().rev().find(|p| p["kind"] == "churn"))
                .cloned()
                .unwrap_or(Value::Null);
            json!({
                "connected": v["connect"]["connected"],
                "connect_per_s": v["connect"]["rate_per_s"],
                "handshake_p99_ms": v["connect"]["handshake_ms"]["p99"],
                "sustained_events_per_s": v["max_sustained"]["rate"],
                "first_failing_events_per_s": v["max_sustained"]["first_failing_rate"],
                "delivered_per_s": v["max_sustained"]["delivered_per_s"],
                "e2e_p50_ms": v["max_sustained"]["latency_ms"]["p50"],
                "e2e_p99_ms": v["max_sustained"]["latency_ms"]["p99"],
                "server_cpu_s_per_million": v["max_sustained"]["cpu_s_per_million_delivered"],
                "burst_delivered_per_s": v["burst"]["delivered_per_s"],
                "ttl_p50_ms": v["single"]["time_to_last_subscriber_ms"]["p50"],
                "ttl_p99_ms": v["single"]["time_to_last_subscriber_ms"]["p99"],
                "ttl_max_ms": v["single"]["time_to_last_subscriber_ms"]["max"],
                "churn": if churn.is_null() { Value::Null } else { json!({
                    "expected": churn["expected"],
                    "delivered": churn["delivered"],
                    "missing": churn["missing"],
                    "duplicates": churn["duplicates"],
                    "lost_connections": churn["lost_connections"],
                    "reconnects": churn["closed_by_us"],
                    "latency_ms": churn["latency_ms"],
                })},
                "memory": v["memory"],
                "server_cpu_s_per_million_by_rate": cpu_by_rate(v),
                "checks_failed": v["checks_failed"],
            })
        }
    }
}

/// Server CPU seconds per million delivered messages at each rate the server kept up with: at
/// the same rate, the ratio between two servers is their cost per message, which a busy
/// machine disturbs far less than their ceilings.
fn cpu_by_rate(v: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for p in v["phases"].as_array().into_iter().flatten() {
        if (p["kind"] == "search" || p["kind"] == "rate")
            && p["sustained"] == true
            && let (Some(rate), Some(cpu)) = (
                num(&p["rate"]),
                num(&p["server"]["cpu_s_per_million_delivered"]),
            )
        {
            out.insert(format!("{rate}"), json!(cpu));
        }
    }
    Value::Object(out)
}

/// `subject / baseline` of the CPU cost per message at every rate both kept up with.
fn cpu_ratios(subject: &Value, baseline: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (rate, a) in subject.as_object().into_iter().flatten() {
        if let (Some(a), Some(b)) = (num(a), num(&baseline[rate]))
            && b > 0.0
        {
            out.insert(rate.clone(), json!(a / b));
        }
    }
    Value::Object(out)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// 1234567 -> "1.23M".
pub(crate) fn si(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 || (a >= 1.0 && x.fract() == 0.0) {
        format!("{x:.0}")
    } else if a >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn opt_si(v: &Value) -> String {
    num(v).map_or_else(|| "-".into(), si)
}

fn mib(v: &Value) -> String {
    num(v).map_or_else(
        || "-".into(),
        |b| format!("{:.1} MiB", b / f64::from(1 << 20)),
    )
}

pub(crate) fn compare(args: &CompareArgs) -> anyhow::Result<u8> {
    let scenario = args.scenario.as_str();
    ensure!(
        matches!(scenario, "fanout" | "channels" | "churn" | "connect"),
        "--scenario must be fanout, channels, churn or connect"
    );
    let mut runs: Vec<(String, Value)> = Vec::new();
    for spec in &args.runs {
        let Some((label, path)) = spec.split_once('=') else {
            bail!("{spec}: expected LABEL=FILE");
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let v: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("{path} does not hold one JSON result"))?;
        runs.push((label.to_owned(), v));
    }
    let subject = args.subject.clone().unwrap_or_else(|| runs[0].0.clone());
    let Some(subj) = runs.iter().find(|(l, _)| *l == subject) else {
        bail!("--subject {subject}: no run has that label");
    };
    let subj_m = metrics(scenario, &subj.1);
    let mut per_run = serde_json::Map::new();
    for (label, v) in &runs {
        per_run.insert(label.clone(), metrics(scenario, v));
    }
    // Ratios subject / baseline for every figure both have.
    let mut ratios = serde_json::Map::new();
    for (label, m) in &per_run {
        if *label == subject {
            continue;
        }
        let mut r = serde_json::Map::new();
        for (k, sv) in subj_m.as_object().into_iter().flatten() {
            if let (Some(a), Some(b)) = (num(sv), num(&m[k]))
                && b != 0.0
            {
                r.insert(k.clone(), json!(a / b));
            }
        }
        if scenario != "connect" {
            r.insert(
                "server_cpu_per_message_at_same_rate".into(),
                cpu_ratios(
                    &subj_m["server_cpu_s_per_million_by_rate"],
                    &m["server_cpu_s_per_million_by_rate"],
                ),
            );
        }
        ratios.insert(label.clone(), Value::Object(r));
    }
    let mut goals = Vec::new();
    if scenario == "fanout" && !args.no_goals {
        for g in &FANOUT_GOALS {
            let ratio = ratios.get(g.baseline).and_then(|r| num(&r[g.metric]));
            let met = ratio.map(|r| {
                if g.at_least {
                    r >= g.bound
                } else {
                    r <= g.bound
                }
            });
            goals.push(json!({
                "metric": g.metric, "baseline": g.baseline,
                "target": format!("{} {}", if g.at_least { ">=" } else { "<=" }, g.bound),
                "ratio": ratio, "met": met,
            }));
        }
    }
    let line = summary_line(scenario, &subject, &runs, &per_run, &ratios, &goals);
    println!("{line}");
    let out = json!({
        "scenario": scenario,
        "date_unix": crate::unix_us() / 1_000_000,
        "subject": subject,
        "summary": line,
        "machine": subj.1["machine"],
        "runs": per_run,
        "ratios": ratios,
        "goals": goals,
        "commands": runs.iter().map(|(l, v)| json!([l, v["command"]])).collect::<Vec<_>>(),
    });
    if let Some(path) = &args.append {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{out}")?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, html(&runs, Some(&out)))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed_goal = goals.iter().any(|g| g["met"] == false);
    let failed_checks = runs
        .iter()
        .any(|(_, v)| v["checks_failed"].as_array().is_some_and(|a| !a.is_empty()));
    Ok(u8::from(failed_goal || failed_checks))
}

fn summary_line(
    scenario: &str,
    subject: &str,
    runs: &[(String, Value)],
    per_run: &serde_json::Map<String, Value>,
    ratios: &serde_json::Map<String, Value>,
    goals: &[Value],
) -> String {
    let mut s = String::new();
    let m = &per_run[subject];
    match scenario {
        "connect" => {
            let _ = write!(s, "connect:");
            for (label, _) in runs {
                let r = &per_run[label];
                let _ = write!(
                    s,
                    " {label} {}/s (p99 {} ms);",
                    opt_si(&r["handshakes_per_s"]),
                    opt_si(&r["handshake_p99_ms"])
                );
            }
            for (label, r) in ratios {
                let _ = write!(
                    s,
                    " {subject}/{label} {}x;",
                    num(&r["handshakes_per_s"]).map_or("-".into(), |x| format!("{x:.2}"))
                );
            }
        }
        "churn" => {
            let c = &m["churn"];
            let mem = &m["memory"];
            let before = &mem["server_before_churn"]["rss"];
            let after = &mem["server_after_churn"]["rss"];
            let growth = match (num(before), num(after)) {
                (Some(b), Some(a)) if b > 0.0 => format!("{:+.1}%", (a - b) / b * 100.0),
                _ => "-".into(),
            };
            let _ = write!(
                s,
                "churn: {subject} {} connections, {} reconnects; events owed to live subscribers {}, missing {}, duplicates {}, connections lost {}; latency p99 {} ms; server RSS {} before churn (after a warm-up at the same event rate), {} after ({growth}); {} at start, {} after closing all",
                opt_si(&m["connected"]),
                opt_si(&c["reconnects"]),
                opt_si(&c["expected"]),
                c["missing"],
                c["duplicates"],
                c["lost_connections"],
                opt_si(&c["latency_ms"]["p99"]),
                mib(before),
                mib(after),
                mib(&mem["server_at_start"]["rss"]),
                mib(&mem["server_after_close"]["rss"]),
            );
        }
        _ => {
            let _ = write!(s, "{scenario}:");
            for (label, _) in runs {
                let r = &per_run[label];
                let _ = write!(
                    s,
                    " {label} {} msg/s at {} ev/s (burst {}, last-subscriber p99 {} ms);",
                    opt_si(&r["delivered_per_s"]),
                    opt_si(&r["sustained_events_per_s"]),
                    opt_si(&r["burst_delivered_per_s"]),
                    opt_si(&r["ttl_p99_ms"]),
                );
            }
            for (label, r) in ratios {
                let cpu: Vec<f64> = r["server_cpu_per_message_at_same_rate"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(_, v)| num(v))
                    .collect();
                let cpu = if cpu.is_empty() {
                    String::new()
                } else {
                    let lo = cpu.iter().copied().fold(f64::MAX, f64::min);
                    let hi = cpu.iter().copied().fold(f64::MIN, f64::max);
                    format!(", server CPU per message at the same rates {lo:.2}-{hi:.2}x")
                };
                let _ = write!(
                    s,
                    " {subject}/{label}: delivered {}x, last-subscriber p99 {}x{cpu};",
                    num(&r["delivered_per_s"]).map_or("-".into(), |x| format!("{x:.2}")),
                    num(&r["ttl_p99_ms"]).map_or("-".into(), |x| format!("{x:.2}")),
                );
            }
            for g in goals {
                let met = match g["met"].as_bool() {
                    Some(true) => "met",
                    Some(false) => "NOT met",
                    None => "n/a",
                };
                let _ = write!(
                    s,
                    " [{} vs {} {}: {met}]",
                    g["metric"].as_str().unwrap_or(""),
                    g["baseline"].as_str().unwrap_or(""),
                    g["target"].as_str().unwrap_or(""),
                );
            }
        }
    }
    s.trim_end_matches(';').to_owned()
}

// ---------------------------------------------------------------------------------------------
// HTML

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

fn array_f64(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
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

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Bool(b) => {
            if *b {
                "yes".into()
            } else {
                "no".into()
            }
        }
        Value::Number(n) => n.as_f64().map_or_else(
            || n.to_string(),
            |x| {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.3}")
                }
            },
        ),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
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

/// The HTML report of one or more runs (and their comparison, if any).
pub(crate) fn html(runs: &[(String, Value)], comparison: Option<&Value>) -> String {
    let mut body = String::new();
    let first = runs.first().map(|(_, v)| v.clone()).unwrap_or(Value::Null);
    let machine = &first["machine"];
    let _ = write!(
        body,
        "<p>Machine: {} CPUs ({}), {}, kernel {}. All figures come from the same machine, which is shared: compare ratios within one report, not absolute numbers across reports.</p>",
        cell(&machine["cpus"]),
        cell(&machine["cpu"]),
        cell(&machine["memory"]),
        cell(&machine["kernel"])
    );
    if let Some(c) = comparison {
        let _ = write!(
            body,
            "<h2>Summary</h2><p class=summary>{}</p>",
            esc(c["summary"].as_str().unwrap_or(""))
        );
        if let Some(goals) = c["goals"].as_array().filter(|g| !g.is_empty()) {
            let rows: Vec<Vec<String>> = goals
                .iter()
                .map(|g| {
                    vec![
                        cell(&g["metric"]),
                        cell(&g["baseline"]),
                        cell(&g["target"]),
                        num(&g["ratio"]).map_or("-".into(), |r| format!("{r:.2}x")),
                        match g["met"].as_bool() {
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
        if let Some(ratios) = c["ratios"].as_object() {
            let _ = write!(body, "<h3>Ratios: {} / baseline</h3>", cell(&c["subject"]));
            let keys: Vec<String> = ratios
                .values()
                .flat_map(|r| r.as_object().into_iter().flat_map(|o| o.keys().cloned()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    let mut row = vec![esc(k)];
                    for r in ratios.values() {
                        row.push(num(&r[k]).map_or("-".into(), |x| format!("{x:.2}x")));
                    }
                    row
                })
                .collect();
            let mut head = vec!["figure"];
            head.extend(ratios.keys().map(String::as_str));
            body.push_str(&table(&head, &rows));
        }
    }
    let color = |i: usize| COLORS[i % COLORS.len()];
    let is_connect = first["kind"] == "connect";
    if is_connect {
        let series: Vec<Series> = runs
            .iter()
            .enumerate()
            .map(|(i, (l, v))| Series {
                label: l.clone(),
                color: color(i),
                points: rate_of(
                    &array_f64(&v["timeline"]["t"]),
                    &array_f64(&v["timeline"]["completed"]),
                ),
            })
            .collect();
        body.push_str(&chart(
            "Handshakes per second",
            "seconds",
            "handshakes/s",
            &series,
            XScale::Linear,
            false,
        ));
        let rows: Vec<Vec<String>> = runs
            .iter()
            .map(|(l, v)| {
                vec![
                    esc(l),
                    cell(&v["target"]),
                    cell(&v["completed"]),
                    cell(&v["failed"]),
                    si(v["rate_per_s"].as_f64().unwrap_or(0.0)),
                    cell(&v["handshake_ms"]["p50"]),
                    cell(&v["handshake_ms"]["p99"]),
                    cell(&v["server"]["cpu_ms_per_1000"]),
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
    } else {
        let tl = |v: &Value, k: &str| array_f64(&v["timeline"][k]);
        let mk = |f: &dyn Fn(&Value) -> Vec<(f64, f64)>| -> Vec<Series> {
            runs.iter()
                .enumerate()
                .map(|(i, (l, v))| Series {
                    label: l.clone(),
                    color: color(i),
                    points: f(v),
                })
                .collect()
        };
        body.push_str("<h2>Over time</h2>");
        body.push_str(&chart(
            "Open connections",
            "seconds",
            "connections",
            &mk(&|v| tl(v, "t").into_iter().zip(tl(v, "open")).collect()),
            XScale::Linear,
            false,
        ));
        body.push_str(&chart(
            "Delivery rate (events received by all subscribers)",
            "seconds",
            "messages/s",
            &mk(&|v| rate_of(&tl(v, "t"), &tl(v, "delivered"))),
            XScale::Linear,
            false,
        ));
        if runs
            .iter()
            .any(|(_, v)| tl(v, "server_rss").iter().any(|&x| x > 0.0))
        {
            body.push_str(&chart(
                "Server resident memory",
                "seconds",
                "MiB",
                &mk(&|v| {
                    tl(v, "t")
                        .into_iter()
                        .zip(tl(v, "server_rss"))
                        .filter(|(_, r)| *r > 0.0)
                        .map(|(t, r)| (t, r / f64::from(1 << 20)))
                        .collect()
                }),
                XScale::Linear,
                false,
            ));
            body.push_str(&chart(
                "Server CPU (cores busy)",
                "seconds",
                "cores",
                &mk(&|v| rate_of(&tl(v, "t"), &tl(v, "server_cpu"))),
                XScale::Linear,
                false,
            ));
        }
        body.push_str("<h2>Latency</h2>");
        let phase_curve = |v: &Value, pick: &dyn Fn(&Value) -> bool| -> Vec<(f64, f64)> {
            v["phases"]
                .as_array()
                .and_then(|ps| ps.iter().rev().find(|p| pick(p)))
                .and_then(|p| p["latency_curve"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|pt| (pt[0].as_f64().unwrap_or(0.0), pt[1].as_f64().unwrap_or(0.0)))
                .collect()
        };
        body.push_str(&chart(
            "End-to-end latency at the highest rate kept up with",
            "percentile",
            "ms",
            &mk(&|v| {
                let best = v["max_sustained"]["phase"].clone();
                phase_curve(v, &|p| p["id"] == best)
            }),
            XScale::Percentile,
            true,
        ));
        body.push_str(&chart(
            "End-to-end latency of single events",
            "percentile",
            "ms",
            &mk(&|v| phase_curve(v, &|p| p["kind"] == "single")),
            XScale::Percentile,
            true,
        ));
        body.push_str(&chart(
            "End-to-end latency during churn",
            "percentile",
            "ms",
            &mk(&|v| phase_curve(v, &|p| p["kind"] == "churn")),
            XScale::Percentile,
            true,
        ));
        body.push_str("<h2>Runs</h2>");
        for (label, v) in runs {
            let c = &v["connect"];
            let _ = write!(
                body,
                "<h3>{}</h3><p><code>{}</code></p><p>{} of {} connections opened in {:.1} s ({}/s, {} workers); handshake p50 {} ms, p99 {} ms; herald-bench RSS {} in total.</p>",
                esc(label),
                esc(v["command"].as_str().unwrap_or("")),
                cell(&c["connected"]),
                cell(&c["requested"]),
                c["duration_s"].as_f64().unwrap_or(0.0),
                si(c["rate_per_s"].as_f64().unwrap_or(0.0)),
                cell(&v["workers"]),
                cell(&c["handshake_ms"]["p50"]),
                cell(&c["handshake_ms"]["p99"]),
                mib(&v["bench"]["rss_total"]),
            );
            if let Some(failures) = c["failures"].as_object().filter(|f| !f.is_empty()) {
                let _ = write!(
                    body,
                    "<p class=bad>Connection failures: {}</p>",
                    esc(&Value::Object(failures.clone()).to_string())
                );
            }
            let rows: Vec<Vec<String>> = v["phases"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    vec![
                        cell(&p["id"]),
                        cell(&p["kind"]),
                        cell(&p["label"]),
                        format!(
                            "{} ({}/s)",
                            cell(&p["published"]),
                            si(p["achieved_rate"].as_f64().unwrap_or(0.0))
                        ),
                        format!("{} / {}", cell(&p["delivered"]), cell(&p["expected"])),
                        cell(&p["missing"]),
                        cell(&p["duplicates"]),
                        cell(&p["lost_connections"]),
                        si(p["delivered_per_s"].as_f64().unwrap_or(0.0)),
                        cell(&p["drain_s"]),
                        format!(
                            "{} / {} / {}",
                            cell(&p["latency_ms"]["p50"]),
                            cell(&p["latency_ms"]["p99"]),
                            cell(&p["latency_ms"]["max"])
                        ),
                        cell(&p["time_to_last_subscriber_ms"]["p99"]),
                        cell(&p["server"]["cpu_s"]),
                        if p["kind"] == "search" || p["kind"] == "rate" {
                            if p["sustained"] == true {
                                "kept up".into()
                            } else {
                                "<span class=bad>no</span>".into()
                            }
                        } else if p["clean"] == true {
                            "clean".into()
                        } else {
                            "<span class=bad>LOSS</span>".into()
                        },
                    ]
                })
                .collect();
            body.push_str(&table(
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
            ));
            if let Some(mem) = v["memory"].as_object() {
                let rows: Vec<Vec<String>> = mem
                    .iter()
                    .map(|(k, s)| vec![esc(k), mib(&s["rss"]), cell(&s["cpu_s"])])
                    .collect();
                body.push_str(&table(&["server at", "RSS", "CPU s"], &rows));
            }
        }
    }
    let title = comparison.and_then(|c| c["scenario"].as_str()).map_or_else(
        || {
            format!(
                "herald-bench: {}",
                runs.iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        |s| format!("herald-bench: {s}"),
    );
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>{t}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}figure{{margin:1em 0}}
.ok{{color:#1a7f37}}.bad{{color:#c62828}}.summary{{font-family:monospace;background:#f6f8fa;padding:.6em}}
code{{font-size:12px;word-break:break-all}}</style></head><body><h1>{t}</h1>{body}</body></html>"#,
        t = esc(&title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let page = html(&[("x".into(), json!({}))], None);
        assert!(page.contains("<svg"));
        assert!(!page.contains("http://") || page.contains("http://www.w3.org/2000/svg"));
    }
}
