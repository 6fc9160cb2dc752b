//! Attack round s30: stampede protection and its calls into user code — refresh-ahead with
//! spawners and future spawners that panic, drop, delay or inline their jobs; early refresh
//! (XFetch) and the refresh backoff; the load limit under nested, panicking and cancelled
//! loads; soft timeouts, fail-safe and negative caching; the statistics and health under
//! these faults. Public API only (plus the `testing` feature's `validate` /
//! `loads_in_flight`).
//!
//! Run with `cargo test --test attack_s30 --features testing`.
//!
//! Tests named `finding_*` failed on the code they were written against (stop 23); all but
//! two pass now (the two are `#[ignore]`d with the reason: open, listed in stop 23's note;
//! `cargo test --test attack_s30 --features testing -- --ignored` runs them). Tests named
//! `probe_*` passed from the start and stay as regression tests; two findings that were
//! documented behaviour became probes (a refresh's future catching its loader's panic;
//! fail-safe with a spawner loading once the permit frees).
//!
//! Findings:
//! * Load takeover (a nested load holding a permit takes over a leader waiting for one):
//!   - a taken-over *shared* async load (`load_async`) whose future then gets a permit ends as
//!     "nothing" and publishes that while the taker still loads: the async caller panics
//!     (`lost_load`), the taker panics ("a leader accepts its own"), an `optionally_` waiter
//!     gets `None` (`finding_taken_over_shared_async_load_publishes_nothing_when_its_permit_arrives`);
//!   - dropping the original leader of a taken-over load — the last async caller of a shared
//!     load, a borrowed `get_with_async` leader, or a spawner's refresh job — abandons the
//!     flight while the taker loads: waiters load again, the taker's value is not stored
//!     (`finding_dropping_*`, `finding_dropped_refresh_job_*`);
//!   - when the taker of a shared async load panics or finds nothing (`None`), the async
//!     caller whose load never ran panics with "the load this call started panicked" instead
//!     of loading again (`finding_async_caller_panics_when_the_taker_of_its_load_*`);
//!   - a taken-over refresh counts as neither succeeded nor failed: the backlog grows for good
//!     and `health()` warns `RefreshCannotKeepUp` (`finding_taken_over_refresh_*`).
//! * Nested loads under `max_concurrent_loads`: `get_all` and computations inside a loader
//!   wait for a leader that waits for their permit (deadlock); `load` with a soft timeout and
//!   a spawner hands the nested load to a job that waits for the caller's own permit (always
//!   times out); with an inline spawner the soft timeout does not bound the permit wait.
//! * Early refresh (XFetch): a failed early refresh ignores `refresh_backoff` (one load per
//!   read); `remaining` is measured to the idle deadline, not the time-to-live one; an async
//!   refresh times its load on the coarse clock (δ = 0: never early again).
//! * Statistics and health: a refresh superseded by a write counts as succeeded; a panicking
//!   async refresh is not a load failure; `get_with` over a negative entry counts a negative
//!   hit; a failed refresh nobody waited on counts a stale answer (`ServingStale`).
//! * Docs vs behaviour: fail-safe's "spawner or not: its loader then does not run"; a failed
//!   refresh of an expired key that callers waited on is not negatively cached.

#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]

mod common;

use common::{quiet_injected_panics, watchdog, within};
use herdcache::{BoxError, BoxFuture, Cache, LoadError, ManualClock, Op};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;
type Futs = Arc<Mutex<Vec<BoxFuture<()>>>>;

/// Runs every job queued so far (and any queued while they run).
fn run_jobs(jobs: &Jobs) -> usize {
    let mut n = 0;
    loop {
        let batch: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
        if batch.is_empty() {
            return n;
        }
        for j in batch {
            j();
            n += 1;
        }
    }
}

/// Polls every queued future to completion on this thread, catching panics.
fn run_futs(futs: &Futs) -> (usize, usize) {
    let (mut ran, mut panicked) = (0, 0);
    loop {
        let batch: Vec<_> = std::mem::take(&mut *futs.lock().unwrap());
        if batch.is_empty() {
            return (ran, panicked);
        }
        for f in batch {
            ran += 1;
            if catch_unwind(AssertUnwindSafe(|| futures::executor::block_on(f))).is_err() {
                panicked += 1;
            }
        }
    }
}

/// The key is usable again: a load of it runs its loader and returns its value.
fn usable(cache: &Cache<u64, u64>, key: u64) {
    cache.invalidate(&key);
    assert_eq!(cache.get_with(key, || 4242), 4242);
    assert_eq!(cache.get(&key), Some(4242));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// =============================================================================================
// 1. Early refresh (XFetch) and the refresh backoff
// =============================================================================================

/// A failed early refresh must wait `refresh_backoff` before the next attempt, as a failed
/// refresh-ahead does ("On failure the old value keeps being served and the next refresh
/// waits `refresh_backoff`"; `refresh_backoff`: "After a failed refresh ..., wait this long
/// before the next attempt"). XFetch near the deadline is due on nearly every read, so a
/// failing backend would see one load per read.
#[test]
fn finding_failed_early_refresh_ignores_the_backoff() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let (c, f, ck) = (Arc::clone(&calls), Arc::clone(&fail), clock.clone());
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .early_refresh(1.0)
        .refresh_backoff(Duration::from_secs(30))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            c.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                return Err(BoxError::from("backend down"));
            }
            ck.advance(Duration::from_secs(50)); // a slow load: δ = 50 s
            Ok(*k + 1)
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    fail.store(true, Ordering::SeqCst);
    // 1 ms before the hard deadline: XFetch is due with probability exp(-0.001/50) ≈ 1.
    clock.advance(Duration::from_millis(59_999));
    for _ in 0..20 {
        assert_eq!(cache.get(&1), Some(2), "the old value is served");
    }
    let refreshes = calls.load(Ordering::SeqCst) - 1;
    let s = cache.stats();
    assert!(refreshes >= 1, "the early refresh happened");
    assert_eq!(
        refreshes, 1,
        "a failed early refresh is retried after the 30 s backoff, not on the next read \
         (refreshes started {}, failed {})",
        s.refreshes_started, s.refreshes_failed
    );
}

/// XFetch's probability is `exp(−remaining / (δ·β))` with `remaining` "the time to its
/// `time_to_live` deadline" (`early_refresh`). With a time to idle shorter than the time to
/// live, the idle deadline is not the time-to-live deadline: an entry 590 s from its time to
/// live must not be refreshed early by a load time of 5 s.
#[test]
fn finding_early_refresh_measures_remaining_to_the_idle_deadline() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, ck) = (Arc::clone(&calls), clock.clone());
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(600))
        .time_to_idle(Duration::from_secs(10))
        .early_refresh(1.0)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                ck.advance(Duration::from_secs(5)); // the first load takes 5 s: δ = 5 s
            }
            Ok::<_, BoxError>(*k + 1)
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    // 1 ms before the idle deadline, 590 s before the time-to-live deadline:
    // exp(−590 s / 5 s) ≈ 0 by the documented formula; exp(−1 ms / 5 s) ≈ 1 to the idle one.
    let mut early = 0;
    for _ in 0..5 {
        clock.advance(Duration::from_millis(9_999));
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(
            cache.get(&1),
            Some(2),
            "the entry is alive (each read moves its idle deadline)"
        );
        early += calls.load(Ordering::SeqCst) - before;
        if early > 0 {
            break;
        }
    }
    assert_eq!(
        early, 0,
        "an entry ~590 s from its time-to-live deadline was refreshed early (refreshes started: {})",
        cache.stats().refreshes_started
    );
}

// =============================================================================================
// 2. Refresh statistics
// =============================================================================================

