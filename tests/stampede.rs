//! Stampede protection beyond one key: refresh-ahead, stale-if-error, jitter, early refresh,
//! negative caching, the load limit and soft timeouts. Time is a `ManualClock`: no test sleeps
//! to wait for expiry (the timeout and load-limit tests use short real loads, since they are
//! about waiting itself).

#![cfg(not(loom))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, LoadError, ManualClock};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const SEC: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;
type Jobs = Arc<Mutex<Vec<Job>>>;
type Spawn = Box<dyn Fn(Job) + Send + Sync>;

/// A spawner that parks jobs until the test runs them.
fn parked() -> (Jobs, Spawn) {
    let jobs: Jobs = Arc::default();
    let j = jobs.clone();
    (jobs, Box::new(move |job| j.lock().unwrap().push(job)))
}

fn run_all(jobs: &Jobs) -> usize {
    let taken: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let n = taken.len();
    for job in taken {
        job();
    }
    n
}

#[test]
fn one_refresh_per_key_per_period_under_sixteen_readers() {
    let _dog = watchdog(LIMIT, "one_refresh_per_key_per_period");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (jobs, spawner) = parked();
    let c = calls.clone();
    let cache: Cache<u32, usize> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(60 * SEC)
        .refresh_after(10 * SEC)
        .loader(move |_k: &u32| Ok::<_, BoxError>(c.fetch_add(1, Ordering::SeqCst)))
        .spawner(spawner)
        .clock(clock.clone())
        .build();
    for k in 0..50 {
        cache.load(k).unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 50);
    for period in 1..=3usize {
        clock.advance(11 * SEC);
        let barrier = Barrier::new(16);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..20 {
                        for k in 0..50 {
                            // Served at once: the value from before this period's refresh.
                            assert!(cache.get(&k).is_some());
                        }
                    }
                });
            }
        });
        assert_eq!(
            run_all(&jobs),
            50,
            "period {period}: exactly one refresh per key"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 50 * (period + 1));
        // After the refresh, the entry is fresh again: no more refreshes this period.
        for k in 0..50 {
            cache.get(&k);
        }
        assert!(jobs.lock().unwrap().is_empty());
    }
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn stale_is_served_during_a_refresh_and_replaced_after() {
    let clock = ManualClock::new();
    let version = Arc::new(AtomicUsize::new(0));
    let (jobs, spawner) = parked();
    let v = version.clone();
    let cache: Cache<&str, usize> = Cache::builder()
        .max_capacity(10)
        .time_to_live(60 * SEC)
        .refresh_after(10 * SEC)
        .loader(move |_k: &&str| Ok::<_, BoxError>(v.load(Ordering::SeqCst)))
        .spawner(spawner)
        .clock(clock.clone())
        .build();
    assert_eq!(cache.load("k").unwrap(), 0);
    version.store(1, Ordering::SeqCst);
    clock.advance(15 * SEC);
    assert_eq!(cache.get("k"), Some(0), "the current value, at once");
    assert_eq!(
        cache.load("k").unwrap(),
        0,
        "still the current value while the refresh waits"
    );
    assert_eq!(run_all(&jobs), 1);
    assert_eq!(cache.get("k"), Some(1), "replaced by the refresh");
}

#[test]
fn stale_if_error_until_the_hard_ttl_then_a_miss() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // No spawner: the reader that finds the entry due runs the refresh itself.
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(30 * SEC)
        .refresh_after(10 * SEC)
        .refresh_backoff(5 * SEC)
        .loader(move |_k: &u32| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(7)
            } else {
                Err(BoxError::from("backend down"))
            }
        })
        .clock(clock.clone())
        .build();
    assert_eq!(cache.load(1).unwrap(), 7);
    for t in 1..30 {
        clock.advance(SEC);
        assert_eq!(cache.get(&1), Some(7), "t = {t} s: the old value is served");
    }
    // Refreshes were tried at 10 s, then after each 5 s backoff: 15, 20, 25 s.
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 4);
    clock.advance(SEC); // 30 s: the hard TTL
    assert_eq!(cache.get(&1), None, "never served past the hard TTL");
    match cache.load(1) {
        Err(LoadError::Loader(e)) => assert_eq!(e.to_string(), "backend down"),
        other => panic!("expected the loader's error, got {other:?}"),
    }
}

