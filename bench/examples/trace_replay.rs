//! Replays the cache traces in `../shared/traces/` relative to the repository (or the directory
//! `$HERDCACHE_TRACES` names) against herdcache, moka and quick_cache, side by side, and prints
//! a Markdown table of hit ratios. Without the traces it says where to get them and exits with
//! status 2.
//!
//! ```text
//! cargo run -p herdcache-bench --release --example trace_replay                 # every row, all three caches
//! cargo run -p herdcache-bench --release --example trace_replay -- --only herdcache loop gli
//! cargo run -p herdcache-bench --release --example trace_replay -- --sizing    # sizing accuracy
//! cargo run -p herdcache-bench --release --example trace_replay -- --lru       # EvictionPolicy::lru(), herdcache's and moka's
//! cargo run -p herdcache-bench --release --example trace_replay -- --sizing --no-stats
//! cargo run -p herdcache-bench --release --example trace_replay -- --only moka-sync
//! ```
//!
//! `--only moka-sync`: moka with `run_pending_tasks()` after each insert. moka admits and
//! evicts in batches (its maintenance runs after every 64 writes or so), and a key inserted
//! is readable until then: in this get-then-insert replay a moka of 200 entries holds up to
//! about 250 readable entries at a time, which lifts its figures on small caches (ps at 200,
//! sprite at 256; see BENCHMARKS.md). With the maintenance run at each insert, it keeps to its
//! capacity as herdcache and quick_cache do.
//!
//! `HERDCACHE_SHARDS=n` sets herdcache's shard count (default: the builder's), in the side-by-side
//! replay and in `--sizing`; `HERDCACHE_POLICY_TRACE=1` prints the configuration selector's totals per row.
//!
//! `--sizing`: for each row, herdcache with `track_sizing()` and `record_stats()` (whose read
//! and hit counts the curve's hot-key adjustment and its anchor use; `--no-stats`: without,
//! so without either) at the row's capacity, and herdcache
//! run at 0.25, 0.5, 2 and 4 × that capacity; prints the curve predicted by the first (over the
//! whole trace: `Sizing::points_since_start`) against the hit ratios actually measured, the 1 ×
//! prediction against the observed ratio (`Sizing::observed_since_start`: with statistics the
//! cache's own, the points anchored to it; without, the sampled requests'), and the errors.
//!
//! Each request is one key: `get`; on a miss, `insert` (unit weights). Decompression uses the
//! `zstd`, `gzip` and `xz` command-line tools. The ARC traces are by N. Megiddo and D. S. Modha,
//! "ARC: A Self-Tuning, Low Overhead Replacement Cache", USENIX FAST 2003.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// (file, capacity, best peer's hit % from the traces' README, for the "vs best peer" column).
const ROWS: &[(&str, u64, f64)] = &[
    ("arc/OLTP.lis.zst", 1000, 35.71),
    ("arc/OLTP.lis.zst", 2000, 43.73),
    ("arc/P3.lis.zst", 100_000, 40.66),
    ("arc/P3.lis.zst", 400_000, 76.14),
    ("arc/P6.lis.zst", 20_000, 17.55),
    ("arc/P6.lis.zst", 160_000, 84.39),
    ("lirs/gli.trace.gz", 1000, 51.06),
    ("lirs/gli.trace.gz", 1500, 53.43),
    ("lirs/ps.trace.gz", 200, 49.79),
    ("lirs/ps.trace.gz", 400, 55.41),
    ("lirs/sprite.trace.gz", 256, 57.66),
    ("lirs/sprite.trace.gz", 512, 78.94),
    ("lirs/multi2.trace.gz", 256, 40.47),
    ("lirs/multi2.trace.gz", 512, 50.57),
    ("lirs/loop.trace.gz", 768, 75.78),
    ("lirs/loop.trace.gz", 1000, 98.69),
    ("lirs/2_pools.trace.gz", 256, 50.76),
    ("caffeine-misc/scarab/scarab-recs.trace.xz", 25_000, 61.58),
    ("caffeine-misc/scarab/scarab-recs.trace.xz", 100_000, 75.91),
    ("caffeine-misc/cache2k/orm-busy.trace.xz", 1000, 78.78),
    ("caffeine-misc/cache2k/orm-busy.trace.xz", 5000, 85.81),
];

/// The "W-TinyLFU adaptive" column of the traces' README (a Caffeine-3-style policy).
const ADAPTIVE: &[f64] = &[
    40.17, 46.50, 39.92, 76.23, 17.21, 81.11, 41.60, 53.18, 47.20, 54.25, 55.72, 77.68, 39.53,
    49.47, 67.91, 92.13, 50.69, 59.57, 72.42, 73.99, 85.92,
];

