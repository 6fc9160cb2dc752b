//! Outside attack on stale-value handling: refresh-ahead, fail-safe, negative caching, soft
//! timeouts, jitter, early refresh, and their interplay with writes and faulty user code.

mod common;

use herdcache::{BoxError, Cache, Expiry, LoadError, ManualClock, RemovalCause};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn set_to(clock: &ManualClock, t: Duration) {
    let now = clock.elapsed();
    assert!(t >= now, "set_to goes forward only");
    clock.advance(t - now);
}

/// A spawner that parks its jobs until the test runs them. The jobs left when the test's
/// handle drops are dropped with it: they hold clones of the cache, which holds the spawner,
/// which holds them (a cycle the test made, which LeakSanitizer would report).
#[derive(Default)]
struct Parked(Arc<Mutex<Vec<Job>>>);

impl Drop for Parked {
    fn drop(&mut self) {
        let jobs = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        drop(jobs);
    }
}

impl Parked {
    fn spawner(&self) -> impl Fn(Job) + Send + Sync + 'static {
        let q = Arc::clone(&self.0);
        move |job| q.lock().unwrap().push(job)
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn run_all(&self) {
        let jobs: Vec<Job> = std::mem::take(&mut *self.0.lock().unwrap());
        for j in jobs {
            j();
        }
    }
}

type Log = Arc<Mutex<Vec<(u32, String, RemovalCause)>>>;

fn listener_log() -> (
    Log,
    impl Fn(&u32, &String, RemovalCause) + Send + Sync + 'static,
) {
    let log: Log = Arc::default();
    let l = Arc::clone(&log);
    (log, move |k: &u32, v: &String, c| {
        l.lock().unwrap().push((*k, v.clone(), c))
    })
}

fn check_miss_invariant(c: &Cache<u32, String>) {
    check_miss_invariant_plain(c, 0)
}

/// The documented miss ledger, `plain` being the misses of plain reads (`get`, `get_or_stale`),
/// which count their miss only.
fn check_miss_invariant_plain(c: &Cache<u32, String>, plain: u64) {
    let s = c.stats();
    assert_eq!(
        s.misses - plain + s.refreshes_started,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "miss ledger: {s:?}"
    );
}

// ---------------------------------------------------------------- refresh-ahead

#[test]
fn refresh_insert_during_parked_refresh_wins() {
    let _w = common::watchdog(secs(20), "refresh_insert_during_parked_refresh_wins");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(move |k: &u32| {
            Ok::<_, BoxError>(format!("{k} v{}", n2.fetch_add(1, Ordering::SeqCst)))
        })
        .build();
    assert_eq!(c.load(1).unwrap(), "1 v0");
    clock.advance(secs(20));
    assert_eq!(c.load(1).unwrap(), "1 v0");
    assert_eq!(parked.len(), 1, "one refresh job");
    c.insert(1, "written".into());
    parked.run_all();
    assert_eq!(
        c.get(&1).as_deref(),
        Some("written"),
        "the write wins over the refresh"
    );
    let s = c.stats();
    assert_eq!(s.refreshes_started, 1);
    assert_eq!(s.refreshes_succeeded + s.refreshes_failed, 1);
    assert_eq!(
        s.refreshes_failed, 1,
        "a refresh that lost to a write counts as failed"
    );
    assert_eq!(c.loads_in_flight(), 0);
    c.validate();
}

#[test]
fn refresh_invalidate_all_during_parked_refresh_wins() {
    let _w = common::watchdog(
        secs(20),
        "refresh_invalidate_all_during_parked_refresh_wins",
    );
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(move |k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    c.insert(2, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(c.get(&2).as_deref(), Some("old"));
    assert_eq!(parked.len(), 2);
    c.invalidate_all();
    parked.run_all();
    assert_eq!(c.get(&1), None, "invalidate_all wins over a refresh");
    assert_eq!(c.get(&2), None, "invalidate_all wins over a refresh");
    assert_eq!(c.entry_count(), 0);
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2);
    assert_eq!(s.refreshes_failed, 2);
    c.validate();
}

#[test]
fn refresh_invalidate_during_inline_refresh_wins() {
    let _w = common::watchdog(secs(20), "refresh_invalidate_during_inline_refresh_wins");
    let clock = ManualClock::new();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let entered_tx = Mutex::new(entered_tx);
    let block = Arc::new(AtomicBool::new(false));
    let b = Arc::clone(&block);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if b.load(Ordering::SeqCst) {
                entered_tx.lock().unwrap().send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
            Ok::<_, BoxError>(format!("{k} loaded"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    block.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let reader = std::thread::spawn(move || c2.load(1).unwrap());
    entered_rx.recv().unwrap();
    c.invalidate(&1);
    go_tx.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), "old");
    assert_eq!(
        c.get(&1),
        None,
        "an invalidation wins over the refresh it raced"
    );
    c.validate();
}

#[test]
fn racing_readers_start_one_refresh() {
    let _w = common::watchdog(secs(30), "racing_readers_start_one_refresh");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            c2.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            Ok::<_, BoxError>(format!("{k} loaded"))
        })
        .build();
    for round in 0..5u64 {
        c.insert(1, format!("old{round}"));
        clock.advance(secs(20));
        let before = calls.load(Ordering::SeqCst);
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                let b = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    b.wait();
                    c.load(1).unwrap()
                })
            })
            .collect();
        for h in hs {
            let v = h.join().unwrap();
            assert!(v == format!("old{round}") || v == "1 loaded", "{v}");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst) - before,
            1,
            "exactly one refresh"
        );
        assert_eq!(c.get(&1).as_deref(), Some("1 loaded"));
    }
    let s = c.stats();
    assert_eq!(s.refreshes_started, 5);
    assert_eq!(s.refreshes_succeeded, 5);
    c.validate();
}

#[test]
fn failed_refresh_backs_off_and_never_serves_past_ttl() {
    let _w = common::watchdog(secs(20), "failed_refresh_backs_off");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            c2.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    for _ in 0..4 {
        clock.advance(Duration::from_millis(1200));
        assert_eq!(c.load(1).unwrap(), "old");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "within the backoff: no refresh"
    );
    clock.advance(Duration::from_millis(300)); // 25.1 s
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "after the backoff: one more refresh"
    );
    set_to(&clock, secs(60) - Duration::from_nanos(1));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    set_to(&clock, secs(60));
    assert_eq!(c.get(&1), None, "never served past its time to live");
    assert!(c.load(1).is_err());
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed
    );
    c.validate();
}

// ---------------------------------------------------------------- jitter

#[test]
fn jitter_keeps_deadlines_within_bounds() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(secs(100))
        .jitter(0.2)
        .clock(clock.clone())
        .build();
    for k in 0..500 {
        c.insert(k, "v".into());
    }
    set_to(&clock, secs(80) - Duration::from_millis(1));
    assert_eq!(
        (0..500).filter(|k| c.get(k).is_some()).count(),
        500,
        "none before 0.8 × ttl"
    );
    set_to(&clock, secs(100));
    let alive = (0..500).filter(|k| c.contains_key(k)).count();
    assert!(
        alive > 50 && alive < 450,
        "spread around the nominal ttl: {alive}"
    );
    set_to(&clock, secs(120) + Duration::from_millis(1));
    assert_eq!(
        (0..500).filter(|k| c.get(k).is_some()).count(),
        0,
        "all by 1.2 × ttl"
    );
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 0);
    c.validate();
}

#[test]
fn jitter_spreads_refresh_within_bounds() {
    let _w = common::watchdog(secs(20), "jitter_spreads_refresh_within_bounds");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(secs(1000))
        .refresh_after(secs(100))
        .jitter(0.5)
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")))
        .build();
    for k in 0..200 {
        c.insert(k, "v".into());
    }
    set_to(&clock, secs(50) - Duration::from_millis(1));
    for k in 0..200 {
        assert!(c.get(&k).is_some());
    }
    assert_eq!(parked.len(), 0, "no refresh before 0.5 × refresh_after");
    set_to(&clock, secs(150) + Duration::from_millis(1));
    for k in 0..200 {
        assert!(c.get(&k).is_some());
    }
    assert_eq!(parked.len(), 200, "every key due by 1.5 × refresh_after");
    parked.run_all();
    assert_eq!(c.stats().refreshes_succeeded, 200);
    c.validate();
}

// ---------------------------------------------------------------- negative caching

#[test]
fn negative_ttl_remembers_load_failure() {
    let _w = common::watchdog(secs(20), "negative_ttl_remembers_load_failure");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicBool::new(false));
    let (c2, ok2) = (Arc::clone(&calls), Arc::clone(&ok));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(secs(10))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            c2.fetch_add(1, Ordering::SeqCst);
            if ok2.load(Ordering::SeqCst) {
                Ok(format!("{k}"))
            } else {
                Err(BoxError::from("down"))
            }
        })
        .build();
    let e1 = c.load(1).unwrap_err();
    let e2 = c.load(1).unwrap_err();
    match (&e1, &e2) {
        (LoadError::Loader(a), LoadError::Loader(b)) => assert!(Arc::ptr_eq(a, b)),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    ok.store(true, Ordering::SeqCst);
    // get_with has no way to answer a failure: it loads.
    assert_eq!(c.get_with(1, || "gw".to_string()), "gw");
    c.invalidate(&1);
    // a write or invalidation ends it early
    assert_eq!(c.load(1).unwrap(), "1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    c.invalidate(&1);
    ok.store(false, Ordering::SeqCst);
    assert!(c.load(1).is_err());
    clock.advance(secs(10) - Duration::from_nanos(1));
    assert!(c.load(1).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    clock.advance(Duration::from_nanos(1));
    assert!(c.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "loads again once negative_ttl passed"
    );
    check_miss_invariant(&c);
    assert_eq!(c.get(&1), None);
    c.validate();
}

#[test]
fn negative_ttl_optionally_get_with_none() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(secs(10))
        .record_stats()
        .clock(clock.clone())
        .build();
    let calls = AtomicUsize::new(0);
    assert_eq!(
        c.optionally_get_with(1, || {
            calls.fetch_add(1, Ordering::SeqCst);
            None
        }),
        None
    );
    assert_eq!(
        c.optionally_get_with(1, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Some("x".into())
        }),
        None,
        "None remembered"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!c.contains_key(&1));
    assert_eq!(c.iter().count(), 0);
    assert_eq!(c.entry_count(), 0, "a negative entry is not an entry");
    assert_eq!(c.get_with(1, || "gw".to_string()), "gw");
    assert_eq!(c.get(&1).as_deref(), Some("gw"));
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn negative_ttl_with_refresh_failure_then_expiry() {
    let _w = common::watchdog(secs(20), "negative_ttl_with_refresh_failure_then_expiry");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(30))
        .refresh_after(secs(10))
        .negative_ttl(secs(100))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            c2.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(
        c.load(1).unwrap(),
        "old",
        "refresh failure keeps the old value"
    );
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    c.insert(1, "new".into()); // a write ends the negative entry
    clock.advance(secs(31));
    let before = calls.load(Ordering::SeqCst);
    assert!(c.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "the write ended the remembered failure"
    );
    c.validate();
}

// ---------------------------------------------------------------- fail-safe

fn fail_safe_cache(
    clock: &ManualClock,
    down: &Arc<AtomicBool>,
    calls: &Arc<AtomicUsize>,
) -> Cache<u32, String> {
    let (d, n) = (Arc::clone(down), Arc::clone(calls));
    Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(format!("value {k}"))
            }
        })
        .build()
}

#[test]
fn fail_safe_serves_stale_with_one_retry_per_backoff() {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = fail_safe_cache(&clock, &down, &calls);
    assert_eq!(c.load(1).unwrap(), "value 1");
    down.store(true, Ordering::SeqCst);
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), "value 1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    for _ in 0..10 {
        assert_eq!(c.load(1).unwrap(), "value 1");
        assert_eq!(c.get_with(1, || "init".into()), "value 1");
        assert_eq!(
            c.try_get_with(1, || Err::<String, _>("e")).unwrap(),
            "value 1"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "no load within the backoff"
    );
    assert_eq!(c.get(&1), None);
    assert!(!c.contains_key(&1));
    assert_eq!(c.iter().count(), 0, "iteration never sees a stale entry");
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("value 1"));
    clock.advance(secs(5));
    assert_eq!(c.load(1).unwrap(), "value 1");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one retry after the backoff"
    );
    down.store(false, Ordering::SeqCst);
    clock.advance(secs(5));
    assert_eq!(c.load(1).unwrap(), "value 1");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(
        c.get(&1).as_deref(),
        Some("value 1"),
        "the healthy value is live again"
    );
    check_miss_invariant_plain(&c, 2); // one get, one get_or_stale missed
    c.validate();
}

