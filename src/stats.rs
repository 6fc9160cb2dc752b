//! Statistics: striped counters, and the snapshot a cache hands out.
//!
//! Counters live in 64 cache-line-padded stripes, plus a shared one; a thread always writes the
//! same stripe, so threads do not contend on one hot atomic. On its first count (in any cache) a
//! thread takes a stripe no live thread owns, and gives it back when it exits; when 64 live
//! threads own one each, it counts on the shared stripe (and tries again at its next count).
//! Hits and misses — the read path — are counted with a plain load and store on the thread's own
//! stripe rather than an atomic read-modify-write (about 1 ns instead of 5 to 20): exact, since
//! no other thread writes that stripe meanwhile, up to 64 threads running at once; beyond that
//! exact too, on the shared stripe with `fetch_add`. Every other counter uses `fetch_add` and is
//! exact. Removals other than evictions are not counted here: each shard tallies its own
//! under its write lock ([`crate::removal::Tally`]), and the cache adds the tallies into the
//! snapshot. A snapshot
//! sums the stripes; it is not atomic across counters.

use crossbeam_utils::CachePadded;
use std::cell::Cell;
use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The counters, by index into a stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Counter {
    Hit,
    Miss,
    LoadSuccess,
    LoadFailure,
    LoadNanos,
    Coalesced,
    RefreshStarted,
    RefreshSucceeded,
    RefreshFailed,
    StaleServed,
    NegativeHit,
    LoadAbandoned,
    Timeout,
    StaleAfterTtl,
    /// Evictions for size and their weight (the other removals are tallied by the shards).
    RemovedSize,
    WeightSize,
}

const COUNTERS: usize = Counter::WeightSize as usize + 1;
/// Stripes a thread can own (one per bit of [`OWNED`]).
const STRIPES: usize = 64;
/// The stripe of threads that own none, written only with `fetch_add`.
const SHARED: usize = STRIPES;

/// Striped counters of one cache: the `STRIPES` ownable ones, then the shared one.
pub(crate) struct Stats {
    /// A fixed-size array: indexing it with a stripe number checked against `STRIPES` needs
    /// no bounds check.
    stripes: Box<[CachePadded<[AtomicU64; COUNTERS]>; SHARED + 1]>,
}

/// The stripes owned by live threads: bit `i` for stripe `i`.
static OWNED: AtomicU64 = AtomicU64::new(0);

/// [`STRIPE`] before the thread first counts, or while it owns no stripe.
const UNCLAIMED: usize = usize::MAX;
/// [`STRIPE`] once the thread gave its stripe back (it is exiting): the shared stripe for good.
const EXITING: usize = usize::MAX - 1;

thread_local! {
    /// The stripe this thread owns (below `STRIPES`), or `UNCLAIMED` or `EXITING`. Read on every
    /// count; has no destructor, so it can be read while the thread's other thread-locals are
    /// being destroyed.
    static STRIPE: Cell<usize> = const { Cell::new(UNCLAIMED) };
    /// Gives the stripe back when the thread exits. Set when the stripe is taken.
    static RELEASE: Release = const { Release(Cell::new(UNCLAIMED)) };
}

/// Holds a thread's stripe, and gives it back when dropped (as the thread exits).
struct Release(Cell<usize>);

impl Drop for Release {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < STRIPES {
            // Later counts of this thread (from other thread-locals' destructors) go to the
            // shared stripe: the next owner may already be writing this one.
            STRIPE.with(|s| s.set(EXITING));
            // Release: this thread's writes to the stripe happen before the next owner's reads.
            OWNED.fetch_and(!(1 << i), Ordering::Release);
        }
    }
}

/// This thread's stripe: its own, or [`SHARED`].
#[inline]
fn stripe() -> usize {
    let i = STRIPE.with(Cell::get);
    if i < STRIPES {
        i
    } else {
        claim(i)
    }
}

