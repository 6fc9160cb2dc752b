//! moka's own unit tests for `moka::future::Cache` (`src/future/cache.rs`, `mod tests`, moka-rs/moka
//! at 2d8289eb40af01ab77ee49719c9cf9502322e05a), and its entry/get_with integration tests
//! (`tests/entry_api_sync.rs`, `tests/entry_api_tokio.rs`, in `mod entry_api_sync` and
//! `mod entry_api_tokio` at the end), ported to herdcache's public API: one test per moka test,
//! same name, same scenario, same assertions. Each test has a watchdog.
//!
//! Translation rules: those of `tests/moka_port_sync.rs` (ManualClock for moka's mock clock,
//! `|k: &K, v: &V, cause|` listeners recorded as `(Arc<K>, V, cause)`, `Expiry` without `Instant`
//! arguments, `loads_in_flight() == 0` for moka's `is_waiter_map_empty()` /
//! `key_locks_map_is_empty()`, `entry_count() == 0` for `is_table_empty()`,
//! `reconfigure_for_testing()` and `.housekeeper_config(..)` dropped), plus, for the async cache:
//! - `#[tokio::test] async fn` -> `#[test] fn` running its body on a current-thread tokio
//!   runtime (`rt()`; what `#[tokio::test]` builds; the `macros` feature is not a dev-dependency).
//! - moka's `async_eviction_listener(|k, v, cause| -> ListenerFuture {..})` -> the synchronous
//!   `eviction_listener` (herdcache has no async listener; README "Coming from moka").
//! - `insert/get/invalidate/remove/run_pending_tasks(..).await` -> the same without `.await`
//!   (herdcache's writes and reads are not async); the loads and the entry API's async methods
//!   take an `_async` suffix (`get_with(k, fut).await` -> `get_with_async(k, fut).await`, ...).
//! - `futures_util::join!` -> `join_tasks!` (futures' `join3`/`join4`/...; futures' `join!`
//!   macro needs its `async-await` feature); `async_lock::{Barrier, Mutex}` ->
//!   `tokio::sync::Barrier`, `parking_lot::Mutex` (the listener is synchronous).
//!
//! Not ported (moka-internal or no herdcache equivalent): `cancel_future_while_running_pending_tasks`
//! (moka's `run_pending_tasks_initiation_count()` and an async listener),
//! `cancel_future_while_calling_eviction_listener` (an async listener interrupted inside an async
//! `insert`/`invalidate`), `cancel_future_while_scheduling_write_op` (moka's internal write-op
//! channels).

#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::all, unused_variables, unused_mut, dead_code, unused_imports)]

mod common;

use common::moka::*;
use common::watchdog;
use herdcache::{Cache, CompResult, EvictionPolicy, Expiry, ManualClock, Op, RemovalCause};
use parking_lot::Mutex;
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU32, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::Barrier;
use tokio::time::sleep;

const LIMIT: Duration = Duration::from_secs(60);
/// What a moka cache without `max_capacity` becomes (herdcache requires a bound).
const UNBOUNDED: u64 = u64::MAX;

/// What `#[tokio::test]` builds: a current-thread runtime with the time driver.
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// futures_util's `join!` (awaited), for 2 to 8 futures.
macro_rules! join_tasks {
    ($a:expr, $b:expr) => {
        futures::future::join($a, $b).await
    };
    ($a:expr, $b:expr, $c:expr) => {
        futures::future::join3($a, $b, $c).await
    };
    ($a:expr, $b:expr, $c:expr, $d:expr) => {
        futures::future::join4($a, $b, $c, $d).await
    };
    ($a:expr, $b:expr, $c:expr, $d:expr, $e:expr) => {
        futures::future::join5($a, $b, $c, $d, $e).await
    };
    ($a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr) => {{
        let ((a, b, c), (d, e, f)) = futures::future::join(
            futures::future::join3($a, $b, $c),
            futures::future::join3($d, $e, $f),
        )
        .await;
        (a, b, c, d, e, f)
    }};
    ($a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr, $g:expr) => {{
        let ((a, b, c, d), (e, f, g)) = futures::future::join(
            futures::future::join4($a, $b, $c, $d),
            futures::future::join3($e, $f, $g),
        )
        .await;
        (a, b, c, d, e, f, g)
    }};
    ($a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr, $g:expr, $h:expr) => {{
        let ((a, b, c, d), (e, f, g, h)) = futures::future::join(
            futures::future::join4($a, $b, $c, $d),
            futures::future::join4($e, $f, $g, $h),
        )
        .await;
        (a, b, c, d, e, f, g, h)
    }};
}

#[test]
fn futures_are_send() {
    let cache = Cache::new(0);

    fn is_send(_: impl Send) {}

    // pub fns
    is_send(cache.get(&()));
    is_send(cache.get_with_async((), async {}));
    is_send(cache.get_with_by_ref_async(&(), async {}));
    #[allow(deprecated)]
    is_send(cache.get_with_if_async((), async {}, |_| false));
    is_send(cache.insert((), ()));
    is_send(cache.invalidate(&()));
    is_send(cache.optionally_get_with_async((), async { None }));
    is_send(cache.optionally_get_with_by_ref_async(&(), async { None }));
    is_send(cache.remove(&()));
    is_send(cache.run_pending_tasks());
    is_send(cache.try_get_with_async((), async { Err(()) }));
    is_send(cache.try_get_with_by_ref_async(&(), async { Err(()) }));

    // entry fns
    is_send(
        cache
            .entry(())
            .and_compute_with_async(|_| async { Op::Nop }),
    );
    is_send(
        cache
            .entry(())
            .and_try_compute_with_async(|_| async { Ok(Op::Nop) as Result<_, Infallible> }),
    );
    is_send(cache.entry(()).and_upsert_with_async(|_| async {}));
    is_send(cache.entry(()).or_default_async());
    is_send(cache.entry(()).or_insert_async(()));
    is_send(cache.entry(()).or_insert_with_async(async {}));
    is_send(cache.entry(()).or_insert_with_if_async(async {}, |_| false));
    is_send(
        cache
            .entry(())
            .or_optionally_insert_with_async(async { None }),
    );
    is_send(cache.entry(()).or_try_insert_with_async(async { Err(()) }));

    // entry_by_ref fns
    is_send(
        cache
            .entry_by_ref(&())
            .and_compute_with_async(|_| async { Op::Nop }),
    );
    is_send(
        cache
            .entry_by_ref(&())
            .and_try_compute_with_async(|_| async { Ok(Op::Nop) as Result<_, Infallible> }),
    );
    is_send(cache.entry_by_ref(&()).and_upsert_with_async(|_| async {}));
    is_send(cache.entry_by_ref(&()).or_default_async());
    is_send(cache.entry_by_ref(&()).or_insert_async(()));
    is_send(cache.entry_by_ref(&()).or_insert_with_async(async {}));
    is_send(
        cache
            .entry_by_ref(&())
            .or_insert_with_if_async(async {}, |_| false),
    );
    is_send(
        cache
            .entry_by_ref(&())
            .or_optionally_insert_with_async(async { None }),
    );
    is_send(
        cache
            .entry_by_ref(&())
            .or_try_insert_with_async(async { Err(()) }),
    );
}

#[test]
fn max_capacity_zero() {
    let _dog = watchdog(LIMIT, "max_capacity_zero");
    rt().block_on(async {
        let mut cache = Cache::new(0);

        cache.insert(0, ());

        assert!(!cache.contains_key(&0));
        assert!(cache.get(&0).is_none());
        cache.run_pending_tasks();
        assert!(!cache.contains_key(&0));
        assert!(cache.get(&0).is_none());
        assert_eq!(cache.entry_count(), 0)
    })
}

// HERDCACHE (fails): documented difference: admission (README "Coming from moka": "a `get` that misses does not count towards a key's frequency here (it does in moka) ... tests that assert moka's exact admission decisions need `EvictionPolicy::lru()`"; src/policy.rs, DESIGN.md "Policy"): "d" is admitted only at its 4th insert, so `get(&"c")` is still Some("cindy") after the 3rd. Same as basic_single_thread in moka_port_sync.rs.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn basic_single_async_task() {
    let _dog = watchdog(LIMIT, "basic_single_async_task");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(3)
            .eviction_listener(listener)
            .build();

        cache.insert("a", "alice");
        cache.insert("b", "bob");
        assert_eq!(cache.get(&"a"), Some("alice"));
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        cache.run_pending_tasks();
        // counts: a -> 1, b -> 1

        cache.insert("c", "cindy");
        assert_eq!(cache.get(&"c"), Some("cindy"));
        assert!(cache.contains_key(&"c"));
        // counts: a -> 1, b -> 1, c -> 1
        cache.run_pending_tasks();

        assert!(cache.contains_key(&"a"));
        assert_eq!(cache.get(&"a"), Some("alice"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        assert!(cache.contains_key(&"b"));
        cache.run_pending_tasks();
        // counts: a -> 2, b -> 2, c -> 1

        // "d" should not be admitted because its frequency is too low.
        cache.insert("d", "david"); //   count: d -> 0
        expected.push((Arc::new("d"), "david", RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"d"), None); //   d -> 1
        assert!(!cache.contains_key(&"d"));

        cache.insert("d", "david");
        expected.push((Arc::new("d"), "david", RemovalCause::Size));
        cache.run_pending_tasks();
        assert!(!cache.contains_key(&"d"));
        assert_eq!(cache.get(&"d"), None); //   d -> 2

        // "d" should be admitted and "c" should be evicted
        // because d's frequency is higher than c's.
        cache.insert("d", "dennis");
        expected.push((Arc::new("c"), "cindy", RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"a"), Some("alice"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        assert_eq!(cache.get(&"c"), None);
        assert_eq!(cache.get(&"d"), Some("dennis"));
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert!(!cache.contains_key(&"c"));
        assert!(cache.contains_key(&"d"));

        cache.invalidate(&"b");
        expected.push((Arc::new("b"), "bob", RemovalCause::Explicit));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"b"), None);
        assert!(!cache.contains_key(&"b"));

        assert!(cache.remove(&"b").is_none());
        assert_eq!(cache.remove(&"d"), Some("dennis"));
        expected.push((Arc::new("d"), "dennis", RemovalCause::Explicit));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"d"), None);
        assert!(!cache.contains_key(&"d"));

        verify_notification_vec(&cache, actual, &expected);
        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn basic_lru_single_thread() {
    let _dog = watchdog(LIMIT, "basic_lru_single_thread");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(3)
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(listener)
            .build();

        cache.insert("a", "alice");
        cache.insert("b", "bob");
        assert_eq!(cache.get(&"a"), Some("alice"));
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        cache.run_pending_tasks();
        // a -> b

        cache.insert("c", "cindy");
        assert_eq!(cache.get(&"c"), Some("cindy"));
        assert!(cache.contains_key(&"c"));
        cache.run_pending_tasks();
        // a -> b -> c

        assert!(cache.contains_key(&"a"));
        assert_eq!(cache.get(&"a"), Some("alice"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        assert!(cache.contains_key(&"b"));
        cache.run_pending_tasks();
        // c -> a -> b

        // "d" should be admitted because the cache uses the LRU strategy.
        cache.insert("d", "david");
        // "c" is the LRU and should have be evicted.
        expected.push((Arc::new("c"), "cindy", RemovalCause::Size));
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"a"), Some("alice"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        assert_eq!(cache.get(&"c"), None);
        assert_eq!(cache.get(&"d"), Some("david"));
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert!(!cache.contains_key(&"c"));
        assert!(cache.contains_key(&"d"));
        cache.run_pending_tasks();
        // a -> b -> d

        cache.invalidate(&"b");
        expected.push((Arc::new("b"), "bob", RemovalCause::Explicit));
        cache.run_pending_tasks();
        // a -> d
        assert_eq!(cache.get(&"b"), None);
        assert!(!cache.contains_key(&"b"));

        assert!(cache.remove(&"b").is_none());
        assert_eq!(cache.remove(&"d"), Some("david"));
        expected.push((Arc::new("d"), "david", RemovalCause::Explicit));
        cache.run_pending_tasks();
        // a
        assert_eq!(cache.get(&"d"), None);
        assert!(!cache.contains_key(&"d"));

        cache.insert("e", "emily");
        cache.insert("f", "frank");
        // "a" should be evicted because it is the LRU.
        cache.insert("g", "gina");
        expected.push((Arc::new("a"), "alice", RemovalCause::Size));
        cache.run_pending_tasks();
        // e -> f -> g
        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"e"), Some("emily"));
        assert_eq!(cache.get(&"f"), Some("frank"));
        assert_eq!(cache.get(&"g"), Some("gina"));
        assert!(!cache.contains_key(&"a"));
        assert!(cache.contains_key(&"e"));
        assert!(cache.contains_key(&"f"));
        assert!(cache.contains_key(&"g"));

        verify_notification_vec(&cache, actual, &expected);
        assert!(no_loads_in_flight(&cache));
    })
}

