//! A fixed-count, single-thread workload for counting instructions per operation with and
//! without `track_sizing` (run it under `valgrind --tool=callgrind`; the figures are in
//! BENCHMARKS.md).
//!
//! ```text
//! cargo build -p herdcache-bench --release --example sizing_cost
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.plain target/release/examples/sizing_cost plain
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.tracked target/release/examples/sizing_cost tracked
//! ```
//!
//! 2,000,000 reads of keys drawn from 200,000 (a skewed mix: half from the 20,000 hottest),
//! inserting on a miss, in a cache of 100,000 entries; then prints the hit count. `hits` mode
//! is the hit path alone: 2,000,000 reads of 50,000 keys that all fit. An optional second
//! argument sets the capacity (default 100,000; the key counts scale with it), e.g. 1000 for
//! a cache at sampling rate 1, where every read is simulated. `HERDCACHE_SEED=n` fixes the
//! hash seed (see below): compare `plain` and `tracked` runs of the same seed. The time of the
//! operations is printed too, for alternated timing runs (`HERDCACHE_OPS=n`: n operations
//! instead of 2,000,000; see BENCHMARKS.md).

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let track = mode != "plain" && mode != "hits-plain";
    let cap: u64 = std::env::args()
        .nth(2)
        .map_or(100_000, |a| a.parse().expect("a capacity"));
    // `HERDCACHE_SEED=n`: hash with a fixed seed (the default hasher is seeded at random, and
    // the seed moves the policy's choices, so the whole program's count, by a few percent):
    // the same seed in `plain` and `tracked` runs the same cache, and the difference is the
    // tracker's alone.
    let seed: Option<u64> = std::env::var("HERDCACHE_SEED")
        .ok()
        .map(|s| s.parse().expect("a seed"));
    let hasher = match seed {
        Some(s) => ahash::RandomState::with_seeds(s, s ^ 0x5eed, s.rotate_left(17), !s),
        None => ahash::RandomState::new(),
    };
    let mut b = herdcache::Cache::<u64, u64>::builder()
        .max_capacity(cap)
        .hasher(hasher);
    if track {
        b = b.track_sizing();
    }
    let c = b.build();
    let hits_only = mode.starts_with("hits");
    if hits_only {
        for k in 0..cap / 2 {
            c.insert(k, k);
        }
    }
    let t0 = std::time::Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut hits = 0u64;
    let ops: u64 = std::env::var("HERDCACHE_OPS")
        .ok()
        .map_or(2_000_000, |s| s.parse().expect("an operation count"));
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = if hits_only {
            x % (cap / 2)
        } else if x & 1 == 0 {
            (x >> 1) % (cap / 5)
        } else {
            (x >> 1) % (cap * 2)
        };
        if c.get(&k).is_some() {
            hits += 1;
        } else {
            c.insert(k, k);
        }
    }
    let took = t0.elapsed();
    println!(
        "{mode}: {hits} hits, sizing {:?}, {:.1} ms",
        c.sizing().map(|s| s.points()[2]),
        took.as_secs_f64() * 1e3
    );
}
