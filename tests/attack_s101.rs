//! Round 101: an outside attack (a helper, public API only) on the statistics ledger around
//! `judge_again`'s `Judged::Again` branch (a `get_with_if` leader superseded by a write while a
//! caller nested in a load under `max_concurrent_loads` took its load over: 0a54aef) and its
//! neighbours. 17 tests (deterministic sweeps of the takeover against every write, verdict,
//! finishing order and entry point, sync and async; storms of every loading entry point under
//! limits of 1 and 2 with nesting, negative caching, fail-safe and refresh-ahead), none
//! failing when written: kept as the fix's regression tests. Against the code before the fix,
//! the two deterministic takeover sweeps (`judged_leader_taken_over_deterministic_*`) fail.
mod common;

use common::{quiet_injected_panics, watchdog};
use herdcache::Cache;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The statistics' ledger balances, nothing is left in flight, `validate()` holds.
use common::ledger_at as stats_ledger;

/// Ledger check that returns the drift instead of panicking (for rate counting).
fn ledger_drift(cache: &Cache<u64, u64>) -> Option<String> {
    ledger_drift_less(cache, 0)
}

/// [`ledger_drift`], less `get_misses` misses of plain `get`s (which count their miss only).
fn ledger_drift_less(cache: &Cache<u64, u64>, get_misses: u64) -> Option<String> {
    let s = cache.stats();
    let lhs = s.misses + s.refreshes_started - get_misses;
    let rhs =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    if lhs != rhs || s.loads_in_flight != 0 || cache.loads_in_flight() != 0 {
        return Some(format!(
            "misses+refreshes_started={lhs} != loads+coalesced+negative={rhs} (in flight {} / {}): {s:?}",
            s.loads_in_flight,
            cache.loads_in_flight()
        ));
    }
    None
}

