//! Round 46: attacks on the permit lent up a chain of shared loads (public API only).

mod common;

use common::hand::{assert_permits_back, limited, run, shared, BoxFut, Door, Gauge, C};
use common::watchdog;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// A door whose opening wakes every future waiting at it.
#[derive(Clone, Default)]
struct WakeDoor(Arc<std::sync::Mutex<(bool, Vec<std::task::Waker>)>>);

impl WakeDoor {
    fn open(&self) {
        let ws = {
            let mut g = self.0.lock().unwrap();
            g.0 = true;
            std::mem::take(&mut g.1)
        };
        for w in ws {
            w.wake();
        }
    }
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let d = self.0.clone();
        std::future::poll_fn(move |cx| {
            let mut g = d.lock().unwrap();
            if g.0 {
                Poll::Ready(())
            } else {
                g.1.push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

fn wait_flag(f: &AtomicBool) {
    while !f.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
}

/// An init that awaits `inner` and, on each poll while `inner` is pending, does a short
/// section of its own work (entered in `gauge`): user code running beside the nested wait.
struct WorkWhile {
    inner: BoxFut<u64>,
    gauge: Gauge,
}

impl Future for WorkWhile {
    type Output = u64;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        if let Poll::Ready(v) = self.inner.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        {
            let _g = self.gauge.guard();
            std::thread::sleep(Duration::from_millis(15));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Limit 1. Two shared parents X1, X2 both await the same nested shared load F. A blocking
/// holder H lends its permit to F. Two outside callers (no permit) poll X1 and X2 on two
/// threads: both polls find H's permit below them; they must not run user code at the same
/// time under that single permit.
#[test]
fn two_parents_do_not_run_at_once_under_one_lent_permit() {
    let _w = watchdog(Duration::from_secs(60), "two parents under one lent permit");
    let c = limited(1);
    let gauge = Gauge::default();
    let door = Door::default();
    let mk_x = |c: &C, gauge: &Gauge| {
        let d = door.clone();
        let f = shared(c, 20, async move {
            d.wait().await;
            20
        });
        WorkWhile {
            inner: f,
            gauge: gauge.clone(),
        }
    };
    let (x1, x2) = (mk_x(&c, &gauge), mk_x(&c, &gauge));
    let c1 = c.clone();
    let mut a = shared(&c, 1, async move {
        let (a, b) = futures::future::join(
            c1.get_with_async_shared(10, x1),
            c1.get_with_async_shared(11, x2),
        )
        .await;
        a + b
    });
    assert!(run(&mut a, 2).is_none(), "A waits at the door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            c2.get_with(20, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b1 = shared(&c, 10, async { 777 });
    let mut b2 = shared(&c, 11, async { 777 });
    assert!(run(&mut b1, 1).is_none());
    assert!(run(&mut b2, 1).is_none());
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    let before = gauge.max();
    assert_eq!(before, 1, "A ran X1 and X2 one at a time");
    let t1 = std::thread::spawn(move || common::hand::run_to_end(&mut b1));
    let t2 = std::thread::spawn(move || common::hand::run_to_end(&mut b2));
    std::thread::sleep(Duration::from_millis(400));
    door.open();
    assert_eq!(t1.join().unwrap(), Ok(20));
    assert_eq!(t2.join().unwrap(), Ok(20));
    assert_eq!(h.join().unwrap(), 20);
    assert!(
        gauge.max() <= 1,
        "limit 1, but {} parents' inits ran at once under H's one lent permit",
        gauge.max()
    );
    assert_permits_back(&c, 9_999, "after two parents");
}

/// Limit 1. X (shared, polled by an outside caller B with no permit) awaits nested F, then a
/// borrowing `get_with_async` Y. H (blocking holder) lends its permit to F; B's poll of X runs
/// under it, F ends, and Y starts in that same poll — under H's lent permit. H then goes on
/// and finishes. Y (and so X and B) must still finish afterwards, and the permit come back.
#[test]
fn borrowing_load_started_under_a_permit_lent_through_the_chain() {
    let _w = watchdog(
        Duration::from_secs(60),
        "borrowing load under a lent permit",
    );
    let c = limited(1);
    let (door, door_y) = (Door::default(), Door::default());
    let gauge = Gauge::default();
    let (c1, d, dy, g) = (c.clone(), door.clone(), door_y.clone(), gauge.clone());
    let x_init = async move {
        let f = c1
            .get_with_async_shared(20, async move {
                d.wait().await;
                20
            })
            .await;
        let g2 = g.clone();
        let y = c1
            .get_with_async(30, async move {
                loop {
                    {
                        let _g = g2.guard();
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if dy.is_open() {
                        break;
                    }
                    common::Yield(1).await;
                }
                30
            })
            .await;
        f + y
    };
    let c0 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c0.get_with_async_shared(10, x_init).await },
    );
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    let (c2, h_in, h_after) = (
        c.clone(),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (hf, ha, hg) = (h_in.clone(), h_after.clone(), gauge.clone());
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            let v = c2.get_with(20, || 999);
            // H's own work after its wait, under its own permit.
            let _g = hg.guard();
            std::thread::sleep(Duration::from_millis(50));
            ha.store(true, Ordering::SeqCst);
            v
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    door.open();
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    // Poll B until H has finished its loader (Y running meanwhile, if it can).
    let mut done = None;
    while !h_after.load(Ordering::SeqCst) {
        if let Some(r) = run(&mut b, 1) {
            done = Some(r);
            break;
        }
        std::thread::yield_now();
    }
    assert!(done.is_none(), "Y waits at its door");
    let hv = common::within(Duration::from_secs(10), move || h.join().unwrap());
    assert!(
        matches!(hv, Some(Ok(20))),
        "H finished with F's value: {hv:?}"
    );
    let beside = gauge.max();
    door_y.open();
    let mut out = None;
    for _ in 0..200 {
        out = run(&mut b, 10);
        if out.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let fresh = run(&mut shared(&c, 9_998, async { 1 }), 50);
    assert_eq!(
        out,
        Some(Ok(50)),
        "B (and X, and the borrowing Y inside it) never finished after H left \
         (a fresh load of another key afterwards: {fresh:?}; Y's init beside H's: {beside})"
    );
    assert!(
        beside <= 1,
        "limit 1, but Y's init ran beside H's loader ({beside} at once)"
    );
    assert_permits_back(&c, 9_999, "after the borrowing load");
}

/// Reduction of the two-parents case to one chain: X awaits nested F; both do a section of
/// their own work on each poll while waiting. B polls X, C polls F directly (neither holds a
/// permit); H, the only permit's holder, waits for F (lends). The polls of X (lent through
/// the chain) and of F (lent directly) must not run user code at once.
#[test]
fn parent_and_child_do_not_run_at_once_under_one_lent_permit() {
    let _w = watchdog(
        Duration::from_secs(60),
        "parent and child under one lent permit",
    );
    let c = limited(1);
    let gauge = Gauge::default();
    let door = Door::default();
    let (d, g) = (door.clone(), gauge.clone());
    let f_init = WorkWhile {
        inner: Box::pin(async move {
            d.wait().await;
            20
        }),
        gauge: g,
    };
    let x_init = WorkWhile {
        inner: shared(&c, 20, f_init),
        gauge: gauge.clone(),
    };
    let c1 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c1.get_with_async_shared(10, x_init).await },
    );
    assert!(run(&mut a, 2).is_none(), "A waits at the door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            c2.get_with(20, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    let mut cc = shared(&c, 20, async { 888 });
    assert!(run(&mut b, 1).is_none());
    assert!(run(&mut cc, 1).is_none());
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(gauge.max(), 1, "A ran X and F one at a time");
    let t1 = std::thread::spawn(move || common::hand::run_to_end(&mut b));
    let t2 = std::thread::spawn(move || common::hand::run_to_end(&mut cc));
    std::thread::sleep(Duration::from_millis(400));
    door.open();
    assert_eq!(t1.join().unwrap(), Ok(20));
    assert_eq!(t2.join().unwrap(), Ok(20));
    assert_eq!(h.join().unwrap(), 20);
    assert!(
        gauge.max() <= 1,
        "limit 1, but X's and F's inits ran at once ({}) under H's one lent permit",
        gauge.max()
    );
    assert_permits_back(&c, 9_999, "after parent and child");
}

/// No chain, a lender with a timeout: F (shared; started under A's permit, A then cancelled;
/// polled by B, no permit) starts a borrowing Y in a poll run under the permit that H lends
/// while it waits (`load_with_timeout`). H's wait times out, H leaves and finishes its load.
/// F (hence Y) must still finish, and the permit come back.
#[test]
fn borrowing_load_under_a_lent_permit_whose_lender_timed_out() {
    let _w = watchdog(Duration::from_secs(60), "borrowing load, lender timed out");
    let c = with_loader(Some(1));
    let (door, door_y) = (Door::default(), Door::default());
    let (c1, d, dy) = (c.clone(), door.clone(), door_y.clone());
    let f_init = async move {
        d.wait().await;
        let y = c1
            .get_with_async(30, async move {
                dy.wait().await;
                30
            })
            .await;
        y + 20
    };
    let mut f = shared(&c, 20, f_init);
    let mut a: BoxFut<u64> = Box::pin({
        let c = c.clone();
        async move {
            c.get_with_async(1, async move {
                common::hand::poll_once(&mut f).await;
                std::future::pending::<()>().await;
                1
            })
            .await
        }
    });
    assert!(
        run(&mut a, 2).is_none(),
        "A holds the permit, F at its door"
    );
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            let r = c2.load_with_timeout(20, Some(Duration::from_millis(200)));
            assert!(r.is_err(), "H's wait timed out: {r:?}");
            2
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 20, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for F");
    door.open();
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    // Poll B while H waits (Y starts under H's lent permit), until H is done.
    while !h.is_finished() {
        assert!(run(&mut b, 1).is_none(), "Y waits at its door");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.join().unwrap(), 2);
    door_y.open();
    let mut out = None;
    for _ in 0..200 {
        out = run(&mut b, 10);
        if out.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let fresh = run(&mut shared(&c, 9_998, async { 1 }), 50);
    assert_eq!(
        out,
        Some(Ok(50)),
        "F (and the borrowing Y in it) never finished after its lender timed out \
         (a fresh load of another key afterwards: {fresh:?})"
    );
    assert_permits_back(&c, 9_999, "after the timed-out lender");
}

fn with_loader(limit: Option<usize>) -> C {
    let b = herdcache::Cache::builder()
        .max_capacity(1_000)
        .loader(|k: &u64| Ok::<u64, herdcache::BoxError>(*k + 1_000));
    match limit {
        Some(n) => b.max_concurrent_loads(n).build(),
        None => b.build(),
    }
}

/// `load` is documented single-flight "with every other load of the key (blocking or
/// async)": a `load` of a key whose shared async load is in flight must get that load's value
/// (its own loader never runs). No limit here.
#[test]
fn load_joins_an_in_flight_shared_load_without_limit() {
    let _w = watchdog(Duration::from_secs(30), "load joins shared (no limit)");
    let c = with_loader(None);
    let door = Door::default();
    let d = door.clone();
    let mut b = shared(&c, 20, async move {
        d.wait().await;
        20
    });
    assert!(run(&mut b, 3).is_none());
    let c2 = c.clone();
    let t = common::start(move || c2.load_with_timeout(20, Some(Duration::from_millis(300))));
    std::thread::sleep(Duration::from_millis(50));
    door.open();
    let out = common::hand::run_to_end(&mut b);
    assert_eq!(out, Ok(20));
    let r = t
        .wait(Duration::from_secs(10))
        .expect("load returned")
        .expect("no panic");
    assert!(
        matches!(r, Ok(20)),
        "load ran its own loader beside the in-flight shared load: {r:?}"
    );
}

/// As above, with limit 1: the in-flight shared load F is queued for the permit that the
/// caller of `load_with_timeout` (a loader H) holds. H must join F (lending its permit), not
/// run its own loader for the key beside F.
#[test]
fn load_and_a_queued_shared_load_agree_on_one_value() {
    let _w = watchdog(Duration::from_secs(30), "load joins queued shared");
    let c = with_loader(Some(1));
    let (c2, h_in, go) = (
        c.clone(),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (hf, hg) = (h_in.clone(), go.clone());
    let h = std::thread::spawn(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            wait_flag(&hg);
            match c2.load_with_timeout(20, Some(Duration::from_secs(5))) {
                Ok(v) => v,
                Err(e) => panic!("H's load failed: {e:?}"),
            }
        })
    });
    wait_flag(&h_in);
    let mut b = shared(&c, 20, async { 20 });
    assert!(run(&mut b, 3).is_none(), "F queued behind H");
    go.store(true, Ordering::SeqCst);
    let out = common::hand::run_to_end(&mut b);
    let hv = h.join().unwrap();
    // H takes the queued load over (its loader's value) or joins it: one value for both.
    assert_eq!(out, Ok(hv), "one load of key 20, one value");
}

/// No lender at all: A (top level, holds the permit) polls shared X, whose init awaits a
/// borrowing `get_with_async` Y (started under A's permit). A is cancelled; B (no permit)
/// still waits for X. X (hence Y) must finish once Y's door opens, and the permit come back.
#[test]
fn borrowing_load_in_a_shared_parent_whose_poller_was_cancelled() {
    let _w = watchdog(
        Duration::from_secs(60),
        "borrowing in shared, poller cancelled",
    );
    let c = limited(1);
    let door = Door::default();
    let (c1, d) = (c.clone(), door.clone());
    let x_init = async move {
        c1.get_with_async(30, async move {
            d.wait().await;
            30
        })
        .await
            + 10
    };
    let c0 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c0.get_with_async_shared(10, x_init).await },
    );
    assert!(
        run(&mut a, 3).is_none(),
        "A holds the permit, Y at its door"
    );
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    drop(a);
    door.open();
    let out = run(&mut b, 1_000);
    let fresh = run(&mut shared(&c, 9_998, async { 1 }), 50);
    assert_eq!(
        out,
        Some(Ok(40)),
        "B never got X's value (a fresh load of another key afterwards: {fresh:?})"
    );
    assert_permits_back(&c, 9_999, "after the cancelled poller");
}

fn val(k: u64) -> u64 {
    k * 10 + 7
}

/// A shared load of `k` whose init awaits a chain of nested shared loads (one per level below
/// `k`'s level, keys chosen by `pick`), then does a gauged section of its own.
fn chain(c: C, level: u64, gauge: Gauge, pick: u64, yields: u32) -> BoxFut<u64> {
    let k = level * 10 + pick % 3;
    let borrow_mask = if std::env::var("S46_NO_BORROW").is_ok() {
        0
    } else {
        pick >> 40
    };
    Box::pin(async move {
        let c1 = c.clone();
        let g = gauge.clone();
        let init = async move {
            if level < 4 {
                let v = chain(c1, level + 1, g.clone(), pick / 3, yields).await;
                assert_eq!(v, val((level + 1) * 10 + (pick / 3) % 3), "nested value");
            }
            for _ in 0..yields {
                common::Yield(1).await;
            }
            {
                let _g = g.guard();
                std::thread::sleep(Duration::from_micros(500));
            }
            val(k)
        };
        // Some levels (by `pick`'s high bits) load with a borrowing `get_with_async`.
        if borrow_mask >> level & 1 == 1 {
            c.get_with_async(k, init).await
        } else {
            c.get_with_async_shared(k, init).await
        }
    })
}

/// Tokio (2 workers): chains of shared loads of random depth, some cut off by a short
/// timeout; blocking lenders (`spawn_blocking`) holding a permit and waiting for a key of a
/// chain (sync `get_with` inside their loader). Limit 1 or 2. Every call must finish with its
/// key's value, user sections never exceed the limit, and the permits come back.
#[test]
fn chains_and_blocking_lenders_sweep_on_tokio() {
    let _w = watchdog(
        Duration::from_secs(240),
        "chains and lenders sweep on tokio",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let seed = std::env::var("S46_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_4646u64);
    let mut r = common::rng(seed);
    let mut worst = 0;
    for round in 0..300u64 {
        let n = 1 + (r() % 2) as usize;
        let c = limited(n);
        let gauge = Gauge::default();
        let mut tasks = Vec::new();
        for t in 0..(4 + r() % 6) {
            let (c, g) = (c.clone(), gauge.clone());
            let (level, pick, yields, cut) = (1 + r() % 3, r(), (r() % 6) as u32, r() % 3 == 0);
            let lend = r() % 3 == 0;
            let r_cut = r() % 1_500;
            let outer = 1_000 + round * 100 + t;
            if lend {
                tasks.push(rt.spawn_blocking(move || {
                    let v = c.get_with(outer, || {
                        {
                            let _g = g.guard();
                            std::thread::sleep(Duration::from_micros(300));
                        }
                        let k = level * 10 + pick % 3;
                        let v = c.get_with(k, || {
                            let _g = g.guard();
                            val(k)
                        });
                        assert_eq!(v, val(k), "lender's nested value");
                        val(outer)
                    });
                    assert_eq!(v, val(outer));
                }));
            } else {
                tasks.push(rt.spawn(async move {
                    let f = chain(c.clone(), level, g, pick, yields);
                    let k = level * 10 + pick % 3;
                    if cut {
                        let _ = tokio::time::timeout(Duration::from_micros(100 + r_cut), f).await;
                    } else {
                        assert_eq!(f.await, val(k), "chain value");
                    }
                }));
            }
        }
        let done = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), async {
                let mut errs = Vec::new();
                for t in tasks {
                    if let Err(e) = t.await {
                        errs.push(format!("{e:?}"));
                    }
                }
                errs
            })
            .await
        });
        let errs = done.unwrap_or_else(|_| panic!("round {round} (limit {n}): hung"));
        assert!(errs.is_empty(), "round {round}: task failed: {errs:?}");
        worst = worst.max(gauge.max());
        assert!(
            gauge.max() <= n,
            "round {round}: limit {n}, but {} user sections ran at once",
            gauge.max()
        );
        assert_permits_back(&c, 99_999, "after a sweep round");
    }
    assert!(worst >= 1);
}

/// A blocking lender H waits for F (started under A's permit, A cancelled); F's only async
/// caller is B, directly (`depth` 0) or through parents X.. (`depth` 1..). B is then
/// cancelled too: H is the last one waiting for F, and must not wait forever.
fn lender_left_alone(depth: u64) {
    let _w = watchdog(Duration::from_secs(60), "lender left alone");
    let c = limited(1);
    let door = Door::default();
    let innermost = 10 + depth;
    let d = door.clone();
    let mut fut: BoxFut<u64> = Box::pin(async move {
        d.wait().await;
        innermost
    });
    for k in (10..innermost).rev() {
        let c1 = c.clone();
        let child = fut;
        fut = Box::pin(async move { c1.get_with_async_shared(k + 1, child).await - 1 });
    }
    let c1 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c1.get_with_async_shared(10, fut).await },
    );
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    let c2 = c.clone();
    let h = common::start(move || c2.get_with(2, || c2.get_with(innermost, || 999)));
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    drop(a);
    std::thread::sleep(Duration::from_millis(50));
    assert!(run(&mut b, 3).is_none(), "B waits (door shut)");
    drop(b);
    door.open();
    let hv = h.wait(Duration::from_secs(10));
    assert!(
        matches!(hv, Some(Ok(v)) if v == innermost || v == 999),
        "H (waiting for key {innermost}, its only async caller cancelled) never finished: {hv:?}"
    );
    assert_permits_back(&c, 9_999, "after the lender left alone");
}

