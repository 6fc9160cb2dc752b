#![cfg(feature = "redis")]
#![allow(clippy::type_complexity)]
//! Round 90: the Redis tier's forgo mark (round 89) on ways a load or refresh can end after
//! its read found a missed tombstone (instance A is deaf, `deaf_url`; B invalidates);
//! `or_insert`/`or_default` with and without fail-safe (plain and tiered); the clock's end with
//! the tier. 14 tests; three failed:
//!
//! * `async_load_cancelled_at_the_read_await_after_reading_the_tombstone` and
//!   `async_refresh_dropped_at_the_read_await_after_reading_the_tombstone`: an async load or
//!   refresh dropped at the await of its Redis read *after* the read completed (the tombstone
//!   counted in `remote.misses`) never marked its flight (the mark was set only when the
//!   future was polled again), so the copy B invalidated was served: by the backoff the
//!   abandoned load started (`load_async`, `get_or_stale`), and by `get_or_stale` past the
//!   refreshed copy's time to live. Fixed: the read marks the load itself, on the helper
//!   thread that runs the round trip registered for the load's flight.
//! * `entry_min`: an `or_insert` waiting for a load of the key that fails counted 1 miss and
//!   no coalesced with fail-safe, 2 misses and 1 coalesced without — a third corner the docs
//!   did not name; now documented (`EntryRef::or_insert`), and the test checks that count.

mod common;

use common::tier::*;
use common::{eventually, Gate};
use herdcache::codec::Plain;
use herdcache::redis::TieredCache;
use herdcache::{BoxError, Cache, CacheBuilder, LoadError, ManualClock};
use herdcache_testkit::redis_server::RedisServer;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// After the mark: a value A writes is its last value again once it expires (fail-safe).
fn fail_safe_works_again(a: &TieredCache<u64, String>, clock: &ManualClock, asynchronous: bool) {
    a.insert(1, "new".to_string());
    clock.advance(Duration::from_secs(61));
    let stale = a.get_or_stale(&1);
    let r = if asynchronous {
        runtime().block_on(a.load_async(1))
    } else {
        a.load(1)
    };
    assert!(
        stale.as_deref() == Some("new") && r.as_deref().ok() == Some("new"),
        "a value inserted after the mark is fail-safe's again: get_or_stale {stale:?}, failed \
         load {r:?}"
    );
}

/// src/redis/mod.rs / fail_safe.rs: "a load whose read of Redis finds a tombstone newer than
/// every version of the key this instance wrote, heard of or read before ... does not fall
/// back, and its failure drops the old value"; round 89: "any load or refresh whose read found
/// the value invalidated marks it as no fallback however it ends".
///
/// A (deaf) loaded key 1 (async loader); B invalidates it (missed). Past the copy's time to
/// live, backend down, A's `load_async(1)` is polled once (it sends its Redis read) and dropped
/// once the read has completed (A's `remote.misses` counted the tombstone) — cancelled at the
/// read's await. The next `load_async` (within the backoff the abandoned load set) and then
/// `get_or_stale` must not answer with the invalidated copy.
#[test]
fn async_load_cancelled_at_the_read_await_after_reading_the_tombstone() {
    let _w = common::watchdog(Duration::from_secs(30), "cancel at the read");
    let server = RedisServer::start();
    let ns = "h90cr";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let hang = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicBool::new(false));
    let a = fs_tier(deaf_url(&server), ns)
        .build(
            async_fail_safe_builder(&clock, &down, &hang, &entered),
            Plain,
        )
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    let rt = runtime();
    // The first poll may find the round trip already done (the helper thread was quicker):
    // then the load ran to its end, and the case is tried again on another key.
    for k in 1..=20u64 {
        down.store(false, Ordering::SeqCst);
        let old = rt.block_on(a.load_async(k)).unwrap();
        b.invalidate(&k); // lost for A
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let m0 = a.stats().remote.misses;
        let first = rt.block_on(async {
            let mut fut = Box::pin(a.load_async(k));
            let mut cx = Context::from_waker(Waker::noop());
            let first = fut.as_mut().poll(&mut cx);
            if first.is_pending() {
                assert!(
                    eventually(|| a.stats().remote.misses > m0),
                    "the read of the tombstone completed"
                );
            }
            drop(fut);
            first.is_pending()
        });
        if !first {
            continue;
        }
        let r = rt.block_on(a.load_async(k));
        let stale = a.get_or_stale(&k);
        assert!(
            stale.as_deref() != Some(old.as_str()) && r.as_deref().ok() != Some(old.as_str()),
            "the cancelled load's read found B's tombstone; afterwards get_or_stale {stale:?}, \
             load {r:?} (the invalidated copy {old:?}; stats {:?})",
            a.stats()
        );
        return;
    }
    panic!("no first poll of 20 was pending");
}

