//! The Redis tier over TLS (`rediss://`, feature `redis-tls`): a local `redis-server` with
//! `--tls-port` and certificates this test generates with `openssl` (a CA, a server
//! certificate for 127.0.0.1, a client certificate: Redis authenticates TLS clients by
//! default). Values, leases, versioned writes and invalidation messages all go over TLS.
//!
//! Skipped, with the reason printed, if `openssl` is missing or `redis-server` was built
//! without TLS; `.ci/run` has both (Debian's `redis-server` and `openssl`).
#![cfg(feature = "redis-tls")]

mod common;
#[path = "common/proxy.rs"]
mod proxy;
use herdcache_testkit::redis_server;

use common::{eventually, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use proxy::Proxy;
use redis_server::{free_port, RedisServer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A CA, a server certificate (SAN IP 127.0.0.1) and a client certificate, in a fresh
/// directory; `Err` if `openssl` is not available.
fn certificates() -> Result<PathBuf, String> {
    // One directory per call: the tests run in parallel, each removes its own.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "herdcache-tls-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=herdcache test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ])?;
    // Version 3 certificates (webpki accepts no other): each with its extensions.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
        .map_err(|e| e.to_string())?;
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=herdcache test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ])?;
        let args = vec![
            "x509".to_string(),
            "-req".into(),
            "-in".into(),
            format!("{name}.csr"),
            "-CA".into(),
            "ca.crt".into(),
            "-CAkey".into(),
            "ca.key".into(),
            "-CAcreateserial".into(),
            "-days".into(),
            "2".into(),
            "-out".into(),
            format!("{name}.crt"),
            "-extfile".into(),
            format!("{name}.ext"),
        ];
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(dir)
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

fn instance(url: &str, dir: &Path, loads: &Arc<AtomicU64>) -> TieredCache<u64, u64> {
    let l = Arc::clone(loads);
    RedisTier::new(url)
        .namespace("tls")
        .lease(Duration::from_secs(5), Duration::from_millis(500))
        .timeouts(Duration::from_secs(2), Duration::from_secs(1))
        .tls_root_certificate(read(dir, "ca.crt"))
        .tls_client_certificate(read(dir, "client.crt"), read(dir, "client.key"))
        .build(
            Cache::builder()
                .max_capacity(1_000)
                .time_to_live(Duration::from_secs(600))
                .record_stats()
                .loader(move |k: &u64| {
                    l.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>(k * 10)
                }),
            Plain,
        )
        .unwrap()
}

/// A `redis-server` with a TLS port, its certificates' directory and the TLS port; `None`
/// (the reason printed) if this machine cannot run one.
fn tls_server(test: &str) -> Option<(RedisServer, PathBuf, u16)> {
    let dir = match certificates() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIPPED the {test} test: {why}");
            return None;
        }
    };
    let tls_port = free_port();
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    match RedisServer::try_start_with(vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path("server.crt"),
        "--tls-key-file".into(),
        path("server.key"),
        "--tls-ca-cert-file".into(),
        path("ca.crt"),
    ]) {
        Ok(s) => Some((s, dir, tls_port)),
        Err(why) => {
            println!("SKIPPED the {test} test: redis-server has no TLS here ({why})");
            None
        }
    }
}

