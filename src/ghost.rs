//! A ghost of recently evicted keys, as two rotating Bloom filters: 1.5 bytes per entry.
//!
//! The policy's `g` admission rule admits a candidate that was evicted recently (it is in the
//! ghost) even when the frequency sketch says it is no more frequent than the victim: a loop or a
//! working set slightly larger than the cache comes back before its keys are counted often.
//! An exact ghost (a FIFO of the last `capacity` evicted hashes with an index) costs 16–24 bytes
//! per entry; this one costs 1.5: two Bloom filters of 6 bits per entry each, each taking
//! `entries / 2` insertions before the older is cleared and the two swap roles. A lookup tests
//! both, so a key evicted within the last `entries / 2` to `entries` evictions is found; a hit
//! does not remove the key (a Bloom filter cannot). Four probes per key out of 12 bits per
//! inserted key: about 0.6 % false positives per filter, 1.3 % for a lookup of both when both
//! are full. The filters are sized exactly (a probe maps its hash onto the bits by a
//! multiplication, not a mask), so no capacity pays for the next power of two. (Two bytes per
//! entry in filters of a power-of-two size measured the same hit ratios on the dev traces, at
//! 2.1–4 bytes per entry; see BENCHMARKS.md.)
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
    /// Bits in one filter.
    bits: u64,
}

const PROBES: u32 = 4;
/// Bits per entry of the ghost's capacity in each filter (which takes half as many keys).
const BITS_PER_ENTRY: usize = 6;

impl Ghost {
    /// A ghost remembering about the last `entries` evictions (at least 64): `BITS_PER_ENTRY`
    /// bits per entry in each of two filters, rounded up to whole words.
    pub(crate) fn new(entries: usize) -> Self {
        let words = (entries.max(64) * BITS_PER_ENTRY).div_ceil(64);
        Ghost {
            filters: [vec![0; words], vec![0; words]],
            young: 0,
            inserted: 0,
            per_filter: (entries / 2).max(32),
            bits: words as u64 * 64,
        }
    }

    #[inline]
    fn probes(&self, hash: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        // Double hashing from one 64-bit mix: h1 + i·h2. The low two bits are ignored, as the
        // sketch does (the shadows see hashes without them).
        let hash = hash & !3;
        let h = (hash ^ (hash >> 31)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        // Both halves of the double hashing span 64 bits: a probe's bit comes from x's high
        // bits (below).
        let (h1, h2) = (h, h.rotate_left(32).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        (0..PROBES).map(move |i| {
            let x = h1.wrapping_add(u64::from(i).wrapping_mul(h2));
            // The high half of `x × bits`: a bit index in 0..bits, from all of x's bits.
            let bit = ((u128::from(x) * u128::from(self.bits)) >> 64) as u64;
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
        for (w, bit) in self.probe_array(hash) {
            self.filters[young][w] |= bit;
        }
        self.inserted += 1;
    }

    /// The probes of `hash`, computed once (for one filter or both).
    #[inline]
    fn probe_array(&self, hash: u64) -> [(usize, u64); PROBES as usize] {
        let mut a = [(0, 0); PROBES as usize];
        for (slot, p) in a.iter_mut().zip(self.probes(hash)) {
            *slot = p;
        }
        a
    }

    /// Whether the key was (probably) evicted recently.
    pub(crate) fn contains(&self, hash: u64) -> bool {
        let probes = self.probe_array(hash);
        self.filters
            .iter()
            .any(|f| probes.iter().all(|&(w, bit)| f[w] & bit != 0))
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
        // Both filters full (2,048 keys each in 24,576 bits): 2 × 0.64 %, about 1,300.
        assert!(fp < 2000, "{fp} false positives in 100,000");
        assert_eq!(g.heap_bytes(), 2 * 4096 * 6 / 8);
        // Sized exactly: no power-of-two rounding.
        assert_eq!(
            Ghost::new(5000).heap_bytes(),
            2 * (5000 * 6usize).div_ceil(64) * 8
        );
    }
}
