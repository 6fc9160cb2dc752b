#![cfg(feature = "redis")]
#![allow(clippy::too_many_arguments, clippy::manual_range_contains)]
//! Round 89 of the outside attacks (a helper given the public API only) on round 87's Redis
//! tier fixes and documented bounds (an instance that never hears messages, `deaf_url`). 31
//! tests; one failed:
//!
//! * `bounds::async_refresh_cancelled_after_reading_the_tombstone_leaves_no_fallback`: an
//!   async refresh whose read found a missed tombstone, then dropped (cancelled), left the
//!   copy to fail-safe once it expired — a dropped refresh was no failed load, and the mark
//!   was only set on an expired copy. Now any load or refresh whose read found the value
//!   invalidated marks it as no fallback however it ends (`Lead`'s drop), live or expired
//!   (`fail_safe_abandoned`).
//!
//! The others pin round 87's fixes: the oversized newer value (own oversized writes, heard
//! ones, exactly at the limit, async, lease waits, a later load clearing it) and the mark (cleared by
//! every later write, per key, with time to idle and per-entry expiry, a cache without the
//! tier unaffected); the bounds no wider than documented (after the retry, no API serves the
//! copy); and tombstone lifetimes.

mod common;

/// round 87's first fix: a value in Redis too large for this instance's `max_value_size`, newer than any version it knows, counts as a missed write (the load forgoes fail-safe's fallback). Probes: the instance's own oversized writes, oversized writes it heard, values exactly at the limit, a later successful load, refreshes, async loads.
mod oversized {

    use super::common;

    use common::eventually;
    use common::tier::*;
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::ManualClock;
    use herdcache_testkit::redis_server::RedisServer;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A (deaf unless `hears`, `max_value_size(max)`) and B (hears everything, default maximum).
    fn pair(
        server: &RedisServer,
        ns: &str,
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        n: &Arc<AtomicU64>,
        max: usize,
        hears: bool,
        refresh: bool,
    ) -> (TieredCache<u64, String>, TieredCache<u64, String>) {
        let url = if hears {
            server.url()
        } else {
            deaf_url(server)
        };
        let mut ba = counted_fail_safe_builder(clock, down, n, "a");
        if refresh {
            ba = ba.refresh_after(Duration::from_secs(30));
        }
        fs_pair(server, ns, clock, fs_tier(url, ns).max_value_size(max), ba)
    }

