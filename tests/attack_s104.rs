//! Round 104: an outside attack (a helper, public API only) on the promises the docs make
//! (`# Panics`, listener causes heard once, weights, expiry of every kind, fail-safe's window,
//! re-entrant listeners, panicking `Hash`/`Eq`/`Clone`/`Drop`/`Expiry`, capacity and duration
//! extremes), two features at a time; 31 tests, one failing: `negative_ttl`'s docs promised
//! that a failure of `get_all` is remembered, but a key its `load_missing` leaves out has no
//! error or `None` to remember (the docs now say so; the test checks that behaviour, and that a
//! negative entry `get_all` reloaded and left out is put back).
mod common;

use common::{quiet_injected_panics, watchdog, within};
use herdcache::{BoxError, Cache, Expiry, ManualClock, RemovalCause};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Log<K, V> = Arc<Mutex<Vec<(K, V, RemovalCause)>>>;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---------------------------------------------------------------------------------------------
// 1. A listener that calls get_with on the same key while a get_with of that key reclaims the
//    expired entry: "may call back into the cache" (builder.rs eviction_listener).
#[test]
fn listener_get_with_same_key_during_expiry_reclaim() {
    let _w = watchdog(Duration::from_secs(10), "listener_get_with_same_key");
    let r = within(Duration::from_secs(5), || {
        let clock = ManualClock::new();
        let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
        let s2 = Arc::clone(&slot);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h2 = Arc::clone(&heard);
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(10)
            .time_to_live(secs(10))
            .clock(clock.clone())
            .eviction_listener(move |k, v, c| {
                h2.lock().unwrap().push((*k, *v, c));
                if c == RemovalCause::Expired {
                    let c = s2.lock().unwrap().clone();
                    if let Some(c) = c {
                        // same key, nested load
                        let _ = c.get_with(*k, || 1000 + *v);
                    }
                }
            })
            .build();
        *slot.lock().unwrap() = Some(cache.clone());
        cache.insert(1, 1);
        clock.advance(secs(11));
        let v = cache.get_with(1, || 2);
        let got = cache.get(&1);
        cache.validate();
        *slot.lock().unwrap() = None;
        let h = heard.lock().unwrap().clone();
        (v, got, h)
    });
    let (v, got, heard) = r
        .expect("hang: listener's get_with of the key being loaded")
        .unwrap();
    assert!(v == 2 || v == 1001, "value {v}");
    assert!(got.is_some());
    let expired: Vec<_> = heard
        .iter()
        .filter(|e| e.2 == RemovalCause::Expired)
        .collect();
    assert_eq!(expired.len(), 1, "expired exactly once: {heard:?}");
}

