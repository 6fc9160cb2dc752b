//! Round 33 adversarial tests (public API only): systematic sweeps.
//!
//! 1. Cancel-safety: every async verb polled N times and dropped, for every N until it
//!    completes on its own, with a loader that yields k times; an async and a blocking caller
//!    joined on the same key; then: no key stuck, no load in flight, no permit leaked,
//!    `validate()`, statistics consistent.
//! 2. Fault at every user-code call site (loader, weigher, `Expiry`, listener, the value's
//!    `Clone`, the key's `Clone`/`Hash`/`Eq`, the spawner): a panic injected at the i-th call
//!    for every i, in blocking and async loads with joined callers.
//! 3. Refresh spawners that drop, delay or half-run their jobs, against a versioned history of
//!    writes: a late refresh never overwrites a newer write.
//!
//! Finding (fixed with this file): a refresh whose store of the new value panicked in user
//! code run under the shard lock (the key's `Eq`, `Expiry::expire_after_update`) left the key
//! without refresh-ahead until it was written, invalidated or expired: every later read found
//! it due (counted as `stale_served`) but none started a refresh — with an inline, threaded or
//! deferred `spawner`, with a `future_spawner`, and without a spawner
//! (`fault_sweep_refresh_*`, `fault_sweep_async_refresh_with_future_spawner`,
//! `refresh_whose_publish_panics_*`). Now the refresh gives its claim back when its store
//! panics, and a read that finds a claim with no refresh registered gives it back too (due
//! after the backoff).
#![cfg(not(any(loom, shuttle)))]

mod common;

use common::{quiet_injected_panics, watchdog, within, Yield};
use herdcache::{BoxError, BoxFuture, Cache, CompResult, Expiry, ManualClock, Op, RemovalCause};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);
const SHORT: Duration = Duration::from_secs(10);

type Fut<'a> = Pin<Box<dyn Future<Output = u64> + Send + 'a>>;

/// Polls `f` at most `n` times (a no-op waker); `Some` if it completed.
fn poll_n<F: Future + ?Sized>(f: &mut Pin<Box<F>>, n: usize) -> Option<F::Output> {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for _ in 0..n {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

/// Polls `f` until it completes (sleeping a little between polls once it has been pending a
/// while, for waits on other threads); panics if it is still pending after `limit`.
fn drive<F: Future + ?Sized>(f: &mut Pin<Box<F>>, limit: Duration, what: &str) -> F::Output {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let until = Instant::now() + limit;
    let mut spins = 0u64;
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        spins += 1;
        if spins > 200 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            Instant::now() < until,
            "{what}: still pending after {limit:?} (hang)"
        );
    }
}

// =============================================================================================
// 1. Cancel-safety sweep
// =============================================================================================

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The caller drives its own init; a dropped leader hands the key to a waiter's init.
    Borrowed,
    /// The init is stored in the flight; waiters finish a dropped leader's load.
    Shared,
    /// The builder's async loader (`load_async`): shared.
    Loader,
    /// An entry computation (atomic per key).
    Compute,
}

const VERBS: &[(&str, Kind)] = &[
    ("get_with_async", Kind::Borrowed),
    ("try_get_with_async", Kind::Borrowed),
    ("optionally_get_with_async", Kind::Borrowed),
    ("get_with_by_ref_async", Kind::Borrowed),
    ("try_get_with_by_ref_async", Kind::Borrowed),
    ("optionally_get_with_by_ref_async", Kind::Borrowed),
    ("get_with_if_async", Kind::Borrowed),
    ("entry.or_insert_with_async", Kind::Borrowed),
    ("entry.or_insert_with_if_async", Kind::Borrowed),
    ("entry.or_optionally_insert_with_async", Kind::Borrowed),
    ("entry.or_try_insert_with_async", Kind::Borrowed),
    ("entry_by_ref.or_insert_with_async", Kind::Borrowed),
    ("entry_by_ref.or_try_insert_with_async", Kind::Borrowed),
    ("get_with_async_shared", Kind::Shared),
    ("try_get_with_async_shared", Kind::Shared),
    ("optionally_get_with_async_shared", Kind::Shared),
    ("load_async", Kind::Loader),
    ("entry.and_compute_with_async", Kind::Compute),
    ("entry.and_try_compute_with_async", Kind::Compute),
    ("entry.and_upsert_with_async", Kind::Compute),
    ("entry_by_ref.and_compute_with_async", Kind::Compute),
    ("entry_by_ref.and_upsert_with_async", Kind::Compute),
];

/// The value a computation's result shows.
fn comp_value(r: CompResult<u64, u64>) -> u64 {
    match r {
        CompResult::Inserted(e) | CompResult::ReplacedWith(e) => e.into_value(),
        other => panic!("a Put computation ended as {other:?}"),
    }
}

