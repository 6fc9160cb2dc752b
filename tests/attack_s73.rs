#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::type_complexity)]
//! Round 73 of the outside attacks (a helper, public API plus the `testing` hooks): panic
//! payloads whose `Drop` panics again (a chain), caught by the cache and not handed back. Each
//! payload's drop asks `is_a_shard_locked()`: a payload dropped under a shard lock is user code
//! under the lock. Its four findings (an `Eq` panic while a failed refresh ends, inline and on
//! a spawner; several keys' `Hash` panicking in one eviction, or while the table grows) failed
//! on the first version of `src/unwind.rs`, which discarded such payloads where it caught them;
//! they are now set aside and discarded once the lock is released. The other tests held from
//! the start: the original payload reaches the caller, no key hangs, no permit leaks.

use herdcache::{Cache, EvictionPolicy, LoadError, ManualClock};
use std::any::Any;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Payloads

/// What a family of bombs saw: how many were dropped, and how many of those drops ran while a
/// shard of the probed cache was locked.
#[derive(Default)]
struct Log {
    drops: AtomicUsize,
    locked: AtomicUsize,
    probe: OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl Log {
    fn new() -> Arc<Log> {
        Arc::new(Log::default())
    }
    fn probe_with<K, V>(self: &Arc<Self>, c: &Cache<K, V>)
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let c = c.clone();
        let _ = self.probe.set(Box::new(move || c.is_a_shard_locked()));
    }
    fn drops(&self) -> usize {
        self.drops.load(SeqCst)
    }
    fn locked(&self) -> usize {
        self.locked.load(SeqCst)
    }
}

/// A panic payload whose `Drop` panics with another one, `left` more times.
struct Bomb {
    left: usize,
    log: Arc<Log>,
}

impl Bomb {
    fn new(left: usize, log: &Arc<Log>) -> Bomb {
        quiet();
        Bomb {
            left,
            log: Arc::clone(log),
        }
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        self.log.drops.fetch_add(1, SeqCst);
        if let Some(p) = self.log.probe.get() {
            if p() {
                if std::env::var_os("H73_BT").is_some() {
                    eprintln!(
                        "H73 locked drop at:\n{}",
                        std::backtrace::Backtrace::force_capture()
                    );
                }
                self.log.locked.fetch_add(1, SeqCst);
            }
        }
        if self.left > 0 {
            std::panic::panic_any(Bomb {
                left: self.left - 1,
                log: Arc::clone(&self.log),
            });
        }
    }
}

/// An ordinary planted payload.
struct Plain;

fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            if p.is::<Bomb>() || p.is::<Plain>() {
                return;
            }
            prev(info);
        }));
    });
}

/// The caller's side: drops a payload handed back, each drop-panic caught, bounded.
/// Returns how many payloads in the chain were dropped.
fn safe_drop(p: Box<dyn Any + Send>) -> usize {
    let mut p = p;
    for n in 1..=32 {
        match catch_unwind(AssertUnwindSafe(move || drop(p))) {
            Ok(()) => return n,
            Err(next) => p = next,
        }
    }
    std::mem::forget(p);
    33
}

/// Runs `f`; `Ok(r)` or the payload it panicked with.
fn run<R>(f: impl FnOnce() -> R) -> Result<R, Box<dyn Any + Send>> {
    catch_unwind(AssertUnwindSafe(f))
}

/// `Some(left)` if the payload is a `Bomb`.
fn bomb_left(p: &Box<dyn Any + Send>) -> Option<usize> {
    p.downcast_ref::<Bomb>().map(|b| b.left)
}

/// Runs `f` on a thread; fails (instead of hanging) if it does not end within `limit`.
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(r)) => r,
        Ok(Err(p)) => {
            let n = safe_drop(p);
            panic!("{what}: panicked (payload chain of {n})");
        }
        Err(_) => panic!("{what}: hung (watchdog)"),
    }
}

// ---------------------------------------------------------------------------------------------
// A key whose `Eq` / `Hash` can be armed to panic with a bomb.

#[derive(Clone, Default)]
struct Trap(Arc<Mutex<Option<Bomb>>>);

