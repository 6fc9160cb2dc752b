//! Sweep 50 (outside, public API only): the last stop's fixes and their neighbours.
//!
//! Attacks fail-safe (`fail_safe`, `refresh_backoff`, `get_or_stale`) on every way a load can
//! end without a value (loader error, panic, a cancelled shared or borrowed async load, a soft
//! timeout on a permit, a spawner dropping the job), `health()` / `health_over()` windows,
//! `CacheStats` differences and helpers, and (feature `redis`) the Redis tier's ordering
//! promises across restarts, FLUSHALL and failing codecs.
//!
//! Found: see the `bug_` tests (each says what the docs promise and what happens instead).
#![cfg(not(any(loom, shuttle)))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, CacheStats, LoadError, ManualClock};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(60);
const BACKOFF: Duration = Duration::from_secs(5);
const MAX_STALE: Duration = Duration::from_secs(600);

/// Polls `f` once with a no-op waker.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let w = futures::task::noop_waker();
    let mut cx = Context::from_waker(&w);
    f.poll(&mut cx)
}

/// A fail-safe cache on a manual clock, key 1 holding "old" and expired (within max_stale).
fn expired_cache() -> (Cache<u32, String>, ManualClock) {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(TTL)
        .fail_safe(MAX_STALE)
        .refresh_backoff(BACKOFF)
        .record_stats()
        .clock(clock.clone())
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    (c, clock)
}

/// After a failed load of key 1: a caller within the backoff gets "old" without running its
/// init; after the backoff one caller loads (and gets the new value).
fn check_backoff(c: &Cache<u32, String>, clock: &ManualClock, what: &str) {
    let calls = AtomicUsize::new(0);
    let v = c.get_with(1, || {
        calls.fetch_add(1, Ordering::SeqCst);
        "new".to_string()
    });
    assert_eq!(
        (v.as_str(), calls.load(Ordering::SeqCst)),
        ("old", 0),
        "{what}: within the backoff the last value answers, with no load"
    );
    clock.advance(BACKOFF);
    let v = c.get_with(1, || {
        calls.fetch_add(1, Ordering::SeqCst);
        "new".to_string()
    });
    assert_eq!(
        (v.as_str(), calls.load(Ordering::SeqCst)),
        ("new", 1),
        "{what}: after the backoff one caller loads"
    );
    c.validate();
}

#[test]
fn loader_error_serves_stale_then_backs_off() {
    let (c, clock) = expired_cache();
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert_eq!(r.unwrap(), "old");
    let s = c.stats();
    assert_eq!((s.load_failures, s.stale_served_after_ttl), (1, 1), "{s:?}");
    check_backoff(&c, &clock, "error");
    let s = c.stats();
    assert_eq!(s.stale_served_after_ttl, 2, "{s:?}");
    assert_eq!(s.loads_abandoned, 0, "{s:?}");
}

#[test]
fn init_panic_goes_to_its_caller_then_backs_off() {
    common::quiet_injected_panics();
    let (c, clock) = expired_cache();
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.get_with(1, || -> String { panic!("injected") })
    }));
    assert!(r.is_err(), "the init's panic goes to its caller");
    let s = c.stats();
    assert_eq!(s.load_failures, 1, "{s:?}");
    check_backoff(&c, &clock, "panic");
}

#[test]
fn shared_load_dropped_by_its_only_caller_after_a_poll_backs_off() {
    let _w = watchdog(Duration::from_secs(60), "shared drop");
    let (c, clock) = expired_cache();
    {
        let mut f = Box::pin(c.get_with_async_shared(1, std::future::pending::<String>()));
        assert!(poll_once(f.as_mut()).is_pending());
    }
    let s = c.stats();
    assert_eq!(s.loads_abandoned, 1, "{s:?}");
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    check_backoff(&c, &clock, "shared load dropped");
}

#[test]
fn borrowed_async_leader_dropped_backs_off() {
    let _w = watchdog(Duration::from_secs(60), "borrowed drop");
    let (c, clock) = expired_cache();
    {
        let mut f = Box::pin(c.get_with_async(1, std::future::pending::<String>()));
        assert!(poll_once(f.as_mut()).is_pending());
    }
    let s = c.stats();
    assert_eq!(s.loads_abandoned, 1, "{s:?}");
    check_backoff(&c, &clock, "borrowed async leader dropped");
}

