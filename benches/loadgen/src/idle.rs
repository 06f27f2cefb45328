//! `herald-bench idle`: one process opens N connections at a controlled rate, answers pings,
//! holds them and prints a JSON summary (benches/idle_memory.sh reads it).
//!
//! Owns the idle run's loop and its summary. Must not track events: idle connections only
//! answer pings.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::ensure;

use crate::client::{self, Engine, EngineOptions, Slot};
use crate::messages::{IdleFailures, IdleRss, IdleSummary};
use crate::system::{check_fd_limit, rss_bytes, stop_flag};
use crate::target::{Target, check_source_ips, parse_source_ips, probe};

const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub(crate) struct IdleArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:9505/v1/realtime?project=p&channels[]=files
    #[arg(long)]
    target: String,
    /// Connections to open (one process holds at most its open-file limit minus 64).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections started per second.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Upgrades in flight at once (connect to `connected`).
    #[arg(long, default_value_t = 1000)]
    max_inflight: usize,
    /// How long to hold the connections once every one of them opened or failed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Time from connect to the `connected` message before a connection counts as failed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Local IPv4 addresses to bind, round robin: ranges and lists, e.g.
    /// 127.0.0.2-127.0.0.60 or 127.0.0.2,127.0.0.3. Default: the kernel's choice.
    #[arg(long)]
    source_ips: Option<String>,
    /// Signs every connection in as a user of its own: a JWT signed with this secret (HS256, the
    /// server's --jwt-secret) is added to the target as `jwt=`, for user
    /// `<--jwt-user-prefix><n>` with 3 extra roles (5 with the derived ones). At most 65,536
    /// connections per process.
    #[arg(long)]
    jwt_secret: Option<String>,
    /// Prefix of the user ids `--jwt-secret` makes; give each process its own.
    #[arg(long, default_value = "u")]
    jwt_user_prefix: String,
}

/// Extra roles of every `--jwt-secret` user (teams and a membership, as Appwrite's are).
const USER_ROLES: [&str; 3] = ["team:t1", "team:t1/owner", "member:m1"];

/// An HS256 JWT for `user`, the claims herald reads (`userId`, `sessionId`, `exp`, `roles`).
fn user_jwt(secret: &str, user: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 24 * 3600;
    let claims = serde_json::json!({
        "userId": user, "sessionId": format!("s-{user}"), "exp": exp, "roles": USER_ROLES,
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?,
    )?)
}

/// The targets the connections alternate over: the one given, or with `--jwt-secret` one per
/// connection, each signed in as its own user.
fn targets(args: &IdleArgs) -> anyhow::Result<Vec<Target>> {
    let Some(secret) = &args.jwt_secret else {
        return Ok(vec![Target::parse(&args.target)?]);
    };
    ensure!(
        args.connections <= usize::from(u16::MAX) + 1,
        "--jwt-secret makes one target per connection: at most 65,536 per process"
    );
    let sep = if args.target.contains('?') { '&' } else { '?' };
    (0..args.connections)
        .map(|n| {
            let jwt = user_jwt(secret, &format!("{}{n}", args.jwt_user_prefix))?;
            Target::parse(&format!("{}{sep}jwt={jwt}", args.target))
        })
        .collect()
}

pub(crate) fn run(args: &IdleArgs) -> anyhow::Result<IdleSummary> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(args.max_inflight > 0, "--max-inflight must be at least 1");
    let targets = targets(args)?;
    let target = &targets[0];
    ensure!(!target.tcp, "idle needs a ws:// target");
    let sources = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    check_fd_limit(args.connections)?;
    check_source_ips(&sources)?;
    probe(target, sources.first().copied())?;
    let stop = stop_flag()?;

    let url = target.url.clone();
    let slots = (0..args.connections)
        .map(|n| Slot {
            target: (n % targets.len()) as u16,
            ..Slot::default()
        })
        .collect();
    let mut engine = Engine::new(
        targets,
        sources,
        slots,
        EngineOptions {
            rate: f64::from(args.rate),
            max_inflight: args.max_inflight,
            handshake_timeout: args.handshake_timeout,
            subscribe: None,
            track_events: false,
            close_on_open: false,
        },
    )?;
    engine.queue_all();
    let rss_before = rss_bytes();
    let mut next_progress = engine.epoch + PROGRESS_EVERY;
    let mut settled: Option<(Instant, u64)> = None;
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let now = Instant::now();
        match settled {
            None => {
                engine.start_due(now);
                if engine.settled() {
                    let rss = rss_bytes();
                    settled = Some((now, rss));
                    eprintln!(
                        "herald-bench: settled: {} open, {} failed after {:.1}s; rss {:.1} MiB; holding for {:?}",
                        engine.stats.open,
                        engine.stats.failed,
                        now.duration_since(engine.epoch).as_secs_f64(),
                        rss as f64 / (1 << 20) as f64,
                        args.hold
                    );
                }
            }
            Some((at, _)) if now >= at + args.hold => break,
            Some(_) => {}
        }
        let wake_at = match settled {
            None if engine.has_pending() => now + Duration::from_millis(5),
            None => next_progress,
            Some((at, _)) => next_progress.min(at + args.hold),
        };
        engine.poll(wake_at.saturating_duration_since(now))?;
        if Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            engine.expire();
            eprintln!("herald-bench: {}", engine.status_line(args.connections));
        }
    }

    let rss_end = rss_bytes();
    let elapsed = engine.epoch.elapsed();
    let stats = &engine.stats;
    let (settled_after, rss_settled) = settled.map_or((None, None), |(at, rss)| {
        (
            Some(at.duration_since(engine.epoch).as_secs_f64()),
            Some(rss),
        )
    });
    let per_conn = rss_settled
        .filter(|_| stats.connected > 0)
        .map(|rss| rss.saturating_sub(rss_before) as f64 / stats.connected as f64);
    Ok(IdleSummary {
        target: url,
        requested: args.connections,
        connected: stats.connected,
        open_at_end: stats.open,
        failed: IdleFailures {
            total: stats.failed,
            reasons: stats.failures.clone(),
        },
        lost_after_open: stats.lost.clone(),
        handshake_latency_ms: client::percentiles_ms(&stats.handshake_us),
        settled_after_s: settled_after,
        pings_answered: stats.pings_answered,
        messages_received: stats.messages,
        interrupted,
        duration_s: elapsed.as_secs_f64(),
        rss_bytes: IdleRss {
            before_connecting: rss_before,
            settled: rss_settled,
            end: rss_end,
            per_connection: per_conn,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_is_a_user_herald_accepts() {
        let token = user_jwt("s3cret", "grow1-7").unwrap();
        let verifier = herald::identity::JwtVerifier::new(Some("s3cret"), None).unwrap();
        let identity = verifier
            .verify(&token, "p", &mut |n| std::sync::Arc::from(n))
            .unwrap();
        assert_eq!(identity.user_id(), Some("grow1-7"));
        assert!(USER_ROLES.iter().all(|r| identity.has_role(r)));
        assert_eq!(identity.roles().len(), 5, "{:?}", identity.roles());
        let other = herald::identity::JwtVerifier::new(Some("other"), None).unwrap();
        assert!(other.verify(&token, "p", &mut |n| n.into()).is_err());
    }
}
