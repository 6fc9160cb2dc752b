#![cfg(not(any(loom, shuttle)))]
//! Round 76 of the outside attacks (a helper, public API only), on round 75's fix:
//! negative-cache entries (`negative_ttl`, a panicking loader's backoff, fail-safe's backoff)
//! against computations, writes, invalidations, callers that bypass them, waiters, and panics
//! of user code.
//!
//! Found (fixed in the same change): the fix put a negative entry back only after a
//! computation; a load that bypasses negative entries (`get_with`, `or_insert_with`,
//! `get_all`) and ends with nothing — cancelled, or its `init` panicking — still ended the
//! entry it replaced, so the backend was called again within `negative_ttl` (or a panicking
//! loader within its backoff): `cancelled_get_with_async_keeps_*` and
//! `panicking_*_does_not_let_backend_be_called_within_ttl`. Now every lead (but a shared
//! load's) puts back the live entry its flight replaced when it ends with nothing, in the
//! critical section that ends it. What held: writes and invalidations during a computation
//! that changes nothing (inside it, from another thread, racing it for 300 rounds), queued
//! computations, waiters, remembered `None`, fail-safe, colliding hashes, panics of the key's,
//! value's and error's user code, a 4-thread random mix.

mod common;

use common::{eventually, start, watchdog};
use herdcache::{BoxError, Cache, CompResult, LoadError, ManualClock, Op};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

use common::{ledger, neg_cache};

fn quiet<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    catch_unwind(AssertUnwindSafe(f))
}

// ---------------------------------------------------------------------------------------------
// Invalidations while a Nop computation runs must end the negative entry.

#[test]
fn invalidate_all_inside_nop_compute_ends_negative() {
    let _w = watchdog(T, "inv all in nop");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    let r = cache.entry(1).and_compute_with(|_| {
        cache.invalidate_all();
        Op::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "invalidate_all did not end the negative entry"
    );
    ledger(&cache);
}

#[test]
fn invalidate_all_from_other_thread_during_nop_compute_ends_negative() {
    let _w = watchdog(T, "inv all other thread");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel::<()>();
    let c = cache.clone();
    let h = start(move || {
        c.entry(1).and_compute_with(|_| {
            etx.send(()).unwrap();
            rrx.recv_timeout(T).unwrap();
            Op::Nop
        })
    });
    erx.recv_timeout(T).unwrap();
    cache.invalidate_all();
    rtx.send(()).unwrap();
    let r = h.wait(T).expect("hung").unwrap();
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "invalidate_all did not end the negative entry"
    );
    ledger(&cache);
}

#[test]
fn insert_then_invalidate_inside_nop_compute_ends_negative() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    let r = cache.entry(1).and_compute_with(|_| {
        cache.insert(1, 5);
        Op::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    assert_eq!(cache.get(&1), Some(5));
    assert_eq!(cache.load(1).unwrap(), 5);
    cache.invalidate(&1);
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the insert ended the negative entry"
    );
    ledger(&cache);
}

#[test]
fn remove_inside_try_compute_err_ends_negative() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    let r: Result<CompResult<u32, u32>, &str> = cache.entry(1).and_try_compute_with(|_| {
        cache.remove(&1);
        Err("nope")
    });
    assert!(r.is_err());
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "remove did not end the negative entry"
    );
    ledger(&cache);
}

