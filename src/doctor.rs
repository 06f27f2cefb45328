//! `herald doctor`: does this machine fit N connections, and what to change when it does not.
//!
//! Owns the capacity arithmetic and the checks: open files (per process and machine-wide),
//! epoll watches, accept backlogs, TCP memory, memory, conntrack, the port range a load
//! generator on the same machine needs, and herald's own connection cap. Reads a [`Readings`]
//! snapshot (from `/proc`, or from a fake tree in tests) and never changes the machine; the
//! only probe is raising this process's own open-file limit, to learn whether it can be raised.

use std::fmt::Write as _;
use std::path::Path;

use crate::limits::{FdLimit, RESERVED_FDS};

/// Kernel memory per idle connection, server side: socket, inode, dentry, file, epoll item
/// (measured, benches/RESULTS.md "Idle memory per connection").
pub const KERNEL_BYTES_PER_CONNECTION: u64 = 3_800;
/// herald's user-space memory per idle subscribed connection (measured about 92-101 B; rounded
/// up).
pub const HERALD_BYTES_PER_CONNECTION: u64 = 128;
/// One herald process before its first connection (measured 8.5-8.8 MB; rounded up).
pub const BASE_BYTES_PER_PROCESS: u64 = 10 << 20;
/// The accept backlog herald asks for on each shard listener.
const LISTEN_BACKLOG: u64 = crate::gateway::LISTEN_BACKLOG as u64;
/// Send-queue memory while one small event is on its way to every connection at once (an skb's
/// truesize): what `tcp_mem` must leave room for.
const BURST_BYTES_PER_CONNECTION: u64 = 1_024;

/// What the checks look at, as the machine reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Readings {
    /// RLIMIT_NOFILE of this process.
    pub nofile: Option<FdLimit>,
    /// How far the hard limit could be raised here (`None`: not at all).
    pub nofile_raisable_to: Option<u64>,
    pub file_max: Option<u64>,
    /// Files open machine-wide now (first field of fs.file-nr).
    pub files_open: Option<u64>,
    pub nr_open: Option<u64>,
    pub epoll_max_user_watches: Option<u64>,
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    /// net.ipv4.tcp_mem's hard limit, in pages.
    pub tcp_mem_max_pages: Option<u64>,
    /// Buckets of the TCP established-connection hash this network namespace looks sockets up
    /// in (`net.ipv4.tcp_ehash_entries`; the kernel writes it negative when the namespace
    /// shares the machine's table).
    pub tcp_ehash_entries: Option<u64>,
    pub page_size: u64,
    pub port_range: Option<(u64, u64)>,
    pub mem_available: Option<u64>,
    /// `None` when nf_conntrack is not loaded.
    pub conntrack_max: Option<u64>,
    /// Connections tracked now: none while no firewall or NAT rule asks for tracking.
    pub conntrack_count: Option<u64>,
}

/// What to check for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub connections: u64,
    /// herald processes sharing the connections.
    pub processes: u64,
    /// `--max-connections` of each process, when set.
    pub max_connections: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub what: String,
    /// How to fix it; empty when nothing needs fixing.
    pub fix: String,
}

fn check(ok: bool, bad: Status, what: String, fix: impl Into<String>) -> Check {
    if ok {
        Check {
            status: Status::Ok,
            what,
            fix: String::new(),
        }
    } else {
        Check {
            status: bad,
            what,
            fix: fix.into(),
        }
    }
}

fn unreadable(what: &str) -> Check {
    Check {
        status: Status::Warn,
        what: format!("{what}: cannot be read on this machine"),
        fix: String::new(),
    }
}

/// Thousands separators, for numbers people compare at a glance.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn sysctl_fix(line: &str) -> String {
    format!(
        "add `{line}` (sysctl/herald.conf has it) to /etc/sysctl.d/60-herald.conf, then `sysctl --system`"
    )
}

impl Target {
    /// Connections each process holds.
    pub fn per_process(&self) -> u64 {
        self.connections.div_ceil(self.processes.max(1))
    }
}

