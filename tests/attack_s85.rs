//! Round 85 of the outside attacks (a helper given the public API only, as a moka user): the
//! async API (cancellation at every await point, never-polled wakers, panics in async inits,
//! nested loads, the load limit), the entry/compute API (every `Op`, panics, re-entry, races
//! with writes), the eviction listener (exactly-once reports and causes under concurrent
//! writes, panicking and re-entrant listeners), negative caching, per-entry expiry, refresh
//! and fail-safe's entry calls; 106 tests in one module per area. One failed:
//!
//! * `async2::load_async_leader_dropped_waiter_finishes_its_shared_load` (was
//!   `..._waiter_loads_afresh`): `Cache::load_async`'s cancel safety said "As
//!   `get_with_async`" (a dropped leader's load cancelled, a waiter loading afresh) while it is
//!   a shared load (the waiter polled the dropped leader's loader future to its end). The
//!   shared load is the design (the loader is the cache's, the same for every caller); the
//!   docs now say so and warn that a loader future that never completes holds its waiters.
#![allow(
    clippy::type_complexity,
    clippy::drop_non_drop,
    clippy::redundant_allocation,
    dropping_copy_types
)]

// Helpers the modules below share.
use herdcache::Cache;
use std::future::Future;
use std::time::Duration;

const WATCHDOG: Duration = Duration::from_secs(30);

fn mt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

fn ct() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn run<F: Future>(rt: &tokio::runtime::Runtime, f: F) -> F::Output {
    rt.block_on(async {
        tokio::time::timeout(WATCHDOG, f)
            .await
            .expect("watchdog: test hung")
    })
}

fn stats_cache() -> Cache<u32, String> {
    Cache::builder().max_capacity(100).record_stats().build()
}

/// Outside attack on the async loading API (helper 85): cancellation at every await point, permits after cancellation, panics, nesting, never-polled leaders, current-thread runtimes.
mod async1 {
    use super::{ct, mt, run, stats_cache};

    use herdcache::Cache;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use tokio::sync::{oneshot, Notify};

    /// Waits (yielding, no timing threshold) until `cond` holds.
    async fn until(mut cond: impl FnMut() -> bool) {
        while !cond() {
            tokio::task::yield_now().await;
        }
    }

    /// Polls a future once with a no-op waker.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    /// `get_with_async`: "If the leader's future is dropped before its load finishes, the load is
    /// cancelled and one of the waiting callers loads with *its* `init` (nobody is stranded ...)";
    /// "the key is not cached by a cancelled load". Checked with the leader aborted at each of
    /// its three await points, on a multi-thread and on a current-thread runtime.
    #[test]
    fn borrowed_leader_cancelled_at_every_await_point_waiters_take_over() {
        for make in [mt as fn() -> tokio::runtime::Runtime, ct] {
            for step in 0..3usize {
                let rt = make();
                run(&rt, async move {
                    let cache = stats_cache();
                    let reached = Arc::new(AtomicUsize::new(0));
                    let gate = Arc::new(Notify::new());
                    let leader = {
                        let (cache, reached, gate) = (cache.clone(), reached.clone(), gate.clone());
                        tokio::spawn(async move {
                            cache
                                .get_with_async(1, async {
                                    for i in 0..3 {
                                        reached.store(i + 1, Ordering::SeqCst);
                                        if i == step {
                                            gate.notified().await; // never notified
                                        } else {
                                            tokio::task::yield_now().await;
                                        }
                                    }
                                    "leader".to_string()
                                })
                                .await
                        })
                    };
                    until(|| reached.load(Ordering::SeqCst) == step + 1).await;
                    let inits = Arc::new(AtomicUsize::new(0));
                    let waiters: Vec<_> = (0..2)
                        .map(|i| {
                            let (cache, inits) = (cache.clone(), inits.clone());
                            tokio::spawn(async move {
                                cache
                                    .get_with_async(1, async move {
                                        inits.fetch_add(1, Ordering::SeqCst);
                                        format!("waiter{i}")
                                    })
                                    .await
                            })
                        })
                        .collect();
                    until(|| cache.stats().coalesced == 2).await;
                    leader.abort();
                    assert!(leader.await.unwrap_err().is_cancelled());
                    let mut got = Vec::new();
                    for w in waiters {
                        got.push(w.await.unwrap());
                    }
                    assert_eq!(
                        inits.load(Ordering::SeqCst),
                        1,
                        "exactly one waiter reloads"
                    );
                    assert_eq!(got[0], got[1], "both waiters see one load: {got:?}");
                    assert!(got[0].starts_with("waiter"), "{got:?}");
                    assert_eq!(cache.get(&1), Some(got[0].clone()));
                    assert_eq!(cache.stats().loads_in_flight, 0);
                    cache.validate();
                });
            }
        }
    }

    /// `max_concurrent_loads`: a cancelled load must give its permit back ("Nothing is left
    /// behind"), and a caller dropped while queued for a permit must leave the queue. After
    /// cancelling a running leader and a queued leader, a new load of a third key completes.
    #[test]
    fn cancelled_loads_release_permit_and_queue_place() {
        for make in [mt as fn() -> tokio::runtime::Runtime, ct] {
            let rt = make();
            run(&rt, async {
                let cache: Cache<u32, u32> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .record_stats()
                    .build();
                let started = Arc::new(Notify::new());
                let a = {
                    let (cache, started) = (cache.clone(), started.clone());
                    tokio::spawn(async move {
                        cache
                            .get_with_async(1, async {
                                started.notify_one();
                                std::future::pending::<u32>().await
                            })
                            .await
                    })
                };
                started.notified().await;
                let b = {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.get_with_async(2, async { 2 }).await })
                };
                until(|| cache.stats().loads_waited_for_limit == 1).await;
                b.abort();
                let _ = b.await;
                a.abort();
                let _ = a.await;
                assert_eq!(cache.get_with_async(3, async { 3 }).await, 3);
                assert_eq!(cache.get_with_async(1, async { 10 }).await, 10);
                assert_eq!(cache.get_with_async(2, async { 20 }).await, 20);
                assert_eq!(cache.stats().loads_in_flight, 0);
                cache.validate();
            });
        }
    }

    /// A never-completing shared leader dropped while a permit is held: the permit comes back and
    /// the key is not cached ("the load is cancelled ... and the key is not cached").
    #[test]
    fn shared_load_dropped_by_all_callers_frees_permit_and_caches_nothing() {
        let rt = mt();
        run(&rt, async {
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(100)
                .max_concurrent_loads(1)
                .record_stats()
                .build();
            let mut leader =
                Box::pin(cache.get_with_async_shared(1, std::future::pending::<u32>()));
            assert!(poll_once(&mut leader).is_pending());
            let mut waiter = Box::pin(cache.get_with_async_shared(1, async { 99 }));
            assert!(poll_once(&mut waiter).is_pending());
            drop(leader);
            drop(waiter);
            assert_eq!(cache.get(&1), None);
            assert_eq!(cache.stats().loads_in_flight, 0);
            assert_eq!(cache.get_with_async(2, async { 2 }).await, 2);
            assert_eq!(cache.get_with_async_shared(1, async { 1 }).await, 1);
            cache.validate();
        });
    }

    /// `get_with_async_shared`: "when the leading future is dropped ..., or is never polled
    /// again, the waiters drive the load to completion and the work is not wasted". The leader is
    /// polled once, then kept alive but never polled again; its `init` becomes ready later; the
    /// waiter must finish the leader's load (its own `init` never runs).
    #[test]
    fn shared_leader_never_polled_again_waiter_completes_its_load() {
        for make in [mt as fn() -> tokio::runtime::Runtime, ct] {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                let (tx, rx) = oneshot::channel::<()>();
                let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                    rx.await.unwrap();
                    "leader's".to_string()
                }));
                assert!(poll_once(&mut leader).is_pending());
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache
                            .get_with_async_shared(1, async { "waiter's".to_string() })
                            .await
                    })
                };
                until(|| cache.stats().coalesced == 1).await;
                tx.send(()).unwrap();
                assert_eq!(waiter.await.unwrap(), "leader's");
                assert_eq!(cache.get(&1).as_deref(), Some("leader's"));
                // The stale leader, polled now, answers from the finished load.
                assert_eq!(leader.await, "leader's");
            });
        }
    }

    /// `get_with_async_shared`, leader dropped mid-load: the waiters finish the leader's `init`
    /// (it runs once, is not restarted), and the value is cached.
    #[test]
    fn shared_leader_dropped_waiter_finishes_same_init() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let runs = Arc::new(AtomicUsize::new(0));
            let (tx, rx) = oneshot::channel::<()>();
            let r2 = runs.clone();
            let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                r2.fetch_add(1, Ordering::SeqCst);
                rx.await.unwrap();
                "L".to_string()
            }));
            assert!(poll_once(&mut leader).is_pending());
            let waiter = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .get_with_async_shared(1, async { "W".to_string() })
                        .await
                })
            };
            until(|| cache.stats().coalesced == 1).await;
            drop(leader);
            tx.send(()).unwrap();
            assert_eq!(waiter.await.unwrap(), "L");
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert_eq!(cache.get(&1).as_deref(), Some("L"));
        });
    }

    /// "If `init` panics (in this caller; the waiters load again with their own `init`)": a
    /// panicking async leader's panic reaches its own task only; the waiters load again.
    #[test]
    fn async_init_panic_reaches_leader_waiters_reload() {
        for make in [mt as fn() -> tokio::runtime::Runtime, ct] {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                let go = Arc::new(Notify::new());
                let started = Arc::new(Notify::new());
                let leader = {
                    let (cache, go, started) = (cache.clone(), go.clone(), started.clone());
                    tokio::spawn(async move {
                        cache
                            .get_with_async(1, async move {
                                started.notify_one();
                                go.notified().await;
                                panic!("boom in init");
                            })
                            .await
                    })
                };
                started.notified().await;
                let waiters: Vec<_> = (0..2)
                    .map(|_| {
                        let cache = cache.clone();
                        tokio::spawn(async move {
                            cache.get_with_async(1, async { "again".to_string() }).await
                        })
                    })
                    .collect();
                until(|| cache.stats().coalesced == 2).await;
                go.notify_one();
                let e = leader.await.unwrap_err();
                assert!(e.is_panic());
                for w in waiters {
                    assert_eq!(w.await.unwrap(), "again");
                }
                assert_eq!(cache.get(&1).as_deref(), Some("again"));
                assert_eq!(cache.stats().loads_in_flight, 0);
                cache.validate();
            });
        }
    }

    /// try_get_with_async: "an error goes to the leader and every caller that waited on that load
    /// as the same `Arc<E>`, and is not cached".
    #[test]
    fn async_error_shared_as_one_arc_not_cached() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let go = Arc::new(Notify::new());
            let started = Arc::new(Notify::new());
            let leader = {
                let (cache, go, started) = (cache.clone(), go.clone(), started.clone());
                tokio::spawn(async move {
                    cache
                        .try_get_with_async(1, async move {
                            started.notify_one();
                            go.notified().await;
                            Err::<String, _>("down".to_string())
                        })
                        .await
                })
            };
            started.notified().await;
            let waiter = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .try_get_with_async(1, async { Ok::<_, String>("w".to_string()) })
                        .await
                })
            };
            until(|| cache.stats().coalesced == 1).await;
            go.notify_one();
            let a = leader.await.unwrap().unwrap_err();
            let b = waiter.await.unwrap().unwrap_err();
            assert!(Arc::ptr_eq(&a, &b), "one Arc for all callers of the load");
            assert_eq!(cache.get(&1), None);
        });
    }

    /// Nested loads: another key inside `init` works; the same key "panics instead of
    /// deadlocking" (documented), and the cache stays usable for that key afterwards.
    #[test]
    fn nested_async_loads_other_key_ok_same_key_panics() {
        for make in [mt as fn() -> tokio::runtime::Runtime, ct] {
            let rt = make();
            run(&rt, async {
                let cache: Cache<u32, u32> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .build();
                let c2 = cache.clone();
                let v = cache
                    .get_with_async(1, async { c2.get_with_async(2, async { 20 }).await + 1 })
                    .await;
                assert_eq!((v, cache.get(&2)), (21, Some(20)));

                let c3 = cache.clone();
                let h = tokio::spawn(async move {
                    let c4 = c3.clone();
                    c3.get_with_async(5, async move { c4.get_with_async(5, async { 1 }).await })
                        .await
                });
                let e = h.await.unwrap_err();
                assert!(e.is_panic(), "a recursive load must panic, not hang");
                assert_eq!(cache.get(&5), None);
                // Permit and key are released.
                assert_eq!(cache.get_with_async(5, async { 55 }).await, 55);
                cache.validate();
            });
        }
    }

    /// "An `invalidate` cannot be undone by a load that began before it": `invalidate_all`
    /// (which removes "every entry, at one instant") issued while an async load of a new key
    /// runs: the loaded value goes to the callers but is not stored.
    #[test]
    fn invalidate_all_during_async_load_is_not_undone() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            cache.insert(9, "old".into());
            let go = Arc::new(Notify::new());
            let started = Arc::new(Notify::new());
            let leader = {
                let (cache, go, started) = (cache.clone(), go.clone(), started.clone());
                tokio::spawn(async move {
                    let a = cache
                        .get_with_async(1, async move {
                            started.notify_one();
                            go.notified().await;
                            "loaded".to_string()
                        })
                        .await;
                    a
                })
            };
            started.notified().await;
            cache.invalidate_all();
            go.notify_one();
            assert_eq!(leader.await.unwrap(), "loaded");
            assert_eq!(
                cache.get(&1),
                None,
                "a load begun before invalidate_all stored its value"
            );
            assert_eq!(cache.get(&9), None);
            assert_eq!(cache.entry_count(), 0);
        });
    }

    /// Same for a key that had a value: `invalidate` during its reload (via `get_with_if_async`
    /// replacing it) wins; the old value does not come back either.
    #[test]
    fn invalidate_during_async_replacement_wins() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            cache.insert(1, "old".into());
            let go = Arc::new(Notify::new());
            let started = Arc::new(Notify::new());
            let leader = {
                let (cache, go, started) = (cache.clone(), go.clone(), started.clone());
                tokio::spawn(async move {
                    cache
                        .get_with_if_async(
                            1,
                            async move {
                                started.notify_one();
                                go.notified().await;
                                "new".to_string()
                            },
                            |_| true,
                        )
                        .await
                })
            };
            started.notified().await;
            cache.invalidate(&1);
            go.notify_one();
            assert_eq!(leader.await.unwrap(), "new");
            assert_eq!(cache.get(&1), None);
        });
    }

    /// and_compute_with_async: "Dropping the returned future while it waits or while `f`'s future
    /// runs releases the key (nothing is stored) and lets the key's other callers go on." A
    /// `get_with_async` waiting on the computation must then get a value (its own load).
    #[test]
    fn compute_async_dropped_mid_closure_releases_waiters() {
        for make in [mt as fn() -> tokio::runtime::Runtime, ct] {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                cache.insert(1, "orig".into());
                let started = Arc::new(Notify::new());
                let comp = {
                    let (cache, started) = (cache.clone(), started.clone());
                    tokio::spawn(async move {
                        cache
                            .entry(1)
                            .and_compute_with_async(|_e| async move {
                                started.notify_one();
                                std::future::pending::<herdcache::Op<String>>().await
                            })
                            .await
                    })
                };
                started.notified().await;
                // The key is locked by the computation: a loader waits for it.
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache
                            .get_with_if_async(1, async { "w".to_string() }, |_| true)
                            .await
                    })
                };
                let compute2 = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache
                            .entry(1)
                            .and_upsert_with_async(|e| {
                                let v = e.map(|e| e.into_value()).unwrap_or_default();
                                async move { format!("{v}+") }
                            })
                            .await
                            .into_value()
                    })
                };
                tokio::task::yield_now().await;
                comp.abort();
                let _ = comp.await;
                let w = waiter.await.unwrap();
                let c = compute2.await.unwrap();
                // Linearizable outcomes: waiter then upsert, or upsert then waiter.
                let fin = cache.get(&1).unwrap();
                assert!(
                    (w == "w" && c == "w+" && fin == "w+")
                        || (c == "orig+"
                            && (fin == "w" && w == "w" || fin == "orig+" && w == "orig+")),
                    "w={w} c={c} fin={fin}"
                );
                assert_eq!(cache.stats().loads_in_flight, 0);
                cache.validate();
            });
        }
    }

    /// Blocking and async callers share one load; a blocking waiter whose async leader is
    /// cancelled "waits, and loads itself if the async callers went away".
    #[test]
    fn blocking_waiter_takes_over_cancelled_async_leader() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let started = Arc::new(Notify::new());
            let leader = {
                let (cache, started) = (cache.clone(), started.clone());
                tokio::spawn(async move {
                    cache
                        .get_with_async(1, async move {
                            started.notify_one();
                            std::future::pending::<String>().await
                        })
                        .await
                })
            };
            started.notified().await;
            let blocking = {
                let cache = cache.clone();
                std::thread::spawn(move || cache.get_with(1, || "blocking".to_string()))
            };
            until(|| cache.stats().coalesced == 1).await;
            leader.abort();
            let _ = leader.await;
            let v = tokio::task::spawn_blocking(move || blocking.join().unwrap())
                .await
                .unwrap();
            assert_eq!(v, "blocking");
            assert_eq!(cache.get(&1).as_deref(), Some("blocking"));
        });
    }

    /// optionally_get_with_async returning None: not cached, and the waiter gets `None` from the
    /// same load (moka: "None is not cached"; waiters of that load share its outcome) or loads
    /// again — either way it must not hang, and nothing is cached when both return None.
    #[test]
    fn optional_none_not_cached_waiter_not_stranded() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let go = Arc::new(Notify::new());
            let started = Arc::new(Notify::new());
            let leader = {
                let (cache, go, started) = (cache.clone(), go.clone(), started.clone());
                tokio::spawn(async move {
                    cache
                        .optionally_get_with_async(1, async move {
                            started.notify_one();
                            go.notified().await;
                            None
                        })
                        .await
                })
            };
            started.notified().await;
            let waiter = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .optionally_get_with_async(1, async { None::<String> })
                        .await
                })
            };
            until(|| cache.stats().coalesced == 1).await;
            go.notify_one();
            assert_eq!(leader.await.unwrap(), None);
            assert_eq!(waiter.await.unwrap(), None);
            assert!(!cache.contains_key(&1));
            assert_eq!(cache.stats().loads_in_flight, 0);
        });
    }
}

/// Outside attack on async loads, part 2 (helper 85): waiters that are never polled again, cancellation while queued for a permit, shared-load panics polled by a waiter, the miss accounting identity after cancellations, async computations.
mod async2 {
    use super::{ct, mt, run, stats_cache};

    use herdcache::{BoxError, Cache, CompResult, Op};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;
    use tokio::sync::{oneshot, Notify};