/// Verb `i` on `key`, its init yielding `k` times, then producing `val` (counted in `done`).
fn verb<'a>(
    i: usize,
    c: &'a Cache<u64, u64>,
    key: u64,
    k: u32,
    val: u64,
    done: &Arc<AtomicU64>,
) -> Fut<'a> {
    let d = Arc::clone(done);
    let init = async move {
        Yield(k).await;
        d.fetch_add(1, Ordering::SeqCst);
        val
    };
    match i {
        0 => Box::pin(c.get_with_async(key, init)),
        1 => Box::pin(async move {
            c.try_get_with_async(key, async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
        }),
        2 => Box::pin(async move {
            c.optionally_get_with_async(key, async { Some(init.await) })
                .await
                .unwrap()
        }),
        3 => Box::pin(async move { c.get_with_by_ref_async(&key, init).await }),
        4 => Box::pin(async move {
            c.try_get_with_by_ref_async(&key, async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
        }),
        5 => Box::pin(async move {
            c.optionally_get_with_by_ref_async(&key, async { Some(init.await) })
                .await
                .unwrap()
        }),
        6 => Box::pin(c.get_with_if_async(key, init, |_| false)),
        7 => Box::pin(async move { c.entry(key).or_insert_with_async(init).await.into_value() }),
        8 => Box::pin(async move {
            c.entry(key)
                .or_insert_with_if_async(init, |_| false)
                .await
                .into_value()
        }),
        9 => Box::pin(async move {
            c.entry(key)
                .or_optionally_insert_with_async(async { Some(init.await) })
                .await
                .unwrap()
                .into_value()
        }),
        10 => Box::pin(async move {
            c.entry(key)
                .or_try_insert_with_async(async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
                .into_value()
        }),
        11 => Box::pin(async move {
            c.entry_by_ref(&key)
                .or_insert_with_async(init)
                .await
                .into_value()
        }),
        12 => Box::pin(async move {
            c.entry_by_ref(&key)
                .or_try_insert_with_async(async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
                .into_value()
        }),
        13 => Box::pin(c.get_with_async_shared(key, init)),
        14 => Box::pin(async move {
            c.try_get_with_async_shared(key, async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
        }),
        15 => Box::pin(async move {
            c.optionally_get_with_async_shared(key, async { Some(init.await) })
                .await
                .unwrap()
        }),
        16 => Box::pin(async move {
            drop(init);
            c.load_async(key).await.unwrap()
        }),
        17 => Box::pin(async move {
            comp_value(
                c.entry(key)
                    .and_compute_with_async(|_| async { Op::Put(init.await) })
                    .await,
            )
        }),
        18 => Box::pin(async move {
            comp_value(
                c.entry(key)
                    .and_try_compute_with_async(|_| async { Ok::<_, String>(Op::Put(init.await)) })
                    .await
                    .unwrap(),
            )
        }),
        19 => Box::pin(async move {
            c.entry(key)
                .and_upsert_with_async(|_| init)
                .await
                .into_value()
        }),
        20 => Box::pin(async move {
            comp_value(
                c.entry_by_ref(&key)
                    .and_compute_with_async(|_| async { Op::Put(init.await) })
                    .await,
            )
        }),
        21 => Box::pin(async move {
            c.entry_by_ref(&key)
                .and_upsert_with_async(|_| init)
                .await
                .into_value()
        }),
        _ => unreachable!(),
    }
}

/// A cache for the sweep: a load limit of `limit`, statistics, and an async loader that yields
/// `k` times and returns 100 (counted in `done`).
fn sweep_cache(
    limit: usize,
    k: u32,
    done: &Arc<AtomicU64>,
    clock: Option<&ManualClock>,
) -> Cache<u64, u64> {
    let d = Arc::clone(done);
    let mut b = Cache::builder();
    if let Some(clock) = clock {
        b = b
            .clock(clock.clone())
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5));
    }
    b.max_capacity(1000)
        .max_concurrent_loads(limit)
        .record_stats()
        .async_loader(move |_k: &u64| {
            let d = Arc::clone(&d);
            async move {
                Yield(k).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(100)
            }
        })
        .build()
}

/// `limit` blocking loads of distinct keys that can only finish if all of them run at once:
/// a leaked permit makes them wait for each other forever.
fn all_permits_free(cache: &Cache<u64, u64>, limit: usize, what: &str) {
    let barrier = Arc::new(Barrier::new(limit));
    let handles: Vec<_> = (0..limit as u64)
        .map(|i| {
            let c = cache.clone();
            let b = Arc::clone(&barrier);
            common::start(move || {
                c.get_with(10_000 + i, || {
                    b.wait();
                    i
                })
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h
            .wait(SHORT)
            .unwrap_or_else(|| panic!("{what}: {limit} loads cannot run at once: a permit leaked"));
        assert_eq!(r.expect("no panic"), i as u64);
    }
    for i in 0..limit as u64 {
        cache.invalidate(&(10_000 + i));
    }
}

#[derive(Debug)]
struct CaseOutcome {
    leader: Option<u64>,
    joiner: u64,
    blocking: u64,
    stored: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Permits free; the async joiner is driven to the end after the leader is dropped.
    Free,
    /// The only permit is held by a blocking load of another key while the leader is polled
    /// (it waits for the permit) and dropped; then the permit is released.
    Contended,
    /// The async joiner is dropped right after the leader (after one poll): only the blocking
    /// caller is left.
    AllAsyncDropped,
    /// As `Free`, on an expired key with `fail_safe` (its last value 1).
    FailSafe,
    /// The async joiner is dropped after its first poll instead; the leader is then driven to
    /// the end.
    JoinerDropped,
}

/// One point of the sweep: verb `vi` as leader, polled `polls` times then dropped (unless it
/// completed), an async joiner (same verb, 200) and a blocking joiner (`get_with`, 300).
fn cancel_case(vi: usize, k: u32, polls: usize, mode: Mode) -> CaseOutcome {
    let (name, kind) = VERBS[vi];
    let what = format!("{name} k={k} polls={polls} {mode:?}");
    let done = Arc::new(AtomicU64::new(0));
    let limit = if mode == Mode::Contended { 1 } else { 2 };
    let clock = ManualClock::new();
    let fail_safe = mode == Mode::FailSafe;
    let cache = sweep_cache(limit, k, &done, fail_safe.then_some(&clock));
    let key = 1u64;
    if fail_safe {
        cache.insert(key, 1);
        clock.advance(Duration::from_secs(61));
    }
    let mut holder = None;
    if mode == Mode::Contended {
        let (in_tx, in_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let c = cache.clone();
        let h = common::start(move || {
            c.get_with(50, || {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                50
            })
        });
        in_rx.recv_timeout(SHORT).expect("the holder runs");
        holder = Some((h, go_tx));
    }
    let mut leader = verb(vi, &cache, key, k, 100, &done);
    let led = poll_n(&mut leader, polls);
    #[allow(unused_assignments)]
    let mut joiner = verb(vi, &cache, key, k, 200, &done);
    let j_first = poll_n(&mut joiner, 1);
    let c = cache.clone();
    let d = Arc::clone(&done);
    let blocking = common::start(move || {
        c.get_with(key, || {
            d.fetch_add(1, Ordering::SeqCst);
            300
        })
    });
    // Let the blocking caller reach the key (join the load) before the leader goes.
    std::thread::sleep(Duration::from_millis(5));
    let mut led = led;
    if mode == Mode::JoinerDropped {
        drop(joiner);
        let v = match led {
            Some(v) => v,
            None => drive(&mut leader, SHORT, &what),
        };
        led = Some(v);
        joiner = verb(vi, &cache, key, k, 200, &done);
        // A later caller (after the leader stored) gets the stored value.
        let _ = j_first;
    }
    let j_first = if mode == Mode::JoinerDropped {
        poll_n(&mut joiner, 1)
    } else {
        j_first
    };
    drop(leader);
    if let Some((h, go)) = holder.take() {
        go.send(()).unwrap();
        assert_eq!(
            h.wait(SHORT).expect("the holder ends").expect("no panic"),
            50
        );
        cache.invalidate(&50);
    }
    let joiner_v = match (j_first, mode) {
        (Some(v), _) => Some(v),
        (None, Mode::AllAsyncDropped) => None,
        (None, _) => Some(drive(&mut joiner, SHORT, &what)),
    };
    drop(joiner);
    let blocking_v = blocking
        .wait(SHORT)
        .unwrap_or_else(|| panic!("{what}: the blocking joiner hangs after the leader was dropped"))
        .unwrap_or_else(|_| panic!("{what}: the blocking joiner panicked"));
    assert_eq!(cache.loads_in_flight(), 0, "{what}: a load left in flight");
    cache.validate();
    let stored = cache.get(&key);
    if fail_safe {
        // Past the backoff, the last value is not served any more: the key loads (or holds a
        // value loaded during the case).
        clock.advance(Duration::from_secs(6));
        let c = cache.clone();
        let v = within(SHORT, move || c.get_with(key, || 7))
            .unwrap_or_else(|| panic!("{what}: the expired key is stuck"))
            .expect("no panic");
        assert!(
            [7, 100, 200, 300].contains(&v),
            "{what}: past the backoff the expired key's last value is served instead of a load: {v} \
             (joiner {joiner_v:?}, blocking {blocking_v})"
        );
        assert_eq!(cache.loads_in_flight(), 0, "{what}");
        cache.validate();
    }
    // The key is not stuck: a new load of it completes.
    cache.invalidate(&key);
    let c = cache.clone();
    let again = within(SHORT, move || c.get_with(key, || 7))
        .unwrap_or_else(|| panic!("{what}: the key is stuck"))
        .expect("no panic");
    assert_eq!(again, 7, "{what}");
    all_permits_free(&cache, limit, &what);
    assert_eq!(cache.loads_in_flight(), 0, "{what}");
    let s = cache.stats();
    assert_eq!(s.loads_in_flight, 0, "{what}: the gauge");
    if std::env::var("A33_TRACE").is_ok() {
        eprintln!(
            "{what}: hits {} misses {} ok {} failed {} coalesced {} neg {}",
            s.hits, s.misses, s.load_successes, s.load_failures, s.coalesced, s.negative_hits
        );
    }
    // Every init that ran to the end produced a value: each is a load that succeeded, and no
    // cancelled one is (`load_successes`: "Loads ... that produced a value"). The computations
    // are not loads.
    if kind != Kind::Compute && !fail_safe {
        let extra = 1 + limit as u64 + u64::from(mode == Mode::Contended);
        assert_eq!(
            s.load_successes,
            done.load(Ordering::SeqCst) + extra, // + `again`, the permit loads, the holder
            "{what}: load_successes against inits that produced a value: {s:?}"
        );
        assert_eq!(s.load_failures, 0, "{what}: {s:?}");
    }
    CaseOutcome {
        leader: led,
        joiner: joiner_v.unwrap_or(0),
        blocking: blocking_v,
        stored,
    }
}

fn cancel_sweep(vi: usize, mode: Mode) {
    let (name, kind) = VERBS[vi];
    for k in [0u32, 1, 3] {
        // With the joiner dropped, the leader must have started (polled at least once).
        let mut polls = usize::from(mode == Mode::JoinerDropped);
        loop {
            let what = format!("{name} k={k} polls={polls} {mode:?}");
            let o = cancel_case(vi, k, polls, mode);
            if std::env::var("A33_TRACE").is_ok() {
                eprintln!("{what}: {o:?}");
            }
            if mode == Mode::AllAsyncDropped {
                check_all_dropped(&what, kind, &o);
            } else if mode == Mode::JoinerDropped {
                assert_eq!(o.leader, Some(100), "{what}: {o:?}");
                if kind == Kind::Compute {
                    assert!([100, 200, 300].contains(&o.blocking), "{what}: {o:?}");
                } else {
                    assert_eq!(
                        (o.joiner, o.blocking, o.stored),
                        (100, 100, Some(100)),
                        "{what}: {o:?}"
                    );
                }
            } else if mode == Mode::FailSafe {
                // The last value (an abandoned load fails) or a value loaded in the case.
                for v in [o.joiner, o.blocking] {
                    assert!([1, 100, 200, 300].contains(&v), "{what}: {o:?}");
                }
            } else {
                check_joined(&what, kind, polls, &o);
            }
            // Under a held permit the leader never completes: sweep the wait's poll counts.
            if (o.leader.is_some() && mode != Mode::JoinerDropped)
                || (mode == Mode::JoinerDropped && polls > k as usize + 2)
                || (mode == Mode::Contended && polls > k as usize + 3)
            {
                break;
            }
            polls += 1;
            assert!(polls < 50, "{what}: never completes");
        }
    }
}

fn check_joined(what: &str, kind: Kind, polls: usize, o: &CaseOutcome) {
    match (o.leader, kind) {
        (Some(v), _) => {
            assert_eq!(v, 100, "{what}: the leader's own value");
            if kind != Kind::Compute {
                assert_eq!(
                    (o.joiner, o.blocking),
                    (100, 100),
                    "{what}: after the leader stored 100: {o:?}"
                );
            }
        }
        // Never polled: the joiner leads.
        (None, _) if polls == 0 => {
            if kind == Kind::Loader {
                assert_eq!((o.joiner, o.blocking), (100, 100), "{what}: {o:?}");
            } else if kind == Kind::Compute {
                assert_eq!(o.joiner, 200, "{what}: {o:?}");
                assert!([200, 300].contains(&o.blocking), "{what}: {o:?}");
            } else {
                assert_eq!((o.joiner, o.blocking), (200, 200), "{what}: {o:?}");
            }
        }
        // Dropped mid-load: a borrowed load is cancelled (a waiter loads with its own init); a
        // shared one is finished by the async waiter.
        (None, Kind::Borrowed) => {
            assert!(
                o.joiner == o.blocking && [200, 300].contains(&o.joiner),
                "{what}: a cancelled borrowed load: the waiters share one new load: {o:?}"
            );
        }
        (None, Kind::Shared) | (None, Kind::Loader) => {
            assert_eq!(
                (o.joiner, o.blocking),
                (100, 100),
                "{what}: a shared load whose leader was dropped is finished by its async waiter: {o:?}"
            );
        }
        (None, Kind::Compute) => {
            assert_eq!(o.joiner, 200, "{what}: {o:?}");
            assert!([200, 300].contains(&o.blocking), "{what}: {o:?}");
        }
    }
    if kind != Kind::Compute {
        assert_eq!(o.stored, Some(o.joiner), "{what}: the stored value: {o:?}");
    }
}

/// Leader and async joiner dropped: the blocking caller loads itself (300), unless an async
/// caller completed first.
fn check_all_dropped(what: &str, kind: Kind, o: &CaseOutcome) {
    let expect = match (o.leader, o.joiner) {
        (Some(v), _) => {
            assert_eq!(v, 100, "{what}");
            100
        }
        (None, 0) => 300,
        (None, j) => j,
    };
    if kind == Kind::Compute {
        assert!([100, 200, 300].contains(&o.blocking), "{what}: {o:?}");
    } else {
        assert_eq!(o.blocking, expect, "{what}: {o:?}");
        assert_eq!(o.stored, Some(expect), "{what}: {o:?}");
    }
}

macro_rules! cancel_sweeps {
    ($($i:literal => $name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let _w = watchdog(LIMIT, stringify!($name));
                for mode in [Mode::Free, Mode::Contended, Mode::AllAsyncDropped, Mode::FailSafe, Mode::JoinerDropped] {
                    cancel_sweep($i, mode);
                }
            }
        )*
    };
}

cancel_sweeps! {
    0 => cancel_sweep_get_with_async,
    1 => cancel_sweep_try_get_with_async,
    2 => cancel_sweep_optionally_get_with_async,
    3 => cancel_sweep_get_with_by_ref_async,
    4 => cancel_sweep_try_get_with_by_ref_async,
    5 => cancel_sweep_optionally_get_with_by_ref_async,
    6 => cancel_sweep_get_with_if_async,
    7 => cancel_sweep_entry_or_insert_with_async,
    8 => cancel_sweep_entry_or_insert_with_if_async,
    9 => cancel_sweep_entry_or_optionally_insert_with_async,
    10 => cancel_sweep_entry_or_try_insert_with_async,
    11 => cancel_sweep_entry_by_ref_or_insert_with_async,
    12 => cancel_sweep_entry_by_ref_or_try_insert_with_async,
    13 => cancel_sweep_get_with_async_shared,
    14 => cancel_sweep_try_get_with_async_shared,
    15 => cancel_sweep_optionally_get_with_async_shared,
    16 => cancel_sweep_load_async,
    17 => cancel_sweep_entry_and_compute_with_async,
    18 => cancel_sweep_entry_and_try_compute_with_async,
    19 => cancel_sweep_entry_and_upsert_with_async,
    20 => cancel_sweep_entry_by_ref_and_compute_with_async,
    21 => cancel_sweep_entry_by_ref_and_upsert_with_async,
}

// =============================================================================================
// 2. A panic at the i-th user-code call, for every i
// =============================================================================================

/// Counts every user-code call of one test's cache and panics at the `at`-th while armed.
#[derive(Default)]
struct Faults {
    calls: AtomicU64,
    at: AtomicU64,
    armed: AtomicBool,
    hit: Mutex<Option<String>>,
    /// Count (and fail) only this site's calls.
    only: Mutex<Option<&'static str>>,
}

/// The sweeps run once counting every call, then once per site counting only its calls (so
/// every site's every call is hit, whatever the threads' interleaving).
const FILTERS: &[Option<&str>] = &[
    None,
    Some("init"),
    Some("loader"),
    Some("async loader"),
    Some("spawner"),
    Some("future spawner"),
    Some("load_missing"),
    Some("weigher"),
    Some("expire_after_create"),
    Some("expire_after_read"),
    Some("expire_after_update"),
    Some("listener"),
    Some("value Clone"),
    Some("key Clone"),
    Some("key Hash"),
    Some("key Eq"),
];

impl Faults {
    fn tick(&self, site: &'static str) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        if matches!(*self.only.lock().unwrap_or_else(|e| e.into_inner()), Some(o) if o != site) {
            return;
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if std::env::var("A33_TRACE").is_ok() {
            eprintln!("  call {n}: {site} on {:?}", std::thread::current().name());
        }
        if n == self.at.load(Ordering::SeqCst) {
            *self.hit.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("{site} (call {n})"));
            panic!("injected panic at {site}, call {n}");
        }
    }
    fn arm(&self, at: u64, only: Option<&'static str>) {
        *self.only.lock().unwrap_or_else(|e| e.into_inner()) = only;
        self.calls.store(0, Ordering::SeqCst);
        self.at.store(at, Ordering::SeqCst);
        *self.hit.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.armed.store(true, Ordering::SeqCst);
    }
    /// Disarms; the site hit, if any.
    fn disarm(&self) -> Option<String> {
        self.armed.store(false, Ordering::SeqCst);
        self.hit.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

struct FKey {
    id: u64,
    f: Arc<Faults>,
}
impl Clone for FKey {
    fn clone(&self) -> Self {
        self.f.tick("key Clone");
        FKey {
            id: self.id,
            f: Arc::clone(&self.f),
        }
    }
}
impl Hash for FKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.f.tick("key Hash");
        self.id.hash(h);
    }
}
impl PartialEq for FKey {
    fn eq(&self, o: &Self) -> bool {
        self.f.tick("key Eq");
        self.id == o.id
    }
}
impl Eq for FKey {}

struct FVal {
    v: u64,
    f: Arc<Faults>,
}
impl Clone for FVal {
    fn clone(&self) -> Self {
        self.f.tick("value Clone");
        FVal {
            v: self.v,
            f: Arc::clone(&self.f),
        }
    }
}

struct FExpiry(Arc<Faults>);
impl Expiry<FKey, FVal> for FExpiry {
    fn expire_after_create(&self, _k: &FKey, _v: &FVal) -> Option<Duration> {
        self.0.tick("expire_after_create");
        Some(Duration::from_secs(3600))
    }
    fn expire_after_read(
        &self,
        _k: &FKey,
        _v: &FVal,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        self.0.tick("expire_after_read");
        remaining
    }
    fn expire_after_update(
        &self,
        _k: &FKey,
        _v: &FVal,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        self.0.tick("expire_after_update");
        Some(Duration::from_secs(3600))
    }
}

type FCache = Cache<FKey, FVal>;

/// A cache whose every user-code hook ticks `f`: capacity 3 (so loads evict), a weigher, an
/// `Expiry`, a listener, a load limit of 1, an async loader; `removed` counts notifications.
fn fault_cache(f: &Arc<Faults>, removed: &Arc<AtomicU64>) -> FCache {
    let (fw, fl, fa) = (Arc::clone(f), Arc::clone(f), Arc::clone(f));
    let r = Arc::clone(removed);
    Cache::builder()
        .max_capacity(3)
        .shards(1)
        .weigher(move |_k: &FKey, _v: &FVal| {
            fw.tick("weigher");
            1
        })
        .expire_after(FExpiry(Arc::clone(f)))
        .eviction_listener(move |_k: &FKey, _v: &FVal, _c: RemovalCause| {
            r.fetch_add(1, Ordering::SeqCst);
            fl.tick("listener");
        })
        .max_concurrent_loads(1)
        .async_loader(move |k: &FKey| {
            let fa = Arc::clone(&fa);
            let id = k.id;
            async move {
                Yield(1).await;
                fa.tick("async loader");
                Ok::<_, BoxError>(FVal {
                    v: id + 1000,
                    f: fa,
                })
            }
        })
        .build()
}

fn fk(f: &Arc<Faults>, id: u64) -> FKey {
    FKey {
        id,
        f: Arc::clone(f),
    }
}
fn fv(f: &Arc<Faults>, v: u64) -> FVal {
    FVal {
        v,
        f: Arc::clone(f),
    }
}

/// The invariants after a faulty run (disarmed): nothing in flight, `validate()`, the key and
/// a permit usable, counts agreeing with `iter()`.
fn fault_invariants(cache: &FCache, f: &Arc<Faults>, what: &str) {
    assert!(
        common::eventually(|| cache.loads_in_flight() == 0),
        "{what}: a load left in flight"
    );
    cache.validate();
    let c = cache.clone();
    let f2 = Arc::clone(f);
    let v = within(SHORT, move || c.get_with(fk(&f2, 1), || fv(&f2, 7)).v)
        .unwrap_or_else(|| panic!("{what}: key 1 is stuck (or a permit leaked)"))
        .unwrap_or_else(|_| panic!("{what}: get_with panicked disarmed"));
    assert!(
        [7, 100, 200, 300, 1001].contains(&v),
        "{what}: key 1 holds {v}"
    );
    let c = cache.clone();
    let f2 = Arc::clone(f);
    within(SHORT, move || c.get_with(fk(&f2, 77), || fv(&f2, 77)).v)
        .unwrap_or_else(|| panic!("{what}: a new key cannot load: a permit leaked"))
        .unwrap_or_else(|_| panic!("{what}: get_with panicked disarmed"));
    cache.run_pending_tasks();
    cache.validate();
    let n = cache.iter().count() as u64;
    assert_eq!(cache.entry_count(), n, "{what}: entry_count against iter()");
    assert_eq!(
        cache.weighted_size(),
        n,
        "{what}: weighted_size against iter() (weight 1 each)"
    );
    assert!(n <= 3, "{what}: {n} entries in a cache of 3");
}

/// Runs `scenario` with a panic injected at call 1, 2, ... until a run makes fewer calls.
fn sweep_faults(name: &str, scenario: impl Fn(&FCache, &Arc<Faults>)) {
    quiet_injected_panics();
    let mut sites = std::collections::BTreeMap::new();
    'filters: for &only in FILTERS {
        for at in 1..2000u64 {
            let f = Arc::new(Faults::default());
            let removed = Arc::new(AtomicU64::new(0));
            let cache = fault_cache(&f, &removed);
            for id in 10..13 {
                cache.insert(fk(&f, id), fv(&f, id));
            }
            f.arm(at, only);
            scenario(&cache, &f);
            let hit = f.disarm();
            let what = format!("{name}: panic at call {at} of {only:?} ({hit:?})");
            fault_invariants(&cache, &f, &what);
            match hit {
                Some(site) => {
                    *sites
                        .entry(site.split(" (").next().unwrap_or("").to_string())
                        .or_insert(0) += 1;
                }
                None => {
                    assert!(
                        only.is_some() || at > 5,
                        "{name}: too few user calls to sweep"
                    );
                    continue 'filters;
                }
            }
        }
        panic!("{name}: the scenario never ran out of user calls");
    }
    eprintln!("{name}: faults injected per site: {sites:?}");
}

/// A blocking leader with two blocking joiners on key 1 (its init slow enough for them to
/// join), and a write of another key.
#[test]
fn fault_sweep_blocking_loads_with_joiners() {
    let _w = watchdog(LIMIT * 2, "fault_sweep_blocking_loads_with_joiners");
    sweep_faults("blocking", |cache, f| {
        let mut hs = Vec::new();
        for (who, val) in [(0u64, 100u64), (1, 200), (2, 300)] {
            let c = cache.clone();
            let f = Arc::clone(f);
            hs.push(common::start(move || {
                let init = || {
                    f.tick("init");
                    std::thread::sleep(Duration::from_millis(3));
                    fv(&f, val)
                };
                match who {
                    0 => c.get_with(fk(&f, 1), init).v,
                    1 => c
                        .try_get_with(fk(&f, 1), || Ok::<_, ()>(init()))
                        .map(|v| v.v)
                        .unwrap_or(0),
                    _ => c.entry(fk(&f, 1)).or_insert_with(init).into_value().v,
                }
            }));
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = catch_unwind(AssertUnwindSafe(|| cache.insert(fk(f, 2), fv(f, 2))));
        let _ = catch_unwind(AssertUnwindSafe(|| cache.get(&fk(f, 10)).map(|v| v.v)));
        for h in hs {
            let _ = h.wait(SHORT).expect("a blocking caller hangs");
        }
    });
}

/// Async callers polled round-robin on one thread (deterministic): a borrowed leader, a shared
/// joiner, a `load_async` joiner and an async computation; a panicking poll drops its future.
#[test]
fn fault_sweep_async_loads_with_joiners() {
    let _w = watchdog(LIMIT * 2, "fault_sweep_async_loads_with_joiners");
    sweep_faults("async", |cache, f| {
        let mk_init = |val: u64| {
            let f = Arc::clone(f);
            async move {
                Yield(2).await;
                f.tick("init");
                fv(&f, val)
            }
        };
        let mut futs: Vec<Option<Fut<'_>>> = vec![
            Some(Box::pin({
                let init = mk_init(100);
                let key = fk(f, 1);
                async move { cache.get_with_async(key, init).await.v }
            })),
            Some(Box::pin({
                let init = mk_init(200);
                let key = fk(f, 1);
                async move { cache.get_with_async_shared(key, init).await.v }
            })),
            Some(Box::pin({
                let key = fk(f, 1);
                async move { cache.load_async(key).await.map(|v| v.v).unwrap_or(0) }
            })),
            Some(Box::pin({
                let init = mk_init(300);
                let key = fk(f, 2);
                async move {
                    cache
                        .entry(key)
                        .and_upsert_with_async(|_| init)
                        .await
                        .into_value()
                        .v
                }
            })),
            // A replacement of a present key (expire_after_update) and a lone load_async (the
            // async loader).
            Some(Box::pin({
                let init = mk_init(400);
                let key = fk(f, 11);
                async move { cache.get_with_if_async(key, init, |_| true).await.v }
            })),
            Some(Box::pin({
                let key = fk(f, 3);
                async move { cache.load_async(key).await.map(|v| v.v).unwrap_or(0) }
            })),
            Some(Box::pin({
                let key = fk(f, 12);
                let f = Arc::clone(f);
                async move {
                    let r = cache
                        .entry(key)
                        .and_compute_with_async(|e| async move {
                            Yield(1).await;
                            Op::Put(fv(&f, e.map_or(0, |e| e.value().v) + 1))
                        })
                        .await;
                    u64::from(matches!(r, CompResult::ReplacedWith(_)))
                }
            })),
        ];
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let until = Instant::now() + SHORT;
        while futs.iter().any(Option::is_some) {
            assert!(
                Instant::now() < until,
                "async callers still pending: a hang"
            );
            for slot in futs.iter_mut() {
                if let Some(fut) = slot {
                    match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
                        Ok(Poll::Pending) => {}
                        Ok(Poll::Ready(_)) | Err(_) => *slot = None,
                    }
                }
            }
        }
    });
}

/// The same in a blocking leader joined by async callers on another thread.
#[test]
fn fault_sweep_mixed_blocking_leader_async_joiners() {
    let _w = watchdog(LIMIT * 2, "fault_sweep_mixed_blocking_leader_async_joiners");
    sweep_faults("mixed", |cache, f| {
        let c = cache.clone();
        let f1 = Arc::clone(f);
        let leader = common::start(move || {
            c.get_with(fk(&f1, 1), || {
                f1.tick("init");
                std::thread::sleep(Duration::from_millis(3));
                fv(&f1, 100)
            })
            .v
        });
        std::thread::sleep(Duration::from_millis(1));
        let c = cache.clone();
        let f2 = Arc::clone(f);
        let joiners = common::start(move || {
            let a = catch_unwind(AssertUnwindSafe(|| {
                futures::executor::block_on(c.get_with_async(fk(&f2, 1), async {
                    f2.tick("init");
                    fv(&f2, 200)
                }))
                .v
            }));
            let b = catch_unwind(AssertUnwindSafe(|| {
                futures::executor::block_on(c.load_async(fk(&f2, 1))).map(|v| v.v)
            }));
            (a.is_ok(), b.is_ok())
        });
        let _ = catch_unwind(AssertUnwindSafe(|| cache.insert(fk(f, 10), fv(f, 10))));
        let _ = leader.wait(SHORT).expect("the blocking leader hangs");
        let _ = joiners.wait(SHORT).expect("the async joiners hang");
    });
}

type JobList = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpawnMode {
    /// Runs the job at once on the reader's thread.
    Inline,
    /// Runs the job on a new thread.
    Thread,
    /// Keeps the job; the test runs it after the read returned.
    Later,
    /// Async refreshes (`async_loader` + `future_spawner`); the test polls them afterwards.
    Futures,
}

/// Refresh-ahead with a spawner, faults at every call (the spawner's too): the key is never
/// left refreshing, nothing stays in flight, and once the backoff has passed a read refreshes
/// the key again.
fn refresh_fault_sweep(mode: SpawnMode) {
    quiet_injected_panics();
    let mut sites = std::collections::BTreeMap::new();
    let mut stuck = Vec::new();
    let mut filters = FILTERS.iter();
    let mut only = *filters.next().unwrap();
    let mut at = 0u64;
    loop {
        at += 1;
        let what = format!("{mode:?}: panic at call {at} of {only:?}");
        let f = Arc::new(Faults::default());
        let clock = ManualClock::new();
        let gen = Arc::new(AtomicU64::new(0));
        let jobs: JobList = Arc::default();
        let futs: Arc<Mutex<Vec<BoxFuture<()>>>> = Arc::default();
        let threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
        let (fl, fs, g) = (Arc::clone(&f), Arc::clone(&f), Arc::clone(&gen));
        let (j, t) = (Arc::clone(&jobs), Arc::clone(&threads));
        let mut b = Cache::builder();
        if mode == SpawnMode::Futures {
            let (fa, fsp, g2, fu) = (
                Arc::clone(&f),
                Arc::clone(&f),
                Arc::clone(&gen),
                Arc::clone(&futs),
            );
            b = b
                .async_loader(move |k: &FKey| {
                    let (fa, g2, id) = (Arc::clone(&fa), Arc::clone(&g2), k.id);
                    async move {
                        Yield(1).await;
                        fa.tick("async loader");
                        Ok::<_, BoxError>(fv(
                            &fa,
                            id * 1000 + g2.fetch_add(1, Ordering::SeqCst) + 1,
                        ))
                    }
                })
                .future_spawner(move |fut| {
                    fsp.tick("future spawner");
                    fu.lock().unwrap().push(fut);
                });
        }
        let cache: FCache = b
            .max_capacity(3)
            .shards(1)
            .weigher({
                let f = Arc::clone(&f);
                move |_k: &FKey, _v: &FVal| {
                    f.tick("weigher");
                    1
                }
            })
            .expire_after(FExpiry(Arc::clone(&f)))
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .refresh_backoff(Duration::from_secs(1))
            .max_concurrent_loads(1)
            .clock(clock.clone())
            .loader(move |k: &FKey| {
                fl.tick("loader");
                Ok::<_, BoxError>(fv(&fl, k.id * 1000 + g.fetch_add(1, Ordering::SeqCst) + 1))
            })
            .spawner(move |job| {
                fs.tick("spawner");
                match mode {
                    SpawnMode::Inline => job(),
                    SpawnMode::Thread => t.lock().unwrap().push(std::thread::spawn(job)),
                    SpawnMode::Later | SpawnMode::Futures => j.lock().unwrap().push(job),
                }
            })
            .build();
        cache.insert(fk(&f, 1), fv(&f, 1));
        cache.insert(fk(&f, 2), fv(&f, 2));
        clock.advance(Duration::from_secs(11));
        f.arm(at, only);
        let trace = std::env::var("A33_TRACE").is_ok();
        let r = catch_unwind(AssertUnwindSafe(|| cache.get(&fk(&f, 1)).map(|v| v.v)));
        if trace {
            eprintln!("get 1: {:?}", r.as_ref().ok());
        }
        let r = catch_unwind(AssertUnwindSafe(|| cache.load(fk(&f, 2)).map(|v| v.v)));
        if trace {
            eprintln!("load 2: {:?}", r.as_ref().ok());
        }
        let r = catch_unwind(AssertUnwindSafe(|| cache.get(&fk(&f, 1)).map(|v| v.v)));
        if trace {
            eprintln!("get 1: {:?}", r.as_ref().ok());
        }
        let later: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
        for job in later {
            let _ = catch_unwind(AssertUnwindSafe(job));
        }
        let later: Vec<_> = std::mem::take(&mut *futs.lock().unwrap());
        for mut fut in later {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                drive(&mut fut, SHORT, "a refresh future")
            }));
        }
        for h in std::mem::take(&mut *threads.lock().unwrap()) {
            let _ = h.join();
        }
        let hit = f.disarm();
        let what = format!("{what} ({hit:?})");
        assert!(
            common::eventually(|| cache.loads_in_flight() == 0),
            "{what}: a load left in flight"
        );
        cache.validate();
        // Past the backoff, a read refreshes each key (the value changes to a loaded one).
        clock.advance(Duration::from_secs(2));
        for id in [1u64, 2] {
            let c = cache.clone();
            let f2 = Arc::clone(&f);
            within(SHORT, move || c.get(&fk(&f2, id)).map(|v| v.v))
                .unwrap_or_else(|| panic!("{what}: a read of key {id} hangs"))
                .expect("no panic disarmed");
            for job in std::mem::take(&mut *jobs.lock().unwrap()) {
                job();
            }
            for mut fut in std::mem::take(&mut *futs.lock().unwrap()) {
                drive(&mut fut, SHORT, "a refresh future");
            }
            for h in std::mem::take(&mut *threads.lock().unwrap()) {
                h.join().unwrap();
            }
            let v = cache.get(&fk(&f, id)).map(|v| v.v);
            if !matches!(v, Some(x) if x > id * 1000) {
                stuck.push(format!(
                    "{what}: key {id} not refreshed after the backoff: {v:?}"
                ));
            }
        }
        assert_eq!(cache.loads_in_flight(), 0, "{what}");
        cache.run_pending_tasks();
        cache.validate();
        let n = cache.iter().count() as u64;
        assert_eq!(cache.entry_count(), n, "{what}: entry_count against iter()");
        assert_eq!(
            cache.weighted_size(),
            n,
            "{what}: weighted_size against iter()"
        );
        match hit {
            Some(site) => {
                *sites
                    .entry(site.split(" (").next().unwrap_or("").to_string())
                    .or_insert(0) += 1;
                assert!(at < 2000, "never ran out of user calls");
            }
            None => match filters.next() {
                Some(&o) => {
                    only = o;
                    at = 0;
                }
                None => {
                    eprintln!("refresh {mode:?}: faults injected per site: {sites:?}");
                    assert!(
                        stuck.is_empty(),
                        "refresh-ahead stopped for a key:\n{}",
                        stuck.join("\n")
                    );
                    return;
                }
            },
        }
    }
}

