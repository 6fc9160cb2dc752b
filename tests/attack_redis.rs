//! An outside sweep of the Redis second tier (feature `redis`), from the public API only:
//! write ordering across a fleet (several tiered caches on one `redis-server`), fleet-wide
//! single-flight (leases) under loader errors, panics and cancellation, faults (a server that
//! never answers, killed and restarted, garbage in Redis), namespaces, and user code that
//! panics (codec, key `Hash`). Each test has a watchdog; nothing sleeps to order threads.
//!
//! Tests named `s37_…` failed before stop 37's fix (expected vs what was observed then, and the
//! fix, in the comment above each). Tests named `bug_…` show a behaviour that contradicts the
//! docs (expected vs observed in the
//! comment above each).
#![cfg(feature = "redis")]

mod common;
use common::tier::{raw, vkey};
use herdcache_testkit::redis_server;

use common::{eventually, quiet_injected_panics, watchdog};
use herdcache::codec::{Codec, Plain};
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use redis_server::RedisServer;
use std::cell::RefCell;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
}

fn builder<K, V>() -> herdcache::CacheBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(600))
        .record_stats()
}

fn plain(t: RedisTier) -> TieredCache<u64, u64> {
    t.build(builder(), Plain).expect("valid configuration")
}

fn lkey(ns: &str, k: impl std::fmt::Display) -> String {
    format!("hc:{}:{ns}:l{{{k}}}", ns.len())
}

fn field(
    c: &mut redis::Connection,
    ns: &str,
    k: impl std::fmt::Display,
    f: &str,
) -> Option<String> {
    redis::cmd("HGET").arg(vkey(ns, k)).arg(f).query(c).unwrap()
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query(c).unwrap()
}

fn received<K, V>(c: &TieredCache<K, V>) -> u64
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    c.stats().remote.invalidations_received
}

fn subscribed<K, V>(cs: &[&TieredCache<K, V>])
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    assert!(
        eventually(|| cs.iter().all(|c| c.is_subscribed())),
        "subscribers never connected"
    );
}

/// A key whose `Hash` can be made to park the thread that hashes it (armed per thread): the
/// first hash on an armed thread reports on `reached` and waits for `go`. `TieredCache::insert`
/// encodes the key (no hash) and writes Redis before it inserts locally (the first hash), so
/// an armed insert parks between its Redis write and its local write.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HK(u64);

type Park = (mpsc::Sender<()>, mpsc::Receiver<()>);

thread_local! {
    static PARK: RefCell<Option<Park>> = const { RefCell::new(None) };
}

impl Hash for HK {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if let Some((reached, go)) = PARK.with(|p| p.borrow_mut().take()) {
            let _ = reached.send(());
            let _ = go.recv();
        }
        self.0.hash(state);
    }
}

/// Arms this thread's next `HK` hash: returns (reached, go).
fn arm() -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (reached_tx, reached_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    PARK.with(|p| *p.borrow_mut() = Some((reached_tx, go_rx)));
    (reached_rx, go_tx)
}

#[derive(Clone, Copy, Debug, Default)]
struct HKCodec;

impl Codec<HK> for HKCodec {
    fn encode(&self, k: &HK, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(k.0.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, b: &[u8]) -> Result<HK, BoxError> {
        Ok(HK(std::str::from_utf8(b)?.parse()?))
    }
}

fn hk_instance(t: RedisTier) -> TieredCache<HK, u64> {
    t.build_with(builder(), HKCodec, Plain)
        .expect("valid configuration")
}

/// Runs `insert(key, value)` on a new thread, parked after its Redis write and before its
/// local write. Returns the go sender and the join handle.
fn parked_insert(
    cache: &TieredCache<HK, u64>,
    key: u64,
    value: u64,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let c = cache.clone();
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let (reached, go) = arm();
        tx.send((reached, go)).unwrap();
        c.insert(HK(key), value);
    });
    let (reached, go) = rx.recv().unwrap();
    reached.recv().expect("the insert reached its local write");
    (go, h)
}

// ---------------------------------------------------------------------------------------------
// Write ordering across the fleet
// ---------------------------------------------------------------------------------------------

// Expected (module docs, "Writes are ordered": "an `insert` whose local copy lands after
// another instance announced a newer version drops it, so concurrent writers converge on
// Redis's value"): instance A inserts 1 while instance B runs `invalidate_all`, which lands in
// Redis after A's write (A's value is tombstoned, the epoch advances) and whose message reaches
// A before A's local write lands. A must drop its copy, as it does for B's `invalidate`.
// Failed before stop 37's fix: A kept serving 1 (until its local time to live, 600 s here) while
// Redis has a tombstone and B loads afresh: the `MSG_ALL` message does not record a newer version
// for the keys it covers (src/redis/subscriber.rs `apply`, `MSG_ALL => cache.invalidate_all()`; and
// `TieredCache::insert`'s `newer_announced` check in src/redis/mod.rs only looks at per-key
// versions announced by `MSG_KEY`).
// Fix: an instance counts the invalidate-alls it does or hears (before its local clear), and an
// insert that saw the count change since its Redis write drops its copy.
#[test]
fn s37_insert_whose_local_write_lands_after_another_instances_invalidate_all_keeps_stale_copy() {
    let _w = watchdog(LIMIT, "insert vs invalidate_all");
    let server = RedisServer::start();
    let a = hk_instance(tier(&server, "ia"));
    let b = hk_instance(tier(&server, "ia"));
    subscribed(&[&a, &b]);
    let (go, h) = parked_insert(&a, 7, 1);
    let before = received(&a);
    b.invalidate_all();
    assert!(
        eventually(|| received(&a) > before),
        "A never heard B's invalidate_all"
    );
    go.send(()).unwrap();
    h.join().unwrap();
    let mut c = raw(&server);
    assert_eq!(field(&mut c, "ia", 7, "d"), None, "Redis: tombstoned");
    assert_eq!(b.get_with(HK(7), || 99), 99, "B reloads");
    assert_eq!(
        a.get(&HK(7)),
        None,
        "A still serves the value invalidate_all removed from the fleet"
    );
}

// The same race with a per-key `invalidate` on B: handled (regression coverage for the case
// the docs describe).
#[test]
fn insert_whose_local_write_lands_after_another_instances_invalidate_drops_its_copy() {
    let _w = watchdog(LIMIT, "insert vs invalidate");
    let server = RedisServer::start();
    let a = hk_instance(tier(&server, "ib"));
    let b = hk_instance(tier(&server, "ib"));
    subscribed(&[&a, &b]);
    let (go, h) = parked_insert(&a, 7, 1);
    let before = received(&a);
    b.invalidate(&HK(7));
    assert!(eventually(|| received(&a) > before));
    go.send(()).unwrap();
    h.join().unwrap();
    assert_eq!(a.get(&HK(7)), None);
    assert_eq!(b.get_with(HK(7), || 99), 99);
}

// Expected ("concurrent writers converge on Redis's value"): two threads of one instance
// insert the same key; Redis ends with the second write (2), so the instance, like every
// other, must end with 2 (or nothing). Failed before stop 37's fix: the first insert's local write
// lands last and the instance serves 1 for its whole local time to live while Redis (and instance
// B) have 2. `TieredCache::insert` (src/redis/mod.rs) checks only versions *announced by others*
// (`newer_announced` reads the `seen` half of `Tier::versions`); its own newer write (`note_own`)
// is not compared.
// Fix: the insert's check compares the newest version known of the key, this instance's own
// writes included (`Tier::newer_known`). The test first asserted `Some(2)` for A, against its own
// expectation ("2 (or nothing)"): the older copy, landing last, drops itself, and A reads 2 back.
#[test]
fn s37_two_inserts_on_one_instance_leave_the_older_value_locally_and_the_newer_in_redis() {
    let _w = watchdog(LIMIT, "insert vs insert, one instance");
    let server = RedisServer::start();
    let a = hk_instance(tier(&server, "ic"));
    let b = hk_instance(tier(&server, "ic"));
    subscribed(&[&a, &b]);
    let (go, h) = parked_insert(&a, 7, 1);
    a.insert(HK(7), 2);
    go.send(()).unwrap();
    h.join().unwrap();
    let mut c = raw(&server);
    assert_eq!(field(&mut c, "ic", 7, "d").as_deref(), Some("2"));
    assert!(eventually(|| b.get(&HK(7)).is_none()));
    assert_eq!(b.get_with(HK(7), || 99), 2, "the fleet has 2");
    // "2 (or nothing)": the older insert's copy, landing last, drops itself (the local tier
    // has no per-key versions to refuse it); A then reads 2 from Redis.
    assert_ne!(a.get(&HK(7)), Some(1), "instance A diverged from the fleet");
    assert_eq!(
        a.get_with(HK(7), || 99),
        2,
        "A reads the fleet's value back"
    );
}

// Expected: as above, with `invalidate` as the second writer on the same instance: after it
// returned, Redis has a tombstone and the instance must not serve the superseded insert's
// value. Failed before stop 37's fix: it served 1 (same cause: `newer_announced` ignores the
// instance's own newer version).
// Fix: as above (the invalidation's own tombstone version counts).
#[test]
fn s37_insert_and_invalidate_on_one_instance_leave_a_value_the_fleet_invalidated() {
    let _w = watchdog(LIMIT, "insert vs invalidate, one instance");
    let server = RedisServer::start();
    let a = hk_instance(tier(&server, "id"));
    let b = hk_instance(tier(&server, "id"));
    subscribed(&[&a, &b]);
    let (go, h) = parked_insert(&a, 7, 1);
    a.invalidate(&HK(7));
    go.send(()).unwrap();
    h.join().unwrap();
    let mut c = raw(&server);
    assert_eq!(field(&mut c, "id", 7, "d"), None);
    assert_eq!(b.get_with(HK(7), || 99), 99);
    assert_eq!(
        a.get(&HK(7)),
        None,
        "instance A serves an invalidated value"
    );
}

// Expected: as above with `invalidate_all` on the same instance. Failed before stop 37's fix: the
// value stayed.
// Fix: the instance's own `invalidate_all` counts as an invalidate-all done (see the first test of
// this section).
#[test]
fn s37_insert_and_invalidate_all_on_one_instance_leave_a_value_the_fleet_invalidated() {
    let _w = watchdog(LIMIT, "insert vs invalidate_all, one instance");
    let server = RedisServer::start();
    let a = hk_instance(tier(&server, "ie"));
    let (go, h) = parked_insert(&a, 7, 1);
    a.invalidate_all();
    go.send(()).unwrap();
    h.join().unwrap();
    let mut c = raw(&server);
    assert_eq!(field(&mut c, "ie", 7, "d"), None);
    assert_eq!(
        a.get(&HK(7)),
        None,
        "instance A serves an invalidated value"
    );
}

