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
#[path = "common/proxy.rs"]
mod proxy;
use herdcache_testkit::redis_server;

use common::{eventually, watchdog};
use herdcache::codec::Plain;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use proxy::Proxy;
use redis_server::{free_port, RedisServer};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: u64 = 200;

/// A formed cluster: its nodes, the proxies in front of them (if asked for), its directory.
type Formed = (Vec<RedisServer>, Vec<Proxy>, std::path::PathBuf);

/// Three cluster nodes, joined; `Err` with the reason if that cannot be done here. With
/// `proxied`, each node has a fault-injecting proxy in front of it and announces the proxy's
/// port (`cluster-announce-port`), so that clients reach every node through its proxy.
fn cluster(proxied: bool) -> Result<Formed, String> {
    // One directory per call: the tests run in parallel, each removes its own.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "herdcache-cluster-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::SeqCst)
    ));
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
    let mut proxies = Vec::new();
    if proxied {
        for n in &nodes {
            let p = Proxy::start(n.port);
            redis_cli(
                n.port,
                &[
                    "config",
                    "set",
                    "cluster-announce-port",
                    &p.port().to_string(),
                ],
            )?;
            proxies.push(p);
        }
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
    if proxied {
        // Every node's view of the slots names the proxies.
        for n in &nodes {
            loop {
                let slots = redis_cli(n.port, &["cluster", "slots"])?;
                if proxies
                    .iter()
                    .all(|p| slots.contains(&p.port().to_string()))
                {
                    break;
                }
                if Instant::now() > until {
                    return Err("the nodes did not announce their proxies in 30 s".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok((nodes, proxies, dir))
}

/// `redis-cli -p port args…`: its output.
fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn instance(urls: &[String], loads: &Arc<AtomicU64>) -> TieredCache<u64, u64> {
    tiered(
        RedisTier::cluster(urls.iter().cloned())
            .namespace("cl")
            .lease(Duration::from_secs(5), Duration::from_millis(500))
            .timeouts(Duration::from_secs(1), Duration::from_secs(1)),
        loads,
    )
}

/// An instance on `tier` whose loader returns `10 × key` and counts its calls.
fn tiered(tier: RedisTier, loads: &Arc<AtomicU64>) -> TieredCache<u64, u64> {
    let l = Arc::clone(loads);
    tier.build(
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
    let (nodes, _, dir) = match cluster(false) {
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

/// `CLUSTER MYID` of the node on `port`.
fn node_id(port: u16) -> String {
    redis_cli(port, &["cluster", "myid"])
        .unwrap()
        .trim()
        .to_owned()
}

/// A resharding under the tier's feet: the slot of a key moves from its node to another.
/// While the slot migrates (the key already on the target), the old owner answers `ASK`;
/// once the slot is reassigned, `MOVED`. Instances whose slot map predates the move follow
/// both redirects, within the operation's deadline: the value comes from Redis, and nothing
/// counts as an error.
#[test]
fn a_resharded_key_is_followed_through_ask_and_moved() {
    let _w = watchdog(Duration::from_secs(180), "cluster resharding");
    let (nodes, _, dir) = match cluster(false) {
        Ok(c) => c,
        Err(why) => {
            println!("SKIPPED the Cluster resharding test: {why}");
            return;
        }
    };
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let loads = Arc::new(AtomicU64::new(0));
    let a = instance(&urls, &loads);
    for k in 0..20 {
        assert_eq!(a.load(k).unwrap(), k * 10);
    }
    // Two instances that know the slot map before the move (one operation each).
    let ask = instance(&urls, &loads);
    let moved = instance(&urls, &loads);
    assert_eq!(ask.load(1_000).unwrap(), 10_000);
    assert_eq!(moved.load(1_001).unwrap(), 10_010);
    let before = loads.load(Ordering::SeqCst);
    // Key 7's value key and its slot's owner.
    let vkey = "hc:2:cl:v{7}";
    let slot = redis_cli(nodes[0].port, &["cluster", "keyslot", vkey])
        .unwrap()
        .trim()
        .to_owned();
    let owner = nodes
        .iter()
        .position(|n| redis_cli(n.port, &["exists", vkey]).unwrap().trim() == "1")
        .expect("key 7's value is in Redis");
    let (from, to) = (&nodes[owner], &nodes[(owner + 1) % nodes.len()]);
    let (from_id, to_id) = (node_id(from.port), node_id(to.port));
    let ok = |port: u16, args: &[&str]| {
        let out = redis_cli(port, args).unwrap();
        assert!(out.trim() == "OK", "redis-cli {args:?}: {out}");
    };
    ok(
        to.port,
        &["cluster", "setslot", &slot, "importing", &from_id],
    );
    ok(
        from.port,
        &["cluster", "setslot", &slot, "migrating", &to_id],
    );
    let keys = redis_cli(from.port, &["cluster", "getkeysinslot", &slot, "100"]).unwrap();
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert!(keys.contains(&vkey), "{keys:?}");
    let mut migrate = vec!["migrate", "127.0.0.1"];
    let to_port = to.port.to_string();
    migrate.extend([to_port.as_str(), "", "0", "5000", "KEYS"]);
    migrate.extend(keys.iter().copied());
    ok(from.port, &migrate);
    // The old owner now answers ASK for the key.
    assert_eq!(ask.load(7).unwrap(), 70);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        before,
        "read from the migration's target after ASK"
    );
    let r = ask.stats().remote;
    assert_eq!((r.errors, r.timeouts, r.hits), (0, 0, 1), "{r:?}");
    // The slot is reassigned: the old owner answers MOVED.
    for n in &nodes {
        ok(n.port, &["cluster", "setslot", &slot, "node", &to_id]);
    }
    assert_eq!(moved.load(7).unwrap(), 70);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        before,
        "read from the new owner after MOVED"
    );
    // A write to the moved key goes to the new owner too.
    moved.insert(7, 77);
    assert!(eventually(|| a.get(&7).is_none()), "A heard of it");
    assert_eq!(a.load(7).unwrap(), 77);
    let r = moved.stats().remote;
    assert_eq!((r.errors, r.timeouts, r.hits), (0, 0, 1), "{r:?}");
    let r = a.stats().remote;
    assert_eq!((r.errors, r.timeouts), (0, 0), "{r:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 12, scenario 4 on a cluster: every node behind a proxy (announced to clients) that
/// drips replies a byte every 30 ms, so every socket read returns within the 50 ms operation
/// timeout. Each operation (its reads go to two nodes: the key's and the namespace epoch's)
/// must end at its deadline, count a timeout, and feed the breaker.
#[test]
fn a_dripping_cluster_reply_ends_at_the_operation_deadline_and_opens_the_breaker() {
    let _w = watchdog(Duration::from_secs(180), "dripping cluster replies");
    let (nodes, proxies, dir) = match cluster(true) {
        Ok(c) => c,
        Err(why) => {
            println!("SKIPPED the dripping Cluster test: {why}");
            return;
        }
    };
    let urls: Vec<String> = proxies.iter().map(Proxy::url).collect();
    let loads = Arc::new(AtomicU64::new(0));
    let direct = instance(&urls, &loads);
    for k in 0..3 {
        direct.insert(k, 1); // in Redis: a slow read would find it
    }
    let a = tiered(
        RedisTier::cluster(urls.iter().cloned())
            .namespace("cl")
            .timeouts(Duration::from_millis(500), Duration::from_millis(50))
            .breaker(3, Duration::from_secs(600)),
        &loads,
    );
    assert_eq!(a.load(99).unwrap(), 990, "the links work before the drip");
    for p in &proxies {
        p.drip(Duration::from_millis(30));
    }
    let mut took = Vec::new();
    let mut got = Vec::new();
    for k in 0..3 {
        let t = Instant::now();
        got.push(a.load(k).unwrap());
        took.push(t.elapsed());
    }
    let r = a.stats().remote;
    // The first load uses the pooled connections (bound: the operation timeout); the next
    // ones open new ones, whose dripping `CLUSTER SLOTS` ends at the connect timeout.
    println!(
        "dripping cluster replies (1 byte / 30 ms, timeouts: connect 500 ms, operation \
         50 ms): loads took {took:?}, timeouts {}, breaker open {}",
        r.timeouts,
        a.is_breaker_open()
    );
    assert_eq!(got, [0, 10, 20], "the reads timed out: loaded locally");
    assert!(r.timeouts >= 3, "each dripping reply is a timeout: {r:?}");
    assert!(
        a.is_breaker_open(),
        "three timeouts in a row open the breaker"
    );
    for p in &proxies {
        p.drip(Duration::ZERO);
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