// 2. A listener that re-inserts on Size eviction (cascading evictions), capacity 1.
#[test]
fn listener_reinserts_on_size_eviction_cascade() {
    let _w = watchdog(Duration::from_secs(10), "listener_reinserts");
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&slot);
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let budget = Arc::new(AtomicU32::new(50));
    let b2 = Arc::clone(&budget);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1)
        .shards(1)
        .eviction_listener(move |k, v, c| {
            l2.lock().unwrap().push((*k, *v, c));
            if c == RemovalCause::Size
                && b2
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                    .is_ok()
            {
                let c = s2.lock().unwrap().clone();
                if let Some(c) = c {
                    c.insert(*k + 100, *v + 100);
                }
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    for i in 0..5 {
        cache.insert(i, i);
        assert!(cache.entry_count() <= 1, "count {}", cache.entry_count());
        assert!(cache.weighted_size() <= 1);
    }
    cache.validate();
    // every value inserted is either present or was reported exactly once
    let log = log.lock().unwrap().clone();
    let present: Vec<_> = cache.iter().collect();
    let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
    for (k, v, _) in &log {
        *seen.entry((*k, *v)).or_default() += 1;
    }
    for ((k, v), n) in &seen {
        assert_eq!(*n, 1, "({k},{v}) reported {n} times");
        assert!(
            !present.contains(&(*k, *v)),
            "({k},{v}) reported yet present"
        );
    }
    *slot.lock().unwrap() = None;
}

// 3. Weigher that reads the weight from the value: 0, u32::MAX and ordinary weights;
//    weighted_size equals the sum of the live entries' weights; u64::MAX capacity.
#[test]
fn weigher_extremes_weighted_size_ledger() {
    let log: Log<u32, (u32, u32)> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, (u32, u32)> = Cache::builder()
        .max_capacity(u64::MAX)
        .weigher(|_k, v: &(u32, u32)| v.1)
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    let weights = [0u32, u32::MAX, 1, u32::MAX, 0, 7, u32::MAX];
    for (i, w) in weights.iter().enumerate() {
        cache.insert(i as u32 % 5, (i as u32, *w));
    }
    cache.validate();
    let sum: u64 = cache.iter().map(|(_, v)| u64::from(v.1)).sum();
    assert_eq!(cache.weighted_size(), sum, "weighted_size vs live sum");
    assert_eq!(cache.entry_count(), 5);
    cache.invalidate_all();
    assert_eq!(cache.weighted_size(), 0);
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

// 4. Weigher + per-entry Expiry + refresh_after: weights change on refresh; the ledger holds.
struct ByWeight;
impl Expiry<u32, (u32, u32)> for ByWeight {
    fn expire_after_create(&self, _k: &u32, v: &(u32, u32)) -> Option<Duration> {
        Some(Duration::from_secs(u64::from(v.1 % 7) + 20))
    }
    fn expire_after_update(
        &self,
        _k: &u32,
        v: &(u32, u32),
        _r: Option<Duration>,
    ) -> Option<Duration> {
        if v.1 % 3 == 0 {
            Some(Duration::ZERO)
        } else {
            Some(Duration::from_secs(30))
        }
    }
    fn expire_after_read(
        &self,
        _k: &u32,
        _v: &(u32, u32),
        r: Option<Duration>,
    ) -> Option<Duration> {
        r
    }
}

#[test]
fn weigher_expiry_refresh_combined_ledger() {
    let _w = watchdog(Duration::from_secs(10), "weigher_expiry_refresh");
    let clock = ManualClock::new();
    let gen = Arc::new(AtomicU32::new(1));
    let g2 = Arc::clone(&gen);
    let log: Log<u32, (u32, u32)> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, (u32, u32)> = Cache::builder()
        .max_capacity(200)
        .shards(1)
        .weigher(|_k, v: &(u32, u32)| v.1)
        .expire_after(ByWeight)
        .refresh_after(secs(5))
        .clock(clock.clone())
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .loader(move |k: &u32| {
            let g = g2.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>((*k, (g * 7 + *k) % 40))
        })
        .build();
    let mut inserted = 0u64;
    for round in 0..30u32 {
        for k in 0..12u32 {
            let _ = cache.load(k);
            inserted += 1;
            if (k + round) % 5 == 0 {
                cache.insert(k, (k, round % 50));
                inserted += 1;
            }
        }
        clock.advance(secs(3));
        cache.run_pending_tasks();
        cache.validate();
        let sum: u64 = cache.iter().map(|(_, v)| u64::from(v.1)).sum();
        // iter yields only live entries; weighted_size counts expired-not-reclaimed too, so
        // reclaim first (run_pending_tasks) and compare.
        assert!(
            cache.weighted_size() <= 200,
            "over capacity: {}",
            cache.weighted_size()
        );
        assert_eq!(
            cache.weighted_size(),
            sum,
            "round {round}: weighted_size vs sum of live weights after run_pending_tasks"
        );
    }
    let _ = inserted;
}

// 5. Expiry returning ZERO on create: "already expired, to be stored" -> Expired once,
//    nothing stored. Expiry returning Duration::MAX: never expires, even after a huge advance.
struct ZeroOrMax;
impl Expiry<u32, u32> for ZeroOrMax {
    fn expire_after_create(&self, k: &u32, _v: &u32) -> Option<Duration> {
        Some(if k % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::MAX
        })
    }
    fn expire_after_read(&self, _k: &u32, _v: &u32, _r: Option<Duration>) -> Option<Duration> {
        Some(Duration::MAX)
    }
}

#[test]
fn expiry_zero_and_max() {
    let clock = ManualClock::new();
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .expire_after(ZeroOrMax)
        .time_to_idle(Duration::MAX)
        .clock(clock.clone())
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    for k in 0..10 {
        cache.insert(k, k);
    }
    let v = cache.get_with(20, || 20);
    assert_eq!(v, 20);
    assert_eq!(cache.get(&20), None, "ZERO expiry stored via get_with");
    for k in 0..10 {
        if k % 2 == 0 {
            assert_eq!(cache.get(&k), None, "key {k} with ZERO expiry readable");
        } else {
            assert_eq!(cache.get(&k), Some(k));
        }
    }
    clock.advance(Duration::from_secs(u64::MAX / 4));
    clock.advance(Duration::MAX);
    for k in (1..10).step_by(2) {
        assert_eq!(
            cache.get(&k),
            Some(k),
            "Duration::MAX expiry expired at clock end"
        );
    }
    cache.run_pending_tasks();
    cache.validate();
    assert_eq!(cache.entry_count(), 5);
    let log = log.lock().unwrap().clone();
    let mut expired: Vec<u32> = log
        .iter()
        .filter(|e| e.2 == RemovalCause::Expired)
        .map(|e| e.0)
        .collect();
    expired.sort();
    assert_eq!(expired, vec![0, 2, 4, 6, 8, 20], "log {log:?}");
}

// 6. TTL Duration::ZERO: "nothing is ever stored" (builder.rs time_to_live).
#[test]
fn ttl_zero_stores_nothing_anywhere() {
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::ZERO)
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    cache.insert(1, 1);
    assert_eq!(cache.get_with(2, || 2), 2);
    let _ = cache.try_get_with(3, || Ok::<_, ()>(3));
    let _ = cache.optionally_get_with(4, || Some(4));
    let _ = cache.entry(5).or_insert(5);
    let _ = cache.get_all([6, 7], |m| m.iter().map(|&k| (k, k)).collect());
    cache.entry(8).and_upsert_with(|_| 8);
    assert_eq!(cache.entry_count(), 0, "entry_count");
    assert_eq!(cache.weighted_size(), 0);
    assert_eq!(cache.iter().count(), 0);
    for k in 1..=8 {
        assert!(!cache.contains_key(&k), "{k} stored");
    }
    cache.validate();
    let log = log.lock().unwrap().clone();
    let mut keys: Vec<u32> = log.iter().map(|e| e.0).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), log.len(), "some key reported twice: {log:?}");
    for e in &log {
        assert_eq!(e.2, RemovalCause::Expired, "{log:?}");
    }
}