/// The same load cancelled inside its loader (after the read): nothing serves the copy, and a
/// later insert is fail-safe's again.
#[test]
fn async_load_cancelled_in_its_loader_then_fail_safe_works_again() {
    let _w = common::watchdog(Duration::from_secs(30), "cancel in loader");
    let server = RedisServer::start();
    let ns = "h90cl";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let hang = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicBool::new(false));
    let a = fs_tier(deaf_url(&server), ns)
        .build(
            async_fail_safe_builder(&clock, &down, &hang, &entered),
            Plain,
        )
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    let rt = runtime();
    let old = rt.block_on(a.load_async(1)).unwrap();
    b.invalidate(&1);
    clock.advance(Duration::from_secs(61));
    down.store(true, Ordering::SeqCst);
    hang.store(true, Ordering::SeqCst);
    rt.block_on(async {
        let mut fut = Box::pin(a.load_async(1));
        while !entered.load(Ordering::SeqCst) {
            let done =
                std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await;
            assert!(!done, "the load ended");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(fut);
    });
    hang.store(false, Ordering::SeqCst);
    let stale = a.get_or_stale(&1);
    let r = rt.block_on(a.load_async(1));
    assert!(
        stale.as_deref() != Some(old.as_str()) && r.as_deref().ok() != Some(old.as_str()),
        "cancelled in its loader after the tombstone: get_or_stale {stale:?}, load {r:?}"
    );
    fail_safe_works_again(&a, &clock, true);
}

/// A sync load reads the tombstone and blocks in its loader; a `load_with_timeout` caller
/// joins it and times out: "A timed-out wait whose load found the old value invalidated ...
/// falls back on nothing". Then the load fails; afterwards nothing serves the copy, and a later
/// insert is fail-safe's again.
#[test]
fn soft_timeout_joining_a_load_that_read_the_tombstone() {
    let _w = common::watchdog(Duration::from_secs(30), "soft timeout");
    let server = RedisServer::start();
    let ns = "h90st";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
    let builder: CacheBuilder<u64, String> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if d.load(Ordering::SeqCst) {
                g.pass();
                return Err(BoxError::from("backend down"));
            }
            Ok(format!("a{k}"))
        });
    let a = Arc::new(
        fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap(),
    );
    let b = fs_instance(&server, ns, &clock);
    let old = a.load(1).unwrap();
    b.invalidate(&1);
    clock.advance(Duration::from_secs(61));
    down.store(true, Ordering::SeqCst);
    let a2 = Arc::clone(&a);
    let leader = common::start(move || a2.load(1));
    gate.wait_entered();
    let t = a.load_with_timeout(1, Some(Duration::from_millis(50)));
    let stale_during = a.get_or_stale(&1);
    gate.open();
    let led = leader
        .wait(Duration::from_secs(20))
        .expect("leader ended")
        .unwrap();
    down.store(false, Ordering::SeqCst);
    let stale_after = a.get_or_stale(&1);
    assert!(
        !matches!(&t, Ok(v) if *v == old)
            && stale_during.as_deref() != Some(old.as_str())
            && !matches!(&led, Ok(v) if *v == old)
            && stale_after.as_deref() != Some(old.as_str()),
        "timed-out join {t:?}, get_or_stale during {stale_during:?}, leader {led:?}, after \
         {stale_after:?} (invalidated copy {old:?})"
    );
    assert!(matches!(t, Err(LoadError::Timeout)) || t.is_err(), "{t:?}");
    down.store(true, Ordering::SeqCst);
    gate.close();
    gate.open();
    fail_safe_works_again(&a, &clock, false);
}

