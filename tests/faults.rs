//! Fault-injection sweep (issue 11): every piece of user code the cache calls — the key's
//! `Hash`/`Eq`/`Clone`/`Drop`, the value's `Clone`/`Drop`, the weigher, the three `Expiry` callbacks,
//! the eviction listener, `init` closures (`get_with`, `try_get_with`, `get_all`), the builder's
//! loader and async loader, `init` futures (and their `Drop`), the spawner, the future spawner, `retain` predicates
//! and compute closures — fails at its N-th call: it panics, or, for the spawners, drops the job
//! (or future) without running it. For each kind of fault, N is swept from 1 until a run of the
//! script completes without the fault being injected, in four configurations: with and without
//! `max_concurrent_loads(1)`, refreshes through the (blocking) spawner or the future spawner.
//!
//! The script is a fixed, single-threaded mix of sync and async operations on keys 1–4 (insert,
//! get, get_with, try_get_with, load, load_with_timeout, get_with_async, load_async,
//! and_compute_with(_async), get_all, retain, invalidate, invalidate_all, run_pending_tasks) on a
//! `ManualClock` advanced past `refresh_after` (refreshes run) and past the entries' lifetimes.
//! Spawners run their job inline, so each run is deterministic and every N hits a different call.
//! Each operation runs under `catch_unwind`: the injected panic may surface anywhere.
//!
//! After each case, with the fault disarmed: `validate()` passes; every key of the script answers
//! a fresh `get_with` within a deadline; `loads_in_flight() == 0`; with the limit, a fresh load
//! runs its `init` (the permit came back); after the cache is dropped, no value instance is left
//! alive (one instance may leak under a `Drop` fault: see `run_case`). A case whose script or checks do not finish within the deadline is a hang; its thread
//! is left behind (its hooks are tied to its case number and stay inert).
//!
//! Bounded in time: a sweep of one kind in one configuration stops after
//! `HERDCACHE_FAULT_MAX_HANGS` (default 1) hangs or `HERDCACHE_FAULT_MAX_FAILS` (default 3)
//! failing cases; the test prints every failure found,
//! per sweep, and `fault sweep: N cases in T s`. To investigate one: `HERDCACHE_FAULT_ONLY=Kind:N`
//! sweeps only that kind from call N on; `HERDCACHE_FAULT_BACKTRACE=1` prints where each fault
//! is injected.

#![cfg(not(loom))]

mod common;

use common::{discard, panic_message, quiet_injected_panics, start, watchdog, Bomb, Yield};
use herdcache::{BoxError, Cache, Expiry, ManualClock, Op};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one case's script, or its checks, may take before it counts as a hang.
const DEADLINE: Duration = Duration::from_secs(4);
const SEC: Duration = Duration::from_secs(1);
/// Keys the script uses (and the checks probe).
const KEYS: [u32; 4] = [1, 2, 3, 4];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KeyHash,
    KeyEq,
    KeyClone,
    KeyDrop,
    ValClone,
    ValDrop,
    Weigher,
    ExpiryCreate,
    ExpiryRead,
    ExpiryUpdate,
    Listener,
    Init,
    Loader,
    AsyncInit,
    AsyncLoader,
    FutureDrop,
    Spawner,
    FutureSpawner,
    Retain,
    Compute,
}

const KINDS: [Kind; 20] = [
    Kind::KeyHash,
    Kind::KeyEq,
    Kind::KeyClone,
    Kind::KeyDrop,
    Kind::ValClone,
    Kind::ValDrop,
    Kind::Weigher,
    Kind::ExpiryCreate,
    Kind::ExpiryRead,
    Kind::ExpiryUpdate,
    Kind::Listener,
    Kind::Init,
    Kind::Loader,
    Kind::AsyncInit,
    Kind::AsyncLoader,
    Kind::FutureDrop,
    Kind::Spawner,
    Kind::FutureSpawner,
    Kind::Retain,
    Kind::Compute,
];

// ---------------------------------------------------------------------------------------------
// The fault switch: one armed (case, kind, N) at a time.

