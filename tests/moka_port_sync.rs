//! moka's own unit tests for `moka::sync::Cache` (`src/sync/cache.rs`, `mod tests`, moka-rs/moka
//! at 2d8289eb40af01ab77ee49719c9cf9502322e05a), ported to herdcache's public API: one test per
//! moka test, same name, same scenario, same assertions. Each test has a watchdog.
//!
//! Translation rules (moka -> herdcache):
//! - `Clock::mock()` / `mock.increment(d)` -> `ManualClock` / `advance(d)` (`mock_clock` below).
//! - `cache.reconfigure_for_testing()` (moka-internal: stops its housekeeper thread) -> dropped;
//!   herdcache has no background thread.
//! - moka-internal test hooks: `is_waiter_map_empty()` / `key_locks_map_is_empty()` ->
//!   `loads_in_flight() == 0` (herdcache's `testing` hook); `is_table_empty()` ->
//!   `entry_count() == 0`; `invalidation_predicate_count()` -> no equivalent (commented out,
//!   herdcache runs `invalidate_entries_if` at once).
//! - `.housekeeper_config(..)` (moka-internal, `#[cfg(test)]`) -> dropped (no equivalent).
//! - listeners `|k: Arc<K>, v: V, cause|` -> `|k: &K, v: &V, cause|`, recorded as
//!   `(Arc::new(k.clone()), v.clone(), cause)` so that moka's expected tuples stay unchanged.
//! - `Expiry` methods lose their `Instant` arguments.
//! - a moka cache without `max_capacity` (unbounded) -> `.max_capacity(UNBOUNDED)` (herdcache
//!   requires one).
//! - `verify_notification_vec` keeps moka's exact, ordered comparison; herdcache's listener is
//!   synchronous, so no retry/sleep loop is needed.
//!
//! 57 tests (41 of `sync/cache.rs`, 16 of `sync/segment.rs` in `mod segment`), and 4 of
//! moka's later regression tests for the sync cache (`tests/*_sync.rs` and
//! `tests/timer_wheel_panic_test.rs`, in `mod regressions`). Those that
//! assert a behaviour herdcache documents differently are `#[ignore]`d, each with a
//! `HERDCACHE (fails)` comment naming the difference and where it is documented (admission
//! decisions, eviction inside `insert`, a panicking listener panicking its caller, `Debug`
//! showing the configuration); moka's own `#[ignore]`s are kept. `-- --ignored` runs them.

#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::all, unused_variables, unused_mut, dead_code)]

mod common;

use common::moka::*;
use common::watchdog;
use herdcache::{Cache, CompResult, EvictionPolicy, Expiry, Op, RemovalCause};
use parking_lot::Mutex;
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

const LIMIT: Duration = Duration::from_secs(60);
/// What a moka cache without `max_capacity` becomes (herdcache requires a bound).
const UNBOUNDED: u64 = u64::MAX;

// ---------------------------------------------------------------------------------------------
// The ported tests, in moka's order.
// ---------------------------------------------------------------------------------------------

#[test]
fn max_capacity_zero() {
    let _dog = watchdog(LIMIT, "max_capacity_zero");
    let cache = Cache::new(0);

    cache.insert(0, ());

    assert!(!cache.contains_key(&0));
    assert!(cache.get(&0).is_none());
    cache.run_pending_tasks();
    assert!(!cache.contains_key(&0));
    assert!(cache.get(&0).is_none());
    assert_eq!(cache.entry_count(), 0)
}

// HERDCACHE (fails): documented difference: admission. herdcache counts inserts (not misses) in its sketch and duels the oldest FIFO victim (src/policy.rs, DESIGN.md "Policy"); "d" is admitted only at its 4th insert.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn basic_single_thread() {
    let _dog = watchdog(LIMIT, "basic_single_thread");
    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

#[test]
fn basic_lru_single_thread() {
    let _dog = watchdog(LIMIT, "basic_lru_single_thread");
    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

// HERDCACHE (fails): documented difference: a cache with a weigher runs rule `g` (a key in the ghost of recent evictions is admitted; DESIGN.md "Policy"): "d" gets in at its 2nd insert, evicting "a" and "b".
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn size_aware_eviction() {
    let _dog = watchdog(LIMIT, "size_aware_eviction");
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
    let cache = Cache::builder()
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
}

#[test]
fn basic_multi_threads() {
    let _dog = watchdog(LIMIT, "basic_multi_threads");
    let num_threads = 4;
    let cache = Cache::new(100);

    // https://rust-lang.github.io/rust-clippy/master/index.html#needless_collect
    #[allow(clippy::needless_collect)]
    let handles = (0..num_threads)
        .map(|id| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache.insert(10, format!("{id}-100"));
                cache.get(&10);
                cache.insert(20, format!("{id}-200"));
                cache.invalidate(&10);
            })
        })
        .collect::<Vec<_>>();

    handles.into_iter().for_each(|h| h.join().expect("Failed"));

    assert!(cache.get(&10).is_none());
    assert!(cache.get(&20).is_some());
    assert!(!cache.contains_key(&10));
    assert!(cache.contains_key(&20));
}

