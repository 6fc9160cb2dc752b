//! How a call hands back its answer when user code runs after the answer is made.
//!
//! A function's locals are dropped after its return value is built. When one of them runs
//! user code as it drops — a key, an `init` closure (what it captures), a value, a flight
//! holding them — and that `Drop` panics, the language does not drop the return value already
//! built: it leaks (rust-lang/rust#47949). So a call that returns the user's data keeps it a
//! *local* of a frame being unwound until nothing of the user's is left to drop:
//!
//! - a loop with many exits and many such locals writes its answer into a slot owned by its
//!   caller ([`Slot`]) and returns; the caller, a thin wrapper whose only local is the slot,
//!   then returns what the slot holds. A panic while the loop's locals drop unwinds through
//!   the wrapper, which drops the slot, and the answer with it. An `async fn` does the same
//!   within one body instead — its answer a local declared before the block that holds the
//!   rest — because a wrapper future costs a poll frame at every level of nested loads;
//! - a short path drops what is left explicitly first ([`after_dropping`]).

/// Where a call's answer waits while the call's own locals drop: see the module docs.
pub(crate) type Slot<R> = Option<R>;

/// Returns `r` once `rest` is dropped: a panic of `rest`'s `Drop` (user code) unwinds with `r`
/// still a local here, so it is dropped, not leaked (see the module docs).
#[inline]
pub(crate) fn after_dropping<R>(rest: impl Sized, r: R) -> R {
    drop(rest);
    r
}
