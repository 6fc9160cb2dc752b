#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]
//! Round 70 of the outside attacks (a helper, public API only): what `attack_s69`'s sweep
//! missed — error types whose `Drop` panics, async callers cancelled at every poll, a value's
//! `Clone` panicking with a key's `Drop`, the builder's loaders, refresh, negative caching and
//! fail-safe, and the stack depth of nested async loads (`H70_STACK_REPORT=1`).
//!
//! Found (fixed in the same stop, stop 51; `attack_s69` sweeps both now):
//! - `entry().or_try_insert_with` and `and_try_compute_with` (and their async twins) leaked
//!   the error when the key (or the computation's result) dropped, and panicked, after the
//!   `Err` was built (`or_try_insert_with_err_key_drop_leaks_error`,
//!   `and_try_compute_with_err_drop_leaks_error`, `try_entry_async_err_drop_leaks_error`);
//! - `load_async` turned a panic of its key copy's `Drop` into the loader's panic
//!   (`Err(LoadError::Panicked)` for every caller, the loaded value lost, the panic swallowed),
//!   where `load` panics its caller (`load_async_key_drop_panic_is_swallowed`).
//!
//! The five large sweeps (10,789 cases with the rest; 28, 24, 40 and 18 of them failed on the
//! findings before the fix, none after) take about 3 minutes of a debug build: `#[ignore]`d,
//! run them with `--ignored`. Stack (debug, 2 MiB): nested `get_with_async` loads overflow past
//! 148 levels (151 before stop 51), `get_with_async_shared` past 275, `try_get_with_async` past
//! 119; 8 to 32 levels never do.
mod common;

use herdcache::{Cache, Op};
use std::any::Any;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());
static LIVE_K: AtomicI64 = AtomicI64::new(0);
static LIVE_V: AtomicI64 = AtomicI64::new(0);
static LIVE_E: AtomicI64 = AtomicI64::new(0);
static MASK: AtomicU32 = AtomicU32::new(0);
static LEFT: AtomicI64 = AtomicI64::new(0);
static LEFT_CLONE: AtomicI64 = AtomicI64::new(0);
static FIRED: AtomicBool = AtomicBool::new(false);
/// Cases whose fault fired (coverage).
static HUNG: AtomicI64 = AtomicI64::new(0);
static FIRED_COUNT: AtomicI64 = AtomicI64::new(0);

const F_KEY: u32 = 1;
const F_INIT: u32 = 2;
const F_VAL: u32 = 4;
const F_ERR: u32 = 8;
const F_CLONE: u32 = 16;