    fn runtimes() -> [fn() -> tokio::runtime::Runtime; 2] {
        [mt, ct]
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        while !cond() {
            tokio::task::yield_now().await;
        }
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    /// `CacheStats::misses`: "once every call has returned, `misses == load_successes +
    /// load_failures + loads_abandoned + coalesced + negative_hits`".
    fn check_miss_identity<K, V>(cache: &Cache<K, V>)
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "miss identity broken: {s:?}"
        );
        assert_eq!(s.loads_in_flight, 0, "a load left in flight: {s:?}");
    }

    /// A waiter polled once and then never polled again (its waker a no-op) must not strand the
    /// others when the leader is cancelled: "one of the waiting callers loads with *its* `init`
    /// (nobody is stranded, nobody waits on a future no one can poll)".
    #[test]
    fn never_polled_waiter_does_not_strand_others_after_leader_cancel() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                let mut leader =
                    Box::pin(cache.get_with_async(1, std::future::pending::<String>()));
                assert!(poll_once(&mut leader).is_pending());
                let mut dead = Box::pin(cache.get_with_async(1, async { "dead".to_string() }));
                assert!(poll_once(&mut dead).is_pending());
                let live = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache.get_with_async(1, async { "live".to_string() }).await
                    })
                };
                until(|| cache.stats().coalesced == 2).await;
                drop(leader);
                assert_eq!(live.await.unwrap(), "live");
                assert_eq!(cache.get(&1).as_deref(), Some("live"));
                // The forgotten waiter, polled at last, answers from the cache.
                assert_eq!(dead.await, "live");
                check_miss_identity(&cache);
            });
        }
    }

    /// Same, with the shared variant: the never-polled waiter must not keep the load from the
    /// live one (the live caller drives the leader's future to completion).
    #[test]
    fn never_polled_shared_waiter_does_not_block_live_one() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                let (tx, rx) = oneshot::channel::<()>();
                let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                    rx.await.unwrap();
                    "L".to_string()
                }));
                assert!(poll_once(&mut leader).is_pending());
                let mut dead =
                    Box::pin(cache.get_with_async_shared(1, async { "dead".to_string() }));
                assert!(poll_once(&mut dead).is_pending());
                let live = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache
                            .get_with_async_shared(1, async { "live".to_string() })
                            .await
                    })
                };
                until(|| cache.stats().coalesced == 2).await;
                drop(leader);
                tx.send(()).unwrap();
                assert_eq!(live.await.unwrap(), "L");
                drop(dead);
                assert_eq!(cache.get(&1).as_deref(), Some("L"));
                check_miss_identity(&cache);
            });
        }
    }

    /// A leader dropped while queued for a load permit (max_concurrent_loads(1), the permit held
    /// by another key's load) with a waiter joined: the waiter takes over once the permit frees,
    /// and the abandoned leader's place in the queue is not left holding the permit.
    #[test]
    fn leader_dropped_while_queued_for_permit_waiter_takes_over() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache: Cache<u32, String> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .record_stats()
                    .build();
                let (tx, rx) = oneshot::channel::<()>();
                let started = Arc::new(Notify::new());
                let holder = {
                    let (cache, started) = (cache.clone(), started.clone());
                    tokio::spawn(async move {
                        cache
                            .get_with_async(100, async move {
                                started.notify_one();
                                rx.await.unwrap();
                                "holder".to_string()
                            })
                            .await
                    })
                };
                started.notified().await;
                let mut queued = Box::pin(cache.get_with_async(1, async { "queued".to_string() }));
                assert!(poll_once(&mut queued).is_pending());
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache
                            .get_with_async(1, async { "waiter".to_string() })
                            .await
                    })
                };
                until(|| cache.stats().coalesced == 1).await;
                drop(queued);
                tx.send(()).unwrap();
                assert_eq!(holder.await.unwrap(), "holder");
                assert_eq!(waiter.await.unwrap(), "waiter");
                // The permit is free again.
                assert_eq!(
                    cache.get_with_async(2, async { "two".to_string() }).await,
                    "two"
                );
                check_miss_identity(&cache);
                cache.validate();
            });
        }
    }

    /// Same with shared loads: the queued shared leader is dropped, the waiter (still interested)
    /// must drive the load once the permit frees, running the leader's `init` ("the waiters
    /// drive the load to completion").
    #[test]
    fn shared_leader_dropped_while_queued_for_permit() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache: Cache<u32, String> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .record_stats()
                    .build();
                let (tx, rx) = oneshot::channel::<()>();
                let started = Arc::new(Notify::new());
                let holder = {
                    let (cache, started) = (cache.clone(), started.clone());
                    tokio::spawn(async move {
                        cache
                            .get_with_async_shared(100, async move {
                                started.notify_one();
                                rx.await.unwrap();
                                "holder".to_string()
                            })
                            .await
                    })
                };
                started.notified().await;
                let mut queued =
                    Box::pin(cache.get_with_async_shared(1, async { "queued".to_string() }));
                assert!(poll_once(&mut queued).is_pending());
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        cache
                            .get_with_async_shared(1, async { "waiter".to_string() })
                            .await
                    })
                };
                until(|| cache.stats().coalesced == 1).await;
                drop(queued);
                tx.send(()).unwrap();
                assert_eq!(holder.await.unwrap(), "holder");
                assert_eq!(waiter.await.unwrap(), "queued");
                assert_eq!(
                    cache.get_with_async(2, async { "two".to_string() }).await,
                    "two"
                );
                check_miss_identity(&cache);
                cache.validate();
            });
        }
    }

    /// get_with_async_shared: "If the load panics, in the caller that was polling it at the time
    /// ...; the others load again with their own `init`. The caller whose `init` it was, when
    /// another caller was polling it, has no load of its own left: it takes the value of a load
    /// another caller started meanwhile (or one cached since), and otherwise panics too".
    #[test]
    fn shared_init_panic_polled_by_waiter() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let (tx, rx) = oneshot::channel::<()>();
            let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                rx.await.unwrap();
                panic!("shared init boom");
            }));
            assert!(poll_once(&mut leader).is_pending());
            let waiter = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .get_with_async_shared(1, async { "w".to_string() })
                        .await
                })
            };
            until(|| cache.stats().coalesced == 1).await;
            tx.send(()).unwrap();
            // The waiter drives the load (the leader is not polled): the panic is the waiter's.
            let r = waiter.await;
            assert!(r.unwrap_err().is_panic(), "the poller gets the panic");
            // A value cached since answers the leader.
            cache.insert(1, "later".to_string());
            assert_eq!(leader.await, "later");
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    /// Same, but nothing is cached when the leader is finally polled: it "otherwise panics too"
    /// (and must not hang).
    #[test]
    fn shared_init_panic_polled_by_waiter_leader_then_panics() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let (tx, rx) = oneshot::channel::<()>();
            let leader = cache.clone();
            let mut leader = Box::pin(async move {
                leader
                    .get_with_async_shared(1, async move {
                        rx.await.unwrap();
                        panic!("shared init boom");
                    })
                    .await
            });
            assert!(poll_once(&mut leader).is_pending());
            let waiter = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .get_with_async_shared(1, async { "w".to_string() })
                        .await
                })
            };
            until(|| cache.stats().coalesced == 1).await;
            tx.send(()).unwrap();
            assert!(waiter.await.unwrap_err().is_panic());
            let h = tokio::spawn(leader);
            assert!(
                h.await.unwrap_err().is_panic(),
                "the leader with no load left panics too"
            );
            assert_eq!(cache.get(&1), None);
            assert_eq!(
                cache.get_with_async(1, async { "ok".to_string() }).await,
                "ok"
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
        });
    }

    /// `Cache::load_async`'s cancel safety said "As [`get_with_async`]" (a dropped leader's load
    /// is cancelled and a waiter loads with its own `init`), while `load_async` is a shared load:
    /// the waiter finished the dropped leader's loader future (round 85). The docs now say so
    /// ("As `get_with_async_shared`": the loader's future belongs to the load; the waiters poll it
    /// to its end, the loader is not called again). After the leading `load_async` is dropped
    /// and the first loader future let go (value 31), the waiter gets 31 with one loader call.
    #[test]
    fn load_async_leader_dropped_waiter_finishes_its_shared_load() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let calls = Arc::new(AtomicUsize::new(0));
                let gate = Arc::new(Notify::new());
                let (c2, g2) = (calls.clone(), gate.clone());
                let cache: Cache<u32, u32> = Cache::builder()
                    .max_capacity(100)
                    .record_stats()
                    .async_loader(move |k: &u32| {
                        let (k, n, g) = (*k, c2.fetch_add(1, Ordering::SeqCst), g2.clone());
                        async move {
                            if n == 0 {
                                g.notified().await; // the first call waits for the gate
                                return Ok::<_, BoxError>(k * 10 + 1);
                            }
                            Ok::<_, BoxError>(k * 10)
                        }
                    })
                    .build();
                let mut first = Box::pin(cache.load_async(3));
                assert!(poll_once(&mut first).is_pending());
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.load_async(3).await.unwrap() })
                };
                until(|| cache.stats().coalesced == 1).await;
                drop(first);
                gate.notify_one();
                let got = waiter.await.unwrap();
                let n = calls.load(Ordering::SeqCst);
                assert!(
                    got == 31 && n == 1,
                    "load_async leader dropped: waiter got {got} with {n} loader call(s); \
                 expected the shared load's value (31) from one call"
                );
                assert_eq!(cache.stats().loads_in_flight, 0);
            });
        }
    }

    /// `load_async` with a loader error: shared by the callers, not cached.
    #[test]
    fn load_async_error_not_cached() {
        let rt = mt();
        run(&rt, async {
            let calls = Arc::new(AtomicUsize::new(0));
            let c2 = calls.clone();
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(100)
                .record_stats()
                .async_loader(move |k: &u32| {
                    let k = *k;
                    c2.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if k == 0 {
                            return Err(BoxError::from("no zero"));
                        }
                        Ok::<_, BoxError>(k * 10)
                    }
                })
                .build();
            assert!(cache.load_async(0).await.is_err());
            assert!(!cache.contains_key(&0));
            assert!(cache.load_async(0).await.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 2, "errors are not cached");
            assert_eq!(cache.load_async(1).await.unwrap(), 10);
            check_miss_identity(&cache);
        });
    }

    /// and_compute_with_async: an `insert` of the key while `f`'s future runs wins over its
    /// `Put` ("a `Put` is returned but not stored"), on both runtimes; and a panic in `f`'s
    /// future releases the key.
    #[test]
    fn async_compute_insert_wins_and_panic_releases() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                cache.insert(1, "a".into());
                let started = Arc::new(Notify::new());
                let go = Arc::new(Notify::new());
                let comp = {
                    let (cache, started, go) = (cache.clone(), started.clone(), go.clone());
                    tokio::spawn(async move {
                        cache
                            .entry(1)
                            .and_compute_with_async(|e| async move {
                                started.notify_one();
                                go.notified().await;
                                Op::Put(format!("{}+", e.unwrap().into_value()))
                            })
                            .await
                    })
                };
                started.notified().await;
                cache.insert(1, "b".into());
                go.notify_one();
                let r = comp.await.unwrap();
                assert!(matches!(&r, CompResult::ReplacedWith(e) if e.value() == "a+"));
                assert_eq!(cache.get(&1).as_deref(), Some("b"));

                let c = cache.clone();
                let h = tokio::spawn(async move {
                    c.entry(1)
                        .and_compute_with_async(|_| async {
                            tokio::task::yield_now().await;
                            panic!("async compute boom")
                        })
                        .await
                });
                assert!(h.await.unwrap_err().is_panic());
                assert_eq!(cache.get(&1).as_deref(), Some("b"));
                let e = cache
                    .entry(1)
                    .and_upsert_with_async(
                        |e| async move { format!("{}!", e.unwrap().into_value()) },
                    )
                    .await;
                assert_eq!(e.into_value(), "b!");
                assert_eq!(cache.stats().loads_in_flight, 0);
                cache.validate();
            });
        }
    }

    /// A blocking leader's `init` panics while an async caller waits: "the waiters are released
    /// and one of them loads again with its own closure".
    #[test]
    fn async_waiter_of_panicking_blocking_leader_reloads() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let (in_init_tx, in_init_rx) = std::sync::mpsc::channel::<()>();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let leader = {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cache.get_with(1, || {
                            in_init_tx.send(()).unwrap();
                            go_rx.recv().unwrap();
                            panic!("blocking boom")
                        })
                    }))
                    .is_err()
                })
            };
            tokio::task::spawn_blocking(move || in_init_rx.recv().unwrap())
                .await
                .unwrap();
            let waiter = {
                let cache = cache.clone();
                tokio::spawn(
                    async move { cache.get_with_async(1, async { "async".to_string() }).await },
                )
            };
            until(|| cache.stats().coalesced == 1).await;
            go_tx.send(()).unwrap();
            assert_eq!(waiter.await.unwrap(), "async");
            assert!(tokio::task::spawn_blocking(move || leader.join().unwrap())
                .await
                .unwrap());
            check_miss_identity(&cache);
        });
    }

    /// or_insert_with_async cancelled: `Entry::is_fresh` for the waiter that took over is true
    /// (its own `init` produced the value), false for a caller that joined its load.
    #[test]
    fn or_insert_with_async_takeover_freshness() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let mut leader = Box::pin(
                cache
                    .entry(1)
                    .or_insert_with_async(std::future::pending::<String>()),
            );
            assert!(poll_once(&mut leader).is_pending());
            let (tx, rx) = oneshot::channel::<()>();
            let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
            let spawn = |name: &'static str| {
                let (cache, rx) = (cache.clone(), rx.clone());
                tokio::spawn(async move {
                    cache
                        .entry(1)
                        .or_insert_with_async(async move {
                            if let Some(rx) = rx.lock().await.take() {
                                let _ = rx.await;
                            }
                            name.to_string()
                        })
                        .await
                })
            };
            let a = spawn("a");
            let b = spawn("b");
            until(|| cache.stats().coalesced == 2).await;
            drop(leader);
            // One of them takes over and waits on `rx`; the other joins it.
            until(|| cache.stats().misses >= 4).await;
            tx.send(()).unwrap();
            let (a, b) = (a.await.unwrap(), b.await.unwrap());
            assert_eq!(a.value(), b.value());
            assert!(
                a.is_fresh() ^ b.is_fresh(),
                "exactly one produced the value: a={} b={}",
                a.is_fresh(),
                b.is_fresh()
            );
            let fresh = if a.is_fresh() { &a } else { &b };
            assert_eq!(cache.get(&1).as_deref(), Some(fresh.value().as_str()));
            check_miss_identity(&cache);
        });
    }

    /// `LoadError::Panicked`: "The loader panicked. Every caller that waited on that load gets
    /// this error (none of them runs the loader again); callers of the key in the next
    /// `refresh_backoff` get it too ... on a cache that keeps time". For `load_async`, with the
    /// leader polled once and dropped, the waiter drives the panicking loader (shared load).
    #[test]
    fn load_async_loader_panic_reaches_every_caller_and_backoff() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let clock = herdcache::ManualClock::new();
                let calls = Arc::new(AtomicUsize::new(0));
                let gate = Arc::new(Notify::new());
                let (c2, g2) = (calls.clone(), gate.clone());
                let cache: Cache<u32, u32> = Cache::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(100))
                    .refresh_backoff(Duration::from_secs(10))
                    .clock(clock.clone())
                    .record_stats()
                    .async_loader(move |k: &u32| {
                        let (k, n, g) = (*k, c2.fetch_add(1, Ordering::SeqCst), g2.clone());
                        async move {
                            if n == 0 {
                                g.notified().await;
                                panic!("async loader boom");
                            }
                            Ok::<_, BoxError>(k)
                        }
                    })
                    .build();
                let leader = {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.load_async(1).await })
                };
                until(|| calls.load(Ordering::SeqCst) == 1).await;
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.load_async(1).await })
                };
                until(|| cache.stats().coalesced == 1).await;
                gate.notify_one();
                let l = leader
                    .await
                    .expect("the loader's panic is an error, not a panic of the caller");
                let w = waiter
                    .await
                    .expect("the loader's panic is an error, not a panic of the waiter");
                assert!(matches!(l, Err(herdcache::LoadError::Panicked)), "{l:?}");
                assert!(matches!(w, Err(herdcache::LoadError::Panicked)), "{w:?}");
                assert_eq!(calls.load(Ordering::SeqCst), 1);
                assert!(matches!(
                    cache.load_async(1).await,
                    Err(herdcache::LoadError::Panicked)
                ));
                assert_eq!(
                    calls.load(Ordering::SeqCst),
                    1,
                    "within the backoff the loader is not called"
                );
                clock.advance(Duration::from_secs(11));
                assert_eq!(cache.load_async(1).await.unwrap(), 1);
                assert_eq!(calls.load(Ordering::SeqCst), 2);
                check_miss_identity(&cache);
            });
        }
    }

    /// `get_with_async`'s `init` panics while a *blocking* `load` of the same key waits: the
    /// blocking waiter is released and loads again with the builder's loader ("the waiters are
    /// released and one of them loads again").
    #[test]
    fn blocking_load_waiting_on_panicking_async_init() {
        let rt = mt();
        run(&rt, async {
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(100)
                .record_stats()
                .loader(|k: &u32| Ok::<_, BoxError>(*k + 100))
                .build();
            let go = Arc::new(Notify::new());
            let started = Arc::new(Notify::new());
            let leader = {
                let (cache, go, started) = (cache.clone(), go.clone(), started.clone());
                tokio::spawn(async move {
                    cache
                        .get_with_async(1, async move {
                            started.notify_one();
                            go.notified().await;
                            panic!("init boom")
                        })
                        .await
                })
            };
            started.notified().await;
            let blocking = {
                let cache = cache.clone();
                std::thread::spawn(move || cache.load(1))
            };
            until(|| cache.stats().coalesced == 1).await;
            go.notify_one();
            assert!(leader.await.unwrap_err().is_panic());
            let r = tokio::task::spawn_blocking(move || blocking.join().unwrap())
                .await
                .unwrap();
            assert_eq!(r.unwrap(), 101);
            check_miss_identity(&cache);
        });
    }

    /// "A write or invalidation of the key while it loads wins: the loaded value goes to the
    /// callers already waiting, but is not stored" — also when the write comes from inside the
    /// load's own `init` (an async `init` that invalidates / overwrites its own key).
    #[test]
    fn async_init_writing_its_own_key_loses() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache = stats_cache();
                let c = cache.clone();
                let v = cache
                    .get_with_async(1, async {
                        c.insert(1, "written".into());
                        tokio::task::yield_now().await;
                        "loaded".to_string()
                    })
                    .await;
                assert_eq!(v, "loaded");
                assert_eq!(cache.get(&1).as_deref(), Some("written"));
                let c = cache.clone();
                let v = cache
                    .get_with_if_async(
                        1,
                        async {
                            c.invalidate(&1);
                            tokio::task::yield_now().await;
                            "reloaded".to_string()
                        },
                        |_| true,
                    )
                    .await;
                assert_eq!(v, "reloaded");
                assert!(!cache.contains_key(&1));
                assert_eq!(cache.stats().loads_in_flight, 0);
            });
        }
    }

    /// get_with_if_async: "dropping the future while its `init` runs abandons the load (callers
    /// waiting for it load again themselves); the cached value is left as it was". A waiter that
    /// joined the replacement (without judging) judges the old value itself afterwards.
    #[test]
    fn get_with_if_async_cancelled_replacement_leaves_old_value() {
        for keep in [true, false] {
            let rt = mt();
            run(&rt, async {
                let cache = stats_cache();
                cache.insert(1, "old".into());
                let mut leader =
                    Box::pin(
                        cache.get_with_if_async(1, std::future::pending::<String>(), |_| true),
                    );
                assert!(poll_once(&mut leader).is_pending());
                let judged = Arc::new(AtomicUsize::new(0));
                let waiter = {
                    let (cache, judged) = (cache.clone(), judged.clone());
                    tokio::spawn(async move {
                        cache
                            .get_with_if_async(1, async { "w".to_string() }, move |_| {
                                judged.fetch_add(1, Ordering::SeqCst);
                                !keep
                            })
                            .await
                    })
                };
                until(|| cache.stats().coalesced == 1 || judged.load(Ordering::SeqCst) > 0).await;
                drop(leader);
                let got = waiter.await.unwrap();
                assert_eq!(got, if keep { "old" } else { "w" });
                assert_eq!(cache.get(&1).as_deref(), Some(got.as_str()));
            });
        }
    }

    /// `get_all` waiting for another caller's async load that is cancelled: "A key whose load by
    /// another caller ends with nothing for this call (it failed, or was given up) goes to
    /// `load_missing` if it has not been called yet, else is absent too". Must not hang.
    #[test]
    fn get_all_with_cancelled_foreign_load() {
        let rt = mt();
        run(&rt, async {
            let cache: Cache<u32, u32> = Cache::builder().max_capacity(100).record_stats().build();
            let mut leader = Box::pin(cache.get_with_async(2, std::future::pending::<u32>()));
            assert!(poll_once(&mut leader).is_pending());
            let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
            let t = {
                let (cache, calls) = (cache.clone(), calls.clone());
                std::thread::spawn(move || {
                    cache.get_all([1, 2], |missing| {
                        calls.lock().unwrap().push(missing.to_vec());
                        missing
                            .iter()
                            .map(|&k| (k, k * 10))
                            .collect::<std::collections::HashMap<_, _>>()
                    })
                })
            };
            until(|| !calls.lock().unwrap().is_empty() || cache.stats().coalesced > 0).await;
            drop(leader);
            let all = tokio::task::spawn_blocking(move || t.join().unwrap())
                .await
                .unwrap();
            let calls = calls.lock().unwrap().clone();
            assert_eq!(calls.len(), 1, "load_missing is called once: {calls:?}");
            assert_eq!(all.get(&1), Some(&10));
            if calls[0].contains(&2) {
                assert_eq!(all.get(&2), Some(&20));
            } else {
                assert_eq!(all.get(&2), None, "{all:?}");
            }
            check_miss_identity(&cache);
        });
    }

    struct PanicOnDrop;
    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("init drop boom");
            }
        }
    }

    /// Crate docs: a panic of user code — "a key's or value's `Hash`, `Eq`, `Clone` or `Drop`
    /// ... — reaches the caller that ran it, and leaves no key waiting, no load permit taken".
    /// A borrowed leader's `init` whose `Drop` panics when the leader is cancelled: the panic
    /// reaches the dropping caller; the waiter is released and loads; the permit is free.
    #[test]
    fn cancelled_init_with_panicking_drop_releases_waiters_and_permit() {
        for make in runtimes() {
            let rt = make();
            run(&rt, async {
                let cache: Cache<u32, String> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .record_stats()
                    .build();
                let bomb = PanicOnDrop;
                let mut leader = Box::pin(cache.get_with_async(1, async move {
                    let _b = bomb;
                    std::future::pending::<String>().await
                }));
                assert!(poll_once(&mut leader).is_pending());
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(
                        async move { cache.get_with_async(1, async { "w".to_string() }).await },
                    )
                };
                until(|| cache.stats().coalesced == 1).await;
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(leader)));
                assert!(r.is_err(), "the drop's panic reaches the dropping caller");
                assert_eq!(waiter.await.unwrap(), "w");
                assert_eq!(
                    cache.get_with_async(2, async { "two".to_string() }).await,
                    "two"
                );
                assert_eq!(cache.stats().loads_in_flight, 0);
                cache.validate();
            });
        }
    }

    /// Same for a shared load: "If `init`'s `Drop` panics (a cancelled load's, in the drop of the
    /// caller that cancelled it; the key's other callers are released first)". Here the last
    /// caller cancels; a later caller loads normally, the permit is free.
    #[test]
    fn cancelled_shared_init_with_panicking_drop() {
        let rt = mt();
        run(&rt, async {
            let cache: Cache<u32, String> = Cache::builder()
                .max_capacity(100)
                .max_concurrent_loads(1)
                .record_stats()
                .build();
            let bomb = PanicOnDrop;
            let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                let _b = bomb;
                std::future::pending::<String>().await
            }));
            assert!(poll_once(&mut leader).is_pending());
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(leader)));
            assert!(r.is_err());
            assert_eq!(
                cache
                    .get_with_async_shared(1, async { "again".to_string() })
                    .await,
                "again"
            );
            assert_eq!(
                cache.get_with_async(2, async { "two".to_string() }).await,
                "two"
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    /// `max_concurrent_loads`: "A [`Cache::get_with_async`] future polled inside a load before it
    /// got a permit of its own runs under that load's permit until it ends, wherever it is polled
    /// afterwards: it is part of that load". A child load started (polled once) inside a parent's
    /// `init`, then smuggled out and finished after the parent ended: while the child's load is
    /// still running, a load of a third key must wait for the permit (limit 1) — else two loads
    /// run at once.
    #[test]
    fn escaped_child_load_keeps_parent_permit() {
        let rt = mt();
        run(&rt, async {
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(100)
                .max_concurrent_loads(1)
                .record_stats()
                .build();
            let (gate_tx, gate_rx) = oneshot::channel::<()>();
            let (out_tx, out_rx) =
                std::sync::mpsc::channel::<Pin<Box<dyn Future<Output = u32> + Send>>>();
            let c = cache.clone();
            let parent = cache
                .get_with_async(1, async move {
                    let c2 = c.clone();
                    let mut child: Pin<Box<dyn Future<Output = u32> + Send>> =
                        Box::pin(async move {
                            c2.get_with_async(2, async move {
                                gate_rx.await.unwrap();
                                2
                            })
                            .await
                        });
                    let polled =
                        std::future::poll_fn(|cx| Poll::Ready(child.as_mut().poll(cx))).await;
                    assert!(polled.is_pending());
                    out_tx.send(child).unwrap();
                    1
                })
                .await;
            assert_eq!(parent, 1);
            let child = out_rx.recv().unwrap();
            let child = tokio::spawn(child);
            let third = {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get_with_async(3, async { 3 }).await })
            };
            until(|| cache.stats().loads_waited_for_limit >= 1 || third.is_finished()).await;
            assert!(
            !third.is_finished(),
            "a third load ran while the escaped child load (started under the parent's permit) still ran"
        );
            gate_tx.send(()).unwrap();
            assert_eq!(child.await.unwrap(), 2);
            assert_eq!(third.await.unwrap(), 3);
            assert!(cache.load_limit_stats().0 <= 1);
        });
    }

    /// get_with_async_shared: "Blocking callers never poll it ...: they wait, and load themselves
    /// if the async callers all went away", and "A cancelled load's future (with `init`) is
    /// dropped, in that caller's drop, before the key can load again: no two loads of a key
    /// overlap, a cancelled one included; a caller of the key that comes meanwhile waits for the
    /// drop, then loads." The cancelled `init`'s `Drop` lingers (yielding) and checks that the
    /// blocking caller's own load has not started meanwhile.
    #[test]
    fn shared_cancel_blocking_waiter_loads_after_drop_no_overlap() {
        let rt = mt();
        run(&rt, async {
            let cache = stats_cache();
            let blocking_started = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let overlap = Arc::new(std::sync::atomic::AtomicBool::new(false));
            struct Linger(
                Arc<std::sync::atomic::AtomicBool>,
                Arc<std::sync::atomic::AtomicBool>,
            );
            impl Drop for Linger {
                fn drop(&mut self) {
                    for _ in 0..20_000 {
                        if self.0.load(Ordering::SeqCst) {
                            self.1.store(true, Ordering::SeqCst);
                            return;
                        }
                        std::thread::yield_now();
                    }
                }
            }
            let linger = Linger(blocking_started.clone(), overlap.clone());
            let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                let _l = linger;
                std::future::pending::<String>().await
            }));
            assert!(poll_once(&mut leader).is_pending());
            let blocking = {
                let (cache, bs) = (cache.clone(), blocking_started.clone());
                std::thread::spawn(move || {
                    cache.get_with(1, || {
                        bs.store(true, Ordering::SeqCst);
                        "blocking".to_string()
                    })
                })
            };
            until(|| cache.stats().coalesced == 1).await;
            drop(leader);
            let v = tokio::task::spawn_blocking(move || blocking.join().unwrap())
                .await
                .unwrap();
            assert_eq!(v, "blocking");
            assert!(
                !overlap.load(Ordering::SeqCst),
                "the blocking load started while the cancelled init was still being dropped"
            );
            check_miss_identity(&cache);
        });
    }
}