#[test]
fn lender_left_alone_direct() {
    lender_left_alone(0);
}

#[test]
fn lender_left_alone_through_a_parent() {
    lender_left_alone(1);
}

#[test]
fn lender_left_alone_through_two_parents() {
    lender_left_alone(2);
}

/// The chain of `lent_permit_chain`, with an injected panic in F's init (`at_f`) or in X's
/// init after F ended (`!at_f`), in a poll by B that runs under H's lent permit. H must finish
/// (a value or a panic of its own), B must get the panic, and the permit come back.
fn panic_in_lent_chain(at_f: bool) {
    common::quiet_injected_panics();
    let _w = watchdog(Duration::from_secs(60), "panic in a lent chain");
    let c = limited(1);
    let door = Door::default();
    let d = door.clone();
    let f_init = async move {
        d.wait().await;
        if at_f {
            panic!("injected in F");
        }
        20
    };
    let c1 = c.clone();
    let x_init = async move {
        let v = c1.get_with_async_shared(20, f_init).await;
        if !at_f {
            panic!("injected in X");
        }
        v
    };
    let c0 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c0.get_with_async_shared(10, x_init).await },
    );
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let h = common::start(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            c2.get_with(20, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    door.open();
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    let out = run(&mut b, 1_000);
    assert!(matches!(out, Some(Err(_))), "B gets the panic: {out:?}");
    let hv = h.wait(Duration::from_secs(10));
    let ok = match &hv {
        Some(Ok(v)) => *v == 999 || *v == 20,
        Some(Err(_)) => true,
        None => false,
    };
    assert!(
        ok,
        "H never finished (or a wrong value): {:?}",
        hv.map(|r| r.map_err(|p| common::panic_message(&*p)))
    );
    assert_permits_back(&c, 9_999, "after a panic in the chain");
    // The key F loads again (nothing stranded).
    let mut again = shared(&c, 20, async { 21 });
    let v = run(&mut again, 50);
    assert!(
        matches!(v, Some(Ok(20 | 21 | 999))),
        "key 20 after the panic: {v:?}"
    );
}

#[test]
fn panic_in_the_nested_load_run_under_a_lent_permit() {
    panic_in_lent_chain(true);
}

#[test]
fn panic_in_the_parent_run_under_a_lent_permit() {
    panic_in_lent_chain(false);
}

/// Limit 1, a lender whose wait ends (soft timeout) while a poll of the parent runs under
/// its permit: X (shared, started under A's permit, A cancelled) does a gauged section on
/// each poll while its nested F waits at a shut door; B polls X (no permit) in a loop; H
/// holds the permit and waits for F with `load_with_timeout(100 ms)`, then does a gauged
/// section of its own. X's sections (under H's lent permit) and H's must never overlap.
#[test]
fn lender_timing_out_while_a_parent_poll_runs_under_its_permit() {
    let _w = watchdog(Duration::from_secs(60), "lender times out mid parent poll");
    let c = with_loader(Some(1));
    let gauge = Gauge::default();
    let door = Door::default();
    let d = door.clone();
    let f = shared(&c, 20, async move {
        d.wait().await;
        20
    });
    let x_init = WorkWhile {
        inner: f,
        gauge: gauge.clone(),
    };
    let c0 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c0.get_with_async_shared(10, x_init).await },
    );
    assert!(run(&mut a, 2).is_none(), "A waits at the door");
    let (c2, h_in, g) = (c.clone(), Arc::new(AtomicBool::new(false)), gauge.clone());
    let hf = h_in.clone();
    let h = common::start(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            let r = c2.load_with_timeout(20, Some(Duration::from_millis(100)));
            let _g = g.guard();
            std::thread::sleep(Duration::from_millis(40));
            assert!(r.is_err(), "F cannot have ended: {r:?}");
            2
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 1).is_none(), "B waits for X");
    drop(a);
    wait_flag(&h_in);
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let poller = std::thread::spawn(move || {
        while !st.load(Ordering::SeqCst) {
            if run(&mut b, 1).is_some() {
                return Some(b);
            }
        }
        Some(b)
    });
    let hv = h.wait(Duration::from_secs(10));
    assert!(matches!(hv, Some(Ok(2))), "H finished: {:?}", hv.is_some());
    stop.store(true, Ordering::SeqCst);
    let mut b = poller.join().unwrap().unwrap();
    assert!(
        gauge.max() <= 1,
        "limit 1, but X's poll under H's lent permit ran beside H ({} at once)",
        gauge.max()
    );
    door.open();
    let out = run(&mut b, 1_000);
    assert_eq!(out, Some(Ok(20)), "B gets X's value");
    assert_permits_back(&c, 9_999, "after the timed-out lender");
}

