//! Time, from one place.
//!
//! Every instant the cache stores is a `u64` count of nanoseconds since the cache's *origin* (the
//! moment its clock was created). A `u64` of nanoseconds spans 584 years, fits in an atomic, and
//! makes every comparison a plain integer comparison. All arithmetic on instants saturates, and
//! [`NEVER`] (`u64::MAX`) stands for "no deadline", so `Duration::MAX` and zero durations never
//! overflow or panic.
//!
//! Two sources exist: the system's monotonic clock and a [`ManualClock`] that only moves when a
//! test tells it to. A cache reads its clock through [`Clock`], which also clamps the manual
//! source so that the cache never sees time go backwards.
//!
//! # The coarse system clock
//!
//! `Instant::now()` costs about 20 ns on a typical Linux machine: as much as a whole cache hit.
//! So the system clock is *coarse*: one shared thread (`herdcache-clock`, started on first use)
//! stores the time in an atomic every millisecond, and reads load that atomic. A reading is
//! therefore up to about a millisecond old (more if the thread is descheduled), and an entry can
//! be served up to that long after its deadline as measured by `Instant`. The thread parks
//! (sleeps with no timer) after about a second in which no cache read the clock, and is woken by
//! the next read; while it is parked, reads fall back to `Instant::now()`. It is started once
//! and never exits (a thread ending just as the process exits made LeakSanitizer report its
//! allocations as leaked). The clock thread does no cache work:
//! reclaiming expired entries is done by ordinary calls (see [`crate::expiry`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The process-wide coarse clock behind [`Clock::System`].
mod coarse {
    use super::*;

    /// Nanoseconds since [`origin`], as of the ticker's last tick.
    static NOW: AtomicU64 = AtomicU64::new(0);
    /// Whether the ticker thread runs (and `NOW` is fresh).
    pub(super) static RUNNING: AtomicBool = AtomicBool::new(false);
    /// Set by readers, cleared by the ticker: whether anyone read the clock since the last tick.
    static USED: AtomicBool = AtomicBool::new(false);

    const TICK: Duration = Duration::from_millis(1);
    /// Idle ticks before the ticker parks.
    const IDLE_TICKS: u32 = 1000;

    pub(super) fn origin() -> Instant {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    pub(super) fn precise() -> u64 {
        nanos(origin().elapsed())
    }

    /// Nanoseconds since [`origin`], at most about a tick old while the ticker runs.
    #[inline]
    pub(super) fn now() -> u64 {
        if RUNNING.load(Ordering::Acquire) {
            if !USED.load(Ordering::Relaxed) {
                USED.store(true, Ordering::Relaxed);
            }
            return NOW.load(Ordering::Acquire);
        }
        start()
    }

    #[cold]
    fn start() -> u64 {
        let t = precise();
        NOW.fetch_max(t, Ordering::AcqRel);
        if RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            USED.store(true, Ordering::Relaxed);
            static TICKER: OnceLock<Option<std::thread::Thread>> = OnceLock::new();
            let mut spawned_now = false;
            let ticker = TICKER.get_or_init(|| {
                spawned_now = true;
                std::thread::Builder::new()
                    .name("herdcache-clock".into())
                    .spawn(tick)
                    .ok()
                    .map(|h| h.thread().clone())
            });
            match ticker {
                // Parked (or about to park): woken to tick again.
                Some(t) if !spawned_now => t.unpark(),
                Some(_) => {}
                // No threads here: stay precise.
                None => RUNNING.store(false, Ordering::Release),
            }
        }
        t
    }

    fn tick() {
        let mut idle = 0;
        loop {
            std::thread::sleep(TICK);
            NOW.fetch_max(precise(), Ordering::AcqRel);
            if USED.swap(false, Ordering::Relaxed) {
                idle = 0;
            } else {
                idle += 1;
                if idle >= IDLE_TICKS {
                    RUNNING.store(false, Ordering::Release);
                    // Until a read starts the clock again (`start` unparks; an unpark that
                    // comes first makes the next park return at once).
                    while !RUNNING.load(Ordering::Acquire) {
                        std::thread::park();
                    }
                    idle = 0;
                }
            }
        }
    }
}

