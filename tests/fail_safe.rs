//! Fail-safe: a failed load of an expired key answers with its last value, up to `max_stale`
//! past its deadline, retried by one caller per backoff. A model test (proptest, manual clock)
//! checks every answer and every loader call against an exact model; the adversarial tests
//! cover panicking loaders and inits, dropped async leaders, soft timeouts, writes during the
//! stale window and many threads.

#![cfg(not(loom))]

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, LoadError, ManualClock};
use proptest::prelude::*;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const TTL: u64 = 10; // seconds
const MAX_STALE: u64 = 30;
const BACKOFF: u64 = 4;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A backend the test can take down; counts its calls.
#[derive(Clone, Default)]
struct Backend {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    /// The value a successful call returns.
    next: Arc<AtomicU64>,
}

impl Backend {
    fn call(&self) -> Result<u64, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(BoxError::from("backend down"))
        } else {
            Ok(self.next.load(Ordering::SeqCst))
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

fn cache(clock: &ManualClock, b: &Backend) -> Cache<u64, u64> {
    let b = b.clone();
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| b.call())
        .build()
}

#[test]
fn failed_load_of_expired_key_serves_last_value_once_per_backoff() {
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = cache(&clock, &b);
    b.next.store(7, Ordering::SeqCst);
    assert_eq!(c.load(1).unwrap(), 7);
    b.set_down(true);
    clock.advance(secs(TTL));
    // Expired, backend down: the last value, from one load.
    assert_eq!(c.load(1).unwrap(), 7);
    assert_eq!(b.calls(), 2);
    assert_eq!(c.get(&1), None, "plain reads never see an expired value");
    // Within the backoff: the last value, no load.
    for _ in 0..10 {
        assert_eq!(c.load(1).unwrap(), 7);
    }
    clock.advance(secs(BACKOFF) - Duration::from_nanos(1));
    assert_eq!(c.load(1).unwrap(), 7);
    assert_eq!(b.calls(), 2, "no retry before the backoff passed");
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.load(1).unwrap(), 7);
    assert_eq!(b.calls(), 3, "one retry after it");
    assert_eq!(c.stats().stale_served_after_ttl, 13);
    // The backend is back: the next retry takes the new value.
    b.set_down(false);
    b.next.store(8, Ordering::SeqCst);
    assert_eq!(c.load(1).unwrap(), 7, "still within the backoff");
    clock.advance(secs(BACKOFF));
    assert_eq!(c.load(1).unwrap(), 8);
    assert_eq!(c.get(&1), Some(8));
}

#[test]
fn never_beyond_max_stale() {
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 0);
    b.set_down(true);
    clock.advance(secs(TTL + MAX_STALE) - Duration::from_nanos(1));
    assert_eq!(c.load(1).unwrap(), 0, "one nanosecond inside the window");
    clock.advance(Duration::from_nanos(1));
    assert!(matches!(c.load(1), Err(LoadError::Loader(_))));
    assert_eq!(c.entry_count(), 0, "reclaimed once the window closed");
}

#[test]
fn healthy_backend_after_ttl_is_loaded_as_usual() {
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 0);
    clock.advance(secs(TTL));
    b.next.store(5, Ordering::SeqCst);
    assert_eq!(
        c.load(1).unwrap(),
        5,
        "an expired value is not served when the load succeeds"
    );
    assert_eq!(c.stats().stale_served_after_ttl, 0);
}

#[test]
fn expired_entries_are_kept_and_counted_until_max_stale() {
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = cache(&clock, &b);
    for k in 0..10 {
        c.load(k).unwrap();
    }
    clock.advance(secs(TTL + 1));
    c.insert(100, 1); // a write runs the timer wheel
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 11, "expired entries kept for fail-safe");
    clock.advance(secs(MAX_STALE));
    c.insert(101, 1);
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 2, "and reclaimed after max_stale");
}

