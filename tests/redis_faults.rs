//! The Redis tier on a bad link and with bad values: a fault-injecting proxy between the cache
//! and `redis-server` drips or stalls replies (each operation must still end within its
//! deadline, counted as a timeout, feeding the breaker); async callers waiting on other
//! instances' leases hold no helper thread; an oversized value is a per-key matter, never a
//! connectivity failure.
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
use proxy::Proxy;
use redis_server::RedisServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// An instance whose loader returns `1000 + key` and counts its calls.
fn instance(tier: RedisTier, loads: &Arc<AtomicU64>) -> TieredCache<u64, u64> {
    let l = Arc::clone(loads);
    tier.build(
        Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600))
            .record_stats()
            .loader(move |k: &u64| {
                l.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(1000 + k)
            }),
        Plain,
    )
    .expect("valid configuration")
}

/// Issue 12, scenario 4: replies drip in a byte every 30 ms, so that every socket read
/// returns within the 50 ms operation timeout and the reply takes seconds. Each operation
/// must end at its deadline (connect + request + reply), count a timeout, and feed the
/// breaker, which opens after 3 of them.
#[test]
fn a_dripping_reply_ends_at_the_operation_deadline_and_opens_the_breaker() {
    let _w = watchdog(LIMIT, "dripping replies");
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let loads = Arc::new(AtomicU64::new(0));
    let direct = instance(RedisTier::new(server.url()).namespace("f1"), &loads);
    for k in 0..3 {
        direct.insert(k, 1); // in Redis: a slow read would find it
    }
    let a = instance(
        RedisTier::new(proxy.url())
            .namespace("f1")
            .timeouts(Duration::from_millis(100), Duration::from_millis(50))
            .breaker(3, Duration::from_secs(600)),
        &loads,
    );
    assert_eq!(a.load(99).unwrap(), 1099, "the link works before the drip");
    proxy.drip(Duration::from_millis(30));
    let mut worst = Duration::ZERO;
    let mut got = Vec::new();
    for k in 0..3 {
        let t = Instant::now();
        got.push(a.load(k).unwrap());
        worst = worst.max(t.elapsed());
    }
    let r = a.stats().remote;
    println!(
        "dripping replies (1 byte / 30 ms, operation timeout 50 ms): slowest load {worst:?}, \
         timeouts {}, breaker open {}",
        r.timeouts,
        a.is_breaker_open()
    );
    assert_eq!(
        got,
        [1000, 1001, 1002],
        "the reads timed out: loaded locally"
    );
    assert!(r.timeouts >= 3, "each dripping reply is a timeout: {r:?}");
    assert!(
        a.is_breaker_open(),
        "three timeouts in a row open the breaker"
    );
    // With the breaker open, Redis is skipped without waiting.
    let t = Instant::now();
    assert_eq!(a.load(5).unwrap(), 1005);
    println!("with the breaker open: {:?}", t.elapsed());
    assert!(a.stats().remote.skipped >= 1);
}

/// Replies held back altogether: each operation times out at its deadline, the breaker
/// opens, and once the link is back a probe closes it again.
#[test]
fn a_stalled_link_times_out_opens_the_breaker_and_recovers() {
    let _w = watchdog(LIMIT, "stalled replies");
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let loads = Arc::new(AtomicU64::new(0));
    let a = instance(
        RedisTier::new(proxy.url())
            .namespace("f2")
            .timeouts(Duration::from_millis(100), Duration::from_millis(50))
            .breaker(2, Duration::from_millis(200)),
        &loads,
    );
    assert_eq!(a.load(1).unwrap(), 1001);
    proxy.stall(true);
    a.local().invalidate(&1);
    a.local().invalidate(&2);
    assert_eq!(a.load(1).unwrap(), 1001);
    assert_eq!(a.load(2).unwrap(), 1002);
    assert!(a.stats().remote.timeouts >= 2);
    assert!(a.is_breaker_open());
    proxy.stall(false);
    assert!(
        eventually(|| {
            a.local().invalidate(&3);
            a.load(3).unwrap();
            !a.is_breaker_open()
        }),
        "a probe after the cooldown closes the breaker"
    );
}

