//! Round 103: an outside check (a helper, public API only) of moka 0.12.14's public API, item
//! by item, against herdcache's "Coming from moka" guide (README.md): 10 findings the guide
//! did not cover. Fixed: `Expiry` for `Arc`/`Box<dyn Expiry + Send + Sync>` (F5),
//! `CacheBuilder::segments` (F6), `CacheBuilder::default()` (F7); the others documented in the
//! guide (F1 `entry_by_ref`'s key clone on a hit, F2 `build_with_hasher`'s `Clone` bounds, F3
//! no `Equivalent`, F4 the builder's third type parameter, F8 no
//! `and_try_compute_if_nobody_else`, F9 the type names, F10 the deprecated `SegmentedCache`
//! calls). Each test is one finding: moka-style code the guide says ports (or was
//! silent about). Snippets that do not compile on herdcache are quoted in comments with the
//! compiler's error code; the test body then exercises the closest herdcache form.
//!
//! (The parity that holds is asserted too, in `parity_that_holds`, so that a regression shows.)

use herdcache::{Cache, CacheBuilder, CompResult, Entry, Expiry, Op, RemovalCause};
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn assert_send<T: Send>(_: &T) {}
fn assert_send_sync_clone_static<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}

// ---------------------------------------------------------------------------------------------
// F1. `entry_by_ref(&q).or_insert*` clones the key on every call, hits included.
//
// moka's `RefKeyEntrySelector::{or_insert, or_insert_with, or_default, or_optionally_insert_with,
// or_try_insert_with, or_insert_with_if}` call `ToOwned::to_owned` only when the key is absent
// (that is the point of `entry_by_ref`: "If the key does not exist in the cache, the key will be
// cloned"). herdcache's `entry_by_ref` is `self.entry(key.to_owned())`: one key allocation per
// call. The guide lists `entry_by_ref` as "the same", and the README's API table promises "their
// `_by_ref` forms (no key clone on a hit)". Behaviour (cost) difference, observable with a
// counting `ToOwned`.
// ---------------------------------------------------------------------------------------------

static OWNED_MADE: AtomicUsize = AtomicUsize::new(0);

#[derive(Hash, PartialEq, Eq, Debug)]
#[repr(transparent)]
struct KeyRef(str);

#[derive(PartialEq, Eq, Debug)]
struct Key(String);

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (**self).borrow().hash(h)
    }
}
impl std::ops::Deref for Key {
    type Target = KeyRef;
    fn deref(&self) -> &KeyRef {
        KeyRef::new(&self.0)
    }
}
impl KeyRef {
    fn new(s: &str) -> &KeyRef {
        // SAFETY: `KeyRef` is `#[repr(transparent)]` over `str`.
        unsafe { &*(s as *const str as *const KeyRef) }
    }
}
impl Clone for Key {
    fn clone(&self) -> Self {
        OWNED_MADE.fetch_add(1, Ordering::SeqCst);
        Key(self.0.clone())
    }
}
impl Borrow<KeyRef> for Key {
    fn borrow(&self) -> &KeyRef {
        KeyRef::new(&self.0)
    }
}
impl ToOwned for KeyRef {
    type Owned = Key;
    fn to_owned(&self) -> Key {
        OWNED_MADE.fetch_add(1, Ordering::SeqCst);
        Key(self.0.to_owned())
    }
}

#[test]
fn f1_entry_by_ref_clones_the_key_on_a_hit() {
    let cache: Cache<Key, u32> = Cache::new(100);
    let k = KeyRef::new("user:1");
    // moka: the first call makes one owned key (a miss) ...
    let e = cache.entry_by_ref(k).or_insert_with(|| 1);
    assert!(e.is_fresh());
    drop(e);
    let before = OWNED_MADE.load(Ordering::SeqCst);
    // ... and a hit makes none (moka's `get_or_insert_with_hash_by_ref_and_fun` reads by `&Q`).
    let e = cache.entry_by_ref(k).or_insert_with(|| unreachable!());
    assert!(!e.is_fresh());
    drop(e);
    let on_hit = OWNED_MADE.load(Ordering::SeqCst) - before;
    // The loads' by-ref form keeps the promise (no key made on a hit):
    let before = OWNED_MADE.load(Ordering::SeqCst);
    assert_eq!(cache.get_with_by_ref(k, || unreachable!()), 1);
    assert_eq!(OWNED_MADE.load(Ordering::SeqCst) - before, 0);
    // FINDING: the entry's by-ref form does not. moka: 0 here. (The returned `Entry` holds an
    // owned `K`, so a hit would need one `K` clone anyway unless `Entry` held `Arc<K>` as moka's
    // does; today it is `to_owned()` on every call, before the lookup.)
    assert!(
        on_hit >= 1,
        "entry_by_ref on a hit made {on_hit} owned keys (moka makes 0)"
    );
}

