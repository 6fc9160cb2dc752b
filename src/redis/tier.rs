//! The second tier's operations: read-through in the single-flight leader, fleet-wide leases,
//! versioned writes, conditional write-back, and invalidation messages.
//!
//! # Key layout (per namespace `ns` of `n` bytes, per encoded key `k`)
//!
//! | Redis key | type | what |
//! |---|---|---|
//! | `hc:<n>:<ns>:v{<k>}` | hash | `d`: the value's bytes (absent in a tombstone); `v`: the key's version; `e`: the invalidate-all epoch a load read (absent for an insert) |
//! | `hc:<n>:<ns>:l{<k>}` | string | a lease: the holder's token |
//! | `hc:<n>:<ns>:epoch` | string | the namespace's invalidate-all epoch |
//! | `hc:<n>:<ns>:invalidate` | channel | invalidation messages |
//!
//! The length prefix makes namespaces prefix-free (`app` never matches `app:v`'s keys), and the
//! `{<k>}` hash tag puts a key's value and lease in one Cluster slot.
//!
//! # Write ordering
//!
//! Every `insert` and `invalidate` increments the key's version in the same script that
//! writes the value or leaves a tombstone (an invalidation also revokes the key's lease). A
//! load remembers the version (and epoch) it read before loading, and its write-back is a script
//! that stores only if the version is still that one (and, with a lease, only while its lease
//! stands). `invalidate_all` advances the epoch first (to at least the server's clock in
//! microseconds, as a key's version: an epoch lost with its key, in a restart without
//! persistence, comes back above the ones loads read before), so that values written back by
//! loads that read an older epoch are ignored by readers, then tombstones the namespace's
//! values. A read sets an absent epoch the same way (`EPOCH`): after a loss of the
//! namespace's keys (a restart without persistence, `FLUSHALL`), a load that read before it
//! finds its key absent as it read it, but what it writes back carries an epoch below every
//! later read's. So
//! after an `insert` or `invalidate` returns on any instance, Redis never again yields an older
//! value for the key — provided the tombstone (kept for the tier's time to live) outlives any
//! load running at that moment.

use super::client::{Client, Failed};
use super::offload::{offload, Pool, Receive, Timer};
use crate::codec::Codec;
use crate::settings::BoxError;
use crate::stats::RemoteCounters;
use ::redis::{cmd, Cmd, Value};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::scripts::{EPOCH, INSERT, NEXT_EPOCH, READ, RELEASE, TOMBSTONE, WRITE_BACK};

/// Message kinds on the invalidation channel:
/// `[kind][origin: 8 bytes LE][version: 8 bytes LE][key bytes]`.
pub(crate) const MSG_KEY: u8 = b'k';
pub(crate) const MSG_ALL: u8 = b'a';

/// Fleet-wide single-flight settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseConfig {
    /// How long a lease lives if its holder never releases it (died, hung).
    pub(crate) ttl: Duration,
    /// How long a caller waits for another instance's value before loading itself.
    pub(crate) wait: Duration,
}

/// A value's Redis key, `hc:<n>:<ns>:v{` + the encoded key (from `at`) + `}`, and the
/// oldest value (by time spent in Redis) the fetch accepts.
struct ValueKey {
    bytes: Vec<u8>,
    at: usize,
    max_age: Option<Duration>,
}

impl ValueKey {
    /// The encoded key alone.
    fn key(&self) -> &[u8] {
        &self.bytes[self.at..self.bytes.len() - 1]
    }
}

/// What a read saw of a key: its value (if any, and valid), the key's version and the
/// namespace's epoch (for a later conditional write-back).
struct Snapshot<V> {
    found: Option<Remote<V>>,
    version: u64,
    epoch: u64,
    /// The key is invalidated in Redis by a write this instance missed: a tombstone newer than
    /// any version of the key it wrote, heard announced or loaded past (see
    /// [`Tier::unheard`]). A local copy may then be from before that invalidation (see
    /// [`Pending::invalidated`]).
    invalidated: bool,
}

/// The first half of a fetch, decided before the load.
enum Plan<V> {
    /// Redis had the value (possibly after waiting on another instance's lease).
    Remote(Stored<V>),
    /// Load, then write the value back ([`Tier::write_back`]).
    Load(Pending),
}

/// What a value read from Redis turned out to be.
enum Remote<V> {
    Value(Stored<V>),
    /// Older than the caller accepts (a refresh must not get back the value it replaces).
    TooOld,
    /// Not decodable (counted as an error).
    Undecodable,
}

/// A value found in Redis.
struct Stored<V> {
    value: V,
    /// What it had left to live there, if it expires.
    ttl_ms: Option<u64>,
}

impl<V> Stored<V> {
    /// The value, for a load that publishes it on this thread next: its local copy will not
    /// outlive the one in Redis.
    fn into_value(self) -> V {
        if let Some(ms) = self.ttl_ms {
            crate::flight::cap_next_publish(ms.saturating_mul(1_000_000));
        }
        self.value
    }
}

/// A lease this instance may hold (its `SET … NX` may have succeeded): released when dropped,
/// unless handed on to the write-back script (which releases it itself). It owns the token
/// from the round trip that took it until then, so that a panic of user code in between (the
/// value codec decoding the value read with it or encoding the loaded value, the loader,
/// `Clone`) gives the lease back as it unwinds instead of leaving it to its time to live.
struct Held {
    client: Arc<Client>,
    lkey: Vec<u8>,
    /// `None` once handed on.
    token: Option<u64>,
}

impl Held {
    fn new(client: &Arc<Client>, lkey: &[u8], token: u64) -> Self {
        Held {
            client: Arc::clone(client),
            lkey: lkey.to_vec(),
            token: Some(token),
        }
    }

    /// The token, now the caller's to release (with the write-back).
    fn hand_on(&mut self) -> Option<u64> {
        self.token.take()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            release(&self.client, &self.lkey, token);
        }
    }
}