// 7. TTI + Expiry: earliest deadline wins; reads don't extend past the custom deadline.
struct Fixed100;
impl Expiry<u32, u32> for Fixed100 {
    fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
        Some(secs(100))
    }
}
#[test]
fn tti_and_expiry_earliest_wins() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(Fixed100)
        .time_to_idle(secs(10))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    for _ in 0..11 {
        clock.advance(secs(9));
        assert_eq!(cache.get(&1), Some(1));
    }
    // t = 99
    clock.advance(secs(1));
    assert_eq!(
        cache.get(&1),
        None,
        "expired at the custom deadline despite reads"
    );
    cache.insert(2, 2);
    clock.advance(secs(10));
    assert_eq!(cache.get(&2), None, "TTI");
    cache.validate();
}

// 8. TTI + fail_safe: serving a stale value must not extend the stale window: "Never beyond
//    max_stale" (builder.rs fail_safe).
#[test]
fn tti_fail_safe_stale_window_not_extended_by_stale_reads() {
    let _w = watchdog(Duration::from_secs(10), "tti_fail_safe");
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let cache: Cache<u32, String> = Cache::builder()
        .max_capacity(100)
        .time_to_idle(secs(10))
        .fail_safe(secs(100))
        .refresh_backoff(Duration::from_nanos(1))
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(format!("v{k}"))
            }
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), "v1");
    down.store(true, Ordering::SeqCst);
    clock.advance(secs(11)); // idle-expired at t=10
    let mut t = 11;
    let mut last_ok = 0;
    while t < 400 {
        if let Ok(v) = cache.load(1) {
            assert_eq!(v, "v1");
            last_ok = t;
        }
        let _ = cache.get_or_stale(&1);
        clock.advance(secs(5));
        t += 5;
    }
    cache.validate();
    assert!(
        last_ok <= 110,
        "stale value served at t={last_ok}s, deadline 10s + max_stale 100s"
    );
}

// 9. Expiry::expire_after_update panicking: "A panic in a method leaves the key as it was
//    before the write and reaches the writer" (expiry.rs).
struct PanicOnUpdate;
impl Expiry<u32, u32> for PanicOnUpdate {
    fn expire_after_create(&self, k: &u32, _v: &u32) -> Option<Duration> {
        if *k == 99 {
            panic!("injected create panic");
        }
        Some(secs(50))
    }
    fn expire_after_update(&self, _k: &u32, v: &u32, r: Option<Duration>) -> Option<Duration> {
        if *v == 666 {
            panic!("injected update panic");
        }
        r
    }
}
#[test]
fn expiry_panic_leaves_key_as_it_was() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(10), "expiry_panic");
    let clock = ManualClock::new();
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(PanicOnUpdate)
        .weigher(|_k, v: &u32| if *v == 666 { 3 } else { 1 })
        .clock(clock.clone())
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    cache.insert(1, 1);
    assert!(catch_unwind(AssertUnwindSafe(|| cache.insert(1, 666))).is_err());
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(cache.weighted_size(), 1, "weight after panicking update");
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
    // a get_with whose store panics must not strand the key
    assert!(catch_unwind(AssertUnwindSafe(|| cache.get_with(1, || 666))).is_ok());
    assert!(catch_unwind(AssertUnwindSafe(|| cache.get_with(99, || 5))).is_err());
    // create panics again -> panics; the key just must not hang
    assert!(catch_unwind(AssertUnwindSafe(|| cache.get_with(99, || 7))).is_err());
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

#[test]
fn expiry_create_panic_in_get_with_does_not_strand_waiters() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(10), "expiry_create_panic_waiters");
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(PanicOnUpdate)
        .build();
    for _ in 0..3 {
        assert!(catch_unwind(AssertUnwindSafe(|| cache.get_with(99, || 5))).is_err());
    }
    assert_eq!(cache.loads_in_flight(), 0);
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

