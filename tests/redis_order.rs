//! Write ordering of the Redis tier, with loaders held on channels to force each interleaving:
//! a load that read the backend before a write or invalidation (on any instance) never writes
//! its older value back for the fleet; an instance never reads back from Redis a value it has
//! just invalidated; concurrent writers on two instances converge; namespaces are prefix-free;
//! a key of the wrong type is a per-key error, repaired by the next write.
//!
//! Each test starts its own `redis-server` on a free loopback port (`.ci/run` installs it).
#![cfg(feature = "redis")]

mod common;
#[path = "common/proxy.rs"]
mod proxy;
use herdcache_testkit::redis_server;

use common::{eventually, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use redis_server::RedisServer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// A backend whose current value of every key is `version`; a load can be *held*: it reads
/// the version, reports it on `read`, and returns only when released.
struct Backend {
    version: AtomicU64,
    hold: AtomicBool,
    read: Mutex<Option<Sender<u64>>>,
    release: Mutex<Option<Receiver<()>>>,
    loads: AtomicU64,
}

impl Backend {
    fn new() -> Arc<Backend> {
        Arc::new(Backend {
            version: AtomicU64::new(1),
            hold: AtomicBool::new(false),
            read: Mutex::new(None),
            release: Mutex::new(None),
            loads: AtomicU64::new(0),
        })
    }

    fn load(&self) -> u64 {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let v = self.version.load(Ordering::SeqCst);
        if self.hold.swap(false, Ordering::SeqCst) {
            let read = self.read.lock().unwrap().take().expect("armed");
            let release = self.release.lock().unwrap().take().expect("armed");
            read.send(v).unwrap();
            release.recv().unwrap();
        }
        v
    }

    /// Holds the next load after it read the backend: returns (its read, the release).
    fn hold_next(&self) -> (Receiver<u64>, Sender<()>) {
        let (read_tx, read_rx) = channel();
        let (release_tx, release_rx) = channel();
        *self.read.lock().unwrap() = Some(read_tx);
        *self.release.lock().unwrap() = Some(release_rx);
        self.hold.store(true, Ordering::SeqCst);
        (read_rx, release_tx)
    }
}

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
}

fn instance(tier: RedisTier, backend: &Arc<Backend>) -> TieredCache<u64, u64> {
    let b = Arc::clone(backend);
    tier.build(
        Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600))
            .record_stats()
            .loader(move |_k: &u64| Ok::<_, BoxError>(b.load())),
        Plain,
    )
    .expect("valid configuration")
}

#[derive(Clone, Copy, Debug)]
enum Write {
    Insert,
    Invalidate,
}

/// Instance A's load of key 1 reads the backend's version 1 and is held; the backend moves to
/// version 2 and `writer` writes (or invalidates) the key; A's load then finishes. A fresh
/// instance must not get version 1 from Redis.
fn cache_aside_race(ns: &str, leases: bool, write: Write, writer_is_a: bool) {
    let _w = watchdog(LIMIT, "cache-aside race");
    let server = RedisServer::start();
    let backend = Backend::new();
    let with_leases = |t: RedisTier| {
        if leases {
            t.lease(Duration::from_secs(30), Duration::from_secs(1))
        } else {
            t
        }
    };
    let a = instance(with_leases(tier(&server, ns)), &backend);
    let b = instance(with_leases(tier(&server, ns)), &backend);
    // Messages sent before a subscriber is up are lost (that staleness is bounded by the TTL,
    // and not what this test is about).
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let (read, release) = backend.hold_next();
    let loader = {
        let a = a.clone();
        std::thread::spawn(move || a.load(1).unwrap())
    };
    assert_eq!(read.recv().unwrap(), 1, "A's load read version 1");
    backend.version.store(2, Ordering::SeqCst);
    let w = if writer_is_a { &a } else { &b };
    match write {
        Write::Insert => w.insert(1, 2),
        Write::Invalidate => w.invalidate(&1),
    }
    release.send(()).unwrap();
    assert_eq!(loader.join().unwrap(), 1, "A's caller gets what it loaded");
    // The old value reaches nobody from now on: not a fresh instance, not A, not B.
    let c = instance(with_leases(tier(&server, ns)), &backend);
    assert_eq!(
        c.load(1).unwrap(),
        2,
        "{ns}: a fresh instance got the old value"
    );
    assert!(c.stats().remote.writes_superseded == 0);
    assert!(
        a.stats().remote.writes_superseded >= 1,
        "{ns}: A's write-back was refused"
    );
    assert!(eventually(|| a.load(1).unwrap() == 2), "{ns}: A");
    assert!(eventually(|| b.load(1).unwrap() == 2), "{ns}: B");
}

#[test]
fn a_load_racing_an_invalidation_on_another_instance_writes_nothing_back() {
    cache_aside_race("o1", false, Write::Invalidate, false);
}

#[test]
fn a_load_racing_an_insert_on_another_instance_writes_nothing_back() {
    cache_aside_race("o2", false, Write::Insert, false);
}

