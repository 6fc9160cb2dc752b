//! A second outside sweep of the Redis second tier (feature `redis`), public API only, where
//! tests/attack_redis.rs and tests/redis_fleet_history.rs do not go: randomized concurrent
//! histories over fleets of 2–4 `TieredCache`s on one `redis-server` (threads and tokio tasks
//! each), with the server frozen mid-history (SIGSTOP), `invalidate_all` racing inserts
//! on the other instances, async callers cancelled by `tokio::time::timeout` in leased loads,
//! and value codecs that fail or panic on some values. Every test has a watchdog.
#![cfg(feature = "redis")]

mod common;
use common::tier::{raw, vkey};
use herdcache_testkit::redis_server;

use common::{eventually, quiet_injected_panics, watchdog};
use herdcache::codec::{Codec, Plain};
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use redis_server::RedisServer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(40);
const KEYS: u64 = 4;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(300), Duration::from_millis(300))
}

fn builder() -> herdcache::CacheBuilder<u64, u64> {
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(600))
        .record_stats()
}

fn lkey(ns: &str, k: u64) -> String {
    format!("hc:{}:{ns}:l{{{k}}}", ns.len())
}

/// Redis's live value of `k` (`None`: absent or a tombstone).
fn redis_value(c: &mut redis::Connection, ns: &str, k: u64) -> Option<u64> {
    let d: Option<String> = redis::cmd("HGET")
        .arg(vkey(ns, k))
        .arg("d")
        .query(c)
        .unwrap();
    d.and_then(|s| s.parse().ok())
}

fn subscribed(cs: &[TieredCache<u64, u64>]) {
    assert!(
        eventually(|| cs.iter().all(|c| c.is_subscribed())),
        "subscribers never connected"
    );
}

/// A tiny deterministic generator per thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A backend whose per-key versions only grow; writes of one key are serialized ("bump, then
/// tell the cache", the usual write path of a row followed by a cache call).
struct Backend {
    rows: Vec<Mutex<u64>>,
    current: Vec<AtomicU64>,
}

impl Backend {
    fn new() -> Arc<Backend> {
        Arc::new(Backend {
            rows: (0..KEYS).map(|_| Mutex::new(0)).collect(),
            current: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        })
    }
    fn read(&self, k: u64) -> u64 {
        self.current[k as usize].load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64),
    Read(u64),
}

#[derive(Clone, Copy, Debug)]
struct Event {
    inst: usize,
    key: u64,
    op: Op,
    start: Instant,
    end: Instant,
}

// ---------------------------------------------------------------------------------------------
// 1. Leases: at most one backend load per key at a time across the fleet
// ---------------------------------------------------------------------------------------------

