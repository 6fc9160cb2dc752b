//! Round 84 of the outside attacks (a helper given the public API only): fail-safe around
//! writes, failing loads, soft timeouts and permit waits; single flight under faults after the
//! loader returned; health and sizing on odd configurations. 58 tests; three failed:
//!
//! * `or_insert_during_the_backoff_inserts_its_value`: during a failed load's retry backoff,
//!   `or_insert(v)` (and `or_default`, and their async twins) went through `get_with`, so
//!   fail-safe answered it with the expired value and stored nothing. A value in hand is no
//!   load: an expired entry is now absent to them, and the value is stored (`entry.rs`,
//!   `or_insert_value`).
//! * `one_retry_per_backoff_at_the_end_of_the_clock`: a clock advanced by `Duration::MAX`
//!   saturated at `NEVER - 1`, where a retry deadline is clamped (below the `STALE_FORGONE`
//!   sentinel): the deadline was always reached, and every caller retried the load with no
//!   time passing. The clock now stops at `clock::END` (`NEVER - 2`), below every sentinel
//!   deadline.
//! * `init_panic_with_two_waiters_counts_each_stale_answer` (was `..._counts_one_...`): a
//!   `get_with` init's panic ends its load abandoned, and each waiter, claiming again, was
//!   answered and counted by itself, where the statistics' docs said the waiters of one failed
//!   load count once. That is how such a load ends (its panic goes to its own caller, not to
//!   the waiters); the docs now say so, and the test checks the documented count.
#![allow(clippy::type_complexity)]

mod common;

use herdcache::{BoxError, Cache, CompResult, Expiry, LoadError, ManualClock, Op};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Aborts the process if not dropped within 30 s: a hang fails the run instead of hanging it.
fn watchdog(what: &'static str) -> common::Watchdog {
    common::watchdog(secs(30), what)
}

type Step = Box<dyn FnOnce() -> Result<u64, BoxError> + Send>;

/// A scripted backend: each loader call pops a step (default: fails), counts the call, and
/// reports it on `entered`.
#[derive(Clone)]
struct Backend {
    steps: Arc<Mutex<VecDeque<Step>>>,
    calls: Arc<AtomicU64>,
    entered: Arc<Mutex<mpsc::Sender<u64>>>,
}

impl Backend {
    fn new() -> (Self, mpsc::Receiver<u64>) {
        let (tx, rx) = mpsc::channel();
        (
            Backend {
                steps: Arc::default(),
                calls: Arc::default(),
                entered: Arc::new(Mutex::new(tx)),
            },
            rx,
        )
    }
    fn push(&self, s: impl FnOnce() -> Result<u64, BoxError> + Send + 'static) {
        self.steps.lock().unwrap().push_back(Box::new(s));
    }
    fn ok(&self, v: u64) {
        self.push(move || Ok(v));
    }
    /// A step that blocks until the returned sender sends its result.
    fn blocked(&self) -> mpsc::Sender<Result<u64, BoxError>> {
        let (tx, rx) = mpsc::channel::<Result<u64, BoxError>>();
        self.push(move || {
            rx.recv_timeout(secs(30))
                .unwrap_or_else(|_| Err(BoxError::from("released by timeout")))
        });
        tx
    }
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    fn call(&self, k: u64) -> Result<u64, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let step = self.steps.lock().unwrap().pop_front();
        let _ = self.entered.lock().unwrap().send(k);
        match step {
            Some(s) => s(),
            None => Err(BoxError::from("backend down")),
        }
    }
}

fn builder(clock: &ManualClock, b: &Backend) -> herdcache::CacheBuilder<u64, u64> {
    let b = b.clone();
    Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(1000))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| b.call(*k))
}

fn wait_for(rx: &mpsc::Receiver<u64>) -> u64 {
    rx.recv_timeout(secs(30))
        .expect("the loader was not entered")
}

/// Polls `cond` (public figures only) until it holds, or fails after 30 s.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < secs(30), "never happened: {what}");
        std::thread::yield_now();
    }
}

/// The writes that replace a key's value, by name.
fn write(cache: &Cache<u64, u64>, how: &str, k: u64, v: u64) {
    match how {
        "insert" => cache.insert(k, v),
        "compute_put" => {
            let r = cache.entry(k).and_compute_with(|_| Op::Put(v));
            assert!(
                !matches!(r, CompResult::StillNone(_) | CompResult::Unchanged(_)),
                "{how}"
            );
        }
        "upsert" => {
            cache.entry(k).and_upsert_with(|_| v);
        }
        "or_insert" => {
            let e = cache.entry(k).or_insert(v);
            assert_eq!(
                *e.value(),
                v,
                "{how}: or_insert over an expired entry stores its value"
            );
        }
        "get_with_unrelated_then_insert" => {
            cache.get_with(k + 1000, || 1);
            cache.insert(k, v);
        }
        _ => unreachable!(),
    }
}

const WRITES: [&str; 4] = [
    "insert",
    "compute_put",
    "upsert",
    "get_with_unrelated_then_insert",
];

/// fail_safe docs: "Until a load fails, the key behaves as without fail-safe: the first caller
/// after the deadline loads it" and "Writes win: an insert … replaces … the old entry". A value
/// written during the old value's retry backoff is a new entry whose own expiry has had no
/// failed load: its first caller after its deadline must load, not be answered stale from
/// the previous value's backoff.
#[test]
fn a_write_during_the_backoff_starts_a_fresh_entry_with_no_inherited_backoff() {
    let _w = watchdog("write during backoff");
    for how in WRITES {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let cache = builder(&clock, &b).build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(
            cache.load(1).unwrap(),
            100,
            "{how}: stale after a failed load"
        );
        assert_eq!(b.calls(), 1);
        clock.advance(secs(1)); // t = 62: within the 1000 s backoff
        write(&cache, how, 1, 200);
        assert_eq!(cache.get(&1), Some(200), "{how}: the write is live");
        clock.advance(secs(61)); // t = 123: 200 expired, the old backoff (to 1061) not over
        b.ok(300);
        let before = b.calls();
        let got = cache.load(1);
        assert_eq!(
            (got.ok(), b.calls() - before),
            (Some(300), 1),
            "{how}: the first caller after the written value's deadline must load it (no failed \
             load of it yet), not be answered from the older value's backoff"
        );
    }
}

/// Lib docs: "A write or invalidation of the key while it loads wins"; fail_safe: "A load that
/// a write or invalidation of the key won over (it began before them) falls back on nothing
/// when it fails: its callers get the failure, and the value that write stored is put in no
/// backoff." Here the written value has itself expired by the time the old load fails.
#[test]
fn a_failed_load_overtaken_by_a_write_puts_the_written_value_in_no_backoff() {
    let _w = watchdog("overtaken failing load");
    for how in ["insert", "get_with_unrelated_then_insert"] {
        let clock = ManualClock::new();
        let (b, rx) = Backend::new();
        let cache = builder(&clock, &b).build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let release = b.blocked();
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        wait_for(&rx);
        write(&cache, how, 1, 200);
        clock.advance(secs(61)); // 200 expired too
        release.send(Err("down".into())).unwrap();
        let r = leader.join().unwrap();
        assert!(
            !matches!(r, Ok(100)),
            "{how}: the overtaken load fell back on the value the write replaced: {r:?}"
        );
        b.ok(300);
        let before = b.calls();
        let got = cache.load(1);
        assert_eq!(
            (got.ok(), b.calls() - before),
            (Some(300), 1),
            "{how}: the written value (expired) must be in no backoff: the next caller loads"
        );
    }
}

/// The removals: after any of them during a failing load of the expired key, the old value
/// never comes back (fail_safe "Writes win"; retain "An entry keep removes is removed as by
/// invalidate: a load … in flight is superseded").
#[test]
fn removal_during_a_failing_load_never_lets_the_old_value_back() {
    let _w = watchdog("removal during failing load");
    for how in [
        "invalidate",
        "remove",
        "invalidate_all",
        "retain",
        "invalidate_entries_if",
    ] {
        let clock = ManualClock::new();
        let (b, rx) = Backend::new();
        let cache = builder(&clock, &b).build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let release = b.blocked();
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        wait_for(&rx);
        // A waiter on that load.
        let c = cache.clone();
        let waiter = std::thread::spawn(move || c.load(1));
        until("the waiter joined", || cache.stats().coalesced >= 1);
        match how {
            "invalidate" => cache.invalidate(&1),
            "remove" => {
                cache.remove(&1);
            }
            "invalidate_all" => cache.invalidate_all(),
            "retain" => cache.retain(|_, v| *v != 100),
            "invalidate_entries_if" => cache.invalidate_entries_if(|_, v| *v == 100).unwrap(),
            "compute_remove" => {
                // The closure sees nothing (expired): Op::Remove ends the stale value.
                let _ = cache.entry(1).and_compute_with(|_| Op::<u64>::Remove);
            }
            _ => unreachable!(),
        }
        release.send(Err("down".into())).unwrap();
        let (l, w) = (leader.join().unwrap(), waiter.join().unwrap());
        assert!(!matches!(l, Ok(100)), "{how}: leader got the removed value");
        assert!(!matches!(w, Ok(100)), "{how}: waiter got the removed value");
        for _ in 0..3 {
            let r = cache.load(1);
            assert!(
                !matches!(r, Ok(100)),
                "{how}: removed value came back: {r:?}"
            );
            assert_eq!(
                cache.get_or_stale(&1),
                None,
                "{how}: get_or_stale after removal"
            );
            clock.advance(secs(1001));
        }
    }
}

/// The same removals during the backoff (no load running): the next callers load and get the
/// backend's error, never the removed value.
#[test]
fn removal_during_the_backoff_never_lets_the_old_value_back() {
    let _w = watchdog("removal during backoff");
    for how in [
        "invalidate",
        "invalidate_all",
        "retain",
        "invalidate_entries_if",
        "compute_remove",
    ] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let cache = builder(&clock, &b).build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(cache.load(1).unwrap(), 100);
        match how {
            "invalidate" => cache.invalidate(&1),
            "invalidate_all" => cache.invalidate_all(),
            "retain" => cache.retain(|_, v| *v != 100),
            "invalidate_entries_if" => cache.invalidate_entries_if(|_, v| *v == 100).unwrap(),
            "compute_remove" => {
                let _ = cache.entry(1).and_compute_with(|_| Op::<u64>::Remove);
            }
            _ => unreachable!(),
        }
        let before = b.calls();
        let r = cache.load(1);
        assert!(
            r.is_err(),
            "{how}: removed value served during the backoff: {r:?}"
        );
        assert_eq!(b.calls() - before, 1, "{how}: the next caller loads");
        assert_eq!(cache.get_or_stale(&1), None, "{how}");
        let r = cache.get_with(1, || 5);
        assert_eq!(r, 5, "{how}");
    }
}

/// retain docs: an entry keep removes "is removed as by invalidate: a load or refresh of its
/// key in flight is superseded (its value goes to its callers, is not stored)". Applied to
/// the stale entry of a retry that then succeeds.
#[test]
fn retain_removing_a_stale_entry_supersedes_its_retry() {
    let _w = watchdog("retain supersedes retry");
    for how in ["retain", "invalidate_entries_if", "invalidate_all"] {
        let clock2 = ManualClock::new();
        let (b2, rx2) = Backend::new();
        let cache2 = builder(&clock2, &b2).refresh_backoff(secs(10)).build();
        cache2.insert(1, 100);
        clock2.advance(secs(61));
        assert_eq!(cache2.load(1).unwrap(), 100);
        clock2.advance(secs(11)); // retry due
        let _ = rx2.try_iter().count(); // the failed load's call
        let release = b2.blocked();
        let c = cache2.clone();
        let retrier = std::thread::spawn(move || c.load(1));
        wait_for(&rx2);
        assert_eq!(
            cache2.load(1).unwrap(),
            100,
            "{how}: stale while the retry runs"
        );
        match how {
            "retain" => cache2.retain(|_, v| *v != 100),
            "invalidate_entries_if" => cache2.invalidate_entries_if(|_, v| *v == 100).unwrap(),
            "invalidate_all" => cache2.invalidate_all(),
            _ => unreachable!(),
        }
        let r = cache2.load(1);
        assert!(
            !matches!(r, Ok(100)),
            "{how}: stale value after its removal: {r:?}"
        );
        release.send(Ok(555)).unwrap();
        assert_eq!(
            retrier.join().unwrap().unwrap(),
            555,
            "{how}: the retrier gets its value"
        );
        assert_ne!(
            cache2.get(&1),
            Some(555),
            "{how}: a retry superseded by the removal must not be stored"
        );
    }
}

