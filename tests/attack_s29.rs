//! Attack round s29: expiry reclamation under a clock moved by other threads (siblings of the
//! late-filed deadline), user code that panics or re-enters at each call site of the
//! `get_with_if` / entry / by-ref families, and edge durations and capacities. Public API
//! only (plus the `testing` feature's `validate` / `loads_in_flight`).
//!
//! Run with `cargo test --test attack_s29 --features testing`.
//!
//! Findings (tests named `finding_*`, failing on the code they were written against):
//! * a key's `Hash` that panics inside the shard's own hashing leaves the shard inconsistent:
//!   during expiry reclamation (the drained bucket's other expired entries are never reclaimed:
//!   `finding_hash_panic_during_reclaim_strands_expired_entries`,
//!   `finding_hash_panic_during_insert_maintenance_strands_expired_entries`), during eviction
//!   (entries drop out of the policy's queues and can never be evicted:
//!   `finding_hash_panic_during_eviction_corrupts_the_policy`), and while the frequency sketch
//!   grows on an insert (`finding_hash_panic_while_the_sketch_grows_leaves_an_unqueued_entry`);
//! * with `jitter`, an update whose `Expiry::expire_after_update` leaves the lifetime unchanged
//!   re-jitters the remaining time on every write (`finding_jitter_*`);
//! * removal causes: a live value replaced by one whose update lifetime is zero is reported
//!   `Expired` (moka: `Replaced`); `invalidate_all` reports entries already past their deadline
//!   as `Explicit` (`invalidate`, `remove`, `retain` and moka: `Expired`).
//!
//! Tests named `probe_*` pass: regression tests for the risky paths they probe.

#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]

mod common;

use common::{quiet_injected_panics, watchdog, within};
use herdcache::{BoxError, Cache, Expiry, ManualClock, Op, RemovalCause};
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const SEC: Duration = Duration::from_secs(1);

type Log = Arc<Mutex<Vec<(u64, u64, RemovalCause)>>>;

fn recorder() -> (
    Log,
    impl Fn(&u64, &u64, RemovalCause) + Send + Sync + 'static,
) {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    (log, move |k: &u64, v: &u64, c| {
        l.lock().unwrap().push((*k, *v, c))
    })
}

// =============================================================================================
// 1. Reclamation while other threads move the clock
// =============================================================================================

/// An `Expiry` whose reads can move a deadline earlier (note_refile under the read lock) and
/// whose updates move it later.
struct Shifty;
impl Expiry<u64, u64> for Shifty {
    fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
        Some(Duration::from_millis(500 + (v % 7) * 400))
    }
    fn expire_after_read(&self, _k: &u64, v: &u64, r: Option<Duration>) -> Option<Duration> {
        match v % 3 {
            0 => Some(Duration::from_millis(300)),
            1 => r,
            _ => Some(Duration::from_millis(2_500)),
        }
    }
    fn expire_after_update(&self, _k: &u64, v: &u64, r: Option<Duration>) -> Option<Duration> {
        if v % 2 == 0 {
            Some(Duration::from_secs(3))
        } else {
            r
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Conf {
    Ttl,
    Tti,
    TtlTti,
    Custom,
    CustomTtl,
    CustomTti,
    TtlFailSafe,
    TtiFailSafe,
    CustomFailSafe,
    TtlJitter,
}

/// Longest any entry can live past its last touch, stale window included.
const HORIZON: Duration = Duration::from_secs(20);

fn build_cap(
    conf: Conf,
    shards: usize,
    clock: &ManualClock,
    log: &Log,
    cap: u64,
) -> Cache<u64, u64> {
    let l = Arc::clone(log);
    let b = Cache::builder()
        .max_capacity(cap)
        .record_stats()
        .shards(shards)
        .clock(clock.clone())
        .eviction_listener(move |k: &u64, v: &u64, c| l.lock().unwrap().push((*k, *v, c)));
    let b = match conf {
        Conf::Ttl => b.time_to_live(2 * SEC),
        Conf::Tti => b.time_to_idle(2 * SEC),
        Conf::TtlTti => b.time_to_live(3 * SEC).time_to_idle(SEC),
        Conf::Custom => b.expire_after(Shifty),
        Conf::CustomTtl => b.expire_after(Shifty).time_to_live(2 * SEC),
        Conf::CustomTti => b.expire_after(Shifty).time_to_idle(SEC),
        Conf::TtlFailSafe => b.time_to_live(2 * SEC).fail_safe(5 * SEC),
        Conf::TtiFailSafe => b.time_to_idle(2 * SEC).fail_safe(5 * SEC),
        Conf::CustomFailSafe => b.expire_after(Shifty).fail_safe(5 * SEC),
        Conf::TtlJitter => b.time_to_live(2 * SEC).jitter(0.5),
    };
    b.build()
}

/// Writers (insert, upsert, get_with, entry or_insert, removals) and readers (which move idle
/// and custom deadlines under the read lock) race a thread that advances the clock by whole
/// lifetimes and runs `run_pending_tasks` / `retain`. After they join and the clock passes
/// every lifetime, `run_pending_tasks` must leave nothing: no entry, no weight, every stored
/// value reported exactly once.
fn reclaim_round(conf: Conf, shards: usize, seed: u64) -> Result<(), String> {
    let clock = ManualClock::new();
    let (log, _) = recorder();
    // Small capacities too: evictions for size race the reclaim.
    let cap = if seed % 2 == 0 { 100_000 } else { 24 };
    let cache = build_cap(conf, shards, &clock, &log, cap);
    let inserted: Mutex<Vec<u64>> = Mutex::new(Vec::new()); // values that went in for sure
    let loaded: Mutex<Vec<u64>> = Mutex::new(Vec::new()); // values that may have gone in
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        let mut writers = Vec::new();
        for t in 0..3u64 {
            let cache = cache.clone();
            let inserted = &inserted;
            let loaded = &loaded;
            writers.push(s.spawn(move || {
                let mut r = common::Rng(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut mine = Vec::new();
                let mut maybe = Vec::new();
                for i in 0..2_000u64 {
                    let k = r.next() % 48;
                    let v = (t << 40) | (i << 8) | (r.next() % 256);
                    match r.next() % 10 {
                        0..=3 => {
                            cache.insert(k, v);
                            mine.push(v);
                        }
                        4 => {
                            // A plain write or invalidation while it computes wins over
                            // it (documented): its value may never go in.
                            cache.entry(k).and_upsert_with(|_| v);
                            maybe.push(v);
                        }
                        5 => {
                            cache.get_with(k, || {
                                maybe.push(v);
                                v
                            });
                        }
                        6 => {
                            cache.entry(k).or_insert_with(|| {
                                maybe.push(v);
                                v
                            });
                        }
                        7 => {
                            cache.invalidate(&k);
                        }
                        8 if i % 2 == 0 => match i % 8 {
                            0 => {
                                let _ = cache.get_with_if(
                                    k,
                                    || {
                                        maybe.push(v);
                                        v
                                    },
                                    |x| x % 2 == 0,
                                );
                            }
                            2 => drop(cache.entry(k).or_insert_with_if(
                                || {
                                    maybe.push(v);
                                    v
                                },
                                |x| x % 3 == 0,
                            )),
                            4 => {
                                let _ = cache.get_with_by_ref(&k, || {
                                    maybe.push(v);
                                    v
                                });
                            }
                            _ => drop(cache.entry(k).and_compute_with(|e| match e {
                                Some(e) if *e.value() % 2 == 1 => Op::Remove,
                                _ => {
                                    maybe.push(v);
                                    Op::Put(v)
                                }
                            })),
                        },
                        _ => {
                            let _ = cache.get(&k);
                            let _ = cache.get_or_stale(&k);
                        }
                    }
                }
                inserted.lock().unwrap().extend(mine);
                loaded.lock().unwrap().extend(maybe);
            }));
        }
        let c2 = cache.clone();
        let stop = &stop;
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for k in 0..48u64 {
                    let _ = c2.get(&k);
                }
            }
        });
        let c3 = cache.clone();
        let clock = &clock;
        s.spawn(move || {
            let mut r = common::Rng(seed | 1);
            while !stop.load(Ordering::Relaxed) {
                clock.advance(Duration::from_millis(r.next() % 3_000));
                match r.next() % 9 {
                    8 => c3.validate(),
                    2 if r.next() % 4 == 0 => c3.invalidate_all(),
                    0 => c3.retain(|_, v| v % 5 != 0),
                    1 => {
                        let _ = c3.invalidate_entries_if(|k, _| k % 11 == 0);
                    }
                    _ => c3.run_pending_tasks(),
                }
                std::thread::yield_now();
            }
        });
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    cache.validate();
    clock.advance(HORIZON);
    cache.run_pending_tasks();
    cache.validate();
    let mut problems = Vec::new();
    if cache.entry_count() != 0 || cache.weighted_size() != 0 {
        problems.push(format!(
            "left: {} entries, weight {}: {:?}",
            cache.entry_count(),
            cache.weighted_size(),
            cache.iter().collect::<Vec<_>>()
        ));
    }
    if cache.loads_in_flight() != 0 {
        problems.push(format!("{} loads in flight", cache.loads_in_flight()));
    }
    let log = log.lock().unwrap();
    // The statistics' removals by cause match what the listener was told.
    let st = cache.stats();
    let by = |c: RemovalCause| log.iter().filter(|e| e.2 == c).count() as u64;
    let stats = [
        st.expired.count,
        st.explicit.count,
        st.replaced.count,
        st.size.count,
    ];
    let told = [
        by(RemovalCause::Expired),
        by(RemovalCause::Explicit),
        by(RemovalCause::Replaced),
        by(RemovalCause::Size),
    ];
    if stats != told {
        problems.push(format!(
            "stats (expired, explicit, replaced, size) {stats:?} != listener {told:?}"
        ));
    }
    let mut seen: HashMap<u64, Vec<RemovalCause>> = HashMap::new();
    for &(_, v, c) in log.iter() {
        seen.entry(v).or_default().push(c);
    }
    for (v, causes) in &seen {
        if causes.len() != 1 {
            problems.push(format!("value {v:#x} reported {causes:?}"));
        }
    }
    let inserted = inserted.into_inner().unwrap();
    let missing: Vec<_> = inserted
        .iter()
        .filter(|&&v| !seen.contains_key(&(v & !0x8000_0000_0000_0000)))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} inserted values never reported, e.g. {:#x?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    let known: HashSet<u64> = inserted
        .iter()
        .map(|v| v & !0x8000_0000_0000_0000)
        .chain(loaded.into_inner().unwrap())
        .collect();
    let unknown: Vec<_> = seen.keys().filter(|v| !known.contains(v)).collect();
    if !unknown.is_empty() {
        problems.push(format!("reported values never written: {unknown:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.truncate(6);
        Err(format!(
            "{conf:?}, {shards} shards, seed {seed}: {problems:?}"
        ))
    }
}

fn reclaim_all_rounds(conf: Conf) {
    let _dog = watchdog(Duration::from_secs(240), "reclaim rounds");
    let mut failures = Vec::new();
    let rounds = std::env::var("S29_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6u64);
    for round in 0..rounds {
        for shards in [1, 4] {
            if let Err(e) = reclaim_round(conf, shards, 0x5EED_0000 + round * 7 + shards as u64) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One test per configuration.
macro_rules! reclaim_tests {
    ($($name:ident => $conf:ident,)*) => {
        $(
            #[test]
            fn $name() {
                reclaim_all_rounds(Conf::$conf);
            }
        )*
    };
}

reclaim_tests! {
    probe_reclaim_under_moving_clock_ttl => Ttl,
    probe_reclaim_under_moving_clock_tti => Tti,
    probe_reclaim_under_moving_clock_ttl_tti => TtlTti,
    probe_reclaim_under_moving_clock_custom => Custom,
    probe_reclaim_under_moving_clock_custom_ttl => CustomTtl,
    probe_reclaim_under_moving_clock_custom_tti => CustomTti,
    probe_reclaim_under_moving_clock_ttl_fail_safe => TtlFailSafe,
    probe_reclaim_under_moving_clock_tti_fail_safe => TtiFailSafe,
    probe_reclaim_under_moving_clock_custom_fail_safe => CustomFailSafe,
    probe_reclaim_under_moving_clock_ttl_jitter => TtlJitter,
}

// =============================================================================================
// 2. User code that panics or re-enters, at each call site
// =============================================================================================

/// Per-test switches for hostile keys and values: each fires (panics with "injected") when
/// set to the id of the key or value being handled.
#[derive(Default)]
struct Traps {
    key_clone: AtomicU64,
    key_eq: AtomicU64,
    key_hash: AtomicU64,
    val_clone: AtomicU64,
    /// Every key below this id panics when hashed (0: none).
    hash_below: AtomicU64,
}

const OFF: u64 = u64::MAX;

impl Traps {
    fn new() -> Arc<Self> {
        let t = Traps::default();
        for a in [&t.key_clone, &t.key_eq, &t.key_hash, &t.val_clone] {
            a.store(OFF, Ordering::SeqCst);
        }
        Arc::new(t)
    }
}

#[derive(Clone)]
struct HKeyInner(u64, Arc<Traps>);

/// A key whose `Clone`, `Eq` and `Hash` can be made to panic.
struct HKey(HKeyInner);

impl HKey {
    fn new(id: u64, t: &Arc<Traps>) -> Self {
        HKey(HKeyInner(id, Arc::clone(t)))
    }
}

impl Clone for HKey {
    fn clone(&self) -> Self {
        if self.0 .1.key_clone.load(Ordering::SeqCst) == self.0 .0 {
            panic!("injected key clone");
        }
        HKey(self.0.clone())
    }
}
impl PartialEq for HKey {
    fn eq(&self, o: &Self) -> bool {
        if self.0 .1.key_eq.load(Ordering::SeqCst) == self.0 .0 {
            panic!("injected key eq");
        }
        self.0 .0 == o.0 .0
    }
}
impl Eq for HKey {}
impl std::hash::Hash for HKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        if self.0 .1.key_hash.load(Ordering::SeqCst) == self.0 .0
            || self.0 .0 < self.0 .1.hash_below.load(Ordering::SeqCst)
        {
            panic!("injected key hash");
        }
        self.0 .0.hash(h)
    }
}
impl std::fmt::Debug for HKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "k{}", self.0 .0)
    }
}

/// A value whose `Clone` can be made to panic.
struct HVal(u64, Arc<Traps>);
impl Clone for HVal {
    fn clone(&self) -> Self {
        if self.1.val_clone.load(Ordering::SeqCst) == self.0 {
            panic!("injected value clone");
        }
        HVal(self.0, Arc::clone(&self.1))
    }
}
impl std::fmt::Debug for HVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

fn hcache(t: &Arc<Traps>) -> Cache<HKey, HVal> {
    let _ = t;
    Cache::builder().max_capacity(100).build()
}

/// After a panic: no load left in flight, the accounting exact, the key usable.
fn usable(cache: &Cache<HKey, HVal>, t: &Arc<Traps>, id: u64) {
    assert_eq!(cache.loads_in_flight(), 0, "a load left in flight");
    cache.validate();
    let r = within(Duration::from_secs(10), {
        let cache = cache.clone();
        let t = Arc::clone(t);
        move || {
            cache
                .get_with(HKey::new(id, &t), || HVal(4242, Arc::clone(&t)))
                .0
        }
    })
    .expect("the key is stuck: get_with hangs");
    assert!(
        r.is_ok(),
        "get_with of the key panics after the trap is off"
    );
    cache.validate();
}

#[test]
fn probe_get_with_if_second_judgement_panics() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "second judgement panics");
    let t = Traps::new();
    let cache = hcache(&t);
    cache.insert(HKey::new(1, &t), HVal(10, Arc::clone(&t)));
    let calls = AtomicUsize::new(0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with_if(
            HKey::new(1, &t),
            || HVal(20, Arc::clone(&t)),
            |_| {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    panic!("injected judge");
                }
                true
            },
        )
    }));
    assert!(r.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.get(&HKey::new(1, &t)).map(|v| v.0), Some(10));
    usable(&cache, &t, 1);
}

