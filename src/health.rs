//! Health: the misconfigurations that let a cache fail to protect its backend, detected from
//! the cache's own figures and configuration over a recent window.
//!
//! [`Cache::health`] reads counters (it never waits for a shard lock; nothing on the hot path): a few atomics
//! the slow paths keep here (loads and their durations, failures, fail-safe answers, and, for
//! caches configured without jitter or refresh-ahead, when written entries are due), the
//! statistics (with [`record_stats`](crate::CacheBuilder::record_stats): hits, misses,
//! evictions, refreshes), the load limiter, and the configuration.
//!
//! # The window
//!
//! Each call compares the figures of now with those of a snapshot kept by earlier calls: the
//! newest one at least `window` old ([`Cache::health`]: 60 s; [`Cache::health_over`]: yours),
//! or the cache's creation when there is none (on a [`ManualClock`](crate::ManualClock), the
//! clock's time when the cache was built). Snapshots are kept by the calls themselves (one per
//! eighth of the window at most, 16 at most: beyond, the one closest to its neighbours goes).
//! Each window keeps snapshots of its own, which no call with another window thins or
//! stretches: [`Cache::health`]'s 60 s window, and the last four other windows
//! [`Cache::health_over`] was asked for (a fifth takes the place of the least recently asked
//! for; a window new, or asked for again after it lost its place, starts from a copy of the
//! 60 s window's snapshots: its first calls cover what those allow). So call it periodically — e.g. with each
//! metrics scrape — for the window to be what it says. On a cache that keeps no time (no
//! expiry, refresh or negative caching) the window is measured all the same, on the precise
//! clock (or the manual one), read by `health` itself.
//!
//! # Logging
//!
//! With the cargo feature `tracing`, each call logs the warnings that started since the
//! previous call (`WARN`, with the advice) and those that cleared (`INFO`), with the target
//! `herdcache::health` and the fields `cache` (its name) and `kind`. Start and clear are as
//! successive calls see them: call it periodically (e.g. with each metrics scrape).
//!
//! # Thresholds
//!
//! | warning | raised when (over the window) |
//! |---|---|
//! | [`Warning::TtlShorterThanLoads`] | time to live < [`TTL_LOAD_MULTIPLE`] × median load time, with ≥ [`MIN_LOADS`] loads |
//! | [`Warning::SynchronizedExpiry`] | a time to live (not zero, not `Duration::MAX`), no jitter, no refresh-ahead (a `refresh_after` at or above the time to live refreshes nothing ahead: watched), no custom [`Expiry`](crate::Expiry) (one sets its own deadlines, which need not fall together: not watched even if it keeps the time to live's), no time to idle shorter than the time to live (reads move an idle deadline, and the count is of writes: not watched), and ≥ [`SYNC_SHARE`] of the entries (and ≥ [`SYNC_MIN`]) due within one interval of TTL / 16 wherever it starts (counted in intervals of TTL / 32 by when each entry is due: the busiest three adjacent ones, 3/32 of the TTL, which hold any span of TTL / 16; writes counted by when their entry is due: a key written again and entries evicted since still count, so the count is capped at the entries present; an entry whose deadline saturates to "never", a write too heavy to store and a load superseded by a later write are not counted) |
//! | [`Warning::RefreshNeverHappens`] | `refresh_after` ≥ time to live (configuration; not with a time to live of "never": `Duration::MAX`, or 584 years or more) |
//! | [`Warning::RefreshCannotKeepUp`] | ≥ [`REFRESH_BACKLOG`] refreshes started and not finished, a backlog that grew over the window's second half and did not shrink over its first |
//! | [`Warning::Thrashing`] | evictions for size in the window (at least one), and either ≥ [`MIN_EVICTIONS`] of them with entries staying < ½ the time to live (or refresh period; neither of `Duration::MAX`; without either, no such test) on average (the most entries the window's snapshots saw ÷ evictions per second; a write too heavy to store, which the statistics count as an eviction for size, is a stay of zero there, and the `residence` figure reported leaves such writes out), or the hit ratio fell by ≥ [`HIT_DROP_POINTS`] points from the window's first half to its second (≥ [`MIN_REQUESTS`] requests in each). A hit-ratio drop with no eviction for size is not thrashing (a cache that evicts nothing is not too small: the keys changed, or entries expired or were invalidated). With [`track_sizing`](crate::CacheBuilder::track_sizing), the advice quotes the predicted hit ratio at 2× and 4× (for a `max_capacity` of 0: at 1, 2 and 4) and [`Sizing::suggested_capacity`](crate::Sizing::suggested_capacity) (or says a larger cache would not help) |
//! | [`Warning::LoadLimitSaturated`] | ≥ [`MIN_LOADS`] loads ended, and waits for a `max_concurrent_loads` permit ≥ half of them |
//! | [`Warning::ErrorsWithoutNegativeCaching`] | no `negative_ttl` (or one of zero, which remembers nothing) and no `fail_safe` that served a stale value in the window (it retries a failing key once per backoff, but only keys with an old value past its deadline), ≥ [`MIN_FAILURES`] failed loads, ≥ a quarter of the loads |
//! | [`Warning::ServingStale`] | fail-safe answered calls with values past their time to live |
//!
//! The median load time comes from a histogram with four buckets per power of two: the middle
//! of the median's bucket, from 10 % below the true median to 12.5 % above it.
//!
//! Durations are counted in nanoseconds on the cache's clock: a time to live or refresh period
//! of `u64::MAX` nanoseconds (about 584 years) or more is "never", as `Duration::MAX` is, and a
//! warning's figures saturate there. The residence time of entries is estimated by Little's law, entries ÷
//! evictions per second, so it needs no per-entry bookkeeping; the entries are the most any
//! snapshot of the window counted (the count now included), so that a flush
//! (`invalidate_all`) does not make the window's evictions look young.