impl Trap {
    fn arm(&self, b: Bomb) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }
    fn fire(&self) {
        let b = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(b) = b {
            std::panic::panic_any(b);
        }
    }
    fn armed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// A key: `id`, with a trap fired by its `Eq` and one fired by its `Hash`.
#[derive(Clone)]
struct K {
    id: u64,
    eq: Trap,
    hash: Trap,
}

impl K {
    fn new(id: u64) -> K {
        K {
            id,
            eq: Trap::default(),
            hash: Trap::default(),
        }
    }
}

impl PartialEq for K {
    fn eq(&self, o: &K) -> bool {
        self.eq.fire();
        o.eq.fire();
        self.id == o.id
    }
}
impl Eq for K {}

impl Hash for K {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.hash.fire();
        self.id.hash(h);
    }
}

fn check<K2, V2>(c: &Cache<K2, V2>)
where
    K2: Hash + Eq + Clone + Send + Sync + 'static,
    V2: Clone + Send + Sync + 'static,
{
    assert_eq!(c.loads_in_flight(), 0, "a load left in flight");
    assert!(!c.is_a_shard_locked(), "a shard left locked");
    c.validate();
}

// ---------------------------------------------------------------------------------------------
// Findings-oriented: payloads dropped under a shard lock

/// A refresh whose loader fails ends its flight; giving the refresh claim back runs the key's
/// `Eq` (under the shard lock). That `Eq` panics with a bomb: the cache catches it and does
/// not hand it back, so it drops it — it must not do so with the shard locked.
#[test]
fn eq_panic_while_a_failed_refresh_ends_is_not_dropped_under_the_lock() {
    let log = Log::new();
    let clock = ManualClock::new();
    let c: Cache<K, u64> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(10))
        .loader({
            let log = Arc::clone(&log);
            move |k: &K| -> Result<u64, std::io::Error> {
                // Armed now: the next `Eq` on this key is the one that ends the flight.
                k.eq.arm(Bomb::new(2, &log));
                Err(std::io::Error::other("refresh fails"))
            }
        })
        .build();
    log.probe_with(&c);
    let k = K::new(1);
    c.insert(k.clone(), 7);
    clock.advance(Duration::from_secs(11));
    // Triggers the (inline) refresh.
    let r = run(|| c.get(&k));
    let disarmed = !k.eq.armed();
    if let Err(p) = r {
        let left = bomb_left(&p);
        safe_drop(p);
        // Handing the original payload back would be acceptable; anything else is not.
        assert_eq!(
            left,
            Some(2),
            "get panicked with something other than the bomb"
        );
    }
    assert!(
        disarmed,
        "the armed Eq never ran (scenario did not trigger)"
    );
    assert_eq!(
        log.locked(),
        0,
        "a payload's Drop ran with a shard locked ({} drops)",
        log.drops()
    );
    let v = within("get_with after", {
        let c = c.clone();
        let k = k.clone();
        move || c.get_with(k, || 9)
    });
    assert!(v == 7 || v == 9);
    check(&c);
}

/// Same, where the failed refresh runs on a spawner's job.
#[test]
fn eq_panic_while_a_spawned_failed_refresh_ends_is_not_dropped_under_the_lock() {
    let log = Log::new();
    let clock = ManualClock::new();
    let jobs: Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>> = Arc::default();
    let c: Cache<K, u64> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(10))
        .spawner({
            let jobs = Arc::clone(&jobs);
            move |j| jobs.lock().unwrap().push(j)
        })
        .loader({
            let log = Arc::clone(&log);
            move |k: &K| -> Result<u64, std::io::Error> {
                k.eq.arm(Bomb::new(1, &log));
                Err(std::io::Error::other("refresh fails"))
            }
        })
        .build();
    log.probe_with(&c);
    let k = K::new(1);
    c.insert(k.clone(), 7);
    clock.advance(Duration::from_secs(11));
    assert_eq!(c.get(&k), Some(7));
    let queued: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    assert_eq!(queued.len(), 1, "no refresh job spawned");
    for j in queued {
        if let Err(p) = run(j) {
            let left = bomb_left(&p);
            let n = safe_drop(p);
            panic!("the refresh job panicked (bomb left {left:?}, chain {n})");
        }
    }
    assert!(!k.eq.armed(), "the armed Eq never ran");
    assert_eq!(
        log.locked(),
        0,
        "a payload's Drop ran with a shard locked ({} drops)",
        log.drops()
    );
    check(&c);
}

