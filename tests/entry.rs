//! The entry API and bulk loading: atomic per-key computations under concurrent writers,
//! freshness, cancellation, and `get_all` calling its loader once for just the missing keys.

#![cfg(not(loom))]

mod common;

use common::{watchdog, Yield};
use herdcache::{Cache, CompResult, Op};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn concurrent_computations_do_not_lose_updates() {
    let _dog = watchdog(LIMIT, "concurrent_computations_do_not_lose_updates");
    let cache: Cache<u32, u64> = Cache::new(100);
    std::thread::scope(|s| {
        for t in 0..8 {
            let cache = &cache;
            s.spawn(move || {
                for i in 0..1000 {
                    if (t + i) % 2 == 0 {
                        cache
                            .entry(7)
                            .and_compute_with(|e| Op::Put(e.map_or(0, |e| *e.value()) + 1));
                    } else {
                        cache
                            .entry(7)
                            .and_upsert_with(|e| e.map_or(0, |e| *e.value()) + 1);
                    }
                    // Readers and loaders of the key never see a torn state.
                    let _ = cache.get(&7);
                }
            });
        }
    });
    assert_eq!(cache.get(&7), Some(8000));
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn computations_report_what_they_did() {
    let cache: Cache<u32, u32> = Cache::new(100);
    let r = cache.entry(1).and_compute_with(|e| {
        assert!(e.is_none());
        Op::Nop
    });
    assert_eq!(r, CompResult::StillNone(1));
    match cache.entry(1).and_compute_with(|_| Op::Put(5)) {
        CompResult::Inserted(e) => assert_eq!((*e.key(), *e.value(), e.is_fresh()), (1, 5, true)),
        other => panic!("{other:?}"),
    }
    match cache
        .entry(1)
        .and_compute_with(|e| Op::Put(e.unwrap().value() * 2))
    {
        CompResult::ReplacedWith(e) => assert_eq!(e.into_value(), 10),
        other => panic!("{other:?}"),
    }
    match cache.entry(1).and_compute_with(|_| Op::Nop) {
        CompResult::Unchanged(e) => assert_eq!(*e.value(), 10),
        other => panic!("{other:?}"),
    }
    match cache.entry(1).and_compute_with(|_| Op::Remove) {
        CompResult::Removed(e) => assert_eq!(*e.value(), 10),
        other => panic!("{other:?}"),
    }
    assert_eq!(cache.get(&1), None);
    assert_eq!(
        cache.entry(1).and_compute_with(|_| Op::Remove),
        CompResult::StillNone(1)
    );
}

#[test]
fn or_insert_with_is_single_flight_and_tells_who_loaded() {
    let _dog = watchdog(LIMIT, "or_insert_with");
    let cache: Cache<u32, u32> = Cache::new(100);
    let barrier = Barrier::new(8);
    let fresh = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                barrier.wait();
                let e = cache.entry(3).or_insert_with(|| {
                    std::thread::sleep(Duration::from_millis(20));
                    33
                });
                assert_eq!(*e.value(), 33);
                fresh.fetch_add(usize::from(e.is_fresh()), Ordering::SeqCst);
            });
        }
    });
    assert_eq!(fresh.load(Ordering::SeqCst), 1);
    let e = futures::executor::block_on(cache.entry(4).or_insert_with_async(async { 44 }));
    assert!(e.is_fresh());
    let e = futures::executor::block_on(cache.entry(4).or_insert_with_async(async { 0 }));
    assert!(!e.is_fresh());
}

#[test]
fn a_load_during_a_computation_takes_its_value() {
    let _dog = watchdog(LIMIT, "a_load_during_a_computation");
    let cache: Cache<u32, u32> = Cache::new(100);
    let started = Barrier::new(2);
    let release = AtomicBool::new(false);
    std::thread::scope(|s| {
        let computing = s.spawn(|| {
            cache.entry(1).and_compute_with(|_| {
                started.wait();
                while !release.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                Op::Put(11)
            })
        });
        started.wait();
        let loader = s.spawn(|| cache.get_with(1, || unreachable!("joins the computation")));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            cache.get(&1),
            None,
            "not visible before the computation ends"
        );
        release.store(true, Ordering::SeqCst);
        assert!(matches!(computing.join().unwrap(), CompResult::Inserted(_)));
        assert_eq!(loader.join().unwrap(), 11);
    });
}

