//! Sweep 50 (outside, public API only): the last stop's fixes and their neighbours.
//!
//! Attacks fail-safe (`fail_safe`, `refresh_backoff`, `get_or_stale`) on every way a load can
//! end without a value (loader error, panic, a cancelled shared or borrowed async load, a soft
//! timeout on a permit, a spawner dropping the job), `health()` / `health_over()` windows,
//! `CacheStats` differences and helpers, and (feature `redis`) the Redis tier's ordering
//! promises across restarts, FLUSHALL and failing codecs.
//!
//! Found (each `s39_` test, `bug_` when found, says what the docs promise and what happened
//! instead; all fixed in stop 39, the waiters' count by correcting the docs):
//! - Redis tier: a `FLUSHALL` (or any loss of the key's hash and the epoch key) between a
//!   load's read and its write-back lets a value loaded before an `insert`, `invalidate` or
//!   `invalidate_all` that returned back into Redis (the write-back compares the version with
//!   `or '0'`: "absent when read" and "absent after a loss" look alike).
//! - Redis tier + fail-safe: an instance that missed an invalidation message, whose load reads
//!   the newer tombstone and then fails, answers with the invalidated value for `max_stale`.
//! - `stale_served_after_ttl`: a spawned load that fails after its only caller timed out counts
//!   an answer nobody got; waiters of one abandoned load count once each (the docs: once).
//! - `health_over`: the non-default windows still share one history kept for the longest
//!   window ever asked for: one 1 h window stretches a 10 s window to minutes, for good.
//! - `CacheStats`: `requests()`/`hit_ratio()`/`average_load_time()` overflow near `u64::MAX`
//!   (as `evictions()` did); `average_load_time()` is wrong beyond `u32::MAX` loads.
#![cfg(not(any(loom, shuttle)))]

mod common;
#[cfg(feature = "redis")]
#[path = "common/proxy.rs"]
mod proxy;

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
/// A fail-safe cache's builder on `clock`: `TTL`, `MAX_STALE`, `BACKOFF`, statistics.
fn fail_safe_builder(capacity: u64, clock: &ManualClock) -> herdcache::CacheBuilder<u32, String> {
    Cache::builder()
        .max_capacity(capacity)
        .time_to_live(TTL)
        .fail_safe(MAX_STALE)
        .refresh_backoff(BACKOFF)
        .record_stats()
        .clock(clock.clone())
}

fn expired_cache() -> (Cache<u32, String>, ManualClock) {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = fail_safe_builder(100, &clock).build();
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
    let c: Cache<u32, String> = fail_safe_builder(100, &clock)
        .async_loader(|_k: &u32| std::future::pending::<Result<String, BoxError>>())
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    {
        let mut f = Box::pin(c.load_async(1));
        assert!(poll_once(f.as_mut()).is_pending());
    }
    let s = c.stats();
    assert_eq!(
        (s.loads_abandoned, s.stale_served_after_ttl),
        (1, 0),
        "{s:?}"
    );
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
fn s39_stats_requests_and_ratios_overflow_like_evictions_did() {
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

/// A gate a loader blocks on until it is opened.
#[derive(Clone, Default)]
struct Gate(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);
impl Gate {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    fn wait(&self) {
        let mut g = self.0 .0.lock().unwrap();
        while !*g {
            g = self.0 .1.wait(g).unwrap();
        }
    }
}

/// A cache whose loader blocks key 2 on `gate` (signalling `entered`) and counts the loads of
/// other keys, failing them while `down`.
struct Limited {
    c: Cache<u32, String>,
    clock: ManualClock,
    gate: Gate,
    entered: std::sync::mpsc::Receiver<()>,
    loads: Arc<AtomicUsize>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

fn limited(spawner: bool) -> Limited {
    let clock = ManualClock::new();
    let gate = Gate::default();
    let (tx, entered) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let loads = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (g, l, d) = (gate.clone(), Arc::clone(&loads), Arc::clone(&down));
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(TTL)
        .fail_safe(MAX_STALE)
        .refresh_backoff(BACKOFF)
        .record_stats()
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if *k == 2 {
                let _ = tx.lock().unwrap().send(());
                g.wait();
                return Ok::<_, BoxError>("two".to_string());
            }
            l.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err("down".into())
            } else {
                Ok("new".to_string())
            }
        });
    if spawner {
        b = b.spawner(|job| {
            std::thread::spawn(job);
        });
    }
    let c = b.build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    Limited {
        c,
        clock,
        gate,
        entered,
        loads,
        down,
    }
}

/// A soft timeout that passes while the leader (no spawner) waits for a permit gives the load
/// up before its loader runs: with fail-safe the caller gets the last value, the key's retry
/// deadline is set, and the next caller within the backoff gets the last value with no load.
#[test]
fn permit_timeout_without_spawner_serves_stale_and_backs_off() {
    let _w = watchdog(Duration::from_secs(60), "permit timeout");
    let l = limited(false);
    let c2 = l.c.clone();
    let holder = std::thread::spawn(move || c2.load(2));
    l.entered.recv().unwrap();
    let r = l.c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert_eq!(r.unwrap(), "old");
    let s = l.c.stats();
    assert_eq!(
        (s.timeouts, s.loads_abandoned, s.stale_served_after_ttl),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(l.loads.load(Ordering::SeqCst), 0);
    // Within the backoff: the last value at once, no load, no wait for the permit.
    let r = l.c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert_eq!(r.unwrap(), "old");
    let s = l.c.stats();
    assert_eq!((s.timeouts, s.stale_served_after_ttl), (1, 2), "{s:?}");
    l.gate.open();
    assert_eq!(holder.join().unwrap().unwrap(), "two");
    l.down.store(false, Ordering::SeqCst);
    l.clock.advance(BACKOFF);
    assert_eq!(l.c.load(1).unwrap(), "new");
    assert_eq!(l.loads.load(Ordering::SeqCst), 1);
    l.c.validate();
}

/// With a spawner the job keeps waiting for its permit past the caller's soft timeout, and
/// "on a soft timeout the load goes on, and its callers get the old value at once until it
/// ends"; when it ends (here: fails) the last value still answers, for a backoff.
#[test]
fn permit_timeout_with_spawner_serves_stale_until_the_job_ends() {
    let _w = watchdog(Duration::from_secs(60), "spawned permit timeout");
    let l = limited(true);
    let c2 = l.c.clone();
    let holder = std::thread::spawn(move || c2.load_with_timeout(2, None));
    l.entered.recv().unwrap();
    let r = l.c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert_eq!(r.unwrap(), "old");
    // Past the backoff, the spawned job still waits: callers get the last value at once.
    l.clock.advance(BACKOFF * 2);
    let t = std::time::Instant::now();
    let r = l.c.load_with_timeout(1, Some(Duration::from_secs(20)));
    assert_eq!(r.unwrap(), "old");
    assert!(t.elapsed() < Duration::from_secs(10), "waited for the load");
    assert_eq!(l.loads.load(Ordering::SeqCst), 0);
    l.gate.open();
    assert_eq!(holder.join().unwrap().unwrap(), "two");
    assert!(
        common::eventually(
            || l.loads.load(Ordering::SeqCst) == 1 && l.c.stats().loads_in_flight == 0
        ),
        "the spawned job never loaded"
    );
    // It failed: the last value answers for a backoff, with no load.
    let r = l.c.load_with_timeout(1, Some(Duration::from_secs(20)));
    assert_eq!(r.unwrap(), "old");
    assert_eq!(l.loads.load(Ordering::SeqCst), 1);
    let s = l.c.stats();
    // One timeout (the first call), one failed load (the job's), nothing abandoned.
    assert_eq!(
        (s.timeouts, s.load_failures, s.loads_abandoned),
        (1, 1, 0),
        "{s:?}"
    );
    l.c.validate();
}

/// After the backoff, many concurrent callers of a failing key: exactly one loads; every one
/// gets the last value.
#[test]
fn one_retry_per_backoff_under_concurrency() {
    let _w = watchdog(Duration::from_secs(60), "retry race");
    let (c, clock) = expired_cache();
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert_eq!(r.unwrap(), "old");
    let loads = Arc::new(AtomicUsize::new(0));
    for round in 0..5 {
        clock.advance(BACKOFF);
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (c, l, b) = (c.clone(), Arc::clone(&loads), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    b.wait();
                    c.try_get_with(1, || {
                        l.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        Err::<String, BoxError>("down".into())
                    })
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap(), "old");
        }
        assert_eq!(loads.load(Ordering::SeqCst), round + 1, "round {round}");
    }
    c.validate();
}

