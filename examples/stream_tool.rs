//! Redis stream helper for the ingestion benchmark (benches/ingest.sh), not part of herald.
//!
//! `stream_tool load --url U --stream S --count N [--payload-bytes B]`: XADDs N entries in the
//! herald entry format with pipelines of 1,000, prints `loaded N in T s (R/s)`.
//! `stream_tool read --url U --stream S --count N [--live]`: reads N entries with
//! `XREAD COUNT 1000` (what herald's reader does, minus decoding and fan-out) and prints the rate:
//! the baseline herald's ingestion is compared with. From the start of the stream, or with
//! `--live` from its end, blocking for new entries as herald does.

use std::time::Instant;

use anyhow::{Context, bail};
use redis::streams::StreamReadReply;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let url = arg(&args, "--url").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let stream = arg(&args, "--stream").unwrap_or_else(|| "herald:events".into());
    let count: usize = arg(&args, "--count")
        .context("--count N is required")?
        .parse()?;
    let pad = "x".repeat(arg(&args, "--payload-bytes").map_or(Ok(0), |b| b.parse())?);
    let mut conn = redis::Client::open(url.as_str())?
        .get_connection()
        .with_context(|| format!("cannot reach Redis at {url}"))?;
    let started = Instant::now();
    match mode {
        "load" => {
            let mut sent = 0;
            while sent < count {
                let mut pipe = redis::pipe();
                for n in sent..(sent + 1000).min(count) {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("project")
                        .arg("p")
                        .arg("channels")
                        .arg(r#"["files"]"#)
                        .arg("payload")
                        .arg(format!(r#"{{"seq":{n},"pad":"{pad}"}}"#))
                        .ignore();
                }
                pipe.query::<()>(&mut conn)?;
                sent = (sent + 1000).min(count);
            }
        }
        "read" => {
            let live = args.iter().any(|a| a == "--live");
            let mut cursor = if live { "$" } else { "0-0" }.to_owned();
            let mut read = 0;
            while read < count {
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT").arg(1000);
                if live {
                    cmd.arg("BLOCK").arg(5000);
                }
                let reply: Option<StreamReadReply> = cmd
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&cursor)
                    .query(&mut conn)?;
                let ids: Vec<_> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                let Some(last) = ids.last() else {
                    bail!("the stream ended after {read} of {count} entries");
                };
                cursor = last.id.clone();
                read += ids.len();
            }
        }
        _ => bail!(
            "usage: stream_tool load|read --count N [--url U] [--stream S] [--payload-bytes B]"
        ),
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{mode} {count} in {secs:.3} s ({:.0}/s)",
        count as f64 / secs
    );
    Ok(())
}