#[test]
fn a_panicking_computation_releases_the_key() {
    let cache: Cache<u32, u32> = Cache::new(100);
    cache.insert(1, 1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache
            .entry(1)
            .and_compute_with(|_| -> Op<u32> { panic!("boom") })
    }));
    assert!(r.is_err());
    assert_eq!(cache.get(&1), Some(1), "unchanged");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.entry(1).and_upsert_with(|e| e.unwrap().value() + 1);
    assert_eq!(cache.get(&1), Some(2));
    // Recursion on the same key is caught, not deadlocked.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache
            .entry(1)
            .and_compute_with(|_| Op::Put(cache.entry(1).and_upsert_with(|_| 0).into_value()))
    }));
    assert!(r.is_err());
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn async_computations_and_their_cancellation() {
    let _dog = watchdog(LIMIT, "async computations");
    let cache: Cache<u32, u32> = Cache::new(100);
    let r = futures::executor::block_on(cache.entry(1).and_compute_with_async(|e| async move {
        Yield(1).await;
        Op::Put(e.map_or(1, |e| *e.value()))
    }));
    assert!(matches!(r, CompResult::Inserted(_)));
    // Cancelled in the middle of its computation: the key is released, nothing stored.
    let mut f = Box::pin(cache.entry(2).and_compute_with_async(|_| async {
        Yield(1).await;
        Op::Put(2)
    }));
    assert!(f
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending());
    assert_eq!(cache.loads_in_flight(), 1);
    drop(f);
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.get(&2), None);
    let e = futures::executor::block_on(
        cache
            .entry(2)
            .and_upsert_with_async(|e| async move { e.map_or(20, |e| e.into_value()) }),
    );
    assert_eq!(*e.value(), 20);
}

#[test]
fn get_all_loads_only_what_is_missing_once_and_joins_the_rest() {
    let _dog = watchdog(LIMIT, "get_all");
    let cache: Cache<u32, String> = Cache::new(100);
    cache.insert(1, "cached".into());
    let started = Barrier::new(2);
    let release = AtomicBool::new(false);
    let calls = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            cache.get_with(5, || {
                started.wait();
                while !release.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                "five".to_string()
            })
        });
        started.wait();
        let releaser = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(30));
            release.store(true, Ordering::SeqCst);
        });
        let all = cache.get_all([1, 4, 5, 6, 4, 9], |missing| {
            calls.lock().unwrap().push(missing.to_vec());
            // 9 is not found by the backend.
            missing
                .iter()
                .filter(|&&k| k != 9)
                .map(|&k| (k, format!("loaded {k}")))
                .collect::<HashMap<_, _>>()
        });
        releaser.join().unwrap();
        assert_eq!(slow.join().unwrap(), "five");
        assert_eq!(
            *calls.lock().unwrap(),
            vec![vec![4, 6, 9]],
            "one call, only the missing keys"
        );
        let mut got: Vec<_> = all.into_iter().collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (1, "cached".to_string()),
                (4, "loaded 4".to_string()),
                (5, "five".to_string()),
                (6, "loaded 6".to_string()),
            ]
        );
    });
    assert_eq!(cache.get(&6).as_deref(), Some("loaded 6"));
    assert_eq!(cache.get(&9), None);
    assert_eq!(cache.loads_in_flight(), 0);
    // Nothing missing: no call at all.
    let all = cache.get_all([1, 4], |_| -> HashMap<u32, String> { unreachable!() });
    assert_eq!(all.len(), 2);
    let _ = Arc::new(0);
}