fn wait_flag(f: &AtomicBool, limit: Duration) -> bool {
    let t0 = Instant::now();
    while !f.load(Ordering::SeqCst) {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sup {
    None,
    Insert,
    Invalidate,
    /// A computation (`and_compute_with`, `Put(7)`) from a third thread.
    ComputePut,
    /// A computation removing the key, from a third thread.
    ComputeRemove,
    /// An insert from a third thread.
    InsertElsewhere,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Keep,
    Reject,
    Panic,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    /// The taker's call returns (publishes) before the judged leader's `judge` returns.
    TakerFirst,
    /// The judged leader's `judge` returns while the taker's loader still runs.
    JudgeFirst,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum Taker {
    GetWithIf,
    EntryIf,
    Panic,
    AsyncIf,
}

#[derive(Default)]
struct Flags {
    a_has_permit: AtomicBool,
    b_in_judge: AtomicBool,
    stolen: AtomicBool,
    judge_out: AtomicBool,
    taker_done: AtomicBool,
    written: AtomicBool,
    a_calls: AtomicUsize,
    b_calls: AtomicUsize,
}

/// One deterministic round: A holds the only permit (its loader for key 100) and, nested,
/// calls a judged load of key 1 that joins and takes over B's flight of key 1 while B's
/// `judge` runs in its second look (`judge_again`). A's loader may write key 1 (superseding the
/// flight) before B's `judge` returns. Returns (coverage hit, error).
fn judged_takeover_round(
    sup: Sup,
    verdict: Verdict,
    order: Order,
    taker: Taker,
    async_b: bool,
    waiter: bool,
) -> (bool, Result<(), String>) {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    cache.insert(1, 5);
    let f = Arc::new(Flags::default());
    let covered = Arc::new(AtomicBool::new(false));
    let what = format!(
        "sup={sup:?} verdict={verdict:?} order={order:?} taker={taker:?} async_b={async_b}"
    );
    let (ca, fa) = (cache.clone(), Arc::clone(&f));
    let (cb, fb, cov) = (cache.clone(), Arc::clone(&f), Arc::clone(&covered));
    let (cw, fw) = (cache.clone(), Arc::clone(&f));
    // A third caller of key 1 that joins B's flight before A takes it over (`waiter`).
    let c_handle: Arc<Mutex<Option<std::thread::JoinHandle<u64>>>> = Arc::default();
    let c_calls = Arc::new(AtomicUsize::new(0));
    let (ch, cc_calls) = (Arc::clone(&c_handle), Arc::clone(&c_calls));
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = ca.clone();
            let fa2 = Arc::clone(&fa);
            let mut got = None;
            let outer = ca.get_with(100, || {
                fa2.a_has_permit.store(true, Ordering::SeqCst);
                wait_flag(&fa2.b_in_judge, Duration::from_secs(2));
                if waiter {
                    let before = c.stats().coalesced;
                    let (cc, n) = (c.clone(), Arc::clone(&cc_calls));
                    *ch.lock().unwrap() = Some(std::thread::spawn(move || {
                        cc.get_with_if(
                            1,
                            || {
                                n.fetch_add(1, Ordering::SeqCst);
                                400
                            },
                            |v| *v == 5,
                        )
                    }));
                    let t0 = Instant::now();
                    while c.stats().coalesced == before && t0.elapsed() < Duration::from_millis(300)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                let c2 = c.clone();
                let fi = Arc::clone(&fa2);
                let init = move || {
                    fi.a_calls.fetch_add(1, Ordering::SeqCst);
                    match sup {
                        Sup::Insert => c2.insert(1, 7),
                        Sup::Invalidate => c2.invalidate(&1),
                        _ => {}
                    }
                    fi.stolen.store(true, Ordering::SeqCst);
                    // A third thread's write (it may wait for this load: bounded wait).
                    wait_flag(&fi.written, Duration::from_millis(30));
                    if order == Order::JudgeFirst {
                        wait_flag(&fi.judge_out, Duration::from_secs(3));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    200u64
                };
                let r = catch_unwind(AssertUnwindSafe(|| match taker {
                    Taker::GetWithIf => c.get_with_if(1, init, |v| *v == 5),
                    Taker::EntryIf => c.entry(1).or_insert_with_if(init, |v| *v == 5).into_value(),
                    Taker::Panic => c.get_with_if(
                        1,
                        move || {
                            init();
                            panic!("injected taker panic")
                        },
                        |v| *v == 5,
                    ),
                    Taker::AsyncIf => futures::executor::block_on(c.get_with_if_async(
                        1,
                        async move { init() },
                        |v| *v == 5,
                    )),
                }));
                got = Some(r.ok());
                fa2.taker_done.store(true, Ordering::SeqCst);
                1
            });
            (outer, got)
        });
        let b = std::thread::spawn(move || {
            wait_flag(&fb.a_has_permit, Duration::from_secs(3));
            let done = Arc::new(AtomicBool::new(false));
            let (c3, fj, d) = (cb.clone(), Arc::clone(&fb), Arc::clone(&done));
            let judge = move |v: &u64| {
                if !d.load(Ordering::SeqCst) && c3.loads_in_flight() >= 2 {
                    d.store(true, Ordering::SeqCst);
                    cov.store(true, Ordering::SeqCst);
                    fj.b_in_judge.store(true, Ordering::SeqCst);
                    wait_flag(&fj.stolen, Duration::from_secs(3));
                    wait_flag(&fj.written, Duration::from_millis(30));
                    if order == Order::TakerFirst {
                        wait_flag(&fj.taker_done, Duration::from_secs(3));
                    }
                    fj.judge_out.store(true, Ordering::SeqCst);
                    match verdict {
                        Verdict::Keep => return false,
                        Verdict::Reject => return true,
                        Verdict::Panic => panic!("injected judge panic"),
                    }
                }
                *v == 5
            };
            let fi = Arc::clone(&fb);
            if async_b {
                futures::executor::block_on(cb.get_with_if_async(
                    1,
                    async move {
                        fi.b_calls.fetch_add(1, Ordering::SeqCst);
                        300
                    },
                    judge,
                ))
            } else {
                cb.get_with_if(
                    1,
                    move || {
                        fi.b_calls.fetch_add(1, Ordering::SeqCst);
                        300
                    },
                    judge,
                )
            }
        });
        let (cw, fw) = (cw, fw);
        let w = std::thread::spawn(move || {
            wait_flag(&fw.stolen, Duration::from_secs(3));
            match sup {
                Sup::ComputePut => {
                    let _ = cw.entry(1).and_compute_with(|_| herdcache::Op::Put(7));
                }
                Sup::ComputeRemove => {
                    let _ = cw.entry(1).and_compute_with(|_| herdcache::Op::Remove);
                }
                Sup::InsertElsewhere => cw.insert(1, 7),
                _ => {}
            }
            fw.written.store(true, Ordering::SeqCst);
        });
        let (outer, got) = a.join().map_err(|_| "A panicked".to_string())?;
        let vb = match b.join() {
            Ok(v) => Some(v),
            Err(p) if verdict == Verdict::Panic => {
                common::discard(p);
                None
            }
            Err(p) => return Err(format!("B panicked: {}", common::panic_message(&*p))),
        };
        w.join().map_err(|_| "W panicked".to_string())?;
        let h = c_handle.lock().unwrap().take();
        let vc = match h {
            Some(h) => Some(
                h.join()
                    .map_err(|p| format!("C panicked: {}", common::panic_message(&*p)))?,
            ),
            None => None,
        };
        if let Some(v) = vc {
            if ![5, 7, 200, 300, 400].contains(&v) {
                return Err(format!("waiter got {v}"));
            }
        }
        if c_calls.load(Ordering::SeqCst) > 1 {
            return Err("waiter's loader called twice".to_string());
        }
        Ok::<_, String>((outer, got, vb))
    });
    let res = match r {
        None => Err(format!("{what}: HANG (10 s)")),
        Some(Err(_)) => Err(format!("{what}: round panicked")),
        Some(Ok(Err(e))) => Err(format!("{what}: {e}")),
        Some(Ok(Ok((outer, got, vb)))) => (|| {
            if outer != 1 {
                return Err(format!("{what}: outer get_with returned {outer}"));
            }
            match (taker, got) {
                (Taker::Panic, Some(None)) => {}
                (Taker::Panic, other) => {
                    return Err(format!("{what}: panicking taker returned {other:?}"))
                }
                (_, Some(Some(v))) if [5, 7, 200, 400].contains(&v) => {}
                (_, other) => return Err(format!("{what}: taker got {other:?}")),
            }
            // 400: the waiter's own load, which a caller retrying after a failed load may join.
            if matches!(vb, Some(v) if ![5, 7, 200, 300, 400].contains(&v)) {
                return Err(format!("{what}: judged leader got {vb:?}"));
            }
            let (na, nb) = (
                f.a_calls.load(Ordering::SeqCst),
                f.b_calls.load(Ordering::SeqCst),
            );
            if na > 1 || nb > 1 {
                return Err(format!("{what}: loader calls a={na} b={nb}"));
            }
            if let Some(d) = ledger_drift(&cache) {
                return Err(format!("{what}: {d}"));
            }
            catch_unwind(AssertUnwindSafe(|| cache.validate()))
                .map_err(|p| format!("{what}: validate: {}", common::panic_message(&*p)))?;
            Ok(())
        })(),
    };
    (covered.load(Ordering::SeqCst), res)
}

/// Every combination of write (none / insert / invalidate), verdict (keep / reject), order,
/// taker (get_with_if / entry or_insert_with_if / panicking / async) and judged leader (sync /
/// async), a few times each.
fn judged_leader_taken_over(async_b: bool) {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "judged takeover deterministic");
    let mut failures = Vec::new();
    let (mut rounds, mut covered) = (0, 0);
    {
        for taker in [
            Taker::GetWithIf,
            Taker::EntryIf,
            Taker::Panic,
            Taker::AsyncIf,
        ] {
            for sup in [
                Sup::None,
                Sup::Insert,
                Sup::Invalidate,
                Sup::ComputePut,
                Sup::ComputeRemove,
                Sup::InsertElsewhere,
            ] {
                for verdict in [Verdict::Keep, Verdict::Reject, Verdict::Panic] {
                    for order in [Order::TakerFirst, Order::JudgeFirst] {
                        rounds += 1;
                        let t0 = Instant::now();
                        let waiter = rounds % 2 == 0;
                        let (cov, r) =
                            judged_takeover_round(sup, verdict, order, taker, async_b, waiter);
                        if std::env::var("H101_SLOW").is_ok()
                            && t0.elapsed() > Duration::from_millis(100)
                        {
                            eprintln!(
                                "slow {:?}: {sup:?} {verdict:?} {order:?} {taker:?}",
                                t0.elapsed()
                            );
                        }
                        covered += cov as usize;
                        if let Err(e) = r {
                            failures.push(e);
                        }
                    }
                }
            }
        }
    }
    eprintln!("judged takeover (async_b={async_b}): {rounds} rounds, {covered} reached the blocked second look");
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// B (the judged leader) is a blocking `get_with_if`.
#[test]
fn judged_leader_taken_over_deterministic_sync() {
    judged_leader_taken_over(false);
}

/// B (the judged leader) is a `get_with_if_async`, run to completion.
#[test]
fn judged_leader_taken_over_deterministic_async() {
    judged_leader_taken_over(true);
}

// ---------------------------------------------------------------------------------------------
// Random storms over every loading entry point.

const M: u64 = 1_000_000;

thread_local! {
    /// Misses of plain `get`s made by this thread (not loads: outside the ledger).
    static GET_MISSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn tagged(k: u64, tag: u64) -> u64 {
    k * M + (tag % M)
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    limit: usize,
    negative: bool,
    fail_safe: bool,
    refresh: bool,
    timeout: bool,
    threads: u64,
    get_or_stale: bool,
    hot: bool,
    depth: u32,
}

type Bad = Arc<Mutex<Vec<String>>>;

fn check(bad: &Bad, what: &str, k: u64, v: u64) {
    if v / M != k {
        let mut b = bad.lock().unwrap();
        if b.len() < 20 {
            b.push(format!(
                "{what}({k}) returned {v}: no loader or insert of key {k} made it"
            ));
        }
    }
}

fn poll_once_drop<F: Future>(f: F) {
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = Box::pin(f);
    let _ = f.as_mut().poll(&mut cx);
    drop(f);
}

/// One random op on `c`; `depth` > 0 allows a nested op inside a loader.
fn one_op(c: &Cache<u64, u64>, cfg: Cfg, rng: &mut dyn FnMut() -> u64, bad: &Bad, depth: u32) {
    let k = rng() % if cfg.hot { 2 } else { 4 } + 1;
    let tag = rng() % 1000;
    let fault = rng() % 8 == 0;
    let op = if cfg.hot {
        // Judged leaders, nested takers, writes, async drops.
        const HOT: [u64; 16] = [3, 16, 12, 16, 5, 14, 8, 8, 9, 10, 0, 3, 12, 15, 15, 15];
        if (cfg.refresh || cfg.timeout) && rng() % 6 == 0 {
            11
        } else {
            HOT[(rng() % if depth > 0 { 16 } else { 13 }) as usize]
        }
    } else if rng() % 12 == 0 {
        16
    } else {
        rng() % if depth > 0 { 16 } else { 15 }
    };
    let c2 = c.clone();
    let r = catch_unwind(AssertUnwindSafe(|| match op {
        0 => {
            let v = c.get_with(k, || {
                if fault {
                    panic!("injected get_with")
                }
                tagged(k, tag)
            });
            check(bad, "get_with", k, v)
        }
        1 => {
            if let Ok(v) = c.try_get_with(k, || if fault { Err("e") } else { Ok(tagged(k, tag)) }) {
                check(bad, "try_get_with", k, v)
            }
        }
        2 => {
            if let Some(v) =
                c.optionally_get_with(k, || if fault { None } else { Some(tagged(k, tag)) })
            {
                check(bad, "optionally_get_with", k, v)
            }
        }
        3 => {
            let v = c.get_with_if(
                k,
                || {
                    if fault {
                        panic!("injected get_with_if")
                    }
                    tagged(k, tag)
                },
                |v| v % 2 == 1,
            );
            check(bad, "get_with_if", k, v)
        }
        4 => {
            let v = c.entry(k).or_insert_with(|| tagged(k, tag)).into_value();
            check(bad, "or_insert_with", k, v)
        }
        5 => {
            let v = c
                .entry(k)
                .or_insert_with_if(|| tagged(k, tag), |v| v % 2 == 1)
                .into_value();
            check(bad, "or_insert_with_if", k, v)
        }
        6 => {
            let _ = c.entry(k).and_compute_with(|e| match (e, tag % 3) {
                (_, 0) => herdcache::Op::Put(tagged(k, tag)),
                (Some(_), 1) => herdcache::Op::Remove,
                _ => herdcache::Op::Nop,
            });
        }
        7 => {
            let keys = vec![k, k % 4 + 1];
            let got = c.get_all(keys.clone(), |miss| {
                if fault {
                    panic!("injected get_all")
                }
                miss.iter().map(|&m| (m, tagged(m, tag))).collect()
            });
            for (kk, v) in got {
                check(bad, "get_all", kk, v)
            }
        }
        8 => c.insert(k, tagged(k, tag)),
        9 => c.invalidate(&k),
        10 => {
            // async, polled once then dropped, or run to the end
            let drop_it = rng() % 2 == 0;
            let which = rng() % 4;
            let cc = c.clone();
            match which {
                0 => {
                    let f =
                        async move { cc.get_with_async(k, async move { tagged(k, tag) }).await };
                    if drop_it {
                        poll_once_drop(f)
                    } else {
                        check(bad, "get_with_async", k, futures::executor::block_on(f))
                    }
                }
                1 => {
                    let f = cc.get_with_async_shared(k, async move { tagged(k, tag) });
                    if drop_it {
                        poll_once_drop(f)
                    } else {
                        check(
                            bad,
                            "get_with_async_shared",
                            k,
                            futures::executor::block_on(f),
                        )
                    }
                }
                2 => {
                    let f = async move {
                        cc.try_get_with_async(k, async move {
                            if fault {
                                Err("e")
                            } else {
                                Ok(tagged(k, tag))
                            }
                        })
                        .await
                    };
                    if drop_it {
                        poll_once_drop(f)
                    } else if let Ok(v) = futures::executor::block_on(f) {
                        check(bad, "try_get_with_async", k, v)
                    }
                }
                _ => {
                    let f = async move {
                        cc.get_with_if_async(k, async move { tagged(k, tag) }, |v| v % 2 == 1)
                            .await
                    };
                    if drop_it {
                        poll_once_drop(f)
                    } else {
                        check(bad, "get_with_if_async", k, futures::executor::block_on(f))
                    }
                }
            }
        }
        11 => {
            if cfg.refresh || cfg.timeout {
                let r = if cfg.timeout {
                    c.load_with_timeout(k, Some(Duration::from_micros(rng() % 300)))
                } else {
                    c.load(k)
                };
                if let Ok(v) = r {
                    check(bad, "load", k, v)
                }
            } else if let Some(v) = c.get(&k) {
                check(bad, "get", k, v)
            } else {
                // A plain get's miss counts its miss only: kept aside for the ledger.
                GET_MISSES.with(|g| g.set(g.get() + 1));
            }
        }
        12 => {
            let v = c.get_with_if(k, || tagged(k, tag | 1), |v| v % 2 == 0);
            check(bad, "get_with_if(odd)", k, v)
        }
        13 => {
            if cfg.get_or_stale {
                if let Some(v) = c.get_or_stale(&k) {
                    check(bad, "get_or_stale", k, v)
                }
            }
        }
        14 => {
            let v = c
                .entry(k)
                .or_insert_with_if(|| tagged(k, tag | 1), |v| v % 2 == 0)
                .into_value();
            check(bad, "or_insert_with_if(odd)", k, v)
        }
        16 => {
            // A judge with side effects: writes of its own key (superseding its flight),
            // loads of another key, writes of another key.
            let mut r3 = common::rng(tag * 7 + k);
            let cj = c.clone();
            let v = c.get_with_if(
                k,
                || {
                    if fault {
                        panic!("injected judged init")
                    }
                    tagged(k, tag)
                },
                |v| {
                    let other = k % 4 + 1 + if cfg.hot { 10 } else { 0 };
                    match r3() % 6 {
                        0 => cj.insert(k, tagged(k, 2 * (tag / 2))),
                        1 => cj.invalidate(&k),
                        2 => {
                            let w = cj.get_with(other, || tagged(other, 1));
                            check(bad, "get_with in judge", other, w);
                        }
                        3 => cj.insert(other, tagged(other, 3)),
                        _ => {}
                    }
                    v % 2 == 1
                },
            );
            check(bad, "get_with_if(side effects)", k, v)
        }
        _ => {
            // Nested: a load of a private key whose loader runs one or two ops, under the
            // permit it holds.
            // Each depth its own range of keys: no loader asks for its own key.
            let outer = 100 + u64::from(depth) * 10_000 + rng() % 1000;
            let n = 1 + rng() % 2;
            let seed = rng().wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let v = c.get_with(outer, || {
                let mut r2 = common::rng(seed);
                for _ in 0..n {
                    one_op(&c2, cfg, &mut r2, bad, depth - 1);
                }
                if fault && tag % 2 == 0 {
                    panic!("injected outer")
                }
                tagged(outer, tag)
            });
            check(bad, "outer get_with", outer, v);
            c.invalidate(&outer);
        }
    }));
    if let Err(p) = r {
        let m = common::panic_message(&*p);
        if !m.contains("injected") {
            let mut b = bad.lock().unwrap();
            if b.len() < 20 {
                b.push(format!("op {op} on key {k} panicked: {m}"));
            }
        }
        common::discard(p);
    }
}

fn build(cfg: Cfg) -> Cache<u64, u64> {
    let mut b = Cache::builder()
        .max_capacity(1000)
        .max_concurrent_loads(cfg.limit)
        .record_stats();
    if cfg.negative {
        b = b.negative_ttl(Duration::from_millis(2));
    }
    if cfg.fail_safe || cfg.refresh {
        b = b.time_to_live(Duration::from_millis(3));
    }
    if cfg.fail_safe {
        b = b
            .fail_safe(Duration::from_secs(5))
            .refresh_backoff(Duration::from_millis(1));
    }
    if cfg.refresh || cfg.timeout {
        let n = Arc::new(AtomicUsize::new(0));
        b = b.loader(move |k: &u64| {
            let i = n.fetch_add(1, Ordering::Relaxed) as u64;
            if i % 7 == 3 {
                Err("injected loader error")
            } else {
                if i % 5 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Ok(tagged(*k, 500 + i % 400))
            }
        });
    }
    if cfg.refresh {
        b = b.refresh_after(Duration::from_millis(1));
    }
    b.build()
}

fn storm(cfg: Cfg, seed: u64, dur: Duration) -> Result<(), String> {
    let cache = build(cfg);
    let bad: Bad = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (c0, b0, s0) = (cache.clone(), Arc::clone(&bad), Arc::clone(&stop));
    let r = common::within(dur + Duration::from_secs(8), move || {
        let mut hs = Vec::new();
        for t in 0..cfg.threads {
            let (c, b, s) = (c0.clone(), Arc::clone(&b0), Arc::clone(&s0));
            hs.push(std::thread::spawn(move || {
                let mut rng = common::rng(seed * 31 + t + 1);
                let mut n = 0u64;
                GET_MISSES.with(|g| g.set(0));
                while !s.load(Ordering::SeqCst) {
                    one_op(&c, cfg, &mut rng, &b, cfg.depth);
                    n += 1;
                }
                (n, GET_MISSES.with(|g| g.get()))
            }));
        }
        std::thread::sleep(dur);
        s0.store(true, Ordering::SeqCst);
        let (mut ops, mut gm) = (0, 0);
        for h in hs {
            let (n, g) = h.join().unwrap_or((0, 0));
            ops += n;
            gm += g;
        }
        (ops, gm)
    });
    let (ops, get_misses) = match r {
        None => return Err(format!("{cfg:?} seed {seed}: HANG")),
        Some(Err(p)) => {
            return Err(format!(
                "{cfg:?} seed {seed}: storm panicked: {}",
                common::panic_message(&*p)
            ))
        }
        Some(Ok(n)) => n,
    };
    // Let spawned refreshes (none: no spawner) and anything else settle.
    std::thread::sleep(Duration::from_millis(20));
    let b = bad.lock().unwrap();
    if !b.is_empty() {
        return Err(format!(
            "{cfg:?} seed {seed} ({ops} ops): bad answers:\n  {}",
            b.join("\n  ")
        ));
    }
    if let Some(d) = ledger_drift_less(&cache, get_misses) {
        return Err(format!(
            "{cfg:?} seed {seed} ({ops} ops, {get_misses} plain get misses): {d}"
        ));
    }
    catch_unwind(AssertUnwindSafe(|| cache.validate())).map_err(|p| {
        format!(
            "{cfg:?} seed {seed}: validate: {}",
            common::panic_message(&*p)
        )
    })?;
    Ok(())
}

fn storm_test(cfg: Cfg, what: &'static str) {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), what);
    let mut errs = Vec::new();
    let runs = 4;
    for seed in 1..=runs {
        if let Err(e) = storm(cfg, seed, Duration::from_millis(1500)) {
            errs.push(e);
        }
    }
    assert!(
        errs.is_empty(),
        "{what}: {} of {runs} storms failed:\n{}",
        errs.len(),
        errs.join("\n")
    );
}

const BASE: Cfg = Cfg {
    limit: 1,
    negative: false,
    fail_safe: false,
    refresh: false,
    timeout: false,
    threads: 3,
    get_or_stale: false,
    hot: false,
    depth: 1,
};

#[test]
fn storm_limit1_all_entry_points() {
    storm_test(BASE, "storm limit 1");
}

#[test]
fn storm_limit2_all_entry_points() {
    storm_test(Cfg { limit: 2, ..BASE }, "storm limit 2");
}

#[test]
fn storm_limit1_negative_caching() {
    storm_test(
        Cfg {
            negative: true,
            ..BASE
        },
        "storm limit 1 negative",
    );
}

#[test]
fn storm_limit2_fail_safe() {
    storm_test(
        Cfg {
            limit: 2,
            fail_safe: true,
            ..BASE
        },
        "storm limit 2 fail-safe",
    );
}

#[test]
fn storm_limit1_refresh_ahead_and_timeouts() {
    storm_test(
        Cfg {
            refresh: true,
            timeout: true,
            ..BASE
        },
        "storm limit 1 refresh+timeout",
    );
}

#[test]
fn storm_limit1_negative_fail_safe_refresh() {
    storm_test(
        Cfg {
            negative: true,
            fail_safe: true,
            refresh: true,
            timeout: true,
            ..BASE
        },
        "storm limit 1 everything",
    );
}

/// Two hot keys, mostly judged leaders (`get_with_if`, `or_insert_with_if`, sync and async),
/// nested takers and writes, under a limit of 1.
#[test]
fn hot_judged_nested_limit1() {
    storm_test(Cfg { hot: true, ..BASE }, "hot judged limit 1");
}

/// The same under a limit of 2, with four threads.
#[test]
fn hot_judged_nested_limit2() {
    storm_test(
        Cfg {
            hot: true,
            limit: 2,
            threads: 4,
            ..BASE
        },
        "hot judged limit 2",
    );
}

/// The same with negative caching and fail-safe (and a time to live of 3 ms).
#[test]
fn hot_judged_nested_negative_fail_safe() {
    storm_test(
        Cfg {
            hot: true,
            negative: true,
            fail_safe: true,
            ..BASE
        },
        "hot judged neg+fs",
    );
}

// ---------------------------------------------------------------------------------------------
// An async leader waiting for the only permit, polled once, whose load a nested caller takes
// over; writes and the future's drop at each point.

type BoxFut = Pin<Box<dyn Future<Output = Option<u64>> + Send>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum AKind {
    GetWithIf,
    OrInsertWithIfAsync,
    GetWith,
    Shared,
    TryGetWith,
    Optionally,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum DropAt {
    BeforeSteal,
    DuringTakerLoad,
    AfterPublish,
    Complete,
}

fn async_b(c: &Cache<u64, u64>, kind: AKind, calls: Arc<AtomicUsize>) -> BoxFut {
    let c = c.clone();
    match kind {
        AKind::GetWithIf => Box::pin(async move {
            Some(
                c.get_with_if_async(
                    1,
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        300
                    },
                    |v| *v == 5,
                )
                .await,
            )
        }),
        AKind::OrInsertWithIfAsync => Box::pin(async move {
            Some(
                c.entry(1)
                    .or_insert_with_if_async(
                        async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            300
                        },
                        |v| *v == 5,
                    )
                    .await
                    .into_value(),
            )
        }),
        AKind::GetWith => Box::pin(async move {
            Some(
                c.get_with_async(1, async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    300
                })
                .await,
            )
        }),
        AKind::Shared => Box::pin(async move {
            Some(
                c.get_with_async_shared(1, async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    300
                })
                .await,
            )
        }),
        AKind::TryGetWith => Box::pin(async move {
            c.try_get_with_async(1, async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<u64, &str>(300)
            })
            .await
            .ok()
        }),
        AKind::Optionally => Box::pin(async move {
            c.optionally_get_with_async(1, async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Some(300)
            })
            .await
        }),
    }
}

