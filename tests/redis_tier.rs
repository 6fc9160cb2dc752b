//! The Redis second tier against a real `redis-server` (started by the tests on a free
//! loopback port; `.ci/run` installs it): shared loads, invalidations across instances, a
//! server stopped mid-test, leases whose holder stopped.
#![cfg(feature = "redis")]

mod common;
use common::tier::{raw, vkey};
use herdcache_testkit::redis_server;

use common::eventually;
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, LoadError};
use redis_server::RedisServer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The backend: counts loads per key; values are `key * 1000 + version`.
#[derive(Default)]
struct Backend {
    loads: Mutex<HashMap<u64, u64>>,
    version: AtomicU64,
    delay: Duration,
}

impl Backend {
    fn slow(delay: Duration) -> Arc<Backend> {
        Arc::new(Backend {
            delay,
            ..Backend::default()
        })
    }

    fn load(&self, k: u64) -> u64 {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        *self.loads.lock().unwrap().entry(k).or_default() += 1;
        k * 1000 + self.version.load(Ordering::SeqCst)
    }

    fn total(&self) -> u64 {
        self.loads.lock().unwrap().values().sum()
    }

    fn of(&self, k: u64) -> u64 {
        self.loads.lock().unwrap().get(&k).copied().unwrap_or(0)
    }
}

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(200), Duration::from_millis(200))
}

/// A fresh server, and a backend whose calls take `delay`.
fn start(delay: Duration) -> (RedisServer, Arc<Backend>) {
    (RedisServer::start(), Backend::slow(delay))
}

fn instance(tier: RedisTier, backend: &Arc<Backend>) -> TieredCache<u64, u64> {
    let b = Arc::clone(backend);
    tier.build(
        Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600))
            .record_stats()
            .loader(move |k: &u64| Ok::<_, BoxError>(b.load(*k))),
        Plain,
    )
    .expect("valid configuration")
}

/// `SET key value [PX px]` behind the caches' back.
fn set(conn: &mut redis::Connection, key: &str, value: &str, px: Option<u64>) {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    if let Some(px) = px {
        cmd.arg("PX").arg(px);
    }
    cmd.query::<()>(conn).unwrap();
}

fn get(conn: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(conn).unwrap()
}

fn exists(conn: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query(conn).unwrap()
}

/// The Redis key of `k`'s lease in namespace `ns`.
fn lkey(ns: &str, k: impl std::fmt::Display) -> String {
    format!("hc:{}:{ns}:l{{{k}}}", ns.len())
}

/// The value stored for `k` (the `d` field of its hash), if any.
fn value(conn: &mut redis::Connection, ns: &str, k: impl std::fmt::Display) -> Option<String> {
    redis::cmd("HGET")
        .arg(vkey(ns, k))
        .arg("d")
        .query(conn)
        .unwrap()
}

#[test]
fn a_second_instance_reads_what_the_first_loaded() {
    let _w = common::watchdog(Duration::from_secs(60), "read-through");
    let (server, backend) = start(Duration::ZERO);
    let a = instance(tier(&server, "t1"), &backend);
    let b = instance(tier(&server, "t1"), &backend);
    for k in 0..100 {
        assert_eq!(a.load(k).unwrap(), k * 1000);
    }
    for k in 0..100 {
        assert_eq!(b.load(k).unwrap(), k * 1000);
    }
    assert_eq!(backend.total(), 100, "b found every value in Redis");
    let (sa, sb) = (a.stats().remote, b.stats().remote);
    assert_eq!((sa.misses, sa.writes), (100, 100));
    assert_eq!((sb.hits, sb.writes), (100, 0));
    assert_eq!(b.stats().load_successes, 100, "b's local tier filled");
    // The local tier answers from now on: no more Redis reads.
    for k in 0..100 {
        assert_eq!(b.load(k).unwrap(), k * 1000);
    }
    assert_eq!(b.stats().remote.hits, 100);
    // get_with goes through the tier too; a loader error is not written.
    assert_eq!(b.get_with(500, || 7), 7);
    assert_eq!(a.get_with(500, || 8), 7, "a read b's value");
    assert!(a.try_get_with(501, || Err::<u64, _>("down")).is_err());
    assert_eq!(b.try_get_with(501, || Ok::<_, ()>(9)).unwrap(), 9);
    assert_eq!(b.optionally_get_with(600, || None), None);
    assert_eq!(a.optionally_get_with(600, || Some(6)), Some(6));
    assert_eq!(
        b.optionally_get_with(600, || Some(7)),
        Some(6),
        "b read a's value"
    );
}

