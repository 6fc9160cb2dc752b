//! moka's API shapes on herdcache: loads by borrowed key (no key clone on a hit, one miss
//! counted per miss, single-flight), the entry verbs, `for (k, v) in &cache`,
//! `CacheBuilder::new(max_capacity)`, `policy()`, `RemovalCause::was_evicted`, errors'
//! `source()` and the `Debug` output of the builder, entries and iterators.

#![cfg(not(any(loom, shuttle)))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, CacheBuilder, CompResult, LoadError, Op, RemovalCause};
use std::borrow::Borrow;
use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Times a `Key` was made from a `KeyRef` or cloned.
static KEYS_MADE: AtomicUsize = AtomicUsize::new(0);
/// Tests that read `KEYS_MADE` run one at a time.
static KEYS_LOCK: Mutex<()> = Mutex::new(());

/// A borrowed key: not `Clone`, so its `ToOwned` is the counting one below.
#[derive(Hash, PartialEq, Eq, Debug)]
struct KeyRef(u64);

/// The owned key; hashes and compares as its `KeyRef` (as `Borrow` requires).
#[derive(Hash, PartialEq, Eq, Debug)]
struct Key(KeyRef);

impl Clone for Key {
    fn clone(&self) -> Self {
        KEYS_MADE.fetch_add(1, Ordering::SeqCst);
        Key(KeyRef(self.0 .0))
    }
}

impl Borrow<KeyRef> for Key {
    fn borrow(&self) -> &KeyRef {
        &self.0
    }
}

impl ToOwned for KeyRef {
    type Owned = Key;
    fn to_owned(&self) -> Key {
        KEYS_MADE.fetch_add(1, Ordering::SeqCst);
        Key(KeyRef(self.0))
    }
}

#[test]
fn by_ref_hits_make_no_key_and_a_miss_counts_once() {
    let _dog = watchdog(LIMIT, "by_ref_hits_make_no_key_and_a_miss_counts_once");
    let _l = KEYS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache: Cache<Key, u64> = Cache::builder().max_capacity(100).record_stats().build();
    let before = cache.stats();
    assert_eq!(cache.get_with_by_ref(&KeyRef(1), || 10), 10);
    let period = cache.stats() - before;
    assert_eq!((period.hits, period.misses), (0, 1), "one miss, not two");
    assert_eq!(period.load_successes, 1);

    let made = KEYS_MADE.load(Ordering::SeqCst);
    let before = cache.stats();
    for _ in 0..100 {
        assert_eq!(cache.get_with_by_ref(&KeyRef(1), || unreachable!()), 10);
        assert_eq!(
            cache.try_get_with_by_ref(&KeyRef(1), || Err::<u64, ()>(())),
            Ok(10)
        );
        assert_eq!(
            cache.optionally_get_with_by_ref(&KeyRef(1), || None),
            Some(10)
        );
    }
    assert_eq!(
        KEYS_MADE.load(Ordering::SeqCst),
        made,
        "a hit by reference neither clones nor makes a key"
    );
    let period = cache.stats() - before;
    assert_eq!((period.hits, period.misses), (300, 0));

    // Misses of the other two shapes: one miss each, errors and `None` not cached.
    let before = cache.stats();
    let r = cache.try_get_with_by_ref(&KeyRef(2), || Err::<u64, _>("down"));
    assert_eq!(*r.unwrap_err(), "down");
    assert_eq!(cache.optionally_get_with_by_ref(&KeyRef(3), || None), None);
    assert!(!cache.contains_key(&KeyRef(2)) && !cache.contains_key(&KeyRef(3)));
    let period = cache.stats() - before;
    assert_eq!((period.hits, period.misses), (0, 2));
}

#[test]
fn by_ref_loads_are_single_flight() {
    let _dog = watchdog(LIMIT, "by_ref_loads_are_single_flight");
    let cache: Cache<String, String> = Cache::new(100);
    let loads = AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(16);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                barrier.wait();
                let v = cache.get_with_by_ref("user:1", || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    "Ada".to_string()
                });
                assert_eq!(v, "Ada");
            });
        }
    });
    assert_eq!(loads.load(Ordering::SeqCst), 1, "16 callers, 1 load");
}

