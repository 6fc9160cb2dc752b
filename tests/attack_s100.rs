//! Round 100: an outside attack (a helper, public API only) on f79840b (`get_all` waits for a
//! flight whose leader gave it up before its load started, and claims the key again). 18
//! tests, 7 failing when written. Five fixed since: `get_all` gave up after three rounds of
//! joined loads ending with nothing and returned without the key, `load_missing` never
//! called (about 1 % of calls against leaders failing or dropped in turn); it now goes on as a
//! `get_with` does. Two more (the statistics ledger, `misses` = loads + coalesced + negative
//! hits, drifting by 1–11 under a load limit with `get_with_if` leaders while nested callers
//! take loads over, without `get_all` too) fixed in the next session: a judged leader whose
//! flight a write superseded ended it while a nested caller had taken its load over — the
//! taker's load then went uncounted, or, published first, counted the leader's miss twice.
mod common;

use common::{quiet_injected_panics, watchdog};
use herdcache::Cache;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type BoxFut<'a> = Pin<Box<dyn Future<Output = u64> + Send + 'a>>;

fn async_leader(c: &Cache<u64, u64>, key: u64, shared: bool) -> BoxFut<'_> {
    if shared {
        Box::pin(c.get_with_async_shared(key, async { 2 }))
    } else {
        let c3 = c.clone();
        Box::pin(async move { c3.get_with_async(key, async { 2 }).await })
    }
}

fn spin(n: u64) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

/// The statistics' ledger balances, nothing is left in flight, `validate()` holds.
use common::ledger_at as stats_ledger;

/// get_all nested in the only permit's load; an async leader of 20 waiting for a permit is
/// dropped at point `when` (with a random spin `jit`).
fn nested_round(shared: bool, when: u8, jit: u64, keys: Vec<u64>) -> Result<(), String> {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let go = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let asked: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
    let (c1, g1, i1, n1, a1) = (
        cache.clone(),
        Arc::clone(&go),
        Arc::clone(&inside),
        Arc::clone(&calls),
        Arc::clone(&asked),
    );
    let c2 = cache.clone();
    let keys2 = keys.clone();
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = c1.clone();
            let mut got = HashMap::new();
            c1.get_with(10, || {
                i1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                got = c.get_all(keys2, |m| {
                    n1.fetch_add(1, Ordering::SeqCst);
                    a1.lock().unwrap().push(m.to_vec());
                    m.iter().map(|&k| (k, 100 + k)).collect()
                });
                1
            });
            got
        });
        while !inside.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fut = async_leader(&c2, 20, shared);
        let mut other = async_leader(&c2, 21, !shared);
        let first = fut.as_mut().poll(&mut cx).is_pending();
        let _ = other.as_mut().poll(&mut cx);
        match when {
            0 => {
                drop(fut);
                go.store(true, Ordering::SeqCst);
            }
            1 => {
                go.store(true, Ordering::SeqCst);
                drop(fut);
            }
            2 => {
                go.store(true, Ordering::SeqCst);
                spin(jit);
                drop(fut);
            }
            3 => {
                go.store(true, Ordering::SeqCst);
                spin(jit);
                let _ = fut.as_mut().poll(&mut cx);
                drop(fut);
            }
            _ => {
                go.store(true, Ordering::SeqCst);
                spin(jit);
                drop(other);
                let _ = fut.as_mut().poll(&mut cx);
                drop(fut);
                return (first, a.join());
            }
        }
        spin(jit / 2);
        drop(other);
        (first, a.join())
    });
    let what = format!("shared={shared} when={when} jit={jit} keys={keys:?}");
    let (first, a) = match r {
        None => return Err(format!("{what}: HANG")),
        Some(Err(_)) => return Err(format!("{what}: harness panicked")),
        Some(Ok(v)) => v,
    };
    if !first {
        return Err(format!("{what}: async leader not pending"));
    }
    let got = a.map_err(|p| format!("{what}: taker panicked: {}", common::panic_message(&*p)))?;
    let n = calls.load(Ordering::SeqCst);
    if n > 1 {
        return Err(format!(
            "{what}: load_missing called {n} times: {:?}",
            asked.lock().unwrap()
        ));
    }
    for m in asked.lock().unwrap().iter() {
        let mut d = m.clone();
        d.sort();
        d.dedup();
        if d.len() != m.len() {
            return Err(format!("{what}: load_missing given duplicates {m:?}"));
        }
    }
    for k in &keys {
        match got.get(k) {
            Some(&v) if v == 100 + k || v == 2 => {}
            Some(v) => return Err(format!("{what}: key {k} -> {v}")),
            None => {
                return Err(format!(
                    "{what}: key {k} absent from {got:?} (load_missing calls {n}: {:?})",
                    asked.lock().unwrap()
                ))
            }
        }
    }
    if got.keys().any(|k| !keys.contains(k)) {
        return Err(format!("{what}: extra keys in {got:?}"));
    }
    if cache.loads_in_flight() != 0 {
        return Err(format!(
            "{what}: {} loads in flight",
            cache.loads_in_flight()
        ));
    }
    let r = catch_unwind(AssertUnwindSafe(|| stats_ledger(&cache, &what)));
    r.map_err(|p| common::panic_message(&*p))
}

