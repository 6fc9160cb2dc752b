#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::all)]
//! Stop 26: the four failing tests' bugs fixed (a wake-up during a poll is passed on to every
//! caller; an `init` given back after the flight ended is waited for); their docs below say
//! FAILS as found.
//! Session 42 attack: shared async loads (leader/joiner interest, who drives, cancellation),
//! key panics in the by-ref and spawned paths, and the single-flight core around them.
//! Public API only (plus the `testing` hooks `loads_in_flight`).

mod common;

use common::{panic_message, quiet_injected_panics, watchdog};
use herdcache::{BoxError, Cache, CacheStats, LoadError};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// The watchdogs' limit: a hang detector, not a timing bound. The exhaustive two-caller sweep
/// runs about 150 s in a debug build and over 240 s under AddressSanitizer (CPU-bound: 3 min
/// 47 s of CPU in its first 4 min on an idle 2-core machine, 2026-12-03), where CI runs it.
const LIMIT: Duration = Duration::from_secs(900);

type C = Cache<u64, u64>;

fn counters(s: &CacheStats) -> [(&'static str, u64); 12] {
    [
        ("hits", s.hits),
        ("misses", s.misses),
        ("load_successes", s.load_successes),
        ("load_failures", s.load_failures),
        ("loads_abandoned", s.loads_abandoned),
        ("coalesced", s.coalesced),
        ("negative_hits", s.negative_hits),
        ("timeouts", s.timeouts),
        ("loads_waited_for_limit", s.loads_waited_for_limit),
        ("explicit.count", s.explicit.count),
        ("replaced.count", s.replaced.count),
        ("stale_served", s.stale_served),
    ]
}

fn sum(s: &CacheStats) -> u64 {
    s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits
}

fn show(s: &CacheStats) -> String {
    counters(s)
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn identity_err<K, V>(c: &Cache<K, V>) -> Option<String>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let s = c.stats();
    (s.misses != sum(&s)).then(|| format!("identity broken: {}", show(&s)))
}

struct Monitor {
    stop: Arc<AtomicBool>,
    h: Option<std::thread::JoinHandle<Vec<String>>>,
}

fn monitor(c: &C) -> Monitor {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let c = c.clone();
    let h = std::thread::spawn(move || {
        let mut bad = Vec::new();
        let mut last = c.stats();
        while !st.load(Ordering::Relaxed) {
            let now = c.stats();
            for ((n, a), (_, b)) in counters(&last).iter().zip(counters(&now).iter()) {
                if b < a && bad.len() < 20 {
                    bad.push(format!("{n} decreased {a} -> {b}"));
                }
            }
            last = now;
            std::thread::sleep(Duration::from_micros(200));
        }
        bad
    });
    Monitor { stop, h: Some(h) }
}

impl Monitor {
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.h.take().unwrap().join().unwrap()
    }
}

fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

/// A waker that records that it was woken.
struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}
fn flag_waker() -> (Arc<Flag>, Waker) {
    let f = Arc::new(Flag(AtomicBool::new(false)));
    (f.clone(), Waker::from(f))
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

fn poll_with<T>(f: &mut BoxFut<T>, w: &Waker) -> Result<Poll<T>, String> {
    let mut cx = Context::from_waker(w);
    catch(|| f.as_mut().poll(&mut cx))
}

// ---------------------------------------------------------------------------------------------
// 1. Lost wake-up: a joiner that registers while the leader is polling the shared load.
// ---------------------------------------------------------------------------------------------

/// An init whose first poll wakes its waker, then tells the test it is inside the poll and
/// blocks (bounded) until released, then returns Pending; ready with 7 afterwards.
struct Gate {
    polls: u32,
    inside: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}
impl Future for Gate {
    type Output = u64;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        self.polls += 1;
        if self.polls == 1 {
            cx.waker().wake_by_ref();
            let _ = self.inside.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            return Poll::Pending;
        }
        Poll::Ready(7)
    }
}

/// Starts leader A (`get_with_async_shared(1, Gate)`) on a thread: polled once with a noop waker
/// (its first poll of the load wakes the load's waker and blocks until released), then kept
/// alive but never polled again until `drop_a` is sent. Returns (inside, release, polled, drop_a).
fn start_gated_leader(
    c: &C,
) -> (
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
    mpsc::Receiver<bool>,
    mpsc::Sender<()>,
) {
    let (in_tx, in_rx) = mpsc::channel();
    let (rel_tx, rel_rx) = mpsc::channel();
    let (polled_tx, polled_rx) = mpsc::channel();
    let (drop_tx, drop_rx) = mpsc::channel::<()>();
    let c2 = c.clone();
    std::thread::spawn(move || {
        let gate = Gate {
            polls: 0,
            inside: in_tx,
            release: rel_rx,
        };
        let mut a: BoxFut<u64> = Box::pin(async move { c2.get_with_async_shared(1, gate).await });
        let w = futures::task::noop_waker();
        let pending = matches!(poll_with(&mut a, &w), Ok(Poll::Pending));
        let _ = polled_tx.send(pending);
        // Kept alive, never polled again, until told.
        let _ = drop_rx.recv_timeout(Duration::from_secs(30));
        drop(a);
    });
    (in_rx, rel_tx, polled_rx, drop_tx)
}

/// FAILS (lost wake-up). Leader A of a shared load polls it; the load's future wakes its waker
/// during that poll (before joiner B registered) and returns Pending; B joins *during* that poll
/// (sees the load being polled, registers its waker, returns Pending). A is then never polled
/// again (its task is stuck elsewhere, or polled with a noop waker).
/// Expected (docs of `get_with_async_shared`: "when the leading future ... is never polled
/// again, the waiters drive the load to completion"): B is woken so that it can drive the load.
/// Observed: B's waker is never woken — the load's only wake-up went to A — so B, on a real
/// executor, waits forever.
#[test]
fn shared_joiner_registered_during_leaders_poll_is_never_woken() {
    let _w = watchdog(LIMIT, "lost wakeup");
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let (in_rx, rel_tx, polled_rx, drop_tx) = start_gated_leader(&c);
    in_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("A inside its poll");
    let c2 = c.clone();
    let mut b: BoxFut<u64> =
        Box::pin(async move { c2.get_with_async_shared(1, async { 8 }).await });
    let (flag, bw) = flag_waker();
    assert!(matches!(poll_with(&mut b, &bw), Ok(Poll::Pending)));
    rel_tx.send(()).unwrap();
    assert!(
        polled_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "A pending"
    );
    // Nobody polls A any more. B must have been woken (bounded wait: wakes are synchronous).
    let woken = common::eventually(|| flag.0.load(Ordering::SeqCst));
    // Clean up either way: drive B (it can drive the load when polled) and drop A.
    let r = poll_with(&mut b, &bw);
    let _ = drop_tx.send(());
    assert!(
        woken,
        "joiner B was never woken although the leader will not poll the load again (B then \
         polled by hand: {:?})",
        r.map(|p| p.is_ready())
    );
}

