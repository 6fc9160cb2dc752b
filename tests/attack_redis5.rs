#![cfg(feature = "redis")]
//! Round 81 of the outside attacks (a helper given the public API only): the Redis tier after
//! round 79's fixes (tests/attack_redis4.rs) — the counter rule, fail-safe's tombstone
//! lifetime, forgotten versions, clears counted as invalidate-alls — and what that round did
//! not reach. Nine `bug_*` tests failed; four were bugs, now fixed:
//!
//! * a refresh that read a tombstone its instance had missed and then failed kept the copy
//!   (as it should) but remembered the tombstone as heard, so the load after the time to live
//!   served the invalidated copy through fail-safe: a tombstone read is now remembered apart
//!   from one heard (an own write, an announced one), and still counts as missed;
//! * a soft timeout's fallback (and callers arriving while the load ran) served the copy
//!   whose tombstone the running load had just read: they now check the load's
//!   `forgoes_fallback` as the load's own failure does;
//! * a stray version beyond the horizon (10^17, `u64::MAX`) was a number to the Rust side,
//!   remembered: it hid later tombstones from fail-safe and dropped the instance's own
//!   inserts' copies. `READ` (and `WRITE_BACK`'s check) now see a version as the scripts
//!   count it: one that is not a counter reads as none.
//!
//! Five are documented bounds now (src/redis/mod.rs), their tests removed or turned into the
//! half that holds: a missed write of a *value* (an `insert`, a write-back over a tombstone)
//! is seen by fail-safe only while that value lives in Redis; an `invalidate_all` whose
//! `SCAN` Redis stops answering partway leaves the inserted values it did not reach readable;
//! a counter ahead of the server's clock (a stray write, or the clock stepped back) is counted
//! on, and the order can go back by that lead once its key is lost.

mod common;
use common::tier::*;
#[path = "common/proxy.rs"]
mod proxy;
use herdcache_testkit::redis_server::RedisServer;

use common::{eventually, Gate};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, ManualClock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Fail-safe and a missed invalidation
// ---------------------------------------------------------------------------------------

/// src/redis/mod.rs: "A missed invalidation of the key does not let that happen: the failed
/// load's read of Redis finds the key's tombstone, and the load's callers get its error".
///
/// With `refresh_after`, a refresh of A's copy (A missed B's invalidation) reads Redis, finds
/// the tombstone and remembers its version as read; the refresh fails (backend down) and the
/// copy stays (it is within its time to live). Once the copy expires, the failed load's read
/// finds the same tombstone — but it now counts as heard, and fail-safe serves the value B
/// invalidated.
#[test]
fn bug_failed_refresh_that_saw_the_tombstone_lets_fail_safe_serve_the_invalidated_copy() {
    let _w = common::watchdog(Duration::from_secs(30), "refresh then fail-safe");
    let server = RedisServer::start();
    let ns = "h81rf";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let a = fs_tier(deaf_url(&server), ns)
        .build(
            fail_safe_builder(&clock, &down, "a").refresh_after(Duration::from_secs(10)),
            Plain,
        )
        .unwrap();
    let up = Arc::new(AtomicBool::new(false));
    let b = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    let old = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    clock.advance(Duration::from_secs(11));
    down.store(true, Ordering::SeqCst);
    // A read past refresh_after: the refresh runs in the reader (no spawner) and fails.
    let during = a.load(1);
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    clock.advance(Duration::from_secs(60)); // 71 s: the copy is past its time to live
    let mut c = raw(&server);
    assert!(rvalue(&mut c, ns, 1).is_none() && rversion(&mut c, ns, 1).is_some());
    assert!(
        pttl(&mut c, &vkey(ns, 1)) > 600_000,
        "the tombstone is there"
    );
    let r = a.load(1);
    assert!(
        r.is_err(),
        "A served {old:?}, which B invalidated (tombstone in Redis), as fail-safe's last value: \
         {r:?} (the read during the refresh answered {during:?}; stats {:?})",
        a.stats()
    );
}