/// CacheStats::stale_served_after_ttl: "The callers that waited on one load whose failure
/// answered them all count once; a call answered from the old value by itself counts on its
/// own: during the retry backoff". And misses == loads + coalesced + negative hits.
#[test]
fn stale_served_counts_once_per_failed_load_and_once_per_backoff_answer() {
    let _w = watchdog("stats");
    let clock = ManualClock::new();
    let (b, rx) = Backend::new();
    let cache = builder(&clock, &b).build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let release = b.blocked();
    let c = cache.clone();
    let leader = std::thread::spawn(move || c.load(1));
    wait_for(&rx);
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = cache.clone();
            std::thread::spawn(move || c.get_with(1, || 9))
        })
        .collect();
    until("3 waiters joined", || cache.stats().coalesced >= 3);
    release.send(Err("down".into())).unwrap();
    assert_eq!(leader.join().unwrap().unwrap(), 100);
    for w in waiters {
        assert_eq!(w.join().unwrap(), 100);
    }
    let s = cache.stats();
    assert_eq!(
        s.stale_served_after_ttl, 1,
        "one failed load answering 4 callers: {s:?}"
    );
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(cache.get_with(1, || 9), 100);
    let s = cache.stats();
    assert_eq!(
        s.stale_served_after_ttl, 3,
        "two backoff answers on their own: {s:?}"
    );
    assert_eq!(b.calls(), 1);
    assert_eq!(
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "misses balance: {s:?}"
    );
    assert_eq!(s.load_failures, 1, "{s:?}");
    assert!(cache
        .health()
        .warnings()
        .iter()
        .any(|w| w.kind() == "serving_stale"));
}

/// fail_safe: "Never beyond max_stale". With an Expiry whose expire_after_read extends a
/// read entry's life, answering a caller from the stale value is no read of a live entry: it
/// must not revive the entry (plain reads never see an expired value) nor push its stale
/// window past max_stale.
#[test]
fn stale_answers_do_not_run_expire_after_read_and_never_exceed_max_stale() {
    struct Extend;
    impl Expiry<u64, u64> for Extend {
        fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
            Some(secs(60))
        }
        fn expire_after_read(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
            Some(secs(500))
        }
    }
    let _w = watchdog("expiry");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let bb = b.clone();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(Extend)
        .fail_safe(secs(600))
        .refresh_backoff(secs(10))
        .clock(clock.clone())
        .loader(move |k: &u64| bb.call(*k))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61)); // expired at 60
    let mut t = 61;
    while t < 660 {
        assert_eq!(cache.load(1).unwrap(), 100, "t = {t}: within max_stale");
        assert_eq!(
            cache.get(&1),
            None,
            "t = {t}: a stale answer made the entry live again"
        );
        assert_eq!(cache.get_or_stale(&1), Some(100), "t = {t}");
        clock.advance(secs(50));
        t += 50;
    }
    clock.advance(secs(661 - t)); // 661: past 60 + 600
    let r = cache.load(1);
    assert!(
        r.is_err(),
        "served past max_stale (deadline 60 + 600): {r:?}"
    );
    assert_eq!(cache.get_or_stale(&1), None);
}

/// Same with time_to_idle: a stale answer is no access, so the stale window (from the last
/// real read) does not move: never beyond max_stale.
#[test]
fn stale_answers_do_not_count_as_idle_accesses() {
    let _w = watchdog("tti");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let bb = b.clone();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(10))
        .clock(clock.clone())
        .loader(move |k: &u64| bb.call(*k))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    for _ in 0..11 {
        assert_eq!(cache.load(1).unwrap(), 100);
        assert_eq!(cache.get_or_stale(&1), Some(100));
        assert_eq!(cache.get(&1), None);
        clock.advance(secs(50));
    }
    // t = 611; window ends at 660.
    clock.advance(secs(50)); // 661
    let r = cache.load(1);
    assert!(
        r.is_err(),
        "idle entry served past its last read + tti + max_stale: {r:?}"
    );
}

/// load_timeout with fail-safe: a timed-out waiter gets the old value; an invalidate while
/// the (hung) load runs ends it for every later caller (never the removed value again), and
/// the hung load's failure falls back on nothing.
#[test]
fn soft_timeout_then_invalidate_while_the_hung_load_runs() {
    let _w = watchdog("soft timeout");
    let clock = ManualClock::new();
    let (b, rx) = Backend::new();
    let cache = builder(&clock, &b)
        .refresh_backoff(secs(10))
        .load_timeout(Duration::from_millis(30))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let release = b.blocked();
    let c = cache.clone();
    let leader = std::thread::spawn(move || c.load(1)); // runs the loader itself: no timeout
    wait_for(&rx);
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "timed-out waiter gets the last value"
    );
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "then at once, within the backoff"
    );
    cache.invalidate(&1);
    b.ok(7);
    let r = cache.load(1);
    assert!(
        !matches!(r, Ok(100)),
        "the invalidated value came back: {r:?}"
    );
    release.send(Err("down".into())).unwrap();
    let l = leader.join().unwrap();
    assert!(l.is_err(), "overtaken load falls back on nothing: {l:?}");
    assert_ne!(cache.get_or_stale(&1), Some(100));
    let r = cache.load(1);
    assert!(
        !matches!(r, Ok(100)),
        "the invalidated value came back: {r:?}"
    );
    assert_eq!(cache.loads_in_flight(), 0);
}

/// max_concurrent_loads + load_timeout + fail-safe: a leader that times out waiting for its
/// permit gets the old value (its loader does not run) and leaves the queue; an insert
/// during that wait wins; and once the permit is free again, loads run (no permit leaked).
#[test]
fn permit_wait_timeout_serves_stale_then_a_write_wins_and_no_permit_leaks() {
    let _w = watchdog("permit wait");
    let clock = ManualClock::new();
    let (b, rx) = Backend::new();
    let cache = builder(&clock, &b)
        .refresh_backoff(secs(10))
        .max_concurrent_loads(1)
        .load_timeout(Duration::from_millis(30))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let hold = b.blocked();
    let c = cache.clone();
    let holder = std::thread::spawn(move || c.load(2)); // holds the only permit
    wait_for(&rx);
    let before = b.calls();
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "permit wait timed out: the last value"
    );
    assert_eq!(b.calls(), before, "its loader did not run");
    cache.insert(1, 200);
    assert_eq!(cache.load(1).unwrap(), 200);
    clock.advance(secs(61)); // 200 expired, permit still held
    let r = cache.load(1);
    assert!(
        matches!(r, Ok(200) | Err(_)),
        "only the newest value may come back: {r:?}"
    );
    hold.send(Ok(2)).unwrap();
    assert_eq!(holder.join().unwrap().unwrap(), 2);
    b.ok(300);
    b.ok(300);
    clock.advance(secs(11));
    assert_eq!(
        cache.load(1).unwrap(),
        300,
        "permit free again: the key loads"
    );
    assert_eq!(cache.get_with(3, || 3), 3);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// negative_ttl with fail-safe: a failure answered with the old value is not remembered; once
/// the key is invalidated a failure is remembered; a later insert ends that memory, and its
/// value (once expired) is what fail-safe serves, never the invalidated one.
#[test]
fn negative_ttl_and_fail_safe_across_invalidate_and_insert() {
    let _w = watchdog("negative");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b)
        .refresh_backoff(secs(10))
        .negative_ttl(secs(30))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    assert_eq!(cache.load(1).unwrap(), 100);
    cache.invalidate(&1);
    assert!(cache.load(1).is_err());
    let calls = b.calls();
    assert!(cache.load(1).is_err());
    assert_eq!(b.calls(), calls, "remembered by negative_ttl");
    cache.insert(1, 200);
    assert_eq!(
        cache.load(1).unwrap(),
        200,
        "insert ends the negative entry"
    );
    clock.advance(secs(61));
    assert_eq!(
        cache.load(1).unwrap(),
        200,
        "fail-safe serves the inserted value"
    );
    assert_eq!(b.calls(), calls + 1);
    clock.advance(secs(11));
    assert_eq!(
        cache.load(1).unwrap(),
        200,
        "retry fails: still the last value"
    );
    assert_eq!(b.calls(), calls + 2);
    clock.advance(secs(600));
    assert!(cache.load(1).is_err(), "past max_stale");
}

/// Clock extremes: a TTL of Duration::MAX never expires (no stale serving, loads never run);
/// max_stale of Duration::MAX keeps serving after huge jumps but a backoff still limits loads
/// to one per backoff; a rewind changes nothing (the cache never sees time go backwards).
#[test]
fn clock_extremes_with_fail_safe() {
    let _w = watchdog("clock");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b)
        .fail_safe(Duration::MAX)
        .refresh_backoff(secs(10))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(b.calls(), 1);
    clock.rewind(secs(1_000_000));
    assert_eq!(cache.get(&1), None, "a rewind does not revive the entry");
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(b.calls(), 1, "still within the backoff after a rewind");
    clock.advance(Duration::from_nanos(u64::MAX / 2)); // a huge jump
    assert_eq!(cache.load(1).unwrap(), 100, "max_stale = MAX: still served");
    assert_eq!(b.calls(), 2, "one retry");
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(b.calls(), 2, "one retry per backoff after a huge jump");
    // Duration::MAX time to live: never expires, whatever the jump.
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b).time_to_live(Duration::MAX).build();
    cache.insert(1, 100);
    clock.advance(Duration::from_secs(u64::MAX / 2));
    assert_eq!(cache.get(&1), Some(100));
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(b.calls(), 0);
}

/// fail_safe: "the key is retried after refresh_backoff by one caller (the others get the last
/// value meanwhile, with no load)"; fail_safe module: "the backend sees at most one load of the
/// key per backoff". With max_stale = Duration::MAX and the manual clock advanced to its end
/// (`advance(Duration::MAX)` is documented as allowed), time no longer moves, so no backoff
/// can pass: at most one retry may follow the failed load.
#[test]
fn one_retry_per_backoff_at_the_end_of_the_clock() {
    let _w = watchdog("clock end");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b)
        .fail_safe(Duration::MAX)
        .refresh_backoff(secs(10))
        .build();
    cache.insert(1, 100);
    clock.advance(Duration::MAX);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(cache.load(1).ok());
    }
    assert!(
        b.calls() <= 2,
        "loader calls with no time passing after the first failure: {} (answers {got:?})",
        b.calls()
    );
}

/// A computation waiting behind a failing load of the expired key: the load fails (its
/// callers get the old value), then the computation runs, sees no value (expired) and stores
/// its own. After that the old value never comes back, and the stored one is in no backoff.
#[test]
fn compute_queued_behind_a_failing_load_then_wins() {
    let _w = watchdog("compute behind load");
    for how in ["compute_put", "upsert", "compute_remove"] {
        let clock = ManualClock::new();
        let (b, rx) = Backend::new();
        let cache = builder(&clock, &b).build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let release = b.blocked();
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        wait_for(&rx);
        let c = cache.clone();
        let h = how;
        let computer = std::thread::spawn(move || {
            let mut saw = None;
            match h {
                "compute_put" => {
                    c.entry(1).and_compute_with(|e| {
                        saw = e.map(|e| e.into_value());
                        Op::Put(200)
                    });
                }
                "upsert" => {
                    c.entry(1).and_upsert_with(|e| {
                        saw = e.map(|e| e.into_value());
                        200
                    });
                }
                _ => {
                    c.entry(1).and_compute_with(|e| {
                        saw = e.map(|e| e.into_value());
                        Op::<u64>::Remove
                    });
                }
            }
            saw
        });
        release.send(Err("down".into())).unwrap();
        assert_eq!(
            leader.join().unwrap().unwrap(),
            100,
            "{how}: the failed load's caller"
        );
        let saw = computer.join().unwrap();
        assert_eq!(
            saw, None,
            "{how}: the computation sees an expired entry as absent"
        );
        let r = cache.load(1);
        if how == "compute_remove" {
            assert!(r.is_err(), "{how}: removed value served: {r:?}");
        } else {
            assert_eq!(r.unwrap(), 200, "{how}");
            clock.advance(secs(61));
            b.ok(300);
            assert_eq!(
                cache.load(1).unwrap(),
                300,
                "{how}: the computed value is in no backoff"
            );
        }
    }
}

