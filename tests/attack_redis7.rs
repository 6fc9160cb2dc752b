#![cfg(feature = "redis")]
//! Round 87 of the outside attacks (a helper given the public API only) on the Redis tier
//! after round 83's forgo fixes: fail-safe's stale copy on an instance that missed another
//! instance's invalidation (instance A connects as a Redis user without channel permission,
//! `deaf_url`: a deterministic stand-in for lost messages). 22 tests; eight failed:
//!
//! * fixed: `b::newer_value_too_large_for_this_instance_keeps_fail_safe_from_the_older_copy`
//!   — a newer value in Redis too large for this instance's `max_value_size` was no sign that
//!   its copy was superseded, and fail-safe served the older copy; a read now counts it as a
//!   missed write when its version is newer than any this instance knows (`Tier::snapshot`);
//! * fixed: `c::get_or_stale_refuses_the_copy_a_failed_refresh_saw_invalidated` — a refresh
//!   that read a missed tombstone and failed kept the copy live (right), and `get_or_stale`
//!   (which reads no Redis) then served it past its time to live; the refresh now marks the
//!   copy as no fallback once it expires (`Core::forgo_stale`);
//! * documented bounds, pinned (`bound_*`): fail-safe answers that come from no read of Redis
//!   — within a backoff that began before the invalidation, a soft timeout or an async load
//!   cancelled while waiting for a `max_concurrent_loads` permit (the tier's read runs under
//!   the permit), the calls a `TieredCache` leaves local (the entry API, `get_all`) — serve
//!   the copy until a load reads the tombstone; and a tombstone lives as long as the
//!   *invalidating* instance's settings say (instances sharing a namespace should share
//!   their time to live and fail-safe settings). See src/redis/mod.rs.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

/// fail-safe's stale copy on an instance that missed another instance's invalidation, reached by paths that never read Redis's tombstone — a backoff started before the invalidation, a soft timeout passing while the load waits for a `max_concurrent_loads` permit, and the `Cache` calls a `TieredCache` derefs to (the entry API, `get_all`) — plus probes of round 83's `loaded_past`.
mod a {

    use super::common;
    use common::tier::*;
    use herdcache_testkit::redis_server::RedisServer;

    use common::Gate;
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::{BoxError, Cache, CacheBuilder, ManualClock};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A (deaf, values never written to Redis when `oversized`) and B (hears everything) on one
    /// namespace; A's loader fails while `down`.
    fn pair(
        server: &RedisServer,
        ns: &str,
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        n: &Arc<AtomicU64>,
        oversized: bool,
    ) -> (TieredCache<u64, String>, TieredCache<u64, String>) {
        let mut ta = fs_tier(deaf_url(server), ns);
        if oversized {
            ta = ta.max_value_size(1);
        }
        let ba = counted_fail_safe_builder(clock, down, n, "a");
        fs_pair(server, ns, clock, ta, ba)
    }