/// An eviction listener that panics inside invalidate_all run by the computation: the
/// invalidation still completed, so the negative entry must be ended.
#[test]
fn invalidate_all_with_panicking_listener_inside_nop_compute_ends_negative() {
    let _w = watchdog(T, "listener panic");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cc = calls.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(|k: &u32, _v: &u32, _c| {
            if *k == 2 {
                panic!("listener boom")
            }
        })
        .loader(move |_k: &u32| {
            cc.fetch_add(1, Ordering::SeqCst);
            Err::<u32, _>(BoxError::from("down"))
        })
        .build();
    let _ = cache.load(1).unwrap_err();
    cache.insert(2, 2);
    let r = cache.entry(1).and_compute_with(|_| {
        assert!(
            quiet(|| cache.invalidate_all()).is_err(),
            "listener panic not resumed"
        );
        Op::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    assert!(!cache.contains_key(&2));
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "invalidate_all did not end the negative entry"
    );
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Two computations: the second, queued behind the first.

#[test]
fn second_compute_after_first_remove_sees_no_negative() {
    let _w = watchdog(T, "two computes");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel::<()>();
    let c = cache.clone();
    let a = start(move || {
        c.entry(1).and_compute_with(|_| {
            etx.send(()).unwrap();
            rrx.recv_timeout(T).unwrap();
            Op::Remove
        })
    });
    erx.recv_timeout(T).unwrap();
    let c = cache.clone();
    let b = start(move || c.entry(1).and_compute_with(|_| Op::<u32>::Nop));
    // b waits for a (a holds the key): let it queue; either order gives the same answer.
    std::thread::sleep(Duration::from_millis(30));
    rtx.send(()).unwrap();
    a.wait(T).expect("a hung").unwrap();
    b.wait(T).expect("b hung").unwrap();
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the first compute's Remove ended it"
    );
    ledger(&cache);
}

#[test]
fn two_nop_computes_keep_negative() {
    let _w = watchdog(T, "two nops");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let e1 = match cache.load(1) {
        Err(LoadError::Loader(e)) => e,
        other => panic!("{other:?}"),
    };
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel::<()>();
    let c = cache.clone();
    let a = start(move || {
        c.entry(1).and_compute_with(|_| {
            etx.send(()).unwrap();
            rrx.recv_timeout(T).unwrap();
            Op::<u32>::Nop
        })
    });
    erx.recv_timeout(T).unwrap();
    let c = cache.clone();
    let b = start(move || {
        let r: Result<CompResult<u32, u32>, &str> = c.entry(1).and_try_compute_with(|_| Err("no"));
        r.is_err()
    });
    std::thread::sleep(Duration::from_millis(30));
    rtx.send(()).unwrap();
    a.wait(T).expect("a hung").unwrap();
    assert!(b.wait(T).expect("b hung").unwrap());
    match cache.load(1) {
        Err(LoadError::Loader(e)) => assert!(Arc::ptr_eq(&e, &e1), "a different error"),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Waiters on a computation that ends with Nop: they get the remembered error (same Arc), the
// backend is not called, the ledger balances.

#[test]
fn waiters_on_nop_compute_get_remembered_error_and_ledger_balances() {
    let _w = watchdog(T, "waiters nop");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let e1 = match cache.load(1) {
        Err(LoadError::Loader(e)) => e,
        other => panic!("{other:?}"),
    };
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel::<()>();
    let c = cache.clone();
    let comp = start(move || {
        c.entry(1).and_compute_with(|_| {
            etx.send(()).unwrap();
            rrx.recv_timeout(T).unwrap();
            Op::<u32>::Nop
        })
    });
    erx.recv_timeout(T).unwrap();
    let before = cache.stats();
    let mut ws = Vec::new();
    for _ in 0..3 {
        let c = cache.clone();
        ws.push(start(move || c.load(1)));
    }
    let inits = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let c = cache.clone();
        let i = inits.clone();
        ws.push(start(move || {
            c.try_get_with(1, || {
                i.fetch_add(1, Ordering::SeqCst);
                Err::<u32, BoxError>(BoxError::from("init"))
            })
            .map_err(LoadError::Loader)
        }));
    }
    // Let the waiters join (sync only; the answer is the same either way).
    let _ = eventually(|| cache.stats().misses >= before.misses + 5);
    rtx.send(()).unwrap();
    comp.wait(T).expect("compute hung").unwrap();
    for w in ws {
        match w.wait(T).expect("waiter hung").unwrap() {
            Err(LoadError::Loader(e)) => assert!(Arc::ptr_eq(&e, &e1), "not the remembered error"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "backend called again");
    assert_eq!(inits.load(Ordering::SeqCst), 0, "init ran");
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Bypassing callers (get_with & co.) that change nothing: a cancelled get_with_async, a
// panicking get_with / or_insert_with init. They are neither writes nor invalidations.

#[test]
fn cancelled_get_with_async_keeps_negative() {
    let _w = watchdog(T, "cancel get_with_async");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    {
        use std::future::Future;
        let fut = cache.get_with_async(1, std::future::pending::<u32>());
        let mut fut = Box::pin(fut);
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(fut);
    }
    let r = cache.load(1);
    assert!(matches!(r, Err(LoadError::Loader(_))), "{r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a cancelled get_with_async (no write, no invalidation) ended the negative entry"
    );
    ledger(&cache);
}

#[test]
fn panicking_get_with_init_does_not_let_backend_be_called_within_ttl() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    assert!(quiet(|| cache.get_with(1, || panic!("init boom"))).is_err());
    let r = cache.load(1);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a panicking get_with (no write, no invalidation) ended the negative entry: {r:?}"
    );
    ledger(&cache);
}

#[test]
fn panicking_or_insert_with_init_does_not_let_backend_be_called_within_ttl() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    assert!(quiet(|| cache.entry(1).or_insert_with(|| panic!("init boom"))).is_err());
    let r = cache.load(1);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a panicking or_insert_with ended the negative entry: {r:?}"
    );
    ledger(&cache);
}

#[test]
fn get_with_success_ends_negative_and_value_answers() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    assert_eq!(cache.get_with(1, || 7), 7);
    assert_eq!(cache.load(1).unwrap(), 7);
    cache.invalidate(&1);
    let _ = cache.load(1).unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Panic backoff on a cache with a TTL.

fn panic_cache(clock: &ManualClock, calls: Arc<AtomicUsize>) -> Cache<u32, u32> {
    Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .refresh_backoff(Duration::from_secs(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| -> Result<u32, BoxError> {
            calls.fetch_add(1, Ordering::SeqCst);
            panic!("loader boom")
        })
        .build()
}

#[test]
fn panic_backoff_survives_try_compute_err_and_closure_panic() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = panic_cache(&clock, calls.clone());
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    let r: Result<CompResult<u32, u32>, ()> = cache.entry(1).and_try_compute_with(|_| Err(()));
    assert!(r.is_err());
    assert!(quiet(|| cache
        .entry(1)
        .and_compute_with(|_| -> Op<u32> { panic!("f boom") }))
    .is_err());
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "backoff ended by a no-op computation"
    );
    ledger(&cache);
}

