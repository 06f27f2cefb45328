//! `herald-bench compare`: the key figures of each run of one scenario, the ratios of the
//! subject (herald) to every baseline, the targets, one summary line, and the
//! comparison as one JSON line.
//!
//! Owns which figures are compared and how the summary line reads. Must not render HTML: it
//! hands its [`Comparison`] to the writer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{CompareArgs, Run, finite, mib, opt_si};
use crate::messages::{
    ConnectSummary, FanoutSummary, Machine, Percentiles, PhaseResult, ServerSample,
};
use crate::system::unix_us;

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

/// The ratio of the CPU cost per message at equal rates, kept apart from the plain figures.
pub(crate) const CPU_AT_SAME_RATE: &str = "server_cpu_per_message_at_same_rate";

/// The figures of one run that comparisons use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Metrics {
    Connect(ConnectMetrics),
    Fanout(Box<FanoutMetrics>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConnectMetrics {
    pub handshakes_per_s: f64,
    pub handshake_p50_ms: Option<f64>,
    pub handshake_p99_ms: Option<f64>,
    pub server_cpu_ms_per_1000: Option<f64>,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FanoutMetrics {
    pub connected: u64,
    pub connect_per_s: f64,
    pub handshake_p99_ms: Option<f64>,
    pub sustained_events_per_s: Option<f64>,
    pub first_failing_events_per_s: Option<f64>,
    pub delivered_per_s: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    pub server_cpu_s_per_million: Option<f64>,
    pub burst_delivered_per_s: Option<f64>,
    pub ttl_p50_ms: Option<f64>,
    pub ttl_p99_ms: Option<f64>,
    pub ttl_max_ms: Option<f64>,
    pub churn: Option<ChurnMetrics>,
    pub memory: BTreeMap<String, Option<ServerSample>>,
    /// Server CPU seconds per million delivered messages at each rate the server kept up with:
    /// at the same rate, the ratio between two servers is their cost per message, which a busy
    /// machine disturbs far less than their ceilings.
    pub server_cpu_s_per_million_by_rate: BTreeMap<String, f64>,
    pub checks_failed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChurnMetrics {
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub lost_connections: u64,
    pub reconnects: u64,
    pub latency_ms: Percentiles,
}

/// One goal's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GoalResult {
    pub metric: String,
    pub baseline: String,
    pub target: String,
    pub ratio: Option<f64>,
    pub met: Option<bool>,
}

/// `subject / baseline` for every figure both runs have, and the CPU cost per message at
/// every rate both kept up with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Ratios {
    #[serde(flatten)]
    pub figures: BTreeMap<String, f64>,
    #[serde(
        rename = "server_cpu_per_message_at_same_rate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_at_same_rate: Option<BTreeMap<String, f64>>,
}

/// What `compare` appends to its `--append` file, and what the HTML report summarizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Comparison {
    pub scenario: String,
    pub date_unix: u64,
    pub subject: String,
    pub summary: String,
    pub machine: Machine,
    pub runs: BTreeMap<String, Metrics>,
    pub ratios: BTreeMap<String, Ratios>,
    pub goals: Vec<GoalResult>,
    /// `[label, command]` per run.
    pub commands: Vec<(String, String)>,
}

fn metrics(run: &Run) -> Metrics {
    match run {
        Run::Connect(c) => Metrics::Connect(connect_metrics(c)),
        Run::Fanout(f) => Metrics::Fanout(Box::new(fanout_metrics(f))),
    }
}

fn connect_metrics(c: &ConnectSummary) -> ConnectMetrics {
    ConnectMetrics {
        handshakes_per_s: c.rate_per_s,
        handshake_p50_ms: c.handshake_ms.p50,
        handshake_p99_ms: c.handshake_ms.p99,
        server_cpu_ms_per_1000: c.server.cpu_ms_per_1000,
        completed: c.completed,
        failed: c.failed,
    }
}

fn fanout_metrics(f: &FanoutSummary) -> FanoutMetrics {
    let best = f.max_sustained.as_ref();
    let ttl = f.single.as_ref().map(|s| &s.time_to_last_subscriber_ms);
    let churn = f.phases.iter().rev().find(|p| p.kind == "churn");
    FanoutMetrics {
        connected: f.connect.connected,
        connect_per_s: f.connect.rate_per_s,
        handshake_p99_ms: f.connect.handshake_ms.p99,
        sustained_events_per_s: best.and_then(|b| b.rate),
        first_failing_events_per_s: best.and_then(|b| b.first_failing_rate),
        delivered_per_s: best.and_then(|b| b.delivered_per_s),
        e2e_p50_ms: best.and_then(|b| b.latency_ms.as_ref()?.p50),
        e2e_p99_ms: best.and_then(|b| b.latency_ms.as_ref()?.p99),
        server_cpu_s_per_million: best.and_then(|b| b.cpu_s_per_million_delivered),
        burst_delivered_per_s: f.burst.as_ref().map(|b| b.delivered_per_s),
        ttl_p50_ms: ttl.and_then(|t| t.p50),
        ttl_p99_ms: ttl.and_then(|t| t.p99),
        ttl_max_ms: ttl.and_then(|t| t.max),
        churn: churn.map(|c| ChurnMetrics {
            expected: c.expected,
            delivered: c.delivered,
            missing: c.missing,
            duplicates: c.duplicates,
            lost_connections: c.lost_connections,
            reconnects: c.closed_by_us,
            latency_ms: c.latency_ms.clone(),
        }),
        memory: f.memory.clone(),
        server_cpu_s_per_million_by_rate: cpu_by_rate(&f.phases),
        checks_failed: f.checks_failed.clone(),
    }
}

