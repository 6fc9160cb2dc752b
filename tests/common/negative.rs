//! A remembered loader error (negative caching) and checks that it is still remembered, for
//! the tests of the negative-cache entry's lifetime across loads that end without a value.

use super::{ledger_at, neg_cache, quiet_injected_panics};
use herdcache::{BoxError, Cache, LoadError, ManualClock};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A cache with a remembered error for key 1 (see [`neg_cache`]), and its loader's call
/// count (1).
pub fn remembered() -> (ManualClock, Arc<AtomicUsize>, Cache<u32, u32>) {
    quiet_injected_panics();
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = neg_cache(&clock, calls.clone());
    assert!(cache.load(1).is_err());
    (clock, calls, cache)
}

/// Key 1's remembered error still answers, a `load` and an async `try_get_with_async` alike:
/// no new backend call, no init run; the ledger balances.
pub fn still_remembered(calls: &AtomicUsize, cache: &Cache<u32, u32>, what: &str) {
    let r = cache.load(1);
    assert!(matches!(r, Err(LoadError::Loader(_))), "{what}: {r:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "{what}: the negative entry was lost"
    );
    let inits = AtomicUsize::new(0);
    let v = futures::executor::block_on(cache.try_get_with_async(1, async {
        inits.fetch_add(1, Ordering::SeqCst);
        Ok::<u32, BoxError>(3)
    }));
    assert!(v.is_err(), "{what}: try_get_with_async got {v:?}");
    assert_eq!(
        inits.load(Ordering::SeqCst),
        0,
        "{what}: try_get_with_async loaded"
    );
    ledger_at(cache, what);
}
