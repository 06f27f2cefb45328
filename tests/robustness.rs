//! Hostile, broken and slow clients, overload and shutdown: what each one gets, and proof that
//! everyone else keeps being served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_documented_answer_and_others_keep_being_served() {
    let server = Server::start(&[
        "--shards",
        "2",
        "--handshake-timeout",
        "1s",
        "--max-handshake-bytes",
        "4096",
    ]);
    let (mut bystander, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    let addr = server.ws;

    tokio::task::spawn_blocking(move || {
        // Oversized frame: 1009.
        let mut c = RawClient::upgrade(addr, "/v1/realtime?project=p&channels[]=c");
        assert_eq!(c.read_json()["type"], "connected");
        c.send_frame(true, 1, &vec![b'a'; 64_001]);
        assert_eq!(c.read_close_code(), Some(1009));

        // A fragmented message whose total exceeds the limit: 1009 too.
        let mut c = RawClient::upgrade(addr, "/v1/realtime?project=p&channels[]=c");
        c.send_frame(false, 1, &vec![b'a'; 40_000]);
        c.send_frame(true, 0, &vec![b'a'; 40_000]);
        assert_eq!(c.read_close_code(), Some(1009));

        // Invalid UTF-8 in a text frame: 1007.
        let mut c = RawClient::upgrade(addr, "/v1/realtime?project=p&channels[]=c");
        c.send_frame(true, 1, &[b'{', 0xff, 0xfe, b'}']);
        assert_eq!(c.read_close_code(), Some(1007));

        // Unmasked client frame: 1002.
        let mut c = RawClient::upgrade(addr, "/v1/realtime?project=p&channels[]=c");
        c.write(&[0x81, 0x02, b'h', b'i']);
        assert_eq!(c.read_close_code(), Some(1002));

        // Reserved opcode: 1002.
        let mut c = RawClient::upgrade(addr, "/v1/realtime?project=p&channels[]=c");
        c.send_frame(true, 0x3, b"x");
        assert_eq!(c.read_close_code(), Some(1002));

        // Wrong path: 404 with a JSON body.
        let mut c = RawClient::tcp(addr);
        c.send_upgrade("/v2/elsewhere");
        let head = c.read_http_head();
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let body = String::from_utf8(c.read_to_end()).unwrap();
        assert!(body.contains("/v1/realtime"), "{body}");

        // A plain GET on the realtime path: 426.
        let mut c = RawClient::tcp(addr);
        c.write(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(c.read_http_head().starts_with("HTTP/1.1 426"));

        // A request head over the limit: 431.
        let mut c = RawClient::tcp(addr);
        let big = format!(
            "GET /v1/realtime HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(5000)
        );
        c.write(big.as_bytes());
        assert!(c.read_http_head().starts_with("HTTP/1.1 431"));

        // Slowloris: an unfinished request head is dropped after the handshake timeout.
        let mut c = RawClient::tcp(addr);
        c.write(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n");
        let t = Instant::now();
        let rest = c.read_to_end();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "slow handshake held {:?}",
            t.elapsed()
        );
    })
    .await
    .unwrap();

    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut bystander).await["data"]["id"], id.as_str());
    assert!(server.metric_with("herald_protocol_errors_total", "1009") >= 2.0);
    assert!(server.metric_with("herald_handshake_rejected_total", "timeout") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn slow_consumer_is_closed_with_1013_while_its_neighbour_gets_everything() {
    // One shard: the slow and the healthy client share an event loop.
    let server = Server::start(&["--shards", "1", "--max-outbound-bytes", "1048576"]);
    let url = server.url("/v1/realtime?project=p&channels[]=big");
    let (mut healthy, _) = connect(&url).await;
    let mut slow = {
        let addr = server.ws;
        tokio::task::spawn_blocking(move || {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            sock.connect(&addr.into()).unwrap();
            let mut c = RawClient::from_stream(sock.into());
            c.send_upgrade("/v1/realtime?project=p&channels[]=big");
            assert!(c.read_http_head().starts_with("HTTP/1.1 101"));
            assert_eq!(c.read_json()["type"], "connected");
            c
        })
        .await
        .unwrap()
    };

    const EVENTS: usize = 120;
    let blob = "x".repeat(100_000);
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = got.clone();
    let reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while ids.len() < EVENTS {
            let ev = next_json(&mut healthy).await;
            ids.push(ev["data"]["id"].as_str().unwrap().to_owned());
            counted.store(ids.len(), std::sync::atomic::Ordering::Release);
        }
        ids
    });
    let mut published = Vec::new();
    for n in 0..EVENTS {
        // A healthy client keeps up: the publisher stays at most 4 events (400 KB, under the
        // 1 MiB queue limit) ahead of it, however busy the machine running the test is.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got.load(std::sync::atomic::Ordering::Acquire) + 4 < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the healthy client stopped reading"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        published.push(server.publish(
            json!({"project": "p", "channels": ["big"], "payload": {"n": n, "blob": blob}}),
        ));
    }
    let received = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        received, published,
        "the healthy client must get every event, in order"
    );

    // The slow client now reads what was sent before herald gave up on it: a prefix of the
    // events, then a close frame with 1013.
    let code = tokio::task::spawn_blocking(move || slow.read_close_code())
        .await
        .unwrap();
    assert_eq!(code, Some(1013));
    assert_eq!(server.metric("herald_slow_consumers_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_everyone_with_1001_and_exits_zero_within_the_drain_timeout() {
    let mut server = Server::start(&["--shards", "2", "--drain-timeout", "3s"]);
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(
            connect(&server.url("/v1/realtime?project=p&channels[]=c"))
                .await
                .0,
        );
    }
    // A peer that never answers the close handshake must not hold the shutdown past the timeout.
    let mut mute = RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
    let started = Instant::now();
    server.sigterm();
    for ws in &mut clients {
        assert_eq!(expect_close(ws, Duration::from_secs(5)).await, 1001);
    }
    // While the mute peer holds the drain open, load balancers are told to send no one new.
    let (status, body) = server.get("/readyz");
    assert_eq!((status, body.contains("draining")), (503, true), "{body}");
    let status = tokio::task::spawn_blocking(move || {
        let s = server.wait_exit(Duration::from_secs(6));
        (s, server)
    })
    .await
    .unwrap()
    .0
    .expect("herald exits");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(mute.read_close_code(), Some(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_on_every_shard_gets_every_event_exactly_once_in_order() {
    raise_fd_limit();
    const CLIENTS: usize = 2000;
    const EVENTS: usize = 100;
    // Every client comes from 127.0.0.1: the per-IP limits are not what this test is about.
    let server = Server::start(&[
        "--shards",
        "2",
        "--max-connections-per-ip",
        "0",
        "--handshakes-per-ip",
        "0",
    ]);
    let url = server.url("/v1/realtime?project=p&channels[]=news");
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let mut clients = Vec::with_capacity(CLIENTS);
    for chunk in 0..CLIENTS / 100 {
        let batch = (0..100).map(|_| {
            let url = url.clone();
            async move {
                let (mut ws, _) =
                    tokio_tungstenite::connect_async_with_config(url, Some(config), false)
                        .await
                        .expect("connect");
                let c = next_json(&mut ws).await;
                assert_eq!(c["type"], "connected");
                ws
            }
        });
        clients.extend(futures_util::future::join_all(batch).await);
        assert_eq!(clients.len(), (chunk + 1) * 100);
    }
    for shard in ["0", "1"] {
        let n = server.metric_with("herald_connections", &format!("shard=\"{shard}\""));
        assert!(
            n > 0.0,
            "shard {shard} holds no connections: the test would not cover two shards"
        );
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(EVENTS);
                while ids.len() < EVENTS {
                    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                            ids.push(v["data"]["id"].as_str().unwrap().to_owned());
                        }
                        Ok(Some(Ok(_))) => {}
                        other => {
                            panic!("client stopped early after {} events: {other:?}", ids.len())
                        }
                    }
                }
                // Anything more would be a duplicate.
                let extra = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
                assert!(extra.is_err(), "unexpected extra message: {extra:?}");
                ids
            })
        })
        .collect();
    let published: Vec<String> = (0..EVENTS)
        .map(|n| server.publish(json!({"project": "p", "channels": ["news"], "payload": {"n": n}})))
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), published);
    }
}