// 10. Keys with inconsistent Eq (never equal, even to itself): the cache must stay whole.
#[derive(Clone, Debug)]
struct NaNKey(u32);
impl PartialEq for NaNKey {
    fn eq(&self, _o: &Self) -> bool {
        false
    }
}
impl Eq for NaNKey {}
impl Hash for NaNKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}
#[test]
fn never_equal_keys_stay_bounded_and_valid() {
    let _w = watchdog(Duration::from_secs(10), "never_equal_keys");
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<NaNKey, u32> = Cache::builder()
        .max_capacity(4)
        .shards(1)
        .eviction_listener(move |k: &NaNKey, v, c| l2.lock().unwrap().push((k.0, *v, c)))
        .build();
    for i in 0..20 {
        cache.insert(NaNKey(i % 2), i);
        let _ = cache.get_with(NaNKey(7), || 100 + i);
        assert!(cache.entry_count() <= 4, "count {}", cache.entry_count());
    }
    // (validate() relies on Eq being reflexive: not called while such keys are stored)
    let n = cache.entry_count();
    cache.invalidate_all();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
    let log = log.lock().unwrap();
    let explicit = log.iter().filter(|e| e.2 == RemovalCause::Explicit).count() as u64;
    assert_eq!(explicit, n, "invalidate_all reports each entry once");
}

// 11. Keys whose Hash panics on demand: a panic inside retain/invalidate_all must not wedge.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Touchy(u32);
static TOUCHY_ARMED: AtomicBool = AtomicBool::new(false);
impl Hash for Touchy {
    fn hash<H: Hasher>(&self, h: &mut H) {
        if TOUCHY_ARMED.load(Ordering::SeqCst) && self.0 == 3 {
            panic!("injected hash panic");
        }
        self.0.hash(h)
    }
}
#[test]
fn hash_panic_then_cache_still_usable() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(10), "hash_panic");
    let cache: Cache<Touchy, u32> = Cache::builder().max_capacity(100).shards(2).build();
    for i in 0..10 {
        cache.insert(Touchy(i), i);
    }
    TOUCHY_ARMED.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| cache.get(&Touchy(3))));
    assert!(r.is_err());
    let _ = catch_unwind(AssertUnwindSafe(|| cache.insert(Touchy(3), 33)));
    let _ = catch_unwind(AssertUnwindSafe(|| cache.retain(|k, _| k.0 % 2 == 0)));
    TOUCHY_ARMED.store(false, Ordering::SeqCst);
    cache.validate();
    cache.insert(Touchy(50), 50);
    assert_eq!(cache.get(&Touchy(50)), Some(50));
    cache.invalidate_all();
    assert_eq!(cache.entry_count(), 0);
    cache.validate();
}

// 12. Values whose Drop panics: invalidate_all still clears everything, reports each once,
//     then resumes the first panic (remove.rs over_shards).
#[derive(Debug)]
struct Bomb(u32);
impl Clone for Bomb {
    fn clone(&self) -> Self {
        Bomb(self.0 + 10_000)
    }
}
impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 % 3 == 0 && self.0 < 10_000 && !std::thread::panicking() {
            panic!("injected drop panic {}", self.0);
        }
    }
}
#[test]
fn drop_panics_during_invalidate_all() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(10), "drop_panics");
    let heard = Arc::new(AtomicUsize::new(0));
    let h2 = Arc::clone(&heard);
    let cache: Cache<u32, Bomb> = Cache::builder()
        .max_capacity(1000)
        .shards(4)
        .eviction_listener(move |_k, _v, _c| {
            h2.fetch_add(1, Ordering::SeqCst);
        })
        .build();
    for i in 1..=40 {
        cache.insert(i, Bomb(i));
    }
    let r = catch_unwind(AssertUnwindSafe(|| cache.invalidate_all()));
    assert!(r.is_err(), "first drop panic resumed");
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    assert_eq!(heard.load(Ordering::SeqCst), 40, "each reported once");
    cache.validate();
    cache.insert(1, Bomb(1));
    assert_eq!(cache.get(&1).map(|b| b.0), Some(10_001));
}

// 13. Value Clone panics during iter: lock released, cache usable.
#[derive(Debug)]
struct CloneBomb(u32);
static CLONE_ARMED: AtomicBool = AtomicBool::new(false);
impl Clone for CloneBomb {
    fn clone(&self) -> Self {
        if CLONE_ARMED.load(Ordering::SeqCst) && self.0 == 5 {
            panic!("injected clone panic");
        }
        CloneBomb(self.0)
    }
}
#[test]
fn clone_panic_in_iter_and_get_all() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(10), "clone_panic_iter");
    let cache: Cache<u32, CloneBomb> = Cache::builder().max_capacity(100).shards(2).build();
    for i in 0..10 {
        cache.insert(i, CloneBomb(i));
    }
    CLONE_ARMED.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| cache.iter().count())).is_err());
    let r = catch_unwind(AssertUnwindSafe(|| {
        cache.get_all([4, 5, 6, 11], |m| {
            m.iter().map(|&k| (k, CloneBomb(k))).collect()
        })
    }));
    assert!(r.is_err());
    CLONE_ARMED.store(false, Ordering::SeqCst);
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "get_all left a flight: {}",
        cache.describe_loads()
    );
    cache.insert(20, CloneBomb(20));
    assert_eq!(cache.iter().count() as u64, cache.entry_count());
    let all = cache.get_all([4, 5, 6, 11], |m| {
        m.iter().map(|&k| (k, CloneBomb(k))).collect()
    });
    assert_eq!(all.len(), 4);
    cache.validate();
}