/// Outside attack on wake-ups (helper 85): futures polled by hand with flag wakers, so that "woken but never polled again" is exact. A caller that is woken and then dropped without being polled must not take the others' wake-up with it.
mod wakers {

    use herdcache::Cache;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    struct Hand<F> {
        fut: Pin<Box<F>>,
        flag: Arc<Flag>,
    }

    impl<F: Future> Hand<F> {
        fn new(f: F) -> Self {
            Hand {
                fut: Box::pin(f),
                flag: Arc::new(Flag(AtomicBool::new(false))),
            }
        }
        fn poll(&mut self) -> Poll<F::Output> {
            self.flag.0.store(false, Ordering::SeqCst);
            let w = Waker::from(self.flag.clone());
            self.fut.as_mut().poll(&mut Context::from_waker(&w))
        }
        fn woken(&self) -> bool {
            self.flag.0.load(Ordering::SeqCst)
        }
    }

    /// Drives the remaining hands until all are ready, polling only woken ones; fails if no hand
    /// is woken while some are pending (a lost wake-up: a real executor would hang).
    fn drive<F: Future>(mut hands: Vec<Hand<F>>, what: &str) -> Vec<F::Output> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            if hands.is_empty() {
                return out;
            }
            let woken: Vec<usize> = (0..hands.len()).filter(|&i| hands[i].woken()).collect();
            assert!(
                !woken.is_empty(),
                "{what}: lost wake-up: {} caller(s) pending, none woken",
                hands.len()
            );
            for i in woken.into_iter().rev() {
                if let Poll::Ready(v) = hands[i].poll() {
                    out.push(v);
                    hands.remove(i);
                }
            }
        }
        panic!("{what}: did not settle");
    }

    /// Borrowed loads: leader dropped; the waiter(s) it wakes are dropped unpolled in turn; the
    /// last remaining waiter must still be woken and complete ("nobody is stranded").
    #[test]
    fn woken_waiter_dropped_unpolled_borrowed() {
        let cache: Cache<u32, u32> = Cache::new(100);
        let mut leader = Hand::new(cache.get_with_async(1, std::future::pending::<u32>()));
        assert!(leader.poll().is_pending());
        let mut ws: Vec<_> = (0..3u32)
            .map(|i| Hand::new(cache.get_with_async(1, async move { 10 + i })))
            .collect();
        for w in &mut ws {
            assert!(w.poll().is_pending());
        }
        drop(leader);
        // Drop every woken waiter but keep the last one standing.
        while ws.len() > 1 {
            let i = ws
                .iter()
                .position(|w| w.woken())
                .expect("lost wake-up after the leader was dropped");
            drop(ws.remove(i));
        }
        let out = drive(ws, "borrowed");
        assert_eq!(out.len(), 1);
        assert_eq!(cache.get(&1), Some(out[0]));
    }

    /// Same with a waiter that took over the load and is dropped mid-load (unpolled after its
    /// wake-up), then the next.
    #[test]
    fn takeover_leader_dropped_mid_load_next_waiter_woken() {
        let cache: Cache<u32, u32> = Cache::new(100);
        let mut leader = Hand::new(cache.get_with_async(1, std::future::pending::<u32>()));
        assert!(leader.poll().is_pending());
        let mut second = Hand::new(cache.get_with_async(1, std::future::pending::<u32>()));
        assert!(second.poll().is_pending());
        let mut third = Hand::new(cache.get_with_async(1, async { 3 }));
        assert!(third.poll().is_pending());
        drop(leader);
        // Whoever is woken polls; the second becomes leader (its init pends) if it gets there first.
        if second.woken() {
            assert!(second.poll().is_pending());
        }
        drop(second);
        let out = drive(vec![third], "takeover");
        assert_eq!(out, [3]);
    }

    /// Shared loads: the same, the last caller must drive the load.
    #[test]
    fn woken_waiter_dropped_unpolled_shared() {
        let cache: Cache<u32, u32> = Cache::new(100);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let mut leader = Hand::new(cache.get_with_async_shared(1, async move {
            let _ = gate_rx.await;
            8
        }));
        assert!(leader.poll().is_pending());
        let mut ws: Vec<_> = (0..3)
            .map(|_| Hand::new(cache.get_with_async_shared(1, async { 9 })))
            .collect();
        for w in &mut ws {
            assert!(w.poll().is_pending());
        }
        drop(leader);
        gate_tx.send(()).unwrap();
        while ws.len() > 1 {
            match ws.iter().position(|w| w.woken()) {
                Some(i) => drop(ws.remove(i)),
                None => panic!("lost wake-up: the load's future is ready but no caller is woken"),
            }
        }
        let out = drive(ws, "shared");
        assert_eq!(out, [8], "the last caller finishes the leader's load");
        assert_eq!(cache.get(&1), Some(8));
    }

    /// `max_concurrent_loads`: a permit granted to a queued load that is then dropped without
    /// being polled "passes on" to the next in line (its waker is called).
    #[test]
    fn granted_permit_dropped_unpolled_passes_on() {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .max_concurrent_loads(1)
            .build();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut holder = Hand::new(cache.get_with_async(100, async move {
            let _ = rx.await;
            100
        }));
        assert!(holder.poll().is_pending());
        let mut qs: Vec<_> = (1..=3u32)
            .map(|k| Hand::new(cache.get_with_async(k, async move { k })))
            .collect();
        for q in &mut qs {
            assert!(q.poll().is_pending(), "queued behind the permit");
        }
        tx.send(()).unwrap();
        assert!(holder.woken());
        assert_eq!(holder.poll(), Poll::Ready(100));
        drop(holder);
        while qs.len() > 1 {
            match qs.iter().position(|q| q.woken()) {
                Some(i) => drop(qs.remove(i)),
                None => panic!("lost wake-up: the permit was freed but no queued load is woken"),
            }
        }
        let out = drive(qs, "permit");
        assert_eq!(out.len(), 1);
        // The permit is free again.
        let mut again = Hand::new(cache.get_with_async(50, async { 50 }));
        assert_eq!(again.poll(), Poll::Ready(50));
    }

    /// A borrowed leader whose own `init` future is woken, but the leader is never polled again
    /// and finally dropped: its waiter must be woken on the drop.
    #[test]
    fn leader_woken_then_dropped_unpolled() {
        let cache: Cache<u32, u32> = Cache::new(100);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut leader = Hand::new(cache.get_with_async(1, async move {
            let _ = rx.await;
            1
        }));
        assert!(leader.poll().is_pending());
        let mut w = Hand::new(cache.get_with_async(1, async { 2 }));
        assert!(w.poll().is_pending());
        tx.send(()).unwrap();
        assert!(leader.woken());
        assert!(!w.woken(), "nothing for the waiter yet");
        drop(leader);
        let out = drive(vec![w], "leader dropped after wake");
        assert_eq!(out, [2]);
    }

    /// `max_concurrent_loads` (1): a blocking caller that holds the permit (inside its own load
    /// of key 0) joins a *shared* load of key 1 queued for a permit. Documented: a shared load
    /// "runs only while a caller that holds one polls it ... or blocks waiting for it (lending
    /// its permit ...)". The async caller of the shared load must be woken to poll it under the
    /// lent permit — else the blocking caller waits for a load that waits for its permit
    /// (deadlock). Wake-ups are checked exactly (a flag waker), no executor involved.
    #[test]
    fn blocking_permit_holder_lends_permit_to_shared_load() {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .max_concurrent_loads(1)
            .record_stats()
            .build();
        let (in_loader_tx, in_loader_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let b = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let c = cache.clone();
                cache.get_with(0, move || {
                    in_loader_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    c.get_with(1, || 10) + 1
                })
            })
        };
        in_loader_rx.recv().unwrap();
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let mut a = Hand::new(cache.get_with_async_shared(1, async move {
            let _ = gate_rx.await;
            20
        }));
        assert!(a.poll().is_pending(), "queued for the permit B holds");
        go_tx.send(()).unwrap();
        // B now joins key 1's load: it lends its permit (A must be woken to poll under it) or
        // takes the load over (B finishes). Watchdog: 30 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !a.woken() && !b.is_finished() {
            std::thread::yield_now();
            assert!(
                std::time::Instant::now() < deadline,
                "watchdog: A never woken while B waits on its load"
            );
        }
        // Either B lent its permit and A polls the shared init under it (A's init then waits for
        // the gate), or B took the unstarted load over with its own closure (`get_with`: a nested
        // load "takes over a load of its key whose leader still waits for a permit"): then A is
        // answered with B's value. Either way one load, one value for both, and no lost wake-up.
        gate_tx.send(()).unwrap();
        let out = drive(vec![a], "lent permit");
        let bv = b.join().unwrap();
        assert!(out == [20] || out == [10], "{out:?}");
        assert_eq!(
            bv,
            out[0] + 1,
            "B's nested get_with(1) and A saw different loads of key 1"
        );
        let s = cache.stats();
        assert_eq!(
            s.load_successes, 2,
            "one load of key 0, one of key 1: {s:?}"
        );
        assert!(cache.load_limit_stats().0 <= 1);
    }

    /// `max_concurrent_loads` (1): "A caller inside a load that joins a load of another key
    /// waiting for a permit: if that load is shared, an async caller polls it under its permit
    /// (its `init` runs ...)". An async load of key 0 holding the only permit awaits key 1, whose
    /// shared load (another caller's, `init` = 20) is queued for a permit: the nested caller
    /// must drive *that* `init` under its permit (result 21), not deadlock.
    #[test]
    fn async_permit_holder_drives_queued_shared_load() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                let cache: Cache<u32, u32> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .record_stats()
                    .build();
                let (in_tx, in_rx) = tokio::sync::oneshot::channel::<()>();
                let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
                let outer = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        let c = cache.clone();
                        cache
                            .get_with_async(0, async move {
                                in_tx.send(()).unwrap();
                                go_rx.await.unwrap();
                                c.get_with_async_shared(1, async { 99 }).await + 1
                            })
                            .await
                    })
                };
                in_rx.await.unwrap();
                let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
                let mut a = Hand::new(cache.get_with_async_shared(1, async move {
                    let _ = gate_rx.await;
                    20
                }));
                assert!(a.poll().is_pending());
                go_tx.send(()).unwrap();
                gate_tx.send(()).unwrap();
                assert_eq!(outer.await.unwrap(), 21, "the nested caller ran A's init");
                assert!(a.woken());
                assert_eq!(a.poll(), Poll::Ready(20));
                assert!(cache.load_limit_stats().0 <= 1);
            })
            .await
            .expect("watchdog: hung");
        });
    }

    /// Continuation of the above: the permit-holding outer load that drives the queued shared
    /// load is cancelled mid-way (its task aborted while the shared `init` waits). The shared
    /// load's own caller A is still waiting: it must be woken and finish the load (under a
    /// permit of its own, now free), and the limit must hold: "a load whose parent stopped
    /// waiting for it ... does not go on beside its parent under the parent's permit".
    #[test]
    fn shared_load_driven_by_cancelled_permit_holder_goes_on() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                let cache: Cache<u32, u32> = Cache::builder()
                    .max_capacity(100)
                    .max_concurrent_loads(1)
                    .record_stats()
                    .build();
                let (in_tx, in_rx) = tokio::sync::oneshot::channel::<()>();
                let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
                let polled = Arc::new(tokio::sync::Notify::new());
                let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
                let p2 = polled.clone();
                let mut a = Hand::new(cache.get_with_async_shared(1, async move {
                    p2.notify_one();
                    let _ = gate_rx.await;
                    20
                }));
                let outer = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        let c = cache.clone();
                        cache
                            .get_with_async(0, async move {
                                in_tx.send(()).unwrap();
                                go_rx.await.unwrap();
                                c.get_with_async_shared(1, async { 99 }).await + 1
                            })
                            .await
                    })
                };
                in_rx.await.unwrap();
                assert!(
                    a.poll().is_pending(),
                    "queued for the permit the outer load holds"
                );
                go_tx.send(()).unwrap();
                polled.notified().await; // the outer load's nested caller started A's init
                outer.abort();
                assert!(outer.await.unwrap_err().is_cancelled());
                gate_tx.send(()).unwrap();
                // A must now be woken and finish.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                let v = loop {
                    if a.woken() {
                        if let Poll::Ready(v) = a.poll() {
                            break v;
                        }
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "watchdog: A never completed (lost wake-up or permit)"
                    );
                    tokio::task::yield_now().await;
                };
                assert!(v == 20 || v == 99, "{v}");
                assert_eq!(cache.get(&1), Some(v));
                assert_eq!(
                    cache.get_with_async(2, async { 2 }).await,
                    2,
                    "the permit is free"
                );
                assert!(cache.load_limit_stats().0 <= 1);
                assert_eq!(cache.stats().loads_in_flight, 0);
            })
            .await
            .expect("watchdog: hung");
        });
    }
}

