//! The eviction policy of one shard: an adaptive window in front of a frequency-filtered main
//! space, all on FIFO queues so that a hit only bumps a counter on the entry.
//!
//! # Shape
//!
//! ```text
//!   new key ─► window (FIFO) ──accessed while there──────────────► main (CLOCK, credit 0..=3)
//!                   │                                                  ▲      │
//!                   └─not accessed: TinyLFU duel against main's victim─┘      └─► evicted
//! ```
//!
//! * A **hit** increments the entry's `hits` counter (an `AtomicU8`, saturating at 15) and
//!   nothing else: reads take the shard's *read* lock and write only to the entry they found.
//! * Every key that is inserted is counted in a [`Sketch`] (TinyLFU); an entry's hits are folded
//!   into the sketch when the policy next looks at it, so the sketch sees resident hits too
//!   without any shared write on the read path.
//! * The **window** takes every new key. When it is over its target, its oldest entry leaves: if it
//!   was read while in the window it moves to main (recency, as S3-FIFO's small queue); otherwise
//!   it must beat main's next victim on estimated frequency to get in (frequency, as
//!   W-TinyLFU). A candidate that ties loses, except that a warm candidate (estimate ≥ 6) wins a
//!   tie with probability 1/128, so no one can pin a victim by inflating its counters.
//! * **Main** is a CLOCK over a FIFO: the hand takes the oldest entry; if it earned credit
//!   (hits, up to 3) it spends one and goes to the back, otherwise it is the victim.
//! * The **window size adapts** by hill climbing on the hit rate (as Caffeine 3): every sample
//!   of about ten times the capacity in accesses, the window grows or shrinks by a step in the
//!   direction that last improved the hit rate; the step decays, and restarts when the hit rate
//!   jumps. Recency-heavy workloads end with a large window, frequency-heavy ones a small one.

use crate::sketch::Sketch;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};

/// Where an entry lives in the policy. Main carries CLOCK credit 0..=3.
///
/// An enum (not a `u8`) so that `Option<Entry>` has a niche and costs no extra word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Place {
    Window,
    Main0,
    Main1,
    Main2,
    Main3,
}

impl Place {
    fn main_with(credit: u8) -> Place {
        match credit {
            0 => Place::Main0,
            1 => Place::Main1,
            2 => Place::Main2,
            _ => Place::Main3,
        }
    }

    fn credit(self) -> u8 {
        match self {
            Place::Window | Place::Main0 => 0,
            Place::Main1 => 1,
            Place::Main2 => 2,
            Place::Main3 => 3,
        }
    }
}

/// What the policy needs to know of an entry.
pub(crate) trait Tracked {
    fn place(&self) -> Place;
    fn set_place(&mut self, p: Place);
    fn hits(&self) -> &AtomicU8;
    fn weight(&self) -> u32;
}

/// Records a hit: the only thing a read does to the policy. Lossy under races, by design.
#[inline]
pub(crate) fn record_hit(hits: &AtomicU8) {
    let h = hits.load(Ordering::Relaxed);
    if h < 15 {
        hits.store(h + 1, Ordering::Relaxed);
    }
}

/// The hill climber that sizes the window.
#[derive(Debug)]
struct Climber {
    /// Accesses counted (approximately) when the current sample started.
    sample_start: u64,
    misses: u64,
    prev_hit_rate: f64,
    /// Signed step, in weight units.
    step: f64,
}

const CLIMB_RESTART: f64 = 0.05;
const CLIMB_STEP: f64 = 0.0625;
const CLIMB_DECAY: f64 = 0.98;

/// The policy state of one shard.
#[derive(Debug)]
pub(crate) struct Policy {
    window: VecDeque<u32>,
    main: VecDeque<u32>,
    window_weight: u64,
    main_weight: u64,
    /// The shard's nominal capacity (its share of the cache's).
    capacity: u64,
    window_target: f64,
    sketch: Sketch,
    climber: Climber,
    rng: u64,
    /// Queue positions whose entry was removed by a caller (skipped when reached).
    tombstones: usize,
}

