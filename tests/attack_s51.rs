#![cfg(not(any(loom, shuttle)))]
//! Outside attack on feature COMBINATIONS (public API only, plus the `validate` test hook).
//!
//! A seeded random driver (splitmix64; the seed and the configuration are printed on failure)
//! builds caches with a random subset of: weigher, small capacity, time to live / idle, an
//! `Expiry`, refresh_after + jitter, fail_safe, negative_ttl, max_concurrent_loads(1|2), soft
//! timeouts, a listener, a spawner (inline, on a thread, or dropping some jobs), LRU /
//! TinyLFU. 2-4 threads run random public operations on 8 keys while user code (loader,
//! `init`, weigher, Expiry, listener, compute closures, retain predicates) panics with a small
//! probability and a ManualClock advances. After each run it checks: every call returned
//! (watchdog), `validate()`, entry_count / weighted_size against `iter()`, no value older than
//! a write or invalidation that completed before the read started, single flight per key,
//! the `CacheStats` identities at quiescence, and the listener's counts against the stats.
//!
//! Findings (each shrunk into a deterministic test, named `bug_` when found, `s39_` once fixed
//! in stop 39; the driver's statistics check no longer skips the first):
//! * `s39_spawned_load_whose_store_panics_is_loaded_and_counted_twice`: spawner, soft timeout
//!   and a store that panics (weigher / Expiry): the loader runs twice and two loads are
//!   counted for one miss, against the `CacheStats::misses` identity;
//! * `s39_compute_verdict_lost_to_an_insert_that_panicked`: `and_compute_with` + a concurrent
//!   `insert` whose `Expiry` hook panics: the computation reports `ReplacedWith` / `Removed`
//!   but the old value stays;
//! * `s39_load_value_dropped_for_an_insert_that_panicked`: the same cause seen by `get_with`:
//!   its value is not cached after an `insert` that panicked (stored nothing) ran meanwhile.
//!
//! Replay: `S51_SEED=<hex>` one seed; `S51_SEEDS`, `S51_BASE`, `S51_BUDGET` (s) a sweep;
//! `S51_THREADS`, `S51_CFG=<hex seed of a configuration>`, `S51_OFF=weigher,expiry,...`,
//! `S51_SITES=<panic sites>`, `S51_LOG`, `S51_TRACE` to narrow one down.

mod common;

use herdcache::{Cache, CompResult, EvictionPolicy, Expiry, ManualClock, Op, RemovalCause};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const KEYS: u32 = 8;

// ---------------------------------------------------------------------------------------------
// Helpers.

use common::SplitMix as Rng;

thread_local! {
    /// Per key, at the start of this thread's current operation: its write epoch, and whether
    /// no write of it was in progress.
    static SINCE: std::cell::RefCell<Vec<(u64, bool)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Keys whose writes this thread's current operation started.
    static OPEN_WRITES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Whether this thread is in a plain `get`.
    static IN_GET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static TRNG: std::cell::RefCell<Rng> = const { std::cell::RefCell::new(Rng(1)) };
}

fn t_chance(per_mille: u64) -> bool {
    TRNG.with(|r| r.borrow_mut().chance(per_mille))
}

/// Aborts the process if `done` is not signalled within `secs`.
fn watchdog(what: String, secs: u64) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            eprintln!("WATCHDOG: {what} did not finish in {secs} s (hang)");
            std::process::abort();
        }
    });
    tx
}

fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.starts_with("planted") {
                prev(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// The value: its key and a version, unique per key, taken from a per-key counter when the
// value is made (a loader takes it when it starts).

#[derive(Clone, Debug, PartialEq)]
struct Val {
    k: u32,
    ver: u64,
    w: u32,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    cap: u64,
    weigher: bool,
    ttl: Option<u64>,
    tti: Option<u64>,
    expiry: bool,
    refresh: Option<u64>,
    jitter: bool,
    fail_safe: bool,
    negative: bool,
    limit: Option<usize>,
    timeout: bool,
    listener: bool,
    spawner: u8, // 0 none, 1 inline, 2 thread, 3 drop some
    lru: bool,
    loader: bool,
    panic_rate: u64, // per mille
    nest: bool,
    threads: usize,
    ops: usize,
}

impl Config {
    fn random(r: &mut Rng) -> Config {
        let mut c = Config {
            cap: [3, 5, 8, 20][r.below(4) as usize],
            weigher: r.chance(400),
            ttl: r.chance(400).then(|| 5 + r.below(20)),
            tti: r.chance(250).then(|| 5 + r.below(20)),
            expiry: r.chance(300),
            refresh: None,
            jitter: r.chance(300),
            fail_safe: r.chance(400),
            negative: r.chance(350),
            limit: r.chance(400).then(|| 1 + r.below(2) as usize),
            timeout: r.chance(300),
            listener: r.chance(600),
            spawner: r.below(4) as u8,
            lru: r.chance(500),
            loader: r.chance(700),
            panic_rate: [0, 10, 40][r.below(3) as usize],
            nest: r.chance(400),
            threads: 2 + r.below(3) as usize,
            ops: 150 + r.below(250) as usize,
        };
        if c.loader && r.chance(500) {
            c.refresh = Some(2 + r.below(10));
        }
        if c.weigher {
            c.cap *= 3;
        }
        c
    }
}

/// One key's loads running: (id, epoch, who).
type InFlight = Mutex<Vec<(u64, u64, &'static str)>>;

#[derive(Default)]
struct Shared {
    next_ver: Vec<AtomicU64>,
    /// Versions below this must never be returned by a read that starts now.
    floor: Vec<AtomicU64>,
    in_flight: Vec<InFlight>,
    /// Bumped at the start and the end of every write or invalidation of the key.
    epoch: Vec<AtomicU64>,
    hist: Mutex<Vec<(u32, String)>>,
    /// Writes of the key in progress.
    active: Vec<AtomicU64>,
    /// The logical clock.
    now: AtomicU64,
    /// Per key: version -> logical time of the value (an insert's end, a load's start).
    times: Mutex<HashMap<(u32, u64), u64>>,
    violations: Mutex<Vec<String>>,
    get_misses: AtomicU64,
    heard: Mutex<HashMap<&'static str, (u64, u64)>>,
    panic_rate: AtomicU64,
    loader_calls: AtomicU64,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            next_ver: (0..KEYS).map(|_| AtomicU64::new(1)).collect(),
            floor: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
            in_flight: (0..KEYS).map(|_| Mutex::new(Vec::new())).collect(),
            epoch: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
            active: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        })
    }
    fn fresh(&self, k: u32) -> Val {
        let ver = self.next_ver[k as usize].fetch_add(1, Ordering::SeqCst);
        Val {
            k,
            ver,
            w: 1 + (ver % 3) as u32,
        }
    }
    fn bad(&self, s: String) {
        if std::env::var("S51_LOG").is_ok() {
            eprintln!("VIOLATION: {s}");
        }
        let mut v = self.violations.lock().unwrap();
        if v.len() < 20 {
            v.push(s);
        }
    }
    fn maybe_panic(&self, what: &str) {
        // A plain `get` that panics can not tell a hit (an inline refresh replaced the value)
        // from a miss (it reclaimed an expired entry): the listener does not panic in one.
        if what == "listener" && IN_GET.with(|g| g.get()) {
            return;
        }
        if let Ok(only) = std::env::var("S51_SITES") {
            if !only.split(',').any(|o| what.starts_with(o)) {
                return;
            }
        }
        if t_chance(self.panic_rate.load(Ordering::Relaxed)) {
            panic!("planted panic in {what}");
        }
    }
    fn trace(&self, k: u32, what: String) {
        if std::env::var("S51_TRACE").is_ok() {
            let t = self.now.load(Ordering::SeqCst);
            let th = format!("{:?}", std::thread::current().id());
            self.hist
                .lock()
                .unwrap()
                .push((k, format!("t{t} {th} {what}")));
        }
    }
    fn tick(&self) -> u64 {
        self.now.fetch_add(1, Ordering::SeqCst) + 1
    }
    /// A write of `k` starts: returns its logical start.
    fn write_start(&self, k: u32) -> u64 {
        self.active[k as usize].fetch_add(1, Ordering::SeqCst);
        self.epoch[k as usize].fetch_add(1, Ordering::SeqCst);
        OPEN_WRITES.with(|o| o.borrow_mut().push(k));
        self.tick()
    }
    /// After each operation (returned or panicked): its writes are no longer in progress.
    fn settle_writes(&self) {
        for k in OPEN_WRITES.with(|o| std::mem::take(&mut *o.borrow_mut())) {
            self.epoch[k as usize].fetch_add(1, Ordering::SeqCst);
            self.active[k as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }
    /// A write of `k` that started at `start` completed.
    fn write_end(&self, k: u32, start: u64) {
        self.floor[k as usize].fetch_max(start, Ordering::SeqCst);
    }
    fn stamp(&self, k: u32, ver: u64, t: u64) {
        self.times.lock().unwrap().insert((k, ver), t);
    }
    /// A load of `k` runs `f`: checks single flight (no other load of `k` started in the
    /// same write epoch is running), and stamps the value with the load's start.
    fn loading(&self, k: u32, who: &'static str, f: impl FnOnce() -> Val) -> Val {
        self.loading_any(k, who, f)
    }
    fn loading_any<T>(&self, k: u32, who: &'static str, f: impl FnOnce() -> T) -> T {
        struct Out<'a>(&'a InFlight, u64);
        impl Drop for Out<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap().retain(|e| e.0 != self.1);
            }
        }
        static ID: AtomicU64 = AtomicU64::new(0);
        let id = ID.fetch_add(1, Ordering::Relaxed);
        // A load that starts while a write of the key is in progress may be superseded by it
        // (and another load start): such loads are not checked. The epoch moves when a write
        // starts and when it ends.
        // Clean: no write of the key in progress or begun since this thread's operation
        // started (its load was claimed after that). Loads on other threads (spawned jobs)
        // have no such bound and are not checked.
        let now_ep = self.epoch[k as usize].load(Ordering::SeqCst);
        let since = SINCE.with(|s| s.borrow().get(k as usize).copied());
        let clean =
            self.active[k as usize].load(Ordering::SeqCst) == 0 && since == Some((now_ep, true));
        let ep = now_ep * 2 + u64::from(!clean);
        {
            let mut l = self.in_flight[k as usize].lock().unwrap();
            if let Some(o) = l.iter().find(|e| clean && e.1 == ep) {
                let o = o.2;
                drop(l);
                self.bad(format!("single flight: a {who} load of key {k} started while a {o} load of it (same write epoch) runs"));
                l = self.in_flight[k as usize].lock().unwrap();
            }
            l.push((id, ep, who));
        }
        let _out = Out(&self.in_flight[k as usize], id);
        self.loader_calls.fetch_add(1, Ordering::Relaxed);
        f()
    }
    /// A loader makes the value of `k`: stamped with the load's start.
    fn load_value(&self, k: u32) -> Val {
        let t = self.tick();
        let v = self.fresh(k);
        self.stamp(k, v.ver, t);
        self.trace(k, format!("load makes ver {}", v.ver));
        v
    }
    fn check_read(&self, op: &str, k: u32, floor: u64, got: &Option<Val>) {
        if let Some(v) = got {
            if v.k != k {
                self.bad(format!("{op}({k}) returned the value of key {}", v.k));
            }
            let t = self.times.lock().unwrap().get(&(k, v.ver)).copied();
            if let Some(t) = t {
                if t < floor {
                    if std::env::var("S51_TRACE").is_ok() {
                        let h = self.hist.lock().unwrap();
                        let mine: Vec<&String> =
                            h.iter().filter(|e| e.0 == k).map(|e| &e.1).collect();
                        eprintln!(
                            "TRACE key {k} ({op} got ver {}):\n{}",
                            v.ver,
                            mine.iter()
                                .rev()
                                .take(60)
                                .rev()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join("\n")
                        );
                    }
                    self.bad(format!(
                        "{op}({k}) returned version {} (made/stored at t{t}) though a write or invalidation that started at t{floor}, after it, completed before this call started",
                        v.ver
                    ));
                }
            }
        }
    }
}

