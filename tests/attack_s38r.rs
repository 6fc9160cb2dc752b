//! Round 38 (Redis part): an outside attack on "a load superseded by a write or invalidation
//! of its key is not written back to Redis" (src/redis/mod.rs: "A load that a write or
//! invalidation of its key superseded (on this instance, or announced by another one while it
//! ran) is neither stored locally nor written back to Redis."), which asks the *innermost*
//! flight the thread runs or polls.
//!
//! Finding: an async refresh (`future_spawner`) never enters its flight, so the tier asks
//! whatever flight the polling thread runs: polled inline inside a superseded load of another
//! key, the refresh (not superseded) is not written back
//! (`an_inline_async_refresh_inside_a_superseded_load_is_written_back`). Fixed with this
//! file: the async refresh's load is polled with its flight entered (as the blocking one runs
//! its loader).
//!
//! Each test starts its own `redis-server` on a free loopback port.
#![cfg(feature = "redis")]
#![cfg(not(any(loom, shuttle)))]

mod common;
use common::tier::{raw, vkey};
use herdcache_testkit::redis_server;

use common::{eventually, start, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, ManualClock};
use redis_server::RedisServer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
}

fn plain(server: &RedisServer, ns: &str) -> TieredCache<u64, u64> {
    tier(server, ns)
        .build(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .record_stats(),
            Plain,
        )
        .expect("valid configuration")
}

fn field(conn: &mut redis::Connection, ns: &str, k: u64, f: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(vkey(ns, k))
        .arg(f)
        .query(conn)
        .unwrap()
}

fn del(conn: &mut redis::Connection, ns: &str, k: u64) {
    redis::cmd("DEL")
        .arg(vkey(ns, k))
        .query::<()>(conn)
        .unwrap();
}

fn oom(conn: &mut redis::Connection, on: bool) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(conn)
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(if on { "1" } else { "0" })
        .query::<()>(conn)
        .unwrap();
}

/// Runs `f` on a thread with a large stack (nested async loads in debug builds are deep).
fn big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn received(c: &TieredCache<u64, u64>) -> u64 {
    c.stats().remote.invalidations_received
}

/// A loader gate: while armed, the next load signals `entered` and blocks until released.
#[derive(Clone)]
struct Gate {
    armed: Arc<AtomicBool>,
    entered: Arc<Mutex<mpsc::Sender<()>>>,
    release: Arc<Mutex<mpsc::Receiver<()>>>,
}

struct GateHandle {
    entered: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

fn gate() -> (Gate, GateHandle) {
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    (
        Gate {
            armed: Arc::new(AtomicBool::new(false)),
            entered: Arc::new(Mutex::new(etx)),
            release: Arc::new(Mutex::new(rrx)),
        },
        GateHandle {
            entered: erx,
            release: rtx,
        },
    )
}

impl Gate {
    fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.lock().unwrap().send(()).unwrap();
            self.release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60))
                .expect("released");
        }
    }
}

/// An instance whose refreshes run (through the tier) with the async loader on a future
/// spawner that polls each on a thread of its own; every load of key `k` returns
/// `k * 1000 + version`, passing the gate first.
fn async_refreshing(
    server: &RedisServer,
    ns: &str,
    clock: &ManualClock,
    version: &Arc<AtomicU64>,
    gate: &Gate,
) -> TieredCache<u64, u64> {
    let (v, g) = (Arc::clone(version), gate.clone());
    tier(server, ns)
        .build(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .refresh_after(Duration::from_secs(1))
                .clock(clock.clone())
                .record_stats()
                .async_loader(move |k: &u64| {
                    let (k, v, g) = (*k, Arc::clone(&v), g.clone());
                    async move {
                        g.pass();
                        Ok::<_, BoxError>(k * 1000 + v.load(Ordering::SeqCst))
                    }
                })
                .future_spawner(|f| {
                    std::thread::spawn(move || futures::executor::block_on(f));
                }),
            Plain,
        )
        .expect("valid configuration")
}

/// The same with the blocking loader on a thread spawner (the contrast).
fn blocking_refreshing(
    server: &RedisServer,
    ns: &str,
    clock: &ManualClock,
    version: &Arc<AtomicU64>,
    gate: &Gate,
) -> TieredCache<u64, u64> {
    let (v, g) = (Arc::clone(version), gate.clone());
    tier(server, ns)
        .build(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .refresh_after(Duration::from_secs(1))
                .clock(clock.clone())
                .record_stats()
                .loader(move |k: &u64| {
                    g.pass();
                    Ok::<_, BoxError>(k * 1000 + v.load(Ordering::SeqCst))
                })
                .spawner(|job| {
                    std::thread::spawn(job);
                }),
            Plain,
        )
        .expect("valid configuration")
}

