//! The settings that are not generic over the hasher: the loaders, the spawners and the
//! load and refresh options (as quick_cache's `options`). The builder fills them in; the cache
//! and its features (loads, refreshes) read them. A leaf: it uses no other module of the crate
//! but the load limiter.

use crate::limit::Limiter;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// The default hasher: ahash, randomly seeded per cache, behind an opaque type.
///
/// Random seeding keeps an attacker from predicting which keys collide, both in the hash table
/// and in the frequency sketch that guards admission.
#[derive(Clone, Debug, Default)]
pub struct DefaultHashBuilder(ahash::RandomState);

/// The [`Hasher`] of [`DefaultHashBuilder`].
#[derive(Clone, Debug)]
pub struct DefaultHasher(ahash::AHasher);

impl Hasher for DefaultHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0.finish()
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes)
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0.write_u64(i)
    }
}

impl BuildHasher for DefaultHashBuilder {
    type Hasher = DefaultHasher;
    #[inline]
    fn build_hasher(&self) -> DefaultHasher {
        DefaultHasher(self.0.build_hasher())
    }
}

/// The error type of a loader set with [`CacheBuilder::loader`](crate::CacheBuilder::loader).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(crate) type LoaderFn<K, V> = Arc<dyn Fn(&K) -> Result<V, BoxError> + Send + Sync>;

/// A boxed, sendable future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

pub(crate) type AsyncLoaderFn<K, V> =
    Arc<dyn Fn(&K) -> BoxFuture<Result<V, BoxError>> + Send + Sync>;

/// Runs a future somewhere else (e.g. `tokio::spawn`).
pub(crate) type FutureSpawner = Arc<dyn Fn(BoxFuture<()>) + Send + Sync>;

/// Weighs an entry (see [`CacheBuilder::weigher`](crate::CacheBuilder::weigher)).
pub(crate) type Weigher<K, V> = Box<dyn Fn(&K, &V) -> u32 + Send + Sync>;

/// Runs a job somewhere else: a thread pool, a runtime handle's `spawn_blocking`, a new thread.
pub(crate) type Spawner = Arc<dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync>;

/// The stampede-protection settings of a cache, fixed at build time.
pub(crate) struct Stampede<K, V> {
    pub(crate) loader: Option<LoaderFn<K, V>>,
    pub(crate) spawner: Option<Spawner>,
    pub(crate) async_loader: Option<AsyncLoaderFn<K, V>>,
    /// What refreshes use instead of the loaders, if set: a second tier must not answer a
    /// refresh with the very value being refreshed.
    pub(crate) refresh_loader: Option<LoaderFn<K, V>>,
    pub(crate) async_refresh_loader: Option<AsyncLoaderFn<K, V>>,
    pub(crate) future_spawner: Option<FutureSpawner>,
    pub(crate) refresh_backoff: u64,
    pub(crate) negative_ttl: Option<u64>,
    pub(crate) load_timeout: Option<Duration>,
    /// Fail-safe's `max_stale` (nanoseconds), if set (see `cache/fail_safe.rs`).
    pub(crate) fail_safe: Option<u64>,
    /// The figures [`Cache::health`](crate::Cache::health) reads (see [`crate::monitor`]).
    pub(crate) monitor: crate::monitor::Monitor,
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// Set where `K: Clone` is known: clones a key found due for refresh (under the read
    /// lock), and starts its refresh (after the lock is released).
    pub(crate) clone_key: Option<fn(&K) -> K>,
}

impl<K, V> Default for Stampede<K, V> {
    fn default() -> Self {
        Stampede {
            loader: None,
            spawner: None,
            async_loader: None,
            refresh_loader: None,
            async_refresh_loader: None,
            future_spawner: None,
            refresh_backoff: 0,
            negative_ttl: None,
            load_timeout: None,
            fail_safe: None,
            monitor: crate::monitor::Monitor::default(),
            limiter: None,
            clone_key: None,
        }
    }
}

/// Which entries a full cache evicts, set with
/// [`CacheBuilder::eviction_policy`](crate::CacheBuilder::eviction_policy) (moka's
/// `EvictionPolicy`).
///
/// * [`tiny_lfu`](Self::tiny_lfu) (the default): an adaptive W-TinyLFU that chooses its
///   window's share and admission rule by miniature simulation; new keys must earn their place
///   against the entries they would evict, so a scan or a burst of one-off keys does not flush
///   the hot set. How a key earns its place differs from moka's TinyLFU in three ways a test
///   ported from moka can see: a key's frequency counts its inserts and its hits, not the `get`s
///   that missed it; the entry a candidate must beat is the oldest of main's probation segment
///   (FIFO), not the least recently used; and a key evicted (or turned away) recently may be
///   admitted again by a ghost of recent evictions (the cache's chosen admission rule; a cache
///   with a weigher always uses it). So `insert(k)` after a miss of `k` may be turned away
///   where moka admits it, or admitted where moka turns it away.
/// * [`lru`](Self::lru): exact least-recently-used order within each shard, every new key
///   admitted. For workloads where recency is all that matters, or to match a system that was
///   tuned against LRU; usually a lower hit ratio than the default.
///
/// ```
/// use herdcache::{Cache, EvictionPolicy};
///
/// let cache: Cache<&str, &str> = Cache::builder()
///     .max_capacity(2)
///     .eviction_policy(EvictionPolicy::lru())
///     .shards(1)
///     .build();
/// cache.insert("a", "alice");
/// cache.insert("b", "bob");
/// assert_eq!(cache.get(&"a"), Some("alice")); // "b" is now the least recently used
/// cache.insert("c", "cindy");
/// assert_eq!(cache.get(&"b"), None);
/// assert_eq!(cache.get(&"a"), Some("alice"));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictionPolicy {
    pub(crate) lru: bool,
}