#[test]
fn the_tier_works_over_tls_with_a_private_ca_and_a_client_certificate() {
    let _w = watchdog(Duration::from_secs(120), "TLS");
    let Some((server, dir, tls_port)) = tls_server("TLS") else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let loads = Arc::new(AtomicU64::new(0));
    let a = instance(&url, &dir, &loads);
    let b = instance(&url, &dir, &loads);
    assert!(
        eventually(|| a.is_subscribed() && b.is_subscribed()),
        "the subscribers connect over TLS"
    );
    assert_eq!(a.load(1).unwrap(), 10);
    assert_eq!(b.load(1).unwrap(), 10, "from Redis, over TLS");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    b.insert(1, 11);
    assert!(
        eventually(|| a.get(&1).is_none()),
        "the message arrived over TLS"
    );
    assert_eq!(a.load(1).unwrap(), 11);
    let r = a.stats().remote;
    assert_eq!((r.errors, r.timeouts), (0, 0), "{r:?}");
    // A client without the CA does not trust the server: the tier is unavailable, requests
    // still succeed from the loader.
    let untrusted = RedisTier::new(&url)
        .namespace("tls")
        .timeouts(Duration::from_secs(2), Duration::from_secs(1))
        .build(
            Cache::builder()
                .max_capacity(10)
                .time_to_live(Duration::from_secs(60))
                .loader(|k: &u64| Ok::<_, BoxError>(k + 1)),
            Plain,
        )
        .unwrap();
    assert_eq!(untrusted.load(1).unwrap(), 2);
    let r = untrusted.stats().remote;
    assert!(r.errors >= 1 && r.hits == 0, "{r:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 12, scenario 4 over TLS: the proxy drips the server's bytes (TLS records) one every
/// 30 ms, so every socket read returns within the 50 ms operation timeout and a reply takes
/// seconds. Each operation must still end at its deadline (the TLS layer's reads included),
/// count a timeout, and feed the breaker, which opens after 3 of them.
#[test]
fn a_dripping_tls_reply_ends_at_the_operation_deadline_and_opens_the_breaker() {
    let _w = watchdog(Duration::from_secs(120), "dripping TLS replies");
    let Some((server, dir, tls_port)) = tls_server("dripping TLS") else {
        return;
    };
    let proxy = Proxy::start(tls_port);
    let tier = |url: &str| {
        RedisTier::new(url)
            .namespace("drip")
            .tls_root_certificate(read(&dir, "ca.crt"))
            .tls_client_certificate(read(&dir, "client.crt"), read(&dir, "client.key"))
    };
    let build = |tier: RedisTier| {
        tier.build(
            Cache::builder()
                .max_capacity(1_000)
                .time_to_live(Duration::from_secs(600))
                .record_stats()
                .loader(|k: &u64| Ok::<_, BoxError>(1000 + k)),
            Plain,
        )
        .unwrap()
    };
    let direct = build(
        tier(&format!("rediss://127.0.0.1:{tls_port}/"))
            .timeouts(Duration::from_secs(2), Duration::from_secs(1)),
    );
    for k in 0..3 {
        direct.insert(k, 1); // in Redis: a slow read would find it
    }
    assert_eq!(
        direct.stats().remote.writes,
        3,
        "{:?}",
        direct.stats().remote
    );
    let a = build(
        tier(&proxy.tls_url())
            // A connect timeout ample for a handshake on loopback, a short operation timeout.
            .timeouts(Duration::from_millis(500), Duration::from_millis(50))
            .breaker(3, Duration::from_secs(600)),
    );
    assert_eq!(a.load(99).unwrap(), 1099, "the link works before the drip");
    assert_eq!(a.stats().remote.errors, 0, "{:?}", a.stats().remote);
    proxy.drip(Duration::from_millis(30));
    let mut took = Vec::new();
    let mut got = Vec::new();
    for k in 0..3 {
        let t = Instant::now();
        got.push(a.load(k).unwrap());
        took.push(t.elapsed());
    }
    let r = a.stats().remote;
    // The first load uses the pooled connection (bound: the operation timeout); the next ones
    // open a new connection, whose dripping handshake ends at the connect timeout.
    println!(
        "dripping TLS replies (1 byte / 30 ms, timeouts: connect 500 ms, operation 50 ms): \
         loads took {took:?}, timeouts {}, breaker open {}",
        r.timeouts,
        a.is_breaker_open()
    );
    assert_eq!(
        got,
        [1000, 1001, 1002],
        "the reads timed out: loaded locally"
    );
    assert!(r.timeouts >= 3, "each dripping reply is a timeout: {r:?}");
    assert!(
        a.is_breaker_open(),
        "three timeouts in a row open the breaker"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