#[test]
fn with_leases_an_invalidation_revokes_the_lease_and_the_write_back() {
    cache_aside_race("o3", true, Write::Invalidate, false);
}

#[test]
fn with_leases_an_insert_beats_the_lease_holders_write_back() {
    cache_aside_race("o4", true, Write::Insert, false);
}

#[test]
fn an_instance_racing_its_own_writes_keeps_them() {
    cache_aside_race("o5", false, Write::Invalidate, true);
    cache_aside_race("o6", true, Write::Insert, true);
}

#[test]
fn a_refresh_racing_an_invalidation_writes_nothing_back() {
    let _w = watchdog(LIMIT, "refresh race");
    let server = RedisServer::start();
    let backend = Backend::new();
    let clock = herdcache::ManualClock::new();
    let refreshing = |ns: &str| {
        let b = Arc::clone(&backend);
        tier(&server, ns)
            .build(
                Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(600))
                    .refresh_after(Duration::from_secs(1))
                    .clock(clock.clone())
                    .record_stats()
                    .loader(move |_k: &u64| Ok::<_, BoxError>(b.load())),
                Plain,
            )
            .unwrap()
    };
    let a = refreshing("o7");
    let b = instance(tier(&server, "o7"), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1);
    clock.advance(Duration::from_secs(2));
    // The copy in Redis looks 2 s old too (the tier measures age by its time left there), so
    // the refresh does not take it back from Redis.
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("PEXPIRE")
        .arg("hc:2:o7:v{1}")
        .arg(598_000)
        .query::<()>(&mut conn)
        .unwrap();
    // A's refresh (inline, in this reader) reads version 1 again and is held.
    let (read, release) = backend.hold_next();
    let reader = {
        let a = a.clone();
        std::thread::spawn(move || a.get(&1))
    };
    assert_eq!(read.recv().unwrap(), 1);
    backend.version.store(2, Ordering::SeqCst);
    b.invalidate(&1);
    release.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), Some(1), "stale while revalidating");
    let c = instance(tier(&server, "o7"), &backend);
    assert_eq!(
        c.load(1).unwrap(),
        2,
        "the refresh wrote its older value back"
    );
    assert!(eventually(|| a.load(1).unwrap() == 2));
}

#[test]
fn an_instance_never_reads_back_what_it_just_invalidated() {
    let _w = watchdog(LIMIT, "own invalidation");
    let server = RedisServer::start();
    let backend = Backend::new();
    let a = instance(tier(&server, "o8"), &backend);
    let stop = Arc::new(AtomicBool::new(false));
    // Hot readers on the same instance: one of them misses as soon as the local copy goes,
    // and reads Redis (before the instance's own change of Redis, on the old code).
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (a, stop) = (a.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    a.load(1).unwrap();
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut lost = 0;
    for round in 2..302u64 {
        backend.version.store(round, Ordering::SeqCst);
        a.invalidate(&1);
        // Loads that began after the invalidation returned see the new version.
        if a.load(1).unwrap() < round {
            lost += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(
        lost, 0,
        "{lost} of 300 invalidations lost ({reads} concurrent reads)"
    );
}

#[test]
fn concurrent_inserts_on_two_instances_converge_on_redis() {
    let _w = watchdog(LIMIT, "concurrent inserts");
    let server = RedisServer::start();
    let backend = Backend::new();
    let a = instance(tier(&server, "o9"), &backend);
    let b = instance(tier(&server, "o9"), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let keys = 200u64;
    // Both instances insert each key at the same moment.
    let together = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            (0..keys).for_each(|k| {
                together.wait();
                a.insert(k, 1_000_000 + k);
            })
        });
        s.spawn(|| {
            (0..keys).for_each(|k| {
                together.wait();
                b.insert(k, 2_000_000 + k);
            })
        });
    });
    // Redis holds one of the two values per key; once the messages are in, both instances
    // serve that one.
    let c = instance(tier(&server, "o9"), &backend);
    let truth: Vec<u64> = (0..keys).map(|k| c.load(k).unwrap()).collect();
    assert_eq!(
        backend.loads.load(Ordering::SeqCst),
        0,
        "every key is in Redis"
    );
    let converged = |x: &TieredCache<u64, u64>| {
        (0..keys).all(|k| x.get(&k).is_none_or(|v| v == truth[k as usize]))
    };
    assert!(eventually(|| converged(&a)), "A kept values Redis lost");
    assert!(eventually(|| converged(&b)), "B kept values Redis lost");
}

#[test]
fn namespaces_are_prefix_free() {
    let _w = watchdog(LIMIT, "prefix-free namespaces");
    let server = RedisServer::start();
    let backend = Backend::new();
    let app = instance(tier(&server, "app"), &backend);
    let app_v = instance(tier(&server, "app:v"), &backend);
    for k in 0..20 {
        app.load(k).unwrap();
        app_v.load(k).unwrap();
    }
    assert_eq!(backend.loads.load(Ordering::SeqCst), 40);
    app.invalidate_all();
    let fresh = instance(tier(&server, "app:v"), &backend);
    for k in 0..20 {
        fresh.load(k).unwrap();
    }
    assert_eq!(
        backend.loads.load(Ordering::SeqCst),
        40,
        "invalidate_all in `app` reached `app:v`"
    );
}

