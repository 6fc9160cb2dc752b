//! Exact least-recently-used order, for [`EvictionPolicy::lru`](crate::EvictionPolicy::lru): a
//! leaf the shard's policy uses instead of its queues when a cache is built that way.
//!
//! # Shape
//!
//! * Every access (an insert, a replacement, a read that hits) takes a **stamp** from a
//!   per-shard counter and records it for the entry's slab slot: `stamps[slot]`, an
//!   `AtomicU64` raised with `fetch_max`, so a read under the shard's *read* lock records its
//!   access without a lock of its own; concurrent readers of one entry keep the latest stamp.
//! * A **min-heap of `(stamp, slot)` records**, touched only under the write lock: exactly one
//!   record per slot that holds an entry or that was emptied by a caller's removal and not yet
//!   reclaimed. A read does not touch the heap, so a record's stamp may be older than its
//!   slot's: the victim is found lazily — pop the oldest record; if its slot is empty, the slot
//!   is reclaimed (to the free list); if its slot's stamp moved on, the record goes back with
//!   the new stamp; otherwise its entry is the least recently used one (every other entry's
//!   stamp is at least its own valid record's, which is at least this one). Each read costs at
//!   most one re-push, at the next eviction: O(log n) amortized.
//! * Each slot also keeps the stamp of its one *valid* record (`recorded`); stamps are unique
//!   and only grow, so a record left behind (its entry evicted out of order, see below) never
//!   matches again and is dropped when met.
//! * An entry heavier than the shard's capacity can never stay in a full shard: it is noted
//!   when inserted (or reweighed) so, and evicted first, as the default policy turns such a
//!   candidate away — not after every lighter entry of the shard was evicted for nothing.
//!
//! Memory: 16 bytes per slot (its stamp and its record's) and 16 to 32 of heap record per
//! entry (a record is 16 bytes; the heap's vector grows by doubling), allocated only in this
//! mode.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The recency order of one shard's entries.
#[derive(Debug, Default)]
pub(crate) struct Recency {
    /// The last stamp handed out.
    clock: AtomicU64,
    /// Per slab slot: the stamp of its entry's last access.
    stamps: Vec<AtomicU64>,
    /// Per slab slot: the stamp of its one valid heap record (0: none). A record whose stamp
    /// is not its slot's `recorded` is stale and dropped when met.
    recorded: Vec<u64>,
    /// `(stamp, slot)` records: one valid record per slot that holds an entry or awaits
    /// reclaiming, and stale ones.
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    /// Slots whose entry was heavier than the shard's capacity when it was inserted or
    /// reweighed (hints, checked when used): such an entry can never stay in a full shard, so
    /// it is evicted first rather than after every lighter entry.
    oversized: Vec<u32>,
}

impl Clone for Recency {
    fn clone(&self) -> Self {
        Recency {
            clock: AtomicU64::new(self.clock.load(Ordering::Relaxed)),
            stamps: self
                .stamps
                .iter()
                .map(|s| AtomicU64::new(s.load(Ordering::Relaxed)))
                .collect(),
            recorded: self.recorded.clone(),
            heap: self.heap.clone(),
            oversized: self.oversized.clone(),
        }
    }
}

