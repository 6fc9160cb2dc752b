//! Round 86 of the outside attacks (a helper given the public API only) on round 84's fixes:
//! `or_insert`/`or_default` with fail-safe, the end of the clock, and the counting of
//! `stale_served_after_ttl`. 44 tests; five failed, all in round 84's `or_insert` path, which
//! ran `or_insert_with` and undid fail-safe's answer afterwards:
//!
//! * `a::or_insert_in_backoff_is_not_a_stale_answer` and
//!   `c::or_insert_after_an_init_panic_does_not_count_stale`: the undone answer was still
//!   counted in `stale_served_after_ttl`;
//! * `a::or_insert_in_backoff_does_not_clone_the_expired_value`: it cloned the expired value
//!   (a panicking `Clone` reached the caller) only to throw it away;
//! * `a::write_after_the_stale_answer_never_returns_the_expired_value` (and its async twin):
//!   a write landing between the answer and the `contains_key` check made it return the
//!   expired value.
//!
//! Now, with fail-safe, `or_insert` treats an expired entry as absent from the start: a live
//! read (a hit, counted), else an insert-if-absent computation (counted as a load that
//! succeeded, or as coalesced when a write got there first). The race tests now put the write
//! in the new window (between the miss and the computation, by the key's second `Hash`), and
//! the tests that waited for the `or_insert` to join by its `coalesced` count wait for its
//! miss. Everything at the end of the clock held.
#![allow(clippy::type_complexity)]

// Helpers the modules below share.
mod common;

use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Aborts the process if not dropped within 30 s: a hang fails the run instead of hanging it.
fn watchdog(what: &'static str) -> common::Watchdog {
    common::watchdog(secs(30), what)
}

