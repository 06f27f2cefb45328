//! The I/O driver a user asks for is the one that runs, and the startup line names it; where
//! io_uring is refused (here by a seccomp filter, as some container runtimes install), herald
//! says so in one line and serves on epoll.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

/// Makes `io_uring_setup` fail with ENOSYS in the child, as a container's seccomp profile does.
fn refuse_io_uring() -> std::io::Result<()> {
    const LD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS: the syscall number is at offset 0
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let filter = [
        libc::sock_filter {
            code: LD_NR,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: RET,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: RET,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a filter program that lives through the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn assert_serves(server: &Server) {
    let (mut ws, connected) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    assert_eq!(connected["type"], "connected");
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": 1}}));
    assert_eq!(next_json(&mut ws).await["data"]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_asked_for_runs_and_the_startup_line_names_it() {
    for (io, named) in [("uring", "on io_uring"), ("epoll", "on epoll")] {
        let server = Server::start(&["--io", io]);
        assert!(
            server.startup_line.contains(named),
            "{}",
            server.startup_line
        );
        assert_serves(&server).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_refused_by_seccomp_falls_back_to_epoll_and_says_so() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["serve", "--io", "uring", "--listen", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0"])
        .env("HERALD_LOG", "warn")
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe { cmd.pre_exec(refuse_io_uring) };
    let mut server = Server::spawn(cmd);
    assert!(
        server.startup_line.contains("on epoll"),
        "{}",
        server.startup_line
    );
    let stderr = server.child.stderr.take().expect("stderr");
    let mut reader = BufReader::new(stderr);
    let mut warning = String::new();
    for _ in 0..10 {
        warning.clear();
        reader.read_line(&mut warning).expect("stderr");
        if warning.contains("io_uring") {
            break;
        }
    }
    assert!(
        warning.contains("io_uring cannot be used here") && warning.contains("ENOSYS"),
        "{warning}"
    );
    assert_serves(&server).await;
}