/// Takes the lowest stripe no live thread owns, for this thread (`state` is its [`STRIPE`]).
/// Returns [`SHARED`] when every stripe is owned or the thread is exiting.
#[cold]
fn claim(state: usize) -> usize {
    if state == EXITING {
        return SHARED;
    }
    let mut owned = OWNED.load(Ordering::Relaxed);
    let i = loop {
        if owned == u64::MAX {
            return SHARED;
        }
        let i = (!owned).trailing_zeros() as usize;
        // Acquire: the previous owner's writes to the stripe happen before ours.
        match OWNED.compare_exchange_weak(
            owned,
            owned | 1 << i,
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => break i,
            Err(now) => owned = now,
        }
    };
    if RELEASE.try_with(|r| r.0.set(i)).is_err() {
        // The thread is exiting and its `RELEASE` is gone: nothing would give the stripe back.
        OWNED.fetch_and(!(1 << i), Ordering::Release);
        STRIPE.with(|s| s.set(EXITING));
        return SHARED;
    }
    STRIPE.with(|s| s.set(i));
    i
}

impl Stats {
    pub(crate) fn new() -> Self {
        Stats {
            stripes: Box::new(std::array::from_fn(|_| {
                CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
            })),
        }
    }

    /// Adds `n` to a counter of the read path (hits, misses): see the module docs.
    #[inline]
    pub(crate) fn add_fast(&self, c: Counter, n: u64) {
        let i = STRIPE.with(Cell::get);
        if i < STRIPES {
            // Only this thread writes its own stripe.
            let a = &self.stripes[i][c as usize];
            a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        } else {
            self.add(c, n);
        }
    }

    /// Adds `n` to a counter, exactly. The total load time saturates instead of wrapping (its
    /// nanoseconds are the one count that can reach `u64::MAX`: loads of centuries on a manual
    /// clock, round 92), so that it never falls.
    #[inline]
    pub(crate) fn add(&self, c: Counter, n: u64) {
        let a = &self.stripes[stripe()][c as usize];
        if matches!(c, Counter::LoadNanos) {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(n))
            });
        } else {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Hits and misses counted so far: the reads, and of those the hits, for the sizing
    /// curve's adjustment and anchor.
    pub(crate) fn reads_and_hits(&self) -> (u64, u64) {
        let hits = self.sum(Counter::Hit);
        (hits.wrapping_add(self.sum(Counter::Miss)), hits)
    }

    fn sum(&self, c: Counter) -> u64 {
        self.stripes
            .iter()
            .map(|s| s[c as usize].load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }

    /// A snapshot; the gauges (loads in flight, limiter figures) come from the caller.
    pub(crate) fn snapshot(&self) -> CacheStats {
        use Counter::*;
        CacheStats {
            hits: self.sum(Hit),
            misses: self.sum(Miss),
            load_successes: self.sum(LoadSuccess),
            load_failures: self.sum(LoadFailure),
            total_load_time: Duration::from_nanos(self.sum(LoadNanos)),
            // Filled in by the cache from its shards' tallies.
            expired: Removals::default(),
            explicit: Removals::default(),
            replaced: Removals::default(),
            size: Removals {
                count: self.sum(RemovedSize),
                weight: self.sum(WeightSize),
            },
            coalesced: self.sum(Coalesced),
            refreshes_started: self.sum(RefreshStarted),
            refreshes_succeeded: self.sum(RefreshSucceeded),
            refreshes_failed: self.sum(RefreshFailed),
            stale_served: self.sum(StaleServed),
            negative_hits: self.sum(NegativeHit),
            loads_abandoned: self.sum(LoadAbandoned),
            stale_served_after_ttl: self.sum(StaleAfterTtl),
            timeouts: self.sum(Timeout),
            loads_waited_for_limit: 0,
            loads_in_flight: 0,
            max_concurrent_loads_seen: 0,
            remote: RemoteStats::default(),
        }
    }
}

/// Entries removed for one cause: how many, and their total weight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removals {
    /// Entries removed.
    pub count: u64,
    /// Their total weight (their count, without a weigher).
    pub weight: u64,
}