/// fail_safe.rs: a load that read a missed tombstone "does not fall back, and its failure drops
/// the old value"; src/redis/tier.rs `loaded_past`: a load that read the tombstone and *stored
/// its value locally* makes the local copy "from after that tombstone". The weigher's docs: "an
/// entry heavier than `max_capacity` is not stored".
///
/// A (deaf, `max_value_size(8)`, weigher = length, `max_capacity(100)`) loaded "a1" (short);
/// B invalidates (missed). Expired, A's load reads the tombstone and loads a 200-byte value:
/// too large for Redis (the tombstone stays) and too heavy to store locally. Backend down
/// afterwards: A's failed load must not fall back on the copy B invalidated (nothing A stored
/// is from after the tombstone), nor may `get_or_stale` serve it.
#[test]
fn load_past_the_tombstone_whose_value_is_not_stored_leaves_no_fallback() {
    past_the_tombstone_value_not_stored(false);
}

/// The same through a refresh of the live copy (`refresh_after` 30 s): the refresh reads the
/// tombstone and loads the heavy value, which is not stored; past the copy's time to live, a
/// failed load and `get_or_stale` must not serve it.
#[test]
fn refresh_past_the_tombstone_whose_value_is_not_stored_leaves_no_fallback() {
    past_the_tombstone_value_not_stored(true);
}

fn past_the_tombstone_value_not_stored(refresh: bool) {
    let _w = common::watchdog(Duration::from_secs(30), "heavy load past tombstone");
    let server = RedisServer::start();
    let ns = if refresh { "h90hvr" } else { "h90hv" };
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let heavy = Arc::new(AtomicBool::new(false));
    let (d, h) = (Arc::clone(&down), Arc::clone(&heavy));
    let builder: CacheBuilder<u64, String> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .weigher(|_k: &u64, v: &String| v.len() as u32)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if d.load(Ordering::SeqCst) {
                return Err(BoxError::from("backend down"));
            }
            Ok(if h.load(Ordering::SeqCst) {
                "H".repeat(200)
            } else {
                format!("a{k}")
            })
        });
    let builder = if refresh {
        builder.refresh_after(Duration::from_secs(30))
    } else {
        builder
    };
    let a = fs_tier(deaf_url(&server), ns)
        .max_value_size(8)
        .build(builder, Plain)
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    let old = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    if refresh {
        clock.advance(Duration::from_secs(31));
        heavy.store(true, Ordering::SeqCst);
        let _ = a.get(&1); // the refresh runs in this thread
        assert!(eventually(|| a.stats().refreshes_started >= 1), "refreshed");
        clock.advance(Duration::from_secs(30));
    } else {
        clock.advance(Duration::from_secs(61));
        heavy.store(true, Ordering::SeqCst);
        let big = a.load(1).unwrap();
        assert_eq!(big.len(), 200);
    }
    assert!(
        rversion(&mut raw(&server), ns, 1).is_some() && rvalue(&mut raw(&server), ns, 1).is_none(),
        "tombstone stays"
    );
    down.store(true, Ordering::SeqCst);
    let stale = a.get_or_stale(&1);
    let r = a.load(1);
    assert!(
        stale.as_deref() != Some(old.as_str()) && r.as_deref().ok() != Some(old.as_str()),
        "A's load (refresh: {refresh}) read B's tombstone and its value was not stored (too heavy, too large for \
         Redis); the invalidated copy {old:?} was served: get_or_stale {stale:?}, failed load \
         {r:?} ({:?})",
        a.stats()
    );
}

/// load_with_timeout with a `spawner`: the spawned job reads the missed tombstone and blocks in
/// its loader; a second caller joins and its soft timeout passes. "A timed-out wait whose load found the old
/// value invalidated ... falls back on nothing". Then the job fails: nothing serves the copy.
#[test]
fn spawned_job_read_the_tombstone_caller_times_out() {
    let _w = common::watchdog(Duration::from_secs(30), "spawner soft timeout");
    let server = RedisServer::start();
    let ns = "h90sp";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
    let builder: CacheBuilder<u64, String> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u64| {
            if d.load(Ordering::SeqCst) {
                g.pass();
                return Err(BoxError::from("backend down"));
            }
            Ok(format!("a{k}"))
        });
    let a = Arc::new(
        fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap(),
    );
    let b = fs_instance(&server, ns, &clock);
    let old = a.load(1).unwrap();
    b.invalidate(&1);
    clock.advance(Duration::from_secs(61));
    down.store(true, Ordering::SeqCst);
    // The first caller (its timeout far off) spawns the job, which reads the tombstone and
    // blocks in its loader; a second caller joins it and times out.
    let a1 = Arc::clone(&a);
    let first = common::start(move || a1.load_with_timeout(1, Some(Duration::from_secs(20))));
    gate.wait_entered();
    let stale_during = a.get_or_stale(&1);
    let again = a.load_with_timeout(1, Some(Duration::from_millis(20)));
    gate.open();
    let t = first
        .wait(Duration::from_secs(25))
        .expect("first caller ended")
        .unwrap();
    let stale_after = a.get_or_stale(&1);
    let r = a.load(1);
    let seen = [
        format!("first caller (20 s timeout) {t:?}"),
        format!("get_or_stale during {stale_during:?}"),
        format!("second timed-out caller {again:?}"),
        format!("get_or_stale after {stale_after:?}"),
        format!("load after {r:?}"),
    ];
    let bad: Vec<_> = seen.iter().filter(|s| s.contains(&old)).collect();
    assert!(
        bad.is_empty(),
        "the job had read B's tombstone; served {old:?}: {bad:?}"
    );
}

