//! Attack round s23: moka's own tests (moka 0.12.14, `src/sync/cache.rs`, `src/future/cache.rs`,
//! `tests/*.rs`) ported to herdcache, and adversarial tests of the newest APIs (`get_with_if`,
//! `invalidate_entries_if`, `get_or_stale`, `initial_capacity`, `support_invalidation_closures`)
//! and of misbehaving user code. Public API only (plus the `testing` feature's `validate`).
//!
//! moka's mocked clock (`Clock::mock()`, `mock.increment(d)`) is herdcache's `ManualClock`
//! (`clock.advance(d)`). Where herdcache documents a different behaviour the assertion is relaxed
//! to what its docs promise, with a `RELAXED:` comment saying why. Three findings (F1–F3,
//! `get_with_if` and the missing `EntryRef::or_insert_with_if`) were fixed with this file.

#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]

mod common;

use common::{quiet_injected_panics, watchdog, within};
use herdcache::{Cache, CacheBuilder, CompResult, Expiry, ManualClock, Op, RemovalCause};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{sleep, spawn};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_secs(10);

type Log<K, V> = Arc<Mutex<Vec<(K, V, RemovalCause)>>>;

/// moka's `let listener = move |k, v, cause| a1.lock().push((k, v, cause));`
fn recorder<K, V>() -> (
    Log<K, V>,
    impl Fn(&K, &V, RemovalCause) + Send + Sync + 'static,
)
where
    K: Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let log: Log<K, V> = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    (log, move |k: &K, v: &V, c| {
        l.lock().unwrap().push((k.clone(), v.clone(), c))
    })
}

fn take<K: Clone, V: Clone>(log: &Log<K, V>) -> Vec<(K, V, RemovalCause)> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// moka's `verify_notification_vec`: the notifications, in order.
fn verify_notification_vec<K, V>(actual: &Log<K, V>, expected: &[(K, V, RemovalCause)])
where
    K: PartialEq + std::fmt::Debug + Clone,
    V: PartialEq + std::fmt::Debug + Clone,
{
    let actual = actual.lock().unwrap().clone();
    assert_eq!(
        actual.len(),
        expected.len(),
        "notification count: {actual:?} vs {expected:?}"
    );
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a, e, "expected[{i}]");
    }
}

/// A model of what must be in a bounded cache, fed by the listener: the consistency that any
/// admission policy must keep (used where moka's exact victims are policy-specific).
struct Model<K, V> {
    live: HashMap<K, V>,
}

impl<K: std::hash::Hash + Eq + Clone + std::fmt::Debug, V: PartialEq + Clone + std::fmt::Debug>
    Model<K, V>
{
    fn new() -> Self {
        Model {
            live: HashMap::new(),
        }
    }
    /// Applies an insert of (k, v) and the notifications it produced.
    fn insert(&mut self, k: K, v: V, notes: Vec<(K, V, RemovalCause)>) {
        let prev = self.live.insert(k.clone(), v.clone());
        let mut replaced_seen = prev.is_none();
        for (nk, nv, c) in notes {
            match c {
                RemovalCause::Replaced => {
                    assert_eq!(Some(&nk), Some(&k), "replaced a different key");
                    assert_eq!(Some(&nv), prev.as_ref(), "replaced value");
                    assert!(!replaced_seen, "two Replaced for one insert");
                    replaced_seen = true;
                }
                RemovalCause::Size => {
                    assert_eq!(
                        self.live.get(&nk),
                        Some(&nv),
                        "evicted ({nk:?}, {nv:?}) not live"
                    );
                    self.live.remove(&nk);
                }
                other => panic!("unexpected cause {other:?} for ({nk:?}, {nv:?})"),
            }
        }
        assert!(replaced_seen, "insert over {prev:?} reported no Replaced");
    }
    fn remove(&mut self, k: &K, notes: Vec<(K, V, RemovalCause)>) {
        let prev = self.live.remove(k);
        match prev {
            None => assert!(notes.is_empty(), "{notes:?}"),
            Some(v) => assert_eq!(notes, vec![(k.clone(), v, RemovalCause::Explicit)]),
        }
    }
    fn check<S>(&self, cache: &Cache<K, V, S>)
    where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
        S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
    {
        let mut in_cache: HashMap<K, V> = HashMap::new();
        for (k, v) in cache.iter() {
            assert!(in_cache.insert(k, v).is_none(), "iter yielded a key twice");
        }
        assert_eq!(
            in_cache.len(),
            self.live.len(),
            "cache {in_cache:?} vs model {:?}",
            self.live
        );
        for (k, v) in &self.live {
            assert_eq!(in_cache.get(k), Some(v), "{k:?}");
        }
        assert_eq!(cache.entry_count(), self.live.len() as u64);
        assert!(cache.entry_count() <= cache.max_capacity() || cache.max_capacity() == 0);
        cache.validate();
    }
}

// =============================================================================================
// moka src/sync/cache.rs tests
// =============================================================================================

/// moka: `max_capacity_zero`.
#[test]
fn moka_max_capacity_zero() {
    let cache = Cache::new(0);
    cache.insert(0, ());
    assert!(!cache.contains_key(&0));
    assert!(cache.get(&0).is_none());
    cache.run_pending_tasks();
    assert!(!cache.contains_key(&0));
    assert!(cache.get(&0).is_none());
    assert_eq!(cache.entry_count(), 0)
}

/// moka: `basic_single_thread`. RELAXED: which entry the admission policy evicts (moka's
/// TinyLFU rejects "d" twice, then evicts "c") is policy-specific; checked instead against a
/// model fed by the listener (every eviction is of a live entry, reported once, as Size), and
/// the explicit parts exactly.
#[test]
fn moka_basic_single_thread() {
    let (actual, listener) = recorder::<&str, &str>();
    let cache = Cache::builder()
        .max_capacity(3)
        .eviction_listener(listener)
        .build();
    let mut m = Model::new();

    cache.insert("a", "alice");
    m.insert("a", "alice", take(&actual));
    cache.insert("b", "bob");
    m.insert("b", "bob", take(&actual));
    assert_eq!(cache.get(&"a"), Some("alice"));
    assert!(cache.contains_key(&"a"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.get(&"b"), Some("bob"));
    cache.run_pending_tasks();

    cache.insert("c", "cindy");
    m.insert("c", "cindy", take(&actual));
    assert_eq!(cache.get(&"c"), Some("cindy"));
    assert!(cache.contains_key(&"c"));
    cache.run_pending_tasks();

    assert!(cache.contains_key(&"a"));
    assert_eq!(cache.get(&"a"), Some("alice"));
    assert_eq!(cache.get(&"b"), Some("bob"));
    assert!(cache.contains_key(&"b"));
    cache.run_pending_tasks();
    m.check(&cache);

    cache.insert("d", "david");
    m.insert("d", "david", take(&actual));
    cache.run_pending_tasks();
    m.check(&cache);
    let _ = cache.get(&"d");

    cache.insert("d", "david");
    m.insert("d", "david", take(&actual));
    cache.run_pending_tasks();
    m.check(&cache);
    let _ = cache.get(&"d");

    cache.insert("d", "dennis");
    m.insert("d", "dennis", take(&actual));
    cache.run_pending_tasks();
    m.check(&cache);
    assert!(cache.entry_count() <= 3);

    cache.invalidate(&"b");
    m.remove(&"b", take(&actual));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"b"), None);
    assert!(!cache.contains_key(&"b"));

    assert!(cache.remove(&"b").is_none());
    assert!(take(&actual).is_empty());
    let d = cache.remove(&"d");
    assert_eq!(d, m.live.get(&"d").copied());
    m.remove(&"d", take(&actual));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"d"), None);
    assert!(!cache.contains_key(&"d"));
    m.check(&cache);
}

/// moka: `size_aware_eviction`. RELAXED as `basic_single_thread` (victims); the weights are
/// checked exactly against the model.
#[test]
fn moka_size_aware_eviction() {
    let weigher = |_k: &&str, v: &(&str, u32)| v.1;
    let alice = ("alice", 10);
    let bob = ("bob", 15);
    let bill = ("bill", 20);
    let cindy = ("cindy", 5);
    let david = ("david", 15);
    let dennis = ("dennis", 15);

    let (actual, listener) = recorder::<&str, (&str, u32)>();
    let cache = Cache::builder()
        .max_capacity(31)
        .weigher(weigher)
        .eviction_listener(listener)
        .build();
    let mut m = Model::new();
    let check = |m: &Model<&'static str, (&'static str, u32)>,
                 cache: &Cache<&'static str, (&'static str, u32)>| {
        m.check(cache);
        let w: u64 = m.live.values().map(|v| v.1 as u64).sum();
        assert_eq!(
            cache.weighted_size(),
            w,
            "weighted_size vs live weights {:?}",
            m.live
        );
        assert!(w <= 31);
    };

    cache.insert("a", alice);
    m.insert("a", alice, take(&actual));
    cache.insert("b", bob);
    m.insert("b", bob, take(&actual));
    assert_eq!(cache.get(&"a"), Some(alice));
    assert!(cache.contains_key(&"a"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.get(&"b"), Some(bob));
    cache.run_pending_tasks();

    cache.insert("c", cindy);
    m.insert("c", cindy, take(&actual));
    assert_eq!(cache.get(&"c"), Some(cindy));
    assert!(cache.contains_key(&"c"));
    cache.run_pending_tasks();

    assert!(cache.contains_key(&"a"));
    assert_eq!(cache.get(&"a"), Some(alice));
    assert_eq!(cache.get(&"b"), Some(bob));
    assert!(cache.contains_key(&"b"));
    cache.run_pending_tasks();
    check(&m, &cache);

    for _ in 0..4 {
        cache.insert("d", david);
        m.insert("d", david, take(&actual));
        cache.run_pending_tasks();
        check(&m, &cache);
        let _ = cache.get(&"d");
    }
    cache.insert("d", dennis);
    m.insert("d", dennis, take(&actual));
    cache.run_pending_tasks();
    check(&m, &cache);

    cache.insert("b", bill);
    m.insert("b", bill, take(&actual));
    cache.run_pending_tasks();
    check(&m, &cache);

    cache.insert("a", alice);
    m.insert("a", alice, take(&actual));
    cache.insert("b", bob);
    m.insert("b", bob, take(&actual));
    cache.run_pending_tasks();
    check(&m, &cache);
}

/// moka: `basic_multi_threads`.
#[test]
fn moka_basic_multi_threads() {
    let _w = watchdog(LIMIT, "moka_basic_multi_threads");
    let num_threads = 4;
    let cache = Cache::new(100);
    let handles = (0..num_threads)
        .map(|id| {
            let cache = cache.clone();
            spawn(move || {
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

/// moka: `invalidate_all`.
#[test]
fn moka_invalidate_all() {
    let (actual, listener) = recorder::<&str, &str>();
    let mut expected = Vec::new();
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

    cache.invalidate_all();
    expected.push(("a", "alice", RemovalCause::Explicit));
    expected.push(("b", "bob", RemovalCause::Explicit));
    expected.push(("c", "cindy", RemovalCause::Explicit));
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

    // RELAXED: order of notifications across shards/slots of invalidate_all is not documented
    // (moka's is insertion order): compared as sets.
    let mut a = actual.lock().unwrap().clone();
    a.sort_by_key(|x| x.0);
    expected.sort_by_key(|x| x.0);
    assert_eq!(a, expected);
}

/// moka future: `invalidate_all_without_running_pending_tasks`.
#[test]
fn moka_invalidate_all_without_running_pending_tasks() {
    let cache = Cache::new(1024);
    assert_eq!(cache.get(&0), None);
    cache.invalidate_all();
    cache.run_pending_tasks();
    cache.insert(0, 1);
    cache.invalidate_all();
    assert_eq!(cache.get(&0), None);
}

/// moka: `invalidate_entries_if`. moka applies the predicate lazily; herdcache at once
/// (documented): the observable end state is the same.
#[test]
fn moka_invalidate_entries_if() -> Result<(), Box<dyn std::error::Error>> {
    let (actual, listener) = recorder::<i32, &str>();
    let mut expected = Vec::new();
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(100)
        .support_invalidation_closures()
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();

    cache.insert(0, "alice");
    cache.insert(1, "bob");
    cache.insert(2, "alex");
    cache.run_pending_tasks();

    clock.advance(Duration::from_secs(5));
    cache.run_pending_tasks();

    assert_eq!(cache.get(&0), Some("alice"));
    assert_eq!(cache.get(&1), Some("bob"));
    assert_eq!(cache.get(&2), Some("alex"));
    assert!(cache.contains_key(&0));
    assert!(cache.contains_key(&1));
    assert!(cache.contains_key(&2));

    let names = ["alice", "alex"].iter().cloned().collect::<HashSet<_>>();
    cache.invalidate_entries_if(move |_k, &v| names.contains(v))?;
    expected.push((0, "alice", RemovalCause::Explicit));
    expected.push((2, "alex", RemovalCause::Explicit));

    clock.advance(Duration::from_secs(5));
    cache.insert(3, "alice");
    cache.run_pending_tasks();
    cache.run_pending_tasks();

    assert!(cache.get(&0).is_none());
    assert!(cache.get(&2).is_none());
    assert_eq!(cache.get(&1), Some("bob"));
    assert_eq!(cache.get(&3), Some("alice"));
    assert!(!cache.contains_key(&0));
    assert!(cache.contains_key(&1));
    assert!(!cache.contains_key(&2));
    assert!(cache.contains_key(&3));
    assert_eq!(cache.entry_count(), 2);

    clock.advance(Duration::from_secs(5));
    cache.invalidate_entries_if(|_k, &v| v == "alice")?;
    cache.invalidate_entries_if(|_k, &v| v == "bob")?;
    expected.push((3, "alice", RemovalCause::Explicit));
    expected.push((1, "bob", RemovalCause::Explicit));
    cache.run_pending_tasks();

    assert!(cache.get(&1).is_none());
    assert!(cache.get(&3).is_none());
    assert!(!cache.contains_key(&1));
    assert!(!cache.contains_key(&3));
    assert_eq!(cache.entry_count(), 0);

    // RELAXED: the order within one call (moka: insertion order) is a shard walk here; the
    // order between the two calls is program order. Compared per call as sets.
    let a = actual.lock().unwrap().clone();
    assert_eq!(a.len(), 4, "{a:?}");
    let mut first: Vec<_> = a[..2].to_vec();
    first.sort_by_key(|x| x.0);
    assert_eq!(first, expected[..2].to_vec());
    assert_eq!(a[2..].to_vec(), expected[2..].to_vec());
    Ok(())
}

/// moka: `time_to_live`. Exact, including the notifications and the boundary (expired at
/// exactly 10 s).
#[test]
fn moka_time_to_live() {
    let (actual, listener) = recorder::<&str, &str>();
    let mut expected = Vec::new();
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();

    cache.insert("a", "alice");
    cache.run_pending_tasks();

    clock.advance(Duration::from_secs(5));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"a"), Some("alice"));
    assert!(cache.contains_key(&"a"));

    clock.advance(Duration::from_secs(5)); // 10 secs.
    expected.push(("a", "alice", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert!(!cache.contains_key(&"a"));
    assert_eq!(cache.iter().count(), 0);

    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    cache.insert("b", "bob");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(5)); // 15 secs.
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"b"), Some("bob"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.entry_count(), 1);

    cache.insert("b", "bill");
    expected.push(("b", "bob", RemovalCause::Replaced));
    cache.run_pending_tasks();

    clock.advance(Duration::from_secs(5)); // 20 secs
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"b"), Some("bill"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(5)); // 25 secs
    expected.push(("b", "bill", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"b"), None);
    assert!(!cache.contains_key(&"a"));
    assert!(!cache.contains_key(&"b"));
    assert_eq!(cache.iter().count(), 0);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    verify_notification_vec(&actual, &expected);
}

/// moka: `time_to_idle`. Exact.
#[test]
fn moka_time_to_idle() {
    let (actual, listener) = recorder::<&str, &str>();
    let mut expected = Vec::new();
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(100)
        .time_to_idle(Duration::from_secs(10))
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();

    cache.insert("a", "alice");
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(5));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"a"), Some("alice"));

    clock.advance(Duration::from_secs(5)); // 10 secs.
    cache.run_pending_tasks();
    cache.insert("b", "bob");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 2);

    clock.advance(Duration::from_secs(2)); // 12 secs.
    cache.run_pending_tasks();
    // contains_key does not reset the idle timer for the key.
    assert!(cache.contains_key(&"a"));
    assert!(cache.contains_key(&"b"));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 2);

    clock.advance(Duration::from_secs(3)); // 15 secs.
    expected.push(("a", "alice", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"b"), Some("bob"));
    assert!(!cache.contains_key(&"a"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.iter().count(), 1);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(10)); // 25 secs
    expected.push(("b", "bob", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"b"), None);
    assert!(!cache.contains_key(&"a"));
    assert!(!cache.contains_key(&"b"));
    assert_eq!(cache.iter().count(), 0);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    verify_notification_vec(&actual, &expected);
}

