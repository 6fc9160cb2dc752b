#![cfg(not(any(loom, shuttle)))]
//! A shared async load (`load_async` with the builder's `async_loader`) whose loader panics
//! while a *waiter* polls it, not its leader: the case stop 48's CI run printed in
//! `attack_s55` ("there is no reactor running": its gate's `tokio::time::sleep`, polled by a
//! waiter blocked on a futures executor outside the runtime). Here it happens every time: the
//! loader panics whenever it is polled on the waiter's thread, and until then it stays pending,
//! waking itself, so that the waiter (woken with every interested caller) gets to poll it.
//!
//! Checked in each configuration (plain, a load limit of 1, negative caching, fail-safe with an
//! expired old value): the leader and the waiter both get the load's end (`Panicked`, or the
//! old value under fail-safe), the other waiters of the key complete, no load is left in
//! flight, `validate()` passes, and the statistics balance exactly (every miss ends as one
//! load, join or negative hit).
//!
//! Round 66 of the outside attacks (a helper's randomized stress of the misses identity, public
//! API only, ~413,000 rounds) then found the double count behind that CI failure, fixed in this
//! stop: a caller registering a *shared* load (`get_with_async_shared`, `load_async`, ...) swept
//! an old registration of its key (a negative entry) right after, and that registration's key or
//! error `Drop` (user code) panicked; meanwhile another caller joined the new flight, polled its
//! future and published it (one load counted), and the registering caller's guard, dropped
//! unwinding, counted the same load again as failed. `sweeping_a_negative_entry_panics_...`
//! fails every run on the code before the fix (misses 3, answered 4). (Since round 78 the
//! replaced negative entry belongs to the new flight, which puts it back if it ends with
//! nothing: in the error's case the panicking drop comes once A's flight has ended, and the
//! joiner comes while it waits, as it does during the key's.)

mod common;

use common::{start, watchdog};
use herdcache::{Cache, LoadError, ManualClock};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

thread_local! {
    /// Set on the waiter's thread: the loader panics when polled there.
    static WAITER: Cell<bool> = const { Cell::new(false) };
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    limit: bool,
    negative: bool,
    fail_safe: bool,
}

fn case(cfg: Cfg) {
    let what = format!("{cfg:?}");
    let polled_by_waiter = Arc::new(AtomicBool::new(false));
    let p = Arc::clone(&polled_by_waiter);
    let clock = ManualClock::new();
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .record_stats()
        .clock(clock.clone());
    if cfg.limit {
        b = b.max_concurrent_loads(1);
    }
    if cfg.negative {
        b = b.negative_ttl(Duration::from_secs(100));
    }
    if cfg.fail_safe {
        b = b.fail_safe(Duration::from_secs(3600));
    }
    let cache: Cache<u64, u64> = b
        .async_loader(move |_k: &u64| {
            let p = Arc::clone(&p);
            async move {
                std::future::poll_fn(|cx| {
                    if WAITER.with(Cell::get) {
                        p.store(true, SeqCst);
                        panic!("injected: the loader polled by a waiter");
                    }
                    cx.waker().wake_by_ref();
                    Poll::<()>::Pending
                })
                .await;
                Ok::<u64, herdcache::BoxError>(5)
            }
        })
        .build();
    if cfg.fail_safe {
        cache.insert(1, 40);
        clock.advance(Duration::from_secs(20));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let c = cache.clone();
    let lead = rt.spawn(async move { c.load_async(1).await });
    assert!(
        common::eventually(|| cache.loads_in_flight() > 0),
        "{what}: the leader's load never started"
    );
    let c = cache.clone();
    let waiter = start(move || {
        WAITER.with(|w| w.set(true));
        futures::executor::block_on(c.load_async(1))
    });
    let c = cache.clone();
    let blocking = start(move || c.get_with(1, || 7));
    let c = cache.clone();
    let other = rt.spawn(async move { c.get_with_async(1, async { 8 }).await });

    let led = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), lead).await })
        .unwrap_or_else(|_| panic!("{what}: the leader hangs"))
        .expect("the leader's task");
    let waited = waiter
        .wait(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{what}: the waiter hangs"))
        .expect("the waiter's call returns: the loader's panic is the load's end");
    assert!(polled_by_waiter.load(SeqCst), "{what}: tests nothing");
    if cfg.fail_safe {
        assert_eq!(led.ok(), Some(40), "{what}: fail-safe serves the old value");
        assert_eq!(waited.ok(), Some(40), "{what}: to the waiter too");
    } else {
        assert!(matches!(led, Err(LoadError::Panicked)), "{what}: {led:?}");
        assert!(
            matches!(waited, Err(LoadError::Panicked)),
            "{what}: {waited:?}"
        );
    }
    let b = blocking
        .wait(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{what}: get_with hangs"))
        .expect("get_with");
    let o = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), other).await })
        .unwrap_or_else(|_| panic!("{what}: get_with_async hangs"))
        .expect("get_with_async");
    if cfg.fail_safe {
        assert_eq!((b, o), (40, 40), "{what}");
    } else {
        // Neither can use a panicked load: one of them loads, the other joins it (or loads
        // after it, if it came late).
        assert!(
            [7, 8].contains(&b) && [7, 8].contains(&o),
            "{what}: {b} {o}"
        );
    }
    assert!(
        common::eventually(|| cache.loads_in_flight() == 0),
        "{what}: a load left in flight: {}",
        cache.describe_loads()
    );
    cache.validate();
    let s = cache.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    assert_eq!(
        answered,
        s.misses + s.refreshes_started,
        "{what}: misses and their ends do not balance: {s:?}"
    );
}

