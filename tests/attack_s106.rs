//! Round 106: an outside attack (a helper, public API only) on refresh-ahead and fail-safe
//! under races and cancellation, with the manual clock (no sleeping for expiry): spawners that
//! drop, park or panic, loaders that fail, panic, block or re-enter, writes at each step of a
//! refresh or a fail-safe retry, many threads on a key whose backend is down (one call per
//! backoff), and a random-operation model checked against the values each moment allows. 20
//! tests, none failing when written: kept as regression tests.
#![allow(clippy::type_complexity)]

mod common;

use common::{watchdog, within, Gate};
use herdcache::{BoxError, BoxFuture, Cache, LoadError, ManualClock};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const S: fn(u64) -> Duration = Duration::from_secs;

type Job = Box<dyn FnOnce() + Send>;
type Jobs = Arc<Mutex<Vec<Job>>>;

/// Plain reads (`get`, `get_or_stale`) that did not return a live value: "A plain `get` that
/// misses counts its miss only" (stats.rs), so they are taken off the ledger's left side.
static PLAIN: std::sync::LazyLock<Mutex<HashMap<String, u64>>> =
    std::sync::LazyLock::new(Default::default);

fn tname() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Counts a plain-read miss against the current test (by thread name; only called on test
/// threads).
fn pm(n: u64) {
    *PLAIN.lock().unwrap().entry(tname()).or_default() += n;
}

fn gg<V: Clone + Send + Sync + 'static>(c: &Cache<u32, V>, k: u32) -> Option<V> {
    let r = c.get(&k);
    if r.is_none() {
        pm(1);
    }
    r
}

fn gs<V: Clone + Send + Sync + 'static>(c: &Cache<u32, V>, k: u32) -> Option<V> {
    let live = c.contains_key(&k);
    let r = c.get_or_stale(&k);
    if !live {
        pm(1);
    }
    r
}

fn ledger<K, V>(c: &Cache<K, V>, what: &str)
where
    K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
    V: Send + Sync + Clone + 'static,
{
    c.validate();
    assert_eq!(c.loads_in_flight(), 0, "{what}: loads_in_flight when quiet");
    let s = c.stats();
    let plain = PLAIN.lock().unwrap().remove(&tname()).unwrap_or(0);
    assert_eq!(
        s.misses - plain + s.refreshes_started,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "{what}: ledger {s:?}"
    );
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{what}: refresh ledger {s:?}"
    );
}

struct Backend {
    down: AtomicBool,
    calls: AtomicUsize,
    next: AtomicU64,
}

impl Backend {
    fn new() -> Arc<Self> {
        Arc::new(Backend {
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            next: AtomicU64::new(100),
        })
    }
    fn call(&self) -> Result<u64, BoxError> {
        self.calls.fetch_add(1, SeqCst);
        if self.down.load(SeqCst) {
            Err("down".into())
        } else {
            Ok(self.next.fetch_add(1, SeqCst))
        }
    }
}

fn parking() -> (Jobs, Arc<AtomicUsize>, impl Fn(Job) + Send + Sync + 'static) {
    let jobs: Jobs = Arc::default();
    let n = Arc::new(AtomicUsize::new(0));
    let (j, nn) = (jobs.clone(), n.clone());
    (jobs, n, move |job: Job| {
        nn.fetch_add(1, SeqCst);
        j.lock().unwrap().push(job);
    })
}