/// moka: `ensure_access_time_is_updated_immediately_after_read` (moka issue 359).
#[test]
fn moka_ensure_access_time_is_updated_immediately_after_read() {
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(10)
        .time_to_idle(Duration::from_secs(5))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&1), Some(1));
    clock.advance(Duration::from_secs(2));
    assert_eq!(cache.get(&1), Some(1));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&1), Some(1));
}

#[derive(Default)]
struct ExpiryCallCounters {
    expected_creations: AtomicUsize,
    expected_reads: AtomicUsize,
    expected_updates: AtomicUsize,
    actual_creations: AtomicUsize,
    actual_reads: AtomicUsize,
    actual_updates: AtomicUsize,
}

impl ExpiryCallCounters {
    fn incl_expected_creations(&self) {
        self.expected_creations.fetch_add(1, Ordering::Relaxed);
    }
    fn incl_expected_reads(&self) {
        self.expected_reads.fetch_add(1, Ordering::Relaxed);
    }
    fn incl_expected_updates(&self) {
        self.expected_updates.fetch_add(1, Ordering::Relaxed);
    }
    fn incl_actual_creations(&self) {
        self.actual_creations.fetch_add(1, Ordering::Relaxed);
    }
    fn incl_actual_reads(&self) {
        self.actual_reads.fetch_add(1, Ordering::Relaxed);
    }
    fn incl_actual_updates(&self) {
        self.actual_updates.fetch_add(1, Ordering::Relaxed);
    }
    fn verify(&self) {
        assert_eq!(
            self.expected_creations.load(Ordering::Relaxed),
            self.actual_creations.load(Ordering::Relaxed),
            "creations"
        );
        assert_eq!(
            self.expected_reads.load(Ordering::Relaxed),
            self.actual_reads.load(Ordering::Relaxed),
            "reads"
        );
        assert_eq!(
            self.expected_updates.load(Ordering::Relaxed),
            self.actual_updates.load(Ordering::Relaxed),
            "updates"
        );
    }
}

/// moka: `time_to_live_by_expiry_type`. Exact (call counts, notifications).
#[test]
fn moka_time_to_live_by_expiry_type() {
    struct MyExpiry {
        counters: Arc<ExpiryCallCounters>,
    }
    impl Expiry<&'static str, &'static str> for MyExpiry {
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

    let (actual, listener) = recorder::<&str, &str>();
    let mut expected = Vec::new();
    let expiry_counters = Arc::new(ExpiryCallCounters::default());
    let expiry = MyExpiry {
        counters: Arc::clone(&expiry_counters),
    };
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(100)
        .expire_after(expiry)
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();

    cache.insert("a", "alice");
    expiry_counters.incl_expected_creations();
    cache.run_pending_tasks();

    clock.advance(Duration::from_secs(5));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"a"), Some("alice"));
    assert!(cache.contains_key(&"a"));

    clock.advance(Duration::from_secs(5)); // 10 secs.
    expected.push(("a", "alice", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert!(!cache.contains_key(&"a"));
    assert_eq!(cache.iter().count(), 0);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    cache.insert("b", "bob");
    expiry_counters.incl_expected_creations();
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(5)); // 15 secs.
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"b"), Some("bob"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.entry_count(), 1);

    cache.insert("b", "bill");
    expected.push(("b", "bob", RemovalCause::Replaced));
    expiry_counters.incl_expected_updates();
    cache.run_pending_tasks();

    clock.advance(Duration::from_secs(5)); // 20 secs
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"b"), Some("bill"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(5)); // 25 secs
    expected.push(("b", "bill", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"b"), None);
    assert!(!cache.contains_key(&"a"));
    assert!(!cache.contains_key(&"b"));
    assert_eq!(cache.iter().count(), 0);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    expiry_counters.verify();
    verify_notification_vec(&actual, &expected);
}

/// moka: `time_to_idle_by_expiry_type`. Exact.
#[test]
fn moka_time_to_idle_by_expiry_type() {
    struct MyExpiry {
        counters: Arc<ExpiryCallCounters>,
    }
    impl Expiry<&'static str, &'static str> for MyExpiry {
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

    let (actual, listener) = recorder::<&str, &str>();
    let mut expected = Vec::new();
    let expiry_counters = Arc::new(ExpiryCallCounters::default());
    let expiry = MyExpiry {
        counters: Arc::clone(&expiry_counters),
    };
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(100)
        .expire_after(expiry)
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();

    cache.insert("a", "alice");
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(5));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&"a"), Some("alice"));
    expiry_counters.incl_expected_reads();

    clock.advance(Duration::from_secs(5)); // 10 secs.
    cache.run_pending_tasks();
    cache.insert("b", "bob");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 2);

    clock.advance(Duration::from_secs(2)); // 12 secs.
    cache.run_pending_tasks();
    assert!(cache.contains_key(&"a"));
    assert!(cache.contains_key(&"b"));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 2);

    clock.advance(Duration::from_secs(3)); // 15 secs.
    expected.push(("a", "alice", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"b"), Some("bob"));
    expiry_counters.incl_expected_reads();
    assert!(!cache.contains_key(&"a"));
    assert!(cache.contains_key(&"b"));
    assert_eq!(cache.iter().count(), 1);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(10)); // 25 secs
    expected.push(("b", "bob", RemovalCause::Expired));
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"b"), None);
    assert!(!cache.contains_key(&"a"));
    assert!(!cache.contains_key(&"b"));
    assert_eq!(cache.iter().count(), 0);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    expiry_counters.verify();
    verify_notification_vec(&actual, &expected);
}

/// moka: `test_expiry_using_get_with`: `expire_after_read` is called by `get_with` only when
/// the key was present; `expire_after_update` never.
#[test]
fn moka_test_expiry_using_get_with() {
    struct NoExpiry {
        counters: Arc<ExpiryCallCounters>,
    }
    impl Expiry<&'static str, &'static str> for NoExpiry {
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
    let expiry_counters = Arc::new(ExpiryCallCounters::default());
    let cache = Cache::builder()
        .max_capacity(100)
        .expire_after(NoExpiry {
            counters: Arc::clone(&expiry_counters),
        })
        .build();

    cache.get_with("a", || "alice");
    expiry_counters.incl_expected_creations();
    cache.run_pending_tasks();

    cache.get_with("a", || "alex");
    expiry_counters.incl_expected_reads();
    cache.run_pending_tasks();

    cache.invalidate("a");
    cache.get_with("a", || "amanda");
    expiry_counters.incl_expected_creations();
    cache.run_pending_tasks();

    expiry_counters.verify();
}

/// moka: `expire_after_update_none_on_expired_entry`. RELAXED: moka keeps an entry that
/// expired at once in its table across `run_pending_tasks` (entry_count 1); herdcache's
/// `run_pending_tasks` reclaims every expired entry (documented), so the count is 0 there. The
/// point of the test — the second insert, whose expiry says "never", is readable — is kept.
#[test]
fn moka_expire_after_update_none_on_expired_entry() {
    struct TestExpiry {
        should_expire: Arc<AtomicBool>,
    }
    impl Expiry<String, String> for TestExpiry {
        fn expire_after_create(&self, _key: &String, _value: &String) -> Option<Duration> {
            if self.should_expire.load(Ordering::SeqCst) {
                Some(Duration::ZERO)
            } else {
                None
            }
        }
        fn expire_after_update(
            &self,
            _key: &String,
            _value: &String,
            _d: Option<Duration>,
        ) -> Option<Duration> {
            if self.should_expire.load(Ordering::SeqCst) {
                Some(Duration::ZERO)
            } else {
                None
            }
        }
    }
    for run_tasks in [true, false] {
        let should_expire = Arc::new(AtomicBool::new(true));
        let cache: Cache<String, String> = Cache::builder()
            .max_capacity(100)
            .expire_after(TestExpiry {
                should_expire: Arc::clone(&should_expire),
            })
            .build();
        let key = "test_key".to_string();
        cache.insert(key.clone(), "first_value".to_string());
        if run_tasks {
            cache.run_pending_tasks();
        }
        assert!(cache.entry_count() <= 1);
        assert_eq!(cache.get(&key), None, "expired at once");
        if run_tasks {
            cache.run_pending_tasks();
        }
        should_expire.store(false, Ordering::SeqCst);
        cache.insert(key.clone(), "second_value".to_string());
        if run_tasks {
            cache.run_pending_tasks();
        }
        assert_eq!(cache.entry_count(), 1, "run_tasks={run_tasks}");
        assert_eq!(
            cache.get(&key),
            Some("second_value".to_string()),
            "run_tasks={run_tasks}: None from the expiry means no expiration"
        );
    }
}

/// moka: `test_race_between_updating_entry_and_processing_its_write_ops` (moka issue 345).
#[test]
fn moka_test_race_between_updating_entry_and_processing_its_write_ops() {
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(2)
        .time_to_idle(Duration::from_secs(1))
        .clock(clock.clone())
        .build();
    cache.insert("a", "alice");
    cache.insert("b", "bob");
    cache.insert("c", "cathy");
    clock.advance(Duration::from_secs(2));
    cache.insert("c", "cindy");
    assert_eq!(cache.remove(&"c"), Some("cindy"));
    clock.advance(Duration::from_secs(2));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
}

/// moka: `test_race_between_recreating_entry_and_processing_its_write_ops`.
#[test]
fn moka_test_race_between_recreating_entry_and_processing_its_write_ops() {
    let cache = Cache::builder().max_capacity(2).build();
    cache.insert('a', "a");
    cache.insert('b', "b");
    cache.run_pending_tasks();
    cache.insert('c', "c1");
    // RELAXED: moka's write-op log makes `c1` always present here; herdcache's admission may
    // reject `c1` at once (evicted for Size): then removing 'c' finds nothing. 'a' and 'b'
    // likewise may have been evicted for c1.
    let _ = cache.remove(&'a');
    let _ = cache.remove(&'b');
    let _ = cache.remove(&'c');
    cache.insert('c', "c2");
    cache.run_pending_tasks();
    assert_eq!(cache.get(&'c'), Some("c2"));
}

/// moka: `test_iter`.
#[test]
fn moka_test_iter() {
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
    let mut key_set = HashSet::new();
    for (key, value) in &cache {
        assert_eq!(value, make_value(key));
        key_set.insert(key);
    }
    assert_eq!(key_set.len(), NUM_KEYS);
}

/// moka: `test_iter_multi_threads`.
#[test]
fn moka_test_iter_multi_threads() {
    let _w = watchdog(LIMIT, "moka_test_iter_multi_threads");
    const NUM_KEYS: usize = 1024;
    const NUM_THREADS: usize = 16;
    fn make_value(key: usize) -> String {
        format!("val: {key}")
    }
    let cache = Cache::builder()
        .max_capacity(2048)
        .time_to_idle(Duration::from_secs(10))
        .build();
    for key in 0..NUM_KEYS {
        cache.insert(key, make_value(key));
    }
    let rw_lock = Arc::new(std::sync::RwLock::<()>::default());
    let write_lock = rw_lock.write().unwrap();
    let handles = (0..NUM_THREADS)
        .map(|n| {
            let cache = cache.clone();
            let rw_lock = Arc::clone(&rw_lock);
            if n % 2 == 0 {
                spawn(move || {
                    let _r = rw_lock.read().unwrap();
                    for key in 0..NUM_KEYS {
                        cache.insert(key, make_value(key));
                    }
                })
            } else {
                spawn(move || {
                    let _r = rw_lock.read().unwrap();
                    let mut key_set = HashSet::new();
                    for (key, value) in &cache {
                        assert_eq!(value, make_value(key));
                        key_set.insert(key);
                    }
                    assert_eq!(key_set.len(), NUM_KEYS);
                })
            }
        })
        .collect::<Vec<_>>();
    drop(write_lock);
    handles.into_iter().for_each(|h| h.join().expect("Failed"));
    let key_set = cache.iter().map(|(k, _v)| k).collect::<HashSet<_>>();
    assert_eq!(key_set.len(), NUM_KEYS);
}

/// moka: `get_with` (five threads, timed).
#[test]
fn moka_get_with() {
    let _w = watchdog(LIMIT, "moka_get_with");
    let cache = Cache::new(100);
    const KEY: u32 = 0;
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            let v = cache1.get_with(KEY, || {
                sleep(Duration::from_millis(300));
                "thread1"
            });
            assert_eq!(v, "thread1");
        })
    };
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            let v = cache2.get_with(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            let v = cache3.get_with(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(200));
            let maybe_v = cache4.get(&KEY);
            assert!(maybe_v.is_none());
        })
    };
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            let maybe_v = cache5.get(&KEY);
            assert_eq!(maybe_v, Some("thread1"));
        })
    };
    for t in [thread1, thread2, thread3, thread4, thread5] {
        t.join().expect("Failed to join");
    }
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `get_with_by_ref`.
#[test]
fn moka_get_with_by_ref() {
    let _w = watchdog(LIMIT, "moka_get_with_by_ref");
    let cache = Cache::new(100);
    const KEY: &u32 = &0;
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            let v = cache1.get_with_by_ref(KEY, || {
                sleep(Duration::from_millis(300));
                "thread1"
            });
            assert_eq!(v, "thread1");
        })
    };
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            let v = cache2.get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            let v = cache3.get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v, "thread1");
        })
    };
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(200));
            assert!(cache4.get(KEY).is_none());
        })
    };
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            assert_eq!(cache5.get(KEY), Some("thread1"));
        })
    };
    for t in [thread1, thread2, thread3, thread4, thread5] {
        t.join().expect("Failed to join");
    }
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `entry_or_insert_with_if` (and `entry_by_ref_or_insert_with_if`, sync and future):
/// a caller that finds the key being loaded waits and takes that value without calling its
/// own `replace_if` (moka's test puts `unreachable!()` there).
#[test]
fn moka_entry_or_insert_with_if() {
    let _w = watchdog(LIMIT, "moka_entry_or_insert_with_if");
    let cache = Cache::new(100);
    const KEY: u32 = 0;
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            let e = cache1.entry(KEY).or_insert_with_if(
                || {
                    sleep(Duration::from_millis(300));
                    "thread1"
                },
                |_v| unreachable!(),
            );
            assert!(e.is_fresh());
            assert_eq!(e.into_value(), "thread1");
        })
    };
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            let e = cache2
                .entry(KEY)
                .or_insert_with_if(|| unreachable!(), |_v| unreachable!());
            assert!(!e.is_fresh());
            assert_eq!(e.into_value(), "thread1");
        })
    };
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(350));
            let e = cache3.entry(KEY).or_insert_with_if(
                || unreachable!(),
                |v| {
                    assert_eq!(v, &"thread1");
                    false
                },
            );
            assert!(!e.is_fresh());
            assert_eq!(e.into_value(), "thread1");
        })
    };
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            let e = cache4.entry(KEY).or_insert_with_if(
                || "thread4",
                |v| {
                    assert_eq!(v, &"thread1");
                    true
                },
            );
            assert!(e.is_fresh());
            assert_eq!(e.into_value(), "thread4");
        })
    };
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(200));
            assert!(cache5.get(&KEY).is_none());
        })
    };
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(350));
            assert_eq!(cache6.get(&KEY), Some("thread1"));
        })
    };
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(450));
            assert_eq!(cache7.get(&KEY), Some("thread4"));
        })
    };
    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7,
    ] {
        t.join().expect("Failed to join");
    }
    assert_eq!(cache.loads_in_flight(), 0);
}