#[test]
fn two_instances_share_one_load_per_key() {
    let _w = common::watchdog(Duration::from_secs(120), "fleet single-flight");
    let (server, backend) = start(Duration::from_millis(2));
    let lease = |t: RedisTier| t.lease(Duration::from_secs(10), Duration::from_secs(20));
    let a = instance(lease(tier(&server, "t2")), &backend);
    let b = instance(lease(tier(&server, "t2")), &backend);
    const KEYS: u64 = 200;
    std::thread::scope(|s| {
        for t in 0..8u64 {
            for c in [&a, &b] {
                s.spawn(move || {
                    // Every thread asks for every key, in a different order.
                    for i in 0..KEYS {
                        let k = (i * 7 + t * 31) % KEYS;
                        assert_eq!(c.load(k).unwrap(), k * 1000);
                    }
                });
            }
        }
    });
    for k in 0..KEYS {
        assert_eq!(backend.of(k), 1, "key {k} loaded once in the fleet");
    }
    let (sa, sb) = (a.stats().remote, b.stats().remote);
    assert_eq!(sa.leases_acquired + sb.leases_acquired, KEYS);
    assert_eq!(sa.lease_fallbacks + sb.lease_fallbacks, 0);
    assert_eq!(
        (sa.errors, sa.timeouts, sb.errors, sb.timeouts),
        (0, 0, 0, 0)
    );
}

