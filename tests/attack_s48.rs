//! Round 48: the lifecycle of an entry's refresh claim and fail-safe retry state, attacked
//! through the public API with faults injected at user-code call sites (loader, spawner,
//! value `Clone`, eviction listener, entry computations) and a `ManualClock`.

mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, ManualClock, Op};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A backend: returns 100 + the number of calls so far, or fails while `down`; panics while
/// `panic` is set. `advance`: seconds the loader advances the clock by before answering.
#[derive(Clone, Default)]
struct Backend {
    calls: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
    advance: Arc<AtomicU64>,
}

impl Backend {
    fn call(&self, clock: &ManualClock) -> Result<u64, BoxError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let adv = self.advance.swap(0, Ordering::SeqCst);
        if adv > 0 {
            clock.advance(secs(adv));
        }
        if self.panic.load(Ordering::SeqCst) {
            panic!("backend panics");
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(BoxError::from("backend down"));
        }
        Ok(100 + n)
    }
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    fn set_down(&self, d: bool) {
        self.down.store(d, Ordering::SeqCst);
    }
}

/// Loads `key` through `c`; returns the value and the statistics the call changed.
fn load_counted(c: &Cache<u64, u64>, key: u64) -> (u64, herdcache::CacheStats) {
    let before = c.stats();
    let v = c.load(key).unwrap();
    (v, c.stats() - before)
}

fn start_clock() -> ManualClock {
    let c = ManualClock::new();
    c.advance(secs(1_000));
    c
}

// ---------------------------------------------------------------------------------------------
// Fail-safe retry state vs. entry computations.
// ---------------------------------------------------------------------------------------------

/// TTL 60, fail-safe 600, backoff 30, no refresh.
fn fs_cache(clock: &ManualClock, b: &Backend) -> Cache<u64, u64> {
    let (bb, cl) = (b.clone(), clock.clone());
    Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(30))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| bb.call(&cl))
        .build()
}

/// An expired key kept for fail-safe, no load of it failed yet. A computation that leaves it
/// as it is (`Op::Nop`, its closure sees no value) is not a load: the next `load` must load
/// the key from the healthy backend ("Until a load fails, the key behaves as without
/// fail-safe: the first caller after the deadline loads it").
#[test]
fn nop_computation_on_expired_key_does_not_start_a_fail_safe_backoff() {
    let _w = watchdog(secs(10), "nop_computation_on_expired_key");
    let clock = start_clock();
    let b = Backend::default();
    let c = fs_cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(61));
    let r = c.entry(1).and_compute_with(|cur| {
        assert!(cur.is_none(), "an expired entry is absent to a computation");
        Op::Nop
    });
    let _ = r;
    let (v, d) = load_counted(&c, 1);
    assert_eq!(
        (v, b.calls(), d.stale_served_after_ttl),
        (102, 2, 0),
        "a healthy backend's value, loaded (not the stale value without a load)"
    );
}

/// The same, repeated: computations every half backoff keep a key that never failed from
/// ever being loaded until max_stale — the stale value is served the whole time.
#[test]
fn repeated_nop_computations_starve_the_reload_of_an_expired_key() {
    let _w = watchdog(secs(10), "repeated_nop_computations");
    let clock = start_clock();
    let b = Backend::default();
    let c = fs_cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(61));
    let mut stale = 0;
    for _ in 0..10 {
        let _ = c.entry(1).and_compute_with(|_| Op::Nop);
        clock.advance(secs(15));
        if c.get_or_stale(&1) == Some(101) && c.load(1).unwrap() == 101 {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "healthy backend: the key reloads at the first load past TTL"
    );
    assert_eq!(b.calls(), 2);
}

/// A computation whose closure panics on an expired fail-safe key: not a load either.
#[test]
fn panicking_computation_on_expired_key_does_not_start_a_fail_safe_backoff() {
    let _w = watchdog(secs(10), "panicking_computation_on_expired_key");
    let clock = start_clock();
    let b = Backend::default();
    let c = fs_cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(61));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.entry(1)
            .and_compute_with(|_| -> Op<u64> { panic!("closure") })
    }));
    assert!(r.is_err());
    assert_eq!(c.load(1).unwrap(), 102, "the healthy backend is asked");
    assert_eq!(b.calls(), 2);
}