#[test]
fn fail_safe_never_beyond_max_stale() {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = fail_safe_cache(&clock, &down, &calls);
    assert_eq!(c.load(1).unwrap(), "value 1");
    down.store(true, Ordering::SeqCst);
    set_to(&clock, secs(60 + 600) - Duration::from_nanos(1));
    assert_eq!(c.load(1).unwrap(), "value 1");
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("value 1"));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), None, "never beyond max_stale");
    assert!(c.load(1).is_err());
    assert_eq!(c.get_with(1, || "gw".into()), "gw");
    c.validate();
}

#[test]
fn fail_safe_optionally_none_removes_stale_for_good() {
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    assert_eq!(c.optionally_get_with(1, || None), None);
    assert_eq!(
        c.get_or_stale(&1),
        None,
        "None removes the old value for good"
    );
    assert_eq!(c.get_with(1, || panic_free("x")), "x");
    let l = log.lock().unwrap();
    let olds: Vec<_> = l.iter().filter(|(_, v, _)| v == "old").collect();
    assert_eq!(olds.len(), 1, "old reported once: {l:?}");
    drop(l);
    c.validate();
}

fn panic_free(s: &str) -> String {
    s.to_string()
}

#[test]
fn fail_safe_get_all_missing_key_falls_back() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .build();
    c.insert(1, "old1".into());
    c.insert(2, "old2".into());
    clock.advance(secs(61));
    let all = c.get_all([1, 2, 3], |missing| {
        let mut m: Vec<u32> = missing.to_vec();
        m.sort();
        assert_eq!(m, [1, 2, 3]);
        HashMap::from([(1, "new1".to_string())])
    });
    assert_eq!(all.get(&1).map(String::as_str), Some("new1"));
    assert_eq!(
        all.get(&2).map(String::as_str),
        Some("old2"),
        "missing key falls back"
    );
    assert_eq!(all.get(&3), None);
    assert_eq!(c.get(&2), None);
    // within the backoff: the stale value answers without a load
    let all = c.get_all([2], |_| panic!("no load within the backoff"));
    assert_eq!(all.get(&2).map(String::as_str), Some("old2"));
    c.validate();
}

#[test]
fn fail_safe_with_time_to_idle() {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (d, n) = (Arc::clone(&down), Arc::clone(&calls));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(secs(10))
        .fail_safe(secs(100))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(format!("value {k}"))
            }
        })
        .build();
    assert_eq!(c.load(1).unwrap(), "value 1");
    down.store(true, Ordering::SeqCst);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), None);
    assert_eq!(c.load(1).unwrap(), "value 1", "stale after idle");
    assert_eq!(
        c.get(&1),
        None,
        "a fail-safe answer does not revive the entry"
    );
    clock.advance(secs(1));
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("value 1"));
    assert_eq!(c.get(&1), None);
    // max_stale is counted from the idle deadline (11 s after the read at 0 is 10 s): gone at 110 s
    set_to(&clock, secs(110) - Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("value 1"));
    set_to(&clock, secs(110));
    assert_eq!(
        c.get_or_stale(&1),
        None,
        "reads of a stale value do not move its idle deadline"
    );
    c.validate();
}

// ---------------------------------------------------------------- soft timeouts

#[test]
fn load_timeout_serves_stale_then_load_fills() {
    let _w = common::watchdog(secs(20), "load_timeout_serves_stale_then_load_fills");
    let clock = ManualClock::new();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let block = Arc::new(AtomicBool::new(false));
    let b = Arc::clone(&block);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .load_timeout(Duration::from_millis(50))
        .record_stats()
        .clock(clock.clone())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u32| {
            if b.load(Ordering::SeqCst) {
                go_rx.lock().unwrap().recv().unwrap();
            }
            Ok::<_, BoxError>(format!("{k} fresh"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    block.store(true, Ordering::SeqCst);
    assert_eq!(c.load(1).unwrap(), "old", "timeout: the stale value");
    assert_eq!(
        c.load(1).unwrap(),
        "old",
        "still loading: the stale value at once"
    );
    assert_eq!(
        c.load(2).err().map(|e| e.to_string()),
        Some(LoadError::Timeout.to_string())
    );
    let s = c.stats();
    // the second load(1) is answered by fail-safe at once (within the retry backoff)
    assert_eq!(s.timeouts, 2, "{s:?}");
    assert_eq!(s.stale_served_after_ttl, 2, "{s:?}");
    go_tx.send(()).unwrap();
    go_tx.send(()).unwrap();
    assert!(common::eventually(|| c.get(&1).is_some()));
    assert_eq!(c.get(&1).as_deref(), Some("1 fresh"));
    assert!(common::eventually(|| c.get(&2).is_some()));
    assert!(common::eventually(|| c.loads_in_flight() == 0));
    c.validate();
}

#[test]
fn load_timeout_spawner_drops_job_falls_back_inline() {
    let _w = common::watchdog(secs(20), "load_timeout_spawner_drops_job");
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .load_timeout(secs(5))
        .record_stats()
        .spawner(drop)
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")))
        .build();
    assert_eq!(c.load(1).unwrap(), "1");
    assert_eq!(c.get(&1).as_deref(), Some("1"));
    assert_eq!(c.loads_in_flight(), 0);
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn load_timeout_spawner_panics_falls_back_inline() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "load_timeout_spawner_panics");
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .load_timeout(secs(5))
        .record_stats()
        .spawner(|_job| panic!("injected spawner panic"))
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")))
        .build();
    assert_eq!(c.load(1).unwrap(), "1");
    assert_eq!(c.loads_in_flight(), 0);
    check_miss_invariant(&c);
    c.validate();
}

// ---------------------------------------------------------------- spawner faults on refresh

#[test]
fn refresh_spawner_drops_job_retried_after_backoff() {
    let _w = common::watchdog(secs(20), "refresh_spawner_drops_job");
    let clock = ManualClock::new();
    let spawned = Arc::new(AtomicUsize::new(0));
    let drop_it = Arc::new(AtomicBool::new(true));
    let (s2, d2) = (Arc::clone(&spawned), Arc::clone(&drop_it));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .spawner(move |job| {
            s2.fetch_add(1, Ordering::SeqCst);
            if !d2.load(Ordering::SeqCst) {
                job();
            }
        })
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(spawned.load(Ordering::SeqCst), 1);
    assert_eq!(c.loads_in_flight(), 0, "a dropped job releases the key");
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(
        spawned.load(Ordering::SeqCst),
        1,
        "retried only after the backoff"
    );
    clock.advance(secs(3));
    drop_it.store(false, Ordering::SeqCst);
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(spawned.load(Ordering::SeqCst), 2);
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2);
    assert_eq!(s.refreshes_succeeded, 1);
    assert_eq!(s.refreshes_failed, 1);
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn refresh_spawner_panics_reader_unharmed() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "refresh_spawner_panics");
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .spawner(|_job| panic!("injected spawner panic"))
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(c.loads_in_flight(), 0);
    clock.advance(secs(41));
    // expired: load runs inline (no timeout)
    assert_eq!(c.load(1).unwrap(), "1 new");
    check_miss_invariant(&c);
    c.validate();
}

// ---------------------------------------------------------------- loader faults

#[test]
fn refresh_loader_panic_keeps_old_value_and_backs_off() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "refresh_loader_panic");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| -> Result<String, BoxError> {
            n.fetch_add(1, Ordering::SeqCst);
            panic!("injected loader panic")
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(secs(3));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    clock.advance(secs(40)); // expired
    assert!(matches!(c.load(1), Err(LoadError::Panicked)));
    assert!(
        matches!(c.load(1), Err(LoadError::Panicked)),
        "within the backoff: no call"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed
    );
    c.validate();
}

#[test]
fn blocked_loader_does_not_block_other_keys_and_waiters_join() {
    let _w = common::watchdog(secs(20), "blocked_loader");
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            if *k == 1 {
                go_rx.lock().unwrap().recv().unwrap();
            }
            Ok::<_, BoxError>(format!("{k}"))
        })
        .build();
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || c.load(1).unwrap())
        })
        .collect();
    assert!(common::eventually(|| c.loads_in_flight() == 1));
    assert_eq!(c.load(2).unwrap(), "2");
    assert!(matches!(
        c.load_with_timeout(1, Some(Duration::from_millis(20))),
        Err(LoadError::Timeout)
    ));
    go_tx.send(()).unwrap();
    for h in hs {
        assert_eq!(h.join().unwrap(), "1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    check_miss_invariant(&c);
    c.validate();
}

// ---------------------------------------------------------------- Expiry with refresh / fail-safe

struct Recorder {
    updates: Arc<Mutex<Vec<Option<Duration>>>>,
    create: Duration,
    update_to: Option<Duration>,
}

impl Expiry<u32, String> for Recorder {
    fn expire_after_create(&self, _k: &u32, _v: &String) -> Option<Duration> {
        Some(self.create)
    }
    fn expire_after_update(
        &self,
        _k: &u32,
        _v: &String,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        self.updates.lock().unwrap().push(remaining);
        self.update_to.or(remaining)
    }
}

#[test]
fn refresh_calls_expire_after_update_with_remaining() {
    let _w = common::watchdog(secs(20), "refresh_calls_expire_after_update");
    let clock = ManualClock::new();
    let updates = Arc::new(Mutex::new(Vec::new()));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(Recorder {
            updates: Arc::clone(&updates),
            create: secs(30),
            update_to: None,
        })
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    assert_eq!(*updates.lock().unwrap(), vec![Some(secs(10))]);
    set_to(&clock, secs(30) - Duration::from_nanos(1));
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    set_to(&clock, secs(30));
    assert_eq!(
        c.get(&1),
        None,
        "the custom deadline was kept by the update hook"
    );
    c.validate();
}

#[test]
fn refresh_with_expiry_update_to_zero_removes() {
    let _w = common::watchdog(secs(20), "refresh_with_expiry_update_to_zero");
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(Recorder {
            updates: Arc::default(),
            create: secs(30),
            update_to: Some(Duration::ZERO),
        })
        .refresh_after(secs(10))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(c.get(&1), None, "updated to live 0: gone");
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 0);
    let l = log.lock().unwrap().clone();
    // "old" replaced by the refresh, "1 new" expired at once
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(
        l.contains(&(1, "old".into(), RemovalCause::Replaced)),
        "{l:?}"
    );
    assert!(
        l.contains(&(1, "1 new".into(), RemovalCause::Expired)),
        "{l:?}"
    );
    c.validate();
}

struct PanicOnUpdate(Arc<AtomicBool>);
impl Expiry<u32, String> for PanicOnUpdate {
    fn expire_after_create(&self, _k: &u32, _v: &String) -> Option<Duration> {
        Some(secs(60))
    }
    fn expire_after_update(&self, _k: &u32, _v: &String, r: Option<Duration>) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) {
            panic!("injected expiry panic");
        }
        r
    }
}

#[test]
fn refresh_with_panicking_expiry_keeps_old_value() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "refresh_with_panicking_expiry");
    let clock = ManualClock::new();
    let boom = Arc::new(AtomicBool::new(true));
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(PanicOnUpdate(Arc::clone(&boom)))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .spawner(parked.spawner())
        .clock(clock.clone())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    let jobs: Vec<Job> = std::mem::take(&mut *parked.0.lock().unwrap());
    assert_eq!(jobs.len(), 1);
    for j in jobs {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(j));
        assert!(r.is_err(), "the hook's panic goes on");
    }
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(parked.len(), 0, "due again only after the backoff");
    assert_eq!(c.loads_in_flight(), 0);
    boom.store(false, Ordering::SeqCst);
    clock.advance(secs(3));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2);
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed
    );
    c.validate();
}

#[test]
fn fail_safe_with_custom_expiry() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(Recorder {
            updates: Arc::default(),
            create: secs(30),
            update_to: None,
        })
        .fail_safe(secs(100))
        .record_stats()
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(31));
    assert_eq!(c.get(&1), None);
    let r: Result<String, Arc<&str>> = c.try_get_with(1, || Err("down"));
    assert_eq!(r.unwrap(), "old");
    set_to(&clock, secs(130));
    assert_eq!(c.get_or_stale(&1), None);
    c.validate();
}

