//! Attack round s22b: the write path and statistics changed by the last commits (removals
//! tallied in their shard, eviction elsewhere only when the writer's shard found the cache over
//! capacity, untimed shards' compiled path, the selector fed by evicting writes), through the
//! public API only.
//!
//! Time is a `ManualClock`; nothing sleeps to wait for expiry. Every concurrent test runs under
//! a watchdog, so a hang fails instead of stalling the run.

#![cfg(not(any(loom, shuttle)))]

mod common;

use common::{watchdog, Rng};
use herdcache::{BoxError, Cache, CacheStats, Expiry, ManualClock, Op, RemovalCause};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

// =============================================================================================
// Helpers
// =============================================================================================

/// A hasher whose shard is chosen by the key: the top 10 bits of a `u64` key become bits
/// 40..50 of its hash (the shard index is `(hash >> 40) & mask`), the rest is well mixed.
#[derive(Clone, Default)]
struct ShardPick;

#[derive(Default)]
struct ShardPickHasher(u64);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Hasher for ShardPickHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = mix(self.0 ^ u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let shard = n >> 54;
        let h = mix(n & ((1 << 54) - 1));
        self.0 = (h & !(1023 << 40)) | (shard << 40);
    }
}

impl BuildHasher for ShardPick {
    type Hasher = ShardPickHasher;
    fn build_hasher(&self) -> ShardPickHasher {
        ShardPickHasher(0)
    }
}

/// A key in shard `shard` (of a cache with `ShardPick` and at most 1024 shards).
fn in_shard(shard: u64, i: u64) -> u64 {
    (shard << 54) | i
}

/// Per-cause (count, weight) as a listener saw them.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    expired: (u64, u64),
    explicit: (u64, u64),
    replaced: (u64, u64),
    size: (u64, u64),
}

impl Seen {
    fn add(&mut self, cause: RemovalCause, w: u64) {
        let slot = match cause {
            RemovalCause::Expired => &mut self.expired,
            RemovalCause::Explicit => &mut self.explicit,
            RemovalCause::Replaced => &mut self.replaced,
            RemovalCause::Size => &mut self.size,
            #[allow(unreachable_patterns)]
            _ => panic!("unknown cause"),
        };
        slot.0 += 1;
        slot.1 += w;
    }
    fn of(s: &CacheStats) -> Seen {
        Seen {
            expired: (s.expired.count, s.expired.weight),
            explicit: (s.explicit.count, s.explicit.weight),
            replaced: (s.replaced.count, s.replaced.weight),
            size: (s.size.count, s.size.weight),
        }
    }
    fn minus(self, o: Seen) -> Seen {
        let d = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
        Seen {
            expired: d(self.expired, o.expired),
            explicit: d(self.explicit, o.explicit),
            replaced: d(self.replaced, o.replaced),
            size: d(self.size, o.size),
        }
    }
    fn total(&self) -> u64 {
        self.expired.0 + self.explicit.0 + self.replaced.0 + self.size.0
    }
}

type SeenLog = Arc<Mutex<Seen>>;

const CAP: u64 = 200;

/// The weigher of the statistics tests: 1..=5, or heavier than the capacity for values ending
/// in 999.
fn weigh(_k: &u64, v: &u64) -> u32 {
    if v % 1000 == 999 {
        CAP as u32 + 1 + (*v % 7) as u32
    } else {
        (v % 5) as u32 + 1
    }
}

fn assert_stats_match(cache_stats: &CacheStats, seen: &Seen, what: &str) {
    let got = Seen::of(cache_stats);
    assert_eq!(
        got, *seen,
        "{what}: stats() per cause (left) != eviction listener (right)"
    );
}

// =============================================================================================
// 1. Statistics of removals == what the listener saw
// =============================================================================================

struct ExpireSome;
impl Expiry<u64, u64> for ExpireSome {
    fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
        match v % 4 {
            0 => None,
            1 => Some(Duration::from_secs(3)),
            2 => Some(Duration::from_secs(10)),
            _ => Some(Duration::ZERO),
        }
    }
    fn expire_after_update(
        &self,
        _k: &u64,
        v: &u64,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        if v % 13 == 0 {
            Some(Duration::ZERO)
        } else {
            remaining
        }
    }
}

/// Which expiry a stats test cache uses.
#[derive(Clone, Copy, Debug)]
enum Timing {
    None,
    Ttl,
    Tti,
    PerEntry,
}

fn stats_cache(
    timing: Timing,
    weighted: bool,
    shards: usize,
    clock: &ManualClock,
    seen: &SeenLog,
    stats: bool,
) -> Cache<u64, u64, ShardPick> {
    let log = Arc::clone(seen);
    let mut b = Cache::builder()
        .max_capacity(CAP)
        .shards(shards)
        .clock(clock.clone())
        .eviction_listener(move |k: &u64, v: &u64, cause| {
            let w = if weighted { u64::from(weigh(k, v)) } else { 1 };
            log.lock().unwrap().add(cause, w);
        });
    if weighted {
        b = b.weigher(weigh);
    }
    if stats {
        b = b.record_stats();
    }
    b = match timing {
        Timing::None => b,
        Timing::Ttl => b.time_to_live(Duration::from_secs(5)),
        Timing::Tti => b.time_to_idle(Duration::from_secs(4)),
        Timing::PerEntry => b.expire_after(ExpireSome),
    };
    b.build_with_hasher(ShardPick)
}

/// One random operation on a stats test cache, touching every removal path.
fn random_op(cache: &Cache<u64, u64, ShardPick>, clock: &ManualClock, r: &mut Rng, t: u64) {
    // Skewed keys: half in shard 0.
    let shard = if r.next() % 2 == 0 { 0 } else { r.next() % 16 };
    let key = in_shard(shard, r.next() % 150);
    let val = r.next() % 10_000;
    match r.next() % 1000 {
        0..=399 => cache.insert(key, val),
        400..=599 => {
            let _ = cache.get(&key);
        }
        600..=659 => cache.invalidate(&key),
        660..=719 => {
            let _ = cache.remove(&key);
        }
        720..=799 => {
            let _ = cache.get_with(key, || val);
        }
        800..=859 => {
            let _ = cache.entry(key).and_compute_with(|e| match e {
                Some(e) if e.value() % 3 == 0 => Op::Remove,
                Some(_) => Op::Put(val),
                None if val % 2 == 0 => Op::Put(val),
                None => Op::Nop,
            });
        }
        860..=879 => cache.insert(key, (val / 1000) * 1000 + 999), // too heavy
        880..=889 => {
            let _ = cache.get_with(key, || (val / 1000) * 1000 + 999); // too heavy
        }
        890..=899 => {
            let _ = cache
                .entry(key)
                .and_compute_with(|_| Op::Put((val / 1000) * 1000 + 999)); // too heavy
        }
        900..=909 => {
            let _ = cache.optionally_get_with(key, || (val % 2 == 0).then_some(val));
        }
        910..=914 => cache.retain(|k, v| (k ^ v ^ t) % 5 != 0),
        915..=924 => cache.run_pending_tasks(),
        925..=926 => cache.invalidate_all(),
        927..=960 => clock.advance(Duration::from_millis(r.next() % 1500)),
        _ => {
            let _ = cache.contains_key(&key);
        }
    }
}