fn take_jobs(jobs: &Jobs) -> Vec<Job> {
    std::mem::take(&mut *jobs.lock().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Fail-safe
// ---------------------------------------------------------------------------------------------

/// builder.rs fail_safe: "the key is retried after refresh_backoff by one caller (the others get
/// the last value meanwhile, with no load). Never beyond max_stale."
#[test]
fn fs_many_threads_one_backend_call_per_backoff() {
    let _w = watchdog(S(20), "fs_many_threads_one_backend_call_per_backoff");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .fail_safe(S(100))
        .refresh_backoff(S(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .build();
    let v0 = cache.load(1).unwrap();
    b.down.store(true, SeqCst);
    clock.advance(S(11));
    let mut expected_calls = 1;
    for window in 0..5 {
        std::thread::scope(|sc| {
            for _ in 0..6 {
                sc.spawn(|| {
                    for _ in 0..40 {
                        assert_eq!(cache.load(1).unwrap(), v0, "window {window}: stale value");
                    }
                });
            }
        });
        expected_calls += 1;
        assert_eq!(
            b.calls.load(SeqCst),
            expected_calls,
            "window {window}: backend calls after one backoff window"
        );
        clock.advance(S(5));
    }
    // 11 + 25 = 36 s: within max_stale (10 + 100). Jump past deadline + max_stale.
    clock.advance(S(110 - 36) + Duration::from_nanos(1));
    assert!(cache.load(1).is_err(), "never beyond max_stale");
    assert_eq!(gs(&cache, 1), None, "get_or_stale beyond max_stale");
    let s = cache.stats();
    assert!(s.stale_served_after_ttl > 0, "{s:?}");
    ledger(&cache, "fs_many_threads");
}

/// fail_safe.rs: "Until the retry deadline, callers of the key get the old value at once, with
/// no load ... meanwhile the others get the old value (they do not wait for a backend that just
/// failed)." A retry that hangs must not hold the other callers.
#[test]
fn fs_slow_retry_does_not_hold_others() {
    let _w = watchdog(S(20), "fs_slow_retry_does_not_hold_others");
    let clock = ManualClock::new();
    let gate = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (g, c) = (gate.clone(), calls.clone());
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .fail_safe(S(100))
        .refresh_backoff(S(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| {
            let n = c.fetch_add(1, SeqCst);
            if n == 0 {
                return Ok(7);
            }
            if n == 2 {
                g.pass(); // the retry hangs
            }
            Err::<u64, BoxError>("down".into())
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 7);
    clock.advance(S(11));
    assert_eq!(cache.load(1).unwrap(), 7, "first failure answers stale");
    clock.advance(S(5));
    let c2 = cache.clone();
    let retrier = std::thread::spawn(move || c2.load(1));
    assert!(common::eventually(|| gate.entered.load(SeqCst)));
    // The retry hangs: others get the old value at once.
    let c3 = cache.clone();
    let r = within(S(5), move || {
        (0..20).map(|_| c3.load(1)).collect::<Vec<_>>()
    });
    let r = r
        .expect("callers during a hanging retry did not return (hang)")
        .unwrap();
    for x in r {
        assert_eq!(x.unwrap(), 7, "stale during the retry");
    }
    // Advance past the backoff while the retry still hangs: still one retry at a time.
    clock.advance(S(6));
    let c4 = cache.clone();
    let r = within(S(5), move || c4.load(1)).expect("caller past backoff while retry hangs: hang");
    assert_eq!(r.unwrap().unwrap(), 7);
    assert_eq!(
        calls.load(SeqCst),
        3,
        "a second retry started while one hangs"
    );
    gate.open();
    assert_eq!(
        retrier.join().unwrap().unwrap(),
        7,
        "retrier gets the stale value"
    );
    ledger(&cache, "fs_slow_retry");
}

/// fail_safe.rs: "Writes win: an insert or invalidate replaces or removes the old entry, so a
/// load that fails afterwards has nothing to fall back on"; builder.rs: "A load that a write or
/// invalidation of the key won over ... falls back on nothing when it fails: its callers get the
/// failure".
#[test]
fn fs_invalidate_during_retry() {
    let _w = watchdog(S(20), "fs_invalidate_during_retry");
    for variant in 0..4 {
        let clock = ManualClock::new();
        let gate = Gate::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let (g, c) = (gate.clone(), calls.clone());
        let cache: Cache<u32, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(S(10))
            .fail_safe(S(100))
            .refresh_backoff(S(5))
            .clock(clock.clone())
            .record_stats()
            .support_invalidation_closures()
            .loader(move |_k: &u32| {
                let n = c.fetch_add(1, SeqCst);
                if n == 0 {
                    return Ok(7);
                }
                if n == 2 {
                    g.pass();
                }
                Err::<u64, BoxError>("down".into())
            })
            .build();
        assert_eq!(cache.load(1).unwrap(), 7);
        clock.advance(S(11));
        assert_eq!(cache.load(1).unwrap(), 7);
        clock.advance(S(5));
        let c2 = cache.clone();
        let retrier = std::thread::spawn(move || c2.load(1));
        assert!(common::eventually(|| gate.entered.load(SeqCst)));
        match variant {
            0 => cache.invalidate(&1),
            1 => cache.invalidate_all(),
            2 => {
                cache.invalidate_entries_if(|_, _| true).unwrap();
            }
            _ => cache.insert(1, 55),
        }
        // After the write, nobody may see 7 again.
        let c3 = cache.clone();
        let mid = within(S(5), move || (c3.get_or_stale(&1), c3.get(&1)))
            .expect("hang")
            .unwrap();
        let want = if variant == 3 { Some(55) } else { None };
        if variant != 3 {
            pm(2);
        }
        assert_eq!(
            mid,
            (want, want),
            "variant {variant}: read during retry after write"
        );
        gate.open();
        let r = retrier.join().unwrap();
        if variant == 3 {
            // The retry lost to the insert.
            assert!(
                r.as_ref().map_or(true, |v| *v != 7),
                "variant {variant}: retrier got 7: {r:?}"
            );
            assert_eq!(gg(&cache, 1), Some(55), "variant {variant}: insert wins");
        } else {
            assert!(
                r.is_err(),
                "variant {variant}: retrier fell back after invalidate: {r:?}"
            );
            assert_eq!(gs(&cache, 1), None, "variant {variant}");
        }
        let after = cache.load(1);
        if variant == 3 {
            assert_eq!(after.unwrap(), 55);
        } else {
            assert!(
                after.is_err(),
                "variant {variant}: load after invalidate: {after:?}"
            );
        }
        ledger(&cache, "fs_invalidate_during_retry");
    }
}

/// fail_safe with a panicking loader: "A load fails — the loader's error, a panic ... every
/// caller of that load gets the old value instead of the error (Ok)".
#[test]
fn fs_panicking_loader() {
    let _w = watchdog(S(20), "fs_panicking_loader");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .fail_safe(S(100))
        .refresh_backoff(S(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| {
            if c.fetch_add(1, SeqCst) == 0 {
                Ok::<u64, BoxError>(7)
            } else {
                panic!("loader boom")
            }
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 7);
    clock.advance(S(11));
    for _ in 0..10 {
        assert_eq!(cache.load(1).unwrap(), 7, "stale after panic");
    }
    assert_eq!(
        calls.load(SeqCst),
        2,
        "panicking loader called once per backoff"
    );
    clock.advance(S(5));
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..10 {
                    assert_eq!(cache.load(1).unwrap(), 7);
                }
            });
        }
    });
    assert_eq!(
        calls.load(SeqCst),
        3,
        "panicking loader called once in the second window"
    );
    ledger(&cache, "fs_panicking_loader");
}

// ---------------------------------------------------------------------------------------------
// Refresh-ahead
// ---------------------------------------------------------------------------------------------

/// builder.rs refresh_after: "On failure the old value is kept — never beyond its
/// time_to_live — and the next attempt waits refresh_backoff."
#[test]
fn refresh_failure_keeps_old_and_backs_off_inline() {
    let _w = watchdog(S(20), "refresh_failure_keeps_old");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .refresh_backoff(S(4))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .build();
    let v0 = cache.load(1).unwrap();
    b.down.store(true, SeqCst);
    clock.advance(S(6));
    for _ in 0..10 {
        assert_eq!(gg(&cache, 1), Some(v0));
    }
    assert_eq!(b.calls.load(SeqCst), 2, "one refresh per due period");
    clock.advance(S(3));
    assert_eq!(gg(&cache, 1), Some(v0));
    assert_eq!(b.calls.load(SeqCst), 2, "no refresh within backoff");
    clock.advance(S(1));
    assert_eq!(gg(&cache, 1), Some(v0));
    assert_eq!(b.calls.load(SeqCst), 3, "refresh after backoff");
    clock.advance(S(20)); // 30 s: hard TTL reached
    assert_eq!(gg(&cache, 1), None, "never beyond time_to_live");
    b.down.store(false, SeqCst);
    let v = cache.load(1).unwrap();
    assert_ne!(v, v0);
    ledger(&cache, "refresh_failure");
}

/// refresh_after + panicking loader, inline: the reader must not panic, the old value is kept.
#[test]
fn refresh_panicking_loader_inline() {
    let _w = watchdog(S(20), "refresh_panicking_loader_inline");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .refresh_backoff(S(4))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| {
            if c.fetch_add(1, SeqCst) == 0 {
                Ok::<u64, BoxError>(7)
            } else {
                panic!("refresh boom")
            }
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 7);
    clock.advance(S(6));
    let c2 = cache.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gg(&c2, 1)));
    assert_eq!(
        r.ok().flatten(),
        Some(7),
        "get that triggered a panicking refresh"
    );
    assert_eq!(cache.load(1).unwrap(), 7);
    assert_eq!(calls.load(SeqCst), 2);
    ledger(&cache, "refresh_panicking_loader_inline");
}

/// spawner docs: "A spawner that panics, or drops a job without running it, never leaves a key
/// loading ... A refresh is then retried after the refresh backoff."
#[test]
fn refresh_dropped_or_panicking_spawner_retried_after_backoff() {
    let _w = watchdog(S(20), "refresh_dropped_spawner");
    for panics in [false, true] {
        let clock = ManualClock::new();
        let b = Backend::new();
        let bb = b.clone();
        let spawns = Arc::new(AtomicUsize::new(0));
        let sp = spawns.clone();
        let cache: Cache<u32, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(S(30))
            .refresh_after(S(5))
            .refresh_backoff(S(4))
            .clock(clock.clone())
            .record_stats()
            .loader(move |_k: &u32| bb.call())
            .spawner(move |job| {
                sp.fetch_add(1, SeqCst);
                if panics {
                    panic!("spawner boom");
                }
                drop(job);
            })
            .build();
        let v0 = cache.load(1).unwrap();
        clock.advance(S(6));
        for _ in 0..5 {
            assert_eq!(gg(&cache, 1), Some(v0), "panics={panics}");
        }
        assert_eq!(
            spawns.load(SeqCst),
            1,
            "panics={panics}: one spawn per period"
        );
        assert_eq!(
            cache.loads_in_flight(),
            0,
            "panics={panics}: key left loading"
        );
        clock.advance(S(3));
        gg(&cache, 1);
        assert_eq!(
            spawns.load(SeqCst),
            1,
            "panics={panics}: retried within backoff"
        );
        clock.advance(S(1));
        gg(&cache, 1);
        assert_eq!(
            spawns.load(SeqCst),
            2,
            "panics={panics}: not retried after backoff"
        );
        // Loads still work (load falls back to running in its caller).
        clock.advance(S(25));
        assert_eq!(gg(&cache, 1), None);
        let v = cache.load(1).unwrap();
        assert_ne!(v, v0);
        assert_eq!(b.calls.load(SeqCst), 2, "panics={panics}: backend calls");
        ledger(&cache, "refresh_dropped_spawner");
    }
}

/// refresh.rs: "exactly one reader per period starts a refresh"; at most one refresh per key in
/// flight, even when the backoff passes while a spawned job is still parked.
#[test]
fn refresh_at_most_one_in_flight_while_parked() {
    let _w = watchdog(S(20), "refresh_at_most_one_in_flight");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let (jobs, spawns, spawner) = parking();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .refresh_backoff(S(2))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .spawner(spawner)
        .build();
    let v0 = cache.load(1).unwrap();
    clock.advance(S(6));
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..20 {
                    assert_eq!(gg(&cache, 1), Some(v0));
                }
            });
        }
    });
    assert_eq!(spawns.load(SeqCst), 1);
    for _ in 0..5 {
        clock.advance(S(3)); // past the backoff and refresh period again
        assert_eq!(gg(&cache, 1), Some(v0));
    }
    assert_eq!(
        spawns.load(SeqCst),
        1,
        "a second refresh started while one is parked"
    );
    // Run the parked job on another thread.
    let js = take_jobs(&jobs);
    std::thread::spawn(move || js.into_iter().for_each(|j| j()))
        .join()
        .unwrap();
    let v1 = gg(&cache, 1).expect("refreshed value");
    assert_ne!(v1, v0, "refresh value stored");
    ledger(&cache, "refresh_at_most_one_in_flight");
}

