#![cfg(not(any(loom, shuttle)))]
//! Round 78 of the outside attacks (a helper, public API only), on round 77's fix: negative
//! caching through the *shared* async loads (`get_with_async_shared` & co.): a shared load
//! that ends with nothing (cancelled by its last caller, its `init` panicking, whoever polls
//! it) puts back the negative entry it replaced, unless a write touched the key or the entry
//! expired meanwhile; a value ends it.
//!
//! Found (fixed in the same change; 7 tests failed): (A) a caller whose `init` went into a
//! shared load that panicked while another caller polled it claims the key again with no
//! loader; that claim's registration, withdrawn, dropped the entry it had just replaced
//! (`minimal_panic_polled_by_*`, `init_panicking_when_polled_by_another_caller_*`, and the
//! panic backoff's and the load limit's variants); (B) a load taken over by a nested caller
//! (under `max_concurrent_loads`) that then ended with nothing lost the entry: the lead that
//! was taken over held it, the taker's lead did not (`take_over_controls`,
//! `a_borrowing_load_taken_over_by_a_nested_shared_load_*`). Now the entry belongs to the
//! flight (`State::displaced`, set in the registration's critical section) and whoever ends
//! the flight with nothing puts it back; a withdrawn registration puts it back at once. The
//! tokio stress's phase 1 (panicking `init`s, no writes) called the backend 5-9 times for 4
//! keys before the fix; it now asserts 4.
mod common;

use common::negative::{remembered, still_remembered};
use common::{ledger_at as ledger, watchdog, Yield};
use herdcache::{BoxError, Cache, LoadError, ManualClock, Op};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Polls until a poll panics (true) or 5 polls passed (false).
fn poll_until_panic<F: Future + ?Sized>(f: &mut Pin<Box<F>>) -> bool {
    for _ in 0..5 {
        match catch_unwind(AssertUnwindSafe(|| poll(f))) {
            Err(_) => return true,
            Ok(Poll::Ready(_)) => return false,
            Ok(Poll::Pending) => {}
        }
    }
    false
}

fn poll<F: Future + ?Sized>(f: &mut Pin<Box<F>>) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    f.as_mut().poll(&mut cx)
}

/// Key 1's negative entry is gone: the next `load` calls the backend (which fails again).
fn forgotten(calls: &AtomicUsize, cache: &Cache<u32, u32>, what: &str) {
    let before = calls.load(Ordering::SeqCst);
    let r = cache.load(1);
    assert!(matches!(r, Err(LoadError::Loader(_))), "{what}: {r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "{what}: the negative entry survived"
    );
    ledger(cache, what);
}

type Fut<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// A shared caller of key 1 of kind `kind` (0: get, 1: try_get, 2: optionally) whose `init`
/// never finishes; its answer is discarded.
fn pending_caller(cache: &Cache<u32, u32>, kind: usize) -> Fut<'_> {
    match kind % 3 {
        0 => Box::pin(async move {
            cache
                .get_with_async_shared(1, std::future::pending::<u32>())
                .await;
        }),
        1 => Box::pin(async move {
            let _ = cache
                .try_get_with_async_shared(1, std::future::pending::<Result<u32, String>>())
                .await;
        }),
        _ => Box::pin(async move {
            let _ = cache
                .optionally_get_with_async_shared(1, std::future::pending::<Option<u32>>())
                .await;
        }),
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn three_shared_callers_dropped_in_every_order_keep_the_entry() {
    let _w = watchdog(T, "three callers, every order");
    for kinds in 0..27usize {
        for order in permutations(3) {
            let (_clock, calls, cache) = remembered();
            let mut fs: Vec<Option<Fut<'_>>> = (0..3)
                .map(|i| Some(pending_caller(&cache, kinds / 3usize.pow(i as u32))))
                .collect();
            for f in fs.iter_mut() {
                assert!(poll(f.as_mut().unwrap()).is_pending());
            }
            // A second round of polls: each caller may poll the shared future.
            for f in fs.iter_mut().rev() {
                assert!(poll(f.as_mut().unwrap()).is_pending());
            }
            for (n, &i) in order.iter().enumerate() {
                fs[i] = None;
                if n < 2 {
                    assert_eq!(cache.loads_in_flight(), 1, "kinds {kinds} order {order:?}");
                    // A caller still waits: the remaining ones are polled again.
                    for f in fs.iter_mut().flatten() {
                        assert!(poll(f).is_pending());
                    }
                }
            }
            still_remembered(&calls, &cache, &format!("kinds {kinds} order {order:?}"));
        }
    }
}

#[test]
fn a_waiter_drives_after_the_leader_leaves_then_goes() {
    let _w = watchdog(T, "waiter drives");
    let (_clock, calls, cache) = remembered();
    let polled = Arc::new(AtomicUsize::new(0));
    let p = polled.clone();
    let init = async move {
        loop {
            p.fetch_add(1, Ordering::SeqCst);
            Yield(1).await;
        }
    };
    let mut a = Box::pin(cache.get_with_async_shared(1, init));
    let mut b = Box::pin(cache.get_with_async_shared(1, async { 5u32 }));
    assert!(poll(&mut a).is_pending());
    assert!(poll(&mut b).is_pending());
    drop(a);
    let before = polled.load(Ordering::SeqCst);
    assert!(poll(&mut b).is_pending());
    assert!(
        polled.load(Ordering::SeqCst) > before,
        "the waiter does not drive the shared load"
    );
    // Meanwhile the key's load is that shared load: a negative caller waits for it, not
    // answered by the entry it replaced; here only checked not to call the backend.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(b);
    still_remembered(&calls, &cache, "waiter drove, then left");
}

#[test]
fn init_panicking_on_second_poll_by_the_leader_keeps_the_entry() {
    let _w = watchdog(T, "second poll panic, leader");
    let (_clock, calls, cache) = remembered();
    let mut a = Box::pin(cache.get_with_async_shared(1, async {
        Yield(2).await;
        panic!("injected: init's third poll")
    }));
    let mut b = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    assert!(poll(&mut b).is_pending());
    let r = catch_unwind(AssertUnwindSafe(|| poll(&mut a)));
    assert!(r.is_err(), "the leader polling a panicking init panics");
    drop(a);
    // The load ended with nothing: the entry is back, although `b` still waits.
    let r = cache.load(1);
    assert!(matches!(r, Err(LoadError::Loader(_))), "{r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "backend called after the panic"
    );
    // `b` loads with its own init (pending), then leaves.
    assert!(poll(&mut b).is_pending());
    drop(b);
    still_remembered(&calls, &cache, "panic in leader's poll, then b cancelled");
}

#[test]
fn init_panicking_when_polled_by_another_caller_keeps_the_entry() {
    let _w = watchdog(T, "panic polled by a waiter");
    for kind in 0..3 {
        let (_clock, calls, cache) = remembered();
        let mut a = Box::pin(cache.get_with_async_shared(1, async {
            Yield(1).await;
            panic!("injected: polled by a waiter")
        }));
        let mut b = pending_caller(&cache, kind);
        assert!(poll(&mut a).is_pending());
        let r = catch_unwind(AssertUnwindSafe(|| poll(&mut b)));
        assert!(
            r.is_err(),
            "kind {kind}: the waiter polling the panicking load panics"
        );
        drop(b);
        // a's init is gone; whatever it answers (a panic: no load of its own left), nothing
        // may call the backend, and it must not hang.
        let r = catch_unwind(AssertUnwindSafe(|| poll(&mut a)));
        match &r {
            Ok(Poll::Pending) => {}
            Ok(Poll::Ready(v)) => panic!("kind {kind}: the leader got a value {v}"),
            Err(_) => {}
        }
        drop(a);
        still_remembered(
            &calls,
            &cache,
            &format!("kind {kind}: panic polled by a waiter"),
        );
    }
}

#[test]
fn init_panicking_at_first_poll_under_try_and_optionally_keeps_the_entry() {
    let _w = watchdog(T, "first poll panic");
    let (_clock, calls, cache) = remembered();
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(cache.try_get_with_async_shared(1, async {
            panic!("injected: try init");
            #[allow(unreachable_code)]
            Ok::<u32, String>(1)
        }))
    }));
    assert!(r.is_err());
    still_remembered(&calls, &cache, "try_get_with_async_shared panicking");
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(cache.optionally_get_with_async_shared(1, async {
            panic!("injected: optionally init");
            #[allow(unreachable_code)]
            Some(1u32)
        }))
    }));
    assert!(r.is_err());
    still_remembered(&calls, &cache, "optionally_get_with_async_shared panicking");
}

