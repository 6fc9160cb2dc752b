//! Attacks, through the public API only, on three changes: the sizing curve's challenger
//! shadows (`track_sizing`, `Cache::sizing`), the exactly sized ghost of evicted keys, and the
//! removal counters found by offset from the cause (`record_stats`, `Cache::stats`).
//!
//! Time is a `ManualClock`; nothing sleeps. Heap use is measured with a counting global
//! allocator (this thread's allocations only, so that tests running in parallel do not see
//! each other's).

#![cfg(not(any(loom, shuttle)))]

mod common;

use common::watchdog;
use herdcache::{Cache, ManualClock, RemovalCause, Sizing};
use std::collections::hash_map::DefaultHasher;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Heap counting

use common::heap::heap_now;

#[global_allocator]
static ALLOC: common::heap::Counting = common::heap::Counting;

const MIB: i64 = 1 << 20;

/// A fixed hasher (SipHash with zero keys), so that a tracked and an untracked cache see the
/// same hashes.
type Fixed = BuildHasherDefault<DefaultHasher>;

/// A hasher that keeps only the low `bits` bits of the low 32-bit half of a good hash (the
/// top half stays well mixed): the low half is what the cache samples on, so every key falls
/// under any sampling threshold above `1 << bits` (an identity-like hasher is as biased).
#[derive(Clone, Default)]
struct LowBits<const BITS: u32>;

struct LowBitsHasher<const BITS: u32>(DefaultHasher);

impl<const BITS: u32> BuildHasher for LowBits<BITS> {
    type Hasher = LowBitsHasher<BITS>;
    fn build_hasher(&self) -> Self::Hasher {
        LowBitsHasher(DefaultHasher::new())
    }
}

impl<const BITS: u32> Hasher for LowBitsHasher<BITS> {
    fn finish(&self) -> u64 {
        let h = self.0.finish();
        (h & !0xffff_ffff) | (h & ((1 << BITS) - 1))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Sizing invariants

/// Everything a `Sizing` promises, whatever the cache saw.
fn check(s: &Sizing, max: u64, what: &str) {
    let want: Vec<u64> = [(1, 4), (1, 2), (1, 1), (2, 1), (4, 1)]
        .iter()
        .map(|&(n, d)| (max.saturating_mul(n) / d).max(1))
        .collect();
    for (name, pts) in [
        ("points", s.points()),
        ("since_start", s.points_since_start()),
    ] {
        assert_eq!(pts.len(), 5, "{what}: {name} {s:?}");
        let caps: Vec<u64> = pts.iter().map(|p| p.0).collect();
        assert_eq!(caps, want, "{what}: {name} capacities {s:?}");
        assert!(
            caps.windows(2).all(|w| w[0] <= w[1]),
            "{what}: {name} not ordered by capacity {s:?}"
        );
        for &(c, r) in pts {
            assert!(
                r.is_finite() && (0.0..=1.0).contains(&r),
                "{what}: {name} ratio {r} at {c} {s:?}"
            );
        }
    }
    for (name, r) in [
        ("observed", s.observed()),
        ("observed_since_start", s.observed_since_start()),
        ("rate", s.rate()),
    ] {
        assert!(
            r.is_finite() && (0.0..=1.0).contains(&r),
            "{what}: {name} {r} {s:?}"
        );
    }
    assert!(
        s.samples().is_finite() && s.samples() >= 0.0,
        "{what}: samples {s:?}"
    );
    assert!(
        s.samples() <= s.samples_since_start() as f64 + 1e-6,
        "{what}: the decayed window holds more than all samples {s:?}"
    );
    if let Some(c) = s.suggested_capacity() {
        assert!(c > max, "{what}: suggested {c} not above {max} {s:?}");
        assert!(
            want[3..].contains(&c),
            "{what}: suggested {c} is not a tracked capacity {s:?}"
        );
    }
    let p = s.predicted_at(max);
    assert!((0.0..=1.0).contains(&p), "{what}: predicted_at {p}");
}

use common::Rng;

/// Phases that push the real cache's configuration and the challengers around: a loop a bit
/// larger than the cache (frequency admission wins), recency-heavy bursts (a large window
/// wins), a skewed mix, a scan of distinct keys. Checks the curve every `every` requests.
fn drive<S: BuildHasher + Clone + Send + Sync + 'static>(
    c: &Cache<u64, u64, S>,
    max: u64,
    ops: u64,
    every: u64,
    what: &str,
) {
    let span = max.clamp(1, 1 << 16);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ max);
    let mut fresh = 1u64 << 50;
    for i in 0..ops {
        let k = match (i / 4000) % 4 {
            0 => i % (span + span / 2 + 1),
            1 => (i / 64) * 7 + rng.next() % 8,
            2 => {
                let r = rng.next() % (4 * span + 1);
                r * r / (4 * span + 1)
            }
            _ => {
                fresh += 1;
                fresh
            }
        };
        if c.get(&k).is_none() {
            c.insert(k, i);
        }
        if i % every == every - 1 {
            check(&c.sizing().expect("tracked"), max, what);
        }
    }
    check(&c.sizing().expect("tracked"), max, what);
    c.validate();
}