    /// src/redis/mod.rs: an `insert` of a value larger than `max_value_size` "is kept in the local
    /// tier only and never sent (an `insert` of one leaves a tombstone in Redis instead)"; round
    /// 87: a version counts as a missed write only if "newer than any version of the key this
    /// instance wrote, heard announced or loaded past". fail_safe: a failed load answers with the
    /// key's last value.
    ///
    /// A's own oversized insert is its newest write (the tombstone in Redis is its own): once it
    /// expires and the backend fails, fail-safe must answer with it.
    #[test]
    fn own_oversized_insert_is_still_fail_safes_last_value() {
        let _w = common::watchdog(Duration::from_secs(30), "own oversized insert");
        let server = RedisServer::start();
        let ns = "h89own";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, _b) = pair(&server, ns, &clock, &down, &n, 8, false, false);
        a.load(1).unwrap();
        let big = "A".repeat(100);
        a.insert(1, big.clone());
        let mut c = raw(&server);
        assert_eq!(rvalue(&mut c, ns, 1), None, "tombstone, not sent");
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert_eq!(
            r.as_deref().ok(),
            Some(big.as_str()),
            "A's own oversized insert (its tombstone in Redis) is its last value: {r:?}"
        );
        assert_eq!(a.get_or_stale(&1).as_deref(), Some(big.as_str()));
    }

    /// The same with A hearing: B inserts an oversized value (for A, not for B) that A heard
    /// announced; A then loads its own value (the oversized one "is not read ... loads it, and
    /// writes its own value back over it"). A's copy is its newest: once it expires and the backend
    /// fails, fail-safe answers with it ("newer than any version ... heard announced or loaded past").
    #[test]
    fn heard_oversized_insert_then_own_load_keeps_fail_safe() {
        let _w = common::watchdog(Duration::from_secs(30), "heard oversized insert");
        let server = RedisServer::start();
        let ns = "h89heard";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, true, false);
        a.load(1).unwrap();
        // A hears only once its subscriber is in (a message sent before is lost: seen once in
        // CI).
        assert!(eventually(|| a.is_subscribed()), "A subscribed");
        let big = "B".repeat(100);
        b.insert(1, big.clone());
        assert!(
            eventually(|| a.get(&1).is_none()),
            "A heard B's insert (its copy dropped)"
        );
        let mine = a.load(1).unwrap();
        assert!(mine.starts_with('a'), "A loads its own value: {mine}");
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert_eq!(
            r.as_deref().ok(),
            Some(mine.as_str()),
            "A's last value, loaded after B's oversized insert it heard: {r:?} (Redis: {:?})",
            rvalue(&mut raw(&server), ns, 1).map(|v| v.len())
        );
    }

    /// Deaf A: B's oversized insert missed; A's failed load forgoes the fallback (round 87). The
    /// backend comes back: A's next load succeeds ("loaded past" B's version). That copy is then
    /// A's last value: once it expires and the backend fails again, fail-safe answers with it.
    #[test]
    fn successful_load_after_missed_oversized_write_restores_fail_safe() {
        let _w = common::watchdog(Duration::from_secs(30), "load after oversized");
        let server = RedisServer::start();
        let ns = "h89after";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, false, false);
        let old = a.load(1).unwrap();
        let big = "B".repeat(100);
        b.insert(1, big.clone()); // lost for A
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            r.is_err(),
            "missed oversized write: no fallback on {old:?}: {r:?}"
        );
        down.store(false, Ordering::SeqCst);
        let fresh = a.load(1).unwrap();
        assert_ne!(fresh, old);
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert_eq!(
            r.as_deref().ok(),
            Some(fresh.as_str()),
            "A's fresh copy (loaded after B's write) is fail-safe's last value: {r:?}"
        );
    }

    /// A value exactly `max_value_size` bytes long is readable ("A larger value ... is not read"):
    /// B's missed insert of it is what A's failed load answers with ("the failed load's read finds
    /// the newer value and answers with it").
    #[test]
    fn missed_write_exactly_at_the_size_limit_is_read() {
        let _w = common::watchdog(Duration::from_secs(30), "at the limit");
        let server = RedisServer::start();
        let ns = "h89lim";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, false, false);
        let old = a.load(1).unwrap();
        let exact = "B".repeat(8);
        b.insert(1, exact.clone()); // lost for A
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert_eq!(
            r.as_deref().ok(),
            Some(exact.as_str()),
            "B's 8-byte value (A's max 8) in Redis; A had {old:?}: {r:?}"
        );
    }

    /// Round 87's fix on the async path and with the values one byte over the limit: A's
    /// `try_get_with_async` must not answer with the copy B's (9-byte, missed)
    /// insert replaced, nor may `get_or_stale` afterwards.
    #[test]
    fn async_load_forgoes_the_copy_a_one_byte_oversized_write_replaced() {
        let _w = common::watchdog(Duration::from_secs(30), "async oversized");
        let server = RedisServer::start();
        let ns = "h89async";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, false, false);
        let old = a.load(1).unwrap();
        b.insert(1, "B".repeat(9)); // lost for A
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r = rt.block_on(a.try_get_with_async(1, async { Err::<String, _>("backend down") }));
        let stale = a.get_or_stale(&1);
        assert!(
        r.as_deref().ok() != Some(old.as_str()) && stale.as_deref() != Some(old.as_str()),
        "A served {old:?}, replaced by B's missed 9-byte insert: try_get_with_async {r:?}, get_or_stale \
         {stale:?}"
    );
    }

    /// Round 87's fix through a refresh: A (deaf, `refresh_after` 30 s) misses B's oversized
    /// insert; A's refresh reads it and fails. src/redis/mod.rs: such a refresh "keeps the copy
    /// until its time to live ... and the copy is then no fallback at all (not even for
    /// `get_or_stale`)" — the refresh knows the copy is superseded as a load does.
    #[test]
    fn refresh_that_read_a_missed_oversized_write_leaves_no_fallback() {
        let _w = common::watchdog(Duration::from_secs(30), "refresh oversized");
        let server = RedisServer::start();
        let ns = "h89rov";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, false, true);
        let old = a.load(1).unwrap();
        b.insert(1, "B".repeat(100)); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        assert_eq!(a.load(1).unwrap(), old, "live copy, refresh due");
        assert!(
            eventually(|| a.stats().refreshes_failed >= 1),
            "the refresh failed"
        );
        clock.advance(Duration::from_secs(30)); // past the time to live
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
        stale.is_none() && r.is_err(),
        "A's refresh read B's newer (oversized) value; afterwards get_or_stale {stale:?}, load \
         {r:?} (the copy {old:?})"
    );
    }

    /// B's `invalidate_all` (missed) then B's oversized insert (missed): A's copy from before both
    /// is superseded twice; A's failed load must not answer with it.
    #[test]
    fn missed_invalidate_all_then_oversized_insert() {
        let _w = common::watchdog(Duration::from_secs(30), "invalidate_all + oversized");
        let server = RedisServer::start();
        let ns = "h89ia";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, false, false);
        let old = a.load(1).unwrap();
        b.invalidate_all();
        b.insert(1, "B".repeat(100));
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        let stale = a.get_or_stale(&1);
        assert!(
        r.is_err() && stale.is_none(),
        "A served {old:?} after B's invalidate_all and insert: load {r:?}, get_or_stale {stale:?}"
    );
    }

    /// A lease wait reading a missed oversized write: A (deaf, leases) misses B's oversized insert;
    /// another instance holds the lease when A's copy expires; A's load reads B's version, waits,
    /// then (lease released by its holder deleting the key) loads and fails: it must not answer
    /// with the copy B replaced.
    #[test]
    fn lease_wait_after_missed_oversized_write() {
        let _w = common::watchdog(Duration::from_secs(30), "lease oversized");
        let server = RedisServer::start();
        let ns = "h89lease";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .max_value_size(8)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.insert(1, "B".repeat(100)); // lost for A
        let mut c = raw(&server);
        let lkey = format!("hc:{}:{ns}:l{{1}}", ns.len());
        redis::cmd("SET")
            .arg(&lkey)
            .arg("another-instance")
            .arg("PX")
            .arg(30_000)
            .query::<()>(&mut c)
            .unwrap();
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let load = std::thread::spawn(move || a2.load(1));
        assert!(
            eventually(|| a.stats().remote.lease_waits >= 1),
            "A waits on the lease"
        );
        redis::cmd("DEL").arg(&lkey).query::<()>(&mut c).unwrap();
        let r = load.join().unwrap();
        assert!(
            r.as_deref().ok() != Some(old.as_str()),
            "A's lease wait had read B's newer (oversized) version; it answered {r:?}"
        );
    }

    /// src/redis/mod.rs: a value larger than `max_value_size` "is kept in the local tier only: its
    /// load's write-back is skipped"; round 87: a version counts as a missed write only if "newer
    /// than any version of the key this instance wrote, heard announced or loaded past".
    ///
    /// Deaf A (max 8 bytes) misses B's oversized insert; A's next successful load (backend up)
    /// reads B's version and loads a value that is itself too large for A to write back: B's
    /// record stays in Redis, and A has loaded past it. Once A's copy expires and the backend
    /// fails, fail-safe must answer with A's copy (its newest value), not the error.
    #[test]
    fn own_oversized_load_past_a_missed_oversized_write_keeps_fail_safe() {
        let _w = common::watchdog(Duration::from_secs(30), "oversized load past");
        let server = RedisServer::start();
        let ns = "h89olp";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let big_loads = Arc::new(AtomicBool::new(false));
        let (d, bl) = (Arc::clone(&down), Arc::clone(&big_loads));
        let n = Arc::new(AtomicU64::new(0));
        let builder: herdcache::CacheBuilder<u64, String> = herdcache::Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    Err(herdcache::BoxError::from("backend down"))
                } else if bl.load(Ordering::SeqCst) {
                    Ok(format!("a{k}-{i}-{}", "x".repeat(100)))
                } else {
                    Ok(format!("a{k}-{i}"))
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .max_value_size(8)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        a.load(1).unwrap();
        let bigb = "B".repeat(100);
        b.insert(1, bigb.clone()); // lost for A
        clock.advance(Duration::from_secs(61));
        big_loads.store(true, Ordering::SeqCst);
        let mine = a.load(1).unwrap();
        assert!(
            mine.starts_with("a1-1"),
            "A loaded its own (oversized) value: {mine}"
        );
        let mut c = raw(&server);
        let in_redis = rvalue(&mut c, ns, 1);
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert_eq!(
            r.as_deref().ok(),
            Some(mine.as_str()),
            "A's copy, loaded after (past) B's oversized write, is its last value: got {r:?} \
         (Redis holds B's value: {})",
            in_redis.as_deref() == Some(bigb.as_str())
        );
    }

    /// A `TieredCache::get_with` whose `init` panics after its read found B's missed oversized
    /// write: a caller that joined it must not get the copy B's write replaced ("a panic (...) of
    /// a `get_with` init, whose panic still goes to its own caller" is a failure that falls back —
    /// but not on a copy the read found superseded).
    #[test]
    fn joiner_of_a_panicking_get_with_after_a_missed_oversized_write() {
        let _w = common::watchdog(Duration::from_secs(30), "panicking get_with");
        let server = RedisServer::start();
        let ns = "h89pg";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, 8, false, false);
        let old = a.load(1).unwrap();
        b.insert(1, "B".repeat(100)); // lost for A
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        common::quiet_injected_panics();
        let gate = common::Gate::new();
        let (a2, g) = (a.clone(), Arc::clone(&gate));
        let leader = std::thread::spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                a2.get_with(1, || {
                    g.pass();
                    panic!("injected: init")
                })
            }))
        });
        gate.wait_entered();
        let a3 = a.clone();
        let joiner = std::thread::spawn(move || a3.load(1));
        // The joiner either joins the running init or comes after it: neither may get the copy.
        gate.open();
        let led = leader.join().unwrap();
        let joined = joiner.join().unwrap();
        let stale = a.get_or_stale(&1);
        assert!(
            joined.as_deref().ok() != Some(old.as_str()) && stale.as_deref() != Some(old.as_str()),
            "A served {old:?} (replaced by B's missed write): joiner {joined:?}, get_or_stale \
         {stale:?} (leader panicked: {})",
            led.is_err()
        );
    }
}

