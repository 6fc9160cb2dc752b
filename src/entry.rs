//! The entry API (per-key insert-if-absent, compute and upsert) and bulk loading.
//!
//! A computation of a key holds that key's *flight* (see [`crate::load`]) while the user's
//! closure runs — with no lock held — so computations and loads of one key run one at a time:
//! a compute waits for a load or compute of its key to end before it reads the current value,
//! and callers that load the key meanwhile wait for the compute and take its result. A plain
//! [`insert`](Cache::insert) or [`invalidate`](Cache::invalidate) of the key is not held up:
//! it wins, and the computed value is returned but not stored.

use crate::answer::after_dropping;
use crate::cache::Cache;
use crate::cache::Registration;
use crate::flight::{
    accept_value, enter, recursive_load, runs_here, Flight, Outcome, Phase, Running, Waited,
};
use crate::load::{Lead, Settle, Start};
use crate::load_async::wait_async;
use crate::removal::Removals;
use crate::stats::Counter;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A key's flight, shared.
type FlightRef<K, V> = Arc<Flight<K, V>>;

/// A key and its value, as returned by the entry API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<K, V> {
    key: K,
    value: V,
    fresh: bool,
    replaced: bool,
}

impl<K, V> Entry<K, V> {
    /// A value found cached (not this call's, nothing replaced).
    fn found(key: K, value: V) -> Self {
        Entry {
            key,
            value,
            fresh: false,
            replaced: false,
        }
    }

    /// The key.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// The value.
    pub fn value(&self) -> &V {
        &self.value
    }

    /// The value, by value.
    pub fn into_value(self) -> V {
        // The key's `Drop` (user code) before the value is handed out: if it panics, the value
        // is still a local and is dropped while unwinding (moved out first, it would leak:
        // rust-lang/rust#47949).
        let Entry { key, value, .. } = self;
        drop(key);
        value
    }

    /// Whether this call's loader or computation produced the value (rather than finding it
    /// cached, joining another caller's load, or — its loader having failed — being answered
    /// by [`fail_safe`](crate::CacheBuilder::fail_safe) with the old value). A fresh value is
    /// returned even when it is not kept: one heavier than `max_capacity` is stored and at
    /// once evicted (the listener sees it removed for [`Size`](crate::RemovalCause::Size)),
    /// as with [`Cache::insert`], and a write of the key during the load wins over it.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Whether this call's computation replaced a value the key held (moka's name): true for
    /// [`CompResult::ReplacedWith`]'s entry and for [`EntryRef::and_upsert_with`] on a
    /// present key; false for an insertion, a load, or a value found.
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// let e = cache.entry("n").and_upsert_with(|e| e.map_or(1, |e| *e.value() + 1));
    /// assert!(!e.is_old_value_replaced());
    /// let e = cache.entry("n").and_upsert_with(|e| e.map_or(1, |e| *e.value() + 1));
    /// assert!(e.is_old_value_replaced() && *e.value() == 2);
    /// ```
    pub fn is_old_value_replaced(&self) -> bool {
        self.replaced
    }
}

/// What a computation decides (see [`EntryRef::and_compute_with`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<V> {
    /// Store this value.
    Put(V),
    /// Remove the entry (if any).
    Remove,
    /// Leave things as they are.
    Nop,
}

/// What a computation did. Exhaustive, as moka's: a `match` may name the five outcomes with no
/// wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompResult<K, V> {
    /// There was no entry; the computed value was stored. (A value heavier than
    /// `max_capacity` is stored and at once evicted, as with [`Cache::insert`]: the listener
    /// sees it removed for [`Size`](crate::RemovalCause::Size).)
    Inserted(Entry<K, V>),
    /// The entry's value was replaced by the computed one (the same note on weight).
    ReplacedWith(Entry<K, V>),
    /// The entry (shown) was removed.
    Removed(Entry<K, V>),
    /// The entry (shown) was left as it was.
    Unchanged(Entry<K, V>),
    /// There was no entry and none was made. (moka's holds an `Arc<K>`; this one, the key.)
    StillNone(K),
}

impl<K, V> CompResult<K, V> {
    /// The entry the computation stored, removed or left, or `None` for
    /// [`StillNone`](Self::StillNone) (as moka's `CompResult::into_entry`).
    ///
    /// ```
    /// use herdcache::{Cache, Op};
    ///
    /// let cache: Cache<u64, u64> = Cache::new(100);
    /// let r = cache.entry(1).and_compute_with(|_| Op::Put(7));
    /// assert_eq!(r.into_entry().map(|e| e.into_value()), Some(7));
    /// let r = cache.entry(2).and_compute_with(|_| Op::Nop);
    /// assert!(r.into_entry().is_none());
    /// ```
    pub fn into_entry(self) -> Option<Entry<K, V>> {
        match self {
            CompResult::Inserted(e)
            | CompResult::ReplacedWith(e)
            | CompResult::Removed(e)
            | CompResult::Unchanged(e) => Some(e),
            CompResult::StillNone(_) => None,
        }
    }

    /// The entry the computation stored, removed or left (as moka's `CompResult::unwrap`).
    ///
    /// # Panics
    ///
    /// If the result is [`StillNone`](Self::StillNone) (there is no entry to return).
    ///
    /// ```
    /// use herdcache::{Cache, Op};
    ///
    /// let cache: Cache<u64, u64> = Cache::new(100);
    /// let e = cache
    ///     .entry(1)
    ///     .and_compute_with(|e| Op::Put(e.map_or(0, |e| *e.value()) + 1))
    ///     .unwrap();
    /// assert_eq!(*e.value(), 1);
    /// ```
    pub fn unwrap(self) -> Entry<K, V> {
        self.into_entry()
            .expect("`CompResult::unwrap` on `StillNone`: the computation left no entry")
    }
}

