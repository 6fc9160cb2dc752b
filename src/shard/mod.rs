//! One shard: a plain, single-threaded map with an eviction policy and a timer wheel.
//!
//! Nothing here is concurrent. The cache ([`crate::cache`]) wraps each shard in a read-write
//! lock: lookups run under the read lock and touch only atomics on the entry they found (the hit
//! counter and, with a time to idle, the deadline); everything else runs under the write lock.
//! Nothing here runs user code other than the key's `Hash`/`Eq` and the `Expiry` callbacks,
//! and every mutation is ordered so that a panic of those leaves the shard consistent (user
//! code first, then the mutation). Removed entries (and flights detached by a write) are handed
//! back in a [`Removals`] so that their values and keys are dropped after the lock is released.
//!
//! # Layout and memory
//!
//! Entries live in a slab (`Vec<Option<Record>>`, 24 bytes a slot for `u64 → u64`: the key, the
//! value, a `u32` weight, a `u8` hit counter, a `u8` policy place, a `u16` timer bucket, the
//! `Option` folded into the place's niche). A `hashbrown::HashTable<u32>` maps hashes to slab
//! indices (5 bytes a bucket). The policy's FIFO queues hold a `u32` index per entry, and its
//! frequency sketch about 4 bytes per entry. With expiry (or refresh) configured, the slot also
//! holds the entry's effective deadline (32-byte slots: [`Shard::Timed`]); a parallel vector
//! holds the rest of its time data (the hard deadline with both a time to live and a time to
//! idle; the refresh deadline and load time with refresh-ahead) and the timer wheel a `u32`
//! index per entry.

use crate::clock::NEVER;
use crate::expiry::ExpiryConfig;
use crate::flight::Flights;
use crate::policy::Place;
use crate::removal::{RemovalCause, Removals};
use crate::sync::AtomicU64;
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU8, Ordering};

/// An entry's effective deadline, kept in its slab slot (no separate cache line to load on a
/// read): nothing at all for caches without time data, an `AtomicU64` for the others.
pub(crate) trait SlotTime: Send + Sync + 'static {
    /// Whether the shard keeps time data at all: false only for `()`, whose shards have no
    /// expiry, refresh or fail-safe (their [`Layout::stride`] is 0). Lets the compiler drop
    /// the time-keeping branches from an untimed shard's code.
    const TIMED: bool;
    fn fresh() -> Self;
    fn get(&self) -> u64;
    fn set(&self, at: u64);
    /// Moves the deadline to `at` if that is later (readers under the read lock: one that
    /// read the clock earlier must not undo a later reader's move).
    fn raise(&self, at: u64);
}

impl SlotTime for () {
    const TIMED: bool = false;
    #[inline]
    fn fresh() -> Self {}
    #[inline]
    fn get(&self) -> u64 {
        NEVER
    }
    #[inline]
    fn set(&self, _: u64) {}
    #[inline]
    fn raise(&self, _: u64) {}
}

