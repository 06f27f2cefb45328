//! Per-IP admission: how many connections one source address may hold, and how fast it may open
//! new ones.
//!
//! Owns the process-wide table of source addresses (shared by all shards, touched once per
//! accept and once per close, never per message) with a connection count and a token bucket for
//! handshakes each, and the trusted proxies exempt from both. A connection through a trusted
//! proxy is counted at its upgrade instead, under the client address the proxy forwarded
//! (`X-Forwarded-For`). It must not know sockets or connections: the driver (or the connection,
//! for a forwarded address) asks, keeps the [`IpTicket`], and hands it back at close.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use slab::Slab;

/// How many seconds of the handshake rate a source may spend at once.
const BURST_SECS: f64 = 10.0;

/// Why a source may not open another connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooFast,
}

impl Refusal {
    /// The metric label and the words the client gets.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooManyConnections => "ip_connections",
            Self::TooFast => "ip_rate",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::TooManyConnections => {
                "Too many connections from this address (see --max-connections-per-ip)"
            }
            Self::TooFast => {
                "Too many new connections from this address; retry shortly (see --handshakes-per-ip)"
            }
        }
    }
}

/// What an admitted connection hands back at close: its table entry, or none when it was not
/// counted (limits off, or a trusted proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpTicket(u32);

impl IpTicket {
    pub const UNCOUNTED: IpTicket = IpTicket(u32::MAX);
    /// Not counted yet: the peer is a trusted proxy, and the client address comes with the
    /// request.
    pub const FORWARDED: IpTicket = IpTicket(u32::MAX - 1);
}

#[derive(Debug)]
struct Source {
    ip: IpAddr,
    connections: u32,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct Table {
    by_ip: FxHashMap<IpAddr, u32>,
    sources: Slab<Source>,
}

#[derive(Debug)]
pub struct IpLimits {
    /// 0: no limit.
    max_connections: u32,
    /// Handshakes per second; 0: no limit.
    rate: f64,
    trusted: Vec<IpNet>,
    table: Mutex<Table>,
}

impl IpLimits {
    pub fn new(max_connections: u32, handshakes_per_sec: u32, trusted: Vec<IpNet>) -> Self {
        Self {
            max_connections,
            rate: f64::from(handshakes_per_sec),
            trusted,
            table: Mutex::new(Table::default()),
        }
    }