fn spawned_refresh_cache(
    clock: &ManualClock,
    jobs: &Jobs,
    calls: &Arc<AtomicUsize>,
) -> Cache<u64, u64> {
    let (j, c) = (Arc::clone(jobs), Arc::clone(calls));
    Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            let n = c.fetch_add(1, Ordering::SeqCst) as u64;
            Ok::<_, BoxError>(*k * 1000 + n)
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build()
}

/// `refreshes_succeeded`: "Refreshes that replaced the value." A refresh whose value lost to
/// a write of the key (the write wins: the value is not stored) did not replace the value.
#[test]
fn finding_refresh_superseded_by_a_write_counts_as_succeeded() {
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = spawned_refresh_cache(&clock, &jobs, &calls);
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&1), Some(1000), "due: served, refresh queued");
    assert_eq!(jobs.lock().unwrap().len(), 1);
    cache.insert(1, 7); // a newer write
    assert_eq!(run_jobs(&jobs), 1);
    assert_eq!(
        cache.get(&1),
        Some(7),
        "the write wins over the late refresh"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let s = cache.stats();
    assert_eq!(s.refreshes_started, 1);
    assert_eq!(
        (s.refreshes_succeeded, s.refreshes_failed),
        (0, 1),
        "the refresh did not replace the value: not a success, and it ended (started = \
         succeeded + failed)"
    );
}

/// `load_failures`: "Loads that failed (an error, `None`, or a panic in a refresh)". A
/// blocking refresh whose loader panics counts one; an async refresh (future spawner) whose
/// loader panics must too.
#[test]
fn finding_async_refresh_panic_is_not_a_load_failure() {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let futs: Futs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (f, c) = (Arc::clone(&futs), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .async_loader(move |k: &u64| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let k = *k;
            async move {
                if n >= 1 {
                    panic!("injected async refresh panic");
                }
                Ok::<_, BoxError>(k + 1)
            }
        })
        .future_spawner(move |fut| f.lock().unwrap().push(fut))
        .build();
    assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 2);
    let before = cache.stats();
    assert_eq!((before.load_successes, before.load_failures), (1, 0));
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&1), Some(2));
    let (ran, panicked) = run_futs(&futs);
    assert_eq!(
        (ran, panicked, calls.load(Ordering::SeqCst)),
        (1, 0, 2),
        "the refresh ran, its loader panicked, the refresh's future caught it"
    );
    assert_eq!(cache.get(&1), Some(2), "the old value is kept");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let s = cache.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (1, 1));
    assert_eq!(
        s.load_failures, 1,
        "a panic in a refresh is a failed load (as for a blocking refresh)"
    );
}

/// The same panic in a blocking refresh (on a spawner): counted as a failed load.
#[test]
fn probe_blocking_refresh_panic_is_a_load_failure() {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (j, c) = (Arc::clone(&jobs), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if c.fetch_add(1, Ordering::SeqCst) >= 1 {
                panic!("injected refresh panic");
            }
            Ok::<_, BoxError>(*k + 1)
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&1), Some(2));
    assert_eq!(run_jobs(&jobs), 1);
    let s = cache.stats();
    assert_eq!(
        (s.refreshes_started, s.refreshes_failed, s.load_failures),
        (1, 1, 1)
    );
    // Backoff: no new refresh before 5 s, one after.
    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&1), Some(2));
    assert_eq!(jobs.lock().unwrap().len(), 0, "within the backoff");
    clock.advance(Duration::from_secs(2));
    assert_eq!(cache.get(&1), Some(2));
    assert_eq!(jobs.lock().unwrap().len(), 1, "after the backoff");
    run_jobs(&jobs);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// A refresh queued on the spawner (under `max_concurrent_loads`) is taken over by a nested
/// load that holds a permit (the documented takeover: "a nested load ... takes over a load of
/// its key whose leader still waits for a permit"). The queued job then finds its flight
/// taken and returns — counted as neither succeeded nor failed, so every takeover stays in
/// the refresh backlog for good, and `health()` reports `RefreshCannotKeepUp` ("Refreshes
/// started and not finished, now") with nothing left running or queued.
#[test]
fn finding_taken_over_refresh_stays_in_the_backlog_and_health_warns() {
    let _w = watchdog(LIMIT, "taken over refresh");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (j, c) = (Arc::clone(&jobs), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(*k + 1)
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    const N: u64 = 80;
    for k in 0..N {
        assert_eq!(cache.load(k).unwrap(), k + 1);
    }
    clock.advance(Duration::from_secs(20));
    for k in 0..N {
        assert_eq!(cache.get(&k), Some(k + 1)); // each queues a refresh job
    }
    assert_eq!(jobs.lock().unwrap().len() as u64, N);
    clock.advance(Duration::from_secs(50)); // every entry expired, the refreshes still queued
    for k in 0..N {
        // A load of another key whose loader (holding the only permit) loads `k`: it takes the
        // queued refresh of `k` over.
        let c2 = cache.clone();
        let v = cache.get_with(1_000_000 + k, move || c2.load(k).unwrap() + 1_000);
        assert_eq!(v, k + 1 + 1_000);
    }
    assert_eq!(run_jobs(&jobs) as u64, N, "every queued job ran");
    for k in 0..N {
        assert_eq!(cache.get(&k), Some(k + 1));
    }
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let s = cache.stats();
    let health = cache.health();
    assert!(
        !health
            .warnings()
            .iter()
            .any(|w| matches!(w, herdcache::Warning::RefreshCannotKeepUp { .. })),
        "no refresh is queued or running, yet: {health:?}"
    );
    assert!(
        s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed,
        "every refresh ended: started {} = succeeded {} + failed {}",
        s.refreshes_started,
        s.refreshes_succeeded,
        s.refreshes_failed
    );
}

// =============================================================================================
// 3. The load limit: nested loads, spawners, timeouts
// =============================================================================================

/// `get_with`: "Loading *other* keys inside `init` is fine, also under
/// `max_concurrent_loads`: a nested load runs under its caller's permit". With a spawner and a
/// soft timeout, `load` hands the nested load to the spawner, whose job waits for a permit —
/// the one its own caller holds — so the nested load can only time out.
#[test]
fn finding_nested_load_with_timeout_and_spawner_starves_under_the_limit() {
    let _w = watchdog(LIMIT, "nested load with spawner");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_concurrent_loads(1)
        .max_capacity(100)
        .load_timeout(Duration::from_millis(500))
        .record_stats()
        .loader(move |k: &u64| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(*k + 1)
        })
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .build();
    let c2 = cache.clone();
    let r = cache.try_get_with(1, move || c2.load(2).map(|v| v * 10));
    let s = cache.stats();
    assert_eq!(
        r.map_err(|e| e.to_string()),
        Ok(30),
        "the nested load of 2 runs under the outer load's permit (timeouts: {})",
        s.timeouts
    );
    assert!(common::eventually(|| cache.loads_in_flight() == 0));
    cache.validate();
}

// =============================================================================================
// 4. Negative caching
// =============================================================================================

fn negative_cache(clock: &ManualClock) -> Cache<u64, u64> {
    Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(30))
        .record_stats()
        .clock(clock.clone())
        .build()
}

