//! The single-threaded core of a shard: the slab of records, the hash table over it, the
//! policy, the timer wheel and the flight registry, behind one `&mut self` (the caller holds the
//! shard's write lock) or `&self` for lookups under the read lock.

use super::{Layout, Lookup, Record, SlotTime, STALE_FORGONE};
use crate::clock::NEVER;
use crate::expiry::{
    claim_refresh, give_back_refresh, Deadlines, ExpiryConfig, Refresh, TimerWheel, NO_BUCKET,
};
use crate::flight::Flights;
use crate::policy::{record_hit, Place, Policy};
use crate::removal::{RemovalCause, Removals, Removed, Tally};
use crate::rng::Rng;
use crate::sync::AtomicU64;
use crate::unwind::keep_first_locked;
pub(crate) use crate::unwind::Panic;
use hashbrown::HashTable;
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU8, Ordering};

mod reclaim;

/// The single-threaded core of a shard, generic over where entries keep their deadline.
pub(crate) struct Core<K, V, T> {
    table: HashTable<u32>,
    pub(super) slab: Vec<Option<Record<K, V, T>>>,
    free: Vec<u32>,
    /// Time data besides the effective deadline (which is in the slot), `extra` per slab
    /// slot: the hard deadline (with both TTL and TTI), then the refresh deadline and the last
    /// load's duration. Index `j` of the layout (`j ≥ 1`) is at `slot * extra + j - 1`.
    times: Vec<AtomicU64>,
    stride: usize,
    extra: usize,
    layout: Layout,
    /// xorshift state for jitter.
    rng: Rng,
    wheel: Option<TimerWheel>,
    pub(super) policy: Policy,
    weight: u64,
    len: usize,
    /// `len`, stored after every change (under the shard's write lock), for a count read
    /// without the lock (`Cache::entries_now`: `health` never waits for a shard lock).
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// This shard's share of the cache's capacity.
    share: u64,
    /// Loads in flight (and negative-cache entries), by key (see [`crate::load`]).
    flights: Flights<K, V>,
    /// Slots whose deadline a read moved earlier (or off "never") under the read lock, where
    /// the wheel cannot be touched: filed by the next write. Bounded; past the bound, `rescan`
    /// files every entry instead.
    refile: crate::sync::Mutex<Refile>,
    refile_pending: crate::sync::AtomicBool,
    /// Entries this shard removed, by cause (for the statistics).
    tally: Tally,
    /// With fail-safe: slots the timer wheel found past their deadline and kept for their
    /// stale window, oldest first — the first victims when the shard must make room (a stale
    /// value only serves while the backend fails; a live one serves every read). A slot is
    /// checked when taken (still occupied, by an entry past its deadline), so one freed,
    /// reused or given a new deadline since is skipped; compacted when it outgrows the shard.
    stale: std::collections::VecDeque<u32>,
    /// A key's `Hash` panic caught during an insert, for the cache to resume after the write's
    /// eviction ([`take_panic`](Self::take_panic)).
    /// (In a mutex only to keep the shard `Sync`: it is only reached through `&mut self`,
    /// under the write lock, by `get_mut`, which takes no lock: a write pays no atomic for it.)
    pending_panic: std::sync::Mutex<Option<Panic>>,
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
    pub(crate) fn new(
        share: u64,
        layout: Layout,
        now: u64,
        seed: u64,
        tune: u64,
        count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        let stride = layout.stride;
        Core {
            table: HashTable::new(),
            slab: Vec::new(),
            free: Vec::new(),
            times: Vec::new(),
            stride,
            extra: stride.saturating_sub(1),
            layout,
            rng: Rng::new(seed),
            wheel: (stride > 0).then(|| TimerWheel::new(now)),
            // In the cache's configuration from the start (a weighted cache's is fixed: had it
            // switched at its first eviction, the window's shrink would have handed every
            // entry, the newest too, to probation without an admission test).
            policy: Policy::new(share, seed, tune),
            weight: 0,
            len: 0,
            count,
            share,
            flights: Flights::new(),
            refile: crate::sync::Mutex::new(Refile::default()),
            refile_pending: crate::sync::AtomicBool::new(false),
            tally: Tally::default(),
            stale: std::collections::VecDeque::new(),
            pending_panic: std::sync::Mutex::new(None),
        }
    }

