//! Bounding the cache: evicting from a shard (or, when it is within its share, from
//! another) while the cache is over capacity, and counting the evictions for size.

use super::Cache;
use crate::removal::{RemovalCause, Removals};
use crate::shard::{Panic, Shard};
use crate::stats::Counter;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    /// Evicts from a locked shard while the cache is over capacity (and, when `fair`, while the
    /// shard holds more than its share).
    /// Returns whether the cache was over capacity.
    ///
    /// The capacity test is inline (every write makes it); the eviction is out of line, so
    /// a write that fits pays for no call.
    #[inline]
    pub(super) fn evict_in(
        &self,
        s: &mut Shard<K, V>,
        fair: bool,
        out: &mut Removals<K, V>,
        panic: &mut Option<Panic>,
    ) -> bool {
        if !self.over_capacity() {
            return false;
        }
        self.evict_over(s, fair, out, panic);
        true
    }

    /// [`evict_in`](Self::evict_in)'s eviction, once the cache is known over capacity.
    ///
    /// A key's `Hash` that panics while the shard hashes resident keys leaves it consistent and
    /// the eviction goes on; the first such panic is kept in `panic`, for the caller to resume
    /// once it has brought the cache within its bound.
    #[inline(never)]
    pub(super) fn evict_over(
        &self,
        s: &mut Shard<K, V>,
        fair: bool,
        out: &mut Removals<K, V>,
        panic: &mut Option<Panic>,
    ) {
        let tune = self.inner.tune.load(Ordering::Relaxed);
        s.retune(&self.inner.hasher, tune, panic);
        let (mut n, mut w) = (0, 0);
        let now = self.now();
        if self.over_capacity() && (!fair || s.weight() > s.share()) {
            // Dead entries make room first. A key's `Hash` that panics there (rehashed as
            // its entry is removed) is resumed once the eviction is done, as the policy's.
            let before = s.weight();
            let hasher = &self.inner.hasher;
            let expired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.expire_before_evicting(now, hasher, out)
            }));
            if let Err(p) = expired {
                crate::unwind::keep_first_locked(panic, p);
            }
            self.account(before, s.weight());
        }
        while self.over_capacity() && (!fair || s.weight() > s.share()) {
            let before = s.weight();
            let Some(cause) = s.evict_one(now, &self.inner.hasher, out, panic) else {
                break;
            };
            self.account(before, s.weight());
            if cause == RemovalCause::Size {
                n += 1;
                w += before - s.weight();
            }
        }
        self.count_evicted(n, w);
    }

    /// Counts `n` evictions for size of total weight `w` in the statistics (lock-free, for
    /// `health`; the other removals are tallied by their shard).
    #[inline]
    pub(super) fn count_evicted(&self, n: u64, w: u64) {
        if n > 0 {
            if let Some(s) = &self.inner.stats {
                s.add(Counter::RemovedSize, n);
                s.add(Counter::WeightSize, w);
            }
        }
    }

    /// The cache is over capacity but shard `from` is within its share: some other shard holds
    /// more than its share. Evict there (one shard lock at a time).
    #[cold]
    pub(super) fn evict_elsewhere(
        &self,
        from: usize,
        out: &mut Removals<K, V>,
        panic: &mut Option<Panic>,
    ) {
        let n = self.inner.shards.len();
        for fair in [true, false] {
            for j in 1..=n {
                if !self.over_capacity() {
                    return;
                }
                let mut s = self.inner.shards[(from + j) % n].lock.write();
                self.evict_in(&mut s, fair, out, panic);
            }
        }
    }
}