/// round 87's second fix: a refresh that read a missed tombstone and failed marks the local copy as no fallback once it expires (`Core::forgo_stale`). The mark must end with any later write of the key, stay on its key, and not touch a write that landed during the refresh; a cache without the tier is unaffected.
mod forgo_mark {

    use super::common;

    use common::tier::*;
    use common::{eventually, Gate};
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::{BoxError, Cache, CacheBuilder, ManualClock, Op};
    use herdcache_testkit::redis_server::RedisServer;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A (deaf, `refresh_after` 30 s, time to live 60 s, fail-safe 600 s, backoff 5 s) and B.
    fn pair(
        server: &RedisServer,
        ns: &str,
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        n: &Arc<AtomicU64>,
    ) -> (TieredCache<u64, String>, TieredCache<u64, String>) {
        let ba =
            counted_fail_safe_builder(clock, down, n, "a").refresh_after(Duration::from_secs(30));
        fs_pair(server, ns, clock, fs_tier(deaf_url(server), ns), ba)
    }

    /// A loaded key 1; B invalidates it (missed); at 31 s A's refresh reads the tombstone and
    /// fails (backend down). Returns A's copy.
    fn marked(
        a: &TieredCache<u64, String>,
        b: &TieredCache<u64, String>,
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
    ) -> String {
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        let failed = a.stats().refreshes_failed;
        assert_eq!(a.load(1).unwrap(), old, "live copy, refresh due");
        assert!(
            eventually(|| a.stats().refreshes_failed > failed),
            "the refresh failed"
        );
        old
    }

