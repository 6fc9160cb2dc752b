//! A hasher with a fixed seed: every run samples the same keys (the default hasher's seed is
//! random, and so are the sampled keys and the policy's seeds, which derive from it). For the
//! sizing curve's tests against replays.

use std::hash::{BuildHasher, Hasher};

/// Builds [`SeededHasher`]s with seed `.0`.
#[derive(Clone)]
pub struct Seeded(pub u64);

/// FNV-style mixing of the bytes, a multiply-rotate of a `u64`, and SplitMix64's finalizer
/// with the seed.
pub struct SeededHasher(u64, u64);

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.1 = (self.1 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.1 = (self.1 ^ x)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
    fn finish(&self) -> u64 {
        let mut z = self.1 ^ self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher(self.0, 0xcbf2_9ce4_8422_2325)
    }
}