fn hammer(
    cache: &Cache<u64, u64, ShardPick>,
    clock: &ManualClock,
    threads: u64,
    ops: u64,
    seed: u64,
) {
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (cache, clock, barrier) = (cache, clock, &barrier);
            s.spawn(move || {
                let mut r = Rng(seed.wrapping_mul(31).wrapping_add(t * 7919 + 1) | 1);
                barrier.wait();
                for _ in 0..ops {
                    random_op(cache, clock, &mut r, t);
                }
            });
        }
    });
}

fn stats_vs_listener(timing: Timing, weighted: bool, shards: usize) {
    let _w = watchdog(LIMIT, "stats vs listener");
    let clock = ManualClock::new();
    let seen: SeenLog = Arc::default();
    let cache = stats_cache(timing, weighted, shards, &clock, &seen, true);
    hammer(&cache, &clock, 4, 20_000, 1);
    // Evictions for size for certain (the random mix may expire everything first under TTI):
    // twice the capacity of fresh weight-1 keys, with no clock advance.
    for i in 0..2 * CAP {
        cache.insert(in_shard(i % 16, 1_000_000 + i), 5);
    }
    let s1 = cache.stats();
    let l1 = *seen.lock().unwrap();
    assert_stats_match(&s1, &l1, &format!("{timing:?} weighted={weighted} phase 1"));
    assert!(l1.total() > 1000, "the test removed too little: {l1:?}");
    for (name, c) in [
        ("expired", l1.expired.0),
        ("explicit", l1.explicit.0),
        ("replaced", l1.replaced.0),
        ("size", l1.size.0),
    ] {
        if name != "expired" || !matches!(timing, Timing::None) {
            assert!(c > 0, "{timing:?}: no removal for cause {name}: {l1:?}");
        }
    }
    hammer(&cache, &clock, 3, 10_000, 2);
    let s2 = cache.stats();
    let l2 = *seen.lock().unwrap();
    assert_stats_match(&s2, &l2, &format!("{timing:?} weighted={weighted} phase 2"));
    let d = s2 - s1;
    assert_stats_match(&d, &l2.minus(l1), &format!("{timing:?} delta"));
    // A quiescent cache: the bound, the counts, the invariants.
    assert!(
        cache.weighted_size() <= CAP,
        "weighted_size {} > {CAP}",
        cache.weighted_size()
    );
    cache.run_pending_tasks();
    let l3 = *seen.lock().unwrap();
    assert_stats_match(&cache.stats(), &l3, "after run_pending_tasks");
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.validate();
}

#[test]
fn s01_stats_match_listener_untimed_unweighted() {
    stats_vs_listener(Timing::None, false, 16);
}

#[test]
fn s02_stats_match_listener_untimed_weighted() {
    stats_vs_listener(Timing::None, true, 16);
}

#[test]
fn s03_stats_match_listener_ttl_weighted() {
    stats_vs_listener(Timing::Ttl, true, 16);
}

#[test]
fn s04_stats_match_listener_tti_unweighted() {
    stats_vs_listener(Timing::Tti, false, 8);
}

#[test]
fn s05_stats_match_listener_per_entry_weighted_one_shard() {
    stats_vs_listener(Timing::PerEntry, true, 1);
}

#[test]
fn s06_stats_match_listener_per_entry_many_shards() {
    stats_vs_listener(Timing::PerEntry, true, 64);
}

/// Without `record_stats` every removal count stays 0, whatever was removed.
#[test]
fn s07_no_record_stats_no_removal_counts() {
    let _w = watchdog(LIMIT, "no stats");
    let clock = ManualClock::new();
    let seen: SeenLog = Arc::default();
    let cache = stats_cache(Timing::Ttl, true, 16, &clock, &seen, false);
    hammer(&cache, &clock, 2, 10_000, 3);
    assert!(seen.lock().unwrap().total() > 100);
    let s = cache.stats();
    assert_eq!(
        Seen::of(&s),
        Seen::default(),
        "removals counted without record_stats"
    );
    assert_eq!((s.hits, s.misses), (0, 0));
    let d = cache.stats() - s;
    assert_eq!(Seen::of(&d), Seen::default());
}

