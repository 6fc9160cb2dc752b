#![cfg(not(any(loom, shuttle)))]
//! Round 66 of the outside attacks (a helper, public API plus the `testing` hooks): a
//! randomized stress of the misses identity (`CacheStats::misses`: once every caller returned
//! and no load is in flight, `load_successes + load_failures + loads_abandoned + coalesced +
//! negative_hits == misses + refreshes_started`) around one key: a fresh cache per round with a
//! random configuration (negative caching, fail-safe, a load limit, a soft timeout, refresh, a
//! spawner), the key in a random state, a gated loader that yields, sleeps, ends with a value,
//! an error or a panic (some only when polled off the tokio runtime), 28 entry points called on
//! blocking threads, tokio tasks and futures-executor threads, async callers cancelled after
//! some polls, a write, invalidation or clock advance mid-load, slowed user `Clone`/`Eq`/`Drop`
//! and the N-th drop of a key, value, error or guard panicking. Each round also checks that no
//! load is left in flight, no caller hangs, and `validate()`.
//!
//! Found (fixed in the same stop, `attack_s66` pins it): a shared load counted twice when the
//! caller that registered it panicked sweeping an old registration of the key — the cause of
//! stop 48's CI failure in `attack_s55`. About 1 round in 3,700 failed (focused mode) before;
//! none in 13,750 after (`BAL_CI_SECS=240 BAL_FOCUS=1`).
//!
//! Each test runs for 8 s by default (`HERDCACHE_TEST_PART` shortens it); `BAL_SECS` /
//! `BAL_CI_SECS` set the time, `BAL_SEED` the first seed (printed), `BAL_FOCUS=1` the focused
//! mode; `BAL_REPLAY=<seed>` with `--ignored` replays a failing round.
mod common;

use herdcache::{Cache, CompResult, LoadError, ManualClock, Op};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- drop-panic injection
static ARM_MASK: AtomicU32 = AtomicU32::new(0);
static ARM_LEFT: AtomicI64 = AtomicI64::new(0);
const D_KEY: u32 = 1;
const D_VAL: u32 = 2;
const D_ERR: u32 = 4;
const D_GUARD: u32 = 8;

fn drop_hook(kind: u32) {
    if ARM_MASK.load(SeqCst) & kind == 0 || std::thread::panicking() {
        return;
    }
    if ARM_LEFT.fetch_sub(1, SeqCst) == 1 {
        let bt = std::backtrace::Backtrace::force_capture();
        let name = std::thread::current().name().unwrap_or("?").to_string();
        *INJECTED.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((format!("kind {kind} on thread {name}"), bt));
        panic!("injected drop panic kind {kind}");
    }
}

// ---------------------------------------------------------------- slow user code
static SLOW_MASK: AtomicU32 = AtomicU32::new(0);
const S_KCLONE: u32 = 1;
const S_VCLONE: u32 = 2;
const S_GDROP: u32 = 4;
const S_LOADER_END: u32 = 8;
const S_KEQ: u32 = 16;
std::thread_local! {
    static TRNG: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}
fn slow(bit: u32) {
    if SLOW_MASK.load(SeqCst) & bit == 0 {
        return;
    }
    let x = TRNG.with(|c| {
        let mut x = c.get();
        if x == 0 {
            x = 0x9E37_79B9_7F4A_7C15 ^ (c as *const _ as u64);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        x
    });
    if x % 4 == 0 {
        std::thread::sleep(Duration::from_micros(x % 400));
    } else if x % 4 == 1 {
        std::thread::yield_now();
    }
}

static INJECTED: Mutex<Option<(String, std::backtrace::Backtrace)>> = Mutex::new(None);

/// The switches above are the process's: two rounds at once (this file's tests run on the test
/// harness's threads) would arm each other's drops. Every test holds this lock. Before, about
/// one round in 12,000 under AddressSanitizer (stop 51's CI: one in 619) failed with "run_case
/// panicked: injected drop panic" in a round that armed nothing, a drop the other test armed.
static SERIAL: Mutex<()> = Mutex::new(());
/// Keeps the herdcache frames (and the frame just above the first one) of a backtrace.
fn trim_bt(bt: &str) -> String {
    let mut out = Vec::new();
    let lines: Vec<&str> = bt.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("herdcache::") || l.contains("zz_helper_balance::") {
            let mut s = l.trim().to_string();
            if let Some(at) = lines
                .get(i + 1)
                .filter(|n| n.trim_start().starts_with("at "))
            {
                s.push_str(&format!("  ({})", at.trim().trim_start_matches("at ")));
            }
            out.push(s);
        }
    }
    out.join("\n")
}

