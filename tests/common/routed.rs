//! A key routed to a chosen shard of two, whose `Eq` can block under the shard's write lock:
//! health's tests of a weighted cache with a busy shard (rounds 94, 96 and 97).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

/// Set by a trapped `Eq` once it blocks.
pub static TRAP_ENTERED: AtomicBool = AtomicBool::new(false);
/// Releases every trapped `Eq`.
pub static TRAP_RELEASE: AtomicBool = AtomicBool::new(false);

/// A key routed to a chosen shard (of 2: bit 40 of the hash, with [`Identity`]), whose `Eq`
/// blocks (under the shard's write lock, during an `insert` of its twin) when `trap` is set,
/// until [`TRAP_RELEASE`] (30 s at most).
#[derive(Clone, Debug)]
pub struct Routed {
    pub id: u64,
    pub shard: u64,
    pub trap: bool,
}

impl PartialEq for Routed {
    fn eq(&self, o: &Self) -> bool {
        let same = self.id == o.id && self.shard == o.shard;
        if same && (self.trap || o.trap) && !TRAP_RELEASE.load(SeqCst) {
            TRAP_ENTERED.store(true, SeqCst);
            let t = std::time::Instant::now();
            while !TRAP_RELEASE.load(SeqCst) && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        same
    }
}
impl Eq for Routed {}
impl Hash for Routed {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let mut z = self.id.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        h.write_u64((z & !(1 << 40)) | (self.shard << 40));
    }
}

/// The hash is the `u64` written (so a [`Routed`] key's bit 40 picks its shard of two).
#[derive(Clone, Default)]
pub struct Identity;
pub struct IdHasher(u64);
impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
impl BuildHasher for Identity {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// Serializes the tests of one binary that use the trap (its statics are shared).
pub static TRAP_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A key of `shard` that never traps.
pub fn r(id: u64, shard: u64) -> Routed {
    Routed {
        id,
        shard,
        trap: false,
    }
}

/// A cache keyed by [`Routed`] keys.
pub type RC = herdcache::Cache<Routed, u64, Identity>;

/// Runs `f` while a writer is held inside shard `busy`'s write lock (inserting the twin of
/// `id`, value `v`); panics if `f` has not returned within `limit` (it waited for the lock).
pub fn during_busy<T: Send + 'static>(
    c: &RC,
    busy: u64,
    id: u64,
    v: u64,
    limit: Duration,
    f: impl FnOnce(RC) -> T + Send + 'static,
) -> T {
    TRAP_ENTERED.store(false, SeqCst);
    TRAP_RELEASE.store(false, SeqCst);
    let c2 = c.clone();
    let writer = std::thread::spawn(move || {
        c2.insert(
            Routed {
                id,
                shard: busy,
                trap: true,
            },
            v,
        )
    });
    assert!(
        super::eventually(|| TRAP_ENTERED.load(SeqCst)),
        "the trapped writer never compared keys"
    );
    assert!(c.is_a_shard_locked());
    let c3 = c.clone();
    let out = super::within(limit, move || f(c3));
    TRAP_RELEASE.store(true, SeqCst);
    writer.join().unwrap();
    match out {
        Some(Ok(v)) => v,
        Some(Err(p)) => std::panic::resume_unwind(p),
        None => panic!("health waited for a shard lock"),
    }
}