/// Callers that waited on one failed load count once in `stale_served_after_ttl` ("callers
/// that waited on one failed load count once").
#[test]
fn waiters_of_one_failed_load_count_once() {
    let _w = watchdog(Duration::from_secs(60), "waiters count once");
    let (c, _clock) = expired_cache();
    let gate = Gate::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let (c1, g1) = (c.clone(), gate.clone());
    let leader = std::thread::spawn(move || {
        c1.try_get_with(1, || {
            tx.send(()).unwrap();
            g1.wait();
            Err::<String, BoxError>("down".into())
        })
    });
    rx.recv().unwrap();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || c.get_with(1, || "never".to_string()))
        })
        .collect();
    assert!(common::eventually(|| c.stats().coalesced == 4));
    gate.open();
    assert_eq!(leader.join().unwrap().unwrap(), "old");
    for w in waiters {
        assert_eq!(w.join().unwrap(), "old");
    }
    let s = c.stats();
    assert_eq!(s.stale_served_after_ttl, 1, "{s:?}");
}

#[cfg(feature = "redis")]
mod tier {
    use super::{proxy, watchdog, Gate};
    use herdcache::codec::Plain;
    use herdcache::redis::{RedisTier, TieredCache};
    use herdcache::Cache;
    use herdcache_testkit::redis_server::RedisServer;
    use std::time::Duration;

    fn tier(url: String, ns: &str) -> RedisTier {
        RedisTier::new(url)
            .namespace(ns)
            .timeouts(Duration::from_millis(300), Duration::from_millis(300))
    }

    fn build(t: RedisTier) -> TieredCache<u64, u64> {
        t.build(
            Cache::builder()
                .max_capacity(1000)
                .time_to_live(Duration::from_secs(600))
                .record_stats(),
            Plain,
        )
        .unwrap()
    }

    use super::common::tier::raw;

    fn subscribed(cs: &[&TieredCache<u64, u64>]) {
        assert!(
            super::common::eventually(|| cs.iter().all(|c| c.is_subscribed())),
            "subscribers never connected"
        );
    }

    /// A's load of key 1 reads Redis (nothing there) and runs its loader; meanwhile B's
    /// `write` returns, A's subscriber hearing nothing (its connection silently dropped);
    /// then `between` runs on the server; then A's loader returns 10. Returns what a fresh
    /// instance then reads for key 1 (99 if Redis has nothing).
    fn load_across_a_write(
        server: &mut RedisServer,
        ns: &str,
        write: impl FnOnce(&TieredCache<u64, u64>),
        between: impl FnOnce(&mut RedisServer),
    ) -> u64 {
        let p = proxy::Proxy::start(server.port);
        let a = build(tier(p.url(), ns));
        let b = build(tier(server.url(), ns));
        subscribed(&[&a, &b]);
        // A's subscriber hears nothing from here on (its connection stays open, silent); new
        // connections (A's loads) work.
        p.black_hole_open_connections();
        let gate = Gate::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (a2, g) = (a.clone(), gate.clone());
        let loader = std::thread::spawn(move || {
            a2.get_with(1, || {
                tx.send(()).unwrap();
                g.wait();
                10
            })
        });
        rx.recv().unwrap();
        write(&b);
        between(server);
        gate.open();
        assert_eq!(loader.join().unwrap(), 10);
        let s = a.stats().remote;
        assert_eq!((s.timeouts, s.misses), (0, 1), "A read Redis: {s:?}");
        // What Redis yields now: a fresh instance's read of key 1 (99: nothing there).
        let c = build(tier(server.url(), ns));
        let v = c.get_with(1, || 99);
        assert_eq!(c.stats().remote.errors, 0);
        v
    }

    fn flush(server: &mut RedisServer) {
        let _: () = redis::cmd("FLUSHALL").query(&mut raw(server)).unwrap();
    }

    /// Control: without a flush, the write-back of a load that read Redis before B's write is
    /// refused (the version or epoch moved): Redis keeps B's value, or nothing.
    #[test]
    fn a_load_older_than_a_write_is_not_written_back() {
        let _w = watchdog(Duration::from_secs(60), "write vs load");
        let mut server = RedisServer::start();
        let got = load_across_a_write(&mut server, "s50a", |b| b.insert(1, 20), |_| {});
        assert_eq!(got, 20);
        let got = load_across_a_write(&mut server, "s50c", |b| b.invalidate(&1), |_| {});
        assert_eq!(got, 99);
        // Written back (Redis holds 10), but with the epoch it read: ignored by readers.
        let got = load_across_a_write(&mut server, "s50d", |b| b.invalidate_all(), |_| {});
        assert_eq!(got, 99);
    }

    /// "After `insert`, `invalidate`, `remove` or `invalidate_all` returns on any instance,
    /// Redis never again yields an older value for the key" (the `redis` module docs; the
    /// last stop extended the epoch to a loss: "an epoch lost with its key (a restart without
    /// persistence, `FLUSHALL`, an eviction) comes back above every epoch a load may have read
    /// before"). A key's version lost the same way is not covered: a load that read the key
    /// absent (version '0') before B's `insert` returned, and writes back after a `FLUSHALL`
    /// removed B's value and version, finds the key absent again — version '0', as it read —
    /// and stores its older value, which every instance then reads from Redis (B's local copy
    /// says 20, Redis 10). Cause: `WRITE_BACK` in src/redis/scripts.rs compares the version
    /// with `or '0'`, so "absent when read" and "absent again after a loss" look alike (the
    /// read could remember the server's clock, or the epoch key exist from the first read, so
    /// that a loss shows).
    #[test]
    fn s39_a_flush_between_a_loads_read_and_its_write_back_lets_an_older_value_back() {
        let _w = watchdog(Duration::from_secs(60), "flush vs load");
        let mut server = RedisServer::start();
        let got = load_across_a_write(&mut server, "s50b", |b| b.insert(1, 20), flush);
        assert_ne!(
            got, 10,
            "Redis yields the load's value 10, older than B's insert of 20 that returned before"
        );
    }