#[derive(Debug)]
pub struct MyError(#[allow(dead_code)] String);
type MyResult<T> = Result<T, Arc<MyError>>;

/// moka: `try_get_with` (eight threads, timed).
#[test]
fn moka_try_get_with() {
    let _w = watchdog(LIMIT, "moka_try_get_with");
    let cache = Cache::new(100);
    const KEY: u32 = 0;
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            let v = cache1.try_get_with(KEY, || {
                sleep(Duration::from_millis(300));
                Err(MyError("thread1 error".into()))
            });
            assert!(v.is_err());
        })
    };
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            let v: MyResult<_> = cache2.try_get_with(KEY, || unreachable!());
            assert!(v.is_err());
        })
    };
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            let v: MyResult<_> = cache3.try_get_with(KEY, || {
                sleep(Duration::from_millis(300));
                Ok("thread3")
            });
            assert_eq!(v.unwrap(), "thread3");
        })
    };
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(500));
            let v: MyResult<_> = cache4.try_get_with(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(800));
            let v: MyResult<_> = cache5.try_get_with(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(200));
            assert!(cache6.get(&KEY).is_none());
        })
    };
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            assert!(cache7.get(&KEY).is_none());
        })
    };
    let thread8 = {
        let cache8 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(800));
            assert_eq!(cache8.get(&KEY), Some("thread3"));
        })
    };
    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
    ] {
        t.join().expect("Failed to join");
    }
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `try_get_with_by_ref`.
#[test]
fn moka_try_get_with_by_ref() {
    let _w = watchdog(LIMIT, "moka_try_get_with_by_ref");
    let cache = Cache::new(100);
    const KEY: &u32 = &0;
    let thread1 = {
        let cache1 = cache.clone();
        spawn(move || {
            let v = cache1.try_get_with_by_ref(KEY, || {
                sleep(Duration::from_millis(300));
                Err(MyError("thread1 error".into()))
            });
            assert!(v.is_err());
        })
    };
    let thread2 = {
        let cache2 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(100));
            let v: MyResult<_> = cache2.try_get_with_by_ref(KEY, || unreachable!());
            assert!(v.is_err());
        })
    };
    let thread3 = {
        let cache3 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            let v: MyResult<_> = cache3.try_get_with_by_ref(KEY, || {
                sleep(Duration::from_millis(300));
                Ok("thread3")
            });
            assert_eq!(v.unwrap(), "thread3");
        })
    };
    let thread4 = {
        let cache4 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(500));
            let v: MyResult<_> = cache4.try_get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };
    let thread5 = {
        let cache5 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(800));
            let v: MyResult<_> = cache5.try_get_with_by_ref(KEY, || unreachable!());
            assert_eq!(v.unwrap(), "thread3");
        })
    };
    let thread6 = {
        let cache6 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(200));
            assert!(cache6.get(KEY).is_none());
        })
    };
    let thread7 = {
        let cache7 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(400));
            assert!(cache7.get(KEY).is_none());
        })
    };
    let thread8 = {
        let cache8 = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(800));
            assert_eq!(cache8.get(KEY), Some("thread3"));
        })
    };
    for t in [
        thread1, thread2, thread3, thread4, thread5, thread6, thread7, thread8,
    ] {
        t.join().expect("Failed to join");
    }
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `optionally_get_with` and `optionally_get_with_by_ref` (eight threads, timed).
#[test]
fn moka_optionally_get_with_and_by_ref() {
    let _w = watchdog(LIMIT, "moka_optionally_get_with");
    for by_ref in [false, true] {
        let cache = Cache::new(100);
        const KEY: u32 = 0;
        let og = move |c: &Cache<u32, &'static str>,
                       f: Box<dyn FnOnce() -> Option<&'static str>>| {
            if by_ref {
                c.optionally_get_with_by_ref(&KEY, f)
            } else {
                c.optionally_get_with(KEY, f)
            }
        };
        let mut ts = Vec::new();
        let c = cache.clone();
        ts.push(spawn(move || {
            let v = og(
                &c,
                Box::new(|| {
                    sleep(Duration::from_millis(300));
                    None
                }),
            );
            assert!(v.is_none());
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(100));
            assert!(og(&c, Box::new(|| unreachable!())).is_none());
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(400));
            let v = og(
                &c,
                Box::new(|| {
                    sleep(Duration::from_millis(300));
                    Some("thread3")
                }),
            );
            assert_eq!(v.unwrap(), "thread3");
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(500));
            assert_eq!(og(&c, Box::new(|| unreachable!())).unwrap(), "thread3");
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(800));
            assert_eq!(og(&c, Box::new(|| unreachable!())).unwrap(), "thread3");
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(200));
            assert!(c.get(&KEY).is_none());
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(400));
            assert!(c.get(&KEY).is_none());
        }));
        let c = cache.clone();
        ts.push(spawn(move || {
            sleep(Duration::from_millis(800));
            assert_eq!(c.get(&KEY), Some("thread3"));
        }));
        for t in ts {
            t.join().expect("Failed to join");
        }
        assert_eq!(cache.loads_in_flight(), 0);
    }
}

/// moka: `upsert_with`.
#[test]
fn moka_upsert_with() {
    let _w = watchdog(LIMIT, "moka_upsert_with");
    let cache = Cache::new(100);
    const KEY: u32 = 0;
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
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `compute_with` (six threads, timed).
#[test]
fn moka_compute_with() {
    use std::sync::RwLock;
    let _w = watchdog(LIMIT, "moka_compute_with");
    let cache = Cache::new(100);
    const KEY: u32 = 0;
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
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);
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
    assert_eq!(key, KEY);
    let CompResult::Inserted(entry) = res5 else {
        panic!("Expected `Inserted`. Got {res5:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![5]);
    let CompResult::Unchanged(entry) = res6 else {
        panic!("Expected `Unchanged`. Got {res6:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![5]);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `try_compute_with`.
#[test]
fn moka_try_compute_with() {
    use std::sync::RwLock;
    let _w = watchdog(LIMIT, "moka_try_compute_with");
    let cache: Cache<u32, Arc<RwLock<Vec<i32>>>> = Cache::new(100);
    const KEY: u32 = 0;
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
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);
    let Ok(CompResult::ReplacedWith(entry)) = res2 else {
        panic!("Expected `ReplacedWith`. Got {res2:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);
    assert!(res3.is_err());
    let Ok(CompResult::Removed(entry)) = res4 else {
        panic!("Expected `Removed`. Got {res4:?}")
    };
    assert_eq!(*entry.into_value().read().unwrap(), vec![1, 2]);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `handle_panic_in_get_with` (moka issue 43).
#[test]
fn moka_handle_panic_in_get_with() {
    let _w = watchdog(LIMIT, "moka_handle_panic_in_get_with");
    quiet_injected_panics();
    let cache = Cache::new(16);
    let barrier = Arc::new(Barrier::new(2));
    {
        let cache_ref = cache.clone();
        let barrier_ref = barrier.clone();
        spawn(move || {
            let _ = cache_ref.get_with(1, || {
                barrier_ref.wait();
                sleep(Duration::from_millis(50));
                panic!("injected: Panic during get_with");
            });
        });
    }
    barrier.wait();
    assert_eq!(cache.get_with(1, || 5), 5);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `handle_panic_in_try_get_with`.
#[test]
fn moka_handle_panic_in_try_get_with() {
    let _w = watchdog(LIMIT, "moka_handle_panic_in_try_get_with");
    quiet_injected_panics();
    let cache = Cache::new(16);
    let barrier = Arc::new(Barrier::new(2));
    {
        let cache_ref = cache.clone();
        let barrier_ref = barrier.clone();
        spawn(move || {
            let _ = cache_ref.try_get_with(1, || {
                barrier_ref.wait();
                sleep(Duration::from_millis(50));
                panic!("injected: Panic during try_get_with");
            }) as Result<_, Arc<Infallible>>;
        });
    }
    barrier.wait();
    assert_eq!(
        cache.try_get_with(1, || Ok(5)) as Result<_, Arc<Infallible>>,
        Ok(5)
    );
    assert_eq!(cache.loads_in_flight(), 0);
}

/// moka: `test_removal_notifications`. RELAXED (victims): model-checked.
#[test]
fn moka_test_removal_notifications() {
    let (actual, listener) = recorder::<char, &str>();
    let cache = Cache::builder()
        .max_capacity(3)
        .eviction_listener(listener)
        .build();
    let mut m = Model::new();
    cache.insert('a', "alice");
    m.insert('a', "alice", take(&actual));
    cache.invalidate(&'a');
    m.remove(&'a', take(&actual));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);

    for (k, v) in [('b', "bob"), ('c', "cathy"), ('d', "david")] {
        cache.insert(k, v);
        m.insert(k, v, take(&actual));
    }
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 3);

    cache.insert('e', "emily");
    m.insert('e', "emily", take(&actual));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 3);
    m.check(&cache);

    cache.get(&'e');
    cache.run_pending_tasks();
    cache.insert('e', "eliza");
    m.insert('e', "eliza", take(&actual));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 3);
    m.check(&cache);

    let dv = m.live.get(&'d').copied();
    cache.insert('d', "dennis");
    m.insert('d', "dennis", take(&actual));
    let _ = dv;
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 3);
    m.check(&cache);
}

/// moka: `test_immediate_removal_notifications_with_updates` (moka future:
/// `test_removal_notifications_with_updates`). Exact: an insert or invalidate over an expired,
/// unreclaimed entry reports it as Expired, not Replaced / Explicit.
#[test]
fn moka_test_immediate_removal_notifications_with_updates() {
    let (actual, listener) = recorder::<&str, &str>();
    let clock = ManualClock::new();
    let cache = Cache::builder()
        .max_capacity(100)
        .eviction_listener(listener)
        .time_to_live(Duration::from_secs(7))
        .time_to_idle(Duration::from_secs(5))
        .clock(clock.clone())
        .build();

    cache.insert("alice", "a0");
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(6));
    assert_eq!(cache.get(&"alice"), None);
    // RELAXED: moka keeps the expired entry until its housekeeping runs (entry_count 1);
    // herdcache's get may reclaim it at once. Either way the cause must be Expired.
    assert!(cache.entry_count() <= 1);

    cache.insert("alice", "a1");
    {
        let mut a = actual.lock().unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0], ("alice", "a0", RemovalCause::Expired));
        a.clear();
    }
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), Some("a1"));
    cache.run_pending_tasks();

    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), None);
    assert!(cache.entry_count() <= 1);
    cache.insert("alice", "a2");
    {
        let mut a = actual.lock().unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0], ("alice", "a1", RemovalCause::Expired));
        a.clear();
    }
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 1);

    clock.advance(Duration::from_secs(6));
    assert_eq!(cache.get(&"alice"), None);
    assert!(cache.entry_count() <= 1);
    cache.invalidate(&"alice");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    {
        let mut a = actual.lock().unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0], ("alice", "a2", RemovalCause::Expired));
        a.clear();
    }

    cache.insert("alice", "a3");
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), Some("a3"));
    cache.run_pending_tasks();
    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get(&"alice"), None);
    assert!(cache.entry_count() <= 1);
    cache.invalidate(&"alice");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    {
        let mut a = actual.lock().unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0], ("alice", "a3", RemovalCause::Expired));
        a.clear();
    }
}

