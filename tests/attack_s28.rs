//! Attack round s28: statistics exactness under concurrency, `health()` / `sizing()` at the
//! edges (clock near its end, rewinds, zero and huge capacities), weighted admission, refresh
//! with hostile spawners, and whole-cache operations racing loads. Public API only (plus the
//! `testing` feature's `validate` / `loads_in_flight`).
//!
//! Findings (each failed before its fix, in this commit): `retain` / `invalidate_entries_if` remove a key without ending the
//! load, refresh, replacement or computation in flight for it, which then stores its value
//! (`r03`, `r05`, `r06`; `invalidate`, `remove` and `invalidate_all` win as documented);
//! `health()` overflows (debug panic) with a time to live under 64 ns on a clock at its end
//! (`h01`, `h02`).

#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]

mod common;

use common::{quiet_injected_panics, watchdog, within, Rng};
use herdcache::{BoxError, Cache, ManualClock, RemovalCause};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread::sleep;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

type Log<K, V> = Arc<Mutex<Vec<(K, V, RemovalCause)>>>;

fn recorder<K, V>() -> (
    Log<K, V>,
    impl Fn(&K, &V, RemovalCause) + Send + Sync + 'static,
)
where
    K: Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let log: Log<K, V> = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    (log, move |k: &K, v: &V, c| {
        l.lock().unwrap().push((k.clone(), v.clone(), c))
    })
}

fn count_cause<K, V>(log: &Log<K, V>, c: RemovalCause) -> u64 {
    log.lock().unwrap().iter().filter(|e| e.2 == c).count() as u64
}

// =============================================================================================
// health() at the clock's end
// =============================================================================================

/// A tiny time to live (below 64 ns: the due ring's interval is 1 ns) on a clock advanced to its
/// end: `health()` must not overflow.
#[test]
fn h01_health_tiny_ttl_clock_at_its_end() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_nanos(10))
        .clock(clock.clone())
        .build();
    clock.advance(Duration::MAX);
    cache.insert(1, 1);
    let r = catch_unwind(AssertUnwindSafe(|| cache.health()));
    assert!(r.is_ok(), "health() panicked with the clock at its end");
}

/// The same with an ordinary time to live and a clock far ahead: every warning's figures stay
/// finite and health does not panic.
#[test]
fn h02_health_clock_far_ahead_ordinary_ttl() {
    quiet_injected_panics();
    let mut failed = Vec::new();
    for ttl in [
        Duration::from_nanos(1),
        Duration::from_nanos(63),
        Duration::from_nanos(64),
        Duration::from_millis(1),
        Duration::from_secs(3600),
    ] {
        let clock = ManualClock::new();
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .time_to_live(ttl)
            .record_stats()
            .clock(clock.clone())
            .build();
        for step in [
            Duration::from_secs(86_400 * 365 * 100),
            Duration::from_secs(86_400 * 365 * 400),
            Duration::MAX,
        ] {
            clock.advance(step);
            for k in 0..100 {
                cache.insert(k, k);
            }
            let r = catch_unwind(AssertUnwindSafe(|| {
                let h = cache.health();
                let _ = h.to_string();
                let h = cache.health_over(Duration::MAX);
                let _ = h.to_string();
                let h = cache.health_over(Duration::ZERO);
                let _ = h.to_string();
            }));
            if r.is_err() {
                failed.push(format!("ttl {ttl:?}, clock at {:?}", clock.elapsed()));
                break;
            }
        }
    }
    assert!(failed.is_empty(), "health panicked: {failed:#?}");
}

/// A clock rewound after snapshots were taken: health still answers, its window is not
/// negative, and later calls see new figures again.
#[test]
fn h03_health_after_rewind() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(1))
        .record_stats()
        .clock(clock.clone())
        .build();
    for i in 0..20u32 {
        clock.advance(Duration::from_secs(10));
        cache.get_with(i, || {
            clock.advance(Duration::from_secs(2));
            i
        });
        let _ = cache.health_over(Duration::from_secs(60));
    }
    clock.rewind(Duration::from_secs(100_000));
    let h = cache.health_over(Duration::from_secs(60));
    let _ = h.to_string();
    assert!(h.window() <= Duration::from_secs(60), "{:?}", h.window());
}

// =============================================================================================
// Weighted admission
// =============================================================================================

