#![cfg(not(any(loom, shuttle)))]
//! Sweep 52 (outside, public API only): today's fixes (c6dd99a, daa9799) and their neighbours.
//!
//! Attacks: writes whose user code panics (an `Expiry` callback, a `retain` /
//! `invalidate_entries_if` predicate) or that store, against a load / computation of the key in
//! flight (`get_with`, `get_all`, `get_with_if` replace, `and_compute_with`, `and_upsert_with`
//! vs `insert`, `invalidate`, `remove`, `retain`, `invalidate_entries_if`, `invalidate_all`); a
//! spawned load (soft timeout) whose store panics, with fail-safe and with a joiner;
//! `stale_served_after_ttl` with a caller that timed out and a joiner that waits; `health_over`
//! with four and more windows, interleaved, jumps, concurrency; `CacheStats` helpers near
//! `u64::MAX`; (feature `redis`) the "invalidated in Redis: no fail-safe fallback" fix with leases,
//! async, a lease wait, and its false positives.
//!
//! Found (each test, `bug_` when found and `s39_` once fixed in stop 39, quotes the doc it
//! contradicted; fixed: a tombstone makes a load forgo fail-safe only if it is newer than every
//! version of the key the instance wrote, heard of or read; an epoch alone no longer does;
//! `miss_ratio` is computed as `misses / requests`):
//! - Redis tier + fail-safe: a load whose read finds the key "invalidated" in Redis refuses
//!   (and drops) the local copy even when nothing invalidated that copy: (1) this instance's
//!   own `insert` of a value larger than `max_value_size` (kept locally, a tombstone in Redis);
//!   (2) a value this instance loaded after reading its own tombstone (too large to write back);
//!   (3) the namespace's epoch key lost alone (an eviction): every written-back value reads as
//!   "from before an invalidate_all". The docs allow it only for "another instance's
//!   invalidation that this one missed". (The `fail_safe_serves_*` / `fail_safe_falls_back_*`
//!   controls show the copy is served once the tombstone is gone. These three tests fail at
//!   daa9799^ too: the refusal is older than that commit's `forgo_fallback`.)
//! - `CacheStats::miss_ratio` is `1.0 - hit_ratio()`: with hits near `u64::MAX` (from 2^53
//!   hits on) and a few misses it is exactly 0.0, the answer for "no misses".

mod common;
#[cfg(feature = "redis")]
#[path = "common/proxy.rs"]
mod proxy;

use common::watchdog;
use herdcache::{Cache, CacheStats, Expiry, LoadError, ManualClock};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- CacheStats near u64::MAX

/// `CacheStats::miss_ratio`: "`misses / requests`, or 0.0 with no requests." With 2^60 hits and
/// one miss, `misses / requests` is about 8.7e-19 (> 0), but `miss_ratio` is computed as
/// `1.0 - hit_ratio()` and `hit_ratio()` rounds to exactly 1.0: it returns 0.0, as if there
/// were no miss. (Likely cause: src/stats.rs `CacheStats::miss_ratio`; compute
/// `m as f64 / (h as f64 + m as f64)` instead.)
#[test]
fn s39_miss_ratio_is_zero_with_misses_near_u64_max() {
    let mut s = CacheStats::default();
    s.hits = 1 << 60;
    s.misses = 1;
    let expected = 1.0 / ((1u64 << 60) as f64 + 1.0);
    assert!(expected > 0.0);
    assert!(
        s.miss_ratio() > 0.0,
        "miss_ratio() = {} with {} misses out of {} requests (expected about {expected:e})",
        s.miss_ratio(),
        s.misses,
        s.requests()
    );
}

/// The helpers saturate / stay exact at the extremes (the fix of daa9799).
#[test]
fn stats_helpers_at_the_extremes() {
    let mut s = CacheStats::default();
    s.hits = u64::MAX;
    s.misses = u64::MAX;
    assert_eq!(s.requests(), u64::MAX);
    assert_eq!(s.hit_ratio(), 0.5);
    assert_eq!(s.miss_ratio(), 0.5);
    s.load_successes = u64::MAX;
    s.load_failures = u64::MAX;
    s.total_load_time = Duration::MAX;
    let avg = s.average_load_time();
    // Duration::MAX / (2^65 - 2): a bit more than half a second.
    let expect_nanos = Duration::MAX.as_nanos() / (2 * u128::from(u64::MAX));
    assert_eq!(avg.as_nanos(), expect_nanos);
    s.load_successes = 1;
    s.load_failures = 0;
    assert_eq!(s.average_load_time(), Duration::MAX);
    let mut t = CacheStats::default();
    t.hits = 0;
    t.misses = u64::MAX;
    assert_eq!((t.hit_ratio(), t.miss_ratio()), (0.0, 1.0));
}

