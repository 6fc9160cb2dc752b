//! The concurrent cache: hash once, route to a shard, lock, delegate.

use crate::clock::{Clock, NEVER};
use crate::expiry::ExpiryConfig;
use crate::flight::Flight;
use crate::policy::tune_word;
use crate::removal::Listener;
use crate::select::{Samples, Selector};
use crate::settings::{Policy, Stampede, Weigher};
use crate::stats::{CacheStats, Counter, Stats};

use crate::removal::{RemovalCause, Removals, Removed};
use crate::shard::{Layout, Lookup, Shard};
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
/// and `Eq`, the value's `Clone` (in `get`), the key's `Clone` when a read starts a refresh,
/// the key's and the value's `Clone` in [`iter`](Self::iter)'s snapshot of a shard, and
/// [`Expiry`](crate::Expiry) callbacks run under a shard lock and must not call back into the
/// same cache (a panic there leaves the cache consistent and reaches the caller); the weigher
/// runs before any lock is taken, and keys and values are dropped after the lock is released.
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

mod evict;
mod fail_safe;
mod flights;
mod guards;
mod iter;
mod remove;
mod selection;

pub(crate) use flights::Registration;
pub(crate) use guards::Accounting;
use guards::RefreshClaim;
pub use iter::Iter;

pub(crate) struct ShardCell<K, V> {
    pub(crate) lock: RwLock<Shard<K, V>>,
    /// This shard's sampled accesses, for the cache's configuration selector.
    samples: Samples,
    /// Approximate count of reads (see `note_access`), kept only for the sizing curve's
    /// hot-key correction, and only by a cache that counts ticks anyway (one that keeps time)
    /// and records no statistics (which count the reads exactly).
    accesses: AtomicU64,
    /// When this shard's written entries fall due, for `health` (written under `lock`).
    pub(crate) due: crate::monitor::DueRing,
    /// The shard's entry count, stored by the shard after every change under `lock`: read
    /// without the lock by [`Cache::entries_now`].
    count: Arc<AtomicU64>,
}

/// The most orphaned refresh claims remembered (see [`Cache::note_orphan`]); beyond, the
/// oldest is forgotten (its key refreshes again once written, invalidated or expired).
const MAX_ORPHANS: usize = 4096;

/// Who writes a value: a caller (whose write supersedes any load of the key in flight), or a
/// load publishing its result (stored only if its flight is still registered).
pub(crate) enum Write<'a, K, V> {
    Plain,
    Load(&'a Arc<Flight<K, V>>),
}

/// Starts a refresh of a key (`Cache::start_refresh`).
/// Called with the key (cloned by the reader that won the right to refresh it) and its hash.
pub(crate) type RefreshFn<K, V, S> = fn(&Cache<K, V, S>, K, u64);

/// A validated configuration, handed to the cache.
pub(crate) struct Parts<K, V, S> {
    pub(crate) capacity: u64,
    pub(crate) shards: usize,
    pub(crate) weigher: Option<Weigher<K, V>>,
    pub(crate) expiry: ExpiryConfig<K, V>,
    pub(crate) layout: Layout,
    pub(crate) stampede: Stampede<K, V>,
    /// Starts a refresh (set with a loader, where `K: Clone` is known).
    pub(crate) refresh: Option<RefreshFn<K, V, S>>,
    pub(crate) hasher: S,
    pub(crate) clock: Clock,
    pub(crate) stats: bool,
    pub(crate) listener: Option<Listener<K, V>>,
    pub(crate) name: String,
    /// The time to live and time to idle as given (for [`Cache::policy`]).
    pub(crate) durations: (Option<Duration>, Option<Duration>),
    /// The segments asked for (for [`Cache::policy`]): the shard count if `shards(n)` was
    /// given, else 1.
    pub(crate) segments: usize,
    /// Whether to track the sizing curve ([`CacheBuilder::track_sizing`](crate::CacheBuilder::track_sizing)).
    pub(crate) sizing: bool,
    /// Exact LRU ([`EvictionPolicy::lru`](crate::EvictionPolicy::lru)) instead of the adaptive
    /// policy.
    pub(crate) lru: bool,
}

