//! # herdcache
//!
//! An embeddable, sharded, concurrent in-memory cache for Rust services that sit in front of slow
//! or expensive backends: bounded by entry count or weight, with time-to-live, time-to-idle and
//! per-entry expiry, and a hit ratio that adapts between recency and frequency.
//!
//! ```
//! use herdcache::Cache;
//! use std::time::Duration;
//!
//! let cache: Cache<String, String> = Cache::builder()
//!     .max_capacity(10_000)
//!     .time_to_live(Duration::from_secs(60))
//!     .build();
//! cache.insert("user:1".to_string(), "Ada".to_string());
//! assert_eq!(cache.get("user:1").as_deref(), Some("Ada"));
//! ```
//!
//! ## Design
//!
//! * **Sharding.** A key is hashed once with the cache's [`BuildHasher`](std::hash::BuildHasher)
//!   (by default ahash with a random seed). Bits 40 and up pick the shard; the shard's
//!   `hashbrown` table uses the low bits and the top seven, so routing and probing do not
//!   correlate. Each shard is plain single-threaded code behind a `parking_lot` read-write
//!   lock, padded to its own cache line. Default shard count: four per CPU, fewer for small
//!   caches (at least ~512 entries of capacity per shard).
//! * **Capacity.** The bound is global, not split rigidly: each shard has a *share*, and a
//!   shard evicts only while the cache is over its bound *and* the shard is over its share;
//!   otherwise the insert evicts from a shard that is over its share. Filling an empty cache
//!   of capacity N with N keys keeps all N. When an `insert` returns, the total weight is at
//!   most the bound.
//! * **Policy.** Per shard: a window in front of a main space, on FIFO queues. New keys enter
//!   the window; leaving it, a key that was read there moves to main, any other key must beat
//!   main's next victim on a TinyLFU frequency sketch. Main is split into probation and
//!   protected queues (a probation entry read again is promoted; protected demotes by CLOCK).
//!   The window's size adapts by hill climbing on the hit rate. A hit only bumps a counter on
//!   the entry, under the read lock. See the `policy` module's source for details.
//! * **Expiry.** Deadlines are `u64` nanoseconds on the cache's clock; reads compare them
//!   exactly, so an expired entry is never returned. A hierarchical timer wheel per shard,
//!   advanced by writes (and every 1024th read of a thread, if the lock is free), reclaims
//!   expired entries that nobody touches; there is no background thread. Time comes from the
//!   system's monotonic clock or a [`ManualClock`] for tests.
//! * **Memory.** Per entry, for `K = V = u64` without expiry: a 24-byte slab slot (key, value,
//!   weight, hit counter, policy place, timer bucket; `Option` costs nothing thanks to a niche),
//!   a hash-table bucket of 5 bytes at a load factor between 7/16 and 7/8 (≈ 6–11 bytes per
//!   entry), a 4-byte index in a policy queue (≈ 4–8 bytes with growth slack) and ≈ 2–4 bytes
//!   of frequency sketch. In general, per entry, the slot
//!   `(size_of::<K>() + size_of::<V>() + 8).next_multiple_of(8)` plus about 14 to 23 bytes.
//!   Expiry adds an 8-byte deadline in the slot (and 8 more beside it with both a time to live
//!   and a time to idle) and about 4 to 8 bytes in the timer wheel. Measured with
//!   `cargo run --release --example memory` (1M entries): 28.0–28.8 bytes beyond key and value
//!   without expiry, 40.6 with a time to live.
//!
//! ## Cargo features
//!
//! * `metrics`: `Cache::report_metrics` through the `metrics` facade.
//! * `redis`: a shared second tier on Redis (`redis::TieredCache`): read-through on local
//!   misses, fleet-wide single-flight with leases, invalidation across instances over pub/sub,
//!   and a circuit breaker so that Redis failing never fails a request. Needs Rust 1.88.
//! * `serde`: the `codec::Json` codec for the second tier (implies `redis`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod by_ref;
mod cache;
mod clock;
#[cfg(feature = "redis")]
pub mod codec;
mod entry;
mod expiry;
mod flight;
mod limit;
mod load;
#[cfg(feature = "metrics")]
mod metrics;
mod policy;
#[cfg(feature = "redis")]
pub mod redis;
mod refresh;
mod shard;
mod sketch;
mod stats;
mod sync;

pub use builder::{BuildError, CacheBuilder, DefaultHashBuilder, DefaultHasher};
pub use cache::{Cache, Iter, Policy};
pub use clock::ManualClock;
pub use entry::{CompResult, Entry, EntryRef, Op};
pub use expiry::Expiry;
pub use refresh::{BoxError, BoxFuture, LoadError};
pub use shard::RemovalCause;
pub use stats::{CacheStats, RemoteStats, Removals};

/// Internals exposed to the loom models only (`RUSTFLAGS="--cfg loom"`).
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::limit::Limiter;
}
