//! Choosing the policy's configuration by miniature simulation, once per cache.
//!
//! A key is *sampled* when its hash falls under a threshold (rate `R = S / capacity` for
//! shadows of `S = min(capacity, 1024, max(capacity / 4, 256))` entries: 1,024 from 4,096
//! entries up, a quarter of the capacity below, every key at 256 entries or fewer;
//! [`Selector::sampled`] is one compare on the hash already computed). Every sampled
//! `get` — hit or miss, with whether the real cache hit — goes into its shard's lossy
//! [`Samples`] buffer (two relaxed atomic operations, no lock); the buffer is drained by one
//! thread at a time (its own drain lock, taken with `try_lock`; not the shard's lock), by
//! writes that evict and, when it is half full, by the reader that filled it, into the cache's
//! one [`Selector`] (behind a mutex taken with `try_lock`: when another shard is draining, the
//! samples wait or are lost, never a reader or writer). A write that replaces a present key
//! or fits without evicting pays for nothing.
//!
//! The selector runs one [`Shadow`] per candidate configuration ([`Config::CANDIDATES`]), of
//! capacity `capacity × R`, on the sampled keys. Every *epoch* (`capacity × R` samples, about
//! `capacity` real requests) each candidate's score becomes `0.99 × score + hits in the
//! epoch`; when another candidate leads the current one by at least 5, the cache switches to
//! it (a new [`tune_word`] in an atomic, which each shard's policy applies before it next
//! evicts).
//!
//! **Convergence.** A real cache that enters a configuration carrying another's contents can
//! settle in a worse self-sustaining state than its shadow's (W-TinyLFU on a loop has
//! several). Every epoch, `D`, a 0.5-decayed mean of (the current shadow's hit rate − the real
//! hit rate) on the same samples since the last switch or action, is compared with 0.05 (after
//! two epochs at least: one epoch's gap alone is noise); above,
//! the selector asks for a convergence action (each shard clears its ghost, reranks main by
//! frequency and reverses probation), then waits 1, 2, 4 … 64 epochs before the next (reset at
//! a switch), so a shadow's scaling error cannot set off a stream of them.
//!
//! **Restart.** When an action since the last switch has not closed the gap and `D` is above
//! 0.10, the next action is a *restart* instead: each shard clears its sketch and its ghost
//! and puts all of main in probation, newest first — the state of a cache that has just
//! filled, from which its shadow got where it is. A rerank keeps what the frequency says, and
//! on a loop that drifts (each pass drops a few keys and adds as many) main is full of keys
//! that left the loop with the highest counts: a real cache that switched to window 20 % there
//! stayed at 5 % through twenty reranks while its shadow hit 71 % (and exact LRU 90 %; round
//! 108, `tests/policy_divergence.rs`). The kind travels in the action count's parity: a
//! restart makes it even, a rerank odd (a shard that missed some actions takes the latest).

