//! Round 97: an outside attack (a helper, public API only) on round 96's health fixes and
//! on `sizing()` of weighted caches (ManualClock throughout; busy shards held by a writer
//! whose key `Eq` blocks, tests/common/routed.rs). Failing when written, fixed since:
//! `stale_exact_count_is_stamped_on_busy_snapshots`,
//! `busy_shard_of_weight_zero_entries_hides_the_wave`, `refresh_after_never_does_not_exempt_the_wave`,
//! `weight_changed_by_overwrite_is_seen_by_the_shadows`, `nanosecond_figures_are_not_printed_as_zero`.
#![allow(clippy::type_complexity)]

mod common;

use common::warnings::{sync_of, thrash_of};

use common::routed::{during_busy, r, Identity, Routed, RC, TRAP_LOCK};
use herdcache::{Cache, EvictionPolicy, ManualClock, Warning};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
fn ms(s: u64) -> Duration {
    Duration::from_millis(s)
}

// ------------------------------------------------------------------------------------------
// 1. Busy shards of a weighted cache
// ------------------------------------------------------------------------------------------

/// Module docs: "the entries are the most any snapshot of the window counted"; `health_over`:
/// "an estimate for that call only: the window's peak keeps counts". A call with a busy shard
/// keeps in its snapshot the *last* exact count, however old: a count of 1,000 light entries
/// made at t = 0 (before a switch to heavy entries) is stamped on every snapshot taken while a
/// shard stays busy, minutes later, when the cache holds about 10 entries. Then the window's
/// "peak" is 1,000, which no snapshot of the window counted: residence 100 s ≥ TTL / 2 = 50 s,
/// no Thrashing, where the control (no busy shard) reports about 1 s and Thrashing.
#[test]
fn stale_exact_count_is_stamped_on_busy_snapshots() {
    let _g = TRAP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(60), "stale count");
    let mut got = Vec::new();
    for busy in [false, true] {
        let clock = ManualClock::new();
        let c: RC = Cache::builder()
            .max_capacity(1_000)
            .time_to_live(secs(100))
            .shards(2)
            .record_stats()
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_k: &Routed, v: &u64| *v as u32)
            .hasher(Identity)
            .clock(clock.clone())
            .build();
        for id in 0..999u64 {
            c.insert(r(id, 0), 1);
        }
        c.insert(r(5_000, 1), 1);
        let first = c.health();
        let run = move |c: RC| {
            let mut calls = Vec::new();
            for i in 0..3_000u64 {
                c.insert(r(10_000 + i, 0), 100);
                clock.advance(ms(100));
                if i % 75 == 74 {
                    calls.push(c.health());
                }
            }
            (c.weighted_size(), calls.pop().unwrap())
        };
        let (w, h) = if busy {
            during_busy(&c, 1, 5_000, 1, secs(15), run)
        } else {
            run(c.clone())
        };
        let n = c.entry_count();
        assert!(w <= 1_000);
        let after = c.health();
        got.push((
            busy,
            n,
            thrash_of(&h),
            thrash_of(&after),
            h.to_string(),
            first.to_string(),
        ));
    }
    for (busy, n, t, after, h, _) in &got {
        assert!(
            *n <= 12 && t.is_some_and(|(e, r)| e >= 500 && r.is_some_and(|r| r < secs(5))),
            "busy shard: {busy}: expected Thrashing (~600 evictions in the window, ~10 entries, \
             residence ~1 s), got {t:?} ({n} entries; the next call after: {after:?}): {h}\nall: {got:?}"
        );
    }
}

