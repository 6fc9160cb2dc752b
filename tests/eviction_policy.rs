//! `EvictionPolicy::lru()`: exact least-recently-used order, checked against a reference LRU
//! (a recency-ordered list) on random operation sequences, with and without a weigher; the
//! evictions the listener hears must be the model's, in the model's order. Plus moka's own
//! single-threaded LRU scenario, the default policy's contrast on a scan, concurrent use, and
//! the sizing curve simulating LRU (not the default policy) for an LRU cache.

#![cfg(not(loom))]

use herdcache::{Cache, EvictionPolicy, RemovalCause};
use proptest::prelude::*;
use std::sync::{Arc, Mutex};

type Heard = Arc<Mutex<Vec<(u8, u16, RemovalCause)>>>;

fn lru_cache(capacity: u64, weighted: bool) -> (Cache<u8, u16>, Heard) {
    let heard: Heard = Arc::default();
    let h = heard.clone();
    let mut b = Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(EvictionPolicy::lru())
        .shards(1)
        .eviction_listener(move |k: &u8, v: &u16, c| h.lock().unwrap().push((*k, *v, c)));
    if weighted {
        b = b.weigher(|_, v: &u16| weight_of(*v));
    }
    (b.build(), heard)
}

fn weight_of(v: u16) -> u32 {
    u32::from(v % 4) + 1
}

/// The reference: entries least recently used first.
struct Model {
    capacity: u64,
    weighted: bool,
    order: Vec<(u8, u16)>,
    evicted: Vec<(u8, u16)>,
}

impl Model {
    fn weight(&self, v: u16) -> u64 {
        if self.weighted {
            u64::from(weight_of(v))
        } else {
            1
        }
    }

    fn position(&self, k: u8) -> Option<usize> {
        self.order.iter().position(|e| e.0 == k)
    }

    fn touch(&mut self, k: u8) -> Option<u16> {
        let i = self.position(k)?;
        let e = self.order.remove(i);
        self.order.push(e);
        Some(e.1)
    }

    fn insert(&mut self, k: u8, v: u16) {
        if let Some(i) = self.position(k) {
            self.order.remove(i);
        }
        if self.weight(v) > self.capacity {
            // Too heavy for the cache: turned away at once (the listener hears `Size`), and
            // the old value is gone.
            self.evicted.push((k, v));
            return;
        }
        self.order.push((k, v));
        while self.order.iter().map(|e| self.weight(e.1)).sum::<u64>() > self.capacity {
            let e = self.order.remove(0);
            self.evicted.push(e);
        }
    }

    fn remove(&mut self, k: u8) {
        if let Some(i) = self.position(k) {
            self.order.remove(i);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u8, u16),
    Get(u8),
    Contains(u8),
    Remove(u8),
    GetWith(u8, u16),
    InvalidateAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..12, any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
        5 => (0u8..12).prop_map(Op::Get),
        2 => (0u8..12).prop_map(Op::Contains),
        1 => (0u8..12).prop_map(Op::Remove),
        2 => (0u8..12, any::<u16>()).prop_map(|(k, v)| Op::GetWith(k, v)),
        1 => Just(Op::InvalidateAll),
    ]
}

fn check(capacity: u64, weighted: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let (cache, heard) = lru_cache(capacity, weighted);
    let mut m = Model {
        capacity,
        weighted,
        order: Vec::new(),
        evicted: Vec::new(),
    };
    for op in ops {
        match *op {
            Op::Insert(k, v) => {
                cache.insert(k, v);
                m.insert(k, v);
            }
            Op::Get(k) => prop_assert_eq!(cache.get(&k), m.touch(k), "get {}", k),
            Op::Contains(k) => prop_assert_eq!(cache.contains_key(&k), m.position(k).is_some()),
            Op::Remove(k) => {
                cache.invalidate(&k);
                m.remove(k);
            }
            Op::GetWith(k, v) => {
                let got = cache.get_with(k, || v);
                match m.touch(k) {
                    Some(old) => prop_assert_eq!(got, old),
                    None => {
                        prop_assert_eq!(got, v);
                        m.insert(k, v);
                    }
                }
            }
            Op::InvalidateAll => {
                cache.invalidate_all();
                m.order.clear();
            }
        }
        cache.validate();
        let heard: Vec<(u8, u16)> = heard
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.2 == RemovalCause::Size)
            .map(|e| (e.0, e.1))
            .collect();
        prop_assert_eq!(&heard, &m.evicted, "evictions after {:?}", op);
        // `contains_key` does not touch recency: checking every key changes nothing.
        for k in 0..12u8 {
            prop_assert_eq!(cache.contains_key(&k), m.position(k).is_some(), "key {}", k);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn lru_matches_a_reference_lru(capacity in 1u64..8, ops in prop::collection::vec(op(), 1..150)) {
        check(capacity, false, &ops)?;
    }

    #[test]
    fn weighted_lru_matches_a_reference_lru(capacity in 1u64..16, ops in prop::collection::vec(op(), 1..150)) {
        check(capacity, true, &ops)?;
    }
}

/// The model catches an LRU that ignores reads (a FIFO): the sequence a reference LRU and a
/// FIFO disagree on, as the property test would need to find it.
#[test]
fn a_read_saves_an_entry_that_a_fifo_would_evict() {
    let ops = [
        Op::Insert(1, 1),
        Op::Insert(2, 2),
        Op::Get(1),
        Op::Insert(3, 3),
        Op::Contains(2),
    ];
    check(2, false, &ops).unwrap();
    let (cache, heard) = lru_cache(2, false);
    cache.insert(1, 1);
    cache.insert(2, 2);
    assert_eq!(cache.get(&1), Some(1));
    cache.insert(3, 3);
    assert_eq!(heard.lock().unwrap()[0], (2, 2, RemovalCause::Size));
    // A second-chance (CLOCK) policy would evict 2 here too, but not after a replacement:
    // replacing 1's value makes it the most recently used.
    cache.insert(1, 10);
    cache.insert(4, 4);
    let sized: Vec<_> = heard
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.2 == RemovalCause::Size)
        .copied()
        .collect();
    assert_eq!(
        sized,
        [(2, 2, RemovalCause::Size), (3, 3, RemovalCause::Size)]
    );
    assert_eq!(cache.get(&1), Some(10));
}