// ------------------------------------------- a spawned load whose store panics, fail-safe

/// `expire_after_create` panics once armed (disarming); otherwise `TTL`.
struct ArmedCreate(Arc<AtomicBool>);
impl Expiry<u32, String> for ArmedCreate {
    fn expire_after_create(&self, _k: &u32, _v: &String) -> Option<Duration> {
        if self.0.swap(false, Ordering::SeqCst) {
            panic!("planted expire_after_create panic");
        }
        Some(TTL)
    }
}

fn quiet() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let s = info.to_string();
        if !s.contains("planted") {
            prev(info);
        }
    }));
}

#[test]
fn spawned_store_panic_with_fail_safe() {
    quiet();
    let _dog = watchdog(Duration::from_secs(60), "spawned store panic, fail-safe");
    for spawned in [true, false] {
        for loader_panics in [false, true] {
            let clock = ManualClock::new();
            let armed = Arc::new(AtomicBool::new(false));
            let calls = Arc::new(AtomicU64::new(0));
            let c2 = Arc::clone(&calls);
            let lp = loader_panics;
            let cache: Cache<u32, String> = Cache::builder()
                .max_capacity(100)
                .expire_after(ArmedCreate(Arc::clone(&armed)))
                .fail_safe(Duration::from_secs(600))
                .refresh_backoff(Duration::from_secs(5))
                .record_stats()
                .clock(clock.clone())
                .spawner(|job| job())
                .loader(move |k: &u32| {
                    c2.fetch_add(1, Ordering::SeqCst);
                    if lp {
                        panic!("planted loader panic");
                    }
                    Ok::<_, String>(format!("new {k}"))
                })
                .build();
            cache.insert(1, "old".to_string());
            clock.advance(TTL + Duration::from_secs(1));
            armed.store(!loader_panics, Ordering::SeqCst);
            let r = catch_unwind(AssertUnwindSafe(|| {
                if spawned {
                    cache.load_with_timeout(1, Some(Duration::from_secs(10)))
                } else {
                    cache.load(1)
                }
            }));
            armed.store(false, Ordering::SeqCst);
            let st = cache.stats();
            let what = format!("spawned {spawned}, loader panics {loader_panics}: {st:?}");
            let r = r
                .map(|r| r.map_err(|e| format!("{e:?}")))
                .map_err(|_| "panic");
            match (spawned, loader_panics) {
                // LoadError::Panicked: "Also what the caller of a load run by the spawner gets
                // when the loader returned but storing its value panicked".
                (true, false) => assert_eq!(r, Ok(Err("Panicked".to_string())), "{what}"),
                // The caller that runs the load itself gets the panic.
                (false, false) => assert!(r.is_err(), "{what}"),
                // A loader panic is a failed load: fail-safe answers with the last value.
                (_, true) => {
                    assert_eq!(r, Ok(Ok("old".to_string())), "{what}");
                    assert_eq!(st.stale_served_after_ttl, 1, "{what}");
                }
            }
            assert_eq!(
                calls.load(Ordering::SeqCst),
                1,
                "one load for one miss: {what}"
            );
            assert_eq!(
                st.misses,
                st.load_successes + st.load_failures + st.loads_abandoned + st.coalesced,
                "the identity of CacheStats::misses: {what}"
            );
            // The store that panicked removed nothing: the last value is still there.
            assert_eq!(cache.get_or_stale(&1).as_deref(), Some("old"), "{what}");
            cache.validate();
        }
    }
}

