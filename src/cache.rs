//! The concurrent cache: hash once, route to a shard, lock, delegate.

use crate::builder::Listener;
use crate::builder::{CacheBuilder, Weigher};
use crate::clock::{Clock, NEVER};
use crate::expiry::ExpiryConfig;
use crate::flight::Flight;
use crate::policy::tune_word;
use crate::refresh::Stampede;
use crate::select::{sample, Samples, Selector};
use crate::stats::{CacheStats, Counter, Stats};

use crate::shard::{Found, Garbage, RemovalCause, Removed, Shard};
use crate::sync::RwLock;
use crossbeam_utils::CachePadded;
use std::borrow::Borrow;
use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A sharded, bounded, concurrent in-memory cache.
///
/// Cloning a `Cache` is cheap: clones are handles to the same cache. It is `Send + Sync` when `K`
/// and `V` are.
///
/// # Example
///
/// ```
/// use herdcache::Cache;
///
/// let cache: Cache<String, u64> = Cache::new(10_000);
/// cache.insert("answer".to_string(), 42);
/// assert_eq!(cache.get("answer"), Some(42)); // look up by &str
/// assert_eq!(cache.remove("answer"), Some(42));
/// assert!(!cache.contains_key("answer"));
/// ```
///
/// # Locks and user code
///
/// Each shard is guarded by a read-write lock. `get` takes the read lock; writes take the write
/// lock of one shard (two, in turn, when eviction moves to another shard). The key's `Hash`
/// and `Eq`, the value's `Clone` (in `get`) and [`Expiry`](crate::Expiry) callbacks run under a
/// shard lock and must not call back into the same cache; the weigher runs before any lock is
/// taken, and values are dropped after the lock is released.
pub struct Cache<K, V, S = crate::DefaultHashBuilder> {
    pub(crate) inner: Arc<Inner<K, V, S>>,
}

impl<K, V, S> Clone for Cache<K, V, S> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V, S> fmt::Debug for Cache<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.name)
            .field("max_capacity", &self.inner.capacity)
            .field("weighted_size", &self.inner.weight.load(Ordering::Relaxed))
            .field("shards", &self.inner.shards.len())
            .field("time_to_live", &self.inner.durations.0)
            .field("time_to_idle", &self.inner.durations.1)
            .finish_non_exhaustive()
    }
}

/// The configuration of a cache, as moka's `Policy`: see [`Cache::policy`].
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
    max_capacity: u64,
    shards: usize,
    time_to_live: Option<Duration>,
    time_to_idle: Option<Duration>,
}

impl Policy {
    /// The bound (entries, or total weight with a weigher). Always `Some`: herdcache caches are
    /// bounded; the `Option` is moka's shape.
    pub fn max_capacity(&self) -> Option<u64> {
        Some(self.max_capacity)
    }

    /// The time to live set with
    /// [`CacheBuilder::time_to_live`](crate::CacheBuilder::time_to_live), if any (`None` with
    /// [`expire_after`](crate::CacheBuilder::expire_after): expiry is then per entry).
    pub fn time_to_live(&self) -> Option<Duration> {
        self.time_to_live
    }

    /// The time to idle set with
    /// [`CacheBuilder::time_to_idle`](crate::CacheBuilder::time_to_idle), if any.
    pub fn time_to_idle(&self) -> Option<Duration> {
        self.time_to_idle
    }

    /// The number of shards (moka's name: segments).
    pub fn num_segments(&self) -> usize {
        self.shards
    }

    /// The number of shards; the same as [`num_segments`](Self::num_segments).
    pub fn shard_count(&self) -> usize {
        self.shards
    }
}

pub(crate) struct ShardCell<K, V> {
    pub(crate) lock: RwLock<Shard<K, V>>,
    /// Approximate count of accesses (sampled, see [`note_access`]).
    accesses: AtomicU64,
    /// This shard's sampled accesses, for the cache's configuration selector.
    samples: Samples,
}

/// Who writes a value: a caller (whose write supersedes any load of the key in flight), or a
/// load publishing its result (stored only if its flight is still registered).
pub(crate) enum Write<'a, K, V> {
    Plain,
    Load(&'a Arc<Flight<K, V>>),
}