#[derive(Debug)]
struct K(u64);
impl Clone for K {
    fn clone(&self) -> Self {
        slow(S_KCLONE);
        K(self.0)
    }
}
impl PartialEq for K {
    fn eq(&self, o: &Self) -> bool {
        slow(S_KEQ);
        self.0 == o.0
    }
}
impl Eq for K {}
impl std::hash::Hash for K {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}
impl Drop for K {
    fn drop(&mut self) {
        drop_hook(D_KEY)
    }
}
#[derive(Debug, PartialEq)]
struct V(u64);
impl Clone for V {
    fn clone(&self) -> Self {
        slow(S_VCLONE);
        V(self.0)
    }
}
impl Drop for V {
    fn drop(&mut self) {
        drop_hook(D_VAL)
    }
}
#[derive(Debug)]
struct E(u64);
impl std::fmt::Display for E {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "E{}", self.0)
    }
}
impl std::error::Error for E {}
impl Drop for E {
    fn drop(&mut self) {
        drop_hook(D_ERR)
    }
}
struct G;
impl Drop for G {
    fn drop(&mut self) {
        slow(S_GDROP);
        drop_hook(D_GUARD)
    }
}

// ---------------------------------------------------------------- gate
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}
impl Gate {
    fn open(&self) {
        self.open.store(true, SeqCst);
        let ws: Vec<Waker> = std::mem::take(&mut *self.wakers.lock().unwrap());
        for w in ws {
            // a waker may hold the last handle to a flight whose drop runs user drops
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
        }
    }
    fn wait_blocking(&self) {
        let until = Instant::now() + Duration::from_secs(20);
        while !self.open.load(SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    fn wait(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let g = self.clone();
        std::future::poll_fn(move |cx| {
            if g.open.load(SeqCst) {
                return Poll::Ready(());
            }
            g.wakers.lock().unwrap().push(cx.waker().clone());
            if g.open.load(SeqCst) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
    }
}

// ---------------------------------------------------------------- plan
#[derive(Clone, Debug)]
struct LoaderPlan {
    /// 0 value, 1 error, 2 panic
    outcome: u8,
    /// panic when polled off a tokio runtime (after the gate)
    off_tokio: u8, // 0 no, 1 check-panic, 2 real tokio::time::sleep
    yields: u32,
    gated: bool,
}

#[derive(Clone, Debug)]
struct InitPlan {
    /// 0 value, 1 error/None (where possible), 2 panic
    outcome: u8,
    gated: bool,
    yields: u32,
    guard: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    // blocking
    GetWith,
    TryGetWith,
    OptGetWith,
    OrInsertWith,
    ComputeWith,
    GetWithIf,
    GetAll,
    Load,
    LoadTimeout,
    BlockOnLoadAsync,
    BlockOnShared,
    BlockOnGetWithAsync,
    GetWithByRef,
    OptGetWithByRef,
    OrInsertWithIf,
    OrTryInsertWith,
    // tokio
    ALoadAsync,
    AGetWith,
    ATryGetWith,
    AOptGetWith,
    AShared,
    ATryShared,
    AGetWithIf,
    AComputeWith,
    AOrInsertWith,
    ATryByRef,
    AOptShared,
    AUpsert,
}
const KINDS: &[Kind] = &[
    Kind::GetWith,
    Kind::TryGetWith,
    Kind::OptGetWith,
    Kind::OrInsertWith,
    Kind::ComputeWith,
    Kind::GetWithIf,
    Kind::GetAll,
    Kind::Load,
    Kind::LoadTimeout,
    Kind::BlockOnLoadAsync,
    Kind::BlockOnShared,
    Kind::BlockOnGetWithAsync,
    Kind::ALoadAsync,
    Kind::AGetWith,
    Kind::ATryGetWith,
    Kind::AOptGetWith,
    Kind::AShared,
    Kind::ATryShared,
    Kind::AGetWithIf,
    Kind::AComputeWith,
    Kind::AOrInsertWith,
    Kind::GetWithByRef,
    Kind::OptGetWithByRef,
    Kind::OrInsertWithIf,
    Kind::OrTryInsertWith,
    Kind::ATryByRef,
    Kind::AOptShared,
    Kind::AUpsert,
];
fn is_async(k: Kind) -> bool {
    matches!(
        k,
        Kind::ALoadAsync
            | Kind::AGetWith
            | Kind::ATryGetWith
            | Kind::AOptGetWith
            | Kind::AShared
            | Kind::ATryShared
            | Kind::AGetWithIf
            | Kind::AComputeWith
            | Kind::AOrInsertWith
            | Kind::ATryByRef
            | Kind::AOptShared
            | Kind::AUpsert
    )
}

#[derive(Clone, Debug)]
struct CallerPlan {
    kind: Kind,
    init: InitPlan,
    delay_us: u64,
    /// async only: cancel after this many polls (None: run to the end)
    cancel_after_polls: Option<u32>,
    /// get_with_if: replace_if answer
    replace: bool,
}

#[derive(Clone, Debug)]
#[allow(dead_code)]
struct Case {
    seed: u64,
    negative: bool,
    fail_safe: bool,
    limit: Option<usize>,
    load_timeout: bool,
    refresh: bool,
    spawner: bool,
    /// 0 absent, 1 expired, 2 fresh, 3 negative, 4 due for refresh
    state: u8,
    loader: LoaderPlan,
    /// leader kind; None: no dedicated leader
    leader: Option<CallerPlan>,
    callers: Vec<CallerPlan>,
    /// 0 none, 1 insert, 2 invalidate, 3 invalidate_all, 4 advance clock
    mid: u8,
    mid_delay_us: u64,
    open_delay_us: u64,
    arm_mask: u32,
    arm_n: i64,
    /// arm just before the gate opens instead of before the callers start
    arm_late: bool,
    slow_mask: u32,
    /// how many times the callers run against the same cache (1..=3)
    phases: u8,
    /// between phases: 0 nothing, 1 expire (advance 11 s), 2 advance 2 s, 3 insert
    between: u8,
}

fn gen_init(r: &mut common::SplitMix) -> InitPlan {
    InitPlan {
        outcome: match r.below(10) {
            0..=5 => 0,
            6..=7 => 1,
            _ => 2,
        },
        gated: r.chance(300),
        yields: if r.chance(500) { r.below(4) as u32 } else { 0 },
        guard: r.chance(500),
    }
}

fn gen_caller(r: &mut common::SplitMix, kind: Kind) -> CallerPlan {
    CallerPlan {
        kind,
        init: gen_init(r),
        delay_us: if r.chance(300) { 0 } else { r.below(3000) },
        cancel_after_polls: if is_async(kind) && r.chance(200) {
            Some(r.below(4) as u32)
        } else {
            None
        },
        replace: r.chance(300),
    }
}

fn gen_case(seed: u64) -> Case {
    let mut r = common::SplitMix(seed);
    let negative = r.chance(400);
    let fail_safe = r.chance(400);
    let limit = if r.chance(300) {
        Some(1 + r.below(2) as usize)
    } else {
        None
    };
    let load_timeout = r.chance(100);
    let refresh = r.chance(150);
    let spawner = r.chance(100);
    let mut state = match r.below(10) {
        0..=1 => 0,
        2..=6 => 1,
        7 => 2,
        8 => 3,
        _ => 4,
    };
    if state == 3 && !negative {
        state = 1;
    }
    if state == 4 && !refresh {
        state = 1;
    }
    let loader = LoaderPlan {
        outcome: match r.below(10) {
            0..=4 => 0,
            5..=6 => 1,
            _ => 2,
        },
        off_tokio: match r.below(10) {
            0..=3 => 0,
            4..=5 => 1,
            6..=7 => 2,
            _ => 3,
        },
        yields: r.below(3) as u32,
        gated: r.chance(850),
    };
    let leader = if r.chance(900) {
        let k = match r.below(10) {
            0..=5 => Kind::ALoadAsync,
            6 => Kind::BlockOnLoadAsync,
            7 => Kind::AShared,
            8 => Kind::Load,
            _ => Kind::GetWith,
        };
        let mut c = gen_caller(&mut r, k);
        c.delay_us = 0;
        c.cancel_after_polls = if is_async(k) && r.chance(100) {
            Some(1 + r.below(3) as u32)
        } else {
            None
        };
        Some(c)
    } else {
        None
    };
    let n = 1 + r.below(10) as usize;
    let mut callers = Vec::new();
    // the CI-like waiter often
    if r.chance(600) {
        callers.push(gen_caller(&mut r, Kind::BlockOnLoadAsync));
    }
    for _ in 0..n {
        let k = KINDS[r.below(KINDS.len() as u64) as usize];
        callers.push(gen_caller(&mut r, k));
    }
    let mid = match r.below(10) {
        0..=5 => 0,
        6..=7 => 1,
        8 => 2,
        _ => 3 + r.below(2) as u8,
    };
    let arm_mask = if r.chance(350) {
        (1 + r.below(15)) as u32
    } else {
        0
    };
    Case {
        seed,
        negative,
        fail_safe,
        limit,
        load_timeout,
        refresh,
        spawner,
        state,
        loader,
        leader,
        callers,
        mid,
        mid_delay_us: r.below(3000),
        open_delay_us: r.below(4000),
        arm_mask,
        arm_n: match r.below(3) {
            0 => 1 + r.below(12) as i64,
            1 => 1 + r.below(60) as i64,
            _ => 1 + r.below(300) as i64,
        },
        arm_late: r.chance(400),
        slow_mask: if r.chance(500) { r.below(32) as u32 } else { 0 },
        phases: if r.chance(700) {
            1
        } else {
            2 + r.below(2) as u8
        },
        between: r.below(4) as u8,
    }
}

// ---------------------------------------------------------------- helpers
fn on_tokio() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

fn loader_future(
    plan: LoaderPlan,
    gate: Arc<Gate>,
) -> impl Future<Output = Result<V, E>> + Send + 'static {
    let g = G;
    async move {
        let _g = g;
        if plan.gated {
            gate.wait().await;
        }
        if !on_tokio() {
            OFF_TOKIO_POLLS.fetch_add(1, SeqCst);
        }
        match plan.off_tokio {
            1 if !on_tokio() => panic!("injected: there is no reactor running"),
            2 => tokio::time::sleep(Duration::from_micros(300)).await,
            3 => {
                tokio::time::sleep(Duration::from_micros(200)).await;
                common::Yield(1).await;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            _ => {}
        }
        common::Yield(plan.yields).await;
        slow(S_LOADER_END);
        match plan.outcome {
            0 => Ok(V(100)),
            1 => Err(E(1)),
            _ => panic!("injected loader panic"),
        }
    }
}

fn init_sync(p: &InitPlan, gate: &Arc<Gate>) -> Result<V, E> {
    let _g = p.guard.then_some(G);
    if p.gated {
        gate.wait_blocking();
    }
    match p.outcome {
        0 => Ok(V(200)),
        1 => Err(E(2)),
        _ => panic!("injected init panic"),
    }
}

fn init_async(p: InitPlan, gate: Arc<Gate>) -> impl Future<Output = Result<V, E>> + Send + 'static {
    let g = p.guard.then_some(G);
    async move {
        let _g = g;
        if p.gated {
            gate.wait().await;
        }
        common::Yield(p.yields).await;
        match p.outcome {
            0 => Ok(V(300)),
            1 => Err(E(3)),
            _ => panic!("injected async init panic"),
        }
    }
}

/// Drops the inner future after `n` polls that returned Pending.
struct CancelAfter<F> {
    inner: Option<Pin<Box<F>>>,
    left: Option<u32>,
}
impl<F: Future> Future for CancelAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(f) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match f.as_mut().poll(cx) {
            Poll::Ready(v) => {
                self.inner = None;
                Poll::Ready(Some(v))
            }
            Poll::Pending => {
                if let Some(l) = self.left.as_mut() {
                    if *l == 0 {
                        self.inner = None; // cancel
                        return Poll::Ready(None);
                    }
                    *l -= 1;
                }
                Poll::Pending
            }
        }
    }
}
fn cancel_after<F: Future>(f: F, left: Option<u32>) -> CancelAfter<F> {
    CancelAfter {
        inner: Some(Box::pin(f)),
        left,
    }
}

type C = Cache<K, V>;

/// Runs one blocking caller on the current thread. Returns a short description.
fn run_blocking(c: &C, p: &CallerPlan, gate: &Arc<Gate>) -> String {
    let k = K(7);
    match p.kind {
        Kind::GetWith => format!(
            "{:?}",
            c.get_with(k, || init_sync(&p.init, gate).unwrap_or(V(201)))
        ),
        Kind::TryGetWith => format!(
            "{:?}",
            c.try_get_with(k, || init_sync(&p.init, gate))
                .map_err(|e| e.0)
        ),
        Kind::OptGetWith => format!(
            "{:?}",
            c.optionally_get_with(k, || init_sync(&p.init, gate).ok())
        ),
        Kind::OrInsertWith => format!(
            "{:?}",
            c.entry(k)
                .or_insert_with(|| init_sync(&p.init, gate).unwrap_or(V(202)))
                .into_value()
        ),
        Kind::ComputeWith => {
            let r = c
                .entry(k)
                .and_compute_with(|e| match init_sync(&p.init, gate) {
                    Ok(v) => {
                        if e.is_some() && p.replace {
                            Op::Remove
                        } else {
                            Op::Put(v)
                        }
                    }
                    Err(_) => Op::Nop,
                });
            match r {
                CompResult::Inserted(_) => "inserted".into(),
                CompResult::ReplacedWith(_) => "replaced".into(),
                CompResult::Removed(_) => "removed".into(),
                CompResult::Unchanged(_) => "unchanged".into(),
                CompResult::StillNone(_) => "stillnone".into(),
            }
        }
        Kind::GetWithIf => {
            let rep = p.replace;
            format!(
                "{:?}",
                c.get_with_if(
                    k,
                    || init_sync(&p.init, gate).unwrap_or(V(203)),
                    move |_| rep
                )
            )
        }
        Kind::GetAll => {
            let init = p.init.clone();
            let m = c.get_all([k], |missing| {
                let v = init_sync(&init, gate);
                let mut out = std::collections::HashMap::new();
                if let Ok(v) = v {
                    for m in missing {
                        out.insert(m.clone(), v.clone());
                    }
                }
                out
            });
            format!("{:?}", m.get(&K(7)))
        }
        Kind::Load => format!("{:?}", c.load(k).map_err(short)),
        Kind::LoadTimeout => format!(
            "{:?}",
            c.load_with_timeout(k, Some(Duration::from_micros(p.delay_us % 2000 + 100)))
                .map_err(short)
        ),
        Kind::BlockOnLoadAsync => format!(
            "{:?}",
            futures::executor::block_on(c.load_async(k)).map_err(short)
        ),
        Kind::BlockOnShared => {
            let f = init_async(p.init.clone(), gate.clone());
            format!(
                "{:?}",
                futures::executor::block_on(
                    c.get_with_async_shared(k, async move { f.await.unwrap_or(V(204)) })
                )
            )
        }
        Kind::BlockOnGetWithAsync => {
            let f = init_async(p.init.clone(), gate.clone());
            format!(
                "{:?}",
                futures::executor::block_on(
                    c.get_with_async(k, async move { f.await.unwrap_or(V(205)) })
                )
            )
        }
        Kind::GetWithByRef => format!(
            "{:?}",
            c.get_with_by_ref(&k, || init_sync(&p.init, gate).unwrap_or(V(206)))
        ),
        Kind::OptGetWithByRef => format!(
            "{:?}",
            c.optionally_get_with_by_ref(&k, || init_sync(&p.init, gate).ok())
        ),
        Kind::OrInsertWithIf => {
            let rep = p.replace;
            format!(
                "{:?}",
                c.entry(k)
                    .or_insert_with_if(|| init_sync(&p.init, gate).unwrap_or(V(207)), move |_| rep)
                    .into_value()
            )
        }
        Kind::OrTryInsertWith => format!(
            "{:?}",
            c.entry(k)
                .or_try_insert_with(|| init_sync(&p.init, gate))
                .map(|e| e.into_value())
                .map_err(|e| e.0)
        ),
        _ => unreachable!(),
    }
}

fn short(e: LoadError) -> &'static str {
    match e {
        LoadError::Loader(_) => "Loader",
        LoadError::Timeout => "Timeout",
        LoadError::NoLoader => "NoLoader",
        LoadError::Panicked => "Panicked",
        _ => "other",
    }
}