std::thread_local! {
    static ARMED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn tick(kind: u32) {
    if MASK.load(SeqCst) & kind != 0
        && ARMED_HERE.with(|a| a.get())
        && !std::thread::panicking()
        && LEFT.fetch_sub(1, SeqCst) == 1
    {
        FIRED.store(true, SeqCst);
        if std::env::var_os("H70_BACKTRACE").is_some() {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
        panic!("injected drop panic ({kind})");
    }
}

fn tick_clone() {
    if MASK.load(SeqCst) & F_CLONE != 0
        && ARMED_HERE.with(|a| a.get())
        && !std::thread::panicking()
        && LEFT_CLONE.fetch_sub(1, SeqCst) == 1
    {
        FIRED.store(true, SeqCst);
        panic!("injected clone panic");
    }
}

#[derive(Debug)]
struct K(u32);
impl K {
    fn new(id: u32) -> K {
        LIVE_K.fetch_add(1, SeqCst);
        K(id)
    }
}
impl Clone for K {
    fn clone(&self) -> K {
        K::new(self.0)
    }
}
impl PartialEq for K {
    fn eq(&self, o: &K) -> bool {
        self.0 == o.0
    }
}
impl Eq for K {}
impl Hash for K {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}
impl Drop for K {
    fn drop(&mut self) {
        LIVE_K.fetch_sub(1, SeqCst);
        tick(F_KEY);
    }
}

#[derive(Debug)]
struct V(u32);
impl V {
    fn new(x: u32) -> V {
        LIVE_V.fetch_add(1, SeqCst);
        V(x)
    }
}
impl Clone for V {
    fn clone(&self) -> V {
        tick_clone();
        V::new(self.0)
    }
}
impl Default for V {
    fn default() -> V {
        V::new(0)
    }
}
impl Drop for V {
    fn drop(&mut self) {
        LIVE_V.fetch_sub(1, SeqCst);
        tick(F_VAL);
    }
}

/// An error whose `Drop` may panic, counted.
#[derive(Debug)]
struct Ev(#[allow(dead_code)] u32);
impl Ev {
    fn new(x: u32) -> Ev {
        LIVE_E.fetch_add(1, SeqCst);
        Ev(x)
    }
}
impl Drop for Ev {
    fn drop(&mut self) {
        LIVE_E.fetch_sub(1, SeqCst);
        tick(F_ERR);
    }
}

impl std::fmt::Display for Ev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ev")
    }
}
impl std::error::Error for Ev {}

/// Another error type (a joiner of `Ev` cannot take it), whose `Drop` may panic too.
#[derive(Debug)]
struct Ev2;
impl Ev2 {
    fn new() -> Ev2 {
        LIVE_E.fetch_add(1, SeqCst);
        Ev2
    }
}
impl Drop for Ev2 {
    fn drop(&mut self) {
        LIVE_E.fetch_sub(1, SeqCst);
        tick(F_ERR);
    }
}

struct G;
impl Drop for G {
    fn drop(&mut self) {
        tick(F_INIT);
    }
}

type C = Cache<K, V>;
type Out = Box<dyn Any>;
type Call = fn(&C, K, G) -> Out;

fn bo<F: Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

static INIT_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Refresh jobs running on the spawner's threads.
static JOBS: AtomicI64 = AtomicI64::new(0);
/// Cancelled futures dropped while pending (async_cancel_sweep).
static CANCELLED_PENDING: AtomicI64 = AtomicI64::new(0);
/// 0: plain; 1: refresh_after(1 ms) with a thread spawner.
static CACHE_KIND: AtomicU32 = AtomicU32::new(0);

fn delay() {
    let d = INIT_DELAY_MS.load(SeqCst);
    if d > 0 {
        std::thread::sleep(Duration::from_millis(d));
    }
}

fn e(g: G) -> Ev {
    delay();
    drop(g);
    Ev::new(3)
}

fn vv(g: G) -> V {
    delay();
    drop(g);
    V::new(9)
}

/// Calls whose `init` (or computation) fails with an `Ev`.
fn err_calls() -> Vec<(&'static str, Call)> {
    vec![
        ("try_get_with(err)", |c, k, g| {
            Box::new(c.try_get_with(k, move || Err::<V, _>(e(g))))
        }),
        ("try_get_with_by_ref(err)", |c, k, g| {
            let r = c.try_get_with_by_ref(&k, move || Err::<V, _>(e(g)));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("entry.or_try_insert_with(err)", |c, k, g| {
            Box::new(c.entry(k).or_try_insert_with(move || Err::<V, _>(e(g))))
        }),
        ("entry.and_try_compute_with(err)", |c, k, g| {
            Box::new(c.entry(k).and_try_compute_with(move |en| {
                drop(en);
                Err::<Op<V>, _>(e(g))
            }))
        }),
        ("try_get_with_async(err)", |c, k, g| {
            Box::new(bo(c.try_get_with_async(k, async move { Err::<V, _>(e(g)) })))
        }),
        ("try_get_with_async_shared(err)", |c, k, g| {
            Box::new(bo(
                c.try_get_with_async_shared(k, async move { Err::<V, _>(e(g)) })
            ))
        }),
        ("try_get_with_by_ref_async(err)", |c, k, g| {
            let r = bo(c.try_get_with_by_ref_async(&k, async move { Err::<V, _>(e(g)) }));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("entry.or_try_insert_with_async(err)", |c, k, g| {
            Box::new(bo(c
                .entry(k)
                .or_try_insert_with_async(async move { Err::<V, _>(e(g)) })))
        }),
        ("entry.and_try_compute_with_async(err)", |c, k, g| {
            Box::new(bo(c.entry(k).and_try_compute_with_async(move |en| {
                drop(en);
                async move { Err::<Op<V>, _>(e(g)) }
            })))
        }),
        // Ok paths with the Ev type (an error type that drops never, for control).
        ("try_get_with(ok)", |c, k, g| {
            Box::new(c.try_get_with(k, move || {
                drop(g);
                Ok::<_, Ev>(V::new(9))
            }))
        }),
        ("entry.and_try_compute_with(ok nop)", |c, k, g| {
            Box::new(c.entry(k).and_try_compute_with(move |en| {
                drop(en);
                drop(g);
                Ok::<_, Ev>(Op::Nop)
            }))
        }),
        ("get_with", |c, k, g| Box::new(c.get_with(k, move || vv(g)))),
        ("get_with_async", |c, k, g| {
            Box::new(bo(c.get_with_async(k, async move { vv(g) })))
        }),
        ("get_with_async_shared", |c, k, g| {
            Box::new(bo(c.get_with_async_shared(k, async move { vv(g) })))
        }),
        ("optionally_get_with_async_shared", |c, k, g| {
            Box::new(bo(c.optionally_get_with_async_shared(k, async move {
                drop(g);
                Some(V::new(9))
            })))
        }),
        ("load", |c, k, g| {
            drop(g);
            Box::new(c.load(k))
        }),
        ("load_async", |c, k, g| {
            drop(g);
            Box::new(bo(c.load_async(k)))
        }),
        ("get_all", |c, k, g| {
            Box::new(c.get_all(vec![k, K::new(2)], move |ks: &[K]| {
                let mut m = std::collections::HashMap::new();
                for k in ks {
                    m.insert(k.clone(), V::new(9));
                }
                drop(g);
                m
            }))
        }),
        ("entry.or_insert_with", |c, k, g| {
            Box::new(c.entry(k).or_insert_with(move || vv(g)))
        }),
        ("entry.and_compute_with(put)", |c, k, g| {
            Box::new(c.entry(k).and_compute_with(move |en| {
                drop(en);
                drop(g);
                Op::Put(V::new(9))
            }))
        }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scene {
    Hit,
    Miss,
    /// Another thread's `get_with` loads the key (value 7) while the call joins.
    Joining,
    /// Another thread's `try_get_with::<Ev>` loads and fails: a joiner of the same `E` gets
    /// the shared error.
    JoiningErr,
    /// Another thread's `try_get_with::<String>` loads and fails: a joiner cannot take it.
    JoiningOtherErr,
    /// The call leads (a miss, its `init` 20 ms long); another thread's `try_get_with::<Ev>`
    /// joins its load.
    Led,
    /// Another thread's `try_get_with::<Ev2>` loads and fails with an `Ev2` (counted, its
    /// `Drop` armed on the call's thread): the call, a joiner, may drop its last copy.
    JoiningOtherEv2,
    /// (negative caching) the key holds a cached loader error.
    NegHit,
    /// (fail-safe) the key's value expired 5 ms ago; its loader fails.
    StaleHit,
}

fn fresh_cache() -> C {
    let b = Cache::builder()
        .max_capacity(100)
        .loader(|_: &K| Ok::<_, herdcache::BoxError>(V::new(8)));
    if CACHE_KIND.load(SeqCst) == 3 {
        // A failing loader whose errors are cached (negative caching).
        return Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(60))
            .loader(|_: &K| Err::<V, _>(Ev::new(5)))
            .build();
    }
    if CACHE_KIND.load(SeqCst) == 4 {
        // A failing loader with fail-safe: an expired value is served instead.
        return Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_millis(5))
            .fail_safe(Duration::from_secs(60))
            .loader(|_: &K| Err::<V, _>(Ev::new(5)))
            .build();
    }
    if CACHE_KIND.load(SeqCst) == 2 {
        return Cache::builder()
            .max_capacity(100)
            .async_loader(|_: &K| async {
                Yield(2).await;
                delay();
                Ok::<_, herdcache::BoxError>(V::new(8))
            })
            .build();
    }
    if CACHE_KIND.load(SeqCst) == 1 {
        b.refresh_after(Duration::from_millis(1))
            .spawner(|job| {
                JOBS.fetch_add(1, SeqCst);
                std::thread::spawn(move || {
                    struct Done;
                    impl Drop for Done {
                        fn drop(&mut self) {
                            JOBS.fetch_sub(1, SeqCst);
                        }
                    }
                    let _d = Done;
                    job();
                });
            })
            .build()
    } else {
        b.build()
    }
}

/// Runs `call` with the fault armed, in `scene`; then checks everything.
fn case(
    call: &dyn Fn(&C, K, G) -> Out,
    scene: Scene,
    mask: u32,
    n: i64,
    n_clone: i64,
) -> (bool, Option<String>) {
    MASK.store(0, SeqCst);
    FIRED.store(false, SeqCst);
    let (k0, v0, e0) = (
        LIVE_K.load(SeqCst),
        LIVE_V.load(SeqCst),
        LIVE_E.load(SeqCst),
    );
    let cache = fresh_cache();
    if let Scene::NegHit = scene {
        let r = cache.load(K::new(1));
        assert!(r.is_err());
        drop(r);
    }
    if let Scene::StaleHit = scene {
        cache.insert(K::new(1), V::new(1));
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Scene::Hit = scene {
        cache.insert(K::new(1), V::new(1));
        if CACHE_KIND.load(SeqCst) == 1 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    let mut others = Vec::new();
    INIT_DELAY_MS.store(if scene == Scene::Led { 20 } else { 0 }, SeqCst);
    if scene == Scene::Led {
        let c = cache.clone();
        others.push(std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_millis(300);
            while c.loads_in_flight() == 0 && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_micros(100));
            }
            drop(c.try_get_with(K::new(1), || Ok::<_, Ev>(V::new(6))));
        }));
    } else if !matches!(
        scene,
        Scene::Hit | Scene::Miss | Scene::NegHit | Scene::StaleHit
    ) {
        let open = Arc::new(AtomicBool::new(false));
        let (c, o) = (cache.clone(), open.clone());
        others.push(std::thread::spawn(move || {
            let wait = || {
                while !o.load(SeqCst) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            };
            match scene {
                Scene::Joining => drop(c.get_with(K::new(1), || {
                    wait();
                    V::new(7)
                })),
                Scene::JoiningErr => drop(c.try_get_with(K::new(1), || {
                    wait();
                    Err::<V, _>(Ev::new(7))
                })),
                Scene::JoiningOtherEv2 => drop(c.try_get_with(K::new(1), || {
                    wait();
                    Err::<V, _>(Ev2::new())
                })),
                _ => drop(c.try_get_with(K::new(1), || {
                    wait();
                    Err::<V, _>("other".to_string())
                })),
            }
        }));
        assert!(common::eventually(|| cache.loads_in_flight() == 1));
        others.push(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            open.store(true, SeqCst);
        }));
    }
    LEFT.store(n, SeqCst);
    LEFT_CLONE.store(n_clone, SeqCst);
    MASK.store(mask, SeqCst);
    ARMED_HERE.with(|a| a.set(true));
    let key = K::new(1);
    let r = catch_unwind(AssertUnwindSafe(|| call(&cache, key, G)));
    MASK.store(0, SeqCst);
    ARMED_HERE.with(|a| a.set(false));
    let fired = FIRED.load(SeqCst);
    if fired {
        FIRED_COUNT.fetch_add(1, SeqCst);
    }
    let mut wrong = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while others.iter().any(|t| !t.is_finished()) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_micros(200));
    }
    if others.iter().any(|t| !t.is_finished()) {
        wrong.push("another thread hangs (20 s)".to_string());
        MASK.store(0, SeqCst);
        INIT_DELAY_MS.store(0, SeqCst);
        return (true, Some(wrong.join("; ")));
    }
    for t in others {
        if t.join().is_err() {
            wrong.push("the other thread panicked".to_string());
        }
    }
    if r.is_err() != fired {
        wrong.push(format!(
            "returned {} with the fault fired: {fired}",
            r.is_ok()
        ));
    }
    drop(r);
    INIT_DELAY_MS.store(0, SeqCst);
    if !common::eventually(|| cache.loads_in_flight() == 0) {
        wrong.push(format!("loads in flight: {}", cache.describe_loads()));
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| cache.validate())) {
        wrong.push(format!("validate: {}", common::panic_message(&*p)));
    }
    // The key still works.
    match catch_unwind(AssertUnwindSafe(|| cache.get_with(K::new(1), || V::new(5)))) {
        Ok(v) => drop(v),
        Err(p) => wrong.push(format!("fresh get_with: {}", common::panic_message(&*p))),
    }
    drop(cache);
    if !common::eventually(|| JOBS.load(SeqCst) == 0) {
        wrong.push("a refresh job still runs after 10 s".to_string());
    }
    let (dk, dv, de) = (
        LIVE_K.load(SeqCst) - k0,
        LIVE_V.load(SeqCst) - v0,
        LIVE_E.load(SeqCst) - e0,
    );
    if dk != 0 || dv != 0 || de != 0 {
        wrong.push(format!("left alive: {dk} keys, {dv} values, {de} errors"));
        LIVE_K.fetch_sub(dk, SeqCst);
        LIVE_V.fetch_sub(dv, SeqCst);
        LIVE_E.fetch_sub(de, SeqCst);
    }
    (fired, (!wrong.is_empty()).then(|| wrong.join("; ")))
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn report(what: &str, cases: usize, bad: Vec<String>) {
    eprintln!(
        "{what}: {cases} cases ({} fired), {} wrong",
        FIRED_COUNT.swap(0, SeqCst),
        bad.len()
    );
    for b in bad.iter().take(60) {
        eprintln!("  {b}");
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {cases} cases wrong",
        bad.len()
    );
}

