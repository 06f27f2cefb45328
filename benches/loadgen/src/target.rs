//! Where the load goes: target URLs (`ws://` with the upgrade request per channel, or `tcp://`),
//! local source addresses, and the blocking start-up probe.
//!
//! Owns turning command-line addresses into resolved sockets and request bytes, and checking
//! them once before any load starts. Must not hold connections: the engine does that.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::{Response, parse_response, refusal_at_eof};

/// How long the start-up probe waits for the target.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to connect and what to send there.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// A plain TCP target (`tcp://`): done when the first byte arrives; nothing is sent.
    pub tcp: bool,
    /// The upgrade request per channel (one for a URL taken as is), the same bytes for every
    /// connection of that channel.
    pub requests: Vec<Vec<u8>>,
    /// The `Sec-WebSocket-Accept` value the server must answer with.
    pub accept: String,
}

impl Target {
    /// A target whose URL is used as is (its query names the channels, if any).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        Self::with_channels(url, &[])
    }

    /// A target with one upgrade request per channel: `channels[]=NAME` is appended to the URL's
    /// query for each name. No names: the URL as is.
    pub fn with_channels(url: &str, channels: &[String]) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("tcp://") {
            let addr = resolve(url, rest.trim_end_matches('/'))?;
            return Ok(Self {
                url: url.to_owned(),
                addr,
                tcp: true,
                requests: vec![Vec::new()],
                accept: String::new(),
            });
        }
        if url.starts_with("wss://") {
            bail!("{url}: TLS (wss://) is not supported; point herald-bench at a ws:// listener");
        }
        let Some(rest) = url.strip_prefix("ws://") else {
            bail!("{url}: the target must be a ws:// URL (or tcp://HOST:PORT for `connect`)");
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        ensure!(!authority.is_empty(), "{url}: no host");
        let addr = resolve(url, authority)?;
        // One key per process: servers need nothing per connection from it, and the answer is
        // still checked on every connection.
        let key = tungstenite::handshake::client::generate_key();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let request = |path: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: herald-bench\r\n\r\n"
            )
            .into_bytes()
        };
        let requests = if channels.is_empty() {
            vec![request(&path)]
        } else {
            let sep = if path.contains('?') { '&' } else { '?' };
            channels
                .iter()
                .map(|c| request(&format!("{path}{sep}channels[]={c}")))
                .collect()
        };
        Ok(Self {
            url: url.to_owned(),
            addr,
            tcp: false,
            requests,
            accept,
        })
    }
}

fn resolve(url: &str, authority: &str) -> anyhow::Result<SocketAddr> {
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {with_port}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{url}: {with_port} has no IPv4 address"))
}

/// Parses `127.0.0.2-127.0.0.60,127.0.1.1` into a list of addresses.
pub(crate) fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: Ipv4Addr = first
            .trim()
            .parse()
            .with_context(|| format!("--source-ips: {first:?} is not an IPv4 address"))?;
        let last: Ipv4Addr = last
            .trim()
            .parse()
            .with_context(|| format!("--source-ips: {last:?} is not an IPv4 address"))?;
        let (a, b) = (u32::from(first), u32::from(last));
        ensure!(a <= b, "--source-ips: range {part} runs backwards");
        ensure!(b - a < 65_536, "--source-ips: range {part} is too large");
        out.extend((a..=b).map(Ipv4Addr::from));
    }
    ensure!(!out.is_empty(), "--source-ips: no address given");
    Ok(out)
}

/// Checks every source address can be bound, so a typo fails before the load starts.
pub(crate) fn check_source_ips(ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    for ip in ips {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(IpAddr::V4(*ip), 0).into())
            .with_context(|| {
                format!(
                    "source address {ip} cannot be bound (on loopback any 127.x.y.z works; other \
                     addresses must be configured on an interface)"
                )
            })?;
    }
    Ok(())
}

/// One blocking upgrade before the load starts, so an unreachable target or a refused upgrade
/// is reported plainly instead of as thousands of identical failures.
pub(crate) fn probe(target: &Target, source: Option<Ipv4Addr>) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
    }
    socket
        .connect_timeout(&target.addr.into(), PROBE_TIMEOUT)
        .with_context(|| {
            format!(
                "cannot reach {} ({}): is the server running?",
                target.url, target.addr
            )
        })?;
    let mut stream: StdTcpStream = socket.into();
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream
        .write_all(&target.requests[0])
        .with_context(|| format!("cannot send the upgrade request to {}", target.addr))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if target.tcp && !buf.is_empty() {
            return Ok(());
        }
        if !target.tcp {
            match parse_response(&buf, &target.accept) {
                Response::Upgraded(_) => return Ok(()),
                Response::Refused(reason) => {
                    bail!("{} refused the WebSocket upgrade: {reason}", target.url)
                }
                Response::Incomplete => {}
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("{} did not answer within {PROBE_TIMEOUT:?}", target.url)
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading the answer of {}", target.url));
            }
        };
        if n == 0 {
            let reason = refusal_at_eof(&buf);
            bail!("{} refused the WebSocket upgrade: {reason}", target.url);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t =
            Target::parse("ws://127.0.0.1:9505/v1/realtime?project=p&channels[]=files").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9505".parse().unwrap());
        let req = String::from_utf8(t.requests[0].clone()).unwrap();
        assert!(req.starts_with(
            "GET /v1/realtime?project=p&channels[]=files HTTP/1.1\r\nHost: 127.0.0.1:9505\r\n"
        ));
        let t = Target::parse("ws://127.0.0.1?project=p").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert!(
            String::from_utf8(t.requests[0].clone())
                .unwrap()
                .starts_with("GET /?project=p HTTP/1.1")
        );
        assert!(
            Target::parse("wss://x/")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
        assert!(Target::parse("http://x/").is_err());
        let t = Target::parse("tcp://127.0.0.1:7000").unwrap();
        assert!(t.tcp);
        let t = Target::with_channels(
            "ws://127.0.0.1:1/v1/realtime?project=p",
            &["a".into(), "b".into()],
        )
        .unwrap();
        assert_eq!(t.requests.len(), 2);
        assert!(
            String::from_utf8(t.requests[1].clone())
                .unwrap()
                .starts_with("GET /v1/realtime?project=p&channels[]=b HTTP/1.1")
        );
    }

    #[test]
    fn parses_source_ranges() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4, 127.0.1.1").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], Ipv4Addr::new(127, 0, 1, 1));
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("nope").is_err());
    }
}
