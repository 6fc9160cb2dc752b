//! Round 105: an outside cancel-safety sweep (a helper, public API only) of every async
//! method, 21 of them, about 17,000 cases per run, none failing when written (kept as
//! regression tests): each method's future is polled
//! N times then dropped, for N = 0, 1, 2, ... up to completion, with its init pending k polls
//! (waking itself or parking its waker as I/O would), while other callers of the same key
//! play various roles. After every case: no hang, every caller's value was produced by some
//! init or insert, no two loads of the key overlap, no init is polled by two callers at once,
//! a cancelled non-shared init is dropped with its caller, `loads_in_flight() == 0`,
//! `validate()`, and the stats ledger balances.
#![allow(clippy::type_complexity)]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use herdcache::{Cache, CompResult, Op};

const K: u64 = 7;
const J: u64 = 8;
/// What an `optionally_*` call that got `None` (a negative hit) returns here.
const NEG: u64 = 9999;

/// Shared bookkeeping of the inits of one case.
#[derive(Default)]
struct Track {
    /// Loads of key K started and neither finished nor dropped.
    live: AtomicI64,
    violations: Mutex<Vec<String>>,
    /// Values some init or insert produced.
    produced: Mutex<Vec<u64>>,
    /// The states of the async loader's inits.
    loader_inits: Mutex<Vec<Arc<InitState>>>,
    /// Wakers parked by inits that do not wake themselves (I/O).
    parked: Mutex<Vec<Waker>>,
}

impl Track {
    fn violate(&self, s: String) {
        self.violations.lock().unwrap().push(s);
    }
}

/// Per-init state visible after the init moved into the cache.
#[derive(Default)]
struct InitState {
    dropped: AtomicBool,
    in_poll: AtomicI64,
    polled_after_owner_drop: AtomicBool,
    owner_dropped: AtomicBool,
    started: AtomicBool,
}

struct Init {
    value: u64,
    left: u32,
    self_wake: bool,
    started: bool,
    done: bool,
    counts_as_load: bool,
    st: Arc<InitState>,
    t: Arc<Track>,
}

impl Init {
    fn new(t: &Arc<Track>, value: u64, k: u32, self_wake: bool) -> (Init, Arc<InitState>) {
        let st = Arc::new(InitState::default());
        (
            Init {
                value,
                left: k,
                self_wake,
                started: false,
                done: false,
                counts_as_load: true,
                st: st.clone(),
                t: t.clone(),
            },
            st,
        )
    }
}