/// moka's `basic_lru_single_thread`, in herdcache's shape (the bound holds when `insert`
/// returns, so the eviction is heard at once rather than at `run_pending_tasks`).
#[test]
fn mokas_basic_lru_single_thread() {
    type Notes = Vec<(&'static str, &'static str, RemovalCause)>;
    let heard: Arc<Mutex<Notes>> = Arc::default();
    let h = heard.clone();
    let cache = Cache::builder()
        .max_capacity(3)
        .eviction_policy(EvictionPolicy::lru())
        .eviction_listener(move |k: &&str, v: &&str, c| h.lock().unwrap().push((*k, *v, c)))
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
    // c -> a -> b: "d" is admitted (LRU admits every key) and "c" is evicted.
    cache.insert("d", "david");
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
    // a -> d
    cache.insert("e", "emily");
    cache.insert("f", "frank");
    // d -> e -> f: "a" is evicted.
    assert_eq!(cache.get(&"a"), None);
    assert_eq!(cache.get(&"d"), Some("david"));
    assert_eq!(cache.get(&"e"), Some("emily"));
    assert_eq!(cache.get(&"f"), Some("frank"));
    assert_eq!(
        *heard.lock().unwrap(),
        [
            ("c", "cindy", RemovalCause::Size),
            ("b", "bob", RemovalCause::Explicit),
            ("a", "alice", RemovalCause::Size),
        ]
    );
    assert_eq!(cache.entry_count(), 3);
}

/// The contrast that makes TinyLFU the default: after a scan of one-off keys, LRU has lost its
/// hot set, the default policy kept it.
#[test]
fn a_scan_flushes_lru_but_not_the_default_policy() {
    let hot_after_scan = |policy: EvictionPolicy| {
        let cache = Cache::builder()
            .max_capacity(100)
            .eviction_policy(policy)
            .build();
        for _ in 0..20 {
            for k in 0..50u64 {
                cache.get_with(k, || k);
            }
        }
        for k in 1000..1200u64 {
            cache.insert(k, k);
        }
        (0..50u64).filter(|k| cache.contains_key(k)).count()
    };
    assert_eq!(hot_after_scan(EvictionPolicy::lru()), 0);
    assert!(hot_after_scan(EvictionPolicy::tiny_lfu()) >= 45);
    assert_eq!(EvictionPolicy::default(), EvictionPolicy::tiny_lfu());
}

/// Many threads reading, writing and removing under LRU: the bound holds, nothing is lost
/// from the bookkeeping (`validate`), and the hot keys read by every thread survive a stream
/// of one-off inserts that only one thread makes (they are always more recent).
#[test]
fn concurrent_lru_keeps_its_bookkeeping_and_bound() {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(2_000)
        .eviction_policy(EvictionPolicy::lru())
        .build();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let cache = &cache;
            s.spawn(move || {
                for i in 0..50_000u64 {
                    let k = (i * 7919 + t * 104_729) % 5_000;
                    match i % 5 {
                        0 | 1 => {
                            cache.get(&k);
                        }
                        2 => cache.insert(k, i),
                        3 => {
                            cache.get_with(k, || i);
                        }
                        _ => cache.invalidate(&(k + 1)),
                    }
                }
            });
        }
    });
    cache.validate();
    assert!(cache.weighted_size() <= 2_000);
    for k in 0..5_000u64 {
        cache.insert(k, k);
    }
    cache.validate();
    assert!(cache.entry_count() <= 2_000);
}

/// The sizing curve of an LRU cache simulates LRU: on a loop over 1.5 × the capacity, LRU
/// hits nothing at 1 × (each key is evicted just before it comes back) and everything at 2 ×,
/// where the default policy's shadows would predict a large share at 1 ×.
#[test]
fn an_lru_caches_sizing_curve_predicts_lru() {
    let curve_at_1x = |policy: EvictionPolicy| {
        let cache: Cache<u64, u64> = Cache::builder()
            .max_capacity(1_000)
            .eviction_policy(policy)
            .track_sizing()
            .record_stats()
            .build();
        for _ in 0..40 {
            for k in 0..1_500u64 {
                if cache.get(&k).is_none() {
                    cache.insert(k, k);
                }
            }
        }
        let sizing = cache.sizing().expect("tracked");
        let points = sizing.points().to_vec();
        let at = |c: u64| points.iter().find(|p| p.0 == c).expect("point").1;
        (at(1_000), at(2_000), cache.stats().hit_ratio())
    };
    let (one, two, observed) = curve_at_1x(EvictionPolicy::lru());
    assert!(
        observed < 0.01,
        "LRU on a loop larger than the cache: {observed}"
    );
    assert!(one < 0.05, "predicted at 1 ×: {one}");
    assert!(two > 0.9, "predicted at 2 ×: {two}");
    let (one, _, observed) = curve_at_1x(EvictionPolicy::tiny_lfu());
    assert!(
        observed > 0.3,
        "the default policy on the same loop: {observed}"
    );
    assert!(
        one > 0.3,
        "predicted at 1 × by the default policy's shadows: {one}"
    );
}
