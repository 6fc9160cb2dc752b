//! Randomized schedules of the whole cache (shuttle): blocking threads and async tasks load,
//! write and invalidate two keys of a tiny cache (an async task through a shared load, the
//! others through their own), and one async caller is cancelled while it
//! waits. Every schedule must end with correct values, no flight left and the invariants held.
//! A second model runs fail-safe: three loaders of an expired key, its backend down, a writer.
//! A third runs `attack_s44`'s limit sweep: shared and borrowing loads nesting chains of shared
//! loads under a limit of one or two loads, some callers cancelled; shuttle fails a schedule
//! where every task waits (a deadlock). It found one: a nested shared load that kept the permit
//! it had been granted for an outer caller since dropped, while its only remaining callers,
//! inside another load's polls, waited for that permit (`SHUTTLE_OBSERVE=1` reports a stalled
//! schedule's plan and loads instead of shuttle's bare "deadlock"; `SHUTTLE_PLAN=1` with
//! `SHUTTLE_RANDOM_SEED` and `--nocapture` prints a replayed schedule's plan). With blocking
//! callers added, it found two more (see `nested_loads_with_blocking_callers_under_a_limit`);
//! then, about once in a million schedules, a fourth: a shared load whose outer callers had all
//! left kept its place in the queue once a nested caller came, and the permit granted to it
//! was collected by nobody.
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

/// Polls a future at most `polls` times, then drops it (a caller cancelled by a timeout).
struct Cancel<F> {
    inner: Option<Pin<Box<F>>>,
    polls: u32,
}

impl<F: Future> Future for Cancel<F> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(f) = self.inner.as_mut() else {
            return Poll::Ready(());
        };
        if f.as_mut().poll(cx).is_ready() || self.polls == 0 {
            self.inner = None;
            return Poll::Ready(());
        }
        self.polls -= 1;
        Poll::Pending
    }
}

type Fut = Pin<Box<dyn Future<Output = u32> + Send>>;

/// Counts a top-level init while it runs (a cancelled one included, until it is dropped).
struct Inside(Arc<(AtomicUsize, usize)>);

