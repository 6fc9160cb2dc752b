#![cfg(not(any(loom, shuttle)))]
//! Round 67 of the outside attacks: a randomized single-threaded model of the public API with
//! one fault injected per operation (the weigher, an `Expiry`, the eviction listener, a key's
//! or value's `Clone` / `Drop` / `Hash` / `Eq`, loaders and closures), checked after every
//! operation against the docs (contents, removals reported once, removal statistics, weights,
//! the misses identity, `validate()`). About 17,900 rounds of 300 operations; two findings,
//! both fixed in this stop, each swept here over its neighbours:
//!
//! 1. *A refresh counted as failed, never as started.* A refresh-ahead whose loader panicked
//!    leaves a registration of the key for the refresh backoff. The next refresh's claim sweeps
//!    it — dropping its key (user `Drop`) — and the refresh was counted as started only after
//!    the claim returned: when that `Drop` panicked, the refresh's guard ended it as failed
//!    (`refreshes_failed` and `load_failures` + 1) with `refreshes_started` unchanged. Now it
//!    is counted at its registration, before anything it swept is dropped.
//! 2. *`get_all` lost loaded values to a panicking listener.* Storing the first of
//!    `load_missing`'s values evicted an entry whose listener (or value's `Drop`) panicked, and
//!    the panic was resumed at once: the other values were neither stored nor reported, counted
//!    as failed loads. The listener's docs promise that "the operation that removed the entries
//!    has completed" before the panic is resumed; `get_all` now stores every loaded value first.

mod common;

use common::{eventually, quiet_injected_panics, watchdog};
use herdcache::{BoxError, Cache, CacheStats, EvictionPolicy, ManualClock};
use std::cell::Cell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

