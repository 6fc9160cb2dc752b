//! The Redis tier over TLS (`rediss://`, feature `redis-tls`): a local `redis-server` with
//! `--tls-port` and certificates this test generates with `openssl` (a CA, a server
//! certificate for 127.0.0.1, a client certificate: Redis authenticates TLS clients by
//! default). Values, leases, versioned writes and invalidation messages all go over TLS.
//!
//! Skipped, with the reason printed, if `openssl` is missing or `redis-server` was built
//! without TLS; `.ci/run` has both (Debian's `redis-server` and `openssl`).
#![cfg(feature = "redis-tls")]

mod common;
use herdcache_testkit::redis_server;

use common::{eventually, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use redis_server::{free_port, RedisServer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A CA, a server certificate (SAN IP 127.0.0.1) and a client certificate, in a fresh
/// directory; `Err` if `openssl` is not available.
fn certificates() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("herdcache-tls-{}", std::process::id()));
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

#[test]
fn the_tier_works_over_tls_with_a_private_ca_and_a_client_certificate() {
    let _w = watchdog(Duration::from_secs(120), "TLS");
    let dir = match certificates() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIPPED the TLS test: {why}");
            return;
        }
    };
    let tls_port = free_port();
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let server = match RedisServer::try_start_with(vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path("server.crt"),
        "--tls-key-file".into(),
        path("server.key"),
        "--tls-ca-cert-file".into(),
        path("ca.crt"),
    ]) {
        Ok(s) => s,
        Err(why) => {
            println!("SKIPPED the TLS test: redis-server has no TLS here ({why})");
            return;
        }
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