use crate::cache::Cache;
use crate::clock::nanos;
use crate::monitor::{bucket_mid, Figures, History, BUCKETS, OTHER_WINDOWS};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// [`Warning::TtlShorterThanLoads`]: the time to live must be at least this many median loads.
pub const TTL_LOAD_MULTIPLE: u32 = 4;
/// The fewest loads in the window for load-based warnings.
pub const MIN_LOADS: u64 = 8;
/// [`Warning::SynchronizedExpiry`]: the share of entries due within one interval.
pub const SYNC_SHARE: f64 = 0.25;
/// [`Warning::SynchronizedExpiry`]: the fewest entries due within one interval.
pub const SYNC_MIN: u64 = 64;
/// [`Warning::RefreshCannotKeepUp`]: refreshes started and not finished.
pub const REFRESH_BACKLOG: u64 = 64;
/// [`Warning::Thrashing`]: the fewest evictions for size in the window.
pub const MIN_EVICTIONS: u64 = 64;
/// [`Warning::Thrashing`]: the hit-ratio drop, in percentage points.
pub const HIT_DROP_POINTS: f64 = 10.0;
/// [`Warning::Thrashing`]: the fewest requests in each half of the window for the hit-ratio
/// comparison.
pub const MIN_REQUESTS: u64 = 1000;
/// [`Warning::ErrorsWithoutNegativeCaching`]: the fewest failed loads in the window.
pub const MIN_FAILURES: u64 = 16;