/// The instant that never comes: "no deadline".
pub(crate) const NEVER: u64 = u64::MAX;

/// The clock's last reading, where a clock advanced without bound stops: below every deadline
/// that means "not yet, whatever the time" — [`NEVER`], a refresh being started
/// (`expiry::REFRESHING`, `NEVER - 1`) and a fail-safe retry deadline (at most `NEVER - 1`,
/// below `shard::STALE_FORGONE`). At `NEVER - 1` a clock advanced by `Duration::MAX` reached
/// a retry deadline clamped there, and every caller of a failed key retried its load, with
/// no time passing (round 84).
pub(crate) const END: u64 = NEVER - 2;
const _: () = assert!(END < crate::expiry::REFRESHING && END < crate::shard::STALE_FORGONE - 1);

/// Converts a duration to nanoseconds, saturating at `u64::MAX` (which means "never").
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `now + d` where `d` is already in nanoseconds; saturates to [`NEVER`].
#[inline]
pub(crate) fn deadline(now: u64, d: u64) -> u64 {
    now.saturating_add(d)
}

/// The `Instant` `d` from now for a bound on a wait (a load timeout, a Redis deadline), or
/// `None` when it lies beyond what an `Instant` can hold (`Duration::MAX`: no bound). Never
/// panics, unlike `Instant::now() + d`.
pub(crate) fn instant_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// [`instant_after`], for a deadline that must exist: a duration too long for an `Instant` is
/// taken as a century.
#[cfg(feature = "redis")]
pub(crate) fn instant_after_or_far(d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    instant_after(d)
        .or_else(|| instant_after(CENTURY))
        .unwrap_or_else(Instant::now)
}

