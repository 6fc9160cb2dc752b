#![cfg(not(any(loom, shuttle)))]
//! Round 44 (an outside attack on stop 27's load-limit change, public API only): permits
//! that shared async loads take from the callers that poll them, under
//! `max_concurrent_loads`. Found: a shared load started in the poll of a permit holder kept
//! that permit after the holder stopped waiting for it, and ran beside it (two top-level loads
//! under a limit of 1: `lent_permit_outlives_the_lenders_interest`). Fixed in stop 28: a shared
//! load keeps a permit only once it got its own (see `max_concurrent_loads`). The last two
//! tests were added with the fix: a nested load its parent left, and a blocking holder lending
//! its permit to the load it waits for.
mod common;

use common::hand::{
    assert_permits_back, limited, pending, poll, poll_once, run, run_all, run_to_end, shared,
    BoxFut, Door, Gauge, OnDrop, C,
};
use common::{quiet_injected_panics, watchdog};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// Polls `f` once in the current context (inside an init) and drops it.
async fn poll_once_and_drop(mut f: BoxFut<u64>) {
    poll_once(&mut f).await
}

/// Sets up under limit 1: X (top-level key 1) holds the permit; O starts top-level shared key 2
/// (queued for the permit); X polls a join of key 2 once (lending its permit, Q's init starts),
/// drops that join and goes on with its own work (in the gauge, waiting at `x_door`).
/// Q's init: waits at `q_door`, then a counted section.
fn lend_then_abandon(g: &Gauge) -> (C, BoxFut<u64>, BoxFut<u64>, Door, Door) {
    let c = limited(1);
    let (start, x_door, q_door) = (Door::default(), Door::default(), Door::default());
    let (c1, s1, xd, g1) = (c.clone(), start.clone(), x_door.clone(), g.clone());
    let (qd0, g0) = (q_door.clone(), g.clone());
    let mut x = shared(&c, 1, async move {
        s1.wait().await;
        let (qd1, g3) = (qd0.clone(), g0.clone());
        poll_once_and_drop(shared(&c1, 2, async move {
            qd1.wait().await;
            g3.enter();
            common::Yield(1).await;
            g3.exit();
            999
        }))
        .await;
        g1.enter();
        xd.wait().await;
        g1.exit();
        1
    });
    pending(&mut x, "X holds the permit");
    let (qd, g2) = (q_door.clone(), g.clone());
    let mut o = shared(&c, 2, async move {
        qd.wait().await;
        g2.enter();
        common::Yield(1).await;
        g2.exit();
        2
    });
    pending(&mut o, "O queued for the permit");
    start.open();
    pending(&mut x, "X lent its permit, now waits at its door");
    (c, x, o, x_door, q_door)
}

/// (2) Limit exceeded: after X abandons its join, Q (a top-level load started by O from outside)
/// must not run its code while X's top-level load runs under the same single permit.
#[test]
fn lent_permit_after_lender_abandons_join_runs_two_top_level_loads() {
    let _w = watchdog(Duration::from_secs(60), "lend then abandon");
    let g = Gauge::default();
    let (c, mut x, mut o, x_door, q_door) = lend_then_abandon(&g);
    q_door.open();
    // O drives key 2's load; X is still running (at its door).
    let early = run(&mut o, 20);
    eprintln!("O while X runs: {early:?}, max {}", g.max());
    x_door.open();
    assert_eq!(run(&mut x, 50), Some(Ok(1)), "X stuck");
    let ro = match early {
        Some(r) => Some(r),
        None => run(&mut o, 50),
    };
    let v = ro.expect("O stuck").expect("O panicked");
    assert!(v == 2 || v == 999, "{v}");
    assert_eq!(c.get(&2), Some(v));
    assert!(
        g.max() <= 1,
        "{} top-level loads ran at once under max_concurrent_loads(1)",
        g.max()
    );
}