    /// fail_safe: `get_or_stale` answers "the key's last value if it is past its deadline but
    /// within its stale window"; shard: the mark lasts until "the next write of the key resets it
    /// with the value". A's own `insert` after the marking refresh is its last value: past its time
    /// to live, `get_or_stale` and a failed `load` answer with it.
    #[test]
    fn insert_after_the_marking_refresh_is_a_fallback_again() {
        let _w = common::watchdog(Duration::from_secs(30), "insert clears mark");
        let server = RedisServer::start();
        let ns = "h89mi";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        marked(&a, &b, &clock, &down);
        a.insert(1, "mine".to_string());
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            stale.as_deref() == Some("mine") && r.as_deref().ok() == Some("mine"),
            "A's insert after the mark: get_or_stale {stale:?}, failed load {r:?}"
        );
    }

    /// A successful later refresh (the backend back, after the backoff) replaces the marked copy:
    /// the new value is A's last, and fail-safe falls back on it.
    #[test]
    fn successful_refresh_after_the_marking_one_clears_the_mark() {
        let _w = common::watchdog(Duration::from_secs(30), "refresh clears mark");
        let server = RedisServer::start();
        let ns = "h89mr";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let old = marked(&a, &b, &clock, &down);
        down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(6)); // past the backoff, still live (37 s)
        let ok = a.stats().refreshes_succeeded;
        let _ = a.get(&1);
        assert!(
            eventually(|| a.stats().refreshes_succeeded > ok),
            "the second refresh succeeded: {:?}",
            a.stats()
        );
        let fresh = a.get(&1).unwrap();
        assert_ne!(fresh, old);
        down.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            stale.as_deref() == Some(fresh.as_str()) && r.as_deref().ok() == Some(fresh.as_str()),
            "the refreshed {fresh:?} is A's last value: get_or_stale {stale:?}, failed load {r:?}"
        );
    }

    /// A successful load after the marked copy expired (backend back) clears the mark.
    #[test]
    fn successful_load_after_the_mark_clears_it() {
        let _w = common::watchdog(Duration::from_secs(30), "load clears mark");
        let server = RedisServer::start();
        let ns = "h89ml";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        marked(&a, &b, &clock, &down);
        clock.advance(Duration::from_secs(30)); // expired
        down.store(false, Ordering::SeqCst);
        let fresh = a.load(1).unwrap();
        down.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            stale.as_deref() == Some(fresh.as_str()) && r.as_deref().ok() == Some(fresh.as_str()),
            "the loaded {fresh:?} is A's last value: get_or_stale {stale:?}, failed load {r:?}"
        );
    }

    /// The entry API's `and_compute_with` `Op::Put` on the (live, marked) copy is a write of the
    /// key: the value it stores is a fallback once it expires.
    #[test]
    fn compute_put_after_the_mark_clears_it() {
        let _w = common::watchdog(Duration::from_secs(30), "compute clears mark");
        let server = RedisServer::start();
        let ns = "h89mc";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        marked(&a, &b, &clock, &down);
        a.entry(1)
            .and_compute_with(|_| Op::Put("computed".to_string()));
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        assert_eq!(
            stale.as_deref(),
            Some("computed"),
            "the computed value (written after the mark) is A's last value"
        );
    }

    /// `or_insert` on the expired, marked copy stores its value (with fail-safe, "or_insert ...
    /// treat an expired entry as absent"): a write, so the stored value is a fallback later.
    #[test]
    fn or_insert_after_the_mark_clears_it() {
        let _w = common::watchdog(Duration::from_secs(30), "or_insert clears mark");
        let server = RedisServer::start();
        let ns = "h89mo";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let old = marked(&a, &b, &clock, &down);
        clock.advance(Duration::from_secs(30)); // expired
        let e = a.entry(1).or_insert("ins".to_string());
        assert_eq!(
            e.value(),
            "ins",
            "the marked expired copy {old:?} is no value"
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(a.get_or_stale(&1).as_deref(), Some("ins"));
    }

    /// The mark stays on its key: key 2, loaded with key 1 and never invalidated, keeps its
    /// fallback.
    #[test]
    fn mark_does_not_leak_to_other_keys() {
        let _w = common::watchdog(Duration::from_secs(30), "mark leak");
        let server = RedisServer::start();
        let ns = "h89mk";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let two = a.load(2).unwrap();
        marked(&a, &b, &clock, &down);
        clock.advance(Duration::from_secs(30)); // both expired
        let stale = a.get_or_stale(&2);
        let r = a.load(2);
        assert!(
            stale.as_deref() == Some(two.as_str()) && r.as_deref().ok() == Some(two.as_str()),
            "key 2 ({two:?}) untouched: get_or_stale {stale:?}, load {r:?}"
        );
        assert_eq!(a.get_or_stale(&1), None);
    }

    /// src/refresh.rs claims "While the refresh is registered no write has replaced the value it
    /// refreshed"; the docs: a write of the key resets the mark with the value. A's refresh reads
    /// the tombstone and blocks in its loader; A inserts "mine" (written to Redis by A); then the
    /// refresh fails. "mine" must stay a fallback: past its time to live, `get_or_stale` and a
    /// failed load answer with it.
    #[test]
    fn write_during_the_marking_refresh_keeps_its_fallback() {
        let _w = common::watchdog(Duration::from_secs(30), "write during refresh");
        let server = RedisServer::start();
        let ns = "h89mw";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gated = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g, gd) = (Arc::clone(&down), Arc::clone(&gate), Arc::clone(&gated));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if gd.swap(false, Ordering::SeqCst) {
                    g.pass();
                }
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("a{k}"))
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        gated.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let reader = std::thread::spawn(move || a2.get(&1)); // starts the refresh (maybe inline)
        gate.wait_entered(); // the refresh read the tombstone and is in the loader
        a.insert(1, "mine".to_string());
        gate.open();
        let got = reader.join().unwrap();
        assert!(
            eventually(|| a.stats().refreshes_failed >= 1),
            "the refresh ended failed: {:?}",
            a.stats()
        );
        assert_eq!(
            a.get(&1).as_deref(),
            Some("mine"),
            "read {got:?}, was {old:?}"
        );
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
        stale.as_deref() == Some("mine") && r.as_deref().ok() == Some("mine"),
        "A's insert during the refresh is its last value: get_or_stale {stale:?}, failed load {r:?}"
    );
    }

    /// Without the tier: a failed refresh keeps fail-safe's fallback (nothing read a tombstone).
    #[test]
    fn plain_cache_failed_refresh_keeps_its_fallback() {
        let _w = common::watchdog(Duration::from_secs(30), "plain refresh");
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let c: Cache<u64, String> = fail_safe_builder(&clock, &down, "p")
            .refresh_after(Duration::from_secs(30))
            .build();
        let old = c.load(1).unwrap();
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        assert_eq!(c.get(&1).as_deref(), Some(old.as_str()));
        assert!(eventually(|| c.stats().refreshes_failed >= 1));
        clock.advance(Duration::from_secs(30));
        assert_eq!(c.get_or_stale(&1).as_deref(), Some(old.as_str()));
        assert_eq!(c.load(1).as_deref().ok(), Some(old.as_str()));
    }

    /// With a time to idle instead of a time to live: a refresh that read the tombstone and failed
    /// still marks the copy; once it idles out, `get_or_stale` must not answer with it ("the copy is
    /// then no fallback at all").
    #[test]
    fn time_to_idle_copy_marked_by_a_failed_refresh() {
        let _w = common::watchdog(Duration::from_secs(30), "tti mark");
        let server = RedisServer::start();
        let ns = "h89mt";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&down);
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_idle(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("a{k}"))
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .ttl(Duration::from_secs(600))
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .ttl(Duration::from_secs(600))
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        assert_eq!(a.get(&1).as_deref(), Some(old.as_str()));
        assert!(eventually(|| a.stats().refreshes_failed >= 1));
        clock.advance(Duration::from_secs(61)); // idled out
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            stale.is_none() && r.is_err(),
            "A's refresh read B's tombstone; idled out: get_or_stale {stale:?}, load {r:?}"
        );
    }

    /// A per-entry `Expiry` (60 s from create and update, no fixed time to live): a refresh that
    /// read the missed tombstone and failed leaves the copy no fallback once it expires; a later
    /// `insert` (a write: `expire_after_update`) makes the new value a fallback again.
    #[test]
    fn per_entry_expiry_mark_then_insert() {
        struct Sixty;
        impl herdcache::Expiry<u64, String> for Sixty {
            fn expire_after_create(&self, _: &u64, _: &String) -> Option<Duration> {
                Some(Duration::from_secs(60))
            }
            fn expire_after_update(
                &self,
                _: &u64,
                _: &String,
                _: Option<Duration>,
            ) -> Option<Duration> {
                Some(Duration::from_secs(60))
            }
        }
        let _w = common::watchdog(Duration::from_secs(30), "expiry mark");
        let server = RedisServer::start();
        let ns = "h89me";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&down);
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .expire_after(Sixty)
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("a{k}"))
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .ttl(Duration::from_secs(600))
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .ttl(Duration::from_secs(600))
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = marked(&a, &b, &clock, &down);
        clock.advance(Duration::from_secs(30)); // expired (61 s)
        let stale = a.get_or_stale(&1);
        assert_eq!(stale, None, "marked copy {old:?} past its Expiry deadline");
        a.insert(1, "mine".to_string());
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            stale.as_deref() == Some("mine") && r.as_deref().ok() == Some("mine"),
            "A's insert after the mark: get_or_stale {stale:?}, failed load {r:?}"
        );
    }

    /// As `write_during_the_marking_refresh_keeps_its_fallback`, the write being the entry API's
    /// `and_compute_with` `Op::Put` (on its own thread, started while the refresh's loader runs).
    #[test]
    fn compute_during_the_marking_refresh_keeps_its_fallback() {
        let _w = common::watchdog(Duration::from_secs(30), "compute during refresh");
        let server = RedisServer::start();
        let ns = "h89mcw";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gated = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g, gd) = (Arc::clone(&down), Arc::clone(&gate), Arc::clone(&gated));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if gd.swap(false, Ordering::SeqCst) {
                    g.pass();
                }
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("a{k}"))
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        gated.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let reader = std::thread::spawn(move || a2.get(&1));
        gate.wait_entered();
        let a3 = a.clone();
        let computer = std::thread::spawn(move || {
            a3.entry(1)
                .and_compute_with(|_| Op::Put("computed".to_string()));
        });
        // The computation waits for the refresh (or not): either way the refresh ends failed.
        gate.open();
        reader.join().unwrap();
        computer.join().unwrap();
        assert!(eventually(|| a.stats().refreshes_failed >= 1));
        assert_eq!(a.get(&1).as_deref(), Some("computed"));
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&1);
        assert_eq!(
            stale.as_deref(),
            Some("computed"),
            "the computed value (written around the failed refresh) is A's last value"
        );
    }

    /// The marking refresh outlives the copy: A's refresh reads the missed tombstone and blocks in
    /// its loader; the copy expires meanwhile; a `load` joins the refresh. The refresh fails: the
    /// joiner gets the error, and so do `get_or_stale` and a later `load` ("the copy is then no
    /// fallback at all").
    #[test]
    fn marking_refresh_that_outlives_the_copy() {
        let _w = common::watchdog(Duration::from_secs(30), "refresh outlives copy");
        let server = RedisServer::start();
        let ns = "h89mx";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gated = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g, gd) = (Arc::clone(&down), Arc::clone(&gate), Arc::clone(&gated));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if gd.swap(false, Ordering::SeqCst) {
                    g.pass();
                }
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("a{k}"))
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        gated.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let reader = std::thread::spawn(move || a2.get(&1));
        gate.wait_entered();
        clock.advance(Duration::from_secs(30)); // expired while the refresh runs
        let stale_during = a.get_or_stale(&1);
        let a3 = a.clone();
        let joiner = std::thread::spawn(move || a3.load(1));
        // The joiner either joins the refresh or loads after it: both must not answer the copy.
        gate.open();
        reader.join().unwrap();
        let joined = joiner.join().unwrap();
        assert!(eventually(|| a.stats().refreshes_failed >= 1));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        clock.advance(Duration::from_secs(6));
        let r2 = a.load(1);
        let all = [
            format!("{stale_during:?}"),
            format!("{joined:?}"),
            format!("{stale:?}"),
            format!("{r:?}"),
            format!("{r2:?}"),
        ];
        assert!(
        all.iter().all(|s| !s.contains(&old)),
        "A served {old:?} (its refresh read B's tombstone): get_or_stale during {stale_during:?}, \
         joiner {joined:?}, get_or_stale {stale:?}, load {r:?}, after the backoff {r2:?}"
    );
    }

    /// src/redis/mod.rs: after a refresh that read the tombstone and failed, "the copy is then no
    /// fallback at all"; the calls a `TieredCache` leaves local (the entry API, `get_all`) see no
    /// tombstone "unless a load through the tier reads it first" — here the refresh did. Past the
    /// time to live, `get_all` (its loader returning nothing) and `or_try_insert_with` (failing)
    /// must not answer with the copy.
    #[test]
    fn local_calls_do_not_fall_back_on_the_marked_copy() {
        let _w = common::watchdog(Duration::from_secs(30), "local calls after mark");
        let server = RedisServer::start();
        let ns = "h89mlc";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let old = marked(&a, &b, &clock, &down);
        clock.advance(Duration::from_secs(30)); // past the time to live
        let all = a.get_all([1u64], |_| std::collections::HashMap::new());
        let tried = a
            .entry(1)
            .or_try_insert_with(|| Err::<String, _>("down"))
            .map(|e| e.value().clone());
        assert!(
            all.get(&1) != Some(&old) && tried.as_deref().ok() != Some(old.as_str()),
            "A served the copy {old:?} its refresh saw invalidated: get_all {all:?}, \
         or_try_insert_with {tried:?}"
        );
    }
}