impl Sub for Removals {
    type Output = Removals;
    /// The removals of the period between `earlier` and `self` (zero, not a wrapped
    /// difference, if `earlier` is the later snapshot).
    fn sub(self, earlier: Removals) -> Removals {
        Removals {
            count: self.count.saturating_sub(earlier.count),
            weight: self.weight.saturating_sub(earlier.weight),
        }
    }
}

/// A snapshot of a cache's statistics, from [`Cache::stats`](crate::Cache::stats).
///
/// Counters count since the cache was built; subtract an earlier snapshot for a period
/// (`later - earlier`; the gauges keep the later value). Enable counting with
/// [`CacheBuilder::record_stats`](crate::CacheBuilder::record_stats).
///
/// # Example
///
/// ```
/// let cache = herdcache::Cache::builder().max_capacity(10).record_stats().build();
/// cache.insert(1, "a");
/// cache.get(&1);
/// cache.get(&2);
/// let s = cache.stats();
/// assert_eq!((s.hits, s.misses), (1, 1));
/// assert_eq!(s.hit_ratio(), 0.5);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups that found a live entry (`get`, and the `get_with`/`load` family).
    pub hits: u64,
    /// Lookups that did not find a value they could use (a value that `get_with_if`'s
    /// `replace_if` rejects is a miss): one per call that missed (per key for `get_all`), and
    /// one more for each further attempt of that call — after the load it joined or led ended
    /// with nothing for it (failed, abandoned, or of no use to it; or, uncounted as a load, a
    /// `get_with_if` leader's flight given up because a write came before its second look, or
    /// a computation's — `and_compute_with` and kin — given up because a write came before
    /// it read the current value) — that leads a load or is answered by a negative entry;
    /// joining again, or being answered by a value, is the same attempt.
    ///
    /// Each miss of a loading call (the `get_with` family, `load`, `get_all`, the entry API's
    /// `or_insert*`) is also counted as exactly one of: a load (`load_successes`,
    /// `load_failures` or `loads_abandoned`), a join (`coalesced`) or a negative hit
    /// (`negative_hits`) — as soon as it is known (a waiter while it waits); no count is ever
    /// taken back. So in a cache read only through those calls, once every call has
    /// returned, `misses == load_successes + load_failures + loads_abandoned + coalesced +
    /// negative_hits`, less the refreshes (which load without a miss: `refreshes_started`);
    /// meanwhile a snapshot may be off by the calls in between. A plain `get` that misses
    /// counts its miss only.
    pub misses: u64,
    /// Loads (including refreshes) that produced a value.
    pub load_successes: u64,
    /// Loads that failed: an error, `None`, or a panic (of a loader, a caller's `init`
    /// closure or future, `get_all`'s `load_missing` — one per key — or a refresh).
    pub load_failures: u64,
    /// Loads given up before they ended, neither a value nor a failure: a cancelled leader
    /// (its future dropped, its waiters load again), a leader that timed out waiting for a
    /// load permit, a job the spawner dropped unrun, a shared async load every caller left, a
    /// refresh that never ran its loader (its job or future dropped, put off because the load
    /// limit was full), a load taken over and given up by a computation of its key.
    pub loads_abandoned: u64,
    /// Time spent in loads that finished, on the cache's clock. Saturates at `u64::MAX`
    /// nanoseconds (about 584 years: reachable only with a manual clock) rather than wrap.
    pub total_load_time: Duration,
    /// Entries removed because they expired.
    pub expired: Removals,
    /// Entries removed by `remove`, `invalidate`, `invalidate_all`, `retain`.
    pub explicit: Removals,
    /// Values replaced by a write.
    pub replaced: Removals,
    /// Entries evicted to stay within the capacity (or too heavy to store).
    pub size: Removals,
    /// Misses answered without a load of their own: callers that waited for another caller's
    /// load (single-flight at work; those that gave up waiting, at a timeout or cancelled,
    /// too), that found the value stored by another caller by the time they claimed the key,
    /// or that fail-safe answered with the last value within a failed key's backoff. Every
    /// miss is a load, one of these, or a negative hit (see `misses`).
    pub coalesced: u64,
    /// Refreshes started (refresh-ahead and early refresh). Each ends as one of the next two.
    pub refreshes_started: u64,
    /// Refreshes that replaced the value (one whose new value is too heavy for the cache
    /// replaces it with nothing: the key is removed, as an insert of that value would).
    pub refreshes_succeeded: u64,
    /// Refreshes that did not replace the value: they failed (the old value was kept), were
    /// deferred by the load limit, were taken over by a nested load, or lost to a write or
    /// invalidation of the key made while they ran.
    pub refreshes_failed: u64,
    /// Reads that returned a value due for refresh (stale-while-revalidate).
    pub stale_served: u64,
    /// Calls answered with a value past its time to live because its load failed
    /// (fail-safe). The callers that waited on one load whose failure answered them all count
    /// once; a call answered from the old value by itself counts on its own: during the retry
    /// backoff, at its soft timeout, or after the load it waited on was abandoned or ended by
    /// a panic of its leader's own `init` (`get_with` & co.: the panic goes to that caller;
    /// each waiter of such a load claims the key again and finds the backoff started, as a
    /// builder loader's panic, caught and published to its waiters, does not). A failure no
    /// caller waits for any more (a spawned load whose callers left at their soft timeout,
    /// counted then) counts nothing.
    pub stale_served_after_ttl: u64,
    /// Calls answered by a negative-cache entry instead of a load.
    pub negative_hits: u64,
    /// Loads that had to wait for a permit of `max_concurrent_loads`.
    pub loads_waited_for_limit: u64,
    /// Calls that gave up waiting at their soft timeout.
    pub timeouts: u64,
    /// Gauge: loads (and computations, `and_compute_with` & co.) running now that still hold
    /// their key. A load that a write of its key
    /// overtook (its value will not be stored) stops counting at that write, though its
    /// loader may still run; so does a refresh that lost to a write (counted in
    /// `refreshes_failed` when it ends).
    pub loads_in_flight: u64,
    /// Gauge: the most loads that ever ran at once under `max_concurrent_loads`.
    pub max_concurrent_loads_seen: u64,
    /// The shared second tier's counters (all zero without one; see the `redis` feature).
    pub remote: RemoteStats,
}

