#![cfg(not(any(loom, shuttle)))]
//! Round 77: the negative-cache entry a *shared* async load replaces (`get_with_async_shared`
//! and its siblings bypass negative entries, as `get_with` does) is put back when that load
//! ends with nothing — cancelled by its last caller, or its `init` panicking while polled —
//! as round 76 made every other lead do; and ended when it stores a value, when a write
//! detaches it, or when the entry has expired meanwhile.

mod common;

use common::negative::{remembered, still_remembered};
use common::{ledger, watchdog};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Polls `fut` once (it must be pending), then drops it: the shared load is cancelled.
fn poll_once_then_drop<F: Future>(fut: F) {
    let mut fut = Box::pin(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(fut);
}

#[test]
fn cancelled_shared_loads_keep_the_negative_entry() {
    let _w = watchdog(T, "cancelled shared loads");
    let (_clock, calls, cache) = remembered();
    poll_once_then_drop(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    still_remembered(&calls, &cache, "get_with_async_shared cancelled");
    poll_once_then_drop(
        cache.try_get_with_async_shared(1, std::future::pending::<Result<u32, String>>()),
    );
    still_remembered(&calls, &cache, "try_get_with_async_shared cancelled");
    poll_once_then_drop(
        cache.optionally_get_with_async_shared(1, std::future::pending::<Option<u32>>()),
    );
    still_remembered(&calls, &cache, "optionally_get_with_async_shared cancelled");
}

#[test]
fn a_panicking_shared_load_keeps_the_negative_entry() {
    let _w = watchdog(T, "panicking shared load");
    let (_clock, calls, cache) = remembered();
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(cache.get_with_async_shared(1, async { panic!("init boom") }))
    }));
    assert!(r.is_err());
    still_remembered(&calls, &cache, "get_with_async_shared panicking");
}

#[test]
fn a_shared_load_that_finds_nothing_answers_as_the_blocking_one_does() {
    let _w = watchdog(T, "shared None");
    // The blocking and the shared call, each on a key with a remembered error: the `None`
    // found is remembered in its place (an `optionally_*` caller's negative answer), so
    // both caches then answer a `load` alike.
    let mut after = Vec::new();
    for shared in [false, true] {
        let (_clock, calls, cache) = remembered();
        let v = if shared {
            futures::executor::block_on(
                cache.optionally_get_with_async_shared(1, async { None::<u32> }),
            )
        } else {
            cache.optionally_get_with(1, || None::<u32>)
        };
        assert_eq!(v, None);
        let inits = AtomicUsize::new(0);
        let again = cache.optionally_get_with(1, || {
            inits.fetch_add(1, Ordering::SeqCst);
            Some(5)
        });
        assert_eq!(
            (again, inits.load(Ordering::SeqCst)),
            (None, 0),
            "shared {shared}"
        );
        let r = cache.load(1).is_err();
        after.push((r, calls.load(Ordering::SeqCst)));
        ledger(&cache);
    }
    assert_eq!(after[0], after[1], "blocking vs shared");
}

#[test]
fn a_shared_load_with_a_value_ends_the_negative_entry() {
    let _w = watchdog(T, "shared value");
    let (_clock, calls, cache) = remembered();
    let v = futures::executor::block_on(cache.get_with_async_shared(1, async { 7 }));
    assert_eq!(v, 7);
    assert_eq!(cache.load(1).unwrap(), 7);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    ledger(&cache);
}

#[test]
fn a_write_during_a_cancelled_shared_load_ends_the_negative_entry() {
    let _w = watchdog(T, "shared write");
    let (_clock, calls, cache) = remembered();
    let mut fut = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    cache.invalidate(&1);
    drop(fut);
    assert!(cache.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the invalidated negative entry came back"
    );
    ledger(&cache);
}

#[test]
fn an_entry_expired_during_a_cancelled_shared_load_is_not_put_back() {
    let _w = watchdog(T, "shared expired");
    let (clock, calls, cache) = remembered();
    let mut fut = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    clock.advance(Duration::from_secs(11));
    drop(fut);
    assert!(cache.load(1).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "an expired negative entry came back"
    );
    ledger(&cache);
}

#[test]
fn waiters_of_a_cancelled_shared_load_get_the_remembered_error() {
    let _w = watchdog(T, "shared waiter");
    let (_clock, calls, cache) = remembered();
    // Two callers of one shared load; both go: the load is cancelled and the entry is back.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    let mut b = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(a.as_mut().poll(&mut cx).is_pending());
    assert!(b.as_mut().poll(&mut cx).is_pending());
    drop(a);
    assert_eq!(cache.loads_in_flight(), 1, "b still wants the load");
    drop(b);
    still_remembered(&calls, &cache, "two callers cancelled");
}