/// A failed load of a key with a negative TTL keeps its flight registered; the claim give-back
/// runs the key's `Eq` under the shard lock, and a panic there is dropped by the cache.
#[test]
fn eq_panic_while_a_failed_load_ends_is_not_dropped_under_the_lock() {
    let log = Log::new();
    let clock = ManualClock::new();
    let c: Cache<K, u64> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .clock(clock.clone())
        .time_to_live(Duration::from_secs(5))
        .refresh_after(Duration::from_secs(2))
        .fail_safe(Duration::from_secs(100))
        .loader(|_k: &K| -> Result<u64, std::io::Error> { Ok(1) })
        .build();
    log.probe_with(&c);
    let k = K::new(1);
    c.insert(k.clone(), 7);
    clock.advance(Duration::from_secs(6));
    let r = run(|| {
        c.try_get_with(k.clone(), || {
            k.eq.arm(Bomb::new(1, &log));
            Err::<u64, _>("nope")
        })
    });
    if let Err(p) = r {
        let left = bomb_left(&p);
        safe_drop(p);
        assert_eq!(left, Some(1), "try_get_with panicked with something else");
    }
    let fired = !k.eq.armed();
    if std::env::var_os("H73_BT").is_some() {
        eprintln!("H73 failed-load Eq fired: {fired}");
    }
    if let Some(armed) = k.eq.0.lock().unwrap().take() {
        std::mem::forget(armed); // an unfired trap: a bomb, not dropped here
    }
    assert_eq!(
        log.locked(),
        0,
        "a payload's Drop ran with a shard locked ({} drops)",
        log.drops()
    );
    let v = within("get_with after", {
        let c = c.clone();
        let k = k.clone();
        move || c.get_with(k, || 9)
    });
    assert!(v == 7 || v == 9);
    check(&c);
}

/// An eviction that removes several entries whose keys' `Hash` panic: the first panic is
/// resumed, the others are dropped by the cache — not under the shard lock.
#[test]
fn hash_panics_of_several_evicted_keys_are_not_dropped_under_the_lock() {
    let log = Log::new();
    let c: Cache<K, u64> = Cache::builder()
        .max_capacity(4)
        .shards(1)
        .eviction_policy(EvictionPolicy::lru())
        .weigher(|_k: &K, v: &u64| *v as u32)
        .build();
    log.probe_with(&c);
    let keys: Vec<K> = (0..4).map(K::new).collect();
    for k in &keys {
        c.insert(k.clone(), 1);
    }
    c.run_pending_tasks();
    assert_eq!(c.entry_count(), 4);
    for k in &keys {
        k.hash.arm(Bomb::new(1, &log));
    }
    let big = K::new(100);
    let r = run(|| c.insert(big.clone(), 4));
    let fired = keys.iter().filter(|k| !k.hash.armed()).count();
    if let Err(p) = r {
        let left = bomb_left(&p);
        safe_drop(p);
        assert_eq!(
            left,
            Some(1),
            "insert panicked with something other than a bomb"
        );
    }
    for k in &keys {
        if let Some(armed) = k.hash.0.lock().unwrap().take() {
            std::mem::forget(armed); // an unfired trap: a bomb, not dropped here
        }
    }
    assert!(
        fired >= 2,
        "fewer than two Hash panics ({fired}): scenario did not trigger"
    );
    assert_eq!(
        log.locked(),
        0,
        "a payload's Drop ran with a shard locked ({} drops)",
        log.drops()
    );
    check(&c);
}