use crate::policy::{tune_word, Config};
use crate::shadow::Shadow;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shadow capacity the sampling rate aims for. The shadows' work per request is about
/// `4 × R` shadow accesses: on the dev traces 1,024-entry shadows chose as well as 4,000-entry
/// ones (mean gap to the best peer −0.30 vs −0.28 points, within run-to-run noise; 512: −0.37)
/// for a quarter of the instructions (about 3 per request at a capacity of 100,000 instead of
/// 12).
pub(crate) const SHADOW_ENTRIES: u64 = 1024;
/// Below `4 × SHADOW_ENTRIES` entries, the shadows hold a quarter of the capacity (at least
/// `MIN_SHADOW_ENTRIES`): a cache of 1,024 entries or fewer used to sample every read, and a
/// read there cost three and a half times quick_cache's (simulated in four shadows: about 250
/// instructions; now 163–201 at 1,000 entries instead of 369–372, `bench/examples/op_count.rs`).
/// On the dev traces the quarter-size shadows chose as well: mean gap to the best peer −0.35,
/// −0.35, −0.43 against −0.50, −0.46, −0.28, −0.30 before, every small row within run-to-run
/// noise (`bench/examples/trace_replay.rs`). With a floor of 64 entries instead of 256 the dev
/// rows were as good, but `tests/policy_divergence.rs` found the real cache of 500 entries
/// more than 2 points below its 125-entry shadows in 4 cases of 48 (4.4 in one): a small
/// shadow's scaling error; with 256, none (1 before, at full size).
const SMALL_SHARE: u64 = 4;
const MIN_SHADOW_ENTRIES: u64 = 256;
/// Score decay per epoch.
const DECAY: f64 = 0.99;
/// How far (in decayed hits) a candidate must lead the current one for a switch.
const MARGIN: f64 = 5.0;
/// Divergence (shadow − real hit rate) above which a convergence action is taken.
const DIVERGENCE: f64 = 0.05;
/// Divergence above which an action after another since the last switch is a restart (see the
/// module docs). On the dev traces restarts above 0.10 change nothing (mean gap to the best
/// peer −0.23, −0.29, −0.32 in three runs, −0.25 … −0.40 without; BENCHMARKS.md); a restart at
/// every action from the second on, whatever the gap, cost up to 10 points on a dev row.
const RESTART_DIVERGENCE: f64 = 0.10;
/// The longest wait between two convergence actions, in epochs.
const MAX_BACKOFF: u32 = 64;

/// A sample as stored in a buffer: the hash with its two low bits replaced by "present" (bit 0)
/// and "the real cache hit" (bit 1).
#[inline]
pub(crate) fn sample(hash: u64, hit: bool) -> u64 {
    (hash & !3) | (u64::from(hit) << 1) | 1
}

/// Slots in a shard's sample buffer.
const SLOTS: usize = 64;

/// A shard's lossy buffer of sampled accesses: readers write without a lock (a slot may be
/// overwritten before it is drained: the sample is lost); drained by one thread at a time,
/// the holder of its [`Drainer`] (not the shard's lock: feeding the selector touches no
/// shard state, so a reader that fills the buffer drains it without blocking the shard's
/// other readers).
#[derive(Debug)]
pub(crate) struct Samples {
    slots: [AtomicU64; SLOTS],
    head: AtomicU64,
    /// Drained up to here; only the drainer touches it.
    tail: AtomicU64,
    drainer: crate::sync::Mutex<()>,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            drainer: crate::sync::Mutex::new(()),
        }
    }
}

/// The right to drain a [`Samples`] buffer (one thread at a time), from [`Samples::claim`].
pub(crate) struct Drainer<'a> {
    samples: &'a Samples,
    _one: crate::sync::MutexGuard<'a, ()>,
}

impl Samples {
    /// Records a sample; returns true when the buffer is half full since the last time it said
    /// so (the caller should drain it if it can).
    #[inline]
    pub(crate) fn push(&self, s: u64) -> bool {
        let i = self.head.fetch_add(1, Ordering::Relaxed);
        self.slots[i as usize % SLOTS].store(s, Ordering::Relaxed);
        i % (SLOTS as u64 / 2) == SLOTS as u64 / 2 - 1
    }

    /// Whether anything was pushed since the last drain.
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        self.head.load(Ordering::Relaxed) != self.tail.load(Ordering::Relaxed)
    }

    /// The right to drain the buffer, unless another thread is draining it (never waits).
    pub(crate) fn claim(&self) -> Option<Drainer<'_>> {
        Some(Drainer {
            samples: self,
            _one: self.drainer.try_lock()?,
        })
    }
}

impl Drainer<'_> {
    /// Takes the samples pushed since the last drain (at most the last `SLOTS`), oldest first.
    /// Returns how many pushed samples were lost (overwritten, or not yet written by their
    /// reader).
    pub(crate) fn drain(&self, mut f: impl FnMut(u64)) -> u64 {
        let this = self.samples;
        let head = this.head.load(Ordering::Relaxed);
        let tail = this.tail.load(Ordering::Relaxed);
        let from = tail.max(head.saturating_sub(SLOTS as u64));
        let mut lost = from.saturating_sub(tail);
        for i in from..head {
            let s = this.slots[i as usize % SLOTS].swap(0, Ordering::Relaxed);
            if s != 0 {
                f(s);
            } else {
                lost += 1;
            }
        }
        this.tail.store(head, Ordering::Relaxed);
        lost
    }
}

