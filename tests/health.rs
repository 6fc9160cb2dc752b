//! `Cache::health`: each warning has a test that triggers it and a near miss that does not.
//! Time is a `ManualClock` (load times are clock advances inside the loaders); the load-limit
//! test uses real threads but no timing: it waits until the limiter has counted the waits.

#![cfg(not(loom))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, ManualClock, Warning};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn kinds(c: &Cache<u64, u64>, window: Duration) -> Vec<&'static str> {
    c.health_over(window)
        .warnings()
        .iter()
        .map(Warning::kind)
        .collect()
}

/// A cache whose loads take `load` on its clock.
fn loads_taking(load: Duration, n: u64, ttl: Duration) -> Cache<u64, u64> {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(ttl)
        .clock(clock.clone())
        .build();
    for k in 0..n {
        c.get_with(k, || {
            clock.advance(load);
            k
        });
    }
    c
}

#[test]
fn ttl_shorter_than_loads() {
    let c = loads_taking(ms(400), 10, secs(1));
    let h = c.health_over(secs(60));
    match h.warnings() {
        [Warning::TtlShorterThanLoads {
            ttl,
            p50_load,
            loads,
        }] => {
            assert_eq!((*ttl, *loads), (secs(1), 10));
            let p = p50_load.as_secs_f64();
            assert!(
                (0.35..0.45).contains(&p),
                "p50 {p} s, within a bucket of 400 ms"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(h.to_string().contains("raise time_to_live"));
    // Near misses: loads of 200 ms (4 × 200 ms < 1 s), or too few loads.
    assert!(kinds(&loads_taking(ms(200), 10, secs(1)), secs(60)).is_empty());
    assert!(kinds(&loads_taking(ms(400), 7, secs(1)), secs(60)).is_empty());
}

fn filled(jitter: bool, spacing: Duration) -> Cache<u64, u64> {
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(60))
        .clock(clock.clone());
    if jitter {
        b = b.jitter(0.2);
    }
    let c = b.build();
    for k in 0..200 {
        c.insert(k, k);
        clock.advance(spacing);
    }
    c
}

#[test]
fn synchronized_expiry() {
    let c = filled(false, Duration::ZERO);
    match c.health_over(secs(60)).warnings() {
        [Warning::SynchronizedExpiry {
            due, share, within, ..
        }] => {
            assert_eq!(*due, 200);
            assert_eq!(*share, 1.0);
            assert_eq!(*within, Duration::from_nanos(60_000_000_000 / 32 * 3));
        }
        other => panic!("{other:?}"),
    }
    // Near misses: the same burst with jitter, or writes spread over the time to live.
    assert!(kinds(&filled(true, Duration::ZERO), secs(60)).is_empty());
    assert!(kinds(&filled(false, ms(300)), secs(60)).is_empty());
}

/// `health` never waits for a shard lock: it answers while a `retain` holds every shard's
/// write lock (its closure blocked here), with and without a weigher; the synchronized-expiry
/// warning still counts the entries (200 of 200 due, share 1.0).
#[test]
fn health_does_not_wait_for_a_retain_in_progress() {
    let _w = watchdog(Duration::from_secs(60), "health during retain");
    for weighted in [false, true] {
        let clock = ManualClock::new();
        let mut b = Cache::builder()
            .max_capacity(1000)
            .shards(4)
            .time_to_live(secs(60))
            .clock(clock.clone());
        if weighted {
            b = b.weigher(|_k: &u64, _v: &u64| 2);
        }
        let c: Cache<u64, u64> = b.build();
        for k in 0..200 {
            c.insert(k, k);
        }
        let (inside_tx, inside_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let c2 = c.clone();
        let retain = std::thread::spawn(move || {
            let mut first = true;
            c2.retain(|_k, _v| {
                if first {
                    first = false;
                    inside_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                }
                true
            });
        });
        inside_rx.recv().unwrap();
        let c3 = c.clone();
        let health = std::thread::spawn(move || c3.health_over(secs(60)));
        let answered = common::eventually(|| health.is_finished());
        release_tx.send(()).unwrap();
        retain.join().unwrap();
        assert!(answered, "health waited for retain (weighted: {weighted})");
        let h = health.join().unwrap();
        // Without a weigher the weight is the count; with one, every shard is busy here and
        // counts as its last change left it: 200 (an estimate from the weight, 400, made the
        // share 0.5 before round 98).
        match h.warnings() {
            [Warning::SynchronizedExpiry { due, share, .. }] => {
                assert_eq!(*due, 200);
                assert_eq!(*share, 1.0, "weighted: {weighted}");
            }
            other => panic!("weighted {weighted}: {other:?}"),
        }
        // Once the locks are free, a weighted cache counts exactly again.
        if weighted {
            match c.health_over(secs(60)).warnings() {
                [Warning::SynchronizedExpiry { share, .. }] => assert_eq!(*share, 1.0),
                other => panic!("{other:?}"),
            }
        }
    }
}

fn refreshing(refresh_after: Duration) -> Cache<u64, u64> {
    Cache::builder()
        .max_capacity(10)
        .time_to_live(secs(10))
        .refresh_after(refresh_after)
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .build()
}

#[test]
fn refresh_never_happens() {
    assert_eq!(
        kinds(&refreshing(secs(10)), secs(60)),
        ["refresh_never_happens"]
    );
    assert!(kinds(&refreshing(ms(9_999)), secs(60)).is_empty());
    // A time to live of "never" has nothing to refresh ahead of: no warning, whatever the
    // refresh period.
    let forever: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::MAX)
        .refresh_after(Duration::MAX)
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .build();
    assert!(kinds(&forever, secs(60)).is_empty());
}

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

/// `n` keys due for refresh, read once each, with a spawner that never runs the jobs.
fn refresh_backlog(n: u64) -> (Cache<u64, u64>, Jobs) {
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let j = Arc::clone(&jobs);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(100))
        .refresh_after(secs(10))
        .jitter(0.1)
        .clock(clock.clone())
        .record_stats()
        .loader(|k: &u64| Ok::<_, BoxError>(*k))
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    for k in 0..n {
        c.insert(k, k);
    }
    clock.advance(secs(20));
    for k in 0..n {
        assert_eq!(c.get(&k), Some(k));
    }
    (c, jobs)
}

#[test]
fn refresh_cannot_keep_up() {
    let (c, jobs) = refresh_backlog(70);
    match c.health_over(secs(60)).warnings() {
        [Warning::RefreshCannotKeepUp {
            backlog,
            started,
            finished,
        }] => assert_eq!((*backlog, *started, *finished), (70, 70, 0)),
        other => panic!("{other:?}"),
    }
    // The jobs run: the backlog is gone.
    for job in std::mem::take(&mut *jobs.lock().unwrap()) {
        job();
    }
    assert!(kinds(&c, secs(60)).is_empty());
    // Near miss: a backlog of 63.
    let (c, jobs) = refresh_backlog(63);
    assert!(kinds(&c, secs(60)).is_empty());
    // The jobs own the cache (through their refreshes) and the cache owns the spawner that
    // holds them: dropped unrun, the cycle is broken (LeakSanitizer runs this test).
    jobs.lock().unwrap().clear();
}

/// 1,000 distinct keys into a cache of 100, one every `spacing`.
fn churn(spacing: Duration) -> Cache<u64, u64> {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(3600))
        .jitter(0.2)
        .clock(clock.clone())
        .record_stats()
        .build();
    for k in 0..1000 {
        c.insert(k, k);
        clock.advance(spacing);
    }
    c
}

