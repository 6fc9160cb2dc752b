#![cfg(not(any(loom, shuttle)))]
//! Round 61 (outside, public API only): an attack on round 60's fail-safe fix (a failed load
//! that a write won over falls back on nothing; past the retry deadline a computation is no
//! retry; a timed-out wait sets the retry deadline only while a load of the key runs).
//!
//! Found (both fixed in the same change; each test fails without):
//! - `get_all_joined_to_an_abandoned_load_gets_the_stale_value`: a `get_all` that joined a
//!   load which was abandoned (a `get_with` init panicked) after its `load_missing` was spent
//!   leaves the key out, though the failure started fail-safe's backoff and any other caller
//!   gets the old value at once.
//! - `a_shared_load_owner_that_cannot_lead_does_not_push_the_retry_deadline`: past the
//!   backoff, the owner of a shared load that panicked in another caller's poll claims the
//!   retry (the next retry deadline is set) but cannot load (it panics): no load runs, and the
//!   next caller gets the old value with no load for a whole further backoff. Now a retrier
//!   whose registration is withdrawn (a caller that cannot lead) sets the deadline back.
//!   The `get_all` case: a joined key that ends with no value is offered fail-safe's answer
//!   before it is left out.
//!
//! Held (probes): callers joined to a computation past the deadline (`Nop`, `Remove`, panic)
//! then exactly one retry; the deadline passing during a computation (blocking and async
//! callers wait for it); a timed-out wait for a computation sets no deadline; fail-safe
//! answers never revive a time-to-idle or `Expiry`-extended entry; a window closing during
//! the load is an error for all its callers; a taken-over load (load limit, nested) that lost
//! to a write falls back on nothing. Statistics balance in each.

mod common;

use common::{eventually, quiet_injected_panics, watchdog};
use herdcache::{BoxError, Cache, CacheStats, ManualClock, Op};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(10);
const BACKOFF: Duration = Duration::from_secs(5);
const MAX_STALE: Duration = Duration::from_secs(600);

fn past_ttl() -> Duration {
    TTL + Duration::from_secs(1)
}

/// `CacheStats::misses`: "misses == load_successes + load_failures + loads_abandoned +
/// coalesced + negative_hits, less the refreshes".
fn unbalanced(s: &CacheStats) -> Option<String> {
    let counted =
        (s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits)
            .saturating_sub(s.refreshes_started);
    (s.misses != counted).then(|| format!("misses {} != {counted} counted: {s:?}", s.misses))
}

fn builder(clock: &ManualClock) -> herdcache::CacheBuilder<u32, u64> {
    Cache::builder()
        .max_capacity(100)
        .time_to_live(TTL)
        .fail_safe(MAX_STALE)
        .refresh_backoff(BACKOFF)
        .record_stats()
        .clock(clock.clone())
}

fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

fn spin_until(f: &AtomicBool) {
    while !f.load(SeqCst) {
        std::thread::yield_now();
    }
}

