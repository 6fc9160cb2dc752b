//! Feeding the policy's configuration selector ([`crate::select`]): reads push sampled key
//! hashes into a lossy per-shard buffer with no lock; the buffer is drained under the shard's
//! write lock (by a write that evicts, or a reader that finds the lock free) into the cache's
//! one selector, whose choice every shard applies before it next evicts.

use super::{Cache, ShardCell};
use crate::select::{sample, Selector};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    /// Records a read of `hash` in its shard's sample buffer if the key is sampled; when the
    /// buffer fills, drains it if the shard's write lock is free (never waits for it).
    #[inline]
    pub(super) fn note_sample(&self, cell: &ShardCell<K, V>, hash: u64, hit: bool) {
        if Selector::sampled(hash, self.inner.sample_threshold)
            && cell.samples.push(sample(hash, hit))
        {
            self.drain_samples_now(cell);
        }
    }

    #[cold]
    fn drain_samples_now(&self, cell: &ShardCell<K, V>) {
        if let Some(s) = cell.lock.try_write() {
            self.drain_samples(cell);
            drop(s);
        }
    }

    /// Feeds a shard's sampled reads to the selector. The caller holds the shard's write lock
    /// (one drainer per buffer). Never waits: if another shard is feeding the selector, the
    /// samples stay in the buffer (and may be overwritten: the buffer is lossy).
    #[inline]
    pub(super) fn drain_samples(&self, cell: &ShardCell<K, V>) {
        if cell.samples.pending() {
            self.feed_selector(cell);
        }
    }

    #[cold]
    fn feed_selector(&self, cell: &ShardCell<K, V>) {
        let Some(selector) = &self.inner.selector else {
            return;
        };
        let Some(mut sel) = selector.try_lock() else {
            return;
        };
        let mut tune = None;
        cell.samples.drain(|s| {
            if let Some(t) = sel.feed(s) {
                tune = Some(t);
            }
        });
        if let Some(t) = tune {
            self.inner.tune.store(t, Ordering::Relaxed);
        }
    }

    /// The configuration selector's running totals (`None` with a weigher: no selector), after
    /// feeding it every shard's pending samples. For tests and benchmarks; not a stable API.
    #[doc(hidden)]
    pub fn policy_totals(&self) -> Option<crate::PolicyTotals> {
        for cell in self.inner.shards.iter() {
            let s = cell.lock.write();
            self.drain_samples(cell);
            drop(s);
        }
        Some(self.inner.selector.as_ref()?.lock().totals())
    }
}
