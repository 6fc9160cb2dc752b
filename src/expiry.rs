//! Expiry: how deadlines are computed, and the timer wheel that reclaims expired entries.
//!
//! A deadline is a `u64` of nanoseconds on the cache's clock ([`crate::clock`]); [`NEVER`] means
//! none. Reads compare deadlines exactly, so an expired entry is never returned. *Reclaiming*
//! memory is separate: each shard keeps a hierarchical timer wheel, advanced by ordinary writes
//! (and every so often by reads), that finds entries whose deadline passed even if nobody touches
//! them again. No background thread exists.
//!
//! The wheel is *lazy*: an entry is filed under the bucket of its deadline at the time of filing.
//! When a bucket's time comes, each entry in it is checked against its current deadline: expired
//! ones are removed, the others (their idle deadline moved on, say) are filed again. Removal of an
//! entry does not search its bucket; a stale index is skipped when its bucket is drained, and a
//! bucket whose stale indices outnumber its live ones is compacted, so memory stays proportional
//! to live entries.

use crate::clock::{deadline, nanos, NEVER};
use crate::sync::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Per-entry expiration, decided by you (as moka's `Expiry`).
///
/// Each method returns how long from *now* the entry may live; `None` means it never expires.
/// Use it with [`CacheBuilder::expire_after`](crate::CacheBuilder::expire_after).
///
/// The methods run while the entry's shard is locked (like `Hash` and `Eq` of the key): keep them
/// quick and do not call into the same cache from them.
///
/// Every write asks, as moka's does: `expire_after_create` when the key has no live entry,
/// `expire_after_update` when it has one — a write whose value is heavier than `max_capacity`
/// too, although that value is then turned away (the answer unused). A panic in a method
/// leaves the key as it was before the write and reaches the writer.
///
/// # Example
///
/// ```
/// use herdcache::{Cache, Expiry, ManualClock};
/// use std::time::Duration;
///
/// /// Errors are cached for a second, good answers for a minute.
/// struct ByOutcome;
/// impl Expiry<u32, Result<String, String>> for ByOutcome {
///     fn expire_after_create(&self, _k: &u32, v: &Result<String, String>) -> Option<Duration> {
///         Some(if v.is_ok() { Duration::from_secs(60) } else { Duration::from_secs(1) })
///     }
/// }
///
/// let clock = ManualClock::new();
/// let cache = Cache::builder()
///     .max_capacity(100)
///     .expire_after(ByOutcome)
///     .clock(clock.clone())
///     .build();
/// cache.insert(1, Ok("one".to_string()));
/// cache.insert(2, Err("backend down".to_string()));
/// clock.advance(Duration::from_secs(2));
/// assert!(cache.get(&1).is_some());
/// assert!(cache.get(&2).is_none());
/// ```
pub trait Expiry<K, V> {
    /// The lifetime of a newly inserted entry. Default: `None` (never expires).
    fn expire_after_create(&self, key: &K, value: &V) -> Option<Duration> {
        let _ = (key, value);
        None
    }

    /// The remaining lifetime after a read; `remaining` is the current one. Default: unchanged.
    fn expire_after_read(
        &self,
        key: &K,
        value: &V,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        let _ = (key, value);
        remaining
    }

    /// The remaining lifetime after the value is replaced; `remaining` is the current one.
    /// Default: unchanged.
    fn expire_after_update(
        &self,
        key: &K,
        value: &V,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        let _ = (key, value);
        remaining
    }
}

/// A shared or boxed [`Expiry`] trait object is an `Expiry` too (as in moka): one policy built
/// at run time can serve several caches.
///
/// ```
/// use herdcache::{Cache, Expiry};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// struct Short;
/// impl Expiry<u64, u64> for Short {
///     fn expire_after_create(&self, _: &u64, _: &u64) -> Option<Duration> {
///         Some(Duration::from_secs(5))
///     }
/// }
/// let shared: Arc<dyn Expiry<u64, u64> + Send + Sync> = Arc::new(Short);
/// let a: Cache<u64, u64> = Cache::builder().max_capacity(10).expire_after(Arc::clone(&shared)).build();
/// let b: Cache<u64, u64> = Cache::builder().max_capacity(10).expire_after(shared).build();
/// a.insert(1, 1);
/// b.insert(1, 1);
/// assert_eq!(a.get(&1), b.get(&1));
/// ```
impl<K, V, T> Expiry<K, V> for T
where
    T: std::ops::Deref<Target = dyn Expiry<K, V> + Send + Sync>,
{
    fn expire_after_create(&self, key: &K, value: &V) -> Option<Duration> {
        (**self).expire_after_create(key, value)
    }

    fn expire_after_read(
        &self,
        key: &K,
        value: &V,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        (**self).expire_after_read(key, value, remaining)
    }

    fn expire_after_update(
        &self,
        key: &K,
        value: &V,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        (**self).expire_after_update(key, value, remaining)
    }
}

/// The expiration configured on a cache, resolved once at build time.
pub(crate) enum ExpiryConfig<K, V> {
    None,
    /// `time_to_live` and/or `time_to_idle`, in nanoseconds.
    Fixed {
        ttl: Option<u64>,
        tti: Option<u64>,
    },
    /// An [`Expiry`], and a time to live and/or to idle bounding it (nanoseconds), if set
    /// too: an entry expires at the earliest of the three, as in moka.
    Custom {
        expiry: Box<dyn Expiry<K, V> + Send + Sync>,
        ttl: Option<u64>,
        tti: Option<u64>,
    },
}

/// An entry's deadlines: the effective one (the earliest: when it expires), the hard one (its
/// time to live since the last write, which reads do not move; `NEVER` without), and, for a
/// custom [`Expiry`], the custom one alone (what its hooks are told remains; `NEVER`
/// otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadlines {
    pub(crate) effective: u64,
    pub(crate) hard: u64,
    pub(crate) custom: u64,
}

