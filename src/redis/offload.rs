//! Blocking Redis work for async callers: an elastic pool of helper threads, a one-shot
//! future that delivers a job's result, and a timer for waits between jobs.
//!
//! The Redis client is blocking. An async load must not block its executor's thread for a
//! network round trip, so it hands each round trip to a helper thread and awaits the result.
//! A lease wait is a series of round trips with pauses between them: the pauses are
//! [`Timer::sleep`] futures, so a waiting caller holds no thread (one timer thread serves all
//! of a tier's sleepers). No runtime is needed: these futures work on any executor. The pool
//! starts no thread until a job arrives, starts one whenever queued jobs outnumber idle threads
//! (up to a maximum), and lets a thread exit after 10 s without work; the timer thread likewise.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use std::time::Instant;

type Job = Box<dyn FnOnce() + Send>;

/// Idle helper threads exit after this long.
const IDLE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

/// The helper threads of one tier; closed (threads finish their job and exit) on drop.
pub(crate) struct Pool {
    handle: Handle,
}

/// A way to submit jobs to a [`Pool`] (kept by a [`Receive`], to hand back a result it
/// drops); jobs submitted after the pool closed still run.
#[derive(Clone)]
pub(crate) struct Handle {
    shared: Arc<Shared>,
    max: usize,
}

impl Pool {
    pub(crate) fn new(max: usize) -> Self {
        Pool {
            handle: Handle {
                shared: Arc::default(),
                max: max.max(1),
            },
        }
    }

    /// Runs `job` on a helper thread (on the caller's, if no thread can be started).
    pub(crate) fn submit(&self, job: impl FnOnce() + Send + 'static) {
        self.handle.submit(job);
    }
}

impl Handle {
    /// See [`Pool::submit`].
    pub(crate) fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut s = self.shared.state.lock();
        s.jobs.push_back(Box::new(job));
        if s.jobs.len() > s.idle && s.threads < self.max {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("herdcache-redis".into())
                .spawn(move || work(&shared));
            match spawned {
                Ok(_) => s.threads += 1,
                Err(_) if s.threads == 0 => {
                    let job = s.jobs.pop_back().expect("pushed above");
                    drop(s);
                    return job();
                }
                Err(_) => {}
            }
        }
        drop(s);
        self.shared.work.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.handle.shared.state.lock().closed = true;
        self.handle.shared.work.notify_all();
    }
}

fn work(shared: &Shared) {
    let mut s = shared.state.lock();
    loop {
        if let Some(job) = s.jobs.pop_front() {
            drop(s);
            // A panicking job is the job's business (its result slot reports it); the thread
            // goes on.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                crate::unwind::discard(p);
            }
            s = shared.state.lock();
            continue;
        }
        if s.closed {
            break;
        }
        s.idle += 1;
        let timed_out = shared.work.wait_for(&mut s, IDLE).timed_out();
        s.idle -= 1;
        if timed_out && s.jobs.is_empty() {
            break;
        }
    }
    s.threads -= 1;
}

/// Wakes sleeping futures at their time: one thread per timer, started on the first sleep,
/// gone after 10 s without sleepers (or when the timer is dropped).
pub(crate) struct Timer {
    shared: Arc<TimerShared>,
}

#[derive(Default)]
struct TimerShared {
    state: Mutex<TimerState>,
    changed: Condvar,
}

#[derive(Default)]
struct TimerState {
    /// Each sleeper's time and waker (taken when it is woken).
    sleepers: Vec<(Instant, Arc<Mutex<Option<Waker>>>)>,
    running: bool,
    closed: bool,
}

impl Timer {
    pub(crate) fn new() -> Self {
        Timer {
            shared: Arc::default(),
        }
    }

    /// A future that is ready `pause` from now.
    pub(crate) fn sleep(&self, pause: Duration) -> Sleep {
        Sleep {
            until: crate::clock::instant_after_or_far(pause),
            waker: None,
            shared: Arc::clone(&self.shared),
        }
    }

