//! Round 32 adversarial tests (public API only): today's fixes — retain / invalidate_all at one
//! instant, a key's `Hash` that panics under the shard lock, load takeover under the load
//! limit, weighted admission, early refresh.
//!
//! Tests not named `probe_*` are findings (they fail on f2c033b): retain stopping at a
//! panicking `Hash` (2); an insert whose eviction meets a panicking `Hash` left over the bound;
//! shared async / `load_async` callers panicking inside herdcache when the load they started
//! was taken over or given up (3); an async caller dropped during a takeover losing the
//! taker's value; `get_all` leaders omitting a key taken over from them (2); a weighted entry
//! above its shard's share never admitted. The takeover ones are races, looped until they
//! show (they fail every run here, on 2 cores). All but two are fixed (stop 23); the two are
//! `#[ignore]`d with the reason (`-- --ignored` runs them).
mod common;

use common::{quiet_injected_panics, watchdog};
use herdcache::{Cache, ManualClock, RemovalCause};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

// A key whose `Hash` panics while its `ARMED` flag is set (one flag per test).
macro_rules! bad_key {
    ($name:ident, $armed:ident, $bad:expr) => {
        static $armed: AtomicBool = AtomicBool::new(false);
        #[derive(Clone, Debug, PartialEq, Eq)]
        struct $name(u64);
        impl Hash for $name {
            fn hash<H: Hasher>(&self, h: &mut H) {
                if self.0 == $bad && $armed.load(Ordering::SeqCst) {
                    panic!("injected hash panic");
                }
                self.0.hash(h);
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// 2. A key's Hash that panics under the lock in retain: the changelog says reclaiming expired
//    entries with a panicking Hash now completes (the panic is resumed after). retain removes
//    (reclaims) expired entries and hashes each one it removes.
// ---------------------------------------------------------------------------------------------

bad_key!(RkA, ARMED_RETAIN_EXPIRED, 0);

#[test]
fn retain_reclaiming_expired_entries_completes_past_a_panicking_hash() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "retain_reclaiming_expired");
    let clock = ManualClock::new();
    let cache: Cache<RkA, u64> = Cache::builder()
        .max_capacity(1000)
        .shards(1)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
    for i in 0..50 {
        cache.insert(RkA(i), i);
    }
    clock.advance(Duration::from_secs(11));
    ARMED_RETAIN_EXPIRED.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| cache.retain(|_, _| true)));
    ARMED_RETAIN_EXPIRED.store(false, Ordering::SeqCst);
    assert!(r.is_err(), "the key's Hash panic reaches the caller");
    cache.validate();
    // Every expired entry but (perhaps) the one whose Hash panicked was reclaimed: the
    // operation completes, as the other reclaim paths do now.
    assert!(
        cache.entry_count() <= 1,
        "retain stopped reclaiming at the panicking key: {} expired entries still counted",
        cache.entry_count()
    );
}

bad_key!(RkB, ARMED_RETAIN_PRED, 0);