async fn run_async(c: C, p: CallerPlan, gate: Arc<Gate>) -> String {
    let k = K(7);
    let init = init_async(p.init.clone(), gate.clone());
    let left = p.cancel_after_polls;
    let r: Option<String> = match p.kind {
        Kind::ALoadAsync => cancel_after(c.load_async(k), left)
            .await
            .map(|r| format!("{:?}", r.map_err(short))),
        Kind::AGetWith => cancel_after(
            c.get_with_async(k, async move { init.await.unwrap_or(V(301)) }),
            left,
        )
        .await
        .map(|r| format!("{r:?}")),
        Kind::ATryGetWith => cancel_after(c.try_get_with_async(k, init), left)
            .await
            .map(|r| format!("{:?}", r.map_err(|e| e.0))),
        Kind::AOptGetWith => cancel_after(
            c.optionally_get_with_async(k, async move { init.await.ok() }),
            left,
        )
        .await
        .map(|r| format!("{r:?}")),
        Kind::AShared => cancel_after(
            c.get_with_async_shared(k, async move { init.await.unwrap_or(V(302)) }),
            left,
        )
        .await
        .map(|r| format!("{r:?}")),
        Kind::ATryShared => cancel_after(c.try_get_with_async_shared(k, init), left)
            .await
            .map(|r| format!("{:?}", r.map_err(|e| e.0))),
        Kind::AGetWithIf => {
            let rep = p.replace;
            cancel_after(
                c.get_with_if_async(k, async move { init.await.unwrap_or(V(303)) }, move |_| rep),
                left,
            )
            .await
            .map(|r| format!("{r:?}"))
        }
        Kind::AComputeWith => {
            let rep = p.replace;
            cancel_after(
                c.entry(k).and_compute_with_async(move |e| async move {
                    match init.await {
                        Ok(v) => {
                            if e.is_some() && rep {
                                Op::Remove
                            } else {
                                Op::Put(v)
                            }
                        }
                        Err(_) => Op::Nop,
                    }
                }),
                left,
            )
            .await
            .map(|r| match r {
                CompResult::Inserted(_) => "inserted".into(),
                CompResult::ReplacedWith(_) => "replaced".into(),
                CompResult::Removed(_) => "removed".into(),
                CompResult::Unchanged(_) => "unchanged".into(),
                CompResult::StillNone(_) => "stillnone".into(),
            })
        }
        Kind::AOrInsertWith => cancel_after(
            c.entry(k)
                .or_insert_with_async(async move { init.await.unwrap_or(V(304)) }),
            left,
        )
        .await
        .map(|e| format!("{:?}", e.into_value())),
        Kind::ATryByRef => cancel_after(c.try_get_with_by_ref_async(&k, init), left)
            .await
            .map(|r| format!("{:?}", r.map_err(|e| e.0))),
        Kind::AOptShared => cancel_after(
            c.optionally_get_with_async_shared(k, async move { init.await.ok() }),
            left,
        )
        .await
        .map(|r| format!("{r:?}")),
        Kind::AUpsert => cancel_after(
            c.entry(k)
                .and_upsert_with_async(move |_e| async move { init.await.unwrap_or(V(305)) }),
            left,
        )
        .await
        .map(|e| format!("{:?}", e.into_value())),
        _ => unreachable!(),
    };
    r.unwrap_or_else(|| "cancelled".into())
}

