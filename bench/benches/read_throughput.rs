//! Throughput of herdcache, moka and quick_cache side by side, on 1 and 2 threads.
//!
//! ```text
//! cargo bench -p herdcache-bench --bench read_throughput             # every mix, 7 alternating rounds
//! cargo bench -p herdcache-bench --bench read_throughput -- 3        # 3 rounds (quicker, noisier)
//! HERDCACHE_BENCH_KEYS=1000 cargo bench -p herdcache-bench --bench read_throughput -- 3
//! HERDCACHE_BENCH_MIXES=50,0 cargo bench -p herdcache-bench --bench read_throughput -- 5  # some mixes
//! ```
//!
//! Workload: keys drawn from a Zipf distribution (s = 1.0) over 100,000 keys; every cache has a
//! capacity of 100,000 and is prefilled with every key, so reads hit and writes replace. Mixes:
//! 100 %, 95 %, 75 %, 50 % and 0 % reads (the rest inserts). Each trial runs ~250 ms; caches are
//! alternated within each round so that machine noise hits them alike; the table shows the
//! median over rounds in Mops/s and the ratio to quick_cache. "herdcache+stats" is herdcache
//! with `record_stats()`, to measure what statistics cost, and "herdcache+sizing" with
//! `track_sizing()`. criterion's one-thread loop does
//! not fit a multi-threaded, alternating comparison, hence this small harness.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// The keys, and every cache's capacity: 100,000, or `HERDCACHE_BENCH_KEYS` (e.g. 1000 for a
/// small cache, where herdcache's policy selector samples every read).
fn keys() -> u64 {
    static K: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        std::env::var("HERDCACHE_BENCH_KEYS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000)
    })
}
const SAMPLES: usize = 1 << 20;
const TRIAL: Duration = Duration::from_millis(250);

/// Zipf(s = 1) samples over 0..keys() by inverse CDF, from a fixed-seed xorshift.
fn zipf_samples() -> Arc<Vec<u64>> {
    let mut cdf = Vec::with_capacity(keys() as usize);
    let mut sum = 0.0;
    for i in 1..=keys() {
        sum += 1.0 / i as f64;
        cdf.push(sum);
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let samples = (0..SAMPLES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64 * sum;
            // Scatter ranks over the key space so hot keys do not share shards by construction.
            (cdf.partition_point(|&c| c < u) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys()
        })
        .collect();
    Arc::new(samples)
}

trait Bench: Send + Sync + 'static {
    fn get(&self, k: u64) -> Option<u64>;
    fn insert(&self, k: u64, v: u64);
}

impl Bench for herdcache::Cache<u64, u64> {
    #[inline]
    fn get(&self, k: u64) -> Option<u64> {
        herdcache::Cache::get(self, &k)
    }
    #[inline]
    fn insert(&self, k: u64, v: u64) {
        herdcache::Cache::insert(self, k, v)
    }
}

impl Bench for moka::sync::Cache<u64, u64> {
    #[inline]
    fn get(&self, k: u64) -> Option<u64> {
        moka::sync::Cache::get(self, &k)
    }
    #[inline]
    fn insert(&self, k: u64, v: u64) {
        moka::sync::Cache::insert(self, k, v)
    }
}

impl Bench for quick_cache::sync::Cache<u64, u64> {
    #[inline]
    fn get(&self, k: u64) -> Option<u64> {
        quick_cache::sync::Cache::get(self, &k)
    }
    #[inline]
    fn insert(&self, k: u64, v: u64) {
        quick_cache::sync::Cache::insert(self, k, v)
    }
}

fn make(name: &str) -> Arc<dyn Bench> {
    let c: Arc<dyn Bench> = match name {
        "herdcache" => Arc::new(herdcache::Cache::<u64, u64>::new(keys())),
        "herdcache+ttl" => Arc::new(
            herdcache::Cache::<u64, u64>::builder()
                .max_capacity(keys())
                .time_to_live(Duration::from_secs(3600))
                .build(),
        ),
        "herdcache+stats" => Arc::new(
            herdcache::Cache::<u64, u64>::builder()
                .max_capacity(keys())
                .record_stats()
                .build(),
        ),
        "herdcache+sizing" => Arc::new(
            herdcache::Cache::<u64, u64>::builder()
                .max_capacity(keys())
                .track_sizing()
                .build(),
        ),
        "moka" => Arc::new(moka::sync::Cache::<u64, u64>::new(keys())),
        "quick_cache" => Arc::new(quick_cache::sync::Cache::<u64, u64>::new(keys() as usize)),
        _ => unreachable!(),
    };
    for k in 0..keys() {
        c.insert(k, k);
    }
    c
}

/// Runs one trial; returns Mops/s.
fn trial(cache: &Arc<dyn Bench>, samples: &Arc<Vec<u64>>, threads: usize, read_pct: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, samples, stop, ops, barrier) = (
                cache.clone(),
                samples.clone(),
                stop.clone(),
                ops.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                let mut i = t * (SAMPLES / 2);
                let mut n = 0u64;
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1024 {
                        let k = samples[i & (SAMPLES - 1)];
                        i += 1;
                        if (k ^ i as u64) % 100 < read_pct {
                            black_box(cache.get(k));
                        } else {
                            cache.insert(k, i as u64);
                        }
                    }
                    n += 1024;
                }
                ops.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(TRIAL);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("bench thread");
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);
    let samples = zipf_samples();
    let names = [
        "herdcache",
        "herdcache+ttl",
        "quick_cache",
        "moka",
        "herdcache+stats",
        "herdcache+sizing",
    ];
    let caches: Vec<_> = names.iter().map(|n| make(n)).collect();
    println!("| reads | threads | herdcache | herdcache + TTL | quick_cache | moka | herdcache / quick_cache | herdcache+TTL / quick_cache | herdcache / moka | with stats / without | with sizing / without |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mixes: Vec<u64> = std::env::var("HERDCACHE_BENCH_MIXES").map_or_else(
        |_| vec![100, 95, 75, 50, 0],
        |s| {
            s.split(',')
                .map(|m| {
                    m.trim()
                        .parse()
                        .expect("HERDCACHE_BENCH_MIXES: read percents")
                })
                .collect()
        },
    );
    for read_pct in mixes {
        for threads in [1, 2] {
            let mut results = vec![Vec::new(); names.len()];
            for round in 0..rounds {
                // Alternate the order each round.
                for j in 0..names.len() {
                    let i = if round % 2 == 0 {
                        j
                    } else {
                        names.len() - 1 - j
                    };
                    results[i].push(trial(&caches[i], &samples, threads, read_pct));
                }
            }
            let m: Vec<f64> = results.into_iter().map(median).collect();
            println!(
                "| {read_pct} % | {threads} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× | {:.1}× | {:.3}× | {:.3}× |",
                m[0],
                m[1],
                m[2],
                m[3],
                m[0] / m[2],
                m[1] / m[2],
                m[0] / m[3],
                m[4] / m[0],
                m[5] / m[0]
            );
        }
    }
}