/// What is left to do after a load.
struct Pending {
    /// Where the encoded key starts in `vkey` (as [`ValueKey::at`]).
    at: usize,
    vkey: Vec<u8>,
    lkey: Vec<u8>,
    /// The lease we hold, to give back with the write (or when dropped: a load that failed,
    /// panicked, or was abandoned).
    lease: Option<Held>,
    /// Whether Redis answered: if not, the value is not written.
    redis: bool,
    /// The key's version and the namespace's epoch when the load began: the write-back stores
    /// only if the version is unchanged.
    version: u64,
    epoch: u64,
    /// A read before the load found the key invalidated in Redis: a failure of the load does
    /// not fall back on the local copy (fail-safe), which is from before that invalidation
    /// (this instance missed its message, or the load would not run).
    invalidated: bool,
}

impl Pending {
    fn new(
        vkey: &ValueKey,
        lkey: Vec<u8>,
        lease: Option<Held>,
        redis: bool,
        (version, epoch): (u64, u64),
        invalidated: bool,
    ) -> Self {
        Pending {
            vkey: vkey.bytes.clone(),
            at: vkey.at,
            lkey,
            lease,
            redis,
            version,
            epoch,
            invalidated,
        }
    }

    /// The encoded key alone.
    fn key(&self) -> &[u8] {
        &self.vkey[self.at..self.vkey.len() - 1]
    }
}

/// What the read before a load decided.
enum Start<V> {
    Plan(Plan<V>),
    /// Another instance may be loading: wait on its lease (or take it).
    Wait(Box<LeaseWait>),
}

/// A lease wait in progress: run [`Tier::step`] until it is done, pausing as told between
/// steps (a thread sleeps; an async caller awaits a timer, holding no thread).
struct LeaseWait {
    vkey: ValueKey,
    lkey: Vec<u8>,
    cfg: LeaseConfig,
    deadline: Instant,
    /// The key's version and epoch at the first read, for a local load after the wait.
    version: u64,
    epoch: u64,
    /// Whether a read of the wait found the key invalidated ([`Snapshot::invalidated`]).
    invalidated: bool,
    /// Times the lease vanished without a value.
    vanished: u32,
    /// Whether another instance's lease was found (the wait counted).
    waited: bool,
    /// The next pause, once polling; `None`: the next step tries to take the lease.
    pause: Option<Duration>,
}

/// The outcome of one step of a lease wait.
enum Step<V> {
    Done(Lease<V>),
    Sleep(Duration),
}

/// Where an async fetch stands after a round trip.
enum Next<V> {
    Plan(Plan<V>),
    Sleep(Box<LeaseWait>, Duration),
}

/// How a leader's lease attempt ended.
enum Lease<V> {
    /// Another instance's value appeared while we waited.
    Value(Stored<V>),
    /// We hold the lease and load for the fleet, from this version and epoch.
    Held(Held, u64, u64),
    /// Load locally: the bounded wait passed, or the lease vanished without a value.
    Local,
    /// Redis is unavailable: load locally and do not write.
    Unavailable,
}

/// Everything one cache needs to use Redis as its second tier.
pub(crate) struct Tier<K, V> {
    pub(crate) client: Arc<Client>,
    key_codec: Box<dyn Codec<K>>,
    value_codec: Box<dyn Codec<V>>,
    /// `hc:<n>:<namespace>:` — prefix of every key.
    prefix: Vec<u8>,
    epoch_key: Vec<u8>,
    pub(crate) channel: Vec<u8>,
    /// The versions this instance wrote and heard of, for recent keys: a message older than
    /// our own write does not drop our copy, and our write does not stand over a newer one
    /// (ours or announced) meanwhile.
    versions: Mutex<Versions>,
    /// This instance's id in invalidation messages (its own are ignored).
    pub(crate) origin: u64,
    /// Time to live of values written to Redis.
    ttl: Duration,
    /// With fail-safe: how long after an invalidation a local copy from before it may still
    /// be served (its time to live, or the tier's, plus `max_stale`); zero without.
    stale: Duration,
    /// Larger encoded values are not written to Redis.
    max_value_size: usize,
    lease: Option<LeaseConfig>,
    tokens: AtomicU64,
    random: ahash::RandomState,
    /// Whether the invalidation subscriber is connected and subscribed now.
    pub(crate) subscribed: AtomicBool,
    /// Helper threads for async callers' round trips.
    pool: Pool,
    /// Pauses of async callers' lease waits.
    timer: Timer,
}

impl<K: 'static, V: 'static> Tier<K, V> {
    pub(crate) fn new(
        client: Client,
        key_codec: Box<dyn Codec<K>>,
        value_codec: Box<dyn Codec<V>>,
        namespace: &str,
        (ttl, stale): (Duration, Duration),
        lease: Option<LeaseConfig>,
        max_value_size: usize,
    ) -> Self {
        let random = ahash::RandomState::new();
        let prefix = format!("hc:{}:{namespace}:", namespace.len());
        Tier {
            client: Arc::new(client),
            key_codec,
            value_codec,
            epoch_key: format!("{prefix}epoch").into_bytes(),
            channel: format!("{prefix}invalidate").into_bytes(),
            prefix: prefix.into_bytes(),
            versions: Mutex::new(Versions::default()),
            origin: random.hash_one(0x0419_u64),
            ttl,
            stale,
            max_value_size,
            lease,
            tokens: AtomicU64::new(1),
            random,
            subscribed: AtomicBool::new(false),
            pool: Pool::new(64),
            timer: Timer::new(),
        }
    }

    pub(crate) fn counters(&self) -> &RemoteCounters {
        &self.client.counters
    }

    fn count(&self, counter: fn(&RemoteCounters) -> &AtomicU64) {
        self.counters().add(counter);
    }