/// round 87's documented bounds checked to be no wider than stated, and the refresh mark (round 87) through an async refresh cancelled after it read the tombstone.
mod bounds {

    use super::common;

    use common::eventually;
    use common::tier::*;
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::{BoxError, BoxFuture, Cache, CacheBuilder, ManualClock};
    use herdcache_testkit::redis_server::RedisServer;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A (deaf) and B on namespace `ns`.
    fn pair(
        server: &RedisServer,
        ns: &str,
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        n: &Arc<AtomicU64>,
    ) -> (TieredCache<u64, String>, TieredCache<u64, String>) {
        let ba = counted_fail_safe_builder(clock, down, n, "a");
        fs_pair(server, ns, clock, fs_tier(deaf_url(server), ns), ba)
    }

    /// A's copy, gone from Redis (deleted there, as an eviction), expired; its load read nothing
    /// and failed (backoff from 61 s, answered with the copy); then B invalidates (missed by A).
    /// Returns the copy.
    fn in_backoff_then_invalidated(
        server: &RedisServer,
        ns: &str,
        a: &TieredCache<u64, String>,
        b: &TieredCache<u64, String>,
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
    ) -> String {
        let old = a.load(1).unwrap();
        let mut c = raw(server);
        redis::cmd("DEL")
            .arg(vkey(ns, 1))
            .query::<()>(&mut c)
            .unwrap();
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        assert_eq!(a.load(1).unwrap(), old, "fail-safe before the invalidation");
        b.invalidate(&1); // lost for A
        assert!(rversion(&mut c, ns, 1).is_some(), "tombstone in Redis");
        assert_eq!(
            a.load(1).unwrap(),
            old,
            "documented bound: within the backoff (no read)"
        );
        old
    }

