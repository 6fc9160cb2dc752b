#![cfg(not(any(loom, shuttle)))]
//! Outside attack (public API only, plus the `validate` / `loads_in_flight` test hooks): user
//! `Drop`s (key, value, error type, a guard captured by `init` closures / futures / loaders)
//! that panic while a load ends and other callers wait for it. One global fault: the N-th
//! drop (after arming) of any armed user object panics; N is swept until a case runs with no
//! fault fired.
//!
//! Leaders: blocking `try_get_with`, `try_get_with_async`, `try_get_with_async_shared`,
//! `load` (inline and on a spawner), `load_async`, cancelled async leaders (borrowing, shared,
//! `and_compute_with_async`), refreshes (spawner, future spawner, inline); each ending with a
//! value, an error or a panic; with and without `negative_ttl`, `fail_safe` (an expired old
//! value kept), `max_concurrent_loads(1)`, a write superseding the load. Waiters: `get_with`,
//! `try_get_with`, `entry().or_insert_with`, `and_compute_with`, `get_with_if`, `get_all`,
//! `get_with_async`, `try_get_with_async`, `get_with_async_shared`, `get_with_if_async`,
//! `and_compute_with_async` (and `load` / `load_async` with a builder loader).
//!
//! After each case, disarmed: every caller returned within the deadline, no load is left in
//! flight, a fresh `get_with` of the key and of another key loads (under
//! `max_concurrent_loads(1)`: the permit came back), `validate()` passes, the statistics'
//! misses and refreshes balance exactly.
//!
//! Findings (stop 41), fixed: no hang, stranded caller, lost permit or unaccounted weight, but
//! three statistics bugs when a value's `Drop` panics — a refresh that stored its value while
//! the value it replaced panicked on drop was counted neither succeeded nor failed; and a miss
//! counted before a rejected copy (`get_with_if`) or a reclaimed expired value was dropped was
//! left unsettled when that drop panicked (the call ended before its load). The tests named
//! for them failed on the code they were written against.
//!
//! Long: every configuration takes about 12 minutes; by default each sweep stops after a time
//! budget, starting at a configuration that rotates between runs (see `Budget`).

mod common;

use common::{quiet_injected_panics, start, watchdog, Started};
use herdcache::{Cache, ManualClock, Op};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
#[allow(unused_imports)]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
#[allow(unused_imports)]
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(5);

static CASE_LOCK: Mutex<()> = Mutex::new(());
static MASK: AtomicU8 = AtomicU8::new(0);
static TARGET: AtomicU64 = AtomicU64::new(0);
static DROPS: AtomicU64 = AtomicU64::new(0);
static FIRED: AtomicBool = AtomicBool::new(false);

const KEY: u8 = 1;
const VAL: u8 = 2;
const ERR: u8 = 4;
const GUARD: u8 = 8;
const ALL: u8 = KEY | VAL | ERR | GUARD;

