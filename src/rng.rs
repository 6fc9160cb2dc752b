//! A small, fast, non-cryptographic random number generator (xorshift64, Marsaglia 2003) for
//! the policy's admission coin, expiry jitter and early refresh. Not for anything an attacker
//! could exploit by predicting it: it decides only *when* work happens, never what is stored.

/// xorshift64 state; never zero.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value; zero is mapped to a non-zero state).
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = step(self.0);
        self.0
    }

    /// A uniform number in [0, 1).
    #[inline]
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One xorshift64 step (`x` must not be zero).
#[inline]
pub(crate) fn step(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

thread_local! {
    static COIN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A uniform number in (0, 1] from a thread-local generator (for early refresh: never 0, so
/// its logarithm is finite).
pub(crate) fn coin() -> f64 {
    ((next() >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// The thread-local generator's next 64 bits.
fn next() -> u64 {
    COIN.with(|c| {
        let mut x = c.get();
        if x == 0 {
            // Seed from the cell's address and the time: distinct per thread.
            x = (c as *const _ as u64) ^ crate::clock::seed() | 1;
        }
        x = step(x);
        c.set(x);
        x
    })
}

/// 32 uniformly random bits from the same thread-local generator as [`coin`].
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn random_u32() -> u32 {
    (next() >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_uniform_in_the_half_open_interval() {
        let mut r = Rng::new(0);
        let n = 100_000;
        let mut buckets = [0u32; 10];
        for _ in 0..n {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "bucket {b} of {n}");
        }
    }

    #[test]
    fn coins_are_uniform_in_the_unit_interval() {
        let n = 100_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let c = coin();
            assert!(c > 0.0 && c <= 1.0);
            sum += c;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn a_zero_seed_does_not_stick_at_zero() {
        let mut r = Rng::new(0);
        assert_ne!(r.next_u64(), 0);
        assert_ne!(r.next_u64(), r.next_u64());
    }
}