impl CacheStats {
    /// `hits + misses` (saturating at `u64::MAX`).
    pub fn requests(&self) -> u64 {
        self.hits.saturating_add(self.misses)
    }

    /// `hits / requests`, or 1.0 with no requests.
    pub fn hit_ratio(&self) -> f64 {
        match (self.hits, self.misses) {
            (0, 0) => 1.0,
            // In floating point: the sum of the counters may not fit in a `u64`.
            (h, m) => h as f64 / (h as f64 + m as f64),
        }
    }

    /// `misses / requests`, or 0.0 with no requests.
    pub fn miss_ratio(&self) -> f64 {
        match (self.hits, self.misses) {
            (0, 0) => 0.0,
            // Not `1.0 - hit_ratio()`: a ratio near 0 would round to 0.
            (h, m) => m as f64 / (h as f64 + m as f64),
        }
    }

    /// The mean duration of a finished load.
    pub fn average_load_time(&self) -> Duration {
        // In nanoseconds as `u128`: neither the count nor the quotient need fit a `u32`.
        match u128::from(self.load_successes) + u128::from(self.load_failures) {
            0 => Duration::ZERO,
            n => {
                let nanos = self.total_load_time.as_nanos() / n;
                // At most `total_load_time`, so its seconds fit in a `u64`.
                Duration::new(
                    u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
                    (nanos % 1_000_000_000) as u32,
                )
            }
        }
    }