/// `negative_hits`: "Calls answered by a negative-cache entry instead of a load." A
/// `get_with` (no error channel) cannot be answered by a remembered error: it loads — and
/// must not be counted as a negative hit as well as a load.
#[test]
fn finding_get_with_over_a_negative_entry_counts_a_negative_hit_and_a_load() {
    let clock = ManualClock::new();
    let cache = negative_cache(&clock);
    let r = cache.try_get_with(1, || Err::<u64, _>("down"));
    assert_eq!(*r.unwrap_err(), "down");
    assert_eq!(
        *cache.try_get_with(1, || Ok::<u64, &str>(9)).unwrap_err(),
        "down",
        "remembered"
    );
    let before = cache.stats();
    assert_eq!((before.negative_hits, before.load_failures), (1, 1));
    assert_eq!(
        cache.get_with(1, || 5),
        5,
        "get_with loads over the negative entry"
    );
    assert_eq!(cache.get(&1), Some(5));
    let d = cache.stats() - before;
    assert_eq!(d.load_successes, 1, "get_with loaded");
    assert_eq!(
        d.negative_hits, 0,
        "the get_with was answered by its own load, not by the negative entry"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// =============================================================================================
// 5. Soft timeouts, fail-safe and the load limit
// =============================================================================================

/// A blocker that holds the only load permit (its loader waits until released).
struct Blocker {
    release: Arc<AtomicBool>,
    inside: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Blocker {
    fn hold(cache: &Cache<u64, u64>, key: u64) -> Blocker {
        let release = Arc::new(AtomicBool::new(false));
        let inside = Arc::new(AtomicBool::new(false));
        let (r, i, c) = (Arc::clone(&release), Arc::clone(&inside), cache.clone());
        let thread = std::thread::spawn(move || {
            c.get_with(key, || {
                i.store(true, Ordering::SeqCst);
                while !r.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                7
            });
        });
        assert!(common::eventually(|| inside.load(Ordering::SeqCst)));
        Blocker {
            release,
            inside,
            thread: Some(thread),
        }
    }

    fn release(mut self) {
        self.release.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        assert!(self.inside.load(Ordering::SeqCst));
    }
}

fn fail_safe_limited(
    clock: &ManualClock,
    calls: &Arc<AtomicUsize>,
    spawner: bool,
) -> Cache<u64, u64> {
    let c = Arc::clone(calls);
    let b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(30))
        .load_timeout(Duration::from_millis(100))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            let n = c.fetch_add(1, Ordering::SeqCst) as u64;
            Ok::<_, BoxError>(*k * 100 + n)
        });
    if spawner {
        b.spawner(|job| {
            std::thread::spawn(job);
        })
        .build()
    } else {
        b.build()
    }
}

/// `fail_safe`: a soft timeout "also one that passes while the leader waits for a
/// `max_concurrent_loads` permit, spawner or not: its loader then does not run — its callers
/// get the last value ..., and the key is retried after `refresh_backoff` by one caller".
#[test]
fn probe_fail_safe_timeout_waiting_for_permit_without_spawner() {
    let _w = watchdog(LIMIT, "fail-safe permit timeout");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = fail_safe_limited(&clock, &calls, false);
    assert_eq!(cache.load(1).unwrap(), 100);
    clock.advance(Duration::from_secs(61));
    let blocker = Blocker::hold(&cache, 99);
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "timed out waiting for the permit: the last value"
    );
    blocker.release();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "its loader did not run");
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "within the backoff: the last value, no load"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_secs(31));
    assert_eq!(cache.load(1).unwrap(), 101, "after the backoff: one retry");
    let s = cache.stats();
    assert_eq!(s.timeouts, 1);
    assert_eq!(s.stale_served_after_ttl, 2);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// With a spawner, a timeout while the leader waits for a permit still answers with the last
/// value; the spawned job keeps waiting for its permit and loads then (documented on
/// `fail_safe` and `load_with_timeout`; `fail_safe`'s docs said "spawner or not: its loader
/// then does not run" until this round found the contradiction).
#[test]
fn probe_fail_safe_timeout_waiting_for_permit_with_spawner_loads_when_the_permit_frees() {
    let _w = watchdog(LIMIT, "fail-safe permit timeout spawner");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = fail_safe_limited(&clock, &calls, true);
    assert_eq!(cache.load(1).unwrap(), 100);
    clock.advance(Duration::from_secs(61));
    let blocker = Blocker::hold(&cache, 99);
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "timed out waiting for the permit: the last value"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the job waits for its permit"
    );
    blocker.release();
    assert!(common::eventually(|| cache.loads_in_flight() == 0));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the spawned job loaded once the permit was free"
    );
    assert_eq!(cache.load(1).unwrap(), 101, "its value was stored");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    cache.validate();
}

/// Runs `nested` inside the loader of key 10 (which holds the only permit) while another
/// thread leads key 20 and waits in the permit queue. Returns whether everything finished.
fn nested_under_waiting_leader(
    nested: impl FnOnce(&Cache<u64, u64>) -> u64 + Send + 'static,
) -> Option<std::thread::Result<(u64, u64)>> {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let go = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let (c1, g1, i1) = (cache.clone(), Arc::clone(&go), Arc::clone(&inside));
    within(Duration::from_secs(5), move || {
        let a = std::thread::spawn(move || {
            let c = c1.clone();
            c1.get_with(10, move || {
                i1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                nested(&c)
            })
        });
        while !inside.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let c2 = cache.clone();
        let b = std::thread::spawn(move || c2.get_with(20, || 2));
        // B has claimed 20 and waits for the permit.
        while cache.stats().loads_waited_for_limit == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        go.store(true, Ordering::SeqCst);
        let (va, vb) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
        (va, vb)
    })
}

/// `get_all` inside a loader (holding the only permit) on a key whose leader waits for a
/// permit: it joins that leader and waits for it, and the leader waits for the permit the
/// `get_all` caller holds — a deadlock. (`get_with` and `load` take such a load over: "a
/// nested load runs under its caller's permit, and takes over a load of its key whose leader
/// still waits for a permit rather than wait for it".)
#[test]
fn finding_get_all_nested_under_the_limit_deadlocks_on_a_waiting_leader() {
    let r = nested_under_waiting_leader(|c| {
        let m = c.get_all([20], |ks| ks.iter().map(|&k| (k, k + 1)).collect());
        m.get(&20).copied().unwrap_or(0)
    });
    let r =
        r.expect("get_all nested in a load waits forever for a leader that waits for its permit");
    let (a, b) = r.expect("no panic");
    assert!(a == 21 || a == 2, "a value of 20: {a}");
    assert!(b == 21 || b == 2);
}

/// The same with a computation of the key inside the loader.
#[test]
fn finding_compute_nested_under_the_limit_deadlocks_on_a_waiting_leader() {
    let r = nested_under_waiting_leader(|c| {
        *c.entry(20)
            .and_upsert_with(|e| e.map_or(5, |e| e.into_value() + 100))
            .value()
    });
    let r = r.expect(
        "a computation nested in a load waits forever for a leader that waits for its permit",
    );
    r.expect("no panic");
}

/// The documented takeover, for reference: `get_with` nested in a load takes the waiting
/// leader's load over.
#[test]
fn probe_get_with_nested_under_the_limit_takes_a_waiting_leader_over() {
    let r = nested_under_waiting_leader(|c| c.get_with(20, || 21));
    let (a, b) = r.expect("finished").expect("no panic");
    assert_eq!((a, b), (21, 21));
}

// =============================================================================================
// 6. Probes: spawners and future spawners that misbehave
// =============================================================================================

fn refreshing_with(
    clock: &ManualClock,
    calls: &Arc<AtomicUsize>,
    spawner: impl Fn(Box<dyn FnOnce() + Send>) + Send + Sync + 'static,
) -> Cache<u64, u64> {
    let c = Arc::clone(calls);
    Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(5))
        .max_concurrent_loads(2)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            let n = c.fetch_add(1, Ordering::SeqCst) as u64;
            Ok::<_, BoxError>(*k * 1000 + n)
        })
        .spawner(spawner)
        .build()
}