/// Every check, in the order they are printed.
pub fn checks(t: &Target, r: &Readings) -> Vec<Check> {
    vec![
        open_files(t, r),
        nr_open(t, r),
        file_max(t, r),
        epoll_watches(t, r),
        backlog("net.core.somaxconn", r.somaxconn),
        backlog("net.ipv4.tcp_max_syn_backlog", r.tcp_max_syn_backlog),
        tcp_mem(t, r),
        ehash(t, r),
        memory(t, r),
        conntrack(t, r),
        ports(t, r),
        max_connections(t),
    ]
}

fn open_files(t: &Target, r: &Readings) -> Check {
    let Some(limit) = r.nofile else {
        return unreadable("open files (RLIMIT_NOFILE)");
    };
    let need = t.per_process();
    // herald raises its soft limit to the hard one at start.
    let holds = FdLimit {
        soft: limit.hard,
        hard: limit.hard,
    }
    .capacity();
    let what = format!(
        "open files per process: soft {}, hard {}: one herald process holds {} connections, {} needed",
        grouped(limit.soft),
        grouped(limit.hard),
        grouped(holds),
        grouped(need)
    );
    if holds >= need {
        return check(true, Status::Fail, what, "");
    }
    let wanted = need.saturating_add(RESERVED_FDS);
    let fix = match r.nofile_raisable_to {
        _ if r.nr_open.is_some_and(|n| n < wanted) => format!(
            "fs.nr_open caps every process's open files below {wanted}: raise it first (below), \
             then the hard limit: LimitNOFILE={wanted} in herald's systemd unit"
        ),
        Some(max) if max > limit.hard => format!(
            "raise the hard limit to at least {wanted}: LimitNOFILE={wanted} in herald's systemd unit, \
             `herald hard nofile {wanted}` in /etc/security/limits.conf, or `--ulimit nofile={wanted}:{wanted}` for Docker"
        ),
        _ => {
            let processes = t.connections.div_ceil(holds.max(1));
            format!(
                "the hard limit of {} open files cannot be raised here (setrlimit refused: it needs \
                 CAP_SYS_RESOURCE, or a container or the machine caps it): {} connections need at least {processes} herald processes, each on its own \
                 port behind a load balancer (`herald doctor --processes {processes}` checks that layout)",
                grouped(limit.hard),
                grouped(t.connections)
            )
        }
    };
    check(false, Status::Fail, what, fix)
}

fn nr_open(t: &Target, r: &Readings) -> Check {
    let Some(nr_open) = r.nr_open else {
        return unreadable("fs.nr_open");
    };
    let need = t.per_process().saturating_add(RESERVED_FDS);
    let what = format!(
        "fs.nr_open {} (the most RLIMIT_NOFILE can be raised to), {} needed",
        grouped(nr_open),
        grouped(need)
    );
    check(
        nr_open >= need,
        Status::Fail,
        what,
        sysctl_fix("fs.nr_open = 2097152"),
    )
}

fn file_max(t: &Target, r: &Readings) -> Check {
    let Some(max) = r.file_max else {
        return unreadable("fs.file-max");
    };
    let open = r.files_open.unwrap_or(0);
    let need = t.connections.saturating_add(open);
    let what = format!(
        "fs.file-max {} (machine-wide open files), {} needed ({} open now); a load generator on this machine needs as many again",
        grouped(max),
        grouped(need),
        grouped(open)
    );
    check(
        max >= need,
        Status::Fail,
        what,
        sysctl_fix("fs.file-max = 4194304"),
    )
}

fn epoll_watches(t: &Target, r: &Readings) -> Check {
    let Some(watches) = r.epoll_max_user_watches else {
        return unreadable("fs.epoll.max_user_watches");
    };
    let what = format!(
        "fs.epoll.max_user_watches {} (per user, all processes), {} needed",
        grouped(watches),
        grouped(t.connections)
    );
    let fix = sysctl_fix("fs.epoll.max_user_watches = 8388608");
    check(watches >= t.connections, Status::Fail, what, fix)
}