static ARMED_CASE: AtomicU64 = AtomicU64::new(0);
static ARMED_KIND: AtomicUsize = AtomicUsize::new(usize::MAX);
static TARGET: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static INJECTED: AtomicBool = AtomicBool::new(false);
/// Whether the injected panic's payload is a [`Bomb`] (its `Drop` panics twice more): the
/// sweep's second pass. A payload the cache catches and does not hand back is dropped by the
/// cache, and a panic of that drop must not escape from where the first was caught.
static BOMBS: AtomicBool = AtomicBool::new(false);
/// With [`BOMBS`]: the panics a scripted operation raised whose payload was not the injected
/// `Bomb(1)` — the panic of a payload's `Drop`, which the cache let escape instead of the
/// user's own panic (or no panic at all).
static ESCAPED: AtomicU64 = AtomicU64::new(0);
/// Cases where one value leaked under a `Drop` fault (tolerated, see `run_case`).
static TOLERATED_LEAKS: AtomicU64 = AtomicU64::new(0);

fn arm(case: u64, kind: Kind, n: u64) {
    CALLS.store(0, SeqCst);
    TARGET.store(n, SeqCst);
    INJECTED.store(false, SeqCst);
    ESCAPED.store(0, SeqCst);
    ARMED_KIND.store(kind as usize, SeqCst);
    ARMED_CASE.store(case, SeqCst);
}

fn disarm() {
    ARMED_CASE.store(0, SeqCst);
}

/// Whether this call of `kind`'s user code (in case `case`) is the one that fails. Calls made
/// while the thread unwinds are neither counted nor failed (a second panic would abort).
fn fires(case: u64, kind: Kind) -> bool {
    if ARMED_CASE.load(SeqCst) != case || ARMED_KIND.load(SeqCst) != kind as usize {
        return false;
    }
    if std::thread::panicking() {
        return false;
    }
    let n = CALLS.fetch_add(1, SeqCst) + 1;
    if n == TARGET.load(SeqCst) {
        INJECTED.store(true, SeqCst);
        if std::env::var_os("HERDCACHE_FAULT_BACKTRACE").is_some() {
            eprintln!(
                "injecting {kind:?} at call {n}:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
        }
        return true;
    }
    false
}

/// User code of `kind` runs: panics if this is the call that fails.
fn hook(case: u64, kind: Kind) {
    if fires(case, kind) {
        if BOMBS.load(SeqCst) {
            std::panic::panic_any(Bomb(1));
        }
        panic!("injected: {kind:?} fault");
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and values whose every trait method is user code with a hook.

/// A key; `case` ties its hooks to the case that made it.
struct K {
    id: u32,
    case: u64,
}

impl K {
    fn new(id: u32, case: u64) -> Self {
        K { id, case }
    }
}

impl fmt::Debug for K {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K({})", self.id)
    }
}

impl Hash for K {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hook(self.case, Kind::KeyHash);
        self.id.hash(h);
    }
}

impl PartialEq for K {
    fn eq(&self, other: &Self) -> bool {
        hook(self.case, Kind::KeyEq);
        self.id == other.id
    }
}

impl Eq for K {}

impl Clone for K {
    fn clone(&self) -> Self {
        hook(self.case, Kind::KeyClone);
        K::new(self.id, self.case)
    }
}

impl Drop for K {
    fn drop(&mut self) {
        hook(self.case, Kind::KeyDrop);
    }
}

/// A value that counts its live instances (per case).
struct V {
    v: u64,
    case: u64,
    live: Arc<AtomicI64>,
}

impl V {
    fn new(v: u64, case: u64, live: &Arc<AtomicI64>) -> Self {
        live.fetch_add(1, SeqCst);
        V {
            v,
            case,
            live: Arc::clone(live),
        }
    }
}

impl fmt::Debug for V {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "V({})", self.v)
    }
}

impl Clone for V {
    fn clone(&self) -> Self {
        hook(self.case, Kind::ValClone);
        V::new(self.v, self.case, &self.live)
    }
}

impl Drop for V {
    fn drop(&mut self) {
        self.live.fetch_sub(1, SeqCst);
        hook(self.case, Kind::ValDrop);
    }
}

/// An `init` future (or an async loader's) whose `Drop` is user code with a hook: it runs
/// when the load ends, or when it is cancelled or given back.
struct DropHook<F> {
    fut: std::pin::Pin<Box<F>>,
    case: u64,
}

fn drop_hook<F: std::future::Future>(case: u64, fut: F) -> DropHook<F> {
    DropHook {
        fut: Box::pin(fut),
        case,
    }
}

impl<F: std::future::Future> std::future::Future for DropHook<F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.fut.as_mut().poll(cx)
    }
}

