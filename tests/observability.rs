//! Statistics and the eviction listener: counts that add up, exactly-once delivery with a value
//! type that counts its live instances, re-entrancy, and a panicking listener.

#![cfg(not(loom))]

mod common;

use common::{live_lock, watchdog, Counted, LIVE};
use herdcache::{BoxError, Cache, ManualClock, RemovalCause};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn statistics_count_what_happened() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k: &u32, v: &u32| *v % 10 + 1)
        .time_to_live(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone())
        .build();
    let s0 = cache.stats();
    assert_eq!(s0, Default::default());
    cache.insert(1, 4); // weight 5
    cache.insert(1, 2); // replaces weight 5 with weight 3
    assert_eq!(cache.get(&1), Some(2));
    assert_eq!(cache.get(&2), None);
    assert_eq!(cache.remove(&1), Some(2)); // explicit, weight 3
    assert_eq!(cache.get_with(3, || 9), 9); // a miss and a load, weight 10
    assert!(cache.try_get_with(4, || Err::<u32, _>("no")).is_err());
    clock.advance(Duration::from_secs(10));
    cache.run_pending_tasks(); // key 3 expires
    for k in 100..250 {
        cache.insert(k, 0); // weight 1 each: 150 of them overflow the capacity of 100
    }
    let s = cache.stats();
    assert_eq!(s.hits, 1);
    assert_eq!(s.misses, 3, "get(&2), get_with(3), try_get_with(4)");
    assert_eq!((s.load_successes, s.load_failures), (1, 1));
    assert_eq!((s.replaced.count, s.replaced.weight), (1, 5));
    assert_eq!((s.explicit.count, s.explicit.weight), (1, 3));
    assert_eq!((s.expired.count, s.expired.weight), (1, 10));
    assert_eq!((s.size.count, s.size.weight), (50, 50));
    assert_eq!(s.evictions().count, s.size.count + 1);
    assert_eq!(s.hit_ratio(), 0.25);
    assert_eq!(s.loads_in_flight, 0);
    let d = s - s0;
    assert_eq!(d.hits, 1);
}

#[test]
fn stampede_counters() {
    let _dog = watchdog(LIMIT, "stampede_counters");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(100))
        .refresh_after(Duration::from_secs(10))
        .negative_ttl(Duration::from_secs(5))
        .max_concurrent_loads(2)
        .record_stats()
        .loader(move |k: &u32| {
            c.fetch_add(1, Ordering::SeqCst);
            if *k == 0 {
                Err(BoxError::from("zero"))
            } else {
                std::thread::sleep(Duration::from_millis(20));
                Ok(*k)
            }
        })
        .clock(clock.clone())
        .build();
    // Eight callers on one cold key: one load, seven coalesced.
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                barrier.wait();
                assert_eq!(cache.load(7).unwrap(), 7);
            });
        }
    });
    let s = cache.stats();
    assert_eq!(s.load_successes, 1);
    assert_eq!(
        s.coalesced + s.hits,
        7,
        "the others joined the load or found its value"
    );
    // Negative caching: one failure, then negative hits.
    assert!(cache.load(0).is_err());
    assert!(cache.load(0).is_err());
    assert!(cache.load(0).is_err());
    let s = cache.stats();
    assert_eq!(s.load_failures, 1);
    assert_eq!(s.negative_hits, 2);
    // A refresh: stale served, started, succeeded.
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&7), Some(7));
    assert_eq!(cache.get(&7), Some(7));
    let s = cache.stats();
    assert_eq!(
        (
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed
        ),
        (1, 1, 0)
    );
    assert_eq!(
        s.stale_served, 1,
        "the read that triggered the (inline) refresh"
    );
    assert!(s.max_concurrent_loads_seen >= 1 && s.max_concurrent_loads_seen <= 2);
    // Loads are timed on the cache's clock: these loaders never move the manual clock.
    assert_eq!(s.total_load_time, Duration::ZERO);
    let before = s.total_load_time;
    cache.get_with(99, || {
        clock.advance(Duration::from_secs(3));
        99
    });
    assert_eq!(
        cache.stats().total_load_time - before,
        Duration::from_secs(3)
    );
}

/// Load time is measured on a cache that keeps no time too (it was 0 there: the clock read
/// for timing went through the cache's "now", which such a cache never reads), in the
/// statistics and in `average_load_time`.
#[test]
fn load_time_is_measured_without_expiry() {
    for manual in [false, true] {
        let clock = ManualClock::new();
        let mut b = Cache::<u32, u32>::builder().max_capacity(10).record_stats();
        if manual {
            b = b.clock(clock.clone());
        }
        let cache = b.build();
        cache.get_with(1, || {
            if manual {
                clock.advance(Duration::from_millis(40));
            } else {
                std::thread::sleep(Duration::from_millis(40));
            }
            1
        });
        let s = cache.stats();
        assert_eq!(s.load_successes, 1);
        if manual {
            assert_eq!(s.total_load_time, Duration::from_millis(40));
        } else {
            assert!(s.total_load_time >= Duration::from_millis(40), "{s:?}");
        }
        assert_eq!(s.average_load_time(), s.total_load_time);
    }
}