fn backlog(key: &str, value: Option<u64>) -> Check {
    let Some(v) = value else {
        return unreadable(key);
    };
    let what = format!(
        "{key} {}: herald asks for a backlog of {} per shard listener, which this caps",
        grouped(v),
        grouped(LISTEN_BACKLOG)
    );
    // A lower cap truncates the backlog: reconnect storms then lose SYNs and retry after 1 s.
    check(
        v >= LISTEN_BACKLOG,
        Status::Warn,
        what,
        sysctl_fix(&format!("{key} = 65535")),
    )
}

fn tcp_mem(t: &Target, r: &Readings) -> Check {
    let Some(pages) = r.tcp_mem_max_pages else {
        return unreadable("net.ipv4.tcp_mem");
    };
    let have = pages.saturating_mul(r.page_size);
    let need = t.connections.saturating_mul(BURST_BYTES_PER_CONNECTION);
    let what = format!(
        "net.ipv4.tcp_mem limit {} MiB; one event to every connection at once queues about {} MiB",
        grouped(have >> 20),
        grouped(need >> 20)
    );
    let fix = sysctl_fix("net.ipv4.tcp_mem = 786432 1048576 1572864");
    check(have >= need, Status::Warn, what, fix)
}

fn memory(t: &Target, r: &Readings) -> Check {
    let Some(available) = r.mem_available else {
        return unreadable("memory (MemAvailable)");
    };
    let per_connection = KERNEL_BYTES_PER_CONNECTION + HERALD_BYTES_PER_CONNECTION;
    let need = t
        .connections
        .saturating_mul(per_connection)
        .saturating_add(t.processes.saturating_mul(BASE_BYTES_PER_PROCESS));
    let what = format!(
        "memory: {} MiB available, {} MiB needed (kernel {} B and herald {} B per connection, {} MiB per process)",
        grouped(available >> 20),
        grouped(need >> 20),
        KERNEL_BYTES_PER_CONNECTION,
        HERALD_BYTES_PER_CONNECTION,
        BASE_BYTES_PER_PROCESS >> 20
    );
    let fix = format!(
        "a machine with {} MiB more memory, or fewer connections per machine; a load generator \
         on the same machine needs about as much again for its own sockets",
        grouped((need - available.min(need)) >> 20)
    );
    check(available >= need, Status::Fail, what, fix)
}

/// Most buckets a namespace's own table can be given (`tcp_child_ehash_entries`).
const CHILD_EHASH_MAX: u64 = 1 << 24;

fn ehash(t: &Target, r: &Readings) -> Check {
    let Some(buckets) = r.tcp_ehash_entries.filter(|&b| b > 0) else {
        // Kernels before 5.19 do not say; the table works all the same.
        let what = "net.ipv4.tcp_ehash_entries: not reported by this kernel (before 5.19)";
        return check(true, Status::Warn, what.to_owned(), "");
    };
    let wanted = t.connections.next_power_of_two().min(CHILD_EHASH_MAX);
    let what = format!(
        "net.ipv4.tcp_ehash_entries {}: the kernel's hash of established connections, for {} \
         connections (every packet's lookup walks {} socket(s) of a bucket on average)",
        grouped(buckets),
        grouped(t.connections),
        t.connections.div_ceil(buckets).max(1)
    );
    // The size is fixed at boot from the machine's memory, so no sysctl file can change it.
    let fix = format!(
        "boot with `thash_entries={wanted}` on the kernel command line, or run herald in a \
         network namespace (a container) created after `sysctl -w \
         net.ipv4.tcp_child_ehash_entries={wanted}`; a load generator on the same machine \
         doubles the sockets"
    );
    check(buckets >= t.connections, Status::Warn, what, fix)
}

