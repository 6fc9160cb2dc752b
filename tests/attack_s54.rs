#![cfg(not(any(loom, shuttle)))]
//! Outside attack (public API only, plus the `validate` / `loads_in_flight` test hooks): user
//! `Drop`s that panic while a load ends *and other callers wait for it*. `faults.rs` sweeps a
//! panic at every call into user code, but from one thread: a load that ends unresolved with
//! nobody waiting for it shows nothing there. Here each case has waiters (blocking and async)
//! parked on the load when the fault fires, and checks that every one of them returns.
//!
//! - The key's `Drop`, panicking at its N-th drop after the load started (N swept until a case
//!   runs with no fault fired), for loads that succeed, fail and panic.
//! - The `Drop` of a shared async load's `init` future, panicking when the load is cancelled
//!   (every async caller gone, a blocking caller still waiting) or superseded.
//!
//! After each case, disarmed: every caller returned within the deadline, no load is left in
//! flight, a fresh `get_with` of the key loads, `validate()` passes.

mod common;

use common::key_drop::{self, PKey, CASE_LOCK};
use common::{quiet_injected_panics, start, watchdog};
use herdcache::Cache;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Ends {
    Value,
    Error,
    Panic,
}

/// After a case: disarmed, nothing in flight, the key loads afresh, the cache is consistent.
fn after(cache: &Cache<PKey, u64>, what: &str) {
    key_drop::disarm();
    for _ in 0..500 {
        if cache.loads_in_flight() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(cache.loads_in_flight(), 0, "{what}: a load left in flight");
    cache.invalidate(&PKey(7));
    let c = cache.clone();
    let v = start(move || c.get_with(PKey(7), || 4242))
        .wait(DEADLINE)
        .unwrap_or_else(|| panic!("{what}: a fresh load of the key hangs"))
        .unwrap_or_else(|_| panic!("{what}: a fresh load of the key panicked"));
    assert_eq!(v, 4242, "{what}");
    cache.validate();
}

/// A sync leader (loader ends as `ends`), a blocking waiter (`get_with`), a blocking waiter
/// (`try_get_with`) and an async waiter; the key's N-th drop after the waiters joined panics.
/// Returns whether the fault fired.
fn sync_case(ends: Ends, n: u64, rt: &tokio::runtime::Runtime) -> bool {
    let what = format!("sync leader ending {ends:?}, key drop {n} panics");
    let cache: Cache<PKey, u64> = Cache::builder().max_capacity(100).build();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (in_tx, in_rx) = std::sync::mpsc::channel::<()>();
    let c = cache.clone();
    let leader = start(move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.try_get_with(PKey(7), || {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                match ends {
                    Ends::Value => Ok(70),
                    Ends::Error => Err("down"),
                    Ends::Panic => panic!("injected: loader"),
                }
            })
        }))
        .map(|r| r.ok())
    });
    in_rx.recv().unwrap();
    let c = cache.clone();
    let w1 = start(move || c.get_with(PKey(7), || 71));
    let c = cache.clone();
    let w2 = start(move || c.try_get_with(PKey(7), || Ok::<_, &str>(72)).ok());
    let c = cache.clone();
    let w3 = rt.spawn(async move { c.get_with_async(PKey(7), async { 73 }).await });
    // Let the waiters join the load (whether they have or not, none may hang).
    std::thread::sleep(Duration::from_millis(30));
    key_drop::arm(n);
    go_tx.send(()).unwrap();
    let l = leader.wait(DEADLINE);
    assert!(l.is_some(), "{what}: the leader hangs");
    let r1 = w1.wait(DEADLINE);
    assert!(r1.is_some(), "{what}: a blocking waiter (get_with) hangs");
    let r2 = w2.wait(DEADLINE);
    assert!(
        r2.is_some(),
        "{what}: a blocking waiter (try_get_with) hangs"
    );
    let r3 = rt.block_on(async { tokio::time::timeout(DEADLINE, w3).await });
    assert!(r3.is_ok(), "{what}: an async waiter hangs");
    let fired = key_drop::fired();
    after(&cache, &what);
    fired
}

#[test]
fn key_drop_panics_while_callers_wait_for_a_sync_load() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(240), "attack_s54 key drop, sync");
    quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    for ends in [Ends::Value, Ends::Error, Ends::Panic] {
        let mut n = 1;
        while sync_case(ends, n, &rt) {
            n += 1;
            assert!(n < 64, "the sweep does not end");
        }
        assert!(
            n > 1,
            "{ends:?}: no key drop fired (the sweep tests nothing)"
        );
    }
}

/// An async leader (`get_with_async`) whose `init` never finishes is cancelled (a timeout)
/// while a blocking caller and an async caller wait for its load; the key's N-th drop after
/// they joined panics.
fn cancelled_leader_case(n: u64, rt: &tokio::runtime::Runtime) -> bool {
    let what = format!("async leader cancelled, key drop {n} panics");
    let cache: Cache<PKey, u64> = Cache::builder().max_capacity(100).build();
    let c = cache.clone();
    let leader = rt.spawn(async move {
        let f = c.get_with_async(PKey(7), std::future::pending::<u64>());
        tokio::time::timeout(Duration::from_millis(100), f).await
    });
    std::thread::sleep(Duration::from_millis(20));
    let c = cache.clone();
    let w1 = start(move || c.get_with(PKey(7), || 71));
    let c = cache.clone();
    let w2 = rt.spawn(async move { c.get_with_async(PKey(7), async { 72 }).await });
    std::thread::sleep(Duration::from_millis(20));
    key_drop::arm(n);
    let l = rt.block_on(async { tokio::time::timeout(DEADLINE, leader).await });
    assert!(l.is_ok(), "{what}: the leader hangs");
    let r1 = w1.wait(DEADLINE);
    assert!(r1.is_some(), "{what}: a blocking waiter hangs");
    let r2 = rt.block_on(async { tokio::time::timeout(DEADLINE, w2).await });
    assert!(r2.is_ok(), "{what}: an async waiter hangs");
    let fired = key_drop::fired();
    after(&cache, &what);
    fired
}

