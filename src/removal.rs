//! Removals: why an entry left the cache, the batch of entries a locked operation removed, and
//! their report to the eviction listener.
//!
//! A shard never drops a key or a value under its lock (their `Drop` is user code) and never
//! calls the listener: what a locked operation removes — entries, and loads in flight that a
//! write detached — goes into a [`Removals`], which the cache reports and drops after the lock
//! is released.

use crate::flight::Flight;
use std::sync::Arc;

/// The eviction listener, as configured by
/// [`CacheBuilder::eviction_listener`](crate::CacheBuilder::eviction_listener).
pub(crate) type Listener<K, V> = Box<dyn Fn(&K, &V, RemovalCause) + Send + Sync>;

/// Why an entry left the cache: given to the
/// [`eviction_listener`](crate::CacheBuilder::eviction_listener), and counted per cause in
/// [`CacheStats`](crate::CacheStats).
///
/// # Example
///
/// ```
/// use herdcache::{Cache, RemovalCause};
/// use std::sync::{Arc, Mutex};
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = Arc::clone(&seen);
/// let cache: Cache<u32, &str> = Cache::builder()
///     .max_capacity(10)
///     .eviction_listener(move |k: &u32, _v: &&str, cause: RemovalCause| {
///         log.lock().unwrap().push((*k, cause));
///     })
///     .build();
/// cache.insert(1, "a");
/// cache.insert(1, "b"); // replaces "a"
/// cache.invalidate(&1); // removes "b"
/// assert_eq!(
///     *seen.lock().unwrap(),
///     [(1, RemovalCause::Replaced), (1, RemovalCause::Explicit)]
/// );
/// assert!(!RemovalCause::Explicit.was_evicted());
/// ```
///
/// Exhaustive, as moka's: a `match` may name the four causes with no wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemovalCause {
    /// Its deadline passed (also when `remove`, `invalidate`, `invalidate_all` or `retain`
    /// find it past its deadline before the cache reclaimed it).
    Expired,
    /// `remove`, `invalidate`, `invalidate_all` or `retain` removed it.
    Explicit,
    /// An `insert` replaced its value.
    Replaced,
    /// The policy evicted it to stay within the capacity.
    Size,
}

impl RemovalCause {
    /// Whether the cache removed the entry on its own — it expired or was evicted for size
    /// (as moka's `was_evicted`) — rather than because of a call (`remove`, `invalidate`,
    /// `insert` replacing it).
    ///
    /// ```
    /// use herdcache::RemovalCause;
    /// assert!(RemovalCause::Size.was_evicted());
    /// assert!(RemovalCause::Expired.was_evicted());
    /// assert!(!RemovalCause::Explicit.was_evicted());
    /// assert!(!RemovalCause::Replaced.was_evicted());
    /// ```
    pub fn was_evicted(&self) -> bool {
        matches!(self, RemovalCause::Expired | RemovalCause::Size)
    }
}

/// Removals counted where they happen — in a shard, under its write lock; the statistics read
/// it under the read lock — for each [`RemovalCause`]: how many entries, and their weight.
/// (Counting here rather than when the removals are reported costs a replacing write two
/// additions instead of a thread-local lookup and two counter updates.) Evictions for size
/// are not tallied here: the cache counts them in its statistics' counters, which
/// [`Cache::health`](crate::Cache::health) reads without a shard lock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Tally([u64; 8]);

impl Tally {
    /// Counts `r`, then hands it to `out`.
    #[inline(always)]
    pub(crate) fn push<K, V>(&mut self, out: &mut Removals<K, V>, r: Removed<K, V>) {
        let c = r.cause as usize;
        self.0[c] = self.0[c].wrapping_add(1);
        self.0[4 + c] = self.0[4 + c].wrapping_add(u64::from(r.weight));
        out.push(r);
    }

    /// Entries removed for `cause`, and their total weight.
    pub(crate) fn get(&self, cause: RemovalCause) -> (u64, u64) {
        let c = cause as usize;
        (self.0[c], self.0[4 + c])
    }

    /// Adds another tally to this one.
    pub(crate) fn add(&mut self, other: &Tally) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_add(b);
        }
    }
}

/// An entry that left a shard, to be reported and dropped after the lock is released.
pub(crate) struct Removed<K, V> {
    pub(crate) key: K,
    pub(crate) value: V,
    pub(crate) weight: u32,
    pub(crate) cause: RemovalCause,
}

impl<K, V> Removed<K, V> {
    pub(crate) fn expired(key: K, value: V, weight: u32) -> Self {
        Removed {
            key,
            value,
            weight,
            cause: RemovalCause::Expired,
        }
    }
}

/// Entries removed under a lock, dropped (or reported) after it is released. Holds the first
/// one inline: the common write removes at most one entry, and then needs no allocation.
pub(crate) struct Removals<K, V> {
    first: Option<Removed<K, V>>,
    /// Everything beyond the first entry, boxed so that the common case stays small and its
    /// drop is a check or two.
    more: Option<Box<More<K, V>>>,
}

