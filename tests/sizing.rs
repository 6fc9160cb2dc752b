//! The sizing curve (`track_sizing`, `Cache::sizing`): predictions that must differ from the
//! observed ratio where the capacity matters, and agree with it where it does not.
//!
//! No time is involved (the caches keep none); nothing here depends on timing. With the planted
//! bug `--cfg herdcache_broken_sizing` (every point is the observed ratio copied), the loop tests
//! fail:
//!
//! ```text
//! RUSTFLAGS="--cfg herdcache_broken_sizing" cargo test -p herdcache --test sizing
//! ```

use herdcache::{Cache, Sizing};

/// get, then insert on a miss (the trace-replay pattern).
fn replay(cache: &Cache<u64, u64>, keys: impl Iterator<Item = u64>) {
    for k in keys {
        if cache.get(&k).is_none() {
            cache.insert(k, k);
        }
    }
}

fn at(s: &Sizing, capacity: u64) -> f64 {
    s.points()
        .iter()
        .find(|p| p.0 == capacity)
        .unwrap_or_else(|| panic!("no point at {capacity}: {s:?}"))
        .1
}

#[test]
fn none_when_not_tracked() {
    let c = Cache::<u64, u64>::new(100);
    replay(&c, 0..1000);
    assert!(c.sizing().is_none());
    let w = Cache::<u64, u64>::builder()
        .max_capacity(100)
        .weigher(|_, _| 3)
        .build();
    assert!(w.sizing().is_none());
}

#[test]
fn the_points_are_the_five_capacities_in_order() {
    let c = Cache::<u64, u64>::builder()
        .max_capacity(1000)
        .track_sizing()
        .build();
    let s = c.sizing().expect("tracked");
    let caps: Vec<u64> = s.points().iter().map(|p| p.0).collect();
    assert_eq!(caps, [250, 500, 1000, 2000, 4000]);
    assert_eq!(s.samples(), 0.0);
    assert!(s.points().iter().all(|p| p.1 == 0.0), "nothing seen yet");
}

#[test]
fn a_loop_of_one_and_a_half_capacities_fits_at_twice_the_size() {
    // Large enough to be sampled (rate 2000 / 20,000 = 10 %).
    let cap = 20_000u64;
    let c = Cache::<u64, u64>::builder()
        .max_capacity(cap)
        .track_sizing()
        .build();
    replay(&c, (0..600_000u64).map(|i| i % 30_000));
    let s = c.sizing().expect("tracked");
    assert!(s.rate() < 0.2 && s.samples() > 10_000.0, "{s:?}");
    // At 2 × and 4 × the loop fits: every request but the first round's hits. The 4 × point
    // is the coarser (a 512-entry shadow of a subset of the samples, not a target): over 100
    // seeds (stop 29) its lowest was 0.897, once, the 2 × point's 0.929.
    assert!(at(&s, 2 * cap) > 0.9, "{s:?}");
    assert!(at(&s, 4 * cap) > 0.85, "{s:?}");
    // At 1 × at most two thirds of it can stay; at 0.5 × and 0.25 × less.
    assert!(at(&s, cap) < 0.7, "{s:?}");
    assert!(at(&s, cap / 2) < at(&s, cap), "{s:?}");
    // The 0.25 × point is coarse (a 32-entry shadow of a subset): it came out 2 points above
    // the 0.5 × one in one seed of 200 (0.362 vs 0.343), so only "not materially above".
    assert!(at(&s, cap / 4) < at(&s, cap / 2) + 0.05, "{s:?}");
    // The 1 × prediction is the observed ratio, within a few points (a loop longer than the
    // cache is where a real cache and its shadow diverge most, and the hash seed is random:
    // 5 points have been seen); the 2 × is not.
    assert!((at(&s, cap) - s.observed()).abs() < 0.1, "{s:?}");
    assert!(at(&s, 2 * cap) - s.observed() > 0.25, "{s:?}");
}

#[test]
fn a_working_set_under_the_capacity_predicts_the_observed_ratio_everywhere() {
    // 1,000 keys read uniformly at random: they fit even at 0.25 × 10,000. (Not 2,000: the
    // 0.25 × shadow holds 32 entries of a subset of the sampled keys, about 26 of 2,000 keys,
    // and in about one seed in ten more than 32 of them fall in the subset and it thrashes —
    // the coarseness `Sizing`'s docs describe. 1,000 keys put about 13 there.)
    let cap = 10_000u64;
    let c = Cache::<u64, u64>::builder()
        .max_capacity(cap)
        .track_sizing()
        .build();
    let mut x = 0x1234_5678_9abc_def1u64;
    replay(
        &c,
        std::iter::repeat_with(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % 1000
        })
        .take(400_000),
    );
    let s = c.sizing().expect("tracked");
    assert!(s.observed() > 0.95, "{s:?}");
    for &(capacity, p) in s.points() {
        assert!(
            (p - s.observed()).abs() < 0.02,
            "at {capacity}: {p} vs observed {}: {s:?}",
            s.observed()
        );
    }
}

