//! Guards that keep the cache consistent when user code panics partway: the global weight
//! follows a locked shard's ([`Accounting`]), and a read's claim to refresh an entry is given
//! back unless handed over ([`RefreshClaim`]).

use super::Cache;
use crate::shard::Shard;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;

/// A read's right to start a refresh (the entry's refresh deadline, set to "refreshing" by
/// that read): unless kept, dropping it makes the entry due again at the given time.
pub(super) struct RefreshClaim<'a>(
    pub(super) Option<&'a crate::sync::AtomicU64>,
    pub(super) u64,
);

impl RefreshClaim<'_> {
    /// The refresh was handed over: nothing to give back.
    pub(super) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RefreshClaim<'_> {
    fn drop(&mut self) {
        if let Some(at) = self.0 {
            crate::expiry::give_back_refresh(at, self.1);
        }
    }
}

/// Keeps the global weight in step with one locked shard's: whatever happens to the shard
/// while this lives — a panic of user code partway included — the difference is added to the
/// global weight when it drops.
pub(crate) struct Accounting<'a, K: Hash + Eq + 'static, V: 'static, S> {
    cache: &'a Cache<K, V, S>,
    pub(crate) shard: &'a mut Shard<K, V>,
    before: u64,
}

impl<'a, K: Hash + Eq + 'static, V: 'static, S: BuildHasher> Accounting<'a, K, V, S> {
    pub(super) fn new(cache: &'a Cache<K, V, S>, shard: &'a mut Shard<K, V>) -> Self {
        let before = shard.weight();
        Accounting {
            cache,
            shard,
            before,
        }
    }
}

impl<K: Hash + Eq + 'static, V: 'static, S> Drop for Accounting<'_, K, V, S> {
    fn drop(&mut self) {
        let after = self.shard.weight();
        let global = &self.cache.inner.weight;
        if after > self.before {
            global.fetch_add(after - self.before, Ordering::AcqRel);
        } else if self.before > after {
            global.fetch_sub(self.before - after, Ordering::AcqRel);
        }
    }
}