/// A full cache makes room with the stale entries first, the longest expired first, and never
/// with an entry written again since it expired; then the policy chooses among live ones.
#[test]
fn a_full_cache_evicts_stale_entries_before_live_ones() {
    for weighted in [false, true] {
        let clock = ManualClock::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let mut builder = Cache::builder()
            .time_to_live(secs(TTL))
            .fail_safe(secs(MAX_STALE))
            .shards(1)
            .clock(clock.clone())
            .eviction_listener(move |k: &u64, _v: &u64, cause| {
                l.lock().unwrap().push((*k, cause));
            });
        builder = if weighted {
            builder.max_capacity(8).weigher(|_k: &u64, _v: &u64| 2)
        } else {
            builder.max_capacity(4)
        };
        let c: Cache<u64, u64> = builder.build();
        c.insert(1, 1);
        clock.advance(secs(1));
        c.insert(2, 2);
        c.insert(3, 3);
        c.insert(4, 4);
        for _ in 0..5 {
            assert_eq!(c.get(&1), Some(1)); // the policy's favourite
        }
        clock.advance(secs(TTL + 1)); // all four expired, kept for fail-safe
        c.insert(2, 20); // written again: live (its stale value reported `Expired`)
        log.lock().unwrap().clear();
        c.insert(5, 5);
        c.insert(6, 6);
        c.run_pending_tasks();
        let removed = log.lock().unwrap().clone();
        assert_eq!(
            removed,
            vec![
                (1, herdcache::RemovalCause::Expired),
                (3, herdcache::RemovalCause::Expired)
            ],
            "weighted {weighted}: the stale entries went first, the longest expired first"
        );
        assert_eq!(c.get(&2), Some(20), "weighted {weighted}");
        assert!(
            c.contains_key(&5) && c.contains_key(&6),
            "weighted {weighted}"
        );
    }
}

#[test]
fn writes_win_over_the_stale_value() {
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = cache(&clock, &b);
    c.load(1).unwrap();
    b.set_down(true);
    clock.advance(secs(TTL));
    assert_eq!(c.load(1).unwrap(), 0);
    c.invalidate(&1);
    assert!(c.load(1).is_err(), "an invalidated value is never served");
    c.insert(2, 9);
    clock.advance(secs(TTL));
    assert_eq!(
        c.load(2).unwrap(),
        9,
        "a written value is kept like a loaded one"
    );
    c.insert(2, 10);
    assert_eq!(c.load(2).unwrap(), 10, "a write replaces the stale value");
}

#[test]
fn negative_caching_does_not_hide_the_stale_value() {
    let clock = ManualClock::new();
    let b = Backend::default();
    let bb = b.clone();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .negative_ttl(secs(60))
        .clock(clock.clone())
        .loader(move |_k: &u64| bb.call())
        .build();
    c.load(1).unwrap();
    b.set_down(true);
    clock.advance(secs(TTL));
    assert_eq!(c.load(1).unwrap(), 0);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.load(1).unwrap(), 0, "not the negative entry's error");
    assert_eq!(b.calls(), 3);
    assert!(
        c.load(2).is_err(),
        "a key without a value is still negative-cached"
    );
    assert!(c.load(2).is_err());
    assert_eq!(b.calls(), 4);
}

#[test]
fn a_panicking_loader_serves_the_last_value() {
    let _w = watchdog(LIMIT, "a_panicking_loader_serves_the_last_value");
    let clock = ManualClock::new();
    let panics = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (p, n) = (Arc::clone(&panics), Arc::clone(&calls));
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .loader(move |k: &u64| {
            n.fetch_add(1, Ordering::SeqCst);
            if p.load(Ordering::SeqCst) {
                panic!("loader panics (expected by the test)");
            }
            Ok::<_, BoxError>(*k)
        })
        .build();
    assert_eq!(c.load(3).unwrap(), 3);
    panics.store(true, Ordering::SeqCst);
    clock.advance(secs(TTL));
    assert_eq!(c.load(3).unwrap(), 3);
    assert_eq!(c.load(3).unwrap(), 3);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one panicking call per backoff"
    );
    assert!(
        matches!(c.load(4), Err(LoadError::Panicked)),
        "nothing to fall back on"
    );
}

