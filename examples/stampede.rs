//! The outage, replayed: a thousand hot keys filled at the same moment expire at the same
//! moment, every request queues on a backend with a few workers, the gateway's deadline passes:
//! 504s. Then the backend goes down for a few seconds.
//!
//! ```text
//! cargo run --release --example stampede              # about 55 s; writes target/release/stampede.svg
//! cargo run --release --example stampede -- 8         # 8-second runs instead of 12 (at least 8)
//! cargo run --release --example stampede -- --svg chart.svg   # the chart goes to chart.svg
//! cargo run --release --example stampede -- --check   # exits 1 unless the story holds
//! ```
//!
//! `--check`: the unprotected configurations got 504s from the expiry wave (before the outage),
//! the protected ones none at all, and fail-safe no error. The figures depend on the machine's
//! timing (real threads, real sleeps), so this is a demonstration, not a test.
//!
//! The chart is written next to the build's output (the `target/release/` this binary runs
//! from), or where `--svg PATH` says; never into the repository's tracked files.
//!
//! **The backend** has 8 workers; a call holds one for 5 ms, and calls beyond 8 queue for a
//! worker, so its latency grows with its queue. From half of the run (or 1.5 time-to-lives, if
//! later) to nine tenths it is *down*: a call fails (after 1.25 ms of a worker's time). **The
//! clients** are 200 threads behind a gateway; a request reads 8 random keys of 1,000 hot ones,
//! then the client pauses 20 ms. The gateway answers **504** when a request takes more than
//! 250 ms, and an error when a read failed. The hot keys are filled at once (a deploy's warm-up
//! from one bulk query) with a 4 s time to live; then the clients run. Four configurations:
//!
//! 1. **no coalescing**: `get`, and on a miss call the backend and `insert`;
//! 2. **single-flight**: `try_get_with` (one load per key, but every key expires together);
//! 3. **protected**: `load` with a loader, `refresh_after(2 s)` against the 4 s time to
//!    live, `jitter(0.2)`, `max_concurrent_loads(4)`, a 20 ms soft timeout and a spawner (a
//!    small thread pool) for refreshes and loads;
//! 4. **protected + fail-safe**: the same with `fail_safe(60 s)`: when a load fails, the last
//!    value is served (retried once per 0.5 s backoff).
//!
//! For each it prints requests answered, 504s and errors (before, during and after the
//! outage), backend calls and utilisation, the p99 per 100 ms, and the health warnings
//! (`Cache::health`, polled every 100 ms over a 2 s window) that fired, and when — against
//! when the backend first saturated —, and the sizing curve (`track_sizing`: the hit ratio
//! predicted at 0.25 to 4 × the capacity; here flat: the outage is not for want of room, and
//! the curve says so). The chart shows p99 latency and backend utilisation over
//! time for the four.

