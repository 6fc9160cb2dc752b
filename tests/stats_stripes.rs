//! Hit and miss counts stay exact however many threads came and went before.
//!
//! Hits and misses are counted with a plain load and store on a stripe of the counting thread's
//! own. A stripe used to be handed out per thread ever created (the 65th thread of the process
//! got the first one's stripe again, alive or not), so a thread that started after 63 others
//! had come and gone shared its stripe with a thread still running, and their hits were lost.
//!
//! The one test of this file runs alone in its process: no other thread takes a stripe meanwhile.

#![cfg(not(any(loom, shuttle)))]

use herdcache::Cache;
use std::sync::Barrier;

/// Hits each long-running reader counts.
const HITS: u64 = 1_000_000;
/// Short-lived readers started between the two long-running ones: with one long-running reader
/// started before them, a multiple of 64 threads in all, so that stripes handed out round robin
/// per thread created would give the second long-running reader the first one's stripe.
const SHORT_LIVED: u64 = 255;

#[test]
fn hits_are_exact_after_hundreds_of_short_lived_threads() {
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10).record_stats().build();
    cache.insert(1, 1);
    let claimed = Barrier::new(2);
    let go = Barrier::new(3);
    let long_running = || {
        // The first hit takes the thread's stripe; the others wait for both readers to be up.
        assert_eq!(cache.get(&1), Some(1));
        claimed.wait();
        go.wait();
        for _ in 1..HITS {
            assert_eq!(cache.get(&1), Some(1));
        }
    };
    std::thread::scope(|s| {
        let first = s.spawn(long_running);
        claimed.wait();
        for _ in 0..SHORT_LIVED {
            s.spawn(|| assert_eq!(cache.get(&1), Some(1)))
                .join()
                .expect("a short-lived reader");
        }
        let second = s.spawn(long_running);
        claimed.wait();
        go.wait();
        first.join().expect("the first long-running reader");
        second.join().expect("the second long-running reader");
    });
    let stats = cache.stats();
    assert_eq!(stats.misses, 0);
    assert_eq!(stats.hits, 2 * HITS + SHORT_LIVED, "hits lost");
}
