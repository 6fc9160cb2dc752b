//! A shared second tier on Redis (feature `redis`): fleet-wide single-flight and invalidation.
//!
//! An in-process cache protects one process. A service running as N instances still sends N
//! loads per key per time to live to its backend, and a deploy that restarts every instance
//! empties every cache at once. A [`TieredCache`] puts Redis behind the local cache:
//!
//! * **Read-through second tier.** On a local miss the single-flight leader (one caller per
//!   key per instance) reads Redis before calling the loader; a value it loads is written to
//!   Redis with the tier's time to live (`SET … PX`). The local tier keeps its own bound and
//!   expiry (a copy read from Redis expires no later than the copy in Redis). This applies to the builder's [`loader`](crate::CacheBuilder::loader) (so to
//!   [`Cache::load`], its refreshes and soft timeouts) and to [`TieredCache::get_with`] and
//!   [`TieredCache::try_get_with`]. Plain [`Cache::get`] never touches Redis.
//! * **Fleet-wide single-flight** (opt-in, [`RedisTier::lease`]): before loading, the leader
//!   takes a per-key lease (`SET lease token NX PX ttl`, in the same round trip as a second
//!   look at the value). The instance that gets it loads; the others poll Redis for the value
//!   (1 ms, backing off to 20 ms) for at most the lease *wait*, then load themselves. A holder that dies leaves a lease that expires after its *ttl*; a
//!   holder whose loader fails releases it at once, and a waiter takes over. So does one
//!   whose loader, value codec or value's `Clone` panics, whichever of its steps meets it
//!   (decoding the value read with the lease, loading, encoding the value to write back):
//!   the lease is owned by a guard from the round trip that takes it until the write-back
//!   script gives it back (a round trip that may have taken it and that the server refused is
//!   released at once; one that timed out is left to its *ttl*, as a dead holder's). The
//!   lease is released only by its holder (compare-and-delete on the token).
//! * **Invalidation across instances.** [`TieredCache::invalidate`], [`remove`](TieredCache::remove),
//!   [`insert`](TieredCache::insert) and [`invalidate_all`](TieredCache::invalidate_all) update
//!   Redis and publish on the namespace's channel. Every instance runs a subscriber thread that
//!   drops its local copy of the key (or everything) and reconnects by itself when the
//!   connection drops.
//!
//! # Writes are ordered: the fleet never goes back to an older value
//!
//! A load that a write or invalidation of its key superseded (on this instance, or announced
//! by another one while it ran) is neither stored locally nor written back to Redis.
//!
//! Every `insert` and `invalidate` advances a per-key version in Redis in the same script that
//! stores the value or leaves a tombstone (the version is at least the server's clock in
//! microseconds, so it keeps increasing across the key's expiry in Redis) (an invalidation also revokes the key's lease). A
//! load remembers the version it read before loading, and writes its value back only if the
//! version is still that one — and, with leases, only while its lease stands — in one script.
//! `invalidate_all` first advances the namespace's epoch (values written back by loads that
//! read an older epoch are ignored), then tombstones every value. A read finding no epoch (never
//! set, or lost with the data: a restart without persistence, `FLUSHALL`) sets one first, at
//! least the server's clock in microseconds: a load that read before such a loss, whose
//! write-back finds its key's version gone, writes back a value every later read ignores. An instance changes Redis
//! first and its local tier second, so it never reads back from Redis a value it has just
//! invalidated. Messages carry the version: an instance ignores one older than its own write of
//! that key, and an `insert` whose local copy lands after a newer write or invalidation of the
//! key (announced by another instance, or done on this one) or after an `invalidate_all`
//! (done here or announced) drops it, so concurrent writers converge on Redis's value. An
//! instance remembers the versions of its 4,096 most recent keys; for the others it keeps the
//! newest version it forgot, so a write at or below it still counts as possibly superseded
//! (its local copy is dropped: at worst a miss), and a tombstone of a key it forgot counts as
//! missed (with fail-safe, a failed load of that key then gets its error rather than the
//! local copy, as long as the tombstone lasts: at worst an error fail-safe would have
//! answered).
//!
//! The guarantee: **after `insert`, `invalidate`, `remove` or `invalidate_all` returns on any
//! instance, Redis never again yields an older value for the key**, and the other instances
//! drop their local copies within the pub/sub delivery time (bounded by the local time to
//! live when messages are lost, see below). Bounds on it: a tombstone lives as long as
//! values do (the tier's time to live, or the lease time to live if longer; with fail-safe,
//! at least the cache's time to live plus `max_stale`, see below), so a load that
//! began before an invalidation and runs longer than that could still write back; and a write
//! needs Redis: one made while Redis is unreachable (the operation fails or times out, or the
//! circuit breaker is open and skips it) changes the local tier only — Redis keeps what it
//! had, and the other instances are not told (nothing is queued for later). A write the
//! server refuses (`OOM`) deletes the key instead and tells the other instances, but carries
//! no version: a load that found the key absent before it, on an instance that misses that
//! message, can still write its value back once the server takes writes again. An
//! `invalidate_all` that Redis stops answering partway through its `SCAN` has tombstoned the
//! values it reached, and loaded values from before it are ignored (the epoch moved first);
//! inserted values it did not reach (they carry no epoch) stay readable. It is announced
//! all the same, so the other instances drop their copies.
//!
//! The order is Redis's clock. Versions and the epoch count on from the server's clock in
//! microseconds: a stored counter ahead of it — a stray write, or the server's clock stepped
//! back — is counted on while its key lives; once the key is lost (expired, evicted, a
//! restart), the next write starts again at the clock, below what a load or an instance may
//! have read before, and the order can go back by up to that lead. A counter more than
//! 2^41 µs (25 days) ahead, negative or not a number is a stray write: it counts as none and
//! is replaced by the next write (a read replaces such an epoch at once).
//!
//! # Key layout
//!
//! For a namespace `ns` of `n` bytes and a key encoded as `k`: the value is the hash
//! `hc:<n>:<ns>:v{<k>}` (fields `d` value, `v` version, `e` epoch of a loaded value), the lease
//! `hc:<n>:<ns>:l{<k>}`, the epoch `hc:<n>:<ns>:epoch`, the channel `hc:<n>:<ns>:invalidate`.
//! The length prefix makes namespaces prefix-free (`invalidate_all` in `app` never touches
//! `app:v`), and the `{<k>}` hash tag keeps a key's value and lease in one Cluster slot. A key
//! of another type found there (an older layout, a stray write) is a per-key error: it does
//! not count against the circuit breaker, and the next write of the key replaces it.
//!
//! # Time to live, refresh, and how stale an instance can get
//!
//! Values live in Redis for the tier's time to live ([`RedisTier::ttl`], by default the
//! cache's `time_to_live`). A copy an instance reads from Redis expires locally when the copy
//! in Redis does (the read fetches its `PTTL`; reads of the local copy, which move its deadline
//! under a time to idle or an `Expiry`, never move it past that), so without invalidations no
//! instance serves a value it read from Redis longer than the tier's time to live after it was
//! loaded. The instance that loaded (or inserted) a value keeps its own copy as its own
//! settings say — its time to live, time to idle or `Expiry`, which may be longer than the
//! tier's: that copy is the value it wrote, not one it learnt from Redis.
//!
//! With `refresh_after`, a refresh reads Redis too, but takes only a value younger than
//! `refresh_after` (one another instance's refresh just loaded); an older one is the value
//! being refreshed, so it loads (under the lease, if leases are on) and writes the new value
//! for the others. One instance refreshes each key for the fleet.
//!
//! The subscriber sends a PING after a second without messages and reconnects if it is not
//! answered within a second, so a connection that silently stopped delivering (a dropped NAT
//! entry, a failover) is replaced within about two seconds.
//! Invalidation messages are not replayed (Redis pub/sub keeps nothing): an instance whose
//! subscriber was disconnected when a message was sent keeps serving its local copy until that
//! copy expires — **at most the local time to live** (or time to idle), and for a copy read
//! from Redis never past the tier's time to live from the load. [`RedisTier::clear_on_reconnect`] bounds this by the
//! disconnection instead, at the price of refilling the local tier (from Redis) after every
//! reconnect (and once when the subscriber first subscribes: what the instance loaded before
//! then may have missed messages too). A load that read Redis just before another instance's
//! `DEL` is bounded the same way.
//!
//! With [`fail_safe`](crate::CacheBuilder::fail_safe) a local copy is kept past its time to
//! live, and a failed load of it may serve it up to `max_stale` longer. A missed invalidation
//! of the key does not let that happen: the failed load's read of Redis finds the key's
//! tombstone, and the load's callers get its error (tombstones then live at least the longer
//! of the cache's and the tier's time to live plus `max_stale`, so that the tombstone is
//! still there; a copy whose lifetime a time to idle or an [`Expiry`](crate::Expiry) sets
//! beyond that is covered by `clear_on_reconnect` only). So do a soft timeout's callers, and
//! callers arriving while such a load runs; a refresh that reads the tombstone and fails
//! keeps the copy until its time to live, as a missed message does, and the copy is then no
//! fallback at all (not even for [`get_or_stale`](crate::Cache::get_or_stale), which reads no
//! Redis). A missed *write* of a value (an `insert`, or another instance's
//! load written back over the tombstone) is seen only while that value lives in Redis (the
//! tier's time to live): the failed load's read finds the newer value and answers with it
//! (or, if it is too large for this instance's `max_value_size`, at least knows the copy is
//! superseded, and answers the error);
//! once it has expired there, nothing in Redis tells the copy from before it apart, and
//! fail-safe can serve that copy.
//!
//! What fail-safe sees of a missed invalidation is what a *read of Redis* sees, and only a
//! load through the tier reads. So these answers come from no read, and can serve a copy
//! another instance invalidated:
//!
//! * a caller within the retry backoff of a failed load, where the invalidation came after
//!   that load's read (backoff answers read nothing: that is what spares the backend and
//!   Redis during an outage) — until the retry, a `refresh_backoff` after the failure, reads
//!   the tombstone;
//! * a soft timeout that passes, or an async load cancelled, before its load's read of Redis
//!   completed (waiting for a `max_concurrent_loads` permit: the tier's read runs under the
//!   permit); the abandoned load starts the backoff on the copy, and the callers within it
//!   are answered with it too, until the retry. (A read that completed marks its load, even
//!   an async one cancelled before it took the read's answer: the round trip's helper thread
//!   marks it.)
//! * calls that [`TieredCache`] leaves local — the entry API and `get_all` — whose loads
//!   never read Redis: their fail-safe answers see no tombstone, up to `max_stale`, unless a
//!   load through the tier reads it first (its failure then drops the copy).
//!
//! A tombstone lives as long as the *invalidating* instance's settings say (the longer of
//! its cache's and the tier's time to live, plus its `max_stale`): instances sharing a
//! namespace should share their time to live and fail-safe settings, or an instance
//! without fail-safe leaves tombstones that expire before another's stale window ends.
//! A missed `invalidate_all` is seen the same
//! way only while its tombstones last; for a key that was not in Redis when it ran (evicted or
//! expired there), or once the tombstones have expired, nothing in Redis tells it apart, and
//! the copy from before it can be served as fail-safe's last value.
//! [`clear_on_reconnect`](RedisTier::clear_on_reconnect) closes this too (the copies go
//! when the subscriber reconnects).
//!
//! # Redis failing never fails a request
//!
//! Every Redis operation is bounded by one deadline: the connect timeout (only when no pooled
//! connection is free: connect and handshake) plus the operation timeout
//! ([`RedisTier::timeouts`]; defaults 100 ms and 50 ms) for writing the request *and reading
//! the whole reply*. Each socket read is given what is left of the deadline, so a reply that
//! drips in a byte at a time (a congested link, a swapping server) times out like one that
//! never comes. This holds on `redis://`, on `rediss://` (the TLS layer's reads and writes
//! too; the handshake is part of connecting) and on a Redis Cluster (routing, redirects and
//! every node's reply within the one deadline); only `redis+unix://` sockets bound each read
//! instead. A failure or timeout
//! counts as "Redis has nothing": the value is loaded locally, and the rest of that call's
//! Redis work (lease, write) is skipped, so a call pays for at most one failed operation.
//! After [`breaker_failures`](RedisTier::breaker) failures in a row a circuit breaker opens
//! and operations are skipped without touching the network for its cooldown (default 1 s);
//! then one probe operation is let through, and a success closes it.
//! Beyond its load, a call thus waits at most the lease wait, the Redis operations that
//! succeed, and one failed operation.
//!
//! What concerns one key only does not count against the breaker: a server error about the
//! operation (`WRONGTYPE`, a key of another type: the next write repairs it; `ERR`; `OOM`: an
//! `insert` or `invalidate` the server refuses deletes the key's value instead, and still
//! tells the other instances),
//! and a value larger than
//! [`RedisTier::max_value_size`] (default 1 MiB), which is kept in the local tier only and
//! never sent (an `insert` of one leaves a tombstone in Redis instead). Errors about the
//! server as a whole (`NOAUTH`, `NOPERM`, `BUSY`, `LOADING`, `READONLY`, `MISCONF`, …) do
//! count.
//! Loader errors are returned exactly as without the tier; Redis errors never are.
//! [`CacheStats::remote`](crate::CacheStats) counts hits, misses, writes, errors, timeouts,
//! skipped operations, breaker openings, leases, messages and oversized values.
//!
//! # Connections: TLS, keepalive, managed Redis
//!
//! * `redis://host:port/db` (with `user:password@` if the server wants `AUTH`): the tier's
//!   own connections, with the whole-operation deadline above.
//! * `rediss://host:port/` with the **`redis-tls`** feature: rustls (no system OpenSSL) over
//!   the tier's own connections, with the same whole-operation deadline: every socket read
//!   and write of the TLS layer gets what is left of it, and the handshake is bounded by the
//!   connect timeout. The server certificate is checked against the system's roots, or
//!   [`RedisTier::tls_root_certificate`] for a private CA;
//!   [`RedisTier::tls_client_certificate`] presents a client certificate (Redis asks for one
//!   by default, `tls-auth-clients yes`). If no rustls crypto provider is installed, the
//!   tier installs rustls's `ring` provider for the process. (The subscriber's connection is
//!   the `redis` crate's, over the same TLS settings.) Without the feature a `rediss://` URL
//!   is a [`TierError::Url`].
//! * Every socket has `TCP_NODELAY` and TCP keepalive (first probe after 10 s idle, then
//!   every 5 s, 3 probes): a connection whose peer vanished without a word (a failover, a
//!   dropped NAT entry) is closed by the kernel within about 25 s instead of staying half
//!   open; the subscriber's own PING (below) notices within about 2 s.
//! * **Managed Redis** (ElastiCache, Memorystore, Azure Cache for Redis, Redis Cloud) in
//!   non-cluster mode: use its primary endpoint with `rediss://` when in-transit encryption
//!   is on (their certificates chain to public roots).
//! * **Sentinel**: the tier does not query Sentinel itself. Point it at an address that
//!   follows the primary (a DNS name or virtual IP updated on failover, or a proxy such as
//!   HAProxy checking `role:master`): after a failover the old connections fail, the breaker
//!   opens for its cooldown, and new connections reach the new primary.
//! * **Redis Cluster** with the **`redis-cluster`** feature: [`RedisTier::cluster`] with
//!   some of its nodes (also `rediss://`). A key's value and lease share a slot (their hash
//!   tag), keys spread over the slots, each command goes to its key's node (a read pipelines
//!   per node: the key's and the namespace epoch's, one round trip each, in turn),
//!   `invalidate_all` scans every primary, and messages reach every instance (cluster
//!   pub/sub is broadcast; the subscriber tries the given nodes in turn). The tier keeps the
//!   slot map itself (`CLUSTER SLOTS`, fetched when a connection opens after a node failed)
//!   and holds one of its own connections per primary, so the whole-operation deadline holds
//!   here too: routing, every node's reply, and redirects are bounded together. During a
//!   resharding or after a failover, a `MOVED` reply updates the slot map and the command
//!   is re-sent to the new owner; an `ASK` reply (a slot being migrated) re-sends it to the
//!   target after `ASKING`; at most 5 redirects per command, all within the deadline. A
//!   script on two keys of a slot caught mid-migration with only one key moved gets
//!   `TRYAGAIN`, which counts as a failure (the next call retries). Only primaries are read.
//!   Managed services in cluster mode work the same way, with their configuration endpoint
//!   as a node.
//!
//! Failovers lose the writes the replica had not received (Redis replicates asynchronously):
//! a key's version can then go back, and the ordering guarantee above holds only for writes
//! the new primary has. Use `WAIT` or a single primary where that matters.
//!
//! # Async loads
//!
//! [`Cache::load_async`] (with the builder's `async_loader`), async refreshes, and
//! [`TieredCache::get_with_async`] / [`try_get_with_async`](TieredCache::try_get_with_async)
//! use the tier too. The Redis client is blocking, so each of their Redis round trips (read,
//! lease, each poll of a lease wait, write) runs on a helper thread (started on demand, at
//! most 64, gone after 10 s idle) while the future waits, and the pauses of a lease wait are
//! timer futures served by one timer thread: no executor thread blocks on the network, a
//! caller waiting on another instance's lease holds no thread at all (256 such callers wait
//! at once), and no runtime is required. The write to Redis happens after the value is
//! returned.
//!
//! # Example
//!
//! ```no_run
//! use herdcache::codec::Plain;
//! use herdcache::redis::RedisTier;
//! use herdcache::Cache;
//! use std::time::Duration;
//!
//! let cache = RedisTier::new("redis://127.0.0.1:6379/")
//!     .namespace("prices")
//!     .lease(Duration::from_secs(2), Duration::from_millis(500))
//!     .build(
//!         Cache::builder()
//!             .max_capacity(10_000)
//!             .time_to_live(Duration::from_secs(60))
//!             .loader(|sku: &u64| Ok::<_, herdcache::BoxError>(format!("price of {sku}"))),
//!         Plain,
//!     )
//!     .expect("a valid Redis URL");
//! // One instance in the fleet loads; the others find the value in Redis.
//! assert_eq!(cache.load(42).unwrap(), "price of 42");
//! cache.invalidate(&42); // every instance drops its copy
//! println!("{:?}", cache.stats().remote);
//! ```

