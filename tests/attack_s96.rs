//! Round 96: `Cache::health()` after round 94's fixes (5041072), attacked from the public API
//! (a helper's tests, kept). ManualClock throughout, deterministic (the two busy-shard tests
//! hold a writer inside a shard's write lock through a key whose `Eq` blocks, as
//! tests/attack_s94.rs does). 7 tests; 4 failed on round 94's code, fixed or documented since:
//!
//! - `rejects_plus_young_evictions_below_64_each_still_thrash`: 63 young evictions and 63
//!   writes too heavy to store (126 evictions for size) were "healthy" where 64 evictions alone
//!   warned: the two were held to `MIN_EVICTIONS` apart. Fixed: the test of youth counts a
//!   write too heavy to store as a stay of zero among all the evictions (the `residence` figure
//!   still leaves them out).
//! - `rejects_are_young_by_themselves_without_a_ttl`: with no time to live or refresh period
//!   there is no youth test (documented since: "without either, no such test"); with a time to
//!   live the same writes warn. The test checks both.
//! - `busy_shard_next_to_an_empty_free_shard_hides_the_wave`: the free shard empty and no
//!   mean weight ever stored (a cache read empty), a busy shard's 100 entries counted as the
//!   last count, 0: the wave hidden. Fixed: busy shards are counted by their weight at a mean
//!   weight (theirs when last read holding entries, else the free shards', else the weight
//!   itself); every read stores the means.
//! - `skewed_busy_estimate_poisons_the_windows_peak`: 99 heavy entries in a busy shard counted
//!   at the light free shard's mean (99,000 "entries"), kept in the window's snapshot: no
//!   `Thrashing` for a whole window. Fixed: only counts (every shard read) are kept in the
//!   snapshots; an estimate serves its own call.
//!
//! Passing from the start: the time-to-idle exemption's boundary (TTI == TTL and TTI > TTL
//! watched, TTI < TTL, TTI alone and a custom Expiry not), a burst across 64 shards and a
//! jump of the ring, and the residence with as many rejects as evictions.

mod common;

use common::warnings::{sync_of, thrash_of};

use herdcache::{Cache, Expiry, ManualClock};
use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
fn ms(s: u64) -> Duration {
    Duration::from_millis(s)
}

// ------------------------------------------------------------------------------------------
// 4. Thrashing: too-heavy writes mixed with real evictions
// ------------------------------------------------------------------------------------------

/// Thresholds table, `Thrashing`: "evictions for size in the window (at least one), and either
/// ≥ MIN_EVICTIONS of them with entries staying < ½ the time to live … on average (…; writes
/// too heavy to store, which the statistics count as evictions for size, stayed no time: left
/// out of the average, and ≥ MIN_EVICTIONS of them are young by themselves)".
///
/// Weighted cache, capacity 10, TTL 1000 s, full of 10 entries of weight 1. Run A: 64 new
/// keys (weight 1) every 10 ms: 64 real evictions, residence 10 ÷ 100/s = 0.1 s: Thrashing.
/// Run B: 63 such keys plus 63 writes of weight 11 (too heavy): 126 evictions for size (≥ 64),
/// the average of those that stayed is 0.1 s < 500 s, and the other 63 stayed no time. The
/// docs leave the rejected writes out of the *average* only: B is a superset of the symptoms
/// and must warn too.
#[test]
fn rejects_plus_young_evictions_below_64_each_still_thrash() {
    let _w = common::watchdog(secs(60), "mixed thrash");
    let mut got = Vec::new();
    for (real, heavy) in [(64u64, 0u64), (63, 63)] {
        let clock = ManualClock::new();
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .shards(1)
            .time_to_live(secs(1_000))
            .record_stats()
            .weigher(|_k: &u64, v: &u64| *v as u32)
            .clock(clock.clone())
            .build();
        for k in 0..10u64 {
            c.insert(k, 1);
        }
        let _ = c.health();
        for i in 0..real.max(heavy) {
            clock.advance(ms(10));
            if i < real {
                c.insert(100 + i, 1);
            }
            if i < heavy {
                c.insert(10_000 + i, 11);
            }
        }
        let s = c.stats();
        let h = c.health_over(secs(60));
        got.push((real, heavy, s.size.count, thrash_of(&h), h.to_string()));
    }
    let bad: Vec<_> = got
        .iter()
        .filter(|(real, heavy, ev, t, _)| {
            !t.is_some_and(|(e, r)| e == *ev && e == real + heavy && r.is_some_and(|r| r < secs(1)))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "not thrashing as documented: {bad:#?}\nall: {got:#?}"
    );
}

/// Same table, since round 96: "entries staying < ½ the time to live (or refresh period; …;
/// without either, no such test)", a write too heavy to store being "a stay of zero there".
/// A cache of `max_capacity(0)` with no time to live: every write (640 over 64 s) is turned
/// away, the statistics count 640 evictions for size, none stayed; with no horizon there is no
/// youth test, and no hit-ratio drop (nothing ever hits): no Thrashing. With a time to live of
/// 1,000 s, the same writes are young: Thrashing, 640 evictions, no residence figure.
#[test]
fn rejects_are_young_by_themselves_without_a_ttl() {
    let _w = common::watchdog(secs(60), "rejects no horizon");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(0)
        .record_stats()
        .clock(clock.clone())
        .build();
    let _ = c.health();
    for i in 0..640u64 {
        c.insert(i, i);
        clock.advance(ms(100));
    }
    let s = c.stats();
    assert_eq!(c.entry_count(), 0);
    let h = c.health_over(secs(60));
    assert_eq!(thrash_of(&h), None, "no horizon: {h}; stats {s:?}");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(0)
        .time_to_live(secs(1_000))
        .record_stats()
        .clock(clock.clone())
        .build();
    let _ = c.health();
    for i in 0..640u64 {
        c.insert(i, i);
        clock.advance(ms(100));
    }
    let h = c.health_over(secs(120));
    assert_eq!(thrash_of(&h), Some((640, None)), "TTL 1,000 s: {h}");
}

// ------------------------------------------------------------------------------------------
// 1. Time to idle vs time to live: the exemption's boundary
// ------------------------------------------------------------------------------------------

struct KeepTtl;
impl Expiry<u64, u64> for KeepTtl {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        Some(secs(32))
    }
}