/// The table grows while two resident keys' `Hash` panic: one panic resumed, one dropped.
#[test]
fn hash_panics_of_two_keys_while_the_table_grows_are_not_dropped_under_the_lock() {
    let log = Log::new();
    let c: Cache<K, u64> = Cache::builder().max_capacity(100_000).shards(1).build();
    log.probe_with(&c);
    let a = K::new(0);
    let b = K::new(1);
    c.insert(a.clone(), 0);
    c.insert(b.clone(), 1);
    a.hash.arm(Bomb::new(1, &log));
    b.hash.arm(Bomb::new(1, &log));
    let mut grew = false;
    for i in 10..2000u64 {
        match run(|| c.insert(K::new(i), i)) {
            Ok(()) => {
                if a.hash.armed() != b.hash.armed() {
                    // Only one fired: the shard hashed one of them elsewhere.
                    break;
                }
                if !a.hash.armed() {
                    grew = true;
                    break;
                }
            }
            Err(p) => {
                let left = bomb_left(&p);
                safe_drop(p);
                assert_eq!(
                    left,
                    Some(1),
                    "insert panicked with something other than a bomb"
                );
                grew = true;
                break;
            }
        }
    }
    let both = !a.hash.armed() && !b.hash.armed();
    if let Some(armed) = a.hash.0.lock().unwrap().take() {
        std::mem::forget(armed); // an unfired trap: a bomb, not dropped here
    }
    if let Some(armed) = b.hash.0.lock().unwrap().take() {
        std::mem::forget(armed); // an unfired trap: a bomb, not dropped here
    }
    assert!(grew && both, "the table never rehashed both keys together");
    assert_eq!(
        log.locked(),
        0,
        "a payload's Drop ran with a shard locked ({} drops)",
        log.drops()
    );
    check(&c);
}

// ---------------------------------------------------------------------------------------------
// Loaders, init closures, futures

fn loads_cache(limit: Option<usize>) -> Cache<u64, u64> {
    let mut b = Cache::builder().max_capacity(100);
    if let Some(n) = limit {
        b = b.max_concurrent_loads(n);
    }
    b.build()
}

#[test]
fn get_with_init_bomb_is_handed_back_unchanged_and_the_key_is_free() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let c = loads_cache(limit);
        log.probe_with(&c);
        let r = run(|| c.get_with(1, || std::panic::panic_any(Bomb::new(2, &log))));
        let Err(p) = r else {
            panic!("expected: init panicked")
        };
        assert_eq!(bomb_left(&p), Some(2), "not the original payload");
        assert_eq!(safe_drop(p), 3);
        assert_eq!(log.locked(), 0);
        let c2 = c.clone();
        assert_eq!(within("get_with after", move || c2.get_with(1, || 5)), 5);
        let c2 = c.clone();
        assert_eq!(within("other key", move || c2.get_with(2, || 6)), 6);
        check(&c);
    }
}

#[test]
fn try_get_with_and_optionally_init_bombs() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let c = loads_cache(limit);
        let r = run(|| {
            c.try_get_with(1, || -> Result<u64, ()> {
                std::panic::panic_any(Bomb::new(2, &log))
            })
        });
        let Err(p) = r else {
            panic!("expected: init panicked")
        };
        assert_eq!(bomb_left(&p), Some(2));
        safe_drop(p);
        let r = run(|| {
            c.optionally_get_with(1, || -> Option<u64> {
                std::panic::panic_any(Bomb::new(1, &log))
            })
        });
        let Err(p) = r else {
            panic!("expected: init panicked")
        };
        assert_eq!(bomb_left(&p), Some(1));
        safe_drop(p);
        let c2 = c.clone();
        assert_eq!(within("after", move || c2.get_with(1, || 5)), 5);
        check(&c);
    }
}

/// A joined waiter of a load whose init panics with a bomb: the leader gets the bomb, the waiter
/// completes (loads itself) without seeing it.
#[test]
fn waiter_of_a_bomb_init_completes() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let c = loads_cache(limit);
        let (in_tx, in_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let leader = {
            let c = c.clone();
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let r = run(|| {
                    c.get_with(1, || {
                        in_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        std::panic::panic_any(Bomb::new(2, &log))
                    })
                });
                match r {
                    Err(p) => {
                        let left = bomb_left(&p);
                        safe_drop(p);
                        left
                    }
                    Ok(_) => None,
                }
            })
        };
        in_rx.recv().unwrap();
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || run(|| c.get_with(1, || 11)).map_err(safe_drop))
        };
        // Let the waiter join (no way to observe that from outside without timing): if it has
        // not joined yet it simply loads after the panic; both outcomes are fine.
        std::thread::yield_now();
        go_tx.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), Some(2));
        let w = within("waiter", move || waiter.join().unwrap());
        assert_eq!(w, Ok(11));
        check(&c);
    }
}

