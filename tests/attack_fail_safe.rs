//! An outside sweep of the `*_by_ref` API, fail-safe (`fail_safe`, `get_or_stale`), and their
//! interactions with refresh-ahead, negative caching, jitter, per-entry expiry, time to idle,
//! weighted capacity, soft timeouts and the load limit — through the public API only, time
//! driven by `ManualClock`. Tests named `s37_...` failed before stop 37's fixes (expected vs
//! observed above each).

#![cfg(not(any(loom, shuttle)))]

mod common;

use herdcache::{BoxError, Cache, CacheBuilder, CacheStats, Expiry, LoadError, ManualClock};
use herdcache::{Op, RemovalCause};
use std::borrow::Borrow;
use std::cell::Cell;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const TTL: u64 = 10;
const MAX_STALE: u64 = 30;
const BACKOFF: u64 = 4;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn wd(what: &'static str) -> common::Watchdog {
    common::watchdog(Duration::from_secs(30), what)
}

/// A backend the test can take down; counts its calls.
#[derive(Clone, Default)]
struct Backend {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    next: Arc<AtomicU64>,
}

impl Backend {
    fn call(&self) -> Result<u64, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(BoxError::from("backend down"))
        } else {
            Ok(self.next.load(Ordering::SeqCst))
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn down(&self, d: bool) {
        self.down.store(d, Ordering::SeqCst);
    }
    fn set(&self, v: u64) {
        self.next.store(v, Ordering::SeqCst);
    }
}

fn fs(clock: &ManualClock) -> CacheBuilder<u64, u64> {
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
}

fn fs_loader(clock: &ManualClock, b: &Backend) -> Cache<u64, u64> {
    let b = b.clone();
    fs(clock).loader(move |_k: &u64| b.call()).build()
}

/// The documented balance of a cache read only through loading calls.
fn balanced(s: &CacheStats) {
    assert_eq!(
        s.misses + s.refreshes_started,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "miss balance: {s:?}"
    );
}

fn err() -> Result<u64, &'static str> {
    Err("down")
}

// ---------------------------------------------------------------------------------------------
// A borrowed key type whose `to_owned` is counted (per thread) and can be made to panic.

thread_local! {
    static TO_OWNED: Cell<usize> = const { Cell::new(0) };
    static TO_OWNED_PANICS: Cell<bool> = const { Cell::new(false) };
}

fn to_owned_calls() -> usize {
    TO_OWNED.with(Cell::get)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct KeyRef {
    id: u64,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct OwnedKey {
    r: KeyRef,
}

impl Clone for OwnedKey {
    fn clone(&self) -> Self {
        OwnedKey {
            r: KeyRef { id: self.r.id },
        }
    }
}

impl Borrow<KeyRef> for OwnedKey {
    fn borrow(&self) -> &KeyRef {
        &self.r
    }
}

impl ToOwned for KeyRef {
    type Owned = OwnedKey;
    fn to_owned(&self) -> OwnedKey {
        TO_OWNED.with(|c| c.set(c.get() + 1));
        if TO_OWNED_PANICS.with(Cell::get) {
            panic!("to_owned panics");
        }
        OwnedKey {
            r: KeyRef { id: self.id },
        }
    }
}

fn kr(id: u64) -> KeyRef {
    KeyRef { id }
}
fn ko(id: u64) -> OwnedKey {
    OwnedKey { r: kr(id) }
}

fn fs_ref(clock: &ManualClock) -> CacheBuilder<OwnedKey, u64> {
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
}

/// Releases a blocked thread when dropped (also when an assertion fails first: no hang).
struct SendOnDrop(Option<mpsc::Sender<()>>);

impl Drop for SendOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Spins (yielding) until `cond` holds: waits on an observable state, not on time.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < secs(20), "never happened: {what}");
        std::thread::yield_now();
    }
}

// =============================================================================================
// (1) *_by_ref
// =============================================================================================

#[test]
fn by_ref_hit_makes_no_owned_key_miss_makes_one() {
    let _w = wd("by_ref_hit_makes_no_owned_key_miss_makes_one");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    let base = to_owned_calls();
    assert_eq!(c.get_with_by_ref(&kr(1), || 5), 5);
    assert_eq!(to_owned_calls() - base, 1);
    assert_eq!(c.get_with_by_ref(&kr(1), || unreachable!()), 5);
    assert_eq!(c.try_get_with_by_ref(&kr(1), err), Ok(5));
    assert_eq!(c.optionally_get_with_by_ref(&kr(1), || None), Some(5));
    futures::executor::block_on(async {
        assert_eq!(c.get_with_by_ref_async(&kr(1), async { 9 }).await, 5);
        assert_eq!(
            c.try_get_with_by_ref_async(&kr(1), async { err() }).await,
            Ok(5)
        );
        assert_eq!(
            c.optionally_get_with_by_ref_async(&kr(1), async { None })
                .await,
            Some(5)
        );
    });
    assert_eq!(to_owned_calls() - base, 1, "hits made no owned key");
    let s = c.stats();
    assert_eq!((s.hits, s.misses), (6, 1));
    balanced(&s);
}

#[test]
fn by_ref_stats_equal_owned_stats_for_the_same_script() {
    let _w = wd("by_ref_stats_equal_owned_stats_for_the_same_script");
    fn script(by_ref: bool) -> CacheStats {
        let clock = ManualClock::new();
        let c = fs_ref(&clock).negative_ttl(secs(2)).build();
        let get = |id: u64, v: u64| {
            if by_ref {
                c.get_with_by_ref(&kr(id), || v)
            } else {
                c.get_with(ko(id), || v)
            }
        };
        let tryg = |id: u64, r: Result<u64, &'static str>| {
            if by_ref {
                c.try_get_with_by_ref(&kr(id), || r)
            } else {
                c.try_get_with(ko(id), || r)
            }
        };
        let opt = |id: u64, r: Option<u64>| {
            if by_ref {
                c.optionally_get_with_by_ref(&kr(id), || r)
            } else {
                c.optionally_get_with(ko(id), || r)
            }
        };
        assert_eq!(get(1, 1), 1);
        assert_eq!(get(1, 2), 1);
        assert!(tryg(2, Err("x")).is_err());
        assert!(tryg(2, Ok(3)).is_err(), "negative entry answers");
        assert_eq!(opt(3, None), None);
        assert_eq!(opt(3, Some(1)), None, "negative entry answers");
        assert_eq!(get(3, 7), 7, "get_with loads over a negative entry");
        clock.advance(secs(TTL + 1));
        assert_eq!(tryg(1, Err("down")), Ok(1), "fail-safe: stale");
        assert_eq!(tryg(1, Ok(8)), Ok(1), "within the backoff: stale");
        clock.advance(secs(BACKOFF));
        assert_eq!(tryg(1, Ok(8)), Ok(8));
        let r = catch_unwind(AssertUnwindSafe(|| {
            if by_ref {
                c.get_with_by_ref(&kr(4), || panic!("init"))
            } else {
                c.get_with(ko(4), || panic!("init"))
            }
        }));
        assert!(r.is_err());
        assert_eq!(get(4, 4), 4);
        c.stats()
    }
    let a = script(false);
    let b = script(true);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    balanced(&b);
}

#[test]
fn by_ref_joins_an_owned_leader_and_owned_joins_a_by_ref_leader() {
    let _w = wd("by_ref_joins_an_owned_leader_and_owned_joins_a_by_ref_leader");
    for ref_leads in [false, true] {
        let clock = ManualClock::new();
        let c = fs_ref(&clock).build();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_tx = SendOnDrop(Some(go_tx));
        let go_rx = Mutex::new(go_rx);
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let go_tx = go_tx; // dropped (releasing the thread) if an assertion fails
            let leader = s.spawn(|| {
                let init = || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    in_tx.send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                    11
                };
                if ref_leads {
                    c.get_with_by_ref(&kr(1), init)
                } else {
                    c.get_with(ko(1), init)
                }
            });
            in_rx.recv().unwrap();
            let joiner = s.spawn(|| {
                let init = || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    22
                };
                if ref_leads {
                    c.get_with(ko(1), init)
                } else {
                    c.get_with_by_ref(&kr(1), init)
                }
            });
            until("the joiner joined", || c.stats().coalesced == 1);
            drop(go_tx);
            assert_eq!(leader.join().unwrap(), 11);
            assert_eq!(joiner.join().unwrap(), 11);
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let s = c.stats();
        assert_eq!((s.misses, s.coalesced, s.load_successes), (2, 1, 1));
    }
}

#[test]
fn by_ref_to_owned_panic_leaves_the_key_loadable_and_stats_balanced() {
    let _w = wd("by_ref_to_owned_panic_leaves_the_key_loadable_and_stats_balanced");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    TO_OWNED_PANICS.with(|p| p.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| c.get_with_by_ref(&kr(1), || 1)));
    let r2 = catch_unwind(AssertUnwindSafe(|| {
        c.try_get_with_by_ref(&kr(1), || Ok::<_, ()>(1))
    }));
    let r3 = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(c.get_with_by_ref_async(&kr(1), async { 1 }))
    }));
    let r4 = catch_unwind(AssertUnwindSafe(|| c.entry_by_ref(&kr(1))));
    TO_OWNED_PANICS.with(|p| p.set(false));
    assert!(r.is_err() && r2.is_err() && r3.is_err() && r4.is_err());
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get_with_by_ref(&kr(1), || 2), 2);
    balanced(&c.stats());
    c.validate();
}

#[test]
fn by_ref_negative_caching_answers_the_remembered_failure() {
    let _w = wd("by_ref_negative_caching_answers_the_remembered_failure");
    let clock = ManualClock::new();
    let c: Cache<OwnedKey, u64> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(secs(5))
        .clock(clock.clone())
        .record_stats()
        .build();
    let e1 = c
        .try_get_with_by_ref(&kr(1), || Err::<u64, _>("a"))
        .unwrap_err();
    let e2 = c
        .try_get_with_by_ref(&kr(1), || Ok::<_, &str>(1))
        .unwrap_err();
    assert!(Arc::ptr_eq(&e1, &e2));
    let e3 = futures::executor::block_on(
        c.try_get_with_by_ref_async(&kr(1), async { Ok::<_, &str>(1) }),
    )
    .unwrap_err();
    assert!(Arc::ptr_eq(&e1, &e3));
    // An owned caller gets the same remembered failure.
    let e4 = c.try_get_with(ko(1), || Ok::<_, &str>(1)).unwrap_err();
    assert!(Arc::ptr_eq(&e1, &e4));
    // get_with_by_ref loads again (no way to answer a failure).
    assert_eq!(c.get_with_by_ref(&kr(1), || 3), 3);
    assert_eq!(c.optionally_get_with_by_ref(&kr(2), || None), None);
    assert_eq!(c.optionally_get_with_by_ref(&kr(2), || Some(1)), None);
    clock.advance(secs(5));
    assert_eq!(c.optionally_get_with_by_ref(&kr(2), || Some(1)), Some(1));
    let s = c.stats();
    assert_eq!(s.negative_hits, 4);
    balanced(&s);
}

