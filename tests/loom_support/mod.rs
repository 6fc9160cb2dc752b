//! Helpers shared by the loom models.

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Pending once (waking itself), then ready with 10, counting its completions: a load that can
/// be cancelled, or driven by another caller, between its two polls.
pub struct YieldOnce(pub bool, pub Arc<AtomicUsize>);

impl Future for YieldOnce {
    type Output = u32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
        if self.0 {
            self.1.fetch_add(1, Ordering::SeqCst);
            return Poll::Ready(10);
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
