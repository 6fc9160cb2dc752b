//! Feeding the policy's configuration selector ([`crate::select`]): reads push sampled key
//! hashes into a lossy per-shard buffer with no lock; the buffer is drained by one thread at a
//! time (by a write that evicts, or the reader that filled it; never waiting, and not under
//! the shard's lock, so the shard's other readers go on) into the cache's one selector, whose
//! choice every shard applies before it next evicts — and into the sizing curve's shadows
//! ([`crate::sizing`]), read by [`Cache::sizing`].

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
    /// buffer fills, drains it unless another thread is draining it (never waits). The caller
    /// holds no shard lock.
    #[inline]
    pub(super) fn note_sample(&self, cell: &ShardCell<K, V>, hash: u64, hit: bool) {
        if Selector::sampled(hash, self.inner.sample_threshold.load(Ordering::Relaxed))
            && cell.samples.push(sample(hash, hit))
        {
            self.drain_pending_samples_now(cell);
        }
    }

    /// A sampled insert of a weighted cache, for the sizing curve (the caller drained its
    /// shard's samples first, so the key's sampled `get` went in before; when they could not be
    /// drained — another thread is draining them, holding the tracker until its buffer's tail
    /// has moved — the insert is dropped rather than reordered).
    pub(super) fn note_insert(&self, cell: &ShardCell<K, V>, hash: u64, weight: u32, tune: u64) {
        let Some(z) = &self.inner.sizing else {
            return;
        };
        if !Selector::sampled(hash, self.inner.sample_threshold.load(Ordering::Relaxed))
            || cell.samples.pending()
        {
            return;
        }
        let Some(mut z) = z.try_lock() else {
            return;
        };
        if let Some(t) = z.feed_insert(hash, weight, tune) {
            drop(z);
            self.set_sample_threshold(t);
        }
    }

    /// Feeds a shard's sampled reads to the selector. Never waits: if another thread is
    /// draining this buffer, or another shard is feeding the selector, the samples stay in the
    /// buffer (and may be overwritten: the buffer is lossy).
    #[inline]
    pub(super) fn drain_samples(&self, cell: &ShardCell<K, V>) {
        if cell.samples.pending() {
            self.drain_pending_samples_now(cell);
        }
    }

    /// [`drain_samples`](Self::drain_samples) once something is pending (out of line: most
    /// writes find nothing to drain).
    #[inline(never)]
    fn drain_pending_samples_now(&self, cell: &ShardCell<K, V>) {
        let Some(drainer) = cell.samples.claim() else {
            return;
        };
        // Both the selector and the sizing tracker, or neither (the samples then wait).
        let mut sel = match &self.inner.selector {
            Some(m) => match m.try_lock() {
                Some(g) => Some(g),
                None => return,
            },
            None => None,
        };
        let mut siz = match &self.inner.sizing {
            Some(m) => match m.try_lock() {
                Some(g) => Some(g),
                None => return,
            },
            None => None,
        };
        let mut tune = None;
        let now = self.inner.tune.load(Ordering::Relaxed);
        if let Some(z) = siz.as_deref_mut() {
            // The read count (a load per shard) only for a drain that may end an epoch.
            if z.near_epoch_end() {
                let (reads, hits) = self.requests();
                z.set_requests(reads, hits);
            }
        }
        let lost = drainer.drain(|s| {
            if let Some(sel) = sel.as_deref_mut() {
                if let Some(t) = sel.feed(s) {
                    tune = Some(t);
                }
            }
            if let Some(z) = siz.as_deref_mut() {
                z.feed(s, tune.unwrap_or(now));
            }
        });
        if let Some(z) = siz.as_deref_mut() {
            z.lost(lost, self.inner.sample_threshold.load(Ordering::Relaxed));
        }
        if let Some(t) = tune {
            self.inner.tune.store(t, Ordering::Relaxed);
        }
    }

    /// The reads so far, for the sizing curve's adjustment: the statistics' hits and misses
    /// when they are recorded, else the shards' approximate access counters when the cache
    /// keeps time (see [`note_access`](Self::note_access)), else unknown: the cache counts
    /// nothing on reads for the sizing curve alone.
    ///
    /// Also the hits among them when the statistics count them (the sizing curve's anchor).
    pub(crate) fn requests(&self) -> (Option<u64>, Option<u64>) {
        if let Some(s) = &self.inner.stats {
            let (reads, hits) = s.reads_and_hits();
            return (Some(reads), Some(hits));
        }
        let reads = self.inner.timed.then(|| {
            self.inner
                .shards
                .iter()
                .map(|c| c.accesses.load(Ordering::Relaxed))
                .sum()
        });
        (reads, None)
    }

    /// Feeds every shard's pending samples to the selector and the sizing tracker, but those
    /// another thread is draining now (never waits).
    pub(crate) fn drain_pending_samples(&self) {
        for cell in self.inner.shards.iter() {
            self.drain_samples(cell);
        }
    }

    /// Sets the sampling threshold (the sizing tracker of a weighted cache, which has no
    /// selector, after choosing a new rate).
    pub(crate) fn set_sample_threshold(&self, t: u64) {
        if self.inner.selector.is_none() {
            self.inner.sample_threshold.store(t, Ordering::Relaxed);
        }
    }

    /// The configuration selector's running totals (`None` with a weigher or under exact LRU: no
    /// selector), after
    /// feeding it every shard's pending samples (but those another thread is draining at that
    /// moment). For tests and benchmarks; not a stable API.
    #[doc(hidden)]
    pub fn policy_totals(&self) -> Option<crate::PolicyTotals> {
        self.drain_pending_samples();
        Some(self.inner.selector.as_ref()?.lock().totals())
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    /// The predicted hit-ratio curve (see [`Sizing`](crate::Sizing)), or `None` unless the cache was built
    /// with [`track_sizing`](crate::CacheBuilder::track_sizing).
    ///
    /// Feeds the samples pending in each shard first (but those another thread is draining), then
    /// copies the curve (a short lock of the tracker; no shard lock is waited for). With a
    /// weigher it also re-derives the sampling rate from the mean entry weight (the weighted
    /// size over the entries each shard stores after every change: no shard lock), which may
    /// restart the curve.
    ///
    /// ```
    /// let tracked = herdcache::Cache::<u8, u8>::builder().max_capacity(10).track_sizing().build();
    /// let plain = herdcache::Cache::<u8, u8>::builder().max_capacity(10).build();
    /// tracked.insert(1, 1);
    /// assert_eq!(tracked.get(&1), Some(1));
    /// let s = tracked.sizing().expect("tracked");
    /// assert_eq!(s.points().len(), 5);
    /// assert!(plain.sizing().is_none());
    /// ```
    pub fn sizing(&self) -> Option<crate::Sizing> {
        self.inner.sizing.as_ref()?;
        self.drain_pending_samples();
        self.sizing_undrained()
    }

    /// [`sizing`](Self::sizing) without draining the shards' sample buffers first (no shard
    /// lock: for [`health`](Self::health)); at most 64 samples per shard older.
    pub(crate) fn sizing_undrained(&self) -> Option<crate::Sizing> {
        let tracker = self.inner.sizing.as_ref()?;
        let (reads, hits) = self.requests();
        tracker.lock().set_requests(reads, hits);
        if self.inner.weigher_set() {
            // The mean weight of the entries (no shard lock waited for: `health` calls this;
            // see `entries_now`).
            if let Some(t) = tracker
                .lock()
                .calibrate(self.weighted_size(), self.entries_now())
            {
                self.set_sample_threshold(t);
            }
        }
        let s = tracker.lock().snapshot();
        Some(s)
    }
}