// HERDCACHE (fails): documented difference: a cache with a weigher runs rule `g` (a key in the ghost of recent evictions is admitted; DESIGN.md "Policy", README "a recently evicted key may be let back in by a ghost of evictions"): "d" gets in at its 2nd insert. Same as in moka_port_sync.rs.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn size_aware_eviction() {
    let _dog = watchdog(LIMIT, "size_aware_eviction");
    rt().block_on(async {
        let weigher = |_k: &&str, v: &(&str, u32)| v.1;

        let alice = ("alice", 10);
        let bob = ("bob", 15);
        let bill = ("bill", 20);
        let cindy = ("cindy", 5);
        let david = ("david", 15);
        let dennis = ("dennis", 15);

        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(31)
            .weigher(weigher)
            .eviction_listener(listener)
            .build();

        cache.insert("a", alice);
        cache.insert("b", bob);
        assert_eq!(cache.get(&"a"), Some(alice));
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.get(&"b"), Some(bob));
        cache.run_pending_tasks();
        // order (LRU -> MRU) and counts: a -> 1, b -> 1

        cache.insert("c", cindy);
        assert_eq!(cache.get(&"c"), Some(cindy));
        assert!(cache.contains_key(&"c"));
        // order and counts: a -> 1, b -> 1, c -> 1
        cache.run_pending_tasks();

        assert!(cache.contains_key(&"a"));
        assert_eq!(cache.get(&"a"), Some(alice));
        assert_eq!(cache.get(&"b"), Some(bob));
        assert!(cache.contains_key(&"b"));
        cache.run_pending_tasks();
        // order and counts: c -> 1, a -> 2, b -> 2

        // To enter "d" (weight: 15), it needs to evict "c" (w: 5) and "a" (w: 10).
        // "d" must have higher count than 3, which is the aggregated count
        // of "a" and "c".
        cache.insert("d", david); //   count: d -> 0
        expected.push((Arc::new("d"), david, RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"d"), None); //   d -> 1
        assert!(!cache.contains_key(&"d"));

        cache.insert("d", david);
        expected.push((Arc::new("d"), david, RemovalCause::Size));
        cache.run_pending_tasks();
        assert!(!cache.contains_key(&"d"));
        assert_eq!(cache.get(&"d"), None); //   d -> 2

        cache.insert("d", david);
        expected.push((Arc::new("d"), david, RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"d"), None); //   d -> 3
        assert!(!cache.contains_key(&"d"));

        cache.insert("d", david);
        expected.push((Arc::new("d"), david, RemovalCause::Size));
        cache.run_pending_tasks();
        assert!(!cache.contains_key(&"d"));
        assert_eq!(cache.get(&"d"), None); //   d -> 4

        // Finally "d" should be admitted by evicting "c" and "a".
        cache.insert("d", dennis);
        expected.push((Arc::new("c"), cindy, RemovalCause::Size));
        expected.push((Arc::new("a"), alice, RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), Some(bob));
        assert_eq!(cache.get(&"c"), None);
        assert_eq!(cache.get(&"d"), Some(dennis));
        assert!(!cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert!(!cache.contains_key(&"c"));
        assert!(cache.contains_key(&"d"));

        // Update "b" with "bill" (w: 15 -> 20). This should evict "d" (w: 15).
        cache.insert("b", bill);
        expected.push((Arc::new("b"), bob, RemovalCause::Replaced));
        expected.push((Arc::new("d"), dennis, RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"b"), Some(bill));
        assert_eq!(cache.get(&"d"), None);
        assert!(cache.contains_key(&"b"));
        assert!(!cache.contains_key(&"d"));

        // Re-add "a" (w: 10) and update "b" with "bob" (w: 20 -> 15).
        cache.insert("a", alice);
        cache.insert("b", bob);
        expected.push((Arc::new("b"), bill, RemovalCause::Replaced));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&"a"), Some(alice));
        assert_eq!(cache.get(&"b"), Some(bob));
        assert_eq!(cache.get(&"d"), None);
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert!(!cache.contains_key(&"d"));

        // Verify the sizes.
        assert_eq!(cache.entry_count(), 2);
        assert_eq!(cache.weighted_size(), 25);

        verify_notification_vec(&cache, actual, &expected);
        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn basic_multi_async_tasks() {
    let _dog = watchdog(LIMIT, "basic_multi_async_tasks");
    rt().block_on(async {
        let num_tasks = 2;
        let num_threads = 2;

        let cache = Cache::new(100);
        let barrier = Arc::new(Barrier::new(num_tasks + num_threads as usize));

        let tasks = (0..num_tasks)
            .map(|id| {
                let cache = cache.clone();
                let barrier = Arc::clone(&barrier);

                tokio::spawn(async move {
                    barrier.wait().await;

                    cache.insert(10, format!("{id}-100"));
                    cache.get(&10);
                    cache.insert(20, format!("{id}-200"));
                    cache.invalidate(&10);
                })
            })
            .collect::<Vec<_>>();

        let threads = (0..num_threads)
            .map(|id| {
                let cache = cache.clone();
                let barrier = Arc::clone(&barrier);
                let rt = tokio::runtime::Handle::current();

                std::thread::spawn(move || {
                    rt.block_on(barrier.wait());

                    cache.insert(10, format!("{id}-100"));
                    cache.get(&10);
                    cache.insert(20, format!("{id}-200"));
                    cache.invalidate(&10);
                })
            })
            .collect::<Vec<_>>();

        let _ = futures::future::join_all(tasks).await;
        threads.into_iter().for_each(|t| t.join().unwrap());

        assert!(cache.get(&10).is_none());
        assert!(cache.get(&20).is_some());
        assert!(!cache.contains_key(&10));
        assert!(cache.contains_key(&20));
    })
}

#[test]
fn invalidate_all() {
    let _dog = watchdog(LIMIT, "invalidate_all");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .eviction_listener(listener)
            .build();

        cache.insert("a", "alice");
        cache.insert("b", "bob");
        cache.insert("c", "cindy");
        assert_eq!(cache.get(&"a"), Some("alice"));
        assert_eq!(cache.get(&"b"), Some("bob"));
        assert_eq!(cache.get(&"c"), Some("cindy"));
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        assert!(cache.contains_key(&"c"));

        // `cache.run_pending_tasks()` is no longer needed here before invalidating. The last
        // modified timestamp of the entries were updated when they were inserted.
        // https://github.com/moka-rs/moka/issues/155

        cache.invalidate_all();
        expected.push((Arc::new("a"), "alice", RemovalCause::Explicit));
        expected.push((Arc::new("b"), "bob", RemovalCause::Explicit));
        expected.push((Arc::new("c"), "cindy", RemovalCause::Explicit));
        cache.run_pending_tasks();

        cache.insert("d", "david");
        cache.run_pending_tasks();

        assert!(cache.get(&"a").is_none());
        assert!(cache.get(&"b").is_none());
        assert!(cache.get(&"c").is_none());
        assert_eq!(cache.get(&"d"), Some("david"));
        assert!(!cache.contains_key(&"a"));
        assert!(!cache.contains_key(&"b"));
        assert!(!cache.contains_key(&"c"));
        assert!(cache.contains_key(&"d"));

        verify_notification_vec(&cache, actual, &expected);
    })
}

// This test is for https://github.com/moka-rs/moka/issues/155
#[test]
fn invalidate_all_without_running_pending_tasks() {
    let _dog = watchdog(LIMIT, "invalidate_all_without_running_pending_tasks");
    rt().block_on(async {
        let cache = Cache::new(1024);

        assert_eq!(cache.get(&0), None);
        cache.insert(0, 1);
        assert_eq!(cache.get(&0), Some(1));

        cache.invalidate_all();
        assert_eq!(cache.get(&0), None);
    })
}

// HERDCACHE (fails): documented difference: `invalidate_entries_if` "runs at once" (Cache::invalidate_entries_if docs, README table), so removals come in call order (3, 1), not moka's write order (1, 3).
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn invalidate_entries_if() -> Result<(), Box<dyn std::error::Error>> {
    let _dog = watchdog(LIMIT, "invalidate_entries_if");
    rt().block_on(async {
        use std::collections::HashSet;

        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        let (clock, mock) = mock_clock();

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .support_invalidation_closures()
            .eviction_listener(listener)
            .clock(clock)
            .build();

        cache.insert(0, "alice");
        cache.insert(1, "bob");
        cache.insert(2, "alex");
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 5 secs from the start.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&0), Some("alice"));
        assert_eq!(cache.get(&1), Some("bob"));
        assert_eq!(cache.get(&2), Some("alex"));
        assert!(cache.contains_key(&0));
        assert!(cache.contains_key(&1));
        assert!(cache.contains_key(&2));

        let names = ["alice", "alex"].iter().cloned().collect::<HashSet<_>>();
        cache.invalidate_entries_if(move |_k, &v| names.contains(v))?;
        // (moka-internal) assert_eq!(cache.invalidation_predicate_count(), 1);
        expected.push((Arc::new(0), "alice", RemovalCause::Explicit));
        expected.push((Arc::new(2), "alex", RemovalCause::Explicit));

        mock.advance(Duration::from_secs(5)); // 10 secs from the start.

        cache.insert(3, "alice");

        // Run the invalidation task and wait for it to finish. (TODO: Need a better way than sleeping)
        cache.run_pending_tasks(); // To submit the invalidation task.
        std::thread::sleep(Duration::from_millis(200));
        cache.run_pending_tasks(); // To process the task result.
        std::thread::sleep(Duration::from_millis(200));

        assert!(cache.get(&0).is_none());
        assert!(cache.get(&2).is_none());
        assert_eq!(cache.get(&1), Some("bob"));
        // This should survive as it was inserted after calling invalidate_entries_if.
        assert_eq!(cache.get(&3), Some("alice"));

        assert!(!cache.contains_key(&0));
        assert!(cache.contains_key(&1));
        assert!(!cache.contains_key(&2));
        assert!(cache.contains_key(&3));

        assert_eq!(cache.entry_count(), 2);
        // (moka-internal) assert_eq!(cache.invalidation_predicate_count(), 0);

        mock.advance(Duration::from_secs(5)); // 15 secs from the start.

        cache.invalidate_entries_if(|_k, &v| v == "alice")?;
        cache.invalidate_entries_if(|_k, &v| v == "bob")?;
        // (moka-internal) assert_eq!(cache.invalidation_predicate_count(), 2);
        // key 1 was inserted before key 3.
        expected.push((Arc::new(1), "bob", RemovalCause::Explicit));
        expected.push((Arc::new(3), "alice", RemovalCause::Explicit));

        // Run the invalidation task and wait for it to finish. (TODO: Need a better way than sleeping)
        cache.run_pending_tasks(); // To submit the invalidation task.
        std::thread::sleep(Duration::from_millis(200));
        cache.run_pending_tasks(); // To process the task result.
        std::thread::sleep(Duration::from_millis(200));

        assert!(cache.get(&1).is_none());
        assert!(cache.get(&3).is_none());

        assert!(!cache.contains_key(&1));
        assert!(!cache.contains_key(&3));

        assert_eq!(cache.entry_count(), 0);
        // (moka-internal) assert_eq!(cache.invalidation_predicate_count(), 0);

        verify_notification_vec(&cache, actual, &expected);

        Ok(())
    })
}

#[test]
fn time_to_live() {
    let _dog = watchdog(LIMIT, "time_to_live");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        let (clock, mock) = mock_clock();

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .time_to_live(Duration::from_secs(10))
            .eviction_listener(listener)
            .clock(clock)
            .build();

        cache.insert("a", "alice");
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 5 secs from the start.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"a"), Some("alice"));
        assert!(cache.contains_key(&"a"));

        mock.advance(Duration::from_secs(5)); // 10 secs.
        expected.push((Arc::new("a"), "alice", RemovalCause::Expired));
        assert_eq!(cache.get(&"a"), None);
        assert!(!cache.contains_key(&"a"));

        assert_eq!(cache.iter().count(), 0);

        cache.run_pending_tasks();
        assert!(is_table_empty(&cache));

        cache.insert("b", "bob");
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 1);

        mock.advance(Duration::from_secs(5)); // 15 secs.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"b"), Some("bob"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.entry_count(), 1);

        cache.insert("b", "bill");
        expected.push((Arc::new("b"), "bob", RemovalCause::Replaced));
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 20 secs
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"b"), Some("bill"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.entry_count(), 1);

        mock.advance(Duration::from_secs(5)); // 25 secs
        expected.push((Arc::new("b"), "bill", RemovalCause::Expired));

        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), None);
        assert!(!cache.contains_key(&"a"));
        assert!(!cache.contains_key(&"b"));

        assert_eq!(cache.iter().count(), 0);

        cache.run_pending_tasks();
        assert!(is_table_empty(&cache));

        verify_notification_vec(&cache, actual, &expected);
    })
}

#[test]
fn time_to_idle() {
    let _dog = watchdog(LIMIT, "time_to_idle");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        let (clock, mock) = mock_clock();

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .time_to_idle(Duration::from_secs(10))
            .eviction_listener(listener)
            .clock(clock)
            .build();

        cache.insert("a", "alice");
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 5 secs from the start.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"a"), Some("alice"));

        mock.advance(Duration::from_secs(5)); // 10 secs.
        cache.run_pending_tasks();

        cache.insert("b", "bob");
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 2);

        mock.advance(Duration::from_secs(2)); // 12 secs.
        cache.run_pending_tasks();

        // contains_key does not reset the idle timer for the key.
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 2);

        mock.advance(Duration::from_secs(3)); // 15 secs.
        expected.push((Arc::new("a"), "alice", RemovalCause::Expired));

        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), Some("bob"));
        assert!(!cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));

        assert_eq!(cache.iter().count(), 1);

        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 1);

        mock.advance(Duration::from_secs(10)); // 25 secs
        expected.push((Arc::new("b"), "bob", RemovalCause::Expired));

        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), None);
        assert!(!cache.contains_key(&"a"));
        assert!(!cache.contains_key(&"b"));

        assert_eq!(cache.iter().count(), 0);

        cache.run_pending_tasks();
        assert!(is_table_empty(&cache));

        verify_notification_vec(&cache, actual, &expected);
    })
}

// https://github.com/moka-rs/moka/issues/359
#[test]
fn ensure_access_time_is_updated_immediately_after_read() {
    let _dog = watchdog(
        LIMIT,
        "ensure_access_time_is_updated_immediately_after_read",
    );
    rt().block_on(async {
        let (clock, mock) = mock_clock();
        let mut cache = Cache::builder()
            .max_capacity(10)
            .time_to_idle(Duration::from_secs(5))
            .clock(clock)
            .build();

        cache.insert(1, 1);

        mock.advance(Duration::from_secs(4));
        assert_eq!(cache.get(&1), Some(1));

        mock.advance(Duration::from_secs(2));
        assert_eq!(cache.get(&1), Some(1));
        cache.run_pending_tasks();
        assert_eq!(cache.get(&1), Some(1));
    })
}