#[test]
fn fault_sweep_refresh_with_inline_spawner() {
    let _w = watchdog(LIMIT, "fault_sweep_refresh_with_inline_spawner");
    refresh_fault_sweep(SpawnMode::Inline);
}

#[test]
fn fault_sweep_refresh_with_thread_spawner() {
    let _w = watchdog(LIMIT, "fault_sweep_refresh_with_thread_spawner");
    refresh_fault_sweep(SpawnMode::Thread);
}

#[test]
fn fault_sweep_async_refresh_with_future_spawner() {
    let _w = watchdog(LIMIT, "fault_sweep_async_refresh_with_future_spawner");
    refresh_fault_sweep(SpawnMode::Futures);
}

#[test]
fn fault_sweep_refresh_with_deferred_spawner() {
    let _w = watchdog(LIMIT, "fault_sweep_refresh_with_deferred_spawner");
    refresh_fault_sweep(SpawnMode::Later);
}

// A key whose `Eq` panics while its flag is set.
static EQ_ARMED: AtomicBool = AtomicBool::new(false);
#[derive(Clone, Debug)]
struct EqKey(u64);
impl Hash for EqKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}
impl PartialEq for EqKey {
    fn eq(&self, o: &Self) -> bool {
        if EQ_ARMED.load(Ordering::SeqCst) {
            panic!("injected Eq panic");
        }
        self.0 == o.0
    }
}
impl Eq for EqKey {}

