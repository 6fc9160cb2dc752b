//! Round 35 adversarial tests (public API only): linearizability histories — "a decision acted
//! on later". Several threads run random operations on a few keys; each operation logs its
//! start and end on one global sequence counter (and the `ManualClock` before and after), the
//! versions it wrote and what it read. Every value is a version, unique, from one counter; its
//! *birth* (the sequence number when it was made) and origin (insert, load, compute) are kept.
//! Errors of `try_get_with` are versions too (so a cached error — `negative_ttl` — is checked
//! like a value).
//!
//! # The rule (per key)
//!
//! *Definite* writes take effect by the time they return: `insert`, `invalidate`, `remove`,
//! `invalidate_all` (it detaches every load in flight: "Removes every entry, at one instant",
//! and "A write or invalidation of the key while it loads wins"), and — only against values an
//! `insert` wrote — `invalidate_entries_if`/`retain` by key (which, per its docs, leaves a
//! first-time load of an absent key untouched). Loads, refreshes and computes store only if
//! nothing wrote the key since they began. A read `R` (a `get`, a `remove`'s value, a loader
//! call's result its own loader did not make, the entry a compute closure saw, a `get_all`
//! value, a `get_with_if` value) that returned
//!
//! * version `x` of another key, or born after `R` ended: a violation;
//! * `x` written by an insert `W'`: a violation if a definite write `W` started after `W'`
//!   ended and ended before `R` started;
//! * `x` made by a load or compute (born at `b`): a violation if a definite write (other than
//!   a retain) started after `b` and ended before `R` started ("a caller that starts after the
//!   write returned does not join that load", and the load must not store);
//! * nothing, when nothing but explicit removals removes entries (no eviction, no expiry): a
//!   violation if an insert started after the end of every removal that started before `R`
//!   ended, and ended before `R` started;
//! * with a time to live and no fail-safe, a plain `get` of a version stored at clock `t` at
//!   the latest, read when the clock already stood at `t + ttl` or later: a violation ("expired
//!   exactly at its deadline", `ManualClock` docs).
//!
//! Also, without eviction or expiry, a load or computation whose own value came back to its
//! caller and that no plain write overlapped is a definite write too; `get_with_if` never
//! returns an inserted value that every caller's `replace_if` rejects; `or_insert_with`'s
//! `is_fresh`, `and_compute_with`'s `CompResult` and `and_upsert_with`'s flags agree with what
//! the closure saw and did. The checker is shown able to fail: two planted bugs (a
//! check-then-act `get_with`, a load returned but never stored), a wrong model, and fabricated
//! histories.
//!
//! `HERDCACHE_S35_SEEDS` (default 6) sets the seeds per configuration, `HERDCACHE_S35_OPS`
//! (default 1500) the operations per thread, `HERDCACHE_S35_RACES` (default 4000) the rounds
//! of the plain-key refresh race.
//!
//! # Findings (tests not named `history_*`, `weighted_*` or `checker_*`)
//!
//! A refresh is decided by a read (the compare-and-swap on the entry's refresh deadline, under
//! the shard's read lock) and registered as a flight later (`claim_refresh`, which first clones
//! the key with no lock held, then registers under the write lock whatever the key holds by
//! then). An `invalidate`, `insert`, computation, `invalidate_entries_if` or `invalidate_all`
//! of the key that runs in between does not supersede that refresh: it registers afterwards and stores its
//! value — resurrecting an invalidated key, or replacing a newer insert. Deterministic with a
//! key whose `Clone` is slow on the reading thread (`refresh_decided_before_*`, 9 tests: inline,
//! `spawner`, `future_spawner`); with plain `u32` keys it happens by itself
//! (`refresh_racing_an_invalidate_never_resurrects_the_key_plain_keys`: 23 of 4,000 rounds
//! here).
//!
//! Fixed with this file: a refresh registers only if the key's entry is still the one a read
//! claimed (its refresh deadline still marked as claimed, under the write lock); a write or
//! invalidation in between wins and no refresh runs.
#![cfg(not(any(loom, shuttle)))]

mod common;

use common::{quiet_injected_panics, rng, watchdog};
use herdcache::{BoxError, Cache, CompResult, ManualClock, Op, RemovalCause};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const THREADS: usize = 4;
const ALL: u32 = u32::MAX;

fn seeds() -> u64 {
    std::env::var("HERDCACHE_S35_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
}

fn ops_per_thread() -> usize {
    std::env::var("HERDCACHE_S35_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Insert,
    Load,
    Compute,
    Error,
}

#[derive(Clone, Copy, Debug)]
struct Birth {
    key: u32,
    born: u64,
    origin: Origin,
}

thread_local! {
    /// Versions this thread's loaders made during the current operation.
    static OWN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// In a spawned refresh job: the sequence number when the job was handed to the spawner
    /// (the refresh was claimed before it), used as the birth of the version it loads.
    static CLAIMED_BY: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The shared state of one run: sequence counter, version counter, births, clock.
struct Ctx {
    seq: AtomicU64,
    ver: AtomicU64,
    births: Mutex<HashMap<u64, Birth>>,
    clock: ManualClock,
    /// The builder's loader fails while set (fail-safe runs).
    down: AtomicBool,
}

impl Ctx {
    fn new() -> Arc<Ctx> {
        Arc::new(Ctx {
            seq: AtomicU64::new(1),
            ver: AtomicU64::new(1),
            births: Mutex::new(HashMap::new()),
            clock: ManualClock::new(),
            down: AtomicBool::new(false),
        })
    }
    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, SeqCst)
    }
    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }
    /// A fresh version of `key`, recorded as made by this thread's current operation.
    fn fresh(&self, key: u32, origin: Origin) -> u64 {
        let v = self.ver.fetch_add(1, SeqCst);
        let born = match CLAIMED_BY.with(|c| c.get()) {
            0 => self.tick(),
            claimed => claimed,
        };
        self.births
            .lock()
            .unwrap()
            .insert(v, Birth { key, born, origin });
        if origin != Origin::Insert {
            OWN.with(|o| o.borrow_mut().push(v));
        }
        v
    }
}

