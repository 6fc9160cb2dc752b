//! Randomized schedules of the whole cache (shuttle): blocking threads and async tasks load,
//! write and invalidate two keys of a tiny cache (an async task through a shared load, the
//! others through their own), and one async caller is cancelled while it
//! waits. Every schedule must end with correct values, no flight left and the invariants held.
//! A second model runs fail-safe: three loaders of an expired key, its backend down, a writer.
//!
//! ```text
//! RUSTFLAGS="--cfg shuttle" cargo test --release --test shuttle_cache
//! SHUTTLE_ITERATIONS=1000000 RUSTFLAGS="--cfg shuttle" cargo test --release --test shuttle_cache
//! ```
#![cfg(shuttle)]

use herdcache::Cache;
use shuttle::sync::atomic::{AtomicUsize, Ordering};
use shuttle::sync::Arc;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Pending once (yielding to the scheduler), then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn iterations() -> usize {
    std::env::var("SHUTTLE_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

#[test]
fn threads_tasks_and_a_cancelled_waiter() {
    shuttle::check_random(
        || {
            let cache: Cache<u32, u32> = Cache::builder().max_capacity(4).shards(1).build();
            let loads = Arc::new(AtomicUsize::new(0));
            let mut threads = Vec::new();
            for t in 0..2u32 {
                let (cache, loads) = (cache.clone(), loads.clone());
                threads.push(shuttle::thread::spawn(move || {
                    for k in [1u32, 2] {
                        let v = cache.get_with(k, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            k * 10
                        });
                        // Values are only ever k * 10 (loads) or k * 10 + 1 (the writer).
                        assert!(v == k * 10 || v == k * 10 + 1, "thread {t}: {k} -> {v}");
                        if k == 2 {
                            // Nothing removes key 2: once a caller has its value, so does get.
                            assert!(
                                cache.get(&2).is_some(),
                                "value not published before release"
                            );
                        }
                    }
                }));
            }
            let writer = {
                let cache = cache.clone();
                shuttle::thread::spawn(move || {
                    cache.insert(2, 21);
                    cache.invalidate(&1);
                })
            };
            let task = {
                let (cache, loads) = (cache.clone(), loads.clone());
                shuttle::future::spawn(async move {
                    let v = cache
                        .get_with_async_shared(1, async move {
                            YieldOnce(false).await;
                            loads.fetch_add(1, Ordering::SeqCst);
                            10
                        })
                        .await;
                    assert!(v == 10, "task: 1 -> {v}");
                })
            };
            // An async caller polled once, then dropped while it waits or leads.
            {
                let mut f = Box::pin(cache.get_with_async(2, async {
                    YieldOnce(false).await;
                    20
                }));
                let _ = f.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            }
            for t in threads {
                t.join().expect("thread");
            }
            writer.join().expect("writer");
            shuttle::future::block_on(task).expect("task");
            assert_eq!(cache.loads_in_flight(), 0, "no flight left behind");
            cache.validate();
            for k in [1u32, 2] {
                if let Some(v) = cache.get(&k) {
                    assert!(v == k * 10 || v == k * 10 + 1);
                }
            }
        },
        iterations(),
    );
}

/// Fail-safe under random schedules: three threads load an expired key while its backend is
/// down and a writer replaces it. Every call gets the last value, the written one or (only when
/// the write superseded its load) the error; the backend sees at most one load; the written
/// value is never replaced by the old one.
#[test]
fn fail_safe_one_load_and_writes_win() {
    shuttle::check_random(
        || {
            let clock = herdcache::ManualClock::new();
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(4)
                .shards(1)
                .time_to_live(std::time::Duration::from_secs(10))
                .fail_safe(std::time::Duration::from_secs(60))
                .refresh_backoff(std::time::Duration::from_secs(5))
                .clock(clock.clone())
                .build();
            cache.insert(1, 7);
            clock.advance(std::time::Duration::from_secs(11));
            let loads = Arc::new(AtomicUsize::new(0));
            let mut threads = Vec::new();
            for t in 0..3u32 {
                let (cache, loads) = (cache.clone(), loads.clone());
                threads.push(shuttle::thread::spawn(move || {
                    for _ in 0..2 {
                        let r: Result<u32, std::sync::Arc<&str>> = cache.try_get_with(1, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            Err("down")
                        });
                        match r {
                            Ok(v) => assert!(v == 7 || v == 8, "thread {t}: {v}"),
                            Err(_) => {}
                        }
                    }
                }));
            }
            let writer = {
                let cache = cache.clone();
                shuttle::thread::spawn(move || cache.insert(1, 8))
            };
            for t in threads {
                t.join().expect("thread");
            }
            writer.join().expect("writer");
            assert!(loads.load(Ordering::SeqCst) <= 1, "one load per backoff");
            assert_eq!(cache.get(&1), Some(8), "the write wins");
            assert_eq!(cache.loads_in_flight(), 0, "no flight left behind");
            cache.validate();
        },
        iterations() / 4,
    );
}
