//! Readings of this machine and its processes: resident memory and CPU time from /proc, the
//! open-file limit, the wall clock in unix microseconds, the machine description in reports,
//! and the SIGINT/SIGTERM flag.
//!
//! Owns every read of /proc and every process-wide setting. Must not hold load state.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::messages::Machine;

/// Resident memory of this process, from /proc (0 where unavailable).
pub(crate) fn rss_bytes() -> u64 {
    proc_rss_bytes("self").unwrap_or(0)
}

/// `VmRSS` of a process (`"self"` or a PID), in bytes.
pub(crate) fn proc_rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// User plus system CPU seconds of a process and its waited-for children, from
/// `/proc/PID/stat` (Linux reports them in USER_HZ = 100 ticks per second on every platform).
pub(crate) fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Makes sure this process may open `connections` sockets, or says how to split the load.
pub(crate) fn check_fd_limit(connections: usize) -> anyhow::Result<()> {
    let capacity = fd_capacity()?;
    if connections > capacity {
        let processes = connections.div_ceil(capacity.max(1));
        bail!(
            "--connections {connections} needs more file descriptors than this process may open: \
             one herald-bench process holds at most {capacity} connections (its open-file hard \
             limit minus 64). Split the load into {processes} or more processes of at most \
             {capacity} connections each (`herald-bench fanout` does this by itself; for `idle`, \
             give each its own --source-ips range), or raise the hard limit (ulimit -Hn)"
        );
    }
    Ok(())
}

/// Connections this process can hold, after raising its soft open-file limit to the hard one.
pub(crate) fn fd_capacity() -> anyhow::Result<usize> {
    let limit = herald::limits::raise_nofile().context("cannot read or raise RLIMIT_NOFILE")?;
    Ok(usize::try_from(limit.capacity()).unwrap_or(usize::MAX))
}

/// Installs SIGINT/SIGTERM handlers that set the returned flag.
pub(crate) fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install a signal handler")?;
    }
    Ok(stop)
}

/// What the run ran on.
pub(crate) fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .map(|l| l.trim().to_owned())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        cpu,
        memory,
        kernel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc() {
        assert!(proc_rss_bytes("self").unwrap() > 0);
        assert!(proc_cpu_seconds("self").is_some());
    }
}