#[test]
fn instances_see_each_others_invalidations() {
    let _w = common::watchdog(Duration::from_secs(60), "invalidation");
    let (server, backend) = start(Duration::ZERO);
    let a = instance(tier(&server, "t3"), &backend);
    let b = instance(tier(&server, "t3"), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    for k in 0..10 {
        a.load(k).unwrap();
        b.load(k).unwrap();
    }
    assert_eq!(backend.total(), 10);
    assert!(b.contains_key(&3));

    // A new version in the backend; a invalidates key 3 for the fleet.
    backend.version.store(1, Ordering::SeqCst);
    a.invalidate(&3);
    assert!(eventually(|| !b.contains_key(&3)), "b dropped key 3");
    assert_eq!(b.load(3).unwrap(), 3001, "Redis's copy was deleted too");
    assert_eq!(a.load(3).unwrap(), 3001, "a reads b's new load from Redis");
    assert_eq!(backend.of(3), 2);
    assert!(b.contains_key(&4), "other keys stay");

    // insert: b drops its copy and reads the inserted value from Redis.
    a.insert(4, 44);
    assert!(eventually(|| !b.contains_key(&4)));
    assert_eq!(b.load(4).unwrap(), 44);
    assert_eq!(backend.of(4), 1);

    // remove from b reaches a.
    assert_eq!(b.remove(&5), Some(5000));
    assert!(eventually(|| !a.contains_key(&5)));

    // invalidate_all from b empties a and Redis.
    b.invalidate_all();
    assert!(eventually(|| a.entry_count() == 0));
    assert_eq!(a.load(6).unwrap(), 6001);
    assert_eq!(backend.of(6), 2, "Redis was emptied: a loaded again");
    let (sa, sb) = (a.stats().remote, b.stats().remote);
    assert!(sa.invalidations_received >= 2 && sb.invalidations_received >= 2);
    assert!(sa.invalidations_sent >= 2 && sb.invalidations_sent >= 2);
}

#[test]
fn server_stopped_mid_test_caches_keep_serving_then_recover() {
    let _w = common::watchdog(Duration::from_secs(120), "redis outage");
    let (mut server, backend) = start(Duration::ZERO);
    let fragile = |s: &RedisServer| {
        tier(s, "t4")
            .timeouts(Duration::from_millis(50), Duration::from_millis(50))
            .breaker(3, Duration::from_secs(3))
            .lease(Duration::from_secs(1), Duration::from_millis(200))
    };
    let a = instance(fragile(&server), &backend);
    let b = instance(fragile(&server), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    for k in 0..50 {
        a.load(k).unwrap();
    }

    server.stop();
    let before = (a.stats().remote, b.stats().remote);
    let outage = Instant::now();
    // Cached keys, keys cached elsewhere, new keys, writes and invalidations: all answered.
    let mut calls = 0u64;
    for round in 0..4u64 {
        for k in 0..100u64 {
            let c = if k % 2 == 0 { &a } else { &b };
            assert_eq!(c.load(k).unwrap(), k * 1000, "round {round} key {k}");
            calls += 1;
        }
        b.insert(1000 + round, round);
        assert_eq!(b.get(&(1000 + round)), Some(round));
        a.invalidate(&1000);
    }
    let after = (a.stats().remote, b.stats().remote);
    let failed = |i: usize| {
        let (x, y) = if i == 0 {
            (after.0, before.0)
        } else {
            (after.1, before.1)
        };
        (x - y).errors + (x - y).timeouts
    };
    let skipped = (after.0 - before.0).skipped + (after.1 - before.1).skipped;
    // Without the breaker each of the ~90 operations (local misses, writes, invalidations)
    // would have failed; with it, 3 per instance did (one more per cooldown while open).
    let failed = failed(0) + failed(1);
    // A probe per instance per 3 s cooldown (none if, as usual, the loop took milliseconds).
    let probes = 2 * (outage.elapsed().as_secs() / 3 + 1);
    assert!(
        a.is_breaker_open() && b.is_breaker_open(),
        "Redis is still down"
    );
    assert!(after.0.breaker_opened >= 1 && after.1.breaker_opened >= 1);
    assert!(
        (6..=6 + probes).contains(&failed),
        "{failed} operations failed"
    );
    assert!(skipped >= 60, "{skipped} skipped of {calls} calls");

    // The server returns (empty): both recover, and the fleet works again.
    server.restart();
    assert!(
        eventually(|| a.is_subscribed() && b.is_subscribed()),
        "subscribers reconnected"
    );
    let loads = backend.total();
    assert!(eventually(|| {
        // Each call probes once the cooldown has passed; success closes the breaker.
        a.invalidate(&999_999);
        b.invalidate(&999_999);
        !a.is_breaker_open() && !b.is_breaker_open()
    }));
    assert_eq!(a.load(5000).unwrap(), 5_000_000);
    assert_eq!(b.load(5000).unwrap(), 5_000_000);
    assert_eq!(
        backend.total(),
        loads + 1,
        "b read a's load from Redis again"
    );
    a.invalidate(&5000);
    assert!(
        eventually(|| !b.contains_key(&5000)),
        "invalidations flow again"
    );
}

#[test]
fn a_frozen_server_costs_timeouts_not_errors() {
    let _w = common::watchdog(Duration::from_secs(120), "frozen redis");
    let (server, backend) = start(Duration::ZERO);
    let a = instance(
        tier(&server, "t10")
            .timeouts(Duration::from_millis(50), Duration::from_millis(50))
            .breaker(2, Duration::from_millis(300))
            .lease(Duration::from_secs(1), Duration::from_secs(1)),
        &backend,
    );
    a.load(1).unwrap();
    // Hung, as with a partition: connections are accepted, nothing is answered.
    server.pause();
    for k in 0..200 {
        assert_eq!(a.load(k).unwrap(), k * 1000);
    }
    a.insert(7, 70);
    a.invalidate(&8);
    let s = a.stats().remote;
    assert!(s.timeouts >= 2, "{s:?}");
    assert!(s.breaker_opened >= 1 && s.skipped > 150, "{s:?}");
    assert_eq!(backend.total(), 200, "every new key loaded once, locally");
    server.resume();
    assert!(eventually(|| {
        a.invalidate(&999);
        !a.is_breaker_open()
    }));
    a.invalidate(&3);
    assert_eq!(a.load(3).unwrap(), 3000);
    assert_eq!(
        a.stats().remote.writes - s.writes,
        1,
        "writes to Redis again"
    );
}

/// One load of key `k` by an instance with leases (waiting at most `wait`) while another
/// holder has held the lease on `k` for `px` ms and never gives it back. Returns the counts
/// of `(lease waits, leases acquired, fallbacks)` and a connection to Redis (and its server).
fn load_against_planted_lease(
    ns: &str,
    k: u64,
    px: u64,
    wait: Duration,
) -> ((u64, u64, u64), redis::Connection, RedisServer) {
    let (server, backend) = start(Duration::ZERO);
    let a = instance(
        tier(&server, ns).lease(Duration::from_secs(5), wait),
        &backend,
    );
    let mut conn = raw(&server);
    set(&mut conn, &lkey(ns, k), "someone-else", Some(px));
    assert_eq!(a.load(k).unwrap(), k * 1000);
    assert_eq!(backend.of(k), 1);
    let s = a.stats().remote;
    let counts = (s.lease_waits, s.leases_acquired, s.lease_fallbacks);
    (counts, conn, server)
}

#[test]
fn a_lease_whose_holder_stopped_expires_and_a_waiter_takes_over() {
    let _w = common::watchdog(Duration::from_secs(60), "lease expiry");
    // A holder that took the lease for 300 ms and then stopped (crashed, paused).
    let (counts, mut conn, _server) =
        load_against_planted_lease("t5", 7, 300, Duration::from_secs(30));
    // It waited for the expiry (not the 30 s bound: no fallback), then loaded under its own
    // lease, and gave it back.
    assert_eq!(counts, (1, 1, 0));
    assert!(!exists(&mut conn, &lkey("t5", 7)));
    assert_eq!(value(&mut conn, "t5", 7).as_deref(), Some("7000"));
}

#[test]
fn a_holder_that_never_finishes_bounds_the_wait_then_the_load_is_local() {
    let _w = common::watchdog(Duration::from_secs(60), "lease wait bound");
    let (counts, mut conn, _server) =
        load_against_planted_lease("t6", 8, 60_000, Duration::from_millis(200));
    assert_eq!(counts, (1, 0, 1));
    // The hung holder's lease is not ours to release.
    assert_eq!(
        get(&mut conn, &lkey("t6", 8)).as_deref(),
        Some("someone-else")
    );
}

#[test]
fn a_failing_loader_releases_its_lease_and_its_error_is_returned_as_is() {
    let _w = common::watchdog(Duration::from_secs(60), "failing lease holder");
    let server = RedisServer::start();
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let a: TieredCache<u64, u64> = tier(&server, "t7")
        .lease(Duration::from_secs(30), Duration::from_secs(30))
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(60))
                .loader(move |_k: &u64| {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err::<u64, BoxError>("backend down".into())
                }),
            Plain,
        )
        .unwrap();
    let e = a.load(1).unwrap_err();
    assert!(matches!(e, LoadError::Loader(_)), "{e:?}");
    assert_eq!(e.to_string(), "loader failed: backend down");
    let mut conn = raw(&server);
    assert!(!exists(&mut conn, &lkey("t7", 1)));
    assert!(!exists(&mut conn, &vkey("t7", 1)));
    // A second call takes the lease at once (no 30 s wait for the old one).
    assert!(a.load(1).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn garbage_in_redis_is_a_miss_not_an_error() {
    let _w = common::watchdog(Duration::from_secs(60), "codec error");
    let (server, backend) = start(Duration::ZERO);
    let a = instance(tier(&server, "t8"), &backend);
    let mut conn = raw(&server);
    redis::cmd("HSET")
        .arg(vkey("t8", 5))
        .arg("d")
        .arg("not a number")
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(a.load(5).unwrap(), 5000);
    assert_eq!(a.stats().remote.errors, 1);
    let fixed = value(&mut conn, "t8", 5);
    assert_eq!(fixed.as_deref(), Some("5000"), "the load overwrote it");
}

#[test]
fn no_server_at_all_still_serves() {
    let _w = common::watchdog(Duration::from_secs(60), "no server");
    let port = redis_server::free_port();
    let backend = Arc::new(Backend::default());
    let a = instance(
        RedisTier::new(format!("redis://127.0.0.1:{port}/"))
            .namespace("t9")
            .lease(Duration::from_secs(1), Duration::from_secs(1)),
        &backend,
    );
    for k in 0..100 {
        assert_eq!(a.load(k).unwrap(), k * 1000);
        a.invalidate(&k);
    }
    a.invalidate_all();
    assert_eq!(backend.total(), 100);
    let s = a.stats().remote;
    assert!(s.errors >= 3 && s.skipped > 0, "{s:?}");
    assert!(!a.is_subscribed());
    assert!(TieredCache::<u64, u64>::clone(&a).is_breaker_open());
}

fn async_instance(tier: RedisTier, backend: &Arc<Backend>) -> TieredCache<u64, u64> {
    let b = Arc::clone(backend);
    tier.build(
        Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600))
            .record_stats()
            .async_loader(move |k: &u64| {
                let (b, k) = (Arc::clone(&b), *k);
                async move {
                    // The backend blocks; a real one would be an async client.
                    tokio::task::yield_now().await;
                    Ok::<_, BoxError>(b.load(k))
                }
            }),
        Plain,
    )
    .expect("valid configuration")
}

