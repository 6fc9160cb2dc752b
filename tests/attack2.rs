//! Adversarial tests from the public API (second attack round): mixes of sync and async callers,
//! cancellation at every poll, cross-key recursion, writes racing loads, hostile user code.
//! The one `#[ignore]`d test reproduces a documented limitation (a cycle of loads across threads).

#![cfg(not(loom))]

mod common;

use common::{eventually, quiet_injected_panics, start, watchdog, within, Yield};
use herdcache::{BoxError, Cache, CompResult, Expiry, LoadError, ManualClock, Op, RemovalCause};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

/// Polls `f` once with a no-op waker.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    f.poll(&mut cx)
}

/// Polls `f` up to `n` times (no-op waker); its output if it completed.
/// Polls until ready, pausing a millisecond between polls, for up to `limit`: for a future
/// that waits on another thread (how many polls that takes depends on the scheduler).
fn poll_until<F: Future + ?Sized>(mut f: Pin<&mut F>, limit: Duration) -> Option<F::Output> {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if let Poll::Ready(v) = poll_once(f.as_mut()) {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn poll_n<F: Future + ?Sized>(mut f: Pin<&mut F>, n: usize) -> Option<F::Output> {
    for _ in 0..n {
        if let Poll::Ready(v) = poll_once(f.as_mut()) {
            return Some(v);
        }
    }
    None
}

fn check_fresh<S>(cache: &Cache<u32, u64, S>, keys: &[u32])
where
    S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
{
    assert_eq!(cache.loads_in_flight(), 0, "a key was left loading");
    cache.validate();
    for &k in keys {
        let c = cache.clone();
        let r = within(Duration::from_secs(5), move || {
            c.invalidate(&k);
            c.get_with(k, || 777)
        });
        match r {
            Some(Ok(v)) => assert_eq!(v, 777, "key {k}"),
            Some(Err(_)) => panic!("fresh get_with of {k} panicked"),
            None => panic!("fresh get_with of {k} hung"),
        }
    }
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// ---------------------------------------------------------------------------------------------
// Recursion across keys
// ---------------------------------------------------------------------------------------------

/// A's init loads B whose init loads A, on one thread: the recursion on A must panic, not hang.
#[test]
fn same_thread_cycle_a_b_a_panics() {
    let _w = watchdog(LIMIT, "same_thread_cycle_a_b_a_panics");
    quiet_injected_panics();
    let cache: Cache<u32, u64> = Cache::new(100);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with(1, || cache.get_with(2, || cache.get_with(1, || 3)))
    }));
    assert!(r.is_err(), "recursion through another key must panic");
    check_fresh(&cache, &[1, 2]);
}

/// Same, async: A's init awaits B whose init awaits A.
#[test]
fn same_task_cycle_a_b_a_async_panics() {
    let _w = watchdog(LIMIT, "same_task_cycle_a_b_a_async_panics");
    let cache: Cache<u32, u64> = Cache::new(100);
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(cache.get_with_async(1, async {
            cache
                .get_with_async(2, async { cache.get_with_async(1, async { 3 }).await })
                .await
        }))
    }));
    assert!(r.is_err(), "async recursion through another key must panic");
    check_fresh(&cache, &[1, 2]);
}

/// Mixed: a blocking A whose init awaits B (block_on) whose init asks A with get_with.
#[test]
fn same_thread_cycle_sync_async_sync_panics() {
    let _w = watchdog(LIMIT, "same_thread_cycle_sync_async_sync_panics");
    let cache: Cache<u32, u64> = Cache::new(100);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with(1, || {
            futures::executor::block_on(cache.get_with_async(2, async { cache.get_with(1, || 3) }))
        })
    }));
    assert!(r.is_err(), "recursion through another key must panic");
    check_fresh(&cache, &[1, 2]);
}

/// Two threads: T1 leads A and asks B inside; T2 leads B and asks A inside. A classic lock-order
/// cycle between two single-flight loads.
#[test]
#[ignore = "a known limitation, documented on get_with: two threads loading A->B and B->A wait for each other forever (threads are leaked)"]
fn two_thread_cycle_a_b() {
    let cache: Cache<u32, u64> = Cache::new(100);
    let both = Arc::new(Barrier::new(2));
    let (c1, b1) = (cache.clone(), both.clone());
    let t1 = start(move || {
        c1.get_with(1, || {
            b1.wait();
            c1.get_with(2, || 12) + 1
        })
    });
    let (c2, b2) = (cache.clone(), both.clone());
    let t2 = start(move || {
        c2.get_with(2, || {
            b2.wait();
            c2.get_with(1, || 21) + 1
        })
    });
    let r1 = t1.wait(Duration::from_secs(5));
    let r2 = t2.wait(Duration::from_secs(1));
    assert!(
        r1.is_some() && r2.is_some(),
        "A->B / B->A on two threads did not finish (deadlock): t1 {:?}, t2 {:?}, in flight {}",
        r1.is_some(),
        r2.is_some(),
        cache.loads_in_flight()
    );
}

// ---------------------------------------------------------------------------------------------
// max_concurrent_loads(1) and nesting
// ---------------------------------------------------------------------------------------------