    // ---------------------------------------------------------------------------------------
    // A backoff that started before the missed invalidation
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "With fail_safe a local copy is kept past its time to live, and a
    /// failed load of it may serve it up to `max_stale` longer. A missed invalidation of the key
    /// does not let that happen"; the guarantee: after `invalidate` returns on any instance, no
    /// instance yields an older value (a missed message is bounded by "at most the local time to
    /// live").
    ///
    /// A's copy (never written to Redis: larger than A's `max_value_size`) expires; the backend
    /// is down; A's load reads Redis (nothing there), fails, and fail-safe answers with the copy,
    /// starting a 5 s backoff. *Then* B invalidates the key (the tombstone is in Redis; A misses
    /// the message). For the rest of the backoff A keeps answering with the invalidated copy,
    /// past its time to live, without looking at Redis (round 87 found it; now a documented bound, src/redis/mod.rs: "What fail-safe sees of a missed invalidation is what a *read of Redis* sees"): "a caller within the
    /// retry backoff of a failed load, where the invalidation came after that load's read (...)
    /// — until the retry, a `refresh_backoff` after the failure, reads the tombstone". Pinned:
    /// the backoff answers the copy, the retry the error.
    #[test]
    fn bound_backoff_started_before_a_missed_invalidation_serves_the_copy_until_the_retry() {
        let _w = common::watchdog(Duration::from_secs(30), "backoff then invalidate");
        let server = RedisServer::start();
        let ns = "h87bo";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, true);
        let old = a.load(1).unwrap();
        let mut c = raw(&server);
        assert_eq!(rvalue(&mut c, ns, 1), None, "oversized: never written back");
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        // Nothing invalidated yet: fail-safe rightly answers with the copy (backoff starts).
        assert_eq!(a.load(1).unwrap(), old);
        b.invalidate(&1); // returns: the tombstone is in Redis; A misses the message
        assert!(rversion(&mut c, ns, 1).is_some(), "tombstone in Redis");
        let after = a.load(1);
        let stale = a.get_or_stale(&1);
        // Past the backoff the retry reads the tombstone (this half is expected to hold).
        clock.advance(Duration::from_secs(6));
        let retry = a.load(1);
        assert!(retry.is_err(), "the retry read the tombstone: {retry:?}");
        assert_eq!(
            (after.ok(), stale),
            (Some(old.clone()), Some(old)),
            "within the backoff: the copy (the documented bound)"
        );
        assert_eq!(
            a.get_or_stale(&1),
            None,
            "the retry's failure dropped the copy"
        );
    }

    /// As above, but the invalidation came first (the documented case): the load reads the
    /// tombstone and answers its error, and so does every caller after it.
    #[test]
    fn holds_missed_invalidation_before_the_first_failure_gets_the_error() {
        let _w = common::watchdog(Duration::from_secs(30), "invalidate then fail");
        let server = RedisServer::start();
        let ns = "h87bf";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, true);
        let old = a.load(1).unwrap();
        b.invalidate(&1);
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        for i in 0..3 {
            let r = a.load(1);
            assert!(r.is_err(), "call {i}: served {r:?} (B invalidated {old:?})");
            assert_eq!(a.get_or_stale(&1), None, "call {i}");
        }
    }

    // ---------------------------------------------------------------------------------------
    // A soft timeout while the load waits for a max_concurrent_loads permit
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen: the failed
    /// load's read of Redis finds the key's tombstone, and the load's callers get its error (...)
    /// So do a soft timeout's callers"; fail_safe.rs lists as a failure "a soft timeout (...) that
    /// passes while its leader still waits for a `max_concurrent_loads` permit".
    ///
    /// A (deaf, `max_concurrent_loads(1)`, soft timeout 200 ms, no spawner) missed B's
    /// invalidation of key 1; its copy expired. Key 2's load holds the only permit (its loader
    /// blocks on a gate). A's load of key 1 waits for the permit; the soft timeout passes; the
    /// load is given up before the tier ever read Redis, and fail-safe answers with the copy B
    /// invalidated — then keeps answering it for the backoff (round 87 found it; now a documented bound, src/redis/mod.rs: "What fail-safe sees of a missed invalidation is what a *read of Redis* sees"): "a soft timeout
    /// that passes (...) before its load read Redis (...) the callers within it are answered
    /// with it too, until the retry". Pinned: both answers are the copy; the retry, once the
    /// permit is free and the backoff over, reads the tombstone and answers the error.
    #[test]
    fn bound_soft_timeout_waiting_for_a_permit_serves_the_copy_until_the_retry() {
        let _w = common::watchdog(Duration::from_secs(30), "permit soft timeout");
        let server = RedisServer::start();
        let ns = "h87pm";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .max_concurrent_loads(1)
            .load_timeout(Duration::from_millis(200))
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if *k == 2 {
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
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let holder = std::thread::spawn(move || a2.load(2));
        gate.wait_entered(); // key 2's load holds the permit
        let first = a.load(1);
        let second = a.load(1);
        gate.open();
        let _ = holder.join();
        assert_eq!(
            (first.ok(), second.ok()),
            (Some(old.clone()), Some(old)),
            "before any read of Redis: the copy (the documented bound)"
        );
        clock.advance(Duration::from_secs(6));
        let retry = a.load(1);
        assert!(retry.is_err(), "the retry read the tombstone: {retry:?}");
    }

    // ---------------------------------------------------------------------------------------
    // The Cache calls a TieredCache derefs to
    // ---------------------------------------------------------------------------------------

    /// src/cache/fail_safe.rs: "The calls that can fall back are those that load on a miss: the
    /// `get_with` and `load` families (...), `get_all`, and the entry API's `or_insert_with`
    /// family"; src/redis/mod.rs: "A missed invalidation of the key does not let that happen".
    ///
    /// On a `TieredCache` (A, deaf), `entry(k).or_try_insert_with` — reached through `Deref` —
    /// is answered by fail-safe with the copy B invalidated: that load never reads Redis (only
    /// the builder's loader and `TieredCache::get_with`/`try_get_with` use the tier), so the
    /// tombstone is never seen (round 87 found it; now a documented bound, src/redis/mod.rs: "What fail-safe sees of a missed invalidation is what a *read of Redis* sees"): "calls that `TieredCache` leaves local — the
    /// entry API and `get_all` — whose loads never read Redis: their fail-safe answers see no
    /// tombstone". Pinned: the local call answers the copy, the tier-aware one the error.
    #[test]
    fn bound_entry_or_try_insert_with_on_a_tiered_cache_sees_no_tombstone() {
        let _w = common::watchdog(Duration::from_secs(30), "entry fallback");
        let server = RedisServer::start();
        let ns = "h87en";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, false);
        a.insert(1, "a-old1".into());
        a.insert(2, "a-old2".into());
        b.invalidate(&1); // lost for A
        b.invalidate(&2); // lost for A
        clock.advance(Duration::from_secs(61));
        // The tier-aware call holds (its read finds the tombstone):
        let tiered = a.try_get_with(2, || Err::<String, _>("backend down"));
        assert!(tiered.is_err(), "TieredCache::try_get_with: {tiered:?}");
        let r = a
            .entry(1)
            .or_try_insert_with(|| Err::<String, _>("backend down"))
            .map(|e| e.into_value());
        assert_eq!(
            r.ok().as_deref(),
            Some("a-old1"),
            "a local call: the copy (the documented bound)"
        );
    }

    /// As above with `get_all`, whose loader does not return the key (a failure for fail-safe):
    /// the same documented bound.
    #[test]
    fn bound_get_all_on_a_tiered_cache_sees_no_tombstone() {
        let _w = common::watchdog(Duration::from_secs(30), "get_all fallback");
        let server = RedisServer::start();
        let ns = "h87ga";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, false);
        a.insert(1, "a-old".into());
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(61));
        let all = a.get_all([1u64], |_missing| HashMap::new());
        assert_eq!(
            all.get(&1).map(String::as_str),
            Some("a-old"),
            "a local call: the copy (the documented bound)"
        );
    }

    // ---------------------------------------------------------------------------------------
    // loaded_past: a load past one tombstone does not count a later one as heard
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen"; round 83
    /// counts a tombstone a successful load read as heard (`loaded_past`) — only that one.
    ///
    /// A (deaf) misses B's first invalidation, loads past it (a value from after it, not written
    /// back: oversized, so the first tombstone stays in Redis), then misses B's second one. When
    /// that copy expires and the backend is down, the load reads the second tombstone and must
    /// answer its error.
    #[test]
    fn holds_a_second_missed_invalidation_after_loading_past_the_first() {
        let _w = common::watchdog(Duration::from_secs(30), "loaded past twice");
        let server = RedisServer::start();
        let ns = "h87lp";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, true);
        a.load(1).unwrap();
        b.invalidate(&1);
        clock.advance(Duration::from_secs(61));
        let fresh = a.load(1).unwrap(); // reads tombstone 1, loads past it
                                        // The value loaded past tombstone 1 is a valid fallback (round 83):
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        assert_eq!(
            a.load(1).unwrap(),
            fresh,
            "loaded past the tombstone: fallback ok"
        );
        clock.advance(Duration::from_secs(6)); // past the backoff
        down.store(false, Ordering::SeqCst);
        let fresh2 = a.load(1).unwrap();
        b.invalidate(&1); // second tombstone, lost for A
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            r.is_err(),
            "A served {r:?} (B's second invalidation of {fresh2:?} was missed)"
        );
    }

    /// A (deaf) misses B's invalidation; its load past the tombstone is superseded by A's own
    /// `insert` while the loader runs ("A load that a write (...) superseded is neither stored
    /// locally nor written back"). Once that copy expires and the backend is down, fail-safe may
    /// serve A's own insert (newer than the tombstone) or the error — never the loaded value or
    /// the first copy.
    #[test]
    fn holds_own_insert_during_a_load_past_the_tombstone_is_what_fail_safe_serves() {
        let _w = common::watchdog(Duration::from_secs(30), "insert during load past");
        let server = RedisServer::start();
        let ns = "h87ip";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if d.load(Ordering::SeqCst) {
                    return Err(BoxError::from("backend down"));
                }
                g.pass();
                Ok(format!("loaded{k}"))
            });
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        a.insert(1, "first".into());
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(61));
        let a2 = a.clone();
        let loader = std::thread::spawn(move || a2.load(1));
        gate.wait_entered(); // the load read the tombstone, its loader runs
        a.insert(1, "own".into());
        gate.open();
        let _ = loader.join();
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            matches!(r.as_deref(), Ok("own")) || r.is_err(),
            "A served {r:?} after its own insert of \"own\""
        );
    }

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen"; the forgo
    /// mark goes to "the load this thread runs".
    ///
    /// Nested loads on one thread: the outer `try_get_with` of key 2 runs, inside its `init`, a
    /// `try_get_with` of key 1 (A missed B's invalidation of both; both copies expired; both
    /// inits fail). Each load read its own tombstone: neither may fall back on its copy — the
    /// inner load's mark must not land on the outer one, nor the outer's be lost.
    #[test]
    fn holds_nested_loads_each_forgo_their_own_fallback() {
        let _w = common::watchdog(Duration::from_secs(30), "nested loads");
        let server = RedisServer::start();
        let ns = "h87ns";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let (a, b) = pair(&server, ns, &clock, &down, &n, false);
        a.insert(1, "a-old1".into());
        a.insert(2, "a-old2".into());
        b.invalidate(&1); // lost for A
        b.invalidate(&2); // lost for A
        clock.advance(Duration::from_secs(61));
        let mut inner = None;
        let outer = a.try_get_with(2, || {
            inner = Some(a.try_get_with(1, || Err::<String, _>("down")));
            Err::<String, _>("down")
        });
        assert!(
            outer.is_err() && matches!(inner, Some(Err(_))),
            "nested loads served invalidated copies: outer {outer:?}, inner {inner:?}"
        );
        // And the other way: the inner key with a copy B did not invalidate may fall back.
        a.insert(3, "a-ok3".into());
        a.insert(4, "a-old4".into());
        b.invalidate(&4); // lost for A
        clock.advance(Duration::from_secs(61));
        let mut inner = None;
        let outer = a.try_get_with(4, || {
            inner = Some(a.try_get_with(3, || Err::<String, _>("down")));
            Err::<String, _>("down")
        });
        assert!(outer.is_err(), "outer (invalidated) served {outer:?}");
        let _ = inner; // key 3's answer: its own copy from Redis or fail-safe's, both fine
    }
}