/// `EntryRef::or_insert` is documented as "The entry, inserting `default` if absent", and an
/// expired entry is absent to every call but a failing load's fallback. During the retry
/// backoff of a failed load, `or_insert(v)` has a value in hand (nothing to load, nothing that
/// can fail), yet it returns the expired value and stores nothing.
#[test]
fn or_insert_during_the_backoff_inserts_its_value() {
    let _w = watchdog("or_insert");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b).build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    assert_eq!(cache.load(1).unwrap(), 100); // failed: backoff
    assert_eq!(cache.get(&1), None, "expired: absent");
    let e = cache.entry(1).or_insert(200);
    assert_eq!(
        (*e.value(), e.is_fresh(), cache.get(&1)),
        (200, true, Some(200)),
        "or_insert over an absent (expired) key must insert its default"
    );
}

/// refresh_after docs: a failed refresh keeps the value and "the next attempt waits
/// refresh_backoff"; fail_safe docs: "Until a load fails, the key behaves as without
/// fail-safe: the first caller after the deadline loads it", and "A refresh that fails while
/// the value is still live sets the next refresh a backoff ahead". A refresh failure is no
/// failed load of the expired key: at expiry the first caller loads (it is not answered
/// stale from the refresh's backoff).
#[test]
fn a_failed_refresh_is_no_fail_safe_backoff_at_expiry() {
    let _w = watchdog("refresh then expiry");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b).refresh_after(secs(30)).build();
    b.ok(100);
    assert_eq!(cache.load(1).unwrap(), 100);
    clock.advance(secs(50)); // due for refresh
    assert_eq!(
        cache.load(1).unwrap(),
        100,
        "served, refresh runs in this reader and fails"
    );
    assert_eq!(b.calls(), 2, "the refresh ran");
    assert_eq!(cache.get(&1), Some(100), "failed refresh keeps the value");
    clock.advance(secs(11)); // t = 61: expired; the refresh backoff (1000 s) not over
    b.ok(200);
    let r = cache.load(1);
    assert_eq!(
        (r.ok(), b.calls()),
        (Some(200), 3),
        "the first caller after the deadline must load (no load of the expired key failed yet)"
    );
}

/// A write during a running retry (the key's stale value served to the others meanwhile):
/// the others get the written value at once, the retry's failure falls back on nothing, and
/// the written value, once expired, is loaded by its first caller (no inherited backoff).
#[test]
fn insert_during_a_running_retry_wins_everywhere() {
    let _w = watchdog("insert during retry");
    let clock = ManualClock::new();
    let (b, rx) = Backend::new();
    let cache = builder(&clock, &b).refresh_backoff(secs(10)).build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    assert_eq!(cache.load(1).unwrap(), 100); // failed: backoff to 71
    clock.advance(secs(11));
    let _ = rx.try_iter().count();
    let release = b.blocked();
    let c = cache.clone();
    let retrier = std::thread::spawn(move || c.load(1));
    wait_for(&rx);
    assert_eq!(cache.load(1).unwrap(), 100, "stale while the retry runs");
    cache.insert(1, 200);
    assert_eq!(cache.load(1).unwrap(), 200, "the write wins at once");
    assert_eq!(cache.get_with(1, || 9), 200);
    release.send(Err("down".into())).unwrap();
    let r = retrier.join().unwrap();
    assert!(
        !matches!(r, Ok(100)),
        "the overtaken retry fell back on the replaced value"
    );
    assert_eq!(cache.get(&1), Some(200));
    clock.advance(secs(61));
    b.ok(300);
    let before = b.calls();
    assert_eq!(
        cache.load(1).unwrap(),
        300,
        "the written value's first caller after expiry loads"
    );
    assert_eq!(b.calls() - before, 1);
}

/// get_all docs: a key whose load fails answers with its old value under fail-safe, within the
/// backoff it started; an invalidate during the batch load ends that for good.
#[test]
fn get_all_fail_safe_and_an_invalidate_during_the_batch() {
    let _w = watchdog("get_all");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b).refresh_backoff(secs(10)).build();
    cache.insert(1, 100);
    cache.insert(2, 200);
    clock.advance(secs(61));
    let all = cache.get_all([1, 2], |missing| {
        assert_eq!(missing.len(), 2);
        std::collections::HashMap::new() // the backend returns nothing
    });
    assert_eq!(all.get(&1), Some(&100));
    assert_eq!(all.get(&2), Some(&200));
    clock.advance(secs(11));
    let c = cache.clone();
    let all = cache.get_all([1, 2], move |missing| {
        assert_eq!(missing.len(), 2, "both retried");
        c.invalidate(&1); // during the batch load
        std::collections::HashMap::new()
    });
    assert_eq!(
        all.get(&1),
        None,
        "invalidated during the load: no fallback"
    );
    assert_eq!(all.get(&2), Some(&200));
    assert_eq!(cache.get_or_stale(&1), None);
    let r = cache.load(1);
    assert!(r.is_err(), "{r:?}");
}

/// health docs: ServingStale { served: "Calls answered so in the window" } — the same calls
/// CacheStats::stale_served_after_ttl counts.
#[test]
fn serving_stale_warning_counts_what_stats_count() {
    let _w = watchdog("serving stale");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b).refresh_backoff(secs(10)).build();
    for k in 0..5 {
        cache.insert(k, k);
    }
    clock.advance(secs(61));
    for _ in 0..3 {
        for k in 0..5 {
            assert_eq!(cache.load(k).unwrap(), k);
        }
    }
    assert_eq!(cache.get_or_stale(&0), Some(0));
    let s = cache.stats();
    assert_eq!(s.stale_served_after_ttl, 16, "{s:?}");
    let h = cache.health();
    let served = h.warnings().iter().find_map(|w| match w {
        herdcache::Warning::ServingStale { served } => Some(*served),
        _ => None,
    });
    assert_eq!(served, Some(16), "{h:?}");
}

/// Lib docs: a loaded value replaces the old one; fail-safe falls back on "the last value". A
/// successful load whose value is born expired (an Expiry giving it zero life) is still the
/// key's last value: a later failing load may answer with it (or fail), never with the value
/// it replaced.
#[test]
fn a_value_loaded_already_expired_replaces_the_stale_one_for_good() {
    struct ZeroFor200;
    impl Expiry<u64, u64> for ZeroFor200 {
        fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
            Some(if *v == 200 { Duration::ZERO } else { secs(60) })
        }
        fn expire_after_update(&self, _k: &u64, v: &u64, r: Option<Duration>) -> Option<Duration> {
            if *v == 200 {
                Some(Duration::ZERO)
            } else {
                r
            }
        }
    }
    let _w = watchdog("zero-life value");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let bb = b.clone();
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .expire_after(ZeroFor200)
        .fail_safe(secs(600))
        .refresh_backoff(secs(10))
        .clock(clock.clone())
        .loader(move |k: &u64| bb.call(*k))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    b.ok(200);
    assert_eq!(cache.load(1).unwrap(), 200, "the load succeeds");
    clock.advance(secs(1));
    for _ in 0..3 {
        let r = cache.load(1);
        assert!(!matches!(r, Ok(100)), "the replaced value came back: {r:?}");
        assert_ne!(
            cache.get_or_stale(&1),
            Some(100),
            "get_or_stale: replaced value"
        );
        clock.advance(secs(11));
    }
}

/// LoadError::Panicked: "callers of the key in the next refresh_backoff get it too". A write
/// of the key makes it live: a load returns the written value; once that value has expired
/// (no load of it failed), its first caller loads it again rather than being answered by a
/// panic of a load that happened before the write.
#[test]
fn a_write_ends_the_remembered_panic() {
    let _w = watchdog("panic memory");
    for fail_safe in [false, true] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let mut bld = builder(&clock, &b);
        if !fail_safe {
            bld = bld.fail_safe(Duration::ZERO);
        }
        let cache = bld.build();
        b.push(|| panic!("loader boom"));
        let r = cache.load(1);
        assert!(matches!(r, Err(LoadError::Panicked)), "{r:?}");
        let r = cache.load(1);
        assert!(matches!(r, Err(LoadError::Panicked)), "remembered: {r:?}");
        assert_eq!(b.calls(), 1);
        clock.advance(secs(1));
        cache.insert(1, 100);
        assert_eq!(
            cache.load(1).unwrap(),
            100,
            "fail_safe {fail_safe}: the write answers"
        );
        clock.advance(secs(61)); // 100 expired; the panic's backoff (1000 s) not over
        b.ok(300);
        let r = cache.load(1);
        assert_eq!(
            (r.as_ref().ok().copied(), b.calls()),
            (Some(300), 2),
            "fail_safe {fail_safe}: after the written value expired, its first caller loads \
             (got {r:?})"
        );
    }
}

/// CacheStats: a caller answered at its soft timeout counts once in stale_served_after_ttl and
/// once in timeouts; a caller answered during the backoff counts once in
/// stale_served_after_ttl and not as a timeout; misses balance.
#[test]
fn soft_timeout_stale_answers_are_counted_exactly() {
    let _w = watchdog("timeout stats");
    let clock = ManualClock::new();
    let (b, rx) = Backend::new();
    let cache = builder(&clock, &b)
        .refresh_backoff(secs(10))
        .load_timeout(Duration::from_millis(20))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let release = b.blocked();
    let c = cache.clone();
    let leader = std::thread::spawn(move || c.load(1));
    wait_for(&rx);
    assert_eq!(cache.load(1).unwrap(), 100); // waits, times out
    assert_eq!(cache.load(1).unwrap(), 100); // within the backoff: at once
    let s = cache.stats();
    assert_eq!((s.stale_served_after_ttl, s.timeouts), (2, 1), "{s:?}");
    release.send(Err("down".into())).unwrap();
    assert_eq!(leader.join().unwrap().unwrap(), 100);
    let s = cache.stats();
    assert_eq!((s.stale_served_after_ttl, s.timeouts), (3, 1), "{s:?}");
    assert_eq!(
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "misses balance: {s:?}"
    );
}

/// fail_safe docs: "get, contains_key, iteration and and_compute_with see an expired entry as
/// absent" and "Never beyond max_stale"; and_compute_with: its look is a read that "moves the
/// entry's time to idle and calls expire_after_read". Looks at a stale entry by a computation
/// that keeps it (Op::Nop), by retain keeping it, by get/contains_key/iter, under a time to
/// idle and an extending Expiry: none may make it live again or stretch its stale window.
#[test]
fn looks_at_a_stale_entry_never_revive_it() {
    struct Extend;
    impl Expiry<u64, u64> for Extend {
        fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
            Some(secs(60))
        }
        fn expire_after_read(&self, _k: &u64, _v: &u64, _r: Option<Duration>) -> Option<Duration> {
            Some(secs(500))
        }
    }
    let _w = watchdog("looks");
    for kind in ["tti", "expiry"] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let bb = b.clone();
        let mut bld = Cache::builder()
            .max_capacity(100)
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .clock(clock.clone())
            .loader(move |k: &u64| bb.call(*k));
        bld = if kind == "tti" {
            bld.time_to_idle(secs(60))
        } else {
            bld.expire_after(Extend)
        };
        let cache: Cache<u64, u64> = bld.build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(cache.load(1).unwrap(), 100);
        let mut t = 61;
        while t < 655 {
            let saw = std::cell::Cell::new(None);
            cache.entry(1).and_compute_with(|e| {
                saw.set(Some(e.map(|e| e.into_value())));
                Op::Nop
            });
            assert_eq!(
                saw.get(),
                Some(None),
                "{kind} t={t}: the computation sees no value"
            );
            cache.retain(|_, _| true);
            assert!(!cache.contains_key(&1), "{kind} t={t}: contains_key");
            assert_eq!(cache.iter().count(), 0, "{kind} t={t}: iter");
            assert_eq!(
                cache.get(&1),
                None,
                "{kind} t={t}: a look revived the stale entry"
            );
            clock.advance(secs(30));
            t += 30;
        }
        clock.advance(secs(661 - t));
        let r = cache.load(1);
        assert!(r.is_err(), "{kind}: served past 60 + 600: {r:?}");
        assert_eq!(cache.get_or_stale(&1), None, "{kind}");
    }
}

