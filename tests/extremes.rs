#![cfg(not(any(loom, shuttle)))]
//! A sweep over extreme and boundary configurations, from the public API only: every
//! configuration is either refused as documented or works (no undocumented panic, no hang, no
//! overflow, the bound holds, `validate()` passes, the statistics stay consistent).
//!
//! Round 62 of the outside attacks (a helper given the public API): each option alone over its
//! boundary values (capacities 0 … `u64::MAX`, shards 0 … 1,025, weights 0 … `u32::MAX`,
//! durations zero … `Duration::MAX`, jitter and β out of range, load limits, spawners that run
//! jobs inline or drop them) against three base configurations, then 400 random combinations
//! (fixed seed), each run through a scripted mix of every operation with the clock advanced by
//! boundary amounts, a concurrent phase, and checks after every call. Nothing failed when it
//! was written (2026-12-05); it stays as a regression sweep. The two sweeps take a part of
//! their configurations under `HERDCACHE_TEST_PART` (as the other exhaustive sweeps).

mod common;

use herdcache::{
    BoxError, BuildError, Cache, CacheBuilder, CompResult, EvictionPolicy, Expiry, ManualClock, Op,
    RemovalCause,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Copy, Debug, PartialEq)]
enum W {
    Zero,
    One,
    Max,
    /// u32::MAX for keys divisible by 5, else key % 3 + 1.
    HugeSome,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ex {
    Zero,
    Max,
    Never,
    /// ZERO on create, MAX on read, None on update (mixed).
    Mixed,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sp {
    Inline,
    Drop,
}

#[derive(Clone, Debug, Default)]
struct Cfg {
    cap: Option<u64>,
    shards: Option<usize>,
    weigher: Option<W>,
    ttl: Option<Duration>,
    tti: Option<Duration>,
    expiry: Option<Ex>,
    refresh_after: Option<Duration>,
    loader: bool,
    spawner: Option<Sp>,
    jitter: Option<f64>,
    early: Option<f64>,
    fail_safe: Option<Duration>,
    refresh_backoff: Option<Duration>,
    negative_ttl: Option<Duration>,
    load_timeout: Option<Duration>,
    mcl: Option<usize>,
    initial: Option<usize>,
    sizing: bool,
    stats: bool,
    lru: bool,
    /// The loader advances the clock by this much (a load that takes time).
    load_takes: Option<Duration>,
    async_loader: bool,
    fspawner: Option<Sp>,
}

struct ExpK(Ex);
impl Expiry<u64, u64> for ExpK {
    fn expire_after_create(&self, _k: &u64, _v: &u64) -> Option<Duration> {
        match self.0 {
            Ex::Zero => Some(Duration::ZERO),
            Ex::Max => Some(Duration::MAX),
            Ex::Never => None,
            Ex::Mixed => Some(Duration::ZERO),
        }
    }
    fn expire_after_read(
        &self,
        _k: &u64,
        _v: &u64,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        match self.0 {
            Ex::Zero => Some(Duration::ZERO),
            Ex::Max => Some(Duration::MAX),
            Ex::Never => None,
            Ex::Mixed => remaining.map(|_| Duration::MAX),
        }
    }
    fn expire_after_update(
        &self,
        _k: &u64,
        _v: &u64,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        match self.0 {
            Ex::Zero => Some(Duration::ZERO),
            Ex::Max => Some(Duration::MAX),
            Ex::Never => None,
            Ex::Mixed => remaining,
        }
    }
}

fn weigh(w: W, k: u64) -> u32 {
    match w {
        W::Zero => 0,
        W::One => 1,
        W::Max => u32::MAX,
        W::HugeSome => {
            if k % 5 == 0 {
                u32::MAX
            } else {
                (k % 3 + 1) as u32
            }
        }
    }
}

/// Removals seen by the listener, by cause: (count, weight).
#[derive(Default, Debug, Clone)]
struct Seen {
    by_cause: HashMap<String, (u64, u64)>,
}

struct Built {
    cache: Cache<u64, u64>,
    clock: ManualClock,
    seen: Arc<Mutex<Seen>>,
    loads: Arc<AtomicU64>,
}

/// The documented errors this configuration may be refused with (empty: must build).
fn expected_errors(c: &Cfg) -> Vec<BuildError> {
    let mut v = vec![];
    if c.cap.is_none() {
        v.push(BuildError::NoCapacity);
    }
    if let Some(n) = c.shards {
        if !(1..=1024).contains(&n) {
            v.push(BuildError::BadShardCount(n));
        }
    }
    if let Some(j) = c.jitter {
        if !(0.0..1.0).contains(&j) {
            v.push(BuildError::BadFraction);
        }
    }
    if let Some(b) = c.early {
        if !(b > 0.0 && b.is_finite()) {
            v.push(BuildError::BadFraction);
        }
    }
    if (c.refresh_after.is_some() || c.early.is_some())
        && !c.loader
        && !(c.async_loader && c.fspawner.is_some())
    {
        v.push(BuildError::RefreshWithoutLoader);
    }
    if c.early.is_some() && c.ttl.is_none() {
        v.push(BuildError::EarlyRefreshWithoutTtl);
    }
    v
}

fn builder(
    c: &Cfg,
) -> (
    CacheBuilder<u64, u64>,
    ManualClock,
    Arc<Mutex<Seen>>,
    Arc<AtomicU64>,
) {
    let clock = ManualClock::new();
    let mut b = Cache::<u64, u64>::builder();
    if let Some(cap) = c.cap {
        b = b.max_capacity(cap);
    }
    if let Some(n) = c.shards {
        b = b.shards(n);
    }
    if let Some(w) = c.weigher {
        b = b.weigher(move |k: &u64, _v: &u64| weigh(w, *k));
    }
    if let Some(d) = c.ttl {
        b = b.time_to_live(d);
    }
    if let Some(d) = c.tti {
        b = b.time_to_idle(d);
    }
    if let Some(e) = c.expiry {
        b = b.expire_after(ExpK(e));
    }
    if let Some(d) = c.refresh_after {
        b = b.refresh_after(d);
    }
    let loads = Arc::new(AtomicU64::new(0));
    if c.loader {
        let l = Arc::clone(&loads);
        let ck = clock.clone();
        let takes = c.load_takes;
        b = b.loader(move |k: &u64| {
            l.fetch_add(1, Ordering::SeqCst);
            if let Some(t) = takes {
                ck.advance(t);
            }
            if k % 4 == 3 {
                Err(BoxError::from("backend says no"))
            } else {
                Ok(k * 1000 + 1)
            }
        });
    }
    if c.async_loader {
        let l = Arc::clone(&loads);
        let ck = clock.clone();
        let takes = c.load_takes;
        b = b.async_loader(move |k: &u64| {
            let k = *k;
            let l = Arc::clone(&l);
            let ck = ck.clone();
            async move {
                l.fetch_add(1, Ordering::SeqCst);
                common::Yield(1).await;
                if let Some(t) = takes {
                    ck.advance(t);
                }
                if k % 4 == 3 {
                    Err(BoxError::from("async backend says no"))
                } else {
                    Ok(k * 1000 + 2)
                }
            }
        });
    }
    match c.fspawner {
        Some(Sp::Inline) => b = b.future_spawner(futures::executor::block_on),
        Some(Sp::Drop) => b = b.future_spawner(drop),
        None => {}
    }
    match c.spawner {
        Some(Sp::Inline) => b = b.spawner(|job| job()),
        Some(Sp::Drop) => b = b.spawner(drop),
        None => {}
    }
    if let Some(j) = c.jitter {
        b = b.jitter(j);
    }
    if let Some(beta) = c.early {
        b = b.early_refresh(beta);
    }
    if let Some(d) = c.fail_safe {
        b = b.fail_safe(d);
    }
    if let Some(d) = c.refresh_backoff {
        b = b.refresh_backoff(d);
    }
    if let Some(d) = c.negative_ttl {
        b = b.negative_ttl(d);
    }
    if let Some(d) = c.load_timeout {
        b = b.load_timeout(d);
    }
    if let Some(n) = c.mcl {
        b = b.max_concurrent_loads(n);
    }
    if let Some(n) = c.initial {
        b = b.initial_capacity(n);
    }
    if c.sizing {
        b = b.track_sizing();
    }
    if c.stats {
        b = b.record_stats();
    }
    if c.lru {
        b = b.eviction_policy(EvictionPolicy::lru());
    } else {
        b = b.eviction_policy(EvictionPolicy::tiny_lfu());
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = Arc::clone(&seen);
    b = b.eviction_listener(move |_k: &u64, _v: &u64, cause: RemovalCause| {
        let _ = _v;
        let w = 0; // weight is not given to the listener; counts only
        let mut s = s.lock().unwrap();
        let e = s.by_cause.entry(format!("{cause:?}")).or_default();
        e.0 += 1;
        e.1 += w;
    });
    b = b.clock(clock.clone());
    (b, clock, seen, loads)
}

// ---------------------------------------------------------------------------------------------
// The script

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn key_ok(k: u64, v: u64) -> bool {
    v / 1000 == k
}

/// Problems found (not panics): a description each.
type Problems = Vec<String>;

fn stats_identity_delta(
    before: &herdcache::CacheStats,
    after: &herdcache::CacheStats,
    plain_misses: u64,
) -> i128 {
    let d = |a: u64, b: u64| a as i128 - b as i128;
    let misses = d(after.misses, before.misses);
    let explained = d(after.load_successes, before.load_successes)
        + d(after.load_failures, before.load_failures)
        + d(after.loads_abandoned, before.loads_abandoned)
        + d(after.coalesced, before.coalesced)
        + d(after.negative_hits, before.negative_hits)
        - d(after.refreshes_started, before.refreshes_started);
    misses - explained - plain_misses as i128
}

fn check_after(
    b: &Built,
    c: &Cfg,
    what: &str,
    before: &herdcache::CacheStats,
    plain_misses: u64,
    problems: &mut Problems,
) -> herdcache::CacheStats {
    let cache = &b.cache;
    let cap = c.cap.unwrap();
    let ws = cache.weighted_size();
    if ws > cap {
        problems.push(format!(
            "after {what}: weighted_size {ws} > max_capacity {cap}"
        ));
    }
    let n = cache.entry_count();
    if c.weigher.is_none() && ws != n {
        problems.push(format!(
            "after {what}: no weigher but weighted_size {ws} != entry_count {n}"
        ));
    }
    if c.weigher.is_none() && n > cap {
        problems.push(format!(
            "after {what}: entry_count {n} > max_capacity {cap}"
        ));
    }
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.validate())) {
        problems.push(format!(
            "after {what}: validate() failed: {}",
            common::panic_message(&*p)
        ));
    }
    let after = cache.stats();
    if c.stats {
        let d = stats_identity_delta(before, &after, plain_misses);
        if d != 0 {
            problems.push(format!(
                "after {what}: misses identity off by {d} (before {before:?}, after {after:?})"
            ));
        }
        let hr = after.hit_ratio();
        if !(0.0..=1.0).contains(&hr) {
            problems.push(format!("after {what}: hit_ratio {hr}"));
        }
        if after.hits < before.hits || after.misses < before.misses {
            problems.push(format!("after {what}: a counter went backwards"));
        }
    }
    after
}

fn advance_amounts(c: &Cfg) -> Vec<Duration> {
    let mut v = vec![
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_secs(1),
    ];
    v.extend(
        [c.ttl, c.tti, c.refresh_after, c.fail_safe, c.negative_ttl]
            .into_iter()
            .flatten(),
    );
    v
}

fn run_script(b: &Built, c: &Cfg, seed: u64) -> Problems {
    let mut problems = vec![];
    let cache = &b.cache;
    let clock = &b.clock;
    let mut rng = Rng(seed | 1);
    let amounts = advance_amounts(c);
    let mut stats = cache.stats();
    // Phases: ops at t=0, then boundary advances, then Duration::MAX twice (saturated clock).
    let phases: Vec<Option<Duration>> = {
        let mut p = vec![None, Some(Duration::ZERO), Some(Duration::from_nanos(1))];
        for a in &amounts {
            p.push(Some(*a));
        }
        p.push(Some(Duration::MAX));
        p.push(Some(Duration::MAX));
        p
    };
    for (pi, adv) in phases.iter().enumerate() {
        if let Some(d) = adv {
            clock.advance(*d);
        }
        if pi == 1 || pi + 1 == phases.len() {
            // A fill: enough keys to evict at the capacities around 1024 (values keyed as
            // the script's, keys beyond its range).
            for i in 0..2100u64 {
                let kk = 100 + (i * 7919) % 2100;
                if i % 3 == 0 {
                    let _ = cache.get(&kk);
                }
                cache.insert(kk, kk * 1000);
            }
            let before = stats;
            // Only inserts and gets: reset the identity baseline.
            stats = cache.stats();
            let _ = before;
            let cap = c.cap.unwrap();
            if cache.weighted_size() > cap {
                problems.push(format!(
                    "fill phase {pi}: weighted_size {} > {cap}",
                    cache.weighted_size()
                ));
            }
            if let Err(p) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.validate()))
            {
                problems.push(format!(
                    "fill phase {pi}: validate() failed: {}",
                    common::panic_message(&*p)
                ));
            }
        }
        for step in 0..14 {
            let k = rng.below(12);
            let op = rng.below(22);
            let mut plain_misses = 0;
            let what = format!("phase {pi} (advanced {adv:?}) step {step} op {op} key {k}");
            match op {
                0..=3 => cache.insert(k, k * 1000 + op),
                4..=6 => match cache.get(&k) {
                    None => plain_misses = 1,
                    Some(v) => {
                        if !key_ok(k, v) {
                            problems.push(format!("{what}: get({k}) = {v}"));
                        }
                    }
                },
                7 => {
                    let v = cache.get_with(k, || k * 1000 + 7);
                    if !key_ok(k, v) {
                        problems.push(format!("{what}: get_with({k}) = {v}"));
                    }
                }
                8 => {
                    let r = cache.try_get_with(k, || {
                        if k % 2 == 0 {
                            Ok(k * 1000 + 8)
                        } else {
                            Err("no")
                        }
                    });
                    if let Ok(v) = r {
                        if !key_ok(k, v) {
                            problems.push(format!("{what}: try_get_with({k}) = {v}"));
                        }
                    }
                }
                9 | 10 => {
                    let r = cache.load(k);
                    match r {
                        Ok(v) => {
                            if !key_ok(k, v) {
                                problems.push(format!("{what}: load({k}) = {v}"));
                            }
                        }
                        Err(e) if c.loader && k % 4 != 3 => {
                            problems.push(format!("{what}: load({k}) of a good key: {e:?}"))
                        }
                        Err(herdcache::LoadError::NoLoader) if !c.loader => {}
                        Err(herdcache::LoadError::NoLoader) => {
                            problems.push(format!("{what}: load: NoLoader with a loader"))
                        }
                        Err(_) => {}
                    }
                }
                11 => {
                    let keys = if rng.below(3) == 0 {
                        [k, k, (k + 5) % 12]
                    } else {
                        [k, (k + 1) % 12, (k + 5) % 12]
                    };
                    let all = cache.get_all(keys, |missing| {
                        missing.iter().map(|&m| (m, m * 1000 + 11)).collect()
                    });
                    for (kk, v) in all {
                        if !key_ok(kk, v) {
                            problems.push(format!("{what}: get_all {kk} = {v}"));
                        }
                    }
                }
                12 => {
                    let e = cache.entry(k).or_insert_with(|| k * 1000 + 12);
                    if !key_ok(k, *e.value()) {
                        problems.push(format!("{what}: or_insert_with {k}"));
                    }
                }
                13 => {
                    let r = cache.entry(k).and_compute_with(|cur| match cur {
                        None => Op::Put(k * 1000 + 13),
                        Some(e) if e.value() % 2 == 0 => Op::Remove,
                        Some(e) if e.value() % 3 == 0 => Op::Nop,
                        Some(e) => Op::Put(e.value() + 1),
                    });
                    match r {
                        CompResult::Inserted(e)
                        | CompResult::ReplacedWith(e)
                        | CompResult::Removed(e)
                        | CompResult::Unchanged(e) => {
                            if !key_ok(k, *e.value()) {
                                problems.push(format!("{what}: compute {k}"));
                            }
                        }
                        CompResult::StillNone(_) => {}
                    }
                }
                14 => cache.invalidate(&k),
                15 => {
                    if rng.below(4) == 0 {
                        cache.invalidate_all()
                    } else {
                        cache.remove(&k);
                    }
                }
                16 => cache
                    .invalidate_entries_if(|kk, _| kk % 3 == k % 3)
                    .unwrap(),
                17 => cache.retain(|kk, v| {
                    assert!(key_ok(*kk, *v), "retain saw {kk} -> {v}");
                    kk % 2 == 0
                }),
                18 => {
                    let n = cache.iter().count() as u64;
                    let ec = cache.entry_count();
                    if n > ec {
                        problems.push(format!("{what}: iter yielded {n} > entry_count {ec}"));
                    }
                    for (kk, v) in cache.iter() {
                        if !key_ok(kk, v) {
                            problems.push(format!("{what}: iter {kk} -> {v}"));
                        }
                    }
                }
                19 => cache.run_pending_tasks(),
                20 => {
                    let h = cache.health();
                    let _ = h.to_string();
                    let _ = cache.health_over(Duration::ZERO).to_string();
                    let _ = cache.health_over(Duration::MAX).to_string();
                    if let Some(s) = cache.sizing() {
                        for &(cc, p) in s.points() {
                            if !(0.0..=1.0).contains(&p) {
                                problems.push(format!("{what}: sizing point ({cc}, {p})"));
                            }
                        }
                        let _ = s.suggested_capacity();
                        let _ = s.predicted_at(u64::MAX);
                        let o = s.observed();
                        if !(0.0..=1.0).contains(&o) {
                            problems.push(format!("{what}: sizing observed {o}"));
                        }
                    } else if c.sizing {
                        problems.push(format!("{what}: track_sizing but sizing() is None"));
                    }
                    let _ = format!("{:?}", cache);
                }
                21 if rng.below(2) == 0 => {
                    let v = futures::executor::block_on(
                        cache.get_with_async(k, async move { k * 1000 + 21 }),
                    );
                    if !key_ok(k, v) {
                        problems.push(format!("{what}: get_with_async({k}) = {v}"));
                    }
                    let r = futures::executor::block_on(cache.load_async(k));
                    match r {
                        Err(herdcache::LoadError::NoLoader) if !c.async_loader => {}
                        Ok(v) if key_ok(k, v) && c.async_loader => {}
                        Err(_) if c.async_loader && k % 4 == 3 => {}
                        r => problems.push(format!(
                            "{what}: load_async (async loader {}): {r:?}",
                            c.async_loader
                        )),
                    }
                }
                _ => {
                    let p = cache.policy();
                    if p.max_capacity() != c.cap {
                        problems.push(format!("{what}: policy cap {:?}", p.max_capacity()));
                    }
                    if p.time_to_live() != c.ttl || p.time_to_idle() != c.tti {
                        problems.push(format!("{what}: policy durations"));
                    }
                    if let Some(n) = c.shards {
                        if p.num_segments() != n.next_power_of_two() {
                            problems.push(format!("{what}: num_segments {}", p.num_segments()));
                        }
                    }
                    if !p.shard_count().is_power_of_two() {
                        problems.push(format!("{what}: shard_count {}", p.shard_count()));
                    }
                    let s = cache.stats();
                    let _ = s.average_load_time();
                    let _ = s.miss_ratio();
                    let _ = s.evictions();
                }
            }
            stats = check_after(b, c, &what, &stats, plain_misses, &mut problems);
            if problems.len() > 8 {
                return problems;
            }
        }
    }
    // Final: reclaim, then the listener's counts against the stats' removal tallies.
    cache.run_pending_tasks();
    let st = cache.stats();
    if c.stats {
        if st.refreshes_started != st.refreshes_succeeded + st.refreshes_failed {
            problems.push(format!(
                "end: refreshes_started {} != succeeded {} + failed {}",
                st.refreshes_started, st.refreshes_succeeded, st.refreshes_failed
            ));
        }
        let seen = b.seen.lock().unwrap().clone();
        let get = |n: &str| seen.by_cause.get(n).map_or(0, |x| x.0);
        for (name, count) in [
            ("Expired", st.expired.count),
            ("Explicit", st.explicit.count),
            ("Replaced", st.replaced.count),
            ("Size", st.size.count),
        ] {
            if get(name) != count {
                problems.push(format!(
                    "end: listener saw {} {name} removals, stats say {count} ({seen:?})",
                    get(name)
                ));
            }
        }
    }
    check_after(b, c, "end", &st, 0, &mut problems);
    if problems.is_empty() {
        problems.extend(run_concurrent(b, c, seed));
    }
    problems
}