/// A spawner that runs the job at once, in the reader: the read returns the old value, the
/// refresh is done when it returns.
#[test]
fn probe_inline_spawner_refresh() {
    let _w = watchdog(LIMIT, "inline spawner");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = refreshing_with(&clock, &calls, |job| job());
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&1), Some(1000), "served at once");
    assert_eq!(cache.get(&1), Some(1001), "refreshed inline by the spawner");
    // Inside a loader holding a permit (nested), the inline job does not wait for another.
    clock.advance(Duration::from_secs(11));
    let c2 = cache.clone();
    assert_eq!(cache.get_with(2, move || c2.get(&1).unwrap()), 1001);
    assert_eq!(cache.get(&1), Some(1002));
    let s = cache.stats();
    assert_eq!(
        (
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed
        ),
        (2, 2, 0)
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    usable(&cache, 1);
}

/// A spawner that runs the job and then panics: the refresh happened; the reader is not
/// failed; nothing is loaded twice.
#[test]
fn probe_spawner_runs_then_panics() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "run then panic");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = refreshing_with(&clock, &calls, |job| {
        job();
        panic!("injected spawner panic after running");
    });
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&1), Some(1000));
    assert_eq!(cache.get(&1), Some(1001));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    usable(&cache, 1);
}

/// A spawner that keeps jobs and runs them much later: after the key was invalidated and
/// loaded again (the late job must not overwrite the newer value, and the new entry's own
/// refresh still happens), and after every user handle of the cache was dropped.
#[test]
fn probe_late_refresh_jobs_after_reload_and_after_drop() {
    let _w = watchdog(LIMIT, "late jobs");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let j = Arc::clone(&jobs);
    let cache = refreshing_with(&clock, &calls, move |job| j.lock().unwrap().push(job));
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&1), Some(1000));
    let old_job = jobs.lock().unwrap().pop().expect("queued");
    cache.invalidate(&1);
    assert_eq!(cache.load(1).unwrap(), 1001, "loaded again");
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        cache.get(&1),
        Some(1001),
        "the new entry is due: its own refresh queued"
    );
    assert_eq!(jobs.lock().unwrap().len(), 1);
    old_job(); // the late one: loads 1002, must not be stored over the newer entry's refresh
    assert_eq!(cache.get(&1), Some(1001), "the late refresh is not stored");
    assert_eq!(run_jobs(&jobs), 1);
    assert_eq!(cache.get(&1), Some(1003), "the new entry's refresh is");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    // Jobs that outlive the user's handles.
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&1), Some(1003));
    assert_eq!(jobs.lock().unwrap().len(), 1);
    drop(cache);
    assert_eq!(run_jobs(&jobs), 1, "runs with no user handle left");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

/// A future spawner that drops every future, one that panics, and one that polls them much
/// later: each refresh is retried after the backoff; the key never stays claimed.
#[test]
fn probe_future_spawner_drops_panics_and_delays() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "future spawner");
    for mode in 0..3 {
        let clock = ManualClock::new();
        let futs: Futs = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let dropping = Arc::new(AtomicBool::new(true));
        let (f, c, d) = (Arc::clone(&futs), Arc::clone(&calls), Arc::clone(&dropping));
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(60))
            .refresh_after(Duration::from_secs(10))
            .refresh_backoff(Duration::from_secs(5))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .async_loader(move |k: &u64| {
                let n = c.fetch_add(1, Ordering::SeqCst) as u64;
                let k = *k;
                async move { Ok::<_, BoxError>(k * 1000 + n) }
            })
            .future_spawner(move |fut| {
                if d.load(Ordering::SeqCst) {
                    match mode {
                        0 => drop(fut),
                        1 => panic!("injected future spawner panic"),
                        _ => f.lock().unwrap().push(fut),
                    }
                } else {
                    f.lock().unwrap().push(fut);
                }
            })
            .build();
        assert_eq!(
            futures::executor::block_on(cache.load_async(1)).unwrap(),
            1000
        );
        clock.advance(Duration::from_secs(11));
        assert_eq!(cache.get(&1), Some(1000));
        if mode == 2 {
            // Much later: after an insert of the key.
            cache.insert(1, 5);
            assert_eq!(run_futs(&futs), (1, 0));
            assert_eq!(cache.get(&1), Some(5), "the late refresh lost to the write");
            assert_eq!(cache.loads_in_flight(), 0);
            cache.validate();
            continue;
        }
        assert_eq!(
            cache.loads_in_flight(),
            0,
            "mode {mode}: the key is not left loading"
        );
        let s = cache.stats();
        assert_eq!(
            (s.refreshes_started, s.refreshes_failed),
            (1, 1),
            "mode {mode}"
        );
        clock.advance(Duration::from_secs(4));
        assert_eq!(cache.get(&1), Some(1000));
        assert_eq!(
            cache.stats().refreshes_started,
            1,
            "mode {mode}: within the backoff"
        );
        dropping.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(2));
        assert_eq!(cache.get(&1), Some(1000));
        assert_eq!(
            run_futs(&futs),
            (1, 0),
            "mode {mode}: retried after the backoff"
        );
        assert_eq!(cache.get(&1), Some(1001), "mode {mode}");
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
        // The permit came back.
        let c2 = cache.clone();
        assert_eq!(cache.get_with(9, move || c2.get(&1).unwrap() + 1), 1002);
    }
}

/// An async refresh future dropped while it waits for a load permit: the permit queue is
/// left clean, the refresh is retried after the backoff.
#[test]
fn probe_async_refresh_dropped_while_waiting_for_a_permit() {
    let _w = watchdog(LIMIT, "async refresh waits for permit");
    let clock = ManualClock::new();
    let futs: Futs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (f, c) = (Arc::clone(&futs), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(5))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .async_loader(move |k: &u64| {
            let n = c.fetch_add(1, Ordering::SeqCst) as u64;
            let k = *k;
            async move { Ok::<_, BoxError>(k * 1000 + n) }
        })
        .future_spawner(move |fut| f.lock().unwrap().push(fut))
        .build();
    assert_eq!(
        futures::executor::block_on(cache.load_async(1)).unwrap(),
        1000
    );
    clock.advance(Duration::from_secs(11));
    let blocker = Blocker::hold(&cache, 99);
    assert_eq!(cache.get(&1), Some(1000));
    let mut fut = futs.lock().unwrap().pop().expect("queued");
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(
        fut.as_mut().poll(&mut cx).is_pending(),
        "waits for the permit"
    );
    drop(fut);
    blocker.release();
    assert_eq!(cache.loads_in_flight(), 0);
    let s = cache.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (1, 1));
    clock.advance(Duration::from_secs(6));
    assert_eq!(cache.get(&1), Some(1000));
    assert_eq!(run_futs(&futs), (1, 0));
    assert_eq!(cache.get(&1), Some(1001));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// Spins for `d` (a load that takes real time, shorter than the coarse clock's tick).