#[test]
#[ignore = "slow (about 15 to 70 s of a debug build): run with --ignored"]
fn error_type_drop_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(400), "error_type_drop_sweep");
    let mut bad = Vec::new();
    let mut cases = 0;
    for (name, call) in err_calls() {
        for scene in [
            Scene::Hit,
            Scene::Miss,
            Scene::Joining,
            Scene::JoiningErr,
            Scene::JoiningOtherErr,
            Scene::Led,
            Scene::JoiningOtherEv2,
        ] {
            for (mask, what) in [
                (F_KEY, "key"),
                (F_INIT, "init"),
                (F_VAL, "value"),
                (F_ERR, "error"),
            ] {
                for n in 1..64 {
                    cases += 1;
                    let (fired, wrong) = case(&call, scene, mask, n, 0);
                    if let Some(w) = wrong {
                        bad.push(format!("{name} {scene:?}, {what} drop #{n} panics: {w}"));
                    }
                    if !fired {
                        break;
                    }
                }
            }
        }
    }
    report("error_type_drop_sweep", cases, bad);
}

/// The minimal reproducer: `or_try_insert_with` whose `init` fails, and the key's `Drop`
/// (the entry's own key, dropped by `?` after the `Err` is built) panics: the error leaks.
#[test]
fn or_try_insert_with_err_key_drop_leaks_error() {
    common::quiet_injected_panics();
    let _s = lock();
    let call = |c: &C, k: K, g: G| -> Out {
        Box::new(c.entry(k).or_try_insert_with(move || Err::<V, _>(e(g))))
    };
    // Key drops on a miss: find the one that fires last (the entry's key).
    let mut found = None;
    for n in 1..32 {
        let (fired, wrong) = case(&call, Scene::Miss, F_KEY, n, 0);
        if wrong.is_some() {
            found = Some((n, wrong));
        }
        if !fired {
            break;
        }
    }
    assert_eq!(found, None);
}