#[test]
fn sizing_invariants_at_tiny_and_boundary_capacities() {
    let _dog = watchdog(LIMIT, "sizing_invariants_at_tiny_and_boundary_capacities");
    for max in [1u64, 2, 3, 7, 63, 64, 65, 1023, 1024, 1025, 4096] {
        for stats in [false, true] {
            let b = Cache::<u64, u64>::builder()
                .max_capacity(max)
                .track_sizing();
            let c = if stats {
                b.record_stats().build()
            } else {
                b.build()
            };
            let what = format!("max {max}, stats {stats}");
            drive(&c, max, 40_000, 997, &what);
            let s = c.sizing().unwrap();
            // At 1,024 entries or fewer every key is sampled.
            if max <= 1024 {
                assert_eq!(s.rate(), 1.0, "{what}: {s:?}");
                assert!(s.samples_since_start() > 30_000, "{what}: {s:?}");
            } else {
                assert!(s.rate() < 1.0, "{what}: {s:?}");
            }
        }
    }
}

#[test]
fn sizing_invariants_at_huge_capacities() {
    let _dog = watchdog(LIMIT, "sizing_invariants_at_huge_capacities");
    for max in [1u64 << 40, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
        let c = Cache::<u64, u64>::builder()
            .max_capacity(max)
            .shards(4)
            .track_sizing()
            .record_stats()
            .build();
        drive(&c, max, 20_000, 4999, &format!("max {max}"));
    }
}

/// A hasher whose sampled half is nearly constant makes every key a sample, at a capacity
/// where the rate is 1/64: the curve must still hold its invariants, the shadows their sizes.
#[test]
fn sizing_with_a_hasher_that_samples_every_key() {
    let _dog = watchdog(LIMIT, "sizing_with_a_hasher_that_samples_every_key");
    let max = 1u64 << 16; // rate 1024 / 65,536: a threshold of 1 << 26
    let before = heap_now();
    let c: Cache<u64, u64, LowBits<20>> = Cache::builder()
        .max_capacity(max)
        .shards(4)
        .track_sizing()
        .record_stats()
        .build_with_hasher(LowBits::<20>);
    drive(&c, max, 60_000, 9_999, "every key sampled");
    let s = c.sizing().unwrap();
    assert!(
        s.samples_since_start() > 50_000,
        "the hasher makes every read a sample: {s:?}"
    );
    let held = heap_now() - before;
    // 65,536 entries of u64 → u64 plus bounded shadows: far below this.
    assert!(held < 64 * MIB, "held {} MiB", held / MIB);
}

