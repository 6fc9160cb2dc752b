//! Pieces of the history checkers (`tests/history.rs`, `tests/attack_s57.rs`): which writes
//! fall between two instants of a history.

/// A key's definite writes, as `(start, end)` instants, sorted by start, with the minimum end
/// over every suffix: "did a write start after `t` and end before `before`?" in `O(log n)`.
pub struct Writes {
    starts: Vec<u64>,
    suffix_min_end: Vec<u64>,
}

impl Writes {
    /// The writes `w`, each `(start, end)`, in any order.
    pub fn new(mut w: Vec<(u64, u64)>) -> Self {
        w.sort_unstable();
        let starts = w.iter().map(|x| x.0).collect();
        let mut suffix_min_end = vec![u64::MAX; w.len() + 1];
        for i in (0..w.len()).rev() {
            suffix_min_end[i] = suffix_min_end[i + 1].min(w[i].1);
        }
        Writes {
            starts,
            suffix_min_end,
        }
    }

    /// Whether some write started after `t` and ended before `before`.
    pub fn between(&self, t: u64, before: u64) -> bool {
        let i = self.starts.partition_point(|&s| s <= t);
        self.suffix_min_end[i] < before
    }
}

#[cfg(test)]
mod tests {
    use super::Writes;

    #[test]
    fn a_write_counts_only_when_it_starts_after_and_ends_before() {
        let w = Writes::new(vec![(5, 9), (1, 3), (4, 20)]);
        assert!(w.between(0, 4), "(1, 3) lies inside (0, 4)");
        assert!(!w.between(1, 4), "(1, 3) starts at 1, not after it");
        assert!(!w.between(2, 9), "(5, 9) ends at 9, not before it");
        assert!(w.between(4, 10), "(5, 9) lies inside (4, 10)");
        assert!(!w.between(5, 100), "nothing starts after 5");
        assert!(!Writes::new(Vec::new()).between(0, u64::MAX));
    }
}