#[test]
fn panic_backoff_ended_by_compute_remove_and_invalidate_all() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = panic_cache(&clock, calls.clone());
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    let r = cache.entry(1).and_compute_with(|_| Op::<u32>::Remove);
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "Remove did not end the backoff"
    );
    let r = cache.entry(1).and_compute_with(|_| {
        cache.invalidate_all();
        Op::<u32>::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "invalidate_all did not end the backoff"
    );
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Fail-safe.

fn fs_cache(
    clock: &ManualClock,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
) -> Cache<u32, u32> {
    Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            if down.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(*k * 10)
            }
        })
        .build()
}

fn fs_setup() -> (
    ManualClock,
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Cache<u32, u32>,
) {
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = fs_cache(&clock, down.clone(), calls.clone());
    assert_eq!(cache.load(1).unwrap(), 10);
    down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(61));
    assert_eq!(cache.load(1).unwrap(), 10, "stale answers");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    (clock, down, calls, cache)
}

#[test]
fn fail_safe_backoff_survives_panicking_and_cancelled_computes() {
    let _w = watchdog(T, "fs nop");
    let (_clock, _down, calls, cache) = fs_setup();
    assert!(quiet(|| cache
        .entry(1)
        .and_compute_with(|_| -> Op<u32> { panic!("f") }))
    .is_err());
    {
        use std::future::Future;
        let fut = cache
            .entry(1)
            .and_compute_with_async(|_| std::future::pending::<Op<u32>>());
        let mut fut = Box::pin(fut);
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(fut);
    }
    assert_eq!(cache.load(1).unwrap(), 10, "stale value lost");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "backend called within the backoff"
    );
    ledger(&cache);
}

