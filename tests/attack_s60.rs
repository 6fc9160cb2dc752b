#![cfg(not(any(loom, shuttle)))]
//! Round 60 (outside, public API only): "a decision acted on later" around single-flight
//! loads, refreshes, expiry and fail-safe.
//!
//! Found (fixed in the same change):
//! - **A failed load that lost to a write put the written value in fail-safe's backoff.** Key 1
//!   holds an expired value (within its stale window); a load of it runs; an `insert(1, 8)`
//!   wins over that load (detaches its flight) and 8 expires in turn; the load fails. It fell
//!   back on whatever stale value the key held — 8 — answered its leader with it and set 8's
//!   retry deadline: the next caller got 8 at once, with no load, though no load of 8 ever
//!   failed. Every entry point that falls back (the `try_get_with`, `load` and entry families,
//!   blocking and async, a panicking loader, `get_all` leaving the key out), a refresh that
//!   lost to a write, and a `load_with_timeout` whose wait for such a load timed out. Now the
//!   fallback checks, under the lock that reads the old value, that the failed load's flight
//!   is still registered (a timed-out caller, which holds none: that a load of the key still
//!   runs before setting a deadline).
//! - **Past the retry deadline a computation counted as a retry.** "Until the retry deadline,
//!   and while a retry runs" the old value answers at once; the check was "a flight of the key
//!   is registered", true of a computation (`and_compute_with`) too, which loads nothing: a
//!   caller past the deadline got the old value instead of waiting for the computation and
//!   taking its value. A computation's flight is now marked as one.
//!
//! Probed and held: a caller joining a refresh after the entry expired gets the refresh's
//! outcome (with and without fail-safe, refresh failing or not); a refresh waiting for the only
//! load permit taken over by a nested load after expiry.

mod common;

use common::{eventually, quiet_injected_panics, watchdog};
use herdcache::{BoxError, Cache, CacheStats, ManualClock};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(10);

/// "Each miss of a loading call ... is also counted as exactly one of: a load ..., a join
/// (`coalesced`) or a negative hit": `None` if the statistics say so, else what is off.
fn unbalanced(s: &CacheStats) -> Option<String> {
    // "less the refreshes (which load without a miss: `refreshes_started`)".
    let counted =
        (s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits)
            .saturating_sub(s.refreshes_started);
    (s.misses != counted).then(|| format!("misses {} != {counted} counted: {s:?}", s.misses))
}

fn fail_safe_cache(clock: &ManualClock) -> Arc<Cache<u32, u64>> {
    Arc::new(
        Cache::builder()
            .max_capacity(100)
            .time_to_live(TTL)
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .record_stats()
            .clock(clock.clone())
            .build(),
    )
}

/// A load of an expired key (fail-safe) is superseded by an `insert` of the key while it
/// runs; the inserted value then expires too; the superseded load fails. The load's failure
/// is not a failure of the *new* value's load: "Until a load of the expired key fails, it is
/// loaded as usual (single-flight, the new value replaces the old one)", and "Writes win: an
/// `insert` or `invalidate` replaces or removes the old entry, so a load that fails afterwards
/// has nothing to fall back on". A caller that begins afterwards must load.
#[test]
fn a_superseded_failed_try_get_with_does_not_put_the_new_value_into_fail_safe_backoff() {
    let _dog = watchdog(Duration::from_secs(60), "superseded failed load");
    let clock = ManualClock::new();
    let cache = fail_safe_cache(&clock);
    cache.insert(1, 7);
    clock.advance(TTL + Duration::from_secs(1)); // 7 expired, within its stale window
    let leader = cache.try_get_with(1, || {
        // The write wins over this load; then the written value expires in turn.
        cache.insert(1, 8);
        clock.advance(TTL + Duration::from_secs(1));
        Err::<u64, _>("injected: backend down")
    });
    assert_eq!(
        leader.map_err(|e| *e),
        Err("injected: backend down"),
        "the load lost to the insert: its failure has nothing to fall back on"
    );
    // No load of key 1 has failed since 8 was written: the next caller loads.
    let loads = AtomicUsize::new(0);
    let got = cache.try_get_with(1, || {
        loads.fetch_add(1, SeqCst);
        Ok::<_, &str>(9)
    });
    cache.validate();
    assert_eq!(
        (got, loads.load(SeqCst)),
        (Ok(9), 1),
        "a caller that began after the insert (whose value expired, and no load of it failed) \
         got the stale value with no load: the superseded load's failure put it in backoff"
    );
    assert_eq!(unbalanced(&cache.stats()), None);
}

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

