//! Configuration of a [`Cache`], checked once at build time.

use crate::cache::Cache;
use crate::clock::{nanos, Clock, ManualClock};
use crate::expiry::{Expiry, ExpiryConfig};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::marker::PhantomData;
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

pub(crate) type Weigher<K, V> = Box<dyn Fn(&K, &V) -> u32 + Send + Sync>;

/// Why a configuration was refused by [`CacheBuilder::try_build`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// `max_capacity` was not set: herdcache caches are always bounded.
    NoCapacity,
    /// `expire_after` was combined with `time_to_live` or `time_to_idle`; use one or the other.
    ConflictingExpiry,
    /// The shard count must be a power of two between 1 and 1024.
    BadShardCount(usize),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoCapacity => f.write_str("max_capacity must be set"),
            BuildError::ConflictingExpiry => {
                f.write_str("expire_after cannot be combined with time_to_live or time_to_idle")
            }
            BuildError::BadShardCount(n) => {
                write!(f, "shard count {n} is not a power of two in 1..=1024")
            }
        }
    }
}

impl std::error::Error for BuildError {}

/// Builds a [`Cache`]. Start from [`Cache::builder`].
///
/// # Example
///
/// ```
/// use herdcache::Cache;
/// use std::time::Duration;
///
/// let cache: Cache<String, Vec<u8>> = Cache::builder()
///     .max_capacity(64 * 1024 * 1024) // bytes, with the weigher below
///     .weigher(|k: &String, v: &Vec<u8>| (k.len() + v.len()).try_into().unwrap_or(u32::MAX))
///     .time_to_live(Duration::from_secs(300))
///     .build();
/// cache.insert("a".to_string(), vec![0; 1000]);
/// assert_eq!(cache.weighted_size(), 1001);
/// ```
#[must_use]
pub struct CacheBuilder<K, V, S = crate::DefaultHashBuilder> {
    pub(crate) max_capacity: Option<u64>,
    pub(crate) weigher: Option<Weigher<K, V>>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) tti: Option<Duration>,
    pub(crate) expiry: Option<Box<dyn Expiry<K, V>>>,
    pub(crate) hasher: S,
    pub(crate) clock: Option<ManualClock>,
    pub(crate) shards: Option<usize>,
    _types: PhantomData<fn(K, V)>,
}

impl<K, V> CacheBuilder<K, V, crate::DefaultHashBuilder> {
    pub(crate) fn new() -> Self {
        CacheBuilder {
            max_capacity: None,
            weigher: None,
            ttl: None,
            tti: None,
            expiry: None,
            hasher: crate::DefaultHashBuilder::default(),
            clock: None,
            shards: None,
            _types: PhantomData,
        }
    }
}