#[test]
fn probe_get_with_if_value_clone_panics_at_second_judgement() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "value clone at second judgement");
    let t = Traps::new();
    let cache = hcache(&t);
    cache.insert(HKey::new(1, &t), HVal(10, Arc::clone(&t)));
    let calls = AtomicUsize::new(0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with_if(
            HKey::new(1, &t),
            || HVal(20, Arc::clone(&t)),
            |_| {
                // After the first verdict, the next clone of 10 (the second look) panics.
                calls.fetch_add(1, Ordering::SeqCst);
                t.val_clone.store(10, Ordering::SeqCst);
                true
            },
        )
    }));
    t.val_clone.store(OFF, Ordering::SeqCst);
    assert!(r.is_err(), "the clone trap fired");
    assert_eq!(cache.get(&HKey::new(1, &t)).map(|v| v.0), Some(10));
    usable(&cache, &t, 1);
}

#[test]
fn probe_get_with_if_judge_reenters_same_key() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "judge re-enters");
    let t = Traps::new();
    let cache = hcache(&t);
    cache.insert(HKey::new(1, &t), HVal(10, Arc::clone(&t)));
    // At the second judgement the judge writes the key. The write came before the load began
    // (it supersedes the claimed load, whose replacement would lose to it): the caller claims
    // again, the judge is asked about the written value, rejects it, and `init` replaces it.
    let calls = AtomicUsize::new(0);
    let judged = std::sync::Mutex::new(Vec::new());
    let v = cache.get_with_if(
        HKey::new(1, &t),
        || HVal(30, Arc::clone(&t)),
        |v| {
            judged.lock().unwrap().push(v.0);
            if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                cache.insert(HKey::new(1, &t), HVal(77, Arc::clone(&t)));
            }
            true
        },
    );
    assert_eq!(v.0, 30, "init's value is returned");
    let judged = judged.into_inner().unwrap();
    assert!(
        judged.contains(&77),
        "the value written during the claim was judged: {judged:?}"
    );
    assert_eq!(
        cache.get(&HKey::new(1, &t)).map(|v| v.0),
        Some(30),
        "the write during the claim, judged and rejected, is replaced"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    // At the second judgement the judge replaces the key: recursion, a panic, not a hang.
    let calls = AtomicUsize::new(0);
    let r = within(Duration::from_secs(10), {
        let cache = cache.clone();
        let t = Arc::clone(&t);
        move || {
            cache.get_with_if(
                HKey::new(1, &t),
                || HVal(31, Arc::clone(&t)),
                |_| {
                    if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                        // (a get_with would hit the present value: this one wants to replace)
                        let _ = cache.get_with_if(
                            HKey::new(1, &t),
                            || HVal(32, Arc::clone(&t)),
                            |_| true,
                        );
                    }
                    true
                },
            )
        }
    })
    .expect("a judge that loads its own key hangs");
    assert!(r.is_err(), "recursion panics");
    usable(&cache, &t, 1);
}

#[test]
fn probe_get_with_value_clone_panics_at_publish() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "value clone at publish");
    let t = Traps::new();
    let cache = hcache(&t);
    t.val_clone.store(5, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with(HKey::new(1, &t), || HVal(5, Arc::clone(&t)))
    }));
    t.val_clone.store(OFF, Ordering::SeqCst);
    assert!(r.is_err());
    assert_eq!(cache.entry_count(), 0);
    usable(&cache, &t, 1);
}

#[test]
fn probe_get_with_by_ref_key_clone_panics() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "key clone in by_ref");
    let t = Traps::new();
    let cache = hcache(&t);
    t.key_clone.store(1, Ordering::SeqCst);
    let k = HKey::new(1, &t);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with_by_ref(&k, || HVal(5, Arc::clone(&t)))
    }));
    t.key_clone.store(OFF, Ordering::SeqCst);
    assert!(r.is_err());
    usable(&cache, &t, 1);
    // And the async form.
    t.key_clone.store(2, Ordering::SeqCst);
    let k = HKey::new(2, &t);
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(
            cache.get_with_by_ref_async(&k, async { HVal(6, Arc::clone(&t)) }),
        )
    }));
    t.key_clone.store(OFF, Ordering::SeqCst);
    assert!(r.is_err());
    usable(&cache, &t, 2);
}