    fn pending_panic_mut(&mut self) -> &mut Option<Panic> {
        self.pending_panic
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The panic an insert caught and deferred (see [`Rehash`]), if any.
    pub(crate) fn take_panic(&mut self) -> Option<Panic> {
        self.pending_panic_mut().take()
    }

    /// Entries this shard removed so far, by cause.
    pub(crate) fn tally(&self) -> Tally {
        self.tally
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

    #[cfg(any(test, feature = "testing"))]
    /// Whether `slot` waits to be filed again (see [`Self::note_refile`]).
    fn refile_waits(&self, slot: u32) -> bool {
        let r = self.refile.lock();
        r.rescan || r.slots.contains(&slot)
    }

    pub(crate) fn flights(&mut self) -> &mut Flights<K, V> {
        &mut self.flights
    }

    pub(crate) fn flights_ref(&self) -> &Flights<K, V> {
        &self.flights
    }

    /// A write or invalidation of `key` supersedes its load in flight, if any: the flight is
    /// detached from the registry (its result will not be stored, and later callers do not join
    /// it). Its key goes to `out`, to be dropped after the lock is released.
    #[inline]
    fn supersede<Q>(&mut self, hash: u64, key: &Q, out: &mut Removals<K, V>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some((key, flight)) = self.flights.detach(hash, key) {
            out.detach(key, flight);
        }
    }

    /// [`supersede`](Self::supersede) for a write that owns its key and value: a panic of
    /// the key's `Eq` (user code) comes back, for the write to [`defer`](Self::defer) (nothing
    /// detached: the registry is as it was).
    fn try_supersede(&mut self, hash: u64, key: &K, out: &mut Removals<K, V>) -> Result<(), Panic> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.supersede(hash, key, out)
        }))
    }

    pub(crate) fn weight(&self) -> u64 {
        self.weight
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Publishes `len` for [`Cache::entries_now`](crate::Cache) (a relaxed store: a count read
    /// without the lock is of the last change made under it).
    #[inline]
    pub(super) fn store_count(&self) {
        self.count
            .store(self.len as u64, std::sync::atomic::Ordering::Relaxed);
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
        if !T::TIMED {
            return NEVER;
        }
        self.slab[slot as usize]
            .as_ref()
            .map_or(NEVER, |e| e.time.get())
    }

    /// Slot `j ≥ 1` of an entry's time data (see `times`).
    #[inline]
    fn extra(&self, slot: u32, j: usize) -> &AtomicU64 {
        &self.times[slot as usize * self.extra + j - 1]
    }

    /// Records a hit on `e` in the exact LRU order (after [`record_hit`] asked for it). Takes
    /// the entry, not its slot, and finds the slot from the entry's address in the slab: the
    /// read path then keeps no slot number alive for this cold call (measured: 1 instruction
    /// per hit of the default policy).
    #[cold]
    #[inline(never)]
    fn touch(&self, e: &Record<K, V, T>) {
        let base = self.slab.as_ptr() as usize;
        let slot = (e as *const Record<K, V, T> as usize - base)
            / std::mem::size_of::<Option<Record<K, V, T>>>();
        debug_assert!(self.slab[slot].as_ref().is_some_and(|r| std::ptr::eq(r, e)));
        self.policy.touch(slot as u32);
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
    ) -> Lookup<'_, K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(slot) = self.find(hash, key) else {
            return Lookup::Absent;
        };
        self.lookup_slot(slot, now, exp, coin)
    }

    /// [`lookup`](Self::lookup) of the entry [`peek_deadline`](Self::peek_deadline) saw, if
    /// the key still holds it: its deadline unchanged (a write since gives the key another
    /// deadline; so may a read, which has then done what this one would). Otherwise
    /// `Absent`, with nothing recorded. An untimed shard cannot tell: it reads whatever the
    /// key holds.
    pub(crate) fn lookup_unchanged<Q>(
        &self,
        hash: u64,
        key: &Q,
        now: u64,
        seen: u64,
        exp: &ExpiryConfig<K, V>,
        coin: impl FnOnce() -> f64,
    ) -> Lookup<'_, K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.find(hash, key) {
            Some(slot) if self.deadline(slot) == seen => self.lookup_slot(slot, now, exp, coin),
            _ => Lookup::Absent,
        }
    }

    /// `key`'s live value and its deadline, recording nothing (for a caller that decides
    /// whether the value is a read: [`lookup_unchanged`](Self::lookup_unchanged)).
    pub(crate) fn peek_deadline<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<(&V, u64)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.find(hash, key)?;
        let d = self.deadline(slot);
        if d <= now {
            return None;
        }
        Some((&self.slab[slot as usize].as_ref()?.value, d))
    }

    /// [`lookup`](Self::lookup) of the entry in `slot`.
    #[inline]
    fn lookup_slot(
        &self,
        slot: u32,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        coin: impl FnOnce() -> f64,
    ) -> Lookup<'_, K, V> {
        let Some(e) = &self.slab[slot as usize] else {
            return Lookup::Absent;
        };
        debug_assert_eq!(T::TIMED, self.stride > 0);
        if T::TIMED {
            let current = e.time.get();
            if current <= now {
                return Lookup::Expired;
            }
            if self.layout.reads_move {
                self.read_moves(slot, e, current, now, exp);
            }
            if let Some(r) = self.layout.refresh {
                match self.refresh_state(slot, r, now, current, coin) {
                    Refresh::Fresh => {}
                    Refresh::Due => {
                        if record_hit(&e.hits) {
                            self.touch(e);
                        }
                        return Lookup::StaleHit(&e.value);
                    }
                    Refresh::Won => {
                        if record_hit(&e.hits) {
                            self.touch(e);
                        }
                        return Lookup::Stale(&e.key, &e.value);
                    }
                }
            }
        }
        if record_hit(&e.hits) {
            self.touch(e);
        }
        Lookup::Hit(&e.value)
    }

    /// A read of the live entry in `slot` (deadline `current`) moves its deadline: a time to
    /// idle, or the `Expiry`'s `expire_after_read` (user code, under the shard's lock: it only
    /// computes the new deadline, nothing is changed before it returns).
    #[inline]
    fn read_moves(
        &self,
        slot: u32,
        e: &Record<K, V, T>,
        current: u64,
        now: u64,
        exp: &ExpiryConfig<K, V>,
    ) {
        let deadlines = self.deadlines(slot, current);
        if let Some((next, custom)) = exp.on_read(&e.key, &e.value, now, deadlines) {
            if exp.is_custom() {
                // The Expiry may move the deadline either way: it has the last word.
                e.time.set(next);
                if self.layout.custom {
                    self.extra(slot, 2).store(custom, Ordering::Relaxed);
                }
            } else {
                // A time to idle only moves it later; concurrent readers each move it
                // to their own clock reading, and the latest must win.
                e.time.raise(next);
            }
            // The wheel is lazy about deadlines that move later; one that moves
            // earlier (or off "never") must be filed again, by the next write.
            if next != NEVER && (next < current || e.bucket == NO_BUCKET) {
                self.note_refile(slot);
            }
        }
    }

    /// Whether the entry in `slot`, whose refresh deadline is its time slot `r`, should be
    /// refreshed now, and whether this caller won the right to start it (decided by
    /// [`crate::expiry::claim_refresh`]; the shard only stores the deadline).
    #[inline]
    fn refresh_state(
        &self,
        slot: u32,
        r: usize,
        now: u64,
        expires: u64,
        coin: impl FnOnce() -> f64,
    ) -> Refresh {
        let early = self
            .layout
            .early_beta
            .map(|beta| (beta, self.extra(slot, r + 1)));
        // XFetch measures the time left to the time-to-live deadline (a time to idle, moved
        // by every read, is not when the value gets old).
        let expires = if self.layout.hard {
            self.extra(slot, 1).load(Ordering::Relaxed)
        } else {
            expires
        };
        claim_refresh(self.extra(slot, r), early, now, expires, coin)
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
            self.extra(slot, r + 1)
                .fetch_or(crate::expiry::BACKING_OFF, Ordering::Relaxed);
        }
    }

    /// The refresh deadline of the entry whose value is `value` (a reference a lookup just
    /// returned), found by its address in the slab: no user code runs, so a reader can take it
    /// before anything that may panic.
    pub(crate) fn refresh_deadline_of(&self, value: &V) -> Option<&AtomicU64> {
        let r = self.layout.refresh?;
        Some(self.extra(self.slot_of(value)?, r))
    }

    /// The slot of the entry whose value is `value` (a reference a lookup returned).
    fn slot_of(&self, value: &V) -> Option<u32> {
        let size = std::mem::size_of::<Option<Record<K, V, T>>>();
        let offset = (value as *const V as usize).checked_sub(self.slab.as_ptr() as usize)?;
        let slot = offset / size;
        match self.slab.get(slot) {
            Some(Some(e)) if std::ptr::eq(&e.value, value) => Some(slot as u32),
            _ => None,
        }
    }

    /// [`reset_refresh`](Self::reset_refresh) of the entry whose value is `value` (found by
    /// its address: no user code runs).
    pub(crate) fn reset_refresh_of(&self, value: &V, at: u64) {
        if let Some(slot) = self.slot_of(value) {
            self.give_back_slot(slot, at);
        }
    }

    /// Gives back a read's claim to refresh `key` (its refresh deadline is
    /// [`REFRESHING`](crate::expiry::REFRESHING)): the entry is due again at `at`. A deadline set
    /// meanwhile (a new value) is kept.
    pub(crate) fn reset_refresh<Q>(&self, hash: u64, key: &Q, at: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.layout.refresh.is_none() {
            return;
        }
        if let Some(slot) = self.find(hash, key) {
            self.give_back_slot(slot, at);
        }
    }

    /// Gives back the claim to refresh the entry in `slot`, backing off (no early refresh)
    /// until the next write.
    fn give_back_slot(&self, slot: u32, at: u64) {
        if let Some(r) = self.layout.refresh {
            if give_back_refresh(self.extra(slot, r), at) {
                self.extra(slot, r + 1)
                    .fetch_or(crate::expiry::BACKING_OFF, Ordering::Relaxed);
            }
        }
    }

    /// Whether `key`'s entry is still claimed for a refresh (its refresh deadline is
    /// [`REFRESHING`](crate::expiry::REFRESHING)): not replaced by a write, nor removed, since
    /// a read claimed it.
    pub(crate) fn refresh_claimed<Q>(&self, hash: u64, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match (self.layout.refresh, self.find(hash, key)) {
            (Some(r), Some(slot)) => {
                self.extra(slot, r).load(Ordering::Relaxed) == crate::expiry::REFRESHING
            }
            _ => false,
        }
    }

    /// `key`'s entry if it is live at `now`.
    fn live<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<&Record<K, V, T>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.find(hash, key)?;
        if self.deadline(slot) <= now {
            return None;
        }
        self.slab[slot as usize].as_ref()
    }

    /// Looks `key` up without recording anything (for `contains_key`, `peek`-like calls).
    pub(crate) fn peek<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.live(hash, key, now).map(|e| &e.value)
    }

    /// [`peek`](Self::peek) for a read that is answered by the value (a load's re-check under
    /// the write lock finding a value stored since its lock-free lookup missed): as a
    /// [`lookup`](Self::lookup)'s hit, the read moves the entry's deadline (time to idle,
    /// `expire_after_read`) and is recorded for the policy (exact LRU makes the entry the most
    /// recently used).
    pub(crate) fn peek_read<Q>(
        &self,
        hash: u64,
        key: &Q,
        now: u64,
        exp: &ExpiryConfig<K, V>,
    ) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.find(hash, key)?;
        let current = self.deadline(slot);
        if current <= now {
            return None;
        }
        let e = self.slab[slot as usize].as_ref()?;
        if T::TIMED && self.layout.reads_move {
            self.read_moves(slot, e, current, now, exp);
        }
        if record_hit(&e.hits) {
            self.touch(e);
        }
        Some(&e.value)
    }

    /// Whether the entry in `slot` may be reclaimed at `now`: past its deadline and, with
    /// fail-safe, past its stale window too.
    #[inline]
    fn reclaimable(&self, slot: u32, now: u64) -> bool {
        let grace = self.layout.fail_safe.map_or(0, |(_, max)| max);
        self.deadline(slot).saturating_add(grace) <= now
    }

    /// With fail-safe: `key`'s value if its entry is past its deadline but within its stale
    /// window at `now`, with its retry deadline (0: no load of it has failed yet).
    pub(crate) fn stale<Q>(&self, hash: u64, key: &Q, now: u64) -> Option<(&V, &AtomicU64)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (j, max) = self.layout.fail_safe?;
        let slot = self.find(hash, key)?;
        let d = self.deadline(slot);
        if d > now || d.saturating_add(max) <= now {
            return None;
        }
        let retry = self.extra(slot, j);
        if retry.load(Ordering::Relaxed) == STALE_FORGONE {
            return None;
        }
        let e = self.slab[slot as usize].as_ref()?;
        Some((&e.value, retry))
    }

    /// With fail-safe: marks `key`'s value, live or not, as no fallback once past its deadline
    /// ([`STALE_FORGONE`]; the next write of the key resets it with the value). For a refresh
    /// that found the value invalidated (the Redis tier read a tombstone its instance had
    /// missed) and failed: the value stays live to its deadline, and is then no fallback.
    pub(crate) fn forgo_stale<Q>(&self, hash: u64, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some((j, _)) = self.layout.fail_safe {
            if let Some(slot) = self.find(hash, key) {
                self.extra(slot, j).store(STALE_FORGONE, Ordering::Relaxed);
            }
        }
    }

    /// Whether a load or a computation of `key` runs (a registered flight that is not a
    /// negative entry).
    pub(crate) fn loading<Q>(&self, hash: u64, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.flights.loading(hash, key)
    }

    /// What runs for `key`: `Some(false)` a load, `Some(true)` a computation, `None` neither.
    pub(crate) fn running_computes<Q>(&self, hash: u64, key: &Q) -> Option<bool>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.flights.running_computes(hash, key)
    }

    #[inline]
    fn set_times(&mut self, slot: u32, times: (u64, u64), now: u64, load_nanos: u64) {
        if T::TIMED {
            if self.extra == 0 {
                // A plain time to live or idle (the common case): the effective deadline, in
                // the record, is all there is.
                self.set_deadline(slot, times.0);
            } else {
                self.store_times(slot, times, now, load_nanos);
            }
        }
    }

    /// Stores the time data beyond the effective deadline, then the deadline (a custom
    /// `Expiry`'s own deadline is stored by the caller, which asked for it).
    fn store_times(&mut self, slot: u32, (effective, hard): (u64, u64), now: u64, load_nanos: u64) {
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
        if let Some((j, _)) = self.layout.fail_safe {
            self.extra(slot, j).store(0, Ordering::Relaxed);
        }
        self.set_deadline(slot, effective);
    }

    /// The deadlines `(effective, hard)` of the entry in `slot` (effective one: `current`)
    /// once its value is replaced by `value`, asked of the expiry configuration
    /// (`Expiry::expire_after_update` for a custom one: user code, before anything is
    /// mutated), bounded by `cap`; and a custom `Expiry`'s own deadline, for the caller to
    /// store once the write can no longer fail. Out of line: the common plain time to live
    /// does not come here.
    #[allow(clippy::too_many_arguments)]
    fn updated_times(
        &self,
        slot: u32,
        current: u64,
        value: &V,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        factor: f64,
        cap: u64,
    ) -> ((u64, u64), u64) {
        let deadlines = self.deadlines(slot, current);
        let e = self.slab[slot as usize]
            .as_ref()
            .expect("found slot is live");
        let d = exp.on_update(&e.key, value, now, deadlines, factor);
        ((d.effective.min(cap), d.hard.min(cap)), d.custom)
    }

    /// A write too heavy to store (see `Cache::insert_with`) still asks a custom `Expiry`
    /// about it, as moka does: `expire_after_update` when the key has a live entry (whose
    /// remaining time it is given), else `expire_after_create`. The answer is unused; user
    /// code, run before the write mutates anything. Nothing to ask of any other configuration.
    ///
    /// Returns the key and value, or `None` if the `Expiry` panicked: then the write stops
    /// there (see [`defer`](Self::defer)).
    pub(crate) fn ask_expiry_of_rejected(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        out: &mut Removals<K, V>,
    ) -> Option<(K, V)> {
        if !exp.is_custom() {
            return Some((key, value));
        }
        let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(slot) = self.find(hash, &key) {
                let current = self.deadline(slot);
                if current > now {
                    exp.on_update(&key, &value, now, self.deadlines(slot, current), 1.0);
                    return;
                }
            }
            exp.on_create(&key, &value, now, 1.0);
        }));
        match asked {
            Ok(()) => Some((key, value)),
            Err(p) => {
                self.defer(p, key, value, out);
                None
            }
        }
    }

    /// A write whose `Expiry` callback or key `Eq` (user code, under the lock) panicked stops
    /// before it mutates anything: the panic is kept for the cache to resume once the lock is
    /// released ([`take_panic`](Self::take_panic)), and the write's key and value go to `out`,
    /// dropped unlocked and unreported — a `Drop` that uses the cache must not find its shard
    /// locked.
    fn defer(&mut self, p: Panic, key: K, value: V, out: &mut Removals<K, V>) {
        keep_first_locked(self.pending_panic_mut(), p);
        out.discard(key, value);
    }

    /// The deadlines of the entry in `slot`, whose effective one is `effective` (for a custom
    /// `Expiry` without a slot of its own, its deadline is the effective one).
    fn deadlines(&self, slot: u32, effective: u64) -> Deadlines {
        let hard = if self.layout.hard {
            self.extra(slot, 1).load(Ordering::Relaxed)
        } else {
            NEVER
        };
        let custom = if self.layout.custom {
            self.extra(slot, 2).load(Ordering::Relaxed)
        } else {
            effective
        };
        Deadlines {
            effective,
            hard,
            custom,
        }
    }

    /// Sets the entry's effective deadline and files it in the timer wheel if it moved earlier.
    #[inline]
    fn set_deadline(&mut self, slot: u32, effective: u64) {
        // The wheel is lazy: an entry filed for an earlier deadline is checked when its bucket
        // comes due and filed again then, so a deadline that only moves later (a replaced
        // value's new time to live) needs no filing now.
        let mut refile = true;
        if let Some(e) = &self.slab[slot as usize] {
            refile = e.bucket == NO_BUCKET || effective < e.time.get();
            e.time.set(effective);
        }
        if refile {
            self.file(slot, effective);
        }
    }

    /// A uniform factor in [1 − jitter, 1 + jitter] (exactly 1 without jitter).
    fn jitter_factor(&mut self) -> f64 {
        if !T::TIMED || self.layout.jitter == 0.0 {
            return 1.0;
        }
        crate::expiry::jitter_factor(self.layout.jitter, self.rng.unit())
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

    fn alloc(&mut self, entry: Record<K, V, T>) -> u32 {
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
        (load_nanos, cap): (u64, u64),
        out: &mut Removals<K, V>,
    ) {
        self.expire(now, false, hasher, out);
        // The key's flight is superseded (a load or computation running loses to this write)
        // only once the user code of the write has run (the key's `Eq`, an `Expiry` callback,
        // the keys' `Hash` if the table grows): a write that panics there stores nothing and
        // supersedes nothing.
        let factor = if self.layout.plain_ttl.is_none() {
            self.jitter_factor()
        } else {
            1.0
        };
        let mut dead = None;
        // The key's `Eq` (user code, under the lock): if it panics, the write stops here, its
        // key and value dropped once the lock is released (see `defer`).
        let found =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.find(hash, &key)));
        let found = match found {
            Ok(found) => found,
            Err(p) => return self.defer(p, key, value, out),
        };
        if let Some(slot) = found {
            let current = self.deadline(slot);
            if current <= now {
                // Expired but not yet reclaimed (or kept for fail-safe): it is dead. The new
                // value is a creation (it inherits neither the old deadline nor its hits or
                // queue place); `create` removes the old entry once the user code it calls
                // has run, so that a panic there leaves it (fail-safe's last value) in place.
                dead = Some(slot);
            } else {
                // The custom `Expiry`'s own deadline, stored with the new value (not before the
                // write can no longer fail: a panic of the key's `Eq` while superseding its
                // load would leave the old value under the new deadline).
                let mut custom = None;
                let times = match self.layout.plain_ttl {
                    Some(ttl) if T::TIMED => plain(now, ttl, cap),
                    _ if !T::TIMED => untimed(exp, cap),
                    _ => {
                        let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.updated_times(slot, current, &value, now, exp, factor, cap)
                        }));
                        match asked {
                            Ok((times, c)) => {
                                custom = Some(c);
                                times
                            }
                            Err(p) => return self.defer(p, key, value, out),
                        }
                    }
                };
                if let Err(p) = self.try_supersede(hash, &key, out) {
                    return self.defer(p, key, value, out);
                }
                if times.0 <= now {
                    // The live old value is replaced (as in moka); the new one, due at once,
                    // expires.
                    self.remove_slot(slot, hash, RemovalCause::Replaced, out);
                    self.tally.push(out, Removed::expired(key, value, weight));
                    return;
                }
                let e = self.slab[slot as usize]
                    .as_mut()
                    .expect("found slot is live");
                let old = std::mem::replace(&mut e.value, value);
                let old_weight = std::mem::replace(&mut e.weight, weight);
                if record_hit(&e.hits) {
                    self.policy.touch(slot);
                }
                if old_weight != weight {
                    self.policy.on_reweigh(slot, e.place, old_weight, weight);
                    self.weight = self.weight - u64::from(old_weight) + u64::from(weight);
                }
                if let Some(c) = custom.filter(|_| self.layout.custom) {
                    self.extra(slot, 2).store(c, Ordering::Relaxed);
                }
                self.set_times(slot, times, now, load_nanos);
                self.tally.push(
                    out,
                    Removed {
                        key,
                        value: old,
                        weight: old_weight,
                        cause: RemovalCause::Replaced,
                    },
                );
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
            (load_nanos, cap, dead),
            factor,
        );
    }

    /// Inserts a key that has no live entry; `dead`: the slot of its expired entry, if it has
    /// one (removed, reported `Expired`). User code (the `Expiry` callback, the keys' `Hash`
    /// when the table grows) runs before anything is mutated.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn create<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        weight: u32,
        now: u64,
        exp: &ExpiryConfig<K, V>,
        hasher: &S,
        out: &mut Removals<K, V>,
        (load_nanos, cap, dead): (u64, u64, Option<u32>),
        factor: f64,
    ) {
        let mut custom = NEVER;
        let times = if !T::TIMED {
            untimed(exp, cap)
        } else if let Some(ttl) = self.layout.plain_ttl {
            plain(now, ttl, cap)
        } else {
            let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                exp.on_create(&key, &value, now, factor)
            }));
            let d = match asked {
                Ok(d) => d,
                Err(p) => return self.defer(p, key, value, out),
            };
            custom = d.custom;
            (d.effective.min(cap), d.hard.min(cap))
        };
        if times.0 <= now {
            // Already expired (a zero time to live): never stored.
            if let Err(p) = self.try_supersede(hash, &key, out) {
                return self.defer(p, key, value, out);
            }
            if let Some(s) = dead {
                self.remove_slot(s, hash, RemovalCause::Expired, out);
            }
            self.tally.push(out, Removed::expired(key, value, weight));
            return;
        }
        self.reserve_table(hasher, out);
        if let Err(p) = self.try_supersede(hash, &key, out) {
            return self.defer(p, key, value, out);
        }
        if let Some(s) = dead {
            self.remove_slot(s, hash, RemovalCause::Expired, out);
        }
        let slot = self.alloc(Record {
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
        self.store_count();
        if T::TIMED && self.layout.custom {
            self.extra(slot, 2).store(custom, Ordering::Relaxed);
        }
        self.set_times(slot, times, now, load_nanos);
        let rehash = Rehash::new(hasher);
        self.policy
            .on_insert(&mut self.slab, slot, hash, |e| rehash.of(&e.key));
        // Resumed by the cache once the write has evicted what it must (`take_panic`): the
        // new entry is in, the bound is not restored yet.
        rehash.finish_into(self.pending_panic_mut());
    }

    /// Makes room in the table for one more slot, so that the insertion that follows does not
    /// rehash (running the keys' `Hash`) after the slot is allocated. If a key's `Hash` panics
    /// while the table grows, the entry of that key is removed (it could no longer be found)
    /// and the panic is resumed, with the shard consistent.
    fn reserve_table<S: BuildHasher>(&mut self, hasher: &S, out: &mut Removals<K, V>) {
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
                    keep_first_locked(&mut panic.borrow_mut(), p);
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

    #[cfg(any(test, feature = "testing"))]
    /// Checks every internal invariant; panics with a message on the first violation.
    pub(crate) fn validate<S: BuildHasher>(&self, hasher: &S) {
        let live: Vec<u32> = (0..self.slab.len() as u32)
            .filter(|&s| self.slab[s as usize].is_some())
            .collect();
        assert_eq!(live.len(), self.len, "len counts live slots");
        assert_eq!(
            self.count.load(std::sync::atomic::Ordering::Relaxed),
            self.len as u64,
            "the stored count is len"
        );
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
            if let Some(w) = &self.wheel {
                // Filed if it has a deadline (or waiting to be filed, after a read moved it). A
                // deadline that moved to "never" may stay filed: the wheel is lazy. With
                // fail-safe an expired entry (one the wheel has passed) is filed at its
                // deadline plus the stale window, and not at all when that sum is "never" (a
                // `max_stale` of `Duration::MAX`).
                let grace = self.layout.fail_safe.map_or(0, |(_, max)| max);
                let d = self.deadline(s);
                let kept_for_good = d <= w.time() && d.saturating_add(grace) == NEVER;
                assert!(
                    d == NEVER || e.bucket != NO_BUCKET || self.refile_waits(s) || kept_for_good,
                    "an entry with a deadline is filed"
                );
                // Filed where the wheel still looks: an entry whose time the wheel has passed
                // waits in the current tick's bucket (not in one already drained).
                let at = if d <= w.time() {
                    d.saturating_add(grace)
                } else {
                    d
                };
                if let Some(b) = w.overdue_bucket(at) {
                    assert!(
                        e.bucket == b || e.bucket == NO_BUCKET || self.refile_waits(s),
                        "an overdue entry is filed in bucket {} instead of the current {b}",
                        e.bucket
                    );
                }
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
        std::mem::size_of::<Option<Record<K, V, T>>>() * self.slab.capacity()
            + self.table.capacity() * (4 + 1)
            + self.times.capacity() * 8
            + self.free.capacity() * 4
            + self.stale.capacity() * 4
            + self.wheel.as_ref().map_or(0, |w| w.heap_bytes())
            + self.policy.sketch().heap_bytes()
            + self.policy.ghost().heap_bytes()
            + self.policy.recency_bytes()
    }
}

/// Hashes the keys of resident entries under the write lock — to unlink an expired entry or a
/// victim, to count one in the frequency sketch — where a key's `Hash` that panics must not
/// leave the shard half-changed (an entry unlinked from the timer wheel but still in the map, a
/// victim taken out of the policy's queues but not out of the map). The panic is caught: that
/// key gets a stand-in hash for the rest of the operation (its slot is then found by scanning
/// the table, [`Core::take_slot`]; its frequency count goes to another key's counters), the
/// operation completes, and [`finish`](Self::finish) resumes the first panic in the caller,
/// with the shard consistent.
struct Rehash<'a, S> {
    hasher: &'a S,
    panic: std::cell::Cell<Option<Panic>>,
}

impl<'a, S: BuildHasher> Rehash<'a, S> {
    fn new(hasher: &'a S) -> Self {
        Rehash {
            hasher,
            panic: std::cell::Cell::new(None),
        }
    }

    #[inline]
    fn of<K: Hash>(&self, key: &K) -> u64 {
        self.try_of(key).unwrap_or(0)
    }

    /// The key's hash, or `None` if its `Hash` panicked (the panic is kept for
    /// [`finish`](Self::finish)): for a caller that must then find the key by `Eq` alone.
    #[inline]
    fn try_of<K: Hash>(&self, key: &K) -> Option<u64> {
        let hashed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.hasher.hash_one(key)));
        hashed
            .map_err(|p| {
                let mut first = self.panic.take();
                keep_first_locked(&mut first, p);
                self.panic.set(first);
            })
            .ok()
    }

    /// Resumes the first panic caught, if any (call once the shard is consistent).
    fn finish(self) {
        if let Some(p) = self.panic.into_inner() {
            std::panic::resume_unwind(p);
        }
    }

    /// Hands the first panic caught to the caller (kept in `first` unless it holds one), for a
    /// caller with more to finish before resuming it.
    fn finish_into(self, first: &mut Option<Panic>) {
        if let Some(p) = self.panic.into_inner() {
            keep_first_locked(first, p);
        }
    }
}

/// A record leaving the shard, for its removal report.
#[inline]
fn removed<K, V, T>(e: Record<K, V, T>, cause: RemovalCause) -> Removed<K, V> {
    Removed {
        key: e.key,
        value: e.value,
        weight: e.weight,
        cause,
    }
}

/// A write's deadlines under a plain time to live ([`Layout::plain_ttl`]), bounded by `cap`:
/// what `ExpiryConfig::on_create` computes for it, without the configuration.
#[inline(always)]
fn plain(now: u64, ttl: u64, cap: u64) -> (u64, u64) {
    let d = crate::clock::deadline(now, ttl).min(cap);
    (d, d)
}

/// The deadlines of an entry in an untimed shard: no expiry is configured (its shards have no
/// time data, see [`SlotTime::TIMED`]), so only the write's own bound `cap` applies (an entry
/// capped at or before `now` is not stored; a later cap is not kept).
#[inline]
fn untimed<K, V>(exp: &ExpiryConfig<K, V>, cap: u64) -> (u64, u64) {
    debug_assert!(matches!(exp, ExpiryConfig::None));
    (cap, cap)
}
