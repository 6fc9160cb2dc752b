//! The eviction policy of one shard: an adaptive window in front of a frequency-filtered main
//! space, all on FIFO queues so that a hit only bumps a counter on the entry.
//!
//! # Shape
//!
//! ```text
//!   new key ─► window (FIFO) ──accessed while there──► main: probation (FIFO) ◄─► protected
//!                   │                                          ▲        │        (CLOCK,
//!                   └─not accessed: TinyLFU duel against ──────┘        │       credit 0..=3)
//!                     main's victim                                     └─► evicted
//! ```
//!
//! * A **hit** increments the entry's `hits` counter (an `AtomicU8`, saturating at 15) and
//!   nothing else: reads take the shard's *read* lock and write only to the entry they found.
//! * Every key that is inserted is counted in a [`Sketch`] (TinyLFU); an entry's hits are folded
//!   into the sketch when the policy next looks at it, so the sketch sees resident hits too
//!   without any shared write on the read path.
//! * The sketch is sized for the entries *present*, not for the capacity (which is in weight
//!   units, bytes perhaps), as Caffeine's is: it starts for at most 64 entries. Once the shard
//!   holds more entries than that, inserts are no longer counted in it; before the policy next
//!   uses it (at the next eviction), or as soon as the shard holds more than half the entries
//!   its capacity allows (the sketch's final size is due then), it is replaced by one sized for
//!   the entries present (the capacity in entries, halved while that still holds them; at most
//!   2^24) that counts each of them once. What the old sketch knew of keys that left and of hits
//!   already folded in is dropped (Caffeine drops everything). A shard that fills without
//!   evicting, as an entry-bounded cache warming up, loses nothing: it gets, counter for
//!   counter, the sketch it would have had if sized for its capacity up front, for the same work
//!   (one count per entry). A shard of 1 GiB holding 100-byte values pays for the values it
//!   holds, not for 2^30 weight units.
//! * The **window** takes every new key. When it is over its target, its oldest entry leaves: if it
//!   was read while in the window it moves to main (recency, as S3-FIFO's small queue); otherwise
//!   it must beat main's next victim on estimated frequency to get in (frequency, as
//!   W-TinyLFU). A candidate that ties loses, except that a warm candidate (estimate ≥ 6) wins a
//!   tie with probability 1/128, so no one can pin a victim by inflating its counters.
//! * **Main** is split into *probation* and *protected* (80 % of main), both FIFO queues.
//!   Main's victim is the oldest probation entry not read since the policy last looked at it;
//!   a probation entry that was read moves to protected instead. Protected keeps within its
//!   share by a CLOCK hand: an entry with credit (hits, up to 3) spends one and goes to the
//!   back, one without is demoted to the back of probation.
//! * The **window size adapts** by hill climbing on the hit rate (as Caffeine 3): every sample
//!   of about ten times the capacity in accesses, the window grows or shrinks by a step in the
//!   direction that last improved the hit rate; the step decays, and restarts when the hit rate
//!   jumps. Recency-heavy workloads end with a large window, frequency-heavy ones a small one.

use crate::sketch::Sketch;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};

/// Where an entry lives in the policy. Protected entries carry CLOCK credit 0..=3.
///
/// An enum (not a `u8`) so that `Option<Entry>` has a niche and costs no extra word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Place {
    Window,
    Probation,
    Protected0,
    Protected1,
    Protected2,
    Protected3,
}

impl Place {
    fn protected(credit: u8) -> Place {
        match credit {
            0 => Place::Protected0,
            1 => Place::Protected1,
            2 => Place::Protected2,
            _ => Place::Protected3,
        }
    }

    fn credit(self) -> u8 {
        match self {
            Place::Protected1 => 1,
            Place::Protected2 => 2,
            Place::Protected3 => 3,
            _ => 0,
        }
    }

    /// The queue holding an entry in this place.
    fn queue(self) -> usize {
        match self {
            Place::Window => WINDOW,
            Place::Probation => PROBATION,
            _ => PROTECTED,
        }
    }
}

const WINDOW: usize = 0;
const PROBATION: usize = 1;
const PROTECTED: usize = 2;

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
/// A climber sample is ten times the capacity in accesses (as Caffeine's), but never more than
/// the capacity or 2^16 accesses, whichever is larger: 2^16 accesses measure a hit rate to about
/// ±0.2 %, and waiting longer only slows adaptation in large caches.
const MAX_SAMPLE: u64 = 1 << 16;