    /// src/redis/mod.rs: within a backoff begun before the invalidation, callers get the copy
    /// "until the retry, a `refresh_backoff` after the failure, reads the tombstone". After that
    /// retry (`load`), no API answers with the copy B invalidated: `get_or_stale`, `load`,
    /// `load_with_timeout`, `TieredCache::get_with` / `try_get_with` (and async), `get`.
    #[test]
    fn after_the_retry_no_api_serves_the_invalidated_copy() {
        let _w = common::watchdog(Duration::from_secs(30), "after the retry");
        let server = RedisServer::start();
        let ns = "h89br";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let old = in_backoff_then_invalidated(&server, ns, &a, &b, &clock, &down);
        clock.advance(Duration::from_secs(5)); // the retry is due
        let retry = a.load(1);
        let mut seen = vec![format!("retry load: {retry:?}")];
        seen.push(format!("get_or_stale: {:?}", a.get_or_stale(&1)));
        seen.push(format!("get: {:?}", a.get(&1)));
        seen.push(format!("load: {:?}", a.load(1)));
        seen.push(format!(
            "load_with_timeout: {:?}",
            a.load_with_timeout(1, Some(Duration::from_secs(5)))
        ));
        seen.push(format!(
            "try_get_with: {:?}",
            a.try_get_with(1, || Err::<String, _>("down"))
        ));
        let rt = runtime();
        seen.push(format!(
            "try_get_with_async: {:?}",
            rt.block_on(a.try_get_with_async(1, async { Err::<String, _>("down") }))
        ));
        clock.advance(Duration::from_secs(6)); // another backoff over, in case one began
        seen.push(format!("get_or_stale later: {:?}", a.get_or_stale(&1)));
        seen.push(format!("load later: {:?}", a.load(1)));
        seen.push(format!(
            "get_with: {:?}",
            a.get_with(1, || "init".to_string())
        ));
        let bad: Vec<_> = seen.iter().filter(|s| s.contains(&old)).collect();
        assert!(
            bad.is_empty(),
            "after the retry read B's tombstone, A still answered {old:?}: {bad:?} (all: {seen:?})"
        );
    }