// 14. Negative caching + get_all: "get_all ... load the key again: a value they load is
//     stored and ends it, a failure of theirs is remembered in its place" (builder.rs).
#[test]
fn negative_caching_with_get_all() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .negative_ttl(secs(30))
        .clock(clock.clone())
        .build();
    let calls = AtomicUsize::new(0);
    assert!(cache.try_get_with(1, || Err::<u32, _>("down")).is_err());
    assert!(cache
        .try_get_with(1, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(9)
        })
        .is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "negative entry not honoured"
    );
    // get_all loads it again and stores: ends the negative entry
    let all = cache.get_all([1, 2], |m| {
        assert_eq!(
            m.len(),
            2,
            "get_all must reload the negatively cached key: {m:?}"
        );
        m.iter().map(|&k| (k, k * 10)).collect()
    });
    assert_eq!(all.get(&1), Some(&10));
    assert_eq!(cache.try_get_with(1, || Ok::<_, &str>(77)), Ok(10));
    // A key get_all's load_missing leaves out is a failed load with nothing to remember
    // (builder.rs, `negative_ttl`, as fixed after this round: the doc had said "a failure of
    // theirs is remembered"): the next caller loads it.
    let all = cache.get_all([3], |_m| HashMap::new());
    assert!(all.is_empty());
    let r = cache.optionally_get_with(3, || {
        calls.fetch_add(1, Ordering::SeqCst);
        Some(3)
    });
    assert_eq!((calls.load(Ordering::SeqCst), r), (1, Some(3)));
    // ... and a negative entry it reloaded and left out is left as it was: still remembered.
    assert!(cache.try_get_with(4, || Err::<u32, _>("down")).is_err());
    let all = cache.get_all([4], |m| {
        assert_eq!(m.len(), 1, "get_all reloads a negatively cached key: {m:?}");
        HashMap::new()
    });
    assert!(all.is_empty());
    let r = cache.try_get_with(4, || {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<_, &str>(4)
    });
    assert_eq!(
        r.map_err(|e| *e),
        Err("down"),
        "the negative entry put back"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(secs(31));
    assert_eq!(cache.try_get_with(4, || Ok::<_, &str>(4)), Ok(4));
    cache.validate();
}

// 15. invalidate_all during a first-time load in flight: a write/invalidation during a load
//     wins?  retain says "A load of a key that has no entry ... is not touched".
//     And during a reload of an existing (expired) key it must be superseded.
#[test]
fn invalidate_entries_if_during_reload_supersedes() {
    let _w = watchdog(Duration::from_secs(10), "invalidate_during_reload");
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(10))
        .fail_safe(secs(100))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(secs(11));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let c = cache.clone();
    let h = std::thread::spawn(move || {
        c.get_with(1, || {
            tx.send(()).unwrap();
            go_rx.recv().unwrap();
            2
        })
    });
    rx.recv().unwrap();
    cache.invalidate_entries_if(|_, _| true).unwrap();
    go_tx.send(()).unwrap();
    assert_eq!(h.join().unwrap(), 2);
    assert_eq!(
        cache.get(&1),
        None,
        "the superseded reload's value was stored"
    );
    cache.validate();
}

// 16. Capacity 0: nothing stored, each value reported once as Size.
#[test]
fn capacity_zero_reports_and_stores_nothing() {
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(0)
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    cache.insert(1, 1);
    assert_eq!(cache.get_with(2, || 2), 2);
    cache.insert(1, 3);
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "{log:?}");
    for e in &log {
        assert_eq!(e.2, RemovalCause::Size, "{log:?}");
    }
}

// 17. entry_count counts expired entries until reclaimed; run_pending_tasks reclaims and
//     reports each exactly once, even when a listener reads the same keys back.
#[test]
fn run_pending_tasks_reclaims_each_once_with_reentrant_reader() {
    let _w = watchdog(Duration::from_secs(10), "run_pending_reentrant");
    let clock = ManualClock::new();
    let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&slot);
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1000)
        .time_to_live(secs(10))
        .clock(clock.clone())
        .eviction_listener(move |k, v, c| {
            l2.lock().unwrap().push((*k, *v, c));
            let c = s2.lock().unwrap().clone();
            if let Some(c) = c {
                let _ = c.get(k);
                c.invalidate(&(k + 1));
                let _ = c.contains_key(k);
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    for i in 0..100 {
        cache.insert(i, i);
    }
    clock.advance(secs(11));
    assert_eq!(cache.entry_count(), 100);
    cache.run_pending_tasks();
    // reads may have reclaimed; run again
    cache.run_pending_tasks();
    assert_eq!(
        cache.entry_count(),
        0,
        "entries left after run_pending_tasks"
    );
    let log = log.lock().unwrap().clone();
    let mut keys: Vec<u32> = log.iter().map(|e| e.0).collect();
    keys.sort();
    assert_eq!(keys, (0..100).collect::<Vec<_>>(), "each exactly once");
    *slot.lock().unwrap() = None;
    cache.validate();
}

// 18. Jitter with Duration::MAX TTL: "Duration::MAX means never" must survive jitter.
#[test]
fn jitter_does_not_make_never_finite() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::MAX)
        .time_to_idle(Duration::MAX)
        .jitter(0.99)
        .clock(clock.clone())
        .build();
    for i in 0..50 {
        cache.insert(i, i);
    }
    clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
    for i in 0..50 {
        assert_eq!(
            cache.get(&i),
            Some(i),
            "key {i} expired with TTL/TTI Duration::MAX + jitter"
        );
    }
    cache.validate();
}