/// Each removal path, one at a time, single-threaded: the exact count and weight of its cause.
#[test]
fn s08_each_removal_path_counts_exactly() {
    let clock = ManualClock::new();
    let seen: SeenLog = Arc::default();
    let cache = stats_cache(Timing::Ttl, true, 4, &clock, &seen, true);
    let step = |what: &str, f: &dyn Fn(), want: Seen| {
        let before_s = Seen::of(&cache.stats());
        let before_l = *seen.lock().unwrap();
        f();
        let ds = Seen::of(&cache.stats()).minus(before_s);
        let dl = seen.lock().unwrap().minus(before_l);
        assert_eq!(dl, want, "{what}: the listener saw");
        assert_eq!(ds, want, "{what}: stats() delta");
    };
    let z = Seen::default();
    step("insert", &|| cache.insert(1, 3), z); // weight 4
    step(
        "replace",
        &|| cache.insert(1, 4),
        Seen {
            replaced: (1, 4),
            ..z
        },
    ); // old weight 4
    step(
        "too heavy insert replaces",
        &|| cache.insert(1, 1999),
        Seen {
            replaced: (1, 5),
            size: (1, u64::from(weigh(&1, &1999))),
            ..z
        },
    );
    step(
        "too heavy get_with",
        &|| assert_eq!(cache.get_with(2, || 2999), 2999),
        Seen {
            size: (1, u64::from(weigh(&2, &2999))),
            ..z
        },
    );
    step(
        "compute insert",
        &|| {
            let _ = cache.entry(3).and_compute_with(|_| Op::Put(0));
        },
        z,
    );
    step(
        "too heavy compute replaces",
        &|| {
            let _ = cache.entry(3).and_compute_with(|_| Op::Put(3999));
        },
        Seen {
            replaced: (1, 1),
            size: (1, u64::from(weigh(&3, &3999))),
            ..z
        },
    );
    step("insert 4", &|| cache.insert(4, 2), z);
    step(
        "invalidate",
        &|| cache.invalidate(&4),
        Seen {
            explicit: (1, 3),
            ..z
        },
    );
    step("insert 5", &|| cache.insert(5, 1), z);
    step(
        "remove",
        &|| assert_eq!(cache.remove(&5), Some(1)),
        Seen {
            explicit: (1, 2),
            ..z
        },
    );
    step("remove absent", &|| assert_eq!(cache.remove(&5), None), z);
    step(
        "insert 6, 7",
        &|| {
            cache.insert(6, 0);
            cache.insert(7, 1);
        },
        z,
    );
    step(
        "retain",
        &|| cache.retain(|k, _| *k != 6),
        Seen {
            explicit: (1, 1),
            ..z
        },
    );
    step(
        "invalidate_all",
        &|| cache.invalidate_all(),
        Seen {
            explicit: (1, 2),
            ..z
        },
    );
    // Expiry reclaimed by a read of the key.
    step("insert 8", &|| cache.insert(8, 4), z);
    clock.advance(Duration::from_secs(6));
    step(
        "expired read",
        &|| assert_eq!(cache.get(&8), None),
        Seen {
            expired: (1, 5),
            ..z
        },
    );
    // By a write of the same key.
    step("insert 9", &|| cache.insert(9, 1), z);
    clock.advance(Duration::from_secs(6));
    step(
        "write over expired",
        &|| cache.insert(9, 2),
        Seen {
            expired: (1, 2),
            ..z
        },
    );
    clock.advance(Duration::from_secs(6));
    step(
        "run_pending_tasks",
        &|| cache.run_pending_tasks(),
        Seen {
            expired: (1, 3),
            ..z
        },
    );
    // Eviction for size: fill past the capacity with weight-1 values.
    for k in 100..100 + CAP {
        cache.insert(k, 0);
    }
    step(
        "evict",
        &|| cache.insert(1000, 0),
        Seen { size: (1, 1), ..z },
    );
}

/// Expired entries reclaimed by writes of *other* keys, and by reads of other keys, from many
/// threads: counted once each, as the listener saw them.
#[test]
fn s09_expiry_reclaimed_by_other_keys_concurrently() {
    let _w = watchdog(LIMIT, "expiry reclaim");
    let clock = ManualClock::new();
    let seen: SeenLog = Arc::default();
    let cache = stats_cache(Timing::Ttl, false, 16, &clock, &seen, true);
    for round in 0..50u64 {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let cache = &cache;
                s.spawn(move || {
                    for i in 0..40 {
                        let k = in_shard((t * 4 + i) % 16, round * 1000 + t * 100 + i);
                        if (i + t) % 2 == 0 {
                            cache.insert(k, i);
                        } else {
                            let _ =
                                cache.get(&in_shard(i % 16, (round.saturating_sub(1)) * 1000 + i));
                        }
                    }
                });
            }
        });
        clock.advance(Duration::from_secs(3));
    }
    let l = *seen.lock().unwrap();
    assert_stats_match(&cache.stats(), &l, "expiry reclaimed by others");
    assert!(l.expired.0 > 0);
    clock.advance(Duration::from_secs(10));
    cache.run_pending_tasks();
    let l = *seen.lock().unwrap();
    assert_stats_match(&cache.stats(), &l, "after run_pending_tasks");
    assert_eq!(cache.entry_count(), 0);
}

/// Loader caches: refreshes replacing values, fail-safe kept values, failing loads, negative
/// caching, from many threads.
#[test]
fn s10_stats_match_listener_with_refresh_and_fail_safe() {
    let _w = watchdog(LIMIT, "refresh + fail-safe stats");
    let clock = ManualClock::new();
    let seen: SeenLog = Arc::default();
    let down = Arc::new(AtomicBool::new(false));
    let gen = Arc::new(AtomicU64::new(0));
    let log = Arc::clone(&seen);
    let (d, g) = (Arc::clone(&down), Arc::clone(&gen));
    let cache: Cache<u64, u64, ShardPick> = Cache::builder()
        .max_capacity(100)
        .shards(8)
        .weigher(|_k: &u64, v: &u64| (v % 3) as u32 + 1)
        .time_to_live(Duration::from_secs(10))
        .refresh_after(Duration::from_secs(3))
        .fail_safe(Duration::from_secs(30))
        .refresh_backoff(Duration::from_secs(1))
        .negative_ttl(Duration::from_secs(2))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |_k: &u64, v: &u64, cause| {
            log.lock().unwrap().add(cause, (v % 3) + 1);
        })
        .loader(move |_k: &u64| {
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(g.fetch_add(1, Ordering::SeqCst))
            }
        })
        .build_with_hasher(ShardPick);
    let barrier = Barrier::new(4);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (cache, clock, down, barrier) = (&cache, &clock, &down, &barrier);
            s.spawn(move || {
                let mut r = Rng(t * 104_729 + 17);
                barrier.wait();
                for _ in 0..15_000 {
                    let key = in_shard(r.next() % 8, r.next() % 60);
                    match r.next() % 100 {
                        0..=49 => {
                            let _ = cache.load(key);
                        }
                        50..=64 => {
                            let _ = cache.get(&key);
                        }
                        65..=74 => cache.insert(key, r.next() % 100),
                        75..=79 => cache.invalidate(&key),
                        80..=84 => {
                            let _ = cache.get_with(key, || 7);
                        }
                        85..=86 => cache.retain(|k, _| k % 7 != 0),
                        87..=89 => cache.run_pending_tasks(),
                        90..=97 => clock.advance(Duration::from_millis(r.next() % 2000)),
                        _ => {
                            if t == 0 {
                                down.fetch_xor(true, Ordering::SeqCst);
                            }
                        }
                    }
                }
            });
        }
    });
    let s = cache.stats();
    let l = *seen.lock().unwrap();
    assert_stats_match(&s, &l, "refresh + fail-safe");
    assert!(s.refreshes_succeeded > 0, "no refresh happened: {s:?}");
    assert!(l.replaced.0 > 0 && l.expired.0 > 0 && l.size.0 > 0, "{l:?}");
}

