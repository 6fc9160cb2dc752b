//! Configuration of a [`Cache`], checked once at build time.

use crate::cache::Cache;
use crate::cache::{Parts, RefreshFn};
use crate::clock::{nanos, Clock, ManualClock};
use crate::expiry::{Expiry, ExpiryConfig};
use crate::removal::Listener;
use crate::settings::{BoxError, Stampede, Weigher};
use crate::shard::Layout;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// Why a configuration was refused by [`CacheBuilder::try_build`] ([`CacheBuilder::build`]
/// panics with its message instead).
///
/// # Example
///
/// ```
/// use herdcache::{BuildError, Cache};
/// use std::time::Duration;
///
/// let r = Cache::<u64, u64>::builder().time_to_live(Duration::from_secs(1)).try_build();
/// assert_eq!(r.unwrap_err(), BuildError::NoCapacity);
///
/// let r = Cache::<u64, u64>::builder().max_capacity(100).shards(0).try_build();
/// assert_eq!(r.unwrap_err(), BuildError::BadShardCount(0));
///
/// let r = Cache::<u64, u64>::builder()
///     .max_capacity(100)
///     .refresh_after(Duration::from_secs(1)) // refresh with what? no loader
///     .try_build();
/// assert_eq!(r.unwrap_err().to_string(), "refresh_after and early_refresh need a loader");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// `max_capacity` was not set: herdcache caches are always bounded.
    NoCapacity,
    /// No longer returned: `expire_after` combines with `time_to_live` and `time_to_idle`
    /// (an entry expires at the earliest of them, as in moka). Kept for compatibility.
    ConflictingExpiry,
    /// The shard count must be between 1 and 1024.
    BadShardCount(usize),
    /// `refresh_after` or `early_refresh` needs a `loader` (or an `async_loader` with a
    /// `future_spawner`) to reload keys with.
    RefreshWithoutLoader,
    /// `early_refresh` needs a `time_to_live` (it refreshes ahead of expiry).
    EarlyRefreshWithoutTtl,
    /// `jitter` must be in `0.0..1.0`; `early_refresh`'s β must be positive and finite.
    BadFraction,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoCapacity => f.write_str("max_capacity must be set"),
            BuildError::ConflictingExpiry => {
                f.write_str("expire_after with time_to_live or time_to_idle (no longer an error)")
            }
            BuildError::BadShardCount(n) => {
                write!(f, "shard count {n} is not in 1..=1024")
            }
            BuildError::RefreshWithoutLoader => {
                f.write_str("refresh_after and early_refresh need a loader")
            }
            BuildError::EarlyRefreshWithoutTtl => f.write_str("early_refresh needs a time_to_live"),
            BuildError::BadFraction => {
                f.write_str("jitter must be in 0.0..1.0 and early_refresh's beta positive")
            }
        }
    }
}

impl std::error::Error for BuildError {}

/// Builds a [`Cache`]. Start from [`Cache::builder`] or [`CacheBuilder::new`]`(max_capacity)`;
/// every setting but the capacity is optional, and [`build`](Self::build) (or
/// [`try_build`](Self::try_build)) checks the whole configuration once.
///
/// # Examples
///
/// Bounded by bytes, with a time to live:
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
///
/// A loading cache with stampede protection, statistics and a listener:
///
/// ```
/// use herdcache::{BoxError, CacheBuilder, RemovalCause};
/// use std::time::Duration;
///
/// let builder = CacheBuilder::new(10_000)
///     .name("users")
///     .time_to_live(Duration::from_secs(60))
///     .refresh_after(Duration::from_secs(30))
///     .jitter(0.1)
///     .max_concurrent_loads(8)
///     .negative_ttl(Duration::from_secs(1))
///     .record_stats()
///     .eviction_listener(|_id: &u64, _name: &String, cause: RemovalCause| {
///         if cause.was_evicted() { /* count it, log it */ }
///     })
///     .loader(|id: &u64| Ok::<_, BoxError>(format!("user {id}")));
/// println!("{builder:?}"); // the configuration, closures shown as `Some(..)`
/// let cache = builder.build();
/// assert_eq!(cache.load(1).unwrap(), "user 1");
/// assert_eq!(cache.stats().load_successes, 1);
/// ```
#[must_use]
pub struct CacheBuilder<K, V, S = crate::DefaultHashBuilder> {
    pub(crate) max_capacity: Option<u64>,
    pub(crate) weigher: Option<Weigher<K, V>>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) tti: Option<Duration>,
    pub(crate) expiry: Option<Box<dyn Expiry<K, V> + Send + Sync>>,
    pub(crate) hasher: S,
    pub(crate) clock: Option<ManualClock>,
    pub(crate) shards: Option<usize>,
    pub(crate) stampede: Stampede<K, V>,
    /// Starts a refresh (set with a loader, where `K: Clone` is known).
    refresh: Option<RefreshFn<K, V, S>>,
    pub(crate) refresh_after: Option<Duration>,
    early_beta: Option<f64>,
    jitter: f64,
    stats: bool,
    sizing: bool,
    eviction: crate::EvictionPolicy,
    listener: Option<Listener<K, V>>,
    name: Option<String>,
    /// Whether stored values may carry a lifetime bound of their own even without any expiry
    /// configured (a Redis tier bounds each local copy by the shared copy's remaining life):
    /// the shards then keep time data.
    pub(crate) bounded_lifetimes: bool,
    _types: PhantomData<fn(K, V)>,
}