// ---------------------------------------------------------------------------------------------
// Fleet-wide single-flight (leases)
// ---------------------------------------------------------------------------------------------

fn leased(server: &RedisServer, ns: &str, ttl: Duration, wait: Duration) -> RedisTier {
    tier(server, ns).lease(ttl, wait)
}

fn lease_waits<K, V>(c: &TieredCache<K, V>) -> u64
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    c.stats().remote.lease_waits
}

/// A value codec (decimal `u64`) that panics when encoding `PANIC_VALUE` and when decoding
/// the bytes `"panic"`.
#[derive(Clone, Copy, Debug, Default)]
struct Touchy;

const PANIC_VALUE: u64 = 666;

impl Codec<u64> for Touchy {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        assert!(*v != PANIC_VALUE, "injected: encode panics");
        out.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        assert!(b != b"panic", "injected: decode panics");
        Ok(std::str::from_utf8(b)?.parse()?)
    }
}

fn touchy(t: RedisTier) -> TieredCache<u64, u64> {
    t.build_with(builder(), Plain, Touchy)
        .expect("valid configuration")
}

/// Starts `get_with(key)` on `b` on a new thread, its init returning `value`; waits until it
/// waits on another instance's lease.
fn waiting_get(b: &TieredCache<u64, u64>, key: u64, value: u64) -> common::Started<(u64, Instant)> {
    let before = lease_waits(b);
    let bc = b.clone();
    let started = common::start(move || (bc.get_with(key, || value), Instant::now()));
    assert!(
        eventually(|| lease_waits(b) > before),
        "B never waited on the lease"
    );
    started
}

/// Runs `get_with`-like `call` on `a` on a new thread with a loader that blocks until the
/// returned sender is used (or dropped); returns once A holds the lease.
fn holding<T: Send + 'static>(
    server: &RedisServer,
    ns: &str,
    key: u64,
    call: impl FnOnce(mpsc::Receiver<()>) -> T + Send + 'static,
) -> (mpsc::Sender<()>, common::Started<T>) {
    let (tx, rx) = mpsc::channel();
    let started = common::start(move || call(rx));
    let mut c = raw(server);
    assert!(
        eventually(|| exists(&mut c, &lkey(ns, key))),
        "A never took the lease"
    );
    (tx, started)
}

// Expected (module docs: "a holder whose loader fails releases it at once, and a waiter takes
// over"; the lease is the holder's to give back on every exit): when the value codec panics
// while the holder writes its loaded value back, the lease is released (the `Finish` guard
// exists for exactly this: "a panicking loader gives the lease back at once").
// Failed before stop 37's fix: the lease stayed in Redis until its ttl (60 s here): `Tier::fetch`
// took `pending` out of its `Finish` guard before calling `write_back`, and `write_back` encodes
// (user code) before it releases (src/redis/tier.rs `fetch` / `write_back`). Every other instance
// then waits its full lease wait on each miss of the key.
// Fix: the lease is owned by a guard (`Held`, in `Pending`) that releases it when dropped, until
// the write-back script is sent; the codec runs while it owns it.
#[test]
fn s37_a_value_codec_panic_in_the_write_back_leaks_the_lease() {
    let _w = watchdog(LIMIT, "encode panic leaks lease");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "lp";
    let a = touchy(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.get_with(1, || PANIC_VALUE)
    }));
    assert!(r.is_err(), "the codec's panic reaches the caller");
    let mut c = raw(&server);
    assert!(
        !exists(&mut c, &lkey(ns, 1)),
        "the lease outlives its holder's call (held until its ttl)"
    );
}

// The async twin: the write-back runs on a helper thread, whose panic is swallowed; expected
// the lease released; failed before stop 37's fix: leaked until its ttl (same cause).
// Fix: as above (the helper thread's unwinding drops the guard).
#[test]
fn s37_a_value_codec_panic_in_an_async_write_back_leaks_the_lease() {
    let _w = watchdog(LIMIT, "async encode panic leaks lease");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "lpa";
    let a = touchy(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let v = futures::executor::block_on(a.get_with_async(1, async { PANIC_VALUE }));
    assert_eq!(v, PANIC_VALUE);
    let mut c = raw(&server);
    // The write-back runs after the value is returned: give it time to finish.
    let released = eventually(|| !exists(&mut c, &lkey(ns, 1)));
    assert!(
        released,
        "the lease outlives its holder's call (held until its ttl)"
    );
}

// Loader outcomes that are not a value give the lease back at once: a waiter on another
// instance takes over well before its (60 s) lease wait ends.
fn lease_given_back_after(ns: &str, outcome: fn(&TieredCache<u64, u64>, mpsc::Receiver<()>)) {
    let _w = watchdog(LIMIT, "lease given back");
    quiet_injected_panics();
    let server = RedisServer::start();
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| outcome(&ac, rx));
    let waiter = waiting_get(&b, 1, 20);
    let released_at = Instant::now();
    go.send(()).unwrap();
    let _ = held.wait(LIMIT).expect("A's call returned");
    let (v, done) = waiter
        .wait(Duration::from_secs(20))
        .expect("B took over")
        .expect("B did not panic");
    assert_eq!(v, 20);
    assert!(
        done - released_at < Duration::from_secs(10),
        "B waited {:?}",
        done - released_at
    );
    let mut c = raw(&server);
    assert_eq!(field(&mut c, ns, 1, "d").as_deref(), Some("20"));
    assert!(!exists(&mut c, &lkey(ns, 1)));
}

#[test]
fn optionally_get_with_none_gives_the_lease_back() {
    lease_given_back_after("lo", |a, rx| {
        assert_eq!(
            a.optionally_get_with(1, || {
                let _ = rx.recv();
                None
            }),
            None
        );
    });
}

#[test]
fn try_get_with_error_gives_the_lease_back() {
    lease_given_back_after("le", |a, rx| {
        assert!(a
            .try_get_with(1, || {
                let _ = rx.recv();
                Err::<u64, _>("backend down")
            })
            .is_err());
    });
}

#[test]
fn a_panicking_loader_gives_the_lease_back() {
    lease_given_back_after("lx", |a, rx| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.get_with(1, || {
                let _ = rx.recv();
                panic!("injected: loader panics")
            })
        }));
        assert!(r.is_err());
    });
}

#[test]
fn an_async_loader_error_gives_the_lease_back() {
    lease_given_back_after("lae", |a, rx| {
        let r = futures::executor::block_on(a.try_get_with_async(1, async move {
            let _ = rx.recv();
            Err::<u64, _>("backend down")
        }));
        assert!(r.is_err());
    });
}

#[test]
fn an_async_optionally_none_gives_the_lease_back() {
    lease_given_back_after("lan", |a, rx| {
        let r = futures::executor::block_on(a.optionally_get_with_async(1, async move {
            let _ = rx.recv();
            None
        }));
        assert!(r.is_none());
    });
}

#[test]
fn an_async_panicking_loader_gives_the_lease_back() {
    lease_given_back_after("lap", |a, rx| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(a.get_with_async(1, async move {
                let _ = rx.recv();
                panic!("injected: async loader panics")
            }))
        }));
        assert!(r.is_err());
    });
}

/// A future that is pending until `rx` gets a message (polled again by a thread that waits
/// for it), then yields `v`.
struct Gated {
    rx: Option<mpsc::Receiver<()>>,
    v: u64,
    polled: Option<mpsc::Sender<()>>,
}

impl Future for Gated {
    type Output = u64;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<u64> {
        if let Some(p) = self.polled.take() {
            let _ = p.send(());
        }
        let Some(rx) = self.rx.take() else {
            return std::task::Poll::Ready(self.v);
        };
        let waker = cx.waker().clone();
        std::thread::spawn(move || {
            let _ = rx.recv();
            waker.wake();
        });
        std::task::Poll::Pending
    }
}

// Cancellation: an async caller holding the lease is dropped mid-load: the lease is given back
// and a waiter on another instance takes over.
#[test]
fn an_async_holder_dropped_mid_load_gives_the_lease_back() {
    let _w = watchdog(LIMIT, "async cancel");
    let server = RedisServer::start();
    let ns = "lc";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let (_gate, gate_rx) = mpsc::channel();
    let (polled_tx, polled_rx) = mpsc::channel();
    let mut fut = Box::pin(a.get_with_async(
        1,
        Gated {
            rx: Some(gate_rx),
            v: 10,
            polled: Some(polled_tx),
        },
    ));
    // Poll until the load itself is polled (the lease is then held).
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        if polled_rx.try_recv().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut c = raw(&server);
    assert!(exists(&mut c, &lkey(ns, 1)), "A holds the lease");
    let waiter = waiting_get(&b, 1, 20);
    let t0 = Instant::now();
    drop(fut);
    let (v, done) = waiter
        .wait(Duration::from_secs(20))
        .expect("B took over")
        .unwrap();
    assert_eq!(v, 20);
    assert!(done - t0 < Duration::from_secs(10));
    // A's next call finds B's value.
    assert_eq!(a.get_with(1, || 30), 20);
}

// N instances, several threads each, miss one key together: the loader runs once for the
// fleet (the documented promise of leases), and every caller gets its value.
#[test]
fn a_fleet_of_four_instances_loads_a_key_once() {
    let _w = watchdog(LIMIT, "fleet single flight");
    let server = RedisServer::start();
    let ns = "sf";
    let loads = Arc::new(AtomicUsize::new(0));
    let caches: Vec<_> = (0..4)
        .map(|_| {
            plain(leased(
                &server,
                ns,
                Duration::from_secs(60),
                Duration::from_secs(60),
            ))
        })
        .collect();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
    let start = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let c = caches[i % 4].clone();
            let (loads, go_rx, start) =
                (Arc::clone(&loads), Arc::clone(&go_rx), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                c.get_with(5, || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    let _ = go_rx.lock().unwrap().recv();
                    55
                })
            })
        })
        .collect();
    // Let the load finish once each other instance waits on the lease.
    assert!(eventually(|| loads.load(Ordering::SeqCst) == 1));
    let holder_waits: Vec<u64> = caches.iter().map(lease_waits).collect();
    assert!(
        eventually(|| caches.iter().filter(|c| lease_waits(c) > 0).count() == 3),
        "three instances wait: {holder_waits:?}"
    );
    go_tx.send(()).unwrap();
    for h in handles {
        assert_eq!(h.join().unwrap(), 55);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let sum = |f: fn(&herdcache::RemoteStats) -> u64| -> u64 {
        caches.iter().map(|c| f(&c.stats().remote)).sum()
    };
    assert_eq!(sum(|r| r.leases_acquired), 1);
    assert_eq!(
        sum(|r| r.misses),
        4,
        "each instance's leader read Redis once and missed"
    );
    assert_eq!(sum(|r| r.lease_waits), 3);
    assert_eq!(sum(|r| r.lease_wait_hits), 3);
    assert_eq!(sum(|r| r.lease_fallbacks), 0);
    assert_eq!(sum(|r| r.writes), 1);
    assert_eq!(sum(|r| r.writes_superseded), 0);
    for c in &caches {
        assert_eq!(c.get(&5), Some(55));
    }
}

