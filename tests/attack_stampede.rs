//! Attack sweep (outside, public API only) of the STAMPEDE-PROTECTION features: refresh-ahead
//! (with and without a spawner; a spawner that drops its job or panics), jitter, early refresh,
//! negative caching, the load limit with soft timeouts, fail-safe with its backoff,
//! `get_or_stale`, `get_all`, `load`/`load_async`.
//!
//! Checked: (a) single flight per round; (b) a write during a refresh / failing load / timed-out
//! load wins; (c) nothing stuck after panics, dropped jobs, timeouts, cancellation; (d) the
//! documented time bounds; (e) the statistics and the balance rule; (f) nested loads under
//! `max_concurrent_loads(1)`.
#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]
mod common;

use common::{eventually, quiet_injected_panics, watchdog};
use herdcache::{BoxError, Cache, CacheStats, LoadError, ManualClock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type C = Cache<u64, u64>;
type Job = Box<dyn FnOnce() + Send>;
type Jobs = Arc<Mutex<Vec<Job>>>;

const SEC: Duration = Duration::from_secs(1);

fn wd(what: &'static str) -> common::Watchdog {
    watchdog(Duration::from_secs(60), what)
}

// ------------------------------------------------------------------ a controllable backend

/// A backend the loader calls: counts calls, can block (until released), fail or panic, and
/// answers `value` (or `value + key` with `add_key`).
#[derive(Default)]
struct Inner {
    calls: AtomicU64,
    started: AtomicU64,
    fail: AtomicBool,
    panic: AtomicBool,
    value: AtomicU64,
    hold: Mutex<bool>,
    cv: Condvar,
}

#[derive(Clone, Default)]
struct Backend(Arc<Inner>);

impl Backend {
    fn calls(&self) -> u64 {
        self.0.calls.load(Ordering::SeqCst)
    }
    fn set(&self, v: u64) {
        self.0.value.store(v, Ordering::SeqCst)
    }
    fn fail(&self, on: bool) {
        self.0.fail.store(on, Ordering::SeqCst)
    }
    fn panics(&self, on: bool) {
        self.0.panic.store(on, Ordering::SeqCst)
    }
    fn hold(&self) {
        *self.0.hold.lock().unwrap() = true;
    }
    fn release(&self) {
        *self.0.hold.lock().unwrap() = false;
        self.0.cv.notify_all();
    }
    /// Waits until `n` calls have entered the loader.
    fn wait_started(&self, n: u64) {
        assert!(
            eventually(|| self.0.started.load(Ordering::SeqCst) >= n),
            "loader never started {n} calls"
        );
    }
    fn call(&self, _k: &u64) -> Result<u64, BoxError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        self.0.started.fetch_add(1, Ordering::SeqCst);
        let mut h = self.0.hold.lock().unwrap();
        while *h {
            h = self.0.cv.wait(h).unwrap();
        }
        drop(h);
        if self.0.panic.load(Ordering::SeqCst) {
            panic!("injected loader panic");
        }
        if self.0.fail.load(Ordering::SeqCst) {
            return Err("injected backend down".into());
        }
        Ok(self.0.value.load(Ordering::SeqCst))
    }
    fn loader(&self) -> impl Fn(&u64) -> Result<u64, BoxError> + Send + Sync + 'static {
        let b = self.clone();
        move |k| b.call(k)
    }
}

/// A spawner that parks jobs until the test runs (or drops) them.
/// Test-side cycles are intended here (a spawner that keeps its jobs, which hold the cache
/// that holds the spawner; a loader that reaches its own cache through a cell): each is kept
/// reachable from this static, so that LeakSanitizer (CI's ASan step) does not report it.
static KEEP: Mutex<Vec<Box<dyn std::any::Any + Send>>> = Mutex::new(Vec::new());

fn keep<T: Send + 'static>(t: T) {
    KEEP.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(t));
}

fn parked() -> (Jobs, impl Fn(Job) + Send + Sync + 'static) {
    let jobs: Jobs = Arc::default();
    keep(Arc::clone(&jobs));
    let j = Arc::clone(&jobs);
    (jobs, move |job| j.lock().unwrap().push(job))
}

fn run_jobs(jobs: &Jobs) -> usize {
    let taken: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let n = taken.len();
    for job in taken {
        job();
    }
    n
}

/// A spawner that runs each job on a new thread.
fn threaded(job: Job) {
    std::thread::spawn(job);
}

/// The balance rule of `CacheStats::misses` (every call returned).
fn balanced(s: &CacheStats) {
    balanced_with_plain_misses(s, 0)
}

/// As [`balanced`], for a test whose plain `get`s missed `plain` times (counted as misses
/// only).
fn balanced_with_plain_misses(s: &CacheStats, plain: u64) {
    assert_eq!(
        s.misses - plain + s.refreshes_started,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "balance rule broken: {s:#?}"
    );
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "every refresh ends as succeeded or failed: {s:#?}"
    );
}

/// A fresh key loads at once (nothing left stuck) and no load is left in flight.
fn usable(c: &C, k: u64) {
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c2.get_with(k, || 4242));
    match r {
        Some(Ok(_)) => {}
        Some(Err(p)) => panic!("key {k} panicked: {}", common::panic_message(&*p)),
        None => panic!("key {k} stuck"),
    }
    assert!(
        eventually(|| c.loads_in_flight() == 0),
        "a load left in flight"
    );
}

fn refreshing(b: &Backend, clock: &ManualClock) -> herdcache::CacheBuilder<u64, u64> {
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
}

// ------------------------------------------------------------------ refresh-ahead

#[test]
fn refresh_loses_to_an_insert_made_while_it_runs() {
    let _w = wd("refresh vs insert");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock).spawner(spawn).build();
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(11 * SEC);
    b.set(2);
    assert_eq!(c.get(&1), Some(1), "stale served at once");
    assert_eq!(jobs.lock().unwrap().len(), 1);
    c.insert(1, 100);
    assert_eq!(run_jobs(&jobs), 1);
    assert_eq!(
        c.get(&1),
        Some(100),
        "the write made during the refresh wins"
    );
    assert_eq!(c.load(1).unwrap(), 100);
    let s = c.stats();
    assert_eq!(s.refreshes_started, 1);
    assert_eq!(s.refreshes_failed, 1, "{s:#?}");
    assert_eq!(s.stale_served, 1, "{s:#?}");
    balanced(&s);
    assert_eq!(c.loads_in_flight(), 0);
}

#[test]
fn refresh_loses_to_an_invalidate_made_while_it_runs() {
    let _w = wd("refresh vs invalidate");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock).spawner(spawn).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.set(2);
    c.get(&1);
    c.invalidate(&1);
    assert_eq!(run_jobs(&jobs), 1);
    assert_eq!(
        c.get(&1),
        None,
        "the invalidation made during the refresh wins"
    );
    balanced_with_plain_misses(&c.stats(), 1);
    assert_eq!(c.loads_in_flight(), 0);
}

#[test]
fn inline_refresh_loses_to_an_insert_from_another_thread() {
    let _w = wd("inline refresh vs insert");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = refreshing(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.set(2);
    b.hold();
    let c2 = c.clone();
    let reader = common::start(move || c2.get(&1));
    b.wait_started(2);
    c.insert(1, 100);
    b.release();
    assert_eq!(
        reader.wait(Duration::from_secs(10)).unwrap().unwrap(),
        Some(1)
    );
    assert_eq!(
        c.get(&1),
        Some(100),
        "the write made during the refresh wins"
    );
    let s = c.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (1, 1), "{s:#?}");
    balanced(&s);
}

#[test]
fn inline_refresh_whose_loader_panics_serves_the_old_value() {
    quiet_injected_panics();
    let _w = wd("inline refresh panic");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = refreshing(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.panics(true);
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c2.get(&1)).unwrap();
    assert_eq!(
        r.ok(),
        Some(Some(1)),
        "the reader gets the old value, not a panic"
    );
    assert_eq!(c.load(1).unwrap(), 1, "old value still served");
    assert_eq!(b.calls(), 2, "no retry inside the backoff");
    clock.advance(4 * SEC);
    c.get(&1);
    assert_eq!(b.calls(), 2, "no retry inside the backoff");
    clock.advance(2 * SEC);
    b.panics(false);
    b.set(3);
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(b.calls(), 3, "retried after the backoff");
    assert_eq!(c.get(&1), Some(3));
    let s = c.stats();
    assert_eq!(
        (
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed
        ),
        (2, 1, 1)
    );
    balanced(&s);
    assert_eq!(c.loads_in_flight(), 0);
}

#[test]
// Failed before the fix (stop 36): the balance rule breaks: a refresh whose job the spawner dropped counts
// refreshes_started (and refreshes_failed) but no load (loads_abandoned stays 0).
fn a_spawner_that_drops_its_job_releases_the_key() {
    let _w = wd("dropped job");
    let b = Backend::default();
    let clock = ManualClock::new();
    let spawned = Arc::new(AtomicUsize::new(0));
    let s2 = Arc::clone(&spawned);
    let c = refreshing(&b, &clock)
        .spawner(move |job| {
            s2.fetch_add(1, Ordering::SeqCst);
            drop(job)
        })
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(spawned.load(Ordering::SeqCst), 1);
    assert_eq!(c.loads_in_flight(), 0, "the dropped job released the key");
    c.get(&1);
    clock.advance(4 * SEC);
    c.get(&1);
    assert_eq!(
        spawned.load(Ordering::SeqCst),
        1,
        "no retry inside the backoff"
    );
    clock.advance(2 * SEC);
    c.get(&1);
    assert_eq!(
        spawned.load(Ordering::SeqCst),
        2,
        "retried after the backoff"
    );
    assert_eq!(b.calls(), 1);
    // Loads still work: the key is not stuck.
    c.invalidate(&1);
    b.set(7);
    assert_eq!(c.load(1).unwrap(), 7);
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2, "{s:#?}");
    balanced(&s);
}

#[test]
// Failed before the fix (stop 36): as above, for a spawner that panics (the refresh counts in no load column).
fn a_spawner_that_panics_does_not_fail_the_reader() {
    quiet_injected_panics();
    let _w = wd("panicking spawner");
    let b = Backend::default();
    let clock = ManualClock::new();
    let spawned = Arc::new(AtomicUsize::new(0));
    let s2 = Arc::clone(&spawned);
    let c = refreshing(&b, &clock)
        .spawner(move |_job| {
            s2.fetch_add(1, Ordering::SeqCst);
            panic!("injected spawner panic")
        })
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c2.get(&1)).unwrap();
    assert_eq!(r.ok(), Some(Some(1)));
    assert_eq!(c.loads_in_flight(), 0);
    clock.advance(6 * SEC);
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(
        spawned.load(Ordering::SeqCst),
        2,
        "retried after the backoff"
    );
    let s = c.stats();
    balanced(&s);
    usable(&c, 2);
}

#[test]
fn a_refresh_never_starts_before_refresh_after() {
    let _w = wd("refresh_after bound");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock).spawner(spawn).build();
    c.load(1).unwrap();
    clock.advance(10 * SEC - Duration::from_nanos(1));
    c.get(&1);
    c.load(1).unwrap();
    assert_eq!(
        jobs.lock().unwrap().len(),
        0,
        "refresh before refresh_after"
    );
    clock.advance(Duration::from_nanos(2));
    c.get(&1);
    c.get(&1);
    assert_eq!(jobs.lock().unwrap().len(), 1, "one refresh once due");
    run_jobs(&jobs);
    // After the refresh the period starts again from the refresh's write.
    clock.advance(10 * SEC - Duration::from_millis(1));
    c.get(&1);
    assert_eq!(
        jobs.lock().unwrap().len(),
        0,
        "second refresh before refresh_after"
    );
}

#[test]
fn jittered_refresh_stays_within_its_range() {
    let _w = wd("jittered refresh");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(1000 * SEC)
        .refresh_after(100 * SEC)
        .jitter(0.5)
        .clock(clock.clone())
        .loader(b.loader())
        .spawner(spawn)
        .build();
    for k in 0..1000 {
        c.load(k).unwrap();
    }
    clock.advance(Duration::from_millis(49_900));
    for k in 0..1000 {
        c.get(&k);
    }
    assert_eq!(
        jobs.lock().unwrap().len(),
        0,
        "a refresh before (1 - jitter) x refresh_after"
    );
    clock.advance(Duration::from_millis(50_100)); // 100 s
    for k in 0..1000 {
        c.get(&k);
    }
    let at_nominal = jobs.lock().unwrap().len();
    assert!(
        (300..=700).contains(&at_nominal),
        "about half due at nominal: {at_nominal}"
    );
    clock.advance(Duration::from_millis(50_100)); // 150.1 s
    for k in 0..1000 {
        c.get(&k);
    }
    assert_eq!(
        jobs.lock().unwrap().len(),
        1000,
        "all due by (1 + jitter) x refresh_after"
    );
}