#[test]
fn the_window_follows_a_change_of_working_set() {
    // First a loop that fits only at 2 ×, then one that fits at 1 ×: the windowed curve follows
    // the second; the totals since the start still remember the first.
    let cap = 4000u64;
    let c = Cache::<u64, u64>::builder()
        .max_capacity(cap)
        .track_sizing()
        .build();
    replay(&c, (0..300_000u64).map(|i| i % 6000));
    let first = c.sizing().expect("tracked");
    assert!(at(&first, cap) < 0.8, "{first:?}");
    replay(&c, (0..2_000_000u64).map(|i| 1_000_000 + i % 3000));
    let s = c.sizing().expect("tracked");
    assert!(at(&s, cap) > 0.95, "{s:?}");
    assert!(at(&s, cap / 2) < 0.8, "{s:?}");
    assert!(
        s.points_since_start()[2].1 < at(&s, cap),
        "since start includes the first loop: {s:?}"
    );
}

/// `n` keys drawn uniformly at random (a fixed seed).
fn uniform(n: u64, count: usize) -> impl Iterator<Item = u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    })
    .take(count)
}

#[test]
fn a_weighted_cache_predicts_by_weight() {
    // 300 keys of weight 10 read at random: 3,000 units; the capacity is 2,000 units, so about
    // two thirds hit at 1 ×, about a third at 0.5 ×, all at 2 ×. (Uniform, not a loop: a loop
    // has several self-sustaining states, and a weighted cache has no selector to leave a bad
    // one.)
    let cap = 2000u64;
    let c = Cache::<u64, u64>::builder()
        .max_capacity(cap)
        .weigher(|_, _| 10)
        .track_sizing()
        .build();
    replay(&c, uniform(300, 3000));
    // The mean weight is 10: the rate stays 1 (2,000 × 10 units is above the capacity).
    let early = c.sizing().expect("tracked");
    assert_eq!(early.rate(), 1.0);
    replay(&c, uniform(300, 100_000));
    let s = c.sizing().expect("tracked");
    assert!(at(&s, 2 * cap) > 0.95, "fits at 4,000 units: {s:?}");
    assert!(at(&s, cap / 4) < 0.3, "{s:?}");
    assert!((at(&s, cap / 2) - 1.0 / 3.0).abs() < 0.1, "{s:?}");
    assert!((at(&s, cap) - 2.0 / 3.0).abs() < 0.1, "{s:?}");
    assert!((at(&s, cap) - s.observed()).abs() < 0.05, "{s:?}");
}

#[test]
fn a_weighted_cache_of_heavy_entries_samples_by_entries() {
    // Entries of 1,000 units in a capacity of 10 M units: about 10,000 entries. The rate is
    // chosen for 2,000 entries (20 %), not 2,000 units (0.02 %), once the weights are known.
    let c = Cache::<u64, u64>::builder()
        .max_capacity(10_000_000)
        .weigher(|_, _| 1000)
        .track_sizing()
        .build();
    replay(&c, uniform(15_000, 20_000));
    // Few sampled inserts at the first rate: the call measures the mean weight and restarts.
    let s = c.sizing().expect("tracked");
    assert!((s.rate() - 0.2).abs() < 0.01, "{s:?}");
    replay(&c, uniform(15_000, 300_000));
    let s = c.sizing().expect("tracked");
    assert!(at(&s, 20_000_000) > 0.9, "{s:?}");
    assert!((at(&s, 10_000_000) - 2.0 / 3.0).abs() < 0.1, "{s:?}");
    assert!((at(&s, 10_000_000) - s.observed()).abs() < 0.05, "{s:?}");
}

#[test]
fn concurrent_readers_and_writers_leave_a_sane_curve() {
    let c = Cache::<u64, u64>::builder()
        .max_capacity(5000)
        .track_sizing()
        .build();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = &c;
            s.spawn(move || {
                replay(c, (0..100_000u64).map(|i| (i * 7 + t) % 8000));
                let _ = c.sizing();
            });
        }
    });
    let s = c.sizing().expect("tracked");
    assert!(s.samples() > 0.0);
    for &(_, p) in s.points() {
        assert!((0.0..=1.0).contains(&p), "{s:?}");
    }
    assert!(at(&s, 20_000) >= at(&s, 1250), "{s:?}");
}