/// Control: without the computation the expired key loads.
#[test]
fn expired_key_loads_from_healthy_backend_control() {
    let clock = start_clock();
    let b = Backend::default();
    let c = fs_cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), 102);
}

/// Within a failed key's backoff, a `Nop` computation must not push the retry later: after
/// the backoff that the failure set, one caller retries.
#[test]
fn nop_computation_in_fail_safe_backoff_does_not_delay_the_retry() {
    let _w = watchdog(secs(10), "nop_in_backoff");
    let clock = start_clock();
    let b = Backend::default();
    let c = fs_cache(&clock, &b);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(61));
    b.set_down(true);
    assert_eq!(c.load(1).unwrap(), 101, "fail-safe");
    assert_eq!(b.calls(), 2);
    b.set_down(false);
    clock.advance(secs(20));
    let _ = c.entry(1).and_compute_with(|_| Op::Nop);
    clock.advance(secs(11)); // 31 s after the failure: past its backoff
    assert_eq!(
        c.load(1).unwrap(),
        103,
        "retried once the failure's backoff passed"
    );
}

// ---------------------------------------------------------------------------------------------
// Negative caching of a failed refresh vs. fail-safe.
// ---------------------------------------------------------------------------------------------

/// TTL 60, refresh_after 10, fail-safe 600, inline refresh.
fn refresh_fs_cache(
    clock: &ManualClock,
    b: &Backend,
    negative: Option<u64>,
    backoff: u64,
) -> Cache<u64, u64> {
    let (bb, cl) = (b.clone(), clock.clone());
    let mut builder = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(backoff))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| bb.call(&cl));
    if let Some(n) = negative {
        builder = builder.negative_ttl(secs(n));
    }
    builder.build()
}

/// A refresh fails while the value is live (negative_ttl 300): the failure is remembered. The
/// entry then expires; fail-safe promises the last value to a load whose failure ... "a
/// backend that is down is not an error for the keys the cache still remembers".
#[test]
fn failed_refresh_negative_entry_does_not_hide_fail_safe_value() {
    let _w = watchdog(secs(10), "failed_refresh_negative_entry");
    let clock = start_clock();
    let b = Backend::default();
    let c = refresh_fs_cache(&clock, &b, Some(300), 100);
    assert_eq!(c.load(1).unwrap(), 101);
    b.set_down(true);
    clock.advance(secs(11));
    assert_eq!(
        c.get(&1),
        Some(101),
        "stale-while-revalidate; the refresh fails inline"
    );
    assert_eq!(b.calls(), 2);
    clock.advance(secs(50)); // t = 61: expired, within max_stale
    let r = c.load(1);
    assert_eq!(
        r.as_ref().ok(),
        Some(&101),
        "fail-safe: the last value, not the remembered error ({r:?})"
    );
}

/// Same with a panicking refresh (remembered for the backoff even without negative_ttl).
#[test]
fn panicked_refresh_negative_entry_does_not_hide_fail_safe_value() {
    let _w = watchdog(secs(10), "panicked_refresh_negative_entry");
    let clock = start_clock();
    let b = Backend::default();
    let c = refresh_fs_cache(&clock, &b, None, 100);
    assert_eq!(c.load(1).unwrap(), 101);
    b.panic.store(true, Ordering::SeqCst);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(101));
    assert_eq!(b.calls(), 2);
    clock.advance(secs(50));
    let r = c.load(1);
    assert_eq!(
        r.as_ref().ok(),
        Some(&101),
        "fail-safe: the last value ({r:?})"
    );
}

/// Control: a failed *load* of the expired key (no refresh before) falls back.
#[test]
fn failed_load_after_expiry_falls_back_control() {
    let clock = start_clock();
    let b = Backend::default();
    let c = refresh_fs_cache(&clock, &b, Some(300), 100);
    assert_eq!(c.load(1).unwrap(), 101);
    b.set_down(true);
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), 101);
}

// ---------------------------------------------------------------------------------------------
// A value whose `Clone` panics on demand (thread-local switch: the inline refresh runs on the
// reader's thread).
// ---------------------------------------------------------------------------------------------

thread_local! {
    static BOMB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Debug, PartialEq, Eq)]
struct PV(u64);

impl Clone for PV {
    fn clone(&self) -> Self {
        if BOMB.with(|b| b.get()) {
            panic!("value clone");
        }
        PV(self.0)
    }
}