/// A sync load of the expired copy reads the tombstone and its loader panics, a second caller
/// waiting on it: neither the waiter (which claims again), nor `get_or_stale`, nor a later
/// failed load get the invalidated copy; a later insert is fail-safe's again.
#[test]
fn panicking_load_with_a_waiter_after_reading_the_tombstone() {
    let _w = common::watchdog(Duration::from_secs(30), "panicking load");
    common::quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "h90pl";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let first = Arc::new(AtomicBool::new(true));
    let (d, g, f) = (Arc::clone(&down), Arc::clone(&gate), Arc::clone(&first));
    let builder: CacheBuilder<u64, String> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if d.load(Ordering::SeqCst) {
                if f.swap(false, Ordering::SeqCst) {
                    g.pass();
                    panic!("injected: load after the tombstone");
                }
                return Err(BoxError::from("backend down"));
            }
            Ok(format!("a{k}"))
        });
    let a = Arc::new(
        fs_tier(deaf_url(&server), ns)
            .build(builder, Plain)
            .unwrap(),
    );
    let b = fs_instance(&server, ns, &clock);
    let old = a.load(1).unwrap();
    b.invalidate(&1);
    clock.advance(Duration::from_secs(61));
    down.store(true, Ordering::SeqCst);
    let a1 = Arc::clone(&a);
    let leader = common::start(move || a1.load(1));
    gate.wait_entered();
    let a2 = Arc::clone(&a);
    let waiter = common::start(move || a2.load(1));
    // The waiter joins (its miss is counted before it waits).
    assert!(
        eventually(|| a.stats().misses >= 3),
        "waiter joined: {:?}",
        a.stats()
    );
    gate.open();
    let led = leader.wait(Duration::from_secs(20)).expect("leader ended");
    let w = waiter.wait(Duration::from_secs(20)).expect("waiter ended");
    let stale = a.get_or_stale(&1);
    let r = a.load(1);
    let seen = [
        format!("leader {:?}", led.as_ref().ok()),
        format!("waiter {:?}", w.as_ref().ok()),
        format!("get_or_stale {stale:?}"),
        format!("load {r:?}"),
    ];
    let bad: Vec<_> = seen.iter().filter(|s| s.contains(&old)).collect();
    assert!(
        bad.is_empty(),
        "served the invalidated copy {old:?}: {bad:?}"
    );
    fail_safe_works_again(&a, &clock, false);
}