// =============================================================================================
// 2. Capacity bound
// =============================================================================================

/// Concurrent inserts with skewed keys over many shards: each thread checks the bound right after
/// its own insert returned (at most one entry beyond per other thread still inserting), and
/// after the join the bound is exact.
fn capacity_run(shards: usize, cap: u64, threads: u64, weighted: bool, skew_pct: u64) {
    let _w = watchdog(LIMIT, "capacity");
    const MAXW: u64 = 20;
    let mut b = Cache::builder().max_capacity(cap).shards(shards);
    if weighted {
        // The weight is in the value: replacing a key's value changes its weight both ways.
        b = b.weigher(|_k: &u64, v: &u64| (v % MAXW) as u32 + 1);
    }
    let cache: Cache<u64, u64, ShardPick> = b.build_with_hasher(ShardPick);
    let maxw = if weighted { MAXW } else { 1 };
    let worst = AtomicU64::new(0);
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (cache, worst, barrier) = (&cache, &worst, &barrier);
            s.spawn(move || {
                let mut r = Rng(t * 7_777 + 3);
                barrier.wait();
                for i in 0..40_000u64 {
                    let shard = if r.next() % 100 < skew_pct {
                        t % 2
                    } else {
                        r.next() % shards as u64
                    };
                    let key = in_shard(shard, r.next() % (cap * 2));
                    let v = r.next();
                    match i % 10 {
                        0 => {
                            let _ = cache.get_with(key, || v);
                        }
                        1 => {
                            let _ = cache.entry(key).and_compute_with(|_| Op::Put(v));
                        }
                        2 => cache.invalidate(&key),
                        _ => cache.insert(key, v),
                    }
                    let ws = cache.weighted_size();
                    worst.fetch_max(ws, Ordering::Relaxed);
                    assert!(
                        ws <= cap + (threads - 1) * maxw,
                        "after its own write returned: weighted_size {ws} > capacity {cap} + \
                         {} other writers × {maxw}",
                        threads - 1
                    );
                }
            });
        }
    });
    let ws = cache.weighted_size();
    assert!(
        ws <= cap,
        "after every write returned: weighted_size {ws} > {cap}"
    );
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    let sum: u64 = if weighted {
        cache.iter().map(|(_, v)| v % MAXW + 1).sum()
    } else {
        cache.iter().count() as u64
    };
    assert_eq!(sum, ws, "weighted_size disagrees with the entries' weights");
    cache.validate();
    eprintln!(
        "capacity shards={shards} cap={cap} weighted={weighted}: worst seen {}",
        worst.load(Ordering::Relaxed)
    );
}

#[test]
fn c01_capacity_many_shards_skewed_unweighted() {
    capacity_run(64, 100, 4, false, 90);
}

#[test]
fn c02_capacity_many_shards_skewed_weighted() {
    capacity_run(64, 300, 4, true, 90);
}

#[test]
fn c03_capacity_more_shards_than_capacity() {
    capacity_run(256, 50, 3, true, 50);
}

#[test]
fn c04_capacity_uniform_weighted() {
    capacity_run(16, 1000, 4, true, 0);
}

/// Single thread, quiescent after each write: one shard holds nearly everything; writes of
/// other shards (within their share) and heavier replacements in a small shard must evict
/// elsewhere.
#[test]
fn c05_capacity_after_each_write_single_thread() {
    let cap = 100;
    let cache: Cache<u64, u64, ShardPick> = Cache::builder()
        .max_capacity(cap)
        .shards(16)
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .build_with_hasher(ShardPick);
    // Shard 0 takes the whole capacity (nothing else is stored: no eviction).
    for i in 0..100 {
        cache.insert(in_shard(0, i), 1);
        assert!(cache.weighted_size() <= cap);
    }
    assert_eq!(cache.weighted_size(), 100);
    // A light key in shard 5, made heavier by replacement, then lighter, then heavier.
    let k = in_shard(5, 0);
    for (step, w) in [1u64, 5, 2, 6, 6, 1, 6, 50, 3, 99, 100]
        .into_iter()
        .enumerate()
    {
        cache.insert(k, w);
        let ws = cache.weighted_size();
        assert!(
            ws <= cap,
            "step {step}: after replacing with weight {w}: weighted_size {ws} > {cap}"
        );
        if cache.get(&k) != Some(w) {
            // Not a documented promise (the policy may evict the newcomer), but noted.
            eprintln!("c05 step {step}: the written key (weight {w}) was evicted at once");
        }
    }
    // A weight increase through get_with / compute (loads publish through the same path).
    cache.invalidate_all();
    for i in 0..100 {
        cache.insert(in_shard(0, i), 1);
    }
    let k2 = in_shard(9, 1);
    let _ = cache.get_with(k2, || 30);
    assert!(
        cache.weighted_size() <= cap,
        "get_with: {}",
        cache.weighted_size()
    );
    let _ = cache.entry(k2).and_compute_with(|_| Op::Put(60));
    assert!(
        cache.weighted_size() <= cap,
        "compute: {}",
        cache.weighted_size()
    );
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.validate();
}

/// Replacements only (no new keys): concurrent heavier replacements in every shard.
#[test]
fn c06_capacity_concurrent_heavier_replacements() {
    let _w = watchdog(LIMIT, "replacements");
    let cap = 400;
    let cache: Cache<u64, u64, ShardPick> = Cache::builder()
        .max_capacity(cap)
        .shards(32)
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .build_with_hasher(ShardPick);
    for round in 0..200u64 {
        // Fill with weight-1 entries, then make them heavier from 4 threads.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let cache = &cache;
                s.spawn(move || {
                    for i in 0..100u64 {
                        let k = in_shard((i * 7 + t) % 32, (round % 3) * 1000 + t * 100 + i);
                        cache.insert(k, 1);
                    }
                    for i in 0..100u64 {
                        let k = in_shard((i * 7 + t) % 32, (round % 3) * 1000 + t * 100 + i);
                        cache.insert(k, 1 + (i + round) % 9);
                        let ws = cache.weighted_size();
                        assert!(ws <= cap + 3 * 9, "round {round}: {ws}");
                    }
                });
            }
        });
        let ws = cache.weighted_size();
        assert!(
            ws <= cap,
            "round {round}: quiescent weighted_size {ws} > {cap}"
        );
    }
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.validate();
}

