//! The figures the slow paths keep for [`Cache::health`](crate::Cache::health): a load-time
//! histogram, failure and stale-answer counters, and (for a cache whose expiry can be
//! synchronized) the configuration of the [`DueRing`]s — one per shard, kept under its write
//! lock — that count how many entries fall due in each interval ahead. A leaf: the settings
//! own the monitor, the cache's shards the rings; `health` reads both.

use crate::clock::NEVER;
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
    /// Of those, writes too heavy to store (`Monitor::too_heavy`).
    pub(crate) too_heavy: u64,
    pub(crate) refresh_started: u64,
    pub(crate) refresh_finished: u64,
    /// The entries `health` counted (the residence time's numerator: the most any snapshot
    /// of the window saw, so that a flush does not make the window's evictions look young).
    pub(crate) entries: u64,
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
            too_heavy: 0,
            refresh_started: 0,
            refresh_finished: 0,
            entries: 0,
        }
    }
}

/// How many written entries fall due in each interval ahead, for one shard: a ring of
/// [`SLOTS`] words, each the interval it holds (its low 32 bits above the slot's index: an
/// interval aliases another only 2^38 intervals away) and its count (one word, so a reader
/// never sees one without the other). Written only under the shard's write lock
/// (plain loads and stores: no shared read-modify-write on the write path); read by `health`
/// with no lock. Empty unless expiry can be synchronized.
pub(crate) struct DueRing {
    slots: Box<[AtomicU64]>,
    /// The last write's `now` and the index of the slot of the interval it fell due in
    /// (`SLOTS`: none, its deadline saturated to "never"): writes within one clock tick (the
    /// coarse clock moves once a millisecond) reuse it instead of dividing again.
    memo: [AtomicU64; 2],
    /// The highest interval an entry was written due in (`u64::MAX`: none yet). No slot holds
    /// a later one: a slot tagged for a later interval is an alias of an older write (see
    /// [`Monitor::busiest`]).
    highest: AtomicU64,
}

impl DueRing {
    /// A ring for a shard of a cache monitored by `m` (empty if it does not track expiry).
    pub(crate) fn new(m: &Monitor) -> Self {
        DueRing {
            slots: if m.tracks_due() {
                (0..SLOTS).map(|_| AtomicU64::new(0)).collect()
            } else {
                Box::default()
            },
            // No `now` is `u64::MAX` (the clock stops one short of `NEVER`).
            memo: [AtomicU64::new(u64::MAX), AtomicU64::new(0)],
            highest: AtomicU64::new(u64::MAX),
        }
    }

    /// Under the shard's write lock: one entry written at `now` falls due (if `m` tracks it;
    /// not if its deadline saturates to "never", at the clock's end).
    #[inline]
    pub(crate) fn note_written(&self, m: &Monitor, now: u64) {
        if m.width == 0 {
            return;
        }
        if self.memo[0].load(Ordering::Relaxed) == now {
            // The same tick as the last write: its interval's slot holds that interval (no
            // other write came between, this is under the shard's write lock), so only the
            // count moves (saturating). The memo holds the slot's index (`SLOTS`: the last
            // write's entry never falls due, nothing to count).
            let i = self.memo[1].load(Ordering::Relaxed) as usize;
            if let Some(slot) = self.slots.get(i) {
                let w = slot.load(Ordering::Relaxed);
                if w & 0xffff_ffff != 0xffff_ffff {
                    slot.store(w + 1, Ordering::Relaxed);
                }
            }
            return;
        }
        let interval = m.due_interval(now);
        self.memo[0].store(now, Ordering::Relaxed);
        let counted = interval.filter(|&i| self.note(i));
        self.memo[1].store(
            counted.map_or(SLOTS as u64, |i| i % SLOTS as u64),
            Ordering::Relaxed,
        );
    }