enum Handle {
    Thread(common::Started<String>),
    Task(tokio::task::JoinHandle<String>),
}

fn start_caller(c: &C, p: &CallerPlan, gate: &Arc<Gate>, rt: &tokio::runtime::Runtime) -> Handle {
    if is_async(p.kind) {
        let (c, p, g) = (c.clone(), p.clone(), gate.clone());
        Handle::Task(rt.spawn(async move {
            if p.delay_us > 0 {
                tokio::time::sleep(Duration::from_micros(p.delay_us)).await;
            }
            run_async(c, p, g).await
        }))
    } else {
        let (c, p, g) = (c.clone(), p.clone(), gate.clone());
        Handle::Thread(common::start(move || {
            if p.delay_us > 0 {
                std::thread::sleep(Duration::from_micros(p.delay_us));
            }
            run_blocking(&c, &p, &g)
        }))
    }
}

fn join(h: Handle, rt: &tokio::runtime::Runtime) -> Result<String, &'static str> {
    match h {
        Handle::Thread(s) => match s.wait(Duration::from_secs(20)) {
            None => Err("HANG"),
            Some(Ok(s)) => Ok(s),
            Some(Err(_)) => Ok("panicked".into()),
        },
        Handle::Task(t) => {
            match rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), t).await }) {
                Err(_) => Err("HANG"),
                Ok(Ok(s)) => Ok(s),
                Ok(Err(_)) => Ok("panicked".into()),
            }
        }
    }
}

