#![cfg(not(any(loom, shuttle)))]
//! Round 43: shared async loads nested in a load that holds a load permit, driven by callers
//! that hold none (and the reverse), and a shared load that panics while another caller polls
//! it. Public API only. Found deadlocked (the first three) or panicking where the docs promised
//! otherwise; fixed in stop 27 (a permit holder polling a shared load queued for a permit lets
//! it run under its own; a caller whose `init` panicked elsewhere never waits holding a
//! permit). Since stop 28 a shared load with no permit of its own goes on only in a permit
//! holder's poll (see `max_concurrent_loads`): an outside caller alone cannot finish a load
//! nested in a permitted one, so these tests poll the parent and the outside caller in turn.
//!
//! The single-thread tests poll every future by hand, round-robin, regardless of wake-ups: a
//! future still pending after many rounds is stuck, not merely unwoken.

mod common;

use common::hand::{limited, pending, run, run_all, run_to_end, shared, BoxFut, Door, C};
use common::{panic_message, quiet_injected_panics, watchdog};
use herdcache::Cache;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A waits (under the only permit, in its load of key 1) for its nested shared load of key 2;
/// B joins key 2 and polls it first when it can go on; key 2's load then loads key 3 (nested
/// again). Before the fix, key 3's load — started in B's poll, where no permit was
/// marked — queued for a permit, which A held while waiting for key 2: both waited forever.
#[test]
fn nested_shared_load_driven_by_outside_joiner_under_limit_1() {
    let _w = watchdog(
        Duration::from_secs(60),
        "nested shared load, outside joiner",
    );
    let c = limited(1);
    let door = Door::default();
    let (c2, d2) = (c.clone(), door.clone());
    let mut a = shared(&c, 1, async move {
        let (c3, d3) = (c2.clone(), d2.clone());
        let two = c2
            .get_with_async_shared(2, async move {
                d3.wait().await;
                c3.get_with_async_shared(3, async { 3 }).await + 10
            })
            .await;
        two + 100
    });
    pending(&mut a, "A (its load of key 2 waits at the door)");
    let mut b = shared(&c, 2, async { 999 });
    pending(&mut b, "B (joined key 2)");
    door.open();
    // B polls first: key 2's load needs a permit there and queues for the one A holds; A's
    // poll then runs it (and key 3's, nested) under its own.
    let out = run_all(&mut [&mut b, &mut a], 50);
    assert_eq!(out[0], Some(Ok(13)), "B stuck or wrong");
    assert_eq!(out[1], Some(Ok(113)), "A stuck or wrong");
    assert_eq!(c.get(&3), Some(3));
}

/// The same at every depth of a five-key chain: the load of key `d` waits at the door, B joins
/// key `d` and polls first once the door is open.
#[test]
fn nested_chain_driven_from_outside_at_every_depth() {
    let _w = watchdog(Duration::from_secs(60), "nested chain, outside joiners");
    fn chain(c: &C, k: u64, door_at: u64, door: &Door) -> BoxFut<u64> {
        let (c2, d) = (c.clone(), door.clone());
        Box::pin(async move {
            if k == door_at {
                d.wait().await;
            }
            if k == 5 {
                return k;
            }
            let inner = chain(&c2, k + 1, door_at, &d);
            c2.get_with_async_shared(k + 1, inner).await + k
        })
    }
    for door_at in 2..=4u64 {
        let c = limited(1);
        let door = Door::default();
        let mut a = shared(&c, 1, chain(&c, 1, door_at, &door));
        pending(&mut a, "A");
        // Joiner of key `door_at`, whose own loader would answer differently.
        let mut b = shared(&c, door_at, async { 999 });
        pending(&mut b, "B");
        door.open();
        let want_b: u64 = (door_at..=5).sum();
        let out = run_all(&mut [&mut b, &mut a], 50);
        assert_eq!(out[0], Some(Ok(want_b)), "B, door at {door_at}");
        assert_eq!(out[1], Some(Ok(15)), "A, door at {door_at}");
    }
}

/// Leader A's shared load of key 1 panics in joiner B's poll (B panics with it); returns the
/// cache and A (pending, its `init` gone).
fn leader_whose_load_panicked_in_a_joiner() -> (C, BoxFut<u64>) {
    quiet_injected_panics();
    let c: C = Cache::new(100);
    let door = Door::default();
    let d = door.clone();
    let mut a = shared(&c, 1, async move {
        d.wait().await;
        panic!("injected: the load of key 1")
    });
    pending(&mut a, "A");
    let mut b = shared(&c, 1, async { 5 });
    pending(&mut b, "B");
    door.open();
    let e = run(&mut b, 5).expect("B finishes").unwrap_err();
    assert!(
        e.contains("injected"),
        "B panics with the load's panic: {e}"
    );
    (c, a)
}

