//! Attack sweep: every call that stores a value is exactly one write, of the right kind.
//!
//! For each storing entry point, three starting states of key 1 (absent; present and live,
//! written 3 s before the call; present but expired, not yet reclaimed) and two modes: Plain,
//! and Window (another `insert(1, 7)` runs from the key's `Clone`, which the cache calls
//! between its lock-free lookup and its store). Checked, from one ordered log of user
//! callbacks (Expiry create/update, weigher, listener):
//! (a) each stored value is one `expire_after_create` (key held nothing live) or one
//!     `expire_after_update` (key held a live value; `remaining` = the old deadline's rest);
//! (b) each stored value weighed exactly once;
//! (c) each displaced value reported exactly once (Replaced; the expired one: Expired), no
//!     report of a value never stored, none of the value that stays;
//! (d) the new deadline counts from the write (Expiry: create 10 s / update 20 s; and TTL,
//!     TTI in their own columns);
//! (e) `replaced`/`expired` counters match the listener; a loading call's miss is one load
//!     success or one coalesced;
//! (f) with exact LRU the written key is the most recently used.
//!
//! `matrix_*` print the tables (`-- --nocapture`) and assert; targeted tests follow.
#![cfg(not(any(loom, shuttle)))]
#![allow(clippy::mutable_key_type, clippy::type_complexity)]
mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, CacheBuilder, CompResult, DefaultHashBuilder, EvictionPolicy};
use herdcache::{Expiry, ManualClock, Op, RemovalCause};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

type C = Cache<Key, u64>;
type B = CacheBuilder<Key, u64, DefaultHashBuilder>;
type Action = Box<dyn FnOnce(&C, &ManualClock) + Send>;

// ---------------------------------------------------------------- the hooked key (as attack_reads)

pub struct Hook {
    cache: OnceLock<C>,
    clock: ManualClock,
    action: Mutex<Option<Action>>,
    fired: AtomicBool,
    eqs: AtomicU64,
    /// Clones after the lookup still to let pass before firing (Window(n): n - 1).
    skip: AtomicU64,
}

/// A key whose first `Clone` after a lookup of key 1 (an `Eq` against its hash twin) runs
/// the hook's action.
pub struct Key(u64, Arc<Hook>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "K{}", self.0)
    }
}
impl Clone for Key {
    fn clone(&self) -> Self {
        let a = if self.1.eqs.load(Ordering::SeqCst) > 0
            && self.1.action.lock().unwrap().is_some()
            && self
                .1
                .skip
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            self.1.action.lock().unwrap().take()
        } else {
            None
        };
        if let Some(a) = a {
            self.1.fired.store(true, Ordering::SeqCst);
            a(self.1.cache.get().expect("cache set"), &self.1.clock);
        }
        Key(self.0, Arc::clone(&self.1))
    }
}
impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        if (self.0, o.0) == (1, TWIN) || (self.0, o.0) == (TWIN, 1) {
            self.1.eqs.fetch_add(1, Ordering::SeqCst);
        }
        self.0 == o.0
    }
}
impl Eq for Key {}
impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.0 % 100).hash(h) // 1 and TWIN collide
    }
}
const TWIN: u64 = 101;

fn key(h: &Arc<Hook>, n: u64) -> Key {
    Key(n, Arc::clone(h))
}
fn same(k: &Key) -> Key {
    Key(k.0, Arc::clone(&k.1))
}
fn bo<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

// ---------------------------------------------------------------- the log of user callbacks

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Create(u64),
    Update(u64, Option<Duration>),
    Weigh(u64),
    Removed(u64, RemovalCause),
}

