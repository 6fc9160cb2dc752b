//! The Redis tier on a Redis Cluster (feature `redis-cluster`): three primaries on loopback
//! ports, started and joined by this test (`redis-server --cluster-enabled yes`, then
//! `redis-cli --cluster create`). Keys spread over the nodes; values written by one instance
//! are read by another; inserts, invalidations and `invalidate_all` (which must tombstone the
//! keys on every primary) reach every instance.
//!
//! Skipped, with the reason printed, if `redis-cli` is missing or the cluster cannot be
//! formed; `.ci/run` has both (Debian's `redis-server` package).
#![cfg(feature = "redis-cluster")]

mod common;
use herdcache_testkit::redis_server;

use common::{eventually, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use redis_server::{free_port, RedisServer};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: u64 = 200;

/// Three cluster nodes, joined; `Err` with the reason if that cannot be done here.
fn cluster() -> Result<(Vec<RedisServer>, std::path::PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("herdcache-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let conf = dir.join(format!("nodes-{i}.conf"));
        let _ = std::fs::remove_file(&conf);
        nodes.push(RedisServer::try_start_with(vec![
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-config-file".into(),
            conf.to_string_lossy().into_owned(),
            "--cluster-port".into(),
            free_port().to_string(),
            "--cluster-node-timeout".into(),
            "5000".into(),
        ])?);
    }
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    let until = Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &n.port.to_string(), "cluster", "info"])
                .output()
                .map_err(|e| e.to_string())?;
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            if Instant::now() > until {
                return Err("the cluster did not reach cluster_state:ok in 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok((nodes, dir))
}

fn instance(urls: &[String], loads: &Arc<AtomicU64>) -> TieredCache<u64, u64> {
    let l = Arc::clone(loads);
    RedisTier::cluster(urls.iter().cloned())
        .namespace("cl")
        .lease(Duration::from_secs(5), Duration::from_millis(500))
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .build(
            Cache::builder()
                .max_capacity(10_000)
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

fn dbsize(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "dbsize"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn the_tier_works_on_a_three_node_cluster() {
    let _w = watchdog(Duration::from_secs(180), "cluster");
    let (nodes, dir) = match cluster() {
        Ok(c) => c,
        Err(why) => {
            println!("SKIPPED the Cluster test: {why}");
            return;
        }
    };
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let loads = Arc::new(AtomicU64::new(0));
    let a = instance(&urls, &loads);
    let b = instance(&urls[1..], &loads); // discovers the rest
    assert!(eventually(|| a.is_subscribed() && b.is_subscribed()));
    for k in 0..KEYS {
        assert_eq!(a.load(k).unwrap(), k * 10);
    }
    for k in 0..KEYS {
        assert_eq!(b.load(k).unwrap(), k * 10, "from Redis");
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        KEYS,
        "B read every value A wrote"
    );
    for n in &nodes {
        assert!(dbsize(n.port) > 0, "the keys spread over every node");
    }
    b.insert(5, 555);
    b.invalidate(&6);
    assert!(eventually(|| a.get(&5).is_none() && a.get(&6).is_none()));
    assert_eq!(a.load(5).unwrap(), 555);
    assert_eq!(a.load(6).unwrap(), 60);
    assert_eq!(loads.load(Ordering::SeqCst), KEYS + 1);
    // invalidate_all: every primary's keys are tombstoned, every instance clears.
    b.invalidate_all();
    assert!(eventually(|| a.entry_count() == 0), "A heard of it");
    let before = loads.load(Ordering::SeqCst);
    for k in 0..KEYS {
        assert_eq!(a.load(k).unwrap(), k * 10);
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        before + KEYS,
        "no value survived invalidate_all on any node"
    );
    // The cache-aside race on the cluster: H's load reads version 1 of the backend and is
    // held; the backend moves to version 2 and B invalidates; H's write-back is refused.
    let version = Arc::new(AtomicU64::new(1));
    let (read_tx, read_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let hold = std::sync::Mutex::new(Some((read_tx, release_rx)));
    let v = Arc::clone(&version);
    let h = RedisTier::cluster(urls.iter().cloned())
        .namespace("cl")
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(600))
                .loader(move |_k: &u64| {
                    let seen = v.load(Ordering::SeqCst);
                    if let Some((read, release)) = hold.lock().unwrap().take() {
                        read.send(seen).unwrap();
                        release.recv().unwrap();
                    }
                    Ok::<_, BoxError>(seen)
                }),
            Plain,
        )
        .unwrap();
    let held = {
        let h = h.clone();
        std::thread::spawn(move || h.load(999).unwrap())
    };
    assert_eq!(read_rx.recv().unwrap(), 1);
    version.store(2, Ordering::SeqCst);
    b.invalidate(&999);
    release_tx.send(()).unwrap();
    assert_eq!(held.join().unwrap(), 1, "H's caller gets what it loaded");
    assert!(
        h.stats().remote.writes_superseded >= 1,
        "H's write-back refused"
    );
    let v2 = Arc::clone(&version);
    let fresh = RedisTier::cluster(urls.iter().cloned())
        .namespace("cl")
        .build(
            Cache::builder()
                .max_capacity(100)
                .time_to_live(Duration::from_secs(600))
                .loader(move |_k: &u64| Ok::<_, BoxError>(v2.load(Ordering::SeqCst))),
            Plain,
        )
        .unwrap();
    assert_eq!(
        fresh.load(999).unwrap(),
        2,
        "Redis never yields the older value"
    );
    let r = a.stats().remote;
    assert_eq!((r.errors, r.timeouts, r.key_errors), (0, 0, 0), "{r:?}");
    let r = b.stats().remote;
    assert_eq!((r.errors, r.timeouts, r.key_errors), (0, 0, 0), "{r:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