/// Widens race windows inside loaders and closures.
fn dawdle(d: u64) {
    match d % 4 {
        0 => {}
        1 => std::thread::yield_now(),
        2 => {
            for _ in 0..(d % 50) {
                std::thread::yield_now();
            }
        }
        _ => std::thread::sleep(Duration::from_micros(d % 300)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum W {
    None,
    Insert(u64),
    Remove,
    RemoveAll,
    RetainKey,
    ComputeRemove,
}

#[derive(Clone, Debug)]
struct Rec {
    thread: usize,
    op: &'static str,
    key: u32,
    s: u64,
    e: u64,
    cs: u64,
    ce: u64,
    write: W,
    /// Checked reads: (key, what was read). `ttl` marks a plain read the expiry rule applies to.
    reads: Vec<(u32, Option<u64>, bool)>,
    own: Vec<u64>,
    /// Results that contradict the call's own documentation, found while it ran.
    bad: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    keys: u32,
    capacity: u64,
    ttl: Option<Duration>,
    refresh: bool,
    negative: bool,
    fail_safe: bool,
    /// Planted bug: a "get_with" done as get, then load, then plain insert (check-then-act).
    racy: bool,
    /// Planted bug: a "get_with" whose loaded value is returned but never stored.
    lossy: bool,
    /// A weigher (each version weighs 1..=5).
    weigher: bool,
    /// `shards(n)` if not 0.
    shards: usize,
    time_to_idle: Option<Duration>,
    /// `max_concurrent_loads` if not 0.
    limit: usize,
    /// `get_with`'s loader of key `k` sometimes loads key `k + 1` (acyclic nesting).
    nest: bool,
    /// A per-entry [`Expiry`]: each version lives `life(v)` from the write that stored it.
    expiry: bool,
    jitter: f64,
}

/// The lifetime the per-version [`Expiry`] gives version `v`.
fn life(v: u64) -> Duration {
    Duration::from_millis((v % 4 + 1) * 6)
}

struct PerVersion;

impl herdcache::Expiry<u32, u64> for PerVersion {
    fn expire_after_create(&self, _k: &u32, v: &u64) -> Option<Duration> {
        Some(life(*v))
    }
    fn expire_after_update(
        &self,
        _k: &u32,
        v: &u64,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(life(*v))
    }
}

impl Config {
    fn plain(name: &'static str) -> Self {
        Config {
            name,
            keys: 3,
            capacity: 1_000,
            ttl: None,
            refresh: false,
            negative: false,
            fail_safe: false,
            racy: false,
            lossy: false,
            weigher: false,
            shards: 0,
            time_to_idle: None,
            limit: 0,
            nest: false,
            expiry: false,
            jitter: 0.0,
        }
    }
    /// Whether anything but explicit removals can remove entries (then `None` is always legal).
    fn bounded(&self) -> bool {
        u64::from(self.keys) * if self.weigher { 5 } else { 1 } > self.capacity
            || self.ttl.is_some()
            || self.time_to_idle.is_some()
            || self.expiry
    }
}

fn build(cfg: &Config, ctx: &Arc<Ctx>) -> Cache<u32, u64> {
    let mut b = Cache::builder()
        .max_capacity(cfg.capacity)
        .clock(ctx.clock.clone());
    if let Some(ttl) = cfg.ttl {
        b = b.time_to_live(ttl);
    }
    if let Some(tti) = cfg.time_to_idle {
        b = b.time_to_idle(tti);
    }
    if cfg.weigher {
        b = b.weigher(|_k: &u32, v: &u64| weight_of(*v));
    }
    if cfg.shards > 0 {
        b = b.shards(cfg.shards);
    }
    if cfg.limit > 0 {
        b = b.max_concurrent_loads(cfg.limit);
    }
    if cfg.expiry {
        b = b.expire_after(PerVersion);
    }
    if cfg.jitter > 0.0 {
        b = b.jitter(cfg.jitter);
    }
    let c = Arc::clone(ctx);
    b = b.loader(move |k: &u32| {
        let v = c.fresh(*k, Origin::Load);
        dawdle(v.wrapping_mul(0x9E37_79B9));
        if c.down.load(SeqCst) {
            Err(BoxError::from("backend down"))
        } else {
            Ok::<_, BoxError>(v)
        }
    });
    if cfg.refresh {
        b = b
            .refresh_after(cfg.ttl.map_or(Duration::from_millis(20), |t| t / 3))
            .refresh_backoff(Duration::from_millis(3))
            .spawner({
                let c = Arc::clone(ctx);
                move |job| {
                    let claimed = c.tick();
                    let delay = claimed % 3;
                    std::thread::spawn(move || {
                        CLAIMED_BY.with(|b| b.set(claimed));
                        std::thread::sleep(Duration::from_micros(delay * 400));
                        job();
                    });
                }
            });
    }
    if cfg.negative {
        b = b.negative_ttl(Duration::from_millis(40));
    }
    if cfg.fail_safe {
        b = b.fail_safe(Duration::from_secs(3600));
    }
    b.build()
}

/// Runs one thread's random operations, returning its records.
fn worker(cfg: &Config, cache: &Cache<u32, u64>, ctx: &Arc<Ctx>, t: usize, seed: u64) -> Vec<Rec> {
    let mut r = rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ ((t as u64 + 1) * 0x1234_5677));
    let mut recs = Vec::new();
    let ops = ops_per_thread();
    for _ in 0..ops {
        let key = (r() % u64::from(cfg.keys)) as u32;
        let d = r();
        let pick = r() % 100;
        OWN.with(|o| o.borrow_mut().clear());
        let cs = ctx.now();
        let s = ctx.tick();
        // Padding inside the interval (legal: the operation takes effect somewhere in it)
        // makes operations overlap more often.
        if d % 7 == 0 {
            dawdle(d >> 5);
        }
        let mut write = W::None;
        let mut reads: Vec<(u32, Option<u64>, bool)> = Vec::new();
        let mut bad: Vec<String> = Vec::new();
        // Every `get_with_if` of a run judges alike: replace a value whose low bit is this.
        let bit = seed & 1;
        let op: &'static str = match pick {
            _ if t == 0
                && (cfg.ttl.is_some() || cfg.refresh || cfg.negative || cfg.expiry)
                && pick < 8 =>
            {
                ctx.clock.advance(Duration::from_millis(1 + d % 9));
                if cfg.fail_safe && d % 3 == 0 {
                    ctx.down.fetch_xor(true, SeqCst);
                }
                "advance"
            }
            0..=11 => {
                let v = ctx.fresh(key, Origin::Insert);
                cache.insert(key, v);
                write = W::Insert(v);
                "insert"
            }
            12..=16 => {
                cache.invalidate(&key);
                write = W::Remove;
                "invalidate"
            }
            17..=20 => {
                let got = cache.remove(&key);
                reads.push((key, got, true));
                write = W::Remove;
                "remove"
            }
            21..=33 => {
                reads.push((key, cache.get(&key), true));
                "get"
            }
            34..=43 => {
                if cfg.racy && d % 2 == 0 {
                    // The planted bug: check, then act outside any lock.
                    let got = match cache.get(&key) {
                        Some(v) => v,
                        None => {
                            let v = ctx.fresh(key, Origin::Load);
                            dawdle(d >> 3);
                            cache.insert(key, v);
                            v
                        }
                    };
                    reads.push((key, Some(got), false));
                    "racy_get_with"
                } else if cfg.lossy && d % 2 == 0 {
                    // The planted bug: a load that is returned but not stored.
                    let got = match cache.get(&key) {
                        Some(v) => v,
                        None => ctx.fresh(key, Origin::Load),
                    };
                    reads.push((key, Some(got), false));
                    "lossy_get_with"
                } else {
                    let nested: RefCell<Option<(u32, u64)>> = RefCell::new(None);
                    let got = cache.get_with(key, || {
                        if cfg.nest && key + 1 < cfg.keys && d % 3 == 0 {
                            let k2 = key + 1;
                            let n = cache.get_with(k2, || {
                                let v = ctx.fresh(k2, Origin::Load);
                                dawdle(d >> 5);
                                v
                            });
                            *nested.borrow_mut() = Some((k2, n));
                        }
                        let v = ctx.fresh(key, Origin::Load);
                        dawdle(d >> 3);
                        v
                    });
                    if let Some((k2, n)) = nested.into_inner() {
                        reads.push((k2, Some(n), false));
                    }
                    reads.push((key, Some(got), false));
                    "get_with"
                }
            }
            44..=50 => {
                let fail = d % 3 == 0;
                let got = cache.try_get_with(key, || {
                    dawdle(d >> 3);
                    if fail {
                        Err(ctx.fresh(key, Origin::Error))
                    } else {
                        Ok(ctx.fresh(key, Origin::Load))
                    }
                });
                match got {
                    Ok(v) => reads.push((key, Some(v), false)),
                    Err(e) => reads.push((key, Some(*e), false)),
                }
                "try_get_with"
            }
            51..=55 => {
                let none = d % 3 == 0;
                let got = cache.optionally_get_with(key, || {
                    dawdle(d >> 3);
                    (!none).then(|| ctx.fresh(key, Origin::Load))
                });
                if let Some(v) = got {
                    reads.push((key, Some(v), false));
                }
                "optionally_get_with"
            }
            56..=60 => {
                let e = cache.entry(key).or_insert_with(|| {
                    let v = ctx.fresh(key, Origin::Load);
                    dawdle(d >> 3);
                    v
                });
                let fresh = e.is_fresh();
                let v = e.into_value();
                if fresh != OWN.with(|o| o.borrow().contains(&v)) {
                    bad.push(format!("or_insert_with: is_fresh() {fresh} for {v}"));
                }
                reads.push((key, Some(v), false));
                "or_insert_with"
            }
            61..=68 => {
                let mut seen = None;
                let res = cache.entry(key).and_compute_with(|e| {
                    seen = e.map(|e| e.into_value());
                    dawdle(d >> 3);
                    match d % 5 {
                        0 => Op::Remove,
                        1 => Op::Nop,
                        _ => Op::Put(ctx.fresh(key, Origin::Compute)),
                    }
                });
                let agrees = match (&res, seen) {
                    (CompResult::Inserted(_), None) => d % 5 > 1,
                    (CompResult::ReplacedWith(_), Some(_)) => d % 5 > 1,
                    (CompResult::Removed(e), Some(x)) => d % 5 == 0 && *e.value() == x,
                    (CompResult::Unchanged(e), Some(x)) => d % 5 == 1 && *e.value() == x,
                    (CompResult::StillNone(_), None) => d % 5 < 2,
                    _ => false,
                };
                if !agrees {
                    bad.push(format!(
                        "and_compute_with: {res:?} after seeing {seen:?} (op {})",
                        d % 5
                    ));
                }
                reads.push((key, seen, true));
                if matches!(res, CompResult::Removed(_)) || (d % 5 == 0) {
                    write = W::ComputeRemove;
                }
                "and_compute_with"
            }
            69..=73 => {
                let mut seen = None;
                let e = cache.entry(key).and_upsert_with(|e| {
                    seen = e.map(|e| e.into_value());
                    dawdle(d >> 3);
                    ctx.fresh(key, Origin::Compute)
                });
                if e.is_old_value_replaced() != seen.is_some() || !e.is_fresh() {
                    bad.push(format!(
                        "and_upsert_with: replaced {} fresh {} after seeing {seen:?}",
                        e.is_old_value_replaced(),
                        e.is_fresh()
                    ));
                }
                reads.push((key, seen, true));
                "and_upsert_with"
            }
            74..=80 => {
                let got = cache.get_with_if(
                    key,
                    || {
                        let v = ctx.fresh(key, Origin::Load);
                        dawdle(d >> 3);
                        v
                    },
                    |v| v & 1 == bit,
                );
                reads.push((key, Some(got), false));
                "get_with_if"
            }
            81..=84 => {
                cache.invalidate_entries_if(|k, _| *k == key).unwrap();
                write = W::RetainKey;
                "invalidate_entries_if"
            }
            85 => {
                cache.invalidate_all();
                write = W::RemoveAll;
                "invalidate_all"
            }
            86..=91 => {
                let k2 = (key + 1) % cfg.keys;
                let got = cache.get_all([key, k2], |missing| {
                    dawdle(d >> 3);
                    missing
                        .iter()
                        .map(|&m| (m, ctx.fresh(m, Origin::Load)))
                        .collect()
                });
                for (k, v) in got {
                    reads.push((k, Some(v), false));
                }
                "get_all"
            }
            92 | 93 => {
                if let Ok(v) = cache.load(key) {
                    reads.push((key, Some(v), false));
                }
                "load"
            }
            94 => {
                let got = futures::executor::block_on(cache.get_with_async(key, async {
                    let v = ctx.fresh(key, Origin::Load);
                    dawdle(d >> 3);
                    v
                }));
                reads.push((key, Some(got), false));
                "get_with_async"
            }
            95 => {
                let c = Arc::clone(ctx);
                let got =
                    futures::executor::block_on(cache.get_with_async_shared(key, async move {
                        let v = c.fresh(key, Origin::Load);
                        dawdle(d >> 3);
                        v
                    }));
                reads.push((key, Some(got), false));
                "get_with_async_shared"
            }
            96 => {
                let mut seen = None;
                let _ = futures::executor::block_on(cache.entry(key).and_upsert_with_async(|e| {
                    seen = e.map(|e| e.into_value());
                    async move {
                        dawdle(d >> 3);
                        ctx.fresh(key, Origin::Compute)
                    }
                }));
                reads.push((key, seen, true));
                "and_upsert_with_async"
            }
            97 => {
                let got = futures::executor::block_on(cache.get_with_if_async(
                    key,
                    async {
                        let v = ctx.fresh(key, Origin::Load);
                        dawdle(d >> 3);
                        v
                    },
                    move |v| v & 1 == bit,
                ));
                reads.push((key, Some(got), false));
                "get_with_if_async"
            }
            98 => {
                if let Some(v) = cache.get_or_stale(&key) {
                    reads.push((key, Some(v), false));
                }
                "get_or_stale"
            }
            _ => {
                let got = cache.get_with_by_ref(&key, || {
                    let v = ctx.fresh(key, Origin::Load);
                    dawdle(d >> 3);
                    v
                });
                reads.push((key, Some(got), false));
                "get_with_by_ref"
            }
        };
        if d % 11 == 0 {
            dawdle(d >> 7);
        }
        let e = ctx.tick();
        let ce = ctx.now();
        let own = OWN.with(|o| std::mem::take(&mut *o.borrow_mut()));
        let key = if write == W::RemoveAll { ALL } else { key };
        if op.starts_with("get_with_if") && !cfg.fail_safe {
            // Nobody keeps a value whose low bit is `bit`: a value this call did not load must
            // come from a load or computation it waited for, never a present value kept.
            for &(_, x, _) in &reads {
                if let Some(x) = x {
                    let b = ctx.births.lock().unwrap().get(&x).copied();
                    if x & 1 == bit
                        && !own.contains(&x)
                        && b.is_some_and(|b| b.origin == Origin::Insert)
                    {
                        bad.push(format!(
                            "{op}: returned {x} (inserted), which every caller's replace_if rejects"
                        ));
                    }
                }
            }
        }
        recs.push(Rec {
            thread: t,
            op,
            key,
            s,
            e,
            cs,
            ce,
            write,
            reads,
            own,
            bad,
        });
    }
    recs
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Model {
    /// The documented semantics (see the module docs).
    Real,
    /// A deliberately wrong model: a read may return an insert's version only if no other
    /// insert of the key ended between that insert's end and the read's start (it forgets that
    /// overlapping writes may linearize either way). Used to show the checker can fail.
    LatestOnly,
}

/// Checks a history; returns the violations, each with the operations that show it.
fn check(cfg: &Config, ctx: &Ctx, recs: &[Rec], model: Model) -> Vec<String> {
    let births = ctx.births.lock().unwrap().clone();
    let mut definite: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut retains: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut inserts: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut removals: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut insert_of: HashMap<u64, usize> = HashMap::new();
    // The clock by which a version was stored at the latest, where known.
    let mut stored_by: HashMap<u64, u64> = HashMap::new();
    for (i, r) in recs.iter().enumerate() {
        let keys: Vec<u32> = if r.key == ALL {
            (0..cfg.keys).collect()
        } else {
            vec![r.key]
        };
        for k in keys {
            match r.write {
                W::Insert(v) => {
                    definite.entry(k).or_default().push(i);
                    inserts.entry(k).or_default().push(i);
                    insert_of.insert(v, i);
                    stored_by.insert(v, r.ce);
                }
                W::Remove | W::RemoveAll => {
                    definite.entry(k).or_default().push(i);
                    removals.entry(k).or_default().push((r.s, r.e));
                }
                W::RetainKey => {
                    retains.entry(k).or_default().push(i);
                    removals.entry(k).or_default().push((r.s, r.e));
                }
                W::ComputeRemove => removals.entry(k).or_default().push((r.s, r.e)),
                W::None => {}
            }
        }
        for &v in &r.own {
            stored_by.entry(v).or_insert(r.ce);
        }
    }
    // Without eviction or expiry, a load or computation whose value this call made (and got
    // back) is stored unless a plain write of the key overlapped it ("The value is in the cache
    // before any waiter is released"; "a write ... during the load wins"): then it is a
    // definite write too.
    if !cfg.bounded() {
        for (i, r) in recs.iter().enumerate() {
            for &v in &r.own {
                let Some(b) = births.get(&v) else { continue };
                if b.origin == Origin::Error || b.origin == Origin::Insert {
                    continue;
                }
                let returned = r.reads.iter().any(|&(k, x, _)| k == b.key && x == Some(v))
                    || (r.op == "and_compute_with" || r.op.starts_with("and_upsert"))
                        && r.write == W::None;
                if !returned {
                    continue;
                }
                let overlapped = recs.iter().any(|w| {
                    (w.key == b.key || w.key == ALL)
                        && matches!(
                            w.write,
                            W::Insert(_) | W::Remove | W::RemoveAll | W::RetainKey
                        )
                        && w.s < r.e
                        && w.e > r.s
                });
                if !overlapped {
                    definite.entry(b.key).or_default().push(i);
                    inserts.entry(b.key).or_default().push(i);
                }
            }
        }
    }
    let show = |i: usize| {
        let r = &recs[i];
        format!(
            "#{i} t{} {}(key {}) [{}, {}] clock [{}, {}] write {:?} reads {:?} own {:?}",
            r.thread,
            r.op,
            if r.key == ALL {
                "*".to_string()
            } else {
                r.key.to_string()
            },
            r.s,
            r.e,
            r.cs,
            r.ce,
            r.write,
            r.reads,
            r.own
        )
    };
    let between = |list: Option<&Vec<usize>>, after: u64, before: u64| -> Option<usize> {
        list?
            .iter()
            .copied()
            .find(|&w| recs[w].s > after && recs[w].e < before)
    };
    // As `between`, skipping the write that made `x` (an effective write of `x` itself).
    let overwriting = |list: Option<&Vec<usize>>, x: u64, after: u64, before: u64| {
        list?
            .iter()
            .copied()
            .find(|&w| recs[w].s > after && recs[w].e < before && !recs[w].own.contains(&x))
    };
    let mut out = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        for b in &r.bad {
            out.push(format!("[{}] {} — {b}", cfg.name, show(i)));
        }
        for &(k, read, plain) in &r.reads {
            let problem: Option<String> = match read {
                Some(x) if r.own.contains(&x) => None,
                Some(x) => match births.get(&x) {
                    None => Some(format!("read {x}, a version nobody made")),
                    Some(b) if b.key != k => Some(format!("read {x}, made for key {}", b.key)),
                    Some(b) if b.born > r.e => Some(format!("read {x}, born after the read ended")),
                    Some(b) => {
                        let w = match (b.origin, model) {
                            (Origin::Insert, Model::Real) => {
                                let since = recs[insert_of[&x]].e;
                                between(definite.get(&k), since, r.s)
                                    .or_else(|| between(retains.get(&k), since, r.s))
                            }
                            (Origin::Insert, Model::LatestOnly) => {
                                let since = recs[insert_of[&x]].e;
                                inserts.get(&k).and_then(|l| {
                                    l.iter().copied().find(|&w| {
                                        w != insert_of[&x] && recs[w].e > since && recs[w].e < r.s
                                    })
                                })
                            }
                            _ => overwriting(definite.get(&k), x, b.born, r.s),
                        };
                        let stale = w.map(|w| {
                            format!(
                                "read {x} ({:?}, born {}), overwritten by {} that ended before the read began",
                                b.origin,
                                b.born,
                                show(w)
                            )
                        });
                        // Plain reads never see an expired value; without fail-safe, no read
                        // does (loads replace it; a failed refresh keeps the old value "never
                        // beyond its time_to_live"). `get_or_stale` is exempt.
                        let applies = (plain || !cfg.fail_safe) && r.op != "get_or_stale";
                        // Its longest life: the time to live, the per-version expiry (each
                        // stretched by the jitter, "up to 1 + fraction times").
                        let stretch =
                            |d: Duration| (d.as_nanos() as f64 * (1.0 + cfg.jitter)) as u64;
                        let longest =
                            match (cfg.ttl.map(stretch), cfg.expiry.then(|| stretch(life(x)))) {
                                (Some(a), Some(b)) => Some(a.min(b)),
                                (a, b) => a.or(b),
                            };
                        let expired = match (longest, applies, stored_by.get(&x)) {
                            (Some(longest), true, Some(&at))
                                if model == Model::Real && r.cs >= at + longest =>
                            {
                                Some(format!(
                                    "read {x}, stored by clock {at}, at clock {} >= {at} + its life {longest}",
                                    r.cs
                                ))
                            }
                            _ => None,
                        };
                        stale.or(expired).map(|p| match insert_of.get(&x) {
                            Some(&wi) => format!("{p}; written by {}", show(wi)),
                            None => p,
                        })
                    }
                },
                None if cfg.bounded() => None,
                None => {
                    let latest = removals
                        .get(&k)
                        .into_iter()
                        .flatten()
                        .filter(|p| p.0 < r.e)
                        .map(|p| p.1)
                        .max()
                        .unwrap_or(0);
                    between(inserts.get(&k), latest, r.s).map(|w| {
                        format!(
                            "read nothing, after {} (which ended after every removal)",
                            show(w)
                        )
                    })
                }
            };
            if let Some(p) = problem {
                out.push(format!("[{}] key {k}: {} — {p}", cfg.name, show(i)));
            }
        }
    }
    out
}

/// Runs one seeded history and the final read of every key; returns the records.
fn run(cfg: &Config, seed: u64) -> (Arc<Ctx>, Vec<Rec>) {
    let ctx = Ctx::new();
    let cache = build(cfg, &ctx);
    let mut recs: Vec<Rec> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, ctx) = (&cache, &ctx);
                s.spawn(move || worker(cfg, cache, ctx, t, seed))
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect()
    });
    // Spawned refreshes may still run: wait for them, then read every key once more.
    assert!(
        common::eventually(|| cache.loads_in_flight() == 0),
        "loads still in flight long after the run"
    );
    std::thread::sleep(Duration::from_millis(2));
    for k in 0..cfg.keys {
        let cs = ctx.now();
        let s = ctx.tick();
        let got = cache.get(&k);
        let e = ctx.tick();
        recs.push(Rec {
            thread: 99,
            op: "final get",
            key: k,
            s,
            e,
            cs,
            ce: ctx.now(),
            write: W::None,
            reads: vec![(k, got, true)],
            own: vec![],
            bad: vec![],
        });
    }
    cache.validate();
    (ctx, recs)
}