/// An inline refresh hangs past the TTL (the loader advances the clock), then fails, with
/// fail-safe on: the refresh falls back on the (now stale) value, whose `Clone` panics. The
/// refresh must still be counted once: "Refreshes started ... Each ends as one of the next
/// two."
#[test]
fn refresh_failing_past_ttl_with_panicking_value_clone_is_counted_once() {
    let _w = watchdog(secs(10), "refresh_failing_past_ttl_clone");
    let clock = start_clock();
    let mode = Arc::new(AtomicU64::new(0));
    let (m, cl) = (Arc::clone(&mode), clock.clone());
    let c: Cache<u64, PV> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| match m.load(Ordering::SeqCst) {
            0 => Ok(PV(1)),
            1 => {
                cl.advance(secs(60)); // the refresh outlives the value's TTL
                BOMB.with(|b| b.set(true));
                Err(BoxError::from("down"))
            }
            _ => Ok(PV(2)),
        })
        .build();
    assert_eq!(c.load(1).unwrap(), PV(1));
    mode.store(1, Ordering::SeqCst);
    clock.advance(secs(11));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.get(&1)));
    BOMB.with(|b| b.set(false));
    let s = c.stats();
    assert_eq!(
        (
            s.refreshes_started,
            s.refreshes_succeeded + s.refreshes_failed
        ),
        (1, 1),
        "each refresh started ends once (get: {:?})",
        r.as_ref().map(|v| v.clone())
    );
    // The key still loads once the backend is back.
    mode.store(2, Ordering::SeqCst);
    clock.advance(secs(6));
    assert_eq!(c.load(1).unwrap(), PV(2));
}

/// Control: the same without the panicking clone.
#[test]
fn refresh_failing_past_ttl_is_counted_once_control() {
    let clock = start_clock();
    let mode = Arc::new(AtomicU64::new(0));
    let (m, cl) = (Arc::clone(&mode), clock.clone());
    let c: Cache<u64, PV> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(5))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| match m.load(Ordering::SeqCst) {
            0 => Ok(PV(1)),
            1 => {
                cl.advance(secs(60));
                Err(BoxError::from("down"))
            }
            _ => Ok(PV(2)),
        })
        .build();
    assert_eq!(c.load(1).unwrap(), PV(1));
    mode.store(1, Ordering::SeqCst);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(PV(1)));
    let s = c.stats();
    assert_eq!((s.refreshes_started, s.refreshes_failed), (1, 1));
    mode.store(2, Ordering::SeqCst);
    assert_eq!(
        c.load(1).unwrap(),
        PV(1),
        "within the failed refresh's backoff: stale"
    );
    clock.advance(secs(6));
    assert_eq!(c.load(1).unwrap(), PV(2));
}

/// A refresh whose new value is too heavy to store: the key ends up absent (documented for
/// writes). Counted as succeeded: "Refreshes that replaced the value (one whose new value is
/// too heavy for the cache replaces it with nothing: the key is removed, as an insert of that
/// value would)" — and once, not also as failed.
#[test]
fn refresh_with_too_heavy_value_counts() {
    let clock = start_clock();
    let calls = Arc::new(AtomicU64::new(0));
    let cc = Arc::clone(&calls);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .weigher(|_k, v: &u64| if *v >= 1000 { 1_000 } else { 1 })
        .refresh_after(secs(10))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u64| Ok::<_, BoxError>(cc.fetch_add(1, Ordering::SeqCst) * 1000 + 1))
        .build();
    assert_eq!(c.load(1).unwrap(), 1);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(1));
    assert_eq!(
        c.get(&1),
        None,
        "the refreshed value was too heavy: the key is gone"
    );
    let s = c.stats();
    assert_eq!(s.refreshes_started, 1);
    assert_eq!(
        (s.refreshes_succeeded, s.refreshes_failed),
        (1, 0),
        "the value was replaced with nothing (the key was removed)"
    );
}

// ---------------------------------------------------------------------------------------------
// A key whose `Eq` panics on demand, while a *failing* refresh ends.
// ---------------------------------------------------------------------------------------------

thread_local! {
    static EQ_BOMB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Debug, Clone)]
struct PK(u64);

impl std::hash::Hash for PK {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}

impl PartialEq for PK {
    fn eq(&self, o: &Self) -> bool {
        if EQ_BOMB.with(|b| b.get()) {
            panic!("key eq");
        }
        self.0 == o.0
    }
}
impl Eq for PK {}