/// `load`, `load_with_timeout`: the builder's loader panics with a bomb; the cache catches it
/// (LoadError::Panicked) and drops it itself.
#[test]
fn builder_loader_bomb_is_dropped_safely() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let mut b = Cache::builder().max_capacity(100);
        if let Some(n) = limit {
            b = b.max_concurrent_loads(n);
        }
        let fire = Arc::new(AtomicBool::new(true));
        let c: Cache<u64, u64> = b
            .loader({
                let log = Arc::clone(&log);
                let fire = Arc::clone(&fire);
                move |k: &u64| -> Result<u64, std::io::Error> {
                    if fire.load(SeqCst) {
                        std::panic::panic_any(Bomb::new(2, &log));
                    }
                    Ok(*k + 100)
                }
            })
            .build();
        log.probe_with(&c);
        let r = run(|| c.load(1));
        match r {
            Ok(Err(LoadError::Panicked)) => {}
            Ok(other) => panic!("load: {other:?}"),
            Err(p) => {
                let left = bomb_left(&p);
                safe_drop(p);
                // The original payload handed back is fine; another is not.
                assert_eq!(left, Some(2), "load panicked with something else");
            }
        }
        let r = run(|| c.load_with_timeout(2, Some(Duration::from_secs(30))));
        if let Err(p) = r {
            let left = bomb_left(&p);
            safe_drop(p);
            assert_eq!(
                left,
                Some(2),
                "load_with_timeout panicked with something else"
            );
        }
        assert_eq!(log.locked(), 0);
        fire.store(false, SeqCst);
        let c2 = c.clone();
        let v = within("load after", move || c2.load(3));
        assert_eq!(v.ok(), Some(103));
        check(&c);
    }
}

/// A loader run on the spawner panics with a bomb: the job must not panic out (it would kill a
/// worker), the caller gets an answer.
#[test]
fn spawned_load_bomb_does_not_escape_the_job() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let escaped = Arc::new(AtomicUsize::new(0));
        let mut b = Cache::builder().max_capacity(100);
        if let Some(n) = limit {
            b = b.max_concurrent_loads(n);
        }
        let fire = Arc::new(AtomicBool::new(true));
        let c: Cache<u64, u64> = b
            .spawner({
                let escaped = Arc::clone(&escaped);
                move |j| {
                    let escaped = Arc::clone(&escaped);
                    std::thread::spawn(move || {
                        if let Err(p) = catch_unwind(AssertUnwindSafe(j)) {
                            escaped.fetch_add(1, SeqCst);
                            safe_drop(p);
                        }
                    });
                }
            })
            .loader({
                let log = Arc::clone(&log);
                let fire = Arc::clone(&fire);
                move |k: &u64| -> Result<u64, std::io::Error> {
                    if fire.load(SeqCst) {
                        std::panic::panic_any(Bomb::new(2, &log));
                    }
                    Ok(*k + 100)
                }
            })
            .build();
        let c2 = c.clone();
        let r = within("spawned load", move || {
            c2.load_with_timeout(1, Some(Duration::from_secs(30)))
        });
        assert!(matches!(r, Err(LoadError::Panicked)), "{r:?}");
        fire.store(false, SeqCst);
        let c2 = c.clone();
        let r = within("spawned load after", move || {
            c2.load_with_timeout(2, Some(Duration::from_secs(30)))
        });
        assert_eq!(r.ok(), Some(102));
        assert_eq!(escaped.load(SeqCst), 0, "a job panicked out of the spawner");
        assert_eq!(log.drops(), 3);
        check(&c);
    }
}