impl Inside {
    fn enter(n: &Arc<(AtomicUsize, usize)>) -> Self {
        let now = n.0.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(
            now <= n.1,
            "{now} top-level inits at once under a limit of {}",
            n.1
        );
        Inside(n.clone())
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A chain of shared loads: `k` loads `k + 1` … down to `depth` 0.
fn chain(c: Cache<u32, u32>, k: u32, depth: u32, yields: u32) -> Fut {
    Box::pin(async move {
        for _ in 0..yields {
            YieldOnce(false).await;
        }
        if depth == 0 {
            return k;
        }
        let c2 = c.clone();
        c.get_with_async_shared(k + 1, chain(c2, k + 1, depth - 1, yields))
            .await
    })
}

/// `attack_s44`'s limit sweep under random schedules, with a limit of one or two loads: two to
/// five async callers, each a top-level shared or borrowing load whose init nests a chain of
/// shared loads, or a caller of a nested key; some are cancelled after a few polls. No schedule
/// may deadlock (shuttle fails a run where every task waits), leave a load in flight, or run
/// more top-level inits at once than the limit.
#[test]
fn nested_loads_under_a_limit() {
    nested_loads_model(false);
}

/// [`nested_loads_under_a_limit`] with blocking callers as well: a top-level load whose loader
/// loads a nested key, or a caller of a nested key. It found two more deadlocks, of a load that
/// an async caller inside shared load P's poll takes over from a blocking leader waiting for a
/// permit (so that only P's polls drive it), P queued for a permit: a blocking caller holding
/// the only permit that lends it to that load, and an async caller holding it that waits for
/// that load inside another load's poll (see `Flight::driven_by`).
#[test]
fn nested_loads_with_blocking_callers_under_a_limit() {
    nested_loads_model(true);
}

fn nested_loads_model(blocking: bool) {
    use shuttle::rand::Rng;
    shuttle::check_random(
        move || {
            let mut rng = shuttle::rand::thread_rng();
            let limit = rng.gen_range(1..3usize);
            let cache: Cache<u32, u32> = Cache::builder()
                .max_capacity(100)
                .max_concurrent_loads(limit)
                .build();
            let inits = Arc::new((AtomicUsize::new(0), limit));
            let done = Arc::new(AtomicUsize::new(0));
            let (mut tasks, mut threads) = (Vec::new(), Vec::new());
            let mut plan = Vec::new();
            let n = rng.gen_range(2..6);
            for _ in 0..n {
                let depth = rng.gen_range(1..3u32);
                let verb = rng.gen_range(0..if blocking { 5 } else { 3 });
                let top = rng.gen_range(1..3u32);
                let nk = 100 + rng.gen_range(0..2u32);
                let yields = rng.gen_range(0..2u32);
                let cancel = rng.gen_range(0..3u32) == 0;
                let polls = rng.gen_range(0..6u32);
                plan.push(format!(
                    "limit {limit}: verb {verb}, top {top}, nested {nk} depth {depth}, \
                     yields {yields}, cancel {cancel} after {polls} polls"
                ));
                let (c, inits, done) = (cache.clone(), inits.clone(), done.clone());
                if verb >= 3 {
                    // Blocking: a top-level load whose loader loads a nested key (3), or a
                    // caller of a nested key (4).
                    threads.push(shuttle::thread::spawn(move || {
                        let v = if verb == 3 {
                            c.get_with(top, || {
                                let _in = Inside::enter(&inits);
                                c.get_with(nk, || nk)
                            })
                        } else {
                            c.get_with(nk, || nk)
                        };
                        assert!(v >= 100, "{v}");
                        done.fetch_add(1, Ordering::SeqCst);
                    }));
                    continue;
                }
                tasks.push(shuttle::future::spawn(async move {
                    let c2 = c.clone();
                    let init = async move {
                        let _in = Inside::enter(&inits);
                        YieldOnce(false).await;
                        c2.get_with_async_shared(nk, chain(c2.clone(), nk, depth, yields))
                            .await
                    };
                    let call: Fut = match verb {
                        0 => Box::pin(async move { c.get_with_async_shared(top, init).await }),
                        1 => Box::pin(async move { c.get_with_async(top, init).await }),
                        _ => {
                            let c2 = c.clone();
                            Box::pin(async move {
                                c.get_with_async_shared(nk, chain(c2, nk, depth, yields))
                                    .await
                            })
                        }
                    };
                    if cancel {
                        Cancel {
                            inner: Some(Box::pin(call)),
                            polls,
                        }
                        .await;
                    } else {
                        call.await;
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }));
            }
            if std::env::var_os("SHUTTLE_PLAN").is_some() {
                eprintln!("plan:\n{}", plan.join("\n"));
            }
            // Diagnosis: with SHUTTLE_OBSERVE set, a task that yields a while, then reports
            // the plan and the loads if the others are not done (instead of shuttle's bare
            // "deadlock").
            let observer = std::env::var_os("SHUTTLE_OBSERVE").map(|_| {
                let (c, done) = (cache.clone(), done.clone());
                shuttle::future::spawn(async move {
                    for _ in 0..20_000 {
                        if done.load(Ordering::SeqCst) == n {
                            return;
                        }
                        YieldOnce(false).await;
                    }
                    panic!("stalled:\n{}\n{}", plan.join("\n"), c.describe_loads());
                })
            });
            for t in tasks {
                shuttle::future::block_on(t).expect("task");
            }
            for t in threads {
                t.join().expect("thread");
            }
            if let Some(o) = observer {
                shuttle::future::block_on(o).expect("observer");
            }
            assert_eq!(cache.loads_in_flight(), 0, "no flight left behind");
            let v = shuttle::future::block_on(cache.get_with_async_shared(9, async { 9 }));
            assert_eq!(v, 9, "a fresh load completes");
        },
        iterations(),
    );
}