/// round 83's forgo fixes against a newer value another instance wrote too large for this one to read, an async load cancelled while it waits for a permit or for another instance's lease, three instances around a lease, and `invalidate_all` / oversized inserts missed by a deaf instance.
mod b {

    use super::common;
    use common::tier::*;
    use herdcache_testkit::redis_server::RedisServer;

    use common::{eventually, Gate};
    use herdcache::codec::Plain;
    use herdcache::{BoxError, Cache, CacheBuilder, ManualClock};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap()
    }

    // ---------------------------------------------------------------------------------------
    // A newer value in Redis, too large for this instance to read
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A missed *write* of a value (an `insert`, or another instance's load
    /// written back over the tombstone) is seen only while that value lives in Redis (the tier's
    /// time to live): the failed load's read finds the newer value and answers with it"; the
    /// guarantee: after `insert` returns on any instance, no instance yields an older value.
    ///
    /// A (deaf, `max_value_size(8)`) loaded "a1-0" (written to Redis). B (default 1 MiB)
    /// inserts a 100-byte value: a newer version of the key, alive in Redis. A's copy expires and
    /// its backend is down: A's read finds the newer version but leaves it unread (larger than
    /// A's maximum: "left there, not read") and, not counting it as a sign of anything, fail-safe
    /// answers with "a1-0" — the value B's insert replaced, while B's value lives in Redis.
    #[test]
    fn newer_value_too_large_for_this_instance_keeps_fail_safe_from_the_older_copy() {
        let _w = common::watchdog(Duration::from_secs(30), "oversized newer value");
        let server = RedisServer::start();
        let ns = "h87ov";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .max_value_size(8)
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        let mut c = raw(&server);
        assert_eq!(rvalue(&mut c, ns, 1).as_deref(), Some(old.as_str()));
        let big = "B".repeat(100);
        b.insert(1, big.clone()); // lost for A
        assert_eq!(
            rvalue(&mut c, ns, 1).as_deref(),
            Some(big.as_str()),
            "B's value in Redis"
        );
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            r.is_err() || matches!(r.as_deref(), Ok(v) if v == big),
            "after B's insert returned (its value alive in Redis), A's fail-safe answered {r:?}, \
         the value it replaced"
        );
    }

    // ---------------------------------------------------------------------------------------
    // An async load cancelled before it read Redis (waiting for a permit)
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen"; fail_safe.rs:
    /// "an abandoned async leader" is a failure that falls back.
    ///
    /// A (deaf, `max_concurrent_loads(1)`) missed B's invalidation of key 1; its copy expired.
    /// Key 2's load holds the only permit. An async caller of key 1 (`try_get_with_async`) waits
    /// for the permit; its runtime drops it (`tokio::time::timeout`). The abandoned load never
    /// read Redis, so it does not forgo the fallback: fail-safe puts the invalidated copy in a
    /// backoff, and `get_or_stale` and the next `load` answer with it.
    #[test]
    fn bound_async_load_cancelled_waiting_for_a_permit_serves_the_copy_until_the_retry() {
        let _w = common::watchdog(Duration::from_secs(30), "async permit cancel");
        let server = RedisServer::start();
        let ns = "h87ap";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .max_concurrent_loads(1)
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if *k == 2 {
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
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let holder = std::thread::spawn(move || a2.load(2));
        gate.wait_entered(); // key 2's load holds the permit
        let a3 = a.clone();
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = Arc::clone(&ran);
        let cut = runtime().block_on(async move {
            tokio::time::timeout(
                Duration::from_millis(300),
                a3.try_get_with_async(1, async move {
                    r2.store(true, Ordering::SeqCst);
                    Err::<String, BoxError>("backend down".into())
                }),
            )
            .await
        });
        assert!(
            cut.is_err(),
            "cut off while waiting for the permit: {cut:?}"
        );
        assert!(!ran.load(Ordering::SeqCst), "init never ran (no permit)");
        assert!(eventually(|| a.stats().loads_in_flight == 1)); // only key 2's
        let stale = a.get_or_stale(&1);
        gate.open();
        let _ = holder.join();
        let r = a.load(1);
        assert_eq!(
            (stale, r.ok()),
            (Some(old.clone()), Some(old)),
            "an async load cancelled before it read Redis: the copy, within the backoff it \
         started (the documented bound)"
        );
        clock.advance(Duration::from_secs(6));
        let retry = a.load(1);
        assert!(retry.is_err(), "the retry read the tombstone: {retry:?}");
    }

    // ---------------------------------------------------------------------------------------
    // An async load cancelled in a lease wait, after reading the tombstone
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen"; round 83:
    /// "a lease wait marks its load as forgoing (...) (sync and async); an abandoned load that
    /// forgoes marks the stale copy unservable".
    ///
    /// A (deaf, leases on) missed B's invalidation; another instance holds the lease. An async
    /// caller's read finds the tombstone and polls for the holder's value; its runtime drops it
    /// during the wait. Neither `get_or_stale` nor the next `load` may answer with the copy.
    #[test]
    fn holds_async_load_cancelled_in_a_lease_wait_after_the_tombstone() {
        let _w = common::watchdog(Duration::from_secs(30), "async lease wait cancel");
        let server = RedisServer::start();
        let ns = "h87al";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        let lkey = format!("hc:{}:{ns}:l{{1}}", ns.len());
        let mut c = raw(&server);
        redis::cmd("SET")
            .arg(&lkey)
            .arg("another-instance")
            .arg("PX")
            .arg(30_000)
            .query::<()>(&mut c)
            .unwrap();
        clock.advance(Duration::from_secs(71));
        down.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let cut = runtime().block_on(async move {
            tokio::time::timeout(
                Duration::from_millis(500),
                a2.try_get_with_async(1, async move { Err::<String, BoxError>("down".into()) }),
            )
            .await
        });
        assert!(cut.is_err(), "cut off in the lease wait: {cut:?}");
        assert!(eventually(|| a.stats().loads_in_flight == 0));
        let stale = a.get_or_stale(&1);
        redis::cmd("DEL").arg(&lkey).query::<()>(&mut c).unwrap();
        let r = a.load(1);
        assert!(
            stale.is_none() && r.is_err(),
            "A served {old:?} (B invalidated it; the cancelled wait had read the tombstone): \
         get_or_stale {stale:?}, load {r:?}"
        );
    }

    // ---------------------------------------------------------------------------------------
    // Three instances around a lease
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A load that a write or invalidation of its key superseded (...) is
    /// neither stored locally nor written back"; "A missed invalidation of the key does not let
    /// that happen".
    ///
    /// C holds the lease and loads (its loader blocked). A (deaf, leases on) has an expired copy
    /// (its Redis value gone, as if evicted), its backend down, and waits on C's lease. B
    /// invalidates (revoking C's lease; A misses the message). A's wait then finds the tombstone
    /// and no lease: its load fails, and its callers must get the error; C's value, superseded,
    /// must not reach Redis.
    #[test]
    fn holds_three_instances_invalidate_during_another_instances_lease() {
        let _w = common::watchdog(Duration::from_secs(30), "three instances lease");
        let server = RedisServer::start();
        let ns = "h87tl";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let gate = Gate::new();
        let g = Arc::clone(&gate);
        let cb: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .clock(clock.clone())
            .loader(move |k: &u64| {
                g.pass();
                Ok::<_, BoxError>(format!("c{k}"))
            });
        let cc = fs_tier(server.url(), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(cb, Plain)
            .unwrap();
        assert!(eventually(|| b.is_subscribed() && cc.is_subscribed()));
        let old = a.load(1).unwrap();
        let mut c = raw(&server);
        redis::cmd("DEL")
            .arg(vkey(ns, 1))
            .query::<()>(&mut c)
            .unwrap(); // evicted
        let c2 = cc.clone();
        let cload = std::thread::spawn(move || c2.load(1));
        gate.wait_entered(); // C holds the lease
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let aload = std::thread::spawn(move || a2.load(1));
        assert!(eventually(|| a.stats().loads_in_flight == 1));
        b.invalidate(&1);
        let ra = aload.join().unwrap();
        let stale = a.get_or_stale(&1);
        gate.open();
        let rc = cload.join().unwrap();
        assert!(
            ra.is_err() && stale.is_none(),
            "A served {old:?} after B's invalidate returned: load {ra:?}, get_or_stale {stale:?}"
        );
        let in_redis = rvalue(&mut c, ns, 1);
        assert_eq!(
            in_redis, None,
            "C's load ({rc:?}), superseded by B's invalidate, reached Redis"
        );
        assert_eq!(cc.get(&1), None, "C stored its superseded load");
    }

    // ---------------------------------------------------------------------------------------
    // invalidate_all and an oversized insert, missed
    // ---------------------------------------------------------------------------------------

    /// src/redis/mod.rs: "A missed `invalidate_all` is seen the same way only while its
    /// tombstones last": the key was in Redis, B's `invalidate_all` tombstoned it; A (deaf) must
    /// not answer with its copy through fail-safe.
    #[test]
    fn holds_missed_invalidate_all_with_the_key_in_redis() {
        let _w = common::watchdog(Duration::from_secs(30), "missed invalidate_all");
        let server = RedisServer::start();
        let ns = "h87ia";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        a.insert(2, "a-ins".into());
        b.invalidate_all();
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r1 = a.load(1);
        let r2 = a.load(2);
        assert!(
            r1.is_err() && r2.is_err(),
            "after B's invalidate_all, A's fail-safe answered: key 1 {r1:?} (was {old:?}), key 2 \
         {r2:?} (was \"a-ins\")"
        );
    }

    /// src/redis/mod.rs: a value larger than `max_value_size` "is kept in the local tier only and
    /// never sent (an `insert` of one leaves a tombstone in Redis instead)".
    ///
    /// B (`max_value_size(4)`) inserts a long value; A (deaf) must not answer with its older
    /// copy through fail-safe: the tombstone is a missed invalidation.
    #[test]
    fn holds_missed_oversized_insert_leaves_a_tombstone_fail_safe_respects() {
        let _w = common::watchdog(Duration::from_secs(30), "missed oversized insert");
        let server = RedisServer::start();
        let ns = "h87oi";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .max_value_size(4)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.insert(1, "long value".into());
        let mut c = raw(&server);
        assert_eq!(rvalue(&mut c, ns, 1), None, "a tombstone");
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            r.is_err(),
            "A answered {r:?} (its copy {old:?}) after B's oversized insert"
        );
    }

    /// src/redis/mod.rs: "`invalidate_all` first advances the namespace's epoch (values written
    /// back by loads that read an older epoch are ignored)"; the guarantee: after
    /// `invalidate_all` returns on any instance, Redis never again yields an older value.
    ///
    /// C (deaf, leases on) loads key 1 under the lease (its loader blocked: its value is from
    /// before). B's `invalidate_all` returns. *Then* A (leases on) loads key 1: it waits on C's
    /// lease (if it still stands) and C's load ends, writing back. A must not be answered with
    /// C's value from before the `invalidate_all`, neither through the lease wait nor later
    /// from Redis.
    #[test]
    fn holds_lease_waiter_after_invalidate_all_ignores_the_holders_older_value() {
        let _w = common::watchdog(Duration::from_secs(30), "invalidate_all lease");
        let server = RedisServer::start();
        let ns = "h87il";
        let clock = ManualClock::new();
        let gate = Gate::new();
        let g = Arc::clone(&gate);
        let cb: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .clock(clock.clone())
            .loader(move |k: &u64| {
                g.pass();
                Ok::<_, BoxError>(format!("c-before{k}"))
            });
        let cc = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(cb, Plain)
            .unwrap();
        let ab: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .clock(clock.clone())
            .loader(|k: &u64| Ok::<_, BoxError>(format!("a-after{k}")));
        let a = fs_tier(server.url(), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(ab, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let c2 = cc.clone();
        let cload = std::thread::spawn(move || c2.load(1));
        gate.wait_entered(); // C holds the lease, its value from before
        b.invalidate_all();
        let a2 = a.clone();
        let aload = std::thread::spawn(move || a2.load(1));
        // Let A reach its wait (or its own load), then let C finish. Either order must hold: this
        // only makes the wait likely (a busy machine may not get there in time).
        let _ = eventually(|| a.stats().loads_in_flight == 1 || aload.is_finished());
        gate.open();
        let rc = cload.join().unwrap();
        let ra = aload.join().unwrap();
        let mut c = raw(&server);
        let in_redis = rvalue(&mut c, ns, 1);
        a.local().invalidate(&1);
        let again = a.load(1);
        assert!(
            !matches!(ra.as_deref(), Ok("c-before1"))
                && !matches!(again.as_deref(), Ok("c-before1")),
            "after invalidate_all returned, A got C's older value: {ra:?}, then {again:?} (C \
         {rc:?}, Redis d={in_redis:?})"
        );
    }

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen"; a
    /// tombstone counts as heard only when "written, announced, or loaded past" (a load that read
    /// it) — not by a write-back that it refused.
    ///
    /// A (deaf, fail-safe) reads key 1 (nothing there) and loads (blocked). B invalidates (A
    /// misses it). A's load ends: its value (from a load that began before the invalidation) is
    /// kept locally (the missed-message bound) and its write-back is refused. Past its time to
    /// live, with the backend down, A's load reads the tombstone — still a missed one — and must
    /// answer the error, not the copy.
    #[test]
    fn holds_refused_write_back_does_not_count_the_tombstone_as_heard() {
        let _w = common::watchdog(Duration::from_secs(30), "refused write-back");
        let server = RedisServer::start();
        let ns = "h87rw";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
        let builder: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if d.load(Ordering::SeqCst) {
                    return Err(BoxError::from("backend down"));
                }
                g.pass();
                Ok(format!("a-before{k}"))
            });
        let a = fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let a2 = a.clone();
        let load = std::thread::spawn(move || a2.load(1));
        gate.wait_entered();
        b.invalidate(&1); // lost for A
        gate.open();
        let first = load.join().unwrap();
        let mut c = raw(&server);
        assert_eq!(rvalue(&mut c, ns, 1), None, "write-back refused: {first:?}");
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            r.is_err(),
            "A's fail-safe served {r:?}, loaded before B's invalidation (tombstone in Redis)"
        );
    }

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen (...) So do
    /// (...) callers arriving while such a load runs"; CHANGELOG round 85: "the waiters poll a
    /// dropped leader's loader future to its end".
    ///
    /// A (deaf, leases on; another instance holds the lease) missed B's invalidation. An async
    /// leader (`try_get_with_async`, a tokio task) reads the tombstone and waits on the lease; a
    /// blocking `load` of the key joins it; the task is aborted. The joined caller goes on with
    /// the dropped leader's load (the lease is then freed: the load takes it and fails) and must
    /// get the error, not the copy; so must the next `load` and `get_or_stale`.
    #[test]
    fn holds_blocking_joiner_of_an_aborted_async_leader_in_a_lease_wait() {
        let _w = common::watchdog(Duration::from_secs(30), "joiner of aborted async leader");
        let server = RedisServer::start();
        let ns = "h87jn";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        let lkey = format!("hc:{}:{ns}:l{{1}}", ns.len());
        let mut c = raw(&server);
        redis::cmd("SET")
            .arg(&lkey)
            .arg("another-instance")
            .arg("PX")
            .arg(30_000)
            .query::<()>(&mut c)
            .unwrap();
        clock.advance(Duration::from_secs(71));
        down.store(true, Ordering::SeqCst);
        let rt = runtime();
        let a2 = a.clone();
        let task = rt.spawn(async move {
            a2.try_get_with_async(1, async { Err::<String, BoxError>("down".into()) })
                .await
        });
        assert!(
            eventually(|| a.stats().remote.lease_waits >= 1),
            "leader in the wait"
        );
        let before = a.stats().coalesced;
        let a3 = a.clone();
        let joiner = std::thread::spawn(move || a3.load(1));
        assert!(
            eventually(|| a.stats().coalesced > before),
            "the load joined"
        );
        task.abort();
        let _ = rt.block_on(task);
        redis::cmd("DEL").arg(&lkey).query::<()>(&mut c).unwrap();
        let rj = joiner.join().unwrap();
        assert!(eventually(|| a.stats().loads_in_flight == 0));
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(
        rj.is_err() && stale.is_none() && r.is_err(),
        "A served {old:?} (B invalidated it): joiner {rj:?}, get_or_stale {stale:?}, load {r:?}"
    );
    }
}