/// `and_try_compute_with` whose closure fails on a hit: its `CompResult::Unchanged` (key and
/// value) drops after the `Err` is built; a panicking key or value `Drop` leaks the error.
#[test]
fn and_try_compute_with_err_drop_leaks_error() {
    common::quiet_injected_panics();
    let _s = lock();
    let call = |c: &C, k: K, g: G| -> Out {
        Box::new(c.entry(k).and_try_compute_with(move |en| {
            drop(en);
            Err::<Op<V>, _>(e(g))
        }))
    };
    let mut found = Vec::new();
    for (mask, scene) in [
        (F_KEY, Scene::Hit),
        (F_VAL, Scene::Hit),
        (F_KEY, Scene::Miss),
    ] {
        for n in 1..32 {
            let (fired, wrong) = case(&call, scene, mask, n, 0);
            if let Some(w) = wrong {
                found.push(format!("{scene:?} mask {mask} #{n}: {w}"));
            }
            if !fired {
                break;
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

/// Value `Clone` panics (the n-th clone), combined with the m-th key `Drop` panicking.
#[test]
#[ignore = "slow (about 15 to 70 s of a debug build): run with --ignored"]
fn clone_panic_combined_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(400), "clone_panic_combined_sweep");
    let mut bad = Vec::new();
    let mut cases = 0;
    for (name, call) in err_calls() {
        for scene in [Scene::Hit, Scene::Miss, Scene::Joining] {
            for nc in 1..8 {
                // Clone alone.
                cases += 1;
                let (fired, wrong) = case(&call, scene, F_CLONE, 0, nc);
                if let Some(w) = wrong {
                    bad.push(format!("{name} {scene:?}, clone #{nc}: {w}"));
                }
                if !fired {
                    break;
                }
                for (mask, what) in [(F_KEY, "key"), (F_VAL, "value"), (F_INIT, "init")] {
                    for n in 1..16 {
                        cases += 1;
                        let (fired, wrong) = case(&call, scene, F_CLONE | mask, n, nc);
                        if let Some(w) = wrong {
                            bad.push(format!(
                                "{name} {scene:?}, clone #{nc} + {what} drop #{n}: {w}"
                            ));
                        }
                        if !fired {
                            break;
                        }
                    }
                }
            }
        }
    }
    report("clone_panic_combined_sweep", cases, bad);
}

// ---------------------------------------------------------------------------------------
// Async callers cancelled at every poll while a Drop panics.

type BoxFut<'a> = Pin<Box<dyn Future<Output = Out> + 'a>>;
type ACall = for<'a> fn(&'a C, K, G) -> BoxFut<'a>;

/// Returns `Pending` `n` times (waking itself), then `Ready`.
struct Yield(u32);
impl Future for Yield {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            Poll::Ready(())
        } else {
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

fn async_calls() -> Vec<(&'static str, ACall)> {
    vec![
        ("get_with_async", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .get_with_async(k, async move {
                        Yield(2).await;
                        drop(g);
                        V::new(9)
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("try_get_with_async(err)", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .try_get_with_async(k, async move {
                        Yield(2).await;
                        Err::<V, _>(e(g))
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("get_with_async_shared", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .get_with_async_shared(k, async move {
                        Yield(2).await;
                        drop(g);
                        V::new(9)
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("try_get_with_async_shared(err)", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .try_get_with_async_shared(k, async move {
                        Yield(2).await;
                        Err::<V, _>(e(g))
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("get_with_if_async", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .get_with_if_async(
                        k,
                        async move {
                            Yield(2).await;
                            drop(g);
                            V::new(9)
                        },
                        |_| true,
                    )
                    .await;
                Box::new(v) as Out
            })
        }),
        ("load_async", |c, k, g| {
            drop(g);
            Box::pin(async move { Box::new(c.load_async(k).await) as Out })
        }),
        ("entry.or_insert_with_async", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .entry(k)
                    .or_insert_with_async(async move {
                        Yield(2).await;
                        drop(g);
                        V::new(9)
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("entry.or_try_insert_with_async(err)", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .entry(k)
                    .or_try_insert_with_async(async move {
                        Yield(2).await;
                        Err::<V, _>(e(g))
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("entry.and_compute_with_async", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .entry(k)
                    .and_compute_with_async(move |en| async move {
                        drop(en);
                        Yield(2).await;
                        drop(g);
                        Op::Put(V::new(9))
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("entry.and_try_compute_with_async(err)", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .entry(k)
                    .and_try_compute_with_async(move |en| async move {
                        drop(en);
                        Yield(2).await;
                        Err::<Op<V>, _>(e(g))
                    })
                    .await;
                Box::new(v) as Out
            })
        }),
        ("get_with_by_ref_async", |c, k, g| {
            Box::pin(async move {
                let v = c
                    .get_with_by_ref_async(&k, async move {
                        Yield(2).await;
                        drop(g);
                        V::new(9)
                    })
                    .await;
                let out = Box::new(v) as Out;
                drop(k);
                out
            })
        }),
    ]
}

/// Polls `call`'s future `polls` times (or to its end), then drops it, with the `n`-th drop of
/// `mask` panicking throughout (polls and the drop).
fn cancel_case(
    call: ACall,
    scene: Scene,
    mask: u32,
    n: i64,
    polls: usize,
) -> (bool, bool, Option<String>) {
    let mut done = false;
    let c2: Box<dyn Fn(&C, K, G) -> Out> = Box::new(move |c, k, g| {
        let mut fut = call(c, k, g);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..polls {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        CANCELLED_PENDING.fetch_add(1, SeqCst);
        drop(fut);
        Box::new(()) as Out
    });
    let (fired, wrong) = case(&*c2, scene, mask, n, 0);
    // Whether the future would have finished within `polls` is found by a faultless run.
    if mask == 0 {
        done = true;
    }
    (fired, done, wrong)
}

#[test]
#[ignore = "slow (about 15 to 70 s of a debug build): run with --ignored"]
fn async_cancel_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(500), "async_cancel_sweep");
    let mut bad = Vec::new();
    let mut cases = 0;
    for (name, call) in async_calls() {
        for (kind, scene) in [
            (0, Scene::Hit),
            (0, Scene::Miss),
            (0, Scene::Joining),
            (0, Scene::JoiningErr),
            (0, Scene::Led),
            (0, Scene::JoiningOtherEv2),
            (2, Scene::Miss),
            (2, Scene::Led),
        ] {
            if kind == 2 && name != "load_async" {
                continue;
            }
            CACHE_KIND.store(kind, SeqCst);
            for polls in 0..6 {
                for (mask, what) in [
                    (F_KEY, "key"),
                    (F_INIT, "init"),
                    (F_VAL, "value"),
                    (F_ERR, "error"),
                ] {
                    for n in 1..48 {
                        cases += 1;
                        let (fired, _, wrong) = cancel_case(call, scene, mask, n, polls);
                        if let Some(w) = wrong {
                            bad.push(format!(
                                "{name} {scene:?}, cancelled after {polls} polls, {what} drop #{n}: {w}"
                            ));
                        }
                        if !fired {
                            break;
                        }
                    }
                }
            }
        }
    }
    CACHE_KIND.store(0, SeqCst);
    eprintln!(
        "async_cancel_sweep: {} futures dropped while pending",
        CANCELLED_PENDING.load(SeqCst)
    );
    report("async_cancel_sweep", cases, bad);
}

// ---------------------------------------------------------------------------------------
// Send-ness of the futures (compile time).

#[allow(dead_code)]
fn assert_send<T: Send>(_: &T) {}

#[allow(dead_code)]
fn futures_are_send(
    c: &Cache<String, String>,
    cu: &Cache<u32, String>,
    la: &Cache<String, String>,
) {
    let f = c.get_with_async("a".into(), async { String::new() });
    assert_send(&f);
    let f = c.try_get_with_async("a".into(), async { Ok::<_, std::io::Error>(String::new()) });
    assert_send(&f);
    let f = c.get_with_async_shared("a".into(), async { String::new() });
    assert_send(&f);
    let f = c.try_get_with_async_shared("a".into(), async { Ok::<_, String>(String::new()) });
    assert_send(&f);
    let f = c.optionally_get_with_async("a".into(), async { None });
    assert_send(&f);
    let f = la.load_async("a".into());
    assert_send(&f);
    let f = c
        .entry("a".into())
        .or_insert_with_async(async { String::new() });
    assert_send(&f);
    let f = c
        .entry("a".into())
        .or_try_insert_with_async(async { Ok::<_, String>(String::new()) });
    assert_send(&f);
    let f = c
        .entry("a".into())
        .and_compute_with_async(|_| async { Op::Put(String::new()) });
    assert_send(&f);
    let f = c
        .entry("a".into())
        .and_try_compute_with_async(|_| async { Ok::<_, String>(Op::Put(String::new())) });
    assert_send(&f);
    let f = c.get_with_if_async("a".into(), async { String::new() }, |_| false);
    assert_send(&f);
    let f = cu.get_with_by_ref_async(&1, async { String::new() });
    assert_send(&f);
}

// ---------------------------------------------------------------------------------------
// Stack depth of nested async loads.

type NC = Cache<u32, u32>;

fn nest<'a>(
    c: &'a NC,
    i: u32,
    d: u32,
    kind: &str,
) -> Pin<Box<dyn Future<Output = u32> + Send + 'a>> {
    let kind2 = kind.to_string();
    match kind {
        "get_with_async" => Box::pin(c.get_with_async(i, async move {
            if i + 1 < d {
                nest(c, i + 1, d, &kind2).await + 1
            } else {
                0
            }
        })),
        "try_get_with_async" => Box::pin(async move {
            c.try_get_with_async(i, async move {
                if i + 1 < d {
                    Ok::<_, String>(nest(c, i + 1, d, &kind2).await + 1)
                } else {
                    Ok(0)
                }
            })
            .await
            .unwrap()
        }),
        "get_with_async_shared" => {
            let c2 = c.clone();
            Box::pin(c.get_with_async_shared(i, async move {
                if i + 1 < d {
                    nest(&c2, i + 1, d, &kind2).await + 1
                } else {
                    0
                }
            }))
        }
        _ => unreachable!(),
    }
}

/// Child of `stack_depth_report`: one run at `H70_DEPTH` levels on a thread of `H70_STACK`
/// bytes, with `H70_EXEC` (`block_on` or `tokio`) and `H70_KIND`.
#[test]
#[ignore = "a child of stack_depth_report"]
fn stack_probe_child() {
    let Ok(d) = std::env::var("H70_DEPTH") else {
        return;
    };
    let d: u32 = d.parse().unwrap();
    let stack: usize = std::env::var("H70_STACK").unwrap().parse().unwrap();
    let exec = std::env::var("H70_EXEC").unwrap();
    let kind = std::env::var("H70_KIND").unwrap();
    let t = std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || {
            let c: NC = Cache::new(10_000);
            let r = if exec == "tokio" {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(nest(&c, 0, d, &kind))
            } else {
                futures::executor::block_on(nest(&c, 0, d, &kind))
            };
            assert_eq!(r, d - 1);
        })
        .unwrap();
    t.join().unwrap();
    println!("H70_OK");
}

fn probe(depth: u32, stack: usize, exec: &str, kind: &str) -> bool {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stack_probe_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("H70_DEPTH", depth.to_string())
        .env("H70_STACK", stack.to_string())
        .env("H70_EXEC", exec)
        .env("H70_KIND", kind)
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("H70_OK")
}

/// The deepest nesting that fits in `stack` bytes (up to `cap`).
fn max_depth(stack: usize, exec: &str, kind: &str, cap: u32) -> u32 {
    let (mut lo, mut hi) = (1u32, 2u32);
    while hi <= cap && probe(hi, stack, exec, kind) {
        lo = hi;
        hi *= 2;
    }
    if hi > cap {
        return cap;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if probe(mid, stack, exec, kind) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[test]
fn stack_depth_report() {
    if std::env::var_os("H70_STACK_REPORT").is_none() {
        return;
    }
    let kinds: Vec<String> = std::env::var("H70_KINDS")
        .unwrap_or_else(|_| "get_with_async,get_with_async_shared,try_get_with_async".into())
        .split(',')
        .map(String::from)
        .collect();
    for kind in &kinds {
        for exec in ["block_on", "tokio"] {
            let m = max_depth(2 << 20, exec, kind, 4096);
            eprintln!("STACK 2MiB {kind} {exec}: max depth {m}");
            for depth in [8u32, 16, 32] {
                // The least stack (in 16 KiB steps) for `depth` levels.
                let (mut lo, mut hi) = (16usize << 10, 8usize << 20);
                if !probe(depth, hi, exec, kind) {
                    eprintln!("STACK {kind} {exec} depth {depth}: >8MiB");
                    continue;
                }
                while hi - lo > (16 << 10) {
                    let mid = (lo + hi) / 2 / (16 << 10) * (16 << 10);
                    if probe(depth, mid, exec, kind) {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                eprintln!(
                    "STACK {kind} {exec} depth {depth}: needs <= {} KiB",
                    hi >> 10
                );
            }
        }
    }
}

/// Refresh-ahead on a spawner: a hit of an old entry starts a reload (the key cloned by the
/// reader), with the caller's key, init or value `Drop` panicking.
#[test]
fn refresh_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(300), "refresh_sweep");
    CACHE_KIND.store(1, SeqCst);
    let mut bad = Vec::new();
    let mut cases = 0;
    for (name, call) in err_calls() {
        for scene in [Scene::Hit, Scene::Miss] {
            for (mask, what) in [(F_KEY, "key"), (F_INIT, "init"), (F_VAL, "value")] {
                for n in 1..64 {
                    cases += 1;
                    let (fired, wrong) = case(&call, scene, mask, n, 0);
                    if let Some(w) = wrong {
                        bad.push(format!("{name} {scene:?}, {what} drop #{n} panics: {w}"));
                    }
                    if !fired {
                        break;
                    }
                }
            }
        }
    }
    CACHE_KIND.store(0, SeqCst);
    report("refresh_sweep", cases, bad);
}

/// The same sweep on a cache with an `async_loader` (load, load_async, get_all, ...).
#[test]
#[ignore = "slow (about 15 to 70 s of a debug build): run with --ignored"]
fn async_loader_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(300), "async_loader_sweep");
    CACHE_KIND.store(2, SeqCst);
    let mut bad = Vec::new();
    let mut cases = 0;
    for (name, call) in err_calls() {
        if name == "load" {
            // A blocking load with only an async loader: not this sweep's business.
            continue;
        }
        for scene in [Scene::Hit, Scene::Miss, Scene::Joining, Scene::Led] {
            for (mask, what) in [(F_KEY, "key"), (F_INIT, "init"), (F_VAL, "value")] {
                for n in 1..64 {
                    cases += 1;
                    let (fired, wrong) = case(&call, scene, mask, n, 0);
                    if let Some(w) = wrong {
                        bad.push(format!("{name} {scene:?}, {what} drop #{n} panics: {w}"));
                    }
                    if !fired {
                        break;
                    }
                }
            }
        }
    }
    CACHE_KIND.store(0, SeqCst);
    report("async_loader_sweep", cases, bad);
}

/// `load_async` with an `async_loader`, on a miss, whose key copy's `Drop` panics (the copy the
/// loader borrows, dropped in the leader's poll): the panic does not reach the caller, as
/// `load` (and the crate docs: "its panic reaches the caller that ran it") would have it; the
/// loaded value is thrown away and the call returns `Err(LoadError::Panicked)`.
#[test]
fn load_async_key_drop_panic_is_swallowed() {
    common::quiet_injected_panics();
    let _s = lock();
    let mut got = Vec::new();
    for kind in [0u32, 2] {
        MASK.store(0, SeqCst);
        CACHE_KIND.store(kind, SeqCst);
        let cache = fresh_cache();
        CACHE_KIND.store(0, SeqCst);
        LEFT.store(1, SeqCst);
        FIRED.store(false, SeqCst);
        MASK.store(F_KEY, SeqCst);
        ARMED_HERE.with(|a| a.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| {
            if kind == 2 {
                bo(cache.load_async(K::new(1))).map(drop)
            } else {
                cache.load(K::new(1)).map(drop)
            }
        }));
        MASK.store(0, SeqCst);
        ARMED_HERE.with(|a| a.set(false));
        let fired = FIRED.load(SeqCst);
        let what = if kind == 2 { "load_async" } else { "load" };
        got.push(format!(
            "{what}: fired {fired}, {}",
            match &r {
                Ok(r) => format!("returned {r:?}"),
                Err(p) => format!("panicked: {}", common::panic_message(&**p)),
            }
        ));
        drop(r);
        drop(cache);
    }
    eprintln!("{got:#?}");
    assert!(
        got.iter().all(|g| !g.contains("fired true, returned")),
        "a key Drop panic was swallowed: {got:#?}"
    );
}

/// The async twins of the two sync reproducers.
#[test]
fn try_entry_async_err_drop_leaks_error() {
    common::quiet_injected_panics();
    let _s = lock();
    let calls: Vec<(&str, Call, Scene, u32)> = vec![
        (
            "or_try_insert_with_async",
            |c, k, g| {
                Box::new(bo(c
                    .entry(k)
                    .or_try_insert_with_async(async move { Err::<V, _>(e(g)) })))
            },
            Scene::Miss,
            F_KEY,
        ),
        (
            "and_try_compute_with_async",
            |c, k, g| {
                Box::new(bo(c.entry(k).and_try_compute_with_async(move |en| {
                    drop(en);
                    async move { Err::<Op<V>, _>(e(g)) }
                })))
            },
            Scene::Hit,
            F_VAL,
        ),
    ];
    let mut found = Vec::new();
    for (name, call, scene, mask) in calls {
        for n in 1..32 {
            let (fired, wrong) = case(&call, scene, mask, n, 0);
            if let Some(w) = wrong {
                found.push(format!("{name} {scene:?} mask {mask} #{n}: {w}"));
            }
            if !fired {
                break;
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

fn more_calls() -> Vec<(&'static str, Call)> {
    vec![
        ("insert", |c, k, g| {
            c.insert(k, vv(g));
            Box::new(())
        }),
        ("invalidate", |c, k, g| {
            drop(g);
            c.invalidate(&k);
            drop(k);
            Box::new(())
        }),
        ("remove", |c, k, g| {
            drop(g);
            let r = c.remove(&k);
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("load_with_timeout(0)", |c, k, g| {
            drop(g);
            Box::new(c.load_with_timeout(k, Some(Duration::ZERO)))
        }),
        ("get_or_stale", |c, k, g| {
            drop(g);
            let r = c.get_or_stale(&k);
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
    ]
}

/// Negative caching and fail-safe: a loader error (an `Ev`, whose `Drop` may panic) cached or
/// dropped while an old value is served.
#[test]
fn negative_and_fail_safe_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(400), "negative_and_fail_safe_sweep");
    let mut bad = Vec::new();
    let mut cases = 0;
    let mut all = err_calls();
    all.extend(more_calls());
    for (kind, scene) in [
        (3, Scene::NegHit),
        (3, Scene::Miss),
        (4, Scene::StaleHit),
        (4, Scene::Miss),
    ] {
        for (name, call) in &all {
            if name.contains("async") && name.contains("load") {
                continue; // no async loader here
            }
            for (mask, what) in [
                (F_KEY, "key"),
                (F_INIT, "init"),
                (F_VAL, "value"),
                (F_ERR, "error"),
            ] {
                for n in 1..64 {
                    cases += 1;
                    CACHE_KIND.store(kind, SeqCst);
                    let (fired, wrong) = case(call, scene, mask, n, 0);
                    CACHE_KIND.store(0, SeqCst);
                    if fired && mask == F_ERR && std::env::var_os("H70_VERBOSE").is_some() {
                        eprintln!("fired: kind {kind} {name} {scene:?} error drop #{n}");
                    }
                    if let Some(w) = wrong {
                        bad.push(format!(
                            "kind {kind} {name} {scene:?}, {what} drop #{n} panics: {w}"
                        ));
                    }
                    if !fired {
                        break;
                    }
                }
            }
        }
    }
    report("negative_and_fail_safe_sweep", cases, bad);
}

/// Two async callers of the key on one thread: `a` (from `async_calls`) polled `polls` times,
/// then `b` (a joiner) polled once, then `a` dropped with the fault armed (its drop may panic);
/// `b` must still finish (no hang), and nothing leak.
#[test]
#[ignore = "slow (about 15 to 70 s of a debug build): run with --ignored"]
fn async_peer_cancel_sweep() {
    common::quiet_injected_panics();
    let _s = lock();
    let _w = common::watchdog(Duration::from_secs(400), "async_peer_cancel_sweep");
    type BCall = for<'a> fn(&'a C) -> BoxFut<'a>;
    let bs: Vec<(&str, BCall)> = vec![
        ("get_with_async", |c| {
            Box::pin(async move {
                Box::new(c.get_with_async(K::new(1), async { V::new(4) }).await) as Out
            })
        }),
        ("get_with_async_shared", |c| {
            Box::pin(async move {
                Box::new(
                    c.get_with_async_shared(K::new(1), async { V::new(4) })
                        .await,
                ) as Out
            })
        }),
        ("try_get_with_async", |c| {
            Box::pin(async move {
                Box::new(
                    c.try_get_with_async(K::new(1), async { Ok::<_, Ev>(V::new(4)) })
                        .await,
                ) as Out
            })
        }),
        ("load_async", |c| {
            Box::pin(async move { Box::new(c.load_async(K::new(1)).await) as Out })
        }),
    ];
    let mut bad = Vec::new();
    let mut cases = 0;
    let mut hangs = 0;
    for (an, a) in async_calls() {
        for (bn, b) in &bs {
            for kind in [0u32, 2] {
                if kind == 2 && an != "load_async" && *bn != "load_async" {
                    continue;
                }
                for polls in 1..4 {
                    for (mask, what) in [
                        (F_KEY, "key"),
                        (F_INIT, "init"),
                        (F_VAL, "value"),
                        (F_ERR, "error"),
                    ] {
                        for n in 1..32 {
                            cases += 1;
                            let b = *b;
                            let call = move |c: &C, k: K, g: G| -> Out {
                                let waker = futures::task::noop_waker();
                                let mut cx = Context::from_waker(&waker);
                                let mut fa = a(c, k, g);
                                for _ in 0..polls {
                                    if let Poll::Ready(v) = fa.as_mut().poll(&mut cx) {
                                        return v;
                                    }
                                }
                                let mut fb = b(c);
                                let rb0 = fb.as_mut().poll(&mut cx);
                                let pa = catch_unwind(AssertUnwindSafe(|| drop(fa)));
                                let rb = match rb0 {
                                    Poll::Ready(v) => Ok(v),
                                    Poll::Pending => {
                                        // `b` must finish: on its own thread's executor, bounded.
                                        let until =
                                            std::time::Instant::now() + Duration::from_secs(10);
                                        let waker = futures::task::noop_waker();
                                        let mut cx = Context::from_waker(&waker);
                                        loop {
                                            if let Poll::Ready(v) = fb.as_mut().poll(&mut cx) {
                                                break Ok(v);
                                            }
                                            if std::time::Instant::now() > until {
                                                break Err(());
                                            }
                                            std::thread::sleep(Duration::from_micros(100));
                                        }
                                    }
                                };
                                drop(fb);
                                if let Err(p) = pa {
                                    drop(rb);
                                    std::panic::resume_unwind(p);
                                }
                                match rb {
                                    Ok(v) => v,
                                    Err(()) => {
                                        HUNG.fetch_add(1, SeqCst);
                                        Box::new(()) as Out
                                    }
                                }
                            };
                            CACHE_KIND.store(kind, SeqCst);
                            let (fired, wrong) = case(&call, Scene::Miss, mask, n, 0);
                            CACHE_KIND.store(0, SeqCst);
                            if HUNG.swap(0, SeqCst) > 0 {
                                bad.push(format!("a {an} b {bn} kind {kind} polls {polls}, {what} drop #{n}: b never finished (10 s)"));
                            }
                            if let Some(w) = wrong {
                                bad.push(format!("a {an} b {bn} kind {kind} polls {polls}, {what} drop #{n}: {w}"));
                            }
                            if !fired {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = &mut hangs;
    report("async_peer_cancel_sweep", cases, bad);
}