/// A listener that records what it was told, by value id.
type Seen = Arc<Mutex<HashMap<u64, Vec<RemovalCause>>>>;

#[test]
fn the_listener_hears_of_every_removed_entry_exactly_once() {
    let _serial = live_lock();
    let _dog = watchdog(LIMIT, "listener exactly once");
    let before = LIVE.load(Ordering::SeqCst);
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let s3 = seen.clone();
    let clock = ManualClock::new();
    let next_id = AtomicUsize::new(0);
    {
        let cache: Cache<u64, Counted> = Cache::builder()
            .max_capacity(500)
            .time_to_live(Duration::from_secs(5))
            .eviction_listener(move |_k, v: &Counted, cause| {
                s2.lock().unwrap().entry(v.0).or_default().push(cause);
            })
            .clock(clock.clone())
            .build();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (cache, clock, next_id) = (&cache, &clock, &next_id);
                s.spawn(move || {
                    let mut next = common::rng(t + 1);
                    for i in 0..50_000u64 {
                        let x = next();
                        let k = x % 2_000;
                        match i % 10 {
                            0..=5 => {
                                let id = next_id.fetch_add(1, Ordering::SeqCst) as u64;
                                cache.insert(k, Counted::new(id));
                            }
                            6 => {
                                cache.remove(&k);
                            }
                            7 => cache.invalidate(&k),
                            8 => {
                                cache.get(&k);
                            }
                            _ => {
                                if t == 0 && i % 1000 == 9 {
                                    clock.advance(Duration::from_secs(1));
                                }
                            }
                        }
                    }
                });
            }
        });
        cache.retain(|k, _| k % 3 != 0);
        clock.advance(Duration::from_secs(2));
        cache.run_pending_tasks();
        let created = next_id.load(Ordering::SeqCst) as u64;
        let resident: Vec<u64> = cache.iter().map(|(_, v)| v.0).collect();
        let seen = seen.lock().unwrap();
        for (id, causes) in seen.iter() {
            assert_eq!(causes.len(), 1, "value {id} reported {causes:?}");
        }
        for id in &resident {
            assert!(
                !seen.contains_key(id),
                "resident value {id} was reported removed"
            );
        }
        assert_eq!(
            seen.len() as u64 + resident.len() as u64,
            created,
            "every value is either resident or was reported once"
        );
        drop(resident);
        assert_eq!(
            LIVE.load(Ordering::SeqCst) - before,
            cache.entry_count() as i64
        );
        drop(seen);
        // Past every entry's time to live: whatever the policy kept is reported as expired
        // (how long entries stayed before depends on the policy's configuration).
        let left = cache.entry_count();
        assert!(left > 0, "the cache kept entries");
        clock.advance(Duration::from_secs(6));
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);
        let seen = s3.lock().unwrap();
        assert_eq!(seen.len() as u64, created, "every value was reported once");
        for (id, causes) in seen.iter() {
            assert_eq!(causes.len(), 1, "value {id} reported {causes:?}");
        }
        let causes: std::collections::HashSet<_> = seen.values().map(|c| c[0]).collect();
        assert_eq!(causes.len(), 4, "all four causes occurred: {causes:?}");
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before, "nothing leaked");
}