/// refresh_after with a parked job past TTL: spawner docs: "a caller of the key waits for a
/// parked job as for any load of it (... once the entry expires — a caller joining its
/// refresh)". The waiting caller must get the refreshed value once the job runs.
#[test]
fn refresh_parked_job_past_ttl_then_run_elsewhere() {
    let _w = watchdog(S(20), "refresh_parked_past_ttl");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let (jobs, _spawns, spawner) = parking();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .refresh_after(S(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .spawner(spawner)
        .build();
    let v0 = cache.load(1).unwrap();
    clock.advance(S(6));
    assert_eq!(gg(&cache, 1), Some(v0));
    clock.advance(S(5));
    assert_eq!(gg(&cache, 1), None, "expired while refresh parked");
    let c2 = cache.clone();
    let waiter = std::thread::spawn(move || c2.load(1));
    std::thread::sleep(Duration::from_millis(50));
    let js = take_jobs(&jobs);
    assert!(!js.is_empty());
    for j in js {
        j();
    }
    let r = within(S(5), move || waiter.join().unwrap())
        .expect("caller of expired key did not return after job ran (hang)")
        .unwrap();
    let v = r.unwrap();
    assert_ne!(v, v0, "expired value returned");
    // Jobs parked by the load (if any) are run too.
    for j in take_jobs(&jobs) {
        j();
    }
    ledger(&cache, "refresh_parked_past_ttl");
}

/// "a write during a refresh wins (the refresh's value is not stored)"; "A refresh a read decided
/// registers only if the entry is still the one claimed: a write or invalidation of the key in
/// between wins" (refresh.rs). Each write kind x each step (before the job runs, while the
/// loader runs, after the loader returned but before... we can only reach the first two).
#[test]
fn refresh_write_or_invalidate_wins_at_each_step() {
    let _w = watchdog(S(30), "refresh_write_wins");
    for step in 0..2 {
        for op in 0..4 {
            let clock = ManualClock::new();
            let gate = Gate::new();
            let calls = Arc::new(AtomicUsize::new(0));
            let (g, c) = (gate.clone(), calls.clone());
            let (jobs, _spawns, spawner) = parking();
            let cache: Cache<u32, u64> = Cache::builder()
                .max_capacity(100)
                .time_to_live(S(30))
                .refresh_after(S(5))
                .clock(clock.clone())
                .record_stats()
                .support_invalidation_closures()
                .loader(move |_k: &u32| {
                    let n = c.fetch_add(1, SeqCst);
                    if n >= 1 {
                        g.pass();
                    }
                    Ok::<u64, BoxError>(1000 + n as u64)
                })
                .spawner(spawner)
                .build();
            assert_eq!(cache.load(1).unwrap(), 1000);
            clock.advance(S(6));
            assert_eq!(gg(&cache, 1), Some(1000));
            let js = take_jobs(&jobs);
            assert_eq!(js.len(), 1);
            let write = |cache: &Cache<u32, u64>| match op {
                0 => cache.insert(1, 55),
                1 => cache.invalidate(&1),
                2 => cache.invalidate_all(),
                _ => {
                    cache.invalidate_entries_if(|_, v| *v == 1000).unwrap();
                }
            };
            let runner;
            if step == 0 {
                write(&cache);
                gate.open();
                runner = std::thread::spawn(move || js.into_iter().for_each(|j| j()));
            } else {
                runner = std::thread::spawn(move || js.into_iter().for_each(|j| j()));
                assert!(common::eventually(|| gate.entered.load(SeqCst)));
                write(&cache);
                gate.open();
            }
            runner.join().unwrap();
            let want = if op == 0 { Some(55) } else { None };
            assert_eq!(
                gg(&cache, 1),
                want,
                "step {step} op {op}: the refresh's value was stored"
            );
            ledger(&cache, "refresh_write_wins");
        }
    }
}

/// A loader that re-enters the cache during a refresh (inline): it writes / invalidates the same
/// key, and loads another key. The write made while the refresh ran must win.
#[test]
fn refresh_reentrant_loader() {
    let _w = watchdog(S(30), "refresh_reentrant_loader");
    for mode in 0..4 {
        let clock = ManualClock::new();
        let slot: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (sl, c) = (slot.clone(), calls.clone());
        let cache: Cache<u32, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(S(30))
            .refresh_after(S(5))
            .clock(clock.clone())
            .record_stats()
            .loader(move |k: &u32| {
                let n = c.fetch_add(1, SeqCst) as u64;
                if *k == 1 && n >= 1 {
                    let cache = sl.lock().unwrap().clone().unwrap();
                    match mode {
                        0 => cache.insert(1, 55),
                        1 => cache.invalidate(&1),
                        2 => {
                            let _ = cache.get_with(2, || 22);
                        }
                        _ => {
                            let _ = cache.load(2);
                        }
                    }
                }
                Ok::<u64, BoxError>(1000 + n)
            })
            .build();
        *slot.lock().unwrap() = Some(cache.clone());
        assert_eq!(cache.load(1).unwrap(), 1000);
        clock.advance(S(6));
        let c2 = cache.clone();
        let r = within(S(5), move || gg(&c2, 1)).expect("re-entrant refresh hung");
        assert_eq!(
            r.unwrap(),
            Some(1000),
            "mode {mode}: get that triggered the refresh"
        );
        let now = gg(&cache, 1);
        match mode {
            0 => assert_eq!(
                now,
                Some(55),
                "mode {mode}: insert during refresh lost to it"
            ),
            1 => assert_eq!(
                now, None,
                "mode {mode}: invalidate during refresh lost to it"
            ),
            _ => assert_eq!(now, Some(1001), "mode {mode}: refresh value"),
        }
        *slot.lock().unwrap() = None;
        ledger(&cache, "refresh_reentrant_loader");
    }
}

/// A loader that re-enters with a load of the same key during its own refresh (inline and
/// spawned): must not hang.
#[test]
fn refresh_loader_loads_same_key() {
    let _w = watchdog(S(30), "refresh_loader_loads_same_key");
    for spawned in [false, true] {
        let clock = ManualClock::new();
        let slot: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (sl, c) = (slot.clone(), calls.clone());
        let mut bld = Cache::builder()
            .max_capacity(100)
            .time_to_live(S(30))
            .refresh_after(S(5))
            .load_timeout(Duration::from_millis(500))
            .clock(clock.clone())
            .record_stats()
            .loader(move |_k: &u32| {
                let n = c.fetch_add(1, SeqCst) as u64;
                if n == 1 {
                    let cache = sl.lock().unwrap().clone().unwrap();
                    let _ = cache.load(1);
                }
                Ok::<u64, BoxError>(1000 + n)
            });
        if spawned {
            bld = bld.spawner(|job| {
                std::thread::spawn(job);
            });
        }
        let cache: Cache<u32, u64> = bld.build();
        *slot.lock().unwrap() = Some(cache.clone());
        assert_eq!(cache.load(1).unwrap(), 1000);
        clock.advance(S(6));
        let c2 = cache.clone();
        let r = within(S(5), move || gg(&c2, 1));
        assert!(r.is_some(), "spawned={spawned}: get hung");
        assert!(
            common::eventually(|| cache.loads_in_flight() == 0),
            "spawned={spawned}: load stuck in flight: {}",
            cache.describe_loads()
        );
        *slot.lock().unwrap() = None;
        ledger(&cache, "refresh_loader_loads_same_key");
    }
}

/// The cache is dropped while a spawned refresh job is parked; the job runs afterwards on
/// another thread. Must not panic or hang.
#[test]
fn refresh_job_runs_after_cache_dropped() {
    let _w = watchdog(S(20), "refresh_job_after_drop");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let (jobs, _spawns, spawner) = parking();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .clock(clock.clone())
        .loader(move |_k: &u32| bb.call())
        .spawner(spawner)
        .build();
    cache.load(1).unwrap();
    clock.advance(S(6));
    gg(&cache, 1);
    drop(cache);
    let js = take_jobs(&jobs);
    assert_eq!(js.len(), 1);
    let r = std::thread::spawn(move || js.into_iter().for_each(|j| j())).join();
    assert!(r.is_ok(), "job panicked after the cache was dropped");
    assert_eq!(b.calls.load(SeqCst), 2);
}

/// future_spawner that drops the future: "a dropped/never-run spawned refresh is retried after
/// the backoff"; and one that polls futures after the cache is dropped.
#[test]
fn refresh_future_spawner_drops_or_polls_late() {
    let _w = watchdog(S(20), "refresh_future_spawner");
    // Drops.
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let spawns = Arc::new(AtomicUsize::new(0));
    let (c, sp) = (calls.clone(), spawns.clone());
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .refresh_backoff(S(4))
        .clock(clock.clone())
        .record_stats()
        .async_loader(move |_k: &u32| {
            let n = c.fetch_add(1, SeqCst) as u64;
            async move { Ok::<u64, BoxError>(1000 + n) }
        })
        .future_spawner(move |f: BoxFuture<()>| {
            sp.fetch_add(1, SeqCst);
            drop(f);
        })
        .build();
    assert_eq!(
        futures::executor::block_on(cache.load_async(1)).unwrap(),
        1000
    );
    clock.advance(S(6));
    assert_eq!(gg(&cache, 1), Some(1000));
    assert_eq!(gg(&cache, 1), Some(1000));
    assert_eq!(spawns.load(SeqCst), 1);
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "dropped future left the key loading"
    );
    clock.advance(S(4));
    assert_eq!(gg(&cache, 1), Some(1000));
    assert_eq!(
        spawns.load(SeqCst),
        2,
        "dropped refresh future not retried after backoff"
    );
    ledger(&cache, "future_spawner drops");

    // Parks, polled after the cache is dropped.
    let clock = ManualClock::new();
    let parked: Arc<Mutex<Vec<BoxFuture<()>>>> = Arc::default();
    let p = parked.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .clock(clock.clone())
        .async_loader(move |_k: &u32| async move { Ok::<u64, BoxError>(5) })
        .future_spawner(move |f: BoxFuture<()>| p.lock().unwrap().push(f))
        .build();
    assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 5);
    clock.advance(S(6));
    gg(&cache, 1);
    drop(cache);
    let fs = std::mem::take(&mut *parked.lock().unwrap());
    assert_eq!(fs.len(), 1);
    let r = within(S(5), move || {
        for f in fs {
            futures::executor::block_on(f);
        }
    });
    assert!(
        matches!(r, Some(Ok(()))),
        "polling a refresh future after drop: {:?}",
        r.map(|x| x.is_ok())
    );
}