/// Three threads run a mix at once (one of them moves the clock); then the bound, validate()
/// and the statistics' identity, once every call has returned.
fn run_concurrent(b: &Built, c: &Cfg, seed: u64) -> Problems {
    let cache = &b.cache;
    let before = cache.stats();
    let plain = AtomicU64::new(0);
    let bad = Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (plain, bad, clock) = (&plain, &bad, &b.clock);
            s.spawn(move || {
                let mut rng = Rng((seed ^ (t + 1).wrapping_mul(0x9E37_79B9)) | 1);
                for _ in 0..250 {
                    let k = rng.below(16);
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        match rng.below(12) {
                            0 | 1 => cache.insert(k, k * 1000 + 1),
                            2 | 3 => {
                                if cache.get(&k).is_none() {
                                    plain.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            4 => {
                                let v = cache.get_with(k, || {
                                    std::thread::yield_now();
                                    k * 1000 + 2
                                });
                                assert!(key_ok(k, v), "get_with {k} = {v}");
                            }
                            5 => {
                                let _ = cache.try_get_with(k, || {
                                    if k % 2 == 0 {
                                        Ok(k * 1000 + 3)
                                    } else {
                                        Err(())
                                    }
                                });
                            }
                            6 => {
                                if let Ok(v) = cache.load(k) {
                                    assert!(key_ok(k, v), "load {k} = {v}");
                                }
                            }
                            7 => {
                                let _ = cache.get_all([k, (k + 3) % 16], |m| {
                                    m.iter().map(|&x| (x, x * 1000 + 4)).collect()
                                });
                            }
                            8 => {
                                let _ = cache.entry(k).and_compute_with(|e| match e {
                                    None => Op::Put(k * 1000 + 5),
                                    Some(_) => Op::Remove,
                                });
                            }
                            9 => cache.invalidate(&k),
                            10 => {
                                if t == 0 {
                                    let d = match rng.below(4) {
                                        0 => Duration::from_nanos(1),
                                        1 => c.ttl.unwrap_or(Duration::from_secs(1)),
                                        2 => Duration::from_millis(1),
                                        _ => Duration::ZERO,
                                    };
                                    clock.advance(d);
                                } else {
                                    cache.run_pending_tasks();
                                }
                            }
                            _ => {
                                let _ = cache.entry(k).or_insert_with(|| k * 1000 + 6);
                            }
                        }
                    }));
                    if let Err(p) = r {
                        bad.lock().unwrap().push(format!(
                            "concurrent thread {t}: PANIC {} [{}]",
                            common::panic_message(&*p),
                            LAST_PANIC.lock().unwrap().clone().unwrap_or_default()
                        ));
                        return;
                    }
                }
            });
        }
    });
    let mut problems = bad.into_inner().unwrap();
    check_after(
        b,
        c,
        "concurrent phase",
        &before,
        plain.load(Ordering::Relaxed),
        &mut problems,
    );
    problems
}