/// An entry heavier than the whole capacity is not stored: nothing else may be evicted for it.
#[test]
fn w01_too_heavy_insert_evicts_nothing_else() {
    for shards in [1usize, 4] {
        let (log, listener) = recorder::<u32, u32>();
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(10)
            .shards(shards)
            .weigher(|_k: &u32, v: &u32| *v)
            .eviction_listener(listener)
            .record_stats()
            .build();
        for k in 0..10 {
            cache.insert(k, 1);
            for _ in 0..5 {
                cache.get(&k);
            }
        }
        let before: Vec<_> = {
            let mut v: Vec<_> = cache.iter().collect();
            v.sort();
            v
        };
        log.lock().unwrap().clear();
        cache.insert(100, 11);
        let mut after: Vec<_> = cache.iter().collect();
        after.sort();
        assert_eq!(
            after, before,
            "shards {shards}: others evicted for a rejected heavy entry"
        );
        assert_eq!(
            *log.lock().unwrap(),
            vec![(100, 11, RemovalCause::Size)],
            "shards {shards}"
        );
        cache.validate();
    }
}

/// A candidate as heavy as the capacity: either it is kept (and all else evicted) or it is
/// rejected (and nothing else evicted); never both gone.
#[test]
fn w02_heavy_candidate_rejected_after_evicting_others() {
    let mut seen_bug = Vec::new();
    for shards in [1usize, 2] {
        for heavy in [5u32, 8, 10] {
            let (log, listener) = recorder::<u32, u32>();
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(10)
                .shards(shards)
                .weigher(|_k: &u32, v: &u32| *v)
                .eviction_listener(listener)
                .build();
            for k in 0..10 {
                cache.insert(k, 1);
            }
            // Make the residents hot, so that the policy may reject the newcomer.
            for _ in 0..20 {
                for k in 0..10 {
                    cache.get(&k);
                }
            }
            log.lock().unwrap().clear();
            cache.insert(100, heavy);
            let kept = cache.contains_key(&100);
            let evicted_others: Vec<_> = log
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.0 != 100)
                .cloned()
                .collect();
            cache.validate();
            assert!(cache.weighted_size() <= 10);
            if !kept && !evicted_others.is_empty() {
                seen_bug.push(format!(
                    "shards {shards}, heavy {heavy}: rejected after evicting {evicted_others:?}"
                ));
            }
        }
    }
    assert!(seen_bug.is_empty(), "{seen_bug:#?}");
}

/// `get_with` of a value too heavy to keep: its caller and waiters get it, nothing is stored or
/// evicted, the key is not left loading, and the statistics say one load and one eviction.
#[test]
fn w03_get_with_too_heavy_value_with_waiters() {
    let _w = watchdog(LIMIT, "w03");
    let (log, listener) = recorder::<u32, u32>();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .weigher(|_k: &u32, v: &u32| *v)
        .eviction_listener(listener)
        .record_stats()
        .build();
    cache.insert(1, 3);
    let gate = Arc::new(Barrier::new(4));
    let runs = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let (c, g, r) = (cache.clone(), Arc::clone(&gate), Arc::clone(&runs));
            std::thread::spawn(move || {
                g.wait();
                c.get_with(7, || {
                    r.fetch_add(1, Ordering::SeqCst);
                    sleep(Duration::from_millis(50));
                    1000
                })
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 1000);
    }
    assert_eq!(cache.loads_in_flight(), 0);
    assert!(!cache.contains_key(&7));
    assert_eq!(cache.get(&1), Some(3));
    assert_eq!(cache.weighted_size(), 3);
    let n = runs.load(Ordering::SeqCst) as u64;
    let s = cache.stats();
    assert_eq!(s.load_successes, n, "{s:?}");
    assert_eq!(s.size.count, count_cause(&log, RemovalCause::Size), "{s:?}");
    assert_eq!(
        s.size.count, n,
        "one Size per stored-and-rejected value: {s:?}"
    );
    cache.validate();
}