#[test]
fn a_listener_may_call_back_into_the_cache() {
    let _dog = watchdog(LIMIT, "a re-entrant listener");
    // The listener reaches the cache through a slot emptied at the end (no reference cycle).
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::default();
    let s2 = slot.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(50)
        .shards(1)
        .eviction_listener(move |k: &u32, v: &u32, _cause| {
            let Some(c) = s2.lock().unwrap().clone() else {
                return;
            };
            let c = &c;
            // Reads, writes and removals of other keys, in the same (only) shard.
            c.get(&(k + 1));
            // Writes only for the original keys, so that the evictions they cause end.
            if *k < 10_000 {
                c.insert(k + 10_000, *v);
                c.invalidate(&(k + 20_000));
                assert!(c.get_with(k + 30_000, || 1) == 1);
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    std::thread::scope(|s| {
        for t in 0..2u32 {
            let cache = &cache;
            s.spawn(move || {
                for i in 0..5_000 {
                    cache.insert(t * 100_000 + i, i);
                }
            });
        }
    });
    cache.validate();
    assert!(cache.weighted_size() <= 50);
    slot.lock().unwrap().take();
}

#[test]
fn a_panicking_listener_leaves_the_cache_consistent() {
    let reported = Arc::new(AtomicUsize::new(0));
    let r = reported.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .eviction_listener(move |k: &u32, _v, _cause| {
            r.fetch_add(1, Ordering::SeqCst);
            if k % 2 == 0 {
                panic!("listener failed on {k}");
            }
        })
        .build();
    for k in 0..10 {
        cache.insert(k, k);
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.invalidate_all()));
    assert!(r.is_err(), "the listener's panic reaches the caller");
    assert_eq!(
        reported.load(Ordering::SeqCst),
        10,
        "every entry was still reported"
    );
    assert_eq!(cache.entry_count(), 0, "the operation completed");
    cache.validate();
    // And the cache works on.
    cache.insert(1, 1);
    assert_eq!(cache.get(&1), Some(1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.remove(&1)));
    assert_eq!(
        r.ok(),
        Some(Some(1)),
        "an odd key's listener does not panic"
    );
}

/// A key whose `Clone` stores the key's value in the cache (once): the clone `get_with` makes
/// before it takes the shard lock lands between its lookup (a miss) and its claim (a hit).
#[derive(Debug, PartialEq, Eq, Hash)]
struct SlyKey(u32);

static SLY_CACHE: std::sync::OnceLock<Cache<SlyKey, u32>> = std::sync::OnceLock::new();
static SLY_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Clone for SlyKey {
    fn clone(&self) -> Self {
        if SLY_ARMED.swap(false, Ordering::SeqCst) {
            if let Some(c) = SLY_CACHE.get() {
                c.insert(SlyKey(self.0), 7);
            }
        }
        SlyKey(self.0)
    }
}

/// Every miss is a load, a join or a late hit counted as coalesced (a value stored by someone
/// else between the lookup and the claim): the counts add up (they missed one such miss).
#[test]
fn a_miss_answered_at_the_claim_is_counted_as_coalesced() {
    let cache: Cache<SlyKey, u32> = Cache::builder().max_capacity(10).record_stats().build();
    assert!(SLY_CACHE.set(cache.clone()).is_ok());
    SLY_ARMED.store(true, Ordering::SeqCst);
    assert_eq!(
        cache.get_with(SlyKey(1), || 9),
        7,
        "the value stored meanwhile"
    );
    let s = cache.stats();
    assert_eq!(
        (s.misses, s.load_successes, s.coalesced),
        (1, 0, 1),
        "{s:?}"
    );
    assert_eq!(s.misses, s.load_successes + s.coalesced + s.negative_hits);
}

/// A refresh whose store makes the eviction listener panic (on the value it replaces) is
/// still counted: `refreshes_started == refreshes_succeeded + refreshes_failed`, with the
/// refresh run by the reader and by a spawner that runs it at once; the new value is stored
/// and the panic reaches whoever ran the refresh.
#[test]
fn a_refresh_whose_listener_panics_is_counted() {
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "refresh listener panic");
    for spawner in [false, true] {
        let clock = ManualClock::new();
        let mut b = Cache::builder()
            .max_capacity(10)
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .record_stats()
            .clock(clock.clone())
            .loader(|k: &u64| Ok::<_, BoxError>(*k + 100))
            .eviction_listener(|_k: &u64, _v: &u64, c| {
                if c == RemovalCause::Replaced {
                    panic!("injected listener panic")
                }
            });
        if spawner {
            b = b.spawner(|job| job());
        }
        let cache: Cache<u64, u64> = b.build();
        cache.insert(1, 1);
        clock.advance(Duration::from_secs(11));
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.get(&1)));
        // Inline, the panic reaches the reader; a spawner's panic is the spawner's.
        assert_eq!(read.is_err(), !spawner, "spawner: {spawner}");
        assert_eq!(cache.get(&1), Some(101), "the refreshed value is stored");
        let s = cache.stats();
        assert_eq!(
            (
                s.refreshes_started,
                s.refreshes_succeeded,
                s.refreshes_failed
            ),
            (1, 1, 0),
            "spawner: {spawner}"
        );
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

/// A caller's own `init` that panics — a closure or a future, polled by a runtime that
/// catches the panic or by one that unwinds — counts its miss as a failed load: every miss is
/// a load, a join or a negative hit.
#[test]
fn a_panicking_init_counts_a_failed_load() {
    let _w = watchdog(Duration::from_secs(60), "panicking init");
    common::quiet_injected_panics();
    let c: Cache<u32, u32> = Cache::builder().max_capacity(10).record_stats().build();
    let sync = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.get_with(1, || panic!("injected panic: init"))
    }));
    assert!(sync.is_err());
    let s = c.stats();
    assert_eq!((s.misses, s.load_failures, s.load_successes), (1, 1, 0));

    // An async init polled under catch_unwind, then dropped after the unwinding (as a runtime
    // that catches a task's panic does).
    let fut = c.get_with_async(2, async { panic!("injected panic: async init") });
    let mut fut = Box::pin(fut);
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let waker = futures::task::noop_waker();
        let _ = fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
    }));
    assert!(polled.is_err());
    drop(fut);
    let s = c.stats();
    assert_eq!((s.misses, s.load_failures), (2, 2));

    // A cancelled async init abandons its load: counted abandoned, not failed.
    let fut = c.get_with_async(3, std::future::pending::<u32>());
    let mut fut = Box::pin(fut);
    let waker = futures::task::noop_waker();
    assert!(fut
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker))
        .is_pending());
    drop(fut);
    let s = c.stats();
    assert_eq!(
        (
            s.misses,
            s.load_failures,
            s.loads_abandoned,
            s.load_successes
        ),
        (3, 2, 1, 0)
    );
    assert_eq!(c.get_with(1, || 5), 5, "the key is free again");
}