fn sweep(cfg: Config) {
    quiet_injected_panics();
    let _dog = watchdog(Duration::from_secs(300), "history sweep");
    let mut failures = Vec::new();
    let mut reads = 0;
    for seed in 1..=seeds() {
        let (ctx, recs) = run(&cfg, seed);
        reads += recs.iter().map(|r| r.reads.len()).sum::<usize>();
        let v = check(&cfg, &ctx, &recs, Model::Real);
        if !v.is_empty() {
            failures.push(format!(
                "seed {seed}: {} violations; first: {}",
                v.len(),
                v[0]
            ));
        }
    }
    eprintln!(
        "[{}] {} seeds, {reads} reads checked, {} failing seeds",
        cfg.name,
        seeds(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn history_all_verbs_no_eviction_reads_are_linearizable() {
    sweep(Config::plain("all verbs"));
}

#[test]
fn history_all_verbs_one_key_reads_are_linearizable() {
    sweep(Config {
        keys: 1,
        ..Config::plain("one key")
    });
}

#[test]
fn history_with_evictions_reads_are_linearizable() {
    sweep(Config {
        keys: 4,
        capacity: 2,
        ..Config::plain("evicting")
    });
}

#[test]
fn history_with_ttl_and_manual_clock_reads_never_stale_nor_expired() {
    sweep(Config {
        ttl: Some(Duration::from_millis(30)),
        ..Config::plain("ttl")
    });
}

#[test]
fn history_with_refresh_on_spawner_reads_are_linearizable() {
    sweep(Config {
        ttl: Some(Duration::from_millis(30)),
        refresh: true,
        ..Config::plain("refresh")
    });
}

#[test]
fn history_with_negative_ttl_cached_errors_never_outlive_a_write() {
    sweep(Config {
        negative: true,
        ..Config::plain("negative_ttl")
    });
}

#[test]
fn history_with_fail_safe_stale_answers_never_outlive_a_write() {
    sweep(Config {
        ttl: Some(Duration::from_millis(20)),
        fail_safe: true,
        ..Config::plain("fail_safe")
    });
}

/// The planted bug: a check-then-act `get_with` (get, load, then plain insert) must be caught
/// within a few seeds, or the checker is worthless.
#[test]
fn checker_catches_a_planted_check_then_act_get_with() {
    let _dog = watchdog(Duration::from_secs(300), "planted bug");
    let cfg = Config {
        keys: 1,
        racy: true,
        ..Config::plain("planted")
    };
    let mut caught = None;
    for seed in 1..=40 {
        let (ctx, recs) = run(&cfg, seed);
        let v = check(&cfg, &ctx, &recs, Model::Real);
        if let Some(first) = v.first() {
            caught = Some((seed, v.len(), first.clone()));
            break;
        }
    }
    let (seed, n, first) = caught.expect("the checker never caught the planted check-then-act");
    eprintln!("planted bug caught at seed {seed}: {n} violations; first: {first}");
}

/// The wrong model: forbidding a version once a later-ending insert exists must flag real
/// histories (overlapping inserts linearize either way), while the documented model passes them.
#[test]
fn checker_with_a_wrong_latest_only_model_fails_on_real_histories() {
    let _dog = watchdog(Duration::from_secs(300), "wrong model");
    let cfg = Config::plain("wrong model");
    let mut flagged = 0;
    for seed in 1..=10 {
        let (ctx, recs) = run(&cfg, seed);
        assert!(check(&cfg, &ctx, &recs, Model::Real).is_empty());
        flagged += check(&cfg, &ctx, &recs, Model::LatestOnly).len();
        if flagged > 0 {
            break;
        }
    }
    assert!(
        flagged > 0,
        "the wrong model flagged nothing: the checker cannot fail"
    );
}

/// A fabricated history: a read that returns a version overwritten by an insert that ended
/// before the read began, and a read of nothing after an insert, must both be flagged.
#[test]
fn checker_flags_a_fabricated_stale_read_and_a_lost_insert() {
    let ctx = Ctx::new();
    let v1 = ctx.fresh(0, Origin::Insert);
    let v2 = ctx.fresh(0, Origin::Insert);
    let rec = |op, s, e, write, reads| Rec {
        thread: 0,
        op,
        key: 0,
        s,
        e,
        cs: 0,
        ce: 0,
        write,
        reads,
        own: vec![],
        bad: vec![],
    };
    let cfg = Config::plain("fabricated");
    let good = vec![
        rec("insert", 10, 11, W::Insert(v1), vec![]),
        rec("insert", 12, 13, W::Insert(v2), vec![]),
        rec("get", 14, 15, W::None, vec![(0, Some(v2), true)]),
    ];
    assert!(check(&cfg, &ctx, &good, Model::Real).is_empty());
    let stale = vec![
        rec("insert", 10, 11, W::Insert(v1), vec![]),
        rec("insert", 12, 13, W::Insert(v2), vec![]),
        rec("get", 14, 15, W::None, vec![(0, Some(v1), true)]),
    ];
    assert_eq!(check(&cfg, &ctx, &stale, Model::Real).len(), 1);
    let lost = vec![
        rec("insert", 10, 11, W::Insert(v1), vec![]),
        rec("get", 14, 15, W::None, vec![(0, None, true)]),
    ];
    assert_eq!(check(&cfg, &ctx, &lost, Model::Real).len(), 1);
    // Overlapping inserts may linearize either way.
    let overlap = vec![
        rec("insert", 10, 13, W::Insert(v1), vec![]),
        rec("insert", 11, 12, W::Insert(v2), vec![]),
        rec("get", 14, 15, W::None, vec![(0, Some(v2), true)]),
    ];
    assert!(check(&cfg, &ctx, &overlap, Model::Real).is_empty());
    assert_eq!(check(&cfg, &ctx, &overlap, Model::LatestOnly).len(), 1);
}

/// The weight of a version (1..=5).
fn weight_of(v: u64) -> u32 {
    (v % 5 + 1) as u32
}

/// Weighted histories: after each operation of a thread the weighted size is within the bound
/// plus what the operations in progress may add; once every thread has joined it is within
/// the bound; after `run_pending_tasks` the weights of `iter()` add up to `weighted_size()`;
/// the listener reports every version at most once, never one still present, and every
/// inserted version is either present or reported.
fn weighted_run(seed: u64, ttl: bool) -> Vec<String> {
    const CAP: u64 = 12;
    const KEYS: u32 = 8;
    let ctx = Ctx::new();
    let removed: Arc<Mutex<Vec<(u32, u64, RemovalCause)>>> = Arc::default();
    let l = Arc::clone(&removed);
    let mut b = Cache::builder()
        .max_capacity(CAP)
        .weigher(|_k: &u32, v: &u64| weight_of(*v))
        .eviction_listener(move |k: &u32, v: &u64, cause| l.lock().unwrap().push((*k, *v, cause)))
        .clock(ctx.clock.clone());
    if ttl {
        b = b.time_to_live(Duration::from_millis(25));
    }
    let cache: Cache<u32, u64> = b.build();
    let problems: Mutex<Vec<String>> = Mutex::default();
    let inserted: Mutex<Vec<u64>> = Mutex::default();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (cache, ctx, problems, inserted) = (&cache, &ctx, &problems, &inserted);
            s.spawn(move || {
                let mut r = rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t as u64 + 7));
                for _ in 0..ops_per_thread() {
                    let key = (r() % u64::from(KEYS)) as u32;
                    let d = r();
                    match r() % 20 {
                        0..=6 => {
                            let v = ctx.fresh(key, Origin::Insert);
                            cache.insert(key, v);
                            inserted.lock().unwrap().push(v);
                        }
                        7 => cache.invalidate(&key),
                        8 => {
                            let _ = cache.remove(&key);
                        }
                        9..=11 => {
                            let _ = cache.get_with(key, || {
                                let v = ctx.fresh(key, Origin::Load);
                                dawdle(d >> 3);
                                v
                            });
                        }
                        12 | 13 => {
                            let _ = cache.entry(key).and_upsert_with(|_| {
                                dawdle(d >> 3);
                                ctx.fresh(key, Origin::Compute)
                            });
                        }
                        14 => {
                            let _ = cache.get_with_if(
                                key,
                                || ctx.fresh(key, Origin::Load),
                                |v| v % 2 == d % 2,
                            );
                        }
                        15 => {
                            let _ = cache.get_all([key, (key + 3) % KEYS], |m| {
                                m.iter().map(|&k| (k, ctx.fresh(k, Origin::Load))).collect()
                            });
                        }
                        16 => cache.invalidate_entries_if(move |_, v| v % 3 == d % 3).unwrap(),
                        17 if d % 8 == 0 => cache.invalidate_all(),
                        17 if ttl && t == 0 => ctx.clock.advance(Duration::from_millis(d % 7)),
                        _ => {
                            let _ = cache.get(&key);
                        }
                    }
                    // Each thread has at most one write in progress, of weight at most 5.
                    let w = cache.weighted_size();
                    if w > CAP + 5 * THREADS as u64 {
                        problems.lock().unwrap().push(format!(
                            "weighted_size {w} above {CAP} + what {THREADS} writes in progress may add"
                        ));
                    }
                }
            });
        }
    });
    let mut out = problems.into_inner().unwrap();
    let w = cache.weighted_size();
    if w > CAP {
        out.push(format!(
            "weighted_size {w} > max_capacity {CAP} once every insert returned"
        ));
    }
    cache.run_pending_tasks();
    let present: Vec<(u32, u64)> = cache.iter().collect();
    let sum: u64 = present.iter().map(|&(_, v)| u64::from(weight_of(v))).sum();
    if sum != cache.weighted_size() {
        out.push(format!(
            "iter() weights add up to {sum}, weighted_size() is {} ({present:?})",
            cache.weighted_size()
        ));
    }
    if present.len() as u64 != cache.entry_count() {
        out.push(format!(
            "iter() yields {} entries, entry_count() is {}",
            present.len(),
            cache.entry_count()
        ));
    }
    let removed = removed.lock().unwrap().clone();
    let births = ctx.births.lock().unwrap().clone();
    let mut seen = HashSet::new();
    for &(k, v, cause) in &removed {
        if !seen.insert(v) {
            out.push(format!(
                "version {v} of key {k} reported twice (last {cause:?})"
            ));
        }
        match births.get(&v) {
            Some(b) if b.key == k => {}
            b => out.push(format!("reported ({k}, {v}, {cause:?}) but made as {b:?}")),
        }
    }
    for &(k, v) in &present {
        if seen.contains(&v) {
            out.push(format!(
                "version {v} of key {k} present and reported removed"
            ));
        }
    }
    let present_set: HashSet<u64> = present.iter().map(|p| p.1).collect();
    for v in inserted.into_inner().unwrap() {
        if !present_set.contains(&v) && !seen.contains(&v) {
            out.push(format!(
                "inserted version {v} neither present nor reported removed"
            ));
        }
    }
    cache.validate();
    out
}

