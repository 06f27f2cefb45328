//! `send_zc`: a benchmark, never shipped: whether io_uring's zero-copy send (`SENDMSG_ZC`),
//! or a copying send to a registered file (a fixed descriptor, which spares the kernel taking
//! and dropping a reference to the socket on every request), is cheaper than the plain
//! `SENDMSG` herald's io_uring driver queues for every subscriber.
//!
//! Owns one measurement and must not be used by herald. The traffic has a fan-out's shape: one
//! body, encoded once, goes to every connection as a WebSocket binary frame (a connection's own
//! 2-10 byte header, then the shared body), each connection with one send in flight, flags as
//! herald sets them (`MSG_WAITALL | MSG_NOSIGNAL`), all sends of a round submitted together. A
//! zero-copy send's pages stay pinned until its notification arrives, as a driver would have to
//! keep the record; the next send to the same connection does not wait for it (the socket keeps
//! the order). The kernel is asked to report whether it copied after all
//! (`IORING_SEND_ZC_REPORT_USAGE`): on loopback and veth it always does, since a page pinned for
//! a local receiver is copied when the packet is delivered, so there zero-copy adds work.
//!
//! The modes (`--modes copy,zc,fixed`) each run on their own ring; `fixed` registers every
//! connection's socket with it first.
//!
//! Per payload size and mode it prints the throughput and the CPU seconds per GiB of the sending
//! thread (the driver's cost) and of the receiving thread, a trial lasting until every byte has
//! left the sockets (`TIOCOUTQ` 0: a copying send completes when its bytes are queued, a
//! zero-copy one only when they are acknowledged), after one discarded warm-up trial per mode;
//! the modes alternate round by round so both see the same machine. With `--sink HOST:PORT`
//! the bytes go to `send_zc --serve ADDR` on another machine, the only way to measure a real
//! NIC (this one has none to measure).
//!
//! Run: `cargo build --release -p herald-loadgen && target/release/send_zc` (loopback), or
//! `send_zc --serve 0.0.0.0:9610` on the receiver and `send_zc --sink RECEIVER:9610` here.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use io_uring::types::{Fd, Fixed};
use io_uring::{IoUring, Probe, cqueue, opcode};

/// Longest a trial may take before the run stops with an error.
const TRIAL_LIMIT: Duration = Duration::from_secs(120);
/// The receiving side's read buffer.
const READ_BUF: usize = 256 * 1024;
/// `linux/io_uring.h`: asks a zero-copy send's notification to say whether the kernel copied.
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `linux/io_uring.h`: set in such a notification's result when the kernel copied.
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

#[derive(Parser)]
#[command(
    name = "send_zc",
    about = "Benchmark: io_uring zero-copy sends (SENDMSG_ZC) and sends to registered files against copying sends (SENDMSG), fan-out shaped"
)]
struct Cli {
    /// Connections the body is fanned out to.
    /// At most 8,192: the ring has room for eight completions per connection, and a
    /// completion queue holds at most 65,536.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=8192))]
    connections: u32,
    /// Body sizes in bytes, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,4096,16384,65536,262144"
    )]
    sizes: Vec<usize>,
    /// Bytes sent per trial (one size, one mode), in MiB.
    #[arg(long, default_value_t = 2048)]
    mib: u64,
    /// Rounds; each round runs every size in every mode, rotating which goes first.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The modes compared with `copy` (which always runs): `zc` (SENDMSG_ZC) and `fixed`
    /// (SENDMSG to registered files), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "copy,zc")]
    modes: Vec<Mode>,
    /// Send to `send_zc --serve` at this address instead of a receiving thread on loopback.
    #[arg(long)]
    sink: Option<SocketAddr>,
    /// Only receive: accept connections on this address and discard what arrives.
    #[arg(long)]
    serve: Option<SocketAddr>,
    /// How long `--serve` runs before it exits.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    serve_for: Duration,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Mode {
    /// `SENDMSG` on the socket's descriptor, as herald's driver sends.
    Copy,
    /// `SENDMSG_ZC`.
    #[value(name = "zc")]
    ZeroCopy,
    /// `SENDMSG` on the socket registered with the ring (`IOSQE_FIXED_FILE`).
    Fixed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Copy => "SENDMSG",
            Mode::ZeroCopy => "SENDMSG_ZC",
            Mode::Fixed => "SENDMSG_FIXED",
        }
    }
}