impl<F> Drop for DropHook<F> {
    fn drop(&mut self) {
        hook(self.case, Kind::FutureDrop);
    }
}

/// Entries live 10 s from creation or update; reads leave the deadline (but are user code).
struct Exp {
    case: u64,
}

impl Expiry<K, V> for Exp {
    fn expire_after_create(&self, _k: &K, _v: &V) -> Option<Duration> {
        hook(self.case, Kind::ExpiryCreate);
        Some(10 * SEC)
    }
    fn expire_after_read(&self, _k: &K, _v: &V, left: Option<Duration>) -> Option<Duration> {
        hook(self.case, Kind::ExpiryRead);
        left
    }
    fn expire_after_update(&self, _k: &K, _v: &V, _left: Option<Duration>) -> Option<Duration> {
        hook(self.case, Kind::ExpiryUpdate);
        Some(10 * SEC)
    }
}

// ---------------------------------------------------------------------------------------------
// One case

#[derive(Clone, Copy, Debug)]
struct Config {
    limit: bool,
    async_refresh: bool,
    /// Fail-safe, negative caching, a time to idle, statistics and the sizing curve, in a
    /// cache of 3 entries (the script's 4 keys evict), with a phase of failing loads of
    /// expired keys.
    stale: bool,
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} refresh{}",
            if self.limit { "limit 1" } else { "no limit" },
            if self.async_refresh { "async" } else { "sync" },
            if self.stale {
                ", fail-safe, 3 entries"
            } else {
                ""
            }
        )
    }
}

fn build(case: u64, cfg: Config, live: &Arc<AtomicI64>, clock: &ManualClock) -> Cache<K, V> {
    let (l1, l2) = (live.clone(), live.clone());
    let mut b = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .weigher(move |_k: &K, _v: &V| {
            hook(case, Kind::Weigher);
            1
        })
        .expire_after(Exp { case })
        .clock(clock.clone())
        .eviction_listener(move |_k, _v, _cause| hook(case, Kind::Listener))
        .loader(move |k: &K| {
            hook(case, Kind::Loader);
            Ok::<_, BoxError>(V::new(100 + u64::from(k.id), case, &l1))
        })
        .async_loader(move |k: &K| {
            let v = V::new(200 + u64::from(k.id), case, &l2);
            drop_hook(case, async move {
                Yield(1).await;
                hook(case, Kind::AsyncLoader);
                Ok::<_, BoxError>(v)
            })
        })
        .spawner(move |job| {
            if !fires(case, Kind::Spawner) {
                job();
            }
        })
        .load_timeout(Duration::from_millis(100))
        .refresh_after(5 * SEC);
    if cfg.limit {
        b = b.max_concurrent_loads(1);
    }
    if cfg.stale {
        b = b
            .max_capacity(3)
            .fail_safe(20 * SEC)
            .refresh_backoff(2 * SEC)
            .negative_ttl(SEC)
            .time_to_idle(8 * SEC)
            .record_stats()
            .track_sizing();
    }
    if cfg.async_refresh {
        b = b.future_spawner(move |f| {
            if !fires(case, Kind::FutureSpawner) {
                futures::executor::block_on(f);
            }
        });
    }
    b.build()
}

/// Runs one operation, ignoring its result and any panic.
fn op<R>(f: impl FnOnce() -> R) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| drop(f()))) {
        if BOMBS.load(SeqCst) && p.downcast_ref::<Bomb>().map(|b| b.0) != Some(1) {
            ESCAPED.fetch_add(1, SeqCst);
        }
        discard(p);
    }
}