fn conntrack(t: &Target, r: &Readings) -> Check {
    let Some(max) = r.conntrack_max else {
        let what = "conntrack: nf_conntrack is not loaded (nothing tracks connections)".to_owned();
        return check(true, Status::Fail, what, "");
    };
    let tracking = r.conntrack_count.is_none_or(|n| n > 0);
    let what = format!(
        "net.netfilter.nf_conntrack_max {}, {} needed (a full table drops new SYNs silently){}",
        grouped(max),
        grouped(t.connections),
        if tracking {
            ""
        } else {
            "; nothing is tracked now, but a firewall or NAT rule (Docker's port mapping) starts it"
        }
    );
    let fix = sysctl_fix("net.netfilter.nf_conntrack_max = 2097152");
    let bad = if tracking { Status::Fail } else { Status::Warn };
    check(max >= t.connections, bad, what, fix)
}

fn ports(t: &Target, r: &Readings) -> Check {
    let Some((low, high)) = r.port_range else {
        return unreadable("net.ipv4.ip_local_port_range");
    };
    let ports = high.saturating_sub(low) + 1;
    let sources = t.connections.div_ceil(ports);
    let what = format!(
        "net.ipv4.ip_local_port_range {low}-{high}: {} ports, so a load generator on this machine \
         needs {sources} source address(es) per server address (e.g. --source-ips 127.0.0.2-127.0.0.{})",
        grouped(ports),
        (1 + sources).min(254)
    );
    // Only load tests from this machine need it; servers accept on one port.
    let fix = format!(
        "on the machine that runs the load generator, {} together with its \
         `net.ipv4.ip_local_reserved_ports` line, which keeps herald's and Redis's ports out of it",
        sysctl_fix("net.ipv4.ip_local_port_range = 1024 65535")
    );
    check(ports >= 60_000, Status::Warn, what, fix)
}

fn max_connections(t: &Target) -> Check {
    let Some(max) = t.max_connections else {
        let what = "herald's connection cap: from the open-file limit (--max-connections not set)";
        return check(true, Status::Fail, what.to_owned(), "");
    };
    let need = t.per_process();
    let what = format!(
        "--max-connections {} per process, {} needed",
        grouped(max),
        grouped(need)
    );
    let fix = format!(
        "raise --max-connections (max_connections in the config file) to {need}, or remove it"
    );
    check(max >= need, Status::Fail, what, fix)
}

/// The report and whether everything fits (no check failed).
pub fn report(t: &Target, checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "herald doctor: {} connections in {} herald process(es) on this machine ({} each)",
        grouped(t.connections),
        t.processes,
        grouped(t.per_process())
    );
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "  {tag}  {}", c.what);
        if !c.fix.is_empty() {
            let _ = writeln!(out, "        fix: {}", c.fix);
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    let fits = failed == 0;
    let _ = if fits {
        writeln!(
            out,
            "verdict: {} connections fit ({warned} warning(s))",
            grouped(t.connections)
        )
    } else {
        writeln!(
            out,
            "verdict: {} connections do not fit: {failed} check(s) failed, {warned} warning(s)",
            grouped(t.connections)
        )
    };
    (out, fits)
}

