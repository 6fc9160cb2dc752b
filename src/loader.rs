//! The loader API: [`Cache::load`], [`Cache::load_async`] and [`Cache::load_with_timeout`]
//! with the loader given to the builder, and [`LoadError`]. Every load goes through the
//! single-flight core ([`crate::load`]); a panic of the builder's loader ends the load as
//! [`LoadError::Panicked`] for all its callers; a soft timeout bounds the wait, including a
//! leader's wait for a load permit (on a spawner, the load goes on and its value is kept). Refresh-ahead, which reuses the loader, is
//! [`crate::refresh`].

use crate::answer::after_dropping;
use crate::cache::Cache;
use crate::flight::{outcome_of, Outcome, Waited};
use crate::load::{Claim, ClaimMode, Handoff, Lead, NotRun, Settle, Start};
use crate::settings::{BoxError, LoaderFn};
use crate::stats::Counter;
use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// too, so a loader that panics cannot cause a storm — on a cache that keeps time: one
    /// with a time to live, a time to idle, an [`Expiry`](crate::Expiry) or `negative_ttl`
    /// (a cache with none of these never reads its clock, and remembers no panic: each call
    /// after the load that panicked runs the loader again). Also
    /// what the caller of a load run by the spawner gets when the loader returned but storing
    /// its value panicked (the weigher, or an [`Expiry`](crate::Expiry) callback): the panic
    /// happened on the spawner's side (a caller that runs the load itself gets the panic).
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
    /// (for every caller of that load, and, on a cache that keeps time, for the refresh backoff
    /// after it: a panicking loader is called once per backoff, not once per caller — see
    /// [`LoadError::Panicked`]); [`LoadError::Timeout`] when the wait
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
    /// As [`get_with_async_shared`](Self::get_with_async_shared): the load is *shared* — every
    /// caller of the key would run the same loader for it, so the loader's future belongs to
    /// the load, not to the caller that started it. A leader dropped mid-load leaves the
    /// running future to the callers still waiting, which poll it to its end (the loader is
    /// not called again); the load is cancelled, its future dropped and nothing cached, only
    /// when every caller waiting for it has dropped its own future. So a loader future that
    /// never completes holds every caller that joined it: bound the wait with the runtime's
    /// timeout (dropping the caller's future) and [`get_or_stale`](Self::get_or_stale). The
    /// builder's [`load_timeout`](crate::CacheBuilder::load_timeout) bounds only the blocking
    /// [`load`](Self::load), not this call.
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
            let caught = CatchPanic(Box::pin(async { loader(&k).await })).await;
            let outcome = match caught {
                Some(r) => outcome_of(r),
                None => Outcome::Panicked,
            };
            // The key drops outside the loader's guard: its `Drop` panicking is not the
            // loader's panic but the caller's (as in `load`), and it drops before the outcome
            // leaves (user code: see `answer`).
            after_dropping(k, outcome)
        };
        self.load_async_core(key, fut, |v| Ok(v.clone()), accept_load)
            .await
    }

    /// [`load`](Self::load) with its own soft timeout (`None`: wait as long as it takes).
    ///
    /// The timeout bounds the wait for a load run by another caller, or by the spawner, and a
    /// leader's wait for a load permit ([`max_concurrent_loads`](crate::CacheBuilder::max_concurrent_loads)):
    /// a caller that runs the loader itself (no spawner configured) is not interrupted once the
    /// loader runs, but if the timeout passes while it still waits for a permit it gives up the
    /// load before the loader runs (the callers that joined it retry, or with
    /// [`fail_safe`](crate::CacheBuilder::fail_safe) get the last value until the retry
    /// deadline). When the timeout passes, the call returns the value already cached for `key`
    /// if there is one (a value due for refresh), else with fail-safe the last value of an
    /// expired `key`, else [`LoadError::Timeout`]; a load that started goes on and fills the
    /// cache for the next caller.
    ///
    /// # Concurrency
    ///
    /// A free permit is taken even when the timeout has passed; a permit granted just as the
    /// timeout passes goes on to the next caller waiting for one (or back to the pool), never
    /// lost. With a spawner the spawned job waits for its permit with no deadline (the callers'
    /// waits for it are bounded) — unless the spawner runs the job at once on the caller's
    /// thread (`|job| job()`): then the job's wait for a permit ends at the caller's timeout,
    /// as the caller's own would.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_with_timeout(&self, key: K, timeout: Option<Duration>) -> Result<V, LoadError> {
        let Some(loader) = self.inner.stampede.loader.clone() else {
            return Err(LoadError::NoLoader);
        };
        // A timeout too long for an `Instant` (`Duration::MAX`) is no bound at all.
        let until = timeout.and_then(crate::clock::instant_after);
        let hash = self.hash(&key);
        // Inside another load that holds a permit, the load runs here under that permit: a
        // spawned job would wait for the permit this caller holds.
        let result =
            if until.is_none() || self.inner.stampede.spawner.is_none() || self.holds_permit() {
                let how = Settle::starting(self, Start::Lookup);
                self.load_inline(key.clone(), hash, &loader, until, how)
            } else {
                self.load_spawned(key.clone(), hash, &loader, until)
            };
        let answer = match result {
            Some(r) => r,
            // Timed out: a value at hand beats an error.
            None => {
                self.count(Counter::Timeout);
                self.read_with(&key, hash, false, V::clone)
                    .or_else(|| self.fail_safe_fallback(hash, &key))
                    .ok_or(LoadError::Timeout)
            }
        };
        // The key drops first (user code: see `answer`).
        after_dropping(key, answer)
    }

    /// A load with the builder's loader run by this caller if it leads. A panic of the loader
    /// ends the load as [`LoadError::Panicked`] for every caller of it. `None`: `until` passed.
    fn load_inline(
        &self,
        key: K,
        hash: u64,
        loader: &LoaderFn<K, V>,
        until: Option<std::time::Instant>,
        how: Settle<'_, K, V, S>,
    ) -> Option<Result<V, LoadError>> {
        let k = key.clone();
        let loader = Arc::clone(loader);
        let init = move || {
            let outcome = catch_panic(|| outcome_of(loader(&k)));
            // The key drops before the outcome leaves (user code: see `answer`).
            after_dropping(k, outcome)
        };
        let hit = |v: &V| Ok(v.clone());
        self.load_blocking(key, hash, init, &hit, &accept_load, until, how, None)
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
        // The loop's locals (the key, flights, outcomes) drop at the end of the block that
        // holds them, after its answer is made: the answer waits outside it (see `answer`).
        let answer: Option<Result<V, LoadError>>;
        {
            let key = key;
            let hit = |v: &V| Ok(v.clone());
            let mut how = Settle::new(self, ClaimMode::leading(false, true));
            loop {
                let claim = self.claim(hash, &key, &hit, &mut None, &mut how, &|o| {
                    accept_load(o).is_some()
                });
                let (flight, handoff) = match claim {
                    Claim::Hit(r) => {
                        answer = Some(r);
                        break;
                    }
                    Claim::Lost => unreachable!("a blocking caller can always lead"),
                    // Inside another load that holds a permit: take over a leader that waits for
                    // one, here (waiting for it could keep the permit from it forever).
                    Claim::Join(f) if self.holds_permit() && f.steal() => {
                        let lead = Lead::taken(self, hash, f);
                        let k = key.clone();
                        let init = || catch_panic(|| outcome_of(loader(&k)));
                        let Ok((outcome, took)) = self.run_loader(lead.flight(), init, false, None)
                        else {
                            unreachable!("a load taken over is not started again")
                        };
                        let outcome = self.publish(lead, Some(key), outcome, took);
                        answer = accept_load(&outcome);
                        break;
                    }
                    Claim::Join(f) => (f, None),
                    Claim::Lead(mut lead) => {
                        let flight = Arc::clone(lead.flight());
                        // Dropped unrun while this caller waits, the job's load is this caller's
                        // to count (it loads itself); once it has given up waiting, the job's.
                        // The key's `Clone` (user code) first: if it panics, the lead counts its
                        // load as failed (it is not handed off yet).
                        let (k, job_loader) = (key.clone(), Arc::clone(loader));
                        let handoff = Handoff::new();
                        lead.hand_off(handoff.clone());
                        // The job owns the lead: dropped unrun, it abandons the flight.
                        let job = move || {
                            let cache = lead.cache().clone();
                            let init = || catch_panic(|| outcome_of(job_loader(&k)));
                            // The job has no deadline of its own (its callers' waits are bounded),
                            // unless the spawner runs it at once on the caller's thread: then the
                            // caller's deadline bounds its wait for a permit, as the caller's own.
                            let until = SPAWNING.with(Cell::get);
                            match cache.run_loader(lead.flight(), init, true, until) {
                                Ok((outcome, took)) => {
                                    cache.publish(lead, Some(k), outcome, took);
                                }
                                // Taken over while the job waited for a permit: the taker
                                // publishes.
                                Err(NotRun::TakenOver(_)) => drop(lead.disarm()),
                                // Run inline past the caller's deadline: abandoned (the caller
                                // then times out; its joiners retry).
                                Err(NotRun::TimedOut) => drop(lead),
                            }
                        };
                        let spawn = self
                            .inner
                            .stampede
                            .spawner
                            .as_ref()
                            .expect("checked by the caller");
                        let previous = SPAWNING.with(|s| s.replace(until));
                        let spawned =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                spawn(Box::new(job))
                            }));
                        SPAWNING.with(|s| s.set(previous));
                        // A spawner that panics: the job went down with it (the flight is then
                        // abandoned, and the wait below loads inline), or ran, or is kept.
                        if let Err(p) = spawned {
                            crate::unwind::discard(p);
                        }
                        (flight, Some(handoff))
                    }
                };
                match self.wait_blocking(&flight, &accept_load, until) {
                    Waited::Done(Some(r)) => {
                        answer = Some(r);
                        break;
                    }
                    Waited::Done(None) => how.bypass_negative = true,
                    // Our own job's load ran (counted for this call's miss) but storing its value
                    // panicked (the weigher, an `Expiry`): a failed load, not one to run again.
                    Waited::Abandoned if handoff.as_ref().is_some_and(Handoff::was_lost) => {
                        answer = Some(Err(LoadError::Panicked));
                        break;
                    }
                    // Our own job was dropped unrun (its lead handed back to this caller): load
                    // here instead, that load counting this call's miss. (A job whose load was
                    // taken over by a caller holding a permit hands nothing back: the taker's
                    // load counted this call's miss, and if it failed, this caller claims again
                    // below, a new attempt, as any caller whose flight was abandoned.)
                    Waited::Abandoned if handoff.as_ref().is_some_and(Handoff::was_handed_back) => {
                        // This call's ledger goes with it: owed from here on (a panic of the key's
                        // `Clone` below still classifies the miss).
                        *how = ClaimMode::starting(Start::Missed);
                        answer = self.load_inline(key, hash, loader, until, how);
                        break;
                    }
                    Waited::Abandoned => {}
                    Waited::TimedOut => {
                        if handoff.is_some_and(|h| h.caller_gone()) {
                            // Our job was dropped unrun before this caller gave up: counted here.
                            // (The job's flight's load: its lead, handed back, did not count it.)
                            self.settle_load(&mut how, &flight, Counter::LoadAbandoned);
                        }
                        answer = None;
                        break;
                    }
                }
            }
        }
        answer
    }
}

crate::sync::thread_local_shim! {
    /// The deadline of the caller this thread is handing a job to the spawner for: a job the
    /// spawner runs at once on this thread, during that call (this one, or one it had queued
    /// before), waits for its permit only until then.
    static SPAWNING: Cell<Option<Instant>> = Cell::new(None);
}

/// Polls a future, turning its panic into `None`.
pub(crate) struct CatchPanic<F>(std::pin::Pin<Box<F>>);

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
            Err(p) => {
                crate::unwind::discard(p);
                std::task::Poll::Ready(None)
            }
        }
    }
}

/// Runs a shared loader, turning its panic into an outcome that every caller of the load
/// receives (as [`LoadError::Panicked`]) instead of one caller after another running it again.
pub(crate) fn catch_panic<V>(load: impl FnOnce() -> Outcome<V>) -> Outcome<V> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|p| {
        crate::unwind::discard(p);
        Outcome::Panicked
    })
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