/// `health_over`: busy shards counted "by their weight at a mean weight per entry — theirs
/// when last read, else the free shards' —". A busy shard whose entries all weigh 0 (which the
/// sizing docs allow: "of weight 0 (which count toward no capacity)") has weight 0: counted
/// as 0 entries, though its count was read exactly at the previous call (100). The wave of
/// its 100 entries (written at one instant, TTL 32 s) disappears while it is busy: due is
/// capped to the estimated 10 entries (< SYNC_MIN).
#[test]
fn busy_shard_of_weight_zero_entries_hides_the_wave() {
    let _g = TRAP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(60), "weight 0 busy");
    let clock = ManualClock::new();
    let c: RC = Cache::builder()
        .max_capacity(100_000)
        .time_to_live(secs(32))
        .shards(2)
        .weigher(|_k: &Routed, v: &u64| *v as u32)
        .hasher(Identity)
        .clock(clock.clone())
        .build();
    for id in 0..10u64 {
        c.insert(r(id, 0), 1);
        clock.advance(secs(3));
    }
    for id in 0..100u64 {
        c.insert(r(1_000 + id, 1), 0);
    }
    clock.advance(secs(1));
    let before = c.health();
    let during = during_busy(&c, 1, 1_000, 0, secs(15), |c| c.health());
    let after = c.health();
    assert!(
        sync_of(&before).is_some_and(|s| s.0 >= 100),
        "before: {before}"
    );
    assert!(
        sync_of(&after).is_some_and(|s| s.0 >= 100),
        "after: {after}"
    );
    assert!(
        sync_of(&during).is_some_and(|s| s.0 >= 64),
        "shard 1 busy (100 entries of weight 0, read exactly by the previous call): the wave \
         is gone: {:?}; during: {during}; before: {before}",
        sync_of(&during)
    );
}

/// `health_over` never waits for a shard lock, with concurrent health()/sizing() calls and a
/// busy shard, while the cache grows and shrinks on the free shard.
#[test]
fn health_and_sizing_never_block_on_a_busy_shard() {
    let _g = TRAP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(60), "no block");
    let clock = ManualClock::new();
    let c: RC = Cache::builder()
        .max_capacity(1 << 40)
        .time_to_live(secs(32))
        .shards(2)
        .record_stats()
        .track_sizing()
        .weigher(|_k: &Routed, v: &u64| *v as u32)
        .hasher(Identity)
        .clock(clock.clone())
        .build();
    c.insert(r(7, 1), 1_000_000); // too heavy
    c.insert(r(8, 1), 3);
    let out = during_busy(&c, 1, 8, 5, secs(15), move |c| {
        let mut hs = Vec::new();
        for round in 0..20u64 {
            for i in 0..200u64 {
                c.insert(r(round * 1_000 + i, 0), (i % 7) * round);
                let _ = c.get(&r(round * 1_000 + i / 2, 0));
            }
            if round % 3 == 0 {
                for i in 0..200u64 {
                    c.invalidate(&r(round * 1_000 + i, 0));
                }
            }
            let _ = c.sizing();
            clock.advance(secs(4));
            hs.push(c.health());
            let _ = c.health_over(Duration::ZERO);
            let _ = c.health_over(Duration::MAX);
        }
        hs
    });
    assert_eq!(out.len(), 20);
}

// ------------------------------------------------------------------------------------------
// 2. Display: figures shown
// ------------------------------------------------------------------------------------------

/// `Warning`: "`Display` gives a one-line advice"; the durations are printed with "three
/// significant digits at most". A time to live of 8 ns and loads of 3 ns (on a manual clock):
/// the advice must show them, not "0.00 µs" (no significant digit: the figure shown is zero,
/// and "time to live (0.01 µs) < 4× the median load (0.00 µs)" is false as printed).
#[test]
fn nanosecond_figures_are_not_printed_as_zero() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_nanos(8))
        .clock(clock.clone())
        .build();
    for k in 0..10u64 {
        c.get_with(k, || {
            clock.advance(Duration::from_nanos(3));
            k
        });
    }
    let h = c.health_over(secs(60));
    let w = h
        .warnings()
        .iter()
        .find(|w| matches!(w, Warning::TtlShorterThanLoads { .. }))
        .unwrap_or_else(|| panic!("no warning: {h}"));
    let s = w.to_string();
    assert!(!s.contains('\n'), "{s}");
    assert!(
        !s.contains("(0.00 µs)") && !s.contains("(0 ns)"),
        "a non-zero figure printed as zero: {s} ({w:?})"
    );
}

// ------------------------------------------------------------------------------------------
// 3. Sizing of weighted caches vs exact replays
// ------------------------------------------------------------------------------------------