/// A spawner that itself panics with a bomb.
#[test]
fn panicking_spawner_bomb_is_dropped_safely() {
    let log = Log::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .spawner({
            let log = Arc::clone(&log);
            move |j| {
                drop(j);
                std::panic::panic_any(Bomb::new(2, &log));
            }
        })
        .loader(|k: &u64| -> Result<u64, std::io::Error> { Ok(*k + 1) })
        .build();
    log.probe_with(&c);
    let c2 = c.clone();
    let r = within("load with panicking spawner", move || {
        c2.load_with_timeout(1, Some(Duration::from_secs(30)))
    });
    assert_eq!(r.ok(), Some(2));
    assert_eq!(log.drops(), 3);
    assert_eq!(log.locked(), 0);
    check(&c);
}

/// Refresh-ahead on a spawner whose loader panics with a bomb; then refreshes go on.
#[test]
fn refresh_job_bomb_does_not_escape() {
    let log = Log::new();
    let clock = ManualClock::new();
    let jobs: Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>> = Arc::default();
    let fire = Arc::new(AtomicBool::new(true));
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(10))
        .refresh_backoff(Duration::from_secs(1))
        .spawner({
            let jobs = Arc::clone(&jobs);
            move |j| jobs.lock().unwrap().push(j)
        })
        .loader({
            let log = Arc::clone(&log);
            let fire = Arc::clone(&fire);
            move |k: &u64| -> Result<u64, std::io::Error> {
                if fire.load(SeqCst) {
                    std::panic::panic_any(Bomb::new(2, &log));
                }
                Ok(*k + 100)
            }
        })
        .build();
    log.probe_with(&c);
    c.insert(1, 1);
    clock.advance(Duration::from_secs(11));
    assert_eq!(c.get(&1), Some(1));
    let run_jobs = |jobs: &Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>| {
        let q: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
        let n = q.len();
        for j in q {
            if let Err(p) = run(j) {
                let left = bomb_left(&p);
                safe_drop(p);
                panic!("refresh job panicked out (bomb left {left:?})");
            }
        }
        n
    };
    assert_eq!(run_jobs(&jobs), 1);
    assert_eq!(log.drops(), 3);
    assert_eq!(log.locked(), 0);
    check(&c);
    fire.store(false, SeqCst);
    clock.advance(Duration::from_secs(2));
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(run_jobs(&jobs), 1, "refresh not retried after the backoff");
    assert_eq!(c.get(&1), Some(101));
    let c2 = c.clone();
    assert_eq!(within("load after", move || c2.get_with(2, || 3)), 3);
    check(&c);
}

/// Inline refresh (no spawner) whose loader panics with a bomb: `get` does not panic.
#[test]
fn inline_refresh_bomb_does_not_escape_get() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let clock = ManualClock::new();
        let mut b = Cache::builder()
            .max_capacity(100)
            .clock(clock.clone())
            .refresh_after(Duration::from_secs(10));
        if let Some(n) = limit {
            b = b.max_concurrent_loads(n);
        }
        let c: Cache<u64, u64> = b
            .loader({
                let log = Arc::clone(&log);
                move |_k: &u64| -> Result<u64, std::io::Error> {
                    std::panic::panic_any(Bomb::new(2, &log))
                }
            })
            .build();
        log.probe_with(&c);
        c.insert(1, 1);
        clock.advance(Duration::from_secs(11));
        let r = run(|| c.get(&1));
        match r {
            Ok(v) => assert_eq!(v, Some(1)),
            Err(p) => {
                let left = bomb_left(&p);
                safe_drop(p);
                panic!("get panicked (bomb left {left:?})");
            }
        }
        assert_eq!(log.drops(), 3);
        assert_eq!(log.locked(), 0);
        let c2 = c.clone();
        assert_eq!(within("after", move || c2.get_with(2, || 3)), 3);
        check(&c);
    }
}

/// Async: get_with_async's future panics with a bomb; handed back as is; the key is free.
#[test]
fn async_init_bomb() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let c = loads_cache(limit);
        log.probe_with(&c);
        let r = run(|| {
            futures::executor::block_on(c.get_with_async(1, async {
                std::panic::panic_any::<Bomb>(Bomb::new(2, &log))
            }))
        });
        let Err(p) = r else {
            panic!("expected: panicked")
        };
        assert_eq!(bomb_left(&p), Some(2));
        safe_drop(p);
        let r = run(|| {
            let log2 = Arc::clone(&log);
            futures::executor::block_on(c.get_with_async_shared(1, async move {
                std::panic::panic_any::<Bomb>(Bomb::new(2, &log2))
            }))
        });
        if let Err(p) = r {
            let left = bomb_left(&p);
            safe_drop(p);
            assert_eq!(left, Some(2), "shared: panicked with something else");
        }
        assert_eq!(log.locked(), 0);
        let c2 = c.clone();
        let v = within("after", move || {
            futures::executor::block_on(c2.get_with_async(1, async { 5 }))
        });
        assert_eq!(v, 5);
        check(&c);
    }
}

