//! Attack round s22: hostile user code and moka-style usage, through the public API only.
//!
//! Time is a `ManualClock`; nothing sleeps to wait for expiry. Every test that can block runs
//! under a watchdog (or `within`), so a hang fails instead of stalling the run.

#![cfg(not(any(loom, shuttle)))]

mod common;

use common::{live_lock, quiet_injected_panics, watchdog, within, Counted, LIVE};
use herdcache::{BoxError, Cache, CompResult, Expiry, LoadError, ManualClock, Op, RemovalCause};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_secs(10);

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    f.poll(&mut cx)
}

/// A listener that tallies causes, and the tally.
type Tally = Arc<Mutex<HashMap<&'static str, u64>>>;
fn cause_name(c: RemovalCause) -> &'static str {
    match c {
        RemovalCause::Expired => "expired",
        RemovalCause::Explicit => "explicit",
        RemovalCause::Replaced => "replaced",
        RemovalCause::Size => "size",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}
fn tally() -> Tally {
    Arc::new(Mutex::new(HashMap::new()))
}
fn count(t: &Tally, c: &str) -> u64 {
    t.lock().unwrap().get(c).copied().unwrap_or(0)
}

// =============================================================================================
// get_all
// =============================================================================================

/// `get_all` with the same key twice: a user passing a list with duplicates (common when keys
/// come from a request) must not wait for its own load.
#[test]
fn a01_get_all_with_a_duplicate_key_does_not_hang() {
    let cache: Cache<u32, String> = Cache::new(100);
    let c = cache.clone();
    let r = within(SHORT, move || {
        c.get_all([1, 1, 2], |missing| {
            missing
                .iter()
                .map(|&k| (k, format!("#{k}")))
                .collect::<HashMap<_, _>>()
        })
    });
    let r = r.expect("get_all with a duplicate key hung (waits on its own load)");
    let r = r.expect("get_all with a duplicate key panicked");
    assert_eq!(r.len(), 2);
    assert_eq!(r[&1], "#1");
    // The key is not left loading.
    let c = cache.clone();
    let again = within(SHORT, move || c.get_with(1, || "x".to_string()));
    assert!(again.is_some(), "key 1 left loading after get_all");
}

/// A write of a key while `load_missing` runs wins over the loaded value (the crate-wide
/// promise "a write or invalidation of the key while it loads wins").
#[test]
fn a02_get_all_a_write_during_load_missing_wins() {
    let cache: Cache<u32, &'static str> = Cache::new(100);
    let c = cache.clone();
    let r = cache.get_all([1, 2], move |missing| {
        assert_eq!(missing.len(), 2);
        c.insert(2, "new");
        c.invalidate(&1);
        HashMap::from([(1, "old1"), (2, "old2")])
    });
    assert_eq!(r.len(), 2);
    assert_eq!(
        cache.get(&2),
        Some("new"),
        "the load overwrote a newer insert"
    );
    assert_eq!(cache.get(&1), None, "the load overwrote a newer invalidate");
}

/// Keys that `load_missing` returns without being asked for: a newer value already cached must
/// not be overwritten by them (they were never loading).
#[test]
fn a03_get_all_extra_keys_do_not_overwrite_cached_values() {
    let cache: Cache<u32, &'static str> = Cache::new(100);
    cache.insert(7, "current");
    let r = cache.get_all([1], |_missing| {
        HashMap::from([(1, "one"), (7, "from-backend")])
    });
    assert_eq!(r.get(&1), Some(&"one"));
    assert_eq!(
        cache.get(&7),
        Some("current"),
        "an unrequested key from load_missing overwrote the cache"
    );
}

// =============================================================================================
// negative_ttl
// =============================================================================================

fn failing_loader_cache(
    clock: &ManualClock,
    calls: &Arc<AtomicUsize>,
    ok: &Arc<AtomicBool>,
) -> Cache<u32, u32> {
    let c = Arc::clone(calls);
    let ok = Arc::clone(ok);
    Cache::builder()
        .max_capacity(10)
        .negative_ttl(Duration::from_secs(60))
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u32| {
            c.fetch_add(1, Ordering::SeqCst);
            if ok.load(Ordering::SeqCst) {
                Ok(*k)
            } else {
                Err(BoxError::from("down"))
            }
        })
        .build()
}

/// "A write or invalidation of the key ends it early": invalidate_all is an invalidation of
/// every key.
#[test]
fn a04_invalidate_all_ends_negative_caching() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicBool::new(false));
    let cache = failing_loader_cache(&clock, &calls, &ok);
    assert!(cache.load(1).is_err());
    assert!(cache.load(1).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "negative caching");
    ok.store(true, Ordering::SeqCst);
    cache.invalidate_all();
    assert_eq!(
        cache.load(1).ok(),
        Some(1),
        "invalidate_all did not end negative caching"
    );
}

/// invalidate of the key ends negative caching.
#[test]
fn a05_invalidate_ends_negative_caching() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicBool::new(false));
    let cache = failing_loader_cache(&clock, &calls, &ok);
    assert!(cache.load(1).is_err());
    ok.store(true, Ordering::SeqCst);
    cache.invalidate(&1);
    assert_eq!(cache.load(1).ok(), Some(1));
}

/// Remembered failures must not push real values out of a bounded cache, nor show in the
/// entry count (which is "the number of entries stored": nothing iterable is stored).
#[test]
fn a06_negative_entries_neither_evict_values_nor_count_as_entries() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicBool::new(true));
    let cache = failing_loader_cache(&clock, &calls, &ok);
    for k in 0..10 {
        assert_eq!(cache.load(k).unwrap(), k);
    }
    ok.store(false, Ordering::SeqCst);
    for k in 100..1100 {
        assert!(cache.load(k).is_err());
    }
    let n = cache.iter().count() as u64;
    assert_eq!(cache.entry_count(), n, "entry_count disagrees with iter");
    assert!(cache.weighted_size() <= 10);
    let kept = (0..10).filter(|k| cache.contains_key(k)).count();
    let s = cache.stats();
    eprintln!(
        "values kept after 1000 negative entries: {kept}/10, size evictions {}",
        s.size.count
    );
    assert!(
        kept >= 5,
        "negative entries evicted {} of 10 real values",
        10 - kept
    );
}

// =============================================================================================
// fail_safe
// =============================================================================================

struct Fs {
    cache: Cache<u32, Counted>,
    clock: ManualClock,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    removed: Tally,
}

fn fail_safe_cache() -> Fs {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let removed = tally();
    let (d, c, r) = (Arc::clone(&down), Arc::clone(&calls), Arc::clone(&removed));
    let cache = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |_k: &u32, _v: &Counted, cause| {
            *r.lock().unwrap().entry(cause_name(cause)).or_insert(0) += 1;
        })
        .loader(move |k: &u32| {
            c.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(Counted::new(*k as u64))
            }
        })
        .build();
    Fs {
        cache,
        clock,
        down,
        calls,
        removed,
    }
}

/// fail_safe keeps expired entries "until max_stale passes"; run_pending_tasks ("reclaims every
/// expired entry") must not silently switch fail-safe off.
#[test]
fn a07_run_pending_tasks_keeps_fail_safe_values() {
    let _l = live_lock();
    let fs = fail_safe_cache();
    assert_eq!(fs.cache.load(1).unwrap().0, 1);
    fs.down.store(true, Ordering::SeqCst);
    fs.clock.advance(Duration::from_secs(61));
    fs.cache.run_pending_tasks();
    let r = fs.cache.load(1);
    assert!(
        r.is_ok(),
        "run_pending_tasks dropped the fail-safe value: {r:?}"
    );
}

/// A write or invalidation removes the old value for good: invalidate_all, remove and retain
/// included.
#[test]
fn a08_invalidate_all_remove_retain_end_fail_safe() {
    let _l = live_lock();
    for how in ["invalidate_all", "remove", "invalidate", "retain"] {
        let fs = fail_safe_cache();
        assert_eq!(fs.cache.load(1).unwrap().0, 1);
        fs.down.store(true, Ordering::SeqCst);
        fs.clock.advance(Duration::from_secs(61));
        match how {
            "invalidate_all" => fs.cache.invalidate_all(),
            "remove" => assert!(
                fs.cache.remove(&1).is_none(),
                "remove returned an expired value"
            ),
            "invalidate" => fs.cache.invalidate(&1),
            _ => fs.cache.retain(|_, _| false),
        }
        let r = fs.cache.load(1);
        assert!(
            r.is_err(),
            "{how}: the old value was served after it: {r:?}"
        );
    }
}

/// The listener hears about a fail-safe entry exactly once over its whole life (expiry, stale
/// period, max_stale), and stats agree with it; no value leaks.
#[test]
fn a09_fail_safe_listener_once_stats_agree_no_leak() {
    let _l = live_lock();
    let before = LIVE.load(Ordering::SeqCst);
    {
        let fs = fail_safe_cache();
        for k in 0..10 {
            fs.cache.load(k).unwrap();
        }
        fs.down.store(true, Ordering::SeqCst);
        fs.clock.advance(Duration::from_secs(61));
        for k in 0..10 {
            assert!(fs.cache.load(k).is_ok());
        }
        fs.cache.run_pending_tasks();
        fs.clock.advance(Duration::from_secs(600));
        for k in 0..10 {
            assert!(fs.cache.load(k).is_err(), "served past max_stale");
        }
        fs.cache.run_pending_tasks();
        assert_eq!(fs.cache.entry_count(), 0);
        assert_eq!(fs.cache.iter().count(), 0);
        let s = fs.cache.stats();
        let total: u64 = fs.removed.lock().unwrap().values().sum();
        assert_eq!(
            total,
            10,
            "listener calls: {:?}",
            fs.removed.lock().unwrap()
        );
        assert_eq!(count(&fs.removed, "expired"), 10);
        assert_eq!(s.expired.count, 10, "stats.expired {:?}", s.expired);
        assert_eq!(s.stale_served_after_ttl, 10);
        fs.cache.validate();
    }
    assert_eq!(
        LIVE.load(Ordering::SeqCst),
        before,
        "values leaked or double-dropped"
    );
}