/// Replays `trace` (get, then insert on a miss with weight `w`; or an overwrite) into a real
/// LRU cache of `cap` (1 shard), returning its hit ratio.
fn replay(cap: u64, trace: &[(u64, u64, bool)], track: bool) -> (f64, Option<herdcache::Sizing>) {
    let c: Cache<u64, u64, common::seeded::Seeded> = Cache::builder()
        .max_capacity(cap)
        .shards(1)
        .record_stats()
        .eviction_policy(EvictionPolicy::lru())
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .build_with_hasher(common::seeded::Seeded(7));
    let c = if track {
        let c2: Cache<u64, u64, common::seeded::Seeded> = Cache::builder()
            .max_capacity(cap)
            .shards(1)
            .record_stats()
            .track_sizing()
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_k: &u64, v: &u64| *v as u32)
            .build_with_hasher(common::seeded::Seeded(7));
        drop(c);
        c2
    } else {
        c
    };
    let (mut hits, mut reads) = (0u64, 0u64);
    for (i, &(k, w, overwrite)) in trace.iter().enumerate() {
        if overwrite {
            c.insert(k, w);
            continue;
        }
        reads += 1;
        if c.get(&k).is_some() {
            hits += 1;
        } else {
            c.insert(k, w);
        }
        if track && i % 5_000 == 0 {
            let _ = c.sizing();
        }
    }
    let s = if track { c.sizing() } else { None };
    (hits as f64 / reads as f64, s)
}

fn check_curve(name: &str, cap: u64, trace: &[(u64, u64, bool)]) -> Vec<String> {
    let (observed, s) = replay(cap, trace, true);
    let s = s.expect("tracked");
    let mut bad = Vec::new();
    for &(pc, p) in s.points_since_start() {
        if pc < cap / 2 {
            continue;
        }
        let (exact, _) = replay(pc, trace, false);
        if (p - exact).abs() > 0.03 {
            bad.push(format!(
                "{name}: at {pc} predicted {:.3} vs replay {:.3} (observed {observed:.3}, rate {})",
                p,
                exact,
                s.rate()
            ));
        }
    }
    bad
}

fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

/// Sizing docs: small caches are sampled at rate 1 (`R = min(1, 2000 × mean weight /
/// max_capacity)`), shadows under LRU run exact LRU: the 0.5x / 1x / 2x points should match
/// replays of the same trace at those capacities. Traces: (a) every key weighs 0 or 1, (b) all
/// weigh 0, (d) a giant key.
#[test]
fn weighted_curve_matches_replays() {
    let _w = common::watchdog(secs(120), "curve");
    let mut bad = Vec::new();
    let mut x = 1u64;
    // (a) weights 0 or 1, a skewed working set of 300 keys, capacity 100.
    let a: Vec<_> = (0..40_000)
        .map(|_| {
            let k = lcg(&mut x) % 300;
            (k, k % 2, false)
        })
        .collect();
    bad.extend(check_curve("w01", 100, &a));
    // (b) every key weighs 0.
    let b: Vec<_> = (0..20_000).map(|i| ((i * 7) % 400, 0, false)).collect();
    bad.extend(check_curve("w0", 100, &b));
    // (d) a loop over 60 keys of weight 1 and one key of weight 150, capacity 100.
    let d: Vec<_> = (0..30_000u64)
        .map(|i| {
            let k = i % 61;
            (k, if k == 60 { 150 } else { 1 }, false)
        })
        .collect();
    bad.extend(check_curve("giant", 100, &d));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

// ------------------------------------------------------------------------------------------
// 4. Thrashing near misses
// ------------------------------------------------------------------------------------------

/// Table, Thrashing: "≥ MIN_EVICTIONS of them with entries staying < ½ the time to live".
/// Overwriting a present key with a value too heavy to store removes the old entry (it stayed)
/// and stores nothing: the residence (which "leaves such writes out") must still be measured
/// when the removed entries did stay.
#[test]
fn too_heavy_overwrites_of_present_keys() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .time_to_live(secs(1_000))
        .record_stats()
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .clock(clock.clone())
        .build();
    let _ = c.health();
    for i in 0..200u64 {
        c.insert(i, 1);
        clock.advance(ms(100));
        c.insert(i, 1_000);
    }
    let s = c.stats();
    let h = c.health_over(secs(60));
    eprintln!("stats {s:?}\n{h}\n{:?}", thrash_of(&h));
    if let Some((e, res)) = thrash_of(&h) {
        assert!(e >= 64);
        // The entries that stayed stayed ~0.1 s each.
        assert!(res.is_none_or(|r| r < secs(10)), "{h}");
    }
}

