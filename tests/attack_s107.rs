#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]
//! Round 107 (a helper, public API only, plus the `testing` hooks `validate` /
//! `loads_in_flight`): conservation of values under concurrency, and "a decision acted on
//! later".
//!
//! 1. Conservation: 3 threads mix every write/remove/load verb over a few keys of a small
//!    weighted cache with a `ManualClock` moved by one thread (TTL / TTI / refresh-ahead). Every
//!    value is a unique id. At quiescence (and again after a final drain): a value an `insert` stored,
//!    or that any read ever returned from the cache, is either present or was reported to the
//!    eviction listener — exactly once, with its own key and a plausible cause; nothing
//!    reported was never made; `entry_count()` / `weighted_size()` equal what `iter()` yields.
//! 2. Decisions acted on later: a computation or refresh racing `invalidate_all` / writes.
//!
//!    Swept: 20 loading / computing verbs × {absent, expired} × 8 writers run from another thread
//!    inside the loader, and refresh-ahead (inline, `load`, spawner) × the same writers.
//!
//! 8 tests, none failing when written (kept as regression tests). A computation's `Put` that
//! is neither stored nor reported is not counted as lost: its docs say a write of the key while
//! `f` runs wins and the `Put` is returned but not stored. Every test runs under a watchdog
//! (20 s).

use herdcache::{BoxError, Cache, CompResult, ManualClock, Op, RemovalCause};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

fn watchdog<F: FnOnce() + Send + 'static>(name: &str, f: F) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            f();
            let _ = tx.send(());
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p)
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: hung (watchdog, 20 s)"),
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KEYS: u64 = 6;
const CAP: u64 = 12;

/// Values are ids; `id % KEYS` is not the key: the key of each id is logged when it is made.
fn weight(v: u64) -> u32 {
    if v % 29 == 0 {
        (CAP + 5) as u32 // too heavy to store
    } else {
        (v % 4) as u32
    }
}

#[derive(Default)]
struct Ledger {
    key_of: HashMap<u64, u64>,
    must: HashSet<u64>,     // stored by a write that cannot be superseded
    observed: HashSet<u64>, // returned from the cache by a read
    how: HashMap<u64, &'static str>,
    made_at: HashMap<u64, Duration>,
}

#[derive(Clone, Copy)]
struct Config {
    ttl: Option<u64>,
    tti: Option<u64>,
    refresh: Option<u64>,
    shards: usize,
    lru: bool,
    fail_safe: bool,
    negative: bool,
    limit: bool,
}

/// Pending once (waking itself), then ready.
struct YieldOnce(bool);
impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