    /// Entries evicted by the cache itself: expired plus size.
    pub fn evictions(&self) -> Removals {
        Removals {
            count: self.expired.count.saturating_add(self.size.count),
            weight: self.expired.weight.saturating_add(self.size.weight),
        }
    }
}

impl Sub for CacheStats {
    type Output = CacheStats;

    /// The counts of the period between `earlier` and `self` (zero, not a wrapped
    /// difference, if `earlier` is the later snapshot); gauges are `self`'s.
    fn sub(self, earlier: CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            load_successes: self.load_successes.saturating_sub(earlier.load_successes),
            load_failures: self.load_failures.saturating_sub(earlier.load_failures),
            total_load_time: self.total_load_time.saturating_sub(earlier.total_load_time),
            expired: self.expired - earlier.expired,
            explicit: self.explicit - earlier.explicit,
            replaced: self.replaced - earlier.replaced,
            size: self.size - earlier.size,
            coalesced: self.coalesced.saturating_sub(earlier.coalesced),
            refreshes_started: self
                .refreshes_started
                .saturating_sub(earlier.refreshes_started),
            refreshes_succeeded: self
                .refreshes_succeeded
                .saturating_sub(earlier.refreshes_succeeded),
            refreshes_failed: self
                .refreshes_failed
                .saturating_sub(earlier.refreshes_failed),
            stale_served: self.stale_served.saturating_sub(earlier.stale_served),
            negative_hits: self.negative_hits.saturating_sub(earlier.negative_hits),
            loads_abandoned: self.loads_abandoned.saturating_sub(earlier.loads_abandoned),
            stale_served_after_ttl: self
                .stale_served_after_ttl
                .saturating_sub(earlier.stale_served_after_ttl),
            loads_waited_for_limit: self
                .loads_waited_for_limit
                .saturating_sub(earlier.loads_waited_for_limit),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            loads_in_flight: self.loads_in_flight,
            max_concurrent_loads_seen: self.max_concurrent_loads_seen,
            remote: self.remote - earlier.remote,
        }
    }
}

