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
//! * The **configuration** — the window's share of the capacity and the admission rule — is
//!   chosen for the whole cache by miniature simulation (see the `select` module) among
//!   [`Config::CANDIDATES`]; the cache hands it to each shard's policy as a *tune word*
//!   ([`tune_word`]) before it evicts, and the policy applies a change at once
//!   ([`Policy::retune`]). Admission rule `t`: a candidate must be strictly more frequent than the
//!   victim(s); rule `g`: the same, *or* the candidate is in the [`Ghost`] of recently evicted
//!   keys. The ghost is kept under both rules, so a switch takes effect at once.
//! * **Exact LRU** ([`EvictionPolicy::lru`](crate::EvictionPolicy::lru), tune word candidate
//!   [`LRU`]): the queues, the sketch and the ghost are unused; every entry sits in the window's
//!   weight and the [`Recency`] order picks the least recently used as the victim, with no
//!   admission test. A hit also calls [`Policy::touch`], which does nothing otherwise.
//! * **Weighted admission:** a candidate heavier than the victim is weighed against the
//!   combined frequency of all the victims that would make room for it, before any of them is
//!   evicted; a rejected candidate costs no incumbent its place.

use crate::ghost::Ghost;
use crate::recency::Recency;
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

/// Implements [`Tracked`] for a type with fields `place: Place`, `hits: AtomicU8` and
/// `weight: u32`, given as the type followed by its type parameters:
/// `impl_tracked!(Record<K, V, T>, K, V, T)`.
macro_rules! impl_tracked {
    ($t:ty $(, $g:ident)*) => {
        impl<$($g),*> $crate::policy::Tracked for $t {
            fn place(&self) -> $crate::policy::Place {
                self.place
            }
            fn set_place(&mut self, p: $crate::policy::Place) {
                self.place = p;
            }
            fn hits(&self) -> &std::sync::atomic::AtomicU8 {
                &self.hits
            }
            fn weight(&self) -> u32 {
                self.weight
            }
        }
    };
}
pub(crate) use impl_tracked;

/// Records a hit: the only thing a read does to the policy. Lossy under races, by design.
///
/// Returns whether the entry is ordered by exact LRU (its counter holds [`LRU_MARK`]): then the
/// caller also calls [`Policy::touch`]. Testing the counter already loaded costs the default
/// policy's hit nothing but a compare on saturated entries.
#[inline]
#[must_use]
pub(crate) fn record_hit(hits: &AtomicU8) -> bool {
    let h = hits.load(Ordering::Relaxed);
    if h < 15 {
        hits.store(h + 1, Ordering::Relaxed);
        false
    } else {
        h == LRU_MARK
    }
}

/// The `hits` counter of every entry under exact LRU (never reached by counting, which stops
/// at 15): [`record_hit`] leaves it alone and asks for [`Policy::touch`] instead.
pub(crate) const LRU_MARK: u8 = 0x80;

/// A configuration of the policy: the window's share of the capacity (0.0..=1.0) and the
/// admission rule (`ghost`: rule `g`, else `t`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Config {
    pub(crate) window: f64,
    pub(crate) ghost: bool,
}

impl Config {
    /// The configurations the cache chooses among: window 0 % + `t`, 1 % + `g`, 20 % + `g`,
    /// 80 % + `g`. The first is where every cache starts.
    pub(crate) const CANDIDATES: [Config; 4] = [
        Config {
            window: 0.0,
            ghost: false,
        },
        Config {
            window: 0.01,
            ghost: true,
        },
        Config {
            window: 0.20,
            ghost: true,
        },
        Config {
            window: 0.80,
            ghost: true,
        },
    ];
}

/// The candidate index that names exact LRU ([`EvictionPolicy::lru`](crate::EvictionPolicy::lru))
/// in a tune word: not a candidate the selector chooses; a cache built with it keeps it, and its
/// policy orders every entry by last access (see [`Recency`]) instead of its queues.
pub(crate) const LRU: usize = 0xff;