/// Starts herald with an open-file limit of 160 and fills it with 200 clients. Returns the
/// clients that got their upgrade and those still waiting in the backlog.
fn saturate(extra: &[&str]) -> (Server, Vec<RawClient>, Vec<RawClient>) {
    use std::os::unix::process::CommandExt;
    let server = Server::start_with(extra, |cmd| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| rlimit::setrlimit(rlimit::Resource::NOFILE, 160, 160));
        }
    });
    let mut clients: Vec<RawClient> = (0..200).map(|_| RawClient::tcp(server.ws)).collect();
    for c in &mut clients {
        c.send_upgrade("/v1/realtime?project=p&channels[]=c");
    }
    // Give herald time to answer everyone it can take; then sort the clients.
    std::thread::sleep(Duration::from_secs(1));
    let (mut accepted, mut waiting) = (Vec::new(), Vec::new());
    for mut c in clients {
        match c.poll_http_head(Duration::from_millis(20)) {
            Some(head) => {
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                assert_eq!(c.read_json()["type"], "connected");
                accepted.push(c);
            }
            None => waiting.push(c),
        }
    }
    (server, accepted, waiting)
}

/// While saturated, herald must idle rather than retry accept() in a tight loop.
fn assert_not_spinning(server: &Server) {
    let cpu0 = server.cpu_seconds();
    std::thread::sleep(Duration::from_secs(2));
    let spent = server.cpu_seconds() - cpu0;
    assert!(
        spent < 0.5,
        "herald burned {spent} s of CPU in 2 s while saturated"
    );
}