/// or_insert / or_default with fail_safe (round 84's `or_insert_value`).
mod a {
    use super::{secs, watchdog};
    use herdcache::{BoxError, Cache, Expiry, ManualClock, Op, RemovalCause};
    use std::cell::RefCell;
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A cache whose loader always fails, counting its calls: ttl 60 s, fail_safe 600 s,
    /// refresh_backoff 1000 s.
    fn failing(clock: &ManualClock, calls: &Arc<AtomicU64>) -> herdcache::CacheBuilder<u64, u64> {
        let calls = calls.clone();
        Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<u64, BoxError>("down".into())
            })
    }

    /// Puts key 1 (value 100) into a failed load's backoff: expired, load failed, answered stale.
    fn into_backoff(cache: &Cache<u64, u64>, clock: &ManualClock) {
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(
            cache.load(1).unwrap(),
            100,
            "fail-safe answers the failed load"
        );
    }

    /// stats.rs: `stale_served_after_ttl` counts "Calls answered with a value past its time to
    /// live because its load failed"; entry.rs: during the backoff `or_insert` "stores
    /// `default()` as for an absent key". An `or_insert` that stored and returned its own value
    /// was not answered with the old one: it must not count.
    #[test]
    fn or_insert_in_backoff_is_not_a_stale_answer() {
        let _w = watchdog("stale count");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        into_backoff(&cache, &clock);
        let before = cache.stats();
        let e = cache.entry(1).or_insert(200);
        let after = cache.stats();
        assert_eq!((*e.value(), e.is_fresh()), (200, true));
        assert_eq!(
            after.stale_served_after_ttl - before.stale_served_after_ttl,
            0,
            "or_insert returned its own value (200), yet stale_served_after_ttl counted it"
        );
    }

    /// stats.rs `misses`: "in a cache read only through those calls [.. the entry API's
    /// `or_insert*`], once every call has returned, misses == load_successes + load_failures +
    /// loads_abandoned + coalesced + negative_hits"; and hits count "Lookups that found a live
    /// entry" (none here).
    #[test]
    fn or_insert_in_backoff_keeps_the_miss_balance() {
        let _w = watchdog("balance");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        into_backoff(&cache, &clock);
        cache.entry(1).or_insert(200);
        cache.entry(2).or_default();
        let s = cache.stats();
        assert_eq!(s.hits, 0, "no call found a live entry: {s:?}");
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "miss balance broken: {s:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "or_insert loads nothing");
    }

    /// fail_safe.rs: "`get`, `contains_key`, iteration and `and_compute_with` see an expired
    /// entry as absent, and so do `or_insert` and `or_default`"; removal.rs: replacing an expired
    /// entry reports it `Expired`. The old value must be reported exactly once, as Expired, and
    /// the stored default not at all.
    #[test]
    fn or_insert_in_backoff_reports_the_old_value_once_expired() {
        let _w = watchdog("listener");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let seen: Arc<Mutex<Vec<(u64, u64, RemovalCause)>>> = Arc::default();
        let s2 = seen.clone();
        let cache = failing(&clock, &calls)
            .eviction_listener(move |k, v, c| s2.lock().unwrap().push((*k, *v, c)))
            .build();
        into_backoff(&cache, &clock);
        let e = cache.entry(1).or_insert(200);
        assert_eq!(*e.value(), 200);
        // Any sweep that may still be due: reads, a pass over the entries.
        let _ = cache.get(&1);
        cache.run_pending_tasks();
        assert_eq!(
            seen.lock().unwrap().clone(),
            vec![(1, 100, RemovalCause::Expired)],
            "listener reports"
        );
    }

    /// entry.rs or_default: same contract as or_insert (the value `V::default()` stored).
    #[test]
    fn or_default_in_backoff_stores_default() {
        let _w = watchdog("or_default");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        into_backoff(&cache, &clock);
        let e = cache.entry(1).or_default();
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (0, true, Some(0))
        );
        // And it is a live value again: no backoff, no stale answer for it.
        assert_eq!(cache.load(1).unwrap(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a hit loads nothing");
    }

    /// fail_safe.rs: "the entry API's `or_insert_with` family" falls back: during the backoff
    /// `or_insert_with` (and `_if`, `optionally_`, `try_`) get the old value, init not run,
    /// `is_fresh` false (entry.rs is_fresh: "being answered by fail_safe with the old value").
    #[test]
    fn or_insert_with_family_in_backoff_is_answered_stale() {
        let _w = watchdog("or_insert_with family");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        into_backoff(&cache, &clock);
        let e = cache
            .entry(1)
            .or_insert_with(|| panic!("init must not run in the backoff"));
        assert_eq!((*e.value(), e.is_fresh()), (100, false), "or_insert_with");
        let e = cache
            .entry(1)
            .or_optionally_insert_with(|| panic!("init must not run"))
            .expect("stale answer");
        assert_eq!(
            (*e.value(), e.is_fresh()),
            (100, false),
            "or_optionally_insert_with"
        );
        let e = cache
            .entry(1)
            .or_try_insert_with(|| -> Result<u64, BoxError> { panic!("init must not run") })
            .expect("stale answer");
        assert_eq!(
            (*e.value(), e.is_fresh()),
            (100, false),
            "or_try_insert_with"
        );
        assert_eq!(cache.get(&1), None, "nothing stored");
        // and_upsert_with sees the expired entry as absent.
        let e = cache.entry(1).and_upsert_with(|cur| {
            assert!(
                cur.is_none(),
                "expired entry must be absent to and_upsert_with"
            );
            7
        });
        assert_eq!(
            (*e.value(), e.is_old_value_replaced(), cache.get(&1)),
            (7, false, Some(7))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// Unchanged without fail_safe: or_insert on an expired key stores its default (as
    /// or_insert_with would run its init).
    #[test]
    fn or_insert_without_fail_safe_matches_or_insert_with() {
        let _w = watchdog("no fail safe");
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(1, 100);
        cache.insert(2, 100);
        clock.advance(secs(61));
        let a = cache.entry(1).or_insert(200);
        let b = cache.entry(2).or_insert_with(|| 200);
        assert_eq!((a.value(), a.is_fresh()), (b.value(), b.is_fresh()));
        assert_eq!((cache.get(&1), cache.get(&2)), (Some(200), Some(200)));
        let s = cache.stats();
        assert_eq!(
            (s.misses, s.load_successes, s.stale_served_after_ttl),
            (2, 2, 0),
            "{s:?}"
        );
    }

    /// A per-entry Expiry: the or_insert over the expired entry is a creation (fail_safe.rs: the
    /// expired entry is absent to it); its deadline is `expire_after_create`'s, not the
    /// `expire_after_update`'s.
    #[test]
    fn or_insert_in_backoff_is_a_creation_for_expiry() {
        struct E;
        impl Expiry<u64, u64> for E {
            fn expire_after_create(&self, _: &u64, _: &u64) -> Option<Duration> {
                Some(secs(10))
            }
            fn expire_after_update(
                &self,
                _: &u64,
                _: &u64,
                _: Option<Duration>,
            ) -> Option<Duration> {
                Some(secs(10_000))
            }
        }
        let _w = watchdog("expiry");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .expire_after(E)
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                c2.fetch_add(1, Ordering::SeqCst);
                Err::<u64, BoxError>("down".into())
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(11));
        assert_eq!(cache.load(1).unwrap(), 100);
        assert_eq!(*cache.entry(1).or_insert(200).value(), 200);
        clock.advance(secs(9));
        assert_eq!(cache.get(&1), Some(200), "live before its create deadline");
        clock.advance(secs(1));
        assert_eq!(cache.get(&1), None, "expired at create deadline (10 s)");
    }

    /// time_to_idle instead of a ttl: same contract.
    #[test]
    fn or_insert_in_backoff_with_time_to_idle() {
        let _w = watchdog("tti");
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_idle(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .clock(clock.clone())
            .loader(|_k: &u64| Err::<u64, BoxError>("down".into()))
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(cache.load(1).unwrap(), 100);
        let e = cache.entry(1).or_insert(200);
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (200, true, Some(200))
        );
        clock.advance(secs(59));
        assert_eq!(cache.get(&1), Some(200));
    }

    /// A weigher panic while or_insert stores its value in the backoff: the panic reaches the
    /// caller; the cache is left consistent (no key left loading, the old value still the
    /// fail-safe answer of a load, a later or_insert works).
    #[test]
    fn weigher_panic_in_or_insert_backoff_path() {
        let _w = watchdog("weigher panic");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls)
            .weigher(|_k, v: &u64| {
                if *v == 666 {
                    panic!("weigher boom");
                }
                1
            })
            .build();
        into_backoff(&cache, &clock);
        let c = cache.clone();
        let r = std::thread::spawn(move || c.entry(1).or_insert(666)).join();
        assert!(r.is_err(), "the weigher's panic reaches the caller");
        assert_eq!(cache.loads_in_flight(), 0, "no key left loading");
        assert_eq!(
            cache.load(1).unwrap(),
            100,
            "old value still the fail-safe answer"
        );
        let e = cache.entry(1).or_insert(200);
        assert_eq!((*e.value(), cache.get(&1)), (200, Some(200)));
    }

    // ---- a write landing between or_insert's miss and its computation ----
    // (Round 86 found a write landing between the fail-safe answer the first version of
    // `or_insert_value` undid and its `contains_key` check; with no fail-safe answer any more,
    // the window is between the live read that misses and the insert-if-absent computation.)

    thread_local! {
        /// Hashes of a `Key` on this thread until the pending write runs (at the last one).
        static ARM: RefCell<u32> = const { RefCell::new(0) };
        static HOOK: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Key(u64);
    impl Clone for Key {
        fn clone(&self) -> Self {
            Key(self.0)
        }
    }
    impl Hash for Key {
        fn hash<H: Hasher>(&self, h: &mut H) {
            let fire = ARM.with(|a| {
                let mut a = a.borrow_mut();
                let was = *a;
                *a = was.saturating_sub(1);
                was == 1
            });
            if fire {
                if let Some(f) = PENDING.with(|p| p.borrow_mut().take()) {
                    f();
                }
            }
            if let Some(f) = HOOK.with(|x| x.borrow_mut().take()) {
                f();
            }
            self.0.hash(h)
        }
    }

    #[derive(Debug, PartialEq, Eq, Default, Clone)]
    struct Val(u64);
    thread_local! {
        static PENDING: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    /// entry.rs or_insert_value: the insert-if-absent computation "stores `default()` ... or
    /// returns the value a write or load stored first". An `insert(300)` that lands between
    /// `or_insert`'s live read (a miss: the entry expired, in a failed load's backoff) and its
    /// computation: linearizable answers are 200 stored (then overwritten) or 300 found; the
    /// expired 100 is never a possible answer for `or_insert` (round 86 saw it returned when the
    /// write landed after the fail-safe answer the first version undid).
    #[test]
    fn write_after_the_stale_answer_never_returns_the_expired_value() {
        let _w = watchdog("race");
        let clock = ManualClock::new();
        let cache: Cache<Key, Val> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .clock(clock.clone())
            .loader(|_k: &Key| Err::<Val, BoxError>("down".into()))
            .build();
        cache.insert(Key(1), Val(100));
        clock.advance(secs(61));
        assert_eq!(cache.load(Key(1)).unwrap(), Val(100));
        // The writer: a thread that inserts 300 when told, and says when done.
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let writer = std::thread::spawn(move || {
            if go_rx.recv_timeout(secs(30)).is_ok() {
                c.insert(Key(1), Val(300));
                let _ = done_tx.send(());
            }
        });
        PENDING.with(|p| {
            *p.borrow_mut() = Some(Box::new(move || {
                go_tx.send(()).unwrap();
                done_rx.recv_timeout(secs(30)).expect("writer done");
            }))
        });
        // The write runs at the second hash of the key on this thread: `or_insert`'s own (its
        // live read) is the first, its computation's the second.
        ARM.with(|a| *a.borrow_mut() = 2);
        let e = cache.entry(Key(1)).or_insert(Val(200));
        let hook_ran =
            HOOK.with(|h| h.borrow().is_none()) && PENDING.with(|p| p.borrow().is_none());
        ARM.with(|a| *a.borrow_mut() = 0);
        HOOK.with(|h| h.borrow_mut().take());
        drop(PENDING.with(|p| p.borrow_mut().take()));
        writer.join().unwrap();
        assert!(
            hook_ran,
            "test setup: the write did not happen during or_insert"
        );
        let got = (e.value().0, e.is_fresh());
        assert!(
            got == (300, false) || got == (200, true),
            "or_insert returned {got:?}; the key now holds {:?}",
            cache.get(&Key(1))
        );
        if got == (200, true) {
            // 200 stored first, then overwritten by the insert: fine.
        }
        assert_eq!(cache.get(&Key(1)), Some(Val(300)), "the write stands");
    }

    /// Same window (between the miss and the computation), with an `invalidate` instead: the
    /// key is then absent and or_insert must store its value (200) and say so.
    #[test]
    fn invalidate_after_the_stale_answer_then_or_insert_stores() {
        let _w = watchdog("race invalidate");
        let clock = ManualClock::new();
        let cache: Cache<Key, Val> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .clock(clock.clone())
            .loader(|_k: &Key| Err::<Val, BoxError>("down".into()))
            .build();
        cache.insert(Key(1), Val(100));
        clock.advance(secs(61));
        assert_eq!(cache.load(Key(1)).unwrap(), Val(100));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let writer = std::thread::spawn(move || {
            if go_rx.recv_timeout(secs(30)).is_ok() {
                c.invalidate(&Key(1));
                let _ = done_tx.send(());
            }
        });
        PENDING.with(|p| {
            *p.borrow_mut() = Some(Box::new(move || {
                go_tx.send(()).unwrap();
                done_rx.recv_timeout(secs(30)).expect("writer done");
            }))
        });
        // The write runs at the second hash of the key on this thread: `or_insert`'s own (its
        // live read) is the first, its computation's the second.
        ARM.with(|a| *a.borrow_mut() = 2);
        let e = cache.entry(Key(1)).or_insert(Val(200));
        let hook_ran =
            HOOK.with(|h| h.borrow().is_none()) && PENDING.with(|p| p.borrow().is_none());
        ARM.with(|a| *a.borrow_mut() = 0);
        HOOK.with(|h| h.borrow_mut().take());
        drop(PENDING.with(|p| p.borrow_mut().take()));
        writer.join().unwrap();
        assert!(
            hook_ran,
            "test setup: the invalidate did not happen during or_insert"
        );
        assert_eq!(
            (e.value().0, e.is_fresh(), cache.get(&Key(1))),
            (200, true, Some(Val(200)))
        );
    }

    /// A retry of the key running (its caller blocked in the loader) when or_insert comes: the
    /// retry then succeeds with 300. Linearizable answers: or_insert stored 200 before the load
    /// landed (then 300 replaces it... but a write wins over a running load, so 200 stays), or
    /// found 300. Whatever it answered must be what the key holds right after, and the expired
    /// 100 is never the answer.
    #[test]
    fn or_insert_during_a_running_retry_that_succeeds() {
        let _w = watchdog("running retry");
        let clock = ManualClock::new();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<Result<u64, String>>();
        let entered_tx = Mutex::new(entered_tx);
        let release_rx = Mutex::new(release_rx);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                entered_tx.lock().unwrap().send(()).unwrap();
                let r = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(secs(30))
                    .expect("released");
                r.map_err(BoxError::from)
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        release_tx.send(Err("down".into())).unwrap();
        assert_eq!(cache.load(1).unwrap(), 100);
        entered_rx.recv().unwrap();
        clock.advance(secs(11)); // past the retry deadline
        let c = cache.clone();
        let retrier = std::thread::spawn(move || c.load(1));
        entered_rx.recv_timeout(secs(30)).expect("retry entered");
        // The or_insert: fail-safe answers its inner load stale (a retry runs), then it stores
        // (waiting for the retry, as a computation does). Release the retry from another thread
        // once or_insert is underway.
        let c = cache.clone();
        let inserter = std::thread::spawn(move || c.entry(1).or_insert(200));
        // Let the retry succeed; order relative to the or_insert is free.
        release_tx.send(Ok(300)).unwrap();
        let r = retrier.join().unwrap();
        let e = inserter.join().unwrap();
        let held = cache.get(&1);
        assert_ne!(*e.value(), 100, "or_insert answered the expired value");
        assert!(
            (e.is_fresh() && *e.value() == 200) || (!e.is_fresh() && *e.value() == 300),
            "or_insert answered {:?} (fresh {}), retry {:?}, key holds {held:?}",
            e.value(),
            e.is_fresh(),
            r
        );
    }

    /// The async twins during the backoff: same contract as the blocking ones.
    #[test]
    fn or_insert_async_and_or_default_async_in_backoff_store() {
        let _w = watchdog("async");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        cache.insert(2, 100);
        into_backoff(&cache, &clock);
        assert_eq!(cache.load(2).unwrap(), 100);
        rt.block_on(async {
            let e = cache.entry(1).or_insert_async(200).await;
            assert_eq!((*e.value(), e.is_fresh()), (200, true), "or_insert_async");
            let e = cache.entry(2).or_default_async().await;
            assert_eq!((*e.value(), e.is_fresh()), (0, true), "or_default_async");
            let e = cache.entry(1).or_insert_async(999).await;
            assert_eq!(
                (*e.value(), e.is_fresh()),
                (200, false),
                "found, not stored"
            );
        });
        assert_eq!((cache.get(&1), cache.get(&2)), (Some(200), Some(0)));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// entry.rs is_fresh: "A fresh value is returned even when it is not kept: one heavier than
    /// `max_capacity` is stored and at once evicted (the listener sees it removed for Size)".
    /// In the backoff, or_insert of a too-heavy value: 200 fresh, reported Size once; the old
    /// value reported Expired once.
    #[test]
    fn or_insert_too_heavy_in_backoff_reports_size_and_expired_once() {
        let _w = watchdog("heavy");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let seen: Arc<Mutex<Vec<(u64, u64, RemovalCause)>>> = Arc::default();
        let s2 = seen.clone();
        let cache = failing(&clock, &calls)
            .weigher(|_k, v: &u64| if *v == 200 { 1000 } else { 1 })
            .eviction_listener(move |k, v, c| s2.lock().unwrap().push((*k, *v, c)))
            .build();
        into_backoff(&cache, &clock);
        let e = cache.entry(1).or_insert(200);
        assert_eq!((*e.value(), e.is_fresh()), (200, true));
        assert_eq!(cache.get(&1), None);
        cache.run_pending_tasks();
        let mut got = seen.lock().unwrap().clone();
        got.sort_by_key(|x| x.1);
        assert_eq!(
            got,
            vec![
                (1, 100, RemovalCause::Expired),
                (1, 200, RemovalCause::Size)
            ],
            "listener reports"
        );
    }

    /// A value's Clone that panics for the expired value: or_insert has no use for it (a value in
    /// hand is no load). Whatever reaches the caller, the cache must stay consistent: no key left
    /// loading, and a later or_insert stores.
    #[test]
    fn value_clone_panic_in_or_insert_backoff_path() {
        use std::sync::atomic::AtomicBool;
        static BOOM: AtomicBool = AtomicBool::new(false);
        #[derive(Debug, PartialEq, Eq)]
        struct P(u64);
        impl Clone for P {
            fn clone(&self) -> Self {
                if self.0 == 100 && BOOM.load(Ordering::SeqCst) {
                    panic!("clone boom");
                }
                P(self.0)
            }
        }
        let _w = watchdog("clone panic");
        let clock = ManualClock::new();
        let cache: Cache<u64, P> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .record_stats()
            .clock(clock.clone())
            .loader(|_k: &u64| Err::<P, BoxError>("down".into()))
            .build();
        cache.insert(1, P(100));
        clock.advance(secs(61));
        assert_eq!(cache.load(1).unwrap(), P(100));
        BOOM.store(true, Ordering::SeqCst);
        let c = cache.clone();
        let r = std::thread::spawn(move || c.entry(1).or_insert(P(200))).join();
        BOOM.store(false, Ordering::SeqCst);
        eprintln!(
            "or_insert with a panicking Clone of the old value: {:?}",
            r.as_ref()
                .map(|e| e.value().clone())
                .map_err(|_| "panicked")
        );
        assert_eq!(cache.loads_in_flight(), 0, "no key left loading");
        let e = cache.entry(1).or_insert(P(300));
        let want = match &r {
            Ok(e) => e.value().clone(),
            Err(_) => P(300),
        };
        assert_eq!(e.value(), &want);
        assert_eq!(cache.get(&1), Some(want));
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "miss balance: {s:?}"
        );
    }

    /// A retry running (its loader blocked) when or_insert comes, and the retry's loader panics:
    /// the retrier is answered with the old value; or_insert stores its value (the expired entry
    /// is absent to it), fresh, and that value stays.
    #[test]
    fn or_insert_during_a_retry_whose_loader_panics() {
        let _w = watchdog("retry panics");
        let clock = ManualClock::new();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<bool>();
        let entered_tx = Mutex::new(entered_tx);
        let release_rx = Mutex::new(release_rx);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                entered_tx.lock().unwrap().send(()).unwrap();
                if release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(secs(30))
                    .expect("released")
                {
                    panic!("loader boom");
                }
                Err::<u64, BoxError>("down".into())
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        release_tx.send(false).unwrap();
        assert_eq!(cache.load(1).unwrap(), 100);
        entered_rx.recv().unwrap();
        clock.advance(secs(11));
        let c = cache.clone();
        let retrier = std::thread::spawn(move || c.load(1));
        entered_rx.recv_timeout(secs(30)).expect("retry entered");
        let c = cache.clone();
        let before = cache.stats().misses;
        let inserter = std::thread::spawn(move || c.entry(1).or_insert(200));
        // The or_insert misses (its miss is counted first), then waits for the key.
        let start = std::time::Instant::now();
        while cache.stats().misses == before {
            assert!(start.elapsed() < secs(20), "or_insert never answered");
            std::thread::yield_now();
        }
        release_tx.send(true).unwrap();
        let r = retrier.join();
        let e = inserter.join().expect("or_insert must not panic");
        assert_eq!(
            r.ok().and_then(|r| r.ok()),
            Some(100),
            "retrier answered with the old value"
        );
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (200, true, Some(200)),
            "or_insert after the retry's panic"
        );
    }

    /// entry.rs or_insert: "If a load of the key is running, waits for it and returns its
    /// value". A first load of the expired key that succeeds with 300: or_insert joins and
    /// returns 300, not fresh — with and without fail_safe (unchanged).
    #[test]
    fn or_insert_joins_a_succeeding_load_with_and_without_fail_safe() {
        let _w = watchdog("join succeeding");
        for fs in [false, true] {
            let clock = ManualClock::new();
            let (entered_tx, entered_rx) = mpsc::channel::<()>();
            let (release_tx, release_rx) = mpsc::channel::<u64>();
            let entered_tx = Mutex::new(entered_tx);
            let release_rx = Mutex::new(release_rx);
            let mut b = Cache::builder()
                .max_capacity(100)
                .time_to_live(secs(60))
                .record_stats()
                .clock(clock.clone())
                .loader(move |_k: &u64| {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    Ok::<u64, BoxError>(release_rx.lock().unwrap().recv_timeout(secs(30)).unwrap())
                });
            if fs {
                b = b.fail_safe(secs(600));
            }
            let cache: Cache<u64, u64> = b.build();
            cache.insert(1, 100);
            clock.advance(secs(61));
            let c = cache.clone();
            let leader = std::thread::spawn(move || c.load(1));
            entered_rx.recv_timeout(secs(30)).unwrap();
            let c = cache.clone();
            let before = cache.stats().misses;
            let ins = std::thread::spawn(move || c.entry(1).or_insert(200));
            let start = std::time::Instant::now();
            // Its miss is counted before it waits (joining the load, or for the key after it).
            while cache.stats().misses == before {
                assert!(start.elapsed() < secs(20), "or_insert never joined");
                std::thread::yield_now();
            }
            release_tx.send(300).unwrap();
            assert_eq!(leader.join().unwrap().unwrap(), 300);
            let e = ins.join().unwrap();
            assert_eq!(
                (*e.value(), e.is_fresh(), cache.get(&1)),
                (300, false, Some(300)),
                "fail_safe={fs}"
            );
            assert_eq!(cache.stats().stale_served_after_ttl, 0);
        }
    }

    /// entry.rs or_insert: "An expired entry is absent here even with fail_safe, whose old value
    /// answers only loads: `default` is stored." An absent value is never cloned: a panicking
    /// Clone of the expired value must not reach or_insert (it does not without fail_safe, nor for
    /// an `insert`).
    #[test]
    fn or_insert_in_backoff_does_not_clone_the_expired_value() {
        use std::sync::atomic::AtomicBool;
        static BOOM: AtomicBool = AtomicBool::new(false);
        #[derive(Debug, PartialEq, Eq)]
        struct P(u64);
        impl Clone for P {
            fn clone(&self) -> Self {
                if self.0 == 100 && BOOM.load(Ordering::SeqCst) {
                    panic!("clone of the expired value");
                }
                P(self.0)
            }
        }
        let _w = watchdog("clone expired");
        let clock = ManualClock::new();
        let cache: Cache<u64, P> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .clock(clock.clone())
            .loader(|_k: &u64| Err::<P, BoxError>("down".into()))
            .build();
        cache.insert(1, P(100));
        clock.advance(secs(61));
        assert_eq!(cache.load(1).unwrap(), P(100));
        BOOM.store(true, Ordering::SeqCst);
        let c = cache.clone();
        let r = std::thread::spawn(move || c.entry(1).or_insert(P(200)).into_value()).join();
        BOOM.store(false, Ordering::SeqCst);
        assert!(
            matches!(r, Ok(P(200))),
            "or_insert over the expired key panicked in the expired value's Clone"
        );
    }

    /// The async twin of the write-in-the-window race: `or_insert_async` must never answer the
    /// expired value either.
    #[test]
    fn async_write_after_the_stale_answer_never_returns_the_expired_value() {
        let _w = watchdog("async race");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let clock = ManualClock::new();
        let cache: Cache<Key, Val> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .clock(clock.clone())
            .loader(|_k: &Key| Err::<Val, BoxError>("down".into()))
            .build();
        cache.insert(Key(1), Val(100));
        clock.advance(secs(61));
        assert_eq!(cache.load(Key(1)).unwrap(), Val(100));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let writer = std::thread::spawn(move || {
            if go_rx.recv_timeout(secs(30)).is_ok() {
                c.insert(Key(1), Val(300));
                let _ = done_tx.send(());
            }
        });
        PENDING.with(|p| {
            *p.borrow_mut() = Some(Box::new(move || {
                go_tx.send(()).unwrap();
                done_rx.recv_timeout(secs(30)).expect("writer done");
            }))
        });
        // The write runs at the second hash of the key on this thread: `or_insert`'s own (its
        // live read) is the first, its computation's the second.
        ARM.with(|a| *a.borrow_mut() = 2);
        let e = rt.block_on(cache.entry(Key(1)).or_insert_async(Val(200)));
        let hook_ran =
            HOOK.with(|h| h.borrow().is_none()) && PENDING.with(|p| p.borrow().is_none());
        ARM.with(|a| *a.borrow_mut() = 0);
        HOOK.with(|h| h.borrow_mut().take());
        drop(PENDING.with(|p| p.borrow_mut().take()));
        writer.join().unwrap();
        assert!(
            hook_ran,
            "test setup: the write did not happen during or_insert_async"
        );
        let got = (e.value().0, e.is_fresh());
        assert!(
            got == (300, false) || got == (200, true),
            "or_insert_async returned {got:?}; the key now holds {:?}",
            cache.get(&Key(1))
        );
    }

    /// negative_ttl docs: `or_insert_with` (which cannot answer a failure) "load[s] the key
    /// again: a value [it] load[s] is stored and ends it". or_insert likewise stores over a
    /// remembered failure, with and without fail_safe.
    #[test]
    fn or_insert_over_a_remembered_failure() {
        let _w = watchdog("negative");
        for fs in [false, true] {
            let clock = ManualClock::new();
            let mut b = Cache::builder()
                .max_capacity(100)
                .time_to_live(secs(60))
                .negative_ttl(secs(30))
                .clock(clock.clone());
            if fs {
                b = b.fail_safe(secs(600));
            }
            let cache: Cache<u64, u64> = b.build();
            assert!(cache.try_get_with(1, || Err::<u64, &str>("x")).is_err());
            let mut n = 0;
            assert!(cache
                .try_get_with(1, || {
                    n += 1;
                    Err::<u64, &str>("x")
                })
                .is_err());
            assert_eq!(n, 0, "remembered");
            let e = cache.entry(1).or_insert(9);
            assert_eq!(
                (*e.value(), e.is_fresh(), cache.get(&1)),
                (9, true, Some(9)),
                "fail_safe={fs}"
            );
            assert_eq!(cache.try_get_with(1, || Err::<u64, &str>("x")).unwrap(), 9);
        }
    }

    /// get_with_if docs: "within a failed key's retry backoff the kept stale value answers,
    /// unjudged, as it answers get_with" — or_insert_with_if too (fail_safe.rs: the
    /// `or_insert_with` family falls back).
    #[test]
    fn or_insert_with_if_in_backoff_is_answered_stale_unjudged() {
        let _w = watchdog("with_if");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        into_backoff(&cache, &clock);
        let mut judged = 0;
        let e = cache.entry(1).or_insert_with_if(
            || panic!("init must not run"),
            |_| {
                judged += 1;
                true
            },
        );
        assert_eq!((*e.value(), e.is_fresh(), judged), (100, false, 0));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A computation of the expired key running (blocked) when or_insert comes in the backoff:
    /// fail_safe.rs: "while a computation of the key runs, the caller joins it". The computation
    /// stores nothing (Nop: "not a failure"); or_insert then stores its value (the expired entry
    /// is absent to it). If the computation Puts 300 instead, or_insert returns 300, not fresh.
    #[test]
    fn or_insert_behind_a_running_computation_in_backoff() {
        let _w = watchdog("behind compute");
        for put in [false, true] {
            let clock = ManualClock::new();
            let calls = Arc::new(AtomicU64::new(0));
            let cache = failing(&clock, &calls).record_stats().build();
            into_backoff(&cache, &clock);
            let (in_tx, in_rx) = mpsc::channel::<()>();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let c = cache.clone();
            let computer = std::thread::spawn(move || {
                c.entry(1).and_compute_with(|cur| {
                    assert!(cur.is_none(), "expired: absent to the computation");
                    in_tx.send(()).unwrap();
                    go_rx.recv_timeout(secs(30)).unwrap();
                    if put {
                        Op::Put(300)
                    } else {
                        Op::Nop
                    }
                })
            });
            in_rx.recv_timeout(secs(30)).unwrap();
            let before = cache.stats().misses;
            let c = cache.clone();
            let ins = std::thread::spawn(move || c.entry(1).or_insert(200));
            let start = std::time::Instant::now();
            // Its miss is counted before it waits for the computation.
            while cache.stats().misses == before {
                assert!(start.elapsed() < secs(20), "or_insert never waited");
                std::thread::yield_now();
            }
            go_tx.send(()).unwrap();
            computer.join().unwrap();
            let e = ins.join().unwrap();
            let want = if put { (300, false) } else { (200, true) };
            assert_eq!(
                (*e.value(), e.is_fresh(), cache.get(&1)),
                (want.0, want.1, Some(want.0)),
                "computation {}",
                if put { "Put(300)" } else { "Nop" }
            );
            assert_eq!(calls.load(Ordering::SeqCst), 1, "nothing loads");
        }
    }

    /// Cancel safety of or_insert_async's new path: dropped while its insert waits for a running
    /// retry of the key, it leaves nothing behind (entry.rs or_insert_async: the async twin; a
    /// dropped computation holds no key), and the retry, then a later or_insert, go on.
    #[test]
    fn or_insert_async_dropped_while_waiting_for_a_retry() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let _w = watchdog("async cancel");
        let clock = ManualClock::new();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        let release_rx = Mutex::new(release_rx);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                entered_tx.lock().unwrap().send(()).unwrap();
                release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(secs(30))
                    .expect("released");
                Err::<u64, BoxError>("down".into())
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        release_tx.send(()).unwrap();
        assert_eq!(cache.load(1).unwrap(), 100);
        entered_rx.recv().unwrap();
        clock.advance(secs(11));
        let c = cache.clone();
        let retrier = std::thread::spawn(move || c.load(1));
        entered_rx.recv_timeout(secs(30)).expect("retry entered");
        assert_eq!(cache.loads_in_flight(), 1);
        {
            let mut fut = Box::pin(cache.entry(1).or_insert_async(200));
            let mut cx = Context::from_waker(Waker::noop());
            match fut.as_mut().poll(&mut cx) {
                Poll::Pending => {}
                Poll::Ready(e) => panic!("or_insert_async did not wait for the retry: {e:?}"),
            }
        }
        assert_eq!(
            cache.loads_in_flight(),
            1,
            "only the retry runs after the drop"
        );
        release_tx.send(()).unwrap();
        assert_eq!(retrier.join().unwrap().unwrap(), 100);
        assert_eq!(cache.loads_in_flight(), 0);
        let e = cache.entry(1).or_insert(300);
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (300, true, Some(300))
        );
    }

    /// fail_safe.rs: a failed load's backoff belongs to that value ("the value that write stored
    /// is never put in a backoff no failed load of it started"; "Until a load fails, the key
    /// behaves as without fail-safe: the first caller after the deadline loads it"). The value
    /// or_insert stored in the backoff, once expired, is loaded by its first caller.
    #[test]
    fn or_insert_value_inherits_no_backoff() {
        let _w = watchdog("no inherited backoff");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let cache = failing(&clock, &calls).build();
        into_backoff(&cache, &clock); // backoff until t = 61 + 1000
        assert_eq!(*cache.entry(1).or_insert(200).value(), 200);
        clock.advance(secs(61)); // 200 expired; the old backoff still running
        assert_eq!(
            cache.load(1).unwrap(),
            200,
            "fail-safe answers with 200 after the load fails"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the first caller after 200's deadline must load (no inherited backoff)"
        );
    }
}