/// The chain of `lent_permit_chain` (depth `depth`), with B driven by
/// `futures::executor::block_on` on its own thread (real wake-ups, no busy polling): when H
/// starts lending its permit to F, B (parked, queued for a permit for X) must be woken.
fn lend_through_with_block_on(depth: u64, open_late: bool) {
    let _w = watchdog(Duration::from_secs(60), "lend through a chain, block_on");
    let c = limited(1);
    let door = Door::default();
    let innermost = 10 + depth;
    let d = door.clone();
    // The innermost load waits at a door that wakes its waker when it opens.
    let waker_slot: Arc<std::sync::Mutex<Option<std::task::Waker>>> = Default::default();
    let ws = waker_slot.clone();
    let mut fut: BoxFut<u64> = Box::pin(std::future::poll_fn(move |cx| {
        if d.is_open() {
            Poll::Ready(innermost)
        } else {
            *ws.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }));
    for k in (10..innermost).rev() {
        let c1 = c.clone();
        let child = fut;
        fut = Box::pin(async move { c1.get_with_async_shared(k + 1, child).await - 1 });
    }
    let c1 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c1.get_with_async_shared(10, fut).await },
    );
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let h = common::start(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            c2.get_with(innermost, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let c3 = c.clone();
    let b = common::start(move || {
        futures::executor::block_on(c3.get_with_async_shared(10, async { 777 }))
    });
    std::thread::sleep(Duration::from_millis(50));
    let open = || {
        door.open();
        if let Some(w) = waker_slot.lock().unwrap().take() {
            w.wake();
        }
    };
    if !open_late {
        open();
    }
    drop(a);
    if open_late {
        wait_flag(&h_in);
        std::thread::sleep(Duration::from_millis(50));
        open();
    }
    let bv = b.wait(Duration::from_secs(10));
    let hv = h.wait(Duration::from_secs(10));
    assert!(
        matches!(bv, Some(Ok(10))),
        "B (block_on) never got X's value: finished={}",
        bv.is_some()
    );
    assert!(
        matches!(hv, Some(Ok(v)) if v == innermost),
        "H: finished={}",
        hv.is_some()
    );
    assert_permits_back(&c, 9_999, "after the block_on chain");
}

#[test]
fn block_on_caller_is_woken_through_one_parent() {
    lend_through_with_block_on(1, false);
}

#[test]
fn block_on_caller_is_woken_when_the_door_opens_under_the_lend() {
    lend_through_with_block_on(2, true);
}

#[test]
fn block_on_caller_is_woken_through_three_parents() {
    lend_through_with_block_on(3, false);
}

/// Limit 2: two chains A1 → X1 → F1 and A2 → X2 → F2 hold both permits; two blocking
/// loaders H1, H2 queue behind them; B1, B2 (block_on threads) join X1, X2; the A's are
/// cancelled; H1 waits for F2 and H2 for F1 (each lends its permit into the other chain).
/// Everything finishes with the right values, and the permits come back.
#[test]
fn two_lenders_crossed_into_two_chains_at_limit_two() {
    let _w = watchdog(Duration::from_secs(60), "two lenders, two chains");
    let c = limited(2);
    let door = WakeDoor::default();
    let mk = |x: u64, f: u64| {
        let (c1, d) = (c.clone(), door.clone());
        let x_init = async move {
            c1.get_with_async_shared(f, async move {
                d.wait().await;
                f
            })
            .await
                + 1
        };
        let c0 = c.clone();
        shared(&c, x + 100, async move {
            c0.get_with_async_shared(x, x_init).await
        })
    };
    let (mut a1, mut a2) = (mk(10, 20), mk(11, 21));
    assert!(run(&mut a1, 3).is_none());
    assert!(run(&mut a2, 3).is_none());
    let hs: Vec<_> = [(2u64, 21u64), (3, 20)]
        .into_iter()
        .map(|(k, f)| {
            let c2 = c.clone();
            common::start(move || c2.get_with(k, || c2.get_with(f, || 999)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let bs: Vec<_> = [10u64, 11]
        .into_iter()
        .map(|x| {
            let c3 = c.clone();
            common::start(move || {
                futures::executor::block_on(c3.get_with_async_shared(x, async { 777 }))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    drop(a1);
    drop(a2);
    std::thread::sleep(Duration::from_millis(50));
    door.open();
    let got: Vec<_> = bs
        .into_iter()
        .map(|b| b.wait(Duration::from_secs(10)).map(|r| r.ok()))
        .collect();
    let hv: Vec<_> = hs
        .into_iter()
        .map(|h| h.wait(Duration::from_secs(10)).map(|r| r.ok()))
        .collect();
    assert_eq!(
        got,
        vec![Some(Some(21)), Some(Some(22))],
        "B1, B2 (H: {hv:?})"
    );
    assert_eq!(hv, vec![Some(Some(21)), Some(Some(20))], "H1, H2");
    assert_permits_back(&c, 9_999, "after two lenders");
}

/// Two caches of the same types (limit 1 each). X (cache 1) is nested in A1 (cache 1, the
/// c1 permit) which runs inside A2 (cache 2, the c2 permit); X's init awaits F (cache 2),
/// which starts under A2's c2 permit. A2 is cancelled; H1 (cache 1) takes the c1 permit and
/// works; H2 (cache 2) takes the c2 permit and waits for F, lending it. B polls X: a c2 permit
/// lent to F must not let X's cache-1 code run while H1 holds cache 1's only permit.
#[test]
fn a_permit_lent_in_another_cache_does_not_run_this_caches_parent() {
    let _w = watchdog(Duration::from_secs(60), "lend across two caches");
    let (c1, c2) = (limited(1), limited(1));
    let g1 = Gauge::default();
    let door = Door::default();
    let (cc2, d, g) = (c2.clone(), door.clone(), g1.clone());
    let x_init = async move {
        let v = cc2
            .get_with_async_shared(20, async move {
                d.wait().await;
                20
            })
            .await;
        let _g = g.guard();
        std::thread::sleep(Duration::from_millis(30));
        v + 1
    };
    let (k1, k2) = (c1.clone(), c1.clone());
    let mut a2 = shared(&c2, 1, async move {
        k1.get_with_async_shared(1, async move { k2.get_with_async_shared(10, x_init).await })
            .await
    });
    assert!(run(&mut a2, 3).is_none(), "A2 waits at the door");
    let (h1c, g) = (c1.clone(), g1.clone());
    let h1 = common::start(move || {
        h1c.get_with(2, || {
            let _g = g.guard();
            std::thread::sleep(Duration::from_millis(300));
            2
        })
    });
    let (h2c, h2_in) = (c2.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h2_in.clone();
    let h2 = common::start(move || {
        h2c.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            h2c.get_with(20, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c1, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    door.open();
    drop(a2);
    wait_flag(&h2_in);
    let out = common::hand::run_to_end(&mut b);
    assert_eq!(out, Ok(21), "B gets X's value");
    assert!(matches!(h1.wait(Duration::from_secs(10)), Some(Ok(2))));
    assert!(matches!(h2.wait(Duration::from_secs(10)), Some(Ok(20))));
    assert!(
        g1.max() <= 1,
        "cache 1's limit 1, but X's code ran beside H1's ({} at once)",
        g1.max()
    );
    assert_permits_back(&c1, 9_999, "cache 1");
    assert_permits_back(&c2, 9_999, "cache 2");
}

/// `borrowing_load_in_a_shared_parent_whose_poller_was_cancelled` with A a borrowing
/// `get_with_async` (its own permit) instead of a shared load.
#[test]
fn borrowing_load_in_a_shared_parent_whose_borrowing_poller_was_cancelled() {
    let _w = watchdog(
        Duration::from_secs(60),
        "borrowing in shared, borrowing poller cancelled",
    );
    let c = limited(1);
    let door = Door::default();
    let (c1, d) = (c.clone(), door.clone());
    let x_init = async move {
        c1.get_with_async(30, async move {
            d.wait().await;
            30
        })
        .await
            + 10
    };
    let c0 = c.clone();
    let mut a: BoxFut<u64> = Box::pin(async move {
        let c00 = c0.clone();
        c0.get_with_async(
            1,
            async move { c00.get_with_async_shared(10, x_init).await },
        )
        .await
    });
    assert!(
        run(&mut a, 3).is_none(),
        "A holds the permit, Y at its door"
    );
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    drop(a);
    door.open();
    let out = run(&mut b, 1_000);
    let fresh = run(&mut shared(&c, 9_998, async { 1 }), 50);
    assert_eq!(
        out,
        Some(Ok(40)),
        "B never got X's value (a fresh load of another key afterwards: {fresh:?})"
    );
}

/// The same shape on tokio (2 workers): task A's call is cut off by `tokio::time::timeout`
/// while the borrowing Y inside X sleeps; task B joined X before. B must finish.
#[test]
fn borrowing_load_in_a_shared_parent_cut_off_on_tokio() {
    let _w = watchdog(Duration::from_secs(60), "borrowing in shared on tokio");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let c = limited(1);
    let out = rt.block_on(async {
        let c1 = c.clone();
        let a = tokio::spawn(async move {
            let c2 = c1.clone();
            let x_init = async move {
                c2.get_with_async(30, async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    30
                })
                .await
                    + 10
            };
            let c3 = c1.clone();
            let _ = tokio::time::timeout(
                Duration::from_millis(30),
                c1.get_with_async_shared(
                    1,
                    async move { c3.get_with_async_shared(10, x_init).await },
                ),
            )
            .await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c4 = c.clone();
        let b = tokio::spawn(async move { c4.get_with_async_shared(10, async { 777 }).await });
        a.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), b).await
    });
    assert!(
        matches!(out, Ok(Ok(40))),
        "B (joined X, whose first poller was cut off) never finished: {out:?}"
    );
}

/// The original chain, wide instead of deep: X's init awaits `width` nested shared loads at
/// once (all started under A's permit); H waits for the last one. B's polls of X must run
/// under H's lent permit however many siblings the nested load has.
fn lend_through_a_wide_parent(width: u64) {
    let _w = watchdog(Duration::from_secs(60), "lend through a wide parent");
    let c = limited(1);
    let door = WakeDoor::default();
    let (c1, d) = (c.clone(), door.clone());
    let x_init = async move {
        let fs: Vec<_> = (0..width)
            .map(|i| {
                let d = d.clone();
                c1.get_with_async_shared(1_000 + i, async move {
                    d.wait().await;
                    1
                })
            })
            .collect();
        futures::future::join_all(fs).await.into_iter().sum::<u64>()
    };
    let c0 = c.clone();
    let mut a = shared(
        &c,
        1,
        async move { c0.get_with_async_shared(10, x_init).await },
    );
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let last = 1_000 + width - 1;
    let h = common::start(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            c2.get_with(last, || 999)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut b = shared(&c, 10, async { 777 });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    door.open();
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    let out = run(&mut b, 2_000);
    assert_eq!(
        out,
        Some(Ok(width)),
        "B never got X's value (width {width})"
    );
    assert!(matches!(h.wait(Duration::from_secs(10)), Some(Ok(1))));
    assert_permits_back(&c, 9_999, "after the wide parent");
}

#[test]
fn lend_through_a_parent_with_ten_nested_loads() {
    lend_through_a_wide_parent(10);
}

#[test]
fn lend_through_a_parent_with_three_hundred_nested_loads() {
    lend_through_a_wide_parent(300);
}

#[test]
fn lend_through_a_parent_with_256_nested_loads() {
    lend_through_a_wide_parent(256);
}

#[test]
fn lend_through_a_parent_with_257_nested_loads() {
    lend_through_a_wide_parent(257);
}

/// `parent_and_child_do_not_run_at_once_under_one_lent_permit` on tokio (2 workers): A's
/// task is cut off by a timeout, B and C are tasks, H runs on `spawn_blocking`.
#[test]
fn parent_and_child_under_one_lent_permit_on_tokio() {
    let _w = watchdog(Duration::from_secs(60), "parent and child on tokio");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let c = limited(1);
    let gauge = Gauge::default();
    let door = Door::default();
    let (d, g) = (door.clone(), gauge.clone());
    let f_init = WorkWhile {
        inner: Box::pin(async move {
            d.wait().await;
            20
        }),
        gauge: g,
    };
    let x_init = WorkWhile {
        inner: shared(&c, 20, f_init),
        gauge: gauge.clone(),
    };
    let res = rt.block_on(async {
        let c1 = c.clone();
        let a = tokio::spawn(async move {
            let c0 = c1.clone();
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                c1.get_with_async_shared(
                    1,
                    async move { c0.get_with_async_shared(10, x_init).await },
                ),
            )
            .await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c2 = c.clone();
        let h = tokio::task::spawn_blocking(move || c2.get_with(2, || c2.get_with(20, || 999)));
        let (cb, cc) = (c.clone(), c.clone());
        let b = tokio::spawn(async move { cb.get_with_async_shared(10, async { 777 }).await });
        let cf = tokio::spawn(async move { cc.get_with_async_shared(20, async { 888 }).await });
        a.await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        door.open();
        tokio::time::timeout(Duration::from_secs(10), async {
            (b.await.unwrap(), cf.await.unwrap(), h.await.unwrap())
        })
        .await
    });
    assert_eq!(res, Ok((20, 20, 20)));
    assert!(
        gauge.max() <= 1,
        "limit 1, but X's and F's inits ran at once ({}) under H's one lent permit",
        gauge.max()
    );
}

/// The original chain with the other verbs: X is a `try_get_with_async_shared` whose init
/// awaits `load_async` (the builder's async loader, waiting at a door for key 20); H's nested
/// call is a blocking `load`; B joins X with `optionally_get_with_async_shared`.
#[test]
fn lend_through_a_chain_of_other_verbs() {
    let _w = watchdog(Duration::from_secs(60), "other verbs chain");
    let door = Door::default();
    let d = door.clone();
    let c: C = herdcache::Cache::builder()
        .max_capacity(1_000)
        .max_concurrent_loads(1)
        .async_loader(move |k: &u64| {
            let (k, d) = (*k, d.clone());
            async move {
                if k == 20 {
                    d.wait().await;
                }
                Ok::<u64, herdcache::BoxError>(k + 1_000)
            }
        })
        .loader(|k: &u64| Ok::<u64, herdcache::BoxError>(*k + 5_000))
        .build();
    let c1 = c.clone();
    let x_init = async move { c1.load_async(20).await.map(|v| v + 1) };
    let c0 = c.clone();
    let mut a: BoxFut<u64> = Box::pin(async move {
        c0.get_with_async_shared(1, {
            let c0 = c0.clone();
            async move { c0.try_get_with_async_shared(10, x_init).await.unwrap_or(0) }
        })
        .await
    });
    assert!(run(&mut a, 3).is_none(), "A waits at the door");
    let (c2, h_in) = (c.clone(), Arc::new(AtomicBool::new(false)));
    let hf = h_in.clone();
    let h = common::start(move || {
        c2.get_with(2, || {
            hf.store(true, Ordering::SeqCst);
            c2.load(20).unwrap()
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let c3 = c.clone();
    let mut b: BoxFut<u64> = Box::pin(async move {
        c3.optionally_get_with_async_shared(10, async { None })
            .await
            .unwrap_or(0)
    });
    assert!(run(&mut b, 3).is_none(), "B waits for X");
    door.open();
    drop(a);
    wait_flag(&h_in);
    std::thread::sleep(Duration::from_millis(20));
    let out = run(&mut b, 2_000);
    assert_eq!(out, Some(Ok(1_021)), "B gets X's value");
    let hv = h.wait(Duration::from_secs(10));
    assert!(
        matches!(hv, Some(Ok(1_020))),
        "H joined the async loader's load"
    );
    assert_permits_back(&c, 9_999, "after other verbs");
}