// ---------------------------------------------------------------- early refresh

#[test]
fn early_refresh_fires_near_expiry_for_slow_keys() {
    let _w = common::watchdog(secs(20), "early_refresh_fires");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (n, cl) = (Arc::clone(&calls), clock.clone());
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(1000))
        .early_refresh(1.0)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            cl.advance(secs(10)); // a slow load: δ = 10 s
            Ok::<_, BoxError>(format!("{k} v{}", n.fetch_add(1, Ordering::SeqCst)))
        })
        .build();
    assert_eq!(c.load(1).unwrap(), "1 v0"); // stored at t = 10 s, expires at 1010 s
    set_to(&clock, secs(100));
    for _ in 0..20 {
        c.load(1).unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "remaining 910 s: p = e^-91, no refresh"
    );
    set_to(&clock, secs(1009));
    let mut reads = 0;
    while calls.load(Ordering::SeqCst) == 1 && reads < 100 {
        c.load(1).unwrap();
        reads += 1;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "remaining 1 s, δ 10 s: refreshed"
    );
    assert!(c.get(&1).is_some());
    let s = c.stats();
    assert_eq!(s.refreshes_started, 1);
    c.validate();
}

// ---------------------------------------------------------------- batch 2: races and joins

/// A loader gate: `load` blocks in the loader for keys while `armed`, signalling entry.
#[derive(Clone)]
struct Gate {
    armed: Arc<AtomicBool>,
    entered: Arc<Mutex<std::sync::mpsc::Sender<u32>>>,
    go: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}

fn gate() -> (
    Gate,
    std::sync::mpsc::Receiver<u32>,
    std::sync::mpsc::Sender<()>,
) {
    let (etx, erx) = std::sync::mpsc::channel();
    let (gtx, grx) = std::sync::mpsc::channel();
    (
        Gate {
            armed: Arc::new(AtomicBool::new(false)),
            entered: Arc::new(Mutex::new(etx)),
            go: Arc::new(Mutex::new(grx)),
        },
        erx,
        gtx,
    )
}

impl Gate {
    fn pass(&self, k: u32) {
        if self.armed.load(Ordering::SeqCst) {
            self.entered.lock().unwrap().send(k).unwrap();
            self.go.lock().unwrap().recv().unwrap();
        }
    }
}

#[test]
fn fail_safe_insert_during_failing_load_no_old_value() {
    let _w = common::watchdog(secs(20), "fail_safe_insert_during_failing_load");
    let clock = ManualClock::new();
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            g2.pass(*k);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    c.insert(2, "old".into());
    clock.advance(secs(61));
    g.armed.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let t = std::thread::spawn(move || c2.load(1));
    entered.recv().unwrap();
    c.insert(1, "written".into());
    go.send(()).unwrap();
    let r = t.join().unwrap();
    assert!(
        !matches!(&r, Ok(v) if v == "old"),
        "a write ends the stale value: {r:?}"
    );
    assert_eq!(c.get(&1).as_deref(), Some("written"));
    let c2 = c.clone();
    let t = std::thread::spawn(move || c2.load(2));
    entered.recv().unwrap();
    c.invalidate(&2);
    go.send(()).unwrap();
    let r = t.join().unwrap();
    assert!(r.is_err(), "an invalidation ends the stale value: {r:?}");
    assert_eq!(c.get_or_stale(&2), None);
    c.validate();
}

#[test]
fn refresh_invalidate_then_insert_during_parked_refresh() {
    let _w = common::watchdog(secs(20), "refresh_invalidate_then_insert");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} refreshed")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    c.invalidate(&1);
    c.insert(1, "w2".into());
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("w2"));
    // and the new entry is not due for 10 s
    clock.advance(secs(9));
    assert_eq!(c.get(&1).as_deref(), Some("w2"));
    assert_eq!(parked.len(), 0);
    clock.advance(secs(1));
    assert_eq!(c.get(&1).as_deref(), Some("w2"));
    assert_eq!(parked.len(), 1, "the new entry is due 10 s after its write");
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("1 refreshed"));
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2);
    assert_eq!((s.refreshes_succeeded, s.refreshes_failed), (1, 1));
    c.validate();
}

#[test]
fn expired_during_parked_refresh_joiner_not_stranded_when_job_dropped() {
    let _w = common::watchdog(secs(20), "expired_during_parked_refresh");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(parked.len(), 1);
    clock.advance(secs(41)); // expired, refresh job still parked
    let c2 = c.clone();
    let t = common::start(move || c2.load(1));
    std::thread::sleep(Duration::from_millis(50));
    // drop the job unrun: the joiner must load itself
    drop(std::mem::take(&mut *parked.0.lock().unwrap()));
    let r = t.wait(secs(5)).expect("joiner not stranded").unwrap();
    assert_eq!(r.unwrap(), "1 new");
    assert_eq!(c.loads_in_flight(), 0);
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn expired_during_failing_refresh_joiner_gets_fail_safe_value() {
    let _w = common::watchdog(secs(20), "expired_during_failing_refresh");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|_k: &u32| Err::<String, _>(BoxError::from("down")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    clock.advance(secs(41));
    let c2 = c.clone();
    let t = common::start(move || c2.load(1));
    assert!(common::eventually(|| c.stats().coalesced
        + c.stats().misses
        >= 1));
    std::thread::sleep(Duration::from_millis(50));
    parked.run_all();
    let r = t.wait(secs(5)).expect("not stranded").unwrap();
    assert_eq!(
        r.unwrap(),
        "old",
        "fail-safe answers the joiner of a failed refresh"
    );
    let s = c.stats();
    assert_eq!(s.stale_served_after_ttl, 1, "{s:?}");
    c.validate();
}

#[test]
fn refresh_deferred_by_full_limit_is_not_lost() {
    let _w = common::watchdog(secs(20), "refresh_deferred_by_full_limit");
    let clock = ManualClock::new();
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if *k == 2 {
                g2.pass(*k);
            }
            Ok::<_, BoxError>(format!("{k} new"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    g.armed.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let t = std::thread::spawn(move || c2.load(2).unwrap());
    entered.recv().unwrap();
    assert_eq!(c.get(&1).as_deref(), Some("old")); // refresh deferred (limit full)
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    go.send(()).unwrap();
    assert_eq!(t.join().unwrap(), "2 new");
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(
        c.get(&1).as_deref(),
        Some("1 new"),
        "a later read refreshes"
    );
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    c.validate();
}

#[test]
fn negative_ttl_with_fail_safe_prefers_stale_and_retries() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .negative_ttl(secs(100))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(secs(5));
    assert_eq!(
        c.load(1).unwrap(),
        "old",
        "stale value, not a remembered error"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried after the backoff");
    assert_eq!(c.get_with(1, || "gw".into()), "old");
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn negative_ttl_refresh_failure_with_fail_safe_then_expiry() {
    let _w = common::watchdog(secs(20), "negative_ttl_refresh_failure_with_fail_safe");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .negative_ttl(secs(1000))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.load(1).unwrap(), "old");
    clock.advance(secs(41));
    assert_eq!(
        c.load(1).unwrap(),
        "old",
        "failed refresh not remembered with fail-safe"
    );
    let s = c.stats();
    assert_eq!(s.negative_hits, 0, "{s:?}");
    c.validate();
}

#[test]
fn refresh_of_too_heavy_value_removes_key() {
    let _w = common::watchdog(secs(20), "refresh_of_too_heavy_value");
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .weigher(|_k: &u32, v: &String| v.len() as u32)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .loader(|_k: &u32| Ok::<_, BoxError>("x".repeat(500)))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(c.get(&1), None, "a too-heavy refresh removes the key");
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
    let s = c.stats();
    assert_eq!(s.refreshes_succeeded, 1, "{s:?}");
    let l = log.lock().unwrap().clone();
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l.iter().any(|(_, v, _)| v == "old"), "{l:?}");
    assert!(
        l.iter()
            .any(|(_, v, c)| v.len() == 500 && *c == RemovalCause::Size),
        "{l:?}"
    );
    c.validate();
}

#[test]
fn get_with_if_rejecting_due_value_no_refresh_and_loads_once() {
    let _w = common::watchdog(secs(20), "get_with_if_due");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} refreshed")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    let v = c.get_with_if(1, || "replaced".to_string(), |v| v == "old");
    assert_eq!(v, "replaced");
    assert_eq!(parked.len(), 0, "a rejected value is not read: no refresh");
    assert_eq!(c.get(&1).as_deref(), Some("replaced"));
    assert_eq!(parked.len(), 0, "the replacement is fresh");
    let v = c.get_with_if(1, || unreachable!(), |_| false);
    assert_eq!(v, "replaced");
    c.validate();
}

#[test]
fn get_all_on_due_and_stale_and_negative_keys() {
    let _w = common::watchdog(secs(20), "get_all_mixed");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .negative_ttl(secs(100))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|_k: &u32| Err::<String, _>(BoxError::from("down")))
        .build();
    assert!(c.load(3).is_err()); // negative entry for 3
    c.insert(1, "due".into());
    clock.advance(secs(20));
    let all = c.get_all([1, 2, 3], |missing| {
        let mut m = missing.to_vec();
        m.sort();
        assert_eq!(
            m,
            [2, 3],
            "3 is loaded again by get_all despite its negative entry"
        );
        missing.iter().map(|&k| (k, format!("{k} all"))).collect()
    });
    assert_eq!(all.len(), 3);
    assert_eq!(all[&1], "due");
    assert_eq!(all[&3], "3 all");
    assert_eq!(c.get(&3).as_deref(), Some("3 all"));
    assert_eq!(c.load(3).unwrap(), "3 all");
    c.validate();
}

// ---------------------------------------------------------------- batch 3: causes of stale entries

fn causes_after(
    fail_safe: bool,
    op: &dyn Fn(&Cache<u32, String>),
) -> Vec<(u32, String, RemovalCause)> {
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} loaded")));
    if fail_safe {
        b = b.fail_safe(secs(600));
    }
    let c: Cache<u32, String> = b.build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    op(&c);
    c.validate();
    let l = log.lock().unwrap().clone();
    l
}

type CacheOp = Box<dyn Fn(&Cache<u32, String>)>;

#[test]
fn stale_entry_removals_are_reported_expired() {
    let ops: Vec<(&str, CacheOp)> = vec![
        ("insert", Box::new(|c| c.insert(1, "w".into()))),
        ("invalidate", Box::new(|c| c.invalidate(&1))),
        ("load", Box::new(|c| drop(c.load(1)))),
        (
            "get_with",
            Box::new(|c| drop(c.get_with(1, || "gw".into()))),
        ),
        (
            "optionally_none",
            Box::new(|c| drop(c.optionally_get_with(1, || None))),
        ),
        ("invalidate_all", Box::new(|c| c.invalidate_all())),
        ("run_pending", Box::new(|c| c.run_pending_tasks())),
    ];
    let expired = vec![(1, "old".to_string(), RemovalCause::Expired)];
    for (name, op) in &ops {
        let a = causes_after(false, op.as_ref());
        let b = causes_after(true, op.as_ref());
        // without fail-safe, an optionally_ None leaves the expired entry to the reclaim;
        // with it, the stale value is kept until max_stale (run_pending_tasks keeps it)
        let want_a = if *name == "optionally_none" {
            vec![]
        } else {
            expired.clone()
        };
        let want_b = if *name == "run_pending" {
            vec![]
        } else {
            expired.clone()
        };
        assert_eq!(a, want_a, "{name} without fail-safe");
        assert_eq!(b, want_b, "{name} with fail-safe");
    }
}

#[test]
fn fail_safe_racing_retry_runs_one_load() {
    let _w = common::watchdog(secs(30), "fail_safe_racing_retry_runs_one_load");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(10));
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    for round in 1..=5 {
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                let b = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    b.wait();
                    c.load(1)
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap(), "old");
        }
        assert_eq!(calls.load(Ordering::SeqCst), round, "one load per backoff");
        clock.advance(secs(5));
    }
    check_miss_invariant(&c);
    let s = c.stats();
    // "callers that waited on one failed load count once"
    assert!(
        s.stale_served_after_ttl >= 5 && s.stale_served_after_ttl <= 40,
        "{s:?}"
    );
    c.validate();
}