#[test]
fn limit1_nested_every_direction() {
    let _w = watchdog(LIMIT, "limit1_nested_every_direction");
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .build();
    // sync in sync
    assert_eq!(cache.get_with(1, || cache.get_with(2, || 2) + 1), 3);
    // async in async
    let v = futures::executor::block_on(
        cache.get_with_async(3, async { cache.get_with_async(4, async { 4 }).await + 1 }),
    );
    assert_eq!(v, 5);
    // sync in async
    let v =
        futures::executor::block_on(cache.get_with_async(5, async { cache.get_with(6, || 6) + 1 }));
    assert_eq!(v, 7);
    // async in sync
    let v = cache.get_with(7, || {
        futures::executor::block_on(cache.get_with_async(8, async { 8 })) + 1
    });
    assert_eq!(v, 9);
    // shared in sync, sync in shared
    let c = cache.clone();
    let v = futures::executor::block_on(
        cache.get_with_async_shared(9, async move { c.get_with(10, || 10) + 1 }),
    );
    assert_eq!(v, 11);
    // get_all in get_with, compute in get_with, get_with in compute
    let v = cache.get_with(11, || {
        let m = cache.get_all([12, 13], |ks| ks.iter().map(|&k| (k, k as u64)).collect());
        m.len() as u64
    });
    assert_eq!(v, 2);
    let v = cache.get_with(14, || {
        cache.entry(15).and_upsert_with(|_| 15);
        cache.get(&15).unwrap() + 1
    });
    assert_eq!(v, 16);
    let r = cache
        .entry(16)
        .and_compute_with(|_| Op::Put(cache.get_with(17, || 17) + 1));
    assert!(matches!(r, CompResult::Inserted(_)));
    assert_eq!(cache.get(&16), Some(18));
    // compute_async with a nested async load
    let r = futures::executor::block_on(cache.entry(18).and_compute_with_async(|_| async {
        Op::Put(cache.get_with_async(19, async { 19 }).await + 1)
    }));
    assert!(matches!(r, CompResult::Inserted(_)));
    assert!(
        cache.load_limit_stats().0 <= 1,
        "{:?}",
        cache.load_limit_stats()
    );
    // The permit came back: a fresh load on another thread runs.
    let c = cache.clone();
    assert!(matches!(
        within(Duration::from_secs(5), move || c.get_with(99, || 99)),
        Some(Ok(99))
    ));
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// Under the limit of 1: T1 holds the permit (leading A) and, inside, asks B; meanwhile T2 has
/// claimed B as leader and waits for the permit. T1 joins T2's load of B, which waits for T1's
/// permit: does it deadlock?
#[test]
fn limit1_two_threads_nested_join_of_waiting_leader() {
    nested_join_of_waiting_leader(
        Cache::builder()
            .max_capacity(100)
            .max_concurrent_loads(1)
            .build(),
    );
}

/// Control: the same schedule without a load limit finishes.
#[test]
fn no_limit_two_threads_nested_join_of_other_leader() {
    nested_join_of_waiting_leader(Cache::builder().max_capacity(100).build());
}

fn nested_join_of_waiting_leader(cache: Cache<u32, u64>) {
    let go = Arc::new(AtomicBool::new(false));
    let (c1, g1) = (cache.clone(), go.clone());
    let t1 = start(move || {
        c1.get_with(1, || {
            while !g1.load(SeqCst) {
                std::thread::yield_now();
            }
            c1.get_with(2, || 12) + 1
        })
    });
    assert!(eventually(|| cache.loads_in_flight() == 1));
    let c2 = cache.clone();
    let t2 = start(move || c2.get_with(2, || 22));
    // Give T2 time to claim B and queue for the permit (without a limit it just finishes).
    assert!(eventually(
        || cache.loads_in_flight() == 2 || cache.contains_key(&2)
    ));
    std::thread::sleep(Duration::from_millis(50));
    go.store(true, SeqCst);
    let r1 = t1.wait(Duration::from_secs(5));
    let r2 = t2.wait(Duration::from_secs(1));
    assert!(
        matches!(r1, Some(Ok(_))) && matches!(r2, Some(Ok(_))),
        "deadlock or panic: t1 {:?} t2 {:?} in flight {}",
        r1.as_ref().map(|r| r.as_ref().ok().copied()),
        r2.as_ref().map(|r| r.as_ref().ok().copied()),
        cache.loads_in_flight()
    );
    let (a, b) = (r1.unwrap().unwrap(), r2.unwrap().unwrap());
    assert_eq!(b, cache.get(&2).unwrap());
    assert_eq!(a, b + 1);
    cache.validate();
}

/// Same shape, async: T1 holds the permit in an async load and awaits B, which another thread
/// claimed (blocking) and is waiting for the permit.
#[test]
fn limit1_async_holder_joins_waiting_sync_leader() {
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .build();
    let go = Arc::new(AtomicBool::new(false));
    let (c1, g1) = (cache.clone(), go.clone());
    let t1 = start(move || {
        futures::executor::block_on(c1.get_with_async(1, async {
            while !g1.load(SeqCst) {
                Yield(1).await;
                std::thread::yield_now();
            }
            c1.get_with_async(2, async { 12 }).await + 1
        }))
    });
    assert!(eventually(|| cache.loads_in_flight() == 1));
    let c2 = cache.clone();
    let t2 = start(move || c2.get_with(2, || 22));
    assert!(eventually(|| cache.loads_in_flight() == 2));
    std::thread::sleep(Duration::from_millis(50));
    go.store(true, SeqCst);
    let r1 = t1.wait(Duration::from_secs(5));
    let r2 = t2.wait(Duration::from_secs(1));
    assert!(
        matches!(r1, Some(Ok(_))) && matches!(r2, Some(Ok(_))),
        "deadlock or panic: t1 {:?} t2 {:?}",
        r1.is_some(),
        r2.is_some()
    );
    cache.validate();
}

// ---------------------------------------------------------------------------------------------
// Async: abandoned / unpolled leaders, cancellation at every poll
// ---------------------------------------------------------------------------------------------

/// A get_with_async leader polled once and then held (never polled, never dropped): a blocking
/// caller waits (documented: it never polls another caller's future); when the leader is
/// dropped, the blocking caller runs its own init promptly.
#[test]
fn unpolled_async_leader_blocks_sync_caller_until_dropped() {
    let _w = watchdog(
        LIMIT,
        "unpolled_async_leader_blocks_sync_caller_until_dropped",
    );
    let cache: Cache<u32, u64> = Cache::new(100);
    let mut leader = Box::pin(cache.get_with_async(1, async {
        Yield(1).await;
        100
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    assert_eq!(cache.loads_in_flight(), 1);
    let c = cache.clone();
    let waiter = start(move || c.get_with(1, || 200));
    std::thread::sleep(Duration::from_millis(150));
    // Still waiting (legitimate: the async caller of the load is alive).
    drop(leader);
    match waiter.wait(Duration::from_secs(5)) {
        Some(Ok(v)) => assert_eq!(v, 200, "the blocking caller runs its own init"),
        other => panic!(
            "blocking caller after the leader was dropped: {:?}",
            other.is_some()
        ),
    }
    assert_eq!(cache.get(&1), Some(200));
    check_fresh(&cache, &[1]);
}

/// With get_with_async_shared, an async waiter drives a leader that is polled once and then
/// never again; the leader, polled later, sees the finished value.
#[test]
fn shared_waiter_drives_unpolled_leader() {
    let _w = watchdog(LIMIT, "shared_waiter_drives_unpolled_leader");
    let cache: Cache<u32, u64> = Cache::new(100);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
        r.fetch_add(1, SeqCst);
        Yield(3).await;
        100
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    let v = futures::executor::block_on(cache.get_with_async_shared(1, async { 200 }));
    assert_eq!(v, 100, "the waiter finished the leader's load");
    assert_eq!(poll_n(leader.as_mut(), 10), Some(100));
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// A non-shared async waiter of an unpolled (but alive) get_with_async leader: it cannot poll the
/// leader's borrowed future. Document what happens: it waits until the leader is dropped.
#[test]
fn borrowed_waiter_of_unpolled_leader_waits_then_loads() {
    let _w = watchdog(LIMIT, "borrowed_waiter_of_unpolled_leader_waits_then_loads");
    let cache: Cache<u32, u64> = Cache::new(100);
    let mut leader = Box::pin(cache.get_with_async(1, async {
        Yield(5).await;
        100
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    let mut waiter = Box::pin(cache.get_with_async(1, async { 200 }));
    assert!(
        poll_n(waiter.as_mut(), 20).is_none(),
        "waits while the leader is alive"
    );
    drop(leader);
    assert_eq!(poll_n(waiter.as_mut(), 20), Some(200));
    assert_eq!(cache.get(&1), Some(200));
    assert_eq!(cache.loads_in_flight(), 0);
}

/// Leader polled n times then dropped (n = 0..8), with an async waiter (borrowed and shared
/// variants) and a sync waiter. Every caller gets a value, the cached value is one a caller
/// returned, nothing is left loading.
#[test]
fn cancel_leader_at_every_poll_mixed_waiters() {
    let _w = watchdog(LIMIT, "cancel_leader_at_every_poll_mixed_waiters");
    for shared in [false, true] {
        for n in 0..8usize {
            let cache: Cache<u32, u64> = Cache::new(100);
            let leader_runs = Arc::new(AtomicUsize::new(0));
            let lr = leader_runs.clone();
            let fut_leader = async move {
                lr.fetch_add(1, SeqCst);
                Yield(4).await;
                100u64
            };
            let mut leader: Pin<Box<dyn Future<Output = u64>>> = if shared {
                Box::pin(cache.get_with_async_shared(1, fut_leader))
            } else {
                Box::pin(cache.get_with_async(1, fut_leader))
            };
            let mut waiter: Pin<Box<dyn Future<Output = u64>>> = if shared {
                Box::pin(cache.get_with_async_shared(1, async {
                    Yield(2).await;
                    200
                }))
            } else {
                Box::pin(cache.get_with_async(1, async {
                    Yield(2).await;
                    200
                }))
            };
            let mut leader_out = None;
            let mut waiter_out = None;
            for _ in 0..n {
                if leader_out.is_none() {
                    if let Poll::Ready(v) = poll_once(leader.as_mut()) {
                        leader_out = Some(v);
                    }
                }
                if waiter_out.is_none() {
                    if let Poll::Ready(v) = poll_once(waiter.as_mut()) {
                        waiter_out = Some(v);
                    }
                }
            }
            let c = cache.clone();
            let sync = start(move || c.get_with(1, || 300));
            std::thread::sleep(Duration::from_millis(20));
            drop(leader);
            if waiter_out.is_none() {
                // The waiter may have joined the sync caller's load (its thread then publishes).
                waiter_out = poll_until(waiter.as_mut(), Duration::from_secs(5));
            }
            let w = waiter_out.unwrap_or_else(|| panic!("shared {shared} n {n}: waiter stuck"));
            let s = match sync.wait(Duration::from_secs(5)) {
                Some(Ok(v)) => v,
                _ => panic!("shared {shared} n {n}: sync caller stuck"),
            };
            let cached = cache.get(&1).expect("cached");
            assert!(
                [Some(cached)].contains(&Some(w)) || [100, 200, 300].contains(&w),
                "shared {shared} n {n}"
            );
            assert_eq!(
                s, cached,
                "shared {shared} n {n}: sync caller got {s}, cached {cached}"
            );
            if let Some(l) = leader_out {
                assert_eq!(l, 100);
            }
            assert_eq!(cache.loads_in_flight(), 0, "shared {shared} n {n}");
            cache.validate();
        }
    }
}

/// Many async callers on one key, each polled a random number of times and dropped at random,
/// interleaved on one thread; the last survivor must finish.
#[test]
fn random_cancellation_storm_single_thread() {
    let _w = watchdog(LIMIT, "random_cancellation_storm_single_thread");
    let mut rnd = common::rng(0x9e3779b97f4a7c15);
    for round in 0..200 {
        let cache: Cache<u32, u64> = Cache::new(100);
        let mut futs: Vec<Option<Pin<Box<dyn Future<Output = u64> + '_>>>> = Vec::new();
        for i in 0..6u64 {
            let y = (rnd() % 4) as u32;
            let f: Pin<Box<dyn Future<Output = u64> + '_>> = match rnd() % 3 {
                0 => Box::pin(cache.get_with_async(1, async move {
                    Yield(y).await;
                    i
                })),
                1 => Box::pin(cache.get_with_async_shared(1, async move {
                    Yield(y).await;
                    i
                })),
                _ => Box::pin({
                    let cache = &cache;
                    async move {
                        cache
                            .try_get_with_async(1, async move {
                                Yield(y).await;
                                if i == 3 {
                                    Err("injected")
                                } else {
                                    Ok(i)
                                }
                            })
                            .await
                            .unwrap_or(999)
                    }
                }),
            };
            futs.push(Some(f));
        }
        let survivor = (rnd() % 6) as usize;
        for _step in 0..200 {
            let i = (rnd() % 6) as usize;
            if let Some(f) = futs[i].as_mut() {
                if i != survivor && rnd() % 5 == 0 {
                    futs[i] = None;
                    continue;
                }
                if poll_once(f.as_mut()).is_ready() {
                    futs[i] = None;
                }
            }
        }
        if let Some(f) = futs[survivor].as_mut() {
            assert!(
                poll_n(f.as_mut(), 500).is_some(),
                "round {round}: survivor stuck"
            );
        }
        drop(futs);
        assert_eq!(cache.loads_in_flight(), 0, "round {round}");
        cache.validate();
    }
}

// ---------------------------------------------------------------------------------------------
// Writes win
// ---------------------------------------------------------------------------------------------

/// A load in flight; `invalidate` (or `insert`, or `invalidate_all`) returns; a caller that starts
/// afterwards must not receive the in-flight (older) load's value, and the old load must not be
/// cached.
#[test]
fn write_during_sync_load_wins() {
    let _w = watchdog(LIMIT, "write_during_sync_load_wins");
    for how in 0..3 {
        let cache: Cache<u32, u64> = Cache::new(100);
        let started = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let (c, s, r) = (cache.clone(), started.clone(), release.clone());
        let leader = start(move || {
            c.get_with(1, || {
                s.wait();
                r.wait();
                100
            })
        });
        started.wait();
        match how {
            0 => cache.invalidate(&1),
            1 => cache.insert(1, 50),
            _ => cache.invalidate_all(),
        }
        // A caller that starts now must not join the old load.
        let c = cache.clone();
        let late = within(Duration::from_secs(5), move || c.get_with(1, || 200));
        let late = match late {
            Some(Ok(v)) => v,
            _ => panic!("how {how}: late caller joined the old load (hung)"),
        };
        release.wait();
        let l = leader.wait(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(l, 100, "how {how}");
        match how {
            1 => assert_eq!(late, 50, "how {how}"),
            _ => assert_eq!(late, 200, "how {how}"),
        }
        assert_eq!(
            cache.get(&1),
            Some(late),
            "how {how}: the old load overwrote a newer write"
        );
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

/// Same with the builder loader (`load`), an async loader (`load_async`) and `get_all`.
#[test]
fn write_during_loader_and_get_all_wins() {
    let _w = watchdog(LIMIT, "write_during_loader_and_get_all_wins");
    for how in 0..3 {
        for kind in 0..3 {
            let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
            let entered = Arc::new(AtomicUsize::new(0));
            let (g, e) = (gate.clone(), entered.clone());
            let wait_gate = move || {
                e.fetch_add(1, SeqCst);
                let (m, cv) = &*g;
                let mut open = m.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            };
            let wg = wait_gate.clone();
            let cache: Cache<u32, u64> = Cache::builder()
                .max_capacity(100)
                .loader(move |_k: &u32| {
                    wg();
                    Ok::<_, BoxError>(100)
                })
                .build();
            let c = cache.clone();
            let wg = wait_gate.clone();
            let leader = start(move || match kind {
                0 => c.load(1).unwrap(),
                1 => c.get_all([1], |_| {
                    wg();
                    HashMap::from([(1, 100)])
                })[&1],
                _ => c.get_with(1, || {
                    wg();
                    100
                }),
            });
            assert!(eventually(|| entered.load(SeqCst) == 1));
            match how {
                0 => cache.invalidate(&1),
                1 => cache.insert(1, 50),
                _ => cache.invalidate_all(),
            }
            let c = cache.clone();
            let late = within(Duration::from_secs(5), move || c.get_with(1, || 200));
            let late = match late {
                Some(Ok(v)) => v,
                _ => panic!("how {how} kind {kind}: late caller hung (joined the old load?)"),
            };
            {
                let (m, cv) = &*gate;
                *m.lock().unwrap() = true;
                cv.notify_all();
            }
            assert_eq!(leader.wait(Duration::from_secs(5)).unwrap().unwrap(), 100);
            let want = if how == 1 { 50 } else { 200 };
            assert_eq!(late, want, "how {how} kind {kind}");
            assert_eq!(
                cache.get(&1),
                Some(want),
                "how {how} kind {kind}: overwritten"
            );
            // load() after the write must not see the old value either.
            assert_eq!(cache.load(1).unwrap(), want);
            assert_eq!(cache.loads_in_flight(), 0);
            cache.validate();
        }
    }
}

/// A compute in progress; an insert completes; the compute's Put must not be stored (docs).
#[test]
fn insert_during_compute_wins() {
    let _w = watchdog(LIMIT, "insert_during_compute_wins");
    let cache: Cache<u32, u64> = Cache::new(100);
    cache.insert(1, 1);
    let r = cache.entry(1).and_compute_with(|_| {
        cache.insert(1, 50);
        Op::Put(2)
    });
    assert!(matches!(r, CompResult::ReplacedWith(_)));
    assert_eq!(cache.get(&1), Some(50));
    let r = cache.entry(1).and_compute_with(|_| {
        cache.invalidate(&1);
        Op::Put(3)
    });
    let _ = r;
    assert_eq!(cache.get(&1), None, "invalidate during compute must win");
    cache.validate();
}

/// A refresh claimed by a read, run late by the spawner after an insert/invalidate: its value must
/// not be stored.
#[test]
fn late_refresh_job_loses_to_write() {
    let _w = watchdog(LIMIT, "late_refresh_job_loses_to_write");
    for how in 0..3 {
        let clock = ManualClock::new();
        #[allow(clippy::type_complexity)]
        let jobs: Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>> = Arc::default();
        let j = jobs.clone();
        let gen = Arc::new(AtomicU64::new(100));
        let g = gen.clone();
        let cache: Cache<u32, u64> = Cache::builder()
            .max_capacity(100)
            .clock(clock.clone())
            .refresh_after(Duration::from_secs(10))
            .loader(move |_k: &u32| Ok::<_, BoxError>(g.fetch_add(1, SeqCst)))
            .spawner(move |job| j.lock().unwrap().push(job))
            .build();
        assert_eq!(cache.load(1).unwrap(), 100);
        clock.advance(Duration::from_secs(11));
        assert_eq!(cache.get(&1), Some(100));
        let n = jobs.lock().unwrap().len();
        assert_eq!(n, 1, "one refresh job");
        match how {
            0 => cache.insert(1, 50),
            1 => cache.invalidate(&1),
            _ => cache.invalidate_all(),
        }
        let job = jobs.lock().unwrap().pop().unwrap();
        job();
        let want = if how == 0 { Some(50) } else { None };
        assert_eq!(
            cache.get(&1),
            want,
            "how {how}: a late refresh overwrote a write"
        );
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

/// A spawner that drops every job (or runs it on drop of a holder, late): keys are never left
/// loading and the next read retries.
#[test]
fn spawner_drops_jobs_refresh_and_timeout_load() {
    let _w = watchdog(LIMIT, "spawner_drops_jobs_refresh_and_timeout_load");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(10))
        .load_timeout(Duration::from_millis(200))
        .loader(move |k: &u32| {
            c2.fetch_add(1, SeqCst);
            Ok::<_, BoxError>(*k as u64)
        })
        .spawner(drop)
        .build();
    // A load with a timeout and a spawner that drops: falls back to running in the caller.
    assert_eq!(cache.load(1).unwrap(), 1);
    assert_eq!(cache.loads_in_flight(), 0);
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "dropped refresh job left the key loading"
    );
    assert_eq!(cache.load(2).unwrap(), 2);
    cache.validate();
    check_fresh(&cache, &[1, 2]);
}

// ---------------------------------------------------------------------------------------------
// Panicking loader: LoadError::Panicked, no storm
// ---------------------------------------------------------------------------------------------

#[test]
fn panicking_loader_is_called_once_for_all_waiters() {
    let _w = watchdog(LIMIT, "panicking_loader_is_called_once_for_all_waiters");
    quiet_injected_panics();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .loader(move |_k: &u32| -> Result<u64, BoxError> {
            c2.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            panic!("injected loader panic")
        })
        .build();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = cache.clone();
            start(move || c.load(1))
        })
        .collect();
    let mut outs = Vec::new();
    for t in threads {
        match t.wait(Duration::from_secs(10)) {
            Some(Ok(r)) => outs.push(r),
            Some(Err(_)) => panic!("load() let the loader's panic escape"),
            None => panic!("load() hung"),
        }
    }
    for r in &outs {
        assert!(matches!(r, Err(LoadError::Panicked)), "{r:?}");
    }
    assert_eq!(
        calls.load(SeqCst),
        1,
        "the loader ran once per load, not per caller"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// An async loader that panics: every async and blocking caller gets Panicked.
#[test]
fn panicking_async_loader_mixed_callers() {
    let _w = watchdog(LIMIT, "panicking_async_loader_mixed_callers");
    quiet_injected_panics();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .loader(|_k: &u32| -> Result<u64, BoxError> { panic!("injected sync loader panic") })
        .async_loader(move |_k: &u32| {
            c2.fetch_add(1, SeqCst);
            async move {
                Yield(3).await;
                if true {
                    panic!("injected async loader panic");
                }
                Ok::<u64, BoxError>(1)
            }
        })
        .build();
    let mut a = Box::pin(cache.load_async(1));
    let mut b = Box::pin(cache.load_async(1));
    assert!(poll_once(a.as_mut()).is_pending());
    assert!(poll_once(b.as_mut()).is_pending());
    let ra = catch_unwind(AssertUnwindSafe(|| poll_n(a.as_mut(), 20)));
    let rb = catch_unwind(AssertUnwindSafe(|| poll_n(b.as_mut(), 20)));
    assert!(matches!(ra, Ok(Some(Err(LoadError::Panicked)))), "{ra:?}");
    assert!(matches!(rb, Ok(Some(Err(LoadError::Panicked)))), "{rb:?}");
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// ---------------------------------------------------------------------------------------------
// Hostile user code: weigher, expiry, Clone, Hash
// ---------------------------------------------------------------------------------------------

#[test]
fn weigher_zero_and_huge() {
    let _w = watchdog(LIMIT, "weigher_zero_and_huge");
    let removed = Arc::new(Mutex::new(Vec::<(u32, RemovalCause)>::new()));
    let r = removed.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k, v: &u64| match *v {
            0 => 0,
            1 => u32::MAX,
            n => n as u32,
        })
        .eviction_listener(move |k, _v, c| r.lock().unwrap().push((*k, c)))
        .build();
    // Too heavy: returned to the caller, not stored, reported once (Size).
    assert_eq!(cache.get_with(1, || 1), 1);
    assert_eq!(cache.get(&1), None);
    assert_eq!(cache.weighted_size(), 0);
    cache.insert(2, 1);
    assert_eq!(cache.get(&2), None);
    // Weight 0 entries.
    for k in 10..1010 {
        cache.insert(k, 0);
    }
    cache.insert(5, 60);
    cache.insert(6, 60); // over capacity with 5
    cache.run_pending_tasks();
    cache.validate();
    let sum: u64 = cache
        .iter()
        .map(|(_, v)| match v {
            0 => 0,
            1 => u32::MAX as u64,
            n => n,
        })
        .sum();
    assert_eq!(cache.weighted_size(), sum);
    assert!(cache.weighted_size() <= 100);
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    let rem = removed.lock().unwrap();
    let stored = cache.entry_count() as usize;
    assert_eq!(
        rem.len() + stored,
        2 + 1000 + 2,
        "every entry ends reported or stored"
    );
    let mut seen = std::collections::HashSet::new();
    for (k, _) in rem.iter() {
        assert!(seen.insert(*k), "key {k} reported twice");
        assert!(cache.get(k).is_none() || *k == 5 || *k == 6);
    }
}

struct ZeroOrMax;
impl Expiry<u32, u64> for ZeroOrMax {
    fn expire_after_create(&self, k: &u32, _v: &u64) -> Option<Duration> {
        Some(if *k % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::MAX
        })
    }
    fn expire_after_read(&self, k: &u32, _v: &u64, r: Option<Duration>) -> Option<Duration> {
        if *k == 3 {
            Some(Duration::ZERO)
        } else {
            r
        }
    }
    fn expire_after_update(&self, _k: &u32, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        Some(Duration::MAX)
    }
}

#[test]
fn expiry_zero_and_max() {
    let _w = watchdog(LIMIT, "expiry_zero_and_max");
    let clock = ManualClock::new();
    let removed = Arc::new(Mutex::new(Vec::<(u32, RemovalCause)>::new()));
    let r = removed.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(ZeroOrMax)
        .clock(clock.clone())
        .eviction_listener(move |k, _v, c| r.lock().unwrap().push((*k, c)))
        .build();
    assert_eq!(cache.get_with(2, || 2), 2);
    assert_eq!(cache.get(&2), None, "ZERO lifetime: not visible");
    assert_eq!(cache.get_with(1, || 1), 1);
    assert_eq!(cache.get_with(3, || 3), 3);
    assert_eq!(cache.get(&3), Some(3), "read with remaining MAX");
    assert_eq!(cache.get(&3), None, "expire_after_read ZERO");
    clock.advance(Duration::MAX);
    assert_eq!(cache.get(&1), Some(1), "MAX lifetime survives any advance");
    cache.insert(1, 11); // update: MAX
    assert_eq!(cache.get(&1), Some(11));
    cache.run_pending_tasks();
    cache.validate();
    let rem = removed.lock().unwrap().clone();
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for (k, _) in &rem {
        *counts.entry(*k).or_default() += 1;
    }
    assert_eq!(counts.get(&2), Some(&1), "{rem:?}");
    assert_eq!(counts.get(&3), Some(&1), "{rem:?}");
    assert_eq!(counts.get(&1), Some(&1), "replaced once {rem:?}");
    assert_eq!(cache.entry_count(), 1);
}

/// A key whose Hash is different on every call (inconsistent with Eq): other keys must stay
/// intact and the cache consistent.
#[derive(Clone, Debug, PartialEq, Eq)]
enum K {
    Good(u32),
    Bad(u32),
}
static BAD_HASH: AtomicU64 = AtomicU64::new(0);
impl Hash for K {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match self {
            K::Good(n) => n.hash(h),
            K::Bad(_) => BAD_HASH.fetch_add(1, SeqCst).hash(h),
        }
    }
}

#[test]
fn inconsistent_hash_does_not_corrupt_other_keys() {
    let _w = watchdog(LIMIT, "inconsistent_hash_does_not_corrupt_other_keys");
    let removed = Arc::new(AtomicUsize::new(0));
    let r = removed.clone();
    let cache: Cache<K, u64> = Cache::builder()
        .max_capacity(50)
        .eviction_listener(move |_k, _v, _c| {
            r.fetch_add(1, SeqCst);
        })
        .build();
    for i in 0..20 {
        cache.insert(K::Good(i), i as u64);
    }
    for round in 0..200u32 {
        let b = K::Bad(round % 5);
        let _ = cache.get_with(b.clone(), || 1000);
        cache.insert(b.clone(), 2000);
        let _ = cache.get(&b);
        cache.invalidate(&b);
        cache.entry(b.clone()).and_upsert_with(|_| 3);
        let _ = futures::executor::block_on(cache.get_with_async(b.clone(), async { 4 }));
        let _ = cache.get_all([b.clone(), K::Good(1)], |ks| {
            ks.iter().map(|k| (k.clone(), 5)).collect()
        });
    }
    assert_eq!(cache.loads_in_flight(), 0);
    // (No `validate()` here: it looks every key up by its hash, and a bad key present cannot be
    // found that way — by its nature, not by a broken invariant.)
    // Good keys that are still present have their own values.
    for i in 0..20 {
        if let Some(v) = cache.get(&K::Good(i)) {
            assert_eq!(v, i as u64, "good key {i} corrupted");
        }
    }
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.invalidate_all();
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
}

// ---------------------------------------------------------------------------------------------
// Multi-thread stress with seeded random panics
// ---------------------------------------------------------------------------------------------

static VID: AtomicU64 = AtomicU64::new(1);
static STRESS_ON: AtomicBool = AtomicBool::new(false);

/// A value with a unique id; Clone panics when its id is divisible by 97 (while armed).
#[derive(Debug)]
struct V {
    id: u64,
    w: u32,
}
impl V {
    fn new(w: u32) -> V {
        V {
            id: VID.fetch_add(1, SeqCst),
            w,
        }
    }
}
impl Clone for V {
    fn clone(&self) -> Self {
        if STRESS_ON.load(SeqCst) && self.id % 97 == 0 {
            panic!("injected clone panic");
        }
        V {
            id: self.id,
            w: self.w,
        }
    }
}

#[test]
fn stress_random_panics_exact_accounting() {
    let _w = watchdog(
        Duration::from_secs(60),
        "stress_random_panics_exact_accounting",
    );
    quiet_injected_panics();
    let clock = ManualClock::new();
    let reported = Arc::new(Mutex::new(HashMap::<u64, usize>::new()));
    let rep = reported.clone();
    let cache: Cache<u32, V> = Cache::builder()
        .max_capacity(200)
        .shards(4)
        .clock(clock.clone())
        .time_to_live(Duration::from_secs(5))
        .max_concurrent_loads(2)
        .weigher(|k: &u32, v: &V| {
            if STRESS_ON.load(SeqCst) && *k == 13 && v.id % 3 == 0 {
                panic!("injected weigher panic");
            }
            v.w
        })
        .eviction_listener(move |_k, v: &V, _c| {
            *rep.lock().unwrap().entry(v.id).or_default() += 1;
        })
        .build();
    STRESS_ON.store(true, SeqCst);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = cache.clone();
            let clock = clock.clone();
            std::thread::spawn(move || {
                let mut rnd =
                    common::rng(0x2545F4914F6CDD1Du64 ^ (t + 1).wrapping_mul(0x9E3779B97F4A7C15));
                for _ in 0..3000 {
                    let k = (rnd() % 24) as u32;
                    let w = (rnd() % 30) as u32;
                    let boom = rnd() % 10 == 0;
                    let op = rnd() % 12;
                    let _ =
                        catch_unwind(AssertUnwindSafe(|| match op {
                            0 => {
                                cache.get_with(k, || {
                                    if boom {
                                        panic!("injected init panic");
                                    }
                                    V::new(w)
                                });
                            }
                            1 => cache.insert(k, V::new(w)),
                            2 => cache.invalidate(&k),
                            3 => {
                                let _ = cache.get(&k);
                            }
                            4 => {
                                futures::executor::block_on(cache.get_with_async(k, async {
                                    Yield(1).await;
                                    if boom {
                                        panic!("injected async init panic");
                                    }
                                    V::new(w)
                                }));
                            }
                            5 => {
                                cache.entry(k).and_compute_with(|e| {
                                    if boom {
                                        panic!("injected compute panic");
                                    }
                                    match e {
                                        Some(_) if w % 2 == 0 => Op::Remove,
                                        _ => Op::Put(V::new(w)),
                                    }
                                });
                            }
                            6 => {
                                let _ = cache.get_all([k, (k + 1) % 24, (k + 7) % 24], |ks| {
                                    if boom {
                                        panic!("injected get_all panic");
                                    }
                                    ks.iter().map(|&k| (k, V::new(w))).collect()
                                });
                            }
                            7 => {
                                if rnd() % 50 == 0 {
                                    cache.invalidate_all();
                                }
                            }
                            8 => {
                                if t == 0 {
                                    clock.advance(Duration::from_millis(500));
                                }
                            }
                            9 => cache.retain(|_k, v| {
                                if boom && v.id % 5 == 0 {
                                    panic!("injected retain panic");
                                }
                                v.w % 7 != 0
                            }),
                            10 => {
                                // A borrowed async load cancelled after one poll.
                                let mut f = Box::pin(cache.get_with_async(k, async {
                                    Yield(2).await;
                                    V::new(w)
                                }));
                                let _ = poll_once(f.as_mut());
                            }
                            _ => {
                                let _ = cache.try_get_with(k, || {
                                    if boom {
                                        Err("no")
                                    } else {
                                        Ok(V::new(w))
                                    }
                                });
                            }
                        }));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    STRESS_ON.store(false, SeqCst);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    cache.run_pending_tasks();
    let entries: Vec<(u32, V)> = cache.iter().map(|(k, v)| (k, v.clone())).collect();
    assert_eq!(cache.entry_count(), entries.len() as u64);
    assert_eq!(
        cache.weighted_size(),
        entries.iter().map(|(_, v)| v.w as u64).sum::<u64>()
    );
    assert!(cache.weighted_size() <= 200);
    let rep = reported.lock().unwrap().clone();
    for (id, n) in &rep {
        assert_eq!(*n, 1, "value {id} reported {n} times");
    }
    for (k, v) in &entries {
        assert!(
            !rep.contains_key(&v.id),
            "key {k}: value {} still cached but reported removed",
            v.id
        );
    }
    // Everything answers.
    for k in 0..24 {
        let c = cache.clone();
        let r = within(Duration::from_secs(5), move || {
            c.invalidate(&k);
            c.get_with(k, || V::new(1)).w
        });
        assert!(matches!(r, Some(Ok(1))), "key {k}");
    }
    cache.validate();
}

/// A sync caller and an async caller of one key interleave with invalidations; the value a caller
/// that started after invalidate() returned never comes from a load started before.
#[test]
fn no_stale_value_after_invalidate_mixed() {
    let _w = watchdog(
        Duration::from_secs(60),
        "no_stale_value_after_invalidate_mixed",
    );
    let cache: Cache<u32, u64> = Cache::new(100);
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for t in 0..2 {
        let (c, e, s) = (cache.clone(), epoch.clone(), stop.clone());
        loaders.push(std::thread::spawn(move || {
            while !s.load(SeqCst) {
                if t == 0 {
                    c.get_with(1, || {
                        let v = e.load(SeqCst);
                        std::thread::yield_now();
                        v
                    });
                } else {
                    futures::executor::block_on(c.get_with_async(1, async {
                        let v = e.load(SeqCst);
                        Yield(1).await;
                        v
                    }));
                }
            }
        }));
    }
    for _ in 0..3000 {
        let new = epoch.fetch_add(1, SeqCst) + 1;
        cache.invalidate(&1);
        // Any load claimed before invalidate() returned read an epoch < new... unless it read
        // after our fetch_add. A value < new here means a load started before the invalidate.
        let v = cache.get_with(1, || new);
        assert!(
            v >= new,
            "got {v} loaded before the invalidate (epoch {new})"
        );
    }
    stop.store(true, SeqCst);
    for l in loaders {
        l.join().unwrap();
    }
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// Hash panics on the N-th call with a waiter present (two threads), then everything recovers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PK(u32);
static PK_ARM: AtomicU64 = AtomicU64::new(u64::MAX);
static PK_CALLS: AtomicU64 = AtomicU64::new(0);
impl Hash for PK {
    fn hash<H: Hasher>(&self, h: &mut H) {
        if self.0 == 1 && PK_CALLS.fetch_add(1, SeqCst) == PK_ARM.load(SeqCst) {
            panic!("injected hash panic");
        }
        self.0.hash(h)
    }
}

#[test]
fn eviction_listener_panic_during_load_store_with_waiters() {
    let _w = watchdog(
        LIMIT,
        "eviction_listener_panic_during_load_store_with_waiters",
    );
    quiet_injected_panics();
    let boom = Arc::new(AtomicBool::new(true));
    let b = boom.clone();
    let count = Arc::new(AtomicUsize::new(0));
    let cnt = count.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(2)
        .eviction_listener(move |_k, _v, _c| {
            cnt.fetch_add(1, SeqCst);
            if b.load(SeqCst) {
                panic!("injected listener panic");
            }
        })
        .build();
    cache.insert(100, 1);
    cache.insert(101, 1);
    let gate = Arc::new(Barrier::new(2));
    let (c, g) = (cache.clone(), gate.clone());
    let leader = start(move || {
        c.get_with(1, || {
            g.wait();
            std::thread::sleep(Duration::from_millis(100));
            5
        })
    });
    gate.wait();
    let c = cache.clone();
    let waiter = start(move || c.get_with(1, || 6));
    let l = leader.wait(Duration::from_secs(5)).expect("leader hung");
    let w = waiter.wait(Duration::from_secs(5)).expect("waiter hung");
    boom.store(false, SeqCst);
    // The listener panic (eviction by the store) reaches someone; whoever gets a value sees 5 or 6.
    let _ = (l.is_ok(), w.is_ok());
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let stored = cache.entry_count();
    assert_eq!(
        stored as usize + count.load(SeqCst),
        3,
        "each entry stored or reported once"
    );
    check_fresh(&cache, &[1, 100, 101]);
}

#[test]
fn hash_panic_with_waiters() {
    let _w = watchdog(LIMIT, "hash_panic_with_waiters");
    quiet_injected_panics();
    for arm in 0..12u64 {
        PK_CALLS.store(0, SeqCst);
        PK_ARM.store(arm, SeqCst);
        let cache: Cache<PK, u64> = Cache::new(100);
        let gate = Arc::new(Barrier::new(2));
        let (c, g) = (cache.clone(), gate.clone());
        let leader = start(move || {
            c.get_with(PK(1), || {
                g.wait();
                std::thread::sleep(Duration::from_millis(30));
                5
            })
        });
        let c = cache.clone();
        let waiter = start(move || {
            // Wait until the leader is inside init, then join (or race).
            c.get_with(PK(1), || 6)
        });
        // The leader might have panicked before init (hash panic): then the barrier never trips.
        let g2 = gate.clone();
        let _ = within(Duration::from_millis(500), move || g2.wait());
        let _ = leader.wait(Duration::from_secs(5)).expect("leader hung");
        let _ = waiter.wait(Duration::from_secs(5)).expect("waiter hung");
        PK_ARM.store(u64::MAX, SeqCst);
        assert_eq!(cache.loads_in_flight(), 0, "arm {arm}");
        cache.validate();
        let c = cache.clone();
        let r = within(Duration::from_secs(5), move || {
            c.invalidate(&PK(1));
            c.get_with(PK(1), || 7)
        });
        assert!(matches!(r, Some(Ok(7))), "arm {arm}");
    }
}

/// Minimal: one shard; a key with a Hash that changes on every call is inserted and invalidated
/// (invalidate cannot find it, so the entry stays); then inserting good keys (table growth) must
/// not panic, and the good keys must be readable.
#[test]
fn inconsistent_hash_min_insert_then_grow() {
    let _w = watchdog(LIMIT, "inconsistent_hash_min_insert_then_grow");
    for op in 0..4 {
        let cache: Cache<K, u64> = Cache::builder().max_capacity(1000).shards(1).build();
        for round in 0..20u32 {
            let b = K::Bad(round);
            match op {
                0 => cache.insert(b.clone(), 1),
                1 => {
                    cache.get_with(b.clone(), || 1);
                }
                2 => {
                    cache.insert(b.clone(), 1);
                    cache.invalidate(&b);
                }
                _ => {
                    cache.insert(b.clone(), 1);
                    cache.insert(b.clone(), 2);
                }
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            for i in 0..200 {
                cache.insert(K::Good(i), i as u64);
            }
        }));
        assert!(
            r.is_ok(),
            "op {op}: inserting good keys panicked after bad-hash keys"
        );
        for i in 0..200 {
            assert_eq!(
                cache.get(&K::Good(i)),
                Some(i as u64),
                "op {op}: good key {i}"
            );
        }
        cache.invalidate_all();
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), cache.iter().count() as u64, "op {op}");
    }
}

#[test]
fn inconsistent_hash_op_sweep() {
    let _w = watchdog(LIMIT, "inconsistent_hash_op_sweep");
    let mut bad = Vec::new();
    for op in 0..7 {
        let cache: Cache<K, u64> = Cache::builder().max_capacity(50).shards(1).build();
        for i in 0..20 {
            cache.insert(K::Good(i), i as u64);
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            for round in 0..200u32 {
                let b = K::Bad(round % 5);
                match op {
                    0 => {
                        cache.get_with(b.clone(), || 1000);
                    }
                    1 => cache.insert(b.clone(), 2000),
                    2 => {
                        cache.insert(b.clone(), 2000);
                        cache.invalidate(&b);
                    }
                    3 => {
                        cache.entry(b.clone()).and_upsert_with(|_| 3);
                    }
                    4 => {
                        futures::executor::block_on(cache.get_with_async(b.clone(), async { 4 }));
                    }
                    5 => {
                        cache.get_all([b.clone(), K::Good(1)], |ks| {
                            ks.iter().map(|k| (k.clone(), 5)).collect()
                        });
                    }
                    _ => {
                        cache.get_with(b.clone(), || 1000);
                        cache.insert(K::Good(100 + round), 1);
                    }
                }
            }
        }));
        let good_ok = (0..20).all(|i| cache.get(&K::Good(i)).is_none_or(|v| v == i as u64));
        if r.is_err() || !good_ok {
            bad.push((op, r.is_err(), good_ok));
        }
    }
    assert!(bad.is_empty(), "(op, panicked, good keys intact): {bad:?}");
}

/// Minimal: a bad-Hash key in a bounded cache that evicts. After it is evicted, inserting good
/// keys panics with "table slots are live" (src/shard.rs reserve_table), and keeps panicking:
/// the shard is corrupted for every key, not just the bad one.
#[test]
fn inconsistent_hash_eviction_corrupts_shard_for_good_keys() {
    let _w = watchdog(
        LIMIT,
        "inconsistent_hash_eviction_corrupts_shard_for_good_keys",
    );
    let cache: Cache<K, u64> = Cache::builder().max_capacity(10).shards(1).build();
    for i in 0..5 {
        cache.insert(K::Bad(i), 1);
    }
    let mut panics = Vec::new();
    for i in 0..200 {
        if catch_unwind(AssertUnwindSafe(|| cache.insert(K::Good(i), i as u64))).is_err() {
            panics.push(i);
        }
    }
    assert!(
        panics.is_empty(),
        "insert of good keys panicked for {} of 200: {:?}",
        panics.len(),
        &panics[..panics.len().min(10)]
    );
}

/// Recursion on the same key through the other verbs: a loader that computes its own key, a
/// compute that loads its own key, get_all whose loader asks one of its keys. Each must panic
/// (or fail) promptly, never hang, and leave the keys answering.
#[test]
fn recursion_through_compute_loader_and_get_all() {
    let _w = watchdog(LIMIT, "recursion_through_compute_loader_and_get_all");
    quiet_injected_panics();
    let slot: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::default();
    let s2 = slot.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .loader(move |k: &u32| {
            let c = s2.lock().unwrap().clone().unwrap();
            if *k == 1 {
                // compute of the key being loaded
                c.entry(1).and_upsert_with(|_| 5);
            }
            Ok::<_, BoxError>(*k as u64)
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    let r = catch_unwind(AssertUnwindSafe(|| cache.load(1)));
    assert!(
        matches!(r, Err(_) | Ok(Err(LoadError::Panicked))),
        "loader computing its own key: {r:?}"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache
            .entry(2)
            .and_compute_with(|_| Op::Put(cache.load(2).unwrap_or(0)))
    }));
    assert!(
        r.is_err() || cache.get(&2).is_some(),
        "compute loading its own key"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_all([3, 4], |_| HashMap::from([(3, cache.get_with(4, || 44))]))
    }));
    assert!(
        r.is_err(),
        "get_all loader asking one of its own keys must panic"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(cache.entry(5).and_compute_with_async(|_| async {
            Op::Put(cache.get_with_async(5, async { 1 }).await)
        }))
    }));
    assert!(r.is_err(), "async compute awaiting its own key must panic");
    // Mutually nested under one thread: compute(6) -> get_with(7) -> compute(6).
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.entry(6).and_compute_with(|_| {
            Op::Put(cache.get_with(7, || {
                cache.entry(6).and_upsert_with(|_| 1);
                7
            }))
        })
    }));
    assert!(
        r.is_err(),
        "compute(6) -> get_with(7) -> compute(6) must panic"
    );
    check_fresh(&cache, &[1, 2, 3, 4, 5, 6, 7]);
    // The loader holds a handle to its own cache: break the cycle (LeakSanitizer runs this).
    *slot.lock().unwrap() = None;
}

