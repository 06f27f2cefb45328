//! The allocator's use of the system's memory: transparent huge pages and giving freed pages
//! back.
//!
//! Owns herald's settings of mimalloc and the rule for when a thread hands the pages its heap
//! freed back to the system ([`AfterWork`]). Knows nothing of connections or buses: callers say
//! when they worked.

use std::sync::atomic::{AtomicI32, Ordering};

/// Whether `MIMALLOC_ALLOW_THP` asks for transparent huge pages, as mimalloc reads it: `1`,
/// `true`, `yes`, `on` or another non-zero number. Reads the environment through libc and
/// allocates nothing: it runs before `main`.
fn thp_wanted() -> bool {
    // SAFETY: getenv with a NUL-terminated name; the string it points to is read at once.
    let value = unsafe {
        let v = libc::getenv(c"MIMALLOC_ALLOW_THP".as_ptr());
        if v.is_null() {
            return false;
        }
        std::ffi::CStr::from_ptr(v).to_bytes()
    };
    let value = value.trim_ascii();
    let words = [&b"1"[..], b"true", b"yes", b"on"];
    let number = !value.is_empty()
        && value.iter().all(u8::is_ascii_digit)
        && value.iter().any(|&d| d != b'0');
    number || words.iter().any(|w| value.eq_ignore_ascii_case(w))
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

/// What [`configure_allocator`] did about huge pages: not run yet, off, allowed, or the errno
/// of a failed `prctl`.
static THP: AtomicI32 = AtomicI32::new(NOT_RUN);
const NOT_RUN: i32 = -1;
const THP_OFF: i32 = -2;
const THP_ALLOWED: i32 = -3;

/// herald's allocator settings, for the binary to run as an ELF constructor, before anything
/// allocates: huge pages go off before mimalloc reserves and first touches its arena (switched
/// off later, in `main`, the arena's first 2 MiB were already one resident huge page, with its
/// bookkeeping 3.5 MiB of every idle process; `benches/RESULTS.md`, "Base memory").
pub extern "C" fn configure_allocator() {
    code_on_demand();
    let state = match disable_transparent_huge_pages() {
        Ok(true) => THP_OFF,
        Ok(false) => THP_ALLOWED,
        Err(e) => e.raw_os_error().unwrap_or(0),
    };
    THP.store(state, Ordering::Relaxed);
}

/// Advises `MADV_RANDOM` on the program's code and read-only data, so that the kernel maps
/// less of the binary than its read-ahead would around each page fault: most of it is code a
/// process never runs, and with 52 processes on one machine each one's base counts (measured:
/// 9.4-9.6 MB without, 8.5-8.8 MB with; `benches/RESULTS.md`, "Per-process base"). Covers every
/// object loaded at start (herald and its shared libraries); their writable data is left alone.
/// Allocates nothing: it runs before `main`.
fn code_on_demand() {
    // SAFETY: advice on ranges the loader mapped read-only; a failure leaves the kernel's default.
    unsafe { advise_read_only(libc::MADV_RANDOM) };
}

/// Unmaps the program's code and read-only data (of herald and the libraries loaded with it)
/// once start-up is over, so that only what the running gateway touches is mapped again. The
/// pages stay in the page cache, shared by every process of the same binary: a page touched
/// again costs a minor fault, never a read. Start-up code (argument parsing, runtimes, TLS and
/// Redis set-up) is most of what a fresh process maps, and the kernel maps up to 16 neighbours
/// of every page it faults in (fault-around), so that one start-up leaves megabytes mapped
/// that the process never runs again (`benches/RESULTS.md`, "Per-process base").
///
/// Only segments the loader never writes are touched: relocated read-only data (RELRO) is in
/// a writable segment and holds private copies, which this would throw away.
pub fn release_startup_code() {
    // SAFETY: ranges the loader mapped read-only from files and never wrote: dropping them only
    // makes the next access fault the same bytes in again.
    unsafe { advise_read_only(libc::MADV_DONTNEED) };
}

/// Gives `advice` on the non-writable segments of the program and of every library loaded from
/// a file (not the vDSO, which is no file mapping). Allocates nothing.
///
/// # Safety
/// `advice` must be harmless on read-only file mappings whatever their content.
unsafe fn advise_read_only(advice: libc::c_int) {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader hands a valid record whose program headers stay mapped, and
        // `data` is the advice `advise_read_only` passed.
        let (info, advice) = unsafe { (&*info, *data.cast::<libc::c_int>()) };
        // The main program has an empty name, a library its path.
        // SAFETY: the loader's name is a NUL-terminated string (or null).
        let name = (!info.dlpi_name.is_null())
            .then(|| unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes());
        if name.is_some_and(|n| !n.is_empty() && !n.starts_with(b"/")) {
            return 0;
        }
        for (page, len) in read_only_segments(info) {
            // SAFETY: a range the loader mapped for this object; the caller vouches for the
            // advice.
            unsafe { libc::madvise(page as *mut libc::c_void, len, advice) };
        }
        0
    }
    let mut advice = advice;
    // SAFETY: the callback reads only what the loader passes it and the advice, which outlives
    // the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut advice).cast()) };
}

/// The page-aligned ranges of an object's non-writable `PT_LOAD` segments.
fn read_only_segments(info: &libc::dl_phdr_info) -> impl Iterator<Item = (usize, usize)> + '_ {
    // SAFETY: sysconf reads a constant of the system; a failure (-1) yields no range.
    let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 && (n as usize).is_power_of_two() => n as usize,
        _ => usize::MAX,
    };
    (0..usize::from(info.dlpi_phnum))
        .filter(move |_| page_size != usize::MAX)
        .filter_map(move |i| {
            // SAFETY: `i` is below the number of program headers the record holds.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_W != 0 {
                return None;
            }
            let start = (info.dlpi_addr + ph.p_vaddr) as usize;
            let page = start & !(page_size - 1);
            Some((page, start + ph.p_memsz as usize - page))
        })
}

/// Transparent huge pages as [`configure_allocator`] left them; when it did not run (a
/// program that does not register it), switches them off now.
pub fn transparent_huge_pages_off() -> std::io::Result<bool> {
    match THP.load(Ordering::Relaxed) {
        NOT_RUN => disable_transparent_huge_pages(),
        THP_OFF => Ok(true),
        THP_ALLOWED => Ok(false),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
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
    /// Answers whether to give memory back now (the caller lets go of its scratch space, then
    /// calls [`give_back`]).
    pub fn period(&mut self, worked: bool) -> bool {
        if worked {
            self.owed = true;
            return false;
        }
        std::mem::take(&mut self.owed)
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
