//! A shadow cache: the eviction policy, run on key hashes alone, for miniature simulation.
//!
//! A [`Shadow`] is a small cache of *key hashes* (no keys, no values) driven by the very
//! [`Policy`] the shards use, in a fixed configuration. Fed a spatially sampled stream of the
//! real cache's accesses (the keys whose hash falls under a threshold, rate `R`), a shadow of
//! capacity `capacity × R` predicts the hit ratio the real cache would have with that
//! configuration (Waldspurger et al., "Cache Modeling and Optimization using Miniature
//! Simulations", USENIX ATC 2017; SHARDS, FAST 2015).
//!
//! # API (for the configuration selector, `select`, and for sizing curves)
//!
//! * [`Shadow::new(capacity, candidate, seed)`](Shadow::new): a shadow of `capacity` weight
//!   units running [`Config::CANDIDATES`](crate::policy::Config::CANDIDATES)`[candidate]`. A sizing curve (predicted hit ratio at
//!   0.25/0.5/1/2/4 × the capacity) is five shadows of one candidate at five capacities fed the
//!   same samples (or nested subsets of them, see `sizing`). Shadows are `Clone`.
//! * [`Shadow::access(hash, weight)`](Shadow::access): one sampled request; returns whether the
//!   shadow hit. A miss inserts the key with `weight` and evicts while over capacity, exactly as
//!   a shard does.
//! * [`Shadow::hits`] / [`Shadow::accesses`]: running totals (the caller keeps deltas).
//!
//! Cost: per entry a 16-byte slot, 11 to 21 bytes of index (8-byte entries, 3/8 to 3/4 full),
//! 4 to 8 bytes of queue and about 4 to 8 bytes of sketch and 1.5 of ghost: about 40–55 bytes
//! per shadow entry, so the selector's four shadows of 1,024 entries take about 0.2 MiB. A
//! lookup that hits is inlined into the caller's loop over its shadows, about 55 instructions
//! (a sampled request that hits in the selector's four shadows: about 250 in all, measured by
//! `bench/examples/op_count.rs` at 1,000 keys when every request was sampled); a miss inserts
//! and evicts under the policy (a few hundred), out of line. Single-threaded: the caller serialises access (the selector sits behind a
//! mutex).

use crate::policy::{tune_word, Place, Policy};
use std::sync::atomic::AtomicU8;

/// A slot of the index with no entry.
const EMPTY: u32 = u32::MAX;

/// The index of a shadow: key hash → slab slot, open addressing with linear probing, at most
/// 3/4 full, backward-shift deletion. An entry is the hash's top 32 bits (its *tag*: the low
/// ones of a sampled hash are under the sampling threshold, the top ones differ) and the slot,
/// 8 bytes; a tag that matches is confirmed against the full hash in the slab. A few
/// instructions for a lookup where a general table takes several times as many: a shadow is
/// looked up on every sampled request.
#[derive(Clone, Debug)]
struct Index {
    entries: Vec<(u32, u32)>,
    /// `64 - log2(entries.len())`.
    shift: u32,
    len: usize,
}

impl Index {
    fn new() -> Self {
        Index {
            entries: vec![(0, EMPTY); 16],
            shift: 64 - 4,
            len: 0,
        }
    }

    #[inline]
    fn tag(hash: u64) -> u32 {
        (hash >> 32) as u32
    }

