//! Hostile input: a hasher under which every key collides, clock jumps of hours in both
//! directions, zero and maximal durations, weights of 0 and above the capacity, capacities of 0
//! and 1, and a burst of writers that must not push the cache past its bound.

#![cfg(not(loom))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, ManualClock};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Every key hashes to the same value.
#[derive(Clone, Default)]
struct Colliding;

struct ConstHasher;

impl Hasher for ConstHasher {
    fn finish(&self) -> u64 {
        0x5555_5555_5555_5555
    }
    fn write(&mut self, _: &[u8]) {}
}

impl BuildHasher for Colliding {
    type Hasher = ConstHasher;
    fn build_hasher(&self) -> ConstHasher {
        ConstHasher
    }
}

#[test]
fn a_degenerate_hasher_stays_correct_and_finishes() {
    let _dog = watchdog(Duration::from_secs(120), "degenerate hasher");
    let cache: Cache<u32, u32, Colliding> =
        Cache::builder().hasher(Colliding).max_capacity(300).build();
    for i in 0..3_000u32 {
        cache.insert(i, i * 2);
        if i % 7 == 0 {
            cache.remove(&(i / 2));
        }
        let probe = i / 3;
        if let Some(v) = cache.get(&probe) {
            assert_eq!(v, probe * 2, "colliding keys never mix up their values");
        }
    }
    assert!(cache.weighted_size() <= 300);
    assert_eq!(cache.get_with(100_000, || 7), 7);
    cache.validate();
}

#[test]
fn clock_jumps_of_hours_both_ways() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1_000)
        .time_to_live(Duration::from_secs(60))
        .time_to_idle(Duration::from_secs(30))
        .clock(clock.clone())
        .build();
    for i in 0..500 {
        cache.insert(i, i);
    }
    clock.rewind(Duration::from_secs(5 * 3600));
    for i in 0..500 {
        assert_eq!(cache.get(&i), Some(i), "time going back expires nothing");
    }
    clock.advance(Duration::from_secs(5 * 3600)); // back to where it was, as the cache sees it
    clock.advance(Duration::from_secs(10 * 3600));
    for i in 500..600 {
        cache.insert(i, i); // writes after the jump reclaim everything
    }
    assert!(
        cache.entry_count() <= 100 + 1,
        "{} entries left",
        cache.entry_count()
    );
    for i in 0..500 {
        assert_eq!(cache.get(&i), None);
    }
    clock.advance(Duration::MAX);
    cache.insert(1, 1);
    cache.run_pending_tasks();
    cache.validate();
}

#[test]
fn zero_weights_and_capacity_edges() {
    // Weight 0 does not count toward the bound.
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .weigher(|_k: &u32, v: &u32| *v)
        .build();
    for i in 0..100 {
        cache.insert(i, 0);
    }
    assert_eq!(cache.weighted_size(), 0);
    cache.insert(1000, 10);
    assert_eq!(cache.weighted_size(), 10);
    cache.insert(1001, 11);
    assert_eq!(
        cache.get(&1001),
        None,
        "heavier than the capacity: not stored"
    );
    cache.insert(1002, 4);
    assert!(cache.weighted_size() <= 10);
    cache.validate();
    // Capacity 0 stores nothing, even through loads, which still return their value.
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(0)
        .loader(|k: &u32| Ok::<_, BoxError>(*k))
        .build();
    assert_eq!(cache.load(5).unwrap(), 5);
    assert_eq!(cache.get_with(6, || 6), 6);
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn a_write_burst_never_overshoots_by_more_than_one_entry_per_writer() {
    const CAPACITY: u64 = 10_000;
    const WRITERS: u64 = 2;
    const MAX_WEIGHT: u64 = 4;
    let secs = std::env::var("HERDCACHE_BURST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let _dog = watchdog(Duration::from_secs(secs + 120), "write burst");
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(CAPACITY)
        .weigher(|k: &u64, _v: &u64| (k % MAX_WEIGHT) as u32 + 1)
        .build();
    let stop = AtomicBool::new(false);
    let max_seen = AtomicU64::new(0);
    let inserted = AtomicU64::new(0);
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                max_seen.fetch_max(cache.weighted_size(), Ordering::Relaxed);
            }
        });
        for w in 0..WRITERS {
            let (cache, stop, inserted) = (&cache, &stop, &inserted);
            s.spawn(move || {
                let mut k = w << 48;
                while !stop.load(Ordering::Relaxed) {
                    cache.insert(k, k);
                    k += 1;
                }
                inserted.fetch_add(k - (w << 48), Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let bound = CAPACITY + WRITERS * MAX_WEIGHT;
    let seen = max_seen.load(Ordering::Relaxed);
    eprintln!(
        "write burst: {} unique keys inserted in {secs} s, highest weighted size seen {seen} (bound {bound})",
        inserted.load(Ordering::Relaxed)
    );
    assert!(seen <= bound, "resident weight {seen} above {bound}");
    assert!(cache.weighted_size() <= CAPACITY);
    cache.validate();
}