type Slot = Arc<Mutex<Arc<Gate>>>;
fn cur(slot: &Slot) -> Arc<Gate> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn build(case: &Case, clock: &ManualClock, gate: &Slot) -> C {
    let mut b = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .clock(clock.clone())
        .time_to_live(Duration::from_secs(10));
    if case.negative {
        b = b.negative_ttl(Duration::from_secs(100));
    }
    if case.fail_safe {
        b = b.fail_safe(Duration::from_secs(1000));
    }
    if let Some(n) = case.limit {
        b = b.max_concurrent_loads(n);
    }
    if case.load_timeout {
        b = b.load_timeout(Duration::from_millis(2));
    }
    if case.refresh {
        b = b.refresh_after(Duration::from_secs(5));
    }
    if case.spawner {
        b = b.spawner(|job| {
            std::thread::spawn(job);
        });
    }
    let lp = case.loader.clone();
    let g = gate.clone();
    b = b.async_loader(move |_k: &K| loader_future(lp.clone(), cur(&g)));
    let lp = case.loader.clone();
    let g = gate.clone();
    b = b.loader(move |_k: &K| {
        let _g = G;
        if lp.gated {
            cur(&g).wait_blocking();
        }
        match lp.outcome {
            0 => Ok(V(101)),
            1 => Err(E(11)),
            _ => panic!("injected blocking loader panic"),
        }
    });
    b.build()
}

