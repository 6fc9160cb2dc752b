//! Fail-safe: a backend that is down is not an error for the keys the cache still remembers.
//!
//! With [`fail_safe(max_stale)`](crate::CacheBuilder::fail_safe), an entry past its deadline is
//! not reclaimed at once: it is kept (and counted in the capacity bound, like any entry) until
//! `max_stale` past its deadline. Reads (`get`, `contains_key`, iteration) never see it: it is
//! expired. Only a *load* of the key can fall back on it, and only when that load fails:
//!
//! ```text
//!  deadline                    first failure              retry (one caller)        deadline + max_stale
//!  ───┼─── load (single-flight) ───┼─── stale, no load ───────┼─── stale ─── … ──────────┼─── reclaimed
//!                                   └──── refresh_backoff ─────┘
//! ```
//!
//! * **Until a load fails**, the key behaves as without fail-safe: the first caller after the
//!   deadline loads it, the others join that load (single-flight), and a healthy backend's
//!   value replaces the old one.
//! * **A load fails** — the loader's error, a panic (of a builder loader, or of a `get_with`
//!   init, whose panic still goes to its own caller), an abandoned async leader, a soft timeout
//!   of [`Cache::load_with_timeout`] (also one that passes while its leader still waits for a
//!   `max_concurrent_loads` permit: without a spawner the leader gives the load up before its
//!   loader runs, which abandons it; a spawned job keeps waiting and loads when it gets its
//!   permit), a key that `get_all`'s loader does not return — while the old value is within
//!   its stale window: every
//!   caller of that load gets the old value instead of the error (`Ok`), and the key's *retry
//!   deadline* is set `refresh_backoff` ahead. The retry deadline is set before the failed load
//!   leaves the registry, so no caller can start a second load in between.
//!   Not a failure: a computation (`and_compute_with` & co.) that stores nothing or panics (it
//!   loads nothing), a refresh that never ran (deferred by the load limit, dropped by the
//!   spawner, taken over), a load given up by a computation, a load that a write or
//!   invalidation of the key won over (its flight detached: checked under the lock that reads
//!   the old value, so the value that write stored is never put in a backoff no failed load
//!   of it started). A soft timeout sets the retry deadline only while a load of the key still
//!   runs (the one the caller waited for, or its successor): with none running, the timed-out
//!   caller still gets the old value, and the next caller loads. A refresh that fails while the
//!   value is still live sets the next refresh a backoff ahead and, with fail-safe, is not
//!   remembered by `negative_ttl` (the remembered error would answer before the old value,
//!   once it expires).
//! * **Until the retry deadline**, callers of the key get the old value at once, with no load.
//!   The first caller after it (decided under the shard's write lock) sets the next retry
//!   deadline and loads; meanwhile the others get the old value (they do not wait for a
//!   backend that just failed). So the backend sees at most one load of the key per backoff.
//!   A computation of the key running past the deadline is no retry (it loads nothing): the
//!   callers wait for it and take its value, as without fail-safe.
//! * **Never beyond `max_stale`**: once `deadline + max_stale` passes, the entry is gone (the
//!   check is exact, against the clock, not the reclaim), and a failure is an error again.
//! * **Writes win**: an `insert` or `invalidate` replaces or removes the old entry, so a load
//!   that fails afterwards has nothing to fall back on; so do a computation's `Op::Remove`
//!   (its closure saw no value: the entry is expired) and an `optionally_` loader's `None`
//!   (the backend's answer that the key is gone). With the Redis tier, so does another
//!   instance's invalidation that this one missed (its message lost): a load whose read of
//!   Redis finds a tombstone newer than every version of the key this instance wrote, heard
//!   of or read before (an `invalidate` or `invalidate_all` elsewhere; not its own, nor an
//!   older one its copy was loaded after) does not fall back, and its failure drops the old
//!   value. `retain`
//!   offers the old value to its predicate like a live one.
//!
//! The calls that can fall back are those that load on a miss: the `get_with` and `load`
//! families (blocking and async), `get_all`, and the entry API's `or_insert_with` family;
//! `get`, `contains_key`, iteration and `and_compute_with` see an expired entry as absent, and
//! so do `or_insert` and `or_default` (a value in hand is no load: it is stored).
//! A `None` of an `optionally_` loader is an answer, not a failure: it never falls back (and
//! removes the old value). A caller that gives up on its own — an async caller whose runtime
//! drops the load future at its timeout — gets the old value from [`Cache::get_or_stale`].
//! Calls answered this way are counted in
//! [`CacheStats::stale_served_after_ttl`](crate::CacheStats::stale_served_after_ttl), and
//! [`Cache::health`] raises a warning while it happens.

