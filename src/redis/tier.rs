//! The second tier's operations: read-through in the single-flight leader, fleet-wide leases,
//! write-back with a time to live, and invalidation messages.

use super::client::Client;
use super::offload::{offload, Pool};
use crate::codec::Codec;
use crate::refresh::BoxError;
use crate::stats::RemoteCounters;
use ::redis::{cmd, pipe, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Message kinds on the invalidation channel: `[kind][origin: 8 bytes LE][key bytes]`.
pub(crate) const MSG_KEY: u8 = b'k';
pub(crate) const MSG_ALL: u8 = b'a';

/// Deletes the lease only if it still holds our token (another instance may own it now).
const RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0";

/// Fleet-wide single-flight settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseConfig {
    /// How long a lease lives if its holder never releases it (died, hung).
    pub(crate) ttl: Duration,
    /// How long a caller waits for another instance's value before loading itself.
    pub(crate) wait: Duration,
}

/// A value's Redis key, `namespace:v:` followed by the encoded key (from `at`), and the
/// oldest value (by time spent in Redis) the fetch accepts.
struct ValueKey {
    bytes: Vec<u8>,
    at: usize,
    max_age: Option<Duration>,
}

impl ValueKey {
    /// The encoded key alone.
    fn key(&self) -> &[u8] {
        &self.bytes[self.at..]
    }
}

/// The first half of a fetch, decided before the load.
enum Plan<V> {
    /// Redis had the value (possibly after waiting on another instance's lease).
    Found(Stored<V>),
    /// Load, then [`Tier::finish`].
    Load(Pending),
}

/// What a value read from Redis turned out to be.
enum Found<V> {
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
    fn publish(self) -> V {
        if let Some(ms) = self.ttl_ms {
            crate::flight::cap_next_publish(ms.saturating_mul(1_000_000));
        }
        self.value
    }
}

/// What is left to do after a load.
struct Pending {
    vkey: Vec<u8>,
    /// The lease we hold (key, token), to give back after the write.
    lease: Option<(Vec<u8>, u64)>,
    /// Whether Redis answered: if not, the value is not written.
    redis: bool,
}

/// How a leader's lease attempt ended.
enum Lease<V> {
    /// Another instance's value appeared while we waited.
    Value(Stored<V>),
    /// We hold the lease (this token) and load for the fleet.
    Held(u64),
    /// Load locally: the bounded wait passed, or the lease vanished without a value.
    Local,
    /// Redis is unavailable: load locally and do not write.
    Unavailable,
}

/// Everything one cache needs to use Redis as its second tier.
pub(crate) struct Tier<K, V> {
    pub(crate) client: Client,
    key_codec: Box<dyn Codec<K>>,
    value_codec: Box<dyn Codec<V>>,
    /// `namespace:` — prefix of every key.
    prefix: Vec<u8>,
    pub(crate) channel: Vec<u8>,
    /// This instance's id in invalidation messages (its own are ignored).
    pub(crate) origin: u64,
    /// Time to live of values written to Redis.
    ttl: Duration,
    lease: Option<LeaseConfig>,
    tokens: AtomicU64,
    random: ahash::RandomState,
    /// Whether the invalidation subscriber is connected and subscribed now.
    pub(crate) subscribed: AtomicBool,
    /// Helper threads for async callers.
    pool: Pool,
}

impl<K: 'static, V: 'static> Tier<K, V> {
    pub(crate) fn new(
        client: Client,
        key_codec: Box<dyn Codec<K>>,
        value_codec: Box<dyn Codec<V>>,
        namespace: &str,
        ttl: Duration,
        lease: Option<LeaseConfig>,
    ) -> Self {
        let random = ahash::RandomState::new();
        Tier {
            client,
            key_codec,
            value_codec,
            prefix: format!("{namespace}:").into_bytes(),
            channel: format!("{namespace}:invalidate").into_bytes(),
            origin: random.hash_one(0x0419_u64),
            ttl,
            lease,
            tokens: AtomicU64::new(1),
            random,
            subscribed: AtomicBool::new(false),
            pool: Pool::new(64),
        }
    }