/// Fail-safe: "A load fails — ... a panic (of a builder loader, or of a `get_with` init, whose
/// panic still goes to its own caller), an abandoned async leader ... — while the old value is
/// within its stale window: every caller of that load gets the old value instead of the
/// error", and "The calls that can fall back are those that load on a miss: ... `get_all`".
/// A `get_all` that joined such a load (key 1) and led another key (2), so that its
/// `load_missing` is spent, must still answer key 1 with its last value.
#[test]
fn get_all_joined_to_an_abandoned_load_gets_the_stale_value() {
    let _dog = watchdog(Duration::from_secs(60), "get_all joined abandoned");
    quiet_injected_panics();
    let clock = ManualClock::new();
    let cache = Arc::new(builder(&clock).build());
    cache.insert(1, 7);
    clock.advance(past_ttl()); // 7 stale
    let (started, go) = (flag(), flag());
    let leader = {
        let (c, started, go) = (Arc::clone(&cache), Arc::clone(&started), Arc::clone(&go));
        std::thread::spawn(move || {
            c.get_with(1, || {
                started.store(true, SeqCst);
                spin_until(&go);
                panic!("injected: init panics")
            })
        })
    };
    spin_until(&started);
    let before = cache.stats().coalesced;
    let leader = Mutex::new(Some(leader));
    let all = cache.get_all([1, 2], |missing| {
        assert_eq!(missing, [2]);
        // Key 1 was joined (counted as coalesced) before `load_missing` runs.
        assert!(cache.stats().coalesced > before, "key 1 not joined");
        go.store(true, SeqCst);
        let r = leader.lock().unwrap().take().unwrap().join();
        assert!(r.is_err(), "the leader's init panics");
        HashMap::from([(2, 20)])
    });
    // The abandoned load started the backoff: any caller now gets 7 at once.
    let next = cache.try_get_with(1, || Err::<u64, _>("must not load within the backoff"));
    cache.validate();
    assert_eq!(next, Ok(7), "the backoff did not start");
    assert_eq!(unbalanced(&cache.stats()), None);
    assert_eq!(
        all.get(&1),
        Some(&7),
        "get_all, a caller of the failed (abandoned) load of key 1, was not answered with its \
         last value (got {all:?}) though fail-safe answers every caller of a failed load"
    );
}

/// Key 1: value 7 expired, a failed load started the backoff, the backoff is over. Returns
/// the cache.
fn past_a_backoff(clock: &ManualClock) -> Arc<Cache<u32, u64>> {
    let cache = Arc::new(builder(clock).build());
    cache.insert(1, 7);
    clock.advance(past_ttl());
    assert_eq!(
        cache.try_get_with(1, || Err::<u64, _>("injected: down")),
        Ok(7)
    );
    clock.advance(BACKOFF + Duration::from_secs(1));
    cache
}

/// Runs `and_compute_with` on key 1 on its own thread, its closure held until `go`; returns
/// once the closure runs.
fn held_computation(
    cache: &Arc<Cache<u32, u64>>,
    go: &Arc<AtomicBool>,
    op: fn() -> Op<u64>,
) -> std::thread::JoinHandle<()> {
    let started = flag();
    let h = {
        let (c, go, started) = (Arc::clone(cache), Arc::clone(go), Arc::clone(&started));
        std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.entry(1).and_compute_with(|e| {
                    assert!(e.is_none(), "the expired entry is absent to a computation");
                    started.store(true, SeqCst);
                    spin_until(&go);
                    op()
                })
            }));
        })
    };
    spin_until(&started);
    h
}