    #[inline]
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    #[inline]
    fn home(&self, tag: u32) -> usize {
        // Fibonacci hashing: the top bits of the product mix all of the tag.
        (u64::from(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The position of the entry of tag `hash`'s for which `is(slot)` holds, if any.
    #[inline]
    fn position(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<usize> {
        let tag = Self::tag(hash);
        let mut i = self.home(tag);
        loop {
            let (t, s) = self.entries[i];
            if s == EMPTY {
                return None;
            }
            if t == tag && is(s) {
                return Some(i);
            }
            i = (i + 1) & self.mask();
        }
    }

    /// The slot of `hash`: `is(slot)` confirms that the slot holds it.
    #[inline]
    fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        self.position(hash, is).map(|i| self.entries[i].1)
    }

    /// Adds `hash` (not present) at `slot`.
    fn insert(&mut self, hash: u64, slot: u32) {
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.grow();
        }
        self.put(Self::tag(hash), slot);
    }

    fn put(&mut self, tag: u32, slot: u32) {
        let mut i = self.home(tag);
        while self.entries[i].1 != EMPTY {
            i = (i + 1) & self.mask();
        }
        self.entries[i] = (tag, slot);
        self.len += 1;
    }

    #[cold]
    fn grow(&mut self) {
        let bigger = vec![(0, EMPTY); self.entries.len() * 2];
        let old = std::mem::replace(&mut self.entries, bigger);
        self.shift -= 1;
        self.len = 0;
        for (t, s) in old {
            if s != EMPTY {
                self.put(t, s);
            }
        }
    }

    /// Removes the entry of `hash` at `slot`; returns whether there was one.
    fn remove(&mut self, hash: u64, slot: u32) -> bool {
        let Some(mut hole) = self.position(hash, |s| s == slot) else {
            return false;
        };
        self.len -= 1;
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let (t, s) = self.entries[j];
            if s == EMPTY {
                break;
            }
            // The entry at `j` may move back into the hole unless its home lies cyclically
            // in (hole, j].
            let home = self.home(t);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.entries[hole] = (t, s);
                hole = j;
            }
        }
        self.entries[hole] = (0, EMPTY);
        true
    }
}

/// An entry of a shadow: the key's hash and what the policy keeps.
#[derive(Debug)]
struct Node {
    hash: u64,
    weight: u32,
    place: Place,
    hits: AtomicU8,
}

crate::policy::impl_tracked!(Node);

impl Clone for Node {
    fn clone(&self) -> Self {
        Node {
            hash: self.hash,
            weight: self.weight,
            place: self.place,
            hits: AtomicU8::new(self.hits.load(std::sync::atomic::Ordering::Relaxed)),
        }
    }
}

/// A cache of key hashes under the shards' policy, in one fixed configuration.
#[derive(Clone, Debug)]
pub(crate) struct Shadow {
    policy: Policy,
    slab: Vec<Option<Node>>,
    free: Vec<u32>,
    table: Index,
    capacity: u64,
    /// The most entries it holds, whatever their weights (see
    /// [`with_max_entries`](Self::with_max_entries)).
    max_entries: usize,
    weight: u64,
    hits: u64,
    accesses: u64,
}

impl Shadow {
    /// A shadow of `capacity` weight units running `Config::CANDIDATES[candidate]`.
    pub(crate) fn new(capacity: u64, candidate: usize, seed: u64) -> Self {
        Shadow {
            policy: Policy::new(capacity, seed, tune_word(candidate, 0)),
            slab: Vec::new(),
            free: Vec::new(),
            table: Index::new(),
            capacity,
            max_entries: usize::MAX,
            weight: 0,
            hits: 0,
            accesses: 0,
        }
    }

    /// This shadow holding at most `n` entries (at least 1): past it, it evicts as it does
    /// past its capacity. Bounds a weighted shadow's memory whatever the weights: entries of
    /// weight 0 (which count toward no capacity) or far lighter than the mean its rate was
    /// set for.
    pub(crate) fn with_max_entries(mut self, n: u64) -> Self {
        self.max_entries = usize::try_from(n.max(1)).unwrap_or(usize::MAX);
        self
    }

    /// One request for the key of hash `hash`; on a miss the key is inserted with `weight`
    /// (a key heavier than the capacity is not). Returns whether it hit.
    #[inline]
    pub(crate) fn access(&mut self, hash: u64, weight: u32) -> bool {
        self.accesses += 1;
        let slab = &self.slab;
        let holds = |s: u32| slab[s as usize].as_ref().is_some_and(|n| n.hash == hash);
        if let Some(s) = self.table.find(hash, holds) {
            if let Some(n) = &self.slab[s as usize] {
                if crate::policy::record_hit(&n.hits) {
                    self.policy.touch(s);
                }
            }
            self.hits += 1;
            return true;
        }
        self.miss(hash, weight);
        false
    }

