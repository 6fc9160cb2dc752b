//! The synchronization primitives the cache uses, from one place: `parking_lot` normally, and
//! [loom](https://docs.rs/loom)'s model-checked ones under `--cfg loom` (see
//! `tests/loom_single_flight.rs`). The cache's own code imports locks and atomics shared
//! between threads only from here. Outside it: the Redis tier (`src/redis/`: connection pool,
//! helper threads) uses `parking_lot` directly, being no part of the models; thread-local
//! state that the models must see per model thread uses `thread_local_shim!`; two plain
//! `thread_local!`s hold per-OS-thread state the models do not involve (the statistics stripe,
//! the early-refresh coin).

//! Under `--cfg shuttle` they are [shuttle](https://docs.rs/shuttle)'s instead, for the
//! randomized-schedule test of the whole cache (`tests/shuttle_cache.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::MutexGuard;
#[cfg(not(any(loom, shuttle)))]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
#[cfg(shuttle)]
pub(crate) use shuttle::sync::MutexGuard;
#[cfg(not(any(loom, shuttle)))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};

/// Declares a thread-local that the model checkers (loom, shuttle) treat as per model thread.
macro_rules! thread_local_shim {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(any(loom, shuttle)))]
        std::thread_local! { $(#[$m])* static $name: $t = const { $init }; }
        #[cfg(loom)]
        loom::thread_local! { $(#[$m])* static $name: $t = $init; }
        #[cfg(shuttle)]
        shuttle::thread_local! { $(#[$m])* static $name: $t = $init; }
    };
}
pub(crate) use thread_local_shim;

/// A starting phase in `1..1024` for a per-thread counter that acts every 1024th (or
/// smaller power-of-two) step, so that counts it batches average out over threads instead
/// of all lagging (see `Cache::note_access`). Threads take phases in turn from the golden
/// ratio sequence, spread evenly. Under the model checkers it is always 1: a process-wide
/// counter would make a model's schedule differ between its explorations (loom rejects
/// that), and the phase only spreads a statistical count.
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn thread_phase() -> u32 {
    static THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ((n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32).max(1)
}

/// See the non-model version: a constant here, so the models stay deterministic.
#[cfg(any(loom, shuttle))]
pub(crate) fn thread_phase() -> u32 {
    1
}

/// A uniformly random phase for a per-thread counter that a thread starts again (see
/// `Cache::note_access`: the thread went on to another cache): over the random phases, each
/// step acts with probability one in the period, however the thread's steps alternate.
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn switch_phase() -> u32 {
    crate::rng::random_u32()
}

/// See the non-model version: a constant here, so the models stay deterministic.
#[cfg(any(loom, shuttle))]
pub(crate) fn switch_phase() -> u32 {
    1
}

/// Waits on `cond`, releasing `guard` meanwhile, until notified or until the optional
/// deadline passes; returns the guard re-acquired and whether the deadline passed.
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn wait_until<'a, T>(
    cond: &Condvar,
    mut guard: parking_lot::MutexGuard<'a, T>,
    until: Option<std::time::Instant>,
) -> (parking_lot::MutexGuard<'a, T>, bool) {
    let timed_out = match until {
        Some(t) => cond.wait_until(&mut guard, t).timed_out(),
        None => {
            cond.wait(&mut guard);
            false
        }
    };
    (guard, timed_out)
}

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
#[cfg(loom)]
pub(crate) use loom::sync::Condvar;

/// A `loom` mutex with `parking_lot`'s signature (no poisoning in the API).
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(t: T) -> Self {
        Mutex(loom::sync::Mutex::new(t))
    }
    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().expect("loom mutexes are not poisoned here")
    }
    pub(crate) fn try_lock(&self) -> Option<loom::sync::MutexGuard<'_, T>> {
        self.0.try_lock().ok()
    }
}

#[cfg(loom)]
pub(crate) fn wait<'a, T>(
    cond: &Condvar,
    guard: loom::sync::MutexGuard<'a, T>,
) -> loom::sync::MutexGuard<'a, T> {
    cond.wait(guard)
        .expect("loom mutexes are not poisoned here")
}