/// The word the cache hands to each shard's policy: the chosen candidate (bits 0..8) and the
/// number of convergence actions asked for so far (bits 8..).
pub(crate) fn tune_word(candidate: usize, actions: u64) -> u64 {
    (candidate as u64 & 0xff) | (actions << 8)
}

/// The policy state of one shard.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    /// Window, probation and protected queues of slab indices, and their weights.
    queues: [VecDeque<u32>; 3],
    weights: [u64; 3],
    /// The shard's nominal capacity (its share of the cache's).
    capacity: u64,
    window_target: f64,
    config: Config,
    /// The tune word last applied (see [`tune_word`]).
    tune: u64,
    sketch: Sketch,
    /// Recently evicted keys, for admission rule `g`.
    ghost: Ghost,
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
    /// Exact LRU order, when the tune word names [`LRU`]: then every entry is in place
    /// `Window` (its weight in the window's), and the queues, the sketch and the ghost are
    /// unused.
    lru: Option<Box<Recency>>,
    /// Evictions so far (wrapping), to trim the queues now and then.
    evictions: u32,
    /// The victims of one duel (kept between evictions so that an eviction allocates nothing).
    victims: Vec<(u32, u64)>,
}

/// The number of entries a new shard's sketch is sized for (if its capacity allows as many).
const SKETCH_START: usize = 64;

/// [`Policy::trim_queues`] runs every this many evictions.
const TRIM_EVERY: u32 = 1024;
/// Spare queue slots never trimmed.
const TRIM_SLACK: usize = 1024;

/// The share of main (capacity minus window) kept for protected entries.
const PROTECTED_SHARE: f64 = 0.8;

impl Policy {
    /// A policy for `capacity` weight units in the configuration [`tune_word`] `tune` names.
    pub(crate) fn new(capacity: u64, seed: u64, tune: u64) -> Self {
        // The most entries the capacity allows (all of weight 1), as far as the sketch cares.
        let entries = usize::try_from(capacity.min(1 << 24)).unwrap_or(1 << 24);
        let config = Config::CANDIDATES[(tune & 0xff) as usize % Config::CANDIDATES.len()];
        Policy {
            queues: Default::default(),
            weights: [0; 3],
            capacity,
            window_target: config.window * capacity as f64,
            config,
            tune,
            sketch: Sketch::new(entries.min(SKETCH_START)),
            ghost: Ghost::new(entries.min(SKETCH_START)),
            rng: crate::rng::Rng::new(seed),
            tombstones: 0,
            evictions: 0,
            len: 0,
            sketch_max: entries,
            sketch_stale: false,
            victims: Vec::new(),
            lru: (tune & 0xff == LRU as u64).then(Box::default),
        }
    }

    /// An access to the entry in `slot` that hit (a read, or a replacement of its value), when
    /// [`record_hit`] says the entry is under exact LRU: records it in the order.
    #[cold]
    pub(crate) fn touch(&self, slot: u32) {
        if let Some(r) = &self.lru {
            r.touch(slot);
        }
    }

    /// The exact LRU order's heap memory, in bytes (0 in the default policy).
    #[cfg(test)]
    pub(crate) fn recency_bytes(&self) -> usize {
        self.lru.as_ref().map_or(0, |r| r.heap_bytes())
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

    /// The ghost (for memory tests).
    #[cfg(test)]
    pub(crate) fn ghost(&self) -> &Ghost {
        &self.ghost
    }

    /// The weight in the window, probation and protected queues.
    #[cfg(test)]
    pub(crate) fn weights(&self) -> [u64; 3] {
        self.weights
    }

    /// Applies the tune word `tune` (see [`tune_word`]) if it differs from the last one: a new
    /// configuration takes effect at once (a window that must shrink hands its excess to the
    /// front of probation, untested; one that may grow takes it from main lazily, as main's
    /// coldest entries are evicted); a new convergence action clears the ghost, reranks main
    /// by frequency and reverses probation's order. O(main) on an action, O(window excess) on a
    /// switch, nothing otherwise.
    #[inline]
    /// The tune word last applied.
    #[cfg(test)]
    pub(crate) fn tune(&self) -> u64 {
        self.tune
    }

    pub(crate) fn retune<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        tune: u64,
        hash_of: impl FnMut(&E) -> u64,
    ) {
        if tune != self.tune && self.lru.is_none() {
            self.apply_tune(slab, free, tune, hash_of);
        }
    }