#[test]
fn a_panicking_init_panics_its_caller_and_the_others_get_the_last_value() {
    let _w = watchdog(LIMIT, "a_panicking_init");
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .build();
    c.insert(1, 11);
    clock.advance(secs(TTL));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.get_with(1, || panic!("init panics (expected by the test)"))
    }));
    assert!(r.is_err(), "the panic goes to its own caller");
    let ran = AtomicUsize::new(0);
    let v = c.get_with(1, || {
        ran.fetch_add(1, Ordering::SeqCst);
        12
    });
    assert_eq!(
        (v, ran.load(Ordering::SeqCst)),
        (11, 0),
        "last value, no load in the backoff"
    );
    let e: Result<u64, Arc<&str>> = c.try_get_with(1, || Err("down"));
    assert_eq!(e.unwrap(), 11);
    clock.advance(secs(BACKOFF));
    let e: Result<u64, Arc<&str>> = c.try_get_with(1, || Err("down"));
    assert_eq!(e.unwrap(), 11, "a failed retry: the last value again");
    assert_eq!(
        c.get_with(1, || 12),
        11,
        "and no second retry in the backoff"
    );
    clock.advance(secs(BACKOFF));
    assert_eq!(c.get_with(1, || 12), 12);
    let none = c.optionally_get_with(2, || None);
    assert_eq!(none, None);
}

#[test]
fn optionally_none_is_an_answer_not_a_failure() {
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .clock(clock.clone())
        .build();
    c.insert(1, 11);
    clock.advance(secs(TTL));
    assert_eq!(c.optionally_get_with(1, || None), None);
    // The backend's answer ends the kept value: a later failure has nothing to fall back on.
    let r: Result<u64, _> = c.try_get_with(1, || Err::<u64, _>("down"));
    assert!(
        r.is_err(),
        "served {r:?} after the backend said the key is gone"
    );
    // Near miss: a failure with no `None` before it does fall back.
    c.insert(2, 22);
    clock.advance(secs(TTL));
    assert_eq!(c.try_get_with(2, || Err::<u64, _>("down")).unwrap(), 22);
}

/// An async caller whose runtime cuts its load off (the future is dropped, as
/// `tokio::time::timeout` does) asks `get_or_stale`: the last value within the stale window,
/// counted as served after its time to live; never beyond `max_stale`; the live value while
/// there is one (not counted); nothing without fail-safe.
#[test]
fn a_caller_cut_off_by_its_runtime_gets_the_last_value_from_get_or_stale() {
    let _w = watchdog(LIMIT, "get_or_stale");
    let clock = ManualClock::new();
    let build = |fail_safe: bool| {
        let b = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(TTL))
            .record_stats()
            .clock(clock.clone())
            .async_loader(|_k: &u64| std::future::pending::<Result<u64, BoxError>>());
        if fail_safe {
            b.fail_safe(secs(MAX_STALE)).build()
        } else {
            b.build()
        }
    };
    let c: Cache<u64, u64> = build(true);
    c.insert(1, 10);
    assert_eq!(c.get_or_stale(&1), Some(10), "live: as get");
    assert_eq!(c.stats().stale_served_after_ttl, 0);
    clock.advance(secs(TTL));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    {
        // The runtime's timeout: polled once (the load starts and hangs), then dropped.
        let mut load = Box::pin(c.load_async(1));
        assert!(load.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(c.get(&1), None, "expired");
    assert_eq!(c.get_or_stale(&1), Some(10));
    assert_eq!(c.stats().stale_served_after_ttl, 1);
    // The load cut off failed, as an abandoned leader's: its key's next callers get the last
    // value at once, with no load, until the backoff is over (stop 38).
    let mut again = Box::pin(c.load_async(1));
    match again.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => assert_eq!(r.unwrap(), 10),
        std::task::Poll::Pending => panic!("a load within the backoff after a cut-off load"),
    }
    drop(again);
    // A waiter cut off while another caller's load still runs gets it too.
    c.insert(3, 30);
    clock.advance(secs(TTL));
    let mut leader = Box::pin(c.get_with_async(3, std::future::pending::<u64>()));
    let _ = leader.as_mut().poll(&mut cx);
    {
        let mut waiter = Box::pin(c.load_async(3));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(c.get_or_stale(&3), Some(30));
    drop(leader);
    clock.advance(secs(MAX_STALE));
    assert_eq!(c.get_or_stale(&3), None, "never beyond max_stale");
    assert_eq!(c.get_or_stale(&1), None, "never beyond max_stale");
    // A write ends the stale value; without fail-safe there is none.
    c.insert(2, 20);
    clock.advance(secs(TTL));
    c.invalidate(&2);
    assert_eq!(c.get_or_stale(&2), None);
    let plain: Cache<u64, u64> = build(false);
    plain.insert(1, 10);
    clock.advance(secs(TTL));
    assert_eq!(plain.get_or_stale(&1), None);
    assert_eq!(plain.stats().stale_served_after_ttl, 0);
}

#[test]
fn async_failures_and_dropped_leaders_serve_the_last_value() {
    let _w = watchdog(LIMIT, "async fail-safe");
    let clock = ManualClock::new();
    let b = Backend::default();
    let bb = b.clone();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .async_loader(move |_k: &u64| {
            let b = bb.clone();
            async move { b.call() }
        })
        .build();
    use futures::executor::block_on;
    assert_eq!(block_on(c.load_async(1)).unwrap(), 0);
    b.set_down(true);
    clock.advance(secs(TTL));
    assert_eq!(block_on(c.load_async(1)).unwrap(), 0);
    assert_eq!(block_on(c.load_async(1)).unwrap(), 0);
    assert_eq!(b.calls(), 2);
    // A shared async init that panics: the panic goes to its caller, the others get the
    // last value within the backoff.
    c.insert(2, 20);
    clock.advance(secs(TTL));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        block_on(c.get_with_async_shared(2, async {
            panic!("async init panics (expected by the test)")
        }))
    }));
    assert!(r.is_err(), "the panic goes to its own caller");
    let r: Result<u64, Arc<BoxError>> = block_on(c.try_get_with_async_shared(2, async { Ok(21) }));
    assert_eq!(r.unwrap(), 20);
    // A leader dropped mid-load (a client's deadline): the others get the last value.
    c.insert(3, 30);
    clock.advance(secs(TTL));
    {
        let mut lead = Box::pin(c.get_with_async(3, std::future::pending::<u64>()));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(lead.as_mut().poll(&mut cx).is_pending());
    } // dropped
    let v = block_on(c.get_with_async(3, async { 31 }));
    assert_eq!(v, 30, "within the backoff after the abandoned load");
}