/// Server CPU seconds per million delivered messages at each rate kept up with.
fn cpu_by_rate(phases: &[PhaseResult]) -> BTreeMap<String, f64> {
    phases
        .iter()
        .filter(|p| p.is_rate() && p.sustained)
        .filter_map(|p| {
            let rate = finite(p.rate)?;
            let cpu = finite(p.server.cpu_s_per_million_delivered)?;
            Some((format!("{rate}"), cpu))
        })
        .collect()
}

/// `subject / baseline` of the CPU cost per message at every rate both kept up with.
fn cpu_ratios(
    subject: &BTreeMap<String, f64>,
    baseline: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    subject
        .iter()
        .filter_map(|(rate, &a)| {
            let b = *baseline.get(rate)?;
            (a.is_finite() && b.is_finite() && b > 0.0).then(|| (rate.clone(), a / b))
        })
        .collect()
}

/// Every finite number among a run's figures (nested ones, like `churn`, are not compared).
fn numbers(m: &Metrics) -> BTreeMap<String, f64> {
    let Ok(Value::Object(fields)) = serde_json::to_value(m) else {
        return BTreeMap::new();
    };
    fields
        .into_iter()
        .filter_map(|(k, v)| Some((k, finite(v.as_f64())?)))
        .collect()
}

fn ratios_of(subject: &Metrics, baseline: &Metrics) -> Ratios {
    let b = numbers(baseline);
    let figures = numbers(subject)
        .into_iter()
        .filter_map(|(k, a)| {
            let b = *b.get(&k)?;
            (b != 0.0).then(|| (k, a / b))
        })
        .collect();
    let cpu_at_same_rate = match (subject, baseline) {
        (Metrics::Fanout(s), Metrics::Fanout(b)) => Some(cpu_ratios(
            &s.server_cpu_s_per_million_by_rate,
            &b.server_cpu_s_per_million_by_rate,
        )),
        (Metrics::Fanout(s), _) => Some(cpu_ratios(
            &s.server_cpu_s_per_million_by_rate,
            &BTreeMap::new(),
        )),
        _ => None,
    };
    Ratios {
        figures,
        cpu_at_same_rate,
    }
}

fn goals(ratios: &BTreeMap<String, Ratios>) -> Vec<GoalResult> {
    FANOUT_GOALS
        .iter()
        .map(|g| {
            let ratio = ratios
                .get(g.baseline)
                .and_then(|r| r.figures.get(g.metric).copied());
            GoalResult {
                metric: g.metric.into(),
                baseline: g.baseline.into(),
                target: format!("{} {}", if g.at_least { ">=" } else { "<=" }, g.bound),
                ratio,
                met: ratio.map(|r| {
                    if g.at_least {
                        r >= g.bound
                    } else {
                        r <= g.bound
                    }
                }),
            }
        })
        .collect()
}

fn read_runs(specs: &[String]) -> anyhow::Result<Vec<(String, Run)>> {
    specs
        .iter()
        .map(|spec| {
            let Some((label, path)) = spec.split_once('=') else {
                bail!("{spec}: expected LABEL=FILE");
            };
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            let run = Run::parse(&text)
                .with_context(|| format!("{path} does not hold one JSON result"))?;
            Ok((label.to_owned(), run))
        })
        .collect()
}

pub(crate) fn compare(args: &CompareArgs) -> anyhow::Result<u8> {
    let scenario = args.scenario.as_str();
    ensure!(
        matches!(
            scenario,
            "fanout" | "channels" | "churn" | "connect" | "queries"
        ),
        "--scenario must be fanout, channels, churn, connect or queries"
    );
    let runs = read_runs(&args.runs)?;
    let subject = args.subject.clone().unwrap_or_else(|| runs[0].0.clone());
    let Some((_, subj)) = runs.iter().find(|(l, _)| *l == subject) else {
        bail!("--subject {subject}: no run has that label");
    };
    let per_run: BTreeMap<String, Metrics> =
        runs.iter().map(|(l, r)| (l.clone(), metrics(r))).collect();
    let subj_m = &per_run[&subject];
    let ratios: BTreeMap<String, Ratios> = per_run
        .iter()
        .filter(|(label, _)| **label != subject)
        .map(|(label, m)| (label.clone(), ratios_of(subj_m, m)))
        .collect();
    let goals = if scenario == "fanout" && !args.no_goals {
        goals(&ratios)
    } else {
        Vec::new()
    };
    let line = summary_line(scenario, &subject, &runs, &per_run, &ratios, &goals);
    println!("{line}");
    let out = Comparison {
        scenario: scenario.into(),
        date_unix: unix_us() / 1_000_000,
        subject,
        summary: line,
        machine: subj.machine().clone(),
        runs: per_run,
        ratios,
        goals,
        commands: runs
            .iter()
            .map(|(l, r)| (l.clone(), r.command().to_owned()))
            .collect(),
    };
    if let Some(path) = &args.append {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(&out)?)?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, super::html(&runs, Some(&out)))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed_goal = out.goals.iter().any(|g| g.met == Some(false));
    let failed_checks = runs.iter().any(|(_, r)| r.failed_checks());
    Ok(u8::from(failed_goal || failed_checks))
}