mod client;
mod conn;
mod offload;
mod scripts;
mod subscriber;
mod tier;

use crate::answer::after_dropping;
use crate::builder::{BuildError, CacheBuilder};
use crate::cache::Cache;
use crate::codec::Codec;
use crate::stats::RemoteCounters;
use client::{Breaker, Client};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tier::{LeaseConfig, Tier};

/// The default of [`RedisTier::max_value_size`]: 1 MiB.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1 << 20;

/// Why a [`TieredCache`] could not be built.
///
/// ```
/// use herdcache::{codec::Plain, redis::{RedisTier, TierError}, Cache};
/// let no_ttl = RedisTier::new("redis://127.0.0.1/")
///     .build(Cache::<u64, u64>::builder().max_capacity(10), Plain);
/// assert!(matches!(no_ttl, Err(TierError::NoTtl)));
/// let bad_url = RedisTier::new("http://example.com/")
///     .ttl(std::time::Duration::from_secs(1))
///     .build(Cache::<u64, u64>::builder().max_capacity(10), Plain);
/// assert!(matches!(bad_url, Err(TierError::Url(_))));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum TierError {
    /// The Redis URL is not valid.
    Url(::redis::RedisError),
    /// Neither [`RedisTier::ttl`] nor the cache's `time_to_live` says how long values may live
    /// in Redis.
    NoTtl,
    /// The cache's own configuration is invalid.
    Build(BuildError),
    /// The subscriber thread could not be started.
    Thread(std::io::Error),
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TierError::Url(e) => write!(f, "invalid Redis URL: {e}"),
            TierError::NoTtl => f.write_str(
                "the second tier needs a time to live: set RedisTier::ttl or time_to_live",
            ),
            TierError::Build(e) => write!(f, "{e}"),
            TierError::Thread(e) => write!(f, "cannot start the subscriber thread: {e}"),
        }
    }
}