// ------------------------------------------------------------------ negative caching

fn negative(b: &Backend, clock: &ManualClock) -> herdcache::CacheBuilder<u64, u64> {
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(100 * SEC)
        .negative_ttl(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
}

#[test]
fn negative_entry_single_flight_and_bound() {
    let _w = wd("negative bound");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).build();
    b.fail(true);
    b.hold();
    let mut callers = Vec::new();
    for _ in 0..8 {
        let c2 = c.clone();
        callers.push(common::start(move || c2.load(1)));
    }
    b.wait_started(1);
    assert!(
        eventually(|| c.stats().coalesced == 7),
        "7 joined: {:#?}",
        c.stats()
    );
    b.release();
    for r in callers {
        assert!(matches!(
            r.wait(Duration::from_secs(10)).unwrap().unwrap(),
            Err(LoadError::Loader(_))
        ));
    }
    assert_eq!(b.calls(), 1, "one backend call for 8 callers");
    clock.advance(5 * SEC - Duration::from_nanos(1));
    assert!(c.load(1).is_err());
    assert_eq!(b.calls(), 1, "negative entry answers within negative_ttl");
    clock.advance(Duration::from_nanos(1));
    assert!(c.load(1).is_err());
    assert_eq!(b.calls(), 2, "negative entry must not outlive negative_ttl");
    let s = c.stats();
    assert_eq!(s.negative_hits, 1, "{s:#?}");
    balanced(&s);
}

#[test]
fn negative_entry_never_outlives_negative_ttl_with_jitter() {
    let _w = wd("negative with jitter");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).jitter(0.5).build();
    b.fail(true);
    for k in 0..200 {
        assert!(c.load(k).is_err());
    }
    assert_eq!(b.calls(), 200);
    clock.advance(5 * SEC);
    for k in 0..200 {
        assert!(c.load(k).is_err());
    }
    assert_eq!(
        b.calls(),
        400,
        "negative entries outlived negative_ttl (jittered?)"
    );
}

#[test]
fn negative_entry_ended_by_a_write_and_by_invalidate() {
    let _w = wd("negative vs write");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).build();
    b.fail(true);
    assert!(c.load(1).is_err());
    c.insert(1, 9);
    assert_eq!(c.load(1).unwrap(), 9);
    assert!(c.load(2).is_err());
    c.invalidate(&2);
    assert!(c.load(2).is_err());
    assert_eq!(b.calls(), 3, "invalidate ends the negative entry");
    assert!(c.load(3).is_err());
    c.invalidate_all();
    assert!(c.load(3).is_err());
    assert_eq!(b.calls(), 5, "invalidate_all ends the negative entry");
    assert!(c.load(4).is_err());
    c.entry(4).or_insert(44);
    assert_eq!(c.load(4).unwrap(), 44);
    balanced(&c.stats());
}

#[test]
fn a_write_during_a_failing_load_is_not_shadowed_by_a_negative_entry() {
    let _w = wd("write during failing load");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).build();
    b.fail(true);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(1);
    c.insert(1, 50);
    b.release();
    let _ = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(c.get(&1), Some(50));
    assert_eq!(
        c.load(1).unwrap(),
        50,
        "a negative entry hides the later write"
    );
    // and an invalidate during the failing load: the failure may be remembered (it is newer).
    balanced(&c.stats());
}

#[test]
fn optionally_none_is_negatively_cached_and_bounded() {
    let _w = wd("negative none");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .negative_ttl(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .build();
    let calls = AtomicU64::new(0);
    let f = || {
        calls.fetch_add(1, Ordering::SeqCst);
        None
    };
    assert_eq!(c.optionally_get_with(1, f), None);
    assert_eq!(c.optionally_get_with(1, f), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.get_with(1, || 3), 3, "get_with after a remembered None?");
    clock.advance(5 * SEC);
    c.invalidate(&1);
    assert_eq!(c.optionally_get_with(1, f), None);
    clock.advance(5 * SEC);
    assert_eq!(c.optionally_get_with(1, f), None);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    balanced(&c.stats());
}

// ------------------------------------------------------------------ fail-safe

fn failsafe(b: &Backend, clock: &ManualClock) -> herdcache::CacheBuilder<u64, u64> {
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(10 * SEC)
        .fail_safe(100 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
}

#[test]
fn fail_safe_one_retry_per_backoff_and_never_past_max_stale() {
    let _w = wd("fail-safe bounds");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    b.hold();
    let mut callers = Vec::new();
    for _ in 0..6 {
        let c2 = c.clone();
        callers.push(common::start(move || c2.load(1)));
    }
    b.wait_started(2);
    assert!(eventually(|| c.stats().coalesced == 5), "{:#?}", c.stats());
    b.release();
    for r in callers {
        assert_eq!(
            r.wait(Duration::from_secs(10)).unwrap().unwrap().unwrap(),
            1
        );
    }
    assert_eq!(b.calls(), 2);
    for _ in 0..10 {
        assert_eq!(c.load(1).unwrap(), 1);
    }
    assert_eq!(b.calls(), 2, "no retry within the backoff");
    clock.advance(5 * SEC);
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(b.calls(), 3, "one retry after the backoff");
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(b.calls(), 3);
    let m0 = c.stats().misses;
    assert_eq!(c.get(&1), None);
    assert_eq!(c.get_or_stale(&1), Some(1));
    // max_stale: 100 s past the deadline at 10 s -> 110 s.
    clock.advance(Duration::from_secs(110) - Duration::from_secs(16) - Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), Some(1));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), None, "stale past max_stale");
    let plain = c.stats().misses - m0;
    assert!(c.load(1).is_err(), "load past max_stale");
    let s = c.stats();
    balanced_with_plain_misses(&s, plain);
}

#[test]
fn fail_safe_does_not_resurrect_a_value_invalidated_during_the_failing_load() {
    let _w = wd("fail-safe vs invalidate");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(2);
    c.invalidate(&1);
    b.release();
    let r = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(
        r.is_err(),
        "stale value served after its invalidation: {r:?}"
    );
    assert_eq!(c.get_or_stale(&1), None);
}

#[test]
fn fail_safe_does_not_serve_the_old_value_over_a_write_during_the_failing_load() {
    let _w = wd("fail-safe vs insert");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(2);
    c.insert(1, 77);
    b.release();
    let r = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(
        matches!(r, Ok(77) | Err(_)),
        "old value served over a later write: {r:?}"
    );
    assert_eq!(c.get(&1), Some(77));
    assert_eq!(c.load(1).unwrap(), 77);
}

#[test]
fn fail_safe_with_negative_ttl_serves_stale_not_error() {
    let _w = wd("fail-safe + negative");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).negative_ttl(50 * SEC).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(6 * SEC);
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(b.calls(), 3, "retry per backoff, not per negative_ttl");
    let s = c.stats();
    assert_eq!(s.stale_served_after_ttl, 3, "{s:#?}");
    balanced(&s);
}