/// Round 89 ("any load or refresh whose read found the value invalidated marks it as no
/// fallback however it ends"; src/redis/mod.rs: "a refresh that reads the tombstone and fails
/// keeps the copy until its time to live ... and the copy is then no fallback at all (not even
/// for `get_or_stale`)"), at the refresh's first await: A's async refresh (handed to the test by
/// a `future_spawner`) is polled once, its Redis read completes (`remote.misses` counts the
/// tombstone), and the future is dropped before it is polled again. Past the copy's time to
/// live, `get_or_stale` must not answer with it.
#[test]
fn async_refresh_dropped_at_the_read_await_after_reading_the_tombstone() {
    let _w = common::watchdog(Duration::from_secs(30), "refresh dropped at the read");
    let server = RedisServer::start();
    let ns = "h90rr";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let hang = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicBool::new(false));
    let spawned: Arc<std::sync::Mutex<Vec<herdcache::BoxFuture<()>>>> = Arc::default();
    let sp = Arc::clone(&spawned);
    let builder = async_fail_safe_builder(&clock, &down, &hang, &entered)
        .refresh_after(Duration::from_secs(30))
        .future_spawner(move |f| sp.lock().unwrap().push(f));
    let a = fs_tier(deaf_url(&server), ns)
        .build(builder, Plain)
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    let rt = runtime();
    // As above: a first poll that finds the read done already is tried again on another key.
    for k in 1..=20u64 {
        down.store(false, Ordering::SeqCst);
        let old = rt.block_on(a.load_async(k)).unwrap();
        b.invalidate(&k); // lost for A
        clock.advance(Duration::from_secs(31));
        down.store(true, Ordering::SeqCst);
        assert_eq!(
            a.get(&k).as_deref(),
            Some(old.as_str()),
            "live, refresh due"
        );
        let mut fut = spawned
            .lock()
            .unwrap()
            .pop()
            .expect("the refresh was spawned");
        let m0 = a.stats().remote.misses;
        let first = rt.block_on(async {
            let mut cx = Context::from_waker(Waker::noop());
            fut.as_mut().poll(&mut cx)
        });
        if first.is_ready() {
            clock.advance(Duration::from_secs(30));
            continue;
        }
        assert!(
            eventually(|| a.stats().remote.misses > m0),
            "the refresh's read of the tombstone completed"
        );
        drop(fut);
        clock.advance(Duration::from_secs(30)); // past the time to live
        let stale = a.get_or_stale(&k);
        let r = rt.block_on(a.load_async(k));
        assert!(
            stale.is_none(),
            "A's refresh had read B's tombstone (then dropped); past the time to live \
             get_or_stale answered {stale:?} (then load_async {r:?})"
        );
        return;
    }
    panic!("no first poll of 20 was pending");
}

/// `EntryRef::or_insert` / `or_default` (and async) with and without fail-safe, on a plain
/// cache and on a `TieredCache` (the entry API stays local).
mod entry {
    use super::*;
    use herdcache::CacheStats;

    #[allow(dead_code)] // `down`: the loader's switch, kept for new steps
    struct Ctl {
        clock: ManualClock,
        down: Arc<AtomicBool>,
        gate: Arc<Gate>,
        gated: Arc<AtomicBool>,
    }