/// With fail-safe, try_get_with (not just load) falls back: one backend call per backoff, the
/// others get the stale value; never past max_stale.
#[test]
fn a10_fail_safe_try_get_with_one_retry_per_backoff() {
    let _l = live_lock();
    let fs = fail_safe_cache();
    let calls = AtomicUsize::new(0);
    let get = |fs: &Fs| {
        fs.cache.try_get_with(1, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Counted, _>("down")
        })
    };
    assert_eq!(fs.cache.get_with(1, || Counted::new(1)).0, 1);
    fs.clock.advance(Duration::from_secs(61));
    for _ in 0..5 {
        assert_eq!(get(&fs).map(|v| v.0).ok(), Some(1));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "more than one call within the backoff"
    );
    fs.clock.advance(Duration::from_secs(5));
    for _ in 0..5 {
        assert_eq!(get(&fs).map(|v| v.0).ok(), Some(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "not one retry per backoff");
    // 61 + 5 + 595 = 661 > 60 + 600: past max_stale.
    fs.clock.advance(Duration::from_secs(595));
    assert!(get(&fs).is_err(), "served past max_stale");
    assert_eq!(fs.calls.load(Ordering::SeqCst), 0);
}

/// Exactly at max_stale past the deadline: never beyond max_stale (the TTL itself expires
/// "exactly at its deadline", so max_stale ends exactly at deadline + max_stale).
#[test]
fn a11_fail_safe_ends_exactly_at_max_stale() {
    let _l = live_lock();
    let fs = fail_safe_cache();
    fs.cache.load(1).unwrap();
    fs.down.store(true, Ordering::SeqCst);
    fs.clock
        .advance(Duration::from_secs(60 + 600) - Duration::from_nanos(1));
    assert!(fs.cache.load(1).is_ok(), "just before max_stale");
    fs.clock.advance(Duration::from_secs(5));
    let r = fs.cache.load(1);
    assert!(
        r.is_err(),
        "served {:?} at or past max_stale",
        r.map(|v| v.0)
    );
}

/// With a panicking loader, fail-safe answers with the last value (docs: "a panic" is a failure
/// it covers); the key can be loaded again afterwards.
#[test]
fn a12_fail_safe_get_with_panic_falls_back() {
    quiet_injected_panics();
    let _l = live_lock();
    let fs = fail_safe_cache();
    fs.cache.load(1).unwrap();
    fs.clock.advance(Duration::from_secs(61));
    let r = catch_unwind(AssertUnwindSafe(|| {
        fs.cache.get_with(1, || panic!("injected"))
    }));
    match r {
        Ok(v) => assert_eq!(v.0, 1),
        Err(_) => {
            eprintln!("a12: get_with resumed the panic (fail-safe not applied to the leader)")
        }
    }
    let c = fs.cache.clone();
    let again = within(SHORT, move || c.get_with(1, || Counted::new(2)).0).expect("hang");
    assert!(again.is_ok());
}

/// fail-safe with an optionally_ loader: None is an answer, so the old value is gone.
#[test]
fn a13_fail_safe_optionally_none_is_an_answer() {
    let _l = live_lock();
    let fs = fail_safe_cache();
    fs.cache.load(1).unwrap();
    fs.clock.advance(Duration::from_secs(61));
    assert!(fs.cache.optionally_get_with(1, || None).is_none());
    fs.down.store(true, Ordering::SeqCst);
    assert!(
        fs.cache.load(1).is_err(),
        "the old value survived a None answer"
    );
}

/// fail-safe with time_to_idle: reads of a stale value must not revive it (extend its life).
#[test]
fn a14_fail_safe_with_tti_never_past_max_stale() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_idle(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(100))
        .refresh_backoff(Duration::from_secs(1))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(11));
    // Served stale several times, each "read" of the stale value.
    for _ in 0..50 {
        let r = cache.try_get_with(1, || Err::<u32, _>("down"));
        let _ = r;
        clock.advance(Duration::from_secs(2)); // total 11 + 100 = 111
        if clock.elapsed() > Duration::from_secs(10 + 100) {
            let r = cache.try_get_with(1, || Err::<u32, _>("down"));
            assert!(
                r.is_err(),
                "served stale past max_stale at {:?}",
                clock.elapsed()
            );
        }
    }
}

/// fail-safe and get_all: an expired key whose load_missing panics/omits it. Omitting must not
/// serve past max_stale, and the key must be loadable again.
#[test]
fn a15_fail_safe_get_all_omitted_key() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(100))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(11));
    let c = cache.clone();
    let r = within(SHORT, move || c.get_all([1], |_| HashMap::new()))
        .expect("hang")
        .unwrap();
    eprintln!("a15: get_all of an expired fail-safe key that load_missing omits: {r:?}");
    clock.advance(Duration::from_secs(200));
    let r = cache.get_all([1], |_| HashMap::new());
    assert!(r.is_empty(), "served past max_stale by get_all: {r:?}");
    assert_eq!(cache.get_with(1, || 5), 5);
}

// =============================================================================================
// Expiry and idle time
// =============================================================================================

/// "a read moves the idle deadline only when it would move by more than 1/1024 of the idle
/// time, so an entry may expire up to that much early": an entry read every 0.9/1024 of its
/// idle time must stay alive indefinitely.
#[test]
fn a16_tti_frequent_small_reads_keep_the_entry() {
    let clock = ManualClock::new();
    let tti = Duration::from_secs(1024);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_idle(tti)
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    for i in 0..5000 {
        clock.advance(Duration::from_millis(900));
        assert_eq!(
            cache.get(&1),
            Some(1),
            "expired after {i} reads at {:?}",
            clock.elapsed()
        );
    }
}

struct Recording {
    reads: Arc<AtomicUsize>,
    remaining: Arc<Mutex<Vec<Option<Duration>>>>,
}
impl Expiry<u32, u32> for Recording {
    fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }
    fn expire_after_read(&self, _k: &u32, _v: &u32, r: Option<Duration>) -> Option<Duration> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.remaining.lock().unwrap().push(r);
        r
    }
    fn expire_after_update(&self, _k: &u32, _v: &u32, r: Option<Duration>) -> Option<Duration> {
        self.remaining.lock().unwrap().push(r);
        r
    }
}

/// The `remaining` passed to Expiry is the current remaining lifetime; contains_key "does not
/// count as an access" (no expire_after_read).
#[test]
fn a17_expiry_remaining_is_exact_and_contains_key_is_not_a_read() {
    let clock = ManualClock::new();
    let reads = Arc::new(AtomicUsize::new(0));
    let remaining = Arc::new(Mutex::new(Vec::new()));
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(Recording {
            reads: Arc::clone(&reads),
            remaining: Arc::clone(&remaining),
        })
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(3));
    assert!(cache.contains_key(&1));
    assert_eq!(
        reads.load(Ordering::SeqCst),
        0,
        "contains_key called expire_after_read"
    );
    assert_eq!(cache.get(&1), Some(1));
    clock.advance(Duration::from_secs(2));
    cache.insert(1, 2); // update: remaining 5 s
    let seen = remaining.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![Some(Duration::from_secs(7)), Some(Duration::from_secs(5))]
    );
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        cache.get(&1),
        None,
        "update kept remaining; expired at 10 s"
    );
}

/// Expiry returning None from expire_after_read on an entry with a deadline: "None means it
/// never expires".
#[test]
fn a18_expiry_read_returning_none_makes_it_eternal() {
    struct E;
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
            Some(Duration::from_secs(1))
        }
        fn expire_after_read(&self, _k: &u32, _v: &u32, _r: Option<Duration>) -> Option<Duration> {
            None
        }
    }
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(E)
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    assert_eq!(cache.get(&1), Some(1));
    clock.advance(Duration::from_secs(3600));
    cache.run_pending_tasks();
    assert_eq!(
        cache.get(&1),
        Some(1),
        "expire_after_read's None did not make it eternal"
    );
}

/// A panicking expire_after_read (user code under the shard lock, called by `get`): the cache
/// stays usable and consistent.
#[test]
fn a19_expiry_read_panic_leaves_cache_usable() {
    quiet_injected_panics();
    struct E(Arc<AtomicBool>);
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
            Some(Duration::from_secs(100))
        }
        fn expire_after_read(&self, _k: &u32, _v: &u32, r: Option<Duration>) -> Option<Duration> {
            if self.0.load(Ordering::SeqCst) {
                panic!("injected expire_after_read");
            }
            r
        }
    }
    let boom = Arc::new(AtomicBool::new(true));
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(E(Arc::clone(&boom)))
        .build();
    cache.insert(1, 1);
    for _ in 0..3 {
        let _ = catch_unwind(AssertUnwindSafe(|| cache.get(&1)));
        let _ = catch_unwind(AssertUnwindSafe(|| cache.get_with(1, || 9)));
    }
    boom.store(false, Ordering::SeqCst);
    let c = cache.clone();
    let r = within(SHORT, move || (c.get(&1), c.get_with(2, || 2)))
        .expect("hang")
        .unwrap();
    assert_eq!(r, (Some(1), 2));
    cache.validate();
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
}

// =============================================================================================
// Capacity
// =============================================================================================