/// the end of the clock (round 84: readings stop at `clock::END`, below every sentinel deadline). Every deadline-like feature at and near the end.
mod b {
    use super::{secs, watchdog};
    use herdcache::{BoxError, Cache, Expiry, ManualClock};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// The clock's last reading, as the crate documents it (`NEVER - 2`).
    const END: u64 = u64::MAX - 2;

    /// A clock standing `before` seconds before the end.
    fn clock_before_end(before: u64) -> ManualClock {
        let c = ManualClock::new();
        c.advance(Duration::from_nanos(END - before * 1_000_000_000));
        c
    }

    /// time_to_live / time_to_idle / Expiry (and jitter): entries written before the jump are
    /// expired at the end; entries written at the end are live (ManualClock docs: "advance ..
    /// `Duration::MAX` is allowed"; an entry expires "exactly at its deadline").
    #[test]
    fn deadlines_before_and_at_the_end() {
        struct E;
        impl Expiry<u64, u64> for E {
            fn expire_after_create(&self, _: &u64, v: &u64) -> Option<Duration> {
                Some(if *v == 0 { Duration::MAX } else { secs(*v) })
            }
            fn expire_after_read(&self, _: &u64, v: &u64, _: Option<Duration>) -> Option<Duration> {
                Some(if *v == 0 { Duration::MAX } else { secs(*v) })
            }
            fn expire_after_update(
                &self,
                _: &u64,
                v: &u64,
                _: Option<Duration>,
            ) -> Option<Duration> {
                Some(if *v == 0 { Duration::MAX } else { secs(*v) })
            }
        }
        let _w = watchdog("deadlines");
        let clock = ManualClock::new();
        let ttl: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .jitter(0.5)
            .clock(clock.clone())
            .build();
        let tti: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_idle(secs(60))
            .clock(clock.clone())
            .build();
        let exp: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .expire_after(E)
            .clock(clock.clone())
            .build();
        for c in [&ttl, &tti, &exp] {
            c.insert(1, 30);
        }
        exp.insert(2, 0); // Duration::MAX: never
        clock.advance(Duration::MAX);
        clock.advance(Duration::MAX);
        for (name, c) in [("ttl", &ttl), ("tti", &tti), ("expiry", &exp)] {
            assert_eq!(
                c.get(&1),
                None,
                "{name}: written before the jump, expired at the end"
            );
            c.insert(3, 30);
            assert_eq!(c.get(&3), Some(30), "{name}: written at the end, live");
            assert_eq!(c.get(&3), Some(30), "{name}: read again at the end, live");
            c.insert(3, 31); // an update at the end
            assert_eq!(c.get(&3), Some(31), "{name}: updated at the end, live");
            clock.advance(Duration::MAX);
            assert_eq!(c.get(&3), Some(31), "{name}: no time passes past the end");
            assert!(c.entry_count() >= 1);
        }
        assert_eq!(exp.get(&2), Some(0), "Duration::MAX expiry: never expires");
        exp.insert(2, 0);
        assert_eq!(
            exp.get(&2),
            Some(0),
            "updated with Duration::MAX at the end: live"
        );
    }