/// The default window of [`Cache::health`].
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// A misconfiguration, with the figures that showed it. `Display` gives a one-line advice.
///
/// ```
/// use herdcache::{Cache, Warning};
/// use std::time::Duration;
///
/// let cache: Cache<u32, u32> = Cache::builder()
///     .max_capacity(100)
///     .time_to_live(Duration::from_secs(10))
///     .refresh_after(Duration::from_secs(20)) // never: entries expire first
///     .loader(|k: &u32| Ok::<_, herdcache::BoxError>(*k))
///     .build();
/// let health = cache.health();
/// assert!(matches!(health.warnings(), [Warning::RefreshNeverHappens { .. }]));
/// assert_eq!(
///     health.warnings()[0].to_string(),
///     "refresh_after (20.0 s) ≥ time to live (10.0 s): entries expire before any refresh; \
///      set refresh_after to about half the time to live"
/// );
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Warning {
    /// The time to live is below [`TTL_LOAD_MULTIPLE`] × the median load time: entries expire
    /// about as fast as they load, so the cache cannot absorb a burst.
    TtlShorterThanLoads {
        /// The configured time to live.
        ttl: Duration,
        /// The median load time over the window.
        p50_load: Duration,
        /// Loads in the window.
        loads: u64,
    },
    /// Many entries are due within one short interval, with no jitter and no refresh-ahead:
    /// an expiry wave, which becomes a herd of distinct keys.
    SynchronizedExpiry {
        /// Entries due within the busiest interval (writes counted, at most the entries
        /// present).
        due: u64,
        /// Their share of the entries.
        share: f64,
        /// The interval's length.
        within: Duration,
        /// When that interval starts, from now.
        in_: Duration,
    },
    /// `refresh_after` is not below the time to live: entries expire before any refresh.
    RefreshNeverHappens {
        /// The configured refresh period.
        refresh_after: Duration,
        /// The configured time to live.
        ttl: Duration,
    },
    /// Refreshes are started faster than they finish (they queue on the spawner or wait for
    /// load permits).
    RefreshCannotKeepUp {
        /// Refreshes started and not finished, now.
        backlog: u64,
        /// Refreshes started in the window.
        started: u64,
        /// Refreshes that finished (or were deferred) in the window.
        finished: u64,
    },
    /// Entries are evicted for size while young, or the hit ratio fell: the cache is too
    /// small for its working set.
    Thrashing {
        /// Evictions for size in the window.
        evictions: u64,
        /// How long stored entries stay on average (the most entries the window's snapshots
        /// saw ÷ evictions per second, writes too heavy to store left out), if measured:
        /// `None` when every eviction in the window was of such a write.
        residence: Option<Duration>,
        /// The hit ratio of the window's first and second halves (fractions), if measured.
        hit_ratio: Option<(f64, f64)>,
        /// The predicted hit-ratio curve, when the cache tracks it
        /// ([`track_sizing`](crate::CacheBuilder::track_sizing)): the advice quotes its
        /// points above `max_capacity` and its
        /// [`suggested_capacity`](crate::Sizing::suggested_capacity).
        sizing: Option<Box<crate::Sizing>>,
    },
    /// Most loads waited for a `max_concurrent_loads` permit.
    LoadLimitSaturated {
        /// The limit.
        limit: usize,
        /// Waits for a permit in the window (loads and refreshes, finished or not).
        waited: u64,
        /// Loads in the window.
        loads: u64,
    },
    /// Loads fail often and nothing remembers the failures: a failing key is loaded again on
    /// every call.
    ErrorsWithoutNegativeCaching {
        /// Failed loads in the window.
        failures: u64,
        /// Loads in the window.
        loads: u64,
    },
    /// Fail-safe is answering with values past their time to live: loads are failing.
    ServingStale {
        /// Calls answered so in the window.
        served: u64,
    },
}

impl Warning {
    /// Every kind's name, as [`kind`](Self::kind) gives it (the metrics label).
    pub const KINDS: [&'static str; 8] = [
        "ttl_shorter_than_loads",
        "synchronized_expiry",
        "refresh_never_happens",
        "refresh_cannot_keep_up",
        "thrashing",
        "load_limit_saturated",
        "errors_without_negative_caching",
        "serving_stale",
    ];