fn async_takeover_round(kind: AKind, at: DropAt, write: Sup, seed: u64) -> Result<(), String> {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let judged = matches!(kind, AKind::GetWithIf | AKind::OrInsertWithIfAsync);
    if judged {
        cache.insert(1, 5);
    }
    let what = format!("kind={kind:?} at={at:?} write={write:?} seed={seed}");
    let f = Arc::new(Flags::default());
    let go_a = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (ca, fa, ga, ra) = (
        cache.clone(),
        Arc::clone(&f),
        Arc::clone(&go_a),
        Arc::clone(&release),
    );
    let c0 = cache.clone();
    let f0 = Arc::clone(&f);
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = ca.clone();
            let mut got = None;
            let outer = ca.get_with(100, || {
                fa.a_has_permit.store(true, Ordering::SeqCst);
                wait_flag(&ga, Duration::from_secs(3));
                let fi = Arc::clone(&fa);
                let ri = Arc::clone(&ra);
                let init = move || {
                    fi.a_calls.fetch_add(1, Ordering::SeqCst);
                    fi.stolen.store(true, Ordering::SeqCst);
                    wait_flag(&ri, Duration::from_millis(200));
                    200u64
                };
                got = Some(if judged {
                    c.get_with_if(1, init, |v| *v == 5)
                } else {
                    c.get_with(1, init)
                });
                fa.taker_done.store(true, Ordering::SeqCst);
                1
            });
            (outer, got)
        });
        wait_flag(&f0.a_has_permit, Duration::from_secs(3));
        let b_calls = Arc::new(AtomicUsize::new(0));
        let mut fut = Some(async_b(&c0, kind, Arc::clone(&b_calls)));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut early = None;
        if let std::task::Poll::Ready(v) = fut.as_mut().unwrap().as_mut().poll(&mut cx) {
            early = Some(v);
            fut = None;
        }
        // Computations may wait for the load in flight: from their own thread, joined at the end.
        let writers: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());
        let do_write = |c: &Cache<u64, u64>| match write {
            Sup::Insert | Sup::InsertElsewhere => c.insert(1, 7),
            Sup::Invalidate => c.invalidate(&1),
            Sup::ComputePut | Sup::ComputeRemove => {
                let c = c.clone();
                writers.lock().unwrap().push(std::thread::spawn(move || {
                    let _ = c.entry(1).and_compute_with(|_| {
                        if write == Sup::ComputePut {
                            herdcache::Op::Put(7)
                        } else {
                            herdcache::Op::Remove
                        }
                    });
                }));
                std::thread::sleep(Duration::from_millis(2));
            }
            Sup::None => {}
        };
        let mut vb = early;
        let mut rng = common::rng(seed);
        match at {
            DropAt::BeforeSteal => {
                do_write(&c0);
                drop(fut.take());
                go_a.store(true, Ordering::SeqCst);
                release.store(true, Ordering::SeqCst);
            }
            DropAt::DuringTakerLoad => {
                go_a.store(true, Ordering::SeqCst);
                wait_flag(&f0.stolen, Duration::from_secs(1));
                if rng() % 2 == 0 {
                    if let Some(fu) = fut.as_mut() {
                        let _ = fu.as_mut().poll(&mut cx);
                    }
                }
                do_write(&c0);
                drop(fut.take());
                release.store(true, Ordering::SeqCst);
            }
            DropAt::AfterPublish => {
                go_a.store(true, Ordering::SeqCst);
                release.store(true, Ordering::SeqCst);
                wait_flag(&f0.taker_done, Duration::from_secs(3));
                do_write(&c0);
                drop(fut.take());
            }
            DropAt::Complete => {
                go_a.store(true, Ordering::SeqCst);
                wait_flag(&f0.stolen, Duration::from_secs(1));
                do_write(&c0);
                release.store(true, Ordering::SeqCst);
                if let Some(fu) = fut.take() {
                    vb = Some(futures::executor::block_on(fu));
                }
            }
        }
        let (outer, got) = a.join().map_err(|_| "A panicked".to_string())?;
        for w in writers.into_inner().unwrap() {
            w.join().map_err(|_| "writer panicked".to_string())?;
        }
        Ok::<_, String>((outer, got, vb, b_calls.load(Ordering::SeqCst)))
    });
    match r {
        None => Err(format!("{what}: HANG (10 s)")),
        Some(Err(p)) => Err(format!(
            "{what}: round panicked: {}",
            common::panic_message(&*p)
        )),
        Some(Ok(Err(e))) => Err(format!("{what}: {e}")),
        Some(Ok(Ok((outer, got, vb, nb)))) => {
            if outer != 1 {
                return Err(format!("{what}: outer {outer}"));
            }
            if !matches!(got, Some(5 | 7 | 200 | 300)) {
                return Err(format!("{what}: taker got {got:?}"));
            }
            if let Some(Some(v)) = vb {
                if ![5, 7, 200, 300].contains(&v) {
                    return Err(format!("{what}: async caller got {v}"));
                }
            }
            if nb > 1 || f.a_calls.load(Ordering::SeqCst) > 1 {
                return Err(format!("{what}: loader calls b={nb}"));
            }
            if let Some(d) = ledger_drift(&cache) {
                return Err(format!("{what}: {d}"));
            }
            catch_unwind(AssertUnwindSafe(|| cache.validate()))
                .map_err(|p| format!("{what}: validate: {}", common::panic_message(&*p)))?;
            Ok(())
        }
    }
}