#[test]
fn fail_safe_with_a_refresh_that_fails_then_expiry() {
    let _w = wd("fail-safe + refresh");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(20 * SEC)
        .refresh_after(10 * SEC)
        .fail_safe(100 * SEC)
        .negative_ttl(50 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .spawner(spawn)
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(run_jobs(&jobs), 1);
    clock.advance(10 * SEC); // expired at 20 s
    assert_eq!(c.get(&1), None);
    assert_eq!(
        c.load(1).unwrap(),
        1,
        "fail-safe answers after a failed refresh"
    );
    b.fail(false);
    b.set(2);
    clock.advance(6 * SEC);
    assert_eq!(c.load(1).unwrap(), 2, "retry after backoff succeeds");
    balanced_with_plain_misses(&c.stats(), 1);
}

// ------------------------------------------------------------------ soft timeouts and limit

#[test]
fn a_timed_out_load_that_finishes_later_loses_to_a_write() {
    let _w = wd("timeout then write");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .spawner(threaded)
        .build();
    b.set(5);
    b.hold();
    let r = c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    b.wait_started(1);
    c.insert(1, 99);
    b.release();
    assert!(eventually(|| c.loads_in_flight() == 0));
    assert_eq!(c.get(&1), Some(99), "the late load overwrote a later write");
    assert!(
        eventually(|| c.stats().load_successes == 1),
        "the late load is never counted: {:#?}",
        c.stats()
    );
    let s = c.stats();
    assert_eq!(s.timeouts, 1, "{s:#?}");
    balanced(&s);
}

#[test]
fn a_waiter_timeout_without_spawner_then_write_wins() {
    let _w = wd("waiter timeout then write");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .build();
    b.set(5);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(1);
    let r = c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    c.insert(1, 99);
    b.release();
    let lr = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(matches!(lr, Ok(5) | Ok(99)), "{lr:?}");
    assert_eq!(c.get(&1), Some(99), "the late load overwrote a later write");
    let s = c.stats();
    assert_eq!(s.timeouts, 1, "{s:#?}");
    balanced(&s);
}

#[test]
fn a_leader_timing_out_for_a_permit_leaks_nothing() {
    let _w = wd("permit timeout");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(b.loader())
        .build();
    b.hold();
    let c2 = c.clone();
    let holder = common::start(move || c2.load(1));
    b.wait_started(1);
    for k in 10..15 {
        let r = c.load_with_timeout(k, Some(Duration::from_millis(20)));
        assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    }
    assert_eq!(b.calls(), 1, "a timed-out leader's loader must not run");
    b.release();
    holder
        .wait(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(eventually(|| c.loads_in_flight() == 0));
    // The permit is back: two loads in a row, and concurrent ones, all complete.
    for k in 10..15 {
        let c2 = c.clone();
        common::within(Duration::from_secs(10), move || c2.load(k).unwrap())
            .unwrap()
            .unwrap();
    }
    let s = c.stats();
    assert_eq!(s.timeouts, 5, "{s:#?}");
    assert_eq!(s.loads_abandoned, 5, "{s:#?}");
    balanced(&s);
}

#[test]
fn a_leader_timing_out_for_a_permit_with_a_spawner_loads_later() {
    let _w = wd("permit timeout spawner");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(b.loader())
        .spawner(threaded)
        .build();
    b.hold();
    let c2 = c.clone();
    let holder = common::start(move || c2.load(1));
    b.wait_started(1);
    let r = c.load_with_timeout(2, Some(Duration::from_millis(20)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    b.release();
    holder
        .wait(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(eventually(|| c.loads_in_flight() == 0));
    assert!(
        eventually(|| c.get(&2).is_some()),
        "the spawned job loads once it has a permit"
    );
    assert_eq!(b.calls(), 2);
    balanced(&c.stats());
}

#[test]
fn nested_loads_under_a_limit_of_one() {
    let _w = wd("nested limit 1");
    let cell: Arc<std::sync::OnceLock<C>> = Arc::default();
    keep(Arc::clone(&cell));
    let c2 = Arc::clone(&cell);
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .load_timeout(Duration::from_secs(5))
        .spawner(threaded)
        .record_stats()
        .loader(move |k: &u64| {
            if *k < 3 {
                Ok::<_, BoxError>(c2.get().unwrap().load(k + 1).unwrap() + 1)
            } else {
                Ok(100)
            }
        })
        .build();
    assert!(cell.set(c.clone()).is_ok());
    let c3 = c.clone();
    let r = common::within(Duration::from_secs(20), move || c3.load(0)).unwrap();
    assert_eq!(r.unwrap().unwrap(), 103);
    assert!(eventually(|| c.loads_in_flight() == 0));
    c.invalidate_all();
    // Concurrent nested loads.
    let mut hs = Vec::new();
    for _ in 0..4 {
        let c3 = c.clone();
        hs.push(common::start(move || c3.load(0)));
    }
    for h in hs {
        assert_eq!(
            h.wait(Duration::from_secs(20))
                .expect("nested hang")
                .unwrap()
                .unwrap(),
            103
        );
    }
    balanced(&c.stats());
    // cell holds a clone: a cycle, fine for a test.
}

#[test]
// Failed before the fix (stop 36): the deferred refresh counts refreshes_started and refreshes_failed but no load
// column: the balance rule of `CacheStats::misses` breaks.
fn refresh_under_a_full_limit_is_deferred_not_lost() {
    let _w = wd("refresh deferred");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = refreshing(&b, &clock).max_concurrent_loads(1).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    let blocker = Backend::default();
    blocker.hold();
    let c2 = c.clone();
    let bl = blocker.clone();
    let h = common::start(move || c2.get_with(99, || bl.call(&99).unwrap()));
    blocker.wait_started(1);
    assert_eq!(c.get(&1), Some(1), "served at once, refresh deferred");
    blocker.release();
    h.wait(Duration::from_secs(10)).unwrap().unwrap();
    b.set(2);
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(
        c.get(&1),
        Some(2),
        "the deferred refresh ran on a later read"
    );
    let s = c.stats();
    balanced(&s);
}

// ------------------------------------------------------------------ early refresh

#[test]
fn early_refresh_respects_the_loader_time() {
    let _w = wd("xfetch");
    let clock = ManualClock::new();
    let ck = clock.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let cl = Arc::clone(&calls);
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(1000 * SEC)
        .early_refresh(1.0)
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            ck.advance(SEC); // a load takes 1 s
            Ok::<_, BoxError>(cl.fetch_add(1, Ordering::SeqCst))
        })
        .spawner(spawn)
        .build();
    // Key k is written at k + 1 s, expires at k + 1001 s; delta = 1 s.
    for k in 0..50 {
        c.load(k).unwrap();
    }
    clock.advance(100 * SEC); // now 150 s: remaining >= 851 x delta, probability ~ 0
    for _ in 0..10 {
        for k in 0..50 {
            c.get(&k);
        }
    }
    assert_eq!(
        jobs.lock().unwrap().len(),
        0,
        "early refresh far from expiry"
    );
    // Now 1000.99 s: key 0 has 0.01 delta left. Then one key per second.
    clock.advance(Duration::from_millis(850_990));
    let mut refreshed = 0;
    for k in 0..50u64 {
        for _ in 0..20 {
            assert!(c.get(&k).is_some());
        }
        let n = jobs.lock().unwrap().len();
        assert!(n <= refreshed + 1, "more than one refresh for key {k}: {n}");
        refreshed = n;
        clock.advance(SEC);
    }
    assert!(
        refreshed >= 45,
        "one early refresh per key, near expiry: {refreshed}"
    );
    run_jobs(&jobs);
    balanced(&c.stats());
}

// ------------------------------------------------------------------ get_all

#[test]
fn get_all_joins_a_load_in_flight_and_loads_the_rest_once() {
    let _w = wd("get_all");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .build();
    b.set(5);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(1);
    let c3 = c.clone();
    let batches = Arc::new(AtomicU64::new(0));
    let bt = Arc::clone(&batches);
    let all = common::start(move || {
        c3.get_all([1, 2, 3], |missing| {
            bt.fetch_add(1, Ordering::SeqCst);
            assert_eq!(missing, [2, 3]);
            missing
                .iter()
                .map(|&k| (k, k * 10))
                .collect::<HashMap<_, _>>()
        })
    });
    assert!(eventually(|| batches.load(Ordering::SeqCst) == 1));
    b.release();
    let all = all.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(all.get(&1), Some(&5));
    assert_eq!(all.get(&2), Some(&20));
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    leader
        .wait(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .unwrap();
    balanced(&c.stats());
}

#[test]
fn get_all_with_negative_entries_and_fail_safe() {
    let _w = wd("get_all negative");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).negative_ttl(5 * SEC).build();
    b.fail(true);
    assert!(c.load(1).is_err());
    let calls = AtomicU64::new(0);
    let r = c.get_all([1, 2], |missing| {
        calls.fetch_add(1, Ordering::SeqCst);
        missing.iter().map(|&k| (k, 7)).collect::<HashMap<_, _>>()
    });
    // Key 1 is negatively cached: get_all may load it or not, but must not hang.
    assert_eq!(r.get(&2), Some(&7));
    b.fail(false);
    c.insert(3, 3);
    clock.advance(11 * SEC);
    b.fail(true);
    let r = c.get_all([3], |_missing| HashMap::new());
    assert_eq!(
        r.get(&3),
        Some(&3),
        "get_all fail-safe: missing from load_missing -> ?"
    );
    balanced(&c.stats());
}

// ------------------------------------------------------------------ async

#[test]
fn load_async_cancelled_leader_releases_waiters() {
    let _w = wd("async cancel");
    let door = common::hand::Door::default();
    let d2 = door.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let cl = Arc::clone(&calls);
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .async_loader(move |k: &u64| {
            let k = *k;
            let w = d2.wait();
            cl.fetch_add(1, Ordering::SeqCst);
            async move {
                w.await;
                Ok::<_, BoxError>(k + 1)
            }
        })
        .build();
    let c1 = c.clone();
    let mut leader: common::hand::BoxFut<_> = Box::pin(async move { c1.load_async(1).await });
    common::hand::pending(&mut leader, "leader");
    let c2 = c.clone();
    let mut waiter: common::hand::BoxFut<_> = Box::pin(async move { c2.load_async(1).await });
    common::hand::pending(&mut waiter, "waiter");
    drop(leader);
    door.open();
    let r = common::hand::run(&mut waiter, 100).expect("waiter stuck");
    assert_eq!(r.unwrap().unwrap(), 2);
    assert_eq!(c.loads_in_flight(), 0);
    // The permit is back.
    let c3 = c.clone();
    let mut f: common::hand::BoxFut<_> = Box::pin(async move { c3.load_async(5).await });
    assert_eq!(common::hand::run(&mut f, 100).unwrap().unwrap().unwrap(), 6);
    let s = c.stats();
    assert!(calls.load(Ordering::SeqCst) <= 3, "{s:#?}");
    balanced(&s);
}

// ------------------------------------------------------------------ more spawner shapes

#[test]
fn a_load_whose_spawned_job_is_dropped_runs_in_its_caller() {
    let _w = wd("dropped load job");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .load_timeout(Duration::from_secs(5))
        .loader(b.loader())
        .spawner(drop)
        .build();
    b.set(3);
    assert_eq!(c.load(1).unwrap(), 3, "falls back to running in its caller");
    assert_eq!(b.calls(), 1);
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.load(1).unwrap(), 3);
    balanced(&c.stats());
}

#[test]
fn an_inline_spawner_with_a_timeout_under_a_full_limit() {
    let _w = wd("inline spawner");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(b.loader())
        .spawner(|job| job())
        .build();
    let blocker = Backend::default();
    blocker.hold();
    let c2 = c.clone();
    let bl = blocker.clone();
    let h = common::start(move || c2.get_with(99, || bl.call(&99).unwrap()));
    blocker.wait_started(1);
    let c3 = c.clone();
    let r = common::within(Duration::from_secs(10), move || {
        c3.load_with_timeout(1, Some(Duration::from_millis(30)))
    })
    .expect("an inline job's permit wait must end at the caller's timeout");
    assert!(matches!(r.unwrap(), Err(LoadError::Timeout)));
    assert_eq!(b.calls(), 0);
    blocker.release();
    h.wait(Duration::from_secs(10)).unwrap().unwrap();
    usable(&c, 5);
    assert_eq!(c.load(1).unwrap(), 0);
    balanced(&c.stats());
}

#[test]
fn a_failed_refresh_with_negative_ttl_is_retried_after_the_backoff() {
    let _w = wd("refresh backoff vs negative");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock)
        .negative_ttl(50 * SEC)
        .spawner(spawn)
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(run_jobs(&jobs), 1);
    assert_eq!(b.calls(), 2);
    b.fail(false);
    b.set(2);
    clock.advance(6 * SEC); // past refresh_backoff (5 s), within negative_ttl (50 s)
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(
        run_jobs(&jobs),
        1,
        "refresh_after's doc: the next attempt waits refresh_backoff (not negative_ttl)"
    );
    assert_eq!(c.get(&1), Some(2));
    balanced(&c.stats());
}

#[test]
fn a_failed_refresh_with_negative_ttl_then_insert_then_refresh() {
    let _w = wd("refresh negative insert");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock)
        .negative_ttl(50 * SEC)
        .spawner(spawn)
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    c.get(&1);
    run_jobs(&jobs);
    c.insert(1, 5);
    assert_eq!(c.load(1).unwrap(), 5);
    b.fail(false);
    b.set(6);
    clock.advance(11 * SEC);
    assert_eq!(c.get(&1), Some(5));
    assert_eq!(
        run_jobs(&jobs),
        1,
        "the written entry refreshes in its turn"
    );
    assert_eq!(c.get(&1), Some(6));
}

/// Writers publish increasing versions to the backend and then to the cache; refreshes and
/// loads read the backend. A value older than the last write must never be left stored.
#[test]
fn refresh_and_writes_race_stress() {
    let _w = wd("refresh stress");
    let clock = ManualClock::new();
    let backend = Arc::new(AtomicU64::new(0));
    let be = Arc::clone(&backend);
    let c: C = Cache::builder()
        .max_capacity(1000)
        .time_to_live(1000 * SEC)
        .refresh_after(SEC)
        .refresh_backoff(Duration::from_millis(1))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            let v = be.load(Ordering::SeqCst);
            std::thread::yield_now();
            Ok::<_, BoxError>(v)
        })
        .spawner(threaded)
        .build();
    c.load(0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        for _ in 0..2 {
            let c = c.clone();
            let stop = Arc::clone(&stop);
            let clock = clock.clone();
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    clock.advance(2 * SEC);
                    let _ = c.get(&0);
                }
            });
        }
        for round in 1..=2000u64 {
            backend.store(round, Ordering::SeqCst);
            c.insert(0, round);
            let seen = c.get(&0).unwrap_or(round);
            assert!(
                seen >= round,
                "round {round}: read {seen} after writing {round}"
            );
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert!(eventually(|| c.loads_in_flight() == 0));
    // The readers move the clock 2 s per read until they see `stop`: a few hundred reads
    // after the last write can take the entry past its time to live (1,000 s) before a
    // refresh lands (seen once in CI) — then it is gone, which is no older value.
    let v = c.get(&0);
    assert!(
        v.is_none_or(|v| v >= 2000),
        "a value older than the last write is stored: {v:?}"
    );
}

// ------------------------------------------------------------------ async refresh

type Futs = Arc<Mutex<Vec<herdcache::BoxFuture<()>>>>;

fn async_refreshing(
    clock: &ManualClock,
    calls: &Arc<AtomicU64>,
    value: &Arc<AtomicU64>,
    fail: &Arc<AtomicBool>,
    spawn: impl Fn(herdcache::BoxFuture<()>) + Send + Sync + 'static,
) -> C {
    let cl = Arc::clone(calls);
    let vl = Arc::clone(value);
    let fl = Arc::clone(fail);
    Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .async_loader(move |_k: &u64| {
            cl.fetch_add(1, Ordering::SeqCst);
            let v = vl.load(Ordering::SeqCst);
            let f = fl.load(Ordering::SeqCst);
            async move {
                if f {
                    Err(BoxError::from("injected down"))
                } else {
                    Ok(v)
                }
            }
        })
        .future_spawner(spawn)
        .build()
}

#[test]
fn async_refresh_loses_to_an_insert_and_dropped_future_is_retried() {
    let _w = wd("async refresh");
    let clock = ManualClock::new();
    let (calls, value, fail) = (Arc::default(), Arc::new(AtomicU64::new(1)), Arc::default());
    let futs: Futs = Arc::default();
    let f2 = Arc::clone(&futs);
    let c = async_refreshing(&clock, &calls, &value, &fail, move |f| {
        f2.lock().unwrap().push(f)
    });
    assert_eq!(futures::executor::block_on(c.load_async(1)).unwrap(), 1);
    clock.advance(11 * SEC);
    value.store(2, Ordering::SeqCst);
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(futs.lock().unwrap().len(), 1);
    c.insert(1, 100);
    for f in std::mem::take(&mut *futs.lock().unwrap()) {
        futures::executor::block_on(f);
    }
    assert_eq!(c.get(&1), Some(100), "a write during an async refresh wins");
    // A refresh future dropped unpolled: released, retried after the backoff.
    clock.advance(11 * SEC);
    assert_eq!(c.get(&1), Some(100));
    assert_eq!(futs.lock().unwrap().len(), 1);
    futs.lock().unwrap().clear();
    assert_eq!(c.loads_in_flight(), 0);
    c.get(&1);
    assert_eq!(futs.lock().unwrap().len(), 0, "no retry inside the backoff");
    clock.advance(6 * SEC);
    c.get(&1);
    assert_eq!(futs.lock().unwrap().len(), 1, "retried after the backoff");
    for f in std::mem::take(&mut *futs.lock().unwrap()) {
        futures::executor::block_on(f);
    }
    assert_eq!(c.get(&1), Some(2));
    assert_eq!(c.loads_in_flight(), 0);
}