    #[cold]
    fn apply_tune<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        tune: u64,
        mut hash_of: impl FnMut(&E) -> u64,
    ) {
        let old = std::mem::replace(&mut self.tune, tune);
        if (old ^ tune) & 0xff != 0 {
            self.config = Config::CANDIDATES[(tune & 0xff) as usize % Config::CANDIDATES.len()];
            self.window_target = self.config.window * self.capacity as f64;
            let mut excess = Vec::new();
            while self.weights[WINDOW] as f64 > self.window_target {
                let Some(s) = self.pop(WINDOW, slab, free) else {
                    break;
                };
                excess.push(s);
            }
            for &s in excess.iter().rev() {
                let e = slab[s as usize].as_mut().expect("popped a live slot");
                e.set_place(Place::Probation);
                self.weights[PROBATION] += u64::from(e.weight());
                self.queues[PROBATION].push_front(s);
            }
        }
        if old >> 8 != tune >> 8 {
            let restart = crate::select::is_restart(tune >> 8);
            self.converge(slab, free, restart, &mut hash_of);
        }
    }

    /// The convergence action: clears the ghost, reranks main (protected := the main entries
    /// with the highest frequency, up to protected's share; the rest probation; queue order
    /// kept within each) and reverses probation's order. A `restart` (see the `select`
    /// module) clears the sketch too and puts all of main in probation (protected's share
    /// then 0 for the rerank), newest first.
    #[cold]
    fn converge<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        restart: bool,
        hash_of: &mut impl FnMut(&E) -> u64,
    ) {
        // Counts first, without changing anything: `hash_of` runs the keys' `Hash`, which may
        // panic; the queues are rebuilt only once every count is known.
        let mut main =
            Vec::with_capacity(self.queues[PROTECTED].len() + self.queues[PROBATION].len());
        for q in [PROTECTED, PROBATION] {
            for &s in &self.queues[q] {
                if let Some(e) = &slab[s as usize] {
                    let f = self
                        .sketch
                        .frequency(hash_of(e))
                        .saturating_add(e.hits().load(Ordering::Relaxed))
                        .min(15);
                    main.push((s, f));
                }
            }
        }
        self.ghost.clear();
        if restart {
            self.sketch.clear();
        }
        for q in [PROTECTED, PROBATION] {
            while self.pop(q, slab, free).is_some() {}
        }
        let mut by_count = [0u64; 16];
        for &(s, f) in &main {
            by_count[f as usize] += u64::from(slab[s as usize].as_ref().expect("live").weight());
        }
        let target = if restart {
            0
        } else {
            (PROTECTED_SHARE * (self.capacity as f64 - self.window_target)).max(0.0) as u64
        };
        // The lowest count that still goes to protected; entries of exactly that count go
        // there until protected is full.
        let (mut floor, mut above) = (16usize, 0u64);
        while floor > 0 && above + by_count[floor - 1] <= target {
            floor -= 1;
            above += by_count[floor];
        }
        let mut room = target - above;
        for (s, f) in main {
            let w = u64::from(slab[s as usize].as_ref().expect("live").weight());
            let f = f as usize;
            if f >= floor || (f + 1 == floor && w <= room) {
                if f < floor {
                    room -= w;
                }
                self.push(slab, PROTECTED, s, Place::Protected0);
            } else {
                self.push(slab, PROBATION, s, Place::Probation);
            }
        }
        self.queues[PROBATION].make_contiguous().reverse();
    }

    /// A new key entered the cache at `slot`. `hash_of` recomputes an entry's hash (to resize
    /// the sketch).
    pub(crate) fn on_insert<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        slot: u32,
        hash: u64,
        mut hash_of: impl FnMut(&E) -> u64,
    ) {
        self.len += 1;
        if let Some(r) = &mut self.lru {
            r.insert(slot);
            let e = slab[slot as usize].as_mut().expect("inserted slot is live");
            e.set_place(Place::Window);
            e.hits().store(LRU_MARK, Ordering::Relaxed);
            self.weights[WINDOW] += u64::from(e.weight());
            if u64::from(e.weight()) > self.capacity {
                r.oversized(slot);
            }
            return;
        }
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
        self.ghost = Ghost::new(entries);
        for e in slab.iter().flatten() {
            self.sketch.add(hash_of(e), 1);
        }
        self.sketch_stale = false;
    }

    /// The entry in `slot` had its weight changed in place (its value was replaced).
    pub(crate) fn on_reweigh(&mut self, slot: u32, place: Place, old: u32, new: u32) {
        self.reweigh(place, old, new);
        if let Some(r) = &mut self.lru {
            if u64::from(new) > self.capacity && u64::from(old) <= self.capacity {
                r.oversized(slot);
            }
        }
    }

    fn reweigh(&mut self, place: Place, old: u32, new: u32) {
        let w = &mut self.weights[place.queue()];
        *w = *w - u64::from(old) + u64::from(new);
    }

    /// An entry was removed by a caller (not chosen by the policy); its queue position stays
    /// behind as a tombstone. Returns true when the caller should call
    /// [`purge_tombstones`](Self::purge_tombstones).
    pub(crate) fn on_remove(&mut self, place: Place, weight: u32) -> bool {
        self.reweigh(place, weight, 0);
        self.len -= 1;
        self.tombstones += 1;
        let queued: usize = match &self.lru {
            Some(r) => r.records(),
            None => self.queues.iter().map(VecDeque::len).sum(),
        };
        self.tombstones > 64 && self.tombstones > queued / 2
    }

    /// Drops tombstones from the queues; the slots they held go to `free`.
    pub(crate) fn purge_tombstones<E>(&mut self, slab: &[Option<E>], free: &mut Vec<u32>) {
        if let Some(r) = &mut self.lru {
            r.purge(|s| slab[s as usize].is_some(), free);
        }
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
        if let Some(r) = &mut self.lru {
            r.clear();
        }
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
        if let Some(r) = &mut self.lru {
            let before = free.len();
            let capacity = self.capacity;
            let victim = r.victim(
                |s| slab[s as usize].is_some(),
                |s| {
                    slab[s as usize]
                        .as_ref()
                        .is_some_and(|e| u64::from(e.weight()) > capacity)
                },
                free,
            );
            self.tombstones = self.tombstones.saturating_sub(free.len() - before);
            if let Some(s) = victim {
                let e = slab[s as usize].as_ref().expect("victim is live");
                self.weights[WINDOW] -= u64::from(e.weight());
                self.len -= 1;
            }
            return victim;
        }
        if self.sketch_stale {
            self.resize_sketch(slab, &mut hash_of);
        }
        let victim = self.choose_victim(slab, free, hash_of);
        self.evictions = self.evictions.wrapping_add(1);
        if self.evictions % TRIM_EVERY == 0 {
            self.trim_queues();
        }
        victim.map(|(s, h)| {
            self.len -= 1;
            self.ghost.insert(h);
            s
        })
    }

    /// Gives back the memory a queue no longer needs: one holding more than twice its length
    /// (plus [`TRIM_SLACK`]) is shrunk to 1.25 × its length. Entries move between queues in
    /// bulk — the window, filled while the cache filled, empties into probation at the first
    /// eviction when the window share is 0 %; a switch of configuration moves a share of the
    /// capacity — and a `VecDeque` keeps its largest capacity: 4 bytes per entry of the cache
    /// for nothing. Shrinking needs the length to have fallen by half since the queue last
    /// grew, so its O(length) cost is amortized over as many operations.
    fn trim_queues(&mut self) {
        for q in &mut self.queues {
            if q.capacity() > 2 * q.len() + TRIM_SLACK {
                q.shrink_to(q.len() + q.len() / 4);
            }
        }
    }

    /// Puts victims taken by [`main_victim`](Self::main_victim) back at the front of
    /// probation, in the order they were taken.
    fn unpop_victims<E: Tracked>(&mut self, slab: &mut [Option<E>], victims: &[(u32, u64)]) {
        for &(v, _) in victims.iter().rev() {
            let e = slab[v as usize].as_mut().expect("victim is live");
            e.set_place(Place::Probation);
            self.weights[PROBATION] += u64::from(e.weight());
            self.queues[PROBATION].push_front(v);
        }
    }

    fn choose_victim<E: Tracked>(
        &mut self,
        slab: &mut [Option<E>],
        free: &mut Vec<u32>,
        mut hash_of: impl FnMut(&E) -> u64,
    ) -> Option<(u32, u64)> {
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
            let ch = hash_of(slab[c as usize].as_ref().expect("candidate is live"));
            // The duel: the candidate against the victims that would make room for it (one,
            // unless it is heavier), all taken before any is evicted.
            let need = ceil_at_least_1(w as f64 - room.max(0.0));
            let mut victims = std::mem::take(&mut self.victims);
            victims.clear();
            let (mut freed, mut freq) = (0u64, 0u32);
            while freed < need {
                let Some((v, vh)) = self.main_victim(slab, free, &mut hash_of) else {
                    break;
                };
                freed += u64::from(slab[v as usize].as_ref().expect("victim is live").weight());
                freq += u32::from(self.sketch.frequency(vh));
                victims.push((v, vh));
            }
            let chosen = if victims.is_empty() {
                (c, ch)
            } else if freed < need {
                // Even every victim main could give would not make room: the candidate does
                // not fit in this shard's share. Turned away, it costs nobody their place
                // (admitted, it would have evicted them all, then itself).
                self.unpop_victims(slab, &victims);
                (c, ch)
            } else {
                let cf = self.sketch.frequency(ch);
                let vf = u8::try_from(freq).unwrap_or(u8::MAX);
                if (self.config.ghost && self.ghost.contains(ch)) || self.admit(cf, vf) {
                    self.push(slab, PROBATION, c, Place::Probation);
                    // The first victim goes now; the others stay first in line.
                    self.unpop_victims(slab, &victims[1..]);
                    victims[0]
                } else {
                    // The victims keep their places at the front of probation.
                    self.unpop_victims(slab, &victims);
                    (c, ch)
                }
            };
            self.victims = victims;
            return Some(chosen);
        }
        self.main_victim(slab, free, &mut hash_of)
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
        // xorshift64
        self.rng.next_u64() & 127 == 0
    }

    /// Checks the policy's bookkeeping against the slab (panics on a violation).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn validate<E: Tracked>(&self, slab: &[Option<E>]) {
        if let Some(r) = &self.lru {
            let slots = r.slots();
            let mut seen = vec![false; slab.len()];
            let (mut live, mut w) = (0usize, 0u64);
            for &s in &slots {
                assert!(!seen[s as usize], "one record per slot");
                seen[s as usize] = true;
                if let Some(e) = &slab[s as usize] {
                    assert_eq!(e.place(), Place::Window, "LRU entries are in place Window");
                    assert_eq!(
                        e.hits().load(Ordering::Relaxed),
                        LRU_MARK,
                        "LRU entries marked"
                    );
                    live += 1;
                    w += u64::from(e.weight());
                }
            }
            assert_eq!(
                live,
                slab.iter().filter(|e| e.is_some()).count(),
                "every entry has a record"
            );
            assert_eq!(live, self.len, "entries counted");
            assert_eq!(w, self.weights[WINDOW], "weight counted");
            return;
        }
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