/// Control: the same history without the refresh in between holds.
#[test]
fn holds_fail_safe_sees_a_missed_tombstone_without_refresh() {
    let _w = common::watchdog(Duration::from_secs(30), "fail-safe control");
    let server = RedisServer::start();
    let ns = "h81rc";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let a = fs_tier(deaf_url(&server), ns)
        .build(fail_safe_builder(&clock, &down, "a"), Plain)
        .unwrap();
    let b = build(fs_tier(server.url(), ns), builder());
    a.load(1).unwrap();
    b.invalidate(&1);
    clock.advance(Duration::from_secs(71));
    down.store(true, Ordering::SeqCst);
    assert!(a.load(1).is_err());
    // And again (the copy went with the first failure).
    assert!(a.load(1).is_err());
}

/// src/redis/mod.rs: "A missed invalidation of the key does not let that happen: the failed
/// load's read of Redis finds the key's tombstone, and the load's callers get its error
/// (tombstones then live at least the longer of the cache's and the tier's time to live plus
/// `max_stale`, so that the tombstone is still there ...)".
///
/// After B's invalidation, C (which heard it) loads the key and writes its value back over the
/// tombstone: the hash then lives the tier's time to live (60 s), not the tombstone's 660 s.
/// The helper's test expired C's value in Redis: A (which missed the invalidation) then found
/// nothing, and fail-safe served the copy B invalidated — now a documented bound (src/redis/
/// mod.rs: "A missed *write* of a value … is seen only while that value lives in Redis").
/// What must hold while it lives: A's failed load answers with C's value.
#[test]
fn holds_a_missed_invalidation_written_over_answers_the_newer_value_while_it_lives() {
    let _w = common::watchdog(Duration::from_secs(30), "write-back over tombstone");
    let server = RedisServer::start();
    let ns = "h81wb";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let up = Arc::new(AtomicBool::new(false));
    let a = fs_tier(deaf_url(&server), ns)
        .build(fail_safe_builder(&clock, &down, "a"), Plain)
        .unwrap();
    let b = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    let cc = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "c"), Plain)
        .unwrap();
    let old = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    let mut c = raw(&server);
    let tomb = pttl(&mut c, &vkey(ns, 1));
    assert!(tomb > 600_000, "the tombstone lives 660 s: {tomb}");
    assert_eq!(cc.load(1).unwrap(), "c1-0"); // the fleet moves on: C loads and writes back
    let left = pttl(&mut c, &vkey(ns, 1));
    clock.advance(Duration::from_secs(70));
    down.store(true, Ordering::SeqCst);
    let r = a.load(1);
    assert_eq!(
        r.as_deref().ok(),
        Some("c1-0"),
        "A answered {r:?} (its copy {old:?}; C's value had {left} ms to live, the tombstone {tomb})"
    );
}

/// src/redis/mod.rs: "**Invalidation across instances.** `invalidate`, `remove`, `insert` and
/// `invalidate_all` update Redis and publish on the namespace's channel" and "A missed
/// invalidation of the key does not let that happen".
///
/// B's `insert` (its message lost for A) writes a value that lives the tier's time to live
/// (60 s). The helper's test expired it in Redis: A's failed load then found nothing and
/// fail-safe served A's copy, older than B's insert — now a documented bound (src/redis/mod.rs:
/// "A missed *write* of a value … is seen only while that value lives in Redis"). What must
/// hold while it lives: A's failed load answers with B's value.
#[test]
fn holds_a_missed_insert_answers_its_value_while_it_lives_in_redis() {
    let _w = common::watchdog(Duration::from_secs(30), "missed insert fail-safe");
    let server = RedisServer::start();
    let ns = "h81mi";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let up = Arc::new(AtomicBool::new(false));
    let a = fs_tier(deaf_url(&server), ns)
        .build(fail_safe_builder(&clock, &down, "a"), Plain)
        .unwrap();
    let b = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    let old = a.load(1).unwrap();
    b.insert(1, "newer".into()); // lost for A
    let mut c = raw(&server);
    let left = pttl(&mut c, &vkey(ns, 1));
    clock.advance(Duration::from_secs(70));
    down.store(true, Ordering::SeqCst);
    let r = a.load(1);
    assert_eq!(
        r.as_deref().ok(),
        Some("newer"),
        "A answered {r:?} (its copy {old:?}; B's value had {left} ms to live in Redis)"
    );
}

