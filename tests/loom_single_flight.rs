//! A loom model of the single-flight state machine: a blocking leader, a blocking joiner and an
//! async caller that is cancelled after one poll, on one key, under every interleaving (up to
//! the preemption bound).
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom_single_flight
//! ```
//!
//! With `--cfg herdcache_broken_model` as well, the library releases waiters *before* it
//! publishes the value; this model must then fail (`.ci/run` checks that it does).
#![cfg(loom)]

mod loom_support;

use herdcache::Cache;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom_support::YieldOnce;
use std::future::Future;
use std::task::{Context, Poll, Waker};

/// Executions explored (printed at the end, for the record).
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn leader_joiner_canceller() {
    model(false);
}

/// The same with the shared-future load (`get_with_async_shared`).
#[test]
fn leader_joiner_canceller_shared() {
    model(true);
}

fn model(shared: bool) {
    loom::model(move || {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cache: Cache<u32, u32> = Cache::builder().max_capacity(8).shards(1).build();
        let completed = Arc::new(AtomicUsize::new(0));
        let blocking: Vec<_> = (0..2)
            .map(|_| {
                let (cache, completed) = (cache.clone(), completed.clone());
                loom::thread::spawn(move || {
                    let v = cache.get_with(1, || {
                        completed.fetch_add(1, Ordering::SeqCst);
                        10
                    });
                    assert_eq!(v, 10);
                    // Publish before release: whoever returned with the value finds it cached.
                    assert_eq!(
                        cache.get(&1),
                        Some(10),
                        "value not published before release"
                    );
                })
            })
            .collect();
        let canceller = {
            let (cache, completed) = (cache.clone(), completed.clone());
            loom::thread::spawn(move || {
                let load = YieldOnce(false, completed);
                let polled = if shared {
                    let mut f = Box::pin(cache.get_with_async_shared(1, load));
                    f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                } else {
                    let mut f = Box::pin(cache.get_with_async(1, load));
                    f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                };
                // Dropped above: cancelled (or finished).
                if let Poll::Ready(v) = polled {
                    assert_eq!(v, 10);
                }
            })
        };
        for t in blocking {
            t.join().expect("blocking caller");
        }
        canceller.join().expect("canceller");
        assert_eq!(
            completed.load(Ordering::SeqCst),
            1,
            "exactly one load completed"
        );
        assert_eq!(cache.get(&1), Some(10));
        assert_eq!(cache.loads_in_flight(), 0, "no flight left registered");
    });
    eprintln!(
        "loom explored {} executions",
        RUNS.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// A shared async load's last waiter cancels it while another async caller joins (and may
/// drive it to the end): the load is counted once — abandoned if the cancellation won,
/// loaded if the joiner kept it alive — and every miss exactly once (round 41's finding E: the
/// cancelling waiter counted `loads_abandoned` before learning that a joiner had kept the
/// load, which the joiner then published, counted again).
#[test]
fn a_cancelled_shared_load_and_a_joiner_count_once() {
    loom::model(|| {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(8)
            .shards(1)
            .record_stats()
            .build();
        let completed = Arc::new(AtomicUsize::new(0));
        let canceller = {
            let (cache, completed) = (cache.clone(), completed.clone());
            loom::thread::spawn(move || {
                let mut f = Box::pin(cache.get_with_async_shared(1, YieldOnce(false, completed)));
                let _ = f.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            })
        };
        let joiner = {
            let (cache, completed) = (cache.clone(), completed.clone());
            loom::thread::spawn(move || {
                let mut f = Box::pin(cache.get_with_async_shared(1, YieldOnce(false, completed)));
                loop {
                    if let Poll::Ready(v) = f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                    {
                        assert_eq!(v, 10);
                        break;
                    }
                    loom::thread::yield_now();
                }
            })
        };
        canceller.join().expect("canceller");
        joiner.join().expect("joiner");
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "every miss classified once: {s:?}"
        );
        assert_eq!(s.load_successes, completed.load(Ordering::SeqCst) as u64);
        assert_eq!(cache.loads_in_flight(), 0, "no flight left registered");
    });
}