#[test]
fn async_refresh_with_a_panicking_future_spawner() {
    quiet_injected_panics();
    let _w = wd("async spawner panic");
    let clock = ManualClock::new();
    let (calls, value, fail) = (Arc::default(), Arc::new(AtomicU64::new(1)), Arc::default());
    let c = async_refreshing(&clock, &calls, &value, &fail, |_f| {
        panic!("injected spawn panic")
    });
    assert_eq!(futures::executor::block_on(c.load_async(1)).unwrap(), 1);
    clock.advance(11 * SEC);
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c2.get(&1)).unwrap();
    assert_eq!(
        r.ok(),
        Some(Some(1)),
        "the reader is not failed by the spawner"
    );
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(futures::executor::block_on(c.load_async(1)).unwrap(), 1);
    clock.advance(100 * SEC);
    value.store(3, Ordering::SeqCst);
    assert_eq!(
        futures::executor::block_on(c.load_async(1)).unwrap(),
        3,
        "key not stuck"
    );
}

// ------------------------------------------------------------------ fail-safe with timeouts

#[test]
fn fail_safe_waiter_timeout_answers_stale_at_once_and_load_goes_on() {
    let _w = wd("fail-safe timeout");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.set(2);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(2);
    let r = c.load_with_timeout(1, Some(Duration::from_millis(30)));
    assert_eq!(r.unwrap(), 1, "the last value at the timeout");
    // After the soft timeout, callers get the old value at once until the load ends: even
    // one with no timeout of its own.
    let t0 = std::time::Instant::now();
    let r = c.load_with_timeout(1, Some(Duration::from_secs(5)));
    assert_eq!(r.unwrap(), 1);
    let c3 = c.clone();
    let r = common::within(Duration::from_secs(5), move || c3.load(1)).expect("not at once");
    assert_eq!(r.unwrap().unwrap(), 1);
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "waited instead of answering at once"
    );
    b.release();
    assert_eq!(
        leader
            .wait(Duration::from_secs(10))
            .unwrap()
            .unwrap()
            .unwrap(),
        2
    );
    assert_eq!(c.load(1).unwrap(), 2);
    assert_eq!(b.calls(), 2);
    let s = c.stats();
    assert_eq!(s.timeouts, 1, "{s:#?}");
    assert_eq!(s.stale_served_after_ttl, 3, "{s:#?}");
    balanced(&s);
}

#[test]
fn fail_safe_permit_timeout_without_spawner_backs_off() {
    let _w = wd("fail-safe permit timeout");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).max_concurrent_loads(1).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    let blocker = Backend::default();
    blocker.hold();
    let c2 = c.clone();
    let bl = blocker.clone();
    let h = common::start(move || c2.get_with(99, || bl.call(&99).unwrap()));
    blocker.wait_started(1);
    let r = c.load_with_timeout(1, Some(Duration::from_millis(30)));
    assert_eq!(
        r.unwrap(),
        1,
        "the last value when the permit wait times out"
    );
    blocker.release();
    h.wait(Duration::from_secs(10)).unwrap().unwrap();
    b.set(2);
    // Within the backoff: the old value, no load.
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(b.calls(), 1);
    clock.advance(5 * SEC);
    assert_eq!(c.load(1).unwrap(), 2);
    usable(&c, 7);
    balanced(&c.stats());
}

#[test]
fn fail_safe_loader_panic_serves_stale() {
    quiet_injected_panics();
    let _w = wd("fail-safe panic");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.panics(true);
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(c.get_with(1, || 5), 1);
    assert_eq!(b.calls(), 2);
    balanced(&c.stats());
}

#[test]
fn a_panicked_load_is_remembered_for_the_backoff_only() {
    quiet_injected_panics();
    let _w = wd("panicked remembered");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .build();
    b.panics(true);
    assert!(matches!(c.load(1), Err(LoadError::Panicked)));
    assert!(matches!(c.load(1), Err(LoadError::Panicked)));
    assert_eq!(b.calls(), 1);
    b.panics(false);
    b.set(4);
    clock.advance(5 * SEC);
    assert_eq!(c.load(1).unwrap(), 4, "not remembered past the backoff");
    // A write ends it early.
    b.panics(true);
    assert!(c.load(2).is_err());
    c.insert(2, 22);
    assert_eq!(c.load(2).unwrap(), 22);
    balanced(&c.stats());
}

#[test]
fn extreme_durations_do_not_overflow() {
    quiet_injected_panics();
    let _w = wd("extreme durations");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::MAX)
        .refresh_after(Duration::MAX)
        .negative_ttl(Duration::MAX)
        .fail_safe(Duration::MAX)
        .refresh_backoff(Duration::MAX)
        .load_timeout(Duration::MAX)
        .jitter(0.9)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .spawner(threaded)
        .build();
    b.set(1);
    assert_eq!(c.load(1).unwrap(), 1);
    b.fail(true);
    assert!(c.load(2).is_err());
    clock.advance(Duration::from_secs(1 << 40));
    assert_eq!(c.load(1).unwrap(), 1);
    assert!(c.load(2).is_err());
    assert_eq!(b.calls(), 2);
    c.insert(2, 2);
    assert_eq!(c.load(2).unwrap(), 2);
    // Tiny ones.
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_nanos(1))
        .refresh_after(Duration::ZERO)
        .negative_ttl(Duration::from_nanos(1))
        .fail_safe(Duration::from_nanos(1))
        .refresh_backoff(Duration::ZERO)
        .load_timeout(Duration::ZERO)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .build();
    b.set(3);
    for _ in 0..10 {
        let _ = c.load(1);
        let _ = c.get(&1);
        clock.advance(Duration::from_nanos(1));
    }
    b.fail(true);
    for _ in 0..10 {
        let _ = c.load(1);
        let _ = c.get_or_stale(&1);
        clock.advance(Duration::from_nanos(1));
    }
    assert_eq!(c.loads_in_flight(), 0);
}

#[test]
fn refresh_after_zero_inline_does_not_loop() {
    let _w = wd("refresh zero");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(Duration::ZERO)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .build();
    c.load(1).unwrap();
    let n = b.calls();
    c.get(&1);
    assert!(
        b.calls() <= n + 1,
        "one read, at most one refresh: {}",
        b.calls()
    );
    balanced(&c.stats());
}

// ------------------------------------------------------------------ round 3

#[test]
fn a_timed_out_spawned_load_does_not_store_over_an_invalidate() {
    let _w = wd("timeout then invalidate");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .spawner(threaded)
        .build();
    b.set(5);
    b.hold();
    let r = c.load_with_timeout(1, Some(Duration::from_millis(30)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    b.wait_started(1);
    c.invalidate(&1);
    b.release();
    assert!(eventually(|| c.loads_in_flight() == 0));
    assert_eq!(
        c.get(&1),
        None,
        "a load invalidated in flight stored its value"
    );
}

#[test]
fn a_panicking_spawner_for_a_load_falls_back_to_the_caller() {
    quiet_injected_panics();
    let _w = wd("panicking load spawner");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .load_timeout(Duration::from_secs(5))
        .loader(b.loader())
        .spawner(|_job| panic!("injected spawn panic"))
        .build();
    b.set(8);
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c2.load(1)).unwrap();
    assert_eq!(r.ok().map(|r| r.ok()), Some(Some(8)), "runs in the caller");
    assert_eq!(c.loads_in_flight(), 0);
    balanced(&c.stats());
}

#[test]
fn get_all_inside_a_loader_under_a_limit_of_one() {
    let _w = wd("nested get_all");
    let cell: Arc<std::sync::OnceLock<C>> = Arc::default();
    keep(Arc::clone(&cell));
    let c2 = Arc::clone(&cell);
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(move |k: &u64| {
            let all = c2.get().unwrap().get_all([k + 100, k + 101], |missing| {
                missing.iter().map(|&m| (m, m)).collect::<HashMap<_, _>>()
            });
            Ok::<_, BoxError>(all.values().sum())
        })
        .build();
    assert!(cell.set(c.clone()).is_ok());
    let c3 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c3.load(1)).expect("deadlock");
    assert_eq!(r.unwrap().unwrap(), 203);
    // And a get_with inside get_all's load_missing.
    let c4 = c.clone();
    let r = common::within(Duration::from_secs(10), move || {
        c4.get_all([500], |m| {
            let v = c4.get_with(600, || 6);
            m.iter().map(|&k| (k, v)).collect::<HashMap<_, _>>()
        })
    })
    .expect("deadlock in load_missing");
    assert_eq!(r.unwrap().get(&500), Some(&6));
    balanced(&c.stats());
}

#[test]
fn two_concurrent_get_all_single_flight() {
    let _w = wd("get_all x2");
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let gate = Backend::default();
    gate.hold();
    let batches = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    // The second call starts once the first is in its backend call: it must join all three
    // keys (started together, the two calls could split the keys between them).
    for i in 0..2 {
        let c = c.clone();
        let g = gate.clone();
        let bt = Arc::clone(&batches);
        hs.push(common::start(move || {
            c.get_all([1, 2, 3], |m| {
                bt.fetch_add(1, Ordering::SeqCst);
                g.call(&0).unwrap();
                m.iter().map(|&k| (k, k)).collect::<HashMap<_, _>>()
            })
        }));
        if i == 0 {
            gate.wait_started(1);
        }
    }
    assert!(eventually(|| c.stats().coalesced == 3), "{:#?}", c.stats());
    gate.release();
    for h in hs {
        assert_eq!(h.wait(Duration::from_secs(10)).unwrap().unwrap().len(), 3);
    }
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    balanced(&c.stats());
}

#[test]
fn get_all_of_a_key_due_for_refresh_refreshes_once() {
    let _w = wd("get_all refresh");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock).spawner(spawn).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    let r = c.get_all([1, 2], |m| {
        m.iter().map(|&k| (k, 9)).collect::<HashMap<_, _>>()
    });
    assert_eq!(r.get(&1), Some(&1));
    c.get_all([1], |_| HashMap::new());
    assert_eq!(jobs.lock().unwrap().len(), 1, "one refresh");
    run_jobs(&jobs);
    balanced(&c.stats());
}

#[test]
fn try_get_with_and_optionally_after_a_loader_error_is_remembered() {
    let _w = wd("try_get_with negative");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).build();
    b.fail(true);
    assert!(c.load(1).is_err());
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(10), move || {
        let a = c2.try_get_with(1, || Err::<u64, String>("mine".into()));
        let bb = c2.optionally_get_with(1, || Some(3));
        (a.map_err(|e| (*e).clone()), bb)
    })
    .unwrap();
    match r {
        Ok((a, _bb)) => {
            // Either a fresh error of this caller's type, or a load; never a panic.
            assert!(a.is_err() || a == Ok(3), "{a:?}");
        }
        Err(p) => panic!("panicked: {}", common::panic_message(&*p)),
    }
    balanced(&c.stats());
}

/// Documented (entry.rs: "a compute waits for a load or compute of its key"): a computation
/// waits for a refresh queued on the spawner; it then computes on the refreshed value.
#[test]
fn a_computation_during_a_parked_refresh_waits_for_it_then_wins() {
    let _w = wd("compute during refresh");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c = refreshing(&b, &clock).spawner(spawn).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.set(2);
    c.get(&1);
    let c2 = c.clone();
    let h = common::start(move || {
        c2.entry(1)
            .and_upsert_with(|e| e.map_or(0, |e| e.into_value() + 100))
            .into_value()
    });
    run_jobs(&jobs);
    assert_eq!(h.wait(Duration::from_secs(10)).unwrap().unwrap(), 102);
    assert_eq!(c.get(&1), Some(102));
}