/// refresh_after 10, backoff 5, negative_ttl 300, TTL 60; the loader fails on its second
/// call, arming the key's `Eq` bomb first (so ending the failed refresh panics in `Eq`).
fn eq_bomb_cache(clock: &ManualClock, calls: &Arc<AtomicU64>, fail_safe: bool) -> Cache<PK, u64> {
    let cc = Arc::clone(calls);
    let mut b = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .refresh_backoff(secs(5))
        .negative_ttl(secs(300))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &PK| {
            let n = cc.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 2 {
                EQ_BOMB.with(|b| b.set(true));
                return Err(BoxError::from("down"));
            }
            Ok::<_, BoxError>(100 + n)
        });
    if fail_safe {
        b = b.fail_safe(secs(600));
    }
    b.build()
}

/// The key's `Eq` panics while a failed refresh is remembered as a negative entry. Promised:
/// "A refresh whose store panics in user code (the key's `Eq`, an `Expiry` hook) gives its
/// claim back as a failure does" — the key refreshes again after the backoff, and no load of
/// the key is left waiting on a flight nobody will resolve.
#[test]
fn failed_refresh_whose_negative_entry_panics_in_key_eq_is_refreshed_again() {
    let _w = watchdog(secs(15), "failed_refresh_key_eq");
    let clock = start_clock();
    let calls = Arc::new(AtomicU64::new(0));
    let c = eq_bomb_cache(&clock, &calls, false);
    assert_eq!(c.load(PK(1)).unwrap(), 101);
    clock.advance(secs(11));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.get(&PK(1))));
    EQ_BOMB.with(|b| b.set(false));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the refresh ran ({r:?})");
    let s = c.stats();
    assert_eq!(
        (
            s.refreshes_started,
            s.refreshes_succeeded + s.refreshes_failed
        ),
        (1, 1),
        "counted once"
    );
    // After the backoff, the key is refreshed again. The claim could not be given back where
    // `Eq` panicked: the next read of the entry gives it back (due when it would have been,
    // a backoff after the failure), and the read after it refreshes.
    clock.advance(secs(6));
    assert_eq!(c.get(&PK(1)), Some(101));
    assert_eq!(c.get(&PK(1)), Some(101));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the key is refreshed again after the backoff"
    );
}

/// Same sequence; then the entry expires and a `load` of the key must return (not wait for a
/// flight that was never resolved).
#[test]
fn failed_refresh_whose_negative_entry_panics_in_key_eq_leaves_no_stranded_flight() {
    let _w = watchdog(secs(15), "failed_refresh_key_eq_stranded");
    let clock = start_clock();
    let calls = Arc::new(AtomicU64::new(0));
    let c = eq_bomb_cache(&clock, &calls, false);
    assert_eq!(c.load(PK(1)).unwrap(), 101);
    clock.advance(secs(11));
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.get(&PK(1))));
    EQ_BOMB.with(|b| b.set(false));
    clock.advance(secs(60)); // expired
    let c2 = c.clone();
    let r = common::within(secs(2), move || c2.load(PK(1)).map_err(|e| e.to_string()));
    assert!(
        r.is_some(),
        "load of the key hangs on a flight nobody resolves"
    );
}

/// With fail-safe too, the failed refresh's fallback lookup panics in `Eq`; the lead's drop
/// then runs `Eq` again while unwinding. Run in a child process: a double panic aborts.
#[test]
#[ignore = "run by failed_refresh_key_eq_panic_with_fail_safe_does_not_abort"]
fn child_failed_refresh_key_eq_panic_with_fail_safe() {
    let clock = start_clock();
    let calls = Arc::new(AtomicU64::new(0));
    let c = eq_bomb_cache(&clock, &calls, true);
    assert_eq!(c.load(PK(1)).unwrap(), 101);
    clock.advance(secs(11));
    // The refresh fails after the entry expired (fail-safe looks the key up).
    clock.advance(secs(0));
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.get(&PK(1))));
    EQ_BOMB.with(|b| b.set(false));
    clock.advance(secs(6));
    // The first read gives back the orphaned claim, the second refreshes (see above).
    assert_eq!(c.get(&PK(1)), Some(101));
    assert_eq!(c.get(&PK(1)), Some(101));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "refreshed again");
}

