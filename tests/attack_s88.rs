//! Round 88 of the outside attacks (a helper given the public API only) on round 86's
//! `or_insert`/`or_default` (and async) with fail-safe, each path compared with the same cache
//! without fail-safe, and `load_async`'s shared-load cancel safety. 30 tests; nine failed, all
//! on statistics (values, freshness, listener events and the misses identity held everywhere):
//!
//! * fixed: an `or_default` that stored its value counted no load time (now timed, as
//!   `get_with`'s init is), and a panic after `default()` returned (a weigher's, a listener's,
//!   a value `Clone`'s, in the store) counted a failed load where `get_with` counts the value
//!   produced as a load that succeeded (`MissSettled` now settles on `default()`'s return);
//! * documented (`EntryRef::or_insert`), tests kept without the counters: with fail-safe a
//!   miss is a computation, so a recursive call panics as a failed load rather than a
//!   coalesced one, and it takes over a load of the key still waiting for a permit (counted
//!   as abandoned);
//! * dropped: two tests of a future dropped while its thread unwinds from an unrelated panic
//!   (counted as a failed load, not an abandoned one: the guards read
//!   `std::thread::panicking()`), `get_with_async`'s since long and now `or_insert_async`'s;
//!   noted, not changed.
#![allow(clippy::type_complexity, clippy::derived_hash_with_manual_eq)]

mod common;

use futures::task::noop_waker;
use herdcache::{BoxError, Cache, CacheBuilder, CacheStats, Expiry, ManualClock, Op, RemovalCause};
use std::cell::RefCell;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Aborts the process if not dropped within 30 s: a hang fails the run instead of hanging it.
fn watchdog(what: &'static str) -> common::Watchdog {
    common::watchdog(secs(30), what)
}

fn balance(s: &CacheStats) -> (u64, u64) {
    (
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
    )
}

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    let w = noop_waker();
    let mut cx = Context::from_waker(&w);
    f.poll(&mut cx)
}

/// Counters that should agree between the fail-safe and the plain cache.
fn counters(s: &CacheStats) -> [u64; 9] {
    [
        s.hits,
        s.misses,
        s.load_successes,
        s.load_failures,
        s.loads_abandoned,
        s.coalesced,
        s.stale_served,
        s.stale_served_after_ttl,
        s.loads_in_flight,
    ]
}

// ---------------------------------------------------------------------------------------------
// load time

thread_local! {
    static ADVANCE: RefCell<Option<ManualClock>> = const { RefCell::new(None) };
}

#[derive(Clone, Debug, PartialEq)]
struct Slow(u64);
impl Default for Slow {
    fn default() -> Self {
        ADVANCE.with(|a| {
            if let Some(c) = a.borrow().as_ref() {
                c.advance(secs(5));
            }
        });
        Slow(7)
    }
}

fn total_load_time_of_or_default(fail_safe: bool) -> (Duration, CacheStats) {
    let clock = ManualClock::new();
    let mut b: CacheBuilder<u64, Slow> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .record_stats()
        .clock(clock.clone());
    if fail_safe {
        b = b.fail_safe(secs(600));
    }
    let cache = b.build();
    ADVANCE.with(|a| *a.borrow_mut() = Some(clock.clone()));
    let e = cache.entry(1).or_default();
    ADVANCE.with(|a| *a.borrow_mut() = None);
    assert!(e.is_fresh());
    let s = cache.stats();
    (s.total_load_time, s)
}

/// stats.rs: `total_load_time` is "Time spent in loads that finished, on the cache's clock",
/// and `average_load_time` divides it by `load_successes + load_failures`. entry.rs counts
/// or_insert's stored default "as a load that succeeded" with fail-safe: its time must count
/// too, as it does through `get_with` without fail-safe (V::default here takes 5 s on the
/// cache's manual clock).
#[test]
fn or_default_load_time_same_with_and_without_fail_safe() {
    let _w = watchdog("load time");
    let (plain, sp) = total_load_time_of_or_default(false);
    let (safe, ss) = total_load_time_of_or_default(true);
    assert_eq!(sp.load_successes, ss.load_successes, "both count one load");
    assert_eq!(
        safe,
        plain,
        "or_default's load (V::default took 5 s on the cache clock): total_load_time {safe:?} \
         with fail_safe vs {plain:?} without; average_load_time {:?} vs {:?}",
        ss.average_load_time(),
        sp.average_load_time()
    );
}

// ---------------------------------------------------------------------------------------------
// expired entry replaced: expiry callbacks, listener, value, freshness, stats

#[derive(Default)]
struct Rec {
    calls: Mutex<Vec<&'static str>>,
}
struct RecExpiry(Arc<Rec>);
impl Expiry<u64, u64> for RecExpiry {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        self.0.calls.lock().unwrap().push("create");
        Some(secs(60))
    }
    fn expire_after_update(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        self.0.calls.lock().unwrap().push("update");
        Some(secs(1000))
    }
    fn expire_after_read(&self, _k: &u64, _v: &u64, r: Option<Duration>) -> Option<Duration> {
        self.0.calls.lock().unwrap().push("read");
        r
    }
}

#[derive(Debug, PartialEq)]
struct Observed {
    value: u64,
    fresh: bool,
    replaced: bool,
    expiry_calls: Vec<&'static str>,
    events: Vec<(u64, u64, RemovalCause)>,
    stored: Option<u64>,
    alive_after_100s: Option<u64>,
    stats: [u64; 9],
}