/// The scripted mix of operations (single-threaded: deterministic call counts).
fn script(c: &Cache<K, V>, clock: &ManualClock, case: u64, live: &Arc<AtomicI64>, cfg: Config) {
    let k = |id: u32| K::new(id, case);
    let v = |x: u64| V::new(x, case, live);
    op(|| c.insert(k(1), v(1)));
    op(|| c.get(&k(1)));
    op(|| {
        c.get_with(k(2), || {
            hook(case, Kind::Init);
            v(2)
        })
    });
    op(|| {
        c.try_get_with(k(3), || {
            hook(case, Kind::Init);
            Ok::<_, String>(v(3))
        })
    });
    op(|| {
        c.try_get_with(k(4), || {
            hook(case, Kind::Init);
            Err::<V, _>("backend down".to_string())
        })
    });
    op(|| c.load(k(1)));
    op(|| c.invalidate(&k(3)));
    op(|| c.load(k(3))); // through the spawner (a load timeout is set)
    op(|| c.load_with_timeout(k(3), None));
    op(|| c.invalidate(&k(2)));
    op(|| {
        let val = v(22);
        futures::executor::block_on(c.get_with_async(
            k(2),
            drop_hook(case, async move {
                Yield(1).await;
                hook(case, Kind::AsyncInit);
                val
            }),
        ))
    });
    op(|| {
        c.entry(k(1)).and_compute_with(|e| {
            hook(case, Kind::Compute);
            Op::Put(v(e.map_or(0, |e| e.value().v) + 1))
        })
    });
    op(|| {
        c.entry(k(3)).and_compute_with(|_| {
            hook(case, Kind::Compute);
            Op::Remove
        })
    });
    op(|| {
        let val = v(4);
        futures::executor::block_on(c.entry(k(4)).and_compute_with_async(|_| async move {
            Yield(1).await;
            hook(case, Kind::Compute);
            Op::Put(val)
        }))
    });
    op(|| {
        let all = c.get_all([k(1), k(2), k(3)], |missing| {
            hook(case, Kind::Init);
            missing
                .iter()
                .map(|m| (K::new(m.id, case), v(u64::from(m.id) + 30)))
                .collect()
        });
        // One by one: a `HashMap` whose element's `Drop` panics leaks the other elements.
        for kv in all {
            drop(kv);
        }
    });
    op(|| {
        c.retain(|k, _v| {
            hook(case, Kind::Retain);
            k.id % 2 == 0 // removes keys 1 and 3
        })
    });
    op(|| c.insert(k(1), v(11)));
    op(|| c.insert(k(3), v(3)));
    op(|| {
        c.get_with_by_ref(&k(2), || {
            hook(case, Kind::Init);
            v(52)
        })
    });
    op(|| {
        c.entry_by_ref(&k(4)).or_insert_with(|| {
            hook(case, Kind::Init);
            v(54)
        })
    });
    op(|| {
        c.get_with_if(
            k(1),
            || {
                hook(case, Kind::Init);
                v(61)
            },
            |old| old.v < 20,
        )
    });
    op(|| {
        c.optionally_get_with(k(3), || {
            hook(case, Kind::Init);
            None
        })
    });
    op(|| {
        c.invalidate_entries_if(|k, _v| {
            hook(case, Kind::Retain);
            k.id == 4
        })
    });
    op(|| c.iter().count());
    more_entry_points(c, case, live);
    // Past refresh_after: reads start refreshes (inline, through either spawner).
    clock.advance(6 * SEC);
    for id in KEYS {
        op(|| c.get(&k(id)));
    }
    for id in KEYS {
        op(|| c.get(&k(id)));
    }
    // Past every entry's lifetime.
    clock.advance(11 * SEC);
    op(|| c.run_pending_tasks());
    op(|| {
        c.get_with(k(1), || {
            hook(case, Kind::Init);
            v(41)
        })
    });
    op(|| futures::executor::block_on(c.load_async(k(2))));
    op(|| {
        let val = v(43);
        futures::executor::block_on(c.get_with_async(k(3), async move {
            hook(case, Kind::AsyncInit);
            val
        }))
    });
    op(|| c.invalidate(&k(1)));
    op(|| c.invalidate_all());
    op(|| c.insert(k(1), v(1)));
    op(|| c.insert(k(2), v(2)));
    op(|| c.get(&k(1)));
    if cfg.stale {
        stale_phase(c, clock, case, live);
    }
}