/// `get_with_if` (sync and async) is a single-flight load that a present value answers only if
/// `replace_if` keeps it: callers that all want one stale value replaced run one `init`
/// between them and take its value, and a caller that waited never calls its `replace_if`
/// again.
#[test]
fn get_with_if_replacements_are_single_flight() {
    let _dog = watchdog(LIMIT, "get_with_if_replacements_are_single_flight");
    for asynchronous in [false, true] {
        let cache: Cache<u32, u64> = Cache::new(10);
        cache.insert(1, 0);
        let inits = AtomicUsize::new(0);
        let replace_calls = AtomicUsize::new(0);
        let barrier = Barrier::new(4);
        let got: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4u64)
                .map(|t| {
                    let (cache, inits, barrier) = (&cache, &inits, &barrier);
                    let replace_calls = &replace_calls;
                    s.spawn(move || {
                        let init = move || {
                            inits.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(200));
                            100 + t
                        };
                        let replace_if = |v: &u64| {
                            replace_calls.fetch_add(1, Ordering::SeqCst);
                            *v == 0
                        };
                        barrier.wait();
                        if asynchronous {
                            futures::executor::block_on(cache.get_with_if_async(
                                1,
                                async move { init() },
                                replace_if,
                            ))
                        } else {
                            cache.get_with_if(1, init, replace_if)
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n = inits.load(Ordering::SeqCst);
        // Four callers that saw the stale 0 at once: one init (a caller that only got there
        // after the replacement finished sees the new value, and keeps it).
        assert_eq!(n, 1, "async: {asynchronous}, values {got:?}");
        assert!(got.iter().all(|&v| v == got[0]), "{got:?}");
        assert_eq!(cache.get(&1), Some(got[0]));
        // Each caller judges what it found; the leader judges again once it has claimed
        // the key (a waiter never does): 4 + 1, or a few more when a caller came late.
        let calls = replace_calls.load(Ordering::SeqCst);
        assert!((5..=8).contains(&calls), "{calls} calls of replace_if");
        assert_eq!(cache.loads_in_flight(), 0);
    }
}

/// A caller that finds an absent key being loaded waits for the load and takes its value
/// without calling its `replace_if` (moka's contract: it found no value to judge).
#[test]
fn get_with_if_waiter_takes_the_loaded_value_unjudged() {
    let _dog = watchdog(LIMIT, "get_with_if_waiter_takes_the_loaded_value_unjudged");
    for asynchronous in [false, true] {
        let cache: Cache<u32, u32> = Cache::new(10);
        let started = Barrier::new(2);
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                cache.get_with(1, || {
                    started.wait();
                    std::thread::sleep(Duration::from_millis(200));
                    1
                })
            });
            started.wait();
            let e = if asynchronous {
                futures::executor::block_on(
                    cache
                        .entry(1)
                        .or_insert_with_if_async(async { unreachable!() }, |_| unreachable!()),
                )
            } else {
                cache
                    .entry(1)
                    .or_insert_with_if(|| unreachable!(), |_| unreachable!())
            };
            assert_eq!((*e.value(), e.is_fresh()), (1, false));
            assert_eq!(leader.join().unwrap(), 1);
        });
        // Present now: `replace_if` judges it; a replacement is fresh.
        let e = cache.entry(1).or_insert_with_if(|| 2, |v| *v == 1);
        assert_eq!((*e.value(), e.is_fresh()), (2, true));
        let e = cache.entry(1).or_insert_with_if(|| 3, |v| *v == 1);
        assert_eq!((*e.value(), e.is_fresh()), (2, false));
    }
}

/// Cancel safety: an async replacement dropped while its `init` runs leaves the old value and
/// no flight behind; the next caller replaces it.
#[test]
fn get_with_if_async_cancelled_mid_init_leaves_the_old_value() {
    let cache: Cache<u32, u32> = Cache::new(10);
    cache.insert(1, 1);
    let mut fut = Box::pin(cache.get_with_if_async(
        1,
        async {
            Yield(1).await;
            2
        },
        |_| true,
    ));
    assert!(fut
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending());
    assert_eq!(cache.loads_in_flight(), 1);
    drop(fut);
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(cache.get_with_if(1, || 3, |_| true), 3);
}