/// `get_or_stale` after a refresh that read a missed tombstone, Redis frozen during a lease wait that had read the tombstone, and Redis restarted while a deaf instance's load runs.
mod c {

    use super::common;
    use super::proxy;
    use common::tier::*;
    use herdcache_testkit::redis_server::RedisServer;

    use common::{eventually, Gate};
    use herdcache::codec::Plain;
    use herdcache::redis::RedisTier;
    use herdcache::{BoxError, Cache, CacheBuilder, ManualClock};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen (...) a
    /// refresh that reads the tombstone and fails keeps the copy until its time to live, as a
    /// missed message does, and a later load sees the tombstone again"; fail_safe.rs: a caller
    /// that gives up "gets the old value from `Cache::get_or_stale`"; round 83: "`get_or_stale`
    /// checks a running load's flag".
    ///
    /// A (deaf, `refresh_after` 30 s) missed B's invalidation. A's refresh reads the tombstone
    /// (remembered as read) and fails: the copy stays until its time to live (documented). Past
    /// it, `get_or_stale` — fail-safe's fallback for callers that give up — answers with the copy
    /// this instance has already seen invalidated in Redis, while `load` answers the error.
    #[test]
    fn get_or_stale_refuses_the_copy_a_failed_refresh_saw_invalidated() {
        let _w = common::watchdog(Duration::from_secs(30), "refresh then get_or_stale");
        let server = RedisServer::start();
        let ns = "h87gs";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .build(
                counted_fail_safe_builder(&clock, &down, &n, "a")
                    .refresh_after(Duration::from_secs(30)),
                Plain,
            )
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        let calls = n.load(Ordering::SeqCst);
        assert_eq!(a.load(1).unwrap(), old, "live copy, refresh due");
        assert!(
            eventually(|| n.load(Ordering::SeqCst) > calls && a.stats().loads_in_flight == 0),
            "the refresh ran"
        );
        assert!(a.stats().refreshes_failed >= 1, "{:?}", a.stats());
        clock.advance(Duration::from_secs(30)); // past the time to live
        let stale = a.get_or_stale(&1);
        let r = a.load(1);
        assert!(r.is_err(), "the load reads the tombstone: {r:?}");
        assert_eq!(
            stale, None,
            "get_or_stale answered with the copy B invalidated (A's refresh had read the \
         tombstone; load answers {r:?})"
        );
    }

