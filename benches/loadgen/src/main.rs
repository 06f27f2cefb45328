//! `herald-bench`: a lean load generator and benchmark driver for herald (and for anything else
//! that speaks the Appwrite Realtime protocol).
//!
//! Subcommands:
//! - `idle`: one process opens N connections at a controlled rate, answers pings, holds them and
//!   prints a JSON summary (used by `benches/idle_memory.sh`).
//! - `fanout`: the full benchmark. Subscribers in worker processes (split automatically by the
//!   open-file limit), a publisher in this process (HTTP `POST /v1/events` with keep-alive, or
//!   Redis `XADD`), and phases: fixed rates, a search for the highest lossless rate, bursts,
//!   single events (time to the last subscriber), churn, settle and close. Every event's payload
//!   carries `"hb":"PHASE.INDEX.CHANNEL.SEQ.SENT_US"`; every client checks its own sequence for
//!   gaps and duplicates and records end-to-end latency. JSON summary on stdout, an optional
//!   self-contained HTML report, a status line every second on stderr.
//! - `publish`: the publisher alone: M events at a rate.
//! - `connect`: the handshake rate ceiling (open, wait for `connected`, close, repeat), also
//!   against a plain TCP target (`tcp://`), for which `accept-loop` is the server.
//! - `attack`: hostile clients of one kind (huge subscribes, unfinished frames or handshakes,
//!   resume and ping floods, non-readers, a one-address handshake flood, malformed frames) for a
//!   bounded time; JSON summary of what they got (used by `benches/hostile.sh`).
//! - `compare`: merges result files of several servers into ratios, a summary line and one
//!   HTML report.
//!
//! Modules, one concept each:
//! - [`client`]: the connection engine (one mio loop, under 100 bytes per idle connection plus
//!   what the kernel holds), on [`wire`] (the client side of the protocol's bytes), [`socket`]
//!   (non-blocking connects and writes) and [`target`] (URLs, source addresses, the probe);
//! - [`idle`], [`connect`] (with the TCP accept loop), [`publish`]: the single-process modes;
//! - [`attack`]: the hostile clients (tokio, a task per connection: an attacker, not an engine);
//! - [`fanout`]: the coordinator, and [`worker`]: a subscriber process under it;
//! - [`messages`]: every JSON shape exchanged or written, as serde types;
//! - [`report`]: `compare` and the HTML report; [`system`]: /proc, limits, clocks, signals;
//!   [`reasons`]: bounded failure counts.
//!
//! It must not know herald's internals beyond its client frame codec and [`herald::limits`].

mod attack;
mod client;
mod connect;
mod fanout;
mod idle;
mod messages;
mod publish;
mod reasons;
mod report;
mod socket;
mod system;
mod target;
mod wire;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator and benchmark driver for herald (WebSocket, Appwrite Realtime protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open idle subscribed connections, answer pings, hold them, print a JSON summary.
    ///
    /// Exit status: 0 when every connection opened, 1 when some failed, 2 on a setup error.
    Idle(idle::IdleArgs),
    /// Subscribers (in worker processes) plus a publisher: delivery, loss, latency, per phase.
    ///
    /// Exit status: 0 when every connection opened and no checked phase lost, duplicated or
    /// misrouted an event; 1 otherwise; 2 on a setup error.
    Fanout(Box<fanout::FanoutArgs>),
    /// Publish M events at a given rate (HTTP publish API or Redis XADD); JSON summary.
    Publish(publish::PublishArgs),
    /// Handshake rate ceiling: connect, wait for `connected` (or one byte for tcp://), close,
    /// repeat, for a bounded time.
    Connect(connect::ConnectArgs),
    /// A plain TCP accept loop (accept, write one byte, close): the baseline for `connect`.
    AcceptLoop(connect::AcceptLoopArgs),
    /// Hostile clients of one kind for a bounded time; a JSON summary of what they got.
    ///
    /// Exit status: 0 when the attack ran, 2 on a setup error.
    Attack(Box<attack::AttackArgs>),
    /// Merge result files (LABEL=FILE ...) of one scenario: ratios, one summary line, HTML.
    Compare(report::CompareArgs),
    /// Internal: one subscriber process under a `fanout` coordinator (commands on stdin).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Idle(args) => idle::run(&args).and_then(|summary| {
            println!("{}", serde_json::to_string(&summary)?);
            Ok(u8::from(summary.connected != summary.requested))
        }),
        Command::Fanout(args) => fanout::run(&args),
        Command::Attack(args) => attack::run(*args).and_then(|summary| {
            println!("{}", serde_json::to_string(&summary)?);
            Ok(0)
        }),
        Command::Publish(args) => publish::run(&args),
        Command::Connect(args) => connect::run(&args),
        Command::AcceptLoop(args) => connect::accept_loop(&args),
        Command::Compare(args) => report::compare(&args),
        Command::Worker(args) => worker::run(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("herald-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