// ---------------------------------------------------------------------------------------------
// Running one configuration

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
static BUILT: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static HITS: AtomicU64 = AtomicU64::new(0);
static LOADS: AtomicU64 = AtomicU64::new(0);
static EVICTED: AtomicU64 = AtomicU64::new(0);

fn quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let line = format!(
                "at {}: {}",
                info.location()
                    .map_or_else(String::new, ToString::to_string),
                common::panic_message(info.payload())
            );
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
            if std::env::var_os("ZZ_LOUD").is_some() {
                prev(info);
            }
        }));
    });
}

/// Runs one configuration; returns its failures (empty: fine).
fn run_cfg(c: &Cfg, seed: u64) -> Vec<String> {
    let c2 = c.clone();
    let r = common::within(Duration::from_secs(40), move || {
        let c = c2;
        let expected = expected_errors(&c);
        let (b, clock, seen, loads) = builder(&c);
        let built = b.try_build();
        let cache = match built {
            Err(e) => {
                if expected.contains(&e) {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    return vec![];
                }
                return vec![format!(
                    "try_build refused with {e:?}; expected {expected:?}"
                )];
            }
            Ok(cache) => {
                if !expected.is_empty() {
                    return vec![format!("try_build accepted; expected one of {expected:?}")];
                }
                cache
            }
        };
        let b = Built {
            cache,
            clock,
            seen,
            loads,
        };
        BUILT.fetch_add(1, Ordering::Relaxed);
        let p = run_script(&b, &c, seed);
        let st = b.cache.stats();
        HITS.fetch_add(st.hits, Ordering::Relaxed);
        EVICTED.fetch_add(st.size.count, Ordering::Relaxed);
        LOADS.fetch_add(b.loads.load(Ordering::SeqCst), Ordering::Relaxed);
        p
    });
    match r {
        None => vec![format!("HANG (did not finish within 40 s)")],
        Some(Ok(p)) => p,
        Some(Err(p)) => {
            let last = LAST_PANIC.lock().unwrap().take().unwrap_or_default();
            vec![format!("PANIC: {} [{last}]", common::panic_message(&*p))]
        }
    }
}