/// A's refresh of key 1 reads Redis (nothing: deleted), then runs. B inserts 7 while Redis
/// is out of memory: refused, the key deleted and an unversioned message sent, which A hears
/// while its refresh runs (its refresh is superseded). Memory comes back; the refresh ends.
/// Returns (A's remote writes after the initial load / after the refresh, Redis' `d` field,
/// what a fresh instance reads).
fn refresh_superseded_by_refused_insert(
    async_refresh: bool,
    ns: &str,
) -> (u64, u64, Option<String>, u64) {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU64::new(0));
    let (g, h) = gate();
    let a = if async_refresh {
        async_refreshing(&server, ns, &clock, &version, &g)
    } else {
        blocking_refreshing(&server, ns, &clock, &version, &g)
    };
    let b = plain(&server, ns);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    let first = if async_refresh {
        futures::executor::block_on(a.load_async(1)).unwrap()
    } else {
        a.load(1).unwrap()
    };
    assert_eq!(first, 1000);
    // An async load's write-back happens after its value is returned (on a helper thread): it
    // must land before the key is deleted below. (Changed in stop 26: it raced the delete, the
    // refresh then found the value in Redis and never reached its loader.)
    assert!(eventually(|| a.stats().remote.writes >= 1));
    let writes_before = a.stats().remote.writes;
    del(&mut conn, ns, 1); // the refresh finds nothing in Redis: it loads
    version.store(1, Ordering::SeqCst);
    g.armed.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(2));
    assert_eq!(a.get(&1), Some(1000), "stale value served, refresh started");
    h.entered
        .recv_timeout(Duration::from_secs(30))
        .expect("the refresh reached its loader");
    let heard = received(&a);
    oom(&mut conn, true);
    b.insert(1, 7);
    oom(&mut conn, false);
    assert!(eventually(|| received(&a) > heard), "A heard B's message");
    h.release.send(()).unwrap();
    assert!(
        eventually(|| {
            let s = a.stats();
            s.refreshes_succeeded + s.refreshes_failed >= 1
        }),
        "the refresh ended"
    );
    // The write-back (or its refusal) is counted before the refresh's future or job ends:
    // wait for one of the two counters.
    assert!(eventually(|| {
        let s = a.stats().remote;
        s.writes + s.writes_superseded > writes_before
    }));
    let writes_after = a.stats().remote.writes;
    let d = field(&mut conn, ns, 1, "d");
    let c = plain(&server, ns);
    let got = c.get_with(1, || 9999);
    (writes_before, writes_after, d, got)
}

/// Contrast: a blocking refresh (spawner) superseded this way is not written back.
#[test]
fn blocking_refresh_superseded_by_an_announced_write_is_not_written_back() {
    let _w = watchdog(LIMIT, "blocking refresh superseded");
    let (before, after, d, got) = refresh_superseded_by_refused_insert(false, "s38rb");
    assert_eq!(after, before, "no write-back (d = {d:?})");
    assert_ne!(
        got, 1001,
        "Redis yields the refresh's value loaded before B's insert"
    );
}

/// An async refresh (future spawner) superseded the same way is not written back either
/// (round 38's candidate finding — polled outside any flight, the tier's `superseded()` check
/// would see none — does not hold: the refresh's future is polled inside its flight).
#[test]
fn async_refresh_superseded_by_an_announced_write_is_not_written_back() {
    let _w = watchdog(LIMIT, "async refresh superseded");
    let (before, after, d, got) = refresh_superseded_by_refused_insert(true, "s38ra");
    assert_eq!(after, before, "no write-back (d = {d:?})");
    assert_ne!(
        got, 1001,
        "Redis yields the refresh's value loaded before B's insert"
    );
}