#[test]
fn nested_get_all_vs_dropped_async_leader() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "nested get_all vs dropped leader");
    let mut rng = common::rng(0x9e3779b97f4a7c15);
    let mut bad = Vec::new();
    let t0 = std::time::Instant::now();
    let mut runs = 0;
    'outer: for i in 0..400u64 {
        for shared in [true, false] {
            for when in 0..5u8 {
                let jit = rng() % 20_000;
                let keys = match i % 4 {
                    0 => vec![20],
                    1 => vec![20, 21, 20],
                    2 => vec![21, 20, 22],
                    _ => vec![20, 20, 20, 23],
                };
                runs += 1;
                if let Err(e) = nested_round(shared, when, jit, keys) {
                    bad.push(e);
                }
                if t0.elapsed() > Duration::from_secs(15) {
                    break 'outer;
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {runs} rounds failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// Plain get_all (no permit held): the only permit is held by a blocked get_with; an async
/// leader of 20 waits for it; get_all([20...]) joins; the leader is dropped; then the permit is
/// freed. With only joined keys, load_missing is unused at the first round, so 20 must come
/// back (claimed again, loaded by the one call of load_missing).
fn plain_round(
    shared: bool,
    when: u8,
    jit: u64,
    keys: Vec<u64>,
    expect_all: bool,
) -> Result<(), String> {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let gate = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (c1, g1, h1) = (cache.clone(), Arc::clone(&gate), Arc::clone(&holding));
    let c2 = cache.clone();
    let n1 = Arc::clone(&calls);
    let keys2 = keys.clone();
    let r = common::within(Duration::from_secs(10), move || {
        let holder = std::thread::spawn(move || {
            c1.get_with(99, || {
                h1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                99
            })
        });
        while !holding.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fut = async_leader(&c2, 20, shared);
        let first = fut.as_mut().poll(&mut cx).is_pending();
        let c3 = c2.clone();
        let started = Arc::new(AtomicBool::new(false));
        let s3 = Arc::clone(&started);
        let getter = std::thread::spawn(move || {
            s3.store(true, Ordering::SeqCst);
            c3.get_all(keys2, |m| {
                n1.fetch_add(1, Ordering::SeqCst);
                m.iter().map(|&k| (k, 100 + k)).collect::<HashMap<_, _>>()
            })
        });
        while !started.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        match when {
            0 => drop(fut),
            1 => {
                spin(jit);
                drop(fut);
            }
            2 => {
                std::thread::sleep(Duration::from_millis(2));
                drop(fut);
            }
            _ => {
                spin(jit);
                let _ = fut.as_mut().poll(&mut cx);
                drop(fut);
            }
        }
        spin(jit / 3);
        gate.store(true, Ordering::SeqCst);
        let h = holder.join();
        (first, h, getter.join())
    });
    let what = format!("plain shared={shared} when={when} jit={jit} keys={keys:?}");
    let (first, h, g) = match r {
        None => return Err(format!("{what}: HANG")),
        Some(Err(_)) => return Err(format!("{what}: harness panicked")),
        Some(Ok(v)) => v,
    };
    if !first {
        return Err(format!("{what}: leader not pending"));
    }
    if h.is_err() {
        return Err(format!("{what}: holder panicked"));
    }
    let got = g.map_err(|p| format!("{what}: get_all panicked: {}", common::panic_message(&*p)))?;
    let n = calls.load(Ordering::SeqCst);
    if n > 1 {
        return Err(format!("{what}: load_missing called {n} times"));
    }
    for k in &keys {
        match got.get(k) {
            Some(&v) if v == 100 + k => {}
            Some(v) => return Err(format!("{what}: key {k} -> {v}")),
            None if !expect_all => {}
            None => return Err(format!("{what}: key {k} absent from {got:?} (calls {n})")),
        }
    }
    if cache.loads_in_flight() != 0 {
        return Err(format!(
            "{what}: {} loads in flight",
            cache.loads_in_flight()
        ));
    }
    let r = catch_unwind(AssertUnwindSafe(|| stats_ledger(&cache, &what)));
    r.map_err(|p| common::panic_message(&*p))
}

#[test]
fn plain_get_all_joined_only_vs_dropped_async_leader() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "plain get_all joined");
    let mut rng = common::rng(0x1234_5678_9abc_def1);
    let mut bad = Vec::new();
    let mut runs = 0;
    let t0 = std::time::Instant::now();
    'outer: for i in 0..300u64 {
        for shared in [true, false] {
            for when in 0..4u8 {
                let keys = if i % 2 == 0 { vec![20] } else { vec![20, 20] };
                runs += 1;
                if let Err(e) = plain_round(shared, when, rng() % 50_000, keys, true) {
                    bad.push(e);
                }
                if t0.elapsed() > Duration::from_secs(12) {
                    break 'outer;
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {runs} rounds failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn plain_get_all_mixed_vs_dropped_async_leader() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "plain get_all mixed");
    let mut rng = common::rng(0x0fed_cba9_8765_4321);
    let mut bad = Vec::new();
    let mut runs = 0;
    let t0 = std::time::Instant::now();
    'outer: for _ in 0..300u64 {
        for shared in [true, false] {
            for when in 0..4u8 {
                runs += 1;
                // 21 is led by get_all, so load_missing is spent: 20 may be absent (documented).
                if let Err(e) = plain_round(shared, when, rng() % 50_000, vec![21, 20, 21], false) {
                    bad.push(e);
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    break 'outer;
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {runs} rounds failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

// ---- deterministic contract checks ----

#[derive(Clone, Debug, PartialEq, Eq)]
struct Coll(u64);
impl Hash for Coll {
    fn hash<H: Hasher>(&self, h: &mut H) {
        7u64.hash(h);
    }
}

#[test]
fn colliding_and_repeated_keys() {
    let _w = watchdog(Duration::from_secs(30), "colliding keys");
    let cache: Cache<Coll, u64> = Cache::builder().max_capacity(1000).record_stats().build();
    for k in (0..40).step_by(3) {
        cache.insert(Coll(k), 1000 + k);
    }
    let mut keys: Vec<Coll> = (0..40).map(Coll).collect();
    keys.extend((0..40).rev().map(Coll));
    let calls = AtomicUsize::new(0);
    let got = cache.get_all(keys, |m| {
        calls.fetch_add(1, Ordering::SeqCst);
        let mut d: Vec<u64> = m.iter().map(|c| c.0).collect();
        d.sort();
        let n = d.len();
        d.dedup();
        assert_eq!(n, d.len(), "duplicates in load_missing's keys");
        assert!(m.iter().all(|c| c.0 % 3 != 0), "cached key asked: {m:?}");
        m.iter().map(|c| (c.clone(), c.0)).collect()
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(got.len(), 40);
    for k in 0..40 {
        let want = if k % 3 == 0 { 1000 + k } else { k };
        assert_eq!(got.get(&Coll(k)), Some(&want), "key {k}");
        assert_eq!(cache.get(&Coll(k)), Some(want));
    }
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let s = cache.stats();
    assert_eq!(
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "{s:?}"
    );
}

#[test]
fn load_missing_returning_extra_and_missing_keys() {
    let _w = watchdog(Duration::from_secs(30), "extra keys");
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).record_stats().build();
    let calls = AtomicUsize::new(0);
    let got = cache.get_all([1, 2, 3, 2], |m| {
        calls.fetch_add(1, Ordering::SeqCst);
        let mut r: HashMap<u64, u64> = m
            .iter()
            .filter(|&&k| k != 2)
            .map(|&k| (k, k * 10))
            .collect();
        r.insert(50, 500);
        r.insert(51, 510);
        r
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1, "load_missing once");
    assert_eq!(got.get(&1), Some(&10));
    assert_eq!(got.get(&3), Some(&30));
    assert_eq!(got.get(&2), None, "not returned: absent");
    assert!(
        !got.contains_key(&50) && !got.contains_key(&51),
        "extras in result: {got:?}"
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(cache.loads_in_flight(), 0);
    stats_ledger(&cache, "extra");
    // And a second call loads 2 (the failed key does not stick).
    let got = cache.get_all([2], |m| m.iter().map(|&k| (k, 7)).collect());
    assert_eq!(got.get(&2), Some(&7));
    stats_ledger(&cache, "extra 2");
}

#[test]
fn load_missing_panics_releases_waiters() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(30), "panic in load_missing");
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).record_stats().build();
    let entered = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (c, e, r) = (cache.clone(), Arc::clone(&entered), Arc::clone(&release));
    let t = std::thread::spawn(move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_all([1, 2, 3], |_| {
                e.store(true, Ordering::SeqCst);
                while !r.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                panic!("injected load_missing panic")
            })
        }))
        .is_err()
    });
    while !entered.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let c2 = cache.clone();
    let w = common::start(move || c2.get_with(2, || 22));
    let c3 = cache.clone();
    let w2 =
        common::start(move || c3.get_all([3, 4], |m| m.iter().map(|&k| (k, k + 300)).collect()));
    let c4 = cache.clone();
    let w3 =
        common::start(move || c4.get_all([1, 1], |m| m.iter().map(|&k| (k, k + 300)).collect()));
    std::thread::sleep(Duration::from_millis(20));
    release.store(true, Ordering::SeqCst);
    assert!(t.join().unwrap(), "the panic went on");
    assert_eq!(
        w.wait(Duration::from_secs(5))
            .expect("waiter hang")
            .unwrap(),
        22
    );
    let m = w2
        .wait(Duration::from_secs(5))
        .expect("get_all waiter hang")
        .unwrap();
    assert_eq!(m.get(&4), Some(&304));
    // 3 joined, 4 led: load_missing spent when 3's load fails, so 3 may be absent (documented).
    assert!(m.get(&3).is_none_or(|&v| v == 303), "{m:?}");
    let m = w3
        .wait(Duration::from_secs(5))
        .expect("get_all waiter hang")
        .unwrap();
    assert_eq!(
        m.get(&1),
        Some(&301),
        "only joined keys: claimed again and loaded: {m:?}"
    );
    assert_eq!(m.len(), 1);
    stats_ledger(&cache, "panic");
}

#[test]
fn recursive_get_all_of_same_key_panics() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(30), "recursive get_all");
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).record_stats().build();
    let c = cache.clone();
    let r = common::within(Duration::from_secs(5), move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_all([1, 2], |m| {
                let inner = c.get_all([2, 3], |n| n.iter().map(|&k| (k, k)).collect());
                let mut out: HashMap<u64, u64> = m.iter().map(|&k| (k, k)).collect();
                out.extend(inner);
                out
            })
        }))
        .is_err()
    });
    let panicked = r.expect("recursive get_all hung").unwrap();
    assert!(
        panicked,
        "a load_missing asking for a key it loads must panic (documented)"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    stats_ledger(&cache, "recursive");
    // Different keys nested: fine.
    let c = cache.clone();
    let got = cache.get_all([10, 11], |m| {
        let inner = c.get_all([12], |n| n.iter().map(|&k| (k, k)).collect());
        assert_eq!(inner.get(&12), Some(&12));
        m.iter().map(|&k| (k, k)).collect()
    });
    assert_eq!(got.len(), 2);
    stats_ledger(&cache, "nested other keys");
}