/// The leader's second judgement runs while its load is claimed: a `replace_if` that loads
/// the same key then (a replacement, which a present value does not answer) panics
/// (recursion), as a recursive `init` does, instead of waiting for itself; the key is
/// released.
#[test]
fn get_with_if_replace_if_loading_its_own_key_panics() {
    let _dog = watchdog(LIMIT, "get_with_if_replace_if_loading_its_own_key_panics");
    let cache: Cache<u32, u32> = Cache::new(10);
    cache.insert(1, 1);
    let calls = AtomicUsize::new(0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache.get_with_if(
            1,
            || 2,
            |_| {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    // The leader's second look: a replacement of the same key would wait for
                    // the very load this caller claimed.
                    cache.get_with_if(1, || 3, |_| true);
                }
                true
            },
        )
    }));
    assert!(r.is_err(), "a recursive load panics");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(cache.get_with_if(1, || 4, |_| true), 4);
}

/// A value whose `Drop` panics at the N-th drop of a copy of value `PANIC_AT.0` on this
/// thread (then disarms); `LIVE` counts the copies alive, by value.
#[derive(Debug, PartialEq)]
struct Touchy(u32);

thread_local! {
    static PANIC_AT: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
    static LIVE: std::cell::RefCell<HashMap<u32, i64>> = std::cell::RefCell::new(HashMap::new());
}

impl Touchy {
    fn new(v: u32) -> Self {
        LIVE.with(|l| *l.borrow_mut().entry(v).or_default() += 1);
        Touchy(v)
    }
    fn live(v: u32) -> i64 {
        LIVE.with(|l| l.borrow().get(&v).copied().unwrap_or(0))
    }
}

impl Clone for Touchy {
    fn clone(&self) -> Self {
        Touchy::new(self.0)
    }
}

impl Drop for Touchy {
    fn drop(&mut self) {
        LIVE.with(|l| *l.borrow_mut().entry(self.0).or_default() -= 1);
        let (v, n) = PANIC_AT.with(|p| p.get());
        if v == self.0 && n > 0 {
            PANIC_AT.with(|p| p.set((v, n - 1)));
            if n == 1 {
                panic!("injected drop panic of value {v}");
            }
        }
    }
}

/// `and_compute_with`'s `# Panics`: whichever copy of the old value panics as it drops —
/// the one in `f`'s entry (a panic of `f`) or the one kept for the verdict, dropped before a
/// `Put` is stored — the panic reaches the caller, the key keeps its old value, the `Put`
/// value is dropped, and the key can be computed again (nothing left waiting).
#[test]
fn a_compute_whose_old_value_copy_panics_as_it_drops_stores_nothing() {
    let _dog = watchdog(
        LIMIT,
        "a_compute_whose_old_value_copy_panics_as_it_drops_stores_nothing",
    );
    for nth in 1..=2 {
        let cache: Cache<u32, Touchy> = Cache::new(10);
        cache.insert(1, Touchy::new(7));
        PANIC_AT.with(|p| p.set((7, nth)));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.entry(1).and_compute_with(|e| {
                // Dropped before the verdict is built: a parameter dropped after it would
                // leak it when its `Drop` panics (rust-lang/rust#47949), in this closure.
                drop(e);
                Op::Put(Touchy::new(8))
            })
        }));
        let fired = PANIC_AT.with(|p| p.get()).1 == 0;
        PANIC_AT.with(|p| p.set((0, 0)));
        assert!(fired, "drop #{nth} of the old value was reached");
        assert!(r.is_err(), "drop #{nth}: the panic reaches the caller");
        assert_eq!(
            cache.get(&1),
            Some(Touchy::new(7)),
            "drop #{nth}: the old value is kept"
        );
        assert_eq!(Touchy::live(8), 0, "drop #{nth}: the Put value was dropped");
        let r = cache.entry(1).and_compute_with(|_| Op::Put(Touchy::new(9)));
        assert!(
            matches!(r, CompResult::ReplacedWith(_)),
            "drop #{nth}: computed again"
        );
        drop(r);
        assert_eq!(cache.get(&1), Some(Touchy::new(9)));
        drop(cache);
        assert_eq!(Touchy::live(7) + Touchy::live(8) + Touchy::live(9), 0);
    }
}
