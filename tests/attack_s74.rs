//! Round 74 of the outside attacks (a helper, public API only): panic payloads whose `Drop`
//! panics again (and ordinary panics) raised by user
//! code on the Redis tier's paths: the key codec's decode and the key's `Hash`/`Eq` in the
//! invalidation subscriber, the eviction listener of the local tier when the subscriber
//! removes entries (per-key message, invalidate-all message, `clear_on_reconnect`), the value
//! codec during sync and async loads, write-backs and inserts.
//!
//! Cases that may abort the process (a payload dropped while unwinding, a thread's result
//! that panics on drop) run in a child process: the test fails instead of killing the binary.
//!
//! Each test starts its own `redis-server`.
//!
//! Its five findings failed on the code of stop 53's first fixes: an undecodable key's payload
//! (or error) held across the fallback `invalidate_all`, dropped while the listener's panic
//! unwound (the process aborted); `clear_on_reconnect`'s clear outside `catch_unwind` (the
//! subscriber thread died; with such a payload, the process aborted); a `TieredCache::insert`
//! whose local insert handed on the listener's panic skipped its check for a newer write heard
//! meanwhile (an older copy kept).
#![cfg(feature = "redis")]
#![cfg(not(any(loom, shuttle)))]

mod common;
use common::tier::raw;
use common::{eventually, start, watchdog};
use herdcache::codec::Codec;
use herdcache::redis::{RedisTier, TieredCache};
use herdcache::{BoxError, Cache};
use herdcache_testkit::redis_server::RedisServer;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Payloads and faults
// ---------------------------------------------------------------------------------------------

/// A payload whose `Drop` panics with `Bomb74(n - 1)`, down to 0.
#[derive(Debug)]
struct Bomb74(u32);

impl Drop for Bomb74 {
    fn drop(&mut self) {
        if self.0 > 0 {
            std::panic::panic_any(Bomb74(self.0 - 1));
        }
    }
}

/// A codec error whose `Drop` panics with a bomb.
#[derive(Debug)]
struct BombError(u32);

impl Drop for BombError {
    fn drop(&mut self) {
        std::panic::panic_any(Bomb74(self.0));
    }
}

impl std::fmt::Display for BombError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a codec error whose drop panics")
    }
}

impl std::error::Error for BombError {}

/// An ordinary planted panic.
#[derive(Debug)]
#[allow(dead_code)]
struct Planted(&'static str);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Plain,
    Bomb(u32),
}

fn fire(f: Fault) -> ! {
    match f {
        Fault::Plain => std::panic::panic_any(Planted("planted")),
        Fault::Bomb(n) => std::panic::panic_any(Bomb74(n)),
    }
}

fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            if p.is::<Bomb74>() || p.is::<Planted>() {
                return;
            }
            prev(info);
        }));
    });
}

/// Drops a payload the test caught, each further panic of its drop caught too.
fn discard(p: Box<dyn std::any::Any + Send>) {
    let mut p = p;
    for _ in 0..16 {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(p))) {
            Ok(()) => return,
            Err(next) => p = next,
        }
    }
    std::mem::forget(p);
}

/// What a caught payload is: "bomb N", "planted", or something else.
fn describe(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(b) = p.downcast_ref::<Bomb74>() {
        format!("bomb {}", b.0)
    } else if p.is::<Planted>() {
        "planted".into()
    } else {
        format!("other: {}", common::panic_message(p))
    }
}

fn expected(f: Fault) -> String {
    match f {
        Fault::Plain => "planted".into(),
        Fault::Bomb(n) => format!("bomb {n}"),
    }
}

/// A switch a test arms: one-shot (or sticky), restricted to one key id (or any).
#[derive(Default)]
struct Arm {
    fault: Mutex<Option<Fault>>,
    sticky: std::sync::atomic::AtomicBool,
    /// Only for this key/value id (`u64::MAX`: any).
    only: AtomicU64,
    fired: AtomicU64,
}

