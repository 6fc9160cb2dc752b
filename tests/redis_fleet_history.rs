//! Fleet history check (issue 12): four instances on one `redis-server`, two threads each, run
//! a random mix of `insert`, `invalidate`, `load` (read-through, with fleet leases), `get` and
//! refreshes (each instance's `ManualClock` is moved past `refresh_after` now and then, so
//! that the next reads of its entries refresh them through Redis) on four hot keys for a
//! bounded time, against a backend whose versions only grow. Every
//! operation's start and end are recorded; afterwards each read is checked against the writes.
//!
//! # The rule
//!
//! The backend's writes of one key are serialized (a per-key lock around "bump the version,
//! then tell the cache": the usual write path of a database row followed by a cache call), so
//! versions and write completion order agree. A read of key `k` that returned version `x` is
//! *stale* if the write of version `x + 1` ended before the read started; its *staleness* is
//! how long before: the time the fleet kept serving `x` after `x + 1` was written.
//!
//! * On the instance that wrote `x + 1` (or any later version), no read is stale: it changes
//!   Redis first and its local tier second (asserted).
//! * On the other instances a read can be stale until the invalidation message arrives (the
//!   pub/sub delay): measured and printed per instance (count, p99, max), not asserted.
//! * Once the run is over and the messages delivered, every instance reads the final version
//!   of every key, from its local tier and through Redis (asserted).
//!
//! Bounded: `HERDCACHE_FLEET_SECS` seconds (default 3).
#![cfg(feature = "redis")]

mod common;
use herdcache_testkit::redis_server;

use common::{eventually, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, ManualClock};
use redis_server::RedisServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INSTANCES: usize = 4;
const THREADS_PER_INSTANCE: usize = 2;
const KEYS: u64 = 4;

