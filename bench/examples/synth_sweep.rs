//! Synthetic hit-ratio sweep: herdcache beside moka, moka-sync and quick_cache on generated
//! workloads (Zipf, loops/scans, scan + Zipf mixes, phase changes, sliding hot sets,
//! one-hit-wonders with short reuse, reuse-distance streams), unit weights.
//!
//! ```text
//! cargo run -q --release -p herdcache-bench --example synth_sweep
//! ```
//!
//! Each request is one key: `get`; on a miss, `insert(k, k)`. "moka-sync" is moka with
//! `run_pending_tasks()` after each insert (capacity-exact); "moka" is moka as is. herdcache is
//! run 3 times per case (its hasher is randomly seeded): median and spread (max − min) shown.
//! `delta` = median herdcache − max(moka-sync, quick_cache).

use std::sync::Mutex;

/// Scales every case's request count (1.0 for the full run).
const SCALE: f64 = 1.0;
/// herdcache runs per case.
const HERD_RUNS: usize = 3;

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(mix(seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// splitmix64 finalizer: a bijection, so distinct (set, index) pairs give distinct keys.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Key `i` of key set `set` (sets are disjoint).
fn key(set: u64, i: u64) -> u64 {
    mix((set << 40) | i)
}

/// Inverse-CDF table for Zipf(s) over ranks 0..n.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: u64, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut acc = 0.0;
        for r in 1..=n {
            acc += 1.0 / (r as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.f64();
        (self.0.partition_point(|&c| c < u) as u64).min(self.0.len() as u64 - 1)
    }
}

#[derive(Clone)]
enum Gen {
    /// Zipf(s) over n keys.
    Zipf { n: u64, s: f64 },
    /// Cyclic scan over l keys.
    Loop { l: u64 },
    /// Alternating requests: a cyclic scan over l keys, and Zipf(s) over n other keys;
    /// `scan_frac` of requests are from the scan.
    LoopZipf {
        l: u64,
        n: u64,
        s: f64,
        scan_frac: f64,
    },
    /// Zipf(s) over n keys of one set for `phase` requests, then another disjoint set;
    /// `sets` distinct sets used in rotation (2 = A, B, A, B, ...; 0 = a fresh set each phase).
    Phase {
        n: u64,
        s: f64,
        phase: u64,
        sets: u64,
    },
    /// Uniform over a window of w keys whose start advances by one key every `step` requests.
    Slide { w: u64, step: u64 },
    /// Zipf(s) within a sliding window of w keys (rank 0 at the window's newest end).
    SlideZipf { w: u64, s: f64, step: u64 },
    /// `hot_frac` of requests: uniform over a stable hot set of h keys; the rest: with
    /// probability q a brand-new key, else a random key among the last r new keys
    /// (so each new key is re-referenced about (1-q)/q times, soon, then never).
    Reuse {
        h: u64,
        hot_frac: f64,
        q: f64,
        r: u64,
    },
    /// With probability q a new key, else the key requested d requests ago, d geometric with
    /// mean m (pure temporal locality).
    Dist { q: f64, m: f64 },
    /// Zipf(s) over n keys; every `period` requests, a burst of b never-seen keys in a row.
    ZipfBurst { n: u64, s: f64, period: u64, b: u64 },
    /// Zipf(s) over n keys, a fraction `noise` of requests replaced by never-seen keys.
    ZipfNoise { n: u64, s: f64, noise: f64 },
    /// Two uniform pools: a keys with probability pa, else b other keys.
    Pools { a: u64, pa: f64, b: u64 },
    /// Several cyclic scans of the given lengths, a request from a random one each time.
    MultiLoop { ls: [u64; 3] },
    /// Cyclic scan over l keys whose start moves d keys forward after each pass (each pass
    /// drops d old keys and adds d new ones).
    ShiftLoop { l: u64, d: u64 },
    /// Zipf(s) over n keys, each sampled key requested k times in a row (k uniform in 1..=kmax).
    ZipfCorr { n: u64, s: f64, kmax: u64 },
    /// A fraction p of picks: a never-seen key requested k times in a row then never;
    /// otherwise Zipf(s) over n keys.
    BurstOhw { n: u64, s: f64, p: f64, k: u64 },
    /// Alternates `zlen` requests of Zipf(s) over n keys and one pass of a loop over l keys.
    ZipfThenLoop { n: u64, s: f64, zlen: u64, l: u64 },
}

impl Gen {
    fn family(&self) -> &'static str {
        match self {
            Gen::Zipf { .. } => "zipf",
            Gen::Loop { .. } => "loop",
            Gen::LoopZipf { .. } => "loop+zipf",
            Gen::Phase { .. } => "phase",
            Gen::Slide { .. } => "slide",
            Gen::SlideZipf { .. } => "slide-zipf",
            Gen::Reuse { .. } => "reuse+hot",
            Gen::Dist { .. } => "reuse-dist",
            Gen::ZipfBurst { .. } => "zipf+burst",
            Gen::ZipfNoise { .. } => "zipf+noise",
            Gen::Pools { .. } => "2pools",
            Gen::MultiLoop { .. } => "multiloop",
            Gen::ShiftLoop { .. } => "shiftloop",
            Gen::ZipfCorr { .. } => "zipf-corr",
            Gen::BurstOhw { .. } => "burst-ohw",
            Gen::ZipfThenLoop { .. } => "zipf|loop",
        }
    }
    fn params(&self) -> String {
        match *self {
            Gen::Zipf { n, s } => format!("n={n} s={s}"),
            Gen::Loop { l } => format!("L={l}"),
            Gen::LoopZipf { l, n, s, scan_frac } => {
                format!("L={l} n={n} s={s} scan={scan_frac}")
            }
            Gen::Phase { n, s, phase, sets } => {
                let sets = if sets == 0 {
                    "fresh".to_string()
                } else {
                    sets.to_string()
                };
                format!("n={n} s={s} phase={phase} sets={sets}")
            }
            Gen::Slide { w, step } => format!("w={w} step={step}"),
            Gen::SlideZipf { w, s, step } => format!("w={w} s={s} step={step}"),
            Gen::Reuse { h, hot_frac, q, r } => format!("h={h} hot={hot_frac} q={q} r={r}"),
            Gen::Dist { q, m } => format!("q={q} m={m}"),
            Gen::ZipfBurst { n, s, period, b } => format!("n={n} s={s} every={period} b={b}"),
            Gen::ZipfNoise { n, s, noise } => format!("n={n} s={s} noise={noise}"),
            Gen::Pools { a, pa, b } => format!("a={a} pa={pa} b={b}"),
            Gen::MultiLoop { ls } => format!("L={}/{}/{}", ls[0], ls[1], ls[2]),
            Gen::ShiftLoop { l, d } => format!("L={l} d={d}"),
            Gen::ZipfCorr { n, s, kmax } => format!("n={n} s={s} k<={kmax}"),
            Gen::BurstOhw { n, s, p, k } => format!("n={n} s={s} p={p} k={k}"),
            Gen::ZipfThenLoop { n, s, zlen, l } => format!("n={n} s={s} z={zlen} L={l}"),
        }
    }

    fn generate(&self, reqs: usize, seed: u64) -> Vec<u64> {
        let mut rng = Rng::new(seed);
        let mut out = Vec::with_capacity(reqs);
        match *self {
            Gen::Zipf { n, s } => {
                let z = Zipf::new(n, s);
                for _ in 0..reqs {
                    out.push(key(1, z.sample(&mut rng)));
                }
            }
            Gen::Loop { l } => {
                for t in 0..reqs as u64 {
                    out.push(key(2, t % l));
                }
            }
            Gen::LoopZipf { l, n, s, scan_frac } => {
                let z = Zipf::new(n, s);
                let mut pos = 0;
                for _ in 0..reqs {
                    if rng.f64() < scan_frac {
                        out.push(key(2, pos % l));
                        pos += 1;
                    } else {
                        out.push(key(1, z.sample(&mut rng)));
                    }
                }
            }
            Gen::Phase { n, s, phase, sets } => {
                let z = Zipf::new(n, s);
                for t in 0..reqs as u64 {
                    let p = t / phase;
                    let set = if sets == 0 { 10 + p } else { 10 + p % sets };
                    out.push(key(set, z.sample(&mut rng)));
                }
            }
            Gen::Slide { w, step } => {
                for t in 0..reqs as u64 {
                    out.push(key(3, t / step + rng.below(w)));
                }
            }
            Gen::SlideZipf { w, s, step } => {
                let z = Zipf::new(w, s);
                for t in 0..reqs as u64 {
                    // Newest key of the window is t/step + w - 1.
                    out.push(key(3, t / step + w - 1 - z.sample(&mut rng)));
                }
            }
            Gen::Reuse { h, hot_frac, q, r } => {
                let mut ring: Vec<u64> = Vec::with_capacity(r as usize);
                let mut next_new = 0u64;
                for _ in 0..reqs {
                    if rng.f64() < hot_frac {
                        out.push(key(4, rng.below(h)));
                    } else if ring.is_empty() || rng.f64() < q {
                        let k = key(5, next_new);
                        if ring.len() < r as usize {
                            ring.push(k);
                        } else {
                            ring[(next_new % r) as usize] = k;
                        }
                        next_new += 1;
                        out.push(k);
                    } else {
                        out.push(ring[rng.below(ring.len() as u64) as usize]);
                    }
                }
            }
            Gen::Dist { q, m } => {
                let mut next_new = 0u64;
                let p = 1.0 / m;
                for t in 0..reqs {
                    if t == 0 || rng.f64() < q {
                        out.push(key(6, next_new));
                        next_new += 1;
                    } else {
                        // Geometric on {1, 2, ...} with mean m.
                        let u = rng.f64().max(1e-300);
                        let d = 1 + (u.ln() / (1.0 - p).ln()).floor() as usize;
                        let d = d.min(t);
                        out.push(out[t - d]);
                    }
                }
            }
            Gen::ZipfBurst { n, s, period, b } => {
                let z = Zipf::new(n, s);
                let mut fresh = 0u64;
                let mut t = 0u64;
                while out.len() < reqs {
                    if t % period == period - 1 {
                        for _ in 0..b {
                            out.push(key(7, fresh));
                            fresh += 1;
                        }
                    } else {
                        out.push(key(1, z.sample(&mut rng)));
                    }
                    t += 1;
                }
                out.truncate(reqs);
            }
            Gen::ZipfNoise { n, s, noise } => {
                let z = Zipf::new(n, s);
                let mut fresh = 0u64;
                for _ in 0..reqs {
                    if rng.f64() < noise {
                        out.push(key(7, fresh));
                        fresh += 1;
                    } else {
                        out.push(key(1, z.sample(&mut rng)));
                    }
                }
            }
            Gen::Pools { a, pa, b } => {
                for _ in 0..reqs {
                    if rng.f64() < pa {
                        out.push(key(8, rng.below(a)));
                    } else {
                        out.push(key(9, rng.below(b)));
                    }
                }
            }
            Gen::MultiLoop { ls } => {
                let mut pos = [0u64; 3];
                for _ in 0..reqs {
                    let i = rng.below(3) as usize;
                    out.push(key(20 + i as u64, pos[i] % ls[i]));
                    pos[i] += 1;
                }
            }
            Gen::ShiftLoop { l, d } => {
                let mut t = 0u64;
                while out.len() < reqs {
                    let pass = t / l;
                    out.push(key(2, pass * d + t % l));
                    t += 1;
                }
            }
            Gen::ZipfCorr { n, s, kmax } => {
                let z = Zipf::new(n, s);
                while out.len() < reqs {
                    let k = key(1, z.sample(&mut rng));
                    for _ in 0..1 + rng.below(kmax) {
                        out.push(k);
                    }
                }
                out.truncate(reqs);
            }
            Gen::BurstOhw { n, s, p, k } => {
                let z = Zipf::new(n, s);
                let mut fresh = 0u64;
                while out.len() < reqs {
                    if rng.f64() < p {
                        for _ in 0..k {
                            out.push(key(7, fresh));
                        }
                        fresh += 1;
                    } else {
                        out.push(key(1, z.sample(&mut rng)));
                    }
                }
                out.truncate(reqs);
            }
            Gen::ZipfThenLoop { n, s, zlen, l } => {
                let z = Zipf::new(n, s);
                while out.len() < reqs {
                    for _ in 0..zlen {
                        out.push(key(1, z.sample(&mut rng)));
                    }
                    for i in 0..l {
                        out.push(key(2, i));
                    }
                }
                out.truncate(reqs);
            }
        }
        out
    }
}

fn replay(name: &str, keys: &[u64], cap: u64) -> f64 {
    let mut hits = 0u64;
    match name {
        "herdcache" => {
            let c = herdcache::Cache::<u64, u64>::builder()
                .max_capacity(cap)
                .build();
            for &k in keys {
                if c.get(&k).is_some() {
                    hits += 1;
                } else {
                    c.insert(k, k);
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
        "moka" => {
            let c = moka::sync::Cache::builder().max_capacity(cap).build();
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

struct Case {
    gen: Gen,
    cap: u64,
    reqs: usize,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut add = |gen: Gen, cap: u64, reqs: usize| {
        v.push(Case {
            gen,
            cap,
            reqs: ((reqs as f64 * SCALE) as usize).max(1000),
        })
    };
    // Zipf: tiny (n = 2k, cap 50), small (n = 10k, cap 1 % and 5 %), medium (n = 500k,
    // cap 1 % and 5 %; n = 2M, cap 50k = 2.5 %).
    for &s in &[0.6, 0.8, 1.0, 1.2] {
        add(Gen::Zipf { n: 2_000, s }, 50, 200_000);
        add(Gen::Zipf { n: 10_000, s }, 100, 300_000);
        add(Gen::Zipf { n: 10_000, s }, 500, 300_000);
        add(Gen::Zipf { n: 500_000, s }, 5_000, 1_000_000);
        add(Gen::Zipf { n: 500_000, s }, 25_000, 1_000_000);
        add(Gen::Zipf { n: 2_000_000, s }, 50_000, 2_000_000);
    }
    // Loops alone: L = f × cap.
    for &(cap, fs) in &[
        (50u64, &[1.05, 1.2, 1.5, 2.0, 3.0][..]),
        (200, &[1.05, 1.2, 1.3, 1.4, 1.5, 1.7, 2.0, 3.0][..]),
        (1_000, &[1.2, 1.4, 1.6, 2.0][..]),
        (5_000, &[1.05, 1.2, 1.3, 1.4, 1.5, 1.7, 2.0, 3.0][..]),
        (20_000, &[1.2, 1.4, 1.6, 2.0][..]),
        (50_000, &[1.05, 1.2, 1.5, 2.0, 3.0][..]),
    ] {
        for &f in fs {
            let l = (cap as f64 * f) as u64;
            add(
                Gen::Loop { l },
                cap,
                (60 * l as usize).clamp(200_000, 2_000_000),
            );
        }
    }
    // Loop + Zipf hot set: `scan` of requests from the loop.
    for &(cap, n) in &[(500u64, 5_000u64), (5_000, 50_000)] {
        let reqs = if cap < 1000 { 400_000 } else { 1_500_000 };
        for &f in &[1.2, 2.0, 3.0] {
            let l = (cap as f64 * f) as u64;
            for &scan in &[0.25, 0.5, 0.75] {
                add(
                    Gen::LoopZipf {
                        l,
                        n,
                        s: 1.0,
                        scan_frac: scan,
                    },
                    cap,
                    reqs,
                );
            }
        }
        add(
            Gen::LoopZipf {
                l: cap * 3 / 2,
                n,
                s: 0.8,
                scan_frac: 0.5,
            },
            cap,
            reqs,
        );
        add(
            Gen::LoopZipf {
                l: cap * 3 / 2,
                n,
                s: 1.2,
                scan_frac: 0.5,
            },
            cap,
            reqs,
        );
    }
    // Several loops interleaved.
    add(
        Gen::MultiLoop {
            ls: [100, 300, 1_000],
        },
        256,
        400_000,
    );
    add(Gen::MultiLoop { ls: [50, 150, 400] }, 256, 400_000);
    add(
        Gen::MultiLoop {
            ls: [2_000, 6_000, 20_000],
        },
        5_000,
        1_000_000,
    );
    add(
        Gen::MultiLoop {
            ls: [1_000, 3_000, 8_000],
        },
        5_000,
        1_000_000,
    );
    // Loops whose key set drifts: each pass swaps d = df × L keys.
    for &cap in &[200u64, 1_000, 5_000] {
        for &f in &[0.9, 1.1, 1.3, 1.6, 2.0, 3.0] {
            for &df in &[0.02, 0.1, 0.3] {
                let l = (cap as f64 * f) as u64;
                let d = ((l as f64 * df) as u64).max(1);
                let reqs = (60 * l as usize).clamp(200_000, 600_000);
                add(Gen::ShiftLoop { l, d }, cap, reqs);
            }
        }
    }
    // Around the worst drift rates: L slightly above cap, d = 5..20 % of L.
    for &cap in &[50u64, 200, 1_000, 5_000, 20_000] {
        for &f in &[1.05, 1.2] {
            for &df in &[0.05, 0.15, 0.2] {
                if (cap == 50 || cap == 20_000) && df != 0.15 {
                    continue;
                }
                let l = (cap as f64 * f) as u64;
                let d = ((l as f64 * df) as u64).max(1);
                let reqs = (60 * l as usize).clamp(200_000, 1_500_000);
                add(Gen::ShiftLoop { l, d }, cap, reqs);
            }
        }
    }
    // Zipf, then one pass of a loop, alternately.
    for &cap in &[500u64, 5_000] {
        let reqs = if cap < 1000 { 400_000 } else { 1_000_000 };
        for &(zf, lf) in &[(4u64, 1.5), (4, 3.0), (20, 1.5), (1, 2.0)] {
            let l = (cap as f64 * lf) as u64;
            add(
                Gen::ZipfThenLoop {
                    n: 10 * cap,
                    s: 1.0,
                    zlen: zf * cap,
                    l,
                },
                cap,
                reqs,
            );
        }
    }
    // Phase changes: Zipf over n = 10 × cap, switching key set every `phase` requests.
    for &cap in &[500u64, 5_000] {
        let n = 10 * cap;
        let reqs = if cap < 1000 { 400_000 } else { 1_000_000 };
        for &phase in &[2 * cap, 10 * cap, 40 * cap] {
            for &sets in &[2u64, 0] {
                add(
                    Gen::Phase {
                        n,
                        s: 1.0,
                        phase,
                        sets,
                    },
                    cap,
                    reqs,
                );
            }
        }
        add(
            Gen::Phase {
                n,
                s: 0.8,
                phase: 10 * cap,
                sets: 0,
            },
            cap,
            reqs,
        );
        add(
            Gen::Phase {
                n,
                s: 0.6,
                phase: 10 * cap,
                sets: 2,
            },
            cap,
            reqs,
        );
        add(
            Gen::Phase {
                n: 2 * cap,
                s: 0.8,
                phase: 10 * cap,
                sets: 2,
            },
            cap,
            reqs,
        );
    }
    // Sliding hot set: uniform window w = f × cap, advancing one key every `step` requests.
    for &cap in &[200u64, 5_000] {
        let reqs = if cap < 1000 { 300_000 } else { 1_000_000 };
        for &f in &[0.8, 1.5] {
            for &step in &[4u64, 40] {
                add(
                    Gen::Slide {
                        w: (cap as f64 * f) as u64,
                        step,
                    },
                    cap,
                    reqs,
                );
            }
        }
        add(
            Gen::SlideZipf {
                w: 4 * cap,
                s: 1.0,
                step: 4,
            },
            cap,
            reqs,
        );
        add(
            Gen::SlideZipf {
                w: 4 * cap,
                s: 0.8,
                step: 1,
            },
            cap,
            reqs,
        );
        add(
            Gen::SlideZipf {
                w: 4 * cap,
                s: 1.0,
                step: 100,
            },
            cap,
            reqs,
        );
    }
    // One-hit-wonders with short reuse, plus a stable hot set.
    for &cap in &[200u64, 2_000] {
        let reqs = if cap < 1000 { 300_000 } else { 1_000_000 };
        for &(hot_frac, q) in &[(0.3, 0.25), (0.6, 0.25), (0.3, 0.5)] {
            for &rf in &[0.25, 0.75] {
                add(
                    Gen::Reuse {
                        h: cap / 4,
                        hot_frac,
                        q,
                        r: (cap as f64 * rf) as u64,
                    },
                    cap,
                    reqs,
                );
            }
        }
        // Short-reuse set larger than the cache.
        add(
            Gen::Reuse {
                h: cap / 4,
                hot_frac: 0.3,
                q: 0.25,
                r: 2 * cap,
            },
            cap,
            reqs,
        );
    }
    // Pure temporal locality: new key with prob q, else the key d requests back (mean m).
    for &cap in &[200u64, 5_000] {
        let reqs = if cap < 1000 { 300_000 } else { 1_000_000 };
        for &(q, mf) in &[(0.2, 0.5), (0.2, 2.0), (0.5, 1.0), (0.1, 5.0)] {
            add(
                Gen::Dist {
                    q,
                    m: cap as f64 * mf,
                },
                cap,
                reqs,
            );
        }
    }
    // Zipf with periodic bursts of never-seen keys (scan pollution).
    for &cap in &[500u64, 5_000] {
        let n = 20 * cap;
        let reqs = if cap < 1000 { 400_000 } else { 1_000_000 };
        for &(period, bf) in &[(10 * cap, 2u64), (2 * cap, 1)] {
            add(
                Gen::ZipfBurst {
                    n,
                    s: 0.9,
                    period,
                    b: bf * cap,
                },
                cap,
                reqs,
            );
        }
    }
    // Zipf diluted by never-seen keys.
    for &cap in &[500u64, 5_000] {
        let reqs = if cap < 1000 { 400_000 } else { 1_000_000 };
        for &s in &[0.8, 1.0] {
            for &noise in &[0.3, 0.7] {
                add(
                    Gen::ZipfNoise {
                        n: 10 * cap,
                        s,
                        noise,
                    },
                    cap,
                    reqs,
                );
            }
        }
    }
    // Correlated references: each Zipf pick repeated 1..=k times in a row.
    for &cap in &[500u64, 5_000] {
        let reqs = if cap < 1000 { 400_000 } else { 1_000_000 };
        for &(s, kmax) in &[(0.8, 4u64), (1.0, 4), (0.8, 10)] {
            add(
                Gen::ZipfCorr {
                    n: 10 * cap,
                    s,
                    kmax,
                },
                cap,
                reqs,
            );
        }
        // Bursty one-timers (k requests in a row, then never) among Zipf picks.
        for &(p, k) in &[(0.2, 3u64), (0.5, 3), (0.2, 8), (0.5, 8)] {
            add(
                Gen::BurstOhw {
                    n: 10 * cap,
                    s: 0.9,
                    p,
                    k,
                },
                cap,
                reqs,
            );
        }
    }
    // Two uniform pools (hot pool fits, cold pool does not).
    add(
        Gen::Pools {
            a: 100,
            pa: 0.5,
            b: 2_000,
        },
        256,
        400_000,
    );
    add(
        Gen::Pools {
            a: 200,
            pa: 0.7,
            b: 400,
        },
        256,
        400_000,
    );
    add(
        Gen::Pools {
            a: 2_000,
            pa: 0.5,
            b: 40_000,
        },
        5_000,
        1_000_000,
    );
    add(
        Gen::Pools {
            a: 4_000,
            pa: 0.7,
            b: 8_000,
        },
        5_000,
        1_000_000,
    );
    v
}

struct Row {
    fam: &'static str,
    params: String,
    cap: u64,
    reqs: usize,
    herd_med: f64,
    herd_spread: f64,
    herd_all: Vec<f64>,
    moka: f64,
    moka_sync: f64,
    qc: f64,
    delta: f64,
}

fn main() {
    let start = std::time::Instant::now();
    let cases = cases();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(2);
    let mut rows = Vec::new();
    println!(
        "{:<11} {:<38} {:>6} {:>8} | {:>6} {:>5} | {:>6} {:>9} {:>6} | {:>6}",
        "family", "params", "cap", "reqs", "herd", "sprd", "moka", "moka-sync", "qc", "delta"
    );
    for (ci, case) in cases.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let keys = case.gen.generate(case.reqs, 0x5EED_0000 + ci as u64);
        let mut jobs: Vec<&str> = vec!["moka-sync", "moka", "quick_cache"];
        jobs.extend(std::iter::repeat_n("herdcache", HERD_RUNS));
        let jobs = Mutex::new(jobs.into_iter().enumerate());
        let results = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let Some((i, name)) = jobs.lock().unwrap().next() else {
                        break;
                    };
                    let r = replay(name, &keys, case.cap);
                    results.lock().unwrap().push((i, name, r));
                });
            }
        });
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|r| r.0);
        let get = |n: &str| results.iter().find(|r| r.1 == n).unwrap().2;
        let mut herd: Vec<f64> = results
            .iter()
            .filter(|r| r.1 == "herdcache")
            .map(|r| r.2)
            .collect();
        herd.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = herd[herd.len() / 2];
        let spread = herd[herd.len() - 1] - herd[0];
        let (moka, moka_sync, qc) = (get("moka"), get("moka-sync"), get("quick_cache"));
        let delta = med - moka_sync.max(qc);
        let row = Row {
            fam: case.gen.family(),
            params: case.gen.params(),
            cap: case.cap,
            reqs: case.reqs,
            herd_med: med,
            herd_spread: spread,
            herd_all: herd,
            moka,
            moka_sync,
            qc,
            delta,
        };
        print_row(&row);
        eprintln!("  case {ci}: {:.2} s", t0.elapsed().as_secs_f64());
        rows.push(row);
    }
    rows.sort_by(|a, b| a.delta.partial_cmp(&b.delta).unwrap());
    println!("\n== 10 furthest below max(moka-sync, quick_cache) ==");
    for r in rows.iter().take(10) {
        print_row(r);
    }
    println!("\n== 5 furthest above ==");
    for r in rows.iter().rev().take(5) {
        print_row(r);
    }
    println!("\n== per family: mean delta, min delta, cases ==");
    let mut fams: Vec<&str> = rows.iter().map(|r| r.fam).collect();
    fams.sort();
    fams.dedup();
    for f in fams {
        let d: Vec<f64> = rows
            .iter()
            .filter(|r| r.fam == f)
            .map(|r| r.delta)
            .collect();
        println!(
            "{f:<11} mean {:+6.2}  min {:+6.2}  max {:+6.2}  n={}",
            d.iter().sum::<f64>() / d.len() as f64,
            d.iter().cloned().fold(f64::MAX, f64::min),
            d.iter().cloned().fold(f64::MIN, f64::max),
            d.len()
        );
    }
    eprintln!(
        "total {:.1} s, {} cases",
        start.elapsed().as_secs_f64(),
        rows.len()
    );
}

fn print_row(r: &Row) {
    let all: Vec<String> = r.herd_all.iter().map(|h| format!("{h:.2}")).collect();
    println!(
        "{:<11} {:<38} {:>6} {:>8} | {:>6.2} {:>5.2} | {:>6.2} {:>9.2} {:>6.2} | {:>+6.2}  [{}]",
        r.fam,
        r.params,
        r.cap,
        r.reqs,
        r.herd_med,
        r.herd_spread,
        r.moka,
        r.moka_sync,
        r.qc,
        r.delta,
        all.join(" ")
    );
}
