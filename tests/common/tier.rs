//! Helpers for the Redis tier's tests: a plain connection to the test server, and where the
//! tier keeps a key's value in Redis.

use herdcache_testkit::redis_server::RedisServer;

/// A plain connection to `server`, to read and write behind the tier's back.
pub fn raw(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// The Redis key of `k`'s value in namespace `ns` (the tier's layout: a length-prefixed
/// namespace and the key in a hash tag).
pub fn vkey(ns: &str, k: impl std::fmt::Display) -> String {
    format!("hc:{}:{ns}:v{{{k}}}", ns.len())
}

use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache, CacheBuilder, ManualClock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tier in namespace `ns`: values live 600 s in Redis, commands time out after 300 ms.
pub fn tier(url: String, ns: &str) -> RedisTier {
    RedisTier::new(url)
        .namespace(ns)
        .ttl(Duration::from_secs(600))
        .timeouts(Duration::from_millis(300), Duration::from_millis(300))
}

/// A cache of 10,000 entries whose values live 600 s, with statistics.
pub fn builder() -> CacheBuilder<u64, String> {
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(600))
        .record_stats()
}

/// `b` in front of `t`, values stored as they are.
pub fn build(t: RedisTier, b: CacheBuilder<u64, String>) -> TieredCache<u64, String> {
    t.build(b, Plain).expect("valid configuration")
}

/// The Redis key of namespace `ns`'s epoch.
pub fn epoch_key(ns: &str) -> String {
    format!("hc:{}:{ns}:epoch", ns.len())
}

/// Field `f` of `k`'s record in Redis (`d`: the value, `v`: its version).
pub fn hget(c: &mut redis::Connection, ns: &str, k: u64, f: &str) -> Option<String> {
    redis::cmd("HGET").arg(vkey(ns, k)).arg(f).query(c).unwrap()
}

/// `k`'s value in Redis.
pub fn rvalue(c: &mut redis::Connection, ns: &str, k: u64) -> Option<String> {
    hget(c, ns, k, "d")
}

/// `k`'s version in Redis.
pub fn rversion(c: &mut redis::Connection, ns: &str, k: u64) -> Option<String> {
    hget(c, ns, k, "v")
}

/// The time `key` has left to live in Redis, in milliseconds (Redis's `PTTL`).
pub fn pttl(c: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(c).unwrap()
}

/// Creates a Redis user `deaf` that may do everything but subscribe (no channel permission):
/// an instance connecting as it never hears invalidation messages (a deterministic stand-in
/// for messages lost in transit, which the docs say the epoch and versions make up for).
pub fn deaf_user(server: &RedisServer) {
    let mut c = raw(server);
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("deaf")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("resetchannels")
        .arg("+@all")
        .query::<()>(&mut c)
        .unwrap();
}

/// The URL of [`deaf_user`] on `server` (creating it).
pub fn deaf_url(server: &RedisServer) -> String {
    deaf_user(server);
    format!("redis://deaf:pw@127.0.0.1:{}/", server.port)
}

/// A fail-safe cache (time to live 60 s, max_stale 600 s, backoff 5 s) whose loader fails
/// while `down` and otherwise loads `{tag}{key}-{call}`.
pub fn fail_safe_builder(
    clock: &ManualClock,
    down: &Arc<AtomicBool>,
    tag: &'static str,
) -> CacheBuilder<u64, String> {
    counted_fail_safe_builder(clock, down, &Arc::new(AtomicU64::new(0)), tag)
}

/// [`fail_safe_builder`] whose loader calls `n` counts.
pub fn counted_fail_safe_builder(
    clock: &ManualClock,
    down: &Arc<AtomicBool>,
    n: &Arc<AtomicU64>,
    tag: &'static str,
) -> CacheBuilder<u64, String> {
    let d = Arc::clone(down);
    let n = Arc::clone(n);
    Cache::builder()
        .max_capacity(100_000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .loader(move |k: &u64| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                Err(BoxError::from("backend down"))
            } else {
                Ok(format!("{tag}{k}-{i}"))
            }
        })
}

/// The tier for fail-safe tests: its time to live the cache's (60 s), breaker out of the way
/// (the deaf user may not PUBLISH: NOPERM counts against it).
pub fn fs_tier(url: String, ns: &str) -> RedisTier {
    RedisTier::new(url)
        .namespace(ns)
        .timeouts(Duration::from_millis(300), Duration::from_millis(300))
        .breaker(1_000_000, Duration::from_millis(1))
}

/// Instance B of a fail-safe pair: on `ns`, hears every message, its backend never down.
pub fn fs_instance(
    server: &RedisServer,
    ns: &str,
    clock: &ManualClock,
) -> TieredCache<u64, String> {
    let up = Arc::new(AtomicBool::new(false));
    fs_tier(server.url(), ns)
        .build(fail_safe_builder(clock, &up, "b"), Plain)
        .unwrap()
}

/// A (the tier `a_tier`, usually on [`deaf_url`], with the cache `a`) and B
/// ([`fs_instance`]) on one namespace `ns`.
pub fn fs_pair(
    server: &RedisServer,
    ns: &str,
    clock: &ManualClock,
    a_tier: RedisTier,
    a: CacheBuilder<u64, String>,
) -> (TieredCache<u64, String>, TieredCache<u64, String>) {
    (
        a_tier.build(a, Plain).unwrap(),
        fs_instance(server, ns, clock),
    )
}

/// A fail-safe cache as [`fail_safe_builder`]'s (time to live 60 s, max_stale 600 s, backoff
/// 5 s, capacity 1,000) with an async loader: pending while `hang` (it sets `entered` first),
/// then failing while `down`, else `a{key}-{call}`.
pub fn async_fail_safe_builder(
    clock: &ManualClock,
    down: &Arc<AtomicBool>,
    hang: &Arc<AtomicBool>,
    entered: &Arc<AtomicBool>,
) -> CacheBuilder<u64, String> {
    let (d, h, e) = (Arc::clone(down), Arc::clone(hang), Arc::clone(entered));
    let n = Arc::new(AtomicU64::new(0));
    Cache::builder()
        .max_capacity(1000)
        .time_to_live(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .refresh_backoff(Duration::from_secs(5))
        .record_stats()
        .clock(clock.clone())
        .async_loader(move |k: &u64| {
            let (d, h, e, n, k) = (
                Arc::clone(&d),
                Arc::clone(&h),
                Arc::clone(&e),
                Arc::clone(&n),
                *k,
            );
            async move {
                if h.load(Ordering::SeqCst) {
                    e.store(true, Ordering::SeqCst);
                    std::future::poll_fn(|cx| {
                        if h.load(Ordering::SeqCst) {
                            cx.waker().wake_by_ref();
                            std::task::Poll::Pending
                        } else {
                            std::task::Poll::Ready(())
                        }
                    })
                    .await;
                }
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("backend down"))
                } else {
                    Ok(format!("a{k}-{}", n.fetch_add(1, Ordering::SeqCst)))
                }
            }
        })
}