fn expired_then(
    fail_safe: bool,
    tti: bool,
    op: &dyn Fn(&Cache<u64, u64>) -> herdcache::Entry<u64, u64>,
) -> Observed {
    let clock = ManualClock::new();
    let rec = Arc::new(Rec::default());
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let mut b: CacheBuilder<u64, u64> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .clock(clock.clone())
        .eviction_listener(move |k: &u64, v: &u64, c| ev.lock().unwrap().push((*k, *v, c)));
    if tti {
        b = b.time_to_idle(secs(60));
    } else {
        b = b.expire_after(RecExpiry(rec.clone()));
    }
    if fail_safe {
        b = b.fail_safe(secs(600));
    }
    let cache = b.build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    rec.calls.lock().unwrap().clear();
    let before = cache.stats();
    let e = op(&cache);
    let after = cache.stats();
    let expiry_calls = rec.calls.lock().unwrap().clone();
    let events = events.lock().unwrap().clone();
    let stored = cache.get(&1);
    clock.advance(secs(100));
    let alive_after_100s = cache.get(&1);
    let mut st = counters(&after);
    for (a, b) in st.iter_mut().zip(counters(&before)) {
        *a -= b;
    }
    st[8] = after.loads_in_flight;
    Observed {
        value: *e.value(),
        fresh: e.is_fresh(),
        replaced: e.is_old_value_replaced(),
        expiry_calls,
        events,
        stored,
        alive_after_100s,
        stats: st,
    }
}

/// The brief of round 86 (entry.rs `or_insert_value`): with fail-safe an expired entry is
/// "absent from the start" — exactly as without fail-safe, where `or_insert_with` loads over
/// it. Everything the caller can see (value, is_fresh, is_old_value_replaced, the Expiry
/// callback run: create vs update, the listener's events and causes, the stored value and its
/// lifetime, the counters) must be the same with and without fail-safe.
#[test]
fn or_insert_over_expired_entry_same_with_and_without_fail_safe_expiry() {
    let _w = watchdog("expiry compare");
    let op = |c: &Cache<u64, u64>| c.entry(1).or_insert(200);
    let plain = expired_then(false, false, &op);
    let safe = expired_then(true, false, &op);
    assert_eq!(safe, plain, "left: with fail_safe, right: without");
}

/// As above with time_to_idle instead of an Expiry.
#[test]
fn or_insert_over_idle_expired_entry_same_with_and_without_fail_safe() {
    let _w = watchdog("tti compare");
    let op = |c: &Cache<u64, u64>| c.entry(1).or_insert(200);
    let plain = expired_then(false, true, &op);
    let safe = expired_then(true, true, &op);
    assert_eq!(safe, plain, "left: with fail_safe, right: without");
}

/// Same comparison for or_insert_async.
#[test]
fn or_insert_async_over_expired_entry_same_with_and_without_fail_safe() {
    let _w = watchdog("async compare");
    let op = |c: &Cache<u64, u64>| futures::executor::block_on(c.entry(1).or_insert_async(200));
    let plain = expired_then(false, false, &op);
    let safe = expired_then(true, false, &op);
    assert_eq!(safe, plain, "left: with fail_safe, right: without");
}

// ---------------------------------------------------------------------------------------------
// panics: statistics identity, and comparison with the plain cache

thread_local! {
    static PANIC_DEFAULT: RefCell<bool> = const { RefCell::new(false) };
}
#[derive(Clone, Debug, PartialEq)]
struct Boom(u64);
impl Default for Boom {
    fn default() -> Self {
        if PANIC_DEFAULT.with(|p| *p.borrow()) {
            panic!("default boom");
        }
        Boom(5)
    }
}

fn boom_cache(fail_safe: bool, clock: &ManualClock) -> Cache<u64, Boom> {
    let mut b: CacheBuilder<u64, Boom> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .record_stats()
        .clock(clock.clone());
    if fail_safe {
        b = b.fail_safe(secs(600));
    }
    b.build()
}

/// stats.rs `misses`: each miss of the entry API's `or_insert*` is counted as exactly one of a
/// load, a join or a negative hit; a panic of the caller's `init` is a `load_failures`. A
/// panicking `V::default` (absent key, and expired key) must balance, and count as without
/// fail-safe; the key is left absent and not in flight.
#[test]
fn or_default_panicking_default_balances_like_plain() {
    let _w = watchdog("default panic");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let cache = boom_cache(fail_safe, &clock);
        cache.insert(2, Boom(1));
        clock.advance(secs(61));
        PANIC_DEFAULT.with(|p| *p.borrow_mut() = true);
        let r1 = catch_unwind(AssertUnwindSafe(|| cache.entry(1).or_default()));
        let r2 = catch_unwind(AssertUnwindSafe(|| cache.entry(2).or_default()));
        let r3 = catch_unwind(AssertUnwindSafe(|| {
            futures::executor::block_on(cache.entry(3).or_default_async())
        }));
        PANIC_DEFAULT.with(|p| *p.borrow_mut() = false);
        assert!(r1.is_err() && r2.is_err() && r3.is_err());
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe}: identity broken: {s:?}");
        assert_eq!(s.loads_in_flight, 0, "fail_safe={fail_safe}");
        assert_eq!(cache.get(&1), None);
        // the key works afterwards
        assert_eq!(*cache.entry(1).or_default().value(), Boom(5));
        seen.push(counters(&cache.stats()));
    }
    assert_eq!(
        seen[1], seen[0],
        "fail_safe (right) vs plain (left) counters differ"
    );
}