impl Recency {
    fn next(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// An access to the entry in `slot` (under the read lock or the write lock).
    #[inline]
    pub(crate) fn touch(&self, slot: u32) {
        let s = self.next();
        if let Some(stamp) = self.stamps.get(slot as usize) {
            stamp.fetch_max(s, Ordering::Relaxed);
        }
    }

    /// A new entry in `slot` (a slot that has no valid record: new, or reclaimed by
    /// [`victim`](Self::victim) or [`purge`](Self::purge)).
    pub(crate) fn insert(&mut self, slot: u32) {
        let i = slot as usize;
        if self.stamps.len() <= i {
            self.stamps.resize_with(i + 1, AtomicU64::default);
            self.recorded.resize(i + 1, 0);
        }
        debug_assert_eq!(self.recorded[i], 0, "a slot with a record is not free");
        let s = self.next();
        self.stamps[i].store(s, Ordering::Relaxed);
        self.recorded[i] = s;
        self.heap.push(Reverse((s, slot)));
    }

    /// The entry in `slot` is heavier than the shard's capacity (inserted so, or reweighed).
    pub(crate) fn oversized(&mut self, slot: u32) {
        if self.oversized.len() > 64 && self.oversized.len() > self.stamps.len() {
            // Hints repeat only when an entry's weight keeps crossing the capacity.
            self.oversized.sort_unstable();
            self.oversized.dedup();
        }
        self.oversized.push(slot);
    }

    /// Records (valid or stale) in the heap.
    pub(crate) fn records(&self) -> usize {
        self.heap.len()
    }

    /// Dequeues the next victim and returns its slot (the caller removes it and frees the
    /// slot): an entry heavier than the shard's capacity (`heavy`) first, else the least
    /// recently used. Empty slots met on the way go to `free`. `None` when no entry is left.
    pub(crate) fn victim(
        &mut self,
        live: impl Fn(u32) -> bool,
        heavy: impl Fn(u32) -> bool,
        free: &mut Vec<u32>,
    ) -> Option<u32> {
        while let Some(slot) = self.oversized.pop() {
            if self.recorded[slot as usize] != 0 && live(slot) && heavy(slot) {
                // Its heap record goes stale.
                self.recorded[slot as usize] = 0;
                return Some(slot);
            }
        }
        while let Some(Reverse((s, slot))) = self.heap.pop() {
            let i = slot as usize;
            if self.recorded[i] != s {
                continue;
            }
            if !live(slot) {
                self.recorded[i] = 0;
                free.push(slot);
                continue;
            }
            let now = self.stamps[i].load(Ordering::Relaxed);
            if now != s {
                self.recorded[i] = now;
                self.heap.push(Reverse((now, slot)));
                continue;
            }
            self.recorded[i] = 0;
            return Some(slot);
        }
        None
    }

    /// Drops stale records and reclaims every empty slot's (their slots go to `free`).
    pub(crate) fn purge(&mut self, live: impl Fn(u32) -> bool, free: &mut Vec<u32>) {
        let recorded = &mut self.recorded;
        self.heap.retain(|&Reverse((s, slot))| {
            let i = slot as usize;
            if recorded[i] != s {
                return false;
            }
            if !live(slot) {
                recorded[i] = 0;
                free.push(slot);
                return false;
            }
            true
        });
        self.oversized.retain(|&slot| live(slot));
    }

    /// Forgets everything (the slab is being cleared).
    pub(crate) fn clear(&mut self) {
        self.heap.clear();
        self.stamps.clear();
        self.recorded.clear();
        self.oversized.clear();
    }

    /// The slots that have a valid record, least recently used first (for tests and
    /// validation).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn slots(&self) -> Vec<u32> {
        let mut v: Vec<(u64, u32)> = self
            .heap
            .iter()
            .filter(|&&Reverse((s, slot))| self.recorded[slot as usize] == s)
            .map(|&Reverse((_, slot))| (self.stamps[slot as usize].load(Ordering::Relaxed), slot))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Heap memory, in bytes.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.stamps.capacity() * 8
            + self.recorded.capacity() * 8
            + self.heap.capacity() * 16
            + self.oversized.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_victim_is_the_least_recently_touched() {
        let mut r = Recency::default();
        for s in 0..4 {
            r.insert(s);
        }
        r.touch(0);
        r.touch(2);
        r.touch(0);
        let live = |_| true;
        let mut free = Vec::new();
        let order: Vec<u32> = std::iter::from_fn(|| r.victim(live, |_| false, &mut free)).collect();
        assert_eq!(order, [1, 3, 2, 0]);
        assert!(free.is_empty());
    }

    #[test]
    fn an_emptied_slot_is_reclaimed_once_and_a_refilled_one_keeps_its_new_place() {
        let mut r = Recency::default();
        for s in 0..3 {
            r.insert(s);
        }
        // Slot 0 emptied by a caller and not yet reclaimed; slot 1 emptied and refilled
        // (its old record reclaimed by a purge first, as the policy does).
        let mut free = Vec::new();
        r.purge(|s| s != 1, &mut free);
        assert_eq!(free, [1]);
        r.insert(1);
        r.touch(2);
        let mut order = Vec::new();
        free.clear();
        while let Some(s) = r.victim(|s| s != 0, |_| false, &mut free) {
            order.push(s);
        }
        assert_eq!(order, [1, 2]);
        assert_eq!(free, [0]);
    }

    #[test]
    fn an_oversized_entry_goes_first_and_its_record_goes_stale() {
        let mut r = Recency::default();
        for s in 0..3 {
            r.insert(s);
        }
        r.oversized(1);
        // A hint whose entry is no longer heavy is skipped.
        r.oversized(2);
        let heavy = |s| s == 1;
        let mut free = Vec::new();
        assert_eq!(r.victim(|_| true, heavy, &mut free), Some(1));
        // Slot 1 is freed by the caller and refilled: its old record must not count.
        r.insert(1);
        r.touch(0);
        let order: Vec<u32> =
            std::iter::from_fn(|| r.victim(|_| true, |_| false, &mut free)).collect();
        assert_eq!(order, [2, 1, 0]);
        assert!(free.is_empty());
        assert_eq!(r.records(), 0);
    }
}
