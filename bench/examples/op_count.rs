//! A fixed number of operations on one thread, for counting instructions per operation with
//! callgrind (medians of wall-clock throughput move ±5 % on a shared machine; instruction
//! counts do not).
//!
//! ```text
//! cargo build -p herdcache-bench --release --example op_count
//! valgrind --tool=callgrind --toggle-collect='op_count::run*' \
//!     target/release/examples/op_count herdcache 75 1000000
//! ```
//!
//! Arguments: the cache (`herdcache`, `herdcache-ttl`, `herdcache-stats` with `record_stats`,
//! `herdcache-sizing` with `track_sizing`, `herdcache-lru` with `EvictionPolicy::lru()`, `quick_cache`), the share of reads in
//! percent (the rest are inserts of present keys), the number of operations and, optionally,
//! the number of keys, which is also the capacity (default 100,000). Keys as in the
//! `read_throughput` bench: Zipf (s = 1) over the keys, every key present. Callgrind's
//! instruction total divided by the operation count is the figure. `HERDCACHE_SHARDS=n` sets
//! herdcache's shard count (default: the builder's).

use std::hint::black_box;
use std::time::Duration;

fn zipf_samples(n: usize, keys: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(keys as usize);
    let mut sum = 0.0;
    for i in 1..=keys {
        sum += 1.0 / i as f64;
        cdf.push(sum);
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64 * sum;
            (cdf.partition_point(|&c| c < u) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys
        })
        .collect()
}

#[inline(never)]
fn run_herdcache(c: &herdcache::Cache<u64, u64>, keys: &[u64], reads: usize) {
    for (i, &k) in keys.iter().enumerate() {
        if i % 100 < reads {
            black_box(c.get(&k));
        } else {
            c.insert(k, k);
        }
    }
}

#[inline(never)]
fn run_quick_cache(c: &quick_cache::sync::Cache<u64, u64>, keys: &[u64], reads: usize) {
    for (i, &k) in keys.iter().enumerate() {
        if i % 100 < reads {
            black_box(c.get(&k));
        } else {
            c.insert(k, k);
        }
    }
}

/// With `TIMEIT` set, prints the run's nanoseconds per operation to stderr (a rough figure for
/// comparing builds on one machine; the instruction count is the measurement).
fn report_time(cache: &str, start: std::time::Instant, ops: usize) {
    if std::env::var_os("TIMEIT").is_some() {
        let ns = start.elapsed().as_nanos() as f64 / ops as f64;
        eprintln!("{cache} {ns:.2} ns/op");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: op_count herdcache|herdcache-ttl|herdcache-stats|herdcache-sizing|herdcache-lru|quick_cache READ_PERCENT OPS [KEYS]";
    let cache = args.first().expect(usage).as_str();
    let reads: usize = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let ops: usize = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let n: u64 = args.get(3).map_or(100_000, |s| s.parse().expect(usage));
    let keys = zipf_samples(ops, n);
    match cache {
        "herdcache" | "herdcache-ttl" | "herdcache-stats" | "herdcache-sizing"
        | "herdcache-lru" => {
            let mut b = herdcache::Cache::builder().max_capacity(n);
            if let Some(n) = std::env::var("HERDCACHE_SHARDS")
                .ok()
                .and_then(|s| s.parse().ok())
            {
                b = b.shards(n);
            }
            if cache == "herdcache-ttl" {
                b = b.time_to_live(Duration::from_secs(3600));
            }
            if cache == "herdcache-stats" {
                b = b.record_stats();
            }
            if cache == "herdcache-sizing" {
                b = b.track_sizing();
            }
            if cache == "herdcache-lru" {
                b = b.eviction_policy(herdcache::EvictionPolicy::lru());
            }
            let c = b.build();
            for k in 0..n {
                c.insert(k, k);
            }
            let t = std::time::Instant::now();
            run_herdcache(&c, &keys, reads);
            report_time(cache, t, keys.len());
        }
        "quick_cache" => {
            let c = quick_cache::sync::Cache::new(n as usize);
            for k in 0..n {
                c.insert(k, k);
            }
            let t = std::time::Instant::now();
            run_quick_cache(&c, &keys, reads);
            report_time(cache, t, keys.len());
        }
        other => panic!("{usage} (not {other})"),
    }
}
