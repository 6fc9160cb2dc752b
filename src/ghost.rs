//! A ghost of recently evicted keys, as two rotating Bloom filters: about 2 bytes per entry.
//!
//! The policy's `g` admission rule admits a candidate that was evicted recently (it is in the
//! ghost) even when the frequency sketch says it is no more frequent than the victim: a loop or a
//! working set slightly larger than the cache comes back before its keys are counted often.
//! An exact ghost (a FIFO of the last `capacity` evicted hashes with an index) costs 16–24 bytes
//! per entry; this one costs 2: two Bloom filters of one byte per entry each, each taking
//! `entries / 2` insertions before the older is cleared and the two swap roles. A lookup tests
//! both, so a key evicted within the last `entries / 2` to `entries` evictions is found; a hit
//! does not remove the key (a Bloom filter cannot). Four probes per key out of 16 bits per
//! inserted key: about 0.25 % false positives.
//!
//! The ghost is indexed by the key's 64-bit hash (from the cache's seeded hasher) mixed
//! differently from the sketch's rows, so their collisions do not correlate.

/// Two rotating Bloom filters of recently evicted key hashes.
#[derive(Clone, Debug)]
pub(crate) struct Ghost {
    /// `filters[young]` takes insertions; the other is the older one.
    filters: [Vec<u64>; 2],
    young: usize,
    /// Insertions into the young filter since it was last cleared.
    inserted: usize,
    /// Insertions a filter takes before the older one is cleared and they swap.
    per_filter: usize,
    /// Bit mask for an index into one filter.
    mask: u64,
}

const PROBES: u32 = 4;

impl Ghost {
    /// A ghost remembering about the last `entries` evictions (at least 64): `entries` bytes in
    /// each of two filters, rounded up to a power of two.
    pub(crate) fn new(entries: usize) -> Self {
        let bytes = entries.max(64).next_power_of_two();
        let words = bytes / 8;
        Ghost {
            filters: [vec![0; words], vec![0; words]],
            young: 0,
            inserted: 0,
            per_filter: (entries / 2).max(32),
            mask: (words as u64 * 64) - 1,
        }
    }

    #[inline]
    fn probes(&self, hash: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        // Double hashing from one 64-bit mix: h1 + i·h2. The low two bits are ignored, as the
        // sketch does (the shadows see hashes without them).
        let hash = hash & !3;
        let h = (hash ^ (hash >> 31)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let (h1, h2) = (h, (h >> 32) | 1);
        (0..PROBES).map(move |i| {
            let bit = h1
                .wrapping_add(u64::from(i).wrapping_mul(h2))
                .rotate_right(17)
                & self.mask;
            ((bit >> 6) as usize, 1u64 << (bit & 63))
        })
    }

    /// Remembers an evicted key.
    pub(crate) fn insert(&mut self, hash: u64) {
        if self.inserted >= self.per_filter {
            self.young ^= 1;
            self.filters[self.young].fill(0);
            self.inserted = 0;
        }
        let young = self.young;
        let probes: [(usize, u64); PROBES as usize] = {
            let mut a = [(0, 0); PROBES as usize];
            for (slot, p) in a.iter_mut().zip(self.probes(hash)) {
                *slot = p;
            }
            a
        };
        for (w, bit) in probes {
            self.filters[young][w] |= bit;
        }
        self.inserted += 1;
    }

    /// Whether the key was (probably) evicted recently.
    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.filters
            .iter()
            .any(|f| self.probes(hash).all(|(w, bit)| f[w] & bit != 0))
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        for f in &mut self.filters {
            f.fill(0);
        }
        self.inserted = 0;
    }

    /// Heap bytes used, for the memory formula.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.filters.iter().map(|f| f.len() * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: u64) -> u64 {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23) ^ k
    }

    #[test]
    fn remembers_recent_evictions_and_forgets_old_ones() {
        let mut g = Ghost::new(1000);
        for k in 0..1000 {
            g.insert(h(k));
        }
        // The last `entries / 2` insertions are always remembered.
        assert!((500..1000).all(|k| g.contains(h(k))));
        // After two more rotations the first ones are gone (bar false positives).
        for k in 1000..2000 {
            g.insert(h(k));
        }
        let old = (0..500).filter(|&k| g.contains(h(k))).count();
        assert!(old < 10, "{old} of 500 old keys still in the ghost");
        g.clear();
        assert!(!(1500..2000).any(|k| g.contains(h(k))));
    }

    #[test]
    fn false_positives_are_rare() {
        let mut g = Ghost::new(4096);
        for k in 0..4096 {
            g.insert(h(k));
        }
        let fp = (1_000_000..1_100_000).filter(|&k| g.contains(h(k))).count();
        assert!(fp < 1000, "{fp} false positives in 100,000");
        assert_eq!(g.heap_bytes(), 2 * 4096);
    }
}