/// What one trial measured.
struct Trial {
    seconds: f64,
    sender_cpu: f64,
    receiver_cpu: Option<f64>,
    bytes: u64,
    /// Zero-copy notifications, and how many of them said the kernel copied after all.
    notifications: u64,
    copied: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(addr) = cli.serve {
        return serve(addr, cli.serve_for);
    }
    let mut modes = vec![Mode::Copy];
    for &m in &cli.modes {
        if !modes.contains(&m) {
            modes.push(m);
        }
    }
    if modes.contains(&Mode::ZeroCopy) {
        check_kernel()?;
    }
    let mut bench = Bench::connect(&cli)?;
    println!(
        "send_zc: {} connections, {} MiB per trial, {} rounds, {}",
        cli.connections,
        cli.mib,
        cli.rounds,
        match cli.sink {
            Some(a) => format!("sink {a}"),
            None => "loopback receiver thread".into(),
        }
    );
    // Connections start cold (slow start, small windows): one discarded trial of each mode.
    for &mode in &modes {
        bench.trial(mode, cli.sizes[0], (cli.mib << 20) / 4)?;
    }
    let mut results: Vec<(usize, Mode, Vec<Trial>)> = Vec::new();
    for round in 0..cli.rounds {
        for &size in &cli.sizes {
            let mut order = modes.clone();
            order.rotate_left(round % modes.len());
            for mode in order {
                let trial = bench.trial(mode, size, cli.mib << 20)?;
                print_trial(round, size, mode, &trial);
                match results.iter_mut().find(|r| r.0 == size && r.1 == mode) {
                    Some(r) => r.2.push(trial),
                    None => results.push((size, mode, vec![trial])),
                }
            }
        }
    }
    for &mode in &modes[1..] {
        print_summary(&cli.sizes, mode, &results);
    }
    bench.stop();
    Ok(())
}

fn check_kernel() -> Result<()> {
    let ring = IoUring::new(8).context("io_uring cannot be set up")?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .context("io_uring probe")?;
    if !probe.is_supported(opcode::SendMsgZc::CODE) {
        // IORING_SEND_ZC_REPORT_USAGE, which the count of copied sends needs, came in 6.2.
        bail!("this kernel has no IORING_OP_SENDMSG_ZC (Linux 6.2 or later)");
    }
    Ok(())
}

/// The sending side's connections, and the loopback receiver if there is one.
struct Bench {
    streams: Vec<TcpStream>,
    receiver: Option<Receiver>,
}

impl Bench {
    fn connect(cli: &Cli) -> Result<Bench> {
        let (addr, receiver) = match cli.sink {
            Some(addr) => (addr, None),
            None => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let addr = listener.local_addr()?;
                (
                    addr,
                    Some(Receiver::start(listener, cli.connections as usize)?),
                )
            }
        };
        let mut streams = Vec::with_capacity(cli.connections as usize);
        for _ in 0..cli.connections {
            let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
            s.set_nodelay(true)?;
            streams.push(s);
        }
        Ok(Bench { streams, receiver })
    }

    /// One trial, timed until every byte has left the sender's sockets (and, on loopback,
    /// has been read): a copying send completes once its bytes are queued, a zero-copy send's
    /// notification only once they are acknowledged, so stopping at the completions would
    /// favour copying by whatever the socket buffers hold.
    fn trial(&mut self, mode: Mode, size: usize, bytes: u64) -> Result<Trial> {
        let received_before = self
            .receiver
            .as_ref()
            .map(|r| r.bytes.load(Ordering::Relaxed));
        let rx_cpu_before = self.receiver.as_ref().map(Receiver::cpu).transpose()?;
        let start = Instant::now();
        let cpu_before = thread_cpu()?;
        let mut sent = send_all(&self.streams, mode, size, bytes)?;
        wait_unsent(&self.streams, start)?;
        let sender_cpu = thread_cpu()? - cpu_before;
        if let (Some(r), Some(before)) = (&self.receiver, received_before) {
            r.wait_for(before + sent.bytes, start)?;
        }
        sent.seconds = start.elapsed().as_secs_f64();
        sent.sender_cpu = sender_cpu;
        if let (Some(r), Some(before)) = (&self.receiver, rx_cpu_before) {
            sent.receiver_cpu = Some(r.cpu()? - before);
        }
        Ok(sent)
    }

    fn stop(self) {
        drop(self.streams);
        if let Some(r) = self.receiver {
            r.stop.store(true, Ordering::Relaxed);
            let _ = r.thread.join();
        }
    }
}