#[test]
fn tti_with_jitter_reads_keep_entries_alive() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10_000)
        .time_to_idle(secs(100))
        .jitter(0.2)
        .clock(clock.clone())
        .build();
    for k in 0..300 {
        c.insert(k, "v".into());
    }
    for _ in 0..10 {
        clock.advance(secs(79));
        for k in 0..300 {
            assert!(c.get(&k).is_some(), "read every 79 s < 0.8 × tti: alive");
        }
    }
    clock.advance(secs(120) + Duration::from_millis(1));
    assert_eq!(
        (0..300).filter(|k| c.contains_key(k)).count(),
        0,
        "idle 1.2 × tti: gone"
    );
    c.validate();
}

/// A value whose `Clone` panics while `BOOM` is set.
#[derive(Debug, PartialEq, Eq)]
struct Brittle(String);
static BOOM: AtomicBool = AtomicBool::new(false);
static BRITTLE_LOCK: Mutex<()> = Mutex::new(());
impl Clone for Brittle {
    fn clone(&self) -> Self {
        if BOOM.load(Ordering::SeqCst) {
            panic!("injected clone panic");
        }
        Brittle(self.0.clone())
    }
}

#[test]
fn clone_panic_in_fail_safe_fallback_strands_nobody() {
    common::quiet_injected_panics();
    let _g = BRITTLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(20), "clone_panic_in_fail_safe_fallback");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, Brittle> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<Brittle, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, Brittle("old".into()));
    clock.advance(secs(61));
    BOOM.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.load(1)));
    BOOM.store(false, Ordering::SeqCst);
    assert!(r.is_err(), "the clone's panic reaches the caller");
    assert_eq!(c.loads_in_flight(), 0);
    let r = common::within(secs(5), {
        let c = c.clone();
        move || c.load(1)
    })
    .expect("no hang after a clone panic")
    .unwrap();
    assert_eq!(r.unwrap(), Brittle("old".into()));
    assert!(calls.load(Ordering::SeqCst) <= 2);
    c.validate();
}

#[test]
fn clone_panic_on_refresh_due_read_keeps_refresh_alive() {
    common::quiet_injected_panics();
    let _g = BRITTLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(20), "clone_panic_on_refresh_due_read");
    let clock = ManualClock::new();
    let parked = Arc::new(Mutex::new(Vec::<Job>::new()));
    let p2 = Arc::clone(&parked);
    let c: Cache<u32, Brittle> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .spawner(move |j| p2.lock().unwrap().push(j))
        .loader(|k: &u32| Ok::<_, BoxError>(Brittle(format!("{k} new"))))
        .build();
    c.insert(1, Brittle("old".into()));
    clock.advance(secs(20));
    BOOM.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.get(&1)));
    BOOM.store(false, Ordering::SeqCst);
    assert!(r.is_err());
    // the refresh was either started or given back: not lost for longer than a backoff
    clock.advance(secs(3));
    assert_eq!(c.get(&1), Some(Brittle("old".into())));
    let jobs: Vec<Job> = std::mem::take(&mut *parked.lock().unwrap());
    assert!(!jobs.is_empty(), "a refresh was started");
    for j in jobs {
        j();
    }
    assert_eq!(c.get(&1), Some(Brittle("1 new".into())));
    assert_eq!(c.loads_in_flight(), 0);
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    c.validate();
}

// ---------------------------------------------------------------- batch 4: async

type Fut = herdcache::BoxFuture<()>;

/// As [`Parked`], for futures (and dropping what is left the same way).
#[derive(Default)]
struct ParkedFuts(Arc<Mutex<Vec<Fut>>>);

impl Drop for ParkedFuts {
    fn drop(&mut self) {
        let futs = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        drop(futs);
    }
}

impl ParkedFuts {
    fn spawner(&self) -> impl Fn(Fut) + Send + Sync + 'static {
        let q = Arc::clone(&self.0);
        move |f| q.lock().unwrap().push(f)
    }
    fn take(&self) -> Vec<Fut> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn run_all(&self) {
        for f in self.take() {
            futures::executor::block_on(f);
        }
    }
}

fn async_refresh_cache(
    clock: &ManualClock,
    parked: &ParkedFuts,
    fail: &Arc<AtomicBool>,
    calls: &Arc<AtomicUsize>,
) -> Cache<u32, String> {
    let (f, n) = (Arc::clone(fail), Arc::clone(calls));
    Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .future_spawner(parked.spawner())
        .async_loader(move |k: &u32| {
            let k = *k;
            let fail = f.load(Ordering::SeqCst);
            let v = n.fetch_add(1, Ordering::SeqCst);
            async move {
                common::Yield(2).await;
                if fail {
                    Err(BoxError::from("down"))
                } else {
                    Ok(format!("{k} v{v}"))
                }
            }
        })
        .build()
}

#[test]
fn async_refresh_write_wins() {
    let _w = common::watchdog(secs(20), "async_refresh_write_wins");
    let clock = ManualClock::new();
    let parked = ParkedFuts::default();
    let (fail, calls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let c = async_refresh_cache(&clock, &parked, &fail, &calls);
    c.insert(1, "old".into());
    c.insert(2, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(c.get(&2).as_deref(), Some("old"));
    c.insert(1, "written".into());
    c.invalidate(&2);
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("written"));
    assert_eq!(c.get(&2), None);
    let s = c.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (2, 2), "{s:?}");
    c.validate();
}

#[test]
fn async_refresh_future_dropped_retried_after_backoff() {
    let _w = common::watchdog(secs(20), "async_refresh_future_dropped");
    let clock = ManualClock::new();
    let parked = ParkedFuts::default();
    let (fail, calls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let c = async_refresh_cache(&clock, &parked, &fail, &calls);
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    // poll once (the loader starts), then drop it mid-flight
    let mut futs = parked.take();
    assert_eq!(futs.len(), 1);
    {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(futs[0].as_mut().poll(&mut cx).is_pending());
    }
    drop(futs);
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(parked.0.lock().unwrap().len(), 0, "not before the backoff");
    clock.advance(secs(3));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    parked.run_all();
    assert!(c.get(&1).unwrap().starts_with("1 v"));
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    c.validate();
}

#[test]
fn async_refresh_failure_backs_off_then_expiry_load_async_errs() {
    let _w = common::watchdog(secs(20), "async_refresh_failure");
    let clock = ManualClock::new();
    let parked = ParkedFuts::default();
    let (fail, calls) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicUsize::new(0)),
    );
    let c = async_refresh_cache(&clock, &parked, &fail, &calls);
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(futures::executor::block_on(c.load_async(1)).unwrap(), "old");
    parked.run_all();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(futures::executor::block_on(c.load_async(1)).unwrap(), "old");
    assert_eq!(parked.0.lock().unwrap().len(), 0);
    clock.advance(secs(41));
    assert!(futures::executor::block_on(c.load_async(1)).is_err());
    fail.store(false, Ordering::SeqCst);
    assert!(futures::executor::block_on(c.load_async(1))
        .unwrap()
        .starts_with("1 v"));
    c.validate();
}

#[test]
// BUG. Docs (src/cache/fail_safe.rs module docs): "A load fails — ..., an abandoned async
// leader, ... — while the old value is within its stale window: every caller of that load
// gets the old value instead of the error (Ok), and the key's retry deadline is set
// refresh_backoff ahead. ... Until the retry deadline, callers of the key get the old value
// at once, with no load." (builder `fail_safe`: "... an abandoned leader ... the key is
// retried after refresh_backoff by one caller (the others get the last value meanwhile, with
// no load)"). A cancelled `get_with_async` leader does start the backoff; a cancelled
// `load_async` / `get_with_async_shared` (a shared load every caller left) does not: the next
// caller loads again at once, so a hanging backend behind `tokio::time::timeout(..,
// load_async(k))` gets one new load per request instead of one per backoff.
// Suspected cause: `Cache::cancel_shared` (src/cache/flights.rs:227-252) unregisters the
// flight and gives back the refresh claim, but never calls `fail_safe_abandoned`, which
// `end_flight` (src/cache/flights.rs:281-283) calls for an abandoned blocking/borrowed leader.
fn s38_cancelled_load_async_skips_fail_safe_backoff() {
    let _w = common::watchdog(secs(20), "bug_cancelled_load_async_skips_fail_safe_backoff");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .async_loader(move |_k: &u32| {
            let first = n.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, BoxError>("loaded".to_string())
            }
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    {
        let mut f = Box::pin(c.load_async(1));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    } // cancelled
    assert_eq!(c.loads_in_flight(), 0);
    // "an abandoned async leader" is a failure: within the backoff the stale value answers
    let r = futures::executor::block_on(c.load_async(1));
    assert_eq!(
        r.unwrap(),
        "old",
        "within the backoff after an abandoned leader: the stale value"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no second load within the backoff"
    );
    c.validate();
}

#[test]
fn cancelled_get_with_async_leader_starts_fail_safe_backoff() {
    let _w = common::watchdog(secs(20), "cancelled_get_with_async_leader");
    let waker = futures::task::noop_waker();
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    {
        let mut cx = std::task::Context::from_waker(&waker);
        let pend = async {
            std::future::pending::<()>().await;
            "never".to_string()
        };
        let mut f = Box::pin(c.get_with_async(1, pend));
        assert!(f.as_mut().poll(&mut cx).is_pending());
    }
    let v = futures::executor::block_on(c.get_with_async(1, async { "reloaded".to_string() }));
    assert_eq!(v, "old");
    clock.advance(secs(5));
    let v = futures::executor::block_on(c.get_with_async(1, async { "reloaded".to_string() }));
    assert_eq!(v, "reloaded");
    c.validate();
}

// BUG (same cause as bug_cancelled_load_async_skips_fail_safe_backoff), with
// `get_with_async_shared`: a shared async load every caller left is abandoned without
// starting fail-safe's retry backoff.
#[test]
fn s38_cancelled_shared_load_skips_fail_safe_backoff() {
    let _w = common::watchdog(
        secs(20),
        "bug_cancelled_shared_load_skips_fail_safe_backoff",
    );
    let waker = futures::task::noop_waker();
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    {
        let mut cx = std::task::Context::from_waker(&waker);
        let pend = async {
            std::future::pending::<()>().await;
            "never".to_string()
        };
        let mut f = Box::pin(c.get_with_async_shared(1, pend));
        assert!(f.as_mut().poll(&mut cx).is_pending());
    }
    let v = futures::executor::block_on(c.get_with_async(1, async { "reloaded".to_string() }));
    assert_eq!(
        v, "old",
        "within the backoff after an abandoned async leader: the stale value"
    );
    c.validate();
}

#[test]
fn fail_safe_failure_variants_start_backoff() {
    common::quiet_injected_panics();
    let waker = futures::task::noop_waker();
    for variant in 0..6 {
        let clock = ManualClock::new();
        let c: Cache<u32, String> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(5))
            .max_concurrent_loads(1)
            .clock(clock.clone())
            .async_loader(|_k: &u32| async {
                if true {
                    panic!("injected async loader panic");
                }
                Ok::<String, BoxError>(String::new())
            })
            .build();
        c.insert(1, "old".into());
        clock.advance(secs(61));
        let first: String = match variant {
            0 => format!("{:?}", futures::executor::block_on(c.load_async(1))),
            1 => format!(
                "{:?}",
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    futures::executor::block_on(
                        c.get_with_async_shared(1, async { panic!("injected shared init panic") }),
                    )
                }))
                .map_err(|_| "panicked")
            ),
            2 => format!(
                "{:?}",
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                    || c.get_all([1], |_| panic!("injected get_all panic"))
                ))
                .map_err(|_| "panicked")
            ),
            3 => format!("{:?}", c.get_all([1], |_| HashMap::new())),
            4 => {
                // a permit held by another key; the leader of 1 times out waiting for it
                let (g, entered, go) = gate();
                g.armed.store(true, Ordering::SeqCst);
                let c2 = c.clone();
                let t = std::thread::spawn(move || {
                    c2.get_with(2, || {
                        g.pass(2);
                        "two".to_string()
                    })
                });
                entered.recv().unwrap();
                let c3: Cache<u32, String> = c.clone();
                let r = format!("{:?}", {
                    // a get_with_async leader queued for the permit, then cancelled
                    let mut f = Box::pin(c3.get_with_async(1, async { "never".to_string() }));
                    let mut cx = std::task::Context::from_waker(&waker);
                    let p = f.as_mut().poll(&mut cx).is_pending();
                    drop(f);
                    p
                });
                go.send(()).unwrap();
                t.join().unwrap();
                r
            }
            _ => format!(
                "{:?}",
                c.try_get_with(1, || -> Result<String, &str> { Err("e") })
            ),
        };
        let next =
            futures::executor::block_on(c.get_with_async(1, async { "reloaded".to_string() }));
        let want_first = [
            "Ok(\"old\")",
            "Err(\"panicked\")",
            "Err(\"panicked\")",
            "{1: \"old\"}",
            "true",
            "Ok(\"old\")",
        ];
        assert_eq!(first, want_first[variant], "variant {variant}");
        assert_eq!(
            next, "old",
            "variant {variant}: within the backoff, the stale value"
        );
        c.validate();
    }
}