/// A key's `Eq` panics while a second caller claims the key whose load another thread runs
/// (the flight registry compares keys under the write lock).
#[test]
fn probe_key_eq_panics_while_joining_a_load() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "eq panics while joining");
    let t = Traps::new();
    let cache = hcache(&t);
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (in_tx, in_rx) = std::sync::mpsc::channel::<()>();
    let leader = {
        let cache = cache.clone();
        let t = Arc::clone(&t);
        std::thread::spawn(move || {
            cache
                .get_with(HKey::new(1, &t), || {
                    in_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    HVal(7, Arc::clone(&t))
                })
                .0
        })
    };
    in_rx.recv().unwrap();
    t.key_eq.store(1, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with(HKey::new(1, &t), || HVal(8, Arc::clone(&t)))
    }));
    t.key_eq.store(OFF, Ordering::SeqCst);
    go_tx.send(()).unwrap();
    assert_eq!(leader.join().unwrap(), 7);
    let _ = r; // may or may not have hit Eq: either way the key must stay sound
    assert_eq!(cache.get(&HKey::new(1, &t)).map(|v| v.0), Some(7));
    usable(&cache, &t, 1);
}

/// A key whose `Hash` panics during a load's publish (the table grows, rehashing every key):
/// the cache stays consistent and the load is not left in flight.
#[test]
fn probe_key_hash_panics_during_table_growth_in_publish() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "hash panics during growth");
    let t = Traps::new();
    let cache: Cache<HKey, HVal> = Cache::builder().max_capacity(10_000).shards(1).build();
    cache.insert(HKey::new(0, &t), HVal(0, Arc::clone(&t)));
    let mut panicked = 0;
    for id in 1..200u64 {
        // Key 0's hash panics while a new key is stored: every growth of the table rehashes it.
        t.key_hash.store(OFF, Ordering::SeqCst);
        let k = HKey::new(id, &t);
        let r = catch_unwind(AssertUnwindSafe(|| {
            cache.get_with(k, || {
                t.key_hash.store(0, Ordering::SeqCst);
                HVal(id, Arc::clone(&t))
            })
        }));
        t.key_hash.store(OFF, Ordering::SeqCst);
        if r.is_err() {
            panicked += 1;
            assert_eq!(cache.loads_in_flight(), 0, "id {id}");
            cache.validate();
        }
    }
    assert!(panicked >= 1, "the growth trap never fired");
    cache.validate();
    assert_eq!(cache.loads_in_flight(), 0);
}

struct PanicOn(u64);
impl Expiry<u64, u64> for PanicOn {
    fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
        if *v == self.0 {
            panic!("injected expiry create");
        }
        Some(Duration::from_secs(10))
    }
    fn expire_after_update(&self, _k: &u64, v: &u64, r: Option<Duration>) -> Option<Duration> {
        if *v == self.0 {
            panic!("injected expiry update");
        }
        r
    }
    fn expire_after_read(&self, _k: &u64, v: &u64, r: Option<Duration>) -> Option<Duration> {
        if *v == self.0 + 1 {
            panic!("injected expiry read");
        }
        r
    }
}

/// `Expiry` hooks that panic in every write path (a load's publish, a computation, an
/// insert, a replacement, a read): the panic reaches the caller, nothing is left in flight,
/// the old value (if any) stays, and the cache validates.
#[test]
fn probe_expiry_panics_in_every_write_path() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "expiry panics");
    let clock = ManualClock::new();
    let (log, listener) = recorder();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(PanicOn(666))
        .time_to_live(Duration::from_secs(60))
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    let paths: Vec<(&str, Box<dyn Fn(&Cache<u64, u64>, u64)>)> = vec![
        ("insert", Box::new(|c, k| c.insert(k, 666))),
        (
            "get_with",
            Box::new(|c, k| {
                let _ = c.get_with(k, || 666);
            }),
        ),
        (
            "get_with_if",
            Box::new(|c, k| {
                let _ = c.get_with_if(k, || 666, |_| true);
            }),
        ),
        (
            "and_upsert_with",
            Box::new(|c, k| {
                let _ = c.entry(k).and_upsert_with(|_| 666);
            }),
        ),
        (
            "and_compute_with",
            Box::new(|c, k| {
                let _ = c.entry(k).and_compute_with(|_| Op::Put(666));
            }),
        ),
        (
            "or_insert_with",
            Box::new(|c, k| {
                let _ = c.entry(k).or_insert_with(|| 666);
            }),
        ),
        (
            "get_with_by_ref",
            Box::new(|c, k| {
                let _ = c.get_with_by_ref(&k, || 666);
            }),
        ),
    ];
    for (i, (name, f)) in paths.iter().enumerate() {
        for present in [false, true] {
            let k = (i as u64) * 10 + present as u64;
            if present {
                cache.insert(k, 1);
            }
            let r = catch_unwind(AssertUnwindSafe(|| f(&cache, k)));
            if !(*name == "get_with" || *name == "or_insert_with" || *name == "get_with_by_ref")
                || !present
            {
                assert!(r.is_err(), "{name} present={present}: the hook panicked");
            }
            assert_eq!(cache.loads_in_flight(), 0, "{name} present={present}");
            cache.validate();
            assert_eq!(
                cache.get(&k),
                present.then_some(1),
                "{name} present={present}: the old value stays"
            );
            // The key is usable.
            let v = within(Duration::from_secs(10), {
                let cache = cache.clone();
                move || cache.get_with_if(k, || 5, |_| true)
            })
            .expect("stuck")
            .expect("panicked");
            assert_eq!(v, 5, "{name}");
            cache.validate();
        }
    }
    // A read hook that panics (under the read lock).
    cache.insert(500, 667);
    assert!(catch_unwind(AssertUnwindSafe(|| cache.get(&500))).is_err());
    cache.insert(500, 1);
    assert_eq!(cache.get(&500), Some(1));
    cache.validate();
    // Every value that went in and left was reported once; 666 never went in.
    clock.advance(Duration::from_secs(100));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    let log = log.lock().unwrap();
    assert!(
        log.iter().all(|e| e.1 != 666),
        "a value never stored is reported: {log:?}"
    );
}

// =============================================================================================
// 3. Shard counts, tiny capacities, extreme durations
// =============================================================================================

#[test]
fn probe_shard_rounding_and_bounds() {
    for (n, want) in [
        (1usize, Some(1usize)),
        (2, Some(2)),
        (3, Some(4)),
        (5, Some(8)),
        (513, Some(1024)),
        (1023, Some(1024)),
        (1024, Some(1024)),
        (0, None),
        (1025, None),
        (usize::MAX, None),
    ] {
        let r = Cache::<u32, u32>::builder()
            .max_capacity(100)
            .shards(n)
            .try_build();
        match want {
            Some(w) => {
                let c = r.unwrap_or_else(|e| panic!("shards({n}): {e}"));
                assert_eq!(c.policy().num_segments(), w, "shards({n})");
                assert_eq!(c.policy().shard_count(), w, "shards({n})");
                for k in 0..300 {
                    c.insert(k, k);
                }
                assert!(c.entry_count() <= 100);
                c.validate();
            }
            None => assert!(
                matches!(r, Err(herdcache::BuildError::BadShardCount(m)) if m == n),
                "shards({n})"
            ),
        }
    }
}

/// `max_capacity(0)`: nothing weighing anything is stored; every value offered is reported
/// once, for size; loads still answer their callers.
#[test]
fn probe_capacity_zero_stores_nothing() {
    for shards in [1usize, 8] {
        let (log, listener) = recorder();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(0)
            .shards(shards)
            .eviction_listener(listener)
            .build();
        for k in 0..50 {
            cache.insert(k, k);
            assert_eq!(cache.get_with(1000 + k, || k), k);
            let e = cache.entry(2000 + k).or_insert_with(|| k);
            assert!(e.is_fresh());
            cache.entry(3000 + k).and_upsert_with(|_| k);
        }
        assert_eq!(cache.entry_count(), 0, "{shards} shards");
        assert_eq!(cache.weighted_size(), 0);
        cache.validate();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 200, "{shards} shards: every value reported once");
        assert!(log.iter().all(|e| e.2 == RemovalCause::Size));
    }
}

/// Tiny capacities with weights, many shards: the bound holds after every insert returns, and
/// the accounting validates.
#[test]
fn probe_tiny_weighted_capacities_many_shards() {
    for cap in [1u64, 2, 3, 7] {
        for shards in [1usize, 4, 64] {
            let (log, listener) = recorder();
            let cache: Cache<u64, u64> = Cache::builder()
                .max_capacity(cap)
                .shards(shards)
                .weigher(|_, v: &u64| (*v % 4) as u32)
                .eviction_listener(listener)
                .build();
            let mut r = common::Rng(cap * 31 + shards as u64);
            let mut inserted = 0u64;
            for i in 0..2_000u64 {
                let k = r.next() % 20;
                let v = (i << 2) | (r.next() % 4);
                cache.insert(k, v);
                inserted += 1;
                assert!(
                    cache.weighted_size() <= cap,
                    "cap {cap}, {shards} shards: weight {} after insert {i}",
                    cache.weighted_size()
                );
            }
            cache.validate();
            cache.invalidate_all();
            cache.validate();
            assert_eq!(cache.entry_count(), 0);
            assert_eq!(cache.weighted_size(), 0);
            assert_eq!(
                log.lock().unwrap().len() as u64,
                inserted,
                "cap {cap}, {shards} shards: every value reported once"
            );
        }
    }
}

/// Zero-weight entries do not count toward the bound but are still evicted in their turn:
/// a capacity-1 cache of weightless values cannot grow without bound.
#[test]
fn probe_zero_weight_entries_do_not_grow_without_bound() {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(1)
        .shards(1)
        .weigher(|_, _| 0)
        .build();
    for k in 0..10_000 {
        cache.insert(k, k);
    }
    cache.validate();
    eprintln!("capacity 1, weightless: {} entries", cache.entry_count());
}

fn at_every_extreme(
    what: &str,
    b: impl Fn() -> herdcache::CacheBuilder<u64, u64, herdcache::DefaultHashBuilder>,
    stored: bool,
) {
    let clock = ManualClock::new();
    let (log, listener) = recorder();
    let cache = b().clock(clock.clone()).eviction_listener(listener).build();
    cache.insert(1, 1);
    assert_eq!(cache.get_with(2, || 2), 2, "{what}");
    let e = cache.entry(3).or_insert_with(|| 3);
    assert_eq!(*e.value(), 3);
    cache.entry(4).and_upsert_with(|_| 4);
    assert_eq!(cache.get_with_if(5, || 5, |_| true), 5);
    if stored {
        for k in 1..=5 {
            assert_eq!(cache.get(&k), Some(k), "{what}: key {k}");
        }
        // Far in the future (but not at the clock's end): still there.
        clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
        cache.run_pending_tasks();
        for k in 1..=5 {
            assert_eq!(cache.get(&k), Some(k), "{what}: key {k} after 100 years");
        }
        cache.validate();
        // At the clock's end.
        clock.advance(Duration::MAX);
        cache.run_pending_tasks();
        cache.validate();
        assert_eq!(cache.get(&1), Some(1), "{what}: at the clock's end");
    } else {
        for k in 1..=5 {
            assert_eq!(cache.get(&k), None, "{what}: key {k} stored");
        }
        assert_eq!(cache.entry_count(), 0, "{what}");
        cache.validate();
        let log = log.lock().unwrap();
        let causes: Vec<_> = log.iter().map(|e| e.2).collect();
        assert!(
            causes.iter().all(|c| *c == RemovalCause::Expired),
            "{what}: {log:?}"
        );
    }
    cache.validate();
}