impl<K, V> CacheBuilder<K, V, crate::DefaultHashBuilder> {
    /// A builder for a cache of at most `max_capacity` entries (or total weight, with a
    /// [`weigher`](Self::weigher)): the same as [`Cache::builder`]`().`[`max_capacity`](Self::max_capacity)`(max_capacity)`,
    /// in moka's shape.
    ///
    /// ```
    /// use herdcache::{Cache, CacheBuilder};
    /// use std::time::Duration;
    ///
    /// let cache: Cache<String, u64> = CacheBuilder::new(10_000)
    ///     .time_to_live(Duration::from_secs(60))
    ///     .build();
    /// assert_eq!(cache.policy().max_capacity(), Some(10_000));
    /// ```
    pub fn new(max_capacity: u64) -> Self {
        Self::unbounded().max_capacity_unchecked(max_capacity)
    }

    /// A builder with nothing set (not even the capacity, which [`try_build`](Self::try_build)
    /// then requires).
    pub(crate) fn unbounded() -> Self {
        CacheBuilder {
            max_capacity: None,
            weigher: None,
            ttl: None,
            tti: None,
            expiry: None,
            hasher: crate::DefaultHashBuilder::default(),
            clock: None,
            shards: None,
            stampede: Stampede::default(),
            refresh: None,
            refresh_after: None,
            early_beta: None,
            jitter: 0.0,
            stats: false,
            sizing: false,
            eviction: crate::EvictionPolicy::tiny_lfu(),
            listener: None,
            name: None,
            bounded_lifetimes: false,
            _types: PhantomData,
        }
    }
}

/// A builder with nothing set, as moka's `CacheBuilder::default()`: give it a
/// [`max_capacity`](CacheBuilder::max_capacity) before [`build`](CacheBuilder::build) (which
/// panics without one; [`try_build`](CacheBuilder::try_build) returns
/// [`BuildError::NoCapacity`](crate::BuildError)).
///
/// ```
/// use herdcache::{Cache, CacheBuilder};
///
/// let cache: Cache<u64, u64> = CacheBuilder::default().max_capacity(100).build();
/// assert_eq!(cache.policy().max_capacity(), Some(100));
/// ```
impl<K, V> Default for CacheBuilder<K, V, crate::DefaultHashBuilder> {
    fn default() -> Self {
        Self::unbounded()
    }
}

impl<K, V, S> CacheBuilder<K, V, S> {
    /// [`max_capacity`](Self::max_capacity) without its bounds on `K`, `V` and `S`, for
    /// [`new`](CacheBuilder::new).
    fn max_capacity_unchecked(mut self, max: u64) -> Self {
        self.max_capacity = Some(max);
        self
    }
}

/// Shows whether a closure (or trait object) is set, not the closure.
struct IsSet(bool);

impl fmt::Debug for IsSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 { "Some(..)" } else { "None" })
    }
}