#[test]
fn early_refresh_failure_backs_off() {
    let _w = common::watchdog(secs(20), "early_refresh_failure_backs_off");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let (n, cl, f) = (Arc::clone(&calls), clock.clone(), Arc::clone(&fail));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(1000))
        .early_refresh(1.0)
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            cl.advance(secs(100)); // δ = 100 s
            if f.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(format!("{k}"))
            }
        })
        .build();
    assert_eq!(c.load(1).unwrap(), "1"); // at 100 s, expires at 1100 s
    fail.store(true, Ordering::SeqCst);
    set_to(&clock, secs(1090)); // remaining 10 s, δ 100 s: p ≈ 0.9
    let mut reads = 0;
    while calls.load(Ordering::SeqCst) == 1 && reads < 100 {
        c.load(1).unwrap();
        reads += 1;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "an early refresh ran (and failed)"
    );
    // that failed refresh advanced the clock by 100 s: the entry expired at 1100 s
    let now = clock.elapsed();
    assert!(now >= secs(1190));
    // So now a load: fails (no fail-safe) -> error
    assert!(c.load(1).is_err());
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    c.validate();
}

#[test]
fn early_refresh_failure_backoff_without_clock_jump() {
    let _w = common::watchdog(secs(20), "early_refresh_failure_backoff2");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let (n, cl, f) = (Arc::clone(&calls), clock.clone(), Arc::clone(&fail));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(1000))
        .early_refresh(1.0)
        .refresh_backoff(secs(3))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                cl.advance(secs(100)); // the first load is slow: δ = 100 s
                Ok(format!("{k}"))
            }
        })
        .build();
    assert_eq!(c.load(1).unwrap(), "1"); // stored at 100 s, expires at 1100 s
    fail.store(true, Ordering::SeqCst);
    set_to(&clock, secs(1095)); // remaining 5 s
    let mut reads = 0;
    while calls.load(Ordering::SeqCst) == 1 && reads < 200 {
        c.load(1).unwrap();
        reads += 1;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "an early refresh ran (and failed)"
    );
    for _ in 0..50 {
        assert_eq!(c.load(1).unwrap(), "1");
    }
    let after_failure = calls.load(Ordering::SeqCst);
    assert_eq!(after_failure, 2, "a failed early refresh backs off");
    clock.advance(secs(3));
    let mut reads = 0;
    while calls.load(Ordering::SeqCst) == 2 && reads < 200 {
        c.load(1).unwrap();
        reads += 1;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "after the backoff, early refresh again"
    );
    c.validate();
}

#[test]
fn refresh_retried_after_backoff_despite_negative_ttl() {
    let _w = common::watchdog(
        secs(20),
        "refresh_retried_after_backoff_despite_negative_ttl",
    );
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(true));
    let (n, f) = (Arc::clone(&calls), Arc::clone(&fail));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .negative_ttl(secs(100))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(format!("{k} new"))
            }
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    fail.store(false, Ordering::SeqCst);
    clock.advance(secs(4)); // past the refresh backoff, within negative_ttl
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(
        c.get(&1).as_deref(),
        Some("1 new"),
        "the next refresh ran after the backoff"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    c.validate();
}

#[test]
fn parked_async_refresh_dropped_joiners_not_stranded() {
    let _w = common::watchdog(secs(20), "parked_async_refresh_dropped_joiners");
    let clock = ManualClock::new();
    let parked = ParkedFuts::default();
    let (fail, calls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let c = async_refresh_cache(&clock, &parked, &fail, &calls);
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    clock.advance(secs(41)); // expired with the refresh future parked
    let c1 = c.clone();
    let t1 = common::start(move || futures::executor::block_on(c1.load_async(1)));
    let c2 = c.clone();
    let t2 = common::start(move || c2.get_with(1, || "blocking".to_string()));
    std::thread::sleep(Duration::from_millis(100));
    drop(parked.take());
    let r1 = t1
        .wait(secs(5))
        .expect("async joiner not stranded")
        .unwrap();
    let r2 = t2
        .wait(secs(5))
        .expect("blocking joiner not stranded")
        .unwrap();
    assert_eq!(r1.unwrap(), r2, "the two callers shared one load");
    assert_eq!(c.loads_in_flight(), 0);
    c.validate();
}

#[test]
fn parked_async_refresh_joined_then_run() {
    let _w = common::watchdog(secs(20), "parked_async_refresh_joined_then_run");
    let clock = ManualClock::new();
    let parked = ParkedFuts::default();
    let (fail, calls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let c = async_refresh_cache(&clock, &parked, &fail, &calls);
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    clock.advance(secs(41));
    let c1 = c.clone();
    let t1 = common::start(move || futures::executor::block_on(c1.load_async(1)));
    std::thread::sleep(Duration::from_millis(100));
    parked.run_all();
    let r1 = t1.wait(secs(5)).expect("joiner not stranded").unwrap();
    assert!(r1.unwrap().starts_with("1 v"));
    assert!(c.get(&1).unwrap().starts_with("1 v"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the joiner shared the refresh's load"
    );
    c.validate();
}

#[test]
fn contains_key_does_not_refresh_or_touch_idle() {
    let _w = common::watchdog(secs(20), "contains_key_does_not_refresh");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(secs(30))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert!(c.contains_key(&1));
    assert_eq!(parked.len(), 0, "contains_key is not an access: no refresh");
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.stale_served), (0, 0, 0), "{s:?}");
    clock.advance(secs(10));
    assert!(
        !c.contains_key(&1),
        "contains_key did not move the idle deadline"
    );
    c.validate();
}

#[test]
fn full_cache_evicts_stale_entries_first() {
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10)
        .shards(1)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    for k in 0..5 {
        c.insert(k, "stale".into());
        for _ in 0..5 {
            c.get(&k); // make them hot for the frequency sketch
        }
    }
    clock.advance(secs(62));
    for k in 100..110 {
        c.insert(k, "live".into());
    }
    c.run_pending_tasks();
    let live = (100..110).filter(|k| c.contains_key(k)).count();
    assert_eq!(live, 10, "stale entries evicted before live ones");
    let l = log.lock().unwrap().clone();
    assert_eq!(l.len(), 5, "{l:?}");
    assert!(
        l.iter()
            .all(|(_, v, c)| v == "stale" && *c == RemovalCause::Expired),
        "{l:?}"
    );
    assert_eq!(c.entry_count(), 10);
    c.validate();
}

#[test]
fn stale_entries_reclaimed_after_max_stale_once() {
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k: &u32, v: &String| v.len() as u32)
        .time_to_live(secs(60))
        .fail_safe(secs(100))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    for k in 0..5 {
        c.insert(k, "abc".into());
    }
    clock.advance(secs(61));
    c.run_pending_tasks();
    assert_eq!(c.weighted_size(), 15, "stale entries count until max_stale");
    assert_eq!(log.lock().unwrap().len(), 0);
    clock.advance(secs(100));
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
    let l = log.lock().unwrap().clone();
    assert_eq!(l.len(), 5, "{l:?}");
    assert!(l.iter().all(|(_, _, c)| *c == RemovalCause::Expired));
    let s = c.stats();
    assert_eq!(s.expired.count, 5);
    assert_eq!(s.expired.weight, 15);
    c.validate();
}

#[test]
fn shared_load_leader_dropped_blocking_joiner_not_stranded() {
    let _w = common::watchdog(secs(20), "shared_load_leader_dropped_blocking_joiner");
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .async_loader(|k: &u32| {
            let k = *k;
            async move {
                common::Yield(3).await;
                Ok::<_, BoxError>(format!("{k} async"))
            }
        })
        .build();
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = Box::pin(c.load_async(1));
    assert!(f.as_mut().poll(&mut cx).is_pending());
    let c2 = c.clone();
    let t = common::start(move || c2.get_with(1, || "blocking".to_string()));
    std::thread::sleep(Duration::from_millis(50));
    drop(f);
    let r = t
        .wait(secs(5))
        .expect("blocking joiner not stranded")
        .unwrap();
    assert!(r == "1 async" || r == "blocking", "{r}");
    assert_eq!(c.get(&1).as_deref(), Some(r.as_str()));
    assert_eq!(c.loads_in_flight(), 0);
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn shared_load_leader_dropped_fail_safe_joiner_gets_value() {
    let _w = common::watchdog(secs(20), "shared_load_leader_dropped_fail_safe_joiner");
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .async_loader(|k: &u32| {
            let k = *k;
            async move {
                common::Yield(3).await;
                Ok::<_, BoxError>(format!("{k} async"))
            }
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = Box::pin(c.load_async(1));
    assert!(f.as_mut().poll(&mut cx).is_pending());
    let c2 = c.clone();
    let t = common::start(move || futures::executor::block_on(c2.load_async(1)));
    std::thread::sleep(Duration::from_millis(50));
    drop(f);
    let r = t.wait(secs(5)).expect("joiner not stranded").unwrap();
    assert_eq!(r.unwrap(), "1 async", "the joiner finishes the shared load");
    c.validate();
}

// ---------------------------------------------------------------- huge durations

const YEAR: u64 = 365 * 24 * 3600;

#[test]
fn huge_ttl_with_jitter_never_expires() {
    for (ttl, name) in [(Duration::MAX, "MAX"), (secs(500 * YEAR), "500y")] {
        let clock = ManualClock::new();
        let c: Cache<u32, String> = Cache::builder()
            .max_capacity(100)
            .time_to_live(ttl)
            .jitter(0.5)
            .clock(clock.clone())
            .build();
        for k in 0..50 {
            c.insert(k, "v".into());
        }
        clock.advance(secs(240 * YEAR));
        let alive = (0..50).filter(|k| c.get(k).is_some()).count();
        assert_eq!(alive, 50, "ttl {name} × (1 ± 0.5) ≥ 250 years");
        c.validate();
    }
}

#[test]
fn huge_tti_and_refresh_with_jitter() {
    let _w = common::watchdog(secs(20), "huge_tti_and_refresh_with_jitter");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(Duration::MAX)
        .refresh_after(Duration::MAX)
        .jitter(0.5)
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")))
        .build();
    for k in 0..50 {
        c.insert(k, "v".into());
    }
    clock.advance(secs(500 * YEAR));
    let alive = (0..50).filter(|k| c.get(k).is_some()).count();
    assert_eq!(alive, 50);
    assert_eq!(parked.len(), 0, "refresh_after(MAX) is never due");
    c.validate();
}

#[test]
fn huge_max_stale_saturates() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(400 * YEAR))
        .fail_safe(secs(400 * YEAR))
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(401 * YEAR));
    assert_eq!(c.get(&1), None);
    assert_eq!(
        c.get_or_stale(&1).as_deref(),
        Some("old"),
        "400 y + 400 y of stale window overflows u64 nanos: must saturate, not wrap"
    );
    let c2: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(Duration::MAX)
        .clock(clock.clone())
        .build();
    c2.insert(1, "old".into());
    clock.advance(secs(61));
    assert_eq!(c2.get_or_stale(&1).as_deref(), Some("old"));
    c.validate();
    c2.validate();
}

#[test]
fn huge_negative_ttl_and_backoff() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .negative_ttl(Duration::MAX)
        .refresh_backoff(Duration::MAX)
        .refresh_after(secs(10))
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    assert!(c.load(1).is_err());
    clock.advance(secs(100 * YEAR));
    assert!(c.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "negative_ttl MAX: remembered for good"
    );
    c.insert(2, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.load(2).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    clock.advance(secs(30));
    assert_eq!(c.load(2).unwrap(), "old");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refresh_backoff MAX: no retry"
    );
    c.validate();
}

// ---------------------------------------------------------------- user code panicking in the store

