//! # herdcache
//!
//! An embeddable, sharded, concurrent in-memory cache for services that sit in front of slow or
//! expensive backends: bounded by entry count or weight, with time to live, time to idle and
//! per-entry expiry, **single-flight loading** for blocking and async callers alike, and
//! **stampede protection** beyond one key (refresh-ahead, jitter, a global load limit, negative
//! caching, and an optional Redis second tier).
//!
//! This page is the guide: [quick start](#quick-start), [loading](#loading),
//! [refresh-ahead and stampede protection](#refresh-ahead-and-stampede-protection),
//! [async use](#async-use), [the Redis tier](#the-redis-tier-feature-redis),
//! [observability](#observability), [features](#cargo-features) and
//! [coming from moka](#coming-from-moka). How it works inside is in `DESIGN.md` in the
//! repository; measurements are in `BENCHMARKS.md`.
//!
//! # Quick start
//!
//! ```
//! use herdcache::Cache;
//! use std::time::Duration;
//!
//! let cache: Cache<String, String> = Cache::builder()
//!     .max_capacity(10_000) // required: herdcache caches are always bounded
//!     .time_to_live(Duration::from_secs(60))
//!     .build();
//!
//! cache.insert("user:1".to_string(), "Ada".to_string());
//! assert_eq!(cache.get("user:1").as_deref(), Some("Ada")); // look up by &str
//!
//! // On a miss, the closure loads the value — once, however many threads miss together.
//! let name = cache.get_with("user:2".to_string(), || "Grace".to_string());
//! assert_eq!(name, "Grace");
//! ```
//!
//! A [`Cache`] is a cheap handle: clone it to share one cache between threads and tasks. Its
//! configuration is checked when it is built ([`CacheBuilder::try_build`] says why a
//! configuration is refused, as a [`BuildError`]).
//!
//! # Loading
//!
//! The `get_with` family looks a key up and, on a miss, runs the closure you pass **once per
//! key**, however many callers miss at the same time: one caller (the leader) runs it, the
//! others wait and receive a clone of its value, which is in the cache before any of them is
//! released. No lock is held while it runs.
//!
//! * [`Cache::get_with`]: the closure returns the value.
//! * [`Cache::try_get_with`]: it returns `Result<V, E>`; an error goes to the leader and every
//!   caller that waited on that load as the same `Arc<E>`, and is not cached.
//! * [`Cache::optionally_get_with`]: it returns `Option<V>`; `None` is not cached.
//! * Their `_by_ref` forms ([`Cache::get_with_by_ref`], …) take a borrowed key (`&str` for
//!   `String` keys) and make an owned key only on a miss.
//! * The entry API ([`Cache::entry`]) adds insert-if-absent verbs that say whether this call
//!   produced the value, and atomic per-key computations ([`EntryRef::and_compute_with`]).
//! * [`Cache::get_all`] loads many keys with one backend call for those missing.
//!
//! A panic in the closure reaches its own caller; the waiters are released and one of them
//! loads again with its own closure. A closure that asks the cache for its own key panics
//! instead of deadlocking. A write or invalidation of the key while it loads wins: the loaded
//! value goes to the callers already waiting, but is not stored. The same holds for the rest
//! of the user code a call runs — a key's or value's `Hash`, `Eq`, `Clone` or `Drop`, the
//! weigher, an `Expiry`, the listener, the spawner: its panic reaches the caller that ran it,
//! and leaves no key waiting, no load permit taken and no entry half-written; the value a call
//! had made for its answer when a later `Drop` panicked is dropped, not leaked.
//!
//! ```
//! use herdcache::Cache;
//! use std::sync::Arc;
//!
//! #[derive(Debug)]
//! struct Unavailable;
//!
//! let cache: Cache<u32, String> = Cache::new(1_000);
//! let r: Result<String, Arc<Unavailable>> = cache.try_get_with(1, || Err(Unavailable));
//! assert!(r.is_err());
//! assert!(!cache.contains_key(&1), "errors are not cached");
//! assert_eq!(cache.try_get_with(1, || Ok::<_, Unavailable>("one".into())).unwrap(), "one");
//! ```
//!
//! A cache can also know how to load any key by itself: give the builder a
//! [`loader`](CacheBuilder::loader) and call [`Cache::load`] (as Caffeine's `LoadingCache`). Its
//! errors come back as [`LoadError`], whose [`source`](std::error::Error::source) is the
//! loader's error.
//!
//! ```
//! use herdcache::{BoxError, Cache, LoadError};
//! use std::error::Error as _;
//!
//! let cache: Cache<u64, String> = Cache::builder()
//!     .max_capacity(1_000)
//!     .loader(|id: &u64| {
//!         if *id == 0 {
//!             return Err(BoxError::from("no user 0"));
//!         }
//!         Ok(format!("user {id}"))
//!     })
//!     .build();
//! assert_eq!(cache.load(7).unwrap(), "user 7");
//! let e = cache.load(0).unwrap_err();
//! assert!(matches!(e, LoadError::Loader(_)));
//! assert_eq!(e.source().unwrap().to_string(), "no user 0");
//! ```
//!
//! # Refresh-ahead and stampede protection
//!
//! Single-flight stops a herd on *one* key. The outage this crate is built against is a herd of
//! *different* keys: a hot set filled together expires together, and every key's first caller
//! loads at the same moment. The builder's defences:
//!
//! * [`refresh_after`](CacheBuilder::refresh_after): a read of an entry older than this returns
//!   its value at once and starts one reload of the key, on the
//!   [`spawner`](CacheBuilder::spawner) if set (else in that reader). On failure the old value
//!   is served — never past its `time_to_live` — and the next attempt waits
//!   [`refresh_backoff`](CacheBuilder::refresh_backoff).
//! * [`jitter`](CacheBuilder::jitter): spreads each entry's deadlines, so that keys written
//!   together do not expire together.
//! * [`max_concurrent_loads`](CacheBuilder::max_concurrent_loads): at most this many loads and
//!   refreshes run at once, across all keys, in arrival order.
//! * [`negative_ttl`](CacheBuilder::negative_ttl): remembers a failed load for a while, so a
//!   down backend sees one call per key per period.
//! * [`early_refresh`](CacheBuilder::early_refresh): probabilistic early refresh (XFetch),
//!   earlier for keys that are slow to load.
//! * [`load_timeout`](CacheBuilder::load_timeout): a soft timeout for [`Cache::load`] that
//!   serves a stale value (or [`LoadError::Timeout`]) while the load goes on.
//! * [`fail_safe`](CacheBuilder::fail_safe): when the load of an *expired* key fails (the
//!   backend is down), its callers get the last value instead of the error, up to `max_stale`
//!   past its time to live, and the key is retried once per backoff (FusionCache's fail-safe).
//!
//! [`Cache::health`] says when a configuration cannot protect its backend — a time to live
//! shorter than the loads, an expiry wave, refreshes that never happen or cannot keep up,
//! thrashing, a saturated load limit, failures reloaded on every call, fail-safe at work —
//! with the figures and a one-line advice for each (thresholds in the [`health`] module).
//!
//! ```
//! use herdcache::{BoxError, Cache, ManualClock};
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let version = Arc::new(AtomicU64::new(0));
//! let v = Arc::clone(&version);
//! let clock = ManualClock::new(); // time moves only when told, for this example
//! let cache: Cache<u64, String> = Cache::builder()
//!     .max_capacity(10_000)
//!     .time_to_live(Duration::from_secs(60)) // the hard bound
//!     .refresh_after(Duration::from_secs(10)) // reload hot keys before that
//!     .jitter(0.1)
//!     .max_concurrent_loads(4)
//!     .loader(move |k: &u64| Ok::<_, BoxError>(format!("{k} v{}", v.fetch_add(1, Ordering::SeqCst))))
//!     .clock(clock.clone())
//!     .build();
//!
//! assert_eq!(cache.load(1).unwrap(), "1 v0");
//! clock.advance(Duration::from_secs(20)); // due for refresh, far from expiry
//! // Served at once; this read (no spawner here) then refreshes the key.
//! assert_eq!(cache.load(1).unwrap(), "1 v0");
//! assert_eq!(cache.get(&1).as_deref(), Some("1 v1"));
//! ```
//!
//! In a service, give refreshes a [`spawner`](CacheBuilder::spawner) (a thread pool, or a
//! runtime handle captured when the cache is built) or, for an
//! [`async_loader`](CacheBuilder::async_loader), a
//! [`future_spawner`](CacheBuilder::future_spawner), so that no reader waits for them. The
//! repository's demo, `cargo run --release --example stampede`, replays the outage with and
//! without these settings.
//!
//! # Async use
//!
//! The same [`Cache`] serves async code: reads and writes are plain calls (they never wait for
//! another caller, so there is nothing to await), and the loads have `_async` twins —
//! [`Cache::get_with_async`], [`Cache::try_get_with_async`],
//! [`Cache::optionally_get_with_async`], the entry API's `_async` verbs, and
//! [`Cache::load_async`] with an [`async_loader`](CacheBuilder::async_loader). They work on any
//! executor (the cache spawns nothing), and blocking and async callers of one key share one
//! load. [`Cache::get_with_async`] documents the bounds on the future and what happens when a
//! caller is cancelled.
//!
//! ```
//! use herdcache::Cache;
//!
//! async fn fetch_user(id: u64) -> String {
//!     format!("user {id}") // a database or HTTP call
//! }
//!
//! let runtime = tokio::runtime::Runtime::new().unwrap();
//! runtime.block_on(async {
//!     let cache: Cache<u64, String> = Cache::new(10_000);
//!     let handles: Vec<_> = (0..16)
//!         .map(|_| {
//!             let cache = cache.clone();
//!             tokio::spawn(async move { cache.get_with_async(7, fetch_user(7)).await })
//!         })
//!         .collect();
//!     for h in handles {
//!         assert_eq!(h.await.unwrap(), "user 7");
//!     }
//! });
//! ```
//!
//! # The Redis tier (feature `redis`)
//!
//! An in-process cache protects one process; a fleet of N instances still sends N loads per key
//! to its backend. With the `redis` feature, `redis::RedisTier` turns a [`CacheBuilder`] into
//! a `redis::TieredCache` (which derefs to [`Cache`]): on a local miss the leader reads Redis
//! before loading and writes what it loads; with leases, one instance in the fleet loads a key
//! while the others wait for its value; writes and invalidations reach every instance over
//! pub/sub; and Redis failing never fails a request (every operation is bounded, and a circuit
//! breaker skips Redis while it fails). See the [`redis` module][redis-module] for the details.
//!
//! ```ignore
//! use herdcache::{codec::Plain, redis::RedisTier, Cache};
//! use std::time::Duration;
//!
//! let cache = RedisTier::new("redis://127.0.0.1:6379/")
//!     .namespace("prices")
//!     .lease(Duration::from_secs(2), Duration::from_millis(500)) // fleet-wide single-flight
//!     .build(
//!         Cache::builder()
//!             .max_capacity(10_000)
//!             .time_to_live(Duration::from_secs(60))
//!             .loader(|sku: &u64| Ok::<_, herdcache::BoxError>(format!("price of {sku}"))),
//!         Plain,
//!     )
//!     .expect("a valid Redis URL");
//! assert_eq!(cache.load(42).unwrap(), "price of 42"); // one instance in the fleet loads
//! cache.invalidate(&42); // every instance drops its copy
//! ```
//!
//! # Observability
//!
//! [`CacheBuilder::record_stats`] and [`Cache::stats`] count hits, misses, loads, removals by
//! cause, callers coalesced, refreshes and other stampede events ([`CacheStats`]);
//! [`CacheBuilder::eviction_listener`] is called once for every entry that leaves the cache,
//! with its [`RemovalCause`]; the `metrics` feature reports the statistics through the
//! `metrics` facade. `Debug` on a cache or a builder shows its configuration.
//!
//! # Cargo features
//!
//! | feature | adds |
//! |---|---|
//! | `metrics` | `Cache::report_metrics`: the statistics through the [`metrics`](https://docs.rs/metrics) facade |
//! | `redis` | the `redis` module: a shared second tier on Redis |
//! | `serde` | `codec::Json`, a JSON codec for the second tier (implies `redis`) |
//! | `testing` | test hooks, not part of the API: `Cache::validate` (checks every internal invariant), `load_limit_stats`, `loads_in_flight` |
//!
//! Without features the crate depends on `parking_lot`, `ahash`, `crossbeam-utils` and
//! `hashbrown` only.
//!
//! # Coming from moka
//!
//! The names are moka's: `Cache::new`, `builder()`, `CacheBuilder::new(max_capacity)`, `get`,
//! `insert`, `invalidate`, `get_with`, `try_get_with`, `optionally_get_with` and their
//! `_by_ref` forms, `entry`/`entry_by_ref` with `or_insert`, `or_default`, `or_insert_with`,
//! `or_optionally_insert_with`, `or_try_insert_with`, `and_compute_with`,
//! `and_try_compute_with`, `and_upsert_with`, `iter()` and `for (k, v) in &cache`, `policy()`,
//! `RemovalCause::was_evicted()`. The differences are deliberate:
//!
//! * `max_capacity` is required: an unbounded cache is the outage.
//! * Writes and reads are not `async`: they never wait for another caller. The loads of
//!   `moka::future::Cache` are the `_async` methods here (`get_with(k, fut).await` becomes
//!   `get_with_async(k, fut).await`).
//! * One `Cache` serves blocking and async callers, and they share loads.
//! * A panicking eviction listener panics the call that removed the entry (after the removal
//!   completed and every other removal was reported), where moka logs it and stops calling the
//!   listener.
//! * `Debug` shows the configuration, not the entries.
//! * `iter()` yields `(K, V)` clones, not `(Arc<K>, V)`; the eviction listener takes `(&K, &V,
//!   RemovalCause)`.
//!
//! The README has the full table, moka call by moka call.
//!
#![cfg_attr(feature = "redis", doc = "[redis-module]: crate::redis")]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[redis-module]: #the-redis-tier-feature-redis"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod answer;
mod builder;
mod by_ref;
mod cache;
mod clock;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod codec;
mod entry;
mod expiry;
mod flight;
mod ghost;
pub mod health;
mod limit;
mod load;
mod load_async;
mod loader;
#[cfg(feature = "metrics")]
mod metrics;
mod monitor;
mod policy;
mod recency;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod refresh;
mod removal;
mod rng;
mod select;
mod settings;
mod shadow;
mod shard;
mod sizing;
mod sketch;
mod stats;
mod sync;
mod unwind;

pub use builder::{BuildError, CacheBuilder};
pub use cache::{Cache, Iter};
pub use clock::ManualClock;
pub use entry::{CompResult, Entry, EntryRef, Op};
pub use expiry::Expiry;
pub use health::{Health, Warning};
pub use loader::LoadError;
pub use removal::RemovalCause;
pub use settings::{BoxError, BoxFuture};
pub use settings::{DefaultHashBuilder, DefaultHasher};
pub use settings::{EvictionPolicy, Policy};
pub use sizing::{Sizing, SUGGEST_MARGIN_POINTS};
pub use stats::{CacheStats, RemoteStats, Removals};

/// The policy selector's running totals (for tests and benchmarks; not a stable API).
#[doc(hidden)]
pub use select::Totals as PolicyTotals;

/// Internals exposed to the loom models only (`RUSTFLAGS="--cfg loom"`).
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::limit::Limiter;
}

/// The README's examples, run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