impl Deadlines {
    /// One deadline for all three.
    pub(crate) fn at(d: u64) -> Self {
        Deadlines {
            effective: d,
            hard: d,
            custom: d,
        }
    }
}

impl<K: 'static, V: 'static> ExpiryConfig<K, V> {
    /// How many `u64` deadlines each entry keeps: the effective one; when both a time to live
    /// and a time to idle are set, the hard (time-to-live) one; and for a custom `Expiry`
    /// bounded by either, the hard one and the custom one.
    pub(crate) fn stride(&self) -> usize {
        match self {
            ExpiryConfig::None => 0,
            ExpiryConfig::Fixed {
                ttl: Some(_),
                tti: Some(_),
            } => 2,
            ExpiryConfig::Custom { ttl, tti, .. } if ttl.is_some() || tti.is_some() => 3,
            _ => 1,
        }
    }

    /// The time to live when it is the whole policy (no time to idle, no custom `Expiry`).
    pub(crate) fn plain_ttl(&self) -> Option<u64> {
        match self {
            ExpiryConfig::Fixed { ttl, tti: None } => *ttl,
            _ => None,
        }
    }

    /// Deadlines of a new entry. `factor` scales the durations (jitter: 1.0 for none).
    pub(crate) fn on_create(&self, key: &K, value: &V, now: u64, factor: f64) -> Deadlines {
        match self {
            ExpiryConfig::None => Deadlines::at(NEVER),
            ExpiryConfig::Fixed { ttl, tti } => {
                let hard = ttl.map_or(NEVER, |t| deadline(now, scale(t, factor)));
                let idle = tti.map_or(NEVER, |t| deadline(now, scale(t, factor)));
                Deadlines {
                    effective: hard.min(idle),
                    hard,
                    custom: NEVER,
                }
            }
            ExpiryConfig::Custom { expiry, ttl, tti } => {
                let c = opt_deadline(now, expiry.expire_after_create(key, value), factor);
                bounded(c, *ttl, *tti, now, factor)
            }
        }
    }