/// Minimal form of the refresh sweep's failure: the key's `Eq` panics while a refresh
/// publishes its value (armed inside the loader, so the read before it is unaffected).
fn refresh_publish_eq_panic(spawner: bool) -> Vec<(u64, u64)> {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let gen = Arc::new(AtomicU64::new(1));
    let g = Arc::clone(&gen);
    let mut b = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .time_to_live(Duration::from_secs(100))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(1))
        .clock(clock.clone())
        .loader(move |_k: &EqKey| {
            let v = g.fetch_add(1, Ordering::SeqCst) + 1;
            if v == 2 {
                EQ_ARMED.store(true, Ordering::SeqCst); // the publish of this value meets it
            }
            Ok::<_, BoxError>(v)
        });
    if spawner {
        b = b.spawner(|job| job());
    }
    let cache: Cache<EqKey, u64> = b.build();
    cache.insert(EqKey(1), 1);
    clock.advance(Duration::from_secs(11));
    let r = catch_unwind(AssertUnwindSafe(|| cache.get(&EqKey(1))));
    EQ_ARMED.store(false, Ordering::SeqCst);
    eprintln!(
        "read that refreshed: {:?}",
        r.as_ref().map_err(|_| "panicked")
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    // Read every second until the time to live: a refresh is due at once (after the backoff).
    let mut seen = Vec::new();
    for t in 12..100u64 {
        clock.advance(Duration::from_secs(1));
        seen.push((t, cache.get(&EqKey(1)).unwrap_or(0)));
    }
    // Does a write of the key end it? (Printed, for the report.)
    cache.insert(EqKey(1), 50);
    clock.advance(Duration::from_secs(11));
    let _ = cache.get(&EqKey(1));
    eprintln!(
        "after a write and 11 s more: value {:?}, loader calls {}",
        cache.get(&EqKey(1)),
        gen.load(Ordering::SeqCst) - 1
    );
    eprintln!(
        "loader calls: {}, values read from t=12 to t=99: {:?}, stats: {:?}",
        gen.load(Ordering::SeqCst) - 1,
        seen.iter()
            .map(|x| x.1)
            .collect::<std::collections::BTreeSet<_>>(),
        cache.stats()
    );
    seen
}

