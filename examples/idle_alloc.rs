//! Where herald's memory per idle connection goes (issue 2's breakdown).
//!
//! Owns one measurement: it runs a gateway in this process (2 shards, loopback, ephemeral ports)
//! under a counting global allocator that wraps mimalloc (the allocator of the `herald` binary),
//! loads it with `herald-bench idle` child processes (SMALL connections, then LARGE), and prints
//! per connection: live heap bytes as requested and as mimalloc's size classes round them, live allocations by
//! requested size, RSS, and the sizes of the structs every connection embeds. Children are
//! stopped by PID; it ends by itself.
//!
//! Run: `cargo build --release --workspace --bins --examples && target/release/examples/idle_alloc [SMALL LARGE]`

use std::alloc::{GlobalAlloc, Layout};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mimalloc::MiMalloc;

/// Allocations up to this many bytes are counted by exact size; larger ones by power of two.
const EXACT: usize = 4096;
const POW2_BUCKETS: usize = 64;

/// Live heap, counted at every allocation and free.
struct Counting {
    requested: AtomicI64,
    count: AtomicI64,
    by_size: [AtomicI64; EXACT + 1],
    large_count: [AtomicI64; POW2_BUCKETS],
    large_bytes: [AtomicI64; POW2_BUCKETS],
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicI64 = AtomicI64::new(0);

#[global_allocator]
static GLOBAL: Counting = Counting {
    requested: ZERO,
    count: ZERO,
    by_size: [ZERO; EXACT + 1],
    large_count: [ZERO; POW2_BUCKETS],
    large_bytes: [ZERO; POW2_BUCKETS],
};

impl Counting {
    fn book(&self, size: usize, sign: i64) {
        let r = Ordering::Relaxed;
        self.requested.fetch_add(sign * size as i64, r);
        self.count.fetch_add(sign, r);
        if size <= EXACT {
            self.by_size[size].fetch_add(sign, r);
        } else {
            let b = (usize::BITS - (size - 1).leading_zeros()) as usize;
            self.large_count[b].fetch_add(sign, r);
            self.large_bytes[b].fetch_add(sign * size as i64, r);
        }
    }
}

// SAFETY: every call is forwarded unchanged to mimalloc; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            self.book(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            self.book(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.book(layout.size(), -1);
        // SAFETY: same contract as ours.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.book(layout.size(), -1);
            self.book(new_size, 1);
        }
        p
    }
}

/// What the gateway holds before any client: the large allocations by power of two, and the
/// exact sizes that add up to 64 KiB or more.
fn base_tables(base: &Snapshot) {
    println!("  its large allocations (> {EXACT} B) by power of two:");
    for (b, (&n, &bytes)) in base.large_count.iter().zip(&base.large_bytes).enumerate() {
        if n != 0 {
            println!("    <= {:>10} B: {n} allocations, {bytes} B", 1u64 << b);
        }
    }
    println!("  its small allocations adding up to 64 KiB or more:");
    for (size, &n) in base.by_size.iter().enumerate() {
        if n as usize * size >= 64 * 1024 {
            println!("    {size} B x {n}");
        }
    }
}

/// A copy of the counters at one moment.
struct Snapshot {
    requested: i64,
    count: i64,
    by_size: Vec<i64>,
    large_count: Vec<i64>,
    large_bytes: Vec<i64>,
    rss: i64,
}

fn snapshot() -> Snapshot {
    let load = |a: &AtomicI64| a.load(Ordering::Relaxed);
    Snapshot {
        requested: load(&GLOBAL.requested),
        count: load(&GLOBAL.count),
        by_size: GLOBAL.by_size.iter().map(load).collect(),
        large_count: GLOBAL.large_count.iter().map(load).collect(),
        large_bytes: GLOBAL.large_bytes.iter().map(load).collect(),
        rss: rss_bytes(),
    }
}

fn rss_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One `herald-bench idle` child and the moment it reported `settled:`.
struct Bench {
    child: Child,
    settled: mpsc::Receiver<String>,
}

fn start_bench(bench: &str, url: &str, n: usize, sources: &str) -> anyhow::Result<Bench> {
    let mut child = Command::new(bench)
        .args(["idle", "--target", url, "--connections", &n.to_string()])
        .args(["--hold", "600s", "--source-ips", sources])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {bench}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("settled:") || line.contains("error") {
                let _ = tx.send(line);
            }
        }
    });
    Ok(Bench { child, settled: rx })
}

fn wait_settled(b: &Bench) -> anyhow::Result<()> {
    let line = b
        .settled
        .recv_timeout(Duration::from_secs(90))
        .context("herald-bench did not settle within 90 s")?;
    if !line.contains(" 0 failed") {
        bail!("herald-bench: {line}");
    }
    eprintln!("{line}");
    Ok(())
}

/// Lets the shards finish their ticks and mimalloc settle, then snapshots.
fn settle_and_snapshot() -> Snapshot {
    std::thread::sleep(Duration::from_secs(3));
    snapshot()
}

/// The block mimalloc hands out for `size` bytes: 8-byte steps up to 64 bytes, then four size
/// classes per power of two (mimalloc's `_mi_bin`).
fn mimalloc_block(size: usize) -> usize {
    let words = size.div_ceil(8).max(1);
    if words <= 8 {
        return words * 8;
    }
    let top = usize::BITS - 1 - (words - 1).leading_zeros();
    let step = 1usize << (top - 2);
    words.div_ceil(step) * step * 8
}