    /// `hc:<n>:<ns>:v{` + key bytes + `}`, or `None` if the key cannot be encoded.
    fn value_key(&self, key: &K, max_age: Option<Duration>) -> Option<ValueKey> {
        let mut bytes = self.prefix.clone();
        bytes.extend_from_slice(b"v{");
        let at = bytes.len();
        match self.key_codec.encode(key, &mut bytes) {
            Ok(()) => {
                bytes.push(b'}');
                Some(ValueKey { bytes, at, max_age })
            }
            Err(_) => {
                self.count(|c| &c.errors);
                None
            }
        }
    }

    fn lease_key(&self, vkey: &ValueKey) -> Vec<u8> {
        let mut out = self.prefix.clone();
        out.extend_from_slice(b"l{");
        out.extend_from_slice(vkey.key());
        out.push(b'}');
        out
    }

    /// The Redis key of every value of the namespace, as a `SCAN` pattern.
    fn value_pattern(&self) -> Vec<u8> {
        let mut pattern = Vec::with_capacity(self.prefix.len() + 4);
        for &b in &self.prefix {
            if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                pattern.push(b'\\');
            }
            pattern.push(b);
        }
        pattern.extend_from_slice(b"v{*");
        pattern
    }

    /// Tombstones are kept as long as values live (a load that began before an invalidation
    /// and runs longer than this could write back a value older than the invalidation), and
    /// with fail-safe as long as a local copy from before the invalidation may be served (an
    /// instance that missed the message sees the tombstone when the copy's load fails).
    fn tombstone_ttl(&self) -> u64 {
        let lease = self.lease.map_or(Duration::ZERO, |l| l.ttl);
        millis(self.ttl.max(lease).max(self.stale))
    }

    fn decode(&self, bytes: &[u8]) -> Option<V> {
        match self.value_codec.decode(bytes) {
            Ok(v) => Some(v),
            Err(_) => {
                self.count(|c| &c.errors);
                None
            }
        }
    }

    fn token(&self) -> u64 {
        self.random
            .hash_one(self.tokens.fetch_add(1, Ordering::Relaxed))
            .max(1)
    }

    /// Adds the commands of a read of `vkey` to a pipeline: its hash fields (value, version,
    /// epoch), its time left, and the namespace's epoch.
    fn read_cmds(&self, p: &mut Vec<Cmd>, vkey: &ValueKey) {
        let mut fields = cmd("EVAL");
        fields
            .arg(READ)
            .arg(1)
            .arg(&vkey.bytes)
            .arg(self.max_value_size);
        let mut pttl = cmd("PTTL");
        pttl.arg(&vkey.bytes);
        // Set if absent (see `EPOCH`): a loss of the namespace's keys shows as a new epoch.
        let mut epoch = cmd("EVAL");
        epoch.arg(EPOCH).arg(1).arg(&self.epoch_key);
        p.extend([fields, pttl, epoch]);
    }

    /// Makes sense of a read's replies (see [`read_cmds`](Self::read_cmds)).
    fn snapshot(&self, fields: Fields, pttl: i64, epoch: Value, vkey: &ValueKey) -> Snapshot<V> {
        let (bytes, version, written_in, oversized) = fields;
        let (version, written_in, epoch) =
            (lenient(&version), lenient(&written_in), lenient(&epoch));
        if oversized != 0 {
            // Written by an instance with a larger `max_value_size`: left there, not read
            // (this instance loads the key itself, and its write-back replaces it).
            self.count(|c| &c.oversized);
        }
        let epoch = epoch.unwrap_or(0);
        // A value a load wrote back after reading an older epoch is from before an
        // invalidate-all: not a value.
        let valid = written_in.is_none_or(|e| e >= epoch);
        // A version with no value is a tombstone — or a value too large for this instance to
        // read (written by one with a larger `max_value_size`): either way a write this
        // instance missed if it is newer than every version of the key it wrote, heard
        // announced or loaded past (a local copy may be from before it; see `unheard`), and
        // the local copy is no fallback (round 87: an oversized newer value was no sign, and
        // fail-safe served the value it replaced). An invalidate-all
        // shows the same way: it tombstones every value once its epoch is set. (A value from
        // before the epoch alone is no sign: the epoch key may have been lost and set again
        // by a read, with nothing invalidated.)
        let invalidated = match (&bytes, version) {
            (None, Some(v)) => self.unheard(vkey.key(), v),
            _ => false,
        };
        if invalidated {
            // Every read is a fetch's, run on the thread of the load it is for (or on a
            // helper thread registered for it, see `round_trip`): that load forgoes its
            // fallback from now on — while it waits for a lease too (a soft timeout or a
            // caller arriving meanwhile must not be answered with the copy), and however it
            // ends, even dropped before it takes this read's result.
            crate::flight::running_forgo_fallback();
        }
        let found = bytes
            .filter(|_| valid)
            .map(|b| self.found(&b, pttl, vkey.max_age));
        Snapshot {
            found,
            version: version.unwrap_or(0),
            epoch,
            invalidated,
        }
    }

    /// Reads `key` from Redis: `Ok` with what it saw, `Err` when Redis is unavailable (failed,
    /// timed out, or skipped by the breaker). A key Redis refuses to read (of another type) is
    /// seen as absent: the write-back will repair it.
    fn read(&self, vkey: &ValueKey) -> Result<Snapshot<V>, ()> {
        let got = self.client.run_result(|c| {
            let mut p = Vec::new();
            self.read_cmds(&mut p, vkey);
            c.pipeline::<(Fields, i64, Value)>(p)
        });
        match got {
            Ok((fields, pttl, epoch)) => Ok(self.snapshot(fields, pttl, epoch, vkey)),
            Err(Failed::Key) => Ok(Snapshot {
                found: None,
                version: 0,
                epoch: 0,
                invalidated: false,
            }),
            Err(Failed::Unavailable) => Err(()),
        }
    }

    /// A value read from Redis, with the milliseconds it has left there (`PTTL`); its age is
    /// the tier's time to live minus that.
    fn found(&self, bytes: &[u8], pttl: i64, max_age: Option<Duration>) -> Remote<V> {
        let ttl_ms = u64::try_from(pttl).ok().filter(|&ms| ms > 0);
        if let (Some(max), Some(left)) = (max_age, ttl_ms) {
            let age = millis(self.ttl).saturating_sub(left);
            if u128::from(age) >= max.as_millis() {
                return Remote::TooOld;
            }
        }
        let Some(value) = self.decode(bytes) else {
            return Remote::Undecodable;
        };
        self.count(|c| &c.hits);
        Remote::Value(Stored { value, ttl_ms })
    }

    /// Encodes a value for Redis: `Err(true)` if it cannot be (counted as an error),
    /// `Err(false)` if it is larger than the tier's maximum (counted as oversized).
    fn encode(&self, value: &V) -> Result<Vec<u8>, bool> {
        let mut bytes = Vec::new();
        if self.value_codec.encode(value, &mut bytes).is_err() {
            self.count(|c| &c.errors);
            return Err(true);
        }
        if bytes.len() > self.max_value_size {
            self.count(|c| &c.oversized);
            return Err(false);
        }
        Ok(bytes)
    }

    /// What the single-flight leader runs on a local miss: the value from Redis if it is
    /// there (and younger than `max_age`, for refreshes); else (with leases) the value another
    /// instance is loading, if it appears within the bounded wait; else `load()`, whose value
    /// is written to Redis.
    pub(crate) fn fetch<E>(
        &self,
        key: &K,
        max_age: Option<Duration>,
        load: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        let Some(vkey) = self.value_key(key, max_age) else {
            return load();
        };
        match self.plan(vkey) {
            Plan::Remote(v) => Ok(v.into_value()),
            Plan::Load(pending) => {
                // `pending` owns the lease: a panicking loader gives it back as it unwinds.
                let result = load();
                // A load a write or invalidation of the key superseded (here, or announced by
                // another instance) is not stored locally: nor is it written back to Redis
                // (where the write may have been refused, `OOM`, leaving no tombstone).
                let value = result.as_ref().ok().filter(|_| !self.superseded());
                if value.is_some() {
                    self.loaded_past(&pending);
                }
                self.write_back(pending, value);
                result
            }
        }
    }

    /// The async twin of [`fetch`](Self::fetch): each Redis round trip (read, lease, each
    /// poll of a lease wait, write) runs on a helper thread while the caller awaits, and the
    /// pauses of a lease wait are timer futures, so neither an executor thread nor a helper
    /// thread is held while waiting on another instance's lease. The write happens after the
    /// value is returned.
    pub(crate) async fn fetch_async<E>(
        self: Arc<Self>,
        key: K,
        max_age: Option<Duration>,
        load: impl Future<Output = Result<V, E>>,
    ) -> Result<V, E>
    where
        K: Send + Sync,
        V: Clone + Send + Sync,
    {
        let Some(vkey) = self.value_key(&key, max_age) else {
            return load.await;
        };
        // The load this fetch is for: each round trip's job runs registered for it, so a
        // read that finds the key invalidated marks it (see `snapshot`) even if the load is
        // dropped before it takes the round trip's result (round 90).
        let flight = crate::flight::running_handle();
        let t = Arc::clone(&self);
        let f = flight.clone();
        // The read and the first lease attempt in one job.
        let first = self
            .round_trip(f, move || match t.start(vkey) {
                Start::Plan(plan) => Next::Plan(plan),
                Start::Wait(mut w) => {
                    let step = t.step(&mut w);
                    step.into_next(w, &t)
                }
            })
            .await;
        let Some(mut next) = first else {
            return load.await;
        };
        let plan = loop {
            match next {
                Next::Plan(plan) => break plan,
                Next::Sleep(mut w, pause) => {
                    self.timer.sleep(pause).await;
                    let t = Arc::clone(&self);
                    let got = self
                        .round_trip(flight.clone(), move || {
                            let step = t.step(&mut w);
                            step.into_next(w, &t)
                        })
                        .await;
                    let Some(got) = got else {
                        return load.await;
                    };
                    next = got;
                }
            }
        };
        let pending = match plan {
            Plan::Remote(v) => return Ok(v.into_value()),
            Plan::Load(pending) => pending,
        };
        let mut guard = FinishLater {
            tier: Arc::clone(&self),
            pending: Some(pending),
            value: None,
        };
        let result = load.await;
        // As in `fetch`: a superseded load is not written back (asked while the flight is
        // polled, on its thread).
        guard.value = result.as_ref().ok().filter(|_| !self.superseded()).cloned();
        if let (Some(_), Some(p)) = (&guard.value, &guard.pending) {
            self.loaded_past(p);
        }
        drop(guard);
        result
    }

    /// Whether the load this thread runs was superseded by a write or invalidation of its key
    /// (counted as a write-back superseded: it is not written).
    fn superseded(&self) -> bool {
        let superseded = crate::flight::running_superseded();
        if superseded {
            self.count(|c| &c.writes_superseded);
        }
        superseded
    }

    /// Runs one step of an async fetch on a helper thread, registered there as running the
    /// fetch's `flight` (the load its reads mark, see `snapshot`). If the caller goes away
    /// without having taken the step's result (before it ends, or after it was delivered but
    /// before the caller was polled again), a lease the step took for it is given back.
    fn round_trip(
        self: &Arc<Self>,
        flight: Option<crate::flight::RunningHandle>,
        job: impl FnOnce() -> Next<V> + Send + 'static,
    ) -> Receive<Next<V>>
    where
        K: Send + Sync,
        V: Send + Sync,
    {
        let job = move || {
            let _running = flight.as_ref().map(crate::flight::enter_handle);
            job()
        };
        // Dropping a plan to load gives its lease back (on the helper thread).
        offload(&self.pool, job, drop)
    }

    /// The part of a fetch before the load: Redis's value, or how to load (blocking).
    fn plan(&self, vkey: ValueKey) -> Plan<V> {
        match self.start(vkey) {
            Start::Plan(plan) => plan,
            Start::Wait(mut w) => loop {
                let step = self.step(&mut w);
                match step {
                    Step::Done(lease) => return self.resolve(*w, lease),
                    Step::Sleep(pause) => std::thread::sleep(pause),
                }
            },
        }
    }

    /// Reads Redis: the value, or how to load, or (with leases) a lease wait to run.
    fn start(&self, vkey: ValueKey) -> Start<V> {
        let lkey = self.lease_key(&vkey);
        let seen = match self.read(&vkey) {
            Ok(seen) => seen,
            // Redis is unavailable: load without it (no lease, no write), so that a call pays
            // at most one operation's timeout.
            Err(()) => {
                let p = Pending::new(&vkey, lkey, None, false, (0, 0), false);
                return Start::Plan(Plan::Load(p));
            }
        };
        match seen.found {
            Some(Remote::Value(v)) => return Start::Plan(Plan::Remote(v)),
            Some(Remote::TooOld | Remote::Undecodable) | None => {}
        }
        if seen.found.is_none() {
            self.count(|c| &c.misses);
        }
        let Some(cfg) = self.lease else {
            let p = Pending::new(
                &vkey,
                lkey,
                None,
                true,
                (seen.version, seen.epoch),
                seen.invalidated,
            );
            return Start::Plan(Plan::Load(p));
        };
        Start::Wait(Box::new(LeaseWait {
            deadline: crate::clock::instant_after_or_far(cfg.wait),
            vkey,
            lkey,
            cfg,
            version: seen.version,
            epoch: seen.epoch,
            invalidated: seen.invalidated,
            vanished: 0,
            waited: false,
            pause: None,
        }))
    }

    /// How a lease wait's outcome turns into the plan of a fetch.
    fn resolve(&self, w: LeaseWait, lease: Lease<V>) -> Plan<V> {
        let p = |lease, redis, read| {
            Plan::Load(Pending::new(
                &w.vkey,
                w.lkey.clone(),
                lease,
                redis,
                read,
                w.invalidated,
            ))
        };
        match lease {
            Lease::Value(v) => Plan::Remote(v),
            Lease::Held(held, version, epoch) => p(Some(held), true, (version, epoch)),
            Lease::Local => p(None, true, (w.version, w.epoch)),
            Lease::Unavailable => p(None, false, (0, 0)),
        }
    }

    /// The part of a fetch after the load: writes the value back (if any, if Redis was
    /// reachable, and only if nothing wrote or invalidated the key since the load began), and
    /// gives the lease back — in the same script, after the write, so waiters find the value.
    ///
    /// `pending` owns the lease until the script is sent: a value that cannot be written (or a
    /// panic of the codec encoding it) gives it back as `pending` is dropped.
    fn write_back(&self, mut pending: Pending, value: Option<&V>) {
        let bytes = match value {
            Some(v) if pending.redis => self.encode(v).ok(),
            _ => None,
        };
        let Some(bytes) = bytes else {
            return; // dropping `pending` releases the lease
        };
        let token = pending.lease.as_mut().and_then(Held::hand_on);
        let token_arg = token.map_or_else(String::new, |t| t.to_string());
        let stored = self.client.run(|c| {
            cmd("EVAL")
                .arg(WRITE_BACK)
                .arg(2)
                .arg(&pending.vkey)
                .arg(&pending.lkey)
                .arg(pending.version)
                .arg(bytes)
                .arg(millis(self.ttl))
                .arg(pending.epoch)
                .arg(token_arg)
                .query::<i64>(c)
        });
        match stored {
            Some(1) => self.count(|c| &c.writes),
            Some(_) => self.count(|c| &c.writes_superseded),
            None => {}
        }
    }

    /// One round trip of a lease wait: try to take the lease (reading the value in the same
    /// round trip), or poll for the holder's value; then the outcome, or the pause before the
    /// next step.
    fn step(&self, w: &mut LeaseWait) -> Step<V> {
        let Some(pause) = w.pause else {
            return self.attempt(w);
        };
        let seen = self.client.run(|c| {
            let mut p = Vec::new();
            self.read_cmds(&mut p, &w.vkey);
            let mut exists = cmd("EXISTS");
            exists.arg(&w.lkey);
            p.push(exists);
            c.pipeline::<(Fields, i64, Value, bool)>(p)
        });
        let Some((fields, pttl, epoch, leased)) = seen else {
            self.count(|c| &c.lease_fallbacks);
            return Step::Done(Lease::Unavailable);
        };
        let seen = self.snapshot(fields, pttl, epoch, &w.vkey);
        w.invalidated |= seen.invalidated;
        match seen.found {
            Some(Remote::Value(v)) => {
                self.count(|c| &c.lease_wait_hits);
                Step::Done(Lease::Value(v))
            }
            Some(Remote::Undecodable) => Step::Done(self.give_up()),
            // Nothing yet (or only the value being refreshed), the holder is at work.
            Some(Remote::TooOld) | None if leased => self.pause(w, pause),
            Some(Remote::TooOld) | None => {
                // The holder released without a value (its load failed, or an invalidation
                // revoked its lease) or died and the lease expired: try to take over, at most
                // twice.
                w.vanished += 1;
                if w.vanished > 2 {
                    return Step::Done(self.give_up());
                }
                self.attempt(w)
            }
        }
    }

    /// Takes the lease and looks at the value in one round trip, in this order: a holder
    /// writes its value before releasing, so if the lease was free the value of the load that
    /// just ended (if any) is visible to the read, and the version read is the one our
    /// write-back must find.
    fn attempt(&self, w: &mut LeaseWait) -> Step<V> {
        let token = self.token();
        let got = self.client.run_result(|c| {
            let mut take = cmd("SET");
            take.arg(&w.lkey)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(millis(w.cfg.ttl));
            let mut p = vec![take];
            self.read_cmds(&mut p, &w.vkey);
            c.pipeline::<(Value, Fields, i64, Value)>(p)
        });
        let (lease, fields, pttl, epoch) = match got {
            Ok(replies) => replies,
            Err(failed) => {
                if failed == Failed::Key {
                    // The server answered, refusing a command of the round trip (a key of
                    // another type): its `SET … NX` may have taken the lease. Give it back.
                    // (A round trip that timed out is left to the lease's ttl, as a dead
                    // holder's: the call skips the rest of its Redis work.)
                    drop(Held::new(&self.client, &w.lkey, token));
                }
                if w.waited {
                    self.count(|c| &c.lease_fallbacks);
                }
                return Step::Done(Lease::Unavailable);
            }
        };
        // From here the lease (if taken) is owned by `held`: decoding the value read with it
        // runs the codec, which may panic.
        let held = (!matches!(lease, Value::Nil)).then(|| Held::new(&self.client, &w.lkey, token));
        let seen = self.snapshot(fields, pttl, epoch, &w.vkey);
        w.invalidated |= seen.invalidated;
        if let Some(Remote::Value(v)) = seen.found {
            // Taken needlessly (if taken): dropping `held` gives it back.
            drop(held);
            if w.waited {
                self.count(|c| &c.lease_wait_hits);
            }
            return Step::Done(Lease::Value(v));
        }
        if let Some(held) = held {
            self.count(|c| &c.leases_acquired);
            return Step::Done(Lease::Held(held, seen.version, seen.epoch));
        }
        if !w.waited {
            w.waited = true;
            self.count(|c| &c.lease_waits);
        }
        // Another instance holds the lease: poll for its value, backing off from 1 to 20 ms.
        self.pause(w, Duration::from_millis(1))
    }

    /// The pause before the next poll (backing off), or the end of the wait.
    fn pause(&self, w: &mut LeaseWait, pause: Duration) -> Step<V> {
        let now = Instant::now();
        if now >= w.deadline {
            return Step::Done(self.give_up());
        }
        w.pause = Some((pause * 2).min(Duration::from_millis(20)));
        Step::Sleep(pause.min(w.deadline - now))
    }

    /// Ends a wait for another instance's value: load locally.
    fn give_up(&self) -> Lease<V> {
        self.count(|c| &c.lease_fallbacks);
        Lease::Local
    }

    /// Writes `value` for `key` to Redis (a new version) and tells the other instances to drop
    /// their copies. Returns the key's encoding and its new version, or `None` if Redis was
    /// not written.
    /// A value too large for Redis, or that its codec cannot encode, is not written: the key
    /// is invalidated in Redis instead
    /// (a tombstone, a new version), so that no instance reads an older value from there.
    pub(crate) fn put(&self, key: &K, value: &V) -> Option<(Vec<u8>, u64)> {
        let Some(vkey) = self.value_key(key, None) else {
            self.unencodable_key();
            return None;
        };
        let bytes = match self.encode(value) {
            Ok(bytes) => bytes,
            // Not encodable (counted as an error) or too large (counted as oversized): the
            // older value must not stay readable either.
            Err(_) => {
                let version = self.tombstone(&vkey)?;
                return Some((vkey.key().to_vec(), version));
            }
        };
        let written = self.client.run_result(|c| {
            cmd("EVAL")
                .arg(INSERT)
                .arg(1)
                .arg(&vkey.bytes)
                .arg(bytes)
                .arg(millis(self.ttl))
                .query::<u64>(c)
        });
        let version = match written {
            Ok(version) => version,
            // Refused (`OOM`, a script error): the older value must not stay readable.
            Err(Failed::Key) => {
                self.refused_write(&vkey);
                return None;
            }
            Err(Failed::Unavailable) => return None,
        };
        self.count(|c| &c.writes);
        self.note_own(vkey.key(), version);
        self.announce(MSG_KEY, version, vkey.key());
        Some((vkey.key().to_vec(), version))
    }

    /// A write of a key that the server refused (`OOM`: writes refused, reads still served;
    /// a script's error): the key's value and lease are deleted instead (`DEL` frees memory,
    /// so it is served under `OOM` too), so that no instance reads the older value from Redis,
    /// and the other instances are told to drop their copies (an unversioned message: they
    /// all apply it). The key's next write starts its version again past the server's clock.
    fn refused_write(&self, vkey: &ValueKey) {
        let lkey = self.lease_key(vkey);
        self.client
            .run(|c| cmd("DEL").arg(&vkey.bytes).arg(&lkey).query::<()>(c));
        self.announce(MSG_KEY, 0, vkey.key());
    }

    /// Leaves a tombstone for `key` in Redis (a new version; its lease revoked) and tells the
    /// other instances to drop their copies.
    pub(crate) fn invalidate(&self, key: &K) {
        match self.value_key(key, None) {
            Some(vkey) => {
                self.tombstone(&vkey);
            }
            None => self.unencodable_key(),
        }
    }

    /// A write or invalidation of a key that the key codec cannot encode: Redis holds no
    /// value of it, but other instances may hold a local copy (loaded without Redis), and they
    /// cannot be told which key it is: they are told to drop every local copy (as a receiver
    /// does with a key it cannot decode), by an invalidate-all message that leaves Redis as
    /// it is.
    fn unencodable_key(&self) {
        self.announce(MSG_ALL, 0, &[]);
    }

    /// Leaves a tombstone for a key (its lease revoked) and announces the new version.
    fn tombstone(&self, vkey: &ValueKey) -> Option<u64> {
        let lkey = self.lease_key(vkey);
        let written = self.client.run_result(|c| {
            cmd("EVAL")
                .arg(TOMBSTONE)
                .arg(2)
                .arg(&vkey.bytes)
                .arg(&lkey)
                .arg(self.tombstone_ttl())
                .query::<u64>(c)
        });
        let version = match written {
            Ok(version) => version,
            Err(Failed::Key) => {
                self.refused_write(vkey);
                return None;
            }
            Err(Failed::Unavailable) => return None,
        };
        self.note_own(vkey.key(), version);
        self.announce(MSG_KEY, version, vkey.key());
        Some(version)
    }

    /// Invalidates every value of the namespace: first a new epoch (values written back by
    /// loads that began before it are ignored from then on), then a tombstone for every value
    /// (`SCAN`, one script per key, pipelined by batch), then a message to the other instances.
    pub(crate) fn invalidate_all(&self) {
        // First: an `insert` whose local copy lands after the local tier is cleared must see
        // that it may be older than this (its value may be tombstoned below).
        self.versions.lock().clears += 1;
        let epoch = match self.client.run_result(|c| {
            cmd("EVAL")
                .arg(NEXT_EPOCH)
                .arg(1)
                .arg(&self.epoch_key)
                .query::<u64>(c)
        }) {
            Ok(epoch) => Some(epoch),
            // Refused (`OOM`): the values are deleted instead of tombstoned, below.
            Err(Failed::Key) => None,
            Err(Failed::Unavailable) => return, // the rest would fail too (more timeouts)
        };
        let pattern = self.value_pattern();
        let tomb = self.tombstone_ttl();
        // Every node that holds keys: the server, or each primary of a cluster.
        let Some(nodes) = self.client.run(|c| c.scan_nodes()) else {
            return;
        };
        for node in &nodes {
            let mut cursor = 0u64;
            loop {
                let batch = self.client.run(|c| {
                    let mut scan = cmd("SCAN");
                    scan.arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000);
                    c.on_node::<(u64, Vec<Vec<u8>>)>(node.as_ref(), &scan)
                });
                let Some((next, keys)) = batch else { break };
                if !keys.is_empty() {
                    // The lease key of `…v{k}` is `…l{k}`.
                    let lease_of = |vkey: &Vec<u8>| {
                        let mut lkey = vkey.clone();
                        lkey[self.prefix.len()] = b'l';
                        lkey
                    };
                    let tombstoned = epoch.is_some()
                        && self
                            .client
                            .run_result(|c| {
                                let p = keys
                                    .iter()
                                    .map(|vkey| {
                                        let mut eval = cmd("EVAL");
                                        eval.arg(TOMBSTONE)
                                            .arg(2)
                                            .arg(vkey)
                                            .arg(lease_of(vkey))
                                            .arg(tomb);
                                        eval
                                    })
                                    .collect();
                                c.pipeline::<()>(p)
                            })
                            .is_ok();
                    if !tombstoned {
                        // Refused (`OOM`) or partly failed: deleted instead (`DEL` is served
                        // under `OOM`), key by key (one slot each, for a cluster).
                        self.client.run(|c| {
                            let p = keys
                                .iter()
                                .map(|vkey| {
                                    let mut del = cmd("DEL");
                                    del.arg(vkey).arg(lease_of(vkey));
                                    del
                                })
                                .collect();
                            c.pipeline::<()>(p)
                        });
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        self.announce(MSG_ALL, epoch.unwrap_or(0), &[]);
    }

    /// Remembers our own write of a key at `version`.
    fn note_own(&self, key: &[u8], version: u64) {
        let mut m = self.versions.lock();
        let e = m.entry(key);
        e.0 = e.0.max(version);
        e.1 = e.1.max(version);
        e.2 = e.2.max(version);
    }

    /// A tombstone at `version` read from Redis: whether it is newer than every version of the
    /// key this instance wrote or heard announced (then it was missed: the local copy, if any,
    /// may be from before it). Remembered as read (for [`newer_known`](Self::newer_known)),
    /// but not as heard: a read does not drop the local copy (a refresh that read it and
    /// failed keeps it live), so a later read still finds it missed — and the copy is never
    /// served past its time to live. A key whose versions were forgotten counts as having
    /// heard none: its tombstone counts as missed (at worst an error fail-safe would have
    /// answered), where `newer_known` counts it as written at the newest version forgotten —
    /// each errs on the side of dropping the copy.
    fn unheard(&self, key: &[u8], version: u64) -> bool {
        let mut m = self.versions.lock();
        let e = m.entry(key);
        e.1 = e.1.max(version);
        version > e.2
    }

    /// A load that read its key's tombstone as missed (`pending.invalidated`) stored its value
    /// locally: the local copy is now from after that tombstone, as if its message had been
    /// heard — a later failed load may fall back on it (fail-safe), even if the value never
    /// reached Redis (too large, its write-back timed out) and the tombstone is still there.
    fn loaded_past(&self, pending: &Pending) {
        if pending.invalidated {
            let mut m = self.versions.lock();
            let e = m.entry(pending.key());
            e.2 = e.2.max(pending.version);
        }
    }

    /// How many invalidate-alls this instance has done or heard of: read by an `insert` before
    /// its Redis write, and given back to [`newer_known`](Self::newer_known).
    pub(crate) fn clears(&self) -> u64 {
        self.versions.lock().clears
    }

    /// After our own write of a key at `version` (begun when [`clears`](Self::clears) was
    /// `clears`) reached the local cache: whether a newer write or invalidation of the key may
    /// have happened meanwhile — this instance's own, another instance's announced one, or an
    /// invalidate-all done or heard of since — then the local copy must go. A key whose
    /// versions were forgotten counts as written at the newest version forgotten.
    pub(crate) fn newer_known(&self, key: &[u8], version: u64, clears: u64) -> bool {
        let m = self.versions.lock();
        let newest = m.keys.get(key).map_or(0, |e| e.1);
        m.clears != clears || newest.max(m.floor) > version
    }

    /// A message from another instance announcing `version` of a key: whether the local copy
    /// must go (not when our own write of that key is newer).
    pub(crate) fn announced(&self, key: &[u8], version: u64) -> bool {
        let mut m = self.versions.lock();
        let e = m.entry(key);
        e.1 = e.1.max(version);
        // Heard: the copy goes now, or it is our own newer write's.
        e.2 = e.2.max(version);
        version == 0 || version >= e.0
    }

    /// An invalidate-all announced by another instance, about to clear the local tier.
    pub(crate) fn heard_all(&self) {
        self.versions.lock().clears += 1;
    }

    fn announce(&self, kind: u8, version: u64, key: &[u8]) {
        let mut msg = Vec::with_capacity(17 + key.len());
        msg.push(kind);
        msg.extend_from_slice(&self.origin.to_le_bytes());
        msg.extend_from_slice(&version.to_le_bytes());
        msg.extend_from_slice(key);
        let sent = self
            .client
            .run(|c| cmd("PUBLISH").arg(&self.channel).arg(msg).query::<()>(c));
        if sent.is_some() {
            self.count(|c| &c.invalidations_sent);
        }
    }

    /// Decodes the key of a received invalidation message.
    pub(crate) fn decode_key(&self, bytes: &[u8]) -> Result<K, BoxError> {
        self.key_codec.decode(bytes)
    }
}

impl<V> Step<V> {
    /// For an async fetch: the plan if the wait is done, else the wait and its pause.
    fn into_next<K: 'static>(self, w: Box<LeaseWait>, tier: &Tier<K, V>) -> Next<V>
    where
        V: 'static,
    {
        match self {
            Step::Done(lease) => Next::Plan(tier.resolve(*w, lease)),
            Step::Sleep(pause) => Next::Sleep(w, pause),
        }
    }
}

/// Finishes an async fetch on a helper thread: after its load, or when it is cancelled or
/// its load panics (then without a value).
struct FinishLater<K: Send + Sync + 'static, V: Send + Sync + 'static> {
    tier: Arc<Tier<K, V>>,
    pending: Option<Pending>,
    value: Option<V>,
}

impl<K, V> Drop for FinishLater<K, V>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            let (tier, value) = (Arc::clone(&self.tier), self.value.take());
            self.tier
                .pool
                .submit(move || tier.write_back(p, value.as_ref()));
        }
    }
}

