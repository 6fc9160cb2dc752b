//! What the crate does with a panic of user code it caught and does not resume: the payload
//! is user data too, and its `Drop` may panic again (with a payload whose `Drop` panics…).
//! Dropped as is, such a payload would unwind out of the spot that caught the first panic —
//! a subscriber's or a worker's loop, code under a shard lock, a guard's cleanup — which is
//! exactly what catching it was for. [`discard`] drops it with each further panic caught.
//!
//! Under a shard lock, not even that: a payload's `Drop` is user code, which must not run under
//! the lock. [`keep_first_locked`] keeps the first of several panics (the one resumed later)
//! and [`later`] sets the others aside, on the thread that caught them; [`discard_later`]
//! discards them, and is called where no shard lock is held: when a [`Removals`] drops (every
//! write's removals drop after its lock, with the keys and values they hold) and after the
//! critical sections that end a flight.
//!
//! [`Removals`]: crate::removal::Removals
//!
//! A leaf: it depends on nothing in the crate.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A caught panic's payload.
pub(crate) type Panic = Box<dyn Any + Send>;

/// How many payloads in a row [`discard`] drops (each the panic of the last one's `Drop`)
/// before it leaks the next one instead.
const DROPS: usize = 8;

/// Drops a caught panic's payload, catching any panic its `Drop` raises and dropping that
/// payload the same way; after [`DROPS`] payloads in a row whose `Drop` panicked, the next one
/// is kept for good (a `Drop` that always panics would otherwise never end).
pub(crate) fn discard(p: Panic) {
    let mut p = p;
    for _ in 0..DROPS {
        match catch_unwind(AssertUnwindSafe(move || drop(p))) {
            Ok(()) => return,
            Err(next) => p = next,
        }
    }
    keep_for_good(p);
}

/// Drops `v` (user data: a key, a value, an error, a payload), its `Drop`'s panics
/// [`discard`]ed.
pub(crate) fn drop_quietly<T>(v: T) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(move || drop(v))) {
        discard(p);
    }
}

/// Drops `v` (user data), keeping its `Drop`'s panic in `first` as [`keep_first`] does: for
/// code that completes its work before it resumes the first panic met. Not under a shard lock.
pub(crate) fn drop_keeping_first<T>(v: T, first: &mut Option<Panic>) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(move || drop(v))) {
        keep_first(first, p);
    }
}

/// A value whose `Drop` is user code (a key, a replaced negative entry's error), dropped
/// where the holder ends: normally, its panic going on; while a panic unwinds, with a panic of
/// it discarded (a second one would abort the process) and the first going on.
pub(crate) struct DropLater<T>(pub(crate) Option<T>);

impl<T> DropLater<T> {
    /// The value, for a caller that drops it itself.
    pub(crate) fn take(&mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T> Drop for DropLater<T> {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            if std::thread::panicking() {
                drop_quietly(v);
            } else {
                drop(v);
            }
        }
    }
}

/// Payloads never dropped: held here, not forgotten, so that they are not a leak (for a leak
/// checker either), only memory kept.
static KEPT: parking_lot::Mutex<Vec<Panic>> = parking_lot::Mutex::new(Vec::new());

/// Keeps a payload that must not be dropped (its `Drop` is not to be run) until the process
/// ends.
fn keep_for_good(p: Panic) {
    KEPT.lock().push(p);
}

/// Keeps the first panic caught: `p` goes into `first` if it is empty, and is [`discard`]ed
/// otherwise. Not under a shard lock: see [`keep_first_locked`].
pub(crate) fn keep_first(first: &mut Option<Panic>, p: Panic) {
    if first.is_some() {
        discard(p);
    } else {
        *first = Some(p);
    }
}

/// [`keep_first`] under a shard lock: a payload not kept is set aside ([`later`]), not
/// discarded. Runs no user code.
pub(crate) fn keep_first_locked(first: &mut Option<Panic>, p: Panic) {
    if first.is_some() {
        later(p);
    } else {
        *first = Some(p);
    }
}

