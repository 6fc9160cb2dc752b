//! One shard: a plain, single-threaded map with an eviction policy and a timer wheel.
//!
//! Nothing here is concurrent. The cache ([`crate::cache`]) wraps each shard in a read-write
//! lock: lookups run under the read lock and touch only atomics on the entry they found (the hit
//! counter and, with a time to idle, the deadline); everything else runs under the write lock.
//! Nothing here runs user code other than the key's `Hash`/`Eq` and the `Expiry` callbacks,
//! and every mutation is ordered so that a panic of those leaves the shard consistent (user
//! code first, then the mutation). Removed entries (and flights detached by a write) are handed
//! back in a [`Garbage`] so that their values and keys are dropped after the lock is released.
//!
//! # Layout and memory
//!
//! Entries live in a slab (`Vec<Option<Entry>>`, 24 bytes a slot for `u64 → u64`: the key, the
//! value, a `u32` weight, a `u8` hit counter, a `u8` policy place, a `u16` timer bucket, the
//! `Option` folded into the place's niche). A `hashbrown::HashTable<u32>` maps hashes to slab
//! indices (5 bytes a bucket). The policy's FIFO queues hold a `u32` index per entry, and its
//! frequency sketch about 4 bytes per entry. With expiry (or refresh) configured, the slot also
//! holds the entry's effective deadline (32-byte slots: [`Shard::Timed`]); a parallel vector
//! holds the rest of its time data (the hard deadline with both a time to live and a time to
//! idle; the refresh deadline and load time with refresh-ahead) and the timer wheel a `u32`
//! index per entry.

use crate::clock::NEVER;
use crate::expiry::{ExpiryConfig, TimerWheel, NO_BUCKET};
use crate::flight::Flight;
use crate::policy::{record_hit, Place, Policy, Tracked};
use crate::sync::AtomicU64;
use hashbrown::HashTable;
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Why an entry left the cache: given to the
/// [`eviction_listener`](crate::CacheBuilder::eviction_listener), and counted per cause in
/// [`CacheStats`](crate::CacheStats).
///
/// # Example
///
/// ```
/// use herdcache::{Cache, RemovalCause};
/// use std::sync::{Arc, Mutex};
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = Arc::clone(&seen);
/// let cache: Cache<u32, &str> = Cache::builder()
///     .max_capacity(10)
///     .eviction_listener(move |k: &u32, _v: &&str, cause: RemovalCause| {
///         log.lock().unwrap().push((*k, cause));
///     })
///     .build();
/// cache.insert(1, "a");
/// cache.insert(1, "b"); // replaces "a"
/// cache.invalidate(&1); // removes "b"
/// assert_eq!(
///     *seen.lock().unwrap(),
///     [(1, RemovalCause::Replaced), (1, RemovalCause::Explicit)]
/// );
/// assert!(!RemovalCause::Explicit.was_evicted());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalCause {
    /// Its deadline passed.
    Expired,
    /// `remove`, `invalidate`, `invalidate_all` or `retain` removed it.
    Explicit,
    /// An `insert` replaced its value.
    Replaced,
    /// The policy evicted it to stay within the capacity.
    Size,
}

impl RemovalCause {
    /// Whether the cache removed the entry on its own — it expired or was evicted for size
    /// (as moka's `was_evicted`) — rather than because of a call (`remove`, `invalidate`,
    /// `insert` replacing it).
    ///
    /// ```
    /// use herdcache::RemovalCause;
    /// assert!(RemovalCause::Size.was_evicted());
    /// assert!(RemovalCause::Expired.was_evicted());
    /// assert!(!RemovalCause::Explicit.was_evicted());
    /// assert!(!RemovalCause::Replaced.was_evicted());
    /// ```
    pub fn was_evicted(&self) -> bool {
        matches!(self, RemovalCause::Expired | RemovalCause::Size)
    }
}

/// An entry that left a shard, to be reported and dropped after the lock is released.
pub(crate) struct Removed<K, V> {
    pub(crate) key: K,
    pub(crate) value: V,
    pub(crate) weight: u32,
    pub(crate) cause: RemovalCause,
}

impl<K, V> Removed<K, V> {
    fn expired(key: K, value: V, weight: u32) -> Self {
        Removed {
            key,
            value,
            weight,
            cause: RemovalCause::Expired,
        }
    }
}

/// Entries removed under a lock, dropped (or reported) after it is released. Holds the first
/// one inline: the common write removes at most one entry, and then needs no allocation.
pub(crate) struct Garbage<K, V> {
    first: Option<Removed<K, V>>,
    /// Everything beyond the first entry, boxed so that the common case stays small and its
    /// drop is a check or two.
    more: Option<Box<More<K, V>>>,
}

/// The rarer contents of a [`Garbage`].
struct More<K, V> {
    rest: Vec<Removed<K, V>>,
    /// Loads in flight that a write detached from the registry (their keys are dropped here).
    detached: Vec<(K, Arc<Flight<K, V>>)>,
}

impl<K, V> Garbage<K, V> {
    #[inline]
    pub(crate) fn new() -> Self {
        Garbage {
            first: None,
            more: None,
        }
    }

    fn more(&mut self) -> &mut More<K, V> {
        self.more.get_or_insert_with(|| {
            Box::new(More {
                rest: Vec::new(),
                detached: Vec::new(),
            })
        })
    }

    #[inline]
    pub(crate) fn push(&mut self, r: Removed<K, V>) {
        if self.first.is_none() && self.more.as_ref().is_none_or(|m| m.rest.is_empty()) {
            self.first = Some(r);
        } else {
            self.more().rest.push(r);
        }
    }

    /// Keeps a flight that a write detached, so that its key is dropped unlocked.
    pub(crate) fn detach(&mut self, key: K, flight: Arc<Flight<K, V>>) {
        self.more().detached.push((key, flight));
    }

    /// The most recently pushed entry.
    pub(crate) fn pop(&mut self) -> Option<Removed<K, V>> {
        self.more
            .as_mut()
            .and_then(|m| m.rest.pop())
            .or_else(|| self.first.take())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.as_ref().map_or(0, |m| m.rest.len())
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Removed<K, V>> {
        let rest = self.more.as_ref().map_or(&[][..], |m| &m.rest[..]);
        self.first.iter().chain(rest.iter())
    }

    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.more = None;
    }
}

