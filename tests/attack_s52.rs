#![cfg(not(any(loom, shuttle)))]
//! Sweep 52 (outside, public API only): today's fixes (c6dd99a, daa9799) and their neighbours.
//!
//! Attacks: `CacheStats` helpers near `u64::MAX`; a load run by the spawner (soft timeout)
//! whose store panics, with fail-safe; writes whose user code (the key's `Eq`, a `retain`
//! predicate) panics while a load or computation of the key is in flight.
//!
//! Found (each `bug_` test quotes the doc it contradicts):
//! - `CacheStats::miss_ratio` is `1.0 - hit_ratio()`: with hits near `u64::MAX` (from 2^53
//!   hits on) and a few misses it is exactly 0.0, the answer for "no misses".

mod common;

use common::watchdog;
use herdcache::{Cache, CacheStats, Expiry, LoadError, ManualClock};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- CacheStats near u64::MAX

/// `CacheStats::miss_ratio`: "`misses / requests`, or 0.0 with no requests." With 2^60 hits and
/// one miss, `misses / requests` is about 8.7e-19 (> 0), but `miss_ratio` is computed as
/// `1.0 - hit_ratio()` and `hit_ratio()` rounds to exactly 1.0: it returns 0.0, as if there
/// were no miss. (Likely cause: src/stats.rs `CacheStats::miss_ratio`; compute
/// `m as f64 / (h as f64 + m as f64)` instead.)
#[test]
fn bug_miss_ratio_is_zero_with_misses_near_u64_max() {
    let mut s = CacheStats::default();
    s.hits = 1 << 60;
    s.misses = 1;
    let expected = 1.0 / ((1u64 << 60) as f64 + 1.0);
    assert!(expected > 0.0);
    assert!(
        s.miss_ratio() > 0.0,
        "miss_ratio() = {} with {} misses out of {} requests (expected about {expected:e})",
        s.miss_ratio(),
        s.misses,
        s.requests()
    );
}

/// The helpers saturate / stay exact at the extremes (the fix of daa9799).
#[test]
fn stats_helpers_at_the_extremes() {
    let mut s = CacheStats::default();
    s.hits = u64::MAX;
    s.misses = u64::MAX;
    assert_eq!(s.requests(), u64::MAX);
    assert_eq!(s.hit_ratio(), 0.5);
    assert_eq!(s.miss_ratio(), 0.5);
    s.load_successes = u64::MAX;
    s.load_failures = u64::MAX;
    s.total_load_time = Duration::MAX;
    let avg = s.average_load_time();
    // Duration::MAX / (2^65 - 2): a bit more than half a second.
    let expect_nanos = Duration::MAX.as_nanos() / (2 * u128::from(u64::MAX));
    assert_eq!(avg.as_nanos(), expect_nanos);
    s.load_successes = 1;
    s.load_failures = 0;
    assert_eq!(s.average_load_time(), Duration::MAX);
    let mut t = CacheStats::default();
    t.hits = 0;
    t.misses = u64::MAX;
    assert_eq!((t.hit_ratio(), t.miss_ratio()), (0.0, 1.0));
}