#[test]
fn by_ref_hit_starts_a_refresh_with_the_stored_key() {
    let _w = wd("by_ref_hit_starts_a_refresh_with_the_stored_key");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let c: Cache<OwnedKey, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(100))
        .refresh_after(secs(10))
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &OwnedKey| {
            Ok::<_, BoxError>(k.r.id * 100 + c2.fetch_add(1, Ordering::SeqCst) as u64)
        })
        .build();
    assert_eq!(c.get_with_by_ref(&kr(1), || 1), 1);
    clock.advance(secs(11));
    let base = to_owned_calls();
    // Due: the old value answers, the refresh runs inline (no spawner) with the stored key.
    assert_eq!(c.get_with_by_ref(&kr(1), || unreachable!()), 1);
    assert_eq!(
        to_owned_calls(),
        base,
        "a hit that refreshes makes no owned key"
    );
    assert_eq!(c.get(&kr(1)), Some(100));
    let s = c.stats();
    assert_eq!((s.refreshes_started, s.refreshes_succeeded), (1, 1));
    balanced(&s);
}

#[test]
fn by_ref_fail_safe_serves_stale_once_per_backoff() {
    let _w = wd("by_ref_fail_safe_serves_stale_once_per_backoff");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    c.insert(ko(1), 1);
    clock.advance(secs(TTL));
    let calls = AtomicUsize::new(0);
    let fail = || {
        calls.fetch_add(1, Ordering::SeqCst);
        Err::<u64, _>("down")
    };
    assert_eq!(c.try_get_with_by_ref(&kr(1), fail), Ok(1));
    assert_eq!(c.try_get_with_by_ref(&kr(1), fail), Ok(1));
    assert_eq!(
        futures::executor::block_on(c.try_get_with_by_ref_async(&kr(1), async { fail() })),
        Ok(1)
    );
    assert_eq!(
        c.get_with_by_ref(&kr(1), || 99),
        1,
        "within the backoff: stale"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.try_get_with_by_ref(&kr(1), fail), Ok(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    clock.advance(secs(MAX_STALE));
    assert!(
        c.try_get_with_by_ref(&kr(1), fail).is_err(),
        "never past max_stale"
    );
    let s = c.stats();
    assert_eq!(s.stale_served_after_ttl, 5);
    balanced(&s);
}

#[test]
fn by_ref_optionally_none_removes_the_stale_value() {
    let _w = wd("by_ref_optionally_none_removes_the_stale_value");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    c.insert(ko(1), 1);
    clock.advance(secs(TTL + 1));
    assert_eq!(c.optionally_get_with_by_ref(&kr(1), || None), None);
    assert_eq!(c.get_or_stale(&kr(1)), None);
    assert_eq!(c.try_get_with_by_ref(&kr(1), err), Err(Arc::new("down")));
    assert_eq!(c.entry_count(), 0);
}

#[test]
fn entry_by_ref_or_insert_with_falls_back_and_compute_sees_nothing() {
    let _w = wd("entry_by_ref_or_insert_with_falls_back_and_compute_sees_nothing");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    c.insert(ko(1), 1);
    clock.advance(secs(TTL + 1));
    let e = c.entry_by_ref(&kr(1)).or_try_insert_with(err);
    assert_eq!(e.map(|e| e.into_value()), Ok(1));
    let _ = c.entry_by_ref(&kr(1)).and_compute_with(|old| {
        assert!(old.is_none(), "an expired entry is absent to a computation");
        Op::Nop
    });
    assert_eq!(c.get_or_stale(&kr(1)), Some(1));
    let _ = c.entry_by_ref(&kr(1)).and_compute_with(|_| Op::Remove);
    assert_eq!(
        c.get_or_stale(&kr(1)),
        None,
        "Op::Remove ends the stale value"
    );
}

// =============================================================================================
// (2) fail-safe
// =============================================================================================

#[test]
fn get_or_stale_exact_bounds() {
    let _w = wd("get_or_stale_exact_bounds");
    let clock = ManualClock::new();
    let c = fs(&clock).build();
    c.insert(1, 1);
    clock.advance(secs(TTL) - Duration::from_nanos(1));
    assert_eq!(c.get(&1), Some(1));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get(&1), None);
    assert_eq!(c.get_or_stale(&1), Some(1));
    clock.advance(secs(MAX_STALE) - Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), Some(1));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), None);
    assert_eq!(c.stats().stale_served_after_ttl, 2);
}

#[test]
fn load_exact_bounds_of_the_stale_window() {
    let _w = wd("load_exact_bounds_of_the_stale_window");
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = fs_loader(&clock, &b);
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    b.down(true);
    clock.advance(secs(TTL + MAX_STALE) - Duration::from_nanos(1));
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(Duration::from_nanos(1));
    // The retry deadline is a backoff ahead, but the stale window has closed.
    assert!(matches!(c.load(1), Err(LoadError::Loader(_))));
}

#[test]
fn stale_window_is_measured_from_an_expiry_deadline() {
    let _w = wd("stale_window_is_measured_from_an_expiry_deadline");
    struct PerValue;
    impl Expiry<u64, u64> for PerValue {
        fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
            Some(secs(*v))
        }
        fn expire_after_update(&self, _k: &u64, v: &u64, _r: Option<Duration>) -> Option<Duration> {
            Some(secs(*v))
        }
    }
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(PerValue)
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 5);
    c.insert(2, 50);
    clock.advance(secs(6));
    assert_eq!(c.try_get_with(1, err), Ok(5));
    assert_eq!(c.try_get_with(2, err), Ok(50), "live");
    clock.advance(secs(29)); // 35: key 1 is 30 past its deadline
    assert_eq!(c.get_or_stale(&1), None);
    assert!(c.try_get_with(1, err).is_err());
    // A write with the expiry's own deadline already due: stale at once, its window from now.
    // (documented: entries already expired at `now` are not stored).
    c.insert(3, 0);
    assert_eq!(c.get(&3), None);
    assert_eq!(c.get_or_stale(&3), None);
    assert!(c.try_get_with(3, err).is_err());
}

#[test]
fn stale_window_with_time_to_idle_starts_at_the_last_read() {
    let _w = wd("stale_window_with_time_to_idle_starts_at_the_last_read");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(secs(10))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    clock.advance(secs(8));
    assert_eq!(c.get(&1), Some(1)); // idle deadline now 18
    clock.advance(secs(10)); // 18: idle
    assert_eq!(c.get(&1), None);
    // A stale serve is no read: it does not move the idle deadline.
    assert_eq!(c.try_get_with(1, err), Ok(1));
    assert_eq!(c.get(&1), None);
    assert_eq!(c.get_or_stale(&1), Some(1));
    clock.advance(secs(MAX_STALE) - Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), Some(1));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), None);
    assert!(c.try_get_with(1, err).is_err());
}

#[test]
fn stale_entries_count_in_the_weighted_bound() {
    let _w = wd("stale_entries_count_in_the_weighted_bound");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .shards(1)
        .build();
    for k in 0..10 {
        c.insert(k, 10);
    }
    assert_eq!(c.weighted_size(), 100);
    clock.advance(secs(TTL + 1));
    c.run_pending_tasks();
    assert_eq!(c.weighted_size(), 100, "stale entries are kept and weighed");
    assert_eq!(c.entry_count(), 10);
    assert_eq!(c.iter().count(), 0, "iteration never sees them");
    for k in 100..105 {
        c.insert(k, 10);
        assert!(c.weighted_size() <= 100, "bound: {}", c.weighted_size());
    }
    c.validate();
    let live: u64 = c.iter().map(|(_, v)| v).sum();
    assert!(live <= 50);
    clock.advance(secs(TTL + MAX_STALE));
    c.run_pending_tasks();
    let live: u64 = c.iter().map(|(_, v)| v).sum();
    assert_eq!(
        c.weighted_size(),
        live,
        "after max_stale only the live weight is left"
    );
    assert_eq!(c.entry_count(), c.iter().count() as u64);
    c.validate();
}

#[test]
fn stale_value_never_returns_after_invalidate_or_insert() {
    let _w = wd("stale_value_never_returns_after_invalidate_or_insert");
    let clock = ManualClock::new();
    let c = fs(&clock).build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    assert_eq!(c.try_get_with(1, err), Ok(1));
    c.invalidate(&1);
    assert_eq!(c.get_or_stale(&1), None);
    assert!(c.try_get_with(1, err).is_err());
    // A newer insert that then expires: its own value is the stale one.
    c.insert(2, 1);
    clock.advance(secs(TTL + 1));
    assert_eq!(c.try_get_with(2, err), Ok(1));
    c.insert(2, 2);
    clock.advance(secs(TTL + 1));
    assert_eq!(c.get_or_stale(&2), Some(2));
    assert_eq!(
        c.try_get_with(2, err),
        Ok(2),
        "the newer value, no retry deadline inherited"
    );
    assert_eq!(c.stats().load_failures, 4);
}

#[test]
fn invalidate_during_a_failing_load_leaves_nothing_to_fall_back_on() {
    let _w = wd("invalidate_during_a_failing_load_leaves_nothing_to_fall_back_on");
    let clock = ManualClock::new();
    let c = fs(&clock).build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let r = c.try_get_with(1, || {
        c.invalidate(&1);
        err()
    });
    assert!(r.is_err(), "invalidated: no stale value");
    assert_eq!(c.get_or_stale(&1), None);
    // Same with an insert during the failing load: the insert's value stays, the caller
    // gets the error (writes win), never the older value.
    c.insert(2, 1);
    clock.advance(secs(TTL + 1));
    let r = c.try_get_with(2, || {
        c.insert(2, 2);
        err()
    });
    assert_ne!(r, Ok(1));
    assert_eq!(c.get(&2), Some(2));
}

#[test]
fn invalidate_racing_stale_serves_never_resurrects() {
    let _w = wd("invalidate_racing_stale_serves_never_resurrects");
    for round in 0..200u64 {
        let clock = ManualClock::new();
        let c = fs(&clock).build();
        c.insert(1, round);
        clock.advance(secs(TTL + 1));
        assert_eq!(c.try_get_with(1, err), Ok(round));
        let gone = AtomicBool::new(false);
        let barrier = Barrier::new(3);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..50 {
                        let seen_gone = gone.load(Ordering::SeqCst);
                        let r = c.try_get_with(1, err);
                        let r2 = c.get_or_stale(&1);
                        if seen_gone {
                            assert!(r.is_err(), "stale after invalidate: {r:?}");
                            assert_eq!(r2, None, "stale after invalidate");
                        }
                    }
                });
            }
            barrier.wait();
            c.invalidate(&1);
            gone.store(true, Ordering::SeqCst);
        });
    }
}

#[test]
fn one_retry_per_backoff_by_one_caller_many_threads() {
    let _w = wd("one_retry_per_backoff_by_one_caller_many_threads");
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = fs_loader(&clock, &b);
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    b.down(true);
    for step in 0..8u64 {
        clock.advance(secs(TTL + 1).min(secs(BACKOFF)) + secs(u64::from(step == 0) * TTL));
        let before = b.calls();
        let barrier = Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..20 {
                        match c.load(1) {
                            Ok(v) => assert_eq!(v, 1),
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                });
            }
        });
        assert_eq!(b.calls() - before, 1, "step {step}: one retry per backoff");
        if clock.elapsed() >= secs(TTL + MAX_STALE - BACKOFF) {
            break;
        }
    }
    balanced(&c.stats());
}