    /// A short, stable name for the kind of warning (e.g. `"thrashing"`).
    ///
    /// ```
    /// let w = herdcache::Warning::ServingStale { served: 3 };
    /// assert_eq!(w.kind(), "serving_stale");
    /// ```
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.index()]
    }

    /// The position of this warning's kind in [`KINDS`](Self::KINDS).
    fn index(&self) -> usize {
        match self {
            Warning::TtlShorterThanLoads { .. } => 0,
            Warning::SynchronizedExpiry { .. } => 1,
            Warning::RefreshNeverHappens { .. } => 2,
            Warning::RefreshCannotKeepUp { .. } => 3,
            Warning::Thrashing { .. } => 4,
            Warning::LoadLimitSaturated { .. } => 5,
            Warning::ErrorsWithoutNegativeCaching { .. } => 6,
            Warning::ServingStale { .. } => 7,
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::TtlShorterThanLoads { ttl, p50_load, .. } => write!(
                f,
                "time to live ({}) < {TTL_LOAD_MULTIPLE}× the median load ({}): \
                 a burst reaches the backend; raise time_to_live or refresh ahead with refresh_after",
                // Rounded so that the printed comparison holds too (round 98: "4.61 µs < 4×
                // 1.15 µs" for 4.607 µs against 1.152 µs).
                Short::down(*ttl),
                Short::up(*p50_load)
            ),
            Warning::SynchronizedExpiry {
                share, within, in_, ..
            } => write!(
                f,
                "{:.0} % of the entries expire within {} (in {}): an expiry wave; \
                 add jitter(0.2) or refresh_after",
                share * 100.0,
                Short::near(*within),
                Short::near(*in_)
            ),
            Warning::RefreshNeverHappens { refresh_after, ttl } => write!(
                f,
                "refresh_after ({}) ≥ time to live ({}): entries expire before \
                 any refresh; set refresh_after to about half the time to live",
                Short::up(*refresh_after),
                Short::down(*ttl)
            ),
            Warning::RefreshCannotKeepUp { backlog, .. } => write!(
                f,
                "{backlog} refreshes started and not finished: refreshes cannot keep up; give the \
                 spawner more threads, raise max_concurrent_loads or refresh_after"
            ),
            Warning::Thrashing {
                evictions,
                residence,
                hit_ratio,
                sizing,
            } => {
                write!(f, "{evictions} evictions for size")?;
                if let Some(r) = residence {
                    write!(f, ", entries stay {} on average", Short::near(*r))?;
                }
                if let Some((a, b)) = hit_ratio {
                    write!(f, ", hit ratio {:.1} % → {:.1} %", a * 100.0, b * 100.0)?;
                }
                match sizing.as_ref().map(|s| (s, s.suggested_capacity())) {
                    Some((s, Some(capacity))) => {
                        write!(f, "; sizing curve: {:.0} % now", s.observed() * 100.0)?;
                        if s.capacity() == 0 {
                            // No multiple of 0: every distinct capacity tracked (1, 2, 4).
                            let mut last = 0;
                            for &(c, r) in s.points() {
                                if c != last {
                                    write!(f, ", at {c}: {:.0} %", r * 100.0)?;
                                    last = c;
                                }
                            }
                        } else {
                            for (i, (c, r)) in s.points()[3..].iter().enumerate() {
                                let capacity_word = if i == 0 { " capacity" } else { "" };
                                write!(
                                    f,
                                    ", at {}×{capacity_word} ({c}): {:.0} %",
                                    2 << i,
                                    r * 100.0
                                )?;
                            }
                        }
                        write!(
                            f,
                            ": the cache is too small for its working set; raise max_capacity \
                             to about {capacity}"
                        )
                    }
                    Some((_, None)) => f.write_str(
                        "; the sizing curve predicts little gain from a larger cache (up to 4×): \
                         the misses are keys seen once (a scan), or seen again only after more \
                         than 4× max_capacity other keys; keep max_capacity, or keep scans out",
                    ),
                    None => f.write_str(
                        ": the cache is too small for its working set; raise max_capacity \
                         (track_sizing() says by how much)",
                    ),
                }
            }
            Warning::LoadLimitSaturated { limit, waited, loads } => write!(
                f,
                "{waited} waits for one of {limit} load permits while {loads} loads ended: the \
                 limit is saturated; raise max_concurrent_loads if the backend can take it, or \
                 refresh ahead"
            ),
            Warning::ErrorsWithoutNegativeCaching { failures, loads } => write!(
                f,
                "{failures} of {loads} loads failed and failures are not cached: every call \
                 reloads a failing key; set negative_ttl (and fail_safe)"
            ),
            Warning::ServingStale { served } => write!(
                f,
                "{served} calls answered with values past their time to live (fail-safe): loads \
                 are failing; check the backend"
            ),
        }
    }
}