/// Refresh + fail-safe + many threads reading an expired key while the backend is down, with a
/// spawner that runs jobs on another thread later. One backend call per backoff window.
#[test]
fn refresh_and_fail_safe_outage_backend_calls() {
    let _w = watchdog(S(30), "refresh_and_fail_safe_outage");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .refresh_after(S(4))
        .refresh_backoff(S(3))
        .fail_safe(S(60))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .build();
    let v0 = cache.load(1).unwrap();
    b.down.store(true, SeqCst);
    clock.advance(S(11)); // expired; no refresh ever ran
    let mut prev = b.calls.load(SeqCst);
    for window in 0..6 {
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..25 {
                        let r = cache.load(1);
                        assert_eq!(r.unwrap(), v0, "window {window}");
                        let _ = cache.get_with(1, || 99);
                    }
                });
            }
        });
        assert!(common::eventually(|| cache.loads_in_flight() == 0));
        let now = b.calls.load(SeqCst);
        assert_eq!(
            now - prev,
            1,
            "window {window}: backend calls in one backoff window"
        );
        prev = now;
        clock.advance(S(3));
    }
    ledger(&cache, "refresh_and_fail_safe_outage");
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

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

#[derive(Clone, Copy, Debug)]
struct Produced {
    key: u32,
    at: u64, // secs
}