/// Runs the ignored test `name` in a child process; panics (with its stderr's gist) unless it
/// passed.
fn run_child(name: &str) {
    let _w = watchdog(secs(30), "child process");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let gist: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note:") && !l.starts_with("stack"))
        .collect();
    assert!(
        out.status.success(),
        "child failed: {:?}\n{}",
        out.status,
        gist.join("\n")
    );
}

#[test]
fn failed_refresh_key_eq_panic_with_fail_safe_does_not_abort() {
    run_child("child_failed_refresh_key_eq_panic_with_fail_safe");
}

/// Not a refresh at all: a `get_with` whose `init` panics while the key's `Eq` panics too
/// (armed by the init), in a cache with refresh-ahead. The lead's drop gives the refresh claim
/// back by looking the key up (`Eq`) while unwinding.
#[test]
#[ignore = "run by panicking_init_with_panicking_key_eq_does_not_abort"]
fn child_panicking_init_with_panicking_key_eq() {
    let clock = start_clock();
    let c: Cache<PK, u64> = Cache::builder()
        .max_capacity(100)
        .refresh_after(secs(10))
        .clock(clock.clone())
        .loader(|_k: &PK| Ok::<_, BoxError>(1))
        .build();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.get_with(PK(1), || {
            EQ_BOMB.with(|b| b.set(true));
            panic!("init")
        })
    }));
    EQ_BOMB.with(|b| b.set(false));
    assert!(r.is_err());
    assert_eq!(c.get_with(PK(1), || 7), 7);
}

#[test]
fn panicking_init_with_panicking_key_eq_does_not_abort() {
    run_child("child_panicking_init_with_panicking_key_eq");
}

/// `get_all` is one of the calls that fall back ("the `get_with` and `load` families,
/// `get_all`, and the entry API's `or_insert_with` family"): after a failed refresh remembered
/// by `negative_ttl`, the expired key must come back with its last value, not be left out.
#[test]
fn failed_refresh_negative_entry_hides_fail_safe_value_from_get_all() {
    let _w = watchdog(secs(10), "get_all negative");
    let clock = start_clock();
    let b = Backend::default();
    let c = refresh_fs_cache(&clock, &b, Some(300), 100);
    assert_eq!(c.load(1).unwrap(), 101);
    b.set_down(true);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(101));
    clock.advance(secs(50));
    let got = c.get_all([1u64], |_keys| std::collections::HashMap::new());
    assert_eq!(got.get(&1), Some(&101), "fail-safe: the last value");
}

/// The same through an async refresh (`async_loader` + `future_spawner` on tokio).
#[test]
fn async_failed_refresh_negative_entry_does_not_hide_fail_safe_value() {
    let _w = watchdog(secs(10), "async negative");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let clock = start_clock();
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let (d, cc) = (Arc::clone(&down), Arc::clone(&calls));
    let handle = rt.handle().clone();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(100))
        .negative_ttl(secs(300))
        .clock(clock.clone())
        .async_loader(move |_k: &u64| {
            let (d, cc) = (Arc::clone(&d), Arc::clone(&cc));
            async move {
                let n = cc.fetch_add(1, Ordering::SeqCst) + 1;
                if d.load(Ordering::SeqCst) {
                    Err(BoxError::from("down"))
                } else {
                    Ok(100 + n)
                }
            }
        })
        .future_spawner(move |f| {
            handle.spawn(f);
        })
        .build();
    assert_eq!(rt.block_on(c.load_async(1)).unwrap(), 101);
    down.store(true, Ordering::SeqCst);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(101));
    let until = std::time::Instant::now() + secs(3);
    while calls.load(Ordering::SeqCst) < 2 || c.loads_in_flight() > 0 {
        assert!(std::time::Instant::now() < until, "the refresh did not run");
        std::thread::sleep(Duration::from_millis(2));
    }
    clock.advance(secs(50));
    let r = rt.block_on(c.load_async(1));
    assert_eq!(
        r.as_ref().ok(),
        Some(&101),
        "fail-safe: the last value ({r:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Write-wins during a fail-safe retry (passing pins).
// ---------------------------------------------------------------------------------------------

/// A gate the loader waits on: `entered` once inside, returns when `go` is set.
#[derive(Clone, Default)]
struct Gate {
    armed: Arc<AtomicBool>,
    entered: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
}

impl Gate {
    fn pass(&self) {
        if self.armed.load(Ordering::SeqCst) {
            self.entered.store(true, Ordering::SeqCst);
            while !self.go.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        }
    }
    fn wait_entered(&self) {
        let until = std::time::Instant::now() + secs(3);
        while !self.entered.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < until, "loader never entered");
            std::thread::yield_now();
        }
    }
}

