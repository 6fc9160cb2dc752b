//! Attack sweep: every call that answers with a value found in the cache treats it as a read,
//! exactly once (time to idle moved, `expire_after_read` once, one hit, LRU touched); calls
//! documented as not touching do not. Each entry point is tried on a plain hit (value present
//! before the call) and a window hit (value stored by the key's `Clone`, which the cache calls
//! between its lock-free miss and its locked re-check), plus a miss that loads.
//!
//! `matrix` prints the whole table (`-- --nocapture`); the per-entry-point tests assert.
#![cfg(not(any(loom, shuttle)))]
// The test key carries its hook (atomics) but hashes and compares by its number only.
#![allow(clippy::mutable_key_type, clippy::type_complexity)]
mod common;

use common::watchdog;
use herdcache::{BoxError, Cache, CacheBuilder, CompResult, DefaultHashBuilder, EvictionPolicy};
use herdcache::{Expiry, ManualClock, Op};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Every hook made, kept reachable to the end of the process: a hook holds its cache and the
/// cache's keys hold the hook (a cycle the tests need), which LeakSanitizer would report.
static HOOKS: std::sync::Mutex<Vec<std::sync::Arc<Hook>>> = std::sync::Mutex::new(Vec::new());

type C = Cache<Key, u64>;
type B = CacheBuilder<Key, u64, DefaultHashBuilder>;
type Action = Box<dyn FnOnce(&C, &ManualClock) + Send>;