/// A duration with three significant digits at most, for the advice ("1.50 s", "62.9 ms",
/// "20.6 min", "585 years"), in whole nanoseconds below a microsecond ("3 ns"); rounded to the
/// nearest, or down or up where the advice compares two durations, so that the printed
/// figures compare as the exact ones do
/// (round 98: "4.61 µs < 4× 1.15 µs" was printed for 4.607 µs against 1.152 µs).
struct Short(Duration, Round);

#[derive(Clone, Copy)]
enum Round {
    Near,
    Down,
    Up,
}

impl Short {
    fn near(d: Duration) -> Self {
        Short(d, Round::Near)
    }
    fn down(d: Duration) -> Self {
        Short(d, Round::Down)
    }
    fn up(d: Duration) -> Self {
        Short(d, Round::Up)
    }
}

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.as_nanos();
        if n < 1000 {
            return write!(f, "{n} ns");
        }
        // In integers (a float's 4.6 is 4.59999…, which rounds down to 4.59). The unit and
        // the digits are chosen on the value as rounded: to the nearest, 999.9996 ms is
        // "1.00 s", 9.9996 s "10.0 s", 99.996 ms "100 ms".
        let round = |q: u128| match self.1 {
            Round::Near => (n + q / 2) / q,
            Round::Down => n / q,
            Round::Up => n.div_ceil(q),
        };
        // Beyond 999 s in minutes, hours, days and years (round 99: "98765 s"; the figures
        // saturate at `u64::MAX` nanoseconds, 584.9 years).
        const S: u128 = 1_000_000_000;
        let units = [
            ("µs", 1_000u128),
            ("ms", 1_000_000),
            ("s", S),
            ("min", 60 * S),
            ("h", 3_600 * S),
            ("d", 86_400 * S),
            ("years", 365 * 86_400 * S),
        ];
        for (unit, scale) in units {
            for digits in [2u32, 1, 0] {
                let p = 10u128.pow(digits);
                let k = round(scale / p);
                if k < 1000 || (unit == "years" && digits == 0) {
                    return if digits == 0 {
                        write!(f, "{k} {unit}")
                    } else {
                        write!(f, "{}.{:0w$} {unit}", k / p, k % p, w = digits as usize)
                    };
                }
            }
        }
        unreachable!("years take any count")
    }
}

/// What [`Cache::health`] found: the warnings of the window, most urgent first.
///
/// ```
/// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(100);
/// let health = cache.health();
/// assert!(health.is_healthy());
/// assert_eq!(health.to_string(), "healthy");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    warnings: Vec<Warning>,
    window: Duration,
}

impl Health {
    /// The warnings (empty when healthy).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Whether there is no warning.
    pub fn is_healthy(&self) -> bool {
        self.warnings.is_empty()
    }

    /// The period the figures cover (shorter than asked for when no snapshot that old exists).
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// One warning per line, or `healthy`.
impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.warnings.is_empty() {
            return f.write_str("healthy");
        }
        for (i, w) in self.warnings.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{w}")?;
        }
        Ok(())
    }
}

fn p50(hist: &[u64]) -> Option<(u64, u64)> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen * 2 >= total {
            return Some((bucket_mid(i), total));
        }
    }
    None
}

