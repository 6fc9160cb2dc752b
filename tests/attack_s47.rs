//! Round 47: attacks on the load limit where it meets refresh-ahead, the entry API, `get_all`,
//! soft timeouts and fail-safe (public API only).

mod common;

use common::hand::{assert_permits_back, limited, run, shared, C};
use common::{eventually, watchdog};
use herdcache::{BoxError, Cache, ManualClock, Op};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A loader that returns `k + 100` after 5 ms, counting its calls and the most of them that
/// ran at once.
fn counting_loader(
    most: &Arc<AtomicU64>,
    calls: &Arc<AtomicU64>,
) -> impl Fn(&u64) -> Result<u64, BoxError> + Send + Sync + 'static {
    let running = Arc::new(AtomicU64::new(0));
    let (most, calls) = (Arc::clone(most), Arc::clone(calls));
    move |k: &u64| {
        calls.fetch_add(1, Ordering::SeqCst);
        let n = running.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        running.fetch_sub(1, Ordering::SeqCst);
        Ok(k + 100)
    }
}

/// Two flags, both down: "ready" and "go".
fn flags() -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    )
}

fn wait_flag(f: &AtomicBool) {
    while !f.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
}

/// Limit 1, refresh-ahead on a thread spawner, no time to live. The loader returns 1000 + the
/// number of calls so far.
fn refreshing(clock: &ManualClock, calls: &Arc<AtomicU64>) -> C {
    let calls = Arc::clone(calls);
    Cache::builder()
        .max_capacity(1_000)
        .max_concurrent_loads(1)
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(move |k: &u64| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, BoxError>(k * 1000 + n)
        })
        .build()
}

/// Holds the cache's only permit on a thread (a `get_with` whose loader waits for `go`), then
/// runs `inside` in that loader.
fn holder(
    c: &C,
    ready: &Arc<AtomicBool>,
    go: &Arc<AtomicBool>,
    inside: impl FnOnce(&C) + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    let (c, ready, go) = (c.clone(), Arc::clone(ready), Arc::clone(go));
    std::thread::spawn(move || {
        c.get_with(999, || {
            ready.store(true, Ordering::SeqCst);
            wait_flag(&go);
            inside(&c);
            9
        })
    })
}

/// A refresh waits on the spawner for the permit that a loader H holds. H's loader runs a
/// computation of the refreshing key that leaves it as it is (`Op::Nop`): the computation
/// takes the queued refresh over (to give it up). Once everything is done, the key must still
/// refresh when due ("never lost"): a later due read starts a refresh that stores a new value.
fn refresh_taken_over_by(inside: impl FnOnce(&C) + Send + 'static) {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicU64::new(0));
    let c = refreshing(&clock, &calls);
    refresh_taken_over_in(c, clock, calls, inside);
}

fn refresh_taken_over_in(
    c: C,
    clock: ManualClock,
    calls: Arc<AtomicU64>,
    inside: impl FnOnce(&C) + Send + 'static,
) {
    let _w = watchdog(Duration::from_secs(20), "refresh_taken_over");
    assert_eq!(c.load(1).unwrap(), 1001);
    let (ready, go) = flags();
    let h = holder(&c, &ready, &go, inside);
    wait_flag(&ready);
    clock.advance(Duration::from_secs(11));
    // Due: answered at once, a refresh handed to the spawner, where it waits for the permit.
    assert_eq!(c.load(1).unwrap(), 1001);
    assert!(
        eventually(|| c.stats().loads_waited_for_limit >= 1),
        "the refresh queued for the permit"
    );
    go.store(true, Ordering::SeqCst);
    assert_eq!(h.join().unwrap(), 9);
    // Let the queued refresh job get the permit and find it taken over.
    assert!(eventually(|| c.stats().loads_in_flight == 0));
    std::thread::sleep(Duration::from_millis(50));
    let before = calls.load(Ordering::SeqCst);
    let v0 = c.get(&1).expect("still cached");
    // Due again (well past any backoff): a read must start a refresh that replaces the value.
    clock.advance(Duration::from_secs(60));
    let refreshed = eventually(|| {
        let _ = c.load(1);
        calls.load(Ordering::SeqCst) > before && c.get(&1) != Some(v0)
    });
    assert!(
        refreshed,
        "the key never refreshed again: value {:?}, loader calls {} -> {}",
        c.get(&1),
        before,
        calls.load(Ordering::SeqCst),
    );
}

#[test]
fn refresh_taken_over_by_a_nop_computation_in_a_loader() {
    refresh_taken_over_by(|c| {
        let r = c.entry(1).and_compute_with(|_| Op::Nop);
        let _ = r;
    });
}

#[test]
fn refresh_taken_over_by_a_replacing_load_whose_init_panics() {
    common::quiet_injected_panics();
    refresh_taken_over_by(|c| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.entry(1)
                .or_insert_with_if(|| panic!("injected"), |_| true)
        }));
        assert!(r.is_err());
    });
}

#[test]
fn refresh_taken_over_by_a_replacing_load() {
    refresh_taken_over_by(|c| {
        let e = c.entry(1).or_insert_with_if(|| 5, |_| true);
        assert_eq!(*e.value(), 5);
    });
}

/// Control: the same sequence with nothing taking the refresh over refreshes twice.
#[test]
fn refresh_queued_behind_a_loader_control() {
    refresh_taken_over_by(|_| {});
}