/// [`source`](std::error::Error::source) is the wrapped error (the Redis client's, the
/// configuration's, the thread spawn's), `None` for [`TierError::NoTtl`].
impl std::error::Error for TierError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TierError::Url(e) => Some(e),
            TierError::Build(e) => Some(e),
            TierError::Thread(e) => Some(e),
            TierError::NoTtl => None,
        }
    }
}

/// Configures a Redis second tier; [`build`](Self::build) turns a [`CacheBuilder`] into a
/// [`TieredCache`]. See the [module docs](self) for what the tier does.
///
/// No connection is made by `build`: Redis may be down when the cache starts (it is then
/// used from the moment it answers).
///
/// # Example
///
/// Every setting, against a port where nothing listens: the cache works, from its loader.
///
/// ```
/// use herdcache::{codec::Plain, redis::RedisTier, Cache};
/// use std::time::Duration;
///
/// let cache = RedisTier::new("redis://127.0.0.1:1/")
///     .namespace("users-v2")
///     .ttl(Duration::from_secs(300)) // in Redis; default: the cache's time to live
///     .lease(Duration::from_secs(2), Duration::from_millis(500))
///     .timeouts(Duration::from_millis(100), Duration::from_millis(50))
///     .breaker(3, Duration::from_secs(1))
///     .clear_on_reconnect(true)
///     .build(
///         Cache::builder()
///             .max_capacity(1_000)
///             .time_to_live(Duration::from_secs(60))
///             .record_stats()
///             .loader(|id: &u64| Ok::<_, herdcache::BoxError>(format!("user {id}"))),
///         Plain,
///     )
///     .unwrap();
/// assert_eq!(cache.load(7).unwrap(), "user 7");
/// let remote = cache.stats().remote;
/// assert!(remote.errors >= 1 && remote.hits == 0);
/// ```
#[derive(Clone, Debug)]
pub struct RedisTier {
    url: String,
    namespace: String,
    ttl: Option<Duration>,
    lease: Option<LeaseConfig>,
    connect_timeout: Duration,
    op_timeout: Duration,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    clear_on_reconnect: bool,
    max_value_size: usize,
    tls: TlsFiles,
    /// The nodes of a Redis Cluster (empty: one server at `url`).
    #[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
    cluster: Vec<String>,
}