#[test]
fn invalidate_all() {
    let _dog = watchdog(LIMIT, "invalidate_all");
    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

// HERDCACHE (fails): documented difference: `invalidate_entries_if` "runs at once" (Cache::invalidate_entries_if docs), so removals come in call order (3, 1), not moka's write order (1, 3).
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn invalidate_entries_if() -> Result<(), Box<dyn std::error::Error>> {
    let _dog = watchdog(LIMIT, "invalidate_entries_if");
    use std::collections::HashSet;

    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    let (clock, mock) = mock_clock();

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
    // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.base.invalidation_predicate_count(), 1);
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
    // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), 0);

    mock.advance(Duration::from_secs(5)); // 15 secs from the start.

    cache.invalidate_entries_if(|_k, &v| v == "alice")?;
    cache.invalidate_entries_if(|_k, &v| v == "bob")?;
    // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), 2);
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
    // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), 0);

    verify_notification_vec(&cache, actual, &expected);

    Ok(())
}

#[test]
fn time_to_live() {
    let _dog = watchdog(LIMIT, "time_to_live");
    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    let (clock, mock) = mock_clock();

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

#[test]
fn time_to_idle() {
    let _dog = watchdog(LIMIT, "time_to_idle");
    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    let (clock, mock) = mock_clock();

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

// https://github.com/moka-rs/moka/issues/359
#[test]
fn ensure_access_time_is_updated_immediately_after_read() {
    let _dog = watchdog(
        LIMIT,
        "ensure_access_time_is_updated_immediately_after_read",
    );
    let (clock, mock) = mock_clock();
    let cache = Cache::builder()
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
}

#[test]
fn time_to_live_by_expiry_type() {
    let _dog = watchdog(LIMIT, "time_to_live_by_expiry_type");
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

    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create expiry counters and the expiry.
    let expiry_counters = Arc::new(ExpiryCallCounters::default());
    let expiry = MyExpiry::new(Arc::clone(&expiry_counters));

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    let (clock, mock) = mock_clock();

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

#[test]
fn time_to_idle_by_expiry_type() {
    let _dog = watchdog(LIMIT, "time_to_idle_by_expiry_type");
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

    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create expiry counters and the expiry.
    let expiry_counters = Arc::new(ExpiryCallCounters::default());
    let expiry = MyExpiry::new(Arc::clone(&expiry_counters));

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    let (clock, mock) = mock_clock();

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

/// Verify that the `Expiry::expire_after_read()` method is called in `get_with`
/// only when the key was already present in the cache.
#[test]
fn test_expiry_using_get_with() {
    let _dog = watchdog(LIMIT, "test_expiry_using_get_with");
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
    let cache = Cache::builder()
        .max_capacity(100)
        .expire_after(expiry)
        .build();

    // The key is not present.
    cache.get_with("a", || "alice");
    expiry_counters.incl_expected_creations();
    cache.run_pending_tasks();

    // The key is present.
    cache.get_with("a", || "alex");
    expiry_counters.incl_expected_reads();
    cache.run_pending_tasks();

    // The key is not present.
    cache.invalidate("a");
    cache.get_with("a", || "amanda");
    expiry_counters.incl_expected_creations();
    cache.run_pending_tasks();

    expiry_counters.verify();
}

/// Test that returning `None` from `expire_after_update` properly clears
/// expiration for an already expired entry.
///
/// Expected behavior: After `expire_after_update` returns `None`, the entry
/// should become accessible via `get()`.
// HERDCACHE (fails): documented difference: an entry already expired when written is not stored (eviction_listener docs: "also for a value ... already expired, to be stored"): entry_count() is 0, not 1.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn expire_after_update_none_on_expired_entry() {
    let _dog = watchdog(LIMIT, "expire_after_update_none_on_expired_entry");
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

    let cache: Cache<String, String> = Cache::builder()
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
}

// https://github.com/moka-rs/moka/issues/345
#[test]
fn test_race_between_updating_entry_and_processing_its_write_ops() {
    let _dog = watchdog(
        LIMIT,
        "test_race_between_updating_entry_and_processing_its_write_ops",
    );
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
}

// HERDCACHE (fails): documented difference: "its admission policy may turn a new key away at once" (README): "c1" is never stored, so remove(&'c') is None.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn test_race_between_recreating_entry_and_processing_its_write_ops() {
    let _dog = watchdog(
        LIMIT,
        "test_race_between_recreating_entry_and_processing_its_write_ops",
    );
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
}

#[test]
fn test_iter() {
    let _dog = watchdog(LIMIT, "test_iter");
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
        assert_eq!(value, make_value(key)); // herdcache: K, not Arc<K>

        key_set.insert(key);
    }

    // Ensure there are no missing or duplicate keys in the iteration.
    assert_eq!(key_set.len(), NUM_KEYS);
}

/// Runs 16 threads at the same time and ensures no deadlock occurs.
///
/// - Eight of the threads will update key-values in the cache.
/// - Eight others will iterate the cache.
///
#[test]
fn test_iter_multi_threads() {
    let _dog = watchdog(LIMIT, "test_iter_multi_threads");
    use std::collections::HashSet;

    const NUM_KEYS: usize = 1024;
    const NUM_THREADS: usize = 16;

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

    let rw_lock = Arc::new(std::sync::RwLock::<()>::default());
    let write_lock = rw_lock.write().unwrap();

    // https://rust-lang.github.io/rust-clippy/master/index.html#needless_collect
    #[allow(clippy::needless_collect)]
    let handles = (0..NUM_THREADS)
        .map(|n| {
            let cache = cache.clone();
            let rw_lock = Arc::clone(&rw_lock);

            if n % 2 == 0 {
                // This thread will update the cache.
                std::thread::spawn(move || {
                    let read_lock = rw_lock.read().unwrap();
                    for key in 0..NUM_KEYS {
                        // TODO: Update keys in a random order?
                        cache.insert(key, make_value(key));
                    }
                    std::mem::drop(read_lock);
                })
            } else {
                // This thread will iterate the cache.
                std::thread::spawn(move || {
                    let read_lock = rw_lock.read().unwrap();
                    let mut key_set = HashSet::new();
                    for (key, value) in &cache {
                        assert_eq!(value, make_value(key)); // herdcache: K, not Arc<K>
                        key_set.insert(key);
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

    handles.into_iter().for_each(|h| h.join().expect("Failed"));

    // Ensure there are no missing or duplicate keys in the iteration.
    let key_set = cache.iter().map(|(k, _v)| k).collect::<HashSet<_>>();
    assert_eq!(key_set.len(), NUM_KEYS);
}

#[test]
fn get_with() {
    let _dog = watchdog(LIMIT, "get_with");
    use std::thread::{sleep, spawn};

    let cache = Cache::new(100);
    const KEY: u32 = 0;

    // This test will run five threads:
    //
    // Thread1 will be the first thread to call `get_with` for a key, so its init
    // closure will be evaluated and then a &str value "thread1" will be inserted
    // to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `get_with` immediately.
            let v = cache1.get_with(KEY, || {
                // Wait for 300 ms and return a &str value.
                sleep(Duration::from_millis(300));
                "thread1"
            });
            assert_eq!(v, "thread1");
        })
    };

    // Thread2 will be the second thread to call `get_with` for the same key, so
    // its init closure will not be evaluated. Once thread1's init closure
    // finishes, it will get the value inserted by thread1's init closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `get_with`.
            sleep(Duration::from_millis(100));
            let v = cache2.get_with(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };

    // Thread3 will be the third thread to call `get_with` for the same key. By
    // the time it calls, thread1's init closure should have finished already and
    // the value should be already inserted to the cache. So its init closure
    // will not be evaluated and will get the value insert by thread1's init
    // closure immediately.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get_with`.
            sleep(Duration::from_millis(400));
            let v = cache3.get_with(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };

    // Thread4 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache4.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread5 will call `get` for the same key. It will call after thread1's init
    // closure finished, so it will get the value insert by thread1's init closure.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get`.
            sleep(Duration::from_millis(400));
            let maybe_v = cache5.get(&KEY);
            assert_eq!(maybe_v, Some("thread1"));
        })
    };

    for t in [thread1, thread2, thread3, thread4, thread5] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn get_with_by_ref() {
    let _dog = watchdog(LIMIT, "get_with_by_ref");
    use std::thread::{sleep, spawn};

    let cache = Cache::new(100);
    const KEY: &u32 = &0;

    // This test will run five threads:
    //
    // Thread1 will be the first thread to call `get_with_by_ref` for a key, so
    // its init closure will be evaluated and then a &str value "thread1" will be
    // inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `get_with_by_ref` immediately.
            let v = cache1.get_with_by_ref(KEY, || {
                // Wait for 300 ms and return a &str value.
                sleep(Duration::from_millis(300));
                "thread1"
            });
            assert_eq!(v, "thread1");
        })
    };

    // Thread2 will be the second thread to call `get_with_by_ref` for the same
    // key, so its init closure will not be evaluated. Once thread1's init
    // closure finishes, it will get the value inserted by thread1's init
    // closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `get_with_by_ref`.
            sleep(Duration::from_millis(100));
            let v = cache2.get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };

    // Thread3 will be the third thread to call `get_with_by_ref` for the same
    // key. By the time it calls, thread1's init closure should have finished
    // already and the value should be already inserted to the cache. So its init
    // closure will not be evaluated and will get the value insert by thread1's
    // init closure immediately.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get_with_by_ref`.
            sleep(Duration::from_millis(400));
            let v = cache3.get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };

    // Thread4 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache4.get(KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread5 will call `get` for the same key. It will call after thread1's init
    // closure finished, so it will get the value insert by thread1's init closure.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get`.
            sleep(Duration::from_millis(400));
            let maybe_v = cache5.get(KEY);
            assert_eq!(maybe_v, Some("thread1"));
        })
    };

    for t in [thread1, thread2, thread3, thread4, thread5] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn entry_or_insert_with_if() {
    let _dog = watchdog(LIMIT, "entry_or_insert_with_if");
    use std::thread::{sleep, spawn};

    let cache = Cache::new(100);
    const KEY: u32 = 0;

    // This test will run seven threads:
    //
    // Thread1 will be the first thread to call `or_insert_with_if` for a key, so
    // its init closure will be evaluated and then a &str value "thread1" will be
    // inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `get_with` immediately.
            let entry = cache1.entry(KEY).or_insert_with_if(
                || {
                    // Wait for 300 ms and return a &str value.
                    sleep(Duration::from_millis(300));
                    "thread1"
                },
                |_v| unreachable!(),
            );
            // Entry should be fresh because our async block should have been
            // evaluated.
            assert!(entry.is_fresh());
            assert_eq!(entry.into_value(), "thread1");
        })
    };

    // Thread2 will be the second thread to call `or_insert_with_if` for the same
    // key, so its init closure will not be evaluated. Once thread1's init
    // closure finishes, it will get the value inserted by thread1's init
    // closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `get_with`.
            sleep(Duration::from_millis(100));
            let entry = cache2
                .entry(KEY)
                .or_insert_with_if(|| unreachable!(), |_v| unreachable!());
            // Entry should not be fresh because thread1's async block should have
            // been evaluated instead of ours.
            assert!(!entry.is_fresh());
            assert_eq!(entry.into_value(), "thread1");
        })
    };

    // Thread3 will be the third thread to call `or_insert_with_if` for the same
    // key. By the time it calls, thread1's init closure should have finished
    // already and the value should be already inserted to the cache. Also
    // thread3's `replace_if` closure returns `false`. So its init closure will
    // not be evaluated and will get the value inserted by thread1's init closure
    // immediately.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 350 ms before calling `or_insert_with_if`.
            sleep(Duration::from_millis(350));
            let entry = cache3.entry(KEY).or_insert_with_if(
                || unreachable!(),
                |v| {
                    assert_eq!(v, &"thread1");
                    false
                },
            );
            assert!(!entry.is_fresh());
            assert_eq!(entry.into_value(), "thread1");
        })
    };

    // Thread4 will be the fourth thread to call `or_insert_with_if` for the same
    // key. The value should have been already inserted to the cache by thread1.
    // However thread4's `replace_if` closure returns `true`. So its init closure
    // will be evaluated to replace the current value.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `or_insert_with_if`.
            sleep(Duration::from_millis(400));
            let entry = cache4.entry(KEY).or_insert_with_if(
                || "thread4",
                |v| {
                    assert_eq!(v, &"thread1");
                    true
                },
            );
            assert!(entry.is_fresh());
            assert_eq!(entry.into_value(), "thread4");
        })
    };

    // Thread5 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache5.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread6 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            // Wait for 350 ms before calling `get`.
            sleep(Duration::from_millis(350));
            let maybe_v = cache6.get(&KEY);
            assert_eq!(maybe_v, Some("thread1"));
        })
    };

    // Thread7 will call `get` for the same key. It will call after thread1's init
    // closure finished, so it will get the value insert by thread1's init closure.
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            // Wait for 450 ms before calling `get`.
            sleep(Duration::from_millis(450));
            let maybe_v = cache7.get(&KEY);
            assert_eq!(maybe_v, Some("thread4"));
        })
    };

    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7,
    ] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn entry_by_ref_or_insert_with_if() {
    let _dog = watchdog(LIMIT, "entry_by_ref_or_insert_with_if");
    use std::thread::{sleep, spawn};

    let cache: Cache<u32, &str> = Cache::new(100);
    const KEY: &u32 = &0;

    // This test will run seven threads:
    //
    // Thread1 will be the first thread to call `or_insert_with_if` for a key, so
    // its init closure will be evaluated and then a &str value "thread1" will be
    // inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `get_with` immediately.
            let v = cache1
                .entry_by_ref(KEY)
                .or_insert_with_if(
                    || {
                        // Wait for 300 ms and return a &str value.
                        sleep(Duration::from_millis(300));
                        "thread1"
                    },
                    |_v| unreachable!(),
                )
                .into_value();
            assert_eq!(v, "thread1");
        })
    };

    // Thread2 will be the second thread to call `or_insert_with_if` for the same
    // key, so its init closure will not be evaluated. Once thread1's init
    // closure finishes, it will get the value inserted by thread1's init
    // closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `get_with`.
            sleep(Duration::from_millis(100));
            let v = cache2
                .entry_by_ref(KEY)
                .or_insert_with_if(|| unreachable!(), |_v| unreachable!())
                .into_value();
            assert_eq!(v, "thread1");
        })
    };

    // Thread3 will be the third thread to call `or_insert_with_if` for the same
    // key. By the time it calls, thread1's init closure should have finished
    // already and the value should be already inserted to the cache. Also
    // thread3's `replace_if` closure returns `false`. So its init closure will
    // not be evaluated and will get the value inserted by thread1's init closure
    // immediately.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 350 ms before calling `or_insert_with_if`.
            sleep(Duration::from_millis(350));
            let v = cache3
                .entry_by_ref(KEY)
                .or_insert_with_if(
                    || unreachable!(),
                    |v| {
                        assert_eq!(v, &"thread1");
                        false
                    },
                )
                .into_value();
            assert_eq!(v, "thread1");
        })
    };

    // Thread4 will be the fourth thread to call `or_insert_with_if` for the same
    // key. The value should have been already inserted to the cache by
    // thread1. However thread4's `replace_if` closure returns `true`. So its
    // init closure will be evaluated to replace the current value.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `or_insert_with_if`.
            sleep(Duration::from_millis(400));
            let v = cache4
                .entry_by_ref(KEY)
                .or_insert_with_if(
                    || "thread4",
                    |v| {
                        assert_eq!(v, &"thread1");
                        true
                    },
                )
                .into_value();
            assert_eq!(v, "thread4");
        })
    };

    // Thread5 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache5.get(KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread6 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            // Wait for 350 ms before calling `get`.
            sleep(Duration::from_millis(350));
            let maybe_v = cache6.get(KEY);
            assert_eq!(maybe_v, Some("thread1"));
        })
    };

    // Thread7 will call `get` for the same key. It will call after thread1's init
    // closure finished, so it will get the value insert by thread1's init closure.
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            // Wait for 450 ms before calling `get`.
            sleep(Duration::from_millis(450));
            let maybe_v = cache7.get(KEY);
            assert_eq!(maybe_v, Some("thread4"));
        })
    };

    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7,
    ] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn try_get_with() {
    let _dog = watchdog(LIMIT, "try_get_with");
    use std::{
        sync::Arc,
        thread::{sleep, spawn},
    };

    // Note that MyError does not implement std::error::Error trait like
    // anyhow::Error.
    #[derive(Debug)]
    pub struct MyError(#[allow(dead_code)] String);

    type MyResult<T> = Result<T, Arc<MyError>>;

    let cache = Cache::new(100);
    const KEY: u32 = 0;

    // This test will run eight threads:
    //
    // Thread1 will be the first thread to call `try_get_with` for a key, so its
    // init closure will be evaluated and then an error will be returned. Nothing
    // will be inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `try_get_with` immediately.
            let v = cache1.try_get_with(KEY, || {
                // Wait for 300 ms and return an error.
                sleep(Duration::from_millis(300));
                Err(MyError("thread1 error".into()))
            });
            assert!(v.is_err());
        })
    };

    // Thread2 will be the second thread to call `try_get_with` for the same key,
    // so its init closure will not be evaluated. Once thread1's init closure
    // finishes, it will get the same error value returned by thread1's init
    // closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `try_get_with`.
            sleep(Duration::from_millis(100));
            let v: MyResult<_> = cache2.try_get_with(KEY, || unreachable!());
            assert!(v.is_err());
        })
    };

    // Thread3 will be the third thread to call `get_with` for the same key. By
    // the time it calls, thread1's init closure should have finished already,
    // but the key still does not exist in the cache. So its init closure will be
    // evaluated and then an okay &str value will be returned. That value will be
    // inserted to the cache.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `try_get_with`.
            sleep(Duration::from_millis(400));
            let v: MyResult<_> = cache3.try_get_with(KEY, || {
                // Wait for 300 ms and return an Ok(&str) value.
                sleep(Duration::from_millis(300));
                Ok("thread3")
            });
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // thread4 will be the fourth thread to call `try_get_with` for the same
    // key. So its init closure will not be evaluated. Once thread3's init
    // closure finishes, it will get the same okay &str value.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 500 ms before calling `try_get_with`.
            sleep(Duration::from_millis(500));
            let v: MyResult<_> = cache4.try_get_with(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread5 will be the fifth thread to call `try_get_with` for the same
    // key. So its init closure will not be evaluated. By the time it calls,
    // thread3's init closure should have finished already, so its init closure
    // will not be evaluated and will get the value insert by thread3's init
    // closure immediately.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `try_get_with`.
            sleep(Duration::from_millis(800));
            let v: MyResult<_> = cache5.try_get_with(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread6 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache6.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread7 will call `get` for the same key. It will call after thread1's init
    // closure finished with an error. So it will get none for the key.
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get`.
            sleep(Duration::from_millis(400));
            let maybe_v = cache7.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread8 will call `get` for the same key. It will call after thread3's init
    // closure finished, so it will get the value insert by thread3's init closure.
    let thread8 = {
        let cache8 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `get`.
            sleep(Duration::from_millis(800));
            let maybe_v = cache8.get(&KEY);
            assert_eq!(maybe_v, Some("thread3"));
        })
    };

    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
    ] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn try_get_with_by_ref() {
    let _dog = watchdog(LIMIT, "try_get_with_by_ref");
    use std::{
        sync::Arc,
        thread::{sleep, spawn},
    };

    // Note that MyError does not implement std::error::Error trait like
    // anyhow::Error.
    #[derive(Debug)]
    pub struct MyError(#[allow(dead_code)] String);

    type MyResult<T> = Result<T, Arc<MyError>>;

    let cache = Cache::new(100);
    const KEY: &u32 = &0;

    // This test will run eight threads:
    //
    // Thread1 will be the first thread to call `try_get_with_by_ref` for a key,
    // so its init closure will be evaluated and then an error will be returned.
    // Nothing will be inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `try_get_with_by_ref` immediately.
            let v = cache1.try_get_with_by_ref(KEY, || {
                // Wait for 300 ms and return an error.
                sleep(Duration::from_millis(300));
                Err(MyError("thread1 error".into()))
            });
            assert!(v.is_err());
        })
    };

    // Thread2 will be the second thread to call `try_get_with_by_ref` for the
    // same key, so its init closure will not be evaluated. Once thread1's init
    // closure finishes, it will get the same error value returned by thread1's
    // init closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `try_get_with_by_ref`.
            sleep(Duration::from_millis(100));
            let v: MyResult<_> = cache2.try_get_with_by_ref(KEY, || unreachable!());
            assert!(v.is_err());
        })
    };

    // Thread3 will be the third thread to call `get_with` for the same key. By
    // the time it calls, thread1's init closure should have finished already,
    // but the key still does not exist in the cache. So its init closure will be
    // evaluated and then an okay &str value will be returned. That value will be
    // inserted to the cache.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `try_get_with_by_ref`.
            sleep(Duration::from_millis(400));
            let v: MyResult<_> = cache3.try_get_with_by_ref(KEY, || {
                // Wait for 300 ms and return an Ok(&str) value.
                sleep(Duration::from_millis(300));
                Ok("thread3")
            });
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // thread4 will be the fourth thread to call `try_get_with_by_ref` for the
    // same key. So its init closure will not be evaluated. Once thread3's init
    // closure finishes, it will get the same okay &str value.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 500 ms before calling `try_get_with_by_ref`.
            sleep(Duration::from_millis(500));
            let v: MyResult<_> = cache4.try_get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread5 will be the fifth thread to call `try_get_with_by_ref` for the
    // same key. So its init closure will not be evaluated. By the time it calls,
    // thread3's init closure should have finished already, so its init closure
    // will not be evaluated and will get the value insert by thread3's init
    // closure immediately.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `try_get_with_by_ref`.
            sleep(Duration::from_millis(800));
            let v: MyResult<_> = cache5.try_get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread6 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache6.get(KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread7 will call `get` for the same key. It will call after thread1's init
    // closure finished with an error. So it will get none for the key.
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get`.
            sleep(Duration::from_millis(400));
            let maybe_v = cache7.get(KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread8 will call `get` for the same key. It will call after thread3's init
    // closure finished, so it will get the value insert by thread3's init closure.
    let thread8 = {
        let cache8 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `get`.
            sleep(Duration::from_millis(800));
            let maybe_v = cache8.get(KEY);
            assert_eq!(maybe_v, Some("thread3"));
        })
    };

    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
    ] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn optionally_get_with() {
    let _dog = watchdog(LIMIT, "optionally_get_with");
    use std::thread::{sleep, spawn};

    let cache = Cache::new(100);
    const KEY: u32 = 0;

    // This test will run eight threads:
    //
    // Thread1 will be the first thread to call `optionally_get_with` for a key,
    // so its init closure will be evaluated and then an error will be returned.
    // Nothing will be inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `optionally_get_with` immediately.
            let v = cache1.optionally_get_with(KEY, || {
                // Wait for 300 ms and return an error.
                sleep(Duration::from_millis(300));
                None
            });
            assert!(v.is_none());
        })
    };

    // Thread2 will be the second thread to call `optionally_get_with` for the
    // same key, so its init closure will not be evaluated. Once thread1's init
    // closure finishes, it will get the same error value returned by thread1's
    // init closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `optionally_get_with`.
            sleep(Duration::from_millis(100));
            let v = cache2.optionally_get_with(KEY, || unreachable!());
            assert!(v.is_none());
        })
    };

    // Thread3 will be the third thread to call `get_with` for the same key. By
    // the time it calls, thread1's init closure should have finished already,
    // but the key still does not exist in the cache. So its init closure will be
    // evaluated and then an okay &str value will be returned. That value will be
    // inserted to the cache.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `optionally_get_with`.
            sleep(Duration::from_millis(400));
            let v = cache3.optionally_get_with(KEY, || {
                // Wait for 300 ms and return an Ok(&str) value.
                sleep(Duration::from_millis(300));
                Some("thread3")
            });
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // thread4 will be the fourth thread to call `optionally_get_with` for the
    // same key. So its init closure will not be evaluated. Once thread3's init
    // closure finishes, it will get the same okay &str value.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 500 ms before calling `optionally_get_with`.
            sleep(Duration::from_millis(500));
            let v = cache4.optionally_get_with(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread5 will be the fifth thread to call `optionally_get_with` for the
    // same key. So its init closure will not be evaluated. By the time it calls,
    // thread3's init closure should have finished already, so its init closure
    // will not be evaluated and will get the value insert by thread3's init
    // closure immediately.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `optionally_get_with`.
            sleep(Duration::from_millis(800));
            let v = cache5.optionally_get_with(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread6 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache6.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread7 will call `get` for the same key. It will call after thread1's init
    // closure finished with an error. So it will get none for the key.
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get`.
            sleep(Duration::from_millis(400));
            let maybe_v = cache7.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread8 will call `get` for the same key. It will call after thread3's init
    // closure finished, so it will get the value insert by thread3's init closure.
    let thread8 = {
        let cache8 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `get`.
            sleep(Duration::from_millis(800));
            let maybe_v = cache8.get(&KEY);
            assert_eq!(maybe_v, Some("thread3"));
        })
    };

    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
    ] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn optionally_get_with_by_ref() {
    let _dog = watchdog(LIMIT, "optionally_get_with_by_ref");
    use std::thread::{sleep, spawn};

    let cache = Cache::new(100);
    const KEY: &u32 = &0;

    // This test will run eight threads:
    //
    // Thread1 will be the first thread to call `optionally_get_with_by_ref` for
    // a key, so its init closure will be evaluated and then an error will be
    // returned. Nothing will be inserted to the cache.
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            // Call `optionally_get_with_by_ref` immediately.
            let v = cache1.optionally_get_with_by_ref(KEY, || {
                // Wait for 300 ms and return an error.
                sleep(Duration::from_millis(300));
                None
            });
            assert!(v.is_none());
        })
    };

    // Thread2 will be the second thread to call `optionally_get_with_by_ref` for
    // the same key, so its init closure will not be evaluated. Once thread1's
    // init closure finishes, it will get the same error value returned by
    // thread1's init closure.
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            // Wait for 100 ms before calling `optionally_get_with_by_ref`.
            sleep(Duration::from_millis(100));
            let v = cache2.optionally_get_with_by_ref(KEY, || unreachable!());
            assert!(v.is_none());
        })
    };

    // Thread3 will be the third thread to call `get_with` for the same key. By
    // the time it calls, thread1's init closure should have finished already,
    // but the key still does not exist in the cache. So its init closure will be
    // evaluated and then an okay &str value will be returned. That value will be
    // inserted to the cache.
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `optionally_get_with_by_ref`.
            sleep(Duration::from_millis(400));
            let v = cache3.optionally_get_with_by_ref(KEY, || {
                // Wait for 300 ms and return an Ok(&str) value.
                sleep(Duration::from_millis(300));
                Some("thread3")
            });
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // thread4 will be the fourth thread to call `optionally_get_with_by_ref` for
    // the same key. So its init closure will not be evaluated. Once thread3's
    // init closure finishes, it will get the same okay &str value.
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            // Wait for 500 ms before calling `optionally_get_with_by_ref`.
            sleep(Duration::from_millis(500));
            let v = cache4.optionally_get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread5 will be the fifth thread to call `optionally_get_with_by_ref` for
    // the same key. So its init closure will not be evaluated. By the time it
    // calls, thread3's init closure should have finished already, so its init
    // closure will not be evaluated and will get the value insert by thread3's
    // init closure immediately.
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `optionally_get_with_by_ref`.
            sleep(Duration::from_millis(800));
            let v = cache5.optionally_get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };

    // Thread6 will call `get` for the same key. It will call when thread1's init
    // closure is still running, so it will get none for the key.
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            // Wait for 200 ms before calling `get`.
            sleep(Duration::from_millis(200));
            let maybe_v = cache6.get(KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread7 will call `get` for the same key. It will call after thread1's init
    // closure finished with an error. So it will get none for the key.
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            // Wait for 400 ms before calling `get`.
            sleep(Duration::from_millis(400));
            let maybe_v = cache7.get(KEY);
            assert!(maybe_v.is_none());
        })
    };

    // Thread8 will call `get` for the same key. It will call after thread3's init
    // closure finished, so it will get the value insert by thread3's init closure.
    let thread8 = {
        let cache8 = cache.clone();
        spawn(move || {
            // Wait for 800 ms before calling `get`.
            sleep(Duration::from_millis(800));
            let maybe_v = cache8.get(KEY);
            assert_eq!(maybe_v, Some("thread3"));
        })
    };

    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
    ] {
        t.join().expect("Failed to join");
    }

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn upsert_with() {
    let _dog = watchdog(LIMIT, "upsert_with");
    use std::thread::{sleep, spawn};

    let cache = Cache::new(100);
    const KEY: u32 = 0;

    // Spawn three threads to call `and_upsert_with` for the same key and each
    // task increments the current value by 1. Ensure the key-level lock is
    // working by verifying the value is 3 after all threads finish.
    //
    // |        | thread 1 | thread 2 | thread 3 |
    // |--------|----------|----------|----------|
    // |   0 ms | get none |          |          |
    // | 100 ms |          | blocked  |          |
    // | 200 ms | insert 1 |          |          |
    // |        |          | get 1    |          |
    // | 300 ms |          |          | blocked  |
    // | 400 ms |          | insert 2 |          |
    // |        |          |          | get 2    |
    // | 500 ms |          |          | insert 3 |

    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            cache1.entry(KEY).and_upsert_with(|maybe_entry| {
                sleep(Duration::from_millis(200));
                assert!(maybe_entry.is_none());
                1
            })
        })
    };

    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            cache2.entry_by_ref(&KEY).and_upsert_with(|maybe_entry| {
                sleep(Duration::from_millis(200));
                let entry = maybe_entry.expect("The entry should exist");
                entry.into_value() + 1
            })
        })
    };

    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(300));
            cache3.entry_by_ref(&KEY).and_upsert_with(|maybe_entry| {
                sleep(Duration::from_millis(100));
                let entry = maybe_entry.expect("The entry should exist");
                entry.into_value() + 1
            })
        })
    };

    let ent1 = thread1.join().expect("Thread 1 should finish");
    let ent2 = thread2.join().expect("Thread 2 should finish");
    let ent3 = thread3.join().expect("Thread 3 should finish");
    assert_eq!(ent1.into_value(), 1);
    assert_eq!(ent2.into_value(), 2);
    assert_eq!(ent3.into_value(), 3);

    assert_eq!(cache.get(&KEY), Some(3));

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn compute_with() {
    let _dog = watchdog(LIMIT, "compute_with");
    use std::{
        sync::RwLock,
        thread::{sleep, spawn},
    };

    let cache = Cache::new(100);
    const KEY: u32 = 0;

    // Spawn six threads to call `and_compute_with` for the same key. Ensure the
    // key-level lock is working by verifying the value after all threads finish.
    //
    // |         |  thread 1  |   thread 2    |  thread 3  | thread 4 |  thread 5  | thread 6 |
    // |---------|------------|---------------|------------|----------|------------|----------|
    // |    0 ms | get none   |               |            |          |            |          |
    // |  100 ms |            | blocked       |            |          |            |          |
    // |  200 ms | insert [1] |               |            |          |            |          |
    // |         |            | get [1]       |            |          |            |          |
    // |  300 ms |            |               | blocked    |          |            |          |
    // |  400 ms |            | insert [1, 2] |            |          |            |          |
    // |         |            |               | get [1, 2] |          |            |          |
    // |  500 ms |            |               |            | blocked  |            |          |
    // |  600 ms |            |               | remove     |          |            |          |
    // |         |            |               |            | get none |            |          |
    // |  700 ms |            |               |            |          | blocked    |          |
    // |  800 ms |            |               |            | nop      |            |          |
    // |         |            |               |            |          | get none   |          |
    // |  900 ms |            |               |            |          |            | blocked  |
    // | 1000 ms |            |               |            |          | insert [5] |          |
    // |         |            |               |            |          |            | get [5]  |
    // | 1100 ms |            |               |            |          |            | nop      |

    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            cache1.entry(KEY).and_compute_with(|maybe_entry| {
                sleep(Duration::from_millis(200));
                assert!(maybe_entry.is_none());
                Op::Put(Arc::new(RwLock::new(vec![1])))
            })
        })
    };

    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            cache2.entry_by_ref(&KEY).and_compute_with(|maybe_entry| {
                let entry = maybe_entry.expect("The entry should exist");
                let value = entry.into_value();
                assert_eq!(*value.read().unwrap(), vec![1]);
                sleep(Duration::from_millis(200));
                value.write().unwrap().push(2);
                Op::Put(value)
            })
        })
    };

    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(300));
            cache3.entry(KEY).and_compute_with(|maybe_entry| {
                let entry = maybe_entry.expect("The entry should exist");
                let value = entry.into_value();
                assert_eq!(*value.read().unwrap(), vec![1, 2]);
                sleep(Duration::from_millis(200));
                Op::Remove
            })
        })
    };

    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(500));
            cache4.entry(KEY).and_compute_with(|maybe_entry| {
                assert!(maybe_entry.is_none());
                sleep(Duration::from_millis(200));
                Op::Nop
            })
        })
    };

    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(700));
            cache5.entry_by_ref(&KEY).and_compute_with(|maybe_entry| {
                assert!(maybe_entry.is_none());
                sleep(Duration::from_millis(200));
                Op::Put(Arc::new(RwLock::new(vec![5])))
            })
        })
    };

    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(900));
            cache6.entry_by_ref(&KEY).and_compute_with(|maybe_entry| {
                let entry = maybe_entry.expect("The entry should exist");
                let value = entry.into_value();
                assert_eq!(*value.read().unwrap(), vec![5]);
                sleep(Duration::from_millis(100));
                Op::Nop
            })
        })
    };

    let res1 = thread1.join().expect("Thread 1 should finish");
    let res2 = thread2.join().expect("Thread 2 should finish");
    let res3 = thread3.join().expect("Thread 3 should finish");
    let res4 = thread4.join().expect("Thread 4 should finish");
    let res5 = thread5.join().expect("Thread 5 should finish");
    let res6 = thread6.join().expect("Thread 6 should finish");

    let CompResult::Inserted(entry) = res1 else {
        panic!("Expected `Inserted`. Got {res1:?}")
    };
    assert_eq!(
        *entry.into_value().read().unwrap(),
        vec![1, 2] // The same Vec was modified by task2.
    );

    let CompResult::ReplacedWith(entry) = res2 else {
        panic!("Expected `ReplacedWith`. Got {res2:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);

    let CompResult::Removed(entry) = res3 else {
        panic!("Expected `Removed`. Got {res3:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);

    let CompResult::StillNone(key) = res4 else {
        panic!("Expected `StillNone`. Got {res4:?}")
    };
    assert_eq!(key, KEY); // herdcache: StillNone(K), not StillNone(Arc<K>)

    let CompResult::Inserted(entry) = res5 else {
        panic!("Expected `Inserted`. Got {res5:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![5]);

    let CompResult::Unchanged(entry) = res6 else {
        panic!("Expected `Unchanged`. Got {res6:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![5]);

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn try_compute_with() {
    let _dog = watchdog(LIMIT, "try_compute_with");
    use std::{
        sync::RwLock,
        thread::{sleep, spawn},
    };

    let cache: Cache<u32, Arc<RwLock<Vec<i32>>>> = Cache::new(100);
    const KEY: u32 = 0;

    // Spawn four threads to call `and_try_compute_with` for the same key. Ensure
    // the key-level lock is working by verifying the value after all threads
    // finish.
    //
    // |         |  thread 1  |   thread 2    |  thread 3  | thread 4   |
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

    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            cache1.entry(KEY).and_try_compute_with(|maybe_entry| {
                sleep(Duration::from_millis(200));
                assert!(maybe_entry.is_none());
                Ok(Op::Put(Arc::new(RwLock::new(vec![1])))) as Result<_, ()>
            })
        })
    };

    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            cache2
                .entry_by_ref(&KEY)
                .and_try_compute_with(|maybe_entry| {
                    let entry = maybe_entry.expect("The entry should exist");
                    let value = entry.into_value();
                    assert_eq!(*value.read().unwrap(), vec![1]);
                    sleep(Duration::from_millis(200));
                    value.write().unwrap().push(2);
                    Ok(Op::Put(value)) as Result<_, ()>
                })
        })
    };

    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(300));
            cache3.entry(KEY).and_try_compute_with(|maybe_entry| {
                let entry = maybe_entry.expect("The entry should exist");
                let value = entry.into_value();
                assert_eq!(*value.read().unwrap(), vec![1, 2]);
                sleep(Duration::from_millis(200));
                Err(())
            })
        })
    };

    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(500));
            cache4.entry(KEY).and_try_compute_with(|maybe_entry| {
                let entry = maybe_entry.expect("The entry should exist");
                let value = entry.into_value();
                assert_eq!(*value.read().unwrap(), vec![1, 2]);
                sleep(Duration::from_millis(100));
                Ok(Op::Remove) as Result<_, ()>
            })
        })
    };

    let res1 = thread1.join().expect("Thread 1 should finish");
    let res2 = thread2.join().expect("Thread 2 should finish");
    let res3 = thread3.join().expect("Thread 3 should finish");
    let res4 = thread4.join().expect("Thread 4 should finish");

    let Ok(CompResult::Inserted(entry)) = res1 else {
        panic!("Expected `Inserted`. Got {res1:?}")
    };
    assert_eq!(
        *entry.into_value().read().unwrap(),
        vec![1, 2] // The same Vec was modified by task2.
    );

    let Ok(CompResult::ReplacedWith(entry)) = res2 else {
        panic!("Expected `ReplacedWith`. Got {res2:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);

    assert!(res3.is_err());

    let Ok(CompResult::Removed(entry)) = res4 else {
        panic!("Expected `Removed`. Got {res4:?}")
    };
    assert_eq!(
        *entry.into_value().read().unwrap(),
        vec![1, 2] // Removed value.
    );

    assert!(no_loads_in_flight(&cache));
}

#[test]
// https://github.com/moka-rs/moka/issues/43
fn handle_panic_in_get_with() {
    let _dog = watchdog(LIMIT, "handle_panic_in_get_with");
    use std::{sync::Barrier, thread};

    let cache = Cache::new(16);
    let barrier = Arc::new(Barrier::new(2));
    {
        let cache_ref = cache.clone();
        let barrier_ref = barrier.clone();
        thread::spawn(move || {
            let _ = cache_ref.get_with(1, || {
                barrier_ref.wait();
                thread::sleep(Duration::from_millis(50));
                panic!("Panic during get_with");
            });
        });
    }

    barrier.wait();
    assert_eq!(cache.get_with(1, || 5), 5);

    assert!(no_loads_in_flight(&cache));
}

#[test]
// https://github.com/moka-rs/moka/issues/43
fn handle_panic_in_try_get_with() {
    let _dog = watchdog(LIMIT, "handle_panic_in_try_get_with");
    use std::{sync::Barrier, thread};

    let cache = Cache::new(16);
    let barrier = Arc::new(Barrier::new(2));
    {
        let cache_ref = cache.clone();
        let barrier_ref = barrier.clone();
        thread::spawn(move || {
            let _ = cache_ref.try_get_with(1, || {
                barrier_ref.wait();
                thread::sleep(Duration::from_millis(50));
                panic!("Panic during try_get_with");
            }) as Result<_, Arc<Infallible>>;
        });
    }

    barrier.wait();
    assert_eq!(
        cache.try_get_with(1, || Ok(5)) as Result<_, Arc<Infallible>>,
        Ok(5)
    );

    assert!(no_loads_in_flight(&cache));
}

#[test]
fn test_removal_notifications() {
    let _dog = watchdog(LIMIT, "test_removal_notifications");
    // The following `Vec`s will hold actual and expected notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));
    let mut expected = Vec::new();

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    // Create a cache with the eviction listener.
    let cache = Cache::builder()
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
}

// HERDCACHE (fails): documented difference: a `get` that finds an expired entry reclaims it (eviction_listener docs: "a `get` that reclaimed an expired entry"): entry_count() is 0, not 1.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn test_immediate_removal_notifications_with_updates() {
    let _dog = watchdog(LIMIT, "test_immediate_removal_notifications_with_updates");
    // The following `Vec` will hold actual notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));

    // Create an eviction listener.
    let a1 = Arc::clone(&actual);
    let listener = recorder(a1);

    let (clock, mock) = mock_clock();

    // Create a cache with the eviction listener and also TTL and TTI.
    let cache = Cache::builder()
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
    assert_eq!(cache.get(&"alice"), None);

    // We have not ran sync after the expiration of alice (a0), so it is
    // still in the cache.
    assert_eq!(cache.entry_count(), 1);

    // Re-insert alice with a different value. Since alice (a0) is still
    // in the cache, this is actually a replace operation rather than an
    // insert operation. We want to verify that the RemovalCause of a0 is
    // Expired, not Replaced.
    cache.insert("alice", "a1");
    {
        let mut a = actual.lock();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0], (Arc::new("alice"), "a0", RemovalCause::Expired));
        a.clear();
    }

    cache.run_pending_tasks();

    mock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), Some("a1"));
    cache.run_pending_tasks();

    // Now alice has been expired by time-to-live (TTL).
    mock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), None);

    // But, again, it is still in the cache.
    assert_eq!(cache.entry_count(), 1);

    // Re-insert alice with a different value and verify that the
    // RemovalCause of a1 is Expired (not Replaced).
    cache.insert("alice", "a2");
    {
        let mut a = actual.lock();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0], (Arc::new("alice"), "a1", RemovalCause::Expired));
        a.clear();
    }

    cache.run_pending_tasks();

    assert_eq!(cache.entry_count(), 1);

    // Now alice (a2) has been expired by the idle timeout.
    mock.advance(Duration::from_secs(6));
    assert_eq!(cache.get(&"alice"), None);
    assert_eq!(cache.entry_count(), 1);

    // This invalidate will internally remove alice (a2).
    cache.invalidate(&"alice");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    {
        let mut a = actual.lock();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0], (Arc::new("alice"), "a2", RemovalCause::Expired));
        a.clear();
    }

    // Re-insert, and this time, make it expired by the TTL.
    cache.insert("alice", "a3");
    cache.run_pending_tasks();
    mock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), Some("a3"));
    cache.run_pending_tasks();
    mock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), None);
    assert_eq!(cache.entry_count(), 1);

    // This invalidate will internally remove alice (a2).
    cache.invalidate(&"alice");
    cache.run_pending_tasks();

    assert_eq!(cache.entry_count(), 0);

    {
        let mut a = actual.lock();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0], (Arc::new("alice"), "a3", RemovalCause::Expired));
        a.clear();
    }

    assert!(no_loads_in_flight(&cache));
}

// This test ensures the key-level lock for the immediate notification
// delivery mode is working so that the notifications for a given key
// should always be ordered. This is true even if multiple client threads
// try to modify the entries for the key at the same time. (This test will
// run three client threads)
//
// This test is ignored by default. It becomes unstable when run in parallel
// with other tests.
// HERDCACHE (fails): documented (implied) difference: the listener "runs after the shard's lock is released, on the thread whose call removed the entry": no per-key serialisation, notifications of one key overlap.
#[test]
#[ignore]
fn test_key_lock_used_by_immediate_removal_notifications() {
    let _dog = watchdog(
        LIMIT,
        "test_key_lock_used_by_immediate_removal_notifications",
    );
    use std::thread::{sleep, spawn};

    const KEY: &str = "alice";

    type Val = &'static str;

    #[derive(PartialEq, Eq, Debug)]
    enum Event {
        Insert(Val),
        Invalidate(Val),
        BeginNotify(Val, RemovalCause),
        EndNotify(Val, RemovalCause),
    }

    // The following `Vec will hold actual notifications.
    let actual = Arc::new(Mutex::new(Vec::new()));

    // Create an eviction listener.
    // Note that this listener is slow and will take 300 ms to complete.
    let a0 = Arc::clone(&actual);
    let listener = move |_k: &&str, v: &Val, cause| {
        a0.lock().push(Event::BeginNotify(*v, cause));
        sleep(Duration::from_millis(300));
        a0.lock().push(Event::EndNotify(*v, cause));
    };

    // Create a cache with the eviction listener and also TTL 500 ms.
    let cache = Cache::builder()
        .max_capacity(UNBOUNDED) // moka: unbounded
        .eviction_listener(listener)
        .time_to_live(Duration::from_millis(500))
        .build();

    // - Notifications for the same key must not overlap.

    // Time  Event
    // ----- -------------------------------------
    // 0000: Insert value a0
    // 0500: a0 expired
    // 0600: Insert value a1 -> expired a0 (N-A0)
    // 0800: Insert value a2 (waiting) (A-A2)
    // 0900: N-A0 processed
    //       A-A2 finished waiting -> replace a1 (N-A1)
    // 1100: Invalidate (waiting) (R-A2)
    // 1200: N-A1 processed
    //       R-A2 finished waiting -> explicit a2 (N-A2)
    // 1500: N-A2 processed

    let expected = vec![
        Event::Insert("a0"),
        Event::Insert("a1"),
        Event::BeginNotify("a0", RemovalCause::Expired),
        Event::Insert("a2"),
        Event::EndNotify("a0", RemovalCause::Expired),
        Event::BeginNotify("a1", RemovalCause::Replaced),
        Event::Invalidate("a2"),
        Event::EndNotify("a1", RemovalCause::Replaced),
        Event::BeginNotify("a2", RemovalCause::Explicit),
        Event::EndNotify("a2", RemovalCause::Explicit),
    ];

    // 0000: Insert value a0
    actual.lock().push(Event::Insert("a0"));
    cache.insert(KEY, "a0");
    // Call `sync` to set the last modified for the KEY immediately so that
    // this entry should expire in 1000 ms from now.
    cache.run_pending_tasks();

    // 0500: Insert value a1 -> expired a0 (N-A0)
    let thread1 = {
        let a1 = Arc::clone(&actual);
        let c1 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(600));
            a1.lock().push(Event::Insert("a1"));
            c1.insert(KEY, "a1");
        })
    };

    // 0800: Insert value a2 (waiting) (A-A2)
    let thread2 = {
        let a2 = Arc::clone(&actual);
        let c2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(800));
            a2.lock().push(Event::Insert("a2"));
            c2.insert(KEY, "a2");
        })
    };

    // 1100: Invalidate (waiting) (R-A2)
    let thread3 = {
        let a3 = Arc::clone(&actual);
        let c3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(1100));
            a3.lock().push(Event::Invalidate("a2"));
            c3.invalidate(&KEY);
        })
    };

    for t in [thread1, thread2, thread3] {
        t.join().expect("Failed to join");
    }

    let actual = actual.lock();
    assert_eq!(actual.len(), expected.len());

    for (i, (actual, expected)) in actual.iter().zip(&expected).enumerate() {
        assert_eq!(actual, expected, "expected[{i}]");
    }

    assert!(no_loads_in_flight(&cache));
}