#[test]
fn thrashing_young_evictions() {
    let c = churn(ms(1));
    match c.health_over(secs(60)).warnings() {
        [Warning::Thrashing {
            evictions,
            residence: Some(r),
            ..
        }] => {
            assert_eq!(*evictions, 900);
            assert!(*r < secs(1), "entries stayed {r:?}");
        }
        other => panic!("{other:?}"),
    }
    // Near miss: the same churn over 17,000 s: evictions for size (576 here; some entries
    // expire first), but entries stay ≈ 3,000 s, more than half the time to live (1,800 s).
    let c = churn(secs(17));
    assert!(c.stats().size.count >= 64);
    assert!(kinds(&c, secs(20_000)).is_empty());
}

/// A cache of 100 with the sizing curve tracked, read through `keys` (one key a millisecond,
/// inserted on a miss).
fn sized_churn(keys: impl Iterator<Item = u64>) -> Cache<u64, u64> {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(3600))
        .jitter(0.2)
        .clock(clock.clone())
        .record_stats()
        .track_sizing()
        .build();
    for k in keys {
        if c.get(&k).is_none() {
            c.insert(k, k);
        }
        clock.advance(ms(1));
    }
    c
}

#[test]
fn thrashing_quotes_the_sizing_curve() {
    // A loop over 150 keys: too many for 100 entries, all of them fit in 200.
    let c = sized_churn((0..30_000u64).map(|i| i % 150));
    let h = c.health_over(secs(60));
    let w = match h.warnings() {
        [w @ Warning::Thrashing {
            sizing: Some(s), ..
        }] => {
            assert!(s.predicted_at(200) > 0.95, "{s:?}");
            assert!(s.predicted_at(100) < 0.9, "{s:?}");
            w.to_string()
        }
        other => panic!("{other:?}"),
    };
    assert!(w.contains("at 2× capacity (200): "), "{w}");
    assert!(w.contains(", at 4× (400): "), "{w}");
    assert!(w.ends_with("raise max_capacity to about 200"), "{w}");
    // Near miss: keys seen once (a scan). Evictions are young as well, but no capacity would
    // help: the advice says so instead of suggesting one.
    let c = sized_churn(1_000_000..1_030_000u64);
    let h = c.health_over(secs(60));
    match h.warnings() {
        [w @ Warning::Thrashing {
            sizing: Some(s), ..
        }] => {
            assert!(s.predicted_at(400) < 0.02, "{s:?}");
            let w = w.to_string();
            assert!(
                w.contains("predicts little gain") && !w.contains("about"),
                "{w}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn thrashing_hit_ratio_drop() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(3600))
        .jitter(0.2)
        .clock(clock.clone())
        .record_stats()
        .build();
    let w = secs(100);
    for k in 0..100 {
        c.insert(k, k);
    }
    assert!(kinds(&c, w).is_empty()); // a snapshot at 0
                                      // First half: hits only.
    for i in 0..2000u64 {
        c.get(&(i % 100));
    }
    clock.advance(secs(50));
    assert!(kinds(&c, w).is_empty()); // a snapshot at 50 s
                                      // Second half: the same hits, then 40 % misses (63 of them inserted: fewer evictions
                                      // than the young-eviction test needs, so the drop alone raises the warning).
    for i in 0..1200u64 {
        c.get(&(i % 100));
    }
    for k in 1000..1800u64 {
        if c.get(&k).is_none() && k < 1063 {
            c.insert(k, k);
        }
    }
    clock.advance(secs(50));
    match c.health_over(w).warnings() {
        [Warning::Thrashing {
            hit_ratio: Some((a, b)),
            ..
        }] => assert_eq!((*a, *b), (1.0, 0.6)),
        other => panic!("{other:?}"),
    }
    // Near miss: a drop of 5 points.
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(3600))
        .jitter(0.2)
        .clock(clock.clone())
        .record_stats()
        .build();
    for k in 0..100 {
        c.insert(k, k);
    }
    assert!(kinds(&c, w).is_empty());
    for i in 0..2000u64 {
        c.get(&(i % 100));
    }
    clock.advance(secs(50));
    assert!(kinds(&c, w).is_empty());
    for i in 0..1900u64 {
        c.get(&(i % 100));
    }
    for k in 1000..1060u64 {
        if c.get(&k).is_none() {
            c.insert(k, k);
        }
    }
    clock.advance(secs(50));
    assert!(kinds(&c, w).is_empty());
}

/// Eight threads load eight keys at once under `max_concurrent_loads(limit)`; the first
/// loader holds its permit until the limiter has counted `8 - limit` waits.
fn limited(limit: usize) -> Cache<u64, u64> {
    let _w = watchdog(LIMIT, "limited loads");
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(limit)
        .record_stats()
        .build();
    let start = Barrier::new(8);
    let expect = (8 - limit) as u64;
    std::thread::scope(|s| {
        for k in 0..8u64 {
            let (c, start) = (&c, &start);
            s.spawn(move || {
                start.wait();
                c.get_with(k, || {
                    while c.stats().loads_waited_for_limit < expect {
                        std::thread::yield_now();
                    }
                    k
                });
            });
        }
    });
    c
}

#[test]
fn load_limit_saturated() {
    let c = limited(1);
    match c.health_over(secs(60)).warnings() {
        [Warning::LoadLimitSaturated {
            limit,
            waited,
            loads,
        }] => assert_eq!((*limit, *waited, *loads), (1, 7, 8)),
        other => panic!("{other:?}"),
    }
    // Near miss: room for all eight.
    assert!(kinds(&limited(8), secs(60)).is_empty());
}

fn failing(n: u64, negative: bool) -> Cache<u64, u64> {
    failing_with(n, negative, false)
}

fn failing_with(n: u64, negative: bool, fail_safe: bool) -> Cache<u64, u64> {
    let mut b = Cache::builder().max_capacity(100);
    if negative {
        b = b.negative_ttl(secs(5));
    }
    if fail_safe {
        b = b.time_to_live(secs(5)).fail_safe(secs(60));
    }
    let c = b.build();
    for k in 0..n {
        let r: Result<u64, Arc<&str>> = c.try_get_with(k, || Err("down"));
        assert!(r.is_err());
    }
    c
}

#[test]
fn errors_without_negative_caching() {
    let c = failing(20, false);
    match c.health_over(secs(60)).warnings() {
        [Warning::ErrorsWithoutNegativeCaching { failures, loads }] => {
            assert_eq!((*failures, *loads), (20, 20))
        }
        other => panic!("{other:?}"),
    }
    // Near misses: negative caching on, or 15 failures.
    assert!(kinds(&failing(20, true), secs(60)).is_empty());
    assert!(kinds(&failing(15, false), secs(60)).is_empty());
    // Fail-safe protects only keys with an old value past its deadline: on keys that never
    // loaded it serves nothing, and each failing key is loaded on every call — the warning
    // stands (round 82). Near miss: fail-safe answering every failure with the old value.
    assert_eq!(
        kinds(&failing_with(20, false, true), secs(60)),
        ["errors_without_negative_caching"]
    );
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(5))
        .fail_safe(secs(60))
        .clock(clock.clone())
        .build();
    for k in 0..20 {
        let r: Result<u64, Arc<&str>> = c.try_get_with(k, || Ok(k));
        assert_eq!(r.ok(), Some(k));
    }
    clock.advance(secs(6));
    for k in 0..20 {
        let r: Result<u64, Arc<&str>> = c.try_get_with(k, || Err("down"));
        assert_eq!(r.ok(), Some(k), "fail-safe answers with the old value");
    }
    let h = c.health_over(secs(60));
    assert!(
        !kinds(&c, secs(60)).contains(&"errors_without_negative_caching"),
        "{h}"
    );
}

#[test]
fn serving_stale_while_it_lasts() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(10))
        .jitter(0.1)
        .fail_safe(secs(600))
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    clock.advance(secs(12));
    // Near miss: an expired key loaded from a healthy backend.
    assert_eq!(c.get_with(1, || 2), 2);
    let w = secs(10);
    assert!(kinds(&c, w).is_empty());
    clock.advance(secs(12));
    let r: Result<u64, Arc<&str>> = c.try_get_with(1, || Err("down"));
    assert_eq!(r.unwrap(), 2);
    match c.health_over(w).warnings() {
        [Warning::ServingStale { served }] => assert_eq!(*served, 1),
        other => panic!("{other:?}"),
    }
    // It clears once a window passes without stale answers.
    for _ in 0..12 {
        clock.advance(secs(2));
        c.health_over(w);
    }
    assert!(kinds(&c, w).is_empty());
}