fn weighted_sweep(ttl: bool) {
    let _dog = watchdog(Duration::from_secs(300), "weighted sweep");
    let mut failures = Vec::new();
    for seed in 1..=seeds() {
        let p = weighted_run(seed, ttl);
        if !p.is_empty() {
            failures.push(format!(
                "seed {seed}: {} problems; first: {}",
                p.len(),
                p[0]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn weighted_history_bound_accounting_and_listener_exactly_once() {
    weighted_sweep(false);
}

#[test]
fn weighted_history_with_ttl_bound_accounting_and_listener_exactly_once() {
    weighted_sweep(true);
}

#[test]
fn history_weighted_with_too_heavy_values_reads_are_linearizable() {
    sweep(Config {
        weigher: true,
        capacity: 4,
        ..Config::plain("weighted, some values too heavy")
    });
}

#[test]
fn history_weighted_many_shards_evicting_elsewhere_reads_are_linearizable() {
    sweep(Config {
        weigher: true,
        keys: 8,
        capacity: 9,
        shards: 8,
        ..Config::plain("weighted, 8 shards")
    });
}

#[test]
fn history_with_time_to_idle_reads_are_linearizable() {
    sweep(Config {
        time_to_idle: Some(Duration::from_millis(15)),
        ttl: Some(Duration::from_millis(60)),
        ..Config::plain("tti")
    });
}

#[test]
fn history_with_load_limit_and_nested_loads_reads_are_linearizable() {
    sweep(Config {
        keys: 4,
        limit: 1,
        nest: true,
        ..Config::plain("limit 1, nested loads")
    });
}

#[test]
fn history_with_load_limit_nested_loads_and_negative_ttl_reads_are_linearizable() {
    sweep(Config {
        keys: 4,
        limit: 2,
        nest: true,
        negative: true,
        ..Config::plain("limit 2, nested loads, negative_ttl")
    });
}

/// The second planted bug: a load returned but never stored must be caught by the rule that
/// a load nothing overlapped is a definite write.
#[test]
fn checker_catches_a_planted_load_that_is_never_stored() {
    let _dog = watchdog(Duration::from_secs(300), "planted lossy bug");
    let cfg = Config {
        keys: 1,
        lossy: true,
        ..Config::plain("planted lossy")
    };
    let mut caught = None;
    for seed in 1..=40 {
        let (ctx, recs) = run(&cfg, seed);
        let v = check(&cfg, &ctx, &recs, Model::Real);
        if let Some(first) = v.first() {
            caught = Some((seed, v.len(), first.clone()));
            break;
        }
    }
    let (seed, n, first) = caught.expect("the checker never caught the planted lost store");
    eprintln!("planted lossy bug caught at seed {seed}: {n} violations; first: {first}");
}

#[test]
fn history_with_per_entry_expiry_reads_never_stale_nor_expired() {
    sweep(Config {
        expiry: true,
        ..Config::plain("expire_after")
    });
}

#[test]
fn history_with_per_entry_expiry_ttl_and_jitter_reads_never_stale_nor_expired() {
    sweep(Config {
        expiry: true,
        ttl: Some(Duration::from_millis(15)),
        jitter: 0.3,
        ..Config::plain("expire_after + ttl + jitter")
    });
}

#[test]
fn history_with_refresh_fail_safe_and_flaky_backend_reads_are_linearizable() {
    sweep(Config {
        ttl: Some(Duration::from_millis(20)),
        refresh: true,
        fail_safe: true,
        negative: true,
        ..Config::plain("refresh + fail_safe + negative_ttl")
    });
}

// ---------------------------------------------------------------------------------------------
// A refresh decided by a read (its compare-and-swap on the entry's refresh deadline, under the
// read lock) and registered later (`claim_refresh`, under the write lock): an invalidation or a
// write in between.

thread_local! {
    /// While set, cloning a [`SlowKey`] on this thread takes `SLOW_CLONE`.
    static SLOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
const SLOW_CLONE: Duration = Duration::from_millis(150);

/// A key whose `Clone` is slow on a thread that asks for it (an allocation, a page fault, a
/// preemption: any key's clone can take this long).
#[derive(Debug, PartialEq, Eq, Hash)]
struct SlowKey(u32);

impl Clone for SlowKey {
    fn clone(&self) -> Self {
        if SLOW.with(|s| s.get()) {
            std::thread::sleep(SLOW_CLONE);
        }
        SlowKey(self.0)
    }
}

/// What the key holds after: insert "v1", make it due, a read that starts its refresh (with
/// slow key clones) and, 40 ms into that read, `interfere` on another thread; then the refresh
/// is waited for. Returns (the value after, the loads the loader ran, the sequence of events).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refresher {
    Inline,
    Spawner,
    FutureSpawner,
}

fn refresh_raced_by(
    how: Refresher,
    interfere: fn(&Cache<SlowKey, String>),
) -> (Option<String>, u64, Vec<String>) {
    let clock = ManualClock::new();
    let loads = Arc::new(AtomicU64::new(0));
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let (l, ev) = (Arc::clone(&loads), Arc::clone(&events));
    let mut b = Cache::builder()
        .max_capacity(100)
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .loader(move |k: &SlowKey| {
            let n = l.fetch_add(1, SeqCst) + 1;
            ev.lock()
                .unwrap()
                .push(format!("loader runs for key {} (load #{n})", k.0));
            Ok::<_, BoxError>(format!("reloaded #{n}"))
        });
    match how {
        Refresher::Inline => {}
        Refresher::Spawner => {
            b = b.spawner(|job| {
                std::thread::spawn(job);
            })
        }
        Refresher::FutureSpawner => {
            let (l, ev) = (Arc::clone(&loads), Arc::clone(&events));
            b = b
                .async_loader(move |k: &SlowKey| {
                    let n = l.fetch_add(1, SeqCst) + 1;
                    ev.lock()
                        .unwrap()
                        .push(format!("async loader starts for key {} (load #{n})", k.0));
                    async move { Ok::<_, BoxError>(format!("reloaded #{n}")) }
                })
                .future_spawner(|f| {
                    std::thread::spawn(move || futures::executor::block_on(f));
                });
        }
    }
    let cache: Cache<SlowKey, String> = b.build();
    cache.insert(SlowKey(1), "v1".to_string());
    clock.advance(Duration::from_secs(11)); // due for a refresh
    events
        .lock()
        .unwrap()
        .push("insert(1, \"v1\"); clock +11 s: due".into());
    let reader = {
        let (cache, events) = (cache.clone(), Arc::clone(&events));
        std::thread::spawn(move || {
            SLOW.with(|s| s.set(true));
            events.lock().unwrap().push("t1: get(1) starts".into());
            let got = cache.get(&SlowKey(1));
            events
                .lock()
                .unwrap()
                .push(format!("t1: get(1) returns {got:?}"));
            SLOW.with(|s| s.set(false));
        })
    };
    std::thread::sleep(Duration::from_millis(40));
    {
        let cache = cache.clone();
        let ev = Arc::clone(&events);
        ev.lock().unwrap().push("t2: write starts".into());
        interfere(&cache);
        ev.lock().unwrap().push("t2: write returns".into());
    }
    reader.join().unwrap();
    assert!(
        common::eventually(|| cache.loads_in_flight() == 0),
        "the refresh never ended"
    );
    let after = cache.get(&SlowKey(1));
    events
        .lock()
        .unwrap()
        .push(format!("main: get(1) after everything returns {after:?}"));
    cache.validate();
    let evs = events.lock().unwrap().clone();
    (after, loads.load(SeqCst), evs)
}

/// `invalidate` docs (crate level): "A write or invalidation of the key while it loads wins:
/// the loaded value goes to the callers already waiting, but is not stored." Here the refresh
/// was started by a read that returned before anything else touched the key... except the
/// invalidation, which returned before the refresh was registered; the key must stay absent.
fn invalidate_during_refresh_start(how: Refresher) {
    let _dog = watchdog(Duration::from_secs(60), "invalidate during refresh start");
    let (after, loads, events) = refresh_raced_by(how, |c| c.invalidate(&SlowKey(1)));
    assert_eq!(
        after,
        None,
        "an invalidation that returned while a read was starting the key's refresh was undone \
         by that refresh ({loads} loads); history:\n  {}",
        events.join("\n  ")
    );
}

#[test]
fn refresh_decided_before_an_invalidate_does_not_resurrect_the_key_spawner() {
    invalidate_during_refresh_start(Refresher::Spawner);
}

#[test]
fn refresh_decided_before_an_invalidate_does_not_resurrect_the_key_future_spawner() {
    invalidate_during_refresh_start(Refresher::FutureSpawner);
}

#[test]
fn refresh_decided_before_an_invalidate_does_not_resurrect_the_key_inline() {
    invalidate_during_refresh_start(Refresher::Inline);
}

/// The same with a write: "A plain write supersedes (detaches) the key's load in flight";
/// `insert` "replaces any previous value". The refresh of "v1" must not replace "v2".
fn insert_during_refresh_start(how: Refresher) {
    let _dog = watchdog(Duration::from_secs(60), "insert during refresh start");
    let (after, loads, events) = refresh_raced_by(how, |c| c.insert(SlowKey(1), "v2".to_string()));
    assert_eq!(
        after.as_deref(),
        Some("v2"),
        "an insert that returned while a read was starting the key's refresh was overwritten \
         by that refresh of the older value ({loads} loads); history:\n  {}",
        events.join("\n  ")
    );
}

#[test]
fn refresh_decided_before_an_insert_does_not_overwrite_it_spawner() {
    insert_during_refresh_start(Refresher::Spawner);
}

#[test]
fn refresh_decided_before_an_insert_does_not_overwrite_it_future_spawner() {
    insert_during_refresh_start(Refresher::FutureSpawner);
}

#[test]
fn refresh_decided_before_an_insert_does_not_overwrite_it_inline() {
    insert_during_refresh_start(Refresher::Inline);
}

/// The same race with plain `u32` keys (a trivial `Clone`) and no help: a read of a due entry
/// and an `invalidate` of its key start together, many times. Whatever the interleaving, the
/// key must end absent: either the invalidation came first (no refresh), or it came after the
/// refresh was started (it supersedes the refresh, or removes what it stored). Prints how often
/// the key came back.
#[test]
fn refresh_racing_an_invalidate_never_resurrects_the_key_plain_keys() {
    let _dog = watchdog(Duration::from_secs(120), "plain refresh race");
    let iterations: u64 = std::env::var("HERDCACHE_S35_RACES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4_000);
    let clock = ManualClock::new();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .loader(|_k: &u32| Ok::<_, BoxError>(u64::MAX)) // inline refresh, in the reader
        .build();
    let barrier = std::sync::Barrier::new(3);
    let mut resurrected = Vec::new();
    let mut r = rng(35);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop_on_exit = common::SetOnDrop(&stop);
        let (cache, barrier, stop) = (&cache, &barrier, &stop);
        let spins: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let reader_spin = Arc::clone(&spins[0]);
        s.spawn(move || loop {
            barrier.wait();
            if stop.load(SeqCst) {
                return;
            }
            for _ in 0..reader_spin.load(SeqCst) {
                std::hint::spin_loop();
            }
            let _ = cache.get(&1);
            barrier.wait();
        });
        let writer_spin = Arc::clone(&spins[1]);
        s.spawn(move || loop {
            barrier.wait();
            if stop.load(SeqCst) {
                return;
            }
            for _ in 0..writer_spin.load(SeqCst) {
                std::hint::spin_loop();
            }
            cache.invalidate(&1);
            barrier.wait();
        });
        for i in 0..iterations {
            cache.insert(1, i);
            clock.advance(Duration::from_secs(11));
            spins[0].store(r() % 400, SeqCst);
            spins[1].store(r() % 400, SeqCst);
            barrier.wait();
            barrier.wait();
            if let Some(v) = cache.get(&1) {
                resurrected.push((i, v));
                cache.invalidate(&1);
            }
        }
        stop.store(true, SeqCst);
        barrier.wait();
    });
    eprintln!(
        "{} of {iterations} races left the invalidated key holding a refreshed value",
        resurrected.len()
    );
    assert!(
        resurrected.is_empty(),
        "{} of {iterations} times, get(1) of a due entry racing invalidate(1) left key 1 \
         holding the refresh's value {} after both returned (first at iteration {})",
        resurrected.len(),
        resurrected[0].1,
        resurrected[0].0
    );
}

/// `retain` docs: "An entry `keep` removes is removed as by `invalidate`: a load or refresh of
/// its key in flight is superseded (its value goes to its callers, is not stored)."
#[test]
fn refresh_decided_before_a_retain_does_not_resurrect_the_key() {
    let _dog = watchdog(Duration::from_secs(60), "retain during refresh start");
    let (after, loads, events) = refresh_raced_by(Refresher::Spawner, |c| {
        c.invalidate_entries_if(|k, _| k.0 == 1).unwrap();
    });
    assert_eq!(
        after,
        None,
        "an invalidate_entries_if that removed the key while a read was starting its refresh \
         was undone by that refresh ({loads} loads); history:\n  {}",
        events.join("\n  ")
    );
}

/// `invalidate_all`: "Removes every entry, at one instant"; it supersedes the loads in flight.
#[test]
fn refresh_decided_before_an_invalidate_all_does_not_resurrect_the_key() {
    let _dog = watchdog(
        Duration::from_secs(60),
        "invalidate_all during refresh start",
    );
    let (after, loads, events) = refresh_raced_by(Refresher::Spawner, |c| c.invalidate_all());
    assert_eq!(
        after,
        None,
        "an invalidate_all that returned while a read was starting a refresh was undone by \
         that refresh ({loads} loads); history:\n  {}",
        events.join("\n  ")
    );
}

/// `get_with` docs: "A write (`insert`, a compute) or invalidation of `key` during the load
/// wins". A computation that stored "v2" while a read was starting the key's refresh.
#[test]
fn refresh_decided_before_a_compute_does_not_overwrite_its_value() {
    let _dog = watchdog(Duration::from_secs(60), "compute during refresh start");
    let (after, loads, events) = refresh_raced_by(Refresher::Spawner, |c| {
        c.entry(SlowKey(1)).and_upsert_with(|_| "v2".to_string());
    });
    assert_eq!(
        after.as_deref(),
        Some("v2"),
        "a computation that stored v2 while a read was starting the key's refresh was \
         overwritten by that refresh of the older value ({loads} loads); history:\n  {}",
        events.join("\n  ")
    );
}

/// The expiry rule can fail: a history of a cache with a 30 ms time to live, checked as if the
/// time to live were 3 ms, must show expired reads.
#[test]
fn checker_expiry_rule_fires_when_the_ttl_is_understated() {
    let _dog = watchdog(Duration::from_secs(120), "understated ttl");
    let cfg = Config {
        ttl: Some(Duration::from_millis(30)),
        ..Config::plain("ttl")
    };
    let (ctx, recs) = run(&cfg, 1);
    assert!(check(&cfg, &ctx, &recs, Model::Real).is_empty());
    let wrong = Config {
        ttl: Some(Duration::from_millis(3)),
        ..cfg
    };
    let v = check(&wrong, &ctx, &recs, Model::Real);
    assert!(
        v.iter().any(|p| p.contains("its life")),
        "no expired read flagged with an understated time to live"
    );
}