pub(crate) struct Inner<K, V, S> {
    pub(crate) shards: Box<[CachePadded<ShardCell<K, V>>]>,
    mask: usize,
    pub(crate) hasher: S,
    pub(crate) clock: Clock,
    capacity: u64,
    /// The sum of all shards' weights; changed only under the shard lock whose weight changes.
    weight: AtomicU64,
    /// Hashes of keys whose refresh claim could not be given back (see
    /// [`give_back_orphan`](Cache::give_back_orphan)), and how many there are.
    orphans: crate::sync::Mutex<Vec<(u64, u64)>>,
    orphan_count: std::sync::atomic::AtomicUsize,
    weigher: Option<Weigher<K, V>>,
    pub(crate) expiry: ExpiryConfig<K, V>,
    /// Whether anything needs the time (expiry, refresh).
    timed: bool,
    pub(crate) stampede: Stampede<K, V>,
    /// Starts a refresh of a key found due (set where `K: Clone` is known).
    refresh: Option<RefreshFn<K, V, S>>,
    pub(crate) stats: Option<Stats>,
    listener: Option<Listener<K, V>>,
    name: String,
    /// The time to live and time to idle as configured (for [`Cache::policy`]).
    durations: (Option<Duration>, Option<Duration>),
    /// See [`Parts::segments`].
    segments: usize,
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
    /// The timed cache this thread accessed last (its address; 0: none yet) and this thread's
    /// count of accesses of it, from a pseudo-random phase set at the first (see
    /// `note_access`).
    static ACCESS_TICK: Cell<(usize, u32)> = Cell::new((0, 0));
}

crate::sync::thread_local_shim! {
    /// The same for the fifteen timed caches this thread accessed before that one, the most
    /// recent first (see `switch_tick`).
    static ACCESS_TICKS_BEFORE: Cell<[(usize, u32); 15]> = Cell::new([(0, 0); 15]);
}

/// A thread goes on from the timed cache at address `last` (its count `count`) to the one at
/// `me`: returns `me`'s count, kept from when the thread last read it if it is among the
/// fifteen caches read before, else a new phase; `last`'s is kept in its place. A count
/// forgotten (a seventeenth cache read in turn) loses its reads not yet added (fewer than 64),
/// and the cache's next count starts at a random phase: over the phases, each read still adds
/// 64 with probability 1/64 and maintains with probability 1/1024 — unbiased, but a cache
/// whose count restarts on every read counts its reads to about ±8 √reads (a sizing curve's
/// observed ratio without statistics then moves by as much: `record_stats` counts exactly).
#[cold]
#[inline(never)]
fn switch_tick(last: usize, count: u32, me: usize) -> u32 {
    ACCESS_TICKS_BEFORE.with(|before| {
        let mut b = before.get();
        let at = b.iter().position(|&(id, _)| id == me);
        let mine = match at {
            Some(i) => b[i].1,
            None if last == 0 => crate::sync::thread_phase(),
            None => crate::sync::switch_phase(),
        };
        // `me`'s slot (or the least recent) goes; `last` takes the front.
        if last != 0 {
            let end = at.unwrap_or(b.len() - 1);
            b.copy_within(0..end, 1);
            b[0] = (last, count);
            before.set(b);
        }
        mine
    })
}

