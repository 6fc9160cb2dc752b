//! Round 37: an outside attack on the changes of round 34 to the Redis tier — versions that
//! follow the server's clock (`max(old + 1, TIME in µs)`, computed in Lua doubles), the
//! fallback of a refused write (`DEL` and an unversioned message), the READ script that leaves
//! a value above the reader's `max_value_size` in Redis, and a subscriber that survives user
//! code panicking.
//!
//! Findings (failing when written), against the module docs' guarantee "after `insert`,
//! `invalidate`, `remove` or `invalidate_all` returns on any instance, Redis never again
//! yields an older value for the key" and "What concerns one key only does not count against
//! the breaker":
//! - a version field at or beyond 2^53 stops advancing (Lua doubles: `old + 1 == old`), so a
//!   load's write-back that read that version overwrites a later insert;
//! - after the server's clock went back (simulated: a version field ahead of the clock) and
//!   the key expired, an instance ignores newer writes of a key it wrote;
//! - an insert or `invalidate_all` refused for OOM (`DEL`, epoch not advanced) lets a load of
//!   an absent key that was in flight write its older value back once memory is available;
//! - a version or epoch field (or epoch key) that is not an unsigned integer makes every read
//!   of the key a breaker failure;
//! - with leases, a key of another type makes the load take the lease, fail the read in the
//!   same pipeline, leave the lease behind and never repair the key.
//!
//! Fixed with this file (all but the clock one): a version that is not a version (beyond
//! 2^53, negative, fractional, not a number) counts as 0 and is replaced; a load superseded by
//! a write or invalidation (local, or announced by another instance — as a refused write's
//! unversioned message is) is not written back to Redis; version and epoch fields are parsed
//! leniently (a stray one is a matter of its key, never a breaker failure); the READ script
//! reads a key of another type as absent (no pipeline error, so the lease taken with it is
//! used and released, and the write-back repairs the key). The clock test stays ignored: the
//! docs state the limit (a server clock that goes back by more than a key's lifetime).
//!
//! Each test starts its own `redis-server` on a free loopback port.
#![cfg(feature = "redis")]
#![cfg(not(any(loom, shuttle)))]

mod common;
use common::tier::{raw, vkey};
use herdcache_testkit::redis_server;

use common::{eventually, start, watchdog};
use herdcache::codec::{Codec, Plain};
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, RemovalCause};
use redis_server::RedisServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

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
    fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }
}

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
}

fn builder(backend: &Arc<Backend>) -> herdcache::CacheBuilder<u64, u64> {
    let b = Arc::clone(backend);
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(600))
        .record_stats()
        .loader(move |k: &u64| Ok::<_, BoxError>(b.load(*k)))
}

fn instance(tier: RedisTier, backend: &Arc<Backend>) -> TieredCache<u64, u64> {
    tier.build(builder(backend), Plain)
        .expect("valid configuration")
}

fn lkey(ns: &str, k: u64) -> String {
    format!("hc:{}:{ns}:l{{{k}}}", ns.len())
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

fn hset(conn: &mut redis::Connection, ns: &str, k: u64, fields: &[(&str, &str)]) {
    let mut c = redis::cmd("HSET");
    c.arg(vkey(ns, k));
    for (f, v) in fields {
        c.arg(*f).arg(*v);
    }
    c.query::<()>(conn).unwrap();
}

/// The server's clock in microseconds (`TIME`).
fn server_micros(conn: &mut redis::Connection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(conn).unwrap();
    s * 1_000_000 + us
}

fn received<V: Clone + Send + Sync + 'static>(c: &TieredCache<u64, V>) -> u64 {
    c.stats().remote.invalidations_received
}