#[test]
fn async_loads_share_one_load_per_key_across_instances() {
    let _w = common::watchdog(Duration::from_secs(120), "async fleet single-flight");
    let (server, backend) = start(Duration::from_millis(1));
    let lease = |t: RedisTier| t.lease(Duration::from_secs(10), Duration::from_secs(20));
    let a = async_instance(lease(tier(&server, "t11")), &backend);
    let b = async_instance(lease(tier(&server, "t11")), &backend);
    const KEYS: u64 = 100;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            for c in [&a, &b] {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..KEYS {
                        let k = (i * 7 + t * 31) % KEYS;
                        assert_eq!(c.load_async(k).await.unwrap(), k * 1000);
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        // get_with_async and try_get_with_async go through the tier too.
        assert_eq!(a.get_with_async(5000, async { 1 }).await, 1);
        assert_eq!(
            b.get_with_async(5000, async { 2 }).await,
            1,
            "read a's value"
        );
        assert_eq!(
            b.try_get_with_async(5001, async { Ok::<_, ()>(3) })
                .await
                .unwrap(),
            3
        );
        assert_eq!(a.try_get_with_async(5001, async { Err(()) }).await, Ok(3));
        assert_eq!(
            a.optionally_get_with_async(5002, async { None }).await,
            None
        );
        assert_eq!(
            b.optionally_get_with_async(5002, async { Some(4) }).await,
            Some(4)
        );
        assert_eq!(
            a.optionally_get_with_async(5002, async { None }).await,
            Some(4)
        );
    });
    for k in 0..KEYS {
        assert_eq!(backend.of(k), 1, "key {k} loaded once in the fleet");
    }
    let (sa, sb) = (a.stats().remote, b.stats().remote);
    assert_eq!(sa.leases_acquired + sb.leases_acquired, KEYS + 4);
    assert_eq!(sa.lease_fallbacks + sb.lease_fallbacks, 0);
}