    fn builder(fs: bool) -> (CacheBuilder<u64, String>, Ctl) {
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        gate.open();
        let gated = Arc::new(AtomicBool::new(false));
        let (d, g, gd) = (Arc::clone(&down), Arc::clone(&gate), Arc::clone(&gated));
        let n = Arc::new(AtomicU64::new(0));
        let mut b: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .refresh_backoff(Duration::from_secs(5))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| {
                if gd.load(Ordering::SeqCst) {
                    g.pass();
                }
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("L{k}-{}", n.fetch_add(1, Ordering::SeqCst)))
                }
            });
        if fs {
            b = b.fail_safe(Duration::from_secs(600));
        }
        (
            b,
            Ctl {
                clock,
                down,
                gate,
                gated,
            },
        )
    }

    /// The statistics compared (load time and fail-safe's stale answers of *loads* aside).
    fn counts(s: &CacheStats) -> [u64; 6] {
        [
            s.hits,
            s.misses,
            s.load_successes,
            s.load_failures,
            s.coalesced,
            s.loads_abandoned,
        ]
    }

    /// Runs the scenario on `c`; returns per step (what, value, fresh, stats delta, get after).
    fn scenario(c: &Arc<Cache<u64, String>>, ctl: &Ctl) -> Vec<String> {
        let mut out = Vec::new();
        let rt = runtime();
        let mut last = counts(&c.stats());
        let mut step = |what: &str, r: String, c: &Cache<u64, String>, k: u64| {
            let now = counts(&c.stats());
            let d: Vec<i64> = now
                .iter()
                .zip(last.iter())
                .map(|(a, b)| *a as i64 - *b as i64)
                .collect();
            last = now;
            out.push(format!(
                "{what}: {r} delta[hit,miss,ok,fail,coal,aband]={d:?} get={:?}",
                c.get(&k)
            ));
        };
        let e = c.entry(1).or_insert("x".into());
        step(
            "miss",
            format!("{:?}", (e.is_fresh(), e.into_value())),
            c,
            1,
        );
        let e = c.entry(1).or_insert("y".into());
        step("hit", format!("{:?}", (e.is_fresh(), e.into_value())), c, 1);
        ctl.clock.advance(Duration::from_secs(61));
        let e = c.entry(1).or_insert("z".into());
        step(
            "expired",
            format!("{:?}", (e.is_fresh(), e.into_value())),
            c,
            1,
        );
        let e = c.entry(2).or_default();
        step(
            "or_default miss",
            format!("{:?}", (e.is_fresh(), e.into_value())),
            c,
            2,
        );
        let e = rt.block_on(c.entry(5).or_insert_async("as".into()));
        step(
            "async miss",
            format!("{:?}", (e.is_fresh(), e.into_value())),
            c,
            5,
        );
        ctl.clock.advance(Duration::from_secs(61));
        let e = rt.block_on(c.entry(5).or_default_async());
        step(
            "async or_default expired",
            format!("{:?}", (e.is_fresh(), e.into_value())),
            c,
            5,
        );
        // A load of key 3 (successful) runs; or_insert waits for it.
        ctl.gate.close();
        ctl.gated.store(true, Ordering::SeqCst);
        ctl.gate.entered.store(false, Ordering::SeqCst);
        let c1 = Arc::clone(c);
        let l = common::start(move || c1.load(3));
        ctl.gate.wait_entered();
        let m = c.stats().misses;
        let c2 = Arc::clone(c);
        let o = common::start(move || {
            let e = c2.entry(3).or_insert("mine".into());
            (e.is_fresh(), e.into_value())
        });
        assert!(eventually(|| c.stats().misses > m), "or_insert missed");
        ctl.gate.open();
        let lr = l
            .wait(Duration::from_secs(20))
            .expect("load ended")
            .unwrap();
        let or = o
            .wait(Duration::from_secs(20))
            .expect("or_insert ended")
            .unwrap();
        step(
            "during a successful load",
            format!("load {lr:?} or_insert {or:?}"),
            c,
            3,
        );
        // (An or_insert waiting for a *failing* load: see `entry_min`.)
        ctl.gated.store(false, Ordering::SeqCst);
        out
    }

    fn compare(fs: Vec<String>, plain: Vec<String>, what: &str) {
        let diff: Vec<_> = fs
            .iter()
            .zip(plain.iter())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("\n  fail-safe: {a}\n  plain:     {b}"))
            .collect();
        assert!(
            diff.is_empty(),
            "{what}: or_insert/or_default differ with fail-safe:{}",
            diff.concat()
        );
    }

    /// `EntryRef::or_insert`: "With fail-safe, a miss is an insert-if-absent computation rather
    /// than a load ... Values, freshness and panics are as without it; the statistics differ in
    /// two corners" (a recursive call, a take-over of a load waiting for a permit) — neither
    /// occurs here (misses, hits, expired entries, async, waiting for a successful load). The same steps on a cache with and without fail-safe must give the same
    /// values, freshness and counts.
    #[test]
    fn plain_cache_or_insert_same_with_and_without_fail_safe() {
        let _w = common::watchdog(Duration::from_secs(30), "entry plain");
        let (b, ctl) = builder(true);
        let fs = scenario(&Arc::new(b.build()), &ctl);
        let (b, ctl) = builder(false);
        let plain = scenario(&Arc::new(b.build()), &ctl);
        compare(fs, plain, "plain cache");
    }

    /// The same on `TieredCache`s (their entry API is the local cache's).
    #[test]
    fn tiered_cache_or_insert_same_with_and_without_fail_safe() {
        let _w = common::watchdog(Duration::from_secs(30), "entry tiered");
        let server = RedisServer::start();
        let (b, ctl) = builder(true);
        let t = Arc::new(fs_tier(server.url(), "h90e1").build(b, Plain).unwrap());
        let local = Arc::new(t.local().clone());
        let fs = scenario(&local, &ctl);
        let (b, ctl) = builder(false);
        let t2 = Arc::new(fs_tier(server.url(), "h90e2").build(b, Plain).unwrap());
        let local2 = Arc::new(t2.local().clone());
        let plain = scenario(&local2, &ctl);
        compare(fs, plain, "tiered cache");
    }
}

/// Minimal form of the difference the scenario found: `or_insert` waiting for a failing load.
mod entry_min {
    use super::*;