/// moka: `test_key_lock_used_by_immediate_removal_notifications` (ignored in moka): the
/// notifications of one key never overlap and come in order. RELAXED: herdcache runs the
/// listener after the shard lock is released, on the removing thread, without a per-key lock
/// (documented) — so only "each value reported once, with the right cause" is checked.
#[test]
fn moka_key_lock_notifications_each_once() {
    let _w = watchdog(LIMIT, "moka_key_lock_notifications_each_once");
    let (actual, listener) = recorder::<&str, &str>();
    let cache = Cache::builder()
        .max_capacity(100)
        .eviction_listener(move |k: &&'static str, v: &&'static str, c| {
            sleep(Duration::from_millis(30));
            listener(k, v, c)
        })
        .time_to_live(Duration::from_millis(100))
        .build();
    cache.insert("alice", "a0");
    let t1 = {
        let c = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(120));
            c.insert("alice", "a1");
        })
    };
    let t2 = {
        let c = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(160));
            c.insert("alice", "a2");
        })
    };
    let t3 = {
        let c = cache.clone();
        spawn(move || {
            sleep(Duration::from_millis(220));
            c.invalidate(&"alice");
        })
    };
    for t in [t1, t2, t3] {
        t.join().unwrap();
    }
    cache.run_pending_tasks();
    let mut a = actual.lock().unwrap().clone();
    a.sort_by_key(|x| x.1);
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a[0], ("alice", "a0", RemovalCause::Expired));
    assert_eq!(a[1].1, "a1");
    assert_eq!(a[2].1, "a2");
}

/// moka: `no_batch_size_limit_on_eviction` (LRU policy, housekeeper config). RELAXED: no
/// eviction policy choice nor housekeeper here and writes are applied at once (entry_count is
/// not 0 before `run_pending_tasks`); what holds: never over capacity, newest key present
/// after a burst of new keys is not promised (admission) — so only the bound and consistency.
#[test]
fn moka_no_batch_size_limit_on_eviction() {
    const MAX_CAPACITY: u64 = 20;
    let (actual, listener) = recorder::<u64, String>();
    let cache = Cache::builder()
        .max_capacity(MAX_CAPACITY)
        .eviction_listener(listener)
        .build();
    let mut m = Model::new();
    for i in 0..MAX_CAPACITY {
        cache.insert(i, format!("v{i}"));
        m.insert(i, format!("v{i}"), take(&actual));
    }
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), MAX_CAPACITY);
    for i in MAX_CAPACITY..(MAX_CAPACITY * 2) {
        cache.insert(i, format!("v{i}"));
        m.insert(i, format!("v{i}"), take(&actual));
    }
    assert_eq!(cache.entry_count(), MAX_CAPACITY);
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), MAX_CAPACITY);
    m.check(&cache);
}

/// moka: `recover_from_panicking_eviction_listener`. RELAXED (documented difference): moka
/// swallows the panic and stops notifying; herdcache completes the operation and resumes the
/// panic in the caller, and keeps notifying afterwards.
#[test]
fn moka_recover_from_panicking_eviction_listener() {
    quiet_injected_panics();
    let actual = Arc::new(Mutex::new(Vec::new()));
    let a1 = Arc::clone(&actual);
    let cache = Cache::builder()
        .max_capacity(100)
        .name("My Sync Cache")
        .eviction_listener(move |k: &&str, v: &&str, cause| {
            if *v == "panic now!" {
                panic!("injected: Panic now!");
            }
            a1.lock().unwrap().push((*k, *v, cause))
        })
        .build();
    cache.insert("alice", "a0");
    cache.run_pending_tasks();
    cache.insert("alice", "panic now!");
    cache.run_pending_tasks();
    let r = catch_unwind(AssertUnwindSafe(|| cache.insert("alice", "a2")));
    assert!(
        r.is_err(),
        "the listener's panic reaches the caller (documented)"
    );
    assert_eq!(cache.get(&"alice"), Some("a2"), "the insert completed");
    cache.run_pending_tasks();
    cache.invalidate(&"alice");
    cache.run_pending_tasks();
    assert_eq!(
        *actual.lock().unwrap(),
        vec![
            ("alice", "a0", RemovalCause::Replaced),
            ("alice", "a2", RemovalCause::Explicit)
        ]
    );
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

/// moka: `borrowed_forms_of_key` (moka issue 166).
#[test]
fn moka_borrowed_forms_of_key() {
    let cache: Cache<Vec<u8>, ()> = Cache::new(1);
    let key = vec![1_u8];
    cache.insert(key.clone(), ());
    let key_v: &Vec<u8> = &key;
    assert!(cache.contains_key(key_v));
    assert_eq!(cache.get(key_v), Some(()));
    cache.invalidate(key_v);
    cache.insert(key, ());
    let key_s: &[u8] = &[1_u8];
    assert!(cache.contains_key(key_s));
    assert_eq!(cache.get(key_s), Some(()));
    cache.invalidate(key_s);
    assert!(!cache.contains_key(key_s));
}

/// A value that counts its drops.
#[derive(Debug)]
struct DropCounted(Arc<AtomicUsize>);
impl Drop for DropCounted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// moka: `drop_value_immediately_after_eviction` (ignored in moka). Exact for the counts that
/// are policy-independent: every value created is dropped once it has left the cache, and all
/// are dropped with the cache.
#[test]
fn moka_drop_value_immediately_after_eviction() {
    const MAX_CAPACITY: u32 = 500;
    const KEYS: u32 = ((MAX_CAPACITY as f64) * 1.2) as u32;
    let dropped = Arc::new(AtomicUsize::new(0));
    let evicted = Arc::new(AtomicUsize::new(0));
    let invalidated = Arc::new(AtomicUsize::new(0));
    let (e, i) = (Arc::clone(&evicted), Arc::clone(&invalidated));
    let cache = Cache::builder()
        .max_capacity(MAX_CAPACITY as u64)
        .eviction_listener(move |_k: &u32, _v: &Arc<DropCounted>, cause| match cause {
            RemovalCause::Size => {
                e.fetch_add(1, Ordering::SeqCst);
            }
            RemovalCause::Explicit => {
                i.fetch_add(1, Ordering::SeqCst);
            }
            _ => (),
        })
        .build();
    for key in 0..KEYS {
        cache.insert(key, Arc::new(DropCounted(Arc::clone(&dropped))));
        cache.run_pending_tasks();
    }
    cache.run_pending_tasks();
    let ev = evicted.load(Ordering::SeqCst) as u64;
    assert_eq!(ev + cache.entry_count(), KEYS as u64);
    assert!(cache.entry_count() <= MAX_CAPACITY as u64);
    assert_eq!(
        dropped.load(Ordering::SeqCst) as u64,
        ev,
        "evicted values dropped at once"
    );
    for key in 0..KEYS {
        cache.invalidate(&key);
        cache.run_pending_tasks();
    }
    assert_eq!(invalidated.load(Ordering::SeqCst) as u64 + ev, KEYS as u64);
    assert_eq!(dropped.load(Ordering::SeqCst), KEYS as usize);
    drop(cache);
    assert_eq!(dropped.load(Ordering::SeqCst), KEYS as usize);
}

/// moka: `ensure_gc_runs_when_dropping_cache` (moka issue 383).
#[test]
fn moka_ensure_gc_runs_when_dropping_cache() {
    let cache = Cache::new(100);
    let val = Arc::new(0);
    {
        let val = Arc::clone(&val);
        cache.get_with(1, move || val);
    }
    drop(cache);
    assert_eq!(Arc::strong_count(&val), 1);
}

/// moka: `test_debug_format`. RELAXED (documented): `Debug` shows the configuration, not the
/// entries.
#[test]
fn moka_test_debug_format() {
    let cache = Cache::new(10);
    cache.insert('a', "alice");
    let debug_str = format!("{cache:?}");
    assert!(!debug_str.contains("alice"));
    assert!(debug_str.contains("herdcache"), "{debug_str}");
}

// =============================================================================================
// moka tests/entry_api_sync.rs (SegmentedCache::new(100, 4) → .shards(4))
// =============================================================================================

const NUM_THREADS: u8 = 16;

fn entry_api_get_with(cache: Cache<String, Arc<Vec<u8>>>) {
    let _w = watchdog(LIMIT, "entry_api_get_with");
    const TEN_MIB: usize = 10 * 1024 * 1024;
    let call_counter = Arc::new(AtomicUsize::default());
    let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));
    let threads: Vec<_> = (0..NUM_THREADS)
        .map(|thread_id| {
            let my_cache = cache.clone();
            let my_call_counter = Arc::clone(&call_counter);
            let my_barrier = Arc::clone(&barrier);
            spawn(move || {
                my_barrier.wait();
                let key = "key1".to_string();
                let init = || {
                    my_call_counter.fetch_add(1, Ordering::AcqRel);
                    Arc::new(vec![0u8; TEN_MIB])
                };
                let value = match thread_id % 4 {
                    0 => my_cache.get_with(key.clone(), init),
                    1 => my_cache.get_with_by_ref(key.as_str(), init),
                    2 => my_cache
                        .entry(key.clone())
                        .or_insert_with(init)
                        .into_value(),
                    3 => my_cache
                        .entry_by_ref(key.as_str())
                        .or_insert_with(init)
                        .into_value(),
                    _ => unreachable!(),
                };
                assert_eq!(value.len(), TEN_MIB);
                assert!(my_cache.get(key.as_str()).is_some());
            })
        })
        .collect();
    threads
        .into_iter()
        .for_each(|t| t.join().expect("Thread failed"));
    assert_eq!(call_counter.load(Ordering::Acquire), 1);
}

fn entry_api_optionally_get_with(cache: Cache<String, u64>) {
    let _w = watchdog(LIMIT, "entry_api_optionally_get_with");
    let call_counter = Arc::new(AtomicUsize::default());
    let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));
    fn get_file_size(call_counter: &AtomicUsize) -> Option<u64> {
        call_counter.fetch_add(1, Ordering::AcqRel);
        std::fs::metadata("./Cargo.toml").ok().map(|m| m.len())
    }
    let threads: Vec<_> = (0..NUM_THREADS)
        .map(|thread_id| {
            let my_cache = cache.clone();
            let cc = Arc::clone(&call_counter);
            let my_barrier = Arc::clone(&barrier);
            spawn(move || {
                my_barrier.wait();
                let key = "key1".to_string();
                let value = match thread_id % 4 {
                    0 => my_cache.optionally_get_with(key.clone(), || get_file_size(&cc)),
                    1 => my_cache.optionally_get_with_by_ref(key.as_str(), || get_file_size(&cc)),
                    2 => my_cache
                        .entry(key.clone())
                        .or_optionally_insert_with(|| get_file_size(&cc))
                        .map(herdcache::Entry::into_value),
                    3 => my_cache
                        .entry_by_ref(key.as_str())
                        .or_optionally_insert_with(|| get_file_size(&cc))
                        .map(herdcache::Entry::into_value),
                    _ => unreachable!(),
                };
                assert!(value.is_some());
                assert!(my_cache.get(key.as_str()).is_some());
            })
        })
        .collect();
    threads
        .into_iter()
        .for_each(|t| t.join().expect("Thread failed"));
    assert_eq!(call_counter.load(Ordering::Acquire), 1);
}

fn entry_api_try_get_with(cache: Cache<String, u64>) {
    let _w = watchdog(LIMIT, "entry_api_try_get_with");
    let call_counter = Arc::new(AtomicUsize::default());
    let barrier = Arc::new(Barrier::new(NUM_THREADS as usize));
    fn get_file_size(call_counter: &AtomicUsize) -> Result<u64, std::io::Error> {
        call_counter.fetch_add(1, Ordering::AcqRel);
        Ok(std::fs::metadata("./Cargo.toml")?.len())
    }
    let threads: Vec<_> = (0..NUM_THREADS)
        .map(|thread_id| {
            let my_cache = cache.clone();
            let cc = Arc::clone(&call_counter);
            let my_barrier = Arc::clone(&barrier);
            spawn(move || {
                my_barrier.wait();
                let key = "key1".to_string();
                let value = match thread_id % 4 {
                    0 => my_cache.try_get_with(key.clone(), || get_file_size(&cc)),
                    1 => my_cache.try_get_with_by_ref(key.as_str(), || get_file_size(&cc)),
                    2 => my_cache
                        .entry(key.clone())
                        .or_try_insert_with(|| get_file_size(&cc))
                        .map(herdcache::Entry::into_value),
                    3 => my_cache
                        .entry_by_ref(key.as_str())
                        .or_try_insert_with(|| get_file_size(&cc))
                        .map(herdcache::Entry::into_value),
                    _ => unreachable!(),
                };
                assert!(value.is_ok());
                assert!(my_cache.get(key.as_str()).is_some());
            })
        })
        .collect();
    threads
        .into_iter()
        .for_each(|t| t.join().expect("Thread failed"));
    assert_eq!(call_counter.load(Ordering::Acquire), 1);
}

#[test]
fn moka_entry_api_test_cache_get_with() {
    entry_api_get_with(Cache::new(100));
}
#[test]
fn moka_entry_api_test_seg_cache_get_with() {
    entry_api_get_with(CacheBuilder::new(100).shards(4).build());
}
#[test]
fn moka_entry_api_test_cache_optionally_get_with() {
    entry_api_optionally_get_with(Cache::new(100));
}
#[test]
fn moka_entry_api_test_seg_cache_optionally_get_with() {
    entry_api_optionally_get_with(CacheBuilder::new(100).shards(4).build());
}
#[test]
fn moka_entry_api_test_cache_try_get_with() {
    entry_api_try_get_with(Cache::new(100));
}
#[test]
fn moka_entry_api_test_seg_cache_try_get_with() {
    entry_api_try_get_with(CacheBuilder::new(100).shards(4).build());
}

// =============================================================================================
// moka tests/and_compute_with_race.rs and future-cache tests (tokio runtime, no macros)
// =============================================================================================

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(8)
        .enable_time()
        .build()
        .unwrap()
}