/// Weigher returning 0 and u32::MAX for the same key across inserts, with capacity 0 and 1.
#[test]
fn w04_weigher_extremes_same_key_capacity_zero_one() {
    for cap in [0u64, 1, u32::MAX as u64, u64::MAX] {
        let (log, listener) = recorder::<u32, u32>();
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(cap)
            .weigher(|_k: &u32, v: &u32| *v)
            .eviction_listener(listener)
            .record_stats()
            .build();
        let mut r = Rng(0x9e37u64.wrapping_add(cap) | 1);
        for _ in 0..2000 {
            let k = (r.next() % 4) as u32;
            let w = match r.next() % 4 {
                0 => 0,
                1 => u32::MAX,
                2 => 1,
                _ => (r.next() % 3) as u32,
            };
            match r.next() % 5 {
                0 => cache.invalidate(&k),
                1 => {
                    cache.get_with(k, || w);
                }
                _ => cache.insert(k, w),
            }
            let live: u64 = cache.iter().map(|(_, v)| v as u64).sum();
            assert_eq!(cache.weighted_size(), live, "cap {cap}");
            assert!(cache.weighted_size() <= cap, "cap {cap}");
        }
        cache.validate();
        let s = cache.stats();
        for (c, got) in [
            (RemovalCause::Size, s.size.count),
            (RemovalCause::Explicit, s.explicit.count),
            (RemovalCause::Replaced, s.replaced.count),
        ] {
            assert_eq!(count_cause(&log, c), got, "cap {cap} {c:?}: {s:?}");
        }
    }
}

// =============================================================================================
// Statistics under concurrency
// =============================================================================================

