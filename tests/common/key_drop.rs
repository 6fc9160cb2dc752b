//! A key whose `Drop` panics at an armed drop of key 7, for the sweeps of panicking key drops
//! (`attack_s54`, `attack_s56`): arm the N-th drop (1-based, counted from arming), run a case,
//! disarm, and see whether it fired; N is swept until a case runs with nothing fired.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

/// Serialises the cases of a binary: the fault switch is global.
pub static CASE_LOCK: Mutex<()> = Mutex::new(());
/// The key drop that panics (1-based, counted from arming), 0: none.
static DROP_TARGET: AtomicU64 = AtomicU64::new(0);
static DROPS: AtomicU64 = AtomicU64::new(0);
static FIRED: AtomicBool = AtomicBool::new(false);

/// A key whose `Drop` panics at the armed drop of key 7 (never while unwinding: a second panic
/// would abort, as for any container).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PKey(pub u32);

impl Hash for PKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}

impl Drop for PKey {
    fn drop(&mut self) {
        if self.0 != 7 || std::thread::panicking() {
            return;
        }
        let target = DROP_TARGET.load(SeqCst);
        if target != 0 && DROPS.fetch_add(1, SeqCst) + 1 == target {
            FIRED.store(true, SeqCst);
            panic!("injected: key drop");
        }
    }
}

/// Key 7's `n`-th drop from now panics (0: none).
pub fn arm(n: u64) {
    DROPS.store(0, SeqCst);
    FIRED.store(false, SeqCst);
    DROP_TARGET.store(n, SeqCst);
}

/// No drop panics any more.
pub fn disarm() {
    DROP_TARGET.store(0, SeqCst);
}

/// Whether the armed drop panicked since [`arm`].
pub fn fired() -> bool {
    FIRED.load(SeqCst)
}