struct Outcome {
    ok: bool,
    msg: String,
}

fn balance_msg(c: &C) -> (bool, String) {
    let s = c.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    let right = s.misses + s.refreshes_started;
    let ok = answered == right && s.refreshes_started == s.refreshes_succeeded + s.refreshes_failed;
    (
        ok,
        format!(
            "answered {answered} vs misses+refreshes {right} (misses {} succ {} fail {} aband {} coal {} neg {} rs {} rsucc {} rfail {} hits {} timeouts {} stale_after_ttl {})",
            s.misses,
            s.load_successes,
            s.load_failures,
            s.loads_abandoned,
            s.coalesced,
            s.negative_hits,
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed,
            s.hits,
            s.timeouts,
            s.stale_served_after_ttl
        ),
    )
}

fn run_case(case: &Case, rt: &tokio::runtime::Runtime) -> Outcome {
    ARM_MASK.store(0, SeqCst);
    *INJECTED.lock().unwrap_or_else(|e| e.into_inner()) = None;
    SLOW_MASK.store(case.slow_mask, SeqCst);
    let clock = ManualClock::new();
    let slot: Slot = Arc::new(Mutex::new(Arc::new(Gate::default())));
    let cache = build(case, &clock, &slot);
    // key state
    match case.state {
        1 => {
            cache.insert(K(7), V(1));
            clock.advance(Duration::from_secs(11));
        }
        2 => cache.insert(K(7), V(2)),
        3 => {
            let _ = cache.try_get_with(K(7), || Err::<V, E>(E(0)));
        }
        4 => {
            cache.insert(K(7), V(4));
            clock.advance(Duration::from_secs(6));
        }
        _ => {}
    }
    let (pre_ok, pre) = balance_msg(&cache);
    assert!(pre_ok, "setup unbalanced: {pre}");
    let mut all = String::new();
    for phase in 0..case.phases.max(1) {
        if phase > 0 {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match case.between {
                1 => clock.advance(Duration::from_secs(11)),
                2 => clock.advance(Duration::from_secs(2)),
                3 => cache.insert(K(7), V(8)),
                _ => {}
            }));
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(Gate::default());
        }
        let gate = cur(&slot);
        let out = run_phase(case, rt, &cache, &clock, &gate);
        all.push_str(&format!(" [phase {phase}: {}]", out.msg));
        if !out.ok {
            return Outcome {
                ok: false,
                msg: all,
            };
        }
    }
    Outcome { ok: true, msg: all }
}

