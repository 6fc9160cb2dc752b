//! A loom model of the refresh hand-off: two readers find one entry due for refresh at the
//! same time while a third caller loads the key; exactly one refresh runs, everyone gets a
//! value, and the refreshed value ends up cached with no flight left behind.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom_refresh
//! ```
//!
//! A second model races a refresh with a write: a read decides the refresh (under the shard's
//! read lock), an `insert` of the key lands before the refresh is registered; the write wins
//! (no refresh registers over it), so the key always ends up holding the insert's value.
//!
//! With `--cfg herdcache_broken_model` a reader claims the refresh with a check-then-set
//! instead of a compare-and-swap, and a refresh registers without checking that the entry is
//! still the one its read claimed; these models must then fail (`.ci/run` checks that).
#![cfg(loom)]

use herdcache::{BoxError, Cache, ManualClock};
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use std::time::Duration;

#[test]
fn two_readers_and_a_loader_on_a_due_entry() {
    loom::model(|| {
        let clock = ManualClock::new();
        let loads = Arc::new(AtomicUsize::new(0));
        let l = loads.clone();
        let cache: Cache<u32, usize> = Cache::builder()
            .max_capacity(8)
            .shards(1)
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .loader(move |_k: &u32| Ok::<_, BoxError>(l.fetch_add(1, Ordering::SeqCst)))
            .clock(clock.clone())
            .build();
        assert_eq!(cache.load(1).unwrap(), 0);
        clock.advance(Duration::from_secs(11));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let cache = cache.clone();
                loom::thread::spawn(move || {
                    let v = cache.get(&1).expect("a value is always served");
                    assert!(v <= 1, "more than one refresh ran");
                })
            })
            .collect();
        let loader = {
            let cache = cache.clone();
            loom::thread::spawn(move || {
                let v = cache.load(1).expect("a value");
                assert!(v <= 1, "more than one refresh ran");
            })
        };
        for t in readers {
            t.join().expect("reader");
        }
        loader.join().expect("loader");
        assert_eq!(loads.load(Ordering::SeqCst), 2, "exactly one refresh ran");
        assert_eq!(cache.get(&1), Some(1), "the refreshed value is cached");
        assert_eq!(cache.loads_in_flight(), 0);
    });
}

#[test]
fn a_write_between_a_refresh_decision_and_its_registration_wins() {
    loom::model(|| {
        let clock = ManualClock::new();
        let cache: Cache<u32, usize> = Cache::builder()
            .max_capacity(8)
            .shards(1)
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .loader(|_k: &u32| Ok::<_, BoxError>(7))
            .clock(clock.clone())
            .build();
        cache.insert(1, 0);
        clock.advance(Duration::from_secs(11));
        let reader = {
            let cache = cache.clone();
            // Inline refresh: the reader that wins the claim runs it before returning.
            loom::thread::spawn(move || cache.get(&1).expect("a value is always served"))
        };
        let writer = {
            let cache = cache.clone();
            loom::thread::spawn(move || cache.insert(1, 100))
        };
        let read = reader.join().expect("reader");
        writer.join().expect("writer");
        assert!(read == 0 || read == 100, "the read saw {read}");
        assert_eq!(
            cache.get(&1),
            Some(100),
            "a refresh ran over a newer write (it registered after the insert)"
        );
        assert_eq!(cache.loads_in_flight(), 0);
    });
}