    /// refresh_after docs: "a read of an entry written at least `d` ago .. starts exactly one
    /// reload of the key": at the end (no time passing), reads of the key must not reload it
    /// again and again.
    #[test]
    fn refresh_after_at_the_end_is_no_storm() {
        let _w = watchdog("refresh storm");
        for fail_refresh in [false, true] {
            let clock = clock_before_end(50);
            let calls = Arc::new(AtomicU64::new(0));
            let c2 = calls.clone();
            let cache: Cache<u64, u64> = Cache::builder()
                .max_capacity(10)
                .time_to_live(secs(1000))
                .refresh_after(secs(10))
                .refresh_backoff(secs(5))
                .clock(clock.clone())
                .loader(move |_k: &u64| {
                    let n = c2.fetch_add(1, Ordering::SeqCst);
                    if fail_refresh && n > 0 {
                        Err::<u64, BoxError>("down".into())
                    } else {
                        Ok(n)
                    }
                })
                .build();
            assert_eq!(cache.load(1).unwrap(), 0);
            clock.advance(Duration::MAX);
            for _ in 0..20 {
                assert!(cache.load(1).is_ok());
                let _ = cache.get(&1);
            }
            assert!(
                calls.load(Ordering::SeqCst) <= 2,
                "fail_refresh={fail_refresh}: {} loader calls at the end with no time passing",
                calls.load(Ordering::SeqCst)
            );
        }
    }