// ---------------------------------------------------------------------------------------
// Stray counters: what Rust remembers and what the scripts count with
// ---------------------------------------------------------------------------------------

/// scripts.rs: a stored counter "more than 2^41 µs (25 days) ahead of the clock — counts as
/// 0: a stray write"; src/redis/mod.rs: "A missed invalidation of the key does not let that
/// happen: the failed load's read of Redis finds the key's tombstone, and the load's callers
/// get its error".
///
/// A stray tombstone's version beyond the horizon (here 10^17 µs) is a number to the Rust side,
/// which remembers it when A's load reads it; B's invalidation then restarts the version at
/// the clock (the scripts count the stray as 0), below what A remembers: A's failed load
/// counts B's tombstone as heard, and fail-safe serves the value B invalidated.
#[test]
fn bug_stray_version_beyond_the_horizon_hides_a_later_tombstone_from_fail_safe() {
    let _w = common::watchdog(Duration::from_secs(30), "stray version fail-safe");
    let server = RedisServer::start();
    let ns = "h81sv";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let mut c = raw(&server);
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("v")
        .arg("100000000000000000")
        .query::<()>(&mut c)
        .unwrap();
    let a = fs_tier(deaf_url(&server), ns)
        .build(fail_safe_builder(&clock, &down, "a"), Plain)
        .unwrap();
    let b = build(fs_tier(server.url(), ns), builder());
    let old = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    let v = rversion(&mut c, ns, 1);
    assert!(rvalue(&mut c, ns, 1).is_none(), "B's tombstone is there");
    clock.advance(Duration::from_secs(71));
    down.store(true, Ordering::SeqCst);
    let r = a.load(1);
    assert!(
        r.is_err(),
        "A served {old:?}, which B invalidated (tombstone at version {v:?} in Redis), as \
         fail-safe's last value: {r:?}"
    );
}

/// src/redis/mod.rs: "an `insert` whose local copy lands after a newer write or invalidation
/// of the key (announced by another instance, or done on this one) or after an
/// `invalidate_all` (done here or announced) drops it" — and only then; `TieredCache::insert`:
/// "Writes the value to Redis ..., then inserts locally".
///
/// After A read a stray version beyond the horizon once, every `insert` of that key on A
/// drops its own local copy (the version the script returns, counted from the clock, is below
/// the stray one A remembers), although nothing else wrote the key.
#[test]
fn bug_stray_version_read_once_makes_every_own_insert_of_the_key_drop_its_copy() {
    let _w = common::watchdog(Duration::from_secs(30), "stray version insert");
    let server = RedisServer::start();
    let ns = "h81si";
    let mut c = raw(&server);
    redis::cmd("HSET")
        .arg(vkey(ns, 1))
        .arg("v")
        .arg("18446744073709551615")
        .query::<()>(&mut c)
        .unwrap();
    let a = build(tier(server.url(), ns), builder());
    assert_eq!(a.get_with(1, || "loaded".to_string()), "loaded");
    a.insert(1, "mine".into());
    assert_eq!(rvalue(&mut c, ns, 1).as_deref(), Some("mine"));
    a.insert(1, "mine again".into());
    let v = rversion(&mut c, ns, 1);
    assert_eq!(
        a.get(&1).as_deref(),
        Some("mine again"),
        "A's own insert, the newest write of the key (version {v:?} in Redis), left no local copy"
    );
}

// ---------------------------------------------------------------------------------------
// Soft timeouts with a spawner
// ---------------------------------------------------------------------------------------