/// (3) Permit returned: cancel every future mid-load in the lend-then-abandon scenario; a new
/// load under limit 1 must then run to completion.
#[test]
fn lend_then_cancel_everything_returns_the_permit() {
    let _w = watchdog(Duration::from_secs(60), "lend then cancel");
    let g = Gauge::default();
    let (c, x, o, _xd, _qd) = lend_then_abandon(&g);
    drop(o);
    drop(x);
    let mut n = shared(&c, 3, async { 3 });
    assert_eq!(run(&mut n, 50), Some(Ok(3)), "permit never returned");
    let c2 = c.clone();
    let mut b: BoxFut<u64> = Box::pin(async move { c2.get_with_async(4, async { 4 }).await });
    assert_eq!(
        run(&mut b, 50),
        Some(Ok(4)),
        "permit never returned (borrowing load)"
    );
}

/// (3) Cancel only the lender X (O keeps key 2 alive at its door); then O finishes; a new load
/// must run. Also: while Q still holds the lent permit, a fresh top-level load must wait.
#[test]
fn lender_cancelled_borrower_finishes_then_permit_free() {
    let _w = watchdog(Duration::from_secs(60), "lender cancelled");
    let g = Gauge::default();
    let (c, x, mut o, _xd, q_door) = lend_then_abandon(&g);
    drop(x);
    let mut n = shared(&c, 3, async move { 3 });
    let first = poll(&mut n);
    q_door.open();
    let vo = run(&mut o, 50).expect("O stuck").expect("O panicked");
    eprintln!("lender_cancelled: n first {first:?}, O {vo}");
    assert!(vo == 2 || vo == 999, "{vo}");
    if !matches!(first, Ok(Poll::Ready(_))) {
        assert_eq!(run(&mut n, 50), Some(Ok(3)), "permit never returned");
    }
}

/// (1)+(3) A permit holder joins a queued load whose `init` would panic; everything dropped;
/// a new load runs.
#[test]
fn lent_load_panics_in_lenders_poll() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "lent load panics");
    let c = limited(1);
    let start = Door::default();
    let (c1, s1) = (c.clone(), start.clone());
    let mut x = shared(&c, 1, async move {
        s1.wait().await;
        c1.get_with_async_shared(2, async { 999 }).await + 1
    });
    pending(&mut x, "X");
    let mut o = shared(&c, 2, async { panic!("injected: key 2") });
    pending(&mut o, "O queued");
    start.open();
    let rx = run(&mut x, 50).expect("X stuck");
    let ro = run(&mut o, 50).expect("O stuck");
    // X, holding the permit, joins O's queued load and polls it under its permit (until stop
    // 31 it took the load over with its own `init`, which could deadlock: see
    // `a_shared_load_joined_under_a_lent_permit_is_not_moved_into_the_joiner`). O's `init`
    // panics in X's poll: X gets the panic (as `get_with_async_shared` documents: "in the
    // caller that was polling it"), and O, whose `init` it was, has no load left: it panics.
    let ex = rx.expect_err("the load panicked in X's poll");
    assert!(ex.contains("key 2"), "X: {ex}");
    let eo = ro.expect_err("O's init panicked, polled by X");
    assert!(eo.contains("panicked while another caller"), "O: {eo}");
    drop((x, o));
    let mut n = shared(&c, 3, async { 3 });
    assert_eq!(run(&mut n, 50), Some(Ok(3)), "permit never returned");
}