/// moka: `test_and_compute_with_concurrent_atomicity`.
#[test]
fn moka_and_compute_with_concurrent_atomicity() {
    let _w = watchdog(LIMIT, "moka_and_compute_with_concurrent_atomicity");
    rt().block_on(async {
        let cache: Cache<String, u64> = Cache::builder().max_capacity(100).build();
        let key = "counter".to_string();
        cache.insert(key.clone(), 0);
        let n_writers: u64 = 8;
        let writes_per_writer: u64 = 100;
        let mut handles = Vec::new();
        for _ in 0..n_writers {
            let cache = cache.clone();
            let key = key.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..writes_per_writer {
                    loop {
                        let result = cache
                            .entry_by_ref(&key)
                            .and_compute_with_async(|entry| async move {
                                match entry {
                                    Some(entry) => Op::Put(entry.into_value() + 1),
                                    None => Op::Nop,
                                }
                            })
                            .await;
                        if matches!(result, CompResult::ReplacedWith(_)) {
                            break;
                        }
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(cache.get(&key), Some(n_writers * writes_per_writer));
    });
}

/// moka future: `abort_get_with` (moka issue 59).
#[test]
fn moka_abort_get_with() {
    let _w = watchdog(LIMIT, "moka_abort_get_with");
    rt().block_on(async {
        let cache: Cache<u32, u32> = Cache::new(16);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        let handle;
        {
            let cache_ref = cache.clone();
            let semaphore_ref = semaphore.clone();
            handle = tokio::task::spawn(async move {
                let _ = cache_ref
                    .get_with_async(1, async move {
                        semaphore_ref.add_permits(1);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        unreachable!();
                    })
                    .await;
            });
        }
        let _ = semaphore.acquire().await.expect("semaphore acquire failed");
        handle.abort();
        assert_eq!(cache.get_with_async(1, async { 5 }).await, 5);
        assert_eq!(cache.loads_in_flight(), 0);
    });
}

/// moka future: `abort_try_get_with`.
#[test]
fn moka_abort_try_get_with() {
    let _w = watchdog(LIMIT, "moka_abort_try_get_with");
    rt().block_on(async {
        let cache: Cache<u32, u32> = Cache::new(16);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        let handle;
        {
            let cache_ref = cache.clone();
            let semaphore_ref = semaphore.clone();
            handle = tokio::task::spawn(async move {
                let _ = cache_ref
                    .try_get_with_async(1, async move {
                        semaphore_ref.add_permits(1);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        unreachable!();
                    })
                    .await as Result<_, Arc<Infallible>>;
            });
        }
        let _ = semaphore.acquire().await.expect("semaphore acquire failed");
        handle.abort();
        assert_eq!(
            cache
                .try_get_with_async(1, async { Ok::<u32, Infallible>(5) })
                .await,
            Ok(5)
        );
        assert_eq!(cache.loads_in_flight(), 0);
    });
}

/// moka future: `get_with` with tasks (the timed five-caller shape on a runtime).
#[test]
fn moka_future_get_with() {
    let _w = watchdog(LIMIT, "moka_future_get_with");
    rt().block_on(async {
        use tokio::time::sleep;
        let cache: Cache<u32, &'static str> = Cache::new(100);
        const KEY: u32 = 0;
        let c1 = cache.clone();
        let t1 = tokio::spawn(async move {
            let v = c1
                .get_with_async(KEY, async {
                    sleep(Duration::from_millis(300)).await;
                    "task1"
                })
                .await;
            assert_eq!(v, "task1");
        });
        let c2 = cache.clone();
        let t2 = tokio::spawn(async move {
            sleep(Duration::from_millis(100)).await;
            let v = c2.get_with_async(KEY, async { unreachable!() }).await;
            assert_eq!(v, "task1");
        });
        let c3 = cache.clone();
        let t3 = tokio::spawn(async move {
            sleep(Duration::from_millis(400)).await;
            let v = c3.get_with_async(KEY, async { unreachable!() }).await;
            assert_eq!(v, "task1");
        });
        let c4 = cache.clone();
        let t4 = tokio::spawn(async move {
            sleep(Duration::from_millis(200)).await;
            assert!(c4.get(&KEY).is_none());
        });
        let c5 = cache.clone();
        let t5 = tokio::spawn(async move {
            sleep(Duration::from_millis(400)).await;
            assert_eq!(c5.get(&KEY), Some("task1"));
        });
        for t in [t1, t2, t3, t4, t5] {
            t.await.unwrap();
        }
        assert_eq!(cache.loads_in_flight(), 0);
    });
}

/// moka future: `try_get_with` (async): an error goes to the waiters, then a new load.
#[test]
fn moka_future_try_get_with() {
    let _w = watchdog(LIMIT, "moka_future_try_get_with");
    rt().block_on(async {
        use tokio::time::sleep;
        let cache: Cache<u32, &'static str> = Cache::new(100);
        const KEY: u32 = 0;
        let mut ts = Vec::new();
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            let v = c
                .try_get_with_async(KEY, async {
                    sleep(Duration::from_millis(300)).await;
                    Err(MyError("task1 error".into()))
                })
                .await;
            assert!(v.is_err());
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(100)).await;
            let v: MyResult<_> = c.try_get_with_async(KEY, async { unreachable!() }).await;
            assert!(v.is_err());
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(400)).await;
            let v: MyResult<_> = c
                .try_get_with_async(KEY, async {
                    sleep(Duration::from_millis(300)).await;
                    Ok("task3")
                })
                .await;
            assert_eq!(v.unwrap(), "task3");
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(500)).await;
            let v: MyResult<_> = c.try_get_with_async(KEY, async { unreachable!() }).await;
            assert_eq!(v.unwrap(), "task3");
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(800)).await;
            let v: MyResult<_> = c.try_get_with_async(KEY, async { unreachable!() }).await;
            assert_eq!(v.unwrap(), "task3");
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(200)).await;
            assert!(c.get(&KEY).is_none());
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(400)).await;
            assert!(c.get(&KEY).is_none());
        }));
        let c = cache.clone();
        ts.push(tokio::spawn(async move {
            sleep(Duration::from_millis(800)).await;
            assert_eq!(c.get(&KEY), Some("task3"));
        }));
        for t in ts {
            t.await.unwrap();
        }
        assert_eq!(cache.loads_in_flight(), 0);
    });
}

/// moka future: `upsert_with` and `compute_with` in async form (three tasks incrementing).
#[test]
fn moka_future_upsert_with() {
    let _w = watchdog(LIMIT, "moka_future_upsert_with");
    rt().block_on(async {
        use tokio::time::sleep;
        let cache: Cache<u32, u32> = Cache::new(100);
        const KEY: u32 = 0;
        let c1 = cache.clone();
        let t1 = tokio::spawn(async move {
            c1.entry(KEY)
                .and_upsert_with_async(|e| async move {
                    sleep(Duration::from_millis(200)).await;
                    assert!(e.is_none());
                    1
                })
                .await
        });
        let c2 = cache.clone();
        let t2 = tokio::spawn(async move {
            sleep(Duration::from_millis(100)).await;
            c2.entry_by_ref(&KEY)
                .and_upsert_with_async(|e| async move {
                    sleep(Duration::from_millis(200)).await;
                    e.expect("The entry should exist").into_value() + 1
                })
                .await
        });
        let c3 = cache.clone();
        let t3 = tokio::spawn(async move {
            sleep(Duration::from_millis(300)).await;
            c3.entry_by_ref(&KEY)
                .and_upsert_with_async(|e| async move {
                    sleep(Duration::from_millis(100)).await;
                    e.expect("The entry should exist").into_value() + 1
                })
                .await
        });
        assert_eq!(t1.await.unwrap().into_value(), 1);
        assert_eq!(t2.await.unwrap().into_value(), 2);
        assert_eq!(t3.await.unwrap().into_value(), 3);
        assert_eq!(cache.get(&KEY), Some(3));
    });
}

/// moka future: `cancel_future_while_running_pending_tasks` and friends, in spirit: a load
/// future dropped mid-way (by a runtime timeout) leaves the key loadable, and a waiter of
/// it loads itself.
#[test]
fn moka_future_cancel_leader_waiter_loads() {
    let _w = watchdog(LIMIT, "moka_future_cancel_leader_waiter_loads");
    rt().block_on(async {
        let cache: Cache<u32, u32> = Cache::new(16);
        let c = cache.clone();
        let leader = tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_millis(50),
                c.get_with_async(1, std::future::pending::<u32>()),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = cache.clone();
        let waiter = tokio::spawn(async move { c.get_with_async(1, async { 7 }).await });
        assert!(leader.await.unwrap().is_err(), "the leader timed out");
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("waiter hung")
                .unwrap(),
            7
        );
        assert_eq!(cache.get(&1), Some(7));
        assert_eq!(cache.loads_in_flight(), 0);
    });
}

// =============================================================================================
// Findings: minimal repros (each failed before its fix)
// =============================================================================================

/// F1 (from moka `entry_or_insert_with_if`, ported onto `get_with_if`): a caller that waited
/// for another caller's `init` of an absent key gets that value, and moka never calls its
/// `replace_if` (it found no value when it asked). herdcache called the waiter's `replace_if`
/// on the value just loaded, so moka code with `|_| unreachable!()` there panicked.
#[test]
fn f1_get_with_if_waiter_does_not_call_replace_if_on_the_value_it_waited_for() {
    let _w = watchdog(LIMIT, "f1");
    let cache: Cache<u32, u32> = Cache::new(10);
    let c = cache.clone();
    let leader = spawn(move || {
        c.get_with_if(
            0,
            || {
                sleep(Duration::from_millis(300));
                1
            },
            |_| unreachable!("absent: nothing to decide on"),
        )
    });
    sleep(Duration::from_millis(100));
    let called = AtomicBool::new(false);
    let v = cache.get_with_if(
        0,
        || unreachable!("the leader loads"),
        |_| {
            called.store(true, Ordering::SeqCst);
            false
        },
    );
    assert_eq!(leader.join().unwrap(), 1);
    assert_eq!(v, 1);
    assert!(
        !called.load(Ordering::SeqCst),
        "moka: a waiter takes the loaded value without calling its replace_if"
    );
}

// =============================================================================================
// Adversarial: get_with_if
// =============================================================================================

/// A waiter behind a `get_with` load, with a `replace_if` that keeps: gets the loaded value,
/// runs no init, and the statistics count one miss and one load.
#[test]
fn a_get_with_if_behind_get_with() {
    let _w = watchdog(LIMIT, "a_get_with_if_behind_get_with");
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10).record_stats().build();
    let c = cache.clone();
    let leader = spawn(move || {
        c.get_with(1, || {
            sleep(Duration::from_millis(200));
            10
        })
    });
    sleep(Duration::from_millis(50));
    let v = cache.get_with_if(1, || unreachable!(), |v| *v != 10);
    assert_eq!(v, 10);
    assert_eq!(leader.join().unwrap(), 10);
    let s = cache.stats();
    assert_eq!(s.load_successes, 1, "{s:?}");
}

/// Statistics of get_with_if: a miss is one miss, a kept hit one hit, a replacement?
#[test]
fn a_get_with_if_stats() {
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10).record_stats().build();
    let s0 = cache.stats();
    cache.get_with_if(1, || 1, |_| unreachable!());
    let s1 = cache.stats() - s0;
    assert_eq!((s1.hits, s1.misses), (0, 1), "absent: one miss {s1:?}");
    assert_eq!(s1.load_successes, 1, "absent: one load {s1:?}");
    let s0 = cache.stats();
    cache.get_with_if(1, || unreachable!(), |_| false);
    let s1 = cache.stats() - s0;
    assert_eq!((s1.hits, s1.misses), (1, 0), "kept: one hit {s1:?}");
    let s0 = cache.stats();
    cache.get_with_if(1, || 2, |_| true);
    let s1 = cache.stats() - s0;
    assert_eq!(
        s1.hits + s1.misses,
        1,
        "replaced: one lookup, not two {s1:?}"
    );
    assert_eq!(s1.replaced.count, 1, "{s1:?}");
}

/// The replacement is reported Replaced with the old value; the weight follows the new one.
#[test]
fn a_get_with_if_replacement_listener_and_weight() {
    let (log, listener) = recorder::<u32, String>();
    let cache: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k: &u32, v: &String| v.len() as u32)
        .eviction_listener(listener)
        .build();
    cache.get_with_if(1, || "aaaa".into(), |_| unreachable!());
    assert_eq!(cache.weighted_size(), 4);
    let v = cache.get_with_if(1, || "bb".into(), |v| v.len() > 3);
    assert_eq!(v, "bb");
    assert_eq!(cache.weighted_size(), 2);
    assert_eq!(
        take(&log),
        vec![(1, "aaaa".to_string(), RemovalCause::Replaced)]
    );
    // Too heavy: stored and at once evicted for Size, returned anyway.
    let v = cache.get_with_if(1, || "x".repeat(200), |_| true);
    assert_eq!(v.len(), 200);
    assert_eq!(cache.get(&1), None);
    assert_eq!(cache.weighted_size(), 0);
    let notes = take(&log);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(notes[0], (1, "bb".to_string(), RemovalCause::Replaced));
    assert_eq!(notes[1].2, RemovalCause::Size);
    cache.validate();
}

/// An init that asks the cache for its own key with get_with_if panics instead of hanging.
#[test]
fn a_get_with_if_recursive_init_does_not_hang() {
    quiet_injected_panics();
    let cache: Cache<u32, u32> = Cache::new(10);
    let c = cache.clone();
    let r = within(SHORT, move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with_if(1, || c.get_with_if(1, || 2, |_| true), |_| true)
        }))
    });
    let r = r.expect("recursive get_with_if hung");
    assert!(r.unwrap().is_err(), "a recursive load panics");
    assert_eq!(cache.get_with_if(1, || 3, |_| false), 3, "key released");
    // Recursion through replace_if (which runs while the key is held on the replace path).
    let c = cache.clone();
    let r = within(SHORT, move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with_if(
                1,
                || 4,
                |_| {
                    let _ = c.get_with(1, || 5);
                    true
                },
            )
        }))
    });
    assert!(r.is_some(), "get_with from replace_if hung");
    assert!(cache.get(&1).is_some());
    assert_eq!(cache.loads_in_flight(), 0);
}

/// A panicking replace_if, on the first look or on the leader's second, releases the key.
#[test]
fn a_get_with_if_panicking_replace_if() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "a_get_with_if_panicking_replace_if");
    let cache: Cache<u32, u32> = Cache::new(10);
    cache.insert(1, 1);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with_if(1, || 2, |_| panic!("injected replace_if"))
    }));
    assert!(r.is_err());
    assert_eq!(cache.get(&1), Some(1));
    // Panics on the second call only (the leader's look once it has claimed the key): the
    // key is released, the value kept.
    let n = AtomicUsize::new(0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with_if(
            1,
            || 2,
            |_| {
                if n.fetch_add(1, Ordering::SeqCst) == 1 {
                    panic!("injected replace_if 2");
                }
                true
            },
        )
    }));
    assert!(r.is_err());
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.get_with_if(1, || 3, |_| true), 3);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// get_with_if with a time to idle: a kept hit touches the entry (as moka's get_with_if).
#[test]
fn a_get_with_if_touches_idle() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_idle(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(8));
    assert_eq!(cache.get_with_if(1, || 2, |_| false), 1);
    clock.advance(Duration::from_secs(8));
    assert_eq!(
        cache.get(&1),
        Some(1),
        "idle timer reset by the get_with_if hit"
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        cache.get_with_if(1, || 2, |_| unreachable!("expired = absent")),
        2
    );
}