#[test]
fn weigher_panic_in_load_publish_releases_waiters() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "weigher_panic_in_load_publish");
    let boom = Arc::new(AtomicBool::new(true));
    let b = Arc::clone(&boom);
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .weigher(move |_k: &u32, _v: &String| {
            if b.load(Ordering::SeqCst) {
                panic!("injected weigher panic");
            }
            1
        })
        .record_stats()
        .loader(move |k: &u32| {
            g2.pass(*k);
            Ok::<_, BoxError>(format!("{k}"))
        })
        .build();
    g.armed.store(true, Ordering::SeqCst);
    let c1 = c.clone();
    let leader = common::start(move || c1.load(1));
    entered.recv().unwrap();
    g.armed.store(false, Ordering::SeqCst);
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            common::start(move || c.load(1))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    go.send(()).unwrap();
    let lr = leader.wait(secs(5)).expect("leader returns");
    boom.store(false, Ordering::SeqCst);
    for w in waiters {
        let r = w.wait(secs(5)).expect("waiter not stranded");
        if let Ok(Ok(v)) = &r {
            assert_eq!(v, "1");
        }
    }
    let _ = lr;
    assert_eq!(c.loads_in_flight(), 0);
    assert_eq!(c.load(1).unwrap(), "1");
    assert_eq!(c.get(&1).as_deref(), Some("1"));
    c.validate();
}

struct PanicOnCreate(Arc<AtomicBool>);
impl Expiry<u32, String> for PanicOnCreate {
    fn expire_after_create(&self, _k: &u32, _v: &String) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) {
            panic!("injected expiry create panic");
        }
        Some(secs(60))
    }
}

#[test]
fn expiry_panic_in_fail_safe_reload_keeps_stale_reachable() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "expiry_panic_in_fail_safe_reload");
    let clock = ManualClock::new();
    let boom = Arc::new(AtomicBool::new(false));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(PanicOnCreate(Arc::clone(&boom)))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    boom.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.load(1)));
    boom.store(false, Ordering::SeqCst);
    assert_eq!(c.loads_in_flight(), 0);
    let _ = r;
    let r2 = common::within(secs(5), {
        let c = c.clone();
        move || c.load(1)
    })
    .expect("no hang")
    .unwrap();
    let v = r2.unwrap();
    assert!(v == "1 new" || v == "old", "{v}");
    c.validate();
}

#[test]
fn weigher_panic_in_refresh_store_gives_claim_back() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "weigher_panic_in_refresh_store");
    let clock = ManualClock::new();
    let boom = Arc::new(AtomicBool::new(false));
    let b = Arc::clone(&boom);
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .weigher(move |_k: &u32, _v: &String| {
            if b.load(Ordering::SeqCst) {
                panic!("injected weigher panic");
            }
            1
        })
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .record_stats()
        .spawner(parked.spawner())
        .clock(clock.clone())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    boom.store(true, Ordering::SeqCst);
    for j in std::mem::take(&mut *parked.0.lock().unwrap()) {
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(j)).is_err());
    }
    boom.store(false, Ordering::SeqCst);
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(c.weighted_size(), 1);
    assert_eq!(parked.len(), 0);
    clock.advance(secs(3));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    let s = c.stats();
    assert_eq!(s.refreshes_started, 2);
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    c.validate();
}

// ---------------------------------------------------------------- race: writes vs refreshes

fn write_vs_refresh_race(inline: bool, async_refresh: bool) {
    let clock = ManualClock::new();
    let started = Arc::new(AtomicU64::new(0)); // version a writer is about to write
    let done = Arc::new(AtomicU64::new(0)); // version whose insert returned
    let s2 = Arc::clone(&started);
    let s3 = Arc::clone(&started);
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(1_000_000))
        .refresh_after(secs(10))
        .refresh_backoff(secs(1))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            let v = s2.load(Ordering::SeqCst);
            std::thread::yield_now();
            Ok::<u64, BoxError>(v)
        });
    if !inline {
        b = b.spawner(|job| {
            std::thread::spawn(job);
        });
    }
    if async_refresh {
        b = b
            .async_loader(move |_k: &u32| {
                let v = s3.load(Ordering::SeqCst);
                async move {
                    common::Yield(1).await;
                    Ok::<u64, BoxError>(v)
                }
            })
            .future_spawner(|f| {
                std::thread::spawn(move || futures::executor::block_on(f));
            });
    }
    let c: Cache<u32, u64> = b.build();
    c.insert(1, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (c, done, stop, clock) = (
                c.clone(),
                Arc::clone(&done),
                Arc::clone(&stop),
                clock.clone(),
            );
            std::thread::spawn(move || {
                let mut bad = None;
                while !stop.load(Ordering::SeqCst) {
                    let w = done.load(Ordering::SeqCst);
                    clock.advance(secs(11));
                    if let Some(v) = c.get(&1) {
                        if v < w && bad.is_none() {
                            bad = Some((v, w));
                        }
                    }
                }
                bad
            })
        })
        .collect();
    for i in 1..=3000u64 {
        started.store(i, Ordering::SeqCst);
        c.insert(1, i);
        done.store(i, Ordering::SeqCst);
        if i % 7 == 0 {
            c.invalidate(&1);
            c.insert(1, i);
        }
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert_eq!(
            r.join().unwrap(),
            None,
            "a refresh overwrote a newer write (value, write)"
        );
    }
    assert!(common::eventually(|| c.loads_in_flight() == 0));
    let v = c.get(&1).unwrap_or(3000);
    assert!(v >= 3000, "final value {v} older than the last write");
    let s = c.stats();
    eprintln!(
        "refreshes {} ok {} failed {}",
        s.refreshes_started, s.refreshes_succeeded, s.refreshes_failed
    );
    // quiescent now: a due read must start a refresh
    let before = c.stats().refreshes_started;
    clock.advance(secs(11));
    c.get(&1);
    assert!(common::eventually(|| c.loads_in_flight() == 0));
    let after = c.stats();
    eprintln!(
        "after a quiescent due read: {} -> {}",
        before, after.refreshes_started
    );
    assert_eq!(
        after.refreshes_started,
        before + 1,
        "a due read starts a refresh: {after:?}"
    );
    c.validate();
}

#[test]
fn race_writes_vs_inline_refresh() {
    let _w = common::watchdog(secs(60), "race_writes_vs_inline_refresh");
    write_vs_refresh_race(true, false);
}

#[test]
fn race_writes_vs_spawned_refresh() {
    let _w = common::watchdog(secs(60), "race_writes_vs_spawned_refresh");
    write_vs_refresh_race(false, false);
}

#[test]
fn race_writes_vs_async_refresh() {
    let _w = common::watchdog(secs(60), "race_writes_vs_async_refresh");
    write_vs_refresh_race(false, true);
}

#[test]
fn timed_out_permit_leader_joiner_gets_stale() {
    let _w = common::watchdog(secs(20), "timed_out_permit_leader_joiner_gets_stale");
    let clock = ManualClock::new();
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            if *k == 2 {
                g2.pass(2);
            }
            Ok::<_, BoxError>(format!("{k} new"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    g.armed.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let holder = std::thread::spawn(move || c2.load(2).unwrap());
    entered.recv().unwrap();
    let c3 = c.clone();
    let leader = common::start(move || c3.load_with_timeout(1, Some(Duration::from_millis(200))));
    std::thread::sleep(Duration::from_millis(50));
    let c4 = c.clone();
    let joiner = common::start(move || c4.load(1));
    let lr = leader
        .wait(secs(5))
        .expect("leader returns at its timeout")
        .unwrap();
    assert_eq!(lr.unwrap(), "old");
    let jr = joiner
        .wait(secs(5))
        .expect("joiner not stuck behind the permit")
        .unwrap();
    assert_eq!(
        jr.unwrap(),
        "old",
        "the joiner gets the last value until the retry deadline"
    );
    go.send(()).unwrap();
    assert_eq!(holder.join().unwrap(), "2 new");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "key 1's loader never ran");
    clock.advance(secs(5));
    assert_eq!(c.load(1).unwrap(), "1 new");
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn remembered_none_vs_remembered_error_across_call_kinds() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(secs(100))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(format!("{k} loaded"))
        })
        .build();
    // a remembered None answers optionally_ calls only
    assert_eq!(c.optionally_get_with(1, || None), None);
    assert_eq!(c.optionally_get_with(1, || Some("x".into())), None);
    assert_eq!(
        c.load(1).unwrap(),
        "1 loaded",
        "load cannot answer None: it loads"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // a remembered error answers try_get_with and load, not get_with
    let r: Result<String, Arc<&str>> = c.try_get_with(2, || Err("e"));
    assert!(r.is_err());
    let r: Result<String, Arc<&str>> = c.try_get_with(2, || Ok("y".into()));
    assert!(r.is_err(), "remembered");
    // optionally_ cannot answer with an error (as load cannot answer None): it loads
    assert_eq!(
        c.optionally_get_with(2, || Some("o".into())).as_deref(),
        Some("o")
    );
    assert_eq!(c.get(&2).as_deref(), Some("o"));
    check_miss_invariant_plain(&c, 0);
    c.validate();
}

#[test]
fn get_all_duplicate_keys_load_once() {
    let c: Cache<u32, String> = Cache::builder().max_capacity(100).record_stats().build();
    let mut seen = Vec::new();
    let all = c.get_all([1, 1, 2, 2, 1], |missing| {
        seen = missing.to_vec();
        missing.iter().map(|&k| (k, format!("{k}"))).collect()
    });
    seen.sort();
    assert_eq!(seen, [1, 2], "each missing key once");
    assert_eq!(all.len(), 2);
    c.validate();
}

// ---------------------------------------------------------------- ledger under a mixed storm