/// The configuration so far: every setting, with closures shown as set or not (`Some(..)`).
///
/// ```
/// use std::time::Duration;
/// let b = herdcache::CacheBuilder::<u64, u64>::new(100).time_to_live(Duration::from_secs(5));
/// let shown = format!("{b:?}");
/// assert!(shown.contains("max_capacity: Some(100)"));
/// assert!(shown.contains("time_to_live: Some(5s)"));
/// ```
impl<K, V, S> fmt::Debug for CacheBuilder<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = &self.stampede;
        let nanos_opt = |n: Option<u64>| n.map(Duration::from_nanos);
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("max_capacity", &self.max_capacity)
            .field("weigher", &IsSet(self.weigher.is_some()))
            .field("time_to_live", &self.ttl)
            .field("time_to_idle", &self.tti)
            .field("expire_after", &IsSet(self.expiry.is_some()))
            .field("shards", &self.shards)
            .field("hasher", &std::any::type_name::<S>())
            .field(
                "clock",
                &if self.clock.is_some() {
                    "manual"
                } else {
                    "system"
                },
            )
            .field("record_stats", &self.stats)
            .field("track_sizing", &self.sizing)
            .field("eviction_policy", &self.eviction)
            .field("eviction_listener", &IsSet(self.listener.is_some()))
            .field("jitter", &self.jitter)
            .field("loader", &IsSet(st.loader.is_some()))
            .field("async_loader", &IsSet(st.async_loader.is_some()))
            .field("refresh_after", &self.refresh_after)
            .field("early_refresh", &self.early_beta)
            .field(
                "refresh_backoff",
                &nanos_opt(Some(st.refresh_backoff).filter(|&n| n > 0)),
            )
            .field("negative_ttl", &nanos_opt(st.negative_ttl))
            .field(
                "max_concurrent_loads",
                &st.limiter.as_ref().map(|l| l.limit()),
            )
            .field("load_timeout", &st.load_timeout)
            .field("spawner", &IsSet(st.spawner.is_some()))
            .field("future_spawner", &IsSet(st.future_spawner.is_some()))
            .finish()
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
    /// stored. Each shard evicts down to its share of `max_capacity` (`max_capacity / shards`):
    /// in a full cache an entry heavier than a shard's share is turned away, so when single
    /// entries may weigh more than a few percent of the capacity, ask for fewer
    /// [`shards`](Self::shards). The memory the cache needs follows the entries it holds, not
    /// `max_capacity` in weight units (the frequency sketch is sized by entries).
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

    /// Per-entry expiration computed by `expiry`. Combined with
    /// [`time_to_live`](Self::time_to_live) and/or [`time_to_idle`](Self::time_to_idle), an
    /// entry expires at the earliest of its custom deadline, the time to live after its last
    /// write and the time to idle after its last access, as in moka; the hooks' `remaining`
    /// is the custom deadline's alone.
    ///
    /// ```
    /// use herdcache::{Cache, Expiry, ManualClock};
    /// use std::time::Duration;
    ///
    /// struct Forever;
    /// impl Expiry<u32, u32> for Forever {} // never expires, by itself
    ///
    /// let clock = ManualClock::new();
    /// let cache = Cache::builder()
    ///     .max_capacity(10)
    ///     .expire_after(Forever)
    ///     .time_to_live(Duration::from_secs(60)) // bounds it
    ///     .clock(clock.clone())
    ///     .build();
    /// cache.insert(1, 1);
    /// clock.advance(Duration::from_secs(59));
    /// cache.insert(1, 2); // a write: 60 s from now
    /// clock.advance(Duration::from_secs(59));
    /// assert_eq!(cache.get(&1), Some(2));
    /// clock.advance(Duration::from_secs(1));
    /// assert_eq!(cache.get(&1), None);
    /// ```
    pub fn expire_after(mut self, expiry: impl Expiry<K, V> + Send + Sync + 'static) -> Self {
        self.expiry = Some(Box::new(expiry));
        self
    }

    /// Uses `clock` instead of the system clock: time moves only when you advance it.
    pub fn clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The number of shards, 1..=1024, rounded up to a power of two (as moka rounds
    /// `num_segments`: `shards(5)` makes 8). Default: four per CPU, but fewer for small
    /// caches, so each shard holds at least about 512 entries' worth of capacity.
    ///
    /// ```
    /// let cache = herdcache::Cache::<u32, u32>::builder().max_capacity(100).shards(5).build();
    /// assert_eq!(cache.policy().num_segments(), 8);
    /// ```
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// [`shards`](Self::shards), under moka's name (`CacheBuilder::segments`, which makes a
    /// `SegmentedCache`: here every cache is sharded, and this sets how many shards).
    ///
    /// ```
    /// let cache = herdcache::Cache::<u32, u32>::builder().max_capacity(100).segments(4).build();
    /// assert_eq!(cache.policy().num_segments(), 4);
    /// ```
    pub fn segments(self, num_segments: usize) -> Self {
        self.shards(num_segments)
    }

    /// A name for the cache: the `cache` label of its metrics, and shown by `Debug`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Accepted for moka's shape and ignored: a shard's table grows as entries arrive
    /// (doubling, amortised), and the capacity bound is [`max_capacity`](Self::max_capacity).
    pub fn initial_capacity(self, _entries: usize) -> Self {
        self
    }

    /// Accepted for moka's shape and ignored: [`Cache::invalidate_entries_if`] needs nothing
    /// set up (it runs at once).
    pub fn support_invalidation_closures(self) -> Self {
        self
    }

    /// Counts hits, misses, loads, removals by cause and stampede events, for
    /// [`Cache::stats`]. Off by default; the cost is a branch per operation when off, and a
    /// thread-local lookup and a store per read when on: about 4–5 % of a read's instructions
    /// on 1 thread, nothing on a write of a present key (removals are tallied by their shard
    /// either way; `BENCHMARKS.md` in the repository, "Throughput").
    pub fn record_stats(mut self) -> Self {
        self.stats = true;
        self
    }

    /// Tracks the hit-ratio curve: [`Cache::sizing`] then predicts the hit ratio at 0.25, 0.5,
    /// 1, 2 and 4 × `max_capacity` over a recent window of requests, next to the observed one
    /// (see [`Sizing`](crate::Sizing) for the window and the method).
    ///
    /// Cost: up to nine shadow caches of key hashes (four sizes besides 1 ×, each with a
    /// challenger running another configuration), fed sampled reads, replayed on the shadows
    /// when a shard's buffer is drained (by the reader that fills it or a write that evicts,
    /// not under the shard's lock). From 4,096 entries up the curve samples the keys the
    /// policy's selector takes anyway, and from 16,384 up more of them (up to twice as many
    /// from 32,000: an unsampled read runs the same code either way); each shadow holds at most
    /// 2,000 entries (the 1 × one; the others at most 1,024, the larger ones seeing a subset of
    /// the samples): about 0.35 MiB once full, whatever the capacity. Instructions, measured
    /// with `bench/examples/sizing_cost.rs` under callgrind against an untracked cache of the
    /// same hash seed (BENCHMARKS.md): at 100,000 entries 3.4–4.4 % more on a skewed mix of
    /// reads and inserts and 4.1–5.1 % on hits alone (timed: about 6 % on hits); +0.9 % at
    /// 1,000,000; at 10,000 entries 17 % and 29 %; +50–75 % at 4,000. Below 4,096
    /// entries the curve samples more keys than the selector,
    /// and at 1,024 or fewer every read is simulated in up to nine shadows: 550–1,100
    /// instructions more per read (4.1 × an untracked read at 1,000 entries on Zipf reads,
    /// 6.6 × on hits alone; 0.7 MiB). Track small caches to size them, not on a hot path. With
    /// a weigher, sampled inserts are recorded too (five shadows of about 2000 entries at 1 ×).
    ///
    /// The predictions are adjusted for the few hottest keys' share of the sample (SHARDS's
    /// adjustment) only when the cache counts its reads anyway: with
    /// [`record_stats`](Self::record_stats), or with a time to live (its maintenance tick).
    /// Without either, a sample that happens to hold too few of the hottest keys predicts low
    /// at every size (on one dev trace by 6.7 points at 0.5 ×). With `record_stats` the curve
    /// is also anchored to the cache's own hit ratio over every request: each point is that
    /// ratio plus its shadow's difference from the real cache on the same samples (see
    /// [`Sizing`](crate::Sizing)), which removes the error of a sample whose keys hit more or
    /// less than the others.
    ///
    /// ```
    /// let cache = herdcache::Cache::<u64, u64>::builder()
    ///     .max_capacity(1000)
    ///     .track_sizing()
    ///     .build();
    /// assert!(cache.sizing().is_some());
    /// ```
    pub fn track_sizing(mut self) -> Self {
        self.sizing = true;
        self
    }

    /// Chooses which entries a full cache evicts:
    /// [`EvictionPolicy::tiny_lfu`](crate::EvictionPolicy::tiny_lfu) (the default) or
    /// [`EvictionPolicy::lru`](crate::EvictionPolicy::lru) (see
    /// [`EvictionPolicy`](crate::EvictionPolicy)). The last call before `build` wins.
    ///
    /// ```
    /// use herdcache::{Cache, EvictionPolicy};
    ///
    /// let cache: Cache<u64, u64> = Cache::builder()
    ///     .max_capacity(100)
    ///     .eviction_policy(EvictionPolicy::lru())
    ///     .build();
    /// cache.insert(1, 1);
    /// assert_eq!(cache.get(&1), Some(1));
    /// ```
    pub fn eviction_policy(mut self, policy: crate::EvictionPolicy) -> Self {
        self.eviction = policy;
        self
    }

    /// Calls `listener(&key, &value, cause)` exactly once for every entry that leaves the cache
    /// (expired, removed, replaced, evicted for size; also for a value too heavy, or already
    /// expired, to be stored).
    ///
    /// The listener runs after the shard's lock is released, on the thread whose call removed
    /// the entry (an `insert` that evicted, a `get` that reclaimed an expired entry, ...), and
    /// may call back into the cache. Concurrent calls: each call's notifications run on its own
    /// thread, in the order of its removals, so notifications of one key from two threads may
    /// overlap or arrive in either order (moka serialises them per key; here a slow listener
    /// holds up only the caller that runs it). If it panics, the cache stays consistent: the operation
    /// that removed the entries has completed, every other removed entry of that operation is
    /// still reported, and the first panic is then resumed in that operation's caller.
    pub fn eviction_listener(
        mut self,
        listener: impl Fn(&K, &V, crate::RemovalCause) + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Box::new(listener));
        self
    }

    /// Spreads every entry's time to live (and idle time, and refresh deadline) uniformly
    /// within ±`fraction` of its nominal value, so that entries written together do not expire
    /// (or refresh) together. `0.0` (the default) disables it; must be below `1.0`. An entry
    /// may so live up to `1 + fraction` times its time to live: set the time to live to
    /// `limit / (1 + fraction)` where a hard limit on a value's age matters.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Remembers a failed load (an error, or `None` from an `optionally_` call) for `ttl`:
    /// during that time callers of that key get the same error (or `None`) without calling the
    /// backend, so a down backend sees at most one call per key per `ttl`. Those callers are
    /// the calls that can answer with that failure (`try_get_with`, `optionally_get_with`,
    /// `load` and their async, by-reference and entry-API forms); `get_with`, `or_insert_with`
    /// and `get_all`, which have no way to answer a failure, load the key again: a value they
    /// load is stored and ends it, and a load of theirs that ends with nothing (its future
    /// dropped, its `init` panicking, a key `get_all`'s `load_missing` left out of its result)
    /// leaves it as it was. Nor do they make one: they have no error or `None` to remember (a
    /// key `load_missing` leaves out is a failed load, not remembered: the callers waiting on
    /// it load it themselves, and the next call asks for it again). A write or invalidation of
    /// the key ends it early (a computation's `Put` or `Remove` too; one that changes nothing
    /// leaves it). With [`fail_safe`](Self::fail_safe), a failed
    /// load of a key whose last value is within its stale window answers with that value
    /// instead, and a failed refresh is not remembered (its value, once expired, answers).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.stampede.negative_ttl = Some(nanos(ttl));
        self
    }

    /// At most `n` loads (and refreshes) run at once across all keys. Further loads wait in
    /// arrival order (a leader waits before running its loader; callers joining a load just
    /// wait for it); refreshes over the limit wait on the spawner, or without one are deferred
    /// to a later read, never lost. A caller with a soft timeout
    /// ([`load_timeout`](Self::load_timeout), [`Cache::load_with_timeout`]) that leads a load
    /// waits for its permit only until the timeout: then it leaves the queue and the load (its
    /// loader does not run) and answers as on any timeout (with
    /// [`fail_safe`](Self::fail_safe), the last value). Async loads wait for their permit until
    /// they are dropped.
    ///
    /// **Nested loads.** A load started inside a load of this cache that holds a permit (its
    /// loader or `init` asks the cache for another key) runs under that permit instead of
    /// waiting for a second one, so `n` counts outermost loads and nesting cannot deadlock on
    /// the limit. A shared async load ([`Cache::get_with_async_shared`], [`Cache::load_async`])
    /// keeps a permit only once it got its own: until then it runs only while a caller that
    /// holds one polls it (and waits for it meanwhile) or blocks waiting for it (lending its
    /// permit: a blocking caller whose wait ends, by a timeout say, first lets a poll running
    /// under its permit finish; the permit also runs the polls of the shared loads it is
    /// nested in, which are what drive it), and otherwise waits for a permit — a load whose
    /// parent stopped waiting for it (a `select!` that moved on) does not go on beside its parent
    /// under the parent's permit. Once only callers inside other loads' polls wait for a shared
    /// load (its outermost callers were dropped), it gives up its place in the queue, or its
    /// own permit (to the next in line): it is then part of those loads, driven by their polls
    /// under their permits (keeping its own, it would wait for them while they wait for it).
    /// A [`Cache::get_with_async`] future polled inside a load
    /// before it got a permit of its own runs under that load's permit until it ends, wherever
    /// it is polled afterwards: it is part of that load (and a shared load it is nested in may
    /// be polled under that permit, since its polls drive it) — unless that permit was only
    /// lent to the poll by a blocking caller: it then goes on as a shared load does. A lent
    /// permit runs one poll at a time. A caller inside a load that joins a load of another key
    /// waiting for a permit: if that load is shared, an async caller polls it under its permit
    /// (its `init` runs, and a panic of it reaches this caller, as a shared load's panic
    /// reaches whoever polls it); if its leader drives it itself (a blocking or a
    /// [`Cache::get_with_async`] leader), the caller takes it over with its own loader or
    /// `init`, since only that leader could start it; taken over inside a shared load's poll,
    /// it is driven by that load's polls, which a caller holding a permit that waits for it
    /// then runs under that permit (lent, for a blocking caller).
    ///
    /// Permits are per cache: a load of another cache inside this one's loader takes a permit
    /// of that cache. Two caches whose loaders ask each other (A's loads load from B, B's from
    /// A) can wait for each other with both limits full, as two locks taken in opposite orders.
    ///
    /// **What the limit cannot see**, and can then wait on forever with the limit full: a load
    /// that waits for the cache through another task or thread (a spawned task's handle, a
    /// channel) rather than by awaiting or calling it; a load that waits for a compute closure
    /// ([`Cache::entry`]) which itself waits for a load queued for a permit. And permits are
    /// marked per thread, not per task: tasks that another executor runs inside a loader (a
    /// loader's `block_on` on a current-thread runtime) run their loads under the loader's
    /// permit.
    ///
    /// # Example
    ///
    /// ```
    /// use herdcache::Cache;
    ///
    /// let cache: Cache<u64, u64> = Cache::builder()
    ///     .max_capacity(1000)
    ///     .max_concurrent_loads(1)
    ///     .build();
    /// // The outer load holds the only permit; the nested one runs under it.
    /// let v = cache.get_with(1, || cache.get_with(2, || 20) + 1);
    /// assert_eq!(v, 21);
    /// ```
    pub fn max_concurrent_loads(mut self, n: usize) -> Self {
        self.stampede.limiter = Some(crate::limit::Limiter::new(n));
        self
    }

    /// Runs refreshes (and, with a soft timeout, loads) on `spawn` instead of in the caller:
    /// a thread pool, or a runtime handle captured when the cache is built, e.g.
    /// `move |job| { handle.spawn_blocking(job); }` with `handle = tokio::runtime::Handle::current()`
    /// (plain `tokio::task::spawn_blocking` panics when a read happens off the runtime).
    ///
    /// A spawner that panics, or drops a job without running it, never leaves a key loading:
    /// the job owns its load, and dropping it unrun releases the key. A refresh is then retried
    /// after the refresh backoff; a load falls back to running in its caller.
    ///
    /// A job holds a handle to the cache until it runs or is dropped: a spawner that keeps
    /// jobs it never runs (a queue captured by the spawner itself) keeps the cache, and its
    /// entries, alive. Run or drop parked jobs. And a caller of the key waits for a parked
    /// job as for any load of it (a load's caller, and — once the entry expires — a caller
    /// joining its refresh): a queue that only the waiting thread would drain never is, so run
    /// jobs on other threads, or bound the wait ([`load_timeout`](Self::load_timeout)).
    ///
    /// # Example
    ///
    /// Refreshes on tokio's blocking pool, through a handle captured when the cache is built, so
    /// that reads from any thread — on the runtime or not — hand their refreshes to it:
    ///
    /// ```
    /// use herdcache::{BoxError, Cache};
    /// use std::time::Duration;
    ///
    /// let runtime = tokio::runtime::Runtime::new().unwrap();
    /// let cache: Cache<u64, String> = runtime.block_on(async {
    ///     let handle = tokio::runtime::Handle::current(); // captured once, here
    ///     Cache::builder()
    ///         .max_capacity(10_000)
    ///         .time_to_live(Duration::from_secs(60))
    ///         .refresh_after(Duration::from_secs(10))
    ///         .loader(|id: &u64| Ok::<_, BoxError>(format!("user {id}")))
    ///         .spawner(move |job| {
    ///             handle.spawn_blocking(job);
    ///         })
    ///         .build()
    /// });
    /// // A plain thread, off the runtime: its refreshes still go to the runtime's pool.
    /// let c = cache.clone();
    /// let v = std::thread::spawn(move || c.load(1).unwrap()).join().unwrap();
    /// assert_eq!(v, "user 1");
    /// ```
    pub fn spawner(
        mut self,
        spawn: impl Fn(Box<dyn FnOnce() + Send>) + Send + Sync + 'static,
    ) -> Self {
        self.stampede.spawner = Some(Arc::new(spawn));
        self
    }

    /// The default soft timeout of [`Cache::load`]: see [`Cache::load_with_timeout`]. It bounds
    /// the wait for another caller's load, the spawner's, and a leader's wait for a
    /// [`max_concurrent_loads`](Self::max_concurrent_loads) permit; not a loader that this
    /// caller already runs itself.
    pub fn load_timeout(mut self, timeout: Duration) -> Self {
        self.stampede.load_timeout = Some(timeout);
        self
    }

    /// Fail-safe (FusionCache's name for it): when the load of an expired key fails — the
    /// loader's error, a panic, an abandoned leader, a soft timeout (also one that passes while
    /// the leader waits for a [`max_concurrent_loads`](Self::max_concurrent_loads) permit:
    /// without a spawner its loader then does not run; with one, the spawned job keeps
    /// waiting for its permit and loads then, as
    /// [`load_with_timeout`](crate::Cache::load_with_timeout) says) — its callers get the last
    /// value instead of the error, up to `max_stale` past its deadline, and the key is retried
    /// after [`refresh_backoff`](Self::refresh_backoff) by one caller (the others get the last
    /// value meanwhile, with no load). Never beyond `max_stale`. Expired entries are kept (and
    /// count towards `max_capacity`) until `max_stale` passes; plain reads (`get`) never see
    /// them. A full cache evicts them before live entries, the longest expired first
    /// (reported [`Expired`](crate::RemovalCause::Expired)); one that expired in the last
    /// ≈67 ms may not be known stale yet and then goes in the policy's order. Counted in
    /// [`CacheStats::stale_served_after_ttl`](crate::CacheStats::stale_served_after_ttl). Needs
    /// a deadline to act on (a time to live, a time to idle or an `Expiry`).
    ///
    /// The calls that fall back are those that load on a miss: the `get_with` and `load`
    /// families (blocking and async), `get_all` and the entry API's `or_insert_with` family.
    /// Until a load of the expired key fails, it is loaded as usual (single-flight, the new
    /// value replaces the old one). A `None` of an `optionally_` loader is an answer, not a
    /// failure: it removes the old value for good, as a write or invalidation of the key does
    /// (and a computation's [`Op::Remove`](crate::Op::Remove));
    /// [`retain`](crate::Cache::retain) offers the old value to its predicate. A load that a
    /// write or invalidation of the key won over (it began before them) falls back on nothing
    /// when it fails: its callers get the failure, and the value that write stored is put in
    /// no backoff. A computation of the key (`and_compute_with` & co.) is no retry: past the
    /// retry deadline, the key's callers wait for it and take its value, as without
    /// fail-safe. An async caller whose runtime cuts the load off (the future dropped) asks
    /// [`get_or_stale`](crate::Cache::get_or_stale). On a soft
    /// timeout the load goes on, and its callers get the old value at once until it ends.
    ///
    /// ```
    /// use herdcache::{BoxError, Cache, ManualClock};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// let clock = ManualClock::new();
    /// let down = Arc::new(AtomicBool::new(false));
    /// let d = Arc::clone(&down);
    /// let cache: Cache<u32, String> = Cache::builder()
    ///     .max_capacity(100)
    ///     .time_to_live(Duration::from_secs(60))
    ///     .fail_safe(Duration::from_secs(600))
    ///     .refresh_backoff(Duration::from_secs(5))
    ///     .clock(clock.clone())
    ///     .loader(move |k: &u32| {
    ///         if d.load(Ordering::SeqCst) {
    ///             Err(BoxError::from("backend down"))
    ///         } else {
    ///             Ok(format!("value {k}"))
    ///         }
    ///     })
    ///     .build();
    /// assert_eq!(cache.load(1).unwrap(), "value 1");
    /// down.store(true, Ordering::SeqCst);
    /// clock.advance(Duration::from_secs(61)); // expired, backend down
    /// assert_eq!(cache.load(1).unwrap(), "value 1"); // the last value, not the error
    /// assert_eq!(cache.get(&1), None); // plain reads never see an expired value
    /// clock.advance(Duration::from_secs(600)); // past max_stale
    /// assert!(cache.load(1).is_err());
    /// ```
    pub fn fail_safe(mut self, max_stale: Duration) -> Self {
        self.stampede.fail_safe = Some(nanos(max_stale));
        self
    }

    /// After a failed refresh (or, with [`fail_safe`](Self::fail_safe), a failed load of an
    /// expired key), wait this long before the next attempt (default: the `refresh_after`
    /// period, else one second). A zero backoff is taken as one nanosecond: the next attempt
    /// may come at once. Also how long a key whose loader panicked answers
    /// [`LoadError::Panicked`](crate::LoadError::Panicked) without loading again, on a cache
    /// that keeps time (see there).
    pub fn refresh_backoff(mut self, d: Duration) -> Self {
        self.stampede.refresh_backoff = nanos(d).max(1);
        self
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
    /// [`BuildError`]: [`NoCapacity`](BuildError::NoCapacity) when `max_capacity` is missing;
    /// [`BadShardCount`](BuildError::BadShardCount) unless the shard count is
    /// in 1..=1024; [`BadFraction`](BuildError::BadFraction) for a jitter outside
    /// [0, 1) or an early-refresh `β` that is not positive and finite;
    /// [`RefreshWithoutLoader`](BuildError::RefreshWithoutLoader) for `refresh_after` or
    /// `early_refresh` without a loader; [`EarlyRefreshWithoutTtl`](BuildError::EarlyRefreshWithoutTtl)
    /// for `early_refresh` without a time to live.
    pub fn try_build(self) -> Result<Cache<K, V, S>, BuildError> {
        let capacity = self.max_capacity.ok_or(BuildError::NoCapacity)?;
        let durations = (self.ttl, self.tti);
        let shards = match self.shards {
            // Rounded up to a power of two, as moka's `num_segments`.
            Some(n @ 1..=1024) => n.next_power_of_two(),
            Some(n) => return Err(BuildError::BadShardCount(n)),
            None => default_shards(capacity),
        };
        // With lifetime bounds to keep (the Redis tier: a copy read from Redis must not
        // outlive the shared one), a configuration whose reads move an entry's deadline (a
        // time to idle, an `Expiry`) keeps a hard deadline per entry, where the bound goes: a
        // time to live of "never" when none is set (the bound alone then). Without it a read
        // would move the deadline past the bound.
        let hard = |ttl: Option<Duration>, reads_move: bool| {
            ttl.map(nanos)
                .or((self.bounded_lifetimes && reads_move).then_some(crate::clock::NEVER))
        };
        let expiry = match (self.expiry, self.ttl, self.tti) {
            (Some(expiry), ttl, tti) => ExpiryConfig::Custom {
                expiry,
                ttl: hard(ttl, true),
                tti: tti.map(nanos),
            },
            // No expiry, but lifetime bounds to keep: deadlines of "never", unless bounded.
            (None, None, None) if self.bounded_lifetimes => ExpiryConfig::Fixed {
                ttl: None,
                tti: None,
            },
            (None, None, None) => ExpiryConfig::None,
            (None, ttl, tti) => ExpiryConfig::Fixed {
                ttl: hard(ttl, tti.is_some()),
                tti: tti.map(nanos),
            },
        };
        if !(0.0..1.0).contains(&self.jitter)
            || self.early_beta.is_some_and(|b| !(b > 0.0 && b.is_finite()))
        {
            return Err(BuildError::BadFraction);
        }
        let mut stampede = self.stampede;
        let async_refresh = stampede.async_loader.is_some() && stampede.future_spawner.is_some();
        if (self.refresh_after.is_some() || self.early_beta.is_some())
            && stampede.loader.is_none()
            && !async_refresh
        {
            return Err(BuildError::RefreshWithoutLoader);
        }
        if self.early_beta.is_some() && self.ttl.is_none() {
            return Err(BuildError::EarlyRefreshWithoutTtl);
        }
        let refresh_after = self.refresh_after.map(nanos);
        if stampede.refresh_backoff == 0 {
            stampede.refresh_backoff = refresh_after.unwrap_or(1_000_000_000).max(1);
        }
        let mut layout = Layout::for_expiry(&expiry, refresh_after, self.early_beta, self.jitter);
        if let Some(max_stale) = stampede.fail_safe {
            layout = layout.with_fail_safe(max_stale);
        }
        stampede.monitor = crate::monitor::Monitor::new(crate::monitor::HealthConfig {
            ttl: self.ttl.map(nanos),
            refresh_after,
            // A custom expiry sets its own deadlines (a time to live only bounds them): written
            // entries need not fall due together.
            spread: self.jitter > 0.0
                // Refresh ahead, only if it comes before the time to live: at or past it, no
                // entry is refreshed before it expires (round 97: any `refresh_after`, even
                // `Duration::MAX`, hid a wave).
                || refresh_after.is_some_and(|r| self.ttl.is_none_or(|ttl| r < nanos(ttl)))
                || self.early_beta.is_some()
                || matches!(expiry, ExpiryConfig::Custom { .. })
                // A time to idle shorter than the time to live: reads move an entry's deadline
                // (last access + TTI), which the ring, counting writes, does not see (round 94:
                // entries written together and read at spread times reported as one wave).
                || self.tti.is_some_and(|tti| self.ttl.is_none_or(|ttl| tti < ttl)),
            // `negative_ttl(Duration::ZERO)` remembers nothing: no negative caching.
            negative_caching: stampede.negative_ttl.is_some_and(|t| t > 0),
        });
        let clock = self.clock.map_or_else(Clock::system, Clock::manual);
        Ok(Cache::from_parts(Parts {
            capacity,
            shards,
            weigher: self.weigher,
            expiry,
            layout,
            stampede,
            refresh: self.refresh,
            hasher: self.hasher,
            clock,
            stats: self.stats,
            listener: self.listener,
            name: self.name.unwrap_or_else(|| "herdcache".to_string()),
            durations,
            // As moka reports: 1 for a cache not asked to be segmented.
            segments: if self.shards.is_some() { shards } else { 1 },
            sizing: self.sizing,
            lru: self.eviction.lru,
        }))
    }
}