/// Expiry hooks during get_with_if: absent → create; kept → read; replaced → update.
#[test]
fn a_get_with_if_expiry_hooks() {
    #[derive(Default)]
    struct Calls {
        create: AtomicUsize,
        read: AtomicUsize,
        update: AtomicUsize,
    }
    struct E(Arc<Calls>);
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _: &u32, _: &u32) -> Option<Duration> {
            self.0.create.fetch_add(1, Ordering::SeqCst);
            Some(Duration::from_secs(10))
        }
        fn expire_after_read(&self, _: &u32, _: &u32, r: Option<Duration>) -> Option<Duration> {
            self.0.read.fetch_add(1, Ordering::SeqCst);
            r
        }
        fn expire_after_update(&self, _: &u32, _: &u32, r: Option<Duration>) -> Option<Duration> {
            self.0.update.fetch_add(1, Ordering::SeqCst);
            r
        }
    }
    let calls = Arc::new(Calls::default());
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(E(Arc::clone(&calls)))
        .build();
    let get = |c: &AtomicUsize| c.load(Ordering::SeqCst);
    cache.get_with_if(1, || 1, |_| unreachable!());
    assert_eq!(
        (get(&calls.create), get(&calls.read), get(&calls.update)),
        (1, 0, 0)
    );
    cache.get_with_if(1, || 2, |_| false);
    assert_eq!(
        (get(&calls.create), get(&calls.read), get(&calls.update)),
        (1, 1, 0)
    );
    cache.get_with_if(1, || 2, |_| true);
    assert_eq!(get(&calls.update), 1, "replace is an update");
    assert_eq!(get(&calls.create), 1, "not a create");
}

/// get_with_if with a concurrent insert during init: the insert wins (documented); the caller
/// gets init's value; no hang; the cache holds the insert.
#[test]
fn a_get_with_if_write_during_init_wins() {
    let _w = watchdog(LIMIT, "a_get_with_if_write_during_init_wins");
    let cache: Cache<u32, u32> = Cache::new(10);
    cache.insert(1, 0);
    let c = cache.clone();
    let t = spawn(move || {
        c.get_with_if(
            1,
            || {
                sleep(Duration::from_millis(200));
                5
            },
            |v| *v == 0,
        )
    });
    sleep(Duration::from_millis(50));
    cache.insert(1, 9);
    assert_eq!(t.join().unwrap(), 5);
    assert_eq!(
        cache.get(&1),
        Some(9),
        "the write during the computation wins"
    );
}

// =============================================================================================
// Adversarial: invalidate_entries_if
// =============================================================================================

/// A predicate that panics midway: what it removed so far is reported, the counts and
/// weights stay consistent, the cache works afterwards.
#[test]
fn a_invalidate_entries_if_panicking_predicate() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "a_invalidate_entries_if_panicking_predicate");
    let (log, listener) = recorder::<u32, u32>();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1000)
        .shards(4)
        .weigher(|_k: &u32, v: &u32| *v)
        .eviction_listener(listener)
        .record_stats()
        .build();
    for i in 0..100 {
        cache.insert(i, i % 7 + 1);
    }
    let seen = AtomicUsize::new(0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache
            .invalidate_entries_if(|_k, _v| {
                if seen.fetch_add(1, Ordering::SeqCst) == 50 {
                    panic!("injected predicate");
                }
                true
            })
            .unwrap()
    }));
    assert!(r.is_err());
    let removed = take(&log);
    assert!(removed.iter().all(|r| r.2 == RemovalCause::Explicit));
    let left: Vec<(u32, u32)> = cache.iter().collect();
    assert_eq!(
        removed.len() + left.len(),
        100,
        "removed {} left {}",
        removed.len(),
        left.len()
    );
    assert_eq!(cache.entry_count(), left.len() as u64);
    assert_eq!(
        cache.weighted_size(),
        left.iter().map(|(_, v)| *v as u64).sum::<u64>()
    );
    assert_eq!(cache.stats().explicit.count, removed.len() as u64);
    cache.validate();
    cache.insert(1000, 1);
    assert_eq!(cache.get(&1000), Some(1));
    cache.invalidate_entries_if(|_, _| true).unwrap();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
}

/// Expired entries met by invalidate_entries_if are reported as Expired (not Explicit) and
/// never offered to the predicate as live (without fail_safe).
#[test]
fn a_invalidate_entries_if_expired_entries() {
    let (log, listener) = recorder::<u32, u32>();
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(5));
    cache.insert(2, 2);
    clock.advance(Duration::from_secs(5)); // 1 expired, 2 live
    let offered = Mutex::new(Vec::new());
    cache
        .invalidate_entries_if(|k, _| {
            offered.lock().unwrap().push(*k);
            false
        })
        .unwrap();
    assert_eq!(*offered.lock().unwrap(), vec![2]);
    assert_eq!(take(&log), vec![(1, 1, RemovalCause::Expired)]);
    assert_eq!(cache.get(&2), Some(2));
}

/// A load in flight when invalidate_entries_if runs is not affected (moka: entries inserted
/// after the call are not affected); nothing hangs.
#[test]
fn a_invalidate_entries_if_during_a_load() {
    let _w = watchdog(LIMIT, "a_invalidate_entries_if_during_a_load");
    let cache: Cache<u32, u32> = Cache::new(100);
    let c = cache.clone();
    let t = spawn(move || {
        c.get_with(1, || {
            sleep(Duration::from_millis(200));
            1
        })
    });
    sleep(Duration::from_millis(50));
    cache.invalidate_entries_if(|_, _| true).unwrap();
    assert_eq!(t.join().unwrap(), 1);
    assert_eq!(cache.get(&1), Some(1));
}

/// Concurrency: invalidate_entries_if racing inserts of the same keys never leaves a
/// matching value that was present before the call and never removes a value inserted after
/// the call returned; counts stay consistent with the listener.
#[test]
fn a_invalidate_entries_if_concurrent_consistency() {
    let _w = watchdog(LIMIT, "a_invalidate_entries_if_concurrent_consistency");
    let inserted = Arc::new(AtomicU64::new(0));
    let removed = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&removed);
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(100_000)
        .eviction_listener(move |_k: &u32, _v: &u64, c| {
            assert_ne!(c, RemovalCause::Size);
            r.fetch_add(1, Ordering::SeqCst);
        })
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let (c, stop, ins) = (cache.clone(), Arc::clone(&stop), Arc::clone(&inserted));
            spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.insert((i % 500) as u32 + t * 1000, i);
                    ins.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..50 {
        cache.invalidate_entries_if(|_, v| v % 2 == 0).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    // every insert either is live or was removed (replaced or explicit)
    assert_eq!(
        inserted.load(Ordering::SeqCst),
        removed.load(Ordering::SeqCst) + cache.entry_count()
    );
    cache.invalidate_entries_if(|_, v| v % 2 == 0).unwrap();
    assert!(cache.iter().all(|(_, v)| v % 2 == 1));
    cache.validate();
}

// =============================================================================================
// Adversarial: get_or_stale
// =============================================================================================

fn fs_cache(clock: &ManualClock) -> Cache<u32, String> {
    Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .clock(clock.clone())
        .record_stats()
        .build()
}

#[test]
fn a_get_or_stale_without_fail_safe_is_get() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(1))
        .clock(clock.clone())
        .build();
    assert_eq!(cache.get_or_stale(&1), None);
    cache.insert(1, 1);
    assert_eq!(cache.get_or_stale(&1), Some(1));
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.get_or_stale(&1), None);
}

#[test]
fn a_get_or_stale_boundaries() {
    let clock = ManualClock::new();
    let cache = fs_cache(&clock);
    cache.insert(1, "v".into());
    clock.advance(Duration::from_secs(60) - Duration::from_nanos(1));
    assert_eq!(cache.get(&1).as_deref(), Some("v"));
    clock.advance(Duration::from_nanos(1)); // exactly the TTL
    assert_eq!(cache.get(&1), None, "expired at exactly the TTL");
    assert_eq!(cache.get_or_stale(&1).as_deref(), Some("v"));
    assert!(!cache.contains_key(&1), "a stale read does not revive");
    assert_eq!(cache.get(&1), None);
    clock.advance(Duration::from_secs(600) - Duration::from_nanos(1));
    assert_eq!(
        cache.get_or_stale(&1).as_deref(),
        Some("v"),
        "within max_stale"
    );
    clock.advance(Duration::from_nanos(1));
    assert_eq!(cache.get_or_stale(&1), None, "not at or beyond max_stale");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.get_or_stale(&1), None);
}

/// Every removal path ends the stale value.
#[test]
fn a_get_or_stale_after_removals() {
    type Remover = fn(&Cache<u32, String>);
    let removers: [(&str, Remover); 8] = [
        ("invalidate", |c| c.invalidate(&1)),
        ("remove", |c| {
            let _ = c.remove(&1);
        }),
        ("invalidate_all", |c| c.invalidate_all()),
        ("invalidate_entries_if", |c| {
            c.invalidate_entries_if(|k, _| *k == 1).unwrap()
        }),
        ("retain", |c| c.retain(|k, _| *k != 1)),
        ("compute remove", |c| {
            c.entry(1).and_compute_with(|_| Op::Remove);
        }),
        ("optionally None", |c| {
            let _ = c.optionally_get_with(1, || None);
        }),
        ("insert then invalidate", |c| {
            c.insert(1, "new".into());
            c.invalidate(&1);
        }),
    ];
    for (name, remove) in removers {
        let clock = ManualClock::new();
        let cache = fs_cache(&clock);
        cache.insert(1, "v".into());
        cache.insert(2, "w".into());
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            cache.get_or_stale(&1).as_deref(),
            Some("v"),
            "{name}: before"
        );
        remove(&cache);
        assert_eq!(
            cache.get_or_stale(&1),
            None,
            "{name}: stale value after removal"
        );
        let r = cache.try_get_with(1, || Err::<String, _>("down"));
        assert!(
            r.is_err(),
            "{name}: fail-safe answered with a removed value: {r:?}"
        );
        if name != "invalidate_all" {
            assert_eq!(
                cache.get_or_stale(&2).as_deref(),
                Some("w"),
                "{name}: other key"
            );
        }
    }
}

/// A stale value kept through a failing load is still the stale value; after a successful
/// reload get_or_stale returns the new one; statistics count stale serves.
#[test]
fn a_get_or_stale_with_loads() {
    let clock = ManualClock::new();
    let cache = fs_cache(&clock);
    cache.insert(1, "v".into());
    clock.advance(Duration::from_secs(61));
    let r = cache.try_get_with(1, || Err::<String, _>("down"));
    assert_eq!(r.as_deref(), Ok("v"), "fail-safe fallback");
    let s0 = cache.stats();
    assert_eq!(cache.get_or_stale(&1).as_deref(), Some("v"));
    let s = cache.stats() - s0;
    assert_eq!(s.stale_served_after_ttl, 1, "{s:?}");
    assert_eq!(cache.get(&1), None);
    let v = cache.try_get_with(1, || Ok::<_, &str>("v2".to_string()));
    // Retry is within the backoff: either the fallback or the new load is acceptable? The
    // docs: "the key is retried once per backoff" → the stale value is served until then.
    let _ = v;
    clock.advance(Duration::from_secs(5));
    let v = cache
        .try_get_with(1, || Ok::<_, &str>("v2".to_string()))
        .unwrap();
    assert_eq!(v, "v2");
    assert_eq!(cache.get_or_stale(&1).as_deref(), Some("v2"));
    assert_eq!(cache.get(&1).as_deref(), Some("v2"));
}

/// get_or_stale by a borrowed key, while a load of the (expired) key is in flight: answers at
/// once with the stale value.
#[test]
fn a_get_or_stale_during_a_load() {
    let _w = watchdog(LIMIT, "a_get_or_stale_during_a_load");
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .clock(clock.clone())
        .build();
    cache.insert("k".into(), "old".into());
    clock.advance(Duration::from_secs(61));
    let c = cache.clone();
    let t = spawn(move || {
        c.get_with("k".to_string(), || {
            sleep(Duration::from_millis(300));
            "new".to_string()
        })
    });
    sleep(Duration::from_millis(50));
    let r = within(Duration::from_millis(200), {
        let c = cache.clone();
        move || c.get_or_stale("k")
    });
    assert_eq!(
        r.expect("get_or_stale waited for the load")
            .unwrap()
            .as_deref(),
        Some("old")
    );
    assert_eq!(t.join().unwrap(), "new");
    assert_eq!(cache.get_or_stale("k").as_deref(), Some("new"));
}

/// Size eviction of an entry ends its stale value too (an evicted entry is gone).
#[test]
fn a_get_or_stale_after_size_eviction() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(2)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(61));
    for i in 2..50 {
        cache.insert(i, i);
        for _ in 0..3 {
            let _ = cache.get(&i);
        }
    }
    cache.run_pending_tasks();
    assert!(cache.entry_count() <= 2);
    // Whether 1 is still kept is policy: but if it is served stale, it must be counted.
    if cache.get_or_stale(&1).is_some() {
        assert!(cache.iter().count() <= 2);
    }
    cache.validate();
}

/// TTI + fail_safe: a stale read does not reset the idle timer (the entry stays expired).
#[test]
fn a_get_or_stale_tti_no_revive() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_idle(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(100))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get_or_stale(&1), Some(1));
    assert_eq!(cache.get(&1), None, "stale read revived the entry");
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.get(&1), None);
    assert_eq!(cache.get_or_stale(&1), Some(1));
}

// =============================================================================================
// initial_capacity / support_invalidation_closures
// =============================================================================================

#[test]
fn a_initial_capacity_huge_is_ignored() {
    let r = within(SHORT, || {
        let cache: Cache<u64, u64> = Cache::builder()
            .initial_capacity(usize::MAX)
            .max_capacity(10)
            .support_invalidation_closures()
            .build();
        for i in 0..100 {
            cache.insert(i, i);
        }
        cache.entry_count()
    });
    assert!(r.expect("hung").expect("panicked") <= 10);
    let c: Cache<u64, u64> = CacheBuilder::new(5)
        .support_invalidation_closures()
        .initial_capacity(0)
        .build();
    c.insert(1, 1);
    assert_eq!(c.get(&1), Some(1));
}

// =============================================================================================
// Adversarial: user code that panics or misbehaves
// =============================================================================================