impl Policy {
    pub(crate) fn new(capacity: u64, seed: u64) -> Self {
        let entries = usize::try_from(capacity.min(1 << 24)).unwrap_or(1 << 24);
        Policy {
            window: VecDeque::new(),
            main: VecDeque::new(),
            window_weight: 0,
            main_weight: 0,
            capacity,
            window_target: (capacity as f64 * 0.01).max(1.0),
            sketch: Sketch::new(entries),
            climber: Climber {
                sample_start: 0,
                misses: 0,
                prev_hit_rate: 0.0,
                step: CLIMB_STEP * capacity as f64,
            },
            rng: seed | 1,
            tombstones: 0,
        }
    }

    /// The current window target, in weight units.
    #[cfg(test)]
    pub(crate) fn window_target(&self) -> u64 {
        self.window_target as u64
    }

    /// A new key entered the cache at `slot`. `accesses` is the shard's approximate access count,
    /// used to end the climber's samples.
    pub(crate) fn on_insert<E: Tracked>(&mut self, slab: &mut [Option<E>], slot: u32, hash: u64, accesses: u64) {
        self.sketch.add(hash, 1);
        let e = slab[slot as usize].as_mut().expect("inserted slot is occupied");
        e.set_place(Place::Window);
        self.window_weight += u64::from(e.weight());
        self.window.push_back(slot);
        self.climber.misses += 1;
        self.climb(accesses);
    }

    /// An entry's weight changed in place (its value was replaced).
    pub(crate) fn on_reweigh(&mut self, place: Place, old: u32, new: u32) {
        let w = if place == Place::Window {
            &mut self.window_weight
        } else {
            &mut self.main_weight
        };
        *w = *w - u64::from(old) + u64::from(new);
    }

    /// An entry was removed by a caller (not chosen by the policy); its queue position stays
    /// behind as a tombstone. Returns true when the caller should call
    /// [`purge_tombstones`](Self::purge_tombstones).
    pub(crate) fn on_remove(&mut self, place: Place, weight: u32) -> bool {
        self.on_reweigh(place, weight, 0);
        self.tombstones += 1;
        self.tombstones > 64 && self.tombstones > (self.window.len() + self.main.len()) / 2
    }

    /// Drops tombstones from the queues; returns the slots they held, now free.
    pub(crate) fn purge_tombstones<E>(&mut self, slab: &[Option<E>], free: &mut Vec<u32>) {
        for q in [&mut self.window, &mut self.main] {
            q.retain(|&s| {
                let live = slab[s as usize].is_some();
                if !live {
                    free.push(s);
                }
                live
            });
        }
        self.tombstones = 0;
    }

    /// Forgets every entry (the slab is being cleared).
    pub(crate) fn clear(&mut self) {
        self.window.clear();
        self.main.clear();
        self.window_weight = 0;
        self.main_weight = 0;
        self.tombstones = 0;
    }

    /// Pops the front of a queue, skipping tombstones (their slots go to `free`).
    fn pop<E>(q: &mut VecDeque<u32>, tombstones: &mut usize, slab: &[Option<E>], free: &mut Vec<u32>) -> Option<u32> {
        while let Some(s) = q.pop_front() {
            if slab[s as usize].is_some() {
                return Some(s);
            }
            *tombstones = tombstones.saturating_sub(1);
            free.push(s);
        }
        None
    }

    /// Folds an entry's recent hits into the sketch; returns them.
    fn take_hits<E: Tracked>(&mut self, e: &E, hash: u64) -> u8 {
        let h = e.hits().swap(0, Ordering::Relaxed);
        if h > 0 {
            self.sketch.add(hash, h);
        }
        h
    }