fn spin(d: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// `early_refresh`: "`δ` is how long that key took to load (measured by the cache)". Loads are
/// timed with the precise clock (a 200 µs load is 200 µs), but an async refresh (future
/// spawner) times its load with the coarse clock, which moves in 1 ms steps: a short refresh
/// measures 0, and with δ = 0 XFetch never refreshes that key early again.
#[test]
fn finding_async_refresh_load_time_is_coarse_and_disables_early_refresh() {
    let _w = watchdog(LIMIT, "async refresh timing");
    let futs: Futs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (f, c) = (Arc::clone(&futs), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(3600))
        // δ·β = 200 µs · 1e9 = 2e5 s ≫ the 3600 s left: due on nearly every read while δ > 0.
        .early_refresh(1e9)
        .record_stats()
        .async_loader(move |k: &u64| {
            let n = c.fetch_add(1, Ordering::SeqCst) as u64;
            let k = *k;
            async move {
                spin(Duration::from_micros(200));
                Ok::<_, BoxError>(k * 1000 + n)
            }
        })
        .future_spawner(move |fut| f.lock().unwrap().push(fut))
        .build();
    assert_eq!(
        futures::executor::block_on(cache.load_async(1)).unwrap(),
        1000
    );
    let mut stuck_rounds = 0;
    for round in 0..10 {
        // Read until an early refresh starts (δ > 0 makes it almost certain at once).
        let started = cache.stats().refreshes_started;
        let mut triggered = false;
        for _ in 0..50 {
            cache.get(&1);
            if cache.stats().refreshes_started > started {
                triggered = true;
                break;
            }
        }
        if !triggered {
            stuck_rounds += 1;
            break;
        }
        assert_eq!(run_futs(&futs), (1, 0), "round {round}");
    }
    let s = cache.stats();
    assert_eq!(
        stuck_rounds, 0,
        "after an async refresh of ~200 µs the key is never refreshed early again: its load \
         time was measured as 0 (refreshes {}, total load time {:?} for {} loads)",
        s.refreshes_started, s.total_load_time, s.load_successes
    );
}

// =============================================================================================
// 7. A storm of faults: every stampede feature at once, then everything must settle
// =============================================================================================

/// Threads load, refresh, time out, invalidate and compute while the loader fails, panics or
/// is slow and the spawner runs jobs inline, drops them, panics, queues them for a worker or
/// spawns a thread. Once everything settled: nothing in flight, the invariants hold, the limit
/// was never exceeded, every key loads again.
#[test]
fn probe_fault_storm_settles() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "fault storm");
    const LIMIT_N: usize = 2;
    let clock = ManualClock::new();
    let queue: Jobs = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let seq = Arc::new(AtomicUsize::new(0));
    let spawn_seq = Arc::new(AtomicUsize::new(0));
    let (q, ss) = (Arc::clone(&queue), Arc::clone(&spawn_seq));
    let (r, mr, sq) = (
        Arc::clone(&running),
        Arc::clone(&max_running),
        Arc::clone(&seq),
    );
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(64)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(20))
        .refresh_backoff(Duration::from_secs(3))
        .early_refresh(1.0)
        .jitter(0.1)
        .negative_ttl(Duration::from_secs(2))
        .fail_safe(Duration::from_secs(120))
        .max_concurrent_loads(LIMIT_N)
        .load_timeout(Duration::from_millis(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            mr.fetch_max(now, Ordering::SeqCst);
            let n = sq.fetch_add(1, Ordering::SeqCst);
            struct Dec<'a>(&'a AtomicUsize);
            impl Drop for Dec<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _d = Dec(&r);
            match n % 7 {
                0 => panic!("injected loader panic"),
                1 | 2 => Err(BoxError::from("injected failure")),
                3 => {
                    std::thread::sleep(Duration::from_millis(2));
                    Ok(*k + 1)
                }
                _ => Ok(*k + 1),
            }
        })
        .spawner(move |job| match ss.fetch_add(1, Ordering::SeqCst) % 5 {
            0 => job(),
            1 => drop(job),
            2 => panic!("injected spawner panic"),
            3 => q.lock().unwrap().push(job),
            _ => {
                std::thread::spawn(job);
            }
        })
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        // A worker for queued jobs.
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let job = queue.lock().unwrap().pop();
                match job {
                    Some(j) => {
                        let _ = catch_unwind(AssertUnwindSafe(j));
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        let mut users = Vec::new();
        for t in 0..4u64 {
            let cache = cache.clone();
            let clock = clock.clone();
            let clock_done = &stop;
            users.push(s.spawn(move || {
                let mut rng = common::Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                for _ in 0..5000 {
                    if clock_done.load(Ordering::SeqCst) {
                        break;
                    }
                    if rng.next() % 8 == 0 {
                        clock.advance(Duration::from_millis(700));
                    }
                    let k = rng.next() % 12;
                    let _ = catch_unwind(AssertUnwindSafe(|| match rng.next() % 40 {
                        0..=11 => {
                            let _ = cache.load(k);
                        }
                        12..=14 => {
                            let _ = cache.load_with_timeout(k, Some(Duration::ZERO));
                        }
                        15..=24 | 34..=39 => {
                            cache.get(&k);
                        }
                        25..=26 => {
                            let _ = cache.get_with_if(k, || k + 1, |_| true);
                        }
                        27 => {
                            cache.get_with(k, || k + 1);
                        }
                        28 => {
                            let _ = cache.try_get_with(k, || Err::<u64, _>("injected"));
                        }
                        29 => cache.invalidate(&k),
                        30 => cache.insert(k, k + 1),
                        31..=32 => {
                            cache.get_all([k, (k + 1) % 12], |ks| {
                                ks.iter().map(|&x| (x, x + 1)).collect()
                            });
                        }
                        _ => {
                            cache.entry(k).and_compute_with(|e| match e {
                                Some(_) => Op::Nop,
                                None => Op::Put(k + 1),
                            });
                        }
                    }));
                }
            }));
        }
        for u in users {
            u.join().unwrap();
        }
        // Let the queued and spawned jobs finish.
        assert!(
            common::eventually(|| {
                queue.lock().unwrap().is_empty() && cache.loads_in_flight() == 0
            }),
            "settled: in flight {}",
            cache.loads_in_flight()
        );
        stop.store(true, Ordering::SeqCst);
    });
    assert!(
        max_running.load(Ordering::SeqCst) <= LIMIT_N,
        "the load limit held"
    );
    cache.validate();
    let s = cache.stats();
    assert!(s.refreshes_started >= s.refreshes_succeeded);
    // Every key loads again (past every backoff and negative entry).
    clock.advance(Duration::from_secs(300));
    for k in 0..12 {
        usable(&cache, k);
    }
    // And the permits all came back.
    all_permits_back(&cache, LIMIT_N);
}

/// `stale_served_after_ttl`: "Calls answered with a value past its time to live because its
/// load failed (fail-safe; callers that waited on one failed load count once)". A queued
/// refresh that fails after its entry expired, with no caller waiting on it, answered no call:
/// yet it counts one, and `health()` reports fail-safe serving stale values.
#[test]
fn finding_failed_refresh_with_no_caller_counts_a_stale_answer() {
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let down = Arc::new(AtomicBool::new(false));
    let (j, d) = (Arc::clone(&jobs), Arc::clone(&down));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(600))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(*k + 1)
            }
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&1), Some(2), "due: refresh queued");
    clock.advance(Duration::from_secs(50)); // expired while the refresh waits in the queue
    down.store(true, Ordering::SeqCst);
    assert_eq!(
        run_jobs(&jobs),
        1,
        "the refresh runs and fails; nobody waits on it"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let s = cache.stats();
    let h = cache.health();
    assert_eq!(
        s.stale_served_after_ttl, 0,
        "no call was answered with the stale value (health: {h:?})"
    );
}

/// `LoadError::Panicked`: "Every caller that waited on that load gets this error (none of
/// them runs the loader again); callers of the key in the next `refresh_backoff` get it too
/// (on a cache that keeps time)". A write ends it; after the backoff the loader runs again.
#[test]
fn probe_panicking_loader_is_remembered_for_the_backoff() {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_backoff(Duration::from_secs(5))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if c.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                panic!("injected loader panic");
            }
            Ok::<_, BoxError>(*k + 1)
        })
        .build();
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    assert!(
        matches!(cache.load(1), Err(LoadError::Panicked)),
        "remembered"
    );
    assert!(matches!(
        futures::executor::block_on(cache.load_async(1)),
        Err(LoadError::NoLoader)
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_secs(6));
    assert_eq!(cache.load(1).unwrap(), 2, "after the backoff: loaded again");
    // A write ends the remembered panic at once.
    assert!(matches!(cache.load(2), Err(LoadError::Panicked)));
    cache.insert(2, 20);
    assert_eq!(cache.load(2).unwrap(), 20);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    // The permit came back after each panic.
    let c2 = cache.clone();
    assert_eq!(cache.get_with(3, move || c2.get(&2).unwrap()), 20);
    usable(&cache, 1);
}

