#![cfg(not(any(loom, shuttle)))]
//! Outside attack (public API only, plus the `validate` / `loads_in_flight` test hooks): what a
//! load leaves behind when user code panics *around* the store, not in the loader.
//!
//! - A shared async load whose poll panics: the future (with the caller's `init` state) must be
//!   gone before any other caller of the key starts a load of its own — one load of a key at a
//!   time, on the panic path too.
//! - A load whose registered key's `Drop` panics as the value is stored: the store must still
//!   evict what it must (the cache ends within its capacity).

mod common;

use common::key_drop::{self, PKey, CASE_LOCK};
use common::{quiet_injected_panics, start, watchdog};
use herdcache::Cache;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(5);

/// Set while a panicked load's future still lives; cleared (after a while) by its `Drop`.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        // Slow, so that a load started while it runs is seen.
        std::thread::sleep(Duration::from_millis(40));
        self.0.store(false, SeqCst);
    }
}

/// Pending at its first poll (woken 30 ms later), panics at its second. A struct, not an
/// `async` block: its fields outlive the panicking poll, as a hand-written future's do.
struct PanicsOnSecondPoll {
    polls: u32,
    _alive: Alive,
}

impl Future for PanicsOnSecondPoll {
    type Output = u64;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        self.polls += 1;
        if self.polls == 1 {
            let w = cx.waker().clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                w.wake();
            });
            return Poll::Pending;
        }
        panic!("injected: poll");
    }
}

/// A shared load's poll panics while a blocking and an async caller wait for it: neither may
/// start its own load of the key before the panicked load's future is dropped.
#[test]
fn a_panicking_shared_poll_drops_its_future_before_the_key_loads_again() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(60), "attack_s56 panicking poll");
    quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    for round in 0..3 {
        let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).build();
        let alive = Arc::new(AtomicBool::new(true));
        let overlaps = Arc::new(AtomicU64::new(0));
        let (c, a) = (cache.clone(), alive.clone());
        let leader = rt.spawn(async move {
            let f = PanicsOnSecondPoll {
                polls: 0,
                _alive: Alive(a),
            };
            c.get_with_async_shared(1, f).await
        });
        assert!(
            common::eventually(|| cache.loads_in_flight() == 1),
            "round {round}: the shared load never started"
        );
        let (c, a, o) = (cache.clone(), alive.clone(), overlaps.clone());
        let blocking = start(move || {
            c.get_with(1, || {
                if a.load(SeqCst) {
                    o.fetch_add(1, SeqCst);
                }
                5
            })
        });
        let (c, a, o) = (cache.clone(), alive.clone(), overlaps.clone());
        let waiter = rt.spawn(async move {
            c.get_with_async(1, async move {
                if a.load(SeqCst) {
                    o.fetch_add(1, SeqCst);
                }
                6
            })
            .await
        });
        // Whichever async caller polls the load when it is woken sees the panic (the leader or
        // the waiter); the leader then panics too if nothing else can answer it (documented,
        // `get_with_async_shared`); the others get the value of one new load.
        let led = rt
            .block_on(async { tokio::time::timeout(DEADLINE, leader).await })
            .unwrap_or_else(|_| panic!("round {round}: the leader hangs"));
        let waited = rt
            .block_on(async { tokio::time::timeout(DEADLINE, waiter).await })
            .unwrap_or_else(|_| panic!("round {round}: the async caller hangs"));
        let b = blocking
            .wait(DEADLINE)
            .unwrap_or_else(|| panic!("round {round}: the blocking caller hangs"));
        let results = [
            led.map_err(|_| ()),
            waited.map_err(|_| ()),
            b.map_err(|_| ()),
        ];
        eprintln!(
            "round {round}: {results:?} overlaps {}",
            overlaps.load(SeqCst)
        );
        let values: Vec<u64> = results.iter().filter_map(|r| r.ok()).collect();
        assert!(
            values.len() < 3 && !values.is_empty(),
            "round {round}: the poll's panic reaches a caller, a new load answers another: \
             {results:?}"
        );
        assert!(
            values.iter().all(|v| [5, 6].contains(v) && *v == values[0]),
            "round {round}: the others get one new load's value: {results:?}"
        );
        assert_eq!(
            overlaps.load(SeqCst),
            0,
            "round {round}: a new load of the key ran while the panicked load's future lived"
        );
        assert!(!alive.load(SeqCst), "round {round}: the future was dropped");
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

/// A full cache of 4 shards loads key 7 (sync and async loaders); its N-th drop of the key
/// after the load starts panics, N swept until no drop panics. Whichever drop it is, the
/// store evicts what it must: the cache ends within capacity, in whatever shard the excess
/// sits (filled with different keys each time, so key 7's shard is sometimes under its share
/// while another holds the excess).
#[test]
fn a_key_drop_panic_as_a_load_stores_still_evicts() {
    let _l = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(120), "attack_s56 key drop at store");
    quiet_injected_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    const CAP: u64 = 8;
    let mut fired_cases = 0;
    for fill in 0..24u32 {
        for asynchronous in [false, true] {
            for n in 1.. {
                let cache: Cache<PKey, u64> = Cache::builder().max_capacity(CAP).shards(4).build();
                for k in 0..CAP as u32 {
                    cache.insert(PKey(100 + fill * 16 + k), 1);
                }
                assert_eq!(cache.weighted_size(), CAP);
                key_drop::arm(n);
                let r = catch_unwind(AssertUnwindSafe(|| {
                    if asynchronous {
                        rt.block_on(cache.get_with_async(PKey(7), async { 77 }))
                    } else {
                        cache.get_with(PKey(7), || 77)
                    }
                }));
                key_drop::disarm();
                let fired = key_drop::fired();
                let what = format!("fill {fill}, async {asynchronous}, key drop {n} panics");
                assert_eq!(r.is_err(), fired, "{what}: the panic reaches the caller");
                assert!(
                    cache.weighted_size() <= CAP,
                    "{what}: the store left the cache over capacity ({} > {CAP})",
                    cache.weighted_size()
                );
                assert_eq!(cache.loads_in_flight(), 0, "{what}");
                cache.validate();
                let c = cache.clone();
                let v = start(move || c.get_with(PKey(7), || 78))
                    .wait(DEADLINE)
                    .unwrap_or_else(|| panic!("{what}: a later load hangs"))
                    .unwrap_or_else(|_| panic!("{what}: a later load panicked"));
                assert!(v == 77 || v == 78, "{what}");
                if !fired {
                    break;
                }
                fired_cases += 1;
            }
        }
    }
    assert!(fired_cases > 0, "the sweep injected no fault");
}