impl SlotTime for AtomicU64 {
    const TIMED: bool = true;
    #[inline]
    fn fresh() -> Self {
        AtomicU64::new(NEVER)
    }
    #[inline]
    fn get(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
    #[inline]
    fn set(&self, at: u64) {
        self.store(at, Ordering::Relaxed)
    }
    #[inline]
    fn raise(&self, at: u64) {
        self.fetch_max(at, Ordering::Relaxed);
    }
}

pub(crate) struct Record<K, V, T> {
    key: K,
    value: V,
    weight: u32,
    hits: AtomicU8,
    place: Place,
    bucket: u16,
    /// The effective deadline.
    time: T,
}

crate::policy::impl_tracked!(Record<K, V, T>, K, V, T);

/// What a lookup found.
pub(crate) enum Lookup<'a, K, V> {
    Hit(&'a V),
    /// A hit that is due for refresh; this caller won the right to start it (the entry's
    /// refresh deadline is now [`REFRESHING`](crate::expiry::REFRESHING): see
    /// [`Shard::refresh_deadline_of`] for whoever fails to start the refresh and must set it
    /// back).
    Stale(&'a K, &'a V),
    /// A hit on a value due for refresh (or being refreshed) by someone else.
    StaleHit(&'a V),
    /// Present but past its deadline: the caller should arrange its removal.
    Expired,
    Absent,
}

/// Per-entry time data and refresh settings of a shard, fixed at build time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Layout {
    /// `u64`s per slab slot in `times` (0: no time data at all).
    pub(crate) stride: usize,
    /// Whether slot 1 holds a hard (time-to-live) deadline besides the effective one.
    pub(crate) hard: bool,
    /// Whether slot 2 holds a custom `Expiry`'s own deadline (when a time to live or idle
    /// bounds it, the effective one may be earlier).
    pub(crate) custom: bool,
    /// Where the refresh deadline lives (the load time is next to it), with refresh-ahead or
    /// early refresh.
    pub(crate) refresh: Option<usize>,
    /// Refresh this long after a write (nanoseconds).
    pub(crate) refresh_after: Option<u64>,
    /// XFetch's β, for probabilistic early refresh.
    pub(crate) early_beta: Option<f64>,
    /// Durations are spread uniformly within ±`jitter` of their nominal value.
    pub(crate) jitter: f64,
    /// Whether a read can move the deadline (a time to idle, or a custom `Expiry`): a plain
    /// time to live skips that work on the read path.
    pub(crate) reads_move: bool,
    /// A plain time to live (nanoseconds) when it is the whole expiry policy: no time to
    /// idle, no custom `Expiry`, no jitter. A write's deadline is then `now + ttl`, computed
    /// without consulting the expiry configuration.
    pub(crate) plain_ttl: Option<u64>,
    /// Fail-safe (see `cache/fail_safe.rs`): where the retry deadline lives, and how long past
    /// its deadline an entry is kept to be served when its load fails (nanoseconds).
    pub(crate) fail_safe: Option<(usize, u64)>,
}

/// A retry deadline (see [`Layout::fail_safe`]) that marks the entry's old value as no
/// fallback: a load found it invalidated (the Redis tier read a tombstone its instance had
/// missed) and ended without replacing it. `stale` no longer returns it; the next write
/// resets the deadline with the value. Real deadlines stay below it.
pub(crate) const STALE_FORGONE: u64 = u64::MAX;

impl Layout {
    /// The layout for a cache's expiry configuration and refresh settings.
    pub(crate) fn for_expiry<K: 'static, V: 'static>(
        expiry: &ExpiryConfig<K, V>,
        refresh_after: Option<u64>,
        early_beta: Option<f64>,
        jitter: f64,
    ) -> Self {
        Layout {
            reads_move: expiry.moves_on_read(),
            plain_ttl: expiry.plain_ttl().filter(|_| jitter == 0.0),
            ..Layout::new(expiry.stride(), refresh_after, early_beta, jitter)
        }
    }

    pub(crate) fn new(
        expiry_stride: usize,
        refresh_after: Option<u64>,
        early_beta: Option<f64>,
        jitter: f64,
    ) -> Self {
        let refreshing = refresh_after.is_some() || early_beta.is_some();
        let base = if refreshing {
            expiry_stride.max(1)
        } else {
            expiry_stride
        };
        Layout {
            stride: base + if refreshing { 2 } else { 0 },
            hard: expiry_stride >= 2,
            custom: expiry_stride == 3,
            refresh: refreshing.then_some(base),
            refresh_after,
            early_beta,
            jitter,
            reads_move: false,
            plain_ttl: None,
            fail_safe: None,
        }
    }