    fn off(&self) -> bool {
        self.max_connections == 0 && self.rate == 0.0
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Counts a new connection from `ip`, or says why it may not open now. A trusted proxy
    /// gets [`IpTicket::FORWARDED`]: its client is counted by [`IpLimits::admit_forwarded`].
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<IpTicket, Refusal> {
        let ip = ip.to_canonical();
        if self.off() {
            return Ok(IpTicket::UNCOUNTED);
        }
        if self.is_trusted(ip) {
            return Ok(IpTicket::FORWARDED);
        }
        self.count(ip, now)
    }

    /// Counts a connection that came through a trusted proxy under the client address in its
    /// `X-Forwarded-For` values (all of the request's, joined by commas): the rightmost
    /// address that is not itself a trusted proxy, since each proxy appends the address it
    /// saw and anything further left was written by the client. Without a usable address the
    /// connection is the proxy's own and stays uncounted.
    pub fn admit_forwarded(
        &self,
        forwarded_for: Option<&str>,
        now: Instant,
    ) -> Result<IpTicket, Refusal> {
        match forwarded_for.and_then(|list| self.forwarded_client(list)) {
            Some(ip) if !self.off() => self.count(ip, now),
            _ => Ok(IpTicket::UNCOUNTED),
        }
    }

    fn forwarded_client(&self, list: &str) -> Option<IpAddr> {
        for entry in list.rsplit(',') {
            let ip = parse_forwarded(entry.trim())?.to_canonical();
            if !self.is_trusted(ip) {
                return Some(ip);
            }
        }
        None
    }

    fn count(&self, ip: IpAddr, now: Instant) -> Result<IpTicket, Refusal> {
        let burst = (self.rate * BURST_SECS).max(1.0);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Table { by_ip, sources } = &mut *table;
        let key = *by_ip.entry(ip).or_insert_with(|| {
            sources.insert(Source {
                ip,
                connections: 0,
                tokens: burst,
                refilled: now,
            }) as u32
        });
        let source = &mut sources[key as usize];
        if self.max_connections > 0 && source.connections >= self.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        if self.rate > 0.0 {
            let elapsed = now.saturating_duration_since(source.refilled).as_secs_f64();
            source.tokens = (source.tokens + elapsed * self.rate).min(burst);
            source.refilled = now;
            if source.tokens < 1.0 {
                return Err(Refusal::TooFast);
            }
            source.tokens -= 1.0;
        }
        source.connections += 1;
        Ok(IpTicket(key))
    }

    /// A counted connection closed.
    pub fn release(&self, ticket: IpTicket) {
        if ticket == IpTicket::UNCOUNTED || ticket == IpTicket::FORWARDED {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = table.sources.get_mut(ticket.0 as usize) {
            source.connections = source.connections.saturating_sub(1);
        }
    }

    /// Forgets sources with no connection whose bucket is full again, so the table holds only
    /// addresses that matter now. A source is kept while its bucket refills, so closing and
    /// reopening does not reset its rate.
    pub fn sweep(&self, now: Instant) {
        let burst = (self.rate * BURST_SECS).max(1.0);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Table { by_ip, sources } = &mut *table;
        let rate = self.rate;
        let idle: Vec<usize> = sources
            .iter()
            .filter(|(_, s)| {
                let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
                s.connections == 0 && (rate == 0.0 || s.tokens + elapsed * rate >= burst)
            })
            .map(|(k, _)| k)
            .collect();
        for k in idle {
            let s = sources.remove(k);
            by_ip.remove(&s.ip);
        }
    }

    /// Sources in the table (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sources
            .len()
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`), as some proxies write it.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(ip) = entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .and_then(|e| e.parse::<IpAddr>().ok())
    {
        return Some(ip);
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_per_source_are_capped_and_released() {
        let limits = IpLimits::new(2, 0, vec![]);
        let now = Instant::now();
        let a = limits.admit(ip("10.0.0.1"), now).unwrap();
        let _b = limits.admit(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            limits.admit(ip("10.0.0.1"), now),
            Err(Refusal::TooManyConnections)
        );
        assert!(limits.admit(ip("10.0.0.2"), now).is_ok(), "per source");
        // The same address over IPv4-mapped IPv6 is the same source.
        assert_eq!(
            limits.admit(ip("::ffff:10.0.0.1"), now),
            Err(Refusal::TooManyConnections)
        );
        limits.release(a);
        assert!(limits.admit(ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn handshakes_spend_a_bucket_that_refills_at_the_rate() {
        let limits = IpLimits::new(0, 2, vec![]);
        let start = Instant::now();
        let burst = (2.0 * BURST_SECS) as usize;
        for _ in 0..burst {
            let t = limits.admit(ip("10.0.0.1"), start).unwrap();
            limits.release(t);
        }
        assert_eq!(limits.admit(ip("10.0.0.1"), start), Err(Refusal::TooFast));
        let later = start + Duration::from_millis(600);
        assert!(
            limits.admit(ip("10.0.0.1"), later).is_ok(),
            "one token back"
        );
        assert_eq!(limits.admit(ip("10.0.0.1"), later), Err(Refusal::TooFast));
        // Kept while refilling, forgotten once full and unused.
        limits.sweep(later);
        assert_eq!(limits.tracked(), 1);
        limits.release(IpTicket(0));
        limits.sweep(later + Duration::from_secs(60));
        assert_eq!(limits.tracked(), 0);
    }

    #[test]
    fn trusted_proxies_and_disabled_limits_count_nothing() {
        let limits = IpLimits::new(1, 1, vec!["10.1.0.0/16".parse().unwrap()]);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(limits.admit(ip("10.1.2.3"), now), Ok(IpTicket::FORWARDED));
        }
        let off = IpLimits::new(0, 0, vec![]);
        assert_eq!(off.admit(ip("10.0.0.1"), now), Ok(IpTicket::UNCOUNTED));
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn a_client_behind_a_trusted_proxy_is_counted_under_its_forwarded_address() {
        let limits = IpLimits::new(1, 0, vec!["10.1.0.0/16".parse().unwrap()]);
        let now = Instant::now();
        // The client wrote the leftmost entry itself; the proxy appended what it saw.
        let first = limits
            .admit_forwarded(Some("6.6.6.6, 203.0.113.7"), now)
            .unwrap();
        assert_ne!(first, IpTicket::UNCOUNTED);
        assert_eq!(
            limits.admit_forwarded(Some("7.7.7.7,203.0.113.7"), now),
            Err(Refusal::TooManyConnections),
            "a forged left entry does not change the address"
        );
        // A chain of trusted proxies is skipped; a port is tolerated.
        assert_eq!(
            limits.admit_forwarded(Some("203.0.113.7:5555, 10.1.9.9"), now),
            Err(Refusal::TooManyConnections)
        );
        assert!(
            limits
                .admit_forwarded(Some("[2001:db8::1]:443"), now)
                .is_ok()
        );
        assert_eq!(
            limits.admit_forwarded(Some("[2001:db8::1]"), now),
            Err(Refusal::TooManyConnections),
            "the same client, written without a port"
        );
        limits.release(first);
        assert!(limits.admit_forwarded(Some("203.0.113.7"), now).is_ok());
        // Nothing usable: the proxy's own connection, not counted.
        for header in [None, Some(""), Some("unknown"), Some("10.1.0.1")] {
            assert_eq!(limits.admit_forwarded(header, now), Ok(IpTicket::UNCOUNTED));
        }
    }
}