impl EvictionPolicy {
    /// Adaptive W-TinyLFU (the default): see [`EvictionPolicy`].
    pub fn tiny_lfu() -> Self {
        EvictionPolicy { lru: false }
    }

    /// Least recently used, exact within a shard: a read that hits, an insert and a
    /// replacement make an entry the most recently used (as in moka, `contains_key` and
    /// `peek`-style lookups do not); a full shard evicts its least recently used entry, to
    /// make room for any new key. With a weigher, an entry heavier than its shard's share of
    /// the capacity (which can never stay in a full shard) is evicted first, before any
    /// lighter entry is evicted for it. A cache of many shards is LRU per shard: give it
    /// [`shards(1)`](crate::CacheBuilder::shards) for one global order (at the cost of one
    /// lock).
    ///
    /// Cost: a shared counter bumped by every hit (a contended cache line under many threads;
    /// the default policy's hit writes only to its entry), and 32–48 bytes per entry for the
    /// order (a stamp per slot and a heap record per entry); no frequency sketch or ghost is
    /// consulted. Hit-ratio curves ([`track_sizing`](crate::CacheBuilder::track_sizing))
    /// simulate LRU too.
    pub fn lru() -> Self {
        EvictionPolicy { lru: true }
    }
}

/// The configuration of a cache, as moka's `Policy`: see [`Cache::policy`](crate::Cache::policy).
///
/// ```
/// use herdcache::Cache;
/// use std::time::Duration;
///
/// let cache: Cache<u64, u64> = Cache::builder()
///     .max_capacity(1000)
///     .time_to_live(Duration::from_secs(30))
///     .shards(4)
///     .build();
/// let policy = cache.policy();
/// assert_eq!(policy.max_capacity(), Some(1000));
/// assert_eq!(policy.time_to_live(), Some(Duration::from_secs(30)));
/// assert_eq!(policy.time_to_idle(), None);
/// assert_eq!(policy.num_segments(), 4);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub(crate) max_capacity: u64,
    pub(crate) shards: usize,
    pub(crate) segments: usize,
    pub(crate) time_to_live: Option<Duration>,
    pub(crate) time_to_idle: Option<Duration>,
}

impl Policy {
    /// The bound (entries, or total weight with a weigher). Always `Some`: herdcache caches are
    /// bounded; the `Option` is moka's shape.
    pub fn max_capacity(&self) -> Option<u64> {
        Some(self.max_capacity)
    }

    /// The time to live set with
    /// [`CacheBuilder::time_to_live`](crate::CacheBuilder::time_to_live), if any — also with
    /// [`expire_after`](crate::CacheBuilder::expire_after), which it then bounds (the earliest
    /// deadline wins), as moka reports it. `None` when none was set, even if an `Expiry` gives
    /// entries their own deadlines.
    pub fn time_to_live(&self) -> Option<Duration> {
        self.time_to_live
    }

    /// The time to idle set with
    /// [`CacheBuilder::time_to_idle`](crate::CacheBuilder::time_to_idle), if any.
    pub fn time_to_idle(&self) -> Option<Duration> {
        self.time_to_idle
    }

    /// The number of segments asked for, as moka reports it: with
    /// [`CacheBuilder::shards(n)`](crate::CacheBuilder::shards), `n` rounded up to a power of
    /// two (moka's `SegmentedCache`); otherwise 1 (moka's `sync::Cache`), although the cache is
    /// sharded anyway (see [`shard_count`](Self::shard_count)).
    ///
    /// ```
    /// let plain = herdcache::Cache::<u32, u32>::new(1_000_000);
    /// assert_eq!(plain.policy().num_segments(), 1);
    /// assert!(plain.policy().shard_count() > 1);
    /// let segmented = herdcache::Cache::<u32, u32>::builder().max_capacity(100).shards(3).build();
    /// assert_eq!(segmented.policy().num_segments(), 4);
    /// ```
    pub fn num_segments(&self) -> usize {
        self.segments
    }

    /// The number of shards the cache runs: [`shards(n)`](crate::CacheBuilder::shards) rounded
    /// up to a power of two, or by default about four per CPU, fewer for small caches.
    pub fn shard_count(&self) -> usize {
        self.shards
    }
}