/// src/redis/mod.rs: "A missed invalidation of the key does not let that happen: the failed
/// load's read of Redis finds the key's tombstone, and the load's callers get its error";
/// builder.rs `fail_safe`: "when the load of an expired key fails — the loader's error, a
/// panic, an abandoned leader, a soft timeout ... — its callers get the last value".
///
/// A (deaf, fail-safe, a spawner and a soft timeout) missed B's invalidation; its copy
/// expired. A's load reads Redis (the tombstone: the load is marked as forgoing its fallback)
/// and the loader hangs (the backend is slow): at the soft timeout the caller gets the copy B
/// invalidated, the fallback the failed load itself would have refused.
#[test]
fn bug_soft_timeout_serves_the_copy_whose_tombstone_its_own_load_just_read() {
    let _w = common::watchdog(Duration::from_secs(30), "soft timeout fail-safe");
    let server = RedisServer::start();
    let ns = "h81st";
    let clock = ManualClock::new();
    let slow = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let (s2, g2) = (Arc::clone(&slow), Arc::clone(&gate));
    let a = fs_tier(deaf_url(&server), ns)
        .build(
            Cache::builder()
                .max_capacity(1_000)
                .time_to_live(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(600))
                .clock(clock.clone())
                .record_stats()
                .spawner(|job| {
                    std::thread::spawn(job);
                })
                .load_timeout(Duration::from_millis(500))
                .loader(move |k: &u64| {
                    if s2.load(Ordering::SeqCst) {
                        g2.pass();
                        return Err(BoxError::from("backend down"));
                    }
                    Ok::<_, BoxError>(format!("a{k}"))
                }),
            Plain,
        )
        .unwrap();
    let up = Arc::new(AtomicBool::new(false));
    let b = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    let old = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    clock.advance(Duration::from_secs(71));
    slow.store(true, Ordering::SeqCst);
    let r = a.load(1);
    let entered = gate.entered.load(Ordering::SeqCst);
    gate.open();
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    // The loader ran, so the tier's read before it had found the tombstone.
    assert!(
        entered,
        "the load's Redis read and loader ran before the timeout"
    );
    assert!(
        r.is_err(),
        "A served {old:?}, which B invalidated (its load had read the tombstone), at the soft \
         timeout: {r:?}"
    );
    // And after the load failed, the copy is gone.
    assert!(a.load(1).is_err());
}

// ---------------------------------------------------------------------------------------
// Tombstone lifetimes with fail-safe
// ---------------------------------------------------------------------------------------

/// Every way a tombstone is left (invalidate, remove, insert of an oversized or unencodable
/// value, invalidate_all) lives the cache's time to live plus max_stale (here 60 + 600 s),
/// and with a longer tier time to live that one plus max_stale.
#[test]
fn holds_every_tombstone_lives_ttl_plus_max_stale_with_fail_safe() {
    let _w = common::watchdog(Duration::from_secs(30), "tombstone pttl");
    let server = RedisServer::start();
    let mut c = raw(&server);
    for (ns, tier_ttl, want) in [
        ("h81t1", None, 660_000i64),
        ("h81t2", Some(900u64), 1_500_000),
    ] {
        let clock = ManualClock::new();
        let up = Arc::new(AtomicBool::new(false));
        let mut t = fs_tier(server.url(), ns).max_value_size(8);
        if let Some(s) = tier_ttl {
            t = t.ttl(Duration::from_secs(s));
        }
        let a = t.build(fail_safe_builder(&clock, &up, "a"), Plain).unwrap();
        for k in 1..=5u64 {
            a.load(k).unwrap();
        }
        a.invalidate(&1);
        a.remove(&2);
        a.insert(3, "far too large for eight bytes".into());
        let check = |c: &mut redis::Connection, k: u64, what: &str| {
            let p = pttl(c, &vkey(ns, k));
            assert!(rvalue(c, ns, k).is_none(), "{what}: no value");
            assert!(
                p > want - 5_000 && p <= want,
                "{what} ({ns}): tombstone lives {p} ms, want {want}"
            );
        };
        check(&mut c, 1, "invalidate");
        check(&mut c, 2, "remove");
        check(&mut c, 3, "oversized insert");
        a.invalidate_all();
        check(&mut c, 4, "invalidate_all");
        check(&mut c, 5, "invalidate_all");
    }
}

