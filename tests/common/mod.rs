//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Live instances of [`Counted`], across the whole test binary.
pub static LIVE: AtomicI64 = AtomicI64::new(0);

/// Tests that read [`LIVE`] hold this lock so that they do not see each other's values.
pub static LIVE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Locks [`LIVE_LOCK`], ignoring poisoning by an earlier failed test.
pub fn live_lock() -> std::sync::MutexGuard<'static, ()> {
    LIVE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value that counts its live instances (clones included).
#[derive(Debug, PartialEq, Eq)]
pub struct Counted(pub u64);

impl Counted {
    pub fn new(v: u64) -> Self {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Counted(v)
    }
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        Counted::new(self.0)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the process (failing the test run) if not dropped within `limit`: a deadlock or a
/// stranded waiter then fails CI instead of hanging it.
pub struct Watchdog(Option<mpsc::Sender<()>>);

pub fn watchdog(limit: Duration, what: &'static str) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: '{what}' did not finish within {limit:?}: deadlock or hang");
            std::process::abort();
        }
    });
    Watchdog(Some(tx))
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A future that is pending `n` times (waking itself each time), then ready.
pub struct Yield(pub u32);

impl Future for Yield {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Waits (at most 10 s, polling every 5 ms) until `cond` holds; false if it never did. For
/// conditions another thread brings about (a message applied, a thread gone), not for expiry.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}
