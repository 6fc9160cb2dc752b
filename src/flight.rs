//! A *flight*: one load of one key, and the callers waiting for it.
//!
//! This module holds the flight's data and how it ends; it knows nothing of shards or caches.
//! The single-flight protocol that registers flights in a shard and publishes their values
//! lives in [`crate::load`].
//!
//! ```text
//!   Running ──► Done(outcome)      the load ended: every waiter gets the same Arc'd outcome
//!      │
//!      └─────► Abandoned           nobody will finish it (a panic, a cancellation, a job the
//!                                  spawner dropped): waiters retry, one of them leads anew
//! ```
//!
//! * A flight is resolved exactly once; every exit of the code that leads it resolves it
//!   through a guard (`load::Lead`), never through code after a user call.
//! * Waiters read the outcome as an `Arc` under the flight's mutex and clone the value *after*
//!   releasing it: a value's `Clone` never runs under a lock of ours.
//! * An async flight holds its load as a shared future that any *async* waiter may poll.
//!   Blocking waiters never poll it (a future may need its own runtime): they wait, and when
//!   the last async caller goes away the load is cancelled and they lead with their own loader.

use crate::limit::{Limiter, Permit};
use crate::sync::{wait_until, AtomicBool, AtomicU64, AtomicU8, Condvar, Mutex};
use hashbrown::HashTable;
use std::any::Any;
use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Wake, Waker};
use std::time::Instant;

/// What a load produced.
pub(crate) enum Outcome<V> {
    Value(V),
    Error(Arc<dyn Any + Send + Sync>),
    /// The loader found nothing (`optionally_` loads).
    Nothing,
    /// The loader panicked (the panic itself went to the caller that ran it).
    Panicked,
}

/// An async load: its outcome and how long it took (nanoseconds on the cache's clock).
pub(crate) type LoadFuture<V> = Pin<Box<dyn Future<Output = (Outcome<V>, u64)> + Send>>;

pub(crate) enum Phase<V> {
    Running,
    Done(Arc<Outcome<V>>),
    Abandoned,
}

pub(crate) struct State<K, V> {
    pub(crate) phase: Phase<V>,
    /// The key, owned, for whoever publishes an async load's value (a sync leader keeps its
    /// own).
    pub(crate) key: Option<K>,
    /// The key's hash, set with `key` (for a caller that drives this load without the key:
    /// see `Wait::drive_under_permit`; no user code runs to get it under this lock).
    pub(crate) hash: u64,
    /// The shared load of an async flight; `None` while being polled, and for sync flights.
    pub(crate) future: Option<LoadFuture<V>>,
    pub(crate) polling: bool,
    /// The shared load woke its waker while being polled: a caller that joined during that
    /// poll (and found it being polled) missed the wake-up, so the poller wakes every caller
    /// once its poll returns pending.
    pub(crate) woken: bool,
    /// Async callers waiting on (or driving) this flight; when it drops to zero the shared
    /// load is cancelled. Blocking waiters are not counted: they never drive a future.
    pub(crate) interested: usize,
    pub(crate) wakers: Vec<(u64, Waker)>,
    pub(crate) next_id: u64,
    /// Load permits lent to the shared load by blocking callers that hold one and wait for
    /// this flight (see [`Flight::wait_blocking`]): a poll by a thread with no permit of its
    /// own runs under one of them.
    pub(crate) lenders: Vec<Arc<Permit>>,
    /// The permits of `lenders` that polls run under now, one entry per poll (see
    /// [`LentPoll`]): this load's own polls, and polls of the loads it is nested in.
    pub(crate) lent_polls: Vec<Arc<Permit>>,
    /// The shared loads whose polls this flight's async waiters wait in (waiter id, that
    /// load's flight): a load nested in another one is driven by that one's polls only.
    pub(crate) parents: Vec<(u64, Weak<Flight<K, V>>)>,
    /// Flights with waiters inside this load's polls (see `parents`; stale entries are
    /// skipped and pruned): a permit lent to one of them may run this load's poll, which
    /// drives it (see [`Flight::lender_below`]).
    pub(crate) children: Vec<Weak<Flight<K, V>>>,
    /// A shared load's place in the permit queue (see [`TicketSlot`](crate::load_async::TicketSlot)).
    pub(crate) ticket: Option<crate::load_async::TicketSlot>,
    /// The shared load whose polls drive this flight's load, taken over inside one of them
    /// (see [`Flight::driven_by`]).
    pub(crate) driver: Option<Weak<Flight<K, V>>>,
    /// The live negative-cache entry of the key that this flight replaced when it was
    /// registered (by a caller that does not take negative answers: a computation, a
    /// `get_with`), set in the registration's critical section. It belongs to the flight, not
    /// to whoever leads it (a load may be taken over, or polled and cancelled by any caller of
    /// a shared load): whoever ends the flight with nothing puts it back
    /// (`Cache::end_flight`, `Cache::cancel_shared`); a published outcome, a computation's
    /// write or removal, or a kept value ends it.
    pub(crate) displaced: Option<Arc<Flight<K, V>>>,
}

impl<K, V> State<K, V> {
    /// The shared load's claim to a permit (its place in the queue, or its own permit), to give
    /// up (by dropping it, with no lock held) once every async caller still waiting for the
    /// load waits inside another load's polls: those polls run under that load's permit and
    /// drive this one. A permit granted to this load would wait, uncollected, for that load's
    /// own (a deadlock that `attack_s44`'s sweep found with a limit of 1); a permit it kept
    /// would keep that load queued while only that load's polls drive this one (shuttle's
    /// `nested_loads_under_a_limit` found it; `attack_s44`'s sweep hung on it
    /// under AddressSanitizer).
    pub(crate) fn orphaned_ticket(&mut self) -> Option<crate::load_async::PermitClaim> {
        let nested_only = !self.wakers.is_empty()
            && self
                .wakers
                .iter()
                .all(|(id, _)| self.parents.iter().any(|(i, _)| i == id));
        if !nested_only || !matches!(self.phase, Phase::Running) {
            return None;
        }
        self.ticket
            .as_ref()
            .map(|t| std::mem::replace(&mut *t.lock(), crate::load_async::PermitClaim::Idle))
    }

    /// Registers an async caller (`id`, `None` until its first registration, which counts
    /// its interest) with `waker`, keeping a registered caller's waker up to date, and notes
    /// `parent`, the shared load whose poll it waits in, if any. Returns its id.
    pub(crate) fn register(
        &mut self,
        id: &mut Option<u64>,
        waker: &Waker,
        parent: Option<&Weak<Flight<K, V>>>,
    ) -> u64 {
        let me = match *id {
            None => {
                let me = self.next_id;
                self.next_id += 1;
                self.interested += 1;
                self.wakers.push((me, waker.clone()));
                *id = Some(me);
                me
            }
            Some(me) => {
                if let Some((_, w)) = self.wakers.iter_mut().find(|(i, _)| *i == me) {
                    if !w.will_wake(waker) {
                        *w = waker.clone();
                    }
                } else {
                    self.wakers.push((me, waker.clone()));
                }
                me
            }
        };
        self.parents.retain(|(i, _)| *i != me);
        if let Some(p) = parent {
            self.parents.push((me, p.clone()));
        }
        me
    }