/// Outside attack on the entry / compute API (helper 85).
mod entry {

    use herdcache::{Cache, CompResult, ManualClock, Op, RemovalCause};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier, Mutex};
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<(u32, u32, RemovalCause)>>>;

    fn logged(cap: u64) -> (Cache<u32, u32>, Log) {
        let log: Log = Arc::default();
        let l = log.clone();
        let cache = Cache::<u32, u32>::builder()
            .max_capacity(cap)
            .eviction_listener(move |k, v, c| l.lock().unwrap().push((*k, *v, c)))
            .record_stats()
            .build();
        (cache, log)
    }

    /// Runs `f` on a thread; fails if it does not finish within the watchdog.
    fn watchdog<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("watchdog: test hung"),
        }
    }

    /// Each `Op` on a present / absent key gives the documented `CompResult`, and the listener
    /// hears a `Put` over a value as `Replaced` ("An `insert` replaced its value"; moka reports
    /// `Replaced` for a compute's upsert) and a `Remove` as `Explicit`.
    #[test]
    fn every_op_variant_result_and_cause() {
        let (cache, log) = logged(100);
        assert!(
            matches!(cache.entry(1).and_compute_with(|_| Op::Nop), CompResult::StillNone(k) if k == 1)
        );
        assert!(matches!(
            cache.entry(1).and_compute_with(|_| Op::Remove),
            CompResult::StillNone(_)
        ));
        assert!(
            matches!(cache.entry(1).and_compute_with(|_| Op::Put(10)), CompResult::Inserted(e) if *e.value() == 10)
        );
        assert!(
            matches!(cache.entry(1).and_compute_with(|_| Op::Nop), CompResult::Unchanged(e) if *e.value() == 10)
        );
        let r = cache
            .entry(1)
            .and_compute_with(|e| Op::Put(e.unwrap().value() + 1));
        assert!(
            matches!(&r, CompResult::ReplacedWith(e) if *e.value() == 11 && e.is_old_value_replaced())
        );
        assert!(
            matches!(cache.entry(1).and_compute_with(|_| Op::Remove), CompResult::Removed(e) if *e.value() == 11)
        );
        assert_eq!(cache.get(&1), None);
        assert_eq!(
            *log.lock().unwrap(),
            [
                (1, 10, RemovalCause::Replaced),
                (1, 11, RemovalCause::Explicit)
            ]
        );
        let s = cache.stats();
        assert_eq!(
            (s.replaced.count, s.explicit.count, s.loads_in_flight),
            (1, 1, 0)
        );
        cache.validate();
    }

    /// "If `f` panics (the key's other callers are released first)": the value is unchanged, a
    /// caller blocked on the key gets a value, and the key can be computed again.
    #[test]
    fn compute_panic_releases_waiters_and_keeps_old_value() {
        watchdog(|| {
            let (cache, log) = logged(100);
            cache.insert(1, 5);
            let (in_f, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let t = {
                let (cache, in_f, go) = (cache.clone(), in_f.clone(), go.clone());
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cache.entry(1).and_compute_with(|_| {
                            in_f.wait();
                            go.wait();
                            panic!("compute boom")
                        })
                    }))
                    .is_err()
                })
            };
            in_f.wait();
            let waiter = {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    cache
                        .entry(1)
                        .and_upsert_with(|e| e.unwrap().into_value() * 2)
                        .into_value()
                })
            };
            // Let the waiter queue on the key (it cannot finish before `go`); either way the
            // outcome below is the same.
            go.wait();
            assert!(t.join().unwrap(), "the panic reaches the computing caller");
            assert_eq!(waiter.join().unwrap(), 10);
            assert_eq!(cache.get(&1), Some(10));
            assert_eq!(*log.lock().unwrap(), [(1, 5, RemovalCause::Replaced)]);
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    /// "`f` runs with no lock held and may use the cache, except to compute or load this same
    /// key": reads and writes of other keys (and an `entry` computation of another key) inside
    /// `f` work.
    #[test]
    fn compute_reentering_other_keys_works() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(2, 20);
            let r = cache.entry(1).and_compute_with(|_| {
                let two = cache.get(&2).unwrap();
                cache.insert(3, 30);
                cache.invalidate(&2);
                let four = cache.get_with(4, || 40);
                let five = cache.entry(5).and_upsert_with(|_| 50).into_value();
                Op::Put(two + four + five)
            });
            assert!(matches!(r, CompResult::Inserted(e) if *e.value() == 110));
            assert_eq!(
                (
                    cache.get(&1),
                    cache.get(&2),
                    cache.get(&3),
                    cache.get(&4),
                    cache.get(&5)
                ),
                (Some(110), None, Some(30), Some(40), Some(50))
            );
            cache.validate();
        });
    }

    /// "a recursive load panics": loading or computing the same key inside `f` panics instead of
    /// deadlocking; afterwards the key is free and unchanged.
    #[test]
    fn compute_same_key_recursion_panics_not_deadlocks() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(1, 1);
            let c = cache.clone();
            // A get_with of the same key finds the value (a hit, no load: no recursion)...
            let r = cache
                .entry(1)
                .and_compute_with(|_| Op::Put(c.get_with(1, || 7) + 1));
            assert!(matches!(r, CompResult::ReplacedWith(e) if *e.value() == 2));
            cache.insert(1, 1);
            // ...but on an absent key it is a recursive load, which panics.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                cache
                    .entry(3)
                    .and_compute_with(|_| Op::Put(c.get_with(3, || 7)))
            }));
            assert!(r.is_err());
            assert_eq!(cache.get(&3), None);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                cache
                    .entry(1)
                    .and_compute_with(|_| c.entry(1).and_compute_with(|_| Op::Put(9)).into_nop())
            }));
            assert!(r.is_err());
            assert_eq!(cache.get(&1), Some(1));
            assert_eq!(cache.entry(1).and_upsert_with(|_| 2).into_value(), 2);
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    trait IntoNop {
        fn into_nop(self) -> Op<u32>;
    }
    impl IntoNop for CompResult<u32, u32> {
        fn into_nop(self) -> Op<u32> {
            Op::Nop
        }
    }

    /// "A plain `insert` or `invalidate` of the key while `f` runs wins over the verdict: a `Put`
    /// is returned but not stored, a `Remove` leaves the newer value in place." Writes of the
    /// same key made from inside `f` itself (same thread) are such writes; and a plain `get` of
    /// the same key inside `f` is allowed (only loads/computations recurse).
    #[test]
    fn same_key_plain_writes_inside_compute_win() {
        watchdog(|| {
            let (cache, log) = logged(100);
            cache.insert(1, 1);
            let r = cache.entry(1).and_compute_with(|e| {
                assert_eq!(cache.get(&1), Some(1));
                cache.insert(1, 100);
                Op::Put(e.unwrap().value() + 1)
            });
            assert!(matches!(r, CompResult::ReplacedWith(e) if *e.value() == 2));
            assert_eq!(cache.get(&1), Some(100), "the insert during f wins");
            let r = cache.entry(1).and_compute_with(|_| {
                cache.insert(1, 200);
                Op::Remove
            });
            assert!(matches!(r, CompResult::Removed(_)));
            assert_eq!(cache.get(&1), Some(200), "a Remove leaves the newer value");
            let r = cache.entry(1).and_compute_with(|_| {
                cache.invalidate(&1);
                Op::Put(3)
            });
            assert!(matches!(r, CompResult::ReplacedWith(_)));
            assert_eq!(cache.get(&1), None, "the invalidate during f wins");
            // Every value that left is reported once: 1 (Replaced by 100), 100 (Replaced by 200),
            // 200 (Explicit).
            let mut l = log.lock().unwrap().clone();
            l.sort_by_key(|e| (e.0, e.1));
            assert_eq!(
                l,
                [
                    (1, 1, RemovalCause::Replaced),
                    (1, 100, RemovalCause::Replaced),
                    (1, 200, RemovalCause::Explicit)
                ]
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    /// Insert racing a compute from another thread (ordered with barriers so the insert lands
    /// while `f` runs): the insert wins; and with the insert landing *before* the computation
    /// locks the key, the computation sees it ("a write that lands before that read is read
    /// again, so a verdict always applies to the value it was given").
    #[test]
    fn insert_racing_compute_no_lost_update() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(1, 0);
            let (in_f, done) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let t = {
                let (cache, in_f, done) = (cache.clone(), in_f.clone(), done.clone());
                std::thread::spawn(move || {
                    cache.entry(1).and_compute_with(|e| {
                        in_f.wait();
                        done.wait();
                        Op::Put(e.unwrap().value() + 1)
                    })
                })
            };
            in_f.wait();
            cache.insert(1, 50); // never waits for the computation
            done.wait();
            let r = t.join().unwrap();
            assert!(matches!(r, CompResult::ReplacedWith(e) if *e.value() == 1));
            assert_eq!(cache.get(&1), Some(50));
        });
    }

    /// No lost update under concurrent upserts mixed with inserts: increments from 2 threads
    /// (100 each) plus a final read: every increment applies to the value it read, so with no
    /// inserts the sum is exact.
    #[test]
    fn concurrent_upserts_are_atomic() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            let b = Arc::new(Barrier::new(2));
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (cache, b) = (cache.clone(), b.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        for _ in 0..100 {
                            cache
                                .entry(1)
                                .and_upsert_with(|e| e.map_or(1, |e| e.into_value() + 1));
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(cache.get(&1), Some(200));
        });
    }

    /// README: "An expired entry is gone as soon as its deadline passes ...: a computation sees
    /// `None`, and when it is replaced or invalidated the listener hears `Expired` for it."
    #[test]
    fn compute_over_expired_entry_sees_none_listener_hears_expired() {
        let clock = ManualClock::new();
        let log: Log = Arc::default();
        let l = log.clone();
        let cache = Cache::<u32, u32>::builder()
            .max_capacity(10)
            .time_to_live(Duration::from_secs(10))
            .clock(clock.clone())
            .eviction_listener(move |k, v, c| l.lock().unwrap().push((*k, *v, c)))
            .build();
        cache.insert(1, 1);
        clock.advance(Duration::from_secs(11));
        let r = cache.entry(1).and_compute_with(|e| {
            assert!(e.is_none(), "a computation sees None for an expired entry");
            Op::Put(2)
        });
        assert!(matches!(r, CompResult::Inserted(_)));
        assert_eq!(cache.get(&1), Some(2));
        assert_eq!(*log.lock().unwrap(), [(1, 1, RemovalCause::Expired)]);
        cache.validate();
    }

    /// Callers loading the key while `f` runs "wait for it and take its value".
    #[test]
    fn loaders_during_compute_take_its_value() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            let (in_f, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let t = {
                let (cache, in_f, go) = (cache.clone(), in_f.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.entry(1).and_compute_with(|_| {
                        in_f.wait();
                        go.wait();
                        Op::Put(7)
                    })
                })
            };
            in_f.wait();
            let loads = Arc::new(AtomicUsize::new(0));
            let w = {
                let (cache, loads) = (cache.clone(), loads.clone());
                std::thread::spawn(move || {
                    cache.get_with(1, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        99
                    })
                })
            };
            while cache.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            go.wait();
            t.join().unwrap();
            assert_eq!(w.join().unwrap(), 7);
            assert_eq!(loads.load(Ordering::SeqCst), 0);
        });
    }

    /// `entry_count`, `weighted_size` and `iter()` agree after mixed concurrent entry operations
    /// (with a weigher and a TTL on a manual clock) and `run_pending_tasks`.
    #[test]
    fn counts_and_weight_match_iteration_after_mixed_ops() {
        watchdog(|| {
            let clock = ManualClock::new();
            let cache = Cache::<u32, u32>::builder()
                .max_capacity(400)
                .weigher(|_k, v| v % 7 + 1)
                .time_to_live(Duration::from_secs(10))
                .clock(clock.clone())
                .build();
            let b = Arc::new(Barrier::new(2));
            let hs: Vec<_> = (0..2u32)
                .map(|t| {
                    let (cache, b) = (cache.clone(), b.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        for i in 0..300u32 {
                            let k = (i * 7 + t) % 97;
                            match i % 5 {
                                0 => drop(cache.entry(k).and_compute_with(|e| match e {
                                    Some(e) if e.value() % 2 == 0 => Op::Remove,
                                    Some(e) => Op::Put(e.into_value() + 3),
                                    None => Op::Put(k),
                                })),
                                1 => drop(cache.entry(k).or_insert_with(|| k + 1)),
                                2 => cache.insert(k, i),
                                3 => cache.invalidate(&(k + 1)),
                                _ => drop(
                                    cache
                                        .entry(k)
                                        .and_upsert_with(|e| e.map_or(0, |e| e.into_value() + 1)),
                                ),
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            cache.run_pending_tasks();
            let check = |label: &str| {
                let items: Vec<_> = cache.iter().collect();
                let w: u64 = items.iter().map(|(_, v)| u64::from(v % 7 + 1)).sum();
                assert_eq!(cache.entry_count(), items.len() as u64, "{label}: count");
                assert_eq!(cache.weighted_size(), w, "{label}: weight");
                assert!(w <= 400);
                cache.validate();
            };
            check("after ops");
            clock.advance(Duration::from_secs(11));
            cache.run_pending_tasks();
            assert_eq!((cache.entry_count(), cache.weighted_size()), (0, 0));
            check("after expiry");
        });
    }

    /// Runs `and_compute_with(key, Put(v))` on a thread, pausing inside `f` while `during` runs
    /// on this thread; returns the result.
    fn compute_around(
        cache: &Cache<u32, u32>,
        key: u32,
        v: u32,
        during: impl FnOnce(),
    ) -> CompResult<u32, u32> {
        let (in_f, done) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let t = {
            let (cache, in_f, done) = (cache.clone(), in_f.clone(), done.clone());
            std::thread::spawn(move || {
                cache.entry(key).and_compute_with(|_| {
                    in_f.wait();
                    done.wait();
                    Op::Put(v)
                })
            })
        };
        in_f.wait();
        during();
        done.wait();
        t.join().unwrap()
    }

    /// `invalidate_all` "Removes every entry, at one instant" and "An `invalidate` cannot be
    /// undone by a load that began before it" / compute: "A plain `insert` or `invalidate` of the
    /// key while `f` runs wins over the verdict". A computation running across `invalidate_all`
    /// (on a present key, and on an absent key) must not store its `Put` afterwards.
    #[test]
    fn invalidate_all_during_compute_wins() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(1, 1);
            let r = compute_around(&cache, 1, 2, || cache.invalidate_all());
            assert!(matches!(r, CompResult::ReplacedWith(_)));
            assert_eq!(
                cache.get(&1),
                None,
                "present key: the Put came back after invalidate_all"
            );
            let r = compute_around(&cache, 3, 4, || cache.invalidate_all());
            assert!(matches!(r, CompResult::Inserted(_)));
            assert_eq!(
                cache.get(&3),
                None,
                "absent key: the Put came back after invalidate_all"
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
        });
    }

    /// `retain` / `invalidate_entries_if`: "An entry `keep` removes is removed as by
    /// `invalidate`: a load or refresh of its key in flight is superseded ... A load of a key that
    /// has no entry (being loaded for the first time) is not touched". Applied to computations.
    #[test]
    fn invalidate_entries_if_during_compute() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(1, 1);
            let r = compute_around(&cache, 1, 2, || {
                cache.invalidate_entries_if(|_, _| true).unwrap()
            });
            assert!(matches!(r, CompResult::ReplacedWith(_)));
            assert_eq!(
                cache.get(&1),
                None,
                "the removed entry's computation was not superseded"
            );
            let r = compute_around(&cache, 1, 5, || cache.retain(|_, _| true));
            assert!(matches!(r, CompResult::Inserted(_)));
            assert_eq!(
                cache.get(&1),
                Some(5),
                "a retain that keeps everything changes nothing"
            );
        });
    }

    /// `get_with_if`: "a replacement replaces the value it was judged on — twice at most: under
    /// a steady stream of writes to the key, a third such write is treated as one that lands
    /// while `init` runs (it wins), so the call always ends". A `replace_if` that itself writes
    /// the key every time it is asked (the harshest stream of writes) must not loop forever;
    /// and the final value is a write's (the write wins over `init`'s value), never lost.
    #[test]
    fn get_with_if_under_writes_from_replace_if_terminates() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(1, 0);
            let asked = AtomicUsize::new(0);
            let c = cache.clone();
            let v = cache.get_with_if(
                1,
                || 1000,
                |v| {
                    asked.fetch_add(1, Ordering::SeqCst);
                    c.insert(1, v + 1);
                    true
                },
            );
            let n = asked.load(Ordering::SeqCst);
            assert!(n <= 4, "replace_if asked {n} times");
            assert_eq!(v, 1000, "init's value is returned");
            let fin = cache.get(&1).unwrap();
            assert!(
                fin >= 1 && fin <= n as u32,
                "the last write ({n}) should stand, found {fin}"
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    /// No lost update with computations and plain inserts racing: two threads increment with
    /// `and_upsert_with`, a third inserts distinct bases (`1_000_000 * j`). A verdict "always
    /// applies to the value it was given" and a write during `f` wins, so a result can repeat
    /// only for an increment that lost to an insert (at most one per insert per thread), and the
    /// final value is the last increment on the last base (or that base itself).
    #[test]
    fn upserts_racing_inserts_linearizable() {
        watchdog(|| {
            let (cache, _log) = logged(100);
            cache.insert(1, 0);
            let b = Arc::new(Barrier::new(3));
            let ups: Vec<_> = (0..2)
                .map(|_| {
                    let (cache, b) = (cache.clone(), b.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        (0..300)
                            .map(|_| {
                                let e = cache
                                    .entry(1)
                                    .and_upsert_with(|e| e.map_or(0, |e| e.into_value()) + 1);
                                *e.value()
                            })
                            .collect::<Vec<u32>>()
                    })
                })
                .collect();
            let ins = {
                let (cache, b) = (cache.clone(), b.clone());
                std::thread::spawn(move || {
                    b.wait();
                    for j in 1..=30u32 {
                        cache.insert(1, 1_000_000 * j);
                        std::thread::yield_now();
                    }
                })
            };
            let mut all: Vec<u32> = Vec::new();
            for h in ups {
                all.extend(h.join().unwrap());
            }
            ins.join().unwrap();
            let fin = cache.get(&1).unwrap();
            // Group results by base: within a base, results form 1..=n with possible duplicates
            // only from increments that lost to an insert (returned, not stored). Those lost ones
            // are at most one per insert (the computation running when the insert landed) per
            // thread.
            let mut sorted = all.clone();
            sorted.sort();
            let dups = sorted.windows(2).filter(|w| w[0] == w[1]).count();
            assert!(dups <= 2 * 30, "{dups} duplicate increments: lost updates");
            let base = fin / 1_000_000 * 1_000_000;
            let top = all
                .iter()
                .copied()
                .filter(|v| v / 1_000_000 * 1_000_000 == base)
                .max()
                .unwrap_or(base);
            assert!(
                fin == top || fin == base,
                "final {fin} is neither the last increment {top} nor a base"
            );
        });
    }
}

/// Outside attack on the eviction listener and removal causes (helper 85).
mod listener {