#[derive(Default)]
struct Rec {
    log: Mutex<Vec<Ev>>,
    /// The weigher panics on this value (0: never).
    panic_on: AtomicU64,
    /// The listener panics when told of 5.
    listener_panics: AtomicBool,
}
impl Rec {
    fn push(&self, e: Ev) {
        self.log.lock().unwrap().push(e);
    }
    fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// A value the Expiry gives no time at all (expired when written).
const DOA: u64 = 4242;
/// A value heavier than the capacity (1000).
const HEAVY: u64 = 5555;
const CREATE: Duration = Duration::from_secs(10);
const UPDATE: Duration = Duration::from_secs(20);

struct Exp(Arc<Rec>);
impl Expiry<Key, u64> for Exp {
    fn expire_after_create(&self, k: &Key, v: &u64) -> Option<Duration> {
        if k.0 == 1 {
            self.0.push(Ev::Create(*v));
        }
        if k.0 == TWIN {
            return None; // the twin never expires: counters then concern key 1 alone
        }
        if *v == DOA {
            return Some(Duration::ZERO);
        }
        Some(CREATE)
    }
    fn expire_after_update(&self, k: &Key, v: &u64, rem: Option<Duration>) -> Option<Duration> {
        if k.0 == 1 {
            self.0.push(Ev::Update(*v, rem));
        }
        if *v == DOA {
            return Some(Duration::ZERO);
        }
        Some(UPDATE)
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Pre {
    Absent,
    /// 5, written at t0, the call at t0 + 3 s (7 s left).
    Live,
    /// 5, written at t0, the call at t0 + 11 s (expired 1 s ago, not reclaimed).
    Expired,
}
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Plain,
    Window,
    /// The hook fires at the n-th key clone after the lookup (n >= 2).
    WindowN(u64),
    /// The hook invalidates key 1 (instead of inserting 7) at the n-th clone.
    WindowInv(u64),
}

/// Every hook made, kept reachable to the end of the process: a hook holds its cache and the
/// cache's keys hold the hook (a cycle the tests need), which LeakSanitizer would report.
static HOOKS: std::sync::Mutex<Vec<std::sync::Arc<Hook>>> = std::sync::Mutex::new(Vec::new());

struct Env {
    c: C,
    h: Arc<Hook>,
    rec: Arc<Rec>,
}

/// `expiry`: the counting `Expiry` (create 10 s, update 20 s).
fn env(cfg: fn(B) -> B, extra: impl FnOnce(B) -> B, expiry: bool) -> Env {
    let h = Arc::new(Hook {
        cache: OnceLock::new(),
        clock: ManualClock::new(),
        action: Mutex::new(None),
        fired: AtomicBool::new(false),
        eqs: AtomicU64::new(0),
        skip: AtomicU64::new(0),
    });
    let rec = Arc::new(Rec::default());
    let (r1, r2) = (Arc::clone(&rec), Arc::clone(&rec));
    let mut b: B = Cache::builder()
        .max_capacity(1000)
        .clock(h.clock.clone())
        .record_stats()
        .weigher(move |k: &Key, v: &u64| {
            if k.0 == 1 {
                r1.push(Ev::Weigh(*v));
                let p = r1.panic_on.load(Ordering::SeqCst);
                if p != 0 && *v >= p && *v != DOA && *v != HEAVY {
                    panic!("injected weigher panic");
                }
            }
            if *v == HEAVY {
                return 5000;
            }
            1
        })
        .eviction_listener(move |k: &Key, v: &u64, cause| {
            if k.0 == 1 {
                r2.push(Ev::Removed(*v, cause));
                if *v == 5 && r2.listener_panics.load(Ordering::SeqCst) {
                    panic!("injected listener panic");
                }
            }
        });
    if expiry {
        b = b.expire_after(Exp(Arc::clone(&rec)));
    }
    let c = cfg(extra(b)).build();
    assert!(h.cache.set(c.clone()).is_ok());
    HOOKS.lock().unwrap().push(Arc::clone(&h));
    c.insert(key(&h, TWIN), 0);
    Env { c, h, rec }
}

// ---------------------------------------------------------------- entry points

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// Stores only when the key holds no live value (the get_with family, load, get_all).
    Loader,
    /// Stores whatever the key holds (insert, upsert, compute Put, get_with_if replacing).
    Writer,
    /// Stores nothing (optionally_ → None, compute Nop/Remove, try_compute Err).
    NoStore,
}

struct Ep {
    name: &'static str,
    cfg: fn(B) -> B,
    call: fn(&C, Key) -> Option<u64>,
    kind: Kind,
    /// Removes a live value (Op::Remove).
    removes: bool,
}

fn none(b: B) -> B {
    b
}
fn loader(b: B) -> B {
    b.loader(|_: &Key| Ok::<_, BoxError>(99))
}
fn aloader(b: B) -> B {
    b.async_loader(|_: &Key| async { Ok::<_, BoxError>(99) })
}
/// Upserts store `seen + 100` (100 when absent): the stored value shows what `f` saw.
fn up(e: Option<herdcache::Entry<Key, u64>>) -> u64 {
    e.map_or(100, |e| *e.value() + 100)
}
fn cr(r: CompResult<Key, u64>) -> Option<u64> {
    match r {
        CompResult::Inserted(e) | CompResult::ReplacedWith(e) => Some(*e.value()),
        CompResult::Removed(_) | CompResult::Unchanged(_) | CompResult::StillNone(_) => None,
    }
}

fn eps() -> Vec<Ep> {
    use Kind::*;
    macro_rules! ep {
        ($name:expr, $cfg:expr, $kind:expr, |$c:ident, $k:ident| $body:expr) => {
            ep!($name, $cfg, $kind, false, |$c, $k| $body)
        };
        ($name:expr, $cfg:expr, $kind:expr, $rm:expr, |$c:ident, $k:ident| $body:expr) => {
            Ep {
                name: $name,
                cfg: $cfg,
                call: |$c: &C, $k: Key| -> Option<u64> { $body },
                kind: $kind,
                removes: $rm,
            }
        };
    }
    vec![
        ep!("insert", none, Writer, |c, k| {
            c.insert(k, 99);
            Some(99)
        }),
        ep!("get_with", none, Loader, |c, k| Some(c.get_with(k, || 99))),
        ep!("try_get_with", none, Loader, |c, k| c
            .try_get_with(k, || Ok::<_, String>(99))
            .ok()),
        ep!("optionally_get_with", none, Loader, |c, k| c
            .optionally_get_with(k, || Some(99))),
        ep!("optionally_get_with(None)", none, NoStore, |c, k| c
            .optionally_get_with(k, || None)),
        ep!("get_with_by_ref", none, Loader, |c, k| Some(
            c.get_with_by_ref(&k, || 99)
        )),
        ep!("try_get_with_by_ref", none, Loader, |c, k| c
            .try_get_with_by_ref(&k, || Ok::<_, String>(99))
            .ok()),
        ep!("optionally_get_with_by_ref", none, Loader, |c, k| c
            .optionally_get_with_by_ref(&k, || Some(99))),
        ep!("get_with_if(replace)", none, Writer, |c, k| Some(
            c.get_with_if(k, || 99, |_| true)
        )),
        ep!("entry.or_insert_with", none, Loader, |c, k| Some(
            *c.entry(k).or_insert_with(|| 99).value()
        )),
        ep!("entry.or_insert", none, Loader, |c, k| Some(
            *c.entry(k).or_insert(99).value()
        )),
        ep!("entry.or_optionally_insert_with", none, Loader, |c, k| c
            .entry(k)
            .or_optionally_insert_with(|| Some(99))
            .map(|e| *e.value())),
        ep!("entry.or_try_insert_with", none, Loader, |c, k| c
            .entry(k)
            .or_try_insert_with(|| Ok::<_, String>(99))
            .ok()
            .map(|e| *e.value())),
        ep!("entry.or_insert_with_if(replace)", none, Writer, |c, k| {
            Some(*c.entry(k).or_insert_with_if(|| 99, |_| true).value())
        }),
        ep!("entry_by_ref.or_insert_with", none, Loader, |c, k| Some(
            *c.entry_by_ref(&k).or_insert_with(|| 99).value()
        )),
        ep!("entry.and_upsert_with", none, Writer, |c, k| Some(
            *c.entry(k).and_upsert_with(up).value()
        )),
        ep!("entry_by_ref.and_upsert_with", none, Writer, |c, k| Some(
            *c.entry_by_ref(&k).and_upsert_with(up).value()
        )),
        ep!("entry.and_compute_with(Put)", none, Writer, |c, k| cr(c
            .entry(k)
            .and_compute_with(|e| Op::Put(up(e))))),
        ep!(
            "entry.and_compute_with(Remove)",
            none,
            NoStore,
            true,
            |c, k| cr(c.entry(k).and_compute_with(|_| Op::Remove))
        ),
        ep!("entry.and_compute_with(Nop)", none, NoStore, |c, k| cr(c
            .entry(k)
            .and_compute_with(|_| Op::Nop))),
        ep!("entry.and_try_compute_with(Put)", none, Writer, |c, k| c
            .entry(k)
            .and_try_compute_with(|e| Ok::<_, String>(Op::Put(up(e))))
            .ok()
            .and_then(cr)),
        ep!("entry.and_try_compute_with(Err)", none, NoStore, |c, k| c
            .entry(k)
            .and_try_compute_with(|_| Err::<Op<u64>, _>("no".to_string()))
            .ok()
            .and_then(cr)),
        ep!("get_all", none, Loader, |c, k| {
            let probe = same(&k);
            let m = c.get_all([k], |ks| ks.iter().map(|k| (same(k), 99)).collect());
            m.get(&probe).copied()
        }),
        ep!("load", loader, Loader, |c, k| c.load(k).ok()),
        ep!("load_with_timeout(5s)", loader, Loader, |c, k| c
            .load_with_timeout(k, Some(Duration::from_secs(5)))
            .ok()),
        // async twins
        ep!("get_with_async", none, Loader, |c, k| Some(bo(
            c.get_with_async(k, async { 99 })
        ))),
        ep!("try_get_with_async", none, Loader, |c, k| bo(
            c.try_get_with_async(k, async { Ok::<_, String>(99) })
        )
        .ok()),
        ep!("optionally_get_with_async(None)", none, NoStore, |c, k| bo(
            c.optionally_get_with_async(k, async { None })
        )),
        ep!("get_with_async_shared", none, Loader, |c, k| Some(bo(
            c.get_with_async_shared(k, async { 99 })
        ))),
        ep!("get_with_by_ref_async", none, Loader, |c, k| Some(bo(
            c.get_with_by_ref_async(&k, async { 99 })
        ))),
        ep!("get_with_if_async(replace)", none, Writer, |c, k| Some(bo(
            c.get_with_if_async(k, async { 99 }, |_| true)
        ))),
        ep!("entry.or_insert_async", none, Loader, |c, k| Some(
            *bo(c.entry(k).or_insert_async(99)).value()
        )),
        ep!(
            "entry.or_insert_with_if_async(replace)",
            none,
            Writer,
            |c, k| Some(*bo(c.entry(k).or_insert_with_if_async(async { 99 }, |_| true)).value())
        ),
        ep!("entry.and_upsert_with_async", none, Writer, |c, k| Some(
            *bo(c.entry(k).and_upsert_with_async(|e| async move { up(e) })).value()
        )),
        ep!(
            "entry.and_compute_with_async(Put)",
            none,
            Writer,
            |c, k| cr(bo(c
                .entry(k)
                .and_compute_with_async(|e| async move { Op::Put(up(e)) })))
        ),
        ep!(
            "entry.and_try_compute_with_async(Put)",
            none,
            Writer,
            |c, k| bo(c
                .entry(k)
                .and_try_compute_with_async(|e| async move { Ok::<_, String>(Op::Put(up(e))) }))
            .ok()
            .and_then(cr)
        ),
        ep!("load_async", aloader, Loader, |c, k| bo(c.load_async(k))
            .ok()),
    ]
}

// ---------------------------------------------------------------- running one cell

/// Sets `pre` up, runs the call (Window: with the hook armed to `insert(1, 7)`), on its own
/// thread with a deadline. Err: the cell does not apply / hung.
fn run(ep: &Ep, e: &Env, pre: Pre, mode: Mode) -> Result<Option<u64>, String> {
    if pre != Pre::Absent {
        e.c.insert(key(&e.h, 1), 5);
    }
    e.h.clock.advance(match pre {
        Pre::Absent | Pre::Live => Duration::from_secs(3),
        Pre::Expired => Duration::from_secs(11),
    });
    e.rec.take();
    if mode != Mode::Plain {
        let hh = Arc::clone(&e.h);
        let inv = matches!(mode, Mode::WindowInv(_));
        *e.h.action.lock().unwrap() = Some(Box::new(move |c: &C, _: &ManualClock| {
            if inv {
                c.invalidate(&key(&hh, 1))
            } else {
                c.insert(key(&hh, 1), 7)
            }
        }));
        if let Mode::WindowN(n) | Mode::WindowInv(n) = mode {
            e.h.skip.store(n - 1, Ordering::SeqCst);
        }
    }
    e.h.eqs.store(0, Ordering::SeqCst);
    let (c, k, call) = (e.c.clone(), key(&e.h, 1), ep.call);
    let r = match common::within(Duration::from_secs(10), move || call(&c, k)) {
        None => return Err("HANG (call did not return in 10 s)".into()),
        Some(Err(p)) => return Err(format!("PANIC {}", common::panic_message(&*p))),
        Some(Ok(r)) => r,
    };
    if mode != Mode::Plain && !e.h.fired.load(Ordering::SeqCst) {
        e.h.action.lock().unwrap().take();
        return Err("n/a (no key clone after the lookup)".into());
    }
    Ok(r)
}

/// The value key 1 holds now, without reading it (`iter` is no access).
fn held(c: &C) -> Option<u64> {
    c.iter().find(|(k, _)| k.0 == 1).map(|(_, v)| v)
}

/// (a)(b)(c)(d)(e) from the log.
fn core(ep: &Ep, pre: Pre, mode: Mode) -> Result<Vec<String>, String> {
    let e = env(ep.cfg, |b| b, true);
    let s0 = e.c.stats();
    let ret = run(ep, &e, pre, mode)?;
    let fin = held(&e.c);
    e.c.run_pending_tasks();
    let log = e.rec.take();
    let d = e.c.stats() - s0;
    note(format!(
        "{} {mode:?}/{pre:?}: ret {ret:?} fin {fin:?} log {log:?}",
        ep.name
    ));
    let mut bad = Vec::new();
    let pre_v = (pre != Pre::Absent).then_some(5u64);

    // (a) writes in order; each exactly one create or update of the right kind.
    let mut live = pre == Pre::Live;
    let mut left = Duration::from_secs(7); // what the live value has left
    let mut stored = Vec::new();
    for ev in &log {
        match ev {
            Ev::Create(v) => {
                if live {
                    bad.push(format!("(a) create of {v} over a live value"));
                }
                stored.push(*v);
                live = true;
                left = CREATE;
            }
            Ev::Removed(_, RemovalCause::Explicit) => live = false,
            Ev::Update(v, rem) => {
                if !live {
                    bad.push(format!(
                        "(a) update of {v} over no live value (rem {rem:?})"
                    ));
                } else if *rem != Some(left) {
                    bad.push(format!(
                        "(a) update of {v}: remaining {rem:?}, want {left:?}"
                    ));
                }
                stored.push(*v);
                live = true;
                left = UPDATE;
            }
            _ => {}
        }
    }
    let mut uniq = stored.clone();
    uniq.sort();
    uniq.dedup();
    if uniq.len() != stored.len() {
        bad.push(format!("(a) a value written twice: {stored:?}"));
    }
    if pre == Pre::Expired && stored.contains(&105) {
        bad.push("(a) f saw the expired value 5".into());
    }
    if let Some(f) = fin {
        if !stored.contains(&f) && Some(f) != pre_v.filter(|_| pre == Pre::Live) {
            bad.push(format!("(a) holds {f}, which no create/update saw"));
        }
    }
    // What must have been stored.
    let win = mode != Mode::Plain;
    match (ep.kind, pre) {
        (Kind::Writer, _) | (Kind::Loader, Pre::Absent | Pre::Expired) => {
            let want_self = !(win && ep.kind == Kind::Loader); // a loader may coalesce on 7
            if want_self && !win && stored.len() != 1 {
                bad.push(format!("(a) want one write, got {stored:?}"));
            }
            let _ = want_self;
        }
        (Kind::Loader, Pre::Live) | (Kind::NoStore, _) => {
            let extra: Vec<_> = stored.iter().filter(|v| **v != 7).collect();
            if !extra.is_empty() {
                bad.push(format!("(a) stored {extra:?}, want nothing from the call"));
            }
        }
    }
    let inv = matches!(mode, Mode::WindowInv(_));
    if win && !inv && !stored.contains(&7) {
        bad.push(format!(
            "(a) the window's insert(1, 7) not seen by Expiry: {stored:?}"
        ));
    }
    // Final value: replay the log (stores, explicit removals in the order they happened).
    let mut cur = pre_v.filter(|_| pre == Pre::Live);
    for ev in &log {
        match ev {
            Ev::Create(v) | Ev::Update(v, _) => cur = Some(*v),
            Ev::Removed(v, RemovalCause::Explicit) if cur == Some(*v) => cur = None,
            _ => {}
        }
    }
    let want_fin = cur;
    if fin != want_fin {
        bad.push(format!(
            "final {fin:?}, want {want_fin:?} (writes {stored:?}, returned {ret:?})"
        ));
    }

    // (b) each stored value weighed once.
    for v in &stored {
        let n = log.iter().filter(|e| **e == Ev::Weigh(*v)).count();
        if n != 1 {
            bad.push(format!("(b) {v} weighed {n} times"));
        }
    }
    let unstored: Vec<u64> = log
        .iter()
        .filter_map(|e| match e {
            Ev::Weigh(v) if !stored.contains(v) => Some(*v),
            _ => None,
        })
        .collect();
    if !unstored.is_empty() {
        // Not a failure: the weigher runs before the lock (documented), so a value that then
        // loses to a concurrent write was weighed. Reported as a note.
        note(format!(
            "{} {mode:?}/{pre:?}: weighed, never stored: {unstored:?}",
            ep.name
        ));
    }

    // (c) listener: each displaced value once, right cause; nothing else.
    let mut owed: Vec<u64> = pre_v.into_iter().chain(stored.iter().copied()).collect();
    owed.retain(|v| Some(*v) != fin);
    let removed: Vec<(u64, RemovalCause)> = log
        .iter()
        .filter_map(|e| match e {
            Ev::Removed(v, c) => Some((*v, *c)),
            _ => None,
        })
        .collect();
    for v in &owed {
        let hits: Vec<_> = removed.iter().filter(|(x, _)| x == v).collect();
        let want = if pre == Pre::Expired && *v == 5 {
            vec![RemovalCause::Expired]
        } else if ep.removes || inv {
            vec![RemovalCause::Replaced, RemovalCause::Explicit]
        } else {
            vec![RemovalCause::Replaced]
        };
        if hits.len() != 1 || !want.contains(&hits[0].1) {
            bad.push(format!(
                "(c) {v} reported {hits:?}, want once as one of {want:?}"
            ));
        }
    }
    for (v, cause) in &removed {
        if !owed.contains(v) {
            bad.push(format!("(c) {v} reported ({cause:?}) but not displaced"));
        }
    }

    // (e) counters.
    let n_rep = removed
        .iter()
        .filter(|r| r.1 == RemovalCause::Replaced)
        .count() as u64;
    let n_exp = removed
        .iter()
        .filter(|r| r.1 == RemovalCause::Expired)
        .count() as u64;
    if d.replaced.count != n_rep || d.expired.count != n_exp {
        bad.push(format!(
            "(e) stats replaced={} expired={}, listener {n_rep}/{n_exp}",
            d.replaced.count, d.expired.count
        ));
    }
    let loading = (ep.kind == Kind::Loader || ep.name.contains("optionally_get_with"))
        && pre != Pre::Live
        || ep.name.contains("_if");
    if loading {
        let took = d.load_successes + d.load_failures + d.coalesced + d.negative_hits;
        let ok = if win {
            took == 1
        } else {
            took == 1 && d.coalesced == 0
        };
        if !ok || d.misses != 1 {
            bad.push(format!(
                "(e) misses={} successes={} failures={} coalesced={}",
                d.misses, d.load_successes, d.load_failures, d.coalesced
            ));
        }
    }

    // (d) deadline of what it holds, from the call's time.
    if let Some(f) = fin {
        let last_update = log.iter().rev().find_map(|e| match e {
            Ev::Create(v) if *v == f => Some(CREATE),
            Ev::Update(v, _) if *v == f => Some(UPDATE),
            _ => None,
        });
        if let Some(ttl) = last_update {
            e.h.clock.advance(ttl - Duration::from_secs(1));
            let a = e.c.contains_key(&key(&e.h, 1));
            e.h.clock.advance(Duration::from_secs(2));
            let b = e.c.contains_key(&key(&e.h, 1));
            if !a || b {
                bad.push(format!(
                    "(d) {f}: alive at -1 s {a}, at +1 s {b} (want {ttl:?})"
                ));
            }
        }
    }
    Ok(bad)
}

/// (d) with a time to live (`ttl`) or a time to idle: the stored value lives 10 s from the call.
fn ttl_tti(ep: &Ep, pre: Pre, mode: Mode, idle: bool) -> Result<Vec<String>, String> {
    let e = env(
        ep.cfg,
        |b| {
            if idle {
                b.time_to_idle(CREATE)
            } else {
                b.time_to_live(CREATE)
            }
        },
        false,
    );
    let _ = run(ep, &e, pre, mode)?;
    let fin = held(&e.c);
    let wrote = match fin {
        Some(5) => false,
        Some(_) => true,
        None => return Ok(vec![]),
    };
    let mut bad = Vec::new();
    // The call ran at 3 s (Live); 5 was written at 0.
    let (alive_until, label) = if wrote {
        (CREATE, "written")
    } else if idle {
        (CREATE, "read")
    } else {
        (Duration::from_secs(7), "kept")
    };
    e.h.clock.advance(alive_until - Duration::from_secs(1));
    let a = e.c.contains_key(&key(&e.h, 1));
    e.h.clock.advance(Duration::from_secs(2));
    let b = e.c.contains_key(&key(&e.h, 1));
    if !a || b {
        bad.push(format!(
            "(d) {label} {fin:?}: alive 1 s before {alive_until:?} from the call: {a}, 1 s after: {b}"
        ));
    }
    Ok(bad)
}

/// (f) exact LRU, one shard, capacity 4: after the call key 1 is the most recent.
fn lru(ep: &Ep, pre: Pre, mode: Mode) -> Result<Vec<String>, String> {
    if pre == Pre::Expired {
        return Err("n/a".into());
    }
    let e = env(
        ep.cfg,
        |b| {
            b.max_capacity(4)
                .shards(1)
                .eviction_policy(EvictionPolicy::lru())
        },
        false,
    );
    // twin is oldest; then (1), 2, 3.
    if pre == Pre::Live {
        e.c.insert(key(&e.h, 1), 5);
    }
    e.c.insert(key(&e.h, 2), 2);
    e.c.insert(key(&e.h, 3), 3);
    // `run` inserts 5 again for Live: still a write, makes 1 newest; so re-touch the others.
    let r = run(ep, &e, Pre::Absent, mode);
    let _ = pre;
    r?;
    let before = held(&e.c);
    if before.is_none() {
        return Ok(vec![]); // nothing stored (NoStore)
    }
    for n in 4..=6 {
        e.c.insert(key(&e.h, n), n);
    }
    let one = e.c.contains_key(&key(&e.h, 1));
    Ok(if one {
        vec![]
    } else {
        vec!["(f) key 1 evicted by 3 newer inserts: not most recent".into()]
    })
}

fn lru_live(ep: &Ep, mode: Mode) -> Result<Vec<String>, String> {
    // key 1 written first (oldest but the twin), then 2, 3; the call must make it newest.
    let e = env(
        ep.cfg,
        |b| {
            b.max_capacity(4)
                .shards(1)
                .eviction_policy(EvictionPolicy::lru())
        },
        false,
    );
    let (c, h) = (e.c.clone(), Arc::clone(&e.h));
    c.insert(key(&h, 1), 5);
    c.insert(key(&h, 2), 2);
    c.insert(key(&h, 3), 3);
    if mode == Mode::Window {
        let hh = Arc::clone(&h);
        *h.action.lock().unwrap() = Some(Box::new(move |c: &C, _: &ManualClock| {
            c.insert(key(&hh, 1), 7)
        }));
    }
    h.eqs.store(0, Ordering::SeqCst);
    let (c2, k, call) = (c.clone(), key(&h, 1), ep.call);
    match common::within(Duration::from_secs(10), move || call(&c2, k)) {
        None => return Err("HANG".into()),
        Some(Err(p)) => return Err(format!("PANIC {}", common::panic_message(&*p))),
        Some(Ok(_)) => {}
    }
    if mode == Mode::Window && !h.fired.load(Ordering::SeqCst) {
        return Err("n/a".into());
    }
    if held(&c).is_none() {
        return Ok(vec![]);
    }
    for n in 4..=6 {
        c.insert(key(&h, n), n);
    }
    Ok(if c.contains_key(&key(&h, 1)) {
        vec![]
    } else {
        vec!["(f) live key 1 written/read by the call then evicted by 3 newer inserts".into()]
    })
}

// ---------------------------------------------------------------- the matrices

fn note(s: String) {
    if std::env::var("ATTACK_VERBOSE").is_ok() {
        eprintln!("note: {s}");
    }
}

fn mark(r: &Result<Vec<String>, String>) -> &'static str {
    match r {
        Ok(v) if v.is_empty() => "ok",
        Ok(_) => "FAIL",
        Err(e) if e.starts_with("n/a") => "n/a",
        Err(_) => "FAIL",
    }
}