static EQ_LOCK: Mutex<()> = Mutex::new(());

#[test]
fn refresh_whose_publish_panics_in_key_eq_is_retried_after_the_backoff_with_spawner() {
    let _l = EQ_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(LIMIT, "refresh_publish_eq_panic spawner");
    let seen = refresh_publish_eq_panic(true);
    // The key's `Eq` panicked on every call while the refresh stored (and so while its claim
    // would be given back): the first read after it (t = 12) finds the claim orphaned and
    // gives it back, due after the backoff (t = 13); that read starts the refresh, whose value
    // the next read sees.
    let first = seen.iter().find(|(_, v)| *v > 2);
    assert!(
        matches!(first, Some((t, _)) if *t <= 14),
        "no refresh after the failed one (backoff 1 s) before t=14 s; reads (t, value): {:?}",
        &seen[..seen.len().min(20)]
    );
}

#[test]
fn refresh_whose_publish_panics_in_key_eq_is_retried_after_the_backoff_inline() {
    let _l = EQ_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(LIMIT, "refresh_publish_eq_panic inline");
    let seen = refresh_publish_eq_panic(false);
    // The key's `Eq` panicked on every call while the refresh stored (and so while its claim
    // would be given back): the first read after it (t = 12) finds the claim orphaned and
    // gives it back, due after the backoff (t = 13); that read starts the refresh, whose value
    // the next read sees.
    let first = seen.iter().find(|(_, v)| *v > 2);
    assert!(
        matches!(first, Some((t, _)) if *t <= 14),
        "no refresh after the failed one (backoff 1 s) before t=14 s; reads (t, value): {:?}",
        &seen[..seen.len().min(20)]
    );
}

// =============================================================================================
// 3. Refresh jobs dropped, delayed, run late: a versioned history of writes
// =============================================================================================

const WRITTEN: u64 = 1_000_000;
const LOADED: u64 = 2_000_000;

/// What the loader saw: for each loaded value, the write epoch its refresh or load was started
/// in (the test sets `ctx` to it before anything that may call the loader).
#[derive(Default)]
struct History {
    ctx: AtomicU64,
    actx: AtomicU64,
    seq: AtomicU64,
    loaded: Mutex<std::collections::HashMap<u64, u64>>,
}

impl History {
    fn load(&self, asynchronous: bool) -> u64 {
        let v = LOADED + self.seq.fetch_add(1, Ordering::SeqCst);
        let ctx = if asynchronous { &self.actx } else { &self.ctx };
        self.loaded
            .lock()
            .unwrap()
            .insert(v, ctx.load(Ordering::SeqCst));
        v
    }
}

/// The value of key 1 must be the latest write, or a value loaded by a load or refresh started
/// since the latest write or invalidation ("a write or invalidation of the key while it loads
/// wins").
fn check_history(
    cache: &Cache<u64, u64>,
    h: &History,
    epoch: u64,
    last_write: Option<u64>,
    what: &str,
) {
    let v = cache.iter().find(|(k, _)| *k == 1).map(|(_, v)| v);
    match v {
        None => {}
        Some(v) if v >= LOADED => {
            let started = h.loaded.lock().unwrap()[&v];
            assert_eq!(
                started, epoch,
                "{what}: value {v} loaded by a load started in epoch {started} overwrote a newer \
                 write or invalidation (epoch {epoch}, latest write {last_write:?})"
            );
        }
        Some(v) => assert_eq!(Some(v), last_write, "{what}: a stale written value"),
    }
}