/// Writes while a shared load is pending; the load is then cancelled: each write ends the
/// negative entry.
#[test]
fn writes_during_a_pending_shared_load_end_the_entry() {
    let _w = watchdog(T, "writes while pending");
    for write in 0..6 {
        for cancel in [true, false] {
            let what = format!("write {write} cancel {cancel}");
            let (_clock, calls, cache) = remembered();
            let mut a = Box::pin(cache.get_with_async_shared(1, async {
                Yield(1).await;
                panic!("injected: after the write")
            }));
            assert!(poll(&mut a).is_pending());
            match write {
                0 => cache.invalidate(&1),
                1 => cache.invalidate_all(),
                2 => assert_eq!(cache.remove(&1), None),
                3 => {
                    cache.insert(1, 8);
                    cache.retain(|_, _| false);
                }
                4 => {
                    cache.insert(1, 8);
                    cache.invalidate_entries_if(|_, _| true).unwrap();
                }
                _ => {
                    cache.insert(1, 8);
                    cache.invalidate(&1);
                }
            }
            if cancel {
                drop(a);
            } else {
                assert!(catch_unwind(AssertUnwindSafe(|| poll(&mut a))).is_err());
                drop(a);
            }
            assert!(!cache.contains_key(&1), "{what}");
            forgotten(&calls, &cache, &what);
        }
    }
}