    use herdcache::{Cache, ManualClock, Op, RemovalCause};
    use std::collections::HashMap;
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier, Mutex};
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<(u32, u64, RemovalCause)>>>;

    fn watchdog<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("watchdog: test hung"),
        }
    }

    /// "Calls `listener(&key, &value, cause)` exactly once for every entry that leaves the
    /// cache". Every written value is unique; after concurrent inserts, invalidates, computes
    /// and expiry (manual clock) with a small capacity, then `invalidate_all`, every value
    /// written is reported exactly once, with a cause consistent with how it could leave, and the
    /// per-cause stats agree with the listener.
    #[test]
    fn every_value_reported_exactly_once_under_concurrent_writes() {
        watchdog(|| {
            let clock = ManualClock::new();
            let log: Log = Arc::default();
            let l = log.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(16)
                .time_to_live(Duration::from_secs(100))
                .clock(clock.clone())
                .record_stats()
                .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
                .build();
            let threads = 3u64;
            let b = Arc::new(Barrier::new(threads as usize));
            let written = Arc::new(Mutex::new(Vec::new()));
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let (cache, b, clock, written) =
                        (cache.clone(), b.clone(), clock.clone(), written.clone());
                    std::thread::spawn(move || {
                        let mut mine = Vec::new();
                        b.wait();
                        for i in 0..400u64 {
                            let v = t << 32 | i;
                            let k = ((i * 13 + t * 5) % 40) as u32;
                            match i % 6 {
                                0 | 1 => {
                                    cache.insert(k, v);
                                    mine.push(v);
                                }
                                2 => {
                                    let r = cache.entry(k).and_compute_with(|e| match e {
                                        Some(e) if e.value() % 3 == 0 => Op::Remove,
                                        _ => Op::Put(v),
                                    });
                                    if matches!(
                                        r,
                                        herdcache::CompResult::Inserted(_)
                                            | herdcache::CompResult::ReplacedWith(_)
                                    ) {
                                        mine.push(v);
                                    }
                                }
                                3 => cache.invalidate(&k),
                                4 => {
                                    let e = cache.entry(k).or_insert_with(|| v);
                                    if e.is_fresh() {
                                        mine.push(v);
                                    }
                                }
                                _ => {
                                    if t == 0 && i % 60 == 5 {
                                        clock.advance(Duration::from_secs(60));
                                    }
                                    let _ = cache.get(&k);
                                }
                            }
                        }
                        written.lock().unwrap().extend(mine);
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            // Everything still present is reported when we clear.
            let present: Vec<_> = cache.iter().collect();
            cache.invalidate_all();
            let log = log.lock().unwrap().clone();
            let mut seen: HashMap<u64, (u32, RemovalCause)> = HashMap::new();
            for (k, v, c) in &log {
                assert!(
                    seen.insert(*v, (*k, *c)).is_none(),
                    "value {v:#x} of key {k} reported twice"
                );
            }
            let written = written.lock().unwrap().clone();
            // A Put that lost to a concurrent write is returned but not stored; so values written
            // by `and_compute_with` may legitimately never enter. Inserts always enter.
            for v in &written {
                let _ = v;
            }
            let mut missing = Vec::new();
            for (i, v) in written.iter().enumerate() {
                // plain inserts are at i % 6 in {0,1}: recompute from the value
                let idx = v & 0xffff_ffff;
                if idx % 6 <= 1 && !seen.contains_key(v) {
                    missing.push((i, *v));
                }
            }
            assert!(
                missing.is_empty(),
                "inserted values never reported: {:x?}",
                &missing[..missing.len().min(5)]
            );
            for (_, v) in &present {
                assert!(seen.contains_key(v));
            }
            assert!(
                seen.keys().all(|v| written.contains(v)),
                "a value reported that was never stored"
            );
            let s = cache.stats();
            let count = |c: RemovalCause| log.iter().filter(|e| e.2 == c).count() as u64;
            assert_eq!(
                s.expired.count,
                count(RemovalCause::Expired),
                "stats vs listener: expired"
            );
            assert_eq!(s.explicit.count, count(RemovalCause::Explicit), "explicit");
            assert_eq!(s.replaced.count, count(RemovalCause::Replaced), "replaced");
            assert_eq!(s.size.count, count(RemovalCause::Size), "size");
            assert_eq!(cache.entry_count(), 0);
            cache.validate();
        });
    }

    /// A race on one expired entry: several threads `remove`, `get`, `insert` and
    /// `run_pending_tasks` at once; the expired value is reported exactly once, as `Expired`.
    #[test]
    fn expired_entry_reclaimed_by_racing_calls_reported_once() {
        watchdog(|| {
            for round in 0..20u64 {
                let clock = ManualClock::new();
                let log: Log = Arc::default();
                let l = log.clone();
                let cache = Cache::<u32, u64>::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(1))
                    .clock(clock.clone())
                    .eviction_listener(move |k: &u32, v: &u64, c| {
                        l.lock().unwrap().push((*k, *v, c))
                    })
                    .build();
                cache.insert(1, round);
                clock.advance(Duration::from_secs(2));
                let b = Arc::new(Barrier::new(4));
                let hs: Vec<_> = (0..4)
                    .map(|t| {
                        let (cache, b) = (cache.clone(), b.clone());
                        std::thread::spawn(move || {
                            b.wait();
                            match t {
                                0 => assert_eq!(cache.remove(&1), None),
                                1 => assert_eq!(cache.get(&1), None),
                                2 => cache.run_pending_tasks(),
                                _ => cache.invalidate(&1),
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
                assert_eq!(*log.lock().unwrap(), [(1, round, RemovalCause::Expired)]);
                assert_eq!(cache.entry_count(), 0);
            }
        });
    }

    /// "If it panics, the cache stays consistent: the operation that removed the entries has
    /// completed, every other removed entry of that operation is still reported, and the first
    /// panic is then resumed in that operation's caller."
    #[test]
    fn panicking_listener_invalidate_all_reports_all_and_completes() {
        watchdog(|| {
            let log: Log = Arc::default();
            let l = log.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(100)
                .shards(4)
                .eviction_listener(move |k: &u32, v: &u64, c| {
                    l.lock().unwrap().push((*k, *v, c));
                    if *k % 3 == 0 {
                        panic!("listener boom {k}");
                    }
                })
                .build();
            for k in 0..30 {
                cache.insert(k, u64::from(k));
            }
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.invalidate_all()));
            assert!(r.is_err(), "the listener's panic reaches the caller");
            assert_eq!(cache.entry_count(), 0);
            assert_eq!(cache.weighted_size(), 0);
            let mut ks: Vec<_> = log.lock().unwrap().iter().map(|e| e.0).collect();
            ks.sort();
            assert_eq!(ks, (0..30).collect::<Vec<_>>());
            assert!(log
                .lock()
                .unwrap()
                .iter()
                .all(|e| e.2 == RemovalCause::Explicit));
            // Still usable, still notifies.
            cache.insert(1, 1);
            cache.insert(1, 2);
            assert_eq!(
                log.lock().unwrap().last(),
                Some(&(1, 1, RemovalCause::Replaced))
            );
            cache.validate();
        });
    }

    /// A panicking listener on the insert that replaced a value: the insert completed (the new
    /// value is stored) and the panic reaches the inserting caller.
    #[test]
    fn panicking_listener_on_replace_still_stores_new_value() {
        let cache = Cache::<u32, u64>::builder()
            .max_capacity(100)
            .eviction_listener(|_k: &u32, _v: &u64, _c| panic!("listener boom"))
            .build();
        cache.insert(1, 1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.insert(1, 2)));
        assert!(r.is_err());
        assert_eq!(cache.get(&1), Some(2));
        assert_eq!(cache.entry_count(), 1);
        cache.validate();
    }

    /// A panicking listener during a load's store (the load's value evicts another entry for
    /// size): the leader's caller sees the panic, but a waiter on that load must not hang, and
    /// the cache is consistent afterwards (no load left in flight).
    #[test]
    fn panicking_listener_during_load_store_does_not_strand_waiters() {
        watchdog(|| {
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(1)
                .shards(1)
                .eviction_policy(herdcache::EvictionPolicy::lru())
                .record_stats()
                .eviction_listener(|_k: &u32, _v: &u64, _c| panic!("listener boom"))
                .build();
            cache.insert(0, 0);
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let leader = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cache.get_with(1, || {
                            in_init.wait();
                            go.wait();
                            11
                        })
                    }))
                })
            };
            in_init.wait();
            let waiter = {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cache.get_with(1, || 22)
                    }))
                })
            };
            while cache.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            go.wait();
            let l = leader.join().unwrap();
            let w = waiter.join().unwrap();
            assert!(l.is_err(), "the leader's store ran the panicking listener");
            // "the operation that removed the entries has completed": the loaded value is stored,
            // and the waiter (released after the store) gets it.
            assert_eq!(cache.get(&1), Some(11), "the load's store did not complete");
            assert_eq!(w.ok(), Some(11), "the waiter did not get the stored value");
            assert_eq!(cache.stats().loads_in_flight, 0);
            assert!(cache.entry_count() <= 1);
            cache.validate();
        });
    }

    /// The listener "may call back into the cache": a listener that reads the removed key, reads
    /// other keys, writes a different key (an archive namespace, itself evicting), and queries
    /// counts, under concurrent writers: no deadlock, and every written value is reported once.
    #[test]
    fn reentrant_listener_no_deadlock_no_lost_reports() {
        watchdog(|| {
            let log: Log = Arc::default();
            let l = log.clone();
            let handle: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::default();
            let h2 = handle.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(8)
                .eviction_listener(move |k: &u32, v: &u64, c| {
                    l.lock().unwrap().push((*k, *v, c));
                    let c2 = h2.lock().unwrap().clone();
                    if let Some(cache) = c2 {
                        let _ = cache.get(k);
                        let _ = cache.entry_count();
                        let _ = cache.contains_key(&(k ^ 1));
                        if *k < 1000 && c == RemovalCause::Size {
                            // Archive: a write that may itself evict (re-entrant listener call).
                            cache.insert(k + 1000, *v);
                        }
                        if *k >= 1000 && c == RemovalCause::Size {
                            let _ = cache.entry(k - 1000).and_compute_with(|_| Op::Nop);
                        }
                    }
                })
                .build();
            *handle.lock().unwrap() = Some(cache.clone());
            let b = Arc::new(Barrier::new(2));
            let hs: Vec<_> = (0..2u64)
                .map(|t| {
                    let (cache, b) = (cache.clone(), b.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        for i in 0..200u64 {
                            let k = ((i * 3 + t) % 50) as u32;
                            cache.insert(k, t << 32 | i);
                            if i % 7 == 0 {
                                cache.invalidate(&(k + 1));
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            *handle.lock().unwrap() = None;
            cache.invalidate_all();
            let log = log.lock().unwrap().clone();
            // Every value inserted by the writers is reported at least once under its key, and
            // each (key, value) pair exactly once.
            let mut seen = HashMap::new();
            for (k, v, c) in &log {
                assert!(
                    seen.insert((*k, *v), *c).is_none(),
                    "({k}, {v:#x}) reported twice"
                );
            }
            for t in 0..2u64 {
                for i in 0..200u64 {
                    let k = ((i * 3 + t) % 50) as u32;
                    assert!(
                        seen.contains_key(&(k, t << 32 | i)),
                        "({k}, {:#x}) never reported",
                        t << 32 | i
                    );
                }
            }
            assert_eq!(cache.entry_count(), 0);
            cache.validate();
        });
    }

    /// `invalidate_entries_if` while a load of a key that has no entry is in flight: documented
    /// as not touching it ("A load of a key that has no entry ... is not touched") — the value is
    /// stored; and when the key had a (matching) entry being reloaded, the reload is superseded.
    #[test]
    fn invalidate_entries_if_vs_in_flight_loads() {
        watchdog(|| {
            let cache = Cache::<u32, u64>::builder().max_capacity(100).build();
            cache.insert(2, 2);
            let (in_init, go) = (Arc::new(Barrier::new(3)), Arc::new(Barrier::new(3)));
            let fresh = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.get_with(1, || {
                        in_init.wait();
                        go.wait();
                        10
                    })
                })
            };
            let reload = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.get_with_if(
                        2,
                        || {
                            in_init.wait();
                            go.wait();
                            20
                        },
                        |_| true,
                    )
                })
            };
            in_init.wait();
            cache.invalidate_entries_if(|_, _| true).unwrap();
            go.wait();
            assert_eq!(fresh.join().unwrap(), 10);
            assert_eq!(reload.join().unwrap(), 20);
            assert_eq!(cache.get(&1), Some(10), "a first load is not touched");
            assert_eq!(
                cache.get(&2),
                None,
                "a reload of an invalidated entry is superseded"
            );
        });
    }

    /// `invalidate_all` while a blocking load of a new key runs: "An `invalidate` cannot be undone
    /// by a load that began before it" — the load's value is returned, not stored, and a waiter
    /// of that load gets the value too (it was waiting already).
    #[test]
    fn invalidate_all_during_blocking_load() {
        watchdog(|| {
            let log: Log = Arc::default();
            let l = log.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(100)
                .record_stats()
                .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
                .build();
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let leader = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.get_with(1, || {
                        in_init.wait();
                        go.wait();
                        10
                    })
                })
            };
            in_init.wait();
            let waiter = {
                let cache = cache.clone();
                std::thread::spawn(move || cache.get_with(1, || 99))
            };
            while cache.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            cache.invalidate_all();
            go.wait();
            assert_eq!(leader.join().unwrap(), 10);
            assert_eq!(waiter.join().unwrap(), 10);
            assert_eq!(cache.get(&1), None);
            assert!(
                log.lock().unwrap().is_empty(),
                "nothing was stored, nothing reported: {:?}",
                log.lock().unwrap()
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
        });
    }

    /// Size evictions under a weigher: the listener hears `Size` for exactly the values that were
    /// pushed out, and the stats' size count and weight agree with it.
    #[test]
    fn size_evictions_reported_with_weights() {
        let log: Log = Arc::default();
        let l = log.clone();
        let cache = Cache::<u32, u64>::builder()
            .max_capacity(10)
            .shards(1)
            .eviction_policy(herdcache::EvictionPolicy::lru())
            .weigher(|_k, v: &u64| *v as u32)
            .record_stats()
            .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
            .build();
        cache.insert(1, 4);
        cache.insert(2, 4);
        cache.insert(3, 4); // pushes 1 out (LRU)
        cache.insert(4, 11); // heavier than the capacity: reported Size at once
        cache.insert(2, 5); // replaces 2 (weight 4 → 5): 3+2 = 9
        assert_eq!(
            *log.lock().unwrap(),
            [
                (1, 4, RemovalCause::Size),
                (4, 11, RemovalCause::Size),
                (2, 4, RemovalCause::Replaced)
            ]
        );
        let s = cache.stats();
        assert_eq!((s.size.count, s.size.weight), (2, 15));
        assert_eq!((s.replaced.count, s.replaced.weight), (1, 4));
        assert_eq!(cache.weighted_size(), 9);
        cache.validate();
    }

    /// The listener "may call back into the cache" and a loaded value "is in the cache before any
    /// of [the waiters] is released". A listener run by a load's store (the stored value evicts
    /// another entry for size) that asks for the *loaded* key (a `get_with`, a computation, an
    /// async `get_with_async` blocked on) must find the value: not deadlock on the load's own
    /// flight, not panic as a "recursive load".
    #[test]
    fn listener_run_by_load_store_reads_loaded_key() {
        watchdog(|| {
            type Slot = Arc<Mutex<Option<Cache<u32, u64>>>>;
            let slot: Slot = Arc::default();
            let seen: Arc<Mutex<Vec<String>>> = Arc::default();
            let (s2, seen2) = (slot.clone(), seen.clone());
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(1)
                .shards(1)
                .eviction_policy(herdcache::EvictionPolicy::lru())
                .eviction_listener(move |k: &u32, _v: &u64, c| {
                    let cache = s2.lock().unwrap().clone();
                    let Some(cache) = cache else { return };
                    if c != RemovalCause::Size || *k != 0 {
                        return;
                    }
                    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let a = cache.get_with(1, || 99);
                        let b = match cache.entry(1).and_compute_with(|_| Op::Nop) {
                            herdcache::CompResult::Unchanged(e) => *e.value(),
                            _ => 98,
                        };
                        (a, b)
                    }));
                    seen2.lock().unwrap().push(match got {
                        Ok((a, b)) => format!("{a},{b}"),
                        Err(p) => format!(
                            "panicked: {}",
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default()
                        ),
                    });
                })
                .build();
            *slot.lock().unwrap() = Some(cache.clone());
            // Blocking load.
            cache.insert(0, 0);
            assert_eq!(cache.get_with(1, || 10), 10);
            // Async load.
            cache.invalidate_all();
            cache.insert(0, 0);
            let v = futures::executor::block_on(cache.get_with_async(1, async { 11 }));
            assert_eq!(v, 11);
            // Shared async load.
            cache.invalidate_all();
            cache.insert(0, 0);
            let v = futures::executor::block_on(cache.get_with_async_shared(1, async { 12 }));
            assert_eq!(v, 12);
            // A computation's Put.
            cache.invalidate_all();
            cache.insert(0, 0);
            cache.entry(1).and_compute_with(|_| Op::Put(13));
            // An async computation's Put.
            cache.invalidate_all();
            cache.insert(0, 0);
            futures::executor::block_on(
                cache
                    .entry(1)
                    .and_compute_with_async(|_| async { Op::Put(14) }),
            );
            // or_insert_with.
            cache.invalidate_all();
            cache.insert(0, 0);
            cache.entry(1).or_insert_with(|| 15);
            *slot.lock().unwrap() = None;
            assert_eq!(
                *seen.lock().unwrap(),
                ["10,10", "11,11", "12,12", "13,13", "14,14", "15,15"]
            );
        });
    }

    fn logged(cap: u64) -> (Cache<u32, u64>, Log) {
        let log: Log = Arc::default();
        let l = log.clone();
        let cache = Cache::<u32, u64>::builder()
            .max_capacity(cap)
            .record_stats()
            .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
            .build();
        (cache, log)
    }

    /// A load that replaces a live value (`get_with_if` rejecting it) is a write: the old value
    /// is reported once, as `Replaced` (moka's cause for a replaced value).
    #[test]
    fn get_with_if_replacement_reports_replaced() {
        let (cache, log) = logged(100);
        cache.insert(1, 10);
        assert_eq!(cache.get_with_if(1, || 11, |_| true), 11);
        let v = futures::executor::block_on(cache.get_with_if_async(1, async { 12 }, |_| true));
        assert_eq!(v, 12);
        assert_eq!(
            *log.lock().unwrap(),
            [
                (1, 10, RemovalCause::Replaced),
                (1, 11, RemovalCause::Replaced)
            ]
        );
    }

    /// `remove` during a computation of the key: `remove` returns the old value (reported once,
    /// `Explicit`), the computation's `Put` is returned but not stored (so never reported).
    #[test]
    fn remove_during_compute() {
        watchdog(|| {
            let (cache, log) = logged(100);
            cache.insert(1, 10);
            let (in_f, done) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let t = {
                let (cache, in_f, done) = (cache.clone(), in_f.clone(), done.clone());
                std::thread::spawn(move || {
                    cache.entry(1).and_compute_with(|_| {
                        in_f.wait();
                        done.wait();
                        Op::Put(20)
                    })
                })
            };
            in_f.wait();
            assert_eq!(cache.remove(&1), Some(10));
            done.wait();
            assert!(matches!(
                t.join().unwrap(),
                herdcache::CompResult::ReplacedWith(_)
            ));
            assert_eq!(cache.get(&1), None);
            assert_eq!(*log.lock().unwrap(), [(1, 10, RemovalCause::Explicit)]);
        });
    }

    /// A panicking listener in `invalidate_all` while a load is in flight: `invalidate_all`
    /// completed (documented), so the load that began before it still must not store its value;
    /// its waiter gets the value; nothing is left in flight.
    #[test]
    fn panicking_listener_invalidate_all_with_load_in_flight() {
        watchdog(|| {
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(100)
                .record_stats()
                .eviction_listener(|_k: &u32, _v: &u64, _c| panic!("listener boom"))
                .build();
            cache.insert(5, 5);
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let leader = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.get_with(1, || {
                        in_init.wait();
                        go.wait();
                        10
                    })
                })
            };
            in_init.wait();
            let waiter = {
                let cache = cache.clone();
                std::thread::spawn(move || cache.get_with(1, || 99))
            };
            while cache.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.invalidate_all()));
            assert!(r.is_err());
            go.wait();
            assert_eq!(leader.join().unwrap(), 10);
            assert_eq!(waiter.join().unwrap(), 10);
            assert_eq!(
                cache.get(&1),
                None,
                "the load begun before invalidate_all stored its value"
            );
            assert_eq!(cache.get(&5), None);
            assert_eq!(cache.stats().loads_in_flight, 0);
            cache.validate();
        });
    }

    /// The listener "may call back into the cache". A listener hearing `Replaced` for the key a
    /// computation (or a replacing load) just wrote, and itself computing / loading that same key,
    /// must neither deadlock on that computation's own hold of the key nor be refused as a
    /// "recursive load": the write is complete when the listener runs.
    #[test]
    fn listener_computes_the_key_just_replaced() {
        watchdog(|| {
            type Slot = Arc<Mutex<Option<Cache<u32, u64>>>>;
            let slot: Slot = Arc::default();
            let seen: Arc<Mutex<Vec<String>>> = Arc::default();
            let (s2, seen2) = (slot.clone(), seen.clone());
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(100)
                .eviction_listener(move |k: &u32, _v: &u64, c| {
                    let cache = s2.lock().unwrap().clone();
                    let Some(cache) = cache else { return };
                    if c != RemovalCause::Replaced {
                        return;
                    }
                    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let a = match cache.entry(*k).and_compute_with(|_| Op::Nop) {
                            herdcache::CompResult::Unchanged(e) => *e.value(),
                            _ => 0,
                        };
                        let b = cache.get_with(*k, || 0);
                        (a, b)
                    }));
                    seen2.lock().unwrap().push(match got {
                        Ok((a, b)) => format!("{a},{b}"),
                        Err(p) => format!(
                            "panicked: {}",
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default()
                        ),
                    });
                })
                .build();
            *slot.lock().unwrap() = Some(cache.clone());
            cache.insert(1, 1);
            cache.insert(1, 2); // plain insert
            cache.entry(1).and_compute_with(|_| Op::Put(3)); // computation
            cache.get_with_if(1, || 4, |_| true); // replacing load
            futures::executor::block_on(
                cache
                    .entry(1)
                    .and_compute_with_async(|_| async { Op::Put(5) }),
            );
            futures::executor::block_on(cache.get_with_if_async(1, async { 6 }, |_| true));
            *slot.lock().unwrap() = None;
            assert_eq!(*seen.lock().unwrap(), ["2,2", "3,3", "4,4", "5,5", "6,6"]);
            assert_eq!(cache.get(&1), Some(6));
        });
    }

    /// README: "`max_capacity(0)` is a cache that keeps nothing ...: every write is turned away as
    /// too heavy, so the listener hears `Size` for each ... Loads still coalesce". Every loaded /
    /// computed / inserted value is reported exactly once, `Size`; waiters of a load share it.
    #[test]
    fn capacity_zero_reports_every_write_once() {
        watchdog(|| {
            let log: Log = Arc::default();
            let l = log.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(0)
                .record_stats()
                .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
                .build();
            cache.insert(1, 1);
            assert_eq!(cache.get_with(2, || 2), 2);
            assert!(matches!(
                cache.entry(3).and_compute_with(|_| Op::Put(3)),
                herdcache::CompResult::Inserted(_)
            ));
            assert_eq!(
                futures::executor::block_on(cache.get_with_async(4, async { 4 })),
                4
            );
            assert!(cache.entry(5).or_insert_with(|| 5).is_fresh());
            // Coalescing: a waiter joins the load and gets its value, one report.
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let leader = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.get_with(6, || {
                        in_init.wait();
                        go.wait();
                        6
                    })
                })
            };
            in_init.wait();
            let waiter = {
                let cache = cache.clone();
                std::thread::spawn(move || cache.get_with(6, || 66))
            };
            while cache.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            go.wait();
            assert_eq!(leader.join().unwrap(), 6);
            assert_eq!(waiter.join().unwrap(), 6);
            let mut l = log.lock().unwrap().clone();
            l.sort_by_key(|e| e.0);
            let expect: Vec<_> = (1..=6u32)
                .map(|k| (k, u64::from(k), RemovalCause::Size))
                .collect();
            assert_eq!(l, expect);
            assert_eq!((cache.entry_count(), cache.weighted_size()), (0, 0));
        });
    }

    /// Same for async loads: a panicking listener run by the store of a borrowed async leader
    /// (its future panics when polled to completion), and of a shared load driven by a waiter
    /// (its leader polled once, then only at the end): in both the store completes (the value is
    /// in the cache) and every other caller of the load gets the value.
    #[test]
    fn panicking_listener_during_async_load_store() {
        fn cache() -> Cache<u32, u64> {
            Cache::<u32, u64>::builder()
                .max_capacity(1)
                .shards(1)
                .eviction_policy(herdcache::EvictionPolicy::lru())
                .record_stats()
                .eviction_listener(|_k: &u32, _v: &u64, _c| panic!("listener boom"))
                .build()
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                // Borrowed leader.
                let c = cache();
                c.insert(0, 0);
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let started = Arc::new(tokio::sync::Notify::new());
                let leader = {
                    let (c, started) = (c.clone(), started.clone());
                    tokio::spawn(async move {
                        c.get_with_async(1, async move {
                            started.notify_one();
                            rx.await.unwrap();
                            11
                        })
                        .await
                    })
                };
                started.notified().await;
                let waiter = {
                    let c = c.clone();
                    tokio::spawn(async move { c.get_with_async(1, async { 22 }).await })
                };
                while c.stats().coalesced == 0 {
                    tokio::task::yield_now().await;
                }
                tx.send(()).unwrap();
                assert!(
                    leader.await.unwrap_err().is_panic(),
                    "the listener's panic reaches the leader"
                );
                assert_eq!(waiter.await.unwrap(), 11);
                assert_eq!(c.get(&1), Some(11));
                assert_eq!(c.stats().loads_in_flight, 0);

                // Shared load driven by a waiter.
                let c = cache();
                c.insert(0, 0);
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let lc = c.clone();
                let mut leader = Box::pin(async move {
                    lc.get_with_async_shared(1, async move {
                        rx.await.unwrap();
                        11
                    })
                    .await
                });
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                assert!(std::future::Future::poll(leader.as_mut(), &mut cx).is_pending());
                let waiter = {
                    let c = c.clone();
                    tokio::spawn(async move { c.get_with_async_shared(1, async { 22 }).await })
                };
                while c.stats().coalesced == 0 {
                    tokio::task::yield_now().await;
                }
                tx.send(()).unwrap();
                let w = waiter.await;
                assert_eq!(
                    c.get(&1),
                    Some(11),
                    "the shared load's store did not complete"
                );
                if let Ok(v) = w {
                    assert_eq!(v, 11);
                }
                let l = tokio::spawn(leader).await;
                assert_eq!(
                    l.ok(),
                    Some(11),
                    "the leader whose init it was gets the stored value"
                );
                assert_eq!(c.stats().loads_in_flight, 0);
                c.validate();
            })
            .await
            .expect("watchdog: hung");
        });
    }
}