/// Module docs: "Fleet-wide single-flight (opt-in, RedisTier::lease): before loading, the
/// leader takes a per-key lease ... The instance that gets it loads; the others poll Redis for
/// the value ... for at most the lease *wait*, then load themselves." With a wait (3 s) far
/// longer than a load (15 ms), no invalidation (which revokes leases) and Redis up, no two
/// loads of one key overlap anywhere in the fleet. Values live 150 ms in Redis (and locally:
/// "A copy an instance reads from Redis expires locally when the copy in Redis does"), so the
/// keys are loaded again and again during the run. Three instances, sync threads and tokio
/// tasks (`get_with_async`) each.
#[test]
fn leases_allow_one_load_per_key_at_a_time_across_a_fleet() {
    let _w = watchdog(
        LIMIT,
        "leases_allow_one_load_per_key_at_a_time_across_a_fleet",
    );
    let server = RedisServer::start();
    let ns = "lease1";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            tier(&server, ns)
                .ttl(Duration::from_millis(150))
                .lease(Duration::from_secs(5), Duration::from_secs(3))
                .build(builder().time_to_live(Duration::from_millis(150)), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let running: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let overlaps = Arc::new(AtomicUsize::new(0));
    let loads = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_millis(1500);

    let enter = {
        let running = Arc::clone(&running);
        let overlaps = Arc::clone(&overlaps);
        let loads = Arc::clone(&loads);
        move |k: u64| {
            loads.fetch_add(1, Ordering::SeqCst);
            if running[k as usize].fetch_add(1, Ordering::SeqCst) != 0 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let leave = {
        let running = Arc::clone(&running);
        move |k: u64| {
            running[k as usize].fetch_sub(1, Ordering::SeqCst);
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..2u64 {
            let c = c.clone();
            let (enter, leave) = (enter.clone(), leave.clone());
            let stop = Arc::clone(&stop);
            tasks.push(rt.spawn(async move {
                let mut rng = Rng(0x9e37_79b9 + i as u64 * 31 + t);
                while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                    let k = rng.below(KEYS);
                    let (enter, leave) = (enter.clone(), leave.clone());
                    c.get_with_async(k, async move {
                        enter(k);
                        tokio::time::sleep(Duration::from_millis(15)).await;
                        leave(k);
                        k
                    })
                    .await;
                    tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
                }
            }));
        }
    }
    let mut threads = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..2u64 {
            let c = c.clone();
            let (enter, leave) = (enter.clone(), leave.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 + i as u64 * 17 + t);
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    c.get_with(k, || {
                        enter(k);
                        std::thread::sleep(Duration::from_millis(15));
                        leave(k);
                        k
                    });
                    std::thread::sleep(Duration::from_millis(rng.below(3)));
                }
            }));
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    let fallbacks: u64 = fleet.iter().map(|c| c.stats().remote.lease_fallbacks).sum();
    let errors: u64 = fleet.iter().map(|c| c.stats().remote.errors).sum();
    let timeouts: u64 = fleet.iter().map(|c| c.stats().remote.timeouts).sum();
    eprintln!(
        "loads {} overlaps {} fallbacks {fallbacks} errors {errors} timeouts {timeouts}",
        loads.load(Ordering::SeqCst),
        overlaps.load(Ordering::SeqCst)
    );
    assert!(loads.load(Ordering::SeqCst) > 20, "the keys were reloaded");
    if errors + timeouts == 0 {
        assert_eq!(
            overlaps.load(Ordering::SeqCst),
            0,
            "two loads of one key overlapped in the fleet while Redis was up"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. invalidate_all racing inserts on the other instances
// ---------------------------------------------------------------------------------------------

/// Module docs: "an `insert` whose local copy lands after a newer write or invalidation of the
/// key (announced by another instance, or done on this one) or after an `invalidate_all` (done
/// here or announced) drops it, so concurrent writers converge on Redis's value." And: "after
/// `insert`, `invalidate`, `remove` or `invalidate_all` returns on any instance, Redis never
/// again yields an older value for the key, and the other instances drop their local copies
/// within the pub/sub delivery time." Instance 0 calls `invalidate_all` in a loop while
/// instances 1–3 insert (serialized, growing versions per key). Once all is quiet and the
/// messages delivered, every instance's local copy of a key is absent or Redis's value.
#[test]
fn invalidate_all_racing_inserts_on_other_instances_converges() {
    let _w = watchdog(
        LIMIT,
        "invalidate_all_racing_inserts_on_other_instances_converges",
    );
    let server = RedisServer::start();
    let ns = "ia";
    let fleet: Vec<TieredCache<u64, u64>> = (0..4)
        .map(|_| tier(&server, ns).build(builder(), Plain).unwrap())
        .collect();
    subscribed(&fleet);
    let be = Backend::new();
    let until = Instant::now() + Duration::from_millis(1200);
    let mut threads = Vec::new();
    {
        let c = fleet[0].clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(77);
            while Instant::now() < until {
                c.invalidate_all();
                std::thread::sleep(Duration::from_micros(rng.below(3000)));
            }
        }));
    }
    for (i, c) in fleet.iter().enumerate().skip(1) {
        for t in 0..2u64 {
            let c = c.clone();
            let be = Arc::clone(&be);
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(1000 + i as u64 * 7 + t);
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    match rng.below(4) {
                        0 => {
                            c.get_with(k, || be.read(k));
                        }
                        _ => {
                            let mut row = be.rows[k as usize].lock().unwrap();
                            *row += 1;
                            be.current[k as usize].store(*row, Ordering::SeqCst);
                            c.insert(k, *row);
                        }
                    }
                }
            }));
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    let mut conn = raw(&server);
    let mut bad = Vec::new();
    let ok = eventually(|| {
        bad.clear();
        for k in 0..KEYS {
            let r = redis_value(&mut conn, ns, k);
            for (i, c) in fleet.iter().enumerate() {
                if let Some(v) = c.get(&k) {
                    if Some(v) != r {
                        bad.push((i, k, v, r));
                    }
                }
            }
        }
        bad.is_empty()
    });
    assert!(
        ok,
        "local copies (instance, key, local, redis) differ from Redis: {bad:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A history with the server paused (DEBUG SLEEP) mid-way
// ---------------------------------------------------------------------------------------------

/// Writes and read-through loads on three instances (two threads each), with the server
/// frozen for 1.2 s (SIGSTOP: `DEBUG` is disabled in the test servers) in the middle, so that calls time out and the breaker
/// opens and closes while loads run.
///
/// Asserted, for the part of the history after the breaker closed again (the docs let the
/// tier skip Redis while it is open): on the instance that wrote a version, no read that
/// started after that write returned an older version ("An instance changes Redis first and
/// its local tier second, so it never reads back from Redis a value it has just invalidated";
/// "Redis never again yields an older value"). And at the end, after one more write of each
/// key on a healthy server, every instance converges on the last version: nothing the pause
/// left behind (a request answered late, a version remembered from a timed-out write, a
/// breaker stuck open) keeps an instance on an older value.
#[test]
fn a_history_across_a_server_pause_keeps_writer_order_and_converges() {
    let _w = watchdog(LIMIT, "a_history_across_a_server_pause");
    let server = RedisServer::start();
    let ns = "pause";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            RedisTier::new(server.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(50), Duration::from_millis(50))
                .breaker(3, Duration::from_millis(300))
                .lease(Duration::from_secs(2), Duration::from_millis(300))
                .build(builder(), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let be = Backend::new();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let t0 = Instant::now();
    let until = t0 + Duration::from_millis(3000);
    let mut threads = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..2u64 {
            let c = c.clone();
            let be = Arc::clone(&be);
            let events = Arc::clone(&events);
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(0xabc + i as u64 * 13 + t);
                let mut mine = Vec::new();
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    let start = Instant::now();
                    let op = match rng.below(3) {
                        0 => {
                            let mut row = be.rows[k as usize].lock().unwrap();
                            *row += 1;
                            be.current[k as usize].store(*row, Ordering::SeqCst);
                            c.insert(k, *row);
                            Op::Write(*row)
                        }
                        _ => Op::Read(c.get_with(k, || {
                            let v = be.read(k);
                            std::thread::sleep(Duration::from_millis(2));
                            v
                        })),
                    };
                    mine.push(Event {
                        inst: i,
                        key: k,
                        op,
                        start,
                        end: Instant::now(),
                    });
                }
                events.lock().unwrap().extend(mine);
            }));
        }
    }
    std::thread::sleep(Duration::from_millis(700));
    server.pause();
    std::thread::sleep(Duration::from_millis(1200));
    server.resume();
    let p1 = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    // After the server woke: the breaker's cooldown and a probe, with a wide margin.
    let healthy = p1 + Duration::from_millis(700);
    let events = events.lock().unwrap().clone();
    // Per (instance, key): its writes after the server was healthy again, by end time (the
    // writes of a key are serialized, so their versions grow in that order too).
    let mut writes: HashMap<(usize, u64), Vec<(Instant, u64)>> = HashMap::new();
    for w in &events {
        if let Op::Write(x) = w.op {
            if w.start >= healthy {
                writes.entry((w.inst, w.key)).or_default().push((w.end, x));
            }
        }
    }
    for ws in writes.values_mut() {
        ws.sort();
    }
    let mut stale = Vec::new();
    for r in &events {
        let Op::Read(y) = r.op else { continue };
        let Some(ws) = writes.get(&(r.inst, r.key)) else {
            continue;
        };
        let before = ws.partition_point(|&(end, _)| end < r.start);
        if before > 0 {
            let x = ws[before - 1].1;
            if y < x {
                stale.push((r.inst, r.key, x, y));
            }
        }
    }
    let opened: u64 = fleet.iter().map(|c| c.stats().remote.breaker_opened).sum();
    eprintln!(
        "events {} breaker openings {opened} stale-on-writer {}",
        events.len(),
        stale.len()
    );
    assert!(
        stale.is_empty(),
        "the writing instance read an older version after its write: (inst, key, wrote, read) {:?}",
        &stale[..stale.len().min(10)]
    );
    // One more write of each key, on a healthy server, from instance 0.
    assert!(eventually(|| fleet.iter().all(|c| !c.is_breaker_open())));
    subscribed(&fleet);
    for k in 0..KEYS {
        let mut row = be.rows[k as usize].lock().unwrap();
        *row += 1;
        be.current[k as usize].store(*row, Ordering::SeqCst);
        fleet[0].insert(k, *row);
    }
    let mut bad = Vec::new();
    let ok = eventually(|| {
        bad.clear();
        for k in 0..KEYS {
            let want = be.read(k);
            for (i, c) in fleet.iter().enumerate() {
                let got = c.get_with(k, || be.read(k));
                if got != want {
                    bad.push((i, k, got, want));
                }
            }
        }
        bad.is_empty()
    });
    assert!(
        ok,
        "instances did not converge (inst, key, got, want): {bad:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Async callers cancelled by tokio::time::timeout in leased loads
// ---------------------------------------------------------------------------------------------

/// `get_with_async` docs, "Cancel safety": "a lease this call took for the fleet is given back
/// if it is dropped before its load finishes — during a Redis round trip, after one delivered
/// its result but before the future was polled again (a `select!` whose other branch won, a
/// timeout firing then), or during the load." Two instances, many tokio tasks each, every call
/// wrapped in a `tokio::time::timeout` of a random 0–30 ms around a 0–40 ms load, on 3 keys
/// with a 20 s lease. Afterwards (the releases run on helper threads) no lease is left in
/// Redis, and a fresh leased load on each instance does not wait on any lease.
#[test]
fn async_callers_cancelled_by_timeouts_leave_no_lease() {
    let _w = watchdog(LIMIT, "async_callers_cancelled_by_timeouts_leave_no_lease");
    let server = RedisServer::start();
    let ns = "cancel";
    let fleet: Vec<TieredCache<u64, u64>> = (0..2)
        .map(|_| {
            tier(&server, ns)
                .ttl(Duration::from_millis(100))
                .lease(Duration::from_secs(20), Duration::from_secs(20))
                .build(builder().time_to_live(Duration::from_millis(50)), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    let cancelled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, c) in fleet.iter().enumerate() {
            for t in 0..8u64 {
                let c = c.clone();
                let cancelled = Arc::clone(&cancelled);
                let done = Arc::clone(&done);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x55 + i as u64 * 101 + t);
                    while Instant::now() < until {
                        let k = rng.below(3);
                        let load_ms = rng.below(40);
                        let limit = Duration::from_millis(rng.below(30));
                        let f = c.get_with_async(k, async move {
                            tokio::time::sleep(Duration::from_millis(load_ms)).await;
                            k
                        });
                        match tokio::time::timeout(limit, f).await {
                            Ok(v) => {
                                assert_eq!(v, k);
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(_) => {
                                cancelled.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    eprintln!(
        "done {} cancelled {}",
        done.load(Ordering::SeqCst),
        cancelled.load(Ordering::SeqCst)
    );
    let mut conn = raw(&server);
    let mut left = Vec::new();
    let ok = eventually(|| {
        left.clear();
        for k in 0..3 {
            let e: bool = redis::cmd("EXISTS")
                .arg(lkey(ns, k))
                .query(&mut conn)
                .unwrap();
            if e {
                left.push(k);
            }
        }
        left.is_empty()
    });
    assert!(
        ok,
        "leases left in Redis by cancelled callers: keys {left:?}"
    );
    // And a fresh load does not wait.
    for c in &fleet {
        for k in 0..3 {
            c.local().invalidate(&k);
            let t = Instant::now();
            let v = c.get_with(k, || k);
            assert_eq!(v, k);
            assert!(t.elapsed() < Duration::from_secs(2), "waited on a lease");
        }
    }
    drop(rt);
}

// ---------------------------------------------------------------------------------------------
// 5. Value codecs that fail
// ---------------------------------------------------------------------------------------------

/// Decimal `u64`, except: values ending in 7 cannot be encoded (an error), and values ending
/// in 9 cannot be decoded (an error, "written by another version of the type").
#[derive(Clone, Copy, Debug, Default)]
struct Picky;

impl Codec<u64> for Picky {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        if v % 10 == 7 {
            return Err("injected: cannot encode".into());
        }
        out.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        let v: u64 = std::str::from_utf8(b)?.parse()?;
        if v % 10 == 9 {
            return Err("injected: cannot decode".into());
        }
        Ok(v)
    }
}

/// `Codec::encode` docs: "When `value` cannot be encoded: a load's write-back is then
/// skipped, and an `insert` of it leaves a tombstone in Redis instead ..., so that no instance
/// reads an older value from there." And module docs: codec trouble "concerns one key only"
/// and must not open the breaker for every key (the oversized case is documented so; an
/// unencodable value is documented to be treated as it). A history of inserts (some values
/// unencodable) on two instances and loads on a third: once quiet, no instance holds an
/// older version than Redis's, none reads an older version than the last write through a
/// miss, and the breaker never opened.
#[test]
fn unencodable_values_in_a_fleet_history_never_resurrect_older_ones() {
    let _w = watchdog(LIMIT, "unencodable_values_in_a_fleet_history");
    let server = RedisServer::start();
    let ns = "picky";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            tier(&server, ns)
                .lease(Duration::from_secs(2), Duration::from_millis(500))
                .build(builder(), Picky)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let be = Backend::new();
    let until = Instant::now() + Duration::from_millis(1200);
    let mut threads = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..2u64 {
            let c = c.clone();
            let be = Arc::clone(&be);
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(0x777 + i as u64 * 3 + t);
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    if i < 2 && rng.below(2) == 0 {
                        let mut row = be.rows[k as usize].lock().unwrap();
                        *row += 1;
                        be.current[k as usize].store(*row, Ordering::SeqCst);
                        c.insert(k, *row);
                    } else {
                        c.get_with(k, || be.read(k));
                    }
                }
            }));
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    let opened: u64 = fleet.iter().map(|c| c.stats().remote.breaker_opened).sum();
    assert_eq!(opened, 0, "codec errors opened the breaker");
    // Quiet: every local copy is the last version, or absent (then a miss reads Redis, which
    // must not hold an older version than the last write either; a tombstone or an
    // undecodable value are misses and load the backend's current value).
    let mut bad = Vec::new();
    let ok = eventually(|| {
        bad.clear();
        for k in 0..KEYS {
            let want = be.read(k);
            for (i, c) in fleet.iter().enumerate() {
                let got = c.get_with(k, || be.read(k));
                if got != want {
                    bad.push((i, k, got, want));
                }
            }
        }
        bad.is_empty()
    });
    assert!(ok, "(inst, key, got, want): {bad:?}");
}

/// A value codec that panics when encoding values ending in 7 (user code panicking:
/// `get_with` docs "Panics: If `init` panics" — the codec's panic surfaces to the caller like
/// one of `init`). What a demanding user expects: a panicking codec in `insert` fails that
/// call, and leaves nothing behind — the instances keep serving and the key keeps converging
/// on later writes (no lock poisoned, no version stuck).
#[derive(Clone, Copy, Debug, Default)]
struct Bomb;

impl Codec<u64> for Bomb {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        assert!(v % 10 != 7, "injected: encode panics");
        out.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        Ok(std::str::from_utf8(b)?.parse()?)
    }
}

#[test]
fn a_panicking_codec_in_inserts_and_loads_leaves_the_fleet_consistent() {
    let _w = watchdog(LIMIT, "a_panicking_codec_in_inserts_and_loads");
    quiet_injected_panics();
    let server = RedisServer::start();
    let ns = "bomb";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            tier(&server, ns)
                .lease(Duration::from_secs(10), Duration::from_secs(3))
                .build(builder(), Bomb)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let be = Backend::new();
    let until = Instant::now() + Duration::from_millis(1000);
    let panics = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..2u64 {
            let c = c.clone();
            let be = Arc::clone(&be);
            let panics = Arc::clone(&panics);
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(0x4242 + i as u64 * 5 + t);
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if rng.below(2) == 0 {
                            let mut row = be.rows[k as usize]
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            *row += 1;
                            be.current[k as usize].store(*row, Ordering::SeqCst);
                            c.insert(k, *row);
                        } else {
                            c.get_with(k, || be.read(k));
                        }
                    }));
                    if r.is_err() {
                        panics.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    eprintln!("panics {}", panics.load(Ordering::SeqCst));
    // A last, encodable write of each key from instance 1; every instance converges on it,
    // quickly (a lease left behind by a panic would make a load wait its 3 s).
    let mut conn = raw(&server);
    for k in 0..KEYS {
        let mut row = be.rows[k as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *row += 1;
        if *row % 10 == 7 {
            *row += 1;
        }
        be.current[k as usize].store(*row, Ordering::SeqCst);
        fleet[1].insert(k, *row);
    }
    for k in 0..KEYS {
        assert_eq!(redis_value(&mut conn, ns, k), Some(be.read(k)));
    }
    let mut bad = Vec::new();
    let ok = eventually(|| {
        bad.clear();
        for k in 0..KEYS {
            let want = be.read(k);
            for (i, c) in fleet.iter().enumerate() {
                let t = Instant::now();
                let got = c.get_with(k, || be.read(k));
                if got != want || t.elapsed() > Duration::from_secs(1) {
                    bad.push((i, k, got, want, t.elapsed()));
                }
            }
        }
        bad.is_empty()
    });
    assert!(ok, "(inst, key, got, want, took): {bad:?}");
    let mut left = HashMap::new();
    for k in 0..KEYS {
        let e: bool = redis::cmd("EXISTS")
            .arg(lkey(ns, k))
            .query(&mut conn)
            .unwrap();
        left.insert(k, e);
    }
    assert!(left.values().all(|e| !e), "leases left: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. A server restarted mid-load
// ---------------------------------------------------------------------------------------------

/// Module docs: "`invalidate_all` first advances the namespace's epoch (values written back
/// by loads that read an older epoch are ignored), then tombstones every value", and "after
/// `insert`, `invalidate`, `remove` or `invalidate_all` returns on any instance, Redis never
/// again yields an older value for the key". Data loss is excluded only for writes the server
/// does not have ("the ordering guarantee above holds only for writes the new primary has");
/// here the `invalidate_all` is done on the restarted server, which has it.
///
/// History: three `invalidate_all`s (epoch 3); instance B starts a load of key 1 (it reads
/// epoch 3, no value); the server restarts empty (nothing persisted, as a failover to an empty
/// replica, or `FLUSHALL`); a fresh instance C calls `invalidate_all` on the new server (the
/// epoch is now 1) while B's subscriber is still reconnecting (so B does not hear it: a lost message, which
/// the docs allow); B's load ends and is written back. Expected: the value B loaded before the
/// `invalidate_all` is ignored by readers (it read epoch 3, but 3 is not older than the new
/// epoch 1). Observed: C reads B's pre-`invalidate_all` value from Redis.
///
/// Suspected cause: the epoch is a plain `INCR` counter (src/redis/tier.rs:891) that starts
/// again at 0 when the key is lost, and readers keep a written-back value whose epoch is
/// `>=` the current one (src/redis/tier.rs:394); versions were made "at least the server's
/// clock in microseconds" (src/redis/scripts.rs `next_version!`) for exactly this, the epoch
/// was not.
#[test]
fn s38_epoch_goes_back_after_a_restart_and_a_load_survives_invalidate_all() {
    let _w = watchdog(LIMIT, "bug_epoch_goes_back_after_a_restart");
    let mut server = RedisServer::start();
    let ns = "epoch";
    let mk = |server: &RedisServer| {
        tier(server, ns)
            .timeouts(Duration::from_millis(200), Duration::from_millis(200))
            .breaker(1000, Duration::from_millis(10))
            .build(builder(), Plain)
            .unwrap()
    };
    let a = mk(&server);
    let b = mk(&server);
    subscribed(&[a.clone(), b.clone()]);
    let mut observed = None;
    for attempt in 0..6u64 {
        let key = attempt + 1;
        for _ in 0..3 {
            a.invalidate_all();
        }
        let mut conn = raw(&server);
        let epoch: u64 = redis::cmd("GET")
            .arg(format!("hc:{}:{ns}:epoch", ns.len()))
            .query(&mut conn)
            .unwrap();
        assert!(epoch >= 3);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let loader = {
            let b = b.clone();
            std::thread::spawn(move || {
                b.get_with(key, move || {
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    100 // the value before the invalidate_all
                })
            })
        };
        started_rx.recv().unwrap();
        let heard_before = b.stats().remote.invalidations_received;
        server.restart();
        let c = mk(&server);
        let mut conn = raw(&server);
        // Until it reaches the new server (its first operation may meet nothing but a
        // connection being opened).
        let reached = eventually(|| {
            c.invalidate_all();
            redis::cmd("GET")
                .arg(format!("hc:{}:{ns}:epoch", ns.len()))
                .query::<Option<u64>>(&mut conn)
                .unwrap()
                .is_some()
        });
        assert!(reached);
        // B's pooled connections died with the old server: let B open new ones (a write of
        // another key, until it lands, and a few more), so that its write-back reaches Redis.
        let other = 1000 + key;
        assert!(eventually(|| {
            b.insert(other, 1);
            redis_value(&mut conn, ns, other) == Some(1)
        }));
        for _ in 0..4 {
            b.insert(other, 1);
        }
        go_tx.send(()).unwrap();
        assert_eq!(loader.join().unwrap(), 100);
        if b.stats().remote.invalidations_received != heard_before {
            // B heard the invalidate_all: its load was superseded; try again.
            eprintln!("attempt {attempt}: B heard the message");
            subscribed(&[a.clone(), b.clone()]);
            continue;
        }
        // Let the write-back land (after the value is returned for async; here before).
        std::thread::sleep(Duration::from_millis(50));
        let d: Option<String> = redis::cmd("HGET")
            .arg(vkey(ns, key))
            .arg("d")
            .query(&mut conn)
            .unwrap();
        let e: Option<String> = redis::cmd("HGET")
            .arg(vkey(ns, key))
            .arg("e")
            .query(&mut conn)
            .unwrap();
        let now: Option<u64> = redis::cmd("GET")
            .arg(format!("hc:{}:{ns}:epoch", ns.len()))
            .query(&mut conn)
            .unwrap();
        eprintln!(
            "attempt {attempt}: in Redis after the write-back: d {d:?}, e {e:?}; epoch before \
             the restart {epoch}, now {now:?}"
        );
        let got = c.get_with(key, || 200);
        observed = Some(got);
        break;
    }
    let got = observed.expect("B heard every invalidate_all: inconclusive");
    assert_eq!(
        got, 200,
        "a value loaded before invalidate_all (done on the restarted server) is read back from Redis"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. load_async (the builder's async_loader) cancelled mid-way, with leases
// ---------------------------------------------------------------------------------------------

/// Module docs, "Async loads": "`Cache::load_async` (with the builder's `async_loader`), async
/// refreshes, and `TieredCache::get_with_async` / `try_get_with_async` use the tier too", and
/// the cancel safety of `get_with_async`: "a lease this call took for the fleet is given back
/// if it is dropped before its load finishes". A demanding user expects `load_async` to be as
/// cancel safe as `get_with_async` (it is the same tier path). Two instances, tokio tasks
/// calling `load_async` under random `tokio::time::timeout`s, a 20 s lease; afterwards no lease
/// is left and a load on each instance does not wait.
#[test]
fn load_async_cancelled_by_timeouts_leaves_no_lease() {
    let _w = watchdog(LIMIT, "load_async_cancelled_by_timeouts_leaves_no_lease");
    let server = RedisServer::start();
    let ns = "lasync";
    let fleet: Vec<TieredCache<u64, u64>> = (0..2)
        .map(|_| {
            tier(&server, ns)
                .ttl(Duration::from_millis(100))
                .lease(Duration::from_secs(20), Duration::from_secs(20))
                .build(
                    builder()
                        .time_to_live(Duration::from_millis(50))
                        .async_loader(|k: &u64| {
                            let k = *k;
                            async move {
                                tokio::time::sleep(Duration::from_millis(k * 7 % 40)).await;
                                Ok::<u64, BoxError>(k)
                            }
                        })
                        .loader(|k: &u64| Ok::<u64, BoxError>(*k)),
                    Plain,
                )
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    let cancelled = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, c) in fleet.iter().enumerate() {
            for t in 0..8u64 {
                let c = c.clone();
                let cancelled = Arc::clone(&cancelled);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x99 + i as u64 * 101 + t);
                    while Instant::now() < until {
                        let k = 1 + rng.below(5);
                        let limit = Duration::from_millis(rng.below(30));
                        match tokio::time::timeout(limit, c.load_async(k)).await {
                            Ok(v) => assert_eq!(v.unwrap(), k),
                            Err(_) => {
                                cancelled.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    eprintln!("cancelled {}", cancelled.load(Ordering::SeqCst));
    let mut conn = raw(&server);
    let mut left = Vec::new();
    let ok = eventually(|| {
        left.clear();
        for k in 1..6 {
            let e: bool = redis::cmd("EXISTS")
                .arg(lkey(ns, k))
                .query(&mut conn)
                .unwrap();
            if e {
                left.push(k);
            }
        }
        left.is_empty()
    });
    assert!(
        ok,
        "leases left in Redis by cancelled load_async callers: keys {left:?}"
    );
    drop(rt);
}

// ---------------------------------------------------------------------------------------------
// 8. Latency bound while the server freezes mid-history
// ---------------------------------------------------------------------------------------------

/// Module docs: "Every Redis operation is bounded by one deadline: the connect timeout ...
/// plus the operation timeout", "a call pays for at most one failed operation", and "Beyond
/// its load, a call thus waits at most the lease wait, the Redis operations that succeed, and
/// one failed operation"; `insert`: "Blocks for the Redis write and publish (each bounded by
/// the operation timeout; skipped while the breaker is open)". Three instances (leases on,
/// 200 ms wait; 100 ms connect and 50 ms operation timeouts; 3-failure breaker), three threads
/// each doing reads (instant loads), inserts and invalidations, while the server is frozen
/// (SIGSTOP) for 1.5 s in the middle. Bound checked per call: lease wait + two failed
/// operations + 400 ms of slack for a loaded 2-core machine.
#[test]
fn every_call_is_bounded_while_the_server_freezes_mid_history() {
    let _w = watchdog(LIMIT, "every_call_is_bounded_while_the_server_freezes");
    let server = RedisServer::start();
    let ns = "freeze";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            RedisTier::new(server.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(100), Duration::from_millis(50))
                .lease(Duration::from_secs(2), Duration::from_millis(200))
                .build(builder().time_to_live(Duration::from_millis(30)), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let until = Instant::now() + Duration::from_millis(3000);
    type Worst = (Duration, &'static str, usize);
    let slowest: Arc<Mutex<Vec<Worst>>> = Arc::default();
    let mut threads = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..3u64 {
            let c = c.clone();
            let slowest = Arc::clone(&slowest);
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(0xf00 + i as u64 * 11 + t);
                let mut worst = (Duration::ZERO, "", i);
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    let start = Instant::now();
                    let what = match rng.below(6) {
                        0 => {
                            c.insert(k, rng.below(1000));
                            "insert"
                        }
                        1 => {
                            c.invalidate(&k);
                            "invalidate"
                        }
                        _ => {
                            c.get_with(k, || k);
                            "get_with"
                        }
                    };
                    let took = start.elapsed();
                    if took > worst.0 {
                        worst = (took, what, i);
                    }
                }
                slowest.lock().unwrap().push(worst);
            }));
        }
    }
    std::thread::sleep(Duration::from_millis(700));
    server.pause();
    std::thread::sleep(Duration::from_millis(1500));
    server.resume();
    for t in threads {
        t.join().unwrap();
    }
    let mut worst = slowest.lock().unwrap().clone();
    worst.sort();
    eprintln!("slowest calls: {worst:?}");
    let bound = Duration::from_millis(200 + 2 * 150 + 400);
    let (took, what, inst) = *worst.last().unwrap();
    assert!(
        took <= bound,
        "a {what} on instance {inst} took {took:?} (bound {bound:?})"
    );
}

/// The async twin of the bound above, with many callers at once: "each of their Redis round
/// trips ... runs on a helper thread (started on demand, at most 64 ...)" and "Beyond its
/// load, a call thus waits at most the lease wait, the Redis operations that succeed, and one
/// failed operation". 400 tokio tasks on distinct keys (no local single-flight between them)
/// on two instances call `get_with_async` while the server is frozen: the first failures open
/// the breaker, and no call should wait for the helper threads to work through the others'
/// timeouts in waves. Bound: lease wait + one failed operation (connect + operation timeout)
/// + 500 ms of slack.
#[test]
fn many_async_callers_are_bounded_while_the_server_is_frozen() {
    let _w = watchdog(
        LIMIT,
        "many_async_callers_are_bounded_while_the_server_is_frozen",
    );
    let server = RedisServer::start();
    let ns = "afreeze";
    let fleet: Vec<TieredCache<u64, u64>> = (0..2)
        .map(|_| {
            RedisTier::new(server.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(100), Duration::from_millis(50))
                .lease(Duration::from_secs(2), Duration::from_millis(200))
                .build(builder(), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    // Warm the helper threads and pooled connections.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        for c in &fleet {
            for k in 0..10u64 {
                c.get_with_async(100_000 + k, async move { k }).await;
            }
        }
    });
    server.pause();
    let worst = rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, c) in fleet.iter().enumerate() {
            for k in 0..200u64 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let start = Instant::now();
                    let v = c
                        .get_with_async(i as u64 * 1000 + k, async move { k })
                        .await;
                    assert_eq!(v, k);
                    start.elapsed()
                }));
            }
        }
        let mut worst = Duration::ZERO;
        for t in tasks {
            worst = worst.max(t.await.unwrap());
        }
        worst
    });
    server.resume();
    eprintln!("slowest async call while frozen: {worst:?}");
    let bound = Duration::from_millis(200 + 150 + 500);
    assert!(
        worst <= bound,
        "an async call took {worst:?} (bound {bound:?})"
    );
    drop(rt);
}

// ---------------------------------------------------------------------------------------------
// 9. An async history: tokio tasks on three instances
// ---------------------------------------------------------------------------------------------

/// As the sync history of tests/redis_fleet_history.rs, with tokio tasks and
/// `get_with_async` (whose write-back "happens after the value is returned"): on the instance
/// that wrote a version, no read that started after the write ended returns an older one
/// ("An instance changes Redis first and its local tier second"; "A load that a write or
/// invalidation of its key superseded ... is neither stored locally nor written back"); and
/// once quiet, every instance reads the last version.
#[test]
fn an_async_fleet_history_keeps_writer_order_and_converges() {
    let _w = watchdog(LIMIT, "an_async_fleet_history");
    let server = RedisServer::start();
    let ns = "ahist";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            tier(&server, ns)
                .lease(Duration::from_secs(2), Duration::from_millis(300))
                .build(builder().time_to_live(Duration::from_millis(40)), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let be = Backend::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, c) in fleet.iter().enumerate() {
            for t in 0..3u64 {
                let c = c.clone();
                let be = Arc::clone(&be);
                let events = Arc::clone(&events);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0xa5a5 + i as u64 * 19 + t);
                    let mut mine = Vec::new();
                    while Instant::now() < until {
                        let k = rng.below(KEYS);
                        let start = Instant::now();
                        let op = if rng.below(4) == 0 {
                            let mut row = be.rows[k as usize].lock().unwrap();
                            *row += 1;
                            be.current[k as usize].store(*row, Ordering::SeqCst);
                            c.insert(k, *row);
                            Op::Write(*row)
                        } else {
                            let be2 = Arc::clone(&be);
                            let delay = rng.below(4);
                            Op::Read(
                                c.get_with_async(k, async move {
                                    let v = be2.read(k);
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                    v
                                })
                                .await,
                            )
                        };
                        mine.push(Event {
                            inst: i,
                            key: k,
                            op,
                            start,
                            end: Instant::now(),
                        });
                        tokio::task::yield_now().await;
                    }
                    events.lock().unwrap().extend(mine);
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let events = events.lock().unwrap().clone();
    let mut writes: HashMap<(usize, u64), Vec<(Instant, u64)>> = HashMap::new();
    for w in &events {
        if let Op::Write(x) = w.op {
            writes.entry((w.inst, w.key)).or_default().push((w.end, x));
        }
    }
    for ws in writes.values_mut() {
        ws.sort();
    }
    let mut stale = Vec::new();
    for r in &events {
        let Op::Read(y) = r.op else { continue };
        let Some(ws) = writes.get(&(r.inst, r.key)) else {
            continue;
        };
        let before = ws.partition_point(|&(end, _)| end < r.start);
        if before > 0 && y < ws[before - 1].1 {
            stale.push((r.inst, r.key, ws[before - 1].1, y));
        }
    }
    eprintln!("events {} stale-on-writer {}", events.len(), stale.len());
    assert!(
        stale.is_empty(),
        "(inst, key, wrote, read later): {:?}",
        &stale[..stale.len().min(10)]
    );
    let mut bad = Vec::new();
    let ok = eventually(|| {
        bad.clear();
        for k in 0..KEYS {
            let want = be.read(k);
            for (i, c) in fleet.iter().enumerate() {
                let got = c.get_with(k, || be.read(k));
                if got != want {
                    bad.push((i, k, got, want));
                }
            }
        }
        bad.is_empty()
    });
    assert!(ok, "(inst, key, got, want): {bad:?}");
    drop(rt);
}

// ---------------------------------------------------------------------------------------------
// 10. A key codec that cannot encode some keys
// ---------------------------------------------------------------------------------------------

/// Decimal `u64` keys, except that keys from 1,000 up cannot be encoded (an error: say, a key
/// type some of whose values have no stable byte form).
#[derive(Clone, Copy, Debug, Default)]
struct SmallKeys;

impl Codec<u64> for SmallKeys {
    fn encode(&self, k: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        if *k >= 1000 {
            return Err("injected: key cannot be encoded".into());
        }
        out.extend_from_slice(k.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, b: &[u8]) -> Result<u64, BoxError> {
        Ok(std::str::from_utf8(b)?.parse()?)
    }
}

/// `TieredCache::insert`: "tells the other instances to drop their copies"; `invalidate`:
/// "tells the other instances to drop it"; module docs: "The guarantee: ... the other
/// instances drop their local copies within the pub/sub delivery time". Nothing in the docs
/// excepts keys the key codec cannot encode (`Codec` docs only say a *decode* error "never
/// fails a request"; the receiving side already drops everything on a key it cannot decode:
/// "A key we cannot decode ... could be any key: drop them all rather than keep a stale one").
/// Such a key is still cached locally by every instance (its loads bypass Redis), so a
/// demanding user expects `insert`/`invalidate` of it to reach the other instances (a
/// message, or a drop-everything one as the receiving side does).
///
/// Observed before stop 38: nothing is published; instance B kept serving its old copy (until
/// its local time to live, 600 s here).
///
/// Suspected cause: src/redis/tier.rs:852 (`invalidate`: `if let Some(vkey) =
/// self.value_key(...)`, else nothing) and src/redis/tier.rs:803 (`put`: `value_key(...)?`
/// returns `None`, and `TieredCache::insert` then only inserts locally, src/redis/mod.rs:835):
/// an unencodable key skips the announcement along with the Redis write.
#[test]
fn s38_insert_or_invalidate_of_an_unencodable_key_never_reaches_the_other_instances() {
    let _w = watchdog(LIMIT, "bug_unencodable_key_invalidation");
    let server = RedisServer::start();
    let ns = "keys";
    let mk = || {
        tier(&server, ns)
            .build_with(builder(), SmallKeys, Plain)
            .unwrap()
    };
    let (a, b) = (mk(), mk());
    subscribed(&[a.clone(), b.clone()]);
    // Messages arrive within milliseconds here: 1.5 s is plenty.
    let soon = |mut cond: Box<dyn FnMut() -> bool + '_>| {
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cond()
    };
    // Both paths, with a key that can be encoded first (the control).
    for key in [7u64, 7_000] {
        assert_eq!(b.get_with(key, || 1), 1);
        a.insert(key, 2);
        let after_insert = soon(Box::new(|| b.get(&key) != Some(1)));
        // Once B dropped its copy: key 7 is read through Redis (A's 2); key 7,000 cannot be
        // in Redis, so B loads it itself (3). Stop 38: A now announces a drop-every-copy
        // message for a key it cannot encode.
        let reread = match (after_insert, key) {
            (false, _) => 1,
            (true, 7) => 2,
            (true, _) => 3,
        };
        assert_eq!(b.get_with(key, || 3), reread);
        a.invalidate(&key);
        let after_invalidate = soon(Box::new(|| b.get(&key).is_none()));
        eprintln!(
            "key {key}: B dropped its copy after A's insert: {after_insert}, after A's \
             invalidate: {after_invalidate}"
        );
        assert!(
            after_insert && after_invalidate,
            "key {key}: instance B kept its copy after A's insert (dropped: {after_insert}) / \
             invalidate (dropped: {after_invalidate})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 11. A history across a server restart (data lost), with clear_on_reconnect
// ---------------------------------------------------------------------------------------------

/// Three instances with `clear_on_reconnect(true)` ("bounds this by the disconnection
/// instead, at the price of refilling the local tier (from Redis) after every reconnect"),
/// two threads each doing inserts, `invalidate_all`s and read-through loads, with the server
/// killed and restarted empty in the middle. After the run, one more write of each key on the
/// healthy server: every instance converges on it (nothing from before the restart — a
/// remembered version, a late write-back, a stale local copy — keeps an instance on an older
/// value).
#[test]
fn a_history_across_a_restart_converges_after_the_next_write() {
    let _w = watchdog(LIMIT, "a_history_across_a_restart");
    let mut server = RedisServer::start();
    let ns = "restart";
    let fleet: Vec<TieredCache<u64, u64>> = (0..3)
        .map(|_| {
            RedisTier::new(server.url())
                .namespace(ns)
                .timeouts(Duration::from_millis(100), Duration::from_millis(100))
                .breaker(3, Duration::from_millis(200))
                .clear_on_reconnect(true)
                .lease(Duration::from_secs(2), Duration::from_millis(300))
                .build(builder(), Plain)
                .unwrap()
        })
        .collect();
    subscribed(&fleet);
    let be = Backend::new();
    let until = Instant::now() + Duration::from_millis(2500);
    let mut threads = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        for t in 0..2u64 {
            let c = c.clone();
            let be = Arc::clone(&be);
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(0xbeef + i as u64 * 23 + t);
                while Instant::now() < until {
                    let k = rng.below(KEYS);
                    match rng.below(10) {
                        0 => c.invalidate_all(),
                        1..=3 => {
                            let mut row = be.rows[k as usize].lock().unwrap();
                            *row += 1;
                            be.current[k as usize].store(*row, Ordering::SeqCst);
                            c.insert(k, *row);
                        }
                        _ => {
                            c.get_with(k, || {
                                let v = be.read(k);
                                std::thread::sleep(Duration::from_millis(rng.below(5)));
                                v
                            });
                        }
                    }
                }
            }));
        }
    }
    std::thread::sleep(Duration::from_millis(900));
    server.restart();
    for t in threads {
        t.join().unwrap();
    }
    assert!(eventually(|| fleet.iter().all(|c| !c.is_breaker_open())));
    subscribed(&fleet);
    std::thread::sleep(Duration::from_millis(100));
    let mut before_final = Vec::new();
    for k in 0..KEYS {
        for (i, c) in fleet.iter().enumerate() {
            let got = c.get_with(k, || be.read(k));
            if got != be.read(k) {
                before_final.push((i, k, got, be.read(k)));
            }
        }
    }
    eprintln!("before the final writes, (inst, key, got, want): {before_final:?}");
    for k in 0..KEYS {
        let mut row = be.rows[k as usize].lock().unwrap();
        *row += 1;
        be.current[k as usize].store(*row, Ordering::SeqCst);
        fleet[2].insert(k, *row);
    }
    let mut bad = Vec::new();
    let ok = eventually(|| {
        bad.clear();
        for k in 0..KEYS {
            let want = be.read(k);
            for (i, c) in fleet.iter().enumerate() {
                let got = c.get_with(k, || be.read(k));
                if got != want {
                    bad.push((i, k, got, want));
                }
            }
        }
        bad.is_empty()
    });
    assert!(ok, "(inst, key, got, want): {bad:?}");
}