/// What [`Core::claim_flight`] found.
pub(crate) enum FlightClaim<K, V> {
    /// A load of the key runs (or a live negative-cache entry answers it): join it. The unused
    /// registration comes back, to be dropped unlocked.
    Running(Arc<Flight<K, V>>, (K, Arc<Flight<K, V>>)),
    /// The new flight is registered; an expired negative entry it replaced comes back.
    Registered(Option<(K, Arc<Flight<K, V>>)>),
}

/// An entry's effective deadline, kept in its slab slot (no separate cache line to load on a
/// read): nothing at all for caches without time data, an `AtomicU64` for the others.
pub(crate) trait SlotTime: Send + Sync + 'static {
    fn fresh() -> Self;
    fn get(&self) -> u64;
    fn set(&self, at: u64);
}

impl SlotTime for () {
    #[inline]
    fn fresh() -> Self {}
    #[inline]
    fn get(&self) -> u64 {
        NEVER
    }
    #[inline]
    fn set(&self, _: u64) {}
}

impl SlotTime for AtomicU64 {
    #[inline]
    fn fresh() -> Self {
        AtomicU64::new(NEVER)
    }
    #[inline]
    fn get(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
    #[inline]
    fn set(&self, at: u64) {
        self.store(at, Ordering::Relaxed)
    }
}

pub(crate) struct Entry<K, V, T> {
    key: K,
    value: V,
    weight: u32,
    hits: AtomicU8,
    place: Place,
    bucket: u16,
    /// The effective deadline.
    time: T,
}

impl<K, V, T> Tracked for Entry<K, V, T> {
    fn place(&self) -> Place {
        self.place
    }
    fn set_place(&mut self, p: Place) {
        self.place = p;
    }
    fn hits(&self) -> &AtomicU8 {
        &self.hits
    }
    fn weight(&self) -> u32 {
        self.weight
    }
}

/// What a lookup found.
pub(crate) enum Found<'a, K, V> {
    Hit(&'a V),
    /// A hit that is due for refresh; this caller won the right to start it (the entry's
    /// refresh deadline is now [`REFRESHING`]: see [`Shard::refresh_deadline_of`] for whoever
    /// fails to start the refresh and must set it back).
    Stale(&'a K, &'a V),
    /// A hit on a value due for refresh (or being refreshed) by someone else.
    StaleHit(&'a V),
    /// Present but past its deadline: the caller should arrange its removal.
    Expired,
    Absent,
}

/// Per-entry time data and refresh settings of a shard, fixed at build time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Layout {
    /// `u64`s per slab slot in `times` (0: no time data at all).
    pub(crate) stride: usize,
    /// Whether slot 1 holds a hard (time-to-live) deadline besides the effective one.
    pub(crate) hard: bool,
    /// Where the refresh deadline lives (the load time is next to it), with refresh-ahead or
    /// early refresh.
    pub(crate) refresh: Option<usize>,
    /// Refresh this long after a write (nanoseconds).
    pub(crate) refresh_after: Option<u64>,
    /// XFetch's β, for probabilistic early refresh.
    pub(crate) early_beta: Option<f64>,
    /// Durations are spread uniformly within ±`jitter` of their nominal value.
    pub(crate) jitter: f64,
    /// Whether a read can move the deadline (a time to idle, or a custom `Expiry`): a plain
    /// time to live skips that work on the read path.
    pub(crate) reads_move: bool,
}

impl Layout {
    pub(crate) fn new(
        expiry_stride: usize,
        refresh_after: Option<u64>,
        early_beta: Option<f64>,
        jitter: f64,
    ) -> Self {
        let refreshing = refresh_after.is_some() || early_beta.is_some();
        let base = if refreshing {
            expiry_stride.max(1)
        } else {
            expiry_stride
        };
        Layout {
            stride: base + if refreshing { 2 } else { 0 },
            hard: expiry_stride == 2,
            refresh: refreshing.then_some(base),
            refresh_after,
            early_beta,
            jitter,
            reads_move: false,
        }
    }
}

/// An entry's refresh status, as a read sees it.
enum Refresh {
    Fresh,
    /// Due, or being refreshed, by someone else.
    Due,
    /// Due, and this read will start the refresh.
    Won,
}

/// A refresh deadline meaning "a refresh is being started or runs": nobody else starts one.
pub(crate) const REFRESHING: u64 = NEVER - 1;

/// The single-threaded core of a shard, generic over where entries keep their deadline.
pub(crate) struct Core<K, V, T> {
    table: HashTable<u32>,
    slab: Vec<Option<Entry<K, V, T>>>,
    free: Vec<u32>,
    /// Time data besides the effective deadline (which is in the slot), `extra` per slab
    /// slot: the hard deadline (with both TTL and TTI), then the refresh deadline and the last
    /// load's duration. Index `j` of the layout (`j ≥ 1`) is at `slot * extra + j - 1`.
    times: Vec<AtomicU64>,
    stride: usize,
    extra: usize,
    layout: Layout,
    /// xorshift state for jitter.
    rng: u64,
    wheel: Option<TimerWheel>,
    policy: Policy,
    weight: u64,
    len: usize,
    /// This shard's share of the cache's capacity.
    share: u64,
    /// Loads in flight (and negative-cache entries), by key (see [`crate::load`]).
    flights: HashTable<(K, Arc<Flight<K, V>>)>,
    /// The registry's size after its last sweep of expired negative entries.
    flights_swept_at: usize,
    /// Slots whose deadline a read moved earlier (or off "never") under the read lock, where
    /// the wheel cannot be touched: filed by the next write. Bounded; past the bound, `rescan`
    /// files every entry instead.
    refile: crate::sync::Mutex<Refile>,
    refile_pending: crate::sync::AtomicBool,
}

/// Slots to file again in the timer wheel (see [`Core::refile`]).
#[derive(Default)]
struct Refile {
    slots: Vec<u32>,
    rescan: bool,
}

/// The most slots remembered for filing before a full rescan is asked for instead.
const REFILE_MAX: usize = 1024;

impl<K: Hash + Eq + 'static, V: 'static, T: SlotTime> Core<K, V, T> {
    pub(crate) fn new(share: u64, layout: Layout, now: u64, seed: u64) -> Self {
        let stride = layout.stride;
        Core {
            table: HashTable::new(),
            slab: Vec::new(),
            free: Vec::new(),
            times: Vec::new(),
            stride,
            extra: stride.saturating_sub(1),
            layout,
            rng: seed | 1,
            wheel: (stride > 0).then(|| TimerWheel::new(now)),
            policy: Policy::new(share, seed, 0),
            weight: 0,
            len: 0,
            share,
            flights: HashTable::new(),
            flights_swept_at: 0,
            refile: crate::sync::Mutex::new(Refile::default()),
            refile_pending: crate::sync::AtomicBool::new(false),
        }
    }