use super::Cache;
use crate::flight::Flight;
use crate::shard::{Shard, STALE_FORGONE};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What fail-safe makes of a caller about to claim a load ([`Cache::fail_safe_answer`]).
pub(crate) enum FailSafe<'a, V> {
    /// Answer with the old value, no load.
    Stale(&'a V),
    /// Load (or join) as usual.
    Load,
    /// Load as the key's retrier: the retry deadline was moved on from this one.
    Retrier(u64),
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The fast path of [`fail_safe_answer`](Self::fail_safe_answer), under the read lock: the
    /// old value (mapped by `hit`) if a load of `key` failed within the last backoff or a
    /// retry of it runs (a load: a computation of the key is no retry, its callers wait for
    /// it). `None` leaves the decision to the write-locked path, which checks again. During
    /// an outage, most callers of a failing key take only this read lock.
    pub(crate) fn fail_safe_read<R>(
        &self,
        hash: u64,
        key: &K,
        hit: impl FnOnce(&V) -> R,
    ) -> Option<R> {
        self.inner.stampede.fail_safe?;
        let now = self.now();
        let r = {
            let s = self.inner.shards[self.shard_index(hash)].lock.read();
            let (v, retry) = s.stale(hash, key, now)?;
            let at = retry.load(Ordering::Relaxed);
            // A running load that found the old value invalidated (see
            // `Flight::forgoes_fallback`) serves it to no one: its callers wait for it.
            let forgoes = s.flights_ref().running_load_forgoes(hash, key);
            if at == 0 || forgoes == Some(true) || (at <= now && forgoes.is_none()) {
                return None;
            }
            hit(v)
        };
        self.note_stale();
        Some(r)
    }

    /// Under the shard's write lock, for a caller about to claim a load of `key`: the old value
    /// to answer with instead ([`FailSafe::Stale`]), if a load of `key` failed within the last
    /// backoff or a retry of it runs. Otherwise, past the retry deadline, while a computation
    /// of the key runs, the caller joins it as any load's caller does (the computation loads
    /// nothing: it is no retry, and the deadline stays): [`FailSafe::Load`]; with nothing
    /// running, the caller becomes the retrier ([`FailSafe::Retrier`]): the next retry
    /// deadline is set now, so concurrent callers do not retry too — and set back by
    /// [`fail_safe_withdraw`](Self::fail_safe_withdraw) if the caller's registration is then
    /// withdrawn (a caller that cannot lead: no retry runs).
    pub(crate) fn fail_safe_answer<'a>(
        &self,
        s: &'a Shard<K, V>,
        hash: u64,
        key: &K,
        now: u64,
    ) -> FailSafe<'a, V> {
        if self.inner.stampede.fail_safe.is_none() {
            return FailSafe::Load;
        }
        let Some((v, retry)) = s.stale(hash, key, now) else {
            return FailSafe::Load;
        };
        let at = retry.load(Ordering::Relaxed);
        if at == 0 {
            return FailSafe::Load; // no load of it failed yet: load (or join) as usual
        }
        if s.flights_ref().running_load_forgoes(hash, key) == Some(true) {
            // The running retry found the old value invalidated: join it, no stale answer.
            return FailSafe::Load;
        }
        if at > now {
            return FailSafe::Stale(v);
        }
        match s.running_computes(hash, key) {
            Some(false) => return FailSafe::Stale(v), // a retry runs
            Some(true) => return FailSafe::Load,      // a computation runs: join it
            None => {}
        }
        let next = self.retry_deadline(now);
        retry.store(next, Ordering::Relaxed);
        FailSafe::Retrier(at)
    }

    /// Under the shard's write lock: the retrier's registration was withdrawn (a caller that
    /// cannot lead: a shared async load's owner whose future another caller already ran), so
    /// no retry runs: the retry deadline goes back to `previous`, and the next caller retries.
    pub(crate) fn fail_safe_withdraw(&self, s: &Shard<K, V>, hash: u64, key: &K, previous: u64) {
        if let Some((_, retry)) = s.stale(hash, key, self.now()) {
            retry.store(previous, Ordering::Relaxed);
        }
    }

    /// Under the shard's write lock: a load of `key` ended without a value (abandoned, e.g. its
    /// leader panicked or was dropped). Sets the retry deadline of its old value, if within its
    /// stale window, so that the callers that retry get the old value for a backoff.
    pub(crate) fn fail_safe_abandoned(&self, s: &Shard<K, V>, hash: u64, key: &K, forgo: bool) {
        if self.inner.stampede.fail_safe.is_none() {
            return;
        }
        if forgo {
            // The load found the old value invalidated (see `Flight::forgoes_fallback`): it is
            // no fallback for anyone any more (a failed load's drops it; here, under a shared
            // reference, it is marked) — nor, once it expires, a value still live: a refresh
            // that read the tombstone and was abandoned (its async future dropped, or it
            // panicked) is a failed refresh (round 89: the copy was fail-safe's after its
            // time to live).
            s.forgo_stale(hash, key);
            return;
        }
        let now = self.now();
        if let Some((_, retry)) = s.stale(hash, key, now) {
            let next = self.retry_deadline(now);
            retry.fetch_max(next, Ordering::Relaxed);
        }
    }

    /// The retry deadline a backoff from `now`, below [`STALE_FORGONE`].
    fn retry_deadline(&self, now: u64) -> u64 {
        crate::clock::deadline(now, self.inner.stampede.refresh_backoff).min(STALE_FORGONE - 1)
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The value of `key` for a caller that can wait no longer: the cached value, as
    /// [`get`](Self::get), or else, with [`fail_safe`](crate::CacheBuilder::fail_safe), the
    /// key's last value if it is past its deadline but within its stale window (counted in
    /// [`CacheStats::stale_served_after_ttl`](crate::CacheStats::stale_served_after_ttl) and
    /// raised by [`health`](Self::health), as any fail-safe answer). A stale value changes
    /// nothing: no load, no retry deadline. A live value is read exactly as by `get`: if its
    /// [`refresh_after`](crate::CacheBuilder::refresh_after) period is over, the read starts
    /// its refresh as `get`'s does (on the [`spawner`](crate::CacheBuilder::spawner) if set,
    /// else in the calling thread, before it returns: give a cache read by callers that cannot
    /// wait a spawner).
    ///
    /// For async callers whose runtime cuts a load off (`tokio::time::timeout` drops the
    /// future: the cache has no caller left to answer). A blocking caller has
    /// [`load_with_timeout`](Self::load_with_timeout), which falls back by itself:
    ///
    /// ```
    /// use herdcache::{BoxError, Cache, LoadError, ManualClock};
    /// use std::time::Duration;
    ///
    /// let clock = ManualClock::new();
    /// let cache: Cache<u32, String> = Cache::builder()
    ///     .max_capacity(10)
    ///     .time_to_live(Duration::from_secs(60))
    ///     .fail_safe(Duration::from_secs(600))
    ///     .clock(clock.clone())
    ///     // A backend that hangs.
    ///     .async_loader(|_k: &u32| std::future::pending::<Result<String, BoxError>>())
    ///     .build();
    /// cache.insert(7, "last known".to_string());
    /// clock.advance(Duration::from_secs(61)); // expired
    ///
    /// let rt = tokio::runtime::Builder::new_multi_thread().enable_time().build().unwrap();
    /// let v: Result<String, LoadError> = rt.block_on(async {
    ///     match tokio::time::timeout(Duration::from_millis(10), cache.load_async(7)).await {
    ///         Ok(r) => r,
    ///         Err(_elapsed) => cache.get_or_stale(&7).ok_or(LoadError::Timeout),
    ///     }
    /// });
    /// assert_eq!(v.unwrap(), "last known");
    /// ```
    ///
    /// Concurrent calls for the same key see the same value; a write or invalidation of the
    /// key ends the stale value for good.
    ///
    /// ```
    /// use herdcache::{Cache, ManualClock};
    /// use std::time::Duration;
    ///
    /// let clock = ManualClock::new();
    /// let cache: Cache<u32, &str> = Cache::builder()
    ///     .max_capacity(10)
    ///     .time_to_live(Duration::from_secs(60))
    ///     .fail_safe(Duration::from_secs(600))
    ///     .clock(clock.clone())
    ///     .build();
    /// cache.insert(1, "last known");
    /// clock.advance(Duration::from_secs(61));
    /// assert_eq!(cache.get(&1), None); // expired
    /// assert_eq!(cache.get_or_stale(&1), Some("last known")); // within max_stale
    /// clock.advance(Duration::from_secs(600));
    /// assert_eq!(cache.get_or_stale(&1), None); // never beyond it
    /// ```
    pub fn get_or_stale<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        if let Some(v) = self.read_whole(key, hash, V::clone) {
            return Some(v);
        }
        self.inner.stampede.fail_safe?;
        let now = self.now();
        let (v, stale) = {
            let s = self.inner.shards[self.shard_index(hash)].lock.read();
            // Cloned under the read lock, as a hit is. A write since the read above may have
            // made the key live again: its value, not a stale one (read as a hit reads it).
            match s.peek_read(hash, key, now, &self.inner.expiry) {
                Some(v) => (v.clone(), false),
                // Not while a load that found the old value invalidated runs (see
                // `Flight::forgoes_fallback`): it is no fallback.
                None if s.flights_ref().running_load_forgoes(hash, key) == Some(true) => {
                    return None
                }
                None => (s.stale(hash, key, now)?.0.clone(), true),
            }
        };
        if stale {
            self.note_stale();
        }
        Some(v)
    }

    /// A caller's wait for a load of `key` timed out: if the key's old value is within its
    /// stale window, returns a clone of it (cloned under the read lock, as a hit is), counted
    /// as served after its time to live, and — while a load of the key still runs — sets the
    /// key's retry deadline a backoff ahead, so that the next callers get the value at once
    /// instead of waiting for that load too. With no load running (the one this caller waited
    /// for lost to a write of the key, or has just ended), no deadline: the old value is then
    /// no failed load's, and the next caller loads.
    pub(crate) fn fail_safe_fallback(&self, hash: u64, key: &K) -> Option<V> {
        self.fail_safe_fallback_if(hash, key, None, true)
    }

    /// The load `flight` of `key` failed: as [`fail_safe_fallback`](Self::fail_safe_fallback),
    /// but only while `flight` is still registered (checked under the lock that reads the old
    /// value). A write or invalidation of the key since the load began detached it: the load
    /// lost to that write, its failure falls back on nothing (and puts the value that write
    /// stored, which no failed load ever loaded, in no backoff). `served`: whether a caller
    /// gets the value (counted only then).
    pub(crate) fn fail_safe_fallback_for(
        &self,
        hash: u64,
        key: &K,
        flight: &Arc<Flight<K, V>>,
        served: bool,
    ) -> Option<V> {
        self.fail_safe_fallback_if(hash, key, Some(flight), served)
    }

    fn fail_safe_fallback_if(
        &self,
        hash: u64,
        key: &K,
        flight: Option<&Arc<Flight<K, V>>>,
        served: bool,
    ) -> Option<V> {
        self.inner.stampede.fail_safe?;
        let now = self.now();
        let next = self.retry_deadline(now);
        let v = {
            let s = self.inner.shards[self.shard_index(hash)].lock.read();
            // Whether to set the retry deadline: for a failed load, while it still counts
            // (registered); for a timed-out wait, while a load of the key still runs.
            // A timed-out wait whose load found the old value invalidated (the Redis tier
            // read a tombstone its instance had missed) falls back on nothing, as the load's
            // own failure does.
            let backoff = match flight {
                Some(f) if !s.flights_ref().is_registered(hash, f) => return None,
                Some(_) => true,
                None => match s.flights_ref().running_load_forgoes(hash, key) {
                    Some(true) => return None,
                    running => running.is_some(),
                },
            };
            let (v, retry) = s.stale(hash, key, now)?;
            if backoff {
                retry.fetch_max(next, Ordering::Relaxed);
            }
            v.clone()
        };
        if served {
            self.note_stale();
        }
        Some(v)
    }
}
