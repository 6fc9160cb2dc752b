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
//!   over instead, so two loads never wait for each other's permit. A blocking leader with a
//!   deadline (a soft timeout) waits for its permit no later than that: past it, it claims the
//!   start (nobody can take the load over any more) and abandons the flight unrun, so its
//!   waiters retry (with fail-safe: get the old value) and it returns timed out.
//! * **Errors and `None`** reach the callers that waited on that load (the same `Arc<E>` for
//!   all) and are not cached: the next call loads again. A waiter whose error type differs from
//!   the leader's retries instead.
//! * **Recursion.** A thread-local list holds the flights this thread is running; a call that
//!   would join one of them panics (it would wait for itself forever). A load nested in another
//!   load's loader does not wait for a second load permit (it would deadlock a full limit).
//! * **No user code under a shard lock** but the key's `Hash`/`Eq`, the `Expiry` callbacks, a
//!   hit's `Clone` and the key's `Clone` of a read that starts a refresh: loaders, weighers and
//!   values' clones for waiters run with no lock held.

use crate::answer::after_dropping;
use crate::cache::Registration;
use crate::cache::{Cache, Write};
use crate::flight::{
    accept_option, accept_result, accept_value, enter, outcome_of, recursive_load, runs_here,
    take_publish_cap, Flight, LoadFuture, Outcome, PermitHeld, Phase, Waited,
};
use crate::limit::Permit;
use crate::removal::Removals;
use crate::shard::Panic;
use crate::stats::Counter;
use crate::unwind::{drop_keeping_first, DropLater};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A shared async load and its start token (see [`Flight::start`]).
pub(crate) type SharedLoad<V> = (
    LoadFuture<V>,
    Arc<crate::sync::AtomicU8>,
    crate::load_async::TicketSlot,
);

/// How a caller claims a key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClaimMode {
    /// It may lead a new load (it still has its loader).
    pub(crate) can_lead: bool,
    /// A negative-cache entry does not answer it (it could not use that outcome).
    pub(crate) bypass_negative: bool,
    /// Count the lookup's hit or miss.
    pub(crate) record: bool,
    /// The caller has just looked the key up and missed: go straight to the locked claim
    /// (which looks it up again under the write lock), skipping the read-locked lookup.
    pub(crate) looked_up: bool,
    /// The caller found a value it wants replaced, or judges whatever it finds (`get_with_if`):
    /// claim a flight whatever the key holds (a present value does not answer it; a running
    /// flight, or a fail-safe answer within a failed key's backoff, still does).
    pub(crate) replace: bool,
    /// What this call's miss is counted as so far (see [`Class`]).
    pub(crate) class: Class,
    /// How many times a replacing caller claimed again because a write came before its
    /// second look (at most [`CLAIMS_AGAIN`]).
    pub(crate) claimed_again: u8,
}

/// How many times a replacing caller (`get_with_if`) claims again when a write lands before
/// its second look; after that, such a write is treated as one that lands while `init` runs
/// (it wins over the replacement). Bounded, so a steady stream of writes to the key cannot
/// keep the call (and its waiters) looking forever.
pub(crate) const CLAIMS_AGAIN: u8 = 2;

/// What a call's miss is counted as: counted as soon as it is known (a waiter shows in the
/// statistics while it waits), never taken back (the counters only grow). A later attempt —
/// the load the call led or joined ended with nothing for it — that leads a load or is
/// answered otherwise counts a new miss ([`Cache::reclass`]): every miss is exactly one load,
/// join or negative hit (see `CacheStats::misses`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Missed (counted), not classified yet.
    Owes,
    /// The lookup hit: nothing more to count.
    Hit,
    /// Counted as this: `Coalesced` (a join, an answer found without a load, a wait given up),
    /// `NegativeHit`, or `LoadAbandoned` (a spawned job dropped unrun, counted by its caller).
    Counted(Counter),
    /// A flight this call registered (or took over) counts it: one load, published, failed or
    /// abandoned.
    Flight,
}

/// A call's [`ClaimMode`]: a call that ends (returns, is cancelled, unwinds) with its miss
/// not classified yet — a panic in the key's `Hash` or `Eq` during a claim — counts it as
/// coalesced.
pub(crate) struct Settle<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    mode: ClaimMode,
}

impl<'a, K, V, S> Settle<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(cache: &'a Cache<K, V, S>, mode: ClaimMode) -> Self {
        Settle { cache, mode }
    }

    /// A leading call's ledger after `start` (see [`ClaimMode::starting`]). Made as soon as
    /// the miss is counted, before any user code runs (a borrowed key's `to_owned`, a key's
    /// `Clone`): a panic there still classifies the miss.
    pub(crate) fn starting(cache: &'a Cache<K, V, S>, start: Start) -> Self {
        Settle::new(cache, ClaimMode::starting(start))
    }
}

impl<K, V, S> std::ops::Deref for Settle<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    type Target = ClaimMode;
    fn deref(&self) -> &ClaimMode {
        &self.mode
    }
}

impl<K, V, S> std::ops::DerefMut for Settle<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn deref_mut(&mut self) -> &mut ClaimMode {
        &mut self.mode
    }
}

impl<K, V, S> Drop for Settle<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.mode.class == Class::Owes {
            self.cache.count(Counter::Coalesced);
        }
    }
}

/// How a blocking load's first claim starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Look the key up, counting the hit or miss.
    Lookup,
    /// The caller has just looked the key up and missed (counted): claim under the lock.
    Missed,
    /// The caller found a value it wants replaced (counted as a miss): claim a flight whatever
    /// the key holds, or wait for the one running and take its value.
    Replace,
}

