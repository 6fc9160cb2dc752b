#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]
//! Round 69 (a helper's concurrent randomized stress with one injected fault per round, then
//! this sweep): a call that returns a value and drops something of the caller's after it built
//! that value. When the last `Drop` panics, the language does not drop the value already built
//! for the return (rust-lang/rust#47949): the value leaks. The helper found it on a hit of
//! `get_with` whose key's `Drop` panicked (the key was dropped after the clone of the value
//! was made); the same shape held for the unused `init` closure of a hit and for the other
//! entry points.
//!
//! The sweep: every entry point that takes a key by value or a closure (sync and async, the
//! entry API, by reference, the loader's), on a hit, on a miss, and joining a load another
//! thread runs, with the N-th drop of a key,
//! of the `init` closure (what it captures) or of a value panicking, for every N up to the
//! number of drops the call makes. After the call the fault is disarmed and the result, then
//! the cache dropped: every key and value made must have been dropped exactly once, no load
//! left in flight, `validate()` whole.
mod common;

use herdcache::{Cache, CompResult, Op};
use std::any::Any;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering::SeqCst};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());
static LIVE_K: AtomicI64 = AtomicI64::new(0);
static LIVE_V: AtomicI64 = AtomicI64::new(0);
static MASK: AtomicU32 = AtomicU32::new(0);
static LEFT: AtomicI64 = AtomicI64::new(0);
static FIRED: AtomicBool = AtomicBool::new(false);

const F_KEY: u32 = 1;
const F_INIT: u32 = 2;
const F_VAL: u32 = 4;