type Jobs = Arc<Mutex<Vec<(u64, Box<dyn FnOnce() + Send>)>>>;
type Futs = Arc<Mutex<Vec<(u64, BoxFuture<()>)>>>;

/// Waits for a blocking call, polling the queued refresh futures meanwhile (a runtime would:
/// the call may wait for a permit or a load one of them holds).
fn wait_polling<T: Send + 'static>(
    call: common::Started<T>,
    futs: &Futs,
    h: &History,
    what: &str,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call.wait(SHORT));
    });
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let until = Instant::now() + SHORT;
    loop {
        if let Ok(r) = rx.try_recv() {
            return r
                .unwrap_or_else(|| panic!("{what}: a blocking call hangs"))
                .unwrap_or_else(|_| panic!("{what}: a blocking call panicked"));
        }
        assert!(Instant::now() < until, "{what}: a blocking call hangs");
        let mut fs = futs.lock().unwrap();
        let mut keep = Vec::new();
        for (e, mut f) in fs.drain(..) {
            h.actx.store(e, Ordering::SeqCst);
            if f.as_mut().poll(&mut cx).is_pending() {
                keep.push((e, f));
            }
        }
        *fs = keep;
        drop(fs);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Refresh jobs or futures run (or polled) after a write or invalidation newer than their start.
static LATE_RUNS: AtomicU64 = AtomicU64::new(0);

fn history_run(seed: u64, asynchronous: bool) {
    let what0 = format!("seed {seed} async={asynchronous}");
    let clock = ManualClock::new();
    let h = Arc::new(History::default());
    let epoch = Arc::new(AtomicU64::new(0));
    let jobs: Jobs = Arc::default();
    let futs: Futs = Arc::default();
    let mut b = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .time_to_live(Duration::from_secs(300))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(1))
        .max_concurrent_loads(1)
        .clock(clock.clone());
    let (h1, h2) = (Arc::clone(&h), Arc::clone(&h));
    b = b.loader(move |_k: &u64| Ok::<_, BoxError>(h1.load(false)));
    if asynchronous {
        let (e, fs) = (Arc::clone(&epoch), Arc::clone(&futs));
        b = b
            .async_loader(move |_k: &u64| {
                let h = Arc::clone(&h2);
                async move {
                    Yield(1).await;
                    Ok::<_, BoxError>(h.load(true))
                }
            })
            .future_spawner(move |f| fs.lock().unwrap().push((e.load(Ordering::SeqCst), f)));
    } else {
        let (e, js) = (Arc::clone(&epoch), Arc::clone(&jobs));
        b = b.spawner(move |job| js.lock().unwrap().push((e.load(Ordering::SeqCst), job)));
    }
    let cache: Cache<u64, u64> = b.build();
    let mut r = common::Rng(seed * 2 + 1);
    let mut last_write: Option<u64> = None;
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for step in 0..300u64 {
        let op = r.next() % 10;
        let what = format!("{what0} step {step} op {op}");
        let cur = epoch.load(Ordering::SeqCst);
        match op {
            0 => {
                epoch.fetch_add(1, Ordering::SeqCst);
                let v = WRITTEN + step;
                cache.insert(1, v);
                last_write = Some(v);
            }
            1 => {
                epoch.fetch_add(1, Ordering::SeqCst);
                cache.invalidate(&1);
                last_write = None;
            }
            2 => clock.advance(Duration::from_secs(r.next() % 12 + 1)),
            3 | 4 => {
                h.ctx.store(cur, Ordering::SeqCst);
                let _ = cache.get(&1);
            }
            5 => {
                h.ctx.store(cur, Ordering::SeqCst);
                let c = cache.clone();
                wait_polling(common::start(move || c.load(1)), &futs, &h, &what).expect("loads");
            }
            // Run (or poll once) a queued refresh, late.
            6 | 7 => {
                if asynchronous {
                    let mut fs = futs.lock().unwrap();
                    if !fs.is_empty() {
                        let i = (r.next() % fs.len() as u64) as usize;
                        let (e, mut f) = fs.remove(i);
                        drop(fs);
                        h.actx.store(e, Ordering::SeqCst);
                        if e < cur {
                            LATE_RUNS.fetch_add(1, Ordering::SeqCst);
                        }
                        if f.as_mut().poll(&mut cx).is_pending() {
                            futs.lock().unwrap().push((e, f));
                        }
                    }
                } else {
                    let mut js = jobs.lock().unwrap();
                    if !js.is_empty() {
                        let i = (r.next() % js.len() as u64) as usize;
                        let (e, job) = js.remove(i);
                        drop(js);
                        h.ctx.store(e, Ordering::SeqCst);
                        if e < cur {
                            LATE_RUNS.fetch_add(1, Ordering::SeqCst);
                        }
                        within(SHORT, job)
                            .unwrap_or_else(|| panic!("{what}: a refresh job hangs"))
                            .unwrap_or_else(|_| panic!("{what}: a refresh job panicked"));
                    }
                }
            }
            // Drop a queued refresh unrun (or half-polled).
            8 => {
                if asynchronous {
                    let mut fs = futs.lock().unwrap();
                    if !fs.is_empty() {
                        let i = (r.next() % fs.len() as u64) as usize;
                        drop(fs.remove(i));
                    }
                } else {
                    let mut js = jobs.lock().unwrap();
                    if !js.is_empty() {
                        let i = (r.next() % js.len() as u64) as usize;
                        drop(js.remove(i));
                    }
                }
            }
            _ => {
                h.ctx.store(cur, Ordering::SeqCst);
                let c = cache.clone();
                wait_polling(
                    common::start(move || c.get_with(1, || 77)),
                    &futs,
                    &h,
                    &what,
                );
                // A value from get_with's init is a load started now.
                if cache.iter().any(|(k, v)| k == 1 && v == 77) {
                    h.loaded.lock().unwrap().insert(77, cur);
                    epoch.fetch_add(1, Ordering::SeqCst);
                    h.loaded.lock().unwrap().insert(77, cur + 1);
                    cache.insert(1, WRITTEN + step);
                    last_write = Some(WRITTEN + step);
                }
            }
        }
        check_history(&cache, &h, epoch.load(Ordering::SeqCst), last_write, &what);
        cache.validate();
    }
    // Resolve every queued refresh (half of them run, the rest dropped), then check the ends.
    loop {
        let f = futs.lock().unwrap().pop();
        match f {
            Some((e, mut f)) if e % 2 == 0 => {
                h.actx.store(e, Ordering::SeqCst);
                drive(&mut f, SHORT, &what0);
            }
            Some(_) => {}
            None => break,
        }
    }
    loop {
        let j = jobs.lock().unwrap().pop();
        match j {
            Some((e, job)) if e % 2 == 0 => {
                h.ctx.store(e, Ordering::SeqCst);
                within(SHORT, job)
                    .expect("a refresh job hangs")
                    .expect("no panic");
            }
            Some(_) => {}
            None => break,
        }
    }
    check_history(&cache, &h, epoch.load(Ordering::SeqCst), last_write, &what0);
    assert_eq!(cache.loads_in_flight(), 0, "{what0}: a load left in flight");
    cache.validate();
    let c = cache.clone();
    within(SHORT, move || c.get_with(2, || 2))
        .expect("a permit leaked")
        .expect("no panic");
    let s = cache.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{what0}: every refresh started ends as succeeded or failed: {s:?}"
    );
}

#[test]
fn history_late_or_dropped_refresh_jobs_never_overwrite_a_newer_write() {
    let _w = watchdog(LIMIT, "history blocking spawner");
    let before = LATE_RUNS.load(Ordering::SeqCst);
    for seed in 1..60 {
        history_run(seed, false);
    }
    let late = LATE_RUNS.load(Ordering::SeqCst) - before;
    eprintln!("late refresh jobs run: {late}");
    assert!(late > 20, "the sweep ran only {late} late jobs");
}

#[test]
fn history_late_or_dropped_refresh_futures_never_overwrite_a_newer_write() {
    let _w = watchdog(LIMIT, "history future spawner");
    let before = LATE_RUNS.load(Ordering::SeqCst);
    for seed in 1..60 {
        history_run(seed, true);
    }
    let late = LATE_RUNS.load(Ordering::SeqCst) - before;
    eprintln!("late refresh futures polled: {late}");
    assert!(late > 20, "the sweep polled only {late} late futures");
}

/// An `Expiry` whose `expire_after_update` panics once while armed.
struct UpdatePanics(Arc<AtomicBool>);
impl Expiry<u64, u64> for UpdatePanics {
    fn expire_after_update(
        &self,
        _k: &u64,
        _v: &u64,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        if self.0.swap(false, Ordering::SeqCst) {
            panic!("injected expire_after_update panic");
        }
        remaining
    }
}