#[test]
fn a_cancelled_async_load_gives_its_lease_back() {
    let _w = common::watchdog(Duration::from_secs(60), "cancelled async lease");
    let (server, backend) = start(Duration::ZERO);
    let a = async_instance(
        tier(&server, "t12").lease(Duration::from_secs(60), Duration::from_secs(60)),
        &backend,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut conn = raw(&server);
    rt.block_on(async {
        // The load never finishes; the caller gives up once the lease is taken.
        let slow = a.get_with_async(9, std::future::pending());
        let gave_up = tokio::time::timeout(Duration::from_millis(300), slow).await;
        assert!(gave_up.is_err());
    });
    // (The helper thread may still be finishing the lease attempt the dropped call started.)
    assert!(eventually(|| a.stats().remote.leases_acquired == 1));
    assert!(
        eventually(|| !exists(&mut conn, &lkey("t12", 9))),
        "the lease was given back, not left for its 60 s"
    );
    assert_eq!(a.loads_in_flight(), 0);
    // The next caller loads at once.
    let v = rt.block_on(a.get_with_async(9, async { 90 }));
    assert_eq!(v, 90);
}

#[test]
fn a_copy_read_from_redis_does_not_outlive_the_one_in_redis() {
    let _w = common::watchdog(Duration::from_secs(60), "local copy bounded by Redis");
    let (server, backend) = start(Duration::ZERO);
    // Values live 10 s in Redis; the local tier's own TTL is 600 s.
    let a = instance(tier(&server, "t13").ttl(Duration::from_secs(10)), &backend);
    let clock = herdcache::ManualClock::new();
    let b = {
        let bk = Arc::clone(&backend);
        tier(&server, "t13")
            .ttl(Duration::from_secs(10))
            .build(
                Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(600))
                    .clock(clock.clone())
                    .loader(move |k: &u64| Ok::<_, BoxError>(bk.load(*k))),
                Plain,
            )
            .unwrap()
    };
    a.load(1).unwrap();
    assert_eq!(b.load(1).unwrap(), 1000, "from Redis");
    assert_eq!(backend.of(1), 1);
    // b's copy is bounded by what Redis had left (at most 10 s), not b's 600 s.
    clock.advance(Duration::from_millis(9_000));
    assert!(b.contains_key(&1), "still within Redis's lifetime");
    clock.advance(Duration::from_millis(1_001));
    assert!(!b.contains_key(&1), "expired with the copy in Redis");
    // A value b loads itself keeps b's own TTL.
    b.load(2).unwrap();
    clock.advance(Duration::from_secs(100));
    assert!(b.contains_key(&2));
}