#[test]
fn limit_counters_count_leaders_not_joiners() {
    let _w = wd("limit counters");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(b.loader())
        .build();
    b.hold();
    let mut hs = Vec::new();
    let c0 = c.clone();
    hs.push(common::start(move || c0.load(0)));
    b.wait_started(1);
    for k in 1..=3 {
        let c1 = c.clone();
        hs.push(common::start(move || c1.load(k)));
    }
    assert!(
        eventually(|| c.stats().loads_waited_for_limit == 3),
        "{:#?}",
        c.stats()
    );
    for _ in 0..2 {
        let c1 = c.clone();
        hs.push(common::start(move || c1.load(2)));
    }
    assert!(eventually(|| c.stats().coalesced == 2), "{:#?}", c.stats());
    b.release();
    for h in hs {
        h.wait(Duration::from_secs(10)).unwrap().unwrap().unwrap();
    }
    let s = c.stats();
    assert_eq!(
        s.loads_waited_for_limit, 3,
        "joiners are not counted: {s:#?}"
    );
    assert_eq!(s.max_concurrent_loads_seen, 1, "{s:#?}");
    assert_eq!(b.calls(), 4);
    assert_eq!(c.loads_in_flight(), 0);
    balanced(&s);
}

#[test]
fn fail_safe_window_follows_the_jittered_deadline() {
    let _w = wd("fail-safe jitter");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(10 * SEC)
        .jitter(0.5)
        .fail_safe(100 * SEC)
        .clock(clock.clone())
        .build();
    for k in 0..1000 {
        c.insert(k, k);
    }
    clock.advance(Duration::from_millis(104_900)); // before 0.5 x 10 + 100
    let alive = (0..1000).filter(|k| c.get_or_stale(k).is_some()).count();
    assert_eq!(
        alive, 1000,
        "stale window ended before deadline + max_stale"
    );
    clock.advance(Duration::from_millis(10_200)); // 115.1 s > 1.5 x 10 + 100
    let alive = (0..1000).filter(|k| c.get_or_stale(k).is_some()).count();
    assert_eq!(alive, 0, "stale value served past max_stale");
}

#[test]
fn fail_safe_none_removes_the_old_value_for_good() {
    let _w = wd("fail-safe none");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(10 * SEC)
        .fail_safe(100 * SEC)
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(11 * SEC);
    assert_eq!(c.optionally_get_with(1, || None), None);
    assert_eq!(
        c.get_or_stale(&1),
        None,
        "a None answer removes the stale value"
    );
    assert_eq!(
        c.try_get_with(1, || Err::<u64, &str>("down")).ok(),
        None,
        "a later failure must not resurrect it"
    );
    // Concurrent waiter of the None load.
    c.insert(2, 2);
    clock.advance(11 * SEC);
    let gate = Backend::default();
    gate.hold();
    let c2 = c.clone();
    let g = gate.clone();
    let leader = common::start(move || {
        c2.optionally_get_with(2, || {
            g.call(&2).unwrap();
            None
        })
    });
    gate.wait_started(1);
    let c3 = c.clone();
    let waiter = common::start(move || c3.try_get_with(2, || Err::<u64, &str>("down")));
    assert!(eventually(|| c.stats().coalesced >= 1));
    gate.release();
    assert_eq!(leader.wait(Duration::from_secs(10)).unwrap().unwrap(), None);
    let w = waiter.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(w.is_err(), "the waiter got the removed stale value: {w:?}");
}

#[test]
fn negative_entries_are_not_loads_in_flight_and_invalidate_entries_if_ends_them() {
    let _w = wd("negative in flight");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).build();
    b.fail(true);
    assert!(c.load(1).is_err());
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.stats().loads_in_flight, 0);
    // retain/invalidate_entries_if see no value for it; a load still answers from it.
    c.retain(|_, _| false);
    assert!(c.load(1).is_err());
    assert_eq!(b.calls(), 1);
    c.invalidate(&1);
    b.fail(false);
    b.set(3);
    assert_eq!(c.load(1).unwrap(), 3);
}

/// One writer publishes versions (backend first, then the cache: an insert or an invalidate)
/// and loads right after; hammer threads load, read and advance the clock while the backend
/// flips between up and down. Whatever a load answers right after the writer's own write must
/// be at least that version: a value, or an error made by a backend call of at least that
/// version (the error carries the version) — never a negative entry, a stale value or a
/// refresh older than the write.
fn write_then_load_stress(cfg: &str, build: impl FnOnce(herdcache::CacheBuilder<u64, u64>) -> C) {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (ve, dn) = (Arc::clone(&version), Arc::clone(&down));
    let builder = Cache::builder()
        .max_capacity(1000)
        .time_to_live(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            let v = ve.load(Ordering::SeqCst);
            std::thread::yield_now();
            if dn.load(Ordering::SeqCst) {
                Err(BoxError::from(format!("down@{v}")))
            } else {
                Ok(v)
            }
        });
    let c = build(builder);
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        for t in 0..2u64 {
            let c = c.clone();
            let stop = Arc::clone(&stop);
            let clock = clock.clone();
            let down = Arc::clone(&down);
            s.spawn(move || {
                let mut r = common::Rng(t + 11);
                while !stop.load(Ordering::SeqCst) {
                    match r.next() % 6 {
                        0 => clock.advance(Duration::from_millis(r.next() % 4000)),
                        1 => down.store(r.next() % 2 == 0, Ordering::SeqCst),
                        2 => {
                            let _ = c.get(&0);
                        }
                        3 => {
                            let _ = c.get_or_stale(&0);
                        }
                        _ => {
                            let _ = c.load(0);
                        }
                    }
                }
            });
        }
        for round in 1..=3000u64 {
            version.store(round, Ordering::SeqCst);
            let wrote = round % 3 != 0;
            if wrote {
                c.insert(0, round);
            } else {
                c.invalidate(&0);
            }
            match c.load(0) {
                Ok(v) => assert!(
                    v >= round,
                    "{cfg}: round {round} ({}): load gave {v}",
                    if wrote { "insert" } else { "invalidate" }
                ),
                Err(LoadError::Loader(e)) => {
                    let v: u64 = e.to_string().trim_start_matches("down@").parse().unwrap();
                    assert!(
                        v >= round,
                        "{cfg}: round {round}: an older failure answers: {e}"
                    );
                }
                Err(LoadError::Timeout) => {}
                Err(e) => panic!("{cfg}: {e:?}"),
            }
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert!(
        eventually(|| c.loads_in_flight() == 0),
        "{cfg}: load left in flight"
    );
}

#[test]
fn stress_write_then_load_negative() {
    let _w = wd("stress negative");
    write_then_load_stress("negative", |b| b.negative_ttl(3 * SEC).build());
}

#[test]
fn stress_write_then_load_fail_safe() {
    let _w = wd("stress fail-safe");
    write_then_load_stress("fail-safe", |b| {
        b.fail_safe(30 * SEC)
            .refresh_backoff(SEC)
            .negative_ttl(3 * SEC)
            .build()
    });
}

#[test]
fn stress_write_then_load_refresh_inline() {
    let _w = wd("stress refresh inline");
    write_then_load_stress("refresh inline", |b| {
        b.refresh_after(SEC)
            .refresh_backoff(Duration::from_millis(500))
            .negative_ttl(3 * SEC)
            .fail_safe(30 * SEC)
            .build()
    });
}

#[test]
fn stress_write_then_load_refresh_spawned_limited() {
    let _w = wd("stress refresh spawned");
    write_then_load_stress("refresh spawned", |b| {
        b.refresh_after(SEC)
            .refresh_backoff(Duration::from_millis(500))
            .negative_ttl(3 * SEC)
            .max_concurrent_loads(1)
            .load_timeout(Duration::from_millis(50))
            .spawner(threaded)
            .build()
    });
}

#[test]
fn stress_write_then_load_early_refresh_jitter() {
    let _w = wd("stress xfetch");
    write_then_load_stress("xfetch", |b| {
        b.early_refresh(50.0)
            .jitter(0.3)
            .fail_safe(30 * SEC)
            .spawner(threaded)
            .build()
    });
}

// ------------------------------------------------------------------ round 4

#[test]
fn fail_safe_retry_after_backoff_is_one_call_and_others_get_stale() {
    let _w = wd("fail-safe retry");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    assert_eq!(c.load(1).unwrap(), 1);
    assert_eq!(b.calls(), 2);
    clock.advance(5 * SEC);
    b.hold();
    let mut hs = Vec::new();
    for _ in 0..5 {
        let c2 = c.clone();
        hs.push(common::start(move || c2.load(1)));
    }
    b.wait_started(3);
    // The others: the last value (at once per the docs, or after the retry fails).
    let c3 = c.clone();
    let quick = common::within(Duration::from_secs(3), move || c3.load(1));
    b.release();
    for h in hs {
        assert_eq!(
            h.wait(Duration::from_secs(10)).unwrap().unwrap().unwrap(),
            1
        );
    }
    assert_eq!(b.calls(), 3, "one retry per backoff, whatever the callers");
    let quick = quick
        .expect("during the retry another caller waited for it instead of getting the last value");
    assert_eq!(quick.unwrap().unwrap(), 1);
    balanced(&c.stats());
}

#[test]
fn early_refresh_failure_backs_off() {
    let _w = wd("xfetch backoff");
    let clock = ManualClock::new();
    let ck = clock.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let cl = Arc::clone(&calls);
    let failing = Arc::new(AtomicBool::new(false));
    let fl = Arc::clone(&failing);
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(1000 * SEC)
        .early_refresh(1.0)
        .refresh_backoff(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            cl.fetch_add(1, Ordering::SeqCst);
            if fl.load(Ordering::SeqCst) {
                return Err(BoxError::from("injected down"));
            }
            ck.advance(100 * SEC); // the load takes 100 s: delta = 100 s
            Ok::<_, BoxError>(1)
        })
        .spawner(spawn)
        .build();
    c.load(1).unwrap(); // written at 100 s, expires at 1100 s
    failing.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(999)); // 1099 s: remaining 1 s = 0.01 delta
    for _ in 0..20 {
        c.get(&1);
    }
    assert_eq!(run_jobs(&jobs), 1);
    for _ in 0..20 {
        c.get(&1);
    }
    assert_eq!(
        jobs.lock().unwrap().len(),
        0,
        "an early refresh within the backoff"
    );
    let s = c.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (1, 1), "{s:#?}");
}

#[test]
fn async_leader_dropped_while_waiting_for_a_permit_leaks_nothing() {
    let _w = wd("async permit wait dropped");
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let blocker = Backend::default();
    blocker.hold();
    let c2 = c.clone();
    let bl = blocker.clone();
    let h = common::start(move || c2.get_with(99, || bl.call(&99).unwrap()));
    blocker.wait_started(1);
    for k in 0..3 {
        let c3 = c.clone();
        let mut f: common::hand::BoxFut<u64> =
            Box::pin(async move { c3.get_with_async(k, async { 7 }).await });
        common::hand::pending(&mut f, "waits for the permit");
        let c4 = c.clone();
        let mut g: common::hand::BoxFut<u64> =
            Box::pin(async move { c4.get_with_async_shared(k + 10, async { 7 }).await });
        common::hand::pending(&mut g, "waits for the permit");
        drop(f);
        drop(g);
    }
    assert_eq!(c.loads_in_flight(), 1);
    blocker.release();
    h.wait(Duration::from_secs(10)).unwrap().unwrap();
    for k in 0..3 {
        let c3 = c.clone();
        let mut f: common::hand::BoxFut<u64> =
            Box::pin(async move { c3.get_with_async(k, async { 8 }).await });
        assert_eq!(common::hand::run(&mut f, 100).expect("stuck").unwrap(), 8);
    }
    usable(&c, 50);
    let s = c.stats();
    balanced(&s);
}