    /// A permit of `lenders` for a poll about to run (the newest free one; see
    /// [`Permit::begin_lent_poll`], which registers `waker` with a busy one), entered in
    /// `lent_polls` until the poll's [`LentPoll`] drops.
    pub(crate) fn take_lent(&mut self, waker: &Waker) -> Option<Arc<Permit>> {
        let p = self
            .lenders
            .iter()
            .rev()
            .find(|p| p.begin_lent_poll(waker))
            .cloned()?;
        self.lent_polls.push(Arc::clone(&p));
        Some(p)
    }
}

/// Drops `v`, whose `Drop` is user code (a key, a shared load's future), then runs `then`
/// whatever that `Drop` did: what must happen after the drop (a flight resolved, its callers
/// woken) happens even if it panics. Its panic goes on after `then`; while another panic
/// already unwinds, it is dropped (a second panic would abort the process).
pub(crate) fn drop_then<T, R>(v: T, then: impl FnOnce() -> R) -> R {
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(v)));
    let r = then();
    if let Err(p) = dropped {
        if std::thread::panicking() {
            crate::unwind::discard(p);
        } else {
            std::panic::resume_unwind(p);
        }
    }
    r
}

/// A permit lent by a blocking caller waiting for a flight: that flight, and the permit.
pub(crate) type Lent<K, V> = (Arc<Flight<K, V>>, Arc<Permit>);

/// One in-flight load of one key.
pub(crate) struct Flight<K, V> {
    pub(crate) state: Mutex<State<K, V>>,
    cond: Condvar,
    /// Set (under the shard lock) when a write or invalidation of the key detached this flight
    /// from the shard's registry: its result then goes to the callers already waiting on it but
    /// is not cached, and later callers do not join it.
    superseded: AtomicBool,
    /// Set by the Redis tier when the read before the load found the key invalidated in Redis
    /// (a tombstone, or a value from before an `invalidate_all`): the local copy is from before
    /// that invalidation, so a failure of this load neither falls back on it (fail-safe) nor
    /// keeps it.
    forgo_fallback: AtomicBool,
    /// Nonzero for a failed load kept registered as a negative-cache entry: its outcome is
    /// served to callers until this deadline. Read and written under the shard lock.
    negative_until: AtomicU64,
    /// Whether the leader has started its load ([`WAITING`], [`STARTED`]) or a caller that
    /// holds a load permit took it over while the leader waited for one ([`STOLEN`]).
    start: Arc<AtomicU8>,
    /// A computation's flight ([`Flight::computation`]), not a load's.
    computes: bool,
    /// Whether this flight's load has been counted in the statistics (one of
    /// `load_successes`, `load_failures`, `loads_abandoned`): see [`count_load`](Self::count_load).
    counted: AtomicBool,
}

/// A flight's leader has not started its load yet (it may be waiting for a load permit).
pub(crate) const WAITING: u8 = 0;
/// The leader started its load.
pub(crate) const STARTED: u8 = 1;
/// A caller holding a load permit took the load over (see [`Flight::steal`]).
pub(crate) const STOLEN: u8 = 2;
/// The leader gave the load up before it started ([`Flight::give_up`]): nobody may take it
/// over any more.
pub(crate) const RETIRED: u8 = 3;

impl<K, V> Flight<K, V> {
    /// A blocking flight: its leader runs the loader itself.
    pub(crate) fn blocking() -> Arc<Self> {
        Self::with_start(Arc::new(AtomicU8::new(WAITING)))
    }

    /// A computation's flight (`and_compute_with` & co.): callers loading the key join it as
    /// a load, but it loads nothing, so fail-safe does not count it as a retry of a failed
    /// load (see [`Flights::running_computes`]).
    pub(crate) fn computation() -> Arc<Self> {
        Self::new(Arc::new(AtomicU8::new(WAITING)), true)
    }

    /// A flight whose start token is `start`: a shared load's, which starts itself (see
    /// [`start`]).
    pub(crate) fn with_start(start: Arc<AtomicU8>) -> Arc<Self> {
        Self::new(start, false)
    }

    fn new(start: Arc<AtomicU8>, computes: bool) -> Arc<Self> {
        Arc::new(Flight {
            state: Mutex::new(State {
                phase: Phase::Running,
                key: None,
                hash: 0,
                future: None,
                polling: false,
                woken: false,
                interested: 0,
                wakers: Vec::new(),
                next_id: 0,
                lenders: Vec::new(),
                lent_polls: Vec::new(),
                parents: Vec::new(),
                children: Vec::new(),
                ticket: None,
                driver: None,
                displaced: None,
            }),
            cond: Condvar::new(),
            superseded: AtomicBool::new(false),
            forgo_fallback: AtomicBool::new(false),
            counted: AtomicBool::new(false),
            negative_until: AtomicU64::new(0),
            start,
            computes,
        })
    }

    /// The leader begins its load (after taking a load permit, if limited): false if a caller
    /// that holds a permit took the load over meanwhile — the leader then waits for it, like
    /// any other caller.
    pub(crate) fn start(&self) -> bool {
        start(&self.start)
    }