    /// (or_insert's result, the delta of [misses, load_successes, load_failures, coalesced]
    /// over the or_insert and the load it waited for, the stored value).
    fn run(fs: bool, expired: bool) -> ((bool, String), [u64; 4], Option<String>) {
        let clock = ManualClock::new();
        let gate = Gate::new();
        let g = Arc::clone(&gate);
        let mut b: CacheBuilder<u64, String> = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(60))
            .record_stats()
            .clock(clock.clone())
            .loader(move |_k: &u64| {
                g.pass();
                Err(BoxError::from("down"))
            });
        if fs {
            b = b.fail_safe(Duration::from_secs(600));
        }
        let c = b.build();
        if expired {
            c.insert(1, "old".into());
            clock.advance(Duration::from_secs(61));
        }
        let s0 = c.stats();
        let c1 = c.clone();
        let l = common::start(move || c1.load(1));
        gate.wait_entered();
        let m = c.stats().misses;
        let c2 = c.clone();
        let o = common::start(move || {
            let e = c2.entry(1).or_insert("mine".into());
            (e.is_fresh(), e.into_value())
        });
        assert!(eventually(|| c.stats().misses > m), "or_insert missed");
        gate.open();
        let _ = l.wait(Duration::from_secs(20)).expect("load ended");
        let or = o
            .wait(Duration::from_secs(20))
            .expect("or_insert ended")
            .unwrap();
        let s = c.stats();
        (
            or,
            [
                s.misses - s0.misses,
                s.load_successes - s0.load_successes,
                s.load_failures - s0.load_failures,
                s.coalesced - s0.coalesced,
            ],
            c.get(&1),
        )
    }

    /// `EntryRef::or_insert`'s third documented corner: an `or_insert` that waits for a
    /// running load of the key which then fails (key absent, and key expired) stores and
    /// returns the same with fail-safe as without, and counts one miss with it where it counts
    /// a miss, a coalesced wait and a second miss without.
    #[test]
    fn or_insert_waiting_for_a_failing_load_counts_its_miss_once_with_fail_safe() {
        let _w = common::watchdog(Duration::from_secs(30), "entry min");
        for expired in [false, true] {
            let what = if expired { "expired" } else { "absent" };
            let (plain_or, plain, plain_stored) = run(false, expired);
            let (fs_or, fs, fs_stored) = run(true, expired);
            assert_eq!(
                (&fs_or, &fs_stored),
                (&plain_or, &plain_stored),
                "key {what}"
            );
            assert_eq!(fs_or, (true, "mine".to_string()), "key {what}");
            // [misses, load_successes, load_failures, coalesced]
            let expected = [plain[0] - 1, plain[1], plain[2], plain[3] - 1];
            assert_eq!(
                fs, expected,
                "key {what}: with fail-safe (left), without: {plain:?}"
            );
        }
    }
}

/// The end of the clock (`ManualClock::advance(Duration::MAX)`, `clock::END`) with the tier:
/// a copy A loads there, then B's invalidation A misses. fail_safe.rs: a load whose read
/// finds the missed tombstone "does not fall back, and its failure drops the old value"; a
/// copy still live is the documented bound (a missed message keeps it until its time to live).
/// (A copy loaded at the end is live for good: the bound then holds it; the check below only
/// applies if it is not.) The tombstone lives in Redis as the settings say (time to live 60 s
/// plus max_stale 600 s), not by the local clock; A's own insert at the end is what a failed load
/// answers.
#[test]
fn end_of_the_clock_missed_invalidation() {
    let _w = common::watchdog(Duration::from_secs(30), "end of the clock");
    let server = RedisServer::start();
    let ns = "h90end";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let a = fs_tier(deaf_url(&server), ns)
        .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    clock.advance(Duration::MAX);
    let v = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    let left = pttl(&mut raw(&server), &vkey(ns, 1));
    down.store(true, Ordering::SeqCst);
    let live = a.get(&1);
    let r = a.load(1);
    let stale = a.get_or_stale(&1);
    assert!(
        left > 0 && left <= 660_000,
        "tombstone's time to live {left} ms (want within 660 s)"
    );
    if live.is_none() {
        assert!(
            r.as_deref().ok() != Some(v.as_str()) && stale.as_deref() != Some(v.as_str()),
            "at the clock's end A's copy {v:?} is not live, B invalidated it (missed): failed \
             load {r:?}, get_or_stale {stale:?}"
        );
    }
    // A's own write at the end is its last value: fail-safe (or a live read) answers with it.
    down.store(false, Ordering::SeqCst);
    a.insert(2, "mine".to_string());
    down.store(true, Ordering::SeqCst);
    let r2 = a.load(2);
    assert_eq!(
        r2.as_deref().ok(),
        Some("mine"),
        "own write at the end: {r2:?}"
    );
}