/// Per-key operations on a cache; see [`Cache::entry`].
pub struct EntryRef<'a, K, V, S> {
    cache: &'a Cache<K, V, S>,
    key: K,
}

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Per-key operations: insert if absent (single-flight), atomic compute and upsert.
    ///
    /// ```
    /// use herdcache::{Cache, Op};
    ///
    /// let cache: Cache<&str, u64> = Cache::new(100);
    /// let e = cache.entry("hits").or_insert_with(|| 0);
    /// assert!(e.is_fresh());
    /// // An atomic read-modify-write: concurrent increments do not lose updates.
    /// cache.entry("hits").and_compute_with(|e| Op::Put(e.map_or(0, |e| *e.value()) + 1));
    /// assert_eq!(cache.get("hits"), Some(1));
    /// ```
    pub fn entry(&self, key: K) -> EntryRef<'_, K, V, S> {
        EntryRef { cache: self, key }
    }

    /// moka's `get_with_if`: the cached value of `key`, unless there is none or
    /// `replace_if(&value)` says to replace it; then `init()`'s value, stored and returned.
    ///
    /// A single-flight load, as [`get_with`](Self::get_with), that a present value answers
    /// only if `replace_if` keeps it. Concurrent calls for the same key, as in moka: a caller
    /// that finds a load (or replacement) of the key running waits for it and returns its
    /// value **without** calling its own `replace_if`; so callers that all want the same
    /// stale value replaced run one `init` between them. `replace_if` is called on the value
    /// found and, by the caller that then leads the load, once more on what the key holds
    /// when the load is claimed (as moka's leader looks again): a value written between the
    /// verdict and the claim is judged, not replaced unseen — kept, it is returned and `init`
    /// does not run; to the waiters too if it is still live once the look is done (one that
    /// joined after the look, with the value expired or evicted by then, looks again itself).
    /// A plain `insert` or `invalidate` of the key while `init` runs wins: the loaded value
    /// is returned but not stored; one that lands between the claim and that second look
    /// makes the caller claim again (`replace_if` is then asked about the new value), so a
    /// replacement replaces the value it was judged on — twice at
    /// most: under a steady stream of writes to the key, a third such write is treated as one
    /// that lands while `init` runs (it wins), so the call always ends. With
    /// [`fail_safe`](crate::CacheBuilder::fail_safe), within a failed key's retry backoff
    /// the kept stale value answers, unjudged, as it answers `get_with`. A hit that
    /// `replace_if` keeps takes only the read lock. Only a kept value is read (its time to
    /// idle moved, `expire_after_read` called, a due refresh started): `replace_if` runs with
    /// no lock held on a clone, and a value it rejects is left as it was.
    ///
    /// # Panics
    ///
    /// If `init` or `replace_if` panics (callers waiting for this `init` load again
    /// themselves), or `init` loads this same key (recursion).
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// assert_eq!(cache.get_with_if(1, || 10, |_| false), 10); // absent: loaded
    /// assert_eq!(cache.get_with_if(1, || 20, |_| false), 10); // kept
    /// assert_eq!(cache.get_with_if(1, || 30, |v| *v < 15), 30); // replaced
    /// assert_eq!(cache.get(&1), Some(30));
    /// ```
    pub fn get_with_if(
        &self,
        key: K,
        init: impl FnOnce() -> V,
        replace_if: impl FnMut(&V) -> bool,
    ) -> V {
        self.load_if(key, init, replace_if).0
    }

    /// The async twin of [`get_with_if`](Self::get_with_if) (moka's `future::Cache::get_with_if`);
    /// `init` may borrow, as for [`get_with_async`](Self::get_with_async).
    ///
    /// # Panics
    ///
    /// As [`get_with_if`](Self::get_with_if).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async): dropping the future while its `init` runs
    /// abandons the load (callers waiting for it load again themselves); the cached value is
    /// left as it was.
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache = herdcache::Cache::new(10);
    /// assert_eq!(cache.get_with_if_async(1, async { 10 }, |_| false).await, 10);
    /// assert_eq!(cache.get_with_if_async(1, async { 20 }, |v| *v < 15).await, 20);
    /// # });
    /// ```
    pub async fn get_with_if_async(
        &self,
        key: K,
        init: impl Future<Output = V>,
        replace_if: impl FnMut(&V) -> bool + Send,
    ) -> V {
        self.load_if_async(key, init, replace_if).await.0
    }

    /// [`get_with_if_async`](Self::get_with_if_async), and whether this call's `init` produced
    /// the value.
    async fn load_if_async(
        &self,
        key: K,
        init: impl Future<Output = V>,
        mut replace_if: impl FnMut(&V) -> bool + Send,
    ) -> (V, bool) {
        let (hash, start) = match self.first_look(&key, &mut replace_if) {
            // What the call was given drops first (user code: see `answer`).
            Ok(kept) => return after_dropping((init, key, replace_if), (kept, false)),
            Err(claim) => claim,
        };
        let fresh = AtomicBool::new(false);
        let init = async {
            fresh.store(true, Ordering::Release);
            Outcome::Value(init.await)
        };
        let judge: &mut (dyn FnMut(&V) -> bool + Send) = &mut replace_if;
        let v = self
            .load_borrowed_from(
                key,
                hash,
                Settle::starting(self, start),
                Some(judge),
                init,
                V::clone,
                accept_value,
            )
            .await;
        after_dropping(replace_if, (v, fresh.load(Ordering::Acquire)))
    }

    /// `get_with_if`'s first look: the value found, if `replace_if` keeps it; or the key's
    /// hash and how its load starts (replacing a value, or after a counted miss).
    fn first_look(
        &self,
        key: &K,
        replace_if: &mut impl FnMut(&V) -> bool,
    ) -> Result<V, (u64, Start)> {
        let hash = self.hash(key);
        // Counted once judged: a value kept is a hit, one to replace a miss (the call loads);
        // only a kept value is read (a rejected one's idle time is not moved).
        match self.read_judged(key, hash, &mut |v| !replace_if(v)) {
            Some((v, true)) => {
                self.count_lookup(hash, true, true);
                Ok(v)
            }
            Some((rejected, false)) => {
                // The rejected copy's `Drop` (user code) runs before the miss is counted: if
                // it panics, the call counts nothing (a miss counted here is settled by the
                // load that follows, which a panic would skip).
                drop(rejected);
                self.count_lookup(hash, false, true);
                Err((hash, Start::Replace))
            }
            None => {
                self.count_lookup(hash, false, false);
                Err((hash, Start::Missed))
            }
        }
    }

    /// [`get_with_if`](Self::get_with_if), and whether this call's `init` produced the value.
    fn load_if(
        &self,
        key: K,
        init: impl FnOnce() -> V,
        mut replace_if: impl FnMut(&V) -> bool,
    ) -> (V, bool) {
        let (hash, start) = match self.first_look(&key, &mut replace_if) {
            // What the call was given drops first (user code: see `answer`).
            Ok(kept) => return after_dropping((init, key, replace_if), (kept, false)),
            Err(claim) => claim,
        };
        let mut fresh = false;
        let init = || {
            fresh = true;
            Outcome::Value(init())
        };
        let judge: &mut dyn FnMut(&V) -> bool = &mut replace_if;
        let v = self
            .load_blocking(
                key,
                hash,
                init,
                &V::clone,
                &accept_value,
                None,
                Settle::starting(self, start),
                Some(judge),
            )
            .expect("without a deadline a blocking load always ends with a result");
        after_dropping(replace_if, (v, fresh))
    }

    /// Returns the values of `keys`, calling `load_missing` **once** with the keys that are
    /// neither cached nor being loaded, and waiting for the loads of the others that are in
    /// flight. Keys that `load_missing` does not return are absent from the result (and callers
    /// waiting on them load them again themselves). A key whose load by another caller ends
    /// with nothing for this call (it failed, or was given up) goes to `load_missing` if it
    /// has not been called yet, else is absent too — unless, with
    /// [`fail_safe`](crate::CacheBuilder::fail_safe), that failure left the key's old value to
    /// answer its callers (within the backoff it started): then that value is returned.
    ///
    /// Blocks while loads run. `load_missing` runs with no lock held, under one permit of
    /// `max_concurrent_loads` if set.
    ///
    /// # Panics
    ///
    /// If `load_missing` panics (its keys' waiters are released first), or asks this cache for
    /// one of the keys it is loading. If user code panics while the loaded values are stored
    /// — the eviction listener or a removed value's `Drop` on an entry a store removed, the
    /// weigher, a key's or value's `Clone`, `Drop`, `Hash` or `Eq` — every other loaded value
    /// is stored first (the key whose store panicked ends as a failed load: its waiters load
    /// it again), then the first such panic is resumed.
    ///
    /// # Example
    ///
    /// ```
    /// use std::collections::HashMap;
    /// let cache: herdcache::Cache<u32, String> = herdcache::Cache::new(100);
    /// cache.insert(1, "one".into());
    /// let all = cache.get_all([1, 2, 3], |missing| {
    ///     assert_eq!(missing, [2, 3]); // one backend call for everything missing
    ///     missing.iter().map(|&k| (k, format!("#{k}"))).collect::<HashMap<_, _>>()
    /// });
    /// assert_eq!(all.len(), 3);
    /// assert_eq!(cache.get(&3).as_deref(), Some("#3"));
    /// ```
    pub fn get_all<I>(
        &self,
        keys: I,
        load_missing: impl FnOnce(&[K]) -> HashMap<K, V>,
    ) -> HashMap<K, V>
    where
        I: IntoIterator<Item = K>,
    {
        let mut found = HashMap::new();
        let mut load_missing = Some(load_missing);
        let mut keys: Vec<K> = keys.into_iter().collect();
        // Each key's claims across the rounds, its miss counted (as a load, a join or a
        // negative hit) when this call ends.
        let mut ledgers: HashMap<K, Settle<'_, K, V, S>> = HashMap::new();
        // A key another caller was loading, whose load then ended with nothing for this call
        // (it failed, or was given up), is claimed again while `load_missing` is unused: this
        // call then loads it, or joins the next caller's load, as a `get_with` does, until
        // it has a value or `load_missing` is spent (round 100: after three rounds of joined
        // loads ending with nothing it returned without the key, `load_missing` never
        // called, in about 1 % of calls against leaders that kept failing or being dropped).
        loop {
            keys = self.get_all_round(keys, &mut ledgers, &mut found, &mut load_missing);
            if keys.is_empty() || load_missing.is_none() {
                break;
            }
        }
        // Each key's miss is settled (counted) before any key's `Drop` (user code) runs: a
        // map's drop stops dropping (and leaks) its other entries when one panics, and with
        // them their ledgers. The keys then drop from a `Vec`, which drops the rest of them
        // when one panics; and before the result is handed over: a panic there then drops
        // the values found too, where one while returning would leak them
        // (rust-lang/rust#47949).
        let (ledger_keys, settled): (Vec<K>, Vec<Settle<'_, K, V, S>>) =
            ledgers.into_iter().unzip();
        drop(settled);
        drop((ledger_keys, keys, load_missing));
        found
    }

    /// One round of [`get_all`](Self::get_all): returns the keys joined to another caller's
    /// load that ended with no value and that no value answers now.
    fn get_all_round<'a>(
        &'a self,
        keys: Vec<K>,
        ledgers: &mut HashMap<K, Settle<'a, K, V, S>>,
        found: &mut HashMap<K, V>,
        load_missing: &mut Option<impl FnOnce(&[K]) -> HashMap<K, V>>,
    ) -> Vec<K> {
        // Each key this call leads is guarded until published: a panic anywhere (the loader,
        // a key's `Hash`/`Eq`/`Clone`, a value's `Clone`) abandons the flights not yet
        // published, and their waiters load again.
        let mut leads: Vec<(K, Lead<K, V, S>)> = Vec::new();
        // Inside another load that holds a permit: loads of these keys whose leaders wait for
        // a permit, taken over (waiting for them could keep the permit from them forever).
        let mut taken: Vec<(K, Lead<K, V, S>)> = Vec::new();
        let mut joins = Vec::new();
        let mut queue: std::collections::VecDeque<(K, u8)> =
            keys.into_iter().map(|k| (k, 0)).collect();
        while let Some((key, tries)) = queue.pop_front() {
            if found.contains_key(&key) || leads.iter().chain(&taken).any(|(k, _)| *k == key) {
                continue;
            }
            let hash = self.hash(&key);
            let how = self.ledger(ledgers, &key);
            match self.claim_key(hash, &key, how) {
                Claimed::Hit(v) => {
                    found.insert(key, v);
                }
                Claimed::Lead(lead) => leads.push((key, lead)),
                Claimed::Join(f) if self.holds_permit() && f.steal() => {
                    taken.push((key, Lead::taken(self, hash, f)));
                }
                // Its leader gave it up before its load started (dropped, cancelled): it
                // ends at once. Waited for now, and the key claimed again if it ended with
                // nothing, so that this round's `load_missing` loads it: joined and waited for
                // after `load_missing` ran, it was left out of the result (a `get_all` nested
                // in a load under a limit of 1 joined a key whose async leader was dropped as
                // it tried to take the load over: attack_s32, once in about 80 runs).
                Claimed::Join(f) if f.is_given_up() && tries < 3 => {
                    match self.wait_blocking(&f, &accept_value, None) {
                        Waited::Done(Some(v)) => drop(found.insert(key, v)),
                        _ => queue.push_front((key, tries + 1)),
                    }
                }
                Claimed::Join(f) => joins.push((key, f)),
            }
        }
        if !leads.is_empty() || !taken.is_empty() {
            let load_missing = load_missing
                .take()
                .expect("a round with keys to load has the loader");
            let permit = self.load_permit();
            // Keys another caller took over while this one waited for the permit: waited for.
            let (started, stolen): (Vec<_>, Vec<_>) =
                leads.into_iter().partition(|(_, l)| l.flight().start());
            leads = started;
            leads.extend(taken);
            for (key, lead) in stolen {
                // Its load, run by the taker, counts this key's miss.
                let flight = lead.disarm();
                // Taken over and already ended with no value for this call (the taker
                // failed while this call waited for its permit): claimed again, so that
                // `load_missing` loads it too.
                let empty = !flight.is_running()
                    && flight
                        .done()
                        .is_none_or(|o| !matches!(*o, Outcome::Value(_)));
                if !empty {
                    joins.push((key, flight));
                    continue;
                }
                let hash = self.hash(&key);
                let how = self.ledger(ledgers, &key);
                match self.claim_key(hash, &key, how) {
                    Claimed::Hit(v) => drop(found.insert(key, v)),
                    Claimed::Lead(lead) if lead.flight().start() => leads.push((key, lead)),
                    Claimed::Lead(lead) => joins.push((key, lead.disarm())),
                    Claimed::Join(f) => joins.push((key, f)),
                }
            }
            if leads.is_empty() {
                drop(permit);
            } else {
                let keys: Vec<K> = leads.iter().map(|(k, _)| k.clone()).collect();
                let (mut loaded, took) = {
                    let _permit = permit;
                    let _running: Vec<Running> =
                        leads.iter().map(|(_, l)| enter(l.flight())).collect();
                    let start = self.stopwatch();
                    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        load_missing(&keys)
                    }));
                    // The panic goes on: the leads drop, each counted as a failed load (their
                    // waiters load again).
                    let loaded = loaded.unwrap_or_else(|p| std::panic::resume_unwind(p));
                    (loaded, self.stopwatch().saturating_sub(start))
                };
                // The keys' `Drop` (user code): a panic is resumed once the values are stored.
                let mut deferred = None;
                crate::unwind::drop_keeping_first(keys, &mut deferred);
                // Every loaded value is published before a panic of user code met on the way
                // is resumed — the eviction listener or a removed value's `Drop` (deferred by
                // the store itself), the weigher, a key's or value's `Clone`, `Drop`, `Hash` or
                // `Eq` (caught here: that key's lead ends as a failed load, its waiters load
                // again): as for any write, the operation — here all of `load_missing`'s
                // values — completes first. Rounds 67 and 68 of the outside attacks saw the
                // values after the first such panic lost, counted as failed loads.
                for (key, lead) in leads {
                    let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        // The map's own key is kept, not dropped: were it dropped inside
                        // `remove`, a panic of its `Drop` would leak the value removed.
                        match loaded.remove_entry(&key) {
                            Some((loaded_key, v)) => {
                                let (outcome, panic) = self.publish_deferred(
                                    lead,
                                    Some(loaded_key),
                                    Outcome::Value(v),
                                    took,
                                );
                                if let Some(v) = accept_value(&outcome) {
                                    found.insert(key, v);
                                }
                                // The outcome (user code as it drops) before the panic leaves.
                                after_dropping(outcome, panic)
                            }
                            // Not returned: a failed load (its waiters load it themselves).
                            // With fail-safe the key's last value, within its stale window,
                            // answers this call (and sets the key's retry deadline, while the
                            // flight is still registered), as for any failed load.
                            None => {
                                let fallback = self.fail_safe_fallback_for(
                                    lead.hash(),
                                    &key,
                                    lead.flight(),
                                    true,
                                );
                                if let Some(v) = fallback {
                                    found.insert(key, v);
                                }
                                lead.fail();
                                None
                            }
                        }
                    }));
                    // The first panic is resumed; a later one is discarded.
                    if let Some(p) = step.unwrap_or_else(Some) {
                        crate::unwind::keep_first(&mut deferred, p);
                    }
                }
                // What `load_missing` returned for keys it was not asked for, dropped before
                // any panic is resumed (a `Drop` panicking while that unwinds would abort).
                crate::unwind::drop_keeping_first(loaded, &mut deferred);
                if let Some(p) = deferred {
                    std::panic::resume_unwind(p);
                }
            }
        }
        let mut again = Vec::new();
        for (key, flight) in joins {
            if let Waited::Done(Some(v)) = self.wait_blocking(&flight, &accept_value, None) {
                found.insert(key, v);
                continue;
            }
            let hash = self.hash(&key);
            if let Some(v) = self.read_with(&key, hash, false, V::clone) {
                found.insert(key, v); // stored meanwhile (by a computation that gave it up)
            } else if let Some(v) = self.fail_safe_read(hash, &key, V::clone) {
                // The load failed with no value for its callers (abandoned: its leader's
                // `get_with` init panicked, or it was dropped): with fail-safe, within the
                // backoff that failure started, the key's old value answers this call as any
                // caller's (once `load_missing` is spent, no later round would ask).
                found.insert(key, v);
            } else {
                again.push(key);
            }
        }
        again
    }

    /// `key`'s ledger in a `get_all` call (made at its first claim).
    fn ledger<'a, 'm>(
        &'a self,
        ledgers: &'m mut HashMap<K, Settle<'a, K, V, S>>,
        key: &K,
    ) -> &'m mut Settle<'a, K, V, S> {
        ledgers
            .entry(key.clone())
            .or_insert_with(|| Settle::new(self, crate::load::ClaimMode::leading(true, true)))
    }

    /// Claims `key` for `get_all`, in the rounds' mode `how` (the first round counts the
    /// lookup's hit or miss).
    fn claim_key(&self, hash: u64, key: &K, how: &mut crate::load::ClaimMode) -> Claimed<K, V, S> {
        match self.claim(hash, key, &V::clone, &mut None, how, &|o| {
            matches!(o, crate::flight::Outcome::Value(_))
        }) {
            crate::load::Claim::Hit(v) => Claimed::Hit(v),
            crate::load::Claim::Lead(lead) => Claimed::Lead(lead),
            crate::load::Claim::Join(f) => Claimed::Join(f),
            crate::load::Claim::Lost => unreachable!("a blocking caller can always lead"),
        }
    }

    /// Takes the key's flight for a computation, waiting (blocking) for any load or
    /// computation of the key to end first.
    fn lock_key(&self, hash: u64, key: &K) -> Lead<K, V, S> {
        loop {
            match self.try_lock_key(hash, key) {
                Ok(lead) => return lead,
                Err(running) if self.give_up_waiting_leader(hash, &running) => {}
                Err(running) => {
                    let _ = self.wait_blocking(&running, &|_: &Outcome<V>| None::<()>, None);
                }
            }
        }
    }

    /// Inside a load that holds a permit, a computation must not wait for a load whose leader
    /// waits for a permit (it could keep the permit from it forever): it takes that load over
    /// and gives it up at once — abandoned, its callers (the leader too) load again, after the
    /// computation. Returns whether it did.
    fn give_up_waiting_leader(&self, hash: u64, running: &Arc<Flight<K, V>>) -> bool {
        let taken = self.holds_permit() && running.steal();
        if taken {
            Lead::given_up(self, hash, Arc::clone(running));
        }
        taken
    }

    async fn lock_key_async(&self, hash: u64, key: &K) -> Lead<K, V, S> {
        loop {
            match self.try_lock_key(hash, key) {
                Ok(lead) => return lead,
                Err(running) if self.give_up_waiting_leader(hash, &running) => {}
                Err(running) => {
                    let accept = |_: &Outcome<V>| None::<()>;
                    let _ = wait_async(self, hash, &running, &accept).await;
                }
            }
        }
    }

    /// What a computation that locked `key` (holding `lead`) reads: the key's value as of its
    /// registration. `None` if a write superseded the registration before the read was
    /// checked: the value read may then be that write's, which the computation's verdict
    /// would lose to — a verdict about a value must win over the write that stored it. The
    /// lead is then released (not counted: no load) and the caller locks the key again.
    /// (A write after the check supersedes the computation, which then loses, as documented.)
    fn read_locked(&self, lead: Lead<K, V, S>, key: &K) -> Option<(Lead<K, V, S>, Option<V>)>
    where
        V: Clone,
    {
        let current = self.read_with(key, lead.hash(), false, V::clone);
        if !lead.flight().is_superseded() {
            return Some((lead, current));
        }
        // The value's `Drop` (user code) with the lead still held: a panic releases it.
        drop(current);
        drop(lead);
        None
    }

    fn try_lock_key(&self, hash: u64, key: &K) -> Result<Lead<K, V, S>, FlightRef<K, V>> {
        let f = Flight::computation();
        // A computation is not a load waiting for a permit: nobody takes it over.
        let keep = || {
            f.start();
            true
        };
        match self.register_flight::<()>(hash, key, &f, false, None, None, keep) {
            Registration::Running(running) => {
                if runs_here(running.id()) {
                    recursive_load();
                }
                Err(running)
            }
            Registration::Registered(swept) => {
                Ok(swept.drop_after(Lead::computation(self, hash, f)))
            }
            Registration::Hit(()) | Registration::Withdrawn => {
                unreachable!("no lookup, always kept")
            }
        }
    }

    /// Removes `key`'s entry for a computation that decided [`Op::Remove`] (unless a write of
    /// the key detached the computation's flight meanwhile), then releases its waiters.
    fn remove_computed(&self, lead: Lead<K, V, S>, key: &K) {
        let mut out = Removals::new();
        let hash = lead.hash();
        let mut lead = lead;
        // A removal ends the key's negative-cache entry the computation replaced: dropped
        // last, a panic of its error's `Drop` going on to the caller.
        let negative = crate::unwind::DropLater(lead.forget_negative());
        let flight = lead.disarm();
        let guard = AbandonOnDrop(self, hash, &flight);
        let flight_key = self.remove_with_flight(hash, key, &flight, &mut out);
        drop(guard); // callers waiting on the computation look again
        self.report_removals(out);
        // The key's `Drop` (user code) once the removal is reported.
        drop(flight_key);
        drop(negative);
    }

    /// Ends a computation with its closure's verdict. A write or invalidation of the key while
    /// the closure ran detached the computation's flight: then nothing is stored or removed
    /// (the write wins), and the result says what the closure asked for.
    fn end_compute(
        &self,
        lead: Lead<K, V, S>,
        key: K,
        current: Option<V>,
        op: Op<V>,
    ) -> CompResult<K, V> {
        match (op, current) {
            (Op::Put(v), current) => {
                let replaced = current.is_some();
                // The copy of the value the closure saw drops first (user code: see `answer`);
                // a panic there leaves the key as it was.
                drop(current);
                let entry = Entry {
                    key: key.clone(),
                    value: v.clone(),
                    fresh: true,
                    replaced,
                };
                self.publish_computed(lead, key, v);
                if replaced {
                    CompResult::ReplacedWith(entry)
                } else {
                    CompResult::Inserted(entry)
                }
            }
            (Op::Remove, Some(old)) => {
                self.remove_computed(lead, &key);
                CompResult::Removed(Entry {
                    key,
                    value: old,
                    fresh: false,
                    replaced: false,
                })
            }
            (Op::Remove, None) if self.inner.stampede.fail_safe.is_some() => {
                // The closure saw no value, but an expired one may be kept for fail-safe: the
                // removal ends it (a failing load must not bring it back).
                self.remove_computed(lead, &key);
                CompResult::StillNone(key)
            }
            (Op::Nop, Some(v)) => {
                drop(lead);
                CompResult::Unchanged(Entry {
                    key,
                    value: v,
                    fresh: false,
                    replaced: false,
                })
            }
            (Op::Remove, None) => {
                // A removal ends a negative-cache entry of the key, as `invalidate` does.
                let mut lead = lead;
                let negative = lead.forget_negative();
                drop(lead);
                drop(negative);
                CompResult::StillNone(key)
            }
            (Op::Nop, None) => {
                // Changes nothing: a negative-cache entry of the key is put back.
                drop(lead);
                CompResult::StillNone(key)
            }
        }
    }
}