#[test]
fn recursive_get_all_under_limit_one_panics_not_hangs() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(30), "recursive get_all limit");
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let c = cache.clone();
    let r = common::within(Duration::from_secs(5), move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(5, || {
                let got = c.get_all([1, 5], |m| m.iter().map(|&k| (k, k)).collect());
                got.len() as u64
            })
        }))
        .is_err()
    });
    let panicked = r.expect("recursive get_all under limit hung").unwrap();
    assert!(
        panicked,
        "get_all of the key its enclosing get_with loads must panic"
    );
    stats_ledger(&cache, "recursive limit");
    // Nested other keys under limit 1: loads.
    let c = cache.clone();
    let v = common::finish_within(5, move || {
        c.get_with(6, || {
            let got = c.get_all([7, 8], |m| m.iter().map(|&k| (k, k)).collect());
            got.values().sum()
        })
    });
    assert_eq!(v, 15);
    stats_ledger(&cache, "nested limit");
}

/// Many threads: async leaders dropped at random while get_all (plain and nested) run.
#[test]
fn storm_get_all_vs_async_leaders() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "storm");
    let t0 = std::time::Instant::now();
    let mut round = 0u64;
    while t0.elapsed() < Duration::from_secs(10) {
        round += 1;
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(1000)
            .max_concurrent_loads(1)
            .record_stats()
            .build();
        let bad: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for t in 0..2u64 {
            let (c, s) = (cache.clone(), Arc::clone(&stop));
            hs.push(std::thread::spawn(move || {
                let mut rng = common::rng(round * 31 + t + 1);
                let waker = futures::task::noop_waker();
                let mut cx = std::task::Context::from_waker(&waker);
                while !s.load(Ordering::SeqCst) {
                    let k = rng() % 8;
                    let mut f = async_leader(&c, k, rng() % 2 == 0);
                    let ready = f.as_mut().poll(&mut cx).is_ready();
                    spin(rng() % 2000);
                    if !ready && rng() % 3 == 0 {
                        let _ = f.as_mut().poll(&mut cx);
                    }
                    drop(f);
                    if rng() % 5 == 0 {
                        c.invalidate(&k);
                    }
                }
            }));
        }
        for t in 0..2u64 {
            let (c, b, s) = (cache.clone(), Arc::clone(&bad), Arc::clone(&stop));
            hs.push(std::thread::spawn(move || {
                let mut rng = common::rng(round * 77 + t + 9);
                for _ in 0..150 {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let keys: Vec<u64> = (0..1 + rng() % 4).map(|_| rng() % 8).collect();
                    let calls = AtomicUsize::new(0);
                    let run = |keys: Vec<u64>| {
                        c.get_all(keys, |m| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            m.iter().map(|&k| (k, 100 + k)).collect()
                        })
                    };
                    let nested = t == 1;
                    let got = if nested {
                        let mut got = HashMap::new();
                        let outer = 1000 + rng() % 1000;
                        c.get_with(outer, || {
                            got = run(keys.clone());
                            0
                        });
                        c.invalidate(&outer);
                        got
                    } else {
                        run(keys.clone())
                    };
                    let n = calls.load(Ordering::SeqCst);
                    if n > 1 {
                        b.lock().unwrap().push(format!("nested={nested} {keys:?}: {n} calls"));
                    }
                    for k in &keys {
                        match got.get(k) {
                            Some(&v) if v == 100 + k || v == 2 => {}
                            None if !nested => {}
                            other => b
                                .lock()
                                .unwrap()
                                .push(format!("nested={nested} {keys:?}: key {k} -> {other:?} ({got:?}, calls {n})")),
                        }
                    }
                    if rng() % 3 == 0 {
                        c.invalidate_all();
                    }
                }
            }));
        }
        let r = common::within(Duration::from_secs(20), move || {
            let (getters, leaders): (Vec<_>, Vec<_>) =
                hs.into_iter().enumerate().partition(|(i, _)| *i >= 2);
            for (_, g) in getters {
                g.join().unwrap();
            }
            stop.store(true, Ordering::SeqCst);
            for (_, l) in leaders {
                l.join().unwrap();
            }
        });
        r.expect("storm hang").expect("storm thread panicked");
        let bad = bad.lock().unwrap();
        assert!(
            bad.is_empty(),
            "round {round}: {} failures:\n{}",
            bad.len(),
            bad.join("\n")
        );
        stats_ledger(&cache, &format!("storm round {round}"));
    }
}