#[test]
fn entry_verbs() {
    let _dog = watchdog(LIMIT, "entry_verbs");
    let cache: Cache<String, Vec<u32>> = Cache::new(100);

    let e = cache.entry_by_ref("a").or_insert(vec![1]);
    assert!(e.is_fresh());
    assert_eq!(e.key(), "a");
    let e = cache.entry("a".to_string()).or_insert(vec![2]);
    assert!(!e.is_fresh());
    assert_eq!(e.into_value(), vec![1]);

    assert!(cache.entry_by_ref("d").or_default().value().is_empty());

    assert_eq!(
        cache.entry_by_ref("o").or_optionally_insert_with(|| None),
        None
    );
    assert!(!cache.contains_key("o"));
    let e = cache
        .entry_by_ref("o")
        .or_optionally_insert_with(|| Some(vec![3]))
        .unwrap();
    assert!(e.is_fresh());
    let e = cache
        .entry_by_ref("o")
        .or_optionally_insert_with(|| unreachable!())
        .unwrap();
    assert!(!e.is_fresh());

    let r = cache
        .entry_by_ref("t")
        .or_try_insert_with(|| Err::<Vec<u32>, _>("down"));
    assert_eq!(*r.unwrap_err(), "down");
    assert!(!cache.contains_key("t"));
    let e = cache
        .entry_by_ref("t")
        .or_try_insert_with(|| Ok::<_, &str>(vec![4]))
        .unwrap();
    assert!(e.is_fresh());

    // and_try_compute_with: Ok applies the op, Err changes nothing.
    let r = cache
        .entry_by_ref("t")
        .and_try_compute_with(|e| Ok::<_, &str>(Op::Put(vec![e.unwrap().value()[0] + 1])));
    assert!(matches!(r, Ok(CompResult::ReplacedWith(ref e)) if e.value() == &vec![5]));
    let r = cache
        .entry_by_ref("t")
        .and_try_compute_with(|_| Err::<Op<Vec<u32>>, _>("refused"));
    assert_eq!(r.unwrap_err(), "refused");
    assert_eq!(cache.get("t"), Some(vec![5]));
    let r = cache
        .entry_by_ref("t")
        .and_try_compute_with(|_| Ok::<_, ()>(Op::Remove));
    assert!(matches!(r, Ok(CompResult::Removed(_))));
    assert!(!cache.contains_key("t"));
}

#[test]
fn async_entry_verbs() {
    let _dog = watchdog(LIMIT, "async_entry_verbs");
    let cache: Cache<String, u32> = Cache::new(100);
    futures::executor::block_on(async {
        let e = cache
            .entry_by_ref("a")
            .or_optionally_insert_with_async(async { None })
            .await;
        assert!(e.is_none());
        let e = cache
            .entry_by_ref("a")
            .or_optionally_insert_with_async(async { Some(1) })
            .await
            .unwrap();
        assert!(e.is_fresh());

        let r = cache
            .entry_by_ref("b")
            .or_try_insert_with_async(async { Err::<u32, _>("down") })
            .await;
        assert_eq!(*r.unwrap_err(), "down");
        let e = cache
            .entry_by_ref("b")
            .or_try_insert_with_async(async { Ok::<_, &str>(2) })
            .await
            .unwrap();
        assert_eq!((e.is_fresh(), e.into_value()), (true, 2));
        let e = cache
            .entry_by_ref("b")
            .or_try_insert_with_async(async { Ok::<_, &str>(3) })
            .await
            .unwrap();
        assert_eq!((e.is_fresh(), e.into_value()), (false, 2));

        let r = cache
            .entry_by_ref("b")
            .and_try_compute_with_async(|e| async move {
                Ok::<_, &str>(Op::Put(e.map_or(0, |e| e.into_value()) * 10))
            })
            .await;
        assert!(matches!(r, Ok(CompResult::ReplacedWith(_))));
        let r = cache
            .entry_by_ref("b")
            .and_try_compute_with_async(|_| async { Err::<Op<u32>, _>("refused") })
            .await;
        assert_eq!(r.unwrap_err(), "refused");
    });
    assert_eq!(cache.get("b"), Some(20));
}

#[test]
fn iterating_a_borrowed_cache() {
    let cache = Cache::new(10);
    for i in 0..5u32 {
        cache.insert(i, i * 10);
    }
    let mut seen: Vec<(u32, u32)> = Vec::new();
    for (k, v) in &cache {
        seen.push((k, v));
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..5).map(|i| (i, i * 10)).collect::<Vec<_>>());
    let it = cache.iter();
    assert!(format!("{it:?}").contains("next_shard: 0"));
}