#[test]
fn time_to_live_by_expiry_type() {
    let _dog = watchdog(LIMIT, "time_to_live_by_expiry_type");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Define an expiry type.
        struct MyExpiry {
            counters: Arc<ExpiryCallCounters>,
        }

        impl MyExpiry {
            fn new(counters: Arc<ExpiryCallCounters>) -> Self {
                Self { counters }
            }
        }

        impl Expiry<&str, &str> for MyExpiry {
            fn expire_after_create(&self, _key: &&str, _value: &&str) -> Option<Duration> {
                self.counters.incl_actual_creations();
                Some(Duration::from_secs(10))
            }

            fn expire_after_update(
                &self,
                _key: &&str,
                _value: &&str,
                _current_duration: Option<Duration>,
            ) -> Option<Duration> {
                self.counters.incl_actual_updates();
                Some(Duration::from_secs(10))
            }
        }

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create expiry counters and the expiry.
        let expiry_counters = Arc::new(ExpiryCallCounters::default());
        let expiry = MyExpiry::new(Arc::clone(&expiry_counters));

        let (clock, mock) = mock_clock();

        // Create a cache with the expiry and eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .expire_after(expiry)
            .eviction_listener(listener)
            .clock(clock)
            .build();

        cache.insert("a", "alice");
        expiry_counters.incl_expected_creations();
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 5 secs from the start.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"a"), Some("alice"));
        assert!(cache.contains_key(&"a"));

        mock.advance(Duration::from_secs(5)); // 10 secs.
        expected.push((Arc::new("a"), "alice", RemovalCause::Expired));
        assert_eq!(cache.get(&"a"), None);
        assert!(!cache.contains_key(&"a"));

        assert_eq!(cache.iter().count(), 0);

        cache.run_pending_tasks();
        assert!(is_table_empty(&cache));

        cache.insert("b", "bob");
        expiry_counters.incl_expected_creations();
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 1);

        mock.advance(Duration::from_secs(5)); // 15 secs.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"b"), Some("bob"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.entry_count(), 1);

        cache.insert("b", "bill");
        expected.push((Arc::new("b"), "bob", RemovalCause::Replaced));
        expiry_counters.incl_expected_updates();
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 20 secs
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"b"), Some("bill"));
        assert!(cache.contains_key(&"b"));
        assert_eq!(cache.entry_count(), 1);

        mock.advance(Duration::from_secs(5)); // 25 secs
        expected.push((Arc::new("b"), "bill", RemovalCause::Expired));

        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), None);
        assert!(!cache.contains_key(&"a"));
        assert!(!cache.contains_key(&"b"));

        assert_eq!(cache.iter().count(), 0);

        cache.run_pending_tasks();
        assert!(is_table_empty(&cache));

        expiry_counters.verify();
        verify_notification_vec(&cache, actual, &expected);
    })
}

#[test]
fn time_to_idle_by_expiry_type() {
    let _dog = watchdog(LIMIT, "time_to_idle_by_expiry_type");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Define an expiry type.
        struct MyExpiry {
            counters: Arc<ExpiryCallCounters>,
        }

        impl MyExpiry {
            fn new(counters: Arc<ExpiryCallCounters>) -> Self {
                Self { counters }
            }
        }

        impl Expiry<&str, &str> for MyExpiry {
            fn expire_after_read(
                &self,
                _key: &&str,
                _value: &&str,
                _current_duration: Option<Duration>,
            ) -> Option<Duration> {
                self.counters.incl_actual_reads();
                Some(Duration::from_secs(10))
            }
        }

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create expiry counters and the expiry.
        let expiry_counters = Arc::new(ExpiryCallCounters::default());
        let expiry = MyExpiry::new(Arc::clone(&expiry_counters));

        let (clock, mock) = mock_clock();

        // Create a cache with the expiry and eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .expire_after(expiry)
            .eviction_listener(listener)
            .clock(clock)
            .build();

        cache.insert("a", "alice");
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(5)); // 5 secs from the start.
        cache.run_pending_tasks();

        assert_eq!(cache.get(&"a"), Some("alice"));
        expiry_counters.incl_expected_reads();

        mock.advance(Duration::from_secs(5)); // 10 secs.
        cache.run_pending_tasks();

        cache.insert("b", "bob");
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 2);

        mock.advance(Duration::from_secs(2)); // 12 secs.
        cache.run_pending_tasks();

        // contains_key does not reset the idle timer for the key.
        assert!(cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 2);

        mock.advance(Duration::from_secs(3)); // 15 secs.
        expected.push((Arc::new("a"), "alice", RemovalCause::Expired));

        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), Some("bob"));
        expiry_counters.incl_expected_reads();
        assert!(!cache.contains_key(&"a"));
        assert!(cache.contains_key(&"b"));

        assert_eq!(cache.iter().count(), 1);

        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 1);

        mock.advance(Duration::from_secs(10)); // 25 secs
        expected.push((Arc::new("b"), "bob", RemovalCause::Expired));

        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"b"), None);
        assert!(!cache.contains_key(&"a"));
        assert!(!cache.contains_key(&"b"));

        assert_eq!(cache.iter().count(), 0);

        cache.run_pending_tasks();
        assert!(is_table_empty(&cache));

        expiry_counters.verify();
        verify_notification_vec(&cache, actual, &expected);
    })
}

/// Verify that the `Expiry::expire_after_read()` method is called in `get_with`
/// only when the key was already present in the cache.
#[test]
fn test_expiry_using_get_with() {
    let _dog = watchdog(LIMIT, "test_expiry_using_get_with");
    rt().block_on(async {
        // Define an expiry type, which always return `None`.
        struct NoExpiry {
            counters: Arc<ExpiryCallCounters>,
        }

        impl NoExpiry {
            fn new(counters: Arc<ExpiryCallCounters>) -> Self {
                Self { counters }
            }
        }

        impl Expiry<&str, &str> for NoExpiry {
            fn expire_after_create(&self, _key: &&str, _value: &&str) -> Option<Duration> {
                self.counters.incl_actual_creations();
                None
            }

            fn expire_after_read(
                &self,
                _key: &&str,
                _value: &&str,
                _current_duration: Option<Duration>,
            ) -> Option<Duration> {
                self.counters.incl_actual_reads();
                None
            }

            fn expire_after_update(
                &self,
                _key: &&str,
                _value: &&str,
                _current_duration: Option<Duration>,
            ) -> Option<Duration> {
                unreachable!("The `expire_after_update()` method should not be called.");
            }
        }

        // Create expiry counters and the expiry.
        let expiry_counters = Arc::new(ExpiryCallCounters::default());
        let expiry = NoExpiry::new(Arc::clone(&expiry_counters));

        // Create a cache with the expiry and eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(100)
            .expire_after(expiry)
            .build();

        // The key is not present.
        cache.get_with_async("a", async { "alice" }).await;
        expiry_counters.incl_expected_creations();
        cache.run_pending_tasks();

        // The key is present.
        cache.get_with_async("a", async { "alex" }).await;
        expiry_counters.incl_expected_reads();
        cache.run_pending_tasks();

        // The key is not present.
        cache.invalidate("a");
        cache.get_with_async("a", async { "amanda" }).await;
        expiry_counters.incl_expected_creations();
        cache.run_pending_tasks();

        expiry_counters.verify();
    })
}

// https://github.com/moka-rs/moka/issues/345
#[test]
fn test_race_between_updating_entry_and_processing_its_write_ops() {
    let _dog = watchdog(
        LIMIT,
        "test_race_between_updating_entry_and_processing_its_write_ops",
    );
    rt().block_on(async {
        let (clock, mock) = mock_clock();
        let cache = Cache::builder()
            .max_capacity(2)
            .time_to_idle(Duration::from_secs(1))
            .clock(clock)
            .build();

        cache.insert("a", "alice");
        cache.insert("b", "bob");
        cache.insert("c", "cathy"); // c1
        mock.advance(Duration::from_secs(2));

        // The following `insert` will do the followings:
        // 1. Replaces current "c" (c1) in the concurrent hash table (cht).
        // 2. Runs the pending tasks implicitly.
        //    (1) "a" will be admitted.
        //    (2) "b" will be admitted.
        //    (3) c1 will be evicted by size constraint.
        //    (4) "a" will be evicted due to expiration.
        //    (5) "b" will be evicted due to expiration.
        // 3. Send its `WriteOp` log to the channel.
        cache.insert("c", "cindy"); // c2

        // Remove "c" (c2) from the cht.
        assert_eq!(cache.remove(&"c"), Some("cindy")); // c-remove

        mock.advance(Duration::from_secs(2));

        // The following `run_pending_tasks` will do the followings:
        // 1. Admits "c" (c2) to the cache. (Create a node in the LRU deque)
        // 2. Because of c-remove, removes c2's node from the LRU deque.
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);
    })
}

// HERDCACHE (fails): documented difference: "its admission policy may turn a new key away at once" (README "The bound holds when insert returns"): "c1" is never stored in the full 2-entry cache, so remove(&'c') is None.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn test_race_between_recreating_entry_and_processing_its_write_ops() {
    let _dog = watchdog(
        LIMIT,
        "test_race_between_recreating_entry_and_processing_its_write_ops",
    );
    rt().block_on(async {
        let cache = Cache::builder().max_capacity(2).build();

        cache.insert('a', "a");
        cache.insert('b', "b");
        cache.run_pending_tasks();

        cache.insert('c', "c1"); // (a) `EntryInfo` 1, gen: 1
        assert!(cache.remove(&'a').is_some()); // (b)
        assert!(cache.remove(&'b').is_some()); // (c)
        assert!(cache.remove(&'c').is_some()); // (d) `EntryInfo` 1, gen: 2
        cache.insert('c', "c2"); // (e) `EntryInfo` 2, gen: 1

        // Now the `write_op_ch` channel contains the following `WriteOp`s:
        //
        // - 0: (a) insert "c1" (`EntryInfo` 1, gen: 1)
        // - 1: (b) remove "a"
        // - 2: (c) remove "b"
        // - 3: (d) remove "c1" (`EntryInfo` 1, gen: 2)
        // - 4: (e) insert "c2" (`EntryInfo` 2, gen: 1)
        //
        // 0 for "c1" is going to be rejected because the cache is full. Let's ensure
        // processing 0 must not remove "c2" from the concurrent hash table. (Their
        // gen are the same, but `EntryInfo`s are different)
        cache.run_pending_tasks();
        assert_eq!(cache.get(&'c'), Some("c2"));
    })
}

#[test]
fn test_iter() {
    let _dog = watchdog(LIMIT, "test_iter");
    rt().block_on(async {
        const NUM_KEYS: usize = 50;

        fn make_value(key: usize) -> String {
            format!("val: {key}")
        }

        let cache = Cache::builder()
            .max_capacity(100)
            .time_to_idle(Duration::from_secs(10))
            .build();

        for key in 0..NUM_KEYS {
            cache.insert(key, make_value(key));
        }

        let mut key_set = std::collections::HashSet::new();

        for (key, value) in &cache {
            assert_eq!(value, make_value(key));

            key_set.insert(key);
        }

        // Ensure there are no missing or duplicate keys in the iteration.
        assert_eq!(key_set.len(), NUM_KEYS);
    })
}

/// Runs 16 async tasks at the same time and ensures no deadlock occurs.
///
/// - Eight of the task will update key-values in the cache.
/// - Eight others will iterate the cache.
///
#[test]
fn test_iter_multi_async_tasks() {
    let _dog = watchdog(LIMIT, "test_iter_multi_async_tasks");
    rt().block_on(async {
        use std::collections::HashSet;

        const NUM_KEYS: usize = 1024;
        const NUM_TASKS: usize = 16;

        fn make_value(key: usize) -> String {
            format!("val: {key}")
        }

        let cache = Cache::builder()
            .max_capacity(2048)
            .time_to_idle(Duration::from_secs(10))
            .build();

        // Initialize the cache.
        for key in 0..NUM_KEYS {
            cache.insert(key, make_value(key));
        }

        let rw_lock = Arc::new(tokio::sync::RwLock::<()>::default());
        let write_lock = rw_lock.write().await;

        let tasks = (0..NUM_TASKS)
            .map(|n| {
                let cache = cache.clone();
                let rw_lock = Arc::clone(&rw_lock);

                if n % 2 == 0 {
                    // This thread will update the cache.
                    tokio::spawn(async move {
                        let read_lock = rw_lock.read().await;
                        for key in 0..NUM_KEYS {
                            // TODO: Update keys in a random order?
                            cache.insert(key, make_value(key));
                        }
                        std::mem::drop(read_lock);
                    })
                } else {
                    // This thread will iterate the cache.
                    tokio::spawn(async move {
                        let read_lock = rw_lock.read().await;
                        let mut key_set = HashSet::new();
                        // let mut key_count = 0usize;
                        for (key, value) in &cache {
                            assert_eq!(value, make_value(key));
                            key_set.insert(key);
                            // key_count += 1;
                        }
                        // Ensure there are no missing or duplicate keys in the iteration.
                        assert_eq!(key_set.len(), NUM_KEYS);
                        std::mem::drop(read_lock);
                    })
                }
            })
            .collect::<Vec<_>>();

        // Let these threads to run by releasing the write lock.
        std::mem::drop(write_lock);

        let _ = futures::future::join_all(tasks).await;

        // Ensure there are no missing or duplicate keys in the iteration.
        let key_set = cache.iter().map(|(k, _v)| k).collect::<HashSet<_>>();
        assert_eq!(key_set.len(), NUM_KEYS);
    })
}