/// Certificates for `rediss://` (PEM), printed redacted.
#[derive(Clone, Default)]
struct TlsFiles {
    root: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("root", &self.root.as_ref().map(|_| "<PEM>"))
            .field("client", &self.client.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RedisTier {
    /// A tier on the Redis server at `url` (`redis://host:port/db`), with the defaults:
    /// namespace `herdcache`, no leases, 100 ms connect and 50 ms operation timeouts, a
    /// breaker that opens after 3 failures in a row for 1 s, values up to 1 MiB.
    pub fn new(url: impl Into<String>) -> Self {
        RedisTier {
            url: url.into(),
            namespace: "herdcache".into(),
            ttl: None,
            lease: None,
            connect_timeout: Duration::from_millis(100),
            op_timeout: Duration::from_millis(50),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
            clear_on_reconnect: false,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            tls: TlsFiles::default(),
            cluster: Vec::new(),
        }
    }

    /// A tier on a Redis Cluster (feature `redis-cluster`), given some of its nodes
    /// (`redis://host:port/` or `rediss://…`; the others are discovered), with the defaults of
    /// [`new`](Self::new). Keys of a namespace spread over the cluster's slots (a key's value
    /// and lease share one, by their hash tag); each command goes to its key's node;
    /// invalidation messages reach every instance (pub/sub is cluster-wide), and the
    /// subscriber tries each given node in turn. The deadline of an operation bounds it whole,
    /// as on one server, with `MOVED`/`ASK` redirects followed within it; a read takes one
    /// round trip per node involved (the key's, and the namespace epoch's).
    ///
    /// ```
    /// use herdcache::{codec::Plain, redis::RedisTier, Cache};
    /// let cache = RedisTier::cluster(["redis://127.0.0.1:1/", "redis://127.0.0.1:2/"])
    ///     .namespace("users")
    ///     .build(
    ///         Cache::<u64, u64>::builder()
    ///             .max_capacity(100)
    ///             .time_to_live(std::time::Duration::from_secs(60)),
    ///         Plain,
    ///     )
    ///     .unwrap();
    /// assert_eq!(cache.get_with(1, || 10), 10); // no cluster there: loaded locally
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster<I, U>(nodes: I) -> Self
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut tier = RedisTier::new(nodes.first().cloned().unwrap_or_default());
        tier.cluster = nodes;
        tier
    }

    /// The namespace of every Redis key and of the channel (see the module docs' key layout).
    /// Instances share values only within a namespace; give each cache (and each value type or
    /// codec version) its own. A namespace with `{` or `}` in it puts all its keys in one
    /// Cluster slot.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long values live in Redis (`SET … PX`). Default: the cache's `time_to_live`.
    /// Required when the cache has none (e.g. with a custom `expire_after`). Local copies read
    /// from Redis expire with the Redis copy; the copy of a value an instance loaded or
    /// inserted itself keeps the cache's own expiry (see the module docs).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Turns on fleet-wide single-flight: a per-key lease that lives at most `ttl` (make it
    /// longer than a typical load), and a bounded `wait` for another instance's value before
    /// loading locally.
    pub fn lease(mut self, ttl: Duration, wait: Duration) -> Self {
        self.lease = Some(LeaseConfig { ttl, wait });
        self
    }

    /// The time allowed to open a connection (connect and handshake), and for each operation:
    /// one deadline for writing its request and reading its whole reply (see the module docs).
    pub fn timeouts(mut self, connect: Duration, operation: Duration) -> Self {
        self.connect_timeout = connect.max(Duration::from_millis(1));
        self.op_timeout = operation.max(Duration::from_millis(1));
        self
    }

    /// The circuit breaker: opens after `failures` failed operations in a row, and skips Redis
    /// for `cooldown` before probing it again.
    pub fn breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// The largest encoded value written to Redis, in bytes (default 1 MiB, as memcached's
    /// item size). A larger value is kept in the local tier only: its load's write-back is
    /// skipped, and an [`insert`](TieredCache::insert) of it leaves a tombstone in Redis (so no
    /// instance reads an older value from there); both are counted in
    /// [`RemoteStats::oversized`](crate::RemoteStats), not as failures, so one huge value never
    /// opens the circuit breaker for every key. A larger value found in Redis (written by an
    /// instance with a larger maximum) is not read either: the read sees the key as absent
    /// (counted as oversized), loads it, and writes its own value back over it. Keep it well under what the operation timeout
    /// lets the link carry (1 MiB takes about 8 ms at 1 Gbit/s).
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// For `rediss://` URLs (feature `redis-tls`): trust this certificate authority (PEM)
    /// instead of the system's roots, e.g. a private CA of a self-hosted Redis.
    ///
    /// ```
    /// # use herdcache::{codec::Plain, redis::RedisTier, Cache};
    /// let ca = b"-----BEGIN CERTIFICATE-----\n...".to_vec(); // std::fs::read("ca.crt")
    /// let tier = RedisTier::new("rediss://redis.internal:6380/").tls_root_certificate(ca);
    /// ```
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root = Some(pem.into());
        self
    }