    /// How many sleepers are registered now (for tests).
    #[cfg(test)]
    fn sleepers(&self) -> usize {
        self.shared.state.lock().sleepers.len()
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

fn tick(shared: &TimerShared) {
    let mut s = shared.state.lock();
    loop {
        let now = Instant::now();
        let mut due = Vec::new();
        s.sleepers.retain(|(at, w)| {
            if *at <= now {
                due.push(Arc::clone(w));
                false
            } else {
                true
            }
        });
        if !due.is_empty() {
            drop(s);
            for w in due {
                let waker = w.lock().take();
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            s = shared.state.lock();
            continue;
        }
        if s.closed {
            break;
        }
        match s.sleepers.iter().map(|(at, _)| *at).min() {
            Some(next) => {
                shared.changed.wait_until(&mut s, next);
            }
            None => {
                let idle = shared.changed.wait_for(&mut s, IDLE).timed_out();
                if idle && s.sleepers.is_empty() {
                    break;
                }
            }
        }
    }
    s.running = false;
    // Sleepers that arrived as the thread was leaving (a closed timer's are woken at once).
    let wake: Vec<_> = s.sleepers.drain(..).map(|(_, w)| w).collect();
    drop(s);
    for w in wake {
        if let Some(waker) = w.lock().take() {
            waker.wake();
        }
    }
}

/// A pause of an async wait (see [`Timer::sleep`]). Ready at its time; may be woken early by
/// a timer that shuts down (the caller then polls Redis early, which is harmless).
pub(crate) struct Sleep {
    until: Instant,
    waker: Option<Arc<Mutex<Option<Waker>>>>,
    shared: Arc<TimerShared>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.until {
            return Poll::Ready(());
        }
        if let Some(w) = &self.waker {
            let mut slot = w.lock();
            if slot.is_none() {
                // Woken by a leaving timer thread: done early.
                return Poll::Ready(());
            }
            *slot = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let slot = Arc::new(Mutex::new(Some(cx.waker().clone())));
        let mut s = self.shared.state.lock();
        if s.closed {
            return Poll::Ready(());
        }
        s.sleepers.push((self.until, Arc::clone(&slot)));
        let start = !s.running;
        if start {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("herdcache-timer".into())
                .spawn(move || tick(&shared));
            if spawned.is_err() {
                // No thread to wake us: do not wait at all.
                s.sleepers.pop();
                return Poll::Ready(());
            }
            s.running = true;
        }
        drop(s);
        self.shared.changed.notify_one();
        self.waker = Some(slot);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(w) = self.waker.take() {
            // The thread drops the entry at its time; the waker (and what it keeps alive)
            // goes now.
            w.lock().take();
        }
    }
}

struct Slot<T> {
    value: Option<T>,
    /// The job ended without a value (it panicked).
    failed: bool,
    waker: Option<Waker>,
    /// The receiving future was dropped: nobody wants the value.
    abandoned: bool,
    /// What a value nobody takes is handed to (taken when it runs).
    unwanted: Option<Box<dyn FnOnce(T) + Send>>,
}

/// Runs `job` on the pool; the returned future yields its result (`None` if it panicked). If
/// the future is dropped without having yielded the result — before the job ends, or after
/// the result arrived but before it was polled again — `unwanted` gets it instead, on a helper
/// thread (to undo what the job did, e.g. give a lease back).
pub(crate) fn offload<T: Send + 'static>(
    pool: &Pool,
    job: impl FnOnce() -> T + Send + 'static,
    unwanted: impl FnOnce(T) + Send + 'static,
) -> Receive<T> {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        failed: false,
        waker: None,
        abandoned: false,
        unwanted: Some(Box::new(unwanted)),
    }));
    let mut sender = Sender {
        slot: Arc::clone(&slot),
        sent: false,
    };
    pool.submit(move || {
        let v = job();
        sender.sent = true;
        let mut s = sender.slot.lock();
        if s.abandoned {
            let unwanted = s.unwanted.take();
            drop(s);
            if let Some(unwanted) = unwanted {
                unwanted(v);
            }
        } else {
            s.value = Some(v);
            let w = s.waker.take();
            drop(s);
            if let Some(w) = w {
                w.wake();
            }
        }
    });
    Receive {
        slot,
        pool: pool.handle.clone(),
    }
}

