//! Single-flight loading: one loader per key under a herd, for sync and async callers, and the
//! exits that break other caches: errors, panics, cancelled and stalled leaders, recursion.
//! Every test runs under a watchdog, so a hang fails instead of stalling CI.

#![cfg(not(loom))]

mod common;

use common::{live_lock, watchdog, Counted, Yield, LIVE};
use herdcache::Cache;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn herd_keys() -> u64 {
    std::env::var("HERDCACHE_HERD_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000)
}

/// 64 threads miss each cold key together; the loader must run exactly once per key, and every
/// caller must see the value in the cache once it has it.
#[test]
fn sixty_four_threads_per_cold_key_load_once() {
    let _dog = watchdog(LIMIT, "sixty_four_threads_per_cold_key_load_once");
    const THREADS: usize = 64;
    let keys = herd_keys();
    let cache: Cache<u64, u64> = Cache::new(keys * 2);
    let loads = AtomicUsize::new(0);
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for k in 0..keys {
                    barrier.wait();
                    let v = cache.get_with(k, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        k * 3
                    });
                    assert_eq!(v, k * 3);
                    assert_eq!(cache.get(&k), Some(k * 3), "published before release");
                }
            });
        }
    });
    assert_eq!(
        loads.load(Ordering::SeqCst) as u64,
        keys,
        "one load per key"
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

#[test]
fn async_herd_on_a_multi_threaded_runtime() {
    let _dog = watchdog(LIMIT, "async_herd_on_a_multi_threaded_runtime");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let cache: Cache<u64, u64> = Cache::new(10_000);
    let loads = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        for k in 0..200u64 {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (cache, loads) = (cache.clone(), loads.clone());
                    tokio::spawn(async move {
                        cache
                            .get_with_async(k, async move {
                                loads.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                k + 1
                            })
                            .await
                    })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.expect("task"), k + 1);
            }
        }
    });
    assert_eq!(loads.load(Ordering::SeqCst), 200);
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn async_herd_on_a_plain_executor() {
    let _dog = watchdog(LIMIT, "async_herd_on_a_plain_executor");
    let cache: Cache<u64, u64> = Cache::new(10_000);
    let loads = Arc::new(AtomicUsize::new(0));
    for k in 0..200u64 {
        let futs = (0..64).map(|_| {
            let loads = loads.clone();
            cache.get_with_async(k, async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Yield(3).await;
                k * 2
            })
        });
        let all = futures::executor::block_on(futures::future::join_all(futs));
        assert!(all.iter().all(|&v| v == k * 2));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 200);
}

#[test]
fn a_panicking_leader_releases_its_waiters() {
    let _dog = watchdog(LIMIT, "a_panicking_leader_releases_its_waiters");
    let cache: Cache<u32, u32> = Cache::new(100);
    let started = Barrier::new(2);
    let release = Arc::new(AtomicBool::new(false));
    let loads = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let leader = s.spawn(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                cache.get_with(1, || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    started.wait();
                    while !release.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    panic!("loader failed")
                })
            }))
        });
        started.wait();
        let waiter = s.spawn(|| {
            cache.get_with(1, || {
                loads.fetch_add(1, Ordering::SeqCst);
                42
            })
        });
        // Let the waiter join the flight, then make the leader panic.
        while cache.loads_in_flight() != 1 {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        release.store(true, Ordering::SeqCst);
        assert!(
            leader.join().expect("joined").is_err(),
            "the panic reaches the leader's caller"
        );
        assert_eq!(
            waiter.join().expect("the waiter does not panic"),
            42,
            "a waiter retried"
        );
    });
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert_eq!(cache.get(&1), Some(42));
    // Nothing poisoned: the next calls work.
    assert_eq!(cache.get_with(2, || 5), 5);
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn an_error_is_shared_and_not_cached() {
    let _dog = watchdog(LIMIT, "an_error_is_shared_and_not_cached");
    let cache: Cache<u32, u32> = Cache::new(100);
    let loads = AtomicUsize::new(0);
    let gate = Barrier::new(9);
    let results: Vec<Result<u32, Arc<String>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    gate.wait();
                    cache.try_get_with(1, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Err::<u32, String>("backend down".to_string())
                    })
                })
            })
            .collect();
        gate.wait();
        hs.into_iter().map(|h| h.join().expect("joined")).collect()
    });
    let errors: Vec<Arc<String>> = results.into_iter().map(|r| r.expect_err("error")).collect();
    let n = loads.load(Ordering::SeqCst);
    // Callers that arrived while the load ran share its error; a straggler may load again.
    let shared = errors.iter().filter(|e| Arc::ptr_eq(e, &errors[0])).count();
    assert!(
        n < 8,
        "the error was shared, not loaded per caller ({n} loads)"
    );
    assert!(shared >= 8 / n, "callers on one load share one Arc");
    assert!(!cache.contains_key(&1), "errors are not cached");
    assert_eq!(
        cache.try_get_with(1, || Ok::<_, String>(9)),
        Ok(9),
        "the next call loads again"
    );
    assert_eq!(cache.optionally_get_with(2, || None), None);
    assert!(!cache.contains_key(&2), "None is not cached");
}