    /// A caller that holds a load permit and would wait for this flight takes its load over if
    /// the leader has not started (it is waiting for a permit, which this caller's wait could
    /// keep from it forever): the caller runs its own loader under its own permit and publishes
    /// through this flight.
    pub(crate) fn steal(&self) -> bool {
        self.start
            .compare_exchange(WAITING, STOLEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// [`steal`](Self::steal) for an async caller: only a load that its leader drives itself
    /// (a blocking leader, or an async one with a borrowing `init`). A shared load is not taken
    /// over: the caller joins it and polls it under its own permit instead. Taken over, the
    /// load would move into this caller's future — which may be nested in another shared load
    /// polled only under a permit it was lent, and queued for one of its own once its lender
    /// goes: the flight's other waiters, the permit holder among them, could then no longer
    /// reach the load (a deadlock `attack_s44` found under a limit of 1).
    pub(crate) fn steal_unshared(&self) -> bool {
        {
            let st = self.state.lock();
            if st.future.is_some() || st.polling {
                return false;
            }
        }
        self.steal()
    }

    /// The leader's side of [`steal`](Self::steal): before it ends a flight it has not started
    /// (dropped, cancelled), it makes sure nobody takes the load over meanwhile — or finds
    /// that somebody did, and returns false: the taker ends the flight.
    pub(crate) fn give_up(&self) -> bool {
        match self
            .start
            .compare_exchange(WAITING, RETIRED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now != STOLEN,
        }
    }

    /// Whether the flight's load has not started and is not a shared one: its leader (blocking,
    /// or an async one driving its own load) may be waiting for a load permit, and only it can
    /// start the load.
    pub(crate) fn awaits_permit(&self) -> bool {
        if self.start.load(Ordering::Acquire) != WAITING {
            return false;
        }
        let st = self.state.lock();
        st.future.is_none() && !st.polling && matches!(st.phase, Phase::Running)
    }

    /// Whether a caller took this flight's load over ([`steal`](Self::steal)).
    pub(crate) fn is_stolen(&self) -> bool {
        self.start.load(Ordering::Acquire) == STOLEN
    }

    /// Whether the leader gave this flight up before its load started
    /// ([`give_up`](Self::give_up)): it ends at once, with nothing, or with a value the leader
    /// kept.
    pub(crate) fn is_given_up(&self) -> bool {
        self.start.load(Ordering::Acquire) == RETIRED
    }

    /// Makes this (just registered) flight an async one: its load is `future`, shared by the
    /// async callers, and `key` is the key its publisher stores under. The leader that
    /// registered it is interested from here on, as waiter [`LEADER`]: a caller that joins,
    /// drives the load and goes away before the leader's first wait cannot cancel the load
    /// under it (its `init` gone into the load, the leader could not load again).
    pub(crate) fn set_shared_load(
        &self,
        key: Option<K>,
        hash: u64,
        future: LoadFuture<V>,
        ticket: crate::load_async::TicketSlot,
    ) {
        let mut st = self.state.lock();
        st.key = key;
        st.hash = hash;
        st.future = Some(future);
        st.ticket = Some(ticket);
        st.interested += 1;
        st.next_id = st.next_id.max(LEADER + 1);
    }

    /// Takes the negative-cache entry this flight replaced (see [`State::displaced`]).
    pub(crate) fn take_displaced(&self) -> Option<Arc<Flight<K, V>>> {
        self.state.lock().displaced.take()
    }

    /// The negative-cache deadline of a failed load kept registered (0: not one).
    pub(crate) fn negative_until(&self) -> u64 {
        self.negative_until.load(Ordering::Acquire)
    }

    /// Keeps the flight's failed outcome registered until `until` (called under the shard lock).
    pub(crate) fn set_negative_until(&self, until: u64) {
        self.negative_until.store(until.max(1), Ordering::Release);
    }

    /// Marks the flight superseded: it was detached from the registry by a write.
    pub(crate) fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    /// Whether a write or invalidation detached the flight from the registry.
    #[allow(dead_code)] // read by the second tier (feature `redis`) and tests
    pub(crate) fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// Claims the right to count this flight's load: true the first time, false after. A
    /// flight counts one load, in one column, whoever ends it (its leader publishing, a lead
    /// dropped by a panic or a cancellation, a caller taking a shared load over or driving it,
    /// a cancelled shared load, a refresh deferred or failed, a caller whose spawned job was
    /// dropped). Each of those paths decides by its own state that it is the one to count;
    /// this makes the decision exactly-once whatever that state says: a second owner (stop 49
    /// found one, `attack_s66`) leaves the statistics' balance intact instead of counting
    /// the load twice.
    pub(crate) fn count_load(&self) -> bool {
        !self.counted.swap(true, Ordering::AcqRel)
    }

    /// Whether a failure of this load must not fall back on the key's old value (see
    /// [`running_forgo_fallback`]).
    pub(crate) fn forgoes_fallback(&self) -> bool {
        self.forgo_fallback.load(Ordering::Acquire)
    }

    pub(crate) fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as *const () as usize
    }

    /// The outcome, if the flight has ended with one.
    pub(crate) fn done(&self) -> Option<Arc<Outcome<V>>> {
        match &self.state.lock().phase {
            Phase::Done(o) => Some(Arc::clone(o)),
            _ => None,
        }
    }

    /// Whether the flight is still running.
    pub(crate) fn is_running(&self) -> bool {
        matches!(self.state.lock().phase, Phase::Running)
    }

    /// Resolves the flight (if still running) and wakes everyone; returns whether it did.
    /// Wakers run after the lock is released.
    pub(crate) fn resolve(&self, phase: Phase<V>) -> bool {
        let (wakers, old) = {
            let mut st = self.state.lock();
            if !matches!(st.phase, Phase::Running) {
                return false;
            }
            st.phase = phase;
            let future = st.future.take();
            (std::mem::take(&mut st.wakers), future)
        };
        // A shared future, dropped with no lock held and before anyone wakes: one that never
        // started gives its caller's `init` back first (`load_async_core`). Its `Drop` is user
        // code: everyone is woken whatever it does.
        drop_then(old, || self.wake_all(wakers));
        true
    }

    /// Wakes every caller: the blocking ones, and the async ones whose `wakers` were taken
    /// when the flight ended.
    pub(crate) fn wake_all(&self, wakers: Vec<(u64, Waker)>) {
        self.cond.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// Waits (blocking, never polling) until the flight ends or `until` passes.
    pub(crate) fn wait_blocking(
        &self,
        until: Option<Instant>,
        lent: Option<Arc<Permit>>,
    ) -> Waited<Arc<Outcome<V>>> {
        // A caller that holds a load permit (inside another load) lends it to this flight's
        // shared load while it blocks here: it waits for that load, so nothing else runs under
        // its permit meanwhile, and the load, if it waits for a permit, would otherwise wait
        // behind this very one. The async callers are woken so that one of them polls it.
        if let Some(p) = &lent {
            let wakers: Vec<Waker> = {
                let mut st = self.state.lock();
                st.lenders.push(Arc::clone(p));
                if st.polling {
                    st.woken = true;
                }
                st.wakers.iter().map(|(_, w)| w.clone()).collect()
            };
            for w in wakers {
                w.wake();
            }
        }
        let mut st = self.state.lock();
        let waited = loop {
            match &st.phase {
                Phase::Done(o) => break Waited::Done(Some(Arc::clone(o))),
                Phase::Abandoned => break Waited::Abandoned,
                Phase::Running => {}
            }
            let timed_out;
            (st, timed_out) = wait_until(&self.cond, st, until);
            if timed_out && matches!(st.phase, Phase::Running) {
                break Waited::TimedOut;
            }
        };
        if let Some(p) = lent {
            if let Some(i) = st.lenders.iter().position(|x| Arc::ptr_eq(x, &p)) {
                st.lenders.swap_remove(i);
            }
            // A poll running under our permit ends before we go on (timed out, say): we would
            // run beside it under one permit.
            while st.lent_polls.iter().any(|x| Arc::ptr_eq(x, &p)) {
                (st, _) = wait_until(&self.cond, st, None);
            }
        }
        waited
    }

    /// This flight's load was taken over by a caller inside `parent`'s poll: `parent`'s polls
    /// drive it, as they drive a nested waiter's wait. Recorded as such a waiter would be (with
    /// the id [`TAKER`], and `parent`'s `waker`), so that a blocking caller that lends its
    /// permit to this flight wakes `parent`'s callers and its permit may run `parent`'s polls
    /// (see [`Flight::lender_below`]), and as its `driver`, which an async caller holding a
    /// permit polls under it (see `load_async::Wait`): else, holding the only permit, either
    /// would wait for a load whose parent queues for a permit behind it (shuttle's
    /// `nested_loads_with_blocking_callers_under_a_limit` found both deadlocks).
    pub(crate) fn driven_by(self: &Arc<Self>, parent: &Arc<Flight<K, V>>, waker: Waker) {
        parent.add_child(self);
        let waiting: Vec<Waker> = {
            let mut st = self.state.lock();
            st.parents.push((TAKER, Arc::downgrade(parent)));
            let waiting = st.wakers.iter().map(|(_, w)| w.clone()).collect();
            st.wakers.push((TAKER, waker));
            st.driver = Some(Arc::downgrade(parent));
            waiting
        };
        // Its callers so far waited for the leader: one holding a permit now drives `parent`.
        for w in waiting {
            w.wake();
        }
    }

    /// Records that a waiter of `child` waits inside this shared load's polls (see
    /// [`State::children`]).
    pub(crate) fn add_child(&self, child: &Arc<Flight<K, V>>) {
        let mut st = self.state.lock();
        st.children.retain(|w| w.strong_count() > 0);
        if !st.children.iter().any(|w| w.as_ptr() == Arc::as_ptr(child)) {
            st.children.push(Arc::downgrade(child));
        }
    }

    /// A permit lent to a flight whose waiters wait inside this load's polls (directly, or
    /// through loads nested in it): the poll of this load that is about to run, by a caller
    /// with no permit, drives that flight, so it may run under the lent permit — else the
    /// blocking lender, holding the only permit, would wait for a load whose poller queues for
    /// a permit behind it. `children` is this flight's [`State::children`], read when the poll
    /// began. The permit is entered in the lender's flight's `lent_polls` (under its lock, so a
    /// leaving lender waits for this poll); [`Flight::lend_poll`] takes it from there.
    pub(crate) fn lender_below(
        self: &Arc<Self>,
        children: Vec<Weak<Flight<K, V>>>,
        waker: &Waker,
    ) -> Option<Lent<K, V>> {
        // Breadth first (a child, and the flight whose `children` named it), each flight once.
        let mut queue: std::collections::VecDeque<(Weak<Self>, *const Self)> = children
            .into_iter()
            .map(|c| (c, Arc::as_ptr(self)))
            .collect();
        let mut seen: std::collections::HashSet<*const Self> = std::collections::HashSet::new();
        seen.insert(Arc::as_ptr(self));
        while let Some((child, parent)) = queue.pop_front() {
            let Some(child) = child.upgrade() else {
                continue;
            };
            if !seen.insert(Arc::as_ptr(&child)) {
                continue;
            }
            let mut st = child.state.lock();
            let nested = matches!(st.phase, Phase::Running)
                && st.parents.iter().any(|(_, w)| w.as_ptr() == parent);
            if !nested {
                continue;
            }
            if let Some(p) = st.take_lent(waker) {
                drop(st);
                return Some((child, p));
            }
            let below = Arc::as_ptr(&child);
            queue.extend(st.children.iter().map(|w| (w.clone(), below)));
        }
        None
    }

    /// Runs the current poll of a shared load under `permit`, lent by a blocking caller
    /// waiting for `lender` (this flight, or one nested in the load polled: see
    /// [`Flight::lender_below`]), whose `lent_polls` the poller entered it in under its lock,
    /// until the guard drops.
    pub(crate) fn lend_poll(lender: Arc<Flight<K, V>>, permit: Arc<Permit>) -> LentPoll<K, V> {
        LentPoll {
            _held: PermitHeld::lent(Arc::clone(&permit)),
            lender,
            permit,
        }
    }
}

/// Starts the load a token belongs to (see [`Flight::start`]).
pub(crate) fn start(token: &AtomicU8) -> bool {
    token
        .compare_exchange(WAITING, STARTED, Ordering::AcqRel, Ordering::Acquire)
        .map_or_else(|now| now == STARTED, |_| true)
}

/// The waiter id of a shared load's leader, interested from the flight's registration (see
/// [`Flight::set_shared_load`]).
pub(crate) const LEADER: u64 = 0;

/// The waiter id under which a flight taken over inside a shared load's poll records that load
/// (see [`Flight::driven_by`]); never a waiter's (ids count up from 0).
pub(crate) const TAKER: u64 = u64::MAX;

/// The waker given to a shared load future: wakes every async caller interested in the flight.
pub(crate) struct FlightWaker<K, V>(pub(crate) Weak<Flight<K, V>>);

impl<K: Send + Sync + 'static, V: Send + Sync + 'static> Wake for FlightWaker<K, V> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let Some(f) = self.0.upgrade() else { return };
        let wakers: Vec<Waker> = {
            let mut st = f.state.lock();
            if st.polling {
                st.woken = true;
            }
            st.wakers.iter().map(|(_, w)| w.clone()).collect()
        };
        for w in wakers {
            w.wake();
        }
    }
}