    /// The same with `invalidate` (a tombstone, lost with the flush) and `invalidate_all` (its
    /// epoch lost with the flush: the load's value, written with the epoch it read, absent, is
    /// current again): Redis yields a value loaded before the invalidation returned.
    #[test]
    fn s39_a_flush_between_a_loads_read_and_its_write_back_undoes_an_invalidation() {
        let _w = watchdog(Duration::from_secs(60), "flush vs load (invalidations)");
        let mut server = RedisServer::start();
        let one = load_across_a_write(&mut server, "s50e", |b| b.invalidate(&1), flush);
        let all = load_across_a_write(&mut server, "s50f", |b| b.invalidate_all(), flush);
        assert_eq!(
            (one, all),
            (99, 99),
            "Redis yields the value loaded before invalidate / invalidate_all returned"
        );
    }

    /// Fail-safe on a tiered cache whose subscriber missed an invalidation. The `redis`
    /// module docs: "an instance whose subscriber was disconnected when a message was sent
    /// keeps serving its local copy until that copy expires — **at most the local time to
    /// live** (or time to idle), and never past the tier's time to live from the load", and
    /// fail-safe's "Writes win: an insert or invalidate replaces or removes the old entry, so
    /// a load that fails afterwards has nothing to fall back on". Here A's copy has expired
    /// and A's load reads Redis, which holds B's tombstone (A now knows the key was
    /// invalidated after its copy was loaded); the loader fails; A answers with the
    /// invalidated value — past its local time to live, for up to `max_stale` (the next
    /// calls too, for the backoff, with no load). Expected: the load that found the newer
    /// tombstone ends the stale value (the error, as after a local `invalidate`). Cause: the
    /// tier's fetch (src/redis/tier.rs, `Tier::fetch`) treats a tombstone as "nothing in
    /// Redis" and the failure falls back in `Cache::publish` (src/load.rs) on the local entry,
    /// which nothing removed.
    #[test]
    fn s39_fail_safe_serves_a_value_the_fleet_invalidated_after_the_tombstone_was_read() {
        let _w = watchdog(Duration::from_secs(60), "fail-safe vs fleet invalidation");
        let server = RedisServer::start();
        let p = proxy::Proxy::start(server.port);
        let ns = "s50fs";
        let clock = herdcache::ManualClock::new();
        let a: TieredCache<u64, u64> = tier(p.url(), ns)
            .build(
                Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(60))
                    .fail_safe(Duration::from_secs(600))
                    .refresh_backoff(Duration::from_secs(5))
                    .record_stats()
                    .clock(clock.clone()),
                Plain,
            )
            .unwrap();
        let b = build(tier(server.url(), ns));
        subscribed(&[&a, &b]);
        // A's subscriber goes silent (no pooled connection yet); new connections work.
        p.black_hole_open_connections();
        assert_eq!(a.get_with(1, || 10), 10);
        b.invalidate(&1); // returns: the fleet's copies of 10 are invalidated (A misses it)
        clock.advance(Duration::from_secs(61)); // A's local copy expires
        let r: Result<u64, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        let s = a.stats();
        assert!(
            s.remote.misses >= 1 && s.remote.timeouts == 0,
            "A read Redis: {s:?}"
        );
        assert!(
            r.is_err(),
            "A answered {r:?}: the value B invalidated, {} s past A's local time to live",
            61
        );
    }
}

