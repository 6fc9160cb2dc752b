//! A loom model of "writes win, decided under the lock": a load of a key races an `insert` of
//! the same key. Whatever the interleaving, the inserted value is what stays cached: a load
//! that claimed the key before the insert stores nothing after it (its flight was detached by
//! the insert), and one that claims after it finds the value.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom_write_wins
//! ```
//!
//! With `--cfg herdcache_broken_model` a load stores its value without checking that its
//! flight is still registered; this model must then fail (`.ci/run` checks that).
#![cfg(loom)]

use herdcache::Cache;

#[test]
fn a_load_never_overwrites_a_newer_insert() {
    loom::model(|| {
        let cache: Cache<u32, u32> = Cache::builder().max_capacity(8).shards(1).build();
        let loader = {
            let cache = cache.clone();
            loom::thread::spawn(move || cache.get_with(1, || 10))
        };
        let writer = {
            let cache = cache.clone();
            loom::thread::spawn(move || cache.insert(1, 20))
        };
        let loaded = loader.join().expect("loader");
        writer.join().expect("writer");
        assert!(loaded == 10 || loaded == 20);
        assert_eq!(cache.get(&1), Some(20), "a load overwrote a newer write");
        assert_eq!(cache.loads_in_flight(), 0);
    });
}
