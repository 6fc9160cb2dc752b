//! Async single-flight loads: borrowing (`get_with_async` and its siblings: the leader drives
//! its own future, which may borrow from the caller) and shared (`get_with_async_shared`,
//! `load_async`: the future is stored in the flight and polled by whichever async caller gets
//! there first). The protocol — claim, lead or join, publish, the [`Lead`] guard — is the
//! blocking one of [`crate::load`]; this module adds the futures that drive and wait.

use crate::answer::after_dropping;
use crate::cache::Cache;
use crate::flight::{
    accept_option, accept_result, accept_value, drop_then, enter, enter_shared, holds_permit,
    outcome_of, polled_parent, Flight, FlightWaker, Kept, LoadFuture, Outcome, PermitHeld, Phase,
    State, Waited,
};
use crate::limit::{Acquire, Limiter, Permit};
use crate::load::{Claim, ClaimMode, Judged, Lead, Settle, SharedLoad, Start, Timed};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

/// Polls a leader's own load with its flight marked as run by the polling thread (a load of
/// the same key inside it fails loudly instead of waiting for itself) and, under a permit, the
/// permit marked as held (loads nested in it do not wait for another).
/// A poll that panics counts a failed load.
struct Leading<'a, K, V, S, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    flight: &'a Arc<Flight<K, V>>,
    inner: Pin<&'a mut F>,
    permit: Option<&'a Arc<Permit>>,
    /// Started in a poll under a lent permit: it goes on as a shared load does (see [`Gate`]).
    gate: Option<&'a mut Gate>,
    start: u64,
}

impl<K, V, S, F: Future> Future for Leading<'_, K, V, S, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let own = match self.gate.as_deref_mut() {
            Some(gate) => match gate.poll_ready(cx) {
                Poll::Ready(own) => own,
                Poll::Pending => return Poll::Pending,
            },
            None => self.permit.cloned(),
        };
        let _running = enter(self.flight);
        let _held = own.map(PermitHeld::enter);
        let timed = Timed::since(self.cache, self.start);
        let polled = self.inner.as_mut().poll(cx);
        timed.stop();
        polled
    }
}

/// A borrowing leader's wait for a load permit: its own, or the permit of the load of the same
/// cache that polls it (that load waits for it: leaving it queued behind that very permit
/// would wait forever with a full limit). Not a permit only lent to the poll (by a blocking
/// holder): the leader then goes on as a shared load does, under its pollers' permits or its
/// own once granted (see [`Gate`]). A leader that keeps a permit while nested in a shared
/// load's poll enters it in that load's lenders (see [`Kept`]): that load's polls drive it.
struct Covered<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    ticket: Acquire,
}

impl<K, V, S> Future for Covered<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The permit it keeps; `None` when polled under a permit only lent to the poll.
    type Output = Option<Arc<Permit>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Arc<Permit>>> {
        // Our place in the queue is given up (a permit granted meanwhile goes on).
        match self.cache.held_permit() {
            Some((p, false)) => return Poll::Ready(Some(p)),
            // A lent permit is not ours to keep: its lender goes on once its wait ends, and
            // we would run beside it.
            Some((_, true)) => return Poll::Ready(None),
            None => {}
        }
        Pin::new(&mut self.ticket)
            .poll(cx)
            .map(|p| Some(Arc::new(p)))
    }
}

/// A load's claim to a load permit (if the cache has a limit). Once it has one of its own it
/// keeps it until the load ends, or until only callers nested in other loads wait for it (see
/// [`PermitClaim`]). Until then it goes on only in a poll by a thread that holds one — a load
/// polling it, which waits for it during that poll, or a blocking caller's permit lent
/// through the flight (see [`Flight::wait_blocking`]) — and otherwise queues for its own: a
/// permit is never kept by a load its holder stopped waiting for (that load would then run
/// beside its holder's, both under one permit).
pub(crate) struct Gate {
    /// The limiter, while the load may need a permit of its own.
    limiter: Option<Arc<Limiter>>,
    /// Our place in the limiter's queue, once a poll found no permit to run under, then our
    /// own permit. Shared with the flight of a shared load (see [`TicketSlot`]).
    claim: TicketSlot,
}