/// `x.ceil().max(1.0)` as a whole number, for `x ≥ 0` below 2^53, without a call to `ceil`
/// (a library call where the target has no rounding instruction: on the eviction path).
#[inline]
fn ceil_at_least_1(x: f64) -> u64 {
    // Through `i64`: one instruction each way on x86-64 (`u64` takes several).
    let t = x as i64;
    (t + i64::from((t as f64) < x)).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E {
        key: u64,
        place: Place,
        hits: AtomicU8,
        weight: u32,
    }

    impl_tracked!(E);

    #[test]
    fn ceil_at_least_1_is_ceil_then_max_1() {
        let mut xs = vec![0.0, 1e-9, 0.5, 1.0, 1.0 + 1e-12, 2.0, 2.5, 1e15 + 0.5, 4e15];
        xs.extend((0..1000).map(|i| f64::from(i) * 0.37));
        for x in xs {
            assert_eq!(ceil_at_least_1(x), x.ceil().max(1.0) as u64, "{x}");
        }
    }

    fn hash(k: u64) -> u64 {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
    }

    /// A unit-weight, single-threaded cache around the policy in configuration `candidate`;
    /// returns (hit ratio, window).
    fn simulate_with(
        capacity: u64,
        candidate: usize,
        trace: impl Iterator<Item = u64>,
    ) -> (f64, u64) {
        let mut p = Policy::new(capacity, 42, tune_word(candidate, 0));
        let mut slab: Vec<Option<E>> = Vec::new();
        let mut slot_of = std::collections::HashMap::new();
        let mut free = Vec::new();
        let (mut hits, mut n) = (0u64, 0u64);
        for k in trace {
            n += 1;
            if let Some(&s) = slot_of.get(&k) {
                let _ = record_hit(&slab[s as usize].as_ref().expect("live").hits);
                hits += 1;
                continue;
            }
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
                weight: 1,
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
            p.on_insert(&mut slab, s, hash(k), |e| hash(e.key));
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

    fn simulate(capacity: u64, trace: impl Iterator<Item = u64>) -> (f64, u64) {
        simulate_with(capacity, 0, trace)
    }

    /// Inserts keys `0..n` (unit weights) without evicting; returns the slab.
    fn fill(p: &mut Policy, n: u64) -> Vec<Option<E>> {
        let mut slab = Vec::new();
        for k in 0..n {
            slab.push(Some(E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
                weight: 1,
            }));
            p.on_insert(&mut slab, k as u32, hash(k), |e| hash(e.key));
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
        let mut p = Policy::new(1 << 30, 1, 0);
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
            let mut p = Policy::new(share, 1, 0);
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
        let mut p = Policy::new(1000, 1, 0);
        let mut slab = fill(&mut p, 5000);
        evict_one(&mut p, &mut slab);
        assert_eq!(p.sketch().entries(), 1000);
    }

    #[test]
    fn an_outgrown_sketch_is_resized_before_it_is_used() {
        // A shard of 1,000,000 weight units whose entries weigh 100: it evicts from the
        // 10,001st insert on, its sketch resized then for 15,625 entries (10^6 / 64).
        let mut p = Policy::new(1_000_000, 1, 0);
        let mut slab: Vec<Option<E>> = Vec::new();
        let mut free = Vec::new();
        let mut weight = 0u64;
        for k in 0..50_000u64 {
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
                weight: 1,
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
            p.on_insert(&mut slab, s, hash(k), |e| hash(e.key));
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
    fn a_large_window_catches_recency_that_frequency_rejects() {
        // Half the requests are new keys, half re-read a key among the 300 newest: the frequency
        // filter (window 0 %) rejects such keys; an 80 % window keeps them.
        let trace = || {
            let mut x = 7u64;
            (0..200_000u64).map(move |i| {
                x = crate::rng::step(x);
                if i % 2 == 0 {
                    i / 2
                } else {
                    (i / 2).saturating_sub(x % 300)
                }
            })
        };
        let (frequency, w0) = simulate_with(1000, 0, trace());
        let (recency, w80) = simulate_with(1000, 3, trace());
        assert_eq!((w0, w80), (0, 800));
        assert!(recency > 0.4, "80 % window: {recency:.3}");
        assert!(
            recency > frequency + 0.1,
            "80 %: {recency:.3}, 0 %: {frequency:.3}"
        );
    }

    /// A weighted, single-threaded cache around the policy, with `retune` between requests.
    struct Sim {
        p: Policy,
        slab: Vec<Option<E>>,
        slot_of: std::collections::HashMap<u64, u32>,
        free: Vec<u32>,
        weight: u64,
        capacity: u64,
        evicted: Vec<u64>,
    }

    impl Sim {
        fn new(capacity: u64) -> Sim {
            Sim {
                p: Policy::new(capacity, 3, 0),
                slab: Vec::new(),
                slot_of: Default::default(),
                free: Vec::new(),
                weight: 0,
                capacity,
                evicted: Vec::new(),
            }
        }

        fn insert(&mut self, k: u64, weight: u32) {
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
                weight,
            };
            let s = match self.free.pop() {
                Some(s) => {
                    self.slab[s as usize] = Some(e);
                    s
                }
                None => {
                    self.slab.push(Some(e));
                    (self.slab.len() - 1) as u32
                }
            };
            self.slot_of.insert(k, s);
            self.weight += u64::from(weight);
            self.p
                .on_insert(&mut self.slab, s, hash(k), |e| hash(e.key));
            while self.weight > self.capacity {
                let v = self
                    .p
                    .evict(&mut self.slab, &mut self.free, |e| hash(e.key))
                    .expect("a victim");
                let e = self.slab[v as usize].take().expect("victim is live");
                self.slot_of.remove(&e.key);
                self.weight -= u64::from(e.weight);
                self.evicted.push(e.key);
                self.free.push(v);
            }
        }

        fn remove(&mut self, k: u64) {
            if let Some(s) = self.slot_of.remove(&k) {
                let e = self.slab[s as usize].take().expect("live");
                self.weight -= u64::from(e.weight);
                if self.p.on_remove(e.place, e.weight) {
                    self.p.purge_tombstones(&self.slab, &mut self.free);
                }
            }
        }

        fn read(&mut self, k: u64) -> bool {
            match self.slot_of.get(&k) {
                Some(&s) => {
                    let _ = record_hit(&self.slab[s as usize].as_ref().expect("live").hits);
                    true
                }
                None => false,
            }
        }

        fn retune(&mut self, tune: u64) {
            self.p
                .retune(&mut self.slab, &mut self.free, tune, |e| hash(e.key));
        }
    }

    #[test]
    fn a_heavy_candidate_is_judged_before_anything_is_evicted() {
        // {a 10, b 15, c 5} at capacity 31, each read a few times; d (15), never seen, must
        // not cost a and b their places before being rejected itself.
        let (a, b, c, d) = (1, 2, 3, 4);
        let mut sim = Sim::new(31);
        for (k, w) in [(a, 10), (b, 15), (c, 5)] {
            sim.insert(k, w);
        }
        for _ in 0..3 {
            for k in [a, b, c] {
                assert!(sim.read(k));
            }
        }
        sim.insert(d, 15);
        assert_eq!(sim.evicted, vec![d], "only the rejected candidate leaves");
        sim.p.validate(&sim.slab);
        // A candidate more frequent than the victims together is admitted, and only then
        // are they evicted.
        let e = 5;
        for _ in 0..15 {
            sim.p.sketch.add(hash(e), 1);
        }
        sim.evicted.clear();
        sim.insert(e, 15);
        assert!(sim.slot_of.contains_key(&e), "admitted: {:?}", sim.evicted);
        assert!(!sim.evicted.contains(&e));
        assert!(sim.weight <= 31);
        sim.p.validate(&sim.slab);
    }

    #[test]
    fn bookkeeping_stays_consistent_under_random_ops_and_switches() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = move |n: u64| {
            x = crate::rng::step(x);
            x % n
        };
        for round in 0..20 {
            let mut sim = Sim::new(50 + rnd(500));
            let mut actions = 0;
            for i in 0..5_000 {
                let k = rnd(800);
                match rnd(100) {
                    0..=59 => {
                        if !sim.read(k) {
                            let w = if round % 2 == 0 {
                                1
                            } else {
                                1 + rnd(20) as u32
                            };
                            sim.insert(k, w);
                        }
                    }
                    60..=69 => sim.remove(k),
                    70 => {
                        actions += rnd(2);
                        sim.retune(tune_word(rnd(4) as usize, actions));
                    }
                    _ => {
                        sim.read(k);
                    }
                }
                assert!(sim.weight <= sim.capacity);
                if i % 97 == 0 {
                    sim.p.validate(&sim.slab);
                    let w: u64 = sim.p.weights().iter().sum();
                    assert_eq!(w, sim.weight, "round {round} op {i}");
                }
            }
            sim.p.validate(&sim.slab);
        }
    }

    #[test]
    fn a_switch_applies_at_once_and_an_action_reranks() {
        let mut sim = Sim::new(1000);
        sim.retune(tune_word(3, 0));
        for k in 0..1000 {
            sim.insert(k, 1);
        }
        // Keys 0..100 are read often: after an action they are protected.
        for _ in 0..5 {
            for k in 0..100 {
                sim.read(k);
            }
        }
        assert_eq!(
            sim.p.weights()[WINDOW],
            1000,
            "all new keys are in the window"
        );
        sim.retune(tune_word(1, 0));
        assert!(sim.p.weights()[WINDOW] <= 10, "the window shrank at once");
        sim.retune(tune_word(1, 1));
        sim.p.validate(&sim.slab);
        for k in 0..100 {
            let s = sim.slot_of[&k];
            let place = sim.slab[s as usize].as_ref().expect("live").place;
            assert_eq!(place.queue(), PROTECTED, "key {k}");
        }
    }

    #[test]
    fn a_restart_clears_the_sketch_and_puts_main_in_probation_newest_first() {
        let mut sim = Sim::new(1000);
        sim.retune(tune_word(1, 0));
        for k in 0..2000 {
            sim.insert(k, 1);
        }
        for _ in 0..5 {
            for k in 1000..1100 {
                sim.read(k);
            }
        }
        // A rerank (odd count) fills protected with the frequent keys.
        sim.retune(tune_word(1, 1));
        assert!(sim.p.weights()[PROTECTED] >= 100);
        let main_before: Vec<u32> = sim.p.queues[PROBATION].iter().copied().collect();
        let protected_before: Vec<u32> = sim.p.queues[PROTECTED].iter().copied().collect();
        // A restart (even count): every count forgotten, protected empty, probation holding
        // what main held, reversed (protected's entries, then probation's, newest first).
        sim.retune(tune_word(1, 2));
        sim.p.validate(&sim.slab);
        assert_eq!(sim.p.weights()[PROTECTED], 0);
        assert!((0..2000).all(|k| sim.p.sketch().frequency(hash(k)) == 0));
        let mut expected: Vec<u32> = protected_before;
        expected.extend(main_before);
        expected.reverse();
        let after: Vec<u32> = sim.p.queues[PROBATION].iter().copied().collect();
        assert_eq!(after, expected);
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
        let mut p = Policy::new(100, 9, 0);
        let mut slab: Vec<Option<E>> = Vec::new();
        let mut slot_of = std::collections::HashMap::new();
        let mut free = Vec::new();
        for k in trace {
            if k == HOT {
                hot_reqs += 1;
            }
            if let Some(&s) = slot_of.get(&k) {
                let _ = record_hit(&slab[s as usize].as_ref().expect("live").hits);
                hot_hits += u64::from(k == HOT);
                continue;
            }
            let e = E {
                key: k,
                place: Place::Window,
                hits: AtomicU8::new(0),
                weight: 1,
            };
            let s = free.pop().unwrap_or(slab.len() as u32);
            if s as usize == slab.len() {
                slab.push(Some(e));
            } else {
                slab[s as usize] = Some(e);
            }
            slot_of.insert(k, s);
            p.on_insert(&mut slab, s, hash(k), |e| hash(e.key));
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