#[cfg(feature = "metrics")]
impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    /// Reports the sizing curve, when tracked, to the `metrics` recorder (part of
    /// [`report_metrics`](Cache::report_metrics)): gauges
    /// `herdcache_predicted_hit_ratio{cache, size}` (`size` = `0.25x`, `0.5x`, `1x`, `2x`,
    /// `4x`), `herdcache_predicted_capacity{cache, size}` and
    /// `herdcache_sizing_observed_hit_ratio{cache}` (the observed ratio over the same window),
    /// `herdcache_suggested_capacity{cache}` ([`Sizing::suggested_capacity`](crate::Sizing::suggested_capacity);
    /// 0: none).
    pub(crate) fn report_sizing_metrics(&self, name: &str) {
        let Some(s) = self.sizing() else {
            return;
        };
        for (&(capacity, ratio), size) in s.points().iter().zip(["0.25x", "0.5x", "1x", "2x", "4x"])
        {
            metrics::gauge!("herdcache_predicted_hit_ratio", "cache" => name.to_string(), "size" => size)
                .set(ratio);
            metrics::gauge!("herdcache_predicted_capacity", "cache" => name.to_string(), "size" => size)
                .set(capacity as f64);
        }
        metrics::gauge!("herdcache_sizing_observed_hit_ratio", "cache" => name.to_string())
            .set(s.observed());
        metrics::gauge!("herdcache_suggested_capacity", "cache" => name.to_string())
            .set(s.suggested_capacity().unwrap_or(0) as f64);
    }
}
