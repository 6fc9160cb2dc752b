#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]
//! Round 69 of the outside attacks (a helper, public API only): a concurrent randomized stress
//! with fault injection.
//!
//! Per round: a fresh cache with a random configuration (entry or weight capacity, time to
//! live / idle / `Expiry`, negative caching, fail-safe, a load limit, refresh-ahead with a
//! builder loader, a soft timeout, a spawner that runs jobs inline, on threads, or drops them,
//! an eviction listener, a `ManualClock`), 3-4 threads running random operations over 3-6
//! keys, with at most one fault armed per round (the N-th call of one kind of user code panics:
//! key `Clone`/`Drop`/`Hash`/`Eq`, value `Clone`/`Drop`, weigher, `Expiry`, listener, loader
//! closures, spawner, predicates, computations). At quiescence:
//!  1. no hang (30 s), no load left in flight;
//!  2. `validate()`;
//!  3. the misses identity;
//!  4. `entry_count()` == entries iterated, `weighted_size()` == their weights (after
//!     `run_pending_tasks`; with fail-safe, stale entries are kept and not iterated: <=);
//!  5. after dropping the cache, no key or value alive, also in a round where a `Drop`
//!     panicked (the test drops the maps it is given from a `Vec`: a map leaks its other
//!     elements when one's `Drop` panics);
//!  6. the listener never hears one stored value twice;
//!  7. a `get` (`remove`, `get_or_stale`) never returns a value superseded by a write or
//!     invalidation of its key that started after that value's write ended and ended before
//!     the read started; and never a value of another key.
//!
//! Also: any panic that is not an injected one is reported.
//!
//! Found (fixed in the same stop, stop 51): the `get_with` family's hit path leaked the value
//! it returned when the key argument's `Drop` panicked (the key was dropped after the return
//! value was built: rust-lang/rust#47949) — `h69_get_with_hit_whose_key_drop_panics_leaks_no_value`,
//! `h69_hit_paths_with_a_key_drop_panic_leak_no_value`; `tests/attack_s69.rs` sweeps the
//! class (113 leaking cases over every entry point before the fix). About 21,000 concurrent
//! and 5,000 serial rounds ran clean otherwise.
//!
//! Each sweep runs 10 s by default (`HERDCACHE_TEST_PART` shortens it). Env: `HC69_SECS` (per
//! test), `HC69_SEED` (first seed), `HC69_REPLAY=<seed>` replays one round (`HC69_SERIAL=1`:
//! its threads' operations interleaved round-robin on one thread, deterministic but for the
//! cache's random hasher).
mod common;

use herdcache::{BoxError, Cache, CompResult, Expiry, ManualClock, Op, RemovalCause};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ fault injection
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Site {
    None = 0,
    KeyClone,
    KeyDrop,
    KeyHash,
    KeyEq,
    ValClone,
    ValDrop,
    Weigher,
    ExpCreate,
    ExpRead,
    ExpUpdate,
    Listener,
    Loader,
    Spawner,
    Predicate,
    Compute,
}
const SITES: [Site; 15] = [
    Site::KeyClone,
    Site::KeyDrop,
    Site::KeyHash,
    Site::KeyEq,
    Site::ValClone,
    Site::ValDrop,
    Site::Weigher,
    Site::ExpCreate,
    Site::ExpRead,
    Site::ExpUpdate,
    Site::Listener,
    Site::Loader,
    Site::Spawner,
    Site::Predicate,
    Site::Compute,
];
static FAULT: AtomicU32 = AtomicU32::new(0);
static LEFT: AtomicI64 = AtomicI64::new(0);
static FIRED: AtomicU32 = AtomicU32::new(0);
/// The operation (`do_op`'s `which`, 99: a spawned job, 98: the check phase) in which the fault fired.
static FIRED_OP: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static CUR_OP: std::cell::Cell<u64> = const { std::cell::Cell::new(99) };
}

fn hit(site: Site) {
    if FAULT.load(SeqCst) != site as u32 || std::thread::panicking() {
        return;
    }
    if LEFT.fetch_sub(1, SeqCst) == 1 {
        FIRED.store(site as u32, SeqCst);
        FIRED_OP.store(CUR_OP.with(|c| c.get()), SeqCst);
        panic!("injected {site:?}");
    }
}

// ------------------------------------------------------------------ counted keys and values
static LIVE_K: AtomicI64 = AtomicI64::new(0);
static LIVE_V: AtomicI64 = AtomicI64::new(0);
/// Misses counted by plain reads (`get`, `get_or_stale`): at least / at most.
static PLAIN_MIN: AtomicU64 = AtomicU64::new(0);
static PLAIN_MAX: AtomicU64 = AtomicU64::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static TS: AtomicU64 = AtomicU64::new(1);
fn ts() -> u64 {
    TS.fetch_add(1, SeqCst)
}

#[derive(Debug)]
struct K(u32);
impl K {
    fn new(k: u32) -> K {
        LIVE_K.fetch_add(1, SeqCst);
        K(k)
    }
}
impl Clone for K {
    fn clone(&self) -> K {
        hit(Site::KeyClone);
        K::new(self.0)
    }
}
impl Drop for K {
    fn drop(&mut self) {
        LIVE_K.fetch_sub(1, SeqCst);
        hit(Site::KeyDrop);
    }
}
impl Hash for K {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hit(Site::KeyHash);
        self.0.hash(h)
    }
}
impl PartialEq for K {
    fn eq(&self, o: &K) -> bool {
        hit(Site::KeyEq);
        self.0 == o.0
    }
}
impl Eq for K {}

#[derive(Debug)]
struct V {
    id: u64,
    key: u32,
    w: u32,
}
impl Clone for V {
    fn clone(&self) -> V {
        hit(Site::ValClone);
        LIVE_V.fetch_add(1, SeqCst);
        V {
            id: self.id,
            key: self.key,
            w: self.w,
        }
    }
}
impl Drop for V {
    fn drop(&mut self) {
        LIVE_V.fetch_sub(1, SeqCst);
        hit(Site::ValDrop);
    }
}