#[test]
fn one_instance_refreshes_for_the_fleet() {
    let _w = common::watchdog(Duration::from_secs(60), "fleet refresh");
    let (server, backend) = start(Duration::ZERO);
    let clock = herdcache::ManualClock::new();
    let instance = || {
        let b = Arc::clone(&backend);
        tier(&server, "t14")
            .lease(Duration::from_secs(5), Duration::from_secs(5))
            .build(
                Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(60))
                    .refresh_after(Duration::from_secs(1))
                    .clock(clock.clone())
                    .record_stats()
                    .loader(move |k: &u64| Ok::<_, BoxError>(b.load(*k))),
                Plain,
            )
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    assert_eq!(a.load(1).unwrap(), 1000);
    assert_eq!(b.load(1).unwrap(), 1000, "from Redis");
    backend.version.store(1, Ordering::SeqCst);
    // The copy in Redis is 2 s old (of its 60 s), both local copies are due for refresh.
    let mut conn = raw(&server);
    redis::cmd("PEXPIRE")
        .arg(vkey("t14", 1))
        .arg(58_000)
        .query::<()>(&mut conn)
        .unwrap();
    clock.advance(Duration::from_millis(1_500));
    // a's refresh does not take Redis's copy (older than refresh_after): it loads.
    assert_eq!(a.load(1).unwrap(), 1000, "stale while revalidating");
    assert_eq!(a.get(&1), Some(1001), "refreshed inline");
    assert_eq!(backend.of(1), 2);
    // b's refresh finds a's fresh value in Redis: no backend call.
    assert_eq!(b.load(1).unwrap(), 1000);
    assert_eq!(b.get(&1), Some(1001));
    assert_eq!(backend.of(1), 2, "one refresh for the fleet");
    assert_eq!(b.stats().refreshes_succeeded, 1);
}

