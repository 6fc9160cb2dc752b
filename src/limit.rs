//! A global limit on concurrent loads: a fair (first come, first served) counting semaphore that
//! blocking threads and async tasks can both wait on, with no runtime.
//!
//! A permit is held while a loader runs (a blocking leader's `init`, an async load's future, a
//! refresh). Waiters queue in arrival order; a released permit goes straight to the oldest
//! waiter, so nobody can barge ahead of the queue. An atomic high-water mark records the most
//! permits ever held at once, to prove the bound in tests and to report it in statistics.

use crate::sync::{wait_until, Condvar, Mutex};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// One queued waiter.
struct Ticket {
    id: u64,
    granted: bool,
    waker: Option<Waker>,
}

struct State {
    in_use: usize,
    queue: VecDeque<Ticket>,
    next_id: u64,
}

#[doc(hidden)]
pub struct Limiter {
    max: usize,
    state: Mutex<State>,
    cond: Condvar,
    high_water: AtomicUsize,
    /// Loads that had to wait for a permit (for statistics).
    waited: AtomicUsize,
}

/// A held permit; released on drop.
#[doc(hidden)]
pub struct Permit {
    limiter: Arc<Limiter>,
    /// Whether a poll by a caller that does not hold this permit runs under it now (lent by a
    /// blocking holder, or kept by a borrowing load, to the shared load that drives it), and
    /// the pollers that found it so (see [`Permit::begin_lent_poll`]).
    lent: Mutex<(bool, Vec<Waker>)>,
    /// Signalled when a lent poll ends (see [`Permit::resume_lent_poll`]).
    lent_free: Condvar,
}

impl Permit {
    /// Begins a poll under this permit by a caller that does not hold it: false if one runs
    /// already — `waker` is then woken when it ends. A lent permit runs one poll at a time:
    /// two callers' polls under it on two threads would be two loads' code under one permit.
    pub(crate) fn begin_lent_poll(&self, waker: &Waker) -> bool {
        let mut l = self.lent.lock();
        if l.0 {
            l.1.push(waker.clone());
            false
        } else {
            l.0 = true;
            true
        }
    }

    /// Ends the poll [`begin_lent_poll`](Self::begin_lent_poll) began; wakes the pollers that
    /// found it running.
    pub(crate) fn end_lent_poll(&self) {
        let skipped = {
            let mut l = self.lent.lock();
            l.0 = false;
            std::mem::take(&mut l.1)
        };
        self.lent_free.notify_all();
        for w in skipped {
            w.wake();
        }
    }

    /// A thread whose lent poll blocked (waiting for a load it lends this permit to, which
    /// another caller may then poll under it: its own poll is not running meanwhile) takes the
    /// poll back once no other runs (see [`end_lent_poll`](Self::end_lent_poll), which paused
    /// it).
    pub(crate) fn resume_lent_poll(&self) {
        let mut l = self.lent.lock();
        while l.0 {
            (l, _) = wait_until(&self.lent_free, l, None);
        }
        l.0 = true;
    }

    /// Whether this permit is one of `limiter`'s (another cache's permit does not count
    /// against this cache's limit).
    pub(crate) fn belongs_to(&self, limiter: &Arc<Limiter>) -> bool {
        Arc::ptr_eq(&self.limiter, limiter)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

impl Limiter {
    /// The most loads at once.
    pub(crate) fn limit(&self) -> usize {
        self.max
    }

    #[doc(hidden)]
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Limiter {
            max: max.max(1),
            state: Mutex::new(State {
                in_use: 0,
                queue: VecDeque::new(),
                next_id: 0,
            }),
            cond: Condvar::new(),
            high_water: AtomicUsize::new(0),
            waited: AtomicUsize::new(0),
        })
    }