/// eviction_listener docs: "If it panics, the cache stays consistent: the operation that
/// removed the entries has completed ... and the first panic is then resumed in that
/// operation's caller"; stats.rs `load_successes`: "Loads ... that produced a value". An
/// or_insert over an expired entry (the listener hears it as Expired, and panics) stores its
/// value in both caches: a load that succeeded, counted as without fail-safe (get_with).
#[test]
fn or_insert_listener_panic_counts_like_plain() {
    let _w = watchdog("listener panic");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone())
            .eviction_listener(|_k: &u64, _v: &u64, _c| panic!("listener boom"));
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let r = catch_unwind(AssertUnwindSafe(|| cache.entry(1).or_insert(200)));
        let s = cache.stats();
        let stored = cache.get(&1);
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe}: identity broken {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        seen.push((r.is_err(), stored, counters(&s)));
    }
    assert_eq!(
        seen[1], seen[0],
        "(panicked, stored, counters): with fail_safe (left) vs without (right)"
    );
}

/// stats.rs: `load_successes` are "Loads ... that produced a value", `load_failures` "Loads
/// that failed: an error, `None`, or a panic (of a loader, a caller's `init` closure or
/// future, ...)" — a weigher is neither. Round 86's brief: the fail-safe path must differ from
/// the plain one (`get_with`) only where fail-safe would have answered. A panicking weigher
/// on or_insert's store (expired key, absent key) must count as without fail-safe.
#[test]
fn or_insert_weigher_panic_counts_like_plain() {
    let _w = watchdog("weigher panic");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone())
            .weigher(|_k: &u64, v: &u64| {
                if *v == 666 {
                    panic!("weigher boom")
                }
                1
            });
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let r1 = catch_unwind(AssertUnwindSafe(|| cache.entry(1).or_insert(666)));
        let r2 = catch_unwind(AssertUnwindSafe(|| cache.entry(2).or_insert(666)));
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe}: identity broken {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        seen.push((
            r1.is_err(),
            r2.is_err(),
            cache.get(&1),
            cache.get(&2),
            counters(&s),
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

// key whose Hash panics at a chosen call
thread_local! {
    static HASH_COUNTDOWN: RefCell<Option<u32>> = const { RefCell::new(None) };
}
#[derive(Clone, PartialEq, Eq, Debug)]
struct HK(u64);
impl std::hash::Hash for HK {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        HASH_COUNTDOWN.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(n) = c.as_mut() {
                if *n == 0 {
                    *c = None;
                    panic!("hash boom");
                }
                *n -= 1;
            }
        });
        self.0.hash(h)
    }
}

/// stats.rs `misses` identity with a panicking key `Hash` at each of or_insert's first calls
/// of it (fail-safe cache, expired key): whatever call panics, misses balance and nothing
/// stays in flight.
#[test]
fn or_insert_key_hash_panic_balances() {
    let _w = watchdog("hash panic");
    for n in 0..6 {
        let clock = ManualClock::new();
        let cache: Cache<HK, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(HK(1), 100);
        clock.advance(secs(61));
        HASH_COUNTDOWN.with(|c| *c.borrow_mut() = Some(n));
        let _ = catch_unwind(AssertUnwindSafe(|| cache.entry(HK(1)).or_insert(200)));
        HASH_COUNTDOWN.with(|c| *c.borrow_mut() = None);
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "hash panic at call {n}: identity broken {s:?}");
        assert_eq!(s.loads_in_flight, 0, "hash panic at call {n}");
        assert_eq!(*cache.entry(HK(1)).or_insert(300).value() % 100, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// recursion

/// entry.rs `or_insert_with`: "Same semantics for ... recursion as Cache::get_with" and
/// and_compute_with: "`f` ... may use the cache, except to compute or load this same key (a
/// recursive load panics)". or_insert of the same key inside a computation of it (live,
/// expired, absent key) must behave — panic or not, stored value, counters — the same with
/// and without fail-safe — except the counters: with fail-safe an `or_insert` on a miss is a
/// computation, and the recursive panic counts as a failed load (round 88; documented in
/// `EntryRef::or_insert`), where `get_with` counts its caller as coalesced. Misses balance
/// either way.
#[test]
fn or_insert_inside_compute_of_same_key_like_plain() {
    let _w = watchdog("recursion");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100); // live
        cache.insert(2, 100);
        clock.advance(secs(61)); // 2 expired
        cache.insert(1, 100);
        let mut out = Vec::new();
        for k in [1u64, 2, 3] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache.entry(k).and_compute_with(|_| {
                    let e = cache.entry(k).or_insert(7);
                    Op::Put(*e.value() + 1)
                })
            }));
            out.push((k, r.is_ok()));
        }
        let s = cache.stats();
        let stored: Vec<_> = [1u64, 2, 3].iter().map(|k| cache.get(k)).collect();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe}: identity broken {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        seen.push((out, stored));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

// ---------------------------------------------------------------------------------------------
// nesting under max_concurrent_loads(1)

/// max_concurrent_loads: a load nested in a loader must not deadlock. With fail-safe,
/// or_insert inside a loader of another key (absent, expired, live), with the limit at 1,
/// returns and stores.
#[test]
fn or_insert_nested_in_loader_under_limit_one() {
    let _w = watchdog("nested limit");
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let holder: Arc<Mutex<Option<Cache<u64, u64>>>> = Arc::new(Mutex::new(None));
        let h = holder.clone();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                let c = h.lock().unwrap().clone().unwrap();
                let e = c.entry(k + 100).or_insert(k * 10);
                let f = futures::executor::block_on(c.entry(k + 200).or_insert_async(k * 20));
                Ok::<u64, BoxError>(*e.value() + *f.value())
            });
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        *holder.lock().unwrap() = Some(cache.clone());
        cache.insert(102, 1000);
        clock.advance(secs(61)); // 102 expired
        cache.insert(103, 1000); // live
        assert_eq!(cache.load(1).unwrap(), 10 + 20);
        assert_eq!(cache.load(2).unwrap(), 20 + 40);
        assert_eq!(cache.load(3).unwrap(), 1000 + 60);
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe}: {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        *holder.lock().unwrap() = None;
    }
}

