//! Round 34: an outside attack on the Redis tier from its public API — write ordering across a
//! fleet when versions restart (a key's hash expired in Redis), per-key refusals (OOM, a stray
//! version field) that silently drop a write and its announcement, a value the codec refuses,
//! extreme durations, and faults (a frozen server, a server restarted empty).
//!
//! Twelve of its twenty tests failed when written; all twelve were fixed with this file:
//! versions now follow the server's clock (they keep increasing across a key's expiry); a
//! write the server refuses deletes the key's value and still tells the other instances; a
//! version field that is not a number is replaced; an unencodable insert leaves a tombstone;
//! a breaker cooldown or a time to live of `Duration::MAX` no longer overflows; a value larger
//! than the reader's `max_value_size` is not carried over the link; the subscriber survives a
//! panicking key codec. (The huge-value test relies on reading 64 MiB taking longer than the
//! 50 ms operation timeout, as it did here in a debug build.)
//!
//! Each test starts its own `redis-server` on a free loopback port.
#![cfg(feature = "redis")]
#![cfg(not(any(loom, shuttle)))]

mod common;
use common::tier::{raw, vkey};
use herdcache_testkit::redis_server;

use common::{eventually, watchdog, within};
use herdcache::codec::{Codec, Plain};
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use redis_server::RedisServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// The backend: every key's value is `key * 1000 + version`.
#[derive(Default)]
struct Backend {
    version: AtomicU64,
    loads: AtomicU64,
}

impl Backend {
    fn new() -> Arc<Backend> {
        Arc::new(Backend::default())
    }
    fn load(&self, k: u64) -> u64 {
        self.loads.fetch_add(1, Ordering::SeqCst);
        k * 1000 + self.version.load(Ordering::SeqCst)
    }
    fn set(&self, v: u64) {
        self.version.store(v, Ordering::SeqCst);
    }
}

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
}

fn builder(backend: &Arc<Backend>, local_ttl: Duration) -> herdcache::CacheBuilder<u64, u64> {
    let b = Arc::clone(backend);
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(local_ttl)
        .record_stats()
        .loader(move |k: &u64| Ok::<_, BoxError>(b.load(*k)))
}

fn instance(tier: RedisTier, backend: &Arc<Backend>) -> TieredCache<u64, u64> {
    tier.build(builder(backend, Duration::from_secs(600)), Plain)
        .expect("valid configuration")
}

fn exists(conn: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(conn).unwrap() == 1
}

fn field(conn: &mut redis::Connection, ns: &str, k: u64, f: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(vkey(ns, k))
        .arg(f)
        .query(conn)
        .unwrap()
}

fn received(c: &TieredCache<u64, u64>) -> u64 {
    c.stats().remote.invalidations_received
}

/// `writer` invalidates `barrier_key` (which must reach Redis and be announced) and waits until
/// `reader` has applied that message: every message `writer`'s earlier calls published has
/// then been applied by `reader` too (one channel, published in order).
fn barrier(writer: &TieredCache<u64, u64>, reader: &TieredCache<u64, u64>, barrier_key: u64) {
    let before = received(reader);
    let sent = writer.stats().remote.invalidations_sent;
    writer.invalidate(&barrier_key);
    assert!(
        writer.stats().remote.invalidations_sent > sent,
        "the barrier's invalidation was announced"
    );
    assert!(
        eventually(|| received(reader) > before),
        "the barrier's message reached the reader"
    );
}

// ---------------------------------------------------------------------------------------------
// Findings: versions restart when a key's hash expires in Redis
// ---------------------------------------------------------------------------------------------