#[path = "support/pool.rs"]
mod support;
use herdcache::{BoxError, Cache, LoadError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use support::pool;

const KEYS: u64 = 1_000;
const CLIENTS: usize = 200;
const READS: usize = 8;
const THINK: Duration = Duration::from_millis(20);
const TTL: Duration = Duration::from_secs(4);
const WORKERS: usize = 8;
const SERVICE: Duration = Duration::from_millis(5);
const DEADLINE: Duration = Duration::from_millis(250);
const BUCKET: Duration = Duration::from_millis(100);
/// The health window and how often the demo asks.
const HEALTH_WINDOW: Duration = Duration::from_secs(2);
const MODES: [&str; 4] = [
    "no coalescing",
    "single-flight",
    "protected",
    "protected + fail-safe",
];

/// The simulated backend: `WORKERS` workers and a queue in front of them.
struct Backend {
    base: Instant,
    /// Nanoseconds after `base` at which the clients started (`u64::MAX` during warm-up).
    clients_from: AtomicU64,
    free: Mutex<usize>,
    freed: Condvar,
    down: AtomicBool,
    /// Per 100 ms from the clients' start: calls, and workers' busy nanoseconds.
    calls: Vec<AtomicU64>,
    busy: Vec<AtomicU64>,
    queued: AtomicUsize,
    peak_queue: AtomicUsize,
}

impl Backend {
    fn new(run: Duration) -> Arc<Self> {
        let buckets = (run.as_millis() / BUCKET.as_millis()) as usize + 4;
        Arc::new(Backend {
            base: Instant::now(),
            clients_from: AtomicU64::new(u64::MAX),
            free: Mutex::new(WORKERS),
            freed: Condvar::new(),
            down: AtomicBool::new(false),
            calls: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
            busy: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
            queued: AtomicUsize::new(0),
            peak_queue: AtomicUsize::new(0),
        })
    }

    /// Nanoseconds since the clients started (`None` during warm-up).
    fn since_start(&self) -> Option<u64> {
        let now = self.base.elapsed().as_nanos() as u64;
        now.checked_sub(self.clients_from.load(Ordering::Relaxed))
    }

    fn bucket_of(&self, ns: u64) -> usize {
        (ns / BUCKET.as_nanos() as u64) as usize
    }

    fn call(&self, key: u64) -> Result<u64, BoxError> {
        let q = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_queue.fetch_max(q, Ordering::SeqCst);
        {
            let mut free = self.free.lock().unwrap();
            while *free == 0 {
                free = self.freed.wait(free).unwrap();
            }
            *free -= 1;
        }
        self.queued.fetch_sub(1, Ordering::SeqCst);
        let down = self.down.load(Ordering::Relaxed);
        let work = if down { SERVICE / 4 } else { SERVICE };
        std::thread::sleep(work);
        *self.free.lock().unwrap() += 1;
        self.freed.notify_one();
        if let Some(t) = self.since_start() {
            let b = self.bucket_of(t);
            if let (Some(c), Some(busy)) = (self.calls.get(b), self.busy.get(b)) {
                c.fetch_add(1, Ordering::Relaxed);
                busy.fetch_add(work.as_nanos() as u64, Ordering::Relaxed);
            }
        }
        if down {
            Err("backend unavailable".into())
        } else {
            Ok(key * 10)
        }
    }

    /// Utilisation per 100 ms (busy worker time ÷ workers × 100 ms).
    fn utilisation(&self) -> Vec<f64> {
        let cap = (WORKERS as u64 * BUCKET.as_nanos() as u64) as f64;
        self.busy
            .iter()
            .map(|b| (b.load(Ordering::Relaxed) as f64 / cap).min(1.0))
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    Late, // 504
    Error,
}

struct Request {
    /// When it started, nanoseconds after the clients' start.
    at: u64,
    latency_us: u64,
    answer: Answer,
}

/// A health warning as seen over the run: first and last time seen (seconds after the
/// clients' start; negative: during warm-up), and its advice when first seen.
struct Seen {
    first: f64,
    last: f64,
    advice: String,
}

struct Report {
    name: &'static str,
    requests: Vec<Request>,
    utilisation: Vec<f64>,
    calls: u64,
    peak_queue: usize,
    warnings: BTreeMap<&'static str, Seen>,
    stats: herdcache::CacheStats,
    /// The predicted hit-ratio curve at the end of the run.
    sizing: Option<herdcache::Sizing>,
    outage: (f64, f64),
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

impl Report {
    /// p99 latency (ms) of the requests started in each 100 ms.
    fn p99_over_time(&self) -> Vec<f64> {
        let n = self.utilisation.len();
        let mut per: Vec<Vec<u64>> = vec![Vec::new(); n];
        for r in &self.requests {
            let b = (r.at / BUCKET.as_nanos() as u64) as usize;
            if b < n {
                per[b].push(r.latency_us);
            }
        }
        per.into_iter()
            .map(|mut v| {
                v.sort_unstable();
                percentile(&v, 0.99) as f64 / 1000.0
            })
            .collect()
    }

    /// The first 100 ms in which the backend was saturated (≥ 95 % busy), in seconds.
    fn saturated_at(&self) -> Option<f64> {
        self.utilisation
            .iter()
            .position(|&u| u >= 0.95)
            .map(|b| b as f64 * BUCKET.as_secs_f64())
    }

    /// Requests with `answer` before, during and after the outage.
    fn count(&self, answer: Answer) -> [usize; 3] {
        let (from, to) = self.outage;
        let mut n = [0; 3];
        for r in self.requests.iter().filter(|r| r.answer == answer) {
            let t = r.at as f64 / 1e9;
            n[usize::from(t >= from) + usize::from(t >= to)] += 1;
        }
        n
    }
}

fn run(name: &'static str, duration: Duration) -> Report {
    let backend = Backend::new(duration);
    let b = backend.clone();
    let protected = name.starts_with("protected");
    let mut builder = Cache::<u64, u64>::builder()
        .max_capacity(10_000)
        .record_stats()
        .track_sizing()
        .time_to_live(TTL)
        .loader(move |k: &u64| b.call(*k));
    if protected {
        builder = builder
            .refresh_after(TTL / 2)
            .jitter(0.2)
            .max_concurrent_loads(4)
            .load_timeout(Duration::from_millis(20))
            .spawner(pool(4));
    }
    if name.ends_with("fail-safe") {
        builder = builder
            .fail_safe(Duration::from_secs(60))
            .refresh_backoff(Duration::from_millis(500));
    }
    let cache = builder.build();
    let get = |k: u64| -> Result<u64, String> {
        match name {
            "no coalescing" => match cache.get(&k) {
                Some(v) => Ok(v),
                None => {
                    let v = backend.call(k).map_err(|e| e.to_string())?;
                    cache.insert(k, v);
                    Ok(v)
                }
            },
            "single-flight" => cache
                .try_get_with(k, || backend.call(k))
                .map_err(|e| e.to_string()),
            _ => cache.load(k).map_err(|e: LoadError| e.to_string()),
        }
    };
    let stop = AtomicBool::new(false);
    let warnings: Mutex<BTreeMap<&'static str, Seen>> = Mutex::default();
    let mut requests = Vec::new();
    // After the expiry wave (at the time to live), until nine tenths of the run.
    let outage = (
        (duration.as_secs_f64() * 0.5).max(TTL.as_secs_f64() * 1.5),
        duration.as_secs_f64() * 0.9,
    );
    std::thread::scope(|s| {
        // Health, every 100 ms from the warm-up on.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let t = match backend.since_start() {
                    Some(ns) => ns as f64 / 1e9,
                    None => -(backend.base.elapsed().as_secs_f64()),
                };
                for w in cache.health_over(HEALTH_WINDOW).warnings() {
                    let mut seen = warnings.lock().unwrap();
                    seen.entry(w.kind())
                        .and_modify(|s| s.last = t)
                        .or_insert_with(|| Seen {
                            first: t,
                            last: t,
                            advice: w.to_string(),
                        });
                }
                std::thread::sleep(BUCKET);
            }
        });
        // Fill every hot key at the same moment, as a deploy's warm-up from one bulk query
        // would.
        for k in 0..KEYS {
            cache.insert(k, k * 10);
        }
        backend
            .clients_from
            .store(backend.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let clients: Vec<_> = (0..CLIENTS as u64)
            .map(|t| {
                let (stop, get, backend) = (&stop, &get, &backend);
                s.spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = backend.since_start().unwrap_or(0);
                        let t0 = Instant::now();
                        let mut failed = false;
                        for _ in 0..READS {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let k = x % KEYS;
                            match get(k) {
                                Ok(v) => assert_eq!(v, k * 10),
                                Err(_) => failed = true,
                            }
                        }
                        let took = t0.elapsed();
                        let answer = if took > DEADLINE {
                            Answer::Late
                        } else if failed {
                            Answer::Error
                        } else {
                            Answer::Ok
                        };
                        out.push(Request {
                            at,
                            latency_us: took.as_micros() as u64,
                            answer,
                        });
                        std::thread::sleep(THINK);
                    }
                    out
                })
            })
            .collect();
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(outage.0));
        backend.down.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs_f64(outage.1).saturating_sub(start.elapsed()));
        backend.down.store(false, Ordering::Relaxed);
        std::thread::sleep(duration.saturating_sub(start.elapsed()));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            requests.extend(c.join().expect("client"));
        }
    });
    let mut utilisation = backend.utilisation();
    utilisation.truncate((duration.as_millis() / BUCKET.as_millis()) as usize);
    Report {
        name,
        requests,
        calls: backend
            .calls
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum(),
        utilisation,
        peak_queue: backend.peak_queue.load(Ordering::SeqCst),
        warnings: warnings.into_inner().unwrap(),
        stats: cache.stats(),
        sizing: cache.sizing(),
        outage,
    }
}