#[test]
fn soft_timeout_serves_the_last_value() {
    let _w = watchdog(LIMIT, "soft timeout");
    let clock = ManualClock::new();
    let release = Arc::new(Barrier::new(2));
    let hang = Arc::new(AtomicBool::new(false));
    let (r, h) = (Arc::clone(&release), Arc::clone(&hang));
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u64| {
            if h.load(Ordering::SeqCst) {
                r.wait(); // hangs until the test lets it go
            }
            Ok::<_, BoxError>(*k + 100)
        })
        .build();
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(TTL));
    c.insert(1, 5);
    clock.advance(secs(TTL));
    hang.store(true, Ordering::SeqCst);
    let v = c
        .load_with_timeout(1, Some(Duration::from_millis(20)))
        .unwrap();
    assert_eq!(v, 5, "the last value at the soft timeout");
    // The hung load still runs: later callers get the last value at once.
    assert_eq!(c.load_with_timeout(1, None).unwrap(), 5);
    release.wait();
}

#[test]
fn many_threads_one_retry_per_backoff() {
    let _w = watchdog(LIMIT, "many threads");
    let clock = ManualClock::new();
    let b = Backend::default();
    let c = cache(&clock, &b);
    for k in 0..8 {
        c.load(k).unwrap();
    }
    b.set_down(true);
    for round in 1..=5u64 {
        clock.advance(secs(if round == 1 { TTL } else { BACKOFF }));
        let before = b.calls();
        let start = Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    for k in 0..8 {
                        assert_eq!(c.load(k).unwrap(), 0);
                    }
                });
            }
        });
        assert_eq!(
            b.calls() - before,
            8,
            "one call per key per backoff (round {round})"
        );
    }
}

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Down(bool),
    Load(u64),
    Insert(u64),
    Invalidate(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..8_000).prop_map(Op::Advance),
        1 => any::<bool>().prop_map(Op::Down),
        6 => (0u64..3).prop_map(Op::Load),
        1 => (0u64..3).prop_map(Op::Insert),
        1 => (0u64..3).prop_map(Op::Invalidate),
    ]
}