/// fail_safe docs: "Until a load fails, the key behaves as without fail-safe: the first caller
/// after the deadline loads it … a healthy backend's value replaces the old one." A retry that
/// succeeds stores a new value; the retry deadline the retrier set (a backoff ahead) belongs
/// to the old value: once the new value expires, its first caller must load.
#[test]
fn a_successful_retry_leaves_no_backoff_on_the_new_value() {
    let _w = watchdog("successful retry");
    for via in ["load", "get_with", "or_insert_with"] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let cache = builder(&clock, &b).fail_safe(secs(100_000)).build(); // backoff 1000 s
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(
            cache.load(1).unwrap(),
            100,
            "{via}: failed, backoff to 1061"
        );
        clock.advance(secs(1001)); // t = 1062: retry due
        if via == "load" {
            b.ok(200);
        }
        let v = match via {
            "load" => cache.load(1).unwrap(),
            "get_with" => cache.get_with(1, || 200),
            _ => cache.entry(1).or_insert_with(|| 200).into_value(),
        };
        assert_eq!(v, 200, "{via}: the retry succeeds");
        assert_eq!(cache.get(&1), Some(200));
        clock.advance(secs(61)); // t = 1123: 200 expired; the retrier's deadline was 2062
        b.ok(300);
        let before = b.calls();
        let r = cache.load(1);
        assert_eq!(
            (r.as_ref().ok().copied(), b.calls() - before),
            (Some(300), 1),
            "{via}: the new value's first caller after its deadline must load: {r:?}"
        );
    }
}

/// load_with_timeout docs: with a spawner "the spawned job keeps waiting for its permit and
/// loads then"; lib docs: "A write or invalidation of the key while it loads wins: the loaded
/// value … is not stored". A caller times out (answered stale) while its spawned job waits
/// for a permit; the key is then invalidated or overwritten; when the job finally loads, its
/// value must not replace the write, nor the old value come back.
#[test]
fn spawned_load_waiting_for_a_permit_loses_to_a_later_write() {
    let _w = watchdog("spawned permit wait");
    for how in ["invalidate", "insert"] {
        let clock = ManualClock::new();
        let (b, rx) = Backend::new();
        let (job_tx, job_rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let job_tx = Mutex::new(job_tx);
        let cache = builder(&clock, &b)
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .load_timeout(Duration::from_millis(20))
            .spawner(move |job| job_tx.lock().unwrap().send(job).unwrap())
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        // Key 2 holds the only permit (its spawned job runs on a thread of ours).
        let hold = b.blocked();
        let c = cache.clone();
        let holder = std::thread::spawn(move || c.load(2));
        let job2 = job_rx.recv_timeout(secs(30)).unwrap();
        let runner2 = std::thread::spawn(job2);
        wait_for(&rx);
        // Key 1: its job waits for the permit; the caller times out with the last value.
        let c = cache.clone();
        let caller = std::thread::spawn(move || c.load(1));
        let job1 = job_rx.recv_timeout(secs(30)).unwrap();
        let runner1 = std::thread::spawn(job1);
        assert_eq!(
            caller.join().unwrap().unwrap(),
            100,
            "{how}: timed out: the last value"
        );
        match how {
            "invalidate" => cache.invalidate(&1),
            _ => cache.insert(1, 200),
        }
        b.ok(7);
        hold.send(Ok(2)).unwrap();
        let _ = holder.join().unwrap(); // timed out itself (no value for key 2): fine
        runner2.join().unwrap();
        runner1.join().unwrap(); // key 1's job got the permit and loaded 7
        assert_eq!(b.calls(), 2, "{how}: key 1's job loaded");
        let want = if how == "insert" { Some(200) } else { None };
        assert_eq!(
            cache.get(&1),
            want,
            "{how}: the overtaken job's value was stored"
        );
        assert_ne!(cache.get_or_stale(&1), Some(100), "{how}");
        assert_eq!(cache.loads_in_flight(), 0);
    }
}

/// fail_safe "Writes win" under concurrency: writers insert increasing values (and sometimes
/// invalidate), the clock moves past deadlines, the backend is down; each reader (load,
/// get_with, get_or_stale) must never see a value older than one it already saw.
#[test]
fn readers_never_go_back_in_time_under_writes_and_failing_loads() {
    let _w = watchdog("monotonic readers");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b)
        .fail_safe(secs(100_000))
        .refresh_backoff(secs(5))
        .shards(1)
        .build();
    cache.insert(1, 1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, clock, stop) = (cache.clone(), clock.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            for v in 2..400u64 {
                if v % 7 == 0 {
                    c.invalidate(&1);
                } else {
                    c.insert(1, v);
                }
                if v % 3 == 0 {
                    clock.advance(secs(40));
                }
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (c, stop) = (cache.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut last = 0u64;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) || n < 100 {
                    n += 1;
                    let got = match (r + n) % 3 {
                        0 => c.load(1).ok(),
                        1 => c.try_get_with(1, || Err::<u64, &str>("down")).ok(),
                        _ => c.get_or_stale(&1),
                    };
                    if let Some(v) = got {
                        assert!(v >= last, "reader {r}: saw {v} after {last}");
                        last = v;
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
}

/// refresh_after with fail-safe: a refresh started while the value was live, run (and failing)
/// only after the value expired. The callers of the expired key during that time are
/// answered by the old value or the load, never by an error while the old value is within
/// its stale window (fail_safe: "A load fails … every caller of that load gets the old value
/// instead of the error"), and a later insert wins.
#[test]
fn refresh_parked_past_expiry_then_failing() {
    let _w = watchdog("parked refresh");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let (job_tx, job_rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let job_tx = Mutex::new(job_tx);
    let cache = builder(&clock, &b)
        .refresh_after(secs(30))
        .refresh_backoff(secs(10))
        .spawner(move |job| job_tx.lock().unwrap().send(job).unwrap())
        .build();
    b.ok(100);
    assert_eq!(cache.load(1).unwrap(), 100);
    clock.advance(secs(50));
    assert_eq!(cache.get(&1), Some(100)); // starts the refresh: parked
    let job = job_rx.recv_timeout(secs(30)).unwrap();
    clock.advance(secs(11)); // t = 61: expired, refresh still parked
    let c = cache.clone();
    let caller = std::thread::spawn(move || c.load(1));
    // Either the caller joins the parked refresh, or it runs a load of its own (which fails).
    until("the caller joined or loaded", || {
        let s = cache.stats();
        s.coalesced >= 1 || b.calls() >= 2 || caller.is_finished()
    });
    std::thread::spawn(job).join().unwrap(); // the refresh runs now, and fails
    let r = caller.join().unwrap();
    assert!(
        matches!(r, Ok(100)),
        "expired key, stale value within max_stale: {r:?}"
    );
    let calls = b.calls();
    assert_eq!(cache.load(1).unwrap(), 100, "within the backoff");
    assert_eq!(b.calls(), calls, "no load within the backoff");
    cache.insert(1, 200);
    assert_eq!(cache.load(1).unwrap(), 200);
    clock.advance(secs(61));
    let r = cache.load(1);
    assert!(
        matches!(r, Ok(200)),
        "the inserted value, stale after a failed load: {r:?}"
    );
}

/// Extreme but valid configurations (durations of Duration::MAX or zero, jitter, early
/// refresh, fail-safe) with the clock jumping to its end: no call may panic or hang, a value
/// never comes back after an invalidate, and an entry with a Duration::MAX time to live never
/// expires.
#[test]
fn extreme_durations_with_jitter_early_refresh_and_fail_safe() {
    let _w = watchdog("extreme durations");
    type Cfg = (&'static str, Duration, Duration, Duration, f64);
    let cfgs: [Cfg; 5] = [
        ("ttl max", Duration::MAX, Duration::MAX, Duration::MAX, 0.9),
        (
            "ttl 1ns",
            Duration::from_nanos(1),
            Duration::MAX,
            Duration::ZERO,
            0.5,
        ),
        ("tti max", secs(60), Duration::MAX, secs(1), 0.0),
        (
            "stale 1ns",
            secs(60),
            Duration::from_nanos(1),
            Duration::from_nanos(1),
            0.99,
        ),
        (
            "nearly max",
            Duration::from_nanos(u64::MAX - 1),
            Duration::from_nanos(u64::MAX - 1),
            Duration::MAX,
            0.3,
        ),
    ];
    for (name, ttl, max_stale, backoff, jitter) in cfgs {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let bb = b.clone();
        let mut bld = Cache::builder()
            .max_capacity(100)
            .time_to_live(ttl)
            .fail_safe(max_stale)
            .refresh_backoff(backoff)
            .jitter(jitter)
            .early_refresh(1.0)
            .refresh_after(ttl / 2)
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| bb.call(*k));
        if name == "tti max" {
            bld = bld.time_to_idle(Duration::MAX);
        }
        let cache: Cache<u64, u64> = match bld.try_build() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: refused: {e}");
                continue;
            }
        };
        b.ok(1);
        let _ = cache.load(1);
        cache.insert(2, 2);
        for jump in [
            Duration::from_nanos(1),
            secs(61),
            Duration::from_nanos(u64::MAX / 2),
            Duration::MAX,
        ] {
            clock.advance(jump);
            let _ = cache.load(1);
            let _ = cache.get(&2);
            let _ = cache.get_or_stale(&2);
            let _ = cache.health();
            cache.invalidate(&2);
            assert_eq!(cache.get_or_stale(&2), None, "{name}: after invalidate");
            let r = cache.load(2);
            assert!(
                !matches!(r, Ok(2)),
                "{name}: invalidated value came back: {r:?}"
            );
            cache.insert(2, 2);
            if ttl == Duration::MAX {
                assert_eq!(cache.get(&2), Some(2), "{name}: never expires");
            }
            clock.rewind(secs(5));
        }
        cache.validate();
    }
}

/// get_or_stale docs: "A stale value changes nothing: no load, no retry deadline". Reading the
/// stale value first leaves the key as it was: the next load caller loads it (no failure
/// yet), and once that fails, a caller after the backoff retries.
#[test]
fn get_or_stale_changes_nothing() {
    let _w = watchdog("get_or_stale");
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b).refresh_backoff(secs(10)).build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    for _ in 0..3 {
        assert_eq!(cache.get_or_stale(&1), Some(100));
    }
    assert_eq!(b.calls(), 0, "no load");
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(b.calls(), 1, "the first load caller loaded");
    assert_eq!(cache.get_or_stale(&1), Some(100));
    clock.advance(secs(11));
    assert_eq!(cache.get_or_stale(&1), Some(100));
    assert_eq!(cache.load(1).unwrap(), 100);
    assert_eq!(b.calls(), 2, "get_or_stale did not push the retry deadline");
    assert_eq!(cache.get(&1), None);
}

/// CacheStats: a leader that timed out waiting for a load permit is a load abandoned
/// (loads_abandoned: "a leader that timed out waiting for a load permit"), a timeout, a load
/// that waited for the limit, and — answered by the last value — one stale answer; misses
/// balance.
#[test]
fn permit_wait_timeout_is_counted_exactly() {
    let _w = watchdog("permit wait counts");
    let clock = ManualClock::new();
    let (b, rx) = Backend::new();
    let cache = builder(&clock, &b)
        .refresh_backoff(secs(10))
        .max_concurrent_loads(1)
        .load_timeout(Duration::from_millis(20))
        .build();
    cache.insert(1, 100);
    clock.advance(secs(61));
    let hold = b.blocked();
    let c = cache.clone();
    let holder = std::thread::spawn(move || c.load(2));
    wait_for(&rx);
    let before = cache.stats();
    assert_eq!(cache.load(1).unwrap(), 100);
    let s = cache.stats();
    assert_eq!(
        (
            s.loads_abandoned - before.loads_abandoned,
            s.timeouts - before.timeouts,
            s.loads_waited_for_limit - before.loads_waited_for_limit,
            s.stale_served_after_ttl - before.stale_served_after_ttl,
            s.misses - before.misses,
        ),
        (1, 1, 1, 1, 1),
        "{s:?}"
    );
    hold.send(Ok(2)).unwrap();
    assert_eq!(holder.join().unwrap().unwrap(), 2);
    let s = cache.stats();
    assert_eq!(
        s.misses,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "misses balance: {s:?}"
    );
}

/// Expiry docs: expire_after_create is "The lifetime of a newly inserted entry"; update's
/// default leaves the remaining lifetime unchanged. A stale entry kept by fail-safe is expired
/// (absent to reads): a retry's value replacing it must get a real lifetime (a newly loaded
/// value), not the expired entry's zero remaining time — and a plain insert over it too.
#[test]
fn a_value_replacing_a_stale_entry_is_live_with_a_create_only_expiry() {
    struct CreateOnly;
    impl Expiry<u64, u64> for CreateOnly {
        fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
            Some(secs(60))
        }
    }
    let _w = watchdog("create-only expiry");
    for how in ["retry", "insert", "get_with", "upsert"] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let bb = b.clone();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .expire_after(CreateOnly)
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .clock(clock.clone())
            .loader(move |k: &u64| bb.call(*k))
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        assert_eq!(cache.load(1).unwrap(), 100, "{how}: stale");
        clock.advance(secs(11));
        match how {
            "retry" => {
                b.ok(200);
                assert_eq!(cache.load(1).unwrap(), 200);
            }
            "insert" => cache.insert(1, 200),
            "get_with" => assert_eq!(cache.get_with(1, || 200), 200),
            _ => {
                cache.entry(1).and_upsert_with(|_| 200);
            }
        }
        assert_eq!(
            cache.get(&1),
            Some(200),
            "{how}: the new value must be live"
        );
        clock.advance(secs(30));
        assert_eq!(cache.get(&1), Some(200), "{how}: 30 s into its 60 s");
    }
}