/// The cache's configuration selector: one shadow per candidate, their scores, and the
/// convergence check.
#[derive(Debug)]
pub(crate) struct Selector {
    shadows: Vec<Shadow>,
    scores: [f64; 4],
    /// Shadow hit totals at the start of the epoch.
    marks: [u64; 4],
    /// Samples and real hits in the current epoch.
    seen: u64,
    real_hits: u64,
    epoch: u64,
    current: usize,
    actions: u64,
    /// The decayed divergence, if measured since the last switch or action.
    divergence: Option<f64>,
    /// Epochs measured since the last switch or action.
    measured: u32,
    /// Epochs to wait before the next action, and the next wait.
    wait: u32,
    backoff: u32,
    threshold: u64,
    /// Since the start: samples, the real cache's hits on them, and the hits of the shadow of
    /// the configuration current at each sample (the prediction the real cache should meet).
    totals: Totals,
}

/// Running totals of a cache's policy selector (see `Cache::policy_totals`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Samples fed.
    pub samples: u64,
    /// The real cache's hits on them.
    pub real_hits: u64,
    /// The hits of the shadow of the configuration current at each sample.
    pub predicted_hits: u64,
    /// The configuration now (an index into the candidates: window 0 % + `t`, 1 % + `g`,
    /// 20 % + `g`, 80 % + `g`).
    pub candidate: usize,
    /// Switches of configuration so far.
    pub switches: u64,
    /// Convergence actions so far.
    pub actions: u64,
    /// Each candidate's shadow's hits so far.
    pub shadow_hits: [u64; 4],
}

/// The action count after `actions` for an action of the given kind: odd for a rerank, even
/// for a restart (see the module docs; [`is_restart`]).
pub(crate) fn next_action(actions: u64, restart: bool) -> u64 {
    let next = actions + 1;
    if is_restart(next) == restart {
        next
    } else {
        next + 1
    }
}

/// Whether the action that brought the count to `actions` (≥ 1) was a restart.
pub(crate) fn is_restart(actions: u64) -> bool {
    actions % 2 == 0
}

/// The sampling threshold (compared as in [`Selector::sampled`]: a key is sampled when the low
/// 32 bits of its hash are below it) for rate `min(1, entries / capacity)`.
pub(crate) fn threshold_for(capacity: u64, entries: u64) -> u64 {
    let capacity = capacity.max(1);
    ((1u128 << 32) * u128::from(entries.min(capacity)) / u128::from(capacity)) as u64
}

/// The entries of the selector's shadows for a cache of `capacity` entries (see
/// [`SMALL_SHARE`]).
fn shadow_entries(capacity: u64) -> u64 {
    capacity
        .min(SHADOW_ENTRIES)
        .min((capacity / SMALL_SHARE).max(MIN_SHADOW_ENTRIES))
}

impl Selector {
    /// The selector of a cache of `capacity` entries.
    pub(crate) fn new(capacity: u64, seed: u64) -> Self {
        let capacity = capacity.max(1);
        let shadow = shadow_entries(capacity);
        let threshold = threshold_for(capacity, shadow);
        Selector {
            shadows: (0..Config::CANDIDATES.len())
                .map(|i| Shadow::new(shadow, i, seed ^ i as u64))
                .collect(),
            scores: [0.0; 4],
            marks: [0; 4],
            seen: 0,
            real_hits: 0,
            epoch: shadow,
            current: 0,
            actions: 0,
            divergence: None,
            measured: 0,
            wait: 0,
            backoff: 1,
            threshold,
            totals: Totals::default(),
        }
    }

    /// The sampling threshold (see [`sampled`](Self::sampled)).
    pub(crate) fn threshold(&self) -> u64 {
        self.threshold
    }

    /// Whether the key of hash `hash` is sampled under `threshold`: its low 32 bits (which do
    /// not choose the shard) are below it.
    #[inline]
    pub(crate) fn sampled(hash: u64, threshold: u64) -> bool {
        u64::from(hash as u32) < threshold
    }