    /// A write of the key with `weight` (a weighted cache's sampled insert): a key held takes
    /// the new weight, as the real cache's entry does when its value is replaced, evicting
    /// while over capacity, or is removed if it is heavier than the whole shadow (the real
    /// cache turns such a write away and drops the old value); a key not held is inserted
    /// (a miss). Round 97: the write counted as an access kept the old weight, and a shadow
    /// whose keys grew heavier on overwrites predicted that a cache of the size would hold
    /// them all (99.7 % against a replay's 83.3 %). Returns whether the key was held.
    pub(crate) fn write(&mut self, hash: u64, weight: u32) -> bool {
        let slab = &self.slab;
        let holds = |s: u32| slab[s as usize].as_ref().is_some_and(|n| n.hash == hash);
        let Some(s) = self.table.find(hash, holds) else {
            self.accesses += 1;
            self.miss(hash, weight);
            return false;
        };
        self.accesses += 1;
        self.hits += 1;
        let n = self.slab[s as usize].as_mut().expect("found slot is live");
        let (place, old) = (n.place, std::mem::replace(&mut n.weight, weight));
        if u64::from(weight) > self.capacity {
            self.slab[s as usize] = None;
            let removed = self.table.remove(hash, s);
            debug_assert!(removed, "held key is in the table");
            self.weight -= u64::from(old);
            if self.policy.on_remove(place, old) {
                self.policy.purge_tombstones(&self.slab, &mut self.free);
            }
            return true;
        }
        if crate::policy::record_hit(&n.hits) {
            self.policy.touch(s);
        }
        if old != weight {
            self.policy.on_reweigh(s, place, old, weight);
            self.weight = self.weight - u64::from(old) + u64::from(weight);
            self.shrink();
        }
        true
    }