fn sweep(
    ep: &Ep,
    f: &dyn Fn(&Ep, Pre, Mode) -> Result<Vec<String>, String>,
) -> (String, Vec<String>) {
    let mut row = format!("{:42}", ep.name);
    let mut fails = Vec::new();
    for mode in [Mode::Plain, Mode::Window] {
        for pre in [Pre::Absent, Pre::Live, Pre::Expired] {
            let r = f(ep, pre, mode);
            row += &format!(" {:4}", mark(&r));
            match r {
                Ok(v) => {
                    for m in v {
                        fails.push(format!("{} {mode:?}/{pre:?}: {m}", ep.name));
                    }
                }
                Err(e) if !e.starts_with("n/a") => {
                    fails.push(format!("{} {mode:?}/{pre:?}: {e}", ep.name))
                }
                Err(_) => {}
            }
        }
        row += " |";
    }
    (row, fails)
}

fn matrix(what: &str, f: &dyn Fn(&Ep, Pre, Mode) -> Result<Vec<String>, String>) -> Vec<String> {
    common::quiet_injected_panics();
    eprintln!(
        "== {what}\n{:42} plain: abs  live exp  | window: abs live exp",
        "entry point"
    );
    let mut all = Vec::new();
    for ep in eps() {
        let (row, fails) = sweep(&ep, f);
        eprintln!("{row}");
        all.extend(fails);
    }
    for f in &all {
        eprintln!("FAIL {f}");
    }
    all
}

#[test]
fn matrix_a_b_c_e() {
    let _w = watchdog(Duration::from_secs(300), "attack_writes matrix_a_b_c_e");
    let fails = matrix("(a)(b)(c)(d: Expiry)(e)", &core);
    assert!(fails.is_empty(), "{} failures: {fails:#?}", fails.len());
}

/// The same checks with the concurrent insert at the 2nd, 3rd, 4th key clone after the lookup.
#[test]
fn matrix_later_windows() {
    let _w = watchdog(
        Duration::from_secs(300),
        "attack_writes matrix_later_windows",
    );
    common::quiet_injected_panics();
    let mut all = Vec::new();
    eprintln!("== later windows: clone #2 #3 #4 (abs live exp each)");
    for ep in eps() {
        let mut row = format!("{:42}", ep.name);
        for n in 2..=4 {
            for pre in [Pre::Absent, Pre::Live, Pre::Expired] {
                let r = core(&ep, pre, Mode::WindowN(n));
                row += &format!(" {:4}", mark(&r));
                match r {
                    Ok(v) => all.extend(
                        v.into_iter()
                            .map(|m| format!("{} #{n}/{pre:?}: {m}", ep.name)),
                    ),
                    Err(e) if !e.starts_with("n/a") => {
                        all.push(format!("{} #{n}/{pre:?}: {e}", ep.name))
                    }
                    Err(_) => {}
                }
            }
            row += " |";
        }
        eprintln!("{row}");
    }
    for f in &all {
        eprintln!("FAIL {f}");
    }
    assert!(all.is_empty(), "{} failures: {all:#?}", all.len());
}

/// A concurrent `invalidate(1)` at the 1st-3rd key clone after the lookup.
#[test]
fn matrix_invalidate_windows() {
    let _w = watchdog(
        Duration::from_secs(300),
        "attack_writes matrix_invalidate_windows",
    );
    let mut all = Vec::new();
    eprintln!("== invalidate windows: clone #1 #2 #3 (abs live exp each)");
    for ep in eps() {
        let mut row = format!("{:42}", ep.name);
        for n in 1..=3 {
            for pre in [Pre::Absent, Pre::Live, Pre::Expired] {
                let r = core(&ep, pre, Mode::WindowInv(n));
                row += &format!(" {:4}", mark(&r));
                match r {
                    Ok(v) => all.extend(
                        v.into_iter()
                            .map(|m| format!("{} inv#{n}/{pre:?}: {m}", ep.name)),
                    ),
                    Err(e) if !e.starts_with("n/a") => {
                        all.push(format!("{} inv#{n}/{pre:?}: {e}", ep.name))
                    }
                    Err(_) => {}
                }
            }
            row += " |";
        }
        eprintln!("{row}");
    }
    for f in &all {
        eprintln!("FAIL {f}");
    }
    assert!(all.is_empty(), "{} failures: {all:#?}", all.len());
}

#[test]
fn matrix_d_ttl() {
    let _w = watchdog(Duration::from_secs(300), "attack_writes matrix_d_ttl");
    let fails = matrix("(d) time_to_live", &|ep, p, m| ttl_tti(ep, p, m, false));
    assert!(fails.is_empty(), "{} failures: {fails:#?}", fails.len());
}

#[test]
fn matrix_d_tti() {
    let _w = watchdog(Duration::from_secs(300), "attack_writes matrix_d_tti");
    let fails = matrix("(d) time_to_idle", &|ep, p, m| ttl_tti(ep, p, m, true));
    assert!(fails.is_empty(), "{} failures: {fails:#?}", fails.len());
}