/// The same lost wake-up on a tokio multi-thread runtime: B is a task awaiting
/// `get_with_async_shared` under a 3 s `tokio::time::timeout`. Expected: B gets 7 at once (it
/// drives the load A left to nobody). Observed: B sits unwoken until the timer fires at 3 s
/// (tokio's `Timeout` then polls it once more); without a timeout it would hang forever.
#[test]
fn shared_joiner_on_tokio_stalls_when_leader_stops_polling() {
    let _w = watchdog(LIMIT, "lost wakeup tokio");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let (in_rx, rel_tx, polled_rx, drop_tx) = start_gated_leader(&c);
    in_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let c2 = c.clone();
    let registered = Arc::new(AtomicBool::new(false));
    let reg2 = registered.clone();
    let t0 = std::time::Instant::now();
    let h = rt.spawn(async move {
        let mut fut = Box::pin(c2.get_with_async_shared(1, async { 8 }));
        // The task is re-polled only when woken (by the flight, or the 3 s timer).
        tokio::time::timeout(
            Duration::from_secs(3),
            std::future::poll_fn(move |cx| {
                let p = fut.as_mut().poll(cx);
                reg2.store(true, Ordering::SeqCst);
                p
            }),
        )
        .await
    });
    assert!(common::eventually(|| registered.load(Ordering::SeqCst)));
    rel_tx.send(()).unwrap();
    // A's poll has returned (pending; or ready: the joiner, woken at the end of that poll,
    // may finish the load before A looks again — changed in stop 26 with the fix).
    polled_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let r = rt.block_on(h).unwrap();
    let took = t0.elapsed();
    let _ = drop_tx.send(());
    // (tokio's `Timeout` polls its future once more when the deadline fires: that poll, not a
    // wake-up from the cache, is what finishes B late.)
    assert!(
        r.is_ok() && took < Duration::from_millis(1500),
        "joiner finished only after {took:?} ({:?}): it was not woken to drive the load, only \
         the 3 s timer's poll got it going",
        r
    );
}