/// Gives a lease back: deletes it only if it still holds our token.
fn release(client: &Client, lkey: &[u8], token: u64) {
    client.run(|c| {
        cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(lkey)
            .arg(token)
            .query::<()>(c)
    });
}

/// Milliseconds for `PX`, at least 1.
fn millis(d: Duration) -> u64 {
    // Redis refuses an expiry whose deadline overflows its clock (`PX` near `i64::MAX`): a
    // time to live beyond 2^46 ms (about 2,200 years) is that long.
    const MAX_MS: u64 = 1 << 46;
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_MS)
}

/// Splits an invalidation message into its kind, origin, version and key.
pub(crate) fn parse_message(payload: &[u8]) -> Option<(u8, u64, u64, &[u8])> {
    if payload.len() < 17 {
        return None;
    }
    let origin = u64::from_le_bytes(payload[1..9].try_into().ok()?);
    let version = u64::from_le_bytes(payload[9..17].try_into().ok()?);
    Some((payload[0], origin, version, &payload[17..]))
}

/// A value's hash fields as read: bytes, version, epoch of a loaded value.
/// What a read's `READ` script returns: the value (if present and small enough), the version
/// and the epoch of a loaded value (as Redis holds them: parsed by [`lenient`]), and whether the
/// value was too large to return.
type Fields = (Option<Vec<u8>>, Value, Value, i64);