/// The policy state of one shard.
#[derive(Debug)]
pub(crate) struct Policy {
    /// Window, probation and protected queues of slab indices, and their weights.
    queues: [VecDeque<u32>; 3],
    weights: [u64; 3],
    /// The shard's nominal capacity (its share of the cache's).
    capacity: u64,
    window_target: f64,
    sketch: Sketch,
    climber: Climber,
    rng: crate::rng::Rng,
    /// Queue positions whose entry was removed by a caller (skipped when reached).
    tombstones: usize,
    /// Entries in the shard: inserted, less removed and evicted.
    len: usize,
    /// The most entries the sketch is ever sized for: the capacity, as if every weight were 1.
    sketch_max: usize,
    /// The shard outgrew the sketch: inserts are no longer counted in it, and it is replaced
    /// before it is next used (see [`resize_sketch`](Self::resize_sketch)).
    sketch_stale: bool,
}

/// The number of entries a new shard's sketch is sized for (if its capacity allows as many).
const SKETCH_START: usize = 64;

/// The share of main (capacity minus window) kept for protected entries.
const PROTECTED_SHARE: f64 = 0.8;

impl Policy {
    pub(crate) fn new(capacity: u64, seed: u64) -> Self {
        // The most entries the capacity allows (all of weight 1), as far as the sketch cares.
        let entries = usize::try_from(capacity.min(1 << 24)).unwrap_or(1 << 24);
        Policy {
            queues: Default::default(),
            weights: [0; 3],
            capacity,
            window_target: (capacity as f64 * 0.01).max(1.0),
            sketch: Sketch::new(entries.min(SKETCH_START)),
            climber: Climber {
                sample_start: 0,
                misses: 0,
                prev_hit_rate: 0.0,
                step: CLIMB_STEP * capacity as f64,
            },
            rng: crate::rng::Rng::new(seed),
            tombstones: 0,
            len: 0,
            sketch_max: entries,
            sketch_stale: false,
        }
    }

    /// The frequency sketch (for memory tests).
    #[cfg(test)]
    pub(crate) fn sketch(&self) -> &Sketch {
        &self.sketch
    }

    /// The current window target, in weight units.
    #[cfg(test)]
    pub(crate) fn window_target(&self) -> u64 {
        self.window_target as u64
    }