// 19. A huge (non-MAX) TTL near u64::MAX nanos with a clock that has already advanced: no
//     overflow that wraps to an early deadline.
#[test]
fn huge_ttl_after_clock_advance_no_wrap() {
    let clock = ManualClock::new();
    clock.advance(Duration::from_nanos(u64::MAX / 2));
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_nanos(u64::MAX - 5))
        .clock(clock.clone())
        .build();
    cache.insert(1, 1);
    clock.advance(secs(1));
    assert_eq!(cache.get(&1), Some(1), "huge TTL wrapped");
    cache.validate();
}

// 20. A weigher that changes its mind between insert calls of the same value (replace):
//     weighted_size must follow the stored entries, never the weigher's current opinion.
#[test]
fn fickle_weigher_replace_and_remove() {
    let flip = Arc::new(AtomicU32::new(0));
    let f2 = Arc::clone(&flip);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(1_000_000)
        .weigher(move |_k, _v| {
            let n = f2.fetch_add(1, Ordering::SeqCst);
            [0, u32::MAX / 4096, 5, 0, 1][n as usize % 5]
        })
        .build();
    for i in 0..40 {
        cache.insert(i % 7, i);
        if i % 4 == 0 {
            cache.invalidate(&(i % 5));
        }
        if i % 6 == 0 {
            let _ = cache.remove(&(i % 3));
        }
    }
    cache.validate();
    cache.invalidate_all();
    assert_eq!(
        cache.weighted_size(),
        0,
        "weight leaked by a fickle weigher"
    );
    cache.validate();
}

// 21. TTI with expiry read hook resetting to MAX, and refresh_after + negative_ttl together:
//     a failing refresh is not negatively cached over a live value.
#[test]
fn refresh_failure_with_negative_ttl_keeps_value() {
    let _w = watchdog(Duration::from_secs(10), "refresh_negative");
    let clock = ManualClock::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .negative_ttl(secs(30))
        .clock(clock.clone())
        .loader(move |k: &u32| {
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(*k)
            }
        })
        .build();
    assert_eq!(cache.load(5).unwrap(), 5);
    down.store(true, Ordering::SeqCst);
    clock.advance(secs(11));
    assert_eq!(
        cache.load(5).unwrap(),
        5,
        "refresh-ahead returns the old value"
    );
    assert_eq!(
        cache.get(&5),
        Some(5),
        "failed refresh removed the live value"
    );
    assert_eq!(cache.load(5).unwrap(), 5);
    clock.advance(secs(50)); // past TTL
    assert!(cache.load(5).is_err());
    down.store(false, Ordering::SeqCst);
    // negative entry remembered for 30 s
    assert!(cache.load(5).is_err(), "negative entry honoured");
    clock.advance(secs(31));
    assert_eq!(cache.load(5).unwrap(), 5);
    cache.validate();
}