#[test]
fn a_waiter_with_another_error_type_loads_itself() {
    let _dog = watchdog(LIMIT, "a_waiter_with_another_error_type_loads_itself");
    let cache: Cache<u32, u32> = Cache::new(100);
    let started = Barrier::new(2);
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            cache.try_get_with(1, || {
                started.wait();
                std::thread::sleep(Duration::from_millis(50));
                Err::<u32, &str>("a")
            })
        });
        started.wait();
        let b = cache.try_get_with(1, || Ok::<u32, u64>(8));
        assert_eq!(b, Ok(8));
        assert_eq!(*a.join().expect("joined").unwrap_err(), "a");
    });
}

#[test]
fn a_recursive_load_of_the_same_key_panics_and_other_keys_work() {
    let _dog = watchdog(LIMIT, "a_recursive_load_of_the_same_key_panics");
    let cache: Cache<u32, u32> = Cache::new(100);
    let v = cache.get_with(1, || cache.get_with(2, || 20) + 1);
    assert_eq!(v, 21, "loaders may load other keys");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache.get_with(3, || cache.get_with(3, || 0))
    }));
    let msg = r.expect_err("recursion must panic");
    let msg = msg
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| msg.downcast_ref::<&str>().copied())
        .unwrap_or("");
    assert!(msg.contains("recursive load"), "{msg}");
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(
        cache.get_with(3, || 30),
        30,
        "the key loads normally afterwards"
    );
    // Async recursion is caught as well.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = cache.clone();
        futures::executor::block_on(
            cache.get_with_async(4, async move { c.get_with_async(4, async { 0 }).await }),
        )
    }));
    assert!(r.is_err());
    assert_eq!(cache.loads_in_flight(), 0);
}