#[test]
fn clear_on_reconnect_drops_what_may_have_missed_an_invalidation() {
    let _w = common::watchdog(Duration::from_secs(60), "clear on reconnect");
    let (mut server, backend) = start(Duration::ZERO);
    let keep = instance(tier(&server, "t15"), &backend);
    let clear = instance(tier(&server, "t15").clear_on_reconnect(true), &backend);
    assert!(eventually(|| keep.is_subscribed() && clear.is_subscribed()));
    for k in 0..10 {
        keep.load(k).unwrap();
        clear.load(k).unwrap();
    }
    server.stop();
    assert!(eventually(
        || !keep.is_subscribed() && !clear.is_subscribed()
    ));
    server.restart();
    assert!(eventually(|| keep.is_subscribed() && clear.is_subscribed()));
    assert!(
        eventually(|| clear.entry_count() == 0),
        "cleared on reconnect"
    );
    assert_eq!(keep.entry_count(), 10, "kept: staleness bounded by the TTL");
    assert_eq!(clear.stats().remote.subscriber_connects, 2);
}

/// A read may move a local entry's deadline later (a time to idle, `Expiry::expire_after_read`):
/// for a copy read from Redis, never past the shared copy's remaining life. (Before: with a
/// time to idle and no local time to live, a `get` at 9 s moved it to 9 s + the idle time, and
/// the copy outlived Redis's by ten minutes; so with an `Expiry` and no time to live.)
#[test]
fn a_copy_read_from_redis_does_not_outlive_it_when_reads_move_its_deadline() {
    let _w = common::watchdog(Duration::from_secs(60), "reads do not extend past Redis");
    /// Each read gives another ten minutes.
    struct ReadsExtend;
    impl herdcache::Expiry<u64, u64> for ReadsExtend {
        fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
            Some(Duration::from_secs(600))
        }
        fn expire_after_read(
            &self,
            _k: &u64,
            _v: &u64,
            _remaining: Option<Duration>,
        ) -> Option<Duration> {
            Some(Duration::from_secs(600))
        }
    }
    let (server, backend) = start(Duration::ZERO);
    for (n, idle) in [(0, true), (1, false)] {
        let prefix = format!("t13r{n}");
        let a = instance(
            tier(&server, &prefix).ttl(Duration::from_secs(10)),
            &backend,
        );
        let clock = herdcache::ManualClock::new();
        let b = {
            let bk = Arc::clone(&backend);
            let builder = Cache::builder()
                .max_capacity(100)
                .clock(clock.clone())
                .loader(move |k: &u64| Ok::<_, BoxError>(bk.load(*k)));
            let builder = if idle {
                builder.time_to_idle(Duration::from_secs(600))
            } else {
                builder.expire_after(ReadsExtend)
            };
            tier(&server, &prefix)
                .ttl(Duration::from_secs(10))
                .build(builder, Plain)
                .unwrap()
        };
        let what = if idle { "time to idle" } else { "Expiry" };
        a.load(1).unwrap();
        assert_eq!(b.load(1).unwrap(), 1000, "{what}: from Redis");
        clock.advance(Duration::from_millis(9_000));
        assert_eq!(
            b.get(&1),
            Some(1000),
            "{what}: still within Redis's lifetime"
        );
        clock.advance(Duration::from_millis(1_001));
        assert!(
            !b.contains_key(&1),
            "{what}: expired with the copy in Redis"
        );
        // A value b loads itself lives as b's own settings say: reads keep it.
        b.load(2).unwrap();
        for _ in 0..3 {
            clock.advance(Duration::from_secs(300));
            assert!(
                b.get(&2).is_some(),
                "{what}: its own value, read every 5 min"
            );
        }
    }
}