struct Backend {
    versions: Vec<AtomicU64>,
    /// Serializes the writes of each key (bump, then the cache call).
    writing: Vec<Mutex<()>>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Write,
    Read,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    kind: Kind,
    instance: usize,
    key: u64,
    /// The version written, or read.
    version: u64,
    start: u64,
    end: u64,
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn fleet_history_no_instance_serves_an_older_value_than_a_completed_write() {
    let secs: u64 = std::env::var("HERDCACHE_FLEET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let _w = watchdog(Duration::from_secs(secs + 120), "fleet history");
    let server = RedisServer::start();
    let backend = Arc::new(Backend {
        versions: (0..KEYS).map(|_| AtomicU64::new(1)).collect(),
        writing: (0..KEYS).map(|_| Mutex::new(())).collect(),
    });
    let clocks: Vec<ManualClock> = (0..INSTANCES).map(|_| ManualClock::new()).collect();
    let instances: Vec<TieredCache<u64, u64>> = (0..INSTANCES)
        .map(|i| {
            let b = Arc::clone(&backend);
            RedisTier::new(server.url())
                .namespace("fleet")
                .lease(Duration::from_secs(5), Duration::from_millis(200))
                .timeouts(Duration::from_secs(1), Duration::from_secs(1))
                .build(
                    Cache::builder()
                        .max_capacity(1_000)
                        .time_to_live(Duration::from_secs(600))
                        .refresh_after(Duration::from_secs(10))
                        .clock(clocks[i].clone())
                        .loader(move |k: &u64| {
                            let v = b.versions[*k as usize].load(Ordering::SeqCst);
                            // Widen the window between reading the backend and storing.
                            if v % 3 == 0 {
                                std::thread::sleep(Duration::from_micros(300));
                            }
                            Ok::<_, BoxError>(v)
                        }),
                    Plain,
                )
                .unwrap()
        })
        .collect();
    assert!(eventually(|| instances.iter().all(|i| i.is_subscribed())));
    let origin = Instant::now();
    let now = move || u64::try_from(origin.elapsed().as_nanos()).unwrap();
    let until = Duration::from_secs(secs);
    let advances = AtomicU64::new(0);
    let events: Vec<Event> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..INSTANCES * THREADS_PER_INSTANCE)
            .map(|t| {
                let instance = t % INSTANCES;
                let cache = instances[instance].clone();
                let clock = clocks[instance].clone();
                let (backend, advances) = (&backend, &advances);
                s.spawn(move || {
                    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) * 0x1234_5678);
                    let mut events = Vec::new();
                    while origin.elapsed() < until {
                        let r = rng(&mut seed);
                        let key = r % KEYS;
                        let op = (r >> 8) % 100;
                        if op >= 97 {
                            // Every entry of this instance is due for a refresh (and after
                            // 55 of these, expired).
                            clock.advance(Duration::from_secs(11));
                            advances.fetch_add(1, Ordering::Relaxed);
                        } else if op < 20 {
                            let _w = backend.writing[key as usize].lock().unwrap();
                            let start = now();
                            let version =
                                backend.versions[key as usize].fetch_add(1, Ordering::SeqCst) + 1;
                            if op < 10 {
                                cache.insert(key, version);
                            } else {
                                cache.invalidate(&key);
                            }
                            let end = now();
                            events.push(Event {
                                kind: Kind::Write,
                                instance,
                                key,
                                version,
                                start,
                                end,
                            });
                        } else {
                            let start = now();
                            let got = if op < 70 {
                                Some(cache.load(key).unwrap())
                            } else {
                                cache.get(&key)
                            };
                            let end = now();
                            if let Some(version) = got {
                                events.push(Event {
                                    kind: Kind::Read,
                                    instance,
                                    key,
                                    version,
                                    start,
                                    end,
                                });
                            }
                        }
                    }
                    events
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });

    // The write of each (key, version).
    let mut writes = std::collections::HashMap::new();
    for e in events.iter().filter(|e| matches!(e.kind, Kind::Write)) {
        writes.insert((e.key, e.version), *e);
    }
    let mut staleness: Vec<Vec<u64>> = vec![Vec::new(); INSTANCES];
    let mut reads = [0usize; INSTANCES];
    let mut own_stale = Vec::new();
    for r in events.iter().filter(|e| matches!(e.kind, Kind::Read)) {
        reads[r.instance] += 1;
        let Some(next) = writes.get(&(r.key, r.version + 1)) else {
            continue; // the newest version: not stale
        };
        if next.end >= r.start {
            continue; // the newer write had not ended when the read began
        }
        staleness[r.instance].push(r.start - next.end);
        // Any newer write by the reading instance that ended before the read began?
        let own = writes.values().any(|w| {
            w.key == r.key && w.version > r.version && w.instance == r.instance && w.end < r.start
        });
        if own {
            own_stale.push(*r);
        }
    }
    let total_reads: usize = reads.iter().sum();
    let total_writes = writes.len();
    let mut all: Vec<u64> = staleness.iter().flatten().copied().collect();
    all.sort_unstable();
    println!(
        "fleet history: {INSTANCES} instances x {THREADS_PER_INSTANCE} threads, {KEYS} keys, \
         {secs} s: {} ops ({total_writes} writes, {total_reads} reads, {} refresh rounds), {} \
         stale reads \
         ({:.3} %), staleness p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        events.len(),
        advances.load(Ordering::Relaxed),
        all.len(),
        100.0 * all.len() as f64 / total_reads.max(1) as f64,
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.99)),
        ms(all.last().copied().unwrap_or(0)),
    );
    for (i, s) in staleness.iter_mut().enumerate() {
        s.sort_unstable();
        println!(
            "  instance {i}: {} reads, {} stale, p99 {:.3} ms, max {:.3} ms",
            reads[i],
            s.len(),
            ms(percentile(s, 0.99)),
            ms(s.last().copied().unwrap_or(0)),
        );
    }
    assert!(
        own_stale.is_empty(),
        "{} reads older than their own instance's completed write, e.g. {:?}",
        own_stale.len(),
        own_stale.first()
    );
    assert!(total_writes > 0 && total_reads > 0);

    // Quiescence: every instance converges on the final versions, locally and through Redis.
    for k in 0..KEYS {
        let last = backend.versions[k as usize].load(Ordering::SeqCst);
        for (i, cache) in instances.iter().enumerate() {
            assert!(
                eventually(|| cache.get(&k).is_none_or(|v| v == last)),
                "instance {i} kept version {:?} of key {k}, final {last}",
                cache.get(&k)
            );
            cache.local().invalidate(&k);
            assert_eq!(
                cache.load(k).unwrap(),
                last,
                "instance {i}, key {k}, via Redis"
            );
        }
    }
}