/// A fail-safe cache with one stale answer served now (a `ServingStale` to watch).
fn serve_one_stale(c: &Cache<u32, String>, clock: &ManualClock) {
    c.insert(9, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(c.get_or_stale(&9).as_deref(), Some("old"));
    c.invalidate(&9);
}

fn serving_stale(h: &herdcache::Health) -> bool {
    h.warnings()
        .iter()
        .any(|w| matches!(w, herdcache::Warning::ServingStale { .. }))
}

/// `health()` called every 10 s, `health_over(1 h)` and `health_over(5 s)` every second in
/// between: the default window stays 60-70 s once a minute has passed (its own snapshots),
/// and `ServingStale` clears within about a minute of the last stale answer; after a jump of
/// three hours the window covers the jump, then comes back.
#[test]
fn default_window_keeps_its_pace_among_other_windows() {
    let (c, clock) = expired_cache();
    let _ = c.health();
    serve_one_stale(&c, &clock);
    let mut cleared_at = None;
    for s in 1..=200u64 {
        clock.advance(Duration::from_secs(1));
        let _ = c.health_over(Duration::from_secs(3600));
        let _ = c.health_over(Duration::from_secs(5));
        if s % 10 == 0 {
            let h = c.health();
            if s >= 80 {
                assert!(
                    (60..=70).contains(&h.window().as_secs()),
                    "at {s}: {:?}",
                    h.window()
                );
            }
            if !serving_stale(&h) && cleared_at.is_none() {
                cleared_at = Some(s);
            }
        }
    }
    let at = cleared_at.expect("ServingStale never cleared");
    assert!(at <= 80, "cleared at {at} s");
    clock.advance(Duration::from_secs(3 * 3600));
    let h = c.health();
    assert!(
        h.window() >= Duration::from_secs(3 * 3600),
        "{:?}",
        h.window()
    );
    for _ in 0..80 {
        clock.advance(Duration::from_secs(1));
        let _ = c.health_over(Duration::from_secs(3600));
    }
    let h = c.health();
    assert!(
        (60..=70).contains(&h.window().as_secs()),
        "{:?}",
        h.window()
    );
}

/// Many threads calling `health` and `health_over` at once while the clock moves: no panic,
/// no deadlock, and the default window is sane afterwards.
#[test]
fn concurrent_health_calls() {
    let _w = watchdog(Duration::from_secs(60), "concurrent health");
    let (c, clock) = expired_cache();
    std::thread::scope(|sc| {
        for t in 0..6u64 {
            let (c, clock) = (&c, &clock);
            sc.spawn(move || {
                for i in 0..2000u64 {
                    if t == 0 && i % 10 == 0 {
                        clock.advance(Duration::from_millis(500));
                    }
                    let w = match (t + i) % 4 {
                        0 => c.health(),
                        1 => c.health_over(Duration::from_secs(1 + i % 7)),
                        2 => c.health_over(Duration::from_secs(7200)),
                        _ => c.health_over(Duration::ZERO),
                    };
                    let _ = w.window();
                    let _ = c.get_or_stale(&1);
                }
            });
        }
    });
    for _ in 0..20 {
        clock.advance(Duration::from_secs(5));
        let _ = c.health();
    }
    let h = c.health();
    assert!(
        (60..=70).contains(&h.window().as_secs()),
        "{:?}",
        h.window()
    );
}

/// Module docs of `health`: "Each call compares the figures of now with those of a snapshot
/// kept by earlier calls: the newest one at least `window` old", "one per eighth of the window
/// at most, 16 at most", and `Health::window`: "The period the figures cover (shorter than
/// asked for when no snapshot that old exists)". The last stop gave `health()`'s 60 s window
/// its own snapshots because "one health_over(long) call stretched it for good"; every other
/// window still shares one history, kept for the longest of them and thinned to 16. So a
/// 10 s window called every second, beside a 1 h window called every 30 s, covers minutes,
/// not 10 s (182 s here; 13 s without the 1 h calls): a `ServingStale` of one moment stays
/// raised by `health_over(10 s)` for minutes
/// after it stopped, although snapshots 10-12 s old were taken by the 10 s calls themselves
/// and thrown away — and for good: an hour after the last 1 h call the 10 s window still
/// covers about 3 minutes (the history stays kept for the longest window ever asked for). Cause: `Monitor::other` in src/monitor.rs (one `History` for every
/// non-default window) and `History::keep`'s thinning (the short window's dense recent
/// snapshots are the closest neighbours, so they go first).
#[test]
fn s39_a_long_window_stretches_every_other_short_window() {
    let (c, clock) = expired_cache();
    let short = Duration::from_secs(10);
    // Two minutes of the 10 s window alone, then the 1 h window joins every 30 s.
    for s in 1..=3600u64 {
        clock.advance(Duration::from_secs(1));
        if s >= 120 && s % 30 == 0 {
            let _ = c.health_over(Duration::from_secs(3600));
        }
        let h = c.health_over(short);
        if s == 100 {
            assert!(
                h.window() <= Duration::from_secs(15),
                "alone: {:?}",
                h.window()
            );
        }
    }
    serve_one_stale(&c, &clock);
    let mut raised_for = 0;
    for _ in 0..120 {
        clock.advance(Duration::from_secs(1));
        if serving_stale(&c.health_over(short)) {
            raised_for += 1;
        }
    }
    // An hour more of the 10 s window alone: the 1 h window asked for once keeps it long.
    for _ in 0..3600 {
        clock.advance(Duration::from_secs(1));
        let _ = c.health_over(short);
    }
    let later = c.health_over(short).window();
    let h = c.health_over(short);
    assert!(
        raised_for <= 15 && h.window() <= Duration::from_secs(15),
        "a 10 s window raised one stale answer for {raised_for} s; an hour after the last \
         1 h call it still covers {later:?}"
    );
}

/// A future that ends with `T` once opened (wakes its last poller).
#[derive(Clone, Default)]
struct FutGate(Arc<std::sync::Mutex<(bool, Option<std::task::Waker>)>>);
impl FutGate {
    fn open(&self) {
        let w = {
            let mut g = self.0.lock().unwrap();
            g.0 = true;
            g.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
    fn wait<T>(self, v: T) -> impl Future<Output = T> + Send + 'static
    where
        T: Send + 'static + Unpin,
    {
        let mut v = Some(v);
        std::future::poll_fn(move |cx| {
            let mut g = self.0.lock().unwrap();
            if g.0 {
                Poll::Ready(v.take().expect("polled after ready"))
            } else {
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// "Blocking callers never poll it (it may need its runtime): they wait, and load themselves
/// if the async callers all went away" — with fail-safe, an abandoned load is a failure
/// ("every caller of that load gets the old value"): the blocking joiner of a shared load
/// whose only async caller is dropped gets the last value, the load counts as abandoned once,
/// and the next caller within the backoff gets the last value too; the shared future (which
/// would have ended later) is gone with its result.
#[test]
fn blocking_joiner_of_a_dropped_shared_load_gets_the_last_value() {
    let _w = watchdog(Duration::from_secs(60), "blocking joiner of shared");
    for fails in [false, true] {
        let (c, clock) = expired_cache();
        let gate = FutGate::default();
        let mut f = Box::pin(c.try_get_with_async_shared(1, {
            let g = gate.clone();
            async move {
                let r: Result<String, String> = if fails {
                    Err(g.wait("down".to_string()).await)
                } else {
                    Ok(g.wait("new".to_string()).await)
                };
                r
            }
        }));
        assert!(poll_once(f.as_mut()).is_pending());
        let c2 = c.clone();
        let joiner = std::thread::spawn(move || c2.get_with(1, || "joiner's own".to_string()));
        assert!(common::eventually(|| c.stats().coalesced == 1));
        drop(f);
        gate.open();
        let got = joiner.join().unwrap();
        let s = c.stats();
        assert_eq!(got, "old", "{s:?}");
        assert_eq!(
            (
                s.loads_abandoned,
                s.load_failures,
                s.load_successes,
                s.stale_served_after_ttl
            ),
            (1, 0, 0, 1),
            "{s:?}"
        );
        check_backoff(&c, &clock, "shared load dropped under a blocking joiner");
    }
}

/// More shapes of a failed load of an expired key: an async `init` that panics (the panic goes
/// to its caller; the next caller within the backoff gets the last value), `try_get_with_async`
/// errors, `get_all`'s loader leaving the key out, the entry API; and an `optionally_` `None`
/// (an answer: the last value goes for good).
#[test]
fn more_failure_shapes_fall_back() {
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "failure shapes");
    // Async init panic.
    let (c, clock) = expired_cache();
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(c.get_with_async(1, async { panic!("injected") }))
    }));
    assert!(r.is_err());
    assert_eq!(c.stats().load_failures, 1, "{:?}", c.stats());
    check_backoff(&c, &clock, "async init panic");
    // Shared async init panic.
    let (c, clock) = expired_cache();
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(c.get_with_async_shared(1, async { panic!("injected") }))
    }));
    assert!(r.is_err());
    check_backoff(&c, &clock, "shared async init panic");
    // try_get_with_async error.
    let (c, clock) = expired_cache();
    let r = futures::executor::block_on(
        c.try_get_with_async(1, async { Err::<String, BoxError>("down".into()) }),
    );
    assert_eq!(r.unwrap(), "old");
    check_backoff(&c, &clock, "async error");
    // get_all leaving the key out.
    let (c, clock) = expired_cache();
    let all = c.get_all([1], |_| std::collections::HashMap::new());
    assert_eq!(all.get(&1).map(String::as_str), Some("old"));
    assert_eq!(c.stats().stale_served_after_ttl, 1);
    check_backoff(&c, &clock, "get_all");
    // Entry API.
    let (c, clock) = expired_cache();
    let e = c
        .entry(1)
        .or_try_insert_with(|| Err::<String, BoxError>("down".into()));
    assert_eq!(e.unwrap().into_value(), "old");
    check_backoff(&c, &clock, "entry");
    // optionally_: None removes the last value.
    let (c, _clock) = expired_cache();
    assert_eq!(c.optionally_get_with(1, || None), None);
    assert_eq!(c.get_or_stale(&1), None);
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert!(r.is_err());
    c.validate();
}

/// The misses identity of `CacheStats::misses` ("once every call has returned, `misses ==
/// load_successes + load_failures + loads_abandoned + coalesced + negative_hits`, less the
/// refreshes") under concurrency: threads loading few keys with errors, panics, cancelled
/// shared and borrowed async loads, fail-safe answers and expiry on a moving manual clock.
/// (A shared load another caller joined outlives its cancelled owner: it must be able to
/// finish, or that caller waits for ever — a hang CI met once in several runs.)
#[test]
fn miss_identity_under_concurrent_failures_and_cancellations() {
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "identity storm");
    for negative in [false, true] {
        let clock = ManualClock::new();
        let mut b = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(2))
            .fail_safe(Duration::from_secs(30))
            .refresh_backoff(Duration::from_millis(500))
            .record_stats()
            .clock(clock.clone());
        if negative {
            b = b.negative_ttl(Duration::from_millis(300));
        }
        let c: Cache<u32, u64> = b.build();
        std::thread::scope(|sc| {
            for t in 0..6u64 {
                let (c, clock) = (&c, &clock);
                sc.spawn(move || {
                    let mut r = common::rng(t + 11);
                    for i in 0..3000u64 {
                        let k = (r() % 4) as u32;
                        if t == 0 && i % 20 == 0 {
                            clock.advance(Duration::from_millis(150));
                        }
                        match r() % 7 {
                            0 => {
                                let _ = c.get_with(k, || i);
                            }
                            1 => {
                                let _ = c.try_get_with(k, || Err::<u64, &str>("down"));
                            }
                            2 => {
                                let _ = catch_unwind(AssertUnwindSafe(|| {
                                    c.get_with(k, || -> u64 { panic!("injected") })
                                }));
                            }
                            3 => {
                                // Pending at the one poll it gets here, ready at the next: a
                                // caller that joined before the drop drives it to the end (a
                                // forever-pending shared load would keep such a caller, and
                                // every later one, waiting for ever, as documented).
                                let mut f = Box::pin(c.get_with_async_shared(k, async move {
                                    common::Yield(1).await;
                                    i
                                }));
                                let _ = poll_once(f.as_mut());
                            }
                            4 => {
                                let mut f =
                                    Box::pin(c.get_with_async(k, std::future::pending::<u64>()));
                                let _ = poll_once(f.as_mut());
                            }
                            5 => {
                                let _ = futures::executor::block_on(
                                    c.try_get_with_async(k, async { Err::<u64, &str>("down") }),
                                );
                            }
                            _ => {
                                let _ = c.optionally_get_with(k, || (i % 3 != 0).then_some(i));
                            }
                        }
                    }
                });
            }
        });
        let s = c.stats();
        assert_eq!(s.loads_in_flight, 0, "{s:?}");
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits
                - s.refreshes_started,
            "negative {negative}: {s:?}"
        );
        c.validate();
    }
}

