//! The entry API: insert-if-absent, atomic read-modify-write, and bulk loading.
//!
//! ```text
//! cargo run --example entry_api
//! ```

use herdcache::{Cache, CompResult, Op};
use std::collections::HashMap;

fn main() {
    let counters: Cache<&str, u64> = Cache::new(100);
    // Eight threads increment one counter 1,000 times each: no update is lost.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..1000 {
                    counters
                        .entry("requests")
                        .and_upsert_with(|e| e.map_or(1, |e| e.value() + 1));
                }
            });
        }
    });
    println!("requests = {:?}", counters.get("requests"));

    // Remove the counter once it passes a threshold, atomically.
    let r = counters.entry("requests").and_compute_with(|e| match e {
        Some(e) if *e.value() >= 8000 => Op::Remove,
        _ => Op::Nop,
    });
    println!("compute: {}", matches!(r, CompResult::Removed(_)));

    // Insert if absent, and learn whether this call produced the value.
    let e = counters.entry("visits").or_insert_with(|| 1);
    println!("visits = {} (fresh: {})", e.value(), e.is_fresh());

    // Bulk loading: one backend call for all the keys that are missing.
    let users: Cache<u32, String> = Cache::new(100);
    users.insert(1, "ada".into());
    let all = users.get_all([1, 2, 3], |missing| {
        println!("backend asked for {missing:?}");
        missing
            .iter()
            .map(|&id| (id, format!("user {id}")))
            .collect::<HashMap<_, _>>()
    });
    let mut all: Vec<_> = all.into_iter().collect();
    all.sort();
    println!("{all:?}");
}
