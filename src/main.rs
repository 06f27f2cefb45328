//! The `herald` command: `serve` runs the gateway, `publish` sends one event to a running one,
//! `doctor` checks whether this machine fits a number of connections.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use herald::bus::PublishRequest;
use herald::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs [`herald::memory::configure_allocator`] before `main` and before Rust's runtime
/// allocates anything: the allocator's settings must precede its first arena.
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = herald::memory::configure_allocator;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Realtime WebSocket gateway (Appwrite Realtime protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(Box<Config>),
    /// Publish one event through a running gateway's admin API.
    Publish(PublishArgs),
    /// Check whether this machine fits N connections: open files, kernel settings, memory.
    /// Prints the fix for each failed check; exits 1 when N does not fit.
    Doctor(Box<DoctorArgs>),
}

#[derive(clap::Args)]
struct DoctorArgs {
    /// Connections to check for (all processes together).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000_000))]
    connections: u64,
    /// herald processes sharing them (where a per-process open-file cap cannot be raised).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    processes: u64,
    /// The settings `herald serve` would run with (`--config FILE` and `HERALD_*` included).
    #[command(flatten)]
    config: Config,
}

#[derive(clap::Args)]
struct PublishArgs {
    /// Admin address of the gateway.
    #[arg(long, env = "HERALD_ADMIN", default_value = "127.0.0.1:9506")]
    admin: String,
    /// The gateway's admin token, when it has one.
    #[arg(long, env = "HERALD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<herald::config::Secret>,
    /// Project (default: the gateway's default project).
    #[arg(long)]
    project: Option<String>,
    /// Channel to publish on (repeat for several).
    #[arg(long = "channel", required = true)]
    channels: Vec<String>,
    /// Event name (repeat for several), e.g. buckets.b.files.f.create.
    #[arg(long = "event")]
    events: Vec<String>,
    /// Role allowed to receive it (repeat; default: any).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Payload: a JSON object.
    #[arg(long)]
    payload: String,
}

fn main() -> anyhow::Result<()> {
    // Done before `main` (CONFIGURE_ALLOCATOR); reported once logging is up.
    let thp = herald::memory::transparent_huge_pages_off();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match thp {
        Ok(true) => {}
        Ok(false) => tracing::info!("transparent huge pages allowed (MIMALLOC_ALLOW_THP=1)"),
        Err(e) => tracing::warn!(error = %e, "cannot switch transparent huge pages off"),
    }
    if let Some(path) = config_file_arg() {
        herald::config::load_file_into_env(&path)?;
    }
    match Cli::parse().command {
        Command::Serve(config) => {
            herald::gateway::run(*config, |info| {
                println!("{info}");
                tracing::info!("ready");
            })?;
            Ok(())
        }
        Command::Publish(args) => publish(args),
        Command::Doctor(args) => doctor(&args),
    }
}

fn doctor(args: &DoctorArgs) -> anyhow::Result<()> {
    use herald::doctor::{Readings, Target, checks, report};
    let target = Target {
        connections: args.connections,
        processes: args.processes,
        max_connections: args.config.max_connections.map(|m| m as u64),
    };
    let readings = Readings::of_this_machine(&target);
    let (text, fits) = report(&target, &checks(&target, &readings));
    print!("{text}");
    if !fits {
        std::process::exit(1);
    }
    Ok(())
}

/// `--config PATH`, `--config=PATH` or `HERALD_CONFIG`, looked up before clap parses anything
/// because the file feeds clap's environment defaults.
fn config_file_arg() -> Option<std::path::PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--config" {
            return args.next().map(Into::into);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(v.into());
        }
    }
    std::env::var_os("HERALD_CONFIG").map(Into::into)
}

fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let payload: serde_json::Value =
        serde_json::from_str(&args.payload).context("--payload is not valid JSON")?;
    let req = PublishRequest {
        project: args.project,
        channels: args.channels,
        events: args.events,
        roles: (!args.roles.is_empty()).then_some(args.roles),
        payload,
        permissions_changed: false,
        user_id: None,
    };
    let url = format!("http://{}/v1/events", args.admin);
    let mut post = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build();
    if let Some(token) = &args.admin_token {
        post = post.header("authorization", format!("Bearer {}", token.expose()));
    }
    let mut resp = post
        .send_json(&req)
        .with_context(|| format!("cannot reach herald's admin API at {url}"))?;
    let status = resp.status();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    if !status.is_success() {
        bail!("publish refused ({status}): {body}");
    }
    println!("{body}");
    Ok(())
}
