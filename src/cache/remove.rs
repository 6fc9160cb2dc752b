//! Removing entries on request: one key (`remove`, `invalidate`), every entry
//! (`invalidate_all`), the entries a predicate picks (`retain`, `invalidate_entries_if`), and
//! the panic-safe pass over the shards they share.

use super::{Accounting, Cache};
use crate::removal::{RemovalCause, Removals, Removed};
use crate::shard::Shard;
use crate::unwind::{drop_keeping_first, keep_first, keep_first_locked};
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    pub(super) fn remove_hashed<Q>(&self, hash: u64, key: &Q, out: &mut Removals<K, V>) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let s = self.inner.shards[self.shard_index(hash)].lock.write();
        // User code under the lock (the keys' `Hash` as expired entries are reclaimed first,
        // `Eq`) may panic: what was removed before is still reported, after the lock.
        self.reporting_panics(out, move |out| {
            let mut s = s;
            self.remove_locked(&mut s, hash, key, out)
        })
    }

    /// Removes `key` from a locked shard (an explicit removal), keeping the global weight.
    pub(super) fn remove_locked<Q>(
        &self,
        s: &mut Shard<K, V>,
        hash: u64,
        key: &Q,
        out: &mut Removals<K, V>,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.now();
        let acct = Accounting::new(self, s);
        let cause = RemovalCause::Explicit;
        acct.shard
            .remove(hash, key, now, &self.inner.hasher, out, cause)
    }

    /// Removes `key` and returns its value, if a live one was present.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, "one");
    /// assert_eq!(cache.remove(&1), Some("one"));
    /// assert_eq!(cache.remove(&1), None);
    /// ```
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut out = Removals::new();
        let removed = self.remove_hashed(self.hash(key), key, &mut out);
        let panic = self.report(&out);
        let popped = if removed { out.pop() } else { None };
        // User code (the keys' and values' `Drop`) while `popped` is a local: a panic there
        // drops it while unwinding (a value moved out of it first would leak,
        // rust-lang/rust#47949).
        drop(out);
        let value = popped.map(|r| {
            let Removed { key, value, .. } = r;
            drop(key);
            value
        });
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        value
    }

    /// Removes `key` without returning its value.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, "one");
    /// cache.invalidate(&1);
    /// assert_eq!(cache.get(&1), None);
    /// ```
    pub fn invalidate<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut out = Removals::new();
        self.remove_hashed(self.hash(key), key, &mut out);
        self.report_removals(out);
    }

    /// Removes every entry, at one instant (every shard is write-locked for the call: an entry
    /// written during it, in any shard, is either removed or kept whole). Values are dropped
    /// after the locks are released.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, 1);
    /// cache.invalidate_all();
    /// assert_eq!(cache.entry_count(), 0);
    /// ```
    pub fn invalidate_all(&self) {
        let now = self.now();
        self.on_all_shards(|s, out| s.clear(now, out));
    }

    /// Runs `op` on every shard in turn under its write lock, then reports what it removed once
    /// the lock is released (see [`over_shards`](Self::over_shards)).
    pub(super) fn for_each_shard(&self, op: impl FnMut(&mut Shard<K, V>, &mut Removals<K, V>)) {
        self.over_shards(false, op);
    }

    /// Runs `op` on every shard with all of them write-locked (taken in index order, as
    /// `validate` does; nothing else holds two at once), then reports what it removed once
    /// they are released: one instant for the whole cache, so a write during the call either
    /// came before it (and `op` sees it) or after it (and is untouched), whichever shard it
    /// went to.
    pub(super) fn on_all_shards(&self, op: impl FnMut(&mut Shard<K, V>, &mut Removals<K, V>)) {
        self.over_shards(true, op);
    }

    /// [`for_each_shard`](Self::for_each_shard) (`at_once` false) or
    /// [`on_all_shards`](Self::on_all_shards). Panic-safe: if `op` (user code: a `retain`
    /// predicate, a key's `Hash`) or a removed value's `Drop` panics, the shard's weight is
    /// still accounted, what was removed is still reported, the remaining shards are still
    /// processed, and the first panic (or a listener's) is resumed after the last shard.
    fn over_shards(
        &self,
        at_once: bool,
        mut op: impl FnMut(&mut Shard<K, V>, &mut Removals<K, V>),
    ) {
        let cells = &self.inner.shards;
        let step = if at_once { cells.len() } else { 1 };
        let mut panic = None;
        for group in cells.chunks(step) {
            let mut out = Removals::new();
            {
                let mut guards: Vec<_> = group.iter().map(|c| c.lock.write()).collect();
                for s in &mut guards {
                    let acct = Accounting::new(self, &mut **s);
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        op(&mut *acct.shard, &mut out)
                    }));
                    if let Err(p) = ran {
                        keep_first_locked(&mut panic, p);
                    }
                }
            }
            if let Some(p) = self.report(&out) {
                keep_first(&mut panic, p);
            }
            drop_keeping_first(out, &mut panic);
        }
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Keeps only the entries for which `keep` returns true (expired ones are removed too).
    /// With [`fail_safe`](crate::CacheBuilder::fail_safe), an entry past its deadline but
    /// still within its stale window is its key's last value, kept for a failing load to fall
    /// back on: `keep` sees it and decides on it like on the live entries.
    ///
    /// An entry `keep` removes is removed as by [`invalidate`](Self::invalidate): a load or
    /// refresh of its key in flight is superseded (its value goes to its callers, is not
    /// stored). A load of a key that has no entry (being loaded for the first time) is not
    /// touched: `keep` never sees it.
    ///
    /// `keep` runs while every shard is write-locked (as `HashMap::retain` runs inside the
    /// map), so the call takes effect at one instant: a write made during it, in any shard, is
    /// either seen by `keep` or untouched. `keep` must not call into this cache; other callers
    /// wait until it has run over every entry. Removed values are dropped after the locks are
    /// released.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// for i in 0..6 { cache.insert(i, i * 10); }
    /// cache.retain(|k, _v| k % 2 == 0);
    /// assert_eq!(cache.entry_count(), 3);
    /// ```
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        let now = self.now();
        self.on_all_shards(|s, out| s.retain(now, &self.inner.hasher, &mut keep, out));
    }

    /// Removes the entries for which `predicate` returns true: [`retain`](Self::retain) with
    /// the predicate negated, in moka's shape. moka registers the predicate and applies it
    /// lazily to the entries present at the call; here it runs at once, so the entries it
    /// matches are gone when the call returns (and entries inserted afterwards are not
    /// affected, as in moka). Always `Ok`: nothing needs
    /// [`support_invalidation_closures`](crate::CacheBuilder::support_invalidation_closures).
    ///
    /// `predicate` runs while every shard is write-locked, as `retain`'s (one instant for the
    /// whole cache): it must not call into this cache.
    ///
    /// # Errors
    ///
    /// None (the `Result` is moka's shape, so that `.unwrap()` and `?` on it still compile).
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// for i in 0..6 { cache.insert(i, i * 10); }
    /// cache.invalidate_entries_if(|_k, v| *v >= 30).unwrap();
    /// assert_eq!(cache.entry_count(), 3);
    /// assert_eq!(cache.get(&4), None);
    /// ```
    pub fn invalidate_entries_if(
        &self,
        mut predicate: impl FnMut(&K, &V) -> bool,
    ) -> Result<(), std::convert::Infallible> {
        self.retain(|k, v| !predicate(k, v));
        Ok(())
    }
}