fn decompress(path: &Path) -> Vec<u8> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        Some("xz") => "xz",
        other => panic!("unknown trace format {other:?}"),
    };
    let mut child = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let mut bytes = Vec::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut bytes)
        .expect("read trace");
    assert!(
        child.wait().expect("wait").success(),
        "{tool} failed on {path:?}"
    );
    bytes
}

fn load(path: &Path) -> Vec<u64> {
    let bytes = decompress(path);
    let name = path.to_string_lossy();
    if name.ends_with("scarab-recs.trace.xz") {
        return bytes
            .chunks_exact(8)
            .map(|c| i64::from_be_bytes(c.try_into().expect("8 bytes")) as u64)
            .collect();
    }
    if name.ends_with("orm-busy.trace.xz") {
        return bytes
            .chunks_exact(4)
            .map(|c| i32::from_be_bytes(c.try_into().expect("4 bytes")) as u32 as u64)
            .collect();
    }
    let text = String::from_utf8(bytes).expect("text trace");
    let mut keys = Vec::new();
    let arc = name.ends_with(".lis.zst");
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('*') {
            continue;
        }
        let mut f = line.split_whitespace();
        let start: u64 = f.next().and_then(|s| s.parse().ok()).expect("key");
        if arc {
            let n: u64 = f.next().and_then(|s| s.parse().ok()).expect("count");
            keys.extend(start..start + n);
        } else {
            keys.push(start);
        }
    }
    keys
}

fn replay(name: &str, keys: &[u64], cap: u64) -> f64 {
    let mut hits = 0u64;
    match name {
        "herdcache" | "herdcache-lru" => {
            let mut b = herdcache::Cache::builder().max_capacity(cap);
            if name == "herdcache-lru" {
                b = b.eviction_policy(herdcache::EvictionPolicy::lru());
            }
            if let Some(n) = std::env::var("HERDCACHE_SHARDS")
                .ok()
                .and_then(|s| s.parse().ok())
            {
                b = b.shards(n);
            }
            let c = b.build();
            for &k in keys {
                if c.get(&k).is_some() {
                    hits += 1;
                } else {
                    c.insert(k, k);
                }
            }
            if std::env::var_os("HERDCACHE_POLICY_TRACE").is_some() {
                if let Some(t) = c.policy_totals() {
                    eprintln!(
                        "{cap}: sampled {} real {:.2} % predicted {:.2} %, candidate {}, {} switches, {} actions, shadows {:?}",
                        t.samples,
                        100.0 * t.real_hits as f64 / t.samples.max(1) as f64,
                        100.0 * t.predicted_hits as f64 / t.samples.max(1) as f64,
                        t.candidate,
                        t.switches,
                        t.actions,
                        t.shadow_hits
                            .map(|h| (1000.0 * h as f64 / t.samples.max(1) as f64).round() / 10.0)
                    );
                }
            }
        }
        "moka-sync" => {
            let c = moka::sync::Cache::builder().max_capacity(cap).build();
            for &k in keys {
                if c.get(&k).is_some() {
                    hits += 1;
                } else {
                    c.insert(k, k);
                    c.run_pending_tasks();
                }
            }
        }
        "moka" | "moka-lru" => {
            let mut b = moka::sync::Cache::builder().max_capacity(cap);
            if name == "moka-lru" {
                b = b.eviction_policy(moka::policy::EvictionPolicy::lru());
            }
            let c = b.build();
            for &k in keys {
                if c.get(&k).is_some() {
                    hits += 1;
                } else {
                    c.insert(k, k);
                }
            }
        }
        "quick_cache" => {
            let c = quick_cache::sync::Cache::new(cap as usize);
            for &k in keys {
                if c.get(&k).is_some() {
                    hits += 1;
                } else {
                    c.insert(k, k);
                }
            }
        }
        other => panic!("unknown cache {other}"),
    }
    100.0 * hits as f64 / keys.len() as f64
}

/// The sizing curve's factors (numerator, denominator), as `Sizing::points` orders them.
const FACTORS: [(u64, u64); 5] = [(1, 4), (1, 2), (1, 1), (2, 1), (4, 1)];