/// Where each value id came from: (key, start, end) of the operation that produced it.
#[allow(dead_code)]
struct Prod {
    key: u32,
    start: u64,
    end: u64,
    what: &'static str,
}
static PROD: Mutex<Option<HashMap<u64, Prod>>> = Mutex::new(None);
/// Per key: (start, end, what) of every write or invalidation (supersedes older values).
static SUPER: Mutex<Option<HashMap<u32, Vec<(u64, u64, &'static str)>>>> = Mutex::new(None);
static CHECKED: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static OTHER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
thread_local! {
    static PRODUCED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn violation(s: String) {
    let mut v = VIOLATIONS.lock().unwrap_or_else(|e| e.into_inner());
    if v.len() < 20 {
        v.push(s);
    }
}

fn new_value(key: u32, what: &'static str) -> V {
    let id = NEXT_ID.fetch_add(1, SeqCst);
    let start = ts();
    PROD.lock().unwrap().as_mut().unwrap().insert(
        id,
        Prod {
            key,
            start,
            end: u64::MAX,
            what,
        },
    );
    PRODUCED.with(|p| p.borrow_mut().push(id));
    LIVE_V.fetch_add(1, SeqCst);
    V {
        id,
        key,
        w: 1 + (id % 4) as u32,
    }
}

/// Runs `f` as one operation: the values produced in it end when it ends.
fn op_scope<T>(f: impl FnOnce() -> T) -> T {
    let saved = PRODUCED.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let r = f();
    let end = ts();
    let ids = PRODUCED.with(|p| std::mem::replace(&mut *p.borrow_mut(), saved));
    let mut g = PROD.lock().unwrap();
    let m = g.as_mut().unwrap();
    for id in ids {
        if let Some(p) = m.get_mut(&id) {
            p.end = end;
        }
    }
    r
}

fn superseded(key: u32, start: u64, end: u64, what: &'static str) {
    SUPER
        .lock()
        .unwrap()
        .as_mut()
        .unwrap()
        .entry(key)
        .or_default()
        .push((start, end, what));
}

/// A read of `key` that started at `g_start` returned `v`: check it against the history.
fn check_read(what: &str, key: u32, g_start: u64, v: &V) {
    if v.key != key {
        violation(format!(
            "{what}(k{key}) returned value {} of key {}",
            v.id, v.key
        ));
        return;
    }
    let (p_end, p_what) = {
        let g = PROD.lock().unwrap();
        match g.as_ref().unwrap().get(&v.id) {
            Some(p) => (p.end, p.what),
            None => {
                violation(format!("{what}(k{key}) returned unknown value {}", v.id));
                return;
            }
        }
    };
    if p_end == u64::MAX {
        return;
    }
    CHECKED.fetch_add(1, SeqCst);
    let g = SUPER.lock().unwrap();
    if let Some(list) = g.as_ref().unwrap().get(&key) {
        for &(s, e, w) in list {
            if s > p_end && e < g_start {
                violation(format!(
                    "{what}(k{key}) started at {g_start} returned value {} (written by {p_what}, ended {p_end}) although {w} [{s},{e}] superseded it",
                    v.id
                ));
                return;
            }
        }
    }
}

// ------------------------------------------------------------------ configuration
#[derive(Debug, Clone)]
struct Cfg {
    cap: u64,
    weigher: bool,
    shards: Option<usize>,
    lru: bool,
    ttl: Option<u64>,
    tti: Option<u64>,
    expiry: Option<(u64, Option<u64>, u8)>,
    negative: Option<u64>,
    loader: bool,
    refresh: Option<u64>,
    spawner: Option<u8>,
    limit: Option<usize>,
    timeout: Option<u64>,
    fail_safe: Option<u64>,
    jitter: bool,
    early: bool,
    threads: usize,
    keys: u32,
    ops: Vec<usize>,
    fault: Site,
    fault_at: i64,
}

fn gen_cfg(r: &mut common::SplitMix) -> Cfg {
    let weigher = r.chance(300);
    let loader = r.chance(500);
    let ttl = r.chance(400).then(|| 10 + r.below(90));
    let tti = r.chance(200).then(|| 10 + r.below(90));
    let expiry = r.chance(250).then(|| {
        (
            5 + r.below(80),
            r.chance(500).then(|| 5 + r.below(60)),
            r.below(3) as u8,
        )
    });
    let has_deadline = ttl.is_some() || tti.is_some() || expiry.is_some();
    let threads = 3 + r.below(2) as usize;
    let fault = if r.chance(600) {
        SITES[r.below(SITES.len() as u64) as usize]
    } else {
        Site::None
    };
    Cfg {
        cap: if weigher {
            8 + r.below(33)
        } else {
            4 + r.below(29)
        },
        weigher,
        shards: r.chance(300).then(|| 1usize << r.below(3)),
        lru: r.chance(250),
        ttl,
        tti,
        expiry,
        negative: r.chance(250).then(|| 5 + r.below(50)),
        loader,
        refresh: (loader && r.chance(500)).then(|| 5 + r.below(40)),
        spawner: r.chance(500).then(|| r.below(4) as u8),
        limit: r.chance(400).then(|| 1 + r.below(2) as usize),
        timeout: r.chance(250).then(|| 1 + r.below(10)),
        fail_safe: (has_deadline && r.chance(300)).then(|| 10 + r.below(200)),
        jitter: r.chance(200),
        early: loader && ttl.is_some() && r.chance(100),
        threads,
        keys: 3 + r.below(4) as u32,
        ops: (0..threads).map(|_| 50 + r.below(151) as usize).collect(),
        fault,
        fault_at: {
            let m = if r.chance(500) { 60 } else { 1500 };
            1 + r.below(m) as i64
        },
    }
}

struct Exp(u64, Option<u64>, u8);
impl Expiry<K, V> for Exp {
    fn expire_after_create(&self, _k: &K, v: &V) -> Option<Duration> {
        hit(Site::ExpCreate);
        if v.id % 5 == 0 {
            None
        } else {
            Some(Duration::from_millis(self.0 + v.id % 7))
        }
    }
    fn expire_after_read(&self, _k: &K, _v: &V, rem: Option<Duration>) -> Option<Duration> {
        hit(Site::ExpRead);
        match self.1 {
            Some(ms) => Some(Duration::from_millis(ms)),
            None => rem,
        }
    }
    fn expire_after_update(&self, _k: &K, v: &V, rem: Option<Duration>) -> Option<Duration> {
        hit(Site::ExpUpdate);
        match self.2 {
            0 => rem,
            1 => Some(Duration::from_millis(self.0 + v.id % 3)),
            _ => None,
        }
    }
}

type C = Cache<K, V>;
type Jobs = Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>;

static SPAWN_RNG: AtomicU64 = AtomicU64::new(1);

fn tiny_pause(x: u64) {
    match x % 8 {
        0 => std::thread::sleep(Duration::from_micros(50 + x % 300)),
        3 => std::thread::sleep(Duration::from_micros(1000 + x % 2000)),
        1 | 2 => std::thread::yield_now(),
        _ => {}
    }
}

fn build(cfg: &Cfg, clock: &ManualClock, jobs: &Jobs) -> Option<C> {
    let mut b = Cache::<K, V>::builder()
        .max_capacity(cfg.cap)
        .record_stats()
        .clock(clock.clone());
    if cfg.weigher {
        b = b.weigher(|_k: &K, v: &V| {
            hit(Site::Weigher);
            v.w
        });
    }
    if let Some(n) = cfg.shards {
        b = b.shards(n);
    }
    if cfg.lru {
        b = b.eviction_policy(herdcache::EvictionPolicy::lru());
    }
    if let Some(t) = cfg.ttl {
        b = b.time_to_live(Duration::from_millis(t));
    }
    if let Some(t) = cfg.tti {
        b = b.time_to_idle(Duration::from_millis(t));
    }
    if let Some((a, r, u)) = cfg.expiry {
        b = b.expire_after(Exp(a, r, u));
    }
    if let Some(t) = cfg.negative {
        b = b.negative_ttl(Duration::from_millis(t));
    }
    if cfg.loader {
        b = b.loader(|k: &K| {
            hit(Site::Loader);
            let x = SPAWN_RNG.fetch_add(0x9E37_79B9, SeqCst);
            tiny_pause(x);
            if x % 5 == 0 {
                Err(BoxError::from("loader error"))
            } else {
                Ok(new_value(k.0, "loader"))
            }
        });
    }
    if let Some(t) = cfg.refresh {
        b = b.refresh_after(Duration::from_millis(t));
    }
    if let Some(mode) = cfg.spawner {
        let jobs = jobs.clone();
        b = b.spawner(move |job: Box<dyn FnOnce() + Send>| {
            hit(Site::Spawner);
            let x = SPAWN_RNG.fetch_add(0x9E37_79B9_7F4A, SeqCst) >> 7;
            let m = if mode == 3 { (x % 3) as u8 } else { mode };
            match m {
                0 => {
                    let saved = CUR_OP.with(|c| c.replace(99));
                    op_scope(job);
                    CUR_OP.with(|c| c.set(saved));
                }
                1 => {
                    let h = std::thread::spawn(move || {
                        let _ = catch_unwind(AssertUnwindSafe(|| op_scope(job)));
                    });
                    jobs.lock().unwrap().push(h);
                }
                _ => drop(job),
            }
        });
    }
    if let Some(n) = cfg.limit {
        b = b.max_concurrent_loads(n);
    }
    if let Some(t) = cfg.timeout {
        b = b.load_timeout(Duration::from_millis(t));
    }
    if let Some(t) = cfg.fail_safe {
        b = b.fail_safe(Duration::from_millis(t));
    }
    if cfg.jitter {
        b = b.jitter(0.2);
    }
    if cfg.early {
        b = b.early_refresh(1.0);
    }
    b = b.eviction_listener(|_k: &K, v: &V, cause: RemovalCause| {
        {
            let mut g = HEARD.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(prev) = g.as_mut().unwrap().insert(v.id, cause) {
                drop(g);
                violation(format!(
                    "listener heard value {} (key {}) twice: {prev:?} then {cause:?}",
                    v.id, v.key
                ));
            }
        }
        hit(Site::Listener);
    });
    b.try_build().ok()
}
static HEARD: Mutex<Option<HashMap<u64, RemovalCause>>> = Mutex::new(None);

// ------------------------------------------------------------------ operations
use common::Yield as Pend;

/// Polls `f` at most `n` times, then drops it (a cancelled async caller).
fn poll_n<F: Future>(f: F, n: u32) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let w = futures::task::noop_waker();
    let mut cx = Context::from_waker(&w);
    for _ in 0..n {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        std::thread::yield_now();
    }
    None
}

fn closure_value(key: u32, x: u64) -> V {
    hit(Site::Loader);
    tiny_pause(x);
    new_value(key, "closure")
}

const NOPS: u64 = 31;
static ONLY: std::sync::OnceLock<Option<Vec<u64>>> = std::sync::OnceLock::new();

fn do_op(c: &C, clock: &ManualClock, cfg: &Cfg, r: &mut common::SplitMix, stopped: &AtomicBool) {
    let _ = stopped;
    let k = r.below(cfg.keys as u64) as u32;
    let x = r.next();
    let mut which = r.below(NOPS);
    if let Some(only) = ONLY.get_or_init(|| {
        std::env::var("HC69_ONLY")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
    }) {
        which = only[(x % only.len() as u64) as usize];
    }
    CUR_OP.with(|c| c.set(which));
    let start = ts();
    let read = |what: &str, v: &Option<V>| {
        if let Some(v) = v {
            check_read(what, k, start, v)
        }
    };
    match which {
        0 | 1 => {
            let v = new_value(k, "insert");
            c.insert(K::new(k), v);
            superseded(k, start, ts(), "insert");
        }
        2 | 3 => {
            PLAIN_MAX.fetch_add(1, SeqCst);
            let v = c.get(&K::new(k));
            if v.is_none() {
                PLAIN_MIN.fetch_add(1, SeqCst);
            } else {
                PLAIN_MAX.fetch_sub(1, SeqCst);
            }
            read("get", &v);
        }
        4 => {
            let _ = c.contains_key(&K::new(k));
        }
        5 => {
            let v = c.get_with(K::new(k), || closure_value(k, x));
            assert_eq!(v.key, k, "get_with returned another key's value");
        }
        6 => {
            let _ = c.try_get_with(K::new(k), || {
                let v = closure_value(k, x);
                if x % 3 == 0 {
                    Err(format!("err {}", v.id))
                } else {
                    Ok(v)
                }
            });
        }
        7 => {
            let _ = c.optionally_get_with(K::new(k), || {
                let v = closure_value(k, x);
                (x % 3 != 0).then_some(v)
            });
        }
        8 => {
            let _ = c.get_with_by_ref(&K::new(k), || closure_value(k, x));
        }
        9 => {
            let _ = futures::executor::block_on(c.get_with_async(K::new(k), async move {
                Pend((x % 3) as u32).await;
                closure_value(k, x)
            }));
        }
        10 => {
            let _ = futures::executor::block_on(c.try_get_with_async(K::new(k), async move {
                Pend((x % 3) as u32).await;
                let v = closure_value(k, x);
                if x % 4 == 0 {
                    Err(())
                } else {
                    Ok(v)
                }
            }));
        }
        11 => {
            // a cancelled async caller
            let n = 1 + (x % 4) as u32;
            let _ = poll_n(
                c.get_with_async(K::new(k), async move {
                    Pend(3).await;
                    closure_value(k, x)
                }),
                n,
            );
        }
        12 => {
            let n = 1 + (x % 6) as u32;
            let _ = poll_n(
                c.get_with_async_shared(K::new(k), async move {
                    Pend(2).await;
                    closure_value(k, x)
                }),
                n,
            );
        }
        13 => {
            if x % 2 == 0 {
                let v = new_value(k, "or_insert");
                let _ = c.entry(K::new(k)).or_insert(v);
            } else {
                let _ = c.entry(K::new(k)).or_insert_with(|| closure_value(k, x));
            }
        }
        14 | 15 => {
            let r = c.entry(K::new(k)).and_compute_with(|e| {
                // The entry (its key's `Drop` may panic) drops before the verdict is made: a
                // closure's own locals dropped after its return value leak it (a user's bug).
                let has = e.is_some();
                drop(e);
                hit(Site::Compute);
                match (x % 3, has) {
                    (0, _) => Op::Remove,
                    (1, true) => Op::Nop,
                    _ => Op::Put(new_value(k, "compute")),
                }
            });
            match r {
                CompResult::Inserted(_) | CompResult::ReplacedWith(_) | CompResult::Removed(_) => {
                    superseded(k, start, ts(), "compute")
                }
                _ => {}
            }
        }
        16 => {
            let _ = c.entry(K::new(k)).and_upsert_with(|e| {
                drop(e);
                hit(Site::Compute);
                new_value(k, "upsert")
            });
            superseded(k, start, ts(), "upsert");
        }
        17 => {
            let r = futures::executor::block_on(c.entry(K::new(k)).and_compute_with_async(|e| {
                let x2 = x;
                let has = e.is_some();
                async move {
                    Pend((x2 % 2) as u32).await;
                    hit(Site::Compute);
                    if x2 % 3 == 0 {
                        Op::Remove
                    } else if has && x2 % 3 == 1 {
                        Op::Nop
                    } else {
                        Op::Put(new_value(k, "compute_async"))
                    }
                }
            }));
            match r {
                CompResult::Inserted(_) | CompResult::ReplacedWith(_) | CompResult::Removed(_) => {
                    superseded(k, start, ts(), "compute_async")
                }
                _ => {}
            }
        }
        18 => {
            let n = 1 + x % 3;
            let keys: Vec<K> = (0..n)
                .map(|i| K::new(((k as u64 + i) % cfg.keys as u64) as u32))
                .collect();
            let got = c.get_all(keys, |missing| {
                hit(Site::Loader);
                let mut m = HashMap::new();
                for (i, kk) in missing.iter().enumerate() {
                    if (x >> i) % 4 != 0 {
                        m.insert(kk.clone(), new_value(kk.0, "get_all"));
                    }
                }
                m
            });
            // Dropped from a `Vec`, which drops its other elements when one's `Drop` panics (a
            // map's drop stops there, leaking the rest: not the cache's doing).
            drop(got.into_iter().collect::<Vec<_>>());
        }
        19 => {
            c.invalidate(&K::new(k));
            superseded(k, start, ts(), "invalidate");
        }
        20 => {
            let v = c.remove(&K::new(k));
            read("remove", &v);
            superseded(k, start, ts(), "remove");
        }
        21 => {
            if x % 4 == 0 {
                c.invalidate_all();
                let end = ts();
                for kk in 0..cfg.keys {
                    superseded(kk, start, end, "invalidate_all");
                }
            }
        }
        22 => {
            if x % 2 == 0 {
                c.retain(|_k, v| {
                    hit(Site::Predicate);
                    (v.id ^ x) % 3 != 0
                });
            } else {
                let _ = c.invalidate_entries_if(|_k, v| {
                    hit(Site::Predicate);
                    (v.id ^ x) % 3 == 0
                });
            }
        }
        23 => {
            for (kk, v) in c.iter() {
                if kk.0 != v.key {
                    violation(format!(
                        "iter yielded key {} with value {} of key {}",
                        kk.0, v.id, v.key
                    ));
                }
            }
        }
        24 | 25 => clock.advance(Duration::from_millis(x % 40)),
        26 => {
            if cfg.loader {
                let _ = c.load(K::new(k));
            }
        }
        27 => {
            if cfg.loader {
                let _ = c.load_with_timeout(K::new(k), Some(Duration::from_millis(1 + x % 5)));
            }
        }
        28 => {
            let _ = c.get_with_if(K::new(k), || closure_value(k, x), |v| (v.id ^ x) % 3 == 0);
        }
        29 => {
            if x % 2 == 0 {
                c.run_pending_tasks();
            } else {
                PLAIN_MAX.fetch_add(1, SeqCst);
                let v = c.get_or_stale(&K::new(k));
                if v.is_none() {
                    PLAIN_MIN.fetch_add(1, SeqCst);
                }
                read("get_or_stale", &v);
            }
        }
        _ => {
            if x % 2 == 0 {
                let _ = c.entry(K::new(k)).or_try_insert_with(|| {
                    let v = closure_value(k, x);
                    if x % 3 == 0 {
                        Err(v.id)
                    } else {
                        Ok(v)
                    }
                });
            } else {
                let _ = c.entry(K::new(k)).or_optionally_insert_with(|| {
                    let v = closure_value(k, x);
                    (x % 3 != 0).then_some(v)
                });
            }
        }
    }
}

fn run_op(
    c: &C,
    clock: &ManualClock,
    cfg: &Cfg,
    r: &mut common::SplitMix,
    stopped: &AtomicBool,
    tid: usize,
    n: usize,
) {
    let res = catch_unwind(AssertUnwindSafe(|| {
        op_scope(|| do_op(c, clock, cfg, r, stopped))
    }));
    CUR_OP.with(|c| c.set(99));
    if let Err(p) = res {
        let msg = common::panic_message(&*p);
        // A shared async load's caller whose `init` went into a load that an injected fault
        // made panic while another caller polled it panics too, as `get_with_async_shared`'s
        // docs say, when nothing else answers it: a consequence of the fault, not a finding.
        let derived = FIRED.load(SeqCst) != 0
            && msg.starts_with("herdcache: the load this call started panicked");
        if !msg.contains("injected") && !derived {
            let mut g = OTHER_PANICS.lock().unwrap_or_else(|e| e.into_inner());
            if g.len() < 20 {
                g.push(format!("thread {tid} op {n}: {msg}"));
            }
        }
        // the payload may itself be a value with a drop hook: drop it disarmed-safe
        let _ = catch_unwind(AssertUnwindSafe(|| drop(p)));
    }
}

// ------------------------------------------------------------------ a round
struct Outcome {
    leak: String,
    skipped: bool,
    drop_fault: bool,
    fired: Site,
}

fn site_of(n: u32) -> Site {
    if n == 0 {
        Site::None
    } else {
        SITES[(n - 1) as usize]
    }
}

fn run_round(seed: u64, serial: bool) -> Result<Outcome, String> {
    let mut r = common::SplitMix(seed);
    let cfg = gen_cfg(&mut r);
    FAULT.store(0, SeqCst);
    FIRED.store(0, SeqCst);
    *PROD.lock().unwrap() = Some(HashMap::new());
    *SUPER.lock().unwrap() = Some(HashMap::new());
    *HEARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    VIOLATIONS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    PLAIN_MIN.store(0, SeqCst);
    PLAIN_MAX.store(0, SeqCst);
    OTHER_PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let base_k = LIVE_K.load(SeqCst);
    let base_v = LIVE_V.load(SeqCst);
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::new(Mutex::new(Vec::new()));
    let Some(cache) = build(&cfg, &clock, &jobs) else {
        return Ok(Outcome {
            leak: String::new(),
            skipped: true,
            drop_fault: false,
            fired: Site::None,
        });
    };
    let fail = |what: String| format!("seed {seed:#x} cfg {cfg:?}\n  FAILURE: {what}");

    LEFT.store(cfg.fault_at, SeqCst);
    FAULT.store(cfg.fault as u32, SeqCst);
    let stopped = AtomicBool::new(false);
    if serial {
        let mut rs: Vec<common::SplitMix> = (0..cfg.threads)
            .map(|t| common::SplitMix(seed ^ (0xA5A5 * (t as u64 + 1))))
            .collect();
        let mut left = cfg.ops.clone();
        let mut n = 0;
        while left.iter().any(|&l| l > 0) {
            for t in 0..cfg.threads {
                if left[t] > 0 {
                    left[t] -= 1;
                    run_op(&cache, &clock, &cfg, &mut rs[t], &stopped, t, n);
                }
            }
            n += 1;
        }
    } else {
        let done = AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(cfg.threads);
        std::thread::scope(|s| {
            for t in 0..cfg.threads {
                let (cache, clock, cfg, done, stopped, barrier) =
                    (&cache, &clock, &cfg, &done, &stopped, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let mut r = common::SplitMix(seed ^ (0xA5A5 * (t as u64 + 1)));
                    for n in 0..cfg.ops[t] {
                        run_op(cache, clock, cfg, &mut r, stopped, t, n);
                    }
                    done.fetch_add(1, SeqCst);
                });
            }
            let until = Instant::now() + Duration::from_secs(30);
            while done.load(SeqCst) < cfg.threads {
                if Instant::now() > until {
                    eprintln!(
                        "{}\nloads:\n{}",
                        fail("a thread hung for 30 s".into()),
                        cache.describe_loads()
                    );
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }
    FAULT.store(0, SeqCst);
    let fired = site_of(FIRED.load(SeqCst));
    let drop_fault = matches!(fired, Site::KeyDrop | Site::ValDrop);
    // spawned jobs
    let join_jobs = |jobs: &Jobs| loop {
        let hs: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
        if hs.is_empty() {
            break;
        }
        for h in hs {
            let _ = h.join();
        }
    };
    join_jobs(&jobs);
    let mut errs: Vec<String> = Vec::new();
    if !common::eventually(|| cache.loads_in_flight() == 0) {
        errs.push(format!(
            "loads left in flight: {}\n{}",
            cache.loads_in_flight(),
            cache.describe_loads()
        ));
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| cache.validate())) {
        errs.push(format!("validate: {}", common::panic_message(&*p)));
    }
    let s = cache.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    let (pmin, pmax) = (PLAIN_MIN.load(SeqCst), PLAIN_MAX.load(SeqCst));
    let right = s.misses + s.refreshes_started;
    if answered + pmin > right
        || answered + pmax < right
        || s.refreshes_started != s.refreshes_succeeded + s.refreshes_failed
    {
        errs.push(format!(
            "misses identity: answered {answered} + plain-read misses {pmin}..={pmax} vs misses+refreshes {right} (misses {} succ {} fail {} aband {} coal {} neg {} rs {} rsucc {} rfail {})",
            s.misses, s.load_successes, s.load_failures, s.loads_abandoned, s.coalesced, s.negative_hits,
            s.refreshes_started, s.refreshes_succeeded, s.refreshes_failed
        ));
    }
    let counts = catch_unwind(AssertUnwindSafe(|| {
        cache.run_pending_tasks();
        join_jobs(&jobs);
        let mut n = 0u64;
        let mut w = 0u64;
        for (_k, v) in cache.iter() {
            n += 1;
            w += if cfg.weigher { v.w as u64 } else { 1 };
        }
        (n, w, cache.entry_count(), cache.weighted_size())
    }));
    match counts {
        Ok((n, w, ec, ws)) => {
            let bad = if cfg.fail_safe.is_some() {
                n > ec || w > ws
            } else {
                n != ec || w != ws
            };
            if bad {
                errs.push(format!(
                    "entry_count {ec} / weighted_size {ws} vs iterated {n} entries of weight {w}"
                ));
            }
            if ws > cfg.cap {
                errs.push(format!("weighted_size {ws} above capacity {}", cfg.cap));
            }
        }
        Err(p) => errs.push(format!(
            "count check panicked: {}",
            common::panic_message(&*p)
        )),
    }
    join_jobs(&jobs);
    drop(cache);
    join_jobs(&jobs);
    let (lk, lv) = (LIVE_K.load(SeqCst) - base_k, LIVE_V.load(SeqCst) - base_v);
    // A leak is a failure even after a panicking `Drop` (stop 51: the cache drops, never
    // leaks, what it made when a later `Drop` panics); `HC69_TOLERATE_DROP_LEAKS=1` counts
    // those apart instead, as the helper's sweep did before the fix.
    let tolerated =
        drop_fault && lk >= 0 && lv >= 0 && std::env::var_os("HC69_TOLERATE_DROP_LEAKS").is_some();
    if (lk != 0 || lv != 0) && !tolerated {
        errs.push(format!(
            "after dropping the cache {lk} keys and {lv} values live (fault fired: {fired:?} in op {})",
            FIRED_OP.load(SeqCst)
        ));
    }
    errs.extend(
        VIOLATIONS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..),
    );
    errs.extend(
        OTHER_PANICS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .map(|p| format!("non-injected panic: {p}")),
    );
    if tolerated && (lk != 0 || lv != 0) {
        // tolerated: a leak after a panicking Drop; rebase
        LIVE_K.fetch_sub(lk, SeqCst);
        LIVE_V.fetch_sub(lv, SeqCst);
    }
    if !errs.is_empty() {
        // rebase the counters for the next round
        LIVE_K.store(base_k, SeqCst);
        LIVE_V.store(base_v, SeqCst);
        return Err(fail(format!(
            "{} (fault {:?} at {}, fired {fired:?})\n    {}",
            if serial { "serial" } else { "threaded" },
            cfg.fault,
            cfg.fault_at,
            errs.join("\n    ")
        )));
    }
    Ok(Outcome {
        leak: format!(
            "{fired:?} in op {} (lk {lk} lv {lv})",
            FIRED_OP.load(SeqCst)
        ),
        skipped: false,
        drop_fault: drop_fault && (lk != 0 || lv != 0),
        fired,
    })
}

static SERIAL: Mutex<()> = Mutex::new(());

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| {
        let v = v.trim();
        if let Some(h) = v.strip_prefix("0x") {
            u64::from_str_radix(h, 16).ok()
        } else {
            v.parse().ok()
        }
    })
}