/// How a wait on a flight ended.
pub(crate) enum Waited<R> {
    /// Done, with the outcome mapped for this caller (`None`: an outcome it cannot use).
    Done(Option<R>),
    Abandoned,
    TimedOut,
}

crate::sync::thread_local_shim! {
    /// Flights this thread is running (sync loader, compute closure) or polling (async load),
    /// by address, with the flight (to ask whether a write superseded it).
    /// A shared load's poll also carries its flight as `Any` (see [`polled_parent`]).
    static RUNNING: RefCell<Vec<Run>> = RefCell::new(Vec::new());
}

crate::sync::thread_local_shim! {
    /// Load permits this thread holds (or runs under), innermost last: a load nested in one
    /// does not wait for another (see [`holds_permit`]).
    /// With each, whether it is only lent to this thread's poll (see [`PermitHeld::lent`]).
    static PERMITS: RefCell<Vec<(Arc<Permit>, bool)>> = RefCell::new(Vec::new());
}

crate::sync::thread_local_shim! {
    /// A bound on the lifetime of the value the next `publish` on this thread stores, in
    /// nanoseconds from then (see [`cap_next_publish`]).
    static TTL_CAP: Cell<Option<u64>> = Cell::new(None);
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

/// Takes the bound set by [`cap_next_publish`], if any.
pub(crate) fn take_publish_cap() -> Option<u64> {
    TTL_CAP.with(Cell::take)
}

/// Registers a flight as run by this thread for the guard's lifetime.
pub(crate) struct Running(usize);

/// An entry of [`RUNNING`]: the flight's address, the flight, and for a shared load's poll
/// the flight again, as `Any`, and its cache's address (see [`polled_parent`]).
type Run = (
    usize,
    Arc<dyn Supersedable>,
    Option<(Arc<dyn Any + Send + Sync>, usize)>,
);

/// Marks `flight` as run by this thread until the guard drops (recursion detection).
pub(crate) fn enter<K: Send + Sync + 'static, V: Send + Sync + 'static>(
    flight: &Arc<Flight<K, V>>,
) -> Running {
    let id = flight.id();
    let f: Arc<dyn Supersedable> = Arc::clone(flight) as _;
    RUNNING.with(|r| r.borrow_mut().push((id, f, None)));
    Running(id)
}

/// [`enter`], for a poll of a shared load of the cache `owner` (its address): async waiters
/// of that cache that register during the poll are nested in it (see [`polled_parent`]).
pub(crate) fn enter_shared<K: Send + Sync + 'static, V: Send + Sync + 'static>(
    flight: &Arc<Flight<K, V>>,
    owner: usize,
) -> Running {
    let id = flight.id();
    let f: Arc<dyn Supersedable> = Arc::clone(flight) as _;
    let any: Arc<dyn Any + Send + Sync> = Arc::clone(flight) as _;
    RUNNING.with(|r| r.borrow_mut().push((id, f, Some((any, owner)))));
    Running(id)
}

/// The shared load whose poll this thread is in, if that is the innermost thing it runs (not
/// a loader or a borrowing leader nested in the poll: those hold a permit of their own), and a
/// load of the cache `owner`: an async waiter of that cache registering now waits inside
/// that load's poll. A load of another cache (even of the same key and value types) is no
/// parent: its polls run under no permit of this cache.
pub(crate) fn polled_parent<K: Send + Sync + 'static, V: Send + Sync + 'static>(
    owner: usize,
) -> Option<Arc<Flight<K, V>>> {
    RUNNING.with(|r| {
        let r = r.borrow();
        let (any, o) = r.last()?.2.as_ref()?;
        if *o != owner {
            return None;
        }
        Arc::clone(any).downcast::<Flight<K, V>>().ok()
    })
}

/// A flight, as the thread that runs it sees it: whether a write superseded it.
/// (`Send + Sync`: a helper thread working for the flight registers it too, see
/// [`running_handle`].)
pub(crate) trait Supersedable: Send + Sync {
    // Asked by the Redis tier only.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn superseded(&self) -> bool;
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn forgo_fallback(&self);
}

impl<K: Send + Sync, V: Send + Sync> Supersedable for Flight<K, V> {
    fn superseded(&self) -> bool {
        self.is_superseded()
    }
    fn forgo_fallback(&self) {
        self.forgo_fallback.store(true, Ordering::Release);
    }
}

/// Whether the flight this thread runs (the innermost) was superseded by a write or an
/// invalidation of its key: its value goes to its callers but is not stored (nor, with the
/// Redis tier, written back to Redis).
#[cfg(feature = "redis")]
pub(crate) fn running_superseded() -> bool {
    RUNNING.with(|r| r.borrow().last().is_some_and(|(_, f, _)| f.superseded()))
}

/// The flight this thread runs (the innermost) read its key invalidated in Redis after the
/// local copy was made: if it fails, it does not fall back on that copy (fail-safe), and the
/// copy goes.
#[cfg(feature = "redis")]
pub(crate) fn running_forgo_fallback() {
    RUNNING.with(|r| {
        if let Some((_, f, _)) = r.borrow().last() {
            f.forgo_fallback();
        }
    });
}

/// The flight this thread runs (the innermost), for another thread that works for it: a helper
/// thread running an async load's Redis round trip registers it with [`enter_handle`], so
/// what the round trip finds marks the flight even if the load is dropped before it takes the
/// round trip's result.
#[cfg(feature = "redis")]
#[derive(Clone)]
pub(crate) struct RunningHandle(usize, Arc<dyn Supersedable>);

/// See [`RunningHandle`].
#[cfg(feature = "redis")]
pub(crate) fn running_handle() -> Option<RunningHandle> {
    RUNNING.with(|r| {
        let r = r.borrow();
        let (id, f, _) = r.last()?;
        Some(RunningHandle(*id, Arc::clone(f)))
    })
}

/// Registers the flight of `handle` as run by this thread for the guard's lifetime, as
/// [`enter`].
#[cfg(feature = "redis")]
pub(crate) fn enter_handle(handle: &RunningHandle) -> Running {
    let RunningHandle(id, f) = handle;
    RUNNING.with(|r| r.borrow_mut().push((*id, Arc::clone(f), None)));
    Running(*id)
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.with(|r| {
            let mut r = r.borrow_mut();
            if let Some(i) = r.iter().rposition(|(x, _, _)| *x == self.0) {
                r.remove(i);
            }
        });
    }
}