struct Fixed(Option<Duration>);
impl Expiry<u64, u64> for Fixed {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        self.0
    }
    fn expire_after_update(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        self.0
    }
    fn expire_after_read(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        self.0
    }
}

#[test]
fn probe_duration_max_means_never_for_every_option() {
    let _dog = watchdog(LIMIT, "Duration::MAX");
    let m = Duration::MAX;
    let base = || Cache::<u64, u64>::builder().max_capacity(100);
    at_every_extreme("ttl MAX", || base().time_to_live(m), true);
    at_every_extreme("tti MAX", || base().time_to_idle(m), true);
    at_every_extreme(
        "ttl+tti MAX",
        || base().time_to_live(m).time_to_idle(m),
        true,
    );
    at_every_extreme("expiry MAX", || base().expire_after(Fixed(Some(m))), true);
    at_every_extreme(
        "expiry None + ttl MAX",
        || base().expire_after(Fixed(None)).time_to_live(m),
        true,
    );
    at_every_extreme(
        "expiry MAX + tti MAX",
        || base().expire_after(Fixed(Some(m))).time_to_idle(m),
        true,
    );
    at_every_extreme(
        "ttl MAX + jitter",
        || base().time_to_live(m).jitter(0.9),
        true,
    );
    at_every_extreme(
        "tti MAX + jitter",
        || base().time_to_idle(m).jitter(0.9),
        true,
    );
    at_every_extreme(
        "ttl MAX + fail_safe MAX",
        || base().time_to_live(m).fail_safe(m),
        true,
    );
    at_every_extreme(
        "ttl MAX + negative_ttl MAX + backoff MAX",
        || base().time_to_live(m).negative_ttl(m).refresh_backoff(m),
        true,
    );
    at_every_extreme(
        "ttl MAX + refresh_after MAX",
        || {
            base()
                .time_to_live(m)
                .refresh_after(m)
                .loader(|k: &u64| Ok::<_, BoxError>(*k))
        },
        true,
    );
    at_every_extreme(
        "ttl MAX + early refresh",
        || {
            base()
                .time_to_live(m)
                .early_refresh(1.0)
                .loader(|k: &u64| Ok::<_, BoxError>(*k))
        },
        true,
    );
    at_every_extreme("load_timeout MAX", || base().load_timeout(m), true);
}

#[test]
fn probe_duration_zero_stores_nothing_for_every_lifetime_option() {
    let _dog = watchdog(LIMIT, "Duration::ZERO");
    let z = Duration::ZERO;
    let base = || Cache::<u64, u64>::builder().max_capacity(100);
    at_every_extreme("ttl ZERO", || base().time_to_live(z), false);
    at_every_extreme("tti ZERO", || base().time_to_idle(z), false);
    at_every_extreme(
        "ttl ZERO + tti MAX",
        || base().time_to_live(z).time_to_idle(Duration::MAX),
        false,
    );
    at_every_extreme("expiry ZERO", || base().expire_after(Fixed(Some(z))), false);
    at_every_extreme(
        "expiry MAX + ttl ZERO",
        || {
            base()
                .expire_after(Fixed(Some(Duration::MAX)))
                .time_to_live(z)
        },
        false,
    );
    at_every_extreme(
        "expiry None + tti ZERO",
        || base().expire_after(Fixed(None)).time_to_idle(z),
        false,
    );
    at_every_extreme(
        "ttl ZERO + jitter",
        || base().time_to_live(z).jitter(0.5),
        false,
    );
}

/// The other durations at zero: a fail-safe window of zero keeps nothing past the deadline, a
/// zero backoff or refresh period does not spin or panic.
#[test]
fn probe_zero_for_the_other_durations() {
    let _dog = watchdog(LIMIT, "other zeros");
    let clock = ManualClock::new();
    let fail = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fail);
    let loads = Arc::new(AtomicUsize::new(0));
    let l = Arc::clone(&loads);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .fail_safe(Duration::ZERO)
        .refresh_backoff(Duration::ZERO)
        .refresh_after(Duration::ZERO)
        .negative_ttl(Duration::ZERO)
        .load_timeout(Duration::ZERO)
        .clock(clock.clone())
        .loader(move |k: &u64| {
            l.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(*k + 1)
            }
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 2);
    assert_eq!(cache.get(&1), Some(2));
    clock.advance(Duration::from_secs(11));
    fail.store(true, Ordering::SeqCst);
    // fail_safe(ZERO): nothing to fall back on past the deadline.
    assert!(cache.load(1).is_err());
    assert_eq!(cache.get_or_stale(&1), None);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
    assert_eq!(cache.loads_in_flight(), 0);
}

// =============================================================================================
// 4. Async verbs on one thread, cancellation
// =============================================================================================

/// On a single-threaded executor, every async verb whose key is being loaded by another task
/// must wait without blocking the thread (else the loading task never runs: a hang).
#[test]
fn probe_async_verbs_wait_without_blocking_the_thread() {
    let _dog = watchdog(LIMIT, "async verbs on one thread");
    type Verb = Box<
        dyn Fn(Cache<u64, u64>) -> std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>>,
    >;
    let verbs: Vec<(&str, Verb)> = vec![
        (
            "or_insert_async",
            Box::new(|c| Box::pin(async move { c.entry(1).or_insert_async(5).await.into_value() })),
        ),
        (
            "or_default_async",
            Box::new(|c| Box::pin(async move { c.entry(1).or_default_async().await.into_value() })),
        ),
        (
            "or_insert_with_async",
            Box::new(|c| {
                Box::pin(async move {
                    c.entry(1)
                        .or_insert_with_async(async { 5 })
                        .await
                        .into_value()
                })
            }),
        ),
        (
            "get_with_async",
            Box::new(|c| Box::pin(async move { c.get_with_async(1, async { 5 }).await })),
        ),
        (
            "get_with_by_ref_async",
            Box::new(|c| Box::pin(async move { c.get_with_by_ref_async(&1, async { 5 }).await })),
        ),
        (
            "get_with_if_async",
            Box::new(|c| {
                Box::pin(async move { c.get_with_if_async(1, async { 5 }, |_| false).await })
            }),
        ),
        (
            "or_insert_with_if_async",
            Box::new(|c| {
                Box::pin(async move {
                    c.entry(1)
                        .or_insert_with_if_async(async { 5 }, |_| false)
                        .await
                        .into_value()
                })
            }),
        ),
        (
            "and_upsert_with_async",
            Box::new(|c| {
                Box::pin(async move {
                    c.entry(1)
                        .and_upsert_with_async(|e| {
                            let v = e.map_or(5, |e| *e.value());
                            async move { v }
                        })
                        .await
                        .into_value()
                })
            }),
        ),
        (
            "and_compute_with_async",
            Box::new(|c| {
                Box::pin(async move {
                    match c
                        .entry(1)
                        .and_compute_with_async(|e| {
                            let v = e.map_or(5, |e| *e.value());
                            async move { Op::Put(v) }
                        })
                        .await
                    {
                        herdcache::CompResult::Inserted(e)
                        | herdcache::CompResult::ReplacedWith(e) => e.into_value(),
                        other => panic!("{other:?}"),
                    }
                })
            }),
        ),
    ];
    for (name, verb) in verbs {
        let cache: Cache<u64, u64> = Cache::new(100);
        let c1 = cache.clone();
        let fut = verb(cache.clone());
        let r = within(Duration::from_secs(10), move || {
            futures::executor::block_on(async move {
                let loader = async {
                    c1.get_with_async(1, async {
                        common::Yield(50).await;
                        9
                    })
                    .await
                };
                futures::future::join(loader, fut).await
            })
        });
        let (a, b) = r
            .unwrap_or_else(|| panic!("{name}: hangs on a one-thread executor"))
            .unwrap_or_else(|_| panic!("{name}: panicked"));
        assert_eq!(a, 9, "{name}");
        assert_eq!(b, 9, "{name}: the running load's value");
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

/// Dropping `get_with_if_async`'s future while its `init` runs abandons the load: nothing in
/// flight, the old value kept, and a waiter that joined loads again by itself.
#[test]
fn probe_get_with_if_async_cancelled_mid_init() {
    use std::future::Future;
    use std::task::Context;
    let _dog = watchdog(LIMIT, "cancel mid init");
    let cache: Cache<u64, u64> = Cache::new(100);
    cache.insert(1, 10);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut fut = Box::pin(cache.get_with_if_async(1, std::future::pending::<u64>(), |_| true));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert_eq!(cache.loads_in_flight(), 1);
    // A second caller joins while the first is pending.
    let mut fut2 = Box::pin(cache.get_with_if_async(1, async { 30 }, |_| true));
    assert!(
        fut2.as_mut().poll(&mut cx).is_pending(),
        "joined the running replacement"
    );
    drop(fut);
    let v = futures::executor::block_on(fut2);
    assert_eq!(v, 30, "the waiter loads again by itself");
    assert_eq!(cache.get(&1), Some(30));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// =============================================================================================
// 5. Expiry semantics: what the listener is told
// =============================================================================================

struct ZeroOnUpdate;
impl Expiry<u64, u64> for ZeroOnUpdate {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        Some(Duration::from_secs(60))
    }
    fn expire_after_update(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

/// FINDING (moka's shape): an `insert` that replaces a live value, whose new value
/// `expire_after_update` gives no time at all, reports the *old* value as `Expired` — but the
/// old value had not expired: an insert replaced it (`RemovalCause::Replaced`: "An insert
/// replaced its value"). moka reports the old value `Replaced` and the new one `Expired`; so
/// does herdcache itself when the new value is too heavy to store (old `Replaced`, new
/// `Size`). The statistics count it under `expired`, not `replaced`, too.
#[test]
fn finding_update_to_zero_lifetime_reports_live_old_value_as_expired() {
    let clock = ManualClock::new();
    let (log, listener) = recorder();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(ZeroOnUpdate)
        .eviction_listener(listener)
        .record_stats()
        .clock(clock.clone())
        .build();
    cache.insert(1, 10);
    clock.advance(Duration::from_secs(1)); // 10 has 59 s left
    cache.insert(1, 20);
    assert_eq!(cache.get(&1), None, "the new value lives no time");
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            (1, 10, RemovalCause::Replaced),
            (1, 20, RemovalCause::Expired)
        ],
        "the live old value was replaced, not expired"
    );
    let s = cache.stats();
    assert_eq!(s.replaced.count, 1, "stats: one replacement");
}

/// For comparison (passes): the same replacement by a value too heavy to store reports the old
/// value `Replaced`.
#[test]
fn probe_too_heavy_replacement_reports_old_value_replaced() {
    let (log, listener) = recorder();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .weigher(|_, v: &u64| *v as u32)
        .eviction_listener(listener)
        .build();
    cache.insert(1, 10);
    cache.insert(1, 200);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            (1, 10, RemovalCause::Replaced),
            (1, 200, RemovalCause::Size)
        ]
    );
}