/// `health_over` with a zero window and a huge one: never panics, and a zero window reports
/// a window of zero length or the shortest available.
#[test]
fn zero_and_huge_windows() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .time_to_live(secs(32))
        .record_stats()
        .clock(clock.clone())
        .build();
    for i in 0..1_000u64 {
        c.insert(i, i);
        if i % 10 == 0 {
            clock.advance(secs(1));
            let _ = c.health_over(Duration::ZERO);
            let _ = c.health_over(Duration::MAX);
            let _ = c.health_over(Duration::from_nanos(1));
        }
    }
    let h = c.health_over(Duration::MAX);
    assert!(
        h.window() <= clock.elapsed(),
        "{:?} {:?}",
        h.window(),
        clock.elapsed()
    );
    let h0 = c.health_over(Duration::ZERO);
    assert!(h0.window() <= secs(1), "{:?}", h0.window());
}

/// Sizing docs: "a shadow learns weights from sampled *inserts*" and, one that the real cache
/// hit, "with the weight last inserted for it"; rate 1 at this size, exact LRU. 120 keys read
/// (get, then insert on a miss at weight 1..=4), and a third of the operations overwrite a key
/// with a new weight 1..=8. A shadow that holds a key keeps the weight it was first inserted
/// with (an overwrite counts as an access, not as a new weight), so the shadows underweigh the
/// keys and the points above 1x predict a cache that holds them all: compared with replays of
/// the same operations into real LRU caches of 200 and 400 (1 shard).
#[test]
fn weight_changed_by_overwrite_is_seen_by_the_shadows() {
    let _w = common::watchdog(secs(120), "changing");
    let mut x = 1u64;
    lcg(&mut x);
    let cc: Vec<_> = (0..40_000u64)
        .map(|i| {
            let k = lcg(&mut x) % 120;
            if i % 3 == 0 {
                (k, 1 + lcg(&mut x) % 8, true)
            } else {
                (k, 1 + (k % 4), false)
            }
        })
        .collect();
    let bad = check_curve("changing", 200, &cc);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Table, SynchronizedExpiry: `in_` is "When that interval starts, from now"; entries "due"
/// are counted "by when each entry is due". 100 failed loads remembered for `negative_ttl`
/// (1 s) at t = 0, in a cache whose time to live is 32 s: if reported as a wave, it must be
/// due within about 1 s, not at the time to live.
#[test]
fn negative_entries_are_due_at_their_own_deadline() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(secs(32))
        .negative_ttl(secs(1))
        .clock(clock.clone())
        .build();
    for k in 0..100u64 {
        let _ = c.try_get_with(k, || Err::<u64, herdcache::BoxError>("down".into()));
    }
    clock.advance(ms(500));
    let n = c.entry_count();
    let h = c.health();
    eprintln!("entries {n}: {h}");
    if let Some((_, _, _, in_)) = sync_of(&h) {
        assert!(
            in_ <= secs(1),
            "negative entries due at 1 s reported due in {in_:?}: {h}"
        );
    }
    // After they expired, a spread of 200 normal writes must not warn on their account.
    for k in 1_000..1_200u64 {
        c.insert(k, k);
        clock.advance(ms(150));
    }
    c.run_pending_tasks();
    let n = c.entry_count();
    let h = c.health();
    assert!(sync_of(&h).is_none(), "entries {n}: {h}");
}

/// Near the clock's end: a burst written 40 s before u64::MAX ns, time to live 32 s: due
/// before "never", so counted: a wave.
#[test]
fn wave_near_the_clocks_end() {
    let clock = ManualClock::new();
    clock.advance(Duration::from_nanos(u64::MAX - 40_000_000_000));
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(secs(32))
        .clock(clock.clone())
        .build();
    for k in 0..100u64 {
        c.insert(k, k);
    }
    clock.advance(ms(100));
    let h = c.health();
    let s = sync_of(&h);
    assert!(
        s.is_some_and(|s| s.0 == 100 && s.3 <= secs(32) && s.3 >= secs(29)),
        "{s:?}: {h}"
    );
}