/// `load_with_timeout`: "The timeout bounds the wait for a load run by another caller, or by
/// the spawner, and a leader's wait for a load permit". With a spawner that runs its job at
/// once on the caller's thread (as the refresh probes above show is supported), the job waits
/// for a permit with no deadline — on the caller's thread, so the caller's 50 ms timeout
/// does not bound its wait.
#[test]
fn finding_inline_spawner_makes_the_soft_timeout_unbounded_under_the_limit() {
    let _w = watchdog(LIMIT, "inline spawner timeout");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(move |k: &u64| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(*k + 1)
        })
        .spawner(|job| job())
        .build();
    let blocker = Blocker::hold(&cache, 99);
    let c2 = cache.clone();
    let r = within(Duration::from_secs(3), move || {
        c2.load_with_timeout(1, Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())
    });
    blocker.release();
    assert!(common::eventually(|| cache.loads_in_flight() == 0));
    cache.validate();
    let r = r.expect(
        "load_with_timeout(50 ms) still blocked after 3 s: its wait for a permit is unbounded",
    );
    assert_eq!(
        r.expect("no panic"),
        Err("timed out waiting for the load".to_string())
    );
}

/// `negative_ttl`: "Remembers a failed load ... for `ttl`: during that time callers of that
/// key get the same error (or `None`) without calling the backend". A refresh is a load
/// ("Loads (including refreshes)"), and here callers of the expired key waited on it and got
/// its error — yet the next caller calls the backend again at once.
#[test]
fn finding_failed_refresh_of_an_expired_key_is_not_negatively_cached() {
    let _w = watchdog(LIMIT, "negative refresh");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (j, c, d) = (Arc::clone(&jobs), Arc::clone(&calls), Arc::clone(&down));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .negative_ttl(Duration::from_secs(30))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            c.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(*k + 1)
            }
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&1), Some(2), "due: refresh queued");
    clock.advance(Duration::from_secs(50)); // expired while the refresh waits
    down.store(true, Ordering::SeqCst);
    let c2 = cache.clone();
    let waiter = common::start(move || c2.load(1).map_err(|e| e.to_string()));
    assert!(
        common::eventually(|| cache.stats().coalesced >= 1),
        "the caller joined the refresh"
    );
    assert_eq!(run_jobs(&jobs), 1);
    let r = waiter
        .wait(Duration::from_secs(10))
        .expect("released")
        .expect("no panic");
    assert_eq!(r, Err("loader failed: backend down".to_string()));
    let before = calls.load(Ordering::SeqCst);
    assert!(cache.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "within negative_ttl of a failed load the backend is not called again"
    );
}

/// `refresh_backoff(d)`: "After a failed refresh ..., wait this long before the next attempt
/// (default: the `refresh_after` period, else one second)". A backoff of zero, set
/// explicitly, is not replaced by the default: the next read retries.
#[test]
fn probe_refresh_backoff_zero_retries_on_the_next_read() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(600))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::ZERO)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if c.fetch_add(1, Ordering::SeqCst) >= 1 {
                return Err(BoxError::from("backend down"));
            }
            Ok(*k + 1)
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&1), Some(2)); // refreshes inline, fails
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.get(&1), Some(2));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "1 s after a failed refresh, with a zero backoff, the next read retries"
    );
}

/// Every permit came back: `limit` loads on as many threads all run at once (each waits in
/// its loader until all are inside).
fn all_permits_back(cache: &Cache<u64, u64>, limit: usize) {
    let barrier = Arc::new(std::sync::Barrier::new(limit));
    let handles: Vec<_> = (0..limit as u64)
        .map(|i| {
            let (c, b) = (cache.clone(), Arc::clone(&barrier));
            common::start(move || {
                c.get_with(7_000_000 + i, || {
                    b.wait();
                    i
                })
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let v = h
            .wait(Duration::from_secs(10))
            .expect("a permit is missing")
            .expect("no panic");
        assert_eq!(v, i as u64);
    }
}

/// A minimal `block_on` that may nest (parks the thread between polls).
fn park_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Nested loads under a limit of one from many threads, through every loading verb (keys only
/// load higher keys: no cycle), with invalidations forcing reloads: nothing deadlocks, the
/// permits all come back. (With a limit of 2 this fails now and then: see
/// `finding_taken_over_shared_async_load_publishes_nothing_when_its_permit_arrives`, which it
/// found.)
#[test]
fn probe_nested_loads_every_verb_under_tight_limits() {
    quiet_injected_panics();
    let limit = 1usize;
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(1000)
        .max_concurrent_loads(limit)
        .record_stats()
        .loader(|k: &u64| Ok::<_, BoxError>(*k + 1))
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k + 1) }
        })
        .build();
    const TOP: u64 = 10;
    fn fetch(cache: &Cache<u64, u64>, k: u64, r: &mut common::Rng, depth: u32) -> u64 {
        if k >= TOP || depth > 3 {
            return k + 1;
        }
        let next = k + 1 + r.next() % 3;
        let mut r2 = common::Rng(r.next() | 1);
        let c = cache.clone();
        let mut inner = move || {
            std::thread::yield_now();
            fetch(&c, next, &mut r2, depth + 1);
            k + 1
        };
        match r.next() % 8 {
            0 => cache.get_with(k, inner),
            1 => cache.try_get_with(k, || Ok::<_, ()>(inner())).unwrap(),
            2 => cache.optionally_get_with(k, || Some(inner())).unwrap(),
            3 => cache.load(k).unwrap(),
            4 => cache.get_with_if(k, inner, |_| r.next() % 2 == 0),
            5 => cache.entry(k).or_insert_with(inner).into_value(),
            6 => park_on(cache.load_async(k)).unwrap(),
            _ => park_on(cache.get_with_async(k, async move { inner() })),
        }
    }
    let c = cache.clone();
    let done = within(Duration::from_secs(60), move || {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let c = c.clone();
                s.spawn(move || {
                    let mut r = common::Rng(0xDEAD_BEEF ^ (t * 7919 + 1));
                    for _ in 0..2000 {
                        let k = r.next() % TOP;
                        if r.next() % 3 == 0 {
                            c.invalidate(&(r.next() % TOP));
                        }
                        assert_eq!(fetch(&c, k, &mut r, 0), k + 1);
                    }
                });
            }
        });
    });
    done.expect("no deadlock").expect("no panic");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let (high, _) = cache.load_limit_stats();
    assert!(high <= limit, "{high} permits at once, limit {limit}");
    all_permits_back(&cache, limit);
}