// =============================================================================================
// 6. Eviction listeners that re-enter or panic, on every removal path
// =============================================================================================

/// A listener that calls back into its own cache (documented as allowed) from every path that
/// removes entries, expired ones included: no deadlock, accounting exact.
#[test]
fn probe_reentrant_listener_on_every_removal_path() {
    let _dog = watchdog(LIMIT, "re-entrant listener");
    let clock = ManualClock::new();
    let slot: Arc<std::sync::OnceLock<std::sync::Weak<()>>> = Arc::new(std::sync::OnceLock::new());
    let cell: Arc<Mutex<Option<Cache<u64, u64>>>> = Arc::new(Mutex::new(None));
    let c2 = Arc::clone(&cell);
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = Arc::clone(&calls);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(20)
        .shards(2)
        .time_to_live(Duration::from_secs(5))
        .fail_safe(Duration::from_secs(3))
        .clock(clock.clone())
        .eviction_listener(move |k: &u64, v: &u64, _c| {
            calls2.fetch_add(1, Ordering::SeqCst);
            let c = c2.lock().unwrap().clone();
            if let Some(c) = c {
                let _ = c.get(k);
                let _ = c.contains_key(k);
                let _ = c.entry_count();
                let _ = c.get_or_stale(k);
                c.run_pending_tasks();
                if *k < 1_000 && *v % 3 == 0 {
                    c.insert(k + 1_000, *v);
                    c.entry(k + 2_000).and_upsert_with(|_| *v);
                    let _ = c.get_with(k + 3_000, || *v);
                }
            }
        })
        .build();
    let _ = slot;
    *cell.lock().unwrap() = Some(cache.clone());
    for round in 0..5u64 {
        for k in 0..40u64 {
            cache.insert(k, round * 100 + k);
            let _ = cache.get_with(k + 50, || k);
            cache
                .entry(k)
                .and_upsert_with(|e| e.map_or(0, |e| *e.value() + 1));
        }
        cache.invalidate(&3);
        let _ = cache.remove(&4);
        cache.retain(|k, _| k % 7 != 0);
        let _ = cache.invalidate_entries_if(|k, _| k % 5 == 0);
        clock.advance(Duration::from_secs(6));
        for k in 0..40u64 {
            let _ = cache.get(&k);
        }
        cache.run_pending_tasks();
        clock.advance(Duration::from_secs(4));
        cache.run_pending_tasks();
        cache.validate();
        if round == 3 {
            cache.invalidate_all();
        }
    }
    *cell.lock().unwrap() = None;
    clock.advance(Duration::from_secs(20));
    cache.run_pending_tasks();
    cache.validate();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    assert_eq!(cache.loads_in_flight(), 0);
    assert!(calls.load(Ordering::SeqCst) > 100);
}

/// A listener that panics on a load's or a computation's removals (the insert of the loaded
/// value evicts): the panic reaches that caller, the value is stored, nothing is left in flight
/// and waiters are not stranded.
#[test]
fn probe_panicking_listener_on_load_and_compute_paths() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "panicking listener");
    let armed = Arc::new(AtomicBool::new(false));
    let a = Arc::clone(&armed);
    let (log, _) = recorder();
    let l = Arc::clone(&log);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(1)
        .shards(1)
        .eviction_listener(move |k: &u64, v: &u64, c| {
            l.lock().unwrap().push((*k, *v, c));
            if a.load(Ordering::SeqCst) {
                panic!("injected listener");
            }
        })
        .build();
    cache.insert(0, 0);
    armed.store(true, Ordering::SeqCst);
    let paths: Vec<(&str, Box<dyn Fn(&Cache<u64, u64>, u64)>)> = vec![
        (
            "get_with",
            Box::new(|c, k| {
                let _ = c.get_with(k, || k);
            }),
        ),
        (
            "get_with_if",
            Box::new(|c, k| {
                let _ = c.get_with_if(k, || k, |_| true);
            }),
        ),
        (
            "and_upsert_with",
            Box::new(|c, k| {
                let _ = c.entry(k).and_upsert_with(|_| k);
            }),
        ),
        (
            "and_compute_with",
            Box::new(|c, k| {
                let _ = c.entry(k).and_compute_with(|_| Op::Put(k));
            }),
        ),
        (
            "or_insert_with",
            Box::new(|c, k| {
                let _ = c.entry(k).or_insert_with(|| k);
            }),
        ),
        (
            "get_with_by_ref",
            Box::new(|c, k| {
                let _ = c.get_with_by_ref(&k, || k);
            }),
        ),
        ("insert", Box::new(|c, k| c.insert(k, k))),
    ];
    for (i, (name, f)) in paths.iter().enumerate() {
        let k = 10 + i as u64;
        let before = log.lock().unwrap().len();
        let r = catch_unwind(AssertUnwindSafe(|| f(&cache, k)));
        let reported = log.lock().unwrap().len() - before;
        assert!(reported >= 1, "{name}: something was evicted");
        assert!(
            r.is_err(),
            "{name}: the listener's panic reaches the caller"
        );
        assert_eq!(cache.loads_in_flight(), 0, "{name}");
        cache.validate();
        assert!(cache.weighted_size() <= 1, "{name}");
        // The key is usable.
        let got = within(Duration::from_secs(10), {
            let cache = cache.clone();
            move || {
                let _ = catch_unwind(AssertUnwindSafe(|| cache.get(&k)));
                cache.loads_in_flight()
            }
        })
        .expect("stuck")
        .expect("panicked");
        assert_eq!(got, 0);
    }
}

// =============================================================================================
// 7. Jitter and a custom Expiry
// =============================================================================================

/// An `Expiry` that sets a lifetime at creation only (updates keep the default: "unchanged").
struct CreateOnly(Duration);
impl Expiry<u64, u64> for CreateOnly {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        Some(self.0)
    }
}

/// FINDING: with `jitter`, an update whose `expire_after_update` leaves the lifetime
/// unchanged (the trait's default: "Default: unchanged") re-jitters the *remaining* time:
/// every write multiplies what is left by a new factor in [1 − j, 1 + j]. The creation's
/// deadline (10 s × [0.1, 1.9], so at least 1 s) is not kept: after a few writes of the key at
/// the same instant the entry expires long before it. (Reads are not re-jittered; a time to
/// live, re-applied on each write, is a new life and may be.)
#[test]
fn finding_jitter_rescales_an_unchanged_expiry_on_every_update() {
    let clock = ManualClock::new();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .expire_after(CreateOnly(Duration::from_secs(10)))
        .jitter(0.9)
        .clock(clock.clone())
        .build();
    for k in 0..200u64 {
        cache.insert(k, 0);
        for v in 1..=20u64 {
            cache.insert(k, v); // expire_after_update: unchanged
        }
    }
    // Every entry was created with at least 10 s × 0.1 = 1 s to live, and no update changed it.
    clock.advance(Duration::from_millis(990));
    let gone: Vec<u64> = (0..200u64).filter(|k| cache.get(k).is_none()).collect();
    assert!(
        gone.is_empty(),
        "{} of 200 entries expired before their creation deadline (min 1 s): {:?}",
        gone.len(),
        &gone[..gone.len().min(10)]
    );
}

/// Control (passes without jitter): the same updates keep the creation deadline exactly.
#[test]
fn probe_unchanged_update_keeps_the_deadline_without_jitter() {
    let clock = ManualClock::new();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .expire_after(CreateOnly(Duration::from_secs(10)))
        .clock(clock.clone())
        .build();
    cache.insert(1, 0);
    for v in 1..=20u64 {
        clock.advance(Duration::from_millis(100));
        cache.insert(1, v);
    }
    clock.advance(Duration::from_millis(7_999)); // 9.999 s after creation
    assert_eq!(cache.get(&1), Some(20));
    clock.advance(Duration::from_millis(1));
    assert_eq!(cache.get(&1), None);
}

/// FINDING (same cause, the other direction): re-jittered on each update, an entry whose
/// `Expiry` never extends it outlives `1 + jitter` times its lifetime — the bound the
/// `jitter` docs give ("An entry may so live up to `1 + fraction` times its time to live").
#[test]
fn finding_jitter_on_unchanged_update_outlives_one_plus_fraction() {
    let clock = ManualClock::new();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .expire_after(CreateOnly(Duration::from_secs(10)))
        .jitter(0.9)
        .clock(clock.clone())
        .build();
    for k in 0..400u64 {
        cache.insert(k, 0);
        for v in 1..=5u64 {
            cache.insert(k, v);
        }
    }
    // (1 + 0.9) × 10 s = 19 s after creation, every entry is past any jittered lifetime.
    clock.advance(Duration::from_millis(19_001));
    let alive: Vec<u64> = (0..400u64).filter(|k| cache.get(k).is_some()).collect();
    assert!(
        alive.is_empty(),
        "{} of 400 entries outlive 1.9 × their 10 s lifetime: {:?}",
        alive.len(),
        &alive[..alive.len().min(10)]
    );
}