// When the eviction listener is not set, calling `run_pending_tasks` once should
// evict all entries that can be removed.
// HERDCACHE (fails): documented difference: "The bound holds when insert returns" (README): entry_count() is exact at once, old keys are evicted inside insert.
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn no_batch_size_limit_on_eviction() {
    let _dog = watchdog(LIMIT, "no_batch_size_limit_on_eviction");
    const MAX_CAPACITY: u64 = 20;

    const EVICTION_TIMEOUT: Duration = Duration::from_nanos(0);
    const MAX_LOG_SYNC_REPEATS: u32 = 1;
    const EVICTION_BATCH_SIZE: u32 = 1;

    // MOKA-INTERNAL: `HousekeeperConfig` / `.housekeeper_config(hk_conf)` are moka's
    // `#[cfg(test)] pub(crate)` knobs (eviction batch size and timeout); herdcache has no
    // housekeeper. Dropped; the scenario and assertions are kept.

    // Create a cache with the LRU policy.
    let cache = Cache::builder()
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
}

// HERDCACHE (fails): documented difference: as no_batch_size_limit_on_eviction (eviction is inline; moka's housekeeper batching/timeout does not exist).
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn slow_eviction_listener() {
    let _dog = watchdog(LIMIT, "slow_eviction_listener");
    const MAX_CAPACITY: u64 = 20;

    const EVICTION_TIMEOUT: Duration = Duration::from_millis(30);
    const LISTENER_DELAY: Duration = Duration::from_millis(11);
    const MAX_LOG_SYNC_REPEATS: u32 = 1;
    const EVICTION_BATCH_SIZE: u32 = 1;

    // MOKA-INTERNAL: `HousekeeperConfig` / `.housekeeper_config(hk_conf)` are moka's
    // `#[cfg(test)] pub(crate)` knobs (eviction batch size and timeout); herdcache has no
    // housekeeper. Dropped; the scenario and assertions are kept.

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
    let cache = Cache::builder()
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
        cache.insert(i, v);
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
}

