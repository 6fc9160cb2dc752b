//! The figures the slow paths keep for [`Cache::health`](crate::Cache::health): a load-time
//! histogram, failure and stale-answer counters, and (for a cache whose expiry can be
//! synchronized) a ring of how many entries fall due in each interval ahead. A leaf: the
//! settings own one; `health` reads it.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Load-time histogram: four buckets per power of two of nanoseconds.
pub(crate) const BUCKETS: usize = 256;
/// Expiry ring: intervals of TTL / 32, two TTLs ahead.
const SLOTS: usize = 64;
const SLOTS_PER_TTL: u64 = 32;

/// The configuration `health` judges, fixed at build time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HealthConfig {
    pub(crate) ttl: Option<u64>,
    pub(crate) refresh_after: Option<u64>,
    /// Jitter, refresh-ahead or early refresh: expiry is not synchronized by construction.
    pub(crate) spread: bool,
    pub(crate) negative_caching: bool,
}

/// The figures `health` compares across its window.
#[derive(Clone)]
pub(crate) struct Figures {
    pub(crate) loads: [u64; BUCKETS],
    pub(crate) failures: u64,
    pub(crate) stale: u64,
    pub(crate) waited: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) evicted: u64,
    pub(crate) refresh_started: u64,
    pub(crate) refresh_finished: u64,
}

impl Default for Figures {
    fn default() -> Self {
        Figures {
            loads: [0; BUCKETS],
            failures: 0,
            stale: 0,
            waited: 0,
            hits: 0,
            misses: 0,
            evicted: 0,
            refresh_started: 0,
            refresh_finished: 0,
        }
    }
}

/// One interval of the expiry ring: which interval it holds, and how many entries are due in it.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) interval: AtomicU64,
    pub(crate) due: AtomicU64,
}

/// The atomics the slow paths keep for [`Cache::health`], and its snapshots.
pub(crate) struct Monitor {
    pub(crate) config: HealthConfig,
    pub(crate) loads: Box<[AtomicU64]>,
    pub(crate) failures: AtomicU64,
    pub(crate) stale: AtomicU64,
    /// Empty unless expiry can be synchronized (a time to live, no spread).
    pub(crate) ring: Box<[Slot]>,
    pub(crate) width: u64,
    pub(crate) history: Mutex<Vec<(u64, Figures)>>,
    /// The kinds raised by the last call of `health` (bit `i`: `Warning::KINDS[i]`), to log
    /// when they start and clear (feature `tracing`).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) active: std::sync::atomic::AtomicU8,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new(HealthConfig::default())
    }
}

/// The histogram bucket of a duration in nanoseconds: four per power of two.
pub(crate) fn bucket(ns: u64) -> usize {
    let ns = ns.max(1);
    let octave = 63 - ns.leading_zeros() as usize;
    if octave < 2 {
        return ns as usize - 1; // 1, 2, 3 ns
    }
    let sub = ((ns >> (octave - 2)) & 3) as usize;
    (octave * 4 + sub).min(BUCKETS - 1)
}

/// The middle of a bucket, in nanoseconds.
pub(crate) fn bucket_mid(i: usize) -> u64 {
    let octave = i / 4;
    if octave < 2 {
        return i as u64 + 1;
    }
    let sub = (i % 4) as u64;
    let lo = (4 + sub) << (octave - 2);
    let hi = (5 + sub) << (octave - 2);
    lo / 2 + hi / 2
}

impl Monitor {
    pub(crate) fn new(config: HealthConfig) -> Self {
        let (ring, width) = match config.ttl {
            Some(ttl) if !config.spread => (
                (0..SLOTS).map(|_| Slot::default()).collect(),
                (ttl / SLOTS_PER_TTL).max(1),
            ),
            _ => (Box::default(), 1),
        };
        Monitor {
            config,
            loads: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            failures: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            ring,
            width,
            history: Mutex::new(Vec::new()),
            active: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// A load ended (`took` nanoseconds on the cache's clock).
    pub(crate) fn load(&self, took: u64, failed: bool) {
        self.loads[bucket(took)].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A call was answered with a value past its time to live.
    pub(crate) fn stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    /// An entry was written at `now` (only tracked when expiry can be synchronized).
    #[inline]
    pub(crate) fn wrote(&self, now: u64) {
        if self.ring.is_empty() {
            return;
        }
        self.note_due(now);
    }

    #[inline(never)]
    fn note_due(&self, now: u64) {
        let ttl = self.config.ttl.unwrap_or(0);
        let interval = now.saturating_add(ttl) / self.width;
        let slot = &self.ring[interval as usize % SLOTS];
        if slot.interval.load(Ordering::Relaxed) != interval
            && slot.interval.swap(interval, Ordering::AcqRel) != interval
        {
            slot.due.store(0, Ordering::Relaxed);
        }
        slot.due.fetch_add(1, Ordering::Relaxed);
    }

    /// The busiest two adjacent intervals ahead of `now` (so that a burst split by an
    /// interval boundary still counts as one): (entries due, their start from now).
    pub(crate) fn busiest(&self, now: u64) -> Option<(u64, u64)> {
        if self.ring.is_empty() {
            return None;
        }
        let first = now / self.width;
        let due = |i: u64| {
            let s = &self.ring[i as usize % SLOTS];
            if s.interval.load(Ordering::Relaxed) == i {
                s.due.load(Ordering::Relaxed)
            } else {
                0
            }
        };
        (first..first + SLOTS as u64 - 1)
            .map(|i| (due(i) + due(i + 1), i))
            .filter(|&(n, _)| n > 0)
            .max()
            .map(|(n, i)| (n, (i * self.width).saturating_sub(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_middle() {
        let mut last = 0;
        for ns in [
            1u64,
            2,
            3,
            4,
            5,
            7,
            8,
            100,
            1_000,
            123_456,
            1 << 40,
            u64::MAX,
        ] {
            let b = bucket(ns);
            assert!(b >= last, "monotonic at {ns}");
            last = b;
        }
        for i in 8..200 {
            assert_eq!(
                bucket(bucket_mid(i)),
                i,
                "the middle of bucket {i} is in it"
            );
        }
    }
}
