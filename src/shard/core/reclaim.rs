//! Taking entries out of a shard's core: unlinking a slot, removal on request, eviction by
//! the policy, expiry by the timer wheel (keeping fail-safe's stale entries and evicting them
//! first), clearing, and `retain`.

use super::{removed, Core, Panic, Rehash};
use crate::expiry::NO_BUCKET;
use crate::removal::{RemovalCause, Removals};
use crate::shard::{Record, SlotTime};
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;

impl<K: Hash + Eq + 'static, V: 'static, T: SlotTime> Core<K, V, T> {
    /// Unlinks a live slot from the table and the wheel and takes its entry. The slot is left
    /// empty; the caller decides whether it is free now or still referenced by a queue.
    pub(super) fn take_slot(&mut self, slot: u32, hash: u64) -> Record<K, V, T> {
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
        self.store_count();
        e
    }

    /// Removes a live entry that is still queued in the policy (a caller's removal or expiry).
    pub(super) fn remove_slot(
        &mut self,
        slot: u32,
        hash: u64,
        cause: RemovalCause,
        out: &mut Removals<K, V>,
    ) {
        let e = self.take_slot(slot, hash);
        if self.policy.on_remove(e.place, e.weight) {
            self.policy.purge_tombstones(&self.slab, &mut self.free);
        }
        self.tally.push(out, removed(e, cause));
    }

    /// Removes `key`; the removed entry (if any, and not expired) is pushed last onto `out`.
    /// Returns whether a live entry was removed.
    pub(crate) fn remove<Q, S: BuildHasher>(
        &mut self,
        hash: u64,
        key: &Q,
        now: u64,
        hasher: &S,
        out: &mut Removals<K, V>,
        cause: RemovalCause,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.expire(now, false, hasher, out);
        // The key's `Eq` (user code) first: if it panics, nothing is removed and nothing
        // superseded.
        let found = self.find(hash, key);
        self.supersede(hash, key, out);
        let Some(slot) = found else {
            return false;
        };
        let live = self.deadline(slot) > now;
        let cause = if live { cause } else { RemovalCause::Expired };
        self.remove_slot(slot, hash, cause, out);
        live
    }