    /// Deadlines after the entry's value is replaced; `current` are its deadlines until now.
    pub(crate) fn on_update(
        &self,
        key: &K,
        value: &V,
        now: u64,
        current: Deadlines,
        factor: f64,
    ) -> Deadlines {
        match self {
            ExpiryConfig::Custom { expiry, ttl, tti } => {
                let left = remaining(now, current.custom);
                let asked = expiry.expire_after_update(key, value, left);
                // Unchanged (the trait's default): the same deadline, not jittered again (each
                // write would draw a new factor for the same remaining time, drifting from it).
                let c = if asked == left {
                    current.custom
                } else {
                    opt_deadline(now, asked, factor)
                };
                bounded(c, *ttl, *tti, now, factor)
            }
            // A replaced value starts a new life, as in moka.
            _ => self.on_create(key, value, now, factor),
        }
    }

    /// Whether a custom [`Expiry`] decides the deadlines (a read may then move one earlier).
    #[inline]
    pub(crate) fn is_custom(&self) -> bool {
        matches!(self, ExpiryConfig::Custom { .. })
    }

    /// Whether a read may move an entry's deadline.
    pub(crate) fn moves_on_read(&self) -> bool {
        matches!(
            self,
            ExpiryConfig::Fixed { tti: Some(_), .. } | ExpiryConfig::Custom { .. }
        )
    }

    /// The new effective and custom deadlines after a read, or `None` when the read moves
    /// neither. `current` are the entry's deadlines (for a time to idle alone, only the
    /// effective and hard ones mean anything).
    #[inline]
    pub(crate) fn on_read(
        &self,
        key: &K,
        value: &V,
        now: u64,
        current: Deadlines,
    ) -> Option<(u64, u64)> {
        match self {
            ExpiryConfig::Fixed { tti: Some(t), .. } => {
                let next = deadline(now, *t).min(current.hard);
                // Skip writes that would move the deadline by less than 1/1024 of the idle time:
                // a hot entry is then written about once per TTI/1024, not on every read.
                (next > current.effective.saturating_add(*t >> 10)).then_some((next, NEVER))
            }
            ExpiryConfig::Custom { expiry, tti, .. } => {
                let c = opt_deadline(
                    now,
                    expiry.expire_after_read(key, value, remaining(now, current.custom)),
                    1.0,
                );
                let idle = tti.map_or(NEVER, |t| deadline(now, t));
                let next = c.min(current.hard).min(idle);
                (next != current.effective || c != current.custom).then_some((next, c))
            }
            _ => None,
        }
    }
}

/// A custom expiry's deadline `c`, bounded by a time to live and a time to idle from `now`
/// when set.
fn bounded(c: u64, ttl: Option<u64>, tti: Option<u64>, now: u64, factor: f64) -> Deadlines {
    let hard = ttl.map_or(NEVER, |t| deadline(now, scale(t, factor)));
    let idle = tti.map_or(NEVER, |t| deadline(now, scale(t, factor)));
    Deadlines {
        effective: c.min(hard).min(idle),
        hard,
        custom: c,
    }
}

fn opt_deadline(now: u64, d: Option<Duration>, factor: f64) -> u64 {
    d.map_or(NEVER, |d| deadline(now, scale(nanos(d), factor)))
}

/// `d × factor`, where `u64::MAX` (never) stays never. For jitter.
pub(crate) fn scale(d: u64, factor: f64) -> u64 {
    if d == u64::MAX || factor == 1.0 {
        d
    } else {
        (d as f64 * factor).min(u64::MAX as f64 / 2.0) as u64
    }
}

fn remaining(now: u64, at: u64) -> Option<Duration> {
    (at != NEVER).then(|| Duration::from_nanos(at.saturating_sub(now)))
}