#[test]
fn matrix_f_lru() {
    let _w = watchdog(Duration::from_secs(300), "attack_writes matrix_f_lru");
    let fails = matrix(
        "(f) lru (abs: absent; live: present)",
        &|ep, p, m| match p {
            Pre::Absent => lru(ep, p, m),
            Pre::Live => lru_live(ep, m),
            Pre::Expired => Err("n/a".into()),
        },
    );
    assert!(fails.is_empty(), "{} failures: {fails:#?}", fails.len());
}

// ---------------------------------------------------------------- (b) a panicking weigher

/// The weigher panics on the call's value (99, 100, 105): nothing half-stored.
fn weigh_panic(ep: &Ep, pre: Pre, mode: Mode) -> Result<Vec<String>, String> {
    if mode == Mode::Window {
        return Err("n/a".into());
    }
    let e = env(ep.cfg, |b| b, true);
    e.rec.panic_on.store(99, Ordering::SeqCst);
    let r = run(ep, &e, pre, mode);
    e.rec.panic_on.store(0, Ordering::SeqCst);
    let mut bad = Vec::new();
    match &r {
        Err(m) if m.starts_with("PANIC") && !m.contains("injected") => {
            bad.push(format!("other panic: {m}"))
        }
        Err(m) if m.starts_with("HANG") => return Err(m.clone()),
        _ => {}
    }
    e.c.run_pending_tasks();
    e.c.validate();
    let log = e.rec.take();
    let n = e.c.iter().count() as u64;
    if e.c.entry_count() != n || e.c.weighted_size() != n {
        bad.push(format!(
            "entry_count {} weighted_size {} but {n} entries",
            e.c.entry_count(),
            e.c.weighted_size()
        ));
    }
    let fin = held(&e.c);
    note(format!(
        "{} {pre:?} weigher panic: {r:?} holds {fin:?} log {log:?}",
        ep.name
    ));
    for ev in &log {
        match ev {
            Ev::Create(v) | Ev::Update(v, _) if *v >= 99 => {
                bad.push(format!("Expiry saw unstored {v}: {ev:?}"))
            }
            Ev::Removed(v, _) if *v >= 99 => bad.push(format!("listener heard unstored {v}")),
            _ => {}
        }
    }
    let rm5 = log
        .iter()
        .filter(|e| matches!(e, Ev::Removed(5, _)))
        .count();
    match (pre, fin) {
        (Pre::Live, Some(5)) if rm5 == 0 => {}
        (Pre::Live, None) if rm5 == 1 => {}
        (Pre::Absent, None) => {}
        (Pre::Expired, None) if rm5 <= 1 => {}
        _ => bad.push(format!(
            "after: holds {fin:?}, 5 reported {rm5}x; log {log:?}"
        )),
    }
    // The key is not left loading.
    let (c, k) = (e.c.clone(), key(&e.h, 1));
    match common::within(Duration::from_secs(5), move || c.get_with(k, || 8)) {
        None => bad.push("key stuck: get_with hung after the panic".into()),
        Some(Err(p)) => bad.push(format!("get_with after: {}", common::panic_message(&*p))),
        Some(Ok(_)) => {}
    }
    Ok(bad)
}

#[test]
fn matrix_b_weigher_panics() {
    let _w = watchdog(
        Duration::from_secs(300),
        "attack_writes matrix_b_weigher_panics",
    );
    let fails = matrix("(b) weigher panics on the call's value", &weigh_panic);
    assert!(fails.is_empty(), "{} failures: {fails:#?}", fails.len());
}

// ---------------------------------------------------------------- (c) turned away / dead on arrival

/// Stores `v` through `how` over `pre`; returns the log and what key 1 holds.
fn store_special(pre: Pre, v: u64, how: fn(&C, Key, u64)) -> (Vec<Ev>, Option<u64>, Env) {
    let e = env(none, |b| b, true);
    if pre != Pre::Absent {
        e.c.insert(key(&e.h, 1), 5);
    }
    e.h.clock
        .advance(Duration::from_secs(if pre == Pre::Expired {
            11
        } else {
            3
        }));
    e.rec.take();
    how(&e.c, key(&e.h, 1), v);
    e.c.run_pending_tasks();
    let fin = held(&e.c);
    (e.rec.take(), fin, e)
}

const HOWS: &[(&str, fn(&C, Key, u64))] = &[
    ("insert", |c, k, v| c.insert(k, v)),
    ("get_with", |c, k, v| {
        c.get_with(k, || v);
    }),
    ("get_with_if(replace)", |c, k, v| {
        c.get_with_if(k, || v, |_| true);
    }),
    ("and_upsert_with", |c, k, v| {
        c.entry(k).and_upsert_with(|_| v);
    }),
    ("and_compute_with(Put)", |c, k, v| {
        c.entry(k).and_compute_with(|_| Op::Put(v));
    }),
    ("get_with_async", |c, k, v| {
        bo(c.get_with_async(k, async move { v }));
    }),
    ("and_compute_with_async(Put)", |c, k, v| {
        bo(c.entry(k)
            .and_compute_with_async(|_| async move { Op::Put(v) }));
    }),
];

