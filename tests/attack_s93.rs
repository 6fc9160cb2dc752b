//! Round 93: an outside attack on round 92's health and sizing fixes. 17 tests kept (of 21;
//! the sizing-curve file's four, one failing, are kept out of the repository for the next
//! stop); 8 failed, all fixed:
//!
//! * `sync`: the synchronized-expiry ring. Round 92 ignored slots past the *last* write's
//!   interval: a writer with an older reading of the clock (racing for the shard lock), or an
//!   entry that never falls due, lowered that bound and hid a burst (flaky undercounts; a
//!   burst near the clock's end reported healthy). Now the bound is the highest interval
//!   written. Its 32-bit tags aliased intervals 2^32 apart while the ring was in use (a new
//!   burst reported 7 intervals early, spread writes reported as a wave): tags now hold the
//!   interval's bits above the slot index (2^38 apart). The interval's width is rounded up,
//!   so three intervals hold any span of TTL / 16 (at a time to live of 63 ns they did not).
//!   A custom `Expiry` is not watched: now documented (the test asserts it).
//! * `busy`: `sizing`/`health` of a weighted cache while every shard is busy estimated the
//!   entry count from a stale or absent mean weight and restarted the curve at a rate 100 ×
//!   off; now the calibration reads the mean of the shards free at once, and none free, skips.

mod common;

mod sync {
    //! Helper 93: the synchronized-expiry warning after round 92 (busiest three TTL / 32
    //! intervals; ring slots past the ring's last write ignored), from the public API only;
    //! time is a `ManualClock`. Deterministic (single-threaded but for the racing test).
    //!
    //! 12 tests; 6 FAIL: 5 reliably (3 runs of 3, the same output each time), 1 flaky
    //! (`racing_writers_and_clock_still_report_the_burst`: 2 of 3 full-file runs, ~1 in 3 alone):
    //!
    //! FAIL `spread_writes_2_pow_32_intervals_after_a_burst_do_not_fire`: 100 entries written at
    //! once (TTL 1 s, `shards(1)`), then 2^32 intervals of TTL / 32 later (4.25 years) 200 entries
    //! written evenly over 20 intervals (10 per interval; any three hold 30 < SYNC_MIN). Reported:
    //! `SynchronizedExpiry { due: 120..130, share: 0.6–0.65, within: 93.75 ms, in_: 0.69–0.94 s }`
    //! at 4 of 6 offsets. Cause: round 92's aliasing fix (src/monitor.rs `busiest`: ignore slots
    //! for intervals past `latest() + 1`) only helps a ring that saw no write since; any new write
    //! lifts `latest` to `now / width + 32`, and a slot whose 32-bit tag was written exactly 2^32
    //! intervals earlier (the same slot: 2^32 is a multiple of 64) again passes for an interval
    //! in `[now / width, latest + 1]`; a new write into that very slot even *adds* to the old
    //! count (`note`: same low 32 bits → `n + 1`). The cap at the entries present does not help
    //! once fresh entries are present (the expired ones are purged by the writes). Fix: keep the
    //! high tag bits (the slot index is implied by `interval % 64`, so `interval >> 6` fits 32
    //! bits for 2^38 intervals), or store per slot the write's full interval / a generation, or
    //! clear slots older than the ring's last write minus 64 intervals on write.
    //!
    //! FAIL `a_new_burst_after_long_idle_gaps_is_reported` (same cause): after a gap of 2^33 + 7
    //! intervals, a new burst of 80 (due in 32 s, or 1 ms, or 32 ns) is reported as
    //! `in_: 25 s` (781.25 µs / 25 ns): the old 100 writes alias 7 intervals before the new
    //! burst's and win `busiest` (capped to 80). Docs: `in_` is "When that interval starts, from
    //! now"; the interval reported holds no entry at all.
    //!
    //! FAIL `a_never_due_write_does_not_hide_a_burst_near_the_clock_end`: a burst of 100 due 3 s
    //! before the clock's end is reported; after ONE later write whose deadline saturates to
    //! "never" (clock advanced 4 s), it is not (`healthy`, 104 present; with 4 shards and a
    //! never-due write into each, the same). Docs: "an entry whose deadline saturates to \"never\"
    //! is not counted" — that entry, not its shard's other entries. Cause: round 92's
    //! `DueRing::latest` returns `None` when the last write's `now + ttl` saturates, and
    //! `busiest`'s `filter_map(... r.latest(self)? ...)` then drops the whole ring. A regression
    //! of round 92 (before it, the ring was read regardless). Fix: keep the latest *counted*
    //! interval (skip never-due writes when updating it), or treat `None` as "no bound".
    //! Low severity (a manual clock near `u64::MAX` ns).
    //!
    //! FAIL `a_custom_expiry_without_deadlines_still_warns`: `expire_after(Forever)` (an `Expiry`
    //! that sets no deadline of its own) with `time_to_live(32 s)`: every entry expires at the
    //! time to live exactly as without the expiry (checked), 100 of 100 are due together, yet
    //! `health` is `healthy`. The thresholds table lists "a time to live (not zero, not
    //! `Duration::MAX`), no jitter, no refresh-ahead" — not "no custom expiry". Cause:
    //! src/builder.rs sets the monitor's `spread` for any `ExpiryConfig::Custom` (a source comment
    //! says so: "A custom expiry sets its own deadlines"), so no ring is kept. Doc gap (or
    //! count entries by their actual deadline): name the exception in the table.
    //!
    //! FAIL `a_burst_within_ttl_16_of_a_ttl_not_a_multiple_of_32`: 64 entries (all there are),
    //! 32 written at one instant and 32 at 2 × width + 1 ns later, the first deadline on the last
    //! nanosecond of an interval: not reported for TTL 63 ns (all due within 3 ns < TTL / 16 =
    //! 3.94 ns), 95 ns, 32 s + 31 ns (within 2 s + 1 ns < 2 s + 1.94 ns), 60 s + 31 ns. Docs: "due
    //! within one interval of TTL / 16 wherever it starts (… the busiest three adjacent ones,
    //! 3/32 of the TTL, which hold any span of TTL / 16)". Cause: `Monitor::new`'s width is
    //! `ttl / 32` rounded down, so three intervals are 3 × ⌊TTL / 32⌋, which for TTL mod 32 ≥ 17
    //! is shorter than TTL / 16 + 1 ns: a span of 2 × width + 1 ns straddles four. Low severity
    //! for real TTLs (a 1 ns edge); proportionally large for TTLs of tens of ns. Fix: round the
    //! width up (`ttl.div_ceil(32)`), or say "within 2 × ⌊TTL / 32⌋".
    //!
    //! FAIL (flaky: 2 of 3 full-file runs, 2 of 6 alone; 1 in ~30 at 30 rounds, before it was made 200 rounds straddling three
    //! intervals) `racing_writers_and_clock_still_report_the_burst`: 8 threads write 32 entries
    //! each into one shard while a ninth moves a `ManualClock` 1.9 s in 10 ms steps (TTL 32 s:
    //! all 256 due within TTL / 16); in some round `health` reports `due: 247` (or 251, 230)
    //! instead of 256, `in_` 29.2 s. Docs: "≥ SYNC_SHARE of the entries … due within one
    //! interval of TTL / 16 wherever it starts". Cause: round 92's bound in `busiest` ignores
    //! slots past `latest() + 1`, where `latest` is the interval of the ring's *last write's*
    //! `now`; `insert_with` (src/cache/mod.rs) reads `now` before taking the shard's write lock,
    //! so a writer preempted (or queued on the lock) while the clock moves lands last with a
    //! reading more than one interval old (the comment on `latest` assumes "a tick apart"), and
    //! the burst's entries in the interval past `latest + 1` are dropped. With a real clock this
    //! needs a stall of two TTL / 32 intervals: plausible for TTLs of tens of ms. Fix: keep the
    //! ring's maximum interval written (`max` instead of the last), or read `now` under the lock.
    //!
    //! Passing: one write / a small burst (40) into a shard 2^32 intervals after an expired
    //! burst (the write purges the shard's expired entries, so the cap at the entries present
    //! hides the alias there); bursts within TTL / 16 at 40 phases for TTLs 1, 2, 16, 31, 32, 33,
    //! 64 ns, 1 µs, 1 ms, 32 s, 60 s (width clamped to 1 ns); near misses (6/32 of the TTL, the
    //! whole TTL, 70 of 470); invalidated / re-written bursts capped at the entries present; 8
    //! writer threads racing a clock thread (1 and 8 shards, 30 rounds) with `health` from 4
    //! threads at once; the clock at its end (deadlines that fit counted, saturating ones not,
    //! no panic).