// 22. Listener that invalidates another key during a Size eviction triggered from get_with,
//     while several threads hammer the cache: bound, validate, each (key,value) once.
#[test]
fn reentrant_listener_concurrent_churn() {
    let _w = watchdog(Duration::from_secs(20), "reentrant_churn");
    let slot: Arc<Mutex<Option<Cache<u32, u64>>>> = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&slot);
    let log: Log<u32, u64> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u64> = Cache::builder()
        .max_capacity(16)
        .shards(2)
        .weigher(|k, _v| k % 3)
        .eviction_listener(move |k, v, c| {
            l2.lock().unwrap().push((*k, *v, c));
            let cc = s2.lock().unwrap().clone();
            if let Some(cc) = cc {
                if c == RemovalCause::Size {
                    cc.invalidate(&(k ^ 1));
                    let _ = cc.get_with(k ^ 2, || (u64::from(k ^ 2) + 1) << 32);
                }
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    let seq = Arc::new(AtomicU32::new(1));
    std::thread::scope(|s| {
        for t in 0..3u32 {
            let cache = &cache;
            let seq = &seq;
            s.spawn(move || {
                let mut r = common::rng(u64::from(t) + 11);
                for _ in 0..1500 {
                    let k = (r() % 40) as u32;
                    match r() % 4 {
                        0 => cache.insert(k, u64::from(seq.fetch_add(1, Ordering::SeqCst))),
                        1 => {
                            let _ =
                                cache.get_with(k, || u64::from(seq.fetch_add(1, Ordering::SeqCst)));
                        }
                        2 => cache.invalidate(&k),
                        _ => {
                            let _ = cache.get(&k);
                        }
                    }
                }
            });
        }
    });
    *slot.lock().unwrap() = None;
    cache.validate();
    assert!(
        cache.weighted_size() <= 16,
        "weighted {}",
        cache.weighted_size()
    );
    let log = log.lock().unwrap().clone();
    let mut seen: HashMap<(u32, u64), usize> = HashMap::new();
    for (k, v, _) in &log {
        *seen.entry((*k, *v)).or_default() += 1;
    }
    let present: Vec<(u32, u64)> = cache.iter().collect();
    for ((k, v), n) in &seen {
        if *v >> 32 == 0 {
            assert_eq!(*n, 1, "({k},{v}) reported {n} times");
            assert!(
                !present.contains(&(*k, *v)),
                "({k},{v}) reported and present"
            );
        }
    }
}

// 23. get_all with duplicate keys: one call of load_missing, no self-join hang.
#[test]
fn get_all_duplicate_keys_no_hang() {
    let _w = watchdog(Duration::from_secs(10), "get_all_dups");
    let r = within(Duration::from_secs(5), || {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .negative_ttl(secs(5))
            .build();
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = Arc::clone(&calls);
        let all = cache.get_all([1, 1, 2, 1, 2], move |m| {
            c2.fetch_add(1, Ordering::SeqCst);
            m.iter().map(|&k| (k, k + 100)).collect()
        });
        cache.validate();
        (all, calls.load(Ordering::SeqCst), cache.loads_in_flight())
    });
    let (all, calls, inflight) = r
        .expect("get_all with duplicate keys hung")
        .expect("panicked");
    assert_eq!(all.len(), 2);
    assert_eq!(all[&1], 101);
    assert_eq!(calls, 1);
    assert_eq!(inflight, 0);
}

// 24. Expiry ZERO on update: old value reported once, new value reported once, nothing kept.
struct UpdateZero;
impl Expiry<u32, u32> for UpdateZero {
    fn expire_after_create(&self, _k: &u32, _v: &u32) -> Option<Duration> {
        Some(secs(100))
    }
    fn expire_after_update(&self, _k: &u32, _v: &u32, _r: Option<Duration>) -> Option<Duration> {
        Some(Duration::ZERO)
    }
    fn expire_after_read(&self, _k: &u32, v: &u32, r: Option<Duration>) -> Option<Duration> {
        if *v == 7 {
            Some(Duration::ZERO)
        } else {
            r
        }
    }
}
#[test]
fn expiry_zero_on_update_and_read() {
    let clock = ManualClock::new();
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k, v: &u32| *v)
        .expire_after(UpdateZero)
        .clock(clock.clone())
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    cache.insert(1, 3);
    cache.insert(1, 4);
    assert_eq!(cache.get(&1), None, "update with ZERO expiry readable");
    cache.insert(2, 7);
    assert_eq!(cache.get(&2), Some(7), "the read itself returns");
    assert_eq!(
        cache.get(&2),
        None,
        "read hook ZERO: expired after the read"
    );
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
    let log = log.lock().unwrap().clone();
    let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
    for (k, v, _) in &log {
        *seen.entry((*k, *v)).or_default() += 1;
    }
    for v in [(1, 3), (1, 4), (2, 7)] {
        assert_eq!(
            seen.get(&v),
            Some(&1),
            "{v:?} not reported exactly once: {log:?}"
        );
    }
}

// 25. Too-heavy replacement: "An entry heavier than max_capacity is not stored, and any
//     previous value for key is removed" (cache/mod.rs insert); each reported once.
#[test]
fn too_heavy_replacement_removes_old_reports_both() {
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .shards(1)
        .weigher(|_k, v: &u32| *v)
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    cache.insert(1, 5);
    cache.insert(1, 11);
    assert_eq!(cache.get(&1), None);
    assert_eq!(cache.get_with(2, || 12), 12);
    assert_eq!(cache.get(&2), None);
    cache.insert(3, 2);
    let e = cache.entry(3).and_upsert_with(|_| u32::MAX);
    assert_eq!(*e.value(), u32::MAX);
    assert_eq!(cache.get(&3), None, "too-heavy upsert stored");
    assert_eq!(cache.weighted_size(), 0);
    cache.validate();
    let log = log.lock().unwrap().clone();
    let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
    for (k, v, _) in &log {
        *seen.entry((*k, *v)).or_default() += 1;
    }
    for v in [(1, 5), (1, 11), (2, 12), (3, 2), (3, u32::MAX)] {
        assert_eq!(
            seen.get(&v),
            Some(&1),
            "{v:?} not reported exactly once: {log:?}"
        );
    }
}

// 26. Listener loads the same key again while run_pending_tasks reclaims it: the new value
//     must stay, counted once.
#[test]
fn listener_reloads_expired_key_during_reclaim() {
    let _w = watchdog(Duration::from_secs(10), "listener_reload_reclaim");
    let r = within(Duration::from_secs(5), || {
        let clock = ManualClock::new();
        let slot: Arc<Mutex<Option<Cache<u32, u32>>>> = Arc::new(Mutex::new(None));
        let s2 = Arc::clone(&slot);
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(1000)
            .time_to_live(secs(10))
            .clock(clock.clone())
            .eviction_listener(move |k, v, c| {
                if c == RemovalCause::Expired && *v < 1000 {
                    let cc = s2.lock().unwrap().clone();
                    if let Some(cc) = cc {
                        assert_eq!(cc.get_with(*k, || v + 1000), v + 1000);
                    }
                }
            })
            .build();
        *slot.lock().unwrap() = Some(cache.clone());
        for i in 0..50 {
            cache.insert(i, i);
        }
        clock.advance(secs(11));
        cache.run_pending_tasks();
        let vals: Vec<_> = (0..50).map(|i| cache.get(&i)).collect();
        let n = cache.entry_count();
        cache.validate();
        *slot.lock().unwrap() = None;
        (vals, n)
    });
    let (vals, n) = r.expect("hang").expect("panicked");
    for (i, v) in vals.iter().enumerate() {
        assert_eq!(*v, Some(i as u32 + 1000), "key {i}");
    }
    assert_eq!(n, 50);
}

// 27. Rewound clock: "A cache never sees time go backward" (clock.rs rewind).
#[test]
fn rewind_never_resurrects_or_shortens() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(secs(10))
        .clock(clock.clone())
        .build();
    clock.advance(secs(100));
    cache.insert(1, 1); // deadline 110
    clock.advance(secs(11)); // 111
    assert_eq!(cache.get(&1), None);
    clock.rewind(secs(50)); // reading 61, cache stays at 111
    assert_eq!(cache.get(&1), None, "resurrected by a rewind");
    cache.insert(2, 2); // at cache time 111: deadline 121
    clock.advance(secs(55)); // reading 116 -> cache 116
    assert_eq!(cache.get(&2), Some(2));
    clock.advance(secs(5)); // 121
    assert_eq!(cache.get(&2), None);
    cache.validate();
}