impl Readings {
    /// Reads the machine under `root` (`/` for the real one; tests pass a fake tree).
    /// `nofile` and the raise probe are this process's own and left to the caller.
    pub fn read(root: &Path) -> Self {
        let text = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
        let numbers = |rel: &str| -> Vec<u64> {
            text(rel)
                .map(|t| {
                    t.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let first = |rel: &str| numbers(rel).first().copied();
        let range = numbers("proc/sys/net/ipv4/ip_local_port_range");
        Self {
            nofile: None,
            nofile_raisable_to: None,
            file_max: first("proc/sys/fs/file-max"),
            files_open: first("proc/sys/fs/file-nr"),
            nr_open: first("proc/sys/fs/nr_open"),
            epoll_max_user_watches: first("proc/sys/fs/epoll/max_user_watches"),
            somaxconn: first("proc/sys/net/core/somaxconn"),
            tcp_max_syn_backlog: first("proc/sys/net/ipv4/tcp_max_syn_backlog"),
            tcp_mem_max_pages: numbers("proc/sys/net/ipv4/tcp_mem").get(2).copied(),
            tcp_ehash_entries: text("proc/sys/net/ipv4/tcp_ehash_entries")
                .and_then(|t| t.trim().parse::<i64>().ok())
                .map(i64::unsigned_abs),
            page_size: 4096,
            port_range: (range.len() == 2).then(|| (range[0], range[1])),
            mem_available: available_memory(
                text("proc/meminfo")
                    .and_then(|m| crate::limits::meminfo_bytes(&m, "MemAvailable:")),
                first("sys/fs/cgroup/memory.max"),
                first("sys/fs/cgroup/memory.current"),
            ),
            conntrack_max: first("proc/sys/net/netfilter/nf_conntrack_max"),
            conntrack_count: first("proc/sys/net/netfilter/nf_conntrack_count"),
        }
    }

    /// The real machine, with this process's open-file limit and whether its hard limit can be
    /// raised as far as `t` needs (tried on this process only, which exits right after).
    pub fn of_this_machine(t: &Target) -> Self {
        let wanted = t.per_process().saturating_add(RESERVED_FDS);
        let mut r = Self::read(Path::new("/"));
        // SAFETY: sysconf has no preconditions.
        if let Ok(page) = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) {
            r.page_size = page;
        }
        if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
            r.nofile = Some(FdLimit { soft, hard });
            let target = wanted.max(hard).min(r.nr_open.unwrap_or(wanted));
            r.nofile_raisable_to = if target <= hard {
                Some(hard)
            } else {
                rlimit::Resource::NOFILE
                    .set(soft, target)
                    .ok()
                    .map(|()| target)
            };
        }
        r
    }
}

/// What the machine has available, or what this cgroup (a container) may still use when that
/// is less (`memory.max` reads `max` when there is no limit).
fn available_memory(machine: Option<u64>, max: Option<u64>, current: Option<u64>) -> Option<u64> {
    let cgroup = max.map(|m| m.saturating_sub(current.unwrap_or(0)));
    match (machine, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake machine: `/proc` files as this kernel writes them.
    fn fake_root(files: &[(&str, &str)]) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("herald-doctor-{}-{n}", std::process::id()));
        for (rel, text) in files {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    fn tuned() -> Vec<(&'static str, &'static str)> {
        vec![
            ("proc/sys/fs/file-max", "4194304\n"),
            ("proc/sys/fs/file-nr", "2912\t0\t4194304\n"),
            ("proc/sys/fs/nr_open", "2097152\n"),
            ("proc/sys/fs/epoll/max_user_watches", "8388608\n"),
            ("proc/sys/net/core/somaxconn", "65535\n"),
            ("proc/sys/net/ipv4/tcp_max_syn_backlog", "65535\n"),
            ("proc/sys/net/ipv4/tcp_mem", "786432\t1048576\t1572864\n"),
            ("proc/sys/net/ipv4/tcp_ehash_entries", "1048576\n"),
            ("proc/sys/net/ipv4/ip_local_port_range", "1024\t65535\n"),
            (
                "proc/meminfo",
                "MemTotal: 25165824 kB\nMemAvailable: 20971520 kB\n",
            ),
        ]
    }

    fn target(connections: u64, processes: u64) -> Target {
        Target {
            connections,
            processes,
            max_connections: None,
        }
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.what.split(' ').next().unwrap())
            .collect()
    }

    #[test]
    fn a_tuned_machine_without_the_file_cap_fits_a_million() {
        let mut r = Readings::read(&fake_root(&tuned()));
        assert_eq!(r.port_range, Some((1024, 65535)));
        assert_eq!(r.tcp_mem_max_pages, Some(1572864));
        assert_eq!(r.files_open, Some(2912));
        assert_eq!(r.mem_available, Some(20971520 * 1024));
        r.nofile = Some(FdLimit {
            soft: 1024,
            hard: 1_048_576,
        });
        r.nofile_raisable_to = Some(1_048_576);
        let checks = checks(&target(1_000_000, 1), &r);
        assert_eq!(failed(&checks), Vec::<&str>::new());
        let (text, fits) = report(&target(1_000_000, 1), &checks);
        assert!(fits, "{text}");
        assert!(
            text.contains("verdict: 1,000,000 connections fit"),
            "{text}"
        );
    }

    #[test]
    fn a_hard_cap_that_cannot_be_raised_names_the_processes_needed() {
        let mut r = Readings::read(&fake_root(&tuned()));
        r.nofile = Some(FdLimit {
            soft: 20_000,
            hard: 20_000,
        });
        r.nofile_raisable_to = None;
        let checks = checks(&target(1_000_000, 1), &r);
        assert_eq!(failed(&checks), ["open"]);
        let (text, fits) = report(&target(1_000_000, 1), &checks);
        assert!(!fits);
        assert!(text.contains("cannot be raised"), "{text}");
        // 19,936 per process: 51 processes.
        assert!(text.contains("at least 51 herald processes"), "{text}");
        assert!(text.contains("--processes 51"), "{text}");
        let layout = checks_for(&r, 1_000_000, 51);
        assert_eq!(failed(&layout), Vec::<&str>::new());
    }

    fn checks_for(r: &Readings, connections: u64, processes: u64) -> Vec<Check> {
        checks(&target(connections, processes), r)
    }

    #[test]
    fn a_raisable_limit_says_how_to_raise_it() {
        let mut r = Readings::read(&fake_root(&tuned()));
        r.nofile = Some(FdLimit {
            soft: 1024,
            hard: 4096,
        });
        r.nofile_raisable_to = Some(2_097_152);
        let c = open_files(&target(100_000, 1), &r);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("LimitNOFILE=100064"), "{}", c.fix);
    }