    /// For `rediss://` URLs (feature `redis-tls`): present this client certificate and key
    /// (PEM) to the server, for servers that authenticate clients (`tls-auth-clients yes`,
    /// Redis's default).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Clears the local tier whenever the subscriber reconnects, since invalidations sent
    /// while it was disconnected are lost — and when it first subscribes, since the cache can
    /// load values before that (a slow first connection misses messages as a failed one
    /// does). Default: off (staleness bounded by the local TTL).
    pub fn clear_on_reconnect(mut self, on: bool) -> Self {
        self.clear_on_reconnect = on;
        self
    }

    /// Builds the cache with the tier, using `codec` for keys and values.
    ///
    /// # Errors
    ///
    /// [`TierError`]: an invalid URL or cache configuration, or no time to live.
    pub fn build<K, V, S, C>(
        self,
        builder: CacheBuilder<K, V, S>,
        codec: C,
    ) -> Result<TieredCache<K, V, S>, TierError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        S: BuildHasher + Clone + Send + Sync + 'static,
        C: Codec<K> + Codec<V> + Clone,
    {
        self.build_with(builder, codec.clone(), codec)
    }

    /// [`build`](Self::build) with separate codecs for keys and values.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    pub fn build_with<K, V, S>(
        self,
        mut builder: CacheBuilder<K, V, S>,
        key_codec: impl Codec<K>,
        value_codec: impl Codec<V>,
    ) -> Result<TieredCache<K, V, S>, TierError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        S: BuildHasher + Clone + Send + Sync + 'static,
    {
        let (target, subscribe) = self.target().map_err(TierError::Url)?;
        let ttl = match (self.ttl, builder.ttl) {
            (Some(t), _) => t,
            (None, Some(t)) => t,
            (None, None) => return Err(TierError::NoTtl),
        };
        // Each local copy read from Redis is bounded by the shared copy's remaining life,
        // whatever the local cache's own expiry: its shards must keep a deadline per entry.
        builder.bounded_lifetimes = true;
        let counters = Arc::new(RemoteCounters::default());
        let client = Client::new(
            target,
            subscribe,
            self.connect_timeout,
            self.op_timeout,
            Breaker::new(self.breaker_failures, self.breaker_cooldown),
            Arc::clone(&counters),
        );
        // With fail-safe, a local copy may be served up to `max_stale` past its deadline
        // (its time to live, or the tier's for a copy read from Redis): the tombstone of an
        // invalidation this instance missed must last that long for a failed load to see it.
        let stale = builder.stampede.fail_safe.map(|max_stale| {
            let local = builder.ttl.map_or(ttl, |t| t.max(ttl));
            local.saturating_add(Duration::from_nanos(max_stale))
        });
        let tier = Arc::new(Tier::new(
            client,
            Box::new(key_codec),
            Box::new(value_codec),
            &self.namespace,
            (ttl, stale.unwrap_or(Duration::ZERO)),
            self.lease,
            self.max_value_size,
        ));
        // Loads take any value Redis has; refreshes only one loaded since the value they
        // replace was (younger than `refresh_after`): another instance's refresh.
        let fresh = builder.refresh_after;
        let st = &mut builder.stampede;
        if let Some(load) = st.loader.take() {
            let wrap = |max_age| -> crate::settings::LoaderFn<K, V> {
                let (t, load) = (Arc::clone(&tier), Arc::clone(&load));
                Arc::new(move |k: &K| t.fetch(k, max_age, || load(k)))
            };
            st.loader = Some(wrap(None));
            st.refresh_loader = Some(wrap(fresh));
        }
        if let Some(load) = st.async_loader.take() {
            let wrap = |max_age| -> crate::settings::AsyncLoaderFn<K, V> {
                let (t, load) = (Arc::clone(&tier), Arc::clone(&load));
                Arc::new(move |k: &K| {
                    let fut = load(k);
                    Box::pin(Arc::clone(&t).fetch_async(k.clone(), max_age, fut))
                })
            };
            st.async_loader = Some(wrap(None));
            st.async_refresh_loader = Some(wrap(fresh));
        }
        let cache = builder.try_build().map_err(TierError::Build)?;
        // A fresh cache: nothing else can have set it.
        let _ = cache.inner.remote.set(counters);
        subscriber::spawn(&cache, Arc::clone(&tier), self.clear_on_reconnect)
            .map_err(TierError::Thread)?;
        Ok(TieredCache { cache, tier })
    }
}