/// Four threads: get, get_with (sometimes panicking, sometimes slow), load, invalidate, insert
/// on a small cache. Every lookup counts once as a hit or a miss; load_successes equals the
/// inits and loader calls that returned; evictions equal the listener's.
#[test]
fn s01_stats_exact_under_concurrency() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "s01");
    let (log, listener) = recorder::<u32, u64>();
    let loader_calls = Arc::new(AtomicU64::new(0));
    let lc = Arc::clone(&loader_calls);
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(16)
        .record_stats()
        .eviction_listener(listener)
        .loader(move |k: &u32| {
            lc.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(*k as u64)
        })
        .build();
    let lookups = Arc::new(AtomicU64::new(0));
    let inits_ok = Arc::new(AtomicU64::new(0));
    let inits_failed = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..4u64)
        .map(|t| {
            let c = cache.clone();
            let (lookups, ok, failed) = (
                Arc::clone(&lookups),
                Arc::clone(&inits_ok),
                Arc::clone(&inits_failed),
            );
            std::thread::spawn(move || {
                let mut r = Rng(0xabc + t * 7919);
                for i in 0..3000u64 {
                    let k = (r.next() % 40) as u32;
                    match r.next() % 10 {
                        0..=2 => {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            c.get(&k);
                        }
                        3..=5 => {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            let boom = r.next() % 8 == 0;
                            let slow = r.next() % 16 == 0;
                            let _ = catch_unwind(AssertUnwindSafe(|| {
                                c.get_with(k, || {
                                    if slow {
                                        sleep(Duration::from_micros(200));
                                    }
                                    if boom {
                                        failed.fetch_add(1, Ordering::SeqCst);
                                        panic!("injected");
                                    }
                                    ok.fetch_add(1, Ordering::SeqCst);
                                    i
                                })
                            }));
                        }
                        6 => {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            c.load(k).unwrap();
                        }
                        7 => c.invalidate(&k),
                        8 => c.insert(k, i),
                        _ => {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            let _ = c.try_get_with(k, || if i % 3 == 0 { Err(()) } else { Ok(i) });
                        }
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let s = cache.stats();
    assert_eq!(cache.loads_in_flight(), 0);
    // Changed in stop 25: a call whose joined load panicked and that then loads itself makes
    // a second attempt, counted as a second miss (`CacheStats::misses`): at least one count
    // per lookup. The excess is exactly the second attempts: the loading calls' misses are
    // each one load, join or negative hit, and the plain `get`s' misses are the rest.
    let lookups = lookups.load(Ordering::SeqCst);
    assert!(s.hits + s.misses >= lookups, "{s:?}");
    assert!(
        s.hits + s.misses - lookups <= s.load_successes + s.load_failures,
        "{s:?}"
    );
    assert_eq!(s.size.count, count_cause(&log, RemovalCause::Size), "{s:?}");
    assert_eq!(
        s.explicit.count,
        count_cause(&log, RemovalCause::Explicit),
        "{s:?}"
    );
    assert_eq!(
        s.replaced.count,
        count_cause(&log, RemovalCause::Replaced),
        "{s:?}"
    );
    cache.validate();
    let live: u64 = cache.entry_count();
    assert_eq!(cache.weighted_size(), live);
}

/// Lookups of one key by many threads: each call is a hit or a miss; each miss either loads
/// (one load_success) or joins (coalesced).
#[test]
fn s02_one_key_misses_are_loads_plus_coalesced() {
    let _w = watchdog(LIMIT, "s02");
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(100).record_stats().build();
    let runs = Arc::new(AtomicU64::new(0));
    for round in 0..30u32 {
        cache.invalidate(&1);
        let gate = Arc::new(Barrier::new(4));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (c, g, r) = (cache.clone(), Arc::clone(&gate), Arc::clone(&runs));
                std::thread::spawn(move || {
                    g.wait();
                    c.get_with(1, || {
                        r.fetch_add(1, Ordering::SeqCst);
                        sleep(Duration::from_millis(2));
                        round
                    })
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
    let s = cache.stats();
    assert_eq!(s.hits + s.misses, 120, "{s:?}");
    assert_eq!(s.load_successes, runs.load(Ordering::SeqCst), "{s:?}");
    assert_eq!(s.misses, s.load_successes + s.coalesced, "{s:?}");
}

/// Subtracting snapshots taken while other threads count: every difference is the count of
/// the period (never a wrapped huge number), and requests()/hit_ratio() do not panic on it.
#[test]
fn s03_stats_subtraction_while_counting() {
    let _w = watchdog(LIMIT, "s03");
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(64).record_stats().build();
    let stop = Arc::new(AtomicBool::new(false));
    let hs: Vec<_> = (0..2u64)
        .map(|t| {
            let (c, stop) = (cache.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut r = Rng(77 + t);
                while !stop.load(Ordering::Relaxed) {
                    let k = (r.next() % 128) as u32;
                    c.get_with(k, || k);
                    c.get(&k);
                }
            })
        })
        .collect();
    let mut prev = cache.stats();
    for _ in 0..2000 {
        let now = cache.stats();
        let d = now - prev;
        assert!(d.hits < 1 << 40 && d.misses < 1 << 40, "{d:?}");
        assert!(
            d.size.count < 1 << 40 && d.load_successes < 1 << 40,
            "{d:?}"
        );
        let _ = d.requests();
        let _ = d.hit_ratio();
        let _ = d.evictions();
        let _ = d.average_load_time();
        prev = now;
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
}

// =============================================================================================
// Refresh with hostile spawners
// =============================================================================================

fn refreshing(
    clock: &ManualClock,
    version: Arc<AtomicU64>,
    spawner: impl Fn(Box<dyn FnOnce() + Send>) + Send + Sync + 'static,
    limit: Option<usize>,
) -> Cache<u32, u64> {
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(100))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(1))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            Ok::<_, BoxError>(*k as u64 * 1000 + version.fetch_add(1, Ordering::SeqCst))
        })
        .spawner(spawner);
    if let Some(l) = limit {
        b = b.max_concurrent_loads(l);
    }
    b.build()
}

/// A spawner that drops every job: nothing stays loading, the permit comes back, a later
/// refresh is attempted again after the backoff.
#[test]
fn r01_dropping_spawner_releases_key_and_permit() {
    let _w = watchdog(LIMIT, "r01");
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = Arc::clone(&dropped);
    let cache = refreshing(
        &clock,
        Arc::clone(&version),
        move |job| {
            d.fetch_add(1, Ordering::SeqCst);
            drop(job);
        },
        Some(1),
    );
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.load(1).unwrap(), 1000);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    assert_eq!(cache.loads_in_flight(), 0);
    // The permit is back: a load of another key runs.
    let c = cache.clone();
    let r = within(Duration::from_secs(5), move || c.load(2).unwrap());
    assert!(
        matches!(r, Some(Ok(_))),
        "a load hung behind a dropped refresh job's permit"
    );
    clock.advance(Duration::from_secs(2));
    cache.get(&1);
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        2,
        "refresh retried after the backoff"
    );
    let s = cache.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    assert_eq!(s.loads_in_flight, 0);
    cache.validate();
}

/// A spawner that panics: the read that hit it, the key, the permit.
#[test]
fn r02_panicking_spawner() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "r02");
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU64::new(0));
    let cache = refreshing(
        &clock,
        Arc::clone(&version),
        move |_job| panic!("injected spawner panic"),
        Some(1),
    );
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(20));
    let r = catch_unwind(AssertUnwindSafe(|| cache.get(&1)));
    // Either way the key must not be loading and the permit must be back.
    let _ = r;
    assert_eq!(cache.loads_in_flight(), 0);
    let c = cache.clone();
    let r = within(Duration::from_secs(5), move || c.load(2).unwrap());
    assert!(
        matches!(r, Some(Ok(_))),
        "permit lost behind a panicking spawner"
    );
    let s = cache.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    cache.validate();
}