/// The model of one key: when its value was written (the value *is* that time, in ms) and its
/// retry deadline (0: none).
#[derive(Clone, Copy, Debug)]
struct Key {
    written: u64,
    retry: u64,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    /// Every answer and every loader call, against an exact model: a value is never served past
    /// `max_stale`; a failing key is loaded once per backoff; a healthy backend's value
    /// replaces an expired one. Times in milliseconds.
    #[test]
    fn fail_safe_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let (ttl, max_stale, backoff) = (2_000u64, 6_000u64, 1_500u64);
        let clock = ManualClock::new();
        let now = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let (n, d, cl) = (Arc::clone(&now), Arc::clone(&down), Arc::clone(&calls));
        let c: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_millis(ttl))
            .fail_safe(Duration::from_millis(max_stale))
            .refresh_backoff(Duration::from_millis(backoff))
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                cl.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("down"))
                } else {
                    Ok(n.load(Ordering::SeqCst))
                }
            })
            .build();
        let mut model: [Option<Key>; 3] = [None; 3];
        let mut t = 0u64;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    t += ms;
                    now.store(t, Ordering::SeqCst);
                    clock.advance(Duration::from_millis(ms));
                }
                Op::Down(x) => down.store(x, Ordering::SeqCst),
                Op::Insert(k) => {
                    c.insert(k, t);
                    model[k as usize] = Some(Key { written: t, retry: 0 });
                }
                Op::Invalidate(k) => {
                    c.invalidate(&k);
                    model[k as usize] = None;
                }
                Op::Load(k) => {
                    let before = calls.load(Ordering::SeqCst);
                    let got = c.load(k);
                    let called = calls.load(Ordering::SeqCst) - before;
                    let is_down = down.load(Ordering::SeqCst);
                    let m = &mut model[k as usize];
                    let (want, want_calls) = match *m {
                        Some(e) if t < e.written + ttl => (Some(e.written), 0),
                        Some(mut e) if t < e.written + ttl + max_stale => {
                            if e.retry != 0 && e.retry > t {
                                (Some(e.written), 0)
                            } else if is_down {
                                e.retry = e.retry.max(t + backoff);
                                *m = Some(e);
                                (Some(e.written), 1)
                            } else {
                                *m = Some(Key { written: t, retry: 0 });
                                (Some(t), 1)
                            }
                        }
                        _ if is_down => {
                            *m = None;
                            (None, 1)
                        }
                        _ => {
                            *m = Some(Key { written: t, retry: 0 });
                            (Some(t), 1)
                        }
                    };
                    prop_assert_eq!(called, want_calls, "loader calls for key {} at {}", k, t);
                    match (got, want) {
                        (Ok(v), Some(w)) => {
                            prop_assert_eq!(v, w, "value of key {} at {}", k, t);
                            prop_assert!(t < v + ttl + max_stale, "never past max_stale");
                        }
                        (Err(_), None) => {}
                        (got, want) => prop_assert!(false, "key {} at {}: got {:?}, want {:?}", k, t, got, want),
                    }
                }
            }
        }
    }
}

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

#[test]
fn a_failed_refresh_joined_after_expiry_serves_the_last_value() {
    let _w = watchdog(LIMIT, "failed refresh joined after expiry");
    let clock = ManualClock::new();
    let b = Backend::default();
    let bb = b.clone();
    let jobs: Jobs = Arc::default();
    let j = Arc::clone(&jobs);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .refresh_after(secs(5))
        .fail_safe(secs(MAX_STALE))
        .refresh_backoff(secs(BACKOFF))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| bb.call())
        .spawner(move |job| j.lock().unwrap().push(job))
        .build();
    b.next.store(3, Ordering::SeqCst);
    c.insert(1, 1);
    clock.advance(secs(6));
    assert_eq!(c.get(&1), Some(1)); // starts a refresh: parked
    assert_eq!(jobs.lock().unwrap().len(), 1);
    clock.advance(secs(TTL));
    b.set_down(true);
    std::thread::scope(|s| {
        let joiner = s.spawn(|| c.load_with_timeout(1, None));
        while c.stats().coalesced == 0 {
            std::thread::yield_now(); // until it joined the refresh
        }
        for job in std::mem::take(&mut *jobs.lock().unwrap()) {
            job(); // the refresh fails
        }
        assert_eq!(
            joiner.join().unwrap().unwrap(),
            1,
            "the last value, not the error"
        );
    });
    assert_eq!(b.calls(), 1);
    assert_eq!(c.load(1).unwrap(), 1, "within the backoff: no load");
    assert_eq!(b.calls(), 1);
}