/// "Never beyond `max_stale`: once `deadline + max_stale` passes, the entry is gone (the
/// check is exact, against the clock, not the reclaim)": one nanosecond before, the last value
/// answers a failed load; at it, the error comes back.
#[test]
fn max_stale_is_exact_to_the_nanosecond() {
    let (c, clock) = expired_cache(); // now: deadline + 1 s
    clock.advance(MAX_STALE - Duration::from_secs(1) - Duration::from_nanos(1));
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert_eq!(r.unwrap(), "old");
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get_or_stale(&1), None);
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert!(r.is_err());
}

/// Fail-safe on a time to idle: the stale window runs from the idle deadline; a stale answer
/// is no access (it does not move the window).
#[test]
fn fail_safe_on_time_to_idle() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10)
        .time_to_idle(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(60))
        .refresh_backoff(BACKOFF)
        .clock(clock.clone())
        .build();
    c.insert(1, "old".to_string());
    clock.advance(Duration::from_secs(5));
    assert_eq!(c.get(&1).as_deref(), Some("old")); // idle deadline: 15 s
    clock.advance(Duration::from_secs(11)); // 16 s
    assert_eq!(c.get(&1), None);
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert_eq!(r.unwrap(), "old");
    clock.advance(Duration::from_secs(58)); // 74 s: within 15 + 60
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    clock.advance(Duration::from_secs(1)); // 75 s
    assert_eq!(c.get_or_stale(&1), None);
}

/// "A refresh that fails while the value is still live sets the next refresh a backoff ahead"
/// (not fail-safe's retry deadline): after expiry the first caller loads, and only its failure
/// starts the backoff.
#[test]
fn a_failed_live_refresh_does_not_start_the_fail_safe_backoff() {
    let clock = ManualClock::new();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let loads = Arc::new(AtomicUsize::new(0));
    let (d, l) = (Arc::clone(&down), Arc::clone(&loads));
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .refresh_after(Duration::from_secs(30))
        .loader(move |_k: &u32| {
            l.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err::<String, BoxError>("down".into())
            } else {
                Ok("new".to_string())
            }
        })
        .build();
    c.insert(1, "old".to_string());
    clock.advance(Duration::from_secs(31));
    assert_eq!(c.get(&1).as_deref(), Some("old")); // refresh runs here, fails
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(c.stats().refreshes_failed, 1);
    clock.advance(Duration::from_secs(30)); // expired (61 s)
    down.store(false, Ordering::SeqCst);
    assert_eq!(c.load(1).unwrap(), "new");
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

/// `CacheStats::average_load_time`: "The mean duration of a finished load." Beyond `u32::MAX`
/// finished loads (about 50 days at 1,000 loads per second) it divides by `u32::MAX` instead
/// of the count: 2^33 loads of 1 s each average 2 s. Cause: `average_load_time` in
/// src/stats.rs divides the `Duration` by `u32::try_from(n).unwrap_or(u32::MAX)` (dividing
/// the nanoseconds as `u128` by `n` is exact).
#[test]
fn s39_average_load_time_is_wrong_beyond_u32_max_loads() {
    let mut s = CacheStats::default();
    s.load_successes = 1 << 33;
    s.total_load_time = Duration::from_secs(1 << 33);
    assert_eq!(s.average_load_time(), Duration::from_secs(1));
}

/// "Until a load fails, the key behaves as without fail-safe": a retry deadline set by a
/// failure belongs to the value that failed to reload. Once a write (`insert`), a successful
/// load after the backoff, or a successful load that went on past a soft timeout replaced it,
/// the next expiry is loaded at once by the first caller, even within the old backoff.
#[test]
fn a_new_value_starts_without_the_old_retry_deadline() {
    let _w = watchdog(Duration::from_secs(60), "retry deadline carried");
    let short_ttl = Duration::from_secs(2);
    let backoff = Duration::from_secs(100);
    for how in 0..3 {
        let clock = ManualClock::new();
        let c: Cache<u32, String> = Cache::builder()
            .max_capacity(10)
            .time_to_live(short_ttl)
            .fail_safe(MAX_STALE)
            .refresh_backoff(backoff)
            .record_stats()
            .clock(clock.clone())
            .build();
        c.insert(1, "old".to_string());
        clock.advance(short_ttl);
        let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
        assert_eq!(r.unwrap(), "old");
        match how {
            0 => c.insert(1, "v2".to_string()),
            1 => {
                clock.advance(backoff);
                assert_eq!(c.get_with(1, || "v2".to_string()), "v2");
            }
            _ => {
                // Fail again after the backoff, but write meanwhile through a compute.
                let e = c
                    .entry(1)
                    .and_compute_with(|_| herdcache::Op::Put("v2".to_string()));
                let _ = e;
            }
        }
        assert_eq!(c.get(&1).as_deref(), Some("v2"), "how {how}");
        clock.advance(short_ttl); // v2 expired, well within the first failure's backoff
        let loaded = AtomicUsize::new(0);
        let v = c.get_with(1, || {
            loaded.fetch_add(1, Ordering::SeqCst);
            "v3".to_string()
        });
        assert_eq!(
            (v.as_str(), loaded.load(Ordering::SeqCst)),
            ("v3", 1),
            "how {how}: the expired v2 was served instead of a load"
        );
    }
}