/// Async builder loader (load_async) and its refresh on a future spawner.
#[test]
fn async_loader_bomb_is_dropped_safely() {
    let log = Log::new();
    let clock = ManualClock::new();
    let fire = Arc::new(AtomicBool::new(true));
    let futs: Arc<Mutex<Vec<herdcache::BoxFuture<()>>>> = Arc::default();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .max_concurrent_loads(1)
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(10))
        .future_spawner({
            let futs = Arc::clone(&futs);
            move |f| futs.lock().unwrap().push(f)
        })
        .async_loader({
            let log = Arc::clone(&log);
            let fire = Arc::clone(&fire);
            move |k: &u64| {
                let k = *k;
                let log = Arc::clone(&log);
                let fire = fire.load(SeqCst);
                async move {
                    if fire {
                        std::panic::panic_any(Bomb::new(2, &log));
                    }
                    Ok::<u64, std::io::Error>(k + 100)
                }
            }
        })
        .build();
    log.probe_with(&c);
    let r = run(|| futures::executor::block_on(c.load_async(1)));
    match r {
        Ok(Err(LoadError::Panicked)) => {}
        Ok(o) => panic!("load_async: {o:?}"),
        Err(p) => {
            let left = bomb_left(&p);
            safe_drop(p);
            assert_eq!(left, Some(2), "load_async panicked with something else");
        }
    }
    c.insert(5, 5);
    clock.advance(Duration::from_secs(11));
    assert_eq!(c.get(&5), Some(5));
    let q: Vec<_> = std::mem::take(&mut *futs.lock().unwrap());
    for f in q {
        if let Err(p) = run(|| futures::executor::block_on(f)) {
            let left = bomb_left(&p);
            safe_drop(p);
            panic!("async refresh future panicked out (bomb left {left:?})");
        }
    }
    assert_eq!(log.locked(), 0);
    fire.store(false, SeqCst);
    let c2 = c.clone();
    let v = within("after", move || {
        futures::executor::block_on(c2.load_async(1))
    });
    assert_eq!(v.ok(), Some(101));
    check(&c);
}

// ---------------------------------------------------------------------------------------------
// Listener, weigher, entry API, retain, get_all

/// Two entries removed by one operation, the listener panicking with a bomb on each: the first
/// handed back, the second dropped by the cache (not under a lock, not escaping).
#[test]
fn listener_bombs_on_several_removals() {
    let log = Log::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .shards(1)
        .eviction_listener({
            let log = Arc::clone(&log);
            move |_k, _v, _c| std::panic::panic_any(Bomb::new(2, &log))
        })
        .build();
    log.probe_with(&c);
    for i in 0..5 {
        c.insert(i, i);
    }
    let r = run(|| c.invalidate_all());
    if let Err(p) = r {
        let left = bomb_left(&p);
        safe_drop(p);
        assert_eq!(left, Some(2), "invalidate_all panicked with something else");
    }
    c.run_pending_tasks();
    let r = run(|| c.retain(|_, _| false));
    if let Err(p) = r {
        let left = bomb_left(&p);
        safe_drop(p);
        assert_eq!(left, Some(2));
    }
    for i in 0..5 {
        c.insert(i, i);
    }
    let r = run(|| c.retain(|_, _| false));
    if let Err(p) = r {
        let left = bomb_left(&p);
        safe_drop(p);
        assert_eq!(left, Some(2), "retain panicked with something else");
    }
    assert_eq!(log.locked(), 0);
    assert_eq!(c.iter().count(), 0);
    check(&c);
}