#[test]
fn async_fail_safe_and_panicking_async_refresh() {
    fn bo<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }
    quiet_injected_panics();
    let _w = wd("async fail-safe");
    let clock = ManualClock::new();
    let mode = Arc::new(AtomicU64::new(0)); // 0 ok, 1 error, 2 panic
    let m = Arc::clone(&mode);
    let calls = Arc::new(AtomicU64::new(0));
    let cl = Arc::clone(&calls);
    let futs: Futs = Arc::default();
    let f2 = Arc::clone(&futs);
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(20 * SEC)
        .refresh_after(10 * SEC)
        .refresh_backoff(5 * SEC)
        .fail_safe(100 * SEC)
        .clock(clock.clone())
        .record_stats()
        .async_loader(move |_k: &u64| {
            let md = m.load(Ordering::SeqCst);
            let n = cl.fetch_add(1, Ordering::SeqCst);
            async move {
                match md {
                    0 => Ok(n),
                    1 => Err(BoxError::from("injected down")),
                    _ => panic!("injected async loader panic"),
                }
            }
        })
        .future_spawner(move |f| f2.lock().unwrap().push(f))
        .build();
    assert_eq!(bo(c.load_async(1)).unwrap(), 0);
    clock.advance(11 * SEC);
    mode.store(2, Ordering::SeqCst);
    assert_eq!(c.get(&1), Some(0));
    for f in std::mem::take(&mut *futs.lock().unwrap()) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(f)
        }));
        assert!(
            r.is_ok(),
            "the refresh future must not unwind into the spawner's runtime"
        );
    }
    assert_eq!(c.loads_in_flight(), 0);
    clock.advance(10 * SEC); // expired
    mode.store(1, Ordering::SeqCst);
    assert_eq!(
        bo(c.load_async(1)).unwrap(),
        0,
        "fail-safe for an async load"
    );
    mode.store(2, Ordering::SeqCst);
    clock.advance(5 * SEC);
    assert_eq!(
        bo(c.load_async(1)).unwrap(),
        0,
        "fail-safe after an async loader panic"
    );
    mode.store(0, Ordering::SeqCst);
    clock.advance(5 * SEC);
    assert!(bo(c.load_async(1)).unwrap() > 0);
    let s = c.stats();
    balanced(&s);
}

// ------------------------------------------------------------------ round 5

#[test]
fn max_concurrent_loads_zero_does_not_hang_forever() {
    let _w = wd("limit zero");
    let r = Cache::<u64, u64>::builder()
        .max_capacity(10)
        .max_concurrent_loads(0)
        .try_build();
    let Ok(c) = r else { return }; // refused: fine
    let r = common::within(Duration::from_secs(5), move || c.get_with(1, || 1));
    assert!(
        matches!(r, Some(Ok(1))),
        "max_concurrent_loads(0) is accepted by try_build but every load then hangs"
    );
}

#[test]
fn default_refresh_backoff_is_refresh_after_else_one_second() {
    let _w = wd("default backoff");
    let b = Backend::default();
    let clock = ManualClock::new();
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .clock(clock.clone())
        .loader(b.loader())
        .spawner(spawn)
        .build();
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    c.get(&1);
    assert_eq!(run_jobs(&jobs), 1);
    clock.advance(10 * SEC - Duration::from_millis(1));
    c.get(&1);
    assert_eq!(
        jobs.lock().unwrap().len(),
        0,
        "retried before refresh_after (the default backoff)"
    );
    clock.advance(Duration::from_millis(1));
    c.get(&1);
    assert_eq!(run_jobs(&jobs), 1, "retried at the default backoff");
    // Fail-safe without refresh_after: one second.
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(10 * SEC)
        .fail_safe(100 * SEC)
        .clock(clock.clone())
        .loader(b.loader())
        .build();
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    c.load(1).unwrap();
    clock.advance(Duration::from_millis(999));
    c.load(1).unwrap();
    assert_eq!(b.calls(), 2);
    clock.advance(Duration::from_millis(1));
    c.load(1).unwrap();
    assert_eq!(b.calls(), 3);
}

#[test]
fn fail_safe_with_time_to_idle() {
    let _w = wd("fail-safe tti");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_idle(10 * SEC)
        .fail_safe(100 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    assert_eq!(c.load(1).unwrap(), 1, "fail-safe after an idle expiry");
    // Stale reads must not extend the idle deadline (never beyond max_stale).
    for _ in 0..20 {
        clock.advance(5 * SEC);
        let _ = c.load(1);
        let _ = c.get_or_stale(&1);
    }
    // now 111 s: deadline was 10 s, max_stale 100 s -> gone at 110 s.
    assert_eq!(
        c.get_or_stale(&1),
        None,
        "stale past max_stale (reads extended it?)"
    );
    assert!(c.load(1).is_err());
}

#[test]
fn get_all_whose_load_missing_panics_releases_waiters() {
    quiet_injected_panics();
    let _w = wd("get_all panic");
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let gate = Backend::default();
    gate.hold();
    let c2 = c.clone();
    let g = gate.clone();
    let bulk = common::start(move || {
        c2.get_all([1, 2], |_m| -> HashMap<u64, u64> {
            g.call(&0).unwrap();
            panic!("injected load_missing panic")
        })
    });
    gate.wait_started(1);
    let c3 = c.clone();
    let waiter = common::start(move || c3.get_with(1, || 11));
    assert!(eventually(|| c.stats().coalesced == 1));
    gate.release();
    assert!(bulk.wait(Duration::from_secs(10)).unwrap().is_err());
    assert_eq!(
        waiter
            .wait(Duration::from_secs(10))
            .expect("waiter stuck")
            .unwrap(),
        11
    );
    usable(&c, 2);
    let s = c.stats();
    assert_eq!(
        s.load_failures, 2,
        "one failure per key of the panicking batch: {s:#?}"
    );
    balanced(&s);
}

#[test]
fn a_refresh_whose_loader_writes_its_own_key() {
    let _w = wd("refresh self-write");
    let clock = ManualClock::new();
    let cell: Arc<std::sync::OnceLock<C>> = Arc::default();
    keep(Arc::clone(&cell));
    let c2 = Arc::clone(&cell);
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u64| {
            let i = n2.fetch_add(1, Ordering::SeqCst);
            if i == 1 {
                c2.get().unwrap().insert(*k, 500);
            }
            Ok::<_, BoxError>(i)
        })
        .build();
    assert!(cell.set(c.clone()).is_ok());
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    let c3 = c.clone();
    let r = common::within(Duration::from_secs(5), move || c3.get(&1)).expect("hang");
    assert_eq!(r.unwrap(), Some(0));
    assert_eq!(
        c.get(&1),
        Some(500),
        "the write inside the refresh wins over its result"
    );
    let s = c.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (1, 1), "{s:#?}");
}

// ------------------------------------------------------------------ round 6

/// `get_all` has no way to answer a remembered failure: as `negative_ttl`'s docs say (since
/// this sweep; before, they promised every caller the remembered failure), it loads the key
/// again, counted as a load, not a negative hit.
#[test]
fn get_all_loads_a_key_with_a_negative_entry_again() {
    let _w = wd("get_all negative entries");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = negative(&b, &clock).build();
    b.fail(true);
    assert!(c.load(1).is_err());
    let asked = Arc::new(Mutex::new(Vec::new()));
    let a2 = Arc::clone(&asked);
    let r = c.get_all([1, 2], move |m| {
        a2.lock().unwrap().extend_from_slice(m);
        m.iter().map(|&k| (k, 7)).collect::<HashMap<_, _>>()
    });
    assert_eq!(*asked.lock().unwrap(), vec![1, 2]);
    assert_eq!(r.get(&1), Some(&7));
    // The load of key 1 stored a value: the negative entry is gone for the other calls too.
    assert_eq!(c.load(1).unwrap(), 7);
    let s = c.stats();
    assert_eq!(s.negative_hits, 0, "{s:#?}");
    balanced(&s);
}

#[test]
fn a_timed_out_failing_load_under_fail_safe_does_not_shadow_a_write() {
    let _w = wd("timeout fail-safe write");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock)
        .negative_ttl(50 * SEC)
        .spawner(threaded)
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    b.hold();
    let r = c.load_with_timeout(1, Some(Duration::from_millis(30)));
    assert_eq!(r.unwrap(), 1, "stale at the timeout");
    b.wait_started(2);
    c.insert(1, 9);
    b.release();
    assert!(eventually(|| c.loads_in_flight() == 0));
    assert_eq!(c.get(&1), Some(9));
    assert_eq!(
        c.load(1).unwrap(),
        9,
        "the failed late load shadows the write"
    );
    let _ = eventually(|| c.stats().load_failures == 1);
    balanced(&c.stats());
}

#[test]
fn a_nested_load_taking_over_a_refresh_waiting_for_a_permit() {
    let _w = wd("take over refresh");
    let clock = ManualClock::new();
    let cell: Arc<std::sync::OnceLock<C>> = Arc::default();
    keep(Arc::clone(&cell));
    let c2 = Arc::clone(&cell);
    let gate = Backend::default();
    let g = gate.clone();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(20 * SEC)
        .refresh_after(10 * SEC)
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u64| {
            if *k == 99 {
                g.call(k).unwrap();
                // Inside a load holding the only permit: load key 1, whose refresh waits.
                return Ok::<_, BoxError>(c2.get().unwrap().load(1).unwrap() + 1000);
            }
            Ok(*k + 10)
        })
        .spawner(threaded)
        .build();
    assert!(cell.set(c.clone()).is_ok());
    c.load(1).unwrap();
    gate.hold();
    let c3 = c.clone();
    let outer = common::start(move || c3.load(99));
    gate.wait_started(1);
    clock.advance(11 * SEC);
    assert_eq!(c.get(&1), Some(11)); // starts a refresh, its job waits for the permit
    assert!(eventually(|| c.stats().refreshes_started == 1));
    clock.advance(10 * SEC); // key 1 expired
    gate.release();
    let r = outer
        .wait(Duration::from_secs(10))
        .expect("nested load stuck behind the refresh");
    assert_eq!(r.unwrap().unwrap(), 1011);
    assert!(eventually(|| c.loads_in_flight() == 0));
    let s = c.stats();
    assert!(eventually(|| {
        let s = c.stats();
        s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed
    }));
    balanced(&c.stats());
    let _ = s;
}

#[test]
fn early_refresh_probability_matches_the_formula() {
    let _w = wd("xfetch probability");
    let clock = ManualClock::new();
    let ck = clock.clone();
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(2000 * SEC)
        .early_refresh(1.0)
        .clock(clock.clone())
        .loader(move |_k: &u64| {
            ck.advance(SEC);
            Ok::<_, BoxError>(0)
        })
        .spawner(spawn)
        .build();
    let n = 1000u64;
    for k in 0..n {
        c.load(k).unwrap(); // written at k + 1 s, expires at k + 2001 s, delta 1 s
    }
    // Read each key once when remaining = ln 2 x delta: p = 0.5.
    let ln2 = Duration::from_secs_f64(std::f64::consts::LN_2);
    let mut now = Duration::from_secs(n);
    let mut hits = 0;
    for k in 0..n {
        let at = Duration::from_secs(k + 2001) - ln2;
        clock.advance(at - now);
        now = at;
        let before = jobs.lock().unwrap().len();
        c.get(&k);
        hits += jobs.lock().unwrap().len() - before;
    }
    assert!(
        (400..=600).contains(&hits),
        "p should be ~0.5 at remaining = ln2 x delta x beta: {hits}/1000"
    );
}

#[test]
fn a_synchronous_spawner_refresh_inside_a_loader_under_a_limit_of_one() {
    let _w = wd("sync spawner nested refresh");
    let clock = ManualClock::new();
    let cell: Arc<std::sync::OnceLock<C>> = Arc::default();
    keep(Arc::clone(&cell));
    let c2 = Arc::clone(&cell);
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .max_concurrent_loads(1)
        .load_timeout(Duration::from_secs(2))
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u64| {
            if *k == 99 {
                let c = c2.get().unwrap();
                let a = c.get(&1).unwrap_or(0); // due: its refresh runs on the spawner
                let b = c.load(2).unwrap(); // due too
                return Ok::<_, BoxError>(a + b + 1000);
            }
            Ok(*k + 10)
        })
        .spawner(|job| job())
        .build();
    assert!(cell.set(c.clone()).is_ok());
    c.load(1).unwrap();
    c.load(2).unwrap();
    clock.advance(11 * SEC);
    let c3 = c.clone();
    let r = common::within(Duration::from_secs(10), move || c3.load(99)).expect("deadlock");
    assert_eq!(r.unwrap().unwrap(), 1023);
    assert_eq!(c.loads_in_flight(), 0);
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2, "{s:#?}");
    assert_eq!(s.refreshes_succeeded, 2, "{s:#?}");
    balanced(&s);
}

#[test]
fn refresh_loader_panics_on_a_spawner_thread_then_recovers() {
    quiet_injected_panics();
    let _w = wd("spawned refresh panic");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = refreshing(&b, &clock).spawner(threaded).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.panics(true);
    c.get(&1);
    assert!(eventually(|| c.stats().refreshes_failed == 1));
    assert!(eventually(|| c.loads_in_flight() == 0));
    assert_eq!(c.load(1).unwrap(), 1);
    // Expire: the load after a failed (panicked) refresh.
    b.panics(false);
    b.set(5);
    clock.advance(100 * SEC);
    let r = c.load(1);
    assert_eq!(
        r.unwrap(),
        5,
        "a panicked refresh is remembered past the value's expiry?"
    );
}

