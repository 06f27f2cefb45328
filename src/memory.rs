//! The allocator's use of the system's memory: transparent huge pages and giving freed pages
//! back.
//!
//! Owns herald's settings of mimalloc and the rule for when a thread hands the pages its heap
//! freed back to the system ([`AfterWork`]). Knows nothing of connections or buses: callers say
//! when they worked.

/// Whether `MIMALLOC_ALLOW_THP` asks for transparent huge pages (as mimalloc reads it).
fn thp_wanted() -> bool {
    std::env::var("MIMALLOC_ALLOW_THP").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Switches transparent huge pages off for this process (`PR_SET_THP_DISABLE`), as herald's
/// default: with them the allocator's heap grows and stays resident in 2 MiB steps, which more
/// than doubles what an idle connection costs (`benches/RESULTS.md`, idle memory), for no gain
/// in a gateway whose working set is many small objects. `MIMALLOC_ALLOW_THP=1` keeps them.
/// Answers whether they are off.
pub fn disable_transparent_huge_pages() -> std::io::Result<bool> {
    if thp_wanted() {
        return Ok(false);
    }
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// Hands the pages the calling thread's heap has freed back to the system (mimalloc keeps them
/// resident otherwise, until that thread allocates again). Costs a walk of the thread's heap:
/// call it when a thread goes quiet, not on a hot path.
pub fn give_back() {
    // SAFETY: mimalloc's own collection of the calling thread's heap; takes no pointers.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

thread_local! {
    static WORKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as having worked in this period (see [`take_work`]).
pub fn note_work() {
    WORKED.set(true);
}

/// Whether the calling thread noted work since the last call.
pub fn take_work() -> bool {
    WORKED.replace(false)
}

/// When a thread that works in bursts gives memory back: once, after the first quiet period
/// that follows work (start-up counts as work: it leaves parsed configuration, runtimes and
/// connection set-up behind).
#[derive(Debug)]
pub struct AfterWork {
    owed: bool,
}

impl Default for AfterWork {
    fn default() -> Self {
        Self { owed: true }
    }
}

impl AfterWork {
    /// Called once per period; `worked`: whether this period did any of the thread's work.
    /// Answers whether memory was given back.
    pub fn period(&mut self, worked: bool) -> bool {
        if worked {
            self.owed = true;
            return false;
        }
        if std::mem::take(&mut self.owed) {
            give_back();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::AfterWork;

    #[test]
    fn memory_goes_back_once_after_the_first_quiet_period_following_work() {
        let mut w = AfterWork::default();
        assert!(w.period(false), "start-up is work");
        assert!(!w.period(false), "once");
        assert!(!w.period(true));
        assert!(!w.period(true), "not while working");
        assert!(w.period(false));
        assert!(!w.period(false));
    }
}