/// max_capacity 1 with many shards, concurrent writers: the bound holds once they return.
#[test]
fn a20_capacity_one_many_shards_concurrent() {
    let _w = watchdog(LIMIT, "a20");
    for shards in [1usize, 64, 1024] {
        let cache: Cache<u64, u64> = Cache::builder().max_capacity(1).shards(shards).build();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let cache = &cache;
                s.spawn(move || {
                    for i in 0..5_000 {
                        cache.insert(t * 1_000_000 + i, i);
                        if i % 3 == 0 {
                            cache.get_with(t * 1_000_000 + i + 1, || i);
                        }
                    }
                });
            }
        });
        assert!(
            cache.entry_count() <= 1,
            "shards {shards}: {} entries",
            cache.entry_count()
        );
        assert!(cache.weighted_size() <= 1);
        assert_eq!(cache.iter().count() as u64, cache.entry_count());
        cache.validate();
    }
}

/// An entry of weight exactly max_capacity is not "heavier than max_capacity": it is stored,
/// whatever the shard count.
#[test]
fn a21_entry_weighing_exactly_the_capacity_is_stored() {
    for shards in [1usize, 16, 1024] {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .shards(shards)
            .weigher(|_k: &u32, v: &u32| *v)
            .build();
        cache.insert(1, 100);
        assert_eq!(
            cache.get(&1),
            Some(100),
            "shards {shards}: a weight == capacity entry was refused"
        );
        cache.insert(2, 60);
        cache.insert(3, 50);
        assert!(
            cache.weighted_size() <= 100,
            "shards {shards}: {}",
            cache.weighted_size()
        );
    }
}

/// u32::MAX weights and an u64::MAX capacity: sums do not overflow.
#[test]
fn a22_huge_weights_and_capacity() {
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(u64::MAX)
        .weigher(|_k: &u32, _v: &u32| u32::MAX)
        .build();
    for k in 0..100 {
        cache.insert(k, k);
    }
    assert_eq!(cache.entry_count(), 100);
    assert_eq!(cache.weighted_size(), 100 * u32::MAX as u64);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(3 * u32::MAX as u64)
        .weigher(|_k: &u32, _v: &u32| u32::MAX)
        .build();
    for k in 0..100 {
        cache.insert(k, k);
        assert!(cache.weighted_size() <= 3 * u32::MAX as u64);
    }
    assert_eq!(cache.entry_count(), 3);
}

/// Capacity 0: nothing is stored, loads still answer, every value is reported once.
#[test]
fn a23_capacity_zero_everything_still_answers() {
    let _l = live_lock();
    let before = LIVE.load(Ordering::SeqCst);
    {
        let removed = tally();
        let r = Arc::clone(&removed);
        let cache: Cache<u32, Counted> = Cache::builder()
            .max_capacity(0)
            .eviction_listener(move |_k: &u32, _v: &Counted, c| {
                *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
            })
            .build();
        cache.insert(1, Counted::new(1));
        assert_eq!(cache.get_with(2, || Counted::new(2)).0, 2);
        assert_eq!(cache.entry(3).or_insert(Counted::new(3)).into_value().0, 3);
        let r = cache
            .entry(4)
            .and_compute_with(|_| Op::Put(Counted::new(4)));
        eprintln!(
            "a23: compute Put at capacity 0: {:?}",
            std::mem::discriminant(&r)
        );
        assert_eq!(cache.entry_count(), 0);
        assert_eq!(cache.iter().count(), 0);
        assert_eq!(count(&removed, "size"), 4, "{:?}", removed.lock().unwrap());
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before);
}

// =============================================================================================
// Ordering: a load never overwrites a newer write
// =============================================================================================

/// One writer per key keeps a "database" version and writes it (insert, or invalidate); loaders
/// on other threads read the database at the start of their load. After its write returns, the
/// writer must never see an older version from get / get_with.
#[test]
fn a24_history_a_load_never_overwrites_a_newer_write() {
    let _w = watchdog(LIMIT, "a24");
    const KEYS: u64 = 4;
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(1000).build();
    let db: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = AtomicBool::new(false);
    let violations = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        // Loaders.
        for _ in 0..2 {
            let (cache, db, stop) = (&cache, &db, &stop);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % KEYS;
                    i += 1;
                    cache.get_with(k, || {
                        let v = db[k as usize].load(Ordering::SeqCst);
                        std::thread::yield_now();
                        v
                    });
                    if i % 7 == 0 {
                        let _ = cache
                            .entry(k)
                            .or_insert_with(|| db[k as usize].load(Ordering::SeqCst));
                    }
                }
            });
        }
        // One writer per key (2 threads, 2 keys each).
        let mut handles = Vec::new();
        for w in 0..2u64 {
            let (cache, db, violations) = (&cache, &db, &violations);
            handles.push(s.spawn(move || {
                for round in 0..20_000u64 {
                    let k = w * 2 + round % 2;
                    let v = db[k as usize].fetch_add(1, Ordering::SeqCst) + 1;
                    match round % 4 {
                        0 | 1 => cache.insert(k, v),
                        2 => cache.invalidate(&k),
                        _ => {
                            if round % 400 == 3 {
                                // invalidate_all touches the other writer's keys too: fine,
                                // it only removes.
                                cache.invalidate_all()
                            } else {
                                cache.invalidate(&k)
                            }
                        }
                    }
                    if let Some(seen) = cache.get(&k) {
                        if seen < v {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let seen = cache.get_with(k, || db[k as usize].load(Ordering::SeqCst));
                    if seen < v {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a load overwrote a newer write"
    );
    cache.validate();
}

// =============================================================================================
// User code faults
// =============================================================================================

/// A key whose Clone panics (the cache clones keys for loads): the key is not left loading.
#[derive(PartialEq, Eq, Hash, Debug)]
struct BadKey(u32, bool);
impl Clone for BadKey {
    fn clone(&self) -> Self {
        if self.1 && PANIC_KEY_CLONE.load(Ordering::SeqCst) {
            panic!("injected key clone");
        }
        BadKey(self.0, self.1)
    }
}
static PANIC_KEY_CLONE: AtomicBool = AtomicBool::new(false);

#[test]
fn a25_key_clone_panic_does_not_strand_the_key() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "a25");
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<BadKey, u32> = Cache::builder()
        .max_capacity(4)
        .eviction_listener(move |_k: &BadKey, _v: &u32, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    PANIC_KEY_CLONE.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for op in 0..6 {
        let c = cache.clone();
        let r = within(SHORT, move || match op {
            0 => c.get_with(BadKey(1, true), || 1),
            1 => c.entry(BadKey(1, true)).or_insert_with(|| 1).into_value(),
            2 => c.try_get_with(BadKey(1, true), || Ok::<_, ()>(1)).unwrap(),
            3 => c.entry(BadKey(1, true)).and_upsert_with(|_| 1).into_value(),
            4 => {
                c.insert(BadKey(1, true), 1);
                1
            }
            _ => c
                .get_all([BadKey(1, true)], |m| {
                    m.iter().map(|k| (BadKey(k.0, false), 1)).collect()
                })
                .len() as u32,
        });
        let r = r.unwrap_or_else(|| panic!("op {op} hung"));
        outcomes.push(r.is_ok());
    }
    eprintln!("a25: ops that succeeded despite the panicking key clone: {outcomes:?}");
    PANIC_KEY_CLONE.store(false, Ordering::SeqCst);
    let c = cache.clone();
    let v = within(SHORT, move || c.get_with(BadKey(1, true), || 7))
        .expect("key stranded")
        .unwrap();
    assert!(v == 7 || v == 1);
    cache.validate();
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
}

/// A value whose Drop panics, replaced by insert: insert may panic (the drop runs after the
/// lock), but the new value must be stored and the cache consistent.
#[derive(Clone, Debug)]
struct BombOnDrop(u32, Arc<AtomicBool>);
impl Drop for BombOnDrop {
    fn drop(&mut self) {
        if self.1.swap(false, Ordering::SeqCst) {
            panic!("injected drop");
        }
    }
}

#[test]
fn a26_value_drop_panic_on_replace_and_evict() {
    quiet_injected_panics();
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<u32, BombOnDrop> = Cache::builder()
        .max_capacity(2)
        .shards(1)
        .record_stats()
        .eviction_listener(move |_k: &u32, _v: &BombOnDrop, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    let armed = Arc::new(AtomicBool::new(false));
    cache.insert(1, BombOnDrop(1, Arc::clone(&armed)));
    let bomb = Arc::new(AtomicBool::new(true));
    // Replace: the old value's drop panics.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        cache.insert(1, BombOnDrop(10, Arc::clone(&armed)))
    }));
    // that one was not armed; arm the stored one
    cache.insert(1, BombOnDrop(11, Arc::clone(&bomb)));
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.insert(1, BombOnDrop(12, Arc::clone(&armed)))
    }));
    assert!(
        r.is_err(),
        "the drop panic was swallowed? (not necessarily a bug)"
    );
    assert_eq!(
        cache.get(&1).map(|v| v.0),
        Some(12),
        "the new value was not stored"
    );
    // Evict: the evicted value's drop panics (one armed value at a time: two panicking drops
    // in one operation would abort, as for any Vec).
    let arms: Vec<Arc<AtomicBool>> = (0..12).map(|_| Arc::new(AtomicBool::new(false))).collect();
    cache.insert(1, BombOnDrop(13, Arc::clone(&arms[0])));
    cache.insert(2, BombOnDrop(2, Arc::clone(&arms[1])));
    let mut panics = 0;
    for k in 3..12u32 {
        // Arm every value now in the cache but one: the one evicted next is unknown, so arm
        // exactly one (the oldest) and count the panics.
        arms[(k - 3) as usize].store(true, Ordering::SeqCst);
        let r = catch_unwind(AssertUnwindSafe(|| {
            cache.insert(k, BombOnDrop(k, Arc::clone(&arms[k as usize])))
        }));
        if r.is_err() {
            panics += 1;
        } else {
            arms[(k - 3) as usize].store(false, Ordering::SeqCst);
        }
        assert!(
            cache.weighted_size() <= 2,
            "bound broken after a drop panic"
        );
        assert!(cache.contains_key(&k) || cache.entry_count() == 2);
    }
    eprintln!("a26: eviction drop panics seen: {panics}");
    cache.validate();
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    let s = cache.stats();
    let t = removed.lock().unwrap().clone();
    assert_eq!(
        s.replaced.count,
        t.get("replaced").copied().unwrap_or(0),
        "{t:?} vs {s:?}"
    );
    assert_eq!(
        s.size.count,
        t.get("size").copied().unwrap_or(0),
        "{t:?} vs {s:?}"
    );
    // Disarm whatever is left so the test's own drop does not panic.
    for a in &arms {
        a.store(false, Ordering::SeqCst);
    }
    bomb.store(false, Ordering::SeqCst);
    drop(cache);
}