    #[test]
    fn an_untuned_machine_fails_with_the_sysctl_lines_to_add() {
        let defaults = [
            ("proc/sys/fs/file-max", "9223372036854775807\n"),
            ("proc/sys/fs/nr_open", "1048576\n"),
            ("proc/sys/fs/epoll/max_user_watches", "1000000\n"),
            ("proc/sys/net/core/somaxconn", "4096\n"),
            ("proc/sys/net/ipv4/tcp_max_syn_backlog", "1024\n"),
            ("proc/sys/net/ipv4/tcp_mem", "94444\t125925\t188888\n"),
            ("proc/sys/net/ipv4/tcp_ehash_entries", "262144\n"),
            ("proc/sys/net/ipv4/ip_local_port_range", "32768\t60999\n"),
            ("proc/sys/net/netfilter/nf_conntrack_max", "262144\n"),
            ("proc/sys/net/netfilter/nf_conntrack_count", "118\n"),
            ("proc/meminfo", "MemAvailable: 4194304 kB\n"),
        ];
        let mut r = Readings::read(&fake_root(&defaults));
        r.nofile = Some(FdLimit {
            soft: 1024,
            hard: 2_000_000,
        });
        let t = target(1_500_000, 1);
        let checks = checks(&t, &r);
        assert_eq!(
            failed(&checks),
            [
                "fs.nr_open",
                "fs.epoll.max_user_watches",
                "memory:",
                "net.netfilter.nf_conntrack_max"
            ]
        );
        let warned: Vec<&str> = checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .map(|c| c.what.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            warned,
            [
                "net.core.somaxconn",
                "net.ipv4.tcp_max_syn_backlog",
                "net.ipv4.tcp_mem",
                "net.ipv4.tcp_ehash_entries",
                "net.ipv4.ip_local_port_range"
            ]
        );
        let (text, fits) = report(&t, &checks);
        assert!(!fits);
        assert!(text.contains("fix: add `fs.nr_open = 2097152`"), "{text}");
        assert!(
            text.contains("fix: add `net.netfilter.nf_conntrack_max = 2097152`"),
            "{text}"
        );
        // 28,232 ports: 54 source addresses for 1.5M connections.
        assert!(text.contains("needs 54 source address(es)"), "{text}");
    }