#[test]
fn spawned_store_panic_caller_and_joiner() {
    quiet();
    let _dog = watchdog(Duration::from_secs(60), "spawned store panic, joiner");
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let armed = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = Arc::clone(&calls);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate_rx = Arc::new(std::sync::Mutex::new(gate_rx));
        let g = Arc::clone(&gate_rx);
        let mut b = Cache::builder()
            .max_capacity(100)
            .expire_after(ArmedCreate(Arc::clone(&armed)))
            .refresh_backoff(Duration::from_secs(5))
            .record_stats()
            .clock(clock.clone());
        if fail_safe {
            b = b.fail_safe(Duration::from_secs(600));
        }
        let cache: Cache<u32, String> = b
            .spawner(|job| {
                std::thread::spawn(job);
            })
            .loader(move |k: &u32| {
                let n = c2.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    g.lock().unwrap().recv().unwrap();
                }
                Ok::<_, String>(format!("new {k} #{n}"))
            })
            .build();
        if fail_safe {
            cache.insert(1, "old".to_string());
            clock.advance(TTL + Duration::from_secs(1));
        }
        armed.store(true, Ordering::SeqCst);
        let (ra, rb) = std::thread::scope(|s| {
            let c = &cache;
            let a = s.spawn(move || c.load_with_timeout(1, Some(Duration::from_secs(20))));
            while c.stats().misses < 1 || calls.load(Ordering::SeqCst) < 1 {
                std::thread::yield_now();
            }
            let bj =
                s.spawn(move || catch_unwind(AssertUnwindSafe(|| c.load(1))).map_err(|_| "panic"));
            while c.stats().coalesced < 1 {
                std::thread::yield_now();
            }
            gate_tx.send(()).unwrap();
            let ra = a.join().unwrap();
            armed.store(false, Ordering::SeqCst);
            (ra, bj.join().unwrap())
        });
        let st = cache.stats();
        let what = format!("fail_safe {fail_safe}: A {ra:?}, B {rb:?}, {st:?}");
        // The caller whose spawned load's store panicked: LoadError::Panicked, no second
        // load of its own.
        assert!(matches!(ra, Err(LoadError::Panicked)), "{what}");
        // The joiner is answered (it loads again: the load it waited on ended with nothing
        // for it, counted as a further miss).
        assert!(matches!(&rb, Ok(Ok(_))), "{what}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{what}");
        assert_eq!(
            st.misses,
            st.load_successes + st.load_failures + st.loads_abandoned + st.coalesced,
            "the identity of CacheStats::misses: {what}"
        );
        assert_eq!(st.stale_served_after_ttl, 0, "{what}");
        cache.validate();
    }
}

// ----------------------------- writes whose user code panics, with a flight of the key running

/// `expire_after_create` / `expire_after_update` panic while `armed`; otherwise `TTL`.
struct ArmedBoth(Arc<AtomicBool>);
impl Expiry<u32, String> for ArmedBoth {
    fn expire_after_create(&self, _k: &u32, _v: &String) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) {
            panic!("planted expire_after_create panic");
        }
        Some(TTL)
    }
    fn expire_after_update(&self, _k: &u32, _v: &String, _d: Option<Duration>) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) {
            panic!("planted expire_after_update panic");
        }
        Some(TTL)
    }
}

#[derive(Clone, Copy, Debug)]
enum Flight {
    GetWith,
    GetWithIfReplace,
    Compute,
    Upsert,
    GetAll,
}

#[derive(Clone, Copy, Debug)]
enum Write {
    Insert,
    Invalidate,
    Remove,
    Retain,
    InvalidateIf,
    InvalidateAll,
}

