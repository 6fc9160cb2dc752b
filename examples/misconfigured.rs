//! A misconfigured cache, diagnosed by `Cache::health` and its sizing curve, then configured
//! as its warnings advise.
//!
//! ```text
//! cargo run --release --example misconfigured     # about 8 s
//! ```
//!
//! 64 client threads read keys drawn uniformly from a working set of 150; a load takes 60 ms
//! (a slow backend, simulated by a sleep). Run 1 replays the configuration of the outage: a
//! cache of 50 entries (far below the working set) with a 200 ms time to live (below 4 loads),
//! no jitter, no refresh, with the sizing curve tracked. Its warnings fire: the cache is
//! thrashing (the advice quotes the predicted hit ratio at 2× and 4× the capacity) and the
//! time to live is shorter than the loads. Run 2 follows their advice: the capacity the sizing
//! curve suggests (`Sizing::suggested_capacity`, not the working set, which a real operator
//! does not know), a 5 s time to live refreshed after 2.5 s, with jitter, and enough refresh
//! threads (64) for 60 ms loads. Its health is clean (the program exits with an error if it
//! is not, or if the curve suggests no capacity).

#[path = "support/pool.rs"]
mod support;
use herdcache::{BoxError, Cache};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::pool;

const WORKING_SET: u64 = 150;
const CLIENTS: u64 = 64;
const LOAD: Duration = Duration::from_millis(60);
const RUN: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(200);

fn run(title: &str, cache: &Cache<u64, u64>, calls: &AtomicU64) -> BTreeMap<&'static str, String> {
    let stop = AtomicBool::new(false);
    let seen: Mutex<BTreeMap<&'static str, String>> = Mutex::default();
    let start = Instant::now();
    let mut latencies: Vec<u64> = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(POLL);
                let t = start.elapsed().as_secs_f64();
                for w in cache.health_over(RUN).warnings() {
                    seen.lock()
                        .unwrap()
                        .entry(w.kind())
                        .or_insert_with(|| format!("at {t:.1} s: {w}"));
                }
            }
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (t + 1);
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = x % WORKING_SET;
                        let t0 = Instant::now();
                        assert_eq!(cache.load(k).expect("the loader does not fail"), k + 1);
                        lat.push(t0.elapsed().as_micros() as u64);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    lat
                })
            })
            .collect();
        std::thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect()
    });
    latencies.sort_unstable();
    let p99 = latencies[(latencies.len() - 1) * 99 / 100] as f64 / 1e3;
    let s = cache.stats();
    println!("== {title}");
    println!(
        "{} reads, hit ratio {:.1} %, {} backend calls, p99 {p99:.1} ms, {} evictions for size",
        latencies.len(),
        s.hit_ratio() * 100.0,
        calls.load(Ordering::Relaxed),
        s.size.count
    );
    let seen = seen.into_inner().unwrap();
    if seen.is_empty() {
        println!("health: clean");
    }
    for (kind, advice) in &seen {
        println!("health: {kind} {advice}");
    }
    seen
}

fn main() {
    let calls = Arc::new(AtomicU64::new(0));
    let backend = {
        let calls = Arc::clone(&calls);
        move |k: &u64| {
            calls.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(LOAD);
            Ok::<_, BoxError>(k + 1)
        }
    };
    let as_configured: Cache<u64, u64> = Cache::builder()
        .max_capacity(50)
        .time_to_live(Duration::from_millis(200))
        .record_stats()
        .track_sizing()
        .loader(backend.clone())
        .build();
    let warnings = run(
        "as configured: 50 entries, TTL 200 ms",
        &as_configured,
        &calls,
    );
    let sizing = as_configured.sizing().expect("tracked");
    let curve: Vec<String> = sizing
        .points()
        .iter()
        .map(|(c, r)| format!("{c}: {:.0} %", r * 100.0))
        .collect();
    println!(
        "sizing curve (predicted hit ratio by capacity; {:.0} % observed): {}",
        sizing.observed() * 100.0,
        curve.join(", ")
    );
    let Some(capacity) = sizing.suggested_capacity() else {
        eprintln!("misconfigured: the sizing curve suggests no capacity");
        std::process::exit(1);
    };
    calls.store(0, Ordering::Relaxed);
    let advised: Cache<u64, u64> = Cache::builder()
        .max_capacity(capacity)
        .time_to_live(Duration::from_secs(5))
        .refresh_after(Duration::from_millis(2500))
        .jitter(0.2)
        .spawner(pool(64)) // refreshes of 60 ms loads: 4 threads would not keep up
        .record_stats()
        .loader(backend)
        .build();
    let after = run(
        &format!(
            "as advised: {capacity} entries (the sizing curve's suggestion), TTL 5 s, refresh \
             after 2.5 s, jitter 0.2"
        ),
        &advised,
        &calls,
    );
    if warnings.is_empty() || !after.is_empty() {
        eprintln!("misconfigured: expected warnings for the first run and none for the second");
        std::process::exit(1);
    }
}