fn run_phase(
    case: &Case,
    rt: &tokio::runtime::Runtime,
    cache: &C,
    clock: &ManualClock,
    gate: &Arc<Gate>,
) -> Outcome {
    let cache = cache.clone();
    let gate = gate.clone();
    if case.arm_mask != 0 && !case.arm_late {
        ARM_LEFT.store(case.arm_n, SeqCst);
        ARM_MASK.store(case.arm_mask, SeqCst);
    }
    let mut handles = Vec::new();
    if let Some(l) = &case.leader {
        handles.push(start_caller(&cache, l, &gate, rt));
        let until = Instant::now() + Duration::from_millis(20);
        while cache.loads_in_flight() == 0 && Instant::now() < until {
            std::thread::yield_now();
        }
    }
    for p in &case.callers {
        handles.push(start_caller(&cache, p, &gate, rt));
    }
    // mid-load action and gate opening, from this thread, ordered by delay
    let t0 = Instant::now();
    let mut did_mid = case.mid == 0;
    let mut opened = false;
    while !(did_mid && opened) {
        let el = t0.elapsed().as_micros() as u64;
        if !did_mid && el >= case.mid_delay_us {
            did_mid = true;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match case.mid {
                1 => cache.insert(K(7), V(9)),
                2 => cache.invalidate(&K(7)),
                3 => cache.invalidate_all(),
                _ => clock.advance(Duration::from_secs(11)),
            }));
        }
        if !opened && el >= case.open_delay_us {
            opened = true;
            if case.arm_mask != 0 && case.arm_late {
                ARM_LEFT.store(case.arm_n, SeqCst);
                ARM_MASK.store(case.arm_mask, SeqCst);
            }
            gate.open();
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let mut results = Vec::new();
    let mut hang = false;
    for h in handles {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| join(h, rt)))
            .unwrap_or(Ok("join panicked".into()))
        {
            Ok(s) => results.push(s),
            Err(e) => {
                hang = true;
                results.push(e.to_string())
            }
        }
    }
    ARM_MASK.store(0, SeqCst);
    let settled = common::eventually(|| cache.loads_in_flight() == 0);
    // A spawned job (refresh, soft-timed-out load) counts its end once it returns, maybe
    // after its callers did: wait for the balance (at most 10 s; a correct run at once).
    let mut ok;
    let mut msg;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        (ok, msg) = balance_msg(&cache);
        if ok || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let valid = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.validate()));
    let mut problems = Vec::new();
    if hang {
        problems.push("a caller hung".to_string());
    }
    if !settled {
        problems.push(format!("loads in flight left: {}", cache.describe_loads()));
    }
    if !ok {
        problems.push(format!("UNBALANCED: {msg}"));
    }
    if let Err(p) = valid {
        problems.push(format!("validate failed: {}", common::panic_message(&*p)));
    }
    let injected = if problems.is_empty() {
        String::new()
    } else {
        INJECTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(String::new(), |(s, bt)| {
                format!(
                    "\n  injected drop panic: {s}:\n{}",
                    trim_bt(&bt.to_string())
                )
            })
    };
    Outcome {
        ok: problems.is_empty(),
        msg: format!(
            "{} | {msg} | results {results:?}{injected}",
            problems.join("; ")
        ),
    }
}

fn quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = common::panic_message(info.payload());
            if !(msg.contains("injected")
                || msg.contains("reactor")
                || msg.contains("herdcache: the load this call started panicked"))
            {
                default(info);
            }
        }));
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

/// Each randomized test's default time: 8 s, shortened under `HERDCACHE_TEST_PART`.
fn default_secs() -> u64 {
    common::Part::new("balance rounds")
        .of(Duration::from_secs(8))
        .as_secs()
        .max(1)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

static ROUNDS: AtomicU64 = AtomicU64::new(0);
static OFF_TOKIO_POLLS: AtomicU64 = AtomicU64::new(0);

#[test]
fn misses_balance_under_random_schedules() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs = env_u64("BAL_SECS", default_secs());
    quiet_hook();
    let base = env_u64("BAL_SEED", {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let _wd = common::watchdog(Duration::from_secs(secs + 300), "balance stress");
    eprintln!("balance stress: BAL_SEED={base} for {secs}s");
    let rt = runtime();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut fails = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        let seed = base.wrapping_add(i);
        i += 1;
        if i % 1000 == 0 {
            eprintln!(
                "progress: {i} rounds, {} failures, loader polled off tokio after gate {} times",
                fails.len(),
                OFF_TOKIO_POLLS.load(SeqCst)
            );
        }
        let case = gen_case(seed);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&case, &rt)))
            .unwrap_or_else(|p| Outcome {
                ok: false,
                msg: format!("run_case panicked: {}", common::panic_message(&*p)),
            });
        ROUNDS.fetch_add(1, SeqCst);
        if !out.ok {
            eprintln!("FAIL seed {seed}: {}\n  case {case:?}", out.msg);
            fails.push(seed);
            if fails.len() >= 10 {
                break;
            }
        }
    }
    eprintln!(
        "balance stress: {i} rounds, {} failures: {fails:?}",
        fails.len()
    );
    assert!(fails.is_empty(), "failing seeds {fails:?}");
}