/// remove docs: "Removes key and returns its value, if a live one was present"; fail_safe:
/// "Writes win: an insert or invalidate replaces or removes the old entry". remove on a key
/// whose expired value fail-safe keeps: returns None (not live) and ends the stale value.
#[test]
fn remove_of_a_stale_entry_returns_none_and_ends_it() {
    let _w = watchdog("remove stale");
    for failed_first in [false, true] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let cache = builder(&clock, &b).refresh_backoff(secs(10)).build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        if failed_first {
            assert_eq!(cache.load(1).unwrap(), 100);
        }
        assert_eq!(
            cache.remove(&1),
            None,
            "failed_first {failed_first}: not live"
        );
        assert_eq!(
            cache.get_or_stale(&1),
            None,
            "failed_first {failed_first}: ended"
        );
        let r = cache.load(1);
        assert!(
            r.is_err(),
            "failed_first {failed_first}: removed value served: {r:?}"
        );
    }
}

/// eviction_listener: "called exactly once for every entry that leaves the cache"; CacheStats
/// removals by cause count the same removals. Stale entries kept by fail-safe leave in every
/// way (invalidate, insert over, retain, invalidate_all, the stale window passing, eviction
/// for size): each value reported exactly once, and the stats agree with the listener.
#[test]
fn stale_entries_leave_exactly_once_and_stats_agree() {
    let _w = watchdog("listener once");
    let seen: Arc<Mutex<Vec<(u64, u64, herdcache::RemovalCause)>>> = Arc::default();
    let s2 = Arc::clone(&seen);
    let clock = ManualClock::new();
    let (b, _rx) = Backend::new();
    let cache = builder(&clock, &b)
        .max_capacity(8)
        .shards(1)
        .refresh_backoff(secs(10))
        .eviction_listener(move |k: &u64, v: &u64, c| s2.lock().unwrap().push((*k, *v, c)))
        .build();
    for k in 0..8 {
        cache.insert(k, k * 100);
    }
    clock.advance(secs(61));
    for k in 0..8 {
        assert_eq!(cache.load(k).unwrap(), k * 100); // all stale now
    }
    cache.invalidate(&0);
    cache.insert(1, 111);
    cache.retain(|k, _| *k != 2);
    cache.entry(3).and_compute_with(|_| Op::<u64>::Remove);
    let _ = cache.remove(&4);
    for k in 20..26 {
        cache.insert(k, k); // evicts stale entries for size
    }
    clock.advance(secs(700)); // every remaining stale window over
    cache.run_pending_tasks();
    cache.invalidate_all();
    cache.run_pending_tasks();
    let seen = seen.lock().unwrap().clone();
    let mut values: Vec<(u64, u64)> = seen.iter().map(|&(k, v, _)| (k, v)).collect();
    values.sort();
    let mut dedup = values.clone();
    dedup.dedup();
    assert_eq!(values, dedup, "a value reported twice: {seen:?}");
    let mut expect: Vec<(u64, u64)> = (0..8).map(|k| (k, k * 100)).collect();
    expect.push((1, 111));
    expect.extend((20..26).map(|k| (k, k)));
    expect.sort();
    assert_eq!(values, expect, "every value reported once: {seen:?}");
    let s = cache.stats();
    let total = s.expired.count + s.explicit.count + s.replaced.count + s.size.count;
    assert_eq!(
        total,
        seen.len() as u64,
        "stats removals vs listener: {s:?} / {seen:?}"
    );
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
}

/// fail_safe module docs: "A refresh that fails while the value is still live … with
/// fail-safe, is not remembered by negative_ttl (the remembered error would answer before the
/// old value, once it expires)". With negative_ttl longer than the rest of the value's life.
#[test]
fn failed_refresh_is_not_remembered_by_negative_ttl_under_fail_safe() {
    let _w = watchdog("refresh negative");
    for call in ["load", "try_get_with", "optionally"] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let cache = builder(&clock, &b)
            .refresh_after(secs(30))
            .refresh_backoff(secs(5))
            .negative_ttl(secs(100))
            .build();
        b.ok(100);
        assert_eq!(cache.load(1).unwrap(), 100);
        clock.advance(secs(50));
        assert_eq!(cache.load(1).unwrap(), 100); // the refresh runs here and fails
        assert_eq!(b.calls(), 2);
        clock.advance(secs(11)); // expired
        let got = match call {
            "load" => cache.load(1).ok(),
            "try_get_with" => cache.try_get_with(1, || Err::<u64, &str>("down")).ok(),
            _ => cache.optionally_get_with(1, || None),
        };
        if call == "optionally" {
            // None is an answer, not a failure: it removes the old value.
            assert_eq!(got, None, "{call}");
        } else {
            assert_eq!(
                got,
                Some(100),
                "{call}: the old value, not a remembered refresh error"
            );
        }
    }
}