// NOTE: To enable the panic logging, run the following command:
//
// RUST_LOG=moka=info cargo test --features 'logging' -- \
//   sync::cache::tests::recover_from_panicking_eviction_listener --exact --nocapture
//
// HERDCACHE (fails): documented difference: "A panicking eviction listener panics its caller" (README).
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn recover_from_panicking_eviction_listener() {
    let _dog = watchdog(LIMIT, "recover_from_panicking_eviction_listener");

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
    let cache = Cache::builder()
        .max_capacity(UNBOUNDED) // moka: unbounded
        .name("My Sync Cache")
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
}

// This test ensures that the `contains_key`, `get` and `invalidate` can use
// borrowed form `&[u8]` for key with type `Vec<u8>`.
// https://github.com/moka-rs/moka/issues/166
#[test]
fn borrowed_forms_of_key() {
    let _dog = watchdog(LIMIT, "borrowed_forms_of_key");
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
}

// Ignored by default. This test becomes unstable when run in parallel with
// other tests.
#[test]
#[ignore]
fn drop_value_immediately_after_eviction() {
    let _dog = watchdog(LIMIT, "drop_value_immediately_after_eviction");

    const MAX_CAPACITY: u32 = 500;
    const KEYS: u32 = ((MAX_CAPACITY as f64) * 1.2) as u32;

    let counters = Arc::new(Counters::default());
    let counters1 = Arc::clone(&counters);

    let listener = move |_k: &u32, _v: &Arc<Value>, cause| match cause {
        RemovalCause::Size => counters1.incl_evicted(),
        RemovalCause::Explicit => counters1.incl_invalidated(),
        _ => (),
    };

    let cache = Cache::builder()
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

    cache.run_pending_tasks();
    assert_eq!(counters.inserted(), KEYS, "inserted");
    assert_eq!(counters.value_created(), KEYS, "value_created");
    assert_eq!(counters.evicted(), eviction_count, "evicted");
    assert_eq!(counters.invalidated(), 0, "invalidated");
    assert_eq!(counters.value_dropped(), eviction_count, "value_dropped");

    for key in 0..KEYS {
        cache.invalidate(&key);
        cache.run_pending_tasks();
    }

    cache.run_pending_tasks();
    assert_eq!(counters.inserted(), KEYS, "inserted");
    assert_eq!(counters.value_created(), KEYS, "value_created");
    assert_eq!(counters.evicted(), eviction_count, "evicted");
    assert_eq!(counters.invalidated(), MAX_CAPACITY, "invalidated");
    assert_eq!(counters.value_dropped(), KEYS, "value_dropped");

    std::mem::drop(cache);
    assert_eq!(counters.value_dropped(), KEYS, "value_dropped");
}

