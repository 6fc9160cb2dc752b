//! Single-flight loading: one protocol for sync and async callers.
//!
//! A *flight* ([`crate::flight`]) is one load of one key. It is registered in the key's shard,
//! under the same write lock that guards the shard's map, so "is it cached?" and "is it being
//! loaded?" are answered atomically: a caller that misses either *leads* (registers a new
//! flight) or *joins* the registered one.
//!
//! ```text
//!            claim (shard write lock)                      publish (shard write lock)
//!  miss ──► ┌──────────────┐  lead ──► run / drive the load ──► store value + unregister ──►
//!           │ flight for k?│                                                 then Done, wake all
//!           └──────────────┘  join ──► wait (Condvar or Waker) ◄────────────────────────────┘
//!        on panic, cancel, or a job dropped unrun: the Lead guard unregisters ──► Abandoned
//! ```
//!
//! * **Publish before release.** The value enters the map and the flight leaves the registry in
//!   one critical section; only then is the flight marked done and its waiters woken. A caller
//!   that arrives in between finds the value.
//! * **Every exit resolves the flight**, through the [`Lead`] guard's `Drop`: a value, an
//!   error, `None`, a panic anywhere (loader, weigher, `Expiry`, `Clone`, spawner) or a job
//!   that a spawner dropped without running it. Waiters of an abandoned flight retry: exactly
//!   one of them becomes the new leader (the claim is atomic) and runs *its own* loader.
//! * **Writes win, decided under the lock.** An `insert`, `invalidate` or compute of a key
//!   *detaches* its flight from the registry in the critical section of the write. A flight
//!   stores its value only if it is still registered when it publishes — checked in the same
//!   critical section that stores — so a load never overwrites a newer write, and a caller
//!   that starts after the write returned never joins the older load.
//! * **Async loads.** A borrowing load (`get_with_async`) is driven by its leader, whose
//!   [`Lead`] lives in its future: dropped mid-load, the flight is abandoned and a waiter loads
//!   with its own future. A *shared* load (`get_with_async_shared`, `load_async`) is stored in
//!   the flight and polled by whichever *async* caller gets there first, with a waker that
//!   wakes them all. So a leader that is dropped, or created and never polled again, does not
//!   strand the other async callers: any of them drives the load to completion. When the last
//!   async caller goes away the future is dropped (the load is cancelled) and the flight
//!   abandoned. Blocking callers never poll a future (it may need its own runtime): they wait,
//!   and load with their own loader if the async callers all went away.
//! * **Load permits.** A leader takes its permit (`max_concurrent_loads`) after it claims the
//!   key, and starts only if nobody took its load over meanwhile: a caller inside another load
//!   (holding a permit) that would wait for a leader still waiting for a permit takes the load
//!   over instead, so two loads never wait for each other's permit.
//! * **Errors and `None`** reach the callers that waited on that load (the same `Arc<E>` for
//!   all) and are not cached: the next call loads again. A waiter whose error type differs from
//!   the leader's retries instead.
//! * **Recursion.** A thread-local list holds the flights this thread is running; a call that
//!   would join one of them panics (it would wait for itself forever). A load nested in another
//!   load's loader does not wait for a second load permit (it would deadlock a full limit).
//! * **No user code under a shard lock** but the key's `Hash`/`Eq`, the `Expiry` callbacks and
//!   a hit's `Clone`: loaders, weighers and values' clones for waiters run with no lock held.

use crate::cache::{Cache, Write};
use crate::flight::{
    accept_option, accept_result, accept_value, enter, holds_permit, outcome_of, recursive_load,
    runs_here, take_publish_cap, Flight, FlightWaker, LoadFuture, Outcome, PermitHeld, Phase,
    State, Waited,
};
use crate::limit::Permit;
use crate::shard::{FlightClaim, Garbage};
use crate::stats::Counter;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// A shared async load and its start token (see [`Flight::start`]).
pub(crate) type SharedLoad<V> = (LoadFuture<V>, Arc<crate::sync::AtomicU8>);

/// How a caller claims a key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct How {
    /// It may lead a new load (it still has its loader).
    pub(crate) can_lead: bool,
    /// A negative-cache entry does not answer it (it could not use that outcome).
    pub(crate) bypass_negative: bool,
    /// Count the lookup's hit or miss.
    pub(crate) record: bool,
}

/// The result of claiming a key.
pub(crate) enum Claim<K, V, S, R>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    Hit(R),
    Lead(Lead<K, V, S>),
    Join(Arc<Flight<K, V>>),
    /// Not cached, not being loaded, and this caller cannot lead.
    Lost,
}

/// Owns a flight this caller leads until it is resolved. Dropping it unresolved — a panic in
/// any user code between the claim and the publish, a cancelled future, a job a spawner
/// dropped without running it — unregisters the flight and releases its waiters to retry. For
/// a refresh, it also schedules the next attempt after the refresh backoff.
pub(crate) struct Lead<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: Cache<K, V, S>,
    hash: u64,
    flight: Option<Arc<Flight<K, V>>>,
    refresh: bool,
}

impl<K, V, S> Lead<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(cache: &Cache<K, V, S>, hash: u64, flight: Arc<Flight<K, V>>) -> Self {
        Lead {
            cache: cache.clone(),
            hash,
            flight: Some(flight),
            refresh: false,
        }
    }

    /// A refresh's lead: abandoned, it retries after the refresh backoff.
    pub(crate) fn refresh(cache: &Cache<K, V, S>, hash: u64, flight: Arc<Flight<K, V>>) -> Self {
        Lead {
            cache: cache.clone(),
            hash,
            flight: Some(flight),
            refresh: true,
        }
    }

    pub(crate) fn flight(&self) -> &Arc<Flight<K, V>> {
        self.flight.as_ref().expect("armed until resolved")
    }

    pub(crate) fn cache(&self) -> &Cache<K, V, S> {
        &self.cache
    }

    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    /// The flight, no longer guarded: the caller resolves it now.
    pub(crate) fn disarm(mut self) -> Arc<Flight<K, V>> {
        self.flight.take().expect("armed until resolved")
    }
}