// =============================================================================================
// 3. Untimed vs timed shards
// =============================================================================================

/// The configurations: what each sets.
#[derive(Clone, Copy, Debug, Default)]
struct Conf {
    ttl: bool,
    tti: bool,
    expire_after: bool,
    refresh: bool,
    early: bool,
    fail_safe: bool,
    negative: bool,
    jitter: bool,
}

struct Fixed;
impl Expiry<u64, u64> for Fixed {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        Some(Duration::from_secs(100))
    }
}

fn conf_cache(
    c: Conf,
    clock: &ManualClock,
    down: &Arc<AtomicBool>,
    gen: &Arc<AtomicU64>,
) -> Cache<u64, u64> {
    let (d, g) = (Arc::clone(down), Arc::clone(gen));
    let mut b = Cache::builder()
        .max_capacity(1000)
        .shards(4)
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| {
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(g.fetch_add(1, Ordering::SeqCst) + 1)
            }
        });
    if c.ttl {
        b = b.time_to_live(Duration::from_secs(100));
    }
    if c.tti {
        b = b.time_to_idle(Duration::from_secs(100));
    }
    if c.expire_after {
        b = b.expire_after(Fixed);
    }
    if c.refresh {
        b = b.refresh_after(Duration::from_secs(50));
    }
    if c.early {
        b = b.early_refresh(1.0);
    }
    if c.fail_safe {
        b = b.fail_safe(Duration::from_secs(1000));
    }
    if c.negative {
        b = b.negative_ttl(Duration::from_secs(20));
    }
    if c.jitter {
        b = b.jitter(0.2);
    }
    b.try_build().unwrap_or_else(|e| panic!("{c:?}: {e:?}"))
}

fn check_conf(c: Conf) {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let gen = Arc::new(AtomicU64::new(0));
    let cache = conf_cache(c, &clock, &down, &gen);
    let expires = c.ttl || c.tti || c.expire_after;
    // Insert and replace.
    cache.insert(1, 10);
    cache.insert(1, 11);
    assert_eq!(cache.get(&1), Some(11), "{c:?}: replace");
    assert_eq!(cache.stats().replaced.count, 1, "{c:?}: replaced count");
    // A load.
    let v2 = cache.load(2).unwrap();
    assert_eq!(cache.get(&2), Some(v2), "{c:?}: loaded value");
    assert_eq!(cache.entry_count(), 2, "{c:?}");
    // Negative caching.
    down.store(true, Ordering::SeqCst);
    let before = gen.load(Ordering::SeqCst);
    assert!(cache.load(3).is_err(), "{c:?}");
    // An error does not advance gen; count loader calls through stats.
    let calls = cache.stats().load_failures;
    assert!(cache.load(3).is_err(), "{c:?}");
    let calls2 = cache.stats().load_failures;
    if c.negative {
        assert_eq!(
            calls2, calls,
            "{c:?}: negative_ttl: the failure is remembered"
        );
        clock.advance(Duration::from_secs(21));
        assert!(cache.load(3).is_err(), "{c:?}");
        assert_eq!(
            cache.stats().load_failures,
            calls + 1,
            "{c:?}: negative_ttl over: the loader runs again"
        );
    } else {
        assert_eq!(
            calls2,
            calls + 1,
            "{c:?}: no negative caching: the loader runs again"
        );
        clock.advance(Duration::from_secs(21));
    }
    down.store(false, Ordering::SeqCst);
    assert_eq!(gen.load(Ordering::SeqCst), before);
    // Now at t = 21 s. Refresh: after 50 s a read reloads (inline, no spawner).
    clock.advance(Duration::from_secs(40)); // t = 61 s: past refresh_after (50 s, ±20 %)
    let r = cache.get(&2);
    if c.refresh {
        // The read served the old value and refreshed it (no spawner: in this reader).
        assert_eq!(r, Some(v2), "{c:?}: stale read serves the old value");
        let now = cache.get(&2);
        assert_ne!(
            now,
            Some(v2),
            "{c:?}: refresh_after: the value was not reloaded"
        );
        assert!(cache.stats().refreshes_succeeded >= 1, "{c:?}");
    } else if !c.early {
        assert_eq!(r, Some(v2), "{c:?}: nothing to refresh");
    }
    // Expiry: far in the future, everything timed is gone; nothing else ever goes.
    clock.advance(Duration::from_secs(100_000));
    let gone = cache.get(&1).is_none();
    if expires {
        assert!(gone, "{c:?}: an entry outlived its expiry");
        if c.fail_safe {
            // Fail-safe keeps the last value for a failing load, within max_stale.
        }
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0, "{c:?}");
    } else {
        assert!(!gone, "{c:?}: an entry without expiry expired");
        if !c.refresh {
            assert_eq!(cache.get(&1), Some(11), "{c:?}");
        }
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 2, "{c:?}");
        assert_eq!(cache.stats().expired.count, 0, "{c:?}");
    }
    cache.validate();
}

#[test]
fn t01_every_configuration_expires_refreshes_and_replaces_as_documented() {
    let mut confs = vec![
        Conf::default(),
        Conf {
            ttl: true,
            ..Default::default()
        },
        Conf {
            tti: true,
            ..Default::default()
        },
        Conf {
            expire_after: true,
            ..Default::default()
        },
        Conf {
            refresh: true,
            ..Default::default()
        },
        Conf {
            negative: true,
            ..Default::default()
        },
        Conf {
            jitter: true,
            ..Default::default()
        },
        Conf {
            negative: true,
            jitter: true,
            ..Default::default()
        },
        Conf {
            ttl: true,
            jitter: true,
            ..Default::default()
        },
        Conf {
            ttl: true,
            refresh: true,
            ..Default::default()
        },
        Conf {
            ttl: true,
            early: true,
            ..Default::default()
        },
        Conf {
            ttl: true,
            fail_safe: true,
            ..Default::default()
        },
        Conf {
            ttl: true,
            negative: true,
            ..Default::default()
        },
        Conf {
            tti: true,
            refresh: true,
            negative: true,
            jitter: true,
            ..Default::default()
        },
        Conf {
            expire_after: true,
            refresh: true,
            fail_safe: true,
            ..Default::default()
        },
        Conf {
            refresh: true,
            negative: true,
            ..Default::default()
        },
        Conf {
            refresh: true,
            jitter: true,
            ..Default::default()
        },
        Conf {
            ttl: true,
            tti: true,
            refresh: true,
            early: true,
            fail_safe: true,
            negative: true,
            jitter: true,
            ..Default::default()
        },
    ];
    // fail_safe alone, and with only a refresh, if the builder accepts them.
    for c in [
        Conf {
            fail_safe: true,
            ..Default::default()
        },
        Conf {
            fail_safe: true,
            refresh: true,
            ..Default::default()
        },
        Conf {
            fail_safe: true,
            negative: true,
            ..Default::default()
        },
    ] {
        confs.push(c);
    }
    for c in confs {
        check_conf(c);
    }
}