// For testing the issue reported by: https://github.com/moka-rs/moka/issues/383
//
// Ignored by default. This test becomes unstable when run in parallel with
// other tests.
#[test]
#[ignore]
fn ensure_gc_runs_when_dropping_cache() {
    let _dog = watchdog(LIMIT, "ensure_gc_runs_when_dropping_cache");
    let cache = Cache::builder()
        .max_capacity(UNBOUNDED) // moka: unbounded
        .build();
    let val = Arc::new(0);
    {
        let val = Arc::clone(&val);
        cache.get_with(1, move || val);
    }
    drop(cache);
    assert_eq!(Arc::strong_count(&val), 1);
}

// HERDCACHE (fails): documented difference: "`Debug` shows the configuration, not the contents" (README).
#[test]
#[ignore = "a documented difference from moka (see the comment above)"]
fn test_debug_format() {
    let _dog = watchdog(LIMIT, "test_debug_format");
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
}

// ---------------------------------------------------------------------------------------------
// moka's `src/sync/segment.rs` tests (`SegmentedCache`), same names, in `mod segment`.
// `SegmentedCache::new(n, s)` -> `Cache::builder().max_capacity(n).shards(s).build()`;
// `SegmentedCache::builder(s)` -> `Cache::builder().shards(s)` (the README's mapping).
// ---------------------------------------------------------------------------------------------
mod segment {
    use super::*;
    use std::{error::Error, fmt::Display};

    type NotificationPair<V> = (V, RemovalCause);

    fn segmented_new<K, V>(max_capacity: u64, segments: usize) -> Cache<K, V>
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
        V: Send + Sync + 'static,
    {
        Cache::builder()
            .max_capacity(max_capacity)
            .shards(segments)
            .build()
    }