/// An instance of namespace `ns` whose loads of keys `0..n` each take the fleet's lease and
/// stay held until the returned gate opens (then they return `2000 + key`).
fn hold_leases(
    server: &RedisServer,
    ns: &str,
    n: u64,
) -> (
    TieredCache<u64, u64>,
    Arc<Gate>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let gate = Arc::new(Gate::default());
    let g = Arc::clone(&gate);
    let b = RedisTier::new(server.url())
        .namespace(ns)
        .lease(Duration::from_secs(60), Duration::from_secs(60))
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .build(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .loader(move |k: &u64| {
                    g.wait();
                    Ok::<_, BoxError>(2000 + k)
                }),
            Plain,
        )
        .unwrap();
    let holders = (0..n)
        .map(|k| {
            let b = b.clone();
            std::thread::spawn(move || assert_eq!(b.load(k).unwrap(), 2000 + k))
        })
        .collect();
    assert!(
        eventually(|| b.stats().remote.leases_acquired == n),
        "the holder took every lease"
    );
    (b, gate, holders)
}

#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// An instance whose callers wait at most `wait` on another instance's lease.
fn waiter(server: &RedisServer, ns: &str, wait: Duration) -> TieredCache<u64, u64> {
    RedisTier::new(server.url())
        .namespace(ns)
        .lease(Duration::from_secs(60), wait)
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .build(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600)),
            Plain,
        )
        .unwrap()
}

/// A runtime without tokio's timer: the lease waits' pauses need none.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

const CALLERS: u64 = 256;

/// Issue 12, scenario 6: 256 async callers on keys another instance holds leases on. Their
/// waits hold no helper thread (the pool has 64), so all 256 are waiting at once — counted by
/// `lease_waits` while the holder still holds every lease — and all get the holder's values
/// when it finishes.
#[test]
fn async_lease_waits_hold_no_helper_thread() {
    let _w = watchdog(LIMIT, "async lease waits");
    let server = RedisServer::start();
    let (_b, gate, holders) = hold_leases(&server, "f3", CALLERS);
    let a = waiter(&server, "f3", Duration::from_secs(60));
    let rt = runtime();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|k| {
            let a = a.clone();
            rt.spawn(async move { a.get_with_async(k, async move { 1000 + k }).await })
        })
        .collect();
    let all_waiting = eventually(|| a.stats().remote.lease_waits == CALLERS);
    let waiting = a.stats().remote.lease_waits;
    gate.open();
    let opened = Instant::now();
    let got: Vec<u64> = rt.block_on(async {
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        got
    });
    println!(
        "{CALLERS} async callers on leased keys: {waiting} waiting at once; all done {:?} \
         after the holder finished",
        opened.elapsed()
    );
    assert!(
        all_waiting,
        "only {waiting} of {CALLERS} callers could wait at once"
    );
    assert_eq!(got, (0..CALLERS).map(|k| 2000 + k).collect::<Vec<_>>());
    for h in holders {
        h.join().unwrap();
    }
}

/// The figure: 256 async callers on leased keys whose holder never finishes, with a
/// 500 ms lease wait. Each gives up after the wait and loads locally; the slowest caller's
/// latency is printed (measured, not asserted).
#[test]
fn async_lease_wait_fallbacks_of_256_callers() {
    let _w = watchdog(LIMIT, "async lease fallbacks");
    let server = RedisServer::start();
    let (_b, gate, holders) = hold_leases(&server, "f4", CALLERS);
    let wait = Duration::from_millis(500);
    let a = waiter(&server, "f4", wait);
    let rt = runtime();
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|k| {
            let a = a.clone();
            rt.spawn(async move {
                let v = a.get_with_async(k, async move { 1000 + k }).await;
                (v, start.elapsed())
            })
        })
        .collect();
    let got: Vec<(u64, Duration)> = rt.block_on(async {
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        got
    });
    gate.open();
    let mut times: Vec<Duration> = got.iter().map(|&(_, t)| t).collect();
    times.sort();
    let late = times
        .iter()
        .filter(|&&t| t > wait + Duration::from_millis(200))
        .count();
    println!(
        "{CALLERS} async callers, lease wait {wait:?}, holder never done: median {:?}, worst \
         {:?}, {late} waited more than wait + 200 ms",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert!(got
        .iter()
        .enumerate()
        .all(|(k, &(v, _))| v == 1000 + k as u64));
    assert_eq!(a.stats().remote.lease_fallbacks, CALLERS);
    for h in holders {
        h.join().unwrap();
    }
}