/// Whether this thread runs the flight with this id (a call that would wait for it would wait
/// for itself).
pub(crate) fn runs_here(id: usize) -> bool {
    RUNNING.with(|r| r.borrow().iter().any(|(x, _, _)| *x == id))
}

/// Marks this thread as running under `permit` until the guard drops; the guard keeps the
/// permit (it is released when its last holder goes).
pub(crate) struct PermitHeld(Arc<Permit>);

impl PermitHeld {
    pub(crate) fn enter(permit: Arc<Permit>) -> Self {
        Self::mark(permit, false)
    }

    /// A permit lent to this poll only (by a blocking holder, or a borrowing load that keeps
    /// it): loads nested in the poll run under it, but a borrowing load started in it does not
    /// keep it (see `load_async::Covered`).
    pub(crate) fn lent(permit: Arc<Permit>) -> Self {
        Self::mark(permit, true)
    }

    fn mark(permit: Arc<Permit>, lent: bool) -> Self {
        PERMITS.with(|p| p.borrow_mut().push((Arc::clone(&permit), lent)));
        PermitHeld(permit)
    }
}

impl Drop for PermitHeld {
    fn drop(&mut self) {
        PERMITS.with(|p| {
            let mut p = p.borrow_mut();
            if let Some(i) = p.iter().rposition(|(x, _)| Arc::ptr_eq(x, &self.0)) {
                p.remove(i);
            }
        });
    }
}