struct Exp {
    sh: Arc<Shared>,
}

impl Expiry<u32, Val> for Exp {
    fn expire_after_create(&self, _k: &u32, v: &Val) -> Option<Duration> {
        self.sh.maybe_panic("expire_after_create");
        match v.ver % 4 {
            0 => None,
            n => Some(Duration::from_secs(3 * n)),
        }
    }
    fn expire_after_read(&self, _k: &u32, v: &Val, rem: Option<Duration>) -> Option<Duration> {
        self.sh.maybe_panic("expire_after_read");
        if v.ver % 5 == 0 {
            Some(Duration::from_secs(4))
        } else {
            rem
        }
    }
    fn expire_after_update(&self, _k: &u32, v: &Val, rem: Option<Duration>) -> Option<Duration> {
        self.sh.maybe_panic("expire_after_update");
        if v.ver % 3 == 0 {
            Some(Duration::from_secs(7))
        } else {
            rem
        }
    }
}

type Handles = Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>;

fn build(
    cfg: &Config,
    sh: &Arc<Shared>,
    clock: &ManualClock,
    handles: &Handles,
    stats: bool,
) -> Cache<u32, Val> {
    let mut b = Cache::builder()
        .max_capacity(cfg.cap)
        .clock(clock.clone())
        .shards(1 + (cfg.cap as usize % 2));
    if stats {
        b = b.record_stats();
    }
    if cfg.weigher {
        let s = Arc::clone(sh);
        b = b.weigher(move |_k: &u32, v: &Val| {
            s.maybe_panic("weigher");
            v.w
        });
    }
    if let Some(t) = cfg.ttl {
        b = b.time_to_live(Duration::from_secs(t));
    }
    if let Some(t) = cfg.tti {
        b = b.time_to_idle(Duration::from_secs(t));
    }
    if cfg.expiry {
        b = b.expire_after(Exp { sh: Arc::clone(sh) });
    }
    if cfg.jitter {
        b = b.jitter(0.3);
    }
    if cfg.fail_safe {
        b = b
            .fail_safe(Duration::from_secs(30))
            .refresh_backoff(Duration::from_secs(2));
    }
    if cfg.negative {
        b = b.negative_ttl(Duration::from_secs(3));
    }
    if let Some(n) = cfg.limit {
        b = b.max_concurrent_loads(n);
    }
    if cfg.timeout {
        b = b.load_timeout(Duration::from_millis(20));
    }
    if cfg.listener {
        let s = Arc::clone(sh);
        b = b.eviction_listener(move |_k, v: &Val, cause| {
            let name = match cause {
                RemovalCause::Expired => "expired",
                RemovalCause::Explicit => "explicit",
                RemovalCause::Replaced => "replaced",
                RemovalCause::Size => "size",
            };
            {
                let mut h = s.heard.lock().unwrap();
                let e = h.entry(name).or_default();
                e.0 += 1;
                e.1 += u64::from(v.w);
            }
            s.maybe_panic("listener");
        });
    }
    match cfg.spawner {
        1 => b = b.spawner(|job| job()),
        2 => {
            let h = Arc::clone(handles);
            b = b.spawner(move |job| {
                let t = std::thread::spawn(job);
                h.lock().unwrap().push(t);
            });
        }
        3 => {
            b = b.spawner(|job| {
                if !t_chance(300) {
                    job();
                }
            })
        }
        _ => {}
    }
    b = b.eviction_policy(if cfg.lru {
        EvictionPolicy::lru()
    } else {
        EvictionPolicy::tiny_lfu()
    });
    if cfg.loader {
        let s = Arc::clone(sh);
        b = b.loader(move |k: &u32| {
            s.loading_any(*k, "loader", || {
                let v = s.load_value(*k);
                s.maybe_panic("loader");
                if t_chance(100) {
                    Err("planted error")
                } else {
                    Ok(v)
                }
            })
        });
        if let Some(r) = cfg.refresh {
            b = b.refresh_after(Duration::from_secs(r));
        }
    }
    b.build()
}

// ---------------------------------------------------------------------------------------------
// The driver.