#[test]
fn a_parked_load_job_dropped_after_its_caller_timed_out() {
    let _w = wd("late dropped load job");
    let b = Backend::default();
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .spawner(spawn)
        .build();
    b.set(3);
    let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    assert_eq!(jobs.lock().unwrap().len(), 1);
    // A waiter joins the parked load (no timeout of its own), then the pool drops the job.
    let c2 = c.clone();
    let waiter = common::start(move || c2.load(1));
    assert!(eventually(|| c.stats().coalesced >= 1), "{:#?}", c.stats());
    jobs.lock().unwrap().clear();
    let w = waiter
        .wait(Duration::from_secs(10))
        .expect("waiter of a dropped job stuck");
    assert_eq!(w.unwrap().unwrap(), 3);
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(b.calls(), 1);
    let s = c.stats();
    balanced(&s);
}

#[test]
fn a_parked_load_job_run_after_an_invalidate_does_not_store() {
    let _w = wd("late load job after invalidate");
    let b = Backend::default();
    let (jobs, spawn) = parked();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .spawner(spawn)
        .build();
    b.set(3);
    let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    c.invalidate(&1);
    b.set(4);
    // A new load after the invalidation does not join the old one.
    let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
    assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
    assert_eq!(
        jobs.lock().unwrap().len(),
        2,
        "a new load after the invalidation"
    );
    let taken: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let mut it = taken.into_iter();
    let (first, second) = (it.next().unwrap(), it.next().unwrap());
    second();
    b.set(3);
    first(); // the old load, run last: reads 3, must not replace 4
    assert_eq!(
        c.get(&1),
        Some(4),
        "an invalidated load stored its value last"
    );
    balanced(&c.stats());
}

#[test]
fn fail_safe_stale_entries_are_invisible_to_plain_reads() {
    let _w = wd("stale invisible");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(10 * SEC)
        .fail_safe(100 * SEC)
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(11 * SEC);
    assert!(!c.contains_key(&1));
    assert_eq!(c.get(&1), None);
    assert_eq!(c.iter().count(), 0, "iteration shows a stale entry");
    let seen = c.entry(1).and_compute_with(|e| {
        assert!(e.is_none(), "a computation sees the stale entry");
        herdcache::Op::Nop
    });
    assert!(matches!(seen, herdcache::CompResult::StillNone(_)));
    assert_eq!(c.get_or_stale(&1), Some(1), "Nop kept it");
    let mut kept = 0;
    c.retain(|_, _| {
        kept += 1;
        true
    });
    assert_eq!(c.get_or_stale(&1), Some(1));
    // or_insert_with treats it as absent and stores a new value.
    let v = c.entry(1).or_insert_with(|| 2).into_value();
    assert_eq!(v, 2);
    assert_eq!(c.get(&1), Some(2));
}

#[test]
fn fail_safe_init_panic_goes_to_its_caller_waiters_get_stale() {
    quiet_injected_panics();
    let _w = wd("fail-safe init panic");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(10 * SEC)
        .fail_safe(100 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(11 * SEC);
    let gate = Backend::default();
    gate.hold();
    let c2 = c.clone();
    let g = gate.clone();
    let leader = common::start(move || {
        c2.get_with(1, || {
            g.call(&1).unwrap();
            panic!("injected init panic")
        })
    });
    gate.wait_started(1);
    let c3 = c.clone();
    let waiter = common::start(move || c3.get_with(1, || 50));
    assert!(eventually(|| c.stats().coalesced == 1));
    gate.release();
    assert!(
        leader.wait(Duration::from_secs(10)).unwrap().is_err(),
        "the panic goes to its caller"
    );
    assert_eq!(
        waiter
            .wait(Duration::from_secs(10))
            .expect("stuck")
            .unwrap(),
        1,
        "waiter: old value"
    );
    let called = AtomicBool::new(false);
    assert_eq!(
        c.get_with(1, || {
            called.store(true, Ordering::SeqCst);
            60
        }),
        1
    );
    assert!(!called.load(Ordering::SeqCst), "no load within the backoff");
    balanced(&c.stats());
    // Op::Remove on the stale entry removes it for good.
    let _ = c.entry(1).and_compute_with(|e| {
        assert!(e.is_none());
        herdcache::Op::Remove
    });
    assert_eq!(c.get_or_stale(&1), None, "Op::Remove ends the stale value");
}

#[test]
fn fail_safe_abandoned_async_leader_waiters_get_stale() {
    let _w = wd("fail-safe async abandoned");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(10 * SEC)
        .fail_safe(100 * SEC)
        .refresh_backoff(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .build();
    c.insert(1, 1);
    clock.advance(11 * SEC);
    let door = common::hand::Door::default();
    let d = door.clone();
    let c1 = c.clone();
    let mut leader: common::hand::BoxFut<u64> = Box::pin(async move {
        c1.get_with_async(1, async move {
            d.wait().await;
            77
        })
        .await
    });
    common::hand::pending(&mut leader, "leader");
    let c2 = c.clone();
    let waiter = common::start(move || c2.get_with(1, || 50));
    assert!(eventually(|| c.stats().coalesced == 1));
    drop(leader);
    assert_eq!(
        waiter
            .wait(Duration::from_secs(10))
            .expect("stuck")
            .unwrap(),
        1,
        "waiter: old value"
    );
    assert_eq!(
        c.get_with(1, || 60),
        1,
        "within the backoff: old value, no load"
    );
    assert_eq!(c.loads_in_flight(), 0);
    balanced(&c.stats());
}

/// No writes: at any moment at most one backend call per key runs, whatever mix of loads,
/// refreshes, timeouts, failures, panics and async callers.
fn one_call_per_key_at_a_time(
    cfg: &str,
    build: impl FnOnce(herdcache::CacheBuilder<u64, u64>) -> C,
) {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let running: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let overlap = Arc::new(AtomicBool::new(false));
    let mode = Arc::new(AtomicU64::new(0));
    let (r2, o2, m2) = (
        Arc::clone(&running),
        Arc::clone(&overlap),
        Arc::clone(&mode),
    );
    let builder = Cache::builder()
        .max_capacity(1000)
        .time_to_live(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u64| {
            if r2[*k as usize].fetch_add(1, Ordering::SeqCst) != 0 {
                o2.store(true, Ordering::SeqCst);
            }
            for _ in 0..3 {
                std::thread::yield_now();
            }
            r2[*k as usize].fetch_sub(1, Ordering::SeqCst);
            match m2.load(Ordering::SeqCst) % 5 {
                0 | 1 => Ok::<_, BoxError>(*k),
                2 | 3 => Err(BoxError::from("injected down")),
                _ => panic!("injected loader panic"),
            }
        });
    let c = build(builder);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = c.clone();
            let clock = clock.clone();
            let mode = Arc::clone(&mode);
            s.spawn(move || {
                let mut r = common::Rng(t * 7 + 3);
                for _ in 0..1500 {
                    let k = r.next() % 4;
                    match r.next() % 8 {
                        0 => clock.advance(Duration::from_millis(r.next() % 3000)),
                        1 => mode.store(r.next(), Ordering::SeqCst),
                        2 => {
                            let _ =
                                c.load_with_timeout(k, Some(Duration::from_micros(r.next() % 300)));
                        }
                        3 => {
                            let _ = c.get(&k);
                        }
                        4 => {
                            let _ = c.get_or_stale(&k);
                        }
                        _ => {
                            let _ = c.load(k);
                        }
                    }
                }
            });
        }
    });
    assert!(
        !overlap.load(Ordering::SeqCst),
        "{cfg}: two backend calls of one key at once"
    );
    assert!(
        eventually(|| c.loads_in_flight() == 0),
        "{cfg}: load left in flight"
    );
    mode.store(0, Ordering::SeqCst);
    clock.advance(1000 * SEC);
    for k in 0..4 {
        let c2 = c.clone();
        let r = common::within(Duration::from_secs(10), move || c2.load(k)).expect("stuck key");
        assert_eq!(r.unwrap().unwrap(), k, "{cfg}");
    }
}

#[test]
fn stress_single_flight_plain() {
    let _w = wd("sf plain");
    one_call_per_key_at_a_time("plain", |b| b.negative_ttl(SEC).build());
}

#[test]
fn stress_single_flight_everything() {
    let _w = wd("sf everything");
    one_call_per_key_at_a_time("everything", |b| {
        b.refresh_after(SEC)
            .refresh_backoff(Duration::from_millis(300))
            .negative_ttl(SEC)
            .fail_safe(20 * SEC)
            .max_concurrent_loads(2)
            .spawner(threaded)
            .jitter(0.3)
            .build()
    });
}

#[test]
fn stress_single_flight_inline_limit_one() {
    let _w = wd("sf inline");
    one_call_per_key_at_a_time("inline", |b| {
        b.refresh_after(SEC)
            .early_refresh(5.0)
            .fail_safe(20 * SEC)
            .max_concurrent_loads(1)
            .load_timeout(Duration::from_micros(200))
            .build()
    });
}

#[test]
fn async_refresh_future_dropped_while_waiting_for_a_permit() {
    let _w = wd("async refresh permit drop");
    let clock = ManualClock::new();
    let calls: Arc<AtomicU64> = Arc::default();
    let value = Arc::new(AtomicU64::new(1));
    let futs: Futs = Arc::default();
    let f2 = Arc::clone(&futs);
    let cl: Arc<AtomicU64> = Arc::clone(&calls);
    let vl: Arc<AtomicU64> = Arc::clone(&value);
    let door = common::hand::Door::default();
    let d = door.clone();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .refresh_backoff(5 * SEC)
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .record_stats()
        .async_loader(move |k: &u64| {
            cl.fetch_add(1, Ordering::SeqCst);
            let v = vl.load(Ordering::SeqCst);
            let w = d.wait();
            let k = *k;
            async move {
                if k == 2 {
                    w.await;
                }
                Ok::<_, BoxError>(v)
            }
        })
        .future_spawner(move |f| f2.lock().unwrap().push(f))
        .build();
    let bo = |f: common::hand::BoxFut<Result<u64, LoadError>>| {
        let mut f = f;
        common::hand::run(&mut f, 100)
    };
    let c1 = c.clone();
    assert_eq!(
        bo(Box::pin(async move { c1.load_async(1).await }))
            .unwrap()
            .unwrap()
            .unwrap(),
        1
    );
    // Key 2's load holds the only permit (pending at the door).
    let c2 = c.clone();
    let mut holder: common::hand::BoxFut<Result<u64, LoadError>> =
        Box::pin(async move { c2.load_async(2).await });
    common::hand::pending(&mut holder, "holder");
    clock.advance(11 * SEC);
    assert_eq!(c.get(&1), Some(1));
    let mut f = futs.lock().unwrap().pop().expect("a refresh future");
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        f.as_mut().poll(&mut cx).is_pending(),
        "waits for the permit"
    );
    drop(f);
    assert_eq!(c.loads_in_flight(), 1, "only the holder");
    door.open();
    assert_eq!(
        common::hand::run(&mut holder, 100)
            .expect("holder stuck")
            .unwrap()
            .unwrap(),
        1
    );
    // The permit and the key are free again.
    let c3 = c.clone();
    assert_eq!(
        bo(Box::pin(async move { c3.load_async(3).await }))
            .expect("permit lost")
            .unwrap()
            .unwrap(),
        1
    );
    clock.advance(6 * SEC);
    value.store(9, Ordering::SeqCst);
    c.get(&1);
    let f = futs
        .lock()
        .unwrap()
        .pop()
        .expect("refresh retried after the backoff");
    futures::executor::block_on(f);
    assert_eq!(c.get(&1), Some(9));
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2, "{s:#?}");
    let _ = calls;
}

#[test]
fn shared_async_load_every_caller_left_is_abandoned() {
    let _w = wd("shared abandoned");
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let door = common::hand::Door::default();
    let d1 = door.clone();
    let c1 = c.clone();
    let mut a: common::hand::BoxFut<u64> = Box::pin(async move {
        c1.get_with_async_shared(1, async move {
            d1.wait().await;
            5
        })
        .await
    });
    common::hand::pending(&mut a, "a");
    let c2 = c.clone();
    let mut b: common::hand::BoxFut<u64> =
        Box::pin(async move { c2.get_with_async_shared(1, async { 6 }).await });
    common::hand::pending(&mut b, "b");
    drop(a);
    drop(b);
    assert_eq!(c.loads_in_flight(), 0);
    let s = c.stats();
    assert_eq!(s.loads_abandoned, 1, "{s:#?}");
    balanced(&s);
    assert_eq!(c.get_with(1, || 7), 7);
}