/// Payloads set aside by [`later`], on every thread: a hint that lets [`discard_later`] return
/// at once, with one relaxed load, when there are none (the common case).
static SET_ASIDE: AtomicUsize = AtomicUsize::new(0);

/// The payloads this thread set aside; any left when the thread ends are discarded then.
struct Aside(Vec<Panic>);

impl Drop for Aside {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            SET_ASIDE.fetch_sub(1, Ordering::Relaxed);
            discard(p);
        }
    }
}

std::thread_local! {
    static ASIDE: RefCell<Aside> = const { RefCell::new(Aside(Vec::new())) };
}

/// Sets a caught panic's payload aside, to be discarded by this thread's next
/// [`discard_later`]: no user code runs now (for code under a shard lock). Kept for good if
/// the thread is ending (its thread-locals gone).
pub(crate) fn later(p: Panic) {
    let mut p = Some(p);
    let _ = ASIDE.try_with(|a| {
        if let Ok(mut a) = a.try_borrow_mut() {
            a.0.extend(p.take());
        }
    });
    match p {
        None => {
            SET_ASIDE.fetch_add(1, Ordering::Relaxed);
        }
        Some(p) => keep_for_good(p),
    }
}

/// Discards the payloads this thread set aside ([`later`]). Call only where this thread holds
/// no shard lock.
#[inline]
pub(crate) fn discard_later() {
    if SET_ASIDE.load(Ordering::Relaxed) != 0 {
        discard_set_aside();
    }
}

#[cold]
fn discard_set_aside() {
    // One at a time, the borrow released before each drop: a payload's `Drop` may use the
    // cache, and set another aside.
    while let Some(p) = ASIDE
        .try_with(|a| a.try_borrow_mut().ok().and_then(|mut a| a.0.pop()))
        .ok()
        .flatten()
    {
        SET_ASIDE.fetch_sub(1, Ordering::Relaxed);
        discard(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A payload whose `Drop` panics with another such payload, `self.0` more times.
    struct Bomb(usize, &'static AtomicUsize);

    impl Drop for Bomb {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
            if self.0 > 0 {
                std::panic::panic_any(Bomb(self.0 - 1, self.1));
            }
        }
    }

    #[test]
    fn a_payload_whose_drop_panics_is_dropped_without_unwinding() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        discard(Box::new(Bomb(3, &DROPPED)));
        assert_eq!(
            DROPPED.load(Ordering::SeqCst),
            4,
            "each payload in the chain dropped"
        );
    }

    #[test]
    fn a_payload_whose_drop_always_panics_is_kept_after_a_bound() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        discard(Box::new(Bomb(usize::MAX, &DROPPED)));
        assert_eq!(DROPPED.load(Ordering::SeqCst), DROPS);
    }

    #[test]
    fn keep_first_locked_keeps_the_first_and_sets_the_rest_aside_until_discard_later() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        let mut first = None;
        keep_first_locked(&mut first, Box::new(1u8));
        keep_first_locked(&mut first, Box::new(Bomb(2, &DROPPED)));
        assert_eq!(DROPPED.load(Ordering::SeqCst), 0, "nothing dropped yet");
        discard_later();
        assert_eq!(DROPPED.load(Ordering::SeqCst), 3);
        assert_eq!(
            first.and_then(|p| p.downcast::<u8>().ok()).as_deref(),
            Some(&1)
        );
    }

    #[test]
    fn keep_first_keeps_the_first_and_discards_the_rest() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        let mut first = None;
        keep_first(&mut first, Box::new(1u8));
        keep_first(&mut first, Box::new(Bomb(2, &DROPPED)));
        assert_eq!(DROPPED.load(Ordering::SeqCst), 3);
        assert_eq!(
            first.and_then(|p| p.downcast::<u8>().ok()).as_deref(),
            Some(&1)
        );
    }

    #[test]
    fn payloads_set_aside_by_a_thread_that_ends_are_discarded_then() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        std::thread::spawn(|| later(Box::new(Bomb(1, &DROPPED))))
            .join()
            .expect("the thread ends without a panic");
        assert_eq!(DROPPED.load(Ordering::SeqCst), 2);
    }
}