/// A cache with refresh-ahead on a spawner that parks its jobs (run by the test), a loader
/// that fails while `down` is set and otherwise answers `next`.
fn refreshing_cache(
    clock: &ManualClock,
    fail_safe: bool,
    down: Arc<std::sync::atomic::AtomicBool>,
    next: Arc<std::sync::atomic::AtomicU64>,
) -> (Arc<Cache<u32, u64>>, Jobs) {
    let jobs: Jobs = Arc::default();
    let parked = Arc::clone(&jobs);
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(TTL)
        .refresh_after(Duration::from_secs(5))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |_k: &u32| {
            if down.load(SeqCst) {
                Err(BoxError::from("injected: backend down"))
            } else {
                Ok(next.load(SeqCst))
            }
        })
        .spawner(move |job| parked.lock().unwrap().push(job));
    if fail_safe {
        b = b.fail_safe(Duration::from_secs(600));
    }
    (Arc::new(b.build()), jobs)
}

fn run_jobs(jobs: &Jobs) -> usize {
    let taken: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let n = taken.len();
    for j in taken {
        j();
    }
    n
}

/// The refresh twin of the test above: a refresh claimed on value 7 is superseded by
/// `invalidate` + `insert(8)` before its job runs; 8 expires; the job's loader fails. The
/// refresh lost to the write ("A refresh a read decided registers only if the entry is still
/// the one claimed: a write or invalidation of the key in between wins"), and no load of 8
/// failed: the next `load` must call the (now healthy) loader.
#[test]
fn a_superseded_failed_refresh_does_not_put_the_new_value_into_fail_safe_backoff() {
    let _dog = watchdog(Duration::from_secs(60), "superseded failed refresh");
    let clock = ManualClock::new();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(7));
    let (cache, jobs) = refreshing_cache(&clock, true, Arc::clone(&down), Arc::clone(&next));
    assert_eq!(cache.load(1).unwrap(), 7);
    clock.advance(Duration::from_secs(6)); // due for refresh, still live
    assert_eq!(cache.get(&1), Some(7)); // claims the refresh; its job is parked
    assert_eq!(jobs.lock().unwrap().len(), 1, "one refresh job parked");
    cache.invalidate(&1);
    cache.insert(1, 8);
    clock.advance(TTL + Duration::from_secs(1)); // 8 expired, within its stale window
    down.store(true, SeqCst);
    run_jobs(&jobs); // the superseded refresh fails
    down.store(false, SeqCst);
    next.store(9, SeqCst);
    let got = cache.load(1).map_err(|e| e.to_string());
    cache.validate();
    assert_eq!(
        got,
        Ok(9),
        "a load after a superseded refresh failed got the inserted value, expired, with no \
         load: the refresh that lost to the insert put the new value in fail-safe backoff"
    );
    assert_eq!(unbalanced(&cache.stats()), None);
}

/// How the superseded load fails, through each entry point that falls back on fail-safe.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fail {
    TryGetWith,
    TryGetWithAsync,
    OrTryInsertWith,
    LoadError,
    LoadPanic,
    LoadAsyncError,
    GetAllLeftOut,
}