pub struct Hook {
    cache: OnceLock<C>,
    clock: ManualClock,
    action: Mutex<Option<Action>>,
    fired: AtomicBool,
    /// `Hash` calls on key 1, and how many had happened when the hook fired.
    hashes: AtomicU64,
    hashes_at_fire: AtomicU64,
    /// `Eq` calls of key 1 against its hash twin, key 101 (always cached): each is a lookup.
    eqs: AtomicU64,
    /// While set, the hook does not fire (a test releases it from its own callback).
    hold: AtomicBool,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// A key whose first `Clone` after arming and after its first `Hash` runs the hook's action (stores the value...).
#[derive(Debug)]
pub struct Key(u64, Arc<Hook>);

impl Clone for Key {
    fn clone(&self) -> Self {
        // Fires at the first clone after a lookup of the key happened (seen as an `Eq` call
        // against its hash twin 101, which every cache here holds).
        let looked = self.1.eqs.load(Ordering::SeqCst) > 0 && !self.1.hold.load(Ordering::SeqCst);
        let a = if looked {
            self.1.action.lock().unwrap().take() // guard dropped here
        } else {
            None
        };
        if let Some(a) = a {
            self.1.fired.store(true, Ordering::SeqCst);
            let n = self.1.hashes.load(Ordering::SeqCst);
            self.1.hashes_at_fire.store(n, Ordering::SeqCst);
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
        if self.0 == 1 {
            self.1.hashes.fetch_add(1, Ordering::SeqCst);
        }
        (self.0 % 100).hash(h) // 1 and TWIN collide
    }
}

/// Key 1's hash twin: present in every cache, so that a lookup of 1 calls `Eq`.
const TWIN: u64 = 101;

/// create: 10 s; read: counted, 100 s.
struct Counting(Arc<AtomicU64>);
impl Expiry<Key, u64> for Counting {
    fn expire_after_create(&self, _: &Key, _: &u64) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }
    fn expire_after_read(&self, _: &Key, _: &u64, _: Option<Duration>) -> Option<Duration> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Some(Duration::from_secs(100))
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Out {
    v: Option<u64>,
    fresh: Option<bool>,
}
fn val(v: Option<u64>) -> Out {
    Out { v, fresh: None }
}
fn ent(e: Option<herdcache::Entry<Key, u64>>) -> Out {
    match e {
        Some(e) => Out {
            v: Some(*e.value()),
            fresh: Some(e.is_fresh()),
        },
        None => Out::default(),
    }
}
fn same(k: &Key) -> Key {
    Key(k.0, Arc::clone(&k.1)) // never `clone()` in test code: that fires the hook
}
fn bo<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// Documented (or, docs silent, moka-equivalent) as a read.
    Read,
    /// Documented as not an access.
    NoTouch,
}

struct Ep {
    name: &'static str,
    cfg: fn(B) -> B,
    call: fn(&C, Key) -> Out,
    expect: Expect,
    /// A miss loads (a loading call).
    loads: bool,
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
fn failsafe(b: B) -> B {
    b.fail_safe(Duration::from_secs(600))
        .loader(|_: &Key| Ok::<_, BoxError>(99))
}

fn eps() -> Vec<Ep> {
    use Expect::*;
    macro_rules! ep {
        ($name:expr, $cfg:expr, $exp:expr, $loads:expr, |$c:ident, $k:ident| $body:expr) => {
            Ep {
                name: $name,
                cfg: $cfg,
                call: |$c: &C, $k: Key| -> Out { $body },
                expect: $exp,
                loads: $loads,
            }
        };
    }
    vec![
        ep!("get", none, Read, false, |c, k| val(c.get(&k))),
        ep!("get (loader cache)", loader, Read, false, |c, k| val(
            c.get(&k)
        )),
        ep!("get_with", none, Read, true, |c, k| val(Some(
            c.get_with(k, || 99)
        ))),
        ep!("try_get_with", none, Read, true, |c, k| val(c
            .try_get_with(k, || Ok::<_, String>(99))
            .ok())),
        ep!("optionally_get_with", none, Read, true, |c, k| val(
            c.optionally_get_with(k, || Some(99))
        )),
        ep!("get_with_if(keep)", none, Read, true, |c, k| val(Some(
            c.get_with_if(k, || 99, |_| false)
        ))),
        ep!("get_with_by_ref", none, Read, true, |c, k| val(Some(
            c.get_with_by_ref(&k, || 99)
        ))),
        ep!("try_get_with_by_ref", none, Read, true, |c, k| val(c
            .try_get_with_by_ref(&k, || Ok::<_, String>(99))
            .ok())),
        ep!("optionally_get_with_by_ref", none, Read, true, |c, k| val(
            c.optionally_get_with_by_ref(&k, || Some(99))
        )),
        ep!("entry.or_insert_with", none, Read, true, |c, k| ent(Some(
            c.entry(k).or_insert_with(|| 99)
        ))),
        ep!("entry.or_insert", none, Read, true, |c, k| ent(Some(
            c.entry(k).or_insert(99)
        ))),
        ep!("entry.or_default", none, Read, true, |c, k| ent(Some(
            c.entry(k).or_default()
        ))),
        ep!(
            "entry.or_optionally_insert_with",
            none,
            Read,
            true,
            |c, k| ent(c.entry(k).or_optionally_insert_with(|| Some(99)))
        ),
        ep!("entry.or_try_insert_with", none, Read, true, |c, k| ent(c
            .entry(k)
            .or_try_insert_with(|| Ok::<_, String>(99))
            .ok())),
        ep!("entry.or_insert_with_if(keep)", none, Read, true, |c, k| {
            ent(Some(c.entry(k).or_insert_with_if(|| 99, |_| false)))
        }),
        ep!("entry_by_ref.or_insert_with", none, Read, true, |c, k| ent(
            Some(c.entry_by_ref(&k).or_insert_with(|| 99))
        )),
        ep!("entry_by_ref.or_insert", none, Read, true, |c, k| ent(
            Some(c.entry_by_ref(&k).or_insert(99))
        )),
        ep!("get_all", none, Read, true, |c, k| {
            let probe = same(&k);
            let m = c.get_all([k], |ks| ks.iter().map(|k| (same(k), 99)).collect());
            val(m.get(&probe).copied())
        }),
        ep!("get_or_stale", failsafe, Read, false, |c, k| val(
            c.get_or_stale(&k)
        )),
        ep!("load", loader, Read, true, |c, k| val(c.load(k).ok())),
        ep!("load_with_timeout(None)", loader, Read, true, |c, k| val(c
            .load_with_timeout(k, None)
            .ok())),
        ep!("load_with_timeout(5s)", loader, Read, true, |c, k| val(c
            .load_with_timeout(k, Some(Duration::from_secs(5)))
            .ok())),
        ep!("load (fail_safe cache)", failsafe, Read, true, |c, k| val(
            c.load(k).ok()
        )),
        // async twins
        ep!("get_with_async", none, Read, true, |c, k| val(Some(bo(
            c.get_with_async(k, async { 99 })
        )))),
        ep!("try_get_with_async", none, Read, true, |c, k| val(bo(
            c.try_get_with_async(k, async { Ok::<_, String>(99) })
        )
        .ok())),
        ep!("optionally_get_with_async", none, Read, true, |c, k| val(
            bo(c.optionally_get_with_async(k, async { Some(99) }))
        )),
        ep!("get_with_if_async(keep)", none, Read, true, |c, k| val(
            Some(bo(c.get_with_if_async(k, async { 99 }, |_| false)))
        )),
        ep!("get_with_async_shared", none, Read, true, |c, k| val(Some(
            bo(c.get_with_async_shared(k, async { 99 }))
        ))),
        ep!("try_get_with_async_shared", none, Read, true, |c, k| val(
            bo(c.try_get_with_async_shared(k, async { Ok::<_, String>(99) })).ok()
        )),
        ep!(
            "optionally_get_with_async_shared",
            none,
            Read,
            true,
            |c, k| val(bo(c.optionally_get_with_async_shared(k, async { Some(99) })))
        ),
        ep!("get_with_by_ref_async", none, Read, true, |c, k| val(Some(
            bo(c.get_with_by_ref_async(&k, async { 99 }))
        ))),
        ep!("try_get_with_by_ref_async", none, Read, true, |c, k| val(
            bo(c.try_get_with_by_ref_async(&k, async { Ok::<_, String>(99) })).ok()
        )),
        ep!(
            "optionally_get_with_by_ref_async",
            none,
            Read,
            true,
            |c, k| val(bo(
                c.optionally_get_with_by_ref_async(&k, async { Some(99) })
            ))
        ),
        ep!("entry.or_insert_with_async", none, Read, true, |c, k| ent(
            Some(bo(c.entry(k).or_insert_with_async(async { 99 })))
        )),
        ep!("entry.or_insert_async", none, Read, true, |c, k| ent(Some(
            bo(c.entry(k).or_insert_async(99))
        ))),
        ep!("entry.or_default_async", none, Read, true, |c, k| ent(
            Some(bo(c.entry(k).or_default_async()))
        )),
        ep!(
            "entry.or_optionally_insert_with_async",
            none,
            Read,
            true,
            |c, k| ent(bo(c
                .entry(k)
                .or_optionally_insert_with_async(async { Some(99) })))
        ),
        ep!(
            "entry.or_try_insert_with_async",
            none,
            Read,
            true,
            |c, k| ent(bo(c
                .entry(k)
                .or_try_insert_with_async(async { Ok::<_, String>(99) }))
            .ok())
        ),
        ep!(
            "entry.or_insert_with_if_async(keep)",
            none,
            Read,
            true,
            |c, k| ent(Some(bo(c
                .entry(k)
                .or_insert_with_if_async(async { 99 }, |_| false))))
        ),
        ep!(
            "entry_by_ref.or_insert_async",
            none,
            Read,
            true,
            |c, k| ent(Some(bo(c.entry_by_ref(&k).or_insert_async(99))))
        ),
        ep!("load_async", aloader, Read, true, |c, k| val(bo(
            c.load_async(k)
        )
        .ok())),
        // documented not an access
        ep!("contains_key", none, NoTouch, false, |c, k| val(c
            .contains_key(&k)
            .then_some(7))),
        // docs silent; moka: iter does not touch
        ep!("iter", none, NoTouch, false, |c, k| val(c
            .iter()
            .find(|(kk, _)| kk.0 == k.0)
            .map(|(_, v)| v))),
        // docs silent; moka's compute reads the current entry through its read path
        // (`get_with_hash_and_ignore_if(.., need_key = true)`: hit, access time, expiry read)
        ep!(
            "entry.and_compute_with(Nop)",
            none,
            Read,
            false,
            |c, k| match c.entry(k).and_compute_with(|_| Op::Nop) {
                CompResult::Unchanged(e) => ent(Some(e)),
                _ => Out::default(),
            }
        ),
        ep!(
            "entry.and_compute_with_async(Nop)",
            none,
            Read,
            false,
            |c, k| match bo(c.entry(k).and_compute_with_async(|_| async { Op::Nop })) {
                CompResult::Unchanged(e) => ent(Some(e)),
                _ => Out::default(),
            }
        ),
        ep!(
            "entry.and_try_compute_with(Nop)",
            none,
            Read,
            false,
            |c, k| match c
                .entry(k)
                .and_try_compute_with(|_| Ok::<_, String>(Op::Nop))
            {
                Ok(CompResult::Unchanged(e)) => ent(Some(e)),
                _ => Out::default(),
            }
        ),
    ]
}

fn env(ep: &Ep, extra: impl FnOnce(B) -> B) -> (C, Arc<Hook>) {
    let h = Arc::new(Hook {
        cache: OnceLock::new(),
        clock: ManualClock::new(),
        action: Mutex::new(None),
        fired: AtomicBool::new(false),
        hashes: AtomicU64::new(0),
        hashes_at_fire: AtomicU64::new(0),
        eqs: AtomicU64::new(0),
        hold: AtomicBool::new(false),
    });
    let b: B = Cache::builder().max_capacity(100).clock(h.clock.clone());
    let c = (ep.cfg)(extra(b)).build();
    assert!(h.cache.set(c.clone()).is_ok());
    HOOKS.lock().unwrap().push(Arc::clone(&h));
    c.insert(Key(TWIN, Arc::clone(&h)), 0);
    (c, h)
}
fn key(h: &Arc<Hook>, n: u64) -> Key {
    Key(n, Arc::clone(h))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Plain,
    Window,
}

/// One measurement: `None` when the window could not be hit (no clone between the lookups).
#[derive(Debug)]
struct Cell {
    pass: bool,
    obs: String,
}

/// Runs the call in `mode`: Plain: `before` runs now; Window: `before` is the hook's action.
/// Returns None when the window was not hit (hook not fired, or the call did not answer 7).
fn run(
    ep: &Ep,
    c: &C,
    h: &Arc<Hook>,
    mode: Mode,
    before: Box<dyn FnOnce(&C, &ManualClock) + Send>,
) -> Result<Out, String> {
    match mode {
        Mode::Plain => before(c, &h.clock),
        Mode::Window => *h.action.lock().unwrap() = Some(before),
    }
    h.hashes.store(0, Ordering::SeqCst);
    h.eqs.store(0, Ordering::SeqCst);
    let out = (ep.call)(c, key(h, 1));
    if mode == Mode::Window && h.fired.load(Ordering::SeqCst) {
        let n = h.hashes_at_fire.load(Ordering::SeqCst);
        if std::env::var("ATTACK_VERBOSE").is_ok() {
            eprintln!(
                "  {}: key hashed {n}x before the clone that stored",
                ep.name
            );
        }
    }
    if mode == Mode::Window && !h.fired.load(Ordering::SeqCst) {
        h.action.lock().unwrap().take();
        return Err(format!("n/a (no key clone; got {:?})", out.v));
    }
    if out.v != Some(7) {
        return Err(format!("n/a/window missed: answered {:?}", out.v));
    }
    if out.fresh == Some(true) {
        return Ok(Out {
            v: Some(7),
            fresh: Some(true),
        });
    }
    Ok(out)
}

fn expect_read(ep: &Ep) -> bool {
    ep.expect == Expect::Read
}

fn tti(ep: &Ep, mode: Mode) -> Cell {
    let (c, h) = env(ep, |b| b.time_to_idle(Duration::from_secs(10)));
    let hh = Arc::clone(&h);
    let before: Action = Box::new(move |c, clk| {
        c.insert(key(&hh, 1), 7);
        clk.advance(Duration::from_secs(8));
    });
    let out = match run(ep, &c, &h, mode, before) {
        Ok(o) => o,
        Err(e) => return Cell { pass: true, obs: e },
    };
    h.clock.advance(Duration::from_secs(8)); // t = 16: alive only if the read at 8 moved it
    let alive = c.contains_key(&key(&h, 1));
    let mut obs = format!("alive@16={alive}");
    let mut pass = alive == expect_read(ep);
    if out.fresh == Some(true) {
        obs += " FRESH-on-hit";
        pass = false;
    }
    Cell { pass, obs }
}

fn ear(ep: &Ep, mode: Mode) -> Cell {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let (c, h) = env(ep, move |b| b.expire_after(Counting(n2)));
    let hh = Arc::clone(&h);
    let before: Action = Box::new(move |c, clk| {
        c.insert(key(&hh, 1), 7);
        clk.advance(Duration::from_secs(8));
    });
    if let Err(e) = run(ep, &c, &h, mode, before) {
        return Cell { pass: true, obs: e };
    }
    let got = n.load(Ordering::SeqCst);
    let want = u64::from(expect_read(ep));
    // The read's 100 s must be applied: alive at 8 + 50.
    h.clock.advance(Duration::from_secs(50));
    let alive = c.contains_key(&key(&h, 1));
    Cell {
        pass: got == want && alive == expect_read(ep),
        obs: format!("ear={got} alive@58={alive}"),
    }
}

fn hits(ep: &Ep, mode: Mode) -> Cell {
    let (c, h) = env(ep, |b| b.record_stats());
    let hh = Arc::clone(&h);
    let before: Action = Box::new(move |c, _| c.insert(key(&hh, 1), 7));
    let s0 = c.stats();
    if let Err(e) = run(ep, &c, &h, mode, before) {
        return Cell { pass: true, obs: e };
    }
    let d = c.stats() - s0;
    // Compute verbs: not in the stats docs' list of lookups (`get`, the get_with/load family);
    // moka 0.12 has no hit statistics to compare with. Accepted as 0.
    let compute = ep.name.contains("compute");
    let want = u64::from(expect_read(ep) && !compute);
    let loads = d.load_successes + d.load_failures + d.loads_abandoned + d.negative_hits;
    // Window: documented (`CacheStats::coalesced`: "that found the value stored by another
    // caller by the time they claimed the key") as one miss + one coalesced, no hit.
    let (w_hits, w_misses, w_coal) = match mode {
        Mode::Plain => (want, 0, 0),
        Mode::Window => (0, 1, 1),
    };
    Cell {
        pass: d.hits == w_hits && d.misses == w_misses && d.coalesced == w_coal && loads == 0,
        obs: format!(
            "hits={} misses={} load_successes={} coalesced={} failures={} abandoned={} neg={}",
            d.hits,
            d.misses,
            d.load_successes,
            d.coalesced,
            d.load_failures,
            d.loads_abandoned,
            d.negative_hits
        ),
    }
}

fn lru(ep: &Ep, mode: Mode) -> Cell {
    let (c, h) = env(ep, |b| {
        b.max_capacity(4)
            .shards(1)
            .eviction_policy(EvictionPolicy::lru())
    });
    let hh = Arc::clone(&h);
    let before: Action = Box::new(move |c, _| {
        for n in 1..=3 {
            c.insert(key(&hh, n), if n == 1 { 7 } else { n });
        }
    });
    if let Err(e) = run(ep, &c, &h, mode, before) {
        return Cell { pass: true, obs: e };
    }
    c.insert(key(&h, 4), 4); // evicts the twin (oldest)
    c.insert(key(&h, 5), 5); // evicts 2 if 1 was touched, else 1
    let one = c.contains_key(&key(&h, 1));
    let two = c.contains_key(&key(&h, 2));
    let touched = one && !two;
    Cell {
        pass: touched == expect_read(ep) && (one ^ two),
        obs: format!("touched={touched} (1:{one} 2:{two})"),
    }
}

/// A miss that loads: one miss, no hit, no `expire_after_read` of the new value, fresh.
fn miss(ep: &Ep) -> Cell {
    if !ep.loads {
        return Cell {
            pass: true,
            obs: "-".into(),
        };
    }
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let (c, h) = env(ep, move |b| b.expire_after(Counting(n2)).record_stats());
    let s0 = c.stats();
    let out = (ep.call)(&c, key(&h, 1));
    let s = c.stats() - s0;
    let got = n.load(Ordering::SeqCst);
    let loaded = matches!(out.v, Some(99) | Some(0));
    let fresh_ok = out.fresh.is_none_or(|f| f);
    Cell {
        pass: loaded
            && fresh_ok
            && got == 0
            && s.hits == 0
            && s.misses == 1
            && s.load_successes == 1,
        obs: format!(
            "v={:?} fresh={:?} ear={got} hits={} misses={} loads={}",
            out.v, out.fresh, s.hits, s.misses, s.load_successes
        ),
    }
}

fn sweep(ep: &Ep) -> (String, Vec<String>) {
    let mut row = format!("{:40}", ep.name);
    let mut fails = Vec::new();
    for mode in [Mode::Plain, Mode::Window] {
        for (what, f) in [
            ("tti", tti as fn(&Ep, Mode) -> Cell),
            ("ear", ear),
            ("hits", hits),
            ("lru", lru),
        ] {
            let cell = f(ep, mode);
            let mark = if cell.obs.starts_with("n/a") {
                "n/a"
            } else if cell.pass {
                "ok"
            } else {
                "FAIL"
            };
            row += &format!(" {mark:4}");
            if !cell.pass {
                fails.push(format!("{} {mode:?} {what}: {}", ep.name, cell.obs));
            } else if std::env::var("ATTACK_VERBOSE").is_ok() {
                eprintln!("  {} {mode:?} {what}: {}", ep.name, cell.obs);
            }
        }
        row += " |";
    }
    let m = miss(ep);
    row += &format!(
        " {}",
        if m.obs == "-" {
            "-"
        } else if m.pass {
            "ok"
        } else {
            "FAIL"
        }
    );
    if !m.pass {
        fails.push(format!("{} miss-load: {}", ep.name, m.obs));
    }
    (row, fails)
}

#[test]
fn matrix() {
    let _w = watchdog(Duration::from_secs(120), "attack_reads matrix");
    eprintln!(
        "{:40} plain: tti  ear  hits lru  | window: tti ear hits lru | miss",
        "entry point"
    );
    let mut all = Vec::new();
    for ep in eps() {
        let (row, fails) = sweep(&ep);
        eprintln!("{row}");
        all.extend(fails);
    }
    for f in &all {
        eprintln!("FAIL {f}");
    }
}

macro_rules! per_ep {
    ($($t:ident => $name:expr),* $(,)?) => {$(
        #[test]
        fn $t() {
            let _w = watchdog(Duration::from_secs(60), $name);
            let ep = eps().into_iter().find(|e| e.name == $name).expect("known entry point");
            let (_, fails) = sweep(&ep);
            assert!(fails.is_empty(), "{fails:#?}");
        }
    )*};
}

per_ep! {
    get => "get",
    get_loader_cache => "get (loader cache)",
    get_with => "get_with",
    try_get_with => "try_get_with",
    optionally_get_with => "optionally_get_with",
    get_with_if => "get_with_if(keep)",
    get_with_by_ref => "get_with_by_ref",
    try_get_with_by_ref => "try_get_with_by_ref",
    optionally_get_with_by_ref => "optionally_get_with_by_ref",
    or_insert_with => "entry.or_insert_with",
    or_insert => "entry.or_insert",
    or_default => "entry.or_default",
    or_optionally_insert_with => "entry.or_optionally_insert_with",
    or_try_insert_with => "entry.or_try_insert_with",
    or_insert_with_if => "entry.or_insert_with_if(keep)",
    entry_by_ref_or_insert_with => "entry_by_ref.or_insert_with",
    entry_by_ref_or_insert => "entry_by_ref.or_insert",
    get_all => "get_all",
    get_or_stale => "get_or_stale",
    load => "load",
    load_with_timeout_none => "load_with_timeout(None)",
    load_with_timeout_some => "load_with_timeout(5s)",
    load_fail_safe => "load (fail_safe cache)",
    get_with_async => "get_with_async",
    try_get_with_async => "try_get_with_async",
    optionally_get_with_async => "optionally_get_with_async",
    get_with_if_async => "get_with_if_async(keep)",
    get_with_async_shared => "get_with_async_shared",
    try_get_with_async_shared => "try_get_with_async_shared",
    optionally_get_with_async_shared => "optionally_get_with_async_shared",
    get_with_by_ref_async => "get_with_by_ref_async",
    try_get_with_by_ref_async => "try_get_with_by_ref_async",
    optionally_get_with_by_ref_async => "optionally_get_with_by_ref_async",
    or_insert_with_async => "entry.or_insert_with_async",
    or_insert_async => "entry.or_insert_async",
    or_default_async => "entry.or_default_async",
    or_optionally_insert_with_async => "entry.or_optionally_insert_with_async",
    or_try_insert_with_async => "entry.or_try_insert_with_async",
    or_insert_with_if_async => "entry.or_insert_with_if_async(keep)",
    entry_by_ref_or_insert_async => "entry_by_ref.or_insert_async",
    load_async => "load_async",
    contains_key => "contains_key",
    iter => "iter",
    and_compute_with_nop => "entry.and_compute_with(Nop)",
    and_compute_with_async_nop => "entry.and_compute_with_async(Nop)",
    and_try_compute_with_nop => "entry.and_try_compute_with(Nop)",
}

// ---------------------------------------------------------------------------------------------
// Targeted cases beyond the matrix.
// ---------------------------------------------------------------------------------------------

fn counting_cache(extra: impl FnOnce(B) -> B) -> (C, Arc<Hook>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let ep = Ep {
        name: "-",
        cfg: none,
        call: |_, _| Out::default(),
        expect: Expect::Read,
        loads: false,
    };
    let (c, h) = env(&ep, move |b| {
        extra(b.expire_after(Counting(n2)).record_stats())
    });
    (c, h, n)
}

/// `get_with_if`: a value that `replace_if` rejects is a miss (stats docs), so not a read
/// (moka: `ignore_if` is checked before the read is recorded): no `expire_after_read` on it.
#[test]
fn get_with_if_rejected_value_is_not_read() {
    let _w = watchdog(Duration::from_secs(30), "rejected not read");
    let (c, h, n) = counting_cache(|b| b);
    c.insert(key(&h, 1), 5);
    let s0 = c.stats();
    assert_eq!(c.get_with_if(key(&h, 1), || 99, |v| *v == 5), 99);
    let d = c.stats() - s0;
    assert_eq!((d.hits, d.misses), (0, 1));
    assert_eq!(
        n.load(Ordering::SeqCst),
        0,
        "expire_after_read called on the rejected value"
    );
}

/// Same for the entry verb and the async twin.
#[test]
fn or_insert_with_if_rejected_value_is_not_read() {
    let _w = watchdog(Duration::from_secs(30), "rejected not read (entry)");
    let (c, h, n) = counting_cache(|b| b);
    c.insert(key(&h, 1), 5);
    let e = c.entry(key(&h, 1)).or_insert_with_if(|| 99, |v| *v == 5);
    assert!(e.is_fresh());
    assert_eq!(
        n.load(Ordering::SeqCst),
        0,
        "expire_after_read called on the rejected value"
    );
    c.insert(key(&h, 1), 5);
    assert_eq!(
        bo(c.get_with_if_async(key(&h, 1), async { 99 }, |v| *v == 5)),
        99
    );
    assert_eq!(
        n.load(Ordering::SeqCst),
        0,
        "async: expire_after_read on the rejected value"
    );
}

/// `get_with_if`, rejected value then, in the window, a value it keeps: that one is read once.
#[test]
fn get_with_if_rejected_then_kept_in_window_reads_once() {
    let _w = watchdog(Duration::from_secs(30), "rejected then kept");
    let (c, h, n) = counting_cache(|b| b);
    c.insert(key(&h, 1), 5);
    let hh = Arc::clone(&h);
    *h.action.lock().unwrap() = Some(Box::new(move |c: &C, clk: &ManualClock| {
        c.insert(key(&hh, 1), 7);
        clk.advance(Duration::from_secs(8));
    }));
    h.hold.store(true, Ordering::SeqCst); // fire only after 5 was judged
    let judged = Arc::new(Mutex::new(Vec::new()));
    let j = Arc::clone(&judged);
    let hh = Arc::clone(&h);
    let e = c.entry(key(&h, 1)).or_insert_with_if(
        || 99,
        move |v| {
            j.lock().unwrap().push(*v);
            hh.hold.store(false, Ordering::SeqCst);
            *v != 7
        },
    );
    assert!(h.fired.load(Ordering::SeqCst), "hook fired");
    assert_eq!(
        (*e.value(), e.is_fresh()),
        (7, false),
        "judged {:?}",
        judged.lock().unwrap()
    );
    eprintln!(
        "window: judged {:?}, ear={}",
        judged.lock().unwrap(),
        n.load(Ordering::SeqCst)
    );
    // Reads of 7: exactly one (5 rejected: not a read).
    assert_eq!(n.load(Ordering::SeqCst), 1, "expire_after_read calls");
    h.clock.advance(Duration::from_secs(50)); // 7 read at 8: due at 108
    assert!(c.contains_key(&key(&h, 1)));
}

/// `get_all` with the same key twice: one read of it (the result has it once).
#[test]
fn get_all_duplicate_key_reads_once() {
    let _w = watchdog(Duration::from_secs(30), "get_all dup");
    let (c, h, n) = counting_cache(|b| b);
    c.insert(key(&h, 1), 7);
    let s0 = c.stats();
    let m = c.get_all([key(&h, 1), key(&h, 1)], |_| unreachable!());
    assert_eq!(m.len(), 1);
    let d = c.stats() - s0;
    eprintln!(
        "get_all [1,1]: hits={} misses={} ear={}",
        d.hits,
        d.misses,
        n.load(Ordering::SeqCst)
    );
    assert_eq!(d.hits, 1, "hits for one key asked twice");
    assert_eq!(n.load(Ordering::SeqCst), 1, "expire_after_read calls");
}

/// A hit on an entry due for refresh (no spawner: the reader refreshes after answering) is one
/// read of the old value; the refresh is a write, not a read; no miss.
#[test]
fn refresh_ahead_hit_reads_once() {
    let _w = watchdog(Duration::from_secs(30), "refresh read once");
    for via_get in [false, true] {
        let (c, h, n) = counting_cache(|b| {
            b.refresh_after(Duration::from_secs(5))
                .loader(|_: &Key| Ok::<_, BoxError>(99))
        });
        c.insert(key(&h, 1), 7);
        h.clock.advance(Duration::from_secs(6));
        let s0 = c.stats();
        let v = if via_get {
            c.get(&key(&h, 1))
        } else {
            c.load(key(&h, 1)).ok()
        };
        let d = c.stats() - s0;
        eprintln!(
            "refresh via_get={via_get}: v={v:?} hits={} misses={} refreshes={} ear={}",
            d.hits,
            d.misses,
            d.refreshes_started,
            n.load(Ordering::SeqCst)
        );
        assert_eq!(v, Some(7));
        assert_eq!((d.hits, d.misses), (1, 0), "via_get={via_get}");
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "via_get={via_get}: expire_after_read calls"
        );
    }
}

/// Observable effect of the rejected read: `init` panics, the rejected value stays, and its
/// time to idle was moved by a read that the stats count as a miss (moka: not a read).
#[test]
fn get_with_if_rejected_value_idle_time_not_moved() {
    let _w = watchdog(Duration::from_secs(30), "rejected tti");
    let ep = Ep {
        name: "-",
        cfg: none,
        call: |_, _| Out::default(),
        expect: Expect::Read,
        loads: false,
    };
    let (c, h) = env(&ep, |b| b.time_to_idle(Duration::from_secs(10)));
    c.insert(key(&h, 1), 5);
    h.clock.advance(Duration::from_secs(8));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.get_with_if(key(&h, 1), || panic!("backend down"), |v| *v == 5)
    }));
    assert!(r.is_err());
    h.clock.advance(Duration::from_secs(8)); // t = 16: stored at 0, idle 10
    assert!(
        !c.contains_key(&key(&h, 1)),
        "the rejected value's idle time was moved at 8 s"
    );
}