fn bytes_instance(tier: RedisTier) -> TieredCache<u64, Vec<u8>> {
    tier.build(
        Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600)),
        Plain,
    )
    .unwrap()
}

/// Issue 12, scenario 7 (oversized values): a 64 MiB value under the default 1 MiB maximum
/// is kept locally and counted, never tried on the wire: no timeout, no error, the breaker
/// (here opening at the first failure) stays closed for every other key.
#[test]
fn a_huge_value_is_not_a_connectivity_failure() {
    let _w = watchdog(LIMIT, "huge value");
    let server = RedisServer::start();
    let tier = || {
        RedisTier::new(server.url())
            .namespace("f5")
            .breaker(1, Duration::from_secs(600))
    };
    let a = bytes_instance(tier());
    let b = bytes_instance(tier());
    let huge = vec![7u8; 64 << 20];
    for k in 0..3 {
        let h = huge.clone();
        assert_eq!(a.get_with(k, move || h).len(), huge.len());
    }
    let r = a.stats().remote;
    assert_eq!(r.oversized, 3, "{r:?}");
    assert_eq!((r.errors, r.timeouts, r.breaker_opened), (0, 0, 0), "{r:?}");
    assert!(!a.is_breaker_open());
    // Other keys still go through Redis.
    assert_eq!(a.get_with(10, || b"small".to_vec()), b"small");
    assert_eq!(b.get_with(10, || b"other".to_vec()), b"small");
}

/// An `insert` of a value over the maximum leaves a tombstone in Redis: no instance reads
/// the older value from there afterwards.
#[test]
fn an_oversized_insert_invalidates_the_key_in_redis() {
    let _w = watchdog(LIMIT, "oversized insert");
    let server = RedisServer::start();
    let tier = || {
        RedisTier::new(server.url())
            .namespace("f6")
            .max_value_size(1024)
    };
    let a = bytes_instance(tier());
    let b = bytes_instance(tier());
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    b.insert(1, b"old".to_vec());
    a.insert(1, vec![1u8; 4096]);
    assert_eq!(a.get(&1).map(|v| v.len()), Some(4096));
    assert!(eventually(|| b.get(&1).is_none()), "B dropped its old copy");
    let c = bytes_instance(tier());
    assert_eq!(
        c.get_with(1, || b"loaded".to_vec()),
        b"loaded",
        "Redis no longer has the old value"
    );
    assert_eq!(a.stats().remote.oversized, 1);
}

/// The tier's own connections do the handshake the URL asks for: `AUTH` with the password
/// (and user, if any) and `SELECT` of the database.
#[test]
fn the_url_s_password_and_database_are_used() {
    let _w = watchdog(LIMIT, "auth and db");
    let server = RedisServer::start();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query::<()>(&mut admin)
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let url = format!("redis://:s3cret@127.0.0.1:{}/3", server.port);
    let a = instance(RedisTier::new(url.as_str()).namespace("f7"), &loads);
    let b = instance(RedisTier::new(url.as_str()).namespace("f7"), &loads);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1001);
    assert_eq!(b.load(1).unwrap(), 1001);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "B read A's value from Redis"
    );
    let r = a.stats().remote;
    assert_eq!((r.errors, r.timeouts), (0, 0), "{r:?}");
    let mut db3 = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let found: Option<String> = redis::cmd("HGET")
        .arg("hc:2:f7:v{1}")
        .arg("d")
        .query(&mut db3)
        .unwrap();
    assert_eq!(found.as_deref(), Some("1001"), "the value is in database 3");
    let wrong = instance(RedisTier::new(server.url()).namespace("f7"), &loads);
    assert_eq!(
        wrong.load(2).unwrap(),
        1002,
        "without the password: loaded locally"
    );
    assert!(wrong.stats().remote.errors >= 1);
}