    pub(crate) fn counters(&self) -> &RemoteCounters {
        &self.client.counters
    }

    fn count(&self, counter: fn(&RemoteCounters) -> &AtomicU64) {
        self.counters().add(counter);
    }

    /// `namespace:v:` + key bytes, or `None` if the key cannot be encoded.
    fn value_key(&self, key: &K, max_age: Option<Duration>) -> Option<ValueKey> {
        let mut bytes = self.prefix.clone();
        bytes.extend_from_slice(b"v:");
        let at = bytes.len();
        match self.key_codec.encode(key, &mut bytes) {
            Ok(()) => Some(ValueKey { bytes, at, max_age }),
            Err(_) => {
                self.count(|c| &c.errors);
                None
            }
        }
    }

    fn lease_key(&self, vkey: &ValueKey) -> Vec<u8> {
        let mut out = self.prefix.clone();
        out.extend_from_slice(b"l:");
        out.extend_from_slice(vkey.key());
        out
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

    /// Reads `key` from Redis: `Ok(Some)` a value, `Ok(None)` absent or undecodable, `Err`
    /// Redis unavailable (failed, timed out, or skipped by the breaker).
    fn read(&self, vkey: &ValueKey) -> Result<Option<Stored<V>>, ()> {
        let (bytes, pttl) = self
            .client
            .run(|c| {
                pipe()
                    .cmd("GET")
                    .arg(&vkey.bytes)
                    .cmd("PTTL")
                    .arg(&vkey.bytes)
                    .query::<(Option<Vec<u8>>, i64)>(c)
            })
            .ok_or(())?;
        match bytes.map(|b| self.found(&b, pttl, vkey.max_age)) {
            Some(Found::Value(v)) => Ok(Some(v)),
            Some(Found::Undecodable) => Ok(None),
            Some(Found::TooOld) | None => {
                self.count(|c| &c.misses);
                Ok(None)
            }
        }
    }

    /// A value read from Redis, with the milliseconds it has left there (`PTTL`); its age is
    /// the tier's time to live minus that.
    fn found(&self, bytes: &[u8], pttl: i64, max_age: Option<Duration>) -> Found<V> {
        let ttl_ms = u64::try_from(pttl).ok().filter(|&ms| ms > 0);
        if let (Some(max), Some(left)) = (max_age, ttl_ms) {
            let age = millis(self.ttl).saturating_sub(left);
            if u128::from(age) >= max.as_millis() {
                return Found::TooOld;
            }
        }
        let Some(value) = self.decode(bytes) else {
            return Found::Undecodable;
        };
        self.count(|c| &c.hits);
        Found::Value(Stored { value, ttl_ms })
    }

    /// Writes a value to Redis with the tier's time to live (skipped if Redis is unavailable).
    /// False if Redis failed (not for a value that cannot be encoded).
    fn write(&self, vkey: &[u8], value: &V) -> bool {
        let mut bytes = Vec::new();
        if self.value_codec.encode(value, &mut bytes).is_err() {
            self.count(|c| &c.errors);
            return true;
        }
        let px = millis(self.ttl);
        let done = self.client.run(|c| {
            cmd("SET")
                .arg(vkey)
                .arg(bytes)
                .arg("PX")
                .arg(px)
                .query::<()>(c)
        });
        if done.is_some() {
            self.count(|c| &c.writes);
        }
        done.is_some()
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
            Plan::Found(v) => Ok(v.publish()),
            Plan::Load(pending) => {
                // Finishes on every exit: a panicking loader gives the lease back at once.
                let mut guard = Finish {
                    tier: self,
                    pending: Some(pending),
                };
                let result = load();
                let pending = guard.pending.take().expect("set above");
                self.finish(pending, result.as_ref().ok());
                result
            }
        }
    }