    /// Removes `key`'s entry only if it is expired at `now` (a reader saw it expired; a write
    /// may have replaced it since): past its stale window with fail-safe, or, with `stale_too`,
    /// past its deadline at all (the backend answered that the key is gone). Supersedes
    /// nothing. Returns whether it removed one.
    pub(crate) fn remove_expired<Q>(
        &mut self,
        hash: u64,
        key: &Q,
        now: u64,
        stale_too: bool,
        out: &mut Removals<K, V>,
    ) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.find(hash, key) {
            Some(slot)
                if self.reclaimable(slot, now) || (stale_too && self.deadline(slot) <= now) =>
            {
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
    ///
    /// A key's `Hash` that panics meanwhile leaves the policy consistent; the panic is kept in
    /// `panic` (unless it holds one) for the caller to resume.
    pub(crate) fn retune<S: BuildHasher>(
        &mut self,
        hasher: &S,
        tune: u64,
        panic: &mut Option<Panic>,
    ) {
        let rehash = Rehash::new(hasher);
        self.policy
            .retune(&mut self.slab, &mut self.free, tune, |e| rehash.of(&e.key));
        rehash.finish_into(panic);
    }

    /// Evicts one entry and returns why it went: an entry kept past its deadline for
    /// fail-safe (on the stale list) if there is one, `Expired`; else one chosen by the
    /// policy: `Size`, or `Expired` if its deadline had passed at `now` (an entry due earlier
    /// in the timer wheel's current tick, not reclaimed yet). `None` when the shard is empty.
    pub(crate) fn evict_one<S: BuildHasher>(
        &mut self,
        now: u64,
        hasher: &S,
        out: &mut Removals<K, V>,
        panic: &mut Option<Panic>,
    ) -> Option<RemovalCause> {
        let rehash = Rehash::new(hasher);
        if !self.stale.is_empty() && self.evict_stale(now, &rehash, out) {
            rehash.finish_into(panic);
            return Some(RemovalCause::Expired);
        }
        let Some(slot) = self
            .policy
            .evict(&mut self.slab, &mut self.free, |e| rehash.of(&e.key))
        else {
            rehash.finish_into(panic);
            return None;
        };
        let expired = self.deadline(slot) <= now;
        let hash = rehash.of(&self.slab[slot as usize]
            .as_ref()
            .expect("victim is live")
            .key);
        let e = self.take_slot(slot, hash);
        self.free.push(slot);
        let cause = if expired {
            // Tallied by the shard, as every expiration is.
            self.tally.push(out, removed(e, RemovalCause::Expired));
            RemovalCause::Expired
        } else {
            // Not tallied here: the cache counts evictions itself, where `health` reads them
            // without a shard lock.
            out.push(removed(e, RemovalCause::Size));
            RemovalCause::Size
        };
        rehash.finish_into(panic);
        Some(cause)
    }

    /// Before evicting for room: removes the entries whose deadline passed, those due earlier
    /// in the wheel's current tick too (exactly, at most once per ≈67 ms, see
    /// [`TimerWheel::exact_before_evicting`](crate::expiry::TimerWheel::exact_before_evicting)), so that expired entries make room before a live
    /// one is evicted. Entries kept past their deadline for fail-safe stay (until their stale
    /// window closes); the wheel's drain puts them on the stale list, whose entries
    /// [`evict_one`](Self::evict_one) takes first.
    pub(crate) fn expire_before_evicting<S: BuildHasher>(
        &mut self,
        now: u64,
        hasher: &S,
        out: &mut Removals<K, V>,
    ) {
        if !T::TIMED {
            return;
        }
        let exact = self
            .wheel
            .as_mut()
            .is_some_and(|w| w.exact_before_evicting(now));
        self.expire(now, exact, hasher, out);
    }

    /// Advances the timer wheel to `now` and removes entries whose deadline passed: all of them
    /// when `exact`, else those due before the current wheel tick (≈1 s granularity).
    #[inline(always)]
    pub(crate) fn expire<S: BuildHasher>(
        &mut self,
        now: u64,
        exact: bool,
        hasher: &S,
        out: &mut Removals<K, V>,
    ) {
        if !T::TIMED || self.wheel.is_none() {
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

    pub(super) fn expire_due<S: BuildHasher>(
        &mut self,
        now: u64,
        exact: bool,
        hasher: &S,
        out: &mut Removals<K, V>,
    ) {
        let Some(wheel) = &mut self.wheel else { return };
        let mut due = Vec::new();
        wheel.advance(now, exact, &mut due);
        if due.is_empty() {
            return;
        }
        let mut refile = Vec::new();
        let grace = self.layout.fail_safe.map_or(0, |(_, max)| max);
        let rehash = Rehash::new(hasher);
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
                if d.saturating_add(grace) <= now {
                    let hash = rehash.of(&e.key);
                    self.remove_slot(s, hash, RemovalCause::Expired, out);
                } else if d <= now {
                    // Expired, but kept for fail-safe until its stale window closes; the
                    // first to go when the shard must make room.
                    refile.push((s, d.saturating_add(grace)));
                    self.stale.push_back(s);
                } else {
                    refile.push((s, d));
                }
            }
        }
        for (s, d) in refile {
            self.file(s, d);
        }
        if self.stale.len() > 2 * self.len + 64 {
            self.compact_stale(now);
        }
        rehash.finish();
    }

    /// Whether `slot` holds an entry past its deadline at `now` (one kept for fail-safe, when
    /// the wheel has passed it; an empty slot's deadline is "never").
    pub(super) fn is_stale(&self, slot: u32, now: u64) -> bool {
        self.deadline(slot) <= now
    }

    /// Drops the stale list's slots that no longer hold a stale entry, and duplicates (a slot
    /// whose entry expired, was given a new deadline and expired again), keeping the order.
    #[cold]
    pub(super) fn compact_stale(&mut self, now: u64) {
        let mut seen = vec![false; self.slab.len()];
        let mut stale = std::mem::take(&mut self.stale);
        stale.retain(|&s| {
            let keep = self.is_stale(s, now) && !seen[s as usize];
            if keep {
                seen[s as usize] = true;
            }
            keep
        });
        self.stale = stale;
    }

    /// Removes the oldest entry on the stale list that is still past its deadline, reported
    /// `Expired`; false when there is none.
    pub(super) fn evict_stale<S: BuildHasher>(
        &mut self,
        now: u64,
        rehash: &Rehash<'_, S>,
        out: &mut Removals<K, V>,
    ) -> bool {
        while let Some(s) = self.stale.pop_front() {
            if !self.is_stale(s, now) {
                continue;
            }
            let e = self.slab[s as usize]
                .as_ref()
                .expect("a stale slot is live");
            let hash = rehash.of(&e.key);
            self.remove_slot(s, hash, RemovalCause::Expired, out);
            return true;
        }
        false
    }

    /// Removes every entry (and supersedes every load in flight). An entry already past its
    /// deadline at `now` is reported `Expired`, as `invalidate` and `retain` report it.
    pub(crate) fn clear(&mut self, now: u64, out: &mut Removals<K, V>) {
        for (k, f) in self.flights.detach_all() {
            out.detach(k, f);
        }
        for s in 0..self.slab.len() as u32 {
            let cause = if self.deadline(s) <= now {
                RemovalCause::Expired
            } else {
                RemovalCause::Explicit
            };
            if let Some(e) = self.slab[s as usize].take() {
                self.tally.push(out, removed(e, cause));
            }
        }
        self.slab.clear();
        self.table.clear();
        self.free.clear();
        self.times.clear();
        self.policy.clear();
        if let Some(w) = &mut self.wheel {
            w.clear();
        }
        self.weight = 0;
        self.len = 0;
        self.store_count();
        self.stale = std::collections::VecDeque::new();
    }

    /// Removes every live entry for which `keep` returns false (and every expired one).
    pub(crate) fn retain<S: BuildHasher>(
        &mut self,
        now: u64,
        hasher: &S,
        keep: &mut impl FnMut(&K, &V) -> bool,
        out: &mut Removals<K, V>,
    ) {
        // A key's `Hash` that panics does not stop the pass (see `Rehash`); `keep`'s panic
        // does, with every removal so far complete.
        let rehash = Rehash::new(hasher);
        for s in 0..self.slab.len() as u32 {
            let Some(e) = &self.slab[s as usize] else {
                continue;
            };
            let expired = self.deadline(s) <= now;
            let reclaim = self.reclaimable(s, now);
            // With fail-safe an expired entry within its stale window is still the key's last
            // value: `keep` decides on it like on the live ones.
            if reclaim || !keep(&e.key, &e.value) {
                let hashed = rehash.try_of(&e.key);
                if !reclaim {
                    // Removed by the predicate: as with `invalidate`, a load of the key in
                    // flight is superseded (its value goes to its callers, not back in). A key
                    // whose `Hash` panicked now was hashed when its flight registered: found
                    // by `Eq` alone.
                    let detached = match hashed {
                        Some(hash) => self.flights.detach(hash, &e.key),
                        None => self.flights.detach_by_eq(&e.key),
                    };
                    if let Some((k, f)) = detached {
                        out.detach(k, f);
                    }
                }
                let hash = hashed.unwrap_or(0);
                let cause = if expired {
                    RemovalCause::Expired
                } else {
                    RemovalCause::Explicit
                };
                self.remove_slot(s, hash, cause, out);
            }
        }
        rehash.finish();
    }
}
