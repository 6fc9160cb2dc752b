//! What the crate does with a panic of user code it caught and does not resume: the payload
//! is user data too, and its `Drop` may panic again (with a payload whose `Drop` panics…).
//! Dropped as is, such a payload would unwind out of the spot that caught the first panic —
//! a subscriber's or a worker's loop, code under a shard lock, a guard's cleanup — which is
//! exactly what catching it was for. [`discard`] drops it with each further panic caught;
//! [`keep_first`] keeps the first of several panics (the one resumed later) and discards the
//! rest.
//!
//! A leaf: it depends on nothing in the crate.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A caught panic's payload.
pub(crate) type Panic = Box<dyn Any + Send>;

/// How many payloads in a row [`discard`] drops (each the panic of the last one's `Drop`)
/// before it leaks the next one instead.
const DROPS: usize = 8;

/// Drops a caught panic's payload, catching any panic its `Drop` raises and dropping that
/// payload the same way; after [`DROPS`] payloads in a row whose `Drop` panicked, the next one
/// is leaked (a `Drop` that always panics would otherwise never end).
pub(crate) fn discard(p: Panic) {
    let mut p = p;
    for _ in 0..DROPS {
        match catch_unwind(AssertUnwindSafe(move || drop(p))) {
            Ok(()) => return,
            Err(next) => p = next,
        }
    }
    std::mem::forget(p);
}

/// Keeps the first panic caught: `p` goes into `first` if it is empty, and is [`discard`]ed
/// otherwise.
pub(crate) fn keep_first(first: &mut Option<Panic>, p: Panic) {
    if first.is_some() {
        discard(p);
    } else {
        *first = Some(p);
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
    fn a_payload_whose_drop_always_panics_is_leaked_after_a_bound() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        discard(Box::new(Bomb(usize::MAX, &DROPPED)));
        assert_eq!(DROPPED.load(Ordering::SeqCst), DROPS);
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
}