/// Only `jitter`: nothing has a time to live, so nothing expires, and the clock jumping to its
/// far end changes nothing (an entry "may live up to 1 + fraction times its time to live": none).
#[test]
fn t02_jitter_only_never_expires() {
    let clock = ManualClock::new();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .jitter(0.5)
        .clock(clock.clone())
        .build();
    for k in 0..50 {
        cache.insert(k, k);
    }
    clock.advance(Duration::MAX);
    for k in 0..50 {
        assert_eq!(cache.get(&k), Some(k));
        cache.insert(k, k + 1);
    }
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 50);
    assert_eq!(cache.iter().count(), 50);
}

/// Only `negative_ttl` (no other expiry: values never expire), remembered `None` and errors
/// expire exactly at the negative TTL; a write ends it early; values stored never expire.
#[test]
fn t03_negative_ttl_only() {
    let clock = ManualClock::new();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(60))
        .clock(clock.clone())
        .record_stats()
        .build();
    let calls = AtomicUsize::new(0);
    let none = || {
        calls.fetch_add(1, Ordering::SeqCst);
        None
    };
    assert_eq!(cache.optionally_get_with(1, none), None);
    assert_eq!(cache.optionally_get_with(1, none), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "None remembered");
    clock.advance(Duration::from_secs(59));
    assert_eq!(cache.optionally_get_with(1, none), None);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "None remembered until 60 s"
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        cache.optionally_get_with(1, || Some(5)),
        Some(5),
        "negative ttl over"
    );
    // A value never expires.
    clock.advance(Duration::from_secs(1_000_000));
    assert_eq!(cache.get(&1), Some(5));
    // Errors too.
    let r: Result<u64, _> = cache.try_get_with(2, || Err::<u64, _>("down"));
    assert!(r.is_err());
    let r: Result<u64, Arc<&str>> = cache.try_get_with(2, || Ok(9));
    assert!(r.is_err(), "error remembered for the negative TTL");
    cache.insert(2, 3); // a write ends it
    assert_eq!(cache.get(&2), Some(3));
    assert_eq!(cache.try_get_with(2, || Err::<u64, _>("x")).ok(), Some(3));
    cache.insert(2, 4);
    assert_eq!(cache.stats().replaced.count, 1);
    assert_eq!(cache.stats().expired.count, 0);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 2);
}

/// ttl with jitter: each entry lives within [ttl·(1−j), ttl·(1+j)] and every entry is gone
/// after the upper end; replacing a value keeps it within the same bounds.
#[test]
fn t04_ttl_with_jitter_bounds() {
    let clock = ManualClock::new();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(10_000)
        .shards(8)
        .time_to_live(Duration::from_secs(100))
        .jitter(0.2)
        .clock(clock.clone())
        .build();
    for k in 0..1000 {
        cache.insert(k, k);
    }
    clock.advance(Duration::from_secs(79));
    assert!(
        (0..1000).all(|k| cache.get(&k) == Some(k)),
        "expired before ttl·(1−j)"
    );
    // Replace half at t = 79: they live until 79 + [80, 120].
    for k in 0..500 {
        cache.insert(k, k + 1);
    }
    clock.advance(Duration::from_secs(42)); // t = 121
    assert!(
        (500..1000).all(|k| cache.get(&k).is_none()),
        "lived past ttl·(1+j)"
    );
    assert!(
        (0..500).all(|k| cache.get(&k) == Some(k + 1)),
        "a replaced value expired before ttl·(1−j) from its write"
    );
    clock.advance(Duration::from_secs(79)); // t = 200 > 79 + 120
    assert!(
        (0..500).all(|k| cache.get(&k).is_none()),
        "replaced lived past 1+j"
    );
}

/// A write resets a refresh-ahead deadline: a value written 15 s ago is not refreshed by a
/// read (refresh_after 50 s), in every timed layout that refreshes.
#[test]
fn t05_replace_resets_refresh_deadline() {
    for (ttl, fail_safe, negative) in [
        (false, false, false),
        (true, false, false),
        (true, true, false),
        (false, false, true),
        (true, true, true),
    ] {
        let what = format!("ttl={ttl} fail_safe={fail_safe} negative={negative}");
        let clock = ManualClock::new();
        let loads = Arc::new(AtomicU64::new(0));
        let l = Arc::clone(&loads);
        let mut b = Cache::builder()
            .max_capacity(100)
            .shards(2)
            .refresh_after(Duration::from_secs(50))
            .clock(clock.clone())
            .record_stats()
            .loader(move |k: &u64| {
                l.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(*k + 1000)
            });
        if ttl {
            b = b.time_to_live(Duration::from_secs(100));
        }
        if fail_safe {
            b = b.fail_safe(Duration::from_secs(100));
        }
        if negative {
            b = b.negative_ttl(Duration::from_secs(5));
        }
        let cache: Cache<u64, u64> = b.build();
        assert_eq!(cache.load(1).unwrap(), 1001);
        clock.advance(Duration::from_secs(45));
        cache.insert(1, 7);
        clock.advance(Duration::from_secs(15)); // 60 s after the load, 15 s after the write
        assert_eq!(cache.get(&1), Some(7), "{what}");
        assert_eq!(
            cache.get(&1),
            Some(7),
            "{what}: refreshed 15 s after a write"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 1, "{what}");
        if ttl {
            // The write restarted the time to live too: alive at 45 + 99, gone at 45 + 100.
            clock.advance(Duration::from_secs(84)); // t = 144
                                                    // (refresh happens now: 99 s after the write; the refreshed value restarts it)
            let _ = cache.get(&1);
            assert!(
                cache.get(&1).is_some(),
                "{what}: expired before its TTL from the write"
            );
        }
        assert_eq!(Seen::of(&cache.stats()).expired.0, 0, "{what}");
    }
}

