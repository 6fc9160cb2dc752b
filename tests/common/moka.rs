//! Helpers of the tests ported from moka (`moka_port_sync.rs`, `moka_port_future.rs`): moka's
//! test utilities (`Counters`, `Value`, `ExpiryCallCounters`) and the translation helpers
//! (`mock_clock`, `recorder`, `verify_notification_vec`), written once for both.
#![allow(dead_code)]

use herdcache::{Cache, ManualClock, RemovalCause};
use parking_lot::Mutex;
use std::sync::{
    atomic::{AtomicU32, AtomicU8, Ordering},
    Arc,
};

pub fn mock_clock() -> (ManualClock, ManualClock) {
    let c = ManualClock::new();
    (c.clone(), c)
}

pub type NotificationTuple<K, V> = (Arc<K>, V, RemovalCause);

/// moka's `move |k, v, cause| a1.lock().push((k, v, cause))`.
pub fn recorder<K, V>(
    actual: Arc<Mutex<Vec<NotificationTuple<K, V>>>>,
) -> impl Fn(&K, &V, RemovalCause) + Send + Sync + 'static
where
    K: Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    move |k: &K, v: &V, cause| actual.lock().push((Arc::new(k.clone()), v.clone(), cause))
}

pub fn is_table_empty<K, V, S>(cache: &Cache<K, V, S>) -> bool
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
{
    cache.entry_count() == 0
}

pub fn no_loads_in_flight<K, V, S>(cache: &Cache<K, V, S>) -> bool
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
{
    cache.loads_in_flight() == 0
}

pub fn verify_notification_vec<K, V, S>(
    cache: &Cache<K, V, S>,
    actual: Arc<Mutex<Vec<NotificationTuple<K, V>>>>,
    expected: &[NotificationTuple<K, V>],
) where
    K: std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    V: Eq + std::fmt::Debug + Clone + Send + Sync + 'static,
    S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
{
    cache.run_pending_tasks();
    let actual = &*actual.lock();
    assert_eq!(
        actual.len(),
        expected.len(),
        "notification count; actual: {actual:?}"
    );
    for (i, (actual, expected)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(actual, expected, "expected[{i}]");
    }
}

// moka's `policy::test_utils::ExpiryCallCounters`.
#[derive(Default)]
pub struct ExpiryCallCounters {
    pub expected_creations: AtomicU8,
    pub expected_reads: AtomicU8,
    pub expected_updates: AtomicU8,
    pub actual_creations: AtomicU8,
    pub actual_reads: AtomicU8,
    pub actual_updates: AtomicU8,
}

impl ExpiryCallCounters {
    pub fn incl_expected_creations(&self) {
        self.expected_creations.fetch_add(1, Ordering::Relaxed);
    }
    pub fn incl_expected_reads(&self) {
        self.expected_reads.fetch_add(1, Ordering::Relaxed);
    }
    pub fn incl_expected_updates(&self) {
        self.expected_updates.fetch_add(1, Ordering::Relaxed);
    }
    pub fn incl_actual_creations(&self) {
        self.actual_creations.fetch_add(1, Ordering::Relaxed);
    }
    pub fn incl_actual_reads(&self) {
        self.actual_reads.fetch_add(1, Ordering::Relaxed);
    }
    pub fn incl_actual_updates(&self) {
        self.actual_updates.fetch_add(1, Ordering::Relaxed);
    }
    pub fn verify(&self) {
        assert_eq!(
            self.expected_creations.load(Ordering::Relaxed),
            self.actual_creations.load(Ordering::Relaxed),
            "expected_creations != actual_creations"
        );
        assert_eq!(
            self.expected_reads.load(Ordering::Relaxed),
            self.actual_reads.load(Ordering::Relaxed),
            "expected_reads != actual_reads"
        );
        assert_eq!(
            self.expected_updates.load(Ordering::Relaxed),
            self.actual_updates.load(Ordering::Relaxed),
            "expected_updates != actual_updates"
        );
    }
}

// moka's `common::test_utils::{Counters, Value}`.
#[derive(Debug, Default)]
pub struct Counters {
    pub inserted: AtomicU32,
    pub evicted: AtomicU32,
    pub invalidated: AtomicU32,
    pub value_created: AtomicU32,
    pub value_dropped: AtomicU32,
}

impl Counters {
    pub fn inserted(&self) -> u32 {
        self.inserted.load(Ordering::Acquire)
    }
    pub fn evicted(&self) -> u32 {
        self.evicted.load(Ordering::Acquire)
    }
    pub fn invalidated(&self) -> u32 {
        self.invalidated.load(Ordering::Acquire)
    }
    pub fn value_created(&self) -> u32 {
        self.value_created.load(Ordering::Acquire)
    }
    pub fn value_dropped(&self) -> u32 {
        self.value_dropped.load(Ordering::Acquire)
    }
    pub fn incl_inserted(&self) {
        self.inserted.fetch_add(1, Ordering::AcqRel);
    }
    pub fn incl_evicted(&self) {
        self.evicted.fetch_add(1, Ordering::AcqRel);
    }
    pub fn incl_invalidated(&self) {
        self.invalidated.fetch_add(1, Ordering::AcqRel);
    }
    pub fn incl_value_created(&self) {
        self.value_created.fetch_add(1, Ordering::AcqRel);
    }
    pub fn incl_value_dropped(&self) {
        self.value_dropped.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct Value {
    pub counters: Arc<Counters>,
}

impl Value {
    pub fn new(_blob: Vec<u8>, counters: &Arc<Counters>) -> Self {
        counters.incl_value_created();
        Self {
            counters: Arc::clone(counters),
        }
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        self.counters.incl_value_dropped();
    }
}