/// The sweep behind `a_superseded_failed_try_get_with_...`: every loading entry point whose
/// failure falls back on fail-safe. Key 1's expired value 7 is loaded; during the load an
/// `insert(1, 8)` supersedes it ("A write ... of `key` during the load wins") and 8 expires;
/// the load then fails. A caller that begins afterwards must load (no load of 8 failed).
#[test]
fn a_superseded_failed_load_never_puts_the_written_value_into_backoff_any_entry_point() {
    let _dog = watchdog(Duration::from_secs(60), "superseded failed load sweep");
    quiet_injected_panics();
    let mut wrong = Vec::new();
    for how in [
        Fail::TryGetWith,
        Fail::TryGetWithAsync,
        Fail::OrTryInsertWith,
        Fail::LoadError,
        Fail::LoadPanic,
        Fail::LoadAsyncError,
        Fail::GetAllLeftOut,
    ] {
        let clock = ManualClock::new();
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<Cache<u32, u64>>>> = Arc::default();
        // Supersedes the running load of key 1, then lets the written value expire.
        let supersede = {
            let (slot, clock) = (Arc::clone(&slot), clock.clone());
            move || {
                let c = slot.get().unwrap().upgrade().unwrap();
                c.insert(1, 8);
                clock.advance(TTL + Duration::from_secs(1));
            }
        };
        let (s1, s2) = (supersede.clone(), supersede.clone());
        let cache = Arc::new(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(TTL)
                .fail_safe(Duration::from_secs(600))
                .refresh_backoff(Duration::from_secs(5))
                .record_stats()
                .clock(clock.clone())
                .loader(move |_k: &u32| -> Result<u64, BoxError> {
                    s1();
                    if how == Fail::LoadPanic {
                        panic!("injected: loader panics");
                    }
                    Err(BoxError::from("injected: backend down"))
                })
                .async_loader(move |_k: &u32| {
                    s2();
                    async { Err::<u64, BoxError>(BoxError::from("injected: backend down")) }
                })
                .build(),
        );
        slot.set(Arc::downgrade(&cache)).unwrap();
        cache.insert(1, 7);
        clock.advance(TTL + Duration::from_secs(1)); // 7 expired, within its stale window
        let fail = || {
            supersede();
            Err::<u64, &str>("injected: backend down")
        };
        let leader = match how {
            Fail::TryGetWith => format!("{:?}", cache.try_get_with(1, fail)),
            Fail::TryGetWithAsync => format!(
                "{:?}",
                futures::executor::block_on(cache.try_get_with_async(1, async { fail() }))
            ),
            Fail::OrTryInsertWith => format!(
                "{:?}",
                cache
                    .entry(1)
                    .or_try_insert_with(fail)
                    .map(|e| e.into_value())
            ),
            Fail::LoadError | Fail::LoadPanic => format!("{:?}", cache.load(1)),
            Fail::LoadAsyncError => {
                format!("{:?}", futures::executor::block_on(cache.load_async(1)))
            }
            Fail::GetAllLeftOut => format!(
                "{:?}",
                cache.get_all([1], |_| {
                    supersede();
                    std::collections::HashMap::new()
                })
            ),
        };
        // "a load that fails afterwards has nothing to fall back on": its leader gets its
        // failure (`get_all`: the key left out).
        if !(leader.starts_with("Err") || leader == "{}") {
            wrong.push(format!(
                "{how:?}: the superseded leader got {leader}, not its failure"
            ));
        }
        let loads = AtomicUsize::new(0);
        let got = cache.try_get_with(1, || {
            loads.fetch_add(1, SeqCst);
            Ok::<_, &str>(9)
        });
        cache.validate();
        if (got.clone(), loads.load(SeqCst)) != (Ok(9), 1) {
            wrong.push(format!(
                "{how:?} (the superseded leader got {leader}): the next caller got {got:?} \
                 with {} loads, not a load of its own",
                loads.load(SeqCst)
            ));
        }
        if let Some(u) = unbalanced(&cache.stats()) {
            wrong.push(format!("{how:?}: {u}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Held (probe): a refresh parked on the spawner while its entry expires; a `get_with` caller
/// that begins after the deadline joins the refresh (single-flight) and, by outcome: gets the
/// refreshed value; or, the refresh failing without fail-safe, loads itself; or, with
/// fail-safe, gets the last value ("callers that joined the refresh (the entry expired
/// meanwhile) get ... with fail-safe, the old value"). Statistics balance in every case.
#[test]
fn a_caller_joining_a_refresh_after_expiry_gets_its_outcome() {
    let _dog = watchdog(Duration::from_secs(60), "join a refresh after expiry");
    quiet_injected_panics();
    let mut wrong = Vec::new();
    for (fail_safe, fails) in [(false, false), (false, true), (true, false), (true, true)] {
        let clock = ManualClock::new();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let next = Arc::new(std::sync::atomic::AtomicU64::new(7));
        let (cache, jobs) =
            refreshing_cache(&clock, fail_safe, Arc::clone(&down), Arc::clone(&next));
        assert_eq!(cache.load(1).unwrap(), 7);
        clock.advance(Duration::from_secs(6));
        assert_eq!(cache.get(&1), Some(7)); // the refresh is claimed, its job parked
        clock.advance(TTL); // 7 expired
        next.store(8, SeqCst);
        down.store(fails, SeqCst);
        let before = cache.stats().coalesced;
        let inits = Arc::new(AtomicUsize::new(0));
        let joiner = {
            let (c, inits) = (Arc::clone(&cache), Arc::clone(&inits));
            std::thread::spawn(move || {
                c.get_with(1, || {
                    inits.fetch_add(1, SeqCst);
                    99
                })
            })
        };
        assert!(
            eventually(|| cache.stats().coalesced > before),
            "the caller did not join the refresh"
        );
        run_jobs(&jobs);
        let got = joiner.join().unwrap();
        let expected = match (fail_safe, fails) {
            (_, false) => 8,
            (false, true) => 99,
            (true, true) => 7,
        };
        let case = format!("fail_safe {fail_safe}, refresh fails {fails}");
        if got != expected {
            wrong.push(format!("{case}: the joiner got {got}, expected {expected}"));
        }
        if let Some(u) = unbalanced(&cache.stats()) {
            wrong.push(format!("{case}: {u}"));
        }
        cache.validate();
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A refresh parked on the spawner waiting for the only `max_concurrent_loads` permit, held by
/// a load of key 2 whose loader, once key 1 expired, asks for key 1: it joins the refresh and
/// takes it over ("a nested load ... takes over a load of its key whose leader still waits for
/// a permit"). Checked: one value, stored; the refresh counted as failed ("taken over by a
/// nested load"); the statistics balance as `CacheStats::misses` says ("less the refreshes
/// (which load without a miss: `refreshes_started`)").
#[test]
fn a_refresh_waiting_for_a_permit_taken_over_by_a_nested_load_after_expiry() {
    let _dog = watchdog(Duration::from_secs(60), "refresh taken over after expiry");
    let clock = ManualClock::new();
    let threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let spawned = Arc::clone(&threads);
    let cache: Arc<Cache<u32, u64>> = Arc::new(
        Cache::builder()
            .max_capacity(100)
            .time_to_live(TTL)
            .refresh_after(Duration::from_secs(5))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .loader(|k: &u32| Ok::<_, BoxError>(u64::from(*k) * 100))
            .spawner(move |job| spawned.lock().unwrap().push(std::thread::spawn(job)))
            .build(),
    );
    assert_eq!(cache.load(1).unwrap(), 100);
    clock.advance(Duration::from_secs(6)); // key 1 due for refresh
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outer = {
        let (c, go, started) = (Arc::clone(&cache), Arc::clone(&go), Arc::clone(&started));
        std::thread::spawn(move || {
            let mut inner = 0;
            let v = c.get_with(2, || {
                started.store(true, SeqCst);
                while !go.load(SeqCst) {
                    std::thread::yield_now();
                }
                inner = c.get_with(1, || 42);
                5
            });
            (v, inner)
        })
    };
    assert!(
        eventually(|| started.load(SeqCst)),
        "the outer load did not start"
    );
    let waited = cache.stats().loads_waited_for_limit;
    assert_eq!(cache.get(&1), Some(100)); // claims the refresh: its job waits for the permit
    assert!(
        eventually(|| cache.stats().loads_waited_for_limit > waited),
        "the refresh job did not wait for the permit"
    );
    clock.advance(TTL); // key 1 expired
    go.store(true, SeqCst);
    let (v, inner) = outer.join().unwrap();
    for t in std::mem::take(&mut *threads.lock().unwrap()) {
        t.join().unwrap();
    }
    let s = cache.stats();
    cache.validate();
    assert_eq!((v, inner), (5, 42), "the nested caller ran its own init");
    assert_eq!(cache.get(&1), Some(42));
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "every refresh started ends as one or the other: {s:?}"
    );
    assert_eq!(unbalanced(&s), None);
}

/// Fail-safe answers a caller with the last value "until the retry deadline, and while a
/// retry runs"; past the deadline "the first caller after it ... sets the next retry deadline
/// and loads". A *computation* of the key (`and_compute_with`) is no retry: "callers loading
/// the key while `f` runs wait for it and take its value". Key 1's load failed (backoff
/// started), the backoff is over, a computation that will `Put(20)` runs: a `try_get_with`
/// that begins now must wait and take 20 (or load, as the retrier) — never the old value 7,
/// answered at once as if a retry were running.
#[test]
fn past_the_retry_deadline_a_running_computation_is_no_retry_for_fail_safe() {
    let _dog = watchdog(Duration::from_secs(60), "computation is no retry");
    let clock = ManualClock::new();
    let cache = fail_safe_cache(&clock);
    cache.insert(1, 7);
    clock.advance(TTL + Duration::from_secs(1));
    // A failed load: the old value answers, the retry deadline is 5 s ahead.
    assert_eq!(
        cache.try_get_with(1, || Err::<u64, _>("injected: down")),
        Ok(7)
    );
    clock.advance(Duration::from_secs(6)); // past the retry deadline
    let (go, started) = (
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let compute = {
        let (c, go, started) = (Arc::clone(&cache), Arc::clone(&go), Arc::clone(&started));
        std::thread::spawn(move || {
            c.entry(1).and_compute_with(|e| {
                assert!(e.is_none(), "the expired entry is absent to a computation");
                started.store(true, SeqCst);
                while !go.load(SeqCst) {
                    std::thread::yield_now();
                }
                herdcache::Op::Put(20)
            });
        })
    };
    assert!(
        eventually(|| started.load(SeqCst)),
        "the computation did not start"
    );
    let loads = Arc::new(AtomicUsize::new(0));
    let before = cache.stats().coalesced;
    let caller = {
        let (c, loads) = (Arc::clone(&cache), Arc::clone(&loads));
        common::start(move || {
            c.try_get_with(1, || {
                loads.fetch_add(1, SeqCst);
                Ok::<_, &str>(9)
            })
        })
    };
    // The caller's miss is settled (a join of the computation; or, wrongly, a fail-safe
    // answer, also counted as coalesced) before the computation is released.
    assert!(
        eventually(|| cache.stats().coalesced > before),
        "the caller neither joined the computation nor was answered"
    );
    go.store(true, SeqCst);
    compute.join().unwrap();
    let got = caller
        .wait(Duration::from_secs(10))
        .expect("the caller returned")
        .expect("no panic");
    assert!(
        matches!(got, Ok(20) | Ok(9)),
        "a caller past the retry deadline got {got:?} (the old value is 7) while a computation \
         (no retry) of the key ran ({} loads)",
        loads.load(SeqCst)
    );
    assert_eq!(unbalanced(&cache.stats()), None);
}

/// The soft-timeout twin: a `load_with_timeout` of an expired key (fail-safe) waits for its
/// spawned job (parked); meanwhile an `insert` of the key wins over that load and the inserted
/// value expires in turn; the caller times out. It may answer with the last value (8), but
/// 8 was loaded by no failed load: the next caller loads.
#[test]
fn a_timed_out_wait_for_a_superseded_load_puts_the_new_value_in_no_backoff() {
    let _dog = watchdog(Duration::from_secs(60), "timed out superseded load");
    let clock = ManualClock::new();
    let jobs: Jobs = Arc::default();
    let parked = Arc::clone(&jobs);
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    let cache: Arc<Cache<u32, u64>> = Arc::new(
        Cache::builder()
            .max_capacity(100)
            .time_to_live(TTL)
            .fail_safe(Duration::from_secs(600))
            .refresh_backoff(Duration::from_secs(5))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u32| {
                counted.fetch_add(1, SeqCst);
                Ok::<u64, BoxError>(9)
            })
            .spawner(move |job| parked.lock().unwrap().push(job))
            .build(),
    );
    cache.insert(1, 7);
    clock.advance(TTL + Duration::from_secs(1)); // 7 expired, within its stale window
    let writer = {
        let (cache, clock, jobs) = (Arc::clone(&cache), clock.clone(), Arc::clone(&jobs));
        std::thread::spawn(move || {
            eventually(|| !jobs.lock().unwrap().is_empty()); // the load's job is parked
            cache.insert(1, 8); // wins over the parked load
            clock.advance(TTL + Duration::from_secs(1)); // 8 expired, within its stale window
        })
    };
    let got = cache.load_with_timeout(1, Some(Duration::from_millis(300)));
    writer.join().unwrap();
    assert!(matches!(got, Ok(8) | Err(_)), "{got:?}");
    let next = cache.load_with_timeout(1, None);
    // (A parked job may be run inline by the leader if the spawner dropped it: not here.)
    assert_eq!(
        (next.map_err(|e| e.to_string()), loads.load(SeqCst)),
        (Ok(9), 1),
        "a caller that began after 8 expired got it with no load: the timed-out wait for a \
         load that lost to the write put 8 in backoff"
    );
    run_jobs(&jobs); // the superseded job: loads, stores nothing
    cache.validate();
}
