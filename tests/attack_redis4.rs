#![cfg(feature = "redis")]
//! Round 79 of the outside attacks (a helper given the public API only): the Redis tier's
//! write ordering against stray data, fail-safe, forgotten versions, reconnects and a
//! refusing server, with an instance that never hears messages (a Redis user without channel
//! permissions: a deterministic stand-in for messages lost in transit). Seven `bug_*` tests
//! failed; six were bugs, now fixed:
//!
//! * a counter left in Redis that the Lua scripts could not count with (the epoch beyond 2^53,
//!   a key's version just below it) went *back*: the scripts read it as 0, where loads had
//!   read it as a number, so a load from before an `invalidate_all` outlived it, and an
//!   instance ignored a newer write's message. Counters are now valid only up to 2^41 µs
//!   ahead of the server's clock (far below 2^53), and a read's `EPOCH` replaces an epoch that
//!   is not one, so every script sees the same;
//! * an epoch key of another type failed every read of the namespace, and `invalidate_all`
//!   did not replace it: both scripts now repair it;
//! * with fail-safe, a tombstone lived the tier's time to live only, while a copy from
//!   before it may be served up to the cache's time to live plus `max_stale`: tombstones now
//!   live that long;
//! * after 4,096 other keys, an instance counted a tombstone at or below the newest version
//!   it forgot as heard (the floor that is conservative for an insert's check is not for a
//!   tombstone's): fail-safe served the invalidated copy. A forgotten key's tombstone now
//!   counts as missed;
//! * the subscriber's clear on reconnect (and on a key it cannot decode) did not count as an
//!   invalidate-all for an `insert` in flight, whose local copy then outlived it.
//!
//! The seventh — a load that found its key absent before a write the server refused
//! (`OOM`: the key deleted instead, no version), on an instance that missed the message,
//! writes its value back — is now a documented bound of the guarantee; the test here checks
//! the half that must hold (an instance that hears the message writes nothing back).

mod common;
use common::tier::*;
#[path = "common/proxy.rs"]
mod proxy;
use herdcache_testkit::redis_server::RedisServer;

use common::{eventually, Gate};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, ManualClock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Garbage numbers in Redis: the Lua scripts and the Rust side disagree about 2^53
// ---------------------------------------------------------------------------------------