/// Found by `probe_nested_loads_every_verb_under_tight_limits`: a shared async load
/// (`load_async`) whose future waits for a permit is taken over by a nested blocking load
/// (documented: "takes over a load of its key whose leader still waits for a permit"). When a
/// permit then reaches the async future before the taker's loader finished, the future ends
/// as "nothing" and that is published for the flight: the async caller panics
/// (`lost_load`: "the load this call started panicked while another caller was driving it"
/// — no loader panicked), and the taker panics too ("a leader accepts its own"), although
/// every loader returned a value.
#[test]
fn finding_taken_over_shared_async_load_publishes_nothing_when_its_permit_arrives() {
    use std::future::Future;
    let _w = watchdog(LIMIT, "taken over shared load");
    let flags: Arc<[AtomicBool; 6]> = Arc::new(Default::default());
    const Q_IN: usize = 0;
    const Q_GO: usize = 1;
    const P_IN: usize = 2;
    const P_GO: usize = 3;
    const IN20: usize = 4;
    const FIN20: usize = 5;
    let wait = |f: &AtomicBool| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !f.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let fl = Arc::clone(&flags);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(2)
        .record_stats()
        .loader(move |k: &u64| {
            if *k == 20 {
                fl[IN20].store(true, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while !fl[FIN20].load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Ok::<_, BoxError>(2000);
            }
            Ok(*k)
        })
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k * 10) }
        })
        .build();
    // Q holds one permit.
    let (c, f) = (cache.clone(), Arc::clone(&flags));
    let q = std::thread::spawn(move || {
        c.get_with(30, || {
            f[Q_IN].store(true, Ordering::SeqCst);
            wait(&f[Q_GO]);
            30
        })
    });
    wait(&flags[Q_IN]);
    // P holds the other, and its loader will load 20 (nested).
    let (c, f) = (cache.clone(), Arc::clone(&flags));
    let p = std::thread::spawn(move || {
        let c2 = c.clone();
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(10, move || {
                f[P_IN].store(true, Ordering::SeqCst);
                wait(&f[P_GO]);
                c2.load(20).unwrap()
            })
        }))
        .map_err(|e| common::panic_message(&*e))
    });
    wait(&flags[P_IN]);
    // The async caller leads 20 with a shared load that waits for a permit.
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut a = Box::pin(cache.load_async(20));
    assert!(a.as_mut().poll(&mut cx).is_pending(), "waits for a permit");
    // A blocking caller joins that load.
    let c = cache.clone();
    let w = std::thread::spawn(move || c.optionally_get_with(20, || Some(7)));
    assert!(
        common::eventually(|| cache.stats().coalesced >= 1),
        "joined"
    );
    // P's nested load of 20 takes the waiting load over and runs its loader.
    flags[P_GO].store(true, Ordering::SeqCst);
    wait(&flags[IN20]);
    assert!(
        flags[IN20].load(Ordering::SeqCst),
        "the nested load took the load over"
    );
    // Q ends: its permit goes to the async load's future, which finds itself taken over.
    flags[Q_GO].store(true, Ordering::SeqCst);
    assert_eq!(q.join().unwrap(), 30);
    let polled = catch_unwind(AssertUnwindSafe(|| a.as_mut().poll(&mut cx)))
        .map_err(|e| common::panic_message(&*e));
    flags[FIN20].store(true, Ordering::SeqCst);
    let a_result = match polled {
        Ok(std::task::Poll::Ready(r)) => Ok(Some(r.map_err(|e| e.to_string()))),
        Ok(std::task::Poll::Pending) => {
            // Still waiting for the taker: finish it.
            let r = catch_unwind(AssertUnwindSafe(|| park_on(a.as_mut())))
                .map_err(|e| common::panic_message(&*e));
            r.map(|r| Some(r.map_err(|e| e.to_string())))
        }
        Err(panic) => Err(panic),
    };
    let p_result = p.join().unwrap();
    let w_result = w.join().unwrap();
    assert_eq!(
        w_result,
        Some(2000),
        "a caller of `optionally_get_with` that waited on the load gets its value (no loader \
         returned None)"
    );
    assert_eq!(
        p_result,
        Ok(2000),
        "the taker's nested load of 20 returns its value (which P's init returns for 10)"
    );
    assert_eq!(
        a_result,
        Ok(Some(Ok(2000))),
        "the async caller gets the taker's value"
    );
    assert_eq!(cache.get(&20), Some(2000));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// A shared async load waiting for a permit is taken over by a nested blocking load (which
/// runs its own loader and, as documented, publishes). Then the async caller that started it
/// is dropped — the last async caller: its drop cancels the flight although the taker is
/// still loading. A blocking caller waiting on that load is released and loads the key a
/// second time with its own loader (once the permit is free), and the taker's value is not
/// stored. Docs: "Exactly one caller (the leader) runs its `init`; the others wait and receive a
/// clone of its value"; "a nested load ... takes over a load of its key whose leader still
/// waits for a permit".
#[test]
fn finding_dropping_the_async_caller_cancels_a_load_taken_over_by_another() {
    use std::future::Future;
    let _w = watchdog(LIMIT, "taken over then dropped");
    let in20 = Arc::new(AtomicBool::new(false));
    let fin20 = Arc::new(AtomicBool::new(false));
    let p_in = Arc::new(AtomicBool::new(false));
    let p_go = Arc::new(AtomicBool::new(false));
    let wait = |f: &AtomicBool| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !f.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let (i20, f20) = (Arc::clone(&in20), Arc::clone(&fin20));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(move |k: &u64| {
            if *k == 20 {
                i20.store(true, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while !f20.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Ok::<_, BoxError>(2000);
            }
            Ok(*k)
        })
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k * 10) }
        })
        .build();
    // P holds the only permit; its loader will load 20 (nested).
    let (c, pi, pg) = (cache.clone(), Arc::clone(&p_in), Arc::clone(&p_go));
    let p = std::thread::spawn(move || {
        let c2 = c.clone();
        c.get_with(10, move || {
            pi.store(true, Ordering::SeqCst);
            wait(&pg);
            c2.load(20).unwrap()
        })
    });
    wait(&p_in);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut a = Box::pin(cache.load_async(20));
    assert!(
        a.as_mut().poll(&mut cx).is_pending(),
        "waits for the permit"
    );
    // A blocking caller waits on that load.
    let w_loaded = Arc::new(AtomicBool::new(false));
    let (c, wl) = (cache.clone(), Arc::clone(&w_loaded));
    let w = std::thread::spawn(move || {
        c.get_with(20, || {
            wl.store(true, Ordering::SeqCst);
            7
        })
    });
    assert!(
        common::eventually(|| cache.stats().coalesced >= 1),
        "joined"
    );
    // P's nested load takes the load over and runs its loader.
    p_go.store(true, Ordering::SeqCst);
    wait(&in20);
    assert!(in20.load(Ordering::SeqCst));
    drop(a); // the async caller goes away while the taker loads
    std::thread::sleep(Duration::from_millis(50));
    let second_load_meanwhile = w_loaded.load(Ordering::SeqCst);
    fin20.store(true, Ordering::SeqCst);
    assert_eq!(p.join().unwrap(), 2000);
    let wv = w.join().unwrap();
    assert!(common::eventually(|| cache.loads_in_flight() == 0));
    cache.validate();
    assert!(
        !second_load_meanwhile && !w_loaded.load(Ordering::SeqCst),
        "the waiting caller was released and loaded the key again with its own loader \
         (while the taker still loaded: {second_load_meanwhile}); it got {wv}, the taker's \
         value was not stored ({:?})",
        cache.get(&20)
    );
    assert_eq!(wv, 2000, "the waiter gets the taker's value");
    assert_eq!(cache.get(&20), Some(2000), "the taker's value is stored");
}