type Jobs = Arc<std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

/// "Not a failure: ... a refresh that never ran (deferred by the load limit, dropped by the
/// spawner, taken over)": a refresh job the spawner keeps, then drops unrun after the value
/// expired, starts no backoff: the next caller loads.
#[test]
fn a_refresh_dropped_after_expiry_is_not_a_failure() {
    let _w = watchdog(Duration::from_secs(60), "dropped refresh");
    {
        let clock = ManualClock::new();
        let jobs: Jobs = Arc::default();
        let j = Arc::clone(&jobs);
        let c: Cache<u32, String> = fail_safe_builder(10, &clock)
            .refresh_after(Duration::from_secs(30))
            .loader(|_k: &u32| Err::<String, BoxError>("down".into()))
            .spawner(move |job| j.lock().unwrap().push(job))
            .build();
        c.insert(1, "old".to_string());
        clock.advance(Duration::from_secs(59));
        assert_eq!(c.get(&1).as_deref(), Some("old"));
        assert_eq!(jobs.lock().unwrap().len(), 1, "the refresh job");
        clock.advance(Duration::from_secs(2)); // expired
        let parked: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
        drop(parked);
        let loaded = AtomicUsize::new(0);
        let v = c.get_with(1, || {
            loaded.fetch_add(1, Ordering::SeqCst);
            "new".to_string()
        });
        assert_eq!(
            (v.as_str(), loaded.load(Ordering::SeqCst)),
            ("new", 1),
            "a refresh dropped unrun started fail-safe's backoff"
        );
        jobs.lock().unwrap().clear();
        c.validate();
    }
}

/// An async leader dropped while it waits for a `max_concurrent_loads` permit is an
/// abandoned leader ("A load fails — ... an abandoned async leader"): counted once in
/// `loads_abandoned`, the permit queue left clean, and the next caller within the backoff
/// gets the last value with no load.
#[test]
fn async_leader_dropped_in_the_permit_queue_backs_off() {
    let _w = watchdog(Duration::from_secs(60), "queued async leader");
    for shared in [false, true] {
        let l = limited(false);
        let c2 = l.c.clone();
        let holder = std::thread::spawn(move || c2.load(2));
        l.entered.recv().unwrap();
        {
            let mut f: Pin<Box<dyn Future<Output = String> + Send>> = if shared {
                Box::pin(l.c.get_with_async_shared(1, async { "never".to_string() }))
            } else {
                Box::pin(l.c.get_with_async(1, async { "never".to_string() }))
            };
            assert!(poll_once(f.as_mut()).is_pending(), "queued for the permit");
        }
        let s = l.c.stats();
        assert_eq!(s.loads_abandoned, 1, "shared {shared}: {s:?}");
        l.gate.open();
        assert_eq!(holder.join().unwrap().unwrap(), "two");
        let v = l.c.get_with(1, || "init".to_string());
        assert_eq!(
            v, "old",
            "shared {shared}: no backoff after the queued leader left"
        );
        // The permit is free: a load of another key runs at once.
        assert_eq!(l.c.get_with(3, || "three".to_string()), "three");
        assert_eq!(l.c.stats().loads_in_flight, 0);
        l.c.validate();
    }
}

/// Negative caching beside fail-safe: an error remembered for a key with no value is ended
/// by a write ("Writes win"); once that value expires, a failed load falls back on it instead
/// of the remembered error. A failed load with a value to fall back on is not remembered.
#[test]
fn negative_entries_and_fail_safe() {
    let clock = ManualClock::new();
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10)
        .time_to_live(TTL)
        .negative_ttl(Duration::from_secs(3600))
        .fail_safe(MAX_STALE)
        .refresh_backoff(BACKOFF)
        .record_stats()
        .clock(clock.clone())
        .build();
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert!(r.is_err());
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Ok("unused".into()));
    assert!(r.is_err(), "remembered");
    c.insert(1, "v".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert_eq!(r.unwrap(), "v");
    // Past the backoff: the retry fails again; still the last value, not a remembered error.
    clock.advance(BACKOFF);
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Err("down".into()));
    assert_eq!(r.unwrap(), "v");
    clock.advance(BACKOFF);
    let r: Result<String, Arc<BoxError>> = c.try_get_with(1, || Ok("fresh".into()));
    assert_eq!(r.unwrap(), "fresh");
    assert_eq!(c.stats().negative_hits, 1);
}

/// "A full cache evicts them [expired entries kept for fail-safe] before live entries, the
/// longest expired first (reported `Expired`)"; an expired entry kept for fail-safe counts
/// towards the capacity, and one past `max_stale` is gone. Also `stats().expired` and
/// `evictions()` agree with the listener.
#[test]
fn a_full_cache_evicts_stale_entries_first() {
    let clock = ManualClock::new();
    let seen: Arc<std::sync::Mutex<Vec<(u32, herdcache::RemovalCause)>>> = Arc::default();
    let s2 = Arc::clone(&seen);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(4)
        .shards(1)
        .time_to_live(TTL)
        .fail_safe(MAX_STALE)
        .record_stats()
        .clock(clock.clone())
        .eviction_listener(move |k, _v, cause| s2.lock().unwrap().push((*k, cause)))
        .build();
    c.insert(1, "a".into());
    clock.advance(Duration::from_secs(10));
    c.insert(2, "b".into());
    clock.advance(Duration::from_secs(20));
    c.insert(3, "c".into());
    c.insert(4, "d".into());
    clock.advance(Duration::from_secs(45)); // 1 and 2 expired (at 60 and 70); 3, 4 live
    c.run_pending_tasks();
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("a"));
    assert_eq!(c.get_or_stale(&2).as_deref(), Some("b"));
    c.insert(5, "e".into());
    c.run_pending_tasks();
    c.insert(6, "f".into());
    c.run_pending_tasks();
    let removed = seen.lock().unwrap().clone();
    assert_eq!(
        removed,
        vec![
            (1, herdcache::RemovalCause::Expired),
            (2, herdcache::RemovalCause::Expired)
        ]
    );
    for k in 3..=6 {
        assert!(c.contains_key(&k), "{k}");
    }
    let s = c.stats();
    assert_eq!((s.expired.count, s.size.count), (2, 0), "{s:?}");
    assert_eq!(s.evictions().count, 2);
    c.validate();
}

/// `get_or_stale` reads "as `get`": a live value is a hit, a stale or absent one a miss (and a
/// stale answer counts in `stale_served_after_ttl`, as any fail-safe answer).
#[test]
fn get_or_stale_counts_as_get() {
    let (c, _clock) = expired_cache();
    c.insert(2, "live".to_string());
    let before = c.stats();
    assert_eq!(c.get_or_stale(&2).as_deref(), Some("live"));
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    assert_eq!(c.get_or_stale(&3), None);
    let d = c.stats() - before;
    assert_eq!(
        (d.hits, d.misses, d.stale_served_after_ttl, d.requests()),
        (1, 2, 1, 3),
        "{d:?}"
    );
}

