//! Heap bytes per entry, measured with a counting global allocator.
//!
//! ```text
//! cargo run -p herdcache-bench --release --example memory
//! cargo run -p herdcache-bench --release --example memory -- --sizing   # track_sizing's bytes
//! ```
//!
//! Each cache gets a capacity of 1,000,000 and 1,000,000 distinct `u64 → u64` entries; the
//! figure is (heap bytes after − heap bytes before) / entries − 16, i.e. the overhead beyond the
//! key and the value themselves.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

// A counting allocator must implement `GlobalAlloc`, whose methods are `unsafe fn`s; this is an
// example binary, not the library (which forbids unsafe code).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: u64 = 1_000_000;

fn measure<C>(name: &str, build: impl FnOnce() -> C, insert: impl Fn(&C, u64)) -> f64 {
    let before = ALLOCATED.load(Ordering::SeqCst);
    let cache = build();
    for k in 0..N {
        insert(&cache, k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    let after = ALLOCATED.load(Ordering::SeqCst);
    let per_entry = (after - before) as f64 / N as f64 - 16.0;
    println!("| {name} | {per_entry:.1} |");
    drop(cache);
    per_entry
}

/// `--sizing`: the heap bytes `track_sizing` adds, once its shadows are full: two caches of
/// `capacity`, one tracked, fed the same 4 M reads (and inserts on a miss) of keys drawn from
/// 20 M, so that every shadow fills (the sampled keys outnumber the largest shadow).
fn sizing_bytes() {
    println!("| max_capacity | heap bytes added by track_sizing | MiB |");
    println!("|--:|--:|--:|");
    for capacity in [1_000u64, 100_000, 1_000_000] {
        let run = |track: bool| {
            let before = ALLOCATED.load(Ordering::SeqCst);
            // One fixed hasher for both caches, so that they hold the same keys and grow their
            // tables alike: the difference is the tracker's.
            let mut b = herdcache::Cache::<u64, u64>::builder()
                .max_capacity(capacity)
                .hasher(std::hash::BuildHasherDefault::<
                    std::collections::hash_map::DefaultHasher,
                >::default());
            if track {
                b = b.track_sizing();
            }
            let c = b.build();
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..4_000_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = x % 20_000_000;
                if c.get(&k).is_none() {
                    c.insert(k, k);
                }
            }
            let s = c.sizing();
            let bytes = ALLOCATED.load(Ordering::SeqCst) - before;
            drop((c, s));
            bytes
        };
        let added = run(true) - run(false);
        println!(
            "| {capacity} | {added} | {:.3} |",
            added as f64 / (1024.0 * 1024.0)
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--sizing") {
        sizing_bytes();
        return;
    }
    println!("| cache (1M u64 → u64 entries) | heap bytes per entry − 16 |");
    println!("|---|--:|");
    measure(
        "herdcache",
        || herdcache::Cache::<u64, u64>::new(N),
        |c, k| c.insert(k, k),
    );
    measure(
        "herdcache, read-then-insert of 2M keys (evicting; the policy selector's shadows full)",
        || herdcache::Cache::<u64, u64>::new(N),
        |c, k| {
            for x in [k, !k] {
                if c.get(&x).is_none() {
                    c.insert(x, x);
                }
            }
        },
    );
    measure(
        "herdcache, time_to_live",
        || {
            herdcache::Cache::<u64, u64>::builder()
                .max_capacity(N)
                .time_to_live(Duration::from_secs(3600))
                .build()
        },
        |c, k| c.insert(k, k),
    );
    measure(
        "herdcache, time_to_live + time_to_idle",
        || {
            herdcache::Cache::<u64, u64>::builder()
                .max_capacity(N)
                .time_to_live(Duration::from_secs(3600))
                .time_to_idle(Duration::from_secs(600))
                .build()
        },
        |c, k| c.insert(k, k),
    );
    measure(
        "quick_cache 0.7",
        || quick_cache::sync::Cache::<u64, u64>::new(N as usize),
        |c, k| c.insert(k, k),
    );
    measure(
        "moka 0.12",
        || moka::sync::Cache::<u64, u64>::new(N),
        |c, k| {
            c.insert(k, k);
        },
    );
    measure(
        "moka 0.12, time_to_live",
        || {
            moka::sync::Cache::<u64, u64>::builder()
                .max_capacity(N)
                .time_to_live(Duration::from_secs(3600))
                .build()
        },
        |c, k| {
            c.insert(k, k);
        },
    );
}
