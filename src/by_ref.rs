//! Loads by borrowed key (moka's `*_by_ref` shapes): the key is looked up by reference, and
//! turned into an owned `K` only on a miss, for the load.

use crate::answer::after_dropping;
use crate::cache::Cache;
use crate::entry::EntryRef;
use crate::flight::{accept_option, accept_result, accept_value, outcome_of, Outcome};
use crate::load::{Settle, Start};
use std::borrow::Borrow;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// [`get_with`](Self::get_with) by borrowed key: a hit looks `key` up by reference and
    /// neither clones nor allocates it; only a miss makes the owned key
    /// (`key.to_owned()`) for the load. Same single-flight semantics, panics and statistics as
    /// `get_with` (a miss counts one miss, not two).
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Example
    ///
    /// ```
    /// use herdcache::Cache;
    ///
    /// let cache: Cache<String, usize> = Cache::new(100);
    /// let name: &str = "ada";
    /// assert_eq!(cache.get_with_by_ref(name, || name.len()), 3); // a miss: "ada".to_owned()
    /// assert_eq!(cache.get_with_by_ref(name, || unreachable!()), 3); // a hit: no String made
    /// ```
    pub fn get_with_by_ref<Q>(&self, key: &Q, init: impl FnOnce() -> V) -> V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.load_by_ref(key, || Outcome::Value(init()), V::clone, accept_value)
    }

    /// [`try_get_with`](Self::try_get_with) by borrowed key; the hit path neither clones nor
    /// allocates the key (see [`get_with_by_ref`](Self::get_with_by_ref)).
    ///
    /// # Errors
    ///
    /// As [`try_get_with`](Self::try_get_with): the loader's error, shared, not cached.
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<String, u32> = herdcache::Cache::new(10);
    /// let r = cache.try_get_with_by_ref("a", || Err::<u32, _>("backend down"));
    /// assert_eq!(*r.unwrap_err(), "backend down");
    /// assert_eq!(cache.try_get_with_by_ref("a", || Ok::<_, &str>(1)), Ok(1));
    /// ```
    pub fn try_get_with_by_ref<Q, E>(
        &self,
        key: &Q,
        init: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, Arc<E>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        E: Send + Sync + 'static,
    {
        let hit = |v: &V| Ok(v.clone());
        self.load_by_ref(key, || outcome_of(init()), hit, accept_result::<V, E>)
    }

    /// [`optionally_get_with`](Self::optionally_get_with) by borrowed key; the hit path
    /// neither clones nor allocates the key (see [`get_with_by_ref`](Self::get_with_by_ref)).
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Example
    ///
    /// ```
    /// let cache: herdcache::Cache<String, u32> = herdcache::Cache::new(10);
    /// assert_eq!(cache.optionally_get_with_by_ref("a", || None), None); // not cached
    /// assert_eq!(cache.optionally_get_with_by_ref("a", || Some(1)), Some(1));
    /// assert_eq!(cache.get("a"), Some(1));
    /// ```
    pub fn optionally_get_with_by_ref<Q>(
        &self,
        key: &Q,
        init: impl FnOnce() -> Option<V>,
    ) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let init = || init().map_or(Outcome::Nothing, Outcome::Value);
        self.load_by_ref(key, init, |v: &V| Some(v.clone()), accept_option)
    }

    /// The single-flight load by borrowed key: a lookup by reference, then, on a miss
    /// (counted; the load's own lookups are not), a load of the owned key.
    fn load_by_ref<Q, R>(
        &self,
        key: &Q,
        init: impl FnOnce() -> Outcome<V>,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let hash = match self.look_by_ref(key, &hit) {
            // The unused `init` drops first (user code: see `answer`).
            Ok(r) => return after_dropping(init, r),
            Err(hash) => hash,
        };
        // The miss is counted: its ledger comes before the key's `to_owned` (user code).
        let how = Settle::starting(self, Start::Missed);
        let (k, none) = (key.to_owned(), None);
        self.load_blocking(k, hash, init, &hit, &accept, none, how, None)
            .expect("without a deadline a blocking load always ends with a result")
    }

    /// The async twin of [`get_with_by_ref`](Self::get_with_by_ref) (moka's future
    /// `get_with_by_ref`): `init` may borrow, as for
    /// [`get_with_async`](Self::get_with_async).
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache: herdcache::Cache<String, usize> = herdcache::Cache::new(100);
    /// assert_eq!(cache.get_with_by_ref_async("ada", async { 3 }).await, 3);
    /// assert_eq!(cache.get_with_by_ref_async("ada", async { unreachable!() }).await, 3);
    /// # });
    /// ```
    pub async fn get_with_by_ref_async<Q>(&self, key: &Q, init: impl Future<Output = V>) -> V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let init = async { Outcome::Value(init.await) };
        self.load_by_ref_async(key, init, V::clone, accept_value)
            .await
    }

    /// The async twin of [`try_get_with_by_ref`](Self::try_get_with_by_ref).
    ///
    /// # Errors
    ///
    /// As [`try_get_with`](Self::try_get_with).
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache: herdcache::Cache<String, u32> = herdcache::Cache::new(10);
    /// let r = cache.try_get_with_by_ref_async("a", async { Err::<u32, _>("down") }).await;
    /// assert_eq!(*r.unwrap_err(), "down");
    /// # });
    /// ```
    pub async fn try_get_with_by_ref_async<Q, E>(
        &self,
        key: &Q,
        init: impl Future<Output = Result<V, E>>,
    ) -> Result<V, Arc<E>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        E: Send + Sync + 'static,
    {
        let init = async { outcome_of(init.await) };
        let hit = |v: &V| Ok(v.clone());
        self.load_by_ref_async(key, init, hit, accept_result::<V, E>)
            .await
    }

    /// The async twin of [`optionally_get_with_by_ref`](Self::optionally_get_with_by_ref).
    ///
    /// # Panics
    ///
    /// As [`get_with`](Self::get_with).
    ///
    /// # Cancel safety
    ///
    /// As [`get_with_async`](Self::get_with_async).
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// let cache: herdcache::Cache<String, u32> = herdcache::Cache::new(10);
    /// assert_eq!(cache.optionally_get_with_by_ref_async("a", async { None }).await, None);
    /// assert_eq!(cache.optionally_get_with_by_ref_async("a", async { Some(1) }).await, Some(1));
    /// # });
    /// ```
    pub async fn optionally_get_with_by_ref_async<Q>(
        &self,
        key: &Q,
        init: impl Future<Output = Option<V>>,
    ) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let init = async { init.await.map_or(Outcome::Nothing, Outcome::Value) };
        self.load_by_ref_async(key, init, |v: &V| Some(v.clone()), accept_option)
            .await
    }

    /// [`load_by_ref`](Self::load_by_ref), async: the leader drives `init` itself.
    async fn load_by_ref_async<Q, R>(
        &self,
        key: &Q,
        init: impl Future<Output = Outcome<V>>,
        hit: impl Fn(&V) -> R,
        accept: impl Fn(&Outcome<V>) -> Option<R>,
    ) -> R
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let hash = match self.look_by_ref(key, &hit) {
            // The unused `init` drops first (user code: see `answer`).
            Ok(r) => return after_dropping(init, r),
            Err(hash) => hash,
        };
        let how = Settle::starting(self, Start::Missed);
        let key = key.to_owned();
        self.load_borrowed_from(key, hash, how, None, init, hit, accept)
            .await
    }

    /// A load by borrowed key's first look: the hit, or (a miss, counted) the key's hash.
    fn look_by_ref<Q, R>(&self, key: &Q, hit: &impl Fn(&V) -> R) -> Result<R, u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        self.read_with(key, hash, true, hit).ok_or(hash)
    }

    /// [`entry`](Self::entry) by borrowed key (moka's shape). The entry API works on an owned
    /// key, so this makes one (`key.to_owned()`) when called; every verb of [`EntryRef`] is
    /// then available.
    ///
    /// ```
    /// let cache: herdcache::Cache<String, u32> = herdcache::Cache::new(10);
    /// let e = cache.entry_by_ref("n").or_insert(1);
    /// assert!(e.is_fresh());
    /// assert_eq!(cache.entry_by_ref("n").or_insert(2).into_value(), 1);
    /// ```
    pub fn entry_by_ref<Q>(&self, key: &Q) -> EntryRef<'_, K, V, S>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + ?Sized,
    {
        self.entry(key.to_owned())
    }
}