/// A nested `get_all` of the refreshing key (fresh, so a hit: nothing is taken over) does not
/// disturb the queued refresh.
#[test]
fn refresh_queued_behind_a_loader_whose_get_all_hits_the_key() {
    refresh_taken_over_by(|c| {
        let m = c.get_all([1, 2], |missing| {
            missing
                .iter()
                .filter(|&&k| k != 1)
                .map(|&k| (k, 7))
                .collect::<HashMap<_, _>>()
        });
        assert_eq!(m.get(&2), Some(&7));
    });
}

/// The same with an async refresh (`async_loader` + `future_spawner` on a tokio runtime).
#[test]
fn async_refresh_taken_over_by_a_nop_computation_in_a_loader() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicU64::new(0));
    let k_calls = Arc::clone(&calls);
    let c: C = Cache::builder()
        .max_capacity(1_000)
        .max_concurrent_loads(1)
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .loader({
            let calls = Arc::clone(&calls);
            move |k: &u64| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Ok::<_, BoxError>(k * 1000 + n)
            }
        })
        .async_loader(move |k: &u64| {
            let k = *k;
            let calls = Arc::clone(&k_calls);
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Ok::<_, BoxError>(k * 1000 + n)
            }
        })
        .future_spawner(move |f| {
            handle.spawn(f);
        })
        .build();
    refresh_taken_over_in(c, clock, calls, |c| {
        let r = c.entry(1).and_compute_with(|_| Op::Nop);
        let _ = r;
    });
    drop(rt);
}

/// A shared load S of key 1 is queued for the permit (polled once by hand, nobody with a
/// permit polls it). H, the permit's holder, computes key 1 inside its loader with `verdict`:
/// the computation gives S's load up rather than wait for it. S must still finish (with its
/// own value, or the computed one), and the permit come back.
fn shared_given_up_by_a_computation(verdict: Op<u64>, want: &[u64]) {
    let _w = watchdog(Duration::from_secs(10), "shared_given_up_by_a_computation");
    let c = limited(1);
    let (ready, go) = flags();
    let h = holder(&c, &ready, &go, move |c| {
        let _ = c.entry(1).and_compute_with(|_| verdict);
    });
    wait_flag(&ready);
    let mut s = shared(&c, 1, async { 11 });
    assert!(run(&mut s, 3).is_none(), "S waits for the permit");
    go.store(true, Ordering::SeqCst);
    assert_eq!(h.join().unwrap(), 9);
    let got = run(&mut s, 100)
        .expect("S finishes")
        .expect("S does not panic");
    assert!(want.contains(&got), "S got {got}");
    drop(s);
    assert_permits_back(&c, 50, "after S");
}

#[test]
fn shared_load_given_up_by_a_nop_computation() {
    shared_given_up_by_a_computation(Op::Nop, &[11]);
}

#[test]
fn shared_load_given_up_by_a_put_computation() {
    shared_given_up_by_a_computation(Op::Put(5), &[5, 11]);
}

#[test]
fn shared_load_given_up_by_a_remove_computation() {
    shared_given_up_by_a_computation(Op::Remove, &[11]);
}

/// A blocking `load_with_timeout` L (no spawner) leads key 1 and queues for the permit; H's
/// loader computes key 1 (`Op::Nop`), giving L's load up. L must then load itself once the
/// permit is free (or time out with `Timeout`), and never run beside H.
#[test]
fn timed_blocking_leader_given_up_by_a_computation() {
    let _w = watchdog(Duration::from_secs(10), "timed_blocking_leader_given_up");
    let (most, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .loader(counting_loader(&most, &calls))
        .build();
    let (ready, go) = flags();
    let h = holder(&c, &ready, &go, |c| {
        let _ = c.entry(1).and_compute_with(|_| Op::Nop);
    });
    wait_flag(&ready);
    let c2 = c.clone();
    let l = std::thread::spawn(move || c2.load_with_timeout(1, Some(Duration::from_secs(3))));
    assert!(eventually(|| c.stats().loads_waited_for_limit >= 1));
    go.store(true, Ordering::SeqCst);
    assert_eq!(h.join().unwrap(), 9);
    assert_eq!(l.join().unwrap().unwrap(), 101);
    assert_eq!(most.load(Ordering::SeqCst), 1);
    assert_eq!(c.get(&1), Some(101));
}

/// With a spawner and a soft timeout, a `load` C hands its load to a spawned job, which
/// queues for the permit H holds; H's loader computes the key (`Op::Nop`), giving the job's
/// load up. C must get the loader's value (loading inline after the abandon) within its
/// timeout, the job must not run the loader beside it, and the permit come back.
#[test]
fn spawned_load_given_up_by_a_computation() {
    let _w = watchdog(Duration::from_secs(10), "spawned_load_given_up");
    let (most, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let c: C = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .load_timeout(Duration::from_secs(3))
        .spawner(|job| {
            std::thread::spawn(job);
        })
        .loader(counting_loader(&most, &calls))
        .build();
    let (ready, go) = flags();
    let h = holder(&c, &ready, &go, |c| {
        let _ = c.entry(1).and_compute_with(|_| Op::Nop);
    });
    wait_flag(&ready);
    let cc = c.clone();
    let l = std::thread::spawn(move || cc.load(1));
    assert!(eventually(|| c.stats().loads_waited_for_limit >= 1));
    go.store(true, Ordering::SeqCst);
    assert_eq!(h.join().unwrap(), 9);
    assert_eq!(l.join().unwrap().unwrap(), 101);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(most.load(Ordering::SeqCst), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one load of key 1");
    assert_eq!(c.get(&1), Some(101));
    assert_eq!(c.load(2).unwrap(), 102, "the permit came back");
}