impl<K, V, S> Drop for Lead<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if let Some(flight) = self.flight.take() {
            let retry = self.refresh.then(|| {
                self.cache.count(Counter::RefreshFailed);
                crate::clock::deadline(self.cache.now(), self.cache.inner.stampede.refresh_backoff)
            });
            self.cache.abandon(self.hash, &flight, true, retry);
        }
    }
}

/// A load permit taken for this thread, or none when the thread already holds one (a load
/// nested in another load's loader must not wait for a second permit: with a full limit it
/// would wait for itself).
pub(crate) struct LoadPermit(#[allow(dead_code)] Option<(Permit, PermitHeld)>);

impl LoadPermit {
    /// A permit just taken by this thread.
    pub(crate) fn held(p: Permit) -> Self {
        LoadPermit(Some((p, PermitHeld::enter())))
    }

    /// No permit (no limit, or one held already).
    pub(crate) fn none() -> Self {
        LoadPermit(None)
    }
}

/// Polls a leader's own load with its flight marked as run by the polling thread (a load of
/// the same key inside it fails loudly instead of waiting for itself) and, under a permit, the
/// permit marked as held (loads nested in it do not wait for another).
struct Leading<'a, K, V, F> {
    flight: &'a Arc<Flight<K, V>>,
    inner: Pin<&'a mut F>,
    held: bool,
}

impl<K, V, F: Future> Future for Leading<'_, K, V, F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _running = enter(self.flight);
        let _held = self.held.then(PermitHeld::enter);
        self.inner.as_mut().poll(cx)
    }
}

/// Polls a load that runs under a permit with the permit marked as held by the polling thread,
/// so loads nested in it do not wait for another.
pub(crate) struct UnderPermit<F> {
    inner: Pin<Box<F>>,
    held: bool,
}

impl<F> UnderPermit<F> {
    pub(crate) fn new(inner: F, held: bool) -> Self {
        UnderPermit {
            inner: Box::pin(inner),
            held,
        }
    }
}