/// Marks an entry filed in no bucket.
pub(crate) const NO_BUCKET: u16 = u16::MAX;

/// Level `i` has `COUNTS[i]` buckets of `1 << SHIFTS[i]` nanoseconds each (≈1.07 s, 1.15 min,
/// 1.22 h, 19.5 h); the last level's single bucket holds everything further away.
const SHIFTS: [u32; 5] = [30, 36, 42, 46, 48];
const COUNTS: [usize; 5] = [64, 64, 32, 4, 1];
const OFFSETS: [usize; 5] = [0, 64, 128, 160, 164];
const TOTAL: usize = 165;

#[derive(Default, Debug)]
struct Bucket {
    slots: Vec<u32>,
    /// Entries whose `bucket` field names this bucket; `slots.len() - live` are stale.
    live: u32,
}

/// A hierarchical, lazily validated timer wheel of slab indices.
#[derive(Debug)]
pub(crate) struct TimerWheel {
    buckets: Vec<Bucket>,
    /// The time the wheel was last advanced to.
    time: u64,
    /// When the current finest bucket was last drained exactly before an eviction (see
    /// [`exact_before_evicting`](Self::exact_before_evicting)).
    exact_at: u64,
}

impl TimerWheel {
    /// The time the wheel was last advanced to (for `validate`).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn time(&self) -> u64 {
        self.time
    }

    /// For `validate`: the bucket an entry due at `at` must be in if the wheel has passed
    /// `at`'s finest tick (the current tick's), or `None` if it has not.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn overdue_bucket(&self, at: u64) -> Option<u16> {
        (at >> SHIFTS[0] < self.time >> SHIFTS[0]).then(|| self.bucket_for(self.time))
    }

    pub(crate) fn new(now: u64) -> Self {
        TimerWheel {
            buckets: (0..TOTAL).map(|_| Bucket::default()).collect(),
            time: now,
            exact_at: 0,
        }
    }

    /// Whether a write about to evict for room should first drain the current finest bucket
    /// exactly (entries due earlier in the current ≈1.07 s tick, which a plain advance leaves
    /// for the next tick), so that an entry already dead goes before a live one is evicted.
    /// True at most once per 1/16 of a tick (≈67 ms) per shard: an exact drain files the
    /// bucket's other entries again, so its cost is bounded per unit of time, not paid by
    /// every evicting write.
    pub(crate) fn exact_before_evicting(&mut self, now: u64) -> bool {
        const EVERY: u64 = 1 << (SHIFTS[0] - 4);
        if now < self.exact_at.saturating_add(EVERY) && self.exact_at != 0 {
            return false;
        }
        self.exact_at = now.max(1);
        true
    }

    /// The bucket for an entry due at `at` (never [`NEVER`]: such entries are not filed).
    ///
    /// A deadline the wheel has already passed (a writer that read the clock before it took
    /// the shard lock, while another advanced the wheel) goes to the current finest bucket:
    /// filed under its own second it would sit in a bucket already drained until the ring
    /// came round again, up to 64 ticks (≈69 s) late.
    pub(crate) fn bucket_for(&self, at: u64) -> u16 {
        let at = at.max(self.time);
        let delta = at - self.time;
        for level in 0..4 {
            if delta < (1u64 << SHIFTS[level + 1]) {
                let i = ((at >> SHIFTS[level]) as usize) & (COUNTS[level] - 1);
                return (OFFSETS[level] + i) as u16;
            }
        }
        OFFSETS[4] as u16
    }

    /// Files slab index `slot` in bucket `b`. Returns true when the bucket holds so many stale
    /// indices that the caller should [`compact`](Self::compact) it.
    pub(crate) fn file(&mut self, b: u16, slot: u32) -> bool {
        let bucket = &mut self.buckets[b as usize];
        bucket.slots.push(slot);
        bucket.live += 1;
        bucket.slots.len() > 2 * bucket.live as usize + 32
    }

    /// An entry filed in `b` was removed or re-filed elsewhere.
    pub(crate) fn unfile(&mut self, b: u16) {
        let bucket = &mut self.buckets[b as usize];
        bucket.live = bucket.live.saturating_sub(1);
    }

    /// Keeps only the indices of bucket `b` for which `is_filed_here` holds, once each.
    pub(crate) fn compact(&mut self, b: u16, mut is_filed_here: impl FnMut(u32) -> bool) {
        let bucket = &mut self.buckets[b as usize];
        bucket.slots.sort_unstable();
        bucket.slots.dedup();
        bucket.slots.retain(|&s| is_filed_here(s));
        bucket.live = bucket.slots.len() as u32;
        bucket.slots.shrink_to(bucket.slots.len() * 2);
    }

    /// The common case of [`advance`](Self::advance), inline: `now` is within the wheel's
    /// current finest tick (so no bucket of any level comes due) and `exact` is not asked.
    /// Moves the wheel's time and returns true, or returns false if `advance` must run.
    #[inline]
    pub(crate) fn advance_within_tick(&mut self, now: u64, exact: bool) -> bool {
        if exact || now >> SHIFTS[0] != self.time >> SHIFTS[0] {
            return false;
        }
        self.time = self.time.max(now);
        true
    }

    /// Advances the wheel to `now` and moves the contents of every bucket whose time came into
    /// `due`, as `(bucket, indices)`. The caller checks each index and files survivors again.
    ///
    /// Buckets are coarse (the finest level is ≈1.07 s), so entries due earlier within the
    /// current tick wait for the next tick, unless `exact`: then the current finest bucket is
    /// drained too.
    pub(crate) fn advance(&mut self, now: u64, exact: bool, due: &mut Vec<(u16, Vec<u32>)>) {
        if exact {
            let b = OFFSETS[0] + ((now.max(self.time) >> SHIFTS[0]) as usize & (COUNTS[0] - 1));
            let bucket = &mut self.buckets[b];
            if !bucket.slots.is_empty() {
                bucket.live = 0;
                due.push((b as u16, std::mem::take(&mut bucket.slots)));
            }
        }
        if now <= self.time {
            return;
        }
        let prev = self.time;
        self.time = now;
        for level in 0..5 {
            let (from, to) = (prev >> SHIFTS[level], now >> SHIFTS[level]);
            if from == to {
                continue;
            }
            let span = (to - from).min(COUNTS[level] as u64 - 1);
            for t in (to - span)..=to {
                let b = OFFSETS[level] + (t as usize & (COUNTS[level] - 1));
                let bucket = &mut self.buckets[b];
                if !bucket.slots.is_empty() {
                    bucket.live = 0;
                    due.push((b as u16, std::mem::take(&mut bucket.slots)));
                }
            }
        }
    }

    /// Forgets everything (used by `invalidate_all`).
    pub(crate) fn clear(&mut self) {
        for b in &mut self.buckets {
            *b = Bucket::default();
        }
    }

    /// Heap bytes held by bucket vectors (for the memory formula tests).
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buckets.iter().map(|b| b.slots.capacity() * 4).sum()
    }
}