/// (1) Chain of lending: X holds the permit and awaits key 2 (queued, from O); key 2's load
/// awaits key 3 (queued, from P, started outside before). All must complete.
#[test]
fn chain_of_lent_loads_completes() {
    let _w = watchdog(Duration::from_secs(60), "lend chain");
    let c = limited(1);
    let start = Door::default();
    let (c1, s1) = (c.clone(), start.clone());
    let mut x = shared(&c, 1, async move {
        s1.wait().await;
        c1.get_with_async_shared(2, async { 999 }).await + 100
    });
    pending(&mut x, "X");
    let mut p = shared(&c, 3, async { 3 });
    pending(&mut p, "P queued");
    let c2 = c.clone();
    let mut o = shared(&c, 2, async move {
        c2.get_with_async_shared(3, async { 998 }).await + 10
    });
    pending(&mut o, "O queued");
    start.open();
    let vx = run(&mut x, 50).expect("X stuck").expect("X panicked");
    let vo = run(&mut o, 50).expect("O stuck").expect("O panicked");
    assert_eq!(vx, vo + 100, "X and O disagree on key 2");
    assert_eq!(run(&mut p, 50), Some(Ok(3)), "P stuck");
    let mut n = shared(&c, 4, async { 4 });
    assert_eq!(run(&mut n, 50), Some(Ok(4)), "permit never returned");
}

/// (3) A nested shared load abandoned by its parent (polled once, dropped; parent ends) while
/// an outside joiner B keeps it; B then cancelled mid-load. A new load must run.
#[test]
fn orphaned_nested_load_cancelled_returns_permit() {
    let _w = watchdog(Duration::from_secs(60), "orphan nested");
    let c = limited(1);
    let door = Door::default();
    let (c1, d1) = (c.clone(), door.clone());
    let mut b_slot: Option<BoxFut<u64>> = None;
    let mut a = shared(&c, 1, async move {
        let d2 = d1.clone();
        poll_once_and_drop(shared(&c1, 2, async move {
            d2.wait().await;
            2
        }))
        .await;
        1
    });
    // B joins key 2 before A's poll? Key 2 starts in A's poll; join it after.
    assert_eq!(run(&mut a, 1), Some(Ok(1)));
    let mut b = shared(&c, 2, async { 999 });
    let _ = poll(&mut b);
    b_slot.replace(b);
    let mut n = shared(&c, 3, async { 3 });
    let first = poll(&mut n);
    eprintln!("n first poll: {first:?}");
    drop(b_slot.take());
    if !matches!(first, Ok(Poll::Ready(_))) {
        assert_eq!(run(&mut n, 50), Some(Ok(3)), "permit never returned");
    }
    door.open();
}

fn nested_init(c: C, k: u64, depth: u32, spins: u32) -> BoxFut<u64> {
    Box::pin(async move {
        common::Yield(spins).await;
        if depth == 0 {
            return k;
        }
        c.get_with_async_shared(k + 1, nested_init(c.clone(), k + 1, depth - 1, spins))
            .await
    })
}