/// A inserts key 1 twice (its own version 2). The key's hash expires in Redis (the tier's time
/// to live is shorter than the local one). B then invalidates key 1: Redis's version restarts
/// at 1, and A, which remembers its own version 2, ignores B's message and keeps serving its
/// value after B's invalidation was delivered.
#[test]
fn an_invalidation_after_the_key_expired_in_redis_is_ignored_by_an_earlier_writer() {
    let _w = watchdog(LIMIT, "version restart, insert");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34v1";
    let short = |s: &RedisServer| tier(s, ns).ttl(Duration::from_millis(300));
    let a = instance(short(&server), &backend);
    let b = instance(short(&server), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    a.insert(1, 10);
    a.insert(1, 11);
    assert_eq!(a.get(&1), Some(11));
    let mut conn = raw(&server);
    assert!(
        eventually(|| !exists(&mut conn, &vkey(ns, 1))),
        "the key expired in Redis"
    );
    let before = received(&a);
    b.invalidate(&1);
    assert!(eventually(|| received(&a) > before), "A got B's message");
    assert_eq!(
        a.get(&1),
        None,
        "A still serves its value after B's invalidation reached it"
    );
}

/// The same with the default configuration (the tier's time to live is the cache's): A
/// inserted key 1 twice long ago; both copies expired; A loads key 1 again (written back with
/// no version); B invalidates it (version 1 < A's remembered 2): A keeps the loaded value.
#[test]
fn with_default_ttls_an_invalidation_is_ignored_by_an_instance_that_once_wrote_the_key() {
    let _w = watchdog(LIMIT, "version restart, default ttls");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34v2";
    let ttl = Duration::from_secs(3);
    let make = |s: &RedisServer| {
        tier(s, ns)
            .build(builder(&backend, ttl), Plain)
            .expect("valid configuration")
    };
    let a = make(&server);
    let b = make(&server);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    a.insert(1, 10);
    a.insert(1, 11);
    let mut conn = raw(&server);
    let until = Instant::now() + Duration::from_secs(20);
    while (a.get(&1).is_some() || exists(&mut conn, &vkey(ns, 1))) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(a.get(&1).is_none() && !exists(&mut conn, &vkey(ns, 1)));
    backend.set(1);
    assert_eq!(a.load(1).unwrap(), 1001, "loaded from the backend");
    backend.set(2);
    let before = received(&a);
    b.invalidate(&1);
    assert!(eventually(|| received(&a) > before), "A got B's message");
    assert_eq!(
        a.get(&1),
        None,
        "A still serves the value B invalidated (the load's copy lives the local TTL)"
    );
}

// ---------------------------------------------------------------------------------------------
// Findings: a per-key refusal (OOM, a stray version field) silently drops the write and its
// announcement
// ---------------------------------------------------------------------------------------------

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

/// A loaded key 1 (1000, in Redis). Redis is out of memory (`maxmemory`, `noeviction`): writes
/// are refused with `OOM`, reads still served. A invalidates key 1, the backend moved on, and A
/// loads key 1 again: it reads back from Redis the value it has just invalidated.
#[test]
fn an_invalidation_refused_for_oom_is_read_back_by_the_invalidating_instance() {
    let _w = watchdog(LIMIT, "oom invalidate");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34o1";
    let a = instance(tier(&server, ns), &backend);
    assert_eq!(a.load(1).unwrap(), 1000);
    let mut conn = raw(&server);
    assert_eq!(field(&mut conn, ns, 1, "d").as_deref(), Some("1000"));
    oom(&mut conn, true);
    backend.set(1);
    a.invalidate(&1);
    assert!(!a.contains_key(&1));
    let got = a.load(1).unwrap();
    assert!(!a.is_breaker_open(), "OOM is a per-key refusal");
    assert_eq!(
        got, 1001,
        "A read back from Redis the value it had just invalidated"
    );
}

/// B holds key 1 (1000). Redis is out of memory. A inserts 7 for key 1 and returns; then
/// memory is available again, and a barrier message from A reaches B. B still serves 1000 (A's
/// insert was never announced) and a fresh instance reads 1000 from Redis.
#[test]
fn an_insert_refused_for_oom_is_not_announced_and_redis_keeps_the_older_value() {
    let _w = watchdog(LIMIT, "oom insert");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34o2";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(b.load(1).unwrap(), 1000);
    let mut conn = raw(&server);
    oom(&mut conn, true);
    a.insert(1, 7);
    assert_eq!(a.get(&1), Some(7));
    oom(&mut conn, false);
    barrier(&a, &b, 99);
    // What Redis holds for key 1 once OOM is over: not the older value (the backend, which
    // still says 1000, may be asked again: that is not Redis yielding an older value).
    let held = field(&mut conn, ns, 1, "d");
    let c = instance(tier(&server, ns), &backend);
    let loads_before = backend.loads.load(Ordering::SeqCst);
    let fresh = c.load(1).unwrap();
    let on_b = b.get(&1);
    assert_eq!(
        on_b, None,
        "B kept the older value after A's insert returned"
    );
    assert_eq!(held, None, "Redis still holds a value for key 1 ({held:?})");
    assert!(
        fresh != 1000 || backend.loads.load(Ordering::SeqCst) > loads_before,
        "Redis yields the older value after A's insert returned"
    );
}

/// Another program wrote key 1's hash with a non-integer version field (a stray write of the
/// right type). Unlike a key of another type, it is never repaired: A's insert and invalidate
/// are refused (`ERR`) and not announced, so B keeps its copy.
#[test]
fn a_stray_non_integer_version_field_silences_inserts_and_invalidations_of_the_key() {
    let _w = watchdog(LIMIT, "stray version field");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34h1";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(b.load(1).unwrap(), 1000);
    let mut conn = raw(&server);
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("v")
        .arg("not-a-version")
        .query::<()>(&mut conn)
        .unwrap();
    a.insert(1, 5);
    a.invalidate(&1);
    barrier(&a, &b, 99);
    let repaired = field(&mut conn, ns, 1, "v");
    let on_b = b.get(&1);
    assert_eq!(
        on_b, None,
        "B kept its copy: A's insert and invalidate of key 1 were never announced"
    );
    assert_ne!(
        repaired.as_deref(),
        Some("not-a-version"),
        "the next write did not repair the stray key"
    );
}

// ---------------------------------------------------------------------------------------------
// Findings: a value the codec cannot encode
// ---------------------------------------------------------------------------------------------

/// `Plain` for u64, except that 666 cannot be encoded.
#[derive(Clone, Copy)]
struct Picky;

impl Codec<u64> for Picky {
    fn encode(&self, value: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        if *value == 666 {
            return Err("injected: 666 cannot be encoded".into());
        }
        Plain.encode(value, out)
    }
    fn decode(&self, bytes: &[u8]) -> Result<u64, BoxError> {
        <Plain as Codec<u64>>::decode(&Plain, bytes)
    }
}

/// A loaded key 1 (1000, in Redis), B holds it. A inserts 666, which the value codec cannot
/// encode. Redis keeps 1000 and nobody is told: a fresh instance reads 1000 (an oversized value
/// leaves a tombstone instead).
#[test]
fn an_insert_of_an_unencodable_value_leaves_the_older_value_in_redis() {
    let _w = watchdog(LIMIT, "unencodable insert");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34c1";
    let make = |s: &RedisServer| {
        tier(s, ns)
            .build(builder(&backend, Duration::from_secs(600)), Picky)
            .expect("valid configuration")
    };
    let a = make(&server);
    let b = make(&server);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1000);
    assert_eq!(b.load(1).unwrap(), 1000);
    backend.set(1);
    a.insert(1, 666);
    assert_eq!(a.get(&1), Some(666));
    barrier(&a, &b, 99);
    let c = make(&server);
    assert_ne!(
        c.load(1).unwrap(),
        1000,
        "Redis yields the value A's insert replaced"
    );
    assert_eq!(b.get(&1), None, "B was not told of A's insert");
}