/// retain must report expired entries it removes as Expired (not Explicit), and stats agree.
#[test]
fn a27_retain_reports_expired_entries_as_expired() {
    let clock = ManualClock::new();
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |_k: &u32, _v: &u32, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    for k in 0..5 {
        cache.insert(k, k);
    }
    clock.advance(Duration::from_secs(11));
    for k in 5..10 {
        cache.insert(k, k);
    }
    let mut seen = Vec::new();
    cache.retain(|k, _| {
        seen.push(*k);
        *k % 2 == 0
    });
    seen.sort();
    assert!(
        seen.iter().all(|k| *k >= 5),
        "keep saw expired entries: {seen:?}"
    );
    assert_eq!(
        count(&removed, "expired"),
        5,
        "{:?}",
        removed.lock().unwrap()
    );
    assert_eq!(
        count(&removed, "explicit"),
        3,
        "{:?}",
        removed.lock().unwrap()
    );
    let s = cache.stats();
    assert_eq!((s.expired.count, s.explicit.count), (5, 3));
    assert_eq!(cache.entry_count(), 2);
}

/// An eviction listener that writes back into the cache (documented: "may call back into the
/// cache"): no deadlock, and the bound holds after every insert returns.
#[test]
fn a28_listener_reinserting_keeps_the_bound() {
    let _w = watchdog(LIMIT, "a28");
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&slot);
    let depth = Arc::new(AtomicUsize::new(0));
    let d2 = Arc::clone(&depth);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(8)
        .eviction_listener(move |k: &u32, v: &u32, c| {
            if c == RemovalCause::Size && *k < 1000 && d2.fetch_add(1, Ordering::SeqCst) < 10_000 {
                let cache = s2.lock().unwrap().clone();
                if let Some(cache) = cache {
                    cache.insert(k + 1000, *v); // demote to a "second chance" key
                }
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    std::thread::scope(|s| {
        for t in 0..2u32 {
            let cache = &cache;
            s.spawn(move || {
                for i in 0..500 {
                    cache.insert(t * 500 + i % 500, i);
                    assert!(
                        cache.weighted_size() <= 8 + 2,
                        "bound broken: {}",
                        cache.weighted_size()
                    );
                }
            });
        }
    });
    assert!(cache.weighted_size() <= 8);
    cache.validate();
    *slot.lock().unwrap() = None;
}

// =============================================================================================
// Async cancellation
// =============================================================================================

/// and_compute_with_async dropped while its future is pending: the key is released and later
/// computations run.
#[test]
fn a29_cancelled_async_compute_releases_the_key() {
    let _w = watchdog(LIMIT, "a29");
    let cache: Cache<u32, u32> = Cache::new(10);
    cache.insert(1, 1);
    {
        let mut f = Box::pin(cache.entry(1).and_compute_with_async(|_e| async {
            common::Yield(1000).await;
            Op::Put(99)
        }));
        for _ in 0..3 {
            assert!(poll_once(f.as_mut()).is_pending());
        }
    }
    assert_eq!(cache.get(&1), Some(1));
    let c = cache.clone();
    let r = within(SHORT, move || {
        c.entry(1)
            .and_compute_with(|e| Op::Put(e.map_or(0, |e| *e.value()) + 1))
    })
    .expect("key stranded by a cancelled async compute")
    .unwrap();
    assert!(matches!(r, CompResult::ReplacedWith(_)));
    assert_eq!(cache.get(&1), Some(2));
}

/// A shared load whose every caller goes away drops its future (and what it captured): no
/// leak; and a blocking caller that was waiting loads itself.
#[test]
fn a30_abandoned_shared_load_drops_its_future() {
    let _l = live_lock();
    let _w = watchdog(LIMIT, "a30");
    let before = LIVE.load(Ordering::SeqCst);
    {
        let cache: Cache<u32, Counted> = Cache::new(10);
        let captured = Counted::new(0);
        let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
            common::Yield(1_000_000).await;
            captured
        }));
        assert!(poll_once(leader.as_mut()).is_pending());
        let mut waiter = Box::pin(cache.get_with_async_shared(1, async { Counted::new(2) }));
        assert!(poll_once(waiter.as_mut()).is_pending());
        drop(leader);
        assert!(poll_once(waiter.as_mut()).is_pending());
        drop(waiter);
        assert_eq!(
            LIVE.load(Ordering::SeqCst),
            before,
            "an abandoned shared load kept its future"
        );
        let c = cache.clone();
        let v = within(SHORT, move || c.get_with(1, || Counted::new(3)).0)
            .expect("hang")
            .unwrap();
        assert_eq!(v, 3);
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before);
}

/// A leader cancelled between polls, many times over, with blocking waiters on other threads:
/// each blocking waiter gets a value, no leak.
#[test]
fn a31_async_leaders_cancelled_with_blocking_waiters() {
    let _l = live_lock();
    let _w = watchdog(LIMIT, "a31");
    let before = LIVE.load(Ordering::SeqCst);
    {
        let cache: Cache<u32, Counted> = Cache::new(10);
        for round in 0..50u32 {
            let mut leader = Box::pin(cache.get_with_async(round, async move {
                common::Yield(1_000_000).await;
                Counted::new(999)
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            let c = cache.clone();
            let waiter = common::start(move || c.get_with(round, || Counted::new(round as u64)).0);
            std::thread::yield_now();
            drop(leader);
            let v = waiter
                .wait(SHORT)
                .expect("blocking waiter stranded")
                .unwrap();
            assert_eq!(v, round as u64);
        }
        cache.validate();
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before);
}

// =============================================================================================
// moka-style code
// =============================================================================================

/// The moka idiom for a counter: entry().and_upsert_with from many threads; no lost update.
#[test]
fn a32_moka_upsert_counter_from_threads() {
    let _w = watchdog(LIMIT, "a32");
    let cache: Cache<&'static str, u64> = Cache::new(10);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2000 {
                    cache
                        .entry("n")
                        .and_upsert_with(|e| e.map_or(1, |e| e.value() + 1));
                }
            });
        }
        s.spawn(|| {
            for _ in 0..500 {
                let _ = cache.get_with("n", || 0);
            }
        });
    });
    assert_eq!(cache.get("n"), Some(8000));
}

/// moka: `optionally_get_with` / `try_get_with` then `invalidate`, `iter`, `run_pending_tasks`,
/// `entry_count` (exact here).
#[test]
fn a33_moka_shapes_round_trip() {
    let cache: Cache<String, Arc<Vec<u8>>> = Cache::builder()
        .max_capacity(3)
        .time_to_live(Duration::from_secs(30))
        .build();
    for i in 0..5 {
        let key = format!("k{i}");
        let v = cache.try_get_with(key.clone(), || {
            Ok::<_, std::io::Error>(Arc::new(vec![i as u8]))
        });
        assert_eq!(v.unwrap()[0], i as u8);
    }
    assert_eq!(cache.optionally_get_with("none".to_string(), || None), None);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 3);
    let keys: Vec<String> = cache.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 3);
    for k in &keys {
        cache.invalidate(k.as_str());
    }
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
}

// =============================================================================================
// Misc
// =============================================================================================

/// load_with_timeout(Some(ZERO)) with nobody else loading: the caller runs the loader itself
/// ("a caller that runs the loader itself is not interrupted"), so it gets the value.
#[test]
fn a34_zero_timeout_own_load_returns_the_value() {
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .loader(|k: &u32| Ok::<_, BoxError>(*k + 1))
        .build();
    let r = cache.load_with_timeout(1, Some(Duration::ZERO));
    assert_eq!(r.ok(), Some(2));
}

/// A clock advanced to its far end: an entry with a TTL inserted then is readable at once
/// (a deadline that saturates must not mean "already expired").
#[test]
fn a35_far_clock_ttl_insert_is_readable() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(60))
        .clock(clock.clone())
        .build();
    clock.advance(Duration::from_secs(100 * 365 * 86_400)); // a century of uptime
    cache.insert(1, 1);
    assert_eq!(cache.get(&1), Some(1));
    clock.advance(Duration::from_secs(61));
    assert_eq!(cache.get(&1), None);
    clock.advance(Duration::MAX);
    cache.insert(2, 2);
    let r = cache.get(&2);
    eprintln!("a35: at the clock's end, insert then get = {r:?}");
}