#[test]
fn a_wait_for_a_load_permit_past_the_soft_timeout_serves_the_last_value() {
    let _w = watchdog(LIMIT, "permit wait past the soft timeout");
    let clock = ManualClock::new();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let started_tx = Mutex::new(started_tx);
    let release = Arc::new(Barrier::new(2));
    let r = Arc::clone(&release);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .fail_safe(secs(MAX_STALE))
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u64| {
            if *k == 99 {
                started_tx.lock().unwrap().send(()).unwrap();
                r.wait(); // holds the only permit until the test lets go
            }
            Ok::<_, BoxError>(*k + 100)
        })
        .build();
    c.insert(1, 5);
    clock.advance(secs(TTL));
    std::thread::scope(|s| {
        let holder = s.spawn(|| c.load_with_timeout(99, None));
        started_rx.recv().unwrap(); // the permit is taken
        let v = c.load_with_timeout(1, Some(Duration::from_millis(20)));
        assert_eq!(
            v.unwrap(),
            5,
            "the last value while the load waits for a permit"
        );
        release.wait();
        assert_eq!(holder.join().unwrap().unwrap(), 199);
    });
}

/// A cache limited to `limit` loads at once, with no spawner (leaders load inline). Keys from
/// `HOLD` up block their loader (holding its permit) until the test sends on `release`; each
/// announces its start on `started`. Other keys load `key + 100` and are counted in `calls`.
struct Held {
    cache: Cache<u64, u64>,
    started: std::sync::mpsc::Receiver<u64>,
    release: std::sync::mpsc::Sender<()>,
    calls: Arc<Mutex<std::collections::HashMap<u64, usize>>>,
}

const HOLD: u64 = 1000;
/// Keys from `SLOW` up (below `HOLD`) yield a few times in their loader.
const SLOW: u64 = 500;

fn held_cache(clock: &ManualClock, limit: usize, fail_safe: bool) -> Held {
    let (started_tx, started) = std::sync::mpsc::channel::<u64>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    let calls = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let counted = Arc::clone(&calls);
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(TTL))
        .refresh_backoff(secs(BACKOFF))
        .max_concurrent_loads(limit)
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u64| {
            if *k >= HOLD {
                started_tx.lock().unwrap().send(*k).unwrap();
                // Holds its permit until the test lets go (no sleep).
                release_rx.lock().unwrap().recv().unwrap();
            } else {
                *counted.lock().unwrap().entry(*k).or_insert(0) += 1;
                if *k >= SLOW {
                    for _ in 0..20 {
                        std::thread::yield_now(); // a load that holds its permit a while
                    }
                }
            }
            Ok::<_, BoxError>(*k + 100)
        });
    if fail_safe {
        b = b.fail_safe(secs(MAX_STALE));
    }
    Held {
        cache: b.build(),
        started,
        release,
        calls,
    }
}

impl Held {
    fn calls(&self, k: u64) -> usize {
        self.calls.lock().unwrap().get(&k).copied().unwrap_or(0)
    }
}

/// Starts `n` callers of `key` with no deadline and waits (bounded by the leader's end) until
/// they joined its load; returns their handles and whether all joined before the leader
/// gave up (on a stalled machine they may arrive after; their answers are checked either way).
fn join_waiters<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    c: &'s Cache<u64, u64>,
    key: u64,
    n: u64,
    leader: &std::thread::ScopedJoinHandle<'s, Result<u64, LoadError>>,
) -> (
    Vec<std::thread::ScopedJoinHandle<'s, Result<u64, LoadError>>>,
    bool,
) {
    let before = c.stats().coalesced;
    let waiters = (0..n)
        .map(|_| s.spawn(move || c.load_with_timeout(key, None)))
        .collect();
    while c.stats().coalesced < before + n && !leader.is_finished() {
        std::thread::yield_now();
    }
    (waiters, c.stats().coalesced >= before + n)
}