fn maybe_fire(kind: u8) {
    if std::thread::panicking() || MASK.load(SeqCst) & kind == 0 {
        return;
    }
    let t = TARGET.load(SeqCst);
    if t != 0 && DROPS.fetch_add(1, SeqCst) + 1 == t {
        FIRED.store(true, SeqCst);
        if std::env::var_os("S55_BT").is_some() {
            eprintln!(
                "injecting drop {t} of kind {kind}:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
        }
        panic!("injected: drop of kind {kind}");
    }
}

fn arm(mask: u8, n: u64) {
    DROPS.store(0, SeqCst);
    FIRED.store(false, SeqCst);
    TARGET.store(n, SeqCst);
    MASK.store(mask, SeqCst);
}

fn disarm() {
    TARGET.store(0, SeqCst);
    MASK.store(0, SeqCst);
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PKey(u32);
impl Hash for PKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}
impl Drop for PKey {
    fn drop(&mut self) {
        if self.0 == 7 {
            maybe_fire(KEY);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PVal(u64);
impl Drop for PVal {
    fn drop(&mut self) {
        maybe_fire(VAL);
    }
}

#[derive(Debug)]
struct PErr(#[allow(dead_code)] u32);
impl Drop for PErr {
    fn drop(&mut self) {
        maybe_fire(ERR);
    }
}
impl std::fmt::Display for PErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "perr")
    }
}
impl std::error::Error for PErr {}

/// Captured by `init` closures / futures.
struct Guard;
impl Drop for Guard {
    fn drop(&mut self) {
        maybe_fire(GUARD);
    }
}

type C = Cache<PKey, PVal>;

#[derive(Clone, Copy, Debug)]
enum Ends {
    Value,
    Error,
    Panic,
}

#[derive(Clone, Copy, Debug, Default)]
struct Cfg {
    negative: bool,
    fail_safe: bool,
    limit: bool,
    supersede: bool,
}

fn build(cfg: Cfg) -> (C, ManualClock) {
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone());
    if cfg.negative {
        b = b.negative_ttl(Duration::from_secs(3600));
    }
    if cfg.fail_safe {
        b = b.fail_safe(Duration::from_secs(3600));
    }
    if cfg.limit {
        b = b.max_concurrent_loads(1);
    }
    let cache: C = b.build();
    // An old value, expired (kept for fail-safe when on).
    cache.insert(PKey(7), PVal(1));
    clock.advance(Duration::from_secs(20));
    (cache, clock)
}

/// After a case: disarmed, nothing in flight, the key loads afresh, the cache is consistent.
fn after(cache: &C, what: &str) {
    disarm();
    for _ in 0..500 {
        if cache.loads_in_flight() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "{what}: a load left in flight: {}",
        cache.describe_loads()
    );
    cache.invalidate(&PKey(7));
    let c = cache.clone();
    let v = start(move || c.get_with(PKey(7), || PVal(4242)).0)
        .wait(DEADLINE)
        .unwrap_or_else(|| panic!("{what}: a fresh load of the key hangs"))
        .unwrap_or_else(|_| panic!("{what}: a fresh load of the key panicked"));
    assert_eq!(v, 4242, "{what}");
    // Another key too (a permit that never came back blocks every load).
    let c = cache.clone();
    let v = start(move || c.get_with(PKey(8), || PVal(88)).0)
        .wait(DEADLINE)
        .unwrap_or_else(|| panic!("{what}: a fresh load of another key hangs"))
        .unwrap_or_else(|_| panic!("{what}: a fresh load of another key panicked"));
    assert_eq!(v, 88, "{what}");
    cache.validate();
    // A spawned refresh counts its end once its store returns, after its callers were woken
    // and its flight left the registry: give it a moment.
    common::eventually(|| {
        let s = cache.stats();
        s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed
    });
    let s = cache.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    // Balanced: every miss ends as a load, a join or a negative hit (a refresh's load too).
    assert_eq!(
        answered,
        s.misses + s.refreshes_started,
        "{what}: misses and their ends do not balance: {s:?}"
    );
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{what}: refreshes do not balance: {s:?}"
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

type Res = Option<u64>;

/// Blocking waiters of every kind; each returns `Some(value)`, `None` (an error), or panics.
fn blocking_waiters(cache: &C) -> Vec<(&'static str, Started<Res>)> {
    let mut v: Vec<(&'static str, Started<Res>)> = Vec::new();
    let c = cache.clone();
    v.push((
        "get_with",
        start(move || {
            let g = Guard;
            Some(
                c.get_with(PKey(7), move || {
                    drop(g);
                    PVal(71)
                })
                .0,
            )
        }),
    ));
    let c = cache.clone();
    v.push((
        "try_get_with",
        start(move || {
            let g = Guard;
            c.try_get_with(PKey(7), move || {
                drop(g);
                Ok::<_, PErr>(PVal(72))
            })
            .ok()
            .map(|v| v.0)
        }),
    ));
    let c = cache.clone();
    v.push((
        "or_insert_with",
        start(move || Some(c.entry(PKey(7)).or_insert_with(|| PVal(73)).into_value().0)),
    ));
    let c = cache.clone();
    v.push((
        "and_compute_with",
        start(move || {
            let r = c.entry(PKey(7)).and_compute_with(|e| match e {
                Some(e) => Op::Put(PVal(e.value().0 + 1000)),
                None => Op::Put(PVal(74)),
            });
            drop(r);
            Some(0)
        }),
    ));
    let c = cache.clone();
    v.push((
        "get_with_if",
        start(move || {
            let g = Guard;
            Some(
                c.get_with_if(
                    PKey(7),
                    move || {
                        drop(g);
                        PVal(76)
                    },
                    |v| v.0 == 1,
                )
                .0,
            )
        }),
    ));
    let c = cache.clone();
    v.push((
        "get_all",
        start(move || {
            let m = c.get_all([PKey(7)], |ks| {
                ks.iter().map(|k| (k.clone(), PVal(75))).collect()
            });
            Some(m.len() as u64)
        }),
    ));
    v
}

type Task = tokio::task::JoinHandle<Res>;

fn async_waiters(cache: &C, rt: &tokio::runtime::Runtime) -> Vec<(&'static str, Task)> {
    let mut v: Vec<(&'static str, Task)> = Vec::new();
    let c = cache.clone();
    v.push((
        "get_with_async",
        rt.spawn(async move {
            let g = Guard;
            Some(
                c.get_with_async(PKey(7), async move {
                    drop(g);
                    PVal(81)
                })
                .await
                .0,
            )
        }),
    ));
    let c = cache.clone();
    v.push((
        "try_get_with_async",
        rt.spawn(async move {
            let g = Guard;
            c.try_get_with_async(PKey(7), async move {
                drop(g);
                Ok::<_, PErr>(PVal(82))
            })
            .await
            .ok()
            .map(|v| v.0)
        }),
    ));
    let c = cache.clone();
    v.push((
        "get_with_async_shared",
        rt.spawn(async move {
            let g = Guard;
            Some(
                c.get_with_async_shared(PKey(7), async move {
                    drop(g);
                    PVal(83)
                })
                .await
                .0,
            )
        }),
    ));
    let c = cache.clone();
    v.push((
        "get_with_if_async",
        rt.spawn(async move {
            let g = Guard;
            Some(
                c.get_with_if_async(
                    PKey(7),
                    async move {
                        drop(g);
                        PVal(85)
                    },
                    |v| v.0 == 1,
                )
                .await
                .0,
            )
        }),
    ));
    let c = cache.clone();
    v.push((
        "and_compute_with_async",
        rt.spawn(async move {
            let r = c
                .entry(PKey(7))
                .and_compute_with_async(|e| {
                    let n = e.map_or(84, |e| e.value().0 + 2000);
                    async move { Op::Put(PVal(n)) }
                })
                .await;
            drop(r);
            Some(0)
        }),
    ));
    v
}

fn wait_all(
    what: &str,
    b: Vec<(&'static str, Started<Res>)>,
    a: Vec<(&'static str, Task)>,
    rt: &tokio::runtime::Runtime,
) -> String {
    // How each caller ended, for a failure's message: a value, `-` (an error), or `panic`.
    let mut ends = Vec::new();
    let show = |r: Option<Res>| match r {
        Some(Some(v)) => v.to_string(),
        Some(None) => "-".to_string(),
        None => "panic".to_string(),
    };
    for (name, s) in b {
        let r = s.wait(DEADLINE);
        assert!(r.is_some(), "{what}: blocking waiter {name} hangs");
        ends.push(format!("{name} {}", show(r.and_then(Result::ok))));
    }
    for (name, t) in a {
        let r = rt.block_on(async { tokio::time::timeout(DEADLINE, t).await });
        assert!(r.is_ok(), "{what}: async waiter {name} hangs");
        ends.push(format!("{name} {}", show(r.ok().and_then(Result::ok))));
    }
    ends.join(", ")
}

/// A blocking leader (`try_get_with`) held until the waiters joined, ending as `ends`.
fn sync_leader_case(ends: Ends, cfg: Cfg, mask: u8, n: u64, rt: &tokio::runtime::Runtime) -> bool {
    let what = format!("sync leader {ends:?}, {cfg:?}, mask {mask}, drop {n} panics");
    let (cache, _clock) = build(cfg);
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (in_tx, in_rx) = std::sync::mpsc::channel::<()>();
    let c = cache.clone();
    let leader = start(move || {
        let g = Guard;
        catch_unwind(AssertUnwindSafe(|| {
            c.try_get_with(PKey(7), move || {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                let _g = g;
                match ends {
                    Ends::Value => Ok(PVal(70)),
                    Ends::Error => Err(PErr(1)),
                    Ends::Panic => panic!("injected: loader"),
                }
            })
            .map(|v| v.0)
            .map_err(drop)
        }))
        .map(|r| r.ok())
    });
    in_rx.recv().unwrap();
    let b = blocking_waiters(&cache);
    let a = async_waiters(&cache, rt);
    std::thread::sleep(Duration::from_millis(30));
    arm(mask, n);
    if cfg.supersede {
        let c = cache.clone();
        let _ = start(move || c.insert(PKey(7), PVal(99))).wait(DEADLINE);
    }
    go_tx.send(()).unwrap();
    assert!(leader.wait(DEADLINE).is_some(), "{what}: the leader hangs");
    let ends = wait_all(&what, b, a, rt);
    let fired = FIRED.load(SeqCst);
    after(&cache, &format!("{what} (callers: {ends})"));
    drop(cache);
    fired
}

#[allow(dead_code)]
fn sweep(what: &str, mut case: impl FnMut(u64) -> bool) {
    let mut n = 1;
    while case(n) {
        n += 1;
        assert!(n < 400, "{what}: the sweep does not end");
    }
    assert!(n > 1, "{what}: no drop fired (the sweep tests nothing)");
}

/// Bounds a sweep's time: by default each sweep test stops starting configurations after
/// `S55_BUDGET` seconds (8, an N-th of it under `HERDCACHE_TEST_PART=N`), beginning at a configuration that rotates from run to run
/// (`S55_START`, else the clock's seconds; printed), so that runs together cover them all;
/// `S55_ALL=1` runs every configuration (about 12 minutes for the file).
struct Budget {
    start: std::time::Instant,
    limit: Option<Duration>,
    /// Under `HERDCACHE_TEST_PART=N`, each sweep takes an N-th of its (configuration, ends,
    /// mask) cases too (a configuration's cases take longer than the budget).
    part: common::Part,
    case: std::cell::Cell<u64>,
}

impl Budget {
    fn new() -> Self {
        let part = common::Part::new("s55 cases");
        let limit = std::env::var_os("S55_ALL").is_none().then(|| {
            std::env::var("S55_BUDGET")
                .ok()
                .and_then(|b| b.parse().ok())
                .map_or(part.of(Duration::from_secs(8)), Duration::from_secs)
        });
        Budget {
            start: std::time::Instant::now(),
            limit,
            part,
            case: std::cell::Cell::new(0),
        }
    }

    /// Whether this run takes the next case (see `part`).
    /// Called for the cases a sweep would run, after its own filters, so each run takes an
    /// N-th of those.
    fn take(&self) -> bool {
        self.case.set(self.case.get() + 1);
        self.limit.is_none() || self.part.take(self.case.get())
    }

    fn over(&self) -> bool {
        self.limit.is_some_and(|l| self.start.elapsed() > l)
    }
}

/// `v`, rotated to begin at the run's starting configuration (see [`Budget`]).
fn rotated<T: std::fmt::Debug>(mut v: Vec<T>, what: &str) -> Vec<T> {
    let start = common::env_or_clock("S55_START") as usize;
    if std::env::var_os("S55_ALL").is_none() && !v.is_empty() {
        let k = start % v.len();
        eprintln!("{what}: configurations from S55_START={k} on (S55_ALL=1: all)");
        v.rotate_left(k);
    }
    v
}

fn cfgs() -> Vec<Cfg> {
    let mut v = Vec::new();
    for negative in [false, true] {
        for fail_safe in [false, true] {
            for limit in [false, true] {
                for supersede in [false, true] {
                    v.push(Cfg {
                        negative,
                        fail_safe,
                        limit,
                        supersede,
                    });
                }
            }
        }
    }
    v
}

#[test]
fn drops_panic_while_callers_wait_for_a_sync_load() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(1200), "attack_s55 sync leader");
    quiet_injected_panics();
    let rt = rt();
    let only = std::env::var("S55_MASK")
        .ok()
        .and_then(|m| m.parse::<u8>().ok());
    let budget = Budget::new();
    for cfg in rotated(cfgs(), "sync leader") {
        if budget.over() {
            break;
        }
        for ends in [Ends::Value, Ends::Error, Ends::Panic] {
            for mask in [ERR, VAL, GUARD, ALL] {
                if only.is_some_and(|o| o != mask) {
                    continue;
                }
                if mask == ERR && !matches!(ends, Ends::Error) {
                    continue;
                }
                if !budget.take() {
                    continue;
                }
                let what = format!("sync {ends:?} {cfg:?} mask {mask}");
                let mut n = 1;
                while sync_leader_case(ends, cfg, mask, n, &rt) {
                    n += 1;
                    assert!(n < 400, "{what}: the sweep does not end");
                }
                let _ = &what;
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Leader {
    /// `try_get_with_async` (borrowing, drives its own future).
    Async,
    /// `try_get_with_async_shared`.
    Shared,
    /// `load` with the builder's loader.
    Load,
    /// `load` with the builder's loader, a spawner and a soft timeout (the spawned job loads).
    LoadSpawned,
    /// `load_async` with the builder's async loader.
    LoadAsync,
}

/// The gate a leader waits at: set `in`, wait for `go`.
#[derive(Clone, Default)]
struct Gate2 {
    inside: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
    /// Set after the case: the loader answers at once with 5555.
    plain: Arc<AtomicBool>,
}

impl Gate2 {
    fn wait_blocking(&self) {
        self.inside.store(true, SeqCst);
        while !self.go.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    /// Polled by a waiter that is not on the tokio runtime (the blocking `load_async` waiter
    /// drives the shared load when it is woken first), `sleep` panics ("no reactor running"):
    /// the loader panics while another caller polls it, a case the sweep keeps on purpose
    /// (stop 48's CI run printed it; `tests/attack_s66.rs` makes it happen every time).
    async fn wait_async(&self) {
        self.inside.store(true, SeqCst);
        while !self.go.load(SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    fn until_inside(&self) -> bool {
        common::eventually(|| self.inside.load(SeqCst))
    }
}

fn end_with(ends: Ends, g: Guard) -> Result<PVal, PErr> {
    let _g = g;
    match ends {
        Ends::Value => Ok(PVal(70)),
        Ends::Error => Err(PErr(1)),
        Ends::Panic => panic!("injected: loader"),
    }
}

fn build_loading(cfg: Cfg, leader: Leader, gate: &Gate2, ends: Ends) -> (C, ManualClock) {
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone());
    if cfg.negative {
        b = b.negative_ttl(Duration::from_secs(3600));
    }
    if cfg.fail_safe {
        b = b.fail_safe(Duration::from_secs(3600));
    }
    if cfg.limit {
        b = b.max_concurrent_loads(1);
    }
    match leader {
        Leader::Load | Leader::LoadSpawned => {
            let g = gate.clone();
            b = b.loader(move |k: &PKey| {
                if k.0 != 7 {
                    return Ok(PVal(u64::from(k.0)));
                }
                if g.plain.load(SeqCst) {
                    return Ok(PVal(5555));
                }
                g.wait_blocking();
                end_with(ends, Guard).map_err(|e| Box::new(e) as herdcache::BoxError)
            });
            if matches!(leader, Leader::LoadSpawned) {
                b = b
                    .spawner(|job| {
                        std::thread::spawn(job);
                    })
                    .load_timeout(Duration::from_secs(30));
            }
        }
        Leader::LoadAsync => {
            let g = gate.clone();
            b = b.async_loader(move |k: &PKey| {
                let g = g.clone();
                let k = k.0;
                let guard = Guard;
                async move {
                    if k != 7 {
                        return Ok(PVal(u64::from(k)));
                    }
                    if g.plain.load(SeqCst) {
                        return Ok(PVal(5555));
                    }
                    g.wait_async().await;
                    end_with(ends, guard).map_err(|e| Box::new(e) as herdcache::BoxError)
                }
            });
        }
        _ => {}
    }
    let cache: C = b.build();
    cache.insert(PKey(7), PVal(1));
    clock.advance(Duration::from_secs(20));
    (cache, clock)
}

fn leader_case(
    leader: Leader,
    ends: Ends,
    cfg: Cfg,
    mask: u8,
    n: u64,
    rt: &tokio::runtime::Runtime,
) -> bool {
    let what = format!("{leader:?} leader {ends:?}, {cfg:?}, mask {mask}, drop {n} panics");
    let gate = Gate2::default();
    let (cache, _clock) = build_loading(cfg, leader, &gate, ends);
    let c = cache.clone();
    let g2 = gate.clone();
    let lead: Task = match leader {
        Leader::Async => rt.spawn(async move {
            let guard = Guard;
            let r = c
                .try_get_with_async(PKey(7), async move {
                    g2.wait_async().await;
                    end_with(ends, guard)
                })
                .await;
            r.ok().map(|v| v.0)
        }),
        Leader::Shared => rt.spawn(async move {
            let guard = Guard;
            let r = c
                .try_get_with_async_shared(PKey(7), async move {
                    g2.wait_async().await;
                    end_with(ends, guard)
                })
                .await;
            r.ok().map(|v| v.0)
        }),
        Leader::Load | Leader::LoadSpawned => {
            rt.spawn_blocking(move || c.load(PKey(7)).ok().map(|v| v.0))
        }
        Leader::LoadAsync => rt.spawn(async move { c.load_async(PKey(7)).await.ok().map(|v| v.0) }),
    };
    assert!(gate.until_inside(), "{what}: the leader never started");
    let mut b = blocking_waiters(&cache);
    let a = async_waiters(&cache, rt);
    if matches!(
        leader,
        Leader::Load | Leader::LoadSpawned | Leader::LoadAsync
    ) {
        let c = cache.clone();
        b.push(("load", start(move || c.load(PKey(7)).ok().map(|v| v.0))));
        let c = cache.clone();
        b.push((
            "load_async",
            start(move || {
                futures::executor::block_on(c.load_async(PKey(7)))
                    .ok()
                    .map(|v| v.0)
            }),
        ));
    }
    std::thread::sleep(Duration::from_millis(30));
    arm(mask, n);
    if cfg.supersede {
        let c = cache.clone();
        let _ = start(move || c.insert(PKey(7), PVal(99))).wait(DEADLINE);
    }
    gate.go.store(true, SeqCst);
    let r = rt.block_on(async { tokio::time::timeout(DEADLINE, lead).await });
    assert!(r.is_ok(), "{what}: the leader hangs");
    let led = format!("{:?}", r.ok().map(|r| r.ok()));
    let ends = wait_all(&what, b, a, rt);
    let fired = FIRED.load(SeqCst);
    after(&cache, &format!("{what} (leader {led}; callers: {ends})"));
    drop(cache);
    fired
}

fn few_cfgs() -> Vec<Cfg> {
    let d = Cfg::default();
    vec![
        d,
        Cfg {
            negative: true,
            ..d
        },
        Cfg {
            fail_safe: true,
            ..d
        },
        Cfg { limit: true, ..d },
        Cfg {
            supersede: true,
            ..d
        },
        Cfg {
            negative: true,
            fail_safe: true,
            limit: true,
            ..d
        },
        Cfg {
            fail_safe: true,
            limit: true,
            supersede: true,
            ..d
        },
    ]
}

fn leader_sweep(leader: Leader) {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(1200), "attack_s55 leader sweep");
    quiet_injected_panics();
    let rt = rt();
    let only = std::env::var("S55_MASK")
        .ok()
        .and_then(|m| m.parse::<u8>().ok());
    let budget = Budget::new();
    for cfg in rotated(few_cfgs(), "leader sweep") {
        if budget.over() {
            break;
        }
        for ends in [Ends::Value, Ends::Error, Ends::Panic] {
            for mask in [ERR, VAL, GUARD, ALL] {
                if only.is_some_and(|o| o != mask) {
                    continue;
                }
                if mask == ERR && !matches!(ends, Ends::Error) {
                    continue;
                }
                if !budget.take() {
                    continue;
                }
                let mut n = 1;
                while leader_case(leader, ends, cfg, mask, n, &rt) {
                    n += 1;
                    assert!(n < 400, "the sweep does not end");
                }
            }
        }
    }
}

#[test]
fn drops_panic_while_callers_wait_for_an_async_load() {
    leader_sweep(Leader::Async);
}

#[test]
fn drops_panic_while_callers_wait_for_a_shared_load() {
    leader_sweep(Leader::Shared);
}

#[test]
fn drops_panic_while_callers_wait_for_a_builder_load() {
    leader_sweep(Leader::Load);
}

#[test]
fn drops_panic_while_callers_wait_for_a_spawned_load() {
    leader_sweep(Leader::LoadSpawned);
}

#[test]
fn drops_panic_while_callers_wait_for_an_async_builder_load() {
    leader_sweep(Leader::LoadAsync);
}

#[derive(Clone, Copy, Debug)]
enum Refresher {
    /// The builder's loader on a thread spawner.
    Spawner,
    /// The builder's async loader on a future spawner (a tokio runtime).
    FutureSpawner,
    /// The builder's loader, no spawner: the read that finds the entry due runs it.
    Inline,
}

fn refresh_case(
    how: Refresher,
    ends: Ends,
    cfg: Cfg,
    mask: u8,
    n: u64,
    rt: &tokio::runtime::Runtime,
) -> bool {
    let what = format!("refresh {how:?} {ends:?}, {cfg:?}, mask {mask}, drop {n} panics");
    let gate = Gate2::default();
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .refresh_after(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone());
    if cfg.negative {
        b = b.negative_ttl(Duration::from_secs(3600));
    }
    if cfg.fail_safe {
        b = b.fail_safe(Duration::from_secs(3600));
    }
    if cfg.limit {
        b = b.max_concurrent_loads(1);
    }
    match how {
        Refresher::Spawner | Refresher::Inline => {
            let g = gate.clone();
            b = b.loader(move |k: &PKey| {
                if k.0 != 7 {
                    return Ok(PVal(u64::from(k.0)));
                }
                if g.plain.load(SeqCst) {
                    return Ok(PVal(5555));
                }
                g.wait_blocking();
                end_with(ends, Guard).map_err(|e| Box::new(e) as herdcache::BoxError)
            });
            if matches!(how, Refresher::Spawner) {
                b = b.spawner(|job| {
                    std::thread::spawn(job);
                });
            }
        }
        Refresher::FutureSpawner => {
            let g = gate.clone();
            b = b.async_loader(move |k: &PKey| {
                let g = g.clone();
                let k = k.0;
                let guard = Guard;
                async move {
                    if k != 7 {
                        return Ok(PVal(u64::from(k)));
                    }
                    if g.plain.load(SeqCst) {
                        return Ok(PVal(5555));
                    }
                    g.wait_async().await;
                    end_with(ends, guard).map_err(|e| Box::new(e) as herdcache::BoxError)
                }
            });
            let h = rt.handle().clone();
            b = b.future_spawner(move |f| {
                h.spawn(f);
            });
        }
    }
    let cache: C = b.build();
    cache.insert(PKey(7), PVal(1));
    clock.advance(Duration::from_secs(6));
    // The read that starts the refresh (inline: it runs it, so on its own thread).
    let c = cache.clone();
    let reader = start(move || c.get(&PKey(7)).map(|v| v.0));
    assert!(gate.until_inside(), "{what}: the refresh never started");
    // The entry expires while its refresh runs: callers join the refresh.
    clock.advance(Duration::from_secs(10));
    let mut b = blocking_waiters(&cache);
    let a = async_waiters(&cache, rt);
    let c = cache.clone();
    b.push(("load", start(move || c.load(PKey(7)).ok().map(|v| v.0))));
    std::thread::sleep(Duration::from_millis(30));
    arm(mask, n);
    if cfg.supersede {
        let c = cache.clone();
        let _ = start(move || c.insert(PKey(7), PVal(99))).wait(DEADLINE);
    }
    gate.go.store(true, SeqCst);
    assert!(reader.wait(DEADLINE).is_some(), "{what}: the reader hangs");
    let ends = wait_all(&what, b, a, rt);
    let fired = FIRED.load(SeqCst);
    after(&cache, &format!("{what} (callers: {ends})"));
    // The key refreshes again (its refresh claim came back).
    gate.plain.store(true, SeqCst);
    clock.advance(Duration::from_secs(6));
    let refreshed = common::eventually(|| {
        let c = cache.clone();
        start(move || c.get(&PKey(7)).map(|v| v.0))
            .wait(DEADLINE)
            .and_then(Result::ok)
            .flatten()
            == Some(5555)
    });
    assert!(refreshed, "{what}: the key is never refreshed again");
    drop(cache);
    fired
}

fn refresh_sweep(how: Refresher) {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(1200), "attack_s55 refresh sweep");
    quiet_injected_panics();
    let rt = rt();
    let only = std::env::var("S55_MASK")
        .ok()
        .and_then(|m| m.parse::<u8>().ok());
    let budget = Budget::new();
    for cfg in rotated(few_cfgs(), "leader sweep") {
        if budget.over() {
            break;
        }
        for ends in [Ends::Value, Ends::Error, Ends::Panic] {
            for mask in [ERR, VAL, KEY, GUARD, ALL] {
                if only.is_some_and(|o| o != mask) {
                    continue;
                }
                if mask == ERR && !matches!(ends, Ends::Error) {
                    continue;
                }
                if !budget.take() {
                    continue;
                }
                let mut n = 1;
                while refresh_case(how, ends, cfg, mask, n, &rt) {
                    n += 1;
                    assert!(n < 400, "the sweep does not end");
                }
            }
        }
    }
}

#[test]
fn drops_panic_while_callers_wait_for_a_spawned_refresh() {
    refresh_sweep(Refresher::Spawner);
}

#[test]
fn drops_panic_while_callers_wait_for_an_async_refresh() {
    refresh_sweep(Refresher::FutureSpawner);
}

#[test]
fn drops_panic_while_callers_wait_for_an_inline_refresh() {
    refresh_sweep(Refresher::Inline);
}

/// A value whose `Drop` panics once, for the value `1`, while `BOMB_ARMED` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bomb(u64);
static BOMB_ARMED: AtomicBool = AtomicBool::new(false);
impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 == 1 && !std::thread::panicking() && BOMB_ARMED.swap(false, SeqCst) {
            panic!("injected: replaced value drop");
        }
    }
}

/// A refresh whose new value replaces an old value whose `Drop` panics: the refresh is counted
/// neither as succeeded nor as failed, though `refreshes_started` is documented as "each ends
/// as one of the next two".
///
/// Where (src/): `Cache::publish_as` (load.rs) stores the value, disarms the lead, resolves the
/// flight, then `drop(out)` drops the replaced value; its panic leaves `publish_stored`, and
/// `publish_refreshed` (refresh.rs) takes it for a store that panicked before the publish: its
/// `Err` branch counts nothing (it leaves `RefreshFailed` to the lead's drop, but the lead was
/// already disarmed) and resets the refresh deadline of the value just stored to the backoff.
fn refresh_replacing_a_panicking_value(async_refresh: bool) {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(60), "attack_s55 refresh stats");
    quiet_injected_panics();
    let rt = rt();
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .refresh_after(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone());
    if async_refresh {
        let h = rt.handle().clone();
        b = b
            .async_loader(|k: &u32| {
                let k = *k;
                async move { Ok::<_, herdcache::BoxError>(Bomb(u64::from(k) * 100)) }
            })
            .future_spawner(move |f| {
                h.spawn(f);
            });
    } else {
        b = b
            .loader(|k: &u32| Ok::<_, herdcache::BoxError>(Bomb(u64::from(*k) * 100)))
            // Runs the job at once, on the reader's thread.
            .spawner(|job| job());
    }
    let cache: Cache<u32, Bomb> = b.build();
    cache.insert(7, Bomb(1));
    clock.advance(Duration::from_secs(6));
    BOMB_ARMED.store(true, SeqCst);
    // Serves the old value, starts the refresh (whose store replaces it).
    let c = cache.clone();
    // The reader's copy is forgotten: the only drop of an old value is the cache's.
    let r = start(move || {
        c.get(&7).map(|v| {
            let x = v.0;
            std::mem::forget(v);
            x
        })
    })
    .wait(DEADLINE);
    assert!(r.is_some(), "the reader hangs");
    assert!(
        // Copies of the old value are forgotten here too: dropped, one would fire the bomb
        // in this thread before the refresh's store does.
        common::eventually(|| cache.get(&7).map(|v| {
            let x = v.0;
            std::mem::forget(v);
            x
        }) == Some(700)),
        "the refresh stored its value"
    );
    // The refresh drops the old value, then counts its end, after its value is visible.
    assert!(
        common::eventually(|| !BOMB_ARMED.load(SeqCst)),
        "the old value's drop never ran (tests nothing)"
    );
    common::eventually(|| {
        let s = cache.stats();
        s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed
    });
    let s = cache.stats();
    assert_eq!(s.refreshes_started, 1);
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "a refresh that started ended neither succeeded nor failed: {s:?}"
    );
    cache.validate();
}

#[test]
fn refresh_whose_replaced_value_drop_panics_is_counted_as_ended() {
    refresh_replacing_a_panicking_value(false);
}

#[test]
fn async_refresh_whose_replaced_value_drop_panics_is_counted_as_ended() {
    refresh_replacing_a_panicking_value(true);
}

#[derive(Clone, Copy, Debug)]
enum Cancelled {
    /// `get_with_async` (borrowing), its `init` pending.
    Borrowing,
    /// `and_compute_with_async`, its closure's future pending.
    Computation,
    /// `get_with_async_shared`, its `init` pending, every async caller gone.
    Shared,
}

/// A future pending for ever, holding a `Guard` (its drop may panic).
async fn pending_with(g: Guard) -> PVal {
    let _g = g;
    std::future::pending::<()>().await;
    PVal(0)
}

fn cancelled_case(
    kind: Cancelled,
    limit: bool,
    mask: u8,
    n: u64,
    rt: &tokio::runtime::Runtime,
) -> bool {
    let what = format!("cancelled {kind:?} leader, limit {limit}, mask {mask}, drop {n} panics");
    let cfg = Cfg {
        limit,
        ..Cfg::default()
    };
    let (cache, _clock) = build(cfg);
    let c = cache.clone();
    let lead: tokio::task::JoinHandle<()> = rt.spawn(async move {
        let g = Guard;
        let limit = Duration::from_millis(100);
        match kind {
            Cancelled::Borrowing => {
                let _ =
                    tokio::time::timeout(limit, c.get_with_async(PKey(7), pending_with(g))).await;
            }
            Cancelled::Computation => {
                let f = c.entry(PKey(7)).and_compute_with_async(move |_| {
                    let g = g;
                    async move { Op::Put(pending_with(g).await) }
                });
                let _ = tokio::time::timeout(limit, f).await;
            }
            Cancelled::Shared => {
                let _ =
                    tokio::time::timeout(limit, c.get_with_async_shared(PKey(7), pending_with(g)))
                        .await;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    let b = blocking_waiters(&cache);
    let a: Vec<(&'static str, Task)> = if matches!(kind, Cancelled::Shared) {
        // Async callers that give up too: only blocking callers are left.
        let c = cache.clone();
        vec![(
            "get_with_async_shared (gives up)",
            rt.spawn(async move {
                let g = Guard;
                let f = c.get_with_async_shared(PKey(7), pending_with(g));
                tokio::time::timeout(Duration::from_millis(120), f)
                    .await
                    .ok()
                    .map(|v| v.0)
            }),
        )]
    } else {
        async_waiters(&cache, rt)
    };
    std::thread::sleep(Duration::from_millis(20));
    arm(mask, n);
    let r = rt.block_on(async { tokio::time::timeout(DEADLINE, lead).await });
    assert!(r.is_ok(), "{what}: the leader hangs");
    let ends = wait_all(&what, b, a, rt);
    let fired = FIRED.load(SeqCst);
    after(&cache, &format!("{what} (callers: {ends})"));
    drop(cache);
    fired
}

#[test]
fn drops_panic_while_callers_wait_for_a_cancelled_load() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(1200), "attack_s55 cancelled");
    quiet_injected_panics();
    let rt = rt();
    let budget = Budget::new();
    for kind in [
        Cancelled::Borrowing,
        Cancelled::Computation,
        Cancelled::Shared,
    ] {
        for limit in [false, true] {
            if budget.over() {
                break;
            }
            for mask in [GUARD, ALL] {
                if !budget.take() {
                    continue;
                }
                let mut n = 1;
                while cancelled_case(kind, limit, mask, n, &rt) {
                    n += 1;
                    assert!(n < 400, "the sweep does not end");
                }
            }
        }
    }
}

/// A refresh (no waiters) during which the N-th armed drop panics; afterwards the key must
/// refresh again (its refresh claim given back), nothing left in flight.
fn refresh_again_case(
    how: Refresher,
    ends: Ends,
    mask: u8,
    n: u64,
    rt: &tokio::runtime::Runtime,
) -> bool {
    let what = format!("refresh again {how:?} {ends:?}, mask {mask}, drop {n} panics");
    let ran = Arc::new(AtomicU64::new(0));
    let plain = Arc::new(AtomicBool::new(false));
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(1000))
        .refresh_after(Duration::from_secs(5))
        .refresh_backoff(Duration::from_secs(1))
        .clock(clock.clone());
    match how {
        Refresher::Spawner | Refresher::Inline => {
            let (r, p) = (ran.clone(), plain.clone());
            b = b.loader(move |_k: &PKey| {
                if p.load(SeqCst) {
                    return Ok(PVal(5555));
                }
                let out = catch_unwind(AssertUnwindSafe(|| end_with(ends, Guard)));
                r.fetch_add(1, SeqCst);
                match out {
                    Ok(r) => r.map_err(|e| Box::new(e) as herdcache::BoxError),
                    Err(p) => std::panic::resume_unwind(p),
                }
            });
            if matches!(how, Refresher::Spawner) {
                b = b.spawner(|job| {
                    std::thread::spawn(job);
                });
            }
        }
        Refresher::FutureSpawner => {
            let (r, p) = (ran.clone(), plain.clone());
            b = b.async_loader(move |_k: &PKey| {
                let (r, p) = (r.clone(), p.clone());
                let guard = Guard;
                async move {
                    if p.load(SeqCst) {
                        return Ok(PVal(5555));
                    }
                    let out = catch_unwind(AssertUnwindSafe(|| end_with(ends, guard)));
                    r.fetch_add(1, SeqCst);
                    match out {
                        Ok(r) => r.map_err(|e| Box::new(e) as herdcache::BoxError),
                        Err(p) => std::panic::resume_unwind(p),
                    }
                }
            });
            let h = rt.handle().clone();
            b = b.future_spawner(move |f| {
                h.spawn(f);
            });
        }
    }
    let cache: C = b.build();
    cache.insert(PKey(7), PVal(1));
    clock.advance(Duration::from_secs(6));
    arm(mask, n);
    let c = cache.clone();
    let r = start(move || c.get(&PKey(7)).map(|v| v.0)).wait(DEADLINE);
    assert!(r.is_some(), "{what}: the reader hangs");
    assert!(
        common::eventually(|| ran.load(SeqCst) > 0),
        "{what}: the refresh never ran"
    );
    assert!(
        common::eventually(|| cache.loads_in_flight() == 0),
        "{what}: a refresh left in flight: {}",
        cache.describe_loads()
    );
    // Let a spawned job/task finish its drops.
    std::thread::sleep(Duration::from_millis(20));
    let fired = FIRED.load(SeqCst);
    disarm();
    plain.store(true, SeqCst);
    let mut refreshed = false;
    for _ in 0..4 {
        clock.advance(Duration::from_secs(6));
        let c = cache.clone();
        let v = start(move || c.get(&PKey(7)).map(|v| v.0)).wait(DEADLINE);
        assert!(v.is_some(), "{what}: a read hangs");
        if common::eventually(|| cache.get(&PKey(7)).map(|v| v.0) == Some(5555)) {
            refreshed = true;
            break;
        }
    }
    assert!(refreshed, "{what}: the key is never refreshed again");
    cache.validate();
    drop(cache);
    fired
}

#[test]
fn drops_panic_during_a_refresh_and_the_key_refreshes_again() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(1200), "attack_s55 refresh again");
    quiet_injected_panics();
    let rt = rt();
    let budget = Budget::new();
    for how in [
        Refresher::Spawner,
        Refresher::FutureSpawner,
        Refresher::Inline,
    ] {
        for ends in [Ends::Value, Ends::Error, Ends::Panic] {
            if budget.over() {
                break;
            }
            for mask in [KEY, VAL, ERR, GUARD] {
                if mask == ERR && !matches!(ends, Ends::Error) {
                    continue;
                }
                if !budget.take() {
                    continue;
                }
                let mut n = 1;
                while refresh_again_case(how, ends, mask, n, &rt) {
                    n += 1;
                    assert!(n < 400, "the sweep does not end");
                }
                if std::env::var("S55_VERBOSE").is_ok() {
                    eprintln!(
                        "refresh again {how:?} {ends:?} mask {mask}: {} drops swept",
                        n - 1
                    );
                }
            }
        }
    }
}

/// `get_with_if` over a value that `replace_if` rejects: the call counts its miss, then the
/// rejected value's copy is dropped — and if that `Drop` panics, the miss is never classified
/// (no load, no join, no negative hit): `misses` no longer balances, although the statistics
/// document "each miss of a loading call is also counted as exactly one of" those, and every
/// other panic of user code keeps that balance (the call's ledger counts it when unwinding).
///
/// Where (src/): `EntryRef`'s `first_look` (entry.rs): `Some((_, false))` counts the miss
/// (`count_lookup`) before the match's temporary, the rejected copy, is dropped at the end of
/// the `match`; the call's `Settle` ledger, which would classify the miss, is made only after
/// (`load_if` / `load_if_async`).
fn rejected_value_drop_panics(is_async: bool) {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    quiet_injected_panics();
    let cache: Cache<u32, Bomb> = Cache::builder().max_capacity(100).record_stats().build();
    cache.insert(7, Bomb(1));
    BOMB_ARMED.store(true, SeqCst);
    let c = cache.clone();
    let r = catch_unwind(AssertUnwindSafe(move || {
        if is_async {
            futures::executor::block_on(c.get_with_if_async(7, async { Bomb(2) }, |v| v.0 == 1)).0
        } else {
            c.get_with_if(7, || Bomb(2), |v| v.0 == 1).0
        }
    }));
    assert!(
        !BOMB_ARMED.load(SeqCst),
        "the rejected copy was not dropped (tests nothing)"
    );
    BOMB_ARMED.store(false, SeqCst);
    drop(r);
    let s = cache.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    assert_eq!(
        s.misses, answered,
        "a miss counted but never classified as a load, a join or a negative hit: {s:?}"
    );
    // The key still loads.
    assert_eq!(cache.get_with_if(7, || Bomb(3), |v| v.0 == 1).0, 3);
    cache.validate();
}

#[test]
fn get_with_if_whose_rejected_value_drop_panics_counts_nothing_unsettled() {
    rejected_value_drop_panics(false);
}

#[test]
fn get_with_if_async_whose_rejected_value_drop_panics_counts_nothing_unsettled() {
    rejected_value_drop_panics(true);
}

/// `get_with` of a key whose entry expired: the call's lookup counts its miss, then reclaims
/// the expired entry and drops its value — and if that `Drop` panics, the miss is never
/// classified (no load, join or negative hit): `misses` no longer balances.
///
/// Where (src/): `Cache::read_with` (cache/mod.rs) counts `Counter::Miss`, then reclaims the
/// expired entry and `report_removals` drops its value, before it returns: to `load_sync`
/// (load.rs), which makes the call's `Settle` ledger only after; and, for the async and
/// `load` paths, to `Cache::claim` (load.rs), which marks the ledger as owing
/// (`how.class = Class::Owes`) only once `read_with` has returned, so the ledger's drop counts
/// nothing.
fn expired_value_drop_panics(via: u8) {
    let via_load = via == 1;
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    quiet_injected_panics();
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone());
    if via_load {
        b = b.loader(|_k: &u32| Ok::<_, herdcache::BoxError>(Bomb(2)));
    }
    let cache: Cache<u32, Bomb> = b.build();
    cache.insert(7, Bomb(1));
    clock.advance(Duration::from_secs(20));
    BOMB_ARMED.store(true, SeqCst);
    let c = cache.clone();
    let r = catch_unwind(AssertUnwindSafe(move || match via {
        1 => c.load(7).map(|v| v.0).ok(),
        2 => Some(futures::executor::block_on(c.get_with_async(7, async { Bomb(2) })).0),
        _ => Some(c.get_with(7, || Bomb(2)).0),
    }));
    assert!(
        !BOMB_ARMED.load(SeqCst),
        "the expired value was not dropped (tests nothing)"
    );
    BOMB_ARMED.store(false, SeqCst);
    drop(r);
    let s = cache.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    assert_eq!(
        s.misses, answered,
        "a miss counted but never classified as a load, a join or a negative hit: {s:?}"
    );
    assert_eq!(cache.get_with(7, || Bomb(3)).0, 3);
    cache.validate();
}

#[test]
fn get_with_whose_expired_value_drop_panics_counts_nothing_unsettled() {
    expired_value_drop_panics(0);
}

#[test]
fn load_whose_expired_value_drop_panics_counts_nothing_unsettled() {
    expired_value_drop_panics(1);
}

#[test]
fn get_with_async_whose_expired_value_drop_panics_counts_nothing_unsettled() {
    expired_value_drop_panics(2);
}