fn model_run(seed: u64, fail_safe: bool, refresh: bool, spawner: bool) -> (u64, u64) {
    const TTL: u64 = 10;
    const STALE: u64 = 20;
    const BACKOFF: u64 = 3;
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    let produced: Arc<Mutex<HashMap<u64, Produced>>> = Arc::default();
    let calls: Arc<Mutex<Vec<(u32, u64, bool)>>> = Arc::default();
    let now_s = Arc::new(AtomicU64::new(0));
    let (d, nx, pr, cl, ns) = (
        down.clone(),
        next.clone(),
        produced.clone(),
        calls.clone(),
        now_s.clone(),
    );
    let mut bld = Cache::builder()
        .max_capacity(1000)
        .time_to_live(S(TTL))
        .refresh_backoff(S(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .support_invalidation_closures()
        .loader(move |k: &u32| {
            let t = ns.load(SeqCst);
            let isdown = d.load(SeqCst);
            cl.lock().unwrap().push((*k, t, isdown));
            if isdown {
                return Err::<u64, BoxError>("down".into());
            }
            let v = nx.fetch_add(1, SeqCst);
            pr.lock().unwrap().insert(v, Produced { key: *k, at: t });
            Ok(v)
        });
    if fail_safe {
        bld = bld.fail_safe(S(STALE));
    }
    if refresh {
        bld = bld.refresh_after(S(4));
    }
    if spawner {
        // Runs the job at once, in the caller: deterministic.
        bld = bld.spawner(|job| job());
    }
    let cache: Cache<u32, u64> = bld.build();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // Per key: smallest value id still allowed (ids are monotonic; a write or invalidate
    // forbids every value produced before it).
    let mut floor: HashMap<u32, u64> = HashMap::new();
    // Per key: time of the last successful store we know of (insert or successful load/refresh)
    let mut stored_at: HashMap<u32, u64> = HashMap::new();
    let mut now = 0u64;
    // Per key: time of the last failed loader call made while the key was expired (fail-safe's
    // retry backoff starts there).
    let mut stale_fail: HashMap<u32, u64> = HashMap::new();
    for step in 0..400 {
        let k = rng.below(4) as u32;
        let op = rng.below(100);
        let fl = *floor.get(&k).unwrap_or(&0);
        let ctx = format!("seed {seed} fs={fail_safe} refresh={refresh} spawner={spawner} step {step} t={now} key {k}");
        let check_value = |v: u64, allow_stale: bool, what: &str| {
            let p = *produced
                .lock()
                .unwrap()
                .get(&v)
                .unwrap_or_else(|| panic!("{ctx}: {what}: unknown value {v}"));
            assert_eq!(p.key, k, "{ctx}: {what}: value of another key");
            assert!(
                v >= fl,
                "{ctx}: {what}: value {v} overwritten/invalidated (floor {fl})"
            );
            let age = now - p.at;
            let limit = if allow_stale && fail_safe {
                TTL + STALE
            } else {
                TTL
            };
            assert!(
                age < limit || (allow_stale && fail_safe && age <= limit),
                "{ctx}: {what}: value {v} too old: age {age} limit {limit}"
            );
            age
        };
        let calls_before = calls.lock().unwrap().len();
        match op {
            0..=9 => {
                now += rng.below(8);
                clock.advance(S(0)); // keep in sync below
                now_s.store(now, SeqCst);
                let e = clock.elapsed();
                let target = S(now);
                if target > e {
                    clock.advance(target - e);
                }
            }
            10..=14 => {
                down.store(!down.load(SeqCst), SeqCst);
            }
            15..=24 => {
                let v = next.fetch_add(1, SeqCst);
                produced
                    .lock()
                    .unwrap()
                    .insert(v, Produced { key: k, at: now });
                cache.insert(k, v);
                stale_fail.remove(&k);
                floor.insert(k, v);
                stored_at.insert(k, now);
            }
            25..=29 => {
                cache.invalidate(&k);
                stale_fail.remove(&k);
                floor.insert(k, next.load(SeqCst));
                stored_at.remove(&k);
            }
            30..=31 => {
                cache.invalidate_all();
                let f = next.load(SeqCst);
                for kk in 0..4 {
                    floor.insert(kk, f);
                    stale_fail.remove(&kk);
                    stored_at.remove(&kk);
                }
            }
            32..=34 => {
                cache.invalidate_entries_if(move |kk, _| *kk == k).unwrap();
                stale_fail.remove(&k);
                floor.insert(k, next.load(SeqCst));
                stored_at.remove(&k);
            }
            35..=59 => {
                let r = gg(&cache, k);
                if let Some(v) = r {
                    check_value(v, false, "get");
                } else if let Some(&t) = stored_at.get(&k) {
                    assert!(
                        now >= t + TTL,
                        "{ctx}: get None although a value was stored at {t}"
                    );
                }
            }
            60..=69 => {
                let r = gs(&cache, k);
                if let Some(v) = r {
                    check_value(v, true, "get_or_stale");
                } else if let Some(&t) = stored_at.get(&k) {
                    let lim = if fail_safe { TTL + STALE } else { TTL };
                    assert!(
                        now >= t + lim,
                        "{ctx}: get_or_stale None although stored at {t}"
                    );
                }
            }
            _ => {
                let expired = stored_at
                    .get(&k)
                    .is_some_and(|t| now >= t + TTL && now < t + TTL + STALE);
                let in_backoff = stale_fail.get(&k).is_some_and(|t| now < t + BACKOFF);
                let r = cache.load(k);
                let isdown = down.load(SeqCst);
                let called: Vec<_> = calls.lock().unwrap()[calls_before..]
                    .iter()
                    .filter(|c| c.0 == k)
                    .cloned()
                    .collect();
                if fail_safe && expired && in_backoff {
                    assert!(called.is_empty(), "{ctx}: backend called within fail-safe backoff (last failure {:?}): {called:?}", stale_fail.get(&k));
                }
                if fail_safe && expired && called.iter().any(|c| c.2) {
                    stale_fail.insert(k, now);
                }
                if called.iter().any(|c| !c.2) {
                    stale_fail.remove(&k);
                }
                match r {
                    Ok(v) => {
                        let age = check_value(v, true, "load");
                        if age >= TTL {
                            assert!(isdown || in_backoff, "{ctx}: load returned stale {v} (age {age}) with backend up and no failure within backoff");
                        }
                    }
                    Err(e) => {
                        assert!(isdown, "{ctx}: load failed with backend up: {e:?}");
                        if fail_safe {
                            if let Some(&t) = stored_at.get(&k) {
                                assert!(now >= t + TTL + STALE, "{ctx}: load error although fail-safe value stored at {t}: {e:?}");
                            }
                        }
                    }
                }
            }
        }
        // Learn about loads/refreshes that stored values in this op.
        let new_calls: Vec<_> = calls.lock().unwrap()[calls_before..].to_vec();
        for (ck, t, isdown) in new_calls {
            if !isdown {
                stored_at.insert(ck, t);
            }
        }
        // Backoff check: failed loader calls of one key while the backend is down and the key
        // has a stale value within window: at most one per BACKOFF.
        if step % 50 == 49 {
            cache.validate();
            assert_eq!(cache.loads_in_flight(), 0, "{ctx}");
        }
    }
    let st = cache.stats();
    ledger(&cache, &format!("model seed {seed}"));
    (st.stale_served_after_ttl, st.refreshes_started)
}

/// MODEL: random operations with the manual clock, checked against: never a value older than
/// TTL (+ max_stale with fail-safe, and only when the backend is down), never one that was
/// invalidated or overwritten, never stale without fail-safe, never an error with the backend up.
#[test]
fn model_random_ops() {
    let _w = watchdog(S(30), "model_random_ops");
    let (mut stale, mut refreshes) = (0, 0);
    for seed in 1..=12u64 {
        for (fs, rf, sp) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, false),
            (true, true, true),
        ] {
            let (st, rs) = model_run(seed, fs, rf, sp);
            stale += st;
            refreshes += rs;
        }
    }
    assert!(
        stale > 0 && refreshes > 0,
        "model did not exercise fail-safe/refresh: {stale} {refreshes}"
    );
}