/// Minimal form, with `expire_after_update` panicking once as the refresh replaces the value.
#[test]
fn refresh_whose_publish_panics_in_expire_after_update_is_retried_after_the_backoff() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "refresh_publish_update_panic");
    let clock = ManualClock::new();
    let armed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let (a, n) = (Arc::clone(&armed), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .time_to_live(Duration::from_secs(100))
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(1))
        .expire_after(UpdatePanics(Arc::clone(&armed)))
        .clock(clock.clone())
        .loader(move |_k: &u64| {
            let v = n.fetch_add(1, Ordering::SeqCst) + 2;
            if v == 2 {
                a.store(true, Ordering::SeqCst); // the first refresh's publish meets it
            }
            Ok::<_, BoxError>(v)
        })
        .spawner(|job| job())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        cache.get(&1),
        Some(1),
        "served at once; the refresh runs on the spawner"
    );
    assert!(!armed.load(Ordering::SeqCst), "the refresh met the panic");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    let mut seen = Vec::new();
    for t in 12..100u64 {
        clock.advance(Duration::from_secs(1));
        seen.push((t, cache.get(&1).unwrap_or(0)));
    }
    let s = cache.stats();
    assert!(
        calls.load(Ordering::SeqCst) >= 2 && seen.iter().any(|(_, v)| *v > 2),
        "the refresh whose publish panicked is never retried (backoff 1 s): loader calls {}, \
         reads (t, value) {:?}..., refreshes started {} succeeded {} failed {}, stale_served {}",
        calls.load(Ordering::SeqCst),
        &seen[..10],
        s.refreshes_started,
        s.refreshes_succeeded,
        s.refreshes_failed,
        s.stale_served
    );
}

/// A builder with every hook ticking `f` (capacity 3, one shard, a weigher, an `Expiry`, a
/// listener, a load limit of 1) on `clock`.
fn fault_builder(f: &Arc<Faults>, clock: &ManualClock) -> herdcache::CacheBuilder<FKey, FVal> {
    let (fw, fl) = (Arc::clone(f), Arc::clone(f));
    Cache::builder()
        .max_capacity(3)
        .shards(1)
        .weigher(move |_k: &FKey, _v: &FVal| {
            fw.tick("weigher");
            1
        })
        .expire_after(FExpiry(Arc::clone(f)))
        .eviction_listener(move |_k: &FKey, _v: &FVal, _c: RemovalCause| fl.tick("listener"))
        .max_concurrent_loads(1)
        .clock(clock.clone())
}

/// Runs `scenario` with a panic at call 1, 2, ... (until a run makes fewer calls); `after`
/// checks the disarmed cache and returns a complaint, collected for all `at`.
fn sweep_faults_with(
    name: &str,
    build: impl Fn(&Arc<Faults>, &ManualClock) -> FCache,
    scenario: impl Fn(&FCache, &Arc<Faults>, &ManualClock),
    after: impl Fn(&FCache, &Arc<Faults>, &ManualClock) -> Option<String>,
) {
    quiet_injected_panics();
    let mut complaints = Vec::new();
    let mut sites = std::collections::BTreeMap::new();
    let mut filters = FILTERS.iter();
    let mut only = *filters.next().unwrap();
    let mut at = 0u64;
    loop {
        at += 1;
        let f = Arc::new(Faults::default());
        let clock = ManualClock::new();
        let cache = build(&f, &clock);
        f.arm(at, only);
        scenario(&cache, &f, &clock);
        let hit = f.disarm();
        let what = format!("{name}: panic at call {at} of {only:?} ({hit:?})");
        assert!(
            common::eventually(|| cache.loads_in_flight() == 0),
            "{what}: a load left in flight"
        );
        cache.validate();
        if let Some(c) = after(&cache, &f, &clock) {
            complaints.push(format!("{what}: {c}"));
        }
        assert_eq!(cache.loads_in_flight(), 0, "{what}");
        cache.run_pending_tasks();
        cache.validate();
        let n = cache.iter().count() as u64;
        assert_eq!(cache.entry_count(), n, "{what}: entry_count against iter()");
        assert_eq!(
            cache.weighted_size(),
            n,
            "{what}: weighted_size against iter()"
        );
        match hit {
            Some(site) => {
                *sites
                    .entry(site.split(" (").next().unwrap_or("").to_string())
                    .or_insert(0) += 1;
                assert!(at < 2000, "{name}: never ran out of user calls");
            }
            None => match filters.next() {
                Some(&o) => {
                    only = o;
                    at = 0;
                }
                None => {
                    eprintln!("{name}: faults injected per site: {sites:?}");
                    assert!(complaints.is_empty(), "{name}:\n{}", complaints.join("\n"));
                    return;
                }
            },
        }
    }
}

/// Fail-safe: an expired key whose reload fails (the last value served), then, past the
/// backoff, a reload that succeeds; faults everywhere. Afterwards, past another backoff, a
/// load of the key must run (not the last value for ever) and no stale value is served past
/// `max_stale`.
#[test]
fn fault_sweep_fail_safe_reload() {
    let _w = watchdog(LIMIT, "fault_sweep_fail_safe_reload");
    sweep_faults_with(
        "fail_safe",
        |f, clock| {
            let c = fault_builder(f, clock)
                .time_to_live(Duration::from_secs(60))
                .fail_safe(Duration::from_secs(600))
                .refresh_backoff(Duration::from_secs(5))
                .build();
            c.insert(fk(f, 1), fv(f, 1));
            clock.advance(Duration::from_secs(61));
            c
        },
        |cache, f, clock| {
            let mut hs = Vec::new();
            for i in 0..2u64 {
                let (c, f) = (cache.clone(), Arc::clone(f));
                hs.push(common::start(move || {
                    c.try_get_with(fk(&f, 1), || {
                        f.tick("init");
                        std::thread::sleep(Duration::from_millis(2));
                        Err::<FVal, _>(i)
                    })
                    .map(|v| v.v)
                }));
            }
            for h in hs {
                let _ = h.wait(SHORT).expect("a caller hangs");
            }
            clock.advance(Duration::from_secs(6));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            let _ = within(SHORT, move || {
                c.get_with(fk(&f2, 1), || {
                    f2.tick("init");
                    fv(&f2, 500)
                })
                .v
            })
            .expect("a caller hangs");
        },
        |cache, f, clock| {
            clock.advance(Duration::from_secs(6));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            let v = within(SHORT, move || c.get_with(fk(&f2, 1), || fv(&f2, 7)).v)
                .expect("get_with hangs")
                .expect("no panic");
            if v == 1 {
                return Some("past the backoff the last value is served instead of a load".into());
            }
            // Never stale past max_stale.
            clock.advance(Duration::from_secs(700));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            let r = within(SHORT, move || {
                c.try_get_with(fk(&f2, 1), || Err::<FVal, _>(0))
                    .map(|v| v.v)
            })
            .expect("hangs")
            .expect("no panic");
            if let Ok(v) = r {
                return Some(format!("{v} served {v} past max_stale"));
            }
            None
        },
    );
}

/// `load_with_timeout` with a spawner: the spawned load, the spawner itself and every hook
/// may panic; the callers (one with a timeout, one without, one async) are answered, and a
/// later load of the key runs.
#[test]
fn fault_sweep_spawned_load_with_timeout() {
    let _w = watchdog(LIMIT, "fault_sweep_spawned_load_with_timeout");
    sweep_faults_with(
        "spawned_load",
        |f, clock| {
            let (fl, fs) = (Arc::clone(f), Arc::clone(f));
            let gen = Arc::new(AtomicU64::new(100));
            let c = fault_builder(f, clock)
                .loader(move |k: &FKey| {
                    fl.tick("loader");
                    std::thread::sleep(Duration::from_millis(2));
                    Ok::<_, BoxError>(fv(&fl, k.id * 1000 + gen.fetch_add(1, Ordering::SeqCst)))
                })
                .spawner(move |job| {
                    fs.tick("spawner");
                    std::thread::spawn(job);
                })
                .build();
            for id in 10..13 {
                c.insert(fk(f, id), fv(f, id));
            }
            c
        },
        |cache, f, _clock| {
            let mut hs = Vec::new();
            for t in [
                Some(Duration::from_secs(5)),
                None,
                Some(Duration::from_millis(1)),
            ] {
                let (c, f) = (cache.clone(), Arc::clone(f));
                hs.push(common::start(move || {
                    c.load_with_timeout(fk(&f, 1), t).map(|v| v.v)
                }));
                std::thread::sleep(Duration::from_millis(1)); // the first one leads, spawned
            }
            let (c, f2) = (cache.clone(), Arc::clone(f));
            hs.push(common::start(move || {
                let v = futures::executor::block_on(c.get_with_async(fk(&f2, 1), async {
                    f2.tick("init");
                    fv(&f2, 9)
                }));
                Ok(v.v)
            }));
            for h in hs {
                let _ = h.wait(SHORT).expect("a caller hangs");
            }
        },
        |cache, f, _clock| {
            let (c, f2) = (cache.clone(), Arc::clone(f));
            match within(SHORT, move || {
                c.load_with_timeout(fk(&f2, 2), Some(Duration::from_secs(5)))
                    .map(|v| v.v)
            }) {
                None => Some("a new key's load hangs: a permit leaked".into()),
                Some(Err(_)) => Some("a disarmed load panicked".into()),
                Some(Ok(Err(e))) => Some(format!("a disarmed load of a new key failed: {e}")),
                Some(Ok(Ok(_))) => None,
            }
        },
    );
}

