//! The flight registry's locked operations: claiming a key's flight (every load, refresh and
//! computation registers here, in one critical section with the lookup), and ending one
//! (unregistering, keeping it as a negative-cache entry, abandoning it). The flight data and
//! its waiters live in [`crate::flight`]; the registry itself in each shard; the lifecycle
//! guard in [`crate::load::Lead`]. Only this module and its parent take shard locks.

use super::fail_safe::FailSafe;
use super::Cache;
use crate::flight::FlightClaim;
use crate::flight::{drop_then, Flight, Outcome, Phase};
use crate::removal::Removals;
use crate::shard::Shard;
use crate::unwind::DropLater;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

/// What [`Cache::register_flight`] found under the lock.
pub(crate) enum Registration<K, V, R> {
    /// The key is present: the caller's `hit` applied to its value.
    Hit(R),
    /// A flight of the key runs (or a live negative-cache entry answers it): join it.
    Running(Arc<Flight<K, V>>),
    /// The caller's flight is registered: it leads. What the registration replaced or swept
    /// is to be dropped once the caller's guard owns the flight ([`Swept::drop_after`]).
    Registered(Swept<K, V>),
    /// The caller's flight was registered, then withdrawn at once because `keep` said so.
    Withdrawn,
}

/// Registrations that a new one replaced or swept (expired negative-cache entries). Their
/// keys' and errors' `Drop` is user code: it runs after the shard lock is released and once
/// the caller's guard owns its new flight, so that a panic there abandons the flight (its
/// waiters retry) instead of leaving it registered with nobody to end it — or, for a shared
/// load (which callers that joined may already drive and publish), gives up the caller's
/// interest in it as a cancelled caller would (`load_async::LeaderInterest`).
/// (The key's own live negative-cache entry, if the new flight replaced one, is also kept by
/// the flight: `State::displaced`.)
pub(crate) struct Swept<K, V>(Vec<(K, Arc<Flight<K, V>>)>);