/// Closes `n` accepted clients and expects as many waiting ones to be upgraded (which ones
/// depends on the shard whose backlog they sit in).
fn assert_waiting_clients_get_in(
    accepted: &mut Vec<RawClient>,
    waiting: &mut [RawClient],
    n: usize,
) {
    accepted.truncate(accepted.len() - n);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut upgraded = vec![false; waiting.len()];
    while upgraded.iter().filter(|&&u| u).count() < n {
        assert!(
            Instant::now() < deadline,
            "waiting clients were not accepted after descriptors were freed"
        );
        for (c, done) in waiting
            .iter_mut()
            .zip(upgraded.iter_mut())
            .filter(|(_, d)| !**d)
        {
            if let Some(head) = c.poll_http_head(Duration::from_millis(5)) {
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                *done = true;
            }
        }
    }
}

#[test]
fn at_the_connection_limit_clients_wait_and_the_admin_api_keeps_working() {
    let (server, mut accepted, mut waiting) = saturate(&["--shards", "2"]);
    assert!(
        server.startup_line.contains("capacity 96 connections"),
        "{}",
        server.startup_line
    );
    assert_eq!(accepted.len(), 96);
    assert_eq!(waiting.len(), 104);
    assert_not_spinning(&server);
    // The reserve keeps the admin listener usable: publish, and every holder receives it.
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    for c in &mut accepted {
        assert_eq!(c.read_json()["data"]["id"], id.as_str());
    }
    assert!(server.metric_with("herald_accept_errors_total", "connection_limit") >= 1.0);
    assert_waiting_clients_get_in(&mut accepted, &mut waiting, 30);
}