/// A spawner that keeps jobs and runs them later on another thread, after an `invalidate`, an
/// `insert`, or `invalidate_all`: the late refresh must not bring back a removed value or
/// overwrite a newer insert.
#[test]
fn r03_late_refresh_after_invalidate_or_insert() {
    let _w = watchdog(LIMIT, "r03");
    let mut failed = Vec::new();
    for what in [
        "invalidate",
        "insert",
        "invalidate_all",
        "retain",
        "invalidate_entries_if",
        "remove",
    ] {
        let clock = ManualClock::new();
        let version = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let tx = Mutex::new(tx);
        let cache = refreshing(
            &clock,
            Arc::clone(&version),
            move |job| {
                tx.lock().unwrap().send(job).unwrap();
            },
            None,
        );
        assert_eq!(cache.load(1).unwrap(), 1000);
        clock.advance(Duration::from_secs(20));
        assert_eq!(cache.get(&1), Some(1000));
        let job = rx.try_recv().expect("a refresh job");
        match what {
            "invalidate" => cache.invalidate(&1),
            "insert" => cache.insert(1, 7),
            "invalidate_all" => cache.invalidate_all(),
            "retain" => cache.retain(|_, _| false),
            "invalidate_entries_if" => {
                cache.invalidate_entries_if(|_, _| true).unwrap();
            }
            _ => {
                cache.remove(&1);
            }
        }
        std::thread::spawn(job).join().unwrap();
        let got = cache.get(&1);
        let want = if what == "insert" { Some(7) } else { None };
        if got != want {
            failed.push(format!("{what}: got {got:?}, want {want:?}"));
        }
        assert_eq!(cache.loads_in_flight(), 0, "{what}");
        cache.validate();
    }
    assert!(
        failed.is_empty(),
        "a late refresh brought a removed key back: {failed:#?}"
    );
}