/// Other callers keep leading key 1 and failing (their `init` panics): a `get_all([1])` that
/// joins them should, per the doc, hand the key to `load_missing` (never called yet) once a
/// joined load ends with nothing — never return without the key and without calling it.
fn failing_leaders_round(mode: u8, secs: u64) -> Vec<String> {
    let async_leaders = mode >= 1;
    let mut b = Cache::builder().max_capacity(100).record_stats();
    if mode == 2 {
        b = b.max_concurrent_loads(1);
    }
    let cache: Cache<u64, u64> = b.build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    if mode == 2 {
        // Keeps the only permit busy most of the time: the async leaders of 1 wait for it.
        let (c, s) = (cache.clone(), Arc::clone(&stop));
        hs.push(std::thread::spawn(move || {
            let mut i = 1000;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                c.get_with(i, || {
                    std::thread::sleep(Duration::from_micros(300));
                    0
                });
                c.invalidate(&i);
            }
        }));
    }
    for t in 0..4u64 {
        let (c, s) = (cache.clone(), Arc::clone(&stop));
        hs.push(std::thread::spawn(move || {
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut rng = common::rng(t + 5);
            while !s.load(Ordering::SeqCst) {
                if async_leaders {
                    // An async leader whose load never ends by itself (mode 1), or one waiting
                    // for the only permit (mode 2): dropped after a while.
                    let mut f: BoxFut<'_> = if mode == 2 && t % 2 == 0 {
                        Box::pin(c.get_with_async_shared(1, futures::future::pending::<u64>()))
                    } else {
                        Box::pin(c.get_with_async(1, futures::future::pending::<u64>()))
                    };
                    let _ = f.as_mut().poll(&mut cx);
                    std::thread::sleep(Duration::from_micros(200 + rng() % 300));
                    drop(f);
                } else {
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        c.get_with(1, || {
                            std::thread::sleep(Duration::from_micros(200 + rng() % 300));
                            panic!("injected init panic")
                        })
                    }));
                }
                c.invalidate(&1);
            }
        }));
    }
    let mut bad = Vec::new();
    let t0 = std::time::Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        n += 1;
        let calls = AtomicUsize::new(0);
        let got = cache.get_all([1], |m| {
            calls.fetch_add(1, Ordering::SeqCst);
            m.iter().map(|&k| (k, 111)).collect()
        });
        let c = calls.load(Ordering::SeqCst);
        if c > 1 {
            bad.push(format!("call {n}: load_missing called {c} times"));
        }
        if !got.contains_key(&1) && c == 0 {
            bad.push(format!(
                "async={async_leaders} call {n}: key 1 absent, load_missing never called ({got:?})"
            ));
        }
        if let Some(&v) = got.get(&1) {
            if v != 111 {
                bad.push(format!("call {n}: value {v}"));
            }
        }
        cache.invalidate(&1);
    }
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(cache.loads_in_flight(), 0);
    stats_ledger(&cache, "failing leaders");
    if !bad.is_empty() {
        bad.insert(
            0,
            format!("mode {mode}: {} bad of {n} get_all calls", bad.len()),
        );
    }
    bad
}