#[test]
fn when_accept_fails_with_emfile_herald_backs_off_and_keeps_serving() {
    // A cap above what the descriptors allow: accept() itself runs out of descriptors.
    let (server, mut accepted, mut waiting) =
        saturate(&["--shards", "1", "--max-connections", "100000"]);
    assert!(
        !waiting.is_empty(),
        "the descriptor limit was never reached"
    );
    assert!(accepted.len() > 100, "only {} accepted", accepted.len());
    assert_not_spinning(&server);
    // Served while saturated: WebSocket pings are answered.
    for c in accepted.iter_mut().take(10) {
        c.send_frame(true, 0x9, b"hi");
        assert_eq!(c.read_frame(), Some((0xA, b"hi".to_vec())));
    }
    assert_waiting_clients_get_in(&mut accepted, &mut waiting, 20);
    // With descriptors free again (and the backlog gone) the admin listener answers, and the
    // failures were counted.
    drop(waiting);
    accepted.truncate(accepted.len() - 20);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(server.metric_with("herald_accept_errors_total", "fd_limit") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_burst_is_read_to_the_end() {
    // More than one event's share of reads (16 x 64 KiB) arrives at once: nothing may stall.
    let server = Server::start(&["--shards", "1", "--echo-path", "/echo"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/echo"))
        .await
        .expect("connect");
    let big: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    futures_util::SinkExt::send(&mut ws, Message::Binary(big.clone().into()))
        .await
        .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::Binary(big.into()));
}

#[test]
fn a_reader_that_stalls_mid_burst_gets_every_event_intact_and_in_order() {
    // The client's receive buffer is tiny and it reads nothing until the burst is over, so
    // herald's writes stop in the middle of frames and the rest waits in the outbox; later
    // events must queue behind it. Events alternate between two channels the client listens
    // to, so consecutive events take different routes through the shard's batch.
    let server = Server::start(&["--shards", "1", "--max-outbound-bytes", "33554432"]);
    let addr = server.ws;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut client = RawClient::from_stream(sock.into());
    client.send_upgrade("/v1/realtime?project=p&channels[]=a&channels[]=b");
    assert!(client.read_http_head().starts_with("HTTP/1.1 101"));
    let connected = client.read_json();
    let sub_id = connected["data"]["subscriptions"][0]
        .as_str()
        .unwrap()
        .to_owned();

    // Large and small events mixed, about 8 MB in all: more than the kernel's socket buffers
    // (herald's send buffer grows to 4 MB by default), so writes stop inside frames.
    const EVENTS: usize = 120;
    let pad = |n: usize| {
        let len = if n.is_multiple_of(3) {
            200_000
        } else {
            500 + n
        };
        "y".repeat(len)
    };
    let mut published = Vec::new();
    for n in 0..EVENTS {
        let channel = if n % 2 == 0 { "a" } else { "b" };
        published.push(server.publish(
            json!({"project": "p", "channels": [channel], "payload": {"n": n, "pad": pad(n)}}),
        ));
    }
    for (n, id) in published.iter().enumerate() {
        let ev = client.read_json();
        assert_eq!(ev["type"], "event");
        assert_eq!(
            ev["data"]["id"],
            id.as_str(),
            "event {n} out of order or lost"
        );
        assert_eq!(ev["data"]["payload"]["n"], n);
        assert_eq!(ev["data"]["payload"]["pad"], pad(n).as_str());
        assert_eq!(ev["data"]["subscriptions"], json!([sub_id]));
    }
    assert_eq!(server.metric("herald_slow_consumers_total"), 0.0);
}

/// A client that never answers pings stays connected while its TCP acknowledges the events it
/// is sent (a ping would tell nothing more), and is pinged and closed by the idle timeout as
/// soon as nothing is sent to it. Without TCP keepalive, whose probes its TCP would answer.
#[test]
fn peers_that_acknowledge_events_are_not_pinged_and_silent_ones_time_out() {
    let server = Server::start(&[
        "--ping-interval",
        "1s",
        "--idle-timeout",
        "3s",
        "--tcp-keepalive",
        "false",
    ]);
    let mut busy = RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
    let mut quiet = RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=q");
    assert_eq!(busy.read_json()["type"], "connected");
    assert_eq!(quiet.read_json()["type"], "connected");
    let started = Instant::now();
    let mut events = 0;
    while started.elapsed() < Duration::from_secs(5) {
        server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
        let (op, _) = busy.read_frame().expect("the busy client stays connected");
        assert_eq!(op, 1, "an event, not a ping nor a close");
        events += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(events >= 20, "{events} events in 5 s");
    let mut frames = Vec::new();
    while let Some((op, _)) = quiet.read_frame() {
        frames.push(op);
        if op == 8 {
            break;
        }
    }
    assert_eq!(
        frames,
        vec![9, 8],
        "one ping, then the close of the idle timeout"
    );
    assert!(server.metric_with("herald_idle_pings_total", "saved") >= 2.0);
    assert!(server.metric_with("herald_idle_pings_total", "\"sent\"") >= 1.0);
    // Once nothing is sent to it, the busy client is pinged and times out too.
    assert_eq!(busy.read_frame().map(|f| f.0), Some(9));
    assert_eq!(busy.read_close_code(), Some(1001));
}

/// A peer that shuts its write side is let go at once, and one that resets while a burst is
/// being written to it is dropped: neither disturbs a neighbour, and the connection count
/// comes back. Runs on both drivers (the suite runs again with HERALD_IO=uring).
#[test]
fn half_closed_and_reset_peers_are_dropped_while_a_neighbour_gets_everything() {
    let server = Server::start(&["--shards", "1"]);
    let path = "/v1/realtime?project=p&channels[]=c";
    let mut neighbour = RawClient::upgrade(server.ws, path);
    assert_eq!(neighbour.read_json()["type"], "connected");
    let mut half = RawClient::upgrade(server.ws, path);
    assert_eq!(half.read_json()["type"], "connected");
    half.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        half.read_frame(),
        None,
        "closed by herald after the peer's FIN"
    );
    // Resets mid-write: a reader that never reads, with a small window, then SO_LINGER 0.
    let reset = {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&server.ws.into()).unwrap();
        let mut c = RawClient::from_stream(socket.into());
        c.send_upgrade(path);
        assert!(c.read_http_head().starts_with("HTTP/1.1 101"));
        c
    };
    let blob = "x".repeat(20_000);
    let publish = |n: usize| {
        server
            .publish(json!({"project": "p", "channels": ["c"], "payload": {"n": n, "blob": blob}}))
    };
    // 600 KB: past its window and herald's send buffer, so output is queued when it resets.
    let mut ids: Vec<String> = (0..30).map(publish).collect();
    socket2::SockRef::from(&reset.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset);
    ids.extend((30..40).map(publish));
    for id in &ids {
        assert_eq!(neighbour.read_json()["data"]["id"], id.as_str());
    }
    wait_for_one_connection(&server, "the half-closed and reset peers are still counted");
}

/// Reads end at a short read only when epoll will report what comes next: a message that
/// arrives in two parts, the second after a pause, is answered, and a message sent together
/// with the FIN is answered before herald lets the peer go. Runs on both drivers.
#[test]
fn split_messages_and_a_message_sent_with_the_fin_are_both_answered() {
    let server = Server::start(&["--shards", "1"]);
    let path = "/v1/realtime?project=p&channels[]=c";
    let ping = herald::ws::decoder::encode_client_frame(
        true,
        1,
        br#"{"type":"ping"}"#,
        [0x12, 0x34, 0x56, 0x78],
    );
    let mut split = RawClient::upgrade(server.ws, path);
    assert_eq!(split.read_json()["type"], "connected");
    for _ in 0..3 {
        split.write(&ping[..5]);
        std::thread::sleep(Duration::from_millis(50));
        split.write(&ping[5..]);
        assert_eq!(split.read_json()["type"], "pong");
    }
    let mut with_fin = RawClient::upgrade(server.ws, path);
    assert_eq!(with_fin.read_json()["type"], "connected");
    // The message and the FIN in one segment (corked until the shutdown), so that herald's
    // first look at the socket finds both: the FIN raises no edge of its own.
    socket2::SockRef::from(&with_fin.stream)
        .set_tcp_cork(true)
        .unwrap();
    with_fin.write(&ping);
    with_fin.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(with_fin.read_json()["type"], "pong");
    assert_eq!(
        with_fin.read_frame(),
        None,
        "closed by herald after the peer's FIN"
    );
    wait_for_one_connection(&server, "the peer that sent its FIN is still counted");
}

/// Waits up to 5 s for herald to count a single connection again; fails with `what` if not.
fn wait_for_one_connection(server: &Server, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("herald_connections") > 1.0 {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// herald's executable mappings in its smaps: (size kB, resident kB, advised MADV_RANDOM).
fn herald_code(pid: u32) -> Vec<(u64, u64, bool)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut mapping = "";
    let (mut size, mut rss) = (0, 0);
    let mut code = Vec::new();
    let kb = |v: &str| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for line in smaps.lines() {
        if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            mapping = line;
        } else if !(mapping.contains(" r-xp ") && mapping.ends_with("/herald")) {
            continue;
        } else if let Some(v) = line.strip_prefix("Size:") {
            size = kb(v);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            rss = kb(v);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            code.push((size, rss, flags.split_whitespace().any(|f| f == "rr")));
        }
    }
    assert!(
        !code.is_empty(),
        "no executable mapping of herald in its smaps"
    );
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_of_every_process_is_mapped_on_demand_and_start_up_code_is_let_go() {
    // With 52 processes on one machine each one's resident code counts: herald advises
    // MADV_RANDOM on its code and read-only data before main (`rr` in /proc/PID/smaps), and
    // unmaps them once start-up is over, so that only what serving runs is mapped again.
    let server = Server::start(&["--shards", "1"]);
    let code = herald_code(server.pid());
    assert!(
        code.iter().all(|c| c.2),
        "herald's code is not advised MADV_RANDOM"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (size, rss): (u64, u64) = herald_code(server.pid())
            .iter()
            .fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
        // Start-up maps about 60 % of the code; what serving runs is a fraction of that.
        if rss * 3 < size {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{rss} of {size} kB of herald's code still mapped 10 s after start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And it still serves: the code comes back as it runs.
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    server.publish(json!({"project": "p", "channels": ["c"], "payload": {"after": "release"}}));
    assert_eq!(
        next_json(&mut ws).await["data"]["payload"]["after"],
        "release"
    );
}
