//! Round 94 (b): the sizing curve's subset scaling (round 92: gains by the realised share of
//! the 1 × shadow's misses) and its challengers, against replays at the other capacities (the
//! oracle, as attack_s92b), and the statistics' saturating load time. Public API only; a
//! fixed-seed hasher (`Seeded`): single-threaded and deterministic. A helper's tests from
//! round 93, one of which failed then:
//!
//! `scans_and_a_phase_change`: 300,000 requests, 80 % uniform over 8,000 keys and 20 % a
//! one-time scan, then 300,000 of a loop over 15,000 keys; `max_capacity` 10,000, the default
//! policy. The 2 × point since start was 54.4 % where a replay at 20,000 hits 81.0 % (hash seed
//! 2; seed 3: 73.2 % vs 80.4 %): the real cache's configuration and the 2 × challenger's both
//! held the 2 × shadows at 10–40 % of the loop, while a real cache of 20,000 moved to window
//! 80 % and hit all of it; the challenger, leading, never moved on. Fixed: a challenger that
//! leads by far frees its size's shadow to try another configuration (src/sizing.rs, "Which
//! policy"): 78.7 % and 78.8 % now.
//!
//! Passing from the start: a loop over 30,000 keys at 10,000 (fits at 4 ×, not 2 ×: 2 × ≈ 0,
//! 4 × within 10 points, `suggested_capacity` 40,000 for 3 seeds); hot + loop mixes and a hot
//! set with rare re-visitors held only at 2 ×, LRU and default, 3 seeds, within 6 points at
//! 0.5 × / 2 × and 10 at 4 ×; every point in [0, 1]; `suggested_capacity` equal to its
//! documented definition recomputed from the points; the load time from 8 threads overlapping
//! huge clock advances saturates without panic, never falls, its mean at most the longest load.

mod common;

use herdcache::{BoxError, Cache, EvictionPolicy, ManualClock, Sizing, SUGGEST_MARGIN_POINTS};
use std::sync::Arc;
use std::time::Duration;

use crate::common::seeded::Seeded;

fn in01(x: f64) -> bool {
    x.is_finite() && (0.0..=1.0).contains(&x)
}

fn replay(cap: u64, keys: &[u64], lru: bool, tracked: bool, seed: u64) -> Cache<u64, u64, Seeded> {
    let mut b = Cache::builder().max_capacity(cap).record_stats();
    if tracked {
        b = b.track_sizing();
    }
    if lru {
        b = b.eviction_policy(EvictionPolicy::lru());
    }
    let c: Cache<u64, u64, Seeded> = b.hasher(Seeded(seed)).build();
    for &k in keys {
        if c.get(&k).is_none() {
            c.insert(k, k);
        }
    }
    c
}

/// `Sizing::suggested_capacity`, recomputed from the points by its documented definition:
/// "the smallest tracked capacity above `max_capacity` whose predicted hit ratio is within
/// SUGGEST_MARGIN_POINTS of the best point's (at or above `max_capacity`) — or `None` when no
/// larger capacity is predicted to gain that many points over the 1 × point".
fn suggested_by_docs(z: &Sizing, cap: u64) -> Option<u64> {
    let p = z.points();
    let m = SUGGEST_MARGIN_POINTS / 100.0;
    let above: Vec<(u64, f64)> = p.iter().copied().filter(|x| x.0 >= cap).collect();
    let best = above.iter().map(|x| x.1).fold(0.0, f64::max);
    let own = p.iter().find(|x| x.0 == cap).unwrap().1;
    if best - own < m {
        return None;
    }
    above
        .iter()
        .find(|x| x.0 > cap && x.1 >= best - m)
        .map(|x| x.0)
}

fn point(z: &Sizing, cap: u64) -> f64 {
    z.points_since_start()
        .iter()
        .find(|p| p.0 == cap)
        .unwrap_or_else(|| panic!("no point at {cap}: {z:?}"))
        .1
}

/// Replays `keys` tracked at `cap`, then untracked at 0.5 ×, 2 ×, 4 × (the oracle); returns
/// the rows off by more than the tolerance (2 ×: 6 points; 0.5 ×: 6; 4 ×: 10) and checks
/// the shape (points in [0, 1], `suggested_capacity` as documented).
fn check(what: &str, cap: u64, keys: &[u64], lru: bool, seed: u64, bad: &mut Vec<String>) {
    let c = replay(cap, keys, lru, true, seed);
    let z = c.sizing().expect("tracked");
    for &(at, r) in z.points().iter().chain(z.points_since_start()) {
        assert!(in01(r), "{what}: point {at}: {r}: {z:?}");
    }
    assert!(in01(z.observed()) && in01(z.rate()), "{what}: {z:?}");
    assert_eq!(
        z.suggested_capacity(),
        suggested_by_docs(&z, cap),
        "{what}: suggested_capacity against its definition: {z:?}"
    );
    let observed = z.observed_since_start();
    if lru && (point(&z, cap) - observed).abs() * 100.0 > 3.0 {
        bad.push(format!(
            "{what}: 1x point {:.4} vs observed {observed:.4}",
            point(&z, cap)
        ));
    }
    for (n, d, tol) in [(1u64, 2u64, 6.0), (2, 1, 6.0), (4, 1, 10.0)] {
        let at = cap * n / d;
        let actual = replay(at, keys, lru, false, seed).stats().hit_ratio();
        let predicted = point(&z, at);
        eprintln!("{what}: at {at}: predicted {predicted:.4} actual {actual:.4}");
        if (predicted - actual).abs() * 100.0 > tol {
            bad.push(format!(
                "{what}: at {at} ({n}/{d} x): predicted {predicted:.4}, actual {actual:.4} (rate {:.4})",
                z.rate()
            ));
        }
    }
}