/// `health_over` never waits for a shard lock, also when it raises Thrashing with a sizing
/// curve (track_sizing): one shard busy, the other thrashing.
#[test]
fn thrashing_with_sizing_during_a_busy_shard() {
    let _g = TRAP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(60), "thrash busy");
    let clock = ManualClock::new();
    let c: RC = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(1_000))
        .shards(2)
        .record_stats()
        .track_sizing()
        .weigher(|_k: &Routed, v: &u64| *v as u32)
        .hasher(Identity)
        .clock(clock.clone())
        .build();
    c.insert(r(5, 1), 1);
    let _ = c.health();
    let c2 = c.clone();
    let clock2 = clock.clone();
    let (h, hs) = during_busy(&c, 1, 5, 1, secs(15), move |c| {
        let mut hs = Vec::new();
        for i in 0..3_000u64 {
            let k = r(i % 300, 0);
            if c.get(&k).is_none() {
                c.insert(k, 1);
            }
            clock2.advance(ms(20));
            if i % 500 == 0 {
                hs.push(c.health().to_string());
            }
        }
        (c.health(), hs)
    });
    let t = thrash_of(&h);
    let after = c2.health();
    assert!(
        t.is_some_and(|(e, r)| e >= 1_000 && r.is_some_and(|r| r < secs(100))),
        "{t:?}: {h}\nafter: {after}\nalong: {hs:#?}"
    );
    let has_sizing = h.warnings().iter().any(|w| {
        matches!(
            w,
            Warning::Thrashing {
                sizing: Some(_),
                ..
            }
        )
    });
    assert!(has_sizing, "{h}");
    assert!(
        h.warnings().iter().all(|w| !w.to_string().contains('\n')),
        "{h}"
    );
}

/// Table, SynchronizedExpiry: watched with "no refresh-ahead"; health docs: "a time to live or
/// refresh period of `u64::MAX` nanoseconds (about 584 years) or more is "never", as
/// `Duration::MAX` is". A `refresh_after(Duration::MAX)` never refreshes ahead: 100 entries
/// written at one instant with a time to live of 32 s expire together, and the wave must be
/// reported as it is without the setting (control).
#[test]
fn refresh_after_never_does_not_exempt_the_wave() {
    let mut got = Vec::new();
    for refresh in [
        None,
        Some(Duration::MAX),
        Some(Duration::from_secs(600 * 365 * 86_400)),
        Some(secs(64)),
    ] {
        let clock = ManualClock::new();
        let mut b = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(secs(32))
            .clock(clock.clone())
            .loader(|k: &u64| Ok::<_, herdcache::BoxError>(*k));
        if let Some(r) = refresh {
            b = b.refresh_after(r);
        }
        let c: Cache<u64, u64> = b.build();
        for k in 0..100u64 {
            c.insert(k, k);
        }
        clock.advance(secs(1));
        let h = c.health();
        got.push((refresh, sync_of(&h).map(|s| s.0), h.to_string()));
    }
    assert!(
        got.iter().all(|(_, s, _)| s.is_some_and(|d| d == 100)),
        "{got:?}"
    );
}