#[test]
fn a_hanging_refresh_never_extends_life_past_the_hard_ttl() {
    let clock = ManualClock::new();
    let (jobs, spawner) = parked();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(30 * SEC)
        .refresh_after(10 * SEC)
        .loader(|_k: &u32| Ok::<_, BoxError>(1))
        .spawner(spawner)
        .clock(clock.clone())
        .build();
    cache.load(1).unwrap();
    clock.advance(11 * SEC);
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(
        jobs.lock().unwrap().len(),
        1,
        "a refresh was started and hangs (never run)"
    );
    clock.advance(19 * SEC);
    assert_eq!(cache.get(&1), None);
    // The parked job holds a handle on the cache, which holds the spawner, which holds the job:
    // drop the job to break the cycle.
    jobs.lock().unwrap().clear();
}

#[test]
fn jitter_spreads_deadlines_within_bounds() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(100 * SEC)
        .jitter(0.2)
        .clock(clock.clone())
        .build();
    for k in 0..2000 {
        cache.insert(k, k);
    }
    let alive = |c: &Cache<u32, u32>| (0..2000).filter(|k| c.contains_key(k)).count();
    clock.advance(Duration::from_millis(79_900));
    assert_eq!(alive(&cache), 2000, "none expires before 80 % of the TTL");
    clock.advance(Duration::from_millis(20_100)); // 100 s
    let at_nominal = alive(&cache);
    assert!(
        (700..=1300).contains(&at_nominal),
        "about half expire by the nominal TTL: {at_nominal} alive"
    );
    clock.advance(Duration::from_millis(20_100)); // 120.1 s
    assert_eq!(alive(&cache), 0, "all expire by 120 % of the TTL");
    assert!(Cache::<u32, u32>::builder()
        .max_capacity(1)
        .jitter(1.0)
        .try_build()
        .is_err());
}

#[test]
fn negative_caching_limits_backend_calls() {
    let _dog = watchdog(LIMIT, "negative_caching_limits_backend_calls");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(10 * SEC)
        .loader(move |_k: &u32| {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<u32, _>(BoxError::from("down"))
        })
        .clock(clock.clone())
        .build();
    let first = match cache.load(5) {
        Err(LoadError::Loader(e)) => e,
        other => panic!("{other:?}"),
    };
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    match cache.load(5) {
                        Err(LoadError::Loader(e)) => assert!(Arc::ptr_eq(&e, &first), "shared"),
                        other => panic!("{other:?}"),
                    }
                }
            });
        }
    });
    clock.advance(9 * SEC);
    assert!(cache.load(5).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one backend call per key per negative TTL"
    );
    clock.advance(SEC);
    assert!(cache.load(5).is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "after the negative TTL the key loads again"
    );
    // Other keys are unaffected, and a write ends a negative entry.
    assert!(cache.load(6).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    cache.insert(5, 55);
    assert_eq!(cache.load(5).unwrap(), 55);
    // `None` from optionally_get_with is remembered too.
    let nones = AtomicUsize::new(0);
    for _ in 0..5 {
        let v = cache.optionally_get_with(9, || {
            nones.fetch_add(1, Ordering::SeqCst);
            None
        });
        assert_eq!(v, None);
    }
    assert_eq!(nones.load(Ordering::SeqCst), 1);
    // A caller that cannot take an error (get_with) still gets a value: it loads itself.
    assert!(cache.load(6).is_err());
    assert_eq!(cache.get_with(6, || 66), 66);
    // Expired negative entries of keys never asked for again do not pile up.
    clock.advance(60 * SEC);
    for k in 1000..1200 {
        let _ = cache.load(k);
        clock.advance(SEC * 11);
    }
    assert!(
        cache.loads_in_flight() < 100,
        "{} entries kept",
        cache.loads_in_flight()
    );
}