/// `writer` invalidates `barrier_key` and waits until `reader` has applied that message: every
/// message `writer`'s earlier calls published has then been applied by `reader` too.
fn barrier<V: Clone + Send + Sync + 'static>(
    writer: &TieredCache<u64, V>,
    reader: &TieredCache<u64, V>,
    barrier_key: u64,
) {
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

/// A load of `key` on `cache` that reads Redis, then blocks in its `init` until released;
/// returns once `init` has been entered (Redis was read), and the handle that releases it
/// (returning `value`) and collects the result.
struct Blocked {
    release: mpsc::Sender<()>,
    done: common::Started<u64>,
}

fn blocked_load(cache: &TieredCache<u64, u64>, key: u64, value: u64) -> Blocked {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let c = cache.clone();
    let done = start(move || {
        c.get_with(key, move || {
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            value
        })
    });
    entered_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the load reached its init");
    Blocked { release, done }
}

impl Blocked {
    fn finish(self) -> u64 {
        self.release.send(()).unwrap();
        self.done
            .wait(Duration::from_secs(30))
            .expect("the load finished")
            .expect("the load did not panic")
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Version ordering
// ---------------------------------------------------------------------------------------------

/// A version field at 2^53 + 1 (a stray write, or a server clock far ahead): Lua doubles cannot
/// add 1 to 2^53, so from then on every write of the key gets the same version 2^53. A load
/// on B reads the tombstone (version 2^53) and blocks; A inserts 7 (version still 2^53); B's
/// load ends and its write-back finds "its" version unchanged, so it stores the value it
/// loaded before A's insert: a fresh instance reads the older value from Redis.
#[test]
fn a_version_beyond_2_pow_53_stops_advancing_and_a_write_back_overwrites_a_later_insert() {
    let _w = watchdog(LIMIT, "version 2^53");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37v53";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    hset(&mut conn, ns, 1, &[("v", "9007199254740993")]);
    a.invalidate(&1);
    let v1 = field(&mut conn, ns, 1, "v");
    let load = blocked_load(&b, 1, 1000);
    a.insert(1, 7);
    let v2 = field(&mut conn, ns, 1, "v");
    assert_eq!(load.finish(), 1000);
    let c = instance(tier(&server, ns), &backend);
    let in_redis = field(&mut conn, ns, 1, "d");
    assert_eq!(
        c.get_with(1, || 9999),
        7,
        "Redis yields the value B loaded before A's insert returned \
         (versions: after invalidate {v1:?}, after insert {v2:?}; d = {in_redis:?})"
    );
}

/// The same precision loss seen directly: two writes of a key whose version is at 2^53 must
/// leave two different, increasing versions.
#[test]
fn writes_of_a_key_at_version_2_pow_53_advance_its_version() {
    let _w = watchdog(LIMIT, "version 2^53 advances");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37v53b";
    let a = instance(tier(&server, ns), &backend);
    let mut conn = raw(&server);
    hset(&mut conn, ns, 1, &[("v", "9007199254740992")]);
    a.insert(1, 5);
    let v1: u128 = field(&mut conn, ns, 1, "v").unwrap().parse().unwrap();
    a.insert(1, 6);
    let v2: u128 = field(&mut conn, ns, 1, "v").unwrap().parse().unwrap();
    // Fixed by documentation and code (`next_version!`): a version at or beyond 2^53, where
    // Lua's numbers stop counting by one, is a stray write, counted as 0 and replaced; the
    // versions then advance.
    assert!(
        v2 > v1 && v1 < 9_007_199_254_740_992,
        "versions did not advance: 2^53 -> {v1} -> {v2}"
    );
}

/// The server's clock was an hour ahead when B inserted key 1 (simulated: the key's version
/// field one hour past the server's clock), then corrected. The key's hash expires in Redis;
/// A inserts 20: its version (the server's clock) is below the version B remembers for its own
/// write, so B ignores A's message and keeps serving its older value after the barrier.
#[test]
#[ignore = "open (documented): versions follow the server's clock; one that goes back by more than a key's lifetime in Redis (or a stray version in the future) can make an instance ignore a newer write of a key it wrote"]
fn after_the_server_clock_went_back_an_instance_ignores_newer_writes_of_a_key_it_wrote() {
    let _w = watchdog(LIMIT, "clock back");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37clk";
    let short = |s: &RedisServer| tier(s, ns).ttl(Duration::from_millis(300));
    let a = instance(short(&server), &backend);
    let b = instance(short(&server), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    let ahead = server_micros(&mut conn) + 3_600_000_000;
    hset(&mut conn, ns, 1, &[("v", &ahead.to_string())]);
    b.insert(1, 10);
    assert_eq!(b.get(&1), Some(10));
    assert!(
        eventually(|| !exists(&mut conn, &vkey(ns, 1))),
        "the key expired in Redis"
    );
    a.insert(1, 20);
    barrier(&a, &b, 99);
    assert_eq!(
        b.get(&1),
        None,
        "B still serves 10 after A's insert of 20 was delivered to it"
    );
}

/// Data of the previous scheme (versions 1, 2, 3 from `HINCRBY`): a load on B that read the
/// old tombstone (version 3) must not write back over A's insert (a time-based version), and
/// a copy B read at version 2 must go on A's message.
#[test]
fn old_small_versions_meet_time_based_writes() {
    let _w = watchdog(LIMIT, "old versions");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37old";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    hset(&mut conn, ns, 1, &[("v", "3")]);
    hset(&mut conn, ns, 2, &[("v", "2"), ("d", "2000")]);
    assert_eq!(b.get_with(2, || 9), 2000, "B reads the old-scheme value");
    let load = blocked_load(&b, 1, 1000);
    a.insert(1, 7);
    a.insert(2, 8);
    assert_eq!(load.finish(), 1000);
    barrier(&a, &b, 99);
    assert_eq!(b.get(&2), None, "B kept the old-scheme copy of key 2");
    let c = instance(tier(&server, ns), &backend);
    assert_eq!(c.get_with(1, || 9999), 7, "B's write-back beat A's insert");
    assert_eq!(c.get_with(2, || 9999), 8);
    let v: u64 = field(&mut conn, ns, 1, "v").unwrap().parse().unwrap();
    assert!(
        v > 1_000_000_000_000_000,
        "the version follows the clock: {v}"
    );
}

/// An unversioned message (A's insert refused under OOM) reaching B after B's own newer
/// insert: B may drop its copy, but must then read its own value back from Redis, not the
/// backend's older one.
#[test]
fn an_unversioned_message_after_an_own_newer_write_costs_only_a_reread() {
    let _w = watchdog(LIMIT, "unversioned vs own");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37zero";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    oom(&mut conn, true);
    a.insert(1, 5);
    oom(&mut conn, false);
    b.insert(1, 6);
    barrier(&a, &b, 99);
    let loads = backend.loads();
    assert_eq!(b.load(1).unwrap(), 6, "B lost its own newer insert");
    assert_eq!(backend.loads(), loads, "B's value was in Redis");
}

/// Version (and epoch) fields another program wrote that are not unsigned integers (`-3`,
/// `1.5`, `1e20`, beyond u64, text): reading such a key is a per-key matter (the docs: "What
/// concerns one key only does not count against the breaker"; "A version field that is not a
/// number (a stray write) counts as 0 and is replaced"), so one read of it must not open a
/// breaker that opens after one failure (every key then skips Redis).
#[test]
fn stray_version_fields_never_open_the_breaker_on_reads() {
    let _w = watchdog(LIMIT, "stray version reads");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37stray";
    let mut conn = raw(&server);
    let strays = [
        ("v", "-3"),
        ("v", "1.5"),
        ("v", "1e20"),
        ("v", "18446744073709551616"),
        ("v", "not-a-version"),
        ("e", "-1"),
    ];
    let mut opened = Vec::new();
    for (i, (f, v)) in strays.iter().enumerate() {
        let k = i as u64 + 1;
        hset(&mut conn, ns, k, &[(f, v), ("d", "5")]);
        let a = instance(
            tier(&server, ns).breaker(1, Duration::from_secs(600)),
            &backend,
        );
        let got = a.load(k).unwrap();
        if a.is_breaker_open() {
            opened.push(format!("{f} = {v:?} (read {got}, {:?})", a.stats().remote));
        }
    }
    assert!(
        opened.is_empty(),
        "reading one key opened the breaker for every key: {opened:#?}"
    );
}

/// Stray version fields (`1e20`, `u64::MAX`, negative): the next insert must still be
/// readable by every instance (or Redis must hold nothing older), and be announced.
#[test]
fn inserts_over_extreme_version_fields_are_announced_and_never_yield_the_older_value() {
    let _w = watchdog(LIMIT, "extreme versions insert");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37ext";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    let strays = [
        "1e20",
        "18446744073709551615",
        "9223372036854775807",
        "-7",
        "1.5",
    ];
    for (i, v) in strays.iter().enumerate() {
        let k = i as u64 + 1;
        hset(&mut conn, ns, k, &[("v", v)]);
        assert_eq!(b.get_with(k, || 100 + k), 100 + k);
        hset(&mut conn, ns, k, &[("d", &(100 + k).to_string())]);
    }
    for (i, _) in strays.iter().enumerate() {
        let k = i as u64 + 1;
        a.insert(k, 500 + k);
    }
    barrier(&a, &b, 99);
    let c = instance(tier(&server, ns), &backend);
    for (i, v) in strays.iter().enumerate() {
        let k = i as u64 + 1;
        assert_eq!(b.get(&k), None, "v = {v}: B kept its copy after A's insert");
        let got = c.get_with(k, || 9999);
        assert_ne!(
            got,
            100 + k,
            "v = {v}: Redis yields the value A's insert replaced"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The OOM fallback
// ---------------------------------------------------------------------------------------------

/// B's load of key 1 (absent from Redis) reads Redis and runs. Redis is out of memory; A
/// inserts 7: refused, so the key is deleted (it was absent: nothing changes) and an
/// unversioned message sent. Memory comes back; B's load ends and writes back the value it
/// loaded before A's insert: its write-back finds the version it read (none) unchanged. A
/// fresh instance then reads that older value from Redis, after A's insert returned.
#[test]
fn after_an_insert_refused_for_oom_a_load_in_flight_writes_back_the_older_value() {
    let _w = watchdog(LIMIT, "oom insert vs load");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37oi";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    let load = blocked_load(&b, 1, 1000);
    oom(&mut conn, true);
    a.insert(1, 7);
    oom(&mut conn, false);
    // Within the pub/sub delivery time (the documented bound), B hears the refused
    // write's message while its load still runs.
    assert!(eventually(|| received(&b) >= 1), "B heard A's message");
    assert_eq!(load.finish(), 1000);
    let in_redis = field(&mut conn, ns, 1, "d");
    let c = instance(tier(&server, ns), &backend);
    let got = c.get_with(1, || 9999);
    assert_ne!(
        got, 1000,
        "Redis yields the value loaded before A's insert (d = {in_redis:?})"
    );
}

/// The contrast: the same race when key 1 holds a tombstone (a version) instead of nothing.
/// The refused insert deletes it, so B's write-back no longer finds the version it read and
/// is superseded.
#[test]
fn after_an_insert_refused_for_oom_a_load_that_read_a_tombstone_does_not_write_back() {
    let _w = watchdog(LIMIT, "oom insert vs load of a tombstone");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37ot";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    a.invalidate(&1);
    assert!(field(&mut conn, ns, 1, "v").is_some(), "a tombstone");
    let load = blocked_load(&b, 1, 1000);
    oom(&mut conn, true);
    a.insert(1, 7);
    oom(&mut conn, false);
    // Within the pub/sub delivery time (the documented bound), B hears the refused
    // write's message while its load still runs.
    assert!(eventually(|| received(&b) >= 1), "B heard A's message");
    assert_eq!(load.finish(), 1000);
    assert_eq!(field(&mut conn, ns, 1, "d"), None, "B's write-back landed");
    // Superseded: by A's announcement before it ended (not written back at all), or in Redis.
    assert_eq!(b.stats().remote.writes, 0);
}

/// The same with `invalidate_all` under OOM: the epoch cannot be advanced, so a load of an
/// absent key that began before it writes its value back afterwards and the fleet reads it.
#[test]
fn after_invalidate_all_refused_for_oom_a_load_in_flight_writes_back_the_older_value() {
    let _w = watchdog(LIMIT, "oom invalidate_all vs load");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37oa";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    let load = blocked_load(&b, 1, 1000);
    oom(&mut conn, true);
    a.invalidate_all();
    oom(&mut conn, false);
    // Within the pub/sub delivery time (the documented bound), B hears the refused
    // write's message while its load still runs.
    assert!(eventually(|| received(&b) >= 1), "B heard A's message");
    assert_eq!(load.finish(), 1000);
    let in_redis = field(&mut conn, ns, 1, "d");
    let c = instance(tier(&server, ns), &backend);
    let got = c.get_with(1, || 9999);
    assert_ne!(
        got, 1000,
        "Redis yields a value loaded before invalidate_all returned (d = {in_redis:?})"
    );
}

/// `invalidate_all` under OOM with more keys than one `SCAN` batch: every value is deleted,
/// every other instance drops every copy, and nothing older is read back after OOM ends.
#[test]
fn invalidate_all_under_oom_deletes_every_key_across_scan_batches() {
    let _w = watchdog(LIMIT, "oom invalidate_all many");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37many";
    let a = instance(tier(&server, ns), &backend);
    let b = instance(tier(&server, ns), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    const N: u64 = 3000;
    for k in 0..N {
        assert_eq!(b.load(k).unwrap(), k * 1000);
    }
    let mut conn = raw(&server);
    oom(&mut conn, true);
    backend.set(1);
    let before = received(&b);
    a.invalidate_all();
    assert!(eventually(|| received(&b) > before), "B got the message");
    oom(&mut conn, false);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("hc:{}:{ns}:v*", ns.len()))
        .query(&mut conn)
        .unwrap();
    assert!(left.is_empty(), "{} values left in Redis", left.len());
    for k in (0..N).step_by(97) {
        assert_eq!(b.get(&k), None, "B kept key {k}");
        assert_eq!(a.load(k).unwrap(), k * 1000 + 1, "key {k}");
    }
}

/// B holds the lease of key 1 and is loading when A's insert is refused for OOM (the lease is
/// deleted with the value): B's write-back must not store its older value once memory is back.
#[test]
fn a_lease_holder_loading_during_a_refused_insert_does_not_write_back() {
    let _w = watchdog(LIMIT, "oom vs lease");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37ol";
    let leased =
        |s: &RedisServer| tier(s, ns).lease(Duration::from_secs(30), Duration::from_millis(200));
    let a = instance(leased(&server), &backend);
    let b = instance(leased(&server), &backend);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let mut conn = raw(&server);
    let load = blocked_load(&b, 1, 1000);
    assert!(exists(&mut conn, &lkey(ns, 1)), "B holds the lease");
    oom(&mut conn, true);
    a.insert(1, 7);
    assert!(!exists(&mut conn, &lkey(ns, 1)), "the lease was revoked");
    oom(&mut conn, false);
    // Within the pub/sub delivery time (the documented bound), B hears the refused
    // write's message while its load still runs.
    assert!(eventually(|| received(&b) >= 1), "B heard A's message");
    assert_eq!(load.finish(), 1000);
    assert_eq!(field(&mut conn, ns, 1, "d"), None, "B's write-back landed");
}

// ---------------------------------------------------------------------------------------------
// 3. The READ script
// ---------------------------------------------------------------------------------------------

fn string_instance(
    server: &RedisServer,
    ns: &str,
    max: usize,
    loads: &Arc<AtomicU64>,
) -> TieredCache<u64, String> {
    let l = Arc::clone(loads);
    tier(server, ns)
        .max_value_size(max)
        .build(
            Cache::builder()
                .max_capacity(1000)
                .time_to_live(Duration::from_secs(600))
                .loader(move |k: &u64| {
                    l.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>(format!("L{k}"))
                }),
            Plain,
        )
        .expect("valid configuration")
}

/// Values at exactly a reader's `max_value_size` are read; one byte over are not (counted as
/// oversized, loaded); with a maximum of 0 an empty value is read; with `usize::MAX` anything.
#[test]
fn read_limits_at_the_boundaries() {
    let _w = watchdog(LIMIT, "read boundaries");
    let server = RedisServer::start();
    let ns = "s37rb";
    let loads = Arc::new(AtomicU64::new(0));
    let writer = string_instance(&server, ns, usize::MAX, &loads);
    writer.insert(1, "x".repeat(10));
    writer.insert(2, "x".repeat(11));
    writer.insert(3, String::new());
    writer.insert(4, "y".repeat(100_000));
    let r10 = string_instance(&server, ns, 10, &loads);
    let before = loads.load(Ordering::SeqCst);
    assert_eq!(
        r10.load(1).unwrap(),
        "x".repeat(10),
        "exactly at the maximum"
    );
    assert_eq!(r10.stats().remote.oversized, 0);
    assert_eq!(loads.load(Ordering::SeqCst), before);
    assert_eq!(r10.load(2).unwrap(), "L2", "one byte over: loaded");
    assert_eq!(r10.stats().remote.oversized, 1);
    assert_eq!(r10.stats().remote.errors, 0);
    let r0 = string_instance(&server, ns, 0, &loads);
    let before = loads.load(Ordering::SeqCst);
    assert_eq!(
        r0.load(3).unwrap(),
        "",
        "an empty value under a maximum of 0"
    );
    assert_eq!(loads.load(Ordering::SeqCst), before);
    assert_eq!(r0.stats().remote.oversized, 0);
    let rmax = string_instance(&server, ns, usize::MAX, &loads);
    assert_eq!(rmax.load(4).unwrap(), "y".repeat(100_000));
    assert_eq!(loads.load(Ordering::SeqCst), before);
    assert!(!r0.is_breaker_open() && !r10.is_breaker_open() && !rmax.is_breaker_open());
}

/// A key of another type, and a tombstone (`v` without `d`): read as absent, loaded, not
/// oversized, not a breaker failure; the write-back repairs the key of another type.
#[test]
fn read_of_a_key_of_another_type_and_of_a_tombstone() {
    let _w = watchdog(LIMIT, "read other type");
    let server = RedisServer::start();
    let ns = "s37rt";
    let loads = Arc::new(AtomicU64::new(0));
    let r = string_instance(&server, ns, 10, &loads);
    let mut conn = raw(&server);
    redis::cmd("SET")
        .arg(vkey(ns, 1))
        .arg("abc")
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("RPUSH")
        .arg(vkey(ns, 2))
        .arg("abc")
        .query::<()>(&mut conn)
        .unwrap();
    hset(&mut conn, ns, 3, &[("v", "5")]);
    for _ in 0..4 {
        for k in 1..=3 {
            r.invalidate(&k);
            let _ = r.load(k);
        }
    }
    assert!(!r.is_breaker_open());
    let st = r.stats().remote;
    assert_eq!(st.oversized, 0, "{st:?}");
    let r2 = string_instance(&server, ns, 10, &loads);
    let before = loads.load(Ordering::SeqCst);
    for k in 1..=2 {
        r.invalidate(&k);
        assert_eq!(r.load(k).unwrap(), format!("L{k}"));
        assert_eq!(r2.load(k).unwrap(), format!("L{k}"));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        before + 2,
        "the write-backs repaired the keys of another type"
    );
}

/// A fleet with different maxima: A (no limit) inserts 20 bytes; B (10) does not read it
/// (oversized), loads and writes its own value back over it, as the docs say; C (no limit)
/// then reads B's value, and A's later insert is again seen by everyone.
#[test]
fn a_fleet_with_different_maxima() {
    let _w = watchdog(LIMIT, "mixed maxima");
    let server = RedisServer::start();
    let ns = "s37mm";
    let loads = Arc::new(AtomicU64::new(0));
    let a = string_instance(&server, ns, usize::MAX, &loads);
    let b = string_instance(&server, ns, 10, &loads);
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    a.insert(1, "z".repeat(20));
    // B hears A's insert before it loads: a message arriving while B's load runs supersedes
    // that load (not stored, not written back), and B's write-back is what this checks.
    barrier(&a, &b, 98);
    assert_eq!(b.load(1).unwrap(), "L1");
    assert_eq!(b.stats().remote.oversized, 1);
    assert_eq!(b.stats().remote.writes, 1, "B wrote its own value back");
    let c = string_instance(&server, ns, usize::MAX, &loads);
    assert_eq!(c.load(1).unwrap(), "L1");
    a.insert(1, "new".into());
    barrier(&a, &b, 99);
    assert_eq!(b.get(&1), None);
    assert_eq!(b.load(1).unwrap(), "new");
    assert_eq!(b.stats().remote.oversized, 1);
}

// ---------------------------------------------------------------------------------------------
// 4. The subscriber
// ---------------------------------------------------------------------------------------------

/// `Plain` for u64 keys, except that decoding 13 fails and decoding 666 panics.
#[derive(Clone, Copy)]
struct HostileKeys;

impl Codec<u64> for HostileKeys {
    fn encode(&self, value: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Plain.encode(value, out)
    }
    fn decode(&self, bytes: &[u8]) -> Result<u64, BoxError> {
        let k = <Plain as Codec<u64>>::decode(&Plain, bytes)?;
        match k {
            13 => Err("injected: 13 cannot be decoded".into()),
            666 => panic!("injected: decoding 666"),
            k => Ok(k),
        }
    }
}

/// B's key codec fails for 13 and panics for 666. Invalidations of 13 and 666 drop every copy
/// on B (the docs: a key it cannot decode could be any key); every later invalidation is
/// applied, and B stays subscribed.
#[test]
fn a_hostile_key_codec_does_not_stop_later_invalidations() {
    let _w = watchdog(LIMIT, "hostile key codec");
    common::quiet_injected_panics();
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37kc";
    let a = instance(tier(&server, ns), &backend);
    let b = tier(&server, ns)
        .build_with(builder(&backend), HostileKeys, Plain)
        .expect("valid configuration");
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    for round in 0..5u64 {
        for k in 1..=5 {
            b.load(k).unwrap();
            assert!(b.get(&k).is_some());
        }
        let bad = if round % 2 == 0 { 666 } else { 13 };
        a.invalidate(&bad);
        barrier(&a, &b, 99);
        for k in 1..=5 {
            assert_eq!(b.get(&k), None, "round {round}: B kept key {k}");
        }
        assert!(b.is_subscribed());
    }
    for k in 1..=5 {
        b.load(k).unwrap();
    }
    a.insert(3, 77);
    barrier(&a, &b, 99);
    assert_eq!(b.get(&3), None, "an ordinary invalidation after the panics");
    assert!(b.get(&1).is_some());
    assert!(b.is_subscribed());
}

/// B's eviction listener panics on every explicit removal of key 1. A invalidates key 1, then
/// key 2, then everything: B applies all three (the panicking removal still removes, as the
/// docs of `eviction_listener` say), and stays subscribed.
#[test]
fn a_panicking_eviction_listener_does_not_stop_invalidations() {
    let _w = watchdog(LIMIT, "panicking listener");
    common::quiet_injected_panics();
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37el";
    let a = instance(tier(&server, ns), &backend);
    let b = tier(&server, ns)
        .build(
            builder(&backend).eviction_listener(|k: &u64, _v: &u64, cause| {
                if *k == 1 && cause == RemovalCause::Explicit {
                    panic!("injected: listener on key 1");
                }
            }),
            Plain,
        )
        .expect("valid configuration");
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    for k in 1..=50 {
        b.load(k).unwrap();
    }
    a.invalidate(&1);
    barrier(&a, &b, 99);
    assert_eq!(b.get(&1), None, "B kept key 1");
    assert!(b.is_subscribed());
    b.load(1).unwrap();
    a.invalidate(&2);
    barrier(&a, &b, 98);
    assert_eq!(b.get(&2), None, "B kept key 2");
    let before = received(&b);
    a.invalidate_all();
    assert!(eventually(
        || received(&b) > before || b.stats().remote.errors > 0
    ));
    barrier(&a, &b, 97);
    for k in 1..=50 {
        assert_eq!(b.get(&k), None, "B kept key {k} after invalidate_all");
    }
    assert!(b.is_subscribed());
}

/// A panic payload whose drop panics again (with another such payload), `depth` times.
struct Bomb(u32);

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 < 2 {
            std::panic::panic_any(Bomb(self.0 + 1));
        }
    }
}

/// `Plain` for u64 keys, except that decoding 666 panics with a [`Bomb`].
#[derive(Clone, Copy)]
struct BombKeys;

impl Codec<u64> for BombKeys {
    fn encode(&self, value: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Plain.encode(value, out)
    }
    fn decode(&self, bytes: &[u8]) -> Result<u64, BoxError> {
        let k = <Plain as Codec<u64>>::decode(&Plain, bytes)?;
        if k == 666 {
            std::panic::panic_any(Bomb(0));
        }
        Ok(k)
    }
}

/// B's key codec panics, for key 666, with a payload whose drop panics again (twice). After A
/// invalidates 666, either B goes on applying A's invalidations, or `is_subscribed()` says it
/// no longer hears them — not "subscribed" while deaf.
#[test]
fn a_key_codec_panic_whose_payload_panics_on_drop_leaves_is_subscribed_truthful() {
    let _w = watchdog(LIMIT, "bomb payload");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37bomb";
    let a = instance(tier(&server, ns), &backend);
    let b = tier(&server, ns)
        .build_with(builder(&backend), BombKeys, Plain)
        .expect("valid configuration");
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    a.invalidate(&666);
    // B has heard 666 (its codec panicked: an error counted) before it loads key 1: otherwise
    // the `invalidate_all` that follows an undecodable key could drop key 1 and pass the test
    // whatever became of the subscriber (stop 52's CI run caught that race the other way).
    assert!(eventually(|| b.stats().remote.errors >= 1));
    b.load(1).unwrap();
    a.invalidate(&1);
    let applied = eventually(|| b.get(&1).is_none() || !b.is_subscribed());
    assert!(
        applied,
        "B says it is subscribed ({}) but did not apply A's invalidation of key 1 ({:?})",
        b.is_subscribed(),
        b.stats().remote
    );
}

/// With leases, a key of another type in Redis (the docs: "a per-key error: it does not count
/// against the circuit breaker, and the next write of the key replaces it"): a load must not
/// leave the lease it took behind, and its write-back repairs the key.
#[test]
fn with_leases_a_key_of_another_type_is_repaired_and_leaves_no_lease() {
    let _w = watchdog(LIMIT, "other type with leases");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37lt";
    let a = instance(
        tier(&server, ns).lease(Duration::from_secs(60), Duration::from_millis(100)),
        &backend,
    );
    let mut conn = raw(&server);
    redis::cmd("SET")
        .arg(vkey(ns, 1))
        .arg("abc")
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(a.load(1).unwrap(), 1000);
    let lease_left = exists(&mut conn, &lkey(ns, 1));
    let kind: String = redis::cmd("TYPE")
        .arg(vkey(ns, 1))
        .query(&mut conn)
        .unwrap();
    assert!(
        !lease_left && kind == "hash",
        "lease left behind: {lease_left}; key type after the load: {kind} ({:?})",
        a.stats().remote
    );
}

/// Another program wrote the namespace's epoch key as text: `invalidate_all`'s `INCR` is
/// refused (a per-key error, the new fallback deletes the values instead); reads of every key
/// must not count against the breaker.
#[test]
fn a_stray_epoch_key_does_not_open_the_breaker() {
    let _w = watchdog(LIMIT, "stray epoch");
    let server = RedisServer::start();
    let backend = Backend::new();
    let ns = "s37ep";
    let a = instance(
        tier(&server, ns).breaker(1, Duration::from_secs(600)),
        &backend,
    );
    let mut conn = raw(&server);
    redis::cmd("SET")
        .arg(format!("hc:{}:{ns}:epoch", ns.len()))
        .arg("stray")
        .query::<()>(&mut conn)
        .unwrap();
    a.invalidate_all();
    let _ = a.load(1);
    assert!(!a.is_breaker_open(), "{:?}", a.stats().remote);
}