// A holder that hangs past its lease's time to live: a waiter takes over after the lease
// expires and its value wins; the hung holder's late write-back does not overwrite it.
#[test]
fn a_hung_holder_loses_its_expired_lease_and_its_late_value_is_not_written() {
    let _w = watchdog(LIMIT, "hung holder");
    let server = RedisServer::start();
    let ns = "lh";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_millis(300),
        Duration::from_secs(20),
    ));
    let b = plain(leased(
        &server,
        ns,
        Duration::from_millis(300),
        Duration::from_secs(20),
    ));
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| {
        ac.get_with(1, || {
            let _ = rx.recv();
            10
        })
    });
    let (v, _) = waiting_get(&b, 1, 20)
        .wait(Duration::from_secs(20))
        .expect("B took over after the lease expired")
        .unwrap();
    assert_eq!(v, 20);
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 10);
    let mut c = raw(&server);
    assert_eq!(field(&mut c, ns, 1, "d").as_deref(), Some("20"));
    assert!(a.stats().remote.writes_superseded >= 1);
}

// An invalidation on a third instance while the holder loads revokes its lease: its value
// (read before the invalidation) is neither written to Redis nor kept locally, and the
// waiter loads afresh.
#[test]
fn an_invalidation_revokes_the_lease_and_the_holders_value_is_dropped_everywhere() {
    let _w = watchdog(LIMIT, "revoked lease");
    let server = RedisServer::start();
    let ns = "lr";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(20),
    ));
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(20),
    ));
    let c3 = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(20),
    ));
    subscribed(&[&a, &b, &c3]);
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| {
        ac.get_with(1, || {
            let _ = rx.recv();
            10
        })
    });
    let waiter = waiting_get(&b, 1, 20);
    let before = received(&a);
    c3.invalidate(&1);
    assert!(eventually(|| received(&a) > before));
    let (v, _) = waiter
        .wait(Duration::from_secs(20))
        .expect("B loaded")
        .unwrap();
    assert_eq!(v, 20);
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 10);
    let mut c = raw(&server);
    // B's load began before the invalidation reached B: superseded too, so not written
    // back either (documented: conservative), and nobody wrote A's value.
    assert_ne!(field(&mut c, ns, 1, "d").as_deref(), Some("10"));
    assert_eq!(a.get(&1), None, "A's superseded load is not stored");
    assert_ne!(a.get_with(1, || 30), 10);
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// A loopback port that accepts connections and never answers (a hung server): the sockets
/// are kept open by a detached thread.
fn black_hole() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
    });
    port
}

/// A key codec (decimal `u64`) that raises a flag when dropped (with the tier that owns it).
#[derive(Clone)]
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Codec<u64> for DropFlag {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Plain.encode(v, out)
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        Plain.decode(b)
    }
}

/// Runs `f` and asserts it took less than `max`.
fn bounded<T>(max: Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let v = f();
    assert!(t0.elapsed() < max, "{what} took {:?}", t0.elapsed());
    v
}

#[test]
fn every_verb_is_bounded_against_a_server_that_never_answers_and_the_tier_goes_away_on_drop() {
    let _w = watchdog(LIMIT, "black hole");
    let port = black_hole();
    let drops = Arc::new(AtomicUsize::new(0));
    let flag = DropFlag(Arc::clone(&drops));
    let cache: TieredCache<u64, u64> = RedisTier::new(format!("redis://127.0.0.1:{port}/"))
        .namespace("bh")
        .timeouts(Duration::from_millis(100), Duration::from_millis(50))
        .lease(Duration::from_secs(60), Duration::from_secs(60))
        .breaker(3, Duration::from_millis(200))
        .build_with(builder(), flag, Plain)
        .unwrap();
    let max = Duration::from_secs(3);
    for round in 0..3u64 {
        let k = round * 10;
        bounded(max, "insert", || cache.insert(k, 1));
        assert_eq!(cache.get(&k), Some(1));
        bounded(max, "invalidate", || cache.invalidate(&k));
        assert_eq!(cache.get(&k), None);
        assert_eq!(bounded(max, "get_with", || cache.get_with(k + 1, || 2)), 2);
        assert_eq!(
            bounded(max, "try_get_with", || cache.try_get_with(k + 2, || Ok::<
                _,
                (),
            >(
                3
            ))),
            Ok(3)
        );
        assert_eq!(
            bounded(max, "optionally_get_with", || cache
                .optionally_get_with(k + 3, || None)),
            None
        );
        assert_eq!(bounded(max, "remove", || cache.remove(&(k + 1))), Some(2));
        bounded(max, "invalidate_all", || cache.invalidate_all());
        assert_eq!(cache.entry_count(), 0);
        let v = bounded(max, "get_with_async", || {
            futures::executor::block_on(cache.get_with_async(k + 4, async { 5 }))
        });
        assert_eq!(v, 5);
        std::thread::sleep(Duration::from_millis(250)); // let the breaker probe again
    }
    assert!(!cache.is_subscribed());
    assert!(cache.stats().remote.timeouts > 0);
    assert!(cache.stats().remote.breaker_opened > 0);
    drop(cache);
    assert!(
        eventually(|| drops.load(Ordering::SeqCst) >= 1),
        "the tier (its subscriber thread) outlived the cache"
    );
}

#[test]
fn redis_killed_mid_load_and_restarted() {
    let _w = watchdog(LIMIT, "killed mid-load");
    let mut server = RedisServer::start();
    let ns = "km";
    let mk = |s: &RedisServer| {
        plain(
            leased(s, ns, Duration::from_secs(60), Duration::from_secs(60))
                .timeouts(Duration::from_millis(100), Duration::from_millis(100))
                .breaker(3, Duration::from_millis(100)),
        )
    };
    let a = mk(&server);
    let b = mk(&server);
    subscribed(&[&a, &b]);
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| {
        ac.get_with(1, || {
            let _ = rx.recv();
            10
        })
    });
    server.stop();
    go.send(()).unwrap();
    let v = held.wait(Duration::from_secs(5)).expect("bounded").unwrap();
    assert_eq!(v, 10);
    assert_eq!(a.get(&1), Some(10));
    server.restart();
    let mut probe = 100;
    assert!(
        eventually(|| {
            probe += 1;
            let _ = b.get_with(probe, || 0); // probes the breaker
            a.is_subscribed() && b.is_subscribed() && !b.is_breaker_open()
        }),
        "the fleet never came back"
    );
    let before = received(&a);
    b.insert(1, 20);
    assert!(eventually(|| received(&a) > before));
    assert_eq!(a.get(&1), None);
    assert_eq!(a.get_with(1, || 30), 20);
}

fn reconnect_case(clear: bool) -> Option<u64> {
    let mut server = RedisServer::start();
    let a = plain(tier(&server, "cr").clear_on_reconnect(clear));
    subscribed(&[&a]);
    assert_eq!(a.get_with(1, || 10), 10);
    let connects = a.stats().remote.subscriber_connects;
    server.restart();
    assert!(eventually(|| a.stats().remote.subscriber_connects
        > connects
        && a.is_subscribed()));
    a.get(&1)
}

#[test]
fn clear_on_reconnect_clears_the_local_tier_after_a_restart_and_only_then() {
    let _w = watchdog(LIMIT, "clear_on_reconnect");
    assert_eq!(reconnect_case(true), None);
    assert_eq!(reconnect_case(false), Some(10));
}

#[test]
fn the_breaker_opens_while_redis_is_down_and_closes_after_it_returns() {
    let _w = watchdog(LIMIT, "breaker");
    let mut server = RedisServer::start();
    let a = plain(
        tier(&server, "br")
            .timeouts(Duration::from_millis(100), Duration::from_millis(100))
            .breaker(2, Duration::from_millis(100)),
    );
    assert_eq!(a.get_with(1, || 1), 1);
    server.stop();
    for k in 10..20 {
        assert_eq!(a.get_with(k, || k), k);
    }
    assert!(a.is_breaker_open());
    let skipped = a.stats().remote.skipped;
    assert!(skipped > 0);
    server.restart();
    let mut probe = 100;
    assert!(eventually(|| {
        probe += 1; // a fresh key: a local hit would not touch Redis
        let _ = a.get_with(probe, || 0);
        !a.is_breaker_open()
    }));
    a.insert(2, 22);
    let b = plain(tier(&server, "br"));
    assert_eq!(b.get_with(2, || 0), 22, "writes reach Redis again");
}

#[test]
fn garbage_in_redis_is_a_miss_and_the_write_back_repairs_it() {
    let _w = watchdog(LIMIT, "garbage");
    let server = RedisServer::start();
    let ns = "gb";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let mut c = raw(&server);
    // A value that does not decode, in a hash.
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("d")
        .arg("not a number")
        .arg("v")
        .arg("5")
        .query::<()>(&mut c)
        .unwrap();
    // A string where a hash should be.
    redis::cmd("SET")
        .arg(vkey(ns, 2))
        .arg("\u{0}\u{ff}junk")
        .query::<()>(&mut c)
        .unwrap();
    // A value field with a non-number version and epoch.
    redis::cmd("HSET")
        .arg(vkey(ns, 3))
        .arg("d")
        .arg("33")
        .arg("v")
        .arg("x")
        .arg("e")
        .arg("-1")
        .query::<()>(&mut c)
        .unwrap();
    // A lease key of another type, without expiry.
    redis::cmd("HSET")
        .arg(lkey(ns, 4))
        .arg("x")
        .arg("y")
        .query::<()>(&mut c)
        .unwrap();
    assert_eq!(a.get_with(1, || 11), 11);
    assert_eq!(a.get_with(2, || 22), 22);
    let v3 = a.get_with(3, || 3);
    assert!(v3 == 33 || v3 == 3);
    assert_eq!(field(&mut c, ns, 1, "d").as_deref(), Some("11"));
    assert_eq!(field(&mut c, ns, 2, "d").as_deref(), Some("22"));
    assert!(!a.is_breaker_open());
    assert!(a.stats().remote.errors >= 1);
    // The stray lease is waited on (bounded by the lease wait), never forever: use a short
    // wait for this key.
    let short = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_millis(200),
    ));
    assert_eq!(
        bounded(Duration::from_secs(5), "stray lease", || short
            .get_with(4, || 44)),
        44
    );
    // An invalidation repairs the stray lease key (revokes it).
    short.invalidate(&4);
    assert!(!exists(&mut c, &lkey(ns, 4)));
}