#[test]
fn load_async_dropped_backs_off() {
    let _w = watchdog(Duration::from_secs(60), "load_async drop");
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(TTL)
        .fail_safe(MAX_STALE)
        .refresh_backoff(BACKOFF)
        .record_stats()
        .clock(clock.clone())
        .async_loader(|_k: &u32| std::future::pending::<Result<String, BoxError>>())
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    {
        let mut f = Box::pin(c.load_async(1));
        assert!(poll_once(f.as_mut()).is_pending());
    }
    let s = c.stats();
    assert_eq!((s.loads_abandoned, s.stale_served_after_ttl), (1, 0), "{s:?}");
    check_backoff(&c, &clock, "load_async dropped");
}

/// Hits + misses and the loading-call identity of `CacheStats::misses`' docs, after failures
/// answered by fail-safe, a panic, an abandoned shared load and joins.
#[test]
fn miss_identity_holds_through_fail_safe_answers() {
    common::quiet_injected_panics();
    let (c, clock) = expired_cache();
    for k in 2..6 {
        c.insert(k, "old".to_string());
    }
    clock.advance(TTL + Duration::from_secs(1));
    let _: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    let _ = catch_unwind(AssertUnwindSafe(|| {
        c.get_with(2, || -> String { panic!("injected") })
    }));
    {
        let mut f = Box::pin(c.get_with_async_shared(3, std::future::pending::<String>()));
        assert!(poll_once(f.as_mut()).is_pending());
    }
    for k in 1..6 {
        for _ in 0..3 {
            let _ = c.get_with(k, || "x".to_string());
        }
    }
    let s = c.stats();
    assert_eq!(
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits
            - s.refreshes_started,
        "{s:?}"
    );
}

/// `CacheStats`' helpers on extreme figures: the period difference saturates (the last stop's
/// fix), and `evictions()` adds saturating.
#[test]
fn stats_difference_saturates_on_every_field() {
    let mut later = CacheStats::default();
    later.hits = 5;
    later.misses = 5;
    later.total_load_time = Duration::from_secs(1);
    let mut earlier = CacheStats::default();
    earlier.hits = 7;
    earlier.misses = 9;
    earlier.total_load_time = Duration::from_secs(2);
    earlier.expired.count = 3;
    earlier.size.weight = 3;
    earlier.remote.hits = 4;
    let d = later - earlier;
    assert_eq!((d.hits, d.misses), (0, 0));
    assert_eq!(d.total_load_time, Duration::ZERO);
    assert_eq!(d.evictions().count, 0);
    assert_eq!(d.remote.hits, 0);
}

/// `CacheStats::requests` is documented as `hits + misses`, and `hit_ratio` as `hits /
/// requests`: on counters near the top of `u64` (the counters themselves wrap, and the last
/// stop made `evictions()`' sum saturate for the same reason) the sum overflows — a panic in a
/// debug build — in `requests()`, `hit_ratio()`, `miss_ratio()`; `average_load_time()`'s
/// `load_successes + load_failures` likewise. Expected: a saturating sum, as `evictions()`.
#[test]
fn bug_stats_requests_and_ratios_overflow_like_evictions_did() {
    let mut s = CacheStats::default();
    s.hits = u64::MAX;
    s.misses = 1;
    s.load_successes = u64::MAX;
    s.load_failures = 1;
    s.total_load_time = Duration::from_secs(1);
    let r = catch_unwind(AssertUnwindSafe(|| s.requests()));
    assert_eq!(r.ok(), Some(u64::MAX), "requests() overflowed");
    let r = catch_unwind(AssertUnwindSafe(|| s.hit_ratio()));
    assert!(r.is_ok(), "hit_ratio() overflowed");
    let r = catch_unwind(AssertUnwindSafe(|| s.average_load_time()));
    assert!(r.is_ok(), "average_load_time() overflowed");
}

#[test]
fn get_or_stale_never_beyond_max_stale_and_ends_with_a_write() {
    let (c, clock) = expired_cache();
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    c.invalidate(&1);
    assert_eq!(c.get_or_stale(&1), None);
    c.insert(2, "two".to_string());
    clock.advance(TTL + MAX_STALE);
    assert_eq!(c.get_or_stale(&2), None);
    let r: Result<String, Arc<BoxError>> = c.try_get_with(2, || Err("down".into()));
    assert!(r.is_err());
    let _ = LoadError::Timeout;
}