#[test]
fn the_load_limit_is_never_exceeded() {
    let _dog = watchdog(LIMIT, "the_load_limit_is_never_exceeded");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10_000)
        .max_concurrent_loads(4)
        .loader(move |k: &u32| {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(*k)
        })
        .build();
    let barrier = Barrier::new(64);
    std::thread::scope(|s| {
        for t in 0..64u32 {
            let (cache, barrier) = (&cache, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..20 {
                    let k = t * 1000 + i;
                    assert_eq!(cache.load(k).unwrap(), k);
                    // get_with goes through the same limit.
                    assert_eq!(cache.get_with(k + 500, || k), k);
                }
            });
        }
    });
    let (high_water, waited) = cache.load_limit_stats();
    assert!(
        high_water <= 4,
        "the limiter's high-water mark is {high_water}"
    );
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "loaders seen at once: {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(waited > 0, "64 threads must have queued");
    // Async loads take permits too.
    let futs = (0..32u32).map(|k| {
        let (r, p) = (running.clone(), peak.clone());
        cache.get_with_async(100_000 + k, async move {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(n, Ordering::SeqCst);
            r.fetch_sub(1, Ordering::SeqCst);
            k
        })
    });
    futures::executor::block_on(futures::future::join_all(futs));
    assert!(cache.load_limit_stats().0 <= 4);
}

#[test]
fn an_inline_refresh_over_the_limit_is_deferred_not_lost() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(60 * SEC)
        .refresh_after(10 * SEC)
        .max_concurrent_loads(1)
        .loader(move |_k: &u32| Ok::<_, BoxError>(c.fetch_add(1, Ordering::SeqCst) as u32))
        .clock(clock.clone())
        .build();
    cache.load(1).unwrap();
    clock.advance(11 * SEC);
    // Another thread holds the only permit with a load of another key. (A load nested in a
    // loader on the same thread would not wait for a permit: it runs under its caller's.)
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let v = std::thread::scope(|s| {
        let cache = &cache;
        let holder = s.spawn(move || {
            cache.get_with(2, || {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                9
            })
        });
        entered_rx.recv().unwrap();
        assert_eq!(
            cache.get(&1),
            Some(0),
            "stale value served, refresh deferred"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no refresh ran over the limit"
        );
        release_tx.send(()).unwrap();
        holder.join().unwrap()
    });
    assert_eq!(v, 9);
    // The permit is free again: the next read refreshes.
    assert_eq!(cache.get(&1), Some(0));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the deferred refresh ran");
    assert_eq!(cache.get(&1), Some(1));
}

#[test]
fn early_refresh_happens_near_expiry_for_slow_keys() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, ck) = (calls.clone(), clock.clone());
    let cache: Cache<u32, usize> = Cache::builder()
        .max_capacity(10)
        .time_to_live(100 * SEC)
        .early_refresh(1.0)
        .loader(move |_k: &u32| {
            ck.advance(5 * SEC); // this key takes 5 s to load
            Ok::<_, BoxError>(c.fetch_add(1, Ordering::SeqCst))
        })
        .clock(clock.clone())
        .build();
    cache.load(1).unwrap(); // expires at 105 s (loaded from 0 to 5 s)
    clock.advance(45 * SEC); // 50 s: 55 s left, P(refresh) = e^-11 per read
    for _ in 0..20 {
        assert_eq!(cache.get(&1), Some(0));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no early refresh far from expiry"
    );
    clock.advance(Duration::from_millis(54_750)); // 0.25 s left: P = e^-0.05 ≈ 0.95 per read
    for _ in 0..10 {
        cache.get(&1);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refreshed early, exactly once"
    );
    assert!(cache.get(&1).is_some(), "the refreshed value lives on");
}

