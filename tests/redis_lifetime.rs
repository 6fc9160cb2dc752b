//! The invalidation subscriber's thread lives as long as the cache: alone in its test binary,
//! so that no other test's threads are counted.
#![cfg(feature = "redis")]

mod common;
use herdcache_testkit::redis_server;

use common::eventually;
use herdcache::codec::Plain;
use herdcache::redis::RedisTier;
use herdcache::Cache;
use redis_server::RedisServer;
use std::time::Duration;

/// Threads of this process whose name starts with `prefix` (Linux: /proc/self/task/*/comm,
/// where names are cut to 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn dropping_the_last_handle_stops_the_subscriber() {
    let _w = common::watchdog(Duration::from_secs(60), "subscriber exit");
    let server = RedisServer::start();
    let a = RedisTier::new(server.url())
        .build(
            Cache::<u64, u64>::builder()
                .max_capacity(10)
                .time_to_live(Duration::from_secs(60)),
            Plain,
        )
        .unwrap();
    assert!(eventually(|| a.is_subscribed()));
    assert_eq!(threads_named("herdcache-inval"), 1);
    let clone = a.clone();
    drop(a);
    assert!(clone.is_subscribed(), "a clone keeps it alive");
    assert_eq!(threads_named("herdcache-inval"), 1);
    drop(clone);
    assert!(
        eventually(|| threads_named("herdcache-inval") == 0),
        "the subscriber thread exited"
    );
}