#[test]
fn a_load_that_began_before_invalidate_all_is_not_served_after_it() {
    let _w = watchdog(LIMIT, "invalidate_all race");
    let server = RedisServer::start();
    let backend = Backend::new();
    let a = instance(tier(&server, "o10"), &backend);
    let b = instance(tier(&server, "o10"), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let (read, release) = backend.hold_next();
    let loader = {
        let a = a.clone();
        std::thread::spawn(move || a.load(5).unwrap())
    };
    assert_eq!(read.recv().unwrap(), 1);
    backend.version.store(2, Ordering::SeqCst);
    b.invalidate_all();
    release.send(()).unwrap();
    assert_eq!(loader.join().unwrap(), 1);
    let c = instance(tier(&server, "o10"), &backend);
    assert_eq!(c.load(5).unwrap(), 2, "a value from before invalidate_all");
}

#[test]
fn a_key_of_the_wrong_type_is_a_per_key_error_and_is_repaired() {
    let _w = watchdog(LIMIT, "wrong type");
    let server = RedisServer::start();
    let backend = Backend::new();
    let a = instance(tier(&server, "o11"), &backend);
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    // A list where the value's hash should be.
    redis::cmd("RPUSH")
        .arg("hc:3:o11:v{7}")
        .arg("junk")
        .query::<()>(&mut conn)
        .unwrap();
    for _ in 0..5 {
        a.invalidate(&7); // also refused for this key... then repaired by the tombstone
    }
    redis::cmd("DEL")
        .arg("hc:3:o11:v{7}")
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("RPUSH")
        .arg("hc:3:o11:v{7}")
        .arg("junk")
        .query::<()>(&mut conn)
        .unwrap();
    for _ in 0..5 {
        a.local().invalidate(&7);
        assert_eq!(a.load(7).unwrap(), 1);
    }
    assert!(!a.is_breaker_open(), "one bad key opened the breaker");
    // (A key of another type reads as absent, without an error, since the `READ` script; the
    // tombstone and the write-back repair it.)
    // Repaired by the first write-back: the others found the value.
    let value: Option<String> = redis::cmd("HGET")
        .arg("hc:3:o11:v{7}")
        .arg("d")
        .query(&mut conn)
        .unwrap();
    assert_eq!(value.as_deref(), Some("1"));
    assert_eq!(
        backend.loads.load(Ordering::SeqCst),
        1,
        "later loads read Redis"
    );
    // Other keys keep using Redis.
    assert_eq!(a.load(8).unwrap(), 1);
    let b = instance(tier(&server, "o11"), &backend);
    assert_eq!(b.load(8).unwrap(), 1);
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
}

#[test]
fn clear_on_reconnect_also_after_a_start_with_redis_down() {
    let _w = watchdog(LIMIT, "clear after a failed start");
    let mut server = RedisServer::start();
    server.stop();
    let backend = Backend::new();
    let a = instance(tier(&server, "o12").clear_on_reconnect(true), &backend);
    for k in 0..10 {
        a.load(k).unwrap(); // loaded locally, Redis down: nobody heard of invalidations
    }
    assert_eq!(a.entry_count(), 10);
    server.restart();
    assert!(eventually(|| a.is_subscribed()));
    assert!(
        eventually(|| a.entry_count() == 0),
        "the first connection after a failed start clears"
    );
}

/// Issue 12, scenario 5: the subscriber's connection silently stops delivering (traffic on
/// existing connections dropped, new ones fine). The subscriber notices (a PING unanswered),
/// reconnects, and with `clear_on_reconnect` drops what it may have missed.
#[test]
fn a_half_open_subscriber_connection_is_detected_and_replaced() {
    let _w = watchdog(LIMIT, "half-open subscriber");
    let server = RedisServer::start();
    let port: u16 = server
        .url()
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the server's port");
    let proxy = proxy::Proxy::start(port);
    let backend = Backend::new();
    let via_proxy = RedisTier::new(proxy.url())
        .namespace("o13")
        .timeouts(Duration::from_millis(500), Duration::from_millis(200))
        .clear_on_reconnect(true);
    let a = instance(via_proxy, &backend);
    let b = instance(tier(&server, "o13"), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1);
    let connects = a.stats().remote.subscriber_connects;
    proxy.black_hole_open_connections();
    backend.version.store(2, Ordering::SeqCst);
    b.invalidate(&1); // A's subscriber never hears of it
    assert!(
        eventually(|| a.stats().remote.subscriber_connects > connects),
        "the dead subscription was replaced"
    );
    assert!(
        eventually(|| a.get(&1) != Some(1)),
        "the copy that may have missed an invalidation was dropped"
    );
    assert_eq!(a.load(1).unwrap(), 2);
}
