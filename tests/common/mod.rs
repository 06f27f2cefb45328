//! Test harness: starts real herald processes on loopback and talks to them as clients do.
//! Everything but starting herald itself lives in [`harness`], which the load generator's
//! tests share.
#![allow(dead_code)]

mod harness;

use std::process::Command;

pub use harness::*;

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, |_| {})
    }

    pub fn start_with(extra: &[&str], tweak: impl FnOnce(&mut Command)) -> Self {
        Self::start_at("127.0.0.1:0", "127.0.0.1:0", extra, tweak)
    }

    /// Starts herald on the given addresses: a node that restarts where a proxy expects it.
    pub fn start_at(
        listen: &str,
        admin: &str,
        extra: &[&str],
        tweak: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--listen", listen, "--admin", admin])
            .args(extra)
            .env("HERALD_LOG", "warn");
        tweak(&mut cmd);
        let server = Self::spawn(cmd);
        // The suite runs again with HERALD_IO=uring: a silent fallback would test epoll twice.
        if std::env::var("HERALD_IO").is_ok_and(|io| io == "uring") && !extra.contains(&"--io") {
            assert!(
                server.startup_line.contains(" on io_uring"),
                "HERALD_IO=uring, but: {}",
                server.startup_line
            );
        }
        server
    }
}
