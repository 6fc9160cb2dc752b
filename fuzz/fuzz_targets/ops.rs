//! Fuzzes operation sequences against a reference model, with `validate()` after every step.
//!
//! ```text
//! cargo install cargo-fuzz --locked
//! cd fuzz && cargo fuzz run -s none ops -- -max_total_time=60        # CI's short run
//! cd fuzz && cargo fuzz run -s none ops -- -max_total_time=3600      # a long run
//! ```
//!
//! Each input byte pair is one operation on a small cache (capacity 8 of weighted entries,
//! a time to live and a time to idle on a manual clock): insert, get, remove, get_with,
//! try_get_with (failing), invalidate_all, retain, advance the clock, run pending tasks. The
//! model is a map of key → (value, deadline); evictions are allowed, anything else must match.
#![no_main]

use herdcache::{Cache, ManualClock};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::Duration;

const TTL: u64 = 40;

fuzz_target!(|data: &[u8]| {
    let clock = ManualClock::new();
    let cache: Cache<u8, u16> = Cache::builder()
        .max_capacity(8)
        .weigher(|_k: &u8, v: &u16| u32::from(*v % 3))
        .time_to_live(Duration::from_millis(TTL))
        .shards(if data.first().is_some_and(|b| b & 1 == 1) { 2 } else { 1 })
        .clock(clock.clone())
        .build();
    let mut model: HashMap<u8, (u16, u64)> = HashMap::new();
    let mut now = 0u64;
    for pair in data.chunks_exact(2) {
        let (op, arg) = (pair[0], pair[1]);
        let k = arg % 16;
        let v = u16::from(arg) * 7 + u16::from(op);
        match op % 9 {
            0 => {
                cache.insert(k, v);
                model.insert(k, (v, now + TTL));
            }
            1 => {
                if let Some(got) = cache.get(&k) {
                    let want = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                    assert_eq!(Some(got), want, "a hit returns the last value, unexpired");
                }
            }
            2 => {
                if let Some(got) = cache.remove(&k) {
                    let want = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                    assert_eq!(Some(got), want);
                }
                model.remove(&k);
            }
            3 => {
                let live = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                let got = cache.get_with(k, || v);
                assert!(got == v || Some(got) == live);
                if got == v {
                    model.insert(k, (v, now + TTL));
                }
            }
            4 => {
                let live = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                match cache.try_get_with(k, || Err::<u16, ()>(())) {
                    Ok(got) => assert_eq!(Some(got), live),
                    Err(_) => {}
                }
                assert_eq!(cache.loads_in_flight(), 0);
            }
            5 => {
                cache.invalidate_all();
                model.clear();
            }
            6 => {
                cache.retain(|key, _| key % 3 != k % 3);
                model.retain(|key, _| key % 3 != k % 3);
            }
            7 => {
                let ms = u64::from(arg % 64);
                clock.advance(Duration::from_millis(ms));
                now += ms;
            }
            _ => {
                cache.run_pending_tasks();
                model.retain(|_, (_, d)| *d > now);
            }
        }
        cache.validate();
        assert!(cache.weighted_size() <= 8);
    }
});
