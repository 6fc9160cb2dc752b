//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod hand;
pub mod heap;
pub mod key_drop;
pub mod moka;
pub mod negative;
pub mod routed;
pub mod seeded;
#[cfg(feature = "redis")]
pub mod tier;
pub mod warnings;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Live instances of [`Counted`], across the whole test binary.
pub static LIVE: AtomicI64 = AtomicI64::new(0);

/// Tests that read [`LIVE`] hold this lock so that they do not see each other's values.
pub static LIVE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Locks [`LIVE_LOCK`], ignoring poisoning by an earlier failed test.
pub fn live_lock() -> std::sync::MutexGuard<'static, ()> {
    LIVE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value that counts its live instances (clones included).
#[derive(Debug, PartialEq, Eq)]
pub struct Counted(pub u64);

impl Counted {
    pub fn new(v: u64) -> Self {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Counted(v)
    }
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        Counted::new(self.0)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the process (failing the test run) if not dropped within `limit`: a deadlock or a
/// stranded waiter then fails CI instead of hanging it.
pub struct Watchdog(Option<mpsc::Sender<()>>);

///
/// `HERDCACHE_TEST_SLOWDOWN=N` multiplies `limit` by `N` (CI's AddressSanitizer step, where the
/// CPU-bound sweeps run several times slower): a hang is still caught, later.
pub fn watchdog(limit: Duration, what: &'static str) -> Watchdog {
    let slowdown = std::env::var("HERDCACHE_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let limit = limit * slowdown;
    record_panics();
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to the process's stderr: libtest captures `eprintln!` in the test's
            // threads (and threads they spawn), and an abort would drop that capture unread.
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "watchdog: '{what}' did not finish within {limit:?}: deadlock or hang"
            );
            // A test thread that panicked (a failed assertion) while threads it spawned in a
            // scope still run waits for them forever: its message, captured, would be lost.
            let seen = PANICS.lock().unwrap_or_else(|e| e.into_inner());
            if !seen.is_empty() {
                let _ = writeln!(
                    err,
                    "watchdog: the last {} panics in this binary, oldest first (the cause may \
                     be among them):",
                    seen.len()
                );
                for p in seen.iter() {
                    let _ = writeln!(err, "  {p}");
                }
            }
            std::process::abort();
        }
    });
    Watchdog(Some(tx))
}

/// The last [`KEPT_PANICS`] panics of this binary (thread, place, message), for the watchdog.
static PANICS: std::sync::Mutex<std::collections::VecDeque<String>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const KEPT_PANICS: usize = 16;

/// Chains a panic hook that keeps each panic's thread, place and message in [`PANICS`].
fn record_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let line = format!(
                "thread '{}' at {}: {}",
                std::thread::current().name().unwrap_or("<unnamed>"),
                info.location()
                    .map_or_else(String::new, ToString::to_string),
                panic_message(info.payload())
            );
            if let Ok(mut seen) = PANICS.lock() {
                if seen.len() == KEPT_PANICS {
                    seen.pop_front();
                }
                seen.push_back(line);
            }
            prev(info);
        }));
    });
}

/// Sets `flag` when dropped: a scope's main closure that fails an assertion still stops the
/// threads it spawned (which loop until the flag is set), so the failure is reported instead
/// of hanging until the watchdog.
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A future that is pending `n` times (waking itself each time), then ready.
pub struct Yield(pub u32);

impl Future for Yield {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Waits (at most 10 s, polling every 5 ms) until `cond` holds; false if it never did. For
/// conditions another thread brings about (a message applied, a thread gone), not for expiry.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// A gate a loader blocks on until opened; says when the loader entered.
#[derive(Default)]
pub struct Gate {
    /// Whether a loader has entered.
    pub entered: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gate {
    pub fn new() -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate::default())
    }
    /// Marks the loader entered and blocks until [`open`](Self::open).
    pub fn pass(&self) {
        self.entered.store(true, Ordering::SeqCst);
        let mut g = self.open.lock().unwrap();
        while !*g {
            g = self.cv.wait(g).unwrap();
        }
    }
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
    /// Closes it again: loaders that pass from now on block.
    pub fn close(&self) {
        *self.open.lock().unwrap() = false;
    }
    /// Waits (see [`eventually`]) until a loader entered; panics if none did.
    pub fn wait_entered(&self) {
        assert!(
            eventually(|| self.entered.load(Ordering::SeqCst)),
            "loader never ran"
        );
    }
}

/// Runs `f` on a new thread and waits at most `limit` for it. `None`: it did not finish (the
/// thread is left behind, blocked: a hang is reported as a failure instead of stalling the test
/// binary). `Some(Err(_))`: it panicked; `Some(Ok(v))`: it returned `v`.
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<std::thread::Result<T>> {
    start(f).wait(limit)
}

/// Runs `f` on its own thread and returns what it returns; panics if it has not finished
/// within `secs` (a hang watchdog, not a timing assertion) and passes on its panic.
pub fn finish_within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    match within(Duration::from_secs(secs), f) {
        Some(Ok(v)) => v,
        Some(Err(p)) => std::panic::resume_unwind(p),
        None => panic!("watchdog: body did not finish within {secs} s"),
    }
}