/// A seed for per-thread random numbers (early refresh): the nanoseconds of the moment.
pub(crate) fn seed() -> u64 {
    nanos(coarse::origin().elapsed()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A clock that moves only when told to, for deterministic tests of expiry.
///
/// Give it to [`CacheBuilder::clock`](crate::CacheBuilder::clock) and advance it instead of
/// sleeping. Clones share the same time.
///
/// # Example
///
/// ```
/// use herdcache::{Cache, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let cache: Cache<&str, u32> = Cache::builder()
///     .max_capacity(100)
///     .time_to_live(Duration::from_secs(60))
///     .clock(clock.clone())
///     .build();
/// cache.insert("a", 1);
/// clock.advance(Duration::from_secs(59));
/// assert_eq!(cache.get("a"), Some(1));
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(cache.get("a"), None); // expired exactly at its deadline
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at its origin (time zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d` (saturating; `Duration::MAX` is allowed).
    pub fn advance(&self, d: Duration) {
        let d = nanos(d);
        // fetch_update never fails with a closure that always returns Some.
        let _ = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(d))
            });
    }

    /// Moves the clock backward by `d` (saturating at the origin).
    ///
    /// A cache never sees time go backward: it keeps the latest instant it has read and treats a
    /// smaller reading as that instant. This exists to test exactly that.
    pub fn rewind(&self, d: Duration) {
        let d = nanos(d);
        let _ = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(d))
            });
    }

    /// The time elapsed since the clock's origin.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now.load(Ordering::Acquire))
    }
}

/// The cache's view of time: nanoseconds since its origin, never decreasing.
#[derive(Clone, Debug)]
pub(crate) enum Clock {
    /// The coarse system clock; the value is the cache's origin on the coarse clock's scale.
    System(u64),
    Manual {
        source: ManualClock,
        /// The latest reading handed out; readings are clamped to it (monotonic).
        latest: Arc<AtomicU64>,
        /// The manual clock's reading when the cache was built (see [`Clock::created`]).
        start: u64,
    },
}

impl Clock {
    pub(crate) fn system() -> Self {
        Clock::System(nanos(coarse::origin().elapsed()))
    }

    pub(crate) fn manual(source: ManualClock) -> Self {
        let start = source.now.load(Ordering::Acquire);
        Clock::Manual {
            source,
            latest: Arc::new(AtomicU64::new(start)),
            start,
        }
    }

    /// The reading of the moment the cache was built: 0 on the system clock (its origin), the
    /// manual clock's time then (a manual clock's readings are its own time, which may have
    /// been advanced before the cache was built).
    pub(crate) fn created(&self) -> u64 {
        match self {
            Clock::System(_) => 0,
            Clock::Manual { start, .. } => (*start).min(END),
        }
    }

    /// Nanoseconds since the origin. Monotonic: never smaller than an earlier reading, and
    /// always before [`NEVER`] (readings saturate at [`END`]).
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.read().min(END)
    }

    /// A reading for timing a load (a slow path): the precise system time (not the coarse
    /// one, whose millisecond steps would round short loads to zero, and which a cache that
    /// keeps no time never reads) or the manual clock's. Only differences of two readings
    /// mean anything.
    pub(crate) fn stopwatch(&self) -> u64 {
        match self {
            Clock::System(origin) => coarse::precise().saturating_sub(*origin),
            Clock::Manual { .. } => self.now(),
        }
    }

    #[inline]
    fn read(&self) -> u64 {
        match self {
            // Monotonic already: the coarse clock only moves forward.
            Clock::System(origin) => coarse::now().saturating_sub(*origin),
            Clock::Manual { source, latest, .. } => {
                let t = source.now.load(Ordering::Acquire);
                let seen = latest.load(Ordering::Acquire);
                if t > seen {
                    latest.fetch_max(t, Ordering::AcqRel).max(t)
                } else {
                    seen
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticker parks when idle and ticks again after the next read, the same thread:
    /// started once, never exiting.
    #[test]
    fn the_ticker_parks_when_idle_and_resumes() {
        let _ = coarse::now();
        assert!(coarse::RUNNING.load(Ordering::Acquire));
        // Idle for over a second (other tests of this binary may read the clock meanwhile:
        // then it is running, and the read below finds it so).
        let until = Instant::now() + Duration::from_secs(10);
        while coarse::RUNNING.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = coarse::now(); // wakes it (or finds it running)
        assert!(coarse::RUNNING.load(Ordering::Acquire));
        let until = Instant::now() + Duration::from_secs(10);
        while coarse::now() <= before + 2_000_000 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            coarse::now() > before + 2_000_000,
            "the clock stopped moving after the ticker parked"
        );
    }

    #[test]
    fn manual_clock_is_clamped_monotonic() {
        let m = ManualClock::new();
        let c = Clock::manual(m.clone());
        m.advance(Duration::from_secs(10));
        assert_eq!(c.now(), 10_000_000_000);
        m.rewind(Duration::from_secs(5));
        assert_eq!(
            c.now(),
            10_000_000_000,
            "a rewind must not move the cache's time back"
        );
        m.advance(Duration::from_secs(6));
        assert_eq!(c.now(), 11_000_000_000);
    }

    #[test]
    fn durations_saturate() {
        assert_eq!(nanos(Duration::MAX), u64::MAX);
        assert_eq!(deadline(5, u64::MAX), NEVER);
        let m = ManualClock::new();
        m.advance(Duration::MAX);
        m.advance(Duration::MAX);
        assert_eq!(Clock::manual(m).now(), END, "now stays before NEVER");
    }

    #[test]
    fn system_clock_advances_monotonically() {
        let c = Clock::system();
        let mut last = c.now();
        let start = Instant::now();
        // The coarse clock must move within a bounded time (it ticks every millisecond).
        while c.now() == last {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the coarse clock is stuck"
            );
            std::thread::yield_now();
        }
        for _ in 0..10_000 {
            let t = c.now();
            assert!(t >= last);
            last = t;
        }
    }
}