/// A panicking refresh (builder loader) keeps the old value and is not retried by every read.
#[test]
fn panicking_refresh_keeps_value_no_storm() {
    let _w = watchdog(LIMIT, "panicking_refresh_keeps_value_no_storm");
    quiet_injected_panics();
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .clock(clock.clone())
        .time_to_live(Duration::from_secs(100))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(5))
        .loader(move |_k: &u32| {
            if c2.fetch_add(1, SeqCst) > 0 {
                panic!("injected refresh panic");
            }
            Ok::<_, BoxError>(1)
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 1);
    clock.advance(Duration::from_secs(11));
    for _ in 0..20 {
        let r = catch_unwind(AssertUnwindSafe(|| cache.get(&1)));
        assert!(matches!(r, Ok(Some(1))), "reads keep the old value: {r:?}");
        let r = catch_unwind(AssertUnwindSafe(|| cache.load(1)));
        assert!(matches!(r, Ok(Ok(1))), "load keeps the old value: {r:?}");
    }
    assert_eq!(calls.load(SeqCst), 2, "one refresh per backoff");
    clock.advance(Duration::from_secs(6));
    let _ = cache.get(&1);
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// The realistic shape of the limit-1 deadlock: the builder loader of A loads its dependency B
/// with `load`, while another request loads B.
#[test]
fn limit1_loader_dependency_deadlock() {
    let go = Arc::new(AtomicBool::new(false));
    let slot: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::default();
    let (g, s2) = (go.clone(), slot.clone());
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .loader(move |k: &u32| {
            if *k == 1 {
                while !g.load(SeqCst) {
                    std::thread::yield_now();
                }
                let c = s2.lock().unwrap().clone().unwrap();
                return c
                    .load(2)
                    .map(|v| v + 1)
                    .map_err(|e| -> BoxError { e.to_string().into() });
            }
            Ok::<_, BoxError>(20)
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    let c1 = cache.clone();
    let t1 = start(move || c1.load(1));
    assert!(eventually(|| cache.loads_in_flight() == 1));
    let c2 = cache.clone();
    let t2 = start(move || c2.load(2));
    assert!(eventually(|| cache.loads_in_flight() == 2));
    std::thread::sleep(Duration::from_millis(50));
    go.store(true, SeqCst);
    let r1 = t1.wait(Duration::from_secs(5));
    let r2 = t2.wait(Duration::from_secs(1));
    assert!(
        matches!(r1, Some(Ok(Ok(21)))) && matches!(r2, Some(Ok(Ok(20)))),
        "t1 finished {} t2 finished {} in flight {}",
        r1.is_some(),
        r2.is_some(),
        cache.loads_in_flight()
    );
    *slot.lock().unwrap() = None; // the loader held its own cache: break the cycle
}

/// Async only: the permit holder (async) awaits B, whose leader (async, borrowed or shared) is
/// queued for the permit on another thread.
#[test]
fn limit1_async_async_nested_join() {
    let mut hung = Vec::new();
    for shared in [false, true] {
        let cache: Cache<u32, u64> = Cache::builder()
            .max_capacity(100)
            .max_concurrent_loads(1)
            .build();
        let go = Arc::new(AtomicBool::new(false));
        let (c1, g1) = (cache.clone(), go.clone());
        let t1 = start(move || {
            futures::executor::block_on(c1.get_with_async(1, async {
                while !g1.load(SeqCst) {
                    Yield(1).await;
                    std::thread::yield_now();
                }
                c1.get_with_async(2, async { 12 }).await + 1
            }))
        });
        assert!(eventually(|| cache.loads_in_flight() == 1));
        let c2 = cache.clone();
        let t2 = start(move || {
            if shared {
                futures::executor::block_on(c2.get_with_async_shared(2, async { 22 }))
            } else {
                futures::executor::block_on(c2.get_with_async(2, async { 22 }))
            }
        });
        assert!(eventually(|| cache.loads_in_flight() == 2));
        std::thread::sleep(Duration::from_millis(50));
        go.store(true, SeqCst);
        let r1 = t1.wait(Duration::from_secs(5));
        let r2 = t2.wait(Duration::from_secs(1));
        if !(matches!(r1, Some(Ok(_))) && matches!(r2, Some(Ok(_)))) {
            hung.push(shared);
        }
    }
    eprintln!("limit1_async_async_nested_join: hung for shared = {hung:?}");
    // Recorded, not asserted, below when it hangs: see the report.
    assert!(hung.is_empty(), "deadlocked for shared = {hung:?}");
}

/// A shared load claimed before `invalidate`, finished by a waiter after it (its leader
/// dropped): the waiter gets the value, the cache does not keep it, and a caller that starts
/// after the invalidate neither joins it nor sees its value.
#[test]
fn shared_load_finished_by_waiter_after_invalidate_is_not_cached() {
    let _w = watchdog(
        LIMIT,
        "shared_load_finished_by_waiter_after_invalidate_is_not_cached",
    );
    let cache: Cache<u32, u64> = Cache::new(100);
    let mut leader = Box::pin(cache.get_with_async_shared(1, async {
        Yield(3).await;
        100
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    let mut waiter = Box::pin(cache.get_with_async_shared(1, async { 200 }));
    assert!(poll_once(waiter.as_mut()).is_pending());
    drop(leader);
    cache.invalidate(&1);
    let c = cache.clone();
    let late = within(Duration::from_secs(5), move || c.get_with(1, || 300));
    assert!(
        matches!(late, Some(Ok(300))),
        "late caller: {:?}",
        late.map(|r| r.ok())
    );
    let w = poll_n(waiter.as_mut(), 50).expect("waiter finished");
    assert_eq!(w, 100, "the waiter finished the leader's load");
    assert_eq!(
        cache.get(&1),
        Some(300),
        "the old shared load overwrote a newer load"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// A spawner that panics (refreshes and timed loads): no key left loading, reads still answer.
#[test]
fn panicking_spawner_leaves_nothing_loading() {
    let _w = watchdog(LIMIT, "panicking_spawner_leaves_nothing_loading");
    quiet_injected_panics();
    let clock = ManualClock::new();
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100)
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(1))
        .load_timeout(Duration::from_millis(100))
        .loader(|k: &u32| Ok::<_, BoxError>(*k as u64))
        .spawner(|_job| panic!("injected spawner panic"))
        .build();
    let r = catch_unwind(AssertUnwindSafe(|| cache.load(1)));
    assert_eq!(cache.loads_in_flight(), 0, "after a timed load: {r:?}");
    cache.insert(2, 2);
    clock.advance(Duration::from_secs(11));
    for _ in 0..3 {
        let r = catch_unwind(AssertUnwindSafe(|| cache.get(&2)));
        assert!(matches!(r, Ok(Some(2)) | Err(_)));
        assert_eq!(cache.loads_in_flight(), 0);
        clock.advance(Duration::from_secs(2));
    }
    cache.validate();
    check_fresh(&cache, &[1, 2]);
}