    /// Chooses and dequeues the next victim. The caller removes it from the shard. `hash_of`
    /// recomputes an entry's hash. Returns `None` only when the shard is empty.
    pub(crate) fn evict<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        mut hash_of: impl FnMut(&E) -> u64,
    ) -> Option<u32> {
        while self.window_weight as f64 > self.window_target || self.main_weight == 0 {
            let Some(c) = Self::pop(&mut self.window, &mut self.tombstones, slab, free) else {
                break;
            };
            let e = slab[c as usize].as_ref().expect("popped a live slot");
            let (ch, w) = (hash_of(e), u64::from(e.weight()));
            let accessed = self.take_hits(e, ch) > 0;
            self.window_weight -= w;
            let main_room = self.capacity as f64 - self.window_target - self.main_weight as f64;
            if accessed || w as f64 <= main_room {
                self.enter_main(slab, c, 0);
                continue;
            }
            // The duel: the candidate against main's next victim.
            let Some((v, vh)) = self.main_victim(slab, free, &mut hash_of) else {
                return Some(c);
            };
            if self.admit(self.sketch.frequency(ch), self.sketch.frequency(vh)) {
                self.enter_main(slab, c, 0);
                return Some(v);
            }
            // The victim keeps its place under the hand.
            self.enter_main(slab, v, 0);
            let back = self.main.pop_back();
            debug_assert_eq!(back, Some(v));
            self.main.push_front(v);
            return Some(c);
        }
        self.main_victim(slab, free, &mut hash_of).map(|(s, _)| s)
    }

    fn enter_main<E: Tracked>(&mut self, slab: &mut [Option<E>], s: u32, credit: u8) {
        let e = slab[s as usize].as_mut().expect("live slot");
        e.set_place(Place::main_with(credit));
        self.main_weight += u64::from(e.weight());
        self.main.push_back(s);
    }

    /// Runs main's CLOCK hand until an entry without credit comes up; dequeues it and returns it
    /// with its hash.
    fn main_victim<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        hash_of: &mut impl FnMut(&E) -> u64,
    ) -> Option<(u32, u64)> {
        loop {
            let s = Self::pop(&mut self.main, &mut self.tombstones, slab, free)?;
            let e = slab[s as usize].as_mut().expect("popped a live slot");
            let hits = e.hits().swap(0, Ordering::Relaxed);
            if hits > 0 {
                self.sketch.add(hash_of(e), hits);
            }
            let credit = (e.place().credit() + hits).min(3);
            if credit > 0 {
                e.set_place(Place::main_with(credit - 1));
                self.main.push_back(s);
                continue;
            }
            self.main_weight -= u64::from(e.weight());
            return Some((s, hash_of(e)));
        }
    }

    fn admit(&mut self, candidate: u8, victim: u8) -> bool {
        if candidate > victim {
            return true;
        }
        if candidate < 6 {
            return false;
        }
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng & 127 == 0
    }

    /// Ends a climber sample when enough accesses were seen, and moves the window target.
    fn climb(&mut self, accesses: u64) {
        let c = &mut self.climber;
        let seen = accesses.saturating_sub(c.sample_start);
        let sample = (self.capacity.saturating_mul(10)).max(256);
        if seen < sample {
            return;
        }
        let hit_rate = 1.0 - (c.misses as f64 / seen as f64).min(1.0);
        let delta = hit_rate - c.prev_hit_rate;
        let amount = if delta >= 0.0 { c.step } else { -c.step };
        let cap = self.capacity as f64;
        c.step = if delta.abs() >= CLIMB_RESTART {
            CLIMB_STEP * cap * amount.signum()
        } else {
            CLIMB_DECAY * amount
        };
        self.window_target = (self.window_target + amount).clamp(1.0, (cap * 0.8).max(1.0));
        c.prev_hit_rate = hit_rate;
        c.sample_start = accesses;
        c.misses = 0;
    }

    /// Checks the policy's bookkeeping against the slab (tests only).
    pub(crate) fn validate<E: Tracked>(&self, slab: &[Option<E>]) {
        let mut w = 0u64;
        let mut m = 0u64;
        let mut live = 0usize;
        for &s in &self.window {
            if let Some(e) = &slab[s as usize] {
                assert_eq!(e.place(), Place::Window);
                w += u64::from(e.weight());
                live += 1;
            }
        }
        for &s in &self.main {
            if let Some(e) = &slab[s as usize] {
                assert_ne!(e.place(), Place::Window);
                m += u64::from(e.weight());
                live += 1;
            }
        }
        assert_eq!(w, self.window_weight, "window weight");
        assert_eq!(m, self.main_weight, "main weight");
        assert_eq!(live, slab.iter().filter(|e| e.is_some()).count(), "every entry queued once");
    }
}
