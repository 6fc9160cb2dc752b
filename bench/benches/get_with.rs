//! Single-flight loading beside moka's `get_with` and quick_cache's `get_or_insert_with`.
//!
//! ```text
//! cargo bench -p herdcache-bench --bench get_with
//! ```
//!
//! 1. The herd (a table printed first): N threads released together on one cold key whose
//!    loader takes 20 ms; loads per key and the time until every caller has returned (median of
//!    5 trials, fresh key each).
//! 2. The present-key path (criterion): `get_with` on a cached key against `get`, for herdcache,
//!    and the peers' equivalents, one thread.

use criterion::{black_box, Criterion};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const LOAD: Duration = Duration::from_millis(20);

fn herd(name: &str, threads: usize, trials: u64) -> (f64, Duration) {
    let herd_cache = herdcache::Cache::<u64, u64>::new(1000);
    let moka_cache = moka::sync::Cache::<u64, u64>::new(1000);
    let qc = quick_cache::sync::Cache::<u64, u64>::new(1000);
    let loads = AtomicUsize::new(0);
    let mut times = Vec::new();
    for key in 0..trials {
        let barrier = Barrier::new(threads);
        let start = std::sync::Mutex::new(None::<Instant>);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(LOAD);
            key
        };
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    if barrier.wait().is_leader() {
                        *start.lock().unwrap() = Some(Instant::now());
                    }
                    let v = match name {
                        "herdcache" => herd_cache.get_with(key, load),
                        "moka" => moka_cache.get_with(key, load),
                        "quick_cache" => {
                            qc.get_or_insert_with(&key, || Ok::<_, ()>(load())).unwrap()
                        }
                        _ => unreachable!(),
                    };
                    assert_eq!(v, key);
                });
            }
        });
        times.push(start.lock().unwrap().expect("started").elapsed());
    }
    times.sort();
    (
        loads.load(Ordering::SeqCst) as f64 / trials as f64,
        times[times.len() / 2],
    )
}

fn present_key(c: &mut Criterion) {
    let h = herdcache::Cache::<u64, u64>::new(100_000);
    let m = moka::sync::Cache::<u64, u64>::new(100_000);
    let q = quick_cache::sync::Cache::<u64, u64>::new(100_000);
    for k in 0..100_000 {
        h.insert(k, k);
        m.insert(k, k);
        q.insert(k, k);
    }
    let mut g = c.benchmark_group("present key");
    let mut i = 0u64;
    let mut next = move || {
        i = (i + 7919) % 100_000;
        i
    };
    g.bench_function("herdcache get", |b| b.iter(|| black_box(h.get(&next()))));
    g.bench_function("herdcache get_with", |b| {
        b.iter(|| black_box(h.get_with(next(), || unreachable!())))
    });
    g.bench_function("moka get_with", |b| {
        b.iter(|| black_box(m.get_with(next(), || unreachable!())))
    });
    g.bench_function("quick_cache get_or_insert_with", |b| {
        b.iter(|| {
            let k = next();
            black_box(q.get_or_insert_with(&k, || Err::<u64, ()>(())))
        })
    });
    g.finish();
}

fn main() {
    println!("| cache | threads | loads per cold key | time until all callers return (median) |");
    println!("|---|--:|--:|--:|");
    for threads in [8, 64] {
        for name in ["herdcache", "moka", "quick_cache"] {
            let (loads, t) = herd(name, threads, 5);
            println!(
                "| {name} | {threads} | {loads:.1} | {:.1} ms |",
                t.as_secs_f64() * 1e3
            );
        }
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    present_key(&mut c);
    c.final_summary();
}