/// Past the retry deadline, two callers join a running computation ("A computation of the
/// key running past the deadline is no retry (it loads nothing): the callers wait for it").
/// The computation then ends with `Nop`, `Remove` or a panic. Checked: "the backend sees at
/// most one load of the key per backoff" (here: exactly one, the first caller after the
/// computation is the retrier); after `Remove` ("Writes win ... so do a computation's
/// `Op::Remove`") no caller gets 7; the statistics balance.
#[test]
fn callers_joined_to_a_computation_past_the_deadline_then_one_retry() {
    let _dog = watchdog(Duration::from_secs(60), "computation then retry");
    quiet_injected_panics();
    let mut wrong = Vec::new();
    type Verdict = fn() -> Op<u64>;
    let ops: [(&str, Verdict); 3] = [
        ("Nop", || Op::Nop),
        ("Remove", || Op::Remove),
        ("panic", || panic!("injected: compute panics")),
    ];
    for (name, op) in ops {
        let clock = ManualClock::new();
        let cache = past_a_backoff(&clock);
        let go = flag();
        let compute = held_computation(&cache, &go, op);
        let loads = Arc::new(AtomicUsize::new(0));
        let before = cache.stats().coalesced;
        let callers: Vec<_> = (0..2)
            .map(|_| {
                let (c, loads) = (Arc::clone(&cache), Arc::clone(&loads));
                common::start(move || {
                    c.try_get_with(1, || {
                        loads.fetch_add(1, SeqCst);
                        Err::<u64, &str>("backend still down")
                    })
                })
            })
            .collect();
        assert!(
            eventually(|| cache.stats().coalesced >= before + 2),
            "{name}: the callers did not join the computation"
        );
        go.store(true, SeqCst);
        compute.join().unwrap();
        let got: Vec<_> = callers
            .into_iter()
            .map(|c| {
                c.wait(Duration::from_secs(10))
                    .expect("returned")
                    .expect("no panic")
            })
            .collect();
        let n = loads.load(SeqCst);
        // After `Remove` nothing is left to fall back on: errors are not cached, so the two
        // callers may load one after the other (or one joins the other's load).
        let ok = if name == "Remove" {
            (1..=2).contains(&n)
        } else {
            n == 1
        };
        if !ok {
            wrong.push(format!(
                "{name}: {n} loads after the computation (got {got:?})"
            ));
        }
        if name == "Remove" && got.contains(&Ok(7)) {
            wrong.push(format!("{name}: a caller got the removed value 7: {got:?}"));
        }
        if name != "Remove" && got.iter().any(|g| g.is_err()) {
            wrong.push(format!(
                "{name}: a caller got an error with 7 in its window: {got:?}"
            ));
        }
        if let Some(u) = unbalanced(&cache.stats()) {
            wrong.push(format!("{name}: {u}"));
        }
        cache.validate();
    }
    assert!(
        wrong.is_empty(),
        "{}",
        wrong.join("\n").replace("injected", "planted")
    );
}

/// The deadline passes while a computation runs (it began within the backoff: its callers
/// then got 7 at once). A caller that begins after the deadline waits for the computation
/// and takes its value (`Put(20)`), blocking and async alike.
#[test]
fn the_deadline_passing_during_a_computation_makes_callers_wait_for_it() {
    let _dog = watchdog(
        Duration::from_secs(60),
        "deadline passes during computation",
    );
    for asynchronous in [false, true] {
        let clock = ManualClock::new();
        let cache = Arc::new(builder(&clock).build());
        cache.insert(1, 7);
        clock.advance(past_ttl());
        assert_eq!(
            cache.try_get_with(1, || Err::<u64, _>("injected: down")),
            Ok(7)
        );
        let go = flag();
        let compute = held_computation(&cache, &go, || Op::Put(20));
        // Within the backoff: the old value at once (documented).
        assert_eq!(cache.try_get_with(1, || Err::<u64, _>("no load")), Ok(7));
        clock.advance(BACKOFF + Duration::from_secs(1));
        let before = cache.stats().coalesced;
        let caller = {
            let c = Arc::clone(&cache);
            common::start(move || {
                if asynchronous {
                    futures::executor::block_on(c.try_get_with_async(1, async { Ok::<_, &str>(9) }))
                } else {
                    c.try_get_with(1, || Ok::<_, &str>(9))
                }
            })
        };
        assert!(
            eventually(|| cache.stats().coalesced > before),
            "not joined"
        );
        go.store(true, SeqCst);
        compute.join().unwrap();
        let got = caller.wait(Duration::from_secs(10)).unwrap().unwrap();
        assert!(
            matches!(got, Ok(20) | Ok(9)),
            "async {asynchronous}: got {got:?} past the deadline while a computation ran"
        );
        assert_eq!(unbalanced(&cache.stats()), None);
        cache.validate();
    }
}