    /// early_refresh at the end: the remaining time to a saturated deadline is ~0; reads must
    /// still not reload the key on every read.
    #[test]
    fn early_refresh_at_the_end_is_no_storm() {
        let _w = watchdog("early refresh storm");
        let clock = clock_before_end(50);
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let ck = clock.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .early_refresh(1.0)
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                ck.advance(secs(10)); // each load takes 10 s on the cache's clock
                Ok::<u64, BoxError>(c2.fetch_add(1, Ordering::SeqCst))
            })
            .build();
        assert_eq!(cache.load(1).unwrap(), 0); // deadline END + 20 s: saturated
        clock.advance(Duration::MAX);
        for _ in 0..30 {
            assert!(cache.load(1).is_ok());
        }
        assert!(
            calls.load(Ordering::SeqCst) <= 2,
            "{} loader calls at the end with no time passing",
            calls.load(Ordering::SeqCst)
        );
    }

    /// negative_ttl docs: "a down backend sees at most one call per key per `ttl`": at the end,
    /// no time passes, so one call.
    #[test]
    fn negative_ttl_at_the_end_is_one_call() {
        let _w = watchdog("negative ttl");
        let clock = clock_before_end(1);
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .negative_ttl(secs(5))
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                c2.fetch_add(1, Ordering::SeqCst);
                Err::<u64, BoxError>("down".into())
            })
            .build();
        assert!(cache.load(1).is_err()); // remembered until END + 4 s: saturated
        clock.advance(Duration::MAX);
        for _ in 0..10 {
            assert!(cache.load(1).is_err());
            assert!(cache.try_get_with(2, || Err::<u64, &str>("x")).is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "loader calls at the end");
        // A key remembered at the end: once.
        let mut n = 0;
        for _ in 0..10 {
            let _ = cache.try_get_with(3, || {
                n += 1;
                Err::<u64, &str>("x")
            });
        }
        assert_eq!(n, 1, "try_get_with inits at the end with negative_ttl");
    }

    /// fail_safe docs: "Never beyond `max_stale`: once `deadline + max_stale` passes, the entry
    /// is gone (the check is exact, against the clock ..), and a failure is an error again".
    #[test]
    fn no_stale_value_past_max_stale_at_the_end() {
        let _w = watchdog("max stale");
        for before in [None, Some(1000u64)] {
            let clock = match before {
                None => ManualClock::new(),
                Some(b) => clock_before_end(b),
            };
            let calls = Arc::new(AtomicU64::new(0));
            let c2 = calls.clone();
            let cache: Cache<u64, u64> = Cache::builder()
                .max_capacity(10)
                .time_to_live(secs(10))
                .fail_safe(secs(600))
                .refresh_backoff(secs(5))
                .record_stats()
                .clock(clock.clone())
                .loader(move |_k: &u64| {
                    c2.fetch_add(1, Ordering::SeqCst);
                    Err::<u64, BoxError>("down".into())
                })
                .build();
            cache.insert(1, 100);
            clock.advance(Duration::MAX);
            assert!(
                cache.load(1).is_err(),
                "{before:?}: a value past max_stale served"
            );
            assert_eq!(
                cache.get_or_stale(&1),
                None,
                "{before:?}: get_or_stale past max_stale"
            );
            assert_eq!(cache.get_with(1, || 5), 5);
            assert_eq!(cache.stats().stale_served_after_ttl, 0);
        }
    }

    /// Within max_stale at the end (expired 20 s before the end, max_stale 600 s): the value
    /// answers a failed load, and the key is retried at most once per backoff (no time passes:
    /// after the first failure, no more loader calls), for every fail-safe calling form.
    #[test]
    fn fail_safe_within_max_stale_at_the_end() {
        let _w = watchdog("within max stale");
        let clock = clock_before_end(30);
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(10))
            .fail_safe(secs(600))
            .refresh_backoff(secs(5))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                c2.fetch_add(1, Ordering::SeqCst);
                Err::<u64, BoxError>("down".into())
            })
            .build();
        cache.insert(1, 100);
        clock.advance(Duration::MAX);
        let mut inits = 0;
        for _ in 0..5 {
            assert_eq!(cache.load(1).unwrap(), 100);
            assert_eq!(
                cache
                    .try_get_with(1, || {
                        inits += 1;
                        Err::<u64, &str>("x")
                    })
                    .unwrap(),
                100
            );
            assert_eq!(
                *cache
                    .entry(1)
                    .or_insert_with(|| {
                        inits += 1;
                        7
                    })
                    .value(),
                100
            );
        }
        assert_eq!(
            (calls.load(Ordering::SeqCst), inits),
            (1, 0),
            "(loader calls, inits) at the end after one failure"
        );
        assert_eq!(cache.stats().stale_served_after_ttl, 15);
        let h = cache.health();
        let _ = h.warnings();
        let _ = cache.health_over(Duration::MAX);
        // or_insert stores its value (round 84) even at the end, and it is live.
        let e = cache.entry(1).or_insert(200);
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (200, true, Some(200))
        );
    }

    /// load_timeout / load_with_timeout of Duration::MAX (a deadline at the end of time): a
    /// waiter of a running load waits for it and gets its value (no panic on the deadline).
    #[test]
    fn soft_timeout_of_duration_max() {
        let _w = watchdog("timeout max");
        let clock = ManualClock::new();
        clock.advance(Duration::MAX);
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<u64>();
        let entered_tx = Mutex::new(entered_tx);
        let release_rx = Mutex::new(release_rx);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(10))
            .load_timeout(Duration::MAX)
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                entered_tx.lock().unwrap().send(()).unwrap();
                Ok::<u64, BoxError>(release_rx.lock().unwrap().recv_timeout(secs(30)).unwrap())
            })
            .build();
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        entered_rx.recv_timeout(secs(30)).unwrap();
        let c = cache.clone();
        let w1 = std::thread::spawn(move || c.load_with_timeout(1, Some(Duration::MAX)));
        let c = cache.clone();
        let w2 = std::thread::spawn(move || c.load(1));
        let start = std::time::Instant::now();
        while cache.stats().coalesced < 2 {
            assert!(start.elapsed() < secs(20), "waiters never joined");
            std::thread::yield_now();
        }
        release_tx.send(5).unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 5);
        assert_eq!(w1.join().expect("no panic").unwrap(), 5);
        assert_eq!(w2.join().expect("no panic").unwrap(), 5);
        assert_eq!(cache.stats().timeouts, 0);
    }

    /// ManualClock::rewind docs: "A cache never sees time go backward: it keeps the latest
    /// instant it has read". Near and at the end: rewinding does not revive what expired, nor
    /// expire what was written at the end; a cache built on a rewound clock works.
    #[test]
    fn rewind_near_the_end() {
        let _w = watchdog("rewind");
        let clock = clock_before_end(100);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .clock(clock.clone())
            .build();
        cache.insert(1, 1);
        clock.advance(secs(70)); // END - 30 s: 1 expired
        cache.insert(2, 2); // deadline END + 30 s
        assert_eq!((cache.get(&1), cache.get(&2)), (None, Some(2)));
        clock.advance(Duration::MAX);
        cache.insert(3, 3);
        clock.rewind(secs(1)); // still past END as a raw reading
        assert_eq!(
            (cache.get(&1), cache.get(&2), cache.get(&3)),
            (None, Some(2), Some(3))
        );
        clock.rewind(Duration::MAX); // raw reading 0
        assert_eq!(
            (cache.get(&1), cache.get(&2), cache.get(&3)),
            (None, Some(2), Some(3))
        );
        cache.insert(4, 4);
        clock.advance(secs(120));
        assert_eq!(cache.get(&4), Some(4), "written at the cache's end: live");
        // A cache built while the clock reads 120 s: its own time.
        let fresh: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .clock(clock.clone())
            .build();
        fresh.insert(1, 1);
        clock.advance(secs(59));
        assert_eq!(fresh.get(&1), Some(1));
        clock.advance(secs(1));
        assert_eq!(fresh.get(&1), None, "expires exactly at its deadline");
        // And the old cache still sees its end.
        assert_eq!(cache.get(&4), Some(4));
    }

    /// Health and sizing on a cache run at the end of time: no panic, and a stale answer at the
    /// end raises the fail-safe warning like anywhere else (fail_safe.rs: "Cache::health raises a
    /// warning while it happens").
    #[test]
    fn health_and_sizing_at_the_end() {
        let _w = watchdog("health");
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(10))
            .fail_safe(Duration::MAX)
            .refresh_backoff(secs(5))
            .track_sizing()
            .record_stats()
            .clock(clock.clone())
            .loader(|_k: &u64| Err::<u64, BoxError>("down".into()))
            .build();
        let healthy_before = cache.health().is_healthy();
        for k in 0..20 {
            cache.insert(k, k);
            let _ = cache.get(&k);
        }
        clock.advance(Duration::MAX);
        for k in 0..20 {
            let r = cache.load(k);
            assert!(r.is_ok(), "fail_safe(Duration::MAX) answers key {k}: {r:?}");
        }
        let h = cache.health();
        let h2 = cache.health_over(Duration::MAX);
        let _ = cache
            .sizing()
            .map(|s| (s.suggested_capacity(), s.observed(), s.rate()));
        assert!(healthy_before);
        assert!(
            !h.is_healthy() || !h2.is_healthy(),
            "stale answers at the end raised no warning: {:?}",
            h.warnings()
        );
    }

    /// refresh_after docs: a read refreshes "an entry written at least `d` ago": an entry
    /// loaded at the end was written 0 s ago however far the clock is advanced — no refresh
    /// (with jitter too).
    #[test]
    fn no_refresh_of_an_entry_written_at_the_end() {
        let _w = watchdog("written at end");
        for jitter in [0.0, 0.5] {
            let clock = ManualClock::new();
            clock.advance(Duration::MAX);
            let calls = Arc::new(AtomicU64::new(0));
            let c2 = calls.clone();
            let cache: Cache<u64, u64> = Cache::builder()
                .max_capacity(10)
                .time_to_live(secs(1000))
                .refresh_after(secs(10))
                .jitter(jitter)
                .record_stats()
                .clock(clock.clone())
                .loader(move |_k: &u64| Ok::<u64, BoxError>(c2.fetch_add(1, Ordering::SeqCst)))
                .build();
            assert_eq!(cache.load(1).unwrap(), 0);
            for _ in 0..10 {
                clock.advance(Duration::MAX);
                assert_eq!(cache.load(1).unwrap(), 0);
                assert_eq!(cache.get(&1), Some(0));
            }
            let s = cache.stats();
            assert_eq!(
            (calls.load(Ordering::SeqCst), s.refreshes_started, s.stale_served),
            (1, 0, 0),
            "jitter {jitter}: (loader calls, refreshes, stale_served) for an entry written at the end"
        );
        }
    }

    /// One script of deadline-like events landing exactly on their deadlines, whose last step
    /// lands exactly on the end of the clock: its observations must be those of the same script
    /// run from time zero (the end is a reading like any other until it is passed; ManualClock
    /// docs: an entry expires "exactly at its deadline").
    fn script(clock: &ManualClock) -> Vec<String> {
        let calls = Arc::new(AtomicU64::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c2, f2) = (calls.clone(), fail.clone());
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(10))
            .fail_safe(secs(60))
            .refresh_backoff(secs(20))
            .negative_ttl(secs(30))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                let n = c2.fetch_add(1, Ordering::SeqCst);
                if f2.load(Ordering::SeqCst) {
                    Err::<u64, BoxError>("down".into())
                } else {
                    Ok(k * 1000 + n)
                }
            })
            .build();
        let tti: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_idle(secs(70))
            .clock(clock.clone())
            .build();
        let mut log = Vec::new();
        let obs = |what: &str, log: &mut Vec<String>| {
            log.push(format!("{what}: calls {}", calls.load(Ordering::SeqCst)));
        };
        // t = 0
        cache.insert(1, 1); // ttl deadline 10, stale until 70
        tti.insert(1, 1); // idle deadline 70
        fail.store(true, Ordering::SeqCst);
        assert!(cache.load(9).is_err()); // negative until 30 ... then again
        clock.advance(secs(40)); // t = 40
        assert!(cache.load(9).is_err()); // negative until 70
        log.push(format!("t40 load1 {:?}", cache.load(1).ok())); // fails: stale, retry at 60
        obs("t40", &mut log);
        clock.advance(secs(20)); // t = 60: retry deadline reached exactly
        log.push(format!("t60 load1 {:?}", cache.load(1).ok())); // retries: stale, retry at 80
        obs("t60", &mut log);
        clock.advance(secs(10)); // t = 70: stale window ends, negative ends, tti deadline
        log.push(format!(
            "t70 load1 {:?}",
            cache.load(1).map_err(|e| e.to_string())
        ));
        log.push(format!("t70 stale1 {:?}", cache.get_or_stale(&1)));
        log.push(format!("t70 load9 {:?}", cache.load(9).is_err()));
        log.push(format!("t70 tti {:?}", tti.get(&1)));
        obs("t70", &mut log);
        log
    }

    #[test]
    fn exact_deadlines_at_the_end_match_time_zero() {
        let _w = watchdog("differential");
        let early = ManualClock::new();
        let a = script(&early);
        let late = clock_before_end(70);
        let b = script(&late);
        assert_eq!(
            late.elapsed(),
            Duration::from_nanos(END),
            "the script ends exactly at the end"
        );
        assert_eq!(
            b, a,
            "observations at the end (left) differ from those at time zero (right)"
        );
    }

    /// Every duration at its maximum (time_to_live, refresh_after, refresh_backoff, negative_ttl,
    /// fail_safe, load_timeout), run across the end of the clock: no panic, no value lost, one
    /// load per key.
    #[test]
    fn every_duration_at_its_maximum_across_the_end() {
        let _w = watchdog("max durations");
        let clock = clock_before_end(5);
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::MAX)
            .refresh_after(Duration::MAX)
            .refresh_backoff(Duration::MAX)
            .negative_ttl(Duration::MAX)
            .fail_safe(Duration::MAX)
            .load_timeout(Duration::MAX)
            .early_refresh(1.0)
            .jitter(0.5)
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                c2.fetch_add(1, Ordering::SeqCst);
                if *k == 0 {
                    Err::<u64, BoxError>("down".into())
                } else {
                    Ok(*k)
                }
            })
            .build();
        for k in 0..10 {
            let _ = cache.load(k);
        }
        clock.advance(Duration::MAX);
        for _ in 0..5 {
            for k in 0..10 {
                let r = cache.load(k);
                assert_eq!(r.is_ok(), k != 0, "key {k}: {r:?}");
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 10, "one loader call per key");
        let _ = cache.health();
        assert_eq!(cache.entry_count(), 9);
    }
}