/// Declares the remote tier's counters once: the snapshot struct, its subtraction, and the
/// atomic counters that fill it.
macro_rules! remote_counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters of a shared second tier (Redis, with the `redis` feature): how often it
        /// answered, failed, or was skipped, and what fleet-wide single-flight and
        /// invalidation did. Part of [`CacheStats`]; all zero for a cache without a tier.
        ///
        /// The tier never fails a request: `errors`, `timeouts` and `skipped` count operations
        /// that were answered locally instead.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct RemoteStats {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Sub for RemoteStats {
            type Output = RemoteStats;

            /// The counts of the period between `earlier` and `self` (zero, not a wrapped
            /// difference, if `earlier` is the later snapshot).
            fn sub(self, earlier: RemoteStats) -> RemoteStats {
                RemoteStats { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }

        /// Sums two instances' counters (e.g. a fleet's).
        impl Add for RemoteStats {
            type Output = RemoteStats;

            fn add(self, other: RemoteStats) -> RemoteStats {
                RemoteStats { $($name: self.$name.wrapping_add(other.$name),)* }
            }
        }

        /// The live counters behind [`RemoteStats`].
        #[derive(Debug, Default)]
        #[allow(dead_code)] // only the `redis` feature counts
        pub(crate) struct RemoteCounters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl RemoteStats {
            /// Each counter with its name (for exporters).
            #[allow(dead_code)] // used by the `metrics` feature
            pub(crate) fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }

        impl RemoteCounters {
            pub(crate) fn snapshot(&self) -> RemoteStats {
                RemoteStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

remote_counters! {
    /// Reads of the second tier that found the value (no load ran).
    hits,
    /// Reads of the second tier that found nothing.
    misses,
    /// Values written to the second tier (after a load, or by `insert`).
    writes,
    /// Loads' write-backs not stored: the key was written or invalidated (on any instance)
    /// after the load read it, or its lease was revoked. The newer write wins.
    writes_superseded,
    /// Operations Redis refused for one key (a key of another type, say): not counted against
    /// the circuit breaker, and the next write of the key repairs it.
    key_errors,
    /// Operations that failed (connection refused or dropped, protocol or codec error).
    errors,
    /// Operations that exceeded the per-operation timeout.
    timeouts,
    /// Operations not attempted because the circuit breaker was open.
    skipped,
    /// Times the circuit breaker opened.
    breaker_opened,
    /// Fleet-wide leases taken: this instance loaded for the fleet.
    leases_acquired,
    /// Loads that found another instance's lease and waited for its value.
    lease_waits,
    /// Of those, waits that ended with the value from the second tier.
    lease_wait_hits,
    /// Waits that gave up (bounded wait passed, or the lease vanished without a value twice)
    /// and loaded locally.
    lease_fallbacks,
    /// Invalidation messages published (`invalidate`, `insert`, `invalidate_all`).
    invalidations_sent,
    /// Invalidation messages received from other instances and applied.
    invalidations_received,
    /// Times the invalidation subscriber (re)connected.
    subscriber_connects,
    /// Values not stored in Redis because their encoding is larger than the tier's
    /// [`max_value_size`](crate::redis::RedisTier::max_value_size) (an `insert` of one leaves
    /// a tombstone instead). Per key: not counted against the circuit breaker.
    oversized,
}

impl RemoteCounters {
    #[allow(dead_code)]
    pub(crate) fn add(&self, counter: fn(&RemoteCounters) -> &AtomicU64) {
        counter(self).fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counts_add_up_across_threads() {
        let s = Stats::new();
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    for _ in 0..10_000 {
                        s.add(Counter::Coalesced, 1);
                        s.add_fast(Counter::Hit, 1);
                    }
                });
            }
        });
        let snap = s.snapshot();
        assert_eq!(snap.coalesced, 80_000);
        assert_eq!(snap.hits, 80_000, "exact with fewer threads than stripes");
        let d = snap - CacheStats::default();
        assert_eq!(d.hits, 80_000);
        assert_eq!(snap.hit_ratio(), 1.0);
    }

    #[test]
    fn hits_are_exact_with_more_live_threads_than_stripes() {
        // 100 threads counting at once: at least 36 of them on the shared stripe.
        let s = Stats::new();
        let all_up = std::sync::Barrier::new(100);
        std::thread::scope(|sc| {
            for _ in 0..100 {
                sc.spawn(|| {
                    s.add_fast(Counter::Hit, 1);
                    all_up.wait();
                    for _ in 1..20_000 {
                        s.add_fast(Counter::Hit, 1);
                    }
                });
            }
        });
        assert_eq!(s.snapshot().hits, 100 * 20_000);
    }

    #[test]
    fn counts_from_thread_local_destructors_are_kept() {
        // A thread-local whose destructor counts: it may run after the thread gave its stripe
        // back (on Linux it does: destructors run in the reverse order of registration).
        struct CountOnDrop(Option<std::sync::Arc<Stats>>);
        impl Drop for CountOnDrop {
            fn drop(&mut self) {
                if let Some(s) = self.0.take() {
                    s.add_fast(Counter::Hit, 1);
                    s.add(Counter::Coalesced, 1);
                }
            }
        }
        thread_local! {
            static LATE: std::cell::RefCell<CountOnDrop> =
                const { std::cell::RefCell::new(CountOnDrop(None)) };
        }
        let s = std::sync::Arc::new(Stats::new());
        let mine = std::sync::Arc::clone(&s);
        std::thread::spawn(move || {
            LATE.with(|l| l.borrow_mut().0 = Some(std::sync::Arc::clone(&mine)));
            for _ in 0..1000 {
                mine.add_fast(Counter::Hit, 1);
            }
        })
        .join()
        .expect("the thread");
        let snap = s.snapshot();
        assert_eq!((snap.hits, snap.coalesced), (1001, 1));
    }
}