fn gated_fs_cache(clock: &ManualClock, b: &Backend, g: &Gate) -> Cache<u64, u64> {
    let (bb, cl, gg) = (b.clone(), clock.clone(), g.clone());
    Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(30))
        .negative_ttl(secs(300))
        .clock(clock.clone())
        .loader(move |_k: &u64| {
            gg.pass();
            bb.call(&cl)
        })
        .build()
}

/// A fail-safe retry is running (after a failure and its backoff); `write` happens during it;
/// then the retry fails. Callers afterwards must see the write, never the old stale value.
fn write_during_failing_retry(write: impl FnOnce(&Cache<u64, u64>), want: Option<u64>) {
    let _w = watchdog(secs(10), "write during retry");
    let clock = start_clock();
    let b = Backend::default();
    let g = Gate::default();
    let c = gated_fs_cache(&clock, &b, &g);
    assert_eq!(c.load(1).unwrap(), 101);
    b.set_down(true);
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), 101, "first failure: stale");
    clock.advance(secs(31));
    g.armed.store(true, Ordering::SeqCst);
    let c2 = c.clone();
    let retrier = std::thread::spawn(move || c2.load(1).map_err(|e| e.to_string()));
    g.wait_entered();
    assert_eq!(c.load(1).unwrap(), 101, "during the retry: stale at once");
    write(&c);
    g.go.store(true, Ordering::SeqCst);
    let r = retrier.join().unwrap();
    assert!(r.is_err(), "nothing to fall back on after the write: {r:?}");
    assert_eq!(c.get(&1), want);
    assert_eq!(c.get_or_stale(&1), want, "never the pre-write value");
    if let Some(v) = want {
        assert_eq!(c.load(1).unwrap(), v);
    } else {
        let r = c.load(1);
        assert!(
            r.as_ref().map_or(true, |v| *v != 101),
            "stale after invalidate: {r:?}"
        );
    }
}

#[test]
fn insert_during_failing_fail_safe_retry_wins() {
    write_during_failing_retry(|c| c.insert(1, 7), Some(7));
}

#[test]
fn invalidate_during_failing_fail_safe_retry_wins() {
    write_during_failing_retry(|c| c.invalidate(&1), None);
}

#[test]
fn invalidate_all_during_failing_fail_safe_retry_wins() {
    write_during_failing_retry(|c| c.invalidate_all(), None);
}

#[test]
fn remove_during_failing_fail_safe_retry_wins() {
    write_during_failing_retry(
        |c| {
            assert_eq!(c.remove(&1), None, "an expired value is not returned");
        },
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// Spawner faults meeting fail-safe.
// ---------------------------------------------------------------------------------------------

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

/// TTL 60, refresh_after 10, fail-safe 600, backoff 30; refresh jobs parked in `jobs`.
fn parked_fs_cache(clock: &ManualClock, b: &Backend, jobs: &Jobs) -> Cache<u64, u64> {
    let (bb, cl, q) = (b.clone(), clock.clone(), Arc::clone(jobs));
    Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .refresh_after(secs(10))
        .fail_safe(secs(600))
        .refresh_backoff(secs(30))
        .clock(clock.clone())
        .record_stats()
        .spawner(move |job| q.lock().unwrap().push(job))
        .loader(move |_k: &u64| bb.call(&cl))
        .build()
}

/// A refresh job parked past the value's TTL is then dropped by the spawner, unrun (the
/// backend was never asked, and is healthy). "A spawner that ... drops a job without running
/// it, never leaves a key loading"; fail-safe: "Until a load fails, the key behaves as
/// without fail-safe: the first caller after the deadline loads it". Debatable: the fail-safe
/// list of failures includes "an abandoned async leader".
#[test]
fn refresh_job_dropped_after_expiry_is_not_a_failed_load() {
    let _w = watchdog(secs(10), "dropped job after expiry");
    let clock = start_clock();
    let b = Backend::default();
    let jobs: Jobs = Arc::default();
    let c = parked_fs_cache(&clock, &b, &jobs);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(101));
    assert_eq!(jobs.lock().unwrap().len(), 1);
    clock.advance(secs(50)); // expired while the job waits
    jobs.lock().unwrap().clear(); // dropped unrun
    let (v, d) = load_counted(&c, 1);
    assert_eq!(
        (v, b.calls(), d.stale_served_after_ttl),
        (102, 2, 0),
        "no load failed: the healthy backend is asked"
    );
}

/// Control / pin: a parked refresh job dropped while the value is live is retried after the
/// backoff and then refreshes.
#[test]
fn refresh_job_dropped_while_live_is_retried_after_backoff() {
    let _w = watchdog(secs(10), "dropped job live");
    let clock = start_clock();
    let b = Backend::default();
    let jobs: Jobs = Arc::default();
    let c = parked_fs_cache(&clock, &b, &jobs);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(101));
    jobs.lock().unwrap().clear();
    assert_eq!(c.get(&1), Some(101));
    assert!(
        jobs.lock().unwrap().is_empty(),
        "within the backoff: no new refresh"
    );
    clock.advance(secs(30));
    assert_eq!(c.get(&1), Some(101));
    let job = jobs
        .lock()
        .unwrap()
        .pop()
        .expect("a refresh after the backoff");
    job();
    assert_eq!(c.get(&1), Some(102));
    let s = c.stats();
    assert_eq!(
        (
            s.refreshes_started,
            s.refreshes_succeeded,
            s.refreshes_failed
        ),
        (2, 1, 1)
    );
}

