//! The public API of the core cache: bounds, expiry, iteration, and the manual clock.

#![cfg(not(loom))]

use herdcache::{BuildError, Cache, Expiry, ManualClock};
use std::collections::HashSet;
use std::time::Duration;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn cache_is_send_sync_and_clones_share() {
    assert_send_sync::<Cache<String, Vec<u8>>>();
    let a: Cache<u32, u32> = Cache::new(10);
    let b = a.clone();
    a.insert(1, 1);
    assert_eq!(b.get(&1), Some(1));
}

#[test]
fn borrowed_lookups() {
    let c: Cache<String, String> = Cache::new(10);
    c.insert("a".to_string(), "x".to_string());
    assert_eq!(c.get("a").as_deref(), Some("x"));
    assert!(c.contains_key("a"));
    c.invalidate("a");
    assert!(!c.contains_key("a"));
}

#[test]
fn get_returns_the_last_inserted_value() {
    let c = Cache::new(100);
    for i in 0..10u32 {
        c.insert(7u32, i);
        assert_eq!(c.get(&7), Some(i), "a write is visible at once");
    }
    assert_eq!(c.entry_count(), 1);
}

#[test]
fn filling_an_empty_cache_keeps_everything() {
    for cap in [100u64, 1_000, 10_000, 100_000] {
        let c = Cache::new(cap);
        for k in 0..cap {
            c.insert(k, k);
        }
        let kept = (0..cap).filter(|k| c.contains_key(k)).count() as u64;
        assert!(kept * 100 >= cap * 99, "cap {cap}: kept only {kept}");
        assert!(c.weighted_size() <= cap);
        c.validate();
    }
}

#[test]
fn weight_never_exceeds_capacity_after_insert() {
    let c = Cache::builder()
        .max_capacity(1_000)
        .weigher(|_k: &u64, v: &u64| (*v % 50) as u32)
        .build();
    for i in 0..50_000u64 {
        c.insert(i % 3_000, i);
        assert!(
            c.weighted_size() <= 1_000,
            "after insert {i}: {}",
            c.weighted_size()
        );
    }
    c.validate();
}

#[test]
fn an_entry_heavier_than_the_capacity_is_not_stored() {
    let c = Cache::builder()
        .max_capacity(10)
        .weigher(|_k: &u8, v: &u32| *v)
        .build();
    c.insert(1, 5);
    assert_eq!(c.get(&1), Some(5));
    c.insert(1, 11);
    assert_eq!(
        c.get(&1),
        None,
        "the old value must not survive an overweight insert"
    );
    assert_eq!(c.weighted_size(), 0);
    c.insert(2, 10);
    assert_eq!(c.get(&2), Some(10), "exactly the capacity fits");
}

#[test]
fn zero_capacity_stores_nothing_and_one_stores_one() {
    let c = Cache::new(0);
    c.insert(1, 1);
    assert_eq!(c.get(&1), None);
    let c = Cache::new(1);
    for i in 0..100 {
        c.insert(i, i);
        assert_eq!(c.entry_count(), 1);
    }
    c.validate();
}

#[test]
fn remove_invalidate_all_retain_iter() {
    let c = Cache::new(1_000);
    for i in 0..100u32 {
        c.insert(i, i * 2);
    }
    assert_eq!(c.remove(&5), Some(10));
    assert_eq!(c.remove(&5), None);
    c.retain(|k, _| k % 2 == 0);
    let keys: HashSet<u32> = c
        .iter()
        .map(|(k, v)| {
            assert_eq!(v, k * 2);
            k
        })
        .collect();
    assert_eq!(keys, (0..100).filter(|k| k % 2 == 0).collect());
    assert_eq!(c.entry_count(), 50);
    c.invalidate_all();
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
    assert_eq!(c.iter().count(), 0);
    c.validate();
}

#[test]
fn invalid_configurations_fail_at_build_time() {
    let r = Cache::<u8, u8>::builder().try_build();
    assert_eq!(r.err(), Some(BuildError::NoCapacity));
    let p =
        std::panic::catch_unwind(|| Cache::<u8, u8>::builder().shards(0).max_capacity(1).build());
    assert!(p.is_err(), "build() panics on an invalid configuration");
    // A shard count that is not a power of two is rounded up, as moka's `num_segments`.
    let c = Cache::<u8, u8>::builder().shards(6).max_capacity(1).build();
    assert_eq!(c.policy().num_segments(), 8);
}

fn ttl_cache(ttl: Duration) -> (Cache<u32, u32>, ManualClock) {
    let clock = ManualClock::new();
    let c = Cache::builder()
        .max_capacity(1_000)
        .time_to_live(ttl)
        .clock(clock.clone())
        .build();
    (c, clock)
}

#[test]
fn ttl_expires_exactly_at_the_deadline() {
    let (c, clock) = ttl_cache(Duration::from_millis(500));
    c.insert(1, 1);
    clock.advance(Duration::from_millis(499));
    assert_eq!(c.get(&1), Some(1));
    assert!(c.contains_key(&1));
    clock.advance(Duration::from_millis(1));
    assert_eq!(c.get(&1), None);
    assert!(!c.contains_key(&1));
    assert_eq!(c.iter().count(), 0, "iteration skips expired entries");
    // Replacing the value starts a new life.
    c.insert(1, 2);
    clock.advance(Duration::from_millis(400));
    assert_eq!(c.get(&1), Some(2));
}