/// Inconsistent Eq (never equal to itself, like NaN): the cache must still respect its bound and
/// account exactly (no entry unreachable for eviction), and not hang.
#[derive(Clone, Debug)]
struct NaNKey(u32);
impl PartialEq for NaNKey {
    fn eq(&self, _o: &Self) -> bool {
        false
    }
}
impl Eq for NaNKey {}
impl Hash for NaNKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}

#[test]
fn a36_nan_like_keys_keep_the_bound() {
    let _w = watchdog(LIMIT, "a36");
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<NaNKey, u32> = Cache::builder()
        .max_capacity(10)
        .eviction_listener(move |_k: &NaNKey, _v: &u32, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    for i in 0..200 {
        cache.insert(NaNKey(i % 3), i);
        let _ = cache.get_with(NaNKey(i % 5), || i);
        cache.invalidate(&NaNKey(i % 3));
        assert!(cache.weighted_size() <= 10);
    }
    let n = cache.entry_count();
    assert_eq!(n, cache.iter().count() as u64);
    cache.invalidate_all();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.iter().count(), 0);
    cache.validate();
}

/// Stats and listener agree under a mix of every removal path from several threads, including
/// computes (Put over a value = replaced, Remove = explicit).
#[test]
fn a37_stats_agree_with_listener_under_computes() {
    let _w = watchdog(LIMIT, "a37");
    let clock = ManualClock::new();
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(50)
        .time_to_live(Duration::from_secs(5))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |_k: &u32, _v: &u32, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    let barrier = Barrier::new(3);
    std::thread::scope(|s| {
        for t in 0..3u32 {
            let (cache, clock, barrier) = (&cache, &clock, &barrier);
            s.spawn(move || {
                barrier.wait();
                let mut rng = common::Rng(0x9E37_79B9 + t as u64);
                for _ in 0..20_000 {
                    let k = (rng.next() % 80) as u32;
                    match rng.next() % 9 {
                        0 => cache.insert(k, 1),
                        1 => {
                            cache.entry(k).and_compute_with(|e| match e {
                                Some(e) if *e.value() > 3 => Op::Remove,
                                Some(e) => Op::Put(e.value() + 1),
                                None => Op::Nop,
                            });
                        }
                        2 => {
                            cache
                                .entry(k)
                                .and_upsert_with(|e| e.map_or(0, |e| *e.value()));
                        }
                        3 => cache.invalidate(&k),
                        4 => {
                            let _ = cache.remove(&k);
                        }
                        5 => {
                            if t == 0 && rng.next() % 50 == 0 {
                                clock.advance(Duration::from_secs(1));
                            }
                        }
                        6 => {
                            if rng.next() % 500 == 0 {
                                cache.retain(|k, _| k % 2 == 0)
                            }
                        }
                        _ => {
                            cache.get_with(k, || 0);
                        }
                    }
                }
            });
        }
    });
    cache.invalidate_all();
    let s = cache.stats();
    let t = removed.lock().unwrap().clone();
    let by = |c: &str| t.get(c).copied().unwrap_or(0);
    assert_eq!(
        (
            s.expired.count,
            s.explicit.count,
            s.replaced.count,
            s.size.count
        ),
        (by("expired"), by("explicit"), by("replaced"), by("size")),
        "stats vs listener"
    );
    cache.validate();
}

/// A LoadError from a loader that panicked: the next call loads again (after the backoff) and
/// the error is Panicked for every caller of that load.
#[test]
fn a38_loader_panic_is_load_error_panicked() {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let fail = Arc::new(AtomicBool::new(true));
    let f = Arc::clone(&fail);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if f.load(Ordering::SeqCst) {
                panic!("injected loader");
            }
            Ok::<_, BoxError>(*k)
        })
        .build();
    let r = cache.load(1);
    assert!(matches!(r, Err(LoadError::Panicked)), "{r:?}");
    fail.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(2)); // past the default 1 s backoff
    assert_eq!(cache.load(1).ok(), Some(1));
}

// =============================================================================================
// Round 2
// =============================================================================================

fn plain_fail_safe(clock: &ManualClock) -> Cache<u32, u32> {
    Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .clock(clock.clone())
        .record_stats()
        .build()
}

/// The compute closure reads "the current entry": an expired one kept for fail-safe is not
/// current (plain reads never see it); Op::Remove on it ends fail-safe for the key.
#[test]
fn b01_compute_sees_no_expired_fail_safe_entry_and_remove_ends_it() {
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    let mut saw = None;
    cache.entry(1).and_compute_with(|e| {
        saw = Some(e.map(|e| *e.value()));
        Op::Remove
    });
    assert_eq!(saw, Some(None), "compute saw an expired value");
    let r = cache.try_get_with(1, || Err::<u32, _>("down"));
    assert!(
        r.is_err(),
        "Op::Remove did not remove the fail-safe value: {r:?}"
    );
}

/// or_try_insert_with answered from fail-safe: the entry was not produced by this call.
#[test]
fn b02_fail_safe_entry_is_not_fresh() {
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    let e = cache
        .entry(1)
        .or_try_insert_with(|| Err::<u32, _>("down"))
        .expect("fail-safe value");
    assert_eq!(*e.value(), 1);
    assert!(!e.is_fresh(), "a stale fail-safe value reported as fresh");
}

/// fail-safe with negative_ttl: the remembered failure must not replace the last value (the
/// others "get the last value meanwhile").
#[test]
fn b03_fail_safe_with_negative_ttl_keeps_serving_the_last_value() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .negative_ttl(Duration::from_secs(30))
        .refresh_backoff(Duration::from_secs(5))
        .clock(clock.clone())
        .loader(move |k: &u32| {
            c.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(*k)
            }
        })
        .build();
    cache.load(1).unwrap();
    down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(61));
    for i in 0..10 {
        let r = cache.load(1);
        assert_eq!(r.as_ref().ok(), Some(&1), "call {i}: {r:?}");
        clock.advance(Duration::from_secs(1));
    }
    assert!(calls.load(Ordering::SeqCst) <= 3);
}

/// Many concurrent callers waiting on one failed load of an expired key: all get the last
/// value, stale_served_after_ttl counts once ("callers that waited on one failed load count
/// once"), and health reports ServingStale.
#[test]
fn b04_fail_safe_concurrent_callers_and_health() {
    let _w = watchdog(LIMIT, "b04");
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    let gate = Arc::new(Barrier::new(2));
    let g = Arc::clone(&gate);
    let c = cache.clone();
    let leader = common::start(move || {
        c.try_get_with(1, || {
            g.wait();
            std::thread::sleep(Duration::from_millis(200)); // waiters join meanwhile
            Err::<u32, _>("down")
        })
    });
    gate.wait();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let c = cache.clone();
            common::start(move || c.try_get_with(1, || Err::<u32, _>("down-waiter")))
        })
        .collect();
    let r = leader.wait(SHORT).expect("leader hung").unwrap();
    assert_eq!(r.ok(), Some(1));
    for w in waiters {
        let r = w.wait(SHORT).expect("waiter hung").unwrap();
        assert_eq!(r.ok(), Some(1));
    }
    let s = cache.stats();
    eprintln!(
        "b04: stale_served_after_ttl {} coalesced {} load_failures {}",
        s.stale_served_after_ttl, s.coalesced, s.load_failures
    );
    assert!(s.stale_served_after_ttl >= 1);
    let h = cache.health();
    assert!(
        h.warnings()
            .iter()
            .any(|w| matches!(w, herdcache::Warning::ServingStale { .. })),
        "no ServingStale warning: {h:?}"
    );
}

/// Jitter spreads the time to live within ±fraction: never outside [ttl(1-f), ttl(1+f)].
#[test]
fn b05_jitter_stays_within_its_fraction() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(100))
        .jitter(0.5)
        .clock(clock.clone())
        .build();
    for k in 0..2000 {
        cache.insert(k, k);
    }
    clock.advance(Duration::from_secs(50) - Duration::from_millis(1));
    assert_eq!(
        (0..2000).filter(|k| cache.contains_key(k)).count(),
        2000,
        "expired before ttl*(1-f)"
    );
    clock.advance(Duration::from_secs(50));
    let alive_mid = (0..2000).filter(|k| cache.contains_key(k)).count();
    assert!(
        alive_mid > 500 && alive_mid < 1500,
        "not spread: {alive_mid}"
    );
    clock.advance(Duration::from_secs(50) + Duration::from_millis(2));
    assert_eq!(
        (0..2000).filter(|k| cache.contains_key(k)).count(),
        0,
        "alive past ttl*(1+f)"
    );
}

/// iter yields "the live entries": not the expired ones not yet reclaimed.
#[test]
fn b06_iter_skips_expired_entries() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
    for k in 0..10 {
        cache.insert(k, k);
    }
    clock.advance(Duration::from_secs(10));
    assert_eq!(cache.iter().count(), 0);
    assert_eq!((&cache).into_iter().count(), 0);
}

