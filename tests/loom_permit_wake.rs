//! A loom model of a permit holder waiting for a shared load that needs its permit: under
//! `max_concurrent_loads(1)`, H's load of key 1 holds the only permit and waits for its nested
//! shared load of key 2, which outside caller O joins (or leads) and polls without a permit.
//! Both run on wake-up-driven executors (`block_on` below: it parks until woken), so a lost
//! wake-up is a deadlock loom reports.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom_permit_wake
//! ```
//!
//! Round 44's fix made a shared load with no permit of its own go on only in a permit holder's
//! poll; this model found that the holder could miss the wake-up it needed: between its
//! `Wait` seeing the load idle and its own poll, O took the load to poll it (and queued it for
//! a permit), and nobody woke H again.
#![cfg(loom)]

mod loom_support;

use herdcache::Cache;
use loom::sync::atomic::AtomicUsize;
use loom::sync::Arc;
use loom_support::YieldOnce;
use std::future::Future;
use std::task::{Context, Poll, Wake, Waker};

/// Unparks the thread that polls.
struct Unpark(loom::thread::Thread);

impl Wake for Unpark {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `f` whenever woken, parking in between.
fn block_on<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(std::sync::Arc::new(Unpark(loom::thread::current())));
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut Context::from_waker(&waker)) {
            return v;
        }
        loom::thread::park();
    }
}

#[test]
fn a_holder_waiting_for_a_nested_load_polled_from_outside() {
    loom::model(|| {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(8)
            .shards(1)
            .max_concurrent_loads(1)
            .build();
        let loads = Arc::new(AtomicUsize::new(0));
        let holder = {
            let (cache, loads) = (cache.clone(), loads.clone());
            loom::thread::spawn(move || {
                let c = cache.clone();
                block_on(cache.get_with_async_shared(1, async move {
                    c.get_with_async_shared(2, YieldOnce(false, loads)).await + 1
                }))
            })
        };
        let outside = {
            let cache = cache.clone();
            loom::thread::spawn(move || block_on(cache.get_with_async_shared(2, async { 20 })))
        };
        let h = holder.join().expect("holder");
        let o = outside.join().expect("outside caller");
        // Whichever load of key 2 ran, both saw its value.
        assert_eq!(h, o + 1);
        assert!(o == 10 || o == 20, "{o}");
        assert_eq!(cache.loads_in_flight(), 0, "no flight left registered");
    });
}
