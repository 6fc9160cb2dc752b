//! Stampede protection beyond one key: a loader that knows how to load any key, refresh-ahead
//! with a hard time to live, stale-if-error with backoff, probabilistic early refresh (XFetch),
//! and soft timeouts. Negative caching and the global load limit live in the single-flight core
//! ([`crate::load`]) and [`crate::limit`], since every load goes through them.
//!
//! # Refresh-ahead
//!
//! With `refresh_after(d)`, an entry older than `d` is *due*. The first read that sees it due
//! wins a compare-and-swap on the entry's refresh deadline (so exactly one reader per period
//! starts a refresh), returns the current value at once, and starts a reload of the key through
//! the single-flight core (joined with any load of the key already running). Every other reader
//! keeps getting the current value. On success the value is replaced; on failure (or a panic of
//! the loader) the old value keeps being served and the next refresh waits `refresh_backoff`;
//! it is never served past its hard deadline (`time_to_live`), however long a refresh hangs.
//!
//! Where the reload runs: on the builder's *spawner* if there is one (a thread pool, or e.g. a
//! tokio runtime handle captured at build time and its `spawn_blocking`), so no caller waits;
//! otherwise the reader that triggered it runs it before returning (it alone waits). A refresh that finds the load limit full waits
//! for a permit on the spawner, or, inline, is deferred to a later read: never lost.

use crate::builder::Spawner;
use crate::cache::Cache;
use crate::clock::NEVER;
use crate::flight::{holds_permit, outcome_of, Flight, Outcome, Phase, Waited};
use crate::limit::Limiter;
use crate::load::{Claim, How, Lead, UnderPermit};
use crate::shard::FlightClaim;
use crate::stats::Counter;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::Duration;

/// The error type of a loader set with [`CacheBuilder::loader`](crate::CacheBuilder::loader).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(crate) type LoaderFn<K, V> = Arc<dyn Fn(&K) -> Result<V, BoxError> + Send + Sync>;

/// A boxed, sendable future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

pub(crate) type AsyncLoaderFn<K, V> =
    Arc<dyn Fn(&K) -> BoxFuture<Result<V, BoxError>> + Send + Sync>;

/// Runs a future somewhere else (e.g. `tokio::spawn`).
pub(crate) type FutureSpawner = Arc<dyn Fn(BoxFuture<()>) + Send + Sync>;

/// Why [`Cache::load`] (or [`Cache::load_async`], [`Cache::load_with_timeout`]) returned no
/// value. For [`LoadError::Loader`], [`source`](std::error::Error::source) is the loader's error.
///
/// # Example
///
/// ```
/// use herdcache::{BoxError, Cache, LoadError};
/// use std::error::Error as _;
///
/// let cache: Cache<u32, String> = Cache::builder()
///     .max_capacity(10)
///     .loader(|_k: &u32| Err::<String, _>(BoxError::from("backend down")))
///     .build();
/// match cache.load(1) {
///     Err(e @ LoadError::Loader(_)) => {
///         assert_eq!(e.to_string(), "loader failed: backend down");
///         assert_eq!(e.source().unwrap().to_string(), "backend down");
///     }
///     other => panic!("unexpected {other:?}"),
/// }
///
/// let no_loader: Cache<u32, String> = Cache::new(10);
/// assert!(matches!(no_loader.load(1), Err(LoadError::NoLoader)));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// The loader failed. Every caller that waited on that load gets the same `Arc`; with a
    /// negative TTL, so does every caller until it passes.
    Loader(Arc<BoxError>),
    /// The wait exceeded the soft timeout and no stale value was at hand; the load goes on and
    /// fills the cache for the next caller.
    Timeout,
    /// The cache has no loader (see [`CacheBuilder::loader`](crate::CacheBuilder::loader)).
    NoLoader,
    /// The loader panicked. Every caller that waited on that load gets this error (none of
    /// them runs the loader again); callers of the key in the next `refresh_backoff` get it
    /// too (on a cache that keeps time), so a loader that panics cannot cause a storm.
    Panicked,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Loader(e) => write!(f, "loader failed: {e}"),
            LoadError::Timeout => f.write_str("timed out waiting for the load"),
            LoadError::NoLoader => f.write_str("no loader configured"),
            LoadError::Panicked => f.write_str("the loader panicked"),
        }
    }
}