/// The same with a borrowed async leader (`get_with_async`) waiting for its permit: taken over
/// by a nested blocking load, then dropped — its guard abandons the flight although the taker
/// is still loading. A blocking caller waiting on that load is released and loads the key a
/// second time with its own loader (once the permit is free), and the taker's value is not
/// stored. Docs: "Exactly one caller (the leader) runs its `init`; the others wait and receive a
/// clone of its value"; "a nested load ... takes over a load of its key whose leader still
/// waits for a permit".
#[test]
fn finding_dropping_a_borrowed_async_leader_cancels_a_load_taken_over_by_another() {
    use std::future::Future;
    let _w = watchdog(LIMIT, "borrowed taken over then dropped");
    let in20 = Arc::new(AtomicBool::new(false));
    let fin20 = Arc::new(AtomicBool::new(false));
    let p_in = Arc::new(AtomicBool::new(false));
    let p_go = Arc::new(AtomicBool::new(false));
    let wait = |f: &AtomicBool| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !f.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let (i20, f20) = (Arc::clone(&in20), Arc::clone(&fin20));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .loader(move |k: &u64| {
            if *k == 20 {
                i20.store(true, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while !f20.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Ok::<_, BoxError>(2000);
            }
            Ok(*k)
        })
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k * 10) }
        })
        .build();
    // P holds the only permit; its loader will load 20 (nested).
    let (c, pi, pg) = (cache.clone(), Arc::clone(&p_in), Arc::clone(&p_go));
    let p = std::thread::spawn(move || {
        let c2 = c.clone();
        c.get_with(10, move || {
            pi.store(true, Ordering::SeqCst);
            wait(&pg);
            c2.load(20).unwrap()
        })
    });
    wait(&p_in);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut a = Box::pin(cache.get_with_async(20, async { 55 }));
    assert!(
        a.as_mut().poll(&mut cx).is_pending(),
        "waits for the permit"
    );
    // A blocking caller waits on that load.
    let w_loaded = Arc::new(AtomicBool::new(false));
    let (c, wl) = (cache.clone(), Arc::clone(&w_loaded));
    let w = std::thread::spawn(move || {
        c.get_with(20, || {
            wl.store(true, Ordering::SeqCst);
            7
        })
    });
    assert!(
        common::eventually(|| cache.stats().coalesced >= 1),
        "joined"
    );
    // P's nested load takes the load over and runs its loader.
    p_go.store(true, Ordering::SeqCst);
    wait(&in20);
    assert!(in20.load(Ordering::SeqCst));
    drop(a); // the async caller goes away while the taker loads
    std::thread::sleep(Duration::from_millis(50));
    let second_load_meanwhile = w_loaded.load(Ordering::SeqCst);
    fin20.store(true, Ordering::SeqCst);
    assert_eq!(p.join().unwrap(), 2000);
    let wv = w.join().unwrap();
    assert!(common::eventually(|| cache.loads_in_flight() == 0));
    cache.validate();
    assert!(
        !second_load_meanwhile && !w_loaded.load(Ordering::SeqCst),
        "the waiting caller was released and loaded the key again with its own loader \
         (while the taker still loaded: {second_load_meanwhile}); it got {wv}, the taker's \
         value was not stored ({:?})",
        cache.get(&20)
    );
    assert_eq!(wv, 2000, "the waiter gets the taker's value");
    assert_eq!(cache.get(&20), Some(2000), "the taker's value is stored");
}

/// The same with a refresh job the spawner drops after a nested load took its refresh over
/// (the documented recovery for a dropped job — "dropping it unrun releases the key" — must
/// not release a key that the taker is loading).
#[test]
fn finding_dropped_refresh_job_cancels_a_refresh_taken_over_by_another() {
    let _w = watchdog(LIMIT, "dropped job after takeover");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let slow = Arc::new(AtomicBool::new(false));
    let in20 = Arc::new(AtomicBool::new(false));
    let fin20 = Arc::new(AtomicBool::new(false));
    let (j, s2, i20, f20) = (
        Arc::clone(&jobs),
        Arc::clone(&slow),
        Arc::clone(&in20),
        Arc::clone(&fin20),
    );
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if *k == 20 && s2.load(Ordering::SeqCst) {
                i20.store(true, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while !f20.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Ok::<_, BoxError>(2000);
            }
            Ok(*k)
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    assert_eq!(cache.load(20).unwrap(), 20);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&20), Some(20), "refresh queued");
    clock.advance(Duration::from_secs(50)); // expired; the refresh is still queued
    slow.store(true, Ordering::SeqCst);
    let w_loaded = Arc::new(AtomicBool::new(false));
    let (c, wl) = (cache.clone(), Arc::clone(&w_loaded));
    let w = std::thread::spawn(move || {
        c.get_with(20, || {
            wl.store(true, Ordering::SeqCst);
            7
        })
    });
    assert!(
        common::eventually(|| cache.stats().coalesced >= 1),
        "W waits on the refresh"
    );
    let c = cache.clone();
    let p = std::thread::spawn(move || {
        let c2 = c.clone();
        c.get_with(10, move || c2.load(20).unwrap())
    });
    assert!(
        common::eventually(|| in20.load(Ordering::SeqCst)),
        "the nested load took over"
    );
    jobs.lock().unwrap().clear(); // the spawner drops the queued job
    fin20.store(true, Ordering::SeqCst);
    assert_eq!(p.join().unwrap(), 2000);
    let wv = w.join().unwrap();
    assert!(common::eventually(|| cache.loads_in_flight() == 0));
    cache.validate();
    assert!(
        !w_loaded.load(Ordering::SeqCst),
        "the waiter was released and loaded the key itself (got {wv}; cached {:?})",
        cache.get(&20)
    );
    assert_eq!(wv, 2000);
    assert_eq!(cache.get(&20), Some(2000));
}

/// A shared async load (`load_async`) waiting for a permit is taken over by a nested
/// `get_with` whose `init` panics. `get_with`: "If `init` panics, the panic propagates to the
/// leader's caller; the waiters are released at once and one of them becomes the new leader
/// and runs *its own* `init`". The async caller (whose own load never ran) must load again
/// with the builder's async loader — not panic with "the load this call started panicked".
#[test]
fn finding_async_caller_panics_when_the_taker_of_its_load_panics() {
    use std::future::Future;
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "taker panics");
    let p_in = Arc::new(AtomicBool::new(false));
    let p_go = Arc::new(AtomicBool::new(false));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k * 10) }
        })
        .build();
    let (c, pi, pg) = (cache.clone(), Arc::clone(&p_in), Arc::clone(&p_go));
    let p = std::thread::spawn(move || {
        let c2 = c.clone();
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(10, move || {
                pi.store(true, Ordering::SeqCst);
                while !pg.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                c2.get_with(20, || panic!("injected taker panic"))
            })
        }))
        .is_err()
    });
    assert!(common::eventually(|| p_in.load(Ordering::SeqCst)));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut a = Box::pin(cache.load_async(20));
    assert!(
        a.as_mut().poll(&mut cx).is_pending(),
        "waits for the permit"
    );
    p_go.store(true, Ordering::SeqCst);
    assert!(
        p.join().unwrap(),
        "the taker's panic reached its own caller"
    );
    let r = catch_unwind(AssertUnwindSafe(|| park_on(a.as_mut())))
        .map(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| common::panic_message(&*e));
    assert_eq!(r, Ok(Ok(200)), "the async caller loads 20 itself");
    assert_eq!(cache.get(&20), Some(200));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// The same when the taker is an `optionally_get_with` whose loader finds nothing (`None` "is
/// returned to the leader and the callers that waited on that load"; a `load_async` caller
/// cannot take a `None`, and must load again): the async caller panics with "the load this
/// call started panicked", though nothing panicked.
#[test]
fn finding_async_caller_panics_when_the_taker_of_its_load_finds_nothing() {
    use std::future::Future;
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "taker finds nothing");
    let p_in = Arc::new(AtomicBool::new(false));
    let p_go = Arc::new(AtomicBool::new(false));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, BoxError>(k * 10) }
        })
        .build();
    let (c, pi, pg) = (cache.clone(), Arc::clone(&p_in), Arc::clone(&p_go));
    let p = std::thread::spawn(move || {
        let c2 = c.clone();
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(10, move || {
                pi.store(true, Ordering::SeqCst);
                while !pg.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                c2.optionally_get_with(20, || None).unwrap_or(0)
            })
        }))
    });
    assert!(common::eventually(|| p_in.load(Ordering::SeqCst)));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut a = Box::pin(cache.load_async(20));
    assert!(
        a.as_mut().poll(&mut cx).is_pending(),
        "waits for the permit"
    );
    p_go.store(true, Ordering::SeqCst);
    assert_eq!(p.join().unwrap().ok(), Some(0), "the taker found nothing");
    let r = catch_unwind(AssertUnwindSafe(|| park_on(a.as_mut())))
        .map(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| common::panic_message(&*e));
    assert_eq!(r, Ok(Ok(200)), "the async caller loads 20 itself");
    assert_eq!(cache.get(&20), Some(200));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}