impl ClaimMode {
    /// A caller that still has its loader.
    pub(crate) fn leading(bypass_negative: bool, record: bool) -> Self {
        ClaimMode {
            can_lead: true,
            bypass_negative,
            record,
            looked_up: false,
            replace: false,
            // A call that has missed owes its miss a class; one that looks up first owes
            // nothing until that lookup has missed (a hit whose value's `Clone` or key's `Eq`
            // panics counts no miss, so no join either).
            class: if record { Class::Hit } else { Class::Owes },
            claimed_again: 0,
        }
    }

    /// A leading caller's first claim after `start`; later rounds neither count nor skip
    /// the lookup (a replacing caller stays one: it saw a value it does not want).
    pub(crate) fn starting(start: Start) -> Self {
        ClaimMode {
            record: start == Start::Lookup,
            looked_up: start == Start::Missed,
            replace: start == Start::Replace,
            class: if start == Start::Lookup {
                Class::Hit
            } else {
                Class::Owes
            },
            ..ClaimMode::leading(false, false)
        }
    }

    /// For a caller with a `replace_if` (`get_with_if`): every claim in replace mode, so that
    /// no value it has not judged answers it — not one written since its first look missed,
    /// nor one found on a later round (after the load it waited for failed); what the key
    /// holds is judged when it leads ([`Cache::judge_again`]).
    pub(crate) fn judged(self, judged: bool) -> Self {
        ClaimMode {
            replace: self.replace || judged,
            ..self
        }
    }

    /// The claim of the next round.
    fn next_round(&mut self) {
        self.record = false;
        self.looked_up = false;
    }
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

/// What a replacing leader's second look ([`Cache::judge_again`]) decided.
pub(crate) enum Judged<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// A value written since the verdict was kept: the flight ended with it.
    Kept(Arc<Outcome<V>>),
    /// Load, with this lead.
    Load(Lead<K, V, S>),
    /// A write came before the look: the flight ended unloaded; claim again.
    Again,
}