// ---------------------------------------------------------------------------------------------
// F2. `build_with_hasher` requires `K: Clone` (moka's does not; `build` here does not either).
//
// The guide: "`.build_with_hasher(h)` — the same", and "Loads need K: Clone ... insert, get and
// the other plain calls do not". moka code with a non-Clone key:
//
//     let c: Cache<NoClone, u32, RandomState> =
//         Cache::builder().max_capacity(10).build_with_hasher(RandomState::new());
//     // herdcache: error[E0277]: the trait bound `NoClone: Clone` is not satisfied
//     //   (build_with_hasher/hasher sit in the `impl` block with `K: Clone, V: Clone`,
//     //    src/builder.rs:832)
// ---------------------------------------------------------------------------------------------

#[derive(Hash, PartialEq, Eq, Debug)]
struct NoClone(u32);

#[test]
fn f2_build_with_hasher_needs_a_clone_key() {
    // Plain `build()` accepts the non-Clone key (as moka) ...
    let c: Cache<NoClone, u32> = Cache::builder().max_capacity(10).build();
    c.insert(NoClone(1), 1);
    assert_eq!(c.get(&NoClone(1)), Some(1));
    // ... the closest form with a custom hasher: wrap the key in an `Arc` (the guide's advice
    // for loads), since `build_with_hasher` needs `K: Clone`.
    let c: Cache<Arc<NoClone>, u32, std::collections::hash_map::RandomState> = Cache::builder()
        .max_capacity(10)
        .build_with_hasher(std::collections::hash_map::RandomState::new());
    c.insert(Arc::new(NoClone(1)), 1);
    assert_eq!(c.get(&NoClone(1)), Some(1));
}

// ---------------------------------------------------------------------------------------------
// F3. Lookups take `K: Borrow<Q>`, not moka's `Q: Equivalent<K>`; `moka::Equivalent` (re-exported
// since 0.12.11) has no counterpart.
//
// moka 0.12.11+ `get`, `contains_key`, `invalidate`, `remove`, `get_with_by_ref`, `entry_by_ref`
// all bound `Q: Equivalent<K> + Hash + ?Sized`. Code that looks up a composite key without
// building it:
//
//     use moka::Equivalent;                         // herdcache: error[E0432] unresolved import
//     #[derive(Hash, PartialEq, Eq)] struct Pair { a: String, b: String }
//     #[derive(Hash)] struct PairRef<'a> { a: &'a str, b: &'a str }
//     impl Equivalent<Pair> for PairRef<'_> {
//         fn equivalent(&self, k: &Pair) -> bool { self.a == k.a && self.b == k.b }
//     }
//     cache.get(&PairRef { a: "x", b: "y" });
//     // herdcache: error[E0277]: the trait bound `Pair: Borrow<PairRef<'_>>` is not satisfied
//     // (and a `Borrow` impl cannot be written: it must return a reference into `Pair`)
//
// Closest herdcache form: build the owned key to look it up (an allocation per lookup).
// ---------------------------------------------------------------------------------------------

#[derive(Hash, PartialEq, Eq, Clone, Debug)]
struct Pair {
    a: String,
    b: String,
}

#[test]
fn f3_no_equivalent_lookups() {
    let cache: Cache<Pair, u32> = Cache::new(10);
    cache.insert(
        Pair {
            a: "x".into(),
            b: "y".into(),
        },
        7,
    );
    let probe = Pair {
        a: "x".to_string(),
        b: "y".to_string(),
    };
    assert_eq!(cache.get(&probe), Some(7));
    assert!(cache.contains_key(&probe));
}

