//! `expire_after` combined with `time_to_live` and/or `time_to_idle` (as moka allows): an entry
//! expires at the earliest of its custom deadline, the time to live after its last write and
//! the time to idle after its last access; the `Expiry` hooks are told the custom deadline's
//! own remaining time. Checked against a model on random histories (manual clock), and on the
//! cases a port of moka's code meets first.

#![cfg(not(any(loom, shuttle)))]

mod common;

use common::Rng;
use herdcache::{Cache, Expiry, ManualClock};
use std::collections::HashMap;
use std::time::Duration;

const NEVER: u64 = u64::MAX;

/// What each hook returns, decided by the value (so the model can compute it too).
fn create(v: u64) -> Option<u64> {
    match v % 6 {
        0 => None,
        1 => Some(0),
        _ => Some(1 + (v >> 8) % 30),
    }
}
fn update(v: u64, remaining: Option<u64>) -> Option<u64> {
    if v % 3 == 0 {
        remaining
    } else {
        create(v >> 3)
    }
}
fn read(v: u64, remaining: Option<u64>) -> Option<u64> {
    match v % 4 {
        0 => remaining,
        1 => None,
        _ => Some(1 + (v >> 12) % 20),
    }
}

/// The hooks in seconds, as `Expiry`.
struct ByValue;
fn secs(d: Option<u64>) -> Option<Duration> {
    d.map(Duration::from_secs)
}
fn whole(d: Option<Duration>) -> Option<u64> {
    d.map(|d| {
        assert_eq!(d.subsec_nanos(), 0, "the clock moves by whole seconds");
        d.as_secs()
    })
}
impl Expiry<u32, u64> for ByValue {
    fn expire_after_create(&self, _: &u32, v: &u64) -> Option<Duration> {
        secs(create(*v))
    }
    fn expire_after_update(&self, _: &u32, v: &u64, r: Option<Duration>) -> Option<Duration> {
        secs(update(*v, whole(r)))
    }
    fn expire_after_read(&self, _: &u32, v: &u64, r: Option<Duration>) -> Option<Duration> {
        secs(read(*v, whole(r)))
    }
}

/// The model's entry: value, custom deadline, hard deadline (last write + ttl), last access.
#[derive(Clone, Copy, Debug)]
struct Model {
    v: u64,
    custom: u64,
    hard: u64,
    access: u64,
}

fn at(now: u64, d: Option<u64>) -> u64 {
    d.map_or(NEVER, |d| now.saturating_add(d))
}

impl Model {
    fn expires(&self, tti: Option<u64>) -> u64 {
        self.custom.min(self.hard).min(at(self.access, tti))
    }
}

fn remaining(now: u64, d: u64) -> Option<u64> {
    (d != NEVER).then(|| d.saturating_sub(now))
}

fn run(seed: u64, ttl: Option<u64>, tti: Option<u64>) {
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100_000)
        .expire_after(ByValue)
        .clock(clock.clone());
    if let Some(t) = ttl {
        b = b.time_to_live(Duration::from_secs(t));
    }
    if let Some(t) = tti {
        b = b.time_to_idle(Duration::from_secs(t));
    }
    let cache: Cache<u32, u64> = b.build();
    let mut rng = Rng(seed);
    let mut model: HashMap<u32, Model> = HashMap::new();
    let mut now = 0u64;
    for step in 0..3000 {
        let k = (rng.next() % 20) as u32;
        let live = model.get(&k).copied().filter(|m| m.expires(tti) > now);
        match rng.next() % 10 {
            0..=3 => {
                let v = rng.next();
                cache.insert(k, v);
                let custom = match live {
                    Some(m) => at(now, update(v, remaining(now, m.custom))),
                    None => at(now, create(v)),
                };
                let m = Model {
                    v,
                    custom,
                    hard: at(now, ttl),
                    access: now,
                };
                if m.expires(tti) > now {
                    model.insert(k, m);
                } else {
                    model.remove(&k);
                }
            }
            4..=7 => {
                let got = cache.get(&k);
                assert_eq!(
                    got,
                    live.map(|m| m.v),
                    "seed {seed} ttl {ttl:?} tti {tti:?} step {step}: get({k}) at {now} s"
                );
                match live {
                    Some(mut m) => {
                        m.custom = at(now, read(m.v, remaining(now, m.custom)));
                        m.access = now;
                        model.insert(k, m);
                    }
                    None => {
                        model.remove(&k);
                    }
                }
            }
            8 => {
                let d = rng.next() % 8;
                clock.advance(Duration::from_secs(d));
                now += d;
            }
            _ => {
                if rng.next() % 4 == 0 {
                    cache.run_pending_tasks();
                    cache.validate();
                }
                assert_eq!(cache.contains_key(&k), live.is_some(), "contains_key({k})");
            }
        }
    }
    cache.run_pending_tasks();
    let alive = model.values().filter(|m| m.expires(tti) > now).count();
    assert_eq!(cache.entry_count(), alive as u64, "seed {seed}");
}

#[test]
fn custom_expiry_with_a_time_to_live_and_idle_matches_the_model() {
    for seed in [1u64, 7, 42, 2024] {
        run(seed, Some(25), None);
        run(seed, None, Some(12));
        run(seed, Some(25), Some(12));
        run(seed, None, None);
    }
}

/// A port's first case: an `Expiry` that says "never" bounded by a time to live; an update
/// restarts the time to live while the custom deadline (never) stays as the hook said.
#[test]
fn a_time_to_live_bounds_an_expiry_that_says_never() {
    struct Forever;
    impl Expiry<u32, u32> for Forever {}
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(10)
        .expire_after(Forever)
        .time_to_live(Duration::from_secs(60))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(50));
    assert_eq!(cache.get(&1), Some(1)); // a read does not move the time to live
    clock.advance(Duration::from_secs(9));
    cache.insert(1, 2); // an update: the hook keeps "never", the time to live restarts
    clock.advance(Duration::from_secs(59));
    assert_eq!(cache.get(&1), Some(2));
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.get(&1), None);
}
