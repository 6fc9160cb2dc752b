//! Refresh-ahead with a hard time to live, stale-if-error with backoff, and probabilistic early
//! refresh (XFetch; its arithmetic is in [`crate::expiry`]), with the builder's loader (the
//! loader API itself is [`crate::loader`]). Negative caching and the global load limit live in
//! the single-flight core ([`crate::load`]) and [`crate::limit`], since every load goes
//! through them.
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
//! A refresh whose store panics in user code (the key's `Eq`, an `Expiry` hook) gives its
//! claim back as a failure does; if even that cannot find the key (its `Eq` panics again), the
//! key's hash is remembered and the next read of the entry gives the claim back (due after the
//! backoff). A refresh a read decided registers only if the entry is still the one claimed: a
//! write or invalidation of the key in between wins, and no refresh runs.
//!
//! Where the reload runs: on the builder's *spawner* if there is one (a thread pool, or e.g. a
//! tokio runtime handle captured at build time and its `spawn_blocking`), so no caller waits;
//! otherwise the reader that triggered it runs it before returning (it alone waits). A refresh that finds the load limit full waits
//! for a permit on the spawner, or, inline, is deferred to a later read: never lost.

use crate::cache::Cache;
use crate::cache::Registration;
use crate::flight::{Flight, Outcome, Phase};
use crate::load::Lead;
use crate::load_async::{Gate, UnderPermit};
use crate::settings::{AsyncLoaderFn, FutureSpawner, LoaderFn};
use crate::stats::Counter;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
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
        match &self.inner.stampede.spawner {
            Some(spawn) => {
                // The job owns the lead: dropped unrun (or with a panicking spawner), the
                // refresh is abandoned and retried after the backoff.
                let job = move || {
                    let cache = lead.cache().clone();
                    cache.run_refresh(lead, key, &loader, true)
                };
                let spawned =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spawn(Box::new(job))));
                if let Err(p) = spawned {
                    crate::unwind::discard(p);
                }
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
        let fut = async move {
            let cache = lead.cache().clone();
            let limiter = cache.inner.stampede.limiter.clone();
            let permit = match &limiter {
                Some(l) if !cache.holds_permit() => Some(Arc::new(l.acquire().await)),
                _ => None,
            };
            if !lead.flight().start() {
                drop(lead); // taken over meanwhile: the taker publishes
                return;
            }
            // Timed as the blocking refresh is (the precise clock: the coarse one rounds a
            // short load to 0, and early refresh would then never fire for the key).
            let start = cache.stopwatch();
            let flight = Arc::clone(lead.flight());
            let result = UnderPermit::new(
                Entered::new(flight, Caught(loader(&key))),
                Gate::owning(permit),
            )
            .await;
            let took = cache.stopwatch().saturating_sub(start);
            match result {
                Ok(Ok(v)) => cache.publish_refreshed(lead, key, v, took),
                Ok(Err(e)) => {
                    let error: Arc<dyn std::any::Any + Send + Sync> = Arc::new(e);
                    cache.fail_refresh(lead, &key, took, Outcome::Error(error));
                }
                // A panicking loader fails the refresh as in the blocking path (counted, the
                // next one after the backoff), instead of unwinding through the spawner.
                Err(()) => cache.fail_refresh(lead, &key, took, Outcome::Panicked),
            }
        };
        let spawned =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spawn(Box::pin(fut))));
        if let Err(p) = spawned {
            crate::unwind::discard(p);
        }
    }

    fn run_refresh(&self, lead: Lead<K, V, S>, key: K, loader: &LoaderFn<K, V>, may_wait: bool) {
        let permit = match &self.inner.stampede.limiter {
            Some(_) if may_wait || self.holds_permit() => self.load_permit(),
            Some(l) => match l.try_acquire() {
                Some(p) => crate::load::LoadPermit::held(p),
                None => {
                    // Deferred, not lost: the next read finds the entry due again. Its load
                    // never ran: an abandoned load (see `Lead`'s `refresh_load`).
                    self.count(Counter::RefreshFailed);
                    if lead.flight().count_load() {
                        self.count(Counter::LoadAbandoned);
                    }
                    let hash = lead.hash();
                    let flight = lead.disarm();
                    self.end_flight(hash, &flight, Some(self.now()), Phase::Abandoned, false);
                    return;
                }
            },
            None => crate::load::LoadPermit::none(),
        };
        if !lead.flight().start() {
            drop(lead); // taken over meanwhile: the taker publishes
            return;
        }
        let running = crate::flight::enter(lead.flight());
        let start = self.stopwatch();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader(&key)));
        let took = self.stopwatch().saturating_sub(start);
        drop(running);
        drop(permit);
        match result {
            Ok(Ok(v)) => self.publish_refreshed(lead, key, v, took),
            // A failed (or panicking) refresh keeps the old value, and backs off. Callers that
            // joined it (the entry expired meanwhile) get the error.
            Ok(Err(e)) => {
                let error: Arc<dyn std::any::Any + Send + Sync> = Arc::new(e);
                self.fail_refresh(lead, &key, took, Outcome::Error(error));
            }
            Err(p) => {
                self.fail_refresh(lead, &key, took, Outcome::Panicked);
                crate::unwind::discard(p);
            }
        }
    }

    /// Publishes a refresh's value; counted as a refresh that succeeded only if it replaced
    /// the value (one that lost to a write or invalidation of the key counts as failed: every
    /// refresh started ends as one or the other).
    ///
    /// The store runs user code (the key's `Eq`, the weigher, an `Expiry` hook, the value's
    /// `Clone`) after the flight has left the registry: if it panics, the entry keeps its old
    /// value and its refresh claim is given back here (due again after the backoff; the lead's
    /// drop counts the refresh as failed), then the panic goes on.
    fn publish_refreshed(&self, lead: Lead<K, V, S>, key: K, value: V, took: u64) {
        let hash = lead.hash();
        // Before anything is published: if the key's `Clone` panics, the lead's drop gives
        // the claim back (its flight still registered).
        let again = key.clone();
        let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.publish_stored(lead, key, value, took)
        }));
        match stored {
            // Counted by the store (succeeded, or failed if a write won), before the
            // refresh's callers woke: the eviction listener's panic (or a replaced value's
            // `Drop`'s) does not leave it uncounted.
            Ok((_, listener_panic)) => {
                if let Some(p) = listener_panic {
                    std::panic::resume_unwind(p);
                }
            }
            Err(panic) => {
                let retry = crate::clock::deadline(self.now(), self.inner.stampede.refresh_backoff);
                // The key's `Eq` may panic again: then the next read of the entry gives the
                // claim back (found by the value's address, without `Eq`).
                let given = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.reset_refresh(hash, &again, retry)
                }));
                if let Err(p) = given {
                    self.note_orphan(hash);
                    crate::unwind::discard(p);
                }
                drop(again);
                std::panic::resume_unwind(panic);
            }
        }
    }

    /// Ends a refresh that failed: the old value stays, the next refresh waits for the
    /// backoff, and callers that joined the refresh (the entry expired meanwhile) get `outcome`
    /// — or, with fail-safe, the old value (see `cache/fail_safe.rs`).
    fn fail_refresh(&self, lead: Lead<K, V, S>, key: &K, took: u64, outcome: Outcome<V>) {
        let retry = crate::clock::deadline(self.now(), self.inner.stampede.refresh_backoff);
        let hash = lead.hash();
        // Taken (and the retry deadline set) while the flight is still registered.
        // Callers that joined the refresh (the entry expired meanwhile) hold the flight too:
        // only then is the fallback value served to anyone (and counted). The value's `Clone`
        // and the key's `Eq` run here: if they panic, the armed lead's drop counts the refresh
        // as failed (so nothing is counted before: once, not twice).
        let joined = Arc::strong_count(lead.flight()) > 2; // the registry's and this lead's
                                                           // Not on a value the Redis tier found invalidated by another instance (see `publish`).
        let fallback = if lead.flight().forgoes_fallback() {
            // Nor once it expires: `get_or_stale` (which reads no Redis) and a soft timeout's
            // fallback would answer with it (round 87) — marked as an abandoned load that
            // forgoes is. While the refresh is registered no write has replaced the value it
            // refreshed.
            let s = self.inner.shards[self.shard_index(hash)].lock.read();
            if s.flights_ref().is_registered(hash, lead.flight()) {
                self.fail_safe_abandoned(&s, hash, key, true);
            }
            None
        } else {
            self.fail_safe_fallback_for(hash, key, lead.flight(), joined)
        };
        self.count(Counter::RefreshFailed);
        if lead.flight().count_load() {
            self.count(Counter::LoadFailure);
            self.count_n(Counter::LoadNanos, took);
            self.inner.stampede.monitor.load(took, true);
        }
        let (outcome, negative) = match fallback {
            Some(v) => (Outcome::Value(v), None),
            None => {
                // Remembered as a failed load is (see `publish`): callers of the key, once it
                // is missed, get the failure without a load until then — but not with
                // fail-safe: the value it refreshed is still live, and once it expires it is
                // what a failed load answers with (a remembered failure would answer first).
                let negative = match outcome {
                    Outcome::Panicked => Some(self.inner.stampede.refresh_backoff),
                    _ => self.inner.stampede.negative_ttl,
                };
                let keep = self.keeps_time() && self.inner.stampede.fail_safe.is_none();
                (outcome, negative.filter(|&d| d > 0 && keep))
            }
        };
        let flight = lead.disarm();
        let phase = Phase::Done(Arc::new(outcome));
        match negative {
            Some(ttl) => {
                {
                    let s = self.inner.shards[self.shard_index(hash)].lock.write();
                    if s.flights_ref().is_registered(hash, &flight) {
                        // Kept registered, as a negative-cache entry (set under the shard
                        // lock, where claims read it).
                        flight.set_negative_until(crate::clock::deadline(self.now(), ttl));
                        // The key's `Eq` (user code): the flight is resolved below whatever
                        // it does.
                        self.key_eq_guarded(hash, || s.set_refresh_at(hash, key, retry));
                    }
                }
                flight.resolve(phase);
                crate::unwind::discard_later(); // an `Eq` panic's payload, set aside above
            }
            None => self.end_flight(hash, &flight, Some(retry), phase, false),
        }
    }

    /// Registers a refresh of `key` as its flight, unless a load of it runs already — then the
    /// reader's claim is given back (due again after the backoff, unless that load stores a new
    /// value first). A registered refresh is counted as started here.
    fn claim_refresh(&self, hash: u64, key: &K) -> Option<Lead<K, V, S>> {
        let f = Flight::blocking();
        let retry = crate::clock::deadline(self.now(), self.inner.stampede.refresh_backoff);
        match self.register_flight::<()>(hash, key, &f, false, None, Some(retry), || true) {
            Registration::Registered(swept) => {
                // Started from its registration on, counted before the registrations it swept
                // are dropped (the `Drop` of a key or an error: user code): if that panics,
                // the refresh's lead ends it as failed, and a refresh that failed was started.
                self.count(Counter::RefreshStarted);
                Some(swept.drop_after(Lead::refresh(self, hash, f)))
            }
            Registration::Running(_) => None,
            // Written or removed since the read claimed it: no refresh (the write wins).
            Registration::Withdrawn => None,
            Registration::Hit(()) => unreachable!("no lookup"),
        }
    }
}