/// Among concurrent or_insert_with / or_insert callers of one key, exactly one is fresh.
#[test]
fn b07_exactly_one_fresh_among_concurrent_inserters() {
    let _w = watchdog(LIMIT, "b07");
    for round in 0..200u32 {
        let cache: Cache<u32, u32> = Cache::new(10);
        let fresh = AtomicUsize::new(0);
        let barrier = Barrier::new(4);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let (cache, fresh, barrier) = (&cache, &fresh, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let e = match (t + round) % 3 {
                        0 => cache.entry(round).or_insert(t),
                        1 => cache.entry(round).or_insert_with(|| t),
                        _ => cache
                            .entry(round)
                            .or_try_insert_with(|| Ok::<_, ()>(t))
                            .unwrap(),
                    };
                    assert_eq!(Some(*e.value()), cache.get(&round));
                    if e.is_fresh() {
                        fresh.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(fresh.load(Ordering::SeqCst), 1, "round {round}");
    }
}

/// While a compute runs, a get_with of the key waits for it and takes its value (its own init
/// does not run); after a Nop/Remove verdict a waiting get_with loads itself.
#[test]
fn b08_get_with_during_compute_takes_its_value() {
    let _w = watchdog(LIMIT, "b08");
    for verdict in 0..3 {
        // No value: a get_with then is a load, which waits for the compute (with a value it
        // would simply hit).
        let cache: Cache<u32, u32> = Cache::new(10);
        let started = Arc::new(Barrier::new(2));
        let (c, s2) = (cache.clone(), Arc::clone(&started));
        let computer = common::start(move || {
            c.entry(1).and_compute_with(|_e| {
                s2.wait();
                std::thread::sleep(Duration::from_millis(100));
                match verdict {
                    0 => Op::Put(50),
                    1 => Op::Nop,
                    _ => Op::Remove,
                }
            })
        });
        started.wait();
        let c = cache.clone();
        let getter = common::start(move || c.get_with(1, || 77));
        computer.wait(SHORT).expect("compute hung").unwrap();
        let v = getter.wait(SHORT).expect("get_with hung").unwrap();
        let expected = match verdict {
            0 => 50,
            _ => 77, // Nop or Remove on no entry: the waiting get_with loads itself
        };
        assert_eq!(v, expected, "verdict {verdict}");
        assert_eq!(cache.get(&1), Some(expected), "verdict {verdict}");
    }
}

/// try_get_with waiters with a different error type load themselves; with the same type they
/// receive the leader's error.
#[test]
fn b09_waiter_with_another_error_type_loads_itself() {
    let _w = watchdog(LIMIT, "b09");
    let cache: Cache<u32, u32> = Cache::new(10);
    let gate = Arc::new(Barrier::new(2));
    let (c, g) = (cache.clone(), Arc::clone(&gate));
    let leader = common::start(move || {
        c.try_get_with(1, || {
            g.wait();
            std::thread::sleep(Duration::from_millis(100));
            Err::<u32, String>("leader".into())
        })
    });
    gate.wait();
    let c = cache.clone();
    let other = common::start(move || c.try_get_with(1, || Ok::<u32, u8>(5)));
    let c = cache.clone();
    let same = common::start(move || c.try_get_with(1, || Ok::<u32, String>(6)));
    let l = leader.wait(SHORT).expect("leader hung").unwrap();
    assert_eq!(l.unwrap_err().as_str(), "leader");
    let o = other.wait(SHORT).expect("other-type waiter hung").unwrap();
    let s = same.wait(SHORT).expect("same-type waiter hung").unwrap();
    eprintln!("b09: other-type {o:?}, same-type {s:?}");
    assert!(
        o.is_ok(),
        "a waiter with another error type got no value: {o:?}"
    );
}

/// contains_key and iter are not lookups: hits/misses do not move.
#[test]
fn b10_contains_key_and_iter_do_not_count_as_lookups() {
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10).record_stats().build();
    cache.insert(1, 1);
    let before = cache.stats();
    assert!(cache.contains_key(&1));
    assert!(!cache.contains_key(&2));
    assert_eq!(cache.iter().count(), 1);
    let d = cache.stats() - before;
    assert_eq!((d.hits, d.misses), (0, 0));
}

/// time_to_live(ZERO): "nothing is ever stored"; loads still answer, each value is reported
/// once, no leak.
#[test]
fn b11_ttl_zero_stores_nothing() {
    let _l = live_lock();
    let before = LIVE.load(Ordering::SeqCst);
    {
        let removed = tally();
        let r = Arc::clone(&removed);
        let cache: Cache<u32, Counted> = Cache::builder()
            .max_capacity(10)
            .time_to_live(Duration::ZERO)
            .eviction_listener(move |_k: &u32, _v: &Counted, c| {
                *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
            })
            .build();
        cache.insert(1, Counted::new(1));
        assert!(cache.get(&1).is_none());
        assert_eq!(cache.get_with(2, || Counted::new(2)).0, 2);
        assert!(cache.entry(3).or_insert(Counted::new(3)).is_fresh());
        assert_eq!(cache.entry_count(), 0, "ttl zero stored something");
        let total: u64 = removed.lock().unwrap().values().sum();
        assert_eq!(total, 3, "{:?}", removed.lock().unwrap());
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before);
}

/// A computed value heavier than the capacity: reported as stored (`Inserted`,
/// `ReplacedWith`) and at once evicted, as `insert` does: the key ends absent and the listener
/// sees the value removed for `Size` (and the replaced one for `Replaced`). The documented
/// contract of `CompResult` (the first report, s22, took `Inserted` to mean "still stored").
#[test]
fn b12_compute_put_too_heavy_is_stored_and_evicted_at_once() {
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .weigher(|_k: &u32, v: &u32| *v)
        .eviction_listener(move |_k: &u32, _v: &u32, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    let r = cache.entry(1).and_compute_with(|_| Op::Put(11));
    assert!(
        matches!(r, CompResult::Inserted(ref e) if *e.value() == 11),
        "{r:?}"
    );
    assert!(!cache.contains_key(&1));
    assert_eq!(count(&removed, "size"), 1);
    cache.insert(2, 5);
    let r = cache.entry(2).and_compute_with(|_| Op::Put(11));
    assert!(
        matches!(r, CompResult::ReplacedWith(ref e) if *e.value() == 11),
        "{r:?}"
    );
    assert!(!cache.contains_key(&2));
    assert_eq!(
        (count(&removed, "size"), count(&removed, "replaced")),
        (2, 1)
    );
    assert_eq!(cache.weighted_size(), 0);
}

/// Both time to live and time to idle: the entry expires at the earlier one.
#[test]
fn b13_ttl_and_tti_together() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(100))
        .time_to_idle(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    for _ in 0..9 {
        clock.advance(Duration::from_secs(9));
        assert_eq!(cache.get(&1), Some(1));
    }
    clock.advance(Duration::from_secs(19)); // 81 + 19 = 100
    assert_eq!(cache.get(&1), None, "lived past its time to live by reads");
    cache.insert(2, 2);
    clock.advance(Duration::from_secs(10));
    assert_eq!(cache.get(&2), None, "lived past its idle time");
}

/// A refresh that fails without fail-safe: the old value is kept, "never beyond its
/// time_to_live".
#[test]
fn b14_failed_refresh_never_serves_past_ttl() {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(*k)
            }
        })
        .build();
    cache.load(1).unwrap();
    down.store(true, Ordering::SeqCst);
    for _ in 0..59 {
        clock.advance(Duration::from_secs(1));
        assert_eq!(cache.load(1).ok(), Some(1));
    }
    clock.advance(Duration::from_secs(1));
    assert!(cache.load(1).is_err(), "served past its time to live");
    assert_eq!(cache.get(&1), None);
}

/// get_all over a batch larger than the capacity: every key answered, the bound holds.
#[test]
fn b15_get_all_larger_than_capacity() {
    let cache: Cache<u32, u32> = Cache::new(8);
    let r = cache.get_all(0..100, |m| m.iter().map(|&k| (k, k)).collect());
    assert_eq!(r.len(), 100);
    assert!(cache.entry_count() <= 8);
    cache.validate();
}

// =============================================================================================
// Round 3: negative caching and fail-safe against every verb
// =============================================================================================

fn negative_cache(clock: &ManualClock) -> Cache<u32, u32> {
    Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(60))
        .clock(clock.clone())
        .record_stats()
        .build()
}

/// A remembered None (negative_ttl) must not make get_with (which cannot return None) fail:
/// it loads with its own closure.
#[test]
fn c01_get_with_after_a_remembered_none_loads() {
    let clock = ManualClock::new();
    let cache = negative_cache(&clock);
    assert_eq!(cache.optionally_get_with(1, || None), None);
    assert_eq!(
        cache.optionally_get_with(1, || Some(9)),
        None,
        "negative caching of None"
    );
    let c = cache.clone();
    let v = within(SHORT, move || c.get_with(1, || 5)).expect("hang");
    assert_eq!(v.ok(), Some(5));
}

/// A remembered error of one type, then try_get_with with another error type: it cannot receive
/// the remembered error, so it loads itself (as a waiter with another E does).
#[test]
fn c02_remembered_error_of_another_type() {
    let clock = ManualClock::new();
    let cache = negative_cache(&clock);
    assert!(cache
        .try_get_with(1, || Err::<u32, String>("down".into()))
        .is_err());
    let r = cache.try_get_with(1, || Ok::<u32, u8>(3));
    assert_eq!(r.ok(), Some(3), "another error type could not load");
}

/// Writes through the entry API end negative caching ("a write ... of the key ends it early").
#[test]
fn c03_entry_writes_end_negative_caching() {
    for how in 0..4 {
        let clock = ManualClock::new();
        let cache = negative_cache(&clock);
        assert!(cache.try_get_with(1, || Err::<u32, &str>("down")).is_err());
        match how {
            0 => {
                assert!(cache.entry(1).or_insert(4).is_fresh());
            }
            1 => {
                cache.entry(1).and_upsert_with(|_| 4);
            }
            2 => {
                cache.entry(1).and_compute_with(|_| Op::Put(4));
            }
            _ => {
                assert!(cache.entry(1).or_insert_with(|| 4).is_fresh());
            }
        }
        assert_eq!(cache.get(&1), Some(4), "verb {how}");
        cache.invalidate(&1);
        assert_eq!(
            cache.try_get_with(1, || Ok::<u32, &str>(5)).ok(),
            Some(5),
            "verb {how}"
        );
    }
}