#[test]
fn soft_timeout_of_a_hung_loader_serves_stale_and_the_load_lands_later() {
    let _w = wd("soft_timeout_of_a_hung_loader_serves_stale_and_the_load_lands_later");
    let clock = ManualClock::new();
    let (tx, rx) = mpsc::channel::<u64>();
    let rx = Mutex::new(rx);
    let c: Cache<u64, u64> = fs(&clock)
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |_k: &u64| Ok::<_, BoxError>(rx.lock().unwrap().recv().unwrap()))
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
    assert_eq!(r.unwrap(), 1, "timed out: the last value");
    // Meanwhile callers get the old value at once, with no second load.
    assert_eq!(
        c.load_with_timeout(1, Some(Duration::from_millis(20)))
            .unwrap(),
        1
    );
    assert_eq!(c.try_get_with(1, || Ok::<_, ()>(7)), Ok(1));
    tx.send(2).unwrap();
    until("the hung load landed", || c.get(&1) == Some(2));
    assert_eq!(c.load(1).unwrap(), 2);
    until("no load in flight", || c.loads_in_flight() == 0);
}

#[test]
fn permit_wait_past_its_deadline_serves_stale_and_releases_the_key() {
    let _w = wd("permit_wait_past_its_deadline_serves_stale_and_releases_the_key");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = fs(&clock)
        .max_concurrent_loads(1)
        .loader(|k: &u64| Ok::<_, BoxError>(*k * 10))
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_tx = SendOnDrop(Some(go_tx));
    let go_rx = Mutex::new(go_rx);
    std::thread::scope(|s| {
        let go_tx = go_tx; // dropped (releasing the thread) if an assertion fails
        let holder = s.spawn(|| {
            c.get_with(2, || {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                2
            })
        });
        in_rx.recv().unwrap();
        let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
        assert_eq!(r.unwrap(), 1, "permit wait timed out: the last value");
        assert_eq!(c.loads_in_flight(), 1, "only the holder's load");
        assert_eq!(
            c.try_get_with(1, || Ok::<_, ()>(9)),
            Ok(1),
            "within the backoff"
        );
        drop(go_tx);
        assert_eq!(holder.join().unwrap(), 2);
    });
    clock.advance(secs(BACKOFF));
    assert_eq!(c.load(1).unwrap(), 10);
    balanced(&c.stats());
}

#[test]
fn loader_never_returns_waiters_with_timeout_get_stale() {
    let _w = wd("loader_never_returns_waiters_with_timeout_get_stale");
    let clock = ManualClock::new();
    let c = fs(&clock).loader(|_k: &u64| Ok::<_, BoxError>(7)).build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_tx = SendOnDrop(Some(go_tx));
    let go_rx = Mutex::new(go_rx);
    std::thread::scope(|s| {
        let go_tx = go_tx; // dropped (releasing the thread) if an assertion fails
        let leader = s.spawn(|| {
            c.get_with(1, || {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                2
            })
        });
        in_rx.recv().unwrap();
        // A failed load has not happened: the key has no retry deadline, a caller joins.
        let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
        drop(go_tx);
        assert!(
            matches!(r, Ok(1)),
            "a timed out join gets the last value: {r:?}"
        );
        assert_eq!(leader.join().unwrap(), 2);
    });
    assert_eq!(c.get(&1), Some(2));
}

#[test]
fn init_panic_leader_gets_panic_others_get_stale_and_key_reloads() {
    let _w = wd("init_panic_leader_gets_panic_others_get_stale_and_key_reloads");
    let clock = ManualClock::new();
    let c = fs(&clock).build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let r = catch_unwind(AssertUnwindSafe(|| c.get_with(1, || panic!("init"))));
    assert!(r.is_err());
    assert_eq!(c.get_with(1, || 5), 1, "within the backoff: stale");
    clock.advance(secs(BACKOFF));
    assert_eq!(c.get_with(1, || 5), 5);
    let s = c.stats();
    assert_eq!(s.stale_served_after_ttl, 1);
    balanced(&s);
}

// Faults in user code at the store of a load that replaces a stale entry.

#[derive(Debug)]
struct Boom {
    v: u64,
    clone_panics: Arc<AtomicUsize>,
}

impl Clone for Boom {
    fn clone(&self) -> Self {
        let n = self.clone_panics.load(Ordering::SeqCst);
        if n > 0 {
            self.clone_panics.store(n - 1, Ordering::SeqCst);
            panic!("clone panics");
        }
        Boom {
            v: self.v,
            clone_panics: Arc::clone(&self.clone_panics),
        }
    }
}

#[test]
fn value_clone_panicking_at_the_stale_fallback_leaves_the_key_usable() {
    let _w = wd("value_clone_panicking_at_the_stale_fallback_leaves_the_key_usable");
    let clock = ManualClock::new();
    let boom = Arc::new(AtomicUsize::new(0));
    let c: Cache<u64, Boom> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .build();
    let mk = |v| Boom {
        v,
        clone_panics: Arc::clone(&boom),
    };
    c.insert(1, mk(1));
    clock.advance(secs(TTL + 1));
    boom.store(1, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.try_get_with(1, || Err::<Boom, _>("down"))
    }));
    assert!(r.is_err(), "the clone's panic reaches the caller");
    assert_eq!(c.loads_in_flight(), 0);
    let v = c.try_get_with(1, || Err::<Boom, _>("down")).unwrap();
    assert_eq!(v.v, 1);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.get_with(1, || mk(2)).v, 2);
    c.validate();
    balanced(&c.stats());
}

#[test]
fn value_clone_panicking_at_a_stale_read_leaves_the_key_usable() {
    let _w = wd("value_clone_panicking_at_a_stale_read_leaves_the_key_usable");
    let clock = ManualClock::new();
    let boom = Arc::new(AtomicUsize::new(0));
    let c: Cache<u64, Boom> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .build();
    let mk = |v| Boom {
        v,
        clone_panics: Arc::clone(&boom),
    };
    c.insert(1, mk(1));
    clock.advance(secs(TTL + 1));
    assert_eq!(c.try_get_with(1, || Err::<Boom, _>("down")).unwrap().v, 1);
    boom.store(1, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| c.get_or_stale(&1)));
    assert!(r.is_err());
    boom.store(1, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| c.get_with(1, || mk(9))));
    assert!(r.is_err());
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get_with(1, || mk(9)).v, 1, "still within the backoff");
    clock.advance(secs(BACKOFF));
    assert_eq!(c.get_with(1, || mk(9)).v, 9);
    c.validate();
    let mut s = c.stats();
    s.misses -= 1; // get_or_stale's miss is a plain read's
    balanced(&s);
}

#[test]
fn weigher_panicking_on_the_store_over_a_stale_entry() {
    let _w = wd("weigher_panicking_on_the_store_over_a_stale_entry");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(1000)
        .weigher(|_k: &u64, v: &u64| {
            assert!(*v != 666, "weigher panics");
            1
        })
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let r = catch_unwind(AssertUnwindSafe(|| c.get_with(1, || 666)));
    assert!(r.is_err());
    assert_eq!(c.loads_in_flight(), 0);
    // Nothing stored, the old value kept; the backend did not fail, so the next caller
    // loads (the waiters "load again", as get_with's docs say).
    assert_eq!(c.get_or_stale(&1), Some(1));
    assert_eq!(c.get_with(1, || 2), 2);
    assert_eq!(c.weighted_size(), 1);
    c.validate();
    let mut s = c.stats();
    s.misses -= 1; // get_or_stale's miss is a plain read's
    balanced(&s);
}

struct PanickyExpiry {
    create: Arc<AtomicBool>,
    update: Arc<AtomicBool>,
    read: Arc<AtomicBool>,
}

impl Expiry<u64, u64> for PanickyExpiry {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        assert!(!self.create.load(Ordering::SeqCst), "create panics");
        Some(secs(TTL))
    }
    fn expire_after_update(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        assert!(!self.update.load(Ordering::SeqCst), "update panics");
        Some(secs(TTL))
    }
    fn expire_after_read(&self, _k: &u64, _v: &u64, r: Option<Duration>) -> Option<Duration> {
        assert!(!self.read.load(Ordering::SeqCst), "read panics");
        r
    }
}

#[test]
fn expiry_callbacks_panicking_around_a_stale_entry() {
    let _w = wd("expiry_callbacks_panicking_around_a_stale_entry");
    let clock = ManualClock::new();
    let (create, update, read) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(PanickyExpiry {
            create: Arc::clone(&create),
            update: Arc::clone(&update),
            read: Arc::clone(&read),
        })
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    // A stale serve reads nothing: expire_after_read is not asked.
    read.store(true, Ordering::SeqCst);
    assert_eq!(c.get_or_stale(&1), Some(1));
    assert_eq!(c.try_get_with(1, err), Ok(1));
    read.store(false, Ordering::SeqCst);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.get_with(1, || 3), 3);
    assert_ne!(c.get_or_stale(&1), Some(1));
    c.validate();
    let mut s = c.stats();
    s.misses -= 1; // get_or_stale's miss is a plain read's
    balanced(&s);
}

#[test]
fn listener_panicking_on_the_replaced_stale_entry() {
    let _w = wd("listener_panicking_on_the_replaced_stale_entry");
    let clock = ManualClock::new();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heard);
    let c: Cache<u64, u64> = fs(&clock)
        .eviction_listener(move |k: &u64, v: &u64, cause| {
            h.lock().unwrap().push((*k, *v, cause));
            panic!("listener panics");
        })
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let r = catch_unwind(AssertUnwindSafe(|| c.get_with(1, || 2)));
    assert!(
        r.is_err(),
        "the listener's panic reaches the caller after the store"
    );
    assert_eq!(c.get(&1), Some(2));
    assert_eq!(c.loads_in_flight(), 0);
    let heard = heard.lock().unwrap().clone();
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0].1, 1);
    assert!(matches!(
        heard[0].2,
        RemovalCause::Expired | RemovalCause::Replaced
    ));
    c.validate();
}

#[test]
fn spawner_dropping_a_load_job_under_fail_safe() {
    let _w = wd("spawner_dropping_a_load_job_under_fail_safe");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let c: Cache<u64, u64> = fs(&clock)
        .spawner(drop)
        .loader(move |_k: &u64| b2.call())
        .build();
    b.set(1);
    assert_eq!(
        c.load_with_timeout(1, Some(secs(5))).unwrap(),
        1,
        "runs in its caller"
    );
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(b.calls(), 1);
    balanced(&c.stats());
}

#[test]
fn refresh_failing_then_expiry_then_stale_then_recovery() {
    let _w = wd("refresh_failing_then_expiry_then_stale_then_recovery");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let c: Cache<u64, u64> = fs(&clock)
        .refresh_after(secs(5))
        .negative_ttl(secs(100))
        .loader(move |_k: &u64| b2.call())
        .build();
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    b.down(true);
    clock.advance(secs(6));
    assert_eq!(
        c.load(1).unwrap(),
        1,
        "due: old value, refresh fails inline"
    );
    assert_eq!(b.calls(), 2);
    clock.advance(secs(5)); // 11: expired
    assert_eq!(c.load(1).unwrap(), 1, "stale, not the remembered error");
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(b.calls(), 3);
    b.down(false);
    b.set(3);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.load(1).unwrap(), 3);
    let s = c.stats();
    assert_eq!(s.negative_hits, 0);
    balanced(&s);
}