/// The rest of the loading and entry API, sync and async, once each (keys 1–4 present or
/// not, depending on the faults before).
fn more_entry_points(c: &Cache<K, V>, case: u64, live: &Arc<AtomicI64>) {
    use futures::executor::block_on;
    let k = |id: u32| K::new(id, case);
    let v = |x: u64| V::new(x, case, live);
    let init = |x: u64| {
        hook(case, Kind::Init);
        v(x)
    };
    let async_init = |x: u64| {
        let val = v(x);
        drop_hook(case, async move {
            Yield(1).await;
            hook(case, Kind::AsyncInit);
            val
        })
    };
    op(|| c.remove(&k(4)));
    op(|| c.contains_key(&k(1)));
    op(|| c.entry(k(4)).or_insert(v(80)));
    op(|| {
        c.entry(k(2))
            .or_insert_with_if(|| init(81), |old| old.v > 50)
    });
    op(|| c.entry(k(3)).or_optionally_insert_with(|| Some(init(82))));
    op(|| {
        c.entry(k(4)).or_try_insert_with(|| {
            hook(case, Kind::Init);
            Err::<V, _>(())
        })
    });
    op(|| {
        c.entry(k(1)).and_try_compute_with(|e| {
            hook(case, Kind::Compute);
            Ok::<_, ()>(Op::Put(v(e.map_or(0, |e| e.value().v) + 2)))
        })
    });
    op(|| {
        c.entry(k(2)).and_upsert_with(|e| {
            hook(case, Kind::Compute);
            v(e.map_or(0, |e| e.value().v) + 3)
        })
    });
    op(|| c.try_get_with_by_ref(&k(3), || Ok::<_, ()>(init(83))));
    op(|| c.optionally_get_with_by_ref(&k(4), || Some(init(84))));
    op(|| c.invalidate(&k(1)));
    op(|| block_on(c.get_with_async_shared(k(1), async_init(85))));
    op(|| block_on(c.get_with_by_ref_async(&k(2), async_init(86))));
    op(|| block_on(c.get_with_if_async(k(3), async_init(87), |old| old.v < 1000)));
    op(|| c.invalidate_all());
    op(|| {
        let val = v(88);
        block_on(c.try_get_with_async(k(1), async move {
            Yield(1).await;
            hook(case, Kind::AsyncInit);
            Ok::<_, ()>(val)
        }))
    });
    op(|| {
        let val = v(89);
        block_on(c.optionally_get_with_by_ref_async(&k(2), async move {
            hook(case, Kind::AsyncInit);
            Some(val)
        }))
    });
    op(|| {
        let val = v(90);
        block_on(c.entry(k(3)).or_try_insert_with_async(async move {
            Yield(1).await;
            hook(case, Kind::AsyncInit);
            Ok::<_, ()>(val)
        }))
    });
    op(|| {
        block_on(
            c.entry(k(4))
                .or_insert_with_if_async(async_init(91), |_| true),
        )
    });
    op(|| {
        block_on(c.entry(k(1)).and_try_compute_with_async(|e| {
            let val = v(e.map_or(0, |e| e.value().v) + 4);
            async move {
                Yield(1).await;
                hook(case, Kind::Compute);
                Ok::<_, ()>(Op::Put(val))
            }
        }))
    });
    op(|| {
        block_on(c.entry(k(2)).and_upsert_with_async(|_| {
            let val = v(92);
            async move {
                hook(case, Kind::Compute);
                val
            }
        }))
    });
    op(|| c.health().warnings().len());
    op(|| c.stats().hits);
}

/// Fail-safe's paths: entries kept past their deadline (and evicted first when the cache is
/// full), failing loads of expired keys answered with the last value, a retry after the
/// backoff, `get_or_stale`, the stale window closing.
fn stale_phase(c: &Cache<K, V>, clock: &ManualClock, case: u64, live: &Arc<AtomicI64>) {
    let k = |id: u32| K::new(id, case);
    let v = |x: u64| V::new(x, case, live);
    let down = || {
        hook(case, Kind::Init);
        Err::<V, _>("backend down".to_string())
    };
    for id in KEYS {
        op(|| c.insert(k(id), v(60 + u64::from(id)))); // 4 keys, 3 entries: evictions
    }
    clock.advance(11 * SEC); // past every lifetime: kept for fail-safe
    op(|| c.insert(k(1), v(71))); // the wheel's drain lists the stale entries
    op(|| c.try_get_with(k(2), down));
    op(|| c.get_or_stale(&k(3)));
    op(|| c.try_get_with(k(3), down));
    op(|| c.try_get_with(k(3), down)); // within the backoff: the last value, no load
    op(|| {
        c.get_with(k(4), || {
            hook(case, Kind::Init);
            v(74)
        })
    });
    op(|| c.insert(k(5), v(75))); // full: a stale entry goes first
    clock.advance(3 * SEC); // past the backoff
    op(|| c.load(k(2)));
    op(|| futures::executor::block_on(c.load_async(k(3))));
    op(|| c.invalidate(&k(2)));
    op(|| c.get_or_stale(&k(2)));
    clock.advance(30 * SEC); // past max_stale
    op(|| c.run_pending_tasks());
    op(|| c.get_or_stale(&k(3)));
    op(|| c.try_get_with(k(1), down));
}