/// Op::Remove by a compute is an invalidation of the key: it ends negative caching.
#[test]
fn c04_compute_remove_ends_negative_caching() {
    let clock = ManualClock::new();
    let cache = negative_cache(&clock);
    assert!(cache.try_get_with(1, || Err::<u32, &str>("down")).is_err());
    cache.entry(1).and_compute_with(|_| Op::Remove);
    let r = cache.try_get_with(1, || Ok::<u32, &str>(5));
    assert_eq!(r.ok(), Some(5), "negative entry survived Op::Remove");
}

/// or_insert on an expired key kept for fail-safe: the default is inserted (the key is
/// absent), not the stale value returned.
#[test]
fn c05_or_insert_on_expired_fail_safe_key_inserts() {
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    let e = cache.entry(1).or_insert(2);
    assert_eq!((*e.value(), e.is_fresh()), (2, true));
    assert_eq!(cache.get(&1), Some(2));
    let e = cache.entry(1).or_default();
    assert_eq!(*e.value(), 2);
}

/// Fail-safe: an and_upsert_with on the expired key sees no entry and its value replaces the
/// stale one for good.
#[test]
fn c06_upsert_on_expired_fail_safe_key() {
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    let e = cache.entry(1).and_upsert_with(|e| {
        assert!(e.is_none(), "upsert saw the expired value");
        10
    });
    assert_eq!(*e.value(), 10);
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        cache.try_get_with(1, || Err::<u32, _>("down")).ok(),
        Some(10)
    );
}

/// Async: fail-safe also covers an abandoned async leader — the waiter that takes over with a
/// failing future still gets the last value.
#[test]
fn c07_fail_safe_async_try_get_with() {
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    let r =
        futures::executor::block_on(cache.try_get_with_async(1, async { Err::<u32, _>("down") }));
    assert_eq!(r.ok(), Some(1));
    let r = futures::executor::block_on(
        cache
            .entry(1)
            .or_try_insert_with_async(async { Err::<u32, _>("down") }),
    );
    let e = r.expect("fail-safe");
    assert_eq!(*e.value(), 1);
    assert!(!e.is_fresh(), "async: stale fail-safe value reported fresh");
}

/// Capacity and fail-safe: expired entries kept for fail-safe count towards the bound, and
/// the bound holds.
#[test]
fn c08_fail_safe_stale_entries_respect_the_bound() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(20)
        .weigher(|_k: &u32, v: &u32| *v)
        .time_to_live(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(100))
        .clock(clock.clone())
        .build();
    for round in 0..20u32 {
        for k in 0..10u32 {
            cache.insert(round * 10 + k, 1 + (k % 3));
            assert!(cache.weighted_size() <= 20);
        }
        clock.advance(Duration::from_secs(7));
    }
    cache.validate();
    cache.run_pending_tasks();
    assert!(cache.weighted_size() <= 20);
    cache.validate();
}

// =============================================================================================
// Round 4: more user-code faults
// =============================================================================================

/// A value whose weight changes after it is stored (interior mutability: a buffer that grows),
/// and a weigher that is not deterministic: the cache must account with the weight it charged,
/// so removing everything brings weighted_size back to 0 and removal weights match.
#[test]
fn d01_weight_that_changes_after_insert_is_accounted_as_charged() {
    let cache: Cache<u32, Arc<AtomicU64>> = Cache::builder()
        .max_capacity(1000)
        .weigher(|_k: &u32, v: &Arc<AtomicU64>| v.load(Ordering::SeqCst) as u32)
        .record_stats()
        .build();
    let mut charged = 0u64;
    let mut vals = Vec::new();
    for k in 0..20u32 {
        let v = Arc::new(AtomicU64::new(10));
        cache.insert(k, Arc::clone(&v));
        charged += 10;
        vals.push(v);
    }
    assert_eq!(cache.weighted_size(), charged);
    for v in &vals {
        v.store(30, Ordering::SeqCst); // grows after being stored
    }
    for k in 0..10 {
        cache.invalidate(&k);
    }
    cache.insert(0, Arc::new(AtomicU64::new(5))); // re-insert
    cache.insert(11, Arc::new(AtomicU64::new(5))); // replace a grown one
    cache.retain(|k, _| k % 2 == 0);
    cache.invalidate_all();
    assert_eq!(cache.weighted_size(), 0, "weight drifted");
    cache.validate();
    let s = cache.stats();
    eprintln!(
        "d01: removal weights explicit {:?} replaced {:?}",
        s.explicit, s.replaced
    );
    assert_eq!(
        s.explicit.weight + s.replaced.weight + s.size.weight,
        200 + 10,
        "removal weights are not the charged ones"
    );
}

/// A weigher that returns a different weight on every call.
#[test]
fn d02_nondeterministic_weigher() {
    let n = AtomicU64::new(0);
    let n = Arc::new(n);
    let n2 = Arc::clone(&n);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(50)
        .weigher(move |_k: &u32, _v: &u32| (n2.fetch_add(7, Ordering::SeqCst) % 13) as u32)
        .build();
    for i in 0..2000u32 {
        cache.insert(i % 97, i);
        if i % 5 == 0 {
            cache.invalidate(&(i % 89));
        }
        if i % 7 == 0 {
            cache.entry(i % 83).and_upsert_with(|_| i);
        }
        assert!(cache.weighted_size() <= 50);
    }
    cache.invalidate_all();
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
}

/// A key whose Eq panics now and then (a comparison against a poisoned field): every operation
/// either completes or panics, and the cache stays consistent (no orphaned entry, no weight
/// drift, no stuck key).
#[derive(Clone, Debug)]
struct TouchyKey(u32);
static TOUCHY: AtomicU64 = AtomicU64::new(0);
static TOUCHY_ON: AtomicBool = AtomicBool::new(false);
impl PartialEq for TouchyKey {
    fn eq(&self, o: &Self) -> bool {
        if TOUCHY_ON.load(Ordering::Relaxed) && TOUCHY.fetch_add(1, Ordering::Relaxed) % 5 == 0 {
            panic!("injected eq");
        }
        self.0 == o.0
    }
}
impl Eq for TouchyKey {}
impl Hash for TouchyKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.0 % 4).hash(h) // collide a lot, so Eq runs a lot
    }
}

#[test]
fn d03_panicking_eq_keeps_the_cache_consistent() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "d03");
    let removed = tally();
    let r = Arc::clone(&removed);
    let cache: Cache<TouchyKey, u32> = Cache::builder()
        .max_capacity(16)
        .record_stats()
        .eviction_listener(move |_k: &TouchyKey, _v: &u32, c| {
            *r.lock().unwrap().entry(cause_name(c)).or_insert(0) += 1;
        })
        .build();
    TOUCHY_ON.store(true, Ordering::SeqCst);
    for i in 0..3000u32 {
        let k = TouchyKey(i % 40);
        let c = cache.clone();
        let _ = catch_unwind(AssertUnwindSafe(|| match i % 6 {
            0 => c.insert(k, i),
            1 => {
                c.get(&k);
            }
            2 => {
                c.get_with(k, || i);
            }
            3 => c.invalidate(&k),
            4 => {
                c.entry(k).and_upsert_with(|_| i);
            }
            _ => {
                c.try_get_with(k, || Ok::<_, ()>(i)).ok();
            }
        }));
    }
    TOUCHY_ON.store(false, Ordering::SeqCst);
    cache.validate();
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    assert!(cache.weighted_size() <= 16);
    // Every key still loadable (none stuck loading).
    for i in 0..40 {
        let c = cache.clone();
        within(SHORT, move || c.get_with(TouchyKey(i), || i))
            .expect("key stuck loading")
            .unwrap();
    }
    cache.invalidate_all();
    cache.validate();
    assert_eq!(cache.entry_count(), 0);
}

/// An inline spawner (`|job| job()`, common in tests) with a loader that reads the cache: no
/// deadlock, the refresh happens.
#[test]
fn d04_inline_spawner_and_loader_reading_the_cache() {
    let _w = watchdog(LIMIT, "d04");
    let clock = ManualClock::new();
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&slot);
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(60))
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .spawner(|job| job())
        .loader(move |k: &u32| {
            let c = s2.lock().unwrap().clone();
            if let Some(c) = c {
                let _ = c.get(k); // plain read of the key being refreshed
                let _ = c.get(&(k + 100));
                if *k < 100 {
                    let _ = c.load(k + 100); // load of another key
                }
            }
            Ok::<_, BoxError>(n2.fetch_add(1, Ordering::SeqCst) as u32)
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    let first = cache.load(1).unwrap();
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.load(1).unwrap(), first);
    let after = cache.get(&1).unwrap();
    assert_ne!(after, first, "inline refresh did not happen");
    *slot.lock().unwrap() = None;
}

/// A loader that writes its own key then returns another value: the write wins (the caller
/// gets the loaded value, the cache keeps the write); with invalidate_all inside, nothing is
/// cached.
#[test]
fn d05_init_that_writes_its_own_key() {
    let _w = watchdog(LIMIT, "d05");
    let cache: Cache<u32, u32> = Cache::new(10);
    let c = cache.clone();
    let v = cache.get_with(1, || {
        c.insert(1, 100);
        5
    });
    assert_eq!(v, 5);
    assert_eq!(cache.get(&1), Some(100));
    let c = cache.clone();
    let v = cache.get_with(2, || {
        c.invalidate_all();
        6
    });
    assert_eq!(v, 6);
    assert_eq!(cache.get(&2), None, "a load overwrote invalidate_all");
    // A compute whose f writes the key: the insert wins over the verdict.
    let c = cache.clone();
    cache.entry(3).and_compute_with(|_| {
        c.insert(3, 300);
        assert_eq!(c.get(&3), Some(300));
        Op::Put(7)
    });
    assert_eq!(cache.get(&3), Some(300));
}