#[test]
fn get_with() {
    let _dog = watchdog(LIMIT, "get_with");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: u32 = 0;

        // This test will run five async tasks:
        //
        // Task1 will be the first task to call `get_with` for a key, so its async
        // block will be evaluated and then a &str value "task1" will be inserted to
        // the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `get_with` immediately.
                let v = cache1
                    .get_with_async(KEY, async {
                        // Wait for 300 ms and return a &str value.
                        sleep(Duration::from_millis(300)).await;
                        "task1"
                    })
                    .await;
                assert_eq!(v, "task1");
            }
        };

        // Task2 will be the second task to call `get_with` for the same key, so its
        // async block will not be evaluated. Once task1's async block finishes, it
        // will get the value inserted by task1's async block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `get_with`.
                sleep(Duration::from_millis(100)).await;
                let v = cache2.get_with_async(KEY, async { unreachable!() }).await;
                assert_eq!(v, "task1");
            }
        };

        // Task3 will be the third task to call `get_with` for the same key. By the
        // time it calls, task1's async block should have finished already and the
        // value should be already inserted to the cache. So its async block will not
        // be evaluated and will get the value inserted by task1's async block
        // immediately.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get_with`.
                sleep(Duration::from_millis(400)).await;
                let v = cache3.get_with_async(KEY, async { unreachable!() }).await;
                assert_eq!(v, "task1");
            }
        };

        // Task4 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache4.get(&KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task5 will call `get` for the same key. It will call after task1's async
        // block finished, so it will get the value insert by task1's async block.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400)).await;
                let maybe_v = cache5.get(&KEY);
                assert_eq!(maybe_v, Some("task1"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn get_with_by_ref() {
    let _dog = watchdog(LIMIT, "get_with_by_ref");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: &u32 = &0;

        // This test will run five async tasks:
        //
        // Task1 will be the first task to call `get_with_by_ref` for a key, so its async
        // block will be evaluated and then a &str value "task1" will be inserted to
        // the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `get_with_by_ref` immediately.
                let v = cache1
                    .get_with_by_ref_async(KEY, async {
                        // Wait for 300 ms and return a &str value.
                        sleep(Duration::from_millis(300)).await;
                        "task1"
                    })
                    .await;
                assert_eq!(v, "task1");
            }
        };

        // Task2 will be the second task to call `get_with_by_ref` for the same key, so its
        // async block will not be evaluated. Once task1's async block finishes, it
        // will get the value inserted by task1's async block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `get_with_by_ref`.
                sleep(Duration::from_millis(100)).await;
                let v = cache2
                    .get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v, "task1");
            }
        };

        // Task3 will be the third task to call `get_with_by_ref` for the same key. By the
        // time it calls, task1's async block should have finished already and the
        // value should be already inserted to the cache. So its async block will not
        // be evaluated and will get the value inserted by task1's async block
        // immediately.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get_with_by_ref`.
                sleep(Duration::from_millis(400)).await;
                let v = cache3
                    .get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v, "task1");
            }
        };

        // Task4 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache4.get(KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task5 will call `get` for the same key. It will call after task1's async
        // block finished, so it will get the value insert by task1's async block.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400)).await;
                let maybe_v = cache5.get(KEY);
                assert_eq!(maybe_v, Some("task1"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn entry_or_insert_with_if() {
    let _dog = watchdog(LIMIT, "entry_or_insert_with_if");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: u32 = 0;

        // This test will run seven async tasks:
        //
        // Task1 will be the first task to call `or_insert_with_if` for a key, so its
        // async block will be evaluated and then a &str value "task1" will be
        // inserted to the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `or_insert_with_if` immediately.
                let entry = cache1
                    .entry(KEY)
                    .or_insert_with_if_async(
                        async {
                            // Wait for 300 ms and return a &str value.
                            sleep(Duration::from_millis(300)).await;
                            "task1"
                        },
                        |_v| unreachable!(),
                    )
                    .await;
                // Entry should be fresh because our async block should have been
                // evaluated.
                assert!(entry.is_fresh());
                assert_eq!(entry.into_value(), "task1");
            }
        };

        // Task2 will be the second task to call `or_insert_with_if` for the same
        // key, so its async block will not be evaluated. Once task1's async block
        // finishes, it will get the value inserted by task1's async block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `or_insert_with_if`.
                sleep(Duration::from_millis(100)).await;
                let entry = cache2
                    .entry(KEY)
                    .or_insert_with_if_async(async { unreachable!() }, |_v| unreachable!())
                    .await;
                // Entry should not be fresh because task1's async block should have
                // been evaluated instead of ours.
                assert!(!entry.is_fresh());
                assert_eq!(entry.into_value(), "task1");
            }
        };

        // Task3 will be the third task to call `or_insert_with_if` for the same key.
        // By the time it calls, task1's async block should have finished already and
        // the value should be already inserted to the cache. Also task3's
        // `replace_if` closure returns `false`. So its async block will not be
        // evaluated and will get the value inserted by task1's async block
        // immediately.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 350 ms before calling `or_insert_with_if`.
                sleep(Duration::from_millis(350)).await;
                let entry = cache3
                    .entry(KEY)
                    .or_insert_with_if_async(async { unreachable!() }, |v| {
                        assert_eq!(v, &"task1");
                        false
                    })
                    .await;
                assert!(!entry.is_fresh());
                assert_eq!(entry.into_value(), "task1");
            }
        };

        // Task4 will be the fourth task to call `or_insert_with_if` for the same
        // key. The value should have been already inserted to the cache by task1.
        // However task4's `replace_if` closure returns `true`. So its async block
        // will be evaluated to replace the current value.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 400 ms before calling `or_insert_with_if`.
                sleep(Duration::from_millis(400)).await;
                let entry = cache4
                    .entry(KEY)
                    .or_insert_with_if_async(async { "task4" }, |v| {
                        assert_eq!(v, &"task1");
                        true
                    })
                    .await;
                assert!(entry.is_fresh());
                assert_eq!(entry.into_value(), "task4");
            }
        };

        // Task5 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache5.get(&KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task6 will call `get` for the same key. It will call after task1's async
        // block finished, so it will get the value insert by task1's async block.
        let task6 = {
            let cache6 = cache.clone();
            async move {
                // Wait for 350 ms before calling `get`.
                sleep(Duration::from_millis(350)).await;
                let maybe_v = cache6.get(&KEY);
                assert_eq!(maybe_v, Some("task1"));
            }
        };

        // Task7 will call `get` for the same key. It will call after task4's async
        // block finished, so it will get the value insert by task4's async block.
        let task7 = {
            let cache7 = cache.clone();
            async move {
                // Wait for 450 ms before calling `get`.
                sleep(Duration::from_millis(450)).await;
                let maybe_v = cache7.get(&KEY);
                assert_eq!(maybe_v, Some("task4"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5, task6, task7);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn entry_by_ref_or_insert_with_if() {
    let _dog = watchdog(LIMIT, "entry_by_ref_or_insert_with_if");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: &u32 = &0;

        // This test will run seven async tasks:
        //
        // Task1 will be the first task to call `or_insert_with_if` for a key, so its
        // async block will be evaluated and then a &str value "task1" will be
        // inserted to the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `or_insert_with_if` immediately.
                let entry = cache1
                    .entry_by_ref(KEY)
                    .or_insert_with_if_async(
                        async {
                            // Wait for 300 ms and return a &str value.
                            sleep(Duration::from_millis(300)).await;
                            "task1"
                        },
                        |_v| unreachable!(),
                    )
                    .await;
                // Entry should be fresh because our async block should have been
                // evaluated.
                assert!(entry.is_fresh());
                assert_eq!(entry.into_value(), "task1");
            }
        };

        // Task2 will be the second task to call `or_insert_with_if` for the same
        // key, so its async block will not be evaluated. Once task1's async block
        // finishes, it will get the value inserted by task1's async block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `or_insert_with_if`.
                sleep(Duration::from_millis(100)).await;
                let entry = cache2
                    .entry_by_ref(KEY)
                    .or_insert_with_if_async(async { unreachable!() }, |_v| unreachable!())
                    .await;
                // Entry should not be fresh because task1's async block should have
                // been evaluated instead of ours.
                assert!(!entry.is_fresh());
                assert_eq!(entry.into_value(), "task1");
            }
        };

        // Task3 will be the third task to call `or_insert_with_if` for the same key.
        // By the time it calls, task1's async block should have finished already and
        // the value should be already inserted to the cache. Also task3's
        // `replace_if` closure returns `false`. So its async block will not be
        // evaluated and will get the value inserted by task1's async block
        // immediately.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 350 ms before calling `or_insert_with_if`.
                sleep(Duration::from_millis(350)).await;
                let entry = cache3
                    .entry_by_ref(KEY)
                    .or_insert_with_if_async(async { unreachable!() }, |v| {
                        assert_eq!(v, &"task1");
                        false
                    })
                    .await;
                assert!(!entry.is_fresh());
                assert_eq!(entry.into_value(), "task1");
            }
        };

        // Task4 will be the fourth task to call `or_insert_with_if` for the same
        // key. The value should have been already inserted to the cache by task1.
        // However task4's `replace_if` closure returns `true`. So its async block
        // will be evaluated to replace the current value.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 400 ms before calling `or_insert_with_if`.
                sleep(Duration::from_millis(400)).await;
                let entry = cache4
                    .entry_by_ref(KEY)
                    .or_insert_with_if_async(async { "task4" }, |v| {
                        assert_eq!(v, &"task1");
                        true
                    })
                    .await;
                assert!(entry.is_fresh());
                assert_eq!(entry.into_value(), "task4");
            }
        };

        // Task5 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache5.get(KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task6 will call `get` for the same key. It will call after task1's async
        // block finished, so it will get the value insert by task1's async block.
        let task6 = {
            let cache6 = cache.clone();
            async move {
                // Wait for 350 ms before calling `get`.
                sleep(Duration::from_millis(350)).await;
                let maybe_v = cache6.get(KEY);
                assert_eq!(maybe_v, Some("task1"));
            }
        };

        // Task7 will call `get` for the same key. It will call after task4's async
        // block finished, so it will get the value insert by task4's async block.
        let task7 = {
            let cache7 = cache.clone();
            async move {
                // Wait for 450 ms before calling `get`.
                sleep(Duration::from_millis(450)).await;
                let maybe_v = cache7.get(KEY);
                assert_eq!(maybe_v, Some("task4"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5, task6, task7);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn try_get_with() {
    let _dog = watchdog(LIMIT, "try_get_with");
    rt().block_on(async {
        use std::sync::Arc;

        // Note that MyError does not implement std::error::Error trait
        // like anyhow::Error.
        #[derive(Debug)]
        pub struct MyError(#[allow(dead_code)] String);

        type MyResult<T> = Result<T, Arc<MyError>>;

        let cache = Cache::new(100);
        const KEY: u32 = 0;

        // This test will run eight async tasks:
        //
        // Task1 will be the first task to call `get_with` for a key, so its async
        // block will be evaluated and then an error will be returned. Nothing will
        // be inserted to the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `try_get_with` immediately.
                let v = cache1
                    .try_get_with_async(KEY, async {
                        // Wait for 300 ms and return an error.
                        sleep(Duration::from_millis(300)).await;
                        Err(MyError("task1 error".into()))
                    })
                    .await;
                assert!(v.is_err());
            }
        };

        // Task2 will be the second task to call `get_with` for the same key, so its
        // async block will not be evaluated. Once task1's async block finishes, it
        // will get the same error value returned by task1's async block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `try_get_with`.
                sleep(Duration::from_millis(100)).await;
                let v: MyResult<_> = cache2
                    .try_get_with_async(KEY, async { unreachable!() })
                    .await;
                assert!(v.is_err());
            }
        };

        // Task3 will be the third task to call `get_with` for the same key. By the
        // time it calls, task1's async block should have finished already, but the
        // key still does not exist in the cache. So its async block will be
        // evaluated and then an okay &str value will be returned. That value will be
        // inserted to the cache.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 400 ms before calling `try_get_with`.
                sleep(Duration::from_millis(400)).await;
                let v: MyResult<_> = cache3
                    .try_get_with_async(KEY, async {
                        // Wait for 300 ms and return an Ok(&str) value.
                        sleep(Duration::from_millis(300)).await;
                        Ok("task3")
                    })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task4 will be the fourth task to call `get_with` for the same key. So its
        // async block will not be evaluated. Once task3's async block finishes, it
        // will get the same okay &str value.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 500 ms before calling `try_get_with`.
                sleep(Duration::from_millis(500)).await;
                let v: MyResult<_> = cache4
                    .try_get_with_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task5 will be the fifth task to call `get_with` for the same key. So its
        // async block will not be evaluated. By the time it calls, task3's async
        // block should have finished already, so its async block will not be
        // evaluated and will get the value insert by task3's async block
        // immediately.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 800 ms before calling `try_get_with`.
                sleep(Duration::from_millis(800)).await;
                let v: MyResult<_> = cache5
                    .try_get_with_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task6 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task6 = {
            let cache6 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache6.get(&KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task7 will call `get` for the same key. It will call after task1's async
        // block finished with an error. So it will get none for the key.
        let task7 = {
            let cache7 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400)).await;
                let maybe_v = cache7.get(&KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task8 will call `get` for the same key. It will call after task3's async
        // block finished, so it will get the value insert by task3's async block.
        let task8 = {
            let cache8 = cache.clone();
            async move {
                // Wait for 800 ms before calling `get`.
                sleep(Duration::from_millis(800)).await;
                let maybe_v = cache8.get(&KEY);
                assert_eq!(maybe_v, Some("task3"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5, task6, task7, task8);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn try_get_with_by_ref() {
    let _dog = watchdog(LIMIT, "try_get_with_by_ref");
    rt().block_on(async {
        use std::sync::Arc;

        // Note that MyError does not implement std::error::Error trait
        // like anyhow::Error.
        #[derive(Debug)]
        pub struct MyError(#[allow(dead_code)] String);

        type MyResult<T> = Result<T, Arc<MyError>>;

        let cache = Cache::new(100);
        const KEY: &u32 = &0;

        // This test will run eight async tasks:
        //
        // Task1 will be the first task to call `try_get_with_by_ref` for a key, so
        // its async block will be evaluated and then an error will be returned.
        // Nothing will be inserted to the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `try_get_with_by_ref` immediately.
                let v = cache1
                    .try_get_with_by_ref_async(KEY, async {
                        // Wait for 300 ms and return an error.
                        sleep(Duration::from_millis(300)).await;
                        Err(MyError("task1 error".into()))
                    })
                    .await;
                assert!(v.is_err());
            }
        };

        // Task2 will be the second task to call `get_with` for the same key, so its
        // async block will not be evaluated. Once task1's async block finishes, it
        // will get the same error value returned by task1's async block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `try_get_with_by_ref`.
                sleep(Duration::from_millis(100)).await;
                let v: MyResult<_> = cache2
                    .try_get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert!(v.is_err());
            }
        };

        // Task3 will be the third task to call `get_with` for the same key. By the
        // time it calls, task1's async block should have finished already, but the
        // key still does not exist in the cache. So its async block will be
        // evaluated and then an okay &str value will be returned. That value will be
        // inserted to the cache.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 400 ms before calling `try_get_with_by_ref`.
                sleep(Duration::from_millis(400)).await;
                let v: MyResult<_> = cache3
                    .try_get_with_by_ref_async(KEY, async {
                        // Wait for 300 ms and return an Ok(&str) value.
                        sleep(Duration::from_millis(300)).await;
                        Ok("task3")
                    })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task4 will be the fourth task to call `get_with` for the same key. So its
        // async block will not be evaluated. Once task3's async block finishes, it
        // will get the same okay &str value.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 500 ms before calling `try_get_with_by_ref`.
                sleep(Duration::from_millis(500)).await;
                let v: MyResult<_> = cache4
                    .try_get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task5 will be the fifth task to call `get_with` for the same key. So its
        // async block will not be evaluated. By the time it calls, task3's async
        // block should have finished already, so its async block will not be
        // evaluated and will get the value insert by task3's async block
        // immediately.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 800 ms before calling `try_get_with_by_ref`.
                sleep(Duration::from_millis(800)).await;
                let v: MyResult<_> = cache5
                    .try_get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task6 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task6 = {
            let cache6 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache6.get(KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task7 will call `get` for the same key. It will call after task1's async
        // block finished with an error. So it will get none for the key.
        let task7 = {
            let cache7 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400)).await;
                let maybe_v = cache7.get(KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task8 will call `get` for the same key. It will call after task3's async
        // block finished, so it will get the value insert by task3's async block.
        let task8 = {
            let cache8 = cache.clone();
            async move {
                // Wait for 800 ms before calling `get`.
                sleep(Duration::from_millis(800)).await;
                let maybe_v = cache8.get(KEY);
                assert_eq!(maybe_v, Some("task3"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5, task6, task7, task8);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn optionally_get_with() {
    let _dog = watchdog(LIMIT, "optionally_get_with");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: u32 = 0;

        // This test will run eight async tasks:
        //
        // Task1 will be the first task to call `optionally_get_with` for a key,
        // so its async block will be evaluated and then an None will be
        // returned. Nothing will be inserted to the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `try_get_with` immediately.
                let v = cache1
                    .optionally_get_with_async(KEY, async {
                        // Wait for 300 ms and return an None.
                        sleep(Duration::from_millis(300)).await;
                        None
                    })
                    .await;
                assert!(v.is_none());
            }
        };

        // Task2 will be the second task to call `optionally_get_with` for the same
        // key, so its async block will not be evaluated. Once task1's async block
        // finishes, it will get the same error value returned by task1's async
        // block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(100)).await;
                let v = cache2
                    .optionally_get_with_async(KEY, async { unreachable!() })
                    .await;
                assert!(v.is_none());
            }
        };

        // Task3 will be the third task to call `optionally_get_with` for the
        // same key. By the time it calls, task1's async block should have
        // finished already, but the key still does not exist in the cache. So
        // its async block will be evaluated and then an okay &str value will be
        // returned. That value will be inserted to the cache.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 400 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(400)).await;
                let v = cache3
                    .optionally_get_with_async(KEY, async {
                        // Wait for 300 ms and return an Some(&str) value.
                        sleep(Duration::from_millis(300)).await;
                        Some("task3")
                    })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task4 will be the fourth task to call `optionally_get_with` for the
        // same key. So its async block will not be evaluated. Once task3's
        // async block finishes, it will get the same okay &str value.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 500 ms before calling `try_get_with`.
                sleep(Duration::from_millis(500)).await;
                let v = cache4
                    .optionally_get_with_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task5 will be the fifth task to call `optionally_get_with` for the
        // same key. So its async block will not be evaluated. By the time it
        // calls, task3's async block should have finished already, so its async
        // block will not be evaluated and will get the value insert by task3's
        // async block immediately.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 800 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(800)).await;
                let v = cache5
                    .optionally_get_with_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task6 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task6 = {
            let cache6 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache6.get(&KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task7 will call `get` for the same key. It will call after task1's async
        // block finished with an error. So it will get none for the key.
        let task7 = {
            let cache7 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400)).await;
                let maybe_v = cache7.get(&KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task8 will call `get` for the same key. It will call after task3's async
        // block finished, so it will get the value insert by task3's async block.
        let task8 = {
            let cache8 = cache.clone();
            async move {
                // Wait for 800 ms before calling `get`.
                sleep(Duration::from_millis(800)).await;
                let maybe_v = cache8.get(&KEY);
                assert_eq!(maybe_v, Some("task3"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5, task6, task7, task8);
    })
}

#[test]
fn optionally_get_with_by_ref() {
    let _dog = watchdog(LIMIT, "optionally_get_with_by_ref");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: &u32 = &0;

        // This test will run eight async tasks:
        //
        // Task1 will be the first task to call `optionally_get_with_by_ref` for a
        // key, so its async block will be evaluated and then an None will be
        // returned. Nothing will be inserted to the cache.
        let task1 = {
            let cache1 = cache.clone();
            async move {
                // Call `try_get_with` immediately.
                let v = cache1
                    .optionally_get_with_by_ref_async(KEY, async {
                        // Wait for 300 ms and return an None.
                        sleep(Duration::from_millis(300)).await;
                        None
                    })
                    .await;
                assert!(v.is_none());
            }
        };

        // Task2 will be the second task to call `optionally_get_with_by_ref` for the
        // same key, so its async block will not be evaluated. Once task1's async
        // block finishes, it will get the same error value returned by task1's async
        // block.
        let task2 = {
            let cache2 = cache.clone();
            async move {
                // Wait for 100 ms before calling `optionally_get_with_by_ref`.
                sleep(Duration::from_millis(100)).await;
                let v = cache2
                    .optionally_get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert!(v.is_none());
            }
        };

        // Task3 will be the third task to call `optionally_get_with_by_ref` for the
        // same key. By the time it calls, task1's async block should have
        // finished already, but the key still does not exist in the cache. So
        // its async block will be evaluated and then an okay &str value will be
        // returned. That value will be inserted to the cache.
        let task3 = {
            let cache3 = cache.clone();
            async move {
                // Wait for 400 ms before calling `optionally_get_with_by_ref`.
                sleep(Duration::from_millis(400)).await;
                let v = cache3
                    .optionally_get_with_by_ref_async(KEY, async {
                        // Wait for 300 ms and return an Some(&str) value.
                        sleep(Duration::from_millis(300)).await;
                        Some("task3")
                    })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task4 will be the fourth task to call `optionally_get_with_by_ref` for the
        // same key. So its async block will not be evaluated. Once task3's
        // async block finishes, it will get the same okay &str value.
        let task4 = {
            let cache4 = cache.clone();
            async move {
                // Wait for 500 ms before calling `try_get_with`.
                sleep(Duration::from_millis(500)).await;
                let v = cache4
                    .optionally_get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task5 will be the fifth task to call `optionally_get_with_by_ref` for the
        // same key. So its async block will not be evaluated. By the time it
        // calls, task3's async block should have finished already, so its async
        // block will not be evaluated and will get the value insert by task3's
        // async block immediately.
        let task5 = {
            let cache5 = cache.clone();
            async move {
                // Wait for 800 ms before calling `optionally_get_with_by_ref`.
                sleep(Duration::from_millis(800)).await;
                let v = cache5
                    .optionally_get_with_by_ref_async(KEY, async { unreachable!() })
                    .await;
                assert_eq!(v.unwrap(), "task3");
            }
        };

        // Task6 will call `get` for the same key. It will call when task1's async
        // block is still running, so it will get none for the key.
        let task6 = {
            let cache6 = cache.clone();
            async move {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200)).await;
                let maybe_v = cache6.get(KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task7 will call `get` for the same key. It will call after task1's async
        // block finished with an error. So it will get none for the key.
        let task7 = {
            let cache7 = cache.clone();
            async move {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400)).await;
                let maybe_v = cache7.get(KEY);
                assert!(maybe_v.is_none());
            }
        };

        // Task8 will call `get` for the same key. It will call after task3's async
        // block finished, so it will get the value insert by task3's async block.
        let task8 = {
            let cache8 = cache.clone();
            async move {
                // Wait for 800 ms before calling `get`.
                sleep(Duration::from_millis(800)).await;
                let maybe_v = cache8.get(KEY);
                assert_eq!(maybe_v, Some("task3"));
            }
        };

        join_tasks!(task1, task2, task3, task4, task5, task6, task7, task8);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn upsert_with() {
    let _dog = watchdog(LIMIT, "upsert_with");
    rt().block_on(async {
        let cache = Cache::new(100);
        const KEY: u32 = 0;

        // Spawn three async tasks to call `and_upsert_with` for the same key and
        // each task increments the current value by 1. Ensure the key-level lock is
        // working by verifying the value is 3 after all tasks finish.
        //
        // |        |  task 1  |  task 2  |  task 3  |
        // |--------|----------|----------|----------|
        // |   0 ms | get none |          |          |
        // | 100 ms |          | blocked  |          |
        // | 200 ms | insert 1 |          |          |
        // |        |          | get 1    |          |
        // | 300 ms |          |          | blocked  |
        // | 400 ms |          | insert 2 |          |
        // |        |          |          | get 2    |
        // | 500 ms |          |          | insert 3 |

        let task1 = {
            let cache1 = cache.clone();
            async move {
                cache1
                    .entry(KEY)
                    .and_upsert_with_async(|maybe_entry| async move {
                        sleep(Duration::from_millis(200)).await;
                        assert!(maybe_entry.is_none());
                        1
                    })
                    .await
            }
        };

        let task2 = {
            let cache2 = cache.clone();
            async move {
                sleep(Duration::from_millis(100)).await;
                cache2
                    .entry_by_ref(&KEY)
                    .and_upsert_with_async(|maybe_entry| async move {
                        sleep(Duration::from_millis(200)).await;
                        let entry = maybe_entry.expect("The entry should exist");
                        entry.into_value() + 1
                    })
                    .await
            }
        };

        let task3 = {
            let cache3 = cache.clone();
            async move {
                sleep(Duration::from_millis(300)).await;
                cache3
                    .entry_by_ref(&KEY)
                    .and_upsert_with_async(|maybe_entry| async move {
                        sleep(Duration::from_millis(100)).await;
                        let entry = maybe_entry.expect("The entry should exist");
                        entry.into_value() + 1
                    })
                    .await
            }
        };

        let (ent1, ent2, ent3) = join_tasks!(task1, task2, task3);
        assert_eq!(ent1.into_value(), 1);
        assert_eq!(ent2.into_value(), 2);
        assert_eq!(ent3.into_value(), 3);

        assert_eq!(cache.get(&KEY), Some(3));

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn compute_with() {
    let _dog = watchdog(LIMIT, "compute_with");
    rt().block_on(async {
        use tokio::sync::RwLock;

        let cache = Cache::new(100);
        const KEY: u32 = 0;

        // Spawn six async tasks to call `and_compute_with` for the same key. Ensure
        // the key-level lock is working by verifying the value after all tasks
        // finish.
        //
        // |         |   task 1   |    task 2     |   task 3   |  task 4  |   task 5   | task 6  |
        // |---------|------------|---------------|------------|----------|------------|---------|
        // |    0 ms | get none   |               |            |          |            |         |
        // |  100 ms |            | blocked       |            |          |            |         |
        // |  200 ms | insert [1] |               |            |          |            |         |
        // |         |            | get [1]       |            |          |            |         |
        // |  300 ms |            |               | blocked    |          |            |         |
        // |  400 ms |            | insert [1, 2] |            |          |            |         |
        // |         |            |               | get [1, 2] |          |            |         |
        // |  500 ms |            |               |            | blocked  |            |         |
        // |  600 ms |            |               | remove     |          |            |         |
        // |         |            |               |            | get none |            |         |
        // |  700 ms |            |               |            |          | blocked    |         |
        // |  800 ms |            |               |            | nop      |            |         |
        // |         |            |               |            |          | get none   |         |
        // |  900 ms |            |               |            |          |            | blocked |
        // | 1000 ms |            |               |            |          | insert [5] |         |
        // |         |            |               |            |          |            | get [5] |
        // | 1100 ms |            |               |            |          |            | nop     |

        let task1 = {
            let cache1 = cache.clone();
            async move {
                cache1
                    .entry(KEY)
                    .and_compute_with_async(|maybe_entry| async move {
                        sleep(Duration::from_millis(200)).await;
                        assert!(maybe_entry.is_none());
                        Op::Put(Arc::new(RwLock::new(vec![1])))
                    })
                    .await
            }
        };

        let task2 = {
            let cache2 = cache.clone();
            async move {
                sleep(Duration::from_millis(100)).await;
                cache2
                    .entry_by_ref(&KEY)
                    .and_compute_with_async(|maybe_entry| async move {
                        let entry = maybe_entry.expect("The entry should exist");
                        let value = entry.into_value();
                        assert_eq!(*value.read().await, vec![1]);
                        sleep(Duration::from_millis(200)).await;
                        value.write().await.push(2);
                        Op::Put(value)
                    })
                    .await
            }
        };

        let task3 = {
            let cache3 = cache.clone();
            async move {
                sleep(Duration::from_millis(300)).await;
                cache3
                    .entry(KEY)
                    .and_compute_with_async(|maybe_entry| async move {
                        let entry = maybe_entry.expect("The entry should exist");
                        let value = entry.into_value();
                        assert_eq!(*value.read().await, vec![1, 2]);
                        sleep(Duration::from_millis(200)).await;
                        Op::Remove
                    })
                    .await
            }
        };

        let task4 = {
            let cache4 = cache.clone();
            async move {
                sleep(Duration::from_millis(500)).await;
                cache4
                    .entry(KEY)
                    .and_compute_with_async(|maybe_entry| async move {
                        assert!(maybe_entry.is_none());
                        sleep(Duration::from_millis(200)).await;
                        Op::Nop
                    })
                    .await
            }
        };

        let task5 = {
            let cache5 = cache.clone();
            async move {
                sleep(Duration::from_millis(700)).await;
                cache5
                    .entry_by_ref(&KEY)
                    .and_compute_with_async(|maybe_entry| async move {
                        assert!(maybe_entry.is_none());
                        sleep(Duration::from_millis(200)).await;
                        Op::Put(Arc::new(RwLock::new(vec![5])))
                    })
                    .await
            }
        };

        let task6 = {
            let cache6 = cache.clone();
            async move {
                sleep(Duration::from_millis(900)).await;
                cache6
                    .entry_by_ref(&KEY)
                    .and_compute_with_async(|maybe_entry| async move {
                        let entry = maybe_entry.expect("The entry should exist");
                        let value = entry.into_value();
                        assert_eq!(*value.read().await, vec![5]);
                        sleep(Duration::from_millis(100)).await;
                        Op::Nop
                    })
                    .await
            }
        };

        let (res1, res2, res3, res4, res5, res6) =
            join_tasks!(task1, task2, task3, task4, task5, task6);

        let CompResult::Inserted(entry) = res1 else {
            panic!("Expected `Inserted`. Got {res1:?}")
        };
        assert_eq!(
            *entry.into_value().read().await,
            vec![1, 2] // The same Vec was modified by task2.
        );

        let CompResult::ReplacedWith(entry) = res2 else {
            panic!("Expected `ReplacedWith`. Got {res2:?}")
        };
        assert_eq!(*entry.into_value().read().await, vec![1, 2]);

        let CompResult::Removed(entry) = res3 else {
            panic!("Expected `Removed`. Got {res3:?}")
        };
        assert_eq!(*entry.into_value().read().await, vec![1, 2]);

        let CompResult::StillNone(key) = res4 else {
            panic!("Expected `StillNone`. Got {res4:?}")
        };
        assert_eq!(key, KEY);

        let CompResult::Inserted(entry) = res5 else {
            panic!("Expected `Inserted`. Got {res5:?}")
        };
        assert_eq!(*entry.into_value().read().await, vec![5]);

        let CompResult::Unchanged(entry) = res6 else {
            panic!("Expected `Unchanged`. Got {res6:?}")
        };
        assert_eq!(*entry.into_value().read().await, vec![5]);

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn try_compute_with() {
    let _dog = watchdog(LIMIT, "try_compute_with");
    rt().block_on(async {
        use tokio::sync::RwLock;

        let cache: Cache<u32, Arc<RwLock<Vec<i32>>>> = Cache::new(100);
        const KEY: u32 = 0;

        // Spawn four async tasks to call `and_try_compute_with` for the same key.
        // Ensure the key-level lock is working by verifying the value after all
        // tasks finish.
        //
        // |         |   task 1   |    task 2     |   task 3   |  task 4    |
        // |---------|------------|---------------|------------|------------|
        // |    0 ms | get none   |               |            |            |
        // |  100 ms |            | blocked       |            |            |
        // |  200 ms | insert [1] |               |            |            |
        // |         |            | get [1]       |            |            |
        // |  300 ms |            |               | blocked    |            |
        // |  400 ms |            | insert [1, 2] |            |            |
        // |         |            |               | get [1, 2] |            |
        // |  500 ms |            |               |            | blocked    |
        // |  600 ms |            |               | err        |            |
        // |         |            |               |            | get [1, 2] |
        // |  700 ms |            |               |            | remove     |
        //
        // This test is shorter than `compute_with` test because this one omits `Nop`
        // cases.

        let task1 = {
            let cache1 = cache.clone();
            async move {
                cache1
                    .entry(KEY)
                    .and_try_compute_with_async(|maybe_entry| async move {
                        sleep(Duration::from_millis(200)).await;
                        assert!(maybe_entry.is_none());
                        Ok(Op::Put(Arc::new(RwLock::new(vec![1])))) as Result<_, ()>
                    })
                    .await
            }
        };

        let task2 = {
            let cache2 = cache.clone();
            async move {
                sleep(Duration::from_millis(100)).await;
                cache2
                    .entry_by_ref(&KEY)
                    .and_try_compute_with_async(|maybe_entry| async move {
                        let entry = maybe_entry.expect("The entry should exist");
                        let value = entry.into_value();
                        assert_eq!(*value.read().await, vec![1]);
                        sleep(Duration::from_millis(200)).await;
                        value.write().await.push(2);
                        Ok(Op::Put(value)) as Result<_, ()>
                    })
                    .await
            }
        };

        let task3 = {
            let cache3 = cache.clone();
            async move {
                sleep(Duration::from_millis(300)).await;
                cache3
                    .entry(KEY)
                    .and_try_compute_with_async(|maybe_entry| async move {
                        let entry = maybe_entry.expect("The entry should exist");
                        let value = entry.into_value();
                        assert_eq!(*value.read().await, vec![1, 2]);
                        sleep(Duration::from_millis(200)).await;
                        Err(())
                    })
                    .await
            }
        };

        let task4 = {
            let cache4 = cache.clone();
            async move {
                sleep(Duration::from_millis(500)).await;
                cache4
                    .entry(KEY)
                    .and_try_compute_with_async(|maybe_entry| async move {
                        let entry = maybe_entry.expect("The entry should exist");
                        let value = entry.into_value();
                        assert_eq!(*value.read().await, vec![1, 2]);
                        sleep(Duration::from_millis(100)).await;
                        Ok(Op::Remove) as Result<_, ()>
                    })
                    .await
            }
        };

        let (res1, res2, res3, res4) = join_tasks!(task1, task2, task3, task4);

        let Ok(CompResult::Inserted(entry)) = res1 else {
            panic!("Expected `Inserted`. Got {res1:?}")
        };
        assert_eq!(
            *entry.into_value().read().await,
            vec![1, 2] // The same Vec was modified by task2.
        );

        let Ok(CompResult::ReplacedWith(entry)) = res2 else {
            panic!("Expected `ReplacedWith`. Got {res2:?}")
        };
        assert_eq!(*entry.into_value().read().await, vec![1, 2]);

        assert!(res3.is_err());

        let Ok(CompResult::Removed(entry)) = res4 else {
            panic!("Expected `Removed`. Got {res4:?}")
        };
        assert_eq!(
            *entry.into_value().read().await,
            vec![1, 2] // Removed value.
        );

        assert!(no_loads_in_flight(&cache));
    })
}

// https://github.com/moka-rs/moka/issues/43
#[test]
fn handle_panic_in_get_with() {
    let _dog = watchdog(LIMIT, "handle_panic_in_get_with");
    rt().block_on(async {
        use tokio::time::{sleep, Duration};

        let cache = Cache::new(16);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        {
            let cache_ref = cache.clone();
            let semaphore_ref = semaphore.clone();
            tokio::task::spawn(async move {
                let _ = cache_ref
                    .get_with_async(1, async move {
                        semaphore_ref.add_permits(1);
                        sleep(Duration::from_millis(50)).await;
                        panic!("Panic during try_get_with");
                    })
                    .await;
            });
        }
        let _ = semaphore.acquire().await.expect("semaphore acquire failed");
        assert_eq!(cache.get_with_async(1, async { 5 }).await, 5);
    })
}

// https://github.com/moka-rs/moka/issues/43
#[test]
fn handle_panic_in_try_get_with() {
    let _dog = watchdog(LIMIT, "handle_panic_in_try_get_with");
    rt().block_on(async {
        use tokio::time::{sleep, Duration};

        let cache = Cache::new(16);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        {
            let cache_ref = cache.clone();
            let semaphore_ref = semaphore.clone();
            tokio::task::spawn(async move {
                let _ = cache_ref
                    .try_get_with_async(1, async move {
                        semaphore_ref.add_permits(1);
                        sleep(Duration::from_millis(50)).await;
                        panic!("Panic during try_get_with");
                    })
                    .await as Result<_, Arc<Infallible>>;
            });
        }
        let _ = semaphore.acquire().await.expect("semaphore acquire failed");
        assert_eq!(
            cache.try_get_with_async(1, async { Ok(5) }).await as Result<_, Arc<Infallible>>,
            Ok(5)
        );

        assert!(no_loads_in_flight(&cache));
    })
}

// https://github.com/moka-rs/moka/issues/59
#[test]
fn abort_get_with() {
    let _dog = watchdog(LIMIT, "abort_get_with");
    rt().block_on(async {
        use tokio::time::{sleep, Duration};

        let cache = Cache::new(16);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));

        let handle;
        {
            let cache_ref = cache.clone();
            let semaphore_ref = semaphore.clone();

            handle = tokio::task::spawn(async move {
                let _ = cache_ref
                    .get_with_async(1, async move {
                        semaphore_ref.add_permits(1);
                        sleep(Duration::from_millis(50)).await;
                        unreachable!();
                    })
                    .await;
            });
        }

        let _ = semaphore.acquire().await.expect("semaphore acquire failed");
        handle.abort();

        assert_eq!(cache.get_with_async(1, async { 5 }).await, 5);

        assert!(no_loads_in_flight(&cache));
    })
}

// https://github.com/moka-rs/moka/issues/59
#[test]
fn abort_try_get_with() {
    let _dog = watchdog(LIMIT, "abort_try_get_with");
    rt().block_on(async {
        use tokio::time::{sleep, Duration};

        let cache = Cache::new(16);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));

        let handle;
        {
            let cache_ref = cache.clone();
            let semaphore_ref = semaphore.clone();

            handle = tokio::task::spawn(async move {
                let _ = cache_ref
                    .try_get_with_async(1, async move {
                        semaphore_ref.add_permits(1);
                        sleep(Duration::from_millis(50)).await;
                        unreachable!();
                    })
                    .await as Result<_, Arc<Infallible>>;
            });
        }

        let _ = semaphore.acquire().await.expect("semaphore acquire failed");
        handle.abort();

        assert_eq!(
            cache.try_get_with_async(1, async { Ok(5) }).await as Result<_, Arc<Infallible>>,
            Ok(5)
        );

        assert!(no_loads_in_flight(&cache));
    })
}

#[test]
fn test_removal_notifications() {
    let _dog = watchdog(LIMIT, "test_removal_notifications");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(3)
            .eviction_listener(listener)
            .build();

        cache.insert('a', "alice");
        cache.invalidate(&'a');
        expected.push((Arc::new('a'), "alice", RemovalCause::Explicit));

        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);

        cache.insert('b', "bob");
        cache.insert('c', "cathy");
        cache.insert('d', "david");
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 3);

        // This will be rejected due to the size constraint.
        cache.insert('e', "emily");
        expected.push((Arc::new('e'), "emily", RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 3);

        // Raise the popularity of 'e' so it will be accepted next time.
        cache.get(&'e');
        cache.run_pending_tasks();

        // Retry.
        cache.insert('e', "eliza");
        // and the LRU entry will be evicted.
        expected.push((Arc::new('b'), "bob", RemovalCause::Size));
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 3);

        // Replace an existing entry.
        cache.insert('d', "dennis");
        expected.push((Arc::new('d'), "david", RemovalCause::Replaced));
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 3);

        verify_notification_vec(&cache, actual, &expected);
    })
}

// HERDCACHE (fails): documented difference: a `get` that finds an expired entry reclaims it (`CacheBuilder::eviction_listener` docs, src/builder.rs: "a `get` that reclaimed an expired entry"): entry_count() is 0, not 1. Same as test_immediate_removal_notifications_with_updates in moka_port_sync.rs.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn test_removal_notifications_with_updates() {
    let _dog = watchdog(LIMIT, "test_removal_notifications_with_updates");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        let (clock, mock) = mock_clock();

        // Create a cache with the eviction listener and also TTL and TTI.
        let mut cache = Cache::builder()
            .max_capacity(UNBOUNDED) // moka: unbounded
            .eviction_listener(listener)
            .time_to_live(Duration::from_secs(7))
            .time_to_idle(Duration::from_secs(5))
            .clock(clock)
            .build();

        cache.insert("alice", "a0");
        cache.run_pending_tasks();

        // Now alice (a0) has been expired by the idle timeout (TTI).
        mock.advance(Duration::from_secs(6));
        expected.push((Arc::new("alice"), "a0", RemovalCause::Expired));
        assert_eq!(cache.get(&"alice"), None);

        // We have not ran sync after the expiration of alice (a0), so it is
        // still in the cache.
        assert_eq!(cache.entry_count(), 1);

        // Re-insert alice with a different value. Since alice (a0) is still
        // in the cache, this is actually a replace operation rather than an
        // insert operation. We want to verify that the RemovalCause of a0 is
        // Expired, not Replaced.
        cache.insert("alice", "a1");
        cache.run_pending_tasks();

        mock.advance(Duration::from_secs(4));
        assert_eq!(cache.get(&"alice"), Some("a1"));
        cache.run_pending_tasks();

        // Now alice has been expired by time-to-live (TTL).
        mock.advance(Duration::from_secs(4));
        expected.push((Arc::new("alice"), "a1", RemovalCause::Expired));
        assert_eq!(cache.get(&"alice"), None);

        // But, again, it is still in the cache.
        assert_eq!(cache.entry_count(), 1);

        // Re-insert alice with a different value and verify that the
        // RemovalCause of a1 is Expired (not Replaced).
        cache.insert("alice", "a2");
        cache.run_pending_tasks();

        assert_eq!(cache.entry_count(), 1);

        // Now alice (a2) has been expired by the idle timeout.
        mock.advance(Duration::from_secs(6));
        expected.push((Arc::new("alice"), "a2", RemovalCause::Expired));
        assert_eq!(cache.get(&"alice"), None);
        assert_eq!(cache.entry_count(), 1);

        // This invalidate will internally remove alice (a2).
        cache.invalidate(&"alice");
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);

        // Re-insert, and this time, make it expired by the TTL.
        cache.insert("alice", "a3");
        cache.run_pending_tasks();
        mock.advance(Duration::from_secs(4));
        assert_eq!(cache.get(&"alice"), Some("a3"));
        cache.run_pending_tasks();
        mock.advance(Duration::from_secs(4));
        expected.push((Arc::new("alice"), "a3", RemovalCause::Expired));
        assert_eq!(cache.get(&"alice"), None);
        assert_eq!(cache.entry_count(), 1);

        // This invalidate will internally remove alice (a2).
        cache.invalidate(&"alice");
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);

        verify_notification_vec(&cache, actual, &expected);
    })
}

// When the eviction listener is not set, calling `run_pending_tasks` once should
// evict all entries that can be removed.
// HERDCACHE (fails): documented difference: "The bound holds when insert returns" (README, "Coming from moka"): entry_count() is exact at once, old keys are evicted inside insert.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn no_batch_size_limit_on_eviction() {
    let _dog = watchdog(LIMIT, "no_batch_size_limit_on_eviction");
    rt().block_on(async {
        const MAX_CAPACITY: u64 = 20;

        const EVICTION_TIMEOUT: Duration = Duration::from_nanos(0);
        const MAX_LOG_SYNC_REPEATS: u32 = 1;
        const EVICTION_BATCH_SIZE: u32 = 1;

        // MOKA-INTERNAL: `HousekeeperConfig` / `.housekeeper_config(hk_conf)` dropped.

        // Create a cache with the LRU policy.
        let mut cache = Cache::builder()
            .max_capacity(MAX_CAPACITY)
            .eviction_policy(EvictionPolicy::lru())
            .build();

        // Fill the cache.
        for i in 0..MAX_CAPACITY {
            let v = format!("v{i}");
            cache.insert(i, v)
        }
        // The max capacity should not change because we have not called
        // `run_pending_tasks` yet.
        assert_eq!(cache.entry_count(), 0);

        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), MAX_CAPACITY);

        // Insert more items to the cache.
        for i in MAX_CAPACITY..(MAX_CAPACITY * 2) {
            let v = format!("v{i}");
            cache.insert(i, v)
        }
        // The max capacity should not change because we have not called
        // `run_pending_tasks` yet.
        assert_eq!(cache.entry_count(), MAX_CAPACITY);
        // Both old and new keys should exist.
        assert!(cache.contains_key(&0)); // old
        assert!(cache.contains_key(&(MAX_CAPACITY - 1))); // old
        assert!(cache.contains_key(&(MAX_CAPACITY * 2 - 1))); // new

        // Process the remaining write op logs (there should be MAX_CAPACITY logs),
        // and evict the LRU entries.
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), MAX_CAPACITY);

        // Now all the old keys should be gone.
        assert!(!cache.contains_key(&0));
        assert!(!cache.contains_key(&(MAX_CAPACITY - 1)));
        // And the new keys should exist.
        assert!(cache.contains_key(&(MAX_CAPACITY * 2 - 1)));
    })
}

// HERDCACHE (fails): documented difference: as no_batch_size_limit_on_eviction (eviction is inline; moka's housekeeper batching/timeout does not exist).
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn slow_eviction_listener() {
    let _dog = watchdog(LIMIT, "slow_eviction_listener");
    rt().block_on(async {
        const MAX_CAPACITY: u64 = 20;

        const EVICTION_TIMEOUT: Duration = Duration::from_millis(30);
        const LISTENER_DELAY: Duration = Duration::from_millis(11);
        const MAX_LOG_SYNC_REPEATS: u32 = 1;
        const EVICTION_BATCH_SIZE: u32 = 1;

        // MOKA-INTERNAL: `HousekeeperConfig` / `.housekeeper_config(hk_conf)` dropped.

        let (clock, mock) = mock_clock();
        let listener_call_count = Arc::new(AtomicU8::new(0));
        let lcc = Arc::clone(&listener_call_count);

        // A slow eviction listener that spend `LISTENER_DELAY` to process a removal
        // notification.
        let listener = move |_k: &u64, _v: &String, _cause| {
            mock.advance(LISTENER_DELAY);
            lcc.fetch_add(1, Ordering::AcqRel);
        };

        // Create a cache with the LRU policy.
        let mut cache = Cache::builder()
            .max_capacity(MAX_CAPACITY)
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(listener)
            .clock(clock)
            .build();

        // Fill the cache.
        for i in 0..MAX_CAPACITY {
            let v = format!("v{i}");
            cache.insert(i, v)
        }
        // The max capacity should not change because we have not called
        // `run_pending_tasks` yet.
        assert_eq!(cache.entry_count(), 0);

        cache.run_pending_tasks();
        assert_eq!(listener_call_count.load(Ordering::Acquire), 0);
        assert_eq!(cache.entry_count(), MAX_CAPACITY);

        // Insert more items to the cache.
        for i in MAX_CAPACITY..(MAX_CAPACITY * 2) {
            let v = format!("v{i}");
            cache.insert(i, v)
        }
        assert_eq!(cache.entry_count(), MAX_CAPACITY);

        cache.run_pending_tasks();
        // Because of the slow listener, cache should get an over capacity.
        let mut expected_call_count = 3;
        assert_eq!(
            listener_call_count.load(Ordering::Acquire) as u64,
            expected_call_count
        );
        assert_eq!(cache.entry_count(), MAX_CAPACITY * 2 - expected_call_count);

        loop {
            cache.run_pending_tasks();

            expected_call_count += 3;
            if expected_call_count > MAX_CAPACITY {
                expected_call_count = MAX_CAPACITY;
            }

            let actual_count = listener_call_count.load(Ordering::Acquire) as u64;
            assert_eq!(actual_count, expected_call_count);
            let expected_entry_count = MAX_CAPACITY * 2 - expected_call_count;
            assert_eq!(cache.entry_count(), expected_entry_count);

            if expected_call_count >= MAX_CAPACITY {
                break;
            }
        }

        assert_eq!(cache.entry_count(), MAX_CAPACITY);
    })
}

// NOTE: To enable the panic logging, run the following command:
//
// RUST_LOG=moka=info cargo test --features 'future, logging' -- \
//   future::cache::tests::recover_from_panicking_eviction_listener --exact --nocapture
//
// HERDCACHE (fails): documented difference: "A panicking eviction listener panics its caller" (README, "Coming from moka").
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn recover_from_panicking_eviction_listener() {
    let _dog = watchdog(LIMIT, "recover_from_panicking_eviction_listener");
    rt().block_on(async {
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener that panics when it see
        // a value "panic now!".
        let a1 = Arc::clone(&actual);
        let listener = move |k: &&'static str, v: &&'static str, cause| {
            if *v == "panic now!" {
                panic!("Panic now!");
            }
            a1.lock().push((Arc::new(*k), *v, cause))
        };

        // Create a cache with the eviction listener.
        let mut cache = Cache::builder()
            .max_capacity(UNBOUNDED) // moka: unbounded
            .name("My Future Cache")
            .eviction_listener(listener)
            .build();

        // Insert an okay value.
        cache.insert("alice", "a0");
        cache.run_pending_tasks();

        // Insert a value that will cause the eviction listener to panic.
        cache.insert("alice", "panic now!");
        expected.push((Arc::new("alice"), "a0", RemovalCause::Replaced));
        cache.run_pending_tasks();

        // Insert an okay value. This will replace the previous
        // value "panic now!" so the eviction listener will panic.
        cache.insert("alice", "a2");
        cache.run_pending_tasks();
        // No more removal notification should be sent.

        // Invalidate the okay value.
        cache.invalidate(&"alice");
        cache.run_pending_tasks();

        verify_notification_vec(&cache, actual, &expected);
    })
}

// This test ensures that the `contains_key`, `get` and `invalidate` can use
// borrowed form `&[u8]` for key with type `Vec<u8>`.
// https://github.com/moka-rs/moka/issues/166
#[test]
fn borrowed_forms_of_key() {
    let _dog = watchdog(LIMIT, "borrowed_forms_of_key");
    rt().block_on(async {
        let cache: Cache<Vec<u8>, ()> = Cache::new(1);

        let key = vec![1_u8];
        cache.insert(key.clone(), ());

        // key as &Vec<u8>
        let key_v: &Vec<u8> = &key;
        assert!(cache.contains_key(key_v));
        assert_eq!(cache.get(key_v), Some(()));
        cache.invalidate(key_v);

        cache.insert(key, ());

        // key as &[u8]
        let key_s: &[u8] = &[1_u8];
        assert!(cache.contains_key(key_s));
        assert_eq!(cache.get(key_s), Some(()));
        cache.invalidate(key_s);
    })
}

#[test]
fn drop_value_immediately_after_eviction() {
    let _dog = watchdog(LIMIT, "drop_value_immediately_after_eviction");
    rt().block_on(async {
        const MAX_CAPACITY: u32 = 500;
        const KEYS: u32 = ((MAX_CAPACITY as f64) * 1.2) as u32;

        let counters = Arc::new(Counters::default());
        let counters1 = Arc::clone(&counters);

        let listener = move |_k: &u32, _v: &Arc<Value>, cause| match cause {
            RemovalCause::Size => counters1.incl_evicted(),
            RemovalCause::Explicit => counters1.incl_invalidated(),
            _ => (),
        };

        let mut cache = Cache::builder()
            .max_capacity(MAX_CAPACITY as u64)
            .eviction_listener(listener)
            .build();

        for key in 0..KEYS {
            let value = Arc::new(Value::new(vec![0u8; 1024], &counters));
            cache.insert(key, value);
            counters.incl_inserted();
            cache.run_pending_tasks();
        }

        let eviction_count = KEYS - MAX_CAPACITY;

        // Retries will be needed when testing in a QEMU VM.
        const MAX_RETRIES: usize = 5;
        let mut retries = 0;
        loop {
            // Ensure all scheduled notifications have been processed.
            std::thread::sleep(Duration::from_millis(500));

            if counters.evicted() != eviction_count || counters.value_dropped() != eviction_count {
                if retries <= MAX_RETRIES {
                    retries += 1;
                    cache.run_pending_tasks();
                    continue;
                } else {
                    assert_eq!(counters.evicted(), eviction_count, "Retries exhausted");
                    assert_eq!(
                        counters.value_dropped(),
                        eviction_count,
                        "Retries exhausted"
                    );
                }
            }

            assert_eq!(counters.inserted(), KEYS, "inserted");
            assert_eq!(counters.value_created(), KEYS, "value_created");
            assert_eq!(counters.evicted(), eviction_count, "evicted");
            assert_eq!(counters.invalidated(), 0, "invalidated");
            assert_eq!(counters.value_dropped(), eviction_count, "value_dropped");

            break;
        }

        for key in 0..KEYS {
            cache.invalidate(&key);
            cache.run_pending_tasks();
        }

        let mut retries = 0;
        loop {
            // Ensure all scheduled notifications have been processed.
            std::thread::sleep(Duration::from_millis(500));

            if counters.invalidated() != MAX_CAPACITY || counters.value_dropped() != KEYS {
                if retries <= MAX_RETRIES {
                    retries += 1;
                    cache.run_pending_tasks();
                    continue;
                } else {
                    assert_eq!(counters.invalidated(), MAX_CAPACITY, "Retries exhausted");
                    assert_eq!(counters.value_dropped(), KEYS, "Retries exhausted");
                }
            }

            assert_eq!(counters.inserted(), KEYS, "inserted");
            assert_eq!(counters.value_created(), KEYS, "value_created");
            assert_eq!(counters.evicted(), eviction_count, "evicted");
            assert_eq!(counters.invalidated(), MAX_CAPACITY, "invalidated");
            assert_eq!(counters.value_dropped(), KEYS, "value_dropped");

            break;
        }

        std::mem::drop(cache);
        assert_eq!(counters.value_dropped(), KEYS, "value_dropped");
    })
}

// https://github.com/moka-rs/moka/issues/383
#[test]
fn ensure_gc_runs_when_dropping_cache() {
    let _dog = watchdog(LIMIT, "ensure_gc_runs_when_dropping_cache");
    rt().block_on(async {
        let cache = Cache::builder().max_capacity(UNBOUNDED).build(); // moka: unbounded
        let val = Arc::new(0);
        cache
            .get_with_async(1, std::future::ready(Arc::clone(&val)))
            .await;
        drop(cache);
        assert_eq!(Arc::strong_count(&val), 1);
    })
}

// HERDCACHE (fails): documented difference: "`Debug` shows the configuration, not the contents" (README "Coming from moka").
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn test_debug_format() {
    let _dog = watchdog(LIMIT, "test_debug_format");
    rt().block_on(async {
        let cache = Cache::new(10);
        cache.insert('a', "alice");
        cache.insert('b', "bob");
        cache.insert('c', "cindy");

        let debug_str = format!("{cache:?}");
        assert!(debug_str.starts_with('{'));
        assert!(debug_str.contains(r#"'a': "alice""#));
        assert!(debug_str.contains(r#"'b': "bob""#));
        assert!(debug_str.contains(r#"'c': "cindy""#));
        assert!(debug_str.ends_with('}'));
    })
}

/// Test that returning `None` from `expire_after_update` properly clears
/// expiration for an already expired entry.
///
/// Expected behavior: After `expire_after_update` returns `None`, the entry
/// should become accessible via `get()`.
// HERDCACHE (fails): documented difference: an entry already expired when written is not stored (`CacheBuilder::eviction_listener` docs, src/builder.rs: "also for a value ... already expired, to be stored"): entry_count() is 0, not 1.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn expire_after_update_none_on_expired_entry() {
    let _dog = watchdog(LIMIT, "expire_after_update_none_on_expired_entry");
    rt().block_on(async {
        use std::sync::atomic::{AtomicBool, Ordering};

        // A flag to control whether the entry should expire immediately
        let should_expire = Arc::new(AtomicBool::new(true));

        struct TestExpiry {
            should_expire: Arc<AtomicBool>,
        }

        impl Expiry<String, String> for TestExpiry {
            fn expire_after_create(&self, _key: &String, _value: &String) -> Option<Duration> {
                if self.should_expire.load(Ordering::SeqCst) {
                    // Expire immediately
                    Some(Duration::ZERO)
                } else {
                    // No expiration
                    None
                }
            }

            fn expire_after_update(
                &self,
                _key: &String,
                _value: &String,
                _duration_until_expiry: Option<Duration>,
            ) -> Option<Duration> {
                if self.should_expire.load(Ordering::SeqCst) {
                    Some(Duration::ZERO)
                } else {
                    // According to docs, None means "no expiration"
                    // This should make the entry accessible again
                    None
                }
            }
        }

        let expiry = TestExpiry {
            should_expire: Arc::clone(&should_expire),
        };

        let mut cache: Cache<String, String> = Cache::builder()
            .max_capacity(100)
            .expire_after(expiry)
            .build();

        let key = "test_key".to_string();

        // Insert entry that expires immediately
        cache.insert(key.clone(), "first_value".to_string());
        cache.run_pending_tasks();

        // Entry should exist but be expired
        assert_eq!(cache.entry_count(), 1, "Entry should exist in cache");
        assert_eq!(
            cache.get(&key),
            None,
            "Entry should not be accessible (expired)"
        );
        cache.run_pending_tasks();

        // Now update the entry to NOT expire (expire_after_update returns None)
        should_expire.store(false, Ordering::SeqCst);
        cache.insert(key.clone(), "second_value".to_string());
        cache.run_pending_tasks();

        // The entry should now be accessible since we returned None
        // (meaning "no expiration") from expire_after_update
        assert_eq!(cache.entry_count(), 1, "Entry should exist in cache");

        // Returning None from expire_after_update should clear the expiration.
        let result = cache.get(&key);
        assert_eq!(
            result,
            Some("second_value".to_string()),
            "Entry should be accessible after clearing expiration"
        );
    })
}

// ---------------------------------------------------------------------------------------------
// moka's tests/entry_api_sync.rs (moka::sync::{Cache, SegmentedCache}); `SegmentedCache::new(n, s)`
// -> `Cache::builder().max_capacity(n).shards(s).build()` (README "Coming from moka").
// ---------------------------------------------------------------------------------------------
mod entry_api_sync {
    use super::{watchdog, LIMIT};
    use herdcache::{Cache, Entry};
    use std::{
        path::Path,
        sync::atomic::{AtomicUsize, Ordering},
        sync::{Arc, Barrier},
        thread,
    };

    const NUM_THREADS: u8 = 16;
    const FILE: &str = "./Cargo.toml";

    macro_rules! generate_test_get_with {
        ($test_fn_name:ident, $cache_init:expr) => {
            #[test]
            fn $test_fn_name() {
                let _dog = watchdog(LIMIT, stringify!($test_fn_name));
                const TEN_MIB: usize = 10 * 1024 * 1024; // 10MiB

                let cache = $cache_init;
                let call_counter = Arc::new(AtomicUsize::default());
                let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));

                let threads: Vec<_> = (0..NUM_THREADS)
                    .map(|thread_id| {
                        let my_cache = cache.clone();
                        let my_call_counter = Arc::clone(&call_counter);
                        let my_barrier = Arc::clone(&barrier);

                        thread::spawn(move || {
                            my_barrier.wait();

                            println!("Thread {thread_id} started.");

                            let key = "key1".to_string();
                            let value = match thread_id % 4 {
                                0 => my_cache.get_with(key.clone(), || {
                                    println!("Thread {thread_id} inserting a value.");
                                    my_call_counter.fetch_add(1, Ordering::AcqRel);
                                    Arc::new(vec![0u8; TEN_MIB])
                                }),
                                1 => my_cache.get_with_by_ref(key.as_str(), || {
                                    println!("Thread {thread_id} inserting a value.");
                                    my_call_counter.fetch_add(1, Ordering::AcqRel);
                                    Arc::new(vec![0u8; TEN_MIB])
                                }),
                                2 => my_cache
                                    .entry(key.clone())
                                    .or_insert_with(|| {
                                        println!("Thread {thread_id} inserting a value.");
                                        my_call_counter.fetch_add(1, Ordering::AcqRel);
                                        Arc::new(vec![0u8; TEN_MIB])
                                    })
                                    .into_value(),
                                3 => my_cache
                                    .entry_by_ref(key.as_str())
                                    .or_insert_with(|| {
                                        println!("Thread {thread_id} inserting a value.");
                                        my_call_counter.fetch_add(1, Ordering::AcqRel);
                                        Arc::new(vec![0u8; TEN_MIB])
                                    })
                                    .into_value(),
                                _ => unreachable!(),
                            };

                            assert_eq!(value.len(), TEN_MIB);
                            assert!(my_cache.get(key.as_str()).is_some());

                            println!("Thread {thread_id} got the value. (len: {})", value.len());
                        })
                    })
                    .collect();

                threads
                    .into_iter()
                    .for_each(|t| t.join().expect("Thread failed"));

                assert_eq!(call_counter.load(Ordering::Acquire), 1);
            }
        };
    }

    macro_rules! generate_test_optionally_get_with {
        ($test_fn_name:ident, $cache_init:expr) => {
            #[test]
            fn $test_fn_name() {
                let _dog = watchdog(LIMIT, stringify!($test_fn_name));
                let cache = $cache_init;
                let call_counter = Arc::new(AtomicUsize::default());
                let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));

                fn get_file_size(
                    thread_id: u8,
                    path: impl AsRef<Path>,
                    call_counter: &AtomicUsize,
                ) -> Option<u64> {
                    println!("get_file_size() called by thread {thread_id}.");
                    call_counter.fetch_add(1, Ordering::AcqRel);
                    std::fs::metadata(path).ok().map(|m| m.len())
                }

                let threads: Vec<_> = (0..NUM_THREADS)
                    .map(|thread_id| {
                        let my_cache = cache.clone();
                        let my_call_counter = Arc::clone(&call_counter);
                        let my_barrier = Arc::clone(&barrier);

                        thread::spawn(move || {
                            my_barrier.wait();

                            println!("Thread {thread_id} started.");

                            let key = "key1".to_string();
                            let value = match thread_id % 4 {
                                0 => my_cache.optionally_get_with(key.clone(), || {
                                    get_file_size(thread_id, FILE, &my_call_counter)
                                }),
                                1 => my_cache.optionally_get_with_by_ref(key.as_str(), || {
                                    get_file_size(thread_id, FILE, &my_call_counter)
                                }),
                                2 => my_cache
                                    .entry(key.clone())
                                    .or_optionally_insert_with(|| {
                                        get_file_size(thread_id, FILE, &my_call_counter)
                                    })
                                    .map(Entry::into_value),
                                3 => my_cache
                                    .entry_by_ref(key.as_str())
                                    .or_optionally_insert_with(|| {
                                        get_file_size(thread_id, FILE, &my_call_counter)
                                    })
                                    .map(Entry::into_value),
                                _ => unreachable!(),
                            };

                            assert!(value.is_some());
                            assert!(my_cache.get(key.as_str()).is_some());

                            println!(
                                "Thread {thread_id} got the value. (len: {})",
                                value.unwrap()
                            );
                        })
                    })
                    .collect();

                threads
                    .into_iter()
                    .for_each(|t| t.join().expect("Thread failed"));

                assert_eq!(call_counter.load(Ordering::Acquire), 1);
            }
        };
    }

    macro_rules! generate_test_try_get_with {
        ($test_fn_name:ident, $cache_init:expr) => {
            #[test]
            fn $test_fn_name() {
                let _dog = watchdog(LIMIT, stringify!($test_fn_name));
                let cache = $cache_init;
                let call_counter = Arc::new(AtomicUsize::default());
                let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));

                fn get_file_size(
                    thread_id: u8,
                    path: impl AsRef<Path>,
                    call_counter: &AtomicUsize,
                ) -> Result<u64, std::io::Error> {
                    println!("get_file_size() called by thread {thread_id}.");
                    call_counter.fetch_add(1, Ordering::AcqRel);
                    Ok(std::fs::metadata(path)?.len())
                }

                let threads: Vec<_> = (0..NUM_THREADS)
                    .map(|thread_id| {
                        let my_cache = cache.clone();
                        let my_call_counter = Arc::clone(&call_counter);
                        let my_barrier = Arc::clone(&barrier);

                        thread::spawn(move || {
                            my_barrier.wait();

                            println!("Thread {thread_id} started.");

                            let key = "key1".to_string();
                            let value = match thread_id % 4 {
                                0 => my_cache.try_get_with(key.clone(), || {
                                    get_file_size(thread_id, FILE, &my_call_counter)
                                }),
                                1 => my_cache.try_get_with_by_ref(key.as_str(), || {
                                    get_file_size(thread_id, FILE, &my_call_counter)
                                }),
                                2 => my_cache
                                    .entry(key.clone())
                                    .or_try_insert_with(|| {
                                        get_file_size(thread_id, FILE, &my_call_counter)
                                    })
                                    .map(Entry::into_value),
                                3 => my_cache
                                    .entry_by_ref(key.as_str())
                                    .or_try_insert_with(|| {
                                        get_file_size(thread_id, FILE, &my_call_counter)
                                    })
                                    .map(Entry::into_value),
                                _ => unreachable!(),
                            };

                            assert!(value.is_ok());
                            assert!(my_cache.get(key.as_str()).is_some());

                            println!(
                                "Thread {thread_id} got the value. (len: {})",
                                value.unwrap()
                            );
                        })
                    })
                    .collect();

                threads
                    .into_iter()
                    .for_each(|t| t.join().expect("Thread failed"));

                assert_eq!(call_counter.load(Ordering::Acquire), 1);
            }
        };
    }

    generate_test_get_with!(test_cache_get_with, Cache::<String, Arc<Vec<u8>>>::new(100));
    generate_test_get_with!(
        test_seg_cache_get_with,
        Cache::<String, Arc<Vec<u8>>>::builder()
            .max_capacity(100)
            .shards(4)
            .build() // moka: SegmentedCache::new(100, 4)
    );
    generate_test_optionally_get_with!(
        test_cache_optionally_get_with,
        Cache::<String, u64>::new(100)
    );
    generate_test_optionally_get_with!(
        test_seg_cache_optionally_get_with,
        Cache::<String, u64>::builder()
            .max_capacity(100)
            .shards(4)
            .build() // moka: SegmentedCache::new(100, 4)
    );
    generate_test_try_get_with!(test_cache_try_get_with, Cache::<String, u64>::new(100));
    generate_test_try_get_with!(
        test_seg_cache_try_get_with,
        Cache::<String, u64>::builder()
            .max_capacity(100)
            .shards(4)
            .build() // moka: SegmentedCache::new(100, 4)
    );
}

// ---------------------------------------------------------------------------------------------
// moka's tests/entry_api_tokio.rs (moka::future::Cache). moka's `get_html` fetches
// https://www.rust-lang.org/ with reqwest; no network here (and no reqwest): `fetch` stands in
// for it, a 100 ms `tokio::time::sleep` and then the page's text.
// ---------------------------------------------------------------------------------------------
mod entry_api_tokio {
    use super::{rt, watchdog, LIMIT};
    use herdcache::{Cache, Entry};
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    use std::time::Duration;
    use tokio::sync::Barrier;

    /// Stands in for `reqwest::get(uri).await?.text().await`.
    async fn fetch(uri: &str) -> Result<String, std::io::Error> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(format!("<html>{uri}</html>"))
    }

    const NUM_THREADS: u8 = 16;
    const SITE: &str = "https://www.rust-lang.org/";

    #[test]
    fn test_get_with() {
        let _dog = watchdog(LIMIT, "test_get_with");
        rt().block_on(async {
            const TEN_MIB: usize = 10 * 1024 * 1024; // 10MiB
            let cache = Cache::new(100);
            let call_counter = Arc::new(AtomicUsize::default());
            let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));

            let tasks: Vec<_> = (0..NUM_THREADS)
                .map(|task_id| {
                    let my_cache = cache.clone();
                    let my_call_counter = Arc::clone(&call_counter);
                    let my_barrier = Arc::clone(&barrier);

                    tokio::spawn(async move {
                        my_barrier.wait().await;

                        println!("Task {task_id} started.");

                        let key = "key1".to_string();
                        let value = match task_id % 4 {
                            0 => {
                                my_cache
                                    .get_with_async(key.clone(), async move {
                                        println!("Task {task_id} inserting a value.");
                                        my_call_counter.fetch_add(1, Ordering::AcqRel);
                                        Arc::new(vec![0u8; TEN_MIB])
                                    })
                                    .await
                            }
                            1 => {
                                my_cache
                                    .get_with_by_ref_async(key.as_str(), async move {
                                        println!("Task {task_id} inserting a value.");
                                        my_call_counter.fetch_add(1, Ordering::AcqRel);
                                        Arc::new(vec![0u8; TEN_MIB])
                                    })
                                    .await
                            }
                            2 => my_cache
                                .entry(key.clone())
                                .or_insert_with_async(async move {
                                    println!("Task {task_id} inserting a value.");
                                    my_call_counter.fetch_add(1, Ordering::AcqRel);
                                    Arc::new(vec![0u8; TEN_MIB])
                                })
                                .await
                                .into_value(),
                            3 => my_cache
                                .entry_by_ref(key.as_str())
                                .or_insert_with_async(async move {
                                    println!("Task {task_id} inserting a value.");
                                    my_call_counter.fetch_add(1, Ordering::AcqRel);
                                    Arc::new(vec![0u8; TEN_MIB])
                                })
                                .await
                                .into_value(),
                            _ => unreachable!(),
                        };

                        assert_eq!(value.len(), TEN_MIB);
                        assert!(my_cache.get(key.as_str()).is_some());

                        println!("Task {task_id} got the value. (len: {})", value.len());
                    })
                })
                .collect();

            futures::future::join_all(tasks).await;
            assert_eq!(call_counter.load(Ordering::Acquire), 1);
        })
    }

    #[test]
    fn test_optionally_get_with() {
        let _dog = watchdog(LIMIT, "test_optionally_get_with");
        rt().block_on(async {
            let cache = Cache::new(100);
            let call_counter = Arc::new(AtomicUsize::default());
            let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));

            async fn get_html(
                task_id: u8,
                uri: &str,
                call_counter: &AtomicUsize,
            ) -> Option<String> {
                println!("get_html() called by task {task_id}.");
                call_counter.fetch_add(1, Ordering::AcqRel);
                fetch(uri).await.ok()
            }

            let tasks: Vec<_> = (0..NUM_THREADS)
                .map(|task_id| {
                    let my_cache = cache.clone();
                    let my_call_counter = Arc::clone(&call_counter);
                    let my_barrier = Arc::clone(&barrier);

                    tokio::spawn(async move {
                        my_barrier.wait().await;

                        println!("Task {task_id} started.");

                        let key = "key1".to_string();
                        let value = match task_id % 4 {
                            0 => {
                                my_cache
                                    .optionally_get_with_async(
                                        key.clone(),
                                        get_html(task_id, SITE, &my_call_counter),
                                    )
                                    .await
                            }
                            1 => {
                                my_cache
                                    .optionally_get_with_by_ref_async(
                                        key.as_str(),
                                        get_html(task_id, SITE, &my_call_counter),
                                    )
                                    .await
                            }
                            2 => my_cache
                                .entry(key.clone())
                                .or_optionally_insert_with_async(get_html(
                                    task_id,
                                    SITE,
                                    &my_call_counter,
                                ))
                                .await
                                .map(Entry::into_value),
                            3 => my_cache
                                .entry_by_ref(key.as_str())
                                .or_optionally_insert_with_async(get_html(
                                    task_id,
                                    SITE,
                                    &my_call_counter,
                                ))
                                .await
                                .map(Entry::into_value),
                            _ => unreachable!(),
                        };

                        assert!(value.is_some());
                        assert!(my_cache.get(key.as_str()).is_some());

                        println!(
                            "Task {task_id} got the value. (len: {})",
                            value.unwrap().len()
                        );
                    })
                })
                .collect();

            futures::future::join_all(tasks).await;
            assert_eq!(call_counter.load(Ordering::Acquire), 1);
        })
    }

    #[test]
    fn test_try_get_with() {
        let _dog = watchdog(LIMIT, "test_try_get_with");
        rt().block_on(async {
            let cache = Cache::new(100);
            let call_counter = Arc::new(AtomicUsize::default());
            let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));

            async fn get_html(
                task_id: u8,
                uri: &str,
                call_counter: &AtomicUsize,
            ) -> Result<String, std::io::Error> {
                println!("get_html() called by task {task_id}.");
                call_counter.fetch_add(1, Ordering::AcqRel);
                fetch(uri).await
            }

            let tasks: Vec<_> = (0..NUM_THREADS)
                .map(|task_id| {
                    let my_cache = cache.clone();
                    let my_call_counter = Arc::clone(&call_counter);
                    let my_barrier = Arc::clone(&barrier);

                    tokio::spawn(async move {
                        my_barrier.wait().await;

                        println!("Task {task_id} started.");

                        let key = "key1".to_string();
                        let value = match task_id % 4 {
                            0 => {
                                my_cache
                                    .try_get_with_async(
                                        key.clone(),
                                        get_html(task_id, SITE, &my_call_counter),
                                    )
                                    .await
                            }
                            1 => {
                                my_cache
                                    .try_get_with_by_ref_async(
                                        key.as_str(),
                                        get_html(task_id, SITE, &my_call_counter),
                                    )
                                    .await
                            }
                            2 => my_cache
                                .entry(key.clone())
                                .or_try_insert_with_async(get_html(task_id, SITE, &my_call_counter))
                                .await
                                .map(Entry::into_value),
                            3 => my_cache
                                .entry_by_ref(key.as_str())
                                .or_try_insert_with_async(get_html(task_id, SITE, &my_call_counter))
                                .await
                                .map(Entry::into_value),
                            _ => unreachable!(),
                        };

                        assert!(value.is_ok());
                        assert!(my_cache.get(key.as_str()).is_some());

                        println!(
                            "Task {task_id} got the value. (len: {})",
                            value.unwrap().len()
                        );
                    })
                })
                .collect();

            futures::future::join_all(tasks).await;
            assert_eq!(call_counter.load(Ordering::Acquire), 1);
        })
    }
}