// ---------------------------------------------------------------------------------------------
// Findings: extreme durations
// ---------------------------------------------------------------------------------------------

/// `breaker(1, Duration::MAX)` ("skip Redis for good after one failure"): the first failure
/// makes the caller panic instead of answering from the loader.
#[test]
fn a_breaker_cooldown_of_duration_max_never_fails_a_request() {
    let _w = watchdog(LIMIT, "breaker MAX");
    common::quiet_injected_panics();
    let got = within(Duration::from_secs(30), || {
        let c: TieredCache<u64, u64> = RedisTier::new("redis://127.0.0.1:1/")
            .ttl(Duration::from_secs(60))
            .breaker(1, Duration::MAX)
            .build(Cache::builder().max_capacity(10), Plain)
            .unwrap();
        let first = c.get_with(1, || 10);
        let second = c.get_with(2, || 20);
        (first, second, c.is_breaker_open())
    })
    .expect("no hang");
    match got {
        Ok(r) => assert_eq!(r, (10, 20, true)),
        Err(p) => panic!(
            "a Redis failure failed the request: {}",
            common::panic_message(&*p)
        ),
    }
}

/// `RedisTier::ttl(Duration::MAX)` (values never expire in Redis): B holds key 1; A inserts 7;
/// a barrier from a third instance (the default time to live) reaches B afterwards: B still
/// serves its older value (A's insert was refused by `PEXPIRE` and never announced).
#[test]
fn a_tier_ttl_of_duration_max_still_announces_inserts() {
    let _w = watchdog(LIMIT, "tier ttl MAX");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34d1";
    let a = instance(tier(&server, ns).ttl(Duration::MAX), &backend);
    let b = instance(tier(&server, ns), &backend);
    let d = instance(tier(&server, ns), &backend);
    assert!(eventually(|| {
        a.is_subscribed() && b.is_subscribed() && d.is_subscribed()
    }));
    assert_eq!(b.load(1).unwrap(), 1000);
    a.insert(1, 7);
    barrier(&d, &b, 99);
    let mut conn = raw(&server);
    let in_redis = (field(&mut conn, ns, 1, "d"), field(&mut conn, ns, 1, "v"));
    let sent = a.stats().remote;
    assert_eq!(
        b.get(&1),
        None,
        "B kept 1000 after A's insert of 7 returned (Redis d, v: {in_redis:?}; A: {sent:?})"
    );
}