/// The checks after a case (fault disarmed); returns the violations.
fn checks(c: &Cache<K, V>, cfg: Config, case: u64, live: &Arc<AtomicI64>) -> Vec<String> {
    let mut bad = Vec::new();
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| c.validate())) {
        bad.push(format!("validate() failed: {}", panic_message(&*p)));
        discard(p);
    }
    let n = c.loads_in_flight();
    if n != 0 {
        bad.push(format!("loads_in_flight() == {n} after the script"));
    }
    for id in KEYS {
        let r = catch_unwind(AssertUnwindSafe(|| {
            c.get_with(K::new(id, case), || V::new(900, case, live))
        }));
        if let Err(p) = r {
            bad.push(format!(
                "a fresh get_with(K({id})) panicked: {}",
                panic_message(&*p)
            ));
            discard(p);
        }
    }
    if cfg.limit {
        let ran = AtomicBool::new(false);
        c.invalidate(&K::new(99, case));
        let r = catch_unwind(AssertUnwindSafe(|| {
            c.get_with(K::new(99, case), || {
                ran.store(true, SeqCst);
                V::new(99, case, live)
            })
        }));
        if r.is_err() || !ran.load(SeqCst) {
            bad.push("a fresh load under the limit did not run".to_string());
        }
    }
    let n = c.loads_in_flight();
    if n != 0 {
        bad.push(format!("loads_in_flight() == {n} after the fresh loads"));
    }
    bad
}

enum Outcome {
    /// The script made fewer than N calls of the kind: the sweep of this kind is complete.
    NotInjected,
    Passed,
    /// Violations, and whether the fault was injected at all in this run.
    Failed(Vec<String>, bool),
    Hung(String),
}

fn run_case(case: u64, kind: Kind, n: u64, cfg: Config) -> Outcome {
    let live = Arc::new(AtomicI64::new(0));
    let clock = ManualClock::new();
    arm(case, kind, n);
    let (l, ck) = (live.clone(), clock.clone());
    let run = start(move || {
        let cache = build(case, cfg, &l, &ck);
        script(&cache, &ck, case, &l, cfg);
        cache
    });
    let cache = match run.wait(DEADLINE) {
        None => {
            disarm();
            return Outcome::Hung(format!("the script did not finish within {DEADLINE:?}"));
        }
        Some(Err(p)) => {
            disarm();
            let msg = format!("building the cache panicked: {}", panic_message(&*p));
            discard(p);
            return Outcome::Failed(vec![msg], INJECTED.load(SeqCst));
        }
        Some(Ok(cache)) => cache,
    };
    disarm();
    let injected = INJECTED.load(SeqCst);
    let escaped = ESCAPED.swap(0, SeqCst);
    let l = live.clone();
    let checked = start(move || {
        let bad = checks(&cache, cfg, case, &l);
        drop(cache);
        bad
    });
    let mut bad = match checked.wait(DEADLINE) {
        None => {
            return Outcome::Hung(format!(
                "after the fault, the checks (validate, a fresh get_with of keys {KEYS:?}, a fresh load) did not finish within {DEADLINE:?}"
            ))
        }
        Some(Err(p)) => {
            let msg = format!("the checks panicked: {}", panic_message(&*p));
            discard(p);
            vec![msg]
        }
        Some(Ok(bad)) => bad,
    };
    if escaped > 0 {
        bad.push(format!(
            "{escaped} operation(s) raised a panic other than the planted payload (its drop's)"
        ));
    }
    let left = live.load(SeqCst);
    // A value (key, future) whose `Drop` panics while a function returns another value leaks that
    // returned value: Rust drops locals before the return value is handed over and does not
    // drop the return value when a local's destructor panics (rust-lang/rust#47949). One
    // leaked instance under a `Drop` fault is that, not the cache.
    let tolerated =
        i64::from(matches!(kind, Kind::ValDrop | Kind::KeyDrop | Kind::FutureDrop) && injected);
    if left == 1 && tolerated == 1 {
        TOLERATED_LEAKS.fetch_add(1, SeqCst);
    }
    if left > tolerated || left < 0 {
        bad.push(format!(
            "{left} value instance(s) alive after the cache was dropped"
        ));
    }
    match (injected, bad.is_empty()) {
        (injected, false) => Outcome::Failed(bad, injected),
        (true, true) => Outcome::Passed,
        (false, true) => Outcome::NotInjected,
    }
}