/// A shared load's `init` panics while a joiner polls it: the joiner panics, and the leader
/// (whose `init` it was) takes the value of the load another caller started meanwhile.
#[test]
fn shared_leader_whose_load_panicked_in_a_joiner_takes_a_later_load() {
    let (c, mut a) = leader_whose_load_panicked_in_a_joiner();
    let door2 = Door::default();
    let d2 = door2.clone();
    let mut later = shared(&c, 1, async move {
        d2.wait().await;
        7
    });
    pending(&mut later, "the later load");
    pending(&mut a, "A, joined the later load");
    door2.open();
    assert_eq!(run(&mut a, 5), Some(Ok(7)), "A gets the later load's value");
    assert_eq!(run(&mut later, 5), Some(Ok(7)));
}

/// ... and with nothing else loading the key, the leader panics too, saying why (its load
/// panicked elsewhere; it has no loader left). A planted check: it must not hang.
#[test]
fn shared_leader_whose_load_panicked_in_a_joiner_panics_when_alone() {
    let (c, mut a) = leader_whose_load_panicked_in_a_joiner();
    let e = run(&mut a, 5).expect("A finishes").unwrap_err();
    assert!(
        e.contains("panicked while another caller was driving it"),
        "{e}"
    );
    // The key is free: a new caller loads it.
    assert_eq!(run(&mut shared(&c, 1, async { 8 }), 5), Some(Ok(8)));
}

/// Under `max_concurrent_loads(2)`, O's load of key 1 (holding a permit) leads a nested shared
/// load of key 2 that panics in joiner B's poll (B joins it from its own load of key 9, under
/// the other permit: a shared load with no permit of its own runs only in a permit holder's
/// poll); then Q takes the permit B's load freed and keeps it. Returns the cache, O (pending)
/// and Q (pending: the limit stays full while it lives).
fn holder_whose_nested_load_panicked() -> (C, BoxFut<u64>, BoxFut<u64>) {
    let c = limited(2);
    let door = Door::default();
    let (c2, d2) = (c.clone(), door.clone());
    let mut o = shared(&c, 1, async move {
        let d3 = d2.clone();
        c2.get_with_async_shared(2, async move {
            d3.wait().await;
            panic!("injected: the load of key 2")
        })
        .await
            + 1
    });
    pending(&mut o, "O");
    let c9 = c.clone();
    let mut b = shared(&c, 9, async move {
        c9.get_with_async_shared(2, async { 9 }).await
    });
    pending(&mut b, "B");
    door.open();
    let e = run(&mut b, 5).expect("B finishes").unwrap_err();
    assert!(e.contains("injected: the load of key 2"), "{e}");
    let mut q = shared(&c, 8, std::future::pending());
    pending(&mut q, "Q (holds the other permit)");
    (c, o, q)
}

/// With the limit full: A's load of key 1 holds a permit and waits for its nested shared load
/// of key 2, which panics in joiner B's poll. C then starts a new shared load of key 2 from
/// outside (no permit): it queues for a permit. A, with no `init` left, joins C's load — and
/// must run it under its own permit (before the fix: both waited forever).
#[test]
fn nested_leader_whose_load_panicked_joins_a_load_queued_for_its_permit() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "lend the permit");
    let (c, mut o, _q) = holder_whose_nested_load_panicked();
    let mut cc = shared(&c, 2, async { 40 });
    pending(&mut cc, "C (queued for a permit)");
    assert_eq!(run(&mut o, 50), Some(Ok(41)), "O stuck or wrong");
    assert_eq!(run(&mut cc, 50), Some(Ok(40)), "C stuck or wrong");
    assert_eq!(c.get(&1), Some(41));
}

/// As above, but C's load is a borrowing one (`get_with_async`): only C can start it, and it
/// waits for a permit (A holds one). A, with no `init` left, cannot take it over: it panics (its
/// load panicked) instead of waiting forever, which frees the permit for C.
#[test]
fn nested_leader_whose_load_panicked_never_waits_on_a_leader_queued_for_its_permit() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "never wait holding the permit");
    let (c, mut o, _q) = holder_whose_nested_load_panicked();
    let c3 = c.clone();
    let mut cc: BoxFut<u64> = Box::pin(async move { c3.get_with_async(2, async { 40 }).await });
    pending(&mut cc, "C (waits for a permit)");
    let e = run(&mut o, 50)
        .expect("O must not wait forever")
        .unwrap_err();
    assert!(
        e.contains("panicked while another caller was driving it"),
        "{e}"
    );
    drop(o);
    assert_eq!(run(&mut cc, 50), Some(Ok(40)), "C stuck or wrong");
}