/// A number field or key as another program may have left it: a non-negative integer, or
/// nothing (absent, or not such a number: a stray write is a matter of its key alone, never a
/// failure of Redis).
fn lenient(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// How many keys' recent versions an instance remembers (then it forgets the older half).
const VERSIONS_KEPT: usize = 4096;

/// The versions an instance remembers (see [`Tier::newer_known`] and [`Tier::announced`]).
#[derive(Default)]
struct Versions {
    /// Per key (encoded), the newest version this instance wrote, the newest it wrote, heard
    /// of or read, and the newest it wrote or heard announced (whose write reached the local
    /// copy); at most [`VERSIONS_KEPT`] keys.
    keys: HashMap<Vec<u8>, (u64, u64, u64)>,
    /// The newest version among the keys forgotten: a write of a key at or below it may have
    /// been superseded by one that was forgotten. Versions are at least Redis's clock in
    /// microseconds, and a key's versions only grow, so writes begun after a key was
    /// forgotten are above it.
    floor: u64,
    /// Invalidate-alls done or heard of so far.
    clears: u64,
}

impl Versions {
    /// The key's entry, made room for: when full, the older half (by newest version) is
    /// forgotten, and the floor raised to the newest of them.
    fn entry(&mut self, key: &[u8]) -> &mut (u64, u64, u64) {
        if self.keys.len() >= VERSIONS_KEPT && !self.keys.contains_key(key) {
            let mut newest: Vec<u64> = self.keys.values().map(|e| e.1).collect();
            let mid = newest.len() / 2;
            let (_, &mut cut, _) = newest.select_nth_unstable(mid);
            self.keys.retain(|_, e| e.1 > cut);
            self.floor = self.floor.max(cut);
        }
        self.keys.entry(key.to_vec()).or_insert((0, 0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_short_ones_are_rejected() {
        let mut msg = vec![MSG_KEY];
        msg.extend_from_slice(&7u64.to_le_bytes());
        msg.extend_from_slice(&9u64.to_le_bytes());
        msg.extend_from_slice(b"key");
        assert_eq!(parse_message(&msg), Some((MSG_KEY, 7, 9, &b"key"[..])));
        assert_eq!(parse_message(&msg[..16]), None);
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::MAX), 1 << 46);
    }
}