/// An entry's refresh status, as a read sees it.
pub(crate) enum Refresh {
    Fresh,
    /// Due, or being refreshed, by someone else.
    Due,
    /// Due, and this read will start the refresh.
    Won,
}

/// A refresh deadline meaning "a refresh is being started or runs": nobody else starts one.
pub(crate) const REFRESHING: u64 = NEVER - 1;

/// Decides whether an entry whose refresh deadline is `refresh_at` should be refreshed at
/// `now`, and claims the refresh for this caller if so: the deadline becomes [`REFRESHING`] by
/// one compare-and-swap, so exactly one reader per period wins. `early`: XFetch's `β` and the
/// entry's last load time (nanoseconds), for a probabilistic refresh before `expires`.
#[inline]
pub(crate) fn claim_refresh(
    refresh_at: &AtomicU64,
    early: Option<(f64, &AtomicU64)>,
    now: u64,
    expires: u64,
    coin: impl FnOnce() -> f64,
) -> Refresh {
    let at = refresh_at.load(Ordering::Relaxed);
    if at == REFRESHING {
        return Refresh::Due;
    }
    // No early refresh while a failed or deferred one waits out its backoff.
    let due = at <= now
        || early.is_some_and(|(beta, delta)| {
            let delta = delta.load(Ordering::Relaxed);
            delta & BACKING_OFF == 0 && xfetch(now, expires, delta, beta, coin())
        });
    if !due {
        return Refresh::Fresh;
    }
    // A planted bug for the loom model to catch: check-then-set instead of one
    // compare-and-swap, so two readers can both start a refresh.
    #[cfg(herdcache_broken_model)]
    {
        refresh_at.store(REFRESHING, Ordering::Release);
        Refresh::Won
    }
    #[cfg(not(herdcache_broken_model))]
    match refresh_at.compare_exchange(at, REFRESHING, Ordering::AcqRel, Ordering::Relaxed) {
        Ok(_) => Refresh::Won,
        Err(_) => Refresh::Due,
    }
}

