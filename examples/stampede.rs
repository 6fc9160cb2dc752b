//! The outage, replayed: thousands of hot keys filled at the same moment expire at the same
//! moment, and every request queues on a CPU-bound backend at once.
//!
//! ```text
//! cargo run --release --example stampede              # about 20 s; writes target/release/stampede.svg
//! cargo run --release --example stampede -- 3         # 3-second runs instead of 6
//! cargo run --release --example stampede -- --svg chart.svg   # the chart goes to chart.svg
//! ```
//!
//! The chart is written next to the build's output (the `target/release/` this binary runs
//! from), or where `--svg PATH` says; never into the repository's tracked files.
//!
//! The backend simulates a service with 4 cores: a call costs 1 ms of CPU, so with `n` calls in
//! progress each takes `max(1, n / 4)` ms. 2,000 hot keys are filled at once with a 2-second
//! time to live; then 16 client threads read random hot keys for the run's duration. Three
//! configurations:
//!
//! 1. **no coalescing**: `get`, and on a miss call the backend and `insert`;
//! 2. **single-flight**: `get_with` (one load per key, but every key expires together);
//! 3. **protected**: `load` with a loader, `refresh_after(1 s)` against the hard 2 s TTL,
//!    `jitter(0.2)`, `max_concurrent_loads(4)` and a spawner (a small thread pool), so
//!    refreshes run in the background.
//!
//! For each it prints backend calls per 100 ms, the peak number of backend calls at once,
//! caller latency percentiles and the share of calls that waited on the backend (took 1 ms or
//! more), counted from when the clients start (after the warm-up fill), and it draws backend
//! calls over time for the three in an SVG chart. Each client pauses 200 µs between requests.

#[path = "support/pool.rs"]
mod support;
use herdcache::{BoxError, Cache};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::pool;

const KEYS: u64 = 2_000;
const CLIENTS: usize = 16;
const TTL: Duration = Duration::from_secs(2);
const CPU_PER_CALL: Duration = Duration::from_millis(1);
const CORES: usize = 4;
const BUCKET: Duration = Duration::from_millis(100);
const PAUSE: Duration = Duration::from_micros(200);

/// The simulated backend: counts calls per 100 ms (from when the clients start; earlier calls
/// are the warm-up) and the calls in progress.
struct Backend {
    base: Instant,
    /// Nanoseconds after `base` at which the clients started (`u64::MAX` during warm-up).
    clients_from: AtomicU64,
    warm_up_calls: AtomicU64,
    in_progress: AtomicUsize,
    peak: AtomicUsize,
    per_bucket: Vec<AtomicU64>,
}