#[test]
fn get_all_joined_to_failing_leaders_sync() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "failing sync leaders");
    let bad = failing_leaders_round(0, 4);
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn get_all_joined_to_dropped_async_leaders() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "dropped async leaders");
    let bad = failing_leaders_round(1, 4);
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn get_all_joined_to_async_leaders_dropped_waiting_for_permit() {
    quiet_injected_panics();
    let _w = watchdog(
        Duration::from_secs(60),
        "async leaders dropped waiting for permit",
    );
    let bad = failing_leaders_round(2, 5);
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The commit's case, stormed: a `get_all([1, 2])` nested in a load holding the only permit,
/// while other threads keep registering async leaders of 1 (borrowed and shared) that wait
/// for a permit and are dropped. Every key must come back (a given-up leader's key is claimed
/// again before `load_missing` runs), `load_missing` at most once.
#[test]
fn nested_get_all_storm_of_dropped_waiting_leaders() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "nested storm");
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(1000)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let (c, s) = (cache.clone(), Arc::clone(&stop));
        hs.push(std::thread::spawn(move || {
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut rng = common::rng(t + 77);
            while !s.load(Ordering::SeqCst) {
                let mut f = async_leader(&c, 1, rng() % 2 == 0);
                let ready = f.as_mut().poll(&mut cx).is_ready();
                spin(rng() % 3000);
                if !ready && rng() % 4 == 0 {
                    let _ = f.as_mut().poll(&mut cx);
                }
                drop(f);
                if rng() % 2 == 0 {
                    c.invalidate(&1);
                }
            }
        }));
    }
    let c = cache.clone();
    let s2 = Arc::clone(&stop);
    let r = common::within(Duration::from_secs(40), move || {
        let mut bad = Vec::new();
        let t0 = std::time::Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(5) {
            n += 1;
            let calls = AtomicUsize::new(0);
            let mut got = HashMap::new();
            let outer = 1000 + n;
            c.get_with(outer, || {
                got = c.get_all([1, 2, 1], |m| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    m.iter().map(|&k| (k, 100 + k)).collect()
                });
                0
            });
            c.invalidate(&outer);
            let k = calls.load(Ordering::SeqCst);
            if k > 1 {
                bad.push(format!("call {n}: load_missing {k} times"));
            }
            for key in [1u64, 2] {
                match got.get(&key) {
                    Some(&v) if v == 100 + key || (key == 1 && v == 2) => {}
                    other => bad.push(format!(
                        "call {n}: key {key} -> {other:?} ({got:?}, calls {k})"
                    )),
                }
            }
            c.invalidate(&2);
            if n % 2 == 0 {
                c.invalidate(&1);
            }
        }
        s2.store(true, Ordering::SeqCst);
        (n, bad)
    });
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    let (n, bad) = r
        .expect("nested storm hang")
        .expect("nested storm panicked");
    assert!(
        bad.is_empty(),
        "{} bad of {n}:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    stats_ledger(&cache, "nested storm");
}