/// A load future that completes when `gate` is set, counting its polls.
fn gated(gate: Arc<AtomicBool>, value: u64) -> impl Future<Output = u64> + Send + 'static {
    std::future::poll_fn(move |cx| {
        if gate.load(Ordering::SeqCst) {
            Poll::Ready(value)
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn a_dropped_leader_hands_the_load_to_a_waiter() {
    let _dog = watchdog(LIMIT, "a_dropped_leader_hands_the_load_to_a_waiter");
    let cache: Cache<u64, u64> = Cache::new(10_000);
    let loads = Arc::new(AtomicUsize::new(0));
    for trial in 0..1_000u64 {
        let gate = Arc::new(AtomicBool::new(false));
        let l = loads.clone();
        let g = gate.clone();
        let mut leader = Box::pin(cache.get_with_async_shared(trial, async move {
            l.fetch_add(1, Ordering::SeqCst);
            gated(g, trial).await
        }));
        assert!(poll_once(leader.as_mut()).is_pending());
        let mut waiter =
            Box::pin(cache.get_with_async_shared(trial, async { unreachable!("joins") }));
        assert!(poll_once(waiter.as_mut()).is_pending());
        drop(leader);
        gate.store(true, Ordering::SeqCst);
        assert_eq!(
            futures::executor::block_on(waiter),
            trial,
            "the waiter finished the load"
        );
        assert_eq!(cache.get(&trial), Some(trial));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1_000, "no load restarted");
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn a_leader_never_polled_again_does_not_block_others() {
    let _dog = watchdog(LIMIT, "a_leader_never_polled_again_does_not_block_others");
    let cache: Cache<u64, u64> = Cache::new(100);
    let gate = Arc::new(AtomicBool::new(true));
    let mut leader = Box::pin(cache.get_with_async_shared(1, async {
        Yield(1).await;
        7
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    // The leader is alive but nobody polls it: an async waiter drives the load...
    let v = futures::executor::block_on(cache.get_with_async_shared(1, gated(gate, 0)));
    assert_eq!(v, 7);
    assert_eq!(futures::executor::block_on(leader), 7);
    // A blocking caller never polls another caller's future (it may need that caller's
    // runtime): it waits while an async caller of the load is alive, and loads with its own
    // `init` once they are all gone.
    let mut leader2 = Box::pin(cache.get_with_async_shared(2, async {
        Yield(1).await;
        8
    }));
    assert!(poll_once(leader2.as_mut()).is_pending());
    let blocking = {
        let cache = cache.clone();
        std::thread::spawn(move || cache.get_with(2, || 9))
    };
    drop(leader2);
    assert_eq!(blocking.join().unwrap(), 9);
    assert_eq!(cache.get(&2), Some(9));
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn dropping_every_caller_cancels_the_load_and_leaves_nothing() {
    let _serial = live_lock();
    let _dog = watchdog(LIMIT, "dropping_every_caller_cancels_the_load");
    let before = LIVE.load(Ordering::SeqCst);
    {
        let cache: Cache<u64, Counted> = Cache::new(100);
        for k in 0..100u64 {
            let gate = Arc::new(AtomicBool::new(false));
            let value = Counted::new(k);
            let g = gate.clone();
            let mut leader = Box::pin(cache.get_with_async_shared(k, async move {
                gated(g, 0).await;
                value
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            let mut waiters: Vec<_> = (0..3)
                .map(|_| Box::pin(cache.get_with_async_shared(k, async { Counted::new(999) })))
                .collect();
            for w in &mut waiters {
                assert!(poll_once(w.as_mut()).is_pending());
            }
            assert_eq!(cache.loads_in_flight(), 1);
            drop(waiters);
            drop(leader);
            assert_eq!(
                cache.loads_in_flight(),
                0,
                "the last caller gone cancels the load"
            );
            assert!(!cache.contains_key(&k));
        }
        // Waiters dropped while a load runs, and the load then completing.
        let gate = Arc::new(AtomicBool::new(false));
        let g = gate.clone();
        let mut leader = Box::pin(cache.get_with_async_shared(1000, async move {
            gated(g, 0).await;
            Counted::new(1000)
        }));
        assert!(poll_once(leader.as_mut()).is_pending());
        for _ in 0..10 {
            let mut w = Box::pin(cache.get_with_async_shared(1000, async { Counted::new(1) }));
            assert!(poll_once(w.as_mut()).is_pending());
        }
        gate.store(true, Ordering::SeqCst);
        assert_eq!(futures::executor::block_on(leader).0, 1000);
        assert_eq!(cache.loads_in_flight(), 0);
        assert_eq!(
            LIVE.load(Ordering::SeqCst) - before,
            1,
            "only the cached value lives"
        );
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before, "nothing leaked");
}

#[test]
fn a_slow_load_does_not_delay_other_keys_in_the_same_shard() {
    let _dog = watchdog(LIMIT, "a_slow_load_does_not_delay_other_keys");
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10_000).shards(1).build();
    let release = AtomicBool::new(false);
    let started = Barrier::new(2);
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            cache.get_with(1, || {
                started.wait();
                while !release.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                1
            })
        });
        started.wait();
        // The load of key 1 is running; everything else in its (only) shard must proceed.
        for k in 2..1000 {
            cache.insert(k, k);
            assert_eq!(cache.get(&k), Some(k));
            assert_eq!(cache.get_with(k + 5000, || 0), 0);
        }
        assert_eq!(cache.get(&1), None);
        release.store(true, Ordering::SeqCst);
        assert_eq!(slow.join().expect("joined"), 1);
    });
}

#[test]
fn a_write_during_a_load_wins() {
    let _dog = watchdog(LIMIT, "a_write_during_a_load_wins");
    let cache: Cache<u32, u32> = Cache::new(100);
    let v = cache.get_with(1, || {
        cache.insert(1, 100);
        5
    });
    assert_eq!(v, 5, "the loader's caller gets the loaded value");
    assert_eq!(
        cache.get(&1),
        Some(100),
        "the explicit write is not overwritten"
    );
    let v = cache.get_with(2, || {
        cache.invalidate(&2);
        6
    });
    assert_eq!(v, 6);
    assert_eq!(
        cache.get(&2),
        None,
        "an invalidation during the load is honoured"
    );
}

#[test]
fn get_with_on_a_present_key_does_not_call_the_loader() {
    let cache: Cache<u32, u32> = Cache::new(10);
    cache.insert(1, 1);
    assert_eq!(cache.get_with(1, || unreachable!()), 1);
    assert_eq!(
        futures::executor::block_on(cache.get_with_async(1, async { unreachable!() })),
        1
    );
}

#[test]
fn panics_errors_and_negative_entries_leak_nothing() {
    let _serial = live_lock();
    let _dog = watchdog(LIMIT, "panics_errors_and_negative_entries_leak_nothing");
    let before = LIVE.load(Ordering::SeqCst);
    {
        let cache: Cache<u64, Counted> = Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(60))
            .build();
        // A loader that panics after making a value.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.get_with(1, || {
                let _made = Counted::new(1);
                panic!("loader failed");
            })
        }));
        assert!(r.is_err());
        // An error that carries a counted value, shared and then kept as a negative entry.
        let e = cache
            .try_get_with(2, || Err::<Counted, _>(Counted::new(2)))
            .unwrap_err();
        let e2 = cache
            .try_get_with(2, || Ok::<_, Counted>(Counted::new(99)))
            .unwrap_err();
        assert!(Arc::ptr_eq(&e, &e2), "negative entry served");
        drop((e, e2));
        // An async load that panics while polled.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(cache.get_with_async(3, async {
                let _made = Counted::new(3);
                Yield(1).await;
                panic!("async loader failed");
            }))
        }));
        assert!(r.is_err());
        // A successful load, replaced, then invalidated.
        cache.get_with(4, || Counted::new(4));
        cache.insert(4, Counted::new(5));
        cache.invalidate(&4);
        assert_eq!(cache.loads_in_flight(), 0);
        assert!(
            LIVE.load(Ordering::SeqCst) - before <= 1,
            "only the negative entry's error lives"
        );
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before, "nothing leaked");
}