/// Fix (3): a `load_with_timeout` that joined a computation (past the retry deadline) and
/// timed out gets the old value (a soft timeout is a failure), but a computation is no load:
/// "A soft timeout sets the retry deadline only while a load of the key still runs". After
/// the computation ends with `Nop`, the next caller must load.
#[test]
fn a_timed_out_wait_for_a_computation_sets_no_retry_deadline() {
    let _dog = watchdog(Duration::from_secs(60), "timed out on a computation");
    let clock = ManualClock::new();
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    let cache = Arc::new(
        builder(&clock)
            .loader(move |_k: &u32| {
                counted.fetch_add(1, SeqCst);
                Ok::<u64, BoxError>(9)
            })
            .build(),
    );
    cache.insert(1, 7);
    clock.advance(past_ttl());
    assert_eq!(
        cache.try_get_with(1, || Err::<u64, _>("injected: down")),
        Ok(7)
    );
    clock.advance(BACKOFF + Duration::from_secs(1));
    let go = flag();
    let compute = held_computation(&cache, &go, || Op::Nop);
    let got = cache.load_with_timeout(1, Some(Duration::from_millis(200)));
    assert_eq!(
        got.map_err(|e| e.to_string()),
        Ok(7),
        "the timed-out caller falls back"
    );
    go.store(true, SeqCst);
    compute.join().unwrap();
    let next = cache.load_with_timeout(1, None).map_err(|e| e.to_string());
    assert_eq!(
        (next, loads.load(SeqCst)),
        (Ok(9), 1),
        "after a timed-out wait for a computation (no load ran), the next caller got the old \
         value with no load"
    );
    assert_eq!(unbalanced(&cache.stats()), None);
}

fn poll_once<F: std::future::Future>(f: &mut std::pin::Pin<Box<F>>) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
    f.as_mut().poll(&mut cx)
}

/// A shared async load of stale key 1 (its owner A polled it once) is driven by a waiter B and
/// panics there: a failed load, the backoff starts. Past the backoff, A is polled again: it
/// has no `init` left and no load runs. Fail-safe: "The first caller after it (decided under
/// the shard's write lock) sets the next retry deadline and loads" — a caller that cannot load
/// must not set it; and "every caller of that load gets the old value instead of the error".
/// Checked: A's answer, and that the next caller (past the first backoff) loads.
#[test]
fn a_shared_load_owner_that_cannot_lead_does_not_push_the_retry_deadline() {
    let _dog = watchdog(Duration::from_secs(60), "lost shared load owner");
    quiet_injected_panics();
    let clock = ManualClock::new();
    let cache = Arc::new(builder(&clock).build());
    cache.insert(1, 7);
    clock.advance(past_ttl()); // 7 stale
    let mut a = Box::pin(cache.get_with_async_shared(1, async {
        common::Yield(1).await;
        panic!("injected: shared init panics")
    }));
    assert!(
        poll_once(&mut a).is_pending(),
        "A leads and starts its init"
    );
    let mut b = Box::pin(cache.get_with_async_shared(1, async { 99 }));
    let mut b_result = None;
    for _ in 0..10 {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(&mut b))) {
            Ok(std::task::Poll::Pending) => continue,
            r => {
                b_result = Some(r.map(|p| match p {
                    std::task::Poll::Ready(v) => v,
                    std::task::Poll::Pending => unreachable!(),
                }));
                break;
            }
        }
    }
    let b_result = b_result.expect("B finished");
    drop(b);
    // The failed load started the backoff: a caller gets 7 at once.
    assert_eq!(
        cache.try_get_with(1, || Err::<u64, _>("no load within the backoff")),
        Ok(7)
    );
    clock.advance(BACKOFF + Duration::from_secs(1)); // the backoff is over
    let a_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..10 {
            if let std::task::Poll::Ready(v) = poll_once(&mut a) {
                return Some(v);
            }
        }
        None
    }));
    drop(a);
    let loads = AtomicUsize::new(0);
    let next = cache.try_get_with(1, || {
        loads.fetch_add(1, SeqCst);
        Ok::<_, &str>(9)
    });
    cache.validate();
    let a_desc = match &a_result {
        Ok(v) => format!("{v:?}"),
        Err(p) => format!(
            "panic: {}",
            common::panic_message(&**p).replace("injected", "planted")
        ),
    };
    let u = unbalanced(&cache.stats());
    let b_desc = match &b_result {
        Ok(v) => format!("{v:?}"),
        Err(p) => format!(
            "panic: {}",
            common::panic_message(&**p).replace("injected", "planted")
        ),
    };
    assert_eq!(
        (next, loads.load(SeqCst)),
        (Ok(9), 1),
        "past the backoff, A (no init left: {a_desc}) claimed the retry without loading; the \
         next caller got the old value with no load for another backoff (B: {b_desc}; \
         statistics: {u:?})"
    );
    assert_eq!(unbalanced(&cache.stats()), None);
}