/// Runs `flight` of key 1 (its user code blocked until the write is done), and `write` of key
/// 1 meanwhile: with `panics`, the write's user code panics (the `Expiry`, or the predicate).
/// Returns what key 1 holds afterwards and whether the write panicked.
fn flight_vs_write(
    flight: Flight,
    write: Write,
    panics: bool,
    present: bool,
) -> (Option<String>, bool) {
    let armed = Arc::new(AtomicBool::new(false));
    let clock = ManualClock::new();
    let cache: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .expire_after(ArmedBoth(Arc::clone(&armed)))
        .clock(clock)
        .build();
    if present {
        cache.insert(1, "old".to_string());
    }
    cache.insert(2, "two".to_string());
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let wait = move || {
        in_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        "flight".to_string()
    };
    let write_panicked = std::thread::scope(|s| {
        let c = &cache;
        let t = s.spawn(move || match flight {
            Flight::GetWith => {
                c.get_with(1, wait);
            }
            Flight::GetWithIfReplace => {
                c.get_with_if(1, wait, |_| true);
            }
            Flight::Compute => {
                c.entry(1).and_compute_with(|_| herdcache::Op::Put(wait()));
            }
            Flight::Upsert => {
                c.entry(1).and_upsert_with(|_| wait());
            }
            Flight::GetAll => {
                c.get_all([1], |_| {
                    let v = wait();
                    std::collections::HashMap::from([(1, v)])
                });
            }
        });
        in_rx.recv().unwrap();
        armed.store(panics, Ordering::SeqCst);
        let p = catch_unwind(AssertUnwindSafe(|| match write {
            Write::Insert => c.insert(1, "write".to_string()),
            Write::Invalidate => c.invalidate(&1),
            Write::Remove => {
                c.remove(&1);
            }
            Write::Retain => c.retain(|k, _| {
                if panics && *k == 1 {
                    panic!("planted retain panic");
                }
                *k != 1
            }),
            Write::InvalidateIf => c
                .invalidate_entries_if(|k, _| {
                    if panics && *k == 1 {
                        panic!("planted predicate panic");
                    }
                    *k == 1
                })
                .unwrap(),
            Write::InvalidateAll => c.invalidate_all(),
        }));
        armed.store(false, Ordering::SeqCst);
        go_tx.send(()).unwrap();
        t.join().unwrap();
        p.is_err()
    });
    cache.validate();
    (cache.get(&1), write_panicked)
}