/// The largest capacities, with and without a weigher and sizing: no overflow, no huge
/// allocation up front.
#[test]
fn probe_capacity_u64_max() {
    let _dog = watchdog(LIMIT, "u64::MAX capacity");
    for shards in [None, Some(1usize), Some(1024)] {
        let b = Cache::<u64, u64>::builder().max_capacity(u64::MAX);
        let b = match shards {
            Some(n) => b.shards(n),
            None => b,
        };
        let cache = b.build();
        for k in 0..2_000 {
            cache.insert(k, k);
        }
        assert_eq!(cache.entry_count(), 2_000);
        cache.validate();
        let w: Cache<u64, u64> = Cache::builder()
            .max_capacity(u64::MAX)
            .weigher(|_, _| u32::MAX)
            .track_sizing()
            .time_to_live(Duration::MAX)
            .build();
        for k in 0..2_000 {
            w.insert(k, k);
        }
        assert_eq!(w.weighted_size(), 2_000 * u64::from(u32::MAX));
        w.validate();
        let _ = w.sizing();
        let _ = w.health();
    }
}

/// FINDING (consistency, and moka's shape): `invalidate_all` reports an entry whose deadline
/// had already passed (expired, not yet reclaimed) as `Explicit`. `invalidate`, `remove` and
/// `retain` report the same entry as `Expired` ("Its deadline passed"), and moka, whose
/// `invalidate_all` removes invalidated entries in maintenance, reports an entry that had
/// expired as `Expired` too (expiry is checked before invalidation).
#[test]
fn finding_invalidate_all_reports_expired_entries_as_explicit() {
    let clock = ManualClock::new();
    let (log, listener) = recorder();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(1))
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    // The per-key paths, for comparison.
    cache.insert(1, 1);
    cache.insert(2, 2);
    cache.insert(3, 3);
    clock.advance(Duration::from_secs(2));
    cache.invalidate(&1);
    assert_eq!(cache.remove(&2), None);
    cache.retain(|_, _| true);
    let per_key: Vec<_> = log.lock().unwrap().drain(..).collect();
    assert_eq!(
        per_key,
        vec![
            (1, 1, RemovalCause::Expired),
            (2, 2, RemovalCause::Expired),
            (3, 3, RemovalCause::Expired)
        ]
    );
    // The whole-cache path.
    cache.insert(4, 4);
    clock.advance(Duration::from_millis(600));
    cache.insert(5, 5);
    clock.advance(Duration::from_millis(600)); // 4 expired 0.2 s ago, 5 lives 0.4 s more
    assert!(!cache.contains_key(&4)); // (a `get` would reclaim it)
    assert!(cache.contains_key(&5));
    assert_eq!(cache.entry_count(), 2);
    cache.invalidate_all();
    let mut all: Vec<_> = log.lock().unwrap().drain(..).collect();
    all.sort_by_key(|e| e.0);
    assert_eq!(
        all,
        vec![
            (4, 4, RemovalCause::Expired),
            (5, 5, RemovalCause::Explicit)
        ],
        "an entry past its deadline expired; only the live one was invalidated"
    );
}

/// A weigher that panics on a loaded (or computed) value, while another caller waits on that
/// load: the leader gets the panic, the waiter is released and loads by itself, nothing stays
/// in flight, and the accounting validates. Every loading path.
#[test]
fn probe_weigher_panics_at_publish_with_a_waiter() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "weigher panics at publish");
    type Path = fn(&Cache<u64, u64>, u64, &dyn Fn() -> u64) -> u64;
    let paths: Vec<(&str, Path)> = vec![
        ("get_with", |c, k, f| c.get_with(k, f)),
        ("get_with_if", |c, k, f| c.get_with_if(k, f, |_| true)),
        ("or_insert_with", |c, k, f| {
            c.entry(k).or_insert_with(f).into_value()
        }),
        ("or_insert_with_if", |c, k, f| {
            c.entry(k).or_insert_with_if(f, |_| true).into_value()
        }),
        ("get_with_by_ref", |c, k, f| c.get_with_by_ref(&k, f)),
        ("and_upsert_with", |c, k, f| {
            c.entry(k).and_upsert_with(|_| f()).into_value()
        }),
        ("get_with_async", |c, k, f| {
            futures::executor::block_on(c.get_with_async(k, async { f() }))
        }),
        ("get_with_if_async", |c, k, f| {
            futures::executor::block_on(c.get_with_if_async(k, async { f() }, |_| true))
        }),
    ];
    for (name, path) in paths {
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .record_stats()
            .weigher(|_, v: &u64| {
                if *v == 666 {
                    panic!("injected weigher")
                } else {
                    1
                }
            })
            .build();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    path(&cache, 1, &|| {
                        rx.lock().unwrap().recv().unwrap();
                        666
                    })
                }))
            });
            // Wait for the leader to be loading, then join with a waiter.
            assert!(
                common::eventually(|| cache.loads_in_flight() == 1),
                "{name}"
            );
            let waiter = s.spawn(|| {
                within(Duration::from_secs(20), {
                    let cache = cache.clone();
                    move || cache.get_with(1, || 7)
                })
            });
            let joined = common::eventually(|| cache.stats().coalesced >= 1);
            tx.send(()).unwrap();
            let l = leader.join().unwrap();
            assert!(l.is_err(), "{name}: the leader gets the weigher's panic");
            let w = waiter.join().unwrap();
            let w = w.unwrap_or_else(|| panic!("{name}: the waiter is stranded"));
            assert_eq!(
                w.ok(),
                Some(7),
                "{name}: the waiter loads by itself (joined: {joined})"
            );
        });
        assert_eq!(cache.loads_in_flight(), 0, "{name}");
        assert_eq!(cache.get(&1), Some(7), "{name}");
        cache.validate();
    }
}

// =============================================================================================
// 8. expire_after with TTL / TTI through the loading and entry verbs (a model)
// =============================================================================================

mod model {
    use super::*;

    pub const NEVER: u64 = u64::MAX;

    pub fn create(v: u64) -> Option<u64> {
        match v % 6 {
            0 => None,
            1 => Some(0),
            _ => Some(1 + (v >> 8) % 30),
        }
    }
    pub fn update(v: u64, remaining: Option<u64>) -> Option<u64> {
        if v % 3 == 0 {
            remaining
        } else {
            create(v >> 3)
        }
    }
    pub fn read(v: u64, remaining: Option<u64>) -> Option<u64> {
        match v % 4 {
            0 => remaining,
            1 => None,
            _ => Some(1 + (v >> 12) % 20),
        }
    }
    fn secs(d: Option<u64>) -> Option<Duration> {
        d.map(Duration::from_secs)
    }
    fn whole(d: Option<Duration>) -> Option<u64> {
        d.map(|d| {
            assert_eq!(d.subsec_nanos(), 0, "the clock moves by whole seconds");
            d.as_secs()
        })
    }
    pub struct ByValue;
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
    #[derive(Clone, Copy, Debug)]
    pub struct M {
        pub v: u64,
        pub custom: u64,
        pub hard: u64,
        pub access: u64,
    }
    pub fn at(now: u64, d: Option<u64>) -> u64 {
        d.map_or(NEVER, |d| now.saturating_add(d))
    }
    pub fn remaining(now: u64, d: u64) -> Option<u64> {
        (d != NEVER).then(|| d.saturating_sub(now))
    }
    impl M {
        pub fn expires(&self, tti: Option<u64>) -> u64 {
            self.custom.min(self.hard).min(at(self.access, tti))
        }
    }
}

/// The model: a custom `Expiry` bounded by a time to live and a time to idle through every
/// verb; with `fail_safe(max_stale)` entries past their deadline are kept (only
/// `get_or_stale` and predicates see them) until `max_stale` later.
fn verbs_model_run(seed: u64, ttl: Option<u64>, tti: Option<u64>, max_stale: Option<u64>) {
    use model::*;
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
    if let Some(s) = max_stale {
        b = b.fail_safe(Duration::from_secs(s));
    }
    let grace = max_stale.unwrap_or(0);
    let cache: Cache<u32, u64> = b.build();
    let mut rng = common::Rng(seed);
    let mut model: HashMap<u32, M> = HashMap::new();
    let mut now = 0u64;
    let ctx = |step: usize, what: &str| {
        format!("seed {seed} ttl {ttl:?} tti {tti:?} stale {max_stale:?} step {step}: {what}")
    };
    for step in 0..3000usize {
        let k = (rng.next() % 16) as u32;
        // Forget what is past its deadline (and its stale window).
        model.retain(|_, m| m.expires(tti).saturating_add(grace) > now);
        let live = model.get(&k).copied().filter(|m| m.expires(tti) > now);
        let stale = model.get(&k).copied().filter(|m| m.expires(tti) <= now);
        let put = |model: &mut HashMap<u32, M>, m: M| {
            if m.expires(tti) > now {
                model.insert(k, m);
            } else {
                model.remove(&k); // created already expired: never stored
            }
        };
        let read_model = |m: M| M {
            custom: at(now, read(m.v, remaining(now, m.custom))),
            access: now,
            ..m
        };
        let write_model = |v: u64, before: Option<M>| match before {
            Some(m) => M {
                v,
                custom: at(now, update(v, remaining(now, m.custom))),
                hard: at(now, ttl),
                access: now,
            },
            None => M {
                v,
                custom: at(now, create(v)),
                hard: at(now, ttl),
                access: now,
            },
        };
        match rng.next() % 12 {
            0 | 1 => {
                let v = rng.next();
                let got = cache.get_with(k, || v);
                match live {
                    Some(m) => {
                        assert_eq!(got, m.v, "{}", ctx(step, "get_with hit"));
                        put(&mut model, read_model(m));
                    }
                    None => {
                        assert_eq!(got, v, "{}", ctx(step, "get_with miss"));
                        put(&mut model, write_model(v, None));
                    }
                }
            }
            2 => {
                let v = rng.next();
                let e = cache.entry(k).and_upsert_with(|e| {
                    assert_eq!(
                        e.as_ref().map(|e| *e.value()),
                        live.map(|m| m.v),
                        "{}",
                        ctx(step, "upsert sees")
                    );
                    v
                });
                assert_eq!(
                    e.is_old_value_replaced(),
                    live.is_some(),
                    "{}",
                    ctx(step, "upsert replaced")
                );
                // The computation's look at the entry is a read, then the put an update.
                let before = live.map(read_model);
                put(&mut model, write_model(v, before));
            }
            3 if max_stale.is_some() => {
                let got = cache.get_or_stale(&k);
                let want = live.or(stale).map(|m| m.v);
                assert_eq!(got, want, "{}", ctx(step, "get_or_stale"));
                if let Some(m) = live {
                    put(&mut model, read_model(m));
                }
            }
            3 => {
                let v = rng.next();
                let replace = rng.next() % 2 == 0;
                let got = cache.get_with_if(k, || v, |_| replace);
                match live {
                    Some(m) if !replace => {
                        assert_eq!(got, m.v, "{}", ctx(step, "get_with_if kept"));
                        put(&mut model, read_model(m));
                    }
                    Some(m) => {
                        assert_eq!(got, v, "{}", ctx(step, "get_with_if replaced"));
                        // A value `replace_if` rejects is not read (neither at the first
                        // look nor at the leader's look again; moka judges before it records
                        // a read): the replacement updates the entry as it was.
                        put(&mut model, write_model(v, Some(m)));
                    }
                    None => {
                        assert_eq!(got, v, "{}", ctx(step, "get_with_if miss"));
                        put(&mut model, write_model(v, None));
                    }
                }
            }
            4 => {
                let got = cache.remove(&k);
                assert_eq!(got, live.map(|m| m.v), "{}", ctx(step, "remove"));
                model.remove(&k);
            }
            5 | 6 => {
                let got = cache.get(&k);
                assert_eq!(got, live.map(|m| m.v), "{}", ctx(step, "get"));
                if let Some(m) = live {
                    put(&mut model, read_model(m));
                }
            }
            7 => {
                let v = rng.next();
                cache.insert(k, v);
                put(&mut model, write_model(v, live));
            }
            8 => {
                let d = rng.next() % 8;
                clock.advance(Duration::from_secs(d));
                now += d;
            }
            9 => {
                // With fail-safe the predicate sees the kept (expired) values too.
                let odd = rng.next() % 2 == 0;
                let _ = cache.invalidate_entries_if(|_, v| (v % 2 == 1) == odd);
                model.retain(|_, m| (m.v % 2 == 1) != odd);
            }
            10 => {
                let mut seen: Vec<(u32, u64)> = cache.iter().collect();
                seen.sort();
                let mut want: Vec<(u32, u64)> = model
                    .iter()
                    .filter(|(_, m)| m.expires(tti) > now)
                    .map(|(k, m)| (*k, m.v))
                    .collect();
                want.sort();
                assert_eq!(seen, want, "{}", ctx(step, "iter"));
            }
            _ => {
                if rng.next() % 4 == 0 {
                    cache.run_pending_tasks();
                    cache.validate();
                    assert_eq!(
                        cache.entry_count(),
                        model.len() as u64,
                        "{}",
                        ctx(step, "entry_count")
                    );
                }
                assert_eq!(
                    cache.contains_key(&k),
                    live.is_some(),
                    "{}",
                    ctx(step, "contains_key")
                );
            }
        }
    }
    cache.run_pending_tasks();
    model.retain(|_, m| m.expires(tti).saturating_add(grace) > now);
    assert_eq!(cache.entry_count(), model.len() as u64, "seed {seed}");
}