    /// The same bound, the retry made by `TieredCache::try_get_with` (a load through the tier):
    /// afterwards `get_or_stale` and `load` must not answer with the copy.
    #[test]
    fn retry_through_try_get_with_ends_the_bound() {
        let _w = common::watchdog(Duration::from_secs(30), "retry via try_get_with");
        let server = RedisServer::start();
        let ns = "h89bt";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let old = in_backoff_then_invalidated(&server, ns, &a, &b, &clock, &down);
        clock.advance(Duration::from_secs(5));
        let retry = a.try_get_with(1, || Err::<String, _>("down"));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            retry.as_deref().ok() != Some(old.as_str())
                && stale.as_deref() != Some(old.as_str())
                && r.as_deref().ok() != Some(old.as_str()),
            "after the retry (try_get_with {retry:?}) read B's tombstone: get_or_stale {stale:?}, \
         load {r:?} (the copy {old:?})"
        );
    }

    /// The same bound, the retry made by an async load (`try_get_with_async`).
    #[test]
    fn retry_through_an_async_load_ends_the_bound() {
        let _w = common::watchdog(Duration::from_secs(30), "retry via async");
        let server = RedisServer::start();
        let ns = "h89ba";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n);
        let old = in_backoff_then_invalidated(&server, ns, &a, &b, &clock, &down);
        clock.advance(Duration::from_secs(5));
        let rt = runtime();
        let retry = rt.block_on(a.try_get_with_async(1, async { Err::<String, _>("down") }));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
            retry.as_deref().ok() != Some(old.as_str())
                && stale.as_deref() != Some(old.as_str())
                && r.as_deref().ok() != Some(old.as_str()),
            "after the async retry ({retry:?}) read B's tombstone: get_or_stale {stale:?}, load \
         {r:?} (the copy {old:?})"
        );
    }

    /// A (deaf) missed B's invalidation; A's async refresh (on a `future_spawner` that hands the
    /// future to the test) reads the tombstone and enters its loader, then is dropped there
    /// (`cancel`) or goes on to fail; past the copy's time to live, `get_or_stale` is checked.
    fn async_refresh_after_reading_the_tombstone(cancel: bool) {
        let _w = common::watchdog(Duration::from_secs(30), "async refresh after a tombstone");
        let server = RedisServer::start();
        let ns = "h89ar";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let hang = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(AtomicBool::new(false));
        let spawned: Arc<Mutex<Vec<BoxFuture<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (d, h, e, sp) = (
            Arc::clone(&down),
            Arc::clone(&hang),
            Arc::clone(&entered),
            Arc::clone(&spawned),
        );
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .future_spawner(move |f| sp.lock().unwrap().push(f))
            .async_loader(move |k: &u64| {
                let (d, h, e) = (Arc::clone(&d), Arc::clone(&h), Arc::clone(&e));
                let k = *k;
                async move {
                    if h.load(Ordering::SeqCst) {
                        e.store(true, Ordering::SeqCst);
                        std::future::poll_fn(|cx| {
                            if h.load(Ordering::SeqCst) {
                                cx.waker().wake_by_ref();
                                std::task::Poll::Pending
                            } else {
                                std::task::Poll::Ready(())
                            }
                        })
                        .await;
                    }
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(format!("a{k}"))
                    }
                }
            });
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let rt = runtime();
        let old = rt.block_on(a.load_async(1)).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        hang.store(true, Ordering::SeqCst);
        assert_eq!(
            a.get(&1).as_deref(),
            Some(old.as_str()),
            "live, refresh due"
        );
        let mut fut = spawned
            .lock()
            .unwrap()
            .pop()
            .expect("the refresh was spawned");
        let e2 = Arc::clone(&entered);
        rt.block_on(async {
            while !e2.load(Ordering::SeqCst) {
                let done = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(fut.as_mut().poll(cx).is_ready())
                })
                .await;
                assert!(!done, "the refresh ended");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        if cancel {
            drop(fut); // cancelled after reading the tombstone
        } else {
            hang.store(false, Ordering::SeqCst);
            rt.block_on(fut); // the loader goes on, and fails
        }
        assert!(
            eventually(|| a.stats().refreshes_failed >= 1),
            "the refresh ended as failed: {:?}",
            a.stats()
        );
        clock.advance(Duration::from_secs(30)); // past the time to live
        let stale = a.get_or_stale(&1);
        hang.store(false, Ordering::SeqCst);
        let r = rt.block_on(a.load_async(1));
        assert!(
            stale.is_none(),
            "A's refresh ({}) had read B's tombstone; past the time to live get_or_stale \
         answered {stale:?} (load_async: {r:?})",
            if cancel {
                "cancelled in its loader"
            } else {
                "failed"
            }
        );
    }

    /// src/redis/mod.rs: "a refresh that reads the tombstone and fails keeps the copy until its
    /// time to live, as a missed message does, and the copy is then no fallback at all (not even
    /// for `get_or_stale`, which reads no Redis)"; fail_safe.rs counts an abandoned async leader as
    /// a failure.
    ///
    /// A (deaf, `refresh_after` 30 s, async loader, `future_spawner`) missed B's invalidation. A's
    /// async refresh reads the tombstone, enters its loader, and is dropped there (its runtime
    /// cancels it). Past the copy's time to live, `get_or_stale` must not answer with it.
    #[test]
    fn async_refresh_cancelled_after_reading_the_tombstone_leaves_no_fallback() {
        async_refresh_after_reading_the_tombstone(true);
    }

    /// Control: the same async refresh, failing instead of being cancelled, leaves no fallback
    /// (round 87's fix on the async refresh path).
    #[test]
    fn async_refresh_failing_after_reading_the_tombstone_leaves_no_fallback() {
        async_refresh_after_reading_the_tombstone(false);
    }

    /// The synchronous counterpart: a refresh whose loader panics after the read of the
    /// tombstone ("a failed (or panicking) refresh keeps the old value") also leaves no fallback.
    #[test]
    fn panicking_refresh_after_reading_the_tombstone_leaves_no_fallback() {
        let _w = common::watchdog(Duration::from_secs(30), "panicking refresh");
        let server = RedisServer::start();
        let ns = "h89pr";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&down);
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .refresh_after(Duration::from_secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| -> Result<String, BoxError> {
                if d.load(Ordering::SeqCst) {
                    panic!("injected: refresh loader");
                }
                Ok(format!("a{k}"))
            });
        common::quiet_injected_panics();
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.get(&1)));
        assert!(
            eventually(|| a.stats().refreshes_failed >= 1),
            "the refresh failed (read: {:?})",
            got.as_ref().ok()
        );
        clock.advance(Duration::from_secs(30));
        let stale = a.get_or_stale(&1);
        assert!(
            stale.is_none(),
            "A's panicking refresh had read B's tombstone; get_or_stale answered {stale:?} (was \
         {old:?})"
        );
    }
}