/// Minimal: a refresh whose loader is running (on the spawner's thread) when `retain` removes
/// the key stores its value afterwards; `invalidate` in the same place wins (the value is not
/// stored), as the docs promise for any invalidation during a load.
#[test]
fn r05_retain_during_running_refresh_value_comes_back() {
    let _w = watchdog(LIMIT, "r05");
    let mut failed = Vec::new();
    for how in ["invalidate", "retain", "invalidate_entries_if"] {
        let clock = ManualClock::new();
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let in_tx = Mutex::new(in_tx);
        let go_rx = Mutex::new(go_rx);
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = Arc::clone(&calls);
        let (log, listener) = recorder::<u32, u64>();
        let cache: Cache<u32, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .clock(clock.clone())
            .eviction_listener(listener)
            .loader(move |_k: &u32| {
                let n = c2.fetch_add(1, Ordering::SeqCst);
                if n > 0 {
                    in_tx.lock().unwrap().send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                }
                Ok::<_, BoxError>(n)
            })
            .spawner(|job| {
                std::thread::spawn(job);
            })
            .build();
        assert_eq!(cache.load(1).unwrap(), 0);
        clock.advance(Duration::from_secs(20));
        assert_eq!(cache.get(&1), Some(0)); // starts the refresh on its own thread
        in_rx.recv().unwrap(); // the refresh's loader is running
        match how {
            "invalidate" => cache.invalidate(&1),
            "retain" => cache.retain(|_, _| false),
            _ => {
                cache.invalidate_entries_if(|_, _| true).unwrap();
            }
        }
        assert_eq!(cache.get(&1), None);
        go_tx.send(()).unwrap();
        assert!(common::eventually(|| cache.loads_in_flight() == 0));
        let got = cache.get(&1);
        if got.is_some() {
            failed.push(format!(
                "{how}: removed ({:?}) and then back as {got:?}",
                log.lock().unwrap()
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A refresh job run late, after the key was refreshed through `get_with_if` (a forced
/// replacement): the late job must not overwrite the newer value.
#[test]
fn r04_late_refresh_after_get_with_if_replacement() {
    let _w = watchdog(LIMIT, "r04");
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let tx = Mutex::new(tx);
    let cache = refreshing(
        &clock,
        Arc::clone(&version),
        move |job| {
            tx.lock().unwrap().send(job).unwrap();
        },
        None,
    );
    assert_eq!(cache.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&1), Some(1000));
    let job = rx.try_recv().expect("a refresh job");
    // A caller forcing a replacement while the refresh is pending.
    let c = cache.clone();
    let r = within(Duration::from_secs(5), move || {
        c.get_with_if(1, || 5555, |_| true)
    });
    match r {
        Some(Ok(v)) => {
            // It ran its own init, or (documented) joined the refresh: then it waited for it.
            assert_eq!(v, 5555, "forced replacement returned {v}");
            std::thread::spawn(job).join().unwrap();
            assert_eq!(
                cache.get(&1),
                Some(5555),
                "the late refresh overwrote a newer value"
            );
        }
        Some(Err(_)) => panic!("get_with_if panicked"),
        None => {
            // Joined the pending refresh: run it and the caller must be released.
            std::thread::spawn(job).join().unwrap();
            sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// =============================================================================================
// Whole-cache operations racing loads
// =============================================================================================

/// A load in flight when `invalidate_all` runs: its value goes to its callers but is not
/// stored (an invalidation wins).
#[test]
fn x01_invalidate_all_wins_over_load_in_flight() {
    let _w = watchdog(LIMIT, "x01");
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(100).build();
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let c = cache.clone();
    let h = std::thread::spawn(move || {
        c.get_with(1, || {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            10
        })
    });
    started_rx.recv().unwrap();
    cache.invalidate_all();
    go_tx.send(()).unwrap();
    assert_eq!(h.join().unwrap(), 10);
    assert_eq!(
        cache.get(&1),
        None,
        "a load in flight survived invalidate_all"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// iter, retain, invalidate_entries_if and invalidate_all in a loop while loads, refreshes and
/// inserts run: the weight stays the sum of live weights, nothing stays loading.
#[test]
fn x02_whole_cache_ops_during_loads_and_refreshes() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "x02");
    let (log, listener) = recorder::<u32, u32>();
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(200)
        .weigher(|_k: &u32, v: &u32| v % 7)
        .time_to_live(Duration::from_secs(50))
        .refresh_after(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .eviction_listener(listener)
        .loader(|k: &u32| {
            if k % 13 == 0 {
                panic!("injected loader panic");
            }
            Ok::<_, BoxError>(*k * 3)
        })
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (c, stop, clock) = (cache.clone(), Arc::clone(&stop), clock.clone());
        hs.push(std::thread::spawn(move || {
            let mut r = Rng(5 + t);
            while !stop.load(Ordering::Relaxed) {
                let k = (r.next() % 300) as u32;
                match r.next() % 6 {
                    0 => {
                        let _ = c.load(k);
                    }
                    1 => c.insert(k, k + 1),
                    2 => {
                        let _ = catch_unwind(AssertUnwindSafe(|| c.get_with(k, || k * 5)));
                    }
                    3 => clock.advance(Duration::from_millis(500)),
                    _ => {
                        c.get(&k);
                    }
                }
            }
        }));
    }
    for i in 0..300u32 {
        match i % 4 {
            0 => {
                let _: Vec<_> = cache.iter().collect();
            }
            1 => cache.retain(|k, _| k % 2 == 0),
            2 => {
                cache.invalidate_entries_if(|_, v| v % 3 == 0).unwrap();
            }
            _ => cache.invalidate_all(),
        }
        sleep(Duration::from_micros(300));
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    // Let late refresh threads end: a refresh's flight leaves the registry (no load in
    // flight) before its thread counts how it ended, so wait for the count too (a refresh
    // never counted would still fail here).
    assert!(common::eventually(|| {
        let s = cache.stats();
        cache.loads_in_flight() == 0
            && s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed
    }));
    // A load or refresh reports what it removed to the listener after its waiters are released
    // and its outcome is counted (`publish`): wait until the listener has heard every removal
    // the statistics tallied too (a removal never reported still fails the checks below). Seen
    // in a CI run: `replaced` 2,818 counted against 2,817 heard, a late refresh's report not
    // yet made.
    let _ = common::eventually(|| {
        let s = cache.stats();
        s.replaced.count == count_cause(&log, RemovalCause::Replaced)
            && s.size.count == count_cause(&log, RemovalCause::Size)
            && s.explicit.count == count_cause(&log, RemovalCause::Explicit)
            && s.expired.count == count_cause(&log, RemovalCause::Expired)
    });
    cache.validate();
    let live: u64 = cache.iter().map(|(_, v)| (v % 7) as u64).sum();
    // iter skips expired entries; run_pending_tasks first so both agree.
    cache.run_pending_tasks();
    let live2: u64 = cache.iter().map(|(_, v)| (v % 7) as u64).sum();
    assert_eq!(
        cache.weighted_size(),
        live2,
        "weighted size vs live weights ({live})"
    );
    let s = cache.stats();
    assert_eq!(s.size.count, count_cause(&log, RemovalCause::Size), "{s:?}");
    assert_eq!(
        s.explicit.count,
        count_cause(&log, RemovalCause::Explicit),
        "{s:?}"
    );
    assert_eq!(
        s.expired.count,
        count_cause(&log, RemovalCause::Expired),
        "{s:?}"
    );
    assert_eq!(
        s.replaced.count,
        count_cause(&log, RemovalCause::Replaced),
        "{s:?}"
    );
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
}

// =============================================================================================
// sizing()
// =============================================================================================

/// sizing() on zero, one and huge capacities, weighted or not, with every clock extreme.
#[test]
fn z01_sizing_edges() {
    for cap in [0u64, 1, 2, 1 << 40, u64::MAX] {
        for weighted in [false, true] {
            let clock = ManualClock::new();
            let mut b = Cache::builder()
                .max_capacity(cap)
                .track_sizing()
                .record_stats()
                .time_to_live(Duration::from_secs(10))
                .clock(clock.clone());
            if weighted {
                b = b.weigher(|_k: &u64, v: &u64| (*v % 5) as u32);
            }
            let cache: Cache<u64, u64> = b.build();
            let r = catch_unwind(AssertUnwindSafe(|| {
                let _ = cache.sizing().unwrap();
                let mut r = Rng(3u64.wrapping_add(cap) | 1);
                for i in 0..5000u64 {
                    let k = r.next() % 500;
                    if cache.get(&k).is_none() {
                        cache.insert(k, i);
                    }
                    if i % 1000 == 0 {
                        clock.advance(Duration::from_secs(86_400 * 365 * 100));
                        clock.rewind(Duration::from_secs(5));
                    }
                }
                let s = cache.sizing().unwrap();
                for &(c, h) in s.points() {
                    assert!((0.0..=1.0).contains(&h), "{c}: {h}");
                }
                assert!((0.0..=1.0).contains(&s.observed()));
                let _ = s.suggested_capacity();
                let _ = s.predicted_at(u64::MAX);
                let _ = s.predicted_at(0);
                let _ = cache.health().to_string();
            }));
            assert!(r.is_ok(), "sizing panicked: cap {cap} weighted {weighted}");
        }
    }
}

/// The same race with a `get_with_if` replacement and an `and_compute_with` in flight: what
/// `invalidate` does there (the reference), `retain` should do too.
#[test]
fn r06_retain_vs_invalidate_during_replacement_and_compute() {
    let _w = watchdog(LIMIT, "r06");
    let mut outcome = Vec::new();
    for verb in ["get_with_if", "compute"] {
        for how in ["invalidate", "retain"] {
            let cache: Cache<u32, u64> = Cache::builder().max_capacity(100).build();
            cache.insert(1, 1);
            let (in_tx, in_rx) = mpsc::channel::<()>();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let c = cache.clone();
            let h = std::thread::spawn(move || match verb {
                "get_with_if" => {
                    c.get_with_if(
                        1,
                        || {
                            in_tx.send(()).unwrap();
                            go_rx.recv().unwrap();
                            2
                        },
                        |_| true,
                    );
                }
                _ => {
                    c.entry(1).and_compute_with(|_old| {
                        in_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        herdcache::Op::Put(2)
                    });
                }
            });
            in_rx.recv().unwrap();
            match how {
                "invalidate" => cache.invalidate(&1),
                _ => cache.retain(|_, _| false),
            }
            go_tx.send(()).unwrap();
            h.join().unwrap();
            outcome.push((verb, how, cache.get(&1)));
            cache.validate();
        }
    }
    // Whatever invalidate gives, retain must give the same.
    for pair in outcome.chunks(2) {
        assert_eq!(pair[0].2, pair[1].2, "{outcome:?}");
    }
}