/// `CacheStats::stale_served_after_ttl` counts as src/stats.rs documents: "The callers that waited on one load whose failure answered them all count once; a call answered from the old value by itself counts on its own: during the retry backoff, at its soft timeout, or after the load it waited on was abandoned or ended by a panic of its leader's own `init` .. A failure no caller waits for any more (a spawned load whose callers left at their soft timeout, counted then) counts nothing."
mod c {
    use super::{secs, watchdog};
    use herdcache::{BoxError, Cache, ManualClock};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    enum Step {
        Err,
        Panic,
    }

    /// A loader that reports entering and then waits for its step.
    struct Gate {
        entered: mpsc::Receiver<()>,
        release: mpsc::Sender<Step>,
        calls: Arc<AtomicU64>,
    }

    fn gated(clock: &ManualClock, spawn: bool) -> (Cache<u64, u64>, Gate) {
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<Step>();
        let entered_tx = Mutex::new(entered_tx);
        let release_rx = Mutex::new(release_rx);
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let mut b = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(1000))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                c2.fetch_add(1, Ordering::SeqCst);
                entered_tx.lock().unwrap().send(()).unwrap();
                match release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(secs(30))
                    .expect("released")
                {
                    Step::Err => Err::<u64, BoxError>("down".into()),
                    Step::Panic => panic!("loader boom"),
                }
            });
        if spawn {
            b = b.spawner(|job| {
                std::thread::spawn(job);
            });
        }
        (
            b.build(),
            Gate {
                entered,
                release,
                calls,
            },
        )
    }

    fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < secs(20), "never happened: {what}");
            std::thread::yield_now();
        }
    }

    /// One failed load answering its leader and two waiters: counts once.
    #[test]
    fn one_failed_load_with_waiters_counts_once() {
        let _w = watchdog("once");
        for step in [0, 1] {
            let clock = ManualClock::new();
            let (cache, g) = gated(&clock, false);
            cache.insert(1, 100);
            clock.advance(secs(61));
            let c = cache.clone();
            let leader = std::thread::spawn(move || c.load(1));
            g.entered.recv_timeout(secs(30)).unwrap();
            let ws: Vec<_> = (0..2)
                .map(|_| {
                    let c = cache.clone();
                    std::thread::spawn(move || c.load(1))
                })
                .collect();
            until("two waiters", || cache.stats().coalesced == 2);
            g.release
                .send(if step == 0 { Step::Err } else { Step::Panic })
                .unwrap();
            let mut got = vec![leader.join().unwrap().ok()];
            got.extend(ws.into_iter().map(|w| w.join().unwrap().ok()));
            assert_eq!(got, vec![Some(100); 3], "step {step}: all answered stale");
            assert_eq!(
                cache.stats().stale_served_after_ttl,
                1,
                "step {step} (0 = error, 1 = builder loader panic): one failed load, three callers"
            );
            assert_eq!(g.calls.load(Ordering::SeqCst), 1);
        }
    }

    /// A `get_with` init's panic with two waiters: the panic goes to the leader; each waiter
    /// claims again, finds the backoff, and counts on its own: 2.
    #[test]
    fn init_panic_waiters_count_each() {
        let _w = watchdog("init panic");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, false);
        drop(g);
        cache.insert(1, 100);
        clock.advance(secs(61));
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            c.get_with(1, || {
                in_tx.send(()).unwrap();
                go_rx.recv_timeout(secs(30)).unwrap();
                panic!("init boom")
            })
        });
        in_rx.recv_timeout(secs(30)).unwrap();
        let ws: Vec<_> = (0..2)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || c.get_with(1, || 7))
            })
            .collect();
        until("two waiters", || cache.stats().coalesced == 2);
        go_tx.send(()).unwrap();
        assert!(leader.join().is_err(), "the panic goes to the leader");
        let got: Vec<u64> = ws.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(
            got,
            vec![100, 100],
            "waiters answered stale (backoff started)"
        );
        assert_eq!(cache.stats().stale_served_after_ttl, 2);
    }

    /// An `or_insert` that joins a failing (first) load of the expired key: the load's failure
    /// answers its leader with the old value (one count for the group); the or_insert stores
    /// its own value (round 84). Count: 1 — the or_insert was answered with its own value.
    #[test]
    fn or_insert_joining_a_failing_load() {
        let _w = watchdog("or_insert joins");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, false);
        cache.insert(1, 100);
        clock.advance(secs(61));
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        g.entered.recv_timeout(secs(30)).unwrap();
        let c = cache.clone();
        let before = cache.stats().misses;
        let ins = std::thread::spawn(move || c.entry(1).or_insert(200));
        // Its miss is counted before it waits (for the load, or for the key after it).
        until("or_insert missed", || cache.stats().misses > before);
        g.release.send(Step::Err).unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 100);
        let e = ins.join().unwrap();
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (200, true, Some(200))
        );
        assert_eq!(
            cache.stats().stale_served_after_ttl,
            1,
            "{:?}",
            cache.stats()
        );
        assert_eq!(g.calls.load(Ordering::SeqCst), 1);
    }

    /// An `or_insert` waiting on a `get_with` whose init panics: it claims again, fail-safe
    /// would answer it stale (backoff), and it stores its own value instead (round 84). It was not
    /// answered with the old value, so it must not count.
    #[test]
    fn or_insert_after_an_init_panic_does_not_count_stale() {
        let _w = watchdog("or_insert after init panic");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, false);
        drop(g);
        cache.insert(1, 100);
        clock.advance(secs(61));
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            c.get_with(1, || {
                in_tx.send(()).unwrap();
                go_rx.recv_timeout(secs(30)).unwrap();
                panic!("init boom")
            })
        });
        in_rx.recv_timeout(secs(30)).unwrap();
        let c = cache.clone();
        let before = cache.stats().misses;
        let ins = std::thread::spawn(move || c.entry(1).or_insert(200));
        // Its miss is counted before it waits (for the load, or for the key after it).
        until("or_insert missed", || cache.stats().misses > before);
        go_tx.send(()).unwrap();
        assert!(leader.join().is_err());
        let e = ins.join().unwrap();
        assert_eq!(
            (*e.value(), e.is_fresh(), cache.get(&1)),
            (200, true, Some(200))
        );
        assert_eq!(
            cache.stats().stale_served_after_ttl,
            0,
            "no call was answered with the old value: {:?}",
            cache.stats()
        );
    }

    /// A caller's soft timeout while the first load runs: it is answered from the old value by
    /// itself (counts 1); the load's failure then answers its leader (the group: 1). Total 2.
    #[test]
    fn soft_timeout_counts_on_its_own() {
        let _w = watchdog("soft timeout");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, false);
        cache.insert(1, 100);
        clock.advance(secs(61));
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        g.entered.recv_timeout(secs(30)).unwrap();
        let r = cache.load_with_timeout(1, Some(Duration::from_millis(20)));
        assert_eq!(r.unwrap(), 100, "timed out: the old value");
        assert_eq!(cache.stats().stale_served_after_ttl, 1);
        g.release.send(Step::Err).unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 100);
        let s = cache.stats();
        assert_eq!((s.stale_served_after_ttl, s.timeouts), (2, 1), "{s:?}");
    }

    /// A spawned load whose only caller left at its soft timeout (counted then): its failure,
    /// which no caller waits for, counts nothing.
    #[test]
    fn spawned_load_failure_after_every_caller_left_counts_nothing() {
        let _w = watchdog("spawned");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, true);
        cache.insert(1, 100);
        clock.advance(secs(61));
        let r = cache.load_with_timeout(1, Some(Duration::from_millis(20)));
        // The loader may or may not have been entered by then; wait for it.
        g.entered.recv_timeout(secs(30)).unwrap();
        assert_eq!(r.unwrap(), 100);
        assert_eq!(cache.stats().stale_served_after_ttl, 1);
        g.release.send(Step::Err).unwrap();
        until("the spawned load ends", || {
            cache.loads_in_flight() == 0 && {
                let s = cache.stats();
                s.load_failures + s.loads_abandoned >= 1
            }
        });
        assert_eq!(
            cache.stats().stale_served_after_ttl,
            1,
            "{:?}",
            cache.stats()
        );
        // During the backoff it started: each call on its own.
        assert_eq!(cache.load(1).unwrap(), 100);
        assert_eq!(cache.get_with(1, || 9), 100);
        assert_eq!(cache.stats().stale_served_after_ttl, 3);
        assert_eq!(g.calls.load(Ordering::SeqCst), 1);
    }

    /// An abandoned async leader (its future dropped while its init is pending) with two
    /// blocking waiters: the abandonment is a failure (fail_safe docs: "an abandoned async
    /// leader"); each waiter claims again, finds the backoff started, and counts on its own: 2.
    #[test]
    fn abandoned_async_leader_waiters_count_each() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let _w = watchdog("abandoned");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, false);
        cache.insert(1, 100);
        clock.advance(secs(61));
        let mut fut = Box::pin(cache.get_with_async(1, std::future::pending::<u64>()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Pending));
        let ws: Vec<_> = (0..2)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || c.get_with(1, || 7))
            })
            .collect();
        until("two waiters", || cache.stats().coalesced == 2);
        drop(fut);
        let got: Vec<u64> = ws.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(got, vec![100, 100]);
        let s = cache.stats();
        assert_eq!(
            (s.stale_served_after_ttl, s.loads_abandoned),
            (2, 1),
            "{s:?}"
        );
        assert_eq!(g.calls.load(Ordering::SeqCst), 0);
    }

    /// get_or_stale docs: the last value past its deadline within its stale window is "counted
    /// in stale_served_after_ttl .. as any fail-safe answer"; "A stale value changes nothing: no
    /// load, no retry deadline". A live value, or one past max_stale, counts nothing.
    #[test]
    fn get_or_stale_counts_each_stale_answer_only() {
        let _w = watchdog("get_or_stale");
        let clock = ManualClock::new();
        let (cache, g) = gated(&clock, false);
        cache.insert(1, 100);
        assert_eq!(cache.get_or_stale(&1), Some(100));
        assert_eq!(cache.stats().stale_served_after_ttl, 0, "live value");
        clock.advance(secs(61));
        assert_eq!(cache.get_or_stale(&1), Some(100));
        assert_eq!(cache.get_or_stale(&1), Some(100));
        assert_eq!(cache.stats().stale_served_after_ttl, 2);
        // No retry deadline was set: the next load loads (and fails, answering stale).
        let c = cache.clone();
        let l = std::thread::spawn(move || c.load(1));
        g.entered
            .recv_timeout(secs(30))
            .expect("the load after get_or_stale runs the loader");
        g.release.send(Step::Err).unwrap();
        assert_eq!(l.join().unwrap().unwrap(), 100);
        assert_eq!(cache.stats().stale_served_after_ttl, 3);
        clock.advance(secs(600));
        assert_eq!(cache.get_or_stale(&1), None);
        assert_eq!(cache.stats().stale_served_after_ttl, 3, "past max_stale");
        assert_eq!(g.calls.load(Ordering::SeqCst), 1);
    }

    /// A refresh that fails while the value is live is no fail-safe answer (the value is within
    /// its time to live): stale_served counts the read, stale_served_after_ttl nothing.
    #[test]
    fn failed_refresh_of_a_live_value_is_not_after_ttl() {
        let _w = watchdog("refresh");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(60))
            .refresh_after(secs(10))
            .fail_safe(secs(600))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                if c2.fetch_add(1, Ordering::SeqCst) == 0 {
                    Ok(100)
                } else {
                    Err::<u64, BoxError>("down".into())
                }
            })
            .build();
        assert_eq!(cache.load(1).unwrap(), 100);
        clock.advance(secs(20));
        assert_eq!(cache.load(1).unwrap(), 100); // refresh runs here and fails
        let s = cache.stats();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            (s.stale_served, s.stale_served_after_ttl, s.refreshes_failed),
            (1, 0, 1),
            "{s:?}"
        );
    }
}