/// Thresholds table, `SynchronizedExpiry`: "a time to live (not zero, not Duration::MAX), …
/// no custom Expiry …, no time to idle shorter than the time to live (reads move an idle
/// deadline, and the count is of writes: not watched), and ≥ SYNC_SHARE of the entries (and ≥
/// SYNC_MIN) due within one interval of TTL / 16". 100 entries written at t = 0.
/// TTI == TTL (32 s) and TTI > TTL (40 s): watched, due 100 (with TTI == TTL even after reads
/// at spread times, which cannot move a deadline past write + TTL: checked, all gone at 32 s).
/// TTI < TTL: not watched. TTI alone (no TTL): not watched (the table requires a TTL). Custom
/// Expiry + TTI: not watched.
#[test]
fn tti_exemption_boundary_matches_the_table() {
    let _w = common::watchdog(secs(60), "tti boundary");
    let mut bad = Vec::new();
    // (ttl, tti, custom expiry, read spread, must warn)
    type Case = (Option<u64>, Option<u64>, bool, bool, bool);
    let cases: [Case; 7] = [
        (Some(32), Some(32), false, false, true),
        (Some(32), Some(32), false, true, true),
        (Some(32), Some(40), false, false, true),
        (Some(32), Some(31), false, false, false),
        (None, Some(16), false, false, false),
        (Some(32), Some(40), true, false, false),
        (Some(32), None, false, false, true),
    ];
    for (ttl, tti, custom, reads, must) in cases {
        let clock = ManualClock::new();
        let mut b = Cache::builder().max_capacity(1_000).clock(clock.clone());
        if let Some(t) = ttl {
            b = b.time_to_live(secs(t));
        }
        if let Some(t) = tti {
            b = b.time_to_idle(secs(t));
        }
        if custom {
            b = b.expire_after(KeepTtl);
        }
        let c: Cache<u64, u64> = b.build();
        for k in 0..100u64 {
            c.insert(k, k);
        }
        if reads {
            for k in 0..100u64 {
                clock.advance(ms(100));
                assert_eq!(c.get(&k), Some(k));
            }
        } else {
            clock.advance(secs(1));
        }
        let h = c.health();
        let s = sync_of(&h);
        let ok = if must {
            s.is_some_and(|(due, share, within, _)| {
                due == 100 && (share - 1.0).abs() < 1e-9 && within == secs(3)
            })
        } else {
            s.is_none()
        };
        if !ok {
            bad.push(format!(
                "ttl {ttl:?} tti {tti:?} custom {custom} reads {reads}: must warn {must}, got {s:?}: {h}"
            ));
        }
        if reads {
            clock.set_to_check(&c);
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The behaviour the TTI == TTL case relies on: reads cannot move a deadline past write + TTL.
trait Check {
    fn set_to_check(&self, c: &Cache<u64, u64>);
}
impl Check for ManualClock {
    fn set_to_check(&self, c: &Cache<u64, u64>) {
        // now = 10 s; the TTL deadline is 32 s for all 100.
        self.advance(ms(21_900));
        assert!(
            (0..100u64).all(|k| c.contains_key(&k)),
            "all present at 31.9 s"
        );
        self.advance(ms(200));
        assert!(
            (0..100u64).all(|k| !c.contains_key(&k)),
            "all gone at 32.1 s"
        );
    }
}

// ------------------------------------------------------------------------------------------
// 2. The ring: a burst across many shards and intervals
// ------------------------------------------------------------------------------------------

/// Thresholds table: "≥ SYNC_SHARE of the entries (and ≥ SYNC_MIN) due within one interval of
/// TTL / 16 wherever it starts (counted in intervals of TTL / 32 …: the busiest three adjacent
/// ones, 3/32 of the TTL, which hold any span of TTL / 16)"; `in_`: "When that interval starts,
/// from now". 64 shards, TTL 32 s: 1 entry at t = 0, then at t = 10 s a burst of 100 keys 15 ms
/// apart (due 42.0–43.5 s: straddles intervals 42 and 43), health at 11.5 s: due 100, share
/// 100/101, within 3 s, in_ 29.5–30.5 s (the triple starts at 41 or 42 s). Then the clock jumps 64
/// intervals and more (70 s): a fresh burst of 80 must be reported alone (the old slots
/// passed are cleared: due 80, share 80/80 capped to the entries present).
#[test]
fn burst_across_64_shards_and_a_jump() {
    let _w = common::watchdog(secs(60), "ring shards");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .shards(64)
        .time_to_live(secs(32))
        .clock(clock.clone())
        .build();
    c.insert(1_000_000, 0);
    clock.advance(secs(10));
    for k in 0..100u64 {
        c.insert(k, k);
        clock.advance(ms(15));
    }
    let h = c.health();
    let s = sync_of(&h).unwrap_or_else(|| panic!("no wave: {h}"));
    assert_eq!(s.0, 100, "{h}");
    assert!((s.1 - 100.0 / 101.0).abs() < 1e-9, "{h}");
    assert_eq!(s.2, secs(3));
    assert!(s.3 >= ms(29_500) && s.3 <= ms(30_500), "in_ {:?}: {h}", s.3);
    clock.advance(secs(70));
    c.run_pending_tasks();
    for k in 0..80u64 {
        c.insert(5_000 + k, k);
    }
    clock.advance(ms(500));
    let h = c.health();
    let n = c.entry_count();
    let s = sync_of(&h).unwrap_or_else(|| panic!("no wave after the jump: {h}"));
    assert_eq!(s.0, 80.min(n), "{h} (entries {n})");
    assert!(s.3 >= ms(30_500) && s.3 <= ms(31_500), "in_ {:?}: {h}", s.3);
}

// ------------------------------------------------------------------------------------------
// 3. Weighted caches with a busy shard
// ------------------------------------------------------------------------------------------

use common::routed::{during_busy, r, Identity, Routed, RC, TRAP_LOCK};

/// `health_over`: "with a weigher it counts the entries of each shard whose lock is free at
/// that instant, by a non-blocking try, and those of a busy shard by its weight at the free
/// shards' mean weight per entry; with every shard busy, it takes the count of its last call";
/// table: "≥ SYNC_SHARE of the entries (and ≥ SYNC_MIN) due within one interval".
///
/// 2 shards, every entry weighs 1. A periodic `health()` at t = 0 while the cache is empty.
/// Then 100 entries written to shard 0 at t = 0 (all due at 32 s), shard 1 stays empty. At
/// t = 1 s a writer holds shard 0: one shard is free (not "every shard busy"), it holds
/// nothing, so there is no mean of its own; the mean weight was never recorded either (the
/// calls that saw every shard free do not record it). Documented: shard 0 counted by its weight
/// (100) at a mean weight (1): 100 entries, the wave reported (as it is once the writer leaves).
#[test]
fn busy_shard_next_to_an_empty_free_shard_hides_the_wave() {
    let _g = TRAP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(120), "busy next to empty");
    let clock = ManualClock::new();
    let c: RC = Cache::builder()
        .max_capacity(100_000)
        .time_to_live(secs(32))
        .shards(2)
        .weigher(|_k: &Routed, _v: &u64| 1)
        .hasher(Identity)
        .clock(clock.clone())
        .build();
    let _ = c.health();
    for id in 0..100u64 {
        c.insert(r(id, 0), id);
    }
    clock.advance(secs(1));
    let during = during_busy(&c, 0, 0, 0, secs(10), |c| c.health());
    let after = c.health();
    let (d, a) = (sync_of(&during), sync_of(&after));
    assert!(a.is_some_and(|s| s.0 == 100), "after: {after}");
    assert!(
        d.is_some_and(|s| s.0 >= 64 && s.1 > 0.9),
        "shard 0 busy (100 entries of weight 1), shard 1 free and empty: reported {d:?} \
         (after the writer left: {a:?}); during: {during}"
    );
}

/// Module docs: "the entries are the most any snapshot of the window counted (the count now
/// included)"; table, `Thrashing`: "≥ MIN_EVICTIONS of them with entries staying < ½ the time
/// to live … on average (the most entries the window's snapshots saw ÷ evictions per second)".
///
/// Skewed weights: shard 0 holds 99 entries of weight 1,000, shard 1 holds 10 of weight 1
/// (capacity 100,000, TTL 1000 s). One `health()` at t = 10 s happens while a writer holds
/// shard 0: the free shard's mean (1) turns shard 0's weight 99,000 into 99,000 "entries",
/// and that estimate is kept in the window's snapshot (the same poisoning round 94 fixed for
/// the every-shard-busy case). Then 1,900 new keys of weight 1,000, 50 ms apart: ≈ 1,900
/// evictions, never more than 109 entries: residence ≈ 109 ÷ 20/s ≈ 5.5 s < 500 s. The control
/// (the call at 10 s with no shard busy) reports Thrashing; the poisoned run must too.
#[test]
fn skewed_busy_estimate_poisons_the_windows_peak() {
    let _g = TRAP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(secs(120), "skewed peak");
    let mut got = Vec::new();
    for busy in [false, true] {
        let clock = ManualClock::new();
        let c: RC = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(secs(1_000))
            .shards(2)
            .record_stats()
            .weigher(|_k: &Routed, v: &u64| *v as u32)
            .hasher(Identity)
            .clock(clock.clone())
            .build();
        for id in 0..99u64 {
            c.insert(r(id, 0), 1_000);
        }
        for id in 0..10u64 {
            c.insert(r(1_000 + id, 1), 1);
        }
        clock.advance(secs(10));
        let first = if busy {
            during_busy(&c, 0, 0, 1_000, secs(10), |c| c.health())
        } else {
            c.health()
        };
        for id in 10_000..11_900u64 {
            c.insert(r(id, 0), 1_000);
            clock.advance(ms(50));
        }
        let n = c.entry_count();
        let h = c.health();
        got.push((busy, n, thrash_of(&h), h.to_string(), first.to_string()));
    }
    for (busy, n, t, h, first) in &got {
        assert!(
            *n <= 110
                && t.is_some_and(|(e, r)| e >= 1_800 && r.is_some_and(|r| r < secs(10))),
            "call at 10 s during a busy shard: {busy}: expected Thrashing (≈1,900 evictions, \
             residence ≈ 5.5 s), got {t:?} ({n} entries): {h}\n(first call: {first})\nall: {got:#?}"
        );
    }
}

/// `Thrashing::residence`: "How long entries stay on average (the most entries the window's
/// snapshots saw ÷ evictions per second, writes too heavy to store left out)"; `evictions`:
/// "Evictions for size in the window". Capacity 100 (weights of 1), full at t = 0, TTL 1000 s;
/// over 64 s, every 100 ms one new key (640 real evictions) and one write of weight 101 (640
/// turned away): evictions 1,280, residence 100 ÷ (640 / 64 s) = 10 s.
#[test]
fn residence_with_as_many_rejects_as_evictions() {
    let _w = common::watchdog(secs(60), "mixed residence");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(1_000))
        .record_stats()
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .clock(clock.clone())
        .build();
    for k in 0..100u64 {
        c.insert(k, 1);
    }
    let _ = c.health();
    for i in 0..640u64 {
        c.insert(1_000 + i, 1);
        c.insert(100_000 + i, 101);
        clock.advance(ms(100));
    }
    let s = c.stats();
    let h = c.health_over(secs(120));
    let (e, r) = thrash_of(&h).unwrap_or_else(|| panic!("no Thrashing: {h}"));
    assert_eq!((e, s.size.count), (1_280, 1_280), "{h}");
    let r = r.expect("measured").as_secs_f64();
    assert!(
        (r - 10.0).abs() < 0.5,
        "residence {r} s, expected 10 s: {h}"
    );
}