// ---------------------------------------------------------------------------------------------
// F4. `CacheBuilder`'s third type parameter is the hasher, not moka's cache type.
//
// moka: `CacheBuilder<K, V, C>` with `C = Cache<K, V, RandomState>` (or `SegmentedCache<..>`).
// Code that names the builder in a helper's signature:
//
//     fn users_builder() -> CacheBuilder<u32, String, Cache<u32, String>> {
//         Cache::builder().max_capacity(10_000)
//     }
//     // herdcache: error[E0308]: mismatched types
//     //   (expected `CacheBuilder<u32, String, Cache<u32, String>>`,
//     //    found `CacheBuilder<u32, String, DefaultHashBuilder>`)
//
// The guide says `Cache::builder()` / `CacheBuilder::new(n)` are "the same".
// Closest herdcache form: `CacheBuilder<u32, String>` (the default hasher).
// ---------------------------------------------------------------------------------------------

#[test]
fn f4_builder_type_parameter_is_the_hasher() {
    fn users_builder() -> CacheBuilder<u32, String> {
        Cache::builder().max_capacity(10_000)
    }
    let c = users_builder().build();
    c.insert(1, "a".into());
    assert_eq!(c.get(&1).as_deref(), Some("a"));
}

// ---------------------------------------------------------------------------------------------
// F5 (fixed). `Expiry` for `Arc<dyn Expiry<K, V> + Send + Sync>` / `Box<dyn ..>` (moka 0.12.12:
// `impl<K, V, T> Expiry<K, V> for T where T: Deref<Target = dyn Expiry<K, V> + Send + Sync>`)
// was missing (E0277); herdcache now has the same blanket impl.
// ---------------------------------------------------------------------------------------------

struct Fixed(Duration);
impl Expiry<u32, u32> for Fixed {
    fn expire_after_create(&self, _: &u32, _: &u32) -> Option<Duration> {
        Some(self.0)
    }
}

#[test]
fn f5_expiry_behind_a_dyn_pointer() {
    let clock = herdcache::ManualClock::new();
    let e: Arc<dyn Expiry<u32, u32> + Send + Sync> = Arc::new(Fixed(Duration::from_secs(1)));
    let boxed: Box<dyn Expiry<u32, u32> + Send + Sync> = Box::new(Fixed(Duration::from_secs(3)));
    let c: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(Arc::clone(&e))
        .clock(clock.clone())
        .build();
    let d: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .expire_after(boxed)
        .clock(clock.clone())
        .build();
    c.insert(1, 1);
    d.insert(1, 1);
    assert_eq!((c.get(&1), d.get(&1)), (Some(1), Some(1)));
    clock.advance(Duration::from_secs(2));
    assert_eq!((c.get(&1), d.get(&1)), (None, Some(1)));
    clock.advance(Duration::from_secs(2));
    assert_eq!(d.get(&1), None);
    // The trait's defaults reach through the pointer too.
    assert_eq!(
        e.expire_after_read(&1, &1, Some(Duration::from_secs(9))),
        Some(Duration::from_secs(9))
    );
}

// ---------------------------------------------------------------------------------------------
// F6 (fixed). `CacheBuilder::segments(n)` (moka's sync builder → `SegmentedCache`) was missing
// (E0599); it is now `shards(n)` under moka's name.
// ---------------------------------------------------------------------------------------------

#[test]
fn f6_builder_segments_is_shards() {
    let c: Cache<u32, u32> = Cache::builder().max_capacity(10_000).segments(8).build();
    assert_eq!(c.policy().num_segments(), 8);
    let c: Cache<u32, u32> = Cache::builder().max_capacity(10_000).segments(5).build();
    assert_eq!(
        c.policy().num_segments(),
        8,
        "rounded up to a power of two, as moka does"
    );
}

// ---------------------------------------------------------------------------------------------
// F7 (fixed). `CacheBuilder::default()` was missing (E0599; moka: an unbounded builder, used by
// `#[derive(Default)]` structs holding one). herdcache's is the builder with nothing set: it
// still needs `max_capacity` (documented), `try_build` says `NoCapacity`.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Holder {
    builder: CacheBuilder<u32, u32>,
}

#[test]
fn f7_builder_default() {
    let b: CacheBuilder<u32, u32> = CacheBuilder::default();
    assert!(matches!(
        b.try_build(),
        Err(herdcache::BuildError::NoCapacity)
    ));
    let h = Holder::default();
    let c = h.builder.max_capacity(5).build();
    c.insert(1, 1);
    assert_eq!((c.get(&1), c.policy().max_capacity()), (Some(1), Some(5)));
}