fn ledger_storm(seed: u64, spawner: bool, limit: bool) {
    let clock = ManualClock::new();
    let fail = Arc::new(AtomicU64::new(seed));
    let f = Arc::clone(&fail);
    let mut b = Cache::builder()
        .max_capacity(50)
        .time_to_live(secs(60))
        .refresh_after(secs(20))
        .refresh_backoff(secs(5))
        .fail_safe(secs(100))
        .negative_ttl(secs(3))
        .jitter(0.1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            // xorshift step shared by all loads: fails about a third of the time
            let mut x = f.load(Ordering::SeqCst);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.store(x, Ordering::SeqCst);
            match x % 6 {
                0 | 1 => Err(BoxError::from("down")),
                2 => {
                    std::thread::yield_now();
                    Ok(format!("{k}"))
                }
                _ => Ok(format!("{k}")),
            }
        });
    if spawner {
        b = b.spawner(|job| {
            std::thread::spawn(job);
        });
    }
    if limit {
        b = b.max_concurrent_loads(2);
    }
    let c: Cache<u32, String> = b.build();
    let hs: Vec<_> = (0..4)
        .map(|t| {
            let (c, clock) = (c.clone(), clock.clone());
            std::thread::spawn(move || {
                let mut r = common::Rng(seed.wrapping_mul(31).wrapping_add(t) | 1);
                for _ in 0..1500 {
                    let k = (r.next() % 20) as u32;
                    match r.next() % 10 {
                        0 => {
                            let _ = c.load(k);
                        }
                        1 => {
                            let _ = c.load_with_timeout(k, Some(Duration::from_millis(1)));
                        }
                        2 => drop(c.get_with(k, || format!("{k} gw"))),
                        3 => drop(c.try_get_with(k, || -> Result<String, &str> { Err("e") })),
                        4 => drop(
                            c.optionally_get_with(k, || (k % 3 != 0).then(|| format!("{k} o"))),
                        ),
                        5 => drop(c.get_all([k, (k + 1) % 20], |m| {
                            m.iter()
                                .filter(|&&x| x % 2 == 0)
                                .map(|&x| (x, format!("{x} all")))
                                .collect()
                        })),
                        6 => c.insert(k, format!("{k} w")),
                        7 => c.invalidate(&k),
                        8 => clock.advance(Duration::from_secs(r.next() % 8)),
                        _ => drop(c.get_with_if(k, || format!("{k} if"), |v| v.ends_with('w'))),
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert!(common::eventually(|| c.loads_in_flight() == 0));
    // a spawned refresh job may still be queued for a permit (not in flight): wait for it
    let settled = common::eventually(|| {
        let s = c.stats();
        s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed
    });
    let s = c.stats();
    assert!(
        settled,
        "every refresh started ends as succeeded or failed: {s:?}"
    );
    let ledger = |s: &herdcache::CacheStats| {
        (
            s.misses + s.refreshes_started,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        )
    };
    let first = ledger(&c.stats());
    let balanced = common::eventually(|| {
        let (a, b) = ledger(&c.stats());
        a == b
    });
    let last = ledger(&c.stats());
    assert!(
        balanced,
        "miss ledger: first {first:?}, after 10 s {last:?}: {:?}",
        c.stats()
    );
    if first.0 != first.1 {
        eprintln!("ledger lagged after the calls returned: {first:?} -> {last:?}");
    }
    c.validate();
}

#[test]
fn ledger_storm_inline() {
    let _w = common::watchdog(secs(60), "ledger_storm_inline");
    for seed in 1..4 {
        ledger_storm(seed * 7919, false, false);
    }
}

#[test]
fn ledger_storm_spawner_and_limit() {
    let _w = common::watchdog(secs(60), "ledger_storm_spawner_and_limit");
    for seed in 1..4 {
        ledger_storm(seed * 104_729, true, true);
    }
}

#[test]
fn ledger_storm_inline_limit() {
    let _w = common::watchdog(secs(60), "ledger_storm_inline_limit");
    for seed in 1..4 {
        ledger_storm(seed * 15_485_863, false, true);
    }
}

#[test]
fn remove_of_stale_entry_returns_none_and_ends_it() {
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    assert_eq!(c.remove(&1), None, "only a live value is returned");
    assert_eq!(c.get_or_stale(&1), None, "removed for good");
    assert_eq!(
        *log.lock().unwrap(),
        vec![(1, "old".to_string(), RemovalCause::Expired)]
    );
    // retain offers the stale value to its predicate like a live one
    c.insert(2, "old2".into());
    clock.advance(secs(61));
    let mut offered = Vec::new();
    c.retain(|k, v| {
        offered.push((*k, v.clone()));
        true
    });
    assert_eq!(offered, vec![(2, "old2".to_string())]);
    assert_eq!(c.get_or_stale(&2).as_deref(), Some("old2"));
    c.retain(|_, _| false);
    assert_eq!(c.get_or_stale(&2), None);
    c.validate();
}

#[test]
fn tti_refresh_success_resets_idle_and_failure_keeps_it() {
    let _w = common::watchdog(secs(20), "tti_refresh");
    let clock = ManualClock::new();
    let fail = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fail);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(secs(30))
        .refresh_after(secs(10))
        .refresh_backoff(secs(100))
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if f.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(format!("{k} new"))
            }
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old")); // read at 20 (idle to 50), refresh stored
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    fail.store(true, Ordering::SeqCst);
    clock.advance(secs(29));
    assert_eq!(c.get(&1).as_deref(), Some("1 new"), "idle 29 s < 30 s");
    // refresh due (written at 20, now 49): fails; value still served
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    clock.advance(secs(30));
    assert_eq!(c.get(&1), None, "idle 30 s since the last read: expired");
    c.validate();
}

#[test]
fn zero_timeout_with_inline_spawner_and_free_permit_loads() {
    let _w = common::watchdog(secs(20), "zero_timeout_inline_spawner");
    for limit in [false, true] {
        let mut b = Cache::builder()
            .max_capacity(100)
            .record_stats()
            .spawner(|job| job())
            .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")));
        if limit {
            b = b.max_concurrent_loads(1);
        }
        let c: Cache<u32, String> = b.build();
        let r = c.load_with_timeout(1, Some(Duration::ZERO));
        assert_eq!(
            r.unwrap(),
            "1",
            "limit {limit}: a free permit is taken even past the timeout"
        );
        assert_eq!(c.get(&1).as_deref(), Some("1"));
        check_miss_invariant(&c);
        c.validate();
    }
}

#[test]
fn zero_timeout_with_thread_spawner_fills_later() {
    let _w = common::watchdog(secs(20), "zero_timeout_thread_spawner");
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u32| {
            g2.pass(*k);
            Ok::<_, BoxError>(format!("{k}"))
        })
        .build();
    g.armed.store(true, Ordering::SeqCst);
    assert!(matches!(
        c.load_with_timeout(1, Some(Duration::ZERO)),
        Err(LoadError::Timeout)
    ));
    entered.recv().unwrap();
    assert!(matches!(
        c.load_with_timeout(1, Some(Duration::from_millis(10))),
        Err(LoadError::Timeout)
    ));
    go.send(()).unwrap();
    assert!(common::eventually(|| c.get(&1).is_some()));
    assert!(common::eventually(|| c.loads_in_flight() == 0));
    let s = c.stats();
    assert_eq!(s.load_successes, 1, "{s:?}");
    assert_eq!(s.timeouts, 2, "{s:?}");
    c.validate();
}

#[test]
fn racing_readers_with_spawner_park_one_refresh() {
    let _w = common::watchdog(secs(20), "racing_readers_with_spawner");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let (c, b) = (c.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                b.wait();
                match i % 4 {
                    0 => c.get(&1),
                    1 => c.load(1).ok(),
                    2 => Some(c.get_with(1, || "init".into())),
                    _ => c.get_all([1], |_| HashMap::new()).remove(&1),
                }
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap().as_deref(), Some("old"));
    }
    assert_eq!(parked.len(), 1, "exactly one refresh");
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("1 new"));
    c.validate();
}

#[test]
fn expired_during_slow_refresh_callers_join_it() {
    let _w = common::watchdog(secs(20), "expired_during_slow_refresh");
    let clock = ManualClock::new();
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            g2.pass(*k);
            Ok::<_, BoxError>(format!("{k} new"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    g.armed.store(true, Ordering::SeqCst);
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    entered.recv().unwrap();
    clock.advance(secs(41)); // expired while the refresh runs
    let ws: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            common::start(move || {
                if i % 2 == 0 {
                    c.load(1).unwrap()
                } else {
                    c.get_with(1, || "init".into())
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    g.armed.store(false, Ordering::SeqCst);
    go.send(()).unwrap();
    for w in ws {
        assert_eq!(w.wait(secs(5)).expect("joined").unwrap(), "1 new");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one load for the refresh and its joiners"
    );
    let s = c.stats();
    assert_eq!(s.refreshes_succeeded, 1, "{s:?}");
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn refresh_backoff_defaults() {
    let _w = common::watchdog(secs(20), "refresh_backoff_defaults");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(600))
        .refresh_after(secs(10))
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    c.get(&1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(secs(10) - Duration::from_millis(1));
    c.get(&1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "default backoff: the refresh_after period"
    );
    clock.advance(Duration::from_millis(1));
    c.get(&1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), "old");
    clock.advance(Duration::from_millis(999));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "default backoff without refresh_after: 1 s"
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    c.validate();
}

#[test]
fn async_refresh_dropped_while_queued_for_permit_loses_no_permit() {
    let _w = common::watchdog(secs(20), "async_refresh_dropped_while_queued");
    let clock = ManualClock::new();
    let parked = ParkedFuts::default();
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(600))
        .refresh_after(secs(10))
        .refresh_backoff(secs(3))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .future_spawner(parked.spawner())
        .async_loader(|k: &u32| {
            let k = *k;
            async move { Ok::<_, BoxError>(format!("{k} async")) }
        })
        .loader(move |k: &u32| {
            g2.pass(*k);
            Ok::<_, BoxError>(format!("{k} blocking"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    g.armed.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let holder = std::thread::spawn(move || c2.load(2).unwrap());
    entered.recv().unwrap();
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    let mut futs = parked.take();
    assert_eq!(futs.len(), 1);
    {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(
            futs[0].as_mut().poll(&mut cx).is_pending(),
            "queued for the permit"
        );
    }
    drop(futs);
    g.armed.store(false, Ordering::SeqCst);
    go.send(()).unwrap();
    assert_eq!(holder.join().unwrap(), "2 blocking");
    let r = common::within(secs(5), {
        let c = c.clone();
        move || c.load(3)
    })
    .expect("the permit was not lost")
    .unwrap();
    assert_eq!(r.unwrap(), "3 blocking");
    clock.advance(secs(3));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    parked.run_all();
    assert_eq!(c.get(&1).as_deref(), Some("1 async"));
    assert_eq!(c.loads_in_flight(), 0);
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    c.validate();
}

struct ZeroLife;
impl Expiry<u32, String> for ZeroLife {
    fn expire_after_create(&self, _k: &u32, v: &String) -> Option<Duration> {
        Some(if v.starts_with("dead") {
            Duration::ZERO
        } else {
            secs(60)
        })
    }
    fn expire_after_update(&self, _k: &u32, v: &String, r: Option<Duration>) -> Option<Duration> {
        if v.starts_with("dead") {
            Some(Duration::ZERO)
        } else {
            r
        }
    }
}

#[test]
fn already_expired_value_is_not_kept_stale() {
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        clock.advance(secs(1));
        let (log, listener) = listener_log();
        let mut b = Cache::builder()
            .max_capacity(100)
            .expire_after(ZeroLife)
            .record_stats()
            .eviction_listener(listener)
            .clock(clock.clone())
            .loader(|k: &u32| Ok::<_, BoxError>(format!("dead {k}")));
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let c: Cache<u32, String> = b.build();
        c.insert(1, "dead on arrival".into());
        let l1 = log.lock().unwrap().clone();
        let s1 = c.get_or_stale(&1);
        let n1 = c.entry_count();
        let r = c.load(2);
        let s2 = c.get_or_stale(&2);
        c.insert(3, "alive".into());
        c.insert(3, "dead update".into());
        let s3 = c.get_or_stale(&3);
        c.run_pending_tasks();
        let l = log.lock().unwrap().clone();
        use RemovalCause::*;
        assert_eq!(l1, vec![(1, "dead on arrival".to_string(), Expired)]);
        assert_eq!(
            (s1, n1),
            (None, 0),
            "fail_safe {fail_safe}: reported, so not kept"
        );
        assert_eq!(r.unwrap(), "dead 2");
        assert_eq!(s2, None);
        assert_eq!(s3, None);
        assert_eq!(
            l,
            vec![
                (1, "dead on arrival".to_string(), Expired),
                (2, "dead 2".to_string(), Expired),
                (3, "alive".to_string(), Replaced),
                (3, "dead update".to_string(), Expired)
            ]
        );
        assert_eq!(c.entry_count(), 0);
        c.validate();
    }
}

#[test]
fn retain_and_remove_during_parked_refresh_win() {
    let _w = common::watchdog(secs(20), "retain_and_remove_during_parked_refresh");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} new")))
        .build();
    for k in 0..3 {
        c.insert(k, "old".into());
    }
    clock.advance(secs(20));
    for k in 0..3 {
        assert_eq!(c.get(&k).as_deref(), Some("old"));
    }
    assert_eq!(parked.len(), 3);
    c.retain(|k, _| *k != 0);
    assert_eq!(c.remove(&1).as_deref(), Some("old"));
    c.invalidate_entries_if(|k, _| *k == 2).unwrap();
    parked.run_all();
    for k in 0..3 {
        assert_eq!(
            c.get(&k),
            None,
            "key {k}: the removal wins over its refresh"
        );
    }
    assert_eq!(c.entry_count(), 0);
    let s = c.stats();
    assert_eq!(s.refreshes_failed, 3, "{s:?}");
    c.validate();
}

#[test]
fn invalidations_end_negative_entries() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(secs(100))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    let ops: Vec<(&str, CacheOp)> = vec![
        ("invalidate", Box::new(|c| c.invalidate(&1))),
        ("remove", Box::new(|c| drop(c.remove(&1)))),
        ("invalidate_all", Box::new(|c| c.invalidate_all())),
        ("insert", Box::new(|c| c.insert(1, "w".into()))),
    ];
    for (name, op) in &ops {
        c.invalidate(&1);
        let before = calls.load(Ordering::SeqCst);
        assert!(c.load(1).is_err());
        assert!(c.load(1).is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before + 1,
            "{name}: remembered"
        );
        op(&c);
        if *name == "insert" {
            assert_eq!(c.load(1).unwrap(), "w", "the write ends the negative entry");
            continue;
        }
        let _ = c.load(1);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before + 2,
            "{name} ends the negative entry"
        );
    }
    c.validate();
}

struct ReadExtends(Arc<AtomicUsize>);
impl Expiry<u32, String> for ReadExtends {
    fn expire_after_create(&self, _k: &u32, _v: &String) -> Option<Duration> {
        Some(secs(60))
    }
    fn expire_after_read(&self, _k: &u32, _v: &String, _r: Option<Duration>) -> Option<Duration> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Some(secs(60))
    }
}

#[test]
fn fail_safe_answers_do_not_revive_through_expire_after_read() {
    let _w = common::watchdog(secs(20), "fail_safe_answers_do_not_revive");
    let clock = ManualClock::new();
    let reads = Arc::new(AtomicUsize::new(0));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(ReadExtends(Arc::clone(&reads)))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(|_k: &u32| Err::<String, _>(BoxError::from("down")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    assert_eq!(c.get(&1), None, "get_or_stale changes nothing");
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(
        c.get(&1),
        None,
        "a fail-safe answer does not revive the entry"
    );
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(c.get_with(1, || "gw".into()), "old");
    assert_eq!(c.get(&1), None);
    assert!(!c.contains_key(&1));
    assert_eq!(c.iter().count(), 0);
    assert_eq!(
        reads.load(Ordering::SeqCst),
        0,
        "no read hook on a stale value"
    );
    c.validate();
}

#[test]
fn get_with_if_fail_safe_and_refresh() {
    let _w = common::watchdog(secs(20), "get_with_if_fail_safe_and_refresh");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} refreshed")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    // a kept value is read: its due refresh starts
    assert_eq!(c.get_with_if(1, || unreachable!(), |_| false), "old");
    assert_eq!(parked.len(), 1);
    drop(std::mem::take(&mut *parked.0.lock().unwrap()));
    clock.advance(secs(41)); // expired
    let r: Result<String, Arc<&str>> = c.try_get_with(1, || Err("down"));
    assert_eq!(r.unwrap(), "old");
    // within the backoff: the stale value answers, unjudged
    let mut judged = 0;
    let v = c.get_with_if(
        1,
        || "init".into(),
        |_| {
            judged += 1;
            true
        },
    );
    assert_eq!(v, "old");
    assert_eq!(judged, 0, "unjudged");
    c.validate();
}

#[test]
fn heavier_refresh_evicts_to_capacity() {
    let _w = common::watchdog(secs(20), "heavier_refresh_evicts");
    let clock = ManualClock::new();
    let (log, listener) = listener_log();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10)
        .shards(1)
        .weigher(|_k: &u32, v: &String| v.len() as u32)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .record_stats()
        .eviction_listener(listener)
        .clock(clock.clone())
        .loader(|_k: &u32| Ok::<_, BoxError>("12345678".to_string()))
        .build();
    for k in 0..5 {
        c.insert(k, "ab".into());
    }
    assert_eq!(c.weighted_size(), 10);
    clock.advance(secs(20));
    assert_eq!(c.get(&0).as_deref(), Some("ab"));
    c.run_pending_tasks();
    assert!(
        c.weighted_size() <= 10,
        "weighted_size {}",
        c.weighted_size()
    );
    let total: u64 = c.iter().map(|(_, v)| v.len() as u64).sum();
    assert_eq!(total, c.weighted_size());
    let l = log.lock().unwrap().clone();
    assert!(
        l.iter()
            .all(|(_, _, c)| matches!(c, RemovalCause::Size | RemovalCause::Replaced)),
        "{l:?}"
    );
    let s = c.stats();
    assert_eq!(s.refreshes_started, 1);
    c.validate();
}

#[test]
fn get_or_stale_on_due_entry_reads_as_get() {
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k} refreshed")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    // "the cached value, as get": a live value due for refresh is read as `get` reads it
    // (its refresh starts). Note the doc's "Changes nothing: no load" reads as if it covered
    // this case too; observed: one refresh job.
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    assert_eq!(parked.len(), 1);
    c.validate();
}

#[test]
fn refresh_with_async_loader_needs_future_spawner() {
    let r = Cache::<u32, String>::builder()
        .max_capacity(10)
        .refresh_after(secs(1))
        .async_loader(|k: &u32| {
            let k = *k;
            async move { Ok::<_, BoxError>(format!("{k}")) }
        })
        .try_build();
    assert!(
        r.is_err(),
        "refresh_after with an async loader and no future_spawner"
    );
    let r = Cache::<u32, String>::builder()
        .max_capacity(10)
        .early_refresh(1.0)
        .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")))
        .try_build();
    assert!(r.is_err(), "early_refresh without a time to live");
    for bad in [-0.1, 1.0, f64::NAN] {
        let r = Cache::<u32, String>::builder()
            .max_capacity(10)
            .jitter(bad)
            .try_build();
        assert!(r.is_err(), "jitter {bad}");
    }
    for bad in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        let r = Cache::<u32, String>::builder()
            .max_capacity(10)
            .time_to_live(secs(1))
            .early_refresh(bad)
            .loader(|k: &u32| Ok::<_, BoxError>(format!("{k}")))
            .try_build();
        assert!(r.is_err(), "beta {bad}");
    }
}

#[test]
fn refresh_failing_after_expiry_without_joiners_starts_backoff() {
    let _w = common::watchdog(secs(20), "refresh_failing_after_expiry_without_joiners");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    clock.advance(secs(41)); // expired before the refresh job runs
    parked.run_all(); // fails, nobody joined
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a refresh that failed after expiry is a failed load: its backoff holds"
    );
    let after = calls.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(c.load(1).unwrap(), "old");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        after,
        "within the backoff: no load"
    );
    c.validate();
}