impl Backend {
    fn new(run: Duration) -> Arc<Self> {
        let buckets = (run.as_millis() / BUCKET.as_millis()) as usize + 2;
        Arc::new(Backend {
            base: Instant::now(),
            clients_from: AtomicU64::new(u64::MAX),
            warm_up_calls: AtomicU64::new(0),
            in_progress: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            per_bucket: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn call(&self, key: u64) -> u64 {
        let n = self.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        let now = self.base.elapsed().as_nanos() as u64;
        match now.checked_sub(self.clients_from.load(Ordering::Relaxed)) {
            Some(t) => {
                let b = (t / BUCKET.as_nanos() as u64) as usize;
                if let Some(c) = self.per_bucket.get(b) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.warm_up_calls.fetch_add(1, Ordering::Relaxed);
            }
        }
        // CPU-bound: n calls share CORES cores.
        std::thread::sleep(CPU_PER_CALL.mul_f64((n as f64 / CORES as f64).max(1.0)));
        self.in_progress.fetch_sub(1, Ordering::SeqCst);
        key * 10
    }
}

struct Report {
    name: &'static str,
    stats: herdcache::CacheStats,
    warm_up_calls: u64,
    warm_up_peak: usize,
    timeline: Vec<u64>,
    peak: usize,
    latencies_us: Vec<u64>,
    calls: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn run(name: &'static str, duration: Duration) -> Report {
    let backend = Backend::new(duration + Duration::from_secs(1));
    let b = backend.clone();
    let protected = name == "protected";
    let mut builder = Cache::<u64, u64>::builder()
        .max_capacity(10_000)
        .record_stats()
        .time_to_live(TTL)
        .loader(move |k: &u64| Ok::<_, BoxError>(b.call(*k)));
    if protected {
        builder = builder
            .refresh_after(TTL / 2)
            .jitter(0.2)
            .max_concurrent_loads(CORES)
            .spawner(pool(8));
    }
    let cache = builder.build();
    let get = |k: u64| -> u64 {
        match name {
            "no coalescing" => cache.get(&k).unwrap_or_else(|| {
                let v = backend.call(k);
                cache.insert(k, v);
                v
            }),
            "single-flight" => cache.get_with(k, || backend.call(k)),
            _ => cache.load(k).expect("the loader does not fail"),
        }
    };
    // Fill every hot key at the same moment (in parallel, as a deploy's warm-up would).
    std::thread::scope(|s| {
        for t in 0..CLIENTS as u64 {
            s.spawn(move || {
                for k in (t..KEYS).step_by(CLIENTS) {
                    get(k);
                }
            });
        }
    });
    let warm_up_calls = backend.warm_up_calls.load(Ordering::Relaxed);
    let warm_up_peak = backend.peak.swap(0, Ordering::SeqCst);
    backend
        .clients_from
        .store(backend.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    let stop = AtomicBool::new(false);
    let mut latencies_us = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS as u64)
            .map(|t| {
                let (stop, get) = (&stop, &get);
                s.spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let t0 = Instant::now();
                        let v = get(x % KEYS);
                        lat.push(t0.elapsed().as_micros() as u64);
                        assert_eq!(v, x % KEYS * 10);
                        // A client sends about 4,000 requests a second, not as many as it can.
                        std::thread::sleep(PAUSE);
                    }
                    lat
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            latencies_us.extend(h.join().expect("client"));
        }
    });
    latencies_us.sort_unstable();
    let stats = cache.stats();
    let timeline: Vec<u64> = backend
        .per_bucket
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    Report {
        name,
        stats,
        warm_up_calls,
        warm_up_peak,
        calls: timeline.iter().sum(),
        timeline,
        peak: backend.peak.load(Ordering::SeqCst),
        latencies_us,
    }
}

fn svg(reports: &[Report]) -> String {
    let (w, h, left, bottom) = (900.0, 340.0, 60.0, 60.0);
    let n = reports.iter().map(|r| r.timeline.len()).max().unwrap_or(1) as f64;
    let max = reports
        .iter()
        .flat_map(|r| r.timeline.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let colors = ["#d62728", "#ff7f0e", "#2ca02c"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Backend calls per 100 ms (2,000 hot keys, TTL 2 s, 16 clients)</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"30\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">time (s)</text>\n\
         <text x=\"12\" y=\"34\">{max}</text><text x=\"40\" y=\"{}\">0</text>\n",
        w / 2.0,
        h - bottom,
        w - 10.0,
        h - bottom,
        h - bottom,
        w - 10.0,
        h - bottom + 30.0,
        h - bottom
    );
    for s in 0..=(n as usize / 10) {
        let x = left + (s as f64 * 10.0) / n * (w - left - 10.0);
        out += &format!(
            "<text x=\"{x:.0}\" y=\"{}\" text-anchor=\"middle\">{s}</text>\n",
            h - bottom + 15.0
        );
    }
    for (i, r) in reports.iter().enumerate() {
        let points: Vec<String> = r
            .timeline
            .iter()
            .enumerate()
            .map(|(j, &c)| {
                let x = left + j as f64 / n * (w - left - 10.0);
                let y = h - bottom - c as f64 / max * (h - bottom - 30.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{}\">{} (peak {} at once)</text>\n",
            colors[i % 3],
            points.join(" "),
            left + 220.0 * i as f64,
            h - 8.0,
            colors[i % 3],
            r.name,
            r.peak
        );
    }
    out + "</svg>\n"
}

/// Where the chart goes by default: the profile directory of the build this binary is part of
/// (`target/release/` for `cargo run --release --example stampede`), else the current directory.
fn default_svg_path() -> std::path::PathBuf {
    let profile_dir = std::env::current_exe().ok().and_then(|exe| {
        // target/release/examples/stampede -> target/release
        let dir = exe.parent()?;
        let dir = if dir.file_name()? == "examples" {
            dir.parent()?
        } else {
            dir
        };
        Some(dir.to_path_buf())
    });
    profile_dir
        .unwrap_or_else(|| std::path::PathBuf::from("."))
        .join("stampede.svg")
}

fn usage(msg: &str) -> ! {
    eprintln!("stampede: {msg}\nusage: stampede [SECONDS] [--svg PATH]");
    std::process::exit(2);
}

fn main() {
    let mut secs: u64 = 6;
    let mut svg_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--svg" {
            match args.next() {
                Some(p) => svg_path = Some(std::path::PathBuf::from(p)),
                None => usage("--svg needs a path"),
            }
        } else {
            match a.parse() {
                Ok(n) if n >= 1 => secs = n,
                _ => usage(&format!("not a number of seconds (at least 1): {a:?}")),
            }
        }
    }
    let svg_path = svg_path.unwrap_or_else(default_svg_path);
    let duration = Duration::from_secs(secs);
    let reports: Vec<Report> = ["no coalescing", "single-flight", "protected"]
        .into_iter()
        .map(|name| run(name, duration))
        .collect();
    for r in &reports {
        let waited = r.latencies_us.iter().filter(|&&us| us >= 1000).count();
        println!("== {}", r.name);
        println!(
            "warm-up: {} backend calls, peak {} at once",
            r.warm_up_calls, r.warm_up_peak
        );
        println!(
            "backend calls per 100 ms: {}",
            r.timeline
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "backend calls {} | peak backend concurrency {} | caller latency p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, max {:.3} ms | {} calls, {:.2} % waited on the backend",
            r.calls,
            r.peak,
            percentile(&r.latencies_us, 0.5),
            percentile(&r.latencies_us, 0.99),
            percentile(&r.latencies_us, 0.999),
            *r.latencies_us.last().unwrap_or(&0) as f64 / 1000.0,
            r.latencies_us.len(),
            100.0 * waited as f64 / r.latencies_us.len().max(1) as f64
        );
        let s = &r.stats;
        println!(
            "stats(): hits {} misses {} (hit ratio {:.4}) | loads {} ok, {} failed, average {:.2} ms | coalesced {} | refreshes started {} succeeded {} failed {} | stale served {} | loads waited for the limit {} | expired {}",
            s.hits,
            s.misses,
            s.hit_ratio(),
            s.load_successes,
            s.load_failures,
            s.average_load_time().as_secs_f64() * 1e3,
            s.coalesced,
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed,
            s.stale_served,
            s.loads_waited_for_limit,
            s.expired.count
        );
    }
    let written = match svg_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir),
        None => Ok(()),
    }
    .and_then(|()| std::fs::write(&svg_path, svg(&reports)));
    if let Err(e) = written {
        eprintln!(
            "stampede: cannot write the chart to {}: {e}",
            svg_path.display()
        );
        std::process::exit(1);
    }
    println!("chart: {}", svg_path.display());
}