#[test]
fn key_drop_panics_while_callers_wait_for_a_cancelled_load() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(240), "attack_s54 key drop, cancelled");
    quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut n = 1;
    while cancelled_leader_case(n, &rt) {
        n += 1;
        assert!(n < 64, "the sweep does not end");
    }
    assert!(n > 1, "no key drop fired (the sweep tests nothing)");
}

/// A future whose `Drop` panics if armed, pending until `release` is set.
struct BombFuture {
    armed: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    value: u64,
}

impl std::future::Future for BombFuture {
    type Output = u64;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<u64> {
        if self.release.load(SeqCst) {
            return std::task::Poll::Ready(self.value);
        }
        // Polled again soon (no lost wake-up: the test releases it or drops it).
        let w = cx.waker().clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            w.wake();
        });
        std::task::Poll::Pending
    }
}

impl Drop for BombFuture {
    fn drop(&mut self) {
        self.dropped.store(true, SeqCst);
        if self.armed.swap(false, SeqCst) && !std::thread::panicking() {
            panic!("injected: init future drop");
        }
    }
}

/// A shared async load whose `init` never finishes; its async callers give up (a timeout), a
/// blocking caller still waits: the load is cancelled and its `init`'s drop panics. The
/// blocking caller must not hang (it loads itself), and the key must load afresh.
#[test]
fn init_future_drop_panics_when_a_shared_load_is_cancelled() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(120), "attack_s54 future drop");
    quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let bombs: &[bool] = if std::env::var("S54_NO_BOMB").is_ok() {
        &[false]
    } else {
        &[true]
    };
    // Three rounds of each: which caller ends the load is up to the scheduler.
    let limits = [false, true, false, true, false, true];
    for (&limited, &bomb) in limits.iter().zip(bombs.iter().cycle()) {
        let what = format!("shared load cancelled, limit {limited}, drop panics {bomb}");
        let mut b = Cache::builder().max_capacity(100);
        if limited {
            b = b.max_concurrent_loads(1);
        }
        let cache: Cache<PKey, u64> = b.build();
        let armed = Arc::new(AtomicBool::new(bomb));
        let dropped = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let c = cache.clone();
            let (a, d, r) = (armed.clone(), dropped.clone(), release.clone());
            tasks.push(rt.spawn(async move {
                let f = c.get_with_async_shared(
                    PKey(7),
                    BombFuture {
                        armed: a,
                        dropped: d,
                        release: r,
                        value: 1,
                    },
                );
                tokio::time::timeout(Duration::from_millis(150), f).await
            }));
        }
        std::thread::sleep(Duration::from_millis(30));
        let c = cache.clone();
        let blocking = start(move || c.get_with(PKey(7), || 2));
        for t in tasks {
            // The task that drops the load last may carry the injected panic.
            let r = rt.block_on(async { tokio::time::timeout(DEADLINE, t).await });
            assert!(r.is_ok(), "{what}: an async caller hangs");
        }
        let r = blocking.wait(DEADLINE);
        assert!(r.is_some(), "{what}: the blocking caller hangs");
        assert!(
            dropped.load(SeqCst),
            "{what}: the init future was not dropped (the case tests nothing)"
        );
        after(&cache, &what);
    }
}

/// A future whose `Drop` asks the cache for its own key (blocking) when it was not finished.
struct ReentrantDrop {
    cache: Cache<PKey, u64>,
    asked: Arc<AtomicU64>,
}

impl std::future::Future for ReentrantDrop {
    type Output = u64;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<u64> {
        std::task::Poll::Pending // never finishes: the only way out is to be dropped
    }
}

impl Drop for ReentrantDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // 0: not asked; 1: asked and answered; 2: asked, and the call panicked.
        let r = catch_unwind(AssertUnwindSafe(|| self.cache.get_with(PKey(7), || 8)));
        self.asked.store(if r.is_ok() { 1 } else { 2 }, SeqCst);
    }
}

/// The `init` of a shared load, cancelled (its only caller times out), asks the cache for its
/// own key in its `Drop`: it must neither deadlock (waiting for the load it is the end of) nor
/// strand the key.
#[test]
fn init_future_drop_that_loads_its_own_key() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(60), "attack_s54 reentrant drop");
    quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let cache: Cache<PKey, u64> = Cache::builder().max_capacity(100).build();
    let asked = Arc::new(AtomicU64::new(0));
    let (c, a) = (cache.clone(), asked.clone());
    let task = rt.spawn(async move {
        let init = ReentrantDrop {
            cache: c.clone(),
            asked: a,
        };
        tokio::time::timeout(
            Duration::from_millis(50),
            c.get_with_async_shared(PKey(7), init),
        )
        .await
    });
    let r = rt.block_on(async { tokio::time::timeout(DEADLINE, task).await });
    assert!(r.is_ok(), "the cancelled load's Drop deadlocked");
    // Documented (`get_with_async_shared`): the cancelled load is still the key's while its
    // `init` is dropped, so asking for the key there is a load asking for its own key.
    assert_eq!(
        asked.load(SeqCst),
        2,
        "the Drop's get_with of its own key should panic (0: not dropped, 1: answered)"
    );
    after(
        &cache,
        "a cancelled init that loads its own key in its Drop",
    );
}