/// Outside attack, mixed (helper 85): computations vs cancelled async loads, listener re-entrance on the same key, panicking size-eviction listeners and accounting, time to idle moved by a computation's look, invalidations vs shared loads.
mod mixed {

    use herdcache::{Cache, CompResult, EvictionPolicy, ManualClock, Op, RemovalCause};
    use std::collections::HashMap;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Barrier, Mutex};
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<(u32, u64, RemovalCause)>>>;

    fn watchdog<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("watchdog: test hung"),
        }
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    /// A blocking `and_compute_with` waiting for an async load of its key ("this call first
    /// waits for any that runs") must go on when that async leader is dropped (its load is
    /// cancelled, "nobody is stranded"), and see no value (a cancelled load caches nothing).
    #[test]
    fn compute_waiting_on_cancelled_async_leader_proceeds() {
        watchdog(|| {
            let cache: Cache<u32, u64> = Cache::builder().max_capacity(100).record_stats().build();
            let mut leader = Box::pin(cache.get_with_async(1, std::future::pending::<u64>()));
            assert!(poll_once(&mut leader).is_pending());
            let saw = Arc::new(Mutex::new(None));
            let t = {
                let (cache, saw) = (cache.clone(), saw.clone());
                std::thread::spawn(move || {
                    cache.entry(1).and_compute_with(|e| {
                        *saw.lock().unwrap() = Some(e.map(|e| e.into_value()));
                        Op::Put(5)
                    })
                })
            };
            // The computation is blocked behind the load (it cannot have run `f` yet).
            std::thread::yield_now();
            assert!(saw.lock().unwrap().is_none());
            drop(leader);
            let r = t.join().unwrap();
            assert!(matches!(r, CompResult::Inserted(_)));
            assert_eq!(*saw.lock().unwrap(), Some(None));
            assert_eq!(cache.get(&1), Some(5));
            assert_eq!(cache.stats().loads_in_flight, 0);
        });
    }

    /// A listener that re-enters the cache on the *same* key: on `Replaced` it invalidates the
    /// key (removing the new value, `Explicit`), on `Explicit` of key 1 it re-inserts once. Every
    /// value is reported exactly once and the final state is consistent.
    #[test]
    fn listener_reentering_same_key() {
        watchdog(|| {
            let log: Log = Arc::default();
            let l = log.clone();
            let slot: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::default();
            let s2 = slot.clone();
            let once = Arc::new(AtomicBool::new(false));
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(100)
                .eviction_listener(move |k: &u32, v: &u64, c| {
                    l.lock().unwrap().push((*k, *v, c));
                    let cache = s2.lock().unwrap().clone();
                    let Some(cache) = cache else { return };
                    match c {
                        RemovalCause::Replaced => cache.invalidate(k),
                        RemovalCause::Explicit if *k == 1 && !once.swap(true, Ordering::SeqCst) => {
                            cache.insert(*k, 777)
                        }
                        _ => {}
                    }
                })
                .build();
            *slot.lock().unwrap() = Some(cache.clone());
            cache.insert(1, 10);
            cache.insert(1, 11); // Replaced(10) → invalidate → Explicit(11) → insert 777
            assert_eq!(cache.get(&1), Some(777));
            *slot.lock().unwrap() = None;
            cache.invalidate_all();
            assert_eq!(
                *log.lock().unwrap(),
                [
                    (1, 10, RemovalCause::Replaced),
                    (1, 11, RemovalCause::Explicit),
                    (1, 777, RemovalCause::Explicit)
                ]
            );
            assert_eq!((cache.entry_count(), cache.weighted_size()), (0, 0));
            cache.validate();
        });
    }

    /// A listener that panics on every `Size` eviction: each insert that evicts panics its
    /// caller, but "the operation that removed the entries has completed": the bound holds,
    /// counts, weight and iteration agree, and each evicted value was reported once.
    #[test]
    fn panicking_size_listener_keeps_accounting() {
        watchdog(|| {
            let log: Log = Arc::default();
            let l = log.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(20)
                .shards(1)
                .eviction_policy(EvictionPolicy::lru())
                .weigher(|_k, v: &u64| (*v % 5 + 1) as u32)
                .eviction_listener(move |k: &u32, v: &u64, c| {
                    l.lock().unwrap().push((*k, *v, c));
                    if c == RemovalCause::Size {
                        panic!("size listener boom");
                    }
                })
                .build();
            let mut panics = 0;
            for i in 0..60u64 {
                let k = (i % 23) as u32;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.insert(k, i)))
                    .is_err()
                {
                    panics += 1;
                }
            }
            assert!(panics > 0);
            let items: Vec<_> = cache.iter().collect();
            let w: u64 = items.iter().map(|(_, v)| v % 5 + 1).sum();
            assert_eq!(cache.entry_count(), items.len() as u64);
            assert_eq!(cache.weighted_size(), w);
            assert!(w <= 20);
            let log = log.lock().unwrap().clone();
            let mut seen = HashMap::new();
            for (k, v, c) in &log {
                assert!(
                    seen.insert(*v, (*k, *c)).is_none(),
                    "value {v} reported twice"
                );
            }
            // Every value written is either present or reported.
            for i in 0..60u64 {
                assert!(
                    seen.contains_key(&i) || items.iter().any(|(_, v)| *v == i),
                    "value {i} neither present nor reported"
                );
            }
            cache.validate();
        });
    }

    /// `and_compute_with`: "The look at the current entry is a read, as moka's compute: it moves
    /// the entry's time to idle ..., whatever `f` decides (an `Op::Nop` too)".
    #[test]
    fn compute_nop_moves_time_to_idle() {
        let clock = ManualClock::new();
        let cache = Cache::<u32, u64>::builder()
            .max_capacity(10)
            .time_to_idle(Duration::from_secs(10))
            .clock(clock.clone())
            .build();
        cache.insert(1, 1);
        clock.advance(Duration::from_secs(8));
        assert!(matches!(
            cache.entry(1).and_compute_with(|_| Op::Nop),
            CompResult::Unchanged(_)
        ));
        clock.advance(Duration::from_secs(8));
        assert_eq!(
            cache.get(&1),
            Some(1),
            "the compute's look moved the idle deadline"
        );
        clock.advance(Duration::from_secs(11));
        assert_eq!(cache.get(&1), None);
    }

    /// A computation's `Put` of a value heavier than `max_capacity`: "is stored and at once
    /// evicted, as with `Cache::insert`: the listener sees it removed for `Size`" — and the value
    /// it replaced is reported `Replaced`; the weight goes back to 0.
    #[test]
    fn compute_put_too_heavy() {
        let log: Log = Arc::default();
        let l = log.clone();
        let cache = Cache::<u32, u64>::builder()
            .max_capacity(10)
            .weigher(|_k, v: &u64| *v as u32)
            .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
            .build();
        cache.insert(1, 3);
        let r = cache.entry(1).and_compute_with(|_| Op::Put(50));
        assert!(matches!(r, CompResult::ReplacedWith(e) if *e.value() == 50));
        assert_eq!(cache.get(&1), None);
        let mut l = log.lock().unwrap().clone();
        l.sort_by_key(|e| e.1);
        assert_eq!(
            l,
            [(1, 3, RemovalCause::Replaced), (1, 50, RemovalCause::Size)]
        );
        assert_eq!((cache.entry_count(), cache.weighted_size()), (0, 0));
        cache.validate();
    }

    /// Racing reclaim of one expired entry by an `insert` (replacing it), a `get`, a `remove`
    /// and `run_pending_tasks`: the old value is reported exactly once, `Expired` (README: "when
    /// it is replaced or invalidated the listener hears `Expired` for it"), and the new value is
    /// stored.
    #[test]
    fn expired_entry_race_with_replacing_insert() {
        watchdog(|| {
            for round in 0..20u64 {
                let clock = ManualClock::new();
                let log: Log = Arc::default();
                let l = log.clone();
                let cache = Cache::<u32, u64>::builder()
                    .max_capacity(100)
                    .time_to_live(Duration::from_secs(1))
                    .clock(clock.clone())
                    .eviction_listener(move |k: &u32, v: &u64, c| {
                        l.lock().unwrap().push((*k, *v, c))
                    })
                    .build();
                cache.insert(1, round);
                clock.advance(Duration::from_secs(2));
                let b = Arc::new(Barrier::new(3));
                let hs: Vec<_> = (0..3)
                    .map(|t| {
                        let (cache, b) = (cache.clone(), b.clone());
                        std::thread::spawn(move || {
                            b.wait();
                            match t {
                                0 => cache.insert(1, 1000 + round),
                                1 => drop(cache.get(&1)),
                                _ => cache.run_pending_tasks(),
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
                assert_eq!(*log.lock().unwrap(), [(1, round, RemovalCause::Expired)]);
                assert_eq!(cache.get(&1), Some(1000 + round));
            }
        });
    }

    /// `invalidate_all` while a *shared* load (its leader dropped, a waiter driving it) is in
    /// flight: the load "cannot be undone": its value reaches the waiter but is not stored.
    #[test]
    fn invalidate_all_during_shared_load_driven_by_waiter() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                let cache: Cache<u32, u64> =
                    Cache::builder().max_capacity(100).record_stats().build();
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let mut leader = Box::pin(cache.get_with_async_shared(1, async move {
                    rx.await.unwrap();
                    42
                }));
                assert!(poll_once(&mut leader).is_pending());
                let waiter = {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.get_with_async_shared(1, async { 7 }).await })
                };
                while cache.stats().coalesced == 0 {
                    tokio::task::yield_now().await;
                }
                drop(leader);
                cache.invalidate_all();
                tx.send(()).unwrap();
                assert_eq!(waiter.await.unwrap(), 42);
                assert_eq!(
                    cache.get(&1),
                    None,
                    "the load begun before invalidate_all was stored"
                );
                assert_eq!(cache.stats().loads_in_flight, 0);
            })
            .await
            .expect("watchdog: test hung");
        });
    }

    static CLONES_LEFT: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(-1);

    #[derive(Debug, PartialEq)]
    struct Bomb(u32);
    impl Clone for Bomb {
        fn clone(&self) -> Self {
            if CLONES_LEFT.fetch_sub(1, Ordering::SeqCst) == 0 {
                panic!("clone boom");
            }
            Bomb(self.0)
        }
    }

    /// Crate docs: "a key's or value's `Hash`, `Eq`, `Clone` or `Drop` ... its panic reaches the
    /// caller that ran it, and leaves no key waiting". Waiters of one load each receive a clone of
    /// its value; clones panic one at a time (each clone in turn, over several rounds): every
    /// caller either gets the value or panics itself, none hangs, nothing is left in flight.
    #[test]
    fn panicking_value_clone_for_waiters() {
        watchdog(|| {
            for nth in 0..6isize {
                let cache: Cache<u32, Bomb> =
                    Cache::builder().max_capacity(100).record_stats().build();
                let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
                let leader = {
                    let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                    std::thread::spawn(move || {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            cache.get_with(1, || {
                                in_init.wait();
                                go.wait();
                                Bomb(7)
                            })
                        }))
                    })
                };
                in_init.wait();
                let waiters: Vec<_> = (0..3)
                    .map(|_| {
                        let cache = cache.clone();
                        std::thread::spawn(move || {
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                cache.get_with(1, || Bomb(8))
                            }))
                        })
                    })
                    .collect();
                while cache.stats().coalesced < 3 {
                    std::thread::yield_now();
                }
                CLONES_LEFT.store(nth, Ordering::SeqCst);
                go.wait();
                let mut results = vec![leader.join().unwrap()];
                for w in waiters {
                    results.push(w.join().unwrap());
                }
                CLONES_LEFT.store(-1, Ordering::SeqCst);
                let panicked = results.iter().filter(|r| r.is_err()).count();
                assert!(
                    panicked <= 1,
                    "nth={nth}: {panicked} callers panicked for one panicking clone"
                );
                for r in results.iter().flatten() {
                    assert!(r.0 == 7 || r.0 == 8, "nth={nth}: {r:?}");
                }
                assert_eq!(cache.stats().loads_in_flight, 0, "nth={nth}");
                cache.validate();
            }
        });
    }

    /// `get_with`: "A write ... or invalidation of `key` during the load wins: the load's value
    /// still goes to the callers already waiting on it but is not cached, and a caller that starts
    /// after the write returned does not join that load." After `invalidate` returns, a new
    /// `get_with` runs its own load at once (the superseded one is still paused), and its value
    /// is the one cached; the superseded load's value is not stored over it.
    #[test]
    fn caller_after_invalidate_does_not_join_superseded_load() {
        watchdog(|| {
            let cache: Cache<u32, String> =
                Cache::builder().max_capacity(100).record_stats().build();
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let old = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.get_with(1, || {
                        in_init.wait();
                        go.wait();
                        "old".to_string()
                    })
                })
            };
            in_init.wait();
            cache.invalidate(&1);
            // Must not wait for the paused load (it would hang until the watchdog).
            assert_eq!(cache.get_with(1, || "new".to_string()), "new");
            go.wait();
            assert_eq!(old.join().unwrap(), "old");
            assert_eq!(
                cache.get(&1).as_deref(),
                Some("new"),
                "the superseded load overwrote the newer value"
            );
            assert_eq!(cache.stats().loads_in_flight, 0);
        });
    }

    /// `get_with`: "If the running load ... ended in an error or `None` (from a
    /// `try_`/`optionally_` sibling), this call waits for it and, when its outcome is not a value,
    /// loads again itself."
    #[test]
    fn get_with_waiter_of_failing_try_load_loads_itself() {
        watchdog(|| {
            let cache: Cache<u32, String> =
                Cache::builder().max_capacity(100).record_stats().build();
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let leader = {
                let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.try_get_with(1, || {
                        in_init.wait();
                        go.wait();
                        Err::<String, _>("down")
                    })
                })
            };
            in_init.wait();
            let w = {
                let cache = cache.clone();
                std::thread::spawn(move || cache.get_with(1, || "mine".to_string()))
            };
            while cache.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            go.wait();
            assert!(leader.join().unwrap().is_err());
            assert_eq!(w.join().unwrap(), "mine");
            assert_eq!(cache.get(&1).as_deref(), Some("mine"));
        });
    }

    /// "A write or invalidation of `key` during the load wins: the load's value still goes to the
    /// callers already waiting on it but is not cached" — for a first load (no entry yet), with
    /// `invalidate` and with `remove` (which returns `None`: nothing live).
    #[test]
    fn invalidate_or_remove_of_absent_key_supersedes_first_load() {
        watchdog(|| {
            for use_remove in [false, true] {
                let cache: Cache<u32, String> =
                    Cache::builder().max_capacity(100).record_stats().build();
                let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
                let leader = {
                    let (cache, in_init, go) = (cache.clone(), in_init.clone(), go.clone());
                    std::thread::spawn(move || {
                        cache.get_with(1, || {
                            in_init.wait();
                            go.wait();
                            "loaded".to_string()
                        })
                    })
                };
                in_init.wait();
                if use_remove {
                    assert_eq!(cache.remove(&1), None);
                } else {
                    cache.invalidate(&1);
                }
                go.wait();
                assert_eq!(leader.join().unwrap(), "loaded");
                assert_eq!(
                    cache.get(&1),
                    None,
                    "remove={use_remove}: the first load survived the invalidation"
                );
                assert_eq!(cache.stats().loads_in_flight, 0);
            }
        });
    }

    /// Same for a computation of an absent key: an `invalidate` while `f` runs wins over its
    /// `Put` ("a `Put` is returned but not stored").
    #[test]
    fn invalidate_of_absent_key_supersedes_compute_put() {
        watchdog(|| {
            let cache: Cache<u32, String> = Cache::builder().max_capacity(100).build();
            let (in_f, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let t = {
                let (cache, in_f, go) = (cache.clone(), in_f.clone(), go.clone());
                std::thread::spawn(move || {
                    cache.entry(1).and_compute_with(|_| {
                        in_f.wait();
                        go.wait();
                        Op::Put("computed".to_string())
                    })
                })
            };
            in_f.wait();
            cache.invalidate(&1);
            go.wait();
            assert!(matches!(t.join().unwrap(), CompResult::Inserted(_)));
            assert_eq!(cache.get(&1), None);
        });
    }

    /// `get_with`: "The value is in the cache (visible to `get`) before any waiter is released"
    /// — for blocking and async waiters of a blocking leader and of an async leader.
    #[test]
    fn value_visible_before_waiters_released() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                for async_leader in [false, true] {
                    let cache: Cache<u32, u64> =
                        Cache::builder().max_capacity(100).record_stats().build();
                    let gate = Arc::new(tokio::sync::Notify::new());
                    let started = Arc::new(tokio::sync::Notify::new());
                    let leader = {
                        let (cache, gate, started) = (cache.clone(), gate.clone(), started.clone());
                        if async_leader {
                            tokio::spawn(async move {
                                cache
                                    .get_with_async(1, async move {
                                        started.notify_one();
                                        gate.notified().await;
                                        7
                                    })
                                    .await
                            })
                        } else {
                            let h = tokio::runtime::Handle::current();
                            tokio::task::spawn_blocking(move || {
                                cache.get_with(1, || {
                                    started.notify_one();
                                    h.block_on(gate.notified());
                                    7
                                })
                            })
                        }
                    };
                    started.notified().await;
                    let aw = {
                        let cache = cache.clone();
                        tokio::spawn(async move {
                            (cache.get_with_async(1, async { 8 }).await, cache.get(&1))
                        })
                    };
                    let bw = {
                        let cache = cache.clone();
                        std::thread::spawn(move || (cache.get_with(1, || 9), cache.get(&1)))
                    };
                    while cache.stats().coalesced < 2 {
                        tokio::task::yield_now().await;
                    }
                    gate.notify_one();
                    assert_eq!(leader.await.unwrap(), 7);
                    assert_eq!(
                        aw.await.unwrap(),
                        (7, Some(7)),
                        "async waiter (async_leader={async_leader})"
                    );
                    let b = tokio::task::spawn_blocking(move || bw.join().unwrap())
                        .await
                        .unwrap();
                    assert_eq!(
                        b,
                        (7, Some(7)),
                        "blocking waiter (async_leader={async_leader})"
                    );
                }
            })
            .await
            .expect("watchdog: hung");
        });
    }
}

