//! The figures of one warning of a [`Health`], for the health tests (rounds 94–98).

use herdcache::{Health, Warning};
use std::time::Duration;

/// `SynchronizedExpiry`'s (due, share, within, in_), if raised.
pub fn sync_of(h: &Health) -> Option<(u64, f64, Duration, Duration)> {
    h.warnings().iter().find_map(|w| match w {
        Warning::SynchronizedExpiry {
            due,
            share,
            within,
            in_,
        } => Some((*due, *share, *within, *in_)),
        _ => None,
    })
}

/// `Thrashing`'s (evictions, residence), if raised.
pub fn thrash_of(h: &Health) -> Option<(u64, Option<Duration>)> {
    h.warnings().iter().find_map(|w| match w {
        Warning::Thrashing {
            evictions,
            residence,
            ..
        } => Some((*evictions, *residence)),
        _ => None,
    })
}
