//! The process's limits: open files (every connection is a file descriptor) and memory.
//!
//! Owns raising the soft `RLIMIT_NOFILE` to the hard limit at start and turning it into a
//! connection capacity, and finding how much memory the process may use. Must not open sockets.

/// Descriptors kept for everything that is not a client connection: listeners, epoll, wakers,
/// the admin listener and its clients, log files.
pub const RESERVED_FDS: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

impl FdLimit {
    /// Connections this process can hold at most.
    pub fn capacity(&self) -> u64 {
        self.soft.saturating_sub(RESERVED_FDS)
    }
}

/// Raises the soft limit as far as the hard limit allows and reports the result.
pub fn raise_nofile() -> std::io::Result<FdLimit> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(FdLimit { soft, hard })
}

/// Memory this process may use: the machine's (`MemTotal`), or its cgroup's limit when lower
/// (a container). `None` when neither can be read.
pub fn memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| parse_meminfo_total(&m));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    meminfo_bytes(meminfo, "MemTotal:")
}

/// A `/proc/meminfo` field (`MemTotal:`, `MemAvailable:`, ...), in bytes.
pub fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_comes_from_meminfo_in_kib() {
        let sample = "MemFree:  100 kB\nMemTotal:       24576000 kB\n";
        assert_eq!(super::parse_meminfo_total(sample), Some(24_576_000 * 1024));
        assert_eq!(super::parse_meminfo_total("nothing"), None);
        assert!(super::memory_bytes().is_some_and(|m| m > 0));
    }
}