#[test]
fn with_statistics_the_hottest_keys_are_accounted_for() {
    // One key takes 30 % of the reads; the rest are spread over 100,000 keys. The sample holds
    // the hot key with probability 5 % (the rate): either way, with `record_stats` the
    // adjustment (the reads counted against the samples seen) makes the observed ratio on the
    // samples that of all reads.
    let c = Cache::<u64, u64>::builder()
        .max_capacity(20_000)
        .record_stats()
        .track_sizing()
        .build();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    replay(
        &c,
        std::iter::repeat_with(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 10 < 3 {
                0
            } else {
                1 + (x >> 8) % 100_000
            }
        })
        .take(600_000),
    );
    let s = c.sizing().expect("tracked");
    let all = c.stats().hit_ratio();
    // The sample holds about 1,000 of the 100,000 cold keys, so the estimate itself moves
    // with the seed: up to 0.031 away in 300 runs (0.02 failed one run in 27). Without the
    // adjustment it reads about 0.19 against 0.44.
    assert!(
        (s.observed_since_start() - all).abs() < 0.05,
        "observed {} vs every read {all}: {s:?}",
        s.observed_since_start()
    );
    // The 1 × prediction follows.
    assert!((s.points_since_start()[2].1 - all).abs() < 0.06, "{s:?}");
}

/// A hasher that keeps a `u64` key's low 32 bits (which decide whether the key is sampled)
/// and mixes the rest: the test picks which keys are sampled.
#[derive(Clone, Default)]
struct LowBitsKept(u64);

impl std::hash::Hasher for LowBitsKept {
    fn finish(&self) -> u64 {
        let mixed = (self.0 >> 32 ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed & !0xFFFF_FFFF) | (self.0 & 0xFFFF_FFFF)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[test]
fn with_statistics_the_curve_is_anchored_to_the_caches_own_hit_ratio() {
    // The sampled keys are unlucky: every one of them is requested once (a miss), while the
    // keys outside the sample form a hot set that always hits. The sampled requests' own hit
    // ratio is about 0; the cache's, about 15/16. With statistics recorded, the observed
    // ratio is the cache's own and the points move with it (the 1 × point stays next to it).
    let cache: Cache<u64, u64, std::hash::BuildHasherDefault<LowBitsKept>> = Cache::builder()
        .max_capacity(20_000)
        .record_stats()
        .track_sizing()
        .build_with_hasher(Default::default());
    let rate = cache.sizing().expect("tracked").rate();
    assert!(rate < 0.5, "{rate}");
    let period = (1.0 / rate).round() as u64;
    let sampled = |i: u64| (i << 32) | (i % 1000); // low bits far under the threshold
    let hot = |i: u64| (i << 32) | 0xFFFF_FFF0; // never sampled
    for i in 0..200_000u64 {
        let k = if i % period == 0 {
            sampled(i)
        } else {
            hot(i % 1000)
        };
        if cache.get(&k).is_none() {
            cache.insert(k, k);
        }
    }
    let s = cache.sizing().expect("tracked");
    let stats = cache.stats().hit_ratio();
    assert!(stats > 0.9, "{stats}");
    assert!(s.samples_since_start() > 10_000, "{s:?}");
    assert!(
        (s.observed_since_start() - stats).abs() < 0.01,
        "{stats} {s:?}"
    );
    assert!((s.observed() - stats).abs() < 0.02, "{stats} {s:?}");
    assert!((at(&s, 20_000) - s.observed()).abs() < 0.02, "{s:?}");
}

/// Every key sampled (a capacity of 1,024 or less) and no statistics, with a time to live (the
/// reads are then counted on the maintenance tick, 64 at a time per thread): many threads
/// with few reads each. The observed ratio is the sampled requests' own; the hot-key
/// adjustment against the approximate read count has no sampling error to correct at rate 1
/// and was skipped only after this case predicted 13 % for a true 29 % (the count lagged by up
/// to 63 reads per thread, most of 5,000).
#[test]
fn at_rate_one_many_threads_with_few_reads_observe_the_true_ratio() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(50)
        .time_to_live(std::time::Duration::from_secs(3600))
        .track_sizing()
        .build();
    let (hits, reads) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..64u64 {
            let (cache, hits, reads) = (&cache, &hits, &reads);
            s.spawn(move || {
                for k in uniform(150, 80).map(|k| (k + t * 37) % 150) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if cache.get(&k).is_some() {
                        hits.fetch_add(1, Ordering::Relaxed);
                    } else {
                        cache.insert(k, k);
                    }
                }
            });
        }
    });
    let truth = hits.into_inner() as f64 / reads.into_inner() as f64;
    let observed = cache.sizing().expect("tracked").observed_since_start();
    assert!(
        (observed - truth).abs() < 0.03,
        "observed {observed:.3}, counted {truth:.3}"
    );
}