impl<K, V> Swept<K, V> {
    /// Drops the swept registrations, then hands back `guard`.
    pub(crate) fn drop_after<G>(self, guard: G) -> G {
        drop(self.0);
        guard
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Registers `flight` as `key`'s flight unless one runs, in one critical section with
    /// the lookup: the single claim of every load, refresh and computation.
    ///
    /// - `hit`: look the key up first under the lock (a value stored since the caller's
    ///   lock-free lookup missed); `None` for claims that do not read (refreshes, computations).
    /// - `serve_negative`: a live negative-cache entry counts as a running flight.
    /// - `retry_refresh`: a refresh's claim (a read claimed the entry's refresh): registered
    ///   only if the entry is still claimed — a write or invalidation of the key since the read
    ///   wins, and nothing is registered ([`Registration::Withdrawn`]); when a flight runs, the
    ///   entry's refresh is given back, due at that time (a refresh that finds a load of its
    ///   key running).
    /// - `keep`: called under the lock once the flight is registered (moves a shared future
    ///   into it, marks it started); `false` withdraws the registration.
    ///
    /// The key's `Clone` (user code) runs before the lock; everything unregistered is dropped
    /// after it.
    #[allow(clippy::too_many_arguments)] // each is a distinct, documented choice
    pub(crate) fn register_flight<R>(
        &self,
        hash: u64,
        key: &K,
        flight: &Arc<Flight<K, V>>,
        serve_negative: bool,
        hit: Option<&dyn Fn(&V) -> R>,
        retry_refresh: Option<u64>,
        keep: impl FnOnce() -> bool,
    ) -> Registration<K, V, R> {
        let registered = key.clone(); // user code, before the lock
        let now = self.now();
        let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
        // This caller became the key's fail-safe retrier (the retry deadline moved on).
        let mut retrier = None;
        if let Some(hit) = hit {
            if let Some(v) = s.peek_read(hash, key, now, &self.inner.expiry) {
                let r = hit(v);
                drop(s);
                // What is unused (user code as it drops: the key's copies, a shared load's
                // own) drops before the answer leaves (see `answer`).
                drop((registered, keep));
                return Registration::Hit(r);
            }
            // Fail-safe: within a failed key's backoff (or while its retry runs) the old value
            // answers instead of a load (see `fail_safe.rs`).
            match self.fail_safe_answer(&s, hash, key, now) {
                FailSafe::Stale(v) => {
                    let r = hit(v);
                    drop(s);
                    drop((registered, keep));
                    self.note_stale();
                    return Registration::Hit(r);
                }
                FailSafe::Retrier(previous) => retrier = Some(previous),
                FailSafe::Load => {}
            }
        }
        // A planted bug for the loom model to catch: a refresh registers whatever the key
        // holds by now.
        #[cfg(herdcache_broken_model)]
        let claimed = true;
        #[cfg(not(herdcache_broken_model))]
        let claimed = retry_refresh.is_none() || s.refresh_claimed(hash, key);
        if !claimed {
            // The entry a read found due was written or removed since: the write wins.
            drop(s);
            drop(registered);
            return Registration::Withdrawn;
        }
        match s
            .flights()
            .claim(hash, registered, Arc::clone(flight), now, serve_negative)
        {
            FlightClaim::Running(running, unused) => {
                if let Some(at) = retry_refresh {
                    s.reset_refresh(hash, key, at);
                }
                drop(s);
                drop((unused, keep));
                Registration::Running(running)
            }
            FlightClaim::Registered(stale) => {
                // The key's live negative-cache entry the flight replaced, if any (only the
                // key's own entry can be live: a sweep takes expired ones).
                let mut displaced = stale
                    .iter()
                    .find(|(_, f)| f.negative_until() > now)
                    .map(|(_, f)| Arc::clone(f));
                if keep() {
                    // The flight keeps it, from the instant other callers can join (and take
                    // over, poll or cancel) it (see `State::displaced`).
                    if displaced.is_some() {
                        flight.state.lock().displaced = displaced;
                    }
                    drop(s);
                    Registration::Registered(Swept(stale))
                } else {
                    // Withdrawn: the entry it replaced takes its place again.
                    let taken =
                        self.unregister_restoring(&mut s, hash, flight, &mut displaced, |_, _| {});
                    // No retry runs after all: the next caller is the retrier. (A panic of
                    // the key's `Eq` here leaves the deadline moved on: one skipped retry.)
                    let withdrawn = retrier.map(|previous| {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.fail_safe_withdraw(&s, hash, key, previous);
                        }))
                    });
                    drop(s);
                    if let Some(Err(p)) = withdrawn {
                        crate::unwind::discard(p);
                    }
                    drop((stale, taken, displaced));
                    Registration::Withdrawn
                }
            }
        }
    }

    /// A flight of `key` ends without storing a value (its registration is being removed
    /// under the shard lock `s`): if the entry's refresh is still claimed
    /// ([`REFRESHING`](crate::expiry::REFRESHING)), nobody will give the claim back — the
    /// refresh that claimed it was taken over by this flight (a load or computation of the key
    /// that a permit holder ran in its place), and a taker does not know it ran a refresh — so
    /// it is given back here, due after `refresh_backoff`. Without this the key was never
    /// refreshed again: every read found the claim taken and served the old value, for ever
    /// without a time to live (round 47). A read that claimed the refresh just now, and
    /// registers its flight after this one ends, finds the claim given back and does not
    /// run: the key is due again after the backoff, as after a failed refresh.
    pub(crate) fn release_refresh_claim(&self, s: &Shard<K, V>, hash: u64, key: &K) {
        let at = crate::clock::deadline(self.now(), self.inner.stampede.refresh_backoff);
        s.reset_refresh(hash, key, at);
    }

    /// Unregisters a flight that ended without a value, or keeps it registered as a
    /// negative-cache entry for `negative` nanoseconds — if it is still registered. `gone`:
    /// the load answered that this key has no value (an `optionally_` loader's `None`); if no
    /// write came first, its entry kept past its deadline for fail-safe goes too (into `out`),
    /// so that a later failure cannot bring it back.
    pub(crate) fn end_failed(
        &self,
        hash: u64,
        flight: &Arc<Flight<K, V>>,
        negative: Option<u64>,
        gone: Option<&K>,
        out: &mut Removals<K, V>,
    ) {
        let key = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            if let Some(k) = gone {
                if s.flights_ref().is_registered(hash, flight) {
                    let acct = super::Accounting::new(self, &mut s);
                    acct.shard.remove_expired(hash, k, self.now(), true, out);
                }
            }
            match negative {
                Some(ttl) if s.flights_ref().is_registered(hash, flight) => {
                    // Kept registered: `claim` serves the outcome until the deadline. Set under
                    // the shard lock, where `claim` reads it.
                    flight.set_negative_until(crate::clock::deadline(self.now(), ttl));
                    if let Some(k) = s.flights_ref().key_of(hash, flight) {
                        self.key_eq_guarded(hash, || self.release_refresh_claim(&s, hash, k));
                    }
                    None
                }
                _ => {
                    let key = s.flights().remove(hash, flight);
                    if let Some(k) = &key {
                        self.key_eq_guarded(hash, || self.release_refresh_claim(&s, hash, k));
                    }
                    key
                }
            }
        };
        drop(key); // outside the lock
        crate::unwind::discard_later(); // an `Eq` panic's payload, set aside under it
    }

    /// Cancels a shared async load nobody wants any more. The check that nobody is interested
    /// and nobody polls it happens under the flight's lock, where callers register their
    /// interest, so a caller that joined meanwhile (and may be driving the load) keeps it
    /// alive. Returns whether the load was cancelled; only then is it counted
    /// (`LoadAbandoned`, before anyone wakes), and, with fail-safe, its key's old value is
    /// served for a backoff: otherwise whoever ends it counts it, once.
    ///
    /// Its future (the caller's `init`, user code) is dropped *before* the flight is
    /// unregistered, with no lock held: a caller of the key that comes meanwhile joins this
    /// flight and loads again once it is abandoned, so no second load of the key starts while
    /// the cancelled one is still being dropped (single flight holds for cancelled loads too;
    /// `attack_s53`'s checker saw the two overlap). Marked as this thread's load during the
    /// drop: a `Drop` that asks the cache for this very key panics (as a loader that does)
    /// instead of waiting for itself.
    pub(crate) fn cancel_shared(&self, hash: u64, flight: &Arc<Flight<K, V>>) -> bool {
        let future = {
            let mut st = flight.state.lock();
            if !matches!(st.phase, Phase::Running) || st.interested > 0 || st.polling {
                return false;
            }
            // A load taken over is the taker's: it ends the flight, whoever else goes away
            // (and from here on, nobody takes this one over).
            if !flight.give_up() {
                return false;
            }
            // Nobody polls or cancels it from here on: a caller that joins registers and waits
            // for it to be abandoned.
            st.polling = true;
            st.future.take()
        };
        let running = crate::flight::enter(flight);
        drop_then(future, || {
            drop(running);
            self.finish_cancel(hash, flight);
        });
        true
    }

    /// The rest of [`cancel_shared`](Self::cancel_shared), once the load's future is gone:
    /// unregisters the flight and resolves it as abandoned.
    fn finish_cancel(&self, hash: u64, flight: &Arc<Flight<K, V>>) {
        // The negative entry the load replaced goes back in its place (see `State::displaced`);
        // if not, it is dropped last (a panic of its error's `Drop` goes on to the cancelling
        // caller's drop, as one of the load's own future does).
        let mut negative = flight.take_displaced();
        let (key, wakers) = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            // A load nobody waits for any more failed, as an abandoned leader's: with
            // fail-safe, its key's old value is served for a backoff before a retry.
            let ended = |s: &Shard<K, V>, k: &K| {
                self.key_eq_guarded(hash, || {
                    self.release_refresh_claim(s, hash, k);
                    self.fail_safe_abandoned(s, hash, k, flight.forgoes_fallback());
                });
            };
            let key = self.unregister_restoring(&mut s, hash, flight, &mut negative, ended);
            let mut st = flight.state.lock();
            st.polling = false;
            st.phase = Phase::Abandoned;
            if flight.count_load() {
                self.count(crate::stats::Counter::LoadAbandoned);
            }
            (key, std::mem::take(&mut st.wakers))
        };
        // Outside the locks, before anyone wakes; the key's `Drop` is user code: everyone is
        // woken whatever it does.
        let negative = DropLater(negative);
        drop_then(key, || {
            flight.wake_all(wakers);
            crate::unwind::discard_later(); // an `Eq` panic's payload, set aside under the lock
        });
        drop(negative);
    }

    /// Unregisters a flight that ends without storing anything (if it is still registered:
    /// then, with `retry_refresh`, the entry's next refresh is due at that time) and resolves
    /// it with `phase`. `failed_load`: a load that failed, which starts fail-safe's backoff
    /// (see `cache/fail_safe.rs`).
    ///
    /// If the flight replaced a live negative-cache entry of its key when it was registered
    /// (`State::displaced`: a caller that does not take negative answers, a computation or a
    /// `get_with`) and ends abandoned — a computation that changed nothing, a load abandoned,
    /// cancelled or panicking — that entry takes the flight's place again in the same
    /// critical section, unless a write of the key detached the flight meanwhile (a write ends
    /// a negative entry) or the entry has expired. The flight's waiters, resolved after, find
    /// it: the key goes on answering the remembered error (or panic) until its deadline, as if
    /// the flight had not been. An entry not put back is dropped after the flight is resolved
    /// (its error's `Drop` is user code: a panic of it goes on to the caller, unless one is
    /// unwinding already).
    ///
    /// The key's `Eq` runs here (the entry's refresh deadline, its stale value), under the
    /// lock, maybe while a panic unwinds (a lead's drop): a panic of it is caught — the flight
    /// is resolved whatever happens, and a refresh claim it could not give back is noted as an
    /// orphan, given back by the next read of the entry (found by the value's address).
    pub(crate) fn end_flight(
        &self,
        hash: u64,
        flight: &Arc<Flight<K, V>>,
        retry_refresh: Option<u64>,
        phase: Phase<V>,
        failed_load: bool,
    ) {
        let mut left = flight.take_displaced();
        let mut restore = if matches!(phase, Phase::Abandoned) {
            left.take()
        } else {
            None
        };
        let key = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            let ended = |s: &Shard<K, V>, k: &K| {
                self.key_eq_guarded(hash, || {
                    match retry_refresh {
                        Some(at) => s.set_refresh_at(hash, k, at),
                        None => self.release_refresh_claim(s, hash, k),
                    }
                    if failed_load && matches!(phase, Phase::Abandoned) {
                        self.fail_safe_abandoned(s, hash, k, flight.forgoes_fallback());
                    }
                });
            };
            self.unregister_restoring(&mut s, hash, flight, &mut restore, ended)
        };
        let left = DropLater(left.or(restore));
        // Outside the lock; its `Drop` is user code: the flight ends whatever it does.
        drop_then(key, || {
            flight.resolve(phase);
            crate::unwind::discard_later(); // an `Eq` panic's payload, set aside under the lock
        });
        drop(left);
    }

    /// Unregisters `flight` (if a write has not detached it) under its shard's lock `s`, or,
    /// if `negative` (the live negative-cache entry the flight replaced) is still live, puts
    /// that entry in its place (taken from `negative`); `ended` runs on the key either way.
    /// Returns the key's registered copy, to drop after the lock.
    fn unregister_restoring(
        &self,
        s: &mut Shard<K, V>,
        hash: u64,
        flight: &Arc<Flight<K, V>>,
        negative: &mut Option<Arc<Flight<K, V>>>,
        ended: impl Fn(&Shard<K, V>, &K),
    ) -> Option<K> {
        // The clock is read only for a flight that replaced a negative entry.
        let restore = negative
            .as_ref()
            .is_some_and(|n| n.negative_until() > self.now());
        match s.flights_ref().key_of(hash, flight) {
            Some(k) if restore => {
                ended(s, k);
                let n = negative.take().expect("checked");
                let replaced = s.flights().replace(hash, flight, n);
                debug_assert!(replaced.is_ok());
                None
            }
            _ => {
                let key = s.flights().remove(hash, flight);
                if let Some(k) = &key {
                    ended(s, k);
                }
                key
            }
        }
    }

    /// Ends the flight of a replacing leader (`get_with_if`) whose second look read a value
    /// it keeps (`kept`): in the critical section that unregisters the flight, the waiters
    /// are given that value only if it is still the key's live value — every waiter joined
    /// before that instant, so the value was live during its call; a write since the read
    /// would have detached the flight. Otherwise (it expired or was evicted since the read)
    /// the flight ends unloaded and its waiters look again, each for itself: a value read
    /// before a caller joined is no answer for it. As [`end_flight`](Self::end_flight) for the
    /// key's `Eq` (a panic of it: the waiters look again).
    pub(crate) fn end_kept(
        &self,
        hash: u64,
        key: &K,
        flight: &Arc<Flight<K, V>>,
        kept: Arc<Outcome<V>>,
    ) {
        let (registered, live) = {
            let mut s = self.inner.shards[self.shard_index(hash)].lock.write();
            let now = self.now();
            let registered = s.flights().remove(hash, flight);
            let mut live = false;
            if let Some(k) = &registered {
                self.key_eq_guarded(hash, || {
                    self.release_refresh_claim(&s, hash, k);
                    live = s.peek(hash, key, now).is_some();
                });
            }
            (registered, live)
        };
        let phase = if live {
            Phase::Done(kept)
        } else {
            Phase::Abandoned
        };
        // A negative entry the flight replaced is not put back (a value was read since).
        let displaced = flight.take_displaced();
        // Outside the lock; its `Drop` is user code: the flight ends whatever it does.
        drop_then(registered, || {
            flight.resolve(phase);
            crate::unwind::discard_later(); // an `Eq` panic's payload, set aside under the lock
        });
        if let Some(n) = displaced {
            crate::unwind::drop_quietly(n);
        }
    }

    /// Runs `f`, which calls the key's `Eq` (user code) while a flight ends: a panic of it is
    /// caught (the caller still resolves its flight; it may be unwinding already, where a
    /// second panic would abort) and the key's refresh claim, which `f` may not have given
    /// back, is noted as an orphan. Its payload is set aside: the caller, under the shard lock,
    /// calls [`discard_later`](crate::unwind::discard_later) once the lock is released.
    pub(crate) fn key_eq_guarded(&self, hash: u64, f: impl FnOnce()) {
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            self.note_orphan(hash);
            // Under the shard lock: discarded by the caller once it is released.
            crate::unwind::later(p);
        }
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + 'static,
    V: 'static,
    S: BuildHasher,
{
    /// Ends a computation that removes `key`: removes it and unregisters the computation's
    /// flight in one critical section — only if the flight is still registered (a write of the
    /// key during the computation wins and is kept). Returns the flight's registered key, for
    /// the caller to drop once the removals are reported (its `Drop` is user code); `None`
    /// when a write detached the flight (nothing removed). If a key's `Hash` or `Eq` panics
    /// under the lock, what was removed before is reported, then the panic resumes.
    pub(crate) fn remove_with_flight(
        &self,
        hash: u64,
        key: &K,
        flight: &Arc<Flight<K, V>>,
        out: &mut Removals<K, V>,
    ) -> Option<DropLater<K>> {
        let s = self.inner.shards[self.shard_index(hash)].lock.write();
        let mut flight_key = DropLater(None);
        self.reporting_panics(out, |out| {
            let mut s = s;
            flight_key.0 = s.flights().remove(hash, flight);
            if flight_key.0.is_some() {
                self.remove_locked(&mut s, hash, key, out);
            }
        });
        flight_key.0.is_some().then_some(flight_key)
    }

    /// The number of loads in flight (not counting negative-cache entries). A test hook
    /// (feature `testing`); the same figure is in [`stats`](Self::stats).
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn loads_in_flight(&self) -> usize {
        self.flights_running()
    }

    /// The load limiter's state and every registered flight's, one line each: a test hook
    /// (feature `testing`), for the report of a test that hangs.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn describe_loads(&self) -> String
    where
        K: std::fmt::Debug,
    {
        let mut lines = Vec::new();
        if let Some(l) = &self.inner.stampede.limiter {
            lines.push(l.describe());
        }
        for (i, c) in self.inner.shards.iter().enumerate() {
            match c.lock.try_read() {
                Some(s) => lines.extend(
                    s.flights_ref()
                        .describe()
                        .into_iter()
                        .map(|f| format!("shard {i}: {f}")),
                ),
                None => lines.push(format!("shard {i}: locked")),
            }
        }
        lines.join("\n")
    }

    pub(crate) fn flights_running(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|c| c.lock.read().flights_ref().running())
            .sum()
    }

    /// Gives back a read's claim to refresh `key`: the entry is due again at `at`.
    pub(crate) fn reset_refresh(&self, hash: u64, key: &K, at: u64) {
        self.inner.shards[self.shard_index(hash)]
            .lock
            .read()
            .reset_refresh(hash, key, at);
    }
}
