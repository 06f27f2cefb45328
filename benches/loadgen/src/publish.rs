//! The publisher: events over HTTP (`POST /v1/events`, one keep-alive connection) or Redis
//! (`XADD` to the bus stream), paced by an absolute schedule so a slow request never makes the
//! run drift; busy answers (503, 429) are retried with the same event, so subscribers never see
//! a hole that is the publisher's doing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::client::{new_hist, percentiles_ms};
use crate::system::{stop_flag, unix_us};

/// Characters of an error body quoted.
const MAX_QUOTE: usize = 300;

/// Where events are published: the server's HTTP publish API, or a Redis stream it reads.
#[derive(clap::Args)]
pub(crate) struct SinkArgs {
    /// The admin listener of the server, e.g. http://127.0.0.1:9506 (events go to /v1/events).
    #[arg(long, required_unless_present = "redis")]
    admin: Option<String>,
    /// Publish with XADD on this Redis instead, e.g. redis://127.0.0.1:6379 (herald started
    /// with --redis).
    #[arg(long, conflicts_with = "admin")]
    redis: Option<String>,
    /// The Redis stream herald reads.
    #[arg(long, default_value = "herald:events")]
    stream: String,
}

impl SinkArgs {
    pub fn connect(&self) -> anyhow::Result<Sink> {
        match (&self.redis, &self.admin) {
            (Some(url), _) => Sink::redis(url, &self.stream),
            (None, Some(admin)) => Sink::http(admin),
            (None, None) => bail!("give --admin URL (HTTP publish API) or --redis URL"),
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    sink: SinkArgs,
    #[arg(long, default_value = "p")]
    project: String,
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Events to publish.
    #[arg(long, default_value_t = 100)]
    events: u64,
    /// Events per second (0: as fast as the server answers).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Bytes of padding in each payload.
    #[arg(long, default_value_t = 0)]
    pad: usize,
    /// The phase number written into each payload's `hb` field.
    #[arg(long, default_value_t = 0)]
    phase: u32,
}

/// Where events go.
pub(crate) enum Sink {
    Http {
        agent: ureq::Agent,
        url: String,
    },
    Redis {
        con: redis::Connection,
        stream: String,
    },
}

/// The server's answer to one publish.
pub(crate) enum Outcome {
    Accepted,
    /// Busy (503/429): try again after this long.
    Busy(Duration),
}

impl Sink {
    pub fn http(admin: &str) -> anyhow::Result<Self> {
        let base = admin.trim_end_matches('/');
        ensure!(
            base.starts_with("http://"),
            "--admin {admin}: expected an http:// URL such as http://127.0.0.1:9506"
        );
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build();
        Ok(Self::Http {
            agent: config.into(),
            url: format!("{base}/v1/events"),
        })
    }

    pub fn redis(url: &str, stream: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("--redis {url}"))?;
        let con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .with_context(|| format!("cannot reach Redis at {url}: is it running?"))?;
        Ok(Self::Redis {
            con,
            stream: stream.to_owned(),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Http { url, .. } => format!("POST {url}"),
            Self::Redis { stream, .. } => format!("XADD {stream}"),
        }
    }

    /// Publishes one event; an error is final (refused, unreachable), busy is not.
    pub fn publish(
        &mut self,
        project: &str,
        channel: &str,
        payload: &str,
    ) -> anyhow::Result<Outcome> {
        match self {
            Self::Http { agent, url } => {
                let body = format!(
                    r#"{{"project":{},"channels":[{}],"payload":{payload}}}"#,
                    Value::from(project),
                    Value::from(channel)
                );
                let mut resp = agent
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .send(body.as_bytes())
                    .map_err(|e| anyhow!("cannot publish to {url}: {e}"))?;
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                match status {
                    200..=299 => Ok(Outcome::Accepted),
                    429 | 503 => Ok(Outcome::Busy(
                        retry_after.map_or(Duration::from_millis(5), Duration::from_secs),
                    )),
                    _ => {
                        let quoted: String = text.trim().chars().take(MAX_QUOTE).collect();
                        bail!("{url} refused the event: HTTP {status}: {quoted}")
                    }
                }
            }
            Self::Redis { con, stream } => {
                let channels = Value::from(vec![channel]).to_string();
                redis::cmd("XADD")
                    .arg(stream.as_str())
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(1_000_000)
                    .arg("*")
                    .arg("project")
                    .arg(project)
                    .arg("channels")
                    .arg(channels)
                    .arg("payload")
                    .arg(payload)
                    .query::<String>(con)
                    .map_err(|e| anyhow!("XADD to {stream} failed: {e}"))?;
                Ok(Outcome::Accepted)
            }
        }
    }

    /// Publishes, retrying busy answers until `deadline`; returns how many retries it took.
    pub fn publish_retrying(
        &mut self,
        project: &str,
        channel: &str,
        payload: &str,
        deadline: Instant,
    ) -> anyhow::Result<u64> {
        let mut retries = 0;
        loop {
            match self.publish(project, channel, payload)? {
                Outcome::Accepted => return Ok(retries),
                Outcome::Busy(wait) => {
                    if Instant::now() + wait > deadline {
                        bail!(
                            "the server kept answering busy (503/429) to {} for {retries} retries",
                            self.describe()
                        );
                    }
                    retries += 1;
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            }
        }
    }
}

/// One event for the pool to publish.
pub(crate) struct Job {
    pub phase: u32,
    pub index: u64,
    pub chan: usize,
    pub seq: u64,
    pub pad: usize,
    /// Give up retrying busy answers after this.
    pub deadline: Instant,
}

/// What became of a job.
pub(crate) struct Done {
    pub phase: u32,
    pub chan: usize,
    pub seq: u64,
    /// Unix microseconds written into the payload just before the request.
    pub sent: u64,
    pub latency_us: u64,
    pub retries: u64,
    pub error: Option<String>,
}

/// Publisher threads, one connection each. All events of a channel go through the same
/// thread, so they reach the server in order; different channels go out in parallel.
pub(crate) struct Pool {
    jobs: Vec<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    /// Jobs of any other phase are dropped unpublished (a phase that ended with events still
    /// queued, behind a slow server, must not publish them into the next one).
    current: Arc<AtomicU32>,
}

impl Pool {
    pub fn new(
        threads: usize,
        make_sink: &dyn Fn() -> anyhow::Result<Sink>,
        project: &str,
        channel_names: Arc<Vec<String>>,
    ) -> anyhow::Result<Self> {
        let (done_tx, done) = mpsc::channel();
        let current = Arc::new(AtomicU32::new(0));
        let mut jobs = Vec::new();
        for _ in 0..threads.max(1) {
            let mut sink = make_sink()?;
            let (tx, rx) = mpsc::channel::<Job>();
            let done_tx = done_tx.clone();
            let names = channel_names.clone();
            let project = project.to_owned();
            let current = current.clone();
            std::thread::spawn(move || {
                for job in rx {
                    if job.phase != current.load(Ordering::Relaxed) {
                        continue;
                    }
                    let sent = unix_us();
                    let body = payload(job.phase, job.index, job.chan, job.seq, sent, job.pad);
                    let t = Instant::now();
                    let outcome =
                        sink.publish_retrying(&project, &names[job.chan], &body, job.deadline);
                    let (retries, error) = match outcome {
                        Ok(r) => (r, None),
                        Err(e) => (0, Some(format!("{e:#}"))),
                    };
                    let done = Done {
                        phase: job.phase,
                        chan: job.chan,
                        seq: job.seq,
                        sent,
                        latency_us: (t.elapsed().as_micros() as u64).max(1),
                        retries,
                        error,
                    };
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            });
            jobs.push(tx);
        }
        Ok(Self {
            jobs,
            done,
            current,
        })
    }

    /// Only jobs of this phase are published from now on.
    pub fn set_phase(&self, phase: u32) {
        self.current.store(phase, Ordering::Relaxed);
    }

    pub fn submit(&self, job: Job) -> anyhow::Result<()> {
        let thread = job.chan % self.jobs.len();
        self.jobs[thread]
            .send(job)
            .map_err(|_| anyhow!("a publisher thread is gone"))
    }

    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }
}

/// The payload of one bench event: `hb` = phase.index.channel.sequence.sent_us, `kind` (what
/// `fanout --query` filters on), plus padding.
pub(crate) fn payload(
    phase: u32,
    index: u64,
    chan: usize,
    seq: u64,
    sent_us: u64,
    pad: usize,
) -> String {
    let mut p = format!(r#"{{"hb":"{phase}.{index}.{chan}.{seq}.{sent_us}","kind":"bench""#);
    if pad > 0 {
        p.push_str(r#","pad":""#);
        p.extend(std::iter::repeat_n('x', pad));
        p.push('"');
    }
    p.push('}');
    p
}

pub(crate) fn run(args: &PublishArgs) -> anyhow::Result<u8> {
    ensure!(args.rate >= 0.0, "--rate must not be negative");
    let mut sink = args.sink.connect()?;
    let stop = stop_flag()?;
    let mut latency: Histogram<u64> = new_hist();
    let start = Instant::now();
    let first_unix = unix_us();
    let mut retries = 0;
    let mut published = 0;
    let mut next_status = start + Duration::from_secs(1);
    for i in 0..args.events {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        if args.rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / args.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let sent = unix_us();
        let body = payload(args.phase, i, 0, i, sent, args.pad);
        let t = Instant::now();
        retries += sink.publish_retrying(
            &args.project,
            &args.channel,
            &body,
            Instant::now() + Duration::from_secs(30),
        )?;
        let _ = latency.record((t.elapsed().as_micros() as u64).max(1));
        published += 1;
        if Instant::now() >= next_status {
            next_status += Duration::from_secs(1);
            eprintln!(
                "herald-bench publish: {:.1}s {published}/{} events",
                start.elapsed().as_secs_f64(),
                args.events
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "sink": sink.describe(),
            "published": published,
            "requested": args.events,
            "busy_retries": retries,
            "duration_s": secs,
            "achieved_rate": published as f64 / secs.max(1e-9),
            "publish_latency_ms": percentiles_ms(&latency),
            "first_sent_unix": first_unix,
        })
    );
    Ok(u8::from(published < args.events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{hb_finder, parse_hb};

    #[test]
    fn payload_round_trips_through_the_scanner() {
        let p = payload(2, 10, 3, 7, 1_700_000_000_000_001, 5);
        assert_eq!(
            p,
            r#"{"hb":"2.10.3.7.1700000000000001","kind":"bench","pad":"xxxxx"}"#
        );
        let v: Value = serde_json::from_str(&p).unwrap();
        let event = json!({"type": "event", "data": {"payload": v}}).to_string();
        assert_eq!(
            parse_hb(&hb_finder(), event.as_bytes()),
            Some([2, 10, 3, 7, 1_700_000_000_000_001])
        );
    }
}
