//! Results across runs: `compare` ([`compare`]: key figures, ratios against baselines, one
//! summary line) and the self-contained HTML report ([`html`]: inline SVG charts, no scripts,
//! no network fetches).
//!
//! Owns reading result files back ([`Run`]) and everything shown about them. Must not measure:
//! it reads what `fanout` and `connect` wrote, through the types in [`crate::messages`].

mod compare;
mod html;

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

use crate::messages::{ConnectSummary, FanoutSummary, Machine};

pub(crate) use compare::compare;
pub(crate) use html::html;

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
    /// Leave out the targets (for smoke runs, where ratios mean nothing).
    #[arg(long)]
    no_goals: bool,
    /// Result files of `fanout` or `connect` runs, as LABEL=FILE.
    #[arg(required = true)]
    runs: Vec<String>,
}

/// One result file: a `fanout` or a `connect` run.
#[derive(Debug, Clone)]
pub(crate) enum Run {
    Fanout(Box<FanoutSummary>),
    Connect(Box<ConnectSummary>),
}

impl Run {
    /// Reads a result file's JSON; `connect` results say so in their `kind`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let v: Value = serde_json::from_str(text.trim()).context("not one JSON result")?;
        Ok(
            if v.get("kind").and_then(Value::as_str) == Some("connect") {
                Self::Connect(Box::new(
                    serde_json::from_value(v).context("not a `connect` result")?,
                ))
            } else {
                Self::Fanout(Box::new(
                    serde_json::from_value(v).context("not a `fanout` result")?,
                ))
            },
        )
    }

    pub fn machine(&self) -> &Machine {
        match self {
            Self::Fanout(f) => &f.machine,
            Self::Connect(c) => &c.machine,
        }
    }

    pub fn command(&self) -> &str {
        match self {
            Self::Fanout(f) => &f.command,
            Self::Connect(c) => &c.command,
        }
    }

    /// Whether the run itself failed a check (lost, duplicated or misrouted events).
    pub fn failed_checks(&self) -> bool {
        matches!(self, Self::Fanout(f) if !f.checks_failed.is_empty())
    }
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

/// `Some(x)` only for a finite `x`.
fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|x| x.is_finite())
}

fn opt_si(v: Option<f64>) -> String {
    finite(v).map_or_else(|| "-".into(), si)
}

fn mib(v: Option<f64>) -> String {
    finite(v).map_or_else(
        || "-".into(),
        |b| format!("{:.1} MiB", b / f64::from(1 << 20)),
    )
}