impl Drop for Gate {
    /// The place in the queue or the permit goes with the gate (the flight's handle to it
    /// outlives it): a permit granted to it passes on. Dropped with no lock held.
    fn drop(&mut self) {
        let claim = std::mem::replace(&mut *self.claim.lock(), PermitClaim::Idle);
        drop(claim);
    }
}

/// A shared load's claim to a permit (see [`Gate`]).
pub(crate) enum PermitClaim {
    /// Neither queued nor holding one: the load runs under its pollers' permits.
    Idle,
    /// Queued for a permit of its own.
    Queued(Acquire),
    /// Its own permit.
    Owned(Arc<Permit>),
}

/// A shared load's [`PermitClaim`], held by its [`Gate`] and by its flight. A claim taken by a
/// caller polling the load directly — a place in the queue, or the permit it was granted — is
/// given up (the permit passed on) once only callers nested in other loads wait for it: their
/// polls, made inside those loads' polls, run under those loads' permits. A permit granted to
/// this load could not be collected while those loads wait for theirs, and a permit it kept
/// would keep them waiting while only their polls drive it (see [`State::orphaned_ticket`](crate::flight::State::orphaned_ticket)).
pub(crate) type TicketSlot = Arc<crate::sync::Mutex<PermitClaim>>;

impl Gate {
    /// A load that holds `permit` (or needs none).
    pub(crate) fn owning(permit: Option<Arc<Permit>>) -> Self {
        Gate {
            limiter: None,
            claim: Arc::new(crate::sync::Mutex::new(
                permit.map_or(PermitClaim::Idle, PermitClaim::Owned),
            )),
        }
    }

    /// A load that has no permit yet (see [`Gate`]).
    fn waiting(limiter: Option<Arc<Limiter>>) -> Self {
        Gate {
            limiter,
            claim: Arc::new(crate::sync::Mutex::new(PermitClaim::Idle)),
        }
    }