/// A time to idle instead of a time to live: the tier's time to live (required then) plus
/// max_stale.
#[test]
fn holds_tombstone_with_time_to_idle_is_tier_ttl_plus_max_stale() {
    let _w = common::watchdog(Duration::from_secs(30), "tombstone tti");
    let server = RedisServer::start();
    let ns = "h81ti";
    let a: TieredCache<u64, String> = fs_tier(server.url(), ns)
        .ttl(Duration::from_secs(100))
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_idle(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(600)),
            Plain,
        )
        .unwrap();
    a.insert(1, "x".into());
    a.invalidate(&1);
    let mut c = raw(&server);
    let p = pttl(&mut c, &vkey(ns, 1));
    assert!(p > 695_000 && p <= 700_000, "{p}");
}

// ---------------------------------------------------------------------------------------
// Stray counters at the edges of the rule
// ---------------------------------------------------------------------------------------

const STRAYS: &[&str] = &[
    "1e15",
    " 12",
    "12 ",
    "0x10",
    "inf",
    "-inf",
    "nan",
    "-0",
    "",
    "+5",
    "007",
    "5.0",
    "99999999999999999999999999999999999999999999999999999999999999999999999999999999",
    "18446744073709551616",
    "9007199254740993",
    "1796000000000000.5",
];

/// An epoch stray of each shape: a deaf load spanning invalidate_all is still ignored by every
/// later read.
#[test]
fn holds_stray_epochs_do_not_let_a_load_from_before_invalidate_all_survive_it() {
    let _w = common::watchdog(Duration::from_secs(60), "stray epochs");
    let server = RedisServer::start();
    let deaf = deaf_url(&server);
    let mut c = raw(&server);
    // Exactly at the horizon, and just below, of the server's clock now.
    let (s, us): (u64, u64) = {
        let t: Vec<String> = redis::cmd("TIME").query(&mut c).unwrap();
        (t[0].parse().unwrap(), t[1].parse().unwrap())
    };
    let now = s * 1_000_000 + us;
    let edge = (now + (1 << 41)).to_string();
    let below = (now + (1 << 41) - 5_000_000).to_string();
    let mut all: Vec<String> = STRAYS.iter().map(|s| s.to_string()).collect();
    all.push(edge);
    all.push(below);
    for (i, stray) in all.iter().enumerate() {
        let ns = format!("h81e{i}");
        redis::cmd("SET")
            .arg(epoch_key(&ns))
            .arg(stray)
            .query::<()>(&mut c)
            .unwrap();
        let gate = Gate::new();
        let g = Arc::clone(&gate);
        let cdeaf = build(tier(deaf.clone(), &ns), builder());
        let b = build(tier(server.url(), &ns), builder());
        let c2 = cdeaf.clone();
        let load = std::thread::spawn(move || {
            c2.get_with(1, move || {
                g.pass();
                "before".to_string()
            })
        });
        gate.wait_entered();
        b.invalidate_all();
        gate.open();
        assert_eq!(load.join().unwrap(), "before");
        assert!(eventually(|| cdeaf.stats().loads_in_flight == 0));
        let fresh = build(tier(server.url(), &ns), builder());
        let epoch: Option<String> = redis::cmd("GET").arg(epoch_key(&ns)).query(&mut c).unwrap();
        assert_eq!(
            fresh.get_with(1, || "fresh".to_string()),
            "fresh",
            "stray epoch {stray:?}: a load from before invalidate_all survived it (epoch now \
             {epoch:?})"
        );
        // And a load after it is a value for the fleet.
        let other = build(tier(server.url(), &ns), builder());
        assert_eq!(
            other.get_with(1, || "other".to_string()),
            "fresh",
            "stray {stray:?}"
        );
    }
}