    /// The async twin of [`fetch`](Self::fetch): the Redis work (read, lease, wait, write)
    /// runs on a helper thread while the caller awaits, so no executor thread blocks on the
    /// network. The write happens after the value is returned.
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
        let (t1, t2) = (Arc::clone(&self), Arc::clone(&self));
        let plan = offload(
            &self.pool,
            move || t1.plan(vkey),
            // The caller went away: give back a lease it would have held.
            move |plan| {
                if let Plan::Load(pending) = plan {
                    t2.finish(pending, None);
                }
            },
        )
        .await;
        let pending = match plan {
            Some(Plan::Found(v)) => return Ok(v.publish()),
            Some(Plan::Load(pending)) => pending,
            None => return load.await,
        };
        let mut guard = FinishLater {
            tier: Arc::clone(&self),
            pending: Some(pending),
            value: None,
        };
        let result = load.await;
        guard.value = result.as_ref().ok().cloned();
        drop(guard);
        result
    }

    /// The part of a fetch before the load: Redis's value, or how to load.
    fn plan(&self, vkey: ValueKey) -> Plan<V> {
        let pending = |lease, redis| {
            Plan::Load(Pending {
                vkey: vkey.bytes.clone(),
                lease,
                redis,
            })
        };
        match self.read(&vkey) {
            Ok(Some(v)) => return Plan::Found(v),
            Ok(None) => {}
            // Redis is unavailable: load without it (no lease, no write), so that a call pays
            // at most one operation's timeout.
            Err(()) => return pending(None, false),
        }
        let Some(cfg) = self.lease else {
            return pending(None, true);
        };
        let lkey = self.lease_key(&vkey);
        match self.lease_or_wait(&vkey, &lkey, cfg) {
            Lease::Value(v) => Plan::Found(v),
            Lease::Held(token) => pending(Some((lkey, token)), true),
            Lease::Local => pending(None, true),
            Lease::Unavailable => pending(None, false),
        }
    }

    /// The part of a fetch after the load: writes the value (if any, and if Redis was
    /// reachable), then gives the lease back — after the write, so waiters find the value.
    fn finish(&self, pending: Pending, value: Option<&V>) {
        let written = match value {
            Some(v) if pending.redis => self.write(&pending.vkey, v),
            _ => true,
        };
        if let Some((lkey, token)) = pending.lease {
            // If Redis just failed, do not spend another timeout: the lease expires by itself.
            if written {
                self.release(&lkey, token);
            }
        }
    }

    fn release(&self, lkey: &[u8], token: u64) {
        self.client.run(|c| {
            cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(lkey)
                .arg(token)
                .query::<()>(c)
        });
    }

    fn lease_or_wait(&self, vkey: &ValueKey, lkey: &[u8], cfg: LeaseConfig) -> Lease<V> {
        let deadline = Instant::now() + cfg.wait;
        let mut vanished = 0;
        let mut waited = false;
        loop {
            // Take the lease and look at the value in one round trip, in this order: a holder
            // writes its value before releasing, so if the lease was free the value of the
            // load that just ended (if any) is visible to the GET.
            let token = self.token();
            let got = self.client.run(|c| {
                pipe()
                    .cmd("SET")
                    .arg(lkey)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(cfg.ttl))
                    .cmd("GET")
                    .arg(&vkey.bytes)
                    .cmd("PTTL")
                    .arg(&vkey.bytes)
                    .query::<(Value, Option<Vec<u8>>, i64)>(c)
            });
            let Some((lease, value, pttl)) = got else {
                if waited {
                    self.count(|c| &c.lease_fallbacks);
                }
                return Lease::Unavailable;
            };
            let held = !matches!(lease, Value::Nil);
            let found = value.map(|b| self.found(&b, pttl, vkey.max_age));
            if let Some(Found::Value(v)) = found {
                if held {
                    // Taken needlessly: give it back.
                    self.release(lkey, token);
                }
                if waited {
                    self.count(|c| &c.lease_wait_hits);
                }
                return Lease::Value(v);
            }
            if held {
                self.count(|c| &c.leases_acquired);
                return Lease::Held(token);
            }
            if !waited {
                waited = true;
                self.count(|c| &c.lease_waits);
            }
            // Another instance holds the lease: poll for its value, backing off to 20 ms.
            let mut pause = Duration::from_millis(1);
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return self.give_up();
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(20));
                let seen = self.client.run(|c| {
                    pipe()
                        .cmd("GET")
                        .arg(&vkey.bytes)
                        .cmd("EXISTS")
                        .arg(lkey)
                        .cmd("PTTL")
                        .arg(&vkey.bytes)
                        .query::<(Option<Vec<u8>>, bool, i64)>(c)
                });
                let Some((value, leased, pttl)) = seen else {
                    self.count(|c| &c.lease_fallbacks);
                    return Lease::Unavailable;
                };
                match value.map(|b| self.found(&b, pttl, vkey.max_age)) {
                    Some(Found::Value(v)) => {
                        self.count(|c| &c.lease_wait_hits);
                        return Lease::Value(v);
                    }
                    Some(Found::Undecodable) => return self.give_up(),
                    // Nothing yet (or only the value being refreshed), the holder is at work.
                    Some(Found::TooOld) | None if leased => {}
                    Some(Found::TooOld) | None => {
                        // The holder released without a value (its load failed) or died and
                        // the lease expired: try to take over, at most twice.
                        vanished += 1;
                        if vanished > 2 {
                            return self.give_up();
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Ends a wait for another instance's value: load locally.
    fn give_up(&self) -> Lease<V> {
        self.count(|c| &c.lease_fallbacks);
        Lease::Local
    }

    /// Writes `value` for `key` to Redis and tells the other instances to drop their copies.
    pub(crate) fn put(&self, key: &K, value: &V) {
        if let Some(vkey) = self.value_key(key, None) {
            if self.write(&vkey.bytes, value) {
                self.publish(MSG_KEY, vkey.key());
            }
        }
    }

    /// Deletes `key` from Redis and tells the other instances to drop their copies.
    pub(crate) fn invalidate(&self, key: &K) {
        if let Some(vkey) = self.value_key(key, None) {
            let deleted = self
                .client
                .run(|c| cmd("DEL").arg(&vkey.bytes).query::<()>(c));
            if deleted.is_some() {
                self.publish(MSG_KEY, vkey.key());
            }
        }
    }

    /// Deletes every value of the namespace from Redis (`SCAN` + `UNLINK`, one batch per
    /// operation) and tells the other instances to clear.
    pub(crate) fn invalidate_all(&self) {
        let mut pattern = Vec::with_capacity(self.prefix.len() + 3);
        for &b in &self.prefix {
            if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                pattern.push(b'\\');
            }
            pattern.push(b);
        }
        pattern.extend_from_slice(b"v:*");
        let mut cursor = 0u64;
        loop {
            let batch = self.client.run(|c| {
                cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query::<(u64, Vec<Vec<u8>>)>(c)
            });
            // Redis failed: the publish would too (and cost another timeout).
            let Some((next, keys)) = batch else { return };
            if !keys.is_empty() {
                self.client.run(|c| cmd("UNLINK").arg(&keys).query::<()>(c));
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.publish(MSG_ALL, &[]);
    }

    fn publish(&self, kind: u8, key: &[u8]) {
        let mut msg = Vec::with_capacity(9 + key.len());
        msg.push(kind);
        msg.extend_from_slice(&self.origin.to_le_bytes());
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

/// Finishes a blocking fetch whose load unwound.
struct Finish<'a, K: 'static, V: 'static> {
    tier: &'a Tier<K, V>,
    pending: Option<Pending>,
}

impl<K: 'static, V: 'static> Drop for Finish<'_, K, V> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            self.tier.finish(p, None);
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
                .submit(move || tier.finish(p, value.as_ref()));
        }
    }
}

/// Milliseconds for `PX`, at least 1.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Splits an invalidation message into its kind, origin and key.
pub(crate) fn parse_message(payload: &[u8]) -> Option<(u8, u64, &[u8])> {
    if payload.len() < 9 {
        return None;
    }
    let origin = u64::from_le_bytes(payload[1..9].try_into().ok()?);
    Some((payload[0], origin, &payload[9..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_short_ones_are_rejected() {
        let mut msg = vec![MSG_KEY];
        msg.extend_from_slice(&7u64.to_le_bytes());
        msg.extend_from_slice(b"key");
        assert_eq!(parse_message(&msg), Some((MSG_KEY, 7, &b"key"[..])));
        assert_eq!(parse_message(&msg[..8]), None);
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