    /// src/redis/mod.rs: "A missed invalidation of the key does not let that happen"; round 83:
    /// "a lease wait marks its load as forgoing the fallback as soon as a read finds a
    /// tombstone".
    ///
    /// A (deaf, leases on) missed B's invalidation; another instance holds the lease. A's load
    /// reads the tombstone and waits on the lease; Redis then freezes (SIGSTOP): the next poll
    /// times out and A loads without Redis. Its failure must still answer the error (the
    /// tombstone was read before Redis went away).
    #[test]
    fn holds_redis_frozen_during_a_lease_wait_that_read_the_tombstone() {
        let _w = common::watchdog(Duration::from_secs(30), "frozen lease wait");
        let server = RedisServer::start();
        let ns = "h87fz";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(30), Duration::from_secs(20))
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let b = fs_tier(server.url(), ns)
            .build(fail_safe_builder(&clock, &up, "b"), Plain)
            .unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        let mut c = raw(&server);
        redis::cmd("SET")
            .arg(format!("hc:{}:{ns}:l{{1}}", ns.len()))
            .arg("another-instance")
            .arg("PX")
            .arg(30_000)
            .query::<()>(&mut c)
            .unwrap();
        clock.advance(Duration::from_secs(71));
        down.store(true, Ordering::SeqCst);
        let a2 = a.clone();
        let load = std::thread::spawn(move || a2.load(1));
        assert!(
            eventually(|| a.stats().remote.lease_waits >= 1),
            "A read the tombstone and waits on the lease"
        );
        server.pause();
        let r = load.join().unwrap();
        let second = a.load(1); // Redis still frozen: its read times out
        server.resume();
        assert!(
            r.is_err() && second.is_err(),
            "A served {old:?} (B invalidated it; the wait had read the tombstone): {r:?}, then \
         {second:?}"
        );
    }

    /// src/redis/mod.rs: "A read finding no epoch (...) a restart without persistence (...) sets
    /// one first (...): a load that read before such a loss, whose write-back finds its key's
    /// version gone, writes back a value every later read ignores."
    ///
    /// A (deaf) reads the key (absent) and loads (blocked). B invalidates; Redis restarts with
    /// nothing. A's load ends and writes back its value from before B's invalidate. B's next
    /// load must not take that value from Redis.
    #[test]
    fn holds_load_spanning_an_invalidate_and_a_restart_is_ignored() {
        let _w = common::watchdog(Duration::from_secs(30), "restart mid-load");
        let mut server = RedisServer::start();
        let ns = "h87rs";
        let clock = ManualClock::new();
        let gate = Gate::new();
        let g = Arc::clone(&gate);
        let ab: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .clock(clock.clone())
            .loader(move |k: &u64| {
                g.pass();
                Ok::<_, BoxError>(format!("a-before-invalidate{k}"))
            });
        let a = fs_tier(deaf_url(&server), ns).build(ab, Plain).unwrap();
        let bb: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .clock(clock.clone())
            .loader(|k: &u64| Ok::<_, BoxError>(format!("b-fresh{k}")));
        let b = fs_tier(server.url(), ns).build(bb, Plain).unwrap();
        let a2 = a.clone();
        let load = std::thread::spawn(move || a2.load(1));
        gate.wait_entered(); // A read Redis (nothing) and loads
        b.invalidate(&1);
        server.restart();
        deaf_user(&server);
        // A's connections reconnect (a failed operation drops its connection).
        let mut c = raw(&server);
        assert!(
            eventually(|| {
                a.insert(99, "probe".into());
                rvalue(&mut c, ns, 99).is_some()
            }),
            "A reaches the restarted server"
        );
        gate.open();
        let ra = load.join().unwrap();
        let in_redis = rvalue(&mut c, ns, 1);
        let rb = b.load(1).unwrap();
        assert_ne!(
            rb, "a-before-invalidate1",
            "B read A's load from before its invalidate (A's load {ra:?}, Redis d={in_redis:?})"
        );
    }

    /// src/redis/mod.rs: "the failed load's read of Redis finds the key's tombstone, and the
    /// load's callers get its error (...) So do a soft timeout's callers, and callers arriving
    /// while such a load runs".
    ///
    /// A (deaf, through a proxy, operation timeout 5 s, soft timeout 200 ms, a spawner) missed
    /// B's invalidation; its copy expired and its backend is down. Redis's replies are held back
    /// (a slow link, not a failure: the read answers within its timeout): the soft timeout
    /// passes before the read, and its caller gets the copy (observed, reported in the message:
    /// nothing read yet). Once the read lands (the tombstone), the load fails: every later
    /// caller, and `get_or_stale`, must get nothing from the copy.
    #[test]
    fn holds_slow_read_after_a_soft_timeout_later_callers_get_the_error() {
        let _w = common::watchdog(Duration::from_secs(30), "slow read soft timeout");
        let server = RedisServer::start();
        let ns = "h87sl";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        deaf_user(&server);
        let px = proxy::Proxy::start(server.port);
        let a = RedisTier::new(format!("redis://deaf:pw@127.0.0.1:{}/", px.port()))
            .namespace(ns)
            .timeouts(Duration::from_millis(300), Duration::from_secs(5))
            .breaker(1_000_000, Duration::from_millis(1))
            .build(
                counted_fail_safe_builder(&clock, &down, &n, "a")
                    .spawner(|job| {
                        std::thread::spawn(job);
                    })
                    .load_timeout(Duration::from_millis(200)),
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
        down.store(true, Ordering::SeqCst);
        px.stall(true);
        let first = a.load(1); // the soft timeout passes while the read is held back
        px.stall(false);
        assert!(eventually(|| a.stats().loads_in_flight == 0));
        let second = a.load(1);
        let stale = a.get_or_stale(&1);
        assert!(
            second.is_err() && stale.is_none(),
            "A served {old:?} (B invalidated it) after its load read the tombstone: later load \
         {second:?}, get_or_stale {stale:?} (the soft-timed-out caller got {first:?})"
        );
    }

    /// src/redis/mod.rs: "With fail_safe a local copy is kept past its time to live, and a
    /// failed load of it may serve it up to `max_stale` longer. A missed invalidation of the key
    /// does not let that happen: the failed load's read of Redis finds the key's tombstone (...)
    /// (tombstones then live at least the longer of the cache's and the tier's time to live plus
    /// `max_stale`, so that the tombstone is still there".
    ///
    /// A (deaf, fail-safe: time to live 60 s, `max_stale` 600 s) and B (the same tier, no
    /// fail-safe: say a writer service) share a namespace. B's invalidation leaves a tombstone
    /// that lives B's 60 s only, while A may serve its copy up to 660 s after loading it: once
    /// the tombstone is gone (shown by expiring it when its `PTTL` says Redis would), A's failed
    /// load finds nothing and fail-safe serves the copy B invalidated (round 87 found it; now
    /// documented, src/redis/mod.rs: "A tombstone lives as long as the *invalidating*
    /// instance's settings say (...) instances sharing a namespace should share their time to
    /// live and fail-safe settings"). Pinned: B's tombstone lives B's time to live, and A
    /// serves the copy once it is gone.
    #[test]
    fn bound_tombstone_lives_as_the_invalidating_instances_settings_say() {
        let _w = common::watchdog(Duration::from_secs(30), "tombstone lifetime across configs");
        let server = RedisServer::start();
        let ns = "h87tt";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let a = fs_tier(deaf_url(&server), ns)
            .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
            .unwrap();
        let bb: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .clock(clock.clone())
            .loader(|k: &u64| Ok::<_, BoxError>(format!("b{k}")));
        let b = fs_tier(server.url(), ns).build(bb, Plain).unwrap();
        let old = a.load(1).unwrap();
        b.invalidate(&1); // lost for A
        let mut c = raw(&server);
        let left = pttl(&mut c, &vkey(ns, 1));
        // 120 s of A's clock later (well inside A's 660 s window), the tombstone (`left` ms) is gone.
        if left < 120_000 {
            redis::cmd("PEXPIRE")
                .arg(vkey(ns, 1))
                .arg(1)
                .query::<()>(&mut c)
                .unwrap();
            assert!(common::eventually(|| rversion(&mut c, ns, 1).is_none()));
        }
        clock.advance(Duration::from_secs(120));
        down.store(true, Ordering::SeqCst);
        let r = a.load(1);
        assert!(
            left <= 60_000,
            "B's tombstone: B's 60 s time to live, was {left} ms"
        );
        assert_eq!(
            r.ok(),
            Some(old),
            "once B's tombstone is gone, A's fail-safe answers the copy (the documented bound)"
        );
    }
}