// ------------------------------------------------------------------ minimal repros

#[test]
// Failed before the fix (stop 36): minimal repro of the balance bug: a refresh job dropped by the spawner counts
// refreshes_started = refreshes_failed = 1 but no load (loads_abandoned = 0), so
// misses + refreshes_started (2) != loads + coalesced + negative_hits (1).
fn min_balance_refresh_job_dropped() {
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(10)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .spawner(drop)
        .build();
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    c.get(&1);
    let s = c.stats();
    assert_eq!(
        (
            s.misses,
            s.load_successes,
            s.refreshes_started,
            s.refreshes_failed
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(
        s.loads_abandoned, 1,
        "stats.rs: loads_abandoned counts 'a job the spawner dropped unrun'"
    );
}

#[test]
// Failed before the fix (stop 36): minimal repro: an inline refresh deferred by a full load limit counts
// refreshes_started and refreshes_failed but no load column.
fn min_balance_refresh_deferred_by_the_limit() {
    let _w = wd("min deferred");
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(10)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .record_stats()
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .build();
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    let gate = Backend::default();
    gate.hold();
    let (c2, g) = (c.clone(), gate.clone());
    let h = common::start(move || c2.get_with(2, || g.call(&2).unwrap()));
    gate.wait_started(1);
    c.get(&1); // due: refresh deferred (limit full)
    gate.release();
    h.wait(Duration::from_secs(10)).unwrap().unwrap();
    let s = c.stats();
    // 2 misses (load 1, get_with 2), 2 loads; 1 refresh started that loaded nothing.
    assert_eq!(
        (
            s.misses,
            s.load_successes,
            s.refreshes_started,
            s.refreshes_failed
        ),
        (2, 2, 1, 1)
    );
    balanced(&s);
}

#[test]
// Failed before the fix (stop 36): the same for an async refresh whose future the future_spawner drops.
fn min_balance_async_refresh_future_dropped() {
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(10)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k) }
        })
        .future_spawner(drop)
        .build();
    futures::executor::block_on(c.load_async(1)).unwrap();
    clock.advance(11 * SEC);
    c.get(&1);
    balanced(&c.stats());
}

#[test]
fn a_write_during_get_all_wins() {
    let _w = wd("get_all write");
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let gate = Backend::default();
    gate.hold();
    let (c2, g) = (c.clone(), gate.clone());
    let bulk = common::start(move || {
        c2.get_all([1, 2, 3], |m| {
            g.call(&0).unwrap();
            m.iter().map(|&k| (k, k)).collect::<HashMap<_, _>>()
        })
    });
    gate.wait_started(1);
    c.insert(2, 200);
    c.invalidate(&3);
    gate.release();
    let r = bulk.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(r.get(&1), Some(&1));
    assert_eq!(
        c.get(&2),
        Some(200),
        "get_all's value replaced a write made during it"
    );
    assert_eq!(
        c.get(&3),
        None,
        "get_all stored a value invalidated during it"
    );
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(c.loads_in_flight(), 0);
}

#[test]
fn negative_caching_for_try_get_with_and_async() {
    let _w = wd("negative try/async");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicU64::new(0));
    let cl = Arc::clone(&calls);
    let c: C = Cache::builder()
        .max_capacity(100)
        .negative_ttl(5 * SEC)
        .clock(clock.clone())
        .record_stats()
        .async_loader(move |_k: &u64| {
            cl.fetch_add(1, Ordering::SeqCst);
            async { Err::<u64, _>(BoxError::from("injected down")) }
        })
        .build();
    let inits = AtomicU64::new(0);
    let f = || {
        inits.fetch_add(1, Ordering::SeqCst);
        Err::<u64, String>("e".into())
    };
    assert!(c.try_get_with(1, f).is_err());
    assert!(c.try_get_with(1, f).is_err());
    assert_eq!(
        inits.load(Ordering::SeqCst),
        1,
        "try_get_with's error remembered"
    );
    // Async: 4 concurrent callers, one call; then remembered.
    let futs: Vec<_> = (0..4).map(|_| c.load_async(2)).collect();
    let rs = futures::executor::block_on(futures::future::join_all(futs));
    assert!(rs.iter().all(|r| r.is_err()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(futures::executor::block_on(c.load_async(2)).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let r = futures::executor::block_on(c.optionally_get_with_async(3, async { None }));
    assert_eq!(r, None);
    let r = futures::executor::block_on(c.optionally_get_with_async(3, async { Some(1) }));
    assert_eq!(r, None, "None remembered for async too");
    clock.advance(5 * SEC);
    assert!(futures::executor::block_on(c.load_async(2)).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    balanced(&c.stats());
}

#[test]
fn a_waiter_timing_out_returns_a_value_written_meanwhile() {
    let _w = wd("timeout returns cached");
    let b = Backend::default();
    let c: C = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(b.loader())
        .spawner(threaded)
        .build();
    b.set(5);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1)); // no timeout: waits for the job
    b.wait_started(1);
    let c3 = c.clone();
    let waiter = common::start(move || c3.load_with_timeout(1, Some(Duration::from_millis(300))));
    assert!(eventually(|| c.stats().coalesced >= 1), "{:#?}", c.stats());
    c.insert(1, 9);
    let r = waiter
        .wait(Duration::from_secs(10))
        .expect("waiter stuck")
        .unwrap();
    assert_eq!(
        r.unwrap(),
        9,
        "the value cached for the key when the timeout passes"
    );
    b.release();
    let l = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(matches!(l, Ok(5) | Ok(9)), "{l:?}");
    assert!(eventually(|| c.loads_in_flight() == 0));
    assert_eq!(c.get(&1), Some(9));
}

// ------------------------------------------------------------------ a key whose Clone acts

type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;
/// Clones to let pass before the hook fires (the first, under the read lock, is a hit's).
static SKIP: AtomicU64 = AtomicU64::new(0);

struct HK(u64, Hook);
impl std::fmt::Debug for HK {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HK{}", self.0)
    }
}
impl Clone for HK {
    fn clone(&self) -> Self {
        let mut g = self.1.lock().unwrap();
        let f = if g.is_some() && SKIP.load(Ordering::SeqCst) > 0 {
            SKIP.fetch_sub(1, Ordering::SeqCst);
            None
        } else {
            g.take()
        };
        drop(g);
        if let Some(f) = f {
            f();
        }
        HK(self.0, Arc::clone(&self.1))
    }
}
impl PartialEq for HK {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for HK {}
impl std::hash::Hash for HK {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}

#[test]
fn a_write_between_a_refresh_claim_and_its_registration_wins() {
    let _w = wd("aba refresh");
    let clock = ManualClock::new();
    let hook: Hook = Arc::default();
    let (jobs, spawn) = parked();
    let version = Arc::new(AtomicU64::new(1));
    let ve = Arc::clone(&version);
    let c: Cache<HK, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &HK| Ok::<_, BoxError>(ve.load(Ordering::SeqCst)))
        .spawner(spawn)
        .build();
    let key = HK(1, Arc::clone(&hook));
    c.insert(key.clone(), 1);
    clock.advance(11 * SEC);
    // Every clone of the key from now on (the refresh's) first has another thread replace
    // the value (invalidate + insert: a new entry), and waits for it.
    let c2 = c.clone();
    let h2 = Arc::clone(&hook);
    let ve2 = Arc::clone(&version);
    *hook.lock().unwrap() = Some(Box::new(move || {
        let c3 = c2.clone();
        let h3 = Arc::clone(&h2);
        let r = common::within(Duration::from_secs(5), move || {
            c3.invalidate(&HK(1, Arc::default()));
            c3.insert(HK(1, h3), 100);
        });
        assert!(
            r.is_some(),
            "a write from another thread blocked while the key was cloned"
        );
        ve2.store(2, Ordering::SeqCst); // the backend's value is older than the write...
    }));
    SKIP.store(
        std::env::var("HK_SKIP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        Ordering::SeqCst,
    );
    let r = c.get(&HK(1, Arc::default()));
    assert!(r == Some(1) || r == Some(100), "{r:?}");
    assert!(hook.lock().unwrap().is_none(), "the hook never fired");
    hook.lock().unwrap().take();
    run_jobs(&jobs);
    assert_eq!(
        c.get(&HK(1, Arc::default())),
        Some(100),
        "a refresh claimed before the write overwrote it"
    );
    version.store(3, Ordering::SeqCst);
    clock.advance(11 * SEC);
    c.get(&HK(1, Arc::default()));
    run_jobs(&jobs);
    assert_eq!(
        c.get(&HK(1, Arc::default())),
        Some(3),
        "later refreshes still work"
    );
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed
    );
}

#[test]
fn fail_safe_never_serves_past_max_stale_even_for_a_load_started_within_it() {
    let _w = wd("max_stale during load");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(10 * SEC)
        .fail_safe(20 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(b.loader())
        .build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    b.hold();
    let c2 = c.clone();
    let leader = common::start(move || c2.load(1));
    b.wait_started(2);
    let c3 = c.clone();
    let waiter = common::start(move || c3.load(1));
    assert!(eventually(|| c.stats().coalesced == 1));
    clock.advance(20 * SEC); // 31 s: past deadline (10 s) + max_stale (20 s)
                             // A timed-out caller now: no stale value to fall back on.
    let r = c.load_with_timeout(1, Some(Duration::from_millis(20)));
    assert!(
        matches!(r, Err(LoadError::Timeout)),
        "served past max_stale at a timeout: {r:?}"
    );
    b.release();
    let l = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    let w = waiter.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(l.is_err(), "leader served past max_stale: {l:?}");
    assert!(w.is_err(), "waiter served past max_stale: {w:?}");
}

#[test]
fn total_load_time_on_the_cache_clock() {
    quiet_injected_panics();
    let _w = wd("load time");
    let clock = ManualClock::new();
    let ck = clock.clone();
    let step = Arc::new(AtomicU64::new(2));
    let st = Arc::clone(&step);
    let fail = Arc::new(AtomicBool::new(false));
    let fl = Arc::clone(&fail);
    let c: C = Cache::builder()
        .max_capacity(100)
        .time_to_live(100 * SEC)
        .refresh_after(10 * SEC)
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            ck.advance(Duration::from_secs(st.load(Ordering::SeqCst)));
            if fl.load(Ordering::SeqCst) {
                Err(BoxError::from("injected"))
            } else {
                Ok::<_, BoxError>(1)
            }
        })
        .build();
    c.load(1).unwrap();
    assert_eq!(c.stats().total_load_time, 2 * SEC);
    step.store(3, Ordering::SeqCst);
    fail.store(true, Ordering::SeqCst);
    assert!(c.load(2).is_err());
    assert_eq!(
        c.stats().total_load_time,
        5 * SEC,
        "failed loads count their time"
    );
    fail.store(false, Ordering::SeqCst);
    step.store(4, Ordering::SeqCst);
    clock.advance(11 * SEC);
    c.get(&1); // inline refresh
    let s = c.stats();
    assert_eq!(s.refreshes_succeeded, 1);
    assert_eq!(
        s.total_load_time,
        9 * SEC,
        "refreshes count their time: {s:#?}"
    );
    assert_eq!(s.average_load_time(), 3 * SEC);
}

#[test]
fn stale_served_after_ttl_counts_each_caller_once() {
    let _w = wd("stale counts");
    let b = Backend::default();
    let clock = ManualClock::new();
    let c = failsafe(&b, &clock).build();
    b.set(1);
    c.load(1).unwrap();
    clock.advance(11 * SEC);
    b.fail(true);
    b.hold();
    let mut callers = Vec::new();
    for _ in 0..4 {
        let c2 = c.clone();
        callers.push(common::start(move || c2.load(1)));
    }
    b.wait_started(2);
    assert!(eventually(|| c.stats().coalesced == 3));
    b.release();
    for r in callers {
        assert_eq!(
            r.wait(Duration::from_secs(10)).unwrap().unwrap().unwrap(),
            1
        );
    }
    let s = c.stats();
    assert!(
        s.stale_served_after_ttl == 4 || s.stale_served_after_ttl == 1,
        "4 callers answered stale: {}",
        s.stale_served_after_ttl
    );
    eprintln!(
        "stale_served_after_ttl for 4 callers of one failed load: {}",
        s.stale_served_after_ttl
    );
    balanced(&s);
}
