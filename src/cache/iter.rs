//! Iteration over a cache: one shard's snapshot at a time, under its read lock.

use super::Cache;
use std::fmt;
use std::hash::{BuildHasher, Hash};

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    /// Iterates over clones of the live entries, one shard's snapshot at a time (no lock is held
    /// while you consume the iterator; the snapshot clones a shard's keys and values under its
    /// read lock, so their `Clone` must not call into this cache). Entries inserted or removed
    /// meanwhile may or may not be seen.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, "a");
    /// cache.insert(2, "b");
    /// let mut all: Vec<_> = cache.iter().collect();
    /// all.sort();
    /// assert_eq!(all, vec![(1, "a"), (2, "b")]);
    /// ```
    pub fn iter(&self) -> Iter<'_, K, V, S>
    where
        K: Clone,
        V: Clone,
    {
        Iter {
            cache: self,
            shard: 0,
            batch: Vec::new().into_iter(),
        }
    }
}

/// Iterator over clones of a cache's entries; see [`Cache::iter`].
pub struct Iter<'a, K, V, S> {
    pub(super) cache: &'a Cache<K, V, S>,
    pub(super) shard: usize,
    pub(super) batch: std::vec::IntoIter<(K, V)>,
}

/// Shows the cache (its configuration), the next shard to read and the entries left from the
/// current one.
///
/// ```
/// let cache = herdcache::Cache::<u8, u8>::new(10);
/// let shown = format!("{:?}", cache.iter());
/// assert!(shown.starts_with("Iter { cache: Cache {"));
/// ```
impl<K, V, S> fmt::Debug for Iter<'_, K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter")
            .field("cache", self.cache)
            .field("next_shard", &self.shard)
            .field("batch_left", &self.batch.len())
            .finish()
    }
}

/// `for (key, value) in &cache`: the same as [`Cache::iter`] (clones of the live entries, one
/// shard's snapshot at a time).
///
/// ```
/// let cache = herdcache::Cache::new(10);
/// cache.insert("a", 1);
/// cache.insert("b", 2);
/// let mut sum = 0;
/// for (_key, value) in &cache {
///     sum += value;
/// }
/// assert_eq!(sum, 3);
/// ```
impl<'a, K, V, S> IntoIterator for &'a Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    type Item = (K, V);
    type IntoIter = Iter<'a, K, V, S>;

    fn into_iter(self) -> Iter<'a, K, V, S> {
        self.iter()
    }
}

impl<K, V, S> Iterator for Iter<'_, K, V, S>
where
    K: Hash + Eq + Clone + 'static,
    V: Clone + 'static,
    S: BuildHasher,
{
    type Item = (K, V);

    fn next(&mut self) -> Option<(K, V)> {
        loop {
            if let Some(kv) = self.batch.next() {
                return Some(kv);
            }
            let cell = self.cache.inner.shards.get(self.shard)?;
            self.shard += 1;
            let now = self.cache.now();
            self.batch = cell.lock.read().snapshot(now).into_iter();
        }
    }
}