#[test]
fn an_inline_leader_past_its_deadline_in_the_permit_queue_serves_the_last_value() {
    let _w = watchdog(LIMIT, "inline permit wait past the soft timeout, fail-safe");
    let clock = ManualClock::new();
    let h = held_cache(&clock, 1, true);
    let c = &h.cache;
    c.insert(1, 5);
    clock.advance(secs(TTL)); // key 1 expired; within its stale window
    std::thread::scope(|s| {
        let holder = s.spawn(|| c.load_with_timeout(HOLD, None));
        assert_eq!(h.started.recv().unwrap(), HOLD, "the only permit is taken");
        // Alone: the leader of key 1 gives up its place in the permit queue at its deadline.
        let v = c.load_with_timeout(1, Some(Duration::from_millis(50)));
        assert_eq!(v.unwrap(), 5, "the last value, not a wait for the permit");
        assert_eq!(h.calls(1), 0, "key 1's loader did not run");
        assert_eq!(c.stats().stale_served_after_ttl, 1);
        assert_eq!(c.stats().timeouts, 1);
        // Within the backoff, a caller with no deadline gets it at once (no permit wait).
        assert_eq!(c.load_with_timeout(1, None).unwrap(), 5);
        assert_eq!(c.stats().stale_served_after_ttl, 2);
        assert_eq!(h.calls(1), 0);
        h.release.send(()).unwrap();
        assert_eq!(holder.join().unwrap().unwrap(), HOLD + 100);
    });
    // After the retry deadline, one caller retries (the backend is fine: the new value).
    clock.advance(secs(BACKOFF));
    assert_eq!(
        c.load_with_timeout(1, Some(Duration::from_millis(50)))
            .unwrap(),
        101
    );
    assert_eq!(h.calls(1), 1);
    assert_eq!(c.load(1).unwrap(), 101);
    assert_eq!(h.calls(1), 1, "a hit");
}

#[test]
fn waiters_joined_to_a_leader_that_gives_up_its_permit_wait_get_the_last_value() {
    let _w = watchdog(LIMIT, "waiters of a timed-out permit wait, fail-safe");
    let clock = ManualClock::new();
    let h = held_cache(&clock, 1, true);
    let c = &h.cache;
    c.insert(1, 5);
    clock.advance(secs(TTL));
    std::thread::scope(|s| {
        let holder = s.spawn(|| c.load_with_timeout(HOLD, None));
        assert_eq!(h.started.recv().unwrap(), HOLD);
        // A deadline long enough for the waiters to join first on any sane scheduler.
        let leader = s.spawn(|| c.load_with_timeout(1, Some(Duration::from_millis(500))));
        while c.stats().misses == 1 {
            std::thread::yield_now(); // until the leader claimed key 1
        }
        let (waiters, joined) = join_waiters(s, c, 1, 2, &leader);
        assert_eq!(leader.join().unwrap().unwrap(), 5);
        for w in waiters {
            assert_eq!(
                w.join().unwrap().unwrap(),
                5,
                "a waiter gets the last value too"
            );
        }
        if !joined {
            eprintln!("note: the waiters arrived after the leader gave up (slow scheduler)");
        }
        assert_eq!(h.calls(1), 0, "nobody ran key 1's loader");
        assert_eq!(c.stats().stale_served_after_ttl, 3);
        h.release.send(()).unwrap();
        holder.join().unwrap().unwrap();
    });
    // Within the backoff: still the last value, no load; after it, one caller retries.
    assert_eq!(c.load(1).unwrap(), 5);
    assert_eq!(h.calls(1), 0);
    clock.advance(secs(BACKOFF));
    assert_eq!(c.load(1).unwrap(), 101);
    assert_eq!(h.calls(1), 1);
}

