//! The invalidation subscriber: one thread per tiered cache that listens on the namespace's
//! channel and drops the local copies other instances invalidated. It reconnects by itself
//! (backing off from 50 ms to 1 s), checks with a PING after a second without messages that
//! the connection still delivers (reconnecting if not), and exits within 100 ms of the cache
//! being dropped.

use super::tier::{parse_message, Tier, MSG_ALL, MSG_KEY};
use crate::cache::{Cache, Inner};
use crate::unwind::{discard, drop_quietly};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often a blocked read wakes to see whether the cache is gone.
const POLL: Duration = Duration::from_millis(100);
/// After this long without a message, the subscriber checks that the connection still
/// delivers: a PING must be answered within [`PONG_WAIT`], else it reconnects. A connection
/// that silently stopped delivering (a dropped NAT entry, a failover) is so detected within
/// about two seconds instead of never.
const PING_EVERY: Duration = Duration::from_secs(1);
const PONG_WAIT: Duration = Duration::from_secs(1);

pub(crate) fn spawn<K, V, S>(
    cache: &Cache<K, V, S>,
    tier: Arc<Tier<K, V>>,
    clear_on_reconnect: bool,
) -> std::io::Result<()>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    let weak = Arc::downgrade(&cache.inner);
    std::thread::Builder::new()
        .name("herdcache-invalidations".into())
        .spawn(move || {
            // Nothing is meant to escape `run` (user code it calls runs under `catch_unwind`);
            // were anything to, its payload must not become the thread's result, whose drop
            // by the runtime aborts the process if the payload's `Drop` panics.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&weak, &tier, clear_on_reconnect)
            })) {
                discard(p);
            }
        })
        .map(drop)
}

fn run<K, V, S>(cache: &Weak<Inner<K, V, S>>, tier: &Tier<K, V>, clear_on_reconnect: bool)
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    // However this loop ends — a panic that escaped included — the tier no longer says it is
    // subscribed.
    let _deaf = Deaf(tier);
    let mut backoff = Duration::from_millis(50);
    // Which node to try (a cluster's nodes in turn, so that one node down does not stop it).
    let mut attempt = 0usize;
    while cache.strong_count() > 0 {
        let mut conn = match tier.client.connect(attempt, Some(POLL)) {
            Ok(c) => c,
            Err(_) => {
                attempt = attempt.wrapping_add(1);
                sleep_while_alive(cache, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let mut sub = conn.as_pubsub();
        if sub.subscribe(&tier.channel).is_err() {
            attempt = attempt.wrapping_add(1);
            drop(sub);
            sleep_while_alive(cache, backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        }
        backoff = Duration::from_millis(50);
        tier.subscribed.store(true, Ordering::Release);
        tier.counters().add(|c| &c.subscriber_connects);
        if clear_on_reconnect {
            // Messages may have been missed while disconnected — and before the first
            // subscription too: the cache is built, and may load values, before it takes
            // effect (a slow first connection is no different from a failed one).
            // User code runs here (the eviction listener, the values' `Drop`): a panic of it
            // must not end the subscriber (the clear itself completes first).
            // Before the clear, as for an announced invalidate-all: an `insert` whose local
            // copy lands after it (its Redis write made before a write it may have missed)
            // drops it.
            if let Some(inner) = cache.upgrade() {
                tier.heard_all();
                let cleared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Cache { inner }.invalidate_all();
                }));
                if let Err(p) = cleared {
                    tier.counters().add(|c| &c.errors);
                    discard(p);
                }
            }
        }
        let mut heard = Instant::now();
        loop {
            match sub.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    let Some(inner) = cache.upgrade() else { break };
                    // User code runs here (the key's codec, `Hash`, `Eq`, `Drop`, the
                    // eviction listener): a panic must not end the subscriber, which would
                    // go on saying it is subscribed while it hears nothing.
                    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        apply(&Cache { inner }, tier, msg.get_payload_bytes());
                    }));
                    if let Err(p) = applied {
                        tier.counters().add(|c| &c.errors);
                        discard(p);
                    }
                }
                Err(e) if e.is_timeout() => {
                    if cache.strong_count() == 0 {
                        break;
                    }
                    if heard.elapsed() >= PING_EVERY {
                        // Messages that arrive before the pong are kept for `get_message`.
                        let _ = sub.set_read_timeout(Some(PONG_WAIT));
                        let alive = sub.ping::<::redis::Value>().is_ok();
                        let _ = sub.set_read_timeout(Some(POLL));
                        if !alive {
                            tier.counters().add(|c| &c.timeouts);
                            break;
                        }
                        heard = Instant::now();
                    }
                }
                Err(_) => break,
            }
        }
        tier.subscribed.store(false, Ordering::Release);
        attempt = attempt.wrapping_add(1);
    }
}

/// Clears the tier's `subscribed` flag when dropped.
struct Deaf<'a, K, V>(&'a Tier<K, V>);

impl<K, V> Drop for Deaf<'_, K, V> {
    fn drop(&mut self) {
        self.0.subscribed.store(false, Ordering::Release);
    }
}

/// Applies one message from the channel to the local tier.
fn apply<K, V, S>(cache: &Cache<K, V, S>, tier: &Tier<K, V>, payload: &[u8])
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    let Some((kind, origin, version, key)) = parse_message(payload) else {
        tier.counters().add(|c| &c.errors);
        return;
    };
    if origin == tier.origin {
        return;
    }
    match kind {
        // A message older than our own write of the key does not drop our (newer) copy: it is
        // not applied (nor counted).
        MSG_KEY if !tier.announced(key, version) => return,
        MSG_KEY => {
            let decoded =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tier.decode_key(key)));
            // The codec's error or panic payload is user data, dropped (its panics caught)
            // before anything else runs: held across the `invalidate_all` below, it would be
            // dropped while a panic of the eviction listener unwinds, a second panic that
            // aborts the process.
            let k = match decoded {
                Ok(Ok(k)) => Some(k),
                Ok(Err(e)) => {
                    drop_quietly(e);
                    None
                }
                Err(p) => {
                    discard(p);
                    None
                }
            };
            match k {
                Some(k) => cache.invalidate(&k),
                // A key we cannot decode (an error, or a panic of the codec) could be any
                // key: drop them all rather than keep a stale one.
                None => {
                    tier.counters().add(|c| &c.errors);
                    tier.heard_all();
                    cache.invalidate_all();
                }
            }
        }
        MSG_ALL => {
            // Before the local clear: an `insert` whose copy lands after it drops it.
            tier.heard_all();
            cache.invalidate_all();
        }
        _ => {
            tier.counters().add(|c| &c.errors);
            return;
        }
    }
    tier.counters().add(|c| &c.invalidations_received);
}

fn sleep_while_alive<T>(cache: &Weak<T>, total: Duration) {
    let mut left = total;
    while !left.is_zero() && cache.strong_count() > 0 {
        let step = left.min(POLL);
        std::thread::sleep(step);
        left -= step;
    }
}