/// Replays one seed many times (BAL_REPLAY=seed, BAL_TIMES=n; BAL_CI=1 for a seed of
/// `misses_balance_with_every_caller_at_once`): a tool, run with `--ignored`.
#[test]
#[ignore = "a tool: BAL_REPLAY=<seed> replays a failing round"]
fn replay_one_seed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(seed) = std::env::var("BAL_REPLAY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    quiet_hook();
    let times = env_u64("BAL_TIMES", 200);
    let _wd = common::watchdog(Duration::from_secs(600), "balance replay");
    let rt = runtime();
    let case = if std::env::var("BAL_CI").is_ok() {
        gen_case_ci(seed)
    } else {
        gen_case(seed)
    };
    eprintln!("replay {seed}: {case:?}");
    let mut fails = 0;
    for _ in 0..times {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&case, &rt)))
            .unwrap_or_else(|p| Outcome {
                ok: false,
                msg: format!("run_case panicked: {}", common::panic_message(&*p)),
            });
        if std::env::var("BAL_VERBOSE").is_ok() {
            eprintln!("round: {}", out.msg);
        }
        if !out.ok {
            fails += 1;
            eprintln!("FAIL: {}", out.msg);
        }
    }
    eprintln!("replay {seed}: {fails}/{times} failed");
    assert_eq!(fails, 0);
}

/// CI-like cases: every kind of caller at once on an expired key, load_async leader.
fn gen_case_ci(seed: u64) -> Case {
    let mut c = gen_case(seed);
    let mut r = common::SplitMix(seed ^ 0xDEAD_BEEF);
    let cfg = r.below(5);
    c.negative = cfg == 1 || r.chance(200);
    c.fail_safe = cfg == 2 || r.chance(200);
    c.limit = (cfg == 3 || r.chance(100)).then_some(1);
    c.load_timeout = false;
    c.refresh = false;
    c.spawner = false;
    c.state = if r.chance(850) { 1 } else { 0 };
    c.mid = if cfg == 4 || r.chance(150) { 1 } else { 0 };
    c.loader.off_tokio = 1 + r.below(3) as u8;
    c.loader.gated = true;
    c.loader.outcome = r.below(3) as u8;
    let mut l = gen_caller(&mut r, Kind::ALoadAsync);
    l.delay_us = 0;
    l.cancel_after_polls = None;
    c.leader = Some(l);
    let mut callers = Vec::new();
    for &k in KINDS {
        if matches!(k, Kind::LoadTimeout | Kind::BlockOnGetWithAsync) && r.chance(700) {
            continue;
        }
        let mut p = gen_caller(&mut r, k);
        p.delay_us = r.below(1500);
        if r.chance(850) {
            p.cancel_after_polls = None;
        }
        callers.push(p);
    }
    c.callers = callers;
    c.open_delay_us = 500 + r.below(3000);
    c.arm_mask = if r.chance(500) {
        (1 + r.below(15)) as u32
    } else {
        0
    };
    if std::env::var("BAL_FOCUS").is_ok() {
        c.fail_safe = true;
        c.negative = false;
        c.limit = None;
        c.mid = 0;
        c.state = 0;
        c.loader.outcome = 2;
        c.arm_mask = 15;
        c.phases = 1;
    }
    c
}

#[test]
fn misses_balance_with_every_caller_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs = env_u64("BAL_CI_SECS", default_secs());
    quiet_hook();
    let base = env_u64("BAL_SEED", {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let _wd = common::watchdog(Duration::from_secs(secs + 300), "balance ci-like");
    eprintln!("balance ci-like: BAL_SEED={base} for {secs}s");
    let rt = runtime();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut fails = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        let seed = base.wrapping_add(i);
        i += 1;
        if i % 1000 == 0 {
            eprintln!(
                "progress: {i} rounds, {} failures, loader polled off tokio after gate {} times",
                fails.len(),
                OFF_TOKIO_POLLS.load(SeqCst)
            );
        }
        let case = gen_case_ci(seed);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&case, &rt)))
            .unwrap_or_else(|p| Outcome {
                ok: false,
                msg: format!("run_case panicked: {}", common::panic_message(&*p)),
            });
        if !out.ok {
            eprintln!("FAIL ci seed {seed}: {}\n  case {case:?}", out.msg);
            fails.push(seed);
            if fails.len() >= 10 {
                break;
            }
        }
    }
    eprintln!(
        "balance ci-like: {i} rounds, {} failures: {fails:?}",
        fails.len()
    );
    assert!(fails.is_empty(), "failing seeds {fails:?}");
}
