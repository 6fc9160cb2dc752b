//! A fleet of instances in front of one slow backend, with and without the Redis second tier.
//!
//! ```text
//! cargo run --release --features redis --example fleet            # about 30 s
//! cargo run --release --features redis --example fleet -- 8 2     # 8 instances, 2-second runs
//! ```
//!
//! It starts its own `redis-server` on a free loopback port (Debian: `apt-get install
//! redis-server`), then runs `N` cache instances (default 4; each its own [`Cache`] or
//! [`TieredCache`], sharing nothing but Redis) with 4 client threads each. Clients read random
//! keys out of 500, pausing 100 µs between calls; the local time to live is 1 s and a backend
//! call takes 5 ms. All instances start cold at the same moment (a deploy).
//!
//! Part 1 prints backend loads per key per TTL period in four modes: local caches only (each
//! instance loads every key: about `N`), with the second tier (instances read each other's
//! loads from Redis; concurrent misses still race), with fleet-wide leases (about 1), and with
//! leases and refresh-ahead at half the TTL on a pool of 4 threads (one instance refreshes
//! each key for the fleet, about 2 per TTL, and callers stop waiting on expiries).
//!
//! Part 2 runs the tier with leases and default timeouts through an outage: Redis up, killed,
//! restarted, frozen (SIGSTOP: connections hang as with a partition), resumed. For each phase
//! it prints caller latency, errors returned to callers, and the tier's counters.

#[path = "support/pool.rs"]
mod support;
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, CacheStats, LoadError};
use herdcache_testkit::redis_server::RedisServer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::pool;

const KEYS: u64 = 500;
const CLIENTS: usize = 4;
const TTL: Duration = Duration::from_secs(1);
const BACKEND: Duration = Duration::from_millis(5);
const PAUSE: Duration = Duration::from_micros(100);

struct Backend {
    calls: Vec<AtomicU64>,
}

impl Backend {
    fn new() -> Arc<Self> {
        Arc::new(Backend {
            calls: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        })
    }
    fn load(&self, k: u64) -> u64 {
        std::thread::sleep(BACKEND);
        self.calls[k as usize].fetch_add(1, Ordering::Relaxed);
        k * 10
    }
    fn total(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
    fn max_per_key(&self) -> u64 {
        let max = self.calls.iter().map(|c| c.load(Ordering::Relaxed));
        max.max().unwrap_or(0)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Local,
    Tier,
    Leases,
    Refresh,
}

enum Instance {
    Local(Cache<u64, u64>),
    Tiered(TieredCache<u64, u64>),
}

impl Instance {
    fn new(mode: Mode, url: &str, ns: &str, backend: &Arc<Backend>) -> Instance {
        let b = Arc::clone(backend);
        let builder = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(TTL)
            .record_stats()
            .loader(move |k: &u64| Ok::<_, BoxError>(b.load(*k)));
        let tier = RedisTier::new(url).namespace(ns);
        match mode {
            Mode::Local => Instance::Local(builder.build()),
            Mode::Tier => Instance::Tiered(tier.build(builder, Plain).expect("valid URL")),
            Mode::Leases => Instance::Tiered(
                tier.lease(Duration::from_secs(1), Duration::from_millis(500))
                    .build(builder, Plain)
                    .expect("valid URL"),
            ),
            Mode::Refresh => Instance::Tiered(
                tier.lease(Duration::from_secs(1), Duration::from_millis(500))
                    .build(builder.refresh_after(TTL / 2).spawner(pool(4)), Plain)
                    .expect("valid URL"),
            ),
        }
    }
    fn load(&self, k: u64) -> Result<u64, LoadError> {
        match self {
            Instance::Local(c) => c.load(k),
            Instance::Tiered(c) => c.load(k),
        }
    }
    fn stats(&self) -> CacheStats {
        match self {
            Instance::Local(c) => c.stats(),
            Instance::Tiered(c) => c.stats(),
        }
    }
}

/// What the clients saw during one run.
#[derive(Default)]
struct Seen {
    calls: u64,
    errors: u64,
    /// Caller latencies in µs.
    micros: Vec<u32>,
}

impl Seen {
    fn merge(&mut self, o: Seen) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.micros.extend(o.micros);
    }
    fn pct(&mut self, p: f64) -> f64 {
        self.micros.sort_unstable();
        if self.micros.is_empty() {
            return 0.0;
        }
        let i = ((self.micros.len() as f64 * p) as usize).min(self.micros.len() - 1);
        f64::from(self.micros[i]) / 1000.0
    }
    fn line(&mut self) -> String {
        let (p50, p99, p999, max) = (
            self.pct(0.5),
            self.pct(0.99),
            self.pct(0.999),
            self.pct(1.0),
        );
        format!(
            "calls {:>7} | errors {} | latency ms p50 {p50:.3} p99 {p99:.3} p99.9 {p999:.3} \
             max {max:.3}",
            self.calls, self.errors
        )
    }
}

/// Runs every instance's clients for `secs`.
fn drive(instances: &[Instance], secs: Duration) -> Seen {
    let stop = AtomicBool::new(false);
    let mut seen = Seen::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = instances
            .iter()
            .enumerate()
            .flat_map(|(i, inst)| (0..CLIENTS).map(move |c| (i * CLIENTS + c, inst)))
            .map(|(id, inst)| {
                let stop = &stop;
                s.spawn(move || {
                    let mut x =
                        0x9E37_79B9_7F4A_7C15u64 ^ ((id as u64 + 1) * 0xBF58_476D_1CE4_E5B9);
                    let mut out = Seen::default();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let t = Instant::now();
                        match inst.load(x % KEYS) {
                            Ok(v) => assert_eq!(v, x % KEYS * 10),
                            Err(_) => out.errors += 1,
                        }
                        out.micros
                            .push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        out.calls += 1;
                        std::thread::sleep(PAUSE);
                    }
                    out
                })
            })
            .collect();
        std::thread::sleep(secs);
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            seen.merge(h.join().expect("client panicked"));
        }
    });
    seen
}