#[test]
fn a_soft_timeout_returns_while_the_load_goes_on() {
    let _dog = watchdog(LIMIT, "a_soft_timeout_returns_while_the_load_goes_on");
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .loader(|k: &u32| {
            std::thread::sleep(Duration::from_millis(300));
            Ok::<_, BoxError>(*k * 2)
        })
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .load_timeout(Duration::from_millis(30))
        .build();
    let start = std::time::Instant::now();
    assert!(matches!(cache.load(4), Err(LoadError::Timeout)));
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "the caller did not wait for the load"
    );
    // The load went on and fills the cache for the next caller.
    assert_eq!(cache.load_with_timeout(4, None).unwrap(), 8);
    assert_eq!(cache.get(&4), Some(8));
    assert_eq!(cache.loads_in_flight(), 0);
}

#[test]
fn refresh_configuration_errors() {
    let r = Cache::<u32, u32>::builder()
        .max_capacity(1)
        .refresh_after(SEC)
        .try_build();
    assert_eq!(r.err(), Some(herdcache::BuildError::RefreshWithoutLoader));
    let r = Cache::<u32, u32>::builder()
        .max_capacity(1)
        .loader(|_k: &u32| Ok::<_, BoxError>(1))
        .early_refresh(1.0)
        .try_build();
    assert_eq!(r.err(), Some(herdcache::BuildError::EarlyRefreshWithoutTtl));
    let c = Cache::<u32, u32>::new(1);
    assert!(matches!(c.load(1), Err(LoadError::NoLoader)));
}

#[test]
fn async_loader_and_async_refresh() {
    let _dog = watchdog(LIMIT, "async_loader_and_async_refresh");
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let parked: Arc<Mutex<Vec<herdcache::BoxFuture<()>>>> = Arc::default();
    let (c, p) = (calls.clone(), parked.clone());
    let cache: Cache<u32, usize> = Cache::builder()
        .max_capacity(100)
        .time_to_live(60 * SEC)
        .refresh_after(10 * SEC)
        .refresh_backoff(5 * SEC)
        .async_loader(move |_k: &u32| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 2 {
                    Err(BoxError::from("down once"))
                } else {
                    Ok::<_, BoxError>(n)
                }
            }
        })
        .future_spawner(move |f| p.lock().unwrap().push(f))
        .clock(clock.clone())
        .build();
    // Sixteen concurrent async loads of a cold key: one loader call.
    let all = futures::executor::block_on(futures::future::join_all(
        (0..16).map(|_| cache.load_async(1)),
    ));
    assert!(all.iter().all(|r| *r.as_ref().unwrap() == 0));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Due: the read returns the current value and hands one refresh future to the spawner.
    clock.advance(11 * SEC);
    for _ in 0..10 {
        assert_eq!(cache.get(&1), Some(0));
    }
    let futs: Vec<_> = std::mem::take(&mut *parked.lock().unwrap());
    assert_eq!(futs.len(), 1, "exactly one refresh");
    for f in futs {
        futures::executor::block_on(f);
    }
    assert_eq!(cache.get(&1), Some(1), "replaced by the async refresh");
    // A failing refresh keeps the value and backs off.
    clock.advance(11 * SEC);
    cache.get(&1);
    for f in std::mem::take(&mut *parked.lock().unwrap()) {
        futures::executor::block_on(f);
    }
    assert_eq!(cache.get(&1), Some(1), "stale-if-error");
    clock.advance(SEC);
    cache.get(&1);
    assert!(parked.lock().unwrap().is_empty(), "backing off");
    // A refresh future dropped by its runtime is abandoned, then retried after the backoff.
    clock.advance(5 * SEC);
    cache.get(&1);
    let dropped = std::mem::take(&mut *parked.lock().unwrap());
    assert_eq!(dropped.len(), 1);
    drop(dropped);
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "the dropped refresh left nothing behind"
    );
    clock.advance(5 * SEC);
    cache.get(&1);
    for f in std::mem::take(&mut *parked.lock().unwrap()) {
        futures::executor::block_on(f);
    }
    assert_eq!(cache.get(&1), Some(3));
    assert!(matches!(
        futures::executor::block_on(Cache::<u32, u32>::new(1).load_async(1)),
        Err(LoadError::NoLoader)
    ));
}