#[test]
fn async_leader_waiting_for_permit_taken_over_then_dropped() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "async takeover drop");
    let mut failures = Vec::new();
    let mut rounds = 0;
    for kind in [
        AKind::GetWithIf,
        AKind::OrInsertWithIfAsync,
        AKind::GetWith,
        AKind::Shared,
        AKind::TryGetWith,
        AKind::Optionally,
    ] {
        for at in [
            DropAt::BeforeSteal,
            DropAt::DuringTakerLoad,
            DropAt::AfterPublish,
            DropAt::Complete,
        ] {
            for write in [
                Sup::None,
                Sup::Insert,
                Sup::Invalidate,
                Sup::ComputePut,
                Sup::ComputeRemove,
            ] {
                for seed in 1..=2 {
                    rounds += 1;
                    let t0 = Instant::now();
                    let r = async_takeover_round(kind, at, write, seed);
                    if std::env::var("H101_SLOW").is_ok()
                        && t0.elapsed() > Duration::from_millis(100)
                    {
                        eprintln!("slow {:?}: {kind:?} {at:?} {write:?}", t0.elapsed());
                    }
                    if let Err(e) = r {
                        failures.push(e);
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// A blocking leader waiting for the only permit; a nested caller of another kind takes its load
// over and fails (error, None, panic) or succeeds; with and without negative caching.

#[derive(Clone, Copy, Debug, PartialEq)]
enum BKind {
    GetWith,
    GetWithIfAbsent,
    OrInsertWith,
    GetAll,
    TryGetWith,
    Optionally,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum TKind {
    Value,
    Err,
    NoneValue,
    Panic,
    GetAll,
}

/// Rounds of `blocking_leader_taken_over_by_failing_nested_caller` whose leader never ran its
/// own loader (the nested caller's load answered it: a takeover, for coverage).
static SERVED_BY_TAKER: AtomicUsize = AtomicUsize::new(0);

fn blocking_takeover_round(b: BKind, t: TKind, negative: bool) -> Result<(), String> {
    let mut bld = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats();
    if negative {
        bld = bld.negative_ttl(Duration::from_secs(5));
    }
    let cache: Cache<u64, u64> = bld.build();
    let what = format!("leader={b:?} taker={t:?} negative={negative}");
    let has_permit = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let (ca, hp, g) = (cache.clone(), Arc::clone(&has_permit), Arc::clone(&go));
    let (cb, c0) = (cache.clone(), cache.clone());
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = ca.clone();
            let mut got: Option<Result<Option<u64>, String>> = None;
            let outer = ca.get_with(100, || {
                hp.store(true, Ordering::SeqCst);
                wait_flag(&g, Duration::from_secs(3));
                let r = catch_unwind(AssertUnwindSafe(|| match t {
                    TKind::Value => Some(c.get_with(1, || 200)),
                    TKind::Err => c.try_get_with(1, || Err::<u64, &str>("injected err")).ok(),
                    TKind::NoneValue => c.optionally_get_with(1, || None),
                    TKind::Panic => Some(c.get_with(1, || panic!("injected taker"))),
                    TKind::GetAll => c
                        .get_all([1, 3], |m| m.iter().map(|&k| (k, 200 + k - 1)).collect())
                        .get(&1)
                        .copied(),
                }));
                got = Some(r.map_err(|p| common::panic_message(&*p)));
                1
            });
            (outer, got)
        });
        wait_flag(&has_permit, Duration::from_secs(3));
        let bcalls = Arc::new(AtomicUsize::new(0));
        let bc = Arc::clone(&bcalls);
        let bt = std::thread::spawn(move || {
            let bump = || bc.fetch_add(1, Ordering::SeqCst);
            match b {
                BKind::GetWith => Some(cb.get_with(1, || {
                    bump();
                    300
                })),
                BKind::GetWithIfAbsent => Some(cb.get_with_if(
                    1,
                    || {
                        bump();
                        300
                    },
                    |_| true,
                )),
                BKind::OrInsertWith => Some(
                    cb.entry(1)
                        .or_insert_with(|| {
                            bump();
                            300
                        })
                        .into_value(),
                ),
                BKind::GetAll => cb
                    .get_all([1, 2], |m| {
                        bump();
                        m.iter().map(|&k| (k, 300 + k - 1)).collect()
                    })
                    .get(&1)
                    .copied(),
                BKind::TryGetWith => cb
                    .try_get_with(1, || {
                        bump();
                        Ok::<u64, &str>(300)
                    })
                    .ok(),
                BKind::Optionally => cb.optionally_get_with(1, || {
                    bump();
                    Some(300)
                }),
            }
        });
        // B registered its flight and waits for the permit.
        let t0 = Instant::now();
        while c0.loads_in_flight() < 2 && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(2));
        go.store(true, Ordering::SeqCst);
        let (outer, got) = a.join().map_err(|_| "A panicked".to_string())?;
        let vb = bt
            .join()
            .map_err(|p| format!("B panicked: {}", common::panic_message(&*p)))?;
        Ok::<_, String>((outer, got, vb, bcalls.load(Ordering::SeqCst)))
    });
    match r {
        None => Err(format!("{what}: HANG (10 s)")),
        Some(Err(p)) => Err(format!(
            "{what}: round panicked: {}",
            common::panic_message(&*p)
        )),
        Some(Ok(Err(e))) => Err(format!("{what}: {e}")),
        Some(Ok(Ok((outer, got, vb, nb)))) => {
            if outer != 1 {
                return Err(format!("{what}: outer {outer}"));
            }
            match (t, &got) {
                (TKind::Panic, Some(Err(_))) => {}
                (_, Some(Ok(None))) if matches!(t, TKind::Err | TKind::NoneValue) => {}
                (_, Some(Ok(Some(v)))) if [200, 300].contains(v) => {}
                _ => return Err(format!("{what}: taker got {got:?}")),
            }
            // B can always load: a get_with-like caller must end with a value.
            match (b, vb) {
                (BKind::TryGetWith | BKind::Optionally, None) => {}
                (_, Some(200 | 300)) => {}
                _ => return Err(format!("{what}: leader got {vb:?} (loader calls {nb})")),
            }
            if nb > 1 {
                return Err(format!("{what}: leader's loader called {nb} times"));
            }
            if nb == 0 {
                SERVED_BY_TAKER.fetch_add(1, Ordering::SeqCst);
            }
            if let Some(d) = ledger_drift(&cache) {
                return Err(format!("{what}: {d}"));
            }
            catch_unwind(AssertUnwindSafe(|| cache.validate()))
                .map_err(|p| format!("{what}: validate: {}", common::panic_message(&*p)))?;
            Ok(())
        }
    }
}

#[test]
fn blocking_leader_taken_over_by_failing_nested_caller() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "blocking takeover");
    let mut failures = Vec::new();
    let mut rounds = 0;
    for negative in [false, true] {
        for b in [
            BKind::GetWith,
            BKind::GetWithIfAbsent,
            BKind::OrInsertWith,
            BKind::GetAll,
            BKind::TryGetWith,
            BKind::Optionally,
        ] {
            for t in [
                TKind::Value,
                TKind::Err,
                TKind::NoneValue,
                TKind::Panic,
                TKind::GetAll,
            ] {
                for _ in 0..2 {
                    rounds += 1;
                    if let Err(e) = blocking_takeover_round(b, t, negative) {
                        failures.push(e);
                    }
                }
            }
        }
    }
    eprintln!(
        "blocking takeover: {rounds} rounds, {} answered by the nested caller's load",
        SERVED_BY_TAKER.load(Ordering::SeqCst)
    );
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Hot keys, loads nested two deep, four threads, limit 1.
#[test]
fn hot_judged_nested_depth2_limit1() {
    storm_test(
        Cfg {
            hot: true,
            threads: 4,
            depth: 2,
            ..BASE
        },
        "hot judged depth 2 limit 1",
    );
}