impl<K, V, S> CacheBuilder<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Hashes keys with `hasher` instead of the randomly seeded default. Every other setting
    /// given before or after it is kept.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let cache: herdcache::Cache<u32, u32, RandomState> = herdcache::Cache::builder()
    ///     .max_capacity(100)
    ///     .loader(|k: &u32| Ok::<_, herdcache::BoxError>(k + 1))
    ///     .hasher(RandomState::new())
    ///     .build();
    /// assert_eq!(cache.load(1).unwrap(), 2);
    /// ```
    pub fn hasher<S2>(self, hasher: S2) -> CacheBuilder<K, V, S2>
    where
        S2: BuildHasher + Clone + Send + Sync + 'static,
    {
        CacheBuilder {
            max_capacity: self.max_capacity,
            weigher: self.weigher,
            ttl: self.ttl,
            tti: self.tti,
            expiry: self.expiry,
            hasher,
            clock: self.clock,
            shards: self.shards,
            stampede: self.stampede,
            // The same function, for the cache type with the new hasher.
            refresh: self.refresh.map(|_| Cache::<K, V, S2>::start_refresh as _),
            refresh_after: self.refresh_after,
            early_beta: self.early_beta,
            jitter: self.jitter,
            stats: self.stats,
            sizing: self.sizing,
            eviction: self.eviction,
            listener: self.listener,
            name: self.name,
            bounded_lifetimes: self.bounded_lifetimes,
            _types: PhantomData,
        }
    }

    /// Builds the cache with `hasher` (moka's shape): the same as
    /// [`hasher`](Self::hasher)`(hasher).`[`build`](Self::build)`()`.
    ///
    /// # Panics
    ///
    /// As [`build`](Self::build).
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let cache = herdcache::Cache::<u32, u32>::builder()
    ///     .max_capacity(10)
    ///     .build_with_hasher(RandomState::new());
    /// cache.insert(1, 1);
    /// assert_eq!(cache.get(&1), Some(1));
    /// ```
    pub fn build_with_hasher<S2>(self, hasher: S2) -> Cache<K, V, S2>
    where
        S2: BuildHasher + Clone + Send + Sync + 'static,
    {
        self.hasher(hasher).build()
    }

    /// How to load any key (as Caffeine's `LoadingCache`): used by [`Cache::load`] and by
    /// refreshes. Called without any lock held; may block.
    pub fn loader<E>(mut self, load: impl Fn(&K) -> Result<V, E> + Send + Sync + 'static) -> Self
    where
        E: Into<BoxError>,
    {
        self.stampede.loader = Some(Arc::new(move |k: &K| load(k).map_err(Into::into)));
        self.stampede.clone_key = Some(K::clone);
        self.refresh = Some(Cache::start_refresh);
        self
    }

    /// How to load any key asynchronously: used by [`Cache::load_async`] and, with a
    /// [`future_spawner`](Self::future_spawner), by refreshes (which then run as futures on
    /// your runtime instead of blocking jobs). The future is polled with no lock held.
    pub fn async_loader<F, Fut, E>(mut self, load: F) -> Self
    where
        F: Fn(&K) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.stampede.async_loader = Some(Arc::new(move |k: &K| {
            let fut = load(k);
            Box::pin(async move { fut.await.map_err(Into::into) }) as crate::settings::BoxFuture<_>
        }));
        self.stampede.clone_key = Some(K::clone);
        self.refresh = Some(Cache::start_refresh);
        self
    }

    /// Runs refreshes with the [`async_loader`](Self::async_loader) as futures on `spawn`,
    /// e.g. `|f| { tokio::spawn(f); }`. Without it, refreshes use the blocking
    /// [`loader`](Self::loader).
    pub fn future_spawner(
        mut self,
        spawn: impl Fn(crate::settings::BoxFuture<()>) + Send + Sync + 'static,
    ) -> Self {
        self.stampede.future_spawner = Some(Arc::new(spawn));
        self
    }

    /// Refresh-ahead: a read of an entry written at least `d` ago returns its value at once
    /// and starts exactly one reload of the key with the [`loader`](Self::loader) (on the
    /// [`spawner`](Self::spawner) if set, else in the reader that triggered it). On failure the
    /// old value is kept — never beyond its `time_to_live` — and the next attempt waits
    /// [`refresh_backoff`](Self::refresh_backoff). Requires a loader.
    pub fn refresh_after(mut self, d: Duration) -> Self {
        self.refresh_after = Some(d);
        self
    }

    /// Probabilistic early refresh (XFetch, Vattani et al., VLDB 2015): a read refreshes its
    /// entry before it expires with probability `exp(−remaining / (δ·β))`, where `δ` is how
    /// long that key took to load (measured by the cache) and `remaining` the time to its
    /// `time_to_live` deadline. `β = 1` is the paper's optimum; larger refreshes earlier.
    /// Requires a loader and a time to live.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.early_beta = Some(beta);
        self
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