#[test]
fn a_decode_panic_never_hangs_nor_leaks_a_lease() {
    let _w = watchdog(LIMIT, "decode panic");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "dp";
    let a = touchy(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let mut c = raw(&server);
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("d")
        .arg("panic")
        .query::<()>(&mut c)
        .unwrap();
    let sync = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.get_with(1, || 10)));
    // The async path runs the decode on a helper thread and loads locally.
    let v = futures::executor::block_on(a.get_with_async(2, async { 20 }));
    assert_eq!(v, 20);
    redis::cmd("HSET")
        .arg(vkey(ns, 3))
        .arg("d")
        .arg("panic")
        .query::<()>(&mut c)
        .unwrap();
    let v = futures::executor::block_on(a.get_with_async(3, async { 30 }));
    assert_eq!(v, 30);
    assert!(!exists(&mut c, &lkey(ns, 1)));
    assert!(eventually(|| !exists(&mut c, &lkey(ns, 3))));
    // Whatever the sync call did, the key works afterwards.
    let _ = sync;
    assert!(!a.is_breaker_open());
}

#[test]
fn an_oversized_insert_tombstones_and_an_oversized_load_gives_the_lease_back() {
    let _w = watchdog(LIMIT, "oversized");
    let server = RedisServer::start();
    let ns = "ov";
    let mk = || {
        plain(
            leased(
                &server,
                ns,
                Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .max_value_size(4),
        )
    };
    let (a, b) = (mk(), mk());
    subscribed(&[&a, &b]);
    a.insert(1, 7);
    assert_eq!(b.get_with(1, || 0), 7);
    let before = received(&b);
    a.insert(1, 123_456);
    assert!(eventually(|| received(&b) > before));
    assert_eq!(a.get(&1), Some(123_456));
    assert_eq!(b.get_with(1, || 8), 8, "B never reads the older 7 back");
    assert!(!b.is_breaker_open());
    // A lease holder whose value is too large gives the lease back.
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 2, move |rx| {
        ac.get_with(2, || {
            let _ = rx.recv();
            999_999
        })
    });
    let waiter = waiting_get(&b, 2, 5);
    let t0 = Instant::now();
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 999_999);
    let (v, done) = waiter.wait(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(v, 5);
    assert!(done - t0 < Duration::from_secs(10));
    assert!(a.stats().remote.oversized >= 2);
}

#[test]
fn namespaces_are_isolated_even_with_glob_characters() {
    let _w = watchdog(LIMIT, "namespaces");
    let server = RedisServer::start();
    let star = plain(tier(&server, "a*"));
    let ab = plain(tier(&server, "ab"));
    let av = plain(tier(&server, "a:v"));
    let a = plain(tier(&server, "a"));
    let empty = plain(tier(&server, ""));
    subscribed(&[&star, &ab, &av, &a, &empty]);
    for (i, c) in [&star, &ab, &av, &a, &empty].iter().enumerate() {
        c.insert(1, i as u64);
    }
    star.invalidate_all();
    a.invalidate_all();
    empty.invalidate(&1);
    let mut conn = raw(&server);
    assert_eq!(field(&mut conn, "ab", 1, "d").as_deref(), Some("1"));
    assert_eq!(field(&mut conn, "a:v", 1, "d").as_deref(), Some("2"));
    assert_eq!(field(&mut conn, "a*", 1, "d"), None);
    assert_eq!(field(&mut conn, "a", 1, "d"), None);
    // Local copies of the other namespaces were not dropped by those messages.
    assert_eq!(ab.get(&1), Some(1));
    assert_eq!(av.get(&1), Some(2));
    assert_eq!(ab.stats().remote.invalidations_received, 0);
    assert_eq!(av.stats().remote.invalidations_received, 0);
}

#[test]
fn an_async_waiter_dropped_during_a_lease_wait_leaves_nothing_behind() {
    let _w = watchdog(LIMIT, "async waiter dropped");
    let server = RedisServer::start();
    let ns = "aw";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| {
        ac.get_with(1, || {
            let _ = rx.recv();
            10
        })
    });
    // B's async waiter: poll until it waits on the lease, then drop it.
    let mut fut = Box::pin(b.get_with_async(1, async { 20 }));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let t0 = Instant::now();
    while lease_waits(&b) == 0 {
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(fut);
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 10);
    let v = bounded(Duration::from_secs(5), "async after cancel", || {
        futures::executor::block_on(b.get_with_async(1, async { 30 }))
    });
    assert_eq!(v, 10);
}

// ---------------------------------------------------------------------------------------------
// clear_on_reconnect and the subscriber's first connection
// ---------------------------------------------------------------------------------------------

/// A loopback proxy to `target` that holds back every client chunk containing `needle` until
/// the gate opens (reporting on `held` when it first holds one); everything else is forwarded.
fn gating_proxy(target: u16, needle: &'static [u8]) -> (u16, mpsc::Receiver<()>, mpsc::Sender<()>) {
    gating_proxy_in(target, needle, false)
}

