#![cfg(feature = "redis")]
#![allow(clippy::type_complexity)]
//! Round 91: an outside attack on round 90's fix (a Redis read that finds a missed tombstone
//! marks the load's flight where it runs: on the helper thread of an async round trip,
//! registered for the flight). 15 tests in four areas, none failing on the fix; 4 of `drop`'s
//! and `codec`'s decode-into-the-cache test fail (or hang) on the commit before it:
//!
//! * `drop`: async loads of a deaf instance dropped at every await point in turn (before the
//!   read completed, after it, in a lease wait, in the loader; with and without leases), the
//!   window reached deterministically (`CLIENT PAUSE … WRITE` holds the read's script);
//! * `flights`: the mark never lands on another flight (nested loads either way, a second
//!   cache of the same types, 48 concurrent loads on busy helper threads);
//! * `codec`: user code on the registered helper thread (a panicking codec; a `decode` that
//!   loads the very key: it hung for ever before, now a recursive-load panic the pool
//!   catches, the load going on locally); the documented holes around the read;
//! * `sync`: blocking loads through lease waits, and A's own writes racing the marked load.

mod common;

use herdcache::{Cache, CacheBuilder, ManualClock};
use std::time::Duration;

// Helpers the modules below share.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn lkey(ns: &str, k: u64) -> String {
    format!("hc:{}:{ns}:l{{{k}}}", ns.len())
}

fn fs(clock: &ManualClock) -> CacheBuilder<u64, String> {
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
}

mod drop {
    //! Helper 91: async loads of a deaf instance A (it misses B's invalidation) dropped at every
    //! await point in turn — before the read, once the read completed, during a lease wait on
    //! another holder's lease (after the first pause, after several round trips), inside the
    //! loader, with and without leases — then checked: the invalidated copy is never served
    //! (`load_async`, `get_or_stale`, `try_get_with`, `or_try_insert_with`), no lease of A's is
    //! left behind, the statistics balance with nothing in flight, a value written later is
    //! fail-safe's fallback again.
    //!
    //! 5 tests; none fails on 4752b5e (each run 3+ times, no flake seen). The window the commit
    //! closed — the read completed on the helper thread, the load not yet polled again — is
    //! reached deterministically: the load is polled once while the server holds writes (`CLIENT
    //! PAUSE 40 WRITE`: the tier's read is a script, so it waits), then left alone until
    //! `remote.misses` (or `lease_waits`) counts the read. (Polling it again once the read
    //! completed lets the polling thread take the answer, which the old code marked too: such a
    //! test passes on both.) Against the parent commit b4140fc these fail, as expected: every `ReadDone`/`LeaseWaitBegan` case of
    //! `load_async_dropped_at_every_await_point` (leases with another holder, leases alone, no
    //! leases) and of `async_refresh_dropped_at_every_await_point`; the `ReadDone` case of
    //! `try_get_with_async_leader_dropped_with_a_waiter` (the waiter got the invalidated copy
    //! from the backoff of the abandoned leader); and
    //! `callers_in_the_window_after_the_read_before_the_next_poll` (`get_or_stale` and a joining
    //! `load_with_timeout` answered the copy). The `FirstPoll` case (dropped while the read is
    //! still held) is the documented hole: only the ledger, leases and recovery are checked.
    use super::{lkey, runtime};

    use crate::common;
    use crate::common::eventually;
    use crate::common::tier::*;
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::{BoxError, ManualClock};
    use herdcache_testkit::redis_server::RedisServer;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    /// Makes the server hold every write command (scripts included: the tier's read is one) for
    /// `ms`: the next round trip takes that long, so the first poll of a load certainly returns
    /// before its read completes, and nothing re-polls it meanwhile (the window of round 90).
    fn pause_writes(server: &RedisServer, ms: u64) {
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query::<()>(&mut raw(server))
            .unwrap();
    }