#[test]
fn negative_ttl_without_stale_value_and_fail_safe_with_one() {
    let _w = wd("negative_ttl_without_stale_value_and_fail_safe_with_one");
    let clock = ManualClock::new();
    let c = fs(&clock).negative_ttl(secs(100)).build();
    let e1 = c.try_get_with(1, err).unwrap_err();
    let e2 = c.try_get_with(1, || Ok::<_, &str>(1)).unwrap_err();
    assert!(Arc::ptr_eq(&e1, &e2));
    c.insert(1, 5);
    clock.advance(secs(TTL + 1));
    assert_eq!(c.try_get_with(1, err), Ok(5));
    clock.advance(secs(BACKOFF));
    assert_eq!(
        c.try_get_with(1, err),
        Ok(5),
        "stale after the retry, not remembered"
    );
    clock.advance(secs(MAX_STALE));
    let e = c.try_get_with(1, err).unwrap_err();
    let e2 = c.try_get_with(1, || Ok::<_, &str>(1)).unwrap_err();
    assert!(Arc::ptr_eq(&e, &e2), "past max_stale: remembered again");
    balanced(&c.stats());
}

#[test]
fn jitter_keeps_stale_window_within_max_stale_of_the_jittered_deadline() {
    let _w = wd("jitter_keeps_stale_window_within_max_stale_of_the_jittered_deadline");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = fs(&clock).jitter(0.5).build();
    for k in 0..200 {
        c.insert(k, k);
    }
    // Every entry expires by 15 s and is gone by 15 + 30.
    clock.advance(secs(15));
    for k in 0..200 {
        assert_eq!(c.get(&k), None);
    }
    clock.advance(secs(MAX_STALE));
    for k in 0..200 {
        assert_eq!(c.get_or_stale(&k), None, "key {k} past its window");
        assert!(c.try_get_with(k, err).is_err());
    }
    // And no entry is stale before 5 s.
    let c: Cache<u64, u64> = fs(&clock).jitter(0.5).build();
    for k in 0..200 {
        c.insert(k, k);
    }
    clock.advance(secs(5) - Duration::from_nanos(1));
    for k in 0..200 {
        assert_eq!(c.get(&k), Some(k));
    }
}

// Failed before stop 37's fix (now the expected behaviour holds).
// Fail-safe says "until a load fails, the key behaves as without fail-safe: the first caller
// after the deadline loads it", and the spawner's docs say a load whose job the spawner drops
// "falls back to running in its caller". Expected: the caller of an expired key runs the
// (healthy) loader and gets the new value 2. Observed: the stale value 1, the backend never
// called. The dropped job's lead counts as a failed load for fail-safe (src/load.rs:425,
// `Lead::drop`: `failed_load = self.load || ...` ignores `handed_back`), which sets the key's
// retry deadline; the caller's inline retry (src/loader.rs, `load_spawned`,
// `Waited::Abandoned`) is then answered by the stale value, and so is every caller for a
// backoff while the backend is healthy.
#[test]
fn s37_spawner_dropping_a_load_job_serves_stale_instead_of_loading_in_the_caller() {
    let _w = wd("bug_spawner_dropping_a_load_job_serves_stale_instead_of_loading_in_the_caller");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let c: Cache<u64, u64> = fs(&clock)
        .spawner(drop)
        .loader(move |_k: &u64| b2.call())
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    b.set(2);
    let r = c.load_with_timeout(1, Some(secs(5)));
    assert_eq!(
        (r.ok(), b.calls()),
        (Some(2), 1),
        "the dropped job's load runs in its caller"
    );
}

// Failed before stop 37's fix (now the expected behaviour holds).
// A panicking `Expiry::expire_after_create` on the store of a value over an expired entry
// kept for fail-safe. Expected: nothing is stored and the old value stays the key's fail-safe
// fallback ("expired entries are kept until max_stale passes"; the write did not happen, and
// `create` documents "user code runs before anything is mutated"). Observed: the last value
// is gone (`get_or_stale` None, a failing load within max_stale returns the error):
// `Core::insert` (src/shard/core.rs:747) removes the expired slot (reported Expired) before
// `create` calls `on_create` (src/shard/core.rs:831), which panics. Same through a load's
// store (get_with).
#[test]
fn s37_expire_after_create_panic_on_a_store_erases_the_fail_safe_value() {
    let _w = wd("bug_expire_after_create_panic_on_a_store_erases_the_fail_safe_value");
    let clock = ManualClock::new();
    let create = Arc::new(AtomicBool::new(false));
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(PanickyExpiry {
            create: Arc::clone(&create),
            update: Arc::new(AtomicBool::new(false)),
            read: Arc::new(AtomicBool::new(false)),
        })
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    create.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| c.insert(1, 2)));
    create.store(false, Ordering::SeqCst);
    assert!(r.is_err());
    assert_eq!(c.get_or_stale(&1), Some(1), "the last value is still kept");
    assert_eq!(c.try_get_with(1, err), Ok(1));
}

#[test]
fn expire_after_create_panic_through_a_load_leaves_the_key_loadable() {
    let _w = wd("expire_after_create_panic_through_a_load_leaves_the_key_loadable");
    let clock = ManualClock::new();
    let create = Arc::new(AtomicBool::new(false));
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(PanickyExpiry {
            create: Arc::clone(&create),
            update: Arc::clone(&create),
            read: Arc::new(AtomicBool::new(false)),
        })
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    create.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| c.get_with(1, || 2)));
    create.store(false, Ordering::SeqCst);
    assert!(r.is_err());
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get_with(1, || 3), 3);
    assert_eq!(c.get(&1), Some(3));
    c.validate();
    balanced(&c.stats());
}

// Failed before stop 37's fix (now the expected behaviour holds).
// Same root cause as the dropped job above, through a spawner that panics (its docs: "a load
// falls back to running in its caller"). Expected: the caller of the expired key runs the
// healthy loader (2, one backend call). Observed: the stale value 1, no backend call (the job's
// lead, dropped while the spawner unwinds, counts as a failed load for fail-safe:
// src/load.rs:425 `Lead::drop`).
#[test]
fn s37_spawner_panicking_for_a_load_serves_stale_instead_of_loading_in_the_caller() {
    let _w = wd("bug_spawner_panicking_for_a_load_serves_stale_instead_of_loading_in_the_caller");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let c: Cache<u64, u64> = fs(&clock)
        .spawner(|_job| panic!("spawner panics"))
        .loader(move |_k: &u64| b2.call())
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    b.set(2);
    let r = catch_unwind(AssertUnwindSafe(|| c.load_with_timeout(1, Some(secs(5)))));
    assert_eq!(c.loads_in_flight(), 0);
    let r = r.expect("the caller loads itself").ok();
    assert_eq!((r, b.calls()), (Some(2), 1));
}

#[test]
fn async_by_ref_leader_dropped_mid_load_releases_the_key() {
    let _w = wd("async_by_ref_leader_dropped_mid_load_releases_the_key");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    // Without a stale value: the next caller loads.
    {
        let k = kr(1);
        let mut fut = Box::pin(c.get_with_by_ref_async(&k, std::future::pending()));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(c.loads_in_flight(), 1);
    }
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get_with_by_ref(&kr(1), || 3), 3);
    // With one: an abandoned async leader is a failed load (documented): the last value.
    clock.advance(secs(TTL + 1));
    {
        let k = kr(1);
        let mut fut =
            Box::pin(c.try_get_with_by_ref_async(&k, std::future::pending::<Result<u64, ()>>()));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get_with_by_ref(&kr(1), || 4), 3);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.get_with_by_ref(&kr(1), || 4), 4);
    balanced(&c.stats());
}

#[test]
fn retain_and_invalidate_all_with_stale_entries() {
    let _w = wd("retain_and_invalidate_all_with_stale_entries");
    let clock = ManualClock::new();
    let c = fs(&clock).build();
    for k in 0..4 {
        c.insert(k, k);
    }
    clock.advance(secs(TTL + 1));
    c.retain(|k, _| k % 2 == 0);
    assert_eq!(c.get_or_stale(&0), Some(0));
    assert_eq!(c.get_or_stale(&1), None);
    assert_eq!(c.try_get_with(1, err), Err(Arc::new("down")));
    assert_eq!(c.try_get_with(2, err), Ok(2));
    c.invalidate_all();
    assert_eq!(c.get_or_stale(&0), None);
    assert_eq!(c.try_get_with(2, err), Err(Arc::new("down")));
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
}

#[test]
fn evicted_stale_entries_are_reported_expired_and_weights_agree() {
    let _w = wd("evicted_stale_entries_are_reported_expired_and_weights_agree");
    let clock = ManualClock::new();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heard);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(20)
        .weigher(|_k: &u64, v: &u64| (*v % 3 + 1) as u32)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |k: &u64, v: &u64, cause| {
            h.lock().unwrap().push((*k, *v, cause));
        })
        .build();
    let mut inserted = 0u64;
    for k in 0..20 {
        c.insert(k, k);
        inserted += k % 3 + 1;
    }
    clock.advance(secs(TTL + 1));
    let mark = heard.lock().unwrap().len();
    for k in 100..140 {
        c.insert(k, k);
        inserted += k % 3 + 1;
        assert!(c.weighted_size() <= 20);
    }
    c.validate();
    let heard = heard.lock().unwrap().clone();
    let removed: u64 = heard.iter().map(|(_, v, _)| v % 3 + 1).sum();
    assert_eq!(
        inserted - removed,
        c.weighted_size(),
        "weights agree with the reports"
    );
    for (k, _, cause) in &heard[mark..] {
        if *k < 20 {
            assert_eq!(*cause, RemovalCause::Expired, "a stale entry evicted: {k}");
        }
    }
    let s = c.stats();
    assert_eq!(
        s.expired.weight + s.size.weight + s.replaced.weight + s.explicit.weight,
        removed
    );
}

#[test]
fn inserts_racing_stale_serves_never_bring_the_older_value_back() {
    let _w = wd("inserts_racing_stale_serves_never_bring_the_older_value_back");
    for round in 0..100u64 {
        let clock = ManualClock::new();
        let c = fs(&clock).build();
        c.insert(1, 0);
        clock.advance(secs(TTL + 1));
        assert_eq!(c.try_get_with(1, err), Ok(0));
        let written = AtomicU64::new(0);
        let barrier = Barrier::new(3);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (c, written, barrier) = (&c, &written, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..60 {
                        let floor = written.load(Ordering::SeqCst);
                        let r = match (t + i) % 4 {
                            0 => c.try_get_with(1, err).ok(),
                            1 => c.get_or_stale(&1),
                            2 => Some(c.get_with(1, || 0)),
                            _ => c.try_get_with_by_ref(&1, err).ok(),
                        };
                        if let Some(v) = r {
                            assert!(v >= floor, "round {round}: {v} after {floor} was written");
                        }
                    }
                });
            }
            barrier.wait();
            for v in 1..=20 {
                c.insert(1, v);
                written.store(v, Ordering::SeqCst);
            }
        });
    }
}

#[test]
fn mixed_callers_one_retry_per_backoff() {
    let _w = wd("mixed_callers_one_retry_per_backoff");
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = fs_loader(&clock, &b);
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    b.down(true);
    clock.advance(secs(TTL));
    let mut expected = 0;
    while clock.elapsed() < secs(TTL + MAX_STALE) {
        let before = b.calls();
        let barrier = Barrier::new(6);
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let (c, b, barrier) = (&c, &b, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..10 {
                        let v = match (t + i) % 6 {
                            0 => c.load(1).ok(),
                            1 => c.try_get_with(1, || b.call()).ok(),
                            2 => c.try_get_with_by_ref(&1, || b.call()).ok(),
                            3 => futures::executor::block_on(
                                c.try_get_with_async(1, async { b.call() }),
                            )
                            .ok(),
                            4 => futures::executor::block_on(
                                c.try_get_with_by_ref_async(&1, async { b.call() }),
                            )
                            .ok(),
                            _ => c
                                .entry(1)
                                .or_try_insert_with(|| b.call())
                                .ok()
                                .map(|e| e.into_value()),
                        };
                        assert_eq!(
                            v,
                            Some(1),
                            "stale within the window, variant {}",
                            (t + i) % 6,
                        );
                    }
                });
            }
        });
        expected += 1;
        assert_eq!(
            b.calls() - before,
            1,
            "one retry per backoff at {:?}",
            clock.elapsed()
        );
        clock.advance(secs(BACKOFF));
    }
    assert!(expected > 5);
    let s = c.stats();
    balanced(&s);
}