/// One panel of the chart: a line per configuration.
#[allow(clippy::too_many_arguments)]
fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    series: &[Vec<f64>],
    y_max: f64,
    unit: &str,
    mark: Option<(f64, &str)>,
    outage: (f64, f64),
) {
    let (w, h, left) = (900.0, 240.0, 60.0);
    let plot_w = w - left - 10.0;
    let plot_h = h - 60.0;
    let y0 = top + 30.0 + plot_h;
    let n = series.iter().map(Vec::len).max().unwrap_or(1).max(1) as f64;
    let x = |i: f64| left + i / n * plot_w;
    let y = |v: f64| y0 - (v / y_max).min(1.0) * plot_h;
    let secs = n * BUCKET.as_secs_f64();
    *out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n\
         <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#eee\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#777\">backend down</text>\n\
         <line x1=\"{left}\" y1=\"{y0}\" x2=\"{}\" y2=\"{y0}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{left}\" y2=\"{y0}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y_max}{unit}</text>\n\
         <text x=\"{}\" y=\"{y0}\" text-anchor=\"end\">0</text>\n",
        w / 2.0,
        top + 18.0,
        x(outage.0 / BUCKET.as_secs_f64()),
        y0 - plot_h,
        x((outage.1 - outage.0) / BUCKET.as_secs_f64()) - left,
        x(outage.0 / BUCKET.as_secs_f64()) + 4.0,
        y0 - plot_h + 14.0,
        w - 10.0,
        y0 - plot_h,
        left - 4.0,
        y0 - plot_h + 10.0,
        left - 4.0,
    );
    for s in 0..=(secs as usize) {
        *out += &format!(
            "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{s}</text>\n",
            x(s as f64 / BUCKET.as_secs_f64()),
            y0 + 15.0
        );
    }
    if let Some((v, label)) = mark {
        *out += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"black\" stroke-dasharray=\"4 4\"/>\n\
             <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{label}</text>\n",
            y(v),
            w - 10.0,
            w - 14.0,
            y(v) - 4.0
        );
    }
    let colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"];
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = s
            .iter()
            .enumerate()
            .map(|(j, &v)| format!("{:.1},{:.1}", x(j as f64), y(v)))
            .collect();
        *out += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
            colors[i % 4],
            points.join(" ")
        );
    }
}

