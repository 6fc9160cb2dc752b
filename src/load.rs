//! Single-flight loading: one state machine for sync and async callers.
//!
//! A *flight* is one load of one key. It is registered in the key's shard, under the same write
//! lock that guards the shard's map, so "is it cached?" and "is it being loaded?" are answered
//! atomically: a caller that misses either *leads* (registers a new flight) or *joins* the
//! registered one.
//!
//! ```text
//!            claim (shard write lock)                      publish (shard write lock)
//!  miss ──► ┌──────────────┐  lead ──► run / drive the load ──► insert value + unregister ──►
//!           │ flight for k?│                                                 then Done, wake all
//!           └──────────────┘  join ──► wait (Condvar or Waker) ◄────────────────────────────┘
//!                  on panic / cancel of the last interested caller: unregister ──► Abandoned
//! ```
//!
//! * **Publish before release.** The value enters the map and the flight leaves the registry in
//!   one critical section; only then is the flight marked done and its waiters woken. A caller
//!   that arrives in between finds the value.
//! * **Every exit resolves the flight**, through a guard's `Drop`: a value, an error, `None`, a
//!   panic or a cancellation. Waiters of an abandoned flight retry: exactly one of them becomes
//!   the new leader (the claim is atomic) and runs *its own* loader.
//! * **Async loads are shared futures.** The leader's future is stored in the flight and polled
//!   by whichever interested caller gets there first, with a waker that wakes them all. So a
//!   leader that is dropped, or created and never polled again, does not strand the others:
//!   any waiter drives the load to completion. When the last interested caller goes away the
//!   future is dropped (the load is cancelled) and the flight abandoned. A blocking caller that
//!   joins an async load drives it on its own thread.
//! * **Errors and `None`** reach the callers that waited on that load (the same `Arc<E>` for
//!   all) and are not cached: the next call loads again. A waiter whose error type differs from
//!   the leader's retries instead.
//! * **Recursion.** A thread-local list holds the flights this thread is running; a call that
//!   would join one of them panics (it would wait for itself forever).
//! * **No user code under a shard lock**: loaders run and futures are polled with no lock held.

use crate::cache::Cache;
use crate::shard::Garbage;
use crate::stats::Counter;
use crate::sync::{wait_until, AtomicBool, Condvar, Mutex};
use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

/// What a load produced.
pub(crate) enum Outcome<V> {
    Value(V),
    Error(Arc<dyn Any + Send + Sync>),
    Nothing,
}

/// An async load: its outcome and how long it took (nanoseconds on the cache's clock).
type LoadFuture<V> = Pin<Box<dyn Future<Output = (Outcome<V>, u64)> + Send>>;

enum Phase<V> {
    Running,
    Done(Outcome<V>),
    Abandoned,
}

struct State<K, V> {
    phase: Phase<V>,
    /// The key, owned, for whoever publishes an async load's value (a sync leader keeps its
    /// own).
    key: Option<K>,
    /// The shared load of an async flight; `None` while being polled, and for sync flights.
    future: Option<LoadFuture<V>>,
    polling: bool,
    /// Callers waiting on (or driving) this flight; when it drops to zero an async load is
    /// cancelled.
    interested: usize,
    wakers: Vec<(u64, Waker)>,
    next_id: u64,
    /// Counts wake-ups of the shared future, so a blocking driver never misses one.
    epoch: u64,
}

/// One in-flight load of one key.
pub(crate) struct Flight<K, V> {
    state: Mutex<State<K, V>>,
    cond: Condvar,
    /// Set when the key is written or invalidated during the load: the result then goes to the
    /// callers waiting on it but is not cached (the later write wins).
    superseded: AtomicBool,
    /// Nonzero for a failed load kept registered as a negative-cache entry: its outcome is
    /// served to callers until this deadline. Read and written under the shard lock.
    negative_until: std::sync::atomic::AtomicU64,
}

impl<K, V> Flight<K, V> {
    /// Ends a flight that produced no value to publish (a compute that removed or kept the
    /// entry): callers waiting on it retry.
    pub(crate) fn release(&self) {
        self.resolve(Phase::Abandoned);
    }