fn report(small: usize, large: usize, s: &Snapshot, l: &Snapshot) {
    let n = (large - small) as f64;
    let per = |a: i64, b: i64| (b - a) as f64 / n;
    let mut rows = Vec::new();
    let mut blocks = 0.0;
    for size in 0..=EXACT {
        let d = per(s.by_size[size], l.by_size[size]);
        blocks += d * mimalloc_block(size) as f64;
        if d.abs() >= 0.05 {
            rows.push((size, d));
        }
    }
    let mut large_rows = Vec::new();
    for b in 0..POW2_BUCKETS {
        let dc = l.large_count[b] - s.large_count[b];
        let db = l.large_bytes[b] - s.large_bytes[b];
        blocks += db as f64 / n;
        if dc != 0 || db != 0 {
            large_rows.push((b, dc, db));
        }
    }
    println!("\nper connection, from {small} to {large} idle subscribed connections:");
    println!("  RSS                     {:8.1} B", per(s.rss, l.rss));
    println!(
        "  live heap, requested    {:8.1} B",
        per(s.requested, l.requested)
    );
    println!(
        "  live heap, in mimalloc  {:8.1} B   (small sizes rounded to mimalloc's classes)",
        blocks
    );
    println!("  live allocations        {:8.2}", per(s.count, l.count));
    println!("\n  live allocations by requested size (>= 0.05 per connection):");
    for (size, d) in rows {
        let block = mimalloc_block(size);
        println!(
            "    {size:5} B (block {block:4}) x {d:6.2} = {:7.1} B",
            d * block as f64
        );
    }
    println!("  large allocations (> {EXACT} B) by power of two: tables that grow with the count");
    for (b, dc, db) in large_rows {
        println!(
            "    <= {:>10} B: {dc:+} allocations, {db:+} B = {:7.1} B per connection",
            1u64 << b,
            db as f64 / n
        );
    }
}

fn sizes() {
    use std::mem::size_of;
    /// Mirrors the shard's private slot and slab's entry (an enum of `Vacant(usize)` and the value).
    #[allow(dead_code)]
    struct Slot {
        stream: mio::net::TcpStream,
        conn: herald::conn::Connection,
        wants_write: bool,
    }
    #[allow(dead_code)]
    enum Entry<T> {
        Vacant(usize),
        Occupied(T),
    }
    println!("\nstruct sizes (bytes):");
    println!(
        "  slab entry (Entry<Slot>)        {:4}",
        size_of::<Entry<Slot>>()
    );
    println!(
        "  Slot {{ TcpStream, Connection }}  {:4}",
        size_of::<Slot>()
    );
    println!(
        "  conn::Connection                {:4}",
        size_of::<herald::conn::Connection>()
    );
    println!(
        "  Option<protocol::Session>       {:4}",
        size_of::<Option<herald::protocol::Session>>()
    );
    println!(
        "  protocol::Subscription (heap)   {:4}",
        size_of::<herald::protocol::Subscription>()
    );
    println!(
        "  outbox::Outbox                  {:4}",
        size_of::<herald::outbox::Outbox>()
    );
    println!(
        "  ws::decoder::Decoder            {:4}",
        size_of::<herald::ws::decoder::Decoder>()
    );
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("usage: idle_alloc [SMALL LARGE]"))
        .collect::<anyhow::Result<_>>()?;
    let (small, large) = match args[..] {
        [] => (1000, 19000),
        [s, l] if l > s && s > 0 => (s, l),
        _ => bail!("usage: idle_alloc [SMALL LARGE] with 0 < SMALL < LARGE"),
    };
    // herald-bench: $HERALD_BENCH, else next to this binary or one level up (cargo's layout).
    let exe = std::env::current_exe()?;
    let bench = std::env::var_os("HERALD_BENCH")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|dir| dir.join("herald-bench"))
                .find(|p| p.exists())
        })
        .context("herald-bench not found (cargo build --release --workspace --bins, or set HERALD_BENCH)")?;
    let bench = bench.to_string_lossy().into_owned();

    let mut config = herald::config::Config::for_tests();
    config.shards = Some(2);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = herald::gateway::run(config, |info| {
            let _ = tx.send(info.listen);
        });
        if let Err(e) = r {
            eprintln!("gateway failed: {e}");
        }
    });
    let listen = rx
        .recv_timeout(Duration::from_secs(10))
        .context("the gateway did not start")?;
    let url = format!("ws://{listen}/v1/realtime?project=p&channels[]=files");
    let started = Instant::now();
    let base = settle_and_snapshot();

    let mut benches = vec![start_bench(&bench, &url, small, "127.0.0.2-127.0.0.10")?];
    wait_settled(&benches[0])?;
    let at_small = settle_and_snapshot();
    // Two more processes: one holds at most ~19,900 sockets.
    let grow = large - small;
    for (i, sources) in ["127.0.0.11-127.0.0.35", "127.0.0.36-127.0.0.60"]
        .iter()
        .enumerate()
    {
        let n = grow / 2 + usize::from(i == 0) * (grow % 2);
        benches.push(start_bench(&bench, &url, n, sources)?);
    }
    for b in &benches[1..] {
        wait_settled(b)?;
    }
    let at_large = settle_and_snapshot();
    for b in &mut benches {
        let _ = b.child.kill();
        let _ = b.child.wait();
    }

    println!(
        "gateway alone: RSS {:.1} MiB, live heap {:.1} MiB in {} allocations",
        base.rss as f64 / 1048576.0,
        base.requested as f64 / 1048576.0,
        base.count
    );
    base_tables(&base);
    report(small, large, &at_small, &at_large);
    sizes();
    eprintln!("done in {:.0?}", started.elapsed());
    // The gateway thread runs until a signal; this measurement is over.
    std::process::exit(0);
}