#[test]
fn a_shared_loads_loader_panics_while_a_waiter_polls_it() {
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(300), "attack_s66");
    let rounds = common::Part::new("s66 rounds").count(30);
    for _ in 0..rounds {
        for limit in [false, true] {
            for negative in [false, true] {
                for fail_safe in [false, true] {
                    case(Cfg {
                        limit,
                        negative,
                        fail_safe,
                    });
                }
            }
        }
    }
}

/// Armed: the next drop of a poisoned key (or of a [`PoisonedError`]) panics, once [`JOINED`]
/// says the other caller is done (or after 5 s).
static POISON: AtomicBool = AtomicBool::new(false);
static JOINED: AtomicBool = AtomicBool::new(false);
/// The armed drop is under way, waiting for [`JOINED`].
static FIRING: AtomicBool = AtomicBool::new(false);

fn poison_fires() {
    if !std::thread::panicking() && POISON.swap(false, SeqCst) {
        FIRING.store(true, SeqCst);
        // The window the other caller uses: it joins the flight, polls, publishes.
        common::eventually(|| JOINED.load(SeqCst));
        panic!("injected: a swept registration's drop");
    }
}

#[derive(Debug, Clone)]
struct PKey {
    id: u64,
    poisoned: bool,
}
impl PartialEq for PKey {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
    }
}
impl Eq for PKey {}
impl std::hash::Hash for PKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.id.hash(h)
    }
}
impl Drop for PKey {
    fn drop(&mut self) {
        if self.poisoned {
            poison_fires();
        }
    }
}

#[derive(Debug)]
struct PoisonedError;
impl std::fmt::Display for PoisonedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("down")
    }
}
impl std::error::Error for PoisonedError {}
impl Drop for PoisonedError {
    fn drop(&mut self) {
        poison_fires();
    }
}

fn k(id: u64) -> PKey {
    PKey {
        id,
        poisoned: false,
    }
}

/// A's `get_with_async_shared` of key 7 registers its shared load, then sweeps the key's
/// negative entry, whose key (or error) panics on drop; `joiner` (0: none, 1: another
/// `get_with_async_shared`, 2: `load_async`, 3: `get_with_async`) joins meanwhile and drives
/// A's load to the end. Checks both end, nothing is left in flight, the misses identity, and a
/// fresh load.
fn sweep_case(joiner: u8, via_error: bool) {
    let what = format!("joiner {joiner}, via the error {via_error}");
    let cache: Cache<PKey, u64> = Cache::builder()
        .max_capacity(100)
        .record_stats()
        .clock(ManualClock::new())
        .negative_ttl(Duration::from_secs(100))
        .async_loader(|_k: &PKey| async { Ok::<u64, herdcache::BoxError>(5) })
        .build();
    // The negative entry: its registered key is a poisoned clone, or its error panics.
    let r = if via_error {
        cache
            .try_get_with(k(7), || Err::<u64, _>(PoisonedError))
            .map_err(drop)
    } else {
        let key = PKey {
            id: 7,
            poisoned: true,
        };
        cache
            .try_get_with(key, || Err::<u64, _>("down"))
            .map_err(drop)
    };
    assert!(r.is_err());
    JOINED.store(joiner == 0, SeqCst);
    FIRING.store(false, SeqCst);
    POISON.store(true, SeqCst);
    let c = cache.clone();
    let a = start(move || futures::executor::block_on(c.get_with_async_shared(k(7), async { 1 })));
    let b = (joiner > 0).then(|| {
        // A's load registered, or (the error's case) its drop under way: the replaced
        // negative entry belongs to A's flight (it is put back if the load ends with
        // nothing), so its error is dropped once that flight has ended, not in the sweep.
        assert!(
            common::eventually(|| cache.loads_in_flight() > 0 || FIRING.load(SeqCst)),
            "{what}: A's load never registered"
        );
        let c = cache.clone();
        start(move || {
            let r = match joiner {
                1 => futures::executor::block_on(c.get_with_async_shared(k(7), async { 2 })),
                2 => futures::executor::block_on(c.load_async(k(7))).unwrap_or(0),
                _ => futures::executor::block_on(c.get_with_async(k(7), async { 3 })),
            };
            JOINED.store(true, SeqCst);
            r
        })
    });
    let ra = a
        .wait(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{what}: A hangs"));
    assert!(
        ra.is_err() && !POISON.load(SeqCst),
        "{what}: A's sweep panics ({ra:?})"
    );
    if let Some(b) = b {
        let rb = b
            .wait(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what}: the joiner hangs"))
            .expect("the joiner returns");
        // It drove A's load (1) or, if it came after A left it, its own.
        assert!([1, 2, 3, 5].contains(&rb), "{what}: {rb}");
    }
    assert!(
        common::eventually(|| cache.loads_in_flight() == 0),
        "{what}: a load left in flight: {}",
        cache.describe_loads()
    );
    cache.validate();
    let s = cache.stats();
    let answered =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    assert_eq!(
        answered,
        s.misses + s.refreshes_started,
        "{what}: misses and their ends do not balance: {s:?}"
    );
    // The key loads afresh.
    let c = cache.clone();
    let v = start(move || c.get_with(k(7), || 9))
        .wait(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{what}: a fresh load hangs"))
        .expect("a fresh load");
    assert!([1, 2, 3, 5, 9].contains(&v), "{what}: {v}");
}

#[test]
fn sweeping_a_negative_entry_panics_while_another_caller_drives_the_shared_load() {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _l = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(300), "attack_s66 sweep");
    for _ in 0..common::Part::new("s66 sweeps").count(6) {
        for joiner in 0..4 {
            for via_error in [false, true] {
                sweep_case(joiner, via_error);
            }
        }
    }
}