/// Resolves a flight as abandoned when dropped (after a removal, or a panic during it).
struct AbandonOnDrop<'a, K, V, S>(&'a Cache<K, V, S>, u64, &'a Arc<Flight<K, V>>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static;

impl<K, V, S> Drop for AbandonOnDrop<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // A computation's: not a failed load (fail-safe's backoff is for those).
        self.0
            .end_flight(self.1, self.2, None, Phase::Abandoned, false);
    }
}

/// Polls a computation's closure future with its flight marked as run by the polling thread,
/// so a load of the same key inside it fails loudly instead of waiting for itself.
struct Computing<'a, K, V, F> {
    flight: &'a Arc<Flight<K, V>>,
    inner: std::pin::Pin<Box<F>>,
}

impl<K: Send + Sync + 'static, V: Send + Sync + 'static, F: Future> Future
    for Computing<'_, K, V, F>
{
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let _running = enter(self.flight);
        self.inner.as_mut().poll(cx)
    }
}

enum Claimed<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    Hit(V),
    Lead(Lead<K, V, S>),
    Join(Arc<Flight<K, V>>),
}

impl<K, V, S> EntryRef<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The entry, inserting `init()` if absent: [`Cache::get_with`] that also tells whether
    /// this call's `init` produced the value ([`Entry::is_fresh`]).
    ///
    /// Blocks while a load of the key runs. Same semantics for concurrent calls, panics and
    /// recursion as [`Cache::get_with`].
    pub fn or_insert_with(self, init: impl FnOnce() -> V) -> Entry<K, V> {
        let mut fresh = false;
        let value = self.cache.get_with(self.key.clone(), || {
            fresh = true;
            init()
        });
        Entry {
            key: self.key,
            value,
            fresh,
            replaced: false,
        }
    }

    /// moka's `or_insert_with_if`: [`Cache::get_with_if`] that also tells whether this
    /// call's `init` produced the value ([`Entry::is_fresh`]).
    ///
    /// ```
    /// let cache = herdcache::Cache::new(10);
    /// let e = cache.entry(1).or_insert_with_if(|| 10, |_| false);
    /// assert!(e.is_fresh()); // absent: loaded
    /// let e = cache.entry(1).or_insert_with_if(|| 20, |v| *v < 15);
    /// assert!(e.is_fresh() && *e.value() == 20); // replaced
    /// let e = cache.entry(1).or_insert_with_if(|| 30, |v| *v < 15);
    /// assert!(!e.is_fresh() && *e.value() == 20); // kept
    /// ```
    pub fn or_insert_with_if(
        self,
        init: impl FnOnce() -> V,
        replace_if: impl FnMut(&V) -> bool,
    ) -> Entry<K, V> {
        let (value, fresh) = self.cache.load_if(self.key.clone(), init, replace_if);
        Entry {
            key: self.key,
            value,
            fresh,
            replaced: false,
        }
    }

    /// The async twin of [`or_insert_with_if`](Self::or_insert_with_if) (moka's future
    /// `or_insert_with_if`); cancel safety as [`Cache::get_with_if_async`].
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache = herdcache::Cache::new(10);
    /// let e = cache.entry(1).or_insert_with_if_async(async { 10 }, |_| false).await;
    /// assert!(e.is_fresh());
    /// # });
    /// ```
    pub async fn or_insert_with_if_async(
        self,
        init: impl Future<Output = V>,
        replace_if: impl FnMut(&V) -> bool + Send,
    ) -> Entry<K, V> {
        let (value, fresh) = self
            .cache
            .load_if_async(self.key.clone(), init, replace_if)
            .await;
        Entry {
            key: self.key,
            value,
            fresh,
            replaced: false,
        }
    }

    /// The async twin of [`or_insert_with`](Self::or_insert_with); `init` may borrow, and
    /// cancel safety is as [`Cache::get_with_async`].
    pub async fn or_insert_with_async(self, init: impl Future<Output = V>) -> Entry<K, V> {
        let fresh = AtomicBool::new(false);
        let value = self
            .cache
            .get_with_async(self.key.clone(), async {
                fresh.store(true, Ordering::Release);
                init.await
            })
            .await;
        Entry {
            key: self.key,
            value,
            fresh: fresh.load(Ordering::Acquire),
            replaced: false,
        }
    }

    /// Atomically (per key) reads the current entry, lets `f` decide, and applies the
    /// decision: [`Op::Put`] stores a value, [`Op::Remove`] removes the entry, [`Op::Nop`]
    /// leaves it.
    ///
    /// Computations and loads of the same key run one at a time: this call first waits for
    /// any that runs, and callers loading the key while `f` runs wait for it and take its
    /// value. `f` runs with no lock held and may use the cache, except to compute or load this
    /// same key (a recursive load panics). A plain `insert` or `invalidate` of the key while
    /// `f` runs wins over the verdict: a `Put` is returned but not stored, a `Remove` leaves
    /// the newer value in place. The entry `f` sees is read once the key is locked, and a write
    /// that lands before that read is read again, so a verdict always applies to the value it
    /// was given.
    ///
    /// The look at the current entry is a read, as moka's compute: it moves the entry's time
    /// to idle and calls [`Expiry::expire_after_read`](crate::Expiry::expire_after_read),
    /// whatever `f` decides (an [`Op::Nop`] too), but counts no hit and no miss.
    ///
    /// # Panics
    ///
    /// If `f` panics (the key's other callers are released first). If the `Drop` of the copy
    /// of the old value `f` was given panics (after `f` returned, before an [`Op::Put`] is
    /// stored), that panic reaches the caller and nothing is stored: the key keeps its old
    /// value, the `Put` value is dropped, and callers waiting for the key look it up again.
    ///
    /// # Example
    ///
    /// ```
    /// use herdcache::{Cache, CompResult, Op};
    /// let cache: Cache<u8, u32> = Cache::new(10);
    /// let r = cache.entry(1).and_compute_with(|e| match e {
    ///     Some(e) if *e.value() >= 3 => Op::Remove,
    ///     Some(e) => Op::Put(e.value() + 1),
    ///     None => Op::Put(1),
    /// });
    /// assert!(matches!(r, CompResult::Inserted(_)));
    /// ```
    pub fn and_compute_with(
        self,
        f: impl FnOnce(Option<Entry<K, V>>) -> Op<V>,
    ) -> CompResult<K, V> {
        let cache = self.cache;
        let hash = cache.hash(&self.key);
        // Guarded until the verdict is applied: a panic in `f` (or in a clone) releases the key.
        let (lead, current) = loop {
            let lead = cache.lock_key(hash, &self.key);
            if let Some(read) = cache.read_locked(lead, &self.key) {
                break read;
            }
        };
        let running = enter(lead.flight());
        let entry = current.clone().map(|value| Entry {
            key: self.key.clone(),
            value,
            fresh: false,
            replaced: false,
        });
        let op = f(entry);
        drop(running);
        cache.end_compute(lead, self.key, current, op)
    }

    /// The async twin of [`and_compute_with`](Self::and_compute_with): `f` returns a future.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future while it waits or while `f`'s future runs releases the key
    /// (nothing is stored) and lets the key's other callers go on.
    pub async fn and_compute_with_async<F, Fut>(self, f: F) -> CompResult<K, V>
    where
        F: FnOnce(Option<Entry<K, V>>) -> Fut,
        Fut: Future<Output = Op<V>>,
    {
        let cache = self.cache;
        let hash = cache.hash(&self.key);
        // Guarded until the verdict is applied: a panic in `f`, or this future dropped while
        // `f`'s future runs, releases the key.
        let (lead, current) = loop {
            let lead = cache.lock_key_async(hash, &self.key).await;
            if let Some(read) = cache.read_locked(lead, &self.key) {
                break read;
            }
        };
        let entry = current.clone().map(|value| Entry {
            key: self.key.clone(),
            value,
            fresh: false,
            replaced: false,
        });
        // `f`'s synchronous part runs as the computation too: a load or computation of this
        // key inside it panics ("recursive load") instead of waiting for itself.
        let inner = {
            let _running = enter(lead.flight());
            Box::pin(f(entry))
        };
        let op = Computing {
            flight: lead.flight(),
            inner,
        }
        .await;
        cache.end_compute(lead, self.key, current, op)
    }

    /// Atomically (per key) replaces the value with `f(current entry)`, or inserts it if
    /// absent, and returns the new entry. Semantics as
    /// [`and_compute_with`](Self::and_compute_with).
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// for _ in 0..3 {
    ///     cache.entry("n").and_upsert_with(|e| e.map_or(1, |e| e.value() + 1));
    /// }
    /// assert_eq!(cache.get("n"), Some(3));
    /// ```
    pub fn and_upsert_with(self, f: impl FnOnce(Option<Entry<K, V>>) -> V) -> Entry<K, V> {
        match self.and_compute_with(|e| Op::Put(f(e))) {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) => e,
            _ => unreachable!("a Put inserts or replaces"),
        }
    }

    /// The async twin of [`and_upsert_with`](Self::and_upsert_with).
    pub async fn and_upsert_with_async<F, Fut>(self, f: F) -> Entry<K, V>
    where
        F: FnOnce(Option<Entry<K, V>>) -> Fut,
        Fut: Future<Output = V>,
    {
        let r = self
            .and_compute_with_async(|e| {
                let fut = f(e);
                async move { Op::Put(fut.await) }
            })
            .await;
        match r {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) => e,
            _ => unreachable!("a Put inserts or replaces"),
        }
    }
}