#[test]
fn async_joiner_of_failing_blocking_refresh_gets_fail_safe_value() {
    let _w = common::watchdog(secs(20), "async_joiner_of_failing_refresh");
    let clock = ManualClock::new();
    let parked = Parked::default();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .spawner(parked.spawner())
        .loader(|_k: &u32| Err::<String, _>(BoxError::from("down")))
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(20));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    clock.advance(secs(41));
    let c2 = c.clone();
    let t = common::start(move || {
        futures::executor::block_on(c2.get_with_async(1, async { "init".to_string() }))
    });
    std::thread::sleep(Duration::from_millis(50));
    parked.run_all();
    let r = t.wait(secs(5)).expect("not stranded").unwrap();
    assert_eq!(r, "old");
    c.validate();
}

#[test]
fn get_all_joiner_of_failed_load_gets_fail_safe_value() {
    let _w = common::watchdog(secs(20), "get_all_joiner_of_failed_load");
    let clock = ManualClock::new();
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u32| {
            g2.pass(*k);
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    g.armed.store(true, Ordering::SeqCst);
    let c1 = c.clone();
    let leader = common::start(move || c1.load(1));
    entered.recv().unwrap();
    let c2 = c.clone();
    let all = common::start(move || {
        let mut called = Vec::new();
        let r = c2.get_all([1, 2], |m| {
            called = m.to_vec();
            m.iter().map(|&k| (k, format!("{k} all"))).collect()
        });
        (r, called)
    });
    std::thread::sleep(Duration::from_millis(50));
    go.send(()).unwrap();
    assert_eq!(leader.wait(secs(5)).unwrap().unwrap().unwrap(), "old");
    let (r, called) = all.wait(secs(5)).expect("get_all not stranded").unwrap();
    assert_eq!(called, [2], "key 1 was joined, not loaded again");
    assert_eq!(r.get(&1).map(String::as_str), Some("old"), "{r:?}");
    assert_eq!(r.get(&2).map(String::as_str), Some("2 all"));
    c.validate();
}

#[test]
fn cancelled_async_leader_joiners_get_fail_safe_value() {
    let _w = common::watchdog(secs(20), "cancelled_async_leader_joiners");
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let pend = async {
        std::future::pending::<()>().await;
        "never".to_string()
    };
    let mut f = Box::pin(c.get_with_async(1, pend));
    assert!(f.as_mut().poll(&mut cx).is_pending());
    let c2 = c.clone();
    let joiner = common::start(move || c2.get_with(1, || "joiner init".to_string()));
    std::thread::sleep(Duration::from_millis(50));
    drop(f);
    let r = joiner.wait(secs(5)).expect("joiner not stranded").unwrap();
    assert_eq!(
        r, "old",
        "every caller of an abandoned load gets the old value"
    );
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn fail_safe_racing_retry_mixed_callers_one_load() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(30), "fail_safe_racing_retry_mixed");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let n2 = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            Err::<String, _>(BoxError::from("down"))
        })
        .build();
    c.insert(1, "old".into());
    clock.advance(secs(61));
    for round in 1..=5 {
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (c, b, n) = (c.clone(), Arc::clone(&barrier), Arc::clone(&n2));
                std::thread::spawn(move || {
                    b.wait();
                    match i % 4 {
                        0 => c.load(1).unwrap(),
                        1 => c.get_with(1, || {
                            n.fetch_add(1, Ordering::SeqCst);
                            panic!("injected: a failing get_with init")
                        }),
                        2 => c
                            .get_all([1], |_| {
                                n.fetch_add(1, Ordering::SeqCst);
                                HashMap::new()
                            })
                            .remove(&1)
                            .unwrap_or_default(),
                        _ => futures::executor::block_on(c.try_get_with_async(1, async {
                            n.fetch_add(1, Ordering::SeqCst);
                            Err::<String, &str>("down")
                        }))
                        .unwrap(),
                    }
                })
            })
            .collect();
        let mut panics = 0;
        for h in hs {
            match h.join() {
                Ok(v) => assert_eq!(v, "old"),
                Err(_) => panics += 1,
            }
        }
        assert!(
            panics <= 1,
            "only a leader's own init panic reaches its caller"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            round,
            "one load per backoff, whoever leads"
        );
        clock.advance(secs(5));
    }
    c.validate();
}

#[test]
fn load_async_panic_remembered_for_backoff() {
    common::quiet_injected_panics();
    let _w = common::watchdog(secs(20), "load_async_panic_remembered");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_backoff(secs(5))
        .record_stats()
        .clock(clock.clone())
        .async_loader(move |_k: &u32| {
            n.fetch_add(1, Ordering::SeqCst);
            async {
                if true {
                    panic!("injected async loader panic");
                }
                Ok::<String, BoxError>(String::new())
            }
        })
        .build();
    let r1 = futures::executor::block_on(c.load_async(1));
    assert!(matches!(r1, Err(LoadError::Panicked)), "{r1:?}");
    let r2 = futures::executor::block_on(c.load_async(1));
    assert!(matches!(r2, Err(LoadError::Panicked)), "{r2:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a panicking loader is called once per backoff"
    );
    clock.advance(secs(5));
    let _ = futures::executor::block_on(c.load_async(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    check_miss_invariant(&c);
    c.validate();
}

#[test]
fn invalidate_all_ends_stale_values() {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = fail_safe_cache(&clock, &down, &calls);
    for k in 0..10 {
        c.insert(k, format!("old {k}"));
    }
    clock.advance(secs(61));
    assert_eq!(c.load(3).unwrap(), "old 3");
    c.invalidate_all();
    for k in 0..10 {
        assert_eq!(c.get_or_stale(&k), None);
    }
    assert!(
        c.load(3).is_err(),
        "no stale value after invalidate_all (even within the backoff)"
    );
    assert!(c.load(4).is_err());
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
    c.validate();
}

#[test]
fn cancelled_shared_load_queued_for_permit_loses_no_permit() {
    let _w = common::watchdog(secs(20), "cancelled_shared_load_queued_for_permit");
    let (g, entered, go) = gate();
    let g2 = g.clone();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .async_loader(|k: &u32| {
            let k = *k;
            async move { Ok::<_, BoxError>(format!("{k} async")) }
        })
        .loader(move |k: &u32| {
            g2.pass(*k);
            Ok::<_, BoxError>(format!("{k} blocking"))
        })
        .build();
    g.armed.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let holder = std::thread::spawn(move || c2.load(2).unwrap());
    entered.recv().unwrap();
    g.armed.store(false, Ordering::SeqCst);
    {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut f = Box::pin(c.load_async(1));
        assert!(
            f.as_mut().poll(&mut cx).is_pending(),
            "queued for the permit"
        );
    }
    go.send(()).unwrap();
    assert_eq!(holder.join().unwrap(), "2 blocking");
    let r = common::within(secs(5), {
        let c = c.clone();
        move || c.load(3)
    })
    .expect("the permit was not lost")
    .unwrap();
    assert_eq!(r.unwrap(), "3 blocking");
    assert_eq!(
        futures::executor::block_on(c.load_async(1)).unwrap(),
        "1 async"
    );
    check_miss_invariant(&c);
    c.validate();
}