/// Owns a flight this caller leads until it is resolved. Dropping it unresolved — a panic in
/// any user code between the claim and the publish, a cancelled future, a job a spawner
/// dropped without running it, a deadline passed waiting for a load permit — unregisters the
/// flight and releases its waiters to retry; a load's flight is counted as a failed load if
/// a panic drops it, else as an abandoned one (each flight counts one load, published or
/// not, exactly once: [`Flight::count_load`]). For a refresh, it also schedules the next
/// attempt after the refresh backoff.
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
    /// A load's flight (not a computation's): abandoned, it counts a failed load.
    load: bool,
    /// A spawned job's lead whose caller waits for it ([`Handoff`]): abandoned while the
    /// caller still waits, it is not counted (the caller loads itself, and that load counts).
    handoff: Option<Handoff>,
    /// This caller took the load over from a leader that waited for a permit
    /// ([`Flight::steal`]); the other leads of a flight taken over leave it to this one.
    taker: bool,
    /// A refresh whose load is not counted yet: a refresh counts in `refreshes_started` and,
    /// like every load, in one load column, so one that ends without running its loader (its
    /// job dropped or its spawner panicking, its future dropped) counts an abandoned load (a
    /// failed one if a panic drops it), keeping the statistics' balance. One taken over
    /// leaves that count to the caller that took it (a flight counts one load).
    refresh_load: bool,
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
            load: true,
            handoff: None,
            taker: false,
            refresh_load: false,
        }
    }

    /// A computation's lead (the entry API's `and_compute_with` & co.): not a load, so not
    /// counted as one if abandoned.
    pub(crate) fn computation(
        cache: &Cache<K, V, S>,
        hash: u64,
        flight: Arc<Flight<K, V>>,
    ) -> Self {
        let mut lead = Lead::new(cache, hash, flight);
        lead.load = false;
        lead
    }

    /// A lead that writes or removes the key, or publishes an outcome: the negative-cache
    /// entry its flight replaced (`State::displaced`) is not put back (a write, a removal or a
    /// new outcome ends it), but handed to the caller to drop once the flight is resolved.
    pub(crate) fn forget_negative(&mut self) -> Option<Arc<Flight<K, V>>> {
        self.flight().take_displaced()
    }

    /// The lead of a caller that took `flight` over ([`Flight::steal`] succeeded): it runs
    /// the load and publishes it; the leader it was taken from no longer ends it.
    pub(crate) fn taken(cache: &Cache<K, V, S>, hash: u64, flight: Arc<Flight<K, V>>) -> Self {
        let mut lead = Lead::new(cache, hash, flight);
        lead.taker = true;
        lead
    }

    /// A computation that took `flight`'s load over to give it up at once (its leader and
    /// waiters load again, each counted then). The leader left its miss to the flight: counted
    /// as an abandoned load (`loads_abandoned`: given up before it ended), but not a failed
    /// load for fail-safe (no backend was called).
    pub(crate) fn given_up(cache: &Cache<K, V, S>, hash: u64, flight: Arc<Flight<K, V>>) {
        if flight.count_load() {
            cache.count(Counter::LoadAbandoned);
        }
        let mut lead = Lead::taken(cache, hash, flight);
        lead.load = false;
    }

    /// Whether another caller took this lead's load over: then it, not this lead, publishes
    /// the outcome or abandons the flight.
    fn superseded_by_taker(&self) -> bool {
        !self.taker && self.flight.as_ref().is_some_and(|f| f.is_stolen())
    }

    /// A refresh's lead: abandoned, it retries after the refresh backoff.
    pub(crate) fn refresh(cache: &Cache<K, V, S>, hash: u64, flight: Arc<Flight<K, V>>) -> Self {
        Lead {
            cache: cache.clone(),
            hash,
            flight: Some(flight),
            refresh: true,
            load: false,
            handoff: None,
            taker: false,
            refresh_load: true,
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

    /// Abandons the flight as a failed load (a key `get_all`'s `load_missing` left out): its
    /// waiters load again.
    pub(crate) fn fail(mut self) {
        if std::mem::take(&mut self.load) && self.flight().count_load() {
            self.cache.count(Counter::LoadFailure);
        }
    }

    /// Ties this lead (a spawned job's) to its waiting caller (see [`Handoff`]).
    pub(crate) fn hand_off(&mut self, h: Handoff) {
        self.handoff = Some(h);
    }

    /// The flight, no longer guarded: the caller resolves it now.
    pub(crate) fn disarm(mut self) -> Arc<Flight<K, V>> {
        // The negative entry the flight replaced stays with it, for whoever ends it.
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
        // Unless this lead is the taker, nobody may take the load over from here on (or
        // somebody did: then the taker ends the flight).
        let taken = !self.taker && self.flight.as_ref().is_some_and(|f| !f.give_up());
        if taken {
            // A refresh taken over ends here, counted as not run (the load column it owes is
            // the taker's: a flight counts one load, whoever runs it).
            if self.refresh {
                self.cache.count(Counter::RefreshFailed);
            }
            return;
        }
        if let Some(flight) = self.flight.take() {
            // A spawned job's lead abandoned before its load was counted goes back to the
            // waiting caller (which loads itself); once counted (the loader ran, the store of
            // its value panicked), the caller is told that instead and loads nothing.
            let handed_back = match &self.handoff {
                Some(h) if self.load => h.abandoned(),
                Some(h) => {
                    h.lost();
                    false
                }
                None => false,
            };
            if (self.load || self.refresh_load) && !handed_back && flight.count_load() {
                // Unwinding: a panic of user code between the claim and the publish.
                self.cache.count(if std::thread::panicking() {
                    Counter::LoadFailure
                } else {
                    Counter::LoadAbandoned
                });
            }
            let retry = self.refresh.then(|| {
                self.cache.count(Counter::RefreshFailed);
                crate::clock::deadline(self.cache.now(), self.cache.inner.stampede.refresh_backoff)
            });
            // A failed load for fail-safe: a load's leader that panicked or was dropped —
            // unless it was a spawned job handed back unrun to its waiting caller, which loads
            // itself (its own load then counts); a refresh only if it panicked (a refresh job
            // dropped unrun, deferred or taken over called no backend), never a computation.
            // And any load or refresh whose read found the value invalidated (the Redis tier
            // read a tombstone its instance had missed): that value is no fallback once it
            // expires, whatever ended the load (round 89: an async refresh dropped after the
            // read left it to fail-safe).
            let failed_load = (self.load && !handed_back)
                || (self.refresh && std::thread::panicking())
                || flight.forgoes_fallback();
            // The negative entry the flight replaced goes back in its place (see `end_flight`).
            self.cache
                .end_flight(self.hash, &flight, retry, Phase::Abandoned, failed_load);
        }
    }
}

/// Who counts a spawned job's load if the job is dropped unrun: the caller that spawned it,
/// while it waits (it then loads itself, counted as its load), or the job's lead once the
/// caller has given up waiting (timed out). Either one, never both, never neither. A job whose
/// load ran (and was counted) but whose store panicked tells its waiting caller so
/// ([`Handoff::was_lost`]): the caller then ends with [`LoadError::Panicked`](crate::LoadError)
/// instead of loading a second time for one miss.
#[derive(Clone)]
pub(crate) struct Handoff(Arc<crate::sync::AtomicU8>);

const WAITING: u8 = 0;
const ABANDONED: u8 = 1;
const CALLER_GONE: u8 = 2;
const LOST: u8 = 3;

impl Handoff {
    pub(crate) fn new() -> Self {
        Handoff(Arc::new(crate::sync::AtomicU8::new(WAITING)))
    }

    /// The job's lead is abandoned: true if its caller still waits (the caller counts).
    fn abandoned(&self) -> bool {
        self.0
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The job's load ran and was counted, then its store panicked (the lead is abandoned): its
    /// caller, if it still waits, must not load again.
    fn lost(&self) {
        let _ = self
            .0
            .compare_exchange(WAITING, LOST, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the job's load ran and its store panicked (see [`lost`](Self::lost)).
    pub(crate) fn was_lost(&self) -> bool {
        self.0.load(Ordering::Acquire) == LOST
    }

    /// Whether the job's lead was dropped unrun while its caller waited, handing the load
    /// (and its count) back to that caller (see [`abandoned`](Self::abandoned)).
    pub(crate) fn was_handed_back(&self) -> bool {
        self.0.load(Ordering::Acquire) == ABANDONED
    }

    /// The caller gives up waiting: true if the job's lead was abandoned first (uncounted:
    /// the caller counts it).
    pub(crate) fn caller_gone(&self) -> bool {
        self.0
            .compare_exchange(WAITING, CALLER_GONE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    }
}

/// Why [`Cache::run_loader`] did not run a leader's loader.
pub(crate) enum NotRun<F> {
    /// A caller holding a permit took the load over while this one waited for a permit: the
    /// taker publishes. The loader comes back unrun.
    TakenOver(F),
    /// The caller's deadline passed while it waited for a permit.
    TimedOut,
}

/// A load permit taken for this thread, or none when the thread already holds one (a load
/// nested in another load's loader must not wait for a second permit: with a full limit it
/// would wait for itself).
pub(crate) struct LoadPermit(#[allow(dead_code)] Option<PermitHeld>);

impl LoadPermit {
    /// A permit just taken by this thread.
    pub(crate) fn held(p: Permit) -> Self {
        LoadPermit(Some(PermitHeld::enter(Arc::new(p))))
    }

    /// No permit (no limit, or one held already).
    pub(crate) fn none() -> Self {
        LoadPermit(None)
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// This cache's identity (its shared state's address), for a flight to know which cache's
    /// loads it runs in (see `flight::polled_parent`).
    pub(crate) fn owner(&self) -> usize {
        Arc::as_ptr(&self.inner) as *const () as usize
    }

    /// Whether this thread runs under one of this cache's load permits (see
    /// [`flight::holds_permit`](crate::flight::holds_permit)).
    pub(crate) fn holds_permit(&self) -> bool {
        crate::flight::holds_permit(self.inner.stampede.limiter.as_ref())
    }

    /// The innermost of this cache's load permits this thread runs under, and whether it is
    /// only lent to this thread's poll (see `flight::held_permit`).
    pub(crate) fn held_permit(&self) -> Option<(Arc<Permit>, bool)> {
        crate::flight::held_permit(self.inner.stampede.limiter.as_ref())
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

    /// Looks `key` up; on a miss registers a new flight (lead) or finds the running one (join),
    /// atomically under the shard's write lock.
    ///
    /// An async caller passes its future (moved into the flight if it leads); an async caller
    /// whose future is already gone (it went into a flight that was then abandoned) may only
    /// join or hit: `can_lead` is false and `Claim::Lost` says nothing is running.
    ///
    /// `how` is the caller's across rounds: the claim moves it to the next round and keeps
    /// its tally (one count per miss, whatever the number of rounds).
    pub(crate) fn claim<R>(
        &self,
        hash: u64,
        key: &K,
        hit: &impl Fn(&V) -> R,
        future: &mut Option<SharedLoad<V>>,
        how: &mut ClaimMode,
        usable: &dyn Fn(&Outcome<V>) -> bool,
    ) -> Claim<K, V, S, R> {
        let ClaimMode {
            can_lead,
            bypass_negative,
            record,
            looked_up,
            replace,
            class: _,
            claimed_again: _,
        } = *how;
        how.next_round();
        if !looked_up && !replace {
            if let Some(r) = self.read_with(key, hash, record, hit) {
                // A hit counted (nothing more to count), or a later round: this call missed
                // before, and is answered now.
                if record {
                    how.class = Class::Hit;
                } else {
                    self.reclass(how, Class::Counted(Counter::Coalesced));
                }
                return Claim::Hit(r);
            }
            if record {
                // The miss is counted: it owes a class from here on.
                how.class = Class::Owes;
            }
        }
        // Fail-safe: within a failed key's backoff its old value answers every caller, a
        // replacing one too (`fail_safe`'s "one retry per backoff").
        if let Some(r) = self.fail_safe_read(hash, key, hit) {
            self.reclass(how, Class::Counted(Counter::Coalesced));
            return Claim::Hit(r);
        }
        // This caller's load is a shared one (its future goes into the flight it registers).
        let shares = can_lead && future.is_some();
        // The key's clone (user code) comes before the lock.
        let owned = shares.then(|| key.clone());
        let f = match future {
            Some((_, token, _)) if can_lead => Flight::with_start(Arc::clone(token)),
            _ => Flight::blocking(),
        };
        let keep = || {
            if can_lead {
                if let Some((fut, _, ticket)) = future.take() {
                    f.set_shared_load(owned, hash, fut, ticket);
                }
            }
            // Registered for a caller that cannot lead: taken back.
            can_lead
        };
        let lookup: Option<&dyn Fn(&V) -> R> = if replace { None } else { Some(hit) };
        match self.register_flight(hash, key, &f, !bypass_negative, lookup, None, keep) {
            Registration::Hit(r) => {
                // A miss answered by a value another caller stored since: work saved, as a
                // join is.
                self.reclass(how, Class::Counted(Counter::Coalesced));
                Claim::Hit(r)
            }
            Registration::Running(running) => {
                if runs_here(running.id()) {
                    recursive_load();
                }
                match (running.negative_until(), running.done()) {
                    // A load in flight (or a failure being published: its waiters get it).
                    (0, _) | (_, None) => self.reclass(how, Class::Counted(Counter::Coalesced)),
                    // Counted only when it answers this caller: one that cannot use the
                    // remembered outcome (`get_with` over an error) loads instead.
                    (_, Some(o)) if usable(&o) => {
                        self.reclass(how, Class::Counted(Counter::NegativeHit));
                    }
                    (_, Some(_)) => {}
                }
                Claim::Join(running)
            }
            Registration::Registered(swept) => {
                // The flight counts this miss: its load, failed or abandoned.
                self.reclass(how, Class::Flight);
                if shares {
                    // A shared load is other callers' to join and poll from its registration
                    // on: no lead of this caller may end it while the swept registrations drop
                    // (user code), or a load another caller polled and published would be
                    // counted twice. If that drop panics, this caller leaves the load as its
                    // cancelled leader would: it goes on for the callers that joined it, or is
                    // cancelled (counted abandoned) if none did.
                    let f = swept
                        .drop_after(crate::load_async::LeaderInterest::new(self, hash, f))
                        .disarm();
                    Claim::Lead(Lead::new(self, hash, f))
                } else {
                    // A live negative entry this load replaced (it does not take negative
                    // answers: `get_with`) stays with the flight (`State::displaced`): put back
                    // if the load ends with nothing (abandoned, panicking).
                    Claim::Lead(swept.drop_after(Lead::new(self, hash, f)))
                }
            }
            Registration::Withdrawn => Claim::Lost,
        }
    }

    /// Classifies this call's miss as `new` in a claim round. A call already classified by an
    /// earlier attempt (it joined or led a load that ended with nothing for it) that now
    /// leads, or is answered otherwise, makes a new attempt: a new miss, then its class. A
    /// call that joins again, or is answered by a value after a join, stays one miss.
    pub(crate) fn reclass(&self, how: &mut ClaimMode, new: Class) {
        let old = std::mem::replace(&mut how.class, new);
        let again = match (old, new) {
            (Class::Owes | Class::Hit, _) => false,
            (Class::Counted(a), Class::Counted(b)) if a == b => return,
            (Class::Counted(_) | Class::Flight, _) => true,
        };
        if again {
            self.count(Counter::Miss);
        }
        if let Class::Counted(c) = new {
            self.count(c);
        }
    }

    /// The flight this call registered in this attempt ended without a load (a value it
    /// judged and kept, a spawned job dropped unrun after the call gave up): counted as `c`.
    pub(crate) fn settle_flight(&self, how: &mut ClaimMode, c: Counter) {
        how.class = Class::Counted(c);
        self.count(c);
    }

    /// [`settle_flight`](Self::settle_flight) with `flight`'s load, counted in `c` unless it
    /// was counted already ([`Flight::count_load`]).
    pub(crate) fn settle_load(&self, how: &mut ClaimMode, flight: &Flight<K, V>, c: Counter) {
        how.class = Class::Counted(c);
        if flight.count_load() {
            self.count(c);
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
        let (outcome, panic) = self.publish_deferred(lead, key, outcome, took);
        resume(panic);
        outcome
    }

    /// [`publish`](Self::publish), with the first panic of the eviction listener or of a
    /// removed value's `Drop` returned instead of resumed: for a caller that publishes several
    /// loads (`get_all`), which publishes them all before it resumes the panic.
    pub(crate) fn publish_deferred(
        &self,
        lead: Lead<K, V, S>,
        key: Option<K>,
        outcome: Outcome<V>,
        took: u64,
    ) -> (Arc<Outcome<V>>, Option<Panic>) {
        let (outcome, _, panic) = self.publish_as(lead, key, outcome, Some(took));
        (outcome, panic)
    }

    /// [`publish`](Self::publish)es a loaded value; returns whether it was stored (not if a
    /// write or invalidation of the key superseded the load), and the eviction listener's
    /// panic, if it panicked on what the store replaced or evicted: the caller resumes it once
    /// it has counted the outcome.
    pub(crate) fn publish_stored(
        &self,
        lead: Lead<K, V, S>,
        key: K,
        value: V,
        took: u64,
    ) -> (bool, Option<Panic>) {
        let (outcome, stored, mut panic) =
            self.publish_as(lead, Some(key), Outcome::Value(value), Some(took));
        // The last handle on the outcome drops its value (user code): a panic there is
        // returned too, for the caller to count the outcome first.
        drop_keeping_first(outcome, &mut panic);
        (stored, panic)
    }

    /// Publishes a computation's value ([`EntryRef::and_compute_with`](crate::EntryRef) and
    /// its kin) as [`publish`](Self::publish) does a load's, but not counted as a load (no
    /// load success, no load time for the statistics or the health monitor).
    pub(crate) fn publish_computed(
        &self,
        lead: Lead<K, V, S>,
        key: K,
        value: V,
    ) -> Arc<Outcome<V>> {
        let (outcome, _, panic) = self.publish_as(lead, Some(key), Outcome::Value(value), None);
        resume(panic);
        outcome
    }

    /// [`publish`](Self::publish); `took`: the load's duration, `None` for a computation.
    /// Also returns whether a value was stored, and the first panic of the eviction listener
    /// or of a removed value's `Drop` (on the values the store replaced or evicted, reported
    /// and dropped after the waiters are released), for the caller to resume.
    fn publish_as(
        &self,
        lead: Lead<K, V, S>,
        key: Option<K>,
        outcome: Outcome<V>,
        took: Option<u64>,
    ) -> (Arc<Outcome<V>>, bool, Option<Panic>) {
        let hash = lead.hash;
        if !lead.flight().is_running() || lead.superseded_by_taker() {
            // A shared load that another caller took over (and ended) while it waited for a
            // permit: nothing of it is published (a refresh's counts as failed).
            let refresh = lead.refresh;
            let flight = lead.disarm();
            if refresh {
                self.count(Counter::RefreshFailed);
            }
            let outcome = match &flight.state.lock().phase {
                Phase::Done(o) => Arc::clone(o),
                _ => Arc::new(outcome),
            };
            return (outcome, false, None);
        }
        let cap = take_publish_cap().map_or(crate::clock::NEVER, |n| {
            crate::clock::deadline(self.now(), n)
        });
        let mut lead = lead;
        // The negative entry the flight replaced is not put back (a value or a failure is
        // published in its place): dropped last, a panic of its error's `Drop` returned with
        // the others (as when the claim dropped it).
        let mut negative = DropLater(lead.forget_negative());
        if let Some(took) = took {
            // Counted here: if the store below panics, the lead is not counted again.
            lead.load = false;
            lead.refresh_load = false;
            if lead.flight().count_load() {
                let success = matches!(outcome, Outcome::Value(_));
                self.count(if success {
                    Counter::LoadSuccess
                } else {
                    Counter::LoadFailure
                });
                self.count_n(Counter::LoadNanos, took);
                let failed = matches!(outcome, Outcome::Error(_) | Outcome::Panicked);
                self.inner.stampede.monitor.load(took, failed);
            }
        }
        let took = took.unwrap_or(0);
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
        // the key's retry deadline set, while the flight is still registered). Counted as
        // served unless a spawned job publishes it with no caller left waiting (its caller
        // gave up at its soft timeout, answered and counted then): the registry and the job's
        // lead are then the flight's only holders.
        let mut outcome = outcome;
        let served = lead.handoff.is_none() || Arc::strong_count(lead.flight()) > 2;
        // The Redis tier read the key invalidated by another instance after the local copy
        // was made (a message this instance missed): that copy is no fallback.
        let forgo = lead.flight().forgoes_fallback();
        let fallback = match (&outcome, &failed_key) {
            (Outcome::Error(_) | Outcome::Panicked, Some(k)) if !forgo => {
                self.fail_safe_fallback_for(hash, k, lead.flight(), served)
            }
            _ => None,
        };
        // An `optionally_` load's `None` is the backend's answer: with fail-safe, the value
        // kept past its deadline goes (in `end_failed`, if no write came first); so does one
        // the Redis tier found invalidated.
        let gone = match (&outcome, &failed_key) {
            (Outcome::Nothing, Some(k)) if self.inner.stampede.fail_safe.is_some() => Some(k),
            (Outcome::Error(_) | Outcome::Panicked, Some(k))
                if forgo && self.inner.stampede.fail_safe.is_some() =>
            {
                Some(k)
            }
            _ => None,
        };
        let mut out = Removals::new();
        let mut stored = false;
        match staged {
            Some((key, value, weight)) => {
                let write = Write::Load(lead.flight());
                stored = self.reporting_panics(&mut out, |out| {
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
                self.end_failed(
                    hash,
                    lead.flight(),
                    // A zero time (`negative_ttl(Duration::ZERO)`) remembers nothing.
                    negative.filter(|&d| d > 0 && self.keeps_time()),
                    gone,
                    &mut out,
                );
                if let Some(v) = fallback {
                    outcome = Outcome::Value(v);
                }
            }
        }
        drop(failed_key);
        let refresh = lead.refresh;
        let flight = lead.disarm();
        // A refresh is counted before anyone wakes: a caller that joined it sees its count
        // once it has its value (one that lost to a write counts as failed).
        if refresh {
            self.count(if stored {
                Counter::RefreshSucceeded
            } else {
                Counter::RefreshFailed
            });
        }
        let outcome = Arc::new(outcome);
        flight.resolve(Phase::Done(Arc::clone(&outcome)));
        // Removed entries are reported (eviction listener) only after the waiters are
        // released: a panicking listener must not strand them. The removed values' `Drop`
        // (user code) may panic too: that panic is returned as the listener's is, so the
        // caller counts the outcome (a refresh that stored its value succeeded) first.
        let mut panic = self.report(&out);
        drop_keeping_first(out, &mut panic);
        drop_keeping_first(negative.take(), &mut panic);
        (outcome, stored, panic)
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
        if let Some(r) = self.read_with(&key, hash, true, &hit) {
            // The unused `init` and the key drop first (user code: see `answer`).
            return after_dropping((init, key), r);
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
        let how = Settle::starting(self, Start::Missed);
        self.load_blocking(key, hash, init, &hit, &accept, None, how, None)
            .expect("without a deadline a blocking load always ends with a result")
    }

    /// The blocking single-flight loop. `until` bounds the waits on loads run by others;
    /// `None` means it passed. `start`: what the caller already did (see [`Start`]).
    /// `judge`: a replacing caller's verdict, asked again when it leads (see
    /// [`judge_again`](Self::judge_again)).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_blocking<R>(
        &self,
        key: K,
        hash: u64,
        init: impl FnOnce() -> Outcome<V>,
        hit: &impl Fn(&V) -> R,
        accept: &impl Fn(&Outcome<V>) -> Option<R>,
        until: Option<Instant>,
        mut how: Settle<'_, K, V, S>,
        mut judge: Option<&mut dyn FnMut(&V) -> bool>,
    ) -> Option<R> {
        // The loop's locals (the key, `init`, flights, outcomes) drop at the end of the block
        // that holds them, after its answer is made: the answer waits outside it (see
        // `answer`). `None`: `until` passed.
        let answer: Option<R>;
        {
            let key = key;
            let mut init = Some(init);
            *how = how.judged(judge.is_some());
            loop {
                let claim = self.claim(hash, &key, hit, &mut None, &mut how, &|o| {
                    accept(o).is_some()
                });
                // The flight to wait for, unless the claim answered.
                let flight = match claim {
                    Claim::Hit(r) => {
                        answer = Some(r);
                        break;
                    }
                    Claim::Lost => unreachable!("a blocking caller can always lead"),
                    Claim::Lead(lead) => {
                        let lead =
                            match self.judge_again(lead, &key, judge.as_deref_mut(), &mut how) {
                                // Answered by a value another caller stored: no load (settled).
                                Judged::Kept(kept) => {
                                    answer = Some(accept(&kept).expect("a value"));
                                    break;
                                }
                                Judged::Load(lead) => lead,
                                // Superseded before the look: claim again.
                                Judged::Again => continue,
                            };
                        let f = init.take().expect("a caller leads at most once");
                        match self.run_loader(lead.flight(), f, true, until) {
                            Ok((outcome, took)) => {
                                let outcome = self.publish(lead, Some(key), outcome, took);
                                answer = Some(accept(&outcome).expect("a leader accepts its own"));
                                break;
                            }
                            // `until` passed while this caller waited for a permit: it gives up
                            // the lead before its loader ran (the flight is abandoned: its
                            // waiters retry, or with fail-safe get the old value) and returns
                            // timed out.
                            Err(NotRun::TimedOut) => {
                                drop(lead);
                                answer = None;
                                break;
                            }
                            // Taken over while this caller waited for a permit: wait for it (its
                            // load, run by the taker, counts this caller's miss).
                            Err(NotRun::TakenOver(f)) => {
                                init = Some(f);
                                lead.disarm()
                            }
                        }
                    }
                    Claim::Join(flight) => {
                        // A caller that holds a load permit (inside another load) must not wait
                        // for a leader that waits for a permit: it takes the load over.
                        if init.is_some() && self.holds_permit() && flight.steal() {
                            let lead = Lead::taken(self, hash, flight);
                            let f = init.take().expect("checked");
                            let Ok((outcome, took)) =
                                self.run_loader(lead.flight(), f, false, None)
                            else {
                                unreachable!("a load taken over is not started again")
                            };
                            let outcome = self.publish(lead, Some(key), outcome, took);
                            answer = Some(accept(&outcome).expect("a leader accepts its own"));
                            break;
                        }
                        flight
                    }
                };
                match self.wait_blocking(&flight, accept, until) {
                    Waited::Done(Some(r)) => {
                        answer = Some(r);
                        break;
                    }
                    // An outcome this caller cannot use (an error of another type, a negative
                    // entry for a caller without an error channel): load itself.
                    Waited::Done(None) => how.bypass_negative = true,
                    Waited::Abandoned => {}
                    Waited::TimedOut => {
                        answer = None;
                        break;
                    }
                }
            }
        }
        answer
    }

    /// A replacing leader (`get_with_if`) looks at what the key holds once its flight is
    /// registered: a value written since its verdict is judged by `judge` (as moka's leader
    /// looks again). Kept, the flight ends with that value — its waiters take it if it is
    /// still live when the flight ends, else look again ([`end_kept`](Self::end_kept)) — and
    /// nothing is loaded or stored; otherwise the lead is handed back to load
    /// ([`Judged::Load`]). A write from the registration on supersedes the load; one that
    /// came *before the look* (the value judged may be its own, or its removal) ends the
    /// flight unloaded, and the caller claims again ([`Judged::Again`]; at most
    /// [`CLAIMS_AGAIN`] times, then it loads and the write wins): its replacement must replace
    /// what it judged. If `judge` panics, the lead is dropped (abandoned: its waiters load
    /// again); if it loads this key, it panics (recursion). A leader whose load a nested caller
    /// took over meanwhile leaves the flight to that caller, who loads (and whose load counts
    /// the leader's miss), whether it kept a value or a write superseded the flight.
    /// Without a `judge` (every caller but `get_with_if`'s) the lead is handed back at once.
    ///
    /// Kept, the caller's miss is settled (as coalesced) here, before the flight ends: ending
    /// it drops the registered key, whose `Drop` (user code) may panic.
    pub(crate) fn judge_again<J: FnMut(&V) -> bool + ?Sized>(
        &self,
        lead: Lead<K, V, S>,
        key: &K,
        judge: Option<&mut J>,
        how: &mut ClaimMode,
    ) -> Judged<K, V, S> {
        let Some(judge) = judge else {
            return Judged::Load(lead);
        };
        let hash = lead.hash();
        let mut keep = |v: &V| {
            // Marked as this thread's load while `judge` runs: a `judge` that loads this same
            // key panics (recursion) instead of waiting for itself.
            let _running = enter(lead.flight());
            !judge(v)
        };
        match self.read_judged(key, hash, &mut keep) {
            Some((v, true)) => {
                let kept = Arc::new(Outcome::Value(v));
                // A caller nested in a load (under `max_concurrent_loads`) may have taken
                // this lead's load over while `judge` ran: that load goes on, its taker
                // publishes it, and it counts this caller's miss, as a flight's load does;
                // this caller answers with what it kept. Otherwise nobody takes it over from
                // here on, and the flight ends here.
                if !lead.flight().give_up() {
                    drop(lead); // taken over: its drop leaves the flight to the taker
                    return Judged::Kept(kept);
                }
                let flight = lead.disarm();
                self.settle_flight(how, Counter::Coalesced);
                self.end_kept(hash, key, &flight, Arc::clone(&kept));
                Judged::Kept(kept)
            }
            rejected => {
                // The rejected value's copy is dropped while `lead` is still a local: were it
                // dropped after the return value was built, a panic of its `Drop` would leak
                // the returned lead (rust-lang/rust#47949) and the flight with it.
                drop(rejected);
                if lead.flight().is_superseded() && how.claimed_again < CLAIMS_AGAIN {
                    // A write since the claim: `judge` may have rejected *its* value (or seen
                    // it removed), and this load would not replace it (a write wins over a
                    // load that began before it). The flight ends unloaded and uncounted (its
                    // waiters claim again); the caller claims again, after that write.
                    how.claimed_again += 1;
                    if !lead.flight().give_up() {
                        // A caller nested in a load took the load over meanwhile: it goes on
                        // with it and publishes it (not stored: the write detached the
                        // flight), and that load counts this caller's miss, as a flight's
                        // load does; the next claim is a new miss (round 100: ending the
                        // flight here left the taker's load uncounted, or — had it published
                        // first — counted this miss twice).
                        drop(lead); // taken over: its drop leaves the flight to the taker
                        return Judged::Again;
                    }
                    let flight = lead.disarm();
                    // The call's miss is still owed (counted, not classified): the next claim
                    // classifies it, not as a new miss.
                    how.class = Class::Owes;
                    self.end_flight(hash, &flight, None, Phase::Abandoned, false);
                    return Judged::Again;
                }
                Judged::Load(lead)
            }
        }
    }

    /// Takes a load permit for this thread, if the cache limits loads and the thread holds
    /// none yet.
    pub(crate) fn load_permit(&self) -> LoadPermit {
        self.load_permit_until(None)
            .expect("a wait without a deadline ends with a permit")
    }

    /// [`load_permit`](Self::load_permit), waiting no later than `until`: `None` when it
    /// passed first (the place in the queue is given up; nothing is held).
    pub(crate) fn load_permit_until(&self, until: Option<Instant>) -> Option<LoadPermit> {
        match &self.inner.stampede.limiter {
            Some(l) if !self.holds_permit() => l.acquire_until(until).map(LoadPermit::held),
            _ => Some(LoadPermit::none()),
        }
    }

    /// Runs a blocking leader's loader under a load permit (if limited), registered as run by
    /// this thread (recursion); returns the outcome and the load's duration. A panic of the
    /// loader propagates (the caller's [`Lead`] abandons the flight).
    ///
    /// With `start` (a leader that claimed the key, as opposed to one that took a load over),
    /// the load starts only if no caller took it over while this one waited for a permit (else
    /// [`NotRun::TakenOver`] gives `init` back unrun: the taker publishes); and the wait for the
    /// permit ends at `until`: past it, the leader claims the start (so nobody takes the load
    /// over any more) and returns [`NotRun::TimedOut`] without running `init`; the caller then
    /// drops its [`Lead`], which abandons the flight (its waiters retry; with fail-safe, they
    /// get the old value for a backoff).
    pub(crate) fn run_loader<F: FnOnce() -> Outcome<V>>(
        &self,
        flight: &Arc<Flight<K, V>>,
        init: F,
        start: bool,
        until: Option<Instant>,
    ) -> Result<(Outcome<V>, u64), NotRun<F>> {
        // A load taken over runs under the taker's permit: it never waits, so never times out.
        let permit = self.load_permit_until(until.filter(|_| start));
        if start && !flight.start() {
            return Err(NotRun::TakenOver(init));
        }
        let Some(permit) = permit else {
            return Err(NotRun::TimedOut);
        };
        let running = enter(flight);
        let timed = Timed::start(self);
        let outcome = init();
        let took = timed.stop();
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
        let held = self.held_permit();
        // A poll running under a lent permit that blocks here is not running while it waits:
        // the load it waits for may be polled under that permit meanwhile (else, a lent permit
        // running one poll at a time, it could not be).
        let paused = held.as_ref().filter(|(_, lent)| *lent).map(|(p, _)| {
            p.end_lent_poll();
            Arc::clone(p)
        });
        let waited = flight.wait_blocking(until, held.map(|(p, _)| p));
        if let Some(p) = paused {
            p.resume_lent_poll();
        }
        match waited {
            // The outcome's `Drop` (maybe the last holder of the value: user code) first.
            Waited::Done(Some(o)) => {
                let r = accept(&o);
                after_dropping(o, Waited::Done(r))
            }
            Waited::Done(None) => Waited::Done(None),
            Waited::Abandoned => Waited::Abandoned,
            Waited::TimedOut => Waited::TimedOut,
        }
    }
}

/// Times a leader's own `init` while it runs; if `init` unwinds, the time it ran counts as
/// load time and the load as failed in the health monitor (as a shared loader's panic, caught
/// and published, is by [`publish`](Cache::publish)); the failed load itself is counted when
/// the panic drops the lead (see [`Lead`]).
pub(crate) struct Timed<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    start: u64,
}

impl<'a, K, V, S> Timed<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) fn start(cache: &'a Cache<K, V, S>) -> Self {
        Timed {
            cache,
            start: cache.stopwatch(),
        }
    }

    /// Resumes the timing of a load started at `start` (an async load, timed across polls).
    pub(crate) fn since(cache: &'a Cache<K, V, S>, start: u64) -> Self {
        Timed { cache, start }
    }

    /// The nanoseconds since the start (the load returned).
    pub(crate) fn stop(self) -> u64 {
        let took = self.cache.stopwatch().saturating_sub(self.start);
        std::mem::forget(self);
        took
    }
}

impl<K, V, S> Drop for Timed<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // Dropped without `stop`: `init` unwound (an async one may also be dropped mid-poll
        // by its cancellation, which is not a failure: only a panic is counted).
        if std::thread::panicking() {
            let took = self.cache.stopwatch().saturating_sub(self.start);
            self.cache.count_n(Counter::LoadNanos, took);
            self.cache.inner.stampede.monitor.load(took, true);
        }
    }
}

/// Resumes a deferred panic, if any.
fn resume(panic: Option<Panic>) {
    if let Some(p) = panic {
        std::panic::resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DefaultHashBuilder;

    fn loads(c: &Cache<u64, u64>) -> (u64, u64, u64) {
        let s = c.stats();
        (s.load_successes, s.load_failures, s.loads_abandoned)
    }

    /// Two owners of one flight's load — a bug of the kind `attack_s66` found (a lead left
    /// armed while another caller published the load) — count it once: the first to end it
    /// counts it, in its column; the second's end is a no-op for the statistics. Without
    /// [`Flight::count_load`] each case counts two loads.
    #[test]
    fn a_flight_counts_its_load_once_whoever_ends_it() {
        type Ending = fn(&Cache<u64, u64>, Lead<u64, u64, DefaultHashBuilder>);
        let publish: Ending = |c, lead| {
            c.publish(lead, None, Outcome::Value(7), 1);
        };
        let fail: Ending = |_, lead| lead.fail();
        let abandon: Ending = |_, lead| drop(lead);
        let panic: Ending = |_, lead| {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _lead = lead;
                panic!("injected");
            }));
        };
        let endings = [
            ("publish", publish, (1, 0, 0)),
            ("fail", fail, (0, 1, 0)),
            ("abandon", abandon, (0, 0, 1)),
            ("panic", panic, (0, 1, 0)),
        ];
        for (first, end_first, counted) in endings {
            for (second, end_second, _) in endings {
                let c: Cache<u64, u64> = Cache::builder().max_capacity(10).record_stats().build();
                let hash = c.hash(&1);
                let flight = Flight::blocking();
                let a = Lead::new(&c, hash, Arc::clone(&flight));
                let b = Lead::new(&c, hash, flight);
                end_first(&c, a);
                end_second(&c, b);
                assert_eq!(loads(&c), counted, "{first} then {second}");
            }
        }
    }
}