#[test]
fn health_of_a_plain_cache_is_clean() {
    let c: Cache<u64, u64> = Cache::new(10);
    for k in 0..100 {
        c.insert(k, k);
    }
    let h = c.health();
    assert!(h.is_healthy(), "{h}");
}

/// Durations that are "never" or "nothing" are no deadlines and no thresholds: a refresh
/// period of `Duration::MAX` is no horizon for young evictions (100 entries, one evicted
/// every 17 s: they stay over half an hour, not under half the time to live of 3,600 s), and a
/// burst of writes on a cache of capacity 0 (nothing stays) is no expiry wave. Near misses:
/// the same churn under a time to live of 7,200 s and a refresh period of 6,000 s is
/// thrashing (entries stay under half the refresh period), the same burst on a cache that
/// keeps it is a wave.
#[test]
fn never_and_nothing_are_no_thresholds() {
    let churn_with = |ttl: Duration, refresh: Duration| {
        let clock = ManualClock::new();
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(ttl)
            .refresh_after(refresh)
            .clock(clock.clone())
            .record_stats()
            .loader(|k: &u64| Ok::<_, BoxError>(*k))
            .build();
        for k in 0..1000 {
            c.insert(k, k);
            clock.advance(secs(17));
        }
        c
    };
    // (A refresh period of `Duration::MAX` is not below the time to live:
    // refresh_never_happens, which is true.)
    assert_eq!(
        kinds(&churn_with(secs(3600), Duration::MAX), secs(20_000)),
        ["refresh_never_happens"]
    );
    assert_eq!(
        kinds(&churn_with(secs(7200), secs(6000)), secs(20_000)),
        ["thrashing"]
    );
    let burst = |capacity: u64| {
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(capacity)
            .time_to_live(secs(60))
            .clock(ManualClock::new())
            .build();
        for k in 0..200 {
            c.insert(k, k);
        }
        c
    };
    assert!(kinds(&burst(0), secs(60)).is_empty());
    assert_eq!(kinds(&burst(1000), secs(60)), ["synchronized_expiry"]);
}