    /// A blocking flight: its leader runs the loader itself.
    pub(crate) fn blocking() -> Arc<Self> {
        Self::new(None, None)
    }

    /// The negative-cache deadline of a failed load kept registered (0: not one).
    pub(crate) fn negative_until(&self) -> u64 {
        self.negative_until.load(Ordering::Acquire)
    }

    fn new(key: Option<K>, future: Option<LoadFuture<V>>) -> Arc<Self> {
        Arc::new(Flight {
            state: Mutex::new(State {
                phase: Phase::Running,
                key,
                future,
                polling: false,
                interested: 0,
                wakers: Vec::new(),
                next_id: 0,
                epoch: 0,
            }),
            cond: Condvar::new(),
            superseded: AtomicBool::new(false),
            negative_until: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Marks the flight superseded (a write or invalidation of its key happened meanwhile).
    pub(crate) fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    pub(crate) fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as *const () as usize
    }

    /// Resolves the flight and wakes everyone. Wakers run after the lock is released.
    fn resolve(&self, phase: Phase<V>) {
        let wakers = {
            let mut st = self.state.lock();
            st.phase = phase;
            std::mem::take(&mut st.wakers)
        };
        self.cond.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }
}

/// The waker given to a shared load future: wakes every caller interested in the flight.
struct FlightWaker<K, V>(Weak<Flight<K, V>>);

impl<K: Send + Sync + 'static, V: Send + Sync + 'static> Wake for FlightWaker<K, V> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let Some(f) = self.0.upgrade() else { return };
        let wakers: Vec<Waker> = {
            let mut st = f.state.lock();
            st.epoch += 1;
            st.wakers.iter().map(|(_, w)| w.clone()).collect()
        };
        f.cond.notify_all();
        for w in wakers {
            w.wake();
        }
    }
}

crate::sync::thread_local_shim! {
    /// Flights this thread is running (sync loader) or polling (async load), by address.
    static RUNNING: RefCell<Vec<usize>> = RefCell::new(Vec::new());
}

crate::sync::thread_local_shim! {
    /// A bound on the lifetime of the value the next `publish` on this thread stores, in
    /// nanoseconds from then (see [`cap_next_publish`]).
    static TTL_CAP: std::cell::Cell<Option<u64>> = std::cell::Cell::new(None);
}

/// Bounds the lifetime of the value that the next load finishing on this thread publishes:
/// a loader that got its value from a shared tier (where it expires in `nanos`) calls this
/// just before returning it, so the local copy does not outlive the shared one. Loads publish
/// on the thread that ran (or last polled) them, right after they return; a bound left over
/// by a load that was not published could only make another entry expire sooner.
#[allow(dead_code)] // only the `redis` feature bounds lifetimes
pub(crate) fn cap_next_publish(nanos: u64) {
    TTL_CAP.with(|c| c.set(Some(nanos)));
}

/// Registers a flight as run by this thread for the guard's lifetime.
pub(crate) struct Running(usize);

/// Marks `flight` as run by this thread until the guard drops (recursion detection).
pub(crate) fn enter<K, V>(flight: &Arc<Flight<K, V>>) -> Running {
    Running::enter(flight.id())
}

impl Running {
    fn enter(id: usize) -> Self {
        RUNNING.with(|r| r.borrow_mut().push(id));
        Running(id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.with(|r| {
            let mut r = r.borrow_mut();
            if let Some(i) = r.iter().rposition(|&x| x == self.0) {
                r.remove(i);
            }
        });
    }
}

pub(crate) fn runs_here(id: usize) -> bool {
    RUNNING.with(|r| r.borrow().contains(&id))
}

#[cold]
pub(crate) fn recursive_load() -> ! {
    panic!(
        "herdcache: recursive load: a loader asked the cache for the very key it is loading, \
         which would wait for itself forever"
    )
}

pub(crate) fn outcome_of<V, E: Send + Sync + 'static>(r: Result<V, E>) -> Outcome<V> {
    match r {
        Ok(v) => Outcome::Value(v),
        Err(e) => Outcome::Error(Arc::new(e)),
    }
}