#[test]
fn an_insert_during_a_pending_shared_load_wins() {
    let _w = watchdog(T, "insert while pending");
    for end in 0..3 {
        let (_clock, calls, cache) = remembered();
        let mut a = Box::pin(cache.get_with_async_shared(1, async move {
            Yield(1).await;
            match end {
                0 => std::future::pending::<u32>().await,
                1 => panic!("injected: after the insert"),
                _ => 77,
            }
        }));
        assert!(poll(&mut a).is_pending());
        cache.insert(1, 5);
        match end {
            0 => drop(a),
            1 => {
                assert!(catch_unwind(AssertUnwindSafe(|| poll(&mut a))).is_err());
                drop(a);
            }
            _ => {
                // Its callers get its value; the insert's stays.
                assert_eq!(poll(&mut a), Poll::Ready(77));
                drop(a);
            }
        }
        assert!(cache.contains_key(&1), "end {end}");
        assert_eq!(cache.load(1).unwrap(), 5, "end {end}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        ledger(&cache, "insert while pending");
    }
}

#[test]
fn a_value_after_an_invalidation_is_not_followed_by_the_old_entry() {
    let _w = watchdog(T, "value after invalidate");
    let (_clock, calls, cache) = remembered();
    let mut a = Box::pin(cache.get_with_async_shared(1, async {
        Yield(1).await;
        9u32
    }));
    assert!(poll(&mut a).is_pending());
    cache.invalidate(&1);
    assert_eq!(poll(&mut a), Poll::Ready(9));
    drop(a);
    // Superseded by the invalidation: not stored; the old negative entry must not be back.
    forgotten(&calls, &cache, "value after invalidate");
}

#[test]
fn expiry_during_a_shared_load_that_panics_or_is_cancelled_later() {
    let _w = watchdog(T, "expiry");
    for end in 0..3 {
        let (clock, calls, cache) = remembered();
        let mut a = Box::pin(cache.get_with_async_shared(1, async {
            Yield(2).await;
            panic!("injected: after expiry")
        }));
        assert!(poll(&mut a).is_pending());
        clock.advance(Duration::from_secs(11));
        match end {
            0 => {
                assert!(catch_unwind(AssertUnwindSafe(|| {
                    let _ = poll(&mut a);
                    poll(&mut a)
                }))
                .is_err());
            }
            1 => {
                assert!(poll(&mut a).is_pending());
            }
            _ => {}
        }
        drop(a);
        forgotten(&calls, &cache, &format!("expiry, end {end}"));
    }
}

#[test]
fn an_entry_still_live_across_polls_with_time_passing_is_kept() {
    let _w = watchdog(T, "time passes, not expired");
    let (clock, calls, cache) = remembered();
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    clock.advance(Duration::from_secs(4));
    assert!(poll(&mut a).is_pending());
    clock.advance(Duration::from_secs(4));
    drop(a);
    still_remembered(&calls, &cache, "8 s of 10 passed");
    // The put-back entry keeps its first deadline (10 s after the failure), not a new one.
    clock.advance(Duration::from_secs(3));
    forgotten(&calls, &cache, "the put-back entry's deadline");
}

#[test]
fn a_blocking_load_waiting_on_a_cancelled_shared_load_gets_the_remembered_error() {
    let _w = watchdog(T, "blocking waiter");
    let (_clock, calls, cache) = remembered();
    let cache = Arc::new(cache);
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    let c = cache.clone();
    let t = common::start(move || c.load(1));
    let c2 = cache.clone();
    let t2 = common::start(move || {
        c2.try_get_with(1, || {
            panic!("injected: the blocking try_get_with loaded");
            #[allow(unreachable_code)]
            Ok::<u32, BoxError>(1)
        })
        .is_err()
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(a);
    let r = t.wait(Duration::from_secs(10)).expect("blocking load hung");
    let r = r.expect("blocking load panicked");
    assert!(matches!(r, Err(LoadError::Loader(_))), "{r:?}");
    let r2 = t2
        .wait(Duration::from_secs(10))
        .expect("blocking try_get hung");
    assert!(r2.expect("blocking try_get_with loaded (init panicked)"));
    still_remembered(
        &calls,
        &cache,
        "blocking waiters of a cancelled shared load",
    );
}

#[test]
fn a_blocking_get_with_waiting_on_a_cancelled_shared_load_loads_its_value() {
    let _w = watchdog(T, "blocking get_with waiter");
    let (_clock, calls, cache) = remembered();
    let cache = Arc::new(cache);
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    let c = cache.clone();
    let t = common::start(move || c.get_with(1, || 42));
    std::thread::sleep(Duration::from_millis(300));
    drop(a);
    let r = t
        .wait(Duration::from_secs(10))
        .expect("hung")
        .expect("panicked");
    assert_eq!(r, 42);
    assert_eq!(cache.load(1).unwrap(), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    ledger(&*cache, "get_with after shared cancel");
}

#[test]
fn a_borrowing_negative_caller_joining_a_shared_load_then_all_leave() {
    let _w = watchdog(T, "borrowing joiner");
    for leader_first in [true, false] {
        let (_clock, calls, cache) = remembered();
        let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
        assert!(poll(&mut a).is_pending());
        let inits = AtomicUsize::new(0);
        let mut b = Box::pin(cache.try_get_with_async(1, async {
            inits.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<u32, BoxError>>().await
        }));
        let mut c =
            Box::pin(cache.optionally_get_with_async(1, async {
                std::future::pending::<Option<u32>>().await
            }));
        assert!(poll(&mut b).is_pending());
        assert!(poll(&mut c).is_pending());
        if leader_first {
            drop(a);
            // b and c: they wait on a load nobody... they are async callers, so they keep it.
            let pb = poll(&mut b);
            let pc = poll(&mut c);
            drop(b);
            drop(c);
            // Either they keep the shared load going (pending), or it was cancelled and they
            // got the remembered error; never a backend call.
            assert!(
                matches!(pb, Poll::Pending | Poll::Ready(Err(_))),
                "b: {pb:?}"
            );
            assert!(matches!(pc, Poll::Pending | Poll::Ready(None)), "c: {pc:?}");
        } else {
            drop(b);
            drop(c);
            drop(a);
        }
        assert_eq!(inits.load(Ordering::SeqCst), 0);
        still_remembered(
            &calls,
            &cache,
            &format!("borrowing joiners, leader first {leader_first}"),
        );
    }
}

#[test]
fn non_shared_callers_after_a_cancelled_shared_load() {
    let _w = watchdog(T, "non-shared after");
    let (_clock, calls, cache) = remembered();
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    drop(a);
    // A computation that changes nothing keeps it too.
    let r = cache.entry(1).and_compute_with(|_| Op::Nop);
    let _ = r;
    still_remembered(&calls, &cache, "after Nop");
    // or_insert_with: a value, ends it.
    let e = cache.entry(1).or_insert_with(|| 4);
    assert_eq!(*e.value(), 4);
    assert_eq!(cache.load(1).unwrap(), 4);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    ledger(&cache, "or_insert_with");
}

/// With a load limit of 1: a shared load queued for the permit (held by another load) is
/// cancelled; then the permit's holder ends.
#[test]
fn a_shared_load_queued_for_a_permit_and_cancelled_keeps_the_entry() {
    let _w = watchdog(T, "queued for a permit");
    for granted_first in [false, true] {
        common::quiet_injected_panics();
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(10))
            .clock(clock.clone())
            .record_stats()
            .max_concurrent_loads(1)
            .loader(move |_k: &u32| {
                c2.fetch_add(1, Ordering::SeqCst);
                Err::<u32, _>(BoxError::from("down"))
            })
            .build();
        assert!(cache.load(1).is_err());
        let mut holder = Box::pin(cache.get_with_async(2, std::future::pending::<u32>()));
        assert!(poll(&mut holder).is_pending());
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = ran.clone();
        let mut s = Box::pin(cache.get_with_async_shared(1, async move {
            r2.store(true, Ordering::SeqCst);
            std::future::pending::<u32>().await
        }));
        assert!(poll(&mut s).is_pending());
        assert!(!ran.load(Ordering::SeqCst), "ran without a permit");
        if granted_first {
            drop(holder);
            assert!(poll(&mut s).is_pending());
            assert!(ran.load(Ordering::SeqCst));
            drop(s);
        } else {
            drop(s);
            drop(holder);
        }
        still_remembered(
            &calls,
            &cache,
            &format!("permit, granted first {granted_first}"),
        );
    }
}

fn limited(clock: &ManualClock, calls: Arc<AtomicUsize>) -> Cache<u32, u32> {
    Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .max_concurrent_loads(1)
        .loader(move |_k: &u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<u32, _>(BoxError::from("down"))
        })
        .build()
}

/// A shared load queued for the permit is joined by a load nested in the permit's holder (a
/// borrowing call of the same key), which polls it under its permit; the shared `init` is
/// pending (then everyone leaves) or panics in that nested poll.
#[test]
fn a_queued_shared_load_polled_by_a_nested_joiner_that_ends_with_nothing() {
    let _w = watchdog(T, "nested joiner");
    let mut failed = Vec::new();
    for how in 0..4 {
        let what = format!("nested joiner, how {how}");
        common::quiet_injected_panics();
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = limited(&clock, calls.clone());
        assert!(cache.load(1).is_err());
        let c = &cache;
        let mut outer = Box::pin(cache.get_with_async(2, async move {
            Yield(1).await;
            if how % 2 == 0 {
                c.get_with_async(1, async { 1u32 }).await
            } else {
                c.try_get_with_async(1, async { Ok::<u32, BoxError>(1) })
                    .await
                    .unwrap_or(0)
            }
        }));
        assert!(poll(&mut outer).is_pending()); // holds the permit
        let mut s = Box::pin(cache.get_with_async_shared(1, async move {
            Yield(1).await;
            if how >= 2 {
                panic!("injected: shared init polled by a nested joiner");
            }
            std::future::pending::<u32>().await
        }));
        assert!(poll(&mut s).is_pending()); // queued
        let r = catch_unwind(AssertUnwindSafe(|| {
            let a = poll(&mut outer);
            let b = poll(&mut outer);
            (a, b)
        }));
        let _ = &r;
        drop(outer);
        let _ = catch_unwind(AssertUnwindSafe(|| poll(&mut s)));
        drop(s);
        if catch_unwind(AssertUnwindSafe(|| still_remembered(&calls, &cache, &what))).is_err() {
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// A borrowing leader of key 1 waits for the permit (it replaced the negative entry); a shared
/// caller nested in the permit's holder takes its load over; the taker's `init` panics or the
/// taker is dropped mid-way: the key's load ended with nothing.
#[test]
fn a_borrowing_load_taken_over_by_a_nested_shared_load_that_ends_with_nothing() {
    let _w = watchdog(T, "taken over by a shared load");
    let mut failed = Vec::new();
    for how in 0..4 {
        let what = format!("taken over by shared, how {how}");
        common::quiet_injected_panics();
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = Arc::new(limited(&clock, calls.clone()));
        assert!(cache.load(1).is_err());
        let c = cache.clone();
        let started = Arc::new(AtomicBool::new(false));
        let st = started.clone();
        let mut outer = Box::pin(cache.get_with_async_shared(2, async move {
            Yield(1).await;
            match how {
                0 => {
                    c.get_with_async_shared(1, async move {
                        st.store(true, Ordering::SeqCst);
                        panic!("injected: the shared taker's init")
                    })
                    .await
                }
                1 => {
                    c.get_with_async_shared(1, async move {
                        st.store(true, Ordering::SeqCst);
                        std::future::pending::<u32>().await
                    })
                    .await
                }
                2 => c
                    .try_get_with_async_shared(1, async move {
                        st.store(true, Ordering::SeqCst);
                        panic!("injected: the shared taker's try init");
                        #[allow(unreachable_code)]
                        Ok::<u32, BoxError>(1)
                    })
                    .await
                    .unwrap_or(0),
                _ => c
                    .optionally_get_with_async_shared(1, async move {
                        st.store(true, Ordering::SeqCst);
                        std::future::pending::<Option<u32>>().await
                    })
                    .await
                    .unwrap_or(0),
            }
        }));
        assert!(poll(&mut outer).is_pending()); // holds the permit
        let victim_ran = AtomicBool::new(false);
        let mut victim = Box::pin(cache.get_with_async(1, async {
            victim_ran.store(true, Ordering::SeqCst);
            7u32
        }));
        assert!(poll(&mut victim).is_pending()); // waits for the permit
        let r = catch_unwind(AssertUnwindSafe(|| poll(&mut outer)));
        let taken = started.load(Ordering::SeqCst);
        eprintln!(
            "{what}: taker started {taken}, outer {:?}",
            r.as_ref().map(|p| p.is_pending())
        );
        drop(outer);
        drop(victim);
        assert!(!victim_ran.load(Ordering::SeqCst));
        if catch_unwind(AssertUnwindSafe(|| still_remembered(&calls, &cache, &what))).is_err() {
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn nested_shared_loads_cancelled_keep_both_entries() {
    let _w = watchdog(T, "nested");
    let (_clock, calls, cache) = remembered();
    let cache = Arc::new(cache);
    assert!(cache.load(2).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let c = cache.clone();
    let mut a = Box::pin(cache.get_with_async_shared(1, async move {
        c.get_with_async_shared(2, std::future::pending::<u32>())
            .await
    }));
    assert!(poll(&mut a).is_pending());
    assert_eq!(cache.loads_in_flight(), 2);
    drop(a);
    for k in [1, 2] {
        assert!(cache.load(k).is_err());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a nested entry was lost");
    ledger(&*cache, "nested");
    // Nested, the inner panicking on its second poll.
    let c = cache.clone();
    let mut a = Box::pin(cache.get_with_async_shared(1, async move {
        c.get_with_async_shared(2, async {
            Yield(1).await;
            panic!("injected: nested init")
        })
        .await
    }));
    assert!(poll(&mut a).is_pending());
    assert!(catch_unwind(AssertUnwindSafe(|| poll(&mut a))).is_err());
    drop(a);
    for k in [1, 2] {
        assert!(cache.load(k).is_err());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a nested entry was lost after a panic"
    );
    ledger(&*cache, "nested panic");
}

/// A write made while a caller is *inside* the shared load's poll (on another thread), then the
/// load cancelled: the write wins.
#[test]
fn a_write_during_a_poll_then_cancel_ends_the_entry() {
    let _w = watchdog(T, "write during a poll");
    for what in 0..3 {
        let (clock, calls, cache) = remembered();
        let cache = Arc::new(cache);
        let (in_poll_tx, in_poll_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let c = cache.clone();
        let t = common::start(move || {
            let go_rx = std::sync::Mutex::new(go_rx);
            let mut a = Box::pin(c.get_with_async_shared(
                1,
                futures::future::poll_fn(move |_cx| {
                    in_poll_tx.send(()).ok();
                    go_rx.lock().unwrap().recv().ok();
                    Poll::<u32>::Pending
                }),
            ));
            assert!(poll(&mut a).is_pending());
            drop(a);
        });
        in_poll_rx.recv().unwrap();
        match what {
            0 => cache.invalidate(&1),
            1 => cache.invalidate_all(),
            _ => clock.advance(Duration::from_secs(11)),
        }
        go_tx.send(()).unwrap();
        t.wait(Duration::from_secs(10))
            .expect("hung")
            .expect("panicked");
        forgotten(&calls, &cache, &format!("during a poll, write {what}"));
    }
}

/// An error whose `Drop` panics (while armed).
struct Fragile(Arc<AtomicBool>);

impl Drop for Fragile {
    fn drop(&mut self) {
        if self.0.swap(false, Ordering::SeqCst) {
            panic!("injected: a remembered error's drop");
        }
    }
}

fn fragile_cache() -> (ManualClock, Cache<u32, u32>, Arc<AtomicBool>) {
    common::quiet_injected_panics();
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .build();
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let r = cache.try_get_with(1, move || Err::<u32, _>(Fragile(a)));
    assert!(r.is_err());
    drop(r);
    armed.store(true, Ordering::SeqCst);
    (clock, cache, armed)
}

fn fragile_remembered(cache: &Cache<u32, u32>) -> bool {
    let r = cache.try_get_with(1, || Ok::<u32, Fragile>(99));
    r.is_err()
}

#[test]
fn a_remembered_error_whose_drop_panics_cancelled_shared_load() {
    let _w = watchdog(T, "fragile cancel");
    let (_clock, cache, armed) = fragile_cache();
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    drop(a);
    assert!(fragile_remembered(&cache), "the fragile entry was lost");
    assert!(armed.load(Ordering::SeqCst), "the entry was dropped");
    ledger(&cache, "fragile cancel");
    armed.store(false, Ordering::SeqCst);
}

#[test]
fn a_remembered_error_whose_drop_panics_ended_by_a_shared_value() {
    let _w = watchdog(T, "fragile value");
    let (_clock, cache, armed) = fragile_cache();
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(cache.get_with_async_shared(1, async { 7u32 }))
    }));
    // The drop's panic goes to the caller (or not); either way the value is stored and the
    // entry dropped once.
    assert!(
        !armed.load(Ordering::SeqCst),
        "the ended entry was not dropped"
    );
    if let Ok(v) = r {
        assert_eq!(v, 7);
    }
    assert!(cache.contains_key(&1));
    assert_eq!(
        cache.try_get_with(1, || Ok::<u32, Fragile>(99)).ok(),
        Some(7)
    );
    ledger(&cache, "fragile value");
}

#[test]
fn a_remembered_error_whose_drop_panics_expired_then_cancelled() {
    let _w = watchdog(T, "fragile expired");
    let (clock, cache, armed) = fragile_cache();
    let mut a = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
    assert!(poll(&mut a).is_pending());
    clock.advance(Duration::from_secs(11));
    let r = catch_unwind(AssertUnwindSafe(|| drop(a)));
    assert!(
        !armed.load(Ordering::SeqCst),
        "the expired entry was not dropped"
    );
    let _ = r;
    assert!(!fragile_remembered(&cache), "an expired entry was put back");
    ledger(&cache, "fragile expired");
}

#[test]
fn a_remembered_error_whose_drop_panics_invalidated_during_a_shared_load() {
    let _w = watchdog(T, "fragile invalidated");
    let (_clock, cache, armed) = fragile_cache();
    let mut a = Box::pin(cache.get_with_async_shared(1, async {
        Yield(1).await;
        3u32
    }));
    assert!(poll(&mut a).is_pending());
    let r = catch_unwind(AssertUnwindSafe(|| cache.invalidate(&1)));
    let _ = r;
    let r = catch_unwind(AssertUnwindSafe(|| poll(&mut a)));
    if let Ok(p) = r {
        assert_eq!(p, Poll::Ready(3));
    }
    drop(a);
    assert!(!armed.load(Ordering::SeqCst), "the entry was not dropped");
    assert!(!fragile_remembered(&cache), "invalidated entry came back");
    ledger(&cache, "fragile invalidated");
}

/// The panic backoff: a loader that panicked is remembered as `Panicked` for
/// `refresh_backoff` on a cache with a time to live; a shared load that ends with nothing
/// keeps it.
#[test]
fn the_panic_backoff_survives_shared_loads_that_end_with_nothing() {
    let _w = watchdog(T, "panic backoff");
    for end in 0..4 {
        common::quiet_injected_panics();
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(60))
            .refresh_backoff(Duration::from_secs(5))
            .clock(clock.clone())
            .record_stats()
            .loader(move |_k: &u32| -> Result<u32, BoxError> {
                c2.fetch_add(1, Ordering::SeqCst);
                panic!("injected: the loader")
            })
            .build();
        assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
        assert!(matches!(cache.load(1), Err(LoadError::Panicked)));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no backoff at all");
        let mut a = Box::pin(cache.get_with_async_shared(1, async {
            Yield(1).await;
            panic!("injected: shared init")
        }));
        let mut b = Box::pin(
            cache.try_get_with_async_shared(1, std::future::pending::<Result<u32, String>>()),
        );
        assert!(poll(&mut a).is_pending());
        match end {
            0 => drop(a),
            1 => {
                assert!(poll_until_panic(&mut a));
                drop(a);
            }
            2 => {
                assert!(poll_until_panic(&mut b));
                drop(b);
                let _ = catch_unwind(AssertUnwindSafe(|| poll(&mut a)));
                drop(a);
                b =
                    Box::pin(cache.try_get_with_async_shared(
                        1,
                        std::future::pending::<Result<u32, String>>(),
                    ));
            }
            _ => {
                clock.advance(Duration::from_secs(6));
                drop(a);
            }
        }
        drop(b);
        let r = cache.load(1);
        assert!(matches!(r, Err(LoadError::Panicked)), "end {end}: {r:?}");
        let want = if end == 3 { 2 } else { 1 };
        assert_eq!(calls.load(Ordering::SeqCst), want, "end {end}: backoff");
        ledger(&cache, "panic backoff");
    }
}

static STRESS_AT: [std::sync::atomic::AtomicU64; 6] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 6];

/// A tokio stress: several tasks on a few keys, each with a remembered error; the shared loads
/// only ever end with nothing (timeouts cut them off, or their `init` panics), so the backend
/// must not be called again; then a second phase with writes, values and expiry, checked for
/// structure only.
#[test]
fn tokio_stress_shared_loads_ending_with_nothing() {
    let _w = watchdog(Duration::from_secs(120), "tokio stress");
    common::quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let cache: Arc<Cache<u32, u32>> = Arc::new(
        Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(10))
            .clock(clock.clone())
            .record_stats()
            .max_concurrent_loads(2)
            .loader(move |_k: &u32| {
                c2.fetch_add(1, Ordering::SeqCst);
                Err::<u32, _>(BoxError::from("down"))
            })
            .build(),
    );
    const KEYS: u32 = 4;
    for k in 0..KEYS {
        assert!(cache.load(k).is_err());
    }
    let bad = Arc::new(AtomicUsize::new(0));
    {
        let cache = cache.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(40));
            let at: Vec<u64> = STRESS_AT.iter().map(|a| a.load(Ordering::SeqCst)).collect();
            eprintln!(
                "stress monitor at 40 s: tasks at (phase*100000 + op*100 + key + 1) {at:?}; loads in flight {}",
                cache.loads_in_flight()
            );
        });
    }
    for phase in 0..3u64 {
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..6u64 {
                let cache = cache.clone();
                let clock = clock.clone();
                let bad = bad.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rng = common::SplitMix(t * 7919 + phase * 104729 + 1);
                    for _ in 0..300 {
                        let k = rng.below(KEYS as u64) as u32;
                        let op = match phase {
                            // Cancellations only (no panicking init): nothing may call the
                            // backend.
                            0 => [0, 2, 3, 4, 5, 6][rng.below(6) as usize],
                            // Panicking inits too (known to lose the entry: see the minimal
                            // test); counted, not asserted.
                            1 => rng.below(7),
                            _ => rng.below(12),
                        };
                        let cut = Duration::from_micros(rng.below(500));
                        let n = rng.below(4) as u32;
                        let bad = bad.clone();
                        STRESS_AT[t as usize]
                            .store(phase * 100000 + op * 100 + k as u64 + 1, Ordering::SeqCst);
                        let step = async {
                            match op {
                                0 => {
                                    let _ = tokio::time::timeout(
                                        cut,
                                        cache.get_with_async_shared(k, async move {
                                            Yield(n).await;
                                            tokio::time::sleep(Duration::from_millis(5)).await;
                                            std::future::pending::<u32>().await
                                        }),
                                    )
                                    .await;
                                }
                                1 => {
                                    let c = cache.clone();
                                    let h = tokio::spawn(async move {
                                        tokio::time::timeout(
                                            Duration::from_millis(20),
                                            c.try_get_with_async_shared(k, async move {
                                                Yield(n).await;
                                                panic!("injected: stress init");
                                                #[allow(unreachable_code)]
                                                Ok::<u32, String>(1)
                                            }),
                                        )
                                        .await
                                    });
                                    let _ = h.await;
                                }
                                2 => {
                                    let _ = tokio::time::timeout(
                                        cut,
                                        cache.optionally_get_with_async_shared(k, async move {
                                            Yield(n).await;
                                            std::future::pending::<Option<u32>>().await
                                        }),
                                    )
                                    .await;
                                }
                                3 => {
                                    let r = cache
                                        .try_get_with_async(k, async { Ok::<u32, BoxError>(1000) });
                                    let r = tokio::time::timeout(cut, r).await;
                                    if phase == 0 {
                                        if let Ok(Ok(_)) = r {
                                            bad.fetch_add(1, Ordering::SeqCst);
                                        }
                                    }
                                }
                                4 => {
                                    let c = cache.clone();
                                    let r = tokio::task::spawn_blocking(move || c.load(k)).await;
                                    if phase == 0 {
                                        if let Ok(Ok(_)) = r {
                                            bad.fetch_add(1, Ordering::SeqCst);
                                        }
                                    }
                                }
                                5 => {
                                    let c = cache.clone();
                                    let _ = tokio::time::timeout(
                                        cut,
                                        cache.get_with_async_shared(k, async move {
                                            // Nested: another key's shared load.
                                            c.get_with_async_shared((k + 1) % KEYS, async move {
                                                Yield(n).await;
                                                std::future::pending::<u32>().await
                                            })
                                            .await
                                        }),
                                    )
                                    .await;
                                }
                                6 => {
                                    // Blocking: off the runtime's workers.
                                    let c = cache.clone();
                                    let _ = tokio::task::spawn_blocking(move || {
                                        let _ = c.entry(k).and_compute_with(|_| Op::Nop);
                                    })
                                    .await;
                                }
                                7 => cache.invalidate(&k),
                                8 => cache.insert(k, 5),
                                9 => clock.advance(Duration::from_secs(rng.below(6))),
                                10 => {
                                    let v = tokio::time::timeout(
                                        Duration::from_millis(20),
                                        cache.get_with_async_shared(k, async move {
                                            Yield(n).await;
                                            k + 100
                                        }),
                                    )
                                    .await;
                                    let _ = v;
                                }
                                _ => cache.retain(|_, v| *v != 5),
                            }
                        };
                        let _ = futures::FutureExt::catch_unwind(AssertUnwindSafe(step)).await;
                        STRESS_AT[t as usize].store(0, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert!(
            common::eventually(|| cache.loads_in_flight() == 0),
            "phase {phase}: loads in flight stuck at {}",
            cache.loads_in_flight()
        );
        ledger(&*cache, &format!("stress phase {phase}"));
        eprintln!(
            "stress phase {phase}: backend calls {}, values answering negative callers {}",
            calls.load(Ordering::SeqCst),
            bad.load(Ordering::SeqCst)
        );
        if phase <= 1 {
            // Phase 1 (panicking inits, no writes) too, since the fix: it called the backend
            // 5-9 times instead of 4 before.
            assert_eq!(
                bad.load(Ordering::SeqCst),
                0,
                "phase {phase}: a value answered a negative caller"
            );
            assert_eq!(
                calls.load(Ordering::SeqCst),
                KEYS as usize,
                "phase {phase}: the backend was called within negative_ttl with no write"
            );
        }
    }
    drop(rt);
    ledger(&*cache, "after the runtime");
}

/// Minimal: a shared load's `init` panics while polled by a second caller (not the one whose
/// `init` it is); the remembered error must still answer, before and after the first caller
/// is polled again.
#[test]
fn minimal_panic_polled_by_a_waiter_then_leader_polled() {
    let _w = watchdog(T, "minimal waiter panic");
    for step in [1, 0, 2] {
        let (_clock, calls, cache) = remembered();
        let mut a = Box::pin(cache.get_with_async_shared(1, async {
            Yield(1).await;
            panic!("injected: polled by the waiter")
        }));
        let mut b = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
        assert!(poll(&mut a).is_pending());
        assert!(catch_unwind(AssertUnwindSafe(|| poll(&mut b))).is_err());
        drop(b);
        if step == 0 {
            assert!(matches!(cache.load(1), Err(LoadError::Loader(_))));
            assert_eq!(
                calls.load(Ordering::SeqCst),
                1,
                "step 0: lost at the waiter's panic"
            );
        }
        if step == 1 {
            // a is dropped without another poll.
            drop(a);
        } else {
            let r = catch_unwind(AssertUnwindSafe(|| poll(&mut a)));
            assert!(r.is_err(), "step {step}: a has no load left");
            drop(a);
        }
        still_remembered(&calls, &cache, &format!("minimal, step {step}"));
    }
}

/// Controls for the take-over test: (0) the victim waiting for the permit is dropped with no
/// take-over; (1) a *borrowing* nested caller takes the victim's load over and panics.
#[test]
fn take_over_controls() {
    let _w = watchdog(T, "take-over controls");
    let mut failed = Vec::new();
    for how in 0..2 {
        let what = format!("control {how}");
        common::quiet_injected_panics();
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = limited(&clock, calls.clone());
        assert!(cache.load(1).is_err());
        let c = &cache;
        let mut outer = Box::pin(cache.get_with_async(2, async move {
            Yield(1).await;
            if how == 0 {
                std::future::pending::<u32>().await
            } else {
                c.get_with_async(1, async { panic!("injected: borrowing taker") })
                    .await
            }
        }));
        assert!(poll(&mut outer).is_pending());
        let mut victim = Box::pin(cache.get_with_async(1, async { 7u32 }));
        assert!(poll(&mut victim).is_pending());
        let r = catch_unwind(AssertUnwindSafe(|| poll(&mut outer)));
        eprintln!("{what}: outer panicked {}", r.is_err());
        drop(outer);
        drop(victim);
        if catch_unwind(AssertUnwindSafe(|| still_remembered(&calls, &cache, &what))).is_err() {
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// The minimal case with each shared leader kind (get, try_get, optionally): the leader's
/// `init` panics while a waiter polls it; the leader is polled again afterwards.
#[test]
fn minimal_panic_polled_by_a_waiter_each_leader_kind() {
    let _w = watchdog(T, "minimal, leader kinds");
    let mut failed = Vec::new();
    for kind in 0..3 {
        let (_clock, calls, cache) = remembered();
        let mut a: Fut<'_> = match kind {
            0 => Box::pin(async {
                cache
                    .get_with_async_shared(1, async {
                        Yield(1).await;
                        panic!("injected: leader kind 0")
                    })
                    .await;
            }),
            1 => Box::pin(async {
                let _ = cache
                    .try_get_with_async_shared(1, async {
                        Yield(1).await;
                        panic!("injected: leader kind 1");
                        // Another error type than the remembered one: it loads.
                        #[allow(unreachable_code)]
                        Ok::<u32, String>(1)
                    })
                    .await;
            }),
            _ => Box::pin(async {
                let _ = cache
                    .optionally_get_with_async_shared(1, async {
                        Yield(1).await;
                        panic!("injected: leader kind 2");
                        #[allow(unreachable_code)]
                        Some(1u32)
                    })
                    .await;
            }),
        };
        let mut b = Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
        assert!(poll(&mut a).is_pending());
        assert!(catch_unwind(AssertUnwindSafe(|| poll(&mut b))).is_err());
        drop(b);
        let r = catch_unwind(AssertUnwindSafe(|| poll(&mut a)));
        eprintln!("leader kind {kind}: second poll panicked {}", r.is_err());
        drop(a);
        let what = format!("leader kind {kind}");
        if catch_unwind(AssertUnwindSafe(|| still_remembered(&calls, &cache, &what))).is_err() {
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// Values are neither leaked nor dropped twice through shared loads over a negative entry
/// (stored, superseded by a write, cancelled inside `init`, replaced by an insert).
#[test]
fn shared_loads_over_a_negative_entry_neither_leak_nor_double_drop_values() {
    let _w = watchdog(T, "counted values");
    let _l = common::live_lock();
    common::quiet_injected_panics();
    let base = common::LIVE.load(Ordering::SeqCst);
    {
        let clock = ManualClock::new();
        let cache: Cache<u32, common::Counted> = Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(10))
            .clock(clock.clone())
            .record_stats()
            .build();
        for k in 0..4u32 {
            assert!(cache
                .try_get_with(k, || Err::<common::Counted, _>(BoxError::from("down")))
                .is_err());
        }
        // 0: stored.
        let v = futures::executor::block_on(
            cache.get_with_async_shared(0, async { common::Counted::new(10) }),
        );
        assert_eq!(v.0, 10);
        drop(v);
        // 1: superseded by an invalidation.
        let mut a = Box::pin(cache.get_with_async_shared(1, async {
            Yield(1).await;
            common::Counted::new(11)
        }));
        assert!(poll(&mut a).is_pending());
        cache.invalidate(&1);
        match poll(&mut a) {
            Poll::Ready(v) => assert_eq!(v.0, 11),
            Poll::Pending => panic!("pending"),
        }
        drop(a);
        // 2: a value made inside init, then the load cancelled.
        let mut a = Box::pin(cache.get_with_async_shared(2, async {
            let held = common::Counted::new(12);
            std::future::pending::<()>().await;
            held
        }));
        assert!(poll(&mut a).is_pending());
        drop(a);
        // 3: an insert wins over the shared value.
        let mut a = Box::pin(cache.get_with_async_shared(3, async {
            Yield(1).await;
            common::Counted::new(13)
        }));
        assert!(poll(&mut a).is_pending());
        cache.insert(3, common::Counted::new(30));
        assert!(matches!(poll(&mut a), Poll::Ready(_)));
        drop(a);
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
        assert!(cache.contains_key(&0) && !cache.contains_key(&1) && cache.contains_key(&3));
        assert!(!cache.contains_key(&2));
        assert_eq!(
            common::LIVE.load(Ordering::SeqCst) - base,
            2,
            "values 0 and 3 live in the cache"
        );
    }
    assert_eq!(
        common::LIVE.load(Ordering::SeqCst),
        base,
        "a value leaked or dropped twice"
    );
}

/// Observation: does a shared `try_get_with_async_shared` / `optionally_get_with_async_shared`
/// with the remembered error's type take the remembered answer or load? (Printed.)
#[test]
fn observe_shared_try_and_optionally_over_a_matching_negative_entry() {
    let _w = watchdog(T, "observe");
    let (_clock, calls, cache) = remembered();
    let r = futures::executor::block_on(
        cache.try_get_with_async_shared(1, async { Ok::<u32, BoxError>(5) }),
    );
    eprintln!(
        "try_get_with_async_shared over a remembered BoxError: {r:?}, backend calls {}",
        calls.load(Ordering::SeqCst)
    );
    ledger(&cache, "observe try");
    let cache2: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .negative_ttl(Duration::from_secs(10))
        .record_stats()
        .build();
    assert_eq!(cache2.optionally_get_with(1, || None), None);
    let r =
        futures::executor::block_on(cache2.optionally_get_with_async_shared(1, async { Some(5) }));
    eprintln!("optionally_get_with_async_shared over a remembered None: {r:?}");
    ledger(&cache2, "observe optionally");
}