/// A poll of a shared load under a permit lent by a blocking caller (see
/// [`Flight::wait_blocking`]): marks the permit held by the polling thread; when it drops (the
/// poll ended, or unwound) the lender, if it is leaving, may go on.
pub(crate) struct LentPoll<K, V> {
    _held: PermitHeld,
    lender: Arc<Flight<K, V>>,
    permit: Arc<Permit>,
}

impl<K, V> Drop for LentPoll<K, V> {
    fn drop(&mut self) {
        let mut st = self.lender.state.lock();
        if let Some(i) = st
            .lent_polls
            .iter()
            .position(|x| Arc::ptr_eq(x, &self.permit))
        {
            st.lent_polls.swap_remove(i);
        }
        drop(st);
        self.lender.cond.notify_all();
        self.permit.end_lent_poll();
    }
}

/// A permit a borrowing load ([`Cache::get_with_async`](crate::Cache::get_with_async) and
/// siblings) holds while nested in a shared load's poll, entered in that load's `lenders`
/// until the guard drops: the shared load's polls are what drive the borrowing load, so a
/// caller with no permit may run them under it (else, once the load whose permit covered
/// them went away, the shared load would queue for a permit the borrowing load inside it
/// keeps).
pub(crate) struct Kept<K, V> {
    parent: Weak<Flight<K, V>>,
    permit: Arc<Permit>,
}

impl<K, V> Kept<K, V> {
    pub(crate) fn new(parent: &Arc<Flight<K, V>>, permit: &Arc<Permit>) -> Self {
        parent.state.lock().lenders.push(Arc::clone(permit));
        Kept {
            parent: Arc::downgrade(parent),
            permit: Arc::clone(permit),
        }
    }
}

impl<K, V> Drop for Kept<K, V> {
    fn drop(&mut self) {
        let Some(parent) = self.parent.upgrade() else {
            return;
        };
        let mut st = parent.state.lock();
        if let Some(i) = st.lenders.iter().position(|x| Arc::ptr_eq(x, &self.permit)) {
            st.lenders.swap_remove(i);
        }
    }
}

/// Whether this thread holds one of `limiter`'s load permits (a load nested in another load
/// of the same cache's loader). A permit of another cache does not count: its limit is not
/// this cache's.
pub(crate) fn holds_permit(limiter: Option<&Arc<Limiter>>) -> bool {
    limiter.is_some_and(|l| PERMITS.with(|p| p.borrow().iter().any(|(x, _)| x.belongs_to(l))))
}

/// The innermost of `limiter`'s load permits this thread runs under, if any (what a blocking
/// caller lends to the shared load it waits for: see [`Flight::wait_blocking`]), and whether
/// it is only lent to this thread's poll (see [`PermitHeld::lent`]).
pub(crate) fn held_permit(limiter: Option<&Arc<Limiter>>) -> Option<(Arc<Permit>, bool)> {
    let l = limiter?;
    PERMITS.with(|p| {
        p.borrow()
            .iter()
            .rev()
            .find(|(x, _)| x.belongs_to(l))
            .cloned()
    })
}

#[cold]
pub(crate) fn recursive_load() -> ! {
    panic!(
        "herdcache: recursive load: a loader (or compute closure) asked the cache for the very \
         key it is loading, which would wait for itself forever"
    )
}

pub(crate) fn outcome_of<V, E: Send + Sync + 'static>(r: Result<V, E>) -> Outcome<V> {
    match r {
        Ok(v) => Outcome::Value(v),
        Err(e) => Outcome::Error(Arc::new(e)),
    }
}

/// A caller of `try_get_with`: a value, or an error of its own type (else it loads again).
pub(crate) fn accept_result<V: Clone, E: Send + Sync + 'static>(
    o: &Outcome<V>,
) -> Option<Result<V, Arc<E>>> {
    match o {
        Outcome::Value(v) => Some(Ok(v.clone())),
        Outcome::Error(e) => Arc::clone(e).downcast::<E>().ok().map(Err),
        Outcome::Nothing | Outcome::Panicked => None,
    }
}

/// A caller of `optionally_get_with`: a value or nothing.
pub(crate) fn accept_option<V: Clone>(o: &Outcome<V>) -> Option<Option<V>> {
    match o {
        Outcome::Value(v) => Some(Some(v.clone())),
        Outcome::Nothing => Some(None),
        Outcome::Error(_) | Outcome::Panicked => None,
    }
}

/// A caller of `get_with`: only a value.
pub(crate) fn accept_value<V: Clone>(o: &Outcome<V>) -> Option<V> {
    match o {
        Outcome::Value(v) => Some(v.clone()),
        _ => None,
    }
}

/// The flight registry of one shard: loads in flight (and negative-cache entries), by key.
/// Guarded by the shard's write lock, so "is it cached?" and "is it being loaded?" are one
/// question (see [`crate::load`]).
///
/// Each registration keeps its key's hash: the table grows by those, never by running the
/// key's `Hash` under the lock (a `Hash` that panics there would make the table drop the
/// registrations it had not moved yet — other keys' loads — and one whose hash changes would
/// strand its own registration where its load cannot find it to end it).
pub(crate) struct Flights<K, V> {
    table: HashTable<Registration<K, V>>,
    /// The registry's size after its last sweep of expired negative entries.
    swept_at: usize,
}

/// One registered flight: its key's hash, its key, the flight.
struct Registration<K, V> {
    hash: u64,
    key: K,
    flight: Arc<Flight<K, V>>,
}

impl<K, V> Registration<K, V> {
    fn into_pair(self) -> (K, Arc<Flight<K, V>>) {
        (self.key, self.flight)
    }
}

/// What [`Flights::claim`] found.
pub(crate) enum FlightClaim<K, V> {
    /// A load of the key runs (or a live negative-cache entry answers it): join it. The unused
    /// registration comes back, to be dropped unlocked.
    Running(Arc<Flight<K, V>>, (K, Arc<Flight<K, V>>)),
    /// The new flight is registered; the expired negative entries it replaced or swept come
    /// back, to be dropped unlocked (their keys' and errors' `Drop` is user code).
    Registered(Vec<(K, Arc<Flight<K, V>>)>),
}

impl<K: Hash + Eq, V> Flights<K, V> {
    pub(crate) fn new() -> Self {
        Flights {
            table: HashTable::new(),
            swept_at: 0,
        }
    }

    /// Registers a load in flight for `key` (which has none). Now and then (when the registry
    /// has doubled since) takes out negative-cache entries that expired before `now` (into
    /// `gone`, for the caller to drop unlocked), so failed keys never asked for again do not
    /// pile up.
    fn add(
        &mut self,
        hash: u64,
        key: K,
        flight: Arc<Flight<K, V>>,
        now: u64,
        gone: &mut Vec<(K, Arc<Flight<K, V>>)>,
    ) {
        if self.table.len() >= self.swept_at.max(32) * 2 {
            gone.extend(
                self.table
                    .extract_if(|r| {
                        let until = r.flight.negative_until();
                        until != 0 && until <= now
                    })
                    .map(Registration::into_pair),
            );
            self.swept_at = self.table.len();
        }
        self.table
            .insert_unique(hash, Registration { hash, key, flight }, |r| r.hash);
    }