/// FAILS (same lost wake-up, with `futures::executor::block_on`): joiner B runs in
/// `block_on` on its own thread and joins while leader A is inside its poll of the shared load
/// (whose wake-up that poll consumed); A is never polled again. Expected: B returns 7 at once
/// (it drives the load). Observed: `block_on(B)` never returns (checked for 3 s; its thread is
/// left parked).
#[test]
fn shared_joiner_in_block_on_hangs_when_leader_stops_polling() {
    let _w = watchdog(LIMIT, "lost wakeup block_on");
    let c: C = Cache::builder().max_capacity(100).record_stats().build();
    let (in_rx, rel_tx, polled_rx, drop_tx) = start_gated_leader(&c);
    in_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let c2 = c.clone();
    let (first_tx, first_rx) = mpsc::channel::<()>();
    let b = common::start(move || {
        let mut fut = Box::pin(c2.get_with_async_shared(1, async { 8 }));
        let mut first = Some(first_tx);
        futures::executor::block_on(std::future::poll_fn(move |cx| {
            let p = fut.as_mut().poll(cx);
            if let Some(t) = first.take() {
                let _ = t.send(());
            }
            p
        }))
    });
    first_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    rel_tx.send(()).unwrap();
    // A's poll has returned (pending; or ready: the joiner, woken at the end of that poll,
    // may finish the load before A looks again — changed in stop 26 with the fix).
    polled_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let r = b.wait(Duration::from_secs(3));
    let _ = drop_tx.send(()); // (dropping A wakes B: its thread then ends)
    assert!(
        matches!(r, Some(Ok(7))),
        "block_on(joiner) did not return within 3 s while the leader was not polled: {:?}",
        r.map(|x| x.ok())
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Shared async loads: every schedule of polls and drops of 2-3 callers (noop wakers).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum R {
    Val(u64),
    Fail,
    Panicked,
}

/// What each caller's init does: runs counted, then pending `pend` times, then behaviour `b`
/// (0: value 10, 1: error / None (11 for the get_with verb), 2: panic).
fn shared_call(c: &C, verb: usize, k: u64, pend: u32, b: u64, runs: Arc<AtomicUsize>) -> BoxFut<R> {
    let c = c.clone();
    let init = async move {
        runs.fetch_add(1, Ordering::SeqCst);
        common::Yield(pend).await;
        match b {
            0 => Some(10u64),
            1 => None,
            _ => panic!("injected init panic"),
        }
    };
    match verb {
        0 => Box::pin(async move {
            R::Val(
                c.get_with_async_shared(k, async move { init.await.unwrap_or(11) })
                    .await,
            )
        }),
        1 => Box::pin(async move {
            match c
                .try_get_with_async_shared(k, async move { init.await.ok_or("injected") })
                .await
            {
                Ok(v) => R::Val(v),
                Err(_) => R::Fail,
            }
        }),
        2 => Box::pin(async move {
            match c.optionally_get_with_async_shared(k, init).await {
                Some(v) => R::Val(v),
                None => R::Fail,
            }
        }),
        _ => Box::pin(async move {
            match c.load_async(k).await {
                Ok(v) => R::Val(v),
                Err(LoadError::Panicked) => R::Panicked,
                Err(_) => R::Fail,
            }
        }),
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Poll(usize),
    Drop(usize),
}

struct Setup {
    /// Each caller's key (empty: all on key 1).
    keys: Vec<u64>,
    verbs: Vec<usize>,
    behs: Vec<u64>,
    pend: u32,
    negative: bool,
    limit: Option<usize>,
}

/// The async loader for verb 3 (`load_async`): behaviour by a shared script.
fn build_shared(setup: &Setup, loader_beh: Arc<Mutex<Vec<u64>>>, runs: Arc<AtomicUsize>) -> C {
    let pend = setup.pend;
    let mut b = Cache::builder().max_capacity(100).record_stats();
    if setup.negative {
        b = b.negative_ttl(Duration::from_secs(3600));
    }
    if let Some(l) = setup.limit {
        b = b.max_concurrent_loads(l);
    }
    b.async_loader(move |_k: &u64| {
        let beh = loader_beh.lock().unwrap().pop().unwrap_or(0);
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            common::Yield(pend).await;
            match beh {
                0 => Ok(10u64),
                1 => Err(BoxError::from("injected")),
                _ => panic!("injected loader panic"),
            }
        }
    })
    .build()
}

/// Runs one schedule; returns the problems found.
fn run_schedule(setup: &Setup, ops: &[Op]) -> Vec<String> {
    let n = setup.verbs.len();
    let runs: Vec<Arc<AtomicUsize>> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let loader_runs = Arc::new(AtomicUsize::new(0));
    // load_async callers: the loader's behaviour, per call, in the callers' order of leading
    // (unknown): use caller 0's behaviour for every loader call.
    let lb = Arc::new(Mutex::new(vec![setup.behs[0]; 8]));
    let c = build_shared(setup, lb, loader_runs.clone());
    let mut futs: Vec<Option<BoxFut<R>>> = (0..n)
        .map(|i| {
            Some(shared_call(
                &c,
                setup.verbs[i],
                setup.keys.get(i).copied().unwrap_or(1),
                setup.pend,
                setup.behs[i],
                runs[i].clone(),
            ))
        })
        .collect();
    let mut results: Vec<Option<Result<R, String>>> = vec![None; n];
    let mut dropped = vec![false; n];
    let w = futures::task::noop_waker();
    let mut bad = Vec::new();
    let step = |i: usize,
                futs: &mut Vec<Option<BoxFut<R>>>,
                results: &mut Vec<Option<Result<R, String>>>| {
        if let Some(f) = futs[i].as_mut() {
            match poll_with(f, &w) {
                Ok(Poll::Pending) => {}
                Ok(Poll::Ready(r)) => {
                    results[i] = Some(Ok(r));
                    futs[i] = None;
                }
                Err(m) => {
                    results[i] = Some(Err(m));
                    futs[i] = None;
                }
            }
        }
    };
    for op in ops {
        match *op {
            Op::Poll(i) => step(i, &mut futs, &mut results),
            Op::Drop(i) => {
                if futs[i].take().is_some() {
                    dropped[i] = true;
                }
            }
        }
    }
    // Drive everyone left, round robin, bounded.
    for _ in 0..500 {
        if futs.iter().all(|f| f.is_none()) {
            break;
        }
        for i in 0..n {
            step(i, &mut futs, &mut results);
        }
    }
    if futs.iter().any(|f| f.is_some()) {
        bad.push("a caller never finished (500 rounds)".to_string());
    }
    drop(futs);
    let any_panic_beh = setup.behs.iter().any(|&b| b == 2);
    for i in 0..n {
        if runs[i].load(Ordering::SeqCst) > 1 {
            bad.push(format!(
                "caller {i}'s init ran {} times",
                runs[i].load(Ordering::SeqCst)
            ));
        }
        match &results[i] {
            // Legitimate only for a caller whose own init ran and panicked (driven by another).
            Some(Err(m))
                if m.contains("panicked while another caller was driving it")
                    && !(runs[i].load(Ordering::SeqCst) == 1
                        && setup.behs[i] == 2
                        && setup.verbs[i] != 3) =>
            {
                bad.push(format!(
                    "caller {i} (init runs {}, beh {}) panicked spuriously: {m}",
                    runs[i].load(Ordering::SeqCst),
                    setup.behs[i]
                ))
            }
            Some(Err(m))
                if !m.contains("injected")
                    && !m.contains("panicked while another caller was driving it") =>
            {
                bad.push(format!("caller {i} panicked spuriously: {m}"))
            }
            Some(Err(_)) if !any_panic_beh => bad.push(format!("caller {i}: injected panic?")),
            Some(Ok(R::Val(v))) if *v != 10 && *v != 11 => {
                bad.push(format!("caller {i}: wrong value {v}"))
            }
            Some(Ok(R::Val(11))) if !setup.behs.contains(&1) => {
                bad.push(format!("caller {i}: fallback value without a failing init"))
            }
            Some(Ok(R::Fail)) if !setup.behs.contains(&1) => {
                bad.push(format!("caller {i}: failure without a failing init"))
            }
            Some(Ok(R::Panicked)) if !any_panic_beh => {
                bad.push(format!("caller {i}: Panicked without a panicking loader"))
            }
            _ => {}
        }
    }
    if c.loads_in_flight() != 0 {
        bad.push(format!("loads_in_flight {}", c.loads_in_flight()));
    }
    if let Some(e) = identity_err(&c) {
        bad.push(e);
    }
    let s = c.stats();
    if !dropped.iter().any(|&d| d) && s.loads_abandoned != 0 {
        bad.push(format!("abandoned with no caller dropped: {}", show(&s)));
    }
    if !dropped.iter().any(|&d| d) && setup.behs.iter().all(|&b| b == 0) && setup.keys.is_empty() {
        // Nobody left, every init succeeds: one load, every other caller joined it.
        // (A caller first polled after the load ended hits instead of joining.)
        if s.load_successes != 1 || s.hits + s.misses != n as u64 || s.coalesced + 1 != s.misses {
            bad.push(format!(
                "expected one load and {} joins: {}",
                n - 1,
                show(&s)
            ));
        }
    }
    if s.load_successes + s.load_failures + s.loads_abandoned
        > (runs.iter().map(|r| r.load(Ordering::SeqCst)).sum::<usize>()
            + loader_runs.load(Ordering::SeqCst)
            + s.loads_abandoned as usize) as u64
    {
        bad.push(format!("more loads counted than inits: {}", show(&s)));
    }
    // Loadable again (every key: a leaked load permit would hang here, under the watchdog).
    for k in 0..4 {
        c.invalidate(&k);
        match catch(|| c.get_with(k, || 99)) {
            Ok(99) => {}
            other => bad.push(format!("key {k} not loadable again: {other:?}")),
        }
    }
    if c.loads_in_flight() != 0 {
        bad.push(format!(
            "loads_in_flight after reload {}",
            c.loads_in_flight()
        ));
    }
    bad
}

fn all_scripts(callers: usize, len: usize) -> Vec<Vec<Op>> {
    let alphabet: Vec<Op> = (0..callers)
        .map(Op::Poll)
        .chain((0..callers).map(Op::Drop))
        .collect();
    let mut out = vec![vec![]];
    let mut frontier = vec![vec![]];
    for _ in 0..len {
        let mut next = Vec::new();
        for s in &frontier {
            for op in &alphabet {
                let mut t: Vec<Op> = s.clone();
                t.push(*op);
                next.push(t);
            }
        }
        out.extend(next.iter().cloned());
        frontier = next;
    }
    out
}

/// Two shared callers, every verb pair, every init behaviour of the leader, pending 1 or 3,
/// with and without negative TTL and a load limit: every schedule of up to 5 polls/drops,
/// then the rest driven. No spurious panic, values right, inits at most once, nothing left in
/// flight, identity, abandoned only when someone left.
#[test]
fn shared_two_callers_every_schedule() {
    let _w = watchdog(LIMIT, "two-caller schedules");
    quiet_injected_panics();
    let scripts = all_scripts(2, 5);
    let mut bad = Vec::new();
    let part = common::Part::new("two-caller schedules");
    let mut case = 0u64;
    for va in 0..4 {
        for vb in 0..4 {
            for ba in 0..3u64 {
                for bb in [0u64, 1] {
                    for (pend, negative, limit) in [
                        (1, false, None),
                        (3, true, None),
                        (1, false, Some(1)),
                        (2, true, Some(2)),
                    ] {
                        case += 1;
                        if !part.take(case) {
                            continue;
                        }
                        let setup = Setup {
                            keys: vec![],
                            verbs: vec![va, vb],
                            behs: vec![ba, bb],
                            pend,
                            negative,
                            limit,
                        };
                        for s in &scripts {
                            for p in run_schedule(&setup, s) {
                                if bad.len() < 40 {
                                    bad.push(format!(
                                        "verbs={:?} behs={:?} pend={pend} neg={negative} \
                                         limit={limit:?} ops={s:?}: {p}",
                                        setup.verbs, setup.behs
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// Three shared callers: random schedules (seeded) of 4-10 polls/drops.
#[test]
fn shared_three_callers_random_schedules() {
    let _w = watchdog(LIMIT, "three-caller schedules");
    quiet_injected_panics();
    let mut r = common::Rng(0x9e3779b97f4a7c15);
    let mut bad = Vec::new();
    for _ in 0..6000 {
        let verbs: Vec<usize> = (0..3).map(|_| (r.next() % 4) as usize).collect();
        let behs: Vec<u64> = (0..3).map(|_| r.next() % 3).collect();
        let setup = Setup {
            keys: vec![],
            verbs,
            behs,
            pend: (r.next() % 4) as u32,
            negative: r.next() % 2 == 0,
            limit: [None, Some(1), Some(2)][(r.next() % 3) as usize],
        };
        let len = 4 + (r.next() % 7) as usize;
        let ops: Vec<Op> = (0..len)
            .map(|_| {
                let i = (r.next() % 3) as usize;
                if r.next() % 4 == 0 {
                    Op::Drop(i)
                } else {
                    Op::Poll(i)
                }
            })
            .collect();
        for p in run_schedule(&setup, &ops) {
            if bad.len() < 40 {
                bad.push(format!(
                    "verbs={:?} behs={:?} pend={} neg={} limit={:?} ops={ops:?}: {p}",
                    setup.verbs, setup.behs, setup.pend, setup.negative, setup.limit
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 3. Real wakers: tokio multi-thread runtime, timeouts at random points, blocking callers,
//    invalidations and inserts racing, load limit, negative TTL.
// ---------------------------------------------------------------------------------------------

/// An init for the storm: pending (tokio yields or self-waking) `pend` times, then value k*10,
/// failure, or panic. Sets `own_panic` just before panicking.
async fn storm_init(
    k: u64,
    pend: u32,
    b: u64,
    tokio_yield: bool,
    own_panic: Arc<AtomicBool>,
) -> Option<u64> {
    for _ in 0..pend {
        if tokio_yield {
            tokio::task::yield_now().await;
        } else {
            common::Yield(1).await;
        }
    }
    match b {
        0 => Some(k * 10),
        1 => None,
        _ => {
            own_panic.store(true, Ordering::SeqCst);
            panic!("injected storm panic")
        }
    }
}

#[test]
fn tokio_shared_storm_with_timeouts_and_blocking_callers() {
    let _w = watchdog(LIMIT, "tokio storm");
    quiet_injected_panics();
    let mut bad: Vec<String> = Vec::new();
    for (cfg, (limit, negative)) in [
        (None, false),
        (Some(1), false),
        (Some(2), true),
        (None, true),
    ]
    .into_iter()
    .enumerate()
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let mut b = Cache::builder().max_capacity(100).record_stats();
        if let Some(l) = limit {
            b = b.max_concurrent_loads(l);
        }
        if negative {
            b = b.negative_ttl(Duration::from_secs(3600));
        }
        let seq = Arc::new(AtomicU64::new(0));
        let seq2 = seq.clone();
        let c: C = b
            .async_loader(move |k: &u64| {
                let n = seq2.fetch_add(1, Ordering::Relaxed);
                let k = *k;
                async move {
                    tokio::task::yield_now().await;
                    match n % 6 {
                        0..=3 => Ok(k * 10),
                        4 => Err(BoxError::from("injected")),
                        _ => panic!("injected loader panic"),
                    }
                }
            })
            .loader(|k: &u64| Ok::<_, BoxError>(*k * 10))
            .build();
        let mon = monitor(&c);
        let stop = Arc::new(AtomicBool::new(false));
        // Blocking callers and writers.
        let mut threads = Vec::new();
        for t in 0..2u64 {
            let c = c.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut r = common::Rng(0x1234 + t * 77 + cfg as u64);
                let mut bad = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let k = r.next() % 3;
                    match r.next() % 6 {
                        0 => {
                            let v = c.get_with(k, || k * 10);
                            if v != k * 10 && v != 11 {
                                bad.push(format!("blocking get_with({k}) = {v}"));
                            }
                        }
                        1 => match c.load(k) {
                            Ok(v) if v != k * 10 && v != 11 => bad.push(format!("load({k}) = {v}")),
                            _ => {}
                        },
                        2 => c.invalidate(&k),
                        3 => c.insert(k, k * 10),
                        4 => {
                            let _ = c.optionally_get_with(k, || None);
                        }
                        _ => std::thread::yield_now(),
                    }
                }
                bad
            }));
        }
        let c2 = c.clone();
        let res = rt.block_on(async move {
            let mut handles = Vec::new();
            let mut r = common::Rng(0xabcdef + cfg as u64);
            for _ in 0..3000 {
                let c = c2.clone();
                let k = r.next() % 3;
                let verb = r.next() % 4;
                let pend = (r.next() % 5) as u32;
                let b = r.next() % 8; // mostly values
                let b = if b < 5 {
                    0
                } else if b < 7 {
                    1
                } else {
                    2
                };
                let ty = r.next() % 2 == 0;
                let to = r.next() % 4; // 0: no timeout, else timeout of 0..3 ms (0 = immediately)
                let own = Arc::new(AtomicBool::new(false));
                let own2 = own.clone();
                let fut = async move {
                    let init = storm_init(k, pend, b, ty, own2);
                    let v: Option<u64> = match verb {
                        0 => Some(
                            c.get_with_async_shared(k, async move { init.await.unwrap_or(11) })
                                .await,
                        ),
                        1 => c
                            .try_get_with_async_shared(
                                k,
                                async move { init.await.ok_or("injected") },
                            )
                            .await
                            .ok(),
                        2 => c.optionally_get_with_async_shared(k, init).await,
                        _ => c.load_async(k).await.ok(),
                    };
                    v
                };
                let h = tokio::spawn(async move {
                    if to == 0 {
                        Some(fut.await)
                    } else {
                        tokio::time::timeout(Duration::from_micros((to - 1) * 700), fut)
                            .await
                            .ok()
                    }
                });
                handles.push((k, own, h));
                if handles.len() % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let mut bad = Vec::new();
            for (k, own, h) in handles {
                match tokio::time::timeout(Duration::from_secs(20), h).await {
                    Err(_) => bad.push(format!("a task on key {k} hung (20 s)")),
                    Ok(Ok(Some(Some(v)))) if v != k * 10 && v != 11 => {
                        bad.push(format!("key {k}: wrong value {v}"))
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if e.is_panic() => {
                        let m = panic_message(&*e.into_panic());
                        let own = own.load(Ordering::SeqCst);
                        if m.contains("panicked while another caller was driving it") && !own {
                            bad.push(format!("key {k}: spurious lost-load panic: {m}"));
                        } else if !m.contains("injected")
                            && !m.contains("panicked while another caller was driving it")
                        {
                            bad.push(format!("key {k}: unexpected panic: {m}"));
                        }
                    }
                    Ok(Err(e)) => bad.push(format!("join error {e}")),
                }
            }
            bad
        });
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            bad.extend(t.join().unwrap());
        }
        drop(rt);
        bad.extend(res);
        if !common::eventually(|| c.loads_in_flight() == 0) {
            bad.push(format!(
                "cfg {cfg}: loads_in_flight {}",
                c.loads_in_flight()
            ));
        }
        if let Some(e) = identity_err(&c) {
            bad.push(format!("cfg {cfg}: {e}"));
        }
        bad.extend(mon.finish().into_iter().map(|m| format!("cfg {cfg}: {m}")));
        eprintln!("storm cfg {cfg}: {}", show(&c.stats()));
        for k in 0..3 {
            c.invalidate(&k);
            if c.get_with(k, || 99) != 99 {
                bad.push(format!("cfg {cfg}: key {k} not loadable again"));
            }
        }
        bad.truncate(40);
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 4. A shared leader waiting for a permit, its load taken over by a nested caller that holds
//    one (and fails), while a joiner is polling the leader's load: the leader's `init` must come
//    back to it (it never started), never "lost".
// ---------------------------------------------------------------------------------------------

/// FAILS (a race: roughly 1 iteration in 5-50 hits it; the test runs up to 2000 iterations and
/// stops after 11 failures).
/// `max_concurrent_loads(1)`; thread O holds the permit (a load of key 100) and inside it calls
/// `try_get_with(1, || Err(..))`. Leader A (`get_with_async_shared(1, ..)`) registered key 1
/// first and its shared load waits for the permit; joiner B polls that load from another thread
/// while A polls too. O takes A's unstarted load over and publishes its error.
/// Expected: A's `init` never started (it ran 0 times), so A gets it back and loads again: A and
/// B both get 10. Observed: A panics with "herdcache: the load this call started panicked while
/// another caller was driving it, and nobody is loading the key now" although nothing panicked —
/// when B is in the middle of polling A's load at the moment O ends the flight, the load (and
/// the `init` it holds) is still in B's hands when A retries and finds nothing to give back.
#[test]
fn shared_leader_taken_over_while_joiner_polls_panics_lost_load() {
    let _w = watchdog(LIMIT, "steal race");
    quiet_injected_panics();
    let mut bad = Vec::new();
    let iters = 2000;
    for it in 0..iters {
        let c: C = Cache::builder()
            .max_capacity(100)
            .record_stats()
            .max_concurrent_loads(1)
            .build();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (holding_tx, holding_rx) = mpsc::channel::<()>();
        let co = c.clone();
        // O: holds the only permit (a load of key 100), and inside it fails key 1 (taking the
        // leader's load over: it holds a permit, the leader waits for one).
        let o = std::thread::spawn(move || {
            co.get_with(100, || {
                let _ = holding_tx.send(());
                let _ = go_rx.recv_timeout(Duration::from_secs(10));
                let _ = co.try_get_with(1, || Err::<u64, _>("injected"));
                1000
            })
        });
        holding_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let ca = c.clone();
        let a_ran = Arc::new(AtomicUsize::new(0));
        let a_ran2 = a_ran.clone();
        let mut a: BoxFut<u64> = Box::pin(async move {
            ca.get_with_async_shared(1, async move {
                a_ran2.fetch_add(1, Ordering::SeqCst);
                10
            })
            .await
        });
        let w = futures::task::noop_waker();
        assert!(matches!(poll_with(&mut a, &w), Ok(Poll::Pending)));
        let cb = c.clone();
        let mut bf: BoxFut<u64> =
            Box::pin(async move { cb.get_with_async_shared(1, async { 10 }).await });
        assert!(matches!(poll_with(&mut bf, &w), Ok(Poll::Pending)));
        // B spins on its own thread; A spins here; then O takes over and fails.
        let bt = std::thread::spawn(move || {
            let w = futures::task::noop_waker();
            for _ in 0..2_000_000 {
                match poll_with(&mut bf, &w) {
                    Ok(Poll::Pending) => {}
                    Ok(Poll::Ready(v)) => return Ok(v),
                    Err(m) => return Err(m),
                }
            }
            Err("B never finished".to_string())
        });
        go_tx.send(()).unwrap();
        let mut ra = Err("A never finished".to_string());
        for _ in 0..2_000_000 {
            match poll_with(&mut a, &w) {
                Ok(Poll::Pending) => {}
                Ok(Poll::Ready(v)) => {
                    ra = Ok(v);
                    break;
                }
                Err(m) => {
                    ra = Err(m);
                    break;
                }
            }
        }
        let rb = bt.join().unwrap();
        let _ = o.join();
        if ra != Ok(10) || rb != Ok(10) {
            bad.push(format!(
                "iter {it}: A {ra:?} B {rb:?} (A's init ran {})",
                a_ran.load(Ordering::SeqCst)
            ));
        }
        if c.loads_in_flight() != 0 {
            bad.push(format!(
                "iter {it}: loads_in_flight {}",
                c.loads_in_flight()
            ));
        }
        if let Some(e) = identity_err(&c) {
            bad.push(format!("iter {it}: {e}"));
        }
        if bad.len() > 10 {
            break;
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {iters} broken:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Keys whose Clone / Hash / Eq panic at the n-th call: by-ref loads (sync and async) and
//    `load_with_timeout` with a spawner, alone and with a joiner / a negative entry.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Eq)]
struct PK(u64);
static PANIC_AT: AtomicU64 = AtomicU64::new(u64::MAX);
static OPS: AtomicU64 = AtomicU64::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
static KEY_LOCK: Mutex<()> = Mutex::new(());
fn tick() {
    if !ARMED.load(Ordering::SeqCst) {
        return;
    }
    let n = OPS.fetch_add(1, Ordering::SeqCst);
    if n == PANIC_AT.load(Ordering::SeqCst) {
        panic!("injected key panic at op {n}");
    }
}
impl PartialEq for PK {
    fn eq(&self, o: &Self) -> bool {
        tick();
        self.0 == o.0
    }
}
impl Clone for PK {
    fn clone(&self) -> Self {
        tick();
        PK(self.0)
    }
}
impl std::hash::Hash for PK {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        tick();
        self.0.hash(h)
    }
}
type PC = Cache<PK, u64>;

fn pk_verb(c: &PC, verb: usize, b: u64) -> Option<u64> {
    let init = move || match b {
        0 => Some(10u64),
        1 => None,
        _ => panic!("injected init panic"),
    };
    match verb {
        0 => Some(c.get_with_by_ref(&PK(1), move || init().unwrap_or(11))),
        1 => c
            .try_get_with_by_ref(&PK(1), move || init().ok_or("injected"))
            .ok(),
        2 => Some(futures::executor::block_on(c.get_with_by_ref_async(
            &PK(1),
            async move { init().unwrap_or(11) },
        ))),
        3 => futures::executor::block_on(
            c.optionally_get_with_by_ref_async(&PK(1), async move { init() }),
        ),
        4 => c
            .load_with_timeout(PK(1), Some(Duration::from_secs(5)))
            .ok(),
        5 => c.load(PK(1)).ok(),
        6 => Some(futures::executor::block_on(c.get_with_async_shared(
            PK(1),
            async move { init().unwrap_or(11) },
        ))),
        7 => futures::executor::block_on(c.load_async(PK(1))).ok(),
        _ => c
            .load_with_timeout(PK(1), Some(Duration::from_millis(1)))
            .ok(),
    }
}

/// Every by-ref verb and `load_with_timeout`/`load` under three spawners, loader outcomes,
/// negative TTL, a load limit, and prior states (empty; a failed load remembered; a blocking
/// leader of the key in flight that the call joins): the key's n-th Clone/Hash/Eq panics, for
/// every n until the call makes fewer operations. The miss classified (identity), no flight
/// left, the key loadable afterwards, no hang.
#[test]
fn key_panics_at_every_point_by_ref_and_spawned() {
    let _w = watchdog(LIMIT, "key panics");
    quiet_injected_panics();
    let _g = KEY_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut bad = Vec::new();
    let mut runs = 0u64;
    let part = common::Part::new("key panics");
    let mut case = 0u64;
    for spawn in 0..3 {
        for negative in [false, true] {
            for limit in [None, Some(1)] {
                for verb in 0..9 {
                    for b in 0..3u64 {
                        for pre in 0..3 {
                            case += 1;
                            if !part.take(case) {
                                continue;
                            }
                            for at in 0..60u64 {
                                runs += 1;
                                let lb = Arc::new(AtomicU64::new(b));
                                let lb2 = lb.clone();
                                let mut bl = Cache::builder()
                                    .max_capacity(100)
                                    .record_stats()
                                    .loader(move |k: &PK| match lb2.load(Ordering::SeqCst) {
                                        0 => Ok(k.0 * 10),
                                        1 => Err(BoxError::from("injected")),
                                        _ => panic!("injected loader panic"),
                                    });
                                let lb3 = lb.clone();
                                bl = bl.async_loader(move |k: &PK| {
                                    let b = lb3.load(Ordering::SeqCst);
                                    let v = k.0 * 10;
                                    async move {
                                        common::Yield(1).await;
                                        match b {
                                            0 => Ok(v),
                                            1 => Err(BoxError::from("injected")),
                                            _ => panic!("injected loader panic"),
                                        }
                                    }
                                });
                                if negative {
                                    bl = bl.negative_ttl(Duration::from_secs(3600));
                                }
                                if let Some(l) = limit {
                                    bl = bl.max_concurrent_loads(l);
                                }
                                bl = match spawn {
                                    0 => bl,
                                    1 => bl.spawner(|job| {
                                        std::thread::spawn(job);
                                    }),
                                    _ => bl.spawner(|job| job()),
                                };
                                let c: PC = bl.build();
                                // Prior state.
                                let mut leader = None;
                                let (rel_tx, rel_rx) = mpsc::channel::<()>();
                                match pre {
                                    1 => {
                                        let _ = c.try_get_with(PK(1), || Err::<u64, _>("injected"));
                                    }
                                    2 => {
                                        let (in_tx, in_rx) = mpsc::channel::<()>();
                                        let cl = c.clone();
                                        leader = Some(std::thread::spawn(move || {
                                            cl.get_with(PK(1), || {
                                                let _ = in_tx.send(());
                                                let _ =
                                                    rel_rx.recv_timeout(Duration::from_millis(30));
                                                10
                                            })
                                        }));
                                        in_rx.recv_timeout(Duration::from_secs(10)).unwrap();
                                    }
                                    _ => {}
                                }
                                OPS.store(0, Ordering::SeqCst);
                                PANIC_AT.store(at, Ordering::SeqCst);
                                ARMED.store(true, Ordering::SeqCst);
                                let r = catch(|| pk_verb(&c, verb, b));
                                ARMED.store(false, Ordering::SeqCst);
                                let ops = OPS.load(Ordering::SeqCst);
                                let _ = rel_tx.send(());
                                if let Some(l) = leader {
                                    let _ = l.join();
                                }
                                let name = format!(
                                    "spawn={spawn} neg={negative} limit={limit:?} verb={verb} b={b} pre={pre} at={at}"
                                );
                                if let Err(m) = &r {
                                    if !m.contains("injected") {
                                        bad.push(format!("{name}: unexpected panic {m}"));
                                    }
                                }
                                if !common::eventually(|| c.loads_in_flight() == 0) {
                                    bad.push(format!("{name}: flight left behind ({:?})", r));
                                }
                                if let Some(e) = identity_err(&c) {
                                    bad.push(format!("{name}: {e} (call {:?})", r));
                                }
                                lb.store(0, Ordering::SeqCst);
                                c.invalidate(&PK(1));
                                let c2 = c.clone();
                                match common::within(Duration::from_secs(5), move || {
                                    c2.get_with(PK(1), || 99)
                                }) {
                                    Some(Ok(99)) => {}
                                    other => bad.push(format!(
                                        "{name}: not loadable again: {:?}",
                                        other.map(|r| r.ok())
                                    )),
                                }
                                if bad.len() > 40 {
                                    break;
                                }
                                if at > ops {
                                    break; // the call made fewer key operations: swept
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("key panics: {runs} runs");
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// Four shared callers on keys drawn from 0..3 under `max_concurrent_loads(1|2)`: random
/// schedules of polls and drops (callers dropped while waiting for a permit, while holding
/// one), then the rest driven round robin. Nobody stranded (a permit never leaked), values
/// right, identity, nothing in flight.
#[test]
fn shared_multi_key_limited_random_schedules() {
    let _w = watchdog(LIMIT, "multi-key schedules");
    quiet_injected_panics();
    let mut r = common::Rng(0x51f15e1d);
    let mut bad = Vec::new();
    for _ in 0..6000 {
        let n = 4;
        let setup = Setup {
            keys: (0..n).map(|_| r.next() % 3).collect(),
            verbs: (0..n).map(|_| (r.next() % 4) as usize).collect(),
            behs: (0..n)
                .map(|_| [0u64, 0, 1, 2][(r.next() % 4) as usize])
                .collect(),
            pend: (r.next() % 4) as u32,
            negative: r.next() % 2 == 0,
            limit: [Some(1), Some(2)][(r.next() % 2) as usize],
        };
        let len = 4 + (r.next() % 12) as usize;
        let ops: Vec<Op> = (0..len)
            .map(|_| {
                let i = (r.next() % n as u64) as usize;
                if r.next() % 4 == 0 {
                    Op::Drop(i)
                } else {
                    Op::Poll(i)
                }
            })
            .collect();
        for p in run_schedule(&setup, &ops) {
            if bad.len() < 40 {
                bad.push(format!(
                    "keys={:?} verbs={:?} behs={:?} pend={} neg={} limit={:?} ops={ops:?}: {p}",
                    setup.keys, setup.verbs, setup.behs, setup.pend, setup.negative, setup.limit
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// Like `run_schedule`, but as a real executor: each caller has its own recording waker and is
/// polled only when first started or when woken; drops at any point. At the end, woken callers
/// are polled until none is woken: a caller still unfinished then is stranded (a lost wake-up).
fn run_woken_schedule(setup: &Setup, ops: &[Op]) -> Vec<String> {
    let n = setup.verbs.len();
    let runs: Vec<Arc<AtomicUsize>> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let lb = Arc::new(Mutex::new(vec![setup.behs[0]; 8]));
    let c = build_shared(setup, lb, Arc::new(AtomicUsize::new(0)));
    let mut futs: Vec<Option<BoxFut<R>>> = (0..n)
        .map(|i| {
            Some(shared_call(
                &c,
                setup.verbs[i],
                setup.keys.get(i).copied().unwrap_or(1),
                setup.pend,
                setup.behs[i],
                runs[i].clone(),
            ))
        })
        .collect();
    let wakers: Vec<(Arc<Flag>, Waker)> = (0..n).map(|_| flag_waker()).collect();
    let mut started = vec![false; n];
    let mut bad = Vec::new();
    let step = |i: usize,
                futs: &mut Vec<Option<BoxFut<R>>>,
                started: &mut Vec<bool>,
                bad: &mut Vec<String>| {
        let Some(f) = futs[i].as_mut() else { return };
        if started[i] && !wakers[i].0 .0.swap(false, Ordering::SeqCst) {
            return; // not woken: a real executor would not poll it
        }
        wakers[i].0 .0.store(false, Ordering::SeqCst);
        started[i] = true;
        match poll_with(f, &wakers[i].1) {
            Ok(Poll::Pending) => {}
            Ok(Poll::Ready(_)) => futs[i] = None,
            Err(m) => {
                let legit = m.contains("injected")
                    || (m.contains("panicked while another caller was driving it")
                        && setup.behs[i] == 2
                        && runs[i].load(Ordering::SeqCst) == 1);
                if !legit {
                    bad.push(format!("caller {i}: spurious panic {m}"));
                }
                futs[i] = None;
            }
        }
    };
    for op in ops {
        match *op {
            Op::Poll(i) => step(i, &mut futs, &mut started, &mut bad),
            Op::Drop(i) => {
                futs[i] = None;
            }
        }
    }
    // Unstarted callers start now.
    for i in 0..n {
        if !started[i] {
            step(i, &mut futs, &mut started, &mut bad);
        }
    }
    for _ in 0..2000 {
        let woken: Vec<usize> = (0..n)
            .filter(|&i| futs[i].is_some() && wakers[i].0 .0.load(Ordering::SeqCst))
            .collect();
        if woken.is_empty() {
            break;
        }
        for i in woken {
            step(i, &mut futs, &mut started, &mut bad);
        }
    }
    let stranded: Vec<usize> = (0..n).filter(|&i| futs[i].is_some()).collect();
    if !stranded.is_empty() {
        bad.push(format!(
            "callers {stranded:?} stranded: pending and never woken"
        ));
    }
    drop(futs);
    if c.loads_in_flight() != 0 {
        bad.push(format!("loads_in_flight {}", c.loads_in_flight()));
    }
    if let Some(e) = identity_err(&c) {
        bad.push(e);
    }
    bad
}

/// Real-executor discipline (poll only when woken), single thread: 2-3 callers, every schedule
/// of up to 5 steps for two callers, random for three (keys shared or not, limits). Nobody is
/// stranded un-woken.
#[test]
fn shared_woken_only_executor_schedules() {
    let _w = watchdog(LIMIT, "woken-only schedules");
    quiet_injected_panics();
    let mut bad = Vec::new();
    let scripts = all_scripts(2, 5);
    let part = common::Part::new("woken-only schedules");
    let mut case = 0u64;
    for va in 0..4 {
        for vb in 0..4 {
            for ba in 0..3u64 {
                for (pend, negative, limit) in [(1, false, None), (2, true, Some(1))] {
                    case += 1;
                    if !part.take(case) {
                        continue;
                    }
                    let setup = Setup {
                        keys: vec![],
                        verbs: vec![va, vb],
                        behs: vec![ba, 0],
                        pend,
                        negative,
                        limit,
                    };
                    for s in &scripts {
                        for p in run_woken_schedule(&setup, s) {
                            if bad.len() < 40 {
                                bad.push(format!(
                                    "verbs={:?} behs={:?} pend={pend} neg={negative} limit={limit:?} ops={s:?}: {p}",
                                    setup.verbs, setup.behs
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    let mut r = common::Rng(0x77aa55);
    for _ in 0..part.count(6000) {
        let n = 3;
        let setup = Setup {
            keys: if r.next() % 2 == 0 {
                vec![]
            } else {
                (0..n).map(|_| r.next() % 2).collect()
            },
            verbs: (0..n).map(|_| (r.next() % 4) as usize).collect(),
            behs: (0..n)
                .map(|_| [0u64, 0, 1, 2][(r.next() % 4) as usize])
                .collect(),
            pend: (r.next() % 4) as u32,
            negative: r.next() % 2 == 0,
            limit: [None, Some(1), Some(2)][(r.next() % 3) as usize],
        };
        let len = 3 + (r.next() % 10) as usize;
        let ops: Vec<Op> = (0..len)
            .map(|_| {
                let i = (r.next() % n as u64) as usize;
                if r.next() % 4 == 0 {
                    Op::Drop(i)
                } else {
                    Op::Poll(i)
                }
            })
            .collect();
        for p in run_woken_schedule(&setup, &ops) {
            if bad.len() < 40 {
                bad.push(format!(
                    "keys={:?} verbs={:?} behs={:?} pend={} neg={} limit={:?} ops={ops:?}: {p}",
                    setup.keys, setup.verbs, setup.behs, setup.pend, setup.negative, setup.limit
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// Churn on one key from 3 threads: shared callers polled 0-3 times (noop or recording
/// wakers) then dropped, or driven to the end; a fourth thread invalidates and inserts.
/// Exact accounting: every init that completed was published as one success, every init that
/// started and did not complete is one abandoned load (no limit: a load starts in its leader's
/// first poll); identity; counters monotone; nothing in flight; no hang.
#[test]
fn shared_join_and_drop_churn_exact_accounting() {
    let _w = watchdog(LIMIT, "churn");
    churn(None, 1);
}

/// The churn under `max_concurrent_loads(1|2)` on 3 keys: a load dropped before its permit
/// came never started its init, so loads_abandoned >= started - completed; every completed init
/// one success; afterwards every key loads within 5 s (no permit leaked).
#[test]
fn shared_join_and_drop_churn_limited() {
    let _w = watchdog(LIMIT, "churn limited");
    churn(Some(1), 3);
    churn(Some(2), 3);
}

fn churn(limit: Option<usize>, keys: u64) {
    let mut b = Cache::builder().max_capacity(100).record_stats();
    if let Some(l) = limit {
        b = b.max_concurrent_loads(l);
    }
    let c: C = b.build();
    let mon = monitor(&c);
    let started = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let c = c.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if i % 7 == 0 {
                    c.insert(1, 10);
                } else {
                    c.invalidate(&1);
                }
                std::thread::yield_now();
            }
        })
    };
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let c = c.clone();
        let (started, completed) = (started.clone(), completed.clone());
        hs.push(std::thread::spawn(move || {
            let mut r = common::Rng(0xfeed + t);
            let mut bad = Vec::new();
            for _ in 0..20_000 {
                let (s2, c2) = (started.clone(), completed.clone());
                let k = r.next() % keys;
                if r.next() % 4 != 0 {
                    c.invalidate(&k);
                }
                let pend = (r.next() % 4) as u32;
                let cc = c.clone();
                let mut f: BoxFut<u64> = Box::pin(async move {
                    cc.get_with_async_shared(k, async move {
                        s2.fetch_add(1, Ordering::SeqCst);
                        common::Yield(pend).await;
                        c2.fetch_add(1, Ordering::SeqCst);
                        10
                    })
                    .await
                });
                let (_, fw) = flag_waker();
                let nw = futures::task::noop_waker();
                let w = if r.next() % 2 == 0 { &fw } else { &nw };
                let polls = if r.next() % 3 == 0 {
                    1000
                } else {
                    r.next() % 4
                };
                for _ in 0..polls {
                    match poll_with(&mut f, w) {
                        Ok(Poll::Pending) => std::thread::yield_now(),
                        Ok(Poll::Ready(v)) => {
                            if v != 10 {
                                bad.push(format!("value {v}"));
                            }
                            break;
                        }
                        Err(m) => {
                            bad.push(format!("panic: {m}"));
                            break;
                        }
                    }
                }
                drop(f);
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for h in hs {
        bad.extend(h.join().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    bad.extend(mon.finish());
    let s = c.stats();
    let (st, co) = (
        started.load(Ordering::SeqCst),
        completed.load(Ordering::SeqCst),
    );
    if c.loads_in_flight() != 0 {
        bad.push(format!("loads_in_flight {}", c.loads_in_flight()));
    }
    if let Some(e) = identity_err(&c) {
        bad.push(e);
    }
    let abandoned_ok = if limit.is_none() {
        s.loads_abandoned == st - co
    } else {
        s.loads_abandoned >= st - co
    };
    if s.load_successes != co || !abandoned_ok || s.load_failures != 0 {
        bad.push(format!(
            "inits started {st}, completed {co}; expected load_successes={co} loads_abandoned={}: {}",
            st - co,
            show(&s)
        ));
    }
    eprintln!("churn {limit:?}: started {st} completed {co}: {}", show(&s));
    for k in 0..keys {
        c.invalidate(&k);
        let c2 = c.clone();
        match common::within(Duration::from_secs(5), move || c2.get_with(k, || 99)) {
            Some(Ok(99)) => {}
            other => bad.push(format!("key {k} not loadable: {:?}", other.map(|r| r.ok()))),
        }
    }
    bad.truncate(40);
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// A pending-until-`go` future (no wake-up: the test polls by hand).
struct Until(Arc<AtomicBool>);
impl Future for Until {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.0.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// `max_concurrent_loads(1)`. Async load X (key 100, borrowing `get_with_async`) holds the
/// permit; blocking leader L (`get_with(1)`) registered key 1 and waits for a permit; X's init
/// then awaits key 1 (shared or borrowing), takes L's load over (it holds a permit), and X is
/// dropped after `k` more polls (or driven to the end). L must not hang (it loads itself, or
/// gets X's value), nothing is left in flight, the identity holds, the permit is not leaked.
#[test]
fn async_taker_of_a_blocking_leaders_load_dropped_at_every_poll() {
    let _w = watchdog(LIMIT, "async taker dropped");
    quiet_injected_panics();
    let mut bad = Vec::new();
    for inner in 0..3 {
        for k in 0..10usize {
            let c: C = Cache::builder()
                .max_capacity(100)
                .record_stats()
                .max_concurrent_loads(1)
                .build();
            let go = Arc::new(AtomicBool::new(false));
            let cx_ = c.clone();
            let go2 = go.clone();
            let mut x: BoxFut<u64> = Box::pin(async move {
                let c2 = cx_.clone();
                cx_.get_with_async(100, async move {
                    Until(go2).await;
                    let v = match inner {
                        0 => {
                            c2.get_with_async_shared(1, async {
                                common::Yield(5).await;
                                10
                            })
                            .await
                        }
                        1 => {
                            c2.get_with_async(1, async {
                                common::Yield(5).await;
                                10
                            })
                            .await
                        }
                        _ => c2
                            .try_get_with_async_shared(1, async {
                                common::Yield(5).await;
                                Err::<u64, _>("injected")
                            })
                            .await
                            .unwrap_or(11),
                    };
                    v + 1000
                })
                .await
            });
            let w = futures::task::noop_waker();
            assert!(matches!(poll_with(&mut x, &w), Ok(Poll::Pending)));
            let cl = c.clone();
            let l = common::start(move || cl.get_with(1, || 20));
            if !common::eventually(|| c.loads_in_flight() == 2) {
                bad.push(format!("inner={inner} k={k}: L did not register"));
            }
            go.store(true, Ordering::SeqCst);
            let mut xr = None;
            for _ in 0..(if k == 9 { 1000 } else { k + 1 }) {
                match poll_with(&mut x, &w) {
                    Ok(Poll::Pending) => {}
                    Ok(Poll::Ready(v)) => {
                        xr = Some(Ok(v));
                        break;
                    }
                    Err(m) => {
                        xr = Some(Err(m));
                        break;
                    }
                }
            }
            drop(x);
            let name = format!("inner={inner} k={k} x={xr:?}");
            let lr = l.wait(Duration::from_secs(5));
            if k == 9 || k == 2 {
                eprintln!(
                    "{name}: L {:?} {}",
                    lr.as_ref().map(|r| r.as_ref().ok()),
                    show(&c.stats())
                );
            }
            match lr {
                Some(Ok(v)) if v == 10 || v == 20 => {}
                other => bad.push(format!("{name}: L got {:?}", other.map(|r| r.ok()))),
            }
            if let Some(Err(m)) = &xr {
                bad.push(format!("{name}: X panicked: {m}"));
            }
            if !common::eventually(|| c.loads_in_flight() == 0) {
                bad.push(format!("{name}: loads_in_flight {}", c.loads_in_flight()));
            }
            if let Some(e) = identity_err(&c) {
                bad.push(format!("{name}: {e}"));
            }
            let c2 = c.clone();
            match common::within(Duration::from_secs(5), move || c2.get_with(7, || 7)) {
                Some(Ok(7)) => {}
                other => bad.push(format!(
                    "{name}: permit leaked? {:?}",
                    other.map(|r| r.ok())
                )),
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}

/// A shared async leader polled once and then left unpolled (kept alive): a blocking
/// `load_with_timeout` (every spawner shape, with and without a load limit) joins it and must
/// time out within its bound (never poll it), then the leader is dropped (the load cancelled)
/// or driven to the end; the identity holds, nothing is left in flight, the key loads again.
#[test]
fn blocking_timeout_joiner_of_an_unpolled_shared_leader() {
    let _w = watchdog(LIMIT, "blocking timeout joiner");
    let mut bad = Vec::new();
    for spawn in 0..3 {
        for limit in [None, Some(1)] {
            for end in 0..2 {
                for verb in 0..4 {
                    let mut bl = Cache::builder()
                        .max_capacity(100)
                        .record_stats()
                        .loader(|k: &u64| Ok::<_, BoxError>(*k * 10))
                        .async_loader(|k: &u64| {
                            let v = *k * 10;
                            async move {
                                common::Yield(3).await;
                                Ok::<_, BoxError>(v)
                            }
                        });
                    if let Some(l) = limit {
                        bl = bl.max_concurrent_loads(l);
                    }
                    bl = match spawn {
                        0 => bl,
                        1 => bl.spawner(|job| {
                            std::thread::spawn(job);
                        }),
                        _ => bl.spawner(|job| job()),
                    };
                    let c: C = bl.build();
                    let runs = Arc::new(AtomicUsize::new(0));
                    let mut a = shared_call(&c, verb, 1, 3, 0, runs.clone());
                    let w = futures::task::noop_waker();
                    assert!(matches!(poll_with(&mut a, &w), Ok(Poll::Pending)));
                    let c2 = c.clone();
                    let t0 = std::time::Instant::now();
                    let r = common::within(Duration::from_secs(5), move || {
                        c2.load_with_timeout(1, Some(Duration::from_millis(30)))
                    });
                    let took = t0.elapsed();
                    let name = format!("spawn={spawn} limit={limit:?} end={end} verb={verb}");
                    match r {
                        Some(Ok(Err(LoadError::Timeout))) if took < Duration::from_secs(2) => {}
                        other => bad.push(format!(
                            "{name}: load_with_timeout gave {:?} after {took:?}",
                            other.map(|r| r.map_err(|_| ()).ok())
                        )),
                    }
                    if end == 0 {
                        drop(a);
                    } else {
                        let mut done = false;
                        for _ in 0..100 {
                            if let Ok(Poll::Ready(v)) = poll_with(&mut a, &w) {
                                if v != R::Val(10) {
                                    bad.push(format!("{name}: leader got {v:?}"));
                                }
                                done = true;
                                break;
                            }
                        }
                        if !done {
                            bad.push(format!("{name}: leader never finished"));
                        }
                    }
                    if !common::eventually(|| c.loads_in_flight() == 0) {
                        bad.push(format!("{name}: loads_in_flight {}", c.loads_in_flight()));
                    }
                    if let Some(e) = identity_err(&c) {
                        bad.push(format!("{name}: {e}"));
                    }
                    let s = c.stats();
                    if end == 0 && s.loads_abandoned != 1 {
                        bad.push(format!("{name}: expected one abandoned load: {}", show(&s)));
                    }
                    c.invalidate(&1);
                    let c2 = c.clone();
                    match common::within(Duration::from_secs(5), move || c2.load(1)) {
                        Some(Ok(Ok(10))) => {}
                        other => bad.push(format!(
                            "{name}: not loadable again: {:?}",
                            other.map(|r| r.map_err(|_| ()).ok())
                        )),
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} broken:\n{}", bad.len(), bad.join("\n"));
}