static PANIC_WEIGHER: AtomicBool = AtomicBool::new(false);
static USER_CODE_LOCK: Mutex<()> = Mutex::new(());

fn user_lock() -> std::sync::MutexGuard<'static, ()> {
    USER_CODE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A weigher that panics while a load's value is stored: the leader panics; a waiter must not
/// hang (it gets a value or loads itself), the key is loadable afterwards and weights add up.
#[test]
fn u_weigher_panics_on_store_with_waiter() {
    let _l = user_lock();
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "u_weigher_panics_on_store_with_waiter");
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k: &u32, v: &u32| {
            if PANIC_WEIGHER.swap(false, Ordering::SeqCst) {
                panic!("injected weigher");
            }
            *v
        })
        .build();
    PANIC_WEIGHER.store(true, Ordering::SeqCst);
    let c = cache.clone();
    let leader = spawn(move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(1, || {
                sleep(Duration::from_millis(200));
                5
            })
        }))
    });
    sleep(Duration::from_millis(50));
    let c = cache.clone();
    let waiter = within(SHORT, move || c.get_with(1, || 6));
    let lr = leader.join().unwrap();
    let wr = waiter.expect("waiter hung after the leader's weigher panicked");
    let wv = wr.expect("waiter panicked");
    assert!(wv == 5 || wv == 6);
    if let Ok(v) = lr {
        // the weigher panic hit the waiter's path instead? then the leader got 5
        assert_eq!(v, 5);
    }
    let live: Vec<_> = cache.iter().collect();
    assert_eq!(
        cache.weighted_size(),
        live.iter().map(|(_, v)| *v as u64).sum::<u64>()
    );
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    PANIC_WEIGHER.store(false, Ordering::SeqCst);
}

/// A weigher that panics on insert of a present key: the insert panics, nothing leaks.
#[test]
fn u_weigher_panics_on_replace() {
    let _l = user_lock();
    quiet_injected_panics();
    let (log, listener) = recorder::<u32, u32>();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .eviction_listener(listener)
        .weigher(|_k: &u32, v: &u32| {
            if PANIC_WEIGHER.swap(false, Ordering::SeqCst) {
                panic!("injected weigher");
            }
            *v
        })
        .build();
    cache.insert(1, 10);
    cache.insert(2, 20);
    PANIC_WEIGHER.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| cache.insert(1, 30)));
    assert!(r.is_err());
    let live: Vec<_> = cache.iter().collect();
    assert_eq!(
        cache.weighted_size(),
        live.iter().map(|(_, v)| *v as u64).sum::<u64>(),
        "{live:?}"
    );
    assert_eq!(cache.entry_count(), live.len() as u64);
    // If the old value is gone, it was reported.
    if cache.get(&1).is_none() {
        assert_eq!(take(&log).len(), 1);
    }
    cache.validate();
    cache.insert(1, 40);
    assert_eq!(cache.get(&1), Some(40));
    cache.validate();
}

/// Expiry::expire_after_create panics while a load's value is stored, with a waiter.
#[test]
fn u_expiry_create_panics_on_store_with_waiter() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "u_expiry_create_panics_on_store_with_waiter");
    struct E(AtomicBool);
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _: &u32, _: &u32) -> Option<Duration> {
            if self.0.swap(false, Ordering::SeqCst) {
                panic!("injected expiry");
            }
            Some(Duration::from_secs(10))
        }
    }
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .expire_after(E(AtomicBool::new(true)))
        .build();
    let c = cache.clone();
    let leader = spawn(move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(1, || {
                sleep(Duration::from_millis(200));
                5
            })
        }))
    });
    sleep(Duration::from_millis(50));
    let c = cache.clone();
    let waiter = within(SHORT, move || c.get_with(1, || 6));
    let _ = leader.join().unwrap();
    let wv = waiter.expect("waiter hung").expect("waiter panicked");
    assert!(wv == 5 || wv == 6);
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.validate();
}

/// Expiry::expire_after_read panics on get: the get panics; the entry and counts stay sane.
#[test]
fn u_expiry_read_panics() {
    quiet_injected_panics();
    struct E(AtomicBool);
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _: &u32, _: &u32) -> Option<Duration> {
            Some(Duration::from_secs(10))
        }
        fn expire_after_read(&self, _: &u32, _: &u32, r: Option<Duration>) -> Option<Duration> {
            if self.0.swap(false, Ordering::SeqCst) {
                panic!("injected expiry read");
            }
            r
        }
    }
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .expire_after(E(AtomicBool::new(true)))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    let r = catch_unwind(AssertUnwindSafe(|| cache.get(&1)));
    assert!(r.is_err());
    cache.validate();
    assert_eq!(cache.get(&1), Some(1));
    clock.advance(Duration::from_secs(10));
    assert_eq!(cache.get(&1), None, "still expires at its deadline");
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

/// Expiry::expire_after_update panics on insert over a present key.
#[test]
fn u_expiry_update_panics() {
    quiet_injected_panics();
    struct E(AtomicBool);
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _: &u32, _: &u32) -> Option<Duration> {
            Some(Duration::from_secs(10))
        }
        fn expire_after_update(&self, _: &u32, _: &u32, r: Option<Duration>) -> Option<Duration> {
            if self.0.swap(false, Ordering::SeqCst) {
                panic!("injected expiry update");
            }
            r
        }
    }
    let (log, listener) = recorder::<u32, u32>();
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .expire_after(E(AtomicBool::new(true)))
        .eviction_listener(listener)
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    let r = catch_unwind(AssertUnwindSafe(|| cache.insert(1, 2)));
    assert!(r.is_err());
    cache.validate();
    let v = cache.get(&1);
    let notes = take(&log);
    match v {
        Some(1) => assert!(notes.is_empty(), "{notes:?}"),
        Some(2) => assert_eq!(notes, vec![(1, 1, RemovalCause::Replaced)]),
        None => assert_eq!(notes.len(), 1, "a removed value is reported: {notes:?}"),
        other => panic!("{other:?}"),
    }
    clock.advance(Duration::from_secs(10));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

/// The eviction listener panics while a loaded value is stored (it evicts another entry):
/// the waiter of that load is not stranded.
#[test]
fn u_listener_panics_on_load_store_with_waiter() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "u_listener_panics_on_load_store_with_waiter");
    let armed = Arc::new(AtomicBool::new(true));
    let a = Arc::clone(&armed);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1)
        .eviction_listener(move |_k: &u32, _v: &u32, _c| {
            if a.swap(false, Ordering::SeqCst) {
                panic!("injected listener");
            }
        })
        .build();
    cache.insert(100, 100);
    for _ in 0..10 {
        let _ = cache.get(&100);
    }
    let c = cache.clone();
    let leader = spawn(move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(1, || {
                sleep(Duration::from_millis(200));
                5
            })
        }))
    });
    sleep(Duration::from_millis(50));
    let c = cache.clone();
    let waiter = within(SHORT, move || c.get_with(1, || 6));
    let _ = leader.join().unwrap();
    let wv = waiter.expect("waiter hung").expect("waiter panicked");
    assert!(wv == 5 || wv == 6, "{wv}");
    assert_eq!(cache.loads_in_flight(), 0);
    assert!(cache.entry_count() <= 1);
    cache.validate();
}

static PANIC_CLONE: AtomicBool = AtomicBool::new(false);

/// A value whose Clone panics while armed.
#[derive(Debug, PartialEq)]
struct Fragile(u32);
impl Clone for Fragile {
    fn clone(&self) -> Self {
        if PANIC_CLONE.load(Ordering::SeqCst) {
            panic!("injected clone");
        }
        Fragile(self.0)
    }
}

/// A value whose Clone panics when handed to waiters: no waiter hangs.
#[test]
fn u_value_clone_panics_for_waiters() {
    let _l = user_lock();
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "u_value_clone_panics_for_waiters");
    let cache: Cache<u32, Fragile> = Cache::new(100);
    let c = cache.clone();
    let leader = spawn(move || {
        catch_unwind(AssertUnwindSafe(|| {
            c.get_with(1, || {
                sleep(Duration::from_millis(200));
                PANIC_CLONE.store(true, Ordering::SeqCst);
                Fragile(5)
            })
        }))
    });
    sleep(Duration::from_millis(50));
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = cache.clone();
            common::start(move || c.get_with(1, || Fragile(6)))
        })
        .collect();
    let _ = leader.join().unwrap();
    for w in waiters {
        let r = w.wait(SHORT);
        assert!(
            r.is_some(),
            "a waiter hung when a clone of the value panicked"
        );
    }
    PANIC_CLONE.store(false, Ordering::SeqCst);
    assert_eq!(cache.loads_in_flight(), 0);
    let v = within(SHORT, {
        let c = cache.clone();
        move || c.get_with(1, || Fragile(7))
    });
    assert!(v.expect("hung").is_ok());
    cache.validate();
}

/// A value whose Clone panics during `get` (under the read lock) and `iter`.
#[test]
fn u_value_clone_panics_on_get_and_iter() {
    let _l = user_lock();
    quiet_injected_panics();
    let cache: Cache<u32, Fragile> = Cache::new(100);
    for i in 0..10 {
        cache.insert(i, Fragile(i));
    }
    PANIC_CLONE.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| cache.get(&1))).is_err());
    assert!(catch_unwind(AssertUnwindSafe(|| cache.iter().count())).is_err());
    assert!(catch_unwind(AssertUnwindSafe(|| cache.get_with_if(
        1,
        || Fragile(0),
        |_| false
    )))
    .is_err());
    PANIC_CLONE.store(false, Ordering::SeqCst);
    let r = within(SHORT, {
        let c = cache.clone();
        move || {
            c.insert(1, Fragile(100));
            c.get(&1)
        }
    });
    assert_eq!(
        r.expect("hung (a lock left held)").unwrap(),
        Some(Fragile(100))
    );
    assert_eq!(cache.iter().count(), 10);
    cache.validate();
}

static PANIC_EQ: AtomicBool = AtomicBool::new(false);

/// A key whose Eq panics while armed (Hash fine, and consistent with Eq).
#[derive(Debug, Clone)]
struct Touchy(u32);
impl std::hash::Hash for Touchy {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}
impl PartialEq for Touchy {
    fn eq(&self, o: &Self) -> bool {
        if PANIC_EQ.load(Ordering::SeqCst) {
            panic!("injected eq");
        }
        self.0 == o.0
    }
}
impl Eq for Touchy {}

/// Key Eq panics during insert / get / invalidate / get_with (under the shard lock): no lock
/// left held, counts consistent.
#[test]
fn u_key_eq_panics() {
    let _l = user_lock();
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "u_key_eq_panics");
    let cache: Cache<Touchy, u32> = Cache::builder().max_capacity(100_000).shards(1).build();
    for i in 0..20 {
        cache.insert(Touchy(i), i);
    }
    PANIC_EQ.store(true, Ordering::SeqCst);
    let _ = catch_unwind(AssertUnwindSafe(|| cache.insert(Touchy(3), 33)));
    let _ = catch_unwind(AssertUnwindSafe(|| cache.get(&Touchy(4))));
    let _ = catch_unwind(AssertUnwindSafe(|| cache.invalidate(&Touchy(5))));
    let _ = catch_unwind(AssertUnwindSafe(|| cache.get_with(Touchy(6), || 0)));
    let _ = catch_unwind(AssertUnwindSafe(|| cache.get_with(Touchy(60), || 0)));
    let _ = catch_unwind(AssertUnwindSafe(|| {
        cache.get_with_if(Touchy(7), || 0, |_| true)
    }));
    let _ = catch_unwind(AssertUnwindSafe(|| {
        cache.entry(Touchy(8)).and_compute_with(|_| Op::Put(1))
    }));
    PANIC_EQ.store(false, Ordering::SeqCst);
    let r = within(SHORT, {
        let c = cache.clone();
        move || {
            for i in 0..100 {
                c.insert(Touchy(i), i);
                assert_eq!(c.get(&Touchy(i)), Some(i));
                assert_eq!(c.get_with(Touchy(i + 1000), || 1), 1);
                c.entry(Touchy(i)).and_compute_with(|_| Op::Put(i + 1));
            }
        }
    });
    if let Err(p) = r.expect("a key stayed locked / hung") {
        panic!("after Eq panics: {}", common::panic_message(&*p));
    }
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.entry_count(), cache.iter().count() as u64);
    cache.validate();
}

static PANIC_DROP: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Debug)]
struct BombOnDrop(#[allow(dead_code)] u32);
impl Drop for BombOnDrop {
    fn drop(&mut self) {
        if PANIC_DROP.swap(false, Ordering::SeqCst) && !std::thread::panicking() {
            panic!("injected drop");
        }
    }
}

/// A value whose Drop panics when evicted / replaced / invalidated: weights and counts stay
/// consistent; the listener sees every removal.
#[test]
fn u_value_drop_panics() {
    let _l = user_lock();
    quiet_injected_panics();
    let removed = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&removed);
    let cache: Cache<u32, BombOnDrop> = Cache::builder()
        .max_capacity(10)
        .eviction_listener(move |_k: &u32, _v: &BombOnDrop, _c| {
            r.fetch_add(1, Ordering::SeqCst);
        })
        .build();
    let mut inserted = 0;
    for round in 0..5u32 {
        for i in 0..20u32 {
            PANIC_DROP.store(true, Ordering::SeqCst);
            let _ = catch_unwind(AssertUnwindSafe(|| cache.insert(i, BombOnDrop(round))));
            inserted += 1;
        }
        PANIC_DROP.store(true, Ordering::SeqCst);
        let _ = catch_unwind(AssertUnwindSafe(|| cache.invalidate(&(round * 3))));
        PANIC_DROP.store(true, Ordering::SeqCst);
        let _ = catch_unwind(AssertUnwindSafe(|| {
            cache.invalidate_entries_if(|k, _| k % 5 == 0).unwrap()
        }));
    }
    PANIC_DROP.store(false, Ordering::SeqCst);
    assert!(cache.entry_count() <= 10);
    assert_eq!(
        removed.load(Ordering::SeqCst) as u64 + cache.entry_count(),
        inserted,
        "every insert is either live or was reported removed"
    );
    cache.validate();
}

