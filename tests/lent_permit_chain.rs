//! A permit lent to a shared load nested in another shared load (stop 29's CI failure).
//!
//! CI's AddressSanitizer run of `attack_s45`'s tokio sweep hung (1 run in ~25 here): under
//! `max_concurrent_loads(1)`, a blocking loader H holding the only permit waited for a shared
//! load F that had started inside another shared load X's poll (F covered by the permit of the
//! load that polled X then). That load had gone; X's only caller had no permit, so X queued for
//! one — behind H. H lent its permit to F, but F's only poller is X's future: nobody could run
//! it. These tests rebuild that state by hand, with each variation of the chain.

mod common;

use common::hand::{limited, run, shared, BoxFut, Door, C};
use common::watchdog;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Drives the state: top-level load A (key 1) takes the permit; its init awaits X (key 10),
/// whose init awaits the chain below it, ending with F (the innermost), which waits at
/// `door`. An outside caller B joins X (no permit). A blocking loader H (key 2) queues for the
/// permit, then — once A is dropped and H holds it — waits for F, lending its permit. B must
/// finish (so must H), and the permit come back.
fn lend_through(depth: u64, h_joins_sync: bool) {
    let _w = watchdog(Duration::from_secs(60), "permit lent through a chain");
    let c = limited(1);
    let door = Door::default();
    let innermost = 10 + depth;
    // The chain X = 10 → 11 → … → innermost; the innermost waits at the door.
    let mk_chain = |c: &C| {
        let d = door.clone();
        let mut fut: BoxFut<u64> = Box::pin(async move {
            d.wait().await;
            innermost
        });
        for k in (10..innermost).rev() {
            let c1 = c.clone();
            let child = fut;
            fut = Box::pin(async move { c1.get_with_async_shared(k + 1, child).await - 1 });
        }
        fut
    };
    let chain = mk_chain(&c);
    let c1 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c1.get_with_async_shared(10, chain).await },
    );
    // A takes the permit and starts the chain under it (every load in it covered).
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    // H queues for the permit A holds.
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let h_flag = h_in.clone();
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            h_flag.store(true, Ordering::SeqCst);
            if h_joins_sync {
                c2.get_with(innermost, || 999)
            } else {
                futures::executor::block_on(c2.get_with_async_shared(innermost, async { 999 }))
            }
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    // B joins X from outside (no permit): X is idle, so B's poll queues X for a permit —
    // behind H.
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    // A goes (its task cancelled): H gets the permit, and waits for the innermost load (the
    // door is open: it needs only polls).
    door.open();
    drop(a);
    while !h_in.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(20));
    // B's polls must now run X (under H's lent permit), hence the chain, hence F.
    let out = loop {
        if let Some(r) = run(&mut b, 1) {
            break r;
        }
        std::thread::yield_now();
    };
    assert_eq!(out, Ok(10), "B gets X's value");
    let hv = h.join().expect("H's loader");
    // H's inner call joined the innermost load (its own loader never ran): its value.
    assert_eq!(hv, innermost, "H got the innermost load's value");
    common::hand::assert_permits_back(&c, 9_999, "after the chain");
}

#[test]
fn a_blocking_holder_lends_through_one_parent() {
    lend_through(1, true);
}

#[test]
fn a_blocking_holder_lends_through_three_parents() {
    lend_through(3, true);
}

#[test]
fn a_block_on_inside_a_holder_runs_the_parent() {
    lend_through(1, false);
}

/// A poll running under a lent permit that blocks waiting for another shared load G (a sync
/// call in a nested load's `init`) lends that permit on: G's own poller, another thread with
/// no permit, must be able to run G under it meanwhile — a lent permit runs one poll at a
/// time, and the blocked poll is not running. (Found while making lent permits run one poll
/// at a time, round 46: without the pause, G's poller found the permit busy and queued.)
#[test]
fn a_lent_poll_that_blocks_lends_the_permit_on() {
    let _w = watchdog(Duration::from_secs(60), "a lent poll that blocks");
    let c = limited(1);
    let (door_g, door_f) = (Door::default(), Door::default());
    let slot: Arc<std::sync::Mutex<Option<BoxFut<u64>>>> = Default::default();
    let (c1, dg, df, sl) = (c.clone(), door_g.clone(), door_f.clone(), slot.clone());
    let mut a = shared(&c, 1, async move {
        // G (key 30) starts here, under A's permit, then is handed to C.
        let d = dg.clone();
        let mut g = shared(&c1, 30, async move {
            d.wait().await;
            30
        });
        assert!(
            std::future::poll_fn(|cx| std::task::Poll::Ready(g.as_mut().poll(cx)))
                .await
                .is_pending()
        );
        *sl.lock().unwrap() = Some(g);
        // X (key 10) awaits F (key 20), whose init blocks on G.
        let c2 = c1.clone();
        c1.get_with_async_shared(10, async move {
            let c3 = c2.clone();
            c2.get_with_async_shared(20, async move {
                df.wait().await;
                c3.get_with(30, || 999) - 10
            })
            .await
                - 10
        })
        .await
    });
    assert!(run(&mut a, 3).is_none(), "A waits at F's door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let h_flag = h_in.clone();
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            h_flag.store(true, Ordering::SeqCst);
            c2.get_with(20, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    let mut g = slot.lock().unwrap().take().expect("G handed over");
    let cg = std::thread::spawn(move || common::hand::run_to_end(&mut g));
    door_g.open();
    door_f.open();
    drop(a);
    while !h_in.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let out = loop {
        if let Some(r) = run(&mut b, 1) {
            break r;
        }
        std::thread::yield_now();
    };
    assert_eq!(out, Ok(10), "B gets X's value");
    assert_eq!(h.join().expect("H"), 20, "H gets F's value");
    assert_eq!(cg.join().expect("C"), Ok(30), "C gets G's value");
    common::hand::assert_permits_back(&c, 9_999, "after the blocked lent poll");
}