fn sweep(name: &str, serial: bool) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::quiet_injected_panics();
    let part = common::Part::new(name);
    let secs = part.of(Duration::from_secs(env_u64("HC69_SECS").unwrap_or(10)));
    let first = env_u64("HC69_SEED").unwrap_or_else(|| {
        common::env_or_clock("HC69_SEED_UNSET").wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    eprintln!("{name}: first seed {first:#x}, {secs:?}");
    let until = Instant::now() + secs;
    let (mut rounds, mut skipped, mut leaks) = (0u64, 0u64, 0u64);
    let mut fired: HashMap<String, u64> = HashMap::new();
    let mut leak_kinds: HashMap<String, u64> = HashMap::new();
    let mut failures = Vec::new();
    let mut seed = first;
    while Instant::now() < until {
        let _wd = common::watchdog(Duration::from_secs(120), "zz_helper69 round");
        match run_round(seed, serial) {
            Ok(o) => {
                if o.skipped {
                    skipped += 1;
                } else {
                    rounds += 1;
                    if o.drop_fault {
                        leaks += 1;
                        *leak_kinds.entry(o.leak.clone()).or_insert(0u64) += 1;
                    }
                    *fired.entry(format!("{:?}", o.fired)).or_default() += 1;
                }
            }
            Err(e) => {
                if failures.len() < 8 {
                    eprintln!("{e}");
                }
                failures.push(seed);
                rounds += 1;
            }
        }
        seed = seed.wrapping_add(1);
    }
    eprintln!(
        "{name}: {rounds} rounds ({skipped} configs refused), {} reads checked against the history, {} failed {:x?}; leaks after a Drop panic: {leaks}; faults fired: {fired:?}",
        CHECKED.load(SeqCst),
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    eprintln!("{name}: leaks by fault and op: {leak_kinds:?}");
    assert!(
        failures.is_empty(),
        "{name}: {} failing seeds, first {:x?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}

#[test]
fn concurrent_stress_with_faults() {
    sweep("concurrent_stress_with_faults", false);
}

#[test]
fn serial_interleaved_with_faults() {
    sweep("serial_interleaved_with_faults", true);
}

/// `HC69_REPLAY=<seed> [HC69_SERIAL=1] cargo test ... replay -- --ignored`
#[test]
#[ignore = "a tool: HC69_REPLAY=<seed> replays one round"]
fn replay() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::quiet_injected_panics();
    let seed = env_u64("HC69_REPLAY").expect("HC69_REPLAY=<seed>");
    let serial = std::env::var("HC69_SERIAL").is_ok();
    let tries = env_u64("HC69_TRIES").unwrap_or(1);
    for i in 0..tries {
        if let Err(e) = run_round(seed, serial) {
            panic!("try {i}: {e}");
        }
    }
}

// ------------------------------------------------------------------ reduced reproducers
mod repro {
    use herdcache::Cache;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
    use std::sync::Arc;

    /// A key whose `Drop` panics once armed (its own flag).
    #[derive(Debug)]
    struct BombKey(u32, Arc<AtomicBool>);
    impl Clone for BombKey {
        fn clone(&self) -> Self {
            BombKey(self.0, Arc::new(AtomicBool::new(false)))
        }
    }
    impl PartialEq for BombKey {
        fn eq(&self, o: &Self) -> bool {
            self.0 == o.0
        }
    }
    impl Eq for BombKey {}
    impl std::hash::Hash for BombKey {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            self.0.hash(h)
        }
    }
    impl Drop for BombKey {
        fn drop(&mut self) {
            if self.1.swap(false, SeqCst) && !std::thread::panicking() {
                panic!("injected: key drop");
            }
        }
    }

    /// A value counting its live instances in its own counter.
    #[derive(Debug)]
    struct Val(u64, Arc<AtomicI64>);
    impl Val {
        fn new(x: u64, live: &Arc<AtomicI64>) -> Val {
            live.fetch_add(1, SeqCst);
            Val(x, live.clone())
        }
    }
    impl Clone for Val {
        fn clone(&self) -> Self {
            Val::new(self.0, &self.1)
        }
    }
    impl Drop for Val {
        fn drop(&mut self) {
            self.1.fetch_sub(1, SeqCst);
        }
    }

    /// Found by the sweep ("KeyDrop in op 5": `get_with`): a hit of `get_with` whose key
    /// argument's `Drop` panicked leaked the clone of the value it was about to return
    /// (rust-lang/rust#47949: the key, a local of the call, was dropped after the return value
    /// was built). Fixed in stop 51 (`src/answer.rs`).
    #[test]
    fn h69_get_with_hit_whose_key_drop_panics_leaks_no_value() {
        super::common::quiet_injected_panics();
        let live = Arc::new(AtomicI64::new(0));
        {
            let cache: Cache<BombKey, Val> = Cache::new(10);
            cache.insert(
                BombKey(1, Arc::new(AtomicBool::new(false))),
                Val::new(1, &live),
            );
            let armed = Arc::new(AtomicBool::new(true));
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache.get_with(BombKey(1, armed.clone()), || Val::new(2, &live))
            }));
            assert!(r.is_err(), "the key's Drop panicked in get_with");
        }
        assert_eq!(
            live.load(SeqCst),
            0,
            "values alive after the cache and every result are gone (leak)"
        );
    }

    /// The same through the entry API: `entry(k).or_insert_with` on a hit.
    #[test]
    fn h69_control_or_insert_with_hit_with_a_key_drop_panic() {
        super::common::quiet_injected_panics();
        let live = Arc::new(AtomicI64::new(0));
        {
            let cache: Cache<BombKey, Val> = Cache::new(10);
            cache.insert(
                BombKey(1, Arc::new(AtomicBool::new(false))),
                Val::new(1, &live),
            );
            let armed = Arc::new(AtomicBool::new(true));
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache
                    .entry(BombKey(1, armed.clone()))
                    .or_insert_with(|| Val::new(2, &live))
            }));
            // `or_insert_with` may keep the key in the `Entry` it returns: dropped here.
            let _ = catch_unwind(AssertUnwindSafe(|| drop(r)));
            let _ = catch_unwind(AssertUnwindSafe(|| drop(cache)));
        }
        assert_eq!(
            live.load(SeqCst),
            0,
            "values alive after the cache and every result are gone (leak)"
        );
    }

    /// `get_with` on a miss: the loaded value's clone returned, the key argument dropped.
    #[test]
    fn h69_control_get_with_miss_with_a_key_drop_panic() {
        super::common::quiet_injected_panics();
        let live = Arc::new(AtomicI64::new(0));
        {
            let cache: Cache<BombKey, Val> = Cache::new(10);
            let armed = Arc::new(AtomicBool::new(true));
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache.get_with(BombKey(1, armed.clone()), || Val::new(2, &live))
            }));
            let _ = catch_unwind(AssertUnwindSafe(|| drop(r)));
            let _ = catch_unwind(AssertUnwindSafe(|| drop(cache)));
        }
        assert_eq!(
            live.load(SeqCst),
            0,
            "values alive after the cache and every result are gone (leak)"
        );
    }

    /// A value counting its live instances, whose `Drop` panics once armed (its own flag).
    #[derive(Debug)]
    struct BombVal(u64, Arc<AtomicI64>, Arc<AtomicBool>);
    impl BombVal {
        fn new(x: u64, live: &Arc<AtomicI64>, armed: &Arc<AtomicBool>) -> BombVal {
            live.fetch_add(1, SeqCst);
            BombVal(x, live.clone(), armed.clone())
        }
    }
    impl Clone for BombVal {
        fn clone(&self) -> Self {
            BombVal::new(self.0, &self.1, &Arc::new(AtomicBool::new(false)))
        }
    }
    impl Drop for BombVal {
        fn drop(&mut self) {
            self.1.fetch_sub(1, SeqCst);
            if self.2.swap(false, SeqCst) && !std::thread::panicking() {
                panic!("injected: value drop");
            }
        }
    }

    /// Control (passes): the sweep's "ValDrop in op 16 (lk 1 lv 1)" leak of `and_upsert_with`
    /// was the test's own closure (its `Entry` argument dropped after its return value was
    /// built), not the cache: the replaced value's panicking `Drop` leaks nothing here.
    #[test]
    fn h69_control_upsert_over_a_value_whose_drop_panics() {
        super::common::quiet_injected_panics();
        let live = Arc::new(AtomicI64::new(0));
        let live_k = Arc::new(AtomicI64::new(0));
        {
            let cache: Cache<u32, BombVal> = Cache::new(10);
            let armed = Arc::new(AtomicBool::new(false));
            cache.insert(1, BombVal::new(1, &live, &armed));
            armed.store(true, SeqCst); // the stored value's drop panics
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache
                    .entry(1)
                    .and_upsert_with(|_| BombVal::new(2, &live, &Arc::new(AtomicBool::new(false))))
            }));
            assert!(r.is_err(), "the replaced value's Drop panicked");
            let _ = live_k;
        }
        assert_eq!(
            live.load(SeqCst),
            0,
            "values alive after the cache and every result are gone (leak)"
        );
    }

    /// The same with `and_compute_with` (`Op::Put` over an existing value).
    #[test]
    fn h69_control_compute_put_over_a_value_whose_drop_panics() {
        super::common::quiet_injected_panics();
        let live = Arc::new(AtomicI64::new(0));
        {
            let cache: Cache<u32, BombVal> = Cache::new(10);
            let armed = Arc::new(AtomicBool::new(false));
            cache.insert(1, BombVal::new(1, &live, &armed));
            armed.store(true, SeqCst);
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache.entry(1).and_compute_with(|_| {
                    herdcache::Op::Put(BombVal::new(2, &live, &Arc::new(AtomicBool::new(false))))
                })
            }));
            assert!(r.is_err(), "the replaced value's Drop panicked");
        }
        assert_eq!(
            live.load(SeqCst),
            0,
            "values alive after the cache and every result are gone (leak)"
        );
    }

    /// `insert` over an existing value whose `Drop` panics: nothing is returned, so nothing
    /// should leak (control).
    #[test]
    fn h69_control_insert_over_a_value_whose_drop_panics() {
        super::common::quiet_injected_panics();
        let live = Arc::new(AtomicI64::new(0));
        {
            let cache: Cache<u32, BombVal> = Cache::new(10);
            let armed = Arc::new(AtomicBool::new(false));
            cache.insert(1, BombVal::new(1, &live, &armed));
            armed.store(true, SeqCst);
            let r = catch_unwind(AssertUnwindSafe(|| {
                cache.insert(1, BombVal::new(2, &live, &Arc::new(AtomicBool::new(false))))
            }));
            assert!(r.is_err(), "the replaced value's Drop panicked");
        }
        assert_eq!(
            live.load(SeqCst),
            0,
            "values alive after the cache is gone (leak)"
        );
    }

    /// No hit path leaks the returned value when the key argument's `Drop` panics (the
    /// `get_with` family shares `load_sync`'s hit path, src/load.rs `load_sync`; six of these
    /// seven leaked before stop 51).
    #[test]
    fn h69_hit_paths_with_a_key_drop_panic_leak_no_value() {
        super::common::quiet_injected_panics();
        type Call = Box<dyn Fn(&Cache<BombKey, Val>, BombKey, &Arc<AtomicI64>)>;
        let calls: Vec<(&str, Call)> = vec![
            (
                "get_with",
                Box::new(|c, k, l| drop(c.get_with(k, || Val::new(9, l)))),
            ),
            (
                "try_get_with",
                Box::new(|c, k, l| drop(c.try_get_with(k, || Ok::<_, ()>(Val::new(9, l))))),
            ),
            (
                "optionally_get_with",
                Box::new(|c, k, l| drop(c.optionally_get_with(k, || Some(Val::new(9, l))))),
            ),
            (
                "get_with_if",
                Box::new(|c, k, l| drop(c.get_with_if(k, || Val::new(9, l), |_| false))),
            ),
            (
                "get_with_async",
                Box::new(|c, k, l| {
                    drop(futures::executor::block_on(
                        c.get_with_async(k, async { Val::new(9, l) }),
                    ))
                }),
            ),
            ("load", Box::new(|c, k, _l| drop(c.load(k)))),
            (
                "get_all",
                // Dropped from a `Vec` (a map stops dropping, and leaks its table, when one
                // element's `Drop` panics: not the cache's doing).
                Box::new(|c, k, _l| {
                    drop(
                        c.get_all([k], |_| Default::default())
                            .into_iter()
                            .collect::<Vec<_>>(),
                    )
                }),
            ),
        ];
        let mut leaking = Vec::new();
        for (name, call) in calls {
            let live = Arc::new(AtomicI64::new(0));
            {
                let l2 = live.clone();
                let cache: Cache<BombKey, Val> = Cache::builder()
                    .max_capacity(10)
                    .loader(move |_k: &BombKey| Ok::<_, herdcache::BoxError>(Val::new(8, &l2)))
                    .build();
                cache.insert(
                    BombKey(1, Arc::new(AtomicBool::new(false))),
                    Val::new(1, &live),
                );
                let armed = Arc::new(AtomicBool::new(true));
                let r = catch_unwind(AssertUnwindSafe(|| {
                    call(&cache, BombKey(1, armed.clone()), &live)
                }));
                let _ = catch_unwind(AssertUnwindSafe(|| drop(r)));
                let _ = catch_unwind(AssertUnwindSafe(|| drop(cache)));
            }
            if live.load(SeqCst) != 0 {
                leaking.push(name);
            }
        }
        assert!(
            leaking.is_empty(),
            "hit paths leaking the returned value: {leaking:?}"
        );
    }
}