/// Weights from 0 to the whole capacity, concurrently: the bound after every write returned.
#[test]
fn c07_capacity_with_zero_and_whole_capacity_weights() {
    let _w = watchdog(LIMIT, "zero and full weights");
    let cap = 64;
    let cache: Cache<u64, u64, ShardPick> = Cache::builder()
        .max_capacity(cap)
        .shards(8)
        .weigher(|_k: &u64, v: &u64| *v as u32)
        .build_with_hasher(ShardPick);
    let barrier = Barrier::new(4);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (cache, barrier) = (&cache, &barrier);
            s.spawn(move || {
                let mut r = Rng(t * 31 + 5);
                barrier.wait();
                for _ in 0..50_000 {
                    let key = in_shard(r.next() % 8, r.next() % 40);
                    let w = match r.next() % 10 {
                        0..=3 => 0,
                        4 => cap,
                        5 => cap / 2,
                        6 => cap + 1,
                        _ => r.next() % 8,
                    };
                    cache.insert(key, w);
                    let ws = cache.weighted_size();
                    assert!(ws <= cap + 3 * cap, "{ws}");
                }
            });
        }
    });
    let ws = cache.weighted_size();
    assert!(ws <= cap, "after every write returned: {ws} > {cap}");
    let sum: u64 = cache.iter().map(|(_, v)| v).sum();
    assert_eq!(sum, ws);
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.validate();
}

// =============================================================================================
// 4. Policy adaptation
// =============================================================================================

fn lru_hit_ratio(trace: &[u64], cap: usize, warm: usize) -> f64 {
    // A plain LRU (O(n) touch is fine at these sizes with a map of stamps).
    let mut stamp: HashMap<u64, u64> = HashMap::new();
    let mut order: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    let (mut hits, mut n) = (0u64, 0u64);
    for (t, &k) in trace.iter().enumerate() {
        let t = t as u64;
        let hit = if let Some(old) = stamp.insert(k, t) {
            order.remove(&old);
            true
        } else {
            false
        };
        order.insert(t, k);
        if stamp.len() > cap {
            let (&old_t, &old_k) = order.iter().next().unwrap();
            order.remove(&old_t);
            stamp.remove(&old_k);
        }
        if t as usize >= warm {
            n += 1;
            hits += u64::from(hit);
        }
    }
    hits as f64 / n as f64
}