pub(crate) struct Inner<K, V, S> {
    pub(crate) shards: Box<[CachePadded<ShardCell<K, V>>]>,
    mask: usize,
    pub(crate) hasher: S,
    pub(crate) clock: Clock,
    capacity: u64,
    /// The sum of all shards' weights; changed only under the shard lock whose weight changes.
    weight: AtomicU64,
    weigher: Option<Weigher<K, V>>,
    pub(crate) expiry: ExpiryConfig<K, V>,
    /// Whether anything needs the time (expiry, refresh).
    timed: bool,
    pub(crate) stampede: Stampede<K, V, S>,
    pub(crate) stats: Option<Stats>,
    listener: Option<Listener<K, V>>,
    name: String,
    /// The time to live and time to idle as configured (for [`Cache::policy`]).
    durations: (Option<Duration>, Option<Duration>),
    /// The counters of a shared second tier, once one is attached (feature `redis`).
    pub(crate) remote: std::sync::OnceLock<Arc<crate::stats::RemoteCounters>>,
    /// The policy's configuration selector (none with a weigher: the configuration is fixed),
    /// its sampling threshold (0: nothing sampled) and its current choice, as a tune word.
    selector: Option<crate::sync::Mutex<Selector>>,
    sample_threshold: AtomicU64,
    /// The sizing curve's shadows, when tracked (see `sizing`).
    pub(crate) sizing: Option<crate::sync::Mutex<crate::sizing::Tracker>>,
    tune: AtomicU64,
}

impl<K, V, S> Inner<K, V, S> {
    /// Whether the cache has a weigher.
    pub(crate) fn weigher_set(&self) -> bool {
        self.weigher.is_some()
    }
}

crate::sync::thread_local_shim! {
    static ACCESS_TICK: Cell<u32> = Cell::new(0);
}

/// A read's right to start a refresh (the entry's refresh deadline, set to "refreshing" by
/// that read): unless kept, dropping it makes the entry due again at the given time.
struct RefreshClaim<'a>(Option<&'a crate::sync::AtomicU64>, u64);