    /// Under the shard's write lock: one entry written now falls due in `interval`. Returns
    /// whether it was counted: not when it falls due `SLOTS` intervals or more before the
    /// highest one written (a writer with a much older reading of the clock).
    ///
    /// The ring holds the `SLOTS` intervals up to the highest written and no other: when the
    /// highest moves on, the slots of the intervals it passes are cleared (all of them after a
    /// jump of `SLOTS` or more). So a slot never holds an interval older than that span, and
    /// the tag (the interval's bits above the slot's index, 32 of them) only confirms what
    /// the span already implies. Round 94: with tags alone, a slot written 2^38 intervals
    /// before passed for the interval asked for (at a time to live of 1 ms: 99 days).
    #[inline]
    fn note(&self, interval: u64) -> bool {
        let Some(slot) = self.slots.get(interval as usize % SLOTS) else {
            return false;
        };
        let h = self.highest.load(Ordering::Relaxed);
        if h == u64::MAX || interval > h {
            let passed = if h == u64::MAX {
                SLOTS as u64
            } else {
                interval - h
            };
            if passed >= SLOTS as u64 {
                for s in self.slots.iter() {
                    s.store(0, Ordering::Relaxed);
                }
            } else {
                for i in h + 1..interval {
                    self.slots[i as usize % SLOTS].store(0, Ordering::Relaxed);
                }
            }
            self.highest.store(interval, Ordering::Relaxed);
        } else if h - interval >= SLOTS as u64 {
            return false;
        }
        let tag = Self::tag(interval);
        let w = slot.load(Ordering::Relaxed);
        let n = if w >> 32 == tag {
            (w & 0xffff_ffff) + 1
        } else {
            1
        };
        slot.store((tag << 32) | n.min(0xffff_ffff), Ordering::Relaxed);
        true
    }

    /// A slot's tag for `interval`: the bits above the slot's index (implied by the slot),
    /// 32 of them.
    fn tag(interval: u64) -> u64 {
        (interval / SLOTS as u64) & 0xffff_ffff
    }

    /// The highest interval an entry was written due in (`None`: none yet).
    fn highest(&self) -> Option<u64> {
        Some(self.highest.load(Ordering::Relaxed)).filter(|&h| h != u64::MAX)
    }

    /// Entries due in `interval`.
    fn due(&self, interval: u64) -> u64 {
        self.slots.get(interval as usize % SLOTS).map_or(0, |slot| {
            let w = slot.load(Ordering::Relaxed);
            if w >> 32 == Self::tag(interval) {
                w & 0xffff_ffff
            } else {
                0
            }
        })
    }
}

/// `health`'s snapshots (instant, figures), oldest first, and the longest window it was asked
/// for (nanoseconds; at least the default window): snapshots are kept for that one, whatever
/// window a given call asks for. The default window ([`Cache::health`](crate::Cache::health))
/// keeps its own (`Monitor::history`), and so does each of the last [`OTHER_WINDOWS`] other
/// windows asked for (`Monitor::other`), so that no call with another window thins or
/// stretches a window's snapshots.
#[derive(Default, Clone)]
pub(crate) struct History {
    snapshots: Vec<(u64, Figures)>,
    longest: u64,
}

/// Snapshots kept, at most (see [`History::keep`]).
const HISTORY: usize = 16;

/// The windows other than the default that keep snapshots of their own, at most: the most
/// recently asked for. A window asked for again after it lost its own starts from a copy of the
/// default window's.
pub(crate) const OTHER_WINDOWS: usize = 4;

impl History {
    /// A window's snapshots for its first call: a copy of `from`'s (the default window's),
    /// kept for this window from then on.
    pub(crate) fn seeded(from: &History) -> History {
        History {
            snapshots: from.snapshots.clone(),
            longest: 0,
        }
    }

    /// The snapshots, oldest first: at least one (the cache's creation at `created`, with its
    /// figures all zero then: a manual clock may have been advanced before the cache was
    /// built).
    pub(crate) fn snapshots(&mut self, created: u64) -> &[(u64, Figures)] {
        if self.snapshots.is_empty() {
            self.snapshots.push((created, Figures::default()));
        }
        &self.snapshots
    }

    /// After a call with window `w` at `now` (figures `cur`; the creation's first, see
    /// [`snapshots`](Self::snapshots)): keeps a snapshot if the newest
    /// is an eighth of `w` old or older; keeps one snapshot at least the longest window asked
    /// for (at least `min`) old, and none older; and at most [`HISTORY`]: beyond it, the
    /// snapshot whose neighbours are the closest goes (the first and the newest stay), so that
    /// the calls of a short window, however frequent, thin their own snapshots and not the
    /// longest window's.
    pub(crate) fn keep(&mut self, created: u64, now: u64, cur: &Figures, w: u64, min: u64) {
        self.snapshots(created);
        let h = &mut self.snapshots;
        let last = h.last().map_or(0, |(at, _)| *at);
        if now.saturating_sub(last) >= (w / 8).max(1) {
            h.push((now, cur.clone()));
        }
        self.longest = self.longest.max(w).max(min);
        let keep = now.saturating_sub(self.longest);
        while h.len() > 2 && h[1].0 <= keep {
            h.remove(0);
        }
        while h.len() > HISTORY {
            let i = (1..h.len() - 1)
                .min_by_key(|&i| h[i + 1].0 - h[i - 1].0)
                .unwrap_or(1);
            h.remove(i);
        }
    }
}