    /// Remembers (under the read lock) that `slot`'s deadline moved to where its timer-wheel
    /// bucket may not reach it.
    #[cold]
    fn note_refile(&self, slot: u32) {
        let mut r = self.refile.lock();
        if r.slots.len() < REFILE_MAX {
            r.slots.push(slot);
        } else {
            r.rescan = true;
        }
        self.refile_pending.store(true, Ordering::Release);
    }

    /// Files the slots whose deadline a read moved (under the write lock).
    #[cold]
    fn file_moved(&mut self) {
        let r = std::mem::take(&mut *self.refile.lock());
        self.refile_pending.store(false, Ordering::Release);
        let slots: Vec<u32> = if r.rescan {
            (0..self.slab.len() as u32).collect()
        } else {
            r.slots
        };
        for s in slots {
            if self.slab.get(s as usize).is_some_and(Option::is_some) {
                let d = self.deadline(s);
                self.file(s, d);
            }
        }
    }

    /// Whether `slot` waits to be filed again (see [`Self::note_refile`]).
    fn refile_waits(&self, slot: u32) -> bool {
        let r = self.refile.lock();
        r.rescan || r.slots.contains(&slot)
    }

    /// Registers a load in flight for `key` (which has none). Now and then (when the registry
    /// has doubled since) drops negative-cache entries that expired before `now`, so failed
    /// keys never asked for again do not pile up.
    fn add_flight<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        f: Arc<Flight<K, V>>,
        hasher: &S,
        now: u64,
    ) {
        if self.flights.len() >= self.flights_swept_at.max(32) * 2 {
            self.flights.retain(|(_, f)| {
                let until = f.negative_until();
                until == 0 || until > now
            });
            self.flights_swept_at = self.flights.len();
        }
        self.flights
            .insert_unique(hash, (key, f), |(k, _)| hasher.hash_one(k));
    }

