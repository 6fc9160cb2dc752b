//! The threads the crate starts: a cache that keeps no time starts none; one with expiry starts
//! the coarse clock's thread, named `herdcache-clock`. Alone in its test binary, so that no other
//! test's caches start the clock first. Linux only (reads `/proc/self/task`).

#![cfg(all(target_os = "linux", not(any(loom, shuttle))))]

use herdcache::Cache;
use std::time::{Duration, Instant};

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Waits up to 5 s for `want(names)` to hold (a new thread names itself once it runs).
fn eventually(want: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    loop {
        let names = thread_names();
        if want(&names) || start.elapsed() > Duration::from_secs(5) {
            return names;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn only_a_cache_that_keeps_time_starts_a_thread_and_it_is_named() {
    let untimed: Cache<u32, u32> = Cache::new(10);
    untimed.insert(1, 1);
    assert_eq!(untimed.get(&1), Some(1));
    assert_eq!(untimed.get_with(2, || 2), 2);
    std::thread::sleep(Duration::from_millis(50));
    let names = thread_names();
    assert!(
        !names.iter().any(|n| n.starts_with("herdcache")),
        "a cache without expiry started a thread: {names:?}"
    );

    let timed: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(60))
        .build();
    timed.insert(1, 1);
    assert_eq!(timed.get(&1), Some(1));
    let names = eventually(|n| n.iter().any(|n| n == "herdcache-clock"));
    assert!(
        names.iter().any(|n| n == "herdcache-clock"),
        "the clock thread is named herdcache-clock: {names:?}"
    );
}