/// Like `weighted_curve_matches_replays`: tiny capacities (2 and 5 weight units, weights 1..=2),
/// and many keys (12,000 keys, more than the 4,096-slot table of weights, weights 1 or 3, at
/// a capacity of 3,000: rate 1).
#[test]
fn weighted_curve_tiny_and_many() {
    let _w = common::watchdog(secs(120), "curve2");
    let mut bad = Vec::new();
    let mut x = 5u64;
    let t: Vec<_> = (0..20_000)
        .map(|_| {
            let k = lcg(&mut x) % 6;
            (k, 1 + k % 2, false)
        })
        .collect();
    bad.extend(check_curve("tiny2", 2, &t));
    bad.extend(check_curve("tiny5", 5, &t));
    let m: Vec<_> = (0..120_000u64)
        .map(|_| {
            let a = lcg(&mut x);
            // 80 % of reads on 1,500 hot keys, the rest over 12,000.
            let k = if a % 10 < 8 {
                a / 10 % 1_500
            } else {
                a / 10 % 12_000
            };
            (k, 1 + 2 * (k % 2), false)
        })
        .collect();
    bad.extend(check_curve("many", 3_000, &m));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Concurrent health() / health_over() / sizing() calls while other threads insert,
/// invalidate and read a weighted cache: every warning's figures stay consistent (due within
/// the entries, share in 0..=1, windows no longer than the clock's time), no panic.
#[test]
fn concurrent_health_calls_stay_consistent() {
    let _w = common::watchdog(secs(60), "concurrent");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(2_000)
        .time_to_live(secs(32))
        .shards(8)
        .record_stats()
        .track_sizing()
        .weigher(|_k: &u64, v: &u64| (*v % 5) as u32)
        .clock(clock.clone())
        .build();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let c = c.clone();
        let stop = stop.clone();
        let clock = clock.clone();
        hs.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(SeqCst) {
                let k = (i * 7 + t) % 3_000;
                if c.get(&k).is_none() {
                    c.insert(k, i);
                }
                if i % 50 == 0 {
                    c.invalidate(&(k / 2));
                }
                if t == 0 && i % 100 == 0 {
                    clock.advance(ms(50));
                }
                i += 1;
            }
        }));
    }
    let mut bad = Vec::new();
    for round in 0..300u64 {
        let h = match round % 3 {
            0 => c.health(),
            1 => c.health_over(secs(5)),
            _ => c.health_over(Duration::from_nanos(1 + round)),
        };
        let _ = c.sizing();
        if h.window() > clock.elapsed() {
            bad.push(format!(
                "window {:?} > elapsed {:?}",
                h.window(),
                clock.elapsed()
            ));
        }
        for w in h.warnings() {
            if let Warning::SynchronizedExpiry { share, .. } = w {
                if !(0.0..=1.0).contains(share) {
                    bad.push(format!("{w:?}"));
                }
            }
            if let Warning::Thrashing {
                hit_ratio: Some((a, b)),
                ..
            } = w
            {
                if !(0.0..=1.0).contains(a) || !(0.0..=1.0).contains(b) {
                    bad.push(format!("{w:?}"));
                }
            }
        }
    }
    stop.store(true, SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    assert!(bad.is_empty(), "{bad:?}");
}

/// Table, Thrashing, around MIN_EVICTIONS (64): young evictions for size (a full cache of 10,
/// a new key every 10 ms: residence 0.1 s) and writes too heavy to store counted together;
/// invalidations never; no youth test without a time to live or refresh period.
#[test]
fn thrashing_around_min_evictions() {
    // (real evictions, too heavy, invalidations, ttl, tti, must warn)
    let cases: [(u64, u64, u64, Option<u64>, Option<u64>, bool); 8] = [
        (63, 0, 0, Some(1_000), None, false),
        (64, 0, 0, Some(1_000), None, true),
        (32, 32, 0, Some(1_000), None, true),
        (31, 32, 0, Some(1_000), None, false),
        (0, 64, 0, Some(1_000), None, true),
        (63, 0, 200, Some(1_000), None, false),
        (64, 0, 0, None, Some(1_000), false),
        (64, 0, 0, Some(1_000), Some(500), true),
    ];
    let mut bad = Vec::new();
    for (real, heavy, inval, ttl, tti, must) in cases {
        let clock = ManualClock::new();
        let mut b = Cache::builder()
            .max_capacity(10)
            .shards(1)
            .record_stats()
            .weigher(|_k: &u64, v: &u64| *v as u32)
            .clock(clock.clone());
        if let Some(t) = ttl {
            b = b.time_to_live(secs(t));
        }
        if let Some(t) = tti {
            b = b.time_to_idle(secs(t));
        }
        let c: Cache<u64, u64> = b.build();
        for k in 0..10u64 {
            c.insert(k, 1);
        }
        let _ = c.health();
        for i in 0..real.max(heavy).max(inval) {
            clock.advance(ms(10));
            if i < real {
                c.insert(100 + i, 1);
            }
            if i < heavy {
                c.insert(10_000 + i, 11);
            }
            if i < inval {
                c.insert(20_000 + i, 0);
                c.invalidate(&(20_000 + i));
            }
        }
        let h = c.health_over(secs(60));
        let t = thrash_of(&h);
        if t.is_some() != must {
            bad.push(format!(
                "real {real} heavy {heavy} inval {inval} ttl {ttl:?} tti {tti:?}: must {must}, got {t:?} ({h}); size evictions {}",
                c.stats().size.count
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