/// Lib docs: "A write or invalidation of the key while it loads wins"; refreshes_failed counts
/// refreshes that "lost to a write or invalidation of the key made while they ran". A parked
/// refresh runs after the key was invalidated or overwritten: its result (value or failure)
/// never brings the old value back nor replaces the write.
#[test]
fn refresh_running_after_a_write_never_wins() {
    let _w = watchdog("refresh after write");
    for (how, outcome_ok) in [
        ("invalidate", false),
        ("invalidate", true),
        ("insert", false),
        ("insert", true),
    ] {
        let clock = ManualClock::new();
        let (b, _rx) = Backend::new();
        let (job_tx, job_rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let job_tx = Mutex::new(job_tx);
        let cache = builder(&clock, &b)
            .refresh_after(secs(30))
            .refresh_backoff(secs(5))
            .spawner(move |job| job_tx.lock().unwrap().send(job).unwrap())
            .build();
        b.ok(100);
        assert_eq!(cache.load(1).unwrap(), 100);
        clock.advance(secs(50));
        assert_eq!(cache.get(&1), Some(100));
        let job = job_rx.recv_timeout(secs(30)).unwrap();
        match how {
            "invalidate" => cache.invalidate(&1),
            _ => cache.insert(1, 200),
        }
        if outcome_ok {
            b.ok(300);
        }
        std::thread::spawn(job).join().unwrap();
        let want = if how == "insert" { Some(200) } else { None };
        assert_eq!(cache.get(&1), want, "{how} ok={outcome_ok}");
        clock.advance(secs(61)); // whatever is there expired
        let r = cache.load(1);
        assert!(
            !matches!(r, Ok(100) | Ok(300)),
            "{how} ok={outcome_ok}: {r:?}"
        );
        let s = cache.stats();
        assert_eq!(
            (s.refreshes_started, s.refreshes_failed),
            (1, 1),
            "{how} ok={outcome_ok}: {s:?}"
        );
    }
}

// Helpers the modules below share.
/// Single flight under faults (cancelled async leaders, panics of user code after the loader
/// returned), with `max_concurrent_loads` and fail-safe.
mod faults {
    use super::{secs, watchdog};

    use futures::FutureExt;
    use herdcache::{BoxError, Cache, Expiry, LoadError, ManualClock, RemovalCause};
    use std::future::Future;
    use std::hash::{Hash, Hasher};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < secs(30), "never happened: {what}");
            std::thread::yield_now();
        }
    }

    /// entry_count / weighted_size agree with what iteration sees, and the internals validate.
    fn consistent<K, V>(cache: &Cache<K, V>, weigh: impl Fn(&K, &V) -> u64, what: &str)
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        cache.run_pending_tasks();
        cache.validate();
        let items: Vec<(K, V)> = cache.iter().collect();
        assert_eq!(
            cache.entry_count(),
            items.len() as u64,
            "{what}: entry_count vs iter"
        );
        let w: u64 = items.iter().map(|(k, v)| weigh(k, v)).sum();
        assert_eq!(cache.weighted_size(), w, "{what}: weighted_size vs iter");
        assert_eq!(cache.loads_in_flight(), 0, "{what}: loads in flight");
    }

    /// fail_safe: "A load fails — … an abandoned async leader …: every caller of that load gets the
    /// old value … and the key's retry deadline is set refresh_backoff ahead"; lib docs: a cancelled
    /// leader leaves "no load permit taken". A get_with_async leader dropped mid-load under
    /// max_concurrent_loads(1): the permit comes back and the key is in its backoff.
    #[test]
    fn dropped_async_leader_of_an_expired_key_releases_its_permit_and_starts_the_backoff() {
        let _w = watchdog("dropped async leader");
        let clock = ManualClock::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = Arc::clone(&calls);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                c2.fetch_add(1, Ordering::SeqCst);
                Err::<u64, _>(BoxError::from("down"))
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let polled = Arc::new(AtomicBool::new(false));
        let p = Arc::clone(&polled);
        let fut = cache.get_with_async(1, async move {
            p.store(true, Ordering::SeqCst);
            std::future::pending::<u64>().await
        });
        assert!(fut.now_or_never().is_none(), "pending, then dropped");
        assert!(
            polled.load(Ordering::SeqCst),
            "the init ran: the leader held the permit"
        );
        assert_eq!(
            cache.loads_in_flight(),
            0,
            "the dropped leader's load is gone"
        );
        assert_eq!(
            cache.load(1).unwrap(),
            100,
            "abandoned leader: the last value in the backoff"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no load within the backoff"
        );
        assert_eq!(cache.get_with(2, || 2), 2, "the permit came back");
        let s = cache.stats();
        assert_eq!(s.loads_abandoned, 1, "{s:?}");
        assert_eq!(s.stale_served_after_ttl, 1, "{s:?}");
        clock.advance(secs(11));
        assert_eq!(cache.load(1).unwrap(), 100, "retry failed: the last value");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one retry");
    }

    /// The same with an async waiter that joined and is then dropped while the leader is stuck in
    /// its loader, then the leader fails: every remaining caller is answered, nothing hangs.
    #[test]
    fn dropped_async_waiter_then_failing_leader() {
        let _w = watchdog("dropped async waiter");
        let clock = ManualClock::new();
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let entered_tx = std::sync::Mutex::new(entered_tx);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                entered_tx.lock().unwrap().send(()).unwrap();
                let _ = release_rx.lock().unwrap().recv_timeout(secs(30));
                Err::<u64, _>(BoxError::from("down"))
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        entered.recv_timeout(secs(30)).unwrap();
        let fut = Box::pin(cache.get_with_async(1, async { 9 }));
        let mut fut = Some(fut);
        // Poll once: joins the running load.
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().unwrap().as_mut().poll(&mut cx).is_pending());
        drop(fut.take());
        release.send(()).unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 100);
        assert_eq!(cache.load(1).unwrap(), 100);
        assert_eq!(cache.get_with(2, || 2), 2, "permit free");
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "misses balance: {s:?}"
        );
        clock.advance(secs(700)); // past max_stale: the kept stale entry is reclaimable
        consistent(&cache, |_, _| 1, "after");
    }

    /// Lib docs: a panic of the weigher "reaches the caller that ran it, and leaves no key waiting,
    /// no load permit taken and no entry half-written". The leader's store panics in the weigher
    /// while a waiter is joined: the waiter is released, the permit comes back, counts agree.
    #[test]
    fn weigher_panic_on_the_store_with_a_waiter_and_a_load_limit() {
        let _w = watchdog("weigher panic");
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(1000)
            .weigher(|_k, v: &u64| {
                if *v == 13 {
                    panic!("weigher boom");
                }
                (*v % 7) as u32
            })
            .max_concurrent_loads(1)
            .record_stats()
            .build();
        for i in 0..20 {
            cache.insert(i + 100, 2 * i);
        }
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                c.get_with(1, || {
                    entered_tx.send(()).unwrap();
                    release_rx.recv_timeout(secs(30)).unwrap();
                    13
                })
            }))
        });
        entered.recv_timeout(secs(30)).unwrap();
        let c = cache.clone();
        let waiter = std::thread::spawn(move || c.get_with(1, || 6));
        until("waiter joined", || cache.stats().coalesced >= 1);
        release.send(()).unwrap();
        let l = leader.join().unwrap();
        assert!(l.is_err(), "the weigher's panic reaches the leader: {l:?}");
        let w = waiter
            .join()
            .expect("the waiter must not panic (its own init is fine)");
        assert!(w == 13 || w == 6, "waiter got {w}");
        assert_eq!(cache.get_with(2, || 2), 2, "permit free");
        consistent(&cache, |_, v| *v % 7, "after weigher panic");
    }

    /// Lib docs: a panicking Expiry leaves "no key waiting, no load permit taken and no entry
    /// half-written"; expire_after_create panicking on a loaded value with waiters joined.
    #[test]
    fn expiry_create_panic_after_the_loader_returned_with_waiters() {
        struct Boom;
        impl Expiry<u64, u64> for Boom {
            fn expire_after_create(&self, _k: &u64, v: &u64) -> Option<Duration> {
                if *v == 13 {
                    panic!("expiry boom");
                }
                Some(secs(60))
            }
        }
        let _w = watchdog("expiry panic");
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let entered_tx = std::sync::Mutex::new(entered_tx);
        let release_rx = std::sync::Mutex::new(release_rx);
        let clock = ManualClock::new();
        let first = AtomicBool::new(true);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .expire_after(Boom)
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if *k == 1 && first.swap(false, Ordering::SeqCst) {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    release_rx.lock().unwrap().recv_timeout(secs(30)).unwrap();
                    return Ok::<_, BoxError>(13);
                }
                Ok(*k)
            })
            .build();
        let c = cache.clone();
        let leader = std::thread::spawn(move || catch_unwind(AssertUnwindSafe(|| c.load(1))));
        entered.recv_timeout(secs(30)).unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || catch_unwind(AssertUnwindSafe(|| c.load(1))))
            })
            .collect();
        until("waiters joined", || cache.stats().coalesced >= 2);
        release.send(()).unwrap();
        let l = leader.join().unwrap();
        for w in waiters {
            let _ = w.join().unwrap(); // answered somehow: no hang
        }
        let _ = l;
        assert_eq!(cache.load(5).unwrap(), 5, "permit free");
        consistent(&cache, |_, _| 1, "after expiry panic");
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "misses balance: {s:?}"
        );
    }

    static ARMED: AtomicBool = AtomicBool::new(false);

    /// A key whose Hash panics for id 0 once armed.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct PKey(u64);
    impl Hash for PKey {
        fn hash<H: Hasher>(&self, h: &mut H) {
            if self.0 == 0 && ARMED.load(Ordering::SeqCst) {
                panic!("hash boom");
            }
            self.0.hash(h);
        }
    }

    /// Lib docs: a key's Hash panicking "reaches the caller that ran it, and leaves no key waiting,
    /// no load permit taken and no entry half-written". Loads of other keys whose stores evict (or
    /// otherwise rehash) a key whose Hash now panics: whatever the outcome, the cache stays
    /// consistent, no key hangs and permits come back.
    #[test]
    fn hash_panic_of_a_resident_key_during_loads_that_evict() {
        let _w = watchdog("hash panic");
        ARMED.store(false, Ordering::SeqCst);
        let evicted = Arc::new(AtomicU64::new(0));
        let e2 = Arc::clone(&evicted);
        let cache: Cache<PKey, u64> = Cache::builder()
            .max_capacity(4)
            .shards(1)
            .max_concurrent_loads(1)
            .record_stats()
            .eviction_listener(move |_k: &PKey, _v: &u64, c: RemovalCause| {
                if c == RemovalCause::Size {
                    e2.fetch_add(1, Ordering::SeqCst);
                }
            })
            .build();
        for i in 0..4 {
            cache.insert(PKey(i), i);
        }
        ARMED.store(true, Ordering::SeqCst);
        let mut panics = 0;
        for i in 10..60 {
            let r = catch_unwind(AssertUnwindSafe(|| cache.get_with(PKey(i), || i)));
            if r.is_err() {
                panics += 1;
            }
        }
        ARMED.store(false, Ordering::SeqCst);
        for i in 10..60 {
            // No key left waiting: every one answers.
            let v = cache.get_with(PKey(i), || i);
            assert_eq!(v, i);
        }
        consistent(&cache, |_, _| 1, &format!("after hash panics ({panics})"));
        assert!(cache.entry_count() <= 4);
    }

    /// Lib docs: "A panicking eviction listener panics the call that removed the entry (after the
    /// removal completed and every other removal was reported)". A load whose store evicts with
    /// a panicking listener, while a waiter is joined: the waiter gets the value, the value is
    /// stored, the permit comes back.
    #[test]
    fn listener_panic_on_an_eviction_caused_by_a_load_with_a_waiter() {
        let _w = watchdog("listener panic");
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(2)
            .shards(1)
            .max_concurrent_loads(1)
            .record_stats()
            .eviction_listener(|_k: &u64, _v: &u64, c: RemovalCause| {
                if c == RemovalCause::Size {
                    panic!("listener boom");
                }
            })
            .build();
        cache.insert(100, 100);
        cache.insert(101, 101);
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                c.get_with(1, || {
                    entered_tx.send(()).unwrap();
                    release_rx.recv_timeout(secs(30)).unwrap();
                    1
                })
            }))
        });
        entered.recv_timeout(secs(30)).unwrap();
        let c = cache.clone();
        let waiter =
            std::thread::spawn(move || catch_unwind(AssertUnwindSafe(|| c.get_with(1, || 9))));
        until("waiter joined", || cache.stats().coalesced >= 1);
        release.send(()).unwrap();
        let _ = leader.join().unwrap();
        let w = waiter.join().unwrap();
        assert_eq!(w.ok(), Some(1), "the waiter gets the loaded value");
        let _ = catch_unwind(AssertUnwindSafe(|| cache.get_with(2, || 2)));
        consistent(&cache, |_, _| 1, "after listener panic");
        assert!(cache.entry_count() <= 2);
    }

    /// An async loader that panics under max_concurrent_loads(1): LoadError::Panicked for its
    /// callers, and the permit comes back.
    #[test]
    fn async_loader_panic_releases_the_permit() {
        let _w = watchdog("async loader panic");
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .max_concurrent_loads(1)
            .async_loader(|k: &u64| {
                let k = *k;
                async move {
                    if k == 1 {
                        panic!("async boom");
                    }
                    Ok::<_, BoxError>(k)
                }
            })
            .build();
        let r = futures::executor::block_on(cache.load_async(1));
        assert!(matches!(r, Err(LoadError::Panicked)), "{r:?}");
        let r = futures::executor::block_on(cache.load_async(2));
        assert_eq!(r.unwrap(), 2);
        assert_eq!(futures::executor::block_on(cache.load_async(3)).unwrap(), 3);
        consistent(&cache, |_, _| 1, "after async panic");
    }

    /// max_concurrent_loads docs: "Async loads wait for their permit until they are dropped", and
    /// lib docs: a cancelled caller leaves "no load permit taken". Async leaders of expired keys
    /// (fail-safe on) queued for the only permit are dropped while queued: once the holder ends,
    /// every later load gets the permit (no queue slot or permit leaked), and the dropped
    /// leaders' keys load again.
    #[test]
    fn async_leaders_dropped_while_queued_for_a_permit_leak_nothing() {
        let _w = watchdog("queued async leaders");
        let clock = ManualClock::new();
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .build();
        for k in 1..=3 {
            cache.insert(k, k * 100);
        }
        clock.advance(secs(61));
        let c = cache.clone();
        let holder = std::thread::spawn(move || {
            c.get_with(9, || {
                entered_tx.send(()).unwrap();
                release_rx.recv_timeout(secs(30)).unwrap();
                9
            })
        });
        entered.recv_timeout(secs(30)).unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut futs: Vec<_> = (1..=3u64)
            .map(|k| Box::pin(cache.get_with_async(k, async move { k * 1000 })))
            .collect();
        for f in &mut futs {
            assert!(
                f.as_mut().poll(&mut cx).is_pending(),
                "queued behind the permit"
            );
        }
        // Drop the middle one, then the first.
        drop(futs.remove(1));
        drop(futs.remove(0));
        release.send(()).unwrap();
        assert_eq!(holder.join().unwrap(), 9);
        // The last queued one gets the permit now.
        let v = futures::executor::block_on(futs.remove(0));
        assert!(v == 3000 || v == 300, "{v}");
        for k in 1..=2u64 {
            let v = cache.get_with(k, || k * 1000);
            assert!(v == k * 1000 || v == k * 100, "key {k}: {v}");
        }
        assert_eq!(cache.get_with(20, || 20), 20, "the permit is free");
        assert_eq!(cache.loads_in_flight(), 0);
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "misses balance: {s:?}"
        );
    }

    /// Lib docs: a weigher panic "reaches the caller that ran it, and leaves no key waiting, no
    /// load permit taken and no entry half-written". Here on a fail-safe *retry* with a waiter
    /// joined: the retrier's value store panics in the weigher. Nothing hangs, the stale value
    /// is not lost to a half-written entry, the permit comes back, and weights agree.
    #[test]
    fn weigher_panic_on_a_fail_safe_retry_store_with_a_waiter() {
        let _w = watchdog("weigher panic on retry");
        let clock = ManualClock::new();
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(1000)
            .weigher(|_k, v: &u64| {
                if *v == 13 {
                    panic!("weigher boom");
                }
                (*v % 10) as u32
            })
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(1, 105);
        cache.insert(2, 7);
        clock.advance(secs(61));
        // First failure: the stale value answers, backoff to 71.
        let r: Result<u64, Arc<&str>> = cache.try_get_with(1, || Err("down"));
        assert_eq!(r.unwrap(), 105);
        clock.advance(secs(11));
        let c = cache.clone();
        let retrier = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                c.get_with(1, || {
                    entered_tx.send(()).unwrap();
                    release_rx.recv_timeout(secs(30)).unwrap();
                    13
                })
            }))
        });
        entered.recv_timeout(secs(30)).unwrap();
        // Within the retry: the stale value at once.
        assert_eq!(cache.get_with(1, || 9), 105);
        release.send(()).unwrap();
        assert!(
            retrier.join().unwrap().is_err(),
            "the weigher's panic reaches the retrier"
        );
        let v = cache.get_with(1, || 21);
        assert!(v == 105 || v == 21, "after the panicked store: {v}");
        assert_eq!(cache.get_with(3, || 3), 3, "permit free");
        cache.validate();
        clock.advance(secs(700)); // every stale window over
        consistent(&cache, |_, v| *v % 10, "after weigher panic on retry");
    }

    /// A future that stays pending until `gate` holds a result (polled by hand with a noop waker).
    fn gated(
        gate: Arc<std::sync::Mutex<Option<Result<u64, &'static str>>>>,
    ) -> impl Future<Output = Result<u64, &'static str>> + Send + 'static {
        std::future::poll_fn(move |_cx| match gate.lock().unwrap().take() {
            Some(r) => std::task::Poll::Ready(r),
            None => std::task::Poll::Pending,
        })
    }

    /// get_with_async_shared docs: when the leading future is dropped "the waiters drive the load
    /// to completion"; fail_safe: a failed load of an expired key answers its callers with the
    /// last value and starts the backoff. The shared leader is dropped, the waiter drives the
    /// load, the load fails: the waiter gets the last value; the next caller is answered within
    /// the backoff with no load; nothing is left in flight.
    #[test]
    fn shared_load_leader_dropped_waiter_drives_a_failing_load_to_the_stale_value() {
        let _w = watchdog("shared leader dropped");
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let gate = Arc::new(std::sync::Mutex::new(None));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut a = Box::pin(cache.try_get_with_async_shared(1, gated(Arc::clone(&gate))));
        assert!(a.as_mut().poll(&mut cx).is_pending());
        let mut b = Box::pin(cache.try_get_with_async_shared(1, async { Ok::<u64, &str>(999) }));
        assert!(
            b.as_mut().poll(&mut cx).is_pending(),
            "joins the shared load"
        );
        drop(a);
        *gate.lock().unwrap() = Some(Err("down"));
        let r = match b.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => futures::executor::block_on(b),
        };
        assert_eq!(
            r.ok(),
            Some(100),
            "the failed shared load answers its waiter with the last value"
        );
        let calls = std::sync::atomic::AtomicU64::new(0);
        let v = cache.get_with(1, || {
            calls.fetch_add(1, Ordering::SeqCst);
            5
        });
        assert_eq!(
            (v, calls.load(Ordering::SeqCst)),
            (100, 0),
            "within the backoff: no load"
        );
        assert_eq!(cache.loads_in_flight(), 0);
        assert_eq!(cache.get_with(2, || 2), 2, "permit free");
    }

    /// get_with_async_shared docs: the load "is cancelled … only when every async caller waiting
    /// on it is gone", and "no two loads of a key overlap". Both shared callers of an expired
    /// key's load dropped: the permit comes back, and the key loads again (or is answered stale
    /// within a backoff), never hangs.
    #[test]
    fn shared_load_all_callers_dropped_releases_permit_and_key() {
        let _w = watchdog("shared all dropped");
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let gate = Arc::new(std::sync::Mutex::new(None));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut a = Box::pin(cache.try_get_with_async_shared(1, gated(Arc::clone(&gate))));
        assert!(a.as_mut().poll(&mut cx).is_pending());
        let mut b = Box::pin(cache.try_get_with_async_shared(1, gated(Arc::clone(&gate))));
        assert!(b.as_mut().poll(&mut cx).is_pending());
        drop(b);
        drop(a);
        assert_eq!(cache.loads_in_flight(), 0);
        let v = cache.get_with(1, || 7);
        assert!(v == 100 || v == 7, "{v}");
        assert_eq!(cache.get_with(2, || 2), 2, "permit free");
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "misses balance: {s:?}"
        );
    }

    /// Lib docs: "A write or invalidation of the key while it loads wins: the loaded value goes to
    /// the callers already waiting, but is not stored"; invalidate_all "Removes every entry, at one
    /// instant". A first load of a key (no entry yet) running across invalidate_all: its value
    /// must not be stored after the invalidation (a value loaded from before the invalidation).
    #[test]
    fn invalidate_all_during_a_first_load_wins() {
        let _w = watchdog("invalidate_all first load");
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, u64> = Cache::new(100);
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            c.get_with(1, || {
                entered_tx.send(()).unwrap();
                release_rx.recv_timeout(secs(30)).unwrap();
                5
            })
        });
        entered.recv_timeout(secs(30)).unwrap();
        cache.invalidate_all();
        release.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), 5, "the leader gets its value");
        assert_eq!(
            cache.get(&1),
            None,
            "a load that began before invalidate_all was stored after it"
        );
    }

    /// A get_with init panic is a failed load for fail-safe (fail_safe: "a panic … of a get_with
    /// init, whose panic still goes to its own caller"): its waiters get the old value. Found
    /// counting two where a builder loader's panic counts one (round 84); now documented
    /// (CacheStats::stale_served_after_ttl: a load "ended by a panic of its leader's own `init`
    /// … each waiter of such a load claims the key again and finds the backoff started"): each
    /// waiter counts, the leader (which gets the panic) does not, and misses balance.
    #[test]
    fn init_panic_with_two_waiters_counts_each_stale_answer() {
        let _w = watchdog("init panic count");
        let clock = ManualClock::new();
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                c.get_with(1, || {
                    entered_tx.send(()).unwrap();
                    release_rx.recv_timeout(secs(30)).unwrap();
                    panic!("init boom")
                })
            }))
        });
        entered.recv_timeout(secs(30)).unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || c.get_with(1, || 9))
            })
            .collect();
        until("waiters joined", || cache.stats().coalesced >= 2);
        release.send(()).unwrap();
        assert!(
            leader.join().unwrap().is_err(),
            "the init's panic reaches its caller"
        );
        for w in waiters {
            assert_eq!(w.join().unwrap(), 100, "waiters get the last value");
        }
        let s = cache.stats();
        assert_eq!(
            s.stale_served_after_ttl, 2,
            "two waiters, each answered by itself: {s:?}"
        );
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "misses balance: {s:?}"
        );
    }

    /// The same count for a builder loader's panic (its callers get the last value): one failed
    /// load answering three callers counts once.
    #[test]
    fn loader_panic_with_two_waiters_counts_one_stale_answer() {
        let _w = watchdog("loader panic count");
        let clock = ManualClock::new();
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let entered_tx = std::sync::Mutex::new(entered_tx);
        let release_rx = std::sync::Mutex::new(release_rx);
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| -> Result<u64, BoxError> {
                entered_tx.lock().unwrap().send(()).unwrap();
                release_rx.lock().unwrap().recv_timeout(secs(30)).unwrap();
                panic!("loader boom")
            })
            .build();
        cache.insert(1, 100);
        clock.advance(secs(61));
        let c = cache.clone();
        let leader = std::thread::spawn(move || c.load(1));
        entered.recv_timeout(secs(30)).unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || c.load(1))
            })
            .collect();
        until("waiters joined", || cache.stats().coalesced >= 2);
        release.send(()).unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 100);
        for w in waiters {
            assert_eq!(w.join().unwrap().unwrap(), 100);
        }
        let s = cache.stats();
        assert_eq!(
            s.stale_served_after_ttl, 1,
            "one failed load answering three callers: {s:?}"
        );
    }

    /// max_concurrent_loads docs: a load nested in a load that holds a permit "runs under that
    /// permit"; lib docs: a panic of an init "reaches its own caller … leaves no key waiting, no
    /// load permit taken". A nested init panics (caught by the outer init), with fail-safe on and
    /// the nested key expired: the outer load completes, the nested key is not left waiting, and
    /// the only permit is free afterwards.
    #[test]
    fn nested_init_panic_under_the_only_permit() {
        let _w = watchdog("nested panic");
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .max_concurrent_loads(1)
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(2, 200);
        clock.advance(secs(61));
        let v = cache.get_with(1, || {
            let inner = catch_unwind(AssertUnwindSafe(|| {
                cache.get_with(2, || panic!("inner boom"))
            }));
            assert!(inner.is_err(), "the nested init's panic reaches its caller");
            1
        });
        assert_eq!(v, 1);
        // Key 2: its failed (panicked) load left the last value for the backoff.
        assert_eq!(
            cache.get_with(2, || 22),
            200,
            "fail-safe after the nested init's panic"
        );
        assert_eq!(cache.get_with(3, || 3), 3, "the permit is free");
        clock.advance(secs(11));
        assert_eq!(
            cache.get_with(2, || 22),
            22,
            "retry after the backoff loads"
        );
        assert_eq!(cache.loads_in_flight(), 0);
        let s = cache.stats();
        assert_eq!(
            s.misses,
            s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
            "misses balance: {s:?}"
        );
    }

    static DROP_ARMED: AtomicBool = AtomicBool::new(false);

    #[derive(Clone, Debug, PartialEq)]
    struct Bomb(u64);
    impl Drop for Bomb {
        fn drop(&mut self) {
            if self.0 == 666 && DROP_ARMED.swap(false, Ordering::SeqCst) {
                panic!("drop boom");
            }
        }
    }

    /// Lib docs: a value's Drop panicking "reaches the caller that ran it, and leaves no key
    /// waiting, no load permit taken and no entry half-written". A load's store evicts (for size)
    /// a value whose Drop panics, with a waiter joined: the waiter gets the loaded value, the
    /// permit comes back, and the cache is consistent.
    #[test]
    fn drop_panic_of_an_evicted_value_on_a_load_store_with_a_waiter() {
        let _w = watchdog("drop panic");
        DROP_ARMED.store(false, Ordering::SeqCst);
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let cache: Cache<u64, Bomb> = Cache::builder()
            .max_capacity(1)
            .shards(1)
            .eviction_policy(herdcache::EvictionPolicy::lru())
            .max_concurrent_loads(1)
            .record_stats()
            .build();
        cache.insert(5, Bomb(666));
        for _ in 0..50 {
            assert_eq!(cache.get(&1), None); // key 1 hot: its store is admitted, key 5 evicted
        }
        let c = cache.clone();
        let leader = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                c.get_with(1, || {
                    entered_tx.send(()).unwrap();
                    release_rx.recv_timeout(secs(30)).unwrap();
                    Bomb(7)
                })
            }))
        });
        entered.recv_timeout(secs(30)).unwrap();
        DROP_ARMED.store(true, Ordering::SeqCst);
        let c = cache.clone();
        let waiter = std::thread::spawn(move || c.get_with(1, || Bomb(9)));
        until("waiter joined", || cache.stats().coalesced >= 1);
        release.send(()).unwrap();
        let _ = leader.join().unwrap();
        let w = waiter.join().expect("the waiter must not panic");
        assert_eq!(w, Bomb(7), "the waiter gets the loaded value");
        assert!(
            !DROP_ARMED.swap(false, Ordering::SeqCst),
            "the evicted value's Drop ran (and panicked)"
        );
        assert_eq!(cache.get_with(2, || Bomb(2)), Bomb(2), "permit free");
        assert_eq!(cache.loads_in_flight(), 0);
        consistent(&cache, |_, _| 1, "after drop panic");
        assert!(cache.entry_count() <= 1);
    }

    static CLONE_ARMED: AtomicBool = AtomicBool::new(false);

    #[derive(Debug, PartialEq, Eq, Hash)]
    struct CKey(u64);
    impl Clone for CKey {
        fn clone(&self) -> Self {
            if self.0 == 13 && CLONE_ARMED.load(Ordering::SeqCst) {
                panic!("clone boom");
            }
            CKey(self.0)
        }
    }

    /// get_all docs: "If user code panics while the loaded values are stored — … a key's or
    /// value's Clone … — every other loaded value is stored first (the key whose store panicked
    /// ends as a failed load: its waiters load it again), then the first such panic is resumed."
    /// With fail-safe and the keys expired, a waiter on the panicking key is released (no hang),
    /// the other key's value is stored, and the cache stays consistent.
    #[test]
    fn get_all_key_clone_panic_on_store_with_a_waiter_under_fail_safe() {
        let _w = watchdog("get_all clone panic");
        CLONE_ARMED.store(false, Ordering::SeqCst);
        let clock = ManualClock::new();
        let cache: Cache<CKey, u64> = Cache::builder()
            .max_capacity(100)
            .time_to_live(secs(60))
            .fail_safe(secs(600))
            .refresh_backoff(secs(10))
            .record_stats()
            .clock(clock.clone())
            .build();
        cache.insert(CKey(12), 1200);
        cache.insert(CKey(13), 1300);
        clock.advance(secs(61));
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let c = cache.clone();
        let batch = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                c.get_all([CKey(12), CKey(13)], |missing| {
                    assert_eq!(missing.len(), 2);
                    entered_tx.send(()).unwrap();
                    release_rx.recv_timeout(secs(30)).unwrap();
                    CLONE_ARMED.store(true, Ordering::SeqCst);
                    [(CKey(12), 12), (CKey(13), 13)].into_iter().collect()
                })
            }))
        });
        entered.recv_timeout(secs(30)).unwrap();
        let c = cache.clone();
        let waiter = std::thread::spawn(move || {
            // Built before arming: the waiter's own key is never cloned by this thread after.
            c.get_with(CKey(13), || 99)
        });
        until("waiter joined", || cache.stats().coalesced >= 1);
        release.send(()).unwrap();
        let r = batch.join().unwrap();
        let w = waiter.join();
        CLONE_ARMED.store(false, Ordering::SeqCst);
        let w = w.expect("the waiter must be answered, not panic");
        assert!(
            [13, 99, 1300].contains(&w),
            "waiter got {w} (batch: {:?})",
            r.as_ref().map(|m| m.len())
        );
        assert_eq!(
            cache.get(&CKey(12)),
            Some(12),
            "the other loaded value is stored"
        );
        assert!(cache.get_with(CKey(13), || 131) > 0);
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