impl Future for Init {
    type Output = u64;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let me = &mut *self;
        if me.st.in_poll.fetch_add(1, SeqCst) != 0 {
            me.t.violate(format!("init {} polled by two callers at once", me.value));
        }
        if me.st.owner_dropped.load(SeqCst) {
            me.st.polled_after_owner_drop.store(true, SeqCst);
        }
        assert!(!me.done, "init {} polled after Ready", me.value);
        if !me.started {
            me.started = true;
            me.st.started.store(true, SeqCst);
            if me.counts_as_load {
                let n = me.t.live.fetch_add(1, SeqCst) + 1;
                if n > 1 {
                    me.t.violate(format!(
                        "{n} loads of the key overlap (init {} started)",
                        me.value
                    ));
                }
            }
        }
        let r = if me.left == 0 {
            me.done = true;
            if me.counts_as_load {
                me.t.live.fetch_sub(1, SeqCst);
            }
            me.t.produced.lock().unwrap().push(me.value);
            Poll::Ready(me.value)
        } else {
            me.left -= 1;
            if me.self_wake {
                cx.waker().wake_by_ref();
            } else {
                me.t.parked.lock().unwrap().push(cx.waker().clone());
            }
            Poll::Pending
        };
        me.st.in_poll.fetch_sub(1, SeqCst);
        r
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        self.st.dropped.store(true, SeqCst);
        if self.started && !self.done && self.counts_as_load {
            self.t.live.fetch_sub(1, SeqCst);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum M {
    GetWith,
    TryGetWith,
    OptGetWith,
    GetWithByRef,
    TryGetWithByRef,
    OptGetWithByRef,
    GetWithShared,
    TryGetWithShared,
    OptGetWithShared,
    GetWithIfNever,
    GetWithIfAlways,
    OrInsertWith,
    OrInsertWithIf,
    OrOptInsertWith,
    OrTryInsertWith,
    AndCompute,
    AndTryCompute,
    AndUpsert,
    OrInsert,
    OrDefault,
    LoadAsync,
}

const ALL: [M; 21] = [
    M::GetWith,
    M::TryGetWith,
    M::OptGetWith,
    M::GetWithByRef,
    M::TryGetWithByRef,
    M::OptGetWithByRef,
    M::GetWithShared,
    M::TryGetWithShared,
    M::OptGetWithShared,
    M::GetWithIfNever,
    M::GetWithIfAlways,
    M::OrInsertWith,
    M::OrInsertWithIf,
    M::OrOptInsertWith,
    M::OrTryInsertWith,
    M::AndCompute,
    M::AndTryCompute,
    M::AndUpsert,
    M::OrInsert,
    M::OrDefault,
    M::LoadAsync,
];

impl M {
    fn shared(self) -> bool {
        matches!(
            self,
            M::GetWithShared | M::TryGetWithShared | M::OptGetWithShared
        )
    }
    fn has_init(self) -> bool {
        !matches!(self, M::OrInsert | M::OrDefault | M::LoadAsync)
    }
}

type Fut<'a> = Pin<Box<dyn Future<Output = u64> + 'a>>;

fn comp(r: CompResult<u64, u64>) -> u64 {
    match r {
        CompResult::Inserted(e) | CompResult::ReplacedWith(e) => *e.value(),
        other => panic!("a Put gave {:?}", matches!(other, CompResult::StillNone(_))),
    }
}

fn call<'a>(m: M, c: &'a Cache<u64, u64>, key: u64, init: Init) -> Fut<'a> {
    match m {
        M::GetWith => Box::pin(c.get_with_async(key, init)),
        M::TryGetWith => Box::pin(async move {
            c.try_get_with_async(key, async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
        }),
        M::OptGetWith => Box::pin(async move {
            c.optionally_get_with_async(key, async { Some(init.await) })
                .await
                .unwrap_or(NEG)
        }),
        M::GetWithByRef => Box::pin(async move { c.get_with_by_ref_async(&key, init).await }),
        M::TryGetWithByRef => Box::pin(async move {
            c.try_get_with_by_ref_async(&key, async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
        }),
        M::OptGetWithByRef => Box::pin(async move {
            c.optionally_get_with_by_ref_async(&key, async { Some(init.await) })
                .await
                .unwrap_or(NEG)
        }),
        M::GetWithShared => Box::pin(c.get_with_async_shared(key, init)),
        M::TryGetWithShared => Box::pin(async move {
            c.try_get_with_async_shared(key, async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
        }),
        M::OptGetWithShared => Box::pin(async move {
            c.optionally_get_with_async_shared(key, async { Some(init.await) })
                .await
                .unwrap_or(NEG)
        }),
        M::GetWithIfNever => Box::pin(c.get_with_if_async(key, init, |_| false)),
        M::GetWithIfAlways => Box::pin(c.get_with_if_async(key, init, |_| true)),
        M::OrInsertWith => {
            Box::pin(async move { *c.entry(key).or_insert_with_async(init).await.value() })
        }
        M::OrInsertWithIf => Box::pin(async move {
            *c.entry(key)
                .or_insert_with_if_async(init, |_| true)
                .await
                .value()
        }),
        M::OrOptInsertWith => Box::pin(async move {
            c.entry(key)
                .or_optionally_insert_with_async(async { Some(init.await) })
                .await
                .map_or(NEG, |e| *e.value())
        }),
        M::OrTryInsertWith => Box::pin(async move {
            *c.entry(key)
                .or_try_insert_with_async(async { Ok::<_, String>(init.await) })
                .await
                .unwrap()
                .value()
        }),
        M::AndCompute => Box::pin(async move {
            comp(
                c.entry(key)
                    .and_compute_with_async(|_| async { Op::Put(init.await) })
                    .await,
            )
        }),
        M::AndTryCompute => Box::pin(async move {
            comp(
                c.entry(key)
                    .and_try_compute_with_async(|_| async { Ok::<_, String>(Op::Put(init.await)) })
                    .await
                    .unwrap(),
            )
        }),
        M::AndUpsert => {
            Box::pin(async move { *c.entry(key).and_upsert_with_async(|_| init).await.value() })
        }
        M::OrInsert => {
            drop(init);
            Box::pin(async move { *c.entry(key).or_insert_async(3000).await.value() })
        }
        M::LoadAsync => {
            drop(init);
            Box::pin(async move { c.load_async(key).await.expect("load_async failed") })
        }
        M::OrDefault => {
            drop(init);
            Box::pin(async move { *c.entry(key).or_default_async().await.value() })
        }
    }
}

#[derive(Default)]
struct CountWaker(AtomicU64);
impl Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

struct Caller<'a> {
    name: &'static str,
    fut: Option<Fut<'a>>,
    cw: Arc<CountWaker>,
    waker: Waker,
    seen: u64,
    polls: u32,
    result: Option<u64>,
    /// Drop after this many polls (None: run to the end).
    drop_at: Option<u32>,
    init: Option<Arc<InitState>>,
    dropped_by_us: bool,
}

impl<'a> Caller<'a> {
    fn new(
        name: &'static str,
        fut: Fut<'a>,
        drop_at: Option<u32>,
        init: Option<Arc<InitState>>,
    ) -> Self {
        let cw = Arc::new(CountWaker::default());
        Caller {
            name,
            fut: Some(fut),
            waker: Waker::from(cw.clone()),
            cw,
            seen: 0,
            polls: 0,
            result: None,
            drop_at,
            init,
            dropped_by_us: false,
        }
    }
    fn live(&self) -> bool {
        self.fut.is_some()
    }
    fn runnable(&self) -> bool {
        self.live() && (self.polls == 0 || self.cw.0.load(SeqCst) > self.seen)
    }
    /// Polls once; returns true if it made progress (polled).
    fn step(&mut self) {
        if self.drop_at == Some(self.polls) {
            self.drop_now();
            return;
        }
        self.seen = self.cw.0.load(SeqCst);
        let mut cx = Context::from_waker(&self.waker);
        self.polls += 1;
        if let Poll::Ready(v) = self.fut.as_mut().unwrap().as_mut().poll(&mut cx) {
            self.result = Some(v);
            self.fut = None;
        }
    }
    fn drop_now(&mut self) {
        if let Some(st) = &self.init {
            st.owner_dropped.store(true, SeqCst);
        }
        self.fut = None;
        self.dropped_by_us = true;
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Alone,
    /// Another async caller of the same key (same method), polled in lockstep.
    Peer {
        peer_first: bool,
    },
    /// A blocking `get_with` of the key on another thread, started after the first poll.
    Blocking,
    /// Limit 1: a load of J whose init (after one yield) calls the method on K, in lockstep.
    NestedPeer {
        peer_first: bool,
    },
    /// Limit 1: the swept future is a load of J whose init calls the method on K; a top-level
    /// caller of K in lockstep.
    SweptOuter {
        peer_first: bool,
    },
    /// `insert` of the key after the given number of polls of the swept future, with a peer.
    InsertAt(u32),
    /// `invalidate` likewise.
    InvalidateAt(u32),
    /// A peer calling another method on the key, in lockstep (swept first).
    Mixed(M),
    /// Two peers; the first is dropped too, after `drop_peer_at` polls.
    TwoPeers {
        drop_peer_at: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Case {
    m: M,
    role: Role,
    k: u32,
    self_wake: bool,
    n: u32,
    prefill: Pre,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pre {
    Empty,
    Value,
    Negative,
}

static ABANDONED_MIDLOAD: AtomicU64 = AtomicU64::new(0);
static TAKEOVERS: AtomicU64 = AtomicU64::new(0);
static NEG_CHECKED: AtomicU64 = AtomicU64::new(0);

/// Outcome of one case: Err(finding); Ok(true) if the swept future completed before its drop
/// point (the sweep over N can stop).
fn run_case(cs: Case) -> Result<bool, String> {
    let t = Arc::new(Track::default());
    let limited = matches!(cs.role, Role::NestedPeer { .. } | Role::SweptOuter { .. });
    let mut b = Cache::<u64, u64>::builder()
        .max_capacity(1000)
        .record_stats();
    if limited {
        b = b.max_concurrent_loads(1);
    }
    {
        // The async loader (for `load_async`, shared loads): an init like the callers'.
        let (t2, k, w) = (t.clone(), cs.k, cs.self_wake);
        let next = Arc::new(AtomicU64::new(5000));
        b = b.async_loader(move |_k: &u64| {
            let (init, st) = Init::new(&t2, next.fetch_add(1, SeqCst), k, w);
            t2.loader_inits.lock().unwrap().push(st);
            async move { Ok::<u64, String>(init.await) }
        });
    }
    if cs.prefill == Pre::Negative {
        b = b.negative_ttl(Duration::from_secs(600));
    }
    let cache = Arc::new(b.build());
    let mut allowed: Vec<u64> = vec![3000, 0];
    match cs.prefill {
        Pre::Empty => {}
        Pre::Value => {
            cache.insert(K, 500);
            allowed.push(500);
        }
        Pre::Negative => {
            allowed.push(NEG);
            assert_eq!(cache.optionally_get_with(K, || None), None);
        }
    }
    let c: &Cache<u64, u64> = &cache;

    let (init, st) = Init::new(&t, 100, cs.k, cs.self_wake);
    let swept_fut: Fut<'_> = match cs.role {
        Role::SweptOuter { .. } => {
            let m = cs.m;
            let (mut outer_init_marker, _) = Init::new(&t, 0, 0, true);
            outer_init_marker.counts_as_load = false;
            Box::pin(c.get_with_async(J, async move {
                outer_init_marker.await;
                call(m, c, K, init).await
            }))
        }
        _ => call(cs.m, c, K, init),
    };
    let mut callers = vec![Caller::new(
        "swept",
        swept_fut,
        Some(cs.n),
        Some(st.clone()),
    )];
    match cs.role {
        Role::Mixed(pm) => {
            let (i2, s2) = Init::new(&t, 200, cs.k, cs.self_wake);
            callers.push(Caller::new(
                "mixed-peer",
                call(pm, c, K, i2),
                None,
                Some(s2),
            ));
        }
        Role::TwoPeers { drop_peer_at } => {
            let (i2, s2) = Init::new(&t, 200, cs.k, cs.self_wake);
            callers.push(Caller::new(
                "peer",
                call(cs.m, c, K, i2),
                Some(drop_peer_at),
                Some(s2),
            ));
            let (i3, s3) = Init::new(&t, 300, cs.k, cs.self_wake);
            callers.push(Caller::new("third", call(cs.m, c, K, i3), None, Some(s3)));
        }
        Role::Peer { .. } | Role::InsertAt(_) | Role::InvalidateAt(_) => {
            let (i2, s2) = Init::new(&t, 200, cs.k, cs.self_wake);
            callers.push(Caller::new("peer", call(cs.m, c, K, i2), None, Some(s2)));
        }
        Role::NestedPeer { .. } => {
            let m = cs.m;
            let (i2, s2) = Init::new(&t, 200, cs.k, cs.self_wake);
            let (mut y, _) = Init::new(&t, 0, 1, true);
            y.counts_as_load = false;
            let f: Fut<'_> = Box::pin(c.get_with_async(J, async move {
                y.await;
                call(m, c, K, i2).await
            }));
            callers.push(Caller::new("nested-peer", f, None, Some(s2)));
        }
        Role::SweptOuter { .. } => {
            let (i2, s2) = Init::new(&t, 200, cs.k, cs.self_wake);
            callers.push(Caller::new(
                "top-peer",
                call(cs.m, c, K, i2),
                None,
                Some(s2),
            ));
        }
        _ => {}
    }
    if matches!(
        cs.role,
        Role::Peer { peer_first: true }
            | Role::NestedPeer { peer_first: true }
            | Role::SweptOuter { peer_first: true }
    ) {
        callers.reverse();
    }

    let blocking_done = Arc::new(AtomicBool::new(false));
    let blocking_result = Arc::new(Mutex::new(None::<u64>));
    let mut blocking_started = false;
    let mut wrote = false;
    let swept_polls = |cl: &Vec<Caller>| cl.iter().find(|c| c.name == "swept").unwrap().polls;
    let swept_gone = |cl: &Vec<Caller>| !cl.iter().find(|c| c.name == "swept").unwrap().live();

    let mut stall_since: Option<Instant> = None;
    loop {
        // Writes between polls.
        if !wrote {
            let p = swept_polls(&callers);
            match cs.role {
                Role::InsertAt(a) if p >= a || swept_gone(&callers) => {
                    wrote = true;
                    t.produced.lock().unwrap().push(1000);
                    cache.insert(K, 1000);
                }
                Role::InvalidateAt(a) if p >= a || swept_gone(&callers) => {
                    wrote = true;
                    cache.invalidate(&K);
                }
                _ => {}
            }
        }
        if cs.role == Role::Blocking
            && !blocking_started
            && (swept_polls(&callers) >= 1 || swept_gone(&callers))
        {
            blocking_started = true;
            let (cache2, t2, done2, res2) = (
                cache.clone(),
                t.clone(),
                blocking_done.clone(),
                blocking_result.clone(),
            );
            std::thread::spawn(move || {
                let v = cache2.get_with(K, || {
                    let n = t2.live.fetch_add(1, SeqCst) + 1;
                    if n > 1 {
                        t2.violate(format!(
                            "{n} loads of the key overlap (blocking init started)"
                        ));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    t2.produced.lock().unwrap().push(2000);
                    t2.live.fetch_sub(1, SeqCst);
                    2000
                });
                *res2.lock().unwrap() = Some(v);
                done2.store(true, SeqCst);
            });
            // Let it register (scheduling only: nothing asserts on time).
            std::thread::sleep(Duration::from_micros(300));
        }
        let any_live = callers.iter().any(|c| c.live());
        let blocking_pending = blocking_started && !blocking_done.load(SeqCst);
        if !any_live && !blocking_pending {
            break;
        }
        let mut progressed = false;
        for i in 0..callers.len() {
            let cl = &mut callers[i];
            if cl.live() && (cl.runnable() || cl.drop_at == Some(cl.polls)) {
                let was_swept = cl.name == "swept";
                let mid = cl.drop_at == Some(cl.polls)
                    && st.started.load(SeqCst)
                    && !st.dropped.load(SeqCst);
                cl.step();
                if was_swept && cl.dropped_by_us && mid {
                    ABANDONED_MIDLOAD.fetch_add(1, SeqCst);
                }
                progressed = true;
                if was_swept
                    && cl.dropped_by_us
                    && (!cs.m.shared() || !callers.iter().any(|c| c.live()))
                {
                    // A cancelled init goes with its caller (non-shared always; shared when no
                    // async caller is left interested).
                    if cs.m.has_init()
                        && !st.dropped.load(SeqCst)
                        && !matches!(cs.role, Role::SweptOuter { .. })
                    {
                        return Err("swept init not dropped with its caller".to_string());
                    }
                }
            }
        }
        if progressed {
            stall_since = None;
            continue;
        }
        // Nothing runnable: complete parked I/O.
        let parked: Vec<Waker> = std::mem::take(&mut *t.parked.lock().unwrap());
        if !parked.is_empty() {
            for w in parked {
                w.wake();
            }
            continue;
        }
        let since = *stall_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(5) {
            let live: Vec<_> = callers
                .iter()
                .filter(|c| c.live())
                .map(|c| {
                    format!(
                        "{} (polls {}, wakes {}, seen {})",
                        c.name,
                        c.polls,
                        c.cw.0.load(SeqCst),
                        c.seen
                    )
                })
                .collect();
            return Err(format!(
                "stranded: no caller woken for 5 s; live async {live:?}, blocking pending {blocking_pending}"
            ));
        }
        std::thread::sleep(Duration::from_micros(50));
    }

    for cl in &callers {
        if let Some(s2) = &cl.init {
            if cl.name != "swept" && s2.started.load(SeqCst) && callers[0].dropped_by_us {
                TAKEOVERS.fetch_add(1, SeqCst);
            }
            if cs.m.has_init() && !s2.dropped.load(SeqCst) {
                return Err(format!("{}'s init still alive after every caller finished or was dropped (leaked / kept by the cache)", cl.name));
            }
        }
    }
    for (i, s2) in t.loader_inits.lock().unwrap().iter().enumerate() {
        if !s2.dropped.load(SeqCst) {
            return Err(format!(
                "async loader's future #{i} still alive after every caller finished or was dropped"
            ));
        }
    }
    let produced = t.produced.lock().unwrap().clone();
    allowed.extend(produced.iter().copied());
    let mut swept_completed = false;
    for cl in &callers {
        if cl.name == "swept" && cl.result.is_some() {
            swept_completed = true;
        }
        if let Some(v) = cl.result {
            if !allowed.contains(&v) {
                return Err(format!("{} got {v}, produced only {allowed:?}", cl.name));
            }
        } else if !cl.dropped_by_us {
            return Err(format!("{} neither finished nor dropped", cl.name));
        }
        if let Some(st) = &cl.init {
            if st.polled_after_owner_drop.load(SeqCst)
                && !cs.m.shared()
                && !matches!(cs.role, Role::SweptOuter { .. })
            {
                return Err(format!(
                    "{}'s init polled after its caller was dropped",
                    cl.name
                ));
            }
        }
    }
    if let Some(v) = *blocking_result.lock().unwrap() {
        if !allowed.contains(&v) {
            return Err(format!(
                "blocking get_with got {v}, produced only {allowed:?}"
            ));
        }
    }
    let v = t.violations.lock().unwrap().clone();
    if !v.is_empty() {
        return Err(format!("violations: {v:?}"));
    }
    if t.live.load(SeqCst) != 0 {
        return Err(format!("live loads left: {}", t.live.load(SeqCst)));
    }
    if cache.loads_in_flight() != 0 {
        return Err(format!(
            "loads_in_flight() == {} once all are done",
            cache.loads_in_flight()
        ));
    }
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.validate())) {
        return Err(format!("validate: {}", common::panic_message(&*p)));
    }
    let s = cache.stats();
    let lhs = s.misses + s.refreshes_started;
    let rhs =
        s.load_successes + s.load_failures + s.loads_abandoned + s.coalesced + s.negative_hits;
    if lhs != rhs {
        return Err(format!(
            "ledger: misses {} + refreshes_started {} != successes {} + failures {} + abandoned {} + coalesced {} + negative_hits {}",
            s.misses, s.refreshes_started, s.load_successes, s.load_failures, s.loads_abandoned, s.coalesced, s.negative_hits
        ));
    }
    if let Some(g) = cache.get(&K) {
        if !allowed.contains(&g) {
            return Err(format!("cached {g}, produced only {allowed:?}"));
        }
    }
    if cs.prefill == Pre::Negative
        && cs.role == Role::Alone
        && callers[0].dropped_by_us
        && st.started.load(SeqCst)
        && cs.m.has_init()
    {
        // A cancelled load leaves the key as it was: the negative entry (still live) stays.
        NEG_CHECKED.fetch_add(1, SeqCst);
        let r = cache.optionally_get_with(K, || Some(4001));
        if r.is_some() {
            return Err(format!(
                "negative entry gone after a cancelled load: optionally_get_with loaded {r:?}"
            ));
        }
    }
    // The key is usable afterwards: a fresh load completes.
    let after = futures::executor::block_on(cache.get_with_async(K, async { 4000 }));
    if !allowed.contains(&after) && after != 4000 {
        return Err(format!("after the case, get_with_async gave {after}"));
    }
    if cache.loads_in_flight() != 0 {
        return Err("loads_in_flight() != 0 after a final load".into());
    }
    Ok(swept_completed)
}

fn sweep(methods: &[M], roles: &[Role], prefills: &[Pre]) -> (usize, Vec<String>) {
    let mut cases = 0;
    let mut fails = Vec::new();
    for &m in methods {
        for &role in roles {
            for &prefill in prefills {
                for k in [0u32, 1, 3] {
                    for self_wake in [true, false] {
                        if k == 0 && !self_wake {
                            continue;
                        }
                        for n in 0..40u32 {
                            let cs = Case {
                                m,
                                role,
                                k,
                                self_wake,
                                n,
                                prefill,
                            };
                            cases += 1;
                            match run_case(cs) {
                                Ok(true) => break,
                                Ok(false) => {}
                                Err(e) => {
                                    fails.push(format!("{cs:?}: {e}"));
                                    break; // one failure per (method, role, prefill, k, wake)
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (cases, fails)
}

fn report(what: &str, (cases, fails): (usize, Vec<String>)) {
    eprintln!(
        "{what}: {cases} cases, {} failures (so far: {} mid-load drops, {} takeovers, {} negative checks)",
        fails.len(),
        ABANDONED_MIDLOAD.load(SeqCst),
        TAKEOVERS.load(SeqCst),
        NEG_CHECKED.load(SeqCst)
    );
    for f in fails.iter().take(40) {
        eprintln!("  FAIL {f}");
    }
    assert!(
        fails.is_empty(),
        "{what}: {} of {cases} cases failed; first: {}",
        fails.len(),
        fails[0]
    );
}

#[test]
fn sweep_alone_and_lockstep_peer() {
    let _w = common::watchdog(Duration::from_secs(120), "sweep_alone_and_lockstep_peer");
    report(
        "alone+peer",
        sweep(
            &ALL,
            &[
                Role::Alone,
                Role::Peer { peer_first: false },
                Role::Peer { peer_first: true },
            ],
            &[Pre::Empty, Pre::Value, Pre::Negative],
        ),
    );
}

#[test]
fn sweep_blocking_other_thread() {
    let _w = common::watchdog(Duration::from_secs(120), "sweep_blocking_other_thread");
    report(
        "blocking",
        sweep(
            &ALL,
            &[Role::Blocking],
            &[Pre::Empty, Pre::Value, Pre::Negative],
        ),
    );
}

#[test]
fn sweep_nested_limit_one() {
    let _w = common::watchdog(Duration::from_secs(120), "sweep_nested_limit_one");
    report(
        "nested",
        sweep(
            &ALL,
            &[
                Role::NestedPeer { peer_first: false },
                Role::NestedPeer { peer_first: true },
                Role::SweptOuter { peer_first: false },
                Role::SweptOuter { peer_first: true },
            ],
            &[Pre::Empty, Pre::Negative],
        ),
    );
}

#[test]
fn sweep_insert_invalidate_between_polls() {
    let _w = common::watchdog(
        Duration::from_secs(120),
        "sweep_insert_invalidate_between_polls",
    );
    report(
        "writes",
        sweep(
            &ALL,
            &[
                Role::InsertAt(0),
                Role::InsertAt(1),
                Role::InsertAt(2),
                Role::InvalidateAt(1),
                Role::InvalidateAt(2),
            ],
            &[Pre::Empty, Pre::Value, Pre::Negative],
        ),
    );
}

#[test]
fn sweep_mixed_and_two_peers() {
    let _w = common::watchdog(Duration::from_secs(120), "sweep_mixed_and_two_peers");
    report(
        "mixed+two-peers",
        sweep(
            &ALL,
            &[
                Role::Mixed(M::GetWith),
                Role::Mixed(M::GetWithShared),
                Role::Mixed(M::AndCompute),
                Role::Mixed(M::GetWithIfAlways),
                Role::TwoPeers { drop_peer_at: 1 },
                Role::TwoPeers { drop_peer_at: 2 },
                Role::TwoPeers { drop_peer_at: 4 },
            ],
            &[Pre::Empty, Pre::Value, Pre::Negative],
        ),
    );
}