/// Polls an async refresh's load with its flight marked as run by the polling thread, as the
/// blocking refresh runs its loader: a load of the same key inside it fails loudly instead of
/// waiting for itself, and the Redis tier asks this flight (not an outer one, nor none)
/// whether a write superseded it.
struct Entered<K: 'static, V: 'static, F> {
    flight: Arc<Flight<K, V>>,
    inner: std::pin::Pin<Box<F>>,
}

impl<K: 'static, V: 'static, F> Entered<K, V, F> {
    fn new(flight: Arc<Flight<K, V>>, inner: F) -> Self {
        Entered {
            flight,
            inner: Box::pin(inner),
        }
    }
}

impl<K: Send + Sync + 'static, V: Send + Sync + 'static, F: std::future::Future> std::future::Future
    for Entered<K, V, F>
{
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let _running = crate::flight::enter(&self.flight);
        self.inner.as_mut().poll(cx)
    }
}

/// A future whose panic is caught and returned as `Err(())` (the refresh's loader future).
struct Caught<F>(F);

impl<F: std::future::Future + Unpin> std::future::Future for Caught<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(inner).poll(cx)
        })) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(p) => {
                crate::unwind::discard(p);
                std::task::Poll::Ready(Err(()))
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
        // The key's `Eq` (user code) runs here, maybe while a panic unwinds: a second panic
        // must not abort the process (the claim is then left for a read to give back, see
        // `Cache::note_orphan`).
        let given = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.0.reset_refresh(self.1, self.2, retry);
        }));
        if let Err(p) = given {
            self.0.note_orphan(self.1);
            crate::unwind::discard(p);
        }
    }
}