    /// Permits in use and the queue (id, granted, has a waker): a test hook, for a hang's
    /// report.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn describe(&self) -> String {
        let Some(st) = self.state.try_lock() else {
            return "limiter: state locked".to_string();
        };
        let q: Vec<(u64, bool, bool)> = st
            .queue
            .iter()
            .map(|t| (t.id, t.granted, t.waker.is_some()))
            .collect();
        format!(
            "limiter: max {}, in use {}, queue {q:?}",
            self.max, st.in_use
        )
    }

    /// The most permits held at once so far.
    pub(crate) fn high_water(&self) -> usize {
        self.high_water.load(Ordering::Acquire)
    }

    /// How many acquisitions had to wait.
    pub(crate) fn waited(&self) -> usize {
        self.waited.load(Ordering::Relaxed)
    }

    fn granted(self: &Arc<Self>, st: &mut State) -> Permit {
        self.high_water.fetch_max(st.in_use, Ordering::AcqRel);
        Permit {
            limiter: Arc::clone(self),
            lent: Mutex::new((false, Vec::new())),
            lent_free: Condvar::new(),
        }
    }

    /// Takes a permit now if one is free and nobody is queued.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut st = self.state.lock();
        if st.in_use < self.max && st.queue.is_empty() {
            st.in_use += 1;
            return Some(self.granted(&mut st));
        }
        None
    }

    /// Grants a permit at once if one is free and nobody is queued; otherwise queues a ticket
    /// (with `waker`, for an async waiter) and returns its id.
    fn grant_or_queue(
        self: &Arc<Self>,
        st: &mut State,
        waker: Option<Waker>,
    ) -> Result<Permit, u64> {
        if st.in_use < self.max && st.queue.is_empty() {
            st.in_use += 1;
            return Ok(self.granted(st));
        }
        self.waited.fetch_add(1, Ordering::Relaxed);
        let id = st.next_id;
        st.next_id += 1;
        st.queue.push_back(Ticket {
            id,
            granted: false,
            waker,
        });
        Err(id)
    }

    /// Blocks the thread until a permit is granted, in arrival order (for the tests and the
    /// loom model; the cache waits with [`acquire_until`](Self::acquire_until)).
    #[cfg(any(test, loom))]
    #[doc(hidden)]
    pub fn acquire_blocking(self: &Arc<Self>) -> Permit {
        self.acquire_until(None)
            .expect("a wait without a deadline ends with a permit")
    }

    /// Blocks the thread until a permit is granted, in arrival order, or until `until` passes
    /// (`None`: no deadline). A free permit is
    /// taken even past the deadline; a waiter whose deadline passes leaves the queue and returns
    /// `None`, and a permit granted to it in the same instant (a release racing the timeout) is
    /// passed on to the next waiter or back to the pool: never lost.
    #[doc(hidden)]
    pub fn acquire_until(self: &Arc<Self>, until: Option<Instant>) -> Option<Permit> {
        let mut st = self.state.lock();
        let id = match self.grant_or_queue(&mut st, None) {
            Ok(permit) => return Some(permit),
            Err(id) => id,
        };
        loop {
            let timed_out;
            (st, timed_out) = wait_until(&self.cond, st, until);
            let i = st
                .queue
                .iter()
                .position(|t| t.id == id)
                .expect("a queued ticket stays until its waiter takes it");
            if timed_out {
                let granted = st.queue.remove(i).is_some_and(|t| t.granted);
                if !granted {
                    return None;
                }
                // Granted as the deadline passed: the permit goes on, as a release would.
                let waker = self.hand_on(&mut st);
                drop(st);
                self.cond.notify_all();
                if let Some(w) = waker {
                    w.wake();
                }
                return None;
            }
            if st.queue[i].granted {
                st.queue.remove(i);
                return Some(self.granted(&mut st));
            }
        }
    }

    /// Waits (asynchronously) for a permit, in arrival order. Cancel-safe: a dropped waiter
    /// leaves the queue, passing on a permit it was granted.
    pub(crate) fn acquire(self: &Arc<Self>) -> Acquire {
        Acquire {
            limiter: Arc::clone(self),
            id: None,
        }
    }

    /// Returns a permit: to the oldest waiter if any, else to the pool.
    fn release(&self) {
        let waker = {
            let mut st = self.state.lock();
            // A planted bug for the loom model to catch: the permit goes back to the pool
            // even when someone waits for it, and nobody is woken.
            #[cfg(herdcache_broken_model)]
            if st.in_use > 0 {
                st.in_use -= 1;
                return;
            }
            self.hand_on(&mut st)
        };
        self.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Hands a permit that is being given up to the oldest waiter not yet granted one, or back
    /// to the pool; returns that waiter's waker (if async). The caller notifies the condvar.
    fn hand_on(&self, st: &mut State) -> Option<Waker> {
        match st.queue.iter_mut().find(|t| !t.granted) {
            Some(t) => {
                // The permit moves to the waiter; `in_use` is unchanged.
                t.granted = true;
                t.waker.take()
            }
            None => {
                st.in_use -= 1;
                None
            }
        }
    }
}