/// `get_all` whose `load_missing` panics over two expired keys: the panic reaches the caller,
/// each key's load counts as failed ("`get_all`'s `load_missing` — one per key"), and each
/// key is then in its backoff: the next calls get the last values with no load.
#[test]
fn get_all_panic_backs_off_every_key() {
    common::quiet_injected_panics();
    let (c, clock) = expired_cache();
    c.insert(2, "old2".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    let before = c.stats();
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.get_all([1, 2], |_| -> std::collections::HashMap<u32, String> {
            panic!("injected")
        })
    }));
    assert!(r.is_err());
    let d = c.stats() - before;
    assert_eq!(d.load_failures, 2, "{d:?}");
    let calls = AtomicUsize::new(0);
    let all = c.get_all([1, 2], |m| {
        calls.fetch_add(1, Ordering::SeqCst);
        m.iter().map(|&k| (k, "new".to_string())).collect()
    });
    assert_eq!(calls.load(Ordering::SeqCst), 0, "{all:?}");
    assert_eq!(all.get(&1).map(String::as_str), Some("old"));
    assert_eq!(all.get(&2).map(String::as_str), Some("old2"));
    check_backoff(&c, &clock, "get_all panic");
}

/// "The backend sees at most one load of the key per backoff", with cancellations: threads
/// starting shared and borrowed async loads of an expired key and dropping them after a poll,
/// the clock standing still: one load is started (and abandoned) in all; every other call is
/// answered by the last value at its first poll, or joined that one load.
#[test]
fn one_abandoned_load_per_backoff_under_concurrent_cancellations() {
    let _w = watchdog(Duration::from_secs(60), "cancel storm");
    let (c, _clock) = expired_cache();
    let started = Arc::new(AtomicUsize::new(0));
    let stale = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|sc| {
        for t in 0..6 {
            let (c, started, stale) = (&c, &started, &stale);
            sc.spawn(move || {
                for i in 0..300 {
                    let s2 = Arc::clone(started);
                    let mut f: Pin<Box<dyn Future<Output = String> + Send>> = if (t + i) % 2 == 0 {
                        Box::pin(c.get_with_async_shared(1, async move {
                            s2.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<String>().await
                        }))
                    } else {
                        Box::pin(c.get_with_async(1, async move {
                            s2.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<String>().await
                        }))
                    };
                    if let Poll::Ready(v) = poll_once(f.as_mut()) {
                        assert_eq!(v, "old");
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let s = c.stats();
    assert_eq!(started.load(Ordering::SeqCst), 1, "{s:?}");
    assert_eq!(s.loads_abandoned, 1, "{s:?}");
    assert_eq!(
        s.stale_served_after_ttl,
        stale.load(Ordering::SeqCst) as u64,
        "{s:?}"
    );
    c.validate();
}

/// "A load fails — ... a failed refresh it joined": a caller of an expired key that joins the
/// key's refresh (started while the value was live, run late by the spawner) gets the last
/// value when the refresh fails, and the key is then in its backoff.
#[test]
fn a_load_that_joined_a_failed_refresh_falls_back() {
    let _w = watchdog(Duration::from_secs(60), "joined refresh");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let j = Arc::clone(&jobs);
    let loads = Arc::new(AtomicUsize::new(0));
    let l = Arc::clone(&loads);
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .refresh_after(Duration::from_secs(30))
        .loader(move |_k: &u32| {
            l.fetch_add(1, Ordering::SeqCst);
            Err::<String, BoxError>("down".into())
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    c.insert(1, "old".to_string());
    clock.advance(Duration::from_secs(59));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    assert_eq!(jobs.lock().unwrap().len(), 1);
    clock.advance(Duration::from_secs(2)); // expired, the refresh still queued
    let c2 = c.clone();
    let joiner = std::thread::spawn(move || c2.load(1));
    assert!(common::eventually(|| c.stats().coalesced == 1));
    let parked: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    for job in parked {
        job();
    }
    assert_eq!(joiner.join().unwrap().unwrap(), "old");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let s = c.stats();
    assert_eq!(
        (s.refreshes_failed, s.stale_served_after_ttl),
        (1, 1),
        "{s:?}"
    );
    // Within the backoff: the last value, no load.
    assert_eq!(c.load(1).unwrap(), "old");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    jobs.lock().unwrap().clear();
    c.validate();
}

/// "Not a failure: ... a refresh that never ran (deferred by the load limit, dropped by the
/// spawner, taken over)": a caller of the expired key that joined such a refresh, dropped
/// unrun by the spawner, loads itself (the backend is up: it gets the new value), with no
/// fail-safe answer.
#[test]
fn a_load_that_joined_a_dropped_refresh_loads_itself() {
    let _w = watchdog(Duration::from_secs(60), "joined dropped refresh");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let j = Arc::clone(&jobs);
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .refresh_after(Duration::from_secs(30))
        .loader(|_k: &u32| Ok::<_, BoxError>("new".to_string()))
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    c.insert(1, "old".to_string());
    clock.advance(Duration::from_secs(59));
    assert_eq!(c.get(&1).as_deref(), Some("old"));
    clock.advance(Duration::from_secs(2));
    let c2 = c.clone();
    let joiner = std::thread::spawn(move || c2.load(1));
    assert!(common::eventually(|| c.stats().coalesced == 1));
    let parked: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    drop(parked);
    assert_eq!(joiner.join().unwrap().unwrap(), "new");
    assert_eq!(c.stats().stale_served_after_ttl, 0);
    jobs.lock().unwrap().clear();
    c.validate();
}

/// `refreshes_started`: "Each ends as one of the next two" (`refreshes_succeeded`,
/// `refreshes_failed`) — for refreshes that succeed, fail, are dropped unrun by the spawner
/// (before or after the value expired, joined or not), and are deferred by a full load limit.
#[test]
fn every_started_refresh_ends_as_succeeded_or_failed() {
    let _w = watchdog(Duration::from_secs(60), "refresh ends");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let j = Arc::clone(&jobs);
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = Arc::clone(&fail);
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .refresh_after(Duration::from_secs(30))
        .loader(move |_k: &u32| {
            if f.load(Ordering::SeqCst) {
                Err::<String, BoxError>("down".into())
            } else {
                Ok("new".to_string())
            }
        })
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    let run_jobs = |run: bool| {
        let parked: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
        for job in parked {
            if run {
                job();
            }
        }
    };
    for round in 0..6u32 {
        c.insert(round, "v".to_string());
    }
    clock.advance(Duration::from_secs(31));
    // 0: succeeds; 1: fails; 2: dropped while live; 3: dropped after expiry, joined.
    for k in 0..4u32 {
        assert!(c.get(&k).is_some());
    }
    assert_eq!(jobs.lock().unwrap().len(), 4);
    let parked: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let mut it = parked.into_iter();
    it.next().unwrap()();
    fail.store(true, Ordering::SeqCst);
    it.next().unwrap()();
    drop(it.next());
    let last = it.next().unwrap();
    clock.advance(Duration::from_secs(30));
    let c2 = c.clone();
    let joiner = std::thread::spawn(move || c2.load(3));
    assert!(common::eventually(|| c.stats().coalesced == 1));
    drop(last);
    let _ = joiner.join().unwrap();
    run_jobs(false);
    let s = c.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    assert_eq!(
        s.misses + s.refreshes_started,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "{s:?}"
    );
    jobs.lock().unwrap().clear();
    c.validate();
}

/// A spawner that drops every job unrun: "a load falls back to running in its caller". With
/// fail-safe and a failing loader, the caller's own load fails and the last value answers;
/// nothing is counted abandoned (the caller loads the job's load itself), the backoff starts.
#[test]
fn a_dropped_load_job_falls_back_to_the_caller_then_to_the_last_value() {
    let _w = watchdog(Duration::from_secs(60), "dropped load job");
    let clock = ManualClock::new();
    let loads = Arc::new(AtomicUsize::new(0));
    let l = Arc::clone(&loads);
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .loader(move |_k: &u32| {
            l.fetch_add(1, Ordering::SeqCst);
            Err::<String, BoxError>("down".into())
        })
        .spawner(drop)
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    let r = c.load_with_timeout(1, Some(Duration::from_secs(20)));
    assert_eq!(r.unwrap(), "old");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let s = c.stats();
    assert_eq!(
        (
            s.load_failures,
            s.loads_abandoned,
            s.timeouts,
            s.stale_served_after_ttl
        ),
        (1, 0, 0, 1),
        "{s:?}"
    );
    let r = c.load_with_timeout(1, Some(Duration::from_secs(20)));
    assert_eq!(r.unwrap(), "old");
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "within the backoff: no load"
    );
    c.validate();
}

/// Found by this sweep as `bug_waiters_of_one_abandoned_load_count_once_each`: the docs of
/// `stale_served_after_ttl` said "callers that waited on one failed load count once", while
/// each waiter of an abandoned load, answered on its own (it claims the key again and finds
/// the backoff started, `fail_safe_read`), counted once each — as tests/fail_safe.rs pins for
/// a permit wait given up. Resolved in the docs: a call answered from the old value by itself
/// counts on its own, the waiters of an abandoned load included; one load whose failure
/// answers all its waiters counts once (`waiters_of_one_failed_load_count_once`).
#[test]
fn s39_waiters_of_one_abandoned_load_count_each() {
    let _w = watchdog(Duration::from_secs(60), "abandoned waiters count");
    let (c, _clock) = expired_cache();
    let mut f = Box::pin(c.get_with_async(1, std::future::pending::<String>()));
    assert!(poll_once(f.as_mut()).is_pending());
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || c.get_with(1, || "never".to_string()))
        })
        .collect();
    assert!(common::eventually(|| c.stats().coalesced == 3));
    drop(f);
    for w in waiters {
        assert_eq!(w.join().unwrap(), "old");
    }
    let s = c.stats();
    assert_eq!(s.loads_abandoned, 1, "{s:?}");
    assert_eq!(
        s.stale_served_after_ttl, 3,
        "each waiter of an abandoned load is answered (and counted) on its own: {s:?}"
    );
}

/// A builder async loader that panics: "a panic (of a builder loader ...)" is a failed load:
/// with fail-safe `load_async`'s callers (a joiner too) get the last value, `Ok`; then the
/// backoff.
#[test]
fn panicking_async_loader_falls_back_for_every_caller() {
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "async loader panic");
    let clock = ManualClock::new();
    let gate = FutGate::default();
    let g = gate.clone();
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .async_loader(move |_k: &u32| {
            let g = g.clone();
            async move {
                g.wait(()).await;
                if true {
                    panic!("injected");
                }
                Ok::<String, BoxError>(String::new())
            }
        })
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    let mut leader = Box::pin(c.load_async(1));
    let mut joiner = Box::pin(c.load_async(1));
    assert!(poll_once(leader.as_mut()).is_pending());
    assert!(poll_once(joiner.as_mut()).is_pending());
    gate.open();
    let a = catch_unwind(AssertUnwindSafe(|| futures::executor::block_on(leader)));
    let b = catch_unwind(AssertUnwindSafe(|| futures::executor::block_on(joiner)));
    let a = a.expect("the leader's call panicked");
    let b = b.expect("the joiner's call panicked");
    assert_eq!(a.unwrap(), "old");
    assert_eq!(b.unwrap(), "old");
    let s = c.stats();
    assert_eq!((s.load_failures, s.stale_served_after_ttl), (1, 1), "{s:?}");
    check_backoff(&c, &clock, "async loader panic");
}

/// `stale_served_after_ttl`: "Calls answered with a value past its time to live because its
/// load failed". A soft timeout with a spawner: the caller gives up waiting and gets the last
/// value (one answer, counted); the spawned job goes on and fails later, with no caller left
/// waiting for it — and that failure is counted as one more stale answer, which nobody got.
/// (The refresh path already passes "whether a caller gets the value" and counts only then;
/// the load path does not.) Cause: `Cache::publish_as` (src/load.rs) calls
/// `fail_safe_fallback(hash, k)`, i.e. `fail_safe_fallback_for(.., served: true)`, whether or
/// not the flight has a waiter.
#[test]
fn s39_a_failed_load_nobody_waits_for_counts_a_stale_answer() {
    let _w = watchdog(Duration::from_secs(60), "unserved stale count");
    let clock = ManualClock::new();
    let gate = Gate::default();
    let g = gate.clone();
    let c: Cache<u32, String> = fail_safe_builder(10, &clock)
        .loader(move |_k: &u32| {
            g.wait();
            Err::<String, BoxError>("down".into())
        })
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    let r = c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert_eq!(r.unwrap(), "old");
    assert_eq!(c.stats().stale_served_after_ttl, 1);
    gate.open();
    assert!(common::eventually(|| {
        let s = c.stats();
        s.loads_in_flight == 0 && s.load_failures == 1
    }));
    let s = c.stats();
    assert_eq!(
        s.stale_served_after_ttl, 1,
        "one call got the last value; the job's failure was counted as another: {s:?}"
    );
}

/// `get_or_stale`: "A live value is read exactly as by `get`: if its `refresh_after` period is
/// over, the read starts its refresh as `get`'s does (... else in the calling thread, before it
/// returns)" — counted as `get` counts it (a hit, a stale-while-revalidate read).
#[test]
fn get_or_stale_refreshes_a_due_value_as_get() {
    let clock = ManualClock::new();
    let loads = Arc::new(AtomicUsize::new(0));
    let l = Arc::clone(&loads);
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10)
        .time_to_live(TTL)
        .refresh_after(Duration::from_secs(30))
        .fail_safe(MAX_STALE)
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            l.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>("new".to_string())
        })
        .build();
    c.insert(1, "old".to_string());
    clock.advance(Duration::from_secs(31));
    assert_eq!(c.get_or_stale(&1).as_deref(), Some("old"));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(c.get(&1).as_deref(), Some("new"));
    let s = c.stats();
    assert_eq!(
        (
            s.hits,
            s.stale_served,
            s.refreshes_started,
            s.refreshes_succeeded
        ),
        (2, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.stale_served_after_ttl, 0);
}
