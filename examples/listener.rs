//! An eviction listener that reports why entries leave, with statistics.
//!
//! ```text
//! cargo run --example listener
//! ```

use herdcache::{Cache, ManualClock, RemovalCause};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn main() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let l = log.clone();
    let clock = ManualClock::new();
    let cache: Cache<u32, String> = Cache::builder()
        .max_capacity(3)
        .time_to_live(Duration::from_secs(10))
        .eviction_listener(move |k: &u32, v: &String, cause: RemovalCause| {
            // Runs after the cache's locks are released; it may use the cache.
            l.lock().unwrap().push(format!("{k} = {v}: {cause:?}"));
        })
        .record_stats()
        .clock(clock.clone())
        .build();
    cache.insert(1, "one".into());
    cache.insert(1, "uno".into()); // Replaced
    cache.insert(2, "two".into());
    cache.invalidate(&2); // Explicit
    for k in 3..8 {
        cache.insert(k, format!("#{k}")); // some of these are evicted: Size
    }
    clock.advance(Duration::from_secs(11));
    cache.run_pending_tasks(); // the rest: Expired
    for line in log.lock().unwrap().iter() {
        println!("{line}");
    }
    let s = cache.stats();
    println!(
        "replaced {}, explicit {}, size {}, expired {}",
        s.replaced.count, s.explicit.count, s.size.count, s.expired.count
    );
}
