//! Concurrent stress: several threads, a million mixed operations, a watchdog that turns a
//! deadlock into a failure, the capacity bound checked throughout, and a value type that counts
//! its live instances so that a leak (or a double drop) shows when the cache is dropped.

#![cfg(not(loom))]

mod common;

use common::{live_lock, watchdog, Counted, LIVE};
use herdcache::{Cache, ManualClock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CAPACITY: u64 = 2_000;

fn mixed_ops(threads: u64, ops_per_thread: u64, with_ttl: bool) {
    let _serial = live_lock();
    let before = LIVE.load(Ordering::SeqCst);
    let clock = ManualClock::new();
    {
        let mut b = Cache::builder()
            .max_capacity(CAPACITY)
            .weigher(|_k: &u64, v: &Counted| 1 + (v.0 % 3) as u32)
            .clock(clock.clone());
        if with_ttl {
            b = b.time_to_live(Duration::from_millis(50));
        }
        let cache: Cache<u64, Counted> = b.build();
        let max_seen = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let _dog = watchdog(Duration::from_secs(120), "stress: mixed operations");
        std::thread::scope(|s| {
            let _stop_on_exit = common::SetOnDrop(&stop);
            // A sampler that watches the weight while writers run. Writers in progress may each
            // hold one entry beyond the bound.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    max_seen.fetch_max(cache.weighted_size(), Ordering::Relaxed);
                    std::thread::yield_now();
                }
            });
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let cache = cache.clone();
                    let clock = clock.clone();
                    s.spawn(move || {
                        let mut next = common::rng(0x9E37_79B9_7F4A_7C15u64 ^ t);
                        for i in 0..ops_per_thread {
                            let x = next();
                            let k = x % 10_000;
                            match x % 100 {
                                0..=49 => {
                                    if let Some(v) = cache.get(&k) {
                                        assert_eq!(v.0 / 1_000_000, k, "value belongs to its key");
                                    }
                                }
                                50..=84 => {
                                    cache.insert(k, Counted::new(k * 1_000_000 + i % 1_000_000))
                                }
                                85..=92 => {
                                    cache.remove(&k);
                                }
                                93..=96 => cache.invalidate(&k),
                                97 => {
                                    if t == 0 && i % 1000 == 97 {
                                        clock.advance(Duration::from_millis(7));
                                    }
                                }
                                98 => {
                                    if i % 10_000 == 98 {
                                        cache.retain(|k, _| k % 7 != 0);
                                    }
                                }
                                _ => {
                                    if i % 50_000 == 99 {
                                        cache.invalidate_all();
                                    }
                                }
                            }
                            // Weight 3 is the heaviest entry; each thread may add one in flight.
                            assert!(cache.weighted_size() <= CAPACITY + 3 * threads);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("worker panicked");
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(max_seen.load(Ordering::Relaxed) <= CAPACITY + 3 * threads);
        assert!(
            cache.weighted_size() <= CAPACITY,
            "bound holds once all inserts returned"
        );
        cache.validate();
        let live_now = LIVE.load(Ordering::SeqCst) - before;
        assert_eq!(
            live_now,
            cache.entry_count() as i64,
            "every live value is in the cache"
        );
    }
    assert_eq!(
        LIVE.load(Ordering::SeqCst),
        before,
        "dropping the cache drops every value once"
    );
}

#[test]
fn a_million_mixed_operations_on_four_threads() {
    mixed_ops(4, 250_000, false);
}

#[test]
fn a_million_mixed_operations_with_expiry() {
    mixed_ops(2, 500_000, true);
}

/// Writers read the clock before they take the shard lock; meanwhile another thread may move
/// the clock past their entry's whole lifetime and advance the shard's timer wheel. Such an
/// entry is due at once: it must be filed where the wheel still looks, so that the next
/// `run_pending_tasks` past its deadline reclaims it (it was filed in a bucket already drained
/// and stayed, expired and counted, until the wheel came round again ≈69 s later).
#[test]
fn an_entry_written_with_a_clock_read_before_the_wheel_moved_is_reclaimed() {
    let _dog = watchdog(Duration::from_secs(120), "stress: late-filed deadlines");
    let mut late = Vec::new();
    for round in 0..40 {
        let clock = ManualClock::new();
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100_000)
            .shards(1)
            .time_to_live(Duration::from_secs(2))
            .clock(clock.clone())
            .build();
        std::thread::scope(|s| {
            for t in 0..3u32 {
                let cache = cache.clone();
                s.spawn(move || {
                    for i in 0..3_000 {
                        cache.insert(t * 100_000 + i, i);
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..3_000 {
                    clock.advance(Duration::from_secs(5));
                    cache.run_pending_tasks();
                }
            });
        });
        // Checks that every entry is filed where the wheel will find it.
        cache.validate();
        // Every entry was written at most 2 s before the clock's current time.
        clock.advance(Duration::from_secs(4));
        cache.run_pending_tasks();
        if cache.entry_count() != 0 {
            late.push((round, cache.entry_count()));
        }
        cache.validate();
    }
    assert!(late.is_empty(), "(round, entries left): {late:?}");
}