#[test]
fn retain_removes_what_keep_rejects_past_a_panicking_hash() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "retain_removes_past_panicking_hash");
    let cache: Cache<RkB, u64> = Cache::builder().max_capacity(1000).shards(1).build();
    for i in 0..50 {
        cache.insert(RkB(i), i);
    }
    ARMED_RETAIN_PRED.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| cache.retain(|_, _| false)));
    ARMED_RETAIN_PRED.store(false, Ordering::SeqCst);
    assert!(r.is_err(), "the key's Hash panic reaches the caller");
    cache.validate();
    let left: Vec<u64> = (1..50).filter(|i| cache.contains_key(&RkB(*i))).collect();
    assert!(
        left.is_empty(),
        "retain(|_, _| false) kept {} entries of keys whose Hash is fine: {left:?}",
        left.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Weighted caches: a reasonable candidate (far below max_capacity) must be storable.
// ---------------------------------------------------------------------------------------------

#[test]
fn probe_weighted_cache_stores_entries_heavier_than_a_shard_share() {
    let _w = watchdog(LIMIT, "weighted_share");
    // 8 shards of 100: a weight of 20 is a fifth of max_capacity, above a shard's 12.5.
    let cache: Cache<u64, u32> = Cache::builder()
        .max_capacity(100)
        .shards(8)
        .weigher(|_k: &u64, v: &u32| *v)
        .build();
    for round in 0..20u64 {
        for k in 0..40u64 {
            let _ = cache.get(&k);
            if !cache.contains_key(&k) {
                cache.insert(k, 20);
            }
            cache.validate();
            assert!(
                cache.weighted_size() <= 100,
                "round {round}: over the bound"
            );
        }
    }
    cache.run_pending_tasks();
    assert!(
        cache.entry_count() >= 2,
        "a cache of max_capacity 100 holds {} entries of weight 20 (weighted_size {}) after \
         800 inserts of 40 keys",
        cache.entry_count(),
        cache.weighted_size()
    );
}

#[test]
fn probe_weighted_cache_keeps_accepting_new_keys() {
    let _w = watchdog(LIMIT, "weighted_accepts");
    let cache: Cache<u64, u32> = Cache::builder()
        .max_capacity(1000)
        .shards(4)
        .weigher(|_k: &u64, v: &u32| *v)
        .build();
    let mut rng = common::rng(7);
    let mut accepted_late = 0;
    for i in 0..20_000u64 {
        let w = (rng() % 60 + 1) as u32;
        cache.insert(i, w);
        if i >= 19_000 && cache.contains_key(&i) {
            accepted_late += 1;
        }
        assert!(cache.weighted_size() <= 1000);
    }
    cache.validate();
    assert!(
        accepted_late > 0,
        "no new key accepted in the last 1000 inserts"
    );
    let sum: u64 = cache.iter().map(|(_, v)| u64::from(v)).sum();
    assert_eq!(
        sum,
        cache.weighted_size(),
        "weighted_size is the sum of the entries' weights"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. retain / invalidate_all under concurrency: listeners and loaders that call back, many
//    shards, exactly-once removal reports.
// ---------------------------------------------------------------------------------------------

#[test]
fn probe_retain_invalidate_all_with_reentrant_listener_and_loaders() {
    let _w = watchdog(LIMIT, "retain_reentrant");
    let reports = Arc::new(AtomicU64::new(0));
    let slot: Arc<Mutex<Option<Cache<u64, u64>>>> = Arc::new(Mutex::new(None));
    let (r2, s2) = (Arc::clone(&reports), Arc::clone(&slot));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(200)
        .shards(64)
        .max_concurrent_loads(2)
        .eviction_listener(move |k, _v, _c| {
            r2.fetch_add(1, Ordering::SeqCst);
            let c = s2.lock().unwrap().clone();
            if let Some(c) = c {
                let _ = c.get(&(k + 1));
                if k % 7 == 0 {
                    c.invalidate(&(k + 3));
                }
            }
        })
        .build();
    *slot.lock().unwrap() = Some(cache.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let c = cache.clone();
        let stop = Arc::clone(&stop);
        hs.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let k = (i * 31 + t) % 500;
                match (i + t) % 6 {
                    0 => {
                        let c2 = c.clone();
                        c.get_with(k, || {
                            if k % 5 == 0 {
                                c2.retain(|kk, _| kk % 3 != 0);
                            }
                            let _ = c2.get_with(k + 1, || k);
                            k
                        });
                    }
                    1 => {
                        let _ = c.get_all((k..k + 8).collect::<Vec<_>>(), |ks| {
                            ks.iter().map(|k| (*k, *k)).collect()
                        });
                    }
                    2 => c.insert(k, k),
                    3 => {
                        if i % 50 == 0 {
                            c.invalidate_all()
                        } else {
                            c.invalidate_entries_if(|kk, _| kk % 11 == 0).unwrap()
                        }
                    }
                    4 => {
                        let _ = c.iter().take(5).count();
                    }
                    _ => {
                        let _ = c
                            .entry(k)
                            .and_upsert_with(|v| v.map_or(1, |e| e.into_value() + 1));
                    }
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    *slot.lock().unwrap() = None;
    cache.validate();
    assert_eq!(cache.loads_in_flight(), 0);
    assert!(cache.weighted_size() <= 200);
    let _ = reports.load(Ordering::SeqCst);
    let _ = RemovalCause::Explicit;
    let _ = AtomicUsize::new(0);
}

// ---------------------------------------------------------------------------------------------
// 3. Load takeover under max_concurrent_loads(1): every leader verb waiting for the permit ×
//    every taker verb nested in a load that holds it.
// ---------------------------------------------------------------------------------------------

type Verb = fn(&Cache<u64, u64>, &Arc<AtomicUsize>) -> u64;

fn l_get_with(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.get_with(20, || {
        n.fetch_add(1, Ordering::SeqCst);
        2
    })
}
fn l_try(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.try_get_with(20, || {
        n.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(2)
    })
    .unwrap_or(0)
}
fn l_opt(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.optionally_get_with(20, || {
        n.fetch_add(1, Ordering::SeqCst);
        Some(2)
    })
    .unwrap_or(0)
}
fn l_get_all(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    let m = c.get_all([20, 22], |ks| {
        if ks.contains(&20) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        ks.iter().map(|k| (*k, 2)).collect()
    });
    m.get(&20).copied().unwrap_or(0)
}
fn l_get_with_if(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.get_with_if(
        20,
        || {
            n.fetch_add(1, Ordering::SeqCst);
            2
        },
        |_| true,
    )
}
fn l_or_insert_with(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.entry(20)
        .or_insert_with(|| {
            n.fetch_add(1, Ordering::SeqCst);
            2
        })
        .into_value()
}
fn l_shared_async(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    let n = Arc::clone(n);
    futures::executor::block_on(c.get_with_async_shared(20, async move {
        n.fetch_add(1, Ordering::SeqCst);
        2
    }))
}
fn l_borrowed_async(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    futures::executor::block_on(c.get_with_async(20, async {
        n.fetch_add(1, Ordering::SeqCst);
        2
    }))
}

fn t_get_with(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.get_with(20, || {
        n.fetch_add(1, Ordering::SeqCst);
        21
    })
}
fn t_try_err(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.try_get_with(20, || {
        n.fetch_add(1, Ordering::SeqCst);
        Err::<u64, _>("down".to_string())
    })
    .unwrap_or(0)
}
fn t_opt_none(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.optionally_get_with(20, || {
        n.fetch_add(1, Ordering::SeqCst);
        None
    })
    .unwrap_or(0)
}
fn t_panic(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    catch_unwind(AssertUnwindSafe(|| {
        c.get_with(20, || {
            n.fetch_add(1, Ordering::SeqCst);
            panic!("injected taker panic")
        })
    }))
    .unwrap_or(0)
}
fn t_get_all(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    let m = c.get_all([21, 20], |ks| {
        if ks.contains(&20) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        ks.iter().map(|k| (*k, 21)).collect()
    });
    m.get(&20).copied().unwrap_or(0)
}
fn t_get_all_without(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    // Takes 20 over and returns nothing for it.
    let m = c.get_all([20, 21], |ks| {
        if ks.contains(&20) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        ks.iter().filter(|k| **k != 20).map(|k| (*k, 21)).collect()
    });
    m.get(&20).copied().unwrap_or(0)
}
fn t_compute(c: &Cache<u64, u64>, _n: &Arc<AtomicUsize>) -> u64 {
    *c.entry(20)
        .and_upsert_with(|e| e.map_or(21, |e| e.into_value() + 100))
        .value()
}
fn t_invalidate_then_get(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.invalidate(&20);
    c.retain(|_, _| true);
    t_get_with(c, n)
}
fn t_get_with_if(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.get_with_if(
        20,
        || {
            n.fetch_add(1, Ordering::SeqCst);
            21
        },
        |_| true,
    )
}
fn t_or_insert(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    c.entry(20)
        .or_insert_with(|| {
            n.fetch_add(1, Ordering::SeqCst);
            21
        })
        .into_value()
}
fn t_borrowed_async(c: &Cache<u64, u64>, n: &Arc<AtomicUsize>) -> u64 {
    futures::executor::block_on(c.get_with_async(20, async {
        n.fetch_add(1, Ordering::SeqCst);
        21
    }))
}

/// Runs `leader` (claims 20, waits for the only permit) while a load of 10 holds the permit
/// and then runs `taker` nested. Returns (taker's value, leader's value, inits of 20, final
/// value of 20), or a description of what went wrong.
fn takeover(leader: Verb, taker: Verb) -> Result<(u64, u64, usize, Option<u64>), String> {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let n = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let (c1, g1, i1, n1) = (
        cache.clone(),
        Arc::clone(&go),
        Arc::clone(&inside),
        Arc::clone(&n),
    );
    let (c2, n2) = (cache.clone(), Arc::clone(&n));
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = c1.clone();
            let mut got = 0;
            c1.get_with(10, || {
                i1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                got = taker(&c, &n1);
                1
            });
            got
        });
        while !inside.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let cs = c2.clone();
        let b = std::thread::spawn(move || leader(&c2, &n2));
        while cs.stats().loads_waited_for_limit == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        go.store(true, Ordering::SeqCst);
        let va = a.join();
        let vb = b.join();
        (va, vb)
    });
    let (va, vb) = match r {
        None => return Err("hang".into()),
        Some(Err(_)) => return Err("harness panicked".into()),
        Some(Ok(x)) => x,
    };
    let va = va.map_err(|_| "the taker's thread panicked".to_string())?;
    let vb = vb.map_err(|_| "the waiting leader panicked".to_string())?;
    if cache.loads_in_flight() != 0 {
        return Err(format!("{} loads left in flight", cache.loads_in_flight()));
    }
    cache.validate();
    Ok((va, vb, n.load(Ordering::SeqCst), cache.get(&20)))
}

#[test]
fn probe_takeover_every_leader_and_taker_verb() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(600), "takeover matrix");
    let leaders: [(&str, Verb); 8] = [
        ("get_with", l_get_with),
        ("try_get_with", l_try),
        ("optionally_get_with", l_opt),
        ("get_all", l_get_all),
        ("get_with_if", l_get_with_if),
        ("or_insert_with", l_or_insert_with),
        ("get_with_async_shared", l_shared_async),
        ("get_with_async", l_borrowed_async),
    ];
    let takers: [(&str, Verb); 11] = [
        ("get_with", t_get_with),
        ("try_get_with Err", t_try_err),
        ("optionally_get_with None", t_opt_none),
        ("get_with panics", t_panic),
        ("get_all", t_get_all),
        ("get_all without the key", t_get_all_without),
        ("and_upsert_with", t_compute),
        ("invalidate+retain then get_with", t_invalidate_then_get),
        ("get_with_if", t_get_with_if),
        ("or_insert_with", t_or_insert),
        ("get_with_async", t_borrowed_async),
    ];
    let mut bad = Vec::new();
    for (ln, l) in leaders {
        for (tn, t) in takers {
            // Findings below, kept out of the probe.
            if ln.starts_with("get_all") && t_omits(tn)
                || ln == "get_with_async_shared" && (tn == "and_upsert_with" || t_nothing(tn))
            {
                continue;
            }
            match takeover(l, t) {
                Err(e) => bad.push(format!("leader {ln} / taker {tn}: {e}")),
                Ok((va, vb, inits, fin)) => {
                    // The leader's value is one the key held: its own init's or the taker's.
                    let ok_vals = [2u64, 21, 121, 102];
                    let failed_taker = tn.contains("Err") || tn.contains("None");
                    if !ok_vals.contains(&vb) && (vb != 0 || !failed_taker) {
                        bad.push(format!("leader {ln} / taker {tn}: leader got {vb}"));
                    }
                    if inits > 2 {
                        bad.push(format!("leader {ln} / taker {tn}: {inits} inits of 20"));
                    }
                    // A taker that stored a value: the leader takes it, its init never runs.
                    // (After an invalidate the leader's load is superseded: it runs its init
                    // for its own callers, as documented.)
                    if va == 21
                        && vb != 21
                        && !tn.starts_with("invalidate")
                        && tn != "and_upsert_with"
                    {
                        bad.push(format!(
                            "leader {ln} / taker {tn}: taker stored 21, leader got {vb} ({inits} inits)"
                        ));
                    }
                    // A taker whose load failed (error / None) shares its outcome with the
                    // leader that waited on it (documented): 0 is fine there.
                    if fin.is_none() && (vb != 0) {
                        bad.push(format!(
                            "leader {ln} / taker {tn}: 20 absent after, leader {vb}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn t_nothing(tn: &str) -> bool {
    matches!(
        tn,
        "try_get_with Err"
            | "optionally_get_with None"
            | "get_with panics"
            | "get_all without the key"
    )
}

/// A shared async leader (`get_with_async_shared`) waiting for the permit is taken over by a
/// nested load that ends with nothing for the key (an error, `None`, a panic, a `get_all` that
/// leaves the key out). CHANGELOG [Unreleased] Fixed: "a shared async load's caller loads again
/// with its own `init` if the taker's load ends with nothing for it". Racy: the caller panics
/// inside herdcache ("the load this call started panicked while another caller was driving
/// it, and nobody is loading the key now") in most rounds on 2 cores.
#[test]
fn shared_async_leader_panics_when_the_taker_of_its_load_ends_with_nothing() {
    quiet_injected_panics();
    let _w = watchdog(
        Duration::from_secs(300),
        "shared leader, taker ends with nothing",
    );
    let takers: [(&str, Verb); 4] = [
        ("try_get_with Err", t_try_err),
        ("optionally_get_with None", t_opt_none),
        ("get_with panics", t_panic),
        ("get_all without the key", t_get_all_without),
    ];
    for round in 0..50 {
        for (tn, t) in takers {
            let (_, vb, _, _) = takeover(l_shared_async, t)
                .unwrap_or_else(|e| panic!("round {round}, taker {tn}: {e}"));
            assert_eq!(
                vb, 2,
                "round {round}, taker {tn}: the caller loads with its own init"
            );
        }
    }
}

fn t_omits(tn: &str) -> bool {
    matches!(
        tn,
        "try_get_with Err"
            | "optionally_get_with None"
            | "get_with panics"
            | "get_all without the key"
            | "and_upsert_with"
    )
}

/// A shared async load (`get_with_async_shared`) waiting for the only permit; a computation
/// nested in the load that holds the permit gives that load up ("computations nested in a load
/// ... give up a load waiting for a permit instead of deadlocking"; "a shared async load's
/// caller loads again with its own init if the taker's load ends with nothing for it"). The
/// async caller must then get a value (the computation's, or its own init's). It panics inside
/// herdcache instead: "the load this call started panicked while another caller was driving
/// it" — nothing panicked.
#[test]
fn shared_async_leader_given_up_by_a_nested_computation_panics() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "shared async given up");
    // A race: the given-up load's future (holding the caller's init) is dropped by the
    // computation's thread after the locks; the caller may look for its init before.
    for round in 0..300 {
        let r = takeover(l_shared_async, t_compute);
        let (va, vb, _inits, fin) = r.unwrap_or_else(|e| {
            panic!("round {round}: the shared async caller does not answer: {e}")
        });
        assert_eq!(va, 21, "the computation stored 21");
        assert!(
            vb == 21 || vb == 121 || vb == 2,
            "the async caller got {vb}"
        );
        assert!(fin.is_some());
    }
}

/// The same with a `load_async` (builder loader) caller: the shared future never started.
#[test]
fn load_async_leader_given_up_by_a_nested_computation_panics() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "load_async given up");
    for _ in 0..200 {
        load_async_given_up_once();
    }
}

fn load_async_given_up_once() {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .async_loader(|k: &u64| {
            let k = *k;
            async move { Ok::<_, herdcache::BoxError>(k + 1000) }
        })
        .build();
    let go = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let (c1, g1, i1) = (cache.clone(), Arc::clone(&go), Arc::clone(&inside));
    let c2 = cache.clone();
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = c1.clone();
            c1.get_with(10, || {
                i1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                t_compute(&c, &Arc::new(AtomicUsize::new(0)))
            })
        });
        while !inside.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let cs = c2.clone();
        let b = std::thread::spawn(move || futures::executor::block_on(c2.load_async(20)));
        while cs.stats().loads_waited_for_limit == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        go.store(true, Ordering::SeqCst);
        (a.join(), b.join())
    });
    let (a, b) = r.expect("no hang").expect("no harness panic");
    assert_eq!(a.expect("the taker answers"), 21);
    let b = b.expect("the load_async caller does not panic");
    let v = b.expect("a value");
    assert!(v == 21 || v == 121 || v == 1020, "load_async got {v}");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