/// Documented (listener docs): a value "too heavy, or already expired, to be stored" is
/// reported once (Size / Expired); the value it displaced once (Replaced / Expired).
#[test]
fn turned_away_and_dead_on_arrival_reported_once() {
    let _w = watchdog(Duration::from_secs(60), "turned_away");
    let mut bad = Vec::new();
    for (name, how) in HOWS {
        for pre in [Pre::Absent, Pre::Live, Pre::Expired] {
            for (v, cause) in [(HEAVY, RemovalCause::Size), (DOA, RemovalCause::Expired)] {
                if (*name == "get_with" || *name == "get_with_async") && pre == Pre::Live {
                    continue;
                }
                let (log, fin, e) = store_special(pre, v, *how);
                let mine: Vec<_> = log
                    .iter()
                    .filter(|x| matches!(x, Ev::Removed(w, _) if *w == v))
                    .collect();
                let five: Vec<_> = log
                    .iter()
                    .filter(|x| matches!(x, Ev::Removed(5, _)))
                    .collect();
                let want5 = match pre {
                    Pre::Absent => vec![],
                    Pre::Live => vec![RemovalCause::Replaced],
                    Pre::Expired => vec![RemovalCause::Expired],
                };
                let got5: Vec<_> = five
                    .iter()
                    .map(|x| match x {
                        Ev::Removed(_, c) => *c,
                        _ => unreachable!(),
                    })
                    .collect();
                note(format!("{name} {pre:?} v={v}: holds {fin:?} log {log:?}"));
                let ok = fin.is_none()
                    && mine.len() == 1
                    && matches!(mine[0], Ev::Removed(_, c) if *c == cause)
                    && got5 == want5
                    && e.c.entry_count() == 1
                    && e.c.weighted_size() == 1;
                if !ok {
                    bad.push(format!(
                        "{name} {pre:?} v={v}: holds {fin:?}, entries {} weight {}, log {log:?}",
                        e.c.entry_count(),
                        e.c.weighted_size()
                    ));
                }
            }
        }
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

// ---------------------------------------------------------------- a write wins over a load

/// `insert` or `invalidate` of the key while `init` runs: the loaded value is returned, never
/// stored, never weighed into the cache, never reported; the Expiry sees only the write.
#[test]
fn write_during_init_wins() {
    let _w = watchdog(Duration::from_secs(60), "write_during_init_wins");
    type Do = fn(&C, Key, &dyn Fn(&C)) -> Option<u64>;
    let calls: &[(&str, Do)] = &[
        ("get_with", |c, k, w| {
            Some(c.get_with(k, || {
                w(c);
                99
            }))
        }),
        ("try_get_with", |c, k, w| {
            c.try_get_with(k, || {
                w(c);
                Ok::<_, String>(99)
            })
            .ok()
        }),
        ("optionally_get_with", |c, k, w| {
            c.optionally_get_with(k, || {
                w(c);
                Some(99)
            })
        }),
        ("get_with_by_ref", |c, k, w| {
            Some(c.get_with_by_ref(&k, || {
                w(c);
                99
            }))
        }),
        ("get_with_if(replace)", |c, k, w| {
            Some(c.get_with_if(
                k,
                || {
                    w(c);
                    99
                },
                |_| true,
            ))
        }),
        ("or_insert_with", |c, k, w| {
            Some(
                *c.entry(k)
                    .or_insert_with(|| {
                        w(c);
                        99
                    })
                    .value(),
            )
        }),
        ("and_upsert_with", |c, k, w| {
            Some(
                *c.entry(k)
                    .and_upsert_with(|_| {
                        w(c);
                        99
                    })
                    .value(),
            )
        }),
        ("and_compute_with(Put)", |c, k, w| {
            cr(c.entry(k).and_compute_with(|_| {
                w(c);
                Op::Put(99)
            }))
        }),
        ("and_try_compute_with(Put)", |c, k, w| {
            c.entry(k)
                .and_try_compute_with(|_| {
                    w(c);
                    Ok::<_, String>(Op::Put(99))
                })
                .ok()
                .and_then(cr)
        }),
        ("get_all", |c, k, w| {
            let p = same(&k);
            c.get_all([k], |ks| {
                w(c);
                ks.iter().map(|k| (same(k), 99)).collect()
            })
            .get(&p)
            .copied()
        }),
        ("get_with_async", |c, k, w| {
            Some(bo(c.get_with_async(k, async {
                w(c);
                99
            })))
        }),
        ("get_with_async_shared", |c, k, w| {
            // 'static future: do the write before, from a clone.
            let c2 = c.clone();
            let w2: &dyn Fn(&C) = w;
            w2(&c2);
            Some(bo(c.get_with_async_shared(k, async { 99 })))
        }),
        ("and_compute_with_async(Put)", |c, k, w| {
            cr(bo(c.entry(k).and_compute_with_async(|_| {
                w(c);
                async { Op::Put(99) }
            })))
        }),
    ];
    let mut bad = Vec::new();
    for (name, call) in calls {
        if *name == "get_with_async_shared" {
            continue; // the write cannot run inside a 'static future here
        }
        for pre in [Pre::Absent, Pre::Live, Pre::Expired] {
            for inv in [false, true] {
                let loads_only_on_miss =
                    !name.contains("_if") && !name.contains("compute") && !name.contains("upsert");
                if pre == Pre::Live && loads_only_on_miss {
                    continue;
                }
                let e = env(none, |b| b, true);
                if pre != Pre::Absent {
                    e.c.insert(key(&e.h, 1), 5);
                }
                e.h.clock
                    .advance(Duration::from_secs(if pre == Pre::Expired {
                        11
                    } else {
                        3
                    }));
                e.rec.take();
                let s0 = e.c.stats();
                let h = Arc::clone(&e.h);
                let w = move |c: &C| {
                    if inv {
                        c.invalidate(&key(&h, 1))
                    } else {
                        c.insert(key(&h, 1), 7)
                    }
                };
                let ret = call(&e.c, key(&e.h, 1), &w);
                e.c.run_pending_tasks();
                let fin = held(&e.c);
                let log = e.rec.take();
                let d = e.c.stats() - s0;
                let want_fin = if inv { None } else { Some(7) };
                let want5: Option<RemovalCause> = match pre {
                    Pre::Absent => None,
                    Pre::Expired => Some(RemovalCause::Expired),
                    Pre::Live if inv => Some(RemovalCause::Explicit),
                    Pre::Live => Some(RemovalCause::Replaced),
                };
                let got5: Vec<_> = log
                    .iter()
                    .filter_map(|x| match x {
                        Ev::Removed(5, c) => Some(*c),
                        _ => None,
                    })
                    .collect();
                let touched99 = log
                    .iter()
                    .any(|x| matches!(x, Ev::Create(99) | Ev::Update(99, _) | Ev::Removed(99, _)));
                let w7: Vec<_> = log
                    .iter()
                    .filter(|x| matches!(x, Ev::Create(7) | Ev::Update(7, _)))
                    .cloned()
                    .collect();
                let want7 = match (inv, pre) {
                    (true, _) => vec![],
                    (false, Pre::Live) => vec![Ev::Update(7, Some(Duration::from_secs(7)))],
                    (false, _) => vec![Ev::Create(7)],
                };
                let weighed99 = log.contains(&Ev::Weigh(99));
                note(format!(
                    "{name} {pre:?} inv={inv}: ret {ret:?} holds {fin:?} log {log:?}"
                ));
                let ok = fin == want_fin
                    && got5 == want5.into_iter().collect::<Vec<_>>()
                    && !touched99
                    && w7 == want7;
                if weighed99 {
                    note(format!("{name} {pre:?} inv={inv}: weighed 99 (not stored)"));
                }
                if !ok {
                    bad.push(format!(
                        "{name} {pre:?} {}: returned {ret:?}, holds {fin:?} (want {want_fin:?}); log {log:?}; stats replaced={} explicit={} expired={}",
                        if inv { "invalidate" } else { "insert(7)" },
                        d.replaced.count, d.explicit.count, d.expired.count
                    ));
                }
            }
        }
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{} failures: {bad:#?}", bad.len());
}

// ---------------------------------------------------------------- refresh-ahead, driven by hand

type Jobs = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

/// A cache with `refresh_after(5 s)`, a loader whose behaviour `mode` picks (0: 99; 1: insert
/// 7 first; 2: invalidate first; 3: fail), and a spawner that parks jobs in `jobs`.
fn refresh_env(lru: bool, expiry: bool) -> (Env, Jobs, Arc<AtomicU64>) {
    let jobs: Jobs = Arc::new(Mutex::new(Vec::new()));
    let mode = Arc::new(AtomicU64::new(0));
    let cell: Arc<OnceLock<C>> = Arc::new(OnceLock::new());
    let (j2, m2, c2) = (Arc::clone(&jobs), Arc::clone(&mode), Arc::clone(&cell));
    let e = env(
        none,
        move |b| {
            let b = b
                .refresh_after(Duration::from_secs(5))
                .refresh_backoff(Duration::from_secs(1))
                .loader(move |k: &Key| {
                    let c = c2.get().expect("cache");
                    match m2.load(Ordering::SeqCst) {
                        1 => c.insert(same(k), 7),
                        2 => c.invalidate(k),
                        3 => return Err(BoxError::from("down")),
                        4 => return Ok(HEAVY),
                        5 => return Ok(DOA),
                        _ => {}
                    }
                    Ok::<_, BoxError>(99)
                })
                .spawner(move |job| j2.lock().unwrap().push(job));
            let b = if expiry { b } else { b.time_to_live(CREATE) };
            if lru {
                b.max_capacity(4)
                    .shards(1)
                    .eviction_policy(EvictionPolicy::lru())
            } else {
                b
            }
        },
        expiry,
    );
    assert!(cell.set(e.c.clone()).is_ok());
    (e, jobs, mode)
}

fn run_jobs(jobs: &Jobs) -> usize {
    let js: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let n = js.len();
    for j in js {
        j();
    }
    n
}

#[test]
fn refresh_is_one_update() {
    let _w = watchdog(Duration::from_secs(60), "refresh_is_one_update");
    let mut bad = Vec::new();
    for mode in 0..=2u64 {
        let (e, jobs, m) = refresh_env(false, true);
        m.store(mode, Ordering::SeqCst);
        e.c.insert(key(&e.h, 1), 5);
        e.h.clock.advance(Duration::from_secs(6));
        let s0 = e.c.stats();
        assert_eq!(e.c.get(&key(&e.h, 1)), Some(5));
        e.rec.take();
        let n = run_jobs(&jobs);
        e.c.run_pending_tasks();
        let log = e.rec.take();
        let fin = held(&e.c);
        let d = e.c.stats() - s0;
        note(format!(
            "refresh mode {mode}: jobs {n} holds {fin:?} log {log:?} succ {} fail {}",
            d.refreshes_succeeded, d.refreshes_failed
        ));
        let (want_fin, want_log): (Option<u64>, Vec<Ev>) = match mode {
            0 => (
                Some(99),
                vec![
                    Ev::Weigh(99),
                    Ev::Update(99, Some(Duration::from_secs(4))),
                    Ev::Removed(5, RemovalCause::Replaced),
                ],
            ),
            1 => (
                Some(7),
                vec![
                    Ev::Weigh(7),
                    Ev::Update(7, Some(Duration::from_secs(4))),
                    Ev::Removed(5, RemovalCause::Replaced),
                ],
            ),
            _ => (None, vec![Ev::Removed(5, RemovalCause::Explicit)]),
        };
        let log_no99w: Vec<_> = log
            .iter()
            .filter(|x| !(mode != 0 && **x == Ev::Weigh(99)))
            .cloned()
            .collect();
        let (s, f) = (d.refreshes_succeeded, d.refreshes_failed);
        let stats_ok = if mode == 0 {
            s == 1 && f == 0 && d.replaced.count == 1
        } else {
            s == 0 && f == 1
        };
        if n != 1 || fin != want_fin || log_no99w != want_log || !stats_ok {
            bad.push(format!("mode {mode}: jobs {n} holds {fin:?} (want {want_fin:?}) log {log:?} (want {want_log:?}) refreshes ok/failed {s}/{f}"));
        }
        if mode == 0 {
            // (d) the new deadline: Expiry's update (20 s) from the refresh.
            e.h.clock.advance(Duration::from_secs(19));
            let a = e.c.contains_key(&key(&e.h, 1));
            e.h.clock.advance(Duration::from_secs(2));
            let b = e.c.contains_key(&key(&e.h, 1));
            if !a || b {
                bad.push(format!("(d) refreshed value alive at +19 s {a}, +21 s {b}"));
            }
        }
    }
    // (d) with a time to live: counts from the refresh.
    let (e, jobs, _) = refresh_env(false, false);
    e.c.insert(key(&e.h, 1), 5);
    e.h.clock.advance(Duration::from_secs(6));
    e.c.get(&key(&e.h, 1));
    run_jobs(&jobs);
    e.h.clock.advance(Duration::from_secs(9)); // t = 15 < 6 + 10
    let a = e.c.contains_key(&key(&e.h, 1));
    e.h.clock.advance(Duration::from_secs(2)); // t = 17
    let b = e.c.contains_key(&key(&e.h, 1));
    if !a || b {
        bad.push(format!(
            "(d) TTL after refresh at 6 s: alive at 15 s {a}, at 17 s {b}"
        ));
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A refresh job that runs only after its entry expired (spawner slow): whatever it does,
/// the expired value is reported once, as Expired, and a value it stores is a create.
#[test]
fn refresh_landing_after_expiry() {
    let _w = watchdog(Duration::from_secs(60), "refresh_landing_after_expiry");
    let (e, jobs, _) = refresh_env(false, true);
    e.c.insert(key(&e.h, 1), 5);
    e.h.clock.advance(Duration::from_secs(6));
    e.c.get(&key(&e.h, 1));
    e.h.clock.advance(Duration::from_secs(5)); // t = 11: expired
    e.rec.take();
    run_jobs(&jobs);
    e.c.run_pending_tasks();
    let log = e.rec.take();
    let fin = held(&e.c);
    eprintln!("refresh after expiry: holds {fin:?} log {log:?}");
    let rm5: Vec<_> = log
        .iter()
        .filter(|x| matches!(x, Ev::Removed(5, _)))
        .collect();
    assert_eq!(rm5, vec![&Ev::Removed(5, RemovalCause::Expired)], "{log:?}");
    assert!(
        !log.iter().any(|x| matches!(x, Ev::Update(..))),
        "an update of an expired entry: {log:?}"
    );
    if fin == Some(99) {
        assert!(log.contains(&Ev::Create(99)), "{log:?}");
    }
}

/// (b) a weigher panicking on a refresh's value: old value kept, no report, retried later.
#[test]
fn refresh_weigher_panic() {
    let _w = watchdog(Duration::from_secs(60), "refresh_weigher_panic");
    common::quiet_injected_panics();
    let (e, jobs, _) = refresh_env(false, true);
    e.c.insert(key(&e.h, 1), 5);
    e.h.clock.advance(Duration::from_secs(6));
    e.c.get(&key(&e.h, 1));
    e.rec.take();
    e.rec.panic_on.store(99, Ordering::SeqCst);
    let s0 = e.c.stats();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_jobs(&jobs)));
    e.rec.panic_on.store(0, Ordering::SeqCst);
    e.c.validate();
    let log = e.rec.take();
    let d = e.c.stats() - s0;
    eprintln!(
        "refresh weigher panic: job {:?} holds {:?} log {log:?} failed {}",
        r.is_ok(),
        held(&e.c),
        d.refreshes_failed
    );
    assert_eq!(held(&e.c), Some(5));
    assert_eq!(log, vec![Ev::Weigh(99)]);
    assert_eq!((e.c.entry_count(), e.c.weighted_size()), (2, 2));
    // Retried after the backoff (1 s).
    e.h.clock.advance(Duration::from_secs(2));
    assert_eq!(e.c.get(&key(&e.h, 1)), Some(5));
    assert_eq!(run_jobs(&jobs), 1, "refresh not retried after the backoff");
    assert_eq!(held(&e.c), Some(99));
}

/// (f) a refresh that replaces the value makes the key most recently used (moka: a refresh
/// is an insert; docs silent).
#[test]
fn refresh_lru() {
    let _w = watchdog(Duration::from_secs(60), "refresh_lru");
    let (e, jobs, _) = refresh_env(true, true);
    e.c.insert(key(&e.h, 1), 5);
    e.c.insert(key(&e.h, 2), 2);
    e.c.insert(key(&e.h, 3), 3);
    e.h.clock.advance(Duration::from_secs(6));
    e.c.get(&key(&e.h, 1)); // due: one job; 1 read (most recent now)
    e.c.get(&key(&e.h, 2));
    e.c.get(&key(&e.h, 3)); // 1 is now the oldest but the twin
    let js: Vec<_> = std::mem::take(&mut *jobs.lock().unwrap());
    let mut it = js.into_iter();
    (it.next().unwrap())(); // key 1's refresh
    drop(it); // the others dropped unrun (released)
    assert_eq!(held(&e.c), Some(99));
    for n in 4..=6 {
        e.c.insert(key(&e.h, n), n);
    }
    assert!(
        e.c.contains_key(&key(&e.h, 1)),
        "refreshed key 1 evicted: the refresh did not make it most recent"
    );
}

// ---------------------------------------------------------------- negative caching

#[test]
fn negative_entry_is_no_value() {
    let _w = watchdog(Duration::from_secs(60), "negative_entry_is_no_value");
    let mut bad = Vec::new();
    for then in ["insert", "get_with", "upsert", "expire"] {
        let e = env(none, |b| b.negative_ttl(Duration::from_secs(30)), true);
        let s0 = e.c.stats();
        assert_eq!(e.c.optionally_get_with(key(&e.h, 1), || None), None);
        assert_eq!(
            e.c.optionally_get_with(key(&e.h, 1), || Some(3)),
            None,
            "negative hit"
        );
        let d = e.c.stats() - s0;
        if d.negative_hits != 1 || d.load_failures != 1 {
            bad.push(format!(
                "negative: hits {} failures {}",
                d.negative_hits, d.load_failures
            ));
        }
        let count0 = e.c.entry_count();
        let k = key(&e.h, 1);
        match then {
            "insert" => e.c.insert(k, 99),
            "get_with" => {
                e.c.get_with(k, || 99);
            }
            "upsert" => {
                e.c.entry(k).and_upsert_with(up);
            }
            _ => {
                e.h.clock.advance(Duration::from_secs(31));
                e.c.run_pending_tasks();
            }
        }
        e.c.run_pending_tasks();
        let log = e.rec.take();
        let fin = held(&e.c);
        note(format!(
            "negative then {then}: holds {fin:?} log {log:?} count {count0}->{}",
            e.c.entry_count()
        ));
        let want = match then {
            "expire" => vec![],
            "upsert" => vec![Ev::Weigh(100), Ev::Create(100)],
            _ => vec![Ev::Weigh(99), Ev::Create(99)],
        };
        if log != want {
            bad.push(format!("negative then {then}: log {log:?}, want {want:?}"));
        }
        let n = e.c.iter().count() as u64;
        if e.c.entry_count() != n {
            bad.push(format!(
                "negative then {then}: entry_count {} but {n} entries",
                e.c.entry_count()
            ));
        }
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

// ---------------------------------------------------------------- fail-safe

/// A fail-safe cache: the stale value answers failed loads; it is reported once, as Expired,
/// whatever ends it; the next stored value is a create.
#[test]
fn fail_safe_stale_value_reported_once() {
    let _w = watchdog(
        Duration::from_secs(60),
        "fail_safe_stale_value_reported_once",
    );
    let mut bad = Vec::new();
    for end in [
        "load ok",
        "insert",
        "invalidate",
        "max_stale",
        "optionally None",
        "upsert",
        "compute Remove",
    ] {
        let down = Arc::new(AtomicBool::new(false));
        let d2 = Arc::clone(&down);
        let e = env(
            none,
            move |b| {
                b.fail_safe(Duration::from_secs(600))
                    .refresh_backoff(Duration::from_secs(5))
                    .loader(move |_: &Key| {
                        if d2.load(Ordering::SeqCst) {
                            Err(BoxError::from("down"))
                        } else {
                            Ok(98)
                        }
                    })
            },
            true,
        );
        e.c.insert(key(&e.h, 1), 5);
        e.h.clock.advance(Duration::from_secs(11));
        down.store(true, Ordering::SeqCst);
        e.rec.take();
        let s0 = e.c.stats();
        let r = e.c.load(key(&e.h, 1)).ok();
        let r2 = e.c.get_with(key(&e.h, 1), || 99); // within backoff: the stale value
        let d = e.c.stats() - s0;
        let stale_log = e.rec.take();
        if r != Some(5) || r2 != 5 || !stale_log.is_empty() {
            bad.push(format!(
                "{end}: stale phase load {r:?} get_with {r2} log {stale_log:?}"
            ));
        }
        if d.stale_served_after_ttl != 2 {
            note(format!(
                "{end}: stale_served_after_ttl {} (2 calls)",
                d.stale_served_after_ttl
            ));
        }
        down.store(false, Ordering::SeqCst);
        e.h.clock.advance(Duration::from_secs(6)); // past the backoff
        let k = key(&e.h, 1);
        let want_fin = match end {
            "load ok" => {
                e.c.load(k).ok();
                Some(98)
            }
            "insert" => {
                e.c.insert(k, 99);
                Some(99)
            }
            "invalidate" => {
                e.c.invalidate(&k);
                None
            }
            "max_stale" => {
                e.h.clock.advance(Duration::from_secs(700));
                e.c.run_pending_tasks();
                None
            }
            "optionally None" => {
                e.c.optionally_get_with(k, || None);
                None
            }
            "upsert" => {
                e.c.entry(k).and_upsert_with(up);
                Some(100)
            }
            _ => {
                e.c.entry(k).and_compute_with(|_| Op::Remove);
                None
            }
        };
        e.c.run_pending_tasks();
        e.h.clock.advance(Duration::from_secs(2000));
        e.c.run_pending_tasks();
        let log = e.rec.take();
        let rm5: Vec<_> = log
            .iter()
            .filter(|x| matches!(x, Ev::Removed(5, _)))
            .cloned()
            .collect();
        let upd = log.iter().any(|x| matches!(x, Ev::Update(..)));
        let created: Vec<_> = log
            .iter()
            .filter_map(|x| match x {
                Ev::Create(v) => Some(*v),
                _ => None,
            })
            .collect();
        note(format!("fail-safe then {end}: log {log:?}"));
        if rm5 != vec![Ev::Removed(5, RemovalCause::Expired)]
            || upd
            || created != want_fin.into_iter().collect::<Vec<_>>()
        {
            bad.push(format!("fail-safe then {end}: log {log:?} (want 5 Expired once, create of {want_fin:?}, no update)"));
        }
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

// ---------------------------------------------------------------- threads: conservation

/// Two threads write four keys through every storing verb, with unique values. Afterwards
/// every value an Expiry hook saw stored is either what its key holds or was reported exactly
/// once; nothing else was reported; each stored value was weighed once.
#[test]
fn threads_conserve_values() {
    let _w = watchdog(Duration::from_secs(120), "threads_conserve_values");
    threads_conserve(1000, false);
}

/// The same, in a cache too small for the four keys (capacity 6, weights 1-6, with LRU or
/// the default policy): evictions and turn-aways for size join the count. (No value heavier
/// than the cache: such a write removes the old value, reported Replaced, with no Expiry
/// call for the new one, which would break the create/update count below.)
#[test]
fn threads_conserve_values_under_eviction() {
    let _w = watchdog(
        Duration::from_secs(240),
        "threads_conserve_values_under_eviction",
    );
    threads_conserve(6, false);
    threads_conserve(6, true);
}

fn threads_conserve(cap: u64, lru: bool) {
    type L = Arc<Mutex<Vec<(u64, u64, &'static str, bool)>>>;
    let log: L = Arc::new(Mutex::new(Vec::new()));
    struct E2(L);
    impl Expiry<u64, u64> for E2 {
        fn expire_after_create(&self, k: &u64, v: &u64) -> Option<Duration> {
            self.0.lock().unwrap().push((*k, *v, "store", true));
            None
        }
        fn expire_after_update(&self, k: &u64, v: &u64, _: Option<Duration>) -> Option<Duration> {
            self.0.lock().unwrap().push((*k, *v, "store", false));
            None
        }
    }
    let (l1, l2) = (Arc::clone(&log), Arc::clone(&log));
    let mut b = Cache::builder().max_capacity(cap).shards(1);
    if lru {
        b = b.eviction_policy(EvictionPolicy::lru());
    }
    let c: Cache<u64, u64> = b
        .expire_after(E2(Arc::clone(&log)))
        .weigher(move |k: &u64, v: &u64| {
            l1.lock().unwrap().push((*k, *v, "weigh", false));
            (*v % 7 + 1).min(cap) as u32 // never heavier than the cache (see below)
        })
        .eviction_listener(move |k: &u64, v: &u64, cause| {
            let what = match cause {
                RemovalCause::Replaced => "replaced",
                RemovalCause::Explicit => "explicit",
                RemovalCause::Expired => "expired",
                RemovalCause::Size => "size",
            };
            l2.lock().unwrap().push((*k, *v, what, false));
        })
        .build();
    let next = Arc::new(AtomicU64::new(1));
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (c, next) = (c.clone(), Arc::clone(&next));
            s.spawn(move || {
                let mut r = common::Rng(0x9e37 + t * 7919);
                for _ in 0..6_000 {
                    let k = r.next() % 4;
                    let v = next.fetch_add(1, Ordering::SeqCst);
                    match r.next() % 9 {
                        0 => c.insert(k, v),
                        1 => {
                            c.get_with(k, || v);
                        }
                        2 => {
                            c.entry(k).and_upsert_with(|_| v);
                        }
                        3 => {
                            c.entry(k).and_compute_with(|e| {
                                if e.is_some() && v % 2 == 0 {
                                    Op::Remove
                                } else {
                                    Op::Put(v)
                                }
                            });
                        }
                        4 => {
                            c.get_with_if(k, || v, |_| v % 3 == 0);
                        }
                        5 => c.invalidate(&k),
                        6 => {
                            bo(c.get_with_async(k, async move { v }));
                        }
                        7 => {
                            c.entry(k).or_insert(v);
                        }
                        _ => {
                            c.optionally_get_with(k, || (v % 2 == 0).then_some(v));
                        }
                    }
                }
            });
        }
    });
    c.validate();
    let held_w: u64 = c.iter().map(|(_, v)| (v % 7 + 1).min(cap)).sum();
    assert_eq!(
        c.weighted_size(),
        held_w,
        "weighted_size vs the held values' weights"
    );
    assert_eq!(c.entry_count(), c.iter().count() as u64);
    let log = log.lock().unwrap().clone();
    let mut bad = Vec::new();
    for k in 0..4u64 {
        let fin = c.iter().find(|(kk, _)| *kk == k).map(|(_, v)| v);
        let stored: Vec<u64> = log
            .iter()
            .filter(|e| e.0 == k && e.2 == "store")
            .map(|e| e.1)
            .collect();
        let mut s2 = stored.clone();
        s2.sort();
        s2.dedup();
        if s2.len() != stored.len() {
            bad.push(format!("key {k}: a value stored twice"));
        }
        for v in &stored {
            let reps = log
                .iter()
                .filter(|e| e.0 == k && e.1 == *v && e.2 != "store" && e.2 != "weigh")
                .count();
            let weighs = log
                .iter()
                .filter(|e| e.0 == k && e.1 == *v && e.2 == "weigh")
                .count();
            let want = usize::from(Some(*v) != fin);
            if reps != want {
                bad.push(format!(
                    "key {k}: stored {v} reported {reps}x, want {want} (holds {fin:?})"
                ));
            }
            if weighs != 1 {
                bad.push(format!("key {k}: stored {v} weighed {weighs}x"));
            }
        }
        for e in log
            .iter()
            .filter(|e| e.0 == k && e.2 != "store" && e.2 != "weigh")
        {
            if !stored.contains(&e.1) {
                // A value turned away for size is reported (Size) without being stored.
                let n = log
                    .iter()
                    .filter(|x| x.0 == k && x.1 == e.1 && x.2 != "weigh")
                    .count();
                if e.2 != "size" || n != 1 {
                    bad.push(format!(
                        "key {k}: {} reported ({}) but never stored ({n} reports)",
                        e.1, e.2
                    ));
                }
            }
        }
        if let Some(f) = fin {
            if !stored.contains(&f) {
                bad.push(format!("key {k}: holds {f}, never stored"));
            }
        }
        // Each life of the key begins with a create and ends with an explicit removal (or
        // lasts): creates = explicit removals + (held now); updates = replaced values.
        let creates = log
            .iter()
            .filter(|e| e.0 == k && e.2 == "store" && e.3)
            .count();
        let updates = log
            .iter()
            .filter(|e| e.0 == k && e.2 == "store" && !e.3)
            .count();
        let explicit = log
            .iter()
            .filter(|e| e.0 == k && (e.2 == "explicit" || e.2 == "size") && stored.contains(&e.1))
            .count();
        let replaced = log.iter().filter(|e| e.0 == k && e.2 == "replaced").count();
        if creates != explicit + usize::from(fin.is_some()) || updates != replaced {
            bad.push(format!(
                "key {k}: creates {creates} vs explicit {explicit} + held {}; updates {updates} vs replaced {replaced}",
                fin.is_some()
            ));
        }
    }
    bad.truncate(20);
    assert!(bad.is_empty(), "{bad:#?}");
}

// ---------------------------------------------------------------- async refresh, soft timeout, cancel

/// Refresh with the async loader on a `future_spawner` that parks the futures: same as the
/// blocking refresh (one update; a write during the load wins).
#[test]
fn async_refresh_is_one_update() {
    let _w = watchdog(Duration::from_secs(60), "async_refresh_is_one_update");
    type Futs = Arc<Mutex<Vec<herdcache::BoxFuture<()>>>>;
    let mut bad = Vec::new();
    for mode in 0..=2u64 {
        let futs: Futs = Arc::new(Mutex::new(Vec::new()));
        let cell: Arc<OnceLock<C>> = Arc::new(OnceLock::new());
        let (f2, c2) = (Arc::clone(&futs), Arc::clone(&cell));
        let e = env(
            none,
            move |b| {
                b.refresh_after(Duration::from_secs(5))
                    .async_loader(move |k: &Key| {
                        let c = c2.get().expect("cache").clone();
                        let k = same(k);
                        async move {
                            match mode {
                                1 => c.insert(same(&k), 7),
                                2 => c.invalidate(&k),
                                _ => {}
                            }
                            Ok::<_, BoxError>(99)
                        }
                    })
                    .future_spawner(move |f| f2.lock().unwrap().push(f))
            },
            true,
        );
        assert!(cell.set(e.c.clone()).is_ok());
        e.c.insert(key(&e.h, 1), 5);
        e.h.clock.advance(Duration::from_secs(6));
        let s0 = e.c.stats();
        assert_eq!(e.c.get(&key(&e.h, 1)), Some(5));
        e.rec.take();
        let fs: Vec<_> = std::mem::take(&mut *futs.lock().unwrap());
        let n = fs.len();
        for f in fs {
            bo(f);
        }
        e.c.run_pending_tasks();
        let log: Vec<_> = e
            .rec
            .take()
            .into_iter()
            .filter(|x| !(mode != 0 && *x == Ev::Weigh(99)))
            .collect();
        let fin = held(&e.c);
        let d = e.c.stats() - s0;
        let (want_fin, want_log): (Option<u64>, Vec<Ev>) = match mode {
            0 => (
                Some(99),
                vec![
                    Ev::Weigh(99),
                    Ev::Update(99, Some(Duration::from_secs(4))),
                    Ev::Removed(5, RemovalCause::Replaced),
                ],
            ),
            1 => (
                Some(7),
                vec![
                    Ev::Weigh(7),
                    Ev::Update(7, Some(Duration::from_secs(4))),
                    Ev::Removed(5, RemovalCause::Replaced),
                ],
            ),
            _ => (None, vec![Ev::Removed(5, RemovalCause::Explicit)]),
        };
        note(format!(
            "async refresh mode {mode}: futs {n} holds {fin:?} log {log:?}"
        ));
        let stats_ok = if mode == 0 {
            d.refreshes_succeeded == 1
        } else {
            d.refreshes_failed == 1
        };
        if n != 1 || fin != want_fin || log != want_log || !stats_ok {
            bad.push(format!(
                "mode {mode}: futs {n} holds {fin:?} log {log:?} succ/fail {}/{}",
                d.refreshes_succeeded, d.refreshes_failed
            ));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// `load_with_timeout` gives up waiting for a spawned load; the load goes on and fills the
/// cache (docs) — one create — unless a write of the key came first (a write wins).
#[test]
fn soft_timeout_load_stores_once_or_loses_to_write() {
    let _w = watchdog(Duration::from_secs(60), "soft_timeout_load");
    for write_first in [false, true] {
        let jobs: Jobs = Arc::new(Mutex::new(Vec::new()));
        let j2 = Arc::clone(&jobs);
        let e = env(
            none,
            move |b| {
                b.loader(|_: &Key| Ok::<_, BoxError>(99))
                    .spawner(move |job| j2.lock().unwrap().push(job))
            },
            true,
        );
        let s0 = e.c.stats();
        let r =
            e.c.load_with_timeout(key(&e.h, 1), Some(Duration::from_millis(30)));
        assert!(r.is_err(), "{r:?}");
        if write_first {
            e.c.insert(key(&e.h, 1), 7);
        }
        assert_eq!(run_jobs(&jobs), 1);
        e.c.run_pending_tasks();
        let log: Vec<_> = e
            .rec
            .take()
            .into_iter()
            .filter(|x| !(write_first && *x == Ev::Weigh(99)))
            .collect();
        let d = e.c.stats() - s0;
        eprintln!("soft timeout, write_first={write_first}: holds {:?} log {log:?} timeouts {} successes {}", held(&e.c), d.timeouts, d.load_successes);
        if write_first {
            assert_eq!(held(&e.c), Some(7));
            assert_eq!(log, vec![Ev::Weigh(7), Ev::Create(7)]);
        } else {
            assert_eq!(held(&e.c), Some(99));
            assert_eq!(log, vec![Ev::Weigh(99), Ev::Create(99)]);
            assert_eq!(d.load_successes, 1);
        }
        assert_eq!(d.timeouts, 1);
    }
}

/// A `get_with_async` dropped while its `init` is pending stores nothing (documented cancel
/// safety), reports nothing, and leaves the key loadable; the abandoned load is counted once.
#[test]
fn cancelled_async_load_stores_nothing() {
    let _w = watchdog(Duration::from_secs(60), "cancelled_async_load");
    use std::future::Future;
    use std::task::{Context, Poll};
    for pre in [Pre::Absent, Pre::Expired, Pre::Live] {
        let e = env(none, |b| b, true);
        if pre != Pre::Absent {
            e.c.insert(key(&e.h, 1), 5);
        }
        e.h.clock
            .advance(Duration::from_secs(if pre == Pre::Expired {
                11
            } else {
                3
            }));
        e.rec.take();
        let s0 = e.c.stats();
        {
            let fut = if pre == Pre::Live {
                // replacing: get_with_if
                Box::pin(async {
                    e.c.get_with_if_async(
                        key(&e.h, 1),
                        async {
                            common::Yield(3).await;
                            99
                        },
                        |_| true,
                    )
                    .await
                }) as std::pin::Pin<Box<dyn Future<Output = u64>>>
            } else {
                Box::pin(e.c.get_with_async(key(&e.h, 1), async {
                    common::Yield(3).await;
                    99
                }))
            };
            let mut fut = fut;
            let w = futures::task::noop_waker();
            let mut cx = Context::from_waker(&w);
            assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Pending));
        } // dropped mid-load
        let log = e.rec.take();
        let d = e.c.stats() - s0;
        let want_fin = if pre == Pre::Live { Some(5) } else { None };
        eprintln!(
            "cancel {pre:?}: holds {:?} log {log:?} abandoned {}",
            held(&e.c),
            d.loads_abandoned
        );
        assert_eq!(held(&e.c), want_fin);
        assert!(
            !log.iter()
                .any(|x| matches!(x, Ev::Create(_) | Ev::Update(..) | Ev::Weigh(_))),
            "{log:?}"
        );
        assert_eq!(d.loads_abandoned, 1);
        let (c, k) = (e.c.clone(), key(&e.h, 1));
        let v = common::within(Duration::from_secs(5), move || c.get_with(k, || 8))
            .expect("key stuck")
            .unwrap();
        assert_eq!(v, if pre == Pre::Live { 5 } else { 8 });
    }
}

// ---------------------------------------------------------------- writes while a refresh is parked

/// A refresh claimed (its job parked in the spawner), then a write of the key; then the job
/// runs. The write must not wait for the parked job (moka's writes never wait for a refresh),
/// and the refresh, which started before the write, must lose: no update by 99, no report of
/// a value it never stored.
#[test]
fn write_while_refresh_parked() {
    let _w = watchdog(Duration::from_secs(120), "write_while_refresh_parked");
    type W = fn(&C, Key) -> Option<u64>;
    // (name, write, value held if it does not wait for the refresh, if it waits and goes after)
    // Waiting is documented for computations ("first waits for any [load] that runs") and
    // for get_with_if (joins a running load without calling replace_if).
    let writes: &[(&str, W, u64, u64)] = &[
        (
            "insert",
            |c, k| {
                c.insert(k, 7);
                Some(7)
            },
            7,
            7,
        ),
        (
            "invalidate",
            |c, k| {
                c.invalidate(&k);
                None
            },
            0,
            0,
        ),
        (
            "and_upsert_with",
            |c, k| Some(*c.entry(k).and_upsert_with(up).value()),
            105,
            199,
        ),
        (
            "and_compute_with(Put)",
            |c, k| cr(c.entry(k).and_compute_with(|e| Op::Put(up(e)))),
            105,
            199,
        ),
        (
            "and_compute_with(Remove)",
            |c, k| cr(c.entry(k).and_compute_with(|_| Op::Remove)),
            0,
            0,
        ),
        (
            "get_with_if(replace)",
            |c, k| Some(c.get_with_if(k, || 77, |_| true)),
            77,
            99,
        ),
        (
            "or_insert_with_if(replace)",
            |c, k| Some(*c.entry(k).or_insert_with_if(|| 77, |_| true).value()),
            77,
            99,
        ),
    ];
    let mut bad = Vec::new();
    for (name, w, want_now, want_after) in writes {
        let (e, jobs, _) = refresh_env(false, true);
        e.c.insert(key(&e.h, 1), 5);
        e.h.clock.advance(Duration::from_secs(6));
        assert_eq!(e.c.get(&key(&e.h, 1)), Some(5)); // claims the refresh; job parked
        e.rec.take();
        let (c, k, w) = (e.c.clone(), key(&e.h, 1), *w);
        let t = std::thread::spawn(move || w(&c, k));
        let t0 = std::time::Instant::now();
        while !t.is_finished() && t0.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let waited = !t.is_finished();
        run_jobs(&jobs);
        let ret = t.join().expect("write panicked");
        e.c.run_pending_tasks();
        let log: Vec<_> = e
            .rec
            .take()
            .into_iter()
            .filter(|x| waited || *x != Ev::Weigh(99))
            .collect();
        let fin = held(&e.c);
        let want = if waited { *want_after } else { *want_now };
        let want_fin = (want != 0).then_some(want);
        eprintln!("{name} during parked refresh: waited {waited}; returned {ret:?}; holds {fin:?}; log {log:?}");
        if fin != want_fin {
            bad.push(format!(
                "{name}: holds {fin:?} (want {want_fin:?}), waited {waited}, log {log:?}"
            ));
        }
        if !waited
            && log
                .iter()
                .any(|x| matches!(x, Ev::Create(99) | Ev::Update(99, _) | Ev::Removed(99, _)))
        {
            bad.push(format!(
                "{name}: the refresh that lost stored/reported 99: {log:?}"
            ));
        }
        for v in [5u64, 99] {
            let stored = v == 5
                || log
                    .iter()
                    .any(|x| matches!(x, Ev::Create(x2) | Ev::Update(x2, _) if *x2 == v));
            let reps = log
                .iter()
                .filter(|x| matches!(x, Ev::Removed(x2, _) if *x2 == v))
                .count();
            let want_reps = usize::from(stored && fin != Some(v));
            if reps != want_reps {
                bad.push(format!(
                    "{name}: {v} reported {reps}x, want {want_reps}: {log:?}"
                ));
            }
        }
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// TTL together with a custom Expiry: the update hook is told the custom deadline's rest
/// (documented: "what its hooks are told remains"), and the stored value's deadline is the
/// earliest of the TTL from the write and the hook's answer.
#[test]
fn update_with_ttl_and_expiry() {
    let _w = watchdog(Duration::from_secs(60), "update_with_ttl_and_expiry");
    let e = env(none, |b| b.time_to_live(Duration::from_secs(5)), true);
    e.c.insert(key(&e.h, 1), 5);
    e.h.clock.advance(Duration::from_secs(3));
    e.rec.take();
    e.c.entry(key(&e.h, 1)).and_upsert_with(up);
    let log = e.rec.take();
    assert_eq!(
        log,
        vec![
            Ev::Weigh(105),
            Ev::Update(105, Some(Duration::from_secs(7))),
            Ev::Removed(5, RemovalCause::Replaced)
        ]
    );
    e.h.clock.advance(Duration::from_secs(4)); // 7: TTL from the write (3 + 5 = 8) not passed
    assert!(
        e.c.contains_key(&key(&e.h, 1)),
        "TTL counted from the first write"
    );
    e.h.clock.advance(Duration::from_secs(2)); // 9
    assert!(
        !e.c.contains_key(&key(&e.h, 1)),
        "TTL not applied to the update"
    );
}

/// A refresh whose value is too heavy (documented: "replaces it with nothing: the key is
/// removed") or dead on arrival: the old value reported once (Replaced), the new one once
/// (Size / Expired), nothing left, counters consistent.
#[test]
fn refresh_turned_away() {
    let _w = watchdog(Duration::from_secs(60), "refresh_turned_away");
    for (mode, v, cause) in [
        (4u64, HEAVY, RemovalCause::Size),
        (5, DOA, RemovalCause::Expired),
    ] {
        let (e, jobs, m) = refresh_env(false, true);
        m.store(mode, Ordering::SeqCst);
        e.c.insert(key(&e.h, 1), 5);
        e.h.clock.advance(Duration::from_secs(6));
        e.c.get(&key(&e.h, 1));
        e.rec.take();
        let s0 = e.c.stats();
        run_jobs(&jobs);
        e.c.run_pending_tasks();
        let log = e.rec.take();
        let d = e.c.stats() - s0;
        eprintln!("refresh to {v}: holds {:?} log {log:?} succeeded {} failed {} size {} expired {} replaced {}",
            held(&e.c), d.refreshes_succeeded, d.refreshes_failed, d.size.count, d.expired.count, d.replaced.count);
        assert_eq!(held(&e.c), None);
        let rm: Vec<_> = log
            .iter()
            .filter(|x| matches!(x, Ev::Removed(..)))
            .cloned()
            .collect();
        assert_eq!(rm.len(), 2, "{log:?}");
        assert!(
            rm.contains(&Ev::Removed(5, RemovalCause::Replaced)),
            "{log:?}"
        );
        assert!(rm.contains(&Ev::Removed(v, cause)), "{log:?}");
        assert_eq!((e.c.entry_count(), e.c.weighted_size()), (1, 1));
        assert_eq!(d.refreshes_succeeded + d.refreshes_failed, 1);
    }
}

/// Jitter: a write's new time to live is drawn again from the write (within ±20 % of 10 s),
/// not kept from the old value's.
#[test]
fn jittered_ttl_counts_from_write() {
    let _w = watchdog(Duration::from_secs(60), "jittered_ttl_counts_from_write");
    let mut bad = Vec::new();
    for ep in eps().iter().filter(|e| e.kind == Kind::Writer) {
        for trial in 0..8 {
            let e = env(ep.cfg, |b| b.time_to_live(CREATE).jitter(0.2), false);
            e.c.insert(key(&e.h, 1), 5);
            e.h.clock.advance(Duration::from_secs(6));
            (ep.call)(&e.c, key(&e.h, 1));
            // deadline in [6 + 8, 6 + 12]: alive at 13.9, gone at 18.1
            e.h.clock.advance(Duration::from_millis(7900));
            let a = e.c.contains_key(&key(&e.h, 1));
            e.h.clock.advance(Duration::from_millis(4200));
            let b = e.c.contains_key(&key(&e.h, 1));
            if !a || b {
                bad.push(format!(
                    "{} trial {trial}: alive at 13.9 s {a}, at 18.1 s {b}",
                    ep.name
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// `get_all` over an absent, a live and an expired key, with an `insert` of the absent one
/// while `load_missing` runs: the write wins for that key only; the others stored once each.
#[test]
fn get_all_mixed_with_write_during_load() {
    let _w = watchdog(Duration::from_secs(60), "get_all_mixed");
    let e = env(none, |b| b, true);
    e.c.insert(key(&e.h, 2), 5); // will be expired
    e.h.clock.advance(Duration::from_secs(8));
    e.c.insert(key(&e.h, 3), 6); // live
    e.h.clock.advance(Duration::from_secs(3)); // 2 expired, 3 live
    e.rec.take();
    let h = Arc::clone(&e.h);
    let c2 = e.c.clone();
    let m =
        e.c.get_all([key(&e.h, 1), key(&e.h, 2), key(&e.h, 3)], move |ks| {
            c2.insert(key(&h, 1), 7);
            ks.iter().map(|k| (same(k), 90 + k.0)).collect()
        });
    let got = |n: u64| m.get(&key(&e.h, n)).copied();
    eprintln!(
        "get_all: 1 {:?} 2 {:?} 3 {:?}; cache 1 {:?}",
        got(1),
        got(2),
        got(3),
        held(&e.c)
    );
    assert_eq!(
        held(&e.c),
        Some(7),
        "the write of 1 during the load must win"
    );
    assert_eq!(got(3), Some(6));
    assert_eq!(e.c.iter().find(|(k, _)| k.0 == 2).map(|(_, v)| v), Some(92));
    let log = e.rec.take();
    // key 1 only is logged: 7 created, 91 neither stored nor reported.
    assert!(
        !log.iter()
            .any(|x| matches!(x, Ev::Create(91) | Ev::Update(91, _) | Ev::Removed(91, _))),
        "{log:?}"
    );
    assert!(log.contains(&Ev::Create(7)), "{log:?}");
}

/// (c) a listener that panics on the displaced value: documented, the operation completes
/// (the new value stored, one create/update) and the panic is resumed in the caller; the key
/// is not left loading.
#[test]
fn listener_panic_on_replace_completes_the_write() {
    let _w = watchdog(Duration::from_secs(120), "listener_panic_on_replace");
    common::quiet_injected_panics();
    let mut bad = Vec::new();
    for ep in eps().iter().filter(|e| e.kind != Kind::NoStore) {
        for pre in [Pre::Live, Pre::Expired] {
            if ep.kind == Kind::Loader && pre == Pre::Live {
                continue; // a read
            }
            let e = env(ep.cfg, |b| b, true);
            e.rec.listener_panics.store(true, Ordering::SeqCst);
            let r = run(ep, &e, pre, Mode::Plain);
            e.rec.listener_panics.store(false, Ordering::SeqCst);
            e.c.run_pending_tasks();
            e.c.validate();
            let log = e.rec.take();
            let fin = held(&e.c);
            let stores: Vec<_> = log
                .iter()
                .filter(|x| matches!(x, Ev::Create(_) | Ev::Update(..)))
                .cloned()
                .collect();
            let want_kind_ok = match (pre, stores.as_slice()) {
                (Pre::Live, [Ev::Update(_, Some(d))]) => *d == Duration::from_secs(7),
                (Pre::Expired, [Ev::Create(_)]) => true,
                _ => false,
            };
            let panicked = matches!(&r, Err(m) if m.contains("injected listener panic"));
            let rm5 = log
                .iter()
                .filter(|x| matches!(x, Ev::Removed(5, _)))
                .count();
            let n = e.c.iter().count() as u64;
            let (c, k) = (e.c.clone(), key(&e.h, 1));
            let after = common::within(Duration::from_secs(5), move || c.get_with(k, || 8));
            let stuck = !matches!(after, Some(Ok(_)));
            eprintln!(
                "{} {pre:?} listener panic: {r:?} holds {fin:?} log {log:?}",
                ep.name
            );
            if !panicked
                || !want_kind_ok
                || rm5 != 1
                || fin.is_none()
                || fin == Some(5)
                || e.c.entry_count() != n
                || stuck
            {
                bad.push(format!(
                    "{} {pre:?}: call {r:?}, holds {fin:?}, log {log:?}, stuck {stuck}",
                    ep.name
                ));
            }
        }
    }
    for b in &bad {
        eprintln!("FAIL {b}");
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// (b) the weigher panics on a load's value while another caller waits on that load: the
/// waiter is released (it loads itself or gets an error-free value), nothing half-stored.
#[test]
fn weigher_panic_with_a_waiter() {
    let _w = watchdog(Duration::from_secs(60), "weigher_panic_with_a_waiter");
    common::quiet_injected_panics();
    let e = env(none, |b| b, true);
    e.rec.panic_on.store(99, Ordering::SeqCst);
    let (c1, k1) = (e.c.clone(), key(&e.h, 1));
    let leader = common::start(move || {
        c1.get_with(k1, || {
            std::thread::sleep(Duration::from_millis(200));
            99
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let (c2, k2) = (e.c.clone(), key(&e.h, 1));
    let waiter = common::start(move || c2.get_with(k2, || 8));
    let l = leader.wait(Duration::from_secs(5)).expect("leader hung");
    let w = waiter.wait(Duration::from_secs(5)).expect("waiter hung");
    e.rec.panic_on.store(0, Ordering::SeqCst);
    e.c.validate();
    let log = e.rec.take();
    eprintln!(
        "leader {:?} waiter {:?} holds {:?} log {log:?}",
        l.as_ref().map_err(|p| common::panic_message(&**p)),
        w.as_ref().ok(),
        held(&e.c)
    );
    assert!(l.is_err(), "the leader's weigher panic must reach it");
    assert_eq!(w.ok(), Some(8), "the waiter loads itself");
    assert_eq!(held(&e.c), Some(8));
    assert_eq!(
        log.iter()
            .filter(|x| matches!(x, Ev::Create(_) | Ev::Update(..)))
            .cloned()
            .collect::<Vec<_>>(),
        vec![Ev::Create(8)]
    );
}

/// Minimal repro (plain types): a computation on a key whose entry expired but was not yet
/// reclaimed, with a listener that panics when told of the expired value. Documented
/// (`eviction_listener`): "the operation that removed the entries has completed ... then the
/// panic is resumed in that operation's caller". Observed: the panic escapes before `f` runs;
/// nothing stored.
#[test]
fn repro_listener_panic_aborts_compute_on_expired_key() {
    let _w = watchdog(Duration::from_secs(30), "repro_listener_panic_compute");
    common::quiet_injected_panics();
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(10))
        .clock(clock.clone())
        .eviction_listener(|_k: &u32, v: &u32, _| {
            if *v == 5 {
                panic!("injected listener panic");
            }
        })
        .build();
    let calls = AtomicU64::new(0);
    cache.insert(1, 5);
    clock.advance(Duration::from_secs(11)); // expired, not reclaimed
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache.entry(1).and_upsert_with(|_| {
            calls.fetch_add(1, Ordering::SeqCst);
            100
        })
    }));
    let got = cache.get(&1);
    eprintln!(
        "upsert: panicked {}, f called {}, holds {got:?}",
        r.is_err(),
        calls.load(Ordering::SeqCst)
    );
    // The same with insert completes (for comparison):
    cache.insert(2, 5);
    clock.advance(Duration::from_secs(11));
    let r2 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.insert(2, 100)));
    eprintln!(
        "insert: panicked {}, holds {:?}",
        r2.is_err(),
        cache.get(&2)
    );
    assert!(r.is_err(), "panic resumed in the caller");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "f never ran");
    assert_eq!(got, Some(100), "the upsert did not complete");
}