/// The tracker's memory does not follow the capacity nor the keys seen: a tracked cache costs
/// at most a few MiB more than the same cache untracked, fed the same distinct keys.
#[test]
fn sizing_memory_is_bounded_whatever_the_capacity() {
    let _dog = watchdog(LIMIT, "sizing_memory_is_bounded_whatever_the_capacity");
    let heap_of = |max: u64, tracked: bool| -> i64 {
        let before = heap_now();
        let b = Cache::<u64, u64>::builder().max_capacity(max).shards(8);
        let b = if tracked { b.track_sizing() } else { b };
        let c = b.build_with_hasher(Fixed::default());
        let mut peak = 0;
        for i in 0..60_000u64 {
            let k = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            if c.get(&k).is_none() {
                c.insert(k, i);
            }
            // A read of a recent key now and then, so that some samples hit.
            c.get(&(i / 2).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if i % 10_000 == 0 {
                let _ = c.sizing();
                peak = peak.max(heap_now() - before);
            }
        }
        let _ = c.sizing();
        let held = (heap_now() - before).max(peak);
        drop(c);
        held
    };
    for max in [1024u64, 1025, 1 << 20, 1 << 40, u64::MAX / 2] {
        let (plain, tracked) = (heap_of(max, false), heap_of(max, true));
        let extra = tracked - plain;
        assert!(
            extra < 4 * MIB,
            "max {max}: tracking costs {} KiB ({} vs {})",
            extra / 1024,
            tracked,
            plain
        );
    }
}

/// Weighted caches: weights of 0, 1, `u32::MAX` and wildly varying ones, tiny and huge
/// capacities; the curve keeps its invariants and its memory stays bounded.
#[test]
fn weighted_sizing_invariants_and_memory() {
    let _dog = watchdog(LIMIT, "weighted_sizing_invariants_and_memory");
    type W = fn(&u64, &u64) -> u32;
    let weighers: [(&str, W); 5] = [
        ("zero", |_, _| 0),
        ("one", |_, _| 1),
        ("max", |_, _| u32::MAX),
        ("wild", |k, _| match k % 5 {
            0 => 0,
            1 => 1,
            2 => u32::MAX,
            3 => (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32,
            _ => 1 << 20,
        }),
        ("skewed", |k, _| if k % 1024 == 0 { u32::MAX } else { 1 }),
    ];
    for (name, weigher) in weighers {
        for max in [1u64, 2, 7, 1024, 1025, 1 << 32, 1 << 40, u64::MAX / 2] {
            let before = heap_now();
            let c = Cache::<u64, u64>::builder()
                .max_capacity(max)
                .shards(4)
                .weigher(weigher)
                .track_sizing()
                .record_stats()
                .build();
            let what = format!("weigher {name}, max {max}");
            drive(&c, max, 12_000, 2_999, &what);
            let held = heap_now() - before;
            // 12,000 requests: whatever the cache keeps, a few MiB at most.
            assert!(held < 32 * MIB, "{what}: held {} MiB", held / MIB);
        }
    }
}

/// With expiry, `invalidate_all` and `retain` between samples: the shadows never expire nor
/// see invalidations (they predict capacity misses), but the curve stays well-formed.
#[test]
fn sizing_with_expiry_invalidate_all_and_retain() {
    let _dog = watchdog(LIMIT, "sizing_with_expiry_invalidate_all_and_retain");
    for max in [3u64, 1024, 1025, 50_000] {
        let clock = ManualClock::new();
        let c = Cache::<u64, u64>::builder()
            .max_capacity(max)
            .time_to_live(Duration::from_secs(10))
            .clock(clock.clone())
            .track_sizing()
            .build();
        let mut rng = Rng(7);
        for i in 0..30_000u64 {
            let k = rng.next() % (2 * max + 10);
            if c.get(&k).is_none() {
                c.insert(k, i);
            }
            match i % 5000 {
                1000 => clock.advance(Duration::from_secs(11)),
                2000 => c.invalidate_all(),
                3000 => c.retain(|k, _| k % 2 == 0),
                _ => {}
            }
            if i % 1001 == 0 {
                check(&c.sizing().unwrap(), max, &format!("ttl, max {max}"));
                assert!(c.health().warnings().len() < 16);
            }
        }
        check(&c.sizing().unwrap(), max, &format!("ttl, max {max}"));
        c.validate();
    }
}

/// Readers and writers on many threads while another calls `sizing` and `health` in a loop:
/// no panic, no deadlock (the watchdog aborts after 60 s), and every snapshot well-formed.
#[test]
fn sizing_and_health_under_concurrent_traffic() {
    let _dog = watchdog(LIMIT, "sizing_and_health_under_concurrent_traffic");
    for (max, weighted) in [
        (1024u64, false),
        (1025, false),
        (100, true),
        (1 << 20, true),
    ] {
        let clock = ManualClock::new();
        let b = Cache::<u64, u64>::builder()
            .max_capacity(max)
            .time_to_live(Duration::from_secs(30))
            .clock(clock.clone())
            .track_sizing()
            .record_stats();
        let b = if weighted {
            b.weigher(|k: &u64, _: &u64| (k % 17) as u32 * 3)
        } else {
            b
        };
        let c = Arc::new(b.build());
        let done = Arc::new(AtomicBool::new(false));
        let workers = 4;
        let start = Arc::new(Barrier::new(workers + 1));
        let mut handles = Vec::new();
        for t in 0..workers as u64 {
            let (c, start, clock) = (Arc::clone(&c), Arc::clone(&start), clock.clone());
            handles.push(std::thread::spawn(move || {
                start.wait();
                let mut rng = Rng(t + 1);
                for i in 0..20_000u64 {
                    let k = rng.next() % (3 * max.min(5000));
                    match i % 97 {
                        0 if t == 0 => clock.advance(Duration::from_secs(7)),
                        1 if t == 1 && i % (97 * 40) == 1 => c.invalidate_all(),
                        2 if t == 2 && i % (97 * 20) == 2 => c.retain(|k, _| k % 3 != 0),
                        _ => {}
                    }
                    if c.get(&k).is_none() {
                        c.insert(k, i);
                    }
                }
            }));
        }
        let observer = {
            let (c, done, start) = (Arc::clone(&c), Arc::clone(&done), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    check(&c.sizing().unwrap(), max, "concurrent");
                    let _ = c.health();
                    n += 1;
                }
                n
            })
        };
        for h in handles {
            h.join().expect("a worker panicked");
        }
        done.store(true, Ordering::Relaxed);
        let n = observer.join().expect("the observer panicked");
        assert!(n > 0);
        check(&c.sizing().unwrap(), max, "concurrent, at the end");
        c.validate();
    }
}