/// As [`gating_proxy`], on the server's chunks (`replies`) or the client's.
fn gating_proxy_in(
    target: u16,
    needle: &'static [u8],
    replies: bool,
) -> (u16, mpsc::Receiver<()>, mpsc::Sender<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (open_tx, open_rx) = mpsc::channel::<()>();
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    {
        let gate = Arc::clone(&gate);
        std::thread::spawn(move || {
            let _ = open_rx.recv();
            *gate.0.lock().unwrap() = true;
            gate.1.notify_all();
        });
    }
    let held_tx = Arc::new(Mutex::new(held_tx));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let pairs = [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    !replies,
                ),
                (server, client, replies),
            ];
            for (mut from, mut to, gated) in pairs {
                let (gate, held_tx) = (Arc::clone(&gate), Arc::clone(&held_tx));
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if gated && buf[..n].windows(needle.len()).any(|w| w == needle) {
                            let mut open = gate.0.lock().unwrap();
                            if !*open {
                                let _ = held_tx.lock().unwrap().send(());
                            }
                            while !*open {
                                open = gate.1.wait(open).unwrap();
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (port, held_rx, open_tx)
}

// Expected (module docs: "an instance whose subscriber was disconnected when a message was
// sent keeps serving its local copy until that copy expires … `clear_on_reconnect` bounds this
// by the disconnection instead"; the subscriber itself treats a *failed* first attempt as
// "the cache may have served and loaded meanwhile"): with `clear_on_reconnect(true)`, a value
// the instance loaded before its subscriber first subscribed, and that another instance
// replaced meanwhile (its message lost), is dropped when the subscriber connects.
// Failed before stop 37's fix: a *slow* first connection (here the subscriber's handshake held back
// by a proxy, well within its 10 s connect timeout) is not treated as a possible miss: the instance
// serves the replaced value for its whole local time to live (600 s). Cause:
// src/redis/subscriber.rs `run` starts with `may_have_missed = false`, and sets it only after a
// failed attempt or an earlier connection.
// Fix: with `clear_on_reconnect`, the first subscription clears the local tier too.
#[test]
fn s37_clear_on_reconnect_misses_invalidations_sent_before_the_first_subscription() {
    let _w = watchdog(LIMIT, "first subscription");
    let server = RedisServer::start();
    let (port, held, open) = gating_proxy(server.port, b"SETINFO");
    let b = plain(tier(&server, "fs"));
    b.insert(1, 10);
    let a = plain(
        RedisTier::new(format!("redis://127.0.0.1:{port}/"))
            .namespace("fs")
            .timeouts(Duration::from_secs(10), Duration::from_millis(500))
            .clear_on_reconnect(true),
    );
    held.recv().expect("A's subscriber is connecting");
    assert!(!a.is_subscribed());
    assert_eq!(a.get_with(1, || 0), 10, "A reads the fleet's value");
    b.insert(1, 20); // announced while A is not subscribed: lost for A
    open.send(()).unwrap();
    subscribed(&[&a]);
    assert_eq!(b.get(&1), Some(20));
    assert_eq!(a.get(&1), None, "A serves the replaced value 10");
}

// Expected (module docs: "an `insert` whose local copy lands after another instance announced
// a newer version drops it"): as in
// `insert_whose_local_write_lands_after_another_instances_invalidate_drops_its_copy`, but other
// keys' messages (4,200 invalidations of other keys from B) arrive between B's announcement
// and A's local write. A must still drop its copy of key 7.
// Failed before stop 37's fix: A kept its older value 1 while Redis and B have 2: the per-key
// versions an instance remembers are forgotten wholesale when 4,096 keys are tracked
// (src/redis/tier.rs `VERSIONS_KEPT`, `announced`/`note_own` clear the map), so `newer_announced`
// no longer knows of B's newer write. (A fix that keeps the bound: count the clears, and treat a
// clear between the Redis write and the local check as "newer announced".)
// Fix: when full, the older half (by version) is forgotten and the newest version forgotten kept
// as a floor: a write at or below it counts as possibly superseded.
#[test]
fn s37_an_insert_forgets_a_newer_announced_version_after_4096_other_keys() {
    let _w = watchdog(LIMIT, "versions forgotten");
    let server = RedisServer::start();
    let a = hk_instance(tier(&server, "vk"));
    let b = hk_instance(tier(&server, "vk"));
    subscribed(&[&a, &b]);
    let (go, h) = parked_insert(&a, 7, 1);
    let before = received(&a);
    b.insert(HK(7), 2);
    for k in 10_000..14_200 {
        b.invalidate(&HK(k));
    }
    assert!(
        eventually(|| received(&a) > before + 4_200),
        "A heard B's messages"
    );
    go.send(()).unwrap();
    h.join().unwrap();
    let mut c = raw(&server);
    assert_eq!(field(&mut c, "vk", 7, "d").as_deref(), Some("2"));
    assert_eq!(b.get_with(HK(7), || 0), 2);
    assert_ne!(a.get(&HK(7)), Some(1), "A kept the older value 1");
}

// An insert on a third instance while B waits on A's lease: B gets the inserted value, A's
// load (read before the insert) is neither written back nor kept, and nobody reads it later.
#[test]
fn an_insert_during_a_lease_wait_wins_over_the_holders_load() {
    let _w = watchdog(LIMIT, "insert during lease wait");
    let server = RedisServer::start();
    let ns = "iw";
    let mk = || {
        plain(leased(
            &server,
            ns,
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
    };
    let (a, b, c3) = (mk(), mk(), mk());
    subscribed(&[&a, &b, &c3]);
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| {
        ac.get_with(1, || {
            let _ = rx.recv();
            10
        })
    });
    let waiter = waiting_get(&b, 1, 20);
    let before = received(&a);
    c3.insert(1, 50);
    let (v, _) = waiter.wait(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(v, 50);
    assert!(eventually(|| received(&a) > before));
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 10);
    let mut c = raw(&server);
    assert_eq!(field(&mut c, ns, 1, "d").as_deref(), Some("50"));
    assert_eq!(a.get(&1), None);
    assert_eq!(a.get_with(1, || 0), 50);
    assert!(
        !exists(&mut c, &lkey(ns, 1)),
        "A's lease was revoked, not left behind"
    );
}

// Many async callers on one thread wait on leases another (dead) instance holds: none holds a
// thread, all get the value once it appears, none hangs.
#[test]
fn three_hundred_async_lease_waiters_on_one_thread() {
    let _w = watchdog(LIMIT, "async waiters");
    let server = RedisServer::start();
    let ns = "aw3";
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let mut c = raw(&server);
    const N: u64 = 300;
    for k in 0..N {
        redis::cmd("SET")
            .arg(lkey(ns, k))
            .arg("dead")
            .arg("PX")
            .arg(60_000)
            .query::<()>(&mut c)
            .unwrap();
    }
    let mut pool = futures::executor::LocalPool::new();
    let done = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(AtomicUsize::new(0));
    {
        use futures::task::LocalSpawnExt;
        let spawner = pool.spawner();
        for k in 0..N {
            let (b, done, wrong) = (b.clone(), Arc::clone(&done), Arc::clone(&wrong));
            spawner
                .spawn_local(async move {
                    let v = b.get_with_async(k, async move { u64::MAX }).await;
                    if v != k * 3 {
                        wrong.fetch_add(1, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
    }
    let t0 = Instant::now();
    while lease_waits(&b) < N {
        pool.run_until_stalled();
        std::thread::sleep(Duration::from_millis(1));
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "waits: {}",
            lease_waits(&b)
        );
    }
    for k in 0..N {
        redis::cmd("HSET")
            .arg(vkey(ns, k))
            .arg("d")
            .arg(k * 3)
            .query::<()>(&mut c)
            .unwrap();
    }
    while done.load(Ordering::SeqCst) < N as usize {
        pool.run_until_stalled();
        std::thread::sleep(Duration::from_millis(1));
        assert!(t0.elapsed() < Duration::from_secs(25));
    }
    assert_eq!(wrong.load(Ordering::SeqCst), 0);
    assert_eq!(b.stats().remote.lease_wait_hits, N);
}

#[test]
fn invalidate_all_covers_every_scan_batch_and_every_instance() {
    let _w = watchdog(LIMIT, "invalidate_all batches");
    let server = RedisServer::start();
    let ns = "ivb";
    let (a, b) = (plain(tier(&server, ns)), plain(tier(&server, ns)));
    subscribed(&[&a, &b]);
    for k in 0..2_500 {
        a.insert(k, k);
    }
    for k in 0..2_500 {
        assert_eq!(b.get_with(k, || u64::MAX), k);
    }
    let before = received(&b);
    a.invalidate_all();
    assert!(eventually(|| received(&b) > before));
    assert_eq!(b.entry_count(), 0);
    let mut c = raw(&server);
    let left: Vec<u64> = (0..2_500)
        .filter(|&k| field(&mut c, ns, k, "d").is_some())
        .collect();
    assert!(left.is_empty(), "values left: {}", left.len());
    for k in [0, 1_234, 2_499] {
        assert_eq!(b.get_with(k, || u64::MAX - 1), u64::MAX - 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Refresh-ahead through the tier
// ---------------------------------------------------------------------------------------------

/// The loader's calls; calls after the first block until `gate` gets a message, then return 2.
struct RefreshBackend {
    calls: AtomicUsize,
    gate: Mutex<mpsc::Receiver<()>>,
}

fn refreshing(server: &RedisServer, ns: &str, be: &Arc<RefreshBackend>) -> TieredCache<u64, u64> {
    let be = Arc::clone(be);
    leased(server, ns, Duration::from_secs(60), Duration::from_secs(20))
        .ttl(Duration::from_secs(30))
        .build(
            builder()
                .refresh_after(Duration::from_millis(300))
                .loader(move |_k: &u64| {
                    if be.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Ok::<_, BoxError>(1);
                    }
                    let _ = be.gate.lock().unwrap().recv();
                    Ok(2)
                }),
            Plain,
        )
        .unwrap()
}

// The docs: "One instance refreshes each key for the fleet": three instances read a key past
// `refresh_after` together; one refreshes (under the lease), the others take its new value.
#[test]
fn one_instance_refreshes_a_key_for_the_fleet() {
    let _w = watchdog(LIMIT, "fleet refresh");
    let server = RedisServer::start();
    let ns = "rf";
    let (gate_tx, gate_rx) = mpsc::channel();
    let be = Arc::new(RefreshBackend {
        calls: AtomicUsize::new(0),
        gate: Mutex::new(gate_rx),
    });
    let (a, b, c3) = (
        refreshing(&server, ns, &be),
        refreshing(&server, ns, &be),
        refreshing(&server, ns, &be),
    );
    assert_eq!(a.load(1).unwrap(), 1);
    assert_eq!(b.load(1).unwrap(), 1);
    assert_eq!(c3.load(1).unwrap(), 1);
    assert_eq!(be.calls.load(Ordering::SeqCst), 1);
    std::thread::sleep(Duration::from_millis(450)); // past refresh_after (an age, not an order)
    let ac = a.clone();
    let ta = common::start(move || ac.load(1).unwrap());
    let mut c = raw(&server);
    assert!(
        eventually(|| exists(&mut c, &lkey(ns, 1))),
        "A refreshes under the lease"
    );
    let (bc, cc) = (b.clone(), c3.clone());
    let tb = common::start(move || bc.load(1).unwrap());
    let tc = common::start(move || cc.load(1).unwrap());
    assert!(eventually(|| lease_waits(&b) >= 1 && lease_waits(&c3) >= 1));
    gate_tx.send(()).unwrap();
    for t in [ta, tb, tc] {
        let v = t.wait(LIMIT).unwrap().unwrap();
        assert!(v == 1 || v == 2);
    }
    assert!(eventually(|| a.get(&1) == Some(2)
        && b.get(&1) == Some(2)
        && c3.get(&1) == Some(2)));
    assert_eq!(
        be.calls.load(Ordering::SeqCst),
        2,
        "one refresh for the fleet"
    );
}

// ---------------------------------------------------------------------------------------------
// A value decoder that panics, met after the lease was taken
// ---------------------------------------------------------------------------------------------

/// A value codec (decimal `u64`): the bytes `bad` fail to decode (an error), the bytes `panic`
/// make it panic. A test hook (global, armed once) parks the first decode of `bad` so that the
/// test can change Redis between a fetch's first read and its lease attempt.
#[derive(Clone, Copy, Debug, Default)]
struct Hooked;

static DECODE_HOOK: Mutex<Option<Park>> = Mutex::new(None);

impl Codec<u64> for Hooked {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Plain.encode(v, out)
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        if b == b"bad" {
            let hook = DECODE_HOOK.lock().unwrap().take();
            if let Some((reached, go)) = hook {
                let _ = reached.send(());
                let _ = go.recv();
            }
            return Err("not a number".into());
        }
        assert!(b != b"panic", "injected: decode panics");
        Plain.decode(b)
    }
}

/// Sets `bad` for key 1, parks the fetch `call` runs in its first decode, replaces the value by
/// `panic` (which the fetch reads next in its lease attempt, after taking the lease), and
/// returns the call's outcome.
fn decode_panic_after_lease<T: Send + 'static>(
    server: &RedisServer,
    ns: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> std::thread::Result<T> {
    let mut c = raw(server);
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("d")
        .arg("bad")
        .query::<()>(&mut c)
        .unwrap();
    let (reached_tx, reached_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *DECODE_HOOK.lock().unwrap() = Some((reached_tx, go_rx));
    let started = common::start(call);
    reached_rx.recv().expect("the fetch read `bad`");
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("d")
        .arg("panic")
        .query::<()>(&mut c)
        .unwrap();
    go_tx.send(()).unwrap();
    started.wait(LIMIT).expect("the call returned")
}

static DECODE_HOOK_LOCK: Mutex<()> = Mutex::new(());

// Expected (module docs: a lease is released by its holder when its load ends, "a holder whose
// loader fails releases it at once"; a decode failure is "treated as a miss of the second
// tier"): a fetch that took the lease and then meets a value its codec panics on gives the
// lease back as the panic unwinds. Failed before stop 37's fix: the lease stayed until its time to
// live (60 s), so every other instance waits its whole lease wait on the key. In src/redis/tier.rs
// `attempt`, the lease is taken (`SET … NX`) in the same round trip as the read, and the read is
// decoded (`snapshot` → `found` → `decode`, user code) before any guard owns the token.
// Fix: the lease attempt hands the token to a guard (`Held`) before decoding the value read with
// it.
#[test]
fn s37_a_decode_panic_after_taking_the_lease_leaks_it() {
    let _l = DECODE_HOOK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(LIMIT, "decode panic after lease");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "dpl";
    let a = leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .build_with(builder(), Plain, Hooked)
    .unwrap();
    let ac = a.clone();
    let r = decode_panic_after_lease(&server, ns, move || ac.get_with(1, || 10));
    assert!(r.is_err(), "the codec's panic reaches the caller");
    let mut c = raw(&server);
    assert!(
        !exists(&mut c, &lkey(ns, 1)),
        "the lease outlives the call that took it (held until its ttl)"
    );
}

// Expected (the same class as the test above: a lease is owned from the round trip that may
// have taken it): a lease round trip whose `SET … NX` succeeded but whose read the server
// refused (here the namespace's epoch key is of another type: `WRONGTYPE`) gives the lease
// back; the call loads locally. Failed before stop 37's fix: the refusal was taken for
// "Redis unavailable" and the lease left to its ttl (60 s), though the server had answered.
// Fix: `attempt` releases the lease it may have taken when the server refused the round trip
// (a lease whose round trip timed out is left to its ttl, as documented: the call skips the
// rest of its Redis work).
#[test]
fn s37_a_lease_round_trip_the_server_refused_gives_the_lease_back() {
    let _w = watchdog(LIMIT, "refused lease round trip");
    let server = RedisServer::start();
    let ns = "rlr";
    let mut c = raw(&server);
    redis::cmd("HSET")
        .arg(format!("hc:{}:{ns}:epoch", ns.len()))
        .arg("x")
        .arg("y")
        .query::<()>(&mut c)
        .unwrap();
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    assert_eq!(a.get_with(1, || 10), 10, "loaded locally");
    assert!(
        !exists(&mut c, &lkey(ns, 1)),
        "the lease outlives the call that took it (held until its ttl)"
    );
}

// The async twin: the round trip runs on a helper thread, whose panic is swallowed; the call
// loads locally (10). Expected the lease given back; failed before stop 37's fix: leaked until its
// ttl.
// Fix: as above.
#[test]
fn s37_a_decode_panic_after_taking_the_lease_leaks_it_async() {
    let _l = DECODE_HOOK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(LIMIT, "async decode panic after lease");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "dpla";
    let a = leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .build_with(builder(), Plain, Hooked)
    .unwrap();
    let ac = a.clone();
    let r = decode_panic_after_lease(&server, ns, move || {
        futures::executor::block_on(ac.get_with_async(1, async { 10 }))
    });
    assert_eq!(r.ok(), Some(10), "loaded locally");
    let mut c = raw(&server);
    let t0 = Instant::now();
    while exists(&mut c, &lkey(ns, 1)) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !exists(&mut c, &lkey(ns, 1)),
        "the lease outlives the call that took it (held until its ttl)"
    );
}

// An async caller dropped while its first round trip (read + lease attempt) is under way on a
// helper thread: the lease that round trip took is given back when it ends.
#[test]
fn an_async_caller_dropped_during_its_lease_round_trip_gives_the_lease_back() {
    let _l = DECODE_HOOK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(LIMIT, "cancel during round trip");
    let server = RedisServer::start();
    let ns = "crt";
    let a = leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .build_with(builder(), Plain, Hooked)
    .unwrap();
    let mut c = raw(&server);
    // `bad` twice: the first read's decode parks; the lease attempt's read decodes `bad` again
    // (an error: the lease is kept for a load).
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("d")
        .arg("bad")
        .query::<()>(&mut c)
        .unwrap();
    let (reached_tx, reached_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *DECODE_HOOK.lock().unwrap() = Some((reached_tx, go_rx));
    let mut fut = Box::pin(a.get_with_async(1, async { 10 }));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    reached_rx.recv().unwrap();
    drop(fut);
    go_tx.send(()).unwrap();
    assert!(
        eventually(|| !exists(&mut c, &lkey(ns, 1))),
        "the lease of a cancelled caller is given back"
    );
    assert_eq!(a.get(&1), None);
}

// ---------------------------------------------------------------------------------------------
// A server that answers with nonsense
// ---------------------------------------------------------------------------------------------

/// A loopback port whose server answers every read with `reply` (a fake, or hostile, Redis).
fn liar(reply: &'static [u8]) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn against_liar(reply: &'static [u8]) {
    let port = liar(reply);
    let cache: TieredCache<u64, u64> = RedisTier::new(format!("redis://127.0.0.1:{port}/"))
        .namespace("liar")
        .timeouts(Duration::from_millis(100), Duration::from_millis(100))
        .lease(Duration::from_secs(60), Duration::from_secs(1))
        .breaker(3, Duration::from_millis(50))
        .build(builder(), Plain)
        .unwrap();
    let max = Duration::from_secs(5);
    for k in 0..3u64 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bounded(max, "get_with", || cache.get_with(k, || k + 100))
        }));
        assert_eq!(
            r.ok(),
            Some(k + 100),
            "get_with against {:?}",
            String::from_utf8_lossy(reply)
        );
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bounded(max, "insert", || cache.insert(k + 1000, 1));
            bounded(max, "invalidate", || cache.invalidate(&(k + 1000)));
            bounded(max, "invalidate_all", || cache.invalidate_all());
            bounded(max, "async", || {
                futures::executor::block_on(cache.get_with_async(k + 2000, async { 7 }))
            })
        }));
        assert_eq!(
            r.ok(),
            Some(7),
            "writes against {:?}",
            String::from_utf8_lossy(reply)
        );
        std::thread::sleep(Duration::from_millis(60)); // past the breaker's cooldown
    }
}

#[test]
fn a_server_answering_nonsense_never_fails_a_request() {
    let _w = watchdog(Duration::from_secs(120), "liars");
    for reply in [
        &b"+OK\r\n"[..],
        b"-ERR nope\r\n",
        b":1\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"*3\r\n$1\r\na\r\n:1\r\n*0\r\n",
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"%1\r\n+a\r\n+b\r\n",
        b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n",
        b"_\r\n",
        b",1.5\r\n",
        b"#t\r\n",
    ] {
        against_liar(reply);
    }
}

#[test]
fn a_server_announcing_huge_lengths_never_fails_a_request() {
    let _w = watchdog(Duration::from_secs(60), "huge lengths");
    for reply in [
        &b"$9223372036854775807\r\n"[..],
        b"*9223372036854775807\r\n",
        b"$4294967296\r\n",
        b"*2147483647\r\n",
        b"%9223372036854775807\r\n",
    ] {
        against_liar(reply);
    }
}

// ---------------------------------------------------------------------------------------------
// Messages and invalidate_all against loads in flight
// ---------------------------------------------------------------------------------------------

#[test]
fn insert_invalidate_and_remove_reach_every_other_instance() {
    let _w = watchdog(LIMIT, "messages");
    let server = RedisServer::start();
    let ns = "msg";
    let (a, b, c3) = (
        plain(tier(&server, ns)),
        plain(tier(&server, ns)),
        plain(tier(&server, ns)),
    );
    subscribed(&[&a, &b, &c3]);
    assert_eq!(a.get_with(1, || 10), 10);
    assert_eq!(b.get_with(1, || 0), 10);
    assert_eq!(c3.get_with(1, || 0), 10);
    let step = |what: &str, f: &dyn Fn(), expect: Option<u64>| {
        let (rb, rc) = (received(&b), received(&c3));
        f();
        assert!(
            eventually(|| received(&b) > rb && received(&c3) > rc),
            "{what}"
        );
        assert_eq!(b.get(&1), None, "{what}");
        assert_eq!(c3.get(&1), None, "{what}");
        assert_eq!(b.get_with(1, || 99), expect.unwrap_or(99), "{what}");
        assert_eq!(c3.get_with(1, || 98), b.get(&1).unwrap(), "{what}");
    };
    step("insert", &|| a.insert(1, 11), Some(11));
    step("invalidate", &|| a.invalidate(&1), None);
    step("remove", &|| assert_eq!(a.remove(&1), None), Some(99));
    step("invalidate_all", &|| a.invalidate_all(), None);
}

// A load on B that read Redis before A's invalidate_all (the key absent there) and finishes
// after it: its value is neither kept by B nor read by anyone from Redis.
#[test]
fn a_load_spanning_another_instances_invalidate_all_is_dropped_everywhere() {
    let _w = watchdog(LIMIT, "load spanning invalidate_all");
    let server = RedisServer::start();
    let ns = "lia";
    let (a, b, c3) = (
        plain(tier(&server, ns)),
        plain(tier(&server, ns)),
        plain(tier(&server, ns)),
    );
    subscribed(&[&a, &b, &c3]);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let bc = b.clone();
    let load = common::start(move || {
        bc.get_with(1, || {
            in_tx.send(()).unwrap();
            let _ = go_rx.recv();
            10
        })
    });
    in_rx.recv().unwrap();
    let before = received(&b);
    a.invalidate_all();
    assert!(eventually(|| received(&b) > before));
    go_tx.send(()).unwrap();
    assert_eq!(load.wait(LIMIT).unwrap().unwrap(), 10);
    assert_eq!(
        b.get(&1),
        None,
        "B keeps a value loaded before invalidate_all"
    );
    assert_eq!(
        c3.get_with(1, || 20),
        20,
        "C reads a value loaded before invalidate_all"
    );
    assert_eq!(a.get_with(1, || 30), 20);
}

// The same load, with leases, when the write-back lands after invalidate_all: the value it
// writes carries the old epoch and is never read (a waiter on the lease loads afresh).
#[test]
fn a_lease_holder_spanning_invalidate_all_writes_a_value_no_one_reads() {
    let _w = watchdog(LIMIT, "lease spanning invalidate_all");
    let server = RedisServer::start();
    let ns = "llia";
    let mk = || {
        plain(leased(
            &server,
            ns,
            Duration::from_secs(60),
            Duration::from_secs(20),
        ))
    };
    let (a, b) = (mk(), mk());
    // The holder's subscriber never subscribes (its handshake is held back by a proxy): its
    // local flight is not superseded by the message, so its write-back reaches Redis and the
    // epoch is what must neutralise it.
    let (port, held_setinfo, _never_open) = gating_proxy(server.port, b"SETINFO");
    let holder = RedisTier::new(format!("redis://127.0.0.1:{port}/"))
        .namespace(ns)
        .timeouts(Duration::from_secs(20), Duration::from_millis(500))
        .lease(Duration::from_secs(60), Duration::from_secs(20))
        .build(builder(), Plain)
        .unwrap();
    held_setinfo.recv().unwrap();
    subscribed(&[&a, &b]);
    let hc = holder.clone();
    let (go, held) = holding(&server, ns, 1, move |rx| {
        hc.get_with(1, || {
            let _ = rx.recv();
            10
        })
    });
    a.invalidate_all();
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 10);
    assert!(!holder.is_subscribed());
    assert_eq!(
        holder.stats().remote.writes,
        1,
        "the holder wrote its value back"
    );
    let mut c = raw(&server);
    assert_eq!(field(&mut c, ns, 1, "d").as_deref(), Some("10"));
    assert_eq!(
        b.get_with(1, || 20),
        20,
        "B reads a value loaded before invalidate_all"
    );
    assert_eq!(a.get_with(1, || 30), 20);
}

// ---------------------------------------------------------------------------------------------
// Async cancellation between a round trip's end and the next poll
// ---------------------------------------------------------------------------------------------

/// A waker that reports each wake on a channel.
struct ChannelWaker(Mutex<mpsc::Sender<()>>);

impl std::task::Wake for ChannelWaker {
    fn wake(self: Arc<Self>) {
        let _ = self.0.lock().unwrap().send(());
    }
}

// Expected (`TieredCache::get_with_async`, "Cancel safety": "a lease this call took for the
// fleet is given back if it is dropped before its load finishes"; src/redis/tier.rs
// `round_trip`: "If the caller goes away first, a lease the step took for it is given back"):
// an async caller dropped after its first round trip took the lease — the helper thread has
// delivered the result and woken the caller, which has not been polled again (a `select!`
// whose other branch won, a timeout firing at that moment) — gives the lease back.
// Failed before stop 37's fix: the lease stayed until its ttl (60 s here) and every other instance
// waited its whole lease wait for the key. In src/redis/offload.rs, `Receive::drop` only marks the
// slot abandoned: the `unwanted` callback (which releases the lease) runs only when the job
// finishes *after* the drop; a result already delivered to the slot is dropped with it.
// Fix: `Receive::drop` hands a result delivered but not taken to `unwanted`, on a helper thread.
#[test]
fn s37_an_async_caller_dropped_after_its_lease_round_trip_delivered_leaks_the_lease() {
    let _w = watchdog(LIMIT, "cancel after delivery");
    let server = RedisServer::start();
    let ns = "cad";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(1),
    ));
    let (tx, woken) = mpsc::channel();
    let waker = std::task::Waker::from(Arc::new(ChannelWaker(Mutex::new(tx))));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = Box::pin(a.get_with_async(1, async { 10 }));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    woken.recv().expect("the round trip delivered its result");
    let mut c = raw(&server);
    assert!(
        exists(&mut c, &lkey(ns, 1)),
        "the round trip took the lease"
    );
    drop(fut); // cancelled before it saw the result
    let t0 = Instant::now();
    while exists(&mut c, &lkey(ns, 1)) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let leaked = exists(&mut c, &lkey(ns, 1));
    // What the leak costs another instance: its whole lease wait (1 s here, up to the lease
    // ttl in general) before it loads.
    let t1 = Instant::now();
    assert_eq!(b.get_with(1, || 20), 20);
    let waited = t1.elapsed();
    assert!(
        !leaked,
        "the cancelled caller's lease is still held ({waited:?} wait for B)"
    );
}