fn one_thread(
    cache: &Cache<u32, Val>,
    sh: &Arc<Shared>,
    cfg: &Config,
    clock: &ManualClock,
    seed: u64,
) {
    let mut r = Rng(seed);
    TRNG.with(|t| *t.borrow_mut() = Rng(seed ^ 0xABCD));
    for _ in 0..cfg.ops {
        let k = r.below(u64::from(KEYS)) as u32;
        let floor = sh.floor[k as usize].load(Ordering::SeqCst);
        let op = r.below(20);
        sh.trace(k, format!("op {op} starts (floor {floor})"));
        let snap: Vec<(u64, bool)> = (0..KEYS as usize)
            .map(|i| {
                let a = sh.active[i].load(Ordering::SeqCst) == 0;
                (sh.epoch[i].load(Ordering::SeqCst), a)
            })
            .collect();
        SINCE.with(|s| *s.borrow_mut() = snap);
        let res = catch_unwind(AssertUnwindSafe(|| match op {
            0..=2 => {
                IN_GET.with(|g| g.set(true));
                let got = catch_unwind(AssertUnwindSafe(|| cache.get(&k)));
                IN_GET.with(|g| g.set(false));
                let got = got.unwrap_or_else(|p| std::panic::resume_unwind(p));
                if got.is_none() {
                    sh.get_misses.fetch_add(1, Ordering::SeqCst);
                }
                sh.check_read("get", k, floor, &got);
            }
            3 | 4 => {
                let v = sh.fresh(k);
                let ver = v.ver;
                sh.trace(k, format!("insert ver {ver}"));
                let t0 = sh.write_start(k);
                cache.insert(k, v);
                let t1 = sh.tick();
                sh.stamp(k, ver, t1);
                sh.write_end(k, t0);
            }
            5 => {
                let t0 = sh.write_start(k);
                if r.chance(500) {
                    let got = cache.remove(&k);
                    sh.check_read("remove", k, floor, &got);
                } else {
                    cache.invalidate(&k);
                }
                sh.write_end(k, t0);
            }
            6 | 7 => {
                let nest = cfg.nest && r.chance(300) && k + 1 < KEYS;
                let got = cache.get_with(k, || {
                    sh.loading(k, "get_with", || {
                        let v = sh.load_value(k);
                        if nest {
                            let _ = cache.get_with(k + 1, || {
                                sh.loading(k + 1, "nested get_with", || sh.load_value(k + 1))
                            });
                        }
                        sh.maybe_panic("init");
                        v
                    })
                });
                sh.check_read("get_with", k, floor, &Some(got));
            }
            8 => {
                let got = cache.try_get_with(k, || {
                    sh.loading_any(k, "try_get_with", || {
                        let v = sh.load_value(k);
                        sh.maybe_panic("try init");
                        if t_chance(300) {
                            Err("planted error")
                        } else {
                            Ok(v)
                        }
                    })
                });
                sh.check_read("try_get_with", k, floor, &got.ok());
            }
            9 => {
                let got = cache.optionally_get_with(k, || {
                    sh.loading_any(k, "optionally_get_with", || {
                        let v = sh.load_value(k);
                        sh.maybe_panic("opt init");
                        (!t_chance(200)).then_some(v)
                    })
                });
                sh.check_read("optionally_get_with", k, floor, &got);
            }
            10 if cfg.loader => {
                let got = if r.chance(500) {
                    cache.load(k)
                } else {
                    cache.load_with_timeout(k, Some(Duration::from_millis(r.below(5))))
                };
                sh.check_read("load", k, floor, &got.ok());
            }
            11 => {
                let t0 = sh.write_start(k);
                let e0 = sh.epoch[k as usize].load(Ordering::SeqCst);
                let choice = r.below(3);
                let mut put = None;
                let res = cache.entry(k).and_compute_with(|e| {
                    sh.check_read(
                        "compute(entry)",
                        k,
                        floor,
                        &e.as_ref().map(|e| e.value().clone()),
                    );
                    sh.maybe_panic("compute");
                    match choice {
                        0 => {
                            let v = sh.fresh(k);
                            put = Some(v.ver);
                            Op::Put(v)
                        }
                        1 => Op::Remove,
                        _ => Op::Nop,
                    }
                });
                let t1 = sh.tick();
                // A write of the key made while `f` ran wins over the verdict (documented):
                // the verdict then proves nothing.
                let alone = sh.epoch[k as usize].load(Ordering::SeqCst) == e0
                    && sh.active[k as usize].load(Ordering::SeqCst) == 1;
                match res {
                    _ if !alone => {}
                    CompResult::Inserted(_) | CompResult::ReplacedWith(_) => {
                        sh.stamp(k, put.unwrap(), t1);
                        sh.write_end(k, t0);
                    }
                    CompResult::Removed(_) => sh.write_end(k, t0),
                    // Nothing written: the epoch moves (the computation took the key over).
                    _ => {
                        sh.epoch[k as usize].fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            12 => {
                let keys: Vec<u32> = (0..3).map(|_| r.below(u64::from(KEYS)) as u32).collect();
                let floors: Vec<u64> = keys
                    .iter()
                    .map(|&k| sh.floor[k as usize].load(Ordering::SeqCst))
                    .collect();
                let got = cache.get_all(keys.clone(), |missing| {
                    let mut out = HashMap::new();
                    for &m in missing {
                        // single flight checked per key for the duration of making its value
                        let v = sh.loading(m, "get_all", || sh.load_value(m));
                        out.insert(m, v);
                    }
                    sh.maybe_panic("load_missing");
                    out
                });
                for (i, &kk) in keys.iter().enumerate() {
                    sh.check_read("get_all", kk, floors[i], &got.get(&kk).cloned());
                }
            }
            13 => {
                let cut = r.below(u64::from(KEYS)) as u32;
                let t0s: Vec<u64> = (0..KEYS).map(|k| sh.write_start(k)).collect();
                let mut removed = Vec::new();
                if r.chance(500) {
                    cache.retain(|k, _v| {
                        sh.maybe_panic("retain");
                        let keep = *k < cut;
                        if !keep {
                            removed.push(*k);
                        }
                        keep
                    });
                } else {
                    cache
                        .invalidate_entries_if(|k, _v| {
                            sh.maybe_panic("predicate");
                            let rm = *k >= cut;
                            if rm {
                                removed.push(*k);
                            }
                            rm
                        })
                        .unwrap();
                }
                for k in 0..KEYS {
                    if removed.contains(&k) {
                        sh.write_end(k, t0s[k as usize]);
                    } else {
                        sh.epoch[k as usize].fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            14 => clock.advance(Duration::from_millis(r.below(4000))),
            15 => {
                for (kk, v) in cache.iter() {
                    if kk != v.k {
                        sh.bad(format!("iter: key {kk} holds the value of {}", v.k));
                    }
                }
            }
            16 => {
                let _ = cache.contains_key(&k);
            }
            17 => {
                let got = futures::executor::block_on(cache.get_with_async(k, async {
                    sh.loading(k, "get_with_async", || sh.load_value(k))
                }));
                sh.check_read("get_with_async", k, floor, &Some(got));
            }
            18 => {
                if r.chance(100) {
                    let t0s: Vec<u64> = (0..KEYS).map(|k| sh.write_start(k)).collect();
                    cache.invalidate_all();
                    for kk in 0..KEYS {
                        sh.write_end(kk, t0s[kk as usize]);
                    }
                } else if r.chance(500) {
                    let e = cache.entry(k).or_insert_with(|| {
                        sh.loading(k, "or_insert_with", || {
                            let v = sh.load_value(k);
                            sh.maybe_panic("init or_insert_with");
                            v
                        })
                    });
                    sh.check_read("or_insert_with", k, floor, &Some(e.into_value()));
                } else {
                    let t0 = sh.write_start(k);
                    let e0 = sh.epoch[k as usize].load(Ordering::SeqCst);
                    let e = cache.entry(k).and_upsert_with(|old| {
                        sh.check_read("upsert(entry)", k, floor, &old.map(|e| e.into_value()));
                        sh.maybe_panic("compute upsert");
                        sh.fresh(k)
                    });
                    let t1 = sh.tick();
                    let alone = sh.epoch[k as usize].load(Ordering::SeqCst) == e0
                        && sh.active[k as usize].load(Ordering::SeqCst) == 1;
                    if alone {
                        sh.stamp(k, e.value().ver, t1);
                        sh.write_end(k, t0);
                    }
                }
            }
            _ => cache.run_pending_tasks(),
        }));
        sh.trace(k, format!("op {op} ends panicked={}", res.is_err()));
        sh.settle_writes();
        if std::env::var("S51_LOG").is_ok() {
            let st = cache.stats();
            eprintln!(
                "op {op} key {k} panicked {} | misses {} hits {} ls {} lf {} la {} co {} neg {} rs {} rsu {} rf {} getmiss {}",
                res.is_err(), st.misses, st.hits, st.load_successes, st.load_failures, st.loads_abandoned,
                st.coalesced, st.negative_hits, st.refreshes_started, st.refreshes_succeeded, st.refreshes_failed,
                sh.get_misses.load(Ordering::SeqCst)
            );
        }
        drop(res);
    }
}

fn run_seed(seed: u64, stats: bool) -> Result<(), String> {
    quiet_panics();
    let mut r = Rng(seed);
    let mut cfg = Config::random(&mut r);
    if let Some(c) = std::env::var("S51_CFG")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    {
        cfg = Config::random(&mut Rng(c));
    }
    if let Ok(off) = std::env::var("S51_OFF") {
        for f in off.split(',') {
            match f {
                "weigher" => cfg.weigher = false,
                "expiry" => cfg.expiry = false,
                "jitter" => cfg.jitter = false,
                "fail_safe" => cfg.fail_safe = false,
                "limit" => cfg.limit = None,
                "timeout" => cfg.timeout = false,
                "refresh" => cfg.refresh = None,
                "panic" => cfg.panic_rate = 0,
                "spawner" => cfg.spawner = 0,
                "listener" => cfg.listener = false,
                _ => {}
            }
        }
    }
    if let Some(t) = std::env::var("S51_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        cfg.threads = t;
    }
    let sh = Shared::new();
    sh.panic_rate.store(cfg.panic_rate, Ordering::Relaxed);
    let clock = ManualClock::new();
    let handles: Handles = Arc::default();
    let cache = build(&cfg, &sh, &clock, &handles, stats);
    let dog = watchdog(format!("seed {seed:#x} {cfg:?}"), 60);
    std::thread::scope(|s| {
        for t in 0..cfg.threads {
            let cache = &cache;
            let sh = &sh;
            let cfg = &cfg;
            let clock = &clock;
            let ts = r.next() ^ t as u64;
            s.spawn(move || one_thread(cache, sh, cfg, clock, ts));
        }
    });
    // Quiescence: join the spawner's threads (a job may spawn more).
    loop {
        let hs: Vec<_> = std::mem::take(&mut *handles.lock().unwrap());
        if hs.is_empty() {
            break;
        }
        for h in hs {
            let _ = h.join();
        }
    }
    // No more planted panics from here on.
    sh.panic_rate.store(0, Ordering::Relaxed);
    let mut errs: Vec<String> = sh.violations.lock().unwrap().clone();
    if let Err(e) = catch_unwind(AssertUnwindSafe(|| cache.validate())) {
        let m = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        errs.push(format!("validate failed: {m}"));
    }
    let _ = catch_unwind(AssertUnwindSafe(|| cache.run_pending_tasks()));
    let live: Vec<(u32, Val)> = cache.iter().collect();
    let n = cache.entry_count();
    let w = cache.weighted_size();
    let live_w: u64 = live
        .iter()
        .map(|(_, v)| if cfg.weigher { u64::from(v.w) } else { 1 })
        .sum();
    if cfg.fail_safe {
        if n < live.len() as u64 || w < live_w {
            errs.push(format!(
                "entry_count {n} / weighted_size {w} below iter()'s {} / {live_w}",
                live.len()
            ));
        }
    } else if n != live.len() as u64 || w != live_w {
        errs.push(format!(
            "after run_pending_tasks: entry_count {n} / weighted_size {w}, iter() {} / {live_w}",
            live.len()
        ));
    }
    if w > cfg.cap {
        errs.push(format!("weighted_size {w} above max_capacity {}", cfg.cap));
    }
    if stats {
        let st = cache.stats();
        let get_misses = sh.get_misses.load(Ordering::SeqCst);
        let lhs = st.misses as i128 - get_misses as i128;
        let rhs = st.load_successes as i128
            + st.load_failures as i128
            + st.loads_abandoned as i128
            + st.coalesced as i128
            + st.negative_hits as i128
            - st.refreshes_started as i128;
        if lhs != rhs {
            errs.push(format!(
                "stats: misses {} - plain get misses {get_misses} = {lhs} != loads/joins/negatives - refreshes = {rhs}; {st:?}",
                st.misses
            ));
        }
        if st.refreshes_started != st.refreshes_succeeded + st.refreshes_failed {
            errs.push(format!(
                "stats: refreshes_started {} != succeeded {} + failed {}",
                st.refreshes_started, st.refreshes_succeeded, st.refreshes_failed
            ));
        }
        if st.loads_in_flight != 0 {
            errs.push(format!(
                "stats: loads_in_flight {} at quiescence",
                st.loads_in_flight
            ));
        }
        if let Some(l) = cfg.limit {
            if st.max_concurrent_loads_seen > l as u64 {
                errs.push(format!(
                    "stats: max_concurrent_loads_seen {} above the limit {l}",
                    st.max_concurrent_loads_seen
                ));
            }
        }
        if cfg.listener {
            let h = sh.heard.lock().unwrap().clone();
            for (name, got) in [
                ("expired", st.expired),
                ("explicit", st.explicit),
                ("replaced", st.replaced),
                ("size", st.size),
            ] {
                let heard = h.get(name).copied().unwrap_or_default();
                if heard.0 != got.count {
                    errs.push(format!(
                        "listener heard {} {name} removals, stats count {}",
                        heard.0, got.count
                    ));
                }
            }
        }
    }
    if cache.loads_in_flight() != 0 {
        errs.push(format!(
            "loads_in_flight() {} at quiescence",
            cache.loads_in_flight()
        ));
    }
    drop(cache);
    drop(dog);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("seed {seed:#x} {cfg:?}:\n  {}", errs.join("\n  ")))
    }
}

fn drive(seeds: impl Iterator<Item = u64>, stats: bool, budget: Duration) {
    let start = std::time::Instant::now();
    let mut fails = Vec::new();
    let mut ran = 0;
    for seed in seeds {
        if start.elapsed() > budget {
            break;
        }
        ran += 1;
        if let Err(e) = run_seed(seed, stats) {
            fails.push(e);
        }
    }
    assert!(
        fails.is_empty(),
        "{} of {ran} seeds failed:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

#[test]
fn random_combinations_driver() {
    let extra: Option<u64> = std::env::var("S51_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    if let Some(s) = extra {
        return drive(std::iter::once(s), true, Duration::from_secs(60));
    }
    let n: u64 = std::env::var("S51_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let base: u64 = std::env::var("S51_BASE")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x5151_0000);
    let budget: u64 = std::env::var("S51_BUDGET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    drive((0..n).map(|i| base + i), true, Duration::from_secs(budget));
}

// ---------------------------------------------------------------------------------------------
// Findings, shrunk.

/// `misses == load_successes + load_failures + loads_abandoned + coalesced + negative_hits`
/// (less refreshes) at quiescence, for a cache read only through the loading calls.
fn identity_gap(st: &herdcache::CacheStats) -> i64 {
    st.misses as i64
        - (st.load_successes
            + st.load_failures
            + st.loads_abandoned
            + st.coalesced
            + st.negative_hits) as i64
        + st.refreshes_started as i64
}

/// Found by the driver (seed 0x51510074, 1 thread: `load_with_timeout` with an `Expiry` that
/// panics and an inline spawner). A soft-timeout load handed to the spawner whose job's
/// loader succeeds but whose STORE panics (user code run while publishing: here
/// `Expiry::expire_after_create`; a weigher does the same) is counted as a successful load,
/// and then the caller — seeing its flight end with nothing — runs the loader a second time,
/// counted as a second load for the same single miss.
///
/// `CacheStats::misses` docs: "Each miss of a loading call (the `get_with` family, `load`,
/// ...) is also counted as exactly one of: a load (`load_successes`, `load_failures` or
/// `loads_abandoned`), a join (`coalesced`) or a negative hit (`negative_hits`) ... no count is
/// ever taken back. So in a cache read only through those calls, once every call has
/// returned, `misses == load_successes + load_failures + loads_abandoned + coalesced +
/// negative_hits`". Here: misses 1, load_successes 2 (and the backend is called twice for
/// one call). Without a spawner (or without a timeout) the same store panic reaches the
/// caller and the loader runs once.
///
/// Probable cause: `src/loader.rs`, `Cache::load_spawned`: the job's `cache.publish(..)`
/// panics, the unwind is caught around `spawn(Box::new(job))` (`drop(spawned)`) and the
/// flight ends abandoned; `wait_blocking` then returns `Waited::Abandoned` and the caller
/// "loads here instead" although the job's load already ran and was counted.
#[test]
fn s39_spawned_load_whose_store_panics_is_loaded_and_counted_twice() {
    quiet_panics();
    let dog = watchdog("bug_spawned_load_whose_store_panics".into(), 60);
    for use_weigher in [true, false] {
        let arm = Arc::new(AtomicU64::new(1));
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = Arc::clone(&calls);
        let mut b = Cache::builder()
            .max_capacity(10)
            .record_stats()
            .spawner(|job| job())
            .loader(move |k: &u32| {
                let n = c2.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Val {
                    k: *k,
                    ver: n,
                    w: 1,
                })
            });
        if use_weigher {
            let a = Arc::clone(&arm);
            b = b.weigher(move |_k: &u32, v: &Val| {
                // panics on the first store only
                if a.swap(0, Ordering::SeqCst) == 1 {
                    panic!("planted weigher panic");
                }
                v.w
            });
        } else {
            b = b.expire_after(OnceCreatePanics(Arc::clone(&arm)));
        }
        let cache: Cache<u32, Val> = b.build();
        let r = catch_unwind(AssertUnwindSafe(|| {
            cache.load_with_timeout(1, Some(Duration::from_secs(10)))
        }));
        let st = cache.stats();
        let what = if use_weigher { "weigher" } else { "Expiry" };
        assert_eq!(
            identity_gap(&st),
            0,
            "store panicking in the {what}: one call, misses {} but load_successes {} + \
             load_failures {} + abandoned {} + coalesced {} (loader ran {} times; result {:?})",
            st.misses,
            st.load_successes,
            st.load_failures,
            st.loads_abandoned,
            st.coalesced,
            calls.load(Ordering::SeqCst),
            r.as_ref()
                .map(|r| r.as_ref().map(|v| v.ver).map_err(|e| e.to_string()))
                .map_err(|_| "panicked"),
        );
        cache.validate();
    }
    drop(dog);
}

struct OnceCreatePanics(Arc<AtomicU64>);
impl Expiry<u32, Val> for OnceCreatePanics {
    fn expire_after_create(&self, _k: &u32, _v: &Val) -> Option<Duration> {
        if self.0.swap(0, Ordering::SeqCst) == 1 {
            panic!("planted expire_after_create panic");
        }
        Some(Duration::from_secs(60))
    }
}

#[test]
fn refresh_in_flight_is_joined_when_its_entry_expires() {
    quiet_panics();
    for variant in 0..6 {
        let clock = ManualClock::new();
        let in_refresh = Arc::new(AtomicU64::new(0));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let ir = Arc::clone(&in_refresh);
        let handles: Handles = Arc::default();
        let h2 = Arc::clone(&handles);
        let cache: Cache<u32, Val> = Cache::builder()
            .max_capacity(10)
            .clock(clock.clone())
            .time_to_live(Duration::from_secs(16))
            .refresh_after(Duration::from_secs(3))
            .spawner(move |job| {
                h2.lock().unwrap().push(std::thread::spawn(job));
            })
            .loader(move |k: &u32| {
                ir.fetch_add(1, Ordering::SeqCst);
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
                ir.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, String>(Val {
                    k: *k,
                    ver: 100,
                    w: 1,
                })
            })
            .build();
        cache.insert(1, Val { k: 1, ver: 1, w: 1 });
        clock.advance(Duration::from_secs(4));
        assert_eq!(cache.get(&1).map(|v| v.ver), Some(1)); // starts the refresh
        while in_refresh.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        clock.advance(Duration::from_secs(20)); // expired while refreshing
        if variant >= 3 {
            cache.run_pending_tasks();
        }
        let ran = AtomicU64::new(0);
        let concurrent = AtomicU64::new(0);
        let init = || {
            ran.fetch_add(1, Ordering::SeqCst);
            concurrent.store(in_refresh.load(Ordering::SeqCst), Ordering::SeqCst);
            Val { k: 1, ver: 7, w: 1 }
        };
        let (g, c) = std::thread::scope(|s| {
            let t = s.spawn(|| match variant % 3 {
                0 => cache.get_with(1, init).ver,
                1 => futures::executor::block_on(cache.get_with_async(1, async { init() })).ver,
                _ => cache.optionally_get_with(1, || Some(init())).unwrap().ver,
            });
            std::thread::sleep(Duration::from_millis(100)); // let the caller block on the flight
            let _ = go_tx.send(());
            (t.join().unwrap(), concurrent.load(Ordering::SeqCst))
        });
        for h in std::mem::take(&mut *handles.lock().unwrap()) {
            h.join().unwrap();
        }
        // Single flight across refresh and load: the caller joins the refresh in flight.
        assert_eq!(
            (g, ran.load(Ordering::SeqCst), c),
            (100, 0, 0),
            "variant {variant}: (value, init runs, refresh loaders running during init)"
        );
    }
}

#[test]
fn refresh_in_flight_is_joined_when_its_entry_is_evicted() {
    quiet_panics();
    for variant in 0..6 {
        let clock = ManualClock::new();
        let in_refresh = Arc::new(AtomicU64::new(0));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let ir = Arc::clone(&in_refresh);
        let handles: Handles = Arc::default();
        let h2 = Arc::clone(&handles);
        let cache: Cache<u32, Val> = Cache::builder()
            .max_capacity(3)
            .eviction_policy(EvictionPolicy::lru())
            .clock(clock.clone())
            .time_to_live(Duration::from_secs(16))
            .refresh_after(Duration::from_secs(3))
            .spawner(move |job| {
                h2.lock().unwrap().push(std::thread::spawn(job));
            })
            .loader(move |k: &u32| {
                ir.fetch_add(1, Ordering::SeqCst);
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
                ir.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, String>(Val {
                    k: *k,
                    ver: 100,
                    w: 1,
                })
            })
            .build();
        cache.insert(1, Val { k: 1, ver: 1, w: 1 });
        clock.advance(Duration::from_secs(4));
        assert_eq!(cache.get(&1).map(|v| v.ver), Some(1)); // starts the refresh
        while in_refresh.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        for k in 2..6 {
            cache.insert(k, Val { k, ver: 1, w: 1 });
            let _ = cache.get(&k);
            let _ = cache.get(&k);
        }
        assert!(!cache.contains_key(&1), "evicted by the inserts (LRU)");
        if variant >= 3 {
            cache.run_pending_tasks();
        }
        let ran = AtomicU64::new(0);
        let concurrent = AtomicU64::new(0);
        let init = || {
            ran.fetch_add(1, Ordering::SeqCst);
            concurrent.store(in_refresh.load(Ordering::SeqCst), Ordering::SeqCst);
            Val { k: 1, ver: 7, w: 1 }
        };
        let (g, c) = std::thread::scope(|s| {
            let t = s.spawn(|| match variant % 3 {
                0 => cache.get_with(1, init).ver,
                1 => futures::executor::block_on(cache.get_with_async(1, async { init() })).ver,
                _ => cache.optionally_get_with(1, || Some(init())).unwrap().ver,
            });
            std::thread::sleep(Duration::from_millis(100)); // let the caller block on the flight
            let _ = go_tx.send(());
            (t.join().unwrap(), concurrent.load(Ordering::SeqCst))
        });
        for h in std::mem::take(&mut *handles.lock().unwrap()) {
            h.join().unwrap();
        }
        // Single flight across refresh and load: the caller joins the refresh in flight.
        assert_eq!(
            (g, ran.load(Ordering::SeqCst), c),
            (100, 0, 0),
            "variant {variant}: (value, init runs, refresh loaders running during init)"
        );
    }
}

struct PExp(Arc<AtomicU64>);
impl Expiry<u32, Val> for PExp {
    fn expire_after_create(&self, _k: &u32, _v: &Val) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) & 1 != 0 {
            panic!("planted create");
        }
        Some(Duration::from_secs(60))
    }
    fn expire_after_read(&self, _k: &u32, _v: &Val, rem: Option<Duration>) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) & 2 != 0 {
            panic!("planted read");
        }
        rem
    }
    fn expire_after_update(&self, _k: &u32, _v: &Val, rem: Option<Duration>) -> Option<Duration> {
        if self.0.load(Ordering::SeqCst) & 4 != 0 {
            panic!("planted update");
        }
        rem
    }
}

/// Found by the driver (config of seed 0x7777029a, ground with S51_CFG: an `Expiry` whose
/// `expire_after_update` panics, computations and inserts of one key on several threads; the
/// trace showed a value come back after a computation that reported replacing it).
///
/// `EntryRef::and_compute_with` docs: "Atomically (per key) reads the current entry, lets `f`
/// decide, and applies the decision ... A plain `insert` or `invalidate` of the key while `f`
/// runs wins over the verdict: a `Put` is returned but not stored, a `Remove` leaves the newer
/// value in place." Here the `insert` made while `f` runs PANICS (in
/// `Expiry::expire_after_update`) and stores nothing — the entry keeps its old value, as it
/// should — yet it still cancels the computation's verdict: `and_compute_with` returns
/// `ReplacedWith(new)` (or `Removed(old)`) and afterwards `get` returns the OLD value the
/// closure saw and replaced (removed). There is no newer value that "won"; the computation's
/// write is simply lost while reported as applied.
///
/// Probable cause: `ShardCore::insert` (`src/shard/core.rs`) calls `self.supersede(hash, &key,
/// out)` — detaching the computation's flight — before the `Expiry` hook runs; the hook's
/// panic then leaves the entry unchanged but the flight detached, and `publish_computed` /
/// `remove_computed` (`src/entry.rs`) treat the computation as having lost to a write that
/// never happened.
#[test]
fn s39_compute_verdict_lost_to_an_insert_that_panicked() {
    quiet_panics();
    let dog = watchdog(
        "bug_compute_verdict_lost_to_an_insert_that_panicked".into(),
        60,
    );
    for remove in [false, true] {
        let flag = Arc::new(AtomicU64::new(0));
        let cache: Cache<u32, Val> = Cache::builder()
            .max_capacity(10)
            .expire_after(PExp(Arc::clone(&flag)))
            .build();
        cache.insert(1, Val { k: 1, ver: 8, w: 1 });
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (insert_panicked, result) = std::thread::scope(|s| {
            let c = &cache;
            let t = s.spawn(move || {
                let r = c.entry(1).and_compute_with(|e| {
                    assert_eq!(e.map(|e| e.into_value().ver), Some(8));
                    in_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    if remove {
                        Op::Remove
                    } else {
                        Op::Put(Val {
                            k: 1,
                            ver: 11,
                            w: 1,
                        })
                    }
                });
                match r {
                    CompResult::ReplacedWith(e) => format!("ReplacedWith({})", e.value().ver),
                    CompResult::Removed(e) => format!("Removed({})", e.value().ver),
                    _ => "something else".to_string(),
                }
            });
            in_rx.recv().unwrap();
            // While `f` runs: an insert whose Expiry hook panics (nothing is stored).
            flag.store(4, Ordering::SeqCst);
            let p = catch_unwind(AssertUnwindSafe(|| {
                c.insert(
                    1,
                    Val {
                        k: 1,
                        ver: 10,
                        w: 1,
                    },
                )
            }));
            flag.store(0, Ordering::SeqCst);
            go_tx.send(()).unwrap();
            (p.is_err(), t.join().unwrap())
        });
        assert!(
            insert_panicked,
            "the planted Expiry panic reaches the inserter"
        );
        let now = cache.get(&1).map(|v| v.ver);
        let expected = if remove { None } else { Some(11) };
        cache.validate();
        assert_eq!(
            now, expected,
            "and_compute_with returned {result} while an insert that panicked (and stored \
             nothing) ran; afterwards get returns {now:?}: the old value the closure saw"
        );
    }
    drop(dog);
}

/// The same root cause as `s39_compute_verdict_lost_to_an_insert_that_panicked`, seen by a
/// load: an `insert` of the key made while `get_with`'s `init` runs, whose
/// `Expiry::expire_after_create` panics (it stores nothing), still supersedes the load, so the
/// loaded value is not cached: `get` afterwards finds nothing (and the next caller loads
/// again) although no write of the key ever happened.
///
/// `Cache::get_with` docs: "The value is in the cache (visible to `get`) before any waiter is
/// released ... A write (`insert`, a compute) or invalidation of `key` during the load wins:
/// the load's value still goes to the callers already waiting on it but is not cached". A
/// panicking `insert` is no write (it stored nothing), yet it made the load's value uncached.
///
/// Probable cause: `ShardCore::insert` (`src/shard/core.rs`) supersedes the key's flight
/// before running the `Expiry` hook that panics.
#[test]
fn s39_load_value_dropped_for_an_insert_that_panicked() {
    quiet_panics();
    let dog = watchdog(
        "bug_load_value_dropped_for_an_insert_that_panicked".into(),
        60,
    );
    let flag = Arc::new(AtomicU64::new(0));
    let cache: Cache<u32, Val> = Cache::builder()
        .max_capacity(10)
        .expire_after(PExp(Arc::clone(&flag)))
        .build();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (insert_panicked, got) = std::thread::scope(|s| {
        let c = &cache;
        let t = s.spawn(move || {
            c.get_with(1, || {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Val {
                    k: 1,
                    ver: 11,
                    w: 1,
                }
            })
            .ver
        });
        in_rx.recv().unwrap();
        flag.store(1, Ordering::SeqCst); // expire_after_create panics
        let p = catch_unwind(AssertUnwindSafe(|| {
            c.insert(
                1,
                Val {
                    k: 1,
                    ver: 10,
                    w: 1,
                },
            )
        }));
        flag.store(0, Ordering::SeqCst);
        go_tx.send(()).unwrap();
        (p.is_err(), t.join().unwrap())
    });
    assert!(
        insert_panicked,
        "the planted Expiry panic reaches the inserter"
    );
    assert_eq!(got, 11);
    cache.validate();
    assert_eq!(
        cache.get(&1).map(|v| v.ver),
        Some(11),
        "get_with loaded 11 while an insert that panicked (and stored nothing) ran: the \
         loaded value was not cached"
    );
    drop(dog);
}