impl RedisTier {
    /// Where the tier's connections go, and the clients the subscriber tries in turn.
    fn target(&self) -> ::redis::RedisResult<(conn::Target, Vec<::redis::Client>)> {
        #[cfg(feature = "redis-cluster")]
        if !self.cluster.is_empty() {
            let infos = self
                .cluster
                .iter()
                .map(|u| connection_info(u))
                .collect::<::redis::RedisResult<Vec<_>>>()?;
            let subscribe = infos
                .iter()
                .map(|i| client(i.clone(), &self.tls))
                .collect::<::redis::RedisResult<Vec<_>>>()?;
            let mut seeds = Vec::new();
            for info in &infos {
                match info.addr() {
                    ::redis::ConnectionAddr::Tcp(host, port)
                    | ::redis::ConnectionAddr::TcpTls { host, port, .. } => {
                        seeds.push((host.clone(), *port));
                    }
                    _ => {
                        return Err(::redis::RedisError::from((
                            ::redis::ErrorKind::InvalidClientConfig,
                            "a cluster node must be a redis:// or rediss:// address",
                        )))
                    }
                }
            }
            let dial = self.dial(&infos[0])?;
            let cluster = conn::cluster::Cluster::new(seeds, dial);
            return Ok((
                conn::Target::Cluster(std::sync::Arc::new(cluster)),
                subscribe,
            ));
        }
        let info = connection_info(&self.url)?;
        let raw = client(info.clone(), &self.tls)?;
        Ok((
            conn::Target::Server {
                dial: self.dial(&info)?,
                raw: raw.clone(),
            },
            vec![raw],
        ))
    }

    /// How the tier's own connections to `info`'s server (or cluster) are set up.
    fn dial(&self, info: &::redis::ConnectionInfo) -> ::redis::RedisResult<conn::Dial> {
        #[cfg(feature = "redis-tls")]
        let tls = match info.addr() {
            ::redis::ConnectionAddr::TcpTls {
                insecure: false, ..
            } => Some(std::sync::Arc::new(tls_config(&self.tls)?)),
            _ => None,
        };
        Ok(conn::Dial {
            info: info.clone(),
            #[cfg(feature = "redis-tls")]
            tls,
        })
    }
}

/// The rustls configuration of the tier's own `rediss://` connections: the given root
/// certificate (else the system's roots, as the `redis` crate's connections use) and client
/// certificate.
#[cfg(feature = "redis-tls")]
fn tls_config(tls: &TlsFiles) -> ::redis::RedisResult<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    fn invalid(e: impl std::fmt::Display) -> ::redis::RedisError {
        ::redis::RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "TLS configuration",
            e.to_string(),
        ))
    }
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.root {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.map_err(invalid)?).map_err(invalid)?;
            }
        }
        None => {
            // Roots that fail to parse are skipped, as the `redis` crate's connections do
            // with the ones they cannot add.
            let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match &tls.client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(invalid)?;
            builder.with_client_auth_cert(chain, key).map_err(invalid)
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// rustls needs a process-wide crypto provider: `ring`, unless the application installed
/// one.
///
/// rustls 0.23.48 deprecates `ring::default_provider` because *ring* has no post-quantum key
/// exchange; the other built-in provider (aws-lc-rs) needs a C compiler (CMake on some
/// platforms) to build, which this feature promises not to need. An application that wants
/// post-quantum key exchange installs its provider before the first `rediss://` connection;
/// this one is installed only if none is.
#[cfg(feature = "redis-tls")]
#[allow(deprecated)]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(feature = "redis-tls")]
fn tls_certificates(tls: &TlsFiles) -> ::redis::TlsCertificates {
    ::redis::TlsCertificates {
        client_tls: tls
            .client
            .clone()
            .map(|(client_cert, client_key)| ::redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: tls.root.clone(),
    }
}

/// The URL's connection settings, with `TCP_NODELAY` and TCP keepalive on every socket.
fn connection_info(url: &str) -> ::redis::RedisResult<::redis::ConnectionInfo> {
    use ::redis::io::tcp::TcpSettings;
    let info = ::redis::IntoConnectionInfo::into_connection_info(url)?;
    let tcp = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(conn::keepalive());
    Ok(info.set_tcp_settings(tcp))
}

/// The `redis` crate's client for `info`, with the TLS certificates if any.
fn client(info: ::redis::ConnectionInfo, tls: &TlsFiles) -> ::redis::RedisResult<::redis::Client> {
    #[cfg(feature = "redis-tls")]
    {
        if matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. }) {
            install_crypto_provider();
            return ::redis::Client::build_with_tls(info, tls_certificates(tls));
        }
    }
    let _ = tls;
    ::redis::Client::open(info)
}