/// `get_all` with a batch loader, joined by blocking and async callers of its keys.
#[test]
fn fault_sweep_get_all_with_joiners() {
    let _w = watchdog(LIMIT, "fault_sweep_get_all_with_joiners");
    sweep_faults_with(
        "get_all",
        |f, clock| {
            let c = fault_builder(f, clock).build();
            c.insert(fk(f, 10), fv(f, 10));
            c
        },
        |cache, f, _clock| {
            let (c, f1) = (cache.clone(), Arc::clone(f));
            let batch = common::start(move || {
                let keys = vec![fk(&f1, 1), fk(&f1, 2), fk(&f1, 10)];
                let f2 = Arc::clone(&f1);
                c.get_all(keys, move |missing: &[FKey]| {
                    f2.tick("load_missing");
                    std::thread::sleep(Duration::from_millis(3));
                    missing
                        .iter()
                        .map(|k| (k.clone(), fv(&f2, k.id + 100)))
                        .collect::<std::collections::HashMap<_, _>>()
                })
                .len()
            });
            std::thread::sleep(Duration::from_millis(1));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            let joiner = common::start(move || {
                c.get_with(fk(&f2, 1), || {
                    f2.tick("init");
                    fv(&f2, 300)
                })
                .v
            });
            let (c, f3) = (cache.clone(), Arc::clone(f));
            let ajoiner = common::start(move || {
                futures::executor::block_on(c.get_with_async(fk(&f3, 2), async {
                    f3.tick("init");
                    fv(&f3, 400)
                }))
                .v
            });
            let _ = batch.wait(SHORT).expect("get_all hangs");
            let _ = joiner.wait(SHORT).expect("a joiner hangs");
            let _ = ajoiner.wait(SHORT).expect("an async joiner hangs");
        },
        |cache, f, _clock| {
            for id in [1u64, 2] {
                let (c, f2) = (cache.clone(), Arc::clone(f));
                if within(SHORT, move || c.get_with(fk(&f2, id), || fv(&f2, 7)).v).is_none() {
                    return Some(format!("key {id} stuck"));
                }
            }
            None
        },
    );
}

/// Async refreshes (`future_spawner`): the refresh future polled N times and dropped, for
/// every N until it completes, its loader yielding k times, under a load limit of 1 with a
/// blocking reader of the key meanwhile. Documented: a refresh future "dropped before it
/// finishes ... is abandoned and retried after the backoff"; the old value is served.
#[test]
fn cancel_sweep_async_refresh_future_every_poll_count() {
    let _w = watchdog(LIMIT, "cancel_sweep_async_refresh_future_every_poll_count");
    for k in [0u32, 1, 3] {
        for polls in 0..(k as usize + 4) {
            let what = format!("refresh future k={k} polls={polls}");
            let clock = ManualClock::new();
            let gen = Arc::new(AtomicU64::new(100));
            let futs: Arc<Mutex<Vec<BoxFuture<()>>>> = Arc::default();
            let (g, fs) = (Arc::clone(&gen), Arc::clone(&futs));
            let cache: Cache<u64, u64> = Cache::builder()
                .max_capacity(100)
                .record_stats()
                .time_to_live(Duration::from_secs(100))
                .refresh_after(Duration::from_secs(10))
                .refresh_backoff(Duration::from_secs(1))
                .max_concurrent_loads(1)
                .clock(clock.clone())
                .async_loader(move |_k: &u64| {
                    let g = Arc::clone(&g);
                    async move {
                        Yield(k).await;
                        Ok::<_, BoxError>(g.fetch_add(1, Ordering::SeqCst))
                    }
                })
                .future_spawner(move |f| fs.lock().unwrap().push(f))
                .build();
            cache.insert(1, 1);
            clock.advance(Duration::from_secs(11));
            assert_eq!(cache.get(&1), Some(1), "{what}: served at once");
            let mut f = futs.lock().unwrap().pop().expect("a refresh was spawned");
            let done = poll_n(&mut f, polls).is_some();
            // A blocking reader and a blocking load of another key meanwhile.
            let c = cache.clone();
            let r = within(SHORT, move || c.get(&1))
                .expect("a read hangs")
                .expect("no panic");
            if done {
                assert_eq!(r, Some(100), "{what}: the refresh completed");
            } else {
                assert_eq!(r, Some(1), "{what}: the old value while the refresh runs");
            }
            drop(f);
            assert_eq!(cache.loads_in_flight(), 0, "{what}: a load left in flight");
            cache.validate();
            let c = cache.clone();
            within(SHORT, move || c.get_with(2, || 2))
                .unwrap_or_else(|| panic!("{what}: the dropped refresh kept the permit"))
                .expect("no panic");
            // Past the backoff the key is refreshed again.
            clock.advance(Duration::from_secs(11));
            let _ = cache.get(&1);
            let mut f = futs
                .lock()
                .unwrap()
                .pop()
                .unwrap_or_else(|| panic!("{what}: no refresh after the backoff"));
            drive(&mut f, SHORT, &what);
            let v = cache.get(&1);
            assert!(
                matches!(v, Some(x) if x >= 100 && x != 1),
                "{what}: not refreshed: {v:?}"
            );
            let s = cache.stats();
            assert_eq!(
                s.refreshes_started,
                s.refreshes_succeeded + s.refreshes_failed,
                "{what}: each refresh started ends as one of the two: {s:?}"
            );
            assert_eq!(s.loads_in_flight, 0, "{what}");
        }
    }
}

/// Negative caching: a failed load remembered for `negative_ttl`, joined by callers, then a
/// successful load after it; faults everywhere. Afterwards, past `negative_ttl`, the key loads
/// (no failure remembered for ever).
#[test]
fn fault_sweep_negative_caching() {
    let _w = watchdog(LIMIT, "fault_sweep_negative_caching");
    sweep_faults_with(
        "negative",
        |f, clock| {
            let c = fault_builder(f, clock)
                .time_to_live(Duration::from_secs(600))
                .negative_ttl(Duration::from_secs(10))
                .build();
            for id in 10..13 {
                c.insert(fk(f, id), fv(f, id));
            }
            c
        },
        |cache, f, clock| {
            let mut hs = Vec::new();
            for i in 0..3u64 {
                let (c, f) = (cache.clone(), Arc::clone(f));
                hs.push(common::start(move || {
                    c.try_get_with(fk(&f, 1), || {
                        f.tick("init");
                        std::thread::sleep(Duration::from_millis(2));
                        Err::<FVal, _>(i)
                    })
                    .map(|v| v.v)
                }));
                std::thread::sleep(Duration::from_millis(1));
            }
            for h in hs {
                let _ = h.wait(SHORT).expect("a caller hangs");
            }
            let (c, f2) = (cache.clone(), Arc::clone(f));
            let _ = within(SHORT, move || {
                c.try_get_with(fk(&f2, 1), || {
                    f2.tick("init");
                    Ok::<_, ()>(fv(&f2, 5))
                })
                .map(|v| v.v)
            })
            .expect("a caller hangs");
            clock.advance(Duration::from_secs(11));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            let _ = within(SHORT, move || {
                c.try_get_with(fk(&f2, 1), || {
                    f2.tick("init");
                    Ok::<_, ()>(fv(&f2, 6))
                })
                .map(|v| v.v)
            })
            .expect("a caller hangs");
        },
        |cache, f, clock| {
            clock.advance(Duration::from_secs(11));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            match within(SHORT, move || {
                c.try_get_with(fk(&f2, 1), || Ok::<_, ()>(fv(&f2, 7)))
                    .map(|v| v.v)
            }) {
                None => Some("hangs".into()),
                Some(Err(_)) => Some("panicked disarmed".into()),
                Some(Ok(Err(_))) => {
                    Some("past negative_ttl the failure is still remembered".into())
                }
                Some(Ok(Ok(_))) => None,
            }
        },
    );
}

/// Refresh-ahead where the entry expires while its refresh is queued, so that callers join
/// the refresh as a load; faults everywhere; the deferred spawner runs the job afterwards.
#[test]
fn fault_sweep_refresh_joined_after_expiry() {
    let _w = watchdog(LIMIT, "fault_sweep_refresh_joined_after_expiry");
    let jobs: JobList = Arc::default();
    let j = Arc::clone(&jobs);
    let jobs2 = Arc::clone(&jobs);
    sweep_faults_with(
        "refresh_joined",
        move |f, clock| {
            let (fl, fs, j) = (Arc::clone(f), Arc::clone(f), Arc::clone(&j));
            let gen = Arc::new(AtomicU64::new(100));
            let c = fault_builder(f, clock)
                .time_to_live(Duration::from_secs(20))
                .refresh_after(Duration::from_secs(10))
                .refresh_backoff(Duration::from_secs(1))
                .loader(move |k: &FKey| {
                    fl.tick("loader");
                    Ok::<_, BoxError>(fv(&fl, k.id * 1000 + gen.fetch_add(1, Ordering::SeqCst)))
                })
                .spawner(move |job| {
                    fs.tick("spawner");
                    j.lock().unwrap().push(job);
                })
                .build();
            c.insert(fk(f, 1), fv(f, 1));
            c
        },
        move |cache, f, clock| {
            clock.advance(Duration::from_secs(11));
            let _ = catch_unwind(AssertUnwindSafe(|| cache.get(&fk(f, 1)).map(|v| v.v)));
            clock.advance(Duration::from_secs(10)); // expired, refresh still queued
            let mut hs = Vec::new();
            for _ in 0..2 {
                let (c, f) = (cache.clone(), Arc::clone(f));
                hs.push(common::start(move || c.load(fk(&f, 1)).map(|v| v.v)));
            }
            std::thread::sleep(Duration::from_millis(3));
            for job in std::mem::take(&mut *jobs2.lock().unwrap()) {
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
            for h in hs {
                let _ = h.wait(SHORT).expect("a caller of the expired key hangs");
            }
            for job in std::mem::take(&mut *jobs2.lock().unwrap()) {
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
        },
        |cache, f, clock| {
            clock.advance(Duration::from_secs(2));
            let (c, f2) = (cache.clone(), Arc::clone(f));
            match within(SHORT, move || c.load(fk(&f2, 1)).map(|v| v.v)) {
                None => Some("a load hangs".into()),
                Some(Err(_)) => Some("panicked disarmed".into()),
                Some(Ok(Err(e))) => Some(format!("a disarmed load failed: {e}")),
                Some(Ok(Ok(_))) => None,
            }
        },
    );
}