/// `get_all` leading key 20 waits for the only permit; a computation nested in the load that
/// holds it gives that load up and stores 21. `get_all` returns without 20 although the key
/// was neither cached nor loading when it was called (so it was `load_missing`'s to load),
/// `load_missing` never saw it, and the key holds a value when `get_all` returns. The
/// computation's own contract says the given-up load's callers "(the leader too) load again";
/// a blocking `get_with` leader in the same spot does get a value.
#[test]
fn get_all_leader_given_up_by_a_nested_computation_omits_the_key() {
    let _w = watchdog(LIMIT, "get_all given up");
    let (_va, vb_get_with, _, _) = takeover(l_get_with, t_compute).expect("no hang");
    assert_ne!(vb_get_with, 0, "reference: a get_with leader gets a value");
    let (va, vb, _inits, fin) = takeover(l_get_all, t_compute).expect("no hang");
    assert_eq!(va, 21);
    assert_eq!(fin, Some(21), "the key holds the computation's value");
    assert_ne!(
        vb, 0,
        "get_all([20, 22]) returned without 20 (load_missing never asked for it)"
    );
}

/// `get_all` leading key 20 waits for the permit; a nested `get_with` takes the load over and
/// its init panics. A blocking `get_with` leader then loads 20 itself (its init runs); the
/// `get_all` leader returns without 20, `load_missing` never asked for it.
#[test]
fn get_all_leader_whose_taken_over_load_panics_omits_the_key() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "get_all taker panics");
    let (_, vb_get_with, _, _) = takeover(l_get_with, t_panic).expect("no hang");
    assert_eq!(
        vb_get_with, 2,
        "reference: a get_with leader loads again with its init"
    );
    let (_, vb, inits, _) = takeover(l_get_all, t_panic).expect("no hang");
    assert_eq!(
        vb, 2,
        "get_all([20, 22]) returned without 20 ({inits} inits of 20)"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Weighted admission, precisely.
// ---------------------------------------------------------------------------------------------

#[test]
fn probe_weighted_heavy_replacement_never_leaves_the_old_value() {
    let _w = watchdog(LIMIT, "heavy replacement");
    let log: Arc<Mutex<Vec<(u64, u32, RemovalCause)>>> = Arc::default();
    let l2 = Arc::clone(&log);
    let cache: Cache<u64, u32> = Cache::builder()
        .max_capacity(100)
        .shards(8)
        .weigher(|_k: &u64, v: &u32| *v)
        .eviction_listener(move |k, v, c| l2.lock().unwrap().push((*k, *v, c)))
        .build();
    let mut rng = common::rng(3);
    for i in 0..3000u64 {
        let k = rng() % 30;
        let w = (rng() % 95 + 1) as u32;
        cache.insert(k, w);
        let got = cache.get(&k);
        assert!(
            got.is_none() || got == Some(w),
            "step {i}: insert({k}, {w}) then get = {got:?} (an older value)"
        );
        assert!(cache.weighted_size() <= 100);
    }
    cache.validate();
    let sum: u64 = cache.iter().map(|(_, v)| u64::from(v)).sum();
    assert_eq!(sum, cache.weighted_size());
    // Every insert is either present or reported gone.
    let _ = log.lock().unwrap().len();
}

#[test]
fn probe_weighted_heavy_entries_below_capacity_are_stored_in_an_empty_cache() {
    let _w = watchdog(LIMIT, "heavy in empty");
    for shards in [1usize, 2, 8, 64] {
        let cache: Cache<u64, u32> = Cache::builder()
            .max_capacity(100)
            .shards(shards)
            .weigher(|_k: &u64, v: &u32| *v)
            .build();
        cache.insert(1, 60);
        assert_eq!(
            cache.get(&1),
            Some(60),
            "{shards} shards: 60 of 100 in an empty cache"
        );
        cache.insert(2, 40);
        assert_eq!(
            cache.weighted_size(),
            100,
            "{shards} shards: 60 + 40 fit exactly"
        );
        cache.validate();
    }
}

/// A frequently read key of weight 100 in a full cache of capacity 1000 (one-hit light
/// entries streaming through). With 1, 2 or 4 shards it is admitted at its third insert; with
/// 16 shards (a share of 62 each) it is turned away forever: "a candidate that cannot fit in
/// its shard's share even with every victim gone is turned away". DESIGN.md: "The bound is
/// global, not split rigidly"; the builder: only "an entry heavier than `max_capacity` is not
/// stored". A hot entry of a tenth of the capacity must get in.
fn popular_heavy_admitted_at(shards: usize) -> Option<u64> {
    let cache: Cache<u64, u32> = Cache::builder()
        .max_capacity(1000)
        .shards(shards)
        .weigher(|_k: &u64, v: &u32| *v)
        .build();
    for k in 1000..3000u64 {
        cache.insert(k, 10);
    }
    for round in 0..200u64 {
        if cache.get(&1).is_some() {
            return Some(round);
        }
        cache.insert(1, 100);
        for k in 0..20u64 {
            cache.insert(5000 + round * 20 + k, 10);
        }
        assert!(cache.weighted_size() <= 1000);
    }
    cache.validate();
    None
}

#[test]
#[ignore = "open (stop 23): in a full cache, an entry heavier than its shard's share cannot stay (each shard evicts down to its share); so before today too"]
fn weighted_popular_key_above_a_shards_share_is_never_admitted() {
    let _w = watchdog(LIMIT, "popular heavy");
    assert!(
        popular_heavy_admitted_at(4).is_some(),
        "reference: 4 shards admit it"
    );
    assert!(
        popular_heavy_admitted_at(16).is_some(),
        "16 shards: key 1 (weight 100 of max_capacity 1000, read and inserted 200 times) was \
         turned away every time"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Refresh counters: refreshes_started = refreshes_succeeded + refreshes_failed, whatever
//    happens to the refreshes (failures, panics, writes, invalidations, retain, dropped jobs,
//    takeovers under the load limit, early refresh).
// ---------------------------------------------------------------------------------------------

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

#[test]
fn probe_refresh_counters_add_up_under_every_fate() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "refresh counters");
    for seed in 1..=6u64 {
        let clock = ManualClock::new();
        let jobs: Jobs = Arc::default();
        let j2 = Arc::clone(&jobs);
        let mode = Arc::new(AtomicU64::new(0));
        let m2 = Arc::clone(&mode);
        let mut b = Cache::builder()
            .max_capacity(50)
            .shards(4)
            .time_to_live(Duration::from_secs(100))
            .refresh_after(Duration::from_secs(10))
            .refresh_backoff(Duration::from_secs(1))
            .record_stats()
            .clock(clock.clone())
            .loader(move |k: &u64| match m2.load(Ordering::SeqCst) % 4 {
                0 | 1 => Ok(*k + 1),
                2 => Err("down"),
                _ => panic!("injected loader panic"),
            })
            .spawner(move |job| j2.lock().unwrap().push(job));
        if seed % 2 == 0 {
            b = b.max_concurrent_loads(1);
        }
        if seed % 3 == 0 {
            b = b.early_refresh(50.0);
        }
        let cache: Cache<u64, u64> = b.build();
        let mut rng = common::rng(seed * 7919);
        for _ in 0..3000 {
            let k = rng() % 20;
            mode.store(rng(), Ordering::SeqCst);
            let mut op = rng() % 16;
            // A load, get_all or computation of a key whose refresh job sits in the queue
            // waits for it (this thread runs the jobs): only with no job queued.
            if matches!(op, 6 | 14 | 15) && !jobs.lock().unwrap().is_empty() {
                op = 11;
            }
            let _ = catch_unwind(AssertUnwindSafe(|| match op {
                0..=5 => {
                    let _ = cache.get(&k);
                }
                6 => {
                    let _ = cache.load(k);
                }
                7 => cache.insert(k, 7),
                8 => cache.invalidate(&k),
                9 => cache.retain(|kk, _| kk % 5 != k % 5),
                10 => clock.advance(Duration::from_secs(rng() % 15)),
                11 | 12 => {
                    let job = {
                        let mut j = jobs.lock().unwrap();
                        if j.is_empty() {
                            None
                        } else {
                            let i = (rng() as usize) % j.len();
                            Some(j.swap_remove(i))
                        }
                    };
                    if let Some(job) = job {
                        if op == 11 {
                            job()
                        } else {
                            drop(job)
                        }
                    }
                }
                13 => {
                    if rng() % 20 == 0 {
                        cache.invalidate_all()
                    }
                }
                14 => {
                    let _ = cache.get_all([k, k + 1], |ks| ks.iter().map(|k| (*k, 3)).collect());
                }
                _ => {
                    let _ = cache.entry(k).and_upsert_with(|_| 9);
                }
            }));
        }
        loop {
            let job = jobs.lock().unwrap().pop();
            match job {
                Some(j) => {
                    mode.store(0, Ordering::SeqCst);
                    let _ = catch_unwind(AssertUnwindSafe(j));
                }
                None => break,
            }
        }
        let s = cache.stats();
        assert_eq!(cache.loads_in_flight(), 0, "seed {seed}");
        cache.validate();
        assert!(s.refreshes_started > 0, "seed {seed}: no refresh at all");
        assert_eq!(
            s.refreshes_started,
            s.refreshes_succeeded + s.refreshes_failed,
            "seed {seed}: {s:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1b. invalidate_all / retain and loads in flight.
// ---------------------------------------------------------------------------------------------

#[test]
fn probe_invalidate_all_supersedes_loads_in_flight_and_new_callers_do_not_join_them() {
    let _w = watchdog(LIMIT, "invalidate_all supersedes");
    for shards in [1usize, 64] {
        let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).shards(shards).build();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(AtomicBool::new(false));
        let (c, s2) = (cache.clone(), Arc::clone(&started));
        let a = std::thread::spawn(move || {
            c.get_with(1, move || {
                s2.store(true, Ordering::SeqCst);
                rx.recv().unwrap();
                10
            })
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        cache.invalidate_all();
        // A caller after invalidate_all returned loads for itself.
        let c = cache.clone();
        let b = common::within(Duration::from_secs(5), move || c.get_with(1, || 20))
            .expect("a caller after invalidate_all does not wait for the superseded load")
            .unwrap();
        assert_eq!(b, 20);
        tx.send(()).unwrap();
        assert_eq!(
            a.join().unwrap(),
            10,
            "the superseded load's value goes to its caller"
        );
        assert_eq!(
            cache.get(&1),
            Some(20),
            "and is not stored over the newer value"
        );
        assert_eq!(cache.loads_in_flight(), 0);
        cache.validate();
    }
}

#[test]
fn probe_retain_supersedes_a_get_with_if_replacement_in_flight() {
    let _w = watchdog(LIMIT, "retain supersedes");
    let cache: Cache<u64, u64> = Cache::builder().max_capacity(100).shards(8).build();
    cache.insert(1, 1);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let started = Arc::new(AtomicBool::new(false));
    let (c, s2) = (cache.clone(), Arc::clone(&started));
    let a = std::thread::spawn(move || {
        c.get_with_if(
            1,
            move || {
                s2.store(true, Ordering::SeqCst);
                rx.recv().unwrap();
                10
            },
            |_| true,
        )
    });
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    cache.retain(|k, _| *k != 1);
    assert!(!cache.contains_key(&1));
    tx.send(()).unwrap();
    assert_eq!(a.join().unwrap(), 10);
    assert_eq!(cache.get(&1), None, "the removed key came back");
    assert_eq!(cache.loads_in_flight(), 0);
    cache.validate();
}

// ---------------------------------------------------------------------------------------------
// 2b. A key whose Hash panics now and then, on every path, in a full, expiring, weighted cache.
// ---------------------------------------------------------------------------------------------

static HASH_MODE: AtomicU64 = AtomicU64::new(0);

/// Keys below 4 panic in `Hash` while `HASH_MODE` is odd.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Flaky(u64);

impl Hash for Flaky {
    fn hash<H: Hasher>(&self, h: &mut H) {
        if self.0 < 4 && HASH_MODE.load(Ordering::Relaxed) % 2 == 1 {
            panic!("injected flaky hash");
        }
        self.0.hash(h);
    }
}

#[test]
fn probe_flaky_hash_on_every_path_keeps_the_cache_consistent() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(120), "flaky hash");
    let clock = ManualClock::new();
    let cache: Cache<Flaky, u32> = Cache::builder()
        .max_capacity(200)
        .shards(4)
        .weigher(|_k: &Flaky, v: &u32| *v)
        .time_to_live(Duration::from_secs(20))
        .negative_ttl(Duration::from_secs(5))
        .max_concurrent_loads(2)
        .clock(clock.clone())
        .loader(|k: &Flaky| Ok::<_, herdcache::BoxError>((k.0 % 7 + 1) as u32))
        .build();
    let mut rng = common::rng(99);
    for step in 0..20_000u64 {
        let mode = rng() % 5;
        HASH_MODE.store(mode, Ordering::Relaxed); // odd 2 times in 5
        let k = Flaky(rng() % 40);
        let kk = k.0;
        let w = (rng() % 30) as u32;
        let op = rng() % 14;
        let ran = catch_unwind(AssertUnwindSafe(|| match op {
            0 => cache.insert(k, w),
            1 => {
                let _ = cache.get(&k);
            }
            2 => {
                let _ = cache.get_with(k, || w);
            }
            3 => {
                let _ = cache.try_get_with(k, || Err::<u32, _>("e"));
            }
            4 => {
                let _ = cache.remove(&k);
            }
            5 => cache.invalidate(&k),
            6 => cache.retain(|kk, _| kk.0 % 3 != 0),
            7 => {
                let _ = cache.iter().count();
            }
            8 => {
                let _ = cache.get_all([k.clone(), Flaky(k.0 + 1)], |ks| {
                    ks.iter().map(|k| (k.clone(), 3)).collect()
                });
            }
            9 => {
                let _ = futures::executor::block_on(cache.get_with_async(k, async { 5 }));
            }
            10 => {
                let _ = futures::executor::block_on(cache.load_async(k));
            }
            11 => {
                let _ = cache
                    .entry(k)
                    .and_upsert_with(|e| e.map_or(1, |e| e.into_value() % 20 + 1));
            }
            12 => clock.advance(Duration::from_secs(rng() % 6)),
            _ => {
                if step % 50 == 0 {
                    cache.invalidate_all()
                } else {
                    cache.run_pending_tasks()
                }
            }
        }));
        HASH_MODE.store(0, Ordering::Relaxed);
        // (An op that panicked may leave the bound exceeded, until a later insert: a finding
        // below. Checked after the inserts that returned.)
        assert!(
            ran.is_err() || op != 0 || cache.weighted_size() <= 200,
            "step {step}: op {op} (key {}, weight {w}, hash mode {mode}) left weighted_size {} \
             over max_capacity 200",
            kk,
            cache.weighted_size()
        );
        assert_eq!(
            cache.loads_in_flight(),
            0,
            "step {step}: op {op} left a load in flight"
        );
        if step % 500 == 0 {
            cache.validate();
        }
    }
    cache.validate();
    let sum: u64 = cache.iter().map(|(_, v)| u64::from(v)).sum();
    assert_eq!(sum, cache.weighted_size());
    // Every key works. Each is removed by its own (stable) hash first: no entry is left
    // behind under a wrong hash. Then all fit (40 of weight 1), so an insert cannot lose its
    // admission to a fuller cache (it could, in the full cache: `insert` may evict what it
    // inserts, which failed this check about once in 50 runs).
    for k in 0..=40 {
        cache.invalidate(&Flaky(k));
    }
    cache.run_pending_tasks();
    assert_eq!(
        cache.entry_count(),
        0,
        "an entry outlived its key's removal"
    );
    assert_eq!(cache.weighted_size(), 0);
    for k in 0..40 {
        cache.insert(Flaky(k), 1);
        assert_eq!(cache.get(&Flaky(k)), Some(1), "key {k}");
    }
}

#[test]
fn probe_listener_and_stats_agree_through_retain_and_invalidate_all() {
    let _w = watchdog(LIMIT, "listener vs stats");
    let counts: Arc<Mutex<[u64; 4]>> = Arc::default();
    let c2 = Arc::clone(&counts);
    let clock = ManualClock::new();
    let cache: Cache<u64, u32> = Cache::builder()
        .max_capacity(300)
        .shards(8)
        .weigher(|_k: &u64, v: &u32| *v)
        .time_to_live(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone())
        .eviction_listener(move |_k, _v, c| {
            let i = match c {
                RemovalCause::Expired => 0,
                RemovalCause::Explicit => 1,
                RemovalCause::Replaced => 2,
                _ => 3,
            };
            c2.lock().unwrap()[i] += 1;
        })
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let (c, stop, clock) = (cache.clone(), Arc::clone(&stop), clock.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = common::rng(t + 11);
            while !stop.load(Ordering::Relaxed) {
                let k = rng() % 200;
                match rng() % 10 {
                    0..=4 => c.insert(k, (rng() % 40) as u32),
                    5 => c.invalidate(&k),
                    6 => c.retain(|kk, v| (kk + u64::from(*v)) % 4 != 0),
                    7 => {
                        if rng() % 10 == 0 {
                            c.invalidate_all()
                        }
                    }
                    8 => clock.advance(Duration::from_millis(rng() % 3000)),
                    _ => {
                        let _ = c.get(&k);
                    }
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    cache.validate();
    let s = cache.stats();
    let c = *counts.lock().unwrap();
    assert_eq!(
        [
            s.expired.count,
            s.explicit.count,
            s.replaced.count,
            s.size.count
        ],
        c,
        "stats vs listener: {s:?}"
    );
    let sum: u64 = cache.iter().map(|(_, v)| u64::from(v)).sum::<u64>();
    cache.run_pending_tasks();
    let _ = sum;
    assert!(cache.weighted_size() <= 300);
}

// ---------------------------------------------------------------------------------------------
// 3b. Takeover with the builder's loader: load / load_with_timeout / load_async as leader and
//     taker; fail_safe and negative_ttl on.
// ---------------------------------------------------------------------------------------------

type LVerb = fn(&Cache<u64, u64>) -> Result<u64, herdcache::LoadError>;

fn lv_load(c: &Cache<u64, u64>) -> Result<u64, herdcache::LoadError> {
    c.load(20)
}
fn lv_timeout(c: &Cache<u64, u64>) -> Result<u64, herdcache::LoadError> {
    c.load_with_timeout(20, Some(Duration::from_millis(200)))
}
fn lv_async(c: &Cache<u64, u64>) -> Result<u64, herdcache::LoadError> {
    futures::executor::block_on(c.load_async(20))
}
fn lv_get_with(c: &Cache<u64, u64>) -> Result<u64, herdcache::LoadError> {
    Ok(c.get_with(20, || 2))
}
fn lv_get_all(c: &Cache<u64, u64>) -> Result<u64, herdcache::LoadError> {
    Ok(c.get_all([20], |ks| ks.iter().map(|k| (*k, 3)).collect())
        .get(&20)
        .copied()
        .unwrap_or(0))
}

#[allow(clippy::type_complexity)]
fn loader_takeover(
    leader: LVerb,
    taker: LVerb,
    fail: bool,
) -> Result<
    (
        Result<u64, herdcache::LoadError>,
        Result<u64, herdcache::LoadError>,
        usize,
    ),
    String,
> {
    let calls = Arc::new(AtomicUsize::new(0));
    let (k1, k2) = (Arc::clone(&calls), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .time_to_live(Duration::from_secs(60))
        .negative_ttl(Duration::from_secs(5))
        .fail_safe(Duration::from_secs(60))
        .record_stats()
        .loader(move |k: &u64| {
            if *k == 20 {
                k1.fetch_add(1, Ordering::SeqCst);
                if fail {
                    return Err("down");
                }
            }
            Ok(*k + 1000)
        })
        .async_loader(move |k: &u64| {
            let (k, c) = (*k, Arc::clone(&k2));
            async move {
                if k == 20 {
                    c.fetch_add(1, Ordering::SeqCst);
                    if fail {
                        return Err("down");
                    }
                }
                Ok(k + 1000)
            }
        })
        .build();
    let go = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let (c1, g1, i1) = (cache.clone(), Arc::clone(&go), Arc::clone(&inside));
    let c2 = cache.clone();
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = c1.clone();
            let mut got = Ok(0);
            c1.get_with(10, || {
                i1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                got = taker(&c);
                1
            });
            got
        });
        while !inside.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let cs = c2.clone();
        let b = std::thread::spawn(move || leader(&c2));
        while cs.stats().loads_waited_for_limit == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        go.store(true, Ordering::SeqCst);
        (a.join(), b.join())
    });
    let (a, b) = match r {
        None => return Err("hang".into()),
        Some(Err(_)) => return Err("harness panicked".into()),
        Some(Ok(x)) => x,
    };
    let a = a.map_err(|_| "the taker panicked".to_string())?;
    let b = b.map_err(|_| "the waiting leader panicked".to_string())?;
    if cache.loads_in_flight() != 0 {
        return Err(format!("{} loads in flight", cache.loads_in_flight()));
    }
    cache.validate();
    Ok((a, b, calls.load(Ordering::SeqCst)))
}

#[test]
fn probe_takeover_with_the_builder_loader() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(600), "loader takeover");
    let leaders: [(&str, LVerb); 4] = [
        ("load", lv_load),
        ("load_with_timeout", lv_timeout),
        ("load_async", lv_async),
        ("get_with", lv_get_with),
    ];
    let takers: [(&str, LVerb); 5] = [
        ("load", lv_load),
        ("load_with_timeout", lv_timeout),
        ("load_async", lv_async),
        ("get_with", lv_get_with),
        ("get_all", lv_get_all),
    ];
    let mut bad = Vec::new();
    for fail in [false, true] {
        for (ln, l) in leaders {
            for (tn, t) in takers {
                match loader_takeover(l, t, fail) {
                    Err(e) => bad.push(format!("fail={fail} leader {ln} / taker {tn}: {e}")),
                    Ok((a, b, calls)) => {
                        // The loader runs at most once per key while negative caching holds.
                        if calls > 1 {
                            bad.push(format!(
                                "fail={fail} leader {ln} / taker {tn}: {calls} loader calls ({a:?}, {b:?})"
                            ));
                        }
                        if !fail && tn.starts_with("load") && a.is_err() {
                            bad.push(format!("leader {ln} / taker {tn}: taker got {a:?}"));
                        }
                        if !fail && b.is_err() && !ln.contains("timeout") {
                            bad.push(format!("leader {ln} / taker {tn}: leader got {b:?}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// One round: a shared (`get_with_async_shared`) or borrowed (`get_with_async`) async leader of
/// key 20 waits for the only permit; a load of 10 holding it runs a nested taker of 20
/// (`get_with` 0, `and_upsert_with` 1, `get_all` 2); the async caller's future is dropped
/// before the taker starts (`when` 0), right as it starts (1), or after a poll (2).
fn dropped_around(shared: bool, taker: u8, when: u8) {
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .record_stats()
        .build();
    let go = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let (c1, g1, i1) = (cache.clone(), Arc::clone(&go), Arc::clone(&inside));
    let c2 = cache.clone();
    let r = common::within(Duration::from_secs(10), move || {
        let a = std::thread::spawn(move || {
            let c = c1.clone();
            let mut got = 0;
            c1.get_with(10, || {
                i1.store(true, Ordering::SeqCst);
                while !g1.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                let n = Arc::new(AtomicUsize::new(0));
                got = match taker {
                    0 => t_get_with(&c, &n),
                    1 => t_compute(&c, &n),
                    _ => t_get_all(&c, &n),
                };
                1
            });
            got
        });
        while !inside.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>> = if shared {
            Box::pin(c2.get_with_async_shared(20, async { 2 }))
        } else {
            let c3 = c2.clone();
            Box::pin(async move { c3.get_with_async(20, async { 2 }).await })
        };
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(c2.stats().loads_waited_for_limit > 0);
        match when {
            0 => {
                drop(fut);
                go.store(true, Ordering::SeqCst);
            }
            1 => {
                go.store(true, Ordering::SeqCst);
                drop(fut);
            }
            _ => {
                go.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
                let _ = fut.as_mut().poll(&mut cx);
                drop(fut);
            }
        }
        a.join()
    });
    let what = format!("shared={shared} taker={taker} when={when}");
    let a = r
        .unwrap_or_else(|| panic!("{what}: hang"))
        .unwrap_or_else(|_| panic!("{what}: harness panicked"))
        .unwrap_or_else(|_| panic!("{what}: the taker panicked"));
    assert!(a == 21 || a == 121, "{what}: taker got {a}");
    assert_eq!(cache.loads_in_flight(), 0, "{what}");
    assert!(cache.get(&20).is_some(), "{what}: 20 absent");
    cache.validate();
}

#[test]
fn probe_async_leader_dropped_around_a_takeover() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(300), "dropped async leader");
    for _ in 0..20 {
        for shared in [true, false] {
            for taker in 0..3u8 {
                for when in [0u8, 2] {
                    dropped_around(shared, taker, when);
                }
            }
        }
    }
}

/// The async caller's future is dropped while a nested `get_with` takes its load over: the
/// taker returns 21 (its init ran) but 21 is not stored — key 20 is absent afterwards
/// (CHANGELOG: "the original leader's drop, cancellation or late permit no longer ends the
/// taker's load"; a `get_with` that returned a value it loaded leaves it cached). Racy: 200
/// rounds of each; it fails within a few on 2 cores.
#[test]
fn async_leader_dropped_during_a_takeover_loses_the_takers_value() {
    quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(300), "dropped during takeover");
    for _ in 0..200 {
        for shared in [true, false] {
            dropped_around(shared, 0, 1);
        }
    }
}

/// Early refresh (XFetch) after a failed refresh waits out `refresh_backoff`, with reads at
/// one instant and reads spread over the backoff; started = succeeded + failed.
#[test]
fn probe_early_refresh_waits_out_the_backoff() {
    let _w = watchdog(LIMIT, "early refresh backoff");
    let clock = ManualClock::new();
    let fail = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (c2, f2, n2) = (clock.clone(), Arc::clone(&fail), Arc::clone(&calls));
    let cache: Cache<u64, u64> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(100))
        .early_refresh(1000.0)
        .refresh_backoff(Duration::from_secs(3))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            n2.fetch_add(1, Ordering::SeqCst);
            if f2.load(Ordering::SeqCst) {
                return Err("down");
            }
            c2.advance(Duration::from_secs(5)); // the load takes 5 s
            Ok(*k)
        })
        .build();
    assert_eq!(cache.load(1).unwrap(), 1);
    fail.store(true, Ordering::SeqCst);
    let base = calls.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(cache.get(&1), Some(1));
    }
    let after_burst = calls.load(Ordering::SeqCst) - base;
    assert_eq!(
        after_burst, 1,
        "{after_burst} refresh attempts at one instant"
    );
    // Across 2.9 s (within the backoff): no new attempt.
    for _ in 0..29 {
        clock.advance(Duration::from_millis(100));
        let _ = cache.get(&1);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst) - base,
        after_burst,
        "retried within the backoff"
    );
    clock.advance(Duration::from_millis(200));
    let _ = cache.get(&1);
    let s = cache.stats();
    assert_eq!(
        s.refreshes_started,
        s.refreshes_succeeded + s.refreshes_failed,
        "{s:?}"
    );
    assert_eq!(cache.loads_in_flight(), 0);
}

static ARMED_EVICT: AtomicBool = AtomicBool::new(false);

/// Keys below 4 panic in `Hash` while `ARMED_EVICT` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EvictKey(u64);

impl Hash for EvictKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        if self.0 < 4 && ARMED_EVICT.load(Ordering::SeqCst) {
            panic!("injected hash panic in eviction");
        }
        self.0.hash(h);
    }
}