/// A flag on an entry's last load time (the δ early refresh reads): a failed or deferred
/// refresh waits out its backoff, and early refresh (XFetch) with it. Cleared by the next
/// write, which stores the new load time.
pub(crate) const BACKING_OFF: u64 = 1 << 63;

/// Gives back a claim to refresh (the deadline is [`REFRESHING`]): due again at `at`. A
/// deadline set meanwhile (by a new value) is kept. Returns whether it was given back.
#[inline]
pub(crate) fn give_back_refresh(refresh_at: &AtomicU64, at: u64) -> bool {
    refresh_at
        .compare_exchange(REFRESHING, at, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// A uniform factor in [1 − jitter, 1 + jitter] from a uniform `u` in [0, 1) (exactly 1
/// without jitter).
#[inline]
pub(crate) fn jitter_factor(jitter: f64, u: f64) -> f64 {
    1.0 + jitter * (2.0 * u - 1.0)
}

/// XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): refresh early when
/// `now − δ·β·ln(u) ≥ expiry`, with `δ` the key's last load time and `u` uniform in (0, 1].
/// The probability of refreshing at time `now` is `exp(−(expiry − now) / (δ·β))`: negligible
/// far from expiry, rising to 1 as it nears, and earlier for keys that are slow to load.
#[inline]
pub(crate) fn xfetch(now: u64, expiry: u64, delta: u64, beta: f64, u: f64) -> bool {
    if expiry == NEVER || delta == 0 {
        return false;
    }
    let gap = expiry.saturating_sub(now) as f64;
    gap <= delta as f64 * beta * -u.max(f64::MIN_POSITIVE).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_drains_before_evicting_are_spaced() {
        let every = 1u64 << (SHIFTS[0] - 4);
        let mut w = TimerWheel::new(0);
        assert!(w.exact_before_evicting(0), "the first one");
        assert!(!w.exact_before_evicting(every / 2), "within 1/16 of a tick");
        assert!(w.exact_before_evicting(every + 1), "past it");
        assert!(!w.exact_before_evicting(every + 2));
        assert!(w.exact_before_evicting(10 * every));
    }

    #[test]
    fn xfetch_frequency_matches_its_formula() {
        // P(refresh) = exp(−gap / (δ·β)), checked with a seeded source of uniform numbers.
        let mut x = 0x1234_5678_9ABC_DEF1u64;
        for (gap, delta, beta) in [
            (1e9, 1e9, 1.0),
            (2e9, 1e9, 1.0),
            (5e8, 1e9, 2.0),
            (3e9, 1e9, 0.5),
        ] {
            let n = 200_000;
            let mut refreshed = 0;
            for _ in 0..n {
                x = crate::rng::step(x);
                let u = ((x >> 11) + 1) as f64 / (1u64 << 53) as f64;
                refreshed += usize::from(xfetch(0, gap as u64, delta as u64, beta, u));
            }
            let seen = refreshed as f64 / n as f64;
            let expected = (-gap / (delta * beta)).exp();
            assert!(
                (seen - expected).abs() < 0.005,
                "gap {gap}: {seen:.4} vs {expected:.4}"
            );
        }
        assert!(
            !xfetch(0, NEVER, 1_000, 1.0, 0.5),
            "no expiry, no early refresh"
        );
        assert!(
            !xfetch(0, 10, 0, 1.0, 1e-9),
            "an unmeasured load time never triggers"
        );
        assert!(xfetch(10, 10, 1, 1.0, 1.0), "at expiry: always");
    }

    const SEC: u64 = 1_000_000_000;

    fn drain(w: &mut TimerWheel, now: u64) -> Vec<u32> {
        let mut due = Vec::new();
        w.advance(now, false, &mut due);
        let mut v: Vec<u32> = due.into_iter().flat_map(|(_, s)| s).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn near_deadlines_come_due_in_their_second() {
        let mut w = TimerWheel::new(0);
        let b = w.bucket_for(3 * SEC + 5);
        w.file(b, 7);
        assert!(drain(&mut w, 2 * SEC).is_empty());
        assert_eq!(drain(&mut w, 3 * SEC + 10), vec![7]);
    }

    #[test]
    fn far_deadlines_cascade() {
        let mut w = TimerWheel::new(0);
        let at = 3 * 3600 * SEC; // three hours
        let b = w.bucket_for(at);
        assert!(b as usize >= OFFSETS[2]);
        w.file(b, 1);
        // Nothing for the first hour...
        assert!(drain(&mut w, 3600 * SEC).is_empty());
        // ...but by the deadline the index has surfaced (perhaps earlier, to be re-filed).
        let mut seen = false;
        let mut t = 3600 * SEC;
        while t <= at + 2 * SEC {
            t += 30 * SEC;
            let mut due = Vec::new();
            w.advance(t, false, &mut due);
            for (_, slots) in due {
                for s in slots {
                    assert_eq!(s, 1);
                    if t >= at {
                        seen = true;
                    } else {
                        let nb = w.bucket_for(at);
                        w.file(nb, s);
                    }
                }
            }
        }
        assert!(seen);
    }

    #[test]
    fn a_deadline_the_wheel_has_passed_comes_due_at_the_next_tick() {
        let mut w = TimerWheel::new(0);
        assert!(drain(&mut w, 20 * SEC).is_empty());
        // Filed late (its writer read the clock at 5 s): due at once, not a ring later.
        let b = w.bucket_for(7 * SEC);
        assert_eq!(b, w.bucket_for(20 * SEC), "the current tick's bucket");
        w.file(b, 4);
        assert_eq!(drain(&mut w, 22 * SEC), vec![4]);
    }

    #[test]
    fn huge_jumps_and_never_do_not_panic() {
        let mut w = TimerWheel::new(0);
        let b = w.bucket_for(u64::MAX - 1);
        w.file(b, 3);
        assert_eq!(drain(&mut w, u64::MAX), vec![3]);
        assert!(drain(&mut w, 5).is_empty(), "time does not go backwards");
    }

    #[test]
    fn compaction_drops_stale_and_duplicates() {
        let mut w = TimerWheel::new(0);
        let b = w.bucket_for(SEC / 2);
        let mut asked = false;
        for i in 0..100 {
            asked |= w.file(b, i % 10);
            w.unfile(b);
        }
        assert!(asked);
        w.compact(b, |s| s == 3);
        assert_eq!(drain(&mut w, 2 * SEC), vec![3]);
    }
}
