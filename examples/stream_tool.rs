//! Redis stream helper for the ingestion benchmark (benches/ingest.sh), not part of herald.
//!
//! `stream_tool load --url U --stream S --count N [--payload-bytes B]`: XADDs N entries in the
//! herald entry format (project `p`) with pipelines of 1,000, prints `load N in T s (R/s)`.
//! `stream_tool read --url U --stream S --count N [--live]`: reads N entries with
//! `XREAD COUNT 1000` (what herald's reader does, minus decoding and fan-out) and prints the rate:
//! the baseline herald's ingestion is compared with. From the start of the stream, or with
//! `--live` from its end, blocking for new entries as herald does.
//!
//! Stream shards, as herald's `--redis-cluster` and `--stream-shards` split the stream:
//! - `--cluster H:P,H:P,...` (instead of `--url`): a Redis Cluster, through a cluster
//!   connection that sends each key's commands to the master of its slot;
//! - `--stream-shards K` (1): the stream is K streams, keyed as herald keys them
//!   (`herald::bus::streams::StreamShards`);
//! - `--projects M` (1): entry n is for project `p<n % M>` (`p` alone when M is 1) and goes to
//!   that project's shard's key.
//!
//! `load` then pipelines 1,000 entries at a time per key and prints how many went to each key;
//! `read` (given the same `--count`, `--stream-shards` and `--projects`) reads every key, one
//! thread and connection each, each until it has as many entries as `load` puts in its key.
//! With the defaults (one shard, one project) both do exactly what they did before shards.

use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use herald::bus::streams::StreamShards;
use redis::streams::StreamReadReply;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A connection to one Redis server or to a Redis Cluster.
enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn open(cluster: Option<&str>, url: &str) -> anyhow::Result<Self> {
        Ok(match cluster {
            Some(addresses) => {
                let urls: Vec<String> = addresses
                    .split(',')
                    .map(|a| match a.trim() {
                        a if a.contains("://") => a.to_owned(),
                        a => format!("redis://{a}"),
                    })
                    .collect();
                let conn = redis::cluster::ClusterClient::new(urls)?
                    .get_connection()
                    .with_context(|| format!("cannot reach the Redis Cluster at {addresses}"))?;
                Self::Cluster(Box::new(conn))
            }
            None => {
                let conn = redis::Client::open(url)?
                    .get_connection()
                    .with_context(|| format!("cannot reach Redis at {url}"))?;
                Self::Single(conn)
            }
        })
    }

    /// Sends `cmds` (commands on one key) as one pipeline, emptying it.
    fn pipeline(&mut self, cmds: &mut Vec<redis::Cmd>) -> redis::RedisResult<()> {
        match self {
            Self::Single(conn) => {
                let mut pipe = redis::pipe();
                for cmd in cmds.drain(..) {
                    pipe.add_command(cmd).ignore();
                }
                pipe.exec(conn)
            }
            Self::Cluster(conn) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds.drain(..) {
                    pipe.add_command(cmd).ignore();
                }
                pipe.exec(conn)
            }
        }
    }

    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Self::Single(conn) => cmd.query(conn),
            Self::Cluster(conn) => cmd.query(conn),
        }
    }
}

/// Reads `count` entries of `key` with XREAD COUNT 1000, from its start or (`live`) its end.
fn read_key(conn: &mut Conn, key: &str, count: usize, live: bool) -> anyhow::Result<()> {
    let mut cursor = if live { "$" } else { "0-0" }.to_owned();
    let mut read = 0;
    while read < count {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(1000);
        if live {
            cmd.arg("BLOCK").arg(5000);
        }
        cmd.arg("STREAMS").arg(key).arg(&cursor);
        let reply: Option<StreamReadReply> = conn.query(&cmd)?;
        let ids: Vec<_> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        let Some(last) = ids.last() else {
            bail!("the stream {key} ended after {read} of {count} entries");
        };
        cursor = last.id.clone();
        read += ids.len();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let url = arg(&args, "--url").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let cluster = arg(&args, "--cluster");
    let stream = arg(&args, "--stream").unwrap_or_else(|| "herald:events".into());
    let count: usize = arg(&args, "--count")
        .context("--count N is required")?
        .parse()?;
    let pad = "x".repeat(arg(&args, "--payload-bytes").map_or(Ok(0), |b| b.parse())?);
    let shards = StreamShards::new(
        &stream,
        arg(&args, "--stream-shards").map_or(Ok(1), |s| s.parse())?,
    );
    let projects: usize = arg(&args, "--projects").map_or(Ok(1), |m| m.parse())?;
    if projects == 0 {
        bail!("--projects must be at least 1");
    }
    let names: Vec<String> = match projects {
        1 => vec!["p".to_owned()],
        m => (0..m).map(|j| format!("p{j}")).collect(),
    };
    // Each project's shard, and how many of the `count` entries each key gets.
    let home: Vec<usize> = names
        .iter()
        .map(|name| usize::from(shards.shard_of(name)))
        .collect();
    let mut per_key = vec![0usize; shards.keys().len()];
    for n in 0..count {
        per_key[home[n % projects]] += 1;
    }
    let started = Instant::now();
    match mode {
        "load" => {
            let mut conn = Conn::open(cluster.as_deref(), &url)?;
            let mut pending: Vec<Vec<redis::Cmd>> = vec![Vec::new(); shards.keys().len()];
            for n in 0..count {
                let j = n % projects;
                let k = home[j];
                let mut cmd = redis::cmd("XADD");
                cmd.arg(&shards.keys()[k])
                    .arg("*")
                    .arg("project")
                    .arg(&names[j])
                    .arg("channels")
                    .arg(r#"["files"]"#)
                    .arg("payload")
                    .arg(format!(r#"{{"seq":{n},"pad":"{pad}"}}"#));
                pending[k].push(cmd);
                if pending[k].len() == 1000 {
                    conn.pipeline(&mut pending[k])?;
                }
            }
            for batch in &mut pending {
                if !batch.is_empty() {
                    conn.pipeline(batch)?;
                }
            }
        }
        "read" => {
            let live = args.iter().any(|a| a == "--live");
            if let [key] = shards.keys() {
                read_key(&mut Conn::open(cluster.as_deref(), &url)?, key, count, live)?;
            } else {
                // One thread and connection per key that gets entries.
                let cluster = cluster.as_deref();
                let url = url.as_str();
                std::thread::scope(|scope| {
                    let readers: Vec<_> = shards
                        .keys()
                        .iter()
                        .zip(&per_key)
                        .filter(|(_, n)| **n > 0)
                        .map(|(key, &n)| {
                            scope.spawn(move || {
                                read_key(&mut Conn::open(cluster, url)?, key, n, live)
                            })
                        })
                        .collect();
                    for reader in readers {
                        reader
                            .join()
                            .map_err(|_| anyhow!("a reader thread panicked"))??;
                    }
                    anyhow::Ok(())
                })?;
            }
        }
        _ => bail!(
            "usage: stream_tool load|read --count N [--url U | --cluster H:P,H:P,...] [--stream S] \
             [--stream-shards K] [--projects M] [--payload-bytes B] [--live]"
        ),
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{mode} {count} in {secs:.3} s ({:.0}/s)",
        count as f64 / secs
    );
    if shards.keys().len() > 1 {
        let spread: Vec<String> = shards
            .keys()
            .iter()
            .zip(&per_key)
            .map(|(key, n)| format!("{key}={n}"))
            .collect();
        println!("  entries per key: {}", spread.join(" "));
    }
    Ok(())
}
