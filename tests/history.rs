//! History check (issue 11): concurrent histories on a few hot keys, checked for stale reads.
//!
//! Four threads run a random mix on two hot keys: `insert` (the value is a fresh version),
//! `invalidate`, `get`, `get_with` (its `init` makes a fresh version, after a short spin),
//! `and_compute_with` (mostly `Op::Put` of a fresh version, sometimes `Op::Remove`), `load` (the
//! builder's loader makes a fresh version) and, on a `ManualClock` that one thread advances past
//! `refresh_after` every so often, refreshes (a read of a due entry runs the loader inline).
//! Versions come from one global counter; each version's *birth* is the global sequence number
//! read when it was made. Each operation reads the global sequence counter before it starts (`s`)
//! and after it ends (`e`).
//!
//! # The rule
//!
//! Only `insert` and `invalidate` are *definite* writes: when they return, they took effect.
//! (A load, refresh or compute stores its value only if nothing wrote the key since it began.)
//! For a read `R` of key `k` (a `get`, the value a `get_with`/`load` returned that its own
//! loader did not make, the entry a compute's closure saw) that returned:
//!
//! * a version `x` made by an `insert` `W'`: a violation if a definite write `W` of `k` started
//!   after `W'` ended and ended before `R` started (`s(W) > e(W')`, `e(W) < s(R)`): `x` was
//!   overwritten before `R` began (plain linearizability);
//! * a version `x` made by a load, a refresh or a compute (born at `b(x)`): a violation if a
//!   definite write `W` of `k` started after `x` was born and ended before `R` started
//!   (`s(W) > b(x)`, `e(W) < s(R)`): either `x` was stored before `W` (and `W` overwrote it) or
//!   after `W` began (and a write during the load must win), and a caller that starts after a
//!   write returned never receives a value loaded before it;
//! * a version of another key, or one born after `R` ended: a violation;
//! * nothing (`get` → `None`): legal only if some removal `P` of `k` (an `invalidate`, a compute
//!   that removed, or the initial state) is not definitely overwritten before `R` started: a
//!   violation if for every such `P` that started before `R` ended, an `insert` `W` of `k`
//!   started after `P` ended and ended before `R` started. (No capacity pressure, no expiry:
//!   nothing else removes entries.)
//!
//! A caller that receives its own loader's value is not checked (it is the value it loaded).
//! The check is sound (a correct cache never violates it) but not complete.
//!
//! Bounded: `HERDCACHE_HISTORY_OPS` operations per thread (default 150,000 in release, 25,000 in
//! debug). Prints `history: N ops checked, M violations` and fails if `M > 0`.

#![cfg(not(loom))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, CompResult, ManualClock, Op};
use herdcache_testkit::history::Writes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const THREADS: usize = 4;
const HOT_KEYS: u32 = 2;

static SEQ: AtomicU64 = AtomicU64::new(1);
static VERSION: AtomicU64 = AtomicU64::new(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Insert,
    Load,
    Compute,
}

#[derive(Clone, Copy, Debug)]
struct Birth {
    key: u32,
    born: u64,
    origin: Origin,
}

thread_local! {
    static BIRTHS: RefCell<Vec<(u64, Birth)>> = const { RefCell::new(Vec::new()) };
    /// The version this thread's own loader made during the current operation (0: none).
    static OWN: Cell<u64> = const { Cell::new(0) };
}