/// Fail-safe + backend down: within one backoff window (no clock advance) a key with a stale
/// value sees at most one backend call, across all loading API families.
#[test]
fn fs_one_call_per_window_all_families() {
    let _w = watchdog(S(20), "fs_one_call_per_window_all_families");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .fail_safe(S(100))
        .refresh_backoff(S(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .build();
    let v0 = cache.load(1).unwrap();
    b.down.store(true, SeqCst);
    clock.advance(S(11));
    let inits = AtomicUsize::new(0);
    for i in 0..10 {
        assert_eq!(cache.load(1).unwrap(), v0, "load {i}");
        assert_eq!(
            cache.get_with(1, || {
                inits.fetch_add(1, SeqCst);
                5
            }),
            v0,
            "get_with {i}"
        );
        assert_eq!(
            cache
                .try_get_with(1, || {
                    inits.fetch_add(1, SeqCst);
                    Err::<u64, &str>("x")
                })
                .unwrap(),
            v0,
            "try_get_with {i}"
        );
        assert_eq!(
            cache.optionally_get_with(1, || {
                inits.fetch_add(1, SeqCst);
                None
            }),
            Some(v0),
            "optionally_get_with {i}"
        );
        assert_eq!(
            cache
                .load_with_timeout(1, Some(Duration::from_millis(1)))
                .unwrap(),
            v0
        );
    }
    assert_eq!(
        b.calls.load(SeqCst) + inits.load(SeqCst),
        2,
        "backend/init calls in one window"
    );
    let _ = LoadError::Timeout;
    ledger(&cache, "fs_one_call_per_window_all_families");
}

/// A stale parked refresh job (its key was overwritten) runs after a newer refresh of the newer
/// value: its value must not be stored ("a write during a refresh wins").
#[test]
fn refresh_old_parked_job_runs_last() {
    let _w = watchdog(S(20), "refresh_old_parked_job_runs_last");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let (jobs, spawns, spawner) = parking();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(30))
        .refresh_after(S(5))
        .refresh_backoff(S(1))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .spawner(spawner)
        .build();
    let v0 = cache.load(1).unwrap();
    clock.advance(S(6));
    assert_eq!(gg(&cache, 1), Some(v0));
    let j1 = take_jobs(&jobs);
    assert_eq!(j1.len(), 1);
    cache.insert(1, 55);
    clock.advance(S(6));
    assert_eq!(gg(&cache, 1), Some(55));
    let j2 = take_jobs(&jobs);
    assert_eq!(spawns.load(SeqCst), 2, "refresh of the new value");
    for j in j2 {
        j();
    }
    let v2 = gg(&cache, 1).unwrap();
    assert!(v2 != 55 && v2 != v0, "second refresh stored: {v2}");
    std::thread::spawn(move || j1.into_iter().for_each(|j| j()))
        .join()
        .unwrap();
    assert_eq!(
        gg(&cache, 1),
        Some(v2),
        "the old parked refresh overwrote a newer value"
    );
    // And the other order: J1 (of an invalidated value) runs while J3 is parked.
    clock.advance(S(6));
    assert_eq!(gg(&cache, 1), Some(v2));
    let j3 = take_jobs(&jobs);
    cache.invalidate(&1);
    for j in j3 {
        j();
    }
    assert_eq!(
        gg(&cache, 1),
        None,
        "refresh of an invalidated value stored"
    );
    ledger(&cache, "refresh_old_parked_job_runs_last");
}

/// A parked refresh outlives the TTL; a caller of the expired key joins it (spawner docs); the
/// refresh then fails with fail-safe on: the joined caller must get the old value (fail_safe:
/// "every caller of that load gets the old value instead of the error").
#[test]
fn fs_caller_joins_parked_refresh_that_fails_after_ttl() {
    let _w = watchdog(S(20), "fs_caller_joins_parked_refresh");
    let clock = ManualClock::new();
    let b = Backend::new();
    let bb = b.clone();
    let (jobs, _spawns, spawner) = parking();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .refresh_after(S(5))
        .fail_safe(S(100))
        .refresh_backoff(S(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| bb.call())
        .spawner(spawner)
        .build();
    let v0 = cache.load(1).unwrap();
    clock.advance(S(6));
    assert_eq!(gg(&cache, 1), Some(v0));
    clock.advance(S(5)); // expired, refresh still parked
    b.down.store(true, SeqCst);
    let c2 = cache.clone();
    let waiter = common::start(move || c2.load(1));
    std::thread::sleep(Duration::from_millis(50));
    for j in take_jobs(&jobs) {
        j();
    }
    let r = waiter.wait(S(5)).expect("waiter hung").unwrap();
    assert_eq!(r.unwrap(), v0, "caller of a failed refresh past TTL");
    // Within the backoff: stale, no call.
    let calls = b.calls.load(SeqCst);
    assert_eq!(cache.load(1).unwrap(), v0);
    for j in take_jobs(&jobs) {
        j();
    }
    assert_eq!(b.calls.load(SeqCst), calls, "backend called within backoff");
    ledger(&cache, "fs_caller_joins_parked_refresh");
}

/// Async leader cancelled mid-load with fail-safe: builder.rs fail_safe lists "an abandoned
/// leader" as a failure; the key must not stay loading and get_or_stale serves the old value.
#[test]
fn fs_async_leader_cancelled() {
    let _w = watchdog(S(20), "fs_async_leader_cancelled");
    let clock = ManualClock::new();
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(S(10))
        .fail_safe(S(100))
        .refresh_backoff(S(5))
        .clock(clock.clone())
        .record_stats()
        .async_loader(move |_k: &u32| {
            let first = f.swap(false, SeqCst);
            async move {
                if !first {
                    std::future::pending::<()>().await;
                }
                Ok::<u64, BoxError>(7)
            }
        })
        .build();
    assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 7);
    clock.advance(S(11));
    {
        let mut fut = Box::pin(cache.load_async(1));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(cache.loads_in_flight(), 1);
    }
    assert_eq!(cache.loads_in_flight(), 0, "cancelled load left in flight");
    assert_eq!(gs(&cache, 1), Some(7));
    // Within the backoff after the abandoned load: stale without a load.
    let r = within(S(5), {
        let c = cache.clone();
        move || futures::executor::block_on(c.load_async(1))
    })
    .expect("load_async within backoff hung (called the pending loader?)")
    .unwrap();
    assert_eq!(r.unwrap(), 7);
    ledger(&cache, "fs_async_leader_cancelled");
}