/// An async refresh polled inline by the future spawner, from inside the loader of another
/// key (10) that a write superseded meanwhile: the refresh of key 1 itself is not superseded,
/// so it must be written back; it asks the innermost flight on the thread, which is key 10's.
#[test]
fn an_inline_async_refresh_inside_a_superseded_load_is_written_back() {
    let _w = watchdog(LIMIT, "inline async refresh in superseded outer");
    let server = RedisServer::start();
    let ns = "s38ri";
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU64::new(0));
    let v = Arc::clone(&version);
    let a: TieredCache<u64, u64> = tier(&server, ns)
        .build(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .refresh_after(Duration::from_secs(1))
                .clock(clock.clone())
                .record_stats()
                .async_loader(move |k: &u64| {
                    let (k, v) = (*k, Arc::clone(&v));
                    async move { Ok::<_, BoxError>(k * 1000 + v.load(Ordering::SeqCst)) }
                })
                .future_spawner(futures::executor::block_on),
            Plain,
        )
        .expect("valid configuration");
    let mut conn = raw(&server);
    assert_eq!(futures::executor::block_on(a.load_async(1)).unwrap(), 1000);
    // An async load's write-back happens after its value is returned (on a helper thread).
    assert!(eventually(|| a.stats().remote.writes >= 1));
    let writes = a.stats().remote.writes;
    del(&mut conn, ns, 1);
    version.store(1, Ordering::SeqCst);
    clock.advance(Duration::from_secs(2));
    let a2 = a.clone();
    let outer = a.get_with(10, || {
        a2.invalidate(&10); // supersedes this load of key 10
        assert_eq!(a2.get(&1), Some(1000), "stale, refresh ran inline");
        5
    });
    assert_eq!(outer, 5);
    assert_eq!(
        a.get(&1),
        Some(1001),
        "the refresh stored its value locally"
    );
    // (Written back on a helper thread, after the refresh's value is returned.)
    assert!(
        eventually(|| field(&mut conn, ns, 1, "d").is_some()),
        "the refresh of key 1 (not superseded) was not written back to Redis (remote {:?})",
        a.stats().remote
    );
    assert!(eventually(|| a.stats().remote.writes == writes + 1));
}

/// Nested sync loads: the outer load (key 1) is superseded by its own invalidation, then
/// loads key 2, which is not: key 2 is written back, key 1 is not.
#[test]
fn nested_sync_outer_superseded_inner_written_back() {
    let _w = watchdog(LIMIT, "nested sync outer superseded");
    let server = RedisServer::start();
    let ns = "s38rn1";
    let a = plain(&server, ns);
    let mut conn = raw(&server);
    let a2 = a.clone();
    let got = a.get_with(1, || {
        a2.invalidate(&1);
        a2.get_with(2, || 2000) + 1
    });
    assert_eq!(got, 2001);
    assert!(
        eventually(|| field(&mut conn, ns, 2, "d").is_some()),
        "key 2 written back"
    );
    assert_eq!(field(&mut conn, ns, 1, "d"), None, "key 1 not written back");
    assert!(
        eventually(|| a.stats().remote.writes == 1),
        "writes: {:?}",
        a.stats().remote
    );
}

/// Nested sync loads: the inner load (key 2) is superseded; the outer (key 1) is not.
#[test]
fn nested_sync_inner_superseded_outer_written_back() {
    let _w = watchdog(LIMIT, "nested sync inner superseded");
    let server = RedisServer::start();
    let ns = "s38rn2";
    let a = plain(&server, ns);
    let mut conn = raw(&server);
    let a2 = a.clone();
    let a3 = a.clone();
    let got = a.get_with(1, move || {
        a2.get_with(2, move || {
            a3.invalidate(&2);
            2000
        }) + 1
    });
    assert_eq!(got, 2001);
    assert!(
        eventually(|| field(&mut conn, ns, 1, "d").is_some()),
        "key 1 written back"
    );
    assert_eq!(field(&mut conn, ns, 2, "d"), None, "key 2 not written back");
    assert!(
        eventually(|| a.stats().remote.writes == 1),
        "writes: {:?}",
        a.stats().remote
    );
}

/// Nested across two tiered caches (async outer, sync inner).
#[test]
fn nested_async_outer_superseded_inner_of_another_cache_written_back() {
    let _w = watchdog(LIMIT, "nested async");
    let server = RedisServer::start();
    let a = plain(&server, "s38rna");
    let b = plain(&server, "s38rnb");
    let mut conn = raw(&server);
    let (a2, b2) = (a.clone(), b.clone());
    let a1 = a.clone();
    let got = big_stack(move || {
        futures::executor::block_on(a1.get_with_async(1, async move {
            a2.invalidate(&1);
            let inner = b2.get_with_async(2, async { 2000 }).await;
            inner + 1
        }))
    });
    assert_eq!(got, 2001);
    assert!(
        eventually(|| field(&mut conn, "s38rnb", 2, "d").is_some()),
        "b's key 2 written back"
    );
    assert_eq!(
        field(&mut conn, "s38rna", 1, "d"),
        None,
        "a's key 1 not written back"
    );
    assert!(eventually(|| (
        a.stats().remote.writes,
        b.stats().remote.writes
    ) == (0, 1)));
}