std::thread_local! {
    /// Faults fire on the thread of the call under test only (not on a leader's thread).
    static ARMED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One drop of kind `kind`: panics if it is the armed one.
fn tick(kind: u32) {
    if MASK.load(SeqCst) & kind != 0
        && ARMED_HERE.with(|a| a.get())
        && !std::thread::panicking()
        && LEFT.fetch_sub(1, SeqCst) == 1
    {
        FIRED.store(true, SeqCst);
        if std::env::var_os("S69_BACKTRACE").is_some() {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
        panic!("injected drop panic ({kind})");
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

/// What an `init` closure captures: its `Drop` runs when the closure is dropped, called or not.
struct G;
impl Drop for G {
    fn drop(&mut self) {
        tick(F_INIT);
    }
}

/// An error holding a value: its `Drop` is counted and may panic as a value's does.
#[derive(Debug)]
struct Er(#[allow(dead_code)] V);

fn er(g: G) -> Er {
    drop(g);
    Er(V::new(5))
}

type C = Cache<K, V>;
type Out = Box<dyn Any>;
type Call = fn(&C, K, G) -> Out;

fn v(g: G, x: u32) -> V {
    drop(g);
    V::new(x)
}

fn bo<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// Every entry point, each written so that the test's own code drops nothing after it has
/// the result (the result is the closure's last expression).
fn calls() -> Vec<(&'static str, Call)> {
    vec![
        ("get_with", |c, k, g| {
            Box::new(c.get_with(k, move || v(g, 9)))
        }),
        ("try_get_with", |c, k, g| {
            Box::new(c.try_get_with(k, move || Ok::<_, Er>(v(g, 9))))
        }),
        ("optionally_get_with", |c, k, g| {
            Box::new(c.optionally_get_with(k, move || Some(v(g, 9))))
        }),
        ("get_with_if", |c, k, g| {
            Box::new(c.get_with_if(k, move || v(g, 9), |_| false))
        }),
        ("get_with_if(replace)", |c, k, g| {
            Box::new(c.get_with_if(k, move || v(g, 9), |_| true))
        }),
        ("get_with_if(judge holds it)", |c, k, g| {
            Box::new(c.get_with_if(
                k,
                || V::new(9),
                move |_| {
                    let _ = &g;
                    false
                },
            ))
        }),
        ("get_with_by_ref", |c, k, g| {
            let r = c.get_with_by_ref(&k, move || v(g, 9));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("try_get_with_by_ref", |c, k, g| {
            let r = c.try_get_with_by_ref(&k, move || Ok::<_, Er>(v(g, 9)));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("optionally_get_with_by_ref", |c, k, g| {
            let r = c.optionally_get_with_by_ref(&k, move || Some(v(g, 9)));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("load", |c, k, g| {
            drop(g);
            Box::new(c.load(k))
        }),
        ("load_with_timeout", |c, k, g| {
            drop(g);
            Box::new(c.load_with_timeout(k, Some(std::time::Duration::from_secs(60))))
        }),
        ("get_all", |c, k, g| {
            Box::new(c.get_all(vec![k], move |ks: &[K]| {
                let mut m = HashMap::new();
                for k in ks {
                    m.insert(k.clone(), V::new(9));
                }
                drop(g);
                m
            }))
        }),
        ("entry.or_insert_with", |c, k, g| {
            Box::new(c.entry(k).or_insert_with(move || v(g, 9)))
        }),
        ("entry.or_insert_with_if", |c, k, g| {
            Box::new(c.entry(k).or_insert_with_if(move || v(g, 9), |_| false))
        }),
        ("entry.or_insert", |c, k, g| {
            drop(g);
            Box::new(c.entry(k).or_insert(V::new(9)))
        }),
        ("entry.or_default", |c, k, g| {
            drop(g);
            Box::new(c.entry(k).or_default())
        }),
        ("entry.or_optionally_insert_with", |c, k, g| {
            Box::new(c.entry(k).or_optionally_insert_with(move || Some(v(g, 9))))
        }),
        ("entry.or_try_insert_with", |c, k, g| {
            Box::new(c.entry(k).or_try_insert_with(move || Ok::<_, Er>(v(g, 9))))
        }),
        ("entry.and_compute_with(put)", |c, k, g| {
            Box::new(c.entry(k).and_compute_with(move |e| {
                drop(e);
                Op::Put(v(g, 9))
            }))
        }),
        ("entry.and_compute_with(nop)", |c, k, g| {
            Box::new(c.entry(k).and_compute_with(move |e| {
                drop(e);
                drop(g);
                Op::Nop
            }))
        }),
        ("entry.and_compute_with(remove)", |c, k, g| {
            Box::new(c.entry(k).and_compute_with(move |e| {
                drop(e);
                drop(g);
                Op::Remove
            }))
        }),
        ("entry.and_upsert_with", |c, k, g| {
            Box::new(c.entry(k).and_upsert_with(move |e| {
                drop(e);
                v(g, 9)
            }))
        }),
        ("entry.and_try_compute_with", |c, k, g| {
            Box::new(c.entry(k).and_try_compute_with(move |e| {
                drop(e);
                Ok::<_, Er>(Op::Put(v(g, 9)))
            }))
        }),
        ("entry_by_ref.or_insert_with", |c, k, g| {
            let r = c.entry_by_ref(&k).or_insert_with(move || v(g, 9));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("try_get_with(err)", |c, k, g| {
            Box::new(c.try_get_with(k, move || Err::<V, _>(er(g))))
        }),
        ("entry.or_try_insert_with(err)", |c, k, g| {
            Box::new(c.entry(k).or_try_insert_with(move || Err::<V, _>(er(g))))
        }),
        ("entry.and_try_compute_with(err)", |c, k, g| {
            Box::new(c.entry(k).and_try_compute_with(move |e| {
                drop(e);
                Err::<Op<V>, _>(er(g))
            }))
        }),
        ("try_get_with_async(err)", |c, k, g| {
            Box::new(bo(
                c.try_get_with_async(k, async move { Err::<V, _>(er(g)) })
            ))
        }),
        ("entry.or_try_insert_with_async(err)", |c, k, g| {
            Box::new(bo(c
                .entry(k)
                .or_try_insert_with_async(async move { Err::<V, _>(er(g)) })))
        }),
        ("entry.and_try_compute_with_async(err)", |c, k, g| {
            Box::new(bo(c.entry(k).and_try_compute_with_async(move |e| {
                drop(e);
                async move { Err::<Op<V>, _>(er(g)) }
            })))
        }),
        ("get_with_async", |c, k, g| {
            Box::new(bo(c.get_with_async(k, async move { v(g, 9) })))
        }),
        ("try_get_with_async", |c, k, g| {
            Box::new(bo(
                c.try_get_with_async(k, async move { Ok::<_, Er>(v(g, 9)) })
            ))
        }),
        ("optionally_get_with_async", |c, k, g| {
            Box::new(bo(
                c.optionally_get_with_async(k, async move { Some(v(g, 9)) })
            ))
        }),
        ("get_with_async_shared", |c, k, g| {
            Box::new(bo(c.get_with_async_shared(k, async move { v(g, 9) })))
        }),
        ("try_get_with_async_shared", |c, k, g| {
            Box::new(bo(c.try_get_with_async_shared(k, async move {
                Ok::<_, Er>(v(g, 9))
            })))
        }),
        ("optionally_get_with_async_shared", |c, k, g| {
            Box::new(bo(c.optionally_get_with_async_shared(k, async move {
                Some(v(g, 9))
            })))
        }),
        ("load_async", |c, k, g| {
            drop(g);
            Box::new(bo(c.load_async(k)))
        }),
        ("get_with_if_async", |c, k, g| {
            Box::new(bo(c.get_with_if_async(k, async move { v(g, 9) }, |_| false)))
        }),
        ("get_with_by_ref_async", |c, k, g| {
            let r = bo(c.get_with_by_ref_async(&k, async move { v(g, 9) }));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("try_get_with_by_ref_async", |c, k, g| {
            let r = bo(c.try_get_with_by_ref_async(&k, async move { Ok::<_, Er>(v(g, 9)) }));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("optionally_get_with_by_ref_async", |c, k, g| {
            let r = bo(c.optionally_get_with_by_ref_async(&k, async move { Some(v(g, 9)) }));
            let out: Out = Box::new(r);
            drop(k);
            out
        }),
        ("entry.or_insert_with_async", |c, k, g| {
            Box::new(bo(c.entry(k).or_insert_with_async(async move { v(g, 9) })))
        }),
        ("entry.or_insert_with_if_async", |c, k, g| {
            Box::new(bo(c
                .entry(k)
                .or_insert_with_if_async(async move { v(g, 9) }, |_| false)))
        }),
        ("entry.or_insert_async", |c, k, g| {
            drop(g);
            Box::new(bo(c.entry(k).or_insert_async(V::new(9))))
        }),
        ("entry.or_default_async", |c, k, g| {
            drop(g);
            Box::new(bo(c.entry(k).or_default_async()))
        }),
        ("entry.or_optionally_insert_with_async", |c, k, g| {
            Box::new(bo(c
                .entry(k)
                .or_optionally_insert_with_async(async move { Some(v(g, 9)) })))
        }),
        ("entry.or_try_insert_with_async", |c, k, g| {
            Box::new(bo(c
                .entry(k)
                .or_try_insert_with_async(async move { Ok::<_, Er>(v(g, 9)) })))
        }),
        ("entry.and_compute_with_async", |c, k, g| {
            Box::new(bo(c.entry(k).and_compute_with_async(move |e| {
                drop(e);
                async move { Op::Put(v(g, 9)) }
            })))
        }),
        ("entry.and_upsert_with_async", |c, k, g| {
            Box::new(bo(c.entry(k).and_upsert_with_async(move |e| {
                drop(e);
                async move { v(g, 9) }
            })))
        }),
        ("entry.and_try_compute_with_async", |c, k, g| {
            Box::new(bo(c.entry(k).and_try_compute_with_async(move |e| {
                drop(e);
                async move { Ok::<_, Er>(Op::Put(v(g, 9))) }
            })))
        }),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Scene {
    Hit,
    Miss,
    /// A blocking `get_with` of the key, on another thread, loads while the call joins it
    /// (its loader ends 5 ms after the call starts).
    Joining,
}

/// One case: `call` in `scene` with the `n`-th drop of a `mask` kind panicking. Whether the
/// fault fired, and what was wrong.
fn case(call: Call, scene: Scene, mask: u32, n: i64) -> (bool, Option<String>) {
    MASK.store(0, SeqCst);
    FIRED.store(false, SeqCst);
    let (k0, v0) = (LIVE_K.load(SeqCst), LIVE_V.load(SeqCst));
    let cache: C = Cache::builder()
        .max_capacity(100)
        .loader(|_: &K| Ok::<_, herdcache::BoxError>(V::new(8)))
        .async_loader(|_: &K| async { Ok::<_, herdcache::BoxError>(V::new(8)) })
        .build();
    if let Scene::Hit = scene {
        cache.insert(K::new(1), V::new(1));
    }
    let mut others = Vec::new();
    if let Scene::Joining = scene {
        let open = std::sync::Arc::new(AtomicBool::new(false));
        let (c, o) = (cache.clone(), open.clone());
        others.push(std::thread::spawn(move || {
            drop(c.get_with(K::new(1), || {
                while !o.load(SeqCst) {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                V::new(7)
            }))
        }));
        assert!(common::eventually(|| cache.loads_in_flight() == 1));
        others.push(std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            open.store(true, SeqCst);
        }));
    }
    LEFT.store(n, SeqCst);
    MASK.store(mask, SeqCst);
    ARMED_HERE.with(|a| a.set(true));
    let key = K::new(1);
    let r = catch_unwind(AssertUnwindSafe(|| call(&cache, key, G)));
    MASK.store(0, SeqCst);
    ARMED_HERE.with(|a| a.set(false));
    let fired = FIRED.load(SeqCst);
    let mut wrong = Vec::new();
    for t in others {
        if t.join().is_err() {
            wrong.push("the leader's thread panicked".to_string());
        }
    }
    if r.is_err() != fired {
        wrong.push(format!(
            "returned {} with the fault fired: {fired}",
            r.is_ok()
        ));
    }
    drop(r);
    if cache.loads_in_flight() != 0 {
        wrong.push(format!("loads in flight: {}", cache.describe_loads()));
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| cache.validate())) {
        wrong.push(format!("validate: {}", common::panic_message(&*p)));
    }
    drop(cache);
    let (dk, dv) = (LIVE_K.load(SeqCst) - k0, LIVE_V.load(SeqCst) - v0);
    if dk != 0 || dv != 0 {
        wrong.push(format!("left alive: {dk} keys, {dv} values"));
        // Not carried to the next case.
        LIVE_K.fetch_sub(dk, SeqCst);
        LIVE_V.fetch_sub(dv, SeqCst);
    }
    (fired, (!wrong.is_empty()).then(|| wrong.join("; ")))
}

#[test]
fn a_panicking_drop_after_the_result_is_built_leaks_nothing() {
    common::quiet_injected_panics();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _w = common::watchdog(std::time::Duration::from_secs(300), "attack_s69");
    let mut bad = Vec::new();
    let mut cases = 0;
    for (name, call) in calls() {
        for scene in [Scene::Hit, Scene::Miss, Scene::Joining] {
            for (mask, what) in [(F_KEY, "key"), (F_INIT, "init"), (F_VAL, "value")] {
                for n in 1..64 {
                    cases += 1;
                    let (fired, wrong) = case(call, scene, mask, n);
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
    eprintln!("attack_s69: {cases} cases, {} wrong", bad.len());
    assert!(
        bad.is_empty(),
        "{} of {cases} cases:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// One case of the sweep, printed with the backtrace of its injected panic: `S69_CASE=name,
/// Hit|Miss,key|init|value,n S69_BACKTRACE=1 cargo test --test attack_s69 -- --ignored one_case`.
#[test]
#[ignore = "a tool: replays one case of the sweep"]
fn one_case() {
    let Ok(spec) = std::env::var("S69_CASE") else {
        return;
    };
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p: Vec<&str> = spec.split(',').collect();
    let call = calls()
        .into_iter()
        .find(|(n, _)| *n == p[0])
        .expect("a call")
        .1;
    let scene = if p[1] == "Hit" {
        Scene::Hit
    } else {
        Scene::Miss
    };
    let mask = match p[2] {
        "key" => F_KEY,
        "init" => F_INIT,
        _ => F_VAL,
    };
    let (fired, wrong) = case(call, scene, mask, p[3].parse().expect("n"));
    eprintln!("fired {fired}: {wrong:?}");
}

/// The helper's reproducer: `get_with` on a hit whose key's `Drop` panics.
#[test]
fn get_with_on_a_hit_whose_key_drop_panics_leaks_no_value() {
    common::quiet_injected_panics();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let call: Call = |c, k, g| Box::new(c.get_with(k, move || v(g, 9)));
    // The first key drop: the argument's, after the hit's clone of the value.
    let (fired, wrong) = case(call, Scene::Hit, F_KEY, 1);
    assert!(fired);
    assert_eq!(wrong, None);
}

#[test]
fn a_control_without_faults_is_clean() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (name, call) in calls() {
        for scene in [Scene::Hit, Scene::Miss] {
            let (fired, wrong) = case(call, scene, 0, 1);
            assert!(!fired, "{name}");
            assert_eq!(wrong, None, "{name} {scene:?}");
        }
    }
}

/// `CompResult` is `Any` (the sweep boxes it): a compile-time check that keeps the import used.
#[allow(dead_code)]
fn _is_any(r: CompResult<K, V>) -> Out {
    Box::new(r)
}

/// Dropping a cache, `invalidate_all` or `retain` whose N-th key or value `Drop` panics drops
/// every other key and value (the shards keep their entries in vectors, and removals go to
/// one, which go on dropping after a panicking element).
#[test]
fn a_panicking_drop_among_many_removed_drops_the_rest() {
    common::quiet_injected_panics();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bad = Vec::new();
    type Removal = fn(C);
    let hows: [(&str, Removal); 3] = [
        ("drop", drop),
        ("invalidate_all", |c| c.invalidate_all()),
        ("retain", |c| c.retain(|_, _| false)),
    ];
    for (how, remove) in hows {
        for (mask, what) in [(F_KEY, "key"), (F_VAL, "value")] {
            for n in [1, 2, 5, 17, 40] {
                MASK.store(0, SeqCst);
                FIRED.store(false, SeqCst);
                let (k0, v0) = (LIVE_K.load(SeqCst), LIVE_V.load(SeqCst));
                let cache: C = Cache::builder().max_capacity(1_000).build();
                for i in 0..40 {
                    cache.insert(K::new(i), V::new(i));
                }
                // The last handle for `drop`, another one kept for the others.
                let keep = (how != "drop").then(|| cache.clone());
                LEFT.store(n, SeqCst);
                MASK.store(mask, SeqCst);
                ARMED_HERE.with(|a| a.set(true));
                let r = catch_unwind(AssertUnwindSafe(|| remove(cache)));
                MASK.store(0, SeqCst);
                ARMED_HERE.with(|a| a.set(false));
                let left = keep.as_ref().map_or(0, |c| c.entry_count());
                drop(keep);
                let (dk, dv) = (LIVE_K.load(SeqCst) - k0, LIVE_V.load(SeqCst) - v0);
                if r.is_ok() || !FIRED.load(SeqCst) || dk != 0 || dv != 0 {
                    bad.push(format!(
                        "{how}, {what} drop #{n}: panicked {}, {left} entries left, then \
                         {dk} keys and {dv} values alive",
                        r.is_err()
                    ));
                    LIVE_K.fetch_sub(dk, SeqCst);
                    LIVE_V.fetch_sub(dv, SeqCst);
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