/// src/redis/mod.rs "A tombstone lives as long as the *invalidating* instance's settings say (the longer of its cache's and the tier's time to live, plus its `max_stale`)", checked on every way of leaving one: `invalidate`, `remove`, an oversized `insert`, and `invalidate_all`.
mod tombstone {

    use super::common;

    use common::tier::*;
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::ManualClock;
    use herdcache_testkit::redis_server::RedisServer;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// B: cache time to live 60 s, `max_stale` 600 s, tier time to live `tier_ttl`, values at most
    /// 8 bytes in Redis. Tombstones must live `max(60 s, tier_ttl) + 600 s`.
    fn b(
        server: &RedisServer,
        ns: &str,
        clock: &ManualClock,
        tier_ttl: u64,
    ) -> TieredCache<u64, String> {
        let up = Arc::new(AtomicBool::new(false));
        fs_tier(server.url(), ns)
            .ttl(Duration::from_secs(tier_ttl))
            .max_value_size(8)
            .build(fail_safe_builder(clock, &up, "b"), Plain)
            .unwrap()
    }

    fn within(left: i64, want_secs: u64) -> bool {
        let want = (want_secs * 1000) as i64;
        // Redis's PTTL counts down in real time: generous slack below (30 s), none above.
        left <= want && left > want - 30_000
    }

    #[test]
    fn tombstones_live_the_longer_time_to_live_plus_max_stale() {
        let _w = common::watchdog(Duration::from_secs(30), "tombstone lifetimes");
        let server = RedisServer::start();
        let clock = ManualClock::new();
        let mut c = raw(&server);
        let mut bad = Vec::new();
        for (ns, tier_ttl) in [("h89t1", 30u64), ("h89t2", 900)] {
            let want = tier_ttl.max(60) + 600;
            let b = b(&server, ns, &clock, tier_ttl);
            for k in 1..=4u64 {
                b.load(k).unwrap();
            }
            b.invalidate(&1);
            b.remove(&2);
            b.insert(3, "B".repeat(100)); // oversized: a tombstone instead
            for k in 1..=3u64 {
                let left = pttl(&mut c, &vkey(ns, k));
                let tomb = rvalue(&mut c, ns, k).is_none() && rversion(&mut c, ns, k).is_some();
                if !(tomb && within(left, want)) {
                    bad.push(format!(
                        "{ns} key {k}: tombstone {tomb}, PTTL {left} ms, want {want} s"
                    ));
                }
            }
        }
        assert!(bad.is_empty(), "{bad:?}");
    }

    /// `invalidate_all`: a missed one "is seen the same way only while its tombstones last"; the
    /// key's record (tombstoned by the epoch) and the epoch must last as a tombstone does: a deaf
    /// A's copy from before it stays unservable for `max(ttl) + max_stale`.
    #[test]
    fn missed_invalidate_all_is_seen_for_the_whole_stale_window() {
        let _w = common::watchdog(Duration::from_secs(30), "invalidate_all lifetime");
        let server = RedisServer::start();
        let ns = "h89tia";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let a = fs_tier(deaf_url(&server), ns)
            .build(fail_safe_builder(&clock, &down, "a"), Plain)
            .unwrap();
        let b = b(&server, ns, &clock, 60);
        let old = a.load(1).unwrap();
        b.invalidate_all(); // lost for A
        let mut c = raw(&server);
        let epoch = pttl(&mut c, &epoch_key(ns));
        let value = pttl(&mut c, &vkey(ns, 1));
        // 650 s of A's clock: within A's stale window (660 s from its load).
        clock.advance(Duration::from_secs(650));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            r.as_deref().ok() != Some(old.as_str()) && (epoch < 0 || epoch > 650_000),
            "A served {old:?} after B's invalidate_all: {r:?} (epoch PTTL {epoch} ms, value PTTL \
         {value} ms)"
        );
    }
}
