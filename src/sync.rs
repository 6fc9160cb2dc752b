//! The synchronization primitives the cache uses, from one place: `parking_lot` normally, and
//! [loom](https://docs.rs/loom)'s model-checked ones under `--cfg loom` (see
//! `tests/loom_single_flight.rs`). Code elsewhere imports locks only from here.

#[cfg(not(loom))]
pub(crate) use parking_lot::{Condvar, Mutex, RwLock};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};

/// Waits on `cond`, releasing `guard` meanwhile, and returns the guard re-acquired.
#[cfg(not(loom))]
pub(crate) fn wait<'a, T>(
    cond: &Condvar,
    mut guard: parking_lot::MutexGuard<'a, T>,
) -> parking_lot::MutexGuard<'a, T> {
    cond.wait(&mut guard);
    guard
}

/// [`wait`] with an optional deadline; also returns whether the deadline passed.
#[cfg(not(loom))]
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
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64};
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
}

#[cfg(loom)]
pub(crate) fn wait<'a, T>(
    cond: &Condvar,
    guard: loom::sync::MutexGuard<'a, T>,
) -> loom::sync::MutexGuard<'a, T> {
    cond.wait(guard)
        .expect("loom mutexes are not poisoned here")
}

/// Under loom, deadlines are not modelled: waits are untimed.
#[cfg(loom)]
pub(crate) fn wait_until<'a, T>(
    cond: &Condvar,
    guard: loom::sync::MutexGuard<'a, T>,
    _until: Option<std::time::Instant>,
) -> (loom::sync::MutexGuard<'a, T>, bool) {
    (wait(cond, guard), false)
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
}