/// A write whose user code panics stores nothing and supersedes nothing: the flight's value is
/// stored. A write that stores (or removes) wins: the flight's value never overwrites it.
#[test]
fn writes_against_flights_matrix() {
    quiet();
    let _dog = watchdog(Duration::from_secs(120), "writes_against_flights_matrix");
    let mut failures = Vec::new();
    let flights = [
        (Flight::GetWith, false),
        (Flight::GetAll, false),
        (Flight::GetWithIfReplace, true),
        (Flight::Compute, false),
        (Flight::Compute, true),
        (Flight::Upsert, false),
        (Flight::Upsert, true),
    ];
    let writes = [
        Write::Insert,
        Write::Invalidate,
        Write::Remove,
        Write::Retain,
        Write::InvalidateIf,
        Write::InvalidateAll,
    ];
    for (flight, present) in flights {
        for write in writes {
            for panics in [false, true] {
                let has_hook = matches!(write, Write::Insert)
                    || (present && matches!(write, Write::Retain | Write::InvalidateIf));
                if panics && !has_hook {
                    continue;
                }
                let (got, write_panicked) = flight_vs_write(flight, write, panics, present);
                let expected = if panics {
                    Some("flight")
                } else {
                    match write {
                        Write::Insert => Some("write"),
                        Write::Retain | Write::InvalidateIf if !present => Some("flight"),
                        _ => None,
                    }
                };
                if write_panicked != panics || got.as_deref() != expected {
                    failures.push(format!(
                        "{flight:?} (entry present: {present}) vs {write:?} (user code panics: \
                         {panics}, panicked: {write_panicked}): key holds {got:?}, expected \
                         {expected:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[cfg(feature = "redis")]
mod tier {
    use super::watchdog;
    use herdcache::codec::Plain;
    use herdcache::redis::{RedisTier, TieredCache};
    use herdcache::{Cache, ManualClock};
    use herdcache_testkit::redis_server::RedisServer;
    use std::time::Duration;

    fn fail_safe_tiered(
        url: String,
        ns: &str,
        clock: &ManualClock,
        max: usize,
    ) -> TieredCache<u64, String> {
        RedisTier::new(url)
            .namespace(ns)
            .timeouts(Duration::from_millis(300), Duration::from_millis(300))
            .max_value_size(max)
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
            .unwrap()
    }

    /// src/cache/fail_safe.rs: fail-safe answers a failed load of an expired key with its last
    /// value; the exception ("With the Redis tier, so does another instance's invalidation
    /// that this one missed (its message lost): a load whose read of Redis finds the key
    /// invalidated there (a tombstone ...) does not fall back") is about a copy from before an
    /// invalidation. src/redis/mod.rs: a value larger than `max_value_size` "is kept in the
    /// local tier only and never sent (an `insert` of one leaves a tombstone in Redis
    /// instead)". So a single instance's own `insert` of a large value leaves a tombstone
    /// that is exactly as old as its local copy; nothing invalidated that copy. Yet once the
    /// copy expires and the backend fails, the load reads the tombstone, refuses the copy and
    /// drops it: the caller gets the error. (Likely cause: src/redis/tier.rs `Tier::read` sets
    /// `invalidated` for any tombstone, and `Pending::mark_load` forgoes the fallback without
    /// comparing the tombstone's version with the local copy's age; `Tier::put` writes the
    /// tombstone for an oversized or unencodable value.)
    #[test]
    fn s39_fail_safe_refuses_own_oversized_insert() {
        let _w = watchdog(Duration::from_secs(60), "oversized insert vs fail-safe");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let a = fail_safe_tiered(server.url(), "s52big", &clock, 8);
        let big = "a value longer than eight bytes".to_string();
        a.insert(1, big.clone());
        assert_eq!(a.get(&1).as_deref(), Some(big.as_str()));
        let s = a.stats().remote;
        assert!(s.oversized >= 1, "the value was too large for Redis: {s:?}");
        clock.advance(Duration::from_secs(61)); // the local copy expires (within max_stale)
        let r: Result<String, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        assert_eq!(
            r.as_deref().ok(),
            Some(big.as_str()),
            "fail-safe refused the instance's own last value (its insert's tombstone taken for \
             a missed invalidation): {r:?}; stats {:?}",
            a.stats()
        );
    }

    /// The same cause reached by a load: this instance invalidates key 1 (a tombstone), then
    /// loads it afresh (a value too large for Redis: kept locally, not written back, so the
    /// tombstone stays). The copy is newer than the tombstone (it was loaded after reading it),
    /// yet when it expires and the backend fails, fail-safe refuses it (fail_safe.rs: the
    /// exception is for "another instance's invalidation that this one missed").
    #[test]
    fn s39_fail_safe_refuses_value_loaded_after_the_tombstone() {
        let _w = watchdog(Duration::from_secs(60), "oversized load vs fail-safe");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let a = fail_safe_tiered(server.url(), "s52bigload", &clock, 8);
        a.insert(1, "small".to_string());
        a.invalidate(&1); // a tombstone in Redis, this instance's own (nothing missed)
        let big = "a value longer than eight bytes".to_string();
        let b2 = big.clone();
        assert_eq!(a.get_with(1, move || b2), big);
        clock.advance(Duration::from_secs(61)); // the local copy expires (within max_stale)
        let r: Result<String, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        assert_eq!(
            r.as_deref().ok(),
            Some(big.as_str()),
            "fail-safe refused a value loaded after the tombstone it read: {r:?}; remote {:?}",
            a.stats().remote
        );
    }

    /// The fix of daa9799 (a load whose read finds the key invalidated does not fall back),
    /// with leases on and through the async path: A's subscriber is silenced, B invalidates
    /// key 1, A's local copy expires, A's load fails: "With the Redis tier, so does another
    /// instance's invalidation that this one missed (its message lost): a load whose read of
    /// Redis finds the key invalidated there ... does not fall back, and its failure drops the
    /// old value."
    #[test]
    fn missed_invalidation_no_fallback_with_leases_and_async() {
        let _w = watchdog(
            Duration::from_secs(120),
            "missed invalidation, leases/async",
        );
        let server = RedisServer::start();
        for (i, (lease, is_async)) in [(true, false), (false, true), (true, true)]
            .into_iter()
            .enumerate()
        {
            let p = super::proxy::Proxy::start(server.port);
            let ns = format!("s52miss{i}");
            let clock = ManualClock::new();
            let mut ta = RedisTier::new(p.url())
                .namespace(&ns)
                .timeouts(Duration::from_millis(300), Duration::from_millis(300));
            if lease {
                ta = ta.lease(Duration::from_secs(5), Duration::from_millis(200));
            }
            let a: TieredCache<u64, String> = ta
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
            let b = fail_safe_tiered(server.url(), &ns, &ManualClock::new(), 1 << 20);
            assert!(
                super::common::eventually(|| a.is_subscribed() && b.is_subscribed()),
                "subscribers never connected"
            );
            p.black_hole_open_connections();
            assert_eq!(a.get_with(1, || "ten".to_string()), "ten");
            b.invalidate(&1); // A misses the message
            clock.advance(Duration::from_secs(61));
            let r: Result<String, std::sync::Arc<&str>> = if is_async {
                futures::executor::block_on(a.try_get_with_async(1, async { Err("down") }))
            } else {
                a.try_get_with(1, || Err("down"))
            };
            let s = a.stats();
            assert!(s.remote.timeouts == 0, "A read Redis: {s:?}");
            assert!(
                r.is_err(),
                "lease {lease}, async {is_async}: A answered {r:?}, the value B invalidated"
            );
            assert_eq!(a.local().get_or_stale(&1), None, "the copy was dropped");
        }
    }

    /// The same through a lease wait: C (another instance) holds key 1's lease while its load
    /// runs; A (which missed B's invalidation) waits for it; C's load fails (the lease goes
    /// with no value), then A loads itself and fails too. A must not answer with its copy of
    /// the value B invalidated (the tombstone was read at the start of the wait, and again
    /// after it).
    #[test]
    fn missed_invalidation_no_fallback_after_a_lease_wait() {
        let _w = watchdog(Duration::from_secs(120), "missed invalidation, lease wait");
        let server = RedisServer::start();
        let p = super::proxy::Proxy::start(server.port);
        let ns = "s52leasewait";
        let clock = ManualClock::new();
        let lease = |t: RedisTier| t.lease(Duration::from_secs(10), Duration::from_secs(5));
        let a: TieredCache<u64, String> = lease(
            RedisTier::new(p.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(300), Duration::from_millis(300)),
        )
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
        let b = fail_safe_tiered(server.url(), ns, &ManualClock::new(), 1 << 20);
        let c: TieredCache<u64, String> = lease(
            RedisTier::new(server.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(300), Duration::from_millis(300)),
        )
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(60))
                .record_stats(),
            Plain,
        )
        .unwrap();
        assert!(
            super::common::eventually(|| a.is_subscribed() && b.is_subscribed()),
            "subscribers never connected"
        );
        p.black_hole_open_connections();
        assert_eq!(a.get_with(1, || "ten".to_string()), "ten");
        b.invalidate(&1); // A misses the message
        clock.advance(Duration::from_secs(61));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (r, rc) = std::thread::scope(|s| {
            let cc = &c;
            let ct = s.spawn(move || {
                cc.try_get_with(1, || {
                    rx.recv().unwrap();
                    Err::<String, &str>("c down")
                })
            });
            assert!(super::common::eventually(|| c
                .stats()
                .remote
                .leases_acquired
                >= 1));
            let aa = &a;
            let at = s.spawn(move || aa.try_get_with(1, || Err::<String, &str>("down")));
            assert!(super::common::eventually(
                || a.stats().remote.lease_waits >= 1
            ));
            tx.send(()).unwrap();
            (at.join().unwrap(), ct.join().unwrap())
        });
        assert!(rc.is_err());
        let s = a.stats();
        assert!(
            r.is_err(),
            "A answered {r:?} after a lease wait, the value B invalidated; {:?}",
            s.remote
        );
    }

    /// The same cause reached with no invalidation at all: the namespace's epoch key is lost
    /// alone (src/redis/scripts.rs `EPOCH`: "An absent epoch (never set, or lost: a restart
    /// without persistence, `FLUSHALL`, an eviction) is set first"; here a `DEL`, as an
    /// `allkeys-*` eviction would). The value A's load wrote back then reads as "from before an
    /// invalidate_all", and A's failing load refuses (and drops) its own copy, though no
    /// instance invalidated anything (fail_safe.rs allows that only for "another instance's
    /// invalidation that this one missed").
    #[test]
    fn s39_fail_safe_refuses_copy_after_the_epoch_key_is_lost() {
        let _w = watchdog(Duration::from_secs(60), "epoch key lost vs fail-safe");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let a = fail_safe_tiered(server.url(), "s52ep", &clock, 1 << 20);
        assert_eq!(a.get_with(1, || "ten".to_string()), "ten");
        assert_eq!(
            a.stats().remote.writes,
            1,
            "written back: {:?}",
            a.stats().remote
        );
        let mut raw = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("hc:*s52ep*epoch")
            .query(&mut raw)
            .unwrap();
        assert_eq!(keys.len(), 1, "the namespace's epoch key: {keys:?}");
        let _: () = redis::cmd("DEL").arg(&keys[0]).query(&mut raw).unwrap();
        clock.advance(Duration::from_secs(61)); // A's local copy expires (within max_stale)
        let r: Result<String, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        assert_eq!(
            r.as_deref().ok(),
            Some("ten"),
            "fail-safe refused A's last value after the epoch key alone was lost: {r:?}; {:?}",
            a.stats().remote
        );
    }

    /// Control for the `bug_fail_safe_refuses_*` tests: the same instance, the key's value gone
    /// from Redis with no tombstone (a raw `DEL`): A's failing load falls back on its copy.
    #[test]
    fn fail_safe_falls_back_when_redis_has_nothing() {
        let _w = watchdog(Duration::from_secs(60), "fail-safe control");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let a = fail_safe_tiered(server.url(), "s52ctl", &clock, 1 << 20);
        assert_eq!(a.get_with(1, || "ten".to_string()), "ten");
        let mut raw = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("hc:*s52ctl*v{*")
            .query(&mut raw)
            .unwrap();
        assert_eq!(keys.len(), 1, "the key's value: {keys:?}");
        let _: () = redis::cmd("DEL").arg(&keys[0]).query(&mut raw).unwrap();
        clock.advance(Duration::from_secs(61));
        let r: Result<String, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        assert_eq!(r.as_deref().ok(), Some("ten"), "{r:?}; {:?}", a.stats());
    }

    /// Control for `bug_fail_safe_refuses_own_oversized_insert`: the same, its tombstone deleted
    /// from Redis before the load: the copy is served (so the tombstone is what refuses it).
    #[test]
    fn fail_safe_serves_own_oversized_insert_without_its_tombstone() {
        let _w = watchdog(Duration::from_secs(60), "oversized control");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let a = fail_safe_tiered(server.url(), "s52bigctl", &clock, 8);
        let big = "a value longer than eight bytes".to_string();
        a.insert(1, big.clone());
        let mut raw = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("hc:*s52bigctl*v{*")
            .query(&mut raw)
            .unwrap();
        assert_eq!(keys.len(), 1, "the key's tombstone: {keys:?}");
        let _: () = redis::cmd("DEL").arg(&keys[0]).query(&mut raw).unwrap();
        clock.advance(Duration::from_secs(61));
        let r: Result<String, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        assert_eq!(
            r.as_deref().ok(),
            Some(big.as_str()),
            "{r:?}; {:?}",
            a.stats()
        );
    }

    /// Control: the same with a value that fits in Redis: fail-safe serves the last value.
    #[test]
    fn fail_safe_serves_own_small_insert() {
        let _w = watchdog(Duration::from_secs(60), "small insert vs fail-safe");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let a = fail_safe_tiered(server.url(), "s52small", &clock, 1 << 20);
        a.insert(1, "small".to_string());
        clock.advance(Duration::from_secs(61));
        // Redis still holds "small" (its own time to live is real time): a hit there.
        let r: Result<String, std::sync::Arc<&str>> = a.try_get_with(1, || Err("down"));
        assert_eq!(r.as_deref().ok(), Some("small"), "{r:?}");
    }
}

// ---------------------------------------------------------------- health_over windows

/// src/health.rs: "Each window keeps snapshots of its own, which no call with another window
/// thins or stretches: [`Cache::health`]'s 60 s window, and the last four other windows". So
/// with at most four other windows asked for (at different paces, with a clock jump), each
/// window reports exactly the sequence of `window()`s it reports when asked for alone (with
/// the default window called alongside, as every call feeds it).
#[test]
fn four_windows_interleaved_report_as_alone() {
    let wins = [5u64, 13, 40, 3600];
    // (window, every how many seconds it is asked for)
    let pace = |w: u64| match w {
        5 => 1,
        13 => 2,
        40 => 3,
        _ => 7,
    };
    let run = |only: Option<u64>| {
        let clock = ManualClock::new();
        let c: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .time_to_live(TTL)
            .clock(clock.clone())
            .build();
        let mut seen: Vec<(u64, u64, u128)> = Vec::new();
        for s in 1..=500u64 {
            clock.advance(Duration::from_secs(if s == 250 { 5000 } else { 1 }));
            if s % 10 == 0 {
                let _ = c.health();
            }
            for &w in &wins {
                if s % pace(w) == 0 {
                    if only.is_none_or(|o| o == w) {
                        let h = c.health_over(Duration::from_secs(w));
                        seen.push((w, s, h.window().as_millis()));
                    } else {
                        // keep the default window fed the same way
                        let _ = c.health();
                    }
                }
            }
        }
        seen
    };
    let together = run(None);
    for &w in &wins {
        let alone = run(Some(w));
        let mine: Vec<_> = together
            .iter()
            .filter(|(x, _, _)| *x == w)
            .copied()
            .collect();
        assert_eq!(mine, alone, "window {w} s: interleaved vs alone");
    }
}

// ------------------------------------------------------- stale_served_after_ttl counting

/// `stale_served_after_ttl`: "The callers that waited on one load whose failure answered them
/// all count once; a call answered from the old value by itself counts on its own: ... at its
/// soft timeout ... A failure no caller waits for any more ... counts nothing." Caller A times
/// out (answered, 1); caller B then joins the spawned job and waits; the job fails and its
/// failure answers B (1 more): 2 in all, and B gets the old value.
#[test]
fn stale_after_ttl_timed_out_caller_then_waiting_joiner() {
    let _w = watchdog(Duration::from_secs(60), "stale_after_ttl joiner");
    let clock = ManualClock::new();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let gate_rx = Arc::new(std::sync::Mutex::new(gate_rx));
    let started = Arc::new(AtomicU64::new(0));
    let (g, st2) = (Arc::clone(&gate_rx), Arc::clone(&started));
    let c: Cache<u32, String> = Cache::builder()
        .max_capacity(10)
        .time_to_live(TTL)
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            st2.fetch_add(1, Ordering::SeqCst);
            g.lock().unwrap().recv().unwrap();
            Err::<String, String>("down".into())
        })
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .build();
    c.insert(1, "old".to_string());
    clock.advance(TTL + Duration::from_secs(1));
    let r = c.load_with_timeout(1, Some(Duration::from_millis(50)));
    assert_eq!(r.as_deref().ok(), Some("old"));
    assert_eq!(c.stats().stale_served_after_ttl, 1);
    let rb = std::thread::scope(|s| {
        let cc = &c;
        let b = s.spawn(move || cc.load_with_timeout(1, Some(Duration::from_secs(30))));
        while cc.stats().coalesced < 1 {
            std::thread::yield_now();
        }
        gate_tx.send(()).unwrap();
        b.join().unwrap()
    });
    assert!(common::eventually(|| c.stats().loads_in_flight == 0));
    let s = c.stats();
    assert_eq!(started.load(Ordering::SeqCst), 1, "{s:?}");
    assert_eq!(rb.as_deref().ok(), Some("old"), "{rb:?} {s:?}");
    assert_eq!(s.stale_served_after_ttl, 2, "{s:?}");
}

/// `health_over`: "Concurrent calls are fine". Six windows (more than the four kept) asked
/// for from four threads while the manual clock moves (with jumps): no panic, no deadlock,
/// every reported window at most what was asked plus the largest clock step seen (and a
/// minute of slack).
#[test]
fn health_windows_concurrent_and_evicted() {
    let _w = watchdog(Duration::from_secs(120), "health windows concurrent");
    let clock = ManualClock::new();
    let c: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(TTL)
        .clock(clock.clone())
        .build();
    let wins = [3u64, 7, 11, 60, 90, 3600];
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, clock) = (&c, &clock);
            s.spawn(move || {
                for i in 0..300u64 {
                    if t == 0 {
                        let step = if i % 97 == 0 { 4000 } else { 1 };
                        clock.advance(Duration::from_secs(step));
                    }
                    c.insert((i % 50) as u32, 1);
                    let w = wins[((i + t * 2) % wins.len() as u64) as usize];
                    let h = c.health_over(Duration::from_secs(w));
                    assert!(
                        h.window() <= Duration::from_secs(w + 4000 + 60),
                        "window {w} s reported {:?}",
                        h.window()
                    );
                    let _ = c.health();
                }
            });
        }
    });
}