/// [`source`](std::error::Error::source) is the loader's error for [`LoadError::Loader`] (its
/// text is also part of this error's `Display`), `None` otherwise.
impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Loader(e) => Some(&***e),
            LoadError::Timeout | LoadError::NoLoader | LoadError::Panicked => None,
        }
    }
}

/// Starts a refresh of a key (see [`Cache::start_refresh`]).
/// Called with the key (cloned by the reader that won the right to refresh it) and its hash.
pub(crate) type RefreshFn<K, V, S> = fn(&Cache<K, V, S>, K, u64);

/// The stampede-protection settings of a cache, fixed at build time.
pub(crate) struct Stampede<K, V, S> {
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
    /// Fail-safe's `max_stale` (nanoseconds), if set (see [`crate::fail_safe`]).
    pub(crate) fail_safe: Option<u64>,
    /// The figures [`Cache::health`] reads (see [`crate::health`]).
    pub(crate) monitor: crate::health::Monitor,
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// Set where `K: Clone` is known: clones a key found due for refresh (under the read
    /// lock), and starts its refresh (after the lock is released).
    pub(crate) clone_key: Option<fn(&K) -> K>,
    pub(crate) refresh: Option<RefreshFn<K, V, S>>,
}

impl<K, V, S> Default for Stampede<K, V, S> {
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
            monitor: crate::health::Monitor::default(),
            limiter: None,
            clone_key: None,
            refresh: None,
        }
    }
}

/// XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): refresh early when
/// `now − δ·β·ln(u) ≥ expiry`, with `δ` the key's last load time and `u` uniform in (0, 1].
/// The probability of refreshing at time `now` is `exp(−(expiry − now) / (δ·β))`: negligible
/// far from expiry, rising to 1 as it nears, and earlier for keys that are slow to load.
#[inline]
pub(crate) fn xfetch(now: u64, expiry: u64, delta: u64, beta: f64, u: f64) -> bool {
    if expiry == NEVER || delta == 0 {
        return false;
    }
    let gap = expiry.saturating_sub(now) as f64;
    gap <= delta as f64 * beta * -u.max(f64::MIN_POSITIVE).ln()
}