impl<K, V> Cache<K, V, crate::DefaultHashBuilder>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// A cache holding at most `max_capacity` entries, without expiry.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(2);
    /// cache.insert(1, "one");
    /// assert_eq!(cache.get(&1), Some("one"));
    /// ```
    pub fn new(max_capacity: u64) -> Self {
        Self::builder().max_capacity(max_capacity).build()
    }

    /// A builder for every other setting (weigher, expiry, clock, hasher, shards).
    ///
    /// ```
    /// use std::time::Duration;
    /// let cache: herdcache::Cache<u32, String> = herdcache::Cache::builder()
    ///     .max_capacity(1000)
    ///     .time_to_live(Duration::from_secs(30))
    ///     .build();
    /// # drop(cache);
    /// ```
    pub fn builder() -> CacheBuilder<K, V, crate::DefaultHashBuilder> {
        CacheBuilder::unbounded()
    }
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
        let r = CacheBuilder::<u32, u32>::unbounded().try_build();
        assert_eq!(r.err(), Some(BuildError::NoCapacity));
        struct E;
        impl Expiry<u32, u32> for E {}
        let r = CacheBuilder::<u32, u32>::unbounded()
            .max_capacity(1)
            .time_to_live(Duration::from_secs(1))
            .time_to_idle(Duration::from_secs(1))
            .expire_after(E)
            .try_build();
        assert!(
            r.is_ok(),
            "expire_after combines with a time to live and idle"
        );
        let r = CacheBuilder::<u32, u32>::unbounded()
            .max_capacity(1)
            .shards(1025)
            .try_build();
        assert_eq!(r.err(), Some(BuildError::BadShardCount(1025)));
    }
}