fn report(results: &[(String, Vec<String>)]) -> usize {
    eprintln!(
        "built {} refused {} hits {} loader calls {} size evictions {}",
        BUILT.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
        HITS.load(Ordering::Relaxed),
        LOADS.load(Ordering::Relaxed),
        EVICTED.load(Ordering::Relaxed)
    );
    let mut failed = 0;
    for (desc, probs) in results {
        if !probs.is_empty() {
            failed += 1;
            eprintln!("FAIL {desc}");
            for p in probs.iter().take(4) {
                eprintln!("    {p}");
            }
        }
    }
    failed
}

// ---------------------------------------------------------------------------------------------
// Value lists

const CAPS: [u64; 10] = [
    0,
    1,
    2,
    3,
    1023,
    1024,
    1025,
    u32::MAX as u64,
    u64::MAX / 2,
    u64::MAX,
];

fn durs() -> Vec<Option<Duration>> {
    vec![
        None,
        Some(Duration::ZERO),
        Some(Duration::from_nanos(1)),
        Some(Duration::from_secs(1)),
        Some(Duration::MAX),
        Some(Duration::from_nanos(u64::MAX)),
    ]
}

fn bases() -> Vec<(&'static str, Cfg)> {
    let plain = Cfg {
        cap: Some(8),
        stats: true,
        ..Cfg::default()
    };
    let ttl_loader = Cfg {
        cap: Some(8),
        ttl: Some(Duration::from_secs(10)),
        loader: true,
        stats: true,
        ..Cfg::default()
    };
    let weigher = Cfg {
        cap: Some(10),
        weigher: Some(W::HugeSome),
        stats: true,
        ..Cfg::default()
    };
    vec![
        ("plain", plain),
        ("ttl+loader", ttl_loader),
        ("weigher", weigher),
    ]
}