#[test]
fn builder_new_policy_and_debug() {
    let b = CacheBuilder::<String, u32>::new(500)
        .time_to_live(Duration::from_secs(30))
        .time_to_idle(Duration::from_secs(10))
        .eviction_listener(|_, _, _| {})
        .shards(2)
        .name("users");
    let shown = format!("{b:?}");
    for part in [
        "name: Some(\"users\")",
        "max_capacity: Some(500)",
        "time_to_live: Some(30s)",
        "time_to_idle: Some(10s)",
        "eviction_listener: Some(..)",
        "weigher: None",
        "shards: Some(2)",
    ] {
        assert!(shown.contains(part), "{part} missing from {shown}");
    }
    let cache = b.build();
    let p = cache.policy();
    assert_eq!(p.max_capacity(), Some(500));
    assert_eq!(p.time_to_live(), Some(Duration::from_secs(30)));
    assert_eq!(p.time_to_idle(), Some(Duration::from_secs(10)));
    assert_eq!((p.num_segments(), p.shard_count()), (2, 2));
    let shown = format!("{cache:?}");
    assert!(shown.contains("time_to_live: Some(30s)"), "{shown}");
    assert!(format!("{:?}", cache.entry("k".to_string())).contains("key: \"k\""));

    let unlimited_ttl: Cache<u8, u8> = Cache::new(1);
    assert_eq!(unlimited_ttl.policy().time_to_live(), None);
    // Duration::MAX is kept as given, not rounded through nanoseconds.
    let forever: Cache<u8, u8> = CacheBuilder::new(1).time_to_live(Duration::MAX).build();
    assert_eq!(forever.policy().time_to_live(), Some(Duration::MAX));
}

#[test]
fn was_evicted_matches_the_causes() {
    let causes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&causes);
    let clock = herdcache::ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1)
        .time_to_live(Duration::from_secs(1))
        .clock(clock.clone())
        .eviction_listener(move |_, _, c| seen.lock().unwrap().push(c))
        .build();
    cache.insert(1, 1);
    cache.insert(1, 2); // replaced
    cache.invalidate(&1); // explicit
    cache.insert(2, 2);
    clock.advance(Duration::from_secs(2));
    cache.run_pending_tasks(); // expired
    let causes = causes.lock().unwrap().clone();
    assert!(causes.contains(&RemovalCause::Replaced));
    assert!(causes.contains(&RemovalCause::Explicit));
    assert!(causes.contains(&RemovalCause::Expired));
    for c in causes {
        assert_eq!(
            c.was_evicted(),
            matches!(c, RemovalCause::Expired | RemovalCause::Size)
        );
    }
    assert!(RemovalCause::Size.was_evicted());
}

#[derive(Debug)]
struct BackendDown;

impl std::fmt::Display for BackendDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("backend down")
    }
}

impl std::error::Error for BackendDown {}

#[test]
fn load_error_source_is_the_loaders_error() {
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .loader(|_k: &u32| Err::<u32, BoxError>(Box::new(BackendDown)))
        .build();
    let e = cache.load(1).unwrap_err();
    assert!(matches!(e, LoadError::Loader(_)));
    let source = e.source().expect("the loader's error");
    assert!(source.is::<BackendDown>());
    assert_eq!(source.to_string(), "backend down");
    assert!(LoadError::Timeout.source().is_none());
}

#[cfg(feature = "redis")]
#[test]
fn tier_error_source_is_the_wrapped_error() {
    use herdcache::codec::Plain;
    use herdcache::redis::{RedisTier, TierError};
    let bad_url = RedisTier::new("http://example.com/")
        .ttl(Duration::from_secs(1))
        .build(Cache::<u64, u64>::builder().max_capacity(10), Plain);
    let Err(e @ TierError::Url(_)) = bad_url else {
        panic!("an invalid URL is refused")
    };
    assert!(e.source().is_some());
    let no_capacity = RedisTier::new("redis://127.0.0.1:1/")
        .ttl(Duration::from_secs(1))
        .build(Cache::<u64, u64>::builder(), Plain);
    let Err(e @ TierError::Build(_)) = no_capacity else {
        panic!("a cache without capacity is refused")
    };
    assert_eq!(
        e.source().map(|s| s.to_string()),
        Some("max_capacity must be set".to_string())
    );
}

