//! Model test: random operation sequences against a simple reference model.
//!
//! The model is a `HashMap` of key → (value, deadline). With a capacity larger than the key space
//! nothing is evicted and the cache must agree with the model exactly; with a small capacity the
//! cache may have evicted anything, so a hit must return the model's value (the last one
//! inserted, and not expired) and a miss is allowed. After every step `validate()` checks the
//! internal invariants and the weight must be within the capacity.
//!
//! Loads are in the model too: `get_with` must return the live value or load the given one,
//! `try_get_with` with a failing loader must return the live value or the (uncached) error.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256); see README "Testing" for long runs.

#![cfg(not(loom))]

use herdcache::{Cache, ManualClock};
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone, Debug)]
enum Op {
    Insert(u8, u16),
    Get(u8),
    Remove(u8),
    InvalidateAll,
    /// Keep keys whose remainder modulo 3 differs from this.
    Retain(u8),
    Advance(u16),
    RunPending,
    /// `get_with(k, || v)`.
    GetWith(u8, u16),
    /// `try_get_with(k, || Err(..))`.
    TryFail(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..40, any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
        6 => (0u8..40).prop_map(Op::Get),
        2 => (0u8..40).prop_map(Op::Remove),
        1 => Just(Op::InvalidateAll),
        1 => (0u8..3).prop_map(Op::Retain),
        3 => (0u16..2000).prop_map(Op::Advance),
        1 => Just(Op::RunPending),
        3 => (0u8..40, any::<u16>()).prop_map(|(k, v)| Op::GetWith(k, v)),
        1 => (0u8..40).prop_map(Op::TryFail),
    ]
}

const TTL_MS: u64 = 1000;

fn weight(v: u16) -> u32 {
    u32::from(v % 4)
}

fn run(ops: Vec<Op>, capacity: u64, exact: bool, tti: bool) -> Result<(), TestCaseError> {
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(capacity)
        .weigher(|_k: &u8, v: &u16| weight(*v))
        .clock(clock.clone())
        .shards(2);
    b = if tti {
        b.time_to_idle(Duration::from_millis(TTL_MS))
    } else {
        b.time_to_live(Duration::from_millis(TTL_MS))
    };
    let cache = b.build();
    // key → (value, deadline in ms)
    let mut model: HashMap<u8, (u16, u64)> = HashMap::new();
    let mut now = 0u64;
    for op in ops {
        match op {
            Op::Insert(k, v) => {
                cache.insert(k, v);
                model.insert(k, (v, now + TTL_MS));
            }
            Op::Get(k) => {
                let got = cache.get(&k);
                let want = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                if exact {
                    prop_assert_eq!(got, want, "get({}) at {}", k, now);
                } else if let Some(g) = got {
                    prop_assert_eq!(Some(g), want, "a hit returns the last value, unexpired");
                }
                if got.is_some() && tti {
                    if let Some(e) = model.get_mut(&k) {
                        e.1 = now + TTL_MS;
                    }
                }
            }
            Op::Remove(k) => {
                let got = cache.remove(&k);
                let want = model.remove(&k).filter(|(_, d)| *d > now).map(|(v, _)| v);
                if exact {
                    prop_assert_eq!(got, want);
                } else if got.is_some() {
                    prop_assert_eq!(got, want);
                }
            }
            Op::InvalidateAll => {
                cache.invalidate_all();
                model.clear();
            }
            Op::Retain(r) => {
                cache.retain(|k, _| k % 3 != r);
                model.retain(|k, _| k % 3 != r);
            }
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(u64::from(ms)));
                now += u64::from(ms);
            }
            Op::GetWith(k, v) => {
                let live = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                let got = cache.get_with(k, || v);
                match live {
                    Some(old) if exact => prop_assert_eq!(got, old, "a hit does not load"),
                    Some(old) => prop_assert!(got == old || got == v),
                    None => prop_assert_eq!(got, v, "a miss loads"),
                }
                // Without eviction a live value is a hit; with eviction it may have been
                // reloaded (a new deadline): the model then takes the later deadline.
                if got == v && (live != Some(v) || !exact) {
                    model.insert(k, (v, now + TTL_MS));
                } else if tti {
                    if let Some(e) = model.get_mut(&k) {
                        e.1 = now + TTL_MS;
                    }
                }
            }
            Op::TryFail(k) => {
                let live = model.get(&k).filter(|(_, d)| *d > now).map(|(v, _)| *v);
                let got = cache.try_get_with(k, || Err::<u16, &str>("down"));
                match (got, live) {
                    (Ok(v), Some(old)) => {
                        prop_assert_eq!(v, old);
                        if tti {
                            if let Some(e) = model.get_mut(&k) {
                                e.1 = now + TTL_MS;
                            }
                        }
                    }
                    (Ok(v), None) => prop_assert!(false, "a value {} out of nowhere", v),
                    (Err(e), live) => {
                        prop_assert_eq!(*e, "down");
                        prop_assert!(!exact || live.is_none(), "a live value was not served");
                    }
                }
                prop_assert_eq!(cache.loads_in_flight(), 0, "errors are not cached");
            }
            Op::RunPending => {
                cache.run_pending_tasks();
                model.retain(|_, (_, d)| *d > now);
                if exact {
                    let live: u64 = model.values().map(|(v, _)| u64::from(weight(*v))).sum();
                    prop_assert_eq!(cache.weighted_size(), live);
                    prop_assert_eq!(cache.entry_count(), model.len() as u64);
                }
            }
        }
        cache.validate();
        prop_assert!(
            cache.weighted_size() <= capacity,
            "weight {} > {}",
            cache.weighted_size(),
            capacity
        );
        prop_assert!(
            cache.entry_count() <= model.len() as u64,
            "more entries than were inserted"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn agrees_with_the_model_without_eviction(ops in prop::collection::vec(op(), 1..200)) {
        run(ops, 1_000, true, false)?;
    }

    #[test]
    fn agrees_with_the_model_under_eviction(ops in prop::collection::vec(op(), 1..200)) {
        run(ops, 12, false, false)?;
    }

    #[test]
    fn agrees_with_the_model_with_time_to_idle(ops in prop::collection::vec(op(), 1..200)) {
        run(ops, 1_000, true, true)?;
    }
}