    /// Polls `fut` (no waker: polled in a loop, 1 ms apart, on the runtime) until `cond` holds or
    /// it is ready; `true` if it was still pending when `cond` held. With `again` false it is
    /// polled once only, then left alone until `cond` holds: a round trip that completes
    /// meanwhile is not taken (the window round 90 fixed: "an async one cancelled before it took
    /// the read's answer").
    async fn drive_until(
        fut: &mut Pin<Box<dyn Future<Output = Result<String, herdcache::LoadError>> + Send + '_>>,
        again: bool,
        mut cond: impl FnMut() -> bool,
    ) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        let mut polled = false;
        loop {
            if again || !polled {
                polled = true;
                let mut cx = Context::from_waker(Waker::noop());
                if fut.as_mut().poll(&mut cx).is_ready() {
                    return false;
                }
            }
            if cond() {
                return true;
            }
            assert!(Instant::now() < until, "condition never held");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Point {
        /// Polled once while the server holds the read, dropped at once (before the read completed:
        /// the copy may be served until the retry, documented; no assertion on the copy).
        FirstPoll,
        /// Once the read counted the tombstone (`remote.misses`).
        ReadDone,
        /// Once the wait for another holder's lease began (`remote.lease_waits`).
        LeaseWaitBegan,
        /// 40 ms into the lease wait (several poll round trips).
        MidWait,
        /// Inside the loader (after the wait, or after taking the lease).
        InLoader,
    }

    /// src/redis/mod.rs, "What fail-safe sees of a missed invalidation": "A read that completed
    /// marks its load, even an async one cancelled before it took the read's answer"; fail_safe.rs:
    /// a load whose read finds the missed tombstone "does not fall back, and its failure drops the
    /// old value"; `get_with_async`'s cancel safety: "a lease this call took for the fleet is given
    /// back if it is dropped before its load finishes"; `Cache::load_async`: "Nothing is left
    /// behind"; fail_safe.rs "Writes win" (a later insert is the fallback again).
    ///
    /// Swept: every drop point, with A's tier using leases (another holder's lease present, or
    /// none: A takes it), and without leases.
    #[test]
    fn load_async_dropped_at_every_await_point() {
        let _w = common::watchdog(Duration::from_secs(120), "drop sweep");
        let server = RedisServer::start();
        let mut failures = Vec::new();
        let mut case = 0u64;
        for (leases, other_holder) in [(true, true), (true, false), (false, false)] {
            for point in [
                Point::FirstPoll,
                Point::ReadDone,
                Point::LeaseWaitBegan,
                Point::MidWait,
                Point::InLoader,
            ] {
                if !other_holder && matches!(point, Point::LeaseWaitBegan | Point::MidWait) {
                    continue;
                }
                case += 1;
                let ns = format!("h91d{case}");
                if let Some(f) = drop_case(&server, &ns, leases, other_holder, point) {
                    failures.push(f);
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failing cases:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    fn drop_case(
        server: &RedisServer,
        ns: &str,
        leases: bool,
        other_holder: bool,
        point: Point,
    ) -> Option<String> {
        let what = format!("[leases {leases}, other holder {other_holder}, {point:?}]");
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let hang = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(AtomicBool::new(false));
        let mut t = fs_tier(deaf_url(server), ns);
        if leases {
            t = t.lease(Duration::from_secs(5), Duration::from_millis(150));
        }
        let a = t
            .build(
                async_fail_safe_builder(&clock, &down, &hang, &entered),
                Plain,
            )
            .unwrap();
        let b = fs_instance(server, ns, &clock);
        let rt = runtime();
        let mut raw_c = raw(server);
        let k = 1u64;
        let old = rt.block_on(a.load_async(k)).unwrap();
        b.invalidate(&k); // lost for A
        if other_holder {
            redis::cmd("SET")
                .arg(lkey(ns, k))
                .arg("other")
                .arg("PX")
                .arg(60_000)
                .query::<()>(&mut raw_c)
                .unwrap();
        }
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        // Without another holder's lease nothing pauses after the read: the loader hangs, so the
        // load is still pending when the read is seen done.
        if point == Point::InLoader || (point == Point::ReadDone && !other_holder) {
            hang.store(true, Ordering::SeqCst);
        }
        let s0 = a.stats().remote;
        let mut read_done_before_drop = false;
        // FirstPoll: dropped while the held read is still out (the documented "before its load's
        // read of Redis completed").
        if matches!(
            point,
            Point::FirstPoll | Point::ReadDone | Point::LeaseWaitBegan
        ) {
            pause_writes(server, 40);
        }
        let pending = rt.block_on(async {
            let mut fut: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(a.load_async(k));
            let pending = match point {
                Point::FirstPoll => drive_until(&mut fut, false, || true).await,
                Point::ReadDone => {
                    drive_until(&mut fut, false, || a.stats().remote.misses > s0.misses).await
                }
                Point::LeaseWaitBegan => {
                    drive_until(&mut fut, false, || {
                        a.stats().remote.lease_waits > s0.lease_waits
                    })
                    .await
                }
                Point::MidWait => {
                    let mut at = None;
                    drive_until(&mut fut, true, || {
                        if a.stats().remote.lease_waits > s0.lease_waits {
                            let t = *at.get_or_insert_with(Instant::now);
                            t.elapsed() >= Duration::from_millis(40)
                        } else {
                            false
                        }
                    })
                    .await
                }
                Point::InLoader => {
                    drive_until(&mut fut, true, || entered.load(Ordering::SeqCst)).await
                }
            };
            read_done_before_drop = a.stats().remote.misses > s0.misses;
            drop(fut);
            pending
        });
        hang.store(false, Ordering::SeqCst);
        if !pending {
            return Some(format!(
                "{what}: the load finished before the drop point (setup)"
            ));
        }
        let mut bad = Vec::new();
        // Settle: the cancelled load has left the registry.
        if !eventually(|| a.loads_in_flight() == 0) {
            bad.push(format!("a load stays in flight: {:?}", a.stats()));
        }
        // `get_or_stale` is no loading call: its misses count alone (stats.rs, `misses`).
        let mut plain_misses = 0;
        let mut gos = |a: &TieredCache<u64, String>| {
            let m = a.stats().misses;
            let v = a.get_or_stale(&k);
            plain_misses += a.stats().misses - m;
            v
        };
        if read_done_before_drop {
            let stale = gos(&a);
            let r = rt.block_on(a.load_async(k));
            let t = a.try_get_with(k, || Err::<String, _>("down"));
            let e = a
                .entry(k)
                .or_try_insert_with(|| Err::<String, _>("down"))
                .map(|e| e.into_value());
            let stale2 = gos(&a);
            for (name, v) in [
                ("get_or_stale", stale.clone()),
                ("load_async", r.as_ref().ok().cloned()),
                ("try_get_with", t.as_ref().ok().cloned()),
                ("or_try_insert_with", e.as_ref().ok().cloned()),
                ("get_or_stale after", stale2.clone()),
            ] {
                if v.as_deref() == Some(old.as_str()) {
                    bad.push(format!("{name} served the invalidated copy {old:?}"));
                }
            }
        }
        // No lease of A's left: the other holder's stays, or none.
        let lease: Option<String> = redis::cmd("GET")
            .arg(lkey(ns, k))
            .query(&mut raw_c)
            .unwrap();
        let lease_ok = |l: &Option<String>| {
            if other_holder {
                l.as_deref() == Some("other")
            } else {
                l.is_none()
            }
        };
        if !eventually(|| {
            let l: Option<String> = redis::cmd("GET")
                .arg(lkey(ns, k))
                .query(&mut raw(server))
                .unwrap();
            lease_ok(&l)
        }) {
            bad.push(format!("lease left: {lease:?}"));
        }
        if !eventually(|| a.loads_in_flight() == 0) {
            bad.push(format!("in flight after the checks: {:?}", a.stats()));
        }
        let s = a.stats();
        if s.misses + s.refreshes_started
            != plain_misses
                + s.load_successes
                + s.load_failures
                + s.loads_abandoned
                + s.coalesced
                + s.negative_hits
        {
            bad.push(format!("ledger does not balance: {s:?}"));
        }
        a.validate();
        // A value written later is fail-safe's again.
        let _: () = redis::cmd("DEL")
            .arg(lkey(ns, k))
            .query(&mut raw_c)
            .unwrap();
        a.insert(k, "new".to_string());
        // Gone from Redis (no version: no tombstone either), so the failed load below falls back.
        let _: () = redis::cmd("DEL")
            .arg(vkey(ns, k))
            .query(&mut raw_c)
            .unwrap();
        clock.advance(Duration::from_secs(61));
        let stale = a.get_or_stale(&k);
        let r = rt.block_on(a.load_async(k));
        if stale.as_deref() != Some("new") || r.as_deref().ok() != Some("new") {
            bad.push(format!(
                "after an insert: get_or_stale {stale:?}, failed load {r:?} (want \"new\")"
            ));
        }
        // And loadable once the backend is back.
        down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(10)); // past the backoff
        let r = rt.block_on(a.load_async(k));
        if !r.as_deref().is_ok_and(|v| v.starts_with("a1-")) {
            bad.push(format!("backend back: load {r:?}"));
        }
        if bad.is_empty() {
            None
        } else {
            Some(format!(
                "{what} (read done before drop: {read_done_before_drop}): {}",
                bad.join("; ")
            ))
        }
    }

    /// `TieredCache::try_get_with_async` (a borrowing leader): "If the leader's future is dropped
    /// before its load finishes, the load is cancelled and one of the waiting callers loads with
    /// *its* `init`"; src/redis/mod.rs: "A read that completed marks its load, even an async one
    /// cancelled before it took the read's answer"; fail_safe.rs: such a load "does not fall back,
    /// and its failure drops the old value" — so the backoff its abandonment would start on the
    /// copy does not answer the waiter with it.
    ///
    /// A's leader (on a key whose tombstone A missed) is dropped once its read completed (paused
    /// in another holder's lease wait, or inside its `init`); a waiter that joined it then loads
    /// (its `init` fails): it must get its error, not the invalidated copy; nor `get_or_stale`.
    #[test]
    fn try_get_with_async_leader_dropped_with_a_waiter() {
        let _w = common::watchdog(Duration::from_secs(90), "borrowing leader dropped");
        let server = RedisServer::start();
        let mut failures = Vec::new();
        for (i, (point, other_holder)) in [
            (Point::ReadDone, true),
            (Point::MidWait, true),
            (Point::InLoader, true),
            (Point::InLoader, false),
        ]
        .into_iter()
        .enumerate()
        {
            let ns = format!("h91w{i}");
            let what = format!("[{point:?}, other holder {other_holder}]");
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let a = Arc::new(
                fs_tier(deaf_url(&server), &ns)
                    .lease(Duration::from_secs(5), Duration::from_millis(150))
                    .build(fail_safe_builder(&clock, &down, "a"), Plain)
                    .unwrap(),
            );
            let b = fs_instance(&server, &ns, &clock);
            let rt = runtime();
            let k = 7u64;
            let old = rt
                .block_on(a.try_get_with_async(k, async { Ok::<_, String>("old".to_string()) }))
                .unwrap();
            b.invalidate(&k); // lost for A
            if other_holder {
                redis::cmd("SET")
                    .arg(lkey(&ns, k))
                    .arg("other")
                    .arg("PX")
                    .arg(60_000)
                    .query::<()>(&mut raw(&server))
                    .unwrap();
            }
            clock.advance(Duration::from_secs(61));
            let s0 = a.stats();
            let hang = Arc::new(AtomicBool::new(point == Point::InLoader));
            let entered = Arc::new(AtomicBool::new(false));
            let (h, e) = (Arc::clone(&hang), Arc::clone(&entered));
            if point == Point::ReadDone {
                pause_writes(&server, 40);
            }
            let waiter = rt.block_on(async {
                let mut lead: Pin<Box<dyn Future<Output = Result<String, Arc<String>>> + Send>> =
                    Box::pin({
                        let a = Arc::clone(&a);
                        async move {
                            a.try_get_with_async(k, async move {
                                e.store(true, Ordering::SeqCst);
                                std::future::poll_fn(|cx| {
                                    if h.load(Ordering::SeqCst) {
                                        cx.waker().wake_by_ref();
                                        Poll::Pending
                                    } else {
                                        Poll::Ready(())
                                    }
                                })
                                .await;
                                Err::<String, String>("leader down".into())
                            })
                            .await
                        }
                    });
                let until = Instant::now() + Duration::from_secs(10);
                let mut at = None;
                // Polled once only before the read-counted drop point (see `drive_until`).
                let again = point != Point::ReadDone;
                let mut polled = false;
                loop {
                    if again || !polled {
                        polled = true;
                        let mut cx = Context::from_waker(Waker::noop());
                        assert!(
                            lead.as_mut().poll(&mut cx).is_pending(),
                            "{what}: leader ended"
                        );
                    }
                    let s = a.stats().remote;
                    let ready = match point {
                        Point::ReadDone => s.misses > s0.remote.misses,
                        Point::MidWait => {
                            s.lease_waits > s0.remote.lease_waits
                                && at.get_or_insert_with(Instant::now).elapsed()
                                    >= Duration::from_millis(40)
                        }
                        _ => entered.load(Ordering::SeqCst),
                    };
                    if ready {
                        break;
                    }
                    assert!(Instant::now() < until, "{what}: never reached");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // A waiter joins (counted coalesced), then the leader goes.
                let c0 = a.stats().coalesced;
                let a2 = Arc::clone(&a);
                let w = tokio::spawn(async move {
                    a2.try_get_with_async(k, async { Err::<String, String>("waiter down".into()) })
                        .await
                });
                let until = Instant::now() + Duration::from_secs(10);
                while a.stats().coalesced == c0 {
                    if again {
                        let mut cx = Context::from_waker(Waker::noop());
                        assert!(
                            lead.as_mut().poll(&mut cx).is_pending(),
                            "{what}: leader ended"
                        );
                    }
                    assert!(Instant::now() < until, "{what}: waiter never joined");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                drop(lead);
                hang.store(false, Ordering::SeqCst);
                tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("waiter ended")
                    .unwrap()
            });
            let m = a.stats().misses;
            let stale = a.get_or_stale(&k);
            let plain_misses = a.stats().misses - m;
            let mut bad = Vec::new();
            if waiter.as_deref().ok() == Some(old.as_str()) {
                bad.push(format!("the waiter got the invalidated copy ({waiter:?})"));
            }
            if stale.as_deref() == Some(old.as_str()) {
                bad.push("get_or_stale served the invalidated copy".to_string());
            }
            if !eventually(|| a.loads_in_flight() == 0) {
                bad.push("a load stays in flight".into());
            }
            let s = a.stats();
            if s.misses + s.refreshes_started
                != plain_misses
                    + s.load_successes
                    + s.load_failures
                    + s.loads_abandoned
                    + s.coalesced
                    + s.negative_hits
            {
                bad.push(format!("ledger: {s:?}"));
            }
            if !eventually(|| {
                let l: Option<String> = redis::cmd("GET")
                    .arg(lkey(&ns, k))
                    .query(&mut raw(&server))
                    .unwrap();
                if other_holder {
                    l.as_deref() == Some("other")
                } else {
                    l.is_none()
                }
            }) {
                bad.push("a lease of A's is left".into());
            }
            if !bad.is_empty() {
                failures.push(format!("{what}: {}", bad.join("; ")));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// round 89/90 (src/redis/mod.rs): "a refresh that reads the tombstone and fails keeps the
    /// copy until its time to live ... and the copy is then no fallback at all (not even for
    /// `get_or_stale`)"; attack_redis9's header: the read marks the refresh "on the helper thread
    /// that runs the round trip registered for the load's flight", however the refresh ends.
    ///
    /// Swept: A's async refresh (handed to the test by a `future_spawner`, with leases and
    /// another holder's lease, or without leases) dropped once its read completed, during the
    /// lease wait, or inside its loader. Past the copy's time to live, neither `get_or_stale`
    /// nor a failed `load_async` nor the entry API's `or_try_insert_with` may serve it; the
    /// statistics balance.
    #[test]
    fn async_refresh_dropped_at_every_await_point() {
        let _w = common::watchdog(Duration::from_secs(90), "refresh drop sweep");
        let server = RedisServer::start();
        let mut failures = Vec::new();
        let mut case = 0;
        for (leases, other_holder) in [(true, true), (true, false), (false, false)] {
            for point in [
                Point::ReadDone,
                Point::LeaseWaitBegan,
                Point::MidWait,
                Point::InLoader,
            ] {
                if !other_holder && matches!(point, Point::LeaseWaitBegan | Point::MidWait) {
                    continue;
                }
                case += 1;
                let ns = format!("h91r{case}");
                let what = format!("[leases {leases}, other holder {other_holder}, {point:?}]");
                let clock = ManualClock::new();
                let down = Arc::new(AtomicBool::new(false));
                let hang = Arc::new(AtomicBool::new(false));
                let entered = Arc::new(AtomicBool::new(false));
                let spawned: Arc<std::sync::Mutex<Vec<herdcache::BoxFuture<()>>>> = Arc::default();
                let sp = Arc::clone(&spawned);
                let builder = async_fail_safe_builder(&clock, &down, &hang, &entered)
                    .refresh_after(Duration::from_secs(30))
                    .future_spawner(move |f| sp.lock().unwrap().push(f));
                let mut t = fs_tier(deaf_url(&server), &ns);
                if leases {
                    t = t.lease(Duration::from_secs(5), Duration::from_millis(150));
                }
                let a = t.build(builder, Plain).unwrap();
                let b = fs_instance(&server, &ns, &clock);
                let rt = runtime();
                let k = 3u64;
                let old = rt.block_on(a.load_async(k)).unwrap();
                b.invalidate(&k); // lost for A
                if other_holder {
                    redis::cmd("SET")
                        .arg(lkey(&ns, k))
                        .arg("other")
                        .arg("PX")
                        .arg(60_000)
                        .query::<()>(&mut raw(&server))
                        .unwrap();
                }
                clock.advance(Duration::from_secs(31));
                down.store(true, Ordering::SeqCst);
                hang.store(
                    point == Point::InLoader || (point == Point::ReadDone && !other_holder),
                    Ordering::SeqCst,
                );
                assert_eq!(
                    a.get(&k).as_deref(),
                    Some(old.as_str()),
                    "live, refresh due"
                );
                let mut fut = spawned.lock().unwrap().pop().expect("refresh spawned");
                let s0 = a.stats().remote;
                if matches!(point, Point::ReadDone | Point::LeaseWaitBegan) {
                    pause_writes(&server, 40);
                }
                let pending = rt.block_on(async {
                    let until = Instant::now() + Duration::from_secs(10);
                    let mut at = None;
                    // Polled once only before a read-counted drop point (see `drive_until`).
                    let again = matches!(point, Point::MidWait | Point::InLoader);
                    let mut polled = false;
                    loop {
                        if again || !polled {
                            polled = true;
                            let mut cx = Context::from_waker(Waker::noop());
                            if fut.as_mut().poll(&mut cx).is_ready() {
                                return false;
                            }
                        }
                        let s = a.stats().remote;
                        let ready = match point {
                            Point::ReadDone => s.misses > s0.misses,
                            Point::LeaseWaitBegan => s.lease_waits > s0.lease_waits,
                            Point::MidWait => {
                                s.lease_waits > s0.lease_waits
                                    && at.get_or_insert_with(Instant::now).elapsed()
                                        >= Duration::from_millis(40)
                            }
                            _ => entered.load(Ordering::SeqCst),
                        };
                        if ready {
                            return true;
                        }
                        assert!(Instant::now() < until, "{what}: never reached");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
                drop(fut);
                hang.store(false, Ordering::SeqCst);
                if !pending {
                    failures.push(format!("{what}: the refresh ended before the drop (setup)"));
                    continue;
                }
                clock.advance(Duration::from_secs(30)); // past the time to live
                let m = a.stats().misses;
                let stale = a.get_or_stale(&k);
                let plain_misses = a.stats().misses - m;
                let r = rt.block_on(a.load_async(k));
                // The entry API reads no Redis, but the refresh's read marked the copy: "unless a
                // load through the tier reads it first (its failure then drops the copy)".
                let e = a
                    .entry(k)
                    .or_try_insert_with(|| Err::<String, _>("down"))
                    .map(|e| e.into_value());
                let mut bad = Vec::new();
                if e.as_deref().ok() == Some(old.as_str()) {
                    bad.push(format!("or_try_insert_with served the copy {old:?}"));
                }
                if stale.as_deref() == Some(old.as_str()) {
                    bad.push(format!("get_or_stale served the copy {old:?}"));
                }
                if r.as_deref().ok() == Some(old.as_str()) {
                    bad.push(format!("the failed load served the copy {old:?}"));
                }
                if !eventually(|| a.loads_in_flight() == 0) {
                    bad.push("a load stays in flight".into());
                }
                let s = a.stats();
                if s.misses + s.refreshes_started
                    != plain_misses
                        + s.load_successes
                        + s.load_failures
                        + s.loads_abandoned
                        + s.coalesced
                        + s.negative_hits
                {
                    bad.push(format!("ledger: {s:?}"));
                }
                if !bad.is_empty() {
                    failures.push(format!("{what}: {}", bad.join("; ")));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The window round 90 opened to the mark — the read completed on the helper thread, the load
    /// not yet polled again — seen by other callers rather than by a drop. fail_safe.rs: "A
    /// timed-out wait whose load found the old value invalidated ... falls back on nothing";
    /// `get_or_stale`: "Not while a load that found the old value invalidated runs"; src/redis/
    /// mod.rs: "callers arriving while such a load runs" get its error; "Writes win" (an insert
    /// in that window detaches the load: its mark must not touch the value the insert stored).
    ///
    /// A (deaf) misses B's invalidation of key `k`; its `load_async(k)` (backend down) is polled
    /// once while the server holds writes (so the read is still out), then left alone until the
    /// read has completed. Then, without polling it:
    /// * `get_or_stale` and a blocking `load_with_timeout(k, 30 ms)` (which joins and times out)
    ///   must not answer the copy; the load, polled to its end, fails without it;
    /// * or A inserts "mine", the load is dropped: "mine" stays live, and once expired is
    ///   `get_or_stale`'s and a failed load's fallback.
    #[test]
    fn callers_in_the_window_after_the_read_before_the_next_poll() {
        let _w = common::watchdog(Duration::from_secs(60), "window callers");
        let server = RedisServer::start();
        for (i, insert) in [false, true].into_iter().enumerate() {
            let ns = format!("h91win{i}");
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let hang = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let d = Arc::clone(&down);
            let builder =
                async_fail_safe_builder(&clock, &down, &hang, &entered).loader(move |k: &u64| {
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(format!("s{k}"))
                    }
                });
            let a = Arc::new(
                fs_tier(deaf_url(&server), &ns)
                    .build(builder, Plain)
                    .unwrap(),
            );
            let b = fs_instance(&server, &ns, &clock);
            let rt = runtime();
            let k = 5u64;
            let old = rt.block_on(a.load_async(k)).unwrap();
            b.invalidate(&k); // lost for A
            clock.advance(Duration::from_secs(61));
            down.store(true, Ordering::SeqCst);
            let s0 = a.stats().remote;
            pause_writes(&server, 40);
            let mut fut = Box::pin(a.load_async(k));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(fut.as_mut().poll(&mut cx).is_pending(), "the read is held");
            assert!(
                eventually(|| a.stats().remote.misses > s0.misses),
                "the read of the tombstone completed"
            );
            if !insert {
                let stale = a.get_or_stale(&k);
                let timed = a.load_with_timeout(k, Some(Duration::from_millis(30)));
                let led = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(10), fut)
                        .await
                        .expect("load ended")
                });
                let after = a.get_or_stale(&k);
                let seen = [
                    ("get_or_stale in the window", stale),
                    (
                        "load_with_timeout joining in the window",
                        timed.as_ref().ok().cloned(),
                    ),
                    ("the load itself", led.as_ref().ok().cloned()),
                    ("get_or_stale after", after),
                ];
                let bad: Vec<_> = seen
                    .iter()
                    .filter(|(_, v)| v.as_deref() == Some(old.as_str()))
                    .collect();
                assert!(
                    bad.is_empty(),
                    "the read found B's tombstone (not yet taken by the load); served {old:?}: \
                 {bad:?}"
                );
            } else {
                a.insert(k, "mine".to_string());
                drop(fut);
                assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
                let live = a.get(&k);
                // Gone from Redis without a tombstone: a failed load reads nothing there.
                let _: () = redis::cmd("DEL")
                    .arg(vkey(&ns, k))
                    .query(&mut raw(&server))
                    .unwrap();
                clock.advance(Duration::from_secs(61));
                let stale = a.get_or_stale(&k);
                let r = rt.block_on(a.load_async(k));
                assert!(
                live.as_deref() == Some("mine")
                    && stale.as_deref() == Some("mine")
                    && r.as_deref().ok() == Some("mine"),
                "A inserted \"mine\" while its marked load was in the window, then dropped it: \
                 live {live:?}, expired: get_or_stale {stale:?}, failed load {r:?}"
            );
            }
        }
    }

    /// fail_safe.rs "Writes win", and a refresh's mark: "a refresh that won over ... (its flight
    /// detached ...)" — a write since the refresh began: the mark of its read (the copy it
    /// refreshed is no fallback) must not reach the value the write stored (src/refresh.rs: "While
    /// the refresh is registered no write has replaced the value it refreshed").
    ///
    /// A's async refresh (via a `future_spawner`) of key 4, whose tombstone A missed, is polled
    /// once while the server holds writes and left alone until its read completed (marked on the
    /// helper thread); A inserts "mine"; the refresh is then dropped, or polled to its end
    /// (failing). "mine" must be live, and once expired `get_or_stale`'s and a failed load's
    /// fallback.
    #[test]
    fn refresh_marked_in_the_window_then_overtaken_by_an_insert() {
        let _w = common::watchdog(Duration::from_secs(60), "refresh then insert");
        let server = RedisServer::start();
        for (i, dropped) in [true, false].into_iter().enumerate() {
            let ns = format!("h91ri{i}");
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let hang = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let spawned: Arc<std::sync::Mutex<Vec<herdcache::BoxFuture<()>>>> = Arc::default();
            let sp = Arc::clone(&spawned);
            let builder = async_fail_safe_builder(&clock, &down, &hang, &entered)
                .refresh_after(Duration::from_secs(30))
                .future_spawner(move |f| sp.lock().unwrap().push(f));
            let a = fs_tier(deaf_url(&server), &ns)
                .build(builder, Plain)
                .unwrap();
            let b = fs_instance(&server, &ns, &clock);
            let rt = runtime();
            let k = 4u64;
            let old = rt.block_on(a.load_async(k)).unwrap();
            b.invalidate(&k); // lost for A
            clock.advance(Duration::from_secs(31));
            down.store(true, Ordering::SeqCst);
            assert_eq!(
                a.get(&k).as_deref(),
                Some(old.as_str()),
                "live, refresh due"
            );
            let mut fut = spawned.lock().unwrap().pop().expect("refresh spawned");
            let s0 = a.stats().remote;
            pause_writes(&server, 40);
            let mut cx = Context::from_waker(Waker::noop());
            assert!(fut.as_mut().poll(&mut cx).is_pending(), "the read is held");
            assert!(
                eventually(|| a.stats().remote.misses > s0.misses),
                "the refresh's read completed"
            );
            a.insert(k, "mine".to_string());
            if dropped {
                drop(fut);
            } else {
                rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(10), fut)
                        .await
                        .expect("refresh ended")
                });
            }
            assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
            let live = a.get(&k);
            let _: () = redis::cmd("DEL")
                .arg(vkey(&ns, k))
                .query(&mut raw(&server))
                .unwrap();
            clock.advance(Duration::from_secs(61));
            let stale = a.get_or_stale(&k);
            let r = rt.block_on(a.load_async(k));
            assert!(
            live.as_deref() == Some("mine")
                && stale.as_deref() == Some("mine")
                && r.as_deref().ok() == Some("mine"),
            "[refresh {}] A inserted \"mine\" after the refresh's read marked it: live {live:?}, \
             expired: get_or_stale {stale:?}, failed load {r:?}",
            if dropped { "dropped" } else { "failed" }
        );
        }
    }
}

mod flights {
    //! Helper 91: can a read's "forgo fallback" mark land on the wrong flight? (The read marks
    //! "the load it is for": on the thread that runs it, or on a helper thread registered for the
    //! async load's flight.) Nested loads (a loader of one key loading another through the tier,
    //! sync and async, either way round; through a second cache of the same key and value types),
    //! and many concurrent async loads, half of whose keys A missed an invalidation of, with lease
    //! waits keeping the helper threads busy. A key whose read found no tombstone must keep its
    //! fallback; a key whose read found one must lose it.
    //!
    //! 2 tests; none fails on 4752b5e (3 runs each). They pass on the parent commit b4140fc too:
    //! they pin that the helper thread's registration sends no mark to another flight (the
    //! innermost registered flight on a nested load's thread is the nested load's own).
    use super::{fs, runtime};

    use crate::common;
    use crate::common::tier::*;
    use herdcache::codec::Plain;
    use herdcache::redis::TieredCache;
    use herdcache::{BoxError, CacheBuilder, ManualClock};
    use herdcache_testkit::redis_server::RedisServer;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    type Slot = Arc<OnceLock<Arc<TieredCache<u64, String>>>>;

    /// A sync loader: fails while `down`; for key `outer`, first loads `inner` from `target`
    /// (ignoring the answer).
    fn nested_sync(
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        outer: u64,
        inner: u64,
        target: &Slot,
    ) -> CacheBuilder<u64, String> {
        let (d, t) = (Arc::clone(down), Arc::clone(target));
        fs(clock).loader(move |k: &u64| {
            if *k == outer && d.load(Ordering::SeqCst) {
                if let Some(c) = t.get() {
                    let _ = c.load(inner);
                }
            }
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(format!("v{k}"))
            }
        })
    }

    /// The async twin: key `outer`'s load awaits `target.load_async(inner)` first.
    fn nested_async(
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        outer: u64,
        inner: u64,
        target: &Slot,
    ) -> CacheBuilder<u64, String> {
        let (d, t) = (Arc::clone(down), Arc::clone(target));
        fs(clock).async_loader(move |k: &u64| {
            let (d, t, k) = (Arc::clone(&d), Arc::clone(&t), *k);
            async move {
                if k == outer && d.load(Ordering::SeqCst) {
                    if let Some(c) = t.get() {
                        let _ = c.load_async(inner).await;
                    }
                }
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("v{k}"))
                }
            }
        })
    }

    /// fail_safe.rs: a load "whose read of Redis finds a tombstone newer than every version of
    /// the key this instance wrote, heard of or read before ... does not fall back"; any other
    /// failed load of an expired key: "every caller of that load gets the old value instead of the
    /// error". A nested load's read marks its own load (src/redis/tier.rs: "Every read is a
    /// fetch's, run on the thread of the load it is for").
    ///
    /// A (deaf) holds keys 1 and 2, expired, backend down. B invalidated key 1 (missed); key 2 is
    /// simply gone from Redis (no tombstone). Swept: sync and async loaders; key 2's load loading
    /// key 1 inside it, and key 1's loading key 2; the nested load through the same cache or a
    /// second deaf cache (same key and value types, its own namespace, where the nested key is the
    /// tombstoned one). Key 2 (clean) must be answered with its old value, the tombstoned key not.
    #[test]
    fn nested_loads_mark_only_their_own_flight() {
        let _w = common::watchdog(Duration::from_secs(90), "nested");
        let server = RedisServer::start();
        let mut failures = Vec::new();
        let mut case = 0;
        for asynchronous in [false, true] {
            // (outer key, inner key, inner load through a second cache)
            for (outer, inner, second) in [(2u64, 1u64, false), (1, 2, false), (2, 2, true)] {
                case += 1;
                let ns = format!("h91n{case}");
                let ns2 = format!("h91n{case}x");
                let what = format!(
                    "[async {asynchronous}, key {outer}'s load loads key {inner}{}]",
                    if second { " of a second cache" } else { "" }
                );
                let clock = ManualClock::new();
                let down = Arc::new(AtomicBool::new(false));
                let slot: Slot = Arc::default();
                let mk = |o: u64, i: u64, s: &Slot| {
                    if asynchronous {
                        nested_async(&clock, &down, o, i, s)
                    } else {
                        nested_sync(&clock, &down, o, i, s)
                    }
                };
                let a = Arc::new(
                    fs_tier(deaf_url(&server), &ns)
                        .build(mk(outer, inner, &slot), Plain)
                        .unwrap(),
                );
                let b = fs_instance(&server, &ns, &clock);
                // The second cache: its key `inner` is the tombstoned one; nothing nested in it.
                let none: Slot = Arc::default();
                let a2 = Arc::new(
                    fs_tier(deaf_url(&server), &ns2)
                        .build(mk(u64::MAX, 0, &none), Plain)
                        .unwrap(),
                );
                let b2 = fs_instance(&server, &ns2, &clock);
                let rt = runtime();
                let load = |c: &TieredCache<u64, String>, k: u64| {
                    if asynchronous {
                        rt.block_on(c.load_async(k))
                    } else {
                        c.load(k)
                    }
                };
                for k in [1u64, 2] {
                    load(&a, k).unwrap();
                    load(&a2, k).unwrap();
                }
                let _ = slot.set(if second {
                    Arc::clone(&a2)
                } else {
                    Arc::clone(&a)
                });
                // Key 1 of A invalidated by B (missed); key 2 of A gone from Redis (no tombstone).
                b.invalidate(&1);
                let _: () = redis::cmd("DEL")
                    .arg(vkey(&ns, 2))
                    .query(&mut raw(&server))
                    .unwrap();
                // In the second cache, the nested key is invalidated (missed).
                b2.invalidate(&inner);
                clock.advance(Duration::from_secs(61));
                down.store(true, Ordering::SeqCst);
                let r = load(&a, outer);
                let r_inner = if second {
                    a2.get_or_stale(&inner)
                } else {
                    a.get_or_stale(&inner)
                };
                let r1 = a.get_or_stale(&1);
                let r2 = a.get_or_stale(&2);
                let mut bad = Vec::new();
                // Key 2 of A: clean, its fallback stays.
                if outer == 2 && r.as_deref().ok() != Some("v2") {
                    bad.push(format!(
                        "A's key 2 (no tombstone) lost its fallback: load {r:?}"
                    ));
                }
                if r2.as_deref() != Some("v2") {
                    bad.push(format!("A's key 2: get_or_stale {r2:?} (want \"v2\")"));
                }
                // Key 1 of A: tombstoned, no fallback once a load read it (in the second-cache
                // cases nothing loads A's key 1: `get_or_stale` reads no Redis, documented).
                if !second && r1.as_deref() == Some("v1") {
                    bad.push("A's key 1 (tombstoned) still served by get_or_stale".into());
                }
                if outer == 1 && r.as_deref().ok() == Some("v1") {
                    bad.push(format!(
                        "A's key 1 (tombstoned) served by its failed load {r:?}"
                    ));
                }
                if second && r_inner.as_deref() == Some(format!("v{inner}").as_str()) {
                    bad.push(format!(
                        "the second cache's key {inner} (tombstoned, read by the nested load) \
                     still served by get_or_stale"
                    ));
                }
                if !bad.is_empty() {
                    failures.push(format!("{what}: {}", bad.join("; ")));
                }
                drop(slot);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The same rule with the helper threads busy: 48 keys loaded concurrently by `load_async`
    /// (backend down) on a 2-thread runtime, odd keys invalidated by B (missed), even keys gone
    /// from Redis without a tombstone; every fourth key also has another holder's lease, so its
    /// load waits (150 ms, several round trips on helper threads) before loading. Each even key's
    /// failed load answers its old value; no odd key's does, nor `get_or_stale` of an odd key.
    #[test]
    fn many_concurrent_async_loads_each_marked_by_its_own_read() {
        let _w = common::watchdog(Duration::from_secs(90), "many");
        let server = RedisServer::start();
        let ns = "h91many";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&down);
        let builder = fs(&clock).async_loader(move |k: &u64| {
            let (d, k) = (Arc::clone(&d), *k);
            async move {
                // A little work, so that loads overlap.
                tokio::time::sleep(Duration::from_millis(2)).await;
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("v{k}"))
                }
            }
        });
        let a = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(5), Duration::from_millis(150))
            .build(builder, Plain)
            .unwrap();
        let b = fs_instance(&server, ns, &clock);
        let rt = runtime();
        let keys: Vec<u64> = (1..=48).collect();
        for &k in &keys {
            rt.block_on(a.load_async(k)).unwrap();
        }
        let mut c = raw(&server);
        for &k in &keys {
            if k % 2 == 1 {
                b.invalidate(&k);
            } else {
                let _: () = redis::cmd("DEL").arg(vkey(ns, k)).query(&mut c).unwrap();
            }
            if k % 4 == 0 || k % 4 == 3 {
                redis::cmd("SET")
                    .arg(format!("hc:{}:{ns}:l{{{k}}}", ns.len()))
                    .arg("other")
                    .arg("PX")
                    .arg(60_000)
                    .query::<()>(&mut c)
                    .unwrap();
            }
        }
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let results = rt.block_on(async {
            let futs = keys.iter().map(|&k| {
                let a = &a;
                async move { (k, a.load_async(k).await) }
            });
            futures::future::join_all(futs).await
        });
        let mut bad = Vec::new();
        for (k, r) in results {
            let old = format!("v{k}");
            let stale = a.get_or_stale(&k);
            if k % 2 == 0 {
                if r.as_deref().ok() != Some(old.as_str()) {
                    bad.push(format!(
                        "key {k} (no tombstone): failed load {r:?}, want its old value"
                    ));
                }
            } else if r.as_deref().ok() == Some(old.as_str())
                || stale.as_deref() == Some(old.as_str())
            {
                bad.push(format!(
                    "key {k} (tombstoned): load {r:?}, get_or_stale {stale:?} served the copy"
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        assert!(
            common::eventually(|| a.loads_in_flight() == 0),
            "loads stay in flight"
        );
    }
}

mod codec {
    //! Helper 91: user code on the helper thread while it is registered for a load's flight (a
    //! value codec that panics, or calls into the cache — another key, or the very key being
    //! loaded), and the documented holes around the read (a load cancelled or timed out before
    //! its read completed: bounded by the retry; `max_concurrent_loads` permit waits; a soft
    //! timeout joining an async load that read the tombstone).
    //!
    //! 5 tests; none fails on 4752b5e (3 runs each). A behaviour change the commit brought, pinned
    //! by `decode_calling_into_the_cache_on_the_helper_thread`: a value codec whose `decode` (run
    //! on the helper thread of an async round trip) loads the very key being loaded hung for ever
    //! on b4140fc (the nested blocking load joined the load that waited for that helper thread;
    //! the test's 20 s bound hit); now the helper thread is registered for the load, so the nested
    //! call panics as a recursive load ("herdcache: recursive load: ..."), the pool catches it,
    //! the round trip counts as "Redis has nothing" and the load goes on locally (fail-safe still
    //! answers the key's old value; the ledger balances). Not documented either way: `Codec` says
    //! nothing about calling the cache from `decode`, and the `get_with` panics section speaks of
    //! `init` asking for its key "on the same thread".
    use super::{lkey, runtime};

    use crate::common;
    use crate::common::eventually;
    use crate::common::tier::*;
    use herdcache::codec::{Codec, Plain};
    use herdcache::redis::TieredCache;
    use herdcache::{BoxError, LoadError, ManualClock};
    use herdcache_testkit::redis_server::RedisServer;
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, OnceLock};
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    /// A value codec (strings as they are) whose `decode` acts on marker values: `PANIC` panics,
    /// `CALL:<k>` loads key `k` from the cache in `slot` (blocking) and then fails to decode.
    #[derive(Clone)]
    struct Hostile(Arc<OnceLock<Arc<TieredCache<u64, String>>>>, Arc<AtomicU64>);

    impl Codec<String> for Hostile {
        fn encode(&self, v: &String, out: &mut Vec<u8>) -> Result<(), BoxError> {
            out.extend_from_slice(v.as_bytes());
            Ok(())
        }
        fn decode(&self, b: &[u8]) -> Result<String, BoxError> {
            let s = String::from_utf8(b.to_vec())?;
            if s == "PANIC" {
                self.1.fetch_add(1, Ordering::SeqCst);
                panic!("injected: decode panics");
            }
            if let Some(k) = s.strip_prefix("CALL:") {
                self.1.fetch_add(1, Ordering::SeqCst);
                let k: u64 = k.parse()?;
                if let Some(c) = self.0.get() {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.load(k)));
                    if let Err(p) = r {
                        NESTED_PANICS.fetch_add(1, Ordering::SeqCst);
                        std::panic::resume_unwind(p);
                    }
                }
                return Err("not a value".into());
            }
            Ok(s)
        }
    }

    /// Nested calls of `Hostile::decode` that panicked.
    static NESTED_PANICS: AtomicU64 = AtomicU64::new(0);

    /// Writes `value` as key `k`'s value in Redis behind the tier's back, keeping its version.
    fn plant(server: &RedisServer, ns: &str, k: u64, value: &str) {
        let _: () = redis::cmd("HSET")
            .arg(vkey(ns, k))
            .arg("d")
            .arg(value)
            .query(&mut raw(server))
            .unwrap();
    }

    /// src/redis/mod.rs (leases): a holder "whose loader, value codec or value's `Clone` panics,
    /// whichever of its steps meets it (decoding the value read with the lease ...)" gives the
    /// lease back; "Redis failing never fails a request" (a failed round trip counts as "Redis
    /// has nothing": the value is loaded locally); a read that found the missed tombstone marks
    /// the load, which "does not fall back".
    ///
    /// A (deaf, leases) misses B's invalidation of key 1; another holder's lease makes A's
    /// `load_async(1)` (backend down) wait after its first read (the tombstone). Then a value
    /// `PANIC` appears in Redis: the next poll's decode panics on the helper thread, while it is
    /// registered for the load. The load must end (no hang) with its error — not the invalidated
    /// copy — and the other holder's lease is untouched; then 20 clean keys (no tombstone: their
    /// values deleted from Redis) loaded through the same helper threads keep their fallbacks.
    #[test]
    fn decode_panicking_on_a_helper_thread_after_the_tombstone() {
        let _w = common::watchdog(Duration::from_secs(60), "decode panics");
        common::quiet_injected_panics();
        let server = RedisServer::start();
        let ns = "h91cp";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let hang = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(AtomicBool::new(false));
        let codec = Hostile(Arc::default(), Arc::default());
        let a = fs_tier(deaf_url(&server), ns)
            .lease(Duration::from_secs(5), Duration::from_secs(3))
            .build_with(
                async_fail_safe_builder(&clock, &down, &hang, &entered),
                Plain,
                codec.clone(),
            )
            .unwrap();
        let b = fs_instance(&server, ns, &clock);
        let rt = runtime();
        let old = rt.block_on(a.load_async(1)).unwrap();
        let clean: Vec<u64> = (100..120).collect();
        let mut olds = Vec::new();
        for &k in &clean {
            olds.push(rt.block_on(a.load_async(k)).unwrap());
        }
        b.invalidate(&1);
        let mut c = raw(&server);
        for &k in &clean {
            let _: () = redis::cmd("DEL").arg(vkey(ns, k)).query(&mut c).unwrap();
        }
        redis::cmd("SET")
            .arg(lkey(ns, 1))
            .arg("other")
            .arg("PX")
            .arg(60_000)
            .query::<()>(&mut c)
            .unwrap();
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let s0 = a.stats().remote;
        let r = rt.block_on(async {
            let mut fut = Box::pin(a.load_async(1));
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let mut cx = Context::from_waker(Waker::noop());
                if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                    return Some(r);
                }
                if a.stats().remote.lease_waits > s0.lease_waits {
                    break;
                }
                assert!(Instant::now() < until);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            plant(&server, ns, 1, "PANIC");
            tokio::time::timeout(Duration::from_secs(10), fut)
                .await
                .ok()
        });
        let r = r.expect("the load ended");
        assert!(
            codec.1.load(Ordering::SeqCst) >= 1,
            "decode never met the marker"
        );
        let stale = a.get_or_stale(&1);
        let lease: Option<String> = redis::cmd("GET").arg(lkey(ns, 1)).query(&mut c).unwrap();
        let clean_r: Vec<_> = rt.block_on(futures::future::join_all(
            clean.iter().map(|&k| a.load_async(k)),
        ));
        let lost: Vec<_> = clean
            .iter()
            .zip(clean_r.iter().zip(olds.iter()))
            .filter(|(_, (r, old))| r.as_deref().ok() != Some(old.as_str()))
            .map(|(k, (r, _))| format!("key {k}: {r:?}"))
            .collect();
        assert!(
            r.as_deref().ok() != Some(old.as_str()) && stale.as_deref() != Some(old.as_str()),
            "the load read the tombstone, then its decode panicked: load {r:?}, get_or_stale \
         {stale:?} (invalidated copy {old:?})"
        );
        assert_eq!(lease.as_deref(), Some("other"), "the other holder's lease");
        assert!(lost.is_empty(), "clean keys lost their fallback: {lost:?}");
        assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
    }

    /// A value codec's `decode`, on the helper thread registered for key 2's async load, loads
    /// key 9 from the same cache (blocking) — a key whose tombstone A missed — then fails to
    /// decode (counted as an error: "treated as a miss of the second tier: the value is loaded
    /// instead"). Key 9's read marks key 9's load (fail_safe.rs: it "does not fall back"); key 2's
    /// own read found a value, no tombstone: its failed load must answer its old value ("every
    /// caller of that load gets the old value instead of the error"). Then the same with `decode`
    /// loading key 2 itself (the key whose load the helper thread runs for): whatever it answers,
    /// nothing may hang, and key 2 still falls back. The statistics' ledger balances throughout.
    /// (Before round 90 the second case hung: the nested load joined the very load waiting for
    /// the helper thread; now the helper thread is registered for that load, and the nested call
    /// panics as a recursive load, which the round trip survives: "Redis failing never fails a
    /// request".)
    #[test]
    fn decode_calling_into_the_cache_on_the_helper_thread() {
        let _w = common::watchdog(Duration::from_secs(60), "decode calls the cache");
        common::quiet_injected_panics();
        let server = RedisServer::start();
        for (i, nested) in [9u64, 2].into_iter().enumerate() {
            let ns = format!("h91cc{i}");
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let hang = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let codec = Hostile(Arc::default(), Arc::default());
            // Sync loads (decode's nested `load`) use the same loader's failure: the builder
            // needs a blocking loader too.
            let d = Arc::clone(&down);
            let builder =
                async_fail_safe_builder(&clock, &down, &hang, &entered).loader(move |k: &u64| {
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(format!("s{k}"))
                    }
                });
            let a = Arc::new(
                fs_tier(deaf_url(&server), &ns)
                    .build_with(builder, Plain, codec.clone())
                    .unwrap(),
            );
            let _ = codec.0.set(Arc::clone(&a));
            let b = fs_instance(&server, &ns, &clock);
            let rt = runtime();
            let old2 = rt.block_on(a.load_async(2)).unwrap();
            let old9 = a.load(9).unwrap();
            b.invalidate(&9); // lost for A
                              // The async load's write-back runs after it returned: planted after it.
            assert!(
                eventually(|| rvalue(&mut raw(&server), &ns, 2).as_deref() == Some(old2.as_str())),
                "written back"
            );
            plant(&server, &ns, 2, &format!("CALL:{nested}"));
            clock.advance(Duration::from_secs(61));
            down.store(true, Ordering::SeqCst);
            let a2 = Arc::clone(&a);
            let done = common::within(Duration::from_secs(20), move || {
                let rt = runtime();
                rt.block_on(a2.load_async(2))
            });
            let r2 = match done {
                None => panic!("[decode loads key {nested}] load_async(2) hung"),
                Some(Err(p)) => panic!(
                    "[decode loads key {nested}] load_async(2) panicked: {}",
                    common::panic_message(&*p)
                ),
                Some(Ok(r)) => r,
            };
            assert!(
                codec.1.load(Ordering::SeqCst) >= 1,
                "decode never met the marker"
            );
            eprintln!(
                "[decode loads key {nested}] nested calls that panicked so far: {}",
                NESTED_PANICS.load(Ordering::SeqCst)
            );
            let m = a.stats().misses;
            let s9 = a.get_or_stale(&9);
            let plain_misses = a.stats().misses - m; // no loading call: its miss counts alone
            assert_eq!(
            r2.as_deref().ok(),
            Some(old2.as_str()),
            "[decode loads key {nested}] key 2's read found a value (no tombstone): its failed \
             load answers its old value"
        );
            if nested == 9 {
                assert_ne!(
                    s9.as_deref(),
                    Some(old9.as_str()),
                    "key 9's nested load read its tombstone: no fallback"
                );
            }
            assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
            // stats.rs, `misses`: each miss of a loading call is exactly one of a load, a join or
            // a negative hit — the nested call on the helper thread too.
            let s = a.stats();
            assert_eq!(
                s.misses + s.refreshes_started,
                plain_misses
                    + s.load_successes
                    + s.load_failures
                    + s.loads_abandoned
                    + s.coalesced
                    + s.negative_hits,
                "[decode loads key {nested}] ledger: {s:?}"
            );
        }
    }

    /// src/redis/mod.rs: "a soft timeout that passes, or an async load cancelled, before its
    /// load's read of Redis completed (waiting for a `max_concurrent_loads` permit: the tier's
    /// read runs under the permit); the abandoned load starts the backoff on the copy, and the
    /// callers within it are answered with it too, until the retry" — the retry, "a
    /// `refresh_backoff` after the failure, reads the tombstone".
    ///
    /// A (deaf, `max_concurrent_loads(1)`, the permit held by a hanging load of key 50) misses
    /// B's invalidation of key 1. Swept: `load_async(1)` cut off by a runtime timeout while it
    /// waits for the permit, and `load_with_timeout` (blocking, async-only cache: see below: a
    /// sync loader too) timing out there. Within the backoff the copy may be served; after it (the
    /// permit free again) the retry reads the tombstone: neither it, nor `get_or_stale`, nor a
    /// later load may serve the copy.
    #[test]
    fn permit_wait_cut_off_before_the_read_is_bounded_by_the_retry() {
        let _w = common::watchdog(Duration::from_secs(60), "permit wait");
        let server = RedisServer::start();
        for (i, asynchronous) in [true, false].into_iter().enumerate() {
            let ns = format!("h91pw{i}");
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let hang = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let gate = common::Gate::new();
            let (d, g) = (Arc::clone(&down), Arc::clone(&gate));
            let builder = async_fail_safe_builder(&clock, &down, &hang, &entered)
                .max_concurrent_loads(1)
                .loader(move |k: &u64| {
                    if *k == 50 {
                        g.pass();
                    }
                    if d.load(Ordering::SeqCst) {
                        Err(BoxError::from("backend down"))
                    } else {
                        Ok(format!("s{k}"))
                    }
                });
            let a = Arc::new(
                fs_tier(deaf_url(&server), &ns)
                    .build(builder, Plain)
                    .unwrap(),
            );
            let b = fs_instance(&server, &ns, &clock);
            let rt = runtime();
            let old = if asynchronous {
                rt.block_on(a.load_async(1)).unwrap()
            } else {
                a.load(1).unwrap()
            };
            b.invalidate(&1);
            clock.advance(Duration::from_secs(61));
            down.store(true, Ordering::SeqCst);
            // Key 50's load takes the only permit and hangs.
            let a50 = Arc::clone(&a);
            let holder = common::start(move || a50.load(50));
            gate.wait_entered();
            let m0 = a.stats().remote.misses;
            let first = if asynchronous {
                rt.block_on(async {
                    match tokio::time::timeout(Duration::from_millis(30), a.load_async(1)).await {
                        Ok(r) => r,
                        Err(_) => a.get_or_stale(&1).ok_or(LoadError::Timeout),
                    }
                })
            } else {
                a.load_with_timeout(1, Some(Duration::from_millis(30)))
            };
            assert_eq!(
                a.stats().remote.misses,
                m0,
                "no read ran under the held permit"
            );
            gate.open();
            let _ = holder.wait(Duration::from_secs(10)).expect("holder ended");
            // `first` may be the copy (documented). After the backoff, the retry reads.
            clock.advance(Duration::from_secs(6));
            let retry = if asynchronous {
                rt.block_on(a.load_async(1))
            } else {
                a.load(1)
            };
            let stale = a.get_or_stale(&1);
            let again = if asynchronous {
                rt.block_on(a.load_async(1))
            } else {
                a.load(1)
            };
            let seen = [
                ("retry", retry.as_ref().ok().cloned()),
                ("get_or_stale", stale),
                ("load after", again.as_ref().ok().cloned()),
            ];
            let bad: Vec<_> = seen
                .iter()
                .filter(|(_, v)| v.as_deref() == Some(old.as_str()))
                .collect();
            assert!(
                bad.is_empty(),
                "[async {asynchronous}] first (cut off) {first:?}; after the backoff the retry \
             read the tombstone, yet served {old:?}: {bad:?}"
            );
            assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
        }
    }

    /// fail_safe.rs: "A timed-out wait whose load found the old value invalidated (the Redis tier
    /// read a tombstone its instance had missed) falls back on nothing, as the load's own failure
    /// does"; `get_or_stale`: "Not while a load that found the old value invalidated runs";
    /// `load_async`: "bound the wait (`load_timeout`, or the runtime's timeout and
    /// `get_or_stale`)".
    ///
    /// A (deaf) misses B's invalidation of key 1; an async leader's read finds the tombstone and
    /// its loader hangs; a blocking `load_with_timeout(1, 50 ms)` joins and times out, and an async
    /// `load_async(1)` cut off by the runtime's timeout falls back on `get_or_stale`: neither may
    /// get the invalidated copy; then the leader fails: neither it nor a later load nor
    /// `get_or_stale` serves it.
    #[test]
    fn async_soft_timeout_joining_a_load_that_read_the_tombstone() {
        let _w = common::watchdog(Duration::from_secs(60), "async soft timeout");
        let server = RedisServer::start();
        for leases in [false, true] {
            let ns = format!("h91st{}", leases as u8);
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let hang = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let mut t = fs_tier(deaf_url(&server), &ns);
            if leases {
                t = t.lease(Duration::from_secs(5), Duration::from_millis(100));
            }
            let d = Arc::clone(&down);
            let a = Arc::new(
                t.build(
                    async_fail_safe_builder(&clock, &down, &hang, &entered).loader(
                        move |k: &u64| {
                            if d.load(Ordering::SeqCst) {
                                Err(BoxError::from("backend down"))
                            } else {
                                Ok(format!("s{k}"))
                            }
                        },
                    ),
                    Plain,
                )
                .unwrap(),
            );
            let b = fs_instance(&server, &ns, &clock);
            let rt = runtime();
            let old = rt.block_on(a.load_async(1)).unwrap();
            b.invalidate(&1);
            clock.advance(Duration::from_secs(61));
            down.store(true, Ordering::SeqCst);
            hang.store(true, Ordering::SeqCst);
            let a1 = Arc::clone(&a);
            let leader = rt.spawn(async move { a1.load_async(1).await });
            assert!(
                eventually(|| entered.load(Ordering::SeqCst)),
                "leader in its loader"
            );
            let joined = a.load_with_timeout(1, Some(Duration::from_millis(50)));
            let cut = rt.block_on(async {
                match tokio::time::timeout(Duration::from_millis(50), a.load_async(1)).await {
                    Ok(r) => r.ok(),
                    Err(_) => a.get_or_stale(&1),
                }
            });
            let during = a.get_or_stale(&1);
            hang.store(false, Ordering::SeqCst);
            let led = rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), leader).await })
                .expect("leader ended")
                .unwrap();
            let after = a.get_or_stale(&1);
            let later = rt.block_on(a.load_async(1));
            let seen = [
                ("timed-out blocking join", joined.as_ref().ok().cloned()),
                ("async join cut off, then get_or_stale", cut),
                ("get_or_stale during", during),
                ("leader", led.as_ref().ok().cloned()),
                ("get_or_stale after", after),
                ("later load", later.as_ref().ok().cloned()),
            ];
            let bad: Vec<_> = seen
                .iter()
                .filter(|(_, v)| v.as_deref() == Some(old.as_str()))
                .collect();
            assert!(
                bad.is_empty(),
                "[leases {leases}] the leader read B's tombstone; served {old:?}: {bad:?}"
            );
            assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
        }
    }

