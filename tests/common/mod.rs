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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
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