/// A weighted cache holding keys whose `Hash` panics (armed after they were stored): inserts
/// of other keys evict, the eviction hashes a resident bad key, the panic reaches the inserter.
/// CHANGELOG [Unreleased] Fixed: "A key's `Hash` that panicked while the shard hashed resident
/// keys (reclaiming expired entries, evicting, ...) ... The operation now completes ... and the
/// panic is resumed after." The insert's eviction does not complete: `weighted_size()` is left
/// above `max_capacity` (e.g. 222 of 200) — `weighted_size`: "Never above max_capacity once
/// every insert has returned".
#[test]
fn eviction_past_a_panicking_hash_leaves_the_cache_over_its_bound() {
    quiet_injected_panics();
    let _w = watchdog(LIMIT, "eviction past a panicking hash");
    let mut worst = 0;
    for seed in 1..=20u64 {
        let clock = ManualClock::new();
        let cache: Cache<EvictKey, u32> = Cache::builder()
            .max_capacity(200)
            .shards(4)
            .weigher(|_k: &EvictKey, v: &u32| *v)
            .time_to_live(Duration::from_secs(20))
            .clock(clock.clone())
            .build();
        let mut rng = common::rng(seed);
        for _ in 0..2000u64 {
            let k = EvictKey(rng() % 40);
            let w = (rng() % 30) as u32;
            if rng() % 8 == 0 {
                clock.advance(Duration::from_secs(rng() % 6));
            }
            ARMED_EVICT.store(rng() % 5 < 2, Ordering::SeqCst);
            let _ = catch_unwind(AssertUnwindSafe(|| cache.insert(k, w)));
            ARMED_EVICT.store(false, Ordering::SeqCst);
            worst = worst.max(cache.weighted_size());
        }
        cache.validate();
    }
    assert!(
        worst <= 200,
        "weighted_size reached {worst} with max_capacity 200"
    );
}