/// A version stray of each shape (a tombstone): a deaf load spanning B's invalidate is not
/// written back, and A's own later insert is not ignored... B's later insert's message drops
/// a copy A inserted.
#[test]
fn holds_stray_versions_do_not_let_a_superseded_load_write_back() {
    let _w = common::watchdog(Duration::from_secs(60), "stray versions");
    let server = RedisServer::start();
    let deaf = deaf_url(&server);
    let mut c = raw(&server);
    for (i, stray) in STRAYS.iter().enumerate() {
        let ns = format!("h81v{i}");
        redis::cmd("HSET")
            .arg(vkey(&ns, 1))
            .arg("v")
            .arg(*stray)
            .query::<()>(&mut c)
            .unwrap();
        let gate = Gate::new();
        let g = Arc::clone(&gate);
        let cdeaf = build(tier(deaf.clone(), &ns), builder());
        let b = build(tier(server.url(), &ns), builder());
        let c2 = cdeaf.clone();
        let load = std::thread::spawn(move || {
            c2.get_with(1, move || {
                g.pass();
                "before".to_string()
            })
        });
        gate.wait_entered();
        b.invalidate(&1);
        gate.open();
        assert_eq!(load.join().unwrap(), "before");
        assert!(eventually(|| cdeaf.stats().loads_in_flight == 0));
        assert_eq!(rvalue(&mut c, &ns, 1), None, "stray {stray:?}: wrote back");
        let fresh = build(tier(server.url(), &ns), builder());
        assert_eq!(
            fresh.get_with(1, || "fresh".to_string()),
            "fresh",
            "stray {stray:?}"
        );
    }
}

/// Messages after a stray version: A inserts (the stray replaced by the clock), B inserts
/// later; A drops its copy.
#[test]
fn holds_messages_after_a_stray_version_drop_the_older_insert() {
    let _w = common::watchdog(Duration::from_secs(60), "stray messages");
    let server = RedisServer::start();
    let mut c = raw(&server);
    for (i, stray) in STRAYS.iter().enumerate() {
        let ns = format!("h81m{i}");
        redis::cmd("HSET")
            .arg(vkey(&ns, 1))
            .arg("v")
            .arg(*stray)
            .query::<()>(&mut c)
            .unwrap();
        let a = build(tier(server.url(), &ns), builder());
        let b = build(tier(server.url(), &ns), builder());
        assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
        a.insert(1, "a".into());
        let before = a.stats().remote.invalidations_received;
        b.insert(1, "b".into());
        b.insert(2, "marker".into());
        assert!(eventually(|| a.stats().remote.invalidations_received
            >= before + 2
            || a.get(&2).is_none() && a.get(&1).is_none()));
        assert_eq!(a.get(&1), None, "stray {stray:?}: A kept its older insert");
    }
}

// ---------------------------------------------------------------------------------------
// Async on a multi-thread runtime
// ---------------------------------------------------------------------------------------

/// load_async (async_loader) with fail-safe on a multi-thread tokio runtime: the missed
/// tombstone is seen by the async failed load.
#[test]
fn holds_async_fail_safe_sees_a_missed_tombstone_on_a_multi_thread_runtime() {
    let _w = common::watchdog(Duration::from_secs(30), "async fail-safe");
    let server = RedisServer::start();
    let ns = "h81as";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let a: TieredCache<u64, String> = fs_tier(deaf_url(&server), ns)
        .build(
            Cache::builder()
                .max_capacity(1_000)
                .time_to_live(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(600))
                .clock(clock.clone())
                .async_loader(move |k: &u64| {
                    let (d, k) = (Arc::clone(&d), *k);
                    async move {
                        tokio::task::yield_now().await;
                        if d.load(Ordering::SeqCst) {
                            Err(BoxError::from("down"))
                        } else {
                            Ok(format!("a{k}"))
                        }
                    }
                }),
            Plain,
        )
        .unwrap();
    let up = Arc::new(AtomicBool::new(false));
    let b = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let a2 = a.clone();
    assert_eq!(
        rt.block_on(async move { a2.load_async(1).await }).unwrap(),
        "a1"
    );
    b.invalidate(&1);
    clock.advance(Duration::from_secs(71));
    down.store(true, Ordering::SeqCst);
    let a2 = a.clone();
    let r = rt.block_on(async move {
        tokio::spawn(async move { a2.load_async(1).await })
            .await
            .unwrap()
    });
    assert!(r.is_err(), "{r:?}");
}