/// `Cache::health` and `Cache::sizing` on odd configurations.
mod health {
    use super::secs;

    use herdcache::{Cache, CacheBuilder, Health, ManualClock, Sizing, Warning};
    use std::time::Duration;

    fn unit(x: f64, what: &str) {
        assert!(
            x.is_finite() && (0.0..=1.0).contains(&x),
            "{what}: {x} not a ratio in [0, 1]"
        );
    }

    /// Sizing docs: points are "(capacity, predicted hit ratio as a fraction in 0..=1) … ordered by
    /// capacity: 0.25, 0.5, 1, 2 and 4 × max_capacity (… at least 1)"; rate "in 0..=1";
    /// suggested_capacity is a tracked capacity above max_capacity.
    fn check_sizing(s: &Sizing, max: u64, what: &str) {
        for (name, pts) in [
            ("points", s.points()),
            ("since_start", s.points_since_start()),
        ] {
            assert_eq!(pts.len(), 5, "{what}");
            for w in pts.windows(2) {
                assert!(
                    w[0].0 <= w[1].0,
                    "{what}: {name} not ordered by capacity: {pts:?}"
                );
            }
            for &(c, r) in pts {
                assert!(c >= 1, "{what}: {name} capacity below 1: {pts:?}");
                unit(r, &format!("{what}: {name} at {c}"));
            }
            if max >= 4 {
                assert_eq!(
                    pts[2].0, max,
                    "{what}: {name} 1 × point is max_capacity: {pts:?}"
                );
                assert!(
                    pts[0].0 <= max / 4 + 1,
                    "{what}: {name} 0.25 × point: {pts:?}"
                );
            }
        }
        unit(s.observed(), &format!("{what}: observed"));
        unit(
            s.observed_since_start(),
            &format!("{what}: observed_since_start"),
        );
        unit(s.rate(), &format!("{what}: rate"));
        assert!(
            s.samples().is_finite() && s.samples() >= 0.0,
            "{what}: samples {}",
            s.samples()
        );
        for c in [0, 1, max / 2, max, u64::MAX] {
            unit(s.predicted_at(c), &format!("{what}: predicted_at({c})"));
        }
        if let Some(c) = s.suggested_capacity() {
            assert!(
                c > max,
                "{what}: suggested {c} not above max_capacity {max}"
            );
            assert!(
                s.points().iter().any(|p| p.0 == c),
                "{what}: suggested {c} not a point"
            );
        }
    }