#[test]
fn a_timed_out_waiter_never_gets_a_value_past_max_stale() {
    let _w = wd("a_timed_out_waiter_never_gets_a_value_past_max_stale");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = fs(&clock).loader(|_k: &u64| Ok::<_, BoxError>(7)).build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_tx = SendOnDrop(Some(go_tx));
    let go_rx = Mutex::new(go_rx);
    std::thread::scope(|s| {
        let go_tx = go_tx; // dropped (releasing the thread) if an assertion fails
        let leader = s.spawn(|| {
            c.get_with(1, || {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                2
            })
        });
        in_rx.recv().unwrap();
        let waiter = s.spawn(|| c.load_with_timeout(1, Some(Duration::from_secs(5))));
        until("the waiter joined", || c.stats().coalesced == 1);
        clock.advance(secs(MAX_STALE)); // the stale window closes while it waits
        let r = waiter.join().unwrap();
        drop(go_tx);
        assert!(
            matches!(r, Err(LoadError::Timeout)),
            "past max_stale: {r:?}"
        );
        assert_eq!(leader.join().unwrap(), 2);
    });
}

#[test]
fn a_permit_wait_that_outlives_the_stale_window_times_out() {
    let _w = wd("a_permit_wait_that_outlives_the_stale_window_times_out");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = fs(&clock)
        .max_concurrent_loads(1)
        .loader(|k: &u64| Ok::<_, BoxError>(*k * 10))
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_tx = SendOnDrop(Some(go_tx));
    let go_rx = Mutex::new(go_rx);
    std::thread::scope(|s| {
        let go_tx = go_tx; // dropped (releasing the thread) if an assertion fails
        let holder = s.spawn(|| {
            c.get_with(2, || {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                2
            })
        });
        in_rx.recv().unwrap();
        let waiter = s.spawn(|| c.load_with_timeout(1, Some(Duration::from_secs(5))));
        until("the leader waits for a permit", || {
            c.stats().loads_waited_for_limit == 1
        });
        clock.advance(secs(MAX_STALE));
        let r = waiter.join().unwrap();
        drop(go_tx);
        assert!(
            matches!(r, Err(LoadError::Timeout)),
            "past max_stale: {r:?}"
        );
        assert_eq!(holder.join().unwrap(), 2);
    });
    assert_eq!(c.load(1).unwrap(), 10);
}

#[test]
fn fail_safe_zero_max_stale_is_no_fail_safe() {
    let _w = wd("fail_safe_zero_max_stale_is_no_fail_safe");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .time_to_live(secs(TTL))
        .fail_safe(Duration::ZERO)
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL));
    assert_eq!(c.get_or_stale(&1), None);
    assert!(c.try_get_with(1, err).is_err());
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
}

#[test]
fn fail_safe_without_any_deadline_is_inert() {
    let _w = wd("fail_safe_without_any_deadline_is_inert");
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .fail_safe(secs(MAX_STALE))
        .record_stats()
        .build();
    c.insert(1, 1);
    assert_eq!(c.get_or_stale(&1), Some(1));
    assert!(c.try_get_with(2, err).is_err());
    assert_eq!(c.get_or_stale(&2), None);
    assert_eq!(c.get_with_by_ref(&3, || 3), 3);
    c.validate();
}

#[test]
fn async_by_ref_and_owned_stats_agree() {
    let _w = wd("async_by_ref_and_owned_stats_agree");
    fn script(by_ref: bool) -> CacheStats {
        let clock = ManualClock::new();
        let c = fs_ref(&clock).negative_ttl(secs(2)).build();
        futures::executor::block_on(async {
            let k = |id| ko(id);
            macro_rules! call {
                ($m:ident, $mr:ident, $id:expr, $f:expr) => {
                    if by_ref {
                        c.$mr(&kr($id), $f).await
                    } else {
                        c.$m(k($id), $f).await
                    }
                };
            }
            assert_eq!(
                call!(get_with_async, get_with_by_ref_async, 1, async { 1 }),
                1
            );
            assert_eq!(
                call!(get_with_async, get_with_by_ref_async, 1, async { 2 }),
                1
            );
            assert!(
                call!(try_get_with_async, try_get_with_by_ref_async, 2, async {
                    Err::<u64, _>("x")
                })
                .is_err()
            );
            assert!(
                call!(try_get_with_async, try_get_with_by_ref_async, 2, async {
                    Ok::<u64, &str>(1)
                })
                .is_err()
            );
            assert_eq!(
                call!(
                    optionally_get_with_async,
                    optionally_get_with_by_ref_async,
                    3,
                    async { None }
                ),
                None
            );
            clock.advance(secs(TTL + 1));
            assert_eq!(
                call!(try_get_with_async, try_get_with_by_ref_async, 1, async {
                    err()
                }),
                Ok(1)
            );
            assert_eq!(
                call!(try_get_with_async, try_get_with_by_ref_async, 1, async {
                    Ok::<u64, &str>(5)
                }),
                Ok(1)
            );
        });
        c.stats()
    }
    let a = script(false);
    let b = script(true);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    balanced(&b);
}

#[test]
fn by_ref_clone_panic_on_the_read_that_claims_a_refresh_does_not_lose_it() {
    let _w = wd("by_ref_clone_panic_on_the_read_that_claims_a_refresh_does_not_lose_it");
    let clock = ManualClock::new();
    let boom = Arc::new(AtomicUsize::new(0));
    let b2 = Arc::clone(&boom);
    let n = Arc::new(AtomicU64::new(1));
    let n2 = Arc::clone(&n);
    let c: Cache<u64, Boom> = Cache::builder()
        .max_capacity(10)
        .time_to_live(secs(100))
        .refresh_after(secs(10))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            Ok::<_, BoxError>(Boom {
                v: n2.fetch_add(1, Ordering::SeqCst),
                clone_panics: Arc::clone(&b2),
            })
        })
        .build();
    assert_eq!(c.load(1).unwrap().v, 1);
    clock.advance(secs(11));
    boom.store(1, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.get_with_by_ref(&1, || unreachable!()).v
    }));
    assert!(r.is_err());
    assert_eq!(c.loads_in_flight(), 0);
    let v = c.get_with_by_ref(&1, || unreachable!()).v;
    assert!(v == 1 || v == 2);
    assert_eq!(c.get(&1).map(|b| b.v), Some(2), "the refresh ran");
    let s = c.stats();
    assert_eq!(s.refreshes_started, 1);
}

#[test]
fn expire_after_update_panicking_on_a_refresh_store_keeps_the_value() {
    let _w = wd("expire_after_update_panicking_on_a_refresh_store_keeps_the_value");
    let clock = ManualClock::new();
    let update = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(1));
    let n2 = Arc::clone(&n);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .expire_after(PanickyExpiry {
            create: Arc::new(AtomicBool::new(false)),
            update: Arc::clone(&update),
            read: Arc::new(AtomicBool::new(false)),
        })
        .refresh_after(secs(2))
        .refresh_backoff(secs(1))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| Ok::<_, BoxError>(n2.fetch_add(1, Ordering::SeqCst)))
        .build();
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(secs(3));
    update.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| c.load(1)));
    update.store(false, Ordering::SeqCst);
    // The inline refresh's store panicked: the reader got the old value or the panic.
    if let Ok(r) = r {
        assert_eq!(r.unwrap(), 1);
    }
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get(&1), Some(1), "the old value stays");
    clock.advance(secs(1));
    assert_eq!(
        c.load(1).unwrap(),
        1,
        "due again after the backoff: refresh inline"
    );
    assert_eq!(c.get(&1), Some(3));
    c.validate();
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed
    );
}

// ---------------------------------------------------------------------------------------------
// A model of fail-safe, checked step by step (single thread, manual clock, no eviction):
// every answer, every backend call, the weight after reclaiming.

#[derive(Clone, Copy, Debug)]
struct ModelEntry {
    v: u64,
    deadline: u64,
    retry: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn model_run(seed: u64, tti: bool) {
    const NS: u64 = 1_000_000_000;
    let clock = ManualClock::new();
    let b = Cache::builder().max_capacity(1_000);
    let b = if tti {
        b.time_to_idle(secs(TTL))
    } else {
        b.time_to_live(secs(TTL))
    };
    let c: Cache<String, u64> = b
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .build();
    let mut m: Vec<Option<ModelEntry>> = vec![None; 4];
    let mut rng = Rng(seed | 1);
    let mut now = 0u64;
    let mut next_v = 100u64;
    let names = ["a", "b", "c", "d"];
    for step in 0..400 {
        let k = rng.below(4) as usize;
        let name = names[k];
        let ctx = format!("seed {seed} tti {tti} step {step} key {name} now {now}s");
        // Drop what is past its window.
        if let Some(e) = m[k] {
            if now >= e.deadline + MAX_STALE {
                m[k] = None;
            }
        }
        let live = m[k].filter(|e| now < e.deadline);
        let stale = m[k].filter(|e| now >= e.deadline);
        let op = rng.below(9);
        match op {
            0 => {
                next_v += 1;
                c.insert(name.to_string(), next_v);
                m[k] = Some(ModelEntry {
                    v: next_v,
                    deadline: now + TTL,
                    retry: 0,
                });
            }
            1 => {
                c.invalidate(name);
                m[k] = None;
            }
            2 => {
                now += rng.below(4);
                clock.advance(secs(now) - clock.elapsed());
            }
            3 => {
                let want = m[k].map(|e| e.v);
                assert_eq!(c.get_or_stale(name), want, "get_or_stale: {ctx}");
                if let (Some(e), true) = (live, tti) {
                    m[k] = Some(ModelEntry {
                        deadline: now + TTL,
                        ..e
                    });
                }
            }
            4..=7 => {
                // A load call: fails (4, 5), succeeds (6) or answers None (7).
                let calls = Cell::new(0);
                next_v += 1;
                let fresh = next_v;
                let got: Option<u64> = match (op, rng.below(2)) {
                    (4 | 5, 0) => c
                        .try_get_with_by_ref(name, || {
                            calls.set(calls.get() + 1);
                            Err::<u64, _>("down")
                        })
                        .ok(),
                    (4 | 5, _) => c
                        .try_get_with(name.to_string(), || {
                            calls.set(calls.get() + 1);
                            Err::<u64, _>("down")
                        })
                        .ok(),
                    (6, 0) => Some(c.get_with_by_ref(name, || {
                        calls.set(calls.get() + 1);
                        fresh
                    })),
                    (6, _) => c
                        .entry_by_ref(name)
                        .or_try_insert_with(|| {
                            calls.set(calls.get() + 1);
                            Ok::<_, ()>(fresh)
                        })
                        .ok()
                        .map(|e| e.into_value()),
                    _ => c.optionally_get_with_by_ref(name, || {
                        calls.set(calls.get() + 1);
                        None
                    }),
                };
                let (want, want_calls) = if let Some(e) = live {
                    if tti {
                        m[k] = Some(ModelEntry {
                            deadline: now + TTL,
                            ..e
                        });
                    }
                    (Some(e.v), 0)
                } else if let Some(e) = stale.filter(|e| e.retry != 0 && now < e.retry) {
                    (Some(e.v), 0)
                } else {
                    match op {
                        4 | 5 => match stale {
                            Some(e) => {
                                m[k] = Some(ModelEntry {
                                    retry: now + BACKOFF,
                                    ..e
                                });
                                (Some(e.v), 1)
                            }
                            None => (None, 1),
                        },
                        6 => {
                            m[k] = Some(ModelEntry {
                                v: fresh,
                                deadline: now + TTL,
                                retry: 0,
                            });
                            (Some(fresh), 1)
                        }
                        _ => {
                            m[k] = None;
                            (None, 1)
                        }
                    }
                };
                assert_eq!((got, calls.get()), (want, want_calls), "op {op}: {ctx}");
            }
            _ => {
                let want = live.map(|e| e.v);
                assert_eq!(c.get(name), want, "get: {ctx}");
                if let (Some(e), true) = (live, tti) {
                    m[k] = Some(ModelEntry {
                        deadline: now + TTL,
                        ..e
                    });
                }
            }
        }
        if step % 25 == 0 {
            c.run_pending_tasks();
            let kept = m
                .iter()
                .flatten()
                .filter(|e| now < e.deadline + MAX_STALE)
                .count() as u64;
            assert_eq!(c.weighted_size(), kept, "weight after reclaiming: {ctx}");
            assert_eq!(c.entry_count(), kept, "count after reclaiming: {ctx}");
            let live_n = m.iter().flatten().filter(|e| now < e.deadline).count();
            assert_eq!(c.iter().count(), live_n, "iteration: {ctx}");
            c.validate();
        }
        let _ = NS;
    }
}

#[test]
fn fail_safe_model_ttl() {
    let _w = wd("fail_safe_model_ttl");
    for seed in 1..150 {
        model_run(seed * 7919, false);
    }
}

#[test]
fn fail_safe_model_tti() {
    let _w = wd("fail_safe_model_tti");
    for seed in 1..150 {
        model_run(seed * 104_729, true);
    }
}

#[test]
fn by_ref_recursive_load_panics_instead_of_hanging() {
    let _w = wd("by_ref_recursive_load_panics_instead_of_hanging");
    let c: Cache<String, u64> = Cache::new(10);
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.get_with_by_ref("a", || c.get_with_by_ref("a", || 1))
    }));
    assert!(r.is_err());
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.get_with_by_ref("a", || c.get_with("a".to_string(), || 1))
    }));
    assert!(r.is_err());
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.get_with("a".to_string(), || {
            c.try_get_with_by_ref("a", || Ok::<_, ()>(1)).unwrap()
        })
    }));
    assert!(r.is_err());
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get_with_by_ref("a", || 2), 2);
}