/// Whether the tracked cache records statistics (`--sizing` without `--no-stats`): the sizing
/// curve's hot-key adjustment reads the read count from them.
static STATS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Replays `keys` through herdcache at `cap`; with `track` (and `record_stats` unless
/// `--no-stats`), also returns the sizing curve.
fn replay_sizing(keys: &[u64], cap: u64, track: bool) -> (f64, Option<herdcache::Sizing>) {
    let mut b = herdcache::Cache::builder().max_capacity(cap);
    if let Some(n) = std::env::var("HERDCACHE_SHARDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        b = b.shards(n);
    }
    if track {
        b = b.track_sizing();
        if STATS.load(std::sync::atomic::Ordering::Relaxed) {
            b = b.record_stats();
        }
    }
    let c = b.build();
    let mut hits = 0u64;
    for &k in keys {
        if c.get(&k).is_some() {
            hits += 1;
        } else {
            c.insert(k, k);
        }
    }
    if std::env::var_os("HERDCACHE_POLICY_TRACE").is_some() {
        if let Some(t) = c.policy_totals() {
            eprintln!(
                "{cap}: real {:.2} % predicted {:.2} %, candidate {}, {} switches, {} actions, shadows {:?}",
                100.0 * t.real_hits as f64 / t.samples.max(1) as f64,
                100.0 * t.predicted_hits as f64 / t.samples.max(1) as f64,
                t.candidate,
                t.switches,
                t.actions,
                t.shadow_hits
                    .map(|h| (1000.0 * h as f64 / t.samples.max(1) as f64).round() / 10.0)
            );
        }
    }
    (100.0 * hits as f64 / keys.len() as f64, c.sizing())
}

/// `--sizing`: the accuracy table.
fn sizing_table(rows: &[usize], traces: &HashMap<&str, Arc<Vec<u64>>>) {
    let jobs: Vec<(usize, usize)> = rows
        .iter()
        .flat_map(|&i| (0..FACTORS.len()).map(move |f| (i, f)))
        .collect();
    let jobs = Arc::new(Mutex::new(jobs.into_iter()));
    let results = Arc::new(Mutex::new(HashMap::new()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (jobs, results) = (&jobs, &results);
            s.spawn(move || loop {
                let Some((i, f)) = jobs.lock().unwrap().next() else {
                    break;
                };
                let (file, cap, _) = ROWS[i];
                let (num, den) = FACTORS[f];
                let r = replay_sizing(&traces[file], (cap * num / den).max(1), f == 2);
                results.lock().unwrap().insert((i, f), r);
            });
        }
    });
    let results = results.lock().unwrap();
    println!(
        "| trace | capacity | rate | 0.5×: actual | predicted | error | 2×: actual | predicted | error \
         | 1×: observed | predicted | error | 1× actual (all) | 0.25×: actual | predicted \
         | 4×: actual | predicted |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let (mut errs, mut ones, mut outer) = (Vec::new(), Vec::new(), Vec::new());
    for &i in rows {
        let (file, cap, _) = ROWS[i];
        let short = file.rsplit('/').next().unwrap_or(file);
        let sizing = results[&(i, 2)].1.as_ref().expect("tracked");
        let pred = |f: usize| 100.0 * sizing.points_since_start()[f].1;
        let actual = |f: usize| results[&(i, f)].0;
        let (e05, e2) = (pred(1) - actual(1), pred(3) - actual(3));
        let observed = 100.0 * sizing.observed_since_start();
        let e1 = pred(2) - observed;
        errs.extend([e05, e2]);
        ones.push(e1);
        outer.extend([pred(0) - actual(0), pred(4) - actual(4)]);
        println!(
            "| {short} | {cap} | {:.3} | {:.2} | {:.2} | {e05:+.2} | {:.2} | {:.2} | {e2:+.2} | {observed:.2} | {:.2} | {e1:+.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            sizing.rate(),
            actual(1),
            pred(1),
            actual(3),
            pred(3),
            pred(2),
            actual(2),
            actual(0),
            pred(0),
            actual(4),
            pred(4),
        );
    }
    let mae = |v: &[f64]| v.iter().map(|e| e.abs()).sum::<f64>() / v.len().max(1) as f64;
    let worst = |v: &[f64]| v.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    println!();
    println!(
        "0.5× and 2×: mean absolute error {:.2} points, worst {:.2} | 1× vs observed: mean {:.2}, worst {:.2} | 0.25× and 4× (not targeted): mean {:.2}, worst {:.2}",
        mae(&errs),
        worst(&errs),
        mae(&ones),
        worst(&ones),
        mae(&outer),
        worst(&outer)
    );
}

fn main() {
    let mut caches = vec!["herdcache", "moka", "quick_cache"];
    let mut filters = Vec::new();
    let mut sizing = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--sizing" {
            sizing = true;
        } else if a == "--no-stats" {
            STATS.store(false, std::sync::atomic::Ordering::Relaxed);
        } else if a == "--lru" {
            // Exact LRU, herdcache's against moka's (not counted as peers).
            caches = vec!["herdcache-lru", "moka-lru"];
        } else if a == "--only" {
            caches = vec![match args.next().as_deref() {
                Some("herdcache") => "herdcache",
                Some("moka") => "moka",
                Some("quick_cache") => "quick_cache",
                Some("herdcache-lru") => "herdcache-lru",
                Some("moka-lru") => "moka-lru",
                Some("moka-sync") => "moka-sync",
                other => {
                    eprintln!(
                        "trace_replay: --only takes herdcache, moka, moka-sync, quick_cache, herdcache-lru or moka-lru, not {other:?}"
                    );
                    std::process::exit(2);
                }
            }];
        } else {
            filters.push(a);
        }
    }
    // `../shared/traces` relative to the repository (this crate is the repository's `bench/`).
    let dir = std::env::var_os("HERDCACHE_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"));
    let rows: Vec<usize> = (0..ROWS.len())
        .filter(|&i| filters.is_empty() || filters.iter().any(|f| ROWS[i].0.contains(f.as_str())))
        .collect();
    let mut missing: Vec<&str> = rows
        .iter()
        .map(|&i| ROWS[i].0)
        .filter(|file| !dir.join(file).is_file())
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!(
            "trace_replay: no traces at {} (missing: {}).\n\
             Get the traces (arc/: the ARC traces of Megiddo and Modha; lirs/ and caffeine-misc/: \
             the LIRS, scarab and cache2k traces distributed with Caffeine's simulator) and put \
             them in ../shared/traces/ relative to the repository, or point $HERDCACHE_TRACES at \
             their directory.",
            dir.display(),
            missing.join(", ")
        );
        std::process::exit(2);
    }
    if rows.is_empty() {
        eprintln!("trace_replay: no row matches {filters:?}");
        std::process::exit(2);
    }

    // Load each trace once, then run (row, cache) jobs on all cores.
    let mut traces: HashMap<&str, Arc<Vec<u64>>> = HashMap::new();
    for &i in &rows {
        let file = ROWS[i].0;
        traces
            .entry(file)
            .or_insert_with(|| Arc::new(load(&dir.join(file))));
    }
    if sizing {
        sizing_table(&rows, &traces);
        return;
    }
    let jobs: Vec<(usize, &str)> = rows
        .iter()
        .flat_map(|&i| caches.iter().map(move |&c| (i, c)))
        .collect();
    let jobs = Arc::new(Mutex::new(jobs.into_iter()));
    let results = Arc::new(Mutex::new(HashMap::new()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (jobs, results, traces) = (&jobs, &results, &traces);
            s.spawn(move || loop {
                let Some((i, cache)) = jobs.lock().unwrap().next() else {
                    break;
                };
                let (file, cap, _) = ROWS[i];
                let r = replay(cache, &traces[file], cap);
                results.lock().unwrap().insert((i, cache), r);
            });
        }
    });
    let results = results.lock().unwrap();

    print!("| trace | capacity |");
    for c in &caches {
        print!(" {c} |");
    }
    println!(" best peer (README) | W-TinyLFU adaptive (README) | herdcache − best peer |");
    print!("|---|--:|");
    for _ in &caches {
        print!("--:|");
    }
    println!("--:|--:|--:|");
    let (mut sum_delta, mut sum_ours, mut sum_adaptive, mut worst) = (0.0, 0.0, 0.0, f64::MAX);
    for &i in &rows {
        let (file, cap, best_readme) = ROWS[i];
        let short = file.rsplit('/').next().unwrap_or(file);
        print!("| {short} | {cap} |");
        for c in &caches {
            print!(" {:.2} |", results[&(i, *c)]);
        }
        // The best peer: the README's best (which includes Caffeine, lru, mini-moka) or any peer
        // measured in this run, whichever is higher.
        let best = caches
            .iter()
            .filter(|c| ["moka", "quick_cache"].contains(*c))
            .map(|c| results[&(i, *c)])
            .fold(best_readme, f64::max);
        print!(" {best:.2} | {:.2} |", ADAPTIVE[i]);
        if let Some(ours) = results.get(&(i, "herdcache")) {
            let d = ours - best;
            sum_delta += d;
            sum_ours += ours;
            sum_adaptive += ADAPTIVE[i];
            worst = worst.min(d);
            println!(" {d:+.2} |");
        } else {
            println!(" |");
        }
    }
    if caches.contains(&"herdcache") {
        let n = rows.len() as f64;
        println!();
        println!(
            "herdcache mean {:.2} | W-TinyLFU adaptive mean {:.2} | mean (herdcache − best peer) {:+.2} | worst row {:+.2}",
            sum_ours / n,
            sum_adaptive / n,
            sum_delta / n,
            worst
        );
    }
}