impl RefreshClaim<'_> {
    /// The refresh was handed over: nothing to give back.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RefreshClaim<'_> {
    fn drop(&mut self) {
        if let Some(at) = self.0 {
            let _ = at.compare_exchange(
                crate::shard::REFRESHING,
                self.1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
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
    fn new(cache: &'a Cache<K, V, S>, shard: &'a mut Shard<K, V>) -> Self {
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

/// Every `ACCESS_SAMPLE`-th access of a thread adds `ACCESS_SAMPLE` to the shard it touches; in
/// expectation each shard's counter tracks its accesses, with one shared write per 64 reads.
const ACCESS_SAMPLE: u32 = 64;
/// Every this many accesses a thread also tries to run expiry maintenance on the shard.
const MAINTAIN_EVERY: u32 = 1024;

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

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) fn from_parts(parts: crate::builder::Parts<K, V, S>) -> Self {
        let crate::builder::Parts {
            capacity,
            shards,
            weigher,
            expiry,
            layout,
            stampede,
            hasher,
            clock,
            stats,
            listener,
            name,
            durations,
            sizing,
        } = parts;
        let timed = layout.stride > 0 || stampede.negative_ttl.is_some();
        // A cache that keeps no time never reads the clock (so never starts the coarse clock's
        // thread): its instants are all 0, as `now` returns.
        let now = if timed { clock.now() } else { 0 };
        let n = shards as u64;
        let seed = hasher.hash_one(0x5eed_u64);
        let cells = (0..n)
            .map(|i| {
                // Shares add up to the capacity exactly.
                let share = capacity / n + u64::from(i < capacity % n);
                CachePadded::new(ShardCell {
                    lock: RwLock::new(Shard::new(share, layout, now, seed.wrapping_add(i))),
                    accesses: AtomicU64::new(0),
                    samples: Samples::default(),
                })
            })
            .collect();
        // Entry-bounded caches choose their configuration by miniature simulation; with a
        // weigher the shadows' sizes are unknown (the capacity is in weight units) and the
        // configuration stays at window 1 % + ghost admission.
        let selector = weigher
            .is_none()
            .then(|| crate::sync::Mutex::new(Selector::new(capacity, seed)));
        let sample_threshold = selector.as_ref().map_or(0, |s| s.lock().threshold());
        let tune = selector
            .as_ref()
            .map_or(tune_word(1, 0), |s| s.lock().tune());
        // The sizing curve samples a subset of the selector's keys (or, with a weigher, its own).
        let sizing = sizing.then(|| {
            let max = if selector.is_some() {
                sample_threshold
            } else {
                u64::MAX
            };
            crate::sync::Mutex::new(crate::sizing::Tracker::new(
                capacity,
                weigher.is_some(),
                tune,
                seed,
                max,
            ))
        });
        let sample_threshold = match (&selector, &sizing) {
            (None, Some(z)) => z.lock().threshold(),
            _ => sample_threshold,
        };
        Cache {
            inner: Arc::new(Inner {
                selector,
                sample_threshold: AtomicU64::new(sample_threshold),
                sizing,
                tune: AtomicU64::new(tune),
                shards: cells,
                mask: shards - 1,
                hasher,
                clock,
                capacity,
                weight: AtomicU64::new(0),
                weigher,
                timed,
                expiry,
                stampede,
                stats: stats.then(Stats::new),
                listener,
                name,
                durations,
                remote: std::sync::OnceLock::new(),
            }),
        }
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    #[inline]
    pub(crate) fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.inner.hasher.hash_one(key)
    }

    /// The shard for a hash. The table inside a shard uses the low bits (bucket) and the top
    /// seven (tag); routing uses bits 40.. so that the two do not correlate.
    #[inline]
    pub(crate) fn shard_index(&self, hash: u64) -> usize {
        ((hash >> 40) as usize) & self.inner.mask
    }

    #[inline]
    pub(crate) fn now(&self) -> u64 {
        if self.inner.timed {
            self.inner.clock.now()
        } else {
            0
        }
    }

    /// Whether the cache reads its clock (expiry, refresh, negative caching).
    pub(crate) fn keeps_time(&self) -> bool {
        self.inner.timed
    }

    /// The clock, when the cache keeps time (for loads that measure themselves).
    pub(crate) fn time_source(&self) -> Option<Clock> {
        self.inner.timed.then(|| self.inner.clock.clone())
    }

    /// Counts an access for the policy; returns true when the caller should run maintenance.
    #[inline]
    fn note_access(&self, cell: &ShardCell<K, V>) -> bool {
        let t = ACCESS_TICK.with(|t| {
            let v = t.get().wrapping_add(1);
            t.set(v);
            v
        });
        if t % ACCESS_SAMPLE == 0 {
            cell.accesses
                .fetch_add(u64::from(ACCESS_SAMPLE), Ordering::Relaxed);
            return t % MAINTAIN_EVERY == 0 && self.inner.timed;
        }
        false
    }

    /// Looks `key` up and applies `f` to the value under the read lock. `record`: count the
    /// hit or miss in the statistics.
    #[inline]
    pub(crate) fn get_map<Q, R>(
        &self,
        key: &Q,
        hash: u64,
        record: bool,
        f: impl FnOnce(&V) -> R,
    ) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard_index(hash);
        let cell = &self.inner.shards[i];
        let maintain = self.note_access(cell);
        let now = self.now();
        let guard = cell.lock.read();
        let found = match guard.lookup(hash, key, now, &self.inner.expiry, crate::refresh::coin) {
            Found::Hit(v) => {
                let r = f(v);
                drop(guard);
                if record {
                    self.count_fast(Counter::Hit);
                    self.note_sample(cell, hash, true);
                }
                return Some(r);
            }
            Found::StaleHit(v) => {
                let r = f(v);
                drop(guard);
                if record {
                    self.count_fast(Counter::Hit);
                    self.count(Counter::StaleServed);
                    self.note_sample(cell, hash, true);
                }
                return Some(r);
            }
            Found::Stale(k, v) => {
                // This read won the right to start the key's refresh. Until it has handed the
                // refresh over, a guard gives that right back if user code panics (the key's or
                // the value's `Clone`), so the refresh is never lost.
                let claim = RefreshClaim(guard.refresh_deadline_of(v), now);
                let r = f(v);
                let st = &self.inner.stampede;
                let refresh = st
                    .clone_key
                    .zip(st.refresh)
                    .map(|(clone, refresh)| (clone(k), refresh));
                claim.keep();
                drop(guard);
                if record {
                    self.count_fast(Counter::Hit);
                    self.count(Counter::StaleServed);
                    self.note_sample(cell, hash, true);
                }
                if let Some((k, refresh)) = refresh {
                    refresh(self, k, hash);
                }
                return Some(r);
            }
            Found::Expired => true,
            Found::Absent => false,
        };
        drop(guard);
        if record {
            self.count_fast(Counter::Miss);
            self.note_sample(cell, hash, false);
        }
        if found || maintain {
            // An expired entry was seen (or it is time): reclaim, if the lock is free now.
            if let Some(mut s) = cell.lock.try_write() {
                let mut out = Garbage::new();
                let acct = Accounting::new(self, &mut *s);
                acct.shard.expire(now, false, &self.inner.hasher, &mut out);
                if found {
                    // Only the expired entry: a write may have replaced it since the read.
                    acct.shard.remove_expired(hash, key, now, &mut out);
                }
                drop(acct);
                drop(s);
                self.finish(out);
            }
        }
        None
    }

    /// Records a read of `hash` in its shard's sample buffer if the key is sampled; when the
    /// buffer fills, drains it if the shard's write lock is free (never waits for it).
    #[inline]
    fn note_sample(&self, cell: &ShardCell<K, V>, hash: u64, hit: bool) {
        if Selector::sampled(hash, self.inner.sample_threshold.load(Ordering::Relaxed))
            && cell.samples.push(sample(hash, hit))
        {
            self.drain_samples_now(cell);
        }
    }

    /// A sampled insert of a weighted cache, for the sizing curve (the caller holds the
    /// shard's write lock and drained its samples first, so the key's sampled `get` went in
    /// before; when they could not be drained, the insert is dropped rather than reordered).
    fn note_insert(&self, cell: &ShardCell<K, V>, hash: u64, weight: u32, tune: u64) {
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
    fn drain_samples(&self, cell: &ShardCell<K, V>) {
        if !cell.samples.pending() {
            return;
        }
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
                z.set_requests(self.requests());
            }
        }
        let lost = cell.samples.drain(|s| {
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

    /// The reads so far, as the shards' approximate access counters have them (see
    /// [`note_access`](Self::note_access)).
    pub(crate) fn requests(&self) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|c| c.accesses.load(Ordering::Relaxed))
            .sum()
    }

    /// Gives back a read's claim to refresh `key`: the entry is due again at `at`.
    pub(crate) fn reset_refresh(&self, hash: u64, key: &K, at: u64) {
        self.inner.shards[self.shard_index(hash)]
            .lock
            .read()
            .reset_refresh(hash, key, at);
    }

    /// Counts one event in the statistics, if they are recorded.
    #[inline]
    pub(crate) fn count(&self, c: Counter) {
        if let Some(s) = &self.inner.stats {
            s.add(c, 1);
        }
    }

    /// Adds `n` to a counter, if statistics are recorded.
    #[inline]
    pub(crate) fn count_n(&self, c: Counter, n: u64) {
        if let Some(s) = &self.inner.stats {
            s.add(c, n);
        }
    }

    #[inline]
    fn count_fast(&self, c: Counter) {
        if let Some(s) = &self.inner.stats {
            s.add_fast(c, 1);
        }
    }

    /// Reports removed entries to the statistics and the eviction listener, then drops them.
    /// Called with no lock held. If the listener panics, the other entries are still reported
    /// and dropped, and the first panic is then resumed in the caller.
    #[inline(always)]
    pub(crate) fn finish(&self, out: Garbage<K, V>) {
        if self.inner.stats.is_none() && self.inner.listener.is_none() {
            return; // nothing to report: `out` drops here, after the lock
        }
        let panic = self.report(&out);
        drop(out);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Reports removed entries to the statistics and the listener (each exactly once); returns
    /// the first panic of the listener, if any.
    fn report(&self, out: &Garbage<K, V>) -> Option<Box<dyn std::any::Any + Send>> {
        if out.is_empty() {
            return None;
        }
        if let Some(stats) = &self.inner.stats {
            for r in out.iter() {
                stats.removed(r.cause, r.weight);
            }
        }
        let listener = self.inner.listener.as_ref()?;
        let mut panic = None;
        for r in out.iter() {
            let call = std::panic::AssertUnwindSafe(|| listener(&r.key, &r.value, r.cause));
            if let Err(p) = std::panic::catch_unwind(call) {
                panic.get_or_insert(p);
            }
        }
        panic
    }

    /// Returns a clone of the value for `key`, or `None` if absent or expired.
    ///
    /// Takes the shard's read lock; records the hit for the eviction policy with one relaxed
    /// store on the entry.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert("k".to_string(), vec![1, 2]);
    /// assert_eq!(cache.get("k"), Some(vec![1, 2]));
    /// assert_eq!(cache.get("missing"), None);
    /// ```
    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        V: Clone,
    {
        self.get_map(key, self.hash(key), true, V::clone)
    }

    /// Whether a live entry for `key` is present. Does not count as an access.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, ());
    /// assert!(cache.contains_key(&1));
    /// ```
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let now = self.now();
        self.inner.shards[self.shard_index(hash)]
            .lock
            .read()
            .peek(hash, key, now)
            .is_some()
    }

    /// Adjusts the global weight after a shard's weight went from `before` to `after`; must be
    /// called while that shard is still locked.
    #[inline]
    fn account(&self, before: u64, after: u64) {
        if after > before {
            self.inner
                .weight
                .fetch_add(after - before, Ordering::AcqRel);
        } else if before > after {
            self.inner
                .weight
                .fetch_sub(before - after, Ordering::AcqRel);
        }
    }

    fn over_capacity(&self) -> bool {
        self.inner.weight.load(Ordering::Acquire) > self.inner.capacity
    }

    /// Inserts `key → value`, replacing any previous value, then evicts as needed.
    ///
    /// When `insert` returns, [`weighted_size`](Self::weighted_size) is at most `max_capacity`
    /// (concurrent inserts still in progress can each add at most one entry beyond it until they
    /// return). An entry heavier than `max_capacity` is not stored, and any previous value for
    /// `key` is removed. The weigher runs before any lock is taken; replaced and evicted values
    /// are dropped after the lock is released.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(1);
    /// cache.insert(1, "a");
    /// cache.insert(2, "b"); // evicts one of the two
    /// assert_eq!(cache.entry_count(), 1);
    /// ```
    pub fn insert(&self, key: K, value: V) {
        let hash = self.hash(&key);
        let weight = self.weigh(&key, &value);
        let mut out = Garbage::new();
        self.reporting_panics(&mut out, |out| {
            self.insert_with(hash, key, value, weight, Write::Plain, (0, NEVER), out)
        });
        self.finish(out);
    }

    /// Runs a write that may call user code under the lock (`Expiry`, a key's `Hash`); if it
    /// panics, what it removed before the panic is still reported, then the panic resumes.
    #[inline]
    pub(crate) fn reporting_panics<R>(
        &self,
        out: &mut Garbage<K, V>,
        write: impl FnOnce(&mut Garbage<K, V>) -> R,
    ) -> R {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(out))) {
            Ok(r) => r,
            Err(p) => {
                self.finish(std::mem::replace(out, Garbage::new()));
                std::panic::resume_unwind(p)
            }
        }
    }

    #[inline]
    pub(crate) fn weigh(&self, key: &K, value: &V) -> u32 {
        self.inner.weigher.as_ref().map_or(1, |w| w(key, value))
    }

    /// Inserts under the shard's write lock. A plain write supersedes (detaches) the key's load
    /// in flight, if any. A load's write ([`Write::Load`]) stores only if its flight is still
    /// registered — nothing wrote or invalidated the key since the load was claimed — and
    /// unregisters it in the same critical section (publish before release). The entry expires
    /// at `cap` at the latest (`NEVER`: no bound beyond its expiry policy). Returns whether the
    /// value was stored (or, too heavy, rejected as a write that wins).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_with(
        &self,
        hash: u64,
        key: K,
        value: V,
        weight: u32,
        write: Write<'_, K, V>,
        (took, cap): (u64, u64),
        out: &mut Garbage<K, V>,
    ) -> bool {
        let i = self.shard_index(hash);
        let cell = &self.inner.shards[i];
        let now = self.now();
        let mut s = cell.lock.write();
        self.drain_samples(cell);
        let tune = self.inner.tune.load(Ordering::Relaxed);
        if self.inner.weigher.is_some() {
            self.note_insert(cell, hash, weight, tune);
        }
        let registered = match write {
            Write::Plain => None,
            // A planted bug for the loom model to catch: a load stores without checking that
            // no write superseded it.
            #[cfg(herdcache_broken_model)]
            Write::Load(f) => s.remove_flight(hash, f),
            #[cfg(not(herdcache_broken_model))]
            Write::Load(f) => match s.remove_flight(hash, f) {
                Some(k) => Some(k),
                None => {
                    // Superseded: a later write won. Dropped with no lock held.
                    drop(s);
                    drop((key, value));
                    return false;
                }
            },
        };
        let acct = Accounting::new(self, &mut *s);
        if u64::from(weight) > self.inner.capacity {
            // Too heavy to store: the key ends up absent, its old value replaced by nothing.
            acct.shard.remove(
                hash,
                &key,
                now,
                &self.inner.hasher,
                out,
                RemovalCause::Replaced,
            );
            out.push(Removed {
                key,
                value,
                weight,
                cause: RemovalCause::Size,
            });
        } else {
            acct.shard.insert(
                hash,
                key,
                value,
                weight,
                now,
                &self.inner.expiry,
                &self.inner.hasher,
                (tune, took, cap),
                out,
            );
        }
        drop(acct);
        self.evict_in(&mut s, true, out);
        drop(s);
        drop(registered);
        if self.over_capacity() {
            self.evict_elsewhere(i, out);
        }
        true
    }

    /// Feeds every shard's pending samples to the selector and the sizing tracker, for shards
    /// whose write lock is free now (never waits).
    pub(crate) fn drain_pending_samples(&self) {
        for cell in self.inner.shards.iter() {
            if let Some(s) = cell.lock.try_write() {
                self.drain_samples(cell);
                drop(s);
            }
        }
    }

    /// Sets the sampling threshold (the sizing tracker of a weighted cache, which has no
    /// selector, after choosing a new rate).
    pub(crate) fn set_sample_threshold(&self, t: u64) {
        if self.inner.selector.is_none() {
            self.inner.sample_threshold.store(t, Ordering::Relaxed);
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

    /// The most loads that ever ran at once under `max_concurrent_loads` (0 without a limit),
    /// and how many loads had to wait for a permit. For tests and statistics.
    #[doc(hidden)]
    pub fn load_limit_stats(&self) -> (usize, usize) {
        self.inner
            .stampede
            .limiter
            .as_ref()
            .map_or((0, 0), |l| (l.high_water(), l.waited()))
    }

    /// Ends a computation that removes `key`: removes it and unregisters the computation's
    /// flight in one critical section — only if the flight is still registered (a write of the
    /// key during the computation wins and is kept). Returns whether it removed anything.
    pub(crate) fn remove_with_flight(
        &self,
        hash: u64,
        key: &K,
        flight: &Arc<Flight<K, V>>,
        out: &mut Garbage<K, V>,
    ) -> bool {
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        let Some(flight_key) = s.remove_flight(hash, flight) else {
            return false;
        };
        let removed = self.remove_locked(&mut s, hash, key, out);
        drop(s);
        drop(flight_key);
        removed
    }

    /// The number of loads in flight (not counting negative-cache entries).
    #[doc(hidden)]
    pub fn loads_in_flight(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|c| c.lock.read().flights_len())
            .sum()
    }

    /// A snapshot of the statistics (all zero unless the cache was built with
    /// [`record_stats`](crate::CacheBuilder::record_stats); the gauges are always filled).
    ///
    /// ```
    /// let cache = herdcache::Cache::builder().max_capacity(10).record_stats().build();
    /// let before = cache.stats();
    /// assert_eq!(cache.get_with(1, || 10), 10);
    /// assert_eq!(cache.get(&1), Some(10));
    /// let period = cache.stats() - before;
    /// assert_eq!((period.hits, period.misses, period.load_successes), (1, 1, 1));
    /// ```
    pub fn stats(&self) -> CacheStats {
        let mut s = self
            .inner
            .stats
            .as_ref()
            .map_or_else(CacheStats::default, Stats::snapshot);
        s.loads_in_flight = self.loads_in_flight() as u64;
        let (high, waited) = self.load_limit_stats();
        s.max_concurrent_loads_seen = high as u64;
        if let Some(r) = self.inner.remote.get() {
            s.remote = r.snapshot();
        }
        s.loads_waited_for_limit = waited as u64;
        s
    }

    /// Evicts from a locked shard while the cache is over capacity (and, when `fair`, while the
    /// shard holds more than its share).
    fn evict_in(&self, s: &mut Shard<K, V>, fair: bool, out: &mut Garbage<K, V>) {
        while self.over_capacity() && (!fair || s.weight() > s.share()) {
            let before = s.weight();
            if !s.evict_one(&self.inner.hasher, out) {
                break;
            }
            self.account(before, s.weight());
        }
    }

    /// The cache is over capacity but shard `from` is within its share: some other shard holds
    /// more than its share. Evict there (one shard lock at a time).
    #[cold]
    fn evict_elsewhere(&self, from: usize, out: &mut Garbage<K, V>) {
        let n = self.inner.shards.len();
        for fair in [true, false] {
            for j in 1..=n {
                if !self.over_capacity() {
                    return;
                }
                let mut s = self.inner.shards[(from + j) % n].lock.write();
                self.evict_in(&mut s, fair, out);
            }
        }
    }

    fn remove_hashed<Q>(&self, hash: u64, key: &Q, out: &mut Garbage<K, V>) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        self.remove_locked(&mut s, hash, key, out)
    }

    /// Removes `key` from a locked shard (an explicit removal), keeping the global weight.
    fn remove_locked<Q>(
        &self,
        s: &mut Shard<K, V>,
        hash: u64,
        key: &Q,
        out: &mut Garbage<K, V>,
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
        let mut out = Garbage::new();
        let removed = self.remove_hashed(self.hash(key), key, &mut out);
        let panic = self.report(&out);
        let value = if removed {
            out.pop().map(|r| r.value)
        } else {
            None
        };
        drop(out);
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
        let mut out = Garbage::new();
        self.remove_hashed(self.hash(key), key, &mut out);
        self.finish(out);
    }

    /// Removes every entry. Values are dropped after each shard's lock is released.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, 1);
    /// cache.invalidate_all();
    /// assert_eq!(cache.entry_count(), 0);
    /// ```
    pub fn invalidate_all(&self) {
        self.for_each_shard(|s, out| s.clear(out));
    }

    /// Runs `op` on every shard in turn under its write lock, then reports what it removed once
    /// the lock is released. Panic-safe: if `op` (user code: a `retain` predicate, a key's
    /// `Hash`) or a removed value's `Drop` panics, the shard's weight is still accounted, what
    /// was removed is still reported, the remaining shards are still processed, and the first
    /// panic (or a listener's) is resumed after the last shard.
    fn for_each_shard(&self, mut op: impl FnMut(&mut Shard<K, V>, &mut Garbage<K, V>)) {
        let mut panic = None;
        for cell in self.inner.shards.iter() {
            let mut out = Garbage::new();
            let ran = {
                let mut s = cell.lock.write();
                let acct = Accounting::new(self, &mut *s);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    op(&mut *acct.shard, &mut out)
                }))
            };
            if let Err(p) = ran {
                panic.get_or_insert(p);
            }
            if let Some(p) = self.report(&out) {
                panic.get_or_insert(p);
            }
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(out))) {
                panic.get_or_insert(p);
            }
        }
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Keeps only the entries for which `keep` returns true (expired ones are removed too).
    ///
    /// `keep` runs while each shard is write-locked, one shard at a time (as `HashMap::retain`
    /// runs inside the map): it must not call into this cache. Removed values are dropped after
    /// the lock is released.
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// for i in 0..6 { cache.insert(i, i * 10); }
    /// cache.retain(|k, _v| k % 2 == 0);
    /// assert_eq!(cache.entry_count(), 3);
    /// ```
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        let now = self.now();
        self.for_each_shard(|s, out| s.retain(now, &self.inner.hasher, &mut keep, out));
    }

    /// Iterates over clones of the live entries, one shard's snapshot at a time (no lock is held
    /// while you consume the iterator). Entries inserted or removed meanwhile may or may not be
    /// seen.
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

    /// The number of entries stored. Entries past their deadline count until reclaimed (see
    /// [`run_pending_tasks`](Self::run_pending_tasks)).
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, 1);
    /// assert_eq!(cache.entry_count(), 1);
    /// ```
    pub fn entry_count(&self) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|c| c.lock.read().len() as u64)
            .sum()
    }

    /// The total weight stored (the entry count without a weigher). Never above
    /// [`max_capacity`](Self::max_capacity) once every `insert` has returned.
    ///
    /// ```
    /// let cache = herdcache::Cache::builder().max_capacity(100).weigher(|_k: &u8, v: &String| v.len() as u32).build();
    /// cache.insert(1, "four".to_string());
    /// assert_eq!(cache.weighted_size(), 4);
    /// ```
    pub fn weighted_size(&self) -> u64 {
        self.inner.weight.load(Ordering::Acquire)
    }

    /// The cache's name (see [`CacheBuilder::name`](crate::CacheBuilder::name); default
    /// `"herdcache"`).
    ///
    /// ```
    /// let c = herdcache::Cache::<u8, u8>::builder().max_capacity(1).name("users").build();
    /// assert_eq!(c.name(), "users");
    /// ```
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configured bound.
    ///
    /// ```
    /// assert_eq!(herdcache::Cache::<u8, u8>::new(7).max_capacity(), 7);
    /// ```
    pub fn max_capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// The configuration the cache was built with (moka's shape): capacity, time to live, time
    /// to idle, shard count. See [`Policy`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let cache: herdcache::Cache<u8, u8> = herdcache::Cache::builder()
    ///     .max_capacity(10)
    ///     .time_to_idle(Duration::from_secs(60))
    ///     .build();
    /// assert_eq!(cache.policy().time_to_idle(), Some(Duration::from_secs(60)));
    /// assert!(cache.policy().shard_count().is_power_of_two());
    /// ```
    pub fn policy(&self) -> Policy {
        Policy {
            max_capacity: self.inner.capacity,
            shards: self.inner.shards.len(),
            time_to_live: self.inner.durations.0,
            time_to_idle: self.inner.durations.1,
        }
    }

    /// Reclaims every expired entry now, in every shard. Ordinary calls do this work a little at
    /// a time; this is for tests and for callers that want exact counts.
    ///
    /// ```
    /// use std::time::Duration;
    /// let clock = herdcache::ManualClock::new();
    /// let cache = herdcache::Cache::builder().max_capacity(10)
    ///     .time_to_live(Duration::from_secs(1)).clock(clock.clone()).build();
    /// cache.insert(1, 1);
    /// clock.advance(Duration::from_secs(5));
    /// cache.run_pending_tasks();
    /// assert_eq!(cache.entry_count(), 0);
    /// ```
    pub fn run_pending_tasks(&self) {
        let now = self.now();
        self.for_each_shard(|s, out| s.expire(now, true, &self.inner.hasher, out));
    }

    /// Checks every internal invariant of every shard and the global weight; panics on the
    /// first violation. For tests (it locks each shard in turn).
    #[doc(hidden)]
    pub fn validate(&self) {
        let mut total = 0;
        let guards: Vec<_> = self.inner.shards.iter().map(|c| c.lock.write()).collect();
        for g in &guards {
            g.validate(&self.inner.hasher);
            total += g.weight();
        }
        assert_eq!(
            total,
            self.inner.weight.load(Ordering::Acquire),
            "global weight is the sum of shard weights"
        );
    }
}

/// Iterator over clones of a cache's entries; see [`Cache::iter`].
pub struct Iter<'a, K, V, S> {
    cache: &'a Cache<K, V, S>,
    shard: usize,
    batch: std::vec::IntoIter<(K, V)>,
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