#[test]
fn zero_and_max_durations() {
    let (c, clock) = ttl_cache(Duration::ZERO);
    c.insert(1, 1);
    assert_eq!(c.get(&1), None, "a zero TTL stores nothing");
    assert_eq!(c.entry_count(), 0);
    let (c, _) = ttl_cache(Duration::MAX);
    c.insert(1, 1);
    clock.advance(Duration::MAX);
    assert_eq!(c.get(&1), Some(1));
    let clock = ManualClock::new();
    let c = Cache::builder()
        .max_capacity(10)
        .time_to_idle(Duration::MAX)
        .time_to_live(Duration::MAX)
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    clock.advance(Duration::MAX);
    clock.advance(Duration::MAX);
    assert_eq!(c.get(&1), Some(1));
    c.validate();
}

#[test]
fn a_clock_that_does_not_move_never_expires_anything() {
    let (c, _clock) = ttl_cache(Duration::from_nanos(1));
    c.insert(1, 1);
    for _ in 0..1000 {
        assert_eq!(c.get(&1), Some(1));
    }
}

#[test]
fn time_going_backwards_is_ignored() {
    let (c, clock) = ttl_cache(Duration::from_secs(10));
    clock.advance(Duration::from_secs(3600));
    c.insert(1, 1);
    clock.rewind(Duration::from_secs(3600));
    assert_eq!(c.get(&1), Some(1));
    clock.advance(Duration::from_secs(3600 + 10));
    assert_eq!(
        c.get(&1),
        None,
        "the cache's time resumes from its latest reading"
    );
}

#[test]
fn tti_is_extended_by_reads() {
    let clock = ManualClock::new();
    let c = Cache::builder()
        .max_capacity(100)
        .time_to_idle(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    for _ in 0..5 {
        clock.advance(Duration::from_secs(9));
        assert_eq!(c.get(&1), Some(1));
    }
    clock.advance(Duration::from_secs(10));
    assert_eq!(c.get(&1), None);
}

#[test]
fn ttl_caps_tti() {
    let clock = ManualClock::new();
    let c = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(25))
        .time_to_idle(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    clock.advance(Duration::from_secs(9));
    assert_eq!(c.get(&1), Some(1));
    clock.advance(Duration::from_secs(9));
    assert_eq!(c.get(&1), Some(1));
    clock.advance(Duration::from_secs(7)); // 25 s: the hard deadline, though read 7 s ago
    assert_eq!(c.get(&1), None);
}

struct PerKey;
impl Expiry<u32, u32> for PerKey {
    fn expire_after_create(&self, k: &u32, _v: &u32) -> Option<Duration> {
        (*k != 0).then(|| Duration::from_secs(u64::from(*k)))
    }
    fn expire_after_read(
        &self,
        _k: &u32,
        _v: &u32,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        remaining
    }
    fn expire_after_update(
        &self,
        _k: &u32,
        v: &u32,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_secs(u64::from(*v)))
    }
}

#[test]
fn per_entry_expiry() {
    let clock = ManualClock::new();
    let c = Cache::builder()
        .max_capacity(100)
        .expire_after(PerKey)
        .clock(clock.clone())
        .build();
    for k in 0..5 {
        c.insert(k, 100);
    }
    clock.advance(Duration::from_millis(1500));
    let live: Vec<u32> = (0..5).filter(|k| c.get(k).is_some()).collect();
    assert_eq!(
        live,
        vec![0, 2, 3, 4],
        "key 0 never expires; key 1 lived 1 s"
    );
    c.insert(3, 1); // update: lives 1 more second
    clock.advance(Duration::from_secs(1));
    assert_eq!(c.get(&2), None, "key 2 lived 2 s");
    assert_eq!(c.get(&3), None);
    assert_eq!(c.get(&4), Some(100));
}

#[test]
fn expired_entries_are_reclaimed_without_being_touched() {
    let (c, clock) = ttl_cache(Duration::from_secs(1));
    for i in 0..500 {
        c.insert(i, i);
    }
    clock.advance(Duration::from_secs(3));
    // Ordinary writes to other keys reclaim the expired ones.
    for i in 1000..1010 {
        c.insert(i, i);
    }
    assert!(
        c.entry_count() <= 10 + 1,
        "entries left: {}",
        c.entry_count()
    );
    c.validate();
    clock.advance(Duration::from_secs(3));
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 0);
    assert_eq!(c.weighted_size(), 0);
}

#[test]
fn reads_alone_eventually_reclaim() {
    let (c, clock) = ttl_cache(Duration::from_secs(1));
    for i in 0..200 {
        c.insert(i, i);
    }
    clock.advance(Duration::from_secs(5));
    // Only reads of a key that was never inserted: maintenance runs every 1024 reads.
    for _ in 0..10_000 {
        assert_eq!(c.get(&9999), None);
    }
    assert!(c.entry_count() < 200, "reads did not reclaim anything");
}