/// (2)+(3) On a 2-worker runtime: top-level shared/borrowing loads of keys 1..=4 (counted while
/// their init runs) each nest a chain of shared loads of keys 100.. (not counted), joined from
/// outside by extra callers; random cancellation by timeouts. The counted top-level inits must
/// never exceed the limit; afterwards a fresh load must still complete.
///
/// Stop 31: round 1088 deadlocked about once in a few hundred repetitions (debug build): a
/// nested shared load, polled only under a permit lent to it, took over ("stole") another
/// shared load that waited for a permit; its lender was then cancelled, the thief's host
/// queued for a permit of its own, and the permit's new holder waited for the stolen load,
/// which only that host could drive. Async callers no longer take over shared loads (they
/// join and poll them under their permit).
#[test]
fn top_level_limit_with_nested_shared_loads_on_tokio() {
    let _w = watchdog(Duration::from_secs(120), "limit sweep");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut rng = common::rng(44);
    for round in 0..1_500u64 {
        let n = 1 + (round % 2) as usize;
        let c = limited(n);
        let g = Gauge::default();
        let base = 100 + round * 10;
        rt.block_on(async {
            let mut tasks = Vec::new();
            let mut plan = Vec::new();
            for j in 0..8u64 {
                let (c, g, spins) = (c.clone(), g.clone(), (rng() % 4) as u32);
                let verb = rng() % 3;
                let cancel = rng() % 4 == 0;
                let top = 1 + rng() % 4;
                let nk = base + rng() % 3;
                plan.push(format!(
                    "task {j}: verb {verb}, top {top}, nested {nk}.., spins {spins}, cancel {cancel}"
                ));
                tasks.push(tokio::spawn(async move {
                    let c2 = c.clone();
                    let init = async move {
                        let _in = g.guard();
                        common::Yield(spins).await;
                        let v = c2
                            .get_with_async_shared(nk, nested_init(c2.clone(), nk, 2, spins))
                            .await;
                        common::Yield(spins).await;
                        v
                    };
                    let call = async {
                        match verb {
                            0 => c.get_with_async_shared(top, init).await,
                            1 => c.get_with_async(top, init).await,
                            // Outside joiner of a nested key.
                            _ => {
                                c.get_with_async_shared(nk, nested_init(c.clone(), nk, 2, spins))
                                    .await
                            }
                        }
                    };
                    if cancel {
                        let _ = tokio::time::timeout(Duration::from_micros(30 * j), call).await;
                    } else {
                        call.await;
                    }
                }));
            }
            let all = async {
                for t in tasks {
                    t.await.unwrap();
                }
            };
            // A round takes milliseconds: a stalled one is reported with its plan and the
            // cache's loads (the watchdog alone would say only that it hung).
            if tokio::time::timeout(Duration::from_secs(30), all).await.is_err() {
                panic!(
                    "round {round} (limit {n}) stalled:\n{}\n{}",
                    plan.join("\n"),
                    c.describe_loads()
                );
            }
        });
        assert!(
            g.max() <= n,
            "round {round}: {} top-level inits at once, limit {n}",
            g.max()
        );
        assert_permits_back(&c, 9_999, &format!("round {round}"));
    }
}

/// (2) Lending without a join: X (top-level key 1) holds the only permit; O's top-level shared
/// load of key 2 is queued for it. X's init polls O's future once (as a permit holder: it lends
/// its permit, O's init starts), hands it back and goes on with its own work. O then drives its
/// load to the end while X's init is still running: two top-level inits at once under limit 1?
#[test]
fn lent_permit_outlives_the_lenders_interest() {
    let _w = watchdog(Duration::from_secs(60), "lend via a handed-over future");
    let c = limited(1);
    let g = Gauge::default();
    let (start, x_door) = (Door::default(), Door::default());
    let slot: Arc<std::sync::Mutex<Option<BoxFut<u64>>>> = Default::default();
    let (s1, xd, g1, sl) = (start.clone(), x_door.clone(), g.clone(), slot.clone());
    let mut x = shared(&c, 1, async move {
        let _in = g1.guard();
        s1.wait().await;
        let mut o = sl.lock().unwrap().take().expect("O's future");
        poll_once(&mut o).await;
        *sl.lock().unwrap() = Some(o);
        xd.wait().await;
        1
    });
    pending(&mut x, "X holds the permit");
    let g2 = g.clone();
    let mut o = shared(&c, 2, async move {
        common::Yield(1).await;
        let _in = g2.guard();
        common::Yield(1).await;
        2
    });
    pending(&mut o, "O queued for the permit");
    *slot.lock().unwrap() = Some(o);
    start.open();
    pending(&mut x, "X at its door");
    let mut o = slot.lock().unwrap().take().unwrap();
    let early = run(&mut o, 20);
    let max_while_x = g.max();
    x_door.open();
    assert_eq!(run(&mut x, 50), Some(Ok(1)), "X stuck");
    let early_s = format!("{early:?}");
    let ro = match early {
        Some(r) => Some(r),
        None => run(&mut o, 50),
    };
    assert_eq!(ro, Some(Ok(2)), "O stuck or wrong");
    let mut n = shared(&c, 3, async { 3 });
    assert_eq!(run(&mut n, 50), Some(Ok(3)), "permit never returned");
    assert!(
        max_while_x <= 1,
        "O's top-level init ran to completion ({early_s}) while X's top-level init was still running: {max_while_x} at once under limit 1"
    );
}