/// `lease(Duration::MAX, wait)` (a lease that lives until released): B holds key 1; A
/// invalidates key 1; a barrier reaches B afterwards: B still serves the invalidated value.
#[test]
fn a_lease_ttl_of_duration_max_still_announces_invalidations() {
    let _w = watchdog(LIMIT, "lease ttl MAX");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34d2";
    let a = instance(
        tier(&server, ns).lease(Duration::MAX, Duration::from_millis(200)),
        &backend,
    );
    let b = instance(tier(&server, ns), &backend);
    let d = instance(tier(&server, ns), &backend);
    assert!(eventually(|| {
        a.is_subscribed() && b.is_subscribed() && d.is_subscribed()
    }));
    assert_eq!(b.load(1).unwrap(), 1000);
    a.invalidate(&1);
    barrier(&d, &b, 99);
    let mut conn = raw(&server);
    let in_redis = (field(&mut conn, ns, 1, "d"), field(&mut conn, ns, 1, "v"));
    let sent = a.stats().remote;
    assert_eq!(
        b.get(&1),
        None,
        "B kept the value A invalidated (Redis d, v: {in_redis:?}; A: {sent:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Probes that pass: faults
// ---------------------------------------------------------------------------------------------

/// A frozen server (SIGSTOP): every verb answers within a bound of a few operation timeouts,
/// the breaker opens; after the server resumes it closes again; the local tier is consistent.
#[test]
fn a_frozen_server_bounds_every_verb_and_the_breaker_recovers() {
    let _w = watchdog(LIMIT, "frozen server");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34f1";
    let a = instance(
        RedisTier::new(server.url())
            .namespace(ns)
            .timeouts(Duration::from_millis(100), Duration::from_millis(100))
            .lease(Duration::from_secs(5), Duration::from_millis(300))
            .breaker(3, Duration::from_millis(300)),
        &backend,
    );
    assert_eq!(a.load(1).unwrap(), 1000);
    server.pause();
    // A generous bound: the lease wait plus a handful of operation timeouts, with room for a
    // loaded machine; a hang would be seconds or forever.
    let bound = Duration::from_secs(5);
    for step in 0..12u64 {
        let t = Instant::now();
        match step % 6 {
            0 => a.insert(step, step),
            1 => a.invalidate(&step),
            2 => assert_eq!(a.get_with(100 + step, || 7), 7),
            3 => assert_eq!(a.load(200 + step).unwrap(), (200 + step) * 1000),
            4 => a.invalidate_all(),
            _ => {
                let v = futures::executor::block_on(a.get_with_async(300 + step, async { 9 }));
                assert_eq!(v, 9);
            }
        }
        assert!(t.elapsed() < bound, "step {step} took {:?}", t.elapsed());
        a.validate();
    }
    assert!(a.stats().remote.breaker_opened >= 1);
    server.resume();
    assert!(
        eventually(|| {
            a.load(5000).ok();
            a.invalidate(&5000);
            !a.is_breaker_open()
        }),
        "the breaker closed after the server resumed"
    );
    a.validate();
}

/// A server restarted empty: an instance's insert after the restart reaches the other
/// instance (once its subscriber reconnected) and Redis; no older value comes back.
#[test]
fn after_a_restart_empty_writes_order_again() {
    let _w = watchdog(LIMIT, "restart empty");
    let mut server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34f2";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1000);
    assert_eq!(b.load(1).unwrap(), 1000);
    let (ca, cb) = (
        a.stats().remote.subscriber_connects,
        b.stats().remote.subscriber_connects,
    );
    server.restart();
    assert!(eventually(|| {
        a.stats().remote.subscriber_connects > ca && b.stats().remote.subscriber_connects > cb
    }));
    assert!(eventually(|| {
        a.load(77).ok();
        a.invalidate(&77);
        !a.is_breaker_open()
    }));
    backend.set(1);
    a.insert(1, 1001);
    barrier(&a, &b, 99);
    assert_eq!(b.get(&1), None);
    assert_eq!(b.load(1).unwrap(), 1001);
    let c = instance(tier(&server, ns), &backend);
    assert_eq!(c.load(1).unwrap(), 1001);
    a.validate();
    b.validate();
}

// ---------------------------------------------------------------------------------------------
// Probes: loads in flight racing writes, leases, a huge planted value
// ---------------------------------------------------------------------------------------------

/// A loader that, when armed, reports the version it read and waits for a release.
struct Gate {
    backend: Arc<Backend>,
    armed: std::sync::Mutex<Option<(std::sync::mpsc::Sender<u64>, std::sync::mpsc::Receiver<()>)>>,
}

impl Gate {
    fn new(backend: &Arc<Backend>) -> Arc<Gate> {
        Arc::new(Gate {
            backend: Arc::clone(backend),
            armed: std::sync::Mutex::new(None),
        })
    }
    fn load(&self, k: u64) -> u64 {
        let v = self.backend.load(k);
        let armed = self.armed.lock().unwrap().take();
        if let Some((read, release)) = armed {
            read.send(v).unwrap();
            release.recv().unwrap();
        }
        v
    }
    /// Holds the next load after it read the backend.
    fn hold_next(&self) -> (std::sync::mpsc::Receiver<u64>, std::sync::mpsc::Sender<()>) {
        let (rtx, rrx) = std::sync::mpsc::channel();
        let (ltx, lrx) = std::sync::mpsc::channel();
        *self.armed.lock().unwrap() = Some((rtx, lrx));
        (rrx, ltx)
    }
}

fn gated(tier: RedisTier, gate: &Arc<Gate>) -> TieredCache<u64, u64> {
    let g = Arc::clone(gate);
    tier.build(
        Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600))
            .record_stats()
            .loader(move |k: &u64| Ok::<_, BoxError>(g.load(*k))),
        Plain,
    )
    .expect("valid configuration")
}