/// Calls with a short window, however many, do not take from the default window its history:
/// `health()` every 10 s, with forty `health_over(1 s)` calls 250 ms apart in between (more
/// snapshots than are kept), still compares with a snapshot about a minute old.
#[test]
fn short_window_calls_keep_the_default_windows_history() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(600))
        .clock(clock.clone())
        .build();
    for round in 0..20 {
        let w = c.health().window();
        if round >= 8 {
            assert!(
                w >= secs(60) && w <= secs(60) + secs(20),
                "round {round}: window {w:?}"
            );
        }
        for _ in 0..40 {
            clock.advance(ms(250));
            let _ = c.health_over(secs(1));
        }
    }
}

/// The advice's durations: three significant digits, the unit and digits chosen after
/// rounding (to the nearest: the expiry wave's interval), at every unit boundary.
#[test]
fn warning_durations_have_three_significant_digits() {
    let shown = |ns: u64| {
        let w = Warning::SynchronizedExpiry {
            due: 100,
            share: 1.0,
            within: Duration::from_nanos(ns),
            in_: secs(1),
        };
        let s = w.to_string();
        let start = s.find("within ").unwrap() + "within ".len();
        s[start..s.find(" (in").unwrap()].to_string()
    };
    let cases = [
        (0, "0 ns"),
        (3, "3 ns"),
        (500, "500 ns"),
        (999, "999 ns"),
        (1_000, "1.00 µs"),
        (9_996, "10.0 µs"),
        (999_600, "1.00 ms"),
        (999_400, "999 µs"),
        (1_500_000, "1.50 ms"),
        (62_900_000, "62.9 ms"),
        (99_996_000, "100 ms"),
        (999_999_600, "1.00 s"),
        (1_500_000_000, "1.50 s"),
        (9_999_600_000, "10.0 s"),
        (99_960_000_000, "100 s"),
        (999_400_000_000, "999 s"),
        (999_600_000_000, "16.7 min"),
        (1_234_500_000_000, "20.6 min"),
        (86_400_000_000_000, "24.0 h"),
        (u64::MAX, "585 years"),
    ];
    for (ns, want) in cases {
        assert_eq!(shown(ns), want, "{ns} ns");
    }
}