    /// The tune word of the current choice.
    pub(crate) fn tune(&self) -> u64 {
        tune_word(self.current, self.actions)
    }

    /// The current candidate.
    #[cfg(test)]
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Feeds one sample (see [`sample`]); one above this selector's threshold (a sizing
    /// curve samples more keys than the selector at small capacities) is ignored. Returns the
    /// new tune word when the choice or the convergence actions changed.
    pub(crate) fn feed(&mut self, s: u64) -> Option<u64> {
        let hash = s & !3;
        if !Self::sampled(hash, self.threshold) {
            return None;
        }
        for (i, sh) in self.shadows.iter_mut().enumerate() {
            let hit = sh.access(hash, 1);
            if i == self.current {
                self.totals.predicted_hits += u64::from(hit);
            }
        }
        self.seen += 1;
        self.real_hits += (s >> 1) & 1;
        self.totals.samples += 1;
        self.totals.real_hits += (s >> 1) & 1;
        if self.seen < self.epoch {
            return None;
        }
        self.end_epoch()
    }

    fn end_epoch(&mut self) -> Option<u64> {
        let n = self.seen as f64;
        let mut epoch_hits = [0u64; 4];
        for (i, sh) in self.shadows.iter().enumerate() {
            epoch_hits[i] = sh.hits() - self.marks[i];
            self.marks[i] = sh.hits();
            self.scores[i] = DECAY * self.scores[i] + epoch_hits[i] as f64;
        }
        let real = self.real_hits as f64 / n;
        self.seen = 0;
        self.real_hits = 0;
        let best = (0..self.scores.len())
            .max_by(|&a, &b| self.scores[a].total_cmp(&self.scores[b]))
            .expect("candidates");
        if best != self.current && self.scores[best] >= self.scores[self.current] + MARGIN {
            self.current = best;
            self.totals.switches += 1;
            self.divergence = None;
            self.measured = 0;
            self.wait = 0;
            self.backoff = 1;
            return Some(self.tune());
        }
        let gap = epoch_hits[self.current] as f64 / n - real;
        let d = match self.divergence {
            Some(d) => 0.5 * d + 0.5 * gap,
            None => gap,
        };
        self.divergence = Some(d);
        self.measured += 1;
        if self.wait > 0 {
            self.wait -= 1;
            return None;
        }
        // One epoch's gap alone is noise (a loop's hits come in bursts): act on two at least.
        // A planted bug for tests/policy_divergence.rs to catch: no convergence actions.
        if d > DIVERGENCE && self.measured >= 2 && !cfg!(herdcache_broken_policy) {
            self.measured = 0;
            // An action was already taken since the last switch (the backoff doubles at each).
            let restart = d > RESTART_DIVERGENCE && self.backoff > 1;
            self.actions = next_action(self.actions, restart);
            self.totals.actions += 1;
            self.divergence = None;
            self.wait = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            return Some(self.tune());
        }
        None
    }

    /// Running totals, with the current candidate.
    pub(crate) fn totals(&self) -> Totals {
        let mut shadow_hits = [0; 4];
        for (h, sh) in shadow_hits.iter_mut().zip(&self.shadows) {
            *h = sh.hits();
        }
        Totals {
            candidate: self.current,
            shadow_hits,
            ..self.totals
        }
    }

