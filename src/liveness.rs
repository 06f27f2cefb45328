//! What the kernel already knows of whether a peer is there: its TCP's acknowledgements.
//!
//! Owns one question a driver asks before a connection's idle ping: has the peer's TCP
//! acknowledged everything sent to it, and how long ago did it last acknowledge anything
//! (`TCP_INFO`)? A peer that keeps acknowledging the events it receives is alive to the
//! network; a WebSocket ping would cost both ends a frame, a wake-up and a pong to learn the
//! same (at a million connections, 33,000 pings and pongs a second). A silent connection is
//! asked too: the listeners' TCP keepalive (`--tcp-keepalive`, set by the gateway) makes the
//! kernel probe it before its ping is due, and the probe's answer is an acknowledgement. Knows
//! nothing of connections or protocols: the connection decides what the answer means.

use std::os::fd::RawFd;

/// Seconds since the peer last acknowledged data, when every byte written to the socket has
/// been sent and acknowledged; `None` when some is still in flight or queued in the kernel
/// (the peer may be gone or not reading), or when the socket cannot say.
pub fn peer_acked_secs_ago(fd: RawFd) -> Option<u32> {
    let info = tcp_info(fd)?;
    let all_acknowledged = info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0;
    all_acknowledged.then_some(info.tcpi_last_ack_recv / 1000)
}

fn tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, so all zeroes is a valid value, and getsockopt
    // writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointers are to live locals of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    // Older kernels fill less; the fields read here are in every kernel herald runs on (4.6+).
    let enough = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
    (rc == 0 && len as usize >= enough).then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    #[test]
    fn acknowledged_data_is_seen_and_a_non_socket_says_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"event").unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        // Loopback acknowledges at once; give the ACK a moment all the same.
        let start = Instant::now();
        let mut seen = peer_acked_secs_ago(server.as_raw_fd());
        while seen.is_none() && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
            seen = peer_acked_secs_ago(server.as_raw_fd());
        }
        assert_eq!(seen, Some(0));
        // A peer that stops reading: what the socket holds is neither sent nor acknowledged.
        server.set_nonblocking(true).unwrap();
        let chunk = [0u8; 65536];
        while server.write(&chunk).is_ok() {}
        assert_eq!(peer_acked_secs_ago(server.as_raw_fd()), None);
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(peer_acked_secs_ago(file.as_raw_fd()), None);
    }
}