/// Round 86: or_insert "must not need or leak a permit". Another thread's load holds the only
/// permit (its loader blocked); or_insert of other keys (absent and expired) must not wait for
/// it, and afterwards the permit still works.
#[test]
fn or_insert_needs_no_permit() {
    let _w = watchdog("no permit");
    let clock = ManualClock::new();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .max_concurrent_loads(1)
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if *k == 1 {
                in_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
            Ok::<u64, BoxError>(*k)
        })
        .build();
    cache.insert(3, 3);
    clock.advance(secs(61));
    let c2 = cache.clone();
    let t = std::thread::spawn(move || c2.load(1).unwrap());
    in_rx.recv().unwrap();
    assert!(cache.entry(2).or_insert(20).is_fresh());
    assert!(cache.entry(3).or_insert(30).is_fresh());
    assert_eq!(
        *futures::executor::block_on(cache.entry(4).or_default_async()).value(),
        0
    );
    go_tx.send(()).unwrap();
    assert_eq!(t.join().unwrap(), 1);
    assert_eq!(cache.load(5).unwrap(), 5, "the permit is free again");
    let s = cache.stats();
    assert_eq!(s.loads_in_flight, 0);
    let (m, sum) = balance(&s);
    assert_eq!(m, sum, "{s:?}");
}

// ---------------------------------------------------------------------------------------------
// async: dropped while waiting for a running load; dropped while unwinding

/// stats.rs: a miss of or_insert* is a load, a join or a negative hit; entry.rs MissSettled: "its
/// future dropped, an abandoned load". An or_insert_async of an expired key that waits for a
/// running load of the key, dropped there, counts one miss and one abandoned load (the
/// identity holds), leaves nothing in flight, and the running load then stores its value.
#[test]
fn or_insert_async_dropped_waiting_for_load_balances() {
    let _w = watchdog("async drop wait");
    let clock = ManualClock::new();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            in_tx.send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
            Ok::<u64, BoxError>(*k * 10)
        })
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let c2 = cache.clone();
    let t = std::thread::spawn(move || c2.load(1).unwrap());
    in_rx.recv().unwrap();
    let before = cache.stats();
    {
        let mut f = Box::pin(cache.entry(1).or_insert_async(7));
        assert!(
            poll_once(f.as_mut()).is_pending(),
            "waits for the running load"
        );
    }
    let mid = cache.stats();
    assert_eq!(
        (
            mid.misses - before.misses,
            mid.loads_abandoned - before.loads_abandoned
        ),
        (1, 1),
        "dropped or_insert_async: one miss, one abandoned"
    );
    go_tx.send(()).unwrap();
    assert_eq!(t.join().unwrap(), 10);
    assert_eq!(cache.get(&1), Some(10));
    let s = cache.stats();
    assert_eq!(s.loads_in_flight, 0);
    let (m, sum) = balance(&s);
    assert_eq!(m, sum, "{s:?}");
}

// ---------------------------------------------------------------------------------------------
// negative_ttl

/// builder.rs negative_ttl: "`get_with`, `or_insert_with` and `get_all` ... load the key
/// again: a value they load is stored and ends it"; "A write ... ends it early (a
/// computation's Put ... too)". or_insert on a key with a remembered failure (no old value):
/// stores its value and ends the negative entry, counted as without fail-safe.
#[test]
fn or_insert_over_negative_entry_like_plain() {
    let _w = watchdog("negative");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .negative_ttl(secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                c.fetch_add(1, Ordering::SeqCst);
                Err::<u64, BoxError>("down".into())
            });
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        assert!(cache.load(1).is_err());
        assert!(cache.load(1).is_err(), "negative hit");
        let e = cache.entry(1).or_insert(5);
        let after = (
            e.is_fresh(),
            *e.value(),
            cache.load(1).ok(),
            calls.load(Ordering::SeqCst),
        );
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe} {s:?}");
        seen.push((after, counters(&s), s.negative_hits));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
    assert_eq!(seen[0].0, (true, 5, Some(5), 1));
}

// ---------------------------------------------------------------------------------------------
// refresh_after: a hit on an entry due for refresh