thread_local! {
    /// The next `Drop` of a [`DropKey`] on this thread panics.
    static PANIC_NEXT_KEY_DROP: Cell<bool> = const { Cell::new(false) };
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct DropKey(u32);

impl Drop for DropKey {
    fn drop(&mut self) {
        if !std::thread::panicking() && PANIC_NEXT_KEY_DROP.with(|p| p.replace(false)) {
            panic!("injected: key drop");
        }
    }
}

/// The statistics' two balances: every miss (and every refresh) ends as exactly one load,
/// join or negative hit; every refresh started ends as a success or a failure.
fn balanced(d: &CacheStats) -> Result<(), String> {
    let answered =
        d.load_successes + d.load_failures + d.loads_abandoned + d.coalesced + d.negative_hits;
    if d.misses + d.refreshes_started != answered {
        return Err(format!(
            "misses {} + refreshes started {} != loads {}+{}+{} + coalesced {} + negative hits {}",
            d.misses,
            d.refreshes_started,
            d.load_successes,
            d.load_failures,
            d.loads_abandoned,
            d.coalesced,
            d.negative_hits
        ));
    }
    if d.refreshes_started != d.refreshes_succeeded + d.refreshes_failed {
        return Err(format!(
            "refreshes started {} != succeeded {} + failed {}",
            d.refreshes_started, d.refreshes_succeeded, d.refreshes_failed
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Spawn {
    /// The reader runs the refresh.
    Inline,
    /// A spawner that runs the job at once, on the reader's thread.
    RunNow,
    /// A spawner that runs the job on a new thread.
    Thread,
}

/// Finding 1, swept: the readers that start a refresh, each way a refresh runs, with the
/// swept registration's key `Drop` panicking or not. Every case must balance, leave nothing
/// in flight, and refresh the key again once the backoff has passed (the claim was not lost).
#[test]
fn a_refresh_that_sweeps_a_panicking_registration_counts_as_started() {
    let _w = watchdog(Duration::from_secs(120), "attack_s67 refresh sweep");
    quiet_injected_panics();
    let mut bad = Vec::new();
    for spawn in [Spawn::Inline, Spawn::RunNow, Spawn::Thread] {
        for call in ["get", "get_with", "load", "entry_by_ref.or_insert_with"] {
            for drop_panics in [false, true] {
                let what = format!("{spawn:?}, {call}, key drop panics: {drop_panics}");
                let clock = ManualClock::new();
                let failing = Arc::new(AtomicBool::new(true));
                let f = Arc::clone(&failing);
                let mut b = Cache::builder()
                    .max_capacity(10)
                    .record_stats()
                    .clock(clock.clone())
                    .refresh_after(Duration::from_millis(500))
                    .refresh_backoff(Duration::from_secs(1))
                    .loader(move |k: &DropKey| {
                        if f.load(SeqCst) {
                            panic!("injected: loader");
                        }
                        Ok::<_, BoxError>(k.0 + 100)
                    });
                b = match spawn {
                    Spawn::Inline => b,
                    Spawn::RunNow => b.spawner(|job| job()),
                    Spawn::Thread => b.spawner(|job| {
                        std::thread::spawn(job);
                    }),
                };
                let cache: Cache<DropKey, u32> = b.build();
                let settled = || eventually(|| cache.loads_in_flight() == 0);
                cache.insert(DropKey(1), 1);
                clock.advance(Duration::from_secs(1));
                // The first refresh: its loader panics, the value stays.
                let _ = catch_unwind(AssertUnwindSafe(|| cache.get(&DropKey(1))));
                settled();
                clock.advance(Duration::from_secs(3)); // past the backoff: due again
                let k = DropKey(1);
                PANIC_NEXT_KEY_DROP.with(|p| p.set(drop_panics));
                let r = catch_unwind(AssertUnwindSafe(|| match call {
                    "get" => cache.get(&k),
                    "get_with" => Some(cache.get_with(k.clone(), || 2)),
                    "load" => cache.load(k.clone()).ok(),
                    _ => Some(cache.entry_by_ref(&k).or_insert_with(|| 2).into_value()),
                }));
                PANIC_NEXT_KEY_DROP.with(|p| p.set(false));
                if !settled() {
                    bad.push(format!("{what}: a load still in flight"));
                    continue;
                }
                if let Err(e) = balanced(&cache.stats()) {
                    bad.push(format!(
                        "{what} (the read {}): {e}",
                        if r.is_ok() { "returned" } else { "panicked" }
                    ));
                }
                // The key refreshes again once the backoff has passed: the claim was not lost.
                failing.store(false, SeqCst);
                clock.advance(Duration::from_secs(3));
                let _ = cache.get(&DropKey(1));
                settled();
                let now = cache.get(&DropKey(1));
                if now != Some(101) {
                    bad.push(format!(
                        "{what}: after the backoff the key holds {now:?}, not the refreshed 101"
                    ));
                }
                if let Err(e) = balanced(&cache.stats()) {
                    bad.push(format!("{what}, after the last refresh: {e}"));
                }
                cache.validate();
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// A value whose `Drop` panics once armed.
#[derive(Clone, Debug)]
struct DropVal(u32, Arc<AtomicBool>);

impl Drop for DropVal {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.1.swap(false, SeqCst) {
            panic!("injected: value drop");
        }
    }
}

/// Finding 2, swept: `get_all` over a full cache, where storing the loaded values evicts
/// entries whose eviction listener — or whose value's `Drop` — panics at the first, a middle
/// or the last eviction. Every value `load_missing` returned is stored (kept, or evicted and
/// reported), each counted as a successful load, the panic reaches the caller, nothing is left
/// in flight and the statistics balance.
#[test]
fn get_all_stores_every_loaded_value_before_a_removal_panic() {
    let _w = watchdog(Duration::from_secs(60), "attack_s67 get_all sweep");
    quiet_injected_panics();
    let mut bad = Vec::new();
    for by_drop in [false, true] {
        for panic_at in 1..=4usize {
            let what = format!(
                "{} panics at eviction {panic_at}",
                if by_drop {
                    "an evicted value's Drop"
                } else {
                    "the listener"
                }
            );
            let armed = Arc::new(AtomicBool::new(false));
            let evictions = Arc::new(AtomicUsize::new(0));
            let reported = Arc::new(Mutex::new(Vec::new()));
            let (a, e, r) = (
                Arc::clone(&armed),
                Arc::clone(&evictions),
                Arc::clone(&reported),
            );
            let cache: Cache<u32, DropVal> = Cache::builder()
                .max_capacity(2)
                .shards(1)
                .eviction_policy(EvictionPolicy::lru())
                .record_stats()
                .eviction_listener(move |k: &u32, v: &DropVal, _| {
                    r.lock().unwrap().push(*k);
                    let n = e.fetch_add(1, SeqCst) + 1;
                    if n == panic_at {
                        if by_drop {
                            v.1.store(true, SeqCst); // this value's Drop panics
                        } else if a.load(SeqCst) {
                            panic!("injected: listener");
                        }
                    }
                })
                .build();
            let flag = Arc::new(AtomicBool::new(false));
            cache.insert(1, DropVal(10, Arc::clone(&flag)));
            cache.insert(2, DropVal(20, Arc::clone(&flag)));
            evictions.store(0, SeqCst);
            armed.store(true, SeqCst);
            let before = cache.stats();
            let keys = [3u32, 4, 5, 6];
            let result = catch_unwind(AssertUnwindSafe(|| {
                cache.get_all(keys, |missing: &[u32]| {
                    missing
                        .iter()
                        .map(|&k| (k, DropVal(k * 10, Arc::new(AtomicBool::new(false)))))
                        .collect::<HashMap<_, _>>()
                })
            }));
            armed.store(false, SeqCst);
            if result.is_ok() {
                bad.push(format!("{what}: get_all returned (the panic was lost)"));
            }
            let held: Vec<u32> = cache.iter().map(|(k, _)| k).collect();
            for (k, v) in cache.iter() {
                if v.0 != k * 10 {
                    bad.push(format!("{what}: key {k} holds {}", v.0));
                }
            }
            let reported = reported.lock().unwrap().clone();
            for k in keys {
                if !held.contains(&k) && !reported.contains(&k) {
                    bad.push(format!(
                        "{what}: key {k}'s loaded value neither stored nor reported (held {held:?}, reported {reported:?})"
                    ));
                }
            }
            let d = cache.stats() - before;
            if d.load_successes != keys.len() as u64 || d.load_failures != 0 {
                bad.push(format!(
                    "{what}: loads ok {} failed {} (want {} and 0)",
                    d.load_successes,
                    d.load_failures,
                    keys.len()
                ));
            }
            if let Err(e) = balanced(&d) {
                bad.push(format!("{what}: {e}"));
            }
            if cache.loads_in_flight() != 0 {
                bad.push(format!("{what}: a load left in flight"));
            }
            cache.validate();
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}