    /// The one place a flight is registered: looks `key` up in the registry and, unless a load
    /// of it runs (or, with `serve_negative`, a live negative-cache entry answers it), registers
    /// `flight` for it — in one step under the caller's write lock. The key comes in owned
    /// (cloned by the caller before the lock: user code runs first); whatever is not kept is
    /// handed back to be dropped after the lock is released.
    pub(crate) fn claim_flight<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        flight: Arc<Flight<K, V>>,
        now: u64,
        serve_negative: bool,
        hasher: &S,
    ) -> FlightClaim<K, V> {
        let stale = match self.flights.find_entry(hash, |(k, _)| *k == key) {
            Ok(found) => {
                let until = found.get().1.negative_until();
                if until == 0 || (serve_negative && until > now) {
                    let running = Arc::clone(&found.get().1);
                    return FlightClaim::Running(running, (key, flight));
                }
                // An expired negative entry (or one this caller cannot use): replaced.
                Some(found.remove().0)
            }
            Err(_) => None,
        };
        self.add_flight(hash, key, flight, hasher, now);
        FlightClaim::Registered(stale)
    }

    /// Unregisters exactly this flight; returns its key so the caller drops it unlocked.
    pub(crate) fn remove_flight(&mut self, hash: u64, f: &Arc<Flight<K, V>>) -> Option<K> {
        let found = self
            .flights
            .find_entry(hash, |(_, g)| Arc::ptr_eq(f, g))
            .ok()?;
        Some(found.remove().0 .0)
    }

    /// The number of loads in flight (not negative-cache entries).
    pub(crate) fn flights_len(&self) -> usize {
        self.flights
            .iter()
            .filter(|(_, f)| f.negative_until() == 0)
            .count()
    }

    /// A write or invalidation of `key` supersedes its load in flight, if any: the flight is
    /// detached from the registry (its result will not be stored, and later callers do not join
    /// it). Its key goes to `out`, to be dropped after the lock is released.
    #[inline]
    fn supersede<Q>(&mut self, hash: u64, key: &Q, out: &mut Garbage<K, V>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.flights.is_empty() {
            self.detach_flight(hash, key, out);
        }
    }

    #[cold]
    fn detach_flight<Q>(&mut self, hash: u64, key: &Q, out: &mut Garbage<K, V>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Ok(found) = self.flights.find_entry(hash, |(k, _)| k.borrow() == key) {
            let ((key, flight), _) = found.remove();
            flight.supersede();
            out.detach(key, flight);
        }
    }

    /// Whether this very flight is registered (not superseded, not ended).
    pub(crate) fn is_registered(&self, hash: u64, f: &Arc<Flight<K, V>>) -> bool {
        self.flights
            .find(hash, |(_, g)| Arc::ptr_eq(f, g))
            .is_some()
    }

    pub(crate) fn weight(&self) -> u64 {
        self.weight
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn share(&self) -> u64 {
        self.share
    }

    fn find<Q>(&self, hash: u64, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slab = &self.slab;
        self.table
            .find(hash, |&s| {
                slab[s as usize]
                    .as_ref()
                    .is_some_and(|e| e.key.borrow() == key)
            })
            .copied()
    }

    #[inline]
    fn deadline(&self, slot: u32) -> u64 {
        self.slab[slot as usize]
            .as_ref()
            .map_or(NEVER, |e| e.time.get())
    }

    /// Slot `j ≥ 1` of an entry's time data (see `times`).
    #[inline]
    fn extra(&self, slot: u32, j: usize) -> &AtomicU64 {
        &self.times[slot as usize * self.extra + j - 1]
    }

    /// Looks `key` up under a shared borrow (the read lock), recording the hit. `coin` is a
    /// uniform random number in (0, 1], used only for probabilistic early refresh.
    #[inline]
    pub(crate) fn lookup<Q>(
        &self,
        hash: u64,
        key: &Q,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        coin: impl FnOnce() -> f64,
    ) -> Found<'_, K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(slot) = self.find(hash, key) else {
            return Found::Absent;
        };
        let Some(e) = &self.slab[slot as usize] else {
            return Found::Absent;
        };
        if self.stride > 0 {
            let current = e.time.get();
            if current <= now {
                return Found::Expired;
            }
            if self.layout.reads_move {
                let hard = if self.layout.hard {
                    self.extra(slot, 1).load(Ordering::Relaxed)
                } else {
                    NEVER
                };
                if let Some(next) = exp.on_read(&e.key, &e.value, now, current, hard) {
                    e.time.set(next);
                    // The wheel is lazy about deadlines that move later; one that moves
                    // earlier (or off "never") must be filed again, by the next write.
                    if next != NEVER && (next < current || e.bucket == NO_BUCKET) {
                        self.note_refile(slot);
                    }
                }
            }
            if let Some(r) = self.layout.refresh {
                match self.refresh_state(slot, r, now, current, coin) {
                    Refresh::Fresh => {}
                    Refresh::Due => {
                        record_hit(&e.hits);
                        return Found::StaleHit(&e.value);
                    }
                    Refresh::Won => {
                        record_hit(&e.hits);
                        return Found::Stale(&e.key, &e.value);
                    }
                }
            }
        }
        record_hit(&e.hits);
        Found::Hit(&e.value)
    }

    /// Whether the entry in `slot`, whose refresh deadline is its time slot `r`, should be
    /// refreshed now, and whether this caller won the right to start it (the deadline becomes
    /// [`REFRESHING`]).
    #[inline]
    fn refresh_state(
        &self,
        slot: u32,
        r: usize,
        now: u64,
        expires: u64,
        coin: impl FnOnce() -> f64,
    ) -> Refresh {
        let refresh_at = self.extra(slot, r);
        let at = refresh_at.load(Ordering::Relaxed);
        if at == REFRESHING {
            return Refresh::Due;
        }
        let due = at <= now
            || self.layout.early_beta.is_some_and(|beta| {
                let delta = self.extra(slot, r + 1).load(Ordering::Relaxed);
                crate::refresh::xfetch(now, expires, delta, beta, coin())
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

    /// Sets the refresh deadline of `key`'s entry, if present (after a failed or deferred
    /// refresh).
    pub(crate) fn set_refresh_at<Q>(&self, hash: u64, key: &Q, at: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let (Some(r), Some(slot)) = (self.layout.refresh, self.find(hash, key)) {
            self.extra(slot, r).store(at, Ordering::Relaxed);
        }
    }

    /// The refresh deadline of the entry whose value is `value` (a reference a lookup just
    /// returned), found by its address in the slab: no user code runs, so a reader can take it
    /// before anything that may panic.
    pub(crate) fn refresh_deadline_of(&self, value: &V) -> Option<&AtomicU64> {
        let r = self.layout.refresh?;
        let size = std::mem::size_of::<Option<Entry<K, V, T>>>();
        let offset = (value as *const V as usize).checked_sub(self.slab.as_ptr() as usize)?;
        let slot = offset / size;
        match self.slab.get(slot) {
            Some(Some(e)) if std::ptr::eq(&e.value, value) => Some(self.extra(slot as u32, r)),
            _ => None,
        }
    }

    /// Gives back a read's claim to refresh `key` (its refresh deadline is [`REFRESHING`]):
    /// the entry is due again at `at`. A deadline set meanwhile (a new value) is kept.
    pub(crate) fn reset_refresh<Q>(&self, hash: u64, key: &Q, at: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let (Some(r), Some(slot)) = (self.layout.refresh, self.find(hash, key)) {
            let _ = self.extra(slot, r).compare_exchange(
                REFRESHING,
                at,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// Looks `key` up without recording anything (for `contains_key`, `peek`-like calls).
    pub(crate) fn peek<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.find(hash, key)?;
        if self.deadline(slot) <= now {
            return None;
        }
        self.slab[slot as usize].as_ref().map(|e| &e.value)
    }

    #[inline]
    fn set_times(&mut self, slot: u32, times: (u64, u64), now: u64, load_nanos: u64) {
        if self.stride > 0 {
            self.store_times(slot, times, now, load_nanos);
        }
    }

    fn store_times(&mut self, slot: u32, (effective, hard): (u64, u64), now: u64, load_nanos: u64) {
        // The wheel is lazy: an entry filed for an earlier deadline is checked when its bucket
        // comes due and filed again then, so a deadline that only moves later (a replaced
        // value's new time to live) needs no filing now.
        let mut refile = true;
        if let Some(e) = &self.slab[slot as usize] {
            refile = e.bucket == NO_BUCKET || effective < e.time.get();
            e.time.set(effective);
        }
        if self.layout.hard {
            self.extra(slot, 1).store(hard, Ordering::Relaxed);
        }
        if let Some(r) = self.layout.refresh {
            let factor = self.jitter_factor();
            let at = self.layout.refresh_after.map_or(NEVER, |d| {
                crate::clock::deadline(now, crate::expiry::scale(d, factor))
            });
            self.extra(slot, r).store(at, Ordering::Relaxed);
            self.extra(slot, r + 1).store(load_nanos, Ordering::Relaxed);
        }
        if refile {
            self.file(slot, effective);
        }
    }

    /// A uniform factor in [1 − jitter, 1 + jitter] (exactly 1 without jitter).
    fn jitter_factor(&mut self) -> f64 {
        if self.layout.jitter == 0.0 {
            return 1.0;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let u = (self.rng >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        1.0 + self.layout.jitter * (2.0 * u - 1.0)
    }

    /// Files `slot` in the timer wheel under `deadline` (or nowhere for [`NEVER`]).
    fn file(&mut self, slot: u32, deadline: u64) {
        let Some(wheel) = &mut self.wheel else { return };
        let e = self.slab[slot as usize]
            .as_mut()
            .expect("filing a live slot");
        let b = if deadline == NEVER {
            NO_BUCKET
        } else {
            wheel.bucket_for(deadline)
        };
        if b == e.bucket {
            return; // still filed in the right bucket
        }
        if e.bucket != NO_BUCKET {
            wheel.unfile(e.bucket);
        }
        e.bucket = b;
        if b == NO_BUCKET {
            return;
        }
        if wheel.file(b, slot) {
            let slab = &self.slab;
            wheel.compact(b, |s| {
                slab[s as usize].as_ref().is_some_and(|e| e.bucket == b)
            });
        }
    }

    fn alloc(&mut self, entry: Entry<K, V, T>) -> u32 {
        if let Some(s) = self.free.pop() {
            self.slab[s as usize] = Some(entry);
            return s;
        }
        if self.slab.len() == self.slab.capacity() {
            // Grow by doubling up to this shard's share, then by an eighth: shards of a full
            // cache hold their share give or take a little, so the slab wastes almost nothing.
            let len = self.slab.len() as u64;
            let extra = if len < self.share {
                len.max(4).min(self.share - len)
            } else {
                (len / 8).max(4)
            };
            self.slab.reserve_exact(extra as usize);
            self.times.reserve_exact(extra as usize * self.extra);
        }
        let s = u32::try_from(self.slab.len()).expect("a shard holds at most 2^32 entries");
        self.slab.push(Some(entry));
        for _ in 0..self.extra {
            self.times.push(AtomicU64::new(NEVER));
        }
        s
    }

    /// Inserts or replaces. Entries already expired at `now` are not stored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        weight: u32,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        hasher: &S,
        (load_nanos, cap): (u64, u64),
        out: &mut Garbage<K, V>,
    ) {
        self.expire(now, false, hasher, out);
        let capped = |(effective, hard): (u64, u64)| (effective.min(cap), hard.min(cap));
        self.supersede(hash, &key, out);
        let factor = self.jitter_factor();
        if let Some(slot) = self.find(hash, &key) {
            let current = self.deadline(slot);
            if current <= now {
                // Expired but not yet reclaimed: it is dead. The new value is a creation (it
                // inherits neither the old deadline nor its hits or queue place).
                self.remove_slot(slot, hash, RemovalCause::Expired, out);
            } else {
                let e = self.slab[slot as usize]
                    .as_mut()
                    .expect("found slot is live");
                let times = capped(exp.on_update(&e.key, &value, now, current, factor));
                if times.0 <= now {
                    self.remove_slot(slot, hash, RemovalCause::Expired, out);
                    out.push(Removed::expired(key, value, weight));
                    return;
                }
                let old = std::mem::replace(&mut e.value, value);
                let old_weight = std::mem::replace(&mut e.weight, weight);
                record_hit(&e.hits);
                let place = e.place;
                self.policy.on_reweigh(place, old_weight, weight);
                self.weight = self.weight - u64::from(old_weight) + u64::from(weight);
                self.set_times(slot, times, now, load_nanos);
                out.push(Removed {
                    key,
                    value: old,
                    weight: old_weight,
                    cause: RemovalCause::Replaced,
                });
                return;
            }
        }
        self.create(
            hash,
            key,
            value,
            weight,
            now,
            exp,
            hasher,
            out,
            (load_nanos, cap),
            factor,
        );
    }

    /// Inserts a key that has no entry. User code (the `Expiry` callback, the keys' `Hash` when
    /// the table grows) runs before anything is mutated.
    #[allow(clippy::too_many_arguments)]
    fn create<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        weight: u32,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        hasher: &S,
        out: &mut Garbage<K, V>,
        (load_nanos, cap): (u64, u64),
        factor: f64,
    ) {
        let (effective, hard) = exp.on_create(&key, &value, now, factor);
        let times = (effective.min(cap), hard.min(cap));
        if times.0 <= now {
            // Already expired (a zero time to live): never stored.
            out.push(Removed::expired(key, value, weight));
            return;
        }
        self.reserve_table(hasher, out);
        let slot = self.alloc(Entry {
            key,
            value,
            weight,
            hits: AtomicU8::new(0),
            place: Place::Window,
            bucket: NO_BUCKET,
            time: T::fresh(),
        });
        let slab = &self.slab;
        self.table.insert_unique(hash, slot, |&s| {
            hasher.hash_one(&slab[s as usize].as_ref().expect("table slots are live").key)
        });
        self.weight += u64::from(weight);
        self.len += 1;
        self.set_times(slot, times, now, load_nanos);
        self.policy
            .on_insert(&mut self.slab, slot, hash, |e| hasher.hash_one(&e.key));
    }

    /// Makes room in the table for one more slot, so that the insertion that follows does not
    /// rehash (running the keys' `Hash`) after the slot is allocated. If a key's `Hash` panics
    /// while the table grows, the entry of that key is removed (it could no longer be found)
    /// and the panic is resumed, with the shard consistent.
    fn reserve_table<S: BuildHasher>(&mut self, hasher: &S, out: &mut Garbage<K, V>) {
        if self.table.len() < self.table.capacity() {
            return;
        }
        let failed = std::cell::RefCell::new(Vec::new());
        let panic = std::cell::RefCell::new(None);
        {
            let slab = &self.slab;
            self.table.reserve(1, |&s| {
                let key = &slab[s as usize].as_ref().expect("table slots are live").key;
                let hashed =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hasher.hash_one(key)));
                hashed.unwrap_or_else(|p| {
                    failed.borrow_mut().push(s);
                    panic.borrow_mut().get_or_insert(p);
                    0 // filed under a dummy hash, removed below
                })
            });
        }
        for s in failed.into_inner() {
            self.remove_slot(s, 0, RemovalCause::Explicit, out);
        }
        if let Some(p) = panic.into_inner() {
            std::panic::resume_unwind(p);
        }
    }

    /// Unlinks a live slot from the table and the wheel and takes its entry. The slot is left
    /// empty; the caller decides whether it is free now or still referenced by a queue.
    fn take_slot(&mut self, slot: u32, hash: u64) -> Entry<K, V, T> {
        match self.table.find_entry(hash, |&s| s == slot) {
            Ok(found) => {
                found.remove();
            }
            // The key hashes differently now than when it was inserted (a `Hash` that is not a
            // function of the key): find its slot by scanning, so that the table never keeps
            // an index to a freed slot. Only that key misbehaves.
            Err(_) => self.table.retain(|&mut s| s != slot),
        }
        let e = self.slab[slot as usize].take().expect("taking a live slot");
        if e.bucket != NO_BUCKET {
            if let Some(w) = &mut self.wheel {
                w.unfile(e.bucket);
            }
        }
        self.weight -= u64::from(e.weight);
        self.len -= 1;
        e
    }

    /// Removes a live entry that is still queued in the policy (a caller's removal or expiry).
    fn remove_slot(&mut self, slot: u32, hash: u64, cause: RemovalCause, out: &mut Garbage<K, V>) {
        let e = self.take_slot(slot, hash);
        if self.policy.on_remove(e.place, e.weight) {
            self.policy.purge_tombstones(&self.slab, &mut self.free);
        }
        out.push(Removed {
            key: e.key,
            value: e.value,
            weight: e.weight,
            cause,
        });
    }

    /// Removes `key`; the removed entry (if any, and not expired) is pushed last onto `out`.
    /// Returns whether a live entry was removed.
    pub(crate) fn remove<Q, S: BuildHasher>(
        &mut self,
        hash: u64,
        key: &Q,
        now: u64,
        hasher: &S,
        out: &mut Garbage<K, V>,
        cause: RemovalCause,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.expire(now, false, hasher, out);
        self.supersede(hash, key, out);
        let Some(slot) = self.find(hash, key) else {
            return false;
        };
        let live = self.deadline(slot) > now;
        let cause = if live { cause } else { RemovalCause::Expired };
        self.remove_slot(slot, hash, cause, out);
        live
    }

    /// Removes `key`'s entry only if it is expired at `now` (a reader saw it expired; a write
    /// may have replaced it since). Supersedes nothing. Returns whether it removed one.
    pub(crate) fn remove_expired<Q>(
        &mut self,
        hash: u64,
        key: &Q,
        now: u64,
        out: &mut Garbage<K, V>,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.find(hash, key) {
            Some(slot) if self.deadline(slot) <= now => {
                self.remove_slot(slot, hash, RemovalCause::Expired, out);
                true
            }
            _ => false,
        }
    }

    /// Applies the policy configuration the cache's selector chose (a tune word, see
    /// [`crate::policy::tune_word`]); nothing if it did not change. Called before evicting:
    /// the configuration matters only then.
    #[inline]
    pub(crate) fn retune<S: BuildHasher>(&mut self, hasher: &S, tune: u64) {
        self.policy
            .retune(&mut self.slab, &mut self.free, tune, |e| {
                hasher.hash_one(&e.key)
            });
    }

    /// Evicts one entry chosen by the policy. Returns false when the shard is empty.
    pub(crate) fn evict_one<S: BuildHasher>(
        &mut self,
        hasher: &S,
        out: &mut Garbage<K, V>,
    ) -> bool {
        let Some(slot) = self
            .policy
            .evict(&mut self.slab, &mut self.free, |e| hasher.hash_one(&e.key))
        else {
            return false;
        };
        let hash = hasher.hash_one(
            &self.slab[slot as usize]
                .as_ref()
                .expect("victim is live")
                .key,
        );
        let e = self.take_slot(slot, hash);
        self.free.push(slot);
        out.push(Removed {
            key: e.key,
            value: e.value,
            weight: e.weight,
            cause: RemovalCause::Size,
        });
        true
    }

    /// Advances the timer wheel to `now` and removes entries whose deadline passed: all of them
    /// when `exact`, else those due before the current wheel tick (≈1 s granularity).
    #[inline(always)]
    pub(crate) fn expire<S: BuildHasher>(
        &mut self,
        now: u64,
        exact: bool,
        hasher: &S,
        out: &mut Garbage<K, V>,
    ) {
        if self.wheel.is_none() {
            return;
        }
        if self.refile_pending.load(Ordering::Relaxed) {
            self.file_moved();
        }
        if let Some(wheel) = &mut self.wheel {
            if !wheel.advance_within_tick(now, exact) {
                self.expire_due(now, exact, hasher, out);
            }
        }
    }

    fn expire_due<S: BuildHasher>(
        &mut self,
        now: u64,
        exact: bool,
        hasher: &S,
        out: &mut Garbage<K, V>,
    ) {
        let Some(wheel) = &mut self.wheel else { return };
        let mut due = Vec::new();
        wheel.advance(now, exact, &mut due);
        if due.is_empty() {
            return;
        }
        let mut refile = Vec::new();
        for (b, slots) in due {
            for s in slots {
                let Some(e) = self.slab[s as usize].as_mut() else {
                    continue;
                };
                if e.bucket != b {
                    continue; // stale index, or a duplicate already handled
                }
                e.bucket = NO_BUCKET;
                let d = e.time.get();
                if d <= now {
                    let hash = hasher.hash_one(&e.key);
                    self.remove_slot(s, hash, RemovalCause::Expired, out);
                } else {
                    refile.push((s, d));
                }
            }
        }
        for (s, d) in refile {
            self.file(s, d);
        }
    }

    /// Removes every entry (and supersedes every load in flight).
    pub(crate) fn clear(&mut self, out: &mut Garbage<K, V>) {
        for (k, f) in self.flights.drain() {
            f.supersede();
            out.detach(k, f);
        }
        for e in self.slab.drain(..).flatten() {
            out.push(Removed {
                key: e.key,
                value: e.value,
                weight: e.weight,
                cause: RemovalCause::Explicit,
            });
        }
        self.table.clear();
        self.free.clear();
        self.times.clear();
        self.policy.clear();
        if let Some(w) = &mut self.wheel {
            w.clear();
        }
        self.weight = 0;
        self.len = 0;
    }

    /// Removes every live entry for which `keep` returns false (and every expired one).
    pub(crate) fn retain<S: BuildHasher>(
        &mut self,
        now: u64,
        hasher: &S,
        keep: &mut impl FnMut(&K, &V) -> bool,
        out: &mut Garbage<K, V>,
    ) {
        for s in 0..self.slab.len() as u32 {
            let Some(e) = &self.slab[s as usize] else {
                continue;
            };
            let expired = self.deadline(s) <= now;
            if expired || !keep(&e.key, &e.value) {
                let hash = hasher.hash_one(&e.key);
                let cause = if expired {
                    RemovalCause::Expired
                } else {
                    RemovalCause::Explicit
                };
                self.remove_slot(s, hash, cause, out);
            }
        }
    }

    /// Clones of every live entry (for iteration outside the lock).
    pub(crate) fn snapshot(&self, now: u64) -> Vec<(K, V)>
    where
        K: Clone,
        V: Clone,
    {
        let mut v = Vec::with_capacity(self.len);
        for (s, e) in self.slab.iter().enumerate() {
            if let Some(e) = e {
                if self.deadline(s as u32) > now {
                    v.push((e.key.clone(), e.value.clone()));
                }
            }
        }
        v
    }

    /// Checks every internal invariant; panics with a message on the first violation.
    pub(crate) fn validate<S: BuildHasher>(&self, hasher: &S) {
        let live: Vec<u32> = (0..self.slab.len() as u32)
            .filter(|&s| self.slab[s as usize].is_some())
            .collect();
        assert_eq!(live.len(), self.len, "len counts live slots");
        assert_eq!(
            self.table.len(),
            self.len,
            "table holds every live slot once"
        );
        let mut weight = 0u64;
        for &s in &live {
            let e = self.slab[s as usize].as_ref().expect("live");
            weight += u64::from(e.weight);
            let h = hasher.hash_one(&e.key);
            assert_eq!(
                self.find(h, &e.key),
                Some(s),
                "table maps the key to its slot"
            );
            if let Some(_w) = &self.wheel {
                // Filed if it has a deadline (or waiting to be filed, after a read moved it). A
                // deadline that moved to "never" may stay filed: the wheel is lazy.
                let d = self.deadline(s);
                assert!(
                    d == NEVER || e.bucket != NO_BUCKET || self.refile_waits(s),
                    "an entry with a deadline is filed"
                );
            }
        }
        assert_eq!(weight, self.weight, "weight is the sum of entry weights");
        for &f in &self.free {
            assert!(self.slab[f as usize].is_none(), "free slots are empty");
        }
        self.policy.validate(&self.slab);
    }

    /// The heap bytes this shard holds (for memory tests).
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Option<Entry<K, V, T>>>() * self.slab.capacity()
            + self.table.capacity() * (4 + 1)
            + self.times.capacity() * 8
            + self.free.capacity() * 4
            + self.wheel.as_ref().map_or(0, |w| w.heap_bytes())
            + self.policy.sketch().heap_bytes()
            + self.policy.ghost().heap_bytes()
    }
}

/// A shard: the single-threaded [`Core`] in the layout the cache's configuration calls for —
/// deadlines in the slab slots when anything keeps time, none at all otherwise (24-byte slots
/// for `u64 → u64`). The enum costs one predictable branch per call.
pub(crate) enum Shard<K, V> {
    Plain(Core<K, V, ()>),
    Timed(Core<K, V, AtomicU64>),
}

/// Runs the same code on either layout.
macro_rules! each {
    ($self:expr, $core:ident => $body:expr) => {
        match $self {
            Shard::Plain($core) => $body,
            Shard::Timed($core) => $body,
        }
    };
}

impl<K: Hash + Eq + 'static, V: 'static> Shard<K, V> {
    pub(crate) fn new(share: u64, layout: Layout, now: u64, seed: u64) -> Self {
        if layout.stride > 0 {
            Shard::Timed(Core::new(share, layout, now, seed))
        } else {
            Shard::Plain(Core::new(share, layout, now, seed))
        }
    }

    pub(crate) fn remove_flight(&mut self, hash: u64, f: &Arc<Flight<K, V>>) -> Option<K> {
        each!(self, c => c.remove_flight(hash, f))
    }

    pub(crate) fn claim_flight<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        flight: Arc<Flight<K, V>>,
        now: u64,
        serve_negative: bool,
        hasher: &S,
    ) -> FlightClaim<K, V> {
        each!(self, c => c.claim_flight(hash, key, flight, now, serve_negative, hasher))
    }

    pub(crate) fn flights_len(&self) -> usize {
        each!(self, c => c.flights_len())
    }

    #[inline]
    pub(crate) fn weight(&self) -> u64 {
        each!(self, c => c.weight())
    }

    pub(crate) fn len(&self) -> usize {
        each!(self, c => c.len())
    }

    #[inline]
    pub(crate) fn share(&self) -> u64 {
        each!(self, c => c.share())
    }

    #[inline]
    pub(crate) fn lookup<Q>(
        &self,
        hash: u64,
        key: &Q,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        coin: impl FnOnce() -> f64,
    ) -> Found<'_, K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        each!(self, c => c.lookup(hash, key, now, exp, coin))
    }

    pub(crate) fn set_refresh_at<Q>(&self, hash: u64, key: &Q, at: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        each!(self, c => c.set_refresh_at(hash, key, at))
    }

    pub(crate) fn peek<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        each!(self, c => c.peek(hash, key, now))
    }

    pub(crate) fn reset_refresh<Q>(&self, hash: u64, key: &Q, at: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        each!(self, c => c.reset_refresh(hash, key, at))
    }

    pub(crate) fn refresh_deadline_of(&self, value: &V) -> Option<&AtomicU64> {
        each!(self, c => c.refresh_deadline_of(value))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn insert<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        weight: u32,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        hasher: &S,
        meta: (u64, u64),
        out: &mut Garbage<K, V>,
    ) {
        each!(self, c => c.insert(hash, key, value, weight, now, exp, hasher, meta, out))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn remove<Q, S: BuildHasher>(
        &mut self,
        hash: u64,
        key: &Q,
        now: u64,
        hasher: &S,
        out: &mut Garbage<K, V>,
        cause: RemovalCause,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        each!(self, c => c.remove(hash, key, now, hasher, out, cause))
    }

    pub(crate) fn remove_expired<Q>(
        &mut self,
        hash: u64,
        key: &Q,
        now: u64,
        out: &mut Garbage<K, V>,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        each!(self, c => c.remove_expired(hash, key, now, out))
    }

    pub(crate) fn is_registered(&self, hash: u64, f: &Arc<Flight<K, V>>) -> bool {
        each!(self, c => c.is_registered(hash, f))
    }

    pub(crate) fn evict_one<S: BuildHasher>(
        &mut self,
        hasher: &S,
        out: &mut Garbage<K, V>,
    ) -> bool {
        each!(self, c => c.evict_one(hasher, out))
    }

    pub(crate) fn retune<S: BuildHasher>(&mut self, hasher: &S, tune: u64) {
        each!(self, c => c.retune(hasher, tune))
    }

    pub(crate) fn expire<S: BuildHasher>(
        &mut self,
        now: u64,
        exact: bool,
        hasher: &S,
        out: &mut Garbage<K, V>,
    ) {
        each!(self, c => c.expire(now, exact, hasher, out))
    }

    pub(crate) fn clear(&mut self, out: &mut Garbage<K, V>) {
        each!(self, c => c.clear(out))
    }

    pub(crate) fn retain<S: BuildHasher>(
        &mut self,
        now: u64,
        hasher: &S,
        keep: &mut impl FnMut(&K, &V) -> bool,
        out: &mut Garbage<K, V>,
    ) {
        each!(self, c => c.retain(now, hasher, keep, out))
    }

    pub(crate) fn snapshot(&self, now: u64) -> Vec<(K, V)>
    where
        K: Clone,
        V: Clone,
    {
        each!(self, c => c.snapshot(now))
    }

    pub(crate) fn validate<S: BuildHasher>(&self, hasher: &S) {
        each!(self, c => c.validate(hasher))
    }

    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        each!(self, c => c.heap_bytes())
    }

    #[cfg(test)]
    fn slab_len(&self) -> usize {
        each!(self, c => c.slab.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = ahash::RandomState;

    fn shard(cap: u64, stride: usize) -> (Shard<u64, u64>, S) {
        let layout = Layout::new(stride, None, None, 0.0);
        (Shard::new(cap, layout, 0, 7), S::with_seeds(1, 2, 3, 4))
    }

    /// Inserts `k → v` (weight 1, time 0, no expiry) in the policy's first configuration.
    fn put(
        s: &mut Shard<u64, u64>,
        h: &S,
        k: u64,
        v: u64,
        _tick: u64,
        out: &mut Garbage<u64, u64>,
    ) {
        let exp = ExpiryConfig::None;
        s.insert(h.hash_one(k), k, v, 1, 0, &exp, h, (0, NEVER), out);
    }

    #[test]
    fn entry_slots_are_24_and_32_bytes() {
        assert_eq!(std::mem::size_of::<Option<Entry<u64, u64, ()>>>(), 24);
        assert_eq!(
            std::mem::size_of::<Option<Entry<u64, u64, AtomicU64>>>(),
            32
        );
    }

    #[test]
    fn insert_lookup_replace_remove() {
        let (mut s, h) = shard(10, 0);
        let mut out = Garbage::new();
        let exp = ExpiryConfig::None;
        put(&mut s, &h, 1, 10, 0, &mut out);
        assert!(matches!(
            s.lookup(h.hash_one(1u64), &1, 0, &exp, || 1.0),
            Found::Hit(&10)
        ));
        put(&mut s, &h, 1, 11, 0, &mut out);
        assert_eq!(
            out.pop().map(|r| (r.value, r.cause)),
            Some((10, RemovalCause::Replaced))
        );
        assert!(matches!(
            s.lookup(h.hash_one(1u64), &1, 0, &exp, || 1.0),
            Found::Hit(&11)
        ));
        assert!(s.remove(
            h.hash_one(1u64),
            &1,
            0,
            &h,
            &mut out,
            RemovalCause::Explicit
        ));
        assert!(matches!(
            s.lookup(h.hash_one(1u64), &1, 0, &exp, || 1.0),
            Found::Absent
        ));
        s.validate(&h);
    }

    #[test]
    fn eviction_keeps_the_policy_consistent() {
        let (mut s, h) = shard(50, 0);
        let mut out = Garbage::new();
        let exp = ExpiryConfig::None;
        for i in 0..10_000u64 {
            let k = (i * 7919) % 300;
            if let Found::Absent = s.lookup(h.hash_one(k), &k, 0, &exp, || 1.0) {
                put(&mut s, &h, k, i, i, &mut out);
                while s.weight() > 50 {
                    assert!(s.evict_one(&h, &mut out));
                }
            }
            if i % 97 == 0 {
                s.remove(
                    h.hash_one(k + 1),
                    &(k + 1),
                    0,
                    &h,
                    &mut out,
                    RemovalCause::Explicit,
                );
            }
        }
        s.validate(&h);
        assert!(s.len() <= 50);
    }

    #[test]
    fn tombstones_are_purged() {
        let (mut s, h) = shard(1_000_000, 0);
        let mut out = Garbage::new();
        for i in 0..100_000u64 {
            put(&mut s, &h, i, i, 0, &mut out);
            s.remove(h.hash_one(i), &i, 0, &h, &mut out, RemovalCause::Explicit);
        }
        s.validate(&h);
        assert!(s.slab_len() < 1000, "slots are reused: {}", s.slab_len());
    }

    #[test]
    fn memory_per_entry_matches_the_formula() {
        // One shard filled to its share: slot (24) + table (≤ 11) + free list (0) + deadlines +
        // the frequency sketch and the ghost (2 bytes per entry, rounded up to a power of two),
        // sized for the share as ones built for it up front are.
        let sketch = (crate::sketch::Sketch::new(100_000).heap_bytes()
            + crate::ghost::Ghost::new(100_000).heap_bytes()) as f64
            / 100_000.0;
        for stride in [0usize, 1] {
            let (mut s, h) = shard(100_000, stride);
            let mut out = Garbage::new();
            let exp = if stride == 0 {
                ExpiryConfig::None
            } else {
                ExpiryConfig::Fixed {
                    ttl: Some(u64::MAX / 2),
                    tti: None,
                }
            };
            for i in 0..100_000u64 {
                s.insert(h.hash_one(i), i, i, 1, 0, &exp, &h, (0, NEVER), &mut out);
            }
            let per_entry = s.heap_bytes() as f64 / 100_000.0;
            let bound = 24.0 + 11.0 + sketch + if stride == 1 { 8.0 + 8.0 } else { 0.0 };
            assert!(
                per_entry <= bound,
                "stride {stride}: {per_entry:.1} > {bound}"
            );
        }
    }

    #[test]
    fn a_byte_weighted_shard_pays_for_its_entries_not_its_capacity() {
        // Values of 100 bytes, weighed in bytes. The sketch follows a shard's entries, not its
        // capacity in bytes, whether the shard is filling (a 128 MiB share and 25,000 values:
        // what 200,000 values put in each of the 8 shards of a 1 GiB cache) or full and evicting
        // (a 1 MiB share: about 10,500 values).
        let exp = ExpiryConfig::None;
        for share in [1u64 << 27, 1 << 20] {
            let (mut s, h) = shard(share, 0);
            let mut out = Garbage::new();
            for i in 0..25_000u64 {
                s.insert(h.hash_one(i), i, i, 100, 0, &exp, &h, (0, NEVER), &mut out);
                while s.weight() > share {
                    assert!(s.evict_one(&h, &mut out));
                }
            }
            s.validate(&h);
            let sketch = each!(&s, c => c.policy.sketch().heap_bytes());
            let len = s.len();
            let per_entry = s.heap_bytes() as f64 / len as f64;
            eprintln!(
                "share {share}: {len} entries, a sketch of {sketch} bytes, \
                 {per_entry:.1} heap bytes per entry in all"
            );
            assert!(
                sketch <= 16 * len,
                "share {share}: a sketch of {sketch} bytes for {len} entries"
            );
        }
    }

    #[test]
    fn wheel_reclaims_untouched_entries() {
        let (mut s, h) = shard(100, 1);
        let mut out = Garbage::new();
        let sec = 1_000_000_000u64;
        let exp = ExpiryConfig::Fixed {
            ttl: Some(5 * sec),
            tti: None,
        };
        for i in 0..50u64 {
            s.insert(h.hash_one(i), i, i, 1, 0, &exp, &h, (0, NEVER), &mut out);
        }
        out.clear();
        s.expire(4 * sec, false, &h, &mut out);
        assert_eq!(s.len(), 50);
        s.expire(7 * sec, false, &h, &mut out);
        assert_eq!(s.len(), 0, "every entry reclaimed without being touched");
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|r| r.cause == RemovalCause::Expired));
        s.validate(&h);
    }
}