/// A's load of key 1 read the backend (1000) and is held; the backend moves on and B inserts
/// 1001; B's message reaches A while A's load is still running; then A's load finishes. A must
/// not keep the older value: B's insert "tells the other instances to drop their copies", and
/// "a load of the key running anywhere in the fleet does not overwrite it".
#[test]
fn a_load_in_flight_when_another_instance_inserts_does_not_leave_the_older_value() {
    let _w = watchdog(LIMIT, "load in flight vs insert");
    let server = RedisServer::start();
    let backend = Backend::new();
    let gate = Gate::new(&backend);
    let ns = "s34r1";
    let a = gated(tier(&server, ns), &gate);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let (read, release) = gate.hold_next();
    let loader = {
        let a = a.clone();
        std::thread::spawn(move || a.load(1).unwrap())
    };
    assert_eq!(read.recv().unwrap(), 1000);
    backend.set(1);
    let before = received(&a);
    b.insert(1, 1001);
    assert!(eventually(|| received(&a) > before), "A got B's message");
    release.send(()).unwrap();
    assert_eq!(
        loader.join().unwrap(),
        1000,
        "A's caller gets what it loaded"
    );
    let c = instance(tier(&server, ns), &backend);
    assert_eq!(c.load(1).unwrap(), 1001, "Redis has B's value");
    assert_ne!(
        a.get(&1),
        Some(1000),
        "A keeps the value its load read before B's insert, after B's message reached it"
    );
    a.validate();
}