/// src/redis/mod.rs: "The guarantee: **after `insert`, `invalidate`, `remove` or
/// `invalidate_all` returns on any instance, Redis never again yields an older value for the
/// key**" and "`invalidate_all` first advances the namespace's epoch (values written back by
/// loads that read an older epoch are ignored)"; scripts.rs: a stored counter "beyond 2^53
/// ... counts as 0 and is replaced".
///
/// An epoch left in Redis beyond 2^53 (a stray write) is read by loads as a valid number
/// (the Rust side parses any u64), but `NEXT_EPOCH` treats it as 0 and sets the clock: the
/// epoch goes *back*. A load that read the stray epoch before `invalidate_all`, of a key
/// absent then (so not tombstoned by its SCAN), writes back a value stamped with the stray
/// epoch, which every later read takes as newer than the invalidate-all.
#[test]
fn bug_stray_epoch_beyond_2p53_lets_a_load_from_before_invalidate_all_survive_it() {
    let _w = common::watchdog(Duration::from_secs(30), "stray epoch");
    let server = RedisServer::start();
    let ns = "se1";
    let mut c = raw(&server);
    redis::cmd("SET")
        .arg(epoch_key(ns))
        .arg("99999999999999999")
        .query::<()>(&mut c)
        .unwrap();
    // C never hears messages (lost in transit); B writes.
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let cdeaf = build(tier(deaf_url(&server), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    assert!(eventually(|| b.is_subscribed()));
    let c2 = cdeaf.clone();
    let load = std::thread::spawn(move || {
        c2.get_with(1, move || {
            g.pass();
            "before-invalidate-all".to_string()
        })
    });
    gate.wait_entered();
    b.invalidate_all();
    gate.open();
    assert_eq!(load.join().unwrap(), "before-invalidate-all");
    // A fresh read anywhere in the fleet after invalidate_all returned.
    let fresh = build(tier(server.url(), ns), builder());
    let v = fresh.get_with(1, || "fresh".to_string());
    let in_redis = rvalue(&mut c, ns, 1);
    let epoch: String = redis::cmd("GET").arg(epoch_key(ns)).query(&mut c).unwrap();
    assert_eq!(
        v, "fresh",
        "Redis yielded a value loaded before invalidate_all returned (redis d={in_redis:?}, \
         epoch now {epoch})"
    );
}

/// src/redis/mod.rs: "Messages carry the version: an instance ignores one older than its own
/// write of that key" — which is safe only if versions never go back; "Every `insert` and
/// `invalidate` advances a per-key version". A version field left near 2^53 (a stray write
/// of a hash of the right type) advances past 2^53 once, and the next write's script treats
/// the stored number as "not a counter" and restarts from the clock: the version goes back,
/// and the instance that wrote at the high version ignores the newer write's message forever
/// (until its local time to live), serving its older value while Redis has the newer one.
#[test]
fn bug_version_near_2p53_goes_back_and_an_instance_ignores_a_newer_write() {
    let _w = common::watchdog(Duration::from_secs(30), "version wrap");
    let server = RedisServer::start();
    let ns = "vw1";
    let mut c = raw(&server);
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("v")
        .arg("9007199254740990")
        .query::<()>(&mut c)
        .unwrap();
    let a = build(tier(server.url(), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    a.insert(1, "a1".into());
    a.insert(1, "a2".into());
    let before = a.stats().remote.invalidations_received;
    b.insert(1, "b".into());
    // A marker on another key: messages are delivered in order, so once A applied it, it has
    // seen B's message about key 1.
    b.insert(2, "marker".into());
    assert!(eventually(
        || a.stats().remote.invalidations_received > before
    ));
    let v: String = redis::cmd("HGET")
        .arg(vkey(ns, 1))
        .arg("v")
        .query(&mut c)
        .unwrap();
    assert_eq!(rvalue(&mut c, ns, 1).as_deref(), Some("b"));
    assert_eq!(
        a.get(&1).as_deref(),
        None,
        "A still serves its older write after B's newer insert was announced (Redis has b, \
         version now {v})"
    );
}

/// src/redis/mod.rs: "A key of another type found there (an older layout, a stray write) is
/// a per-key error: it does not count against the circuit breaker, and the next write of the
/// key replaces it." A stray write of the namespace's epoch key with another type is never
/// replaced, not even by `invalidate_all` (which writes that key): every read of every key of
/// the namespace fails from then on, and the second tier is off for good.
#[test]
fn bug_stray_epoch_of_another_type_disables_the_tier_even_after_invalidate_all() {
    let _w = common::watchdog(Duration::from_secs(30), "epoch wrong type");
    let server = RedisServer::start();
    let ns = "ew1";
    let mut c = raw(&server);
    redis::cmd("RPUSH")
        .arg(epoch_key(ns))
        .arg("junk")
        .query::<()>(&mut c)
        .unwrap();
    let a = build(tier(server.url(), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    // The next write of the key: invalidate_all writes the epoch.
    a.invalidate_all();
    assert_eq!(a.get_with(1, || "a".to_string()), "a");
    let v = b.get_with(1, || "b".to_string());
    let ty: String = redis::cmd("TYPE").arg(epoch_key(ns)).query(&mut c).unwrap();
    assert!(!b.is_breaker_open());
    assert_eq!(
        v,
        "a",
        "B did not read A's value from Redis (epoch key type still {ty}, remote stats {:?})",
        b.stats().remote
    );
}

// ---------------------------------------------------------------------------------------
// Fail-safe and a missed invalidation whose tombstone is gone
// ---------------------------------------------------------------------------------------

/// src/redis/mod.rs: "With fail_safe a local copy is kept past its time to live, and a failed
/// load of it may serve it up to `max_stale` longer. A missed invalidation of the key does not
/// let that happen: the failed load's read of Redis finds the key's tombstone, and the load's
/// callers get its error." (Unlike for `invalidate_all`, no "only while its tombstones last".)
///
/// The tombstone lives the tier's time to live (here the default: the cache's 60 s), fail-safe
/// serves for 600 s past the local deadline: once the tombstone has expired (simulated by
/// expiring it at once, Redis's clock cannot be moved), the failed load serves the value the
/// fleet invalidated.
#[test]
fn bug_fail_safe_serves_a_missed_invalidation_once_its_tombstone_expired() {
    let _w = common::watchdog(Duration::from_secs(60), "fail-safe tombstone expiry");
    let server = RedisServer::start();
    let ns = "fs1";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let fs = |clock: &ManualClock| {
        let (d, n) = (Arc::clone(&down), Arc::clone(&calls));
        Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("v{k}-{i}"))
                }
            })
    };
    // A never hears B's message (deaf: lost in transit); the tier's time to live is the
    // cache's (60 s), the default.
    let t = |url: String| {
        RedisTier::new(url)
            .namespace(ns)
            .timeouts(Duration::from_millis(300), Duration::from_millis(300))
    };
    let a = t(deaf_url(&server)).build(fs(&clock), Plain).unwrap();
    let b = t(server.url()).build(fs(&clock), Plain).unwrap();
    let old = a.load(1).unwrap();
    b.invalidate(&1);
    assert_eq!(
        a.get(&1).as_deref(),
        Some(old.as_str()),
        "missed: kept until its TTL"
    );
    // 70 s later in the fleet: A's copy expired locally (60 s), the tombstone (60 s) in Redis.
    clock.advance(Duration::from_secs(70));
    // The tombstone outlives every moment fail-safe could serve A's copy: the copy's time to
    // live (60 s) plus `max_stale` (600 s) from the invalidation. (Redis's clock cannot be
    // moved: its time left is what can be checked; before the fix it was the tier's 60 s,
    // and once it had expired the failed load below served the invalidated value.)
    let mut c = raw(&server);
    let pttl: i64 = redis::cmd("PTTL").arg(vkey(ns, 1)).query(&mut c).unwrap();
    assert!(
        pttl > 650_000 && pttl <= 660_000,
        "the tombstone lives the cache's time to live plus max_stale: {pttl} ms"
    );
    down.store(true, Ordering::SeqCst);
    let r = a.load(1);
    assert!(
        r.is_err(),
        "A served the value B invalidated (its message lost) as fail-safe's last value: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Probes that held
// ---------------------------------------------------------------------------------------

/// A deaf instance's load that read before a FLUSHALL and writes back after the fleet's
/// invalidate_all: the new epoch is above the one it read, its value is ignored.
#[test]
fn holds_flushall_then_invalidate_all_ignores_a_deaf_instances_late_write_back() {
    let _w = common::watchdog(Duration::from_secs(30), "flushall epoch");
    let server = RedisServer::start();
    let ns = "fa1";
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let cdeaf = build(tier(deaf_url(&server), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    let c2 = cdeaf.clone();
    let load = std::thread::spawn(move || {
        c2.get_with(1, move || {
            g.pass();
            "old".to_string()
        })
    });
    gate.wait_entered();
    let mut c = raw(&server);
    redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
    // FLUSHALL dropped the ACL user? No: ACL users survive FLUSHALL.
    b.invalidate_all();
    gate.open();
    assert_eq!(load.join().unwrap(), "old");
    let fresh = build(tier(server.url(), ns), builder());
    assert_eq!(fresh.get_with(1, || "fresh".to_string()), "fresh");
    assert_eq!(cdeaf.stats().loads_in_flight, 0);
}

/// src/redis/mod.rs: "`RedisTier::clear_on_reconnect` bounds this by the disconnection
/// instead". A load in flight across the disconnection (it read Redis before another
/// instance's insert whose message was lost) must not land a copy after the reconnect's clear.
#[test]
fn holds_clear_on_reconnect_drops_a_load_in_flight_across_the_disconnection() {
    let _w = common::watchdog(Duration::from_secs(30), "reconnect in-flight");
    let server = RedisServer::start();
    let px = proxy::Proxy::start(server.port);
    let ns = "cr1";
    let a = build(tier(px.url(), ns).clear_on_reconnect(true), builder());
    let b = build(tier(server.url(), ns), builder());
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    let connects = a.stats().remote.subscriber_connects;
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let a2 = a.clone();
    let load = std::thread::spawn(move || {
        a2.get_with(1, move || {
            g.pass();
            "old".to_string()
        })
    });
    gate.wait_entered();
    px.black_hole_open_connections();
    b.insert(1, "new".into());
    assert!(eventually(|| a.stats().remote.subscriber_connects
        > connects
        && a.is_subscribed()));
    gate.open();
    assert_eq!(load.join().unwrap(), "old");
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    assert_ne!(
        a.get(&1).as_deref(),
        Some("old"),
        "a copy from before the reconnect landed"
    );
    let mut c = raw(&server);
    assert_eq!(rvalue(&mut c, ns, 1).as_deref(), Some("new"));
}

/// A refresh (refresh_after) in flight across a lost `invalidate` message of another
/// instance: its write-back is refused by the version, and it must not reach Redis.
#[test]
fn holds_deaf_refresh_after_invalidate_does_not_resurrect_in_redis() {
    let _w = common::watchdog(Duration::from_secs(30), "deaf refresh");
    let server = RedisServer::start();
    let ns = "dr1";
    let clock = ManualClock::new();
    let gate = Gate::new();
    let gated = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let (g, gd, n2) = (Arc::clone(&gate), Arc::clone(&gated), Arc::clone(&n));
    let a = build(
        tier(deaf_url(&server), ns),
        builder()
            .clock(clock.clone())
            .refresh_after(Duration::from_secs(10))
            .loader(move |k: &u64| {
                let i = n2.fetch_add(1, Ordering::SeqCst);
                if gd.load(Ordering::SeqCst) {
                    g.pass();
                }
                Ok::<_, BoxError>(format!("a{k}-{i}"))
            }),
    );
    let b = build(tier(server.url(), ns), builder());
    assert_eq!(a.load(1).unwrap(), "a1-0");
    clock.advance(Duration::from_secs(11));
    // Redis's clock does not move with the manual one: age the copy there by 20 s.
    let mut c = raw(&server);
    redis::cmd("PEXPIRE")
        .arg(vkey(ns, 1))
        .arg(580_000)
        .query::<()>(&mut c)
        .unwrap();
    gated.store(true, Ordering::SeqCst);
    let a2 = a.clone();
    // The read that triggers the refresh runs it in the reader (no spawner).
    let reader = std::thread::spawn(move || a2.load(1).unwrap());
    gate.wait_entered();
    b.invalidate(&1);
    gate.open();
    let _ = reader.join().unwrap();
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    assert_eq!(
        rvalue(&mut c, ns, 1),
        None,
        "the refresh's value reached Redis"
    );
    assert_eq!(b.get_with(1, || "b".to_string()), "b");
}

// ---------------------------------------------------------------------------------------
// An insert in flight across a reconnect (clear_on_reconnect)
// ---------------------------------------------------------------------------------------

/// A key whose `Hash` blocks on a gate when called on a thread named "inserter" while armed:
/// it holds an `insert` between its Redis write and its local copy.
#[derive(Clone, PartialEq, Eq, Debug)]
struct SlowKey(u64);

static HOLD: Mutex<Option<Arc<Gate>>> = Mutex::new(None);

impl std::hash::Hash for SlowKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        if std::thread::current().name() == Some("inserter") {
            let g = HOLD.lock().unwrap().clone();
            if let Some(g) = g {
                g.pass();
            }
        }
        self.0.hash(h);
    }
}

#[derive(Clone)]
struct SlowKeyCodec;

impl herdcache::codec::Codec<SlowKey> for SlowKeyCodec {
    fn encode(&self, k: &SlowKey, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(k.0.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<SlowKey, BoxError> {
        Ok(SlowKey(std::str::from_utf8(bytes)?.parse()?))
    }
}

/// src/redis/mod.rs: "`RedisTier::clear_on_reconnect` bounds this by the disconnection
/// instead" and "an `insert` whose local copy lands after a newer write or invalidation of the
/// key (announced by another instance, or done on this one) or after an `invalidate_all` ...
/// drops it, so concurrent writers converge on Redis's value"; tier.rs `clear_on_reconnect`:
/// "Clears the local tier whenever the subscriber reconnects, since invalidations sent while
/// it was disconnected are lost".
///
/// A's insert wrote Redis, then its subscriber lost its connection; B invalidated the key (a
/// newer version; the message lost for A); A reconnected and cleared its local tier; then A's
/// insert's local copy landed. The reconnect's clear is not counted as an invalidate-all by
/// the insert's check (a load in flight across it is dropped: see
/// `holds_clear_on_reconnect_drops_a_load_in_flight_across_the_disconnection`), so A keeps
/// serving the value the fleet invalidated, with no bound but its local time to live.
#[test]
fn bug_insert_in_flight_across_a_reconnect_survives_clear_on_reconnect() {
    let _w = common::watchdog(Duration::from_secs(30), "insert across reconnect");
    let server = RedisServer::start();
    let px = proxy::Proxy::start(server.port);
    let ns = "ir1";
    let b = || {
        Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(600))
            .record_stats()
    };
    let t = |url: String| {
        RedisTier::new(url)
            .namespace(ns)
            .timeouts(Duration::from_millis(300), Duration::from_millis(300))
    };
    let a: TieredCache<SlowKey, String> = t(px.url())
        .clear_on_reconnect(true)
        .build_with(b(), SlowKeyCodec, Plain)
        .unwrap();
    let bb: TieredCache<SlowKey, String> = t(server.url())
        .build_with(b(), SlowKeyCodec, Plain)
        .unwrap();
    assert!(eventually(|| a.is_subscribed() && bb.is_subscribed()));
    // A message applied after a subscription means its clear (which comes first) is done.
    let heard = |a: &TieredCache<SlowKey, String>, bb: &TieredCache<SlowKey, String>, k| {
        let before = a.stats().remote.invalidations_received;
        bb.insert(SlowKey(k), "m".into());
        assert!(eventually(
            || a.stats().remote.invalidations_received > before
        ));
    };
    heard(&a, &bb, 50);
    a.local().insert(SlowKey(99), "sentinel".into());
    let connects = a.stats().remote.subscriber_connects;
    let gate = Gate::new();
    *HOLD.lock().unwrap() = Some(Arc::clone(&gate));
    let a2 = a.clone();
    let ins = std::thread::Builder::new()
        .name("inserter".into())
        .spawn(move || a2.insert(SlowKey(1), "X".into()))
        .unwrap();
    gate.wait_entered(); // Redis written and announced; the local copy not yet
    px.black_hole_open_connections();
    bb.invalidate(&SlowKey(1)); // newer; A's subscriber is dead: lost for A
    assert!(
        eventually(|| a.stats().remote.subscriber_connects > connects && a.is_subscribed()),
        "A never reconnected"
    );
    heard(&a, &bb, 51);
    assert_eq!(
        a.get(&SlowKey(99)),
        None,
        "the reconnect cleared the local tier"
    );
    gate.open();
    ins.join().unwrap();
    *HOLD.lock().unwrap() = None;
    let mut c = raw(&server);
    let d: Option<String> = redis::cmd("HGET")
        .arg(vkey(ns, 1))
        .arg("d")
        .query(&mut c)
        .unwrap();
    assert_eq!(d, None, "B's invalidation is the newest in Redis");
    assert_eq!(
        a.get(&SlowKey(1)),
        None,
        "A serves the value B invalidated after A reconnected and cleared"
    );
}

/// src/redis/mod.rs: "A missed invalidation of the key does not let that happen: the failed
/// load's read of Redis finds the key's tombstone, and the load's callers get its error." and
/// "An instance remembers the versions of its 4,096 most recent keys; for the others it keeps
/// the newest version it forgot, so a write at or below it still counts as possibly
/// superseded (its local copy is dropped: at worst a miss)".
///
/// The forgotten-versions floor is used the other way round for a tombstone read by a
/// fail-safe load: a missed tombstone at or below the floor counts as *heard*, so after the
/// instance wrote 4,097 other keys (its own writes, all newer than the tombstone), the failed
/// load serves the invalidated value although its read found the tombstone (which here is
/// still in Redis).
#[test]
fn bug_fail_safe_serves_a_missed_invalidation_after_4096_other_keys_were_written() {
    let _w = common::watchdog(Duration::from_secs(120), "fail-safe floor");
    let server = RedisServer::start();
    let ns = "ff1";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let t = |url: String| {
        RedisTier::new(url)
            .namespace(ns)
            .ttl(Duration::from_secs(600))
            .timeouts(Duration::from_millis(300), Duration::from_millis(300))
            // The deaf user may not PUBLISH either (NOPERM counts against the breaker).
            .breaker(1_000_000, Duration::from_millis(1))
    };
    let a = t(deaf_url(&server))
        .build(
            Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(600))
                .refresh_backoff(Duration::from_secs(5))
                .clock(clock.clone())
                .loader(move |k: &u64| {
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(format!("v{k}"))
                    }
                }),
            Plain,
        )
        .unwrap();
    let b = build(t(server.url()), builder());
    assert_eq!(a.load(1).unwrap(), "v1");
    b.invalidate(&1); // lost for A
    for k in 1_000..1_000 + 4_097u64 {
        a.insert(k, "other".into());
    }
    assert!(!a.is_breaker_open());
    clock.advance(Duration::from_secs(61));
    down.store(true, Ordering::SeqCst);
    let mut c = raw(&server);
    let tomb: Option<String> = redis::cmd("HGET")
        .arg(vkey(ns, 1))
        .arg("v")
        .query(&mut c)
        .unwrap();
    assert!(
        tomb.is_some() && rvalue(&mut c, ns, 1).is_none(),
        "the tombstone is there"
    );
    let r = a.load(1);
    assert!(
        r.is_err(),
        "A served the value B invalidated (its tombstone in Redis) as fail-safe's last value: {r:?}"
    );
}

/// Control for the test above: with fewer than 4,096 other keys the tombstone is seen.
#[test]
fn holds_fail_safe_sees_a_missed_tombstone_with_few_other_keys() {
    let _w = common::watchdog(Duration::from_secs(60), "fail-safe floor control");
    let server = RedisServer::start();
    let ns = "ff2";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let t = |url: String| {
        RedisTier::new(url)
            .namespace(ns)
            .ttl(Duration::from_secs(600))
            .timeouts(Duration::from_millis(300), Duration::from_millis(300))
            .breaker(1_000_000, Duration::from_millis(1))
    };
    let a = t(deaf_url(&server))
        .build(
            Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(600))
                .clock(clock.clone())
                .loader(move |k: &u64| {
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(format!("v{k}"))
                    }
                }),
            Plain,
        )
        .unwrap();
    let b = build(t(server.url()), builder());
    assert_eq!(a.load(1).unwrap(), "v1");
    b.invalidate(&1);
    for k in 1_000..1_100u64 {
        a.insert(k, "other".into());
    }
    clock.advance(Duration::from_secs(61));
    down.store(true, Ordering::SeqCst);
    assert!(a.load(1).is_err());
}

/// Control for the stray-epoch test: the same history with a sane epoch holds.
#[test]
fn holds_deaf_load_spanning_invalidate_all_is_ignored_by_later_reads() {
    let _w = common::watchdog(Duration::from_secs(30), "deaf invalidate_all");
    let server = RedisServer::start();
    let ns = "se2";
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let cdeaf = build(tier(deaf_url(&server), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    let c2 = cdeaf.clone();
    let load = std::thread::spawn(move || {
        c2.get_with(1, move || {
            g.pass();
            "before-invalidate-all".to_string()
        })
    });
    gate.wait_entered();
    b.invalidate_all();
    gate.open();
    assert_eq!(load.join().unwrap(), "before-invalidate-all");
    let fresh = build(tier(server.url(), ns), builder());
    assert_eq!(fresh.get_with(1, || "fresh".to_string()), "fresh");
}

/// src/redis/mod.rs: "`OOM`: an `insert` or `invalidate` the server refuses deletes the key's
/// value instead, and still tells the other instances". The helper's version of this test
/// made the loading instance deaf (its message lost): its load, which read the key absent
/// before the refused write deleted it, then wrote its older value back — a refused write
/// carries no version. That is now documented as a bound of the guarantee (src/redis/mod.rs,
/// "A write the server refuses (`OOM`) …"). What must hold is the message: an instance that
/// hears it does not write its load back.
#[test]
fn holds_a_refused_oom_invalidation_stops_a_load_on_an_instance_that_hears_it() {
    let _w = common::watchdog(Duration::from_secs(30), "oom refused invalidate");
    let server = RedisServer::start();
    let ns = "oo1";
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let a = build(tier(server.url(), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    assert!(eventually(|| a.stats().remote.subscriber_connects >= 1));
    let a2 = a.clone();
    let load = std::thread::spawn(move || {
        a2.get_with(1, move || {
            g.pass();
            "before-invalidate".to_string()
        })
    });
    gate.wait_entered();
    let mut c = raw(&server);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query::<()>(&mut c)
        .unwrap();
    b.invalidate(&1); // refused (OOM): the key is deleted instead, the message sent
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query::<()>(&mut c)
        .unwrap();
    assert_eq!(
        b.stats().remote.key_errors,
        1,
        "the invalidation was refused"
    );
    assert!(eventually(|| a.stats().remote.invalidations_received >= 1));
    gate.open();
    assert_eq!(load.join().unwrap(), "before-invalidate");
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    let fresh = build(tier(server.url(), ns), builder());
    let v = fresh.get_with(1, || "fresh".to_string());
    assert_eq!(
        v,
        "fresh",
        "a superseded load wrote back ({:?})",
        a.stats().remote
    );
}