/// Outside attack on accounting under concurrent loads (helper 85): the documented miss identity, listener-vs-stats agreement and exactly-once reports with loads, writes, invalidations, negative caching and cancelled async loads all racing.
mod accounting {

    use herdcache::{Cache, ManualClock, RemovalCause};
    use std::collections::HashSet;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Arc, Barrier, Mutex};
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<(u32, u64, RemovalCause)>>>;

    fn watchdog<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("watchdog: test hung"),
        }
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    /// `CacheStats::misses`: "So in a cache read only through those calls, once every call has
    /// returned, `misses == load_successes + load_failures + loads_abandoned + coalesced +
    /// negative_hits`". Also: the eviction listener is called "exactly once for every entry that
    /// leaves the cache", so each (unique) value is reported at most once, and the per-cause
    /// removal stats equal the listener's counts.
    #[test]
    fn miss_identity_and_removal_stats_under_concurrent_loads() {
        watchdog(|| {
            let clock = ManualClock::new();
            let log: Log = Arc::default();
            let l = log.clone();
            let cache = Cache::<u32, u64>::builder()
                .max_capacity(6)
                .shards(1)
                .time_to_live(Duration::from_secs(50))
                .negative_ttl(Duration::from_secs(5))
                .clock(clock.clone())
                .record_stats()
                .eviction_listener(move |k: &u32, v: &u64, c| l.lock().unwrap().push((*k, *v, c)))
                .build();
            let next = Arc::new(AtomicU64::new(1));
            let threads = 3;
            let b = Arc::new(Barrier::new(threads));
            let hs: Vec<_> = (0..threads as u64)
                .map(|t| {
                    let (cache, b, next, clock) =
                        (cache.clone(), b.clone(), next.clone(), clock.clone());
                    std::thread::spawn(move || {
                        let fresh = || next.fetch_add(1, Ordering::SeqCst);
                        b.wait();
                        for i in 0..3000u64 {
                            let k = ((i * 7 + t * 3) % 12) as u32;
                            match (i + t) % 9 {
                                0 => drop(cache.get_with(k, fresh)),
                                1 => drop(cache.try_get_with(k, || {
                                    if i % 3 == 0 {
                                        Err("down")
                                    } else {
                                        Ok(fresh())
                                    }
                                })),
                                2 => {
                                    drop(cache.optionally_get_with(k, || (i % 4 != 0).then(fresh)))
                                }
                                3 => drop(cache.get_with_if(k, fresh, |v| v % 3 == 0)),
                                4 => drop(cache.entry(k).or_insert_with(fresh)),
                                5 => cache.insert(k, fresh()),
                                6 => cache.invalidate(&k),
                                7 => {
                                    // Async loads cancelled after their first poll (leader or waiter).
                                    let mut f =
                                        Box::pin(cache.get_with_async(k, async { fresh() }));
                                    let _ = poll_once(&mut f);
                                    let mut g = Box::pin(
                                        cache.get_with_async(k, std::future::pending::<u64>()),
                                    );
                                    let _ = poll_once(&mut g);
                                    drop(g);
                                    drop(f);
                                }
                                _ => {
                                    if t == 0 && i % 45 == 8 {
                                        clock.advance(Duration::from_secs(20));
                                    }
                                    if i % 2 == 0 {
                                        drop(cache.get_with_by_ref(&k, fresh));
                                    } else {
                                        let mut f =
                                            Box::pin(cache.get_with_async_shared(k, async move {
                                                1_000_000 + i
                                            }));
                                        let _ = poll_once(&mut f);
                                    }
                                }
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            let s = cache.stats();
            assert_eq!(s.loads_in_flight, 0, "{s:?}");
            assert_eq!(
                s.misses,
                s.load_successes
                    + s.load_failures
                    + s.loads_abandoned
                    + s.coalesced
                    + s.negative_hits,
                "miss identity broken: {s:?}"
            );
            cache.invalidate_all();
            let log = log.lock().unwrap().clone();
            let s = cache.stats();
            let count = |c: RemovalCause| log.iter().filter(|e| e.2 == c).count() as u64;
            assert_eq!(
                (
                    s.expired.count,
                    s.explicit.count,
                    s.replaced.count,
                    s.size.count
                ),
                (
                    count(RemovalCause::Expired),
                    count(RemovalCause::Explicit),
                    count(RemovalCause::Replaced),
                    count(RemovalCause::Size)
                ),
                "stats vs listener"
            );
            let mut seen = HashSet::new();
            for (k, v, c) in &log {
                assert!(
                    seen.insert(*v) || *v >= 1_000_000,
                    "value {v} (key {k}, {c:?}) reported twice"
                );
            }
            assert_eq!((cache.entry_count(), cache.weighted_size()), (0, 0));
            cache.validate();
        });
    }

    /// Gives up on `inner` (dropping it) after it returned `Pending` `limit` times.
    struct PollLimit<F> {
        inner: Pin<Box<F>>,
        left: usize,
    }
    impl<F: Future> Future for PollLimit<F> {
        type Output = Option<F::Output>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.inner.as_mut().poll(cx) {
                Poll::Ready(v) => Poll::Ready(Some(v)),
                Poll::Pending if self.left == 0 => Poll::Ready(None),
                Poll::Pending => {
                    self.left -= 1;
                    Poll::Pending
                }
            }
        }
    }
    fn limit<F: Future>(f: F, left: usize) -> PollLimit<F> {
        PollLimit {
            inner: Box::pin(f),
            left,
        }
    }

    async fn yields(n: u64) {
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
    }

    /// The miss identity and stats-vs-listener agreement, for async callers on a multi-thread
    /// runtime that give up (are dropped) after a few polls at varying await points — leaders,
    /// waiters, shared loads, computations — with a load limit of 2. Also: no task hangs, and
    /// nothing is left in flight or holding a permit afterwards.
    #[test]
    fn async_cancellation_storm_accounting() {
        for multi in [true, false] {
            let rt = if multi {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_time()
                    .build()
                    .unwrap()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap()
            };
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), async {
                    let log: Log = Arc::default();
                    let l = log.clone();
                    let cache = Cache::<u32, u64>::builder()
                        .max_capacity(8)
                        .max_concurrent_loads(2)
                        .record_stats()
                        .eviction_listener(move |k: &u32, v: &u64, c| {
                            l.lock().unwrap().push((*k, *v, c))
                        })
                        .build();
                    let next = Arc::new(AtomicU64::new(1));
                    let tasks: Vec<_> = (0..4u64)
                        .map(|t| {
                            let (cache, next) = (cache.clone(), next.clone());
                            tokio::spawn(async move {
                                for i in 0..400u64 {
                                    let k = ((i / 2) % 5) as u32;
                                    let n = (i * 7 + t * 3) % 5;
                                    let v = next.fetch_add(1, Ordering::SeqCst);
                                    let budget = ((i + t) % 4) as usize;
                                    match (i + t) % 6 {
                                        0 => drop(
                                            limit(
                                                cache.get_with_async(k, async {
                                                    yields(n).await;
                                                    v
                                                }),
                                                budget,
                                            )
                                            .await,
                                        ),
                                        1 => drop(
                                            limit(
                                                cache.get_with_async_shared(k, async move {
                                                    yields(n).await;
                                                    v
                                                }),
                                                budget,
                                            )
                                            .await,
                                        ),
                                        2 => drop(
                                            limit(
                                                cache.try_get_with_async(k, async {
                                                    yields(n).await;
                                                    if n == 0 {
                                                        Err("e")
                                                    } else {
                                                        Ok(v)
                                                    }
                                                }),
                                                budget,
                                            )
                                            .await,
                                        ),
                                        3 => drop(
                                            limit(
                                                cache.optionally_get_with_async(k, async {
                                                    yields(n).await;
                                                    (n != 1).then_some(v)
                                                }),
                                                budget,
                                            )
                                            .await,
                                        ),
                                        4 => drop(
                                            limit(
                                                cache.entry(k).and_upsert_with_async(|_| async {
                                                    yields(n).await;
                                                    v
                                                }),
                                                budget,
                                            )
                                            .await,
                                        ),
                                        _ => {
                                            if n == 0 {
                                                cache.invalidate(&k)
                                            } else {
                                                cache.insert(k, v)
                                            }
                                        }
                                    }
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    let s = cache.stats();
                    assert_eq!(s.loads_in_flight, 0, "{s:?}");
                    // Computations are not loading calls; their misses are not in the identity, so
                    // count them apart: `and_upsert_with_async` counts no hit and no miss.
                    assert_eq!(
                        s.misses,
                        s.load_successes
                            + s.load_failures
                            + s.loads_abandoned
                            + s.coalesced
                            + s.negative_hits,
                        "miss identity broken: {s:?}"
                    );
                    assert!(
                        s.loads_abandoned > 0 && (s.coalesced > 0 || !multi),
                        "the storm cancelled nothing: {s:?}"
                    );
                    // The permits are all free: two loads can run at once, now.
                    let g1 = Arc::new(tokio::sync::Barrier::new(2));
                    let a = {
                        let (c, g) = (cache.clone(), g1.clone());
                        tokio::spawn(async move {
                            c.get_with_async(100, async {
                                g.wait().await;
                                1_000_001
                            })
                            .await
                        })
                    };
                    let b = {
                        let (c, g) = (cache.clone(), g1.clone());
                        tokio::spawn(async move {
                            c.get_with_async(101, async {
                                g.wait().await;
                                1_000_002
                            })
                            .await
                        })
                    };
                    assert_eq!((a.await.unwrap(), b.await.unwrap()), (1_000_001, 1_000_002));
                    cache.invalidate_all();
                    let log = log.lock().unwrap().clone();
                    let s = cache.stats();
                    let count = |c: RemovalCause| log.iter().filter(|e| e.2 == c).count() as u64;
                    assert_eq!(
                        (
                            s.expired.count,
                            s.explicit.count,
                            s.replaced.count,
                            s.size.count
                        ),
                        (
                            count(RemovalCause::Expired),
                            count(RemovalCause::Explicit),
                            count(RemovalCause::Replaced),
                            count(RemovalCause::Size)
                        ),
                    );
                    let mut seen = HashSet::new();
                    for (k, v, c) in &log {
                        assert!(seen.insert(*v), "value {v} (key {k}, {c:?}) reported twice");
                    }
                    cache.validate();
                })
                .await
                .expect("watchdog: hung");
            });
        }
    }
}

/// Outside attack on negative caching vs cancelled / panicking / replacing loads and computations (helper 85). Contract (`CacheBuilder::negative_ttl`): "`get_with`, `or_insert_with` and `get_all` ... load the key again: a value they load is stored and ends it, ... and a load of theirs that ends with nothing (its future dropped, its `init` panicking) leaves it as it was. A write or invalidation of the key ends it early (a computation's `Put` or `Remove` too; one that changes nothing leaves it)."
mod negative {

    use herdcache::{Cache, ManualClock, Op};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    fn cache() -> (Cache<u32, u32>, ManualClock) {
        let clock = ManualClock::new();
        let c = Cache::builder()
            .max_capacity(100)
            .negative_ttl(Duration::from_secs(10))
            .clock(clock.clone())
            .record_stats()
            .build();
        (c, clock)
    }

    /// Makes key 1 negative with error "down"; returns that error's `Arc`.
    fn make_negative(c: &Cache<u32, u32>) -> Arc<&'static str> {
        let e = c.try_get_with(1, || Err("down")).unwrap_err();
        // A caller in the period gets the same Arc without calling init.
        let e2 = c
            .try_get_with(1, || -> Result<u32, &str> { panic!("init must not run") })
            .unwrap_err();
        assert!(Arc::ptr_eq(&e, &e2));
        e
    }

    /// Asserts that key 1 is still negative with `e`.
    fn still_negative(c: &Cache<u32, u32>, e: &Arc<&'static str>, what: &str) {
        let calls = AtomicUsize::new(0);
        let r = c.try_get_with(1, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(9)
        });
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "{what}: the negative entry was lost (init ran)"
        );
        assert!(Arc::ptr_eq(&r.unwrap_err(), e), "{what}");
    }

    /// Asserts that key 1 is no longer negative.
    fn not_negative(c: &Cache<u32, u32>, what: &str) {
        let r = c.try_get_with(1, || Ok::<_, &str>(9));
        assert!(r.is_ok(), "{what}: still negative: {r:?}");
    }

    #[test]
    fn cancelled_borrowed_async_load_leaves_negative_entry() {
        let (c, _clock) = cache();
        let e = make_negative(&c);
        let mut f = Box::pin(c.get_with_async(1, std::future::pending::<u32>()));
        assert!(poll_once(&mut f).is_pending());
        drop(f);
        still_negative(&c, &e, "get_with_async dropped");
    }

    /// get_with_async_shared: "a negative-cache entry the load replaced, still live, is put back".
    #[test]
    fn cancelled_shared_async_load_puts_negative_entry_back() {
        let (c, _clock) = cache();
        let e = make_negative(&c);
        let mut f = Box::pin(c.get_with_async_shared(1, std::future::pending::<u32>()));
        assert!(poll_once(&mut f).is_pending());
        drop(f);
        still_negative(&c, &e, "get_with_async_shared dropped");
    }

    #[test]
    fn panicking_get_with_leaves_negative_entry() {
        let (c, _clock) = cache();
        let e = make_negative(&c);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.get_with(1, || panic!("boom"))
        }));
        assert!(r.is_err());
        still_negative(&c, &e, "get_with panicked");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.entry(1).or_insert_with(|| panic!("boom"))
        }));
        assert!(r.is_err());
        still_negative(&c, &e, "or_insert_with panicked");
    }

    #[test]
    fn get_with_value_ends_negative_entry() {
        let (c, _clock) = cache();
        make_negative(&c);
        assert_eq!(c.get_with(1, || 5), 5);
        assert_eq!(c.try_get_with(1, || Ok::<_, &str>(9)).unwrap(), 5);
    }

    #[test]
    fn compute_nop_leaves_put_ends_negative_entry() {
        let (c, _clock) = cache();
        let e = make_negative(&c);
        let r = c.entry(1).and_compute_with(|cur| {
            assert!(cur.is_none(), "a negative entry is not a value");
            Op::Nop
        });
        assert!(matches!(r, herdcache::CompResult::StillNone(_)));
        still_negative(&c, &e, "compute Nop");
        c.entry(1).and_compute_with(|_| Op::Put(3));
        assert_eq!(c.try_get_with(1, || Ok::<_, &str>(9)).unwrap(), 3);
    }

    #[test]
    fn writes_end_negative_entry_and_ttl_expires_it() {
        let (c, clock) = cache();
        make_negative(&c);
        c.invalidate(&1);
        not_negative(&c, "invalidate");
        c.invalidate(&1);
        make_negative(&c);
        c.invalidate_all();
        not_negative(&c, "invalidate_all");
        c.invalidate(&1);
        make_negative(&c);
        clock.advance(Duration::from_secs(11));
        not_negative(&c, "negative_ttl passed");
        c.invalidate(&1);
        let e = make_negative(&c);
        clock.advance(Duration::from_secs(9));
        still_negative(&c, &e, "within negative_ttl");
    }

    /// "during that time callers of that key get the same error ... without calling the
    /// backend": the async and by-ref forms, and `or_try_insert_with`, are such callers.
    #[test]
    fn negative_hits_for_async_byref_and_entry_forms() {
        let (c, _clock) = cache();
        let e = make_negative(&c);
        let r = futures::executor::block_on(c.try_get_with_async(1, async { Ok::<u32, &str>(9) }));
        assert!(Arc::ptr_eq(&r.unwrap_err(), &e), "try_get_with_async");
        let r = futures::executor::block_on(
            c.try_get_with_async_shared(1, async { Ok::<u32, &str>(9) }),
        );
        assert!(
            Arc::ptr_eq(&r.unwrap_err(), &e),
            "try_get_with_async_shared"
        );
        let r = c.try_get_with_by_ref(&1, || Ok::<u32, &str>(9));
        assert!(Arc::ptr_eq(&r.unwrap_err(), &e), "try_get_with_by_ref");
        let r = c.entry(1).or_try_insert_with(|| Ok::<u32, &str>(9));
        assert!(Arc::ptr_eq(&r.unwrap_err(), &e), "or_try_insert_with");
        let s = c.stats();
        assert_eq!(s.negative_hits, 5, "{s:?}");
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "{s:?}"
        );
    }

    #[derive(Debug, PartialEq)]
    struct OtherErr(u8);

    /// Type-erased failures: a negative entry remembered from a `try_get_with` with error type
    /// `&str` cannot answer a caller whose error type is `OtherErr`; that caller must neither
    /// panic (a failed downcast) nor get a wrong answer: it loads (its own `Ok` value, or its own
    /// error). And a waiter of a failing load of another error type loads itself.
    #[test]
    fn negative_entry_of_other_error_type() {
        let (c, _clock) = cache();
        make_negative(&c);
        let r = c.try_get_with(1, || Ok::<_, OtherErr>(7));
        assert_eq!(
            r.unwrap(),
            7,
            "a `&str` failure cannot answer an `OtherErr` caller: it loads"
        );
        c.invalidate(&1);
        make_negative(&c);
        let r = c.try_get_with(1, || Err::<u32, _>(OtherErr(1)));
        assert_eq!(
            r.map_err(|e| *e == OtherErr(1)),
            Err(true),
            "its own error, of its own type"
        );
        // Now remembered in its place: an `OtherErr` caller gets it without loading.
        let r = c.try_get_with(1, || -> Result<u32, OtherErr> {
            panic!("init must not run")
        });
        assert_eq!(r.map_err(|e| *e == OtherErr(1)), Err(true));
    }

    #[test]
    fn waiter_of_other_error_type_loads_itself() {
        let (c, _clock) = cache();
        let (in_init, go) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let leader = {
            let (c, in_init, go) = (c.clone(), in_init.clone(), go.clone());
            std::thread::spawn(move || {
                c.try_get_with(1, || {
                    in_init.wait();
                    go.wait();
                    Err::<u32, _>("down")
                })
            })
        };
        in_init.wait();
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.try_get_with(1, || Ok::<u32, OtherErr>(5)))
        };
        while c.stats().coalesced == 0 {
            std::thread::yield_now();
        }
        go.wait();
        assert!(leader.join().unwrap().is_err());
        assert_eq!(waiter.join().unwrap().unwrap(), 5);
    }
}