/// get_with_async on a multi-thread runtime, many tasks of one key spanning B's invalidate:
/// nothing from before it reaches Redis.
#[test]
fn holds_async_get_with_spanning_an_invalidate_is_not_written_back() {
    let _w = common::watchdog(Duration::from_secs(30), "async spanning");
    let server = RedisServer::start();
    let ns = "h81ag";
    let a = build(tier(deaf_url(&server), ns), builder());
    let b = build(tier(server.url(), ns), builder());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (a2, g, e) = (a.clone(), Arc::clone(&gate), Arc::clone(&entered));
        tasks.push(rt.spawn(async move {
            a2.get_with_async(1, async move {
                e.store(true, Ordering::SeqCst);
                g.notified().await;
                "before".to_string()
            })
            .await
        }));
    }
    assert!(eventually(|| entered.load(Ordering::SeqCst)));
    b.invalidate(&1);
    gate.notify_waiters();
    gate.notify_one();
    for t in tasks {
        assert_eq!(rt.block_on(t).unwrap(), "before");
    }
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    std::thread::sleep(Duration::from_millis(100)); // the write-back runs after the value
    let mut c = raw(&server);
    assert_eq!(rvalue(&mut c, ns, 1), None);
    let fresh = build(tier(server.url(), ns), builder());
    assert_eq!(fresh.get_with(1, || "fresh".to_string()), "fresh");
}

// ---------------------------------------------------------------------------------------
// Counters the rule accepts but that are ahead of the clock
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// clear_on_reconnect with fail-safe
// ---------------------------------------------------------------------------------------

/// src/redis/mod.rs: "A missed `invalidate_all` is seen the same way only while its
/// tombstones last; for a key that was not in Redis when it ran ... the copy from before it
/// can be served as fail-safe's last value. `clear_on_reconnect` closes this too (the copies
/// go when the subscriber reconnects)."
#[test]
fn holds_clear_on_reconnect_drops_fail_safe_copies_after_a_missed_invalidate_all() {
    let _w = common::watchdog(Duration::from_secs(30), "reconnect fail-safe");
    let server = RedisServer::start();
    let px = proxy::Proxy::start(server.port);
    let ns = "h81cr";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let a = fs_tier(px.url(), ns)
        .clear_on_reconnect(true)
        .build(fail_safe_builder(&clock, &down, "a"), Plain)
        .unwrap();
    let up = Arc::new(AtomicBool::new(false));
    let b = fs_tier(server.url(), ns)
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    // The first subscription's clear is done once a message is applied after it.
    let before = a.stats().remote.invalidations_received;
    b.insert(50, "m".into());
    assert!(eventually(
        || a.stats().remote.invalidations_received > before
    ));
    let old = a.load(1).unwrap();
    let mut c = raw(&server);
    redis::cmd("DEL")
        .arg(vkey(ns, 1))
        .query::<()>(&mut c)
        .unwrap(); // evicted from Redis
    let connects = a.stats().remote.subscriber_connects;
    px.black_hole_open_connections();
    b.invalidate_all(); // lost for A
    assert!(eventually(|| a.stats().remote.subscriber_connects
        > connects
        && a.is_subscribed()));
    let before = a.stats().remote.invalidations_received;
    b.insert(51, "m".into());
    assert!(eventually(
        || a.stats().remote.invalidations_received > before
    ));
    clock.advance(Duration::from_secs(71));
    down.store(true, Ordering::SeqCst);
    let r = a.load(1);
    assert_ne!(r.as_deref().ok(), Some(old.as_str()), "{r:?}");
}