#[test]
fn by_ref_nested_under_a_load_limit_of_one() {
    let _w = wd("by_ref_nested_under_a_load_limit_of_one");
    let c: Cache<String, u64> = Cache::builder()
        .max_capacity(10)
        .max_concurrent_loads(1)
        .build();
    let v = c.get_with_by_ref("a", || c.get_with_by_ref("b", || 2) + 1);
    assert_eq!(v, 3);
    let v = futures::executor::block_on(async {
        c.get_with_by_ref_async("c", async {
            c.get_with_by_ref_async("d", async { 4 }).await + 1
        })
        .await
    });
    assert_eq!(v, 5);
    assert_eq!(c.load_limit_stats(), (1, 0), "one permit, nothing waited");
    assert_eq!(c.loads_in_flight(), 0);
}

thread_local! {
    static HOSTILE_SHIFT: Cell<u64> = const { Cell::new(0) };
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Hostile {
    id: u64,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HostileOwned {
    r: Hostile,
}

impl Clone for HostileOwned {
    fn clone(&self) -> Self {
        HostileOwned {
            r: Hostile { id: self.r.id },
        }
    }
}

impl Borrow<Hostile> for HostileOwned {
    fn borrow(&self) -> &Hostile {
        &self.r
    }
}

impl ToOwned for Hostile {
    type Owned = HostileOwned;
    fn to_owned(&self) -> HostileOwned {
        HostileOwned {
            r: Hostile {
                id: self.id + HOSTILE_SHIFT.with(Cell::get),
            },
        }
    }
}

// A `to_owned` that makes another key (a logic error of the user's, as an inconsistent
// `Hash`; nothing documented): the by-ref load hashes the borrowed key and stores the owned
// one under that hash, so the internal table invariant is broken meanwhile (`validate` fails
// right after these loads; not a documented contract, so not a `bug_`). What is checked: no
// panic in ordinary calls, counts and weights agree with iteration, and everything is
// reclaimed at expiry (no leaked weight).
#[test]
fn by_ref_hostile_to_owned_keeps_the_cache_consistent() {
    let _w = wd("by_ref_hostile_to_owned_keeps_the_cache_consistent");
    let clock = ManualClock::new();
    let c: Cache<HostileOwned, u64> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .shards(1)
        .build();
    HOSTILE_SHIFT.with(|s| s.set(1000));
    for id in 0..50 {
        let _ = c.get_with_by_ref(&Hostile { id }, || id);
    }
    HOSTILE_SHIFT.with(|s| s.set(0));
    let n = c.entry_count();
    assert_eq!(c.iter().count() as u64, n);
    assert_eq!(c.weighted_size(), n);
    for id in 0..50 {
        c.invalidate(&Hostile { id });
        c.invalidate(&Hostile { id: id + 1000 });
    }
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), c.iter().count() as u64);
    assert_eq!(c.weighted_size(), c.entry_count());
    clock.advance(secs(TTL + MAX_STALE));
    c.run_pending_tasks();
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
    for id in 0..500 {
        c.insert(HostileOwned { r: Hostile { id } }, 1);
    }
    assert_eq!(c.entry_count(), 500);
    c.validate();
}

type Job = Box<dyn FnOnce() + Send>;

#[test]
fn a_parked_refresh_dropped_after_expiry_is_not_a_failed_load() {
    let _w = wd("a_parked_refresh_dropped_after_expiry_is_not_a_failed_load");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let jobs: Arc<Mutex<Vec<Job>>> = Arc::default();
    let j2 = Arc::clone(&jobs);
    let c: Cache<u64, u64> = fs(&clock)
        .refresh_after(secs(5))
        .spawner(move |job| j2.lock().unwrap().push(job))
        .loader(move |_k: &u64| b2.call())
        .build();
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(secs(6));
    assert_eq!(c.load(1).unwrap(), 1, "due: old value, refresh parked");
    assert_eq!(jobs.lock().unwrap().len(), 1);
    clock.advance(secs(5)); // expired while the refresh is parked
    b.set(2);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| c.load(1));
        until("the caller joined the parked refresh", || {
            c.stats().coalesced >= 1
        });
        jobs.lock().unwrap().clear(); // dropped unrun
        let r = waiter.join().unwrap();
        // A refresh that never ran is not a failure (fail_safe's docs): the caller loads.
        assert_eq!((r.ok(), b.calls()), (Some(2), 2));
    });
    jobs.lock().unwrap().clear();
    balanced(&c.stats());
}

#[test]
fn a_parked_refresh_that_fails_after_expiry_serves_stale_to_its_joiners() {
    let _w = wd("a_parked_refresh_that_fails_after_expiry_serves_stale_to_its_joiners");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let jobs: Arc<Mutex<Vec<Job>>> = Arc::default();
    let j2 = Arc::clone(&jobs);
    let c: Cache<u64, u64> = fs(&clock)
        .refresh_after(secs(5))
        .spawner(move |job| j2.lock().unwrap().push(job))
        .loader(move |_k: &u64| b2.call())
        .build();
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(secs(6));
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(secs(5));
    b.down(true);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| c.load(1));
        until("the caller joined the parked refresh", || {
            c.stats().coalesced >= 1
        });
        let job = jobs.lock().unwrap().pop().unwrap();
        job();
        assert_eq!(waiter.join().unwrap().unwrap(), 1, "stale");
    });
    assert_eq!(c.load(1).unwrap(), 1, "within the backoff, no load");
    assert_eq!(b.calls(), 2);
    jobs.lock().unwrap().clear();
}

// ---------------------------------------------------------------------------------------------
// Fault sweep: every user-code call site of a fail-safe cache panics now and then (value
// `Clone`, weigher, every `Expiry` callback, the listener, the init), single thread, manual
// clock. After every call: no load left in flight, the key loadable, reads per key never go
// back to an older value (values are numbered in issue order), the internal invariants hold;
// at the end everything is reclaimed and no value leaks.

thread_local! {
    static FAULT: Cell<u32> = const { Cell::new(0) };
}
const F_CLONE: u32 = 1;
const F_WEIGH: u32 = 2;
const F_CREATE: u32 = 4;
const F_UPDATE: u32 = 8;
const F_READ: u32 = 16;
const F_LISTEN: u32 = 32;

fn fault(bit: u32) -> bool {
    FAULT.with(|f| f.get() & bit != 0)
}

static FVAL_LIVE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

#[derive(Debug)]
struct FVal(u64);

impl FVal {
    fn new(v: u64) -> Self {
        FVAL_LIVE.fetch_add(1, Ordering::SeqCst);
        FVal(v)
    }
}

impl Clone for FVal {
    fn clone(&self) -> Self {
        assert!(!fault(F_CLONE), "clone panics");
        FVal::new(self.0)
    }
}