impl<F: Future> Future for UnderPermit<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _held = self.held.then(PermitHeld::enter);
        self.inner.as_mut().poll(cx)
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Returns the value for `key`, loading it with `init` on a miss — once, however many
    /// callers miss at the same time.
    ///
    /// Blocks the calling thread while a load of `key` runs (its own or another caller's).
    ///
    /// # Concurrent calls on the same key
    ///
    /// * Exactly one caller (the *leader*) runs its `init`; the others wait and receive a clone
    ///   of its value. The value is in the cache (visible to [`get`](Self::get)) before any
    ///   waiter is released. No lock is held while `init` runs: `get` and `insert` of every
    ///   other key, in the same shard or not, proceed meanwhile.
    /// * If `init` panics, the panic propagates to the leader's caller; the waiters are released
    ///   at once and one of them becomes the new leader and runs *its own* `init` (and so on).
    ///   Nothing is poisoned.
    /// * If the running load is an async one (from [`get_with_async`](Self::get_with_async)) or
    ///   ended in an error or `None` (from a `try_`/`optionally_` sibling), this call waits for
    ///   it and, when its outcome is not a value, loads again itself. It never polls another
    ///   caller's future (that future may need its own runtime): if every async caller of that
    ///   load goes away, the load is cancelled and this call runs its own `init`.
    /// * A write ([`insert`](Self::insert), a compute) or invalidation of `key` during the load
    ///   wins: the load's value still goes to the callers already waiting on it but is not
    ///   cached, and a caller that starts after the write returned does not join that load.
    /// * If anything between the load and the store panics (the weigher, an
    ///   [`Expiry`](crate::Expiry) callback, the value's `Clone`), the panic reaches this
    ///   caller and the waiters load again: the key is never left loading.
    ///
    /// # Panics
    ///
    /// If `init` panics (the panic is resumed), or if `init` asks this cache for `key` itself
    /// on the same thread (a recursive load would wait for itself forever; so does a cycle on
    /// one thread, A's loader loading B whose loader loads A). Loading *other* keys inside
    /// `init` is fine, also under [`max_concurrent_loads`](crate::CacheBuilder::max_concurrent_loads):
    /// a nested load runs under its caller's permit, and takes over a load of its key whose
    /// leader still waits for a permit rather than wait for it. Not detected: a cycle across
    /// threads (A's loader on one thread loading B while B's loader on another loads A waits
    /// forever, as two locks taken in opposite orders would).
    ///
    /// # Example
    ///
    /// ```
    /// use herdcache::Cache;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    ///
    /// let cache: Cache<u32, String> = Cache::new(100);
    /// let loads = AtomicUsize::new(0);
    /// std::thread::scope(|s| {
    ///     for _ in 0..8 {
    ///         s.spawn(|| {
    ///             let v = cache.get_with(7, || {
    ///                 loads.fetch_add(1, Ordering::SeqCst);
    ///                 std::thread::sleep(std::time::Duration::from_millis(50));
    ///                 "seven".to_string()
    ///             });
    ///             assert_eq!(v, "seven");
    ///         });
    ///     }
    /// });
    /// assert_eq!(loads.load(Ordering::SeqCst), 1, "eight callers, one load");
    /// ```
    pub fn get_with(&self, key: K, init: impl FnOnce() -> V) -> V {
        self.load_sync(key, || Outcome::Value(init()), V::clone, accept_value)
    }

    /// Like [`get_with`](Self::get_with), for a loader that can fail. An error is returned to
    /// the leader and to every caller that waited on that load as the *same* `Arc<E>`
    /// (`Arc::ptr_eq` holds), and is not cached: the next call loads again.
    ///
    /// # Errors
    ///
    /// The loader's error, shared. A waiting caller whose `E` differs from the leader's does
    /// not receive it: it loads again itself.
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(10);
    /// let r = cache.try_get_with(1, || Err::<u32, _>("backend down"));
    /// assert_eq!(*r.unwrap_err(), "backend down");
    /// assert!(!cache.contains_key(&1), "errors are not cached");
    /// assert_eq!(cache.try_get_with(1, || Ok::<_, &str>(5)), Ok(5));
    /// ```
    pub fn try_get_with<E>(&self, key: K, init: impl FnOnce() -> Result<V, E>) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        self.load_sync(
            key,
            || outcome_of(init()),
            |v| Ok(v.clone()),
            accept_result::<V, E>,
        )
    }

    /// Like [`get_with`](Self::get_with), for a loader that may find nothing. `None` is
    /// returned to the leader and the callers that waited on that load, and is not cached.
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(10);
    /// assert_eq!(cache.optionally_get_with(1, || None), None);
    /// assert_eq!(cache.optionally_get_with(1, || Some(3)), Some(3));
    /// assert_eq!(cache.get(&1), Some(3));
    /// ```
    pub fn optionally_get_with(&self, key: K, init: impl FnOnce() -> Option<V>) -> Option<V> {
        self.load_sync(
            key,
            || init().map_or(Outcome::Nothing, Outcome::Value),
            |v| Some(v.clone()),
            accept_option,
        )
    }

    /// The async twin of [`get_with`](Self::get_with): on a miss, `init` is awaited once,
    /// however many callers (async or blocking) miss at the same time. Runtime-agnostic: no
    /// executor is required or spawned.
    ///
    /// `init` may borrow from the caller (`self.db.fetch_user(id)` in a method of yours): it
    /// needs neither `Send` nor `'static`, and the returned future is `Send` when `init` is.
    ///
    /// # Concurrent calls on the same key
    ///
    /// As for [`get_with`](Self::get_with): the leader awaits its own `init`; the other
    /// callers wait, and receive a clone of its value. If the leader's future is dropped before
    /// its load finishes, the load is cancelled and one of the waiting callers loads with *its*
    /// `init` (nobody is stranded, nobody waits on a future no one can poll). A blocking caller
    /// of the key waits the same way. To let waiters finish a cancelled leader's load instead
    /// (a `'static` load whose work must not be wasted when its caller times out), use
    /// [`get_with_async_shared`](Self::get_with_async_shared).
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future cancels this caller's part: a load it leads is dropped
    /// (and another caller takes over), a wait is unregistered. Nothing is left behind, and the
    /// key is not cached by a cancelled load.
    ///
    /// # Panics
    ///
    /// If `init` panics (in this caller; the waiters load again with their own `init`), or if
    /// `init` awaits this cache for the same key (a recursive load would wait for itself).
    ///
    /// # Example
    ///
    /// ```
    /// use herdcache::Cache;
    ///
    /// struct Db;
    /// impl Db {
    ///     async fn fetch_user(&self, id: u32) -> String {
    ///         format!("user {id}")
    ///     }
    /// }
    /// struct Service {
    ///     db: Db,
    ///     cache: Cache<u32, String>,
    /// }
    /// impl Service {
    ///     async fn user(&self, id: u32) -> String {
    ///         // The load borrows `self.db`: no `Arc`, no `async move`.
    ///         self.cache.get_with_async(id, self.db.fetch_user(id)).await
    ///     }
    /// }
    /// let s = Service { db: Db, cache: Cache::new(100) };
    /// assert_eq!(futures::executor::block_on(s.user(1)), "user 1");
    /// ```
    pub async fn get_with_async(&self, key: K, init: impl Future<Output = V>) -> V {
        self.load_borrowed(
            key,
            async { Outcome::Value(init.await) },
            V::clone,
            accept_value,
        )
        .await
    }

    /// The async twin of [`try_get_with`](Self::try_get_with); `init` may borrow, as for
    /// [`get_with_async`](Self::get_with_async).
    ///
    /// # Errors
    ///
    /// As [`try_get_with`](Self::try_get_with).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(10);
    /// let r = futures::executor::block_on(cache.try_get_with_async(1, async { Err::<u32, _>(7) }));
    /// assert_eq!(*r.unwrap_err(), 7);
    /// ```
    pub async fn try_get_with_async<E>(
        &self,
        key: K,
        init: impl Future<Output = Result<V, E>>,
    ) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        self.load_borrowed(
            key,
            async { outcome_of(init.await) },
            |v| Ok(v.clone()),
            accept_result::<V, E>,
        )
        .await
    }

    /// The async twin of [`optionally_get_with`](Self::optionally_get_with); `init` may
    /// borrow, as for [`get_with_async`](Self::get_with_async).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(10);
    /// let v = futures::executor::block_on(cache.optionally_get_with_async(1, async { Some(2) }));
    /// assert_eq!(v, Some(2));
    /// ```
    pub async fn optionally_get_with_async(
        &self,
        key: K,
        init: impl Future<Output = Option<V>>,
    ) -> Option<V> {
        self.load_borrowed(
            key,
            async { init.await.map_or(Outcome::Nothing, Outcome::Value) },
            |v| Some(v.clone()),
            accept_option,
        )
        .await
    }

    /// [`get_with_async`](Self::get_with_async) with a *shared* load: the leader's `init`
    /// (`Send + 'static`) is stored in the load, and any async caller waiting on it may poll
    /// it. So when the leading future is dropped (say, a timeout on the leader's request), or
    /// is never polled again, the waiters drive the load to completion and the work is not
    /// wasted; the load is cancelled (the future dropped) only when every async caller waiting
    /// on it is gone. Blocking callers never poll it (it may need its runtime): they wait, and
    /// load themselves if the async callers all went away.
    ///
    /// Choose this when loads are expensive and callers often give up (timeouts) while others
    /// wait for the same key; choose [`get_with_async`](Self::get_with_async) when the load
    /// borrows from the caller, or must run in the caller's task (task-locals, tracing spans).
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future unregisters it from the load (nothing is left behind); if
    /// it was the last async caller interested in that load, the load is cancelled and the key
    /// is not cached. Other callers are unaffected.
    ///
    /// # Panics
    ///
    /// If the load panics, in the caller that was polling it at the time (usually the leader);
    /// the others load again. If the load awaits this cache for the same key.
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, String> = herdcache::Cache::new(10);
    /// let v = futures::executor::block_on(
    ///     cache.get_with_async_shared(1, async { "one".to_string() }),
    /// );
    /// assert_eq!(v, "one");
    /// ```
    pub async fn get_with_async_shared(
        &self,
        key: K,
        init: impl Future<Output = V> + Send + 'static,
    ) -> V {
        self.load_async_core(
            key,
            async { Outcome::Value(init.await) },
            V::clone,
            accept_value,
        )
        .await
    }

    /// [`try_get_with_async`](Self::try_get_with_async) with a shared load, as
    /// [`get_with_async_shared`](Self::get_with_async_shared).
    ///
    /// # Errors
    ///
    /// As [`try_get_with`](Self::try_get_with).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async_shared`](Self::get_with_async_shared).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(10);
    /// let r = futures::executor::block_on(
    ///     cache.try_get_with_async_shared(1, async { Ok::<_, String>(7) }),
    /// );
    /// assert_eq!(r, Ok(7));
    /// ```
    pub async fn try_get_with_async_shared<E>(
        &self,
        key: K,
        init: impl Future<Output = Result<V, E>> + Send + 'static,
    ) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        self.load_async_core(
            key,
            async { outcome_of(init.await) },
            |v| Ok(v.clone()),
            accept_result::<V, E>,
        )
        .await
    }

    /// [`optionally_get_with_async`](Self::optionally_get_with_async) with a shared load, as
    /// [`get_with_async_shared`](Self::get_with_async_shared).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async_shared`](Self::get_with_async_shared).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::new(10);
    /// let v = futures::executor::block_on(
    ///     cache.optionally_get_with_async_shared(1, async { Some(2) }),
    /// );
    /// assert_eq!(v, Some(2));
    /// ```
    pub async fn optionally_get_with_async_shared(
        &self,
        key: K,
        init: impl Future<Output = Option<V>> + Send + 'static,
    ) -> Option<V> {
        self.load_async_core(
            key,
            async { init.await.map_or(Outcome::Nothing, Outcome::Value) },
            |v| Some(v.clone()),
            accept_option,
        )
        .await
    }

    /// Looks `key` up; on a miss registers a new flight (lead) or finds the running one (join),
    /// atomically under the shard's write lock.
    ///
    /// An async caller passes its future (moved into the flight if it leads); an async caller
    /// whose future is already gone (it went into a flight that was then abandoned) may only
    /// join or hit: `can_lead` is false and `Claim::Lost` says nothing is running.
    pub(crate) fn claim<R>(
        &self,
        hash: u64,
        key: &K,
        hit: &impl Fn(&V) -> R,
        future: &mut Option<SharedLoad<V>>,
        how: How,
    ) -> Claim<K, V, S, R> {
        let How {
            can_lead,
            bypass_negative,
            record,
        } = how;
        if let Some(r) = self.get_map(key, hash, record, hit) {
            return Claim::Hit(r);
        }
        if let Some(r) = self.fail_safe_read(hash, key, hit) {
            return Claim::Hit(r);
        }
        // The key's clones (user code) come before the lock.
        let registered = key.clone();
        let owned = (can_lead && future.is_some()).then(|| key.clone());
        let now = self.now();
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        if let Some(v) = s.peek(hash, key, now) {
            return Claim::Hit(hit(v));
        }
        if let Some(v) = self.fail_safe_answer(&s, hash, key, now) {
            let r = hit(v);
            drop(s);
            self.note_stale();
            return Claim::Hit(r);
        }
        let f = match future {
            Some((_, token)) if can_lead => Flight::with_start(Arc::clone(token)),
            _ => Flight::blocking(),
        };
        let serve_negative = !bypass_negative;
        let hasher = &self.inner.hasher;
        match s.claim_flight(
            hash,
            registered,
            Arc::clone(&f),
            now,
            serve_negative,
            hasher,
        ) {
            FlightClaim::Running(running, unused) => {
                drop(s);
                drop(unused);
                if runs_here(running.id()) {
                    recursive_load();
                }
                self.count(if running.negative_until() > 0 {
                    Counter::NegativeHit
                } else {
                    Counter::Coalesced
                });
                Claim::Join(running)
            }
            FlightClaim::Registered(stale) if can_lead => {
                if let Some((fut, _)) = future.take() {
                    f.set_shared_load(owned, fut);
                }
                drop(s);
                drop(stale);
                Claim::Lead(Lead::new(self, hash, f))
            }
            FlightClaim::Registered(stale) => {
                // Registered for a caller that cannot lead: take it back.
                let key = s.remove_flight(hash, &f);
                drop(s);
                drop((stale, key));
                Claim::Lost
            }
        }
    }

    /// Publishes a finished load: stores a value (only if the flight is still registered: no
    /// write or invalidation of the key happened since it was claimed) and unregisters the
    /// flight in one critical section, then marks it done and wakes the waiters. A failure
    /// (error or `None`) stays registered as a negative-cache entry when a negative TTL is set;
    /// a panic of a shared loader, for the refresh backoff. `took` is the load's duration, kept
    /// for early refresh. Returns the outcome as every waiter sees it.
    ///
    /// The weigher and the value's `Clone` run first, with the flight still guarded: if either
    /// panics, the flight is abandoned (its waiters load again) and nothing is stored.
    pub(crate) fn publish(
        &self,
        lead: Lead<K, V, S>,
        key: Option<K>,
        outcome: Outcome<V>,
        took: u64,
    ) -> Arc<Outcome<V>> {
        let hash = lead.hash;
        if !lead.flight().is_running() {
            // A shared load that another caller took over (and ended) while it waited for a
            // permit: nothing of it is published.
            let flight = lead.disarm();
            return match &flight.state.lock().phase {
                Phase::Done(o) => Arc::clone(o),
                _ => Arc::new(outcome),
            };
        }
        let cap = take_publish_cap().map_or(crate::clock::NEVER, |n| {
            crate::clock::deadline(self.now(), n)
        });
        let success = matches!(outcome, Outcome::Value(_));
        self.count(if success {
            Counter::LoadSuccess
        } else {
            Counter::LoadFailure
        });
        self.count_n(Counter::LoadNanos, took);
        let failed = matches!(outcome, Outcome::Error(_) | Outcome::Panicked);
        self.inner.stampede.monitor.load(took, failed);
        // A planted bug for the loom model to catch: waiters released before the value is
        // published.
        #[cfg(herdcache_broken_model)]
        if let Outcome::Value(v) = &outcome {
            lead.flight()
                .resolve(Phase::Done(Arc::new(Outcome::Value(v.clone()))));
        }
        let key = key.or_else(|| lead.flight().state.lock().key.take());
        // User code, with the flight still guarded.
        let mut failed_key = None;
        let staged = match (&outcome, key) {
            (Outcome::Value(v), Some(key)) => {
                let weight = self.weigh(&key, v);
                Some((key, v.clone(), weight))
            }
            (_, key) => {
                failed_key = key;
                None
            }
        };
        // Fail-safe: a failed load of an expired key answers with its old value (taken, and
        // the key's retry deadline set, while the flight is still registered).
        let mut outcome = outcome;
        let fallback = match (&outcome, &failed_key) {
            (Outcome::Error(_) | Outcome::Panicked, Some(k)) => self.fail_safe_fallback(hash, k),
            _ => None,
        };
        drop(failed_key);
        let mut out = Garbage::new();
        match staged {
            Some((key, value, weight)) => {
                let write = Write::Load(lead.flight());
                self.reporting_panics(&mut out, |out| {
                    self.insert_with(hash, key, value, weight, write, (took, cap), out)
                });
            }
            None => {
                let negative = match outcome {
                    _ if fallback.is_some() => None,
                    Outcome::Value(_) => None,
                    Outcome::Panicked => Some(self.inner.stampede.refresh_backoff),
                    _ => self.inner.stampede.negative_ttl,
                };
                self.end_failed(hash, lead.flight(), negative.filter(|_| self.keeps_time()));
                if let Some(v) = fallback {
                    outcome = Outcome::Value(v);
                }
            }
        }
        let flight = lead.disarm();
        let outcome = Arc::new(outcome);
        flight.resolve(Phase::Done(Arc::clone(&outcome)));
        // Removed entries are reported (eviction listener) only after the waiters are
        // released: a panicking listener must not strand them.
        self.finish(out);
        outcome
    }

    /// Unregisters a flight that ended without a value, or keeps it registered as a
    /// negative-cache entry for `negative` nanoseconds — if it is still registered.
    fn end_failed(&self, hash: u64, flight: &Arc<Flight<K, V>>, negative: Option<u64>) {
        let key = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            match negative {
                Some(ttl) if s.is_registered(hash, flight) => {
                    // Kept registered: `claim` serves the outcome until the deadline. Set under
                    // the shard lock, where `claim` reads it.
                    flight.set_negative_until(crate::clock::deadline(self.now(), ttl));
                    None
                }
                _ => s.remove_flight(hash, flight),
            }
        };
        drop(key); // outside the lock
    }

    /// Unregisters a flight (if still registered) and resolves it as abandoned: its waiters
    /// retry. For a cancellation (`!always`) the check that nobody is interested and the
    /// unregistration happen under the shard lock and the flight's lock together, so a caller
    /// that joined meanwhile (and may be driving the load) keeps the flight alive. With
    /// `retry_refresh`, the entry's next refresh is due then (if the flight was registered).
    pub(crate) fn abandon(
        &self,
        hash: u64,
        flight: &Arc<Flight<K, V>>,
        always: bool,
        retry_refresh: Option<u64>,
    ) {
        if always {
            self.end_flight(hash, flight, retry_refresh, Phase::Abandoned);
            return;
        }
        let (future, key, wakers) = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            let mut st = flight.state.lock();
            if !matches!(st.phase, Phase::Running) || st.interested > 0 || st.polling {
                return;
            }
            let key = s.remove_flight(hash, flight);
            st.phase = Phase::Abandoned;
            (st.future.take(), key, std::mem::take(&mut st.wakers))
        };
        flight.notify();
        for (_, w) in wakers {
            w.wake();
        }
        drop((future, key)); // outside the locks
    }

    /// Unregisters a flight that ends without storing anything (if it is still registered:
    /// then, with `retry_refresh`, the entry's next refresh is due at that time) and resolves
    /// it with `phase`.
    pub(crate) fn end_flight(
        &self,
        hash: u64,
        flight: &Arc<Flight<K, V>>,
        retry_refresh: Option<u64>,
        phase: Phase<V>,
    ) {
        let key = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            let key = s.remove_flight(hash, flight);
            if let (Some(k), Some(at)) = (&key, retry_refresh) {
                s.set_refresh_at(hash, k, at);
            }
            if let (Some(k), Phase::Abandoned) = (&key, &phase) {
                self.fail_safe_abandoned(&s, hash, k);
            }
            key
        };
        drop(key); // outside the lock
        flight.resolve(phase);
    }

    /// Runs a blocking load: the single-flight core for `get_with` and its siblings. The hit
    /// path is inlined here; the rest is not.
    #[inline]
    fn load_sync<R>(
        &self,
        key: K,
        init: impl FnOnce() -> Outcome<V>,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R {
        let hash = self.hash(&key);
        if let Some(r) = self.get_map(&key, hash, true, &hit) {
            return r;
        }
        self.load_sync_slow(key, hash, init, hit, accept)
    }

    #[inline(never)]
    fn load_sync_slow<R>(
        &self,
        key: K,
        hash: u64,
        init: impl FnOnce() -> Outcome<V>,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R {
        self.load_blocking(key, hash, init, &hit, &accept, None, false)
            .expect("without a deadline a blocking load always ends with a result")
    }

    /// The blocking single-flight loop. `until` bounds the waits on loads run by others;
    /// `None` means it passed. `record`: count the first lookup's hit or miss.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_blocking<R>(
        &self,
        key: K,
        hash: u64,
        init: impl FnOnce() -> Outcome<V>,
        hit: &impl Fn(&V) -> R,
        accept: &impl Fn(&Outcome<V>) -> Option<R>,
        until: Option<Instant>,
        mut record: bool,
    ) -> Option<R> {
        let mut init = Some(init);
        let mut bypass_negative = false;
        loop {
            let how = How {
                can_lead: true,
                bypass_negative,
                record,
            };
            let claim = self.claim(hash, &key, hit, &mut None, how);
            record = false;
            match claim {
                Claim::Hit(r) => return Some(r),
                Claim::Lost => unreachable!("a blocking caller can always lead"),
                Claim::Lead(lead) => {
                    let f = init.take().expect("a caller leads at most once");
                    match self.run_loader(lead.flight(), f, true) {
                        Ok((outcome, took)) => {
                            let outcome = self.publish(lead, Some(key), outcome, took);
                            return Some(accept(&outcome).expect("a leader accepts its own"));
                        }
                        // Taken over while this caller waited for a permit: wait for it.
                        Err(f) => {
                            init = Some(f);
                            let flight = lead.disarm();
                            match self.wait_blocking(&flight, accept, until) {
                                Waited::Done(Some(r)) => return Some(r),
                                Waited::Done(None) => bypass_negative = true,
                                Waited::Abandoned => {}
                                Waited::TimedOut => return None,
                            }
                        }
                    }
                }
                Claim::Join(flight) => {
                    // A caller that holds a load permit (inside another load) must not wait for
                    // a leader that waits for a permit: it takes the load over.
                    if init.is_some() && holds_permit() && flight.steal() {
                        let lead = Lead::new(self, hash, flight);
                        let f = init.take().expect("checked");
                        let Ok((outcome, took)) = self.run_loader(lead.flight(), f, false) else {
                            unreachable!("a load taken over is not started again")
                        };
                        let outcome = self.publish(lead, Some(key), outcome, took);
                        return Some(accept(&outcome).expect("a leader accepts its own"));
                    }
                    match self.wait_blocking(&flight, accept, until) {
                        Waited::Done(Some(r)) => return Some(r),
                        // An outcome this caller cannot use (an error of another type, a
                        // negative entry for a caller without an error channel): load itself.
                        Waited::Done(None) => bypass_negative = true,
                        Waited::Abandoned => {}
                        Waited::TimedOut => return None,
                    }
                }
            }
        }
    }

    /// Takes a load permit for this thread, if the cache limits loads and the thread holds
    /// none yet.
    pub(crate) fn load_permit(&self) -> LoadPermit {
        match &self.inner.stampede.limiter {
            Some(l) if !holds_permit() => LoadPermit::held(l.acquire_blocking()),
            _ => LoadPermit::none(),
        }
    }

    /// Runs a blocking leader's loader under a load permit (if limited), registered as run by
    /// this thread (recursion); returns the outcome and the load's duration. A panic of the
    /// loader propagates (the caller's [`Lead`] abandons the flight). With `start`, the load
    /// starts only if no caller took it over while this one waited for a permit (else `init`
    /// comes back unrun).
    pub(crate) fn run_loader<F: FnOnce() -> Outcome<V>>(
        &self,
        flight: &Arc<Flight<K, V>>,
        init: F,
        start: bool,
    ) -> Result<(Outcome<V>, u64), F> {
        let permit = self.load_permit();
        if start && !flight.start() {
            return Err(init);
        }
        let running = enter(flight);
        let start = self.now();
        let outcome = init();
        let took = self.now().saturating_sub(start);
        drop(running);
        drop(permit);
        Ok((outcome, took))
    }

    /// Waits on this thread for a flight run by another caller, until it ends or `until`
    /// passes; maps its outcome for this caller (the value cloned with no lock held). Never
    /// polls an async flight's future.
    pub(crate) fn wait_blocking<R>(
        &self,
        flight: &Arc<Flight<K, V>>,
        accept: &impl Fn(&Outcome<V>) -> Option<R>,
        until: Option<Instant>,
    ) -> Waited<R> {
        match flight.wait_blocking(until) {
            Waited::Done(Some(o)) => Waited::Done(accept(&o)),
            Waited::Done(None) => Waited::Done(None),
            Waited::Abandoned => Waited::Abandoned,
            Waited::TimedOut => Waited::TimedOut,
        }
    }

    /// Polls an async flight's shared future once; publishes its outcome when it completes.
    /// The caller must hold interest in the flight. A wake-up during the poll reaches every
    /// interested caller, so one of them polls again; nobody loops here.
    fn poll_shared(&self, hash: u64, flight: &Arc<Flight<K, V>>, waker: &Waker) {
        let mut fut = {
            let mut st = flight.state.lock();
            if st.polling {
                return;
            }
            let Some(fut) = st.future.take() else { return };
            st.polling = true;
            fut
        };
        // If the poll panics, the guard abandons the flight (the future is dropped unwinding).
        let lead = Lead::new(self, hash, Arc::clone(flight));
        let running = enter(flight);
        let polled = fut.as_mut().poll(&mut Context::from_waker(waker));
        drop(running);
        match polled {
            Poll::Ready((outcome, took)) => {
                drop(fut);
                flight.state.lock().polling = false;
                self.publish(lead, None, outcome, took);
            }
            Poll::Pending => {
                let mut st = flight.state.lock();
                st.polling = false;
                st.future = Some(fut);
                drop(st);
                drop(lead.disarm()); // still running: nothing to resolve
            }
        }
    }

    /// Runs an async load whose future the leader drives itself (it may borrow): the
    /// single-flight core for `get_with_async` and its siblings. The flight holds no future;
    /// the leader's [`Lead`] guard lives in this future, so dropping it mid-load abandons the
    /// flight and a waiter leads with its own `init`.
    pub(crate) async fn load_borrowed<R>(
        &self,
        key: K,
        init: impl Future<Output = Outcome<V>>,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R {
        let hash = self.hash(&key);
        let mut init = Some(init);
        let mut bypass_negative = false;
        let mut record = true;
        loop {
            let how = How {
                can_lead: true,
                bypass_negative,
                record,
            };
            let claim = self.claim(hash, &key, &hit, &mut None, how);
            record = false;
            match claim {
                Claim::Hit(r) => return r,
                Claim::Lost => unreachable!("a caller with its loader can always lead"),
                Claim::Lead(lead) => {
                    let f = init.take().expect("a caller leads at most once");
                    match self.drive(lead.flight(), f, true).await {
                        Ok((outcome, took)) => {
                            let outcome = self.publish(lead, Some(key), outcome, took);
                            return accept(&outcome).expect("a leader accepts its own outcome");
                        }
                        // Taken over while this caller waited for a permit: wait for it.
                        Err(f) => {
                            init = Some(f);
                            let flight = lead.disarm();
                            match wait_async(self, hash, flight, &accept).await {
                                Waited::Done(Some(r)) => return r,
                                Waited::Done(None) => bypass_negative = true,
                                Waited::Abandoned | Waited::TimedOut => {}
                            }
                        }
                    }
                }
                Claim::Join(flight) => {
                    // Inside another load that holds a permit: take over a leader that waits
                    // for one (waiting for it could keep the permit from it forever).
                    if init.is_some() && holds_permit() && flight.steal() {
                        let lead = Lead::new(self, hash, flight);
                        let f = init.take().expect("checked");
                        let Ok((outcome, took)) = self.drive(lead.flight(), f, false).await else {
                            unreachable!("a load taken over is not started again")
                        };
                        let outcome = self.publish(lead, Some(key), outcome, took);
                        return accept(&outcome).expect("a leader accepts its own outcome");
                    }
                    match wait_async(self, hash, flight, &accept).await {
                        Waited::Done(Some(r)) => return r,
                        Waited::Done(None) => bypass_negative = true,
                        Waited::Abandoned | Waited::TimedOut => {}
                    }
                }
            }
        }
    }

    /// Awaits a leader's own load: under a load permit (if limited, and unless this thread
    /// holds one), registered as run by the polling thread during each poll (recursion);
    /// returns the outcome and the load's duration.
    async fn drive<F: Future<Output = Outcome<V>>>(
        &self,
        flight: &Arc<Flight<K, V>>,
        init: F,
        start: bool,
    ) -> Result<(Outcome<V>, u64), F> {
        let permit = match &self.inner.stampede.limiter {
            Some(l) if !holds_permit() => Some(l.acquire().await),
            _ => None,
        };
        if start && !flight.start() {
            return Err(init);
        }
        let start = self.now();
        let outcome = Leading {
            flight,
            inner: std::pin::pin!(init),
            held: permit.is_some(),
        }
        .await;
        let took = self.now().saturating_sub(start);
        drop(permit);
        Ok((outcome, took))
    }

    /// Runs a shared async load: the single-flight core for `get_with_async_shared` and its
    /// siblings, and `load_async`.
    pub(crate) async fn load_async_core<R>(
        &self,
        key: K,
        init: impl Future<Output = Outcome<V>> + Send + 'static,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R {
        let hash = self.hash(&key);
        let limiter = self.inner.stampede.limiter.clone();
        let clock = self.time_source();
        // The shared load: takes a load permit (if limited, and unless it is nested in a load
        // that holds one) and measures itself.
        // The load's start token: the flight this future leads is made with it.
        let token = Arc::new(crate::sync::AtomicU8::new(crate::flight::WAITING));
        let start_token = Arc::clone(&token);
        let load: LoadFuture<V> = Box::pin(async move {
            let permit = match &limiter {
                Some(l) if !holds_permit() => Some(l.acquire().await),
                _ => None,
            };
            if !crate::flight::start(&start_token) {
                // Taken over while this load waited for a permit: its taker publishes.
                return (Outcome::Nothing, 0);
            }
            let start = clock.as_ref().map_or(0, |c| c.now());
            let outcome = UnderPermit::new(init, permit.is_some()).await;
            let took = clock.as_ref().map_or(0, |c| c.now().saturating_sub(start));
            drop(permit);
            (outcome, took)
        });
        let mut init: Option<SharedLoad<V>> = Some((load, token));
        let mut bypass_negative = false;
        let mut record = true;
        loop {
            let can_lead = init.is_some();
            let how = How {
                can_lead,
                bypass_negative,
                record,
            };
            let had_future = init.is_some();
            let claim = self.claim(hash, &key, &hit, &mut init, how);
            record = false;
            let flight = match claim {
                Claim::Hit(r) => return r,
                // The shared future holds the lead; the flight's polling guard resolves it.
                Claim::Lead(lead) => lead.disarm(),
                // Inside another load that holds a permit: take over a leader that waits for
                // one, driving this caller's own load here.
                Claim::Join(f) if had_future && holds_permit() && f.steal() => {
                    let lead = Lead::new(self, hash, f);
                    let (fut, token) = init.take().expect("checked");
                    crate::flight::start(&token);
                    let (outcome, took) = fut.await;
                    let outcome = self.publish(lead, Some(key), outcome, took);
                    return accept(&outcome).expect("a leader accepts its own outcome");
                }
                Claim::Join(f) => f,
                Claim::Lost => lost_load(),
            };
            let wait = Wait {
                cache: self,
                hash,
                flight,
                id: None,
                accept: &accept,
            };
            match wait.await {
                Waited::Done(Some(r)) => return r,
                Waited::Done(None) => bypass_negative = true,
                Waited::Abandoned | Waited::TimedOut => {}
            }
        }
    }
}

#[cold]
fn lost_load() -> ! {
    panic!(
        "herdcache: the load this call started panicked while another caller was driving it, \
         and nobody is loading the key now"
    )
}

/// Waits for an async flight's end (helping to drive it), as [`Wait`].
pub(crate) fn wait_async<'a, K, V, S, A, R>(
    cache: &'a Cache<K, V, S>,
    hash: u64,
    flight: Arc<Flight<K, V>>,
    accept: &'a A,
) -> impl Future<Output = Waited<R>> + 'a
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
    A: Fn(&Outcome<V>) -> Option<R>,
{
    Wait {
        cache,
        hash,
        flight,
        id: None,
        accept,
    }
}