    fn check_health(h: &Health, max: u64, what: &str) {
        for w in h.warnings() {
            let _ = w.to_string(); // Display must not panic
            assert!(Warning::KINDS.contains(&w.kind()), "{what}");
            match w {
                Warning::SynchronizedExpiry { share, .. } => {
                    unit(*share, &format!("{what}: share"))
                }
                Warning::Thrashing {
                    hit_ratio, sizing, ..
                } => {
                    if let Some((a, b)) = hit_ratio {
                        unit(*a, &format!("{what}: thrashing first half"));
                        unit(*b, &format!("{what}: thrashing second half"));
                    }
                    if let Some(s) = sizing {
                        check_sizing(s, max, &format!("{what}: thrashing sizing"));
                    }
                }
                Warning::LoadLimitSaturated { waited, loads, .. } => {
                    assert!(*loads > 0, "{what}: {waited}/{loads}");
                }
                _ => {}
            }
        }
    }

    /// A mixed workload: a hot set, a scan, misses filled by inserts and loads, time moving.
    fn drive(cache: &Cache<u64, u64>, clock: &ManualClock) {
        for i in 0..6000u64 {
            let k = if i % 3 == 0 {
                i % 7
            } else {
                (i * 2654435761) % 5000
            };
            if cache.get(&k).is_none() {
                if i % 2 == 0 {
                    cache.insert(k, k);
                } else {
                    cache.get_with(k, || k);
                }
            }
            if i % 500 == 0 {
                clock.advance(secs(7));
                let _ = cache.health();
            }
        }
    }

    fn base(max: u64, clock: &ManualClock) -> CacheBuilder<u64, u64> {
        Cache::builder()
            .max_capacity(max)
            .time_to_live(secs(120))
            .record_stats()
            .track_sizing()
            .clock(clock.clone())
    }

    /// Odd capacities and weights: neither health() nor sizing() may panic, and every figure must
    /// be a ratio in [0, 1] with points ordered by capacity.
    #[test]
    fn odd_capacities_and_weights_give_sane_health_and_sizing() {
        type Cfg = (
            &'static str,
            u64,
            Option<fn(&u64, &u64) -> u32>,
            Option<usize>,
        );
        let cfgs: [Cfg; 11] = [
            ("cap0", 0, None, None),
            ("cap1", 1, None, None),
            ("cap1_shards64", 1, None, Some(64)),
            ("cap_max", u64::MAX, None, None),
            ("cap_max_shards1", u64::MAX, None, Some(1)),
            ("zero_weights", 10, Some(|_, _| 0), None),
            ("zero_weights_cap0", 0, Some(|_, _| 0), None),
            (
                "huge_weights_cap_max",
                u64::MAX,
                Some(|_, _| u32::MAX),
                None,
            ),
            ("huge_weights_cap1", 1, Some(|_, _| u32::MAX), None),
            (
                "mixed_weights",
                3000,
                Some(|k, _| if k % 3 == 0 { 0 } else { (*k % 1000) as u32 }),
                Some(1024),
            ),
            (
                "cap_u32max",
                u32::MAX as u64,
                Some(|_, _| u32::MAX),
                Some(1),
            ),
        ];
        for (name, max, weigher, shards) in cfgs {
            let clock = ManualClock::new();
            let mut b = base(max, &clock);
            if let Some(w) = weigher {
                b = b.weigher(w);
            }
            if let Some(n) = shards {
                b = b.shards(n);
            }
            let cache = match b.try_build() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{name}: refused: {e}");
                    continue;
                }
            };
            let s = cache.sizing().expect("tracked");
            check_sizing(&s, max, &format!("{name} (fresh)"));
            check_health(&cache.health(), max, &format!("{name} (fresh)"));
            drive(&cache, &clock);
            let s = cache.sizing().expect("tracked");
            check_sizing(&s, max, name);
            check_health(&cache.health(), max, name);
            check_health(
                &cache.health_over(Duration::ZERO),
                max,
                &format!("{name} window 0"),
            );
            check_health(
                &cache.health_over(Duration::MAX),
                max,
                &format!("{name} window MAX"),
            );
            let st = cache.stats();
            unit(st.hit_ratio(), &format!("{name}: hit_ratio"));
            unit(st.miss_ratio(), &format!("{name}: miss_ratio"));
            if max != u64::MAX {
                assert!(
                    cache.weighted_size() <= max,
                    "{name}: weighted_size above max_capacity"
                );
            }
            cache.validate();
        }
    }

    /// A capacity-1 cache alternating two keys thrashes: the Thrashing warning's figures and the
    /// sizing curve it quotes must be sane, and a bigger capacity predicted at least as good.
    #[test]
    fn thrashing_on_capacity_one_is_reported_sanely() {
        let clock = ManualClock::new();
        let cache: Cache<u64, u64> = base(1, &clock).shards(1).build();
        let mut saw = false;
        for _round in 0..12 {
            for i in 0..400u64 {
                let k = i % 2;
                if cache.get(&k).is_none() {
                    cache.insert(k, k);
                }
            }
            clock.advance(secs(5));
            let h = cache.health();
            check_health(&h, 1, "cap1 thrash");
            saw |= h.warnings().iter().any(|w| w.kind() == "thrashing");
        }
        let s = cache.sizing().unwrap();
        check_sizing(&s, 1, "cap1 thrash");
        assert!(
            saw,
            "two keys alternating in a one-entry cache: thrashing expected"
        );
    }

    /// CacheStats docs count exact hits and misses; round 82: "sixteen timed caches per thread keep
    /// exact access counts". Forty timed, tracked caches read from one thread: every cache's
    /// counts exact, and its sizing and health sane.
    #[test]
    fn many_timed_caches_on_one_thread_keep_exact_counts() {
        let clock = ManualClock::new();
        let caches: Vec<Cache<u64, u64>> = (0..40)
            .map(|i| {
                let b = base(100 + i, &clock);
                if i % 2 == 0 {
                    b.weigher(|_, v| (*v % 3) as u32).build()
                } else {
                    b.build()
                }
            })
            .collect();
        for c in &caches {
            for k in 0..10 {
                c.insert(k, k);
            }
        }
        for round in 0..50u64 {
            for (i, c) in caches.iter().enumerate() {
                for k in 0..=(i as u64 % 10) {
                    assert_eq!(c.get(&k), Some(k));
                }
                assert_eq!(c.get(&(1000 + round)), None);
            }
            if round % 10 == 0 {
                clock.advance(Duration::from_millis(100));
            }
        }
        for (i, c) in caches.iter().enumerate() {
            let s = c.stats();
            let hits = 50 * (i as u64 % 10 + 1);
            assert_eq!((s.hits, s.misses), (hits, 50), "cache {i}: exact counts");
            check_sizing(&c.sizing().unwrap(), 100 + i as u64, &format!("cache {i}"));
            check_health(&c.health(), 100 + i as u64, &format!("cache {i}"));
        }
    }

    /// Caches built and dropped on one thread in turn (each with a time to live and stats): a new
    /// cache's counts start from zero and stay exact whatever its predecessors did.
    #[test]
    fn caches_built_and_dropped_on_one_thread_count_exactly() {
        for i in 0..40u64 {
            let clock = ManualClock::new();
            let c: Cache<u64, u64> = base(50, &clock).build();
            c.insert(1, 1);
            for _ in 0..i {
                assert_eq!(c.get(&1), Some(1));
            }
            assert_eq!(c.get(&2), None);
            let s = c.stats();
            assert_eq!((s.hits, s.misses), (i, 1), "cache {i}");
            check_sizing(&c.sizing().unwrap(), 50, &format!("cache {i}"));
        }
    }

    /// The clock at its extremes (advance(Duration::MAX) is documented as allowed, and a rewind is
    /// never seen by the cache): health and sizing stay sane and do not panic.
    #[test]
    fn health_and_sizing_across_clock_extremes() {
        for ttl in [Duration::from_nanos(1), secs(60), Duration::MAX] {
            let clock = ManualClock::new();
            let cache: Cache<u64, u64> = base(500, &clock)
                .time_to_live(ttl)
                .refresh_after(secs(1))
                .loader(|k: &u64| Ok::<_, herdcache::BoxError>(*k))
                .build();
            drive(&cache, &clock);
            check_health(&cache.health(), 500, "before jump");
            clock.advance(Duration::from_nanos(u64::MAX / 2));
            drive(&cache, &clock);
            check_health(&cache.health(), 500, "after a huge jump");
            clock.rewind(Duration::MAX);
            drive(&cache, &clock);
            check_health(&cache.health(), 500, "after a rewind");
            clock.advance(Duration::MAX);
            drive(&cache, &clock);
            check_health(&cache.health(), 500, "at the end of the clock");
            check_health(&cache.health_over(Duration::MAX), 500, "end, window MAX");
            check_sizing(&cache.sizing().unwrap(), 500, "end");
            cache.validate();
        }
    }

    /// Warning::SynchronizedExpiry: "Entries due within the busiest interval (writes counted, at
    /// most the entries present)" and "Their share of the entries". Keys overwritten many times
    /// at one instant, then mostly invalidated: due never above the entries present, share a
    /// ratio in [0, 1].
    #[test]
    fn synchronized_expiry_counts_at_most_the_entries_present() {
        for shards in [1, 64] {
            let clock = ManualClock::new();
            let cache: Cache<u64, u64> = base(10_000, &clock).shards(shards).build();
            for round in 0..10 {
                for k in 0..200 {
                    cache.insert(k, k + round);
                }
            }
            for step in 0..3 {
                if step == 1 {
                    cache.invalidate_entries_if(|k, _| *k >= 20).unwrap();
                }
                if step == 2 {
                    cache.invalidate_all();
                    for k in 0..5 {
                        cache.insert(k, k);
                    }
                }
                let present = cache.entry_count();
                let h = cache.health();
                check_health(&h, 10_000, "sync");
                for w in h.warnings() {
                    if let Warning::SynchronizedExpiry { due, share, .. } = w {
                        assert!(
                            *due <= present,
                            "shards {shards} step {step}: due {due} > present {present}"
                        );
                        unit(*share, "share");
                    }
                }
            }
        }
    }
}