#[test]
fn probe_custom_expiry_with_ttl_tti_through_every_verb_matches_a_model() {
    for seed in [1u64, 7, 42, 2024, 99, 1234567] {
        for stale in [None, Some(3u64), Some(20)] {
            verbs_model_run(seed, Some(25), None, stale);
            verbs_model_run(seed, None, Some(12), stale);
            verbs_model_run(seed, Some(25), Some(12), stale);
            verbs_model_run(seed, None, None, stale);
        }
    }
}

/// `health_over` and `load_with_timeout` at the duration extremes, on a clock at its start,
/// moved far, and at its end: no panic, answers that make sense.
#[test]
fn probe_health_and_timeouts_at_duration_extremes() {
    let _dog = watchdog(LIMIT, "health extremes");
    for ttl in [
        None,
        Some(Duration::ZERO),
        Some(Duration::from_nanos(1)),
        Some(SEC),
        Some(Duration::MAX),
    ] {
        let clock = ManualClock::new();
        let mut b = Cache::<u64, u64>::builder()
            .max_capacity(100)
            .record_stats()
            .negative_ttl(Duration::MAX)
            .clock(clock.clone())
            .loader(|k: &u64| {
                if *k == 0 {
                    Err(BoxError::from("no"))
                } else {
                    Ok(*k)
                }
            });
        if let Some(t) = ttl {
            b = b.time_to_live(t).fail_safe(Duration::MAX);
        }
        let cache = b.build();
        for step in 0..4 {
            for k in 0..20u64 {
                let _ = cache.load(k);
                let _ = cache.load_with_timeout(k, Some(Duration::ZERO));
                let _ = cache.load_with_timeout(k, Some(Duration::MAX));
                let _ = cache.load_with_timeout(k, None);
            }
            for w in [Duration::ZERO, Duration::from_nanos(1), SEC, Duration::MAX] {
                let _ = cache.health_over(w);
            }
            let _ = cache.health();
            cache.run_pending_tasks();
            cache.validate();
            assert_eq!(cache.loads_in_flight(), 0, "ttl {ttl:?} step {step}");
            match step {
                0 => clock.advance(Duration::from_secs(3600)),
                1 => clock.advance(Duration::from_secs(u64::MAX / 4)),
                _ => clock.advance(Duration::MAX),
            }
        }
        // Key 0 failed with a negative TTL of MAX: remembered, the loader is not called again
        // until a write.
        cache.insert(0, 5);
        assert_eq!(
            cache.load(0).ok(),
            if ttl == Some(Duration::ZERO) {
                None
            } else {
                Some(5)
            },
            "ttl {ttl:?}"
        );
    }
}

struct ReadShortens;
impl Expiry<u64, u64> for ReadShortens {
    fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
        if v % 5 == 0 {
            None
        } else {
            Some(Duration::from_secs(100))
        }
    }
    fn expire_after_read(&self, _k: &u64, v: &u64, _r: Option<Duration>) -> Option<Duration> {
        Some(Duration::from_millis(500 + v % 1000))
    }
}

/// Reads that move more than a thousand deadlines earlier (or off "never") under the read
/// lock, between two writes (past the refile list's bound: a full rescan), with and without
/// fail-safe and a time to live: `run_pending_tasks` past the new deadlines reclaims them all.
#[test]
fn probe_many_reads_moving_deadlines_earlier_then_reclaim() {
    let _dog = watchdog(LIMIT, "refile rescan");
    for conf in 0..3 {
        let clock = ManualClock::new();
        let (log, listener) = recorder();
        let b = Cache::builder()
            .max_capacity(100_000)
            .shards(1)
            .expire_after(ReadShortens)
            .eviction_listener(listener)
            .clock(clock.clone());
        let b = match conf {
            0 => b,
            1 => b.time_to_live(Duration::from_secs(50)),
            _ => b.fail_safe(Duration::from_secs(3)),
        };
        let cache: Cache<u64, u64> = b.build();
        for k in 0..3_000u64 {
            cache.insert(k, k);
        }
        clock.advance(Duration::from_secs(5));
        for k in 0..3_000u64 {
            assert_eq!(cache.get(&k), Some(k));
        }
        cache.validate();
        clock.advance(Duration::from_millis(1_600)); // past every read-set deadline
        cache.run_pending_tasks();
        cache.validate();
        let want = if conf == 2 { 3_000 } else { 0 };
        assert_eq!(
            cache.entry_count(),
            want,
            "conf {conf}: reclaimed at their read deadlines"
        );
        clock.advance(Duration::from_secs(4)); // past the stale window too
        cache.run_pending_tasks();
        cache.validate();
        assert_eq!(cache.entry_count(), 0, "conf {conf}");
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3_000);
        assert!(
            log.iter().all(|e| e.2 == RemovalCause::Expired),
            "conf {conf}"
        );
    }
}

/// Dropping an async computation or load (`and_upsert_with_async`, `and_compute_with_async`,
/// `or_insert_with_if_async`, `get_with_by_ref_async`, `or_insert_async` while waiting) at
/// each await point: the key is released, nothing stays in flight, the value is unchanged.
#[test]
fn probe_async_verbs_cancelled_at_each_point() {
    use std::future::Future;
    use std::task::Context;
    let _dog = watchdog(LIMIT, "async cancel");
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for polls in 0..4usize {
        let cache: Cache<u64, u64> = Cache::new(100);
        cache.insert(1, 10);
        let futs: Vec<std::pin::Pin<Box<dyn Future<Output = u64> + Send + '_>>> = vec![
            Box::pin(async {
                cache
                    .entry(1)
                    .and_upsert_with_async(|_| async {
                        common::Yield(2).await;
                        std::future::pending::<u64>().await
                    })
                    .await
                    .into_value()
            }),
            Box::pin(async {
                let _ = cache
                    .entry(1)
                    .and_compute_with_async(|_| async {
                        common::Yield(1).await;
                        std::future::pending::<Op<u64>>().await
                    })
                    .await;
                0
            }),
            Box::pin(async {
                cache
                    .entry(1)
                    .or_insert_with_if_async(
                        async {
                            common::Yield(2).await;
                            std::future::pending::<u64>().await
                        },
                        |_| true,
                    )
                    .await
                    .into_value()
            }),
            Box::pin(async {
                cache
                    .get_with_by_ref_async(&2, async {
                        common::Yield(2).await;
                        std::future::pending::<u64>().await
                    })
                    .await
            }),
        ];
        for (i, mut f) in futs.into_iter().enumerate() {
            for _ in 0..polls {
                let _ = f.as_mut().poll(&mut cx);
            }
            drop(f);
            assert_eq!(cache.loads_in_flight(), 0, "verb {i} after {polls} polls");
            assert_eq!(cache.get(&1), Some(10), "verb {i} after {polls} polls");
            cache.validate();
        }
        // The keys are free.
        let r = within(Duration::from_secs(10), {
            let cache = cache.clone();
            move || {
                futures::executor::block_on(async {
                    let a = cache.entry(1).or_insert_async(5).await.into_value();
                    let b = cache.entry(2).or_default_async().await.into_value();
                    let c = cache
                        .entry(1)
                        .and_upsert_with_async(|e| {
                            let v = e.map_or(0, |e| *e.value()) + 1;
                            async move { v }
                        })
                        .await
                        .into_value();
                    (a, b, c)
                })
            }
        })
        .expect("a key left locked")
        .expect("panicked");
        assert_eq!(r, (10, 0, 11));
    }
}