/// A call running on its own thread (see [`start`]).
pub struct Started<T>(mpsc::Receiver<std::thread::Result<T>>);

/// Starts `f` on a new thread; [`Started::wait`] collects its result with a deadline.
pub fn start<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Started<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    Started(rx)
}

impl<T> Started<T> {
    /// Waits at most `limit`; `None` if the call has not finished by then (its thread is left
    /// behind).
    pub fn wait(self, limit: Duration) -> Option<std::thread::Result<T>> {
        self.0.recv_timeout(limit).ok()
    }
}

/// The message of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(b) = p.downcast_ref::<Bomb>() {
        format!(
            "injected: a payload whose drop panics {} more times",
            b.0 + 1
        )
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// A panic payload whose `Drop` panics again with a `Bomb` of one less, down to `Bomb(0)`,
/// whose `Drop` panics with a plain message: `Bomb(n)` raises `n + 1` panics as it drops.
/// For the faults a test plants: their payloads are user data too.
pub struct Bomb(pub u32);

impl Drop for Bomb {
    fn drop(&mut self) {
        match self.0 {
            0 => std::panic::panic_any("injected: the last drop of a payload"),
            n => std::panic::panic_any(Bomb(n - 1)),
        }
    }
}

/// Drops a caught panic's payload that may be a [`Bomb`] (or any payload whose `Drop`
/// panics): each further panic is caught and its payload dropped the same way, up to 16; the
/// test's own handling of a payload must not be what fails it.
pub fn discard(p: Box<dyn std::any::Any + Send>) {
    let mut p = p;
    for _ in 0..16 {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(p))) {
            Ok(()) => return,
            Err(next) => p = next,
        }
    }
    std::mem::forget(p);
}

/// Installs (once) a panic hook that stays silent for panics whose message contains
/// `"injected"` (faults a test plants on purpose) and prints every other panic as usual.
pub fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = panic_message(info.payload());
            if !msg.contains("injected") {
                default(info);
            }
        }));
    });
}

/// A seeded xorshift64 source of pseudo-random numbers for tests (never use a zero seed).
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A splitmix64 generator (no dependency), for seeded random drivers: every seed, 0
/// included, gives a full-period stream.
#[derive(Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A xorshift generator (no dependency), for tests' pseudo-random workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Which share of an exhaustive sweep's cases a run takes: every case, unless
/// `HERDCACHE_TEST_PART=N` (N ≥ 2) is set; then every N-th case, from an offset that rotates
/// with the clock (printed; `HERDCACHE_TEST_PART_AT=k` fixes it), and the time-bounded sweeps
/// get an N-th of their time. CI runs the whole suite twice (README's two test commands); the
/// second run, `--all-features`, takes a sixth of the slowest sweeps, which the first ran in
/// full (the features add the Redis tier, metrics and serde, none of which these sweeps use).
pub struct Part {
    n: u64,
    at: u64,
}

impl Part {
    pub fn new(what: &str) -> Part {
        let n = std::env::var("HERDCACHE_TEST_PART")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1)
            .max(1);
        let at = env_or_clock("HERDCACHE_TEST_PART_AT") % n;
        if n > 1 {
            eprintln!(
                "{what}: part HERDCACHE_TEST_PART_AT={at} of {n} (unset HERDCACHE_TEST_PART: all)"
            );
        }
        Part { n, at }
    }

    /// Whether this run takes case `i` (cases numbered in a fixed order).
    pub fn take(&self, i: u64) -> bool {
        i % self.n == self.at
    }

    /// `d` shortened to this run's share.
    pub fn of(&self, d: Duration) -> Duration {
        d / self.n as u32
    }

    /// `count` cases shortened to this run's share (at least one).
    pub fn count(&self, count: u64) -> u64 {
        (count / self.n).max(1)
    }
}

/// The number in environment variable `var`, else the clock's seconds: where a sweep that
/// takes part of its cases starts, fixed by the variable or rotating from run to run.
pub fn env_or_clock(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
}

/// The statistics' ledger balances (every miss is a load, a join or a negative hit) and
/// nothing is left in flight; `validate()` holds.
pub fn ledger<K, V>(cache: &herdcache::Cache<K, V>)
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    ledger_at(cache, "ledger");
}

/// [`ledger`], its failures labelled `what`.
pub fn ledger_at<K, V>(cache: &herdcache::Cache<K, V>, what: &str)
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let s = cache.stats();
    assert_eq!(
        s.misses + s.refreshes_started,
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits,
        "{what}: ledger: {s:?}"
    );
    assert_eq!(s.loads_in_flight, 0, "{what}: {s:?}");
    assert_eq!(cache.loads_in_flight(), 0, "{what}: loads in flight");
    cache.validate();
}

/// A cache whose loader always fails (counting its calls in `calls`), remembering the failure
/// for 10 s of `clock` (`negative_ttl`), with statistics.
pub fn neg_cache(
    clock: &herdcache::ManualClock,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> herdcache::Cache<u32, u32> {
    herdcache::Cache::builder()
        .max_capacity(100)
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .record_stats()
        .loader(move |_k: &u32| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err::<u32, _>(herdcache::BoxError::from("down"))
        })
        .build()
}
