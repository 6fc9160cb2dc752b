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