/// Under loom, time is not modelled; a deadline is modelled as passing at the waiter's next
/// wake-up: a wait with a deadline waits for a notification and reports a timeout. So a model
/// explores a timeout racing whatever the notifier did just before it (a permit granted, a
/// load published), which is the race that matters. Without a deadline the wait is plain.
#[cfg(loom)]
pub(crate) fn wait_until<'a, T>(
    cond: &Condvar,
    guard: loom::sync::MutexGuard<'a, T>,
    until: Option<std::time::Instant>,
) -> (loom::sync::MutexGuard<'a, T>, bool) {
    (wait(cond, guard), until.is_some())
}

/// A `loom` read-write lock with `parking_lot`'s signature.
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct RwLock<T>(loom::sync::RwLock<T>);

#[cfg(loom)]
impl<T> RwLock<T> {
    pub(crate) fn new(t: T) -> Self {
        RwLock(loom::sync::RwLock::new(t))
    }
    pub(crate) fn read(&self) -> loom::sync::RwLockReadGuard<'_, T> {
        self.0.read().expect("not poisoned")
    }
    pub(crate) fn write(&self) -> loom::sync::RwLockWriteGuard<'_, T> {
        self.0.write().expect("not poisoned")
    }
    pub(crate) fn try_write(&self) -> Option<loom::sync::RwLockWriteGuard<'_, T>> {
        self.0.try_write().ok()
    }
    pub(crate) fn try_read(&self) -> Option<loom::sync::RwLockReadGuard<'_, T>> {
        self.0.try_read().ok()
    }
}

#[cfg(shuttle)]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
#[cfg(shuttle)]
pub(crate) use shuttle::sync::Condvar;

/// A `shuttle` mutex with `parking_lot`'s signature (no poisoning in the API).
#[cfg(shuttle)]
#[derive(Debug)]
pub(crate) struct Mutex<T>(shuttle::sync::Mutex<T>);

#[cfg(shuttle)]
impl<T> Mutex<T> {
    pub(crate) fn new(t: T) -> Self {
        Mutex(shuttle::sync::Mutex::new(t))
    }
    pub(crate) fn lock(&self) -> shuttle::sync::MutexGuard<'_, T> {
        self.0
            .lock()
            .expect("shuttle mutexes are not poisoned here")
    }
    pub(crate) fn try_lock(&self) -> Option<shuttle::sync::MutexGuard<'_, T>> {
        self.0.try_lock().ok()
    }
}

#[cfg(shuttle)]
pub(crate) fn wait<'a, T>(
    cond: &Condvar,
    guard: shuttle::sync::MutexGuard<'a, T>,
) -> shuttle::sync::MutexGuard<'a, T> {
    cond.wait(guard)
        .expect("shuttle mutexes are not poisoned here")
}

/// Under shuttle, deadlines are not modelled: waits are untimed.
#[cfg(shuttle)]
pub(crate) fn wait_until<'a, T>(
    cond: &Condvar,
    guard: shuttle::sync::MutexGuard<'a, T>,
    _until: Option<std::time::Instant>,
) -> (shuttle::sync::MutexGuard<'a, T>, bool) {
    (wait(cond, guard), false)
}

/// A `shuttle` read-write lock with `parking_lot`'s signature.
#[cfg(shuttle)]
#[derive(Debug)]
pub(crate) struct RwLock<T>(shuttle::sync::RwLock<T>);

#[cfg(shuttle)]
impl<T> RwLock<T> {
    pub(crate) fn new(t: T) -> Self {
        RwLock(shuttle::sync::RwLock::new(t))
    }
    pub(crate) fn read(&self) -> shuttle::sync::RwLockReadGuard<'_, T> {
        self.0.read().expect("not poisoned")
    }
    pub(crate) fn write(&self) -> shuttle::sync::RwLockWriteGuard<'_, T> {
        self.0.write().expect("not poisoned")
    }
    pub(crate) fn try_write(&self) -> Option<shuttle::sync::RwLockWriteGuard<'_, T>> {
        self.0.try_write().ok()
    }
    pub(crate) fn try_read(&self) -> Option<shuttle::sync::RwLockReadGuard<'_, T>> {
        self.0.try_read().ok()
    }
}