    /// An async load dropped right after its first poll (its read may or may not have completed:
    /// both are documented — before, "the abandoned load starts the backoff on the copy ... until
    /// the retry"; after, the read marks the load). Either way, after the backoff the retry reads
    /// the tombstone: no API serves the copy from then on. Repeated 30 times (on fresh keys) to
    /// catch the read finishing at any moment around the drop.
    #[test]
    fn dropped_around_the_read_any_moment_then_the_retry_decides() {
        let _w = common::watchdog(Duration::from_secs(60), "drop around read");
        let server = RedisServer::start();
        let ns = "h91dar";
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
        let keys: Vec<u64> = (1..=30).collect();
        let mut olds = Vec::new();
        for &k in &keys {
            olds.push(rt.block_on(a.load_async(k)).unwrap());
            b.invalidate(&k);
        }
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        hang.store(true, Ordering::SeqCst);
        for (i, &k) in keys.iter().enumerate() {
            rt.block_on(async {
                let mut fut = Box::pin(a.load_async(k));
                let mut cx = Context::from_waker(Waker::noop());
                let _ = fut.as_mut().poll(&mut cx);
                // Vary the moment of the drop: 0..~3 ms after the first poll.
                for _ in 0..(i % 4) {
                    std::thread::sleep(Duration::from_micros(700));
                }
                drop(fut);
            });
        }
        hang.store(false, Ordering::SeqCst);
        assert!(eventually(|| a.loads_in_flight() == 0), "in flight");
        clock.advance(Duration::from_secs(6)); // past every backoff
        let mut bad = Vec::new();
        for (&k, old) in keys.iter().zip(&olds) {
            let retry = rt.block_on(a.load_async(k));
            let stale = a.get_or_stale(&k);
            let again = rt.block_on(a.load_async(k));
            for (what, v) in [
                ("retry", retry.as_ref().ok().cloned()),
                ("get_or_stale", stale),
                ("again", again.as_ref().ok().cloned()),
            ] {
                if v.as_deref() == Some(old.as_str()) {
                    bad.push(format!("key {k}: {what} served the copy"));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}

mod sync {
    //! Helper 91: blocking loads through lease waits (the waits sleep on the loading thread), and
    //! writes racing the read that finds the missed tombstone (A's own insert while the marked
    //! load runs: writes win, the inserted value stays fail-safe's).
    //! A parked refresh job, run or dropped after the copy expired.
    //!
    //! 3 tests; none fails on 4752b5e (3 runs each; they pass on b4140fc too: the blocking path
    //! marked its load on its own thread before the commit as well).
    use super::lkey;

    use crate::common;
    use crate::common::tier::*;
    use crate::common::{eventually, Gate};
    use herdcache::codec::Plain;

    use herdcache::{BoxError, Cache, CacheBuilder, LoadError, ManualClock};
    use herdcache_testkit::redis_server::RedisServer;
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    fn hold_lease(server: &RedisServer, ns: &str, k: u64) {
        redis::cmd("SET")
            .arg(lkey(ns, k))
            .arg("other")
            .arg("PX")
            .arg(60_000)
            .query::<()>(&mut raw(server))
            .unwrap();
    }

    /// A blocking fail-safe cache failing while `down`; a load passes `gate` while `gated`.
    fn gated(
        clock: &ManualClock,
        down: &Arc<AtomicBool>,
        gated: &Arc<AtomicBool>,
        gate: &Arc<Gate>,
    ) -> CacheBuilder<u64, String> {
        let (d, gd, g) = (Arc::clone(down), Arc::clone(gated), Arc::clone(gate));
        Cache::builder()
            .max_capacity(1000)
            .time_to_live(Duration::from_secs(60))
            .fail_safe(Duration::from_secs(600))
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
                    Ok(format!("a{k}"))
                }
            })
    }

    /// src/redis/mod.rs: fail-safe's callers of a load that read the missed tombstone get its
    /// error: "So do a soft timeout's callers, and callers arriving while such a load runs";
    /// src/redis/tier.rs (`snapshot`): the load "forgoes its fallback from now on — while it
    /// waits for a lease too (a soft timeout or a caller arriving meanwhile must not be answered
    /// with the copy)".
    ///
    /// A (deaf, leases: wait 1.5 s) misses B's invalidation of key 1; another holder's lease makes
    /// A's blocking load (on its own thread, backend down) wait, sleeping between polls, after its
    /// first read found the tombstone. Meanwhile: a `load_with_timeout(1, 30 ms)` that joins (times
    /// out), `get_or_stale`, a `try_get_with` that joins (its own `init` failing) — none may
    /// answer the invalidated copy; nor the load when it fails, nor anything afterwards; the other
    /// holder's lease stays untouched.
    #[test]
    fn blocking_load_in_a_lease_wait_after_the_tombstone() {
        let _w = common::watchdog(Duration::from_secs(60), "blocking lease wait");
        let server = RedisServer::start();
        let ns = "h91bl";
        let clock = ManualClock::new();
        let down = Arc::new(AtomicBool::new(false));
        let gd = Arc::new(AtomicBool::new(false));
        let gate = Gate::new();
        let a = Arc::new(
            fs_tier(deaf_url(&server), ns)
                .lease(Duration::from_secs(5), Duration::from_millis(1500))
                .build(gated(&clock, &down, &gd, &gate), Plain)
                .unwrap(),
        );
        let b = fs_instance(&server, ns, &clock);
        let old = a.load(1).unwrap();
        b.invalidate(&1);
        hold_lease(&server, ns, 1);
        clock.advance(Duration::from_secs(61));
        down.store(true, Ordering::SeqCst);
        let s0 = a.stats().remote;
        let a1 = Arc::clone(&a);
        let leader = common::start(move || a1.load(1));
        assert!(
            eventually(|| a.stats().remote.lease_waits > s0.lease_waits),
            "the leader waits on the lease"
        );
        let timed = a.load_with_timeout(1, Some(Duration::from_millis(30)));
        let stale = a.get_or_stale(&1);
        let a2 = Arc::clone(&a);
        let joiner = common::start(move || a2.try_get_with(1, || Err::<String, _>("mine")));
        let led = leader
            .wait(Duration::from_secs(20))
            .expect("leader ended")
            .unwrap();
        let joined = joiner
            .wait(Duration::from_secs(20))
            .expect("joiner ended")
            .unwrap();
        let after = a.get_or_stale(&1);
        let later = a.load(1);
        let seen = [
            ("timed-out join", timed.as_ref().ok().cloned()),
            ("get_or_stale during the wait", stale),
            ("try_get_with joining", joined.as_ref().ok().cloned()),
            ("leader", led.as_ref().ok().cloned()),
            ("get_or_stale after", after),
            ("later load", later.as_ref().ok().cloned()),
        ];
        let bad: Vec<_> = seen
            .iter()
            .filter(|(_, v)| v.as_deref() == Some(old.as_str()))
            .collect();
        assert!(
            bad.is_empty(),
            "the leader's first read found B's tombstone; served {old:?}: {bad:?}"
        );
        assert!(
            matches!(timed, Err(LoadError::Timeout)),
            "the timed-out join: {timed:?}"
        );
        let lease: Option<String> = redis::cmd("GET")
            .arg(lkey(ns, 1))
            .query(&mut raw(&server))
            .unwrap();
        assert_eq!(lease.as_deref(), Some("other"), "the other holder's lease");
        assert!(eventually(|| a.loads_in_flight() == 0));
    }

    /// fail_safe.rs "Writes win": "an `insert` or `invalidate` replaces or removes the old entry,
    /// so a load that fails afterwards has nothing to fall back on"; "a load that a write or
    /// invalidation of the key won over (its flight detached ...)" is no failure that touches
    /// the value that write stored; `TieredCache::insert`: "A load of the key running anywhere in
    /// the fleet does not overwrite it"; fail_safe.rs: the tombstone counts only if "newer than
    /// every version of the key this instance wrote".
    ///
    /// A (deaf) misses B's invalidation of key 1; A's load (blocking, and async via `load_async`
    /// with the read done on a helper thread) reads the tombstone (marked) and its loader blocks;
    /// A inserts "mine"; the loader then fails. "mine" must stay (live), and once expired be the
    /// failed loads' fallback (A wrote it after the tombstone) and `get_or_stale`'s.
    #[test]
    fn own_insert_while_the_marked_load_runs_stays_fail_safes() {
        let _w = common::watchdog(Duration::from_secs(60), "insert during marked load");
        let server = RedisServer::start();
        for asynchronous in [false, true] {
            let ns = format!("h91ins{}", asynchronous as u8);
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let gd = Arc::new(AtomicBool::new(false));
            let gate = Gate::new();
            let hang = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let builder = {
                let (d, h, e) = (Arc::clone(&down), Arc::clone(&hang), Arc::clone(&entered));
                gated(&clock, &down, &gd, &gate).async_loader(move |k: &u64| {
                    let (d, h, e, k) = (Arc::clone(&d), Arc::clone(&h), Arc::clone(&e), *k);
                    async move {
                        if h.load(Ordering::SeqCst) {
                            e.store(true, Ordering::SeqCst);
                            std::future::poll_fn(|cx| {
                                if h.load(Ordering::SeqCst) {
                                    cx.waker().wake_by_ref();
                                    Poll::Pending
                                } else {
                                    Poll::Ready(())
                                }
                            })
                            .await;
                        }
                        if d.load(Ordering::SeqCst) {
                            Err(BoxError::from("backend down"))
                        } else {
                            Ok(format!("a{k}"))
                        }
                    }
                })
            };
            let a = Arc::new(
                fs_tier(deaf_url(&server), &ns)
                    .build(builder, Plain)
                    .unwrap(),
            );
            let b = fs_instance(&server, &ns, &clock);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let old = a.load(1).unwrap();
            b.invalidate(&1);
            clock.advance(Duration::from_secs(61));
            down.store(true, Ordering::SeqCst);
            let m0 = a.stats().remote.misses;
            let failed = if asynchronous {
                hang.store(true, Ordering::SeqCst);
                rt.block_on(async {
                    let mut fut = Box::pin(a.load_async(1));
                    let until = Instant::now() + Duration::from_secs(10);
                    loop {
                        let mut cx = Context::from_waker(Waker::noop());
                        assert!(fut.as_mut().poll(&mut cx).is_pending(), "ended early");
                        if a.stats().remote.misses > m0 && entered.load(Ordering::SeqCst) {
                            break;
                        }
                        assert!(Instant::now() < until);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    a.insert(1, "mine".to_string());
                    hang.store(false, Ordering::SeqCst);
                    tokio::time::timeout(Duration::from_secs(10), fut)
                        .await
                        .expect("load ended")
                })
            } else {
                gd.store(true, Ordering::SeqCst);
                let a1 = Arc::clone(&a);
                let l = common::start(move || a1.load(1));
                gate.wait_entered();
                assert!(a.stats().remote.misses > m0, "the read ran");
                a.insert(1, "mine".to_string());
                gate.open();
                l.wait(Duration::from_secs(10))
                    .expect("load ended")
                    .unwrap()
            };
            gd.store(false, Ordering::SeqCst);
            let live = a.get(&1);
            // Gone from Redis without a tombstone (nothing newer there): the next failed load
            // reads nothing and falls back.
            let _: () = redis::cmd("DEL")
                .arg(vkey(&ns, 1))
                .query(&mut raw(&server))
                .unwrap();
            clock.advance(Duration::from_secs(61));
            let stale = a.get_or_stale(&1);
            let r = if asynchronous {
                rt.block_on(a.load_async(1))
            } else {
                a.load(1)
            };
            assert!(
                failed.as_deref().ok() != Some(old.as_str())
                    && live.as_deref() == Some("mine")
                    && stale.as_deref() == Some("mine")
                    && r.as_deref().ok() == Some("mine"),
                "[async {asynchronous}] the marked load (failed: {failed:?}) lost to A's insert: \
             live {live:?}, then expired: get_or_stale {stale:?}, failed load {r:?} (want \
             \"mine\")"
            );
        }
    }

    /// src/redis/mod.rs: "a refresh that reads the tombstone and fails keeps the copy until its
    /// time to live, as a missed message does, and the copy is then no fallback at all (not even
    /// for `get_or_stale`)"; builder `spawner`: "a caller of the key waits for a parked job as
    /// for any load of it (... once the entry expires — a caller joining its refresh)"; fail_safe.rs:
    /// a refresh "dropped by the spawner" never ran: "Not a failure".
    ///
    /// A (deaf, `refresh_after(30 s)`, a spawner that parks jobs) misses B's invalidation of key 1.
    /// A read past 30 s parks the refresh job. Past the time to live:
    /// * run: a `load_with_timeout(1, 20 s)` joins the parked refresh, the job then runs on another
    ///   thread, reads the tombstone and fails: the joined caller, `get_or_stale` and a later load
    ///   must not get the copy;
    /// * dropped: the job is dropped unrun (no read): then a failed load reads the tombstone
    ///   itself: neither it nor `get_or_stale` afterwards may serve the copy.
    #[test]
    fn parked_refresh_job_run_or_dropped_after_the_copy_expired() {
        let _w = common::watchdog(Duration::from_secs(60), "parked refresh");
        let server = RedisServer::start();
        for run in [true, false] {
            let ns = format!("h91pr{}", run as u8);
            let clock = ManualClock::new();
            let down = Arc::new(AtomicBool::new(false));
            let gd = Arc::new(AtomicBool::new(false));
            let gate = Gate::new();
            let parked: Arc<std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>>> = Arc::default();
            let p = Arc::clone(&parked);
            let builder = gated(&clock, &down, &gd, &gate)
                .refresh_after(Duration::from_secs(30))
                .spawner(move |job| p.lock().unwrap().push(job));
            let a = Arc::new(
                fs_tier(deaf_url(&server), &ns)
                    .build(builder, Plain)
                    .unwrap(),
            );
            let b = fs_instance(&server, &ns, &clock);
            let old = a.load(1).unwrap();
            b.invalidate(&1);
            clock.advance(Duration::from_secs(31));
            down.store(true, Ordering::SeqCst);
            assert_eq!(
                a.get(&1).as_deref(),
                Some(old.as_str()),
                "live, refresh due"
            );
            let job = parked.lock().unwrap().pop().expect("refresh parked");
            clock.advance(Duration::from_secs(30)); // past the time to live
            let seen: Vec<(&str, Option<String>)> = if run {
                let m = a.stats().misses;
                let a1 = Arc::clone(&a);
                let joined =
                    common::start(move || a1.load_with_timeout(1, Some(Duration::from_secs(20))));
                assert!(eventually(|| a.stats().misses > m), "joined");
                std::thread::sleep(Duration::from_millis(20));
                let ran = std::thread::spawn(job);
                ran.join().unwrap();
                let j = joined
                    .wait(Duration::from_secs(20))
                    .expect("joined ended")
                    .unwrap();
                vec![
                    ("joined caller", j.ok()),
                    ("get_or_stale", a.get_or_stale(&1)),
                    ("later load", a.load(1).ok()),
                ]
            } else {
                drop(job);
                let r = a.load(1);
                vec![
                    ("failed load", r.ok()),
                    ("get_or_stale", a.get_or_stale(&1)),
                ]
            };
            let bad: Vec<_> = seen
                .iter()
                .filter(|(_, v)| v.as_deref() == Some(old.as_str()))
                .collect();
            assert!(
                bad.is_empty(),
                "[job {}] served the invalidated copy {old:?}: {bad:?}",
                if run { "run" } else { "dropped" }
            );
            assert!(eventually(|| a.loads_in_flight() == 0));
        }
    }
}