/// moka's `invalidate_entries_if`, ported as written (`support_invalidation_closures`, the
/// `unwrap`, `run_pending_tasks`): the matching entries are gone, the others stay, each removal
/// is reported once as explicit, and entries inserted after the call are not affected.
#[test]
fn invalidate_entries_if_as_moka_code_calls_it() {
    let removed = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&removed);
    let cache: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .support_invalidation_closures()
        .eviction_listener(move |k: &u32, _v: &String, cause| {
            r.lock().unwrap().push((*k, cause));
        })
        .build();
    for i in 0..10 {
        cache.insert(i, format!("v{i}"));
    }
    let threshold = 6;
    cache
        .invalidate_entries_if(move |k, _v| *k >= threshold)
        .unwrap();
    cache.insert(8, "after".to_string());
    cache.run_pending_tasks();
    let mut kept: Vec<u32> = cache.iter().map(|(k, _)| k).collect();
    kept.sort_unstable();
    assert_eq!(kept, [0, 1, 2, 3, 4, 5, 8]);
    assert_eq!(cache.get(&8).as_deref(), Some("after"));
    let mut seen = removed.lock().unwrap().clone();
    seen.sort_unstable_by_key(|(k, _)| *k);
    assert_eq!(
        seen,
        [6, 7, 8, 9].map(|k| (k, RemovalCause::Explicit)),
        "each matching entry reported once"
    );
}

/// moka's `get_with_if`: loads when absent, keeps what `replace_if` accepts, replaces what it
/// rejects; callers racing to replace one stale value run `init` once (the others decide again
/// on the new value and keep it); a panicking `init` releases the key.
#[test]
fn get_with_if_replaces_once_per_stale_value() {
    let _w = watchdog(LIMIT, "get_with_if");
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .initial_capacity(1_000)
        .build();
    assert_eq!(cache.get_with_if(1, || 0, |_| unreachable!()), 0);
    assert_eq!(cache.get_with_if(1, || 9, |v| *v != 0), 0, "kept");
    let inits = AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(4);
    let got: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let (cache, inits, barrier) = (&cache, &inits, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    cache.get_with_if(
                        1,
                        || {
                            inits.fetch_add(1, Ordering::SeqCst);
                            100 + t
                        },
                        |v| *v == 0, // stale
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        inits.load(Ordering::SeqCst),
        1,
        "one replacement of one stale value"
    );
    assert!(got.iter().all(|v| *v == got[0] && *v >= 100), "{got:?}");
    assert_eq!(cache.get(&1), Some(got[0]));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache.get_with_if(1, || panic!("init panics (expected by the test)"), |_| true)
    }));
    assert!(r.is_err());
    assert_eq!(
        cache.get(&1),
        Some(got[0]),
        "a panicking init replaces nothing"
    );
    assert_eq!(
        cache.get_with_if(1, || 7, |_| true),
        7,
        "the key was released"
    );
}

/// moka's `RemovalCause` and `CompResult` are exhaustive: moka users match every variant with
/// no wildcard arm, and that code compiles here too (this test is the check: a
/// `#[non_exhaustive]` enum of another crate needs a `_` arm).
#[test]
fn removal_cause_and_comp_result_match_without_a_wildcard() {
    let _w = watchdog(LIMIT, "exhaustive matches");
    fn name(c: RemovalCause) -> &'static str {
        match c {
            RemovalCause::Expired => "expired",
            RemovalCause::Explicit => "explicit",
            RemovalCause::Replaced => "replaced",
            RemovalCause::Size => "size",
        }
    }
    fn what(r: CompResult<u32, u32>) -> &'static str {
        match r {
            CompResult::Inserted(_) => "inserted",
            CompResult::ReplacedWith(_) => "replaced",
            CompResult::Removed(_) => "removed",
            CompResult::Unchanged(_) => "unchanged",
            CompResult::StillNone(_) => "still none",
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .eviction_listener(move |_k: &u32, _v: &u32, c| l.lock().unwrap().push(name(c)))
        .build();
    assert_eq!(
        what(cache.entry(1).and_compute_with(|_| Op::Put(5))),
        "inserted"
    );
    assert_eq!(
        what(cache.entry(1).and_compute_with(|_| Op::Put(6))),
        "replaced"
    );
    assert_eq!(
        what(cache.entry(1).and_compute_with(|_| Op::Nop)),
        "unchanged"
    );
    assert_eq!(
        what(cache.entry(1).and_compute_with(|_| Op::Remove)),
        "removed"
    );
    assert_eq!(
        what(cache.entry(1).and_compute_with(|_| Op::Nop)),
        "still none"
    );
    assert_eq!(*log.lock().unwrap(), ["replaced", "explicit"]);
}