/// Removals drop after the lock they were made under: the panic payloads set aside under it
/// (see [`crate::unwind`]) are discarded first.
impl<K, V> Drop for Removals<K, V> {
    #[inline]
    fn drop(&mut self) {
        crate::unwind::discard_later();
    }
}

/// The rarer contents of a [`Removals`].
struct More<K, V> {
    rest: Vec<Removed<K, V>>,
    /// Loads in flight that a write detached from the registry (their keys are dropped here).
    detached: Vec<(K, Arc<Flight<K, V>>)>,
    /// A write's own key and value when user code it called under the lock panicked: never
    /// stored, never reported, only dropped here, unlocked.
    discarded: Vec<(K, V)>,
}

impl<K, V> Removals<K, V> {
    #[inline]
    pub(crate) fn new() -> Self {
        Removals {
            first: None,
            more: None,
        }
    }

    fn more(&mut self) -> &mut More<K, V> {
        self.more.get_or_insert_with(|| {
            Box::new(More {
                rest: Vec::new(),
                detached: Vec::new(),
                discarded: Vec::new(),
            })
        })
    }

    #[inline(always)]
    pub(crate) fn push(&mut self, r: Removed<K, V>) {
        if self.first.is_none() && self.more.as_ref().is_none_or(|m| m.rest.is_empty()) {
            self.first = Some(r);
        } else {
            self.more().rest.push(r);
        }
    }

    /// Keeps a write's key and value that were not stored (user code the write called
    /// panicked), so that they are dropped unlocked, unreported.
    pub(crate) fn discard(&mut self, key: K, value: V) {
        self.more().discarded.push((key, value));
    }

    /// Keeps a flight that a write detached, so that its key is dropped unlocked.
    pub(crate) fn detach(&mut self, key: K, flight: Arc<Flight<K, V>>) {
        self.more().detached.push((key, flight));
    }

    /// The most recently pushed entry.
    pub(crate) fn pop(&mut self) -> Option<Removed<K, V>> {
        self.more
            .as_mut()
            .and_then(|m| m.rest.pop())
            .or_else(|| self.first.take())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.as_ref().map_or(0, |m| m.rest.len())
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Removed<K, V>> {
        let rest = self.more.as_ref().map_or(&[][..], |m| &m.rest[..]);
        self.first.iter().chain(rest.iter())
    }

    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.more = None;
    }
}

impl<K, V> Removals<K, V> {
    /// Calls the listener for each removed entry, exactly once each, even if it panics; returns
    /// the first panic, for the caller to resume once everything is dropped.
    pub(crate) fn report_to(
        &self,
        listener: &Listener<K, V>,
    ) -> Option<Box<dyn std::any::Any + Send>> {
        let mut panic = None;
        for r in self.iter() {
            let call = std::panic::AssertUnwindSafe(|| listener(&r.key, &r.value, r.cause));
            if let Err(p) = std::panic::catch_unwind(call) {
                crate::unwind::keep_first(&mut panic, p);
            }
        }
        panic
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tally_counts_each_cause_apart() {
        let causes = [
            RemovalCause::Expired,
            RemovalCause::Explicit,
            RemovalCause::Replaced,
            RemovalCause::Size,
        ];
        let mut t = super::Tally::default();
        let mut out: super::Removals<u32, u32> = super::Removals::new();
        for (i, cause) in causes.into_iter().enumerate() {
            for _ in 0..=i {
                t.push(
                    &mut out,
                    super::Removed {
                        key: 0,
                        value: 0,
                        weight: 10,
                        cause,
                    },
                );
            }
        }
        for (i, cause) in causes.into_iter().enumerate() {
            let n = i as u64 + 1;
            assert_eq!(t.get(cause), (n, 10 * n), "{cause:?}");
        }
        let mut u = t;
        u.add(&t);
        assert_eq!(u.get(RemovalCause::Size), (8, 80));
        assert_eq!(out.iter().count(), 10);
    }

    use super::*;

    fn removed(k: u32) -> Removed<u32, u32> {
        Removed {
            key: k,
            value: k,
            weight: 1,
            cause: RemovalCause::Size,
        }
    }

    #[test]
    fn keeps_the_first_inline_and_the_rest_in_order() {
        let mut r = Removals::new();
        assert!(r.is_empty());
        for k in 0..4 {
            r.push(removed(k));
        }
        assert_eq!(r.len(), 4);
        assert_eq!(r.iter().map(|r| r.key).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(r.pop().map(|r| r.key), Some(3));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_panicking_listener_still_sees_every_entry() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let seen = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&seen);
        let listener: Listener<u32, u32> = Box::new(move |k, _, _| {
            s.fetch_add(1, Ordering::SeqCst);
            if *k % 2 == 0 {
                panic!("listener {k}");
            }
        });
        let mut r = Removals::new();
        for k in 0..5 {
            r.push(removed(k));
        }
        let panic = r.report_to(&listener).expect("the first panic comes back");
        assert_eq!(seen.load(Ordering::SeqCst), 5);
        assert_eq!(
            panic.downcast_ref::<String>().map(String::as_str),
            Some("listener 0")
        );
    }
}
