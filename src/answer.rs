//! How a call hands back its answer when user code runs after the answer is made.
//!
//! A function's locals are dropped after its return value is built. When one of them runs
//! user code as it drops — a key, an `init` closure (what it captures), a value, a flight
//! holding them — and that `Drop` panics, the language does not drop the return value already
//! built: it leaks (rust-lang/rust#47949). So a call that returns the user's data keeps it a
//! *local* of a frame being unwound until nothing of the user's is left to drop:
//!
//! - a loop with many exits and many such locals keeps them in a block and its answer in a
//!   local declared before that block (`let answer; { ...; answer = loop { ... }; } answer`):
//!   the block's locals drop at its end, and a panic there unwinds with the answer still a
//!   local of the enclosing frame, which drops it. (A thin wrapper holding a slot for the loop
//!   to write into does the same, but repeats the loop's signature, and for an `async fn`
//!   costs a poll frame at every level of nested loads);
//! - a short path drops what is left explicitly first ([`after_dropping`]).

/// Returns `r` once `rest` is dropped: a panic of `rest`'s `Drop` (user code) unwinds with `r`
/// still a local here, so it is dropped, not leaked (see the module docs).
#[inline]
pub(crate) fn after_dropping<R>(rest: impl Sized, r: R) -> R {
    drop(rest);
    r
}