// ---------------------------------------------------------------------------------------------
// F8. `future` entry selectors' `and_try_compute_if_nobody_else` (moka 0.12.10+) is missing.
//
//     cache.entry(k).and_try_compute_if_nobody_else(|e| async move { .. Ok(Op::Put(v)) }).await
//     // herdcache: error[E0599]: no method named `and_try_compute_if_nobody_else`
//     //   found for struct `EntryRef`
//
// Closest herdcache form: `and_try_compute_with_async` (waits for a concurrent computation
// instead of skipping it).
// ---------------------------------------------------------------------------------------------

#[test]
fn f8_try_compute_if_nobody_else_is_missing() {
    let c: Cache<u32, u32> = Cache::new(10);
    let r = futures::executor::block_on(
        c.entry(1)
            .and_try_compute_with_async(|_| async { Ok::<_, std::io::Error>(Op::Put(5)) }),
    )
    .unwrap();
    assert!(matches!(r, CompResult::Inserted(ref e) if *e.value() == 5));
}

// ---------------------------------------------------------------------------------------------
// F9. Types that moka code names but herdcache does not export (the guide maps the methods, not
// the types): `moka::PredicateError`, `moka::sync::PredicateId`, `moka::sync::Iter<'_, K, V>`
// (herdcache's `Iter` has a fourth parameter, the hasher), `moka::sync::OwnedKeyEntrySelector` /
// `RefKeyEntrySelector` (herdcache: `EntryRef`, one type for both).
//
//     fn purge(c: &Cache<u32, u32>) -> Result<(), moka::PredicateError> { .. }
//     // herdcache: error[E0425]: cannot find type `PredicateError` in crate `herdcache`
//     impl From<moka::PredicateError> for MyError { .. }      // same
//     fn entries(c: &Cache<u32, u32>) -> moka::sync::Iter<'_, u32, u32> { c.iter() }
//     // herdcache: error[E0107]: struct takes 3 generic arguments but 2 generic arguments
//     //   were supplied
//     fn sel(c: &Cache<u32, u32>) -> OwnedKeyEntrySelector<'_, u32, u32, RandomState> { .. }
//     // herdcache: error[E0425]: cannot find type `OwnedKeyEntrySelector`
// ---------------------------------------------------------------------------------------------

#[test]
fn f9_named_types() {
    fn purge(c: &Cache<u32, u32>) -> Result<(), std::convert::Infallible> {
        c.invalidate_entries_if(|_, v| *v > 1)
    }
    fn entries(
        c: &Cache<u32, u32>,
    ) -> herdcache::Iter<'_, u32, u32, herdcache::DefaultHashBuilder> {
        c.iter()
    }
    fn sel(
        c: &Cache<u32, u32>,
    ) -> herdcache::EntryRef<'_, u32, u32, herdcache::DefaultHashBuilder> {
        c.entry(3)
    }
    let c: Cache<u32, u32> = Cache::new(10);
    c.insert(1, 1);
    c.insert(2, 2);
    purge(&c).unwrap();
    assert_eq!(entries(&c).count(), 1);
    assert!(sel(&c).or_insert(3).is_fresh());
}

// ---------------------------------------------------------------------------------------------
// F10. SegmentedCache's deprecated `get_or_insert_with` / `get_or_try_insert_with` (deprecated
// since moka 0.8, still public in 0.12): no alias.
//
//     #[allow(deprecated)] cache.get_or_insert_with(k, || v);
//     // herdcache: error[E0599]: no method named `get_or_insert_with`
// ---------------------------------------------------------------------------------------------

#[test]
fn f10_deprecated_segmented_aliases() {
    let c: Cache<u32, u32> = Cache::builder().max_capacity(10).shards(2).build();
    assert_eq!(c.get_with(1, || 1), 1);
    assert_eq!(c.try_get_with(2, || Ok::<_, std::io::Error>(2)).unwrap(), 2);
}

// ---------------------------------------------------------------------------------------------
// Parity that holds (no finding): the shapes a moka user relies on most, as moka code would use
// them. Also asserts that the async loads' and entry calls' futures are `Send` (tokio::spawn /
// axum handlers), which moka's are.
// ---------------------------------------------------------------------------------------------