#[test]
fn fault_sweep() {
    quiet_injected_panics();
    let _dog = watchdog(Duration::from_secs(1800), "fault sweep");
    let max_fails: usize = std::env::var("HERDCACHE_FAULT_MAX_FAILS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // Each hang costs two deadlines: by default a sweep stops at its first.
    let max_hangs: usize = std::env::var("HERDCACHE_FAULT_MAX_HANGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let max_n: u64 = 5_000;
    let configs = [
        Config {
            limit: false,
            async_refresh: false,
            stale: false,
        },
        Config {
            limit: true,
            async_refresh: false,
            stale: false,
        },
        Config {
            limit: false,
            async_refresh: true,
            stale: false,
        },
        Config {
            limit: true,
            async_refresh: true,
            stale: false,
        },
        Config {
            limit: false,
            async_refresh: false,
            stale: true,
        },
        Config {
            limit: true,
            async_refresh: true,
            stale: true,
        },
    ];
    let t0 = Instant::now();
    let mut case = 0u64;
    let mut failures: Vec<String> = Vec::new();
    let mut summary = Vec::new();
    // Debugging: `HERDCACHE_FAULT_ONLY=ValDrop:25` runs one kind (from call 25 on).
    let only = std::env::var("HERDCACHE_FAULT_ONLY").ok();
    for (bombs, kind) in [false, true]
        .into_iter()
        .flat_map(|b| KINDS.into_iter().map(move |k| (b, k)))
    {
        BOMBS.store(bombs, SeqCst);
        let payload = if bombs { ", bomb payload" } else { "" };
        let mut first_n = 1;
        if let Some(only) = &only {
            let (name, from) = only.split_once(':').unwrap_or((only, "1"));
            if format!("{kind:?}") != name {
                continue;
            }
            first_n = from.parse().unwrap_or(1);
        }
        for cfg in configs {
            let (mut cases, mut fails, mut hangs, mut cut) = (0u64, 0usize, 0usize, None);
            let mut n = first_n;
            loop {
                case += 1;
                cases += 1;
                match run_case(case, kind, n, cfg) {
                    Outcome::NotInjected => break,
                    Outcome::Passed => {}
                    Outcome::Failed(bad, injected) => {
                        fails += 1;
                        let at = if injected {
                            format!("at call {n}")
                        } else {
                            "with no fault injected (the script made fewer calls)".to_string()
                        };
                        failures.push(format!(
                            "{kind:?} {at} ({cfg}{payload}): {}",
                            bad.join("; ")
                        ));
                        if !injected {
                            break;
                        }
                        if fails >= max_fails {
                            cut = Some(format!("cut short after {fails} failing cases"));
                            break;
                        }
                    }
                    Outcome::Hung(what) => {
                        fails += 1;
                        hangs += 1;
                        failures.push(format!(
                            "{kind:?} at call {n} ({cfg}{payload}): HANG: {what}"
                        ));
                        if hangs >= max_hangs {
                            cut = Some(format!("cut short at hang {hangs}"));
                            break;
                        }
                    }
                }
                n += 1;
                if n > max_n {
                    cut = Some(format!("stopped at N = {max_n}"));
                    break;
                }
            }
            summary.push(format!(
                "  {:<14} {:<38} {:>4} cases, {:>2} failing{}",
                format!("{kind:?}"),
                format!("{cfg}{payload}"),
                cases,
                fails,
                cut.map_or(String::new(), |c| format!(" ({c})"))
            ));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "fault sweep, per kind and configuration:\n{}",
        summary.join("\n")
    );
    eprintln!(
        "fault sweep: {case} cases in {secs:.1} s, {} failing ({} cases leaked one value under a Drop fault: tolerated)",
        failures.len(),
        TOLERATED_LEAKS.load(SeqCst)
    );
    // Printed, not only asserted: the quiet panic hook hides any panic message that says
    // "injected", which a failure's description may.
    for f in &failures {
        eprintln!("  - {f}");
    }
    assert!(
        failures.is_empty(),
        "{} failing fault-injection cases:\n  - {}",
        failures.len(),
        failures.join("\n  - ")
    );
}