impl Arm {
    fn new() -> Arc<Arm> {
        let a = Arm::default();
        a.only.store(u64::MAX, SeqCst);
        Arc::new(a)
    }
    fn set(&self, f: Fault, only: u64, sticky: bool) {
        self.only.store(only, SeqCst);
        self.sticky.store(sticky, SeqCst);
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
    fn off(&self) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    fn fired(&self) -> u64 {
        self.fired.load(SeqCst)
    }
    /// The armed fault if it applies to `id` (taken unless sticky).
    fn take(&self, id: u64) -> Option<Fault> {
        let only = self.only.load(SeqCst);
        if only != u64::MAX && only != id {
            return None;
        }
        let mut g = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        let f = if self.sticky.load(SeqCst) {
            *g
        } else {
            g.take()
        };
        drop(g);
        if f.is_some() {
            self.fired.fetch_add(1, SeqCst);
        }
        f
    }
    /// Panics with the armed fault, if any applies.
    fn trip(&self, id: u64) {
        if let Some(f) = self.take(id) {
            fire(f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key type and codecs
// ---------------------------------------------------------------------------------------------

const TRAP_NONE: u8 = 0;
const TRAP_HASH_PLAIN: u8 = 1;
const TRAP_HASH_BOMB: u8 = 2;
const TRAP_EQ_BOMB: u8 = 3;

/// A key whose `Hash` or `Eq` panics when decoded with a trap (the trap is not part of the
/// key's identity).
#[derive(Debug)]
struct K74 {
    id: u64,
    trap: u8,
}

const TRAP_CLONE_GATE: u8 = 4;

/// The one-shot gate of a key's `Clone` (for keys with `TRAP_CLONE_GATE`): the clone says it
/// entered, then waits for the release. Process-wide: taken by one test at a time
/// (`GATE_LOCK`).
static GATE: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>> =
    Mutex::new(None);
static GATE_LOCK: Mutex<()> = Mutex::new(());

impl Clone for K74 {
    fn clone(&self) -> Self {
        if self.trap == TRAP_CLONE_GATE {
            let gate = GATE.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((entered, release)) = gate {
                let _ = entered.send(());
                let _ = release.recv_timeout(Duration::from_secs(60));
            }
        }
        K74 {
            id: self.id,
            trap: self.trap,
        }
    }
}

fn k(id: u64) -> K74 {
    K74 {
        id,
        trap: TRAP_NONE,
    }
}

impl Hash for K74 {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match self.trap {
            TRAP_HASH_PLAIN => fire(Fault::Plain),
            TRAP_HASH_BOMB => fire(Fault::Bomb(3)),
            _ => self.id.hash(h),
        }
    }
}

impl PartialEq for K74 {
    fn eq(&self, o: &Self) -> bool {
        if self.trap == TRAP_EQ_BOMB || o.trap == TRAP_EQ_BOMB {
            fire(Fault::Bomb(3));
        }
        self.id == o.id
    }
}
impl Eq for K74 {}

/// Key codec: decimal id. Its decode panics (`decode` armed) or hands out a trapped key
/// (`trap` armed, the trap kind in `trap_kind`).
#[derive(Clone)]
struct KeyCodec {
    decode: Arc<Arm>,
    /// Armed with `Fault::Bomb(n)`: decode returns an error whose `Drop` panics (a bomb).
    error: Arc<Arm>,
    trap: Arc<Arm>,
    trap_kind: Arc<AtomicU64>,
}

impl Codec<K74> for KeyCodec {
    fn encode(&self, v: &K74, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(v.id.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<K74, BoxError> {
        let id: u64 = std::str::from_utf8(bytes)?.parse()?;
        self.decode.trip(id);
        if let Some(Fault::Bomb(n)) = self.error.take(id) {
            return Err(Box::new(BombError(n)));
        }
        let trap = if self.trap.take(id).is_some() {
            self.trap_kind.load(SeqCst) as u8
        } else {
            TRAP_NONE
        };
        Ok(K74 { id, trap })
    }
}

/// Value codec: decimal `u64`; encode and decode can be armed (by value for encode, any for
/// decode).
#[derive(Clone)]
struct ValueCodec {
    encode: Arc<Arm>,
    decode: Arc<Arm>,
}

impl Codec<u64> for ValueCodec {
    fn encode(&self, v: &u64, out: &mut Vec<u8>) -> Result<(), BoxError> {
        self.encode.trip(*v);
        out.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<u64, BoxError> {
        let v: u64 = std::str::from_utf8(bytes)?.parse()?;
        self.decode.trip(v);
        Ok(v)
    }
}

struct Inst {
    c: TieredCache<K74, u64>,
    key_decode: Arc<Arm>,
    key_error: Arc<Arm>,
    key_trap: Arc<Arm>,
    trap_kind: Arc<AtomicU64>,
    val_encode: Arc<Arm>,
    val_decode: Arc<Arm>,
    listener: Arc<Arm>,
    /// Trips only for a removal of cause `Replaced`.
    listener_replaced: Arc<Arm>,
}

fn tier(server: &RedisServer, ns: &str) -> RedisTier {
    RedisTier::new(server.url())
        .namespace(ns)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
}

fn instance(t: RedisTier) -> Inst {
    let listener = Arm::new();
    let l = Arc::clone(&listener);
    let listener_replaced = Arm::new();
    let lr = Arc::clone(&listener_replaced);
    let builder = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(600))
        .record_stats()
        .eviction_listener(move |key: &K74, _v: &u64, cause| {
            if cause == herdcache::RemovalCause::Replaced {
                lr.trip(key.id);
            }
            l.trip(key.id)
        });
    let kc = KeyCodec {
        decode: Arm::new(),
        error: Arm::new(),
        trap: Arm::new(),
        trap_kind: Arc::new(AtomicU64::new(0)),
    };
    let vc = ValueCodec {
        encode: Arm::new(),
        decode: Arm::new(),
    };
    let key_error = Arc::clone(&kc.error);
    let (key_decode, key_trap, trap_kind) = (
        Arc::clone(&kc.decode),
        Arc::clone(&kc.trap),
        Arc::clone(&kc.trap_kind),
    );
    let (val_encode, val_decode) = (Arc::clone(&vc.encode), Arc::clone(&vc.decode));
    let c = t.build_with(builder, kc, vc).expect("valid configuration");
    Inst {
        c,
        key_decode,
        key_error,
        key_trap,
        trap_kind,
        val_encode,
        val_decode,
        listener,
        listener_replaced,
    }
}

fn errors(i: &Inst) -> u64 {
    i.c.stats().remote.errors
}
fn received(i: &Inst) -> u64 {
    i.c.stats().remote.invalidations_received
}

/// Runs `f` on its own thread with a deadline: a hang fails the test (the thread is left
/// behind).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match start(f).wait(Duration::from_secs(30)) {
        None => panic!("{what}: did not finish within 30 s"),
        Some(Ok(v)) => v,
        Some(Err(p)) => {
            let d = describe(&*p);
            discard(p);
            panic!("{what}: panicked ({d})")
        }
    }
}

/// After a fault on `a`'s subscriber: the subscriber is (again) subscribed, and a fresh
/// invalidation from `b` of a key `a` holds now (set up after the fault was processed) drops
/// `a`'s copy.
fn fresh_invalidation_applied(a: &Inst, b: &Inst, key: u64) {
    assert!(
        eventually(|| a.c.is_subscribed()),
        "the subscriber is subscribed again after the fault (errors {}, connects {})",
        errors(a),
        a.c.stats().remote.subscriber_connects
    );
    let ac = a.c.clone();
    let got = bounded("a's load of the fresh key", move || {
        ac.get_with(k(key), || key * 10)
    });
    assert_eq!(got, key * 10);
    assert!(a.c.local().contains_key(&k(key)), "a holds the fresh key");
    let before = received(a);
    let bc = b.c.clone();
    bounded("b's invalidation", move || bc.invalidate(&k(key)));
    let dropped = eventually(|| !a.c.local().contains_key(&k(key)));
    assert!(
        dropped,
        "a fresh invalidation from b is applied by a while a says it is subscribed \
         (is_subscribed now {}, received {} -> {}, errors {})",
        a.c.is_subscribed(),
        before,
        received(a),
        errors(a)
    );
    a.c.local().validate();
}

fn pair(server: &RedisServer, ns: &str) -> (Inst, Inst) {
    let a = instance(tier(server, ns));
    let b = instance(tier(server, ns));
    assert!(eventually(|| a.c.is_subscribed() && b.c.is_subscribed()));
    (a, b)
}

/// Loads `id` into `i`'s local tier (value `id * 10`, or Redis's).
fn hold(i: &Inst, id: u64) {
    let c = i.c.clone();
    bounded("a load", move || c.get_with(k(id), || id * 10));
    assert!(i.c.local().contains_key(&k(id)));
}

// ---------------------------------------------------------------------------------------------
// Child processes, for cases that may abort
// ---------------------------------------------------------------------------------------------

const CHILD: &str = "ZZ74_CHILD";

/// Runs `body` in a child process (this binary, this test alone); fails if the child does not
/// exit successfully (an abort, a failed assertion) within 120 s.
fn in_child(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        body();
        return;
    }
    let dir = std::env::temp_dir().join(format!("attack-s74-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join("out");
    let port_path = dir.join("port");
    let out = std::fs::File::create(&out_path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env(PORT_FILE, &port_path)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("the child starts");
    let until = std::time::Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The child's server outlives a child that aborted: shut it down.
    if let Ok(port) = std::fs::read_to_string(&port_path) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", port.trim(), "shutdown", "nosave"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let tail: String = {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    };
    let Some(status) = status else {
        panic!("{name}: the child did not finish within 150 s (hang); its output ends:\n{tail}");
    };
    assert!(
        status.success() && text.contains("1 passed"),
        "{name}: the child process failed ({status}); its output ends:\n{tail}"
    );
}

const PORT_FILE: &str = "ZZ74_PORT_FILE";

/// A server for a test that may run in a child: its port is noted for the parent.
fn server_for_child() -> RedisServer {
    let server = RedisServer::start();
    if let Ok(path) = std::env::var(PORT_FILE) {
        let url = server.url();
        let port = url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        std::fs::write(path, port).unwrap();
    }
    server
}

// ---------------------------------------------------------------------------------------------
// 1. The subscriber: key decode, Hash, Eq, listener
// ---------------------------------------------------------------------------------------------

fn key_decode_case(ns: &str, f: Fault) {
    let server = RedisServer::start();
    let (a, b) = pair(&server, ns);
    hold(&a, 100);
    hold(&a, 7);
    a.key_decode.set(f, 100, false);
    let errs = errors(&a);
    bounded("b invalidates 100", {
        let bc = b.c.clone();
        move || bc.invalidate(&k(100))
    });
    assert!(
        eventually(|| errors(&a) > errs),
        "the faulting message was processed (errors counted)"
    );
    assert_eq!(a.key_decode.fired(), 1, "the decode panicked");
    // A key that could not be decoded: every local copy goes.
    assert!(
        eventually(|| !a.c.local().contains_key(&k(7))),
        "an undecodable key clears the local tier"
    );
    assert!(!a.c.local().contains_key(&k(100)));
    a.c.local().validate();
    fresh_invalidation_applied(&a, &b, 8);
}

#[test]
fn s74_key_decode_panic_plain_subscriber_survives() {
    let _w = watchdog(LIMIT, "s74 key decode plain");
    quiet();
    key_decode_case("z74kdp", Fault::Plain);
}

#[test]
fn s74_key_decode_panic_bomb_subscriber_survives() {
    let _w = watchdog(LIMIT, "s74 key decode bomb");
    quiet();
    key_decode_case("z74kdb", Fault::Bomb(3));
}

/// The key codec's decode panics with a payload whose `Drop` panics; the fallback clear of the
/// local tier (`invalidate_all`) then raises the eviction listener's panic: the decode's
/// payload must not be dropped while that panic unwinds (a panic while panicking aborts).
#[test]
fn s74_key_decode_bomb_then_listener_panic_in_the_fallback_clear() {
    in_child(
        "s74_key_decode_bomb_then_listener_panic_in_the_fallback_clear",
        || {
            let _w = watchdog(LIMIT, "s74 decode bomb + listener");
            quiet();
            let server = server_for_child();
            let (a, b) = pair(&server, "z74kdl");
            hold(&a, 100);
            hold(&a, 7);
            a.key_decode.set(Fault::Bomb(3), 100, false);
            a.listener.set(Fault::Plain, 7, false);
            let errs = errors(&a);
            let bc = b.c.clone();
            bounded("b invalidates 100", move || bc.invalidate(&k(100)));
            assert!(
                eventually(|| errors(&a) > errs),
                "the message was processed"
            );
            assert_eq!(a.key_decode.fired(), 1);
            assert!(eventually(|| a.listener.fired() == 1));
            assert!(eventually(|| !a.c.local().contains_key(&k(7))));
            a.c.local().validate();
            fresh_invalidation_applied(&a, &b, 8);
        },
    );
}

/// As above with an ordinary decode panic and a listener whose payload is a bomb.
#[test]
fn s74_key_decode_plain_then_listener_bomb_in_the_fallback_clear() {
    in_child(
        "s74_key_decode_plain_then_listener_bomb_in_the_fallback_clear",
        || {
            let _w = watchdog(LIMIT, "s74 decode plain + listener bomb");
            quiet();
            let server = server_for_child();
            let (a, b) = pair(&server, "z74kdl2");
            hold(&a, 100);
            hold(&a, 7);
            a.key_decode.set(Fault::Plain, 100, false);
            a.listener.set(Fault::Bomb(3), 7, false);
            let errs = errors(&a);
            let bc = b.c.clone();
            bounded("b invalidates 100", move || bc.invalidate(&k(100)));
            assert!(
                eventually(|| errors(&a) > errs),
                "the message was processed"
            );
            assert!(eventually(|| a.listener.fired() == 1));
            assert!(eventually(|| !a.c.local().contains_key(&k(7))));
            a.c.local().validate();
            fresh_invalidation_applied(&a, &b, 8);
        },
    );
}

/// The key codec's decode returns an error whose `Drop` panics, alone: the subscriber goes on.
#[test]
fn s74_key_decode_error_whose_drop_panics() {
    let _w = watchdog(LIMIT, "s74 decode error bomb");
    quiet();
    let server = RedisServer::start();
    let (a, b) = pair(&server, "z74ke");
    hold(&a, 100);
    hold(&a, 7);
    a.key_error.set(Fault::Bomb(3), 100, false);
    let errs = errors(&a);
    let bc = b.c.clone();
    bounded("b invalidates 100", move || bc.invalidate(&k(100)));
    assert!(
        eventually(|| errors(&a) > errs),
        "the message was processed"
    );
    assert_eq!(a.key_error.fired(), 1);
    assert!(eventually(|| !a.c.local().contains_key(&k(7))));
    a.c.local().validate();
    fresh_invalidation_applied(&a, &b, 8);
}

/// The key codec's decode returns an error whose `Drop` panics, and the fallback clear raises
/// the listener's panic: the error must not be dropped while that panic unwinds.
#[test]
fn s74_key_decode_error_bomb_then_listener_panic_in_the_fallback_clear() {
    in_child(
        "s74_key_decode_error_bomb_then_listener_panic_in_the_fallback_clear",
        || {
            let _w = watchdog(LIMIT, "s74 decode error bomb + listener");
            quiet();
            let server = server_for_child();
            let (a, b) = pair(&server, "z74kel");
            hold(&a, 100);
            hold(&a, 7);
            a.key_error.set(Fault::Bomb(3), 100, false);
            a.listener.set(Fault::Plain, 7, false);
            let errs = errors(&a);
            let bc = b.c.clone();
            bounded("b invalidates 100", move || bc.invalidate(&k(100)));
            assert!(
                eventually(|| errors(&a) > errs),
                "the message was processed"
            );
            assert!(eventually(|| a.listener.fired() == 1));
            assert!(eventually(|| !a.c.local().contains_key(&k(7))));
            a.c.local().validate();
            fresh_invalidation_applied(&a, &b, 8);
        },
    );
}

fn key_trap_case(ns: &str, trap: u8, held: bool) {
    let server = RedisServer::start();
    let (a, b) = pair(&server, ns);
    if held {
        hold(&a, 100);
    }
    a.trap_kind.store(u64::from(trap), SeqCst);
    a.key_trap.set(Fault::Plain, 100, false);
    let errs = errors(&a);
    let bc = b.c.clone();
    bounded("b invalidates 100", move || bc.invalidate(&k(100)));
    assert!(
        eventually(|| errors(&a) > errs),
        "the faulting message was processed (errors counted)"
    );
    assert_eq!(a.key_trap.fired(), 1, "the trapped key was decoded");
    a.c.local().validate();
    // Later operations on the same key finish.
    let ac = a.c.clone();
    let v = bounded("a's later load of 100", move || {
        ac.get_with(k(100), || 1000)
    });
    assert_eq!(v, 1000, "a normal value");
    let ac = a.c.clone();
    bounded("a's later invalidate of 100", move || {
        ac.invalidate(&k(100))
    });
    a.c.local().validate();
    fresh_invalidation_applied(&a, &b, 9);
}

#[test]
fn s74_key_hash_panic_plain_in_the_subscriber() {
    let _w = watchdog(LIMIT, "s74 hash plain");
    quiet();
    key_trap_case("z74hp", TRAP_HASH_PLAIN, true);
}

#[test]
fn s74_key_hash_panic_bomb_in_the_subscriber() {
    let _w = watchdog(LIMIT, "s74 hash bomb");
    quiet();
    key_trap_case("z74hb", TRAP_HASH_BOMB, true);
}

#[test]
fn s74_key_eq_panic_bomb_in_the_subscriber_under_the_shard_lock() {
    let _w = watchdog(LIMIT, "s74 eq bomb");
    quiet();
    key_trap_case("z74eb", TRAP_EQ_BOMB, true);
}

fn listener_key_case(ns: &str, f: Fault) {
    let server = RedisServer::start();
    let (a, b) = pair(&server, ns);
    hold(&a, 100);
    a.listener.set(f, 100, false);
    let errs = errors(&a);
    let bc = b.c.clone();
    bounded("b invalidates 100", move || bc.invalidate(&k(100)));
    assert!(
        eventually(|| errors(&a) > errs),
        "the message was processed"
    );
    assert_eq!(a.listener.fired(), 1);
    assert!(
        !a.c.local().contains_key(&k(100)),
        "the invalidation was applied although the listener panicked"
    );
    a.c.local().validate();
    fresh_invalidation_applied(&a, &b, 8);
}

#[test]
fn s74_listener_panic_plain_on_a_subscriber_invalidation() {
    let _w = watchdog(LIMIT, "s74 listener plain");
    quiet();
    listener_key_case("z74lp", Fault::Plain);
}

#[test]
fn s74_listener_panic_bomb_on_a_subscriber_invalidation() {
    let _w = watchdog(LIMIT, "s74 listener bomb");
    quiet();
    listener_key_case("z74lb", Fault::Bomb(3));
}

/// Another instance's `invalidate_all`, with a listener that panics (bombs) on every entry:
/// every local copy still goes, and the subscriber goes on.
#[test]
fn s74_listener_bombs_on_every_entry_of_an_invalidate_all_message() {
    let _w = watchdog(LIMIT, "s74 listener all");
    quiet();
    let server = RedisServer::start();
    let (a, b) = pair(&server, "z74la");
    for id in 100..110 {
        hold(&a, id);
    }
    a.listener.set(Fault::Bomb(2), u64::MAX, true);
    let errs = errors(&a);
    let bc = b.c.clone();
    bounded("b invalidates all", move || bc.invalidate_all());
    assert!(
        eventually(|| errors(&a) > errs),
        "the message was processed"
    );
    a.listener.off();
    assert_eq!(a.listener.fired(), 10, "the listener ran for every entry");
    assert_eq!(a.c.local().entry_count(), 0, "every local copy went");
    a.c.local().validate();
    fresh_invalidation_applied(&a, &b, 8);
}

/// Kills the subscriber connections of the server (`CLIENT KILL TYPE pubsub`).
fn kill_pubsub(server: &RedisServer) {
    let mut conn = raw(server);
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query::<i64>(&mut conn)
        .unwrap();
}

fn clear_on_reconnect_case(ns: &str, f: Fault) {
    let server = server_for_child();
    let a = instance(tier(&server, ns).clear_on_reconnect(true));
    let b = instance(tier(&server, ns));
    assert!(eventually(|| a.c.is_subscribed() && b.c.is_subscribed()));
    let connects = a.c.stats().remote.subscriber_connects;
    hold(&a, 100);
    a.listener.set(f, 100, false);
    kill_pubsub(&server);
    // The reconnect clears the local tier: the listener panics there.
    assert!(
        eventually(|| a.listener.fired() == 1),
        "the reconnect's clear ran the listener"
    );
    assert!(!a.c.local().contains_key(&k(100)), "the clear was done");
    a.c.local().validate();
    assert!(
        eventually(|| a.c.stats().remote.subscriber_connects > connects && a.c.is_subscribed()),
        "the subscriber survives the listener's panic in the reconnect's clear and is \
         subscribed again (connects {} -> {}, subscribed {})",
        connects,
        a.c.stats().remote.subscriber_connects,
        a.c.is_subscribed()
    );
    fresh_invalidation_applied(&a, &b, 8);
}

/// `clear_on_reconnect`: the clear on each (re)subscription runs the eviction listener; an
/// ordinary panic there must not end the subscriber.
#[test]
fn s74_clear_on_reconnect_listener_panic_plain_keeps_the_subscriber() {
    let _w = watchdog(LIMIT, "s74 reconnect plain");
    quiet();
    clear_on_reconnect_case("z74rp", Fault::Plain);
}

/// As above with a payload whose `Drop` panics (a dead thread's result that panics on drop
/// aborts the process).
#[test]
fn s74_clear_on_reconnect_listener_panic_bomb_keeps_the_subscriber() {
    in_child(
        "s74_clear_on_reconnect_listener_panic_bomb_keeps_the_subscriber",
        || {
            let _w = watchdog(LIMIT, "s74 reconnect bomb");
            quiet();
            clear_on_reconnect_case("z74rb", Fault::Bomb(3));
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The value codec on sync paths
// ---------------------------------------------------------------------------------------------

fn lkey(ns: &str, id: u64) -> String {
    format!("hc:{}:{ns}:l{{{id}}}", ns.len())
}

fn exists(conn: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(conn).unwrap() == 1
}

/// A read of a value from Redis whose decode panics: the caller sees the codec's payload as
/// raised (not a later panic of its drop), and the next load of the key works.
fn value_decode_sync_case(ns: &str, f: Fault) {
    let server = RedisServer::start();
    let (a, b) = pair(&server, ns);
    let bc = b.c.clone();
    bounded("b inserts", move || bc.insert(k(100), 4242));
    a.val_decode.set(f, 4242, false);
    let ac = a.c.clone();
    let r = start(move || ac.get_with(k(100), || 1))
        .wait(Duration::from_secs(30))
        .expect("the load finished");
    match r {
        Ok(v) => assert!(v == 4242 || v == 1, "a normal value {v}"),
        Err(p) => {
            let d = describe(&*p);
            discard(p);
            assert_eq!(d, expected(f), "the caller sees the codec's own payload");
        }
    }
    assert_eq!(a.val_decode.fired(), 1);
    a.c.local().validate();
    let ac = a.c.clone();
    let v = bounded("the next load", move || ac.get_with(k(100), || 1));
    assert_eq!(v, 4242, "the next load reads Redis");
    fresh_invalidation_applied(&a, &b, 8);
}

#[test]
fn s74_value_decode_panic_plain_in_a_sync_load() {
    let _w = watchdog(LIMIT, "s74 value decode plain");
    quiet();
    value_decode_sync_case("z74vdp", Fault::Plain);
}

#[test]
fn s74_value_decode_panic_bomb_in_a_sync_load() {
    let _w = watchdog(LIMIT, "s74 value decode bomb");
    quiet();
    value_decode_sync_case("z74vdb", Fault::Bomb(3));
}

/// With leases, a value decode that panics while the lease is held (the lease is taken and
/// the value read in one round trip): the lease is given back.
#[test]
fn s74_value_decode_bomb_with_leases_gives_the_lease_back() {
    let _w = watchdog(LIMIT, "s74 value decode lease");
    quiet();
    let server = RedisServer::start();
    let ns = "z74vdl";
    let lease = |t: RedisTier| t.lease(Duration::from_secs(30), Duration::from_secs(5));
    let a = instance(lease(tier(&server, ns)));
    let b = instance(lease(tier(&server, ns)));
    assert!(eventually(|| a.c.is_subscribed() && b.c.is_subscribed()));
    let bc = b.c.clone();
    bounded("b inserts", move || bc.insert(k(100), 4242));
    a.val_decode.set(Fault::Bomb(3), 4242, true);
    let ac = a.c.clone();
    let r = start(move || ac.get_with(k(100), || 1))
        .wait(Duration::from_secs(30))
        .expect("the load finished");
    match r {
        Ok(v) => assert!(v == 4242 || v == 1, "a normal value {v}"),
        Err(p) => {
            let d = describe(&*p);
            discard(p);
            assert_eq!(d, "bomb 3", "the caller sees the codec's own payload");
        }
    }
    a.val_decode.off();
    assert!(a.val_decode.fired() >= 1);
    let mut conn = raw(&server);
    assert!(
        eventually(|| !exists(&mut conn, &lkey(ns, 100))),
        "no lease is left behind"
    );
    a.c.local().validate();
    let ac = a.c.clone();
    assert_eq!(
        bounded("the next load", move || ac.get_with(k(100), || 1)),
        4242
    );
}

/// The write-back of a load panics in the value codec (leases on): the caller sees the
/// codec's payload as raised, the lease is given back, and the key loads normally after.
fn write_back_sync_case(ns: &str, f: Fault) {
    let server = RedisServer::start();
    let lease = |t: RedisTier| t.lease(Duration::from_secs(30), Duration::from_secs(5));
    let a = instance(lease(tier(&server, ns)));
    let b = instance(lease(tier(&server, ns)));
    assert!(eventually(|| a.c.is_subscribed() && b.c.is_subscribed()));
    a.val_encode.set(f, 55, false);
    let ac = a.c.clone();
    let r = start(move || ac.get_with(k(200), || 55))
        .wait(Duration::from_secs(30))
        .expect("the load finished");
    match r {
        Ok(v) => assert_eq!(v, 55),
        Err(p) => {
            let d = describe(&*p);
            discard(p);
            assert_eq!(d, expected(f), "the caller sees the codec's own payload");
        }
    }
    assert_eq!(a.val_encode.fired(), 1);
    let mut conn = raw(&server);
    assert!(!exists(&mut conn, &lkey(ns, 200)), "no lease left behind");
    a.c.local().validate();
    let bc = b.c.clone();
    assert_eq!(
        bounded("b's load", move || bc.get_with(k(200), || 66)),
        66,
        "nothing was written back"
    );
    let ac = a.c.clone();
    let v = bounded("a's next load", move || ac.get_with(k(200), || 77));
    assert!(v == 66 || v == 55 || v == 77, "a normal value {v}");
    fresh_invalidation_applied(&a, &b, 8);
}

#[test]
fn s74_value_encode_panic_plain_in_a_sync_write_back() {
    let _w = watchdog(LIMIT, "s74 write-back plain");
    quiet();
    write_back_sync_case("z74wbp", Fault::Plain);
}

#[test]
fn s74_value_encode_panic_bomb_in_a_sync_write_back() {
    let _w = watchdog(LIMIT, "s74 write-back bomb");
    quiet();
    write_back_sync_case("z74wbb", Fault::Bomb(3));
}

/// An insert whose value encode panics (bomb): the caller sees the codec's payload as raised;
/// the next insert of the key works and reaches the other instance.
#[test]
fn s74_value_encode_panic_bomb_in_insert() {
    let _w = watchdog(LIMIT, "s74 insert bomb");
    quiet();
    let server = RedisServer::start();
    let (a, b) = pair(&server, "z74ins");
    let ac = a.c.clone();
    bounded("first insert", move || ac.insert(k(300), 1));
    a.val_encode.set(Fault::Bomb(3), 2, false);
    let ac = a.c.clone();
    let r = start(move || ac.insert(k(300), 2))
        .wait(Duration::from_secs(30))
        .expect("the insert finished");
    if let Err(p) = r {
        let d = describe(&*p);
        discard(p);
        assert_eq!(d, "bomb 3", "the caller sees the codec's own payload");
    }
    assert_eq!(a.val_encode.fired(), 1);
    a.c.local().validate();
    let ac = a.c.clone();
    bounded("next insert", move || ac.insert(k(300), 3));
    let bc = b.c.clone();
    assert_eq!(bounded("b reads", move || bc.get_with(k(300), || 0)), 3);
    fresh_invalidation_applied(&a, &b, 8);
}

// ---------------------------------------------------------------------------------------------
// 3. Async paths (helper threads)
// ---------------------------------------------------------------------------------------------

/// A value decode that panics (bomb) on a helper thread: the async load goes on without Redis
/// (a normal value), repeatedly, and the helper threads survive.
#[test]
fn s74_async_value_decode_bombs_fall_back_and_helpers_survive() {
    let _w = watchdog(LIMIT, "s74 async decode");
    quiet();
    let server = RedisServer::start();
    let (a, b) = pair(&server, "z74ad");
    for round in 0..12u64 {
        let id = 400 + round;
        let bc = b.c.clone();
        bounded("b inserts", move || bc.insert(k(id), 4000 + round));
        a.val_decode.set(Fault::Bomb(3), 4000 + round, false);
        let ac = a.c.clone();
        let v = bounded("an async load", move || {
            futures::executor::block_on(ac.get_with_async(k(id), async move { 9 }))
        });
        assert!(
            v == 9 || v == 4000 + round,
            "round {round}: a normal value {v}"
        );
        assert_eq!(
            a.val_decode.fired(),
            round + 1,
            "round {round}: the decode panicked"
        );
        a.c.local().validate();
    }
    // The key loads from Redis once the codec behaves.
    a.c.local().invalidate(&k(400));
    let ac = a.c.clone();
    assert_eq!(
        bounded("a later async load", move || futures::executor::block_on(
            ac.get_with_async(k(400), async { 9 })
        )),
        4000
    );
    fresh_invalidation_applied(&a, &b, 8);
}

/// The async write-back (on a helper thread, after the value is returned) panics in the value
/// codec with a bomb: the caller has its value, the lease is given back, later loads work.
#[test]
fn s74_async_write_back_encode_bomb_gives_the_lease_back() {
    let _w = watchdog(LIMIT, "s74 async write-back");
    quiet();
    let server = RedisServer::start();
    let ns = "z74awb";
    let lease = |t: RedisTier| t.lease(Duration::from_secs(30), Duration::from_secs(5));
    let a = instance(lease(tier(&server, ns)));
    let b = instance(lease(tier(&server, ns)));
    assert!(eventually(|| a.c.is_subscribed() && b.c.is_subscribed()));
    let mut conn = raw(&server);
    for round in 0..6u64 {
        let id = 500 + round;
        a.val_encode.set(Fault::Bomb(3), 50 + round, false);
        let ac = a.c.clone();
        let v = bounded("an async load", move || {
            futures::executor::block_on(ac.get_with_async(k(id), async move { 50 + round }))
        });
        assert_eq!(v, 50 + round);
        assert!(
            eventually(|| a.val_encode.fired() == round + 1),
            "round {round}: the write-back ran its encode"
        );
        assert!(
            eventually(|| !exists(&mut conn, &lkey(ns, id))),
            "round {round}: the lease was given back"
        );
        let bc = b.c.clone();
        assert_eq!(
            bounded("b's load", move || bc.get_with(k(id), || 7)),
            7,
            "round {round}: nothing was written back"
        );
    }
    a.c.local().validate();
    fresh_invalidation_applied(&a, &b, 8);
}

/// An async load whose future panics with a bomb: the caller sees that payload as raised;
/// the lease is given back; the key loads normally after.
#[test]
fn s74_async_load_panicking_with_a_bomb() {
    let _w = watchdog(LIMIT, "s74 async load bomb");
    quiet();
    let server = RedisServer::start();
    let ns = "z74alb";
    let lease = |t: RedisTier| t.lease(Duration::from_secs(30), Duration::from_secs(5));
    let a = instance(lease(tier(&server, ns)));
    let b = instance(lease(tier(&server, ns)));
    assert!(eventually(|| a.c.is_subscribed() && b.c.is_subscribed()));
    let ac = a.c.clone();
    let r = start(move || {
        futures::executor::block_on(ac.get_with_async(k(600), async {
            std::panic::panic_any(Bomb74(3));
        }))
    })
    .wait(Duration::from_secs(30))
    .expect("the load finished");
    match r {
        Ok(v) => panic!("the load returned {v}"),
        Err(p) => {
            let d = describe(&*p);
            discard(p);
            assert_eq!(d, "bomb 3", "the caller sees its own payload");
        }
    }
    let mut conn = raw(&server);
    assert!(
        eventually(|| !exists(&mut conn, &lkey(ns, 600))),
        "the lease was given back"
    );
    a.c.local().validate();
    let ac = a.c.clone();
    assert_eq!(
        bounded("the next async load", move || futures::executor::block_on(
            ac.get_with_async(k(600), async { 6 })
        )),
        6
    );
    fresh_invalidation_applied(&a, &b, 8);
}

// ---------------------------------------------------------------------------------------------
// 4. insert: the listener's panic and the check for a newer write
// ---------------------------------------------------------------------------------------------

/// `TieredCache::insert` writes Redis (version V1), then inserts locally, then drops the local
/// copy if a newer write or invalidation of the key was heard meanwhile. Here b's invalidation
/// (version V2 > V1) is heard between a's Redis write and its local insert (held in the key's
/// `Clone`), and a's local insert replaces a copy (put there with `local().insert`). Returns
/// whether a still holds a copy of the key after its insert, and what the insert raised.
fn insert_race_case(ns: &str, listener_panics: bool) -> (bool, Option<String>) {
    let _g = GATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let server = RedisServer::start();
    let (a, b) = pair(&server, ns);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    *GATE.lock().unwrap_or_else(|e| e.into_inner()) = Some((entered_tx, release_rx));
    let ac = a.c.clone();
    let ins = start(move || {
        ac.insert(
            K74 {
                id: 50,
                trap: TRAP_CLONE_GATE,
            },
            2,
        )
    });
    entered_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a's insert wrote Redis and reached the key's clone");
    let before = received(&a);
    let bc = b.c.clone();
    bounded("b invalidates 50", move || bc.invalidate(&k(50)));
    assert!(
        eventually(|| received(&a) > before),
        "a heard b's (newer) invalidation"
    );
    // A copy the insert will replace.
    a.c.local().insert(k(50), 1);
    if listener_panics {
        a.listener_replaced.set(Fault::Bomb(3), 50, false);
    }
    release_tx.send(()).unwrap();
    let raised = match ins
        .wait(Duration::from_secs(30))
        .expect("a's insert finished")
    {
        Ok(()) => None,
        Err(p) => {
            let d = describe(&*p);
            discard(p);
            Some(d)
        }
    };
    if listener_panics {
        assert_eq!(
            a.listener_replaced.fired(),
            1,
            "the listener ran for the replaced copy"
        );
    }
    a.c.local().validate();
    let held = a.c.local().contains_key(&k(50));
    (held, raised)
}

/// Control: without a panic, the copy a's insert left goes (b's invalidation is newer).
#[test]
fn s74_insert_overtaken_by_a_heard_invalidation_drops_its_copy() {
    let _w = watchdog(LIMIT, "s74 insert race control");
    quiet();
    let (held, raised) = insert_race_case("z74irc", false);
    assert_eq!(raised, None);
    assert!(
        !held,
        "the insert's copy, older than b's invalidation, is dropped"
    );
}

/// The same, with an eviction listener that panics (a bomb) for the replaced copy: the insert
/// raises the listener's payload, and its local copy — older than an invalidation a heard —
/// must still go (the listener's panic must not skip the check for a newer write).
#[test]
fn s74_insert_listener_panic_skips_the_newer_write_check() {
    let _w = watchdog(LIMIT, "s74 insert race listener");
    quiet();
    let (held, raised) = insert_race_case("z74irl", true);
    assert_eq!(
        raised.as_deref(),
        Some("bomb 3"),
        "the caller sees the listener's own payload"
    );
    assert!(
        !held,
        "a keeps the copy of its insert although it heard a newer invalidation of the key \
         (the listener's panic skipped the check)"
    );
}