/// The same with leases, and a lease that expires while its holder's load runs: B takes the
/// lease over and loads the newer value; the old holder's write-back must not replace it.
#[test]
fn a_lease_that_expires_while_its_load_runs_does_not_let_the_older_value_win() {
    let _w = watchdog(LIMIT, "lease expires mid-load");
    let server = RedisServer::start();
    let backend = Backend::new();
    let gate = Gate::new(&backend);
    let ns = "s34l1";
    let leased =
        |s: &RedisServer| tier(s, ns).lease(Duration::from_millis(300), Duration::from_secs(10));
    let a = gated(leased(&server), &gate);
    let b = instance(leased(&server), &backend);
    let (read, release) = gate.hold_next();
    let loader = {
        let a = a.clone();
        std::thread::spawn(move || a.load(1).unwrap())
    };
    assert_eq!(read.recv().unwrap(), 1000);
    backend.set(1);
    // B waits on A's lease until it expires (300 ms), then takes it and loads 1001.
    assert_eq!(b.load(1).unwrap(), 1001);
    release.send(()).unwrap();
    assert_eq!(loader.join().unwrap(), 1000);
    let c = instance(leased(&server), &backend);
    assert_eq!(
        c.load(1).unwrap(),
        1001,
        "the expired holder's value won in Redis"
    );
    assert!(a.stats().remote.writes_superseded >= 1 || a.stats().remote.writes == 0);
}

/// A fleet mid-rollout: instance W allows large values (`max_value_size(usize::MAX)`, generous
/// timeouts) and inserts a 64 MiB value for key 5; instance R has the defaults. R's reads of
/// key 5 time out, and three of them open R's breaker for every key, though "a value larger
/// than `max_value_size`" is listed among what "concerns one key only" and "does not count
/// against the breaker".
#[test]
fn a_huge_value_in_redis_does_not_open_the_breaker_for_every_key() {
    let _w = watchdog(LIMIT, "huge value");
    let server = RedisServer::start();
    let ns = "s34b1";
    let bytes = |t: RedisTier| -> TieredCache<u64, Vec<u8>> {
        t.build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(600))
                .record_stats(),
            Plain,
        )
        .expect("valid configuration")
    };
    let w = bytes(
        RedisTier::new(server.url())
            .namespace(ns)
            .timeouts(Duration::from_secs(10), Duration::from_secs(10))
            .max_value_size(usize::MAX),
    );
    let r = bytes(RedisTier::new(server.url()).namespace(ns));
    w.insert(5, vec![7u8; 64 << 20]);
    assert_eq!(w.stats().remote.writes, 1, "W wrote the value to Redis");
    for _ in 0..3 {
        let got = r.get_with(5, || vec![1]);
        assert!(!got.is_empty());
        r.local().invalidate(&5);
    }
    let stats = r.stats().remote;
    assert!(
        !r.is_breaker_open(),
        "one huge key opened the breaker for every key: {stats:?}"
    );
}

/// A key codec whose `decode` panics for one key (user code, as the cache's `Hash`/`Clone`
/// hooks are): B invalidates that key; A's subscriber thread runs the decode. Afterwards A
/// must still apply B's invalidations of other keys (or say it is not subscribed).
#[test]
fn a_key_codec_panic_in_the_subscriber_does_not_silently_stop_invalidations() {
    let _w = watchdog(LIMIT, "subscriber codec panic");
    common::quiet_injected_panics();
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34k1";
    let make = |s: &RedisServer| {
        tier(s, ns)
            .build_with(builder(&backend, Duration::from_secs(600)), Touchy, Plain)
            .expect("valid configuration")
    };
    let a = make(&server);
    let b = make(&server);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1000);
    b.invalidate(&13);
    b.invalidate(&1);
    let dropped = eventually(|| a.get(&1).is_none());
    assert!(
        dropped || !a.is_subscribed(),
        "A kept key 1 after B invalidated it, and still says it is subscribed \
         (received: {})",
        received(&a)
    );
}

/// `Plain` for u64 keys, except that decoding key 13 panics.
#[derive(Clone, Copy)]
struct Touchy;

impl Codec<u64> for Touchy {
    fn encode(&self, value: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Plain.encode(value, out)
    }
    fn decode(&self, bytes: &[u8]) -> Result<u64, BoxError> {
        let k = <Plain as Codec<u64>>::decode(&Plain, bytes)?;
        assert!(k != 13, "injected: the key codec panics on 13");
        Ok(k)
    }
}