impl Drop for FVal {
    fn drop(&mut self) {
        FVAL_LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

struct FaultyExpiry;

impl Expiry<u64, FVal> for FaultyExpiry {
    fn expire_after_create(&self, _k: &u64, v: &FVal) -> Option<Duration> {
        assert!(!fault(F_CREATE), "create panics");
        Some(secs(5 + v.0 % 10))
    }
    fn expire_after_update(&self, _k: &u64, v: &FVal, _r: Option<Duration>) -> Option<Duration> {
        assert!(!fault(F_UPDATE), "update panics");
        Some(secs(5 + v.0 % 10))
    }
    fn expire_after_read(&self, _k: &u64, _v: &FVal, r: Option<Duration>) -> Option<Duration> {
        assert!(!fault(F_READ), "read panics");
        r
    }
}

fn fault_sweep(seed: u64, expiry: bool) {
    let clock = ManualClock::new();
    let heard = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&heard);
    let b = Cache::builder()
        .max_capacity(40)
        .weigher(|_k: &u64, v: &FVal| {
            assert!(!fault(F_WEIGH), "weigher panics");
            (v.0 % 4 + 1) as u32
        })
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .shards(2)
        .record_stats()
        .eviction_listener(move |_k: &u64, _v: &FVal, _c| {
            h.fetch_add(1, Ordering::SeqCst);
            assert!(!fault(F_LISTEN), "listener panics");
        });
    let c: Cache<u64, FVal> = if expiry {
        b.expire_after(FaultyExpiry).build()
    } else {
        b.time_to_live(secs(TTL)).jitter(0.3).build()
    };
    let mut rng = Rng(seed | 1);
    let mut next = 0u64;
    let mut floor = [0u64; 12];
    for step in 0..600 {
        let k = rng.below(12);
        let faults = if rng.below(3) == 0 {
            1 << rng.below(6)
        } else {
            0
        };
        next += 1;
        let v = next;
        let op = rng.below(8);
        let init_panics = rng.below(8) == 0;
        FAULT.with(|f| f.set(faults));
        let r = catch_unwind(AssertUnwindSafe(|| -> Option<u64> {
            match op {
                0 => {
                    c.insert(k, FVal::new(v));
                    None
                }
                1 => {
                    c.invalidate(&k);
                    None
                }
                2 => c.get(&k).map(|x| x.0),
                3 => c.get_or_stale(&k).map(|x| x.0),
                4 => Some(
                    c.get_with_by_ref(&k, || {
                        assert!(!init_panics, "init panics");
                        FVal::new(v)
                    })
                    .0,
                ),
                5 => c
                    .try_get_with(k, || {
                        assert!(!init_panics, "init panics");
                        Err::<FVal, _>("down")
                    })
                    .ok()
                    .map(|x| x.0),
                6 => c
                    .optionally_get_with(k, || {
                        assert!(!init_panics, "init panics");
                        (v % 3 != 0).then(|| FVal::new(v))
                    })
                    .map(|x| x.0),
                _ => {
                    clock.advance(secs(rng.below(4)));
                    None
                }
            }
        }));
        FAULT.with(|f| f.set(0));
        let ctx =
            format!("seed {seed} expiry {expiry} step {step} op {op} key {k} faults {faults}");
        assert_eq!(c.loads_in_flight(), 0, "{ctx}");
        match (op, r) {
            // A write or invalidation that returned (or panicked in the listener, after it
            // took effect): nothing older may come back.
            (0 | 1, Ok(_)) => floor[k as usize] = v,
            (_, Ok(Some(got))) => {
                assert!(
                    got >= floor[k as usize],
                    "older value {got} < {}: {ctx}",
                    floor[k as usize]
                );
                floor[k as usize] = got;
            }
            _ => {}
        }
        if step % 50 == 0 {
            c.validate();
            assert!(c.weighted_size() <= 40, "{ctx}");
        }
    }
    c.validate();
    // Every key still loads.
    for k in 0..12 {
        next += 1;
        let v = c.get_with(k, || FVal::new(next)).0;
        assert!(v >= floor[k as usize]);
    }
    clock.advance(secs(1000));
    c.run_pending_tasks();
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0), "seed {seed}");
    let s = c.stats();
    let removed = s.expired.count + s.explicit.count + s.replaced.count + s.size.count;
    assert_eq!(
        removed,
        heard.load(Ordering::SeqCst) as u64,
        "listener heard every removal"
    );
    drop(c);
}

#[test]
fn fault_sweep_ttl_jitter() {
    let _w = wd("fault_sweep_ttl_jitter");
    let _l = FVAL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for seed in 1..40 {
        fault_sweep(seed * 31_337, false);
    }
    assert_eq!(FVAL_LIVE.load(Ordering::SeqCst), 0, "values leaked");
}

#[test]
fn fault_sweep_expiry() {
    let _w = wd("fault_sweep_expiry");
    let _l = FVAL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for seed in 1..40 {
        fault_sweep(seed * 7_777, true);
    }
    assert_eq!(FVAL_LIVE.load(Ordering::SeqCst), 0, "values leaked");
}

static FVAL_LOCK: Mutex<()> = Mutex::new(());

#[test]
fn stress_by_ref_and_owned_single_flight_with_faults_and_fail_safe() {
    let _w = wd("stress_by_ref_and_owned_single_flight_with_faults_and_fail_safe");
    let clock = ManualClock::new();
    let c: Cache<String, u64> = Cache::builder()
        .max_capacity(8)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .negative_ttl(secs(1))
        .clock(clock.clone())
        .record_stats()
        .build();
    let running: Vec<AtomicUsize> = (0..6).map(|_| AtomicUsize::new(0)).collect();
    let names = ["k0", "k1", "k2", "k3", "k4", "k5"];
    let counter = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, running, counter, clock) = (&c, &running, &counter, &clock);
            s.spawn(move || {
                let mut rng = Rng(t * 1_000_003 + 17);
                for _ in 0..1500 {
                    let k = rng.below(6) as usize;
                    let name = names[k];
                    let mode = rng.below(10);
                    let load = || {
                        assert_eq!(
                            running[k].fetch_add(1, Ordering::SeqCst),
                            0,
                            "two loads of {name}"
                        );
                        let v = counter.fetch_add(1, Ordering::SeqCst);
                        running[k].fetch_sub(1, Ordering::SeqCst);
                        v
                    };
                    let r = catch_unwind(AssertUnwindSafe(|| match mode {
                        0 => {
                            c.get_with_by_ref(name, || {
                                let v = load();
                                assert!(v % 7 != 0, "init panics");
                                v
                            });
                        }
                        1 => {
                            let _ = c.try_get_with_by_ref(name, || {
                                let v = load();
                                if v % 3 == 0 {
                                    Err("down")
                                } else {
                                    Ok(v)
                                }
                            });
                        }
                        2 => {
                            let _ = c.optionally_get_with_by_ref(name, || {
                                let v = load();
                                (v % 5 != 0).then_some(v)
                            });
                        }
                        3 => {
                            let _ = futures::executor::block_on(c.try_get_with_by_ref_async(
                                name,
                                async {
                                    let v = load();
                                    if v % 3 == 0 {
                                        Err("down")
                                    } else {
                                        Ok(v)
                                    }
                                },
                            ));
                        }
                        4 => {
                            c.get_with(name.to_string(), load);
                        }
                        5 => {
                            let _ = c.try_get_with(name.to_string(), || Err::<u64, _>("down"));
                        }
                        6 => c.invalidate(name),
                        7 => c.insert(name.to_string(), counter.fetch_add(1, Ordering::SeqCst)),
                        8 => {
                            let _ = c.get_or_stale(name);
                        }
                        _ => clock.advance(Duration::from_millis(rng.below(3000))),
                    }));
                    if let Err(p) = r {
                        let msg = p
                            .downcast_ref::<&str>()
                            .copied()
                            .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                            .unwrap_or("");
                        assert!(!msg.contains("two loads"), "{msg}");
                    }
                }
            });
        }
    });
    assert_eq!(c.loads_in_flight(), 0);
    c.validate();
    for name in names {
        let _ = c.get_with_by_ref(name, || 1);
    }
    clock.advance(secs(1000));
    c.run_pending_tasks();
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
    let s = c.stats();
    // get_or_stale's misses are plain reads' (not balanced): an inequality only.
    let sum =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    assert!(s.misses + s.refreshes_started >= sum, "{s:?}");
}

#[test]
fn a_load_given_up_by_a_computation_is_not_a_failed_load() {
    let _w = wd("a_load_given_up_by_a_computation_is_not_a_failed_load");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let c: Cache<u64, u64> = fs(&clock)
        .max_concurrent_loads(1)
        .loader(move |_k: &u64| b2.call())
        .build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    b.set(2);
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_tx = SendOnDrop(Some(go_tx));
    let go_rx = Mutex::new(go_rx);
    std::thread::scope(|s| {
        let go_tx = go_tx; // dropped (releasing the thread) if an assertion fails
                           // The holder of the only permit runs a computation of key 1 while the leader of key
                           // 1 waits for a permit: the computation takes the load over and gives it up.
        let holder = s.spawn(|| {
            c.get_with(2, || {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                let _ = c.entry(1).and_compute_with(|old| {
                    assert!(old.is_none(), "expired: absent to a computation");
                    Op::Nop
                });
                2
            })
        });
        in_rx.recv().unwrap();
        let leader = s.spawn(|| c.load(1));
        until("the leader waits for a permit", || {
            c.stats().loads_waited_for_limit == 1
        });
        drop(go_tx);
        assert_eq!(holder.join().unwrap(), 2);
        let r = leader.join().unwrap();
        assert_eq!(
            (r.ok(), b.calls()),
            (Some(2), 1),
            "loaded, not the stale value"
        );
    });
    assert_eq!(c.stats().loads_abandoned, 1, "the load was given up");
}

struct ShortenOnRead;

impl Expiry<u64, u64> for ShortenOnRead {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        Some(secs(100))
    }
    fn expire_after_read(&self, _k: &u64, v: &u64, _r: Option<Duration>) -> Option<Duration> {
        Some(secs(*v))
    }
}

#[test]
fn a_read_that_moves_the_deadline_earlier_moves_the_stale_window() {
    let _w = wd("a_read_that_moves_the_deadline_earlier_moves_the_stale_window");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(ShortenOnRead)
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .shards(1)
        .build();
    c.insert(0, 0);
    c.insert(3, 3);
    clock.advance(secs(1));
    assert_eq!(c.get(&0), Some(0)); // the read ends it now: stale from 1 s to 31 s
    assert_eq!(c.get(&3), Some(3)); // due at 4 s: stale until 34 s
    assert_eq!(c.get(&0), None);
    assert_eq!(c.get_or_stale(&0), Some(0));
    assert_eq!(c.try_get_with(0, err), Ok(0));
    clock.advance(secs(MAX_STALE) - Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&0), Some(0));
    clock.advance(Duration::from_nanos(1)); // 31 s
    assert_eq!(c.get_or_stale(&0), None);
    assert!(c.try_get_with(0, err).is_err());
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 1, "key 3 is kept until 34 s");
    assert_eq!(c.get_or_stale(&3), Some(3));
    clock.advance(secs(3));
    assert_eq!(c.get_or_stale(&3), None);
    c.run_pending_tasks();
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
    c.validate();
}

#[test]
fn ttl_and_tti_together_the_stale_window_follows_the_earlier_deadline() {
    let _w = wd("ttl_and_tti_together_the_stale_window_follows_the_earlier_deadline");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(20))
        .time_to_idle(secs(5))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .build();
    c.insert(1, 1); // idle at 5 s
    c.insert(2, 2);
    for _ in 0..4 {
        clock.advance(secs(4));
        assert_eq!(c.get(&2), Some(2)); // keeps key 2 busy: its hard deadline is 20 s
    }
    clock.advance(secs(4));
    // 20 s: key 1 idle since 5 s (stale until 35 s), key 2 at its time to live (until 50 s).
    assert_eq!(c.get(&2), None);
    assert_eq!(c.get_or_stale(&1), Some(1));
    assert_eq!(c.get_or_stale(&2), Some(2));
    clock.advance(secs(15));
    assert_eq!(c.get_or_stale(&1), None);
    assert_eq!(c.get_or_stale(&2), Some(2));
    clock.advance(secs(15));
    assert_eq!(c.get_or_stale(&2), None);
}

#[test]
fn a_too_heavy_write_or_load_ends_the_stale_value() {
    let _w = wd("a_too_heavy_write_or_load_ends_the_stale_value");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    c.insert(2, 2);
    clock.advance(secs(TTL + 1));
    c.insert(1, 11); // too heavy: not stored, the old value removed
    assert_eq!(c.get_or_stale(&1), None);
    assert!(c.try_get_with(1, err).is_err());
    assert_eq!(
        c.get_with(2, || 12),
        12,
        "a too heavy load goes to its caller"
    );
    assert_eq!(c.get_or_stale(&2), None, "and ends the old value");
    assert!(c.try_get_with(2, err).is_err());
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
    c.validate();
}