/// A [`Cache`] with a Redis second tier (see the [module docs](self)).
///
/// It dereferences to its local [`Cache`], so every read method (`get`, `load`, `stats`, …)
/// is available; the methods below replace the cache's own where the fleet must hear of
/// it. What the local cache does on its own stays local: `retain`, the entry API, and
/// anything done through [`local`](Self::local). Clones are handles to the same cache. The
/// subscriber thread stops when the last handle (and the last clone of the local cache) is
/// dropped.
///
/// # Example
///
/// (With no Redis listening, as here, each call works on the local tier alone.)
///
/// ```
/// use herdcache::{codec::Plain, redis::{RedisTier, TieredCache}, Cache};
/// use std::time::Duration;
///
/// let cache: TieredCache<String, u64> = RedisTier::new("redis://127.0.0.1:1/")
///     .build(
///         Cache::builder().max_capacity(100).time_to_live(Duration::from_secs(60)),
///         Plain,
///     )
///     .unwrap();
/// cache.insert("a".to_string(), 1); // here, in Redis, and dropped by the other instances
/// assert_eq!(cache.get("a"), Some(1)); // `get` is the local cache's: never touches Redis
/// assert_eq!(cache.get_with("b".to_string(), || 2), 2); // Redis first, then the closure
/// cache.invalidate(&"a".to_string()); // everywhere
/// assert!(!cache.contains_key("a"));
/// ```
pub struct TieredCache<K, V, S = crate::DefaultHashBuilder> {
    cache: Cache<K, V, S>,
    tier: Arc<Tier<K, V>>,
}

impl<K, V, S> Clone for TieredCache<K, V, S> {
    fn clone(&self) -> Self {
        TieredCache {
            cache: self.cache.clone(),
            tier: Arc::clone(&self.tier),
        }
    }
}

impl<K, V, S> fmt::Debug for TieredCache<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredCache")
            .field("local", &self.cache)
            .field("subscribed", &self.tier.subscribed.load(Ordering::Relaxed))
            .field("breaker_open", &self.tier.client.breaker.is_open())
            .finish_non_exhaustive()
    }
}

impl<K, V, S> Deref for TieredCache<K, V, S> {
    type Target = Cache<K, V, S>;

    fn deref(&self) -> &Cache<K, V, S> {
        &self.cache
    }
}