/// Hot keys, loads nested two deep, four threads, limit 2, negative caching.
#[test]
fn hot_judged_nested_depth2_limit2_negative() {
    storm_test(
        Cfg {
            hot: true,
            threads: 4,
            depth: 2,
            limit: 2,
            negative: true,
            ..BASE
        },
        "hot judged depth 2 limit 2 negative",
    );
}

/// Hot keys with refresh-ahead (a builder loader failing now and then, refreshes run by the
/// reader under the limit), soft timeouts of `load_with_timeout`, fail-safe, limit 1.
#[test]
fn hot_judged_nested_refresh_fail_safe_limit1() {
    storm_test(
        Cfg {
            hot: true,
            refresh: true,
            timeout: true,
            fail_safe: true,
            depth: 2,
            ..BASE
        },
        "hot judged refresh+fail-safe limit 1",
    );
}

/// A judge that rewrites (or removes and rewrites) its own key at every look: each second look
/// finds the flight superseded, so the caller claims again, a bounded number of times, then
/// loads. Alone, nested in a load under a limit of 1, and from two threads at once.
#[test]
fn judge_superseding_itself_every_look() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "self-superseding judge");
    for limit in [None, Some(1), Some(2)] {
        for nested in [false, true] {
            for remove in [false, true] {
                let mut b = Cache::builder().max_capacity(100).record_stats();
                if let Some(l) = limit {
                    b = b.max_concurrent_loads(l);
                }
                let cache: Cache<u64, u64> = b.build();
                cache.insert(1, 5);
                let what = format!("limit={limit:?} nested={nested} remove={remove}");
                let c0 = cache.clone();
                let r = common::within(Duration::from_secs(10), move || {
                    let hs: Vec<_> = (0..2u64)
                        .map(|t| {
                            let c = c0.clone();
                            std::thread::spawn(move || {
                                let mut out = Vec::new();
                                for i in 0..200u64 {
                                    let calls = AtomicUsize::new(0);
                                    let call = || {
                                        let cj = c.clone();
                                        c.get_with_if(
                                            1,
                                            || {
                                                calls.fetch_add(1, Ordering::SeqCst);
                                                9
                                            },
                                            move |v| {
                                                if remove {
                                                    cj.invalidate(&1);
                                                }
                                                cj.insert(1, 5);
                                                *v == 5
                                            },
                                        )
                                    };
                                    let v = if nested {
                                        let k = 1000 + t * 1000 + i;
                                        let mut got = 0;
                                        c.get_with(k, || {
                                            got = call();
                                            1
                                        });
                                        c.invalidate(&k);
                                        got
                                    } else {
                                        call()
                                    };
                                    out.push((v, calls.load(Ordering::SeqCst)));
                                }
                                out
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap())
                        .collect::<Vec<_>>()
                });
                let outs = match r {
                    None => panic!("{what}: HANG"),
                    Some(Err(p)) => panic!("{what}: panicked: {}", common::panic_message(&*p)),
                    Some(Ok(o)) => o,
                };
                for (v, n) in outs.into_iter().flatten() {
                    assert!(v == 5 || v == 9, "{what}: got {v}");
                    assert!(n <= 1, "{what}: init called {n} times in one call");
                }
                stats_ledger(&cache, &what);
            }
        }
    }
}