/// Outside attack on `Expiry` with loads and computations (helper 85). Contract (`Expiry`): "Every write asks, as moka's does: `expire_after_create` when the key has no live entry, `expire_after_update` when it has one ... A panic in a method leaves the key as it was before the write and reaches the writer."
mod expiry {

    use herdcache::{Cache, Expiry, ManualClock, Op};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Barrier};
    use std::time::Duration;

    fn watchdog<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("watchdog: test hung"),
        }
    }

    #[derive(Default)]
    struct Probe {
        creates: AtomicUsize,
        updates: AtomicUsize,
        reads: AtomicUsize,
        panic_create: AtomicBool,
    }

    #[derive(Clone)]
    struct P(Arc<Probe>);

    impl Expiry<u32, u32> for P {
        fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
            self.0.creates.fetch_add(1, Ordering::SeqCst);
            if self.0.panic_create.load(Ordering::SeqCst) {
                panic!("expiry boom");
            }
            Some(Duration::from_secs(100))
        }
        fn expire_after_read(
            &self,
            _k: &u32,
            _v: &u32,
            remaining: Option<Duration>,
        ) -> Option<Duration> {
            self.0.reads.fetch_add(1, Ordering::SeqCst);
            remaining
        }
        fn expire_after_update(
            &self,
            _k: &u32,
            _v: &u32,
            _remaining: Option<Duration>,
        ) -> Option<Duration> {
            self.0.updates.fetch_add(1, Ordering::SeqCst);
            Some(Duration::from_secs(1))
        }
    }

    fn build() -> (Cache<u32, u32>, Arc<Probe>, ManualClock) {
        let probe = Arc::new(Probe::default());
        let clock = ManualClock::new();
        let c = Cache::builder()
            .max_capacity(100)
            .expire_after(P(probe.clone()))
            .clock(clock.clone())
            .record_stats()
            .build();
        (c, probe, clock)
    }

    /// A computation's `Put` over a live entry is a write that replaces: `expire_after_update`
    /// (here 1 s) decides its deadline; over no entry, `expire_after_create` (100 s). The look is
    /// a read: `expire_after_read` is called "whatever `f` decides".
    #[test]
    fn compute_put_asks_update_or_create_and_look_is_a_read() {
        let (c, p, clock) = build();
        c.entry(1).and_compute_with(|_| Op::Put(1));
        assert_eq!(
            (
                p.creates.load(Ordering::SeqCst),
                p.updates.load(Ordering::SeqCst)
            ),
            (1, 0)
        );
        c.entry(1).and_compute_with(|_| Op::Nop);
        assert_eq!(
            p.reads.load(Ordering::SeqCst),
            1,
            "the Nop's look is a read"
        );
        c.entry(1).and_compute_with(|_| Op::Put(2));
        assert_eq!(
            p.updates.load(Ordering::SeqCst),
            1,
            "a Put over a live entry asks expire_after_update"
        );
        clock.advance(Duration::from_secs(2));
        assert_eq!(c.get(&1), None, "expire_after_update's 1 s applies");
    }

    /// `get_with_if` replacing a live value is a write over a live entry: `expire_after_update`.
    #[test]
    fn get_with_if_replacement_asks_update() {
        let (c, p, clock) = build();
        c.insert(1, 1);
        assert_eq!(c.get_with_if(1, || 2, |_| true), 2);
        assert_eq!(p.updates.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(2));
        assert_eq!(c.get(&1), None);
    }

    /// `expire_after_create` panicking while a load stores its value: the panic reaches the
    /// leader, "the key [is left] as it was before the write" (absent), the waiter of that load
    /// is released (it loads again itself), and nothing is left in flight.
    #[test]
    fn expiry_panic_on_load_store_releases_waiter() {
        watchdog(|| {
            let (c, p, _clock) = build();
            p.panic_create.store(true, Ordering::SeqCst);
            let (in_init, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let leader = {
                let (c, in_init, go) = (c.clone(), in_init.clone(), go.clone());
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.get_with(1, || {
                            in_init.wait();
                            go.wait();
                            10
                        })
                    }))
                })
            };
            in_init.wait();
            let waiter = {
                let c = c.clone();
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.get_with(1, || 20)))
                })
            };
            while c.stats().coalesced == 0 {
                std::thread::yield_now();
            }
            go.wait();
            assert!(
                leader.join().unwrap().is_err(),
                "the expiry's panic reaches the leader"
            );
            // The waiter loads again; its own store panics too (the expiry still panics).
            assert!(waiter.join().unwrap().is_err());
            assert_eq!(c.get(&1), None);
            assert_eq!(c.stats().loads_in_flight, 0);
            p.panic_create.store(false, Ordering::SeqCst);
            assert_eq!(c.get_with(1, || 30), 30);
            c.validate();
        });
    }

    /// Same for a computation's `Put`: the panic reaches the caller, the old value stays.
    #[test]
    fn expiry_panic_on_compute_put_keeps_old() {
        let (c, p, _clock) = build();
        p.panic_create.store(true, Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.entry(1).and_compute_with(|_| Op::Put(1))
        }));
        assert!(r.is_err());
        assert_eq!(c.get(&1), None);
        assert_eq!(c.stats().loads_in_flight, 0);
        p.panic_create.store(false, Ordering::SeqCst);
        assert!(matches!(
            c.entry(1).and_compute_with(|_| Op::Put(2)),
            herdcache::CompResult::Inserted(_)
        ));
        c.validate();
    }

    /// `time_to_live`: "Every entry expires this long after it was inserted or last replaced" — a
    /// loaded or computed value is inserted when the load / computation stores it, not when it
    /// started (moka: the TTL counts from the insert). The clock is advanced inside `init` / `f`
    /// (a slow backend).
    #[test]
    fn ttl_counts_from_store_not_load_start() {
        let clock = ManualClock::new();
        let c: Cache<u32, u32> = Cache::builder()
            .max_capacity(10)
            .time_to_live(Duration::from_secs(10))
            .clock(clock.clone())
            .build();
        assert_eq!(
            c.get_with(1, || {
                clock.advance(Duration::from_secs(8));
                1
            }),
            1
        );
        c.entry(2).and_compute_with(|_| {
            clock.advance(Duration::from_secs(8));
            Op::Put(2)
        });
        let v = futures::executor::block_on(c.get_with_async(3, async {
            clock.advance(Duration::from_secs(8));
            3
        }));
        assert_eq!(v, 3);
        // Now 24 s; keys 1, 2, 3 were stored at 8, 16, 24 s (their loads began at 0, 8, 16 s).
        clock.advance(Duration::from_secs(9));
        assert_eq!(
            c.get(&3),
            Some(3),
            "async load: TTL counted from the load's start"
        );
        assert_eq!(c.get(&1), None);
        let c2: Cache<u32, u32> = Cache::builder()
            .max_capacity(10)
            .time_to_live(Duration::from_secs(10))
            .clock(clock.clone())
            .build();
        assert_eq!(
            c2.get_with(1, || {
                clock.advance(Duration::from_secs(8));
                1
            }),
            1
        );
        c2.entry(2).and_compute_with(|_| {
            clock.advance(Duration::from_secs(8));
            Op::Put(2)
        });
        // Key 1 was stored 8 s ago (its load began 16 s ago), key 2 just now (began 8 s ago).
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            c2.get(&2),
            Some(2),
            "computation: TTL counted from the computation's start"
        );
        assert_eq!(
            c2.get(&1),
            Some(1),
            "load: TTL counted from the load's start"
        );
    }
}

/// Outside attack on async refreshes (helper 85): refresh futures handed to a `future_spawner` that the test holds, drops unpolled, or polls after a write.
mod refresh {

    use herdcache::{BoxError, BoxFuture, Cache, ManualClock};
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    type Parked = Arc<Mutex<Vec<BoxFuture<()>>>>;

    fn build() -> (Cache<u32, u64>, ManualClock, Parked, Arc<AtomicU64>) {
        let clock = ManualClock::new();
        let parked: Parked = Arc::default();
        let version = Arc::new(AtomicU64::new(0));
        let (p, v) = (parked.clone(), version.clone());
        let cache = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .refresh_backoff(Duration::from_secs(5))
            .clock(clock.clone())
            .record_stats()
            .async_loader(move |_k: &u32| {
                let n = v.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, BoxError>(n) }
            })
            .future_spawner(move |f| p.lock().unwrap().push(f))
            .build();
        (cache, clock, parked, version)
    }

    fn take(p: &Parked) -> Vec<BoxFuture<()>> {
        std::mem::take(&mut *p.lock().unwrap())
    }

    /// `spawner`: "A spawner that ... drops a job without running it, never leaves a key loading
    /// ... A refresh is then retried after the refresh backoff". The same for a future spawner
    /// dropping the refresh future: the key is refreshed again later, not stuck.
    #[test]
    fn dropped_refresh_future_is_retried() {
        let (cache, clock, parked, _v) = build();
        assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 0);
        clock.advance(Duration::from_secs(11));
        assert_eq!(cache.get(&1), Some(0)); // due: a refresh is handed to the spawner
        let fs = take(&parked);
        assert_eq!(fs.len(), 1, "one refresh spawned");
        drop(fs); // never run
        assert_eq!(
            cache.stats().loads_in_flight,
            0,
            "the dropped refresh left the key loading"
        );
        clock.advance(Duration::from_secs(6)); // past the backoff
        assert_eq!(cache.get(&1), Some(0));
        let fs = take(&parked);
        assert_eq!(fs.len(), 1, "the refresh is retried after the backoff");
        for f in fs {
            futures::executor::block_on(f);
        }
        assert_eq!(
            cache.get(&1),
            Some(1),
            "the retried refresh replaced the value"
        );
    }

    /// "A write or invalidation of the key while it loads wins" — a refresh future spawned
    /// before an `insert` (or an `invalidate_all`) and run after it must not overwrite it.
    #[test]
    fn refresh_run_after_write_does_not_overwrite() {
        for invalidate in [false, true] {
            let (cache, clock, parked, _v) = build();
            assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 0);
            clock.advance(Duration::from_secs(11));
            assert_eq!(cache.get(&1), Some(0));
            let fs = take(&parked);
            assert_eq!(fs.len(), 1);
            if invalidate {
                cache.invalidate_all();
            } else {
                cache.insert(1, 777);
            }
            for f in fs {
                futures::executor::block_on(f);
            }
            let want = if invalidate { None } else { Some(777) };
            assert_eq!(
                cache.get(&1),
                want,
                "invalidate={invalidate}: the refresh overwrote the write"
            );
            let s = cache.stats();
            assert_eq!(
                (s.refreshes_started, s.refreshes_failed, s.loads_in_flight),
                (1, 1, 0),
                "{s:?}"
            );
        }
    }

    /// A caller of `load_async` while a refresh of its key is parked (spawned, not yet run) is
    /// answered with the current value at once (stale-while-revalidate), not made to wait on a
    /// future nobody polls.
    #[test]
    fn load_async_during_parked_refresh_does_not_wait() {
        let (cache, clock, parked, _v) = build();
        assert_eq!(futures::executor::block_on(cache.load_async(1)).unwrap(), 0);
        clock.advance(Duration::from_secs(11));
        assert_eq!(cache.get(&1), Some(0));
        assert_eq!(take(&parked).len(), 1); // dropped unrun: retried after the backoff
        clock.advance(Duration::from_secs(6));
        assert_eq!(cache.get(&1), Some(0));
        let held = take(&parked);
        assert_eq!(held.len(), 1);
        let mut f = Box::pin(cache.load_async(1));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => assert_eq!(r.unwrap(), 0),
            std::task::Poll::Pending => {
                panic!("load_async waited on a refresh parked in the spawner")
            }
        }
        drop(held);
    }
}

/// The entry API's insert-if-absent verbs with fail-safe (helper 85). `Entry::is_fresh`: "Whether this call's loader or computation produced the value (rather than finding it cached, joining another caller's load, or — its loader having failed — being answered by `fail_safe` with the old value)"; `EntryRef::or_insert`: "An expired entry is absent here even with `fail_safe`, whose old value answers only loads: `default` is stored."
mod failsafe_entry {

    use herdcache::{Cache, ManualClock};
    use std::time::Duration;

    fn failing_key() -> (Cache<u32, String>, ManualClock) {
        let clock = ManualClock::new();
        let cache: Cache<u32, String> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(10))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .clock(clock.clone())
            .build();
        cache.insert(1, "old".into());
        clock.advance(Duration::from_secs(11));
        // The reload fails: fail-safe answers the old value and starts the backoff.
        assert_eq!(
            cache.try_get_with(1, || Err::<String, _>("down")).unwrap(),
            "old"
        );
        (cache, clock)
    }

    #[test]
    fn or_insert_with_in_backoff_answers_old_value_not_fresh() {
        let (cache, _clock) = failing_key();
        let e = cache
            .entry(1)
            .or_insert_with(|| panic!("no load within the backoff"));
        assert_eq!((e.value().as_str(), e.is_fresh()), ("old", false));
        assert_eq!(
            cache.get(&1),
            None,
            "plain reads never see an expired value"
        );
    }

    #[test]
    fn or_insert_in_backoff_stores_default() {
        let (cache, _clock) = failing_key();
        let e = cache.entry(1).or_insert("default".into());
        assert_eq!(e.value(), "default");
        assert!(e.is_fresh(), "this call's value was stored");
        assert_eq!(cache.get(&1).as_deref(), Some("default"));
        let e = futures::executor::block_on(cache.entry(1).or_insert_async("other".into()));
        assert_eq!((e.value().as_str(), e.is_fresh()), ("default", false));
    }

    #[test]
    fn or_insert_async_in_backoff_stores_default() {
        let (cache, _clock) = failing_key();
        let e = futures::executor::block_on(cache.entry(1).or_insert_async("default".into()));
        assert_eq!((e.value().as_str(), e.is_fresh()), ("default", true));
        assert_eq!(cache.get(&1).as_deref(), Some("default"));
    }
}

/// Compile-time checks (helper 85): `get_with_async`: "`init` ... needs neither `Send` nor `'static`, and the returned future is `Send` when `init` is" — and so for the siblings documented as "As `get_with_async`", the entry API's async verbs and `load_async` (moka's `future::Cache` futures are all `Send`, which `tokio::spawn` needs).
mod send {

    use herdcache::{Cache, Op};

    fn assert_send<T: Send>(t: T) -> T {
        t
    }

    #[test]
    fn async_futures_are_send() {
        let cache: Cache<u32, String> = Cache::builder()
            .max_capacity(10)
            .async_loader(|k: &u32| {
                let k = *k;
                async move { Ok::<_, herdcache::BoxError>(k.to_string()) }
            })
            .build();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let c = cache.clone();
            let h = tokio::spawn(async move {
                let a = assert_send(c.get_with_async(1, async { "a".to_string() })).await;
                let b =
                    assert_send(c.try_get_with_async(2, async { Ok::<_, ()>("b".to_string()) }))
                        .await
                        .unwrap();
                let d =
                    assert_send(c.optionally_get_with_async(3, async { Some("d".to_string()) }))
                        .await
                        .unwrap();
                let e = assert_send(c.get_with_async_shared(4, async { "e".to_string() })).await;
                let f = assert_send(c.get_with_by_ref_async(&5, async { "f".to_string() })).await;
                let g =
                    assert_send(c.get_with_if_async(6, async { "g".to_string() }, |_| false)).await;
                let h = assert_send(c.entry(7).or_insert_with_async(async { "h".to_string() }))
                    .await
                    .into_value();
                let i = assert_send(c.entry(8).or_insert_async("i".to_string()))
                    .await
                    .into_value();
                let j = assert_send(
                    c.entry(9)
                        .and_compute_with_async(|_| async { Op::Put("j".to_string()) }),
                )
                .await;
                let k = assert_send(
                    c.entry(10)
                        .and_upsert_with_async(|_| async { "k".to_string() }),
                )
                .await
                .into_value();
                let l = assert_send(c.load_async(11)).await.unwrap();
                let m = assert_send(c.entry(12).or_default_async())
                    .await
                    .into_value();
                let n = assert_send(
                    c.entry_by_ref(&13)
                        .or_insert_with_async(async { "n".to_string() }),
                )
                .await
                .into_value();
                drop(j);
                [a, b, d, e, f, g, h, i, k, l, m, n].join(",")
            });
            assert_eq!(h.await.unwrap(), "a,b,d,e,f,g,h,i,k,11,,n");
        });
    }
}