#[test]
fn fail_safe_compute_remove_ends_stale_value_for_good() {
    let (_clock, _down, calls, cache) = fs_setup();
    let r = cache.entry(1).and_compute_with(|e| {
        assert!(e.is_none(), "compute saw an expired value");
        Op::<u32>::Remove
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let r = cache.load(1);
    assert!(r.is_err(), "a Remove removes the old value for good: {r:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    ledger(&cache);
}

#[test]
fn fail_safe_retain_inside_nop_compute_removes_stale_for_good() {
    let (_clock, _down, calls, cache) = fs_setup();
    let r = cache.entry(1).and_compute_with(|_| {
        cache.retain(|_, _| false);
        Op::<u32>::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let r = cache.load(1);
    assert!(
        r.is_err(),
        "retain removed the old value, yet it answered: {r:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    ledger(&cache);
}

#[test]
fn fail_safe_invalidate_entries_if_inside_nop_compute_removes_stale_for_good() {
    let (_clock, _down, calls, cache) = fs_setup();
    let r = cache.entry(1).and_compute_with(|_| {
        cache.invalidate_entries_if(|_, _| true);
        Op::<u32>::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let r = cache.load(1);
    assert!(
        r.is_err(),
        "invalidate_entries_if removed the old value, yet it answered: {r:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    ledger(&cache);
}

#[test]
fn fail_safe_retain_without_compute_removes_stale_for_good() {
    let (_clock, _down, calls, cache) = fs_setup();
    cache.retain(|_, _| false);
    let r = cache.load(1);
    assert!(
        r.is_err(),
        "retain removed the old value, yet it answered: {r:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    ledger(&cache);
}

#[test]
fn fail_safe_invalidate_all_inside_nop_compute_removes_stale_for_good() {
    let (_clock, _down, calls, cache) = fs_setup();
    let r = cache.entry(1).and_compute_with(|_| {
        cache.invalidate_all();
        Op::<u32>::Nop
    });
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let r = cache.load(1);
    assert!(
        r.is_err(),
        "invalidate_all removed the old value, yet it answered: {r:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Panics of user code: the error's Drop, the key's Clone/Eq/Drop.

static ERR_DROP_PANIC: AtomicBool = AtomicBool::new(false);
static ERR_LIVE: AtomicUsize = AtomicUsize::new(0);
static ERR_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Debug)]
struct BadErr;
impl BadErr {
    fn new() -> Self {
        ERR_LIVE.fetch_add(1, Ordering::SeqCst);
        BadErr
    }
}
impl Drop for BadErr {
    fn drop(&mut self) {
        ERR_LIVE.fetch_sub(1, Ordering::SeqCst);
        if ERR_DROP_PANIC.swap(false, Ordering::SeqCst) {
            panic!("error drop boom");
        }
    }
}

fn bad_err_cache(clock: &ManualClock) -> Cache<u32, u32> {
    Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .build()
}

fn fail(cache: &Cache<u32, u32>, inits: &AtomicUsize) -> Result<u32, Arc<BadErr>> {
    cache.try_get_with(1, || {
        inits.fetch_add(1, Ordering::SeqCst);
        Err(BadErr::new())
    })
}

#[test]
fn error_drop_panic_on_compute_remove_and_put() {
    let _w = watchdog(T, "err drop");
    let _g = ERR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for op in 0..4 {
        let clock = ManualClock::new();
        let cache = bad_err_cache(&clock);
        let inits = AtomicUsize::new(0);
        drop(fail(&cache, &inits).unwrap_err());
        assert_eq!(ERR_LIVE.load(Ordering::SeqCst), 1);
        ERR_DROP_PANIC.store(true, Ordering::SeqCst);
        // A waiter on the computation (joins before it ends, or comes after): must not hang.
        let (etx, erx) = mpsc::channel();
        let (rtx, rrx) = mpsc::channel::<()>();
        let c = cache.clone();
        let comp = start(move || {
            c.entry(1).and_compute_with(|_| {
                etx.send(()).unwrap();
                rrx.recv_timeout(T).unwrap();
                match op {
                    0 => Op::Remove,
                    1 => Op::Put(3),
                    2 => {
                        clock.advance(Duration::from_secs(11));
                        Op::Nop
                    }
                    _ => {
                        clock.advance(Duration::from_secs(11));
                        panic!("f boom")
                    }
                }
            })
        });
        erx.recv_timeout(T).unwrap();
        let c = cache.clone();
        let waiter = start(move || c.get_with(1, || 9));
        std::thread::sleep(Duration::from_millis(20));
        rtx.send(()).unwrap();
        let r = comp.wait(T).expect("compute hung");
        let _ = r; // a panic of the error's Drop may reach the computation's caller
        let v = waiter
            .wait(T)
            .expect("waiter hung")
            .expect("waiter panicked");
        assert!(v == 3 || v == 9, "op {op}: {v}");
        ERR_DROP_PANIC.store(false, Ordering::SeqCst);
        assert_eq!(ERR_LIVE.load(Ordering::SeqCst), 0, "op {op}: error leaked");
        assert_eq!(cache.loads_in_flight(), 0, "op {op}");
        cache.validate();
        let s = cache.stats();
        assert_eq!(s.loads_in_flight, 0, "op {op}: {s:?}");
    }
}

#[derive(Clone, Debug)]
struct Flags {
    clone: Arc<AtomicBool>,
    eq: Arc<AtomicBool>,
    drop: Arc<AtomicBool>,
}

#[derive(Debug)]
struct PKey(u32, Flags);
impl Clone for PKey {
    fn clone(&self) -> Self {
        if self.1.clone.swap(false, Ordering::SeqCst) {
            panic!("key clone boom");
        }
        PKey(self.0, self.1.clone())
    }
}
impl PartialEq for PKey {
    fn eq(&self, o: &Self) -> bool {
        if self.1.eq.swap(false, Ordering::SeqCst) {
            panic!("key eq boom");
        }
        self.0 == o.0
    }
}
impl Eq for PKey {}
impl Hash for PKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}
impl Drop for PKey {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.1.drop.swap(false, Ordering::SeqCst) {
            panic!("key drop boom");
        }
    }
}

#[test]
fn key_panics_around_nop_compute_keep_cache_consistent_and_negative() {
    let _w = watchdog(T, "key panics");
    for which in 0..3 {
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let cc = calls.clone();
        let cache: Cache<PKey, u32> = Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(10))
            .clock(clock.clone())
            .record_stats()
            .build();
        let flags = Flags {
            clone: Arc::default(),
            eq: Arc::default(),
            drop: Arc::default(),
        };
        let k = || PKey(1, flags.clone());
        let load = |cache: &Cache<PKey, u32>| {
            let cc = cc.clone();
            cache.try_get_with(k(), move || {
                cc.fetch_add(1, Ordering::SeqCst);
                Err::<u32, String>("down".into())
            })
        };
        assert!(load(&cache).is_err());
        let key = k();
        match which {
            0 => flags.clone.store(true, Ordering::SeqCst),
            1 => flags.eq.store(true, Ordering::SeqCst),
            _ => flags.drop.store(true, Ordering::SeqCst),
        }
        let r = quiet(|| cache.entry(key).and_compute_with(|_| Op::<u32>::Nop));
        flags.clone.store(false, Ordering::SeqCst);
        flags.eq.store(false, Ordering::SeqCst);
        flags.drop.store(false, Ordering::SeqCst);
        if let Ok(r) = r {
            assert!(matches!(r, CompResult::StillNone(_)), "{which}: {r:?}");
        }
        assert_eq!(cache.loads_in_flight(), 0, "which {which}");
        cache.validate();
        let r = load(&cache);
        assert!(r.is_err(), "{which}: {r:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "which {which}: a no-op computation (that panicked in user key code) ended the \
             negative entry"
        );
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "which {which}: {s:?}"
        );
        assert_eq!(s.loads_in_flight, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// A computation queued behind a failing load: it claims after the failure (displacing the
// fresh negative entry) and changes nothing.

#[test]
fn compute_queued_behind_failing_load_keeps_its_negative() {
    let _w = watchdog(T, "queued behind load");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel::<()>();
    let rrx = std::sync::Mutex::new(rrx);
    let cc = calls.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| {
            if cc.fetch_add(1, Ordering::SeqCst) == 0 {
                etx.send(()).unwrap();
                rrx.lock().unwrap().recv_timeout(T).unwrap();
            }
            Err::<u32, _>(BoxError::from("down"))
        })
        .build();
    let c = cache.clone();
    let loader = start(move || c.load(1));
    erx.recv_timeout(T).unwrap();
    let c = cache.clone();
    let comp = start(move || c.entry(1).and_compute_with(|_| Op::<u32>::Nop));
    std::thread::sleep(Duration::from_millis(20));
    rtx.send(()).unwrap();
    assert!(loader.wait(T).expect("hung").unwrap().is_err());
    comp.wait(T).expect("compute hung").unwrap();
    assert!(cache.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "compute ended the negative entry"
    );
    ledger(&cache);
}

// optionally_get_with's remembered None survives a Nop compute; the by-ref form too.
#[test]
fn optionally_none_survives_nop_compute_async() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .build();
    let inits = AtomicUsize::new(0);
    let f = || {
        cache.optionally_get_with(1, || {
            inits.fetch_add(1, Ordering::SeqCst);
            None
        })
    };
    assert_eq!(f(), None);
    let r = futures::executor::block_on(
        cache
            .entry(1)
            .and_compute_with_async(|_| async { Op::<u32>::Nop }),
    );
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let r: Result<CompResult<u32, u32>, ()> = futures::executor::block_on(
        cache
            .entry(1)
            .and_try_compute_with_async(|_| async { Err::<Op<u32>, ()>(()) }),
    );
    assert!(r.is_err());
    assert_eq!(f(), None);
    assert_eq!(
        cache.optionally_get_with_by_ref(&1, || {
            inits.fetch_add(1, Ordering::SeqCst);
            None
        }),
        None
    );
    assert_eq!(
        inits.load(Ordering::SeqCst),
        1,
        "the remembered None was ended"
    );
    ledger(&cache);
}

// ---------------------------------------------------------------------------------------------
// Every key with the same hash: the displaced entry must be the key's own.

#[derive(Clone, Default)]
struct ConstHash;
struct ConstHasher;
impl Hasher for ConstHasher {
    fn finish(&self) -> u64 {
        42
    }
    fn write(&mut self, _: &[u8]) {}
}
impl std::hash::BuildHasher for ConstHash {
    type Hasher = ConstHasher;
    fn build_hasher(&self) -> ConstHasher {
        ConstHasher
    }
}

#[test]
fn colliding_keys_negative_entries_are_kept_apart() {
    let _w = watchdog(T, "collide");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cc = calls.clone();
    let cache: Cache<u32, u32, ConstHash> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u32| {
            cc.fetch_add(100usize.pow(*k), Ordering::SeqCst);
            Err::<u32, _>(BoxError::from("down"))
        })
        .build_with_hasher(ConstHash);
    // key 3's entry expires first; keys 1 and 2 stay live.
    let _ = cache.load(3).unwrap_err();
    clock.advance(Duration::from_secs(5));
    let _ = cache.load(1).unwrap_err();
    let _ = cache.load(2).unwrap_err();
    clock.advance(Duration::from_secs(6)); // key 3 expired, 1 and 2 live (4 s left)
    assert_eq!(calls.load(Ordering::SeqCst), 100 + 10_000 + 1_000_000);
    let r = cache.entry(1).and_compute_with(|_| Op::<u32>::Nop);
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    let r = cache.entry(2).and_compute_with(|_| Op::<u32>::Remove);
    assert!(matches!(r, CompResult::StillNone(2)), "{r:?}");
    let r: Result<CompResult<u32, u32>, ()> = cache.entry(3).and_try_compute_with(|_| Err(()));
    assert!(r.is_err());
    cache.validate();
    let _ = cache.load(1).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1_010_100,
        "key 1's entry ended"
    );
    let _ = cache.load(2).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1_020_100,
        "key 2's entry not ended by Remove"
    );
    let _ = cache.load(3).unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2_020_100,
        "key 3's expired entry answered"
    );
    // and a Nop on key 1 now puts nothing of key 2 or 3 in key 1's place
    let r = cache.entry(1).and_compute_with(|_| Op::<u32>::Nop);
    assert!(matches!(r, CompResult::StillNone(1)), "{r:?}");
    for k in 1..=3 {
        let _ = cache.load(k).unwrap_err();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2_020_100,
        "a live entry was lost"
    );
    let s = cache.stats();
    assert_eq!(
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "{s:?}"
    );
    assert_eq!(s.loads_in_flight, 0);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// A cancelled get_with_async on a cache with a TTL whose loader panicked: the backoff is
/// neither written nor invalidated.
#[test]
fn cancelled_get_with_async_keeps_panic_backoff() {
    let _w = watchdog(T, "cancel get_with_async panic");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = panic_cache(&clock, calls.clone());
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    {
        use std::future::Future;
        let fut = cache.get_with_async(1, std::future::pending::<u32>());
        let mut fut = Box::pin(fut);
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(fut);
    }
    assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a cancelled get_with_async ended the panic backoff"
    );
    ledger(&cache);
}

/// A panicking `get_all` loader (a bypassing caller) for a key with a live negative entry.
#[test]
fn panicking_get_all_does_not_let_backend_be_called_within_ttl() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    let _ = cache.load(1).unwrap_err();
    let r = quiet(|| {
        cache.get_all(
            [1u32],
            |_keys: &[u32]| -> std::collections::HashMap<u32, u32> { panic!("load_missing boom") },
        )
    });
    assert!(r.is_err());
    let r = cache.load(1);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a panicking get_all ended the negative entry: {r:?}"
    );
    ledger(&cache);
}

/// Many threads mixing loads, computations of every verdict (and panics), writes,
/// invalidations and time: afterwards no hang, the ledger balances, nothing in flight, the
/// invariants hold, and a remembered error is still answered without the backend.
#[test]
fn concurrent_mix_keeps_ledger_and_invariants() {
    let _w = watchdog(Duration::from_secs(120), "mix");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let cache = cache.clone();
            let clock = clock.clone();
            s.spawn(move || {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for _ in 0..1500 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = (x % 3) as u32;
                    match (x >> 8) % 12 {
                        0 | 1 => {
                            let _ = cache.load(k);
                        }
                        2 => {
                            let _ = cache.try_get_with(k, || Err::<u32, BoxError>("e".into()));
                        }
                        3 => {
                            let _ = cache.entry(k).and_compute_with(|_| Op::<u32>::Nop);
                        }
                        4 => {
                            let _: Result<_, ()> = cache.entry(k).and_try_compute_with(|_| Err(()));
                        }
                        5 => {
                            let _ = quiet(|| {
                                cache
                                    .entry(k)
                                    .and_compute_with(|_| -> Op<u32> { panic!("f boom") })
                            });
                        }
                        6 => {
                            let _ = cache.entry(k).and_compute_with(|_| Op::<u32>::Remove);
                        }
                        7 => {
                            let _ = cache.entry(k).and_compute_with(|_| Op::Put(1));
                        }
                        8 => cache.invalidate(&k),
                        9 => {
                            if x % 7 == 0 {
                                cache.invalidate_all()
                            } else {
                                cache.insert(k, 2)
                            }
                        }
                        10 => clock.advance(Duration::from_secs(1)),
                        _ => {
                            let _ = quiet(|| cache.get_with(k, || -> u32 { panic!("init boom") }));
                        }
                    }
                }
            });
        }
    });
    ledger(&cache);
    // A fresh failure is remembered, and survives a Nop.
    cache.invalidate_all();
    let before = calls.load(Ordering::SeqCst);
    let _ = cache.load(1).unwrap_err();
    let _ = cache.entry(1).and_compute_with(|_| Op::<u32>::Nop);
    let _ = cache.load(1).unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    ledger(&cache);
}