// ---------------------------------------------------------------------------------------------
// Local copies and the copy in Redis; a subscriber whose connection goes silent
// ---------------------------------------------------------------------------------------------

#[path = "common/proxy.rs"]
mod proxy;

/// Stores `v` for key `k` with 300 ms to live, in one transaction: a reader polling meanwhile
/// (a lease waiter) never sees the value without its expiry.
fn short_lived(c: &mut redis::Connection, ns: &str, k: u64, v: u64) {
    redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(vkey(ns, k))
        .arg("d")
        .arg(v)
        .ignore()
        .cmd("PEXPIRE")
        .arg(vkey(ns, k))
        .arg(300)
        .ignore()
        .query::<()>(c)
        .unwrap();
}

// The docs: "A copy an instance reads from Redis expires locally when the copy in Redis does",
// on every path that reads Redis: a plain read, an async read, and a value that appeared while
// waiting on another instance's lease (blocking and async).
#[test]
fn copies_read_from_redis_expire_with_the_redis_copy_on_every_path() {
    let _w = watchdog(LIMIT, "ttl cap");
    let server = RedisServer::start();
    let ns = "cap";
    let a = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(20),
    ));
    let mut c = raw(&server);
    short_lived(&mut c, ns, 1, 11);
    assert_eq!(a.get_with(1, || 0), 11);
    short_lived(&mut c, ns, 2, 22);
    assert_eq!(
        futures::executor::block_on(a.get_with_async(2, async { 0 })),
        22
    );
    // Lease waits: a dead instance's lease, then the value appears (with 300 ms to live).
    for k in [3u64, 4] {
        redis::cmd("SET")
            .arg(lkey(ns, k))
            .arg("dead")
            .arg("PX")
            .arg(60_000)
            .query::<()>(&mut c)
            .unwrap();
    }
    let before = lease_waits(&a);
    let ac = a.clone();
    let t3 = common::start(move || ac.get_with(3, || 0));
    let ac = a.clone();
    let t4 = common::start(move || futures::executor::block_on(ac.get_with_async(4, async { 0 })));
    assert!(eventually(|| lease_waits(&a) >= before + 2));
    short_lived(&mut c, ns, 3, 33);
    short_lived(&mut c, ns, 4, 44);
    assert_eq!(t3.wait(LIMIT).unwrap().unwrap(), 33);
    assert_eq!(t4.wait(LIMIT).unwrap().unwrap(), 44);
    for k in 1..=4 {
        assert!(a.get(&k).is_some());
    }
    std::thread::sleep(Duration::from_millis(600)); // past the Redis copies' 300 ms (an age)
    for k in 1..=4 {
        assert_eq!(
            a.get(&k),
            None,
            "key {k}'s local copy outlived the one in Redis"
        );
    }
}