/// Async inner superseded, async outer not (same cache).
#[test]
fn nested_async_inner_superseded_outer_written_back() {
    let _w = watchdog(LIMIT, "nested async inner");
    let server = RedisServer::start();
    let ns = "s38rnc";
    let a = plain(&server, ns);
    let mut conn = raw(&server);
    let (a2, a3) = (a.clone(), a.clone());
    let a1 = a.clone();
    let got = big_stack(move || {
        futures::executor::block_on(a1.get_with_async(1, async move {
            let inner = a2
                .get_with_async(2, async move {
                    a3.invalidate(&2);
                    2000
                })
                .await;
            inner + 1
        }))
    });
    assert_eq!(got, 2001);
    assert!(
        eventually(|| field(&mut conn, ns, 1, "d").is_some()),
        "key 1 written back"
    );
    assert_eq!(field(&mut conn, ns, 2, "d"), None, "key 2 not written back");
    assert!(
        eventually(|| a.stats().remote.writes == 1),
        "writes: {:?}",
        a.stats().remote
    );
}

/// A loader that hands work to another thread which loads another key and invalidates the
/// loader's own key: the outer (superseded) is not written back, the other thread's load is.
#[test]
fn loader_spawning_work_on_another_thread() {
    let _w = watchdog(LIMIT, "loader spawns");
    let server = RedisServer::start();
    let ns = "s38rs";
    let a = plain(&server, ns);
    let mut conn = raw(&server);
    let a2 = a.clone();
    let got = a.get_with(1, move || {
        let a3 = a2.clone();
        let t = start(move || {
            a3.invalidate(&1);
            a3.get_with(2, || 2000)
        });
        t.wait(Duration::from_secs(30)).unwrap().unwrap() + 1
    });
    assert_eq!(got, 2001);
    assert!(
        eventually(|| field(&mut conn, ns, 2, "d").is_some()),
        "key 2 written back"
    );
    assert_eq!(field(&mut conn, ns, 1, "d"), None, "key 1 not written back");
    assert!(
        eventually(|| a.stats().remote.writes == 1),
        "writes: {:?}",
        a.stats().remote
    );
}

/// A plain load, not superseded, is still written back (sync and async).
#[test]
fn unsuperseded_loads_are_written_back() {
    let _w = watchdog(LIMIT, "not superseded");
    let server = RedisServer::start();
    let ns = "s38ru";
    let a = plain(&server, ns);
    let mut conn = raw(&server);
    assert_eq!(a.get_with(1, || 1000), 1000);
    assert_eq!(
        futures::executor::block_on(a.get_with_async(2, async { 2000 })),
        2000
    );
    assert_eq!(a.try_get_with(3, || Ok::<_, ()>(3000)), Ok(3000));
    assert_eq!(a.optionally_get_with(4, || Some(4000)), Some(4000));
    for k in 1..=4 {
        assert!(
            eventually(|| field(&mut conn, ns, k, "d").is_some()),
            "key {k} written back"
        );
    }
    assert!(
        eventually(|| a.stats().remote.writes == 4),
        "writes: {:?}",
        a.stats().remote
    );
    assert_eq!(a.stats().remote.writes_superseded, 0);
}

/// A computation (entry API) of another key inside a loader: its flight has ended by the
/// time the load finishes, and the load is written back.
#[test]
fn computation_inside_a_loader() {
    let _w = watchdog(LIMIT, "entry in loader");
    let server = RedisServer::start();
    let ns = "s38re";
    let a = plain(&server, ns);
    let mut conn = raw(&server);
    let a2 = a.clone();
    let got = a.get_with(1, move || {
        let _ = a2.local().entry(5).or_insert_with(|| 55);
        3
    });
    assert_eq!(got, 3);
    assert!(
        eventually(|| field(&mut conn, ns, 1, "d").is_some()),
        "key 1 written back"
    );
    assert!(
        eventually(|| a.stats().remote.writes == 1),
        "writes: {:?}",
        a.stats().remote
    );
    assert_eq!(a.get(&5), Some(55));
}