/// Dropping the last handle of a cache from inside one of its own values' Drop (a value that
/// holds a handle: a self-referencing cache, e.g. a registry) must not deadlock or crash.
#[allow(dead_code)]
struct HoldsCache(Option<Cache<u32, Arc<Mutex<HoldsCache>>>>);

#[test]
fn d06_last_handle_dropped_from_a_value_drop() {
    let _w = watchdog(LIMIT, "d06");
    let cache: Cache<u32, Arc<Mutex<HoldsCache>>> = Cache::new(10);
    let v = Arc::new(Mutex::new(HoldsCache(Some(cache.clone()))));
    cache.insert(1, v);
    // The cycle: the value holds the cache. Break it by invalidating from a clone, after
    // dropping our own handle: the value's drop then drops the last handle, during invalidate.
    let c = cache.clone();
    drop(cache);
    c.invalidate(&1); // drops the value -> drops a handle (not the last: `c` is alive)
    drop(c);
}

/// An eviction listener that drops the last handle to the cache it listens to (the listener
/// captured a handle through a slot): no deadlock.
#[test]
fn d07_listener_drops_a_handle_during_invalidate_all() {
    let _w = watchdog(LIMIT, "d07");
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&slot);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .eviction_listener(move |_k: &u32, _v: &u32, _c| {
            let taken = s2.lock().unwrap().take();
            drop(taken);
        })
        .build();
    for k in 0..5 {
        cache.insert(k, k);
    }
    *slot.lock().unwrap() = Some(cache.clone());
    let c = cache.clone();
    drop(cache);
    c.invalidate_all();
    assert_eq!(c.entry_count(), 0);
}

// =============================================================================================
// Round 5: thread-local destructors, cache use at thread exit
// =============================================================================================

static TLS_CACHE: std::sync::OnceLock<Cache<u32, u32>> = std::sync::OnceLock::new();

struct UsesCacheOnDrop;
impl Drop for UsesCacheOnDrop {
    fn drop(&mut self) {
        let c = TLS_CACHE.get().unwrap();
        c.insert(2, 2);
        let _ = c.get(&1);
        let _ = c.get(&2);
        let _ = c.get_with(3, || 3);
        c.invalidate(&1);
    }
}

thread_local! {
    static GUARD: std::cell::RefCell<Option<UsesCacheOnDrop>> = const { std::cell::RefCell::new(None) };
}

/// Child half of e01: runs in a separate process (a panic in a TLS destructor aborts).
#[test]
fn e01_child_cache_use_from_a_tls_destructor() {
    if std::env::var("HERDCACHE_S22_CHILD").is_err() {
        return;
    }
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10).record_stats().build();
    TLS_CACHE.set(cache.clone()).ok();
    cache.insert(1, 1);
    for _ in 0..8 {
        std::thread::spawn(|| {
            // Touch the cache first so its thread-locals exist, then register the guard:
            // thread-locals are destroyed in reverse order of first use... or not: either way
            // the guard's drop runs at thread exit.
            let c = TLS_CACHE.get().unwrap();
            let _ = c.get(&1);
            GUARD.with(|g| *g.borrow_mut() = Some(UsesCacheOnDrop));
            let _ = c.get(&1);
        })
        .join()
        .unwrap();
    }
    let s = cache.stats();
    println!("CHILD-OK hits={} misses={}", s.hits, s.misses);
}

/// A cache used from a thread-local destructor at thread exit (a connection guard returning
/// its state to a global cache): with record_stats, the cache's own thread-locals may already
/// be gone. It must not panic/abort.
#[test]
fn e01_cache_use_from_a_tls_destructor() {
    if std::env::var("HERDCACHE_S22_CHILD").is_ok() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "e01_child_cache_use_from_a_tls_destructor",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("HERDCACHE_S22_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!(
        "e01: {}",
        stdout
            .lines()
            .find(|l| l.contains("CHILD-OK"))
            .unwrap_or("")
    );
}

// =============================================================================================
// Round 6: statistics per call
// =============================================================================================

/// Each lookup call counts exactly one hit or one miss per key ("a miss counts one miss, not
/// two"), whichever API it comes through.
#[test]
fn f01_each_lookup_counts_once() {
    let cache: Cache<String, u32> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(|k: &String| Ok::<_, BoxError>(k.len() as u32))
        .build();
    let mut expect = (0u64, 0u64); // hits, misses
    let check = |what: &str, exp: (u64, u64)| {
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), exp, "after {what}");
    };
    cache.get_with_by_ref("a", || 1);
    expect.1 += 1;
    check("get_with_by_ref miss", expect);
    cache.get_with_by_ref("a", || 1);
    expect.0 += 1;
    check("get_with_by_ref hit", expect);
    cache.try_get_with_by_ref("b", || Ok::<_, ()>(1)).unwrap();
    expect.1 += 1;
    check("try_get_with_by_ref miss", expect);
    cache.optionally_get_with_by_ref("c", || None);
    expect.1 += 1;
    check("optionally_get_with_by_ref miss (None)", expect);
    cache.entry("d".to_string()).or_insert(1);
    expect.1 += 1;
    check("or_insert miss", expect);
    cache.entry_by_ref("d").or_insert_with(|| 1);
    expect.0 += 1;
    check("entry_by_ref or_insert_with hit", expect);
    cache.get_all(["a".to_string(), "e".to_string()], |m| {
        m.iter().map(|k| (k.clone(), 1)).collect()
    });
    expect.0 += 1;
    expect.1 += 1;
    check("get_all 1 hit 1 miss", expect);
    cache.load("f".to_string()).unwrap();
    expect.1 += 1;
    check("load miss", expect);
    cache.load("f".to_string()).unwrap();
    expect.0 += 1;
    check("load hit", expect);
    futures::executor::block_on(cache.get_with_async("g".to_string(), async { 1 }));
    expect.1 += 1;
    check("get_with_async miss", expect);
    futures::executor::block_on(
        cache
            .entry("g".to_string())
            .or_insert_with_async(async { 2 }),
    );
    expect.0 += 1;
    check("or_insert_with_async hit", expect);
    let s = cache.stats();
    // or_insert is a write, not a load; optionally None is a failure.
    assert_eq!((s.load_successes, s.load_failures), (6, 1), "{s:?}");
}

// =============================================================================================
// Round 7: fail-safe with Expiry, retain
// =============================================================================================

/// An Expiry whose expire_after_read extends lifetimes: a stale value served by fail-safe must
/// not come back to life for plain reads ("plain reads never see them").
#[test]
fn g01_fail_safe_stale_answer_does_not_revive_with_expiry() {
    struct Sliding;
    impl Expiry<u32, u32> for Sliding {
        fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
            Some(Duration::from_secs(10))
        }
        fn expire_after_read(&self, _k: &u32, _v: &u32, _r: Option<Duration>) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(Sliding)
        .fail_safe(Duration::from_secs(100))
        .refresh_backoff(Duration::from_secs(1))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        cache.try_get_with(1, || Err::<u32, _>("down")).ok(),
        Some(1)
    );
    assert_eq!(
        cache.try_get_with(1, || Err::<u32, _>("down")).ok(),
        Some(1)
    );
    assert_eq!(
        cache.get(&1),
        None,
        "a fail-safe answer revived the expired entry"
    );
    clock.advance(Duration::from_secs(100));
    assert!(
        cache.try_get_with(1, || Err::<u32, _>("down")).is_err(),
        "served past max_stale"
    );
}

/// retain(|_, _| true) keeps everything live; whether it also drops values kept for fail-safe
/// should agree with run_pending_tasks (which keeps them: a07).
#[test]
fn g02_retain_keep_all_and_fail_safe() {
    let clock = ManualClock::new();
    let cache = plain_fail_safe(&clock);
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    cache.run_pending_tasks();
    let after_rpt = cache.try_get_with(1, || Err::<u32, _>("down")).ok();
    let clock2 = ManualClock::new();
    let cache2 = plain_fail_safe(&clock2);
    cache2.insert(1, 1);
    clock2.advance(Duration::from_secs(61));
    cache2.retain(|_, _| true);
    let after_retain = cache2.try_get_with(1, || Err::<u32, _>("down")).ok();
    assert_eq!(
        after_rpt, after_retain,
        "run_pending_tasks and retain(keep all) disagree about fail-safe values"
    );
}

// =============================================================================================
// Round 8: what a fresh entry means
// =============================================================================================

/// Was a reported bug (s22), settled by documentation: `is_fresh` says this call's loader
/// produced the value, not that it is still stored; a value heavier than the capacity is
/// returned, counted as evicted for size, and not kept. (The fail-safe half of that report,
/// a fail-safe answer reported fresh, was a bug: `b02`.)
#[test]
fn r8_fresh_means_produced_here_not_kept() {
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .weigher(|_k: &u32, v: &u32| *v)
        .record_stats()
        .build();
    let e = cache.entry(2).or_insert(11);
    assert!(e.is_fresh() && *e.value() == 11);
    assert!(!cache.contains_key(&2));
    assert_eq!(cache.stats().size.count, 1);
    let e = cache.entry(2).or_insert(3);
    assert!(
        e.is_fresh(),
        "nothing was kept, so this call's value is fresh again"
    );
    assert!(!cache.entry(2).or_insert(4).is_fresh(), "now it is cached");
}