/// A parked refresh job runs after an `insert` of the key and a later refresh claim: the
/// late job must not overwrite the newer write, and the newer claim still refreshes.
#[test]
fn late_refresh_job_after_insert_and_new_claim() {
    let _w = watchdog(secs(10), "late job");
    let clock = start_clock();
    let b = Backend::default();
    let jobs: Jobs = Arc::default();
    let c = parked_fs_cache(&clock, &b, &jobs);
    assert_eq!(c.load(1).unwrap(), 101);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(101));
    let old = jobs.lock().unwrap().pop().unwrap();
    c.insert(1, 7);
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(7));
    let new = jobs.lock().unwrap().pop().expect("the new value's refresh");
    old();
    assert_eq!(c.get(&1), Some(7), "the late job lost to the insert");
    new();
    assert_eq!(c.get(&1), Some(103), "the newer claim's refresh stores");
    clock.advance(secs(11));
    assert_eq!(c.get(&1), Some(103));
    assert_eq!(jobs.lock().unwrap().len(), 1, "and the key refreshes again");
    // A parked job holds the cache, and the cache's spawner holds the queue: drop the job to
    // break the cycle (else the cache leaks, as the builder's `spawner` docs say).
    jobs.lock().unwrap().clear();
}

/// Pin: a fail-safe retry that succeeds replaces the stale entry; the eviction listener panics
/// on the replaced (expired) value. The panic goes to the retrier ("resumed in that
/// operation's caller"), but the new value is stored and the key is not left in backoff.
#[test]
fn listener_panic_on_successful_fail_safe_retry_keeps_the_new_value() {
    let _w = watchdog(secs(10), "listener retry");
    let clock = start_clock();
    let b = Backend::default();
    let (bb, cl) = (b.clone(), clock.clone());
    let boom = Arc::new(AtomicBool::new(false));
    let bo = Arc::clone(&boom);
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(secs(60))
        .fail_safe(secs(600))
        .refresh_backoff(secs(30))
        .clock(clock.clone())
        .eviction_listener(move |_k, _v, _c| {
            if bo.load(Ordering::SeqCst) {
                panic!("listener");
            }
        })
        .loader(move |_k: &u64| bb.call(&cl))
        .build();
    assert_eq!(c.load(1).unwrap(), 101);
    b.set_down(true);
    clock.advance(secs(61));
    assert_eq!(c.load(1).unwrap(), 101);
    b.set_down(false);
    clock.advance(secs(31));
    boom.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.load(1)));
    boom.store(false, Ordering::SeqCst);
    assert!(r.is_err(), "the listener's panic reaches the retrier");
    assert_eq!(c.get(&1), Some(103), "the retry's value is stored");
    assert_eq!(c.load(1).unwrap(), 103);
    assert_eq!(b.calls(), 3);
}