/// Every this many accesses a thread tries to run expiry maintenance on the shard.
const MAINTAIN_EVERY: u32 = 1024;
/// With the sizing curve tracked by a cache that keeps time and no statistics, every
/// `ACCESS_SAMPLE`-th access of a thread adds `ACCESS_SAMPLE` to its shard's read counter (one
/// shared write per 64 reads, on the maintenance tick the cache counts anyway).
const ACCESS_SAMPLE: u32 = 64;

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) fn from_parts(parts: Parts<K, V, S>) -> Self {
        let Parts {
            capacity,
            shards,
            weigher,
            expiry,
            layout,
            stampede,
            refresh,
            hasher,
            clock,
            stats,
            listener,
            name,
            durations,
            segments,
            sizing,
            lru,
        } = parts;
        let timed = layout.stride > 0 || stampede.negative_ttl.is_some();
        // A cache that keeps no time never reads the clock (so never starts the coarse clock's
        // thread): its instants are all 0, as `now` returns.
        let now = if timed { clock.now() } else { 0 };
        let n = shards as u64;
        let seed = hasher.hash_one(0x5eed_u64);
        // Entry-bounded caches choose their configuration by miniature simulation; with a
        // weigher the shadows' sizes are unknown (the capacity is in weight units) and the
        // configuration stays at window 1 % + ghost admission. Exact LRU has no choice to make.
        let selector = (weigher.is_none() && !lru)
            .then(|| crate::sync::Mutex::new(Selector::new(capacity, seed)));
        let sample_threshold = selector.as_ref().map_or(0, |s| s.lock().threshold());
        let tune = match &selector {
            Some(s) => s.lock().tune(),
            None if lru => tune_word(crate::policy::LRU, 0),
            None => tune_word(1, 0),
        };
        let cells = (0..n)
            .map(|i| {
                // Shares add up to the capacity exactly.
                let share = capacity / n + u64::from(i < capacity % n);
                let count = Arc::new(AtomicU64::new(0));
                let shard = Shard::new(
                    share,
                    layout,
                    now,
                    seed.wrapping_add(i),
                    tune,
                    count.clone(),
                );
                CachePadded::new(ShardCell {
                    lock: RwLock::new(shard),
                    samples: Samples::default(),
                    accesses: AtomicU64::new(0),
                    due: crate::monitor::DueRing::new(&stampede.monitor),
                    count,
                })
            })
            .collect();
        // The sizing curve samples 1,024 to 2,000 entries' worth at 1 × (a superset of the
        // selector's keys; with a weigher, its own).
        let sizing = sizing.then(|| {
            let max = if weigher.is_none() {
                crate::sizing::unweighted_threshold(capacity).max(sample_threshold)
            } else {
                u64::MAX
            };
            crate::sync::Mutex::new(crate::sizing::Tracker::new(
                capacity,
                weigher.is_some(),
                tune,
                seed,
                max,
                // The reads are counted by the statistics, or on the maintenance tick.
                stats || timed,
            ))
        });
        let sample_threshold = match &sizing {
            Some(z) => z.lock().threshold(),
            None => sample_threshold,
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
                orphans: crate::sync::Mutex::new(Vec::new()),
                orphan_count: std::sync::atomic::AtomicUsize::new(0),
                weigher,
                timed,
                expiry,
                stampede,
                refresh,
                stats: stats.then(Stats::new),
                listener,
                name,
                durations,
                segments,
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

    /// The clock, for loads that time themselves away from the cache (shared async loads).
    pub(crate) fn time_source(&self) -> Clock {
        self.inner.clock.clone()
    }

    /// A reading for timing a load ([`Clock::stopwatch`]): loads are timed whether or not the
    /// cache keeps time (the statistics' load time, the health monitor's).
    pub(crate) fn stopwatch(&self) -> u64 {
        self.inner.clock.stopwatch()
    }

    /// Counts an access of this thread (only a cache that keeps time counts: the sizing curve
    /// adds no work to reads); returns true when the caller should run maintenance.
    #[inline]
    fn note_access(&self, cell: &ShardCell<K, V>) -> bool {
        let me = Arc::as_ptr(&self.inner) as usize;
        let t = ACCESS_TICK.with(|t| {
            let (last, mut v) = t.get();
            if last != me {
                // A thread's reads reach its shard's read counter 64 at a time (see
                // `ACCESS_SAMPLE`): one that started at 0 would add nothing for its first 63
                // reads — with many threads and few reads, most of the count (64 threads
                // reading 5,000 times in 3 s: the sizing curve's observed ratio fell from 29 %
                // to 13 %). Threads take phases spread evenly over 0..1024 in turn (the golden
                // ratio sequence, `sync::thread_phase`): over threads, each read adds 64
                // with probability 1/64. The count is this cache's own: a thread that reads
                // other timed caches in between resumes it (`switch_tick`) — one count shared
                // by two caches read in turn gave every 64th and 1024th read to the same one
                // (its read count doubled, the other's nothing; the other's expired entries
                // never reclaimed by reads).
                v = switch_tick(last, v, me);
            }
            v = v.wrapping_add(1);
            t.set((me, v));
            v
        });
        if t % ACCESS_SAMPLE == 0 && self.inner.sizing.is_some() && self.inner.stats.is_none() {
            cell.accesses
                .fetch_add(u64::from(ACCESS_SAMPLE), Ordering::Relaxed);
        }
        t % MAINTAIN_EVERY == 0
    }

    /// Looks `key` up and applies `f` to the value under the read lock, for a call that goes
    /// on after a miss (a load, a computation). With an eviction listener, an expired entry
    /// found is left to the write that follows, which reclaims it and reports it once the call
    /// has stored, so that a panicking listener cannot stop the call before it does (a call
    /// that stores nothing leaves it to the next write or `get`); without one, it is
    /// reclaimed at once. `record`: count the hit or miss in the statistics.
    #[inline]
    pub(crate) fn read_with<Q, R>(
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
        self.read_at(key, hash, record, None, false, f)
    }

    /// [`read_with`](Self::read_with) for a read that is the whole call (`get`): a miss
    /// reclaims the expired entry it found, and every so often runs the shard's expiry
    /// maintenance, before the call returns.
    #[inline]
    pub(crate) fn read_whole<Q, R>(&self, key: &Q, hash: u64, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.read_at(key, hash, true, None, true, f)
    }

    /// A lookup whose value `keep` (user code, run with no lock held) judges before it counts
    /// as a read (`get_with_if`'s `replace_if`): the value, and whether it was kept. Only a
    /// kept value is read (time to idle, `expire_after_read`, the policy's hit, a refresh
    /// due) — and only if the key still holds that entry: a value written since the look is
    /// another entry, which this call did not read. Counts nothing in the statistics (the
    /// caller does, once it knows).
    pub(crate) fn read_judged(
        &self,
        key: &K,
        hash: u64,
        keep: &mut dyn FnMut(&V) -> bool,
    ) -> Option<(V, bool)>
    where
        V: Clone,
    {
        let now = self.now();
        let (v, seen) = {
            let s = self.inner.shards[self.shard_index(hash)].lock.read();
            let (v, seen) = s.peek_deadline(hash, key, now)?;
            (v.clone(), seen) // user code under the read lock, as a hit's clone
        };
        if !keep(&v) {
            return Some((v, false));
        }
        self.read_at(key, hash, false, Some(seen), false, |_| ());
        Some((v, true))
    }

    /// [`read_with`](Self::read_with), or with `seen` a deadline from
    /// [`peek_deadline`](crate::shard::Core::peek_deadline): a read of that entry only.
    /// `whole`: see [`read_whole`](Self::read_whole).
    #[inline]
    fn read_at<Q, R>(
        &self,
        key: &Q,
        hash: u64,
        record: bool,
        seen: Option<u64>,
        whole: bool,
        f: impl FnOnce(&V) -> R,
    ) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard_index(hash);
        let cell = &self.inner.shards[i];
        // One test for a cache that keeps no time (it counts no ticks either).
        // Only a lookup counted as a request ticks: a later round of a counted load, or a
        // computation's look at the current value, is no new read (the sizing curve's read
        // count, see `note_access`).
        let (maintain, now) = if self.inner.timed {
            (record && self.note_access(cell), self.now())
        } else {
            (false, 0)
        };
        let guard = cell.lock.read();
        let looked = match seen {
            None => guard.lookup(hash, key, now, &self.inner.expiry, crate::rng::coin),
            Some(d) => {
                guard.lookup_unchanged(hash, key, now, d, &self.inner.expiry, crate::rng::coin)
            }
        };
        let found = match looked {
            Lookup::Hit(v) => {
                let r = f(v);
                drop(guard);
                if record {
                    self.count_fast(Counter::Hit);
                    self.note_sample(cell, hash, true);
                }
                return Some(r);
            }
            Lookup::StaleHit(v) => {
                if self.inner.orphan_count.load(Ordering::Relaxed) > 0 {
                    self.give_back_orphan(&guard, key, hash, v);
                }
                let r = f(v);
                drop(guard);
                if record {
                    self.count_fast(Counter::Hit);
                    self.count(Counter::StaleServed);
                    self.note_sample(cell, hash, true);
                }
                return Some(r);
            }
            Lookup::Stale(k, v) => {
                // This read won the right to start the key's refresh. Until it has handed the
                // refresh over, a guard gives that right back if user code panics (the key's or
                // the value's `Clone`), so the refresh is never lost.
                let claim = RefreshClaim(guard.refresh_deadline_of(v), now);
                let r = f(v);
                let st = &self.inner.stampede;
                let refresh = st
                    .clone_key
                    .zip(self.inner.refresh)
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
            Lookup::Expired => true,
            Lookup::Absent => false,
        };
        drop(guard);
        // A `get`'s miss is counted before the reclaim below, whose listener or value `Drop`
        // (user code) may panic: the call did miss. A call that goes on to load counts it
        // after: a panic there then leaves the call uncounted, where a miss counted first
        // would be left without the load that settles it.
        if record && whole {
            self.count_fast(Counter::Miss);
            self.note_sample(cell, hash, false);
        }
        // A call that goes on after a miss leaves it to its own write when the listener would
        // hear the reclaimed entry (see `read_with`).
        if (whole || self.inner.listener.is_none()) && (found || maintain) {
            // An expired entry was seen (or it is time): reclaim, if the lock is free now.
            if let Some(s) = cell.lock.try_write() {
                let mut out = Removals::new();
                // A key's `Hash` (reclaiming) or `Eq` may panic: what was reclaimed before is
                // still reported, after the lock.
                self.reporting_panics(&mut out, move |out| {
                    let mut s = s;
                    let acct = Accounting::new(self, &mut *s);
                    acct.shard.expire(now, false, &self.inner.hasher, out);
                    if found {
                        // Only the expired entry: a write may have replaced it since the read.
                        acct.shard.remove_expired(hash, key, now, false, out);
                    }
                });
                self.report_removals(out);
            }
        }
        if record && !whole {
            self.count_fast(Counter::Miss);
            self.note_sample(cell, hash, false);
        }
        None
    }

    /// Counts a lookup made without counting ([`read_with`](Self::read_with) with `record`
    /// false) once the caller has decided what it was: a hit or a miss in the statistics;
    /// `resident` (the key held a value) for the policy's samples.
    pub(crate) fn count_lookup(&self, hash: u64, hit: bool, resident: bool) {
        let cell = &self.inner.shards[self.shard_index(hash)];
        self.count_fast(if hit { Counter::Hit } else { Counter::Miss });
        if self.inner.timed {
            // The tick the uncounted lookup did not take (maintenance waits for the next one).
            self.note_access(cell);
        }
        self.note_sample(cell, hash, resident);
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

    /// Reports removed entries to the eviction listener, then drops them (the statistics
    /// counted them in their shard: [`Tally`](crate::removal::Tally)). Called with no lock
    /// held. If the listener panics, the other entries are still reported and dropped, and the
    /// first panic is then resumed in the caller.
    #[inline(always)]
    pub(crate) fn report_removals(&self, out: Removals<K, V>) {
        let Some(listener) = &self.inner.listener else {
            return; // `out` drops here, after the lock
        };
        if out.is_empty() {
            return;
        }
        let panic = out.report_to(listener);
        drop(out);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Remembers that the refresh claim of the key of hash `hash` could not be given back (a
    /// refresh whose store panicked in the key's `Eq`, which panicked again when the claim was
    /// to be given back): the next read of that key's entry gives it back, due when it would
    /// have been (a backoff from now), so the read after that one refreshes if that time has
    /// come.
    #[cold]
    pub(crate) fn note_orphan(&self, hash: u64) {
        let at = crate::clock::deadline(self.now(), self.inner.stampede.refresh_backoff);
        let mut o = self.inner.orphans.lock();
        if o.len() >= MAX_ORPHANS {
            o.remove(0);
        }
        o.push((hash, at));
        self.inner.orphan_count.store(o.len(), Ordering::Relaxed);
    }

    /// A read found the entry of `key` (hash `hash`) claimed for a refresh: if that claim is
    /// an orphan ([`note_orphan`](Self::note_orphan)) — its hash noted, and no load of the key
    /// registered (a key of the same hash may have a refresh of its own running) — it is given
    /// back (due when it was noted, plus the refresh backoff), found by the value's address.
    #[cold]
    fn give_back_orphan<Q>(&self, guard: &Shard<K, V>, key: &Q, hash: u64, value: &V)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut o = self.inner.orphans.lock();
        let Some(i) = o.iter().position(|&(h, _)| h == hash) else {
            return;
        };
        if guard.loading(hash, key) {
            return; // a refresh of this key runs (or a load): not an orphan
        }
        let (_, at) = o.swap_remove(i);
        self.inner.orphan_count.store(o.len(), Ordering::Relaxed);
        guard.reset_refresh_of(value, at);
    }

    /// Reports removed entries to the listener (each exactly once); returns the first panic of
    /// the listener, if any.
    pub(crate) fn report(&self, out: &Removals<K, V>) -> Option<Box<dyn std::any::Any + Send>> {
        if out.is_empty() {
            return None;
        }
        out.report_to(self.inner.listener.as_ref()?)
    }

    /// Returns a clone of the value for `key`, or `None` if absent or expired.
    ///
    /// Takes the shard's read lock; records the hit for the eviction policy with one relaxed
    /// store on the entry.
    ///
    /// # Panics
    ///
    /// If the key's `Hash` or `Eq`, or the value's `Clone` (run under the shard's read lock),
    /// panics: the panic reaches the caller with the lock released and the cache whole. A
    /// value whose `Clone` panicked was read all the same (its time to idle moved,
    /// [`Expiry::expire_after_read`](crate::Expiry::expire_after_read) called, the policy
    /// touched), but no hit is counted.
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
        self.read_whole(key, self.hash(key), V::clone)
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
        let mut out = Removals::new();
        self.reporting_panics(&mut out, |out| {
            self.insert_with(hash, key, value, weight, Write::Plain, (0, NEVER), out)
        });
        self.report_removals(out);
    }

    /// Runs a write that may call user code under the lock (`Expiry`, a key's `Hash`); if it
    /// panics, what it removed before the panic is still reported, then the panic resumes.
    #[inline]
    pub(crate) fn reporting_panics<R>(
        &self,
        out: &mut Removals<K, V>,
        write: impl FnOnce(&mut Removals<K, V>) -> R,
    ) -> R {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(out))) {
            Ok(r) => r,
            Err(p) => {
                self.report_removals(std::mem::replace(out, Removals::new()));
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
        out: &mut Removals<K, V>,
    ) -> bool {
        let i = self.shard_index(hash);
        let cell = &self.inner.shards[i];
        let now = self.now();
        let mut s = cell.lock.write();
        if self.inner.weigher.is_some() {
            self.drain_samples(cell);
            let tune = self.inner.tune.load(Ordering::Relaxed);
            self.note_insert(cell, hash, weight, tune);
        }
        let registered = match write {
            Write::Plain => None,
            // A planted bug for the loom model to catch: a load stores without checking that
            // no write superseded it.
            #[cfg(herdcache_broken_model)]
            Write::Load(f) => s.flights().remove(hash, f),
            #[cfg(not(herdcache_broken_model))]
            Write::Load(f) => match s.flights().remove(hash, f) {
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
            // A custom `Expiry` is asked about the write all the same, as moka asks it (user
            // code: before anything is removed; if it panics, nothing is, and the panic is
            // resumed below, once the lock is released).
            let asked =
                acct.shard
                    .ask_expiry_of_rejected(hash, key, value, now, &self.inner.expiry, out);
            if let Some((key, value)) = asked {
                acct.shard.remove(
                    hash,
                    &key,
                    now,
                    &self.inner.hasher,
                    out,
                    RemovalCause::Replaced,
                );
                self.count_evicted(1, u64::from(weight));
                // Not an entry that stayed: `health`'s residence time leaves it out.
                self.inner
                    .stampede
                    .monitor
                    .too_heavy
                    .fetch_add(1, Ordering::Relaxed);
                out.push(Removed {
                    key,
                    value,
                    weight,
                    cause: RemovalCause::Size,
                });
            }
        } else {
            // For `health` (src/health.rs), under the write lock: an entry stored (not a load
            // superseded, nor a write too heavy to store) falls due.
            cell.due.note_written(&self.inner.stampede.monitor, now);
            acct.shard.insert(
                hash,
                key,
                value,
                weight,
                now,
                &self.inner.expiry,
                &self.inner.hasher,
                (took, cap),
                out,
            );
        }
        drop(acct);
        // A key's `Hash` that panicked during the insert or the eviction (the shard hashing
        // resident keys), or an `Expiry` callback that panicked (the write stopped before
        // mutating, its key and value left in `out` to drop unlocked), is resumed once the
        // write has evicted what it must and the lock is released.
        let mut deferred = s.take_panic();
        let evicted = self.evict_in(&mut s, true, out, &mut deferred);
        drop(s);
        if evicted {
            // The policy's configuration matters only when evicting: a write that evicts
            // feeds the selector the shard's pending samples, once the lock is released (no
            // reader waits for the simulation; the choice applies from the next eviction).
            // A write that replaces or fits pays for nothing.
            self.drain_samples(cell);
            if self.over_capacity() {
                self.evict_elsewhere(i, out, &mut deferred);
            }
        }
        // The load's registered key goes last, with no lock held: its `Drop` is user code,
        // and a panic of it must not skip the eviction above (`attack_s56`). The first panic
        // goes on.
        crate::unwind::drop_keeping_first(registered, &mut deferred);
        if let Some(p) = deferred {
            std::panic::resume_unwind(p);
        }
        true
    }

    /// The most loads that ever ran at once under `max_concurrent_loads` (0 without a limit),
    /// and how many loads had to wait for a permit. A test hook (feature `testing`); the same
    /// figures are in [`stats`](Self::stats).
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn load_limit_stats(&self) -> (usize, usize) {
        self.limit_figures()
    }

    fn limit_figures(&self) -> (usize, usize) {
        self.inner
            .stampede
            .limiter
            .as_ref()
            .map_or((0, 0), |l| (l.high_water(), l.waited()))
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
        if self.inner.stats.is_some() {
            // Removals are counted in their shard (one read lock each).
            let mut t = crate::removal::Tally::default();
            for c in self.inner.shards.iter() {
                t.add(&c.lock.read().tally());
            }
            let get = |cause| {
                let (count, weight) = t.get(cause);
                crate::stats::Removals { count, weight }
            };
            s.expired = get(RemovalCause::Expired);
            s.explicit = get(RemovalCause::Explicit);
            s.replaced = get(RemovalCause::Replaced);
        }
        s.loads_in_flight = self.flights_running() as u64;
        let (high, waited) = self.limit_figures();
        s.max_concurrent_loads_seen = high as u64;
        if let Some(r) = self.inner.remote.get() {
            s.remote = r.snapshot();
        }
        s.loads_waited_for_limit = waited as u64;
        s
    }

    /// The number of entries stored, at one instant (every shard is read-locked together for
    /// the count, so it never mixes moments: during churn it stays within the bound plus the
    /// writes in progress, as [`insert`](Self::insert) says). Entries past their deadline count
    /// until reclaimed (see [`run_pending_tasks`](Self::run_pending_tasks)).
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// cache.insert(1, 1);
    /// assert_eq!(cache.entry_count(), 1);
    /// ```
    pub fn entry_count(&self) -> u64 {
        // In index order, as every caller that holds several shard locks takes them.
        let guards: Vec<_> = self.inner.shards.iter().map(|c| c.lock.read()).collect();
        guards.iter().map(|g| g.len() as u64).sum()
    }

    /// The number of entries, read without any shard lock (for `health` and `sizing`, which
    /// promise not to wait for one): the sum of the counts each shard stores after every
    /// change under its lock, so a shard busy in a long operation (a `retain`, a blocked key
    /// comparison) counts as its last change left it. Per shard a count of one instant, not
    /// of the same instant for every shard. Rounds 94–98 estimated a busy shard's entries
    /// from its weight (at some mean weight per entry) instead, and each estimate was wrong
    /// somewhere: 99 heavy entries counted as 99,000, 100 entries of weight 0 as none, the
    /// last count, however old, kept as the window's peak.
    pub(crate) fn entries_now(&self) -> u64 {
        if !self.inner.weigher_set() {
            return self.weighted_size();
        }
        self.inner
            .shards
            .iter()
            .map(|c| c.count.load(Ordering::Relaxed))
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
            segments: self.inner.segments,
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

    /// Whether some thread holds a shard's write lock now (a read lock too, for a moment: a
    /// lookup). A test hook (feature `testing`): called from a key's or value's `Drop`, it says
    /// without waiting whether that drop runs under a lock.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn is_a_shard_locked(&self) -> bool {
        self.inner
            .shards
            .iter()
            .any(|c| c.lock.try_write().is_none())
    }

    /// Checks every internal invariant of every shard and the global weight; panics on the
    /// first violation. For tests (it locks each shard in turn).
    #[cfg(any(test, feature = "testing"))]
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

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use super::*;
    use crate::ManualClock;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    #[test]
    fn a_key_always_routes_to_one_shard_and_keys_spread_over_all() {
        let cache: Cache<u64, u64> = Cache::builder().max_capacity(10_000).shards(8).build();
        let mut per_shard = [0u32; 8];
        for k in 0..8_000u64 {
            let h = cache.hash(&k);
            assert_eq!(h, cache.hash(&k), "hashed the same way every time");
            let i = cache.shard_index(h);
            assert_eq!(i, ((h >> 40) as usize) & 7, "routing uses bits 40 and up");
            per_shard[i] += 1;
        }
        for n in per_shard {
            assert!(
                (800..1200).contains(&n),
                "shards get about 1000 keys each: {per_shard:?}"
            );
        }
    }

    #[test]
    fn shares_add_up_to_the_capacity() {
        let cache: Cache<u64, u64> = Cache::builder().max_capacity(1001).shards(4).build();
        let shares: Vec<u64> = cache
            .inner
            .shards
            .iter()
            .map(|c| c.lock.read().share())
            .collect();
        assert_eq!(shares.iter().sum::<u64>(), 1001);
        assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
    }

    #[test]
    fn the_global_weight_follows_inserts_replacements_evictions_and_removals() {
        let cache: Cache<u64, u32> = Cache::builder()
            .max_capacity(100)
            .shards(2)
            .weigher(|_, v: &u32| *v)
            .build();
        for k in 0..50 {
            cache.insert(k, 1 + (k % 7) as u32);
        }
        cache.validate();
        cache.insert(3, 40); // replaces a lighter value
        cache.validate();
        assert!(cache.weighted_size() <= 100);
        cache.invalidate(&3);
        cache.retain(|k, _| k % 2 == 0);
        cache.validate();
        let sum: u64 = cache.iter().map(|(_, v)| u64::from(v)).sum();
        assert_eq!(cache.weighted_size(), sum);
    }

    #[test]
    fn a_weigher_that_panics_leaves_the_accounting_exact() {
        let cache: Cache<u64, u32> = Cache::builder()
            .max_capacity(1000)
            .weigher(|k, v: &u32| if *k == 13 { panic!("weigher") } else { *v })
            .build();
        for k in 0..20 {
            let r = catch_unwind(AssertUnwindSafe(|| cache.insert(k, 2)));
            assert_eq!(r.is_err(), k == 13);
        }
        cache.validate();
        assert_eq!(cache.weighted_size(), 19 * 2);
        assert_eq!(cache.get(&13), None);
    }

    #[test]
    fn an_expired_entry_reads_as_absent_and_is_reclaimed() {
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(10)
            .time_to_live(Duration::from_secs(1))
            .clock(clock.clone())
            .build();
        cache.insert(1, 1);
        assert_eq!(cache.get(&1), Some(1));
        clock.advance(Duration::from_secs(2));
        assert_eq!(cache.get(&1), None);
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);
        cache.validate();
    }

    #[test]
    fn many_threads_with_few_reads_each_are_counted_without_bias() {
        // A timed cache with the sizing curve and no statistics counts its reads on the
        // maintenance tick, 64 at a time per thread. 64 new threads of 32 reads each: from a
        // phase of 0 every thread would add nothing (a count of 0 for 2,048 reads); from a
        // spread phase each adds 64 with probability 1/2 (mean 2,048, deviation 256).
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(3600))
            .track_sizing()
            .build();
        std::thread::scope(|s| {
            for _ in 0..64 {
                s.spawn(|| {
                    for k in 0..32u64 {
                        cache.get(&k);
                    }
                });
            }
        });
        let (reads, hits) = cache.requests();
        assert_eq!(hits, None, "no statistics");
        let reads = reads.expect("a timed cache counts its reads");
        assert!(
            (1_024..=3_072).contains(&reads),
            "2,048 reads counted as {reads}"
        );
    }

    #[test]
    fn only_lookups_that_are_requests_count_as_reads() {
        // One thread: 6,400 requests (gets, and get_with_if that judge the value and count it),
        // and 64,000 computations that look at the current value without being requests.
        // Counted 64 at a time: 6,400 ± 64, where counting the computations' lookups gives
        // about 70,400.
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(3600))
            .track_sizing()
            .build();
        cache.insert(1, 1);
        let phase_before = cache.requests().0.expect("a timed cache counts its reads");
        for i in 0..6_400u64 {
            if i % 2 == 0 {
                cache.get(&1);
            } else {
                cache.get_with_if(1, || 1, |_| false);
            }
            for _ in 0..10 {
                cache.entry(1).and_compute_with(|_| crate::Op::Nop);
            }
        }
        let reads = cache.requests().0.expect("counted") - phase_before;
        assert!(
            (6_336..=6_464).contains(&reads),
            "6,400 requests counted as {reads} reads"
        );
    }
}