// The docs: "a connection that silently stopped delivering (a dropped NAT entry, a failover)
// is replaced within about two seconds"; with `clear_on_reconnect`, what was missed meanwhile
// is dropped then.
#[test]
fn a_silent_subscriber_connection_is_replaced_and_clear_on_reconnect_drops_what_was_missed() {
    let _w = watchdog(LIMIT, "silent subscriber");
    let server = RedisServer::start();
    let p = proxy::Proxy::start(server.port);
    let ns = "sil";
    let a = plain(
        RedisTier::new(p.url())
            .namespace(ns)
            .timeouts(Duration::from_millis(200), Duration::from_millis(200))
            .breaker(3, Duration::from_millis(100))
            .clear_on_reconnect(true),
    );
    let b = plain(tier(&server, ns));
    subscribed(&[&a, &b]);
    assert_eq!(a.get_with(1, || 10), 10);
    let connects = a.stats().remote.subscriber_connects;
    p.black_hole_open_connections();
    let t0 = Instant::now();
    b.insert(1, 20); // lost for A: its subscriber's connection delivers nothing now
    assert!(
        eventually(|| a.stats().remote.subscriber_connects > connects),
        "the silent connection was never replaced"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "replaced after {took:?}");
    assert_eq!(
        a.get(&1),
        None,
        "the missed invalidation is covered by the clear"
    );
    let mut probe = 100;
    assert!(eventually(|| {
        probe += 1;
        let _ = a.get_with(probe, || 0);
        !a.is_breaker_open()
    }));
    assert_eq!(a.get_with(1, || 0), 20);
}

// ---------------------------------------------------------------------------------------------
// A fleet under a mixed workload converges on the backend's latest value
// ---------------------------------------------------------------------------------------------

