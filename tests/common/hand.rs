//! Futures polled by hand, for the load-limit attack tests: a door a future waits at, single
//! polls that catch panics, runs of many polls (a future still pending after many rounds is
//! stuck, not merely unwoken), and a gauge of the loads running at once.

use super::panic_message;
use herdcache::Cache;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

pub type C = Cache<u64, u64>;
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A cache of `u64`s with at most `n` loads at once.
pub fn limited(n: usize) -> C {
    Cache::builder()
        .max_capacity(1_000)
        .max_concurrent_loads(n)
        .build()
}

/// `get_with_async_shared(k, init)`, boxed.
pub fn shared(c: &C, k: u64, init: impl Future<Output = u64> + Send + 'static) -> BoxFut<u64> {
    let c = c.clone();
    Box::pin(async move { c.get_with_async_shared(k, init).await })
}

/// A door a future waits at until the test opens it.
#[derive(Clone, Default)]
pub struct Door(pub Arc<AtomicBool>);

impl Door {
    pub fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let d = Arc::clone(&self.0);
        std::future::poll_fn(move |_| {
            if d.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// One manual poll (noop waker); `Err` with the panic's message if the poll panicked.
pub fn poll<T>(f: &mut BoxFut<T>) -> Result<Poll<T>, String> {
    let mut cx = Context::from_waker(Waker::noop());
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.as_mut().poll(&mut cx)))
        .map_err(|p| panic_message(&*p))
}

/// Polls `f` up to `rounds` times; its output, or `None` if it never finished.
pub fn run<T>(f: &mut BoxFut<T>, rounds: usize) -> Option<Result<T, String>> {
    for _ in 0..rounds {
        match poll(f) {
            Ok(Poll::Ready(v)) => return Some(Ok(v)),
            Ok(Poll::Pending) => {}
            Err(e) => return Some(Err(e)),
        }
    }
    None
}

/// Polls every future in turn (the first first), up to `rounds` rounds, until all finished;
/// each one's output, or `None` if it never finished.
pub fn run_all<T>(fs: &mut [&mut BoxFut<T>], rounds: usize) -> Vec<Option<Result<T, String>>> {
    let mut out: Vec<Option<Result<T, String>>> = fs.iter().map(|_| None).collect();
    for _ in 0..rounds {
        for (f, o) in fs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match poll(f) {
                    Ok(Poll::Ready(v)) => *o = Some(Ok(v)),
                    Ok(Poll::Pending) => {}
                    Err(e) => *o = Some(Err(e)),
                }
            }
        }
        if out.iter().all(Option::is_some) {
            break;
        }
    }
    out
}

/// Polls `f` until it finishes, yielding the thread in between: for a future that waits for
/// another thread (the test's watchdog catches a hang).
pub fn run_to_end<T>(f: &mut BoxFut<T>) -> Result<T, String> {
    loop {
        if let Some(r) = run(f, 1) {
            return r;
        }
        std::thread::yield_now();
    }
}

/// One poll that must leave `f` pending.
pub fn pending<T>(f: &mut BoxFut<T>, what: &str) {
    match poll(f) {
        Ok(Poll::Pending) => {}
        Ok(Poll::Ready(_)) => panic!("{what}: expected pending, was ready"),
        Err(e) => panic!("{what}: expected pending, panicked: {e}"),
    }
}

/// Polls `f` once, in the current context (inside a load), and returns.
pub async fn poll_once(f: &mut BoxFut<u64>) {
    let mut once = false;
    std::future::poll_fn(|cx| {
        if !once {
            once = true;
            let _ = f.as_mut().poll(cx);
        }
        Poll::Ready(())
    })
    .await
}

/// Sections running at once (entered in a load's `init`) and the most seen.
#[derive(Clone, Default)]
pub struct Gauge(Arc<(AtomicUsize, AtomicUsize)>);

/// Leaves its gauge when dropped.
pub struct InGauge(Gauge);

impl Drop for InGauge {
    fn drop(&mut self) {
        self.0.exit();
    }
}

impl Gauge {
    pub fn guard(&self) -> InGauge {
        self.enter();
        InGauge(self.clone())
    }
    pub fn enter(&self) {
        let n = self.0 .0.fetch_add(1, Ordering::SeqCst) + 1;
        self.0 .1.fetch_max(n, Ordering::SeqCst);
    }
    pub fn exit(&self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
    pub fn max(&self) -> usize {
        self.0 .1.load(Ordering::SeqCst)
    }
}

/// A new load of `key` (nobody else's) runs at once: every permit came back.
pub fn assert_permits_back(c: &C, key: u64, what: &str) {
    let mut f = shared(c, key, async { 1 });
    assert_eq!(
        run(&mut f, 50),
        Some(Ok(1)),
        "{what}: permit never returned"
    );
}

/// Runs its closure when dropped (a destructor that acts, as a future's may).
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