/// Where the advice compares two durations, they are rounded so that the printed figures
/// compare as the exact ones do (round 98: "time to live (4.61 µs) < 4× the median load (1.15
/// µs)" for 4.607 µs and 1.152 µs, and 4 × 1.15 = 4.60): the time to live down and the load up;
/// `refresh_after` up and the time to live down.
#[test]
fn compared_durations_print_as_they_compare() {
    let ttl_load = Warning::TtlShorterThanLoads {
        ttl: Duration::from_nanos(4_607),
        p50_load: Duration::from_nanos(1_152),
        loads: 8,
    };
    assert!(
        ttl_load
            .to_string()
            .starts_with("time to live (4.60 µs) < 4× the median load (1.16 µs)"),
        "{ttl_load}"
    );
    let never = Warning::RefreshNeverHappens {
        refresh_after: Duration::from_nanos(999_999_001),
        ttl: Duration::from_nanos(999_999_001),
    };
    assert!(
        never
            .to_string()
            .starts_with("refresh_after (1.00 s) ≥ time to live (999 ms)"),
        "{never}"
    );
    // Exact values print exactly, whichever way they are rounded (4.6 µs, not 4.59).
    let exact = Warning::TtlShorterThanLoads {
        ttl: Duration::from_nanos(4_600),
        p50_load: Duration::from_nanos(1_150),
        loads: 8,
    };
    assert!(
        exact
            .to_string()
            .starts_with("time to live (4.60 µs) < 4× the median load (1.15 µs)"),
        "{exact}"
    );
}