fn svg(reports: &[Report]) -> String {
    let (w, h) = (900.0, 540.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let outage = reports.first().map_or((0.0, 0.0), |r| r.outage);
    let p99: Vec<Vec<f64>> = reports.iter().map(Report::p99_over_time).collect();
    panel(
        &mut out,
        0.0,
        "Request p99 per 100 ms (1,000 hot keys, TTL 4 s, 200 clients × 8 reads, 8 backend workers)",
        &p99,
        500.0,
        " ms",
        Some((DEADLINE.as_secs_f64() * 1e3, "gateway deadline: 504")),
        outage,
    );
    let util: Vec<Vec<f64>> = reports
        .iter()
        .map(|r| r.utilisation.iter().map(|u| u * 100.0).collect())
        .collect();
    panel(
        &mut out,
        250.0,
        "Backend utilisation per 100 ms (seconds since the clients started)",
        &util,
        100.0,
        " %",
        None,
        outage,
    );
    let colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"];
    for (i, r) in reports.iter().enumerate() {
        out += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{}\">{}: {} × 504, {} errors</text>\n",
            60.0 + 210.0 * i as f64,
            h - 12.0,
            colors[i % 4],
            r.name,
            r.count(Answer::Late).iter().sum::<usize>(),
            r.count(Answer::Error).iter().sum::<usize>(),
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
    eprintln!("stampede: {msg}\nusage: stampede [SECONDS] [--svg PATH] [--check]");
    std::process::exit(2);
}

fn main() {
    let mut secs: u64 = 12;
    let mut svg_path = None;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--check" {
            check = true;
        } else if a == "--svg" {
            match args.next() {
                Some(p) => svg_path = Some(std::path::PathBuf::from(p)),
                None => usage("--svg needs a path"),
            }
        } else {
            match a.parse() {
                Ok(n) if n >= 8 => secs = n,
                _ => usage(&format!("not a number of seconds (at least 8): {a:?}")),
            }
        }
    }
    let svg_path = svg_path.unwrap_or_else(default_svg_path);
    let duration = Duration::from_secs(secs);
    let reports: Vec<Report> = MODES.into_iter().map(|name| run(name, duration)).collect();
    for r in &reports {
        let (from, to) = r.outage;
        println!("== {}", r.name);
        let mut lat: Vec<u64> = r.requests.iter().map(|q| q.latency_us).collect();
        lat.sort_unstable();
        let (ok, late, err) = (
            r.count(Answer::Ok),
            r.count(Answer::Late),
            r.count(Answer::Error),
        );
        println!(
            "requests {}: answered {} | 504s {} | errors {} (each: before / during / after the outage at {from:.1}–{to:.1} s) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            r.requests.len(),
            ok.iter().sum::<usize>(),
            late.map(|n| n.to_string()).join(" / "),
            err.map(|n| n.to_string()).join(" / "),
            percentile(&lat, 0.5) as f64 / 1e3,
            percentile(&lat, 0.99) as f64 / 1e3,
            *lat.last().unwrap_or(&0) as f64 / 1e3,
        );
        let mean = r.utilisation.iter().sum::<f64>() / r.utilisation.len().max(1) as f64;
        println!(
            "backend: {} calls, utilisation mean {:.0} %, peak queue {}, saturated (≥ 95 %) first at {}",
            r.calls,
            mean * 100.0,
            r.peak_queue,
            r.saturated_at()
                .map_or("never".to_string(), |t| format!("{t:.1} s"))
        );
        println!(
            "p99 per 100 ms (ms): {}",
            r.p99_over_time()
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let s = &r.stats;
        println!(
            "stats(): hit ratio {:.4} | loads {} ok, {} failed | coalesced {} | refreshes {} started, {} failed | served after TTL (fail-safe) {} | timeouts {}",
            s.hit_ratio(),
            s.load_successes,
            s.load_failures,
            s.coalesced,
            s.refreshes_started,
            s.refreshes_failed,
            s.stale_served_after_ttl,
            s.timeouts,
        );
        if let Some(z) = &r.sizing {
            let curve: Vec<String> = z
                .points()
                .iter()
                .map(|(c, h)| format!("{c}: {:.1} %", h * 100.0))
                .collect();
            println!(
                "sizing curve (predicted hit ratio by capacity, observed {:.1} %): {} — {}",
                z.observed() * 100.0,
                curve.join(", "),
                match z.suggested_capacity() {
                    Some(c) => format!("raise max_capacity to about {c}"),
                    None => "a larger cache would not help: the misses are not for want of room"
                        .to_string(),
                }
            );
        }
        if r.warnings.is_empty() {
            println!("health: no warning");
        }
        for (kind, seen) in &r.warnings {
            let when = |t: f64| {
                if t < 0.0 {
                    "warm-up".to_string()
                } else {
                    format!("{t:.1} s")
                }
            };
            let before = match r.saturated_at() {
                Some(t) if seen.first < t => {
                    format!(
                        " ({:.1} s before the backend saturated)",
                        t - seen.first.max(0.0)
                    )
                }
                _ => String::new(),
            };
            println!(
                "health: {kind} from {} to {}{before}: {}",
                when(seen.first),
                when(seen.last),
                seen.advice
            );
        }
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
    if check {
        let failed: Vec<String> = reports
            .iter()
            .filter_map(|r| {
                let late = r.count(Answer::Late);
                let errors = r.count(Answer::Error);
                let problem = match r.name {
                    "no coalescing" | "single-flight" if late[0] == 0 => {
                        "no 504 from the expiry wave"
                    }
                    n if n.starts_with("protected") && late.iter().sum::<usize>() > 0 => "504s",
                    "protected + fail-safe" if errors.iter().sum::<usize>() > 0 => "errors",
                    _ => return None,
                };
                Some(format!("{}: {problem}", r.name))
            })
            .collect();
        if !failed.is_empty() {
            eprintln!("stampede --check: {}", failed.join("; "));
            std::process::exit(1);
        }
        println!("check: the story holds");
    }
}