/// Each option alone, over its values, against each base.
fn single_option_variants(base: &Cfg) -> Vec<(String, Cfg)> {
    let mut out = vec![];
    let mut push = |name: String, c: Cfg| out.push((name, c));
    for cap in CAPS {
        push(
            format!("cap={cap}"),
            Cfg {
                cap: Some(cap),
                ..base.clone()
            },
        );
        push(
            format!("cap={cap} sizing"),
            Cfg {
                cap: Some(cap),
                sizing: true,
                ..base.clone()
            },
        );
        push(
            format!("cap={cap} sizing lru"),
            Cfg {
                cap: Some(cap),
                sizing: true,
                lru: true,
                ..base.clone()
            },
        );
        push(
            format!("cap={cap} nostats"),
            Cfg {
                cap: Some(cap),
                stats: false,
                ..base.clone()
            },
        );
    }
    push(
        "cap=None".into(),
        Cfg {
            cap: None,
            ..base.clone()
        },
    );
    for s in [
        None,
        Some(0),
        Some(1),
        Some(2),
        Some(3),
        Some(1024),
        Some(1025),
    ] {
        push(
            format!("shards={s:?}"),
            Cfg {
                shards: s,
                ..base.clone()
            },
        );
        push(
            format!("shards={s:?} cap=3"),
            Cfg {
                shards: s,
                cap: Some(3),
                ..base.clone()
            },
        );
    }
    for w in [
        None,
        Some(W::Zero),
        Some(W::One),
        Some(W::Max),
        Some(W::HugeSome),
    ] {
        for cap in CAPS {
            push(
                format!("weigher={w:?} cap={cap}"),
                Cfg {
                    weigher: w,
                    cap: Some(cap),
                    ..base.clone()
                },
            );
        }
    }
    for d in durs() {
        push(
            format!("ttl={d:?}"),
            Cfg {
                ttl: d,
                ..base.clone()
            },
        );
        push(
            format!("tti={d:?}"),
            Cfg {
                tti: d,
                ..base.clone()
            },
        );
        push(
            format!("ttl=tti={d:?}"),
            Cfg {
                ttl: d,
                tti: d,
                ..base.clone()
            },
        );
        push(
            format!("ttl={d:?} tti=1s"),
            Cfg {
                ttl: d,
                tti: Some(Duration::from_secs(1)),
                ..base.clone()
            },
        );
    }
    for e in [Ex::Zero, Ex::Max, Ex::Never, Ex::Mixed] {
        push(
            format!("expiry={e:?}"),
            Cfg {
                expiry: Some(e),
                ..base.clone()
            },
        );
        for d in durs() {
            push(
                format!("expiry={e:?} ttl={d:?} tti={d:?}"),
                Cfg {
                    expiry: Some(e),
                    ttl: d,
                    tti: d,
                    ..base.clone()
                },
            );
        }
    }
    // refresh_after, with and without a loader, three spawners.
    let ttl = base.ttl;
    let mut ras = vec![Duration::ZERO, Duration::from_nanos(1), Duration::MAX];
    if let Some(t) = ttl {
        ras.push(t);
        ras.push(t + Duration::from_secs(1));
    }
    for ra in ras {
        for sp in [None, Some(Sp::Inline), Some(Sp::Drop)] {
            for loader in [false, true] {
                push(
                    format!("refresh_after={ra:?} spawner={sp:?} loader={loader}"),
                    Cfg {
                        refresh_after: Some(ra),
                        spawner: sp,
                        loader,
                        ..base.clone()
                    },
                );
            }
        }
    }
    for j in [0.0, 0.999_999, 1.0, f64::NAN, -0.1, f64::INFINITY, -0.0] {
        push(
            format!("jitter={j}"),
            Cfg {
                jitter: Some(j),
                ..base.clone()
            },
        );
        push(
            format!("jitter={j} ttl=1ns tti=1s"),
            Cfg {
                jitter: Some(j),
                ttl: Some(Duration::from_nanos(1)),
                tti: Some(Duration::from_secs(1)),
                ..base.clone()
            },
        );
        push(
            format!("jitter={j} ttl=MAX"),
            Cfg {
                jitter: Some(j),
                ttl: Some(Duration::MAX),
                ..base.clone()
            },
        );
    }
    for beta in [
        f64::MIN_POSITIVE,
        1e-300,
        1.0,
        1e300,
        f64::MAX,
        f64::NAN,
        0.0,
        -1.0,
        f64::INFINITY,
    ] {
        for loader in [false, true] {
            for takes in [None, Some(Duration::from_millis(1)), Some(Duration::MAX)] {
                push(
                    format!("early={beta} loader={loader} load_takes={takes:?}"),
                    Cfg {
                        early: Some(beta),
                        loader,
                        load_takes: takes,
                        ..base.clone()
                    },
                );
            }
        }
    }
    for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
        push(
            format!("fail_safe={d:?}"),
            Cfg {
                fail_safe: Some(d),
                ..base.clone()
            },
        );
        push(
            format!("fail_safe={d:?} loader"),
            Cfg {
                fail_safe: Some(d),
                loader: true,
                ..base.clone()
            },
        );
        push(
            format!("refresh_backoff={d:?}"),
            Cfg {
                refresh_backoff: Some(d),
                ..base.clone()
            },
        );
        push(
            format!("negative_ttl={d:?}"),
            Cfg {
                negative_ttl: Some(d),
                ..base.clone()
            },
        );
        push(
            format!("load_timeout={d:?}"),
            Cfg {
                load_timeout: Some(d),
                ..base.clone()
            },
        );
        for sp in [Sp::Inline, Sp::Drop] {
            push(
                format!("load_timeout={d:?} spawner={sp:?} loader"),
                Cfg {
                    load_timeout: Some(d),
                    spawner: Some(sp),
                    loader: true,
                    ..base.clone()
                },
            );
        }
    }
    for n in [0, 1, usize::MAX] {
        push(
            format!("mcl={n}"),
            Cfg {
                mcl: Some(n),
                ..base.clone()
            },
        );
    }
    for fsp in [None, Some(Sp::Inline), Some(Sp::Drop)] {
        for ra in [
            None,
            Some(Duration::ZERO),
            Some(Duration::from_nanos(1)),
            Some(Duration::MAX),
        ] {
            for early in [None, Some(1.0)] {
                push(
                    format!("async_loader fspawner={fsp:?} refresh_after={ra:?} early={early:?}"),
                    Cfg {
                        async_loader: true,
                        fspawner: fsp,
                        refresh_after: ra,
                        early,
                        load_takes: Some(Duration::from_millis(1)),
                        ..base.clone()
                    },
                );
            }
        }
    }
    for n in [0, usize::MAX / 2, usize::MAX] {
        push(
            format!("initial={n}"),
            Cfg {
                initial: Some(n),
                ..base.clone()
            },
        );
    }
    for takes in [Duration::ZERO, Duration::from_secs(11), Duration::MAX] {
        push(
            format!("load_takes={takes:?} loader"),
            Cfg {
                load_takes: Some(takes),
                loader: true,
                ..base.clone()
            },
        );
    }
    out
}

fn pick<T: Clone>(rng: &mut Rng, v: &[T]) -> T {
    v[rng.below(v.len() as u64) as usize].clone()
}

fn random_cfg(rng: &mut Rng) -> Cfg {
    let d = durs();
    let small_d = [
        None,
        Some(Duration::ZERO),
        Some(Duration::from_nanos(1)),
        Some(Duration::from_secs(1)),
        Some(Duration::MAX),
    ];
    let loader = rng.below(3) != 0;
    Cfg {
        cap: Some(pick(rng, &CAPS)),
        shards: pick(rng, &[None, None, Some(1), Some(2), Some(3), Some(1024)]),
        weigher: pick(
            rng,
            &[
                None,
                None,
                Some(W::Zero),
                Some(W::One),
                Some(W::Max),
                Some(W::HugeSome),
            ],
        ),
        ttl: pick(rng, &d),
        tti: pick(rng, &d),
        expiry: pick(
            rng,
            &[
                None,
                None,
                Some(Ex::Zero),
                Some(Ex::Max),
                Some(Ex::Never),
                Some(Ex::Mixed),
            ],
        ),
        refresh_after: if loader { pick(rng, &small_d) } else { None },
        loader,
        spawner: pick(rng, &[None, Some(Sp::Inline), Some(Sp::Drop)]),
        jitter: pick(rng, &[None, Some(0.0), Some(0.5), Some(0.999_999)]),
        early: pick(
            rng,
            &[None, None, None, Some(1e-300), Some(1.0), Some(1e300)],
        ),
        fail_safe: pick(rng, &small_d),
        refresh_backoff: pick(rng, &small_d),
        negative_ttl: pick(rng, &small_d),
        load_timeout: pick(rng, &small_d),
        mcl: pick(rng, &[None, Some(0), Some(1), Some(usize::MAX)]),
        initial: pick(rng, &[None, Some(0), Some(usize::MAX / 2)]),
        sizing: rng.below(2) == 0,
        stats: rng.below(4) != 0,
        lru: rng.below(2) == 0,
        load_takes: pick(
            rng,
            &[
                None,
                None,
                Some(Duration::from_millis(1)),
                Some(Duration::MAX),
            ],
        ),
        async_loader: rng.below(3) == 0,
        fspawner: pick(rng, &[None, Some(Sp::Inline), Some(Sp::Drop)]),
    }
}