    /// The one place a flight is registered: looks `key` up in the registry and, unless a load
    /// of it runs (or, with `serve_negative`, a live negative-cache entry answers it), registers
    /// `flight` for it — in one step under the caller's write lock. The key comes in owned
    /// (cloned by the caller before the lock: user code runs first); whatever is not kept is
    /// handed back to be dropped after the lock is released.
    pub(crate) fn claim(
        &mut self,
        hash: u64,
        key: K,
        flight: Arc<Flight<K, V>>,
        now: u64,
        serve_negative: bool,
    ) -> FlightClaim<K, V> {
        let mut gone = Vec::new();
        if let Ok(found) = self.table.find_entry(hash, |r| r.key == key) {
            let until = found.get().flight.negative_until();
            if until == 0 || (serve_negative && until > now) {
                let running = Arc::clone(&found.get().flight);
                return FlightClaim::Running(running, (key, flight));
            }
            // An expired negative entry (or one this caller cannot use): replaced.
            gone.push(found.remove().0.into_pair());
        }
        self.add(hash, key, flight, now, &mut gone);
        FlightClaim::Registered(gone)
    }

    /// Unregisters exactly this flight; returns its key so the caller drops it unlocked.
    pub(crate) fn remove(&mut self, hash: u64, f: &Arc<Flight<K, V>>) -> Option<K> {
        let found = self
            .table
            .find_entry(hash, |r| Arc::ptr_eq(f, &r.flight))
            .ok()?;
        Some(found.remove().0.key)
    }

    /// Each registered flight's state, one line each (a test hook, for a hang's report; a
    /// flight whose state is locked shows as such).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn describe(&self) -> Vec<String>
    where
        K: std::fmt::Debug,
    {
        self.table
            .iter()
            .map(|r| {
                let f = &r.flight;
                let Some(st) = f.state.try_lock() else {
                    return format!("key {:?}: state locked", r.key);
                };
                let phase = match st.phase {
                    Phase::Running => "running",
                    Phase::Done(_) => "done",
                    Phase::Abandoned => "abandoned",
                };
                let ticket = st.ticket.as_ref().map(|t| match t.try_lock().as_deref() {
                    Some(crate::load_async::PermitClaim::Idle) => "idle",
                    Some(crate::load_async::PermitClaim::Queued(_)) => "queued",
                    Some(crate::load_async::PermitClaim::Owned(_)) => "owned",
                    None => "locked",
                });
                format!(
                    "key {:?}: {phase}, start {}, superseded {}, future {}, polling {}, \
                     woken {}, interested {}, waiter ids {:?}, lenders {}, lent polls {}, \
                     parents {:?}, children {}, ticket {:?}",
                    r.key,
                    f.start.load(Ordering::Relaxed),
                    f.is_superseded(),
                    st.future.is_some(),
                    st.polling,
                    st.woken,
                    st.interested,
                    st.wakers.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                    st.lenders.len(),
                    st.lent_polls.len(),
                    st.parents
                        .iter()
                        .map(|(i, w)| (*i, w.strong_count()))
                        .collect::<Vec<_>>(),
                    st.children.len(),
                    ticket,
                )
            })
            .collect()
    }

    /// The number of loads in flight (not negative-cache entries).
    pub(crate) fn running(&self) -> usize {
        self.table
            .iter()
            .filter(|r| r.flight.negative_until() == 0)
            .count()
    }

    /// Detaches `key`'s flight, if any (a write or invalidation supersedes it: its result
    /// will not be stored, and later callers do not join it). The pair comes back, to be
    /// dropped after the lock is released.
    #[inline]
    pub(crate) fn detach<Q>(&mut self, hash: u64, key: &Q) -> Option<(K, Arc<Flight<K, V>>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.table.is_empty() {
            return None;
        }
        self.detach_slow(hash, key)
    }

    #[cold]
    fn detach_slow<Q>(&mut self, hash: u64, key: &Q) -> Option<(K, Arc<Flight<K, V>>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let found = self
            .table
            .find_entry(hash, |r| r.key.borrow() == key)
            .ok()?;
        let (r, _) = found.remove();
        r.flight.supersede();
        Some(r.into_pair())
    }

    /// [`detach`](Self::detach) for a key whose hash is unknown (its `Hash` panicked when
    /// asked again): found by `Eq` alone, one comparison per flight of the shard.
    #[cold]
    pub(crate) fn detach_by_eq(&mut self, key: &K) -> Option<(K, Arc<Flight<K, V>>)>
    where
        K: Eq,
    {
        let r = self.table.extract_if(|r| r.key == *key).next()?;
        r.flight.supersede();
        Some(r.into_pair())
    }

    /// Detaches every flight (the cache is cleared).
    pub(crate) fn detach_all(&mut self) -> Vec<(K, Arc<Flight<K, V>>)> {
        self.table
            .drain()
            .inspect(|r| r.flight.supersede())
            .map(Registration::into_pair)
            .collect()
    }

    /// Whether a load or a computation of `key` runs (a registered flight that is not a
    /// negative entry).
    pub(crate) fn loading<Q>(&self, hash: u64, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.running_computes(hash, key).is_some()
    }