impl<K, V, S> TieredCache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The local tier alone. Its `insert` and `invalidate` do not reach the other instances.
    pub fn local(&self) -> &Cache<K, V, S> {
        &self.cache
    }

    /// Writes the value to Redis (a new version of the key), tells the other instances to drop
    /// their copies (they read the new value from Redis on their next miss), then inserts
    /// locally. A load of the key running anywhere in the fleet does not overwrite it.
    ///
    /// A key the key codec cannot encode is not in Redis: it is inserted here, and the other
    /// instances, which cannot be told which key it is, are told to drop every local copy.
    ///
    /// The local copy lives as the cache's own settings say (not bounded by the tier's time
    /// to live, unlike a copy read from Redis).
    ///
    /// Blocks for the Redis write and publish (each bounded by the operation timeout; skipped
    /// while the breaker is open). A write Redis does not get (it fails, times out, or the
    /// breaker skips it) is local only: Redis keeps the key's older value, the other instances
    /// are not told, and nothing retries it (the module docs' guarantee needs Redis).
    ///
    /// # Panics
    ///
    /// A panic of user code the write calls goes on to the caller: the key or value codec's
    /// (raised before anything is written, to Redis or here), or one raised by the local
    /// insert — the eviction listener's, a replaced value's `Drop` — after the insert and the
    /// check that a newer write of the key wins over it have completed.
    pub fn insert(&self, key: K, value: V) {
        let clears = self.tier.clears();
        let written = self.tier.put(&key, &value);
        match written {
            Some((encoded, version)) => {
                let k = key.clone();
                // The local insert completes even if user code it calls panics (the eviction
                // listener, a replaced value's `Drop`), and hands that panic on: the check
                // below must run all the same, then the panic goes on.
                let mut panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.cache.insert(key, value);
                }))
                .err();
                // A newer write or invalidation of the key (this instance's, or another's
                // announced) or an invalidate-all, done before our copy landed, wins.
                if self.tier.newer_known(&encoded, version, clears) {
                    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.cache.invalidate(&k);
                    }));
                    if let Err(p) = dropped {
                        crate::unwind::keep_first(&mut panic, p);
                    }
                }
                crate::unwind::drop_keeping_first(k, &mut panic);
                if let Some(p) = panic {
                    std::panic::resume_unwind(p);
                }
            }
            None => self.cache.insert(key, value),
        }
    }

    /// Leaves a tombstone for `key` in Redis (a new version; a lease on it is revoked), tells
    /// the other instances to drop it, then removes it here. A load of the key running
    /// anywhere in the fleet does not write it back.
    ///
    /// A key the key codec cannot encode: as for [`insert`](Self::insert), the other
    /// instances drop every local copy.
    ///
    /// Blocks for the Redis delete and publish (bounded as [`insert`](Self::insert)); an
    /// invalidation Redis does not get is local only, as an [`insert`](Self::insert) is.
    pub fn invalidate(&self, key: &K) {
        // Redis first: a local miss in between must not read the old value back from Redis.
        self.tier.invalidate(key);
        self.cache.invalidate(key);
    }

    /// As [`invalidate`](Self::invalidate), returning the local value if there was one.
    pub fn remove(&self, key: &K) -> Option<V> {
        self.tier.invalidate(key);
        self.cache.remove(key)
    }

    /// Advances the namespace's epoch in Redis (values loads wrote back before it are ignored
    /// from then on), tombstones the namespace's values (`SCAN` in batches of about 1,000 keys,
    /// each bounded by the operation timeout), tells the other instances to clear theirs, then
    /// clears the local tier. With Redis unreachable, only the local tier is cleared (as an
    /// [`insert`](Self::insert) Redis does not get).
    pub fn invalidate_all(&self) {
        self.tier.invalidate_all();
        self.cache.invalidate_all();
    }

    /// [`Cache::get_with`] through the second tier: on a local miss the leader reads Redis
    /// (and waits on another instance's lease, if leases are on) before calling `init`, and
    /// writes what `init` returns to Redis.
    ///
    /// # Panics
    ///
    /// If `init` panics (as [`Cache::get_with`]).
    pub fn get_with(&self, key: K, init: impl FnOnce() -> V) -> V {
        let k = key.clone();
        let v = self.cache.get_with(key, || {
            match self
                .tier
                .fetch(&k, None, || Ok::<V, std::convert::Infallible>(init()))
            {
                Ok(v) => v,
                Err(never) => match never {},
            }
        });
        // The key's copy drops before the value leaves (user code: see `crate::answer`).
        after_dropping(k, v)
    }

    /// [`Cache::try_get_with`] through the second tier; an error of `init` is returned as
    /// without the tier, and nothing is written to Redis.
    ///
    /// # Errors
    ///
    /// `init`'s error, shared by every local caller of that load.
    pub fn try_get_with<E>(&self, key: K, init: impl FnOnce() -> Result<V, E>) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        let k = key.clone();
        let r = self
            .cache
            .try_get_with(key, || self.tier.fetch(&k, None, init));
        after_dropping(k, r)
    }

    /// [`Cache::optionally_get_with`] through the second tier; `None` is returned as without
    /// the tier, and nothing is written to Redis.
    pub fn optionally_get_with(&self, key: K, init: impl FnOnce() -> Option<V>) -> Option<V> {
        let k = key.clone();
        let r = self
            .cache
            .optionally_get_with(key, || self.tier.fetch(&k, None, || init().ok_or(())).ok());
        after_dropping(k, r)
    }

    /// [`Cache::get_with_async`] through the second tier. The Redis work (read, lease wait,
    /// write) runs on a helper thread while this future waits, so the executor's thread never
    /// blocks on the network.
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get_with_async`]; a lease this call took for the fleet is given back if it
    /// is dropped before its load finishes — during a Redis round trip, after one delivered
    /// its result but before the future was polled again (a `select!` whose other branch
    /// won, a timeout firing then), or during the load. The release runs on a helper thread.
    ///
    /// # Panics
    ///
    /// If `init` panics (as [`Cache::get_with_async`]).
    ///
    /// # Example
    ///
    /// ```
    /// # use herdcache::{codec::Plain, redis::RedisTier, Cache};
    /// # let cache = RedisTier::new("redis://127.0.0.1:1/")
    /// #     .ttl(std::time::Duration::from_secs(60))
    /// #     .build(Cache::<u64, u64>::builder().max_capacity(10), Plain)
    /// #     .unwrap();
    /// let v = futures::executor::block_on(cache.get_with_async(1, async { 10 }));
    /// assert_eq!(v, 10);
    /// ```
    pub async fn get_with_async(
        &self,
        key: K,
        init: impl std::future::Future<Output = V> + Send + 'static,
    ) -> V {
        let fetch = Arc::clone(&self.tier).fetch_async(key.clone(), None, async {
            Ok::<V, std::convert::Infallible>(init.await)
        });
        match self.cache.try_get_with_async(key, fetch).await {
            Ok(v) => v,
            Err(never) => match *never {},
        }
    }

    /// [`Cache::try_get_with_async`] through the second tier (see
    /// [`get_with_async`](Self::get_with_async)).
    ///
    /// # Errors
    ///
    /// `init`'s error, shared by every local caller of that load.
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    pub async fn try_get_with_async<E>(
        &self,
        key: K,
        init: impl std::future::Future<Output = Result<V, E>> + Send + 'static,
    ) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        let fetch = Arc::clone(&self.tier).fetch_async(key.clone(), None, init);
        self.cache.try_get_with_async(key, fetch).await
    }

    /// [`Cache::optionally_get_with_async`] through the second tier (see
    /// [`get_with_async`](Self::get_with_async)).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    pub async fn optionally_get_with_async(
        &self,
        key: K,
        init: impl std::future::Future<Output = Option<V>> + Send + 'static,
    ) -> Option<V> {
        let fetch =
            Arc::clone(&self.tier).fetch_async(key.clone(), None, async { init.await.ok_or(()) });
        self.cache
            .optionally_get_with_async(key, async { fetch.await.ok() })
            .await
    }

    /// Whether the invalidation subscriber is connected and subscribed now.
    pub fn is_subscribed(&self) -> bool {
        self.tier.subscribed.load(Ordering::Acquire)
    }

    /// Whether the circuit breaker is skipping Redis now.
    pub fn is_breaker_open(&self) -> bool {
        self.tier.client.breaker.is_open()
    }
}