/// Three instances; each key has one writer thread (on one instance) that advances the
/// backend's value of the key and then inserts it (or invalidates the key); readers on every
/// instance load through the tier. Once the writers stop, every instance and Redis hold either
/// nothing or the backend's latest value of each key: no older value survives anywhere.
fn fleet_converges(ns: &str, leases: bool) {
    let _w = watchdog(Duration::from_secs(60), "fleet convergence");
    let server = RedisServer::start();
    const KEYS: u64 = 6;
    const ROUNDS: usize = 400;
    let backend: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let mk = || {
        let be = Arc::clone(&backend);
        let t = if leases {
            leased(
                &server,
                ns,
                Duration::from_secs(5),
                Duration::from_millis(200),
            )
        } else {
            tier(&server, ns)
        };
        t.build(
            builder().loader(move |k: &u64| {
                let v = be[*k as usize].load(Ordering::SeqCst) as u64;
                std::thread::yield_now();
                Ok::<_, BoxError>(v)
            }),
            Plain,
        )
        .unwrap()
    };
    let fleet = [mk(), mk(), mk()];
    subscribed(&[&fleet[0], &fleet[1], &fleet[2]]);
    let start = Arc::new(Barrier::new(KEYS as usize + 3));
    let mut handles = Vec::new();
    for k in 0..KEYS {
        let (c, be, start) = (
            fleet[(k % 3) as usize].clone(),
            Arc::clone(&backend),
            Arc::clone(&start),
        );
        handles.push(std::thread::spawn(move || {
            let mut rng = common::rng(k + 1);
            start.wait();
            for _ in 0..ROUNDS {
                let v = be[k as usize].fetch_add(1, Ordering::SeqCst) as u64 + 1;
                match rng() % 4 {
                    0 => c.invalidate(&k),
                    1 => {
                        let _ = c.remove(&k);
                    }
                    _ => c.insert(k, v),
                }
            }
        }));
    }
    for (i, c) in fleet.iter().enumerate() {
        let (c, be, start) = (c.clone(), Arc::clone(&backend), Arc::clone(&start));
        handles.push(std::thread::spawn(move || {
            let mut rng = common::rng(100 + i as u64);
            start.wait();
            for _ in 0..ROUNDS * 3 {
                let k = rng() % KEYS;
                if rng() % 2 == 0 {
                    let _ = c.load(k);
                } else {
                    let be = Arc::clone(&be);
                    let _ = futures::executor::block_on(c.get_with_async(k, async move {
                        be[k as usize].load(Ordering::SeqCst) as u64
                    }));
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut conn = raw(&server);
    let report = |conn: &mut redis::Connection| {
        let mut bad = Vec::new();
        for k in 0..KEYS {
            let latest = backend[k as usize].load(Ordering::SeqCst) as u64;
            let r = field(conn, ns, k, "d").map(|s| s.parse::<u64>().unwrap());
            if r.is_some_and(|r| r != latest) {
                bad.push(format!("redis k{k}={r:?} latest {latest}"));
            }
            for (i, c) in fleet.iter().enumerate() {
                let l = c.get(&k);
                if l.is_some_and(|l| l != latest) {
                    bad.push(format!("instance {i} k{k}={l:?} latest {latest}"));
                }
            }
        }
        bad
    };
    let converged = eventually(|| report(&mut conn).is_empty());
    assert!(converged, "stale values survive: {:?}", report(&mut conn));
}

#[test]
fn a_fleet_under_mixed_writes_and_loads_converges_on_the_latest_value() {
    fleet_converges("fc1", false);
}

#[test]
fn a_fleet_with_leases_under_mixed_writes_and_loads_converges_on_the_latest_value() {
    fleet_converges("fc2", true);
}

/// Two writer threads per key, on two instances, and readers on all three: once they stop,
/// every instance holds nothing or Redis's value of each key ("concurrent writers converge on
/// Redis's value").
#[test]
fn concurrent_writers_on_two_instances_converge_on_redis_value() {
    let _w = watchdog(Duration::from_secs(60), "writers converge");
    let server = RedisServer::start();
    let ns = "wc";
    const KEYS: u64 = 4;
    let fleet = [
        plain(tier(&server, ns)),
        plain(tier(&server, ns)),
        plain(tier(&server, ns)),
    ];
    subscribed(&[&fleet[0], &fleet[1], &fleet[2]]);
    let start = Arc::new(Barrier::new(KEYS as usize * 2 + 3));
    let next = Arc::new(AtomicUsize::new(1));
    let mut handles = Vec::new();
    for k in 0..KEYS {
        for w in 0..2u64 {
            let c = fleet[((k + w) % 3) as usize].clone();
            let (start, next) = (Arc::clone(&start), Arc::clone(&next));
            handles.push(std::thread::spawn(move || {
                let mut rng = common::rng(k * 7 + w + 1);
                start.wait();
                for _ in 0..300 {
                    if rng() % 3 == 0 {
                        c.invalidate(&k);
                    } else {
                        c.insert(k, next.fetch_add(1, Ordering::SeqCst) as u64);
                    }
                }
            }));
        }
    }
    for (i, c) in fleet.iter().enumerate() {
        let (c, start) = (c.clone(), Arc::clone(&start));
        handles.push(std::thread::spawn(move || {
            let mut rng = common::rng(50 + i as u64);
            start.wait();
            for _ in 0..1_000 {
                let k = rng() % KEYS;
                let _ = c.get_with(k, || 0);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut conn = raw(&server);
    let report = |conn: &mut redis::Connection| {
        let mut bad = Vec::new();
        for k in 0..KEYS {
            let r = field(conn, ns, k, "d").map(|s| s.parse::<u64>().unwrap());
            for (i, c) in fleet.iter().enumerate() {
                let l = c.get(&k);
                if l.is_some() && l != r {
                    bad.push(format!("instance {i} k{k}={l:?} redis {r:?}"));
                }
            }
        }
        bad
    };
    let converged = eventually(|| report(&mut conn).is_empty());
    assert!(
        converged,
        "instances diverge from Redis: {:?}",
        report(&mut conn)
    );
}

/// A value codec (decimal `u64`) that refuses (an error, no panic) to encode odd values.
#[derive(Clone, Copy, Debug, Default)]
struct NoOdd;

impl Codec<u64> for NoOdd {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        if v % 2 == 1 {
            return Err("odd values do not serialize".into());
        }
        Plain.encode(v, out)
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        Plain.decode(b)
    }
}

// A value whose encoding fails: an insert of it leaves a tombstone (no instance reads the
// older value), a load of it is not written and its lease is given back at once.
#[test]
fn an_unencodable_value_tombstones_on_insert_and_gives_the_lease_back_on_load() {
    let _w = watchdog(LIMIT, "unencodable");
    let server = RedisServer::start();
    let ns = "ue";
    let mk = || {
        leased(
            &server,
            ns,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .build_with(builder(), Plain, NoOdd)
        .unwrap()
    };
    let (a, b) = (mk(), mk());
    subscribed(&[&a, &b]);
    a.insert(1, 2);
    assert_eq!(b.get_with(1, || 0), 2);
    let before = received(&b);
    a.insert(1, 3);
    assert!(eventually(|| received(&b) > before));
    assert_eq!(a.get(&1), Some(3));
    assert_eq!(b.get_with(1, || 4), 4, "B does not read the older 2");
    let ac = a.clone();
    let (go, held) = holding(&server, ns, 5, move |rx| {
        ac.get_with(5, || {
            let _ = rx.recv();
            5
        })
    });
    let waiter = waiting_get(&b, 5, 6);
    let t0 = Instant::now();
    go.send(()).unwrap();
    assert_eq!(held.wait(LIMIT).unwrap().unwrap(), 5);
    let (v, done) = waiter.wait(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(v, 6);
    assert!(done - t0 < Duration::from_secs(10));
    assert!(!a.is_breaker_open() && !b.is_breaker_open());
}

// A holder that died (its lease left behind, never released): a waiter takes over when the
// lease expires, long before its lease wait ends, and its value is shared.
#[test]
fn a_dead_holders_lease_expires_and_a_waiter_takes_over() {
    let _w = watchdog(LIMIT, "dead holder");
    let server = RedisServer::start();
    let ns = "dh";
    let b = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(20),
    ));
    let c3 = plain(leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(20),
    ));
    let mut c = raw(&server);
    redis::cmd("SET")
        .arg(lkey(ns, 1))
        .arg("dead")
        .arg("PX")
        .arg(300)
        .query::<()>(&mut c)
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(b.get_with(1, || 10), 10);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(b.stats().remote.lease_waits, 1);
    assert_eq!(b.stats().remote.leases_acquired, 1);
    assert_eq!(c3.get_with(1, || 20), 10, "the taker's value is shared");
}

/// A value whose `Clone` panics while `CLONE_PANICS` is set.
#[derive(Debug, PartialEq, Eq)]
struct Fragile(u64);

static CLONE_PANICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Clone for Fragile {
    fn clone(&self) -> Self {
        assert!(
            !CLONE_PANICS.load(Ordering::SeqCst),
            "injected: Clone panics"
        );
        Fragile(self.0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct FragileCodec;

impl Codec<Fragile> for FragileCodec {
    fn encode(&self, v: &Fragile, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Plain.encode(&v.0, out)
    }
    fn decode(&self, b: &[u8]) -> Result<Fragile, BoxError> {
        Ok(Fragile(Plain.decode(b)?))
    }
}

static CLONE_LOCK: Mutex<()> = Mutex::new(());

// A value whose `Clone` panics while an async load finishes (the tier clones it for the
// write-back): the panic reaches the caller, the lease is given back, and the next call works.
#[test]
fn a_value_clone_panic_in_an_async_load_gives_the_lease_back() {
    let _l = CLONE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(LIMIT, "clone panic");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "clp";
    let a: TieredCache<u64, Fragile> = leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .build_with(builder(), Plain, FragileCodec)
    .unwrap();
    CLONE_PANICS.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        futures::executor::block_on(a.get_with_async(1, async { Fragile(10) }))
    }));
    CLONE_PANICS.store(false, Ordering::SeqCst);
    assert!(r.is_err(), "the Clone panic reaches the caller");
    let mut c = raw(&server);
    assert!(
        eventually(|| !exists(&mut c, &lkey(ns, 1))),
        "the lease is given back"
    );
    let v = futures::executor::block_on(a.get_with_async(1, async { Fragile(11) }));
    assert_eq!(v, Fragile(11));
}

// The docs: the subscriber thread stops when the last handle is dropped (and with it the
// tier: its codecs are dropped), after blocking and async loads, lease waits and messages.
#[test]
fn dropping_the_last_handle_releases_the_tier() {
    let _w = watchdog(LIMIT, "drop releases the tier");
    let server = RedisServer::start();
    let ns = "drp";
    let drops = Arc::new(AtomicUsize::new(0));
    let a: TieredCache<u64, u64> = leased(
        &server,
        ns,
        Duration::from_secs(60),
        Duration::from_millis(50),
    )
    .build_with(builder(), DropFlag(Arc::clone(&drops)), Plain)
    .unwrap();
    let b = plain(tier(&server, ns));
    subscribed(&[&a, &b]);
    assert_eq!(a.get_with(1, || 1), 1);
    assert_eq!(
        futures::executor::block_on(a.get_with_async(2, async { 2 })),
        2
    );
    let mut c = raw(&server);
    redis::cmd("SET")
        .arg(lkey(ns, 3))
        .arg("dead")
        .arg("PX")
        .arg(60_000)
        .query::<()>(&mut c)
        .unwrap();
    assert_eq!(
        futures::executor::block_on(a.get_with_async(3, async { 3 })),
        3
    );
    let before = received(&a);
    b.insert(1, 10);
    assert!(eventually(|| received(&a) > before));
    let clone = a.clone();
    drop(a);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "a clone keeps it");
    drop(clone);
    assert!(
        eventually(|| drops.load(Ordering::SeqCst) >= 1),
        "the tier outlived its last handle"
    );
}

// Expected (`RemoteStats::invalidations_received`: "Invalidation messages received from other
// instances and applied"): a message that is *not* applied — B's insert, older than A's own
// later insert of the key, delivered to A after A's write ("an instance ignores one older than
// its own write of that key") — is not counted. Failed before stop 37's fix: it was counted
// (and A rightly keeps its newer value): src/redis/subscriber.rs `apply` counted every message
// that fell through the `match`, including the `MSG_KEY if !tier.announced(..) => {}` arm that
// ignored it.
// Fix: an ignored message returns before it is counted.
#[test]
fn s37_an_ignored_older_message_is_counted_as_received_and_applied() {
    let _w = watchdog(LIMIT, "ignored message counted");
    let server = RedisServer::start();
    let ns = "irc";
    // A's replies pass a proxy that holds back pub/sub deliveries until told.
    let (port, held, open) = gating_proxy_in(server.port, b"message", true);
    let a = plain(RedisTier::new(format!("redis://127.0.0.1:{port}/")).namespace(ns));
    let b = plain(tier(&server, ns));
    subscribed(&[&a, &b]);
    b.insert(1, 1); // older: its message to A is held back
    held.recv().expect("B's message to A is held");
    a.insert(1, 2); // newer, on A
    a.local().insert(99, 0);
    let before = received(&a);
    open.send(()).unwrap();
    // Flush: a later message from B that A applies (after the held one: one connection
    // delivers in order).
    b.invalidate(&99);
    assert!(eventually(|| a.get(&99).is_none()));
    assert_eq!(
        a.get(&1),
        Some(2),
        "A keeps its newer value (the message was ignored)"
    );
    let mut c = raw(&server);
    assert_eq!(field(&mut c, ns, 1, "d").as_deref(), Some("2"));
    assert_eq!(
        received(&a) - before,
        1,
        "only the applied message (key 99) counts; the ignored one was counted too"
    );
}