/// Near the clock's end: A loads key 1 about 100 s before `clock::END`, B invalidates it
/// (missed), and the clock is advanced by `Duration::MAX` (to its end: the copy is past its
/// time to live, its stale window reaching past the end). A's failed load there reads the
/// tombstone: it "does not fall back, and its failure drops the old value" — nor may
/// `get_or_stale` or a later load serve it; a value A inserts afterwards is served.
#[test]
fn near_the_end_of_the_clock_missed_invalidation_then_end() {
    let _w = common::watchdog(Duration::from_secs(30), "near the end");
    let server = RedisServer::start();
    let ns = "h90near";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let a = fs_tier(deaf_url(&server), ns)
        .build(counted_fail_safe_builder(&clock, &down, &n, "a"), Plain)
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    clock.advance(Duration::from_nanos(u64::MAX - 100_000_000_000));
    let v = a.load(1).unwrap();
    assert_eq!(a.get(&1).as_deref(), Some(v.as_str()), "live near the end");
    b.invalidate(&1); // lost for A
    clock.advance(Duration::MAX);
    assert_eq!(
        a.get(&1),
        None,
        "expired at the end (ManualClock starts near 0?)"
    );
    down.store(true, Ordering::SeqCst);
    let r = a.load(1);
    let stale = a.get_or_stale(&1);
    let r2 = a.load(1);
    assert!(
        [r.as_deref().ok(), stale.as_deref(), r2.as_deref().ok()]
            .iter()
            .all(|x| *x != Some(v.as_str())),
        "at the end, B's missed tombstone: load {r:?}, get_or_stale {stale:?}, load {r2:?} \
         (the invalidated copy {v:?})"
    );
    a.insert(1, "mine".to_string());
    let r3 = a.load(1);
    assert_eq!(
        r3.as_deref().ok(),
        Some("mine"),
        "A's insert at the end: {r3:?}"
    );
}

/// A computation that stores nothing (`Op::Nop`) around a refresh that read the missed
/// tombstone and fails. fail_safe.rs: a computation "that stores nothing ... loads nothing" and
/// is no write; round 89: the refresh marks the copy as no fallback "however it ends"; the mark
/// lasts until "the next write of the key". Past the copy's time to live, `get_or_stale` must
/// not serve it (whether the computation waited for the refresh or ran beside it).
#[test]
fn nop_computation_during_the_marking_refresh_keeps_the_mark() {
    let _w = common::watchdog(Duration::from_secs(30), "nop compute during refresh");
    let server = RedisServer::start();
    let ns = "h90nop";
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let gated = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let (d, g, gd) = (Arc::clone(&down), Arc::clone(&gate), Arc::clone(&gated));
    let builder: CacheBuilder<u64, String> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .refresh_after(Duration::from_secs(30))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            if gd.swap(false, Ordering::SeqCst) {
                g.pass();
            }
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(format!("a{k}"))
            }
        });
    let a = fs_tier(deaf_url(&server), ns)
        .build(builder, Plain)
        .unwrap();
    let b = fs_instance(&server, ns, &clock);
    let old = a.load(1).unwrap();
    b.invalidate(&1); // lost for A
    clock.advance(Duration::from_secs(31));
    down.store(true, Ordering::SeqCst);
    gated.store(true, Ordering::SeqCst);
    let a2 = a.clone();
    let reader = std::thread::spawn(move || a2.get(&1));
    gate.wait_entered();
    let (tx, rx) = std::sync::mpsc::channel();
    let a3 = a.clone();
    let computer = std::thread::spawn(move || {
        a3.entry(1).and_compute_with(|v| {
            let _ = tx.send(v.map(|e| e.value().clone()));
            herdcache::Op::Nop
        });
    });
    // Beside the refresh if the computation does not wait for it; else after it.
    let beside = rx.recv_timeout(Duration::from_secs(2)).ok();
    gate.open();
    reader.join().unwrap();
    computer.join().unwrap();
    assert!(eventually(|| a.stats().refreshes_failed >= 1));
    clock.advance(Duration::from_secs(30)); // past the time to live
    let stale = a.get_or_stale(&1);
    assert!(
        stale.as_deref() != Some(old.as_str()),
        "the refresh read B's tombstone and failed; a Nop computation ({}) ran: get_or_stale \
         answered the invalidated copy {stale:?}",
        if beside.is_some() {
            "beside it"
        } else {
            "after it"
        }
    );
}