    use crate::common;
    use herdcache::{Cache, ManualClock, Warning};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn sync_of(h: &herdcache::Health) -> Option<(u64, f64, Duration, Duration)> {
        h.warnings().iter().find_map(|w| match w {
            Warning::SynchronizedExpiry {
                due,
                share,
                within,
                in_,
            } => Some((*due, *share, *within, *in_)),
            _ => None,
        })
    }

    fn cache(clock: &ManualClock, ttl: Duration, shards: usize) -> Cache<u64, u64> {
        Cache::builder()
            .max_capacity(100_000)
            .time_to_live(ttl)
            .shards(shards)
            .clock(clock.clone())
            .build()
    }

    /// health.rs thresholds table: `SynchronizedExpiry` when "≥ SYNC_SHARE of the entries (and ≥
    /// SYNC_MIN) due within one interval of TTL / 16 wherever it starts". 100 entries written at
    /// once with a time to live of 1 ms, then the cache idle for about 2^32 intervals of TTL / 32
    /// (37 hours): those entries expired 37 hours ago. Then ONE new entry is written into the same
    /// (single) shard. 1 entry is due in the next TTL, not 101: no expiry wave. Round 92's fix
    /// ("no ring holds an interval past its last write's") only covers a ring that saw no write
    /// since; a write lifts the ring's last interval to where the old slots alias again.
    #[test]
    fn one_write_after_2_pow_32_intervals_does_not_revive_an_expired_burst() {
        let _w = common::watchdog(Duration::from_secs(60), "alias after one write");
        let ttl = Duration::from_millis(1);
        let width = ttl.as_nanos() as u64 / 32;
        let mut bad = Vec::new();
        for back in [0u64, 1, 2, 5, 16, 31, 32] {
            let clock = ManualClock::new();
            let c = cache(&clock, ttl, 1);
            for k in 0..100u64 {
                c.insert(k, k);
            }
            clock.advance(Duration::from_nanos((width << 32) - back * width));
            c.insert(1_000_000, 0);
            let present = c.entry_count();
            let h = c.health_over(secs(60));
            if let Some(s) = sync_of(&h) {
                bad.push(format!(
                "{back} intervals short of 2^32: {present} entries present (100 expired 37 h ago, 1 fresh): {s:?}: {h}"
            ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// "≥ SYNC_SHARE of the entries (and ≥ SYNC_MIN) due within one interval of TTL / 16": a
    /// burst of 100 entries written at time 0 (TTL 1 s); about 2^32 intervals of TTL / 32 later
    /// (4.25 years), 200 entries written evenly over 20 intervals (10 per interval: any TTL / 16
    /// holds 20, any three intervals 30 < SYNC_MIN) into the same shard. No 64 entries are due
    /// together; the 100 of 4 years ago are long gone. Run for several offsets of the spread
    /// writes around the 2^32-interval mark.
    #[test]
    fn spread_writes_2_pow_32_intervals_after_a_burst_do_not_fire() {
        let _w = common::watchdog(Duration::from_secs(60), "alias spread");
        let ttl = Duration::from_secs(1);
        let width = ttl.as_nanos() as u64 / 32;
        let mut bad = Vec::new();
        for end_offset in [0i64, -1, -5, 1, 3, 10] {
            let clock = ManualClock::new();
            let c = cache(&clock, ttl, 1);
            for k in 0..100u64 {
                c.insert(k, k);
            }
            // The spread writes end at 2^32 intervals (+ end_offset).
            let end = ((1u64 << 32) as i64 + end_offset) as u64 * width;
            clock.advance(Duration::from_nanos(end - 20 * width));
            for k in 0..200u64 {
                c.insert(1_000 + k, k);
                clock.advance(Duration::from_nanos(width / 10));
            }
            let present = c.entry_count();
            let h = c.health_over(secs(60));
            if let Some(s) = sync_of(&h) {
                bad.push(format!(
                "spread writes ending {end_offset} intervals after 2^32: {present} present: {s:?}"
            ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// As above with 40 fresh entries (fewer than SYNC_MIN = 64) written in one instant into the
    /// ring that holds 100 entries expired 2^32 intervals ago: "≥ SYNC_MIN ... due within one
    /// interval of TTL / 16": 40 are due, not 140.
    #[test]
    fn a_small_burst_after_2_pow_32_intervals_is_not_inflated_by_expired_entries() {
        let _w = common::watchdog(Duration::from_secs(60), "alias small burst");
        let ttl = Duration::from_secs(1);
        let width = ttl.as_nanos() as u64 / 32;
        let clock = ManualClock::new();
        let c = cache(&clock, ttl, 1);
        for k in 0..100u64 {
            c.insert(k, k);
        }
        clock.advance(Duration::from_nanos(width << 32));
        for k in 0..40u64 {
            c.insert(1_000_000 + k, 0);
        }
        let h = c.health_over(secs(60));
        assert!(
            sync_of(&h).is_none(),
            "40 fresh entries (< SYNC_MIN) reported as a wave ({} present): {h}",
            c.entry_count()
        );
    }

    /// Long idle gaps followed by a new burst: the new burst must still be reported ("≥ SYNC_MIN
    /// ... due within one interval of TTL / 16"), whatever the gap (including 2^32 intervals and
    /// around it, and gaps around the 64-slot ring's period), and `in_` ("When that interval
    /// starts, from now") is at most the TTL and the interval holds the burst's deadline.
    #[test]
    fn a_new_burst_after_long_idle_gaps_is_reported() {
        let _w = common::watchdog(Duration::from_secs(60), "idle gaps");
        let mut bad = Vec::new();
        for ttl in [
            Duration::from_millis(1),
            Duration::from_secs(32),
            Duration::from_nanos(32),
        ] {
            let width = (ttl.as_nanos() as u64 / 32).max(1);
            for gap in [
                33u64,
                40,
                63,
                64,
                65,
                96,
                1 << 20,
                (1 << 32) - 33,
                (1 << 32) - 1,
                1 << 32,
                (1 << 32) + 1,
                (1 << 33) + 7,
            ] {
                let clock = ManualClock::new();
                let c = cache(&clock, ttl, 2);
                for k in 0..100u64 {
                    c.insert(k, k);
                }
                clock.advance(Duration::from_nanos(gap * width));
                // The old entries are gone (read after expiry: removed).
                for k in 0..100u64 {
                    let _ = c.get(&k);
                }
                for k in 0..80u64 {
                    c.insert(1_000 + k, k);
                }
                let h = c.health_over(secs(60));
                match sync_of(&h) {
                    None => bad.push(format!("ttl {ttl:?} gap {gap}: not reported: {h:?}")),
                    Some((due, _, within, in_)) => {
                        if due < 80 || in_ > ttl || in_ + within < ttl {
                            bad.push(format!("ttl {ttl:?} gap {gap}: {due} {within:?} {in_:?}"));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// "due within one interval of TTL / 16 wherever it starts": 64 entries (all there are)
    /// written over a span just under TTL / 16, at many clock phases (a step of TTL / 320), for
    /// several TTLs including ones whose TTL / 32 clamps to 1 ns (31 ns, 32 ns, 33 ns).
    #[test]
    fn a_burst_within_ttl_16_fires_at_every_phase_and_ttl() {
        let _w = common::watchdog(Duration::from_secs(120), "phase sweep");
        let mut bad = Vec::new();
        for ttl_ns in [
            1u64,
            2,
            16,
            31,
            32,
            33,
            64,
            1_000,
            1_000_003,
            32_000_000_000,
            60_000_000_000,
        ] {
            let span = (ttl_ns / 16).saturating_sub(1); // strictly within TTL / 16
            for phase in 0..40u64 {
                let clock = ManualClock::new();
                clock.advance(Duration::from_nanos(phase * ttl_ns / 320 + phase));
                let c = cache(&clock, Duration::from_nanos(ttl_ns), 4);
                let mut at = 0u64;
                for k in 0..64u64 {
                    let want = span * k / 63;
                    clock.advance(Duration::from_nanos(want - at));
                    at = want;
                    c.insert(k, k);
                }
                let h = c.health_over(secs(60));
                match sync_of(&h) {
                    Some((64, 1.0, _, _)) => {}
                    other => bad.push(format!("ttl {ttl_ns} ns phase {phase}: {other:?} {h:?}")),
                }
            }
        }
        assert!(bad.is_empty(), "{} misses:\n{}", bad.len(), bad.join("\n"));
    }

    /// Near misses ("≥ SYNC_SHARE of the entries (and ≥ SYNC_MIN) due within one interval of TTL
    /// / 16", counted over "the busiest three adjacent" TTL / 32 intervals): 96 entries spread
    /// evenly over 6/32 of the TTL (16 per interval: three hold 48 < SYNC_MIN) must not fire, at 8
    /// phases; nor 256 spread over the whole TTL (three intervals hold 24); nor a wave of 70 due
    /// together among 470 entries (≤ 107.5 in any three intervals, 22.9 % < SYNC_SHARE = 25 %).
    #[test]
    fn spread_writes_do_not_fire() {
        let _w = common::watchdog(Duration::from_secs(60), "near misses");
        let mut bad = Vec::new();
        let ttl_ns = 32_000_000_000u64;
        let width = ttl_ns / 32;
        for phase in 0..8u64 {
            // 96 over 6 intervals, aligned to the ring at `phase` eighths of an interval.
            let clock = ManualClock::new();
            clock.advance(Duration::from_nanos(phase * width / 8));
            let c = cache(&clock, Duration::from_nanos(ttl_ns), 2);
            for k in 0..96u64 {
                c.insert(k, k);
                clock.advance(Duration::from_nanos(6 * width / 96));
            }
            let h = c.health_over(secs(60));
            if let Some(s) = sync_of(&h) {
                bad.push(format!("96 over 6/32 TTL phase {phase}: {s:?}"));
            }
            // 256 over the whole TTL.
            let clock = ManualClock::new();
            clock.advance(Duration::from_nanos(phase * width / 8));
            let c = cache(&clock, Duration::from_nanos(ttl_ns), 2);
            for k in 0..256u64 {
                c.insert(k, k);
                clock.advance(Duration::from_nanos(ttl_ns / 257));
            }
            let h = c.health_over(secs(60));
            if let Some(s) = sync_of(&h) {
                bad.push(format!("256 over the TTL phase {phase}: {s:?}"));
            }
        }
        // 70 at once, then 400 spread over the TTL (12.5 per interval): at most 70 + 37.5 of
        // 470 in any three intervals, 22.9 % < 25 %.
        let clock = ManualClock::new();
        let c = cache(&clock, Duration::from_nanos(ttl_ns), 2);
        for k in 0..70u64 {
            c.insert(k, k);
        }
        for k in 0..400u64 {
            clock.advance(Duration::from_nanos(ttl_ns / 401));
            c.insert(1000 + k, k);
        }
        let h = c.health_over(secs(60));
        if let Some(s) = sync_of(&h) {
            bad.push(format!("70 of 470: {s:?}"));
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// "entries evicted since still count, so the count is capped at the entries present": a
    /// burst of 200, then 180 invalidated: 20 present, < SYNC_MIN: no warning; and a burst of 200
    /// re-written (each key again, later, spread over the TTL) leaves at most the 200 present.
    #[test]
    fn invalidated_and_rewritten_bursts_are_capped_at_entries_present() {
        let _w = common::watchdog(Duration::from_secs(30), "capped");
        let clock = ManualClock::new();
        let c = cache(&clock, secs(32), 3);
        for k in 0..200u64 {
            c.insert(k, k);
        }
        for k in 20..200u64 {
            c.invalidate(&k);
        }
        let h = c.health_over(secs(60));
        assert!(sync_of(&h).is_none(), "20 present: {h}");
        for k in 0..200u64 {
            c.insert(k, k);
        }
        let h = c.health_over(secs(60));
        match sync_of(&h) {
            Some((due, share, _, _)) => {
                assert!(due <= c.entry_count() && share <= 1.0, "{h:?}")
            }
            None => panic!("200 written in one instant, all present: {h}"),
        }
    }

    /// Writes from many threads while another thread moves the clock in small steps (racing
    /// readings of the clock, some taken before the shard lock): a burst of 8 × 32 entries within
    /// TTL / 16 (1.9 s of a 32 s TTL, straddling three TTL / 32 intervals) must be reported with
    /// all 256 due ("≥ SYNC_SHARE of the entries (and ≥ SYNC_MIN) due within one interval of
    /// TTL / 16 wherever it starts"), whatever the interleaving, 200 rounds, 1 and 8 shards;
    /// `health` from 4 threads at once agrees.
    #[test]
    fn racing_writers_and_clock_still_report_the_burst() {
        let _w = common::watchdog(Duration::from_secs(120), "racing writers");
        let mut bad = Vec::new();
        for round in 0..200u64 {
            let clock = ManualClock::new();
            // Start 50–90 ms before an interval boundary: the 1.9 s burst straddles three.
            clock.advance(Duration::from_millis(910 + round % 40 + (round % 7) * 1000));
            let ttl = secs(32);
            let c = cache(&clock, ttl, if round % 2 == 0 { 1 } else { 8 });
            let start = Arc::new(Barrier::new(9));
            std::thread::scope(|s| {
                for t in 0..8u64 {
                    let (c, start) = (c.clone(), start.clone());
                    s.spawn(move || {
                        start.wait();
                        for k in 0..32u64 {
                            c.insert(t * 1000 + k, k);
                        }
                    });
                }
                let (clock, start) = (clock.clone(), start.clone());
                s.spawn(move || {
                    start.wait();
                    // 1.9 s in 190 steps of 10 ms: all within TTL / 16 = 2 s.
                    for _ in 0..190 {
                        clock.advance(Duration::from_millis(10));
                        std::thread::yield_now();
                    }
                });
            });
            let hs: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|_| {
                        let c = c.clone();
                        s.spawn(move || c.health_over(secs(60)))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for h in &hs {
                match sync_of(h) {
                    Some((256, _, _, in_)) if in_ <= ttl => {}
                    other => bad.push(format!("round {round}: {other:?}: {h}")),
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The clock at its end: "an entry whose deadline saturates to \"never\" is not counted";
    /// no panic; entries whose deadline is still ahead of the end are counted, with `in_` ≤ TTL
    /// ("When that interval starts, from now").
    #[test]
    fn the_clock_at_its_end() {
        let _w = common::watchdog(Duration::from_secs(30), "clock end");
        let ttl = secs(32);
        let ttl_ns = ttl.as_nanos() as u64;
        let mut bad = Vec::new();
        for (before_end, counted) in [
            (ttl_ns + 3_000_000_000, true),
            (ttl_ns * 3, true),
            (ttl_ns / 2, false),
            (2, false),
            (1, false),
            (0, false),
        ] {
            let clock = ManualClock::new();
            clock.advance(Duration::from_nanos(u64::MAX - 1 - before_end));
            let c = cache(&clock, ttl, 2);
            for k in 0..100u64 {
                c.insert(k, k);
            }
            let h = c.health_over(secs(60));
            let _ = c.health();
            match (sync_of(&h), counted) {
                (Some((100, _, _, in_)), true) if in_ <= ttl => {}
                (None, false) => {}
                (other, _) => bad.push(format!("{before_end} ns before the end: {other:?}: {h}")),
            }
            clock.advance(Duration::MAX);
            let h = c.health_over(secs(60));
            if let Some(s) = sync_of(&h) {
                bad.push(format!(
                    "{before_end}: at the very end, past every deadline: {s:?}"
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// An `Expiry` that sets no deadline of its own ("never expires, by itself"), bounded by a
    /// time to live: every entry expires exactly as with the time to live alone. The thresholds
    /// table (round 93) names the exception: "no custom `Expiry` (one sets its own deadlines,
    /// which need not fall together: not watched even if it keeps the time to live's)". Before
    /// it did, this case was a silent gap (the test asked for the warning). 100 entries written
    /// at once, all due at the same instant: no warning, as documented.
    #[test]
    fn a_custom_expiry_is_not_watched_as_documented() {
        struct Forever;
        impl herdcache::Expiry<u64, u64> for Forever {}
        let _w = common::watchdog(Duration::from_secs(30), "custom expiry");
        let clock = ManualClock::new();
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(1000)
            .expire_after(Forever)
            .time_to_live(secs(32))
            .clock(clock.clone())
            .build();
        for k in 0..100u64 {
            c.insert(k, k);
        }
        clock.advance(secs(31));
        assert_eq!(c.get(&5), Some(5));
        let h = c.health_over(secs(60));
        clock.advance(secs(1));
        assert_eq!(
            c.get(&5),
            None,
            "expires at the time to live, as without the expiry"
        );
        assert!(
            sync_of(&h).is_none(),
            "a custom expiry is not watched (documented): {h}"
        );
    }

    /// Near the clock's end: "an entry whose deadline saturates to \"never\" is not counted" —
    /// that entry alone. A burst of 100 entries written 3 s before the last instant at which a
    /// deadline still fits (time to live 32 s), then, 4 s later, one entry whose deadline
    /// saturates to "never": the 100 are still due within one instant, 28 s ahead, of 101
    /// entries present. Into one shard (`shards(1)`), and into 4.
    #[test]
    fn a_never_due_write_does_not_hide_a_burst_near_the_clock_end() {
        let _w = common::watchdog(Duration::from_secs(30), "never-due write");
        let ttl = secs(32);
        let ttl_ns = ttl.as_nanos() as u64;
        let mut bad = Vec::new();
        for shards in [1usize, 4] {
            let clock = ManualClock::new();
            clock.advance(Duration::from_nanos(u64::MAX - 1 - ttl_ns - 3_000_000_000));
            let c = cache(&clock, ttl, shards);
            for k in 0..100u64 {
                c.insert(k, k);
            }
            let before = sync_of(&c.health_over(secs(60)));
            clock.advance(secs(4));
            for k in 0..(shards as u64 * 4) {
                c.insert(1_000 + k, 0);
            }
            let present = c.entry_count();
            let h = c.health_over(secs(60));
            match sync_of(&h) {
            Some((100, _, _, _)) => {}
            other => bad.push(format!(
                "{shards} shards: before the never-due write {before:?}; after it {other:?} ({present} present): {h}"
            )),
        }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// "due within one interval of TTL / 16 wherever it starts (counted in intervals of TTL / 32
    /// …: the busiest three adjacent ones, 3/32 of the TTL, which hold any span of TTL / 16)". For
    /// a TTL that is not a multiple of 32 ns, TTL / 32 is rounded down: for 63 ns the intervals are
    /// 1 ns and TTL / 16 is 3.94 ns; for 32 s + 31 ns they are 1 s and TTL / 16 is 2 s + 1.94 ns.
    /// 64 entries (all there are), half written at one instant and half 2 × width + 1 ns later
    /// (3 ns; 2 s + 1 ns) — within TTL / 16 — placed so that the first deadline is the last
    /// nanosecond of an interval: they span four intervals.
    #[test]
    fn a_burst_within_ttl_16_of_a_ttl_not_a_multiple_of_32() {
        let _w = common::watchdog(Duration::from_secs(30), "rounded width");
        let mut bad = Vec::new();
        for ttl_ns in [63u64, 95, 32_000_000_031, 60_000_000_031] {
            let w = ttl_ns / 32;
            let span = 2 * w + 1;
            assert!(span * 16 < ttl_ns, "span {span} within TTL / 16");
            // The clock such that (t + ttl) % w == w − 1.
            let t = (w - 1 + w - ttl_ns % w) % w;
            assert_eq!((t + ttl_ns) % w, w - 1);
            let clock = ManualClock::new();
            clock.advance(Duration::from_nanos(t));
            let c = cache(&clock, Duration::from_nanos(ttl_ns), 1);
            for k in 0..32u64 {
                c.insert(k, k);
            }
            clock.advance(Duration::from_nanos(span));
            for k in 32..64u64 {
                c.insert(k, k);
            }
            let h = c.health_over(secs(60));
            if sync_of(&h).is_none() {
                bad.push(format!(
                    "ttl {ttl_ns} ns: 64 of 64 due within {span} ns < TTL / 16 = {:.2} ns: {h}",
                    ttl_ns as f64 / 16.0
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}

mod busy {
    //! Helper 93: `health` / `sizing` of a weighted, tracked cache while shards are busy (a
    //! `retain` whose closure blocks holds every shard's write lock), from the public API only.
    //! Fixed-seed hasher; deterministic.
    //!
    //! 5 tests; 2 FAIL, both reliably (3 runs of 3, identical output):
    //!
    //! FAIL `sizing_during_a_retain_does_not_restart_the_curve`: every entry weighs 100,
    //! `max_capacity` 1,000,000 units, 300,000 requests over 20,000 keys, no `sizing`/`health`
    //! call before. A `sizing()` (or `health()`) call while a `retain` holds every shard answers
    //! at once (round 92's fix holds) but re-derives the rate as if every entry weighed 1: rate
    //! 0.002 instead of 0.2, `samples_since_start` 0 (the shadows rebuilt, the window and totals
    //! thrown away); the next `sizing()` after the retain measures the true mean again and
    //! rebuilds again (rate 0.2, since start 0). Same with 1, 4 and 64 shards. Docs (`sizing`
    //! module, "Weights"): "the mean weight measured from the cache (weighted size / entries)
    //! each time `Cache::sizing` is called … when the rate it implies is more than 2 × away from
    //! the current one, the shadows are rebuilt"; `Cache::sizing`: "reading the entry count of
    //! each shard whose lock is free at that instant" — none is free, nothing is measured, yet the
    //! curve is restarted twice. Cause: `Cache::entry_count_without_waiting`
    //! (src/cache/mod.rs, round 92) with every shard busy returns `weighted_size / mean_weight`
    //! where `mean_weight` is only stored by an earlier call of it that found a shard free — and
    //! with none ever stored it returns the weighted size itself (mean 1); `sizing_undrained`
    //! (src/cache/selection.rs) then feeds `calibrate(size, entries)` (src/sizing.rs), which
    //! rebuilds. Fix: skip calibration when no shard was read (return "unknown", e.g.
    //! `Option<u64>`, from the count for `sizing`), or let calibrate use the tracker's own mean
    //! from sampled inserts in that case.
    //!
    //! FAIL `sizing_during_a_retain_does_not_use_a_stale_mean_weight`: the same through a stale
    //! mean: a first `sizing()` while entries weighed 1 stores mean 1; the keys then change to
    //! entries of weight 1,000 (the tracker follows from its sampled inserts); a `sizing()` during
    //! a retain uses the weight-1 mean of long ago: rate 0.002 and since-start 0 during, rate 1
    //! and since-start 0 after. Same cause.
    //!
    //! Passing: with a `sizing()` first (mean seen), a `sizing()`/`health()` during a retain is
    //! sane for weights 1, 100 and `u32::MAX` (capacities up to `u64::MAX / 2`; rate, observed
    //! and points in [0, 1], no division by zero on an empty cache); `health_over` from 4
    //! threads during a retain answers, any `SynchronizedExpiry` share in [0, 1]; during a
    //! blocked `and_compute_with` (no lock held, as documented) `health`/`sizing` answer at once
    //! and keep the rate (0.2) and the totals.

    use crate::common;
    use herdcache::{Cache, ManualClock, Sizing};
    use std::sync::mpsc;
    use std::time::Duration;

    // A fixed-seed hasher: the same keys are sampled on every run.
    use crate::common::seeded::Seeded;

    fn in01(x: f64) -> bool {
        x.is_finite() && (0.0..=1.0).contains(&x)
    }

    fn sane(z: &Sizing, ctx: &str) {
        assert!(in01(z.rate()), "{ctx}: rate {z:?}");
        assert!(
            in01(z.observed()) && in01(z.observed_since_start()),
            "{ctx}: {z:?}"
        );
        for &(_, r) in z.points().iter().chain(z.points_since_start()) {
            assert!(in01(r), "{ctx}: point {r}: {z:?}");
        }
    }

    type C = Cache<u64, u64, Seeded>;

    fn weighted(weight: u32, cap: u64, shards: usize, seed: u64) -> C {
        Cache::builder()
            .max_capacity(cap)
            .shards(shards)
            .record_stats()
            .track_sizing()
            .weigher(move |_k: &u64, _v: &u64| weight)
            .hasher(Seeded(seed))
            .build()
    }

    fn drive(c: &C, keys: u64, n: usize, seed: u64) {
        let mut r = common::SplitMix(seed);
        for _ in 0..n {
            let k = r.below(keys);
            if c.get(&k).is_none() {
                c.insert(k, k);
            }
        }
    }

    /// Runs `f` while a `retain` on another thread holds every shard (its closure blocked on the
    /// first entry); `f` must answer without waiting for it (else the test fails, after 10 s).
    fn during_retain<T: Send + 'static>(c: &C, f: impl FnOnce(C) -> T + Send + 'static) -> T {
        let (inside_tx, inside_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let c2 = c.clone();
        let retain = std::thread::spawn(move || {
            let mut first = true;
            c2.retain(|_k, _v| {
                if first {
                    first = false;
                    inside_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                }
                true
            });
        });
        inside_rx.recv().unwrap();
        let c3 = c.clone();
        let r = common::within(Duration::from_secs(10), move || f(c3));
        release_tx.send(()).unwrap();
        retain.join().unwrap();
        match r {
            Some(Ok(v)) => v,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => panic!("waited for the retain's shard locks"),
        }
    }

    /// `sizing` module docs, "Weights": a weighted cache's rate is `R = min(1, 2000 × mean weight
    /// / max_capacity)`, "the mean weight measured from the cache (weighted size / entries) each
    /// time `Cache::sizing` is called ... when the rate it implies is more than 2 × away from the
    /// current one, the shadows are rebuilt at the new rate (and the window and totals start
    /// again)"; `Cache::sizing`: it re-derives the rate "reading the entry count of each shard
    /// whose lock is free at that instant". Every entry weighs 100 (the mean is 100, always): a
    /// `sizing()` (or `health()`) call made while a `retain` holds every shard must not move the
    /// rate nor restart the curve (no shard is free to read: nothing new is measured). Checked:
    /// the rate during the retain equals the rate after it, and the totals
    /// (`samples_since_start`) are not wiped by the call.
    #[test]
    fn sizing_during_a_retain_does_not_restart_the_curve() {
        let _w = common::watchdog(Duration::from_secs(120), "calibrate busy");
        let mut bad = Vec::new();
        for (shards, call) in [
            (1usize, "sizing"),
            (4, "sizing"),
            (4, "health"),
            (64, "sizing"),
        ] {
            let c = weighted(100, 1_000_000, shards, 7);
            // 20,000 keys of weight 100 (2,000,000 units) into 1,000,000: every request sampled
            // at rate 0.2 of the keys, entries evicted for size.
            drive(&c, 20_000, 300_000, 1);
            let during = during_retain(&c, move |c| {
                if call == "health" {
                    let _ = c.health();
                }
                c.sizing().expect("tracked")
            });
            sane(&during, "during");
            let after = c.sizing().expect("tracked");
            sane(&after, "after");
            drive(&c, 20_000, 1_000, 2);
            let later = c.sizing().expect("tracked");
            if during.rate() != after.rate()
                || during.samples_since_start() == 0
                || later.samples_since_start() < during.samples_since_start()
            {
                bad.push(format!(
                "{shards} shards, {call} during retain: rate {} (since start {}), after {} ({}), later {} ({})",
                during.rate(),
                during.samples_since_start(),
                after.rate(),
                after.samples_since_start(),
                later.rate(),
                later.samples_since_start()
            ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The same with a `sizing()` call before the retain (so a mean weight was seen): the rate
    /// is still 2000 × 100 / 1,000,000 = 0.2 (within its 2 × band) during and after; points in
    /// [0, 1], no panic, no division by zero, for weights of 1, 100 and `u32::MAX` (a clamp of
    /// 2^18 documented nowhere publicly: only sanity asserted there), and an empty cache.
    #[test]
    fn sizing_during_a_retain_after_a_first_call_is_sane() {
        let _w = common::watchdog(Duration::from_secs(120), "calibrate busy 2");
        for (weight, cap, keys) in [
            (1u32, 10_000u64, 20_000u64),
            (100, 1_000_000, 20_000),
            (u32::MAX, u64::MAX / 2, 5_000),
        ] {
            for shards in [1usize, 8] {
                let c = weighted(weight, cap, shards, 3);
                let empty = c.sizing().expect("tracked");
                sane(&empty, "empty");
                drive(&c, keys, 100_000, 5);
                let before = c.sizing().expect("tracked");
                sane(&before, "before");
                let during = during_retain(&c, |c| {
                    let h = c.health();
                    (c.sizing().expect("tracked"), h)
                });
                sane(&during.0, "during");
                let after = c.sizing().expect("tracked");
                sane(&after, "after");
                if weight == 100 {
                    assert!(
                        (during.0.rate() - 0.2).abs() < 0.1 && (after.rate() - 0.2).abs() < 0.1,
                        "rate: before {} during {} after {}",
                        before.rate(),
                        during.0.rate(),
                        after.rate()
                    );
                }
            }
        }
    }

    /// `health_over` docs: "never waits for a shard lock (with a weigher it counts the entries of
    /// each shard whose lock is free at that instant ...)". During a retain, `health` of a
    /// weighted cache with a time to live and a burst answers at once from several threads, and
    /// any synchronized-expiry warning has a share in [0, 1] (no division by zero).
    #[test]
    fn health_from_several_threads_during_a_retain() {
        let _w = common::watchdog(Duration::from_secs(60), "health busy");
        let clock = ManualClock::new();
        let c: C = Cache::builder()
            .max_capacity(1_000_000)
            .shards(4)
            .time_to_live(Duration::from_secs(32))
            .track_sizing()
            .record_stats()
            .clock(clock.clone())
            .weigher(|_k: &u64, _v: &u64| 7)
            .hasher(Seeded(1))
            .build();
        for k in 0..200u64 {
            c.insert(k, k);
        }
        let hs = during_retain(&c, |c| {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|_| {
                        let c = c.clone();
                        s.spawn(move || c.health_over(Duration::from_secs(60)))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        });
        for h in hs {
            for w in h.warnings() {
                if let herdcache::Warning::SynchronizedExpiry { due, share, .. } = w {
                    assert!(in01(*share) && *due > 0, "{h:?}");
                }
            }
        }
    }

    /// The same with a mean weight seen long before: entries of weight 1 (a `sizing()` call then
    /// sees every shard free), then the keys change to entries of weight 1,000 (the tracker's
    /// rate follows them from its sampled inserts: "from the sampled inserts after 32, 64, 128 …
    /// of them"). A `sizing()` during a retain must not re-derive the rate from the weight-1
    /// mean of long ago ("the mean weight measured from the cache (weighted size / entries)"):
    /// the rate during the retain is the rate after it, and the totals are not wiped.
    #[test]
    fn sizing_during_a_retain_does_not_use_a_stale_mean_weight() {
        let _w = common::watchdog(Duration::from_secs(120), "stale mean");
        let c: C = Cache::builder()
            .max_capacity(1_000_000)
            .shards(4)
            .record_stats()
            .track_sizing()
            .weigher(|k: &u64, _v: &u64| if *k < 1_000_000 { 1 } else { 1_000 })
            .hasher(Seeded(11))
            .build();
        drive(&c, 20_000, 100_000, 1);
        let first = c.sizing().expect("tracked");
        sane(&first, "first");
        let mut r = common::SplitMix(9);
        for _ in 0..300_000 {
            let k = 1_000_000 + r.below(4_000);
            if c.get(&k).is_none() {
                c.insert(k, k);
            }
        }
        let during = during_retain(&c, |c| c.sizing().expect("tracked"));
        sane(&during, "during");
        let after = c.sizing().expect("tracked");
        assert!(
            during.rate() == after.rate() && during.samples_since_start() > 0,
            "first rate {} ({}); during the retain {} ({} since start); after {} ({})",
            first.rate(),
            first.samples_since_start(),
            during.rate(),
            during.samples_since_start(),
            after.rate(),
            after.samples_since_start()
        );
    }

    /// `and_compute_with`: "`f` runs with no lock held"; `health_over`: "never waits for a shard
    /// lock". While a computation's `f` blocks, `sizing()` and `health()` of a weighted, tracked
    /// cache (weight 100) answer at once, the rate stays 2000 × 100 / 1,000,000 = 0.2 and the
    /// totals are not restarted (every shard is free to count).
    #[test]
    fn sizing_during_a_blocked_computation_keeps_the_rate() {
        let _w = common::watchdog(Duration::from_secs(120), "compute busy");
        let c = weighted(100, 1_000_000, 4, 7);
        drive(&c, 20_000, 300_000, 1);
        let gate = common::Gate::new();
        let (c2, g2) = (c.clone(), gate.clone());
        let computing = std::thread::spawn(move || {
            let _ = c2.entry(5).and_compute_with(|_e| {
                g2.pass();
                herdcache::Op::Put(5)
            });
        });
        gate.wait_entered();
        let c3 = c.clone();
        let r = common::within(Duration::from_secs(10), move || {
            let h = c3.health();
            (c3.sizing().expect("tracked"), h)
        });
        gate.open();
        computing.join().unwrap();
        let (during, _h) = match r {
            Some(Ok(v)) => v,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => panic!("health/sizing waited for a computation"),
        };
        sane(&during, "during");
        let after = c.sizing().expect("tracked");
        assert!(
            (during.rate() - 0.2).abs() < 0.05
                && during.rate() == after.rate()
                && during.samples_since_start() > 0
                && after.samples_since_start() >= during.samples_since_start(),
            "during {} ({}), after {} ({})",
            during.rate(),
            during.samples_since_start(),
            after.rate(),
            after.samples_since_start()
        );
    }
}
