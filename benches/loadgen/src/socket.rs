//! Non-blocking client sockets: starting a connect from a chosen source address, telling when it
//! finished, writing what the socket takes, and socket errors in words a user can act on.
//!
//! Owns the system-call side of a client connection. Must not know the protocol spoken on it.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

/// Linux errno values std has no stable `ErrorKind` for.
const EINPROGRESS: i32 = 115;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Writes as much of `bytes` as the socket takes now.
pub(crate) fn write_some(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// A socket error in words a user can act on.
pub(crate) fn explain(op: &str, e: &io::Error, source: Option<Ipv4Addr>) -> String {
    let from = source.map_or_else(String::new, |ip| format!(" from {ip}"));
    match e.raw_os_error() {
        Some(EADDRINUSE | EADDRNOTAVAIL) => format!(
            "{op}: local port exhaustion{from} ({e}): spread the load over more --source-ips \
             (127.0.0.2-127.0.0.60 gives ~1.6 million ports)"
        ),
        Some(EMFILE) => format!(
            "{op}: out of file descriptors ({e}): the process's open-file limit is too low for \
             this many connections"
        ),
        Some(ENFILE) => format!("{op}: the system-wide file table is full ({e})"),
        _ => format!("{op}: {e}"),
    }
}

/// Starts a non-blocking connect from `source` (if any).
pub(crate) fn start_connect(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
) -> Result<TcpStream, String> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(|e| explain("socket", &e, None))?;
    if let Some(ip) = source {
        no_port_at_bind(&socket);
        socket
            .bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())
            .map_err(|e| explain("bind", &e, source))?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // EINPROGRESS: the usual answer of a non-blocking connect.
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(explain("connect", &e, source)),
    }
    // Pongs are tiny and must not wait for Nagle.
    let _ = socket.set_tcp_nodelay(true);
    Ok(TcpStream::from_std(socket.into()))
}

/// Leaves the source port to `connect`, which picks one free for this destination: at bind
/// time the kernel would have to find a port free for every destination, walking its bind
/// table, and with a million sockets over a hundred source addresses that search is a large
/// part of a connect. Best effort: without it, bind picks the port as before.
fn no_port_at_bind(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and a pointer to an int of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Whether a non-blocking connect finished: `Ok(false)` while it is still in progress.
pub(crate) fn connect_done(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_socket_errors() {
        let e = io::Error::from_raw_os_error(EADDRNOTAVAIL);
        assert!(explain("connect", &e, None).contains("port exhaustion"));
        let e = io::Error::from_raw_os_error(EMFILE);
        assert!(explain("socket", &e, None).contains("file descriptors"));
    }
}