    #[test]
    fn a_small_connection_hash_warns_with_the_boot_parameter() {
        let mut files = tuned();
        files.retain(|(rel, _)| !rel.ends_with("tcp_ehash_entries"));
        // A namespace that shares the machine's table reads negative.
        files.push(("proc/sys/net/ipv4/tcp_ehash_entries", "-262144\n"));
        let r = Readings::read(&fake_root(&files));
        assert_eq!(r.tcp_ehash_entries, Some(262_144));
        let c = ehash(&target(1_000_000, 52), &r);
        assert_eq!(c.status, Status::Warn);
        assert!(c.what.contains("walks 4 socket(s)"), "{}", c.what);
        assert!(c.fix.contains("thash_entries=1048576"), "{}", c.fix);
        assert!(
            c.fix.contains("tcp_child_ehash_entries=1048576"),
            "{}",
            c.fix
        );
        assert_eq!(ehash(&target(200_000, 11), &r).status, Status::Ok);
    }

    #[test]
    fn a_conntrack_table_that_tracks_nothing_only_warns() {
        let mut files = tuned();
        files.push(("proc/sys/net/netfilter/nf_conntrack_max", "262144\n"));
        files.push(("proc/sys/net/netfilter/nf_conntrack_count", "0\n"));
        let r = Readings::read(&fake_root(&files));
        assert_eq!(conntrack(&target(1_000_000, 1), &r).status, Status::Warn);
        assert_eq!(conntrack(&target(200_000, 1), &r).status, Status::Ok);
    }

    #[test]
    fn a_missing_reading_is_a_warning_not_a_pass() {
        let r = Readings::read(Path::new("/nonexistent-herald-root"));
        let checks = checks(&target(10, 1), &r);
        assert!(
            checks
                .iter()
                .any(|c| c.status == Status::Warn && c.what.contains("cannot be read"))
        );
        assert_eq!(failed(&checks), Vec::<&str>::new());
    }

    #[test]
    fn a_lower_connection_cap_fails() {
        let t = Target {
            max_connections: Some(5_000),
            ..target(20_000, 2)
        };
        let c = max_connections(&t);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("to 10000"), "{}", c.fix);
    }

    #[test]
    fn a_container_has_what_its_cgroup_leaves() {
        let mut files = tuned();
        files.push(("sys/fs/cgroup/memory.max", "4294967296\n"));
        files.push(("sys/fs/cgroup/memory.current", "1073741824\n"));
        let r = Readings::read(&fake_root(&files));
        assert_eq!(r.mem_available, Some(3 << 30));
        assert_eq!(memory(&target(1_000_000, 1), &r).status, Status::Fail);
        let mut files = tuned();
        files.push(("sys/fs/cgroup/memory.max", "max\n"));
        let r = Readings::read(&fake_root(&files));
        assert_eq!(r.mem_available, Some(20971520 * 1024));
    }

    #[test]
    fn an_open_file_limit_capped_by_nr_open_says_to_raise_nr_open_first() {
        let mut r = Readings::read(&fake_root(&tuned()));
        r.nr_open = Some(1_048_576);
        r.nofile = Some(FdLimit {
            soft: 1_048_576,
            hard: 1_048_576,
        });
        r.nofile_raisable_to = Some(1_048_576);
        let c = open_files(&target(1_500_000, 1), &r);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.starts_with("fs.nr_open caps"), "{}", c.fix);
    }

    #[test]
    fn absurd_numbers_do_not_overflow_into_a_pass() {
        let r = Readings::read(&fake_root(&tuned()));
        let checks = checks(&target(u64::MAX, u64::MAX), &r);
        assert!(failed(&checks).contains(&"memory:"), "{checks:?}");
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(19_936), "19,936");
        assert_eq!(grouped(1_000_000), "1,000,000");
    }
}