/// The future of [`Limiter::acquire`].
pub(crate) struct Acquire {
    limiter: Arc<Limiter>,
    id: Option<u64>,
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = &mut *self;
        let limiter = Arc::clone(&this.limiter);
        let mut st = limiter.state.lock();
        match this.id {
            None => match limiter.grant_or_queue(&mut st, Some(cx.waker().clone())) {
                Ok(permit) => Poll::Ready(permit),
                Err(id) => {
                    this.id = Some(id);
                    Poll::Pending
                }
            },
            Some(id) => {
                let i = st
                    .queue
                    .iter()
                    .position(|t| t.id == id)
                    .expect("a queued ticket stays until taken");
                if st.queue[i].granted {
                    st.queue.remove(i);
                    this.id = None;
                    return Poll::Ready(limiter.granted(&mut st));
                }
                st.queue[i].waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let granted = {
            let mut st = self.limiter.state.lock();
            let Some(i) = st.queue.iter().position(|t| t.id == id) else {
                return;
            };
            st.queue.remove(i).is_some_and(|t| t.granted)
        };
        if granted {
            // We were handed a permit but will not use it: pass it on.
            self.limiter.release();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn never_more_than_the_limit_and_everyone_gets_through() {
        let l = Limiter::new(3);
        let now = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..50 {
                        let _p = l.acquire_blocking();
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(n <= 3, "{n} permits held");
                        std::thread::yield_now();
                        now.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(l.high_water() <= 3);
        assert_eq!(l.state.lock().in_use, 0);
    }

    #[test]
    fn a_waiter_past_its_deadline_leaves_the_queue_and_the_permit_stays_whole() {
        let l = Limiter::new(1);
        let held = l.try_acquire().expect("free");
        let until = std::time::Instant::now() + std::time::Duration::from_millis(10);
        assert!(l.acquire_until(Some(until)).is_none(), "the permit is held");
        assert!(l.state.lock().queue.is_empty(), "the ticket left the queue");
        assert_eq!(l.state.lock().in_use, 1);
        drop(held);
        assert_eq!(l.state.lock().in_use, 0, "the release went to the pool");
        // A free permit is taken even past the deadline.
        let late = std::time::Instant::now();
        let p = l.acquire_until(Some(late)).expect("a free permit");
        assert!(l.try_acquire().is_none());
        drop(p);
        assert!(l.try_acquire().is_some());
    }

    #[test]
    fn a_timed_out_waiter_keeps_its_place_until_then_and_is_served_in_order() {
        let l = Limiter::new(1);
        let held = l.try_acquire().expect("free");
        std::thread::scope(|s| {
            let far = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let lr = &l;
            let waiter = s.spawn(move || lr.acquire_until(Some(far)).is_some());
            while l.state.lock().queue.is_empty() {
                std::thread::yield_now();
            }
            drop(held);
            assert!(waiter.join().unwrap(), "granted before its deadline");
        });
        assert_eq!(l.state.lock().in_use, 0);
        assert!(l.state.lock().queue.is_empty());
    }

    #[test]
    fn timeouts_racing_releases_never_lose_a_permit() {
        let l = Limiter::new(2);
        let now = Arc::new(AtomicUsize::new(0));
        let got = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..6 {
                let (l, now, got) = (&l, &now, &got);
                s.spawn(move || {
                    for i in 0..300 {
                        // Tiny deadlines (0 to 20 µs), so that timeouts meet grants.
                        let d = std::time::Duration::from_micros(((t * 7 + i) % 21) as u64);
                        let permit = if t == 0 {
                            Some(l.acquire_blocking())
                        } else {
                            l.acquire_until(Some(std::time::Instant::now() + d))
                        };
                        if let Some(p) = permit {
                            got.fetch_add(1, Ordering::Relaxed);
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            assert!(n <= 2, "{n} permits held");
                            std::thread::yield_now();
                            now.fetch_sub(1, Ordering::SeqCst);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(
            got.load(Ordering::Relaxed) >= 300,
            "the untimed thread got all of its"
        );
        let st = l.state.lock();
        assert_eq!(st.in_use, 0, "a permit leaked");
        assert!(st.queue.is_empty(), "a ticket stayed queued");
        drop(st);
        let (a, b) = (l.try_acquire(), l.try_acquire());
        assert!(a.is_some() && b.is_some() && l.try_acquire().is_none());
    }

    #[test]
    fn async_waiters_are_served_in_order_and_cancel_cleanly() {
        let l = Limiter::new(1);
        let held = l.try_acquire().expect("free");
        assert!(l.try_acquire().is_none());
        let mut a = Box::pin(l.acquire());
        let mut b = Box::pin(l.acquire());
        let cx = &mut Context::from_waker(Waker::noop());
        assert!(a.as_mut().poll(cx).is_pending());
        assert!(b.as_mut().poll(cx).is_pending());
        drop(held); // goes to `a`
        drop(a); // `a` cancelled after being granted: passes it to `b`
        let p = match b.as_mut().poll(cx) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("b should have the permit"),
        };
        drop(p);
        assert_eq!(l.state.lock().in_use, 0);
        assert!(l.state.lock().queue.is_empty());
    }
}