fn ratio_text(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}"))
}

fn summary_line(
    scenario: &str,
    subject: &str,
    runs: &[(String, Run)],
    per_run: &BTreeMap<String, Metrics>,
    ratios: &BTreeMap<String, Ratios>,
    goals: &[GoalResult],
) -> String {
    let mut s = String::new();
    match (scenario, &per_run[subject]) {
        ("connect", _) => connect_line(&mut s, subject, runs, per_run, ratios),
        ("churn", Metrics::Fanout(m)) => churn_line(&mut s, subject, m),
        _ => fanout_line(&mut s, scenario, subject, runs, per_run, ratios, goals),
    }
    s.trim_end_matches(';').to_owned()
}

fn connect_line(
    s: &mut String,
    subject: &str,
    runs: &[(String, Run)],
    per_run: &BTreeMap<String, Metrics>,
    ratios: &BTreeMap<String, Ratios>,
) {
    let _ = write!(s, "connect:");
    for (label, _) in runs {
        let (rate, p99) = match &per_run[label] {
            Metrics::Connect(r) => (Some(r.handshakes_per_s), r.handshake_p99_ms),
            Metrics::Fanout(_) => (None, None),
        };
        let _ = write!(s, " {label} {}/s (p99 {} ms);", opt_si(rate), opt_si(p99));
    }
    for (label, r) in ratios {
        let _ = write!(
            s,
            " {subject}/{label} {}x;",
            ratio_text(r.figures.get("handshakes_per_s").copied())
        );
    }
}

fn churn_line(s: &mut String, subject: &str, m: &FanoutMetrics) {
    let rss = |key: &str| m.memory.get(key).copied().flatten().map(|x| x.rss as f64);
    let (before, after) = (rss("server_before_churn"), rss("server_after_churn"));
    let growth = match (before, after) {
        (Some(b), Some(a)) if b > 0.0 => format!("{:+.1}%", (a - b) / b * 100.0),
        _ => "-".into(),
    };
    let c = m.churn.as_ref();
    let count = |f: fn(&ChurnMetrics) -> u64| c.map_or("null".into(), |c| f(c).to_string());
    let _ = write!(
        s,
        "churn: {subject} {} connections, {} reconnects; events owed to live subscribers {}, missing {}, duplicates {}, connections lost {}; latency p99 {} ms; server RSS {} before churn (after a warm-up at the same event rate), {} after ({growth}); {} at start, {} after closing all",
        opt_si(Some(m.connected as f64)),
        opt_si(c.map(|c| c.reconnects as f64)),
        opt_si(c.map(|c| c.expected as f64)),
        count(|c| c.missing),
        count(|c| c.duplicates),
        count(|c| c.lost_connections),
        opt_si(c.and_then(|c| c.latency_ms.p99)),
        mib(before),
        mib(after),
        mib(rss("server_at_start")),
        mib(rss("server_after_close")),
    );
}

fn fanout_line(
    s: &mut String,
    scenario: &str,
    subject: &str,
    runs: &[(String, Run)],
    per_run: &BTreeMap<String, Metrics>,
    ratios: &BTreeMap<String, Ratios>,
    goals: &[GoalResult],
) {
    let _ = write!(s, "{scenario}:");
    for (label, _) in runs {
        let Metrics::Fanout(r) = &per_run[label] else {
            continue;
        };
        let _ = write!(
            s,
            " {label} {} msg/s at {} ev/s (burst {}, last-subscriber p99 {} ms);",
            opt_si(r.delivered_per_s),
            opt_si(r.sustained_events_per_s),
            opt_si(r.burst_delivered_per_s),
            opt_si(r.ttl_p99_ms),
        );
    }
    for (label, r) in ratios {
        let cpu: Vec<f64> = r
            .cpu_at_same_rate
            .iter()
            .flatten()
            .map(|(_, &v)| v)
            .filter(|v| v.is_finite())
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
            ratio_text(r.figures.get("delivered_per_s").copied()),
            ratio_text(r.figures.get("ttl_p99_ms").copied()),
        );
    }
    for g in goals {
        let met = match g.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "n/a",
        };
        let _ = write!(s, " [{} vs {} {}: {met}]", g.metric, g.baseline, g.target);
    }
}