// =============================================================================================
// 9. A key's Hash that panics during reclamation and eviction (the shard's own hashing)
// =============================================================================================

fn hkey_cache(
    t: &Arc<Traps>,
    clock: &ManualClock,
    cap: u64,
    log: &Arc<Mutex<Vec<(u64, RemovalCause)>>>,
) -> Cache<HKey, u64> {
    let _ = t;
    let l = Arc::clone(log);
    Cache::builder()
        .max_capacity(cap)
        .shards(1)
        .time_to_live(Duration::from_secs(1))
        .clock(clock.clone())
        .eviction_listener(move |k: &HKey, _v: &u64, c| l.lock().unwrap().push((k.0 .0, c)))
        .build()
}

/// FINDING: a key's `Hash` that panics while `run_pending_tasks` reclaims expired entries
/// (the shard hashes each expired key to unlink it) leaves the timer wheel broken: the bucket
/// being drained was emptied before the panic, so the expired entries after the panicking
/// one are filed nowhere the wheel will look, and no later `run_pending_tasks` reclaims them
/// (they stay, expired and counted, until each key is touched). `validate()` fails too. The
/// shard's docs promise that a panic of the key's `Hash` leaves the shard consistent, and
/// `for_each_shard` (behind `run_pending_tasks`) that a panicking `Hash` leaves the shard
/// accounted; the panic is resumed, fine — but the other entries must still be reclaimable.
fn hash_panic_during_reclaim(what: &str, trigger: impl Fn(&Cache<HKey, u64>, &Arc<Traps>)) {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "hash panic during reclaim");
    let t = Traps::new();
    let clock = ManualClock::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let cache = hkey_cache(&t, &clock, 10_000, &log);
    for id in 0..100u64 {
        cache.insert(HKey::new(id, &t), id);
    }
    clock.advance(Duration::from_secs(3));
    t.key_hash.store(50, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| trigger(&cache, &t)));
    t.key_hash.store(OFF, Ordering::SeqCst);
    assert!(r.is_err(), "{what}: the trap fired");
    // The trap is off: the next maintenance reclaims every expired entry.
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(200)); // and a few turns of the wheel later
    cache.run_pending_tasks();
    let left = cache.entry_count();
    let v = catch_unwind(AssertUnwindSafe(|| cache.validate()));
    assert!(
        left == 0 && v.is_ok(),
        "{what}: {left} expired entries never reclaimed; validate: {}",
        match &v {
            Ok(()) => "ok".to_string(),
            Err(p) => common::panic_message(&**p),
        }
    );
}

#[test]
fn finding_hash_panic_during_reclaim_strands_expired_entries() {
    hash_panic_during_reclaim("run_pending_tasks", |c, _| c.run_pending_tasks());
}

/// The same, through an ordinary write's maintenance (an `insert` advances the wheel).
#[test]
fn finding_hash_panic_during_insert_maintenance_strands_expired_entries() {
    hash_panic_during_reclaim("insert", |c, t| c.insert(HKey::new(1_000, t), 0));
}

/// FINDING: a key's `Hash` that panics while the policy evicts for size (it hashes the
/// candidates and the victim, under the shard's lock) leaves the policy inconsistent: entries
/// still in the map are no longer in any of the policy's queues (`validate`: "every entry
/// queued once", 49 against 51 live). Such entries can never be evicted again. The shard's
/// docs promise that a panic of the key's `Hash` leaves the shard consistent (user code
/// first, then the mutation); `reserve_table` does so for a growing table, eviction does not.
#[test]
fn finding_hash_panic_during_eviction_corrupts_the_policy() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "hash panic during eviction");
    let t = Traps::new();
    let cache: Cache<HKey, u64> = Cache::builder().max_capacity(50).shards(1).build();
    let mut problems = Vec::new();
    for id in 0..400u64 {
        // Every fifth write, every resident key's Hash panics (the new key's does not).
        if id % 5 == 0 {
            t.hash_below.store(id, Ordering::SeqCst);
        }
        let r = catch_unwind(AssertUnwindSafe(|| cache.insert(HKey::new(id, &t), id)));
        t.hash_below.store(0, Ordering::SeqCst);
        if r.is_err() && problems.len() < 2 {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| cache.validate())) {
                problems.push(format!(
                    "after a Hash panic at insert {id}: {}",
                    common::panic_message(&*p)
                ));
            }
        }
    }
    // No more traps: the bound must hold and every key must still be removable.
    for id in 1_000..3_000u64 {
        cache.insert(HKey::new(id, &t), id);
        if cache.weighted_size() > 50 {
            problems.push(format!(
                "weight {} > 50 after insert {id}",
                cache.weighted_size()
            ));
            break;
        }
    }
    let stuck: Vec<u64> = cache
        .iter()
        .map(|(k, _)| k.0 .0)
        .filter(|&id| id < 1_000)
        .collect();
    if !stuck.is_empty() {
        problems.push(format!(
            "{} keys from before the panics survive 2,000 inserts into a 50-entry cache: {:?}",
            stuck.len(),
            &stuck[..stuck.len().min(10)]
        ));
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| cache.validate())) {
        problems.push(format!("at the end: {}", common::panic_message(&*p)));
    }
    problems.truncate(6);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// FINDING (same class): an insert that does not evict can still hash the resident keys under
/// the lock — the policy resizes its frequency sketch as the shard fills, after the new entry
/// is already in the map — and a `Hash` that panics there leaves the new entry outside the
/// policy's queues (`validate`: "every entry queued once").
#[test]
fn finding_hash_panic_while_the_sketch_grows_leaves_an_unqueued_entry() {
    quiet_injected_panics();
    let _dog = watchdog(LIMIT, "hash panic in sketch resize");
    let t = Traps::new();
    let cache: Cache<HKey, u64> = Cache::builder().max_capacity(4_000).shards(1).build();
    let mut fired = Vec::new();
    for id in 0..3_000u64 {
        if id > 1_900 {
            t.hash_below.store(id, Ordering::SeqCst); // every resident key's Hash panics
        }
        let r = catch_unwind(AssertUnwindSafe(|| cache.insert(HKey::new(id, &t), id)));
        t.hash_below.store(0, Ordering::SeqCst);
        if r.is_err() {
            fired.push(id);
            // (A growing table rehashes too: the entries whose Hash panicked are removed,
            // consistently, as documented.)
            let v = catch_unwind(AssertUnwindSafe(|| cache.validate()));
            assert!(
                v.is_ok(),
                "after Hash panics at inserts {fired:?}: {}",
                common::panic_message(&*v.unwrap_err())
            );
        }
    }
    assert!(!fired.is_empty(), "no insert hashed the resident keys");
}

/// Fail-safe with each kind of deadline (idle, custom, custom bounded by a time to live): a
/// failed load of an expired key answers with the last value up to `max_stale` past the
/// deadline that applied, never beyond; plain reads never see it; reclaimed after.
#[test]
fn probe_fail_safe_with_idle_and_custom_deadlines() {
    let _dog = watchdog(LIMIT, "fail-safe kinds");
    for conf in 0..3 {
        let clock = ManualClock::new();
        let b = Cache::<u64, u64>::builder()
            .max_capacity(100)
            .fail_safe(Duration::from_secs(10))
            .refresh_backoff(Duration::from_secs(1))
            .record_stats()
            .clock(clock.clone());
        // Each expires 5 s after the write (nobody reads it in between).
        let b = match conf {
            0 => b.time_to_idle(Duration::from_secs(5)),
            1 => b.expire_after(CreateOnly(Duration::from_secs(5))),
            _ => b
                .expire_after(CreateOnly(Duration::from_secs(50)))
                .time_to_live(Duration::from_secs(5)),
        };
        let cache = b.build();
        cache.insert(1, 100);
        clock.advance(Duration::from_secs(6));
        assert_eq!(cache.get(&1), None, "conf {conf}");
        let r: Result<u64, Arc<&str>> = cache.try_get_with(1, || Err("down"));
        assert_eq!(r.ok(), Some(100), "conf {conf}: the last value");
        assert_eq!(cache.get_or_stale(&1), Some(100), "conf {conf}");
        assert_eq!(cache.get(&1), None, "conf {conf}");
        clock.advance(Duration::from_secs(8)); // 14 s: 9 s past the deadline
        let r: Result<u64, Arc<&str>> = cache.try_get_with(1, || Err("down"));
        assert_eq!(r.ok(), Some(100), "conf {conf}: still within max_stale");
        clock.advance(Duration::from_secs(1)); // 15 s: 10 s past the deadline
        let r: Result<u64, Arc<&str>> = cache.try_get_with(1, || Err("down"));
        assert!(r.is_err(), "conf {conf}: never beyond max_stale");
        assert_eq!(cache.get_or_stale(&1), None, "conf {conf}");
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0, "conf {conf}");
        cache.validate();
        assert!(cache.stats().stale_served_after_ttl >= 3, "conf {conf}");
    }
}

/// Concurrent `get_with_if` callers that all want the same stale value replaced, blocking and
/// async mixed, with a predicate that keeps any newer value: one `init` between them, and all
/// return its value (moka's shape, documented).
#[test]
fn probe_get_with_if_herd_runs_one_init() {
    let _dog = watchdog(LIMIT, "get_with_if herd");
    for round in 0..20u64 {
        let cache: Cache<u64, u64> = Cache::new(100);
        cache.insert(1, 0);
        let inits = AtomicUsize::new(0);
        let judged = AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(8);
        let got: Vec<(u64, bool)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u64)
                .map(|t| {
                    let (cache, inits, judged, barrier) = (&cache, &inits, &judged, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let init = || {
                            inits.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            100 + round
                        };
                        let judge = |v: &u64| {
                            judged.fetch_add(1, Ordering::SeqCst);
                            *v == 0
                        };
                        match t % 3 {
                            0 => (cache.get_with_if(1, init, judge), false),
                            1 => {
                                let e = cache.entry(1).or_insert_with_if(init, judge);
                                (*e.value(), e.is_fresh())
                            }
                            _ => (
                                futures::executor::block_on(cache.get_with_if_async(
                                    1,
                                    async { init() },
                                    judge,
                                )),
                                false,
                            ),
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(inits.load(Ordering::SeqCst), 1, "round {round}: {got:?}");
        assert!(
            got.iter().all(|g| g.0 == 100 + round),
            "round {round}: {got:?}"
        );
        assert_eq!(cache.get(&1), Some(100 + round));
        assert_eq!(cache.loads_in_flight(), 0);
    }
}