    /// moka's `move |k, v, cause| { a1.lock().insert(k, (v, cause)); }`.
    fn map_recorder<K, V>(
        actual: Arc<Mutex<std::collections::HashMap<Arc<K>, NotificationPair<V>>>>,
    ) -> impl Fn(&K, &V, RemovalCause) + Send + Sync + 'static
    where
        K: Clone + std::hash::Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        move |k: &K, v: &V, cause| {
            actual
                .lock()
                .insert(Arc::new(k.clone()), (v.clone(), cause));
        }
    }

    fn verify_notification_map<K, V, S>(
        cache: &Cache<K, V, S>,
        actual: Arc<Mutex<std::collections::HashMap<Arc<K>, NotificationPair<V>>>>,
        expected: &std::collections::HashMap<Arc<K>, NotificationPair<V>>,
    ) where
        K: std::hash::Hash + Eq + std::fmt::Display + Send + Sync + 'static,
        V: Eq + std::fmt::Debug + Clone + Send + Sync + 'static,
        S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
    {
        cache.run_pending_tasks();
        let actual = &*actual.lock();
        assert_eq!(actual.len(), expected.len(), "notification count");
        for actual_key in actual.keys() {
            assert_eq!(
                actual.get(actual_key),
                expected.get(actual_key),
                "expected[{actual_key}]",
            );
        }
    }

    #[test]
    fn max_capacity_zero() {
        let _dog = watchdog(LIMIT, "segment::max_capacity_zero");
        let cache = segmented_new(0, 1);

        cache.insert(0, ());

        assert!(!cache.contains_key(&0));
        assert!(cache.get(&0).is_none());
        cache.run_pending_tasks();
        assert!(!cache.contains_key(&0));
        assert!(cache.get(&0).is_none());
        assert_eq!(cache.entry_count(), 0)
    }

    // HERDCACHE (fails): documented difference: admission. herdcache counts inserts (not misses) in its sketch and duels the oldest FIFO victim (src/policy.rs, DESIGN.md "Policy"); "d" is admitted only at its 4th insert.
    #[test]
    #[ignore = "a documented difference from moka (see the comment above)"]
    fn basic_single_thread() {
        let _dog = watchdog(LIMIT, "segment::basic_single_thread");
        // The following `Vec`s will hold actual and expected notifications.
        let actual = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = recorder(a1);

        // Create a cache with the eviction listener.
        let cache = Cache::builder()
            .shards(1)
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
    }

    #[test]
    fn non_power_of_two_segments() {
        let _dog = watchdog(LIMIT, "segment::non_power_of_two_segments");
        let cache = segmented_new(100, 5);

        assert_eq!(cache.iter().count(), 0);

        cache.insert("a", "alice");
        cache.insert("b", "bob");
        cache.insert("c", "cindy");

        assert_eq!(cache.iter().count(), 3);
        cache.run_pending_tasks();
        assert_eq!(cache.iter().count(), 3);
    }

    // HERDCACHE (fails): documented difference: a cache with a weigher runs rule `g` (a key in the ghost of recent evictions is admitted; DESIGN.md "Policy"): "d" gets in at its 2nd insert, evicting "a" and "b".
    #[test]
    #[ignore = "a documented difference from moka (see the comment above)"]
    fn size_aware_eviction() {
        let _dog = watchdog(LIMIT, "segment::size_aware_eviction");
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
        let cache = Cache::builder()
            .shards(1)
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
    }

    #[test]
    fn basic_multi_threads() {
        let _dog = watchdog(LIMIT, "segment::basic_multi_threads");
        let num_threads = 4;

        let cache = segmented_new(100, num_threads);

        // https://rust-lang.github.io/rust-clippy/master/index.html#needless_collect
        #[allow(clippy::needless_collect)]
        let handles = (0..num_threads)
            .map(|id| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    cache.insert(10, format!("{id}-100"));
                    cache.get(&10);
                    cache.run_pending_tasks();
                    cache.insert(20, format!("{id}-200"));
                    cache.invalidate(&10);
                })
            })
            .collect::<Vec<_>>();

        handles.into_iter().for_each(|h| h.join().expect("Failed"));

        cache.run_pending_tasks();

        assert!(cache.get(&10).is_none());
        assert!(cache.get(&20).is_some());
        assert!(!cache.contains_key(&10));
        assert!(cache.contains_key(&20));
    }

    #[test]
    fn invalidate_all() {
        let _dog = watchdog(LIMIT, "segment::invalidate_all");
        use std::collections::HashMap;

        // The following `HashMap`s will hold actual and expected notifications.
        // Note: We use `HashMap` here as the order of invalidations is non-deterministic.
        let actual = Arc::new(Mutex::new(HashMap::new()));
        let mut expected = HashMap::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = map_recorder(a1);

        // Create a cache with the eviction listener.
        let cache = Cache::builder()
            .shards(4)
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
        expected.insert(Arc::new("a"), ("alice", RemovalCause::Explicit));
        expected.insert(Arc::new("b"), ("bob", RemovalCause::Explicit));
        expected.insert(Arc::new("c"), ("cindy", RemovalCause::Explicit));
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

        verify_notification_map(&cache, actual, &expected);
    }

    #[test]
    fn invalidate_entries_if() -> Result<(), Box<dyn std::error::Error>> {
        let _dog = watchdog(LIMIT, "segment::invalidate_entries_if");
        use std::collections::{HashMap, HashSet};

        const SEGMENTS: usize = 4;

        // The following `HashMap`s will hold actual and expected notifications.
        // Note: We use `HashMap` here as the order of invalidations is non-deterministic.
        let actual = Arc::new(Mutex::new(HashMap::new()));
        let mut expected = HashMap::new();

        // Create an eviction listener.
        let a1 = Arc::clone(&actual);
        let listener = map_recorder(a1);

        let (clock, mock) = mock_clock();

        // Create a cache with the eviction listener.
        let cache = Cache::builder()
            .shards(SEGMENTS)
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
        // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), SEGMENTS);
        expected.insert(Arc::new(0), ("alice", RemovalCause::Explicit));
        expected.insert(Arc::new(2), ("alex", RemovalCause::Explicit));

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
        // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), 0);

        mock.advance(Duration::from_secs(5)); // 15 secs from the start.

        cache.invalidate_entries_if(|_k, &v| v == "alice")?;
        cache.invalidate_entries_if(|_k, &v| v == "bob")?;
        // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), SEGMENTS * 2);
        expected.insert(Arc::new(1), ("bob", RemovalCause::Explicit));
        expected.insert(Arc::new(3), ("alice", RemovalCause::Explicit));

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
        // MOKA-INTERNAL (test hook, no herdcache equivalent): assert_eq!(cache.invalidation_predicate_count(), 0);

        verify_notification_map(&cache, actual, &expected);

        Ok(())
    }

    #[test]
    fn test_iter() {
        let _dog = watchdog(LIMIT, "segment::test_iter");
        const NUM_KEYS: usize = 50;

        fn make_value(key: usize) -> String {
            format!("val: {key}")
        }

        // let cache = Cache::builder().shards(5)
        let cache = Cache::builder()
            .shards(4)
            .max_capacity(100)
            .time_to_idle(Duration::from_secs(10))
            .build();

        for key in 0..NUM_KEYS {
            cache.insert(key, make_value(key));
        }

        let mut key_set = std::collections::HashSet::new();

        for (key, value) in &cache {
            assert_eq!(value, make_value(key)); // herdcache: K, not Arc<K>

            key_set.insert(key);
        }

        // Ensure there are no missing or duplicate keys in the iteration.
        assert_eq!(key_set.len(), NUM_KEYS);
    }

    /// Runs 16 threads at the same time and ensures no deadlock occurs.
    ///
    /// - Eight of the threads will update key-values in the cache.
    /// - Eight others will iterate the cache.
    ///
    #[test]
    fn test_iter_multi_threads() {
        let _dog = watchdog(LIMIT, "segment::test_iter_multi_threads");
        use std::collections::HashSet;

        const NUM_KEYS: usize = 1024;
        const NUM_THREADS: usize = 16;

        fn make_value(key: usize) -> String {
            format!("val: {key}")
        }

        let cache = Cache::builder()
            .shards(4)
            .max_capacity(2048)
            .time_to_idle(Duration::from_secs(10))
            .build();

        // Initialize the cache.
        for key in 0..NUM_KEYS {
            cache.insert(key, make_value(key));
        }

        let rw_lock = Arc::new(std::sync::RwLock::<()>::default());
        let write_lock = rw_lock.write().unwrap();

        // https://rust-lang.github.io/rust-clippy/master/index.html#needless_collect
        #[allow(clippy::needless_collect)]
        let handles = (0..NUM_THREADS)
            .map(|n| {
                let cache = cache.clone();
                let rw_lock = Arc::clone(&rw_lock);

                if n % 2 == 0 {
                    // This thread will update the cache.
                    std::thread::spawn(move || {
                        let read_lock = rw_lock.read().unwrap();
                        for key in 0..NUM_KEYS {
                            // TODO: Update keys in a random order?
                            cache.insert(key, make_value(key));
                        }
                        std::mem::drop(read_lock);
                    })
                } else {
                    // This thread will iterate the cache.
                    std::thread::spawn(move || {
                        let read_lock = rw_lock.read().unwrap();
                        let mut key_set = HashSet::new();
                        for (key, value) in &cache {
                            assert_eq!(value, make_value(key)); // herdcache: K, not Arc<K>
                            key_set.insert(key);
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

        handles.into_iter().for_each(|h| h.join().expect("Failed"));

        // Ensure there are no missing or duplicate keys in the iteration.
        let key_set = cache.iter().map(|(k, _v)| k).collect::<HashSet<_>>();
        assert_eq!(key_set.len(), NUM_KEYS);
    }

    #[test]
    fn get_with() {
        let _dog = watchdog(LIMIT, "segment::get_with");
        use std::thread::{sleep, spawn};

        let cache = segmented_new(100, 4);
        const KEY: u32 = 0;

        // This test will run five threads:
        //
        // Thread1 will be the first thread to call `get_with` for a key, so its init
        // closure will be evaluated and then a &str value "thread1" will be inserted
        // to the cache.
        let thread1 = {
            let cache1 = cache.clone();
            spawn(move || {
                // Call `get_with` immediately.
                let v = cache1.get_with(KEY, || {
                    // Wait for 300 ms and return a &str value.
                    sleep(Duration::from_millis(300));
                    "thread1"
                });
                assert_eq!(v, "thread1");
            })
        };

        // Thread2 will be the second thread to call `get_with` for the same key, so
        // its init closure will not be evaluated. Once thread1's init closure
        // finishes, it will get the value inserted by thread1's init closure.
        let thread2 = {
            let cache2 = cache.clone();
            spawn(move || {
                // Wait for 100 ms before calling `get_with`.
                sleep(Duration::from_millis(100));
                let v = cache2.get_with(KEY, || unreachable!());
                assert_eq!(v, "thread1");
            })
        };

        // Thread3 will be the third thread to call `get_with` for the same key. By
        // the time it calls, thread1's init closure should have finished already and
        // the value should be already inserted to the cache. So its init closure
        // will not be evaluated and will get the value insert by thread1's init
        // closure immediately.
        let thread3 = {
            let cache3 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `get_with`.
                sleep(Duration::from_millis(400));
                let v = cache3.get_with(KEY, || unreachable!());
                assert_eq!(v, "thread1");
            })
        };

        // Thread4 will call `get` for the same key. It will call when thread1's init
        // closure is still running, so it will get none for the key.
        let thread4 = {
            let cache4 = cache.clone();
            spawn(move || {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200));
                let maybe_v = cache4.get(&KEY);
                assert!(maybe_v.is_none());
            })
        };

        // Thread5 will call `get` for the same key. It will call after thread1's init
        // closure finished, so it will get the value insert by thread1's init closure.
        let thread5 = {
            let cache5 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400));
                let maybe_v = cache5.get(&KEY);
                assert_eq!(maybe_v, Some("thread1"));
            })
        };

        for t in [thread1, thread2, thread3, thread4, thread5] {
            t.join().expect("Failed to join");
        }

        assert!(no_loads_in_flight(&cache));
    }

    #[test]
    fn get_with_if() {
        let _dog = watchdog(LIMIT, "segment::get_with_if");
        use std::thread::{sleep, spawn};

        let cache = segmented_new(100, 4);
        const KEY: u32 = 0;

        // This test will run seven threads:
        //
        // Thread1 will be the first thread to call `get_with_if` for a key, so its
        // init closure will be evaluated and then a &str value "thread1" will be
        // inserted to the cache.
        let thread1 = {
            let cache1 = cache.clone();
            spawn(move || {
                // Call `get_with` immediately.
                let v = cache1.get_with_if(
                    KEY,
                    || {
                        // Wait for 300 ms and return a &str value.
                        sleep(Duration::from_millis(300));
                        "thread1"
                    },
                    |_v| unreachable!(),
                );
                assert_eq!(v, "thread1");
            })
        };

        // Thread2 will be the second thread to call `get_with_if` for the same key,
        // so its init closure will not be evaluated. Once thread1's init closure
        // finishes, it will get the value inserted by thread1's init closure.
        let thread2 = {
            let cache2 = cache.clone();
            spawn(move || {
                // Wait for 100 ms before calling `get_with`.
                sleep(Duration::from_millis(100));
                let v = cache2.get_with_if(KEY, || unreachable!(), |_v| unreachable!());
                assert_eq!(v, "thread1");
            })
        };

        // Thread3 will be the third thread to call `get_with_if` for the same
        // key. By the time it calls, thread1's init closure should have finished
        // already and the value should be already inserted to the cache. Also
        // thread3's `replace_if` closure returns `false`. So its init closure will
        // not be evaluated and will get the value inserted by thread1's init closure
        // immediately.
        let thread3 = {
            let cache3 = cache.clone();
            spawn(move || {
                // Wait for 350 ms before calling `get_with_if`.
                sleep(Duration::from_millis(350));
                let v = cache3.get_with_if(
                    KEY,
                    || unreachable!(),
                    |v| {
                        assert_eq!(v, &"thread1");
                        false
                    },
                );
                assert_eq!(v, "thread1");
            })
        };

        // Thread4 will be the fourth thread to call `get_with_if` for the same
        // key. The value should have been already inserted to the cache by
        // thread1. However thread4's `replace_if` closure returns `true`. So its
        // init closure will be evaluated to replace the current value.
        let thread4 = {
            let cache4 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `get_with_if`.
                sleep(Duration::from_millis(400));
                let v = cache4.get_with_if(
                    KEY,
                    || "thread4",
                    |v| {
                        assert_eq!(v, &"thread1");
                        true
                    },
                );
                assert_eq!(v, "thread4");
            })
        };

        // Thread5 will call `get` for the same key. It will call when thread1's init
        // closure is still running, so it will get none for the key.
        let thread5 = {
            let cache5 = cache.clone();
            spawn(move || {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200));
                let maybe_v = cache5.get(&KEY);
                assert!(maybe_v.is_none());
            })
        };

        // Thread6 will call `get` for the same key. It will call when thread1's init
        // closure is still running, so it will get none for the key.
        let thread6 = {
            let cache6 = cache.clone();
            spawn(move || {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(350));
                let maybe_v = cache6.get(&KEY);
                assert_eq!(maybe_v, Some("thread1"));
            })
        };

        // Thread7 will call `get` for the same key. It will call after thread1's init
        // closure finished, so it will get the value insert by thread1's init closure.
        let thread7 = {
            let cache7 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(450));
                let maybe_v = cache7.get(&KEY);
                assert_eq!(maybe_v, Some("thread4"));
            })
        };

        for t in [
            thread1, thread2, thread3, thread4, thread5, thread6, thread7,
        ] {
            t.join().expect("Failed to join");
        }

        assert!(no_loads_in_flight(&cache));
    }

    #[test]
    fn try_get_with() {
        let _dog = watchdog(LIMIT, "segment::try_get_with");
        use std::{
            sync::Arc,
            thread::{sleep, spawn},
        };

        #[derive(Debug)]
        pub struct MyError(String);

        impl Display for MyError {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl Error for MyError {}

        type MyResult<T> = Result<T, Arc<MyError>>;

        let cache = segmented_new(100, 4);
        const KEY: u32 = 0;

        // This test will run eight threads:
        //
        // Thread1 will be the first thread to call `try_get_with` for a key, so its
        // init closure will be evaluated and then an error will be returned. Nothing
        // will be inserted to the cache.
        let thread1 = {
            let cache1 = cache.clone();
            spawn(move || {
                // Call `try_get_with` immediately.
                let v = cache1.try_get_with(KEY, || {
                    // Wait for 300 ms and return an error.
                    sleep(Duration::from_millis(300));
                    Err(MyError("thread1 error".into()))
                });
                assert!(v.is_err());
            })
        };

        // Thread2 will be the second thread to call `try_get_with` for the same key,
        // so its init closure will not be evaluated. Once thread1's init closure
        // finishes, it will get the same error value returned by thread1's init
        // closure.
        let thread2 = {
            let cache2 = cache.clone();
            spawn(move || {
                // Wait for 100 ms before calling `try_get_with`.
                sleep(Duration::from_millis(100));
                let v: MyResult<_> = cache2.try_get_with(KEY, || unreachable!());
                assert!(v.is_err());
            })
        };

        // Thread3 will be the third thread to call `get_with` for the same key. By
        // the time it calls, thread1's init closure should have finished already,
        // but the key still does not exist in the cache. So its init closure will be
        // evaluated and then an okay &str value will be returned. That value will be
        // inserted to the cache.
        let thread3 = {
            let cache3 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `try_get_with`.
                sleep(Duration::from_millis(400));
                let v: MyResult<_> = cache3.try_get_with(KEY, || {
                    // Wait for 300 ms and return an Ok(&str) value.
                    sleep(Duration::from_millis(300));
                    Ok("thread3")
                });
                assert_eq!(v.unwrap(), "thread3");
            })
        };

        // thread4 will be the fourth thread to call `try_get_with` for the same
        // key. So its init closure will not be evaluated. Once thread3's init
        // closure finishes, it will get the same okay &str value.
        let thread4 = {
            let cache4 = cache.clone();
            spawn(move || {
                // Wait for 500 ms before calling `try_get_with`.
                sleep(Duration::from_millis(500));
                let v: MyResult<_> = cache4.try_get_with(KEY, || unreachable!());
                assert_eq!(v.unwrap(), "thread3");
            })
        };

        // Thread5 will be the fifth thread to call `try_get_with` for the same
        // key. So its init closure will not be evaluated. By the time it calls,
        // thread3's init closure should have finished already, so its init closure
        // will not be evaluated and will get the value insert by thread3's init
        // closure immediately.
        let thread5 = {
            let cache5 = cache.clone();
            spawn(move || {
                // Wait for 800 ms before calling `try_get_with`.
                sleep(Duration::from_millis(800));
                let v: MyResult<_> = cache5.try_get_with(KEY, || unreachable!());
                assert_eq!(v.unwrap(), "thread3");
            })
        };

        // Thread6 will call `get` for the same key. It will call when thread1's init
        // closure is still running, so it will get none for the key.
        let thread6 = {
            let cache6 = cache.clone();
            spawn(move || {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200));
                let maybe_v = cache6.get(&KEY);
                assert!(maybe_v.is_none());
            })
        };

        // Thread7 will call `get` for the same key. It will call after thread1's init
        // closure finished with an error. So it will get none for the key.
        let thread7 = {
            let cache7 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400));
                let maybe_v = cache7.get(&KEY);
                assert!(maybe_v.is_none());
            })
        };

        // Thread8 will call `get` for the same key. It will call after thread3's init
        // closure finished, so it will get the value insert by thread3's init closure.
        let thread8 = {
            let cache8 = cache.clone();
            spawn(move || {
                // Wait for 800 ms before calling `get`.
                sleep(Duration::from_millis(800));
                let maybe_v = cache8.get(&KEY);
                assert_eq!(maybe_v, Some("thread3"));
            })
        };

        for t in [
            thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
        ] {
            t.join().expect("Failed to join");
        }

        assert!(no_loads_in_flight(&cache));
    }

    #[test]
    fn optionally_get_with() {
        let _dog = watchdog(LIMIT, "segment::optionally_get_with");
        use std::thread::{sleep, spawn};

        let cache = segmented_new(100, 4);
        const KEY: u32 = 0;

        // This test will run eight threads:
        //
        // Thread1 will be the first thread to call `optionally_get_with` for a key, so its
        // init closure will be evaluated and then an error will be returned. Nothing
        // will be inserted to the cache.
        let thread1 = {
            let cache1 = cache.clone();
            spawn(move || {
                // Call `optionally_get_with` immediately.
                let v = cache1.optionally_get_with(KEY, || {
                    // Wait for 300 ms and return an error.
                    sleep(Duration::from_millis(300));
                    None
                });
                assert!(v.is_none());
            })
        };

        // Thread2 will be the second thread to call `optionally_get_with` for the same key,
        // so its init closure will not be evaluated. Once thread1's init closure
        // finishes, it will get the same error value returned by thread1's init
        // closure.
        let thread2 = {
            let cache2 = cache.clone();
            spawn(move || {
                // Wait for 100 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(100));
                let v = cache2.optionally_get_with(KEY, || unreachable!());
                assert!(v.is_none());
            })
        };

        // Thread3 will be the third thread to call `get_with` for the same key. By
        // the time it calls, thread1's init closure should have finished already,
        // but the key still does not exist in the cache. So its init closure will be
        // evaluated and then an okay &str value will be returned. That value will be
        // inserted to the cache.
        let thread3 = {
            let cache3 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(400));
                let v = cache3.optionally_get_with(KEY, || {
                    // Wait for 300 ms and return an Ok(&str) value.
                    sleep(Duration::from_millis(300));
                    Some("thread3")
                });
                assert_eq!(v.unwrap(), "thread3");
            })
        };

        // thread4 will be the fourth thread to call `optionally_get_with` for the same
        // key. So its init closure will not be evaluated. Once thread3's init
        // closure finishes, it will get the same okay &str value.
        let thread4 = {
            let cache4 = cache.clone();
            spawn(move || {
                // Wait for 500 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(500));
                let v = cache4.optionally_get_with(KEY, || unreachable!());
                assert_eq!(v.unwrap(), "thread3");
            })
        };

        // Thread5 will be the fifth thread to call `optionally_get_with` for the same
        // key. So its init closure will not be evaluated. By the time it calls,
        // thread3's init closure should have finished already, so its init closure
        // will not be evaluated and will get the value insert by thread3's init
        // closure immediately.
        let thread5 = {
            let cache5 = cache.clone();
            spawn(move || {
                // Wait for 800 ms before calling `optionally_get_with`.
                sleep(Duration::from_millis(800));
                let v = cache5.optionally_get_with(KEY, || unreachable!());
                assert_eq!(v.unwrap(), "thread3");
            })
        };

        // Thread6 will call `get` for the same key. It will call when thread1's init
        // closure is still running, so it will get none for the key.
        let thread6 = {
            let cache6 = cache.clone();
            spawn(move || {
                // Wait for 200 ms before calling `get`.
                sleep(Duration::from_millis(200));
                let maybe_v = cache6.get(&KEY);
                assert!(maybe_v.is_none());
            })
        };

        // Thread7 will call `get` for the same key. It will call after thread1's init
        // closure finished with an error. So it will get none for the key.
        let thread7 = {
            let cache7 = cache.clone();
            spawn(move || {
                // Wait for 400 ms before calling `get`.
                sleep(Duration::from_millis(400));
                let maybe_v = cache7.get(&KEY);
                assert!(maybe_v.is_none());
            })
        };

        // Thread8 will call `get` for the same key. It will call after thread3's init
        // closure finished, so it will get the value insert by thread3's init closure.
        let thread8 = {
            let cache8 = cache.clone();
            spawn(move || {
                // Wait for 800 ms before calling `get`.
                sleep(Duration::from_millis(800));
                let maybe_v = cache8.get(&KEY);
                assert_eq!(maybe_v, Some("thread3"));
            })
        };

        for t in [
            thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
        ] {
            t.join().expect("Failed to join");
        }

        assert!(no_loads_in_flight(&cache));
    }

    // This test ensures that the `contains_key`, `get` and `invalidate` can use
    // borrowed form `&[u8]` for key with type `Vec<u8>`.
    // https://github.com/moka-rs/moka/issues/166
    #[test]
    fn borrowed_forms_of_key() {
        let _dog = watchdog(LIMIT, "segment::borrowed_forms_of_key");
        let cache: Cache<Vec<u8>, ()> = segmented_new(1, 2);

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
    }

    // Ignored by default. This test becomes unstable when run in parallel with
    // other tests.
    #[test]
    #[ignore]
    fn drop_value_immediately_after_eviction() {
        let _dog = watchdog(LIMIT, "segment::drop_value_immediately_after_eviction");

        const NUM_SEGMENTS: usize = 1;
        const MAX_CAPACITY: u32 = 500;
        const KEYS: u32 = ((MAX_CAPACITY as f64) * 1.2) as u32;

        let counters = Arc::new(Counters::default());
        let counters1 = Arc::clone(&counters);

        let listener = move |_k: &u32, _v: &Arc<Value>, cause| match cause {
            RemovalCause::Size => counters1.incl_evicted(),
            RemovalCause::Explicit => counters1.incl_invalidated(),
            _ => (),
        };

        let cache = Cache::builder()
            .shards(NUM_SEGMENTS)
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

        cache.run_pending_tasks();
        assert_eq!(counters.inserted(), KEYS, "inserted");
        assert_eq!(counters.value_created(), KEYS, "value_created");
        assert_eq!(counters.evicted(), eviction_count, "evicted");
        assert_eq!(counters.invalidated(), 0, "invalidated");
        assert_eq!(counters.value_dropped(), eviction_count, "value_dropped");

        for key in 0..KEYS {
            cache.invalidate(&key);
            cache.run_pending_tasks();
        }

        cache.run_pending_tasks();
        assert_eq!(counters.inserted(), KEYS, "inserted");
        assert_eq!(counters.value_created(), KEYS, "value_created");
        assert_eq!(counters.evicted(), eviction_count, "evicted");
        assert_eq!(counters.invalidated(), MAX_CAPACITY, "invalidated");
        assert_eq!(counters.value_dropped(), KEYS, "value_dropped");

        std::mem::drop(cache);
        assert_eq!(counters.value_dropped(), KEYS, "value_dropped");
    }

    // HERDCACHE (fails): documented difference: "`Debug` shows the configuration, not the contents" (README).
    #[test]
    #[ignore = "a documented difference from moka (see the comment above)"]
    fn test_debug_format() {
        let _dog = watchdog(LIMIT, "segment::test_debug_format");
        let cache = segmented_new(10, 4);
        cache.insert('a', "alice");
        cache.insert('b', "bob");
        cache.insert('c', "cindy");

        let debug_str = format!("{cache:?}");
        assert!(debug_str.starts_with('{'));
        assert!(debug_str.contains(r#"'a': "alice""#));
        assert!(debug_str.contains(r#"'b': "bob""#));
        assert!(debug_str.contains(r#"'c': "cindy""#));
        assert!(debug_str.ends_with('}'));
    }
}

// ---------------------------------------------------------------------------------------------
// moka's regression tests for `sync::Cache` in its `tests/` directory (moka-rs/moka, newer
// than the commit above): `eviction_stall_sync.rs`, `timer_wheel_panic_test.rs` and
// `and_compute_with_outcome_sync.rs`, same scenarios and assertions.
// ---------------------------------------------------------------------------------------------

mod regressions {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    use std::thread;
    use std::time::Instant;

    /// moka#590: under LRU, writers re-inserting a pool of keys beside writers of fresh keys
    /// left `weighted_size` growing without bound. Here the bound holds when `insert` returns;
    /// moka's drain rounds are kept (they do nothing here).
    #[test]
    fn eviction_converges_under_concurrent_key_reuse() {
        let _dog = watchdog(
            LIMIT,
            "regressions::eviction_converges_under_concurrent_key_reuse",
        );
        const MAX_CAPACITY: u64 = 10 * 1024 * 1024;
        const VALUE_SIZE: usize = 64 * 1024;
        const WRITERS_PER_GROUP: usize = 10;
        const INSERTS_PER_WRITER: u64 = 1_000;
        const REUSED_KEY_POOL: u64 = 500;

        let cache: Cache<u64, Vec<u8>> = Cache::builder()
            .max_capacity(MAX_CAPACITY)
            .weigher(|_k, v: &Vec<u8>| v.len() as u32)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        let barrier = Arc::new(Barrier::new(WRITERS_PER_GROUP * 2));
        let mut handles = Vec::new();
        for _ in 0..WRITERS_PER_GROUP {
            let (cache, barrier) = (cache.clone(), Arc::clone(&barrier));
            handles.push(thread::spawn(move || {
                barrier.wait();
                for i in 0..INSERTS_PER_WRITER {
                    cache.insert(i % REUSED_KEY_POOL, vec![0u8; VALUE_SIZE]);
                }
            }));
        }
        for writer_id in 0..WRITERS_PER_GROUP {
            let (cache, barrier) = (cache.clone(), Arc::clone(&barrier));
            let base = (writer_id as u64 + 1) * 1_000_000_000;
            handles.push(thread::spawn(move || {
                barrier.wait();
                for i in 0..INSERTS_PER_WRITER {
                    cache.insert(base + i, vec![0u8; VALUE_SIZE]);
                }
            }));
        }
        for h in handles {
            h.join().expect("writer thread panicked");
        }
        for _ in 0..64 {
            cache.run_pending_tasks();
        }
        let (ws, ec) = (cache.weighted_size(), cache.entry_count());
        assert!(ws <= MAX_CAPACITY, "weighted_size {ws} > {MAX_CAPACITY}");
        assert!(ec <= MAX_CAPACITY / VALUE_SIZE as u64, "entry_count {ec}");
        assert_eq!(ws, ec * VALUE_SIZE as u64, "the weight is the entries'");
    }

    type HandleResult<T> = Result<T, String>;

    /// An `Expiry` that gives errors 100 ms and successes no lifetime of their own.
    struct CustomExpiry;

    impl<K, V> Expiry<K, HandleResult<V>> for CustomExpiry {
        fn expire_after_create(&self, _: &K, value: &HandleResult<V>) -> Option<Duration> {
            value.as_ref().err().map(|_| Duration::from_millis(100))
        }

        fn expire_after_update(
            &self,
            _: &K,
            value: &HandleResult<V>,
            _: Option<Duration>,
        ) -> Option<Duration> {
            value.as_ref().err().map(|_| Duration::from_millis(100))
        }
    }

    /// moka's timer-wheel use-after-free: `Expiry` returning `None` on update (unsetting the
    /// lifetime) while other threads read and run the housekeeping. 2 s here (moka: 5 s), and
    /// the invalidations of moka's longer `#[ignore]`d variant added.
    #[test]
    fn test_timer_wheel_panic() {
        let _dog = watchdog(LIMIT, "regressions::test_timer_wheel_panic");
        let test_duration = Duration::from_secs(2);
        const NUM_KEYS: u64 = 100;
        let panics = Arc::new(AtomicUsize::new(0));
        let cache: Cache<u64, HandleResult<u64>> = Cache::builder()
            .name("test_cache")
            .expire_after(CustomExpiry)
            .time_to_idle(Duration::from_secs(240))
            .max_capacity(10000)
            .build();
        let start = Instant::now();
        let mut handles = Vec::new();
        for tid in 0..4u64 {
            let (c, p) = (cache.clone(), Arc::clone(&panics));
            handles.push(thread::spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut ops = 0u64;
                    while start.elapsed() < test_duration {
                        for key in 0..NUM_KEYS {
                            let key = key + tid * 10000;
                            c.insert(key, Err("error".into()));
                            c.insert(key, Ok(ops));
                            if ops % 3 == 0 {
                                c.insert(key, Err("retry".into()));
                            }
                            if ops % 7 == 0 {
                                c.invalidate(&key);
                            }
                            ops += 1;
                        }
                    }
                }));
                if run.is_err() {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }));
            let (c, p) = (cache.clone(), Arc::clone(&panics));
            handles.push(thread::spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut ops = 0u64;
                    while start.elapsed() < test_duration {
                        for key in 0..NUM_KEYS {
                            let _ = c.get(&(key + (ops % 4) * 10000));
                            ops += 1;
                        }
                    }
                }));
                if run.is_err() {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let (hk_cache, hk_panics) = (cache.clone(), Arc::clone(&panics));
        handles.push(thread::spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while start.elapsed() < test_duration {
                    hk_cache.run_pending_tasks();
                    thread::sleep(Duration::from_millis(50));
                }
            }));
            if run.is_err() {
                hk_panics.fetch_add(1, Ordering::Relaxed);
            }
        }));
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(panics.load(Ordering::Relaxed), 0, "threads panicked");
        assert!(cache.entry_count() <= 4 * NUM_KEYS);
        cache.validate();
    }

    // HERDCACHE (fails): documented difference: a plain `insert` or `invalidate` of the key
    // while the closure runs wins over its verdict (`EntryRef::and_compute_with`'s docs; issue
    // #11's "writes win"): the `Put(2)` is not stored, the cache keeps the newer state.
    #[test]
    #[ignore = "a documented difference from moka (see the comment above)"]
    fn observed_some_racing_invalidate_yields_inserted() {
        let _dog = watchdog(
            LIMIT,
            "regressions::observed_some_racing_invalidate_yields_inserted",
        );
        let cache: Cache<String, u64> = Cache::builder().max_capacity(100).build();
        let key = "k".to_string();
        cache.insert(key.clone(), 0);
        let (before, after) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let helper = {
            let (cache, key) = (cache.clone(), key.clone());
            let (before, after) = (Arc::clone(&before), Arc::clone(&after));
            thread::spawn(move || {
                before.wait();
                cache.invalidate(&key);
                after.wait();
            })
        };
        let result = cache.entry_by_ref(&key).and_compute_with(|entry| {
            assert!(entry.is_some(), "closure should observe seeded entry");
            before.wait();
            after.wait();
            Op::Put(2)
        });
        helper.join().unwrap();
        match result {
            CompResult::Inserted(entry) => {
                assert!(!entry.is_old_value_replaced());
                assert_eq!(*entry.value(), 2);
            }
            _ => panic!("expected CompResult::Inserted after racing invalidate"),
        }
    }

    // HERDCACHE (fails): the same documented difference (the racing `insert` wins).
    #[test]
    #[ignore = "a documented difference from moka (see the comment above)"]
    fn observed_none_racing_insert_yields_replaced_with() {
        let _dog = watchdog(
            LIMIT,
            "regressions::observed_none_racing_insert_yields_replaced_with",
        );
        let cache: Cache<String, u64> = Cache::builder().max_capacity(100).build();
        let key = "k".to_string();
        let (before, after) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let helper = {
            let (cache, key) = (cache.clone(), key.clone());
            let (before, after) = (Arc::clone(&before), Arc::clone(&after));
            thread::spawn(move || {
                before.wait();
                cache.insert(key, 1);
                after.wait();
            })
        };
        let result = cache.entry_by_ref(&key).and_compute_with(|entry| {
            assert!(entry.is_none(), "closure should observe an empty cache");
            before.wait();
            after.wait();
            Op::Put(2)
        });
        helper.join().unwrap();
        match result {
            CompResult::ReplacedWith(entry) => {
                assert!(entry.is_old_value_replaced());
                assert_eq!(*entry.value(), 2);
            }
            _ => panic!("expected CompResult::ReplacedWith after racing insert"),
        }
    }
}