#[test]
fn an_insert_due_at_once_over_a_stale_entry_ends_it() {
    let _w = wd("an_insert_due_at_once_over_a_stale_entry_ends_it");
    struct ZeroForZero;
    impl Expiry<u64, u64> for ZeroForZero {
        fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
            Some(if *v == 0 { Duration::ZERO } else { secs(TTL) })
        }
        fn expire_after_update(&self, _k: &u64, v: &u64, _r: Option<Duration>) -> Option<Duration> {
            Some(if *v == 0 { Duration::ZERO } else { secs(TTL) })
        }
    }
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .expire_after(ZeroForZero)
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    c.insert(2, 2);
    clock.advance(secs(TTL + 1));
    c.insert(1, 0); // over a stale entry
    assert_eq!(c.get_or_stale(&1), None, "the older value never comes back");
    assert!(c.try_get_with(1, err).is_err());
    clock.rewind(secs(TTL + 1)); // the cache never sees time go back
    assert_eq!(c.get(&2), None);
    c.insert(3, 3);
    c.insert(3, 0); // over a live entry
    assert_eq!(c.get_or_stale(&3), None);
    assert!(c.try_get_with(3, err).is_err());
    c.validate();
}

type ParkedFuture = herdcache::BoxFuture<()>;

#[test]
fn a_parked_async_refresh_dropped_after_expiry_is_not_a_failed_load() {
    let _w = wd("a_parked_async_refresh_dropped_after_expiry_is_not_a_failed_load");
    let clock = ManualClock::new();
    let b = Backend::default();
    let b2 = b.clone();
    let futs: Arc<Mutex<Vec<ParkedFuture>>> = Arc::default();
    let f2 = Arc::clone(&futs);
    let c: Cache<u64, u64> = fs(&clock)
        .refresh_after(secs(5))
        .future_spawner(move |f| f2.lock().unwrap().push(f))
        .async_loader(move |_k: &u64| {
            let r = b2.call();
            async move { r }
        })
        .build();
    b.set(1);
    let load = |c: &Cache<u64, u64>| futures::executor::block_on(c.load_async(1));
    assert_eq!(load(&c).unwrap(), 1);
    clock.advance(secs(6));
    assert_eq!(load(&c).unwrap(), 1, "due: old value, refresh parked");
    assert_eq!(futs.lock().unwrap().len(), 1);
    clock.advance(secs(5)); // expired while the refresh is parked
    b.set(2);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| load(&c));
        until("the caller joined the parked refresh", || {
            c.stats().coalesced >= 1
        });
        futs.lock().unwrap().clear(); // dropped unpolled
        let r = waiter.join().unwrap();
        assert_eq!((r.ok(), b.calls()), (Some(2), 2), "the caller loads");
    });
    futs.lock().unwrap().clear();
    balanced(&c.stats());
}

#[test]
fn removal_reports_of_stale_entries() {
    let _w = wd("removal_reports_of_stale_entries");
    let clock = ManualClock::new();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heard);
    let c: Cache<u64, u64> = fs(&clock)
        .eviction_listener(move |k: &u64, v: &u64, cause| h.lock().unwrap().push((*k, *v, cause)))
        .build();
    for k in 0..4 {
        c.insert(k, k);
    }
    clock.advance(secs(TTL));
    assert!(
        !c.contains_key(&0),
        "a stale entry is not seen by contains_key"
    );
    c.run_pending_tasks();
    assert!(
        heard.lock().unwrap().is_empty(),
        "kept: nothing reported at the deadline"
    );
    assert_eq!(c.remove(&0), None, "remove returns only a live value");
    assert_eq!(c.get_or_stale(&0), None, "but ends the stale one");
    c.invalidate(&1);
    assert_eq!(c.get_or_stale(&1), None);
    clock.advance(secs(MAX_STALE));
    c.run_pending_tasks();
    let mut heard = heard.lock().unwrap().clone();
    heard.sort_by_key(|(k, _, _)| *k);
    assert_eq!(heard.len(), 4, "each entry reported once: {heard:?}");
    assert_eq!(heard[2], (2, 2, RemovalCause::Expired));
    assert_eq!(heard[3], (3, 3, RemovalCause::Expired));
    let s = c.stats();
    assert_eq!(
        s.expired.count + s.explicit.count,
        4,
        "stats agree with the reports: {s:?}"
    );
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
}

#[test]
fn negative_entries_answer_the_entry_by_ref_forms_that_can_use_them() {
    let _w = wd("negative_entries_answer_the_entry_by_ref_forms_that_can_use_them");
    let clock = ManualClock::new();
    let c: Cache<OwnedKey, u64> = Cache::builder()
        .max_capacity(10)
        .negative_ttl(secs(5))
        .clock(clock.clone())
        .record_stats()
        .build();
    let e1 = c
        .try_get_with_by_ref(&kr(1), || Err::<u64, _>("down"))
        .unwrap_err();
    let e2 = c
        .entry_by_ref(&kr(1))
        .or_try_insert_with(|| Ok::<_, &str>(1))
        .unwrap_err();
    assert!(Arc::ptr_eq(&e1, &e2), "the remembered error answers");
    // Forms that cannot answer an error load again.
    let e = c.entry_by_ref(&kr(1)).or_insert_with(|| 3);
    assert!(e.is_fresh());
    assert_eq!(e.into_value(), 3);
    assert_eq!(c.optionally_get_with_by_ref(&kr(2), || None), None);
    let e = c.entry_by_ref(&kr(2)).or_optionally_insert_with(|| Some(4));
    assert!(e.is_none(), "the remembered None answers: {e:?}");
    clock.advance(secs(5));
    let e = c.entry_by_ref(&kr(2)).or_optionally_insert_with(|| Some(4));
    assert_eq!(e.map(|e| e.into_value()), Some(4));
    let s = c.stats();
    assert_eq!(s.negative_hits, 2);
    balanced(&s);
}

#[test]
fn stress_weighted_bound_with_stale_entries() {
    let _w = wd("stress_weighted_bound_with_stale_entries");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(50)
        .weigher(|_k: &u64, v: &u64| (v % 5 + 1) as u32)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .shards(4)
        .record_stats()
        .build();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, clock) = (&c, &clock);
            s.spawn(move || {
                let mut rng = Rng(t * 7 + 3);
                for i in 0..2000u64 {
                    let k = rng.below(64);
                    match rng.below(6) {
                        0 => c.insert(k, i),
                        1 => {
                            let _ = c.try_get_with(k, err);
                        }
                        2 => {
                            c.get_with_by_ref(&k, || i);
                        }
                        3 => {
                            let _ = c.get_or_stale(&k);
                        }
                        4 => c.invalidate(&k),
                        _ => clock.advance(Duration::from_millis(rng.below(2000))),
                    }
                }
            });
        }
    });
    assert!(c.weighted_size() <= 50, "{}", c.weighted_size());
    assert_eq!(c.loads_in_flight(), 0);
    c.validate();
    clock.advance(secs(TTL + MAX_STALE));
    c.run_pending_tasks();
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
}

#[test]
fn a_none_after_a_write_during_the_load_keeps_the_write() {
    let _w = wd("a_none_after_a_write_during_the_load_keeps_the_write");
    let clock = ManualClock::new();
    let c = fs(&clock).negative_ttl(secs(5)).build();
    c.insert(1, 1);
    clock.advance(secs(TTL + 1));
    let r = c.optionally_get_with(1, || {
        c.insert(1, 2);
        None
    });
    assert_eq!(r, None);
    assert_eq!(c.get(&1), Some(2), "the write wins over the None");
    assert_eq!(c.optionally_get_with(1, || None), Some(2));
    // And a stale value written during a failing load of a *live-then-expired* key.
    c.insert(3, 3);
    clock.advance(secs(TTL + 1));
    let r = c.try_get_with(3, || {
        c.invalidate(&3);
        c.insert(3, 4);
        err()
    });
    assert_ne!(r, Ok(3), "never the invalidated value");
    assert_eq!(c.get(&3), Some(4));
}

#[test]
fn health_reports_the_stale_serves_of_every_form() {
    let _w = wd("health_reports_the_stale_serves_of_every_form");
    let clock = ManualClock::new();
    let c = fs_ref(&clock).build();
    assert!(c.health().is_healthy());
    c.insert(ko(1), 1);
    clock.advance(secs(TTL + 1));
    assert_eq!(c.try_get_with_by_ref(&kr(1), err), Ok(1));
    assert_eq!(c.get_with_by_ref(&kr(1), || 2), 1);
    assert_eq!(c.get_or_stale(&kr(1)), Some(1));
    let served = c.stats().stale_served_after_ttl;
    assert_eq!(served, 3);
    let h = c.health();
    let w: Vec<_> = h
        .warnings()
        .iter()
        .filter(|w| matches!(w, herdcache::Warning::ServingStale { .. }))
        .collect();
    assert_eq!(w.len(), 1, "{h:?}");
    assert!(
        matches!(w[0], herdcache::Warning::ServingStale { served: 3 }),
        "{h:?}"
    );
}

#[test]
fn invalidate_entries_if_sees_stale_entries_and_ends_them() {
    let _w = wd("invalidate_entries_if_sees_stale_entries_and_ends_them");
    let clock = ManualClock::new();
    let c = fs(&clock).build();
    c.insert(1, 1);
    c.insert(2, 2);
    clock.advance(secs(TTL + 1));
    c.insert(3, 3); // live
    let seen = Mutex::new(Vec::new());
    c.invalidate_entries_if(|k, _v| {
        seen.lock().unwrap().push(*k);
        *k != 2
    })
    .unwrap();
    let mut seen = seen.into_inner().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(
        c.get_or_stale(&1),
        None,
        "a matched stale value never comes back"
    );
    assert!(c.try_get_with(1, err).is_err());
    assert_eq!(c.try_get_with(2, err), Ok(2));
    assert_eq!(c.get(&3), None);
    // Past its window an entry is removed by retain without being offered.
    clock.advance(secs(MAX_STALE));
    let offered = AtomicUsize::new(0);
    c.retain(|_k, _v| {
        offered.fetch_add(1, Ordering::SeqCst);
        true
    });
    assert_eq!(offered.load(Ordering::SeqCst), 0);
    assert_eq!((c.entry_count(), c.weighted_size()), (0, 0));
}

#[test]
fn a_nested_by_ref_load_takes_over_a_by_ref_leader_waiting_for_the_permit() {
    let _w = wd("a_nested_by_ref_load_takes_over_a_by_ref_leader_waiting_for_the_permit");
    let c: Cache<String, u64> = Cache::builder()
        .max_capacity(10)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_tx = SendOnDrop(Some(go_tx));
    let go_rx = Mutex::new(go_rx);
    let inits = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let go_tx = go_tx;
        let holder = s.spawn(|| {
            c.get_with_by_ref("holder", || {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                // The leader of "a" waits for the permit this load holds: taken over.
                c.get_with_by_ref("a", || {
                    inits.fetch_add(1, Ordering::SeqCst);
                    7
                }) + 1
            })
        });
        in_rx.recv().unwrap();
        let leader = s.spawn(|| {
            c.get_with_by_ref("a", || {
                inits.fetch_add(1, Ordering::SeqCst);
                9
            })
        });
        until("the leader waits for a permit", || {
            c.stats().loads_waited_for_limit == 1
        });
        drop(go_tx);
        assert_eq!(holder.join().unwrap(), 8);
        assert_eq!(leader.join().unwrap(), 7);
    });
    assert_eq!(inits.load(Ordering::SeqCst), 1);
    assert_eq!(c.loads_in_flight(), 0);
    balanced(&c.stats());
}