#[test]
fn retain_predicate_bomb() {
    let log = Log::new();
    let c: Cache<u64, u64> = Cache::builder().max_capacity(100).build();
    log.probe_with(&c);
    for i in 0..5 {
        c.insert(i, i);
    }
    let r = run(|| c.retain(|_, _| std::panic::panic_any(Bomb::new(2, &log))));
    let Err(p) = r else {
        panic!("expected: retain panicked")
    };
    assert_eq!(bomb_left(&p), Some(2));
    safe_drop(p);
    assert_eq!(log.locked(), 0);
    check(&c);
}

#[test]
fn weigher_bomb_during_loads() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let fire = Arc::new(AtomicBool::new(true));
        let mut b = Cache::builder().max_capacity(100).weigher({
            let log = Arc::clone(&log);
            let fire = Arc::clone(&fire);
            move |_k: &u64, _v: &u64| {
                if fire.load(SeqCst) {
                    std::panic::panic_any(Bomb::new(2, &log));
                }
                1
            }
        });
        if let Some(n) = limit {
            b = b.max_concurrent_loads(n);
        }
        let c: Cache<u64, u64> = b
            .loader(|k: &u64| -> Result<u64, std::io::Error> { Ok(*k) })
            .build();
        log.probe_with(&c);
        let r = run(|| c.get_with(1, || 1));
        if let Err(p) = r {
            let left = bomb_left(&p);
            safe_drop(p);
            assert_eq!(left, Some(2));
        }
        let r = run(|| c.load(2));
        if let Err(p) = r {
            let left = bomb_left(&p);
            safe_drop(p);
            assert_eq!(left, Some(2), "load panicked with something else");
        }
        let r = run(|| c.entry(3).and_compute_with(|_| herdcache::Op::Put(3)));
        if let Err(p) = r {
            let left = bomb_left(&p);
            safe_drop(p);
            assert_eq!(left, Some(2));
        }
        assert_eq!(log.locked(), 0);
        fire.store(false, SeqCst);
        let c2 = c.clone();
        assert_eq!(within("after", move || c2.get_with(1, || 7)), 7);
        let c2 = c.clone();
        assert_eq!(within("after load", move || c2.load(2).ok()), Some(2));
        check(&c);
    }
}

#[test]
fn compute_closure_bomb() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let c = loads_cache(limit);
        log.probe_with(&c);
        c.insert(1, 1);
        let r = run(|| {
            c.entry(1).and_compute_with(|_| -> herdcache::Op<u64> {
                std::panic::panic_any(Bomb::new(2, &log))
            })
        });
        let Err(p) = r else {
            panic!("expected: compute panicked")
        };
        assert_eq!(bomb_left(&p), Some(2));
        safe_drop(p);
        let r = run(|| {
            c.entry(2)
                .or_insert_with(|| std::panic::panic_any(Bomb::new(2, &log)))
        });
        let Err(p) = r else {
            panic!("expected: or_insert_with panicked")
        };
        assert_eq!(bomb_left(&p), Some(2));
        safe_drop(p);
        assert_eq!(log.locked(), 0);
        let c2 = c.clone();
        assert_eq!(within("after", move || c2.get_with(2, || 8)), 8);
        let c2 = c.clone();
        let e = within("compute after", move || {
            c2.entry(1).and_compute_with(|_| herdcache::Op::Put(9));
            c2.get(&1)
        });
        assert_eq!(e, Some(9));
        check(&c);
    }
}

/// `get_all`: the batch loader panics with a bomb; handed back; the keys are free again.
#[test]
fn get_all_loader_bomb() {
    for limit in [None, Some(1)] {
        let log = Log::new();
        let c = loads_cache(limit);
        log.probe_with(&c);
        let r = run(|| {
            c.get_all(
                vec![1u64, 2, 3],
                |_ks: &[u64]| -> std::collections::HashMap<u64, u64> {
                    std::panic::panic_any(Bomb::new(2, &log))
                },
            )
        });
        let Err(p) = r else {
            panic!("expected: get_all panicked")
        };
        assert_eq!(bomb_left(&p), Some(2));
        safe_drop(p);
        let c2 = c.clone();
        assert_eq!(within("after", move || c2.get_with(2, || 8)), 8);
        check(&c);
    }
}