/// (3) As above, but then X is dropped mid-load and O (running on X's lent permit) is dropped
/// mid-init: a new load under limit 1 must still run.
#[test]
fn lent_permit_returned_after_lender_and_borrower_cancelled() {
    let _w = watchdog(Duration::from_secs(60), "lend, cancel both");
    let c = limited(1);
    let start = Door::default();
    let o_door = Door::default();
    let slot: Arc<std::sync::Mutex<Option<BoxFut<u64>>>> = Default::default();
    let (s1, sl) = (start.clone(), slot.clone());
    let mut x = shared(&c, 1, async move {
        s1.wait().await;
        let mut o = sl.lock().unwrap().take().expect("O's future");
        poll_once(&mut o).await;
        *sl.lock().unwrap() = Some(o);
        std::future::pending::<()>().await;
        1
    });
    pending(&mut x, "X holds the permit");
    let od = o_door.clone();
    let mut o = shared(&c, 2, async move {
        od.wait().await;
        2
    });
    pending(&mut o, "O queued");
    *slot.lock().unwrap() = Some(o);
    start.open();
    pending(&mut x, "X forever");
    let mut o = slot.lock().unwrap().take().unwrap();
    pending(&mut o, "O at its door");
    // A new load waits while either holds the permit.
    let mut n = shared(&c, 3, async { 3 });
    pending(&mut n, "N queued");
    drop(x);
    pending(&mut n, "N still queued (O runs on X's permit)");
    drop(o);
    assert_eq!(run(&mut n, 50), Some(Ok(3)), "permit never returned");
    let mut m = shared(&c, 4, async { 4 });
    assert_eq!(run(&mut m, 50), Some(Ok(4)), "permit never returned (2)");
}

/// A nested shared load whose parent stopped waiting for it (as a `select!` that moved on
/// would) while an outside caller B keeps it: it must not go on beside its parent under the
/// parent's permit; it runs once the parent's load ended and freed it.
#[test]
fn a_nested_load_its_parent_left_waits_for_a_permit_of_its_own() {
    let _w = watchdog(Duration::from_secs(60), "nested load left by its parent");
    let c = limited(1);
    let g = Gauge::default();
    let (started, b_joined, x_door) = (Door::default(), Door::default(), Door::default());
    let (c1, st, bj, xd, g1, g2) = (
        c.clone(),
        started.clone(),
        b_joined.clone(),
        x_door.clone(),
        g.clone(),
        g.clone(),
    );
    let mut x = shared(&c, 1, async move {
        let _in = g1.guard();
        let mut n = shared(&c1, 2, async move {
            common::Yield(1).await;
            let _in = g2.guard();
            common::Yield(1).await;
            2
        });
        // Started here, under X's permit (its init runs to its first yield).
        poll_once(&mut n).await;
        st.open();
        bj.wait().await;
        drop(n); // X leaves key 2's load; B keeps it
        xd.wait().await;
        1
    });
    pending(&mut x, "X, its nested load started");
    assert!(started.is_open());
    let mut b = shared(&c, 2, async { 999 });
    pending(&mut b, "B joined key 2");
    b_joined.open();
    pending(&mut x, "X left key 2, at its door");
    assert_eq!(
        run(&mut b, 50),
        None,
        "key 2's load finished with no permit of its own"
    );
    assert!(
        g.max() <= 1,
        "{} loads ran at once under max_concurrent_loads(1)",
        g.max()
    );
    x_door.open();
    assert_eq!(run(&mut x, 50), Some(Ok(1)), "X stuck");
    assert_eq!(run(&mut b, 50), Some(Ok(2)), "B stuck or wrong");
    assert_eq!(g.max(), 1);
}