/// Fail-safe: a retry (past the backoff) by a get_with_async that is cancelled: its waiter
/// "claims the key again and finds the backoff started" (CacheStats::stale_served_after_ttl):
/// it gets the old value, no load; and the old value is not lost.
#[test]
fn fail_safe_cancelled_retry_waiter_gets_old_value() {
    let _w = watchdog(T, "fs cancelled retry");
    let (clock, _down, calls, cache) = fs_setup();
    clock.advance(Duration::from_secs(6)); // past the backoff: the next caller retries
    use std::future::Future;
    let (etx, erx) = mpsc::channel::<()>();
    let fut = cache.get_with_async(1, async move {
        etx.send(()).unwrap();
        std::future::pending::<u32>().await
    });
    let mut fut = Box::pin(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    erx.recv_timeout(T).expect("init never ran: no retry?");
    let c = cache.clone();
    let waiter = start(move || c.load(1));
    let before = cache.stats().misses;
    let _ = eventually(|| cache.stats().misses > before);
    drop(fut);
    let r = waiter.wait(T).expect("waiter hung").unwrap();
    assert_eq!(r.ok(), Some(10), "the waiter did not get the old value");
    assert_eq!(cache.load(1).ok(), Some(10), "old value lost");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "backend called after the abandoned retry"
    );
    ledger(&cache);
}