// ---------------------------------------------------------------------------------------
// Forgotten versions: not too eager
// ---------------------------------------------------------------------------------------

/// src/redis/mod.rs: "An instance remembers the versions of its 4,096 most recent keys; for
/// the others it keeps the newest version it forgot, so a write at or below it still counts
/// as possibly superseded". Writes after many keys are above it: an insert keeps its copy, a
/// message about a forgotten key still drops the copy, and loads keep theirs.
#[test]
fn holds_after_10000_keys_inserts_keep_their_copies_and_messages_apply() {
    let _w = common::watchdog(Duration::from_secs(120), "forgotten versions");
    let server = RedisServer::start();
    let ns = "h81fv";
    let a = build(tier(server.url(), ns), builder().max_capacity(100_000));
    let b = build(tier(server.url(), ns), builder().max_capacity(100_000));
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    a.insert(1, "first".into());
    for k in 10_000..20_000u64 {
        a.insert(k, "x".into());
    }
    let kept = (10_000..20_000u64).filter(|k| a.get(k).is_some()).count();
    assert_eq!(kept, 10_000, "inserts whose copy was dropped");
    a.insert(2, "late".into());
    assert_eq!(a.get(&2).as_deref(), Some("late"));
    // Key 1's versions are forgotten: B's newer write still drops A's copy.
    assert_eq!(a.get(&1).as_deref(), Some("first"));
    b.insert(1, "b".into());
    assert!(eventually(|| a.get(&1).is_none()));
    assert_eq!(a.get_with(1, || "loaded".into()), "b");
    assert_eq!(a.get_with(3, || "loaded".into()), "loaded");
    assert_eq!(a.get(&3).as_deref(), Some("loaded"));
}

// ---------------------------------------------------------------------------------------
// invalidate_all failing partway through its SCAN
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Leases with the new scripts
// ---------------------------------------------------------------------------------------

/// With leases: a deaf instance's failed load (under a lease it takes in the same round trip
/// as its read) sees the missed tombstone; a lease holder spanning another instance's
/// invalidate writes nothing back, and the waiter after it loads fresh.
#[test]
fn holds_leases_with_fail_safe_and_a_revoking_invalidate() {
    let _w = common::watchdog(Duration::from_secs(30), "leases");
    let server = RedisServer::start();
    let ns = "h81ls";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let lease = |t: RedisTier| t.lease(Duration::from_secs(5), Duration::from_millis(300));
    let a = lease(fs_tier(deaf_url(&server), ns))
        .build(fail_safe_builder(&clock, &down, "a"), Plain)
        .unwrap();
    let up = Arc::new(AtomicBool::new(false));
    let b = lease(fs_tier(server.url(), ns))
        .build(fail_safe_builder(&clock, &up, "b"), Plain)
        .unwrap();
    a.load(1).unwrap();
    b.invalidate(&1);
    clock.advance(Duration::from_secs(71));
    down.store(true, Ordering::SeqCst);
    assert!(a.load(1).is_err());
    // A lease holder spanning an invalidate.
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let a2 = a.clone();
    let holder = std::thread::spawn(move || {
        a2.get_with(2, move || {
            g.pass();
            "before".to_string()
        })
    });
    gate.wait_entered();
    b.invalidate(&2);
    gate.open();
    assert_eq!(holder.join().unwrap(), "before");
    assert!(eventually(|| a.stats().loads_in_flight == 0));
    let fresh = lease(fs_tier(server.url(), ns))
        .build(fail_safe_builder(&clock, &up, "f"), Plain)
        .unwrap();
    assert_eq!(fresh.load(2).unwrap(), "f2-0");
}