/// The atomics the slow paths keep for [`Cache::health`](crate::Cache::health), and its snapshots.
pub(crate) struct Monitor {
    pub(crate) config: HealthConfig,
    pub(crate) loads: Box<[AtomicU64]>,
    pub(crate) failures: AtomicU64,
    pub(crate) stale: AtomicU64,
    /// The length of a [`DueRing`] interval (nanoseconds); 0 unless expiry can be
    /// synchronized (a time to live, no spread).
    pub(crate) width: u64,
    pub(crate) history: Mutex<History>,
    /// The snapshots of the calls with a window other than the default: (window, its
    /// snapshots), the most recently asked for last, [`OTHER_WINDOWS`] at most.
    pub(crate) other: Mutex<Vec<(u64, History)>>,
    /// The kinds raised by the last call of `health` (bit `i`: `Warning::KINDS[i]`), to log
    /// when they start and clear (feature `tracing`).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) active: std::sync::atomic::AtomicU8,
    /// Writes turned away as too heavy to store, which the statistics count as evictions for
    /// size: no entry that stayed, left out of the residence time.
    pub(crate) too_heavy: AtomicU64,
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
    // In `u128`: the top bucket's upper bound is 2^64 (round 92: it shifted out to 0).
    let sub = (i % 4) as u128;
    let lo = (4 + sub) << (octave - 2);
    let hi = (5 + sub) << (octave - 2);
    u64::try_from((lo + hi) / 2).unwrap_or(u64::MAX)
}