/// An `Expiry` whose reads extend an entry by a long time.
struct ReadsExtend(Arc<AtomicUsize>);

impl herdcache::Expiry<u32, u64> for ReadsExtend {
    fn expire_after_create(&self, _k: &u32, _v: &u64) -> Option<Duration> {
        Some(TTL)
    }
    fn expire_after_read(&self, _k: &u32, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
        self.0.fetch_add(1, SeqCst);
        Some(Duration::from_secs(1000))
    }
}

/// "Reads (`get`, `contains_key`, iteration) never see it: it is expired." A fail-safe
/// answer (the failed load's fallback, an answer within the backoff, `get_or_stale`) is no
/// read of a live entry: with time to idle or an `Expiry` whose reads extend the entry, it
/// must not make the expired value live again.
#[test]
fn fail_safe_answers_do_not_revive_an_idle_or_expiry_entry() {
    let _dog = watchdog(Duration::from_secs(60), "no revival");
    let mut wrong = Vec::new();
    for case in ["tti", "expiry"] {
        let clock = ManualClock::new();
        let reads = Arc::new(AtomicUsize::new(0));
        let b = Cache::builder()
            .max_capacity(100)
            .fail_safe(MAX_STALE)
            .refresh_backoff(BACKOFF)
            .record_stats()
            .clock(clock.clone());
        let cache: Cache<u32, u64> = match case {
            "tti" => b.time_to_idle(TTL).build(),
            _ => b.expire_after(ReadsExtend(Arc::clone(&reads))).build(),
        };
        cache.insert(1, 7);
        clock.advance(past_ttl());
        let r1 = cache.try_get_with(1, || Err::<u64, _>("injected: down"));
        let r2 = cache.try_get_with(1, || Err::<u64, _>("injected: down"));
        if let Some(u) = unbalanced(&cache.stats()) {
            wrong.push(format!("{case}: {u}"));
        }
        let r3 = cache.get_or_stale(&1);
        if (r1.clone(), r2.clone(), r3) != (Ok(7), Ok(7), Some(7)) {
            wrong.push(format!("{case}: fail-safe answers {r1:?} {r2:?} {r3:?}"));
        }
        clock.advance(Duration::from_secs(1));
        let (g, c) = (cache.get(&1), cache.contains_key(&1));
        let it: Vec<_> = cache.iter().collect();
        if g.is_some() || c || !it.is_empty() {
            wrong.push(format!(
                "{case}: the expired value is live again after fail-safe answers: get {g:?}, \
                 contains {c}, iter {it:?} ({} expire_after_read calls)",
                reads.load(SeqCst)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}",
        wrong.join("\n").replace("injected", "planted")
    );
}

/// The stale window ends while the failing load runs (its loader moves the clock past
/// `deadline + max_stale`): "Never beyond `max_stale`: ... a failure is an error again" —
/// for the leader and for a caller that joined it.
#[test]
fn a_load_failing_after_the_stale_window_closed_is_an_error_for_all_its_callers() {
    let _dog = watchdog(Duration::from_secs(60), "window closes during load");
    let clock = ManualClock::new();
    let cache = Arc::new(builder(&clock).build());
    cache.insert(1, 7);
    clock.advance(past_ttl());
    let (started, go) = (flag(), flag());
    let leader = {
        let (c, clock, started, go) = (
            Arc::clone(&cache),
            clock.clone(),
            Arc::clone(&started),
            Arc::clone(&go),
        );
        std::thread::spawn(move || {
            c.try_get_with(1, || {
                started.store(true, SeqCst);
                spin_until(&go);
                clock.advance(MAX_STALE); // past deadline + max_stale
                Err::<u64, _>("injected: down")
            })
        })
    };
    spin_until(&started);
    let before = cache.stats().coalesced;
    let joiner = {
        let c = Arc::clone(&cache);
        common::start(move || c.try_get_with(1, || Ok::<u64, &str>(99)))
    };
    assert!(
        eventually(|| cache.stats().coalesced > before),
        "not joined"
    );
    go.store(true, SeqCst);
    let l = leader.join().unwrap();
    let j = joiner.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(l.is_err(), "the leader got {l:?} past max_stale");
    assert!(
        matches!(j, Err(_) | Ok(99)),
        "the joiner got {j:?} past max_stale"
    );
    assert_eq!(unbalanced(&cache.stats()), None);
    assert_eq!(
        cache.get_or_stale(&1),
        if j == Ok(99) { Some(99) } else { None }
    );
}

/// Fix (1) through a load taken over under `max_concurrent_loads(1)`: leader L of stale key 1
/// waits for the only permit, held by a load of key 2 whose `init` asks for key 1 and takes
/// L's load over; the taker's `init` inserts 8 (the write wins over the load), lets 8 expire
/// and fails. Its callers (the taker and L) get the failure, and the next caller loads: "A
/// load that a write or invalidation of the key won over ... falls back on nothing when it
/// fails: its callers get the failure, and the value that write stored is put in no backoff".
#[test]
fn a_taken_over_load_that_lost_to_a_write_falls_back_on_nothing() {
    let _dog = watchdog(Duration::from_secs(60), "taken over, superseded");
    let clock = ManualClock::new();
    let cache = Arc::new(builder(&clock).max_concurrent_loads(1).build());
    cache.insert(1, 7);
    clock.advance(past_ttl());
    let (started, go) = (flag(), flag());
    let outer = {
        let (c, clock, started, go) = (
            Arc::clone(&cache),
            clock.clone(),
            Arc::clone(&started),
            Arc::clone(&go),
        );
        std::thread::spawn(move || {
            let mut nested = None;
            let v = c.get_with(2, || {
                started.store(true, SeqCst);
                spin_until(&go);
                nested = Some(c.try_get_with(1, || {
                    c.insert(1, 8);
                    clock.advance(past_ttl());
                    Err::<u64, &str>("backend down")
                }));
                5
            });
            (v, nested.unwrap())
        })
    };
    spin_until(&started);
    let waited = cache.stats().loads_waited_for_limit;
    let leader = {
        let c = Arc::clone(&cache);
        common::start(move || c.try_get_with(1, || Ok::<u64, &str>(99)))
    };
    assert!(
        eventually(|| cache.stats().loads_waited_for_limit > waited),
        "L did not wait for the permit"
    );
    go.store(true, SeqCst);
    let (v, nested) = outer.join().unwrap();
    let l = leader.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(v, 5);
    let loads = AtomicUsize::new(0);
    let next = cache.try_get_with(1, || {
        loads.fetch_add(1, SeqCst);
        Ok::<u64, &str>(9)
    });
    cache.validate();
    assert!(
        nested.is_err() && !matches!(l, Ok(8) | Ok(7)),
        "the superseded taken-over load's callers fell back: taker {nested:?}, leader {l:?}"
    );
    assert_eq!(
        (next, loads.load(SeqCst)),
        (Ok(9), 1),
        "8 was put in the backoff by a load that lost to the write storing it"
    );
    assert_eq!(unbalanced(&cache.stats()), None);
}