/// Makes a fresh version for `key`, recording its birth.
fn fresh(key: u32, origin: Origin) -> u64 {
    let v = VERSION.fetch_add(1, SeqCst);
    let born = SEQ.fetch_add(1, SeqCst);
    BIRTHS.with(|b| b.borrow_mut().push((v, Birth { key, born, origin })));
    if origin != Origin::Insert {
        OWN.with(|o| o.set(v));
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Insert,
    Invalidate,
    Get,
    GetWith,
    Compute,
    ComputeRemove,
    Load,
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    key: u32,
    kind: Kind,
    s: u64,
    e: u64,
    /// What the operation read: `None` if it read nothing to check, `Some(None)` for absent.
    read: Option<Option<u64>>,
    /// The version an insert wrote.
    wrote: u64,
}

fn spin(n: u32) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

/// One thread's operations.
/// `plain`: only insert, invalidate and get, and no clock ticks (no refreshes): the control run.
fn worker(
    cache: &Cache<u32, u64>,
    clock: &ManualClock,
    t: usize,
    ops: usize,
    plain: bool,
) -> Vec<Rec> {
    let mut next =
        common::rng(0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut recs = Vec::with_capacity(ops);
    for i in 0..ops {
        if !plain && t == 0 && i % 256 == 255 {
            clock.advance(Duration::from_secs(11)); // every entry is due for refresh
        }
        let r = next();
        let key = (r % u64::from(HOT_KEYS)) as u32 + 1;
        let pick = (r >> 8) % if plain { 57 } else { 100 };
        let spin_for = ((r >> 20) % 300) as u32;
        OWN.with(|o| o.set(0));
        let s = SEQ.fetch_add(1, SeqCst);
        let (kind, read, wrote) = match pick {
            0..=19 => {
                let v = fresh(key, Origin::Insert);
                cache.insert(key, v);
                (Kind::Insert, None, v)
            }
            20..=26 => {
                cache.invalidate(&key);
                (Kind::Invalidate, None, 0)
            }
            27..=56 => (Kind::Get, Some(cache.get(&key)), 0),
            57..=76 => {
                let v = cache.get_with(key, || {
                    spin(spin_for);
                    fresh(key, Origin::Load)
                });
                (Kind::GetWith, Some(Some(v)), 0)
            }
            77..=89 => {
                let mut saw = None;
                let remove = pick >= 87;
                let r = cache.entry(key).and_compute_with(|e| {
                    saw = Some(e.map(|e| *e.value()));
                    spin(spin_for);
                    if remove {
                        Op::Remove
                    } else {
                        Op::Put(fresh(key, Origin::Compute))
                    }
                });
                let kind = match r {
                    CompResult::Removed(_) => Kind::ComputeRemove,
                    _ => Kind::Compute,
                };
                (kind, saw, 0)
            }
            _ => match cache.load(key) {
                Ok(v) => (Kind::Load, Some(Some(v)), 0),
                Err(_) => (Kind::Load, None, 0),
            },
        };
        let e = SEQ.fetch_add(1, SeqCst);
        // A caller that got its own loader's value read nothing of others'.
        let own = OWN.with(Cell::get);
        let read = match read {
            Some(Some(v)) if v == own => None,
            r => r,
        };
        recs.push(Rec {
            key,
            kind,
            s,
            e,
            read,
            wrote,
        });
    }
    recs
}

/// Runs a history and checks it; returns the number of operations checked and the violations.
fn run_history(plain: bool) -> (u64, Vec<String>) {
    let ops: usize = std::env::var("HERDCACHE_HISTORY_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            25_000
        } else {
            150_000
        });
    let clock = ManualClock::new();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(1_000)
        .refresh_after(Duration::from_secs(10))
        .loader(|k: &u32| {
            spin(200);
            Ok::<_, BoxError>(fresh(*k, Origin::Load))
        })
        .clock(clock.clone())
        .build();
    let births: Mutex<HashMap<u64, Birth>> = Mutex::new(HashMap::new());
    let t0 = Instant::now();
    let recs: Vec<Rec> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, clock, births) = (&cache, &clock, &births);
                s.spawn(move || {
                    let recs = worker(cache, clock, t, ops, plain);
                    let mine = BIRTHS.with(|b| std::mem::take(&mut *b.borrow_mut()));
                    births.lock().unwrap().extend(mine);
                    recs
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect()
    });
    let ran = t0.elapsed();
    let births = births.into_inner().unwrap();

    // Per key: definite writes (inserts and invalidates), inserts alone, removals.
    let mut writes: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut inserts: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut removals: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut insert_of: HashMap<u64, (u64, u64)> = HashMap::new();
    for r in &recs {
        match r.kind {
            Kind::Insert => {
                writes.entry(r.key).or_default().push((r.s, r.e));
                inserts.entry(r.key).or_default().push((r.s, r.e));
                insert_of.insert(r.wrote, (r.s, r.e));
            }
            Kind::Invalidate => {
                writes.entry(r.key).or_default().push((r.s, r.e));
                removals.entry(r.key).or_default().push((r.s, r.e));
            }
            Kind::ComputeRemove => removals.entry(r.key).or_default().push((r.s, r.e)),
            _ => {}
        }
    }
    for k in 1..=HOT_KEYS {
        removals.entry(k).or_default().push((0, 0)); // the initial state: absent
    }
    let writes: HashMap<u32, Writes> = (1..=HOT_KEYS)
        .map(|k| (k, Writes::new(writes.remove(&k).unwrap_or_default())))
        .collect();
    let inserts: HashMap<u32, Writes> = (1..=HOT_KEYS)
        .map(|k| (k, Writes::new(inserts.remove(&k).unwrap_or_default())))
        .collect();

    let mut checked = 0u64;
    let mut violations: Vec<String> = Vec::new();
    let mut by_kind: HashMap<String, u64> = HashMap::new();
    for r in &recs {
        let Some(read) = r.read else { continue };
        checked += 1;
        let problem = match read {
            Some(x) => match births.get(&x) {
                None => Some(format!("returned {x}, a version nobody made")),
                Some(b) if b.key != r.key => Some(format!("returned {x}, made for key {}", b.key)),
                Some(b) if b.born > r.e => Some(format!("returned {x}, born after the read ended")),
                Some(b) => {
                    let since = match b.origin {
                        Origin::Insert => insert_of.get(&x).map_or(b.born, |w| w.1),
                        Origin::Load | Origin::Compute => b.born,
                    };
                    writes[&r.key].between(since, r.s).then(|| {
                        format!(
                            "returned {x} ({:?}-born at {}), overwritten by a write that ended before the read began",
                            b.origin, b.born
                        )
                    })
                }
            },
            None => {
                let latest = removals[&r.key]
                    .iter()
                    .filter(|p| p.0 < r.e)
                    .map(|p| p.1)
                    .max()
                    .unwrap_or(0);
                inserts[&r.key]
                    .between(latest, r.s)
                    .then(|| "returned nothing after an insert that ended before the read began (and after every removal)".to_string())
            }
        };
        if let Some(p) = problem {
            *by_kind.entry(format!("{:?}", r.kind)).or_default() += 1;
            violations.push(format!(
                "{:?} of key {} [{}, {}]: {p}",
                r.kind, r.key, r.s, r.e
            ));
        }
    }
    let total = recs.len();
    eprintln!(
        "history{}: {total} ops by {THREADS} threads on {HOT_KEYS} keys in {:.2} s; {} versions made; by kind {by_kind:?}",
        if plain { " (control: insert, invalidate, get)" } else { "" },
        ran.as_secs_f64(),
        births.len()
    );
    for v in violations.iter().take(10) {
        eprintln!("  {v}");
    }
    cache.validate();
    (checked, violations)
}

/// The full mix: loads, computes and refreshes against inserts and invalidations.
#[test]
fn reads_never_return_values_overwritten_before_they_started() {
    let _dog = watchdog(Duration::from_secs(600), "history check");
    let (checked, violations) = run_history(false);
    eprintln!(
        "history: {checked} ops checked, {} violations",
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} stale reads (first: {})",
        violations.len(),
        violations[0]
    );
}

/// The control: only inserts, invalidations and gets, which are linearizable today. The checker
/// must find nothing here (a check that flags correct histories would be worthless).
#[test]
fn control_plain_writes_and_reads_pass_the_checker() {
    let _dog = watchdog(Duration::from_secs(600), "history control");
    let (checked, violations) = run_history(true);
    eprintln!(
        "history (control): {checked} ops checked, {} violations",
        violations.len()
    );
    assert!(checked > 0);
    assert!(
        violations.is_empty(),
        "the checker flagged a plain history: {}",
        violations[0]
    );
}
