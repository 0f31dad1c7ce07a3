//! The one allocator policy fewstep sets: when mimalloc (the binary's global allocator) gives
//! freed pages back to the OS.
//!
//! Candle allocates a fresh buffer for every op's output. Pages handed back are zeroed again
//! by the kernel when they are touched next, so training keeps every freed page (steps ran
//! 1.4x faster so). A server runs for weeks: kept pages make its RSS the highest transient
//! peak it ever had (a burst of large batches raises it for good; issue 16's soak saw +30 MB
//! steps late in a flat run), so `serve` returns pages that stayed free for a while.

use std::os::raw::c_long;

/// `mi_option_purge_delay` (15 in mimalloc.h, v2 and v3; the Rust binding has no name for
/// it): milliseconds a freed page stays mapped before it is returned; -1 = never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// What to do with pages that became free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreedPages {
    /// Keep them mapped for reuse (training, benchmarks).
    Keep,
    /// Return them after they stayed free this many milliseconds (0: at once).
    ReturnAfterMs(u64),
}

impl FreedPages {
    /// From a config value: negative keeps, otherwise a delay in milliseconds.
    pub fn from_ms(ms: i64) -> Self {
        u64::try_from(ms).map_or(Self::Keep, Self::ReturnAfterMs)
    }
}

/// Sets the process-wide policy. mimalloc reads the option each time it considers returning
/// pages, so this takes effect while other threads allocate; it has no effect where mimalloc
/// is not the global allocator (the library's own tests).
pub fn set_freed_pages(policy: FreedPages) {
    let value = match policy {
        FreedPages::Keep => -1,
        FreedPages::ReturnAfterMs(ms) => c_long::try_from(ms).unwrap_or(c_long::MAX),
    };
    // SAFETY: mi_option_set stores a long in mimalloc's option table; it takes no pointers.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, value) };
}

/// The policy in force.
pub fn freed_pages() -> FreedPages {
    // SAFETY: reads mimalloc's option table; no pointers.
    let v = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    FreedPages::from_ms(v as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_round_trips_through_mimallocs_option() {
        let before = freed_pages();
        set_freed_pages(FreedPages::ReturnAfterMs(250));
        assert_eq!(freed_pages(), FreedPages::ReturnAfterMs(250));
        set_freed_pages(FreedPages::Keep);
        assert_eq!(freed_pages(), FreedPages::Keep);
        set_freed_pages(before);
        assert_eq!(FreedPages::from_ms(-1), FreedPages::Keep);
        assert_eq!(FreedPages::from_ms(0), FreedPages::ReturnAfterMs(0));
    }
}