/// One connection's send: its own frame header and the message pointing at it and the body.
struct Slot {
    fd: i32,
    header: [u8; 10],
    header_len: usize,
    iov: [libc::iovec; 2],
    msg: libc::msghdr,
    /// Bytes of the current frame already sent.
    done: usize,
}

/// Sends frames of `size` bytes round the connections until `bytes` have gone.
fn send_all(streams: &[TcpStream], mode: Mode, size: usize, bytes: u64) -> Result<Trial> {
    let body = vec![0x5au8; size];
    let mut slots: Box<[Slot]> = streams.iter().map(|s| new_slot(s, size)).collect();
    let entries = (slots.len() as u32).next_power_of_two().max(8);
    // A connection has one send in flight but may have several notifications still to come:
    // room for eight completions per connection keeps them off the kernel's overflow list.
    let mut ring = IoUring::builder()
        .setup_cqsize(entries * 8)
        .build(entries)?;
    if mode == Mode::Fixed {
        let fds: Vec<i32> = slots.iter().map(|s| s.fd).collect();
        ring.submitter()
            .register_files(&fds)
            .context("register the sockets with the ring")?;
    }
    let result = run_sends(&mut ring, &mut slots, &body, mode, bytes);
    if result.is_err() {
        // Sends may still be in flight, reading `body` and the slots: never free them.
        std::mem::forget(ring);
        std::mem::forget(body);
        std::mem::forget(slots);
    }
    result
}

/// The send loop of [`send_all`]: every frame sent, every notification reaped.
fn run_sends(
    ring: &mut IoUring,
    slots: &mut [Slot],
    body: &[u8],
    mode: Mode,
    bytes: u64,
) -> Result<Trial> {
    let size = body.len();
    let frame_len = slots[0].header_len + size;
    let frames = (bytes / frame_len as u64).max(slots.len() as u64);
    let mut trial = Trial {
        seconds: 0.0,
        sender_cpu: 0.0,
        receiver_cpu: None,
        bytes: frames * frame_len as u64,
        notifications: 0,
        copied: 0,
    };
    let (mut queued, mut finished, mut pending_notifs) = (0u64, 0u64, 0u64);
    for (i, slot) in slots.iter_mut().enumerate() {
        if queued < frames {
            queued += 1;
            push_send(ring, slot, i, body, mode)?;
        }
    }
    let deadline = Instant::now() + TRIAL_LIMIT;
    let mut completions: Vec<cqueue::Entry> = Vec::with_capacity(slots.len() * 2);
    while finished < frames || pending_notifs > 0 {
        if Instant::now() > deadline {
            bail!("a trial took longer than {TRIAL_LIMIT:?}");
        }
        ring.submit_and_wait(1)?;
        completions.clear();
        let mut cq = ring.completion();
        if cq.overflow() > 0 {
            bail!(
                "{} completions overflowed the completion queue",
                cq.overflow()
            );
        }
        completions.extend(&mut cq);
        drop(cq);
        for cqe in &completions {
            let i = cqe.user_data() as usize;
            if cqueue::notif(cqe.flags()) {
                pending_notifs = pending_notifs
                    .checked_sub(1)
                    .context("a notification that no send announced")?;
                trial.notifications += 1;
                if cqe.result() as u32 & IORING_NOTIF_USAGE_ZC_COPIED != 0 {
                    trial.copied += 1;
                }
                continue;
            }
            if cqueue::more(cqe.flags()) {
                pending_notifs += 1;
            }
            if cqe.result() <= 0 {
                let err = io::Error::from_raw_os_error(-cqe.result());
                bail!("{} failed ({}): {err}", mode.name(), cqe.result());
            }
            let slot = &mut slots[i];
            slot.done += cqe.result() as usize;
            if slot.done < frame_len {
                push_send(ring, slot, i, body, mode)?;
                continue;
            }
            finished += 1;
            slot.done = 0;
            if queued < frames {
                queued += 1;
                push_send(ring, slot, i, body, mode)?;
            }
        }
    }
    Ok(trial)
}