/// Fail-safe with the tier: A's copy of key 1 expired locally (kept for fail-safe); B
/// invalidates key 1; the backend goes down. A's load must fail: an invalidation "removes the
/// old value for good", so fail-safe must not answer with the value B invalidated.
#[test]
fn fail_safe_never_serves_a_value_another_instance_invalidated() {
    let _w = watchdog(LIMIT, "fail-safe vs invalidation");
    let server = RedisServer::start();
    let ns = "s34s1";
    let clock = herdcache::ManualClock::new();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = Arc::clone(&down);
    let a: TieredCache<u64, u64> = tier(&server, ns)
        .ttl(Duration::from_secs(600))
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(6000))
                .clock(clock.clone())
                .record_stats()
                .loader(move |k: &u64| {
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(k * 1000)
                    }
                }),
            Plain,
        )
        .unwrap();
    let backend = Backend::new();
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert_eq!(a.load(1).unwrap(), 1000);
    clock.advance(Duration::from_secs(61));
    let before = received(&a);
    b.invalidate(&1);
    assert!(eventually(|| received(&a) > before));
    down.store(true, Ordering::SeqCst);
    let got = a.load(1);
    assert!(
        got.is_err(),
        "fail-safe served an invalidated value: {got:?}"
    );
    a.validate();
}

/// A fleet of three instances with leases, slow loaders (0–3 ms) racing serialized writes
/// (inserts and invalidations, on every instance) of four hot keys. After the writes and a
/// barrier: Redis yields, for each key, the last write's value (or the backend's value after an
/// invalidation) to a fresh instance, and no instance holds an older value locally.
#[test]
fn fleet_history_converges_on_the_last_acknowledged_write() {
    let _w = watchdog(LIMIT, "fleet history");
    let server = RedisServer::start();
    let ns = "s34h2";
    // Per key: the backend's current value (`key * 1_000_000 + n`), raised by every write.
    let current: Arc<Vec<AtomicU64>> =
        Arc::new((0..4u64).map(|k| AtomicU64::new(k * 1_000_000)).collect());
    let make = || -> TieredCache<u64, u64> {
        let cur = Arc::clone(&current);
        let calls = Arc::new(AtomicU64::new(0));
        tier(&server, ns)
            .lease(Duration::from_secs(5), Duration::from_millis(50))
            .build(
                Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(600))
                    .record_stats()
                    .loader(move |k: &u64| {
                        let v = cur[*k as usize].load(Ordering::SeqCst);
                        let n = calls.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros((n * 7919) % 3000));
                        Ok::<_, BoxError>(v)
                    }),
                Plain,
            )
            .unwrap()
    };
    let fleet: Vec<TieredCache<u64, u64>> = (0..3).map(|_| make()).collect();
    assert!(eventually(|| fleet.iter().all(|c| c.is_subscribed())));
    let locks: Arc<Vec<std::sync::Mutex<()>>> =
        Arc::new((0..4).map(|_| std::sync::Mutex::new(())).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..2u64 {
        let (fleet, current, locks) = (fleet.clone(), Arc::clone(&current), Arc::clone(&locks));
        handles.push(std::thread::spawn(move || {
            let mut r = common::Rng(0x9E37 + t);
            for _ in 0..1500 {
                let k = r.next() % 4;
                let c = &fleet[(r.next() % 3) as usize];
                let _g = locks[k as usize].lock().unwrap();
                let v = current[k as usize].fetch_add(1, Ordering::SeqCst) + 1;
                if r.next() % 2 == 0 {
                    c.insert(k, v);
                } else {
                    c.invalidate(&k);
                }
            }
        }));
    }
    for t in 0..3u64 {
        let (fleet, stop) = (fleet.clone(), Arc::clone(&stop));
        handles.push(std::thread::spawn(move || {
            let mut r = common::Rng(0x51 + t);
            while !stop.load(Ordering::SeqCst) {
                let k = r.next() % 4;
                let c = &fleet[(r.next() % 3) as usize];
                if r.next() % 2 == 0 {
                    c.local().invalidate(&k); // force a load through Redis
                }
                let v = c.load(k).unwrap();
                assert_eq!(v / 1_000_000, k);
            }
        }));
    }
    let writers: Vec<_> = handles.drain(..2).collect();
    for h in writers {
        h.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    // Barrier: each instance's later invalidation reaches the two others.
    for (i, w) in fleet.iter().enumerate() {
        for (j, r) in fleet.iter().enumerate() {
            if i != j {
                barrier(w, r, 1000 + i as u64);
            }
        }
    }
    let fresh = make();
    for k in 0..4u64 {
        let last = current[k as usize].load(Ordering::SeqCst);
        for (i, c) in fleet.iter().enumerate() {
            let local = c.get(&k);
            assert!(
                local.is_none() || local == Some(last),
                "instance {i} holds {local:?} for key {k}, the last write was {last}"
            );
            c.validate();
        }
        assert_eq!(fresh.load(k).unwrap(), last, "Redis's value of key {k}");
    }
}

/// Negative caching with the tier: A remembers key 1's failed load (`negative_ttl`); B inserts
/// key 1. A's next load must read B's value from Redis, not answer with the remembered error
/// ("they read the new value from Redis on their next miss").
#[test]
fn another_instances_insert_clears_a_remembered_failure() {
    let _w = watchdog(LIMIT, "negative cache vs insert");
    let server = RedisServer::start();
    let ns = "s34n1";
    let a: TieredCache<u64, u64> = tier(&server, ns)
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(600))
                .negative_ttl(Duration::from_secs(600))
                .record_stats()
                .loader(|_k: &u64| Err::<u64, _>(BoxError::from("backend down"))),
            Plain,
        )
        .unwrap();
    let backend = Backend::new();
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    assert!(a.load(1).is_err());
    assert!(a.load(1).is_err(), "remembered");
    let before = received(&a);
    b.insert(1, 42);
    assert!(eventually(|| received(&a) > before));
    let got = a.load(1);
    assert_eq!(got.ok(), Some(42), "A answered with its remembered failure");
}

