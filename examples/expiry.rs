//! Time to live, time to idle and per-entry expiry, tested deterministically with a
//! `ManualClock`.
//!
//! ```text
//! cargo run --example expiry
//! ```

use herdcache::{Cache, Expiry, ManualClock};
use std::time::Duration;

/// Good answers live a minute, errors five seconds.
struct ByOutcome;

impl Expiry<u32, Result<String, String>> for ByOutcome {
    fn expire_after_create(&self, _k: &u32, v: &Result<String, String>) -> Option<Duration> {
        Some(Duration::from_secs(if v.is_ok() { 60 } else { 5 }))
    }
}

fn main() {
    let clock = ManualClock::new();
    let sessions: Cache<&str, u32> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(3600)) // at most an hour...
        .time_to_idle(Duration::from_secs(300)) // ...and 5 minutes without use
        .clock(clock.clone())
        .build();
    sessions.insert("alice", 1);
    sessions.insert("bob", 2);
    for _ in 0..4 {
        clock.advance(Duration::from_secs(240));
        sessions.get("alice"); // alice stays active
    }
    println!(
        "after 16 min: alice {:?}, bob {:?}",
        sessions.get("alice"),
        sessions.get("bob")
    );

    let answers = Cache::builder()
        .max_capacity(1000)
        .expire_after(ByOutcome)
        .clock(clock.clone())
        .build();
    answers.insert(1, Ok("42".to_string()));
    answers.insert(2, Err("backend down".to_string()));
    clock.advance(Duration::from_secs(10));
    println!(
        "after 10 s: ok {:?}, error {:?}",
        answers.get(&1),
        answers.get(&2)
    );
}