/// An async caller waiting on (and helping to drive) a flight.
struct Wait<'a, K, V, S, A>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    hash: u64,
    flight: Arc<Flight<K, V>>,
    /// Our waker's id in the flight, once registered (and interest counted).
    id: Option<u64>,
    accept: &'a A,
}

impl<K, V, S, A, R> Future for Wait<'_, K, V, S, A>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
    A: Fn(&Outcome<V>) -> Option<R>,
{
    type Output = Waited<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Waited<R>> {
        let this = &mut *self;
        loop {
            let mut st = this.flight.state.lock();
            match &st.phase {
                Phase::Done(o) => {
                    let o = Arc::clone(o);
                    leave(&mut this.id, &mut st);
                    drop(st);
                    // The value is cloned with no lock held.
                    return Poll::Ready(Waited::Done((this.accept)(&o)));
                }
                Phase::Abandoned => {
                    leave(&mut this.id, &mut st);
                    return Poll::Ready(Waited::Abandoned);
                }
                Phase::Running => {}
            }
            match this.id {
                None => {
                    let id = st.next_id;
                    st.next_id += 1;
                    st.interested += 1;
                    st.wakers.push((id, cx.waker().clone()));
                    this.id = Some(id);
                }
                Some(id) => {
                    if let Some((_, w)) = st.wakers.iter_mut().find(|(i, _)| *i == id) {
                        if !w.will_wake(cx.waker()) {
                            *w = cx.waker().clone();
                        }
                    } else {
                        st.wakers.push((id, cx.waker().clone()));
                    }
                }
            }
            if st.polling || st.future.is_none() {
                return Poll::Pending;
            }
            drop(st);
            let waker = Waker::from(Arc::new(FlightWaker(Arc::downgrade(&this.flight))));
            this.cache.poll_shared(this.hash, &this.flight, &waker);
            // Loop: the flight may be done now; if not, we are registered and return Pending.
            if this.flight.is_running() {
                return Poll::Pending;
            }
        }
    }
}

/// Stops a waiter's interest: unregisters its waker and returns whether it was the last one
/// interested in a running async load (which should then be cancelled).
fn leave<K, V>(id: &mut Option<u64>, st: &mut State<K, V>) -> bool {
    let Some(id) = id.take() else { return false };
    st.wakers.retain(|(i, _)| *i != id);
    st.interested -= 1;
    // Only an async flight's shared load is ours to cancel: a blocking leader runs its loader
    // to the end whoever waits (the loom model caught an async waiter abandoning it).
    st.interested == 0 && matches!(st.phase, Phase::Running) && !st.polling && st.future.is_some()
}

impl<K, V, S, A> Drop for Wait<'_, K, V, S, A>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.id.is_none() {
            return;
        }
        let (cancel, others) = {
            let mut st = self.flight.state.lock();
            let cancel = leave(&mut self.id, &mut st);
            // We may have consumed a wake-up meant to get the load polled: pass it on.
            let others: Vec<Waker> = st.wakers.iter().map(|(_, w)| w.clone()).collect();
            (cancel, others)
        };
        if cancel {
            self.cache.abandon(self.hash, &self.flight, false, None);
        } else {
            for w in others {
                w.wake();
            }
        }
    }
}
