//! Bounding a cache by bytes instead of entries.
//!
//! ```text
//! cargo run --example weigher
//! ```

use herdcache::Cache;

fn main() {
    // At most 1 MiB of keys and values.
    let cache: Cache<String, Vec<u8>> = Cache::builder()
        .max_capacity(1 << 20)
        .weigher(|k: &String, v: &Vec<u8>| (k.len() + v.len()).try_into().unwrap_or(u32::MAX))
        .build();
    for i in 0..100 {
        cache.insert(format!("blob-{i}"), vec![0; 64 * 1024]);
        assert!(cache.weighted_size() <= 1 << 20, "never above the bound");
    }
    println!(
        "100 blobs of 64 KiB offered, {} kept, {} bytes in use of {}",
        cache.entry_count(),
        cache.weighted_size(),
        cache.max_capacity()
    );
    // A value heavier than the whole capacity is not stored at all.
    cache.insert("huge".to_string(), vec![0; 2 << 20]);
    println!("a 2 MiB blob stored? {}", cache.contains_key("huge"));
}