const CAP: u64 = 10_000;

/// A loop over 30,000 keys at 10,000 entries: fits at 4 × (40,000) but not at 2 × (20,000),
/// where exact LRU hits nothing. Sampled at rate 0.1024 with the 2 × and 4 × shadows fed
/// subsets (shares 0.5 and 0.125). `Sizing` docs: the points are "the hit ratio it would have
/// had … at 0.25, 0.5, 1, 2 and 4 × its `max_capacity`"; accuracy at 0.5 × and 2 × "worst
/// 2.0–4.2 points"; bounds here 6 (10 at 4 ×). Suggested: 40,000.
#[test]
fn a_loop_that_fits_at_4x_but_not_2x() {
    let _w = common::watchdog(Duration::from_secs(600), "loop 4x");
    let mut bad = Vec::new();
    let keys: Vec<u64> = (0..600_000u64).map(|i| i % 30_000).collect();
    for seed in 1..=3u64 {
        check(
            &format!("loop30k lru seed {seed}"),
            CAP,
            &keys,
            true,
            seed,
            &mut bad,
        );
        let c = replay(CAP, &keys, true, true, seed);
        let z = c.sizing().unwrap();
        if z.suggested_capacity() != Some(4 * CAP) {
            bad.push(format!(
                "seed {seed}: suggested {:?}: {z:?}",
                z.suggested_capacity()
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Mixed hot + loop keys: half the requests uniform over 4,000 hot keys, half a loop over
/// 12,000 keys (16,000 keys in all: fits at 2 ×); and a hot set the 1 × shadow holds with
/// rare re-visitors (2 % of requests over 500 extra keys, each back after ~25,000 requests:
/// held at 2 ×, not at 1 ×): the 1 × shadow misses almost nothing on a subset. Under exact
/// LRU and the default policy, 3 seeds each, against replays.
#[test]
fn mixed_hot_and_loop_and_rare_revisitors() {
    let _w = common::watchdog(Duration::from_secs(900), "mixed");
    let mut bad = Vec::new();
    for seed in 1..=3u64 {
        let mut r = common::SplitMix(seed);
        let mut lp = 0u64;
        let mixed: Vec<u64> = (0..600_000)
            .map(|_| {
                if r.chance(500) {
                    r.below(4_000)
                } else {
                    lp += 1;
                    1_000_000 + lp % 12_000
                }
            })
            .collect();
        let mut r = common::SplitMix(seed + 100);
        let rare: Vec<u64> = (0..600_000)
            .map(|_| {
                if r.chance(20) {
                    2_000_000 + r.below(500)
                } else {
                    r.below(9_800)
                }
            })
            .collect();
        for lru in [true, false] {
            check(
                &format!("hot+loop lru {lru} seed {seed}"),
                CAP,
                &mixed,
                lru,
                seed,
                &mut bad,
            );
            check(
                &format!("rare lru {lru} seed {seed}"),
                CAP,
                &rare,
                lru,
                seed,
                &mut bad,
            );
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Scans and a phase change: 80 % of requests uniform over 8,000 keys, 20 % a one-time scan
/// (never repeated: no size would hit it); then a phase change to a loop over 15,000 keys
/// (fits at 2 ×). The points since start against replays of the whole trace.
#[test]
fn scans_and_a_phase_change() {
    let _w = common::watchdog(Duration::from_secs(900), "scan phase");
    let mut bad = Vec::new();
    for seed in 1..=3u64 {
        let mut r = common::SplitMix(seed + 7);
        let mut scan = 10_000_000u64;
        let mut keys: Vec<u64> = (0..300_000)
            .map(|_| {
                if r.chance(200) {
                    scan += 1;
                    scan
                } else {
                    r.below(8_000)
                }
            })
            .collect();
        keys.extend((0..300_000u64).map(|i| 5_000_000 + i % 15_000));
        for lru in [true, false] {
            check(
                &format!("scan+phase lru {lru} seed {seed}"),
                CAP,
                &keys,
                lru,
                seed,
                &mut bad,
            );
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// `CacheStats::total_load_time`: "Saturates at `u64::MAX` nanoseconds … rather than wrap";
/// `average_load_time`: "The mean duration of a finished load". Loads on 8 threads at once
/// (different stripes), each spanning one huge advance of a manual clock, twice over: no
/// panic, the total never falls between snapshots, the mean at most the longest load, and a
/// snapshot difference (`-`) never panics.
#[test]
fn saturating_load_time_from_many_threads() {
    let _w = common::watchdog(Duration::from_secs(60), "load time");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .clock(clock.clone())
        .build();
    let mut last = c.stats();
    for round in 0..2u64 {
        let gate = common::Gate::new();
        let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (c, gate, entered) = (c.clone(), gate.clone(), entered.clone());
                s.spawn(move || {
                    let _ = c.try_get_with(round * 100 + t, || {
                        entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        gate.pass();
                        if t % 2 == 0 {
                            Ok(t)
                        } else {
                            Err(BoxError::from("injected"))
                        }
                    });
                });
            }
            assert!(common::eventually(|| entered
                .load(std::sync::atomic::Ordering::SeqCst)
                == 8));
            clock.advance(Duration::from_nanos(u64::MAX / 4));
            gate.open();
        });
        let s = c.stats();
        assert!(
            s.total_load_time >= last.total_load_time,
            "{last:?} then {s:?}"
        );
        let avg = s.average_load_time();
        assert!(
            avg <= Duration::from_nanos(u64::MAX / 4 + 1_000_000),
            "{avg:?} {s:?}"
        );
        assert!(avg > Duration::ZERO);
        let d = s - last;
        let _ = d.average_load_time();
        let _ = last - s;
        last = s;
    }
}