fn ratio(hits: u64, misses: u64) -> Option<f64> {
    let n = hits + misses;
    (n >= MIN_REQUESTS).then(|| hits as f64 / n as f64)
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The misconfigurations the cache sees in its figures of the last minute: see
    /// [`health_over`](Self::health_over).
    ///
    /// ```
    /// use std::time::Duration;
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::builder()
    ///     .max_capacity(100)
    ///     .time_to_live(Duration::from_secs(60))
    ///     .build();
    /// assert!(cache.health().is_healthy());
    /// ```
    pub fn health(&self) -> Health {
        self.health_over(DEFAULT_WINDOW)
    }

    /// The misconfigurations the cache sees in its figures over `window` (see the thresholds
    /// in the crate's `health` docs, [`Warning`]). Reads counters and the configuration; never
    /// waits for a shard lock (with a weigher the entries are the sum of the counts each
    /// shard stores after every change: a shard busy in a long operation, such as a `retain`,
    /// counts as its last change left it), only for a lock of its own that
    /// nothing but `health` takes. The warnings
    /// that need hit, miss, eviction or refresh counts need
    /// [`record_stats`](crate::CacheBuilder::record_stats).
    ///
    /// Concurrent calls are fine; each keeps snapshots for the next (see the window in the
    /// [`Health`] docs), so call it periodically for the window to be what it says.
    ///
    /// ```
    /// use herdcache::{Cache, ManualClock, Warning};
    /// use std::time::Duration;
    ///
    /// let clock = ManualClock::new();
    /// let cache: Cache<u32, u32> = Cache::builder()
    ///     .max_capacity(1000)
    ///     .time_to_live(Duration::from_secs(1))
    ///     .clock(clock.clone())
    ///     .build();
    /// for k in 0..10 {
    ///     // Each load takes 2 s on the cache's clock: longer than the time to live.
    ///     cache.get_with(k, || {
    ///         clock.advance(Duration::from_secs(2));
    ///         k
    ///     });
    /// }
    /// let health = cache.health_over(Duration::from_secs(60));
    /// assert!(matches!(health.warnings(), [Warning::TtlShorterThanLoads { .. }]));
    /// ```
    pub fn health_over(&self, window: Duration) -> Health {
        let m = &self.inner.stampede.monitor;
        let cfg = m.config;
        // A cache that keeps no time never reads its clock on the hot path; the window reads
        // it here (the precise clock, or the manual one), as loads are timed.
        let now = if self.keeps_time() {
            self.now()
        } else {
            self.stopwatch()
        };
        // The striped counters only: `stats()` would take every shard's read lock.
        let stats = self.inner.stats.as_ref().map(crate::stats::Stats::snapshot);
        let limiter = self.inner.stampede.limiter.as_ref();
        let mut cur = Figures {
            failures: m.failures.load(Ordering::Relaxed),
            stale: m.stale.load(Ordering::Relaxed),
            waited: limiter.map_or(0, |l| l.waited() as u64),
            ..Figures::default()
        };
        for (c, a) in cur.loads.iter_mut().zip(m.loads.iter()) {
            *c = a.load(Ordering::Relaxed);
        }
        if let Some(s) = &stats {
            cur.hits = s.hits;
            cur.misses = s.misses;
            cur.evicted = s.size.count;
            cur.too_heavy = m.too_heavy.load(Ordering::Relaxed);
            cur.refresh_started = s.refreshes_started;
            cur.refresh_finished = s.refreshes_succeeded + s.refreshes_failed;
        }
        cur.entries = self.entries_now();
        let w = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let default = nanos(DEFAULT_WINDOW);
        let created = self.inner.clock.created().min(now);
        // The window's base snapshot, the one half-way, and the most entries a snapshot of
        // the window saw (now included); then this call's snapshot kept.
        let read = |history: &mut History| {
            let h = history.snapshots(created);
            let pick = |age: u64| {
                let cut = now.saturating_sub(age);
                h.iter()
                    .rev()
                    .find(|(at, _)| *at <= cut)
                    .unwrap_or(&h[0])
                    .clone()
            };
            let (base_at, base) = pick(w);
            let (_, mid) = pick(w / 2);
            let peak = h
                .iter()
                .filter(|(at, _)| *at >= base_at)
                .map(|(_, f)| f.entries)
                .fold(cur.entries, u64::max);
            history.keep(created, now, &cur, w, default);
            (base_at, base, mid, peak)
        };
        let (base_at, base, mid, peak) = if w == default {
            read(&mut m.history.lock())
        } else {
            // Another window's own snapshots, made the most recently used; a window new (or
            // asked for again after it lost its own) starts from a copy of the default
            // window's, and beyond `OTHER_WINDOWS` the least recently used goes. (Locks: the
            // others' then the default's, never the reverse.)
            let mut others = m.other.lock();
            match others.iter().position(|(ow, _)| *ow == w) {
                Some(i) => {
                    let mine = others.remove(i);
                    others.push(mine);
                }
                None => {
                    let seed = History::seeded(&m.history.lock());
                    others.push((w, seed));
                    if others.len() > OTHER_WINDOWS {
                        others.remove(0);
                    }
                }
            }
            read(&mut others.last_mut().expect("just pushed").1)
        };
        if w != default {
            // Every call feeds the default window's snapshots, at its own pace.
            m.history.lock().keep(created, now, &cur, default, default);
        }
        let span = now.saturating_sub(base_at);
        let mut hist = [0u64; BUCKETS];
        for (i, d) in hist.iter_mut().enumerate() {
            *d = cur.loads[i].saturating_sub(base.loads[i]);
        }
        let loads: u64 = hist.iter().sum();
        let mut warnings = Vec::new();
        let d = Duration::from_nanos;

        let served = cur.stale.saturating_sub(base.stale);
        if served > 0 {
            warnings.push(Warning::ServingStale { served });
        }
        if let (Some(ttl), Some((p50, n))) = (cfg.ttl, p50(&hist)) {
            if n >= MIN_LOADS && ttl < p50.saturating_mul(u64::from(TTL_LOAD_MULTIPLE)) {
                warnings.push(Warning::TtlShorterThanLoads {
                    ttl: d(ttl),
                    p50_load: d(p50),
                    loads: n,
                });
            }
        }
        if let Some((due, in_)) = m.busiest(now, self.inner.shards.iter().map(|c| &c.due)) {
            // The rings count writes: a key written again counts again, as do entries
            // evicted or removed since. No more entries can be due than there are.
            let entries = cur.entries;
            let due = due.min(entries);
            let share = if entries == 0 {
                0.0
            } else {
                due as f64 / entries as f64
            };
            if due >= SYNC_MIN && share >= SYNC_SHARE {
                warnings.push(Warning::SynchronizedExpiry {
                    due,
                    share,
                    within: d(m.width * 3),
                    in_: d(in_),
                });
            }
        }
        if let (Some(r), Some(ttl)) = (cfg.refresh_after, cfg.ttl) {
            // A time to live of "never" (`Duration::MAX`) has nothing to refresh ahead of (the
            // monitor holds it as no time to live: this arm does not run).
            if r >= ttl {
                warnings.push(Warning::RefreshNeverHappens {
                    refresh_after: d(r),
                    ttl: d(ttl),
                });
            }
        }
        if stats.is_some() {
            let backlog = cur.refresh_started.saturating_sub(cur.refresh_finished);
            let before = base.refresh_started.saturating_sub(base.refresh_finished);
            let halfway = mid.refresh_started.saturating_sub(mid.refresh_finished);
            if backlog >= REFRESH_BACKLOG && backlog > halfway && halfway >= before {
                warnings.push(Warning::RefreshCannotKeepUp {
                    backlog,
                    started: cur.refresh_started.saturating_sub(base.refresh_started),
                    finished: cur.refresh_finished.saturating_sub(base.refresh_finished),
                });
            }
            let evictions = cur.evicted.saturating_sub(base.evicted);
            // Writes too heavy to store count as evictions for size, but no entry stayed: the
            // residence time reported is of the others (round 94: 640 of them, in a cache 0.1 %
            // full that evicted nothing, read as entries staying 100 s); the test of youth
            // counts them as stays of zero, with the others (round 96: tested apart, 63 of each
            // were no thrashing where 64 evictions alone were).
            let rejected = cur.too_heavy.saturating_sub(base.too_heavy).min(evictions);
            let stayed = evictions - rejected;
            // A refresh period or time to live of `Duration::MAX` is "never": no horizon (the
            // monitor already judges such a time to live as none).
            let horizon = cfg
                .refresh_after
                .filter(|&r| r != crate::clock::NEVER)
                .or(cfg.ttl);
            // Little's law over the window: the most entries its snapshots saw (not the count
            // now, which a flush empties) over the evictions per second.
            let stay = |n: u64| {
                (span > 0 && n > 0).then(|| d((peak as f64 / (n as f64 / span as f64)) as u64))
            };
            let residence = stay(stayed);
            let young = match (stay(evictions), horizon) {
                (Some(r), Some(h)) => evictions >= MIN_EVICTIONS && r < d(h / 2),
                _ => false,
            };
            let first = ratio(
                mid.hits.saturating_sub(base.hits),
                mid.misses.saturating_sub(base.misses),
            );
            let second = ratio(
                cur.hits.saturating_sub(mid.hits),
                cur.misses.saturating_sub(mid.misses),
            );
            let hit_ratio = first.zip(second);
            // In points, with a margin for rounding (a drop of 100 % to 90 % is 9.999… in
            // floating point, and must count as the 10 points it is).
            let fell = hit_ratio.is_some_and(|(a, b)| (a - b) * 100.0 >= HIT_DROP_POINTS - 1e-9);
            if evictions > 0 && (young || fell) {
                warnings.push(Warning::Thrashing {
                    evictions,
                    residence,
                    hit_ratio,
                    sizing: self.sizing_undrained().map(Box::new),
                });
            }
        }
        if let Some(l) = limiter {
            let waited = cur.waited.saturating_sub(base.waited);
            if loads >= MIN_LOADS && waited * 2 >= loads {
                warnings.push(Warning::LoadLimitSaturated {
                    limit: l.limit(),
                    waited,
                    loads,
                });
            }
        }
        let failures = cur.failures.saturating_sub(base.failures);
        // Fail-safe protects the backend only where it answers: keys with an old value past
        // its deadline. One that served nothing in the window (no deadline, keys that never
        // loaded) reloads a failing key on every call as if it were not set.
        let fail_safe_served = self.inner.stampede.fail_safe.is_some() && served > 0;
        if !cfg.negative_caching
            && !fail_safe_served
            && failures >= MIN_FAILURES
            && failures * 4 >= loads
        {
            warnings.push(Warning::ErrorsWithoutNegativeCaching { failures, loads });
        }
        #[cfg(feature = "tracing")]
        self.log_changes(&warnings);
        Health {
            warnings,
            window: d(span),
        }
    }

    /// Logs the warnings that started since the previous call of `health` (at `WARN`, with
    /// their advice) and those that cleared (at `INFO`), target `herdcache::health`.
    #[cfg(feature = "tracing")]
    fn log_changes(&self, warnings: &[Warning]) {
        let m = &self.inner.stampede.monitor;
        let now = warnings.iter().fold(0u8, |bits, w| bits | 1 << w.index());
        let before = m.active.swap(now, Ordering::AcqRel);
        for w in warnings.iter().filter(|w| before & 1 << w.index() == 0) {
            tracing::warn!(target: "herdcache::health", cache = self.name(), kind = w.kind(), "{w}");
        }
        for (i, kind) in Warning::KINDS.iter().enumerate() {
            if before & !now & 1 << i != 0 {
                tracing::info!(target: "herdcache::health", cache = self.name(), kind, "cleared");
            }
        }
    }

    /// Counts a call answered with a value past its time to live (fail-safe).
    pub(crate) fn note_stale(&self) {
        self.count(crate::stats::Counter::StaleAfterTtl);
        self.inner.stampede.monitor.stale();
    }
}