/// A copy read from Redis by an async load on a multi-threaded runtime expires locally no
/// later than the copy in Redis (the tier's time to live 1 s, the local one 600 s).
#[test]
fn an_async_copy_read_from_redis_does_not_outlive_the_one_in_redis() {
    let _w = watchdog(LIMIT, "async copy lifetime");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34t1";
    let short = || tier(&server, ns).ttl(Duration::from_secs(1));
    let w = instance(short(), &backend);
    let r: Arc<TieredCache<u64, u64>> = Arc::new(
        short()
            .build(
                Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(600))
                    .async_loader(|k: &u64| {
                        let k = *k;
                        async move { Ok::<_, BoxError>(k * 1000) }
                    }),
                Plain,
            )
            .unwrap(),
    );
    w.insert(1, 7);
    w.insert(2, 8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let r2 = Arc::clone(&r);
    let (one, two) = rt.block_on(async move {
        let a = tokio::spawn({
            let r = Arc::clone(&r2);
            async move { r.get_with_async(1, async { 99 }).await }
        });
        let b = tokio::spawn({
            let r = Arc::clone(&r2);
            async move { r.load_async(2).await.ok() }
        });
        (a.await.unwrap(), b.await.unwrap())
    });
    assert_eq!((one, two), (7, Some(8)));
    let mut conn = raw(&server);
    assert!(eventually(
        || !exists(&mut conn, &vkey(ns, 1)) && !exists(&mut conn, &vkey(ns, 2))
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.get(&1), None, "the async get_with copy outlived Redis's");
    assert_eq!(r.get(&2), None, "the load_async copy outlived Redis's");
}

/// `invalidate_all` while Redis refuses writes for memory (`OOM`, a per-key refusal that spares
/// the breaker): the invalidating instance then reads back from Redis the values it has just
/// invalidated.
#[test]
fn an_invalidate_all_refused_for_oom_is_read_back_by_the_invalidating_instance() {
    let _w = watchdog(LIMIT, "oom invalidate_all");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s34o3";
    let a = instance(tier(&server, ns), &backend);
    assert_eq!(a.load(1).unwrap(), 1000);
    let mut conn = raw(&server);
    oom(&mut conn, true);
    backend.set(1);
    a.invalidate_all();
    assert_eq!(a.entry_count(), 0);
    let got = a.load(1).unwrap();
    assert!(!a.is_breaker_open(), "OOM is a per-key refusal");
    assert_eq!(got, 1001, "A read back a value it had just invalidated");
}