/// Marks the slot failed if the job unwinds before sending.
struct Sender<T> {
    slot: Arc<Mutex<Slot<T>>>,
    sent: bool,
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if !self.sent {
            let mut s = self.slot.lock();
            s.failed = true;
            let w = s.waker.take();
            drop(s);
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// The result of an [`offload`]ed job.
pub(crate) struct Receive<T: Send + 'static> {
    slot: Arc<Mutex<Slot<T>>>,
    /// Where a result delivered but never polled goes to be undone.
    pool: Handle,
}

impl<T: Send + 'static> Future for Receive<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.slot.lock();
        if let Some(v) = s.value.take() {
            return Poll::Ready(Some(v));
        }
        if s.failed {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T: Send + 'static> Drop for Receive<T> {
    fn drop(&mut self) {
        let mut s = self.slot.lock();
        s.abandoned = true;
        // Delivered, and woke us, but we were dropped before polling again (a `select!` whose
        // other branch won, a timeout firing at that moment): the result is undone as if it
        // had arrived after the drop — on a helper thread, not the executor's.
        // (Not yet delivered: the job hands it to `unwanted` itself when it ends.)
        let Some(v) = s.value.take() else { return };
        let unwanted = s.unwanted.take();
        drop(s);
        if let Some(unwanted) = unwanted {
            self.pool.submit(move || unwanted(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn block_on<F: Future>(f: F) -> F::Output {
        // A minimal executor: park until woken.
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    #[test]
    fn results_arrive_and_jobs_run_in_parallel() {
        let pool = Pool::new(8);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let futures: Vec<_> = (0..8)
            .map(|i| {
                let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
                offload(
                    &pool,
                    move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        running.fetch_sub(1, Ordering::SeqCst);
                        i * 2
                    },
                    |_| {},
                )
            })
            .collect();
        let got: Vec<_> = futures.into_iter().map(block_on).collect();
        assert_eq!(got, (0..8).map(|i| Some(i * 2)).collect::<Vec<_>>());
        assert!(
            peak.load(Ordering::SeqCst) > 1,
            "jobs waited for each other"
        );
    }

    #[test]
    fn a_panicking_job_yields_none_and_a_dropped_receiver_hands_the_value_back() {
        let pool = Pool::new(2);
        let r = offload(&pool, || -> u32 { panic!("job failed") }, |_| {});
        assert_eq!(block_on(r), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = Arc::clone(&gate);
        let r = offload(
            &pool,
            move || {
                g.wait();
                7
            },
            move |v| tx.send(v).unwrap(),
        );
        drop(r);
        gate.wait();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
    }

    #[test]
    fn sleepers_wake_at_their_time_without_a_thread_each_and_the_timer_thread_leaves() {
        let timer = Timer::new();
        let start = Instant::now();
        // 100 sleepers, all pending at once on one timer thread.
        let mut sleeps: Vec<_> = (1..=100u64)
            .map(|i| Box::pin(timer.sleep(Duration::from_millis(i % 10 + 1))))
            .collect();
        let waker = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&waker);
        for s in &mut sleeps {
            assert!(s.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(timer.sleepers(), 100);
        for s in sleeps {
            block_on(s);
        }
        assert!(start.elapsed() >= Duration::from_millis(10));
        // Dropped unfinished: its waker goes at once.
        let mut early = Box::pin(timer.sleep(Duration::from_secs(60)));
        assert!(early.as_mut().poll(&mut cx).is_pending());
        drop(early);
        drop(timer); // the thread leaves
    }

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