thread_local! {
    static COIN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A uniform random number in (0, 1] from a thread-local xorshift (for early refresh).
pub(crate) fn coin() -> f64 {
    COIN.with(|c| {
        let mut x = c.get();
        if x == 0 {
            // Seed from the cell's address and the time: distinct per thread.
            x = (c as *const _ as u64) ^ crate::clock::seed() | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        ((x >> 11) + 1) as f64 / (1u64 << 53) as f64
    })
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Returns the value for `key`, loading it with the builder's
    /// [`loader`](crate::CacheBuilder::loader) on a miss: single-flight, with negative
    /// caching, the load limit and the soft timeout applied as configured. A hit on an entry due
    /// for refresh returns at once (see the module docs on refresh-ahead).
    ///
    /// Blocks while a load of `key` runs (up to the builder's `load_timeout`, if set).
    ///
    /// # Errors
    ///
    /// [`LoadError::Loader`] with the loader's error (shared by every caller of that load, and
    /// remembered for `negative_ttl` if set); [`LoadError::Panicked`] when the loader panicked
    /// (for every caller of that load, and for the refresh backoff after it: a panicking loader
    /// is called once per backoff, not once per caller); [`LoadError::Timeout`] when the wait
    /// exceeded the timeout and there is no value to fall back on; [`LoadError::NoLoader`].
    ///
    /// # Example
    ///
    /// ```
    /// use herdcache::Cache;
    /// let cache: Cache<u32, String> = Cache::builder()
    ///     .max_capacity(100)
    ///     .loader(|k: &u32| Ok::<_, herdcache::BoxError>(format!("value {k}")))
    ///     .build();
    /// assert_eq!(cache.load(7).unwrap(), "value 7");
    /// ```
    pub fn load(&self, key: K) -> Result<V, LoadError> {
        self.load_with_timeout(key, self.inner.stampede.load_timeout)
    }

    /// The async twin of [`load`](Self::load), with the builder's
    /// [`async_loader`](crate::CacheBuilder::async_loader): single-flight with every other load
    /// of the key (blocking or async), negative caching and the load limit as configured.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load) ([`LoadError::NoLoader`] without an async loader).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<u32, u32> = herdcache::Cache::builder()
    ///     .max_capacity(10)
    ///     .async_loader(|k: &u32| {
    ///         let k = *k;
    ///         async move { Ok::<_, herdcache::BoxError>(k * 2) }
    ///     })
    ///     .build();
    /// assert_eq!(futures::executor::block_on(cache.load_async(4)).unwrap(), 8);
    /// ```
    pub async fn load_async(&self, key: K) -> Result<V, LoadError> {
        let Some(loader) = self.inner.stampede.async_loader.clone() else {
            return Err(LoadError::NoLoader);
        };
        // The loader is called when the load is first polled: only the leader's ever is. Its
        // panic ends the load for every caller as `LoadError::Panicked`.
        let k = key.clone();
        let fut = async move {
            match CatchPanic(Box::pin(async move { loader(&k).await })).await {
                Some(r) => outcome_of(r),
                None => Outcome::Panicked,
            }
        };
        self.load_async_core(key, fut, |v| Ok(v.clone()), accept_load)
            .await
    }

    /// [`load`](Self::load) with its own soft timeout (`None`: wait as long as it takes).
    ///
    /// The timeout bounds the wait for a load run by another caller, or by the spawner; a
    /// caller that runs the loader itself (no spawner configured) is not interrupted. When the
    /// timeout passes, the call returns the value already cached for `key` if there is one
    /// (a value due for refresh), else [`LoadError::Timeout`]; the load goes on and fills the
    /// cache for the next caller.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_with_timeout(&self, key: K, timeout: Option<Duration>) -> Result<V, LoadError> {
        let Some(loader) = self.inner.stampede.loader.clone() else {
            return Err(LoadError::NoLoader);
        };
        let until = timeout.map(|t| std::time::Instant::now() + t);
        let hash = self.hash(&key);
        let result = if until.is_none() || self.inner.stampede.spawner.is_none() {
            self.load_inline(key.clone(), hash, &loader, until, true)
        } else {
            self.load_spawned(key.clone(), hash, &loader, until)
        };
        match result {
            Some(r) => r,
            // Timed out: a value at hand beats an error.
            None => {
                self.count(Counter::Timeout);
                self.get_map(&key, hash, false, V::clone)
                    .or_else(|| self.fail_safe_fallback(hash, &key))
                    .ok_or(LoadError::Timeout)
            }
        }
    }

    /// A load with the builder's loader run by this caller if it leads. A panic of the loader
    /// ends the load as [`LoadError::Panicked`] for every caller of it. `None`: `until` passed.
    fn load_inline(
        &self,
        key: K,
        hash: u64,
        loader: &LoaderFn<K, V>,
        until: Option<std::time::Instant>,
        record: bool,
    ) -> Option<Result<V, LoadError>> {
        let k = key.clone();
        let loader = Arc::clone(loader);
        let init = move || catch_panic(|| outcome_of(loader(&k)));
        let hit = |v: &V| Ok(v.clone());
        self.load_blocking(key, hash, init, &hit, &accept_load, until, record)
    }

    /// A load whose leader hands the loader to the spawner and waits for it like any other
    /// caller, so that every caller's wait can be bounded. If the spawner panics or drops the
    /// job without running it, the leader loads inline instead (once; no spawn loop). `None`:
    /// `until` passed.
    fn load_spawned(
        &self,
        key: K,
        hash: u64,
        loader: &LoaderFn<K, V>,
        until: Option<std::time::Instant>,
    ) -> Option<Result<V, LoadError>> {
        let hit = |v: &V| Ok(v.clone());
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
            let (flight, led) = match claim {
                Claim::Hit(r) => return Some(r),
                Claim::Lost => unreachable!("a blocking caller can always lead"),
                // Inside another load that holds a permit: take over a leader that waits for
                // one, here (waiting for it could keep the permit from it forever).
                Claim::Join(f) if holds_permit() && f.steal() => {
                    let lead = Lead::new(self, hash, f);
                    let k = key.clone();
                    let init = || catch_panic(|| outcome_of(loader(&k)));
                    let Ok((outcome, took)) = self.run_loader(lead.flight(), init, false) else {
                        unreachable!("a load taken over is not started again")
                    };
                    let outcome = self.publish(lead, Some(key), outcome, took);
                    return accept_load(&outcome);
                }
                Claim::Join(f) => (f, false),
                Claim::Lead(lead) => {
                    let flight = Arc::clone(lead.flight());
                    let (k, job_loader) = (key.clone(), Arc::clone(loader));
                    // The job owns the lead: dropped unrun, it abandons the flight.
                    let job = move || {
                        let cache = lead.cache().clone();
                        let init = || catch_panic(|| outcome_of(job_loader(&k)));
                        match cache.run_loader(lead.flight(), init, true) {
                            Ok((outcome, took)) => {
                                cache.publish(lead, Some(k), outcome, took);
                            }
                            // Taken over while the job waited for a permit: the taker publishes.
                            Err(_) => drop(lead.disarm()),
                        }
                    };
                    let spawn = self
                        .inner
                        .stampede
                        .spawner
                        .as_ref()
                        .expect("checked by the caller");
                    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        spawn(Box::new(job))
                    }));
                    if spawned.is_err() {
                        // The job went down with the spawner (the flight is abandoned).
                        return self.load_inline(key, hash, loader, until, false);
                    }
                    (flight, true)
                }
            };
            match self.wait_blocking(&flight, &accept_load, until) {
                Waited::Done(Some(r)) => return Some(r),
                Waited::Done(None) => bypass_negative = true,
                // Our own job was dropped unrun (or could not publish): load here instead.
                Waited::Abandoned if led => {
                    return self.load_inline(key, hash, loader, until, false);
                }
                Waited::Abandoned => {}
                Waited::TimedOut => return None,
            }
        }
    }

    /// Starts a refresh of `key` (its entry was found due by a reader that won the right to,
    /// marking it as refreshing). Every path hands that right to a refresh flight or gives it
    /// back: the key is never left marked as refreshing with no refresh running. A spawner
    /// that panics does not fail the reader: the refresh is retried after the backoff.
    pub(crate) fn start_refresh(&self, key: K, hash: u64) {
        // Until a refresh flight holds the claim (or `claim_refresh` gave it back), a panic of
        // user code (the key's `Clone`) gives it back here.
        let give_back = GiveBack(self, hash, &key);
        let st = &self.inner.stampede;
        let async_loader = st
            .async_refresh_loader
            .as_ref()
            .or(st.async_loader.as_ref());
        if let (Some(loader), Some(spawn)) = (async_loader, &st.future_spawner) {
            let claimed = self.claim_refresh(hash, &key);
            std::mem::forget(give_back);
            return self.start_async_refresh(claimed, key, Arc::clone(loader), Arc::clone(spawn));
        }
        let Some(loader) = st.refresh_loader.as_ref().or(st.loader.as_ref()).cloned() else {
            return; // nothing to refresh with: `give_back` makes the entry due again later
        };
        let claimed = self.claim_refresh(hash, &key);
        std::mem::forget(give_back);
        let Some(lead) = claimed else {
            return; // a load of the key runs already; its value will do
        };
        self.count(Counter::RefreshStarted);
        match &self.inner.stampede.spawner {
            Some(spawn) => {
                // The job owns the lead: dropped unrun (or with a panicking spawner), the
                // refresh is abandoned and retried after the backoff.
                let job = move || {
                    let cache = lead.cache().clone();
                    cache.run_refresh(lead, key, &loader, true)
                };
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spawn(Box::new(job))));
            }
            // Inline: the reader that triggered the refresh runs it; it takes a permit only if
            // one is free, and otherwise defers the refresh to a later read.
            None => self.run_refresh(lead, key, &loader, false),
        }
    }

    /// A refresh with the async loader, as a future handed to the future spawner. The future
    /// waits for a load permit if the limit is full; if it is dropped before it finishes (a
    /// runtime shutting down, a spawner that panics) or its loader panics, the refresh is
    /// abandoned and retried after the backoff.
    fn start_async_refresh(
        &self,
        claimed: Option<Lead<K, V, S>>,
        key: K,
        loader: AsyncLoaderFn<K, V>,
        spawn: FutureSpawner,
    ) {
        let Some(lead) = claimed else {
            return;
        };
        self.count(Counter::RefreshStarted);
        let fut = async move {
            let cache = lead.cache().clone();
            let limiter = cache.inner.stampede.limiter.clone();
            let permit = match &limiter {
                Some(l) if !holds_permit() => Some(l.acquire().await),
                _ => None,
            };
            if !lead.flight().start() {
                drop(lead.disarm()); // taken over meanwhile: the taker publishes
                return;
            }
            let start = cache.now();
            let result = UnderPermit::new(loader(&key), permit.is_some()).await;
            let took = cache.now().saturating_sub(start);
            drop(permit);
            match result {
                Ok(v) => {
                    cache.count(Counter::RefreshSucceeded);
                    cache.publish(lead, Some(key), Outcome::Value(v), took);
                }
                Err(e) => {
                    let error: Arc<dyn std::any::Any + Send + Sync> = Arc::new(e);
                    cache.fail_refresh(lead, &key, took, Outcome::Error(error));
                }
            }
        };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spawn(Box::pin(fut))));
    }

    fn run_refresh(&self, lead: Lead<K, V, S>, key: K, loader: &LoaderFn<K, V>, may_wait: bool) {
        let permit = match &self.inner.stampede.limiter {
            Some(_) if may_wait || holds_permit() => self.load_permit(),
            Some(l) => match l.try_acquire() {
                Some(p) => crate::load::LoadPermit::held(p),
                None => {
                    // Deferred, not lost: the next read finds the entry due again.
                    self.count(Counter::RefreshFailed);
                    let hash = lead.hash();
                    let flight = lead.disarm();
                    self.end_flight(hash, &flight, Some(self.now()), Phase::Abandoned);
                    return;
                }
            },
            None => crate::load::LoadPermit::none(),
        };
        if !lead.flight().start() {
            drop(lead.disarm()); // taken over meanwhile: the taker publishes
            return;
        }
        let running = crate::flight::enter(lead.flight());
        let start = self.now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader(&key)));
        let took = self.now().saturating_sub(start);
        drop(running);
        drop(permit);
        match result {
            Ok(Ok(v)) => {
                self.count(Counter::RefreshSucceeded);
                self.publish(lead, Some(key), Outcome::Value(v), took);
            }
            // A failed (or panicking) refresh keeps the old value, and backs off. Callers that
            // joined it (the entry expired meanwhile) get the error.
            Ok(Err(e)) => {
                let error: Arc<dyn std::any::Any + Send + Sync> = Arc::new(e);
                self.fail_refresh(lead, &key, took, Outcome::Error(error));
            }
            Err(_) => self.fail_refresh(lead, &key, took, Outcome::Panicked),
        }
    }

    /// Ends a refresh that failed: the old value stays, the next refresh waits for the
    /// backoff, and callers that joined the refresh (the entry expired meanwhile) get `outcome`
    /// — or, with fail-safe, the old value (see [`crate::fail_safe`]).
    fn fail_refresh(&self, lead: Lead<K, V, S>, key: &K, took: u64, outcome: Outcome<V>) {
        self.count(Counter::RefreshFailed);
        self.count(Counter::LoadFailure);
        self.count_n(Counter::LoadNanos, took);
        self.inner.stampede.monitor.load(took, true);
        let retry = crate::clock::deadline(self.now(), self.inner.stampede.refresh_backoff);
        let hash = lead.hash();
        // Taken (and the retry deadline set) while the flight is still registered.
        let outcome = match self.fail_safe_fallback(hash, key) {
            Some(v) => Outcome::Value(v),
            None => outcome,
        };
        let flight = lead.disarm();
        self.end_flight(hash, &flight, Some(retry), Phase::Done(Arc::new(outcome)));
    }

    /// Registers a refresh of `key` as its flight, unless a load of it runs already — then the
    /// reader's claim is given back (due again after the backoff, unless that load stores a new
    /// value first).
    fn claim_refresh(&self, hash: u64, key: &K) -> Option<Lead<K, V, S>> {
        let registered = key.clone(); // user code, before the lock
        let now = self.now();
        let f = Flight::blocking();
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        let hasher = &self.inner.hasher;
        match s.claim_flight(hash, registered, Arc::clone(&f), now, false, hasher) {
            FlightClaim::Running(_, unused) => {
                let retry = crate::clock::deadline(now, self.inner.stampede.refresh_backoff);
                s.reset_refresh(hash, key, retry);
                drop(s);
                drop(unused);
                None
            }
            FlightClaim::Registered(stale) => {
                drop(s);
                drop(stale);
                Some(Lead::refresh(self, hash, f))
            }
        }
    }
}