/// A blocking loader holding the only permit waits (a plain `get_with`) for a shared load that
/// started in its own poll and that an async caller O keeps: the load needs a permit to go on,
/// and the loader lends it its own while it blocks (else both would wait forever).
#[test]
fn a_blocking_holder_lends_its_permit_to_the_load_it_waits_for() {
    let _w = watchdog(Duration::from_secs(60), "blocking holder lends");
    let c = limited(1);
    let (started, o_joined) = (Door::default(), Door::default());
    let (c1, st, oj) = (c.clone(), started.clone(), o_joined.clone());
    let holder = std::thread::spawn(move || {
        c1.get_with(1, || {
            let mut n = shared(&c1, 2, async {
                common::Yield(2).await;
                2
            });
            // Started here, under the loader's permit; then left to O.
            assert_eq!(run(&mut n, 1), None);
            st.open();
            while !oj.is_open() {
                std::thread::yield_now();
            }
            drop(n);
            // Joins the load O keeps (it cannot take it over: it started).
            c1.get_with(2, || 777) + 100
        })
    });
    while !started.is_open() {
        std::thread::yield_now();
    }
    let mut o = shared(&c, 2, async { 999 });
    pending(&mut o, "O joined key 2");
    o_joined.open();
    // O polls until the load is done (the watchdog catches a hang).
    let v = run_to_end(&mut o).expect("O panicked");
    assert_eq!(v, 2);
    assert_eq!(holder.join().expect("holder"), 102);
}

/// A load cancelled mid-way drops its `init` (whose destructor may still talk to the backend)
/// before it gives its permit back: a load started from that destructor finds no permit free.
/// (Found by `top_level_limit_with_nested_shared_loads_on_tokio` after stop 27 moved the
/// borrowing leader's permit into its poller, which dropped it first.)
#[test]
fn a_cancelled_load_drops_its_init_under_its_permit() {
    let _w = watchdog(Duration::from_secs(60), "drop under the permit");
    for borrowing in [true, false] {
        let c = limited(1);
        let found_free = Arc::new(std::sync::Mutex::new(None));
        let (c1, ff) = (c.clone(), found_free.clone());
        let init = async move {
            let _probe = OnDrop(move || {
                let mut probe = shared(&c1, 99, async { 99 });
                *ff.lock().unwrap() = Some(run(&mut probe, 1).is_some());
            });
            std::future::pending::<u64>().await
        };
        let c2 = c.clone();
        let mut a: BoxFut<u64> = if borrowing {
            Box::pin(async move { c2.get_with_async(1, init).await })
        } else {
            shared(&c2, 1, init)
        };
        pending(&mut a, "A holds the permit");
        drop(a);
        assert_eq!(
            *found_free.lock().unwrap(),
            Some(false),
            "borrowing {borrowing}: the permit was free while the cancelled init was dropped"
        );
        // And it is given back afterwards.
        assert_eq!(run(&mut shared(&c, 2, async { 2 }), 5), Some(Ok(2)));
    }
}

/// X of the two stop-31 tests below: a borrowing load of key 1 whose init, once `door` opens,
/// starts key 2's shared load (B, under X's permit), whose init joins key 3's shared load with
/// `key3` as its init and adds 1.
fn borrowing_x_over_b_over_key3(
    c: &C,
    door: &Door,
    key3: impl std::future::Future<Output = u64> + Send + 'static,
) -> BoxFut<u64> {
    let (c1, xs1) = (c.clone(), door.clone());
    Box::pin(async move {
        let c2 = c1.clone();
        c1.get_with_async(1, async move {
            xs1.wait().await;
            let c3 = c2.clone();
            c2.get_with_async_shared(
                2,
                async move { c3.get_with_async_shared(3, key3).await + 1 },
            )
            .await
        })
        .await
    })
}

/// A shared load of `key` whose init waits at `door`, then yields `value`.
fn shared_at_door(c: &C, key: u64, door: &Door, value: u64) -> BoxFut<u64> {
    let door = door.clone();
    shared(c, key, async move {
        door.wait().await;
        value
    })
}