    /// Ready when this poll may run the load: with its own permit (returned), or with none
    /// needed, or the polling thread holds one (`None`).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Permit>>> {
        let mut slot = self.claim.lock();
        if let PermitClaim::Owned(p) = &*slot {
            return Poll::Ready(Some(Arc::clone(p)));
        }
        let Some(limiter) = &self.limiter else {
            return Poll::Ready(None);
        };
        let covered = holds_permit(Some(limiter));
        let queued = matches!(*slot, PermitClaim::Queued(_));
        if !covered || queued {
            if !queued {
                *slot = PermitClaim::Queued(limiter.acquire());
            }
            if let PermitClaim::Queued(ticket) = &mut *slot {
                if let Poll::Ready(p) = Pin::new(ticket).poll(cx) {
                    let p = Arc::new(p);
                    // The granted ticket is spent: replacing it releases nothing.
                    *slot = PermitClaim::Owned(Arc::clone(&p));
                    return Poll::Ready(Some(p));
                }
            }
        }
        drop(slot);
        if covered {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// Polls a load under its [`Gate`], with its own permit (if any) marked as held by the
/// polling thread, so that loads nested in it do not wait for another.
pub(crate) struct UnderPermit<F> {
    /// Declared (so dropped) before the gate: a load dropped mid-way is dropped under its
    /// permit.
    inner: Pin<Box<F>>,
    gate: Gate,
}

impl<F> UnderPermit<F> {
    pub(crate) fn new(inner: F, gate: Gate) -> Self {
        UnderPermit {
            inner: Box::pin(inner),
            gate,
        }
    }
}

impl<F: Future> Future for UnderPermit<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let Poll::Ready(own) = this.gate.poll_ready(cx) else {
            return Poll::Pending;
        };
        let _held = own.map(PermitHeld::enter);
        this.inner.as_mut().poll(cx)
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
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
    /// is not cached (a negative-cache entry the load replaced, still live, is put back; see
    /// [`negative_ttl`](crate::CacheBuilder::negative_ttl)). Other callers are unaffected. A cancelled load's future (with `init`) is
    /// dropped, in that caller's drop, before the key can load again: no two loads of a key
    /// overlap, a cancelled one included; a caller of the key that comes meanwhile waits
    /// for the drop, then loads.
    ///
    /// # Panics
    ///
    /// If `init`'s `Drop` panics (a cancelled load's, in the drop of the caller that cancelled
    /// it; the key's other callers are released first), or asks this cache for the same key
    /// (it is still that key's load).
    ///
    /// If the load panics, in the caller that was polling it at the time (usually the leader);
    /// the others load again with their own `init`. The caller whose `init` it was, when
    /// another caller was polling it, has no load of its own left: it takes the value of a
    /// load another caller started meanwhile (or one cached since), and otherwise panics
    /// too — as it does, rather than wait, when it holds a load permit (it runs inside a load)
    /// and the only load of the key waits for a permit. If the load awaits this cache for the
    /// same key.
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

    /// Polls an async flight's shared future once; publishes its outcome when it completes.
    /// The caller must hold interest in the flight. A wake-up during the poll reaches every
    /// interested caller, so one of them polls again; nobody loops here.
    fn poll_shared(&self, hash: u64, flight: &Arc<Flight<K, V>>, waker: &Waker) {
        let (fut, lent) = {
            let mut st = flight.state.lock();
            if st.polling {
                // Another caller took it to poll since ours looked (see `Wait::poll`): if the
                // load needs this caller's permit to go on, that poller wakes everyone after.
                // (`herdcache_broken_model` plants the lost wake-up `loom_permit_wake` catches.)
                if self.holds_permit() && !cfg!(herdcache_broken_model) {
                    st.woken = true;
                }
                return;
            }
            let Some(fut) = st.future.take() else { return };
            st.polling = true;
            st.woken = false;
            // A blocking caller waiting for this load lent it its permit (see `Gate`); or one
            // waiting for a load nested in this one, which only this load's polls drive.
            let lent = if self.holds_permit() {
                Ok(None)
            } else if let Some(p) = st.take_lent(waker) {
                Ok(Some((Arc::clone(flight), p)))
            } else if st.children.is_empty() {
                Ok(None)
            } else {
                Err(st.children.clone())
            };
            (fut, lent)
        };
        let lent = lent.unwrap_or_else(|children| flight.lender_below(children, waker));
        // If the poll panics, the guard abandons the flight, after the future is dropped
        // (bound after it, below: dropped first) with the flight still marked as run here.
        // (The caller's `init` is gone by then: the load's `async` block drops it unwinding,
        // inside the poll; `attack_s56` checks no other load of the key starts before.)
        let lead = Lead::new(self, hash, Arc::clone(flight));
        let running = enter_shared(flight, self.owner());
        let lent = lent.map(|(lender, p)| Flight::lend_poll(lender, p));
        let mut fut = fut;
        let polled = fut.as_mut().poll(&mut Context::from_waker(waker));
        drop(lent);
        match polled {
            Poll::Ready((outcome, took)) => {
                drop(fut);
                drop(running);
                flight.state.lock().polling = false;
                self.publish(lead, None, outcome, took);
            }
            Poll::Pending => {
                let mut st = flight.state.lock();
                st.polling = false;
                // Resolved meanwhile (taken over and ended, given up): the future goes now
                // (giving an unstarted `init` back), not with the flight's last handle.
                let ended = !matches!(st.phase, crate::flight::Phase::Running);
                let spare = if ended {
                    Some(fut)
                } else {
                    st.future = Some(fut);
                    None
                };
                // Woken during the poll: the callers that joined meanwhile (and so found the
                // load being polled) were not registered yet; every caller is woken now, so
                // that one of them polls again even if this one is never polled again.
                let missed: Vec<Waker> = if std::mem::take(&mut st.woken) {
                    st.wakers.iter().map(|(_, w)| w.clone()).collect()
                } else {
                    Vec::new()
                };
                drop(st);
                drop(running);
                // Still running, or ended by another caller: nothing for this lead to resolve,
                // whatever the spare future's `Drop` (user code) does; the callers are woken.
                drop(lead.disarm());
                drop_then(spare, || {
                    for w in missed {
                        w.wake();
                    }
                });
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
        let how = Settle::starting(self, Start::Lookup);
        self.load_borrowed_from(key, hash, how, None, init, hit, accept)
            .await
    }

    /// [`load_borrowed`](Self::load_borrowed) for a caller that already did `start` (see
    /// [`Start`]); `judge`: a replacing caller's verdict, asked again when it leads (see
    /// [`judge_again`](Self::judge_again)).
    #[allow(clippy::too_many_arguments)] // each is a distinct, documented choice
    pub(crate) async fn load_borrowed_from<R>(
        &self,
        key: K,
        hash: u64,
        how: Settle<'_, K, V, S>,
        judge: Option<&mut (dyn FnMut(&V) -> bool + Send)>,
        init: impl Future<Output = Outcome<V>>,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R {
        // The loop's locals (the key, `init`, flights, outcomes) drop after its answer is
        // made: the answer waits outside their block (see `answer`; a block, not a nested
        // future, which would cost stack in every poll of a deep nesting of loads).
        let answer: R;
        {
            let (key, mut how, mut judge, hit, accept) = (key, how, judge, hit, accept);
            let mut init = Some(init);
            *how = how.judged(judge.is_some());
            loop {
                let claim = self.claim(hash, &key, &hit, &mut None, &mut how, &|o| {
                    accept(o).is_some()
                });
                match claim {
                    Claim::Hit(r) => {
                        answer = r;
                        break;
                    }
                    Claim::Lost => unreachable!("a caller with its loader can always lead"),
                    Claim::Lead(lead) => {
                        let lead =
                            match self.judge_again(lead, &key, judge.as_deref_mut(), &mut how) {
                                // Answered by a value another caller stored: no load (settled).
                                Judged::Kept(kept) => {
                                    answer = accept(&kept).expect("a value");
                                    break;
                                }
                                Judged::Load(lead) => lead,
                                // Superseded before the look: claim again.
                                Judged::Again => continue,
                            };
                        let f = init.take().expect("a caller leads at most once");
                        match self.drive(lead.flight(), f, true).await {
                            Ok((outcome, took)) => {
                                let outcome = self.publish(lead, Some(key), outcome, took);
                                answer =
                                    accept(&outcome).expect("a leader accepts its own outcome");
                                break;
                            }
                            // Taken over while this caller waited for a permit: wait for it (its
                            // load, run by the taker, counts this caller's miss).
                            Err(f) => {
                                init = Some(f);
                                let flight = lead.disarm();
                                match wait_async(self, hash, &flight, &accept).await {
                                    Waited::Done(Some(r)) => {
                                        answer = r;
                                        break;
                                    }
                                    Waited::Done(None) => how.bypass_negative = true,
                                    Waited::Abandoned | Waited::TimedOut => {}
                                }
                            }
                        }
                    }
                    Claim::Join(flight) => {
                        // Inside another load that holds a permit: take over a leader that waits
                        // for one and drives its load itself (waiting for it could keep the permit
                        // from it forever); a shared load is joined, and polled under the permit.
                        if init.is_some() && self.holds_permit() && flight.steal_unshared() {
                            let lead = Lead::taken(self, hash, flight);
                            let f = init.take().expect("checked");
                            let Ok((outcome, took)) = self.drive(lead.flight(), f, false).await
                            else {
                                unreachable!("a load taken over is not started again")
                            };
                            let outcome = self.publish(lead, Some(key), outcome, took);
                            answer = accept(&outcome).expect("a leader accepts its own outcome");
                            break;
                        }
                        match wait_async(self, hash, &flight, &accept).await {
                            Waited::Done(Some(r)) => {
                                answer = r;
                                break;
                            }
                            Waited::Done(None) => how.bypass_negative = true,
                            Waited::Abandoned | Waited::TimedOut => {}
                        }
                    }
                }
            }
        }
        answer
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
        // Its own permit, or, when polled inside a load of this cache (before or while it
        // waits for one), that load's: it is then part of that load, wherever it is polled
        // afterwards (else a load nested in it, polled elsewhere, would queue behind the
        // parent waiting for it).
        // Polled first under a permit only lent to the poll, it goes on as a shared load
        // does: under its poller's permit, or its own once granted (see `Gate`).
        let (permit, mut gate) = match &self.inner.stampede.limiter {
            Some(l) => match (Covered {
                cache: self,
                ticket: l.acquire(),
            })
            .await
            {
                Some(p) => (Some(p), None),
                None => (None, Some(Gate::waiting(Some(Arc::clone(l))))),
            },
            None => (None, None),
        };
        if start && !flight.start() {
            return Err(init);
        }
        // Nested in a shared load's poll, that load's polls are what drive this one: a caller
        // with no permit may run them under ours (see `Kept`). Declared after the permit, so
        // dropped before it.
        let _kept = permit
            .as_ref()
            .zip(polled_parent::<K, V>(self.owner()))
            .map(|(p, parent)| Kept::new(&parent, p));
        let start = self.stopwatch();
        // Declared after the permit, so dropped before it: a load cancelled mid-way drops its
        // `init` (whose destructor may still talk to the backend) while it holds its permit.
        let init = std::pin::pin!(init);
        let outcome = Leading {
            cache: self,
            flight,
            inner: init,
            permit: permit.as_ref(),
            gate: gate.as_mut(),
            start,
        }
        .await;
        let took = self.stopwatch().saturating_sub(start);
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
        // The loop's locals (the key, the shared load, flights, outcomes) drop after its answer
        // is made: the answer waits outside their block (see `answer`; a block, not a nested
        // future, which would cost stack in every poll of a deep nesting of loads).
        let answer: R;
        {
            let (key, hit, accept) = (key, hit, accept);
            let hash = self.hash(&key);
            // A shared load that did not start its `init` (another caller took it over while it
            // waited for a permit, or its flight was abandoned first) gives `init` back here, so
            // that this caller can lead with it again if the load it waited for ends with nothing
            // for it (the taker's loader panicked or found nothing).
            let back = Arc::new(crate::sync::Mutex::new(Back::default()));
            let mut init: Option<SharedLoad<V>> = Some(self.shared_load(init, &back));
            let mut how = Settle::new(self, ClaimMode::leading(false, true));
            loop {
                how.can_lead = init.is_some();
                let had_future = init.is_some();
                let claim = self.claim(hash, &key, &hit, &mut init, &mut how, &|o| {
                    accept(o).is_some()
                });
                let (flight, id) = match claim {
                    Claim::Hit(r) => {
                        answer = r;
                        break;
                    }
                    // The shared future holds the lead; the flight's polling guard resolves it.
                    // This caller is already counted as interested in it (its waiter `LEADER`).
                    Claim::Lead(lead) => (lead.disarm(), Some(crate::flight::LEADER)),
                    // Inside another load that holds a permit: take over a leader that waits for
                    // one and drives its load itself, driving this caller's own load here (a shared
                    // load is joined instead, and polled under the permit).
                    Claim::Join(f) if had_future && self.holds_permit() && f.steal_unshared() => {
                        if let Some(parent) =
                            polled_parent::<K, V>(self.owner()).filter(|p| !Arc::ptr_eq(p, &f))
                        {
                            let waker = Waker::from(Arc::new(FlightWaker(Arc::downgrade(&parent))));
                            f.driven_by(&parent, waker);
                        }
                        let lead = Lead::taken(self, hash, f);
                        let (fut, token, _) = init.take().expect("checked");
                        crate::flight::start(&token);
                        let (outcome, took) = fut.await;
                        let outcome = self.publish(lead, Some(key), outcome, took);
                        answer = accept(&outcome).expect("a leader accepts its own outcome");
                        break;
                    }
                    // This caller's `init` went into a load that ended unpublished (it panicked
                    // while another caller polled it): with a permit held and no loader to take
                    // over with, it must not wait for a leader that waits for a permit (with a
                    // full limit, its own); that leader loads once this caller is gone.
                    Claim::Join(f) if !had_future && self.holds_permit() && f.awaits_permit() => {
                        lost_load()
                    }
                    Claim::Join(f) => (f, None),
                    // Nothing running, and this caller's `init` went into a load: it comes back if
                    // that load never started it — once the load's future is gone, which may be
                    // after this caller sees the flight end (another caller may still be inside a
                    // poll of it).
                    Claim::Lost => match (GivenBack { back: &back }).await {
                        Some(f) => {
                            init = Some(self.shared_load(f, &back));
                            continue;
                        }
                        None => lost_load(),
                    },
                };
                let wait = Wait {
                    cache: self,
                    hash,
                    flight: &flight,
                    id,
                    accept: &accept,
                    drive: None,
                };
                match wait.await {
                    Waited::Done(Some(r)) => {
                        answer = r;
                        break;
                    }
                    Waited::Done(None) => how.bypass_negative = true,
                    Waited::Abandoned | Waited::TimedOut => {}
                }
            }
        }
        answer
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The shared load of `init` for [`load_async_core`](Self::load_async_core): runs under a
    /// load permit if limited (its own, or its poller's: see [`Gate`]) and measures itself. The start token comes with it: the flight this future leads is made with it.
    /// If the future ends (taken over) or is dropped before `init` starts, `init` goes to
    /// `back`.
    fn shared_load<F>(&self, init: F, back: &Arc<crate::sync::Mutex<Back<F>>>) -> SharedLoad<V>
    where
        F: Future<Output = Outcome<V>> + Send + 'static,
    {
        let limiter = self.inner.stampede.limiter.clone();
        let clock = self.time_source();
        let token = Arc::new(crate::sync::AtomicU8::new(crate::flight::WAITING));
        let start_token = Arc::clone(&token);
        back.lock().gone = false;
        let mut unstarted = GiveBack {
            init: Some(init),
            back: Arc::clone(back),
        };
        let mut gate = Gate::waiting(limiter);
        let slot = Arc::clone(&gate.claim);
        let load: LoadFuture<V> = Box::pin(async move {
            std::future::poll_fn(|cx| gate.poll_ready(cx).map(drop)).await;
            if !crate::flight::start(&start_token) {
                // Taken over while this load waited for a permit: its taker publishes (and
                // `init` goes back, unstarted).
                return (Outcome::Nothing, 0);
            }
            let init = unstarted.init.take().expect("started once");
            let start = clock.stopwatch();
            let outcome = UnderPermit::new(init, gate).await;
            let took = clock.stopwatch().saturating_sub(start);
            (outcome, took)
        });
        (load, token, slot)
    }
}

/// Where a shared load's future gives its caller's `init` back (see [`GiveBack`]).
pub(crate) struct Back<F> {
    /// The `init`, given back unstarted.
    init: Option<F>,
    /// The future is gone: `init` is here, or it started (and is not coming back).
    gone: bool,
    /// The caller waiting for the future to go.
    waker: Option<Waker>,
}

impl<F> Default for Back<F> {
    fn default() -> Self {
        Back {
            init: None,
            gone: false,
            waker: None,
        }
    }
}

/// Holds a shared load's `init` until it starts; dropped before, it gives `init` back. Its
/// drop (the future's) tells the caller either way.
struct GiveBack<F> {
    init: Option<F>,
    back: Arc<crate::sync::Mutex<Back<F>>>,
}

impl<F> Drop for GiveBack<F> {
    fn drop(&mut self) {
        let waker = {
            let mut b = self.back.lock();
            b.init = self.init.take();
            b.gone = true;
            b.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Waits until a shared load's future is gone: its `init` if given back unstarted, `None` if
/// it started.
struct GivenBack<'a, F> {
    back: &'a Arc<crate::sync::Mutex<Back<F>>>,
}

impl<F> Future for GivenBack<'_, F> {
    type Output = Option<F>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F>> {
        let mut b = self.back.lock();
        if let Some(init) = b.init.take() {
            return Poll::Ready(Some(init));
        }
        if b.gone {
            return Poll::Ready(None);
        }
        b.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cold]
fn lost_load() -> ! {
    panic!(
        "herdcache: the load this call started panicked while another caller was driving it, \
         and no other load of the key can answer this call"
    )
}

/// Waits for an async flight's end (helping to drive it), as [`Wait`].
pub(crate) fn wait_async<'a, K, V, S, A, R>(
    cache: &'a Cache<K, V, S>,
    hash: u64,
    flight: &'a Arc<Flight<K, V>>,
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
        drive: None,
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
    /// Borrowed: the caller holds the flight, and drops it once it has its answer (the last
    /// holder of a flight drops its outcome, maybe the last copy of the value: user code, see
    /// `answer`).
    flight: &'a Arc<Flight<K, V>>,
    /// Our waker's id in the flight, once registered (and interest counted).
    id: Option<u64>,
    accept: &'a A,
    /// The shared load whose polls drive this flight's load (taken over in one of them), its
    /// hash and our id in it, while this caller, holding a permit, is one of its callers (see
    /// [`Flight::driven_by`]).
    drive: Option<Driver<K, V>>,
}

/// A shared load that drives a waiter's flight, its hash, and the waiter's id in it (see
/// [`Wait::drive_under_permit`]).
type Driver<K, V> = (Arc<Flight<K, V>>, u64, Option<u64>);

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
        // Inside a poll of another shared load (nested in it): that load's polls drive this
        // wait, so a permit lent to this flight may run them (see `Flight::lender_below`).
        let parent =
            polled_parent::<K, V>(this.cache.owner()).filter(|p| !Arc::ptr_eq(p, this.flight));
        if let Some(p) = &parent {
            p.add_child(this.flight);
        }
        let parent = parent.map(|p| Arc::downgrade(&p));
        loop {
            let mut st = this.flight.state.lock();
            match &st.phase {
                Phase::Done(o) => {
                    let o = Arc::clone(o);
                    leave(&mut this.id, &mut st);
                    drop(st);
                    this.leave_driver();
                    // The value is cloned with no lock held.
                    // The outcome's `Drop` (maybe the last holder of the value: user code)
                    // first.
                    let r = (this.accept)(&o);
                    return Poll::Ready(after_dropping(o, Waited::Done(r)));
                }
                Phase::Abandoned => {
                    leave(&mut this.id, &mut st);
                    drop(st);
                    this.leave_driver();
                    return Poll::Ready(Waited::Abandoned);
                }
                Phase::Running => {}
            }
            st.register(&mut this.id, cx.waker(), parent.as_ref());
            if parent.is_some() {
                // Only callers nested in other loads may wait for it now (its outer callers
                // left before this one came): its claim to a permit goes (see
                // `State::orphaned_ticket`; a place in the queue granted later would be
                // collected by nobody), and the loop looks again. Only if the poll this
                // caller is in holds a permit of this cache: a load of another cache (same
                // types) is no cover, and the load would queue again at every poll.
                if let Some(claim) = this
                    .cache
                    .holds_permit()
                    .then(|| st.orphaned_ticket())
                    .flatten()
                    .filter(|c| !matches!(c, PermitClaim::Idle))
                {
                    drop(st);
                    drop(claim);
                    continue;
                }
            }
            if st.polling {
                // Its poller may be queued for a permit this caller holds (and waits for the
                // load under): have the poller wake everyone when its poll ends, so that this
                // caller polls it too and it runs under this caller's permit (see [`Gate`]).
                if this.cache.holds_permit() {
                    st.woken = true;
                }
                return Poll::Pending;
            }
            if st.future.is_none() {
                // Taken over inside shared load P's poll, only P's polls drive this load: a
                // caller holding a permit polls P under it (P may be queued for a permit, with
                // this caller holding the only one).
                let driver = st
                    .driver
                    .as_ref()
                    .filter(|_| this.cache.holds_permit())
                    .and_then(Weak::upgrade);
                drop(st);
                if let Some(p) = driver {
                    if this.drive_under_permit(p, parent.as_ref(), cx) {
                        continue;
                    }
                }
                return Poll::Pending;
            }
            drop(st);
            let waker = Waker::from(Arc::new(FlightWaker(Arc::downgrade(this.flight))));
            this.cache.poll_shared(this.hash, this.flight, &waker);
            // Loop: the flight may be done now; if not, we are registered and return Pending.
            if this.flight.is_running() {
                return Poll::Pending;
            }
        }
    }
}

impl<K, V, S, A> Wait<'_, K, V, S, A>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// This caller holds a permit and its flight's load was taken over inside shared load
    /// `p`'s poll, so only `p`'s polls drive it (`p` may be queued for a permit, this caller
    /// holding the only one): it becomes a caller of `p` too (interested, woken by it, inside
    /// `parent`'s poll if nested), until its own wait ends, and polls `p` under its permit as a
    /// caller of `p` would. Returns whether this caller's flight has ended.
    fn drive_under_permit(
        &mut self,
        p: Arc<Flight<K, V>>,
        parent: Option<&Weak<Flight<K, V>>>,
        cx: &mut Context<'_>,
    ) -> bool {
        if !self
            .drive
            .as_ref()
            .is_some_and(|(q, _, _)| Arc::ptr_eq(q, &p))
        {
            self.leave_driver();
            // Its hash, kept with its key: no user code (`Clone`, `Hash`) runs for it here.
            let hash = p.state.lock().hash;
            self.drive = Some((p, hash, None));
        }
        let Some((p, hash, id)) = self.drive.as_mut() else {
            return false;
        };
        let mut st = p.state.lock();
        if !matches!(st.phase, Phase::Running) {
            // `p` ended, and the load taken over in it with it.
            drop(st);
            return !self.flight.is_running();
        }
        st.register(id, cx.waker(), parent);
        if st.polling {
            // Its poller wakes every caller once its poll ends (this one included).
            st.woken = true;
            return false;
        }
        if st.future.is_none() {
            return false;
        }
        drop(st);
        let (p, hash) = (Arc::clone(p), *hash);
        let waker = Waker::from(Arc::new(FlightWaker(Arc::downgrade(&p))));
        self.cache.poll_shared(hash, &p, &waker);
        !self.flight.is_running()
    }

    /// Ends this caller's part in the load that drives its flight's (see
    /// [`drive_under_permit`](Self::drive_under_permit)), as a caller of it that leaves.
    fn leave_driver(&mut self) {
        if let Some((p, hash, mut id)) = self.drive.take() {
            leave_flight(self.cache, hash, &p, &mut id);
        }
    }
}

/// An async caller's part in a flight ends (it got its outcome, or was dropped): see
/// [`leave`]; if it was the last caller interested in a running shared load, the load is
/// cancelled, else the other callers are woken (this one may have consumed a wake-up meant to
/// get the load polled).
fn leave_flight<K, V, S>(
    cache: &Cache<K, V, S>,
    hash: u64,
    flight: &Arc<Flight<K, V>>,
    id: &mut Option<u64>,
) where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    if id.is_none() {
        return;
    }
    let (cancel, others, orphaned) = {
        let mut st = flight.state.lock();
        let cancel = leave(id, &mut st);
        let others: Vec<Waker> = st.wakers.iter().map(|(_, w)| w.clone()).collect();
        (cancel, others, st.orphaned_ticket())
    };
    // Dropped with no lock held: a permit granted to it goes to the next in the queue.
    drop(orphaned);
    // Nobody wants the shared load any more: it ends unpublished, abandoned (and counted
    // so), unless a caller joined it meanwhile (it then drives it; whoever ends it counts).
    if !(cancel && cache.cancel_shared(hash, flight)) {
        for w in others {
            w.wake();
        }
    }
}

/// The interest of the caller that registered a shared load (its waiter
/// [`LEADER`](crate::flight::LEADER)), between the registration and its wait: dropped armed (a
/// panic in between), the caller leaves the load as a cancelled waiter does (see
/// [`leave_flight`]).
pub(crate) struct LeaderInterest<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    hash: u64,
    flight: Option<Arc<Flight<K, V>>>,
}

impl<'a, K, V, S> LeaderInterest<'a, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(cache: &'a Cache<K, V, S>, hash: u64, flight: Arc<Flight<K, V>>) -> Self {
        LeaderInterest {
            cache,
            hash,
            flight: Some(flight),
        }
    }

    /// The flight, its interest kept for the caller's wait.
    pub(crate) fn disarm(mut self) -> Arc<Flight<K, V>> {
        self.flight.take().expect("armed until disarmed")
    }
}

impl<K, V, S> Drop for LeaderInterest<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if let Some(flight) = self.flight.take() {
            leave_flight(
                self.cache,
                self.hash,
                &flight,
                &mut Some(crate::flight::LEADER),
            );
        }
    }
}

/// Stops a waiter's interest: unregisters its waker and returns whether it was the last one
/// interested in a running async load (which should then be cancelled).
fn leave<K, V>(id: &mut Option<u64>, st: &mut State<K, V>) -> bool {
    let Some(id) = id.take() else { return false };
    st.wakers.retain(|(i, _)| *i != id);
    st.parents.retain(|(i, _)| *i != id);
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
        self.leave_driver();
        leave_flight(self.cache, self.hash, self.flight, &mut self.id);
    }
}