// 28. get_all where load_missing returns a too-heavy value and a value for an unasked key.
#[test]
fn get_all_heavy_and_unasked() {
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .shards(1)
        .weigher(|_k, v: &u32| *v)
        .build();
    let all = cache.get_all([1, 2], |_m| HashMap::from([(1, 50), (2, 3), (9, 4)]));
    assert_eq!(all.get(&1), Some(&50));
    assert_eq!(all.get(&2), Some(&3));
    assert_eq!(cache.get(&1), None);
    assert!(cache.weighted_size() <= 10);
    cache.validate();
}

// 29. Expiry::expire_after_read panicking inside get / get_with hit / iter: lock released.
struct ReadBomb;
impl Expiry<u32, u32> for ReadBomb {
    fn expire_after_read(&self, _k: &u32, v: &u32, r: Option<Duration>) -> Option<Duration> {
        if *v == 13 {
            panic!("injected read-hook panic");
        }
        r
    }
}
#[test]
fn expiry_read_hook_panic_releases_lock() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(10), "read_hook_panic");
    let r = within(Duration::from_secs(5), || {
        let cache: Cache<u32, u32> = Cache::builder()
            .max_capacity(100)
            .shards(1)
            .expire_after(ReadBomb)
            .time_to_idle(secs(100))
            .build();
        cache.insert(1, 13);
        cache.insert(2, 2);
        let a = catch_unwind(AssertUnwindSafe(|| cache.get(&1))).is_err();
        let b = catch_unwind(AssertUnwindSafe(|| cache.get_with(1, || 0))).is_err();
        let c = catch_unwind(AssertUnwindSafe(|| {
            cache.get_all([1, 2], |_| HashMap::new())
        }))
        .is_err();
        cache.insert(3, 3);
        assert_eq!(cache.get(&2), Some(2));
        assert!(!cache.is_a_shard_locked());
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
        (a, b, c)
    });
    let (a, b, c) = r.expect("hang after read-hook panic").expect("panicked");
    assert!(
        a && b && c,
        "read hook panic swallowed: get {a} get_with {b} get_all {c}"
    );
}

// 30. refresh_after whose reload is too heavy to store: weight bound and ledger hold; the
//     old value leaves, reported once.
#[test]
fn refresh_to_too_heavy_value() {
    let _w = watchdog(Duration::from_secs(10), "refresh_heavy");
    let clock = ManualClock::new();
    let gen = Arc::new(AtomicU32::new(0));
    let g2 = Arc::clone(&gen);
    let log: Log<u32, u32> = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&log);
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .shards(1)
        .weigher(|_k, v: &u32| *v)
        .time_to_live(secs(60))
        .refresh_after(secs(5))
        .clock(clock.clone())
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .loader(move |_k: &u32| {
            let g = g2.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(if g == 0 { 4 } else { 50 })
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 4);
    clock.advance(secs(6));
    let _ = cache.load(1); // triggers refresh to 50 (too heavy)
    let _ = cache.load(1);
    cache.run_pending_tasks();
    assert!(
        cache.weighted_size() <= 10,
        "weighted {}",
        cache.weighted_size()
    );
    cache.validate();
    let log = log.lock().unwrap().clone();
    let fours = log.iter().filter(|e| e.1 == 4).count();
    assert!(fours <= 1, "old value reported {fours} times: {log:?}");
    if cache.get(&1).is_none() {
        assert_eq!(fours, 1, "old value gone without a report: {log:?}");
    }
}