/// A Nop computation racing an insert of the key: whatever the order, the insert ended the
/// negative entry (and its value stands): after an invalidation, the next load calls the
/// backend.
#[test]
fn nop_compute_racing_insert_never_resurrects_negative() {
    let _w = watchdog(Duration::from_secs(120), "race insert");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    for round in 0..300usize {
        let before = calls.load(Ordering::SeqCst);
        let _ = cache.load(1).unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), before + 1, "round {round}");
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let w = round % 3;
        let h = start(move || {
            go_rx.recv().unwrap();
            match w {
                0 => cache_insert(&c),
                1 => c.invalidate(&1),
                _ => c.invalidate_all(),
            }
        });
        go_tx.send(()).unwrap();
        let _ = cache.entry(1).and_compute_with(|_| Op::<u32>::Nop);
        h.wait(T).expect("writer hung").unwrap();
        if w == 0 {
            assert_eq!(
                cache.get(&1),
                Some(5),
                "round {round}: the insert's value lost"
            );
            cache.invalidate(&1);
        }
        let _ = cache.load(1).unwrap_err();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before + 2,
            "round {round} (writer {w}): the negative entry came back after a write"
        );
        cache.invalidate(&1);
    }
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

fn cache_insert(c: &Cache<u32, u32>) {
    c.insert(1, 5)
}