// ---------------------------------------------------------------------------------------------
// The sweeps

#[test]
fn sweep_single_options() {
    let _w = common::watchdog(Duration::from_secs(1500), "sweep_single_options");
    quiet_hook();
    let mut results = vec![];
    let part = common::Part::new("single-option sweep");
    let mut seed = 1u64;
    for (bname, base) in bases() {
        for (name, c) in single_option_variants(&base) {
            seed += 1;
            if !part.take(seed) {
                continue;
            }
            let p = run_cfg(&c, seed);
            results.push((format!("[{bname}] {name} (seed {seed}) {c:?}"), p));
        }
    }
    let total = results.len();
    let failed = report(&results);
    eprintln!("single-option sweep: {failed} of {total} configurations failed");
    assert_eq!(failed, 0);
}

#[test]
fn sweep_random_combinations() {
    let _w = common::watchdog(Duration::from_secs(1500), "sweep_random_combinations");
    quiet_hook();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let part = common::Part::new("random sweep");
    let mut results = vec![];
    for i in 0..400u64 {
        let c = random_cfg(&mut rng);
        if !part.take(i) {
            continue;
        }
        let p = run_cfg(&c, 1000 + i);
        results.push((format!("#{i} (seed {}) {c:?}", 1000 + i), p));
    }
    let total = results.len();
    let failed = report(&results);
    eprintln!("random sweep: {failed} of {total} configurations failed");
    assert_eq!(failed, 0);
}

// ---------------------------------------------------------------------------------------------
// Boundary semantics: exact deadlines, jitter bounds, zero durations, shares.

fn ttl_cache(
    ttl: Option<Duration>,
    tti: Option<Duration>,
    jitter: f64,
    clock: &ManualClock,
) -> Cache<u64, u64> {
    let mut b = Cache::builder()
        .max_capacity(10_000)
        .clock(clock.clone())
        .jitter(jitter);
    if let Some(t) = ttl {
        b = b.time_to_live(t);
    }
    if let Some(t) = tti {
        b = b.time_to_idle(t);
    }
    b.build()
}