/// A loader (Cache::load) that panics under max_concurrent_loads(1): the permit is released.
#[test]
fn u_loader_panics_releases_permit() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "u_loader_panics_releases_permit");
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .loader(|k: &u32| {
            if *k == 0 {
                panic!("injected loader");
            }
            Ok::<_, herdcache::BoxError>(*k)
        })
        .build();
    for _ in 0..3 {
        let r = catch_unwind(AssertUnwindSafe(|| cache.load(0)));
        assert!(
            matches!(r, Ok(Err(herdcache::LoadError::Panicked))),
            "{r:?}"
        );
    }
    let r = within(SHORT, {
        let c = cache.clone();
        move || c.load(5).unwrap()
    });
    assert_eq!(r.expect("permit leaked: load hung").unwrap(), 5);
    // get_with under the limit too
    assert!(catch_unwind(AssertUnwindSafe(
        || cache.get_with(7, || panic!("injected init"))
    ))
    .is_err());
    let r = within(SHORT, {
        let c = cache.clone();
        move || c.get_with(8, || 8)
    });
    assert_eq!(r.expect("permit leaked: get_with hung").unwrap(), 8);
    assert!(cache.load_limit_stats().0 <= 1);
}

/// A listener that calls back into the cache (documented as allowed): insert of other keys,
/// get of the removed key, invalidate_entries_if — no deadlock, counts consistent.
#[test]
fn u_listener_reenters_the_cache() {
    let _w = watchdog(LIMIT, "u_listener_reenters_the_cache");
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
    let s = Arc::clone(&slot);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(5)
        .eviction_listener(move |k: &u32, _v: &u32, _c| {
            let c = s.lock().unwrap().clone();
            if let Some(c) = c {
                let _ = c.get(k);
                if *k < 1000 {
                    c.insert(k + 1000, 0);
                }
                if *k < 1000 {
                    let _ = c.get_with_if(k + 2000, || 1, |_| false);
                }
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    let r = within(SHORT, {
        let c = cache.clone();
        move || {
            for i in 0..50 {
                c.insert(i, i);
            }
            c.invalidate_entries_if(|k, _| k % 2 == 0).unwrap();
            c.invalidate_all();
        }
    });
    r.expect("listener re-entry deadlocked").expect("panicked");
    *slot.lock().unwrap() = None;
    assert!(cache.entry_count() <= 5);
    cache.validate();
}

/// A weigher returning 0 for everything and u32::MAX for some: the bound and accounting hold.
#[test]
fn u_weigher_extremes() {
    let (log, listener) = recorder::<u32, u32>();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(u32::MAX as u64 + 5)
        .weigher(|_k: &u32, v: &u32| if *v == 0 { 0 } else { u32::MAX })
        .eviction_listener(listener)
        .build();
    for i in 0..100 {
        cache.insert(i, 0);
    }
    assert_eq!(cache.weighted_size(), 0);
    cache.insert(1000, 1);
    cache.insert(1001, 1);
    assert!(cache.weighted_size() <= u32::MAX as u64 + 5);
    let live: Vec<_> = cache.iter().collect();
    let w: u64 = live
        .iter()
        .map(|(_, v)| if *v == 0 { 0 } else { u32::MAX as u64 })
        .sum();
    assert_eq!(cache.weighted_size(), w);
    assert_eq!(take(&log).len() + live.len(), 102);
    cache.validate();
}

// =============================================================================================
// Adversarial: a mixed concurrent workload, checked for conservation of values
// =============================================================================================

/// Every value is produced once (unique ids). At the end: no value is reported to the
/// listener twice, no live value was also reported, weights add up, the invariants hold.
fn mixed_workload(seed: u64, fail_safe: bool, weigher: bool) {
    let _w = watchdog(LIMIT, "mixed_workload");
    quiet_injected_panics();
    let next = Arc::new(AtomicU64::new(1));
    let reported: Arc<Mutex<HashMap<u64, RemovalCause>>> = Arc::new(Mutex::new(HashMap::new()));
    let dup: Arc<Mutex<Vec<(u64, RemovalCause, RemovalCause)>>> = Arc::new(Mutex::new(Vec::new()));
    let (rep, d) = (Arc::clone(&reported), Arc::clone(&dup));
    let (reported_all, dup_all) = (Arc::clone(&reported), Arc::clone(&dup));
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(if weigher { 150 } else { 48 })
        .shards(2)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .eviction_listener(move |_k: &u32, v: &u64, c| {
            if let Some(prev) = rep.lock().unwrap().insert(*v, c) {
                d.lock().unwrap().push((*v, prev, c));
            }
        });
    if fail_safe {
        b = b.fail_safe(Duration::from_secs(30));
    }
    if weigher {
        b = b.weigher(|_k: &u32, v: &u64| (v % 5 + 1) as u32);
    }
    let cache: Cache<u32, u64> = b.build();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = cache.clone();
            let next = Arc::clone(&next);
            let clock = clock.clone();
            spawn(move || {
                let mut r = common::rng(seed * 31 + t + 1);
                let new = || next.fetch_add(1, Ordering::SeqCst);
                for _ in 0..3000 {
                    let x = r();
                    let k = (x >> 8) as u32 % 80;
                    match x % 23 {
                        0..=3 => cache.insert(k, new()),
                        4..=6 => {
                            let _ = cache.get(&k);
                        }
                        7 => {
                            let _ = cache.get_with(k, new);
                        }
                        8 => {
                            let _ = cache.get_with_if(k, new, |v| v % 3 == 0);
                        }
                        9 => {
                            let _ = cache.try_get_with(k, || {
                                if x % 2 == 0 {
                                    Ok(new())
                                } else {
                                    Err("down")
                                }
                            });
                        }
                        10 => {
                            let _ = cache.optionally_get_with(k, || (x % 2 == 0).then(new));
                        }
                        11 => {
                            cache.entry(k).and_compute_with(|e| match (e, x % 3) {
                                (Some(_), 0) => Op::Remove,
                                (_, 1) => Op::Put(new()),
                                _ => Op::Nop,
                            });
                        }
                        12 => {
                            cache.entry(k).and_upsert_with(|_| new());
                        }
                        13 => cache.invalidate(&k),
                        14 => {
                            let _ = cache.remove(&k);
                        }
                        15 => {
                            if x % 16 == 0 {
                                cache
                                    .invalidate_entries_if(|kk, _| kk % 7 == k % 7)
                                    .unwrap();
                            }
                        }
                        16 => {
                            if x % 16 == 0 {
                                cache.retain(|_, v| v % 4 != 0);
                            }
                        }
                        17 => {
                            let _ = cache.get_or_stale(&k);
                        }
                        18 => {
                            if t == 0 {
                                clock.advance(Duration::from_millis(x % 3000));
                            }
                        }
                        19 => {
                            if x % 8 == 0 {
                                cache.run_pending_tasks();
                            }
                        }
                        20 => {
                            if x % 64 == 0 {
                                cache.invalidate_all();
                            }
                        }
                        21 => {
                            let _ = cache.entry(k).or_insert_with(new);
                        }
                        _ => {
                            let _ = cache.contains_key(&k);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    cache.run_pending_tasks();
    let dup = dup.lock().unwrap().clone();
    assert!(
        dup.is_empty(),
        "values reported twice: {:?}",
        &dup[..dup.len().min(5)]
    );
    let reported = reported.lock().unwrap().clone();
    let produced = next.load(Ordering::SeqCst);
    let live: Vec<(u32, u64)> = cache.iter().collect();
    for (k, v) in &live {
        assert!(*v < produced);
        assert!(
            !reported.contains_key(v),
            "live value {v} of key {k} was reported removed ({:?})",
            reported.get(v)
        );
        assert_eq!(cache.get(k), Some(*v));
    }
    for v in reported.keys() {
        assert!(*v < produced);
    }
    if fail_safe {
        // RELAXED (documented): expired entries are kept within max_stale and count.
        assert!(
            cache.entry_count() >= live.len() as u64,
            "entry_count vs iter"
        );
    } else {
        assert_eq!(
            cache.entry_count(),
            live.len() as u64,
            "entry_count vs iter"
        );
        if weigher {
            assert_eq!(
                cache.weighted_size(),
                live.iter().map(|(_, v)| v % 5 + 1).sum::<u64>()
            );
        }
    }
    assert!(cache.weighted_size() <= cache.max_capacity());
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
    // Everything expires and is reclaimed: nothing left, nothing reported twice.
    clock.advance(Duration::from_secs(41));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
    let dup = dup_all.lock().unwrap().clone();
    assert!(
        dup.is_empty(),
        "values reported twice: {:?}",
        &dup[..dup.len().min(5)]
    );
    let reported = reported_all.lock().unwrap().clone();
    for (_, v) in &live {
        assert_eq!(
            reported.get(v),
            Some(&RemovalCause::Expired),
            "live value {v} at the end"
        );
    }
    // Statistics agree with the listener.
    let s = cache.stats();
    let by = |c: RemovalCause| reported.values().filter(|x| **x == c).count() as u64;
    assert_eq!(s.expired.count, by(RemovalCause::Expired), "{s:?}");
    assert_eq!(s.explicit.count, by(RemovalCause::Explicit), "{s:?}");
    assert_eq!(s.replaced.count, by(RemovalCause::Replaced), "{s:?}");
    assert_eq!(s.size.count, by(RemovalCause::Size), "{s:?}");
}

#[test]
fn m_mixed_plain() {
    let n: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 1..n {
        mixed_workload(seed, false, false);
    }
}

#[test]
fn m_mixed_fail_safe() {
    let n: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 1..n {
        mixed_workload(seed, true, false);
    }
}

#[test]
fn m_mixed_weigher_fail_safe() {
    let n: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 1..n {
        mixed_workload(seed, true, true);
    }
}

// =============================================================================================
// More edges: expiry extremes, capacity zero, shared errors
// =============================================================================================

#[test]
fn e_expiry_read_zero_and_max() {
    struct E;
    impl Expiry<u32, u32> for E {
        fn expire_after_create(&self, _: &u32, v: &u32) -> Option<Duration> {
            Some(if *v == 0 {
                Duration::MAX
            } else {
                Duration::from_secs(5)
            })
        }
        fn expire_after_read(&self, _: &u32, v: &u32, r: Option<Duration>) -> Option<Duration> {
            if *v == 1 {
                Some(Duration::ZERO)
            } else {
                r
            }
        }
        fn expire_after_update(&self, _: &u32, _: &u32, _: Option<Duration>) -> Option<Duration> {
            Some(Duration::MAX)
        }
    }
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(E)
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    assert_eq!(
        cache.get(&1),
        Some(1),
        "the read that set zero still returns the value"
    );
    assert_eq!(cache.get(&1), None, "then expired");
    cache.insert(2, 0); // Duration::MAX
    clock.advance(Duration::from_secs(u32::MAX as u64 * 1000));
    assert_eq!(
        cache.get(&2),
        Some(0),
        "Duration::MAX never expires (no overflow)"
    );
    cache.insert(2, 5); // update → MAX
    clock.advance(Duration::from_secs(u32::MAX as u64 * 1000));
    assert_eq!(cache.get(&2), Some(5));
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 1);
    cache.validate();
}

#[test]
fn e_ttl_max_and_big_clock() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::MAX)
        .time_to_idle(Duration::from_secs(u64::MAX / 4))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
    assert_eq!(cache.get(&1), Some(1));
    cache.run_pending_tasks();
    assert_eq!(cache.get(&1), Some(1));
}

/// Capacity 0: every stored value is evicted at once and reported as Size; loads still
/// single-flight and return their value; nothing hangs.
#[test]
fn e_capacity_zero_loads_and_listener() {
    let _w = watchdog(LIMIT, "e_capacity_zero_loads_and_listener");
    let (log, listener) = recorder::<u32, u32>();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(0)
        .eviction_listener(listener)
        .build();
    cache.insert(1, 1);
    assert_eq!(take(&log), vec![(1, 1, RemovalCause::Size)]);
    let loads = AtomicUsize::new(0);
    let barrier = Barrier::new(4);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                barrier.wait();
                let v = cache.get_with(2, || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    sleep(Duration::from_millis(100));
                    7
                });
                assert_eq!(v, 7);
            });
        }
    });
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.get_with_if(3, || 3, |_| true), 3);
    let e = cache.entry(4).or_insert_with(|| 4);
    assert!(e.is_fresh());
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

/// try_get_with: every caller of one failed load gets the same Arc (moka: `Arc::ptr_eq`).
#[test]
fn e_try_get_with_shared_error_arc() {
    let _w = watchdog(LIMIT, "e_try_get_with_shared_error_arc");
    let cache: Cache<u32, u32> = Cache::new(10);
    let barrier = Barrier::new(3);
    let errs: Vec<Arc<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    cache
                        .try_get_with(1, || {
                            sleep(Duration::from_millis(200));
                            Err("down".to_string())
                        })
                        .unwrap_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Callers that arrived while the load ran share its error; a late one may load again.
    let shared = errs.iter().filter(|e| Arc::ptr_eq(e, &errs[0])).count();
    assert!(shared >= 2, "waiters share the leader's Arc");
}

/// moka-style: an invalidate while a get_with loads. RELAXED (documented difference): moka
/// stores the loaded value; herdcache lets the invalidation win (the loaded value goes to the
/// callers, is not stored).
#[test]
fn e_invalidate_during_get_with() {
    let _w = watchdog(LIMIT, "e_invalidate_during_get_with");
    let cache: Cache<u32, u32> = Cache::new(10);
    let c = cache.clone();
    let t = spawn(move || {
        c.get_with(1, || {
            sleep(Duration::from_millis(200));
            1
        })
    });
    sleep(Duration::from_millis(50));
    cache.invalidate(&1);
    assert_eq!(t.join().unwrap(), 1);
    assert_eq!(
        cache.get(&1),
        None,
        "herdcache: the invalidation wins (documented)"
    );
    assert_eq!(cache.get_with(1, || 2), 2);
}

/// F2 (from moka's `get_with_if` / `or_insert_with_if` contract, single-flight): callers that
/// arrive while another caller's `init` replaces the key wait for it and take its value
/// (moka's value initializer: `ReadExisting`), so a "force refresh" (`|_| true`) from 4 threads
/// at once runs `init` once. herdcache re-ran each waiter's `replace_if` on the fresh value,
/// and with `|_| true` ran `init` once per caller, one after another (4 serialized loads).
#[test]
fn f2_get_with_if_concurrent_force_replace_runs_init_once() {
    let _w = watchdog(LIMIT, "f2");
    let cache: Cache<u32, u64> = Cache::new(10);
    cache.insert(1, 0);
    let inits = AtomicUsize::new(0);
    let barrier = Barrier::new(4);
    let got: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let (cache, inits, barrier) = (&cache, &inits, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    cache.get_with_if(
                        1,
                        || {
                            inits.fetch_add(1, Ordering::SeqCst);
                            sleep(Duration::from_millis(200));
                            100 + t
                        },
                        |_| true,
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        inits.load(Ordering::SeqCst),
        1,
        "4 concurrent callers, one init (moka); got values {got:?}"
    );
}