impl<K, V, S> CacheBuilder<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The bound: the most entries the cache holds, or with a [`weigher`](Self::weigher) the most
    /// total weight. Required.
    pub fn max_capacity(mut self, max: u64) -> Self {
        self.max_capacity = Some(max);
        self
    }

    /// Weighs each entry; the cache keeps the sum of weights within `max_capacity`. Called once
    /// per insert, before any lock is taken. An entry of weight 0 does not count toward the
    /// bound (it is still evicted in its turn); an entry heavier than `max_capacity` is not
    /// stored.
    pub fn weigher(mut self, weigher: impl Fn(&K, &V) -> u32 + Send + Sync + 'static) -> Self {
        self.weigher = Some(Box::new(weigher));
        self
    }

    /// Every entry expires this long after it was inserted or last replaced.
    /// `Duration::ZERO` means nothing is ever stored; `Duration::MAX` means never.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Every entry expires this long after it was last read or written. To keep hot entries
    /// from writing on every read, a read moves the idle deadline only when it would move by
    /// more than 1/1024 of the idle time, so an entry may expire up to that much early.
    pub fn time_to_idle(mut self, tti: Duration) -> Self {
        self.tti = Some(tti);
        self
    }

    /// Per-entry expiration computed by `expiry`. Cannot be combined with `time_to_live` or
    /// `time_to_idle` (build fails with [`BuildError::ConflictingExpiry`]).
    pub fn expire_after(mut self, expiry: impl Expiry<K, V>) -> Self {
        self.expiry = Some(Box::new(expiry));
        self
    }

    /// Uses `clock` instead of the system clock: time moves only when you advance it.
    pub fn clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The number of shards (a power of two, 1..=1024). Default: four per CPU, but fewer for
    /// small caches, so each shard holds at least about 512 entries' worth of capacity.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// Hashes keys with `hasher` instead of the randomly seeded default.
    pub fn hasher<S2>(self, hasher: S2) -> CacheBuilder<K, V, S2> {
        CacheBuilder {
            max_capacity: self.max_capacity,
            weigher: self.weigher,
            ttl: self.ttl,
            tti: self.tti,
            expiry: self.expiry,
            hasher,
            clock: self.clock,
            shards: self.shards,
            _types: PhantomData,
        }
    }

    /// Builds the cache.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid; see [`try_build`](Self::try_build) for the reasons.
    pub fn build(self) -> Cache<K, V, S> {
        match self.try_build() {
            Ok(c) => c,
            Err(e) => panic!("invalid herdcache configuration: {e}"),
        }
    }

    /// Builds the cache, or says why the configuration is invalid.
    ///
    /// # Errors
    ///
    /// [`BuildError`] when `max_capacity` is missing, expiry settings conflict, or the shard
    /// count is not a power of two in 1..=1024.
    pub fn try_build(self) -> Result<Cache<K, V, S>, BuildError> {
        let capacity = self.max_capacity.ok_or(BuildError::NoCapacity)?;
        if self.expiry.is_some() && (self.ttl.is_some() || self.tti.is_some()) {
            return Err(BuildError::ConflictingExpiry);
        }
        let shards = match self.shards {
            Some(n) if n.is_power_of_two() && n <= 1024 => n,
            Some(n) => return Err(BuildError::BadShardCount(n)),
            None => default_shards(capacity),
        };
        let expiry = match (self.expiry, self.ttl, self.tti) {
            (Some(e), _, _) => ExpiryConfig::Custom(e),
            (None, None, None) => ExpiryConfig::None,
            (None, ttl, tti) => ExpiryConfig::Fixed {
                ttl: ttl.map(nanos),
                tti: tti.map(nanos),
            },
        };
        let clock = self.clock.map_or_else(Clock::system, Clock::manual);
        Ok(Cache::from_parts(
            capacity,
            shards,
            self.weigher,
            expiry,
            self.hasher,
            clock,
        ))
    }
}

fn default_shards(capacity: u64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    let by_cpu = (cpus * 4).next_power_of_two().min(1024);
    let by_size = usize::try_from(capacity / 512).unwrap_or(usize::MAX).max(1);
    // The largest power of two not above by_size.
    let by_size = 1usize << (usize::BITS - 1 - by_size.leading_zeros());
    by_cpu.min(by_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_caches_get_few_shards() {
        assert_eq!(default_shards(100), 1);
        assert_eq!(default_shards(1000), 1);
        assert_eq!(default_shards(1024), 2);
        assert!(default_shards(10_000_000) >= 4);
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let r = CacheBuilder::<u32, u32>::new().try_build();
        assert_eq!(r.err(), Some(BuildError::NoCapacity));
        struct E;
        impl Expiry<u32, u32> for E {}
        let r = CacheBuilder::<u32, u32>::new()
            .max_capacity(1)
            .time_to_live(Duration::from_secs(1))
            .expire_after(E)
            .try_build();
        assert_eq!(r.err(), Some(BuildError::ConflictingExpiry));
        let r = CacheBuilder::<u32, u32>::new()
            .max_capacity(1)
            .shards(3)
            .try_build();
        assert_eq!(r.err(), Some(BuildError::BadShardCount(3)));
    }
}