/// A blocking loader holding the only permit waits (in `block_on`) for a shared load it
/// started; an outside async caller polls that load first (it queues for a permit there). The
/// loader's next poll runs it under the loader's permit; the outside caller gets the value.
#[test]
fn shared_load_started_in_a_blocking_loader_polled_from_outside() {
    let _w = watchdog(Duration::from_secs(60), "blocking parent");
    let c = limited(1);
    let door = Door::default();
    let started = Arc::new(AtomicBool::new(false));
    let (c2, d2, s2) = (c.clone(), door.clone(), started.clone());
    let parent = std::thread::spawn(move || {
        c2.get_with(1, || {
            let (c3, d3) = (c2.clone(), d2.clone());
            let mut two = shared(&c2, 2, async move {
                d3.wait().await;
                c3.get_with_async_shared(3, async { 3 }).await + 10
            });
            pending(&mut two, "the nested load");
            s2.store(true, Ordering::SeqCst);
            // Polled again only after the outside caller had its go.
            while !d2.is_open() {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(20));
            // Until it is done (while B polls it, a poll here finds it busy; the watchdog
            // catches a hang).
            run_to_end(&mut two).expect("no panic") + 100
        })
    });
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let mut b = shared(&c, 2, async { 999 });
    pending(&mut b, "B");
    door.open();
    // Until the parent polls again (the watchdog catches a hang).
    assert_eq!(run_to_end(&mut b), Ok(13), "B wrong");
    assert_eq!(parent.join().unwrap(), 113);
}

fn chain_init(c: C, k: u64, last: u64, fail: u64, spins: u32) -> BoxFut<u64> {
    Box::pin(async move {
        common::Yield(spins).await;
        if k == fail {
            panic!("injected: key {k}");
        }
        if k == last {
            return k;
        }
        let inner = chain_init(c.clone(), k + 1, last, fail, spins);
        c.get_with_async_shared(k + 1, inner).await + k
    })
}

/// Random nested chains under a limit of 1 or 2 on a two-worker runtime, with outside joiners
/// of every depth (shared and borrowing loads, blocking callers), panics planted at random
/// depths and callers cancelled by timeouts. Every call must end (the watchdog aborts a hang),
/// and every value must be the chain's.
#[test]
fn nested_chains_under_a_limit_on_tokio() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(180), "nested chains on tokio");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut rng = common::rng(43);
    let (mut values, mut panics) = (0, 0);
    for round in 0..2_000u64 {
        let c = limited(1 + (round % 2) as usize);
        let base = round * 10;
        let last = base + 3 + rng() % 3; // chains of 3 to 5 keys
        let fail = if rng() % 4 == 0 {
            base + 1 + rng() % (last - base)
        } else {
            0
        };
        let want = |k: u64| (k..=last).sum::<u64>();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for j in 0..6u64 {
                let (c, spins) = (c.clone(), (rng() % 4) as u32);
                let k = base + 1 + rng() % (last - base);
                let verb = rng() % 4;
                let cancel = rng() % 5 == 0;
                tasks.push(tokio::spawn(async move {
                    let call = async {
                        match verb {
                            0 | 1 => {
                                let v = chain_init(c.clone(), k, last, fail, spins);
                                c.get_with_async_shared(k, v).await
                            }
                            2 => {
                                let v = chain_init(c.clone(), k, last, fail, spins);
                                c.get_with_async(k, v).await
                            }
                            _ => {
                                let c2 = c.clone();
                                tokio::task::spawn_blocking(move || {
                                    c2.get_with(k, || {
                                        futures::executor::block_on(chain_init(
                                            c2.clone(),
                                            k,
                                            last,
                                            fail,
                                            spins,
                                        ))
                                    })
                                })
                                .await
                                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                            }
                        }
                    };
                    let r = if cancel {
                        tokio::time::timeout(Duration::from_micros(50 * j), call)
                            .await
                            .ok()
                    } else {
                        Some(call.await)
                    };
                    (k, r)
                }));
            }
            for t in tasks {
                match t.await {
                    Ok((k, Some(v))) => {
                        assert_eq!(v, want(k), "round {round}, key {k}");
                        values += 1;
                    }
                    Ok((_, None)) => {} // cancelled
                    Err(e) => {
                        let msg = panic_message(&*e.into_panic());
                        assert!(
                            fail != 0
                                && (msg.contains("injected")
                                    || msg.contains("panicked while another caller")),
                            "round {round}: unexpected panic {msg}"
                        );
                        panics += 1;
                    }
                }
            }
        });
    }
    // The sweep exercised both outcomes.
    assert!(
        values > 5_000 && panics > 100,
        "values {values}, panics {panics}"
    );
}