fn new_slot(stream: &TcpStream, size: usize) -> Slot {
    let mut header = [0u8; 10];
    header[0] = 0x82; // FIN, binary
    let header_len = if size < 126 {
        header[1] = size as u8;
        2
    } else if size <= u16::MAX as usize {
        header[1] = 126;
        header[2..4].copy_from_slice(&(size as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(size as u64).to_be_bytes());
        10
    };
    Slot {
        fd: stream.as_raw_fd(),
        header,
        header_len,
        iov: [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2],
        // SAFETY: msghdr is plain data; all-zero is a valid empty message.
        msg: unsafe { std::mem::zeroed() },
        done: 0,
    }
}

/// Queues the rest of `slot`'s current frame. The slot lives in a boxed slice that outlives
/// the ring's use of it, and `body` outlives the trial.
fn push_send(ring: &mut IoUring, slot: &mut Slot, i: usize, body: &[u8], mode: Mode) -> Result<()> {
    let mut n = 0;
    let header_left = slot.header_len.saturating_sub(slot.done);
    if header_left > 0 {
        let start = slot.header_len - header_left;
        slot.iov[n] = libc::iovec {
            iov_base: slot.header[start..].as_mut_ptr().cast(),
            iov_len: header_left,
        };
        n += 1;
    }
    let body_done = slot.done.saturating_sub(slot.header_len);
    slot.iov[n] = libc::iovec {
        iov_base: body[body_done..].as_ptr().cast_mut().cast(),
        iov_len: body.len() - body_done,
    };
    n += 1;
    slot.msg.msg_iov = slot.iov.as_mut_ptr();
    slot.msg.msg_iovlen = n;
    let flags = (libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32;
    let msg: *const libc::msghdr = &slot.msg;
    let entry = match mode {
        Mode::Copy => opcode::SendMsg::new(Fd(slot.fd), msg).flags(flags).build(),
        // The registered table holds the sockets in slot order.
        Mode::Fixed => opcode::SendMsg::new(Fixed(i as u32), msg)
            .flags(flags)
            .build(),
        Mode::ZeroCopy => opcode::SendMsgZc::new(Fd(slot.fd), msg)
            .flags(flags)
            .ioprio(IORING_SEND_ZC_REPORT_USAGE)
            .build(),
    };
    let entry = entry.user_data(i as u64);
    // SAFETY: the message, its vectors and the bytes they point at stay put and unchanged
    // until this send's completion (and, zero-copy, its notification) has been reaped; on an
    // error `send_all` leaks them instead of freeing them.
    while unsafe { ring.submission().push(&entry) }.is_err() {
        ring.submit()?;
    }
    Ok(())
}

/// Waits until none of `streams` holds unsent or unacknowledged bytes (`TIOCOUTQ`).
fn wait_unsent(streams: &[TcpStream], start: Instant) -> Result<()> {
    for s in streams {
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one int to the pointer it is given.
            if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
                return Err(io::Error::last_os_error()).context("ioctl(TIOCOUTQ)");
            }
            if queued == 0 {
                break;
            }
            if start.elapsed() > TRIAL_LIMIT {
                bail!("a socket still held {queued} bytes after {TRIAL_LIMIT:?}");
            }
            thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(())
}

/// CPU time (user + system) of the calling thread, in seconds.
fn thread_cpu() -> Result<f64> {
    clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_seconds(clock: libc::clockid_t) -> Result<f64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given.
    if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
        return Err(io::Error::last_os_error()).context("clock_gettime");
    }
    Ok(t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
}

/// The loopback receiving thread: reads every connection and counts the bytes.
struct Receiver {
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
    /// The thread's CPU-time clock, read from here whenever a trial needs it.
    clock: libc::clockid_t,
}

impl Receiver {
    fn start(listener: TcpListener, connections: usize) -> Result<Receiver> {
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bytes.clone(), stop.clone());
        let thread = thread::spawn(move || {
            if let Err(e) = receive(listener, connections, &b, &s) {
                eprintln!("send_zc: receiver: {e:#}");
            }
        });
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is alive (it is joined only in `Bench::stop`), and the call
        // writes one clockid_t to the pointer it is given.
        let rc = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc)).context("pthread_getcpuclockid");
        }
        Ok(Receiver {
            bytes,
            stop,
            thread,
            clock,
        })
    }

    /// The receiving thread's CPU time so far, in seconds.
    fn cpu(&self) -> Result<f64> {
        clock_seconds(self.clock)
    }

    fn wait_for(&self, total: u64, start: Instant) -> Result<()> {
        while self.bytes.load(Ordering::Relaxed) < total {
            if start.elapsed() > TRIAL_LIMIT {
                bail!("the receiver got too little within {TRIAL_LIMIT:?}");
            }
            thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

/// Accepts `connections` sockets, then reads them all (mio, edge-triggered) until stopped.
fn receive(
    listener: TcpListener,
    connections: usize,
    bytes: &AtomicU64,
    stop: &AtomicBool,
) -> Result<()> {
    let mut poll = mio::Poll::new()?;
    let mut streams = Vec::with_capacity(connections);
    for i in 0..connections {
        let (s, _) = listener.accept()?;
        s.set_nonblocking(true)?;
        let mut s = mio::net::TcpStream::from_std(s);
        poll.registry()
            .register(&mut s, mio::Token(i), mio::Interest::READABLE)?;
        streams.push(s);
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    while !stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        for ev in events.iter() {
            let s = &mut streams[ev.token().0];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// `--serve`: accept and discard, for a sender on another machine.
fn serve(addr: SocketAddr, limit: Duration) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("send_zc: receiving on {addr} for {limit:?}");
    let end = Instant::now() + limit;
    listener.set_nonblocking(true)?;
    let mut handles = Vec::new();
    while Instant::now() < end {
        match listener.accept() {
            Ok((s, _)) => handles.push(thread::spawn(move || drain(s, end))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(handles);
    Ok(())
}

fn drain(mut s: TcpStream, end: Instant) {
    let mut buf = vec![0u8; READ_BUF];
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

fn print_trial(round: usize, size: usize, mode: Mode, t: &Trial) {
    let gib = t.bytes as f64 / (1u64 << 30) as f64;
    let rx = t
        .receiver_cpu
        .map(|c| format!(", receiver {:.3} CPU s/GiB", c / gib))
        .unwrap_or_default();
    let copied = if mode == Mode::ZeroCopy {
        format!(", {}/{} notifications copied", t.copied, t.notifications)
    } else {
        String::new()
    };
    println!(
        "round {round} {size:>7} B {:<10}: {:.2} GiB/s, sender {:.3} CPU s/GiB{rx}{copied}",
        mode.name(),
        gib / t.seconds,
        t.sender_cpu / gib,
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per size, `mode`'s ratio to copying in each round (the two trials ran in the same round), as
/// median and range: sender CPU per GiB, both threads' CPU per GiB, throughput.
fn print_summary(sizes: &[usize], mode: Mode, results: &[(usize, Mode, Vec<Trial>)]) {
    println!(
        "\n{} / {}, per round: median [min-max]",
        mode.name(),
        Mode::Copy.name()
    );
    println!("   size  sender CPU per GiB     sender+receiver CPU    throughput");
    for &size in sizes {
        let get = |m: Mode| results.iter().find(|r| r.0 == size && r.1 == m);
        let (Some(c), Some(z)) = (get(Mode::Copy), get(mode)) else {
            continue;
        };
        let pairs = || c.2.iter().zip(&z.2);
        let sender = |t: &Trial| t.sender_cpu / gib(t);
        // With a remote sink the receiver's CPU is not seen here.
        let local = c.2.iter().all(|t| t.receiver_cpu.is_some());
        let total = |t: &Trial| (t.sender_cpu + t.receiver_cpu.unwrap_or(0.0)) / gib(t);
        let rate = |t: &Trial| gib(t) / t.seconds;
        let cell = |f: &dyn Fn(&Trial) -> f64| {
            let mut v: Vec<f64> = pairs().map(|(c, z)| f(z) / f(c)).collect();
            let m = median(&mut v);
            format!("{m:.2}x [{:.2}-{:.2}]", v[0], v[v.len() - 1])
        };
        println!(
            "{size:>7} B  {:<22} {:<22} {}",
            cell(&sender),
            if local { cell(&total) } else { "-".into() },
            cell(&rate)
        );
    }
}

fn gib(t: &Trial) -> f64 {
    t.bytes as f64 / (1u64 << 30) as f64
}