fn conservation_round(seed: u64, cfg: Config) {
    let clock = ManualClock::new();
    let ids = Arc::new(AtomicU64::new(1));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let reports: Arc<Mutex<Vec<(u64, u64, RemovalCause, Duration)>>> = Arc::default();
    let mut b = Cache::<u64, u64>::builder()
        .max_capacity(CAP)
        .shards(cfg.shards)
        .weigher(|_k: &u64, v: &u64| weight(*v))
        .clock(clock.clone());
    if cfg.lru {
        b = b.eviction_policy(herdcache::EvictionPolicy::lru());
    }
    if let Some(t) = cfg.ttl {
        b = b.time_to_live(Duration::from_secs(t));
    }
    if let Some(t) = cfg.tti {
        b = b.time_to_idle(Duration::from_secs(t));
    }
    {
        let r = Arc::clone(&reports);
        let c = clock.clone();
        b = b.eviction_listener(move |k: &u64, v: &u64, cause| {
            r.lock().unwrap().push((*k, *v, cause, c.elapsed()));
        });
    }
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if cfg.refresh.is_some() || cfg.fail_safe {
        let ids = Arc::clone(&ids);
        let led = Arc::clone(&ledger);
        let failing = Arc::clone(&failing);
        b = b.loader(move |k: &u64| {
            if failing.load(Ordering::SeqCst) {
                return Err(BoxError::from("down"));
            }
            let id = ids.fetch_add(1, Ordering::SeqCst);
            led.lock().unwrap().key_of.insert(id, *k);
            Ok::<_, BoxError>(id)
        });
    }
    if let Some(t) = cfg.refresh {
        b = b.refresh_after(Duration::from_secs(t));
    }
    if cfg.fail_safe {
        b = b
            .fail_safe(Duration::from_secs(6))
            .refresh_backoff(Duration::from_secs(1));
    }
    if cfg.negative {
        b = b.negative_ttl(Duration::from_secs(2));
    }
    if cfg.limit {
        b = b.max_concurrent_loads(1);
    }
    let cache = b.build();
    let threads = 3;
    let barrier = Arc::new(Barrier::new(threads));
    let mut hs = Vec::new();
    for t in 0..threads {
        let cache = cache.clone();
        let clock = clock.clone();
        let ids = Arc::clone(&ids);
        let ledger = Arc::clone(&ledger);
        let barrier = Arc::clone(&barrier);
        let failing = Arc::clone(&failing);
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(seed * 1000 + t as u64);
            let new2 = |k: u64, must: bool, how: &'static str| {
                let id = ids.fetch_add(1, Ordering::SeqCst);
                let mut l = ledger.lock().unwrap();
                l.key_of.insert(id, k);
                if must {
                    l.must.insert(id);
                }
                l.how.insert(id, how);
                l.made_at.insert(id, clock.elapsed());
                id
            };
            let observe = |k: u64, v: u64| {
                let mut l = ledger.lock().unwrap();
                assert_eq!(l.key_of.get(&v), Some(&k), "value {v} read under key {k}");
                l.observed.insert(v);
            };
            let new = |k: u64, must: bool| new2(k, must, "load");
            barrier.wait();
            for _ in 0..1500 {
                let k = rng.below(KEYS);
                match rng.below(27) {
                    0..=2 => cache.insert(k, new2(k, true, "insert")),
                    3..=4 => {
                        if let Some(v) = cache.get(&k) {
                            observe(k, v)
                        }
                    }
                    5 => {
                        let _ = cache.get_with(k, || new(k, false));
                    }
                    6 => {
                        let fail = rng.below(3) == 0;
                        let _ =
                            cache.try_get_with(
                                k,
                                || {
                                    if fail {
                                        Err("no")
                                    } else {
                                        Ok(new(k, false))
                                    }
                                },
                            );
                    }
                    7 => {
                        let _ = cache.entry(k).or_insert_with(|| new(k, false));
                    }
                    8 => {
                        let what = rng.below(3);
                        let r = cache.entry(k).and_compute_with(|e| {
                            if let Some(e) = &e {
                                observe(k, *e.value());
                            }
                            match what {
                                0 => Op::Put(new2(k, false, "compute")),
                                1 => Op::Remove,
                                _ => Op::Nop,
                            }
                        });
                        if let CompResult::Removed(e) = r {
                            observe(k, *e.value());
                        }
                    }
                    9 => {
                        let _ = cache.entry(k).and_upsert_with(|e| {
                            if let Some(e) = &e {
                                observe(k, *e.value());
                            }
                            new2(k, false, "upsert")
                        });
                    }
                    10 => cache.invalidate(&k),
                    11 => {
                        if let Some(v) = cache.remove(&k) {
                            observe(k, v)
                        }
                    }
                    12 => {
                        let m = rng.below(5);
                        cache
                            .invalidate_entries_if(move |_k, v| v % 5 == m)
                            .unwrap();
                    }
                    13 => {
                        cache.retain(move |kk, _v| *kk != k);
                    }
                    14 => {
                        if rng.below(8) == 0 {
                            cache.invalidate_all()
                        }
                    }
                    15 => {
                        for (kk, v) in cache.iter() {
                            observe(kk, v)
                        }
                    }
                    16 => cache.run_pending_tasks(),
                    17 => {
                        if cfg.refresh.is_some() || cfg.fail_safe {
                            if let Ok(v) = cache.load(k) {
                                // A refresh-ahead read returns what was in the cache.
                                let _ = v;
                            }
                        }
                    }
                    20 => {
                        if let Some(v) = cache.get_or_stale(&k) {
                            observe(k, v)
                        }
                    }
                    21 => {
                        let r = rng.below(4);
                        let _ = cache.get_with_if(k, || new(k, false), move |v| v % 4 == r);
                    }
                    22 => {
                        let k2 = rng.below(KEYS);
                        let _ = cache.get_all([k, k2], |missing| {
                            missing.iter().map(|&m| (m, new(m, false))).collect()
                        });
                    }
                    23 => {
                        let drop_early = rng.below(2) == 0;
                        let fut = cache.get_with_async(k, async {
                            YieldOnce(false).await;
                            new(k, false)
                        });
                        if drop_early {
                            use futures::FutureExt;
                            let _ = fut.now_or_never();
                        } else {
                            let _ = futures::executor::block_on(fut);
                        }
                    }
                    24 => {
                        let drop_early = rng.below(2) == 0;
                        let put = rng.below(2) == 0;
                        let fut = cache.entry(k).and_compute_with_async(|e| {
                            if let Some(e) = &e {
                                observe(k, *e.value());
                            }
                            async move {
                                YieldOnce(false).await;
                                if put {
                                    Op::Put(new(k, false))
                                } else {
                                    Op::Remove
                                }
                            }
                        });
                        if drop_early {
                            use futures::FutureExt;
                            let _ = fut.now_or_never();
                        } else if let CompResult::Removed(e) = futures::executor::block_on(fut) {
                            observe(k, *e.value());
                        }
                    }
                    25 => {
                        if t == 1 {
                            failing.store(rng.below(2) == 0, Ordering::SeqCst);
                        }
                    }
                    _ => {
                        if t == 0 {
                            clock.advance(Duration::from_millis(rng.below(3000)));
                        } else {
                            let _ = cache.contains_key(&k);
                        }
                    }
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "seed {seed}: a load left in flight"
    );
    cache.run_pending_tasks();
    cache.validate();
    let live: Vec<(u64, u64)> = cache.iter().collect();
    let reports_now = reports.lock().unwrap().clone();
    let ledger_arc = Arc::clone(&ledger);
    let ledger = ledger.lock().unwrap();
    let mut seen: HashMap<u64, (u64, RemovalCause)> = HashMap::new();
    for &(k, v, cause, at) in &reports_now {
        assert_eq!(
            ledger.key_of.get(&v),
            Some(&k),
            "seed {seed}: value {v} reported under key {k} ({cause:?}) was never made for it"
        );
        if let Some(prev) = seen.insert(v, (k, cause)) {
            panic!("seed {seed}: value {v} of key {k} reported twice: {prev:?} then {cause:?}");
        }
        if cause == RemovalCause::Expired {
            assert!(
                cfg.ttl.is_some() || cfg.tti.is_some(),
                "seed {seed}: value {v} reported Expired without any expiry"
            );
            let min = cfg.ttl.into_iter().chain(cfg.tti).min().unwrap();
            if let Some(&made) = ledger.made_at.get(&v) {
                assert!(
                    at >= made + Duration::from_secs(min),
                    "seed {seed}: value {v} of key {k} made at {made:?} reported Expired at {at:?}"
                );
            }
        }
        if weight(v) as u64 > CAP {
            assert_eq!(
                cause,
                RemovalCause::Size,
                "seed {seed}: too heavy value {v} reported as {cause:?}"
            );
        }
    }
    let mut live_keys = HashSet::new();
    for &(k, v) in &live {
        assert!(live_keys.insert(k), "seed {seed}: key {k} iterated twice");
        assert_eq!(
            ledger.key_of.get(&v),
            Some(&k),
            "seed {seed}: live value {v} under key {k} was never made for it"
        );
        assert!(
            !seen.contains_key(&v),
            "seed {seed}: live value {v} of key {k} was also reported as removed ({:?})",
            seen[&v]
        );
    }
    let live_vals: HashSet<u64> = live.iter().map(|p| p.1).collect();
    let mut lost: Vec<(u64, &str)> = Vec::new();
    for &v in &ledger.must {
        if !live_vals.contains(&v) && !seen.contains_key(&v) {
            lost.push((v, "stored by a write"));
            if !cfg.fail_safe {
                eprintln!(
                    "lost {v}: key {} weight {} how {:?}",
                    ledger.key_of[&v],
                    weight(v),
                    ledger.how.get(&v)
                );
            }
        }
    }
    for &v in &ledger.observed {
        if !live_vals.contains(&v) && !seen.contains_key(&v) {
            lost.push((v, "read from the cache"));
        }
    }
    lost.sort();
    // With fail-safe, expired entries are kept (neither iterated nor reported) until max_stale:
    // the drain below checks them.
    assert!(
        lost.is_empty() || cfg.fail_safe,
        "seed {seed}: {} values neither present nor reported to the listener, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let w: u64 = live.iter().map(|p| weight(p.1) as u64).sum();
    if cfg.fail_safe {
        assert!(
            cache.entry_count() >= live.len() as u64,
            "seed {seed}: entry_count() < entries iterated"
        );
        assert!(
            cache.weighted_size() >= w,
            "seed {seed}: weighted_size() < weights iterated"
        );
    } else {
        assert_eq!(
            cache.entry_count(),
            live.len() as u64,
            "seed {seed}: entry_count() != entries iterated"
        );
        assert_eq!(
            cache.weighted_size(),
            w,
            "seed {seed}: weighted_size() != weights iterated"
        );
    }
    assert!(
        cache.weighted_size() <= CAP,
        "seed {seed}: weighted_size above the capacity"
    );
    drop(ledger);
    // Drain: everything left leaves now, and must be heard of exactly once overall.
    clock.advance(Duration::from_secs(1000));
    cache.run_pending_tasks();
    cache.invalidate_all();
    cache.validate();
    assert_eq!(
        cache.entry_count(),
        0,
        "seed {seed}: entries left after invalidate_all"
    );
    assert_eq!(
        cache.weighted_size(),
        0,
        "seed {seed}: weight left after invalidate_all"
    );
    let reports2 = reports.lock().unwrap().clone();
    let mut once: HashMap<u64, usize> = HashMap::new();
    for r in &reports2 {
        *once.entry(r.1).or_default() += 1;
    }
    let ledger = ledger_arc.lock().unwrap();
    for &(_k, v) in &live {
        assert_eq!(
            once.get(&v),
            Some(&1),
            "seed {seed}: live value {v} heard {:?} times after the drain",
            once.get(&v)
        );
    }
    for &v in ledger.must.iter().chain(ledger.observed.iter()) {
        assert_eq!(
            once.get(&v),
            Some(&1),
            "seed {seed}: value {v} heard {:?} times after the drain",
            once.get(&v)
        );
    }
    for (v, n) in once {
        assert_eq!(n, 1, "seed {seed}: value {v} heard {n} times");
    }
}

fn sweep(name: &'static str, cfg: Config, seeds: std::ops::Range<u64>) {
    watchdog(name, move || {
        for seed in seeds {
            conservation_round(seed, cfg);
        }
    });
}

#[test]
fn conservation_ttl_weighted() {
    let cfg = Config {
        ttl: Some(5),
        tti: None,
        refresh: None,
        shards: 2,
        lru: false,
        fail_safe: false,
        negative: false,
        limit: false,
    };
    sweep("conservation_ttl_weighted", cfg, 0..80);
}

#[test]
fn conservation_tti_lru_one_shard() {
    let cfg = Config {
        ttl: None,
        tti: Some(3),
        refresh: None,
        shards: 1,
        lru: true,
        fail_safe: false,
        negative: false,
        limit: false,
    };
    sweep("conservation_tti_lru_one_shard", cfg, 100..180);
}

#[test]
fn conservation_refresh_ahead() {
    let cfg = Config {
        ttl: Some(8),
        tti: Some(4),
        refresh: Some(2),
        shards: 4,
        lru: false,
        fail_safe: false,
        negative: false,
        limit: true,
    };
    sweep("conservation_refresh_ahead", cfg, 200..280);
}

#[test]
fn conservation_no_expiry() {
    let cfg = Config {
        ttl: None,
        tti: None,
        refresh: None,
        shards: 2,
        lru: false,
        fail_safe: false,
        negative: true,
        limit: false,
    };
    sweep("conservation_no_expiry", cfg, 300..380);
}

#[test]
fn conservation_fail_safe() {
    let cfg = Config {
        ttl: Some(4),
        tti: None,
        refresh: None,
        shards: 2,
        lru: false,
        fail_safe: true,
        negative: false,
        limit: false,
    };
    sweep("conservation_fail_safe", cfg, 400..480);
}

#[test]
fn conservation_fail_safe_refresh_negative() {
    let cfg = Config {
        ttl: Some(6),
        tti: Some(3),
        refresh: Some(1),
        shards: 1,
        lru: true,
        fail_safe: true,
        negative: true,
        limit: true,
    };
    sweep("conservation_fail_safe_refresh_negative", cfg, 500..580);
}

// ---------------------------------------------------------------------------------------------
// 2. A write made while a load of the key runs (from another thread, joined inside the loader):
// "A write or invalidation of the key while it loads wins: the loaded value goes to the callers
// already waiting, but is not stored." `retain` / `invalidate_entries_if` do not touch "a load
// of a key that has no entry". Swept over every loading verb, two starting states and eight
// writers (two of them controls that must not stop the store).

type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

fn run_hook(h: &Hook) {
    let f = h.lock().unwrap().take();
    if let Some(f) = f {
        std::thread::spawn(f).join().unwrap();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Writer {
    Insert,
    Invalidate,
    Remove,
    InvalidateAll,
    Retain,
    EntriesIf,
    OtherKey,
    RetainKeepAll,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Start {
    Absent,
    Expired,
}

const VERBS: usize = 20;
const K: u64 = 7;
const LOADED: u64 = 1000;

fn write_during_load(verb: usize, start: Start, writer: Writer) -> Result<(), String> {
    let clock = ManualClock::new();
    let hook: Hook = Arc::default();
    let heard: Arc<Mutex<Vec<(u64, u64, RemovalCause)>>> = Arc::default();
    let (h1, h2) = (Arc::clone(&hook), Arc::clone(&hook));
    let hr = Arc::clone(&heard);
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .eviction_listener(move |k: &u64, v: &u64, c| hr.lock().unwrap().push((*k, *v, c)))
        .loader(move |_k: &u64| {
            run_hook(&h1);
            Ok::<_, BoxError>(LOADED)
        })
        .async_loader(move |_k: &u64| {
            let h2 = Arc::clone(&h2);
            async move {
                run_hook(&h2);
                Ok::<_, BoxError>(LOADED)
            }
        })
        .build();
    if start == Start::Expired {
        cache.insert(K, 1);
        clock.advance(Duration::from_secs(11));
    }
    cache.insert(K + 1, 2); // another key, for the control writer
    {
        let c = cache.clone();
        *hook.lock().unwrap() = Some(Box::new(move || match writer {
            Writer::Insert => c.insert(K, 99),
            Writer::Invalidate => c.invalidate(&K),
            Writer::Remove => {
                c.remove(&K);
            }
            Writer::InvalidateAll => c.invalidate_all(),
            Writer::Retain => c.retain(|k, _| *k != K),
            Writer::EntriesIf => c.invalidate_entries_if(|k, _| *k == K).unwrap(),
            Writer::OtherKey => c.insert(K + 1, 3),
            Writer::RetainKeepAll => c.retain(|_, _| true),
        }));
    }
    let init = || {
        run_hook(&hook);
        LOADED
    };
    let hk = Arc::clone(&hook);
    let ainit = async move {
        run_hook(&hk);
        LOADED
    };
    use futures::executor::block_on;
    let got: Option<u64> = match verb {
        0 => Some(cache.get_with(K, init)),
        1 => cache.try_get_with(K, || Ok::<_, ()>(init())).ok(),
        2 => cache.optionally_get_with(K, || Some(init())),
        3 => Some(cache.get_with_by_ref(&K, init)),
        4 => Some(cache.entry(K).or_insert_with(init).into_value()),
        5 => Some(
            cache
                .entry(K)
                .or_insert_with_if(init, |_| true)
                .into_value(),
        ),
        6 => cache
            .entry(K)
            .or_optionally_insert_with(|| Some(init()))
            .map(|e| e.into_value()),
        7 => cache
            .entry(K)
            .or_try_insert_with(|| Ok::<_, ()>(init()))
            .ok()
            .map(|e| e.into_value()),
        8 => Some(cache.get_with_if(K, init, |_| true)),
        9 => cache
            .get_all([K], |m| m.iter().map(|&k| (k, init())).collect())
            .get(&K)
            .copied(),
        10 => cache.load(K).ok(),
        11 => block_on(cache.load_async(K)).ok(),
        12 => Some(block_on(cache.get_with_async(K, ainit))),
        13 => Some(block_on(cache.get_with_async_shared(K, ainit))),
        14 => Some(block_on(cache.entry(K).or_insert_with_async(ainit)).into_value()),
        15 => Some(block_on(cache.get_with_if_async(K, ainit, |_| true))),
        16 => cache
            .entry(K)
            .and_compute_with(|_| Op::Put(init()))
            .into_entry()
            .map(|e| e.into_value()),
        17 => Some(cache.entry(K).and_upsert_with(|_| init()).into_value()),
        18 => cache
            .entry(K)
            .and_try_compute_with(|_| Ok::<_, ()>(Op::Put(init())))
            .ok()
            .and_then(|r| r.into_entry())
            .map(|e| e.into_value()),
        19 => block_on(
            cache
                .entry(K)
                .and_compute_with_async(|_| async move { Op::Put(ainit.await) }),
        )
        .into_entry()
        .map(|e| e.into_value()),
        _ => unreachable!(),
    };
    if hook.lock().unwrap().is_some() {
        return Err("the loader never ran".into());
    }
    if got != Some(LOADED) {
        return Err(format!("the caller got {got:?}, not the loaded value"));
    }
    let expect = match writer {
        Writer::Insert => Some(99),
        Writer::Invalidate | Writer::Remove | Writer::InvalidateAll => None,
        Writer::Retain | Writer::EntriesIf => Some(LOADED), // no live entry: not touched
        Writer::OtherKey | Writer::RetainKeepAll => Some(LOADED),
    };
    let now = cache.get(&K);
    if now != expect {
        return Err(format!(
            "after the load the key holds {now:?}, expected {expect:?}"
        ));
    }
    if cache.loads_in_flight() != 0 {
        return Err("a load left in flight".into());
    }
    cache.validate();
    // Exactly-once: the loaded value is reported only if it was stored and then left.
    cache.invalidate_all();
    let heard = heard.lock().unwrap();
    let n = heard.iter().filter(|r| r.0 == K && r.1 == LOADED).count();
    let want = usize::from(expect == Some(LOADED));
    if n != want {
        return Err(format!(
            "the loaded value was reported {n} times, expected {want}: {heard:?}"
        ));
    }
    Ok(())
}

#[test]
fn write_during_load_wins_every_verb() {
    watchdog("write_during_load_wins_every_verb", || {
        let mut fails = Vec::new();
        for verb in 0..VERBS {
            for start in [Start::Absent, Start::Expired] {
                for writer in [
                    Writer::Insert,
                    Writer::Invalidate,
                    Writer::Remove,
                    Writer::InvalidateAll,
                    Writer::Retain,
                    Writer::EntriesIf,
                    Writer::OtherKey,
                    Writer::RetainKeepAll,
                ] {
                    if let Err(e) = write_during_load(verb, start, writer) {
                        fails.push(format!("verb {verb} {start:?} {writer:?}: {e}"));
                    }
                }
            }
        }
        assert!(
            fails.is_empty(),
            "{} cases failed:\n{}",
            fails.len(),
            fails.join("\n")
        );
    });
}

/// The same for a refresh-ahead reload (run inline by the reading `get`, by `load`, or by a
/// spawner thread): a write of the key while the refresh loads wins; `retain` removing the
/// (live) entry supersedes it as `invalidate` does.
fn write_during_refresh(trigger: usize, writer: Writer) -> Result<(), String> {
    let clock = ManualClock::new();
    let hook: Hook = Arc::default();
    let h1 = Arc::clone(&hook);
    let heard: Arc<Mutex<Vec<(u64, u64, RemovalCause)>>> = Arc::default();
    let hr = Arc::clone(&heard);
    let jobs: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let j2 = Arc::clone(&jobs);
    let mut b = Cache::<u64, u64>::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(100))
        .refresh_after(Duration::from_secs(10))
        .clock(clock.clone())
        .eviction_listener(move |k: &u64, v: &u64, c| hr.lock().unwrap().push((*k, *v, c)))
        .loader(move |_k: &u64| {
            run_hook(&h1);
            Ok::<_, BoxError>(LOADED)
        });
    if trigger == 2 {
        b = b.spawner(move |job| {
            j2.lock().unwrap().push(std::thread::spawn(job));
        });
    }
    let cache = b.build();
    cache.insert(K, 1);
    cache.insert(K + 1, 2);
    clock.advance(Duration::from_secs(11));
    {
        let c = cache.clone();
        *hook.lock().unwrap() = Some(Box::new(move || match writer {
            Writer::Insert => c.insert(K, 99),
            Writer::Invalidate => c.invalidate(&K),
            Writer::Remove => {
                c.remove(&K);
            }
            Writer::InvalidateAll => c.invalidate_all(),
            Writer::Retain => c.retain(|k, _| *k != K),
            Writer::EntriesIf => c.invalidate_entries_if(|k, _| *k == K).unwrap(),
            Writer::OtherKey => c.insert(K + 1, 3),
            Writer::RetainKeepAll => c.retain(|_, _| true),
        }));
    }
    let got = match trigger {
        0 | 2 => cache.get(&K),
        _ => cache.load(K).ok(),
    };
    for j in jobs.lock().unwrap().drain(..) {
        j.join().unwrap();
    }
    if got != Some(1) {
        return Err(format!(
            "the refreshing read got {got:?}, not the old value"
        ));
    }
    if hook.lock().unwrap().is_some() {
        return Err("the refresh never ran".into());
    }
    let expect = match writer {
        Writer::Insert => Some(99),
        Writer::Invalidate | Writer::Remove | Writer::InvalidateAll => None,
        Writer::Retain | Writer::EntriesIf => None,
        Writer::OtherKey | Writer::RetainKeepAll => Some(LOADED),
    };
    let now = cache.get(&K);
    if now != expect {
        return Err(format!(
            "after the refresh the key holds {now:?}, expected {expect:?}"
        ));
    }
    cache.validate();
    cache.invalidate_all();
    let heard = heard.lock().unwrap();
    for v in [1, 99, LOADED] {
        let n = heard.iter().filter(|r| r.0 == K && r.1 == v).count();
        let stored = v == 1
            || (v == 99 && writer == Writer::Insert)
            || (v == LOADED && expect == Some(LOADED));
        if n != usize::from(stored) {
            return Err(format!("value {v} reported {n} times: {heard:?}"));
        }
    }
    Ok(())
}

#[test]
fn write_during_refresh_wins() {
    watchdog("write_during_refresh_wins", || {
        let mut fails = Vec::new();
        for trigger in 0..3 {
            for writer in [
                Writer::Insert,
                Writer::Invalidate,
                Writer::Remove,
                Writer::InvalidateAll,
                Writer::Retain,
                Writer::EntriesIf,
                Writer::OtherKey,
                Writer::RetainKeepAll,
            ] {
                if let Err(e) = write_during_refresh(trigger, writer) {
                    fails.push(format!("trigger {trigger} {writer:?}: {e}"));
                }
            }
        }
        assert!(
            fails.is_empty(),
            "{} cases failed:\n{}",
            fails.len(),
            fails.join("\n")
        );
    });
}