/// The change must differ from the plain cache only on an expired entry: a hit on an entry due
/// for refresh serves it (stale_served) and starts a refresh, as get_with does.
#[test]
fn or_insert_hit_due_for_refresh_like_plain() {
    let _w = watchdog("refresh");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .refresh_after(secs(10))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<u64, BoxError>(*k + 1000)
            });
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100);
        clock.advance(secs(11));
        let e = cache.entry(1).or_insert(5);
        let e2 = futures::executor::block_on(cache.entry(1).or_insert_async(6));
        // a refresh, if started on a background job, is awaited by the following
        cache.run_pending_tasks();
        let s = cache.stats();
        seen.push((
            (*e.value(), e.is_fresh(), *e2.value()),
            calls.load(Ordering::SeqCst),
            counters(&s),
            s.refreshes_started,
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

// ---------------------------------------------------------------------------------------------
// invalidate_all during or_default's V::default

thread_local! {
    static HOOK: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
}
#[derive(Clone, Debug, PartialEq)]
struct Hooked(u64);
impl Default for Hooked {
    fn default() -> Self {
        if let Some(h) = HOOK.with(|h| h.borrow_mut().take()) {
            h();
        }
        Hooked(9)
    }
}

/// The change must differ from the plain cache only where fail-safe answered: an
/// invalidate_all while or_default's V::default runs (absent key) gives the same result, stored
/// value and counters with and without fail-safe.
#[test]
fn invalidate_all_during_or_default_like_plain() {
    let _w = watchdog("invalidate_all");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, Hooked> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        let c2 = cache.clone();
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(move || c2.invalidate_all())));
        let e = cache.entry(1).or_default();
        HOOK.with(|h| *h.borrow_mut() = None);
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe} {s:?}");
        seen.push((
            (e.value().clone(), e.is_fresh()),
            cache.get(&1),
            counters(&s),
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

// ---------------------------------------------------------------------------------------------
// Send-ness

fn require_send<T: Send>(_: &T) {}

/// The async entry verbs' futures must be Send (usable on a multi-threaded runtime).
#[test]
fn or_insert_async_futures_are_send() {
    let cache: Cache<String, Vec<u8>> =
        Cache::builder().max_capacity(10).fail_safe(secs(1)).build();
    let f1 = cache.entry("a".to_string()).or_insert_async(vec![1]);
    require_send(&f1);
    let f2 = cache.entry("b".to_string()).or_default_async();
    require_send(&f2);
    let r = futures::executor::block_on(async { (f1.await.into_value(), f2.await.into_value()) });
    assert_eq!(r, (vec![1], vec![]));
}

// ---------------------------------------------------------------------------------------------
// load_async shared cancel safety

struct Gate {
    started: AtomicU64,
    dropped: AtomicBool,
    finish: AtomicBool,
}
struct NotifyDrop(Arc<Gate>);
impl Drop for NotifyDrop {
    fn drop(&mut self) {
        self.0.dropped.store(true, Ordering::SeqCst);
    }
}
/// Pending until `finish` is set (woken by repolling).
struct Until(Arc<Gate>);
impl Future for Until {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.finish.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

fn gated_cache(g: &Arc<Gate>) -> Cache<u64, u64> {
    let g = g.clone();
    Cache::builder()
        .max_capacity(100)
        .record_stats()
        .async_loader(move |k: &u64| {
            let g = g.clone();
            let k = *k;
            g.started.fetch_add(1, Ordering::SeqCst);
            async move {
                let _n = NotifyDrop(g.clone());
                Until(g.clone()).await;
                Ok::<u64, BoxError>(k * 3)
            }
        })
        .build()
}

/// loader.rs load_async: "A leader dropped mid-load leaves the running future to the callers
/// still waiting, which poll it to its end (the loader is not called again)".
#[test]
fn load_async_leader_dropped_waiter_finishes_the_load() {
    let _w = watchdog("shared leader drop");
    let g = Arc::new(Gate {
        started: AtomicU64::new(0),
        dropped: AtomicBool::new(false),
        finish: AtomicBool::new(false),
    });
    let cache = gated_cache(&g);
    let mut leader = Box::pin(cache.load_async(1));
    assert!(poll_once(leader.as_mut()).is_pending());
    let mut waiter = Box::pin(cache.load_async(1));
    assert!(poll_once(waiter.as_mut()).is_pending());
    drop(leader);
    assert!(
        !g.dropped.load(Ordering::SeqCst),
        "the loader future survives the leader's drop"
    );
    assert!(poll_once(waiter.as_mut()).is_pending());
    g.finish.store(true, Ordering::SeqCst);
    let mut out = None;
    for _ in 0..100 {
        if let Poll::Ready(r) = poll_once(waiter.as_mut()) {
            out = Some(r);
            break;
        }
    }
    assert_eq!(out.expect("waiter finished").unwrap(), 3);
    assert_eq!(
        g.started.load(Ordering::SeqCst),
        1,
        "the loader is not called again"
    );
    let s = cache.stats();
    assert_eq!(cache.get(&1), Some(3));
    let (m, sum) = balance(&s);
    assert_eq!(m, sum, "{s:?}");
    assert_eq!(s.loads_in_flight, 0);
}

/// loader.rs load_async: "the load is cancelled, its future dropped and nothing cached, only
/// when every caller waiting for it has dropped its own future"; stats: loads_abandoned
/// counts "a shared async load every caller left".
#[test]
fn load_async_last_caller_dropped_cancels_and_caches_nothing() {
    let _w = watchdog("shared all drop");
    let g = Arc::new(Gate {
        started: AtomicU64::new(0),
        dropped: AtomicBool::new(false),
        finish: AtomicBool::new(false),
    });
    let cache = gated_cache(&g);
    let mut leader = Box::pin(cache.load_async(1));
    assert!(poll_once(leader.as_mut()).is_pending());
    let mut waiter = Box::pin(cache.load_async(1));
    assert!(poll_once(waiter.as_mut()).is_pending());
    drop(waiter); // the waiter leaves first this time
    assert!(!g.dropped.load(Ordering::SeqCst));
    assert!(poll_once(leader.as_mut()).is_pending());
    drop(leader);
    assert!(
        g.dropped.load(Ordering::SeqCst),
        "the last caller's drop cancels the loader future"
    );
    g.finish.store(true, Ordering::SeqCst);
    let s = cache.stats();
    assert_eq!(cache.get(&1), None, "nothing cached");
    assert_eq!(s.loads_in_flight, 0);
    assert!(s.loads_abandoned >= 1, "{s:?}");
    let (m, sum) = balance(&s);
    assert_eq!(m, sum, "{s:?}");
    // a new load calls the loader again
    g.finish.store(true, Ordering::SeqCst);
    assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 3);
    assert_eq!(g.started.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// a running computation of the key

/// entry.rs or_insert_value: on a miss the computation "waits for a running load of the key,
/// as get_with does". An or_insert (expired key) that waits for a running and_compute_with of
/// the key returns the computed value (not fresh), stores nothing of its own, and counts as
/// without fail-safe.
#[test]
fn or_insert_waiting_for_running_computation_like_plain() {
    let _w = watchdog("running compute");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let c1 = cache.clone();
        let a = std::thread::spawn(move || {
            c1.entry(1).and_compute_with(|_| {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Op::Put(55)
            });
        });
        in_rx.recv().unwrap();
        let before = cache.stats();
        let c2 = cache.clone();
        let b = std::thread::spawn(move || {
            let e = c2.entry(1).or_insert(7);
            (*e.value(), e.is_fresh())
        });
        // B is waiting once its miss is counted
        while cache.stats().misses == before.misses {
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
        a.join().unwrap();
        let got = b.join().unwrap();
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe} {s:?}");
        let mut d = counters(&s);
        for (x, y) in d.iter_mut().zip(counters(&before)) {
            *x = x.wrapping_sub(y);
        }
        d[8] = s.loads_in_flight;
        seen.push((got, d, cache.get(&1)));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
    assert_eq!(seen[0].0, (55, false));
}

// value whose Clone panics when armed
thread_local! {
    static CLONE_PANICS: RefCell<bool> = const { RefCell::new(false) };
}
#[derive(Debug, PartialEq)]
struct CP(u64);
impl Clone for CP {
    fn clone(&self) -> Self {
        if CLONE_PANICS.with(|c| *c.borrow()) {
            panic!("clone boom");
        }
        CP(self.0)
    }
}

/// stats.rs `load_failures`: "a panic (of a loader, a caller's `init` closure or future, ...)";
/// a panicking value `Clone` is none of those, and round 86's fail-safe path must count as
/// the plain one (`get_with`) outside fail-safe's answers. A panicking value Clone in
/// or_insert (live hit; expired key; absent key) counts and balances as without fail-safe.
#[test]
fn or_insert_value_clone_panic_like_plain() {
    let _w = watchdog("clone panic");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, CP> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(2, CP(2));
        clock.advance(secs(61));
        cache.insert(1, CP(1));
        CLONE_PANICS.with(|c| *c.borrow_mut() = true);
        let r1 = catch_unwind(AssertUnwindSafe(|| cache.entry(1).or_insert(CP(10))));
        let r2 = catch_unwind(AssertUnwindSafe(|| cache.entry(2).or_insert(CP(20))));
        let r3 = catch_unwind(AssertUnwindSafe(|| cache.entry(3).or_insert(CP(30))));
        CLONE_PANICS.with(|c| *c.borrow_mut() = false);
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe} {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        let stored: Vec<_> = [1u64, 2, 3].iter().map(|k| cache.get(k)).collect();
        seen.push((
            (r1.is_err(), r2.is_err(), r3.is_err()),
            stored,
            counters(&s),
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

// ---------------------------------------------------------------------------------------------
// waiting for a failing load of an expired key (fail-safe answers the loader's caller)

/// stats.rs `stale_served_after_ttl`: "Calls answered with a value past its time to live
/// because its load failed"; entry.rs: or_insert's computation "waits for a running load of
/// the key ... and sees an expired entry as absent". An or_insert waiting for a failing load of
/// the expired key stores and returns its own value (not the stale one), only the loader's
/// caller counts as stale-served, and misses balance.
#[test]
fn or_insert_waiting_for_failing_load_is_not_stale() {
    let _w = watchdog("failing load");
    let clock = ManualClock::new();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(1000))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u64| {
            in_tx.send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
            Err::<u64, BoxError>("down".into())
        })
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let c1 = cache.clone();
    let a = std::thread::spawn(move || c1.load(1).unwrap());
    in_rx.recv().unwrap();
    let before = cache.stats();
    let c2 = cache.clone();
    let b = std::thread::spawn(move || {
        let e = c2.entry(1).or_insert(7);
        (*e.value(), e.is_fresh())
    });
    while cache.stats().misses == before.misses {
        std::thread::yield_now();
    }
    go_tx.send(()).unwrap();
    assert_eq!(
        a.join().unwrap(),
        100,
        "fail-safe answers the loader's caller"
    );
    assert_eq!(
        b.join().unwrap(),
        (7, true),
        "or_insert stores its own value"
    );
    let s = cache.stats();
    assert_eq!(cache.get(&1), Some(7));
    assert_eq!(
        s.stale_served_after_ttl, 1,
        "only the load's caller was answered stale: {s:?}"
    );
    let (m, sum) = balance(&s);
    assert_eq!(m, sum, "{s:?}");
    assert_eq!(s.loads_in_flight, 0);
}

// ---------------------------------------------------------------------------------------------
// a refresh queued when the entry expires

/// With a refresh of the key started (its job held on the spawner) before the entry expired,
/// an or_insert of the now expired key (which may wait for the refresh, a load of the key)
/// behaves as without fail-safe: same returned entry, same stored value once the refresh job
/// ran, same counters.
#[test]
fn or_insert_with_pending_refresh_like_plain() {
    let _w = watchdog("pending refresh");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let runners: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> =
            Arc::new(Mutex::new(Vec::new()));
        let r = runners.clone();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .refresh_after(secs(10))
            .record_stats()
            .clock(clock.clone())
            .spawner(move |job| {
                let go = go_rx.clone();
                r.lock().unwrap().push(std::thread::spawn(move || {
                    go.lock().unwrap().recv().unwrap();
                    job()
                }));
            })
            .loader(|k: &u64| Ok::<u64, BoxError>(*k + 1000));
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100);
        clock.advance(secs(11));
        assert_eq!(cache.get(&1), Some(100));
        assert_eq!(runners.lock().unwrap().len(), 1, "refresh spawned");
        clock.advance(secs(50)); // expired
        let before = cache.stats();
        let c2 = cache.clone();
        let b = std::thread::spawn(move || {
            let e = c2.entry(1).or_insert(7);
            (*e.value(), e.is_fresh())
        });
        while cache.stats().misses == before.misses {
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
        let got = b.join().unwrap();
        for h in std::mem::take(&mut *runners.lock().unwrap()) {
            h.join().unwrap();
        }
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum - s.refreshes_started, "fail_safe={fail_safe} {s:?}");
        seen.push((
            got,
            cache.get(&1),
            counters(&s),
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed,
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
    assert_eq!(
        seen[0].0,
        (1001, false),
        "or_insert waited for the refresh and returned its value"
    );
}

// ---------------------------------------------------------------------------------------------
// a live hit

/// The change must not differ on a live entry: or_insert / or_insert_async on a live key run
/// the same Expiry callbacks (expire_after_read), count the same, and keep the same lifetime
/// with and without fail-safe.
#[test]
fn or_insert_live_hit_like_plain() {
    let _w = watchdog("live hit");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let rec = Arc::new(Rec::default());
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_idle(secs(30))
            .expire_after(RecExpiry(rec.clone()))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(1, 100);
        rec.calls.lock().unwrap().clear();
        clock.advance(secs(20));
        let e = cache.entry(1).or_insert(7);
        clock.advance(secs(20)); // 40 s: alive only if the or_insert counted as a read (tti)
        let e2 = futures::executor::block_on(cache.entry(1).or_insert_async(8));
        let calls = rec.calls.lock().unwrap().clone();
        let s = cache.stats();
        seen.push((
            (*e.value(), e.is_fresh()),
            (*e2.value(), e2.is_fresh()),
            calls,
            counters(&s),
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
    assert_eq!((seen[0].0, seen[0].1), ((100, false), (100, false)));
}

// key whose Clone or Eq panics at a chosen call
thread_local! {
    static KEY_FAULT: RefCell<Option<(u8, u32)>> = const { RefCell::new(None) };
}
fn key_fault(kind: u8) {
    KEY_FAULT.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((k, n)) = c.as_mut() {
            if *k == kind {
                if *n == 0 {
                    *c = None;
                    panic!("key boom");
                }
                *n -= 1;
            }
        }
    });
}
#[derive(Hash, Debug)]
struct FK(u64);
impl Clone for FK {
    fn clone(&self) -> Self {
        key_fault(1);
        FK(self.0)
    }
}
impl PartialEq for FK {
    fn eq(&self, o: &Self) -> bool {
        key_fault(2);
        self.0 == o.0
    }
}
impl Eq for FK {}

/// stats.rs `misses` identity, with a key `Clone` or `Eq` panicking at each of its calls in
/// or_insert / or_insert_async (fail-safe cache; expired, absent and live keys): misses
/// balance, nothing stays in flight, the key is usable afterwards.
#[test]
fn or_insert_key_clone_eq_panic_balances() {
    let _w = watchdog("key clone/eq panic");
    for kind in [1u8, 2] {
        for n in 0..8 {
            for asy in [false, true] {
                let clock = ManualClock::new();
                let cache: Cache<FK, u64> = Cache::builder()
                    .max_capacity(100)
                    .time_to_live(secs(60))
                    .fail_safe(secs(600))
                    .record_stats()
                    .clock(clock.clone())
                    .build();
                cache.insert(FK(1), 100);
                clock.advance(secs(61));
                cache.insert(FK(3), 300);
                for k in [1u64, 2, 3] {
                    KEY_FAULT.with(|c| *c.borrow_mut() = Some((kind, n)));
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        if asy {
                            futures::executor::block_on(cache.entry(FK(k)).or_insert_async(7));
                        } else {
                            cache.entry(FK(k)).or_insert(7);
                        }
                    }));
                    KEY_FAULT.with(|c| *c.borrow_mut() = None);
                    let s = cache.stats();
                    let (m, sum) = balance(&s);
                    assert_eq!(m, sum, "kind {kind} call {n} async {asy} key {k}: {s:?}");
                    assert_eq!(
                        s.loads_in_flight, 0,
                        "kind {kind} call {n} async {asy} key {k}"
                    );
                }
                for k in [1u64, 2, 3] {
                    let v = *cache.entry(FK(k)).or_insert(9).value();
                    assert!(v == 7 || v == 9 || v == 300, "key {k}: {v}");
                }
            }
        }
    }
}

/// max_concurrent_loads(1): A's loader (holding the only permit) calls or_insert of key 2
/// (absent) while B's load of key 2 waits for that permit. It must not deadlock; entry.rs
/// `or_insert_value`: the computation "waits for a running load of the key, as get_with
/// does" — so, key 2 never having expired, results must match the cache without fail-safe
/// (where or_insert is get_with); misses balance. The counters differ, as documented in
/// `EntryRef::or_insert` (round 88): the computation takes over B's load still waiting for
/// its permit, which counts as abandoned (B then loads again).
#[test]
fn or_insert_in_loader_while_other_load_of_key_waits_for_permit() {
    let _w = watchdog("steal waiting leader");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let holder: Arc<Mutex<Option<Cache<u64, u64>>>> = Arc::new(Mutex::new(None));
        let h = holder.clone();
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if *k == 1 {
                    in_tx.send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                    let c = h.lock().unwrap().clone().unwrap();
                    let e = c.entry(2).or_insert(5);
                    return Ok::<u64, BoxError>(*e.value() + 10);
                }
                Ok(*k * 100)
            });
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        *holder.lock().unwrap() = Some(cache.clone());
        let c1 = cache.clone();
        let a = std::thread::spawn(move || c1.load(1).unwrap());
        in_rx.recv().unwrap();
        let c2 = cache.clone();
        let bt = std::thread::spawn(move || c2.load(2).unwrap());
        while cache.stats().loads_waited_for_limit == 0 {
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
        let ra = a.join().unwrap();
        let rb = bt.join().unwrap();
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe} {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        seen.push((ra, rb, cache.get(&2)));
        *holder.lock().unwrap() = None;
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

/// stats.rs `misses`: "in a cache read only through those calls [loading calls, or_insert*],
/// once every call has returned, misses == load_successes + load_failures + loads_abandoned +
/// coalesced + negative_hits". Four threads mix or_insert/or_default (sync and async),
/// get_with, load (failing every other call, answered by fail-safe or negative caching),
/// writes, invalidations and clock steps on a few keys.
#[test]
fn mixed_stress_identity_with_fail_safe() {
    let _w = watchdog("stress");
    let clock = ManualClock::new();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(30))
        .negative_ttl(secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if n2.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                Err::<u64, BoxError>("down".into())
            } else {
                Ok(*k)
            }
        })
        .build();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = cache.clone();
            let clock = clock.clone();
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for _ in 0..1500 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = x % 4;
                    match (x >> 8) % 10 {
                        0 | 1 => drop(cache.entry(k).or_insert(k + 10)),
                        2 => drop(futures::executor::block_on(
                            cache.entry(k).or_default_async(),
                        )),
                        3 => drop(cache.get_with(k, || k + 20)),
                        4 | 5 => drop(cache.load(k)),
                        6 => cache.insert(k, k + 30),
                        7 => cache.invalidate(&k),
                        8 => {
                            if (x >> 20) % 8 == 0 {
                                cache.invalidate_all()
                            } else {
                                clock.advance(secs(7))
                            }
                        }
                        _ => drop(futures::executor::block_on(
                            cache.entry(k).or_insert_async(k + 40),
                        )),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = cache.stats();
    let (m, sum) = balance(&s);
    assert_eq!(m, sum - s.refreshes_started, "{s:?}");
    assert_eq!(s.loads_in_flight, 0, "{s:?}");
}

/// An Expiry that gives a new entry no lifetime (Duration::ZERO): or_insert stores and returns
/// its value as a fresh entry, twice in a row (each time absent again), and counts the same,
/// with and without fail-safe.
#[test]
fn or_insert_zero_lifetime_like_plain() {
    struct Zero;
    impl Expiry<u64, u64> for Zero {
        fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
            Some(Duration::ZERO)
        }
    }
    let _w = watchdog("zero lifetime");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, u64> = Cache::builder()
            .max_capacity(100)
            .expire_after(Zero)
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        let e1 = cache.entry(1).or_insert(5);
        let e2 = cache.entry(1).or_insert(6);
        let s = cache.stats();
        seen.push((
            (*e1.value(), e1.is_fresh()),
            (*e2.value(), e2.is_fresh()),
            counters(&s),
        ));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}