// ---------------------------------------------------------------------------------------------
// Ghost of evicted keys

/// Caches whose shards hold 0, 1, 63, 64 or 65 entries, and weighted caches whose shard
/// capacity is enormous, through many evictions: no panic, the capacity holds, the heap stays
/// small.
#[test]
fn ghost_survives_tiny_and_enormous_shards() {
    let _dog = watchdog(LIMIT, "ghost_survives_tiny_and_enormous_shards");
    for max in [0u64, 1, 2, 63, 64, 65, 127, 129] {
        for shards in [1usize, 2] {
            let before = heap_now();
            let c = Cache::<u64, u64>::builder()
                .max_capacity(max)
                .shards(shards)
                .build();
            // A loop slightly larger than the cache (the ghost's admission rule at work), then
            // distinct keys.
            for i in 0..50_000u64 {
                let k = if i < 25_000 {
                    i % (max + max / 4 + 2)
                } else {
                    i
                };
                if c.get(&k).is_none() {
                    c.insert(k, i);
                }
                assert!(c.entry_count() <= max, "max {max}: {}", c.entry_count());
            }
            c.validate();
            let held = heap_now() - before;
            assert!(held < MIB, "max {max}: held {held} bytes");
        }
    }
    // Enormous shard capacities in weight units, few entries: the ghost follows the entries
    // present, not the capacity.
    for (max, w) in [
        (1u64 << 40, u32::MAX),
        (u64::MAX / 2, u32::MAX),
        (u64::MAX, u32::MAX),
        (1 << 33, 1 << 28),
    ] {
        let before = heap_now();
        let c = Cache::<u64, u64>::builder()
            .max_capacity(max)
            .shards(1)
            .weigher(move |_, _| w)
            .build();
        let fits = max / u64::from(w);
        let n = fits.min(2_000) + 20_000;
        for i in 0..n {
            let k = if i % 2 == 0 {
                i % (fits.min(2_000) + 10)
            } else {
                i
            };
            if c.get(&k).is_none() {
                c.insert(k, i);
            }
        }
        assert!(c.weighted_size() <= max);
        c.validate();
        let held = heap_now() - before;
        assert!(
            held < 8 * MIB,
            "max {max}, weight {w}: held {} KiB",
            held / 1024
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Removal statistics

#[derive(Default)]
struct Tally {
    count: [AtomicU64; 4],
    weight: [AtomicU64; 4],
}

fn cause_index(c: RemovalCause) -> usize {
    match c {
        RemovalCause::Expired => 0,
        RemovalCause::Explicit => 1,
        RemovalCause::Replaced => 2,
        RemovalCause::Size => 3,
    }
}

fn weigh(k: &u64, v: &u64) -> u32 {
    match v % 7 {
        0 => 0,
        1 => u32::MAX,
        _ => ((k ^ v) % 1000) as u32 + 1,
    }
}

fn stats_by_cause(c: &Cache<u64, u64>) -> [(u64, u64); 4] {
    let s = c.stats();
    [s.expired, s.explicit, s.replaced, s.size].map(|r| (r.count, r.weight))
}

fn tally_by_cause(t: &Tally) -> [(u64, u64); 4] {
    std::array::from_fn(|i| {
        (
            t.count[i].load(Ordering::SeqCst),
            t.weight[i].load(Ordering::SeqCst),
        )
    })
}

fn counted_cache(max: u64, clock: &ManualClock) -> (Cache<u64, u64>, Arc<Tally>) {
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    let c = Cache::<u64, u64>::builder()
        .max_capacity(max)
        .weigher(weigh)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |k: &u64, v: &u64, cause| {
            let i = cause_index(cause);
            t.count[i].fetch_add(1, Ordering::SeqCst);
            t.weight[i].fetch_add(u64::from(weigh(k, v)), Ordering::SeqCst);
        })
        .build();
    (c, tally)
}

/// Each cause, alone, lands in its own count and weight counters, exactly.
#[test]
fn each_removal_cause_has_its_own_count_and_weight() {
    let _dog = watchdog(LIMIT, "each_removal_cause_has_its_own_count_and_weight");
    let clock = ManualClock::new();
    let w = |k: u64, v: u64| u64::from(weigh(&k, &v));
    // Values ≡ 2 (mod 7): weights (k ^ v) % 1000 + 1, all below the capacity.
    let v = |i: u64| 7 * i + 2;

    // Expired.
    let (c, _) = counted_cache(1 << 30, &clock);
    let want: u64 = (0..10).map(|k| w(k, v(k))).sum();
    for k in 0..10 {
        c.insert(k, v(k));
    }
    clock.advance(Duration::from_secs(11));
    c.run_pending_tasks();
    for k in 0..10 {
        assert_eq!(c.get(&k), None);
    }
    assert_eq!(
        stats_by_cause(&c),
        [(10, want), (0, 0), (0, 0), (0, 0)],
        "expired"
    );

    // Explicit: remove, invalidate, invalidate_all, retain.
    let (c, _) = counted_cache(1 << 30, &clock);
    for k in 0..40 {
        c.insert(k, v(k));
    }
    c.remove(&0);
    c.invalidate(&1);
    c.retain(|k, _| *k >= 20);
    c.invalidate_all();
    let want: u64 = (0..40).map(|k| w(k, v(k))).sum();
    assert_eq!(
        stats_by_cause(&c),
        [(0, 0), (40, want), (0, 0), (0, 0)],
        "explicit"
    );

    // Replaced: the old value's weight.
    let (c, _) = counted_cache(1 << 30, &clock);
    for k in 0..10 {
        c.insert(k, v(k));
        c.insert(k, v(k + 100));
    }
    let want: u64 = (0..10).map(|k| w(k, v(k))).sum();
    assert_eq!(
        stats_by_cause(&c),
        [(0, 0), (0, 0), (10, want), (0, 0)],
        "replaced"
    );

    // Size: everything inserted and not left is evicted, with its weight; and an entry too
    // heavy to store counts there with its full weight (u32::MAX).
    let (c, _) = counted_cache(5000, &clock);
    let mut inserted = (0u64, 0u64);
    for k in 0..200 {
        c.insert(k, v(k));
        inserted = (inserted.0 + 1, inserted.1 + w(k, v(k)));
    }
    c.run_pending_tasks();
    let left = (c.entry_count(), c.weighted_size());
    let s = stats_by_cause(&c);
    assert_eq!(
        s,
        [
            (0, 0),
            (0, 0),
            (0, 0),
            (inserted.0 - left.0, inserted.1 - left.1)
        ],
        "size"
    );
    c.insert(1000, 1); // 1 % 7 == 1: weight u32::MAX
    let s2 = stats_by_cause(&c);
    assert_eq!(
        s2[3],
        (s[3].0 + 1, s[3].1 + u64::from(u32::MAX)),
        "too heavy"
    );
}

/// Many threads removing for every cause at once: the statistics equal the listener's tally,
/// per cause, in count and weight; and the weights balance (inserted = present + removed).
#[test]
fn removal_statistics_are_exact_from_many_threads() {
    let _dog = watchdog(LIMIT, "removal_statistics_are_exact_from_many_threads");
    let clock = ManualClock::new();
    let (c, tally) = counted_cache(20_000, &clock);
    let c = Arc::new(c);
    let inserted = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let threads = 6;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads as u64)
        .map(|t| {
            let (c, clock, inserted, start) = (
                Arc::clone(&c),
                clock.clone(),
                Arc::clone(&inserted),
                Arc::clone(&start),
            );
            std::thread::spawn(move || {
                start.wait();
                let mut rng = Rng(0xABCD + t);
                for i in 0..15_000u64 {
                    let k = rng.next() % 400;
                    match rng.next() % 100 {
                        0..=59 => {
                            let v = rng.next() % 10_000;
                            c.insert(k, v);
                            inserted.0.fetch_add(1, Ordering::SeqCst);
                            inserted
                                .1
                                .fetch_add(u64::from(weigh(&k, &v)), Ordering::SeqCst);
                        }
                        60..=79 => {
                            c.get(&k);
                        }
                        80..=89 => {
                            c.invalidate(&k);
                        }
                        90..=94 => {
                            c.remove(&k);
                        }
                        95..=97 => c.retain(|k, v| (k + v) % 5 != 0),
                        _ => {
                            if i % 4 == 0 {
                                clock.advance(Duration::from_secs(3));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a worker panicked");
    }
    c.run_pending_tasks();
    let s = stats_by_cause(&c);
    let t = tally_by_cause(&tally);
    assert_eq!(s, t, "statistics vs listener, per cause (count, weight)");
    for (i, name) in ["expired", "explicit", "replaced", "size"]
        .iter()
        .enumerate()
    {
        assert!(s[i].0 > 0, "the workload removes for cause {name}: {s:?}");
    }
    let removed = s.iter().fold((0u64, 0u64), |a, x| (a.0 + x.0, a.1 + x.1));
    let ins = (
        inserted.0.load(Ordering::SeqCst),
        inserted.1.load(Ordering::SeqCst),
    );
    assert_eq!(
        (ins.0 - removed.0, ins.1 - removed.1),
        (c.entry_count(), c.weighted_size()),
        "inserted = present + removed"
    );
    c.validate();
}