impl Monitor {
    pub(crate) fn new(mut config: HealthConfig) -> Self {
        // A time to live of `Duration::MAX` is "never" (no deadline): judged as none. One of
        // zero stores nothing: nothing falls due, so no ring is kept.
        config.ttl = config.ttl.filter(|&t| t != NEVER);
        let width = match config.ttl {
            // Rounded up: three intervals hold any span of TTL / 16 (round 93: at a time to live
            // of 63 ns, three intervals of 1 ns did not).
            Some(ttl) if !config.spread && ttl > 0 => ttl.div_ceil(SLOTS_PER_TTL),
            _ => 0,
        };
        Monitor {
            config,
            loads: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            failures: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            width,
            history: Mutex::new(History::default()),
            other: Mutex::new(Vec::new()),
            active: std::sync::atomic::AtomicU8::new(0),
            too_heavy: AtomicU64::new(0),
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

    /// Whether written entries are counted by when they fall due (see [`DueRing`]).
    pub(crate) fn tracks_due(&self) -> bool {
        self.width > 0
    }

    /// The [`DueRing`] interval in which an entry written at `now` falls due (tracked: `width`
    /// is not 0), or `None` if its deadline saturates to [`NEVER`] (it never expires).
    fn due_interval(&self, now: u64) -> Option<u64> {
        now.checked_add(self.config.ttl.unwrap_or(0))
            .filter(|&d| d != NEVER)
            .map(|d| d / self.width)
    }

    /// The busiest three adjacent intervals ahead of `now`: (entries due, their start from
    /// now). Three, so that a burst within half the span of two (TTL / 16 for intervals of
    /// TTL / 32) counts as one wherever it starts: it may straddle three (round 92: with
    /// pairs, a burst of 1.9 s at a time to live of 32 s was split at most clock phases).
    pub(crate) fn busiest<'a>(
        &self,
        now: u64,
        rings: impl Iterator<Item = &'a DueRing>,
    ) -> Option<(u64, u64)> {
        if self.width == 0 {
            return None;
        }
        let first = now / self.width;
        // A ring holds the `SLOTS` intervals up to the highest it was written (see
        // `DueRing::note`), and no interval past it (round 93: the highest, not the last
        // write's, which a writer with an older reading of the clock, or an entry that never
        // falls due, may have made): outside that span a slot holds another interval (round
        // 92: with 32-bit tags, entries expired 37 hours before, at a time to live of 1 ms,
        // reported as due; round 94: with 32 bits above the index, 2^38 intervals before).
        let rings: Vec<(&DueRing, u64)> = rings.filter_map(|r| Some((r, r.highest()?))).collect();
        let due = |i: u64| {
            rings
                .iter()
                .filter(|&&(_, last)| i <= last && last - i < SLOTS as u64)
                .map(|(r, _)| r.due(i))
                .sum::<u64>()
        };
        // Saturating: at the clock's end (a manual clock advanced by `Duration::MAX`) the
        // intervals ahead run out.
        (first..first.saturating_add(SLOTS as u64 - 2))
            .map(|i| {
                (
                    (0..3)
                        .filter_map(|d| i.checked_add(d))
                        .map(due)
                        .sum::<u64>(),
                    i,
                )
            })
            .filter(|&(n, _)| n > 0)
            .max()
            .map(|(n, i)| (n, i.saturating_mul(self.width).saturating_sub(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_counts_writes_by_interval_through_its_memo() {
        let m = Monitor::new(HealthConfig {
            ttl: Some(64_000),
            ..HealthConfig::default()
        });
        assert_eq!(m.width, 2_000);
        let r = DueRing::new(&m);
        // Three writes in one tick (the memo's path), one in the next interval, then one back
        // in the first interval at another `now` (a miss of the memo, same interval).
        for _ in 0..3 {
            r.note_written(&m, 100);
        }
        r.note_written(&m, 2_100);
        r.note_written(&m, 1_000);
        let first = m.due_interval(100).unwrap();
        assert_eq!(r.due(first), 4);
        assert_eq!(r.due(first + 1), 1);
        // An interval a ring later replaces the slot's count instead of adding to it.
        r.note_written(&m, 100 + 2_000 * SLOTS as u64);
        r.note_written(&m, 100 + 2_000 * SLOTS as u64);
        assert_eq!(r.due(first), 0);
        assert_eq!(r.due(first + SLOTS as u64), 2);
        // The count saturates instead of spilling into the interval's tag.
        let slot = &r.slots[(first + SLOTS as u64) as usize % SLOTS];
        slot.store(
            (DueRing::tag(first + SLOTS as u64) << 32) | 0xffff_fffe,
            Ordering::Relaxed,
        );
        for _ in 0..3 {
            r.note_written(&m, 100 + 2_000 * SLOTS as u64);
        }
        assert_eq!(r.due(first + SLOTS as u64), 0xffff_ffff);
    }

    /// The ring holds the `SLOTS` intervals up to the highest written: moving on clears the
    /// slots it passes (all of them after a jump of `SLOTS` or more, whatever the tags say),
    /// and a write due `SLOTS` intervals or more before the highest is not counted (round 94:
    /// tags alone aliased 2^38 intervals apart).
    #[test]
    fn the_ring_holds_only_the_span_up_to_its_highest_interval() {
        let m = Monitor::new(HealthConfig {
            ttl: Some(64_000),
            ..HealthConfig::default()
        });
        let r = DueRing::new(&m);
        assert!(r.note(3) && r.note(3) && r.note(5));
        assert_eq!((r.due(3), r.due(5)), (2, 1));
        // Moving on by 2: the slot passed (4) is cleared, the others kept.
        assert!(r.note(6));
        assert_eq!((r.due(3), r.due(5), r.due(6)), (2, 1, 1));
        // A jump of 2^38 + SLOTS: every slot cleared, the same tags or not.
        let far = 3 + (1u64 << 38) + SLOTS as u64;
        assert!(r.note(far));
        assert_eq!(r.highest(), Some(far));
        assert_eq!((r.due(3), r.due(5), r.due(6), r.due(far)), (0, 0, 0, 1));
        assert_eq!(r.due(3 + (1u64 << 38)), 0, "the old slot's alias");
        // Too old to count: not counted; the oldest interval still held is.
        assert!(!r.note(far - SLOTS as u64));
        assert!(r.note(far - SLOTS as u64 + 1));
        assert_eq!(r.due(far - SLOTS as u64 + 1), 1);
    }

    /// A time to live of zero (nothing stored) or of `Duration::MAX` ("never") keeps no ring,
    /// and an entry whose deadline saturates to "never" (at the clock's end) is not counted,
    /// through the memo either.
    #[test]
    fn never_and_nothing_fall_due_nowhere() {
        for ttl in [0, NEVER] {
            let m = Monitor::new(HealthConfig {
                ttl: Some(ttl),
                ..HealthConfig::default()
            });
            assert!(!m.tracks_due(), "ttl {ttl}");
        }
        let m = Monitor::new(HealthConfig {
            ttl: Some(64_000),
            ..HealthConfig::default()
        });
        let r = DueRing::new(&m);
        let end = NEVER - 1;
        for _ in 0..3 {
            r.note_written(&m, end);
        }
        assert!(r.slots.iter().all(|s| s.load(Ordering::Relaxed) == 0));
        assert_eq!(m.busiest(end, std::iter::once(&r)), None);
        r.note_written(&m, 100);
        assert_eq!(m.busiest(100, std::iter::once(&r)).map(|b| b.0), Some(1));
    }

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