#[test]
fn exact_deadlines_at_every_offset() {
    let _w = common::watchdog(Duration::from_secs(120), "exact_deadlines_at_every_offset");
    let mut problems = vec![];
    for offset in [0u64, 1, 12_345_000_000_000, u64::MAX / 2] {
        for ttl in [1u64, 2, 1_000_000_000, 10_000_000_000, u64::MAX / 4] {
            for kind in ["ttl", "tti", "expiry", "ttl+tti"] {
                let clock = ManualClock::new();
                clock.advance(Duration::from_nanos(offset));
                let d = Duration::from_nanos(ttl);
                let cache = match kind {
                    "ttl" => ttl_cache(Some(d), None, 0.0, &clock),
                    "tti" => ttl_cache(None, Some(d), 0.0, &clock),
                    "ttl+tti" => ttl_cache(Some(d), Some(d), 0.0, &clock),
                    _ => {
                        struct E(Duration);
                        impl Expiry<u64, u64> for E {
                            fn expire_after_create(&self, _: &u64, _: &u64) -> Option<Duration> {
                                Some(self.0)
                            }
                        }
                        Cache::builder()
                            .max_capacity(100)
                            .clock(clock.clone())
                            .expire_after(E(d))
                            .build()
                    }
                };
                cache.insert(1, 1);
                clock.advance(Duration::from_nanos(ttl - 1));
                let before = cache.get(&1);
                // A read may move an idle deadline: advance from the last access.
                let (c2, cl2) = (cache.clone(), clock.clone());
                let _ = (c2, cl2);
                let mut after_total = None;
                if kind == "tti" || kind == "ttl+tti" {
                    // the read at ttl-1 counts as an access (the 1/1024 rule aside): check the
                    // hard bound instead: never alive past last access + tti.
                    clock.advance(d);
                    after_total = Some(cache.get(&1));
                } else {
                    clock.advance(Duration::from_nanos(1));
                    after_total = after_total.or(Some(cache.get(&1)));
                }
                let after = after_total.unwrap();
                if before != Some(1) || after.is_some() {
                    problems.push(format!(
                        "offset {offset} {kind}={ttl}ns: before deadline {before:?}, after {after:?}"
                    ));
                }
                cache.validate();
            }
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    assert!(problems.is_empty(), "{} problems", problems.len());
}

#[test]
fn jitter_stays_within_its_bounds() {
    let _w = common::watchdog(Duration::from_secs(120), "jitter_stays_within_its_bounds");
    let mut problems = vec![];
    for jitter in [0.000_001, 0.5, 0.999_999] {
        for kind in ["ttl", "tti"] {
            let ttl = 1000u64;
            let clock = ManualClock::new();
            let d = Some(Duration::from_nanos(ttl));
            let cache = if kind == "ttl" {
                ttl_cache(d, None, jitter, &clock)
            } else {
                ttl_cache(None, d, jitter, &clock)
            };
            for k in 0..200 {
                cache.insert(k, k);
            }
            let mut died = vec![None; 200];
            for t in 1..=2 * ttl + 2 {
                clock.advance(Duration::from_nanos(1));
                for k in 0..200u64 {
                    if died[k as usize].is_none() && !cache.contains_key(&k) {
                        died[k as usize] = Some(t);
                    }
                }
            }
            let lo = (ttl as f64 * (1.0 - jitter)).floor() as u64;
            let hi = (ttl as f64 * (1.0 + jitter)).ceil() as u64;
            for (k, t) in died.iter().enumerate() {
                match t {
                    Some(t) if *t >= lo && *t <= hi => {}
                    _ => problems.push(format!(
                        "{kind} jitter {jitter}: key {k} expired at {t:?}, expected {lo}..={hi}"
                    )),
                }
            }
            cache.validate();
        }
    }
    for p in problems.iter().take(20) {
        eprintln!("{p}");
    }
    assert!(problems.is_empty(), "{} problems", problems.len());
}

#[test]
fn zero_durations_store_nothing() {
    let _w = common::watchdog(Duration::from_secs(60), "zero_durations_store_nothing");
    let mut problems = vec![];
    for kind in ["ttl", "tti", "expiry"] {
        let clock = ManualClock::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let mut b = Cache::<u64, u64>::builder()
            .max_capacity(100)
            .clock(clock.clone())
            .record_stats()
            .eviction_listener(move |k: &u64, _v: &u64, c: RemovalCause| {
                s.lock().unwrap().push((*k, c))
            });
        b = match kind {
            "ttl" => b.time_to_live(Duration::ZERO),
            "tti" => b.time_to_idle(Duration::ZERO),
            _ => b.expire_after(ExpK(Ex::Zero)),
        };
        let cache = b.build();
        cache.insert(1, 1);
        let g = cache.get(&1);
        let n = cache.entry_count();
        let ws = cache.weighted_size();
        let v = cache.get_with(2, || 2);
        let n2 = cache.entry_count();
        let seen_now = seen.lock().unwrap().clone();
        let st = cache.stats();
        eprintln!(
            "{kind}=0: get {g:?} entry_count {n} weighted {ws} get_with {v} then count {n2}; \
             listener {seen_now:?}; stats expired {:?}",
            st.expired
        );
        if g.is_some() || n != 0 || ws != 0 || n2 != 0 {
            problems.push(format!(
                "{kind}=0 stored something: get {g:?} count {n}/{n2} weight {ws}"
            ));
        }
        if seen_now.len() != 2 {
            problems.push(format!("{kind}=0: listener {seen_now:?}"));
        }
        cache.validate();
    }
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn tiny_shares_still_store() {
    let _w = common::watchdog(Duration::from_secs(60), "tiny_shares_still_store");
    for cap in [1u64, 2, 3, 1023, 1024, 1025] {
        for shards in [1usize, 2, 3, 1024] {
            let cache: Cache<u64, u64> = Cache::builder().max_capacity(cap).shards(shards).build();
            let mut stored = 0;
            for k in 0..cap.min(50) {
                cache.insert(k, k);
                if cache.get(&k).is_some() {
                    stored += 1;
                }
            }
            eprintln!(
                "cap {cap} shards {shards}: stored {stored} of {} inserts into an empty-ish cache, entry_count {}",
                cap.min(50),
                cache.entry_count()
            );
            cache.validate();
        }
    }
}

/// A loader whose failure is switched on and off, counting its calls.
fn switchable(
    clock: &ManualClock,
) -> (
    CacheBuilder<u64, u64>,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<AtomicU64>,
) {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let (d, n) = (Arc::clone(&down), Arc::clone(&calls));
    let b = Cache::builder()
        .max_capacity(100)
        .clock(clock.clone())
        .record_stats()
        .loader(move |k: &u64| {
            n.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("down"))
            } else {
                Ok(k * 1000 + 1)
            }
        });
    (b, down, calls)
}

#[test]
fn negative_ttl_boundaries() {
    let _w = common::watchdog(Duration::from_secs(60), "negative_ttl_boundaries");
    let mut problems = vec![];
    for nt in [0u64, 1, 2, 1_000_000_000, u64::MAX] {
        let clock = ManualClock::new();
        let (b, down, calls) = switchable(&clock);
        let cache = b.negative_ttl(Duration::from_nanos(nt)).build();
        down.store(true, Ordering::SeqCst);
        assert!(cache.load(1).is_err());
        let c1 = calls.load(Ordering::SeqCst);
        let _ = cache.load(1);
        let c2 = calls.load(Ordering::SeqCst);
        if nt > 1 {
            clock.advance(Duration::from_nanos(nt - 1));
        }
        let _ = cache.load(1);
        let c3 = calls.load(Ordering::SeqCst);
        clock.advance(Duration::from_nanos(1));
        let _ = cache.load(1);
        let c4 = calls.load(Ordering::SeqCst);
        eprintln!("negative_ttl {nt}ns: calls after 1st {c1}, same instant {c2}, at ttl-1 {c3}, at ttl {c4}");
        let remembered_now = c2 == c1;
        if nt == 0 && remembered_now {
            problems.push("negative_ttl 0 remembered a failure".to_string());
        }
        if nt > 0 && !remembered_now {
            problems.push(format!("negative_ttl {nt} did not remember at once"));
        }
        if nt > 1 && c3 != c1 {
            problems.push(format!("negative_ttl {nt}: forgotten before its ttl"));
        }
        if nt != u64::MAX && c4 == c3 && nt > 0 {
            problems.push(format!("negative_ttl {nt}: still remembered at its ttl"));
        }
        let st = cache.stats();
        let id = st.misses as i128
            - (st.load_successes
                + st.load_failures
                + st.loads_abandoned
                + st.coalesced
                + st.negative_hits) as i128
            + st.refreshes_started as i128;
        if id != 0 {
            problems.push(format!("negative_ttl {nt}: identity off by {id}: {st:?}"));
        }
        cache.validate();
    }
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn fail_safe_boundaries() {
    let _w = common::watchdog(Duration::from_secs(60), "fail_safe_boundaries");
    let mut problems = vec![];
    let ttl = 10_000_000_000u64;
    for ms in [0u64, 1, 2, 1_000_000_000, u64::MAX] {
        for backoff in [None, Some(Duration::ZERO), Some(Duration::MAX)] {
            let clock = ManualClock::new();
            let (b, down, calls) = switchable(&clock);
            let mut b = b
                .time_to_live(Duration::from_nanos(ttl))
                .fail_safe(Duration::from_nanos(ms));
            if let Some(bo) = backoff {
                b = b.refresh_backoff(bo);
            }
            let cache = b.build();
            assert_eq!(cache.load(1).unwrap(), 1001);
            down.store(true, Ordering::SeqCst);
            clock.advance(Duration::from_nanos(ttl)); // expired exactly now
            let at_deadline = cache.load(1);
            let mut before_end = None;
            if ms > 1 && ms != u64::MAX {
                clock.advance(Duration::from_nanos(ms - 1));
                before_end = Some(cache.load(1));
                clock.advance(Duration::from_nanos(1));
            } else if ms == 1 {
                clock.advance(Duration::from_nanos(1));
            } else if ms == u64::MAX {
                clock.advance(Duration::MAX);
            }
            let at_end = cache.load(1);
            let n = calls.load(Ordering::SeqCst);
            eprintln!(
                "fail_safe {ms} backoff {backoff:?}: at deadline {at_deadline:?}, before end {before_end:?}, at end {at_end:?}, calls {n}, entry_count {}",
                cache.entry_count()
            );
            if ms > 0 && at_deadline.is_err() {
                problems.push(format!(
                    "fail_safe {ms} {backoff:?}: no stale value at the deadline"
                ));
            }
            if ms == 0 && at_deadline.is_ok() {
                problems.push(format!("fail_safe 0 {backoff:?}: served stale"));
            }
            if let Some(Err(_)) = before_end {
                problems.push(format!(
                    "fail_safe {ms} {backoff:?}: no stale value just before max_stale"
                ));
            }
            if ms != u64::MAX && at_end.is_ok() {
                problems.push(format!(
                    "fail_safe {ms} {backoff:?}: stale value at/after max_stale: {at_end:?}"
                ));
            }
            let st = cache.stats();
            let id = st.misses as i128
                - (st.load_successes
                    + st.load_failures
                    + st.loads_abandoned
                    + st.coalesced
                    + st.negative_hits) as i128
                + st.refreshes_started as i128;
            if id != 0 {
                problems.push(format!("fail_safe {ms}: identity off by {id}: {st:?}"));
            }
            down.store(false, Ordering::SeqCst);
            cache.run_pending_tasks();
            cache.validate();
            let w = cache.weighted_size();
            if w > 100 {
                problems.push(format!("weight {w}"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn refresh_boundaries() {
    let _w = common::watchdog(Duration::from_secs(60), "refresh_boundaries");
    let mut problems = vec![];
    let ttl = 10_000u64;
    for ra in [0u64, 1, 5_000, ttl, ttl + 1, u64::MAX] {
        for sp in [None, Some(Sp::Inline), Some(Sp::Drop)] {
            let clock = ManualClock::new();
            let (b, _down, calls) = switchable(&clock);
            let mut b = b
                .time_to_live(Duration::from_nanos(ttl))
                .refresh_after(Duration::from_nanos(ra));
            match sp {
                Some(Sp::Inline) => b = b.spawner(|job| job()),
                Some(Sp::Drop) => b = b.spawner(drop),
                None => {}
            }
            let cache = b.build();
            cache.load(1).unwrap();
            let mut seen = vec![];
            for at in [ra.saturating_sub(1), ra, ra.saturating_add(1)] {
                let clock2 = ManualClock::new();
                let _ = clock2;
                let now = clock.elapsed().as_nanos() as u64;
                if at > now {
                    clock.advance(Duration::from_nanos(at - now));
                }
                let before = calls.load(Ordering::SeqCst);
                let v = cache.get(&1);
                let after = calls.load(Ordering::SeqCst);
                seen.push((at, v, after - before));
            }
            let st = cache.stats();
            eprintln!("refresh_after {ra} spawner {sp:?}: (time, get, loader calls) {seen:?}; refreshes {}/{}/{}", st.refreshes_started, st.refreshes_succeeded, st.refreshes_failed);
            if st.refreshes_started != st.refreshes_succeeded + st.refreshes_failed {
                problems.push(format!("refresh_after {ra} {sp:?}: {st:?}"));
            }
            cache.validate();
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn soft_timeouts_at_their_extremes_while_blocked() {
    let _w = common::watchdog(Duration::from_secs(120), "soft_timeouts_at_their_extremes");
    quiet_hook();
    let mut problems = vec![];
    let timeouts = [
        Some(Duration::ZERO),
        Some(Duration::from_nanos(1)),
        Some(Duration::from_millis(20)),
        Some(Duration::from_secs(u64::MAX / 4)),
        Some(Duration::from_secs(u64::MAX)),
        Some(Duration::MAX),
        None,
    ];
    for mode in ["permit", "same_key"] {
        for sp in [None, Some(Sp::Inline), Some(Sp::Drop)] {
            for fs in [false, true] {
                for &to in &timeouts {
                    let mut b = Cache::<u64, u64>::builder()
                        .max_capacity(100)
                        .max_concurrent_loads(1)
                        .record_stats()
                        .time_to_live(Duration::from_secs(3600))
                        .loader(|k: &u64| Ok::<_, BoxError>(k * 1000 + 1));
                    if fs {
                        b = b.fail_safe(Duration::from_secs(3600));
                    }
                    match sp {
                        Some(Sp::Inline) => b = b.spawner(|job| job()),
                        Some(Sp::Drop) => b = b.spawner(drop),
                        None => {}
                    }
                    let cache = b.build();
                    let short = matches!(to, Some(d) if d <= Duration::from_millis(20));
                    let (tx, rx) = std::sync::mpsc::channel::<()>();
                    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
                    let c = cache.clone();
                    let blocked_key = if mode == "permit" { 2 } else { 1 };
                    let h = std::thread::spawn(move || {
                        c.get_with(blocked_key, || {
                            started_tx.send(()).unwrap();
                            // A short timeout must return while this load still blocks
                            // (released only after it returned); a long one waits for it.
                            if short {
                                let _ = rx.recv();
                            } else {
                                let _ = rx.recv_timeout(Duration::from_millis(100));
                            }
                            blocked_key * 1000
                        })
                    });
                    started_rx.recv().unwrap();
                    let c2 = cache.clone();
                    let r =
                        common::within(Duration::from_secs(5), move || c2.load_with_timeout(1, to));
                    let _ = tx.send(());
                    let _ = h.join();
                    let desc = format!("{mode} spawner {sp:?} fail_safe {fs} timeout {to:?}");
                    match r {
                        None => problems.push(format!("{desc}: HANG")),
                        Some(Err(p)) => problems.push(format!(
                            "{desc}: PANIC {} [{}]",
                            common::panic_message(&*p),
                            LAST_PANIC.lock().unwrap().clone().unwrap_or_default()
                        )),
                        Some(Ok(r)) => {
                            if !short && r.is_err() {
                                problems.push(format!("{desc}: long timeout but {r:?}"));
                            }
                            if let Ok(v) = r {
                                if !key_ok(1, v) {
                                    problems.push(format!("{desc}: value {v}"));
                                }
                            }
                        }
                    }
                    // Let any spawned or parked work settle, then check.
                    let _ = cache.load_with_timeout(1, None);
                    cache.validate();
                    let st = cache.stats();
                    let id = st.misses as i128
                        - (st.load_successes
                            + st.load_failures
                            + st.loads_abandoned
                            + st.coalesced
                            + st.negative_hits) as i128
                        + st.refreshes_started as i128;
                    if id != 0 {
                        problems.push(format!("{desc}: identity off by {id}: {st:?}"));
                    }
                    if st.timeouts > 0 && matches!(to, None | Some(Duration::MAX)) {
                        problems.push(format!("{desc}: a timeout with no bound: {st:?}"));
                    }
                }
            }
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    assert!(problems.is_empty(), "{} problems", problems.len());
}

#[test]
fn health_and_sizing_under_thrashing_at_extreme_capacities() {
    let _w = common::watchdog(Duration::from_secs(300), "health_and_sizing_extremes");
    quiet_hook();
    let mut fails = vec![];
    for cap in [0u64, 1, 2, 3, 1023, u32::MAX as u64, u64::MAX] {
        for w in [
            None,
            Some(W::Zero),
            Some(W::One),
            Some(W::Max),
            Some(W::HugeSome),
        ] {
            for ttl in [None, Some(Duration::from_millis(500)), Some(Duration::MAX)] {
                let r = common::within(Duration::from_secs(30), move || {
                    let clock = ManualClock::new();
                    let mut b = Cache::<u64, u64>::builder()
                        .max_capacity(cap)
                        .clock(clock.clone())
                        .record_stats()
                        .track_sizing()
                        .loader(|k: &u64| Ok::<_, BoxError>(k * 1000 + 1));
                    if let Some(w) = w {
                        b = b.weigher(move |k: &u64, _: &u64| weigh(w, *k));
                    }
                    if let Some(t) = ttl {
                        b = b.time_to_live(t);
                    }
                    let cache = b.build();
                    let mut out = vec![];
                    for round in 0..16u64 {
                        for i in 0..1500u64 {
                            let k = (i * 31 + round) % 400;
                            if cache.get(&k).is_none() {
                                cache.insert(k, k * 1000);
                            }
                            if i % 50 == 0 {
                                let _ = cache.load(k + 1000);
                            }
                        }
                        clock.advance(Duration::from_millis(700));
                        let h = cache.health();
                        let text = h.to_string();
                        if round == 15 {
                            out.push(text);
                        }
                        if let Some(s) = cache.sizing() {
                            for &(c, p) in s.points() {
                                assert!((0.0..=1.0).contains(&p), "point ({c}, {p})");
                            }
                            let _ = s.suggested_capacity();
                        }
                        assert!(cache.weighted_size() <= cap, "bound");
                    }
                    cache.validate();
                    out
                });
                match r {
                    Some(Ok(out)) => {
                        for t in out {
                            if t != "healthy" {
                                eprintln!("cap {cap} w {w:?} ttl {ttl:?}: {t}");
                            }
                        }
                    }
                    Some(Err(p)) => fails.push(format!(
                        "cap {cap} w {w:?} ttl {ttl:?}: PANIC {} [{}]",
                        common::panic_message(&*p),
                        LAST_PANIC.lock().unwrap().clone().unwrap_or_default()
                    )),
                    None => fails.push(format!("cap {cap} w {w:?} ttl {ttl:?}: HANG")),
                }
            }
        }
    }
    for f in &fails {
        eprintln!("FAIL {f}");
    }
    assert!(fails.is_empty());
}