/// Shows the key (and the cache's configuration).
///
/// ```
/// let cache = herdcache::Cache::<&str, u8>::new(10);
/// assert!(format!("{:?}", cache.entry("k")).starts_with("EntryRef { key: \"k\""));
/// ```
impl<K: std::fmt::Debug, V, S> std::fmt::Debug for EntryRef<'_, K, V, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryRef")
            .field("key", &self.key)
            .field("cache", self.cache)
            .finish()
    }
}

/// moka's remaining entry verbs, on top of the ones above and the cache's loads.
impl<K, V, S> EntryRef<'_, K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// [`or_insert`](Self::or_insert)'s and [`or_default`](Self::or_default)'s: the entry,
    /// inserting `default()` if absent. A value in hand is no load. Without
    /// [`fail_safe`](crate::CacheBuilder::fail_safe), [`or_insert_with`](Self::or_insert_with)
    /// with `default` as its `init`. With it, an expired entry is absent from the start:
    /// fail-safe answers a *load* of an expired key with its old value to spare a failing
    /// backend, and this call has none to spare (round 84: through `or_insert_with` it got the
    /// expired value and stored nothing; round 86: undoing that answer afterwards still counted
    /// it, cloned the old value, and could return it after a write). So: a live value is a
    /// hit (counted as `get_with`'s); on a miss, an insert-if-absent computation (which waits
    /// for a running load of the key, as `get_with` does, and sees an expired entry as
    /// absent) stores `default()` — counted as a load that succeeded — or returns the value a
    /// write or load stored first — counted as coalesced.
    fn or_insert_value(self, default: impl FnOnce() -> V) -> Entry<K, V> {
        let cache = self.cache;
        if cache.inner.stampede.fail_safe.is_none() {
            return self.or_insert_with(default);
        }
        let hash = cache.hash(&self.key);
        if let Some(value) = cache.read_with(&self.key, hash, true, V::clone) {
            return after_dropping(default, Entry::found(self.key, value));
        }
        let miss = MissSettled::new(cache);
        let e = insert_if_absent(self.and_compute_with(|cur| match cur {
            Some(_) => Op::Nop,
            None => Op::Put(miss.produce(default)),
        }));
        miss.settle();
        e
    }

    /// The async twin of [`or_insert_value`](Self::or_insert_value).
    async fn or_insert_value_async(self, default: impl FnOnce() -> V) -> Entry<K, V> {
        let cache = self.cache;
        if cache.inner.stampede.fail_safe.is_none() {
            return self.or_insert_with_async(async { default() }).await;
        }
        let hash = cache.hash(&self.key);
        if let Some(value) = cache.read_with(&self.key, hash, true, V::clone) {
            return after_dropping(default, Entry::found(self.key, value));
        }
        let miss = MissSettled::new(cache);
        let m = &miss;
        let e = insert_if_absent(
            self.and_compute_with_async(|cur| async move {
                match cur {
                    Some(_) => Op::Nop,
                    None => Op::Put(m.produce(default)),
                }
            })
            .await,
        );
        miss.settle();
        e
    }

    /// The entry, inserting `default` if absent ([`Entry::is_fresh`] tells which). If a load
    /// of the key is running, waits for it and returns its value, blocking the thread: in
    /// async code use [`or_insert_async`](Self::or_insert_async). An expired entry is absent
    /// here even with [`fail_safe`](crate::CacheBuilder::fail_safe), whose old value answers
    /// only loads: `default` is stored.
    ///
    /// With fail-safe, a miss is an insert-if-absent [computation](Self::and_compute_with)
    /// rather than a load (so that no fail-safe answer applies). Values, freshness and panics
    /// are as without it; the statistics differ in three corners: a recursive call (this key,
    /// from inside its own computation or `default`) panics as a failed load rather than as a
    /// coalesced one; like any computation it takes over a load of the key still waiting
    /// for a [`max_concurrent_loads`](crate::CacheBuilder::max_concurrent_loads) permit (that
    /// load counts as abandoned; its caller loads again); and a call that waits for a load of
    /// the key which then fails counts one miss (without fail-safe: a miss, a coalesced wait,
    /// and a second miss as it inserts).
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// assert!(cache.entry("a").or_insert(1).is_fresh());
    /// let e = cache.entry("a").or_insert(2);
    /// assert!(!e.is_fresh());
    /// assert_eq!(e.into_value(), 1);
    /// ```
    pub fn or_insert(self, default: V) -> Entry<K, V> {
        self.or_insert_value(|| default)
    }

    /// The entry, inserting `V::default()` if absent (blocking while a load of the key runs;
    /// in async code use [`or_default_async`](Self::or_default_async)).
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, Vec<u8>> = herdcache::Cache::new(10);
    /// assert!(cache.entry("a").or_default().value().is_empty());
    /// ```
    pub fn or_default(self) -> Entry<K, V>
    where
        V: Default,
    {
        self.or_insert_value(V::default)
    }

    /// The async twin of [`or_insert`](Self::or_insert) (moka's future `or_insert`): waits
    /// for a running load of the key without blocking the thread.
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get_with_async`].
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// assert!(cache.entry("a").or_insert_async(1).await.is_fresh());
    /// assert_eq!(cache.entry("a").or_insert_async(2).await.into_value(), 1);
    /// # });
    /// ```
    pub async fn or_insert_async(self, default: V) -> Entry<K, V> {
        self.or_insert_value_async(|| default).await
    }

    /// The async twin of [`or_default`](Self::or_default).
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get_with_async`].
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache: herdcache::Cache<&str, Vec<u8>> = herdcache::Cache::new(10);
    /// assert!(cache.entry("a").or_default_async().await.value().is_empty());
    /// # });
    /// ```
    pub async fn or_default_async(self) -> Entry<K, V>
    where
        V: Default,
    {
        self.or_insert_value_async(V::default).await
    }

    /// The entry, inserting `init()`'s value if absent; `None` if absent and `init` returned
    /// `None` (nothing is cached then). [`Cache::optionally_get_with`] that also tells whether
    /// this call's `init` produced the value.
    ///
    /// # Panics
    ///
    /// As [`Cache::get_with`].
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// assert_eq!(cache.entry("a").or_optionally_insert_with(|| None), None);
    /// let e = cache.entry("a").or_optionally_insert_with(|| Some(1)).unwrap();
    /// assert!(e.is_fresh());
    /// ```
    pub fn or_optionally_insert_with(
        self,
        init: impl FnOnce() -> Option<V>,
    ) -> Option<Entry<K, V>> {
        let mut fresh = false;
        let value = self.cache.optionally_get_with(self.key.clone(), || {
            fresh = true;
            init()
        })?;
        Some(Entry {
            key: self.key,
            value,
            fresh,
            replaced: false,
        })
    }

    /// The entry, inserting `init()`'s value if absent; its error if it failed (shared as one
    /// `Arc<E>` with the callers that waited on that load, and not cached).
    /// [`Cache::try_get_with`] that also tells whether this call's `init` produced the value.
    ///
    /// # Errors
    ///
    /// As [`Cache::try_get_with`].
    ///
    /// # Panics
    ///
    /// As [`Cache::get_with`].
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// let r = cache.entry("a").or_try_insert_with(|| Err::<u32, _>("backend down"));
    /// assert_eq!(*r.unwrap_err(), "backend down");
    /// let e = cache.entry("a").or_try_insert_with(|| Ok::<_, &str>(1)).unwrap();
    /// assert_eq!((e.is_fresh(), *e.value()), (true, 1));
    /// ```
    pub fn or_try_insert_with<E>(
        self,
        init: impl FnOnce() -> Result<V, E>,
    ) -> Result<Entry<K, V>, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        // Fresh only if `init` succeeded: on its failure fail-safe may answer with the old value.
        let mut fresh = false;
        let value = match self.cache.try_get_with(self.key.clone(), || {
            let r = init();
            fresh = r.is_ok();
            r
        }) {
            Ok(value) => value,
            // The key drops before the error leaves (user code: see `answer`).
            Err(e) => return Err(after_dropping(self.key, e)),
        };
        Ok(Entry {
            key: self.key,
            value,
            fresh,
            replaced: false,
        })
    }

    /// [`and_compute_with`](Self::and_compute_with) for a closure that can fail: on `Err`
    /// nothing changes and the error is returned (moka's shape). Same per-key atomicity.
    ///
    /// # Errors
    ///
    /// The closure's error.
    ///
    /// # Panics
    ///
    /// As [`and_compute_with`](Self::and_compute_with).
    ///
    /// ```
    /// use herdcache::{Cache, CompResult, Op};
    /// let cache: Cache<&str, u32> = Cache::new(10);
    /// cache.insert("n", 1);
    /// let r = cache.entry("n").and_try_compute_with(|e| match e {
    ///     Some(e) if *e.value() > 0 => Ok(Op::Put(e.value() * 10)),
    ///     _ => Err("nothing to scale"),
    /// });
    /// assert!(matches!(r, Ok(CompResult::ReplacedWith(_))));
    /// let r = cache.entry("m").and_try_compute_with(|_| Err::<Op<u32>, _>("nothing to scale"));
    /// assert_eq!(r.unwrap_err(), "nothing to scale");
    /// assert!(!cache.contains_key("m"));
    /// ```
    pub fn and_try_compute_with<E>(
        self,
        f: impl FnOnce(Option<Entry<K, V>>) -> Result<Op<V>, E>,
    ) -> Result<CompResult<K, V>, E> {
        let mut failed = None;
        let r = self.and_compute_with(|e| {
            f(e).unwrap_or_else(|err| {
                failed = Some(err);
                Op::Nop
            })
        });
        match failed {
            // The result (the entry it holds: user code as it drops) before the error leaves.
            Some(err) => Err(after_dropping(r, err)),
            None => Ok(r),
        }
    }

    /// The async twin of [`or_optionally_insert_with`](Self::or_optionally_insert_with); cancel
    /// safety and `init` (which may borrow) as [`Cache::optionally_get_with_async`].
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// let e = futures::executor::block_on(
    ///     cache.entry("a").or_optionally_insert_with_async(async { Some(1) }),
    /// );
    /// assert!(e.unwrap().is_fresh());
    /// ```
    pub async fn or_optionally_insert_with_async(
        self,
        init: impl Future<Output = Option<V>>,
    ) -> Option<Entry<K, V>> {
        let fresh = AtomicBool::new(false);
        let value = self
            .cache
            .optionally_get_with_async(self.key.clone(), async {
                fresh.store(true, Ordering::Release);
                init.await
            })
            .await?;
        Some(Entry {
            key: self.key,
            value,
            fresh: fresh.load(Ordering::Acquire),
            replaced: false,
        })
    }

    /// The async twin of [`or_try_insert_with`](Self::or_try_insert_with); cancel safety and
    /// `init` (which may borrow) as [`Cache::try_get_with_async`].
    ///
    /// # Errors
    ///
    /// As [`Cache::try_get_with_async`].
    ///
    /// ```
    /// let cache: herdcache::Cache<&str, u32> = herdcache::Cache::new(10);
    /// let r = futures::executor::block_on(
    ///     cache.entry("a").or_try_insert_with_async(async { Ok::<_, std::io::Error>(1) }),
    /// );
    /// assert_eq!(r.unwrap().into_value(), 1);
    /// ```
    pub async fn or_try_insert_with_async<E>(
        self,
        init: impl Future<Output = Result<V, E>>,
    ) -> Result<Entry<K, V>, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        let fresh = AtomicBool::new(false);
        let value = match self
            .cache
            .try_get_with_async(self.key.clone(), async {
                let r = init.await;
                fresh.store(r.is_ok(), Ordering::Release);
                r
            })
            .await
        {
            Ok(value) => value,
            // The key drops before the error leaves (user code: see `answer`).
            Err(e) => return Err(after_dropping(self.key, e)),
        };
        Ok(Entry {
            key: self.key,
            value,
            fresh: fresh.load(Ordering::Acquire),
            replaced: false,
        })
    }

    /// The async twin of [`and_try_compute_with`](Self::and_try_compute_with): `f` returns a
    /// future. Cancel safety as [`and_compute_with_async`](Self::and_compute_with_async).
    ///
    /// # Errors
    ///
    /// The error of `f`'s future (nothing changes then).
    ///
    /// ```
    /// use herdcache::{Cache, Op};
    /// let cache: Cache<&str, u32> = Cache::new(10);
    /// let r = futures::executor::block_on(
    ///     cache.entry("n").and_try_compute_with_async(|e| async move {
    ///         Ok::<_, std::io::Error>(Op::Put(e.map_or(1, |e| e.value() + 1)))
    ///     }),
    /// );
    /// assert!(r.is_ok());
    /// assert_eq!(cache.get("n"), Some(1));
    /// ```
    pub async fn and_try_compute_with_async<F, Fut, E>(self, f: F) -> Result<CompResult<K, V>, E>
    where
        F: FnOnce(Option<Entry<K, V>>) -> Fut,
        Fut: Future<Output = Result<Op<V>, E>>,
    {
        let mut failed = None;
        let slot = &mut failed;
        let r = self
            .and_compute_with_async(|e| {
                let fut = f(e);
                async move {
                    fut.await.unwrap_or_else(|err| {
                        *slot = Some(err);
                        Op::Nop
                    })
                }
            })
            .await;
        match failed {
            // The result (the entry it holds: user code as it drops) before the error leaves.
            Some(err) => Err(after_dropping(r, err)),
            None => Ok(r),
        }
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use crate::{Cache, CompResult, Op};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn or_insert_with_runs_once_and_reports_freshness() {
        let cache: Cache<u32, u32> = Cache::new(10);
        let calls = AtomicUsize::new(0);
        let init = || {
            calls.fetch_add(1, Ordering::SeqCst);
            7
        };
        let first = cache.entry(1).or_insert_with(init);
        assert!(first.is_fresh() && *first.value() == 7);
        let second = cache.entry(1).or_insert_with(|| unreachable!("present"));
        assert!(!second.is_fresh() && *second.value() == 7);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn compute_maps_each_op_to_its_result() {
        let cache: Cache<u32, u32> = Cache::new(10);
        let r = cache.entry(1).and_compute_with(|e| {
            assert!(e.is_none());
            Op::Put(1)
        });
        assert!(matches!(r, CompResult::Inserted(e) if *e.value() == 1));
        let r = cache
            .entry(1)
            .and_compute_with(|e| Op::Put(e.unwrap().into_value() + 1));
        assert!(matches!(r, CompResult::ReplacedWith(e) if *e.value() == 2));
        let r = cache.entry(1).and_compute_with(|_| Op::Nop);
        assert!(matches!(r, CompResult::Unchanged(e) if *e.value() == 2));
        let r = cache.entry(1).and_compute_with(|_| Op::Remove);
        assert!(matches!(r, CompResult::Removed(e) if *e.value() == 2));
        let r = cache.entry(1).and_compute_with(|_| Op::Nop);
        assert!(matches!(r, CompResult::StillNone(k) if k == 1));
        cache.validate();
    }

    #[test]
    fn a_panicking_compute_leaves_the_key_usable() {
        let cache: Cache<u32, u32> = Cache::new(10);
        cache.insert(1, 1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache
                .entry(1)
                .and_compute_with(|_| -> Op<u32> { panic!("compute") })
        }));
        assert!(r.is_err());
        assert_eq!(cache.get(&1), Some(1), "nothing changed");
        assert_eq!(
            cache
                .entry(1)
                .and_upsert_with(|e| e.map_or(0, |e| e.into_value() + 1))
                .into_value(),
            2
        );
        assert_eq!(cache.loads_in_flight(), 0);
    }
}