    /// A miss: inserts the key with `weight` and evicts while over capacity. Out of line, so
    /// that a hit (the common case, inlined into the caller's loop over its shadows) does not
    /// pay for the registers the insert needs.
    #[inline(never)]
    fn miss(&mut self, hash: u64, weight: u32) {
        if u64::from(weight) > self.capacity {
            return;
        }
        let node = Node {
            hash,
            weight,
            place: Place::Window,
            hits: AtomicU8::new(0),
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(node);
                s
            }
            None => {
                self.slab.push(Some(node));
                (self.slab.len() - 1) as u32
            }
        };
        self.table.insert(hash, slot);
        self.weight += u64::from(weight);
        self.policy
            .on_insert(&mut self.slab, slot, hash, |n: &Node| n.hash);
        self.shrink();
    }

    /// Evicts while over capacity (or over the most entries).
    fn shrink(&mut self) {
        while self.weight > self.capacity || self.table.len > self.max_entries {
            let Some(v) = self
                .policy
                .evict(&mut self.slab, &mut self.free, |n: &Node| n.hash)
            else {
                break;
            };
            let n = self.slab[v as usize].take().expect("victim is live");
            let removed = self.table.remove(n.hash, v);
            debug_assert!(removed, "victim is in the table");
            self.weight -= u64::from(n.weight);
            self.free.push(v);
        }
    }

    /// Applies the tune word `tune` (see [`tune_word`]) as a shard's policy does at an insert:
    /// a sizing curve's shadows follow the configuration the real cache runs.
    pub(crate) fn retune(&mut self, tune: u64) {
        self.policy
            .retune(&mut self.slab, &mut self.free, tune, |n: &Node| n.hash);
    }

    /// Requests seen so far (the hit ratio's denominator, for sizing curves).
    #[allow(dead_code)]
    pub(crate) fn accesses(&self) -> u64 {
        self.accesses
    }

    /// The capacity, in weight units.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Hits so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits
    }

    /// The tune word last applied.
    #[cfg(test)]
    pub(crate) fn tune(&self) -> u64 {
        self.policy.tune()
    }

    /// Weight in the window, probation and protected queues.
    #[cfg(test)]
    pub(crate) fn weights(&self) -> [u64; 3] {
        self.policy.weights()
    }

    /// Checks the bookkeeping (panics on a violation).
    #[cfg(test)]
    pub(crate) fn validate(&self) {
        self.policy.validate(&self.slab);
        assert_eq!(self.table.len, self.slab.iter().flatten().count());
        for (s, n) in self.slab.iter().enumerate() {
            if let Some(n) = n {
                let found = self.table.find(n.hash, |x| x == s as u32);
                assert_eq!(found, Some(s as u32), "indexed");
            }
        }
        let w: u64 = self
            .slab
            .iter()
            .flatten()
            .map(|n| u64::from(n.weight))
            .sum();
        assert_eq!(w, self.weight);
        assert!(self.weight <= self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: u64) -> u64 {
        let x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    #[test]
    fn the_index_agrees_with_a_map() {
        // Inserts and removals at random, with hashes that collide on their home slot often
        // (few distinct high bits), checked against a map after every operation.
        let mut ix = Index::new();
        let mut model = std::collections::HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Tags (the top 32 bits) collide often, and so do their home slots.
            let hash = ((x % 40) << 58) | (((x >> 20) % 8) << 32) | ((x >> 40) % 4);
            if let Some(&slot) = model.get(&hash) {
                assert!(ix.remove(hash, slot));
                model.remove(&hash);
            } else if model.len() < 200 {
                ix.insert(hash, i);
                model.insert(hash, i);
            }
            assert_eq!(ix.len, model.len());
            if i % 97 == 0 {
                for (&h, &s) in &model {
                    assert_eq!(ix.find(h, |x| model.get(&h) == Some(&x)), Some(s));
                }
            }
        }
        for (&h, &s) in &model {
            assert_eq!(ix.find(h, |x| model.get(&h) == Some(&x)), Some(s));
        }
        assert_eq!(ix.find(u64::MAX, |_| true), None);
    }

    #[test]
    fn a_shadow_hits_what_fits_and_stays_within_capacity() {
        let mut s = Shadow::new(100, 1, 7);
        for round in 0..5 {
            for k in 0..50 {
                let hit = s.access(h(k), 1);
                assert_eq!(hit, round > 0, "key {k} round {round}");
            }
        }
        for k in 1000..5000 {
            s.access(h(k), 1);
        }
        s.validate();
        assert_eq!(s.accesses(), 250 + 4000);
        assert_eq!(s.hits(), 200);
    }

    #[test]
    fn weighted_entries_are_bounded_by_weight() {
        let mut s = Shadow::new(1000, 2, 7);
        for k in 0..10_000u64 {
            s.access(h(k % 700), 1 + (k % 7) as u32);
            if k % 500 == 0 {
                s.validate();
            }
        }
        s.validate();
        assert!(!s.access(h(99_999), 1001), "heavier than the capacity");
    }

    #[test]
    fn a_write_reweighs_a_held_key_and_evicts_or_drops_it() {
        let holds = |s: &Shadow, k: u64| {
            let is = |x: u32| s.slab[x as usize].as_ref().is_some_and(|n| n.hash == h(k));
            s.table.find(h(k), is).is_some()
        };
        let total = |s: &Shadow| s.weights().iter().sum::<u64>();
        for candidate in 0..4 {
            let mut s = Shadow::new(100, candidate, 7);
            for k in 0..10u64 {
                assert!(!s.write(h(k), 10), "new key");
            }
            assert_eq!(total(&s), 100);
            // Key 0 grows to 50: the shadow stays within its 100 units, by 50 units or more.
            assert!(s.write(h(0), 50));
            s.validate();
            assert!(total(&s) <= 100, "{candidate}");
            let others = (1..10u64).filter(|&k| holds(&s, k)).count() as u64;
            let zero = if holds(&s, 0) { 50 } else { 0 };
            assert_eq!(total(&s), 10 * others + zero, "{candidate}");
            // Heavier than the shadow: dropped, with its weight.
            let (before, had) = (total(&s), holds(&s, 0));
            assert_eq!(s.write(h(0), 101), had);
            s.validate();
            assert!(!holds(&s, 0), "{candidate}: dropped");
            assert_eq!(total(&s), before - if had { 50 } else { 0 }, "{candidate}");
            for k in 100..400u64 {
                s.write(h(k), 1 + (k % 3) as u32);
                s.write(h(k - 50), 3 - (k % 3) as u32);
            }
            s.validate();
        }
    }

    #[test]
    fn candidates_differ_where_they_should() {
        // A loop 1.5 × the capacity: frequency admission (window 0 %) keeps a stable part;
        // a large window (80 %) is close to LRU on it and hits far less.
        let (mut small, mut large) = (Shadow::new(1000, 0, 1), Shadow::new(1000, 3, 1));
        for i in 0..60_000u64 {
            small.access(h(i % 1500), 1);
            large.access(h(i % 1500), 1);
        }
        let (a, b) = (
            small.hits() as f64 / 60_000.0,
            large.hits() as f64 / 60_000.0,
        );
        assert!(a > 0.5 && a > b + 0.2, "window 0 %: {a:.3}, 80 %: {b:.3}");
        assert_eq!(small.weights().iter().sum::<u64>(), 1000);
    }
}