    /// The flight running for `key`: a load, a refresh or a computation (a registered flight
    /// that is not a negative entry).
    fn running_flight<Q>(&self, hash: u64, key: &Q) -> Option<&Flight<K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.table
            .find(hash, |r| r.key.borrow() == key)
            .filter(|r| r.flight.negative_until() == 0)
            .map(|r| &*r.flight)
    }

    /// What runs for `key`: `Some(false)` a load (or a refresh), `Some(true)` a computation,
    /// `None` neither (no flight, or a negative entry).
    pub(crate) fn running_computes<Q>(&self, hash: u64, key: &Q) -> Option<bool>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.running_flight(hash, key).map(|f| f.computes)
    }

    /// Whether the load registered for `key` (not a computation, not a negative entry) gave
    /// up falling back on the key's old value ([`Flight::forgoes_fallback`]): what it read
    /// says that value was invalidated. `None`: no such load runs.
    pub(crate) fn running_load_forgoes<Q>(&self, hash: u64, key: &Q) -> Option<bool>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.running_flight(hash, key)
            .filter(|f| !f.computes)
            .map(Flight::forgoes_fallback)
    }

    /// The key this very flight is registered for, if it is.
    pub(crate) fn key_of(&self, hash: u64, f: &Arc<Flight<K, V>>) -> Option<&K> {
        self.table
            .find(hash, |r| Arc::ptr_eq(f, &r.flight))
            .map(|r| &r.key)
    }

    /// Whether this very flight is registered (not superseded, not ended).
    pub(crate) fn is_registered(&self, hash: u64, f: &Arc<Flight<K, V>>) -> bool {
        self.table
            .find(hash, |r| Arc::ptr_eq(f, &r.flight))
            .is_some()
    }

    /// Registers `by` in place of exactly the flight `f` (same key), if `f` is still
    /// registered; otherwise hands `by` back. Drops no key and runs no user code (`f` has other
    /// holders: its caller's).
    pub(crate) fn replace(
        &mut self,
        hash: u64,
        f: &Arc<Flight<K, V>>,
        by: Arc<Flight<K, V>>,
    ) -> Result<(), Arc<Flight<K, V>>> {
        match self.table.find_mut(hash, |r| Arc::ptr_eq(f, &r.flight)) {
            Some(r) => {
                r.flight = by;
                Ok(())
            }
            None => Err(by),
        }
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn resolves_once_and_waiters_share_the_outcome() {
        let f: Arc<Flight<u32, u32>> = Flight::blocking();
        assert!(f.is_running());
        let waiter = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || match f.wait_blocking(None, None) {
                Waited::Done(Some(o)) => matches!(*o, Outcome::Value(7)),
                _ => false,
            })
        };
        assert!(f.resolve(Phase::Done(Arc::new(Outcome::Value(7)))));
        assert!(!f.resolve(Phase::Abandoned), "a flight ends once");
        assert!(waiter.join().unwrap());
        assert!(!f.is_running());
    }

    #[test]
    fn a_blocking_wait_times_out_and_abandoned_is_seen() {
        let f: Arc<Flight<u32, u32>> = Flight::blocking();
        let soon = Instant::now() + std::time::Duration::from_millis(10);
        assert!(matches!(
            f.wait_blocking(Some(soon), None),
            Waited::TimedOut
        ));
        f.resolve(Phase::Abandoned);
        assert!(matches!(f.wait_blocking(None, None), Waited::Abandoned));
    }

    #[test]
    fn recursion_and_permit_marks_are_scoped() {
        let f: Arc<Flight<u32, u32>> = Flight::blocking();
        assert!(!runs_here(f.id()));
        {
            let _r = enter(&f);
            assert!(runs_here(f.id()));
        }
        assert!(!runs_here(f.id()));
        let limiter = crate::limit::Limiter::new(2);
        let other = crate::limit::Limiter::new(1);
        let (l, o) = (Some(&limiter), Some(&other));
        assert!(!holds_permit(l));
        {
            let _p = PermitHeld::enter(Arc::new(limiter.acquire_blocking()));
            let q = Arc::new(limiter.acquire_blocking());
            let _q = PermitHeld::enter(Arc::clone(&q));
            // Another cache's permit, innermost: it does not count for this one.
            let _o = PermitHeld::enter(Arc::new(other.acquire_blocking()));
            assert!(holds_permit(l) && holds_permit(o) && !holds_permit(None));
            assert!(held_permit(l).is_some_and(|(c, lent)| Arc::ptr_eq(&c, &q) && !lent));
        }
        assert!(!holds_permit(l) && !holds_permit(o));
        assert!(held_permit(l).is_none());
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod registry_tests {
    use super::*;
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;

    fn claim(
        r: &mut Flights<u32, u32>,
        h: &RandomState,
        key: u32,
        now: u64,
        serve_negative: bool,
    ) -> (Arc<Flight<u32, u32>>, bool) {
        let f = Flight::blocking();
        let hash = h.hash_one(key);
        match r.claim(hash, key, Arc::clone(&f), now, serve_negative) {
            FlightClaim::Registered(_) => (f, true),
            FlightClaim::Running(running, _) => (running, false),
        }
    }

    #[test]
    fn one_flight_per_key_until_removed() {
        let h = RandomState::new();
        let mut r = Flights::new();
        let (a, led) = claim(&mut r, &h, 1, 0, true);
        assert!(led);
        let (b, led) = claim(&mut r, &h, 1, 0, true);
        assert!(!led && Arc::ptr_eq(&a, &b), "the second caller joins");
        assert_eq!(r.running(), 1);
        assert!(r.is_registered(h.hash_one(1), &a));
        // Only this very flight is removed: another's handle removes nothing.
        let other = Flight::blocking();
        assert_eq!(r.remove(h.hash_one(1), &other), None);
        assert_eq!(r.remove(h.hash_one(1), &a), Some(1));
        assert!(!r.is_registered(h.hash_one(1), &a));
        assert!(claim(&mut r, &h, 1, 0, true).1, "a new caller leads again");
    }

    #[test]
    fn a_detached_flight_is_superseded_and_not_joined() {
        let h = RandomState::new();
        let mut r = Flights::new();
        let (a, _) = claim(&mut r, &h, 7, 0, true);
        let (key, f) = r.detach(h.hash_one(7), &7).expect("registered");
        assert_eq!(key, 7);
        assert!(Arc::ptr_eq(&a, &f) && a.is_superseded());
        assert!(r.detach(h.hash_one(7), &7).is_none());
        let (b, led) = claim(&mut r, &h, 7, 0, true);
        assert!(
            led && !Arc::ptr_eq(&a, &b),
            "a caller after the write starts a new load"
        );
        assert_eq!(r.detach_all().len(), 1);
        assert!(b.is_superseded());
    }

    #[test]
    fn negative_entries_answer_until_their_deadline_and_only_if_asked() {
        let h = RandomState::new();
        let mut r = Flights::new();
        let (a, _) = claim(&mut r, &h, 3, 0, true);
        a.set_negative_until(100);
        assert_eq!(r.running(), 0, "a negative entry is not a load in flight");
        let (b, led) = claim(&mut r, &h, 3, 50, true);
        assert!(!led && Arc::ptr_eq(&a, &b), "served before its deadline");
        let (c, led) = claim(&mut r, &h, 3, 50, false);
        assert!(led && !Arc::ptr_eq(&a, &c), "bypassed when not served");
        c.set_negative_until(100);
        let (_, led) = claim(&mut r, &h, 3, 100, true);
        assert!(led, "expired at its deadline: replaced");
    }

    #[test]
    fn expired_negative_entries_are_swept_as_the_registry_grows() {
        let h = RandomState::new();
        let mut r = Flights::new();
        for k in 0..64 {
            let (f, _) = claim(&mut r, &h, k, 0, true);
            f.set_negative_until(10);
        }
        // Past their deadline, adding more sweeps them out.
        for k in 64..200 {
            claim(&mut r, &h, k, 20, true);
        }
        assert_eq!(r.running(), 136);
        assert!(r.table.len() < 200, "swept: {}", r.table.len());
    }
}