/// Judged leaders (`get_with_if`) that keep the value after their claim (given up before
/// their load, with a value) vs `get_all` (plain and nested under a limit of 2): values sane,
/// `load_missing` at most once, the statistics' ledger balanced.
#[test]
fn get_all_vs_judged_leaders_keeping_values() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "judged leaders");
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(1000)
        .max_concurrent_loads(2)
        .record_stats()
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (c, s) = (cache.clone(), Arc::clone(&stop));
        hs.push(std::thread::spawn(move || {
            let mut rng = common::rng(t + 3);
            while !s.load(Ordering::SeqCst) {
                // Rejects 5 (replaces it), keeps 7.
                let v = c.get_with_if(1, || 5, |v| *v == 5);
                assert!(v == 5 || v == 7 || v == 101, "get_with_if got {v}");
                if rng() % 2 == 0 {
                    c.insert(1, 7);
                } else {
                    c.insert(1, 5);
                }
            }
        }));
    }
    let r = common::within(Duration::from_secs(40), {
        let c = cache.clone();
        move || {
            let mut bad = Vec::new();
            let t0 = std::time::Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < Duration::from_secs(5) {
                n += 1;
                let calls = AtomicUsize::new(0);
                let nested = n % 2 == 0;
                let run = || {
                    c.get_all([1, 2], |m| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        m.iter().map(|&k| (k, 100 + k)).collect()
                    })
                };
                let got = if nested {
                    let mut got = HashMap::new();
                    c.get_with(5000 + n, || {
                        got = run();
                        0
                    });
                    c.invalidate(&(5000 + n));
                    got
                } else {
                    run()
                };
                let k = calls.load(Ordering::SeqCst);
                if k > 1 {
                    bad.push(format!("call {n}: load_missing {k} times"));
                }
                match got.get(&1) {
                    Some(5 | 7 | 101) | None => {}
                    other => bad.push(format!("call {n}: key 1 -> {other:?}")),
                }
                if got.get(&2) != Some(&102) {
                    bad.push(format!("call {n}: key 2 -> {:?}", got.get(&2)));
                }
                c.invalidate(&2);
                if n % 3 == 0 {
                    c.invalidate(&1);
                }
            }
            (n, bad)
        }
    });
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    let (n, bad) = r.expect("judged hang").expect("judged panicked");
    assert!(
        bad.is_empty(),
        "{} bad of {n}:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    stats_ledger(&cache, "judged");
}