    /// Shadow accesses so far (for tests).
    #[cfg(test)]
    pub(crate) fn shadow_accesses(&self) -> u64 {
        self.shadows[0].accesses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: u64) -> u64 {
        let x = (k ^ 0x5555).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 31)
    }

    #[test]
    fn the_buffer_keeps_the_last_slots_in_order() {
        let b = Samples::default();
        for i in 1..=10u64 {
            b.push(i << 2 | 1);
        }
        let mut got = Vec::new();
        let d = b.claim().expect("free");
        assert!(b.claim().is_none(), "one drainer at a time");
        d.drain(|s| got.push(s >> 2));
        drop(d);
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
        assert!(!b.pending());
        for i in 1..=200u64 {
            b.push(i << 2 | 1);
        }
        got.clear();
        b.claim().expect("free").drain(|s| got.push(s >> 2));
        assert_eq!(
            got,
            (137..=200).collect::<Vec<_>>(),
            "lossy: the last 64 only"
        );
    }

    #[test]
    fn sampling_rate_follows_the_capacity() {
        for cap in [100u64, 500, 1_024, 3_000, 40_000, 1_000_000] {
            let sel = Selector::new(cap, 1);
            let n = 400_000u64;
            let sampled = (0..n)
                .filter(|&k| Selector::sampled(h(k), sel.threshold()))
                .count();
            let expect = n as f64 * shadow_entries(cap) as f64 / cap as f64;
            assert!(
                (sampled as f64 - expect).abs() < expect * 0.05 + 50.0,
                "capacity {cap}: {sampled} sampled, {expect} expected"
            );
        }
    }

    /// Replays `trace` through a selector as if the real cache hit as its current shadow did.
    fn run(sel: &mut Selector, trace: impl Iterator<Item = u64>) {
        for k in trace {
            let hash = h(k);
            if Selector::sampled(hash, sel.threshold()) {
                sel.feed(sample(hash, false));
            }
        }
    }

    #[test]
    fn a_loop_picks_frequency_and_recency_picks_a_window() {
        // A loop 1.5 × the capacity: only frequency admission keeps a stable set.
        let mut sel = Selector::new(1000, 1);
        run(&mut sel, (0..100_000u64).map(|i| i % 1500));
        assert_eq!(sel.current(), 0, "loop");
        // Then a stream where each key is re-read once soon after it first appears: a window
        // catches the re-read, frequency admission does not.
        let mut x = 7u64;
        run(
            &mut sel,
            (0..400_000u64).map(move |i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 2 == 0 {
                    1_000_000 + i / 2
                } else {
                    1_000_000 + (i / 2).saturating_sub(x % 300)
                }
            }),
        );
        assert!(sel.current() >= 2, "recency: candidate {}", sel.current());
        assert!(sel.shadow_accesses() > 0);
    }

    #[test]
    fn divergence_asks_for_actions_with_backoff() {
        // The real cache never hits while the shadows do: actions, spaced 1, 2, 4 … epochs.
        let mut sel = Selector::new(100, 1);
        let mut actions = Vec::new();
        let mut fed = 0u64;
        for i in 0..100_000u64 {
            let hash = h(i % 50);
            if !Selector::sampled(hash, sel.threshold()) {
                continue;
            }
            fed += 1;
            if let Some(t) = sel.feed(sample(hash, false)) {
                // In epochs (an action comes at an epoch's end).
                actions.push((fed / sel.epoch, t >> 8));
            }
        }
        assert!(actions.len() >= 4, "{actions:?}");
        let epochs: Vec<u64> = actions.iter().map(|a| a.0).collect();
        let gaps: Vec<u64> = epochs.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0]),
            "backoff grows: {gaps:?}"
        );
        assert!(gaps.iter().all(|&g| g <= 2 * u64::from(MAX_BACKOFF)));
        // The gap (the whole hit rate) is far above the restart's threshold: the first action
        // since the switch is a rerank, every later one a restart.
        let counts: Vec<u64> = actions.iter().map(|a| a.1).collect();
        assert!(!is_restart(counts[0]), "{counts:?}");
        assert!(counts[1..].iter().all(|&c| is_restart(c)), "{counts:?}");
        assert!(counts.windows(2).all(|w| w[1] > w[0]), "{counts:?}");
    }

    #[test]
    fn the_action_count_carries_the_kind_of_the_latest_action() {
        let mut n = 0;
        for restart in [false, false, true, true, false, true] {
            let next = next_action(n, restart);
            assert!(next > n && next <= n + 2);
            assert_eq!(is_restart(next), restart, "{n} -> {next}");
            n = next;
        }
        assert_eq!(
            next_action(0, false),
            1,
            "the first rerank counts 1, as before restarts"
        );
    }
}