/// Stop 31, the deadlock `top_level_limit_with_nested_shared_loads_on_tokio` found, by hand
/// (limit 1): X (a borrowing load) holds the permit; Q leads key 3's shared load, queued for a
/// permit. X's init starts key 2's shared load (B, run under X's permit, not its own), whose
/// init joins key 3 — and used to take Q's load over, running it inside B. D leads key 4,
/// queued; W joins B (B queues for a permit of its own, behind D); X is cancelled. The permit
/// goes to Q's load (taken over: it gives it back) and then to D, whose init waits for key 3:
/// a load only B could drive, and B waited for D's permit.
#[test]
fn a_shared_load_joined_under_a_lent_permit_is_not_moved_into_the_joiner() {
    let _w = watchdog(Duration::from_secs(60), "no steal of a shared load");
    let c = limited(1);
    let (xs, cd) = (Door::default(), Door::default());
    let cd1 = cd.clone();
    let mut x = borrowing_x_over_b_over_key3(&c, &xs, async move {
        cd1.wait().await;
        30
    });
    pending(&mut x, "X holds the permit, at its door");
    let mut q = shared_at_door(&c, 3, &cd, 33);
    pending(&mut q, "Q queued for the permit");
    xs.open();
    pending(
        &mut x,
        "X's init: B started under X's permit, waiting for key 3",
    );
    let c4 = c.clone();
    let mut d = shared(&c, 4, async move {
        c4.get_with_async_shared(3, async { 44 }).await
    });
    pending(&mut d, "D queued for the permit");
    let mut w = shared(&c, 2, async { 22 });
    pending(&mut w, "W joins B");
    drop(x);
    cd.open();
    let out = run_all(&mut [&mut q, &mut d, &mut w], 200);
    let key3 = match &out[0] {
        Some(Ok(v)) => *v,
        other => panic!(
            "Q never finished (a deadlock): {other:?}, D {:?}, W {:?}",
            out[1], out[2]
        ),
    };
    assert!(key3 == 30 || key3 == 33, "key 3: {key3}");
    assert_eq!(out[1], Some(Ok(key3)), "D gets key 3's value");
    assert!(
        matches!(out[2], Some(Ok(v)) if v == key3 + 1 || v == 22),
        "W: {:?}",
        out[2]
    );
    assert_permits_back(&c, 9_999, "after the loads");
}

/// Stop 31, the second deadlock the sweep found (limit 1): X (a borrowing load) holds the
/// permit; Q starts key 3's shared load from outside (C: queued for a permit). X's init starts
/// key 2's shared load (B), whose init joins C and polls it under X's permit: C starts, its
/// queue place kept. W joins B from outside (B queues too). Q goes, then X: the permit used to
/// go to C's place, which only B's polls can reach — and B waited for a permit of its own.
/// A load that only callers nested in other loads wait for gives its place up.
#[test]
fn a_permit_is_not_granted_to_a_load_only_nested_callers_wait_for() {
    let _w = watchdog(Duration::from_secs(60), "orphaned queue place");
    let c = limited(1);
    let (xs, cd) = (Door::default(), Door::default());
    let mut x = borrowing_x_over_b_over_key3(&c, &xs, async { 30 });
    pending(&mut x, "X holds the permit, at its door");
    let mut q = shared_at_door(&c, 3, &cd, 33);
    pending(&mut q, "Q queued for the permit");
    xs.open();
    pending(&mut x, "B started under X's permit, C too (at its door)");
    let mut w = shared(&c, 2, async { 22 });
    pending(&mut w, "W joins B, queued");
    drop(q);
    drop(x);
    cd.open();
    assert_eq!(
        run(&mut w, 200),
        Some(Ok(34)),
        "W never finished (a deadlock)"
    );
    assert_eq!(c.get(&3), Some(33));
    assert_permits_back(&c, 9_999, "after the loads");
}