#[test]
fn without_fail_safe_a_leader_past_its_deadline_in_the_permit_queue_times_out_cleanly() {
    let _w = watchdog(
        LIMIT,
        "inline permit wait past the soft timeout, no fail-safe",
    );
    let clock = ManualClock::new();
    let h = held_cache(&clock, 1, false);
    let c = &h.cache;
    c.insert(1, 5);
    clock.advance(secs(TTL));
    std::thread::scope(|s| {
        let holder = s.spawn(|| c.load_with_timeout(HOLD, None));
        assert_eq!(h.started.recv().unwrap(), HOLD);
        let r = c.load_with_timeout(1, Some(Duration::from_millis(50)));
        assert!(matches!(r, Err(LoadError::Timeout)), "{r:?}");
        assert_eq!(h.calls(1), 0, "key 1's loader did not run");
        // Waiters of a leader that gives up retry, and one of them leads (waiting for the
        // permit, with no deadline).
        let leader = s.spawn(|| c.load_with_timeout(1, Some(Duration::from_millis(500))));
        while c.stats().misses < 3 {
            std::thread::yield_now(); // until the leader claimed key 1
        }
        let (waiters, _) = join_waiters(s, c, 1, 2, &leader);
        assert!(matches!(leader.join().unwrap(), Err(LoadError::Timeout)));
        assert_eq!(h.calls(1), 0);
        // The held permit, released, goes to the waiters' new leader: nothing was lost to the
        // tickets that left the queue.
        h.release.send(()).unwrap();
        holder.join().unwrap().unwrap();
        for w in waiters {
            assert_eq!(w.join().unwrap().unwrap(), 101);
        }
        assert_eq!(h.calls(1), 1, "one of the waiters loaded, once");
    });
    assert_eq!(c.stats().stale_served_after_ttl, 0);
    // The limit still admits one load: a later load runs.
    c.invalidate(&1);
    assert_eq!(
        c.load_with_timeout(1, Some(Duration::from_millis(50)))
            .unwrap(),
        101
    );
    assert_eq!(h.calls(1), 2);
}

#[test]
fn a_free_permit_and_a_deadline_load_as_usual() {
    let _w = watchdog(LIMIT, "near miss: permit free");
    let clock = ManualClock::new();
    let h = held_cache(&clock, 1, true);
    let c = &h.cache;
    c.insert(1, 5);
    clock.advance(secs(TTL));
    assert_eq!(
        c.load_with_timeout(1, Some(Duration::from_millis(50)))
            .unwrap(),
        101
    );
    assert_eq!(h.calls(1), 1, "loaded, not served stale");
    let st = c.stats();
    assert_eq!((st.stale_served_after_ttl, st.timeouts), (0, 0));
}

#[test]
fn permit_timeouts_racing_grants_leak_no_permit() {
    let _w = watchdog(LIMIT, "permit timeout sweep");
    const LIM: usize = 2;
    let clock = ManualClock::new();
    let h = held_cache(&clock, LIM, true);
    let c = &h.cache;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..400u64 {
                    // Deadlines of 0 to 100 µs: many time out as a permit is granted.
                    let d = Duration::from_micros((t * 11 + i) % 101);
                    let k = SLOW + (t + i) % 8;
                    c.invalidate(&k); // a miss: a load, and a permit to wait for
                    match c.load_with_timeout(k, Some(d)) {
                        Ok(v) => assert_eq!(v, k + 100),
                        Err(LoadError::Timeout) => {}
                        Err(e) => panic!("{k}: {e:?}"),
                    }
                }
            });
        }
    });
    let st0 = c.stats();
    eprintln!(
        "sweep: {} timeouts, {} loads waited for a permit, {} served stale",
        st0.timeouts, st0.loads_waited_for_limit, st0.stale_served_after_ttl
    );
    // Exactly LIM loads are admitted at once afterwards: LIM holders start, the next waits.
    std::thread::scope(|s| {
        let holders: Vec<_> = (0..LIM as u64)
            .map(|i| s.spawn(move || c.load_with_timeout(HOLD + i, None)))
            .collect();
        for _ in 0..LIM {
            h.started.recv().unwrap();
        }
        let extra = s.spawn(|| c.load_with_timeout(HOLD + 99, None));
        while c.stats().loads_waited_for_limit == st0.loads_waited_for_limit {
            std::thread::yield_now(); // until the extra load queued for a permit
        }
        assert!(
            h.started.try_recv().is_err(),
            "a load past the limit started"
        );
        h.release.send(()).unwrap();
        assert_eq!(
            h.started.recv().unwrap(),
            HOLD + 99,
            "the freed permit went on"
        );
        for _ in 0..LIM {
            h.release.send(()).unwrap();
        }
        for j in holders {
            j.join().unwrap().unwrap();
        }
        assert_eq!(extra.join().unwrap().unwrap(), HOLD + 199);
    });
    assert!(c.stats().max_concurrent_loads_seen <= LIM as u64);
}
