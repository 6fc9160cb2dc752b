//! A loom model of the load limiter: three threads contend for one permit; at most one holds
//! it at a time and every one of them gets it (a lost wake-up shows as a deadlock). A second
//! model adds a waiter with a deadline, which loom times out at its next wake-up (see
//! `wait_until` in `src/sync.rs`): a permit granted to it as it times out must go on to the
//! other waiter or back to the pool (a lost permit shows as a deadlock too).
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom_limiter
//! ```
//!
//! With `--cfg herdcache_broken_model` the limiter returns a released permit to the pool
//! without waking the waiter it belongs to; this model must then fail (`.ci/run` checks that).
#![cfg(loom)]

use herdcache::__loom::Limiter;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;

#[test]
fn one_permit_three_threads() {
    loom::model(|| {
        let limiter = Limiter::new(1);
        let holders = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (limiter, holders, done) = (limiter.clone(), holders.clone(), done.clone());
                loom::thread::spawn(move || {
                    let permit = limiter.acquire_blocking();
                    assert_eq!(
                        holders.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two permits held"
                    );
                    holders.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(done.load(Ordering::SeqCst), 3);
    });
}

#[test]
fn a_timed_out_waiter_passes_its_permit_on() {
    loom::model(|| {
        let limiter = Limiter::new(1);
        let holders = Arc::new(AtomicUsize::new(0));
        let held = limiter.acquire_blocking();
        let timed = {
            let (limiter, holders) = (limiter.clone(), holders.clone());
            // A deadline far away: under loom it passes at the waiter's first wake-up.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(3600);
            loom::thread::spawn(move || {
                if let Some(permit) = limiter.acquire_until(Some(until)) {
                    assert_eq!(
                        holders.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two permits held"
                    );
                    holders.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            })
        };
        let waiter = {
            let (limiter, holders) = (limiter.clone(), holders.clone());
            loom::thread::spawn(move || {
                let permit = limiter.acquire_blocking();
                assert_eq!(
                    holders.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two permits held"
                );
                holders.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            })
        };
        drop(held);
        timed.join().expect("timed waiter");
        waiter.join().expect("waiter");
        // Nothing lost: the one permit is free again.
        drop(limiter.acquire_blocking());
    });
}
