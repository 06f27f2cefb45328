//! The open-file limit: every connection is a file descriptor.
//!
//! Owns raising the soft `RLIMIT_NOFILE` to the hard limit at start and turning it into a
//! connection capacity. Must not open sockets.

/// Descriptors kept for everything that is not a client connection: listeners, epoll, wakers,
/// the admin listener and its clients, log files.
const RESERVED_FDS: u64 = 64;

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