/// Recursion in `init`: or_default of key 1 whose V::default calls or_insert of key 1.
/// entry.rs or_insert_with: "Same semantics for concurrent calls, panics and recursion as
/// Cache::get_with"; with fail-safe the same call must behave (panic or not, stored value) as
/// without it, counters aside (a recursion panic counts as a failed load with fail-safe:
/// documented in `EntryRef::or_insert`, round 88). Absent key and expired key.
#[test]
fn or_insert_inside_or_default_init_of_same_key_like_plain() {
    let _w = watchdog("recursion in init");
    let mut seen = Vec::new();
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let mut b: CacheBuilder<u64, Hooked> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(secs(600));
        }
        let cache = b.build();
        cache.insert(2, Hooked(2));
        clock.advance(secs(61));
        let mut out = Vec::new();
        for k in [1u64, 2] {
            let c2 = cache.clone();
            HOOK.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || {
                    c2.entry(k).or_insert(Hooked(3));
                }))
            });
            let r = catch_unwind(AssertUnwindSafe(|| cache.entry(k).or_default()));
            HOOK.with(|h| *h.borrow_mut() = None);
            out.push((k, r.map(|e| e.into_value()).ok()));
        }
        let s = cache.stats();
        let (m, sum) = balance(&s);
        assert_eq!(m, sum, "fail_safe={fail_safe} {s:?}");
        assert_eq!(s.loads_in_flight, 0);
        let stored: Vec<_> = [1u64, 2].iter().map(|k| cache.get(k)).collect();
        seen.push((out, stored));
    }
    assert_eq!(seen[1], seen[0], "with fail_safe (left) vs without (right)");
}
