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
//!   stamp is at least its own record's, which is at least this one). Each read costs at most
//!   one re-push, at the next eviction: O(log n) amortized.
//! * Stamps are unique and only grow, so a record whose slot was emptied and refilled cannot
//!   match the new entry's stamp: no generation is needed.
//!
//! Memory: 8 bytes of stamp per slot and 16 to 32 of heap record per entry (a record is 16
//! bytes; the heap's vector grows by doubling), allocated only in this mode.

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
    /// One `(stamp, slot)` record per slot that holds an entry or awaits reclaiming.
    heap: BinaryHeap<Reverse<(u64, u32)>>,
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
            heap: self.heap.clone(),
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

    /// A new entry in `slot` (a slot that has no record: new, or reclaimed by
    /// [`victim`](Self::victim) or [`purge`](Self::purge)).
    pub(crate) fn insert(&mut self, slot: u32) {
        let i = slot as usize;
        if self.stamps.len() <= i {
            self.stamps.resize_with(i + 1, AtomicU64::default);
        }
        let s = self.next();
        self.stamps[i].store(s, Ordering::Relaxed);
        self.heap.push(Reverse((s, slot)));
    }

    /// Records (live entries plus slots awaiting reclaiming).
    pub(crate) fn records(&self) -> usize {
        self.heap.len()
    }

    /// Dequeues the least recently used entry and returns its slot (the caller removes it and
    /// frees the slot). Empty slots met on the way go to `free`. `None` when no entry is left.
    pub(crate) fn victim(
        &mut self,
        live: impl Fn(u32) -> bool,
        free: &mut Vec<u32>,
    ) -> Option<u32> {
        while let Some(Reverse((s, slot))) = self.heap.pop() {
            if !live(slot) {
                free.push(slot);
                continue;
            }
            let now = self.stamps[slot as usize].load(Ordering::Relaxed);
            if now != s {
                self.heap.push(Reverse((now, slot)));
                continue;
            }
            return Some(slot);
        }
        None
    }

    /// Reclaims every empty slot's record (their slots go to `free`).
    pub(crate) fn purge(&mut self, live: impl Fn(u32) -> bool, free: &mut Vec<u32>) {
        self.heap.retain(|&Reverse((_, slot))| {
            let keep = live(slot);
            if !keep {
                free.push(slot);
            }
            keep
        });
    }

    /// Forgets everything (the slab is being cleared).
    pub(crate) fn clear(&mut self) {
        self.heap.clear();
        self.stamps.clear();
    }

    /// The slots, least recently used first (for tests and validation).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn slots(&self) -> Vec<u32> {
        let mut v: Vec<(u64, u32)> = self
            .heap
            .iter()
            .map(|&Reverse((_, slot))| (self.stamps[slot as usize].load(Ordering::Relaxed), slot))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Heap memory, in bytes.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.stamps.capacity() * 8 + self.heap.capacity() * 16
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
        let order: Vec<u32> = std::iter::from_fn(|| r.victim(live, &mut free)).collect();
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
        while let Some(s) = r.victim(|s| s != 0, &mut free) {
            order.push(s);
        }
        assert_eq!(order, [1, 2]);
        assert_eq!(free, [0]);
    }
}