#[test]
fn parity_that_holds() {
    assert_send_sync_clone_static::<Cache<u64, String>>();
    assert_send_sync_clone_static::<Cache<NoClone, Vec<u8>>>(); // no Debug bound on K/V

    let cache: Cache<u64, String> = Cache::new(10);
    // Send futures.
    let f = cache.get_with_async(1, async { "a".to_string() });
    assert_send(&f);
    drop(f);
    let f = cache
        .entry(1)
        .and_compute_with_async(|_| async { Op::Put("a".to_string()) });
    assert_send(&f);
    drop(f);
    let sc: Cache<String, String> = Cache::new(10);
    let f = sc.get_with_by_ref_async("k", async { "a".to_string() });
    assert_send(&f);
    drop(f);
    let f = sc
        .entry_by_ref("k")
        .or_try_insert_with_async(async { Ok::<_, std::io::Error>("a".to_string()) });
    assert_send(&f);
    drop(f);

    // Entry flags as moka sets them (sync/value_initializer.rs: Put on present → fresh+replaced;
    // Put on absent → fresh; Remove/Nop → neither).
    let c: Cache<u32, u32> = Cache::new(10);
    let e = c.entry(1).and_compute_with(|_| Op::Put(1)).unwrap();
    assert!(e.is_fresh() && !e.is_old_value_replaced());
    let e = c.entry(1).and_compute_with(|_| Op::Put(2)).unwrap();
    assert!(e.is_fresh() && e.is_old_value_replaced());
    let e = c.entry(1).and_compute_with(|_| Op::Nop).unwrap();
    assert!(!e.is_fresh() && !e.is_old_value_replaced());
    let e = c
        .entry(1)
        .and_upsert_with(|e| e.map_or(0, |e| e.into_value() + 1));
    assert!(e.is_fresh() && e.is_old_value_replaced() && *e.value() == 3);
    let r = c.entry(1).and_compute_with(|_| Op::Remove);
    assert!(matches!(r, CompResult::Removed(ref e) if !e.is_fresh() && *e.key() == 1));
    assert!(matches!(
        c.entry(1).and_compute_with(|_| Op::Remove),
        CompResult::StillNone(1)
    ));
    let e: Entry<u32, u32> = c.entry(9).or_default();
    assert!(format!("{e:?}").starts_with("Entry"));

    // get / contains_key / remove / invalidate by borrowed key, `?Sized`.
    let s: Cache<String, u32> = Cache::new(10);
    s.insert("a".into(), 1);
    assert_eq!(s.get("a"), Some(1));
    assert!(s.contains_key("a"));
    let () = s.invalidate("a");
    s.insert("b".into(), 2);
    let v: Option<u32> = s.remove("b");
    assert_eq!(v, Some(2));
    s.invalidate_all();
    s.run_pending_tasks();
    assert_eq!((s.entry_count(), s.weighted_size()), (0, 0));
    s.insert("c".into(), 3);
    assert_eq!((s.entry_count(), s.weighted_size()), (1, 1)); // weight 1 without a weigher

    // Builder calls as moka writes them, listener mapped per the guide.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    type Rs = std::collections::hash_map::RandomState;
    let c: Cache<u32, String, Rs> = Cache::builder()
        .name("users")
        .max_capacity(100)
        .initial_capacity(10)
        .time_to_live(Duration::from_secs(60))
        .time_to_idle(Duration::from_secs(30))
        .weigher(|_k: &u32, v: &String| v.len() as u32)
        .eviction_policy(herdcache::EvictionPolicy::lru())
        .support_invalidation_closures()
        .eviction_listener(move |k: &u32, _v: &String, cause| {
            seen2.lock().unwrap().push((*k, cause))
        })
        .build_with_hasher(std::collections::hash_map::RandomState::new());
    c.insert(1, "abc".into());
    c.insert(1, "d".into());
    assert_eq!(*seen.lock().unwrap(), vec![(1, RemovalCause::Replaced)]);
    assert!(RemovalCause::Size.was_evicted() && !RemovalCause::Replaced.was_evicted());
    let p = c.policy();
    assert_eq!(
        (
            p.max_capacity(),
            p.time_to_live(),
            p.time_to_idle(),
            p.num_segments()
        ),
        (
            Some(100),
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(30)),
            1
        )
    );
    let _ = format!("{c:?}");
    // Iteration: `(K, V)` (the guide documents moka's `(Arc<K>, V)`).
    let n = (&c).into_iter().filter(|(_, v)| !v.is_empty()).count();
    assert_eq!(n, 1);
    // PredicateError-less invalidate_entries_if: `?` into a boxed error still works.
    fn purge(c: &Cache<u32, String, Rs>) -> Result<(), Box<dyn std::error::Error>> {
        c.invalidate_entries_if(|_k, v| v.is_empty())?;
        Ok(())
    }
    purge(&c).unwrap();
}