/// Settles the miss an `or_insert` counted before its computation as a `get_with`'s load of
/// `default()` would be: once `default()` has returned (timed), a load that succeeded, with
/// its time, whatever happens after (a weigher's, a listener's or a `Clone`'s panic in the
/// store: the value was produced); a value found instead (a write or load got there first),
/// coalesced; and if the call ends before either — `default()` panicked, or the computation
/// panicked or its future was dropped before it ran — a load that failed or was abandoned, so
/// that misses still balance.
struct MissSettled<'a, K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V, S>,
    /// `default()`'s time once it returned; [`NOT_PRODUCED`] before; [`SETTLED`] once counted.
    produced: std::sync::atomic::AtomicU64,
}

/// [`MissSettled::produced`] before `default()` returned.
const NOT_PRODUCED: u64 = u64::MAX;
/// [`MissSettled::produced`] once counted.
const SETTLED: u64 = u64::MAX - 1;

impl<'a, K, V, S> MissSettled<'a, K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn new(cache: &'a Cache<K, V, S>) -> Self {
        MissSettled {
            cache,
            produced: std::sync::atomic::AtomicU64::new(NOT_PRODUCED),
        }
    }

    /// Runs `default` (the "load"), timed.
    fn produce(&self, default: impl FnOnce() -> V) -> V {
        let start = self.cache.stopwatch();
        let v = default();
        let took = self
            .cache
            .stopwatch()
            .saturating_sub(start)
            .min(SETTLED - 1);
        self.produced.store(took, Ordering::Relaxed);
        v
    }

    /// Counts the call: a load (if `default()` ran) or a value found.
    fn settle(self) {
        self.finish(Counter::Coalesced);
    }

    /// Counts the call, as `unproduced` if `default()` never returned.
    fn finish(&self, unproduced: Counter) {
        let c = self.cache;
        match self.produced.swap(SETTLED, Ordering::Relaxed) {
            SETTLED => {}
            NOT_PRODUCED => c.count(unproduced),
            took => {
                c.count(Counter::LoadSuccess);
                c.count_n(Counter::LoadNanos, took);
                c.inner.stampede.monitor.load(took, false);
            }
        }
    }
}

impl<K, V, S> Drop for MissSettled<'_, K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // Not settled: a panic (`default()`'s, or the computation's), or an async caller's
        // future dropped before the computation ran.
        self.finish(if std::thread::panicking() {
            Counter::LoadFailure
        } else {
            Counter::LoadAbandoned
        });
    }
}

/// The entry an insert-if-absent computation (`Nop` on a value, `Put` on none) leaves.
fn insert_if_absent<K, V>(r: CompResult<K, V>) -> Entry<K, V> {
    match r {
        CompResult::Inserted(e)
        | CompResult::Unchanged(e)
        | CompResult::ReplacedWith(e)
        | CompResult::Removed(e) => e,
        CompResult::StillNone(_) => unreachable!("a computation that puts on none leaves a value"),
    }
}
