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

use herdcache::{Cache, EvictionPolicy, ManualClock};
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
    run_with(ops, capacity, exact, tti, EvictionPolicy::tiny_lfu())
}

fn run_with(
    ops: Vec<Op>,
    capacity: u64,
    exact: bool,
    tti: bool,
    policy: EvictionPolicy,
) -> Result<(), TestCaseError> {
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(policy)
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

    #[test]
    fn lru_agrees_with_the_model_under_eviction(ops in prop::collection::vec(op(), 1..200)) {
        run_with(ops, 12, false, false, EvictionPolicy::lru())?;
    }

    #[test]
    fn lru_agrees_with_the_model_with_time_to_idle(ops in prop::collection::vec(op(), 1..200)) {
        run_with(ops, 1_000, true, true, EvictionPolicy::lru())?;
    }
}

#[derive(Clone, Debug)]
enum ROp {
    Load(u8),
    Get(u8),
    Advance(u16),
    /// Change what the backend returns; odd versions fail.
    Version(u8),
    Invalidate(u8),
}

fn rop() -> impl Strategy<Value = ROp> {
    prop_oneof![
        3 => (0u8..8).prop_map(ROp::Load),
        5 => (0u8..8).prop_map(ROp::Get),
        3 => (0u16..1500).prop_map(ROp::Advance),
        2 => any::<u8>().prop_map(ROp::Version),
        1 => (0u8..8).prop_map(ROp::Invalidate),
    ]
}

const REFRESH_MS: u64 = 300;
const BACKOFF_MS: u64 = 200;

/// Refresh-ahead against a model: reads run due refreshes inline (no spawner, no jitter), so
/// what a read returns and what is cached after it are fully determined.
fn run_refresh(ops: Vec<ROp>) -> Result<(), TestCaseError> {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    let clock = ManualClock::new();
    let version = Arc::new(AtomicU8::new(0));
    let v2 = version.clone();
    let cache: Cache<u8, u16> = Cache::builder()
        .max_capacity(1_000)
        .time_to_live(Duration::from_millis(TTL_MS))
        .refresh_after(Duration::from_millis(REFRESH_MS))
        .refresh_backoff(Duration::from_millis(BACKOFF_MS))
        .loader(move |k: &u8| {
            let v = v2.load(Ordering::SeqCst);
            if v % 2 == 1 {
                Err(herdcache::BoxError::from("odd version"))
            } else {
                Ok(u16::from(*k) * 1000 + u16::from(v))
            }
        })
        .clock(clock.clone())
        .build();
    // key → (value, expires at, refresh due at)
    let mut model: HashMap<u8, (u16, u64, u64)> = HashMap::new();
    let mut now = 0u64;
    let backend = |k: u8, v: u8| (v % 2 == 0).then(|| u16::from(k) * 1000 + u16::from(v));
    for op in ops {
        let ver = version.load(Ordering::SeqCst);
        match op {
            ROp::Load(k) | ROp::Get(k) => {
                let live = model.get(&k).copied().filter(|e| e.1 > now);
                let got = match op {
                    ROp::Load(_) => cache.load(k).ok(),
                    _ => cache.get(&k),
                };
                match live {
                    Some((v, _, due)) => {
                        prop_assert_eq!(got, Some(v), "a live value is served, even when due");
                        if due <= now {
                            // This read ran the refresh.
                            match backend(k, ver) {
                                Some(new) => {
                                    model.insert(k, (new, now + TTL_MS, now + REFRESH_MS));
                                }
                                None => {
                                    model.get_mut(&k).expect("live").2 = now + BACKOFF_MS;
                                }
                            }
                        }
                    }
                    None => {
                        let want = match op {
                            ROp::Load(_) => backend(k, ver),
                            _ => None,
                        };
                        prop_assert_eq!(got, want, "a miss loads (load) or returns None (get)");
                        if let Some(v) = want {
                            model.insert(k, (v, now + TTL_MS, now + REFRESH_MS));
                        } else {
                            model.remove(&k);
                        }
                    }
                }
            }
            ROp::Advance(ms) => {
                clock.advance(Duration::from_millis(u64::from(ms)));
                now += u64::from(ms);
            }
            ROp::Version(v) => version.store(v, Ordering::SeqCst),
            ROp::Invalidate(k) => {
                cache.invalidate(&k);
                model.remove(&k);
            }
        }
        cache.validate();
        prop_assert_eq!(cache.loads_in_flight(), 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn refresh_agrees_with_the_model(ops in prop::collection::vec(rop(), 1..150)) {
        run_refresh(ops)?;
    }
}