pub(crate) fn accept_result<V: Clone, E: Send + Sync + 'static>(
    o: &Outcome<V>,
) -> Option<Result<V, Arc<E>>> {
    match o {
        Outcome::Value(v) => Some(Ok(v.clone())),
        Outcome::Error(e) => Arc::clone(e).downcast::<E>().ok().map(Err),
        Outcome::Nothing => None,
    }
}

fn accept_option<V: Clone>(o: &Outcome<V>) -> Option<Option<V>> {
    match o {
        Outcome::Value(v) => Some(Some(v.clone())),
        Outcome::Nothing => Some(None),
        Outcome::Error(_) => None,
    }
}

/// How a blocking wait on a flight ended.
pub(crate) enum Waited<R> {
    /// Done, with the outcome mapped for this caller (`None`: an outcome it cannot use).
    Done(Option<R>),
    Abandoned,
    TimedOut,
}

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
pub(crate) enum Claim<K, V, R> {
    Hit(R),
    Lead(Arc<Flight<K, V>>),
    Join(Arc<Flight<K, V>>),
    /// Not cached, not being loaded, and this caller cannot lead.
    Lost,
}

/// Resolves a flight on every exit of the code that runs or polls its load.
pub(crate) struct Resolver<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) cache: &'a Cache<K, V, S>,
    pub(crate) hash: u64,
    pub(crate) flight: Arc<Flight<K, V>>,
    pub(crate) armed: bool,
}