/// Deterministic form: `get_all([1])` joins an async leader's load of 1; the leader is dropped
/// and, at once on the same thread, a new async leader of 1 registers (before the woken
/// `get_all` claims again) — `rounds` times. `limit`: under `max_concurrent_loads(1)` with the
/// permit held, so every leader is given up *before its load started* (the commit's case).
fn relay_of_dropped_leaders(limit: bool, shared: bool, rounds: usize) -> (Option<u64>, usize) {
    let mut b = Cache::builder().max_capacity(100).record_stats();
    if limit {
        b = b.max_concurrent_loads(1);
    }
    let cache: Cache<u64, u64> = b.build();
    let gate = Arc::new(AtomicBool::new(!limit));
    let holding = Arc::new(AtomicBool::new(!limit));
    let (c1, g1, h1) = (cache.clone(), Arc::clone(&gate), Arc::clone(&holding));
    let holder = std::thread::spawn(move || {
        if !g1.load(Ordering::SeqCst) {
            c1.get_with(99, || {
                h1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                99
            });
        }
    });
    while !holding.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    fn leader_of(c: &Cache<u64, u64>, shared: bool) -> BoxFut<'_> {
        if shared {
            Box::pin(c.get_with_async_shared(1, futures::future::pending::<u64>()))
        } else {
            Box::pin(c.get_with_async(1, futures::future::pending::<u64>()))
        }
    }
    let leader = |c| leader_of(c, shared);
    let mut f = leader(&cache);
    assert!(f.as_mut().poll(&mut cx).is_pending());
    let calls = Arc::new(AtomicUsize::new(0));
    let (c2, n2) = (cache.clone(), Arc::clone(&calls));
    let g = common::start(move || {
        c2.get_all([1], |m| {
            n2.fetch_add(1, Ordering::SeqCst);
            m.iter().map(|&k| (k, 111)).collect::<HashMap<_, _>>()
        })
    });
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..rounds {
        drop(f);
        f = leader(&cache);
        if f.as_mut().poll(&mut cx).is_ready() {
            break; // the woken get_all claimed first and loaded: no relay
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(f);
    gate.store(true, Ordering::SeqCst);
    holder.join().unwrap();
    let got = g
        .wait(Duration::from_secs(10))
        .expect("get_all hang")
        .expect("get_all panicked");
    assert_eq!(cache.loads_in_flight(), 0);
    stats_ledger(&cache, "relay");
    (got.get(&1).copied(), calls.load(Ordering::SeqCst))
}

fn relay_check(limit: bool) {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "relay");
    let mut bad = Vec::new();
    let mut runs = 0;
    for shared in [false, true] {
        for rounds in [1usize, 2, 3, 5] {
            runs += 1;
            let (v, calls) = relay_of_dropped_leaders(limit, shared, rounds);
            if calls > 1 || (v.is_none() && calls == 0) || v.is_some_and(|v| v != 111) {
                bad.push(format!(
                    "limit={limit} shared={shared} {rounds} leaders dropped in turn: key 1 -> {v:?}, load_missing called {calls} times"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {runs}:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn relay_of_dropped_async_leaders() {
    relay_check(false);
}

#[test]
fn relay_of_async_leaders_dropped_waiting_for_permit() {
    relay_check(true);
}

/// Control for `get_all_vs_judged_leaders_keeping_values`: the same judged leaders and
/// writes, with nested `get_with` calls of other keys instead of `get_all` (is the ledger's
/// drift get_all's?).
#[test]
fn control_judged_leaders_without_get_all() {
    judged_control(true);
}

/// The same without `max_concurrent_loads` and without nesting.
#[test]
fn control_judged_leaders_no_limit() {
    judged_control(false);
}

fn judged_control(limit: bool) {
    let _w = watchdog(Duration::from_secs(60), "judged control");
    let mut b = Cache::builder().max_capacity(1000).record_stats();
    if limit {
        b = b.max_concurrent_loads(2);
    }
    let cache: Cache<u64, u64> = b.build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (c, s) = (cache.clone(), Arc::clone(&stop));
        hs.push(std::thread::spawn(move || {
            let mut rng = common::rng(t + 3);
            while !s.load(Ordering::SeqCst) {
                let v = c.get_with_if(1, || 5, |v| *v == 5);
                assert!(v == 5 || v == 7 || v == 101, "get_with_if got {v}");
                if rng() % 2 == 0 {
                    c.insert(1, 7);
                } else {
                    c.insert(1, 5);
                }
            }
        }));
    }
    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(5) {
        n += 1;
        if limit && n % 2 == 0 {
            cache.get_with(5000 + n, || {
                let _ = cache.get_with(1, || 101);
                cache.get_with(2, || 102)
            });
            cache.invalidate(&(5000 + n));
        } else {
            let _ = cache.get_with(1, || 101);
            let _ = cache.get_with(2, || 102);
        }
        cache.invalidate(&2);
        if n % 3 == 0 {
            cache.invalidate(&1);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    stats_ledger(&cache, "judged control");
}