/// Gives a read's claim to refresh a key back when dropped (the entry is due again after the
/// refresh backoff); forgotten once the claim was handed over.
struct GiveBack<'a, K, V, S>(&'a Cache<K, V, S>, u64, &'a K)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static;

impl<K, V, S> Drop for GiveBack<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        let retry = crate::clock::deadline(self.0.now(), self.0.inner.stampede.refresh_backoff);
        self.0.reset_refresh(self.1, self.2, retry);
    }
}

/// Polls a future, turning its panic into `None`.
struct CatchPanic<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchPanic<F> {
    type Output = Option<F::Output>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<F::Output>> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Some(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

/// Runs a shared loader, turning its panic into an outcome that every caller of the load
/// receives (as [`LoadError::Panicked`]) instead of one caller after another running it again.
fn catch_panic<V>(load: impl FnOnce() -> Outcome<V>) -> Outcome<V> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or(Outcome::Panicked)
}

/// A caller of [`Cache::load`]: a value, the loader's error, or its panic.
fn accept_load<V: Clone>(o: &Outcome<V>) -> Option<Result<V, LoadError>> {
    match o {
        Outcome::Value(v) => Some(Ok(v.clone())),
        Outcome::Error(e) => Arc::clone(e)
            .downcast::<BoxError>()
            .ok()
            .map(|e| Err(LoadError::Loader(e))),
        Outcome::Panicked => Some(Err(LoadError::Panicked)),
        Outcome::Nothing => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfetch_frequency_matches_its_formula() {
        // P(refresh) = exp(−gap / (δ·β)), checked with a seeded source of uniform numbers.
        let mut x = 0x1234_5678_9ABC_DEF1u64;
        for (gap, delta, beta) in [
            (1e9, 1e9, 1.0),
            (2e9, 1e9, 1.0),
            (5e8, 1e9, 2.0),
            (3e9, 1e9, 0.5),
        ] {
            let n = 200_000;
            let mut refreshed = 0;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = ((x >> 11) + 1) as f64 / (1u64 << 53) as f64;
                refreshed += usize::from(xfetch(0, gap as u64, delta as u64, beta, u));
            }
            let seen = refreshed as f64 / n as f64;
            let expected = (-gap / (delta * beta)).exp();
            assert!(
                (seen - expected).abs() < 0.005,
                "gap {gap}: {seen:.4} vs {expected:.4}"
            );
        }
        assert!(
            !xfetch(0, NEVER, 1_000, 1.0, 0.5),
            "no expiry, no early refresh"
        );
        assert!(
            !xfetch(0, 10, 0, 1.0, 1e-9),
            "an unmeasured load time never triggers"
        );
        assert!(xfetch(10, 10, 1, 1.0, 1.0), "at expiry: always");
    }

    #[test]
    fn coins_are_uniform_in_the_unit_interval() {
        let n = 100_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let c = coin();
            assert!(c > 0.0 && c <= 1.0);
            sum += c;
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.01);
    }
}