impl<K, V, S> Drop for Resolver<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.armed {
            // The loader panicked (or its future did): unregister, release the waiters.
            self.cache.abandon(self.hash, &self.flight, true);
        }
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
    ///   it (driving an async load on this thread if nobody else polls it) and, when its
    ///   outcome is not a value, loads again itself.
    /// * A write ([`insert`](Self::insert)) or invalidation of `key` during the load wins: the
    ///   load's value still goes to the callers waiting on it but is not cached.
    ///
    /// # Panics
    ///
    /// If `init` panics (the panic is resumed), or if `init` asks this cache for `key` itself
    /// on the same thread (a recursive load would wait for itself forever). Loading *other*
    /// keys inside `init` is fine.
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
        self.load_sync(
            key,
            || Outcome::Value(init()),
            V::clone,
            |o| match o {
                Outcome::Value(v) => Some(v.clone()),
                _ => None,
            },
        )
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
    /// # Concurrent calls on the same key
    ///
    /// As for [`get_with`](Self::get_with), and: the leader's `init` becomes a *shared* load
    /// that any waiting caller may poll. So when the leading future is dropped, or is never
    /// polled again, the waiters drive the load to completion themselves; the load is
    /// cancelled (the future dropped) only when every caller waiting on it is gone. The others'
    /// futures are dropped unpolled.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future unregisters it from the load (nothing is left behind); if
    /// it was the last caller interested in that load, the load is cancelled and the key is
    /// not cached. Other callers are unaffected.
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
    /// let v = futures::executor::block_on(cache.get_with_async(1, async { "one".to_string() }));
    /// assert_eq!(v, "one");
    /// ```
    pub async fn get_with_async(
        &self,
        key: K,
        init: impl Future<Output = V> + Send + 'static,
    ) -> V {
        self.load_async_core(
            key,
            async { Outcome::Value(init.await) },
            V::clone,
            |o| match o {
                Outcome::Value(v) => Some(v.clone()),
                _ => None,
            },
        )
        .await
    }

    /// The async twin of [`try_get_with`](Self::try_get_with).
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

    /// The async twin of [`optionally_get_with`](Self::optionally_get_with).
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
        future: &mut Option<LoadFuture<V>>,
        how: How,
    ) -> Claim<K, V, R> {
        let How {
            can_lead,
            bypass_negative,
            record,
        } = how;
        if let Some(r) = self.get_map(key, hash, record, hit) {
            return Claim::Hit(r);
        }
        let now = self.now();
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        if let Some(v) = s.peek(hash, key, now) {
            return Claim::Hit(hit(v));
        }
        let mut stale_negative = None;
        if let Some(f) = s.flight(hash, key) {
            let until = f.negative_until();
            let live = until > now && !bypass_negative && !f.superseded.load(Ordering::Acquire);
            if until == 0 || live {
                let f = Arc::clone(f);
                drop(s);
                if runs_here(f.id()) {
                    recursive_load();
                }
                self.count(if live {
                    Counter::NegativeHit
                } else {
                    Counter::Coalesced
                });
                return Claim::Join(f);
            }
            // An expired negative entry (or one this caller cannot use): replace it.
            let f = Arc::clone(f);
            stale_negative = s.remove_flight(hash, &f);
        }
        if !can_lead {
            return Claim::Lost;
        }
        let owned = future.is_some().then(|| key.clone());
        let f = Flight::new(owned, future.take());
        s.add_flight(hash, key.clone(), Arc::clone(&f), &self.inner.hasher, now);
        drop(s);
        drop(stale_negative);
        Claim::Lead(f)
    }

    /// Registers a refresh of `key` as its flight, unless a load of it runs already.
    pub(crate) fn claim_refresh(&self, hash: u64, key: &K) -> Option<Arc<Flight<K, V>>> {
        let now = self.now();
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        if let Some(f) = s.flight(hash, key) {
            if f.negative_until() == 0 {
                return None;
            }
            let f = Arc::clone(f);
            let old = s.remove_flight(hash, &f);
            drop(s);
            drop(old);
            s = self.inner.shards[self.shard_index(hash)].lock.write();
            if s.flight(hash, key).is_some() {
                return None;
            }
        }
        let f = Flight::blocking();
        s.add_flight(hash, key.clone(), Arc::clone(&f), &self.inner.hasher, now);
        Some(f)
    }

    /// Ends a refresh that did not produce a value: unregisters it and sets the entry's next
    /// refresh deadline in one critical section, then resolves the flight (with `outcome`, or
    /// as abandoned so that any caller waiting on it loads again).
    pub(crate) fn abandon_refresh(
        &self,
        hash: u64,
        key: &K,
        flight: &Arc<Flight<K, V>>,
        retry_at: u64,
        outcome: Option<Outcome<V>>,
    ) {
        let old = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            s.set_refresh_at(hash, key, retry_at);
            s.remove_flight(hash, flight)
        };
        drop(old);
        flight.resolve(outcome.map_or(Phase::Abandoned, Phase::Done));
    }

    /// Publishes a finished load: caches a value (unless superseded) and unregisters the flight
    /// in one critical section, then marks it done and wakes the waiters. A failure (error or
    /// `None`) is kept registered as a negative-cache entry when a negative TTL is set.
    /// `took` is the load's duration, kept for early refresh.
    pub(crate) fn publish(
        &self,
        hash: u64,
        key: Option<K>,
        flight: &Arc<Flight<K, V>>,
        outcome: Outcome<V>,
        took: u64,
    ) {
        let mut out = Garbage::new();
        let cap = TTL_CAP
            .with(std::cell::Cell::take)
            .map_or(crate::clock::NEVER, |n| {
                crate::clock::deadline(self.now(), n)
            });
        let key = key.or_else(|| flight.state.lock().key.take());
        let success = matches!(outcome, Outcome::Value(_));
        self.count(if success {
            Counter::LoadSuccess
        } else {
            Counter::LoadFailure
        });
        self.count_n(Counter::LoadNanos, took);
        // A planted bug for the loom model to catch: waiters released before the value is
        // published.
        #[cfg(herdcache_broken_model)]
        if let Outcome::Value(v) = &outcome {
            flight.resolve(Phase::Done(Outcome::Value(v.clone())));
        }
        match (&outcome, key) {
            (Outcome::Value(v), Some(key)) if !flight.superseded.load(Ordering::Acquire) => {
                let weight = self.weigh(&key, v);
                let value = v.clone();
                let load = (took, cap);
                self.insert_with(hash, key, value, weight, Some(flight), load, &mut out);
            }
            (Outcome::Error(_) | Outcome::Nothing, _)
                if !flight.superseded.load(Ordering::Acquire)
                    && self.inner.stampede.negative_ttl.is_some() =>
            {
                // Kept registered: `claim` serves the outcome until the deadline. Set under the
                // shard lock, where `claim` reads it.
                let ttl = self.inner.stampede.negative_ttl.unwrap_or(0);
                let until = crate::clock::deadline(self.now(), ttl).max(1);
                let _s = self.inner.shards[self.shard_index(hash)].lock.write();
                flight.negative_until.store(until, Ordering::Release);
            }
            _ => self.unregister(hash, flight),
        }
        flight.resolve(Phase::Done(outcome));
        // Removed entries are reported (eviction listener) only after the waiters are
        // released: a panicking listener must not strand them.
        self.finish(out);
    }

    /// Unregisters a flight whose load panicked (`always`) or whose callers all went away;
    /// its waiters retry. For a cancellation (`!always`) the check that nobody is interested and
    /// the unregistration happen under the shard lock and the flight's lock together, so a
    /// caller that joined meanwhile (and may be driving the load) keeps the flight alive.
    pub(crate) fn abandon(&self, hash: u64, flight: &Arc<Flight<K, V>>, always: bool) {
        let (future, key, wakers) = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            let mut st = flight.state.lock();
            let wanted = st.interested > 0 || st.polling || !matches!(st.phase, Phase::Running);
            if !always && wanted {
                return;
            }
            let key = s.remove_flight(hash, flight);
            st.phase = Phase::Abandoned;
            (st.future.take(), key, std::mem::take(&mut st.wakers))
        };
        flight.cond.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
        drop((future, key)); // outside the locks
    }

    fn unregister(&self, hash: u64, flight: &Arc<Flight<K, V>>) {
        let key = self.inner.shards[self.shard_index(hash)]
            .lock
            .write()
            .remove_flight(hash, flight);
        drop(key); // outside the lock
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
                Claim::Lead(flight) => {
                    let init = init.take().expect("a caller leads at most once");
                    let (outcome, took, flight) = self.run_leader(hash, flight, init);
                    let r = accept(&outcome).expect("a leader accepts its own outcome");
                    self.publish(hash, Some(key), &flight, outcome, took);
                    return Some(r);
                }
                Claim::Join(flight) => match self.wait_blocking(hash, &flight, accept, until) {
                    Waited::Done(Some(r)) => return Some(r),
                    // An outcome this caller cannot use (an error of another type, a negative
                    // entry for a caller without an error channel): load for itself.
                    Waited::Done(None) => bypass_negative = true,
                    Waited::Abandoned => {}
                    Waited::TimedOut => return None,
                },
            }
        }
    }

    /// Runs a blocking leader's loader: under a load permit (if limited), registered as run by
    /// this thread (recursion), with the flight abandoned if it panics. Returns the outcome,
    /// the load's duration and the flight, to publish.
    pub(crate) fn run_leader(
        &self,
        hash: u64,
        flight: Arc<Flight<K, V>>,
        init: impl FnOnce() -> Outcome<V>,
    ) -> (Outcome<V>, u64, Arc<Flight<K, V>>) {
        let mut resolver = Resolver {
            cache: self,
            hash,
            flight,
            armed: true,
        };
        let permit = self
            .inner
            .stampede
            .limiter
            .as_ref()
            .map(|l| l.acquire_blocking());
        let running = Running::enter(resolver.flight.id());
        let start = self.now();
        let outcome = init();
        let took = self.now().saturating_sub(start);
        drop(running);
        drop(permit);
        resolver.armed = false;
        (outcome, took, Arc::clone(&resolver.flight))
    }

    /// Waits for a flight on this thread, driving its future if it has one that nobody polls,
    /// until it ends or `until` passes.
    pub(crate) fn wait_blocking<R>(
        &self,
        hash: u64,
        flight: &Arc<Flight<K, V>>,
        accept: &impl Fn(&Outcome<V>) -> Option<R>,
        until: Option<Instant>,
    ) -> Waited<R> {
        let mut st = flight.state.lock();
        st.interested += 1;
        let waker = Waker::from(Arc::new(FlightWaker(Arc::downgrade(flight))));
        // The wake-up epoch at our last poll: poll again only after a wake-up.
        let mut polled_at = None;
        loop {
            match &st.phase {
                Phase::Done(o) => {
                    let r = accept(o);
                    st.interested -= 1;
                    return Waited::Done(r);
                }
                Phase::Abandoned => {
                    st.interested -= 1;
                    return Waited::Abandoned;
                }
                Phase::Running => {}
            }
            if st.polling || st.future.is_none() || polled_at == Some(st.epoch) {
                let timed_out;
                (st, timed_out) = wait_until(&flight.cond, st, until);
                if timed_out && matches!(st.phase, Phase::Running) {
                    st.interested -= 1;
                    let cancel = st.interested == 0 && !st.polling && st.future.is_some();
                    drop(st);
                    if cancel {
                        self.abandon(hash, flight, false);
                    }
                    return Waited::TimedOut;
                }
                continue;
            }
            polled_at = Some(st.epoch);
            drop(st);
            self.poll_shared(hash, flight, &waker);
            st = flight.state.lock();
        }
    }

    /// Polls an async flight's shared future once; publishes its outcome when it completes.
    /// The caller must hold interest in the flight. A wake-up during the poll reaches every
    /// interested caller (their wakers, or the epoch a blocking driver watches), so one of them
    /// polls again; nobody loops here.
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
        let running = Running::enter(flight.id());
        let mut resolver = Resolver {
            cache: self,
            hash,
            flight: Arc::clone(flight),
            armed: true,
        };
        let polled = fut.as_mut().poll(&mut Context::from_waker(waker));
        resolver.armed = false;
        drop(running);
        match polled {
            Poll::Ready((outcome, took)) => {
                drop(fut);
                flight.state.lock().polling = false;
                self.publish(hash, None, flight, outcome, took);
            }
            Poll::Pending => {
                let mut st = flight.state.lock();
                st.polling = false;
                st.future = Some(fut);
            }
        }
    }

    /// Runs an async load: the single-flight core for `get_with_async` and its siblings.
    async fn load_async_core<R>(
        &self,
        key: K,
        init: impl Future<Output = Outcome<V>> + Send + 'static,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R {
        let hash = self.hash(&key);
        let limiter = self.inner.stampede.limiter.clone();
        let clock = self.time_source();
        // The shared load: takes a load permit (if limited) and measures itself.
        let mut init: Option<LoadFuture<V>> = Some(Box::pin(async move {
            let permit = match &limiter {
                Some(l) => Some(l.acquire().await),
                None => None,
            };
            let start = clock.as_ref().map_or(0, |c| c.now());
            let outcome = init.await;
            let took = clock.as_ref().map_or(0, |c| c.now().saturating_sub(start));
            drop(permit);
            (outcome, took)
        }));
        let mut bypass_negative = false;
        let mut record = true;
        loop {
            let can_lead = init.is_some();
            let how = How {
                can_lead,
                bypass_negative,
                record,
            };
            let claim = self.claim(hash, &key, &hit, &mut init, how);
            record = false;
            let flight = match claim {
                Claim::Hit(r) => return r,
                Claim::Lead(f) | Claim::Join(f) => f,
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

/// A caller waiting on (and helping to drive) an async flight.
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
                    let r = (this.accept)(o);
                    leave(&mut this.id, &mut st);
                    return Poll::Ready(Waited::Done(r));
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
            let st = this.flight.state.lock();
            if matches!(st.phase, Phase::Running) {
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
            self.cache.abandon(self.hash, &self.flight, false);
        } else {
            self.flight.cond.notify_all();
            for w in others {
                w.wake();
            }
        }
    }
}