/// Runs `trace` split across `threads` (each thread takes the accesses with its index mod
/// threads, in order) with get + insert on miss; the hit ratio after `warm` accesses.
fn herd_hit_ratio(cache: &Cache<u64, u64>, trace: &[u64], warm: usize, threads: usize) -> f64 {
    let (hits, n) = (AtomicU64::new(0), AtomicU64::new(0));
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (hits, n, barrier) = (&hits, &n, &barrier);
            s.spawn(move || {
                barrier.wait();
                for (i, &k) in trace.iter().enumerate() {
                    if i % threads != t {
                        continue;
                    }
                    let hit = cache.get(&k).is_some();
                    if !hit {
                        cache.insert(k, k);
                    }
                    if i >= warm {
                        n.fetch_add(1, Ordering::Relaxed);
                        hits.fetch_add(u64::from(hit), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    hits.load(Ordering::Relaxed) as f64 / n.load(Ordering::Relaxed) as f64
}

fn loop_trace(keys: u64, passes: u64) -> Vec<u64> {
    (0..passes).flat_map(|_| 0..keys).collect()
}

fn zipf_trace(keys: u64, s: f64, len: usize, seed: u64) -> Vec<u64> {
    let weights: Vec<f64> = (1..=keys).map(|i| 1.0 / (i as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut r = Rng(seed);
    (0..len)
        .map(|_| {
            let u = (r.next() >> 11) as f64 / (1u64 << 53) as f64;
            let i = cdf.partition_point(|&c| c < u) as u64;
            // Scatter the ranks so that hot keys are not adjacent integers.
            mix(i.min(keys - 1)) >> 11
        })
        .collect()
}

fn loop_case(cap: u64, shards: Option<usize>, threads: usize) {
    let _w = watchdog(LIMIT, "loop");
    // Odd, so that with 2 threads each key alternates between them from pass to pass.
    let keys = cap * 3 / 2 + 1;
    let trace = loop_trace(keys, 40);
    let warm = (keys * 20) as usize;
    let mut b = Cache::builder().max_capacity(cap);
    if let Some(n) = shards {
        b = b.shards(n);
    }
    let cache: Cache<u64, u64> = b.build();
    let herd = herd_hit_ratio(&cache, &trace, warm, threads);
    let lru = lru_hit_ratio(&trace, cap as usize, warm);
    eprintln!(
        "loop cap={cap} shards={shards:?} threads={threads}: herdcache {herd:.3}, LRU {lru:.3}"
    );
    assert!(lru < 0.01);
    assert!(
        herd >= 0.25,
        "loop over 1.5× the capacity: herdcache's hit ratio {herd:.3} does not clearly beat LRU's \
         {lru:.3} (the optimum is {:.3})",
        cap as f64 / keys as f64
    );
}

#[test]
fn p01_loop_single_thread() {
    loop_case(1000, None, 1);
}

#[test]
fn p02_loop_two_threads() {
    loop_case(1000, None, 2);
}

#[test]
fn p03_loop_many_shards_two_threads() {
    loop_case(4000, Some(8), 2);
}

#[test]
fn p04_loop_small_cache() {
    loop_case(200, None, 1);
}

fn zipf_case(cap: u64, threads: usize, shards: Option<usize>) {
    let _w = watchdog(LIMIT, "zipf");
    let trace = zipf_trace(50_000, 0.9, 400_000, 99);
    let warm = 100_000;
    let mut b = Cache::builder().max_capacity(cap);
    if let Some(n) = shards {
        b = b.shards(n);
    }
    let cache: Cache<u64, u64> = b.build();
    let herd = herd_hit_ratio(&cache, &trace, warm, threads);
    let lru = lru_hit_ratio(&trace, cap as usize, warm);
    eprintln!(
        "zipf cap={cap} threads={threads} shards={shards:?}: herdcache {herd:.3}, LRU {lru:.3}"
    );
    assert!(
        herd >= lru - 0.005,
        "zipf: herdcache's hit ratio {herd:.3} < LRU's {lru:.3}"
    );
}

#[test]
fn p05_zipf_single_thread() {
    zipf_case(1000, 1, None);
}

#[test]
fn p06_zipf_two_threads() {
    zipf_case(1000, 2, None);
}

#[test]
fn p07_zipf_two_threads_sharded() {
    zipf_case(5000, 2, Some(8));
}

/// A loop after a Zipf phase (recency-friendly first, then a scan-like loop): the policy has to
/// adapt again.
#[test]
fn p08_zipf_then_loop_adapts() {
    let _w = watchdog(LIMIT, "zipf then loop");
    let cap = 1000u64;
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(cap).build();
    let z = zipf_trace(50_000, 0.9, 200_000, 5);
    let _ = herd_hit_ratio(&cache, &z, 0, 1);
    let l: Vec<u64> = loop_trace(cap * 3 / 2, 40)
        .into_iter()
        .map(|k| k + (1 << 60))
        .collect();
    let warm = (cap * 3 / 2 * 20) as usize;
    let herd = herd_hit_ratio(&cache, &l, warm, 1);
    eprintln!("zipf then loop: {herd:.3}");
    assert!(
        herd >= 0.25,
        "after a zipf phase, the loop hit ratio is {herd:.3}"
    );
}

// =============================================================================================
// 5. Health and the shard locks
// =============================================================================================

/// `health_over` "takes no shard lock, only a lock of its own that nothing but `health`
/// takes". With `record_stats` it called `stats()`, which takes every shard's read lock (the
/// `loads_in_flight` gauge, the removal tallies): a `retain` whose predicate is slow (allowed:
/// it only must not call into the cache) holds a shard's write lock, and `health()` from a
/// monitoring thread waited for it (found in s22; fixed: health reads the striped counters).
#[test]
fn h01_health_takes_no_shard_lock() {
    let _w = watchdog(LIMIT, "health vs retain");
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).record_stats().build();
    cache.insert(1, 1);
    let in_retain = Arc::new(AtomicBool::new(false));
    let health_done = Arc::new(AtomicBool::new(false));
    let (c, ir, hd) = (
        cache.clone(),
        Arc::clone(&in_retain),
        Arc::clone(&health_done),
    );
    // The predicate holds the shard's write lock until `health()` has returned (or gives up
    // after a while, so that a blocked `health()` fails the test instead of hanging it): not a
    // timing threshold, an order — did `health()` return while the lock was held?
    let retainer = std::thread::spawn(move || {
        let mut saw_health = false;
        c.retain(|_, _| {
            ir.store(true, Ordering::SeqCst);
            let give_up = std::time::Instant::now() + Duration::from_secs(20);
            while !hd.load(Ordering::SeqCst) && std::time::Instant::now() < give_up {
                std::thread::yield_now();
            }
            saw_health = hd.load(Ordering::SeqCst);
            true
        });
        saw_health
    });
    while !in_retain.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let _ = cache.health();
    health_done.store(true, Ordering::SeqCst);
    assert!(
        retainer.join().unwrap(),
        "health() waited for a shard lock held by retain (documented: no shard lock)"
    );
}

// =============================================================================================
// 6. A load publishing under a per-load bound (the Redis tier's remaining TTL) in an untimed
//    cache
// =============================================================================================

#[cfg(feature = "redis")]
mod redis_bound {
    use super::*;
    use herdcache::codec::Plain;
    use herdcache::redis::RedisTier;
    use herdcache_testkit::redis_server::RedisServer;

    /// `RedisTier::ttl`: "Required when the cache has none (e.g. with a custom
    /// `expire_after`). Local copies read from Redis expire with the Redis copy." A local cache
    /// with no expiry of its own (an untimed shard) kept the copy it read from Redis forever
    /// (found in s22, older than that session's changes; fixed: the tier makes the local
    /// shards keep a deadline per entry).
    fn copy_from_redis_expires_with_it(
        local: impl Fn(ManualClock) -> herdcache::CacheBuilder<u64, u64, herdcache::DefaultHashBuilder>,
        ns: &str,
    ) {
        let _w = watchdog(LIMIT, "redis bound");
        let server = RedisServer::start();
        let tier = || {
            RedisTier::new(server.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(500), Duration::from_millis(500))
                .ttl(Duration::from_secs(10))
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let mk = |clock: ManualClock| {
            let c = Arc::clone(&calls);
            tier()
                .build(
                    local(clock).loader(move |k: &u64| {
                        c.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, BoxError>(*k * 10)
                    }),
                    Plain,
                )
                .unwrap()
        };
        let (ca, cb) = (ManualClock::new(), ManualClock::new());
        let a = mk(ca);
        let b = mk(cb.clone());
        assert_eq!(a.load(1).unwrap(), 10);
        assert_eq!(b.load(1).unwrap(), 10);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "b read it from Redis");
        cb.advance(Duration::from_millis(9_000));
        assert!(b.contains_key(&1), "within Redis's lifetime");
        cb.advance(Duration::from_millis(1_001));
        assert!(
            !b.contains_key(&1),
            "{ns}: the copy read from Redis outlived the one in Redis (10 s)"
        );
    }

    #[test]
    fn r01_untimed_local_cache_bounds_a_copy_read_from_redis() {
        copy_from_redis_expires_with_it(
            |clock| Cache::builder().max_capacity(100).clock(clock),
            "s22b-untimed",
        );
    }

    #[test]
    fn r02_jitter_only_local_cache_bounds_a_copy_read_from_redis() {
        copy_from_redis_expires_with_it(
            |clock| Cache::builder().max_capacity(100).jitter(0.1).clock(clock),
            "s22b-jitter",
        );
    }

    #[test]
    fn r03_negative_ttl_only_local_cache_bounds_a_copy_read_from_redis() {
        copy_from_redis_expires_with_it(
            |clock| {
                Cache::builder()
                    .max_capacity(100)
                    .negative_ttl(Duration::from_secs(5))
                    .clock(clock)
            },
            "s22b-negative",
        );
    }

    #[test]
    fn r04_timed_local_cache_bounds_a_copy_read_from_redis() {
        copy_from_redis_expires_with_it(
            |clock| {
                Cache::builder()
                    .max_capacity(100)
                    .time_to_idle(Duration::from_secs(3600))
                    .clock(clock)
            },
            "s22b-tti",
        );
    }
}