/// A service whose async loader borrows `&self` (no `Arc`, no `async move`): it compiles, its
/// future is `Send` (tokio spawns it), and 16 concurrent callers of one key load once.
#[test]
fn a_loader_that_borrows_self_loads_once_for_sixteen_callers() {
    let _dog = watchdog(LIMIT, "a_loader_that_borrows_self");
    struct Db {
        loads: AtomicUsize,
    }
    impl Db {
        async fn fetch_user(&self, id: u64) -> String {
            self.loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            format!("user {id}")
        }
    }
    struct Service {
        db: Db,
        cache: Cache<u64, String>,
    }
    impl Service {
        async fn user(&self, id: u64) -> String {
            self.cache.get_with_async(id, self.db.fetch_user(id)).await
        }
        async fn try_user(&self, id: u64) -> Result<String, Arc<std::io::Error>> {
            self.cache
                .try_get_with_async(id, async { Ok(self.db.fetch_user(id).await) })
                .await
        }
    }
    let service = Arc::new(Service {
        db: Db {
            loads: AtomicUsize::new(0),
        },
        cache: Cache::new(100),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let s = Arc::clone(&service);
                tokio::spawn(async move { s.user(7).await })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap(), "user 7");
        }
        assert_eq!(service.try_user(8).await.unwrap(), "user 8");
    });
    assert_eq!(
        service.db.loads.load(Ordering::SeqCst),
        2,
        "16 callers, one load"
    );
}

/// A borrowing leader dropped mid-load: its load is cancelled, and a waiter loads with its
/// own `init` (moka's semantics); nothing is left in flight.
#[test]
fn a_dropped_borrowing_leader_lets_a_waiter_load_with_its_own_init() {
    let _dog = watchdog(LIMIT, "a_dropped_borrowing_leader");
    let cache: Cache<u64, u64> = Cache::new(10_000);
    let leader_loads = AtomicUsize::new(0);
    let other_loads = AtomicUsize::new(0);
    for trial in 0..1_000u64 {
        let gate = Arc::new(AtomicBool::new(false));
        let mut leader = Box::pin(cache.get_with_async(trial, async {
            leader_loads.fetch_add(1, Ordering::SeqCst);
            gated(gate.clone(), trial).await
        }));
        assert!(poll_once(leader.as_mut()).is_pending());
        let mut waiter = Box::pin(cache.get_with_async(trial, async {
            other_loads.fetch_add(1, Ordering::SeqCst);
            trial + 1
        }));
        assert!(poll_once(waiter.as_mut()).is_pending(), "joins the leader");
        // A blocking caller of the key waits too (or, if it comes after the drop, races the
        // waiter for the new lead).
        let blocking = std::thread::scope(|s| {
            let b = s.spawn(|| {
                cache.get_with(trial, || {
                    other_loads.fetch_add(1, Ordering::SeqCst);
                    trial + 1
                })
            });
            drop(leader);
            let v = futures::executor::block_on(waiter);
            assert_eq!(
                v,
                trial + 1,
                "a survivor's own init, not the cancelled load"
            );
            b.join().unwrap()
        });
        assert_eq!(blocking, trial + 1);
        assert_eq!(cache.get(&trial), Some(trial + 1));
        assert_eq!(cache.loads_in_flight(), 0);
    }
    assert_eq!(leader_loads.load(Ordering::SeqCst), 1_000);
    assert_eq!(
        other_loads.load(Ordering::SeqCst),
        1_000,
        "one survivor loads per cancelled leader"
    );
}