    /// A new key entered the cache at `slot`. `accesses` is the shard's approximate access count,
    /// used to end the climber's samples. `hash_of` recomputes an entry's hash (to resize the
    /// sketch).
    pub(crate) fn on_insert<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        slot: u32,
        hash: u64,
        accesses: u64,
        mut hash_of: impl FnMut(&E) -> u64,
    ) {
        self.len += 1;
        if self.len > self.sketch.entries() && self.sketch.entries() < self.sketch_max {
            self.sketch_stale = true;
        }
        if !self.sketch_stale {
            self.sketch.add(hash, 1);
        } else if self.len > self.sketch_max / 2 {
            // Its final size is due: resize now (it counts the new entry) rather than all at once
            // at the first eviction.
            self.resize_sketch(slab, &mut hash_of);
        }
        self.push(slab, WINDOW, slot, Place::Window);
        self.climber.misses += 1;
        self.climb(accesses);
    }

    /// Replaces the outgrown sketch by one sized for the entries present (`sketch_max` halved
    /// while that still holds them; never smaller than now) that counts each of them once: if
    /// none left the shard since it was empty, the very sketch a shard sized that large from the
    /// start would have.
    #[cold]
    fn resize_sketch<E: Tracked>(
        &mut self,
        slab: &[Option<E>],
        hash_of: &mut impl FnMut(&E) -> u64,
    ) {
        let mut entries = self.sketch_max;
        while entries / 2 >= self.len.max(self.sketch.entries()) {
            entries /= 2;
        }
        self.sketch = Sketch::new(entries);
        for e in slab.iter().flatten() {
            self.sketch.add(hash_of(e), 1);
        }
        self.sketch_stale = false;
    }

    /// An entry's weight changed in place (its value was replaced).
    pub(crate) fn on_reweigh(&mut self, place: Place, old: u32, new: u32) {
        let w = &mut self.weights[place.queue()];
        *w = *w - u64::from(old) + u64::from(new);
    }

    /// An entry was removed by a caller (not chosen by the policy); its queue position stays
    /// behind as a tombstone. Returns true when the caller should call
    /// [`purge_tombstones`](Self::purge_tombstones).
    pub(crate) fn on_remove(&mut self, place: Place, weight: u32) -> bool {
        self.on_reweigh(place, weight, 0);
        self.len -= 1;
        self.tombstones += 1;
        let queued: usize = self.queues.iter().map(VecDeque::len).sum();
        self.tombstones > 64 && self.tombstones > queued / 2
    }

    /// Drops tombstones from the queues; the slots they held go to `free`.
    pub(crate) fn purge_tombstones<E>(&mut self, slab: &[Option<E>], free: &mut Vec<u32>) {
        for q in &mut self.queues {
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
        for q in &mut self.queues {
            q.clear();
        }
        self.weights = [0; 3];
        self.tombstones = 0;
        self.len = 0;
    }

    /// Pops the front of queue `q`, skipping tombstones (their slots go to `free`); the entry's
    /// weight leaves the queue's.
    fn pop<E: Tracked>(
        &mut self,
        q: usize,
        slab: &[Option<E>],
        free: &mut Vec<u32>,
    ) -> Option<u32> {
        while let Some(s) = self.queues[q].pop_front() {
            if let Some(e) = &slab[s as usize] {
                self.weights[q] -= u64::from(e.weight());
                return Some(s);
            }
            self.tombstones = self.tombstones.saturating_sub(1);
            free.push(s);
        }
        None
    }

    /// Appends `slot` to queue `q` in place `p`.
    fn push<E: Tracked>(&mut self, slab: &mut [Option<E>], q: usize, slot: u32, p: Place) {
        let e = slab[slot as usize].as_mut().expect("queued slots are live");
        e.set_place(p);
        self.weights[q] += u64::from(e.weight());
        self.queues[q].push_back(slot);
    }

    /// Folds an entry's recent hits into the sketch; returns them.
    fn take_hits<E: Tracked>(&mut self, e: &E, hash_of: &mut impl FnMut(&E) -> u64) -> u8 {
        let h = e.hits().swap(0, Ordering::Relaxed);
        if h > 0 {
            self.sketch.add(hash_of(e), h);
        }
        h
    }

    fn main_weight(&self) -> u64 {
        self.weights[PROBATION] + self.weights[PROTECTED]
    }

    /// Chooses and dequeues the next victim. The caller removes it from the shard. `hash_of`
    /// recomputes an entry's hash. Returns `None` only when the shard is empty.
    pub(crate) fn evict<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        mut hash_of: impl FnMut(&E) -> u64,
    ) -> Option<u32> {
        if self.sketch_stale {
            self.resize_sketch(slab, &mut hash_of);
        }
        let victim = self.choose_victim(slab, free, hash_of);
        if victim.is_some() {
            self.len -= 1;
        }
        victim
    }

    fn choose_victim<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        mut hash_of: impl FnMut(&E) -> u64,
    ) -> Option<u32> {
        while self.weights[WINDOW] as f64 > self.window_target || self.main_weight() == 0 {
            let Some(c) = self.pop(WINDOW, slab, free) else {
                break;
            };
            let e = slab[c as usize].as_ref().expect("popped a live slot");
            let w = u64::from(e.weight());
            let accessed = self.take_hits(e, &mut hash_of) > 0;
            if accessed {
                self.push(slab, PROTECTED, c, Place::Protected0);
                continue;
            }
            let room = self.capacity as f64 - self.window_target - self.main_weight() as f64;
            if w as f64 <= room {
                self.push(slab, PROBATION, c, Place::Probation);
                continue;
            }
            // The duel: the candidate against main's next victim.
            let Some((v, vh)) = self.main_victim(slab, free, &mut hash_of) else {
                return Some(c);
            };
            let ch = hash_of(slab[c as usize].as_ref().expect("candidate is live"));
            if self.admit(self.sketch.frequency(ch), self.sketch.frequency(vh)) {
                self.push(slab, PROBATION, c, Place::Probation);
                return Some(v);
            }
            // The victim keeps its place at the front of probation.
            let e = slab[v as usize].as_mut().expect("victim is live");
            e.set_place(Place::Probation);
            self.weights[PROBATION] += u64::from(e.weight());
            self.queues[PROBATION].push_front(v);
            return Some(c);
        }
        self.main_victim(slab, free, &mut hash_of).map(|(s, _)| s)
    }

    /// The next victim of main: the oldest probation entry that was not read since it was last
    /// looked at. Probation entries that were read move to protected; protected keeps within
    /// its share by demoting (CLOCK) to probation. Dequeues the victim; returns it with its hash.
    fn main_victim<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        hash_of: &mut impl FnMut(&E) -> u64,
    ) -> Option<(u32, u64)> {
        loop {
            let protected_target = PROTECTED_SHARE * (self.capacity as f64 - self.window_target);
            while self.weights[PROTECTED] as f64 > protected_target
                && self.demote(slab, free, hash_of)
            {}
            let Some(s) = self.pop(PROBATION, slab, free) else {
                if self.demote(slab, free, hash_of) {
                    continue;
                }
                return None;
            };
            let e = slab[s as usize].as_ref().expect("popped a live slot");
            let hits = self.take_hits(e, hash_of);
            if hits > 0 {
                self.push(slab, PROTECTED, s, Place::protected(hits - 1));
                continue;
            }
            let h = hash_of(e);
            return Some((s, h));
        }
    }

    /// Runs protected's CLOCK hand until an entry without credit comes up and moves it to the
    /// back of probation. Returns false when protected is empty.
    fn demote<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        hash_of: &mut impl FnMut(&E) -> u64,
    ) -> bool {
        loop {
            let Some(s) = self.pop(PROTECTED, slab, free) else {
                return false;
            };
            let e = slab[s as usize].as_ref().expect("popped a live slot");
            let credit = (e.place().credit() + self.take_hits(e, hash_of)).min(3);
            if credit > 0 {
                self.push(slab, PROTECTED, s, Place::protected(credit - 1));
                continue;
            }
            self.push(slab, PROBATION, s, Place::Probation);
            return true;
        }
    }

    fn admit(&mut self, candidate: u8, victim: u8) -> bool {
        if candidate > victim {
            return true;
        }
        if candidate < 6 {
            return false;
        }
        self.rng.next_u64() & 127 == 0
    }

    /// Ends a climber sample when enough accesses were seen, and moves the window target.
    fn climb(&mut self, accesses: u64) {
        let c = &mut self.climber;
        let seen = accesses.saturating_sub(c.sample_start);
        let cap10 = self.capacity.saturating_mul(10);
        let sample = cap10.min(self.capacity.max(MAX_SAMPLE)).max(256);
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

    #[cfg(any(test, feature = "testing"))]
    /// Checks the policy's bookkeeping against the slab (panics on a violation).
    pub(crate) fn validate<E: Tracked>(&self, slab: &[Option<E>]) {
        let mut live = 0usize;
        for (q, queue) in self.queues.iter().enumerate() {
            let mut w = 0u64;
            for &s in queue {
                if let Some(e) = &slab[s as usize] {
                    assert_eq!(e.place().queue(), q, "entry in the queue of its place");
                    w += u64::from(e.weight());
                    live += 1;
                }
            }
            assert_eq!(w, self.weights[q], "weight of queue {q}");
        }
        assert_eq!(
            live,
            slab.iter().filter(|e| e.is_some()).count(),
            "every entry queued once"
        );
        assert_eq!(live, self.len, "entries counted");
        assert!(
            self.sketch_stale || self.sketch.entries() >= self.len.min(self.sketch_max),
            "a sketch in use is sized for the entries present"
        );
        assert!(
            self.sketch.entries() <= self.sketch_max,
            "the sketch is sized within the capacity"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E {
        key: u64,
        place: Place,
        hits: AtomicU8,
    }

    impl Tracked for E {
        fn place(&self) -> Place {
            self.place
        }
        fn set_place(&mut self, p: Place) {
            self.place = p;
        }
        fn hits(&self) -> &AtomicU8 {
            &self.hits
        }
        fn weight(&self) -> u32 {
            1
        }
    }

    fn hash(k: u64) -> u64 {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
    }

    /// A unit-weight, single-threaded cache around the policy; returns (hit ratio, window).
    fn simulate(capacity: u64, trace: impl Iterator<Item = u64>) -> (f64, u64) {
        let mut p = Policy::new(capacity, 42);
        let mut slab: Vec<Option<E>> = Vec::new();
        let mut slot_of = std::collections::HashMap::new();
        let mut free = Vec::new();
        let (mut hits, mut n) = (0u64, 0u64);
        for k in trace {
            n += 1;
            if let Some(&s) = slot_of.get(&k) {
                record_hit(&slab[s as usize].as_ref().expect("live").hits);
                hits += 1;
                continue;
            }
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
            };
            let s = match free.pop() {
                Some(s) => {
                    slab[s as usize] = Some(e);
                    s
                }
                None => {
                    slab.push(Some(e));
                    (slab.len() - 1) as u32
                }
            };
            slot_of.insert(k, s);
            p.on_insert(&mut slab, s, hash(k), n, |e| hash(e.key));
            if slot_of.len() as u64 > capacity {
                let v = p
                    .evict(&mut slab, &mut free, |e| hash(e.key))
                    .expect("a victim");
                let e = slab[v as usize].take().expect("victim is live");
                slot_of.remove(&e.key);
                free.push(v);
            }
            if n % 1024 == 0 {
                p.validate(&slab);
            }
        }
        (hits as f64 / n as f64, p.window_target())
    }

    /// Inserts keys `0..n` (unit weights) without evicting; returns the slab.
    fn fill(p: &mut Policy, n: u64) -> Vec<Option<E>> {
        let mut slab = Vec::new();
        for k in 0..n {
            slab.push(Some(E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
            }));
            p.on_insert(&mut slab, k as u32, hash(k), k, |e| hash(e.key));
        }
        p.validate(&slab);
        slab
    }

    /// Evicts one entry from `slab`.
    fn evict_one(p: &mut Policy, slab: &mut [Option<E>]) {
        let v = p
            .evict(slab, &mut Vec::new(), |e| hash(e.key))
            .expect("a victim");
        slab[v as usize] = None;
        p.validate(slab);
    }

    #[test]
    fn the_sketch_is_sized_by_the_entries_present_not_the_capacity() {
        // A byte-bounded shard: a capacity of 2^30 weight units, but only 1,000 entries. The
        // sketch is not even resized until the policy needs it, at the first eviction.
        let mut p = Policy::new(1 << 30, 1);
        let mut slab = fill(&mut p, 1000);
        assert_eq!(p.sketch().heap_bytes(), Sketch::new(64).heap_bytes());
        evict_one(&mut p, &mut slab);
        let bytes = p.sketch().heap_bytes();
        assert!(
            bytes <= 8 << 10,
            "a sketch of {bytes} bytes for 1,000 entries"
        );
        assert_eq!(p.sketch().entries(), 1024);
    }

    #[test]
    fn a_full_entry_bounded_shard_has_the_sketch_sized_for_its_share() {
        // Grown on the way, the sketch of a shard filled to its share (and evicting) is the one
        // sized for the share up front, counter for counter: same size, sample and counts.
        for share in [1u64, 7, 64, 65, 100, 1000, 1025, 12_345, 100_000] {
            let mut p = Policy::new(share, 1);
            let mut slab = fill(&mut p, share);
            let mut up_front = Sketch::new(share as usize);
            for k in 0..share {
                up_front.add(hash(k), 1);
            }
            assert_eq!(
                p.sketch().heap_bytes(),
                up_front.heap_bytes(),
                "share {share}"
            );
            assert_eq!(p.sketch().sample(), up_front.sample(), "share {share}");
            assert!(*p.sketch() == up_front, "share {share}: same counters");
            evict_one(&mut p, &mut slab);
            assert!(*p.sketch() == up_front, "share {share}: evicting keeps it");
        }
    }

    #[test]
    fn the_sketch_never_outgrows_the_capacity() {
        // A shard may hold more than its share (the cache bounds the total, not each shard).
        let mut p = Policy::new(1000, 1);
        let mut slab = fill(&mut p, 5000);
        evict_one(&mut p, &mut slab);
        assert_eq!(p.sketch().entries(), 1000);
    }

    #[test]
    fn an_outgrown_sketch_is_resized_before_it_is_used() {
        // A shard of 1,000,000 weight units whose entries weigh 100: it evicts from the
        // 10,001st insert on, its sketch resized then for 15,625 entries (10^6 / 64).
        let mut p = Policy::new(1_000_000, 1);
        let mut slab: Vec<Option<E>> = Vec::new();
        let mut free = Vec::new();
        let mut weight = 0u64;
        for k in 0..50_000u64 {
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
            };
            let s = match free.pop() {
                Some(s) => {
                    slab[s as usize] = Some(e);
                    s
                }
                None => {
                    slab.push(Some(e));
                    (slab.len() - 1) as u32
                }
            };
            p.on_insert(&mut slab, s, hash(k), k, |e| hash(e.key));
            weight += 100;
            while weight > 10_000 * 100 {
                let v = p
                    .evict(&mut slab, &mut free, |e| hash(e.key))
                    .expect("a victim");
                slab[v as usize] = None;
                free.push(v);
                weight -= 100;
            }
            if k % 1000 == 999 {
                p.validate(&slab);
            }
        }
        assert_eq!(p.sketch().entries(), 15_625);
    }

    #[test]
    fn a_loop_larger_than_the_cache_keeps_a_stable_set() {
        // LRU gets 0 % here; a frequency filter keeps most of the cache resident.
        let (ratio, window) = simulate(1000, (0..200_000u64).map(|i| i % 1200));
        assert!(ratio > 0.6, "loop hit ratio {ratio:.3}");
        assert!(window < 300, "window {window} should stay small on a loop");
    }

    #[test]
    fn the_window_grows_when_recency_pays() {
        // Half the requests are new keys, half re-read a key among the 300 newest: the frequency
        // filter rejects such keys, and each step of window growth catches more reuse.
        let mut x = 7u64;
        let trace = (0..400_000u64).map(move |i| {
            x = crate::rng::step(x);
            if i % 2 == 0 {
                i / 2
            } else {
                (i / 2).saturating_sub(x % 300)
            }
        });
        let (ratio, window) = simulate(1000, trace);
        assert!(window >= 150, "window {window} did not grow");
        assert!(ratio > 0.3, "recency hit ratio {ratio:.3}");
    }

    #[test]
    fn a_scan_does_not_flush_a_hot_set() {
        // 100 hot keys, read constantly, while a scan of a million cold keys passes through.
        let trace = (0..1_000_000u64).map(|i| if i % 2 == 0 { i % 200 / 2 } else { 1_000 + i });
        let (ratio, _) = simulate(500, trace);
        assert!(ratio > 0.49, "the hot half must keep hitting: {ratio:.3}");
    }

    #[test]
    fn inflated_incumbents_cannot_lock_out_a_hot_key() {
        // An attacker keeps 120 keys at maximal frequency (more than fit) while a scan of cold
        // keys streams through; a genuinely hot key must still be admitted and keep hitting.
        const HOT: u64 = u64::MAX;
        let trace = (0..300_000u64).map(|i| match i % 4 {
            0 | 1 => i / 4 % 120,
            2 => HOT,
            _ => 1_000_000 + i,
        });
        let mut hot_hits = 0u64;
        let mut hot_reqs = 0u64;
        let mut p = Policy::new(100, 9);
        let mut slab: Vec<Option<E>> = Vec::new();
        let mut slot_of = std::collections::HashMap::new();
        let mut free = Vec::new();
        for (n, k) in trace.enumerate() {
            if k == HOT {
                hot_reqs += 1;
            }
            if let Some(&s) = slot_of.get(&k) {
                record_hit(&slab[s as usize].as_ref().expect("live").hits);
                hot_hits += u64::from(k == HOT);
                continue;
            }
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
            };
            let s = free.pop().unwrap_or(slab.len() as u32);
            if s as usize == slab.len() {
                slab.push(Some(e));
            } else {
                slab[s as usize] = Some(e);
            }
            slot_of.insert(k, s);
            p.on_insert(&mut slab, s, hash(k), n as u64, |e| hash(e.key));
            if slot_of.len() > 100 {
                let v = p
                    .evict(&mut slab, &mut free, |e| hash(e.key))
                    .expect("a victim");
                slot_of.remove(&slab[v as usize].take().expect("live").key);
                free.push(v);
            }
        }
        let ratio = hot_hits as f64 / hot_reqs as f64;
        assert!(ratio > 0.95, "the hot key hit only {ratio:.3} of the time");
    }
}