    /// Keeps expired entries `max_stale` nanoseconds longer, with a retry deadline each.
    pub(crate) fn with_fail_safe(mut self, max_stale: u64) -> Self {
        let at = self.stride.max(1);
        self.stride = at + 1;
        self.fail_safe = Some((at, max_stale));
        self
    }
}

mod core;

pub(crate) use self::core::{Core, Panic};

/// A shard: the single-threaded [`Core`] in the layout the cache's configuration calls for —
/// deadlines in the slab slots when anything keeps time, none at all otherwise (24-byte slots
/// for `u64 → u64`). The enum costs one predictable branch per call.
pub(crate) enum Shard<K, V> {
    Plain(Core<K, V, ()>),
    Timed(Core<K, V, AtomicU64>),
}

/// Runs the same code on either layout.
macro_rules! each {
    ($self:expr, $core:ident => $body:expr) => {
        match $self {
            Shard::Plain($core) => $body,
            Shard::Timed($core) => $body,
        }
    };
}

/// Declares methods of [`Shard`] that run the same method of its [`Core`], whichever the
/// layout: one line of signature each (`where [..]` for a where clause).
macro_rules! forward {
    () => {};
    ($(#[$m:meta])* fn $name:ident $(<$($g:ident $(: $b:path)?),*>)?
        (&mut self $(, $a:ident: $t:ty)*) $(-> $r:ty)? $(where [$($w:tt)*])?; $($rest:tt)*) => {
        $(#[$m])*
        pub(crate) fn $name $(<$($g $(: $b)?),*>)? (&mut self $(, $a: $t)*) $(-> $r)?
        $(where $($w)*)?
        {
            each!(self, c => c.$name($($a),*))
        }
        forward!($($rest)*);
    };
    ($(#[$m:meta])* fn $name:ident $(<$($g:ident $(: $b:path)?),*>)?
        (&self $(, $a:ident: $t:ty)*) $(-> $r:ty)? $(where [$($w:tt)*])?; $($rest:tt)*) => {
        $(#[$m])*
        pub(crate) fn $name $(<$($g $(: $b)?),*>)? (&self $(, $a: $t)*) $(-> $r)?
        $(where $($w)*)?
        {
            each!(self, c => c.$name($($a),*))
        }
        forward!($($rest)*);
    };
}

impl<K: Hash + Eq + 'static, V: 'static> Shard<K, V> {
    /// A shard of `share` capacity whose policy starts in the configuration `tune` (a
    /// [`tune_word`](crate::policy::tune_word)), storing its entry count in `count` after
    /// every change.
    pub(crate) fn new(
        share: u64,
        layout: Layout,
        now: u64,
        seed: u64,
        tune: u64,
        count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        if layout.stride > 0 {
            Shard::Timed(Core::new(share, layout, now, seed, tune, count))
        } else {
            Shard::Plain(Core::new(share, layout, now, seed, tune, count))
        }
    }

    forward! {
        /// The shard's flight registry (guarded by the same lock as its map).
        fn flights(&mut self) -> &mut Flights<K, V>;
        fn flights_ref(&self) -> &Flights<K, V>;
        fn tally(&self) -> crate::removal::Tally;
        #[inline]
        fn weight(&self) -> u64;
        fn len(&self) -> usize;
        #[inline]
        fn share(&self) -> u64;
        #[inline]
        fn lookup<Q>(&self, hash: u64, key: &Q, now: u64, exp: &ExpiryConfig<K, V>,
            coin: impl FnOnce() -> f64) -> Lookup<'_, K, V>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn lookup_unchanged<Q>(&self, hash: u64, key: &Q, now: u64, seen: u64,
            exp: &ExpiryConfig<K, V>, coin: impl FnOnce() -> f64) -> Lookup<'_, K, V>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn peek_deadline<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<(&V, u64)>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn set_refresh_at<Q>(&self, hash: u64, key: &Q, at: u64)
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn peek<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<&V>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn peek_read<Q>(&self, hash: u64, key: &Q, now: u64, exp: &ExpiryConfig<K, V>) -> Option<&V>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn reset_refresh<Q>(&self, hash: u64, key: &Q, at: u64)
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn refresh_claimed<Q>(&self, hash: u64, key: &Q) -> bool
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn stale<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<(&V, &AtomicU64)>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn forgo_stale<Q>(&self, hash: u64, key: &Q)
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn loading<Q>(&self, hash: u64, key: &Q) -> bool
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn running_computes<Q>(&self, hash: u64, key: &Q) -> Option<bool>
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn refresh_deadline_of(&self, value: &V) -> Option<&AtomicU64>;
        fn reset_refresh_of(&self, value: &V, at: u64);
        #[allow(clippy::too_many_arguments)]
        #[inline]
        fn insert<S: BuildHasher>(&mut self, hash: u64, key: K, value: V, weight: u32, now: u64,
            exp: &ExpiryConfig<K, V>, hasher: &S, meta: (u64, u64), out: &mut Removals<K, V>);
        fn ask_expiry_of_rejected(&mut self, hash: u64, key: K, value: V, now: u64,
            exp: &ExpiryConfig<K, V>, out: &mut Removals<K, V>) -> Option<(K, V)>;
        fn remove<Q, S: BuildHasher>(&mut self, hash: u64, key: &Q, now: u64, hasher: &S,
            out: &mut Removals<K, V>, cause: RemovalCause) -> bool
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn remove_expired<Q>(&mut self, hash: u64, key: &Q, now: u64, stale_too: bool,
            out: &mut Removals<K, V>) -> bool
            where [K: Borrow<Q>, Q: Hash + Eq + ?Sized];
        fn evict_one<S: BuildHasher>(&mut self, now: u64, hasher: &S, out: &mut Removals<K, V>,
            panic: &mut Option<Panic>) -> Option<RemovalCause>;
        fn retune<S: BuildHasher>(&mut self, hasher: &S, tune: u64, panic: &mut Option<Panic>);
        fn take_panic(&mut self) -> Option<Panic>;
        fn expire<S: BuildHasher>(&mut self, now: u64, exact: bool, hasher: &S,
            out: &mut Removals<K, V>);
        fn expire_before_evicting<S: BuildHasher>(&mut self, now: u64, hasher: &S,
            out: &mut Removals<K, V>);
        fn clear(&mut self, now: u64, out: &mut Removals<K, V>);
        fn retain<S: BuildHasher>(&mut self, now: u64, hasher: &S,
            keep: &mut impl FnMut(&K, &V) -> bool, out: &mut Removals<K, V>);
        fn snapshot(&self, now: u64) -> Vec<(K, V)> where [K: Clone, V: Clone];
        #[cfg(any(test, feature = "testing"))]
        fn validate<S: BuildHasher>(&self, hasher: &S);
        #[cfg(test)]
        fn heap_bytes(&self) -> usize;
    }

    #[cfg(test)]
    fn slab_len(&self) -> usize {
        each!(self, c => c.slab.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = ahash::RandomState;

    fn shard(cap: u64, stride: usize) -> (Shard<u64, u64>, S) {
        let layout = Layout::new(stride, None, None, 0.0);
        (
            Shard::new(cap, layout, 0, 7, 0, Default::default()),
            S::with_seeds(1, 2, 3, 4),
        )
    }

    /// Inserts `k → v` (weight 1, time 0, no expiry) in the policy's first configuration.
    fn put(
        s: &mut Shard<u64, u64>,
        h: &S,
        k: u64,
        v: u64,
        _tick: u64,
        out: &mut Removals<u64, u64>,
    ) {
        let exp = ExpiryConfig::None;
        s.insert(h.hash_one(k), k, v, 1, 0, &exp, h, (0, NEVER), out);
    }

    #[test]
    fn entry_slots_are_24_and_32_bytes() {
        assert_eq!(std::mem::size_of::<Option<Record<u64, u64, ()>>>(), 24);
        assert_eq!(
            std::mem::size_of::<Option<Record<u64, u64, AtomicU64>>>(),
            32
        );
    }

    #[test]
    fn insert_lookup_replace_remove() {
        let (mut s, h) = shard(10, 0);
        let mut out = Removals::new();
        let exp = ExpiryConfig::None;
        put(&mut s, &h, 1, 10, 0, &mut out);
        assert!(matches!(
            s.lookup(h.hash_one(1u64), &1, 0, &exp, || 1.0),
            Lookup::Hit(&10)
        ));
        put(&mut s, &h, 1, 11, 0, &mut out);
        assert_eq!(
            out.pop().map(|r| (r.value, r.cause)),
            Some((10, RemovalCause::Replaced))
        );
        assert!(matches!(
            s.lookup(h.hash_one(1u64), &1, 0, &exp, || 1.0),
            Lookup::Hit(&11)
        ));
        assert!(s.remove(
            h.hash_one(1u64),
            &1,
            0,
            &h,
            &mut out,
            RemovalCause::Explicit
        ));
        assert!(matches!(
            s.lookup(h.hash_one(1u64), &1, 0, &exp, || 1.0),
            Lookup::Absent
        ));
        s.validate(&h);
    }

    #[test]
    fn eviction_keeps_the_policy_consistent() {
        let (mut s, h) = shard(50, 0);
        let mut out = Removals::new();
        let exp = ExpiryConfig::None;
        for i in 0..10_000u64 {
            let k = (i * 7919) % 300;
            if let Lookup::Absent = s.lookup(h.hash_one(k), &k, 0, &exp, || 1.0) {
                put(&mut s, &h, k, i, i, &mut out);
                while s.weight() > 50 {
                    assert!(s.evict_one(0, &h, &mut out, &mut None).is_some());
                }
            }
            if i % 97 == 0 {
                s.remove(
                    h.hash_one(k + 1),
                    &(k + 1),
                    0,
                    &h,
                    &mut out,
                    RemovalCause::Explicit,
                );
            }
        }
        s.validate(&h);
        assert!(s.len() <= 50);
    }

    #[test]
    fn tombstones_are_purged() {
        let (mut s, h) = shard(1_000_000, 0);
        let mut out = Removals::new();
        for i in 0..100_000u64 {
            put(&mut s, &h, i, i, 0, &mut out);
            s.remove(h.hash_one(i), &i, 0, &h, &mut out, RemovalCause::Explicit);
        }
        s.validate(&h);
        assert!(s.slab_len() < 1000, "slots are reused: {}", s.slab_len());
    }

    #[test]
    fn memory_per_entry_matches_the_formula() {
        // One shard filled to its share: slot (24) + table (≤ 11) + free list (0) + deadlines +
        // the frequency sketch, sized for the share as a sketch built for it up front is.
        let sketch = (crate::sketch::Sketch::new(100_000).heap_bytes()
            + crate::ghost::Ghost::new(100_000).heap_bytes()) as f64
            / 100_000.0;
        for stride in [0usize, 1] {
            let (mut s, h) = shard(100_000, stride);
            let mut out = Removals::new();
            let exp = if stride == 0 {
                ExpiryConfig::None
            } else {
                ExpiryConfig::Fixed {
                    ttl: Some(u64::MAX / 2),
                    tti: None,
                }
            };
            for i in 0..100_000u64 {
                s.insert(h.hash_one(i), i, i, 1, 0, &exp, &h, (0, NEVER), &mut out);
            }
            let per_entry = s.heap_bytes() as f64 / 100_000.0;
            let bound = 24.0 + 11.0 + sketch + if stride == 1 { 8.0 + 8.0 } else { 0.0 };
            assert!(
                per_entry <= bound,
                "stride {stride}: {per_entry:.1} > {bound}"
            );
        }
    }

    #[test]
    fn a_byte_weighted_shard_pays_for_its_entries_not_its_capacity() {
        // Values of 100 bytes, weighed in bytes. The sketch follows a shard's entries, not its
        // capacity in bytes, whether the shard is filling (a 128 MiB share and 25,000 values:
        // what 200,000 values put in each of the 8 shards of a 1 GiB cache) or full and evicting
        // (a 1 MiB share: about 10,500 values).
        let exp = ExpiryConfig::None;
        for share in [1u64 << 27, 1 << 20] {
            let (mut s, h) = shard(share, 0);
            let mut out = Removals::new();
            for i in 0..25_000u64 {
                s.insert(h.hash_one(i), i, i, 100, 0, &exp, &h, (0, NEVER), &mut out);
                while s.weight() > share {
                    assert!(s.evict_one(0, &h, &mut out, &mut None).is_some());
                }
            }
            s.validate(&h);
            let sketch = each!(&s, c => c.policy.sketch().heap_bytes());
            let len = s.len();
            let per_entry = s.heap_bytes() as f64 / len as f64;
            eprintln!(
                "share {share}: {len} entries, a sketch of {sketch} bytes, \
                 {per_entry:.1} heap bytes per entry in all"
            );
            assert!(
                sketch <= 16 * len,
                "share {share}: a sketch of {sketch} bytes for {len} entries"
            );
        }
    }

    #[test]
    fn wheel_reclaims_untouched_entries() {
        let (mut s, h) = shard(100, 1);
        let mut out = Removals::new();
        let sec = 1_000_000_000u64;
        let exp = ExpiryConfig::Fixed {
            ttl: Some(5 * sec),
            tti: None,
        };
        for i in 0..50u64 {
            s.insert(h.hash_one(i), i, i, 1, 0, &exp, &h, (0, NEVER), &mut out);
        }
        out.clear();
        s.expire(4 * sec, false, &h, &mut out);
        assert_eq!(s.len(), 50);
        s.expire(7 * sec, false, &h, &mut out);
        assert_eq!(s.len(), 0, "every entry reclaimed without being touched");
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|r| r.cause == RemovalCause::Expired));
        s.validate(&h);
    }
}