fn remote(instances: &[Instance]) -> herdcache::RemoteStats {
    let all = instances.iter().map(|i| i.stats().remote);
    all.fold(herdcache::RemoteStats::default(), |a, b| a + b)
}

fn describe(r: &herdcache::RemoteStats) -> String {
    format!(
        "tier: hits {} misses {} writes {} errors {} timeouts {} skipped {} breaker opened {} | \
         leases {} waits {} (answered {}, fell back {})",
        r.hits,
        r.misses,
        r.writes,
        r.errors,
        r.timeouts,
        r.skipped,
        r.breaker_opened,
        r.leases_acquired,
        r.lease_waits,
        r.lease_wait_hits,
        r.lease_fallbacks
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(4);
    let secs = Duration::from_secs(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4));
    let mut server = RedisServer::start();
    let url = server.url();
    println!(
        "{n} instances × {CLIENTS} clients, {KEYS} keys, local TTL {TTL:?}, backend call \
         {BACKEND:?}, {secs:?} per run, redis-server on port {}",
        server.port
    );

    println!("\n## Backend loads per key, all instances starting cold\n");
    println!(
        "| mode | backend loads | loads per key per TTL | max loads of one key | caller p99 ms |"
    );
    println!("|---|--:|--:|--:|--:|");
    let periods = secs.as_secs_f64() / TTL.as_secs_f64();
    for (name, mode) in [
        ("local caches only", Mode::Local),
        ("+ Redis tier", Mode::Tier),
        ("+ Redis tier + leases", Mode::Leases),
        ("+ leases + refresh_after(TTL/2)", Mode::Refresh),
    ] {
        let backend = Backend::new();
        let ns = format!("fleet-{}", name.len());
        let instances: Vec<_> = (0..n)
            .map(|_| Instance::new(mode, &url, &ns, &backend))
            .collect();
        let mut seen = drive(&instances, secs);
        assert_eq!(seen.errors, 0);
        let loads = backend.total();
        println!(
            "| {name} | {loads} | {:.2} | {} | {:.3} |",
            loads as f64 / KEYS as f64 / periods,
            backend.max_per_key(),
            seen.pct(0.99)
        );
        if mode != Mode::Local {
            println!("|  | {} | | | |", describe(&remote(&instances)));
        }
    }

    println!("\n## Redis failing (tier + leases, default timeouts and breaker)\n");
    let backend = Backend::new();
    let instances: Vec<_> = (0..n)
        .map(|_| Instance::new(Mode::Leases, &url, "fleet-outage", &backend))
        .collect();
    let phase = secs.div_f64(2.0).max(Duration::from_secs(1));
    let mut last = remote(&instances);
    let mut run = |label: &str| {
        let before = backend.total();
        let mut seen = drive(&instances, phase);
        let now = remote(&instances);
        assert_eq!(
            seen.errors, 0,
            "{label}: Redis failing must never fail a request"
        );
        println!(
            "- {label}: {} | backend loads {}\n  {}",
            seen.line(),
            backend.total() - before,
            describe(&(now - last))
        );
        last = now;
    };
    run("Redis up");
    server.stop();
    run("Redis killed");
    server.restart();
    run("Redis restarted");
    server.pause();
    run("Redis frozen (SIGSTOP)");
    server.resume();
    run("Redis resumed");
}
