//! The hit-ratio curve, online: what the hit ratio would be at other capacities.
//!
//! With [`CacheBuilder::track_sizing`](crate::CacheBuilder::track_sizing), the cache runs
//! [`Shadow`]s — caches of key hashes under the shards' own policy — at 0.25, 0.5, 1, 2 and 4 ×
//! `max_capacity`, scaled down by spatial sampling (SHARDS, Waldspurger et al., FAST 2015;
//! miniature simulation, USENIX ATC 2017): a key is sampled when its hash falls under a
//! threshold (rate `R`), and a shadow of `capacity × R` fed the sampled requests predicts the
//! hit ratio of a cache of `capacity` fed all of them.
//!
//! **Where the samples come from.** The very samples the policy's configuration selector
//! takes (`select`): a sampled `get` pushes its hash and whether the real cache hit into its
//! shard's lossy buffer (two relaxed atomic operations, no lock), which is drained by one
//! thread at a time (not under the shard's lock) into the selector and, when tracked, into
//! this tracker. Without a weigher the sizing rate is `R = min(1, S / max_capacity)` for a
//! 1 × shadow of `S = clamp(max_capacity / 16, 1024, 2000)` entries: the selector's 1,024
//! entries' worth up to 16,384 entries, up to about twice that (2,000) from 32,000 up; below
//! 4,096 entries the selector samples a quarter of the capacity's keys (every
//! key at 1,024 entries or fewer: the curve's small shadows need them: at a quarter of the
//! rate, with a 64-entry floor, the curve was off by up to 15 points on the loop trace). So a
//! tracked cache pushes more samples than an untracked one (an unsampled read runs the same
//! instructions either way: the threshold is one compare), and the selector ignores those
//! above its own threshold. Samples lost by the lossy buffer are lost to both.
//!
//! **Nested rates.** Each shadow holds at most a fixed number of entries (`MAX_ENTRIES`: 32 at
//! 0.25 ×, 512 at 0.5 × — growing with the capacity above 100,000 entries, up to the 1,000
//! of every sample from about 195,000 up, so that its share of the *requests* stays what it
//! is at 100,000 (see `max_entries`) —, 1,024 at 2 ×, 512 at 4 ×; the 1 × shadow is not
//! capped: 1,024 to 2,000 entries, see above): a shadow that `capacity × R` would make
//! larger is fed only the samples under a lower threshold (a rate `R × share`, `share` ≤ 1),
//! a subset of the others' keys, and is sized `capacity × R × share`. The work per sample is what bounds the cost
//! (simulating a sampled request costs a few hundred instructions in a shadow that misses),
//! so the shadows whose predictions matter least or need the fewest keys get the fewest. A
//! subset's own sampling error is corrected against the full sample (below).
//!
//! **Which policy.** The shadows run the configuration the real cache runs: the selector's
//! current candidate, applied to each shadow (as a shard applies it) whenever it changes; under
//! [`EvictionPolicy::lru`](crate::EvictionPolicy::lru), exact LRU at every size, with no
//! selector and no challengers (a cache of any size would run LRU too). The
//! selector's convergence actions are replayed on the 1 × shadow only: it models the real
//! cache itself, which takes them; the other sizes model caches that would take their own at
//! other times, if at all. But a cache of another
//! size often prefers another configuration: on the P6 trace the cache at 160,000 runs window
//! 20 % while one at 80,000 picks window 0 %, 15 points better there; on sprite the cache at
//! 256 entries wavers between window 0, 1 and 20 % (all within 0.1 point of each other there)
//! while one at 512 stays at 20 %, 8 points above window 0 % — and a 2 × shadow that followed
//! the small cache's switches predicted 4 points too low. So every point but 1 × has a second
//! shadow, a *challenger*, fed the same samples, and the point is the better of the two. A
//! challenger starts at window 0 % + frequency admission below 1 × and at window 20 % + ghost
//! above; when it has trailed its size's current-configuration shadow by more than 1 % of the
//! samples over 8 epochs or more, it moves to the next candidate other than the current one,
//! starting again from a copy of that shadow (and its counts). While the current
//! configuration is the challenger's own, the challenger would be a copy of the other
//! shadow: it is not fed (its counts are the other's), and when the configuration changes it
//! starts again from a copy of that shadow, which ran it. When the configuration changes to
//! the challenger's own, the two swap, with their counts: the challenger, which ran that
//! configuration all along, becomes its size's shadow, and the former shadow, which ran the
//! old one, the challenger (retuning the shadow instead carried one configuration's state
//! into another — W-TinyLFU's self-sustaining states on loops: on P3 at 400,000, whose real
//! cache moves from window 0 % to 20 or 80 % and back, the 0.5 × point then sat 1.1 points
//! low on average over 16 runs, down to −4.1, against +0.2, at worst −1.8, with the swap). And
//! a challenger that leads its size's shadow by more than 5 % of the samples in each of two
//! epochs in a row *frees* that shadow: it leaves the real cache's configuration for the next
//! candidate other than the challenger's, starting from a copy of the challenger (with its
//! counts), and moves on in the same way while the challenger keeps such a lead; at the real
//! cache's next switch it follows the real cache again. So a size tries a third configuration
//! when the first two are both far off (round 94: 300,000 requests of hot keys and a scan,
//! then a loop over 15,000 keys at 10,000 entries; the real cache at 1 × and the 2 ×
//! challenger ran configurations under which the 2 × shadows hit 10–40 % of the loop, while a
//! real cache of 20,000 moved to window 80 % and hit all of it: 2 × predicted 54 % against
//! 81 % since the start, 79 % with the shadow freed). A weighted cache has no selector
//! and runs a fixed configuration; its shadows run the same (and have no challengers).
//!
//! **Weights.** Without a weigher every entry weighs 1 and a sampled `get` that misses inserts
//! the key in each shadow that missed it (the "get, then insert on a miss" pattern). With a
//! weigher the capacity is in weight units and a shadow learns weights from sampled
//! *inserts*: a sampled `get` that the real cache missed only looks the key up in the shadows
//! (the insert that follows brings the key, with its weight, into those that miss it); one
//! that the real cache hit inserts the key into the shadows that miss it with the weight last
//! inserted for it (a lossy, two-way table of 4096 sampled keys' weights, 32 KiB) or else the
//! mean weight of the sampled inserts. An insert of a key a shadow holds (an overwrite) gives
//! it the new weight, as the cache's entry takes its new value's. A weighted cache has no selector and chooses its own rate,
//! for about 2000 *entries* in the 1 × shadow: `R = min(1, 2000 × mean weight /
//! max_capacity)`, the mean weight (rounded to a whole number, at most 262,144 = 2^18: heavier
//! entries are sampled at the rate of that mean, so that the shadows' capacities in weight
//! units stay far below `u32::MAX`) measured from the cache (weighted size / entries) each time
//! [`Cache::sizing`](crate::Cache::sizing) is called, and from the sampled inserts after 32,
//! 64, 128 … of them; when the rate it implies is more than 2 × away from the current one, the
//! shadows are rebuilt at the new rate (and the window and totals start again). Until then the
//! rate assumes a weight of 1. Its five shadows all see every sample (no nested rates).
//!
//! **Window.** Counts are kept per *epoch* of 2000 sampled requests; at the end of each, the
//! window's counts are multiplied by 0.95 and the epoch's added: an exponentially decayed
//! window whose mean age is 20 epochs, about `40_000 / R` requests (about 20 ×
//! `max_capacity` requests for an entry-bounded cache of at least 4,096 entries, 40 × from
//! 1,024 to 4,095). The observed
//! ratio is the real cache's hits on the same sampled requests, decayed the same way. Totals
//! since the cache was built (or the shadows last rebuilt) are kept too.
//!
//! **Adjustment** (SHARDS's "adj"): a few very hot keys carry much of the hits, and whether the
//! sample holds one more or one fewer of them moves every ratio by points. The sampled
//! requests *expected* — the rate × the reads the cache counted, less the samples a buffer
//! lost — are compared with those seen; the surplus or deficit is counted as hits at every
//! size (the hottest keys hit everywhere): `ratio = (hits + expected − seen) / expected`,
//! clamped to 0..=1, applied once the window (or the totals) holds 2000 samples or more, and
//! only below rate 1 (when every key is sampled there is no sampling error to correct). A
//! shadow fed a subset (share `s`) is first brought to the full sample by difference with the
//! 1 × shadow, which sees every sample: its hits in sample units are `hits_1× + gains ×
//! (1 × misses / 1 × misses on the subset) − losses / s`, where the gains are the subset's
//! requests the shadow hit and the 1 × shadow missed and the losses the reverse (a control
//! variate: the two shadows' hits on one subset move together with the keys it happens to
//! hold; on the dev traces, against counting the subset's surplus or deficit of samples as
//! hits: mean error 0.54 instead of 0.71 over ten alternated runs, worst row at most 4.9
//! points instead of 10.5; the gains by the realised share rather than `s`: a loop that
//! fits at 2 × predicted there, and on the dev rows sampled below rate 1, seven alternated
//! runs, mean error 0.49 instead of 0.55, worst row 1.4–2.7 instead of 1.4–6.5). The read count costs the hit path
//! nothing only where the cache counts reads anyway: the statistics' hits and misses with
//! [`record_stats`](crate::CacheBuilder::record_stats), else, in a cache that keeps time, its
//! expiry-maintenance tick (every 64th read of a thread adds 64 to its shard's counter, threads
//! starting at phases spread over 0..1024 so that the reads not yet added average out, and
//! again at a random phase when they come back from reading another timed cache; only
//! lookups that are requests tick: a load's look again after waiting for a flight, or a
//! computation's look at the current value, is no new read). Without either there is no adjustment (only the subsets' against the
//! samples): on the dev traces that costs scarab at 25,000 entries 6.7 points at 0.5 ×, where
//! the sampled keys' own hit ratio was 3.8 points below the cache's (BENCHMARKS.md).
//!
//! **Anchor.** With statistics the cache also knows its own hit ratio over every request
//! (hits / (hits + misses), per epoch, decayed as the window is). The sampled keys are a
//! random share of the keys, and their own hit ratio can sit points off the cache's even
//! after the adjustment (on the P6 trace at 20,000 entries: 14.8 % on the samples against
//! 17.8 % over every request, in one run of twenty); every shadow, fed those keys, carries that
//! error. So every point is moved by the difference between the two: a point is the real
//! cache's own ratio plus its shadow's difference from the real cache on the same samples,
//! and [`Sizing::observed`] is the cache's own ratio. The 1 × point's error against the
//! observed ratio is what it was. On the dev traces, the same 20 runs anchored after the fact:
//! root-mean-square error over the 0.5 × and 2 × rows 0.77 points instead of 0.85; in 20
//! further runs each of the two versions, mean absolute error 0.36–0.58 against 0.35–0.71
//! (BENCHMARKS.md). Without statistics there is no anchor (nor adjustment).
//!
//! **What is not modelled.** The shadows hold no values and never expire: a point predicts
//! the misses for want of room (and of admission), not those of a time to live, a refresh or
//! an invalidation. A cache whose misses are mostly expiries sees a flat curve above its
//! observed ratio: a larger cache would not help it. Nor are failed loads: without a weigher
//! a shadow inserts every key it misses (the "get, then insert" pattern), including a key
//! whose load then fails and stores nothing in the real cache (or stores a negative entry,
//! whose hits are hits to the shadows too); a cache whose misses are mostly failures also sees
//! its curve above its observed ratio — the 1 × point above the observed one says so (round
//! 92: half the requests on keys whose loads always fail, every point from 0.5 × up at
//! 100 % against an observed 50 %).
//!
//! **Memory.** Without a weigher, shadows of at most 32 + 1,000 + 2,000 + 1,024 + 512 entries
//! plus the challengers (32 + 1,000 + 1,024 + 512): 7,136 entries (6,160 up to 100,000
//! entries of capacity), about 40–55 bytes each
//! (see `shadow`): about 0.4 MiB once full, fixed whatever `max_capacity` is beyond 1,024 (at
//! rate 1 the shadows are 0.25 … 4 × the capacity, twice but at 1 ×: 0.7 MiB at 1,000;
//! `bench/examples/memory.rs --sizing` measures it). With a weigher, about 2000 × 7.75
//! entries (0.25 … 4 ×), about 0.8 MiB, plus the 32 KiB table of weights, and never more than
//! twice as many entries (each shadow's entry cap: about 1.6 MiB), whatever the weights — the
//! rate follows the mean weight of the sampled inserts (checked at 32, 64, 128 … of them) and
//! of the cache's entries at each [`Cache::sizing`](crate::Cache::sizing), and moves when
//! that mean is 2 × away; until it does, the cap holds.

use crate::policy::tune_word;
use crate::select::threshold_for;
use crate::shadow::Shadow;

/// With a weigher (no selector), the entries (weight units × mean weight) the 1 × shadow aims
/// for. Without one the rate is [`unweighted_threshold`]'s (1,024 entries at 1 ×).
pub(crate) const ENTRIES: u64 = 2000;
/// The capacities tracked, as fractions of `max_capacity` (numerator, denominator).
const FACTORS: [(u64, u64); 5] = [(1, 4), (1, 2), (1, 1), (2, 1), (4, 1)];
/// Without a weigher, the most entries each factor's shadow holds: one that the rate would
/// make larger sees a subset of the samples (the keys under a lower threshold), so that it
/// holds no more than this. The 1 × shadow is not capped (2,000 entries at most, from 4,096
/// entries up; 1,024 below): its prediction is checked against the observed
/// ratio on the same samples. Not applied at rate 1 (a `max_capacity` of 1,024 or less), where every shadow
/// sees every request (the loop traces' 0.5 × point, at 256 entries on a subset, was off by up
/// to 5 points). Measured on the dev traces and `bench/examples/sizing_cost.rs` (BENCHMARKS.md):
/// 0.5 × at 512 entries and 0.25 × at 128 cost 5 % in instructions on a cache of 100,000
/// entries serving only hits. The 0.5 × point, the one whose errors were the largest, has 512
/// (from 4,096 entries up, every sample), and the 4 × point, not a target, pays for it with
/// 512: over ten alternated runs each, the worst 0.5 × / 2 × row
/// was 2.3–4.5 points (above 4 once) against 2.2–5.8 (above 4 twice) with 256 and 1,024, at
/// 2.6–2.7 % of the instructions inside the tracker.
const MAX_ENTRIES: [u64; 5] = [32, 512, u64::MAX, 1024, 512];
/// The capacity up to which the 0.5 × shadow holds `MAX_ENTRIES[1]`; above it, it grows with
/// the capacity (see [`max_entries`]).
const HALF_SCALE_FROM: u64 = 100_000;

/// The most entries factor `i`'s shadow holds in a cache of `capacity` (without a weigher):
/// `MAX_ENTRIES[i]`, except at 0.5 × from [`HALF_SCALE_FROM`] up, where it grows in proportion
/// to the capacity. A shadow's work per *request* is its share of the requests, its entries
/// over its capacity (`MAX_ENTRIES[i] / (factor × capacity)`): at a fixed size it falls as the
/// capacity grows, and so does its sample, while its sampling error does not. The 0.5 × point,
/// the one whose errors were the largest, keeps the share of the requests it has at 100,000
/// entries (1 in 98) until it sees every sample (1,000 entries: from about 195,000 up), so a
/// larger cache pays no more per request for it than one of 100,000. On P6 at 160,000 (where
/// 0.5 × sits at the trace's cliff), 16 alternated runs each: 0.5 × error −3.85 … +1.27 (mean
/// absolute 0.84) with 819 entries against −7.06 … +2.78 (1.94; above 4 in 3 runs) with 512
/// (BENCHMARKS.md).
fn max_entries(i: usize, capacity: u64) -> u64 {
    if i == 1 {
        MAX_ENTRIES[1].max(MAX_ENTRIES[1].saturating_mul(capacity) / HALF_SCALE_FROM)
    } else {
        MAX_ENTRIES[i]
    }
}

/// The capacity of the point at `num / den` × `capacity` (at least 1): its label in
/// [`Sizing::points`], and the capacity its shadows simulate (scaled by their rate).
fn point_capacity(capacity: u64, num: u64, den: u64) -> u64 {
    (capacity.saturating_mul(num) / den).max(1)
}

/// Slots: the five factors, then the challengers at 0.25, 0.5, 2 and 4 × (see the module
/// docs, "Which policy").
const SLOTS: usize = 9;
/// The factors (indices into `FACTORS`) that have a challenger, in slot order from 5.
const CHALLENGED: [usize; 4] = [0, 1, 3, 4];
/// The configuration each challenger starts with: window 0 % below 1 × (a smaller cache's own
/// selector often prefers it: P6 at 80,000 entries gains 15 points there), window 20 % + `g`
/// above (a larger cache's often settles there: sprite and orm-busy at 2 ×).
const CHALLENGER_START: [u64; 4] = [0, 0, 2, 2];
/// A challenger fed at least this many epochs' samples since it started, with a hit rate more
/// than `CHALLENGER_GAP` below its size's current-configuration shadow, moves to the next
/// candidate.
const CHALLENGER_EPOCHS: u32 = 8;
const CHALLENGER_GAP: f64 = 0.01;
/// A challenger that led its size's shadow by more than `FREE_LEAD` of the samples fed in
/// each of `FREE_EPOCHS` epochs in a row frees that shadow to try another candidate.
const FREE_EPOCHS: u32 = 2;
const FREE_LEAD: f64 = 0.05;

/// The candidate after `from` (cyclically) that is not `other`.
fn next_candidate(from: u64, other: u64, n: u64) -> u64 {
    let next = (from + 1) % n;
    if next == other {
        (next + 1) % n
    } else {
        next
    }
}
/// Sampled requests per epoch.
const EPOCH: u64 = 2000;
/// Decay of the window's counts per epoch.
const DECAY: f64 = 0.95;

/// The sizing tracker: the shadows and their counts. Behind a mutex in the cache; fed by the
/// drainer of a shard's sample buffer.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// `max_capacity`, at least 1 (the shadows' sizes).
    capacity: u64,
    /// `max_capacity` as configured (0 included): the real cache's, for
    /// [`Sizing::suggested_capacity`].
    max_capacity: u64,
    seed: u64,
    weighted: bool,
    /// Whether the cache counts its reads (`set_requests`): the adjustment against them.
    counted: bool,
    /// The mean weight the rate was chosen for.
    mean_weight: u64,
    threshold: u64,
    /// Per slot: the shadow (the challengers without a weigher only) and the threshold
    /// under which it is fed (at most `threshold`; nested).
    shadows: Vec<Shadow>,
    thresholds: [u64; SLOTS],
    /// The candidate the shadows run (low byte of a tune word).
    candidate: u64,
    /// The real cache's convergence actions (a tune word's count) last seen, and those the
    /// 1 × shadow took since it was built (see `replay_action`).
    actions: u64,
    one_actions: u64,
    /// Per challenger (slots 5..9, without a weigher): its candidate, and since it started:
    /// its hits less its size's shadow's, and the epochs it was fed.
    challenger: [u64; 4],
    challenger_gap: [i64; 4],
    challenger_epochs: [u32; 4],
    /// Per challenged size: the candidate its shadow runs (the real cache's, unless the
    /// challenger freed it, see `rotate_challengers`), and the epochs in a row the challenger
    /// led it by more than `FREE_LEAD`.
    own: [u64; 4],
    leading: [u32; 4],
    epoch: Counts,
    window: [f64; WIDTH],
    total: Counts,
    /// The cache's read count at the start of the epoch, and now.
    requests_mark: u64,
    requests_now: u64,
    /// The cache's hit count (its statistics', when recorded) at the start of the epoch, and
    /// now (`None`: not counted).
    hits_mark: u64,
    hits_now: Option<u64>,
    /// With a weigher: the weights of sampled keys seen inserted (two-way, lossy: the
    /// key's hash's top 32 bits and its weight), and the sum and count of those weights.
    weights: Vec<u64>,
    weight_sum: u64,
    weight_count: u64,
    /// With a weigher: recent sampled gets that the real cache missed, with the shadows that
    /// missed them too (a bit each), waiting for the key's insert (direct-mapped, lossy).
    pending: [(u64, u8); PENDING],
}

/// With a weigher, the most entries the 1 × shadow holds (the others in proportion to their
/// factor): twice the [`ENTRIES`] its rate is set for. The rate follows a mean weight (see
/// [`Tracker::calibrate`]); entries lighter than that mean, or of weight 0 (which count
/// toward no capacity), would otherwise fill a shadow without bound: 40,000 keys of weight 0
/// inserted and invalidated kept 8.9 MiB of shadows.
const WEIGHTED_ENTRIES_CAP: u64 = 2 * ENTRIES;

/// Slots for sampled misses waiting for their insert.
const PENDING: usize = 64;

/// The most mean weight per entry a weighted tracker's rate follows (2^18): above it, the rate
/// is that of this mean (lower than `R = min(1, 2000 × mean weight / max_capacity)` says), so
/// that the shadows' capacities in weight units stay far below `u32::MAX`.
const MAX_MEAN_WEIGHT: u64 = 1 << 18;

/// Slots in a weighted tracker's table of weights (32 KiB).
const WEIGHT_SLOTS: usize = 4096;

/// The factor whose shadow is fed every sample: the reference of the subsets' correction.
const ONE: usize = 2;

/// Counts as `f64`s: hits per slot, samples fed per slot, the 1 × shadow's hits on each
/// factor's subset, real hits, sampled requests, expected, and the cache's own hits and reads
/// (every request, from its statistics).
const WIDTH: usize = 3 * SLOTS + FACTORS.len() + 5;
const REF: usize = 2 * SLOTS;
const REAL: usize = REF + FACTORS.len();
const N: usize = REAL + 1;
const EXPECTED: usize = REAL + 2;
const ALL_HITS: usize = REAL + 3;
const ALL_READS: usize = REAL + 4;
const GAIN: usize = REAL + 5;

/// Hits per slot, samples fed per slot, the 1 × shadow's hits on the samples each factor's
/// shadow was fed, real hits, sampled requests, and the sampled requests expected from the
/// cache's request count (the rate × the reads counted, less the samples lost); and the
/// hits and reads the cache's statistics counted over every request (zero without them).
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    hits: [u64; SLOTS],
    fed: [u64; SLOTS],
    reference: [u64; FACTORS.len()],
    real: u64,
    n: u64,
    expected: f64,
    all_hits: u64,
    all_reads: u64,
    /// Per slot fed a subset: its hits on requests the 1 × shadow missed (see `ratio`).
    gain: [u64; SLOTS],
}

impl Counts {
    fn as_f64(&self) -> [f64; WIDTH] {
        let mut a = [0.0; WIDTH];
        for i in 0..SLOTS {
            a[i] = self.hits[i] as f64;
            a[SLOTS + i] = self.fed[i] as f64;
            a[GAIN + i] = self.gain[i] as f64;
        }
        for (f, &r) in self.reference.iter().enumerate() {
            a[REF + f] = r as f64;
        }
        a[REAL] = self.real as f64;
        a[N] = self.n as f64;
        a[EXPECTED] = self.expected;
        a[ALL_HITS] = self.all_hits as f64;
        a[ALL_READS] = self.all_reads as f64;
        a
    }

    fn add(&mut self, o: &Counts) {
        for i in 0..SLOTS {
            self.hits[i] += o.hits[i];
            self.fed[i] += o.fed[i];
            self.gain[i] += o.gain[i];
        }
        for f in 0..FACTORS.len() {
            self.reference[f] += o.reference[f];
        }
        self.real += o.real;
        self.n += o.n;
        self.expected += o.expected;
        self.all_hits += o.all_hits;
        self.all_reads += o.all_reads;
    }
}

/// Without a weigher, the most the shadows sample: [`one_entries`] at 1 × (up to 2,000 from
/// 32,000 entries up, about twice the selector's keys: with 1,024, the 1 × point was off the
/// observed ratio by more than 1 point in half of the runs on the dev traces, mostly P3 at
/// 400,000, sampled at 0.26 %), every key at 1,024 entries or fewer (more than the selector below
/// 4,096 entries: the sizing curve's small shadows need every sample there, see
/// `MAX_ENTRIES`).
pub(crate) fn unweighted_threshold(capacity: u64) -> u64 {
    threshold_for(capacity, one_entries(capacity))
}

/// Without a weigher, the entries of the 1 × shadow: 1,024 (the selector's size from 4,096
/// entries of capacity up) up to 16,384 entries of capacity, then a sixteenth of the
/// capacity, up to [`ENTRIES`] (2,000) from 32,000 up: the curve samples up to about twice
/// the keys the selector does. The work per read grows with the rate, so the larger shadow is
/// kept for the caches where the rate is lowest (at most 1 in 16 keys sampled): at 10,000
/// entries, 2,000 entries at 1 × cost 28 % more instructions than an untracked cache on a
/// skewed mix, against 17 % with 1,024 (`bench/examples/sizing_cost.rs` under callgrind).
fn one_entries(capacity: u64) -> u64 {
    let s = crate::select::SHADOW_ENTRIES;
    (capacity / 16).clamp(s, ENTRIES)
}

impl Tracker {
    /// A tracker for a cache of `capacity` (entries, or weight units when `weighted`) whose
    /// policy runs the configuration of tune word `tune`; samples at most under
    /// `max_threshold` (without a weigher, [`unweighted_threshold`], at least the selector's:
    /// the selector's keys are a subset of the curve's). `counted`:
    /// the cache counts its reads (see [`set_requests`](Self::set_requests)).
    pub(crate) fn new(
        capacity: u64,
        weighted: bool,
        tune: u64,
        seed: u64,
        max_threshold: u64,
        counted: bool,
    ) -> Self {
        let mut t = Tracker {
            capacity: capacity.max(1),
            max_capacity: capacity,
            seed,
            weighted,
            counted,
            mean_weight: 1,
            threshold: 0,
            shadows: Vec::new(),
            thresholds: [0; SLOTS],
            candidate: tune & 0xff,
            actions: tune >> 8,
            one_actions: 0,
            challenger: CHALLENGER_START,
            own: [tune & 0xff; 4],
            leading: [0; 4],
            challenger_gap: [0; 4],
            challenger_epochs: [0; 4],
            epoch: Counts::default(),
            window: [0.0; WIDTH],
            total: Counts::default(),
            requests_mark: 0,
            requests_now: 0,
            hits_mark: 0,
            hits_now: None,
            weights: if weighted {
                vec![0; WEIGHT_SLOTS]
            } else {
                Vec::new()
            },
            weight_sum: 0,
            weight_count: 0,
            pending: [(0, 0); PENDING],
        };
        t.rebuild(max_threshold);
        t
    }

    /// (Re)creates the shadows for the current mean weight, at most at `max_threshold`.
    fn rebuild(&mut self, max_threshold: u64) {
        let entries = ENTRIES.saturating_mul(self.mean_weight);
        self.threshold = threshold_for(self.capacity, entries).min(max_threshold);
        let mut shadows: Vec<Shadow> = Vec::with_capacity(SLOTS);
        for (i, &(num, den)) in FACTORS.iter().enumerate() {
            // The capacity the point is labelled with, simulated as it is (at rate 1 a
            // fraction rounded otherwise put a point of 1 entry on a shadow of 2).
            let c = point_capacity(self.capacity, num, den) as f64;
            // At rate 1 (every key sampled: a capacity of 1,024 or less) every shadow sees
            // every request (on subsets the loop traces' small points were off by points).
            let thr = if self.weighted || self.threshold >= 1 << 32 {
                self.threshold
            } else {
                threshold_for(c.round() as u64, max_entries(i, self.capacity)).min(self.threshold)
            };
            self.thresholds[i] = thr;
            let size = ((c * thr as f64 / (1u64 << 32) as f64).round() as u64).max(1);
            let mut shadow =
                Shadow::new(size, self.candidate as usize, self.seed ^ (0x51 + i as u64));
            if self.weighted {
                // Twice the entries its rate is for, at most (see the module docs, "Memory").
                shadow = shadow.with_max_entries(WEIGHTED_ENTRIES_CAP.saturating_mul(num) / den);
            }
            shadows.push(shadow);
        }
        // A challenger at every size but 1 × (see the module docs, "Which policy"); none
        // under exact LRU, which the cache keeps at every size (each challenger then "runs"
        // the current configuration, so it is never fed and counts its size's results).
        self.challenger = if self.challengers() {
            CHALLENGER_START
        } else {
            [self.candidate; 4]
        };
        self.own = [self.candidate; 4];
        self.leading = [0; 4];
        self.challenger_gap = [0; 4];
        self.challenger_epochs = [0; 4];
        for (k, &i) in CHALLENGED.iter().enumerate() {
            self.thresholds[5 + k] = self.thresholds[i];
            if self.challengers() {
                let c = shadows[i].capacity();
                shadows.push(Shadow::new(
                    c,
                    self.challenger[k] as usize,
                    self.seed ^ (0x61 + k as u64),
                ));
            }
        }
        self.shadows = shadows;
        self.one_actions = 0;
        self.epoch = Counts::default();
        self.window = [0.0; WIDTH];
        self.total = Counts::default();
        self.requests_mark = self.requests_now;
        self.hits_mark = self.hits_now.unwrap_or(0);
    }

    fn rate(&self) -> f64 {
        self.threshold as f64 / (1u64 << 32) as f64
    }

    /// Whether a drain (at most 64 samples) may end the epoch: the read count is needed then.
    pub(crate) fn near_epoch_end(&self) -> bool {
        self.epoch.n + 64 >= EPOCH
    }

    /// The cache's read count now (see `Cache::requests`), if it counts them, and of those
    /// its hits, if it counts them (its statistics).
    pub(crate) fn set_requests(&mut self, n: Option<u64>, hits: Option<u64>) {
        if let Some(n) = n {
            self.requests_now = self.requests_now.max(n);
        }
        if let Some(h) = hits {
            self.hits_now = Some(self.hits_now.map_or(h, |x| x.max(h)));
        }
    }

    /// The epoch so far: its counts, with the sampled requests expected and the cache's own
    /// hits and reads since it began.
    fn epoch_now(&self) -> Counts {
        let mut e = self.epoch;
        e.expected = self.expected_now();
        if let Some(h) = self.hits_now {
            e.all_hits = h.saturating_sub(self.hits_mark);
            e.all_reads = self.requests_now.saturating_sub(self.requests_mark);
        }
        e
    }

    /// `lost` samples at `sample_threshold` were lost by a buffer: the share of them under
    /// the sizing threshold is not expected any more.
    pub(crate) fn lost(&mut self, lost: u64, sample_threshold: u64) {
        if lost > 0 && sample_threshold > 0 {
            self.epoch.expected -= lost as f64
                * (self.threshold.min(sample_threshold) as f64 / sample_threshold as f64);
        }
    }

    /// The sampled requests expected since the epoch began (those seen when the cache does
    /// not count its reads: no adjustment against them then).
    fn expected_now(&self) -> f64 {
        if !self.counted {
            return self.epoch.n as f64;
        }
        self.epoch.expected + (self.requests_now - self.requests_mark) as f64 * self.rate()
    }

    /// Whether the shadows at sizes other than 1 × have challengers running other
    /// configurations: not with a weigher (no selector) nor under exact LRU (the cache never
    /// leaves it).
    fn challengers(&self) -> bool {
        !self.weighted && self.candidate != crate::policy::LRU as u64
    }

    /// The sampling threshold (see `Selector::sampled`).
    pub(crate) fn threshold(&self) -> u64 {
        self.threshold
    }

    /// Follows the real cache's configuration (tune word `tune`): its candidate, and on the
    /// 1 × shadow its convergence actions too.
    #[inline]
    fn follow(&mut self, tune: u64) {
        if tune & 0xff != self.candidate {
            self.switch(tune & 0xff);
        }
        if tune >> 8 != self.actions {
            self.replay_action(tune >> 8);
        }
    }

    /// The real cache took a convergence action (its tune word's count is now `actions`):
    /// the 1 × shadow takes it too. It is the real cache's own model, checked against the
    /// observed ratio on the same samples; without the action it stayed in the state the
    /// real cache left (seen on the loop and P3 traces: up to 2 points apart). The other
    /// sizes' shadows model caches that would act at other times, if at all: not replayed.
    #[cold]
    fn replay_action(&mut self, actions: u64) {
        self.actions = actions;
        if !self.weighted {
            // Of the same kind as the real cache's (a rerank or a restart: the count's parity).
            let restart = crate::select::is_restart(actions);
            self.one_actions = crate::select::next_action(self.one_actions, restart);
            let tune = tune_word(self.candidate as usize, self.one_actions);
            self.shadows[ONE].retune(tune);
        }
    }

    #[cold]
    fn switch(&mut self, candidate: u64) {
        // What each size's shadow ran: the old configuration, or one its challenger freed it
        // for; from now on, the new configuration.
        let owned = std::mem::replace(&mut self.own, [candidate; 4]);
        if self.challengers() {
            for (k, &i) in CHALLENGED.iter().enumerate() {
                let j = 5 + k;
                if self.challenger[k] == owned[k] {
                    // Not fed while it ran the current configuration (it would have been a
                    // copy): it starts again from its size's current shadow, which ran it.
                    self.shadows[j] = self.shadows[i].clone();
                } else if self.challenger[k] == candidate {
                    // The challenger ran the new configuration all along, on the same
                    // samples: it becomes its size's shadow (rather than that shadow retuned,
                    // carrying the old configuration's state into the new), and the former
                    // shadow, which ran the old configuration, its challenger.
                    self.shadows.swap(i, j);
                    self.window.swap(i, j);
                    self.window.swap(GAIN + i, GAIN + j);
                    self.total.hits.swap(i, j);
                    self.total.gain.swap(i, j);
                    self.epoch.hits.swap(i, j);
                    self.epoch.gain.swap(i, j);
                    self.challenger[k] = owned[k];
                } else {
                    continue;
                }
                self.challenger_gap[k] = 0;
                self.challenger_epochs[k] = 0;
            }
        }
        self.candidate = candidate;
        for (i, s) in self.shadows.iter_mut().take(FACTORS.len()).enumerate() {
            let actions = if i == ONE { self.one_actions } else { 0 };
            s.retune(tune_word(candidate as usize, actions));
        }
    }

    /// At an epoch's end, per challenged size: a challenger that has lost to its size's
    /// shadow (by `CHALLENGER_GAP` of the samples fed, over `CHALLENGER_EPOCHS` at least)
    /// moves to the next candidate other than the shadow's, starting from a copy of that
    /// shadow, with its counts. A challenger that led the shadow by more than `FREE_LEAD` of
    /// the samples in each of `FREE_EPOCHS` epochs in a row frees it: the shadow leaves the
    /// real cache's configuration (or the one it was last freed for) for the next candidate
    /// other than the challenger's, starting from a copy of the challenger, with its counts,
    /// so that a third configuration is tried while the challenger holds its lead (until the
    /// real cache switches: then the shadow follows it again).
    fn rotate_challengers(&mut self) {
        if !self.challengers() {
            return;
        }
        let n = crate::policy::Config::CANDIDATES.len() as u64;
        for (k, &i) in CHALLENGED.iter().enumerate() {
            let j = 5 + k;
            if self.challenger[k] == self.own[k] {
                continue;
            }
            let lead = self.epoch.hits[j] as f64 - self.epoch.hits[i] as f64;
            self.leading[k] = if lead > FREE_LEAD * self.epoch.fed[i].max(1) as f64 {
                self.leading[k] + 1
            } else {
                0
            };
            self.challenger_gap[k] += self.epoch.hits[j] as i64 - self.epoch.hits[i] as i64;
            self.challenger_epochs[k] += 1;
            let fed = self.epoch.fed[i].max(1) as f64 * f64::from(self.challenger_epochs[k]);
            let (from, to, next) = if self.leading[k] >= FREE_EPOCHS {
                (j, i, next_candidate(self.own[k], self.challenger[k], n))
            } else if self.challenger_epochs[k] >= CHALLENGER_EPOCHS
                && (self.challenger_gap[k] as f64) < -CHALLENGER_GAP * fed
            {
                (i, j, next_candidate(self.challenger[k], self.own[k], n))
            } else {
                continue;
            };
            if to == i {
                self.own[k] = next;
            } else {
                self.challenger[k] = next;
            }
            self.leading[k] = 0;
            self.challenger_gap[k] = 0;
            self.challenger_epochs[k] = 0;
            let mut sh = self.shadows[from].clone();
            sh.retune(tune_word(next as usize, 0));
            self.shadows[to] = sh;
            self.window[to] = self.window[from];
            self.window[SLOTS + to] = self.window[SLOTS + from];
            self.window[GAIN + to] = self.window[GAIN + from];
            self.total.gain[to] = self.total.gain[from];
            self.total.hits[to] = self.total.hits[from];
            self.total.fed[to] = self.total.fed[from];
        }
    }

    /// One sampled `get` (a sample as `select::sample` makes it), with the real cache's
    /// configuration `tune`. Keys above the sizing threshold are ignored.
    pub(crate) fn feed(&mut self, s: u64, tune: u64) {
        let hash = s & !3;
        if !crate::select::Selector::sampled(hash, self.threshold) {
            return;
        }
        self.follow(tune);
        let real_hit = (s >> 1) & 1 == 1;
        if self.weighted {
            // A shadow that misses a key the real cache missed too gets it from the sampled
            // insert that follows (with its weight). One that misses a key the real cache hit
            // inserts it now, with its last known weight (or the mean).
            let w = self.weight_of(hash);
            let mut missed = 0u8;
            for (i, sh) in self.shadows.iter_mut().enumerate() {
                // A weight above any shadow's capacity: a lookup, nothing inserted.
                let hit = sh.access(hash, u32::MAX);
                self.epoch.hits[i] += u64::from(hit);
                self.epoch.fed[i] += 1;
                if !hit {
                    if real_hit {
                        sh.access(hash, w);
                    } else {
                        missed |= 1 << i;
                    }
                }
            }
            if !real_hit {
                self.pending[(hash >> 40) as usize % PENDING] = (hash, missed);
            }
        } else {
            // A challenger running its size's shadow's configuration would be a copy of it:
            // not fed, it counts the same results.
            // The 1 × shadow sees every sample: its hits on each subset are the reference
            // that corrects the subset's own sampling error (see `ratio`).
            let low = u64::from(hash as u32);
            let one = u64::from(self.shadows[ONE].access(hash, 1));
            for i in 0..FACTORS.len() {
                if low < self.thresholds[i] {
                    let hit = if i == ONE {
                        one
                    } else {
                        u64::from(self.shadows[i].access(hash, 1))
                    };
                    self.epoch.hits[i] += hit;
                    self.epoch.fed[i] += 1;
                    self.epoch.reference[i] += one;
                    self.epoch.gain[i] += hit & (one ^ 1);
                    if let Some(k) = CHALLENGED.iter().position(|&c| c == i) {
                        let hit = if self.challenger[k] == self.own[k] {
                            hit
                        } else {
                            u64::from(self.shadows[5 + k].access(hash, 1))
                        };
                        self.epoch.hits[5 + k] += hit;
                        self.epoch.fed[5 + k] += 1;
                        self.epoch.gain[5 + k] += hit & (one ^ 1);
                    }
                }
            }
        }
        self.epoch.real += u64::from(real_hit);
        self.epoch.n += 1;
        if self.epoch.n >= EPOCH {
            self.end_epoch();
        }
    }

    /// The first of the two slots (a set) that may hold `hash`'s weight. Two ways: with one,
    /// two of 51 sampled keys shared a slot in about one run of three, and the key evicted
    /// from the table was re-inserted into a shadow at the mean weight (a key of weight 0 as
    /// 1: a tiny cache's points were off by more than 2 points once in about 50 runs).
    fn weight_set(hash: u64) -> usize {
        (((hash >> 40) ^ (hash >> 52) ^ (hash & 0xff)) as usize % WEIGHT_SLOTS) & !1
    }

    /// The slot of `hash`'s set whose tag is `hash`'s, if any.
    fn weight_slot(&self, hash: u64) -> Option<usize> {
        let set = Self::weight_set(hash);
        (set..set + 2).find(|&i| self.weights[i] != 0 && self.weights[i] >> 32 == hash >> 32)
    }

    /// The weight last inserted for `hash`, or the mean of those seen.
    fn weight_of(&self, hash: u64) -> u32 {
        if let Some(i) = self.weight_slot(hash) {
            return self.weights[i] as u32;
        }
        u32::try_from(self.weight_sum / self.weight_count.max(1))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// One sampled insert of weight `weight` (weighted caches only; the hash as the cache
    /// computed it). Returns a new sampling threshold when the mean weight of the sampled
    /// inserts (checked at 32, 64, 128 … of them) moved the rate (see
    /// [`calibrate`](Self::calibrate)); [`Cache::sizing`](crate::Cache::sizing) calibrates on
    /// the cache's entries. That mean lags a weight that changes (a recent mean, checked every
    /// 64 inserts, was tried: against `sizing`'s own calibration on the entries it moved the
    /// rate back and forth, each move restarting the curve); the shadows' entry cap
    /// ([`WEIGHTED_ENTRIES_CAP`]) bounds what a lagging rate costs (50,000 inserts of weight
    /// 50 then 80,000 of weight 1 kept 7 MiB of shadows without it).
    pub(crate) fn feed_insert(&mut self, hash: u64, weight: u32, tune: u64) -> Option<u64> {
        let hash = hash & !3;
        if !self.weighted || !crate::select::Selector::sampled(hash, self.threshold) {
            return None;
        }
        self.follow(tune);
        // The shadows take the weight as the cache does (an entry of weight 0 does not count
        // toward the bound: simulated as 1, a cache of zero-weight entries that holds them
        // all was predicted to miss); the mean weight that sets the rate counts it as 1.
        // Its own slot, else an empty one of its set, else the way the hash picks.
        let set = Self::weight_set(hash);
        let slot = self.weight_slot(hash).unwrap_or_else(|| {
            if self.weights[set] == 0 {
                set
            } else if self.weights[set + 1] == 0 {
                set + 1
            } else {
                set + (hash >> 33) as usize % 2
            }
        });
        self.weights[slot] = (hash >> 32) << 32 | u64::from(weight);
        // A value heavier than the whole cache is turned away: it says nothing of the weight
        // of the entries the cache holds (one in 17 such inserts set a rate that filled the
        // shadows with the light keys).
        if u64::from(weight) <= self.capacity {
            self.weight_sum = self.weight_sum.saturating_add(u64::from(weight.max(1)));
            self.weight_count += 1;
        }
        // After its sampled miss: into the shadows that missed it. Otherwise (a write without
        // a read, an overwrite, or the miss was lost): into all, where a shadow holding it
        // takes the new weight.
        let slot = &mut self.pending[(hash >> 40) as usize % PENDING];
        let mask = if slot.0 == hash && hash != 0 {
            std::mem::take(slot).1
        } else {
            u8::MAX
        };
        for (i, sh) in self.shadows.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                sh.write(hash, weight);
            }
        }
        if self.weight_count >= 32 && self.weight_count.is_power_of_two() {
            return self.calibrate(self.weight_sum, self.weight_count);
        }
        None
    }

    fn end_epoch(&mut self) {
        self.epoch = self.epoch_now();
        self.requests_mark = self.requests_now;
        self.hits_mark = self.hits_now.unwrap_or(0);
        let e = self.epoch.as_f64();
        for (w, x) in self.window.iter_mut().zip(e) {
            *w = *w * DECAY + x;
        }
        self.total.add(&self.epoch);
        self.rotate_challengers();
        self.epoch = Counts::default();
    }

    /// With a weigher: re-derives the rate from a mean entry weight (`weighted_size /
    /// entries`: the cache's, or the sampled inserts'), rebuilding the shadows when the rate it implies is more
    /// than 2 × away from the current one. Returns the new threshold when it changed.
    pub(crate) fn calibrate(&mut self, weighted_size: u64, entries: u64) -> Option<u64> {
        if !self.weighted || entries == 0 {
            return None;
        }
        // Rounded to the nearest (round 99: truncated, a mean of 2.98 was 2, the rate then
        // "within 2 ×" of the one for a weight of 1 and left 3 × off). Capped so that the 4 ×
        // shadow's capacity stays far below `u32::MAX` (a lookup's weight): documented.
        let mean = (weighted_size.saturating_add(entries / 2) / entries).clamp(1, MAX_MEAN_WEIGHT);
        let want = threshold_for(self.capacity, ENTRIES.saturating_mul(mean));
        if want <= self.threshold.saturating_mul(2) && want.saturating_mul(2) >= self.threshold {
            return None;
        }
        self.mean_weight = mean;
        self.rebuild(u64::MAX);
        Some(self.threshold)
    }

    /// The hit ratio of slot `i` (or the real cache's, `i` = `SLOTS`) from counts `c`.
    ///
    /// SHARDS's adjustment: the sampled requests expected but not seen (or seen but not
    /// expected) are the few hottest keys' surplus or deficit, counted as hits everywhere.
    ///
    /// A slot fed a subset of the samples (share `s` of them, under a lower threshold) is
    /// first brought to the full sample by difference with the 1 × shadow, which sees every
    /// sample: its hits on the full sample plus the difference on the subset, scaled up. The
    /// two shadows' hits on one subset move together with the keys the subset happens to hold
    /// (a hot key in it hits in both), so their difference carries much less of the subset's
    /// sampling error than the slot's hits alone. The difference is the slot's *gains* (it
    /// hit, the 1 × shadow missed) less its *losses* (the reverse): the gains are scaled by
    /// the share of the 1 × shadow's misses the subset actually held, the losses by `s`. A
    /// key the 1 × shadow misses is no hot key, so the realised share of those misses
    /// carries none of the hot keys' weight, and on a loop (where every difference is a
    /// gain) it is exact; with both scaled by `s` a loop that fits at 2 × was predicted at
    /// 93.5 % (round 92: 15,000 keys at 10,000 entries, `/ s` left the subset's size
    /// noise, ±3.6 % at 2 ×, in the point).
    fn ratio(&self, i: usize, c: &[f64; WIDTH]) -> f64 {
        let (n, expected) = (c[N], c[EXPECTED]);
        let (h, fed, share) = if i == SLOTS {
            (c[REAL], n, 1.0)
        } else {
            (
                c[i],
                c[SLOTS + i],
                self.thresholds[i] as f64 / self.threshold.max(1) as f64,
            )
        };
        if fed <= 0.0 {
            return 0.0;
        }
        // Only on an epoch's worth of samples at least: the read counters are approximate
        // (each thread adds 64 at a time), which swamps a handful of samples.
        if n < EPOCH as f64 {
            return h / fed;
        }
        // Hits in units of the full sample (by difference with the 1 × shadow on the subset).
        // (A weigher's shadows all see every sample: share 1, no reference needed.)
        debug_assert!(share >= 1.0 || !self.weighted);
        let h = if share < 1.0 {
            let factor = if i < FACTORS.len() {
                i
            } else {
                CHALLENGED[i - FACTORS.len()]
            };
            let reference = c[REF + factor];
            // The gains (this slot hit, the 1 × shadow missed) scaled by the share of the 1 ×
            // shadow's misses the subset actually held; the losses by the nominal share.
            let gain = c[GAIN + i];
            let loss = (gain - (h - reference)).max(0.0);
            let one_missed = fed - reference;
            let gains = if one_missed > 0.0 {
                gain * (n - c[ONE]) / one_missed
            } else {
                0.0
            };
            c[ONE] + gains - loss / share
        } else {
            h
        };
        // At rate 1 every request is a sample: there is no sampling error to adjust for, and
        // the approximate read counters (up to 63 reads per thread not yet added) would only
        // add theirs — with many threads and few reads, most of the count (seen: 64 threads,
        // 5,000 reads in 3 s, a true 29 % predicted 13 %).
        let expected = if expected > 0.0 && self.threshold < 1 << 32 {
            expected
        } else {
            n
        };
        ((h + expected - n) / expected).clamp(0.0, 1.0)
    }

    /// The anchor of counts `c`: the cache's own hit ratio over every request (its
    /// statistics') less the real cache's on the sampled ones, to be added to every point;
    /// 0 without statistics or before an epoch's worth of samples.
    ///
    /// The sampled keys are a random share of the keys: their own hit ratio can sit a few
    /// points off the cache's (on the P6 trace at 20,000 entries, 14.8 % on the samples against
    /// 17.8 % over every request, in one run of twenty), and every shadow, fed the same keys,
    /// carries that error. The cache knows its own ratio exactly, so each point is its
    /// prediction's difference from the real cache on the same samples, added to that ratio.
    fn anchor(&self, c: &[f64; WIDTH]) -> f64 {
        if c[ALL_READS] <= 0.0 || c[N] < EPOCH as f64 {
            return 0.0;
        }
        (c[ALL_HITS] / c[ALL_READS]).clamp(0.0, 1.0) - self.ratio(SLOTS, c)
    }

    /// The curve now.
    pub(crate) fn snapshot(&self) -> Sizing {
        let epoch = self.epoch_now();
        let e = epoch.as_f64();
        let mut w = self.window;
        for (x, y) in w.iter_mut().zip(e) {
            *x += y;
        }
        let mut t = self.total;
        t.add(&epoch);
        let t = t.as_f64();
        let mut points = [(0, 0.0); 5];
        let mut since_start = [(0, 0.0); 5];
        for (i, &(num, den)) in FACTORS.iter().enumerate() {
            let c = point_capacity(self.capacity, num, den);
            points[i] = (c, self.ratio(i, &w));
            since_start[i] = (c, self.ratio(i, &t));
            if let Some(k) = CHALLENGED
                .iter()
                .position(|&c| c == i)
                .filter(|_| !self.weighted)
            {
                points[i].1 = points[i].1.max(self.ratio(5 + k, &w));
                since_start[i].1 = since_start[i].1.max(self.ratio(5 + k, &t));
            }
        }
        let (dw, dt) = (self.anchor(&w), self.anchor(&t));
        for p in &mut points {
            p.1 = (p.1 + dw).clamp(0.0, 1.0);
        }
        for p in &mut since_start {
            p.1 = (p.1 + dt).clamp(0.0, 1.0);
        }
        if cfg!(herdcache_broken_sizing) {
            // A planted bug for tests/sizing.rs to catch: the observed ratio copied everywhere.
            for p in points.iter_mut().chain(since_start.iter_mut()) {
                p.1 = self.ratio(SLOTS, &w) + dw;
            }
        }
        Sizing {
            points,
            observed: self.ratio(SLOTS, &w) + dw,
            samples: w[N],
            since_start,
            observed_since_start: self.ratio(SLOTS, &t) + dt,
            samples_since_start: t[N] as u64,
            rate: self.rate(),
            capacity: self.max_capacity,
        }
    }
}

/// [`Sizing::suggested_capacity`]: a larger capacity is suggested when it is predicted to gain
/// at least this many points, and the smallest within this many points of the best.
pub const SUGGEST_MARGIN_POINTS: f64 = 2.0;

/// The predicted hit-ratio curve of a cache built with
/// [`track_sizing`](crate::CacheBuilder::track_sizing): the hit ratio it would have had, over a
/// recent window of requests, at 0.25, 0.5, 1, 2 and 4 × its `max_capacity`, and the hit ratio
/// it did have over the same requests. A snapshot: [`Cache::sizing`](crate::Cache::sizing)
/// returns a new one each time.
///
/// The window is exponentially decayed: every 2000 sampled requests, older counts are
/// multiplied by 0.95 (a mean age of about `40_000 /` [`rate`](Self::rate) requests, about 20
/// × `max_capacity` for an entry-bounded cache of 4,096 entries or more, 40 × from 1,024 to
/// 4,095). Predictions are made on
/// the sampled requests only (a fraction [`rate`](Self::rate) of the keys, chosen by hash);
/// [`samples`](Self::samples) says on how many requests. With
/// [`record_stats`](crate::CacheBuilder::record_stats) the observed ratio is the cache's own
/// over every request and the points are anchored to it (each is the observed ratio plus its
/// shadow's difference from the real cache on the same samples); without, the observed ratio
/// is the sampled requests' too. Before any sampled request every ratio is 0.
///
/// **Accuracy.** Measured on 21 trace/capacity rows (BENCHMARKS.md, with
/// [`record_stats`](crate::CacheBuilder::record_stats) on, which the hot-key adjustment and
/// the anchor need without a time to live): at 0.5 × and 2 × the mean error is 0.36–0.58
/// points in 20 runs; the worst row moves with the hash seed, which picks the sampled keys
/// (2.0–4.2 points, at most 4 in 18 runs of the 20: the misses are the 0.5 × points of the
/// rows sampled at the lowest rates, P3 at 400,000 entries and P6 at 160,000). The 1 × point
/// is within 1 point of the observed ratio in 17 of the 20 runs (worst 0.25–1.40). The 0.25 × point comes from the smallest shadow (32 entries beyond 1,024 entries of
/// capacity) and is coarse: up to 9–21 points off on one row in some runs; read it as a
/// direction, not a figure. The points
/// predict capacity misses only: not expiries, and not failed loads (a key whose load fails
/// stores nothing, but the shadows take it in as if it had been inserted: a cache whose misses
/// are mostly failures sees points above what a larger cache would hit).
///
/// # Example
///
/// ```
/// let cache = herdcache::Cache::<u64, u64>::builder()
///     .max_capacity(100)
///     .track_sizing()
///     .build();
/// // A working set of 150 keys, read in a loop: too big for 100 entries, fits in 200.
/// for i in 0..30_000u64 {
///     let k = i % 150;
///     if cache.get(&k).is_none() {
///         cache.insert(k, k);
///     }
/// }
/// let s = cache.sizing().expect("tracked");
/// let at = |c: u64| s.points().iter().find(|p| p.0 == c).unwrap().1;
/// assert!(at(200) > 0.9, "{s:?}");
/// assert!(at(200) > at(100));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Sizing {
    points: [(u64, f64); 5],
    observed: f64,
    samples: f64,
    since_start: [(u64, f64); 5],
    observed_since_start: f64,
    samples_since_start: u64,
    rate: f64,
    /// The cache's `max_capacity` (the points are at least 1: for a capacity of 0 every
    /// point is above it).
    capacity: u64,
}

impl Sizing {
    /// (capacity, predicted hit ratio as a fraction in 0..=1) over the window, ordered by
    /// capacity: 0.25, 0.5, 1, 2 and 4 × `max_capacity` (in weight units with a weigher; at
    /// least 1).
    pub fn points(&self) -> &[(u64, f64)] {
        &self.points
    }

    /// The predicted hit ratio at the tracked capacity nearest to `capacity` (see
    /// [`points`](Self::points)).
    pub fn predicted_at(&self, capacity: u64) -> f64 {
        self.points
            .iter()
            .min_by_key(|p| p.0.abs_diff(capacity))
            .map_or(0.0, |p| p.1)
    }

    /// The capacity to configure, by this curve: the smallest tracked capacity above
    /// `max_capacity` whose predicted hit ratio is within [`SUGGEST_MARGIN_POINTS`] of the best
    /// point's (at or above `max_capacity`) — or `None` when no larger capacity is predicted
    /// to gain that many points over the 1 × point (the misses are not for want of room, or
    /// the cache is big enough). For a `max_capacity` of 0, whose points are all above it (at
    /// least 1), the gain is over the observed ratio. [`Warning::Thrashing`](crate::Warning::Thrashing) quotes it.
    ///
    /// ```
    /// let cache = herdcache::Cache::<u64, u64>::builder()
    ///     .max_capacity(100)
    ///     .track_sizing()
    ///     .build();
    /// for i in 0..30_000u64 {
    ///     let k = i % 150; // a loop over 150 keys: fits in 200 entries
    ///     if cache.get(&k).is_none() {
    ///         cache.insert(k, k);
    ///     }
    /// }
    /// assert_eq!(cache.sizing().unwrap().suggested_capacity(), Some(200));
    /// ```
    pub fn suggested_capacity(&self) -> Option<u64> {
        let p = &self.points;
        let margin = SUGGEST_MARGIN_POINTS / 100.0;
        // The cache's own ratio and the points at or above its capacity: the 1 × point and
        // up; for a `max_capacity` of 0 (every point is at least 1) its observed ratio, and
        // every point.
        let (own, at_or_above) = if self.capacity == 0 {
            (self.observed, &p[..])
        } else {
            (p[2].1, &p[2..])
        };
        let best = at_or_above.iter().map(|x| x.1).fold(0.0, f64::max);
        if best - own < margin {
            return None;
        }
        at_or_above
            .iter()
            .find(|x| x.0 > self.capacity && x.1 >= best - margin)
            .map(|x| x.0)
    }

    /// The cache's `max_capacity` (the points' 1 × capacity, but for a capacity of 0).
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The real cache's hit ratio over the same window: with
    /// [`record_stats`](crate::CacheBuilder::record_stats), over every request (the
    /// statistics' hits and misses; the points are anchored to it, see the module docs of
    /// `sizing` in the source, "Anchor"); without, over the sampled requests only.
    pub fn observed(&self) -> f64 {
        self.observed
    }

    /// The (decayed) number of sampled requests in the window.
    pub fn samples(&self) -> f64 {
        self.samples
    }

    /// Like [`points`](Self::points), over every sampled request since the cache was built
    /// (for replaying a whole trace; a weighted cache restarts these when its rate changes).
    pub fn points_since_start(&self) -> &[(u64, f64)] {
        &self.since_start
    }

    /// Like [`observed`](Self::observed), since the cache was built.
    pub fn observed_since_start(&self) -> f64 {
        self.observed_since_start
    }

    /// Sampled requests since the cache was built.
    pub fn samples_since_start(&self) -> u64 {
        self.samples_since_start
    }

    /// The share of keys sampled (by hash), in 0..=1.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::sample;

    /// Feeds `n` sampled gets (all real misses) of keys drawn at random from `keys`, with
    /// the real cache running tune word `tune`.
    fn random_feed(keys: u64) -> impl FnMut(&mut Tracker, u64, usize) {
        let mut x = 7u64;
        move |t, tune, n| {
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t.feed(sample(h(x % keys), false), tune);
            }
        }
    }

    fn h(k: u64) -> u64 {
        let x = (k ^ 0x7777).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    #[test]
    fn the_rate_aims_for_2000_entries() {
        let t = Tracker::new(100_000, false, 0, 1, u64::MAX, false);
        assert!((t.snapshot().rate() - 0.02).abs() < 1e-6);
        let t = Tracker::new(500, false, 0, 1, u64::MAX, false);
        assert_eq!(t.snapshot().rate(), 1.0);
        let caps: Vec<u64> = t.snapshot().points().iter().map(|p| p.0).collect();
        assert_eq!(caps, [125, 250, 500, 1000, 2000]);
        // Never above the selector's.
        let t = Tracker::new(500, false, 0, 1, 1 << 20, false);
        assert_eq!(t.threshold(), 1 << 20);
    }

    #[test]
    fn large_shadows_see_nested_subsets_except_at_rate_1() {
        // The selector's threshold at 100,000 entries: 1,024 entries at 1 ×.
        let sel = crate::select::Selector::new(100_000, 1).threshold();
        let t = Tracker::new(100_000, false, 0, 1, sel, false);
        assert_eq!(t.threshold(), sel);
        let sizes: Vec<u64> = t.shadows.iter().map(Shadow::capacity).collect();
        assert_eq!(sizes, [32, 512, 1024, 1024, 512, 32, 512, 1024, 512]);
        let shares: Vec<f64> = t
            .thresholds
            .iter()
            .map(|&x| x as f64 / sel as f64)
            .collect();
        for (s, want) in shares
            .iter()
            .zip([0.125, 1.0, 1.0, 0.5, 0.125, 0.125, 1.0, 0.5, 0.125])
        {
            assert!((s - want).abs() < 1e-3, "{shares:?}");
        }
        // Nested: a key fed to a smaller share is fed to every larger one.
        assert!(t.thresholds[3] <= t.thresholds[2] && t.thresholds[4] <= t.thresholds[3]);
        // At rate 1 every shadow sees every request, at full size.
        let t = Tracker::new(1000, false, 0, 1, u64::MAX, false);
        assert!(t.thresholds.iter().all(|&x| x == 1 << 32));
        let sizes: Vec<u64> = t.shadows.iter().map(Shadow::capacity).collect();
        assert_eq!(sizes, [250, 500, 1000, 2000, 4000, 250, 500, 2000, 4000]);
    }

    #[test]
    fn the_1x_shadow_holds_2000_entries_from_32000_up() {
        // As the cache builds it: the curve's threshold, above the selector's.
        let sel = crate::select::Selector::new(100_000, 1).threshold();
        let t = Tracker::new(100_000, false, 0, 1, unweighted_threshold(100_000), false);
        assert_eq!(t.threshold(), threshold_for(100_000, 2000));
        assert!(t.threshold() > sel);
        let sizes: Vec<u64> = t.shadows.iter().map(Shadow::capacity).collect();
        assert_eq!(sizes, [32, 512, 2000, 1024, 512, 32, 512, 1024, 512]);
        // A sixteenth of the capacity between 16,384 and 32,000 entries; 1,024 below.
        assert_eq!(unweighted_threshold(24_000), threshold_for(24_000, 1500));
        assert_eq!(unweighted_threshold(10_000), threshold_for(10_000, 1024));
        assert_eq!(unweighted_threshold(4095), threshold_for(4095, 1024));
        assert_eq!(unweighted_threshold(1000), 1 << 32);
    }

    #[test]
    fn the_half_shadow_keeps_its_share_of_the_requests_above_100000() {
        let half = |cap: u64| {
            let t = Tracker::new(cap, false, 0, 1, unweighted_threshold(cap), false);
            (
                t.shadows[1].capacity(),
                t.shadows[6].capacity(),
                t.thresholds[1],
                t.threshold(),
            )
        };
        // 512 up to 100,000 entries of capacity; then in proportion (a shadow of 50,000 × its
        // rate at 100,000 sees 1 request in about 98; at 160,000, 819 of 80,000 the same).
        assert_eq!(half(50_000).0, 512);
        assert_eq!(half(100_000).0, 512);
        let (size, challenger, thr, all) = half(160_000);
        assert!((818..=820).contains(&size), "{size}");
        assert_eq!(challenger, size);
        assert!(thr < all);
        let share = |cap: u64, size: u64| size as f64 / (cap as f64 / 2.0);
        assert!((share(160_000, size) - share(100_000, 512)).abs() < 1e-4);
        // Every sample from about 195,000 up: 1,000 entries at 0.5 × of a 2,000-entry 1 ×.
        let (size, _, thr, all) = half(400_000);
        assert_eq!((size, thr), (1000, all));
    }

    #[test]
    fn the_1x_shadow_replays_the_real_caches_convergence_actions() {
        let mut t = Tracker::new(100_000, false, 0, 1, unweighted_threshold(100_000), false);
        let key = (0u64..)
            .map(h)
            .find(|&x| (x as u32 as u64) < t.threshold())
            .unwrap();
        let sample = crate::select::sample(key, false);
        t.feed(sample, tune_word(0, 0));
        assert_eq!(t.shadows[ONE].tune(), tune_word(0, 0));
        // The real cache took an action: the 1 × shadow takes it, the others do not.
        t.feed(sample, tune_word(0, 1));
        assert_eq!(t.shadows[ONE].tune(), tune_word(0, 1));
        for (i, sh) in t.shadows.iter().enumerate().take(FACTORS.len()) {
            if i != ONE {
                assert_eq!(sh.tune(), tune_word(0, 0), "shadow {i}");
            }
        }
        // A switch keeps the 1 × shadow's count (a count that changes is an action).
        t.feed(sample, tune_word(2, 1));
        assert_eq!(t.shadows[ONE].tune(), tune_word(2, 1));
        assert_eq!(t.shadows[3].tune(), tune_word(2, 0));
        t.feed(sample, tune_word(2, 2));
        assert_eq!(t.shadows[ONE].tune(), tune_word(2, 2));
    }

    #[test]
    fn a_subset_that_holds_none_of_the_hot_keys_is_corrected_by_the_1x_shadow() {
        // At 100,000 entries the 2 × shadow sees half the samples (those whose low hash bits
        // are under its threshold). Plant the worst draw: every hot key outside that half,
        // every one-time key inside it. At every size the hot keys hit and the one-time keys
        // miss (2 of 3 requests hit), but the subset alone sees only misses.
        let sel = crate::select::Selector::new(100_000, 1).threshold();
        let mut t = Tracker::new(100_000, false, 0, 1, sel, false);
        let (half, all) = (t.thresholds[3], t.threshold);
        assert!(half < all);
        let with_low = |k: u64, lo: u64, hi: u64| (h(k) & !0xffff_ffff) | (lo + k % (hi - lo));
        for i in 0..60_000u64 {
            let hash = if i % 3 == 2 {
                with_low(i, 0, half) // one-time, in the subset
            } else {
                with_low(i % 100, half, all) // hot, outside it
            };
            t.feed(sample(hash & !3, false), 0);
        }
        let s = t.snapshot();
        let (two_x, one_x) = (s.points()[3].1, s.points()[2].1);
        assert!((one_x - 2.0 / 3.0).abs() < 0.01, "{s:?}");
        // By the subset's own counts (its deficit counted as hits) it would be 1/3.
        assert!((two_x - one_x).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn a_losing_challenger_moves_on_and_a_winning_one_stays() {
        // Loops 1.5 × the size of the shadow under test: frequency admission (window 0 %)
        // keeps a stable part of the loop; a large LRU window gets next to nothing.
        let run = |current: u64, keys: u64| {
            let mut t = Tracker::new(
                1000,
                false,
                tune_word(current as usize, 0),
                1,
                u64::MAX,
                false,
            );
            for i in 0..60_000u64 {
                t.feed(sample(h(i % keys), false), tune_word(current as usize, 0));
            }
            t
        };
        // Current window 80 %, a loop of 750 keys: the 0.5 × challenger (window 0 %) wins
        // there and keeps its configuration; leading by far, it frees its size's shadow to
        // try the other candidates; the point is the better of the two.
        let t = run(3, 750);
        assert_eq!(t.challenger[1], 0);
        // (The freed shadow never runs the challenger's configuration; trailing it by far
        // under each other candidate, it keeps moving on.)
        assert_ne!(t.own[1], 0, "{:?}", t.own);
        let (primary, challenger) = (t.ratio(1, &t.window), t.ratio(6, &t.window));
        assert!(challenger > 0.5, "{primary} {challenger}");
        assert_eq!(t.snapshot().points()[1].1, challenger.max(primary));
        // Current window 0 %, a loop of 3,000 keys: the 2 × challenger (window 20 % + ghost)
        // trails window 0 % there and moves on (never to the current configuration); the
        // 0.5 × one runs the current configuration, so it is not fed and stays.
        let t = run(0, 3000);
        // (Every other candidate trails window 0 % there: it cycles through them.)
        assert!(t.challenger_epochs[2] < 30, "{:?}", t.challenger_epochs);
        assert_ne!(t.challenger[2], 0);
        // At 4 × the loop fits: a tie, so that challenger stays, fed all along.
        assert_eq!((t.challenger[3], t.challenger_epochs[3]), (2, 30));
        assert_eq!(t.challenger[1], 0);
        assert_eq!(t.shadows[6].hits(), 0);
        let p = t.snapshot().points()[3].1;
        assert!(p >= t.ratio(3, &t.window), "{p}");
    }

    #[test]
    fn a_switch_to_a_challengers_configuration_swaps_the_two() {
        let mut t = Tracker::new(1000, false, 0, 1, u64::MAX, false);
        let mut run = random_feed(5000);
        run(&mut t, 0, 10_000);
        // The 2 × challenger runs window 20 % + ghost on its own.
        assert_eq!(t.challenger[2], 2);
        let (challenger_hits, current_hits) = (t.shadows[7].hits(), t.shadows[3].hits());
        let totals = (t.total.hits[7], t.total.hits[3]);
        assert_ne!(challenger_hits, current_hits);
        // The real cache moves to window 20 % + ghost: the 2 × challenger, which ran it all
        // along, becomes the 2 × shadow (its state and counts), and the former 2 × shadow
        // (window 0 %) the challenger — no shadow carries one configuration's state into
        // another.
        t.follow(tune_word(2, 0));
        assert_eq!(t.challenger[2], 0);
        assert_eq!(
            (t.shadows[3].hits(), t.shadows[7].hits()),
            (challenger_hits, current_hits)
        );
        assert_eq!((t.total.hits[3], t.total.hits[7]), totals);
        assert_eq!(t.shadows[3].tune() & 0xff, 2);
        assert_eq!(t.shadows[7].tune() & 0xff, 0);
        // The 1 × shadow, which has no challenger, is retuned; the 0.5 × challenger (window
        // 0 %, the old configuration, so not fed until now) starts from a copy of its size's
        // shadow, which ran it.
        assert_eq!(t.shadows[ONE].tune() & 0xff, 2);
        assert_eq!(t.challenger[1], 0);
        assert_eq!(t.shadows[6].hits(), t.shadows[1].hits());
        assert!(t.shadows[6].hits() > 0);
        run(&mut t, tune_word(2, 0), 5000);
        assert!(
            t.shadows[7].hits() > current_hits,
            "the new challenger is fed"
        );
    }

    #[test]
    fn window_0_shadows_copy_the_current_ones_until_the_configuration_changes() {
        let mut t = Tracker::new(1000, false, 0, 1, u64::MAX, false);
        let mut run = random_feed(3000);
        run(&mut t, 0, 5000);
        assert_eq!(t.epoch.hits[5], t.epoch.hits[0]);
        assert_eq!(t.epoch.fed[6], t.epoch.fed[1]);
        assert_eq!(
            t.shadows[5].hits(),
            0,
            "not fed while window 0 % is current"
        );
        // Window 20 %: the challengers start as copies of the current shadows and run on their
        // own.
        run(&mut t, tune_word(2, 0), 5000);
        assert!(t.shadows[5].hits() > 0);
        let s = t.snapshot();
        assert!(
            s.points()[0].1 > 0.0 && s.points()[1].1 >= s.points()[0].1,
            "{s:?}"
        );
    }

    #[test]
    fn the_window_decays_and_the_totals_do_not() {
        let mut t = Tracker::new(100, false, 0, 1, u64::MAX, false);
        // 20 epochs of a working set that fits, then 20 of distinct keys.
        for i in 0..40_000u64 {
            t.feed(sample(h(i % 50), true), 0);
        }
        for i in 0..40_000u64 {
            t.feed(sample(h(1_000_000 + i), false), 0);
        }
        let s = t.snapshot();
        assert!(s.observed() < 0.4, "decayed: {s:?}");
        assert!((s.observed_since_start() - 0.5).abs() < 1e-9, "{s:?}");
        assert!(
            s.points()[2].1 < 0.4 && s.points_since_start()[2].1 > 0.49,
            "{s:?}"
        );
    }

    #[test]
    fn points_are_anchored_to_the_caches_own_hit_ratio() {
        // Rate 1 (100 entries): every request is a sample. The samples say the real cache hit
        // half of them (a working set of 50 keys, then 50 distinct keys per round); the
        // statistics say 70 % of every request hit. With them, each point moves by the 20
        // points between the two, so the 1 × point's error against the observed ratio stays
        // what it was; without them (no hit count), nothing moves.
        let run = |hits: Option<bool>| {
            let mut t = Tracker::new(100, false, 0, 1, u64::MAX, true);
            let mut reads = 0u64;
            for round in 0..40u64 {
                for i in 0..1000u64 {
                    let k = if i % 2 == 0 {
                        i % 100
                    } else {
                        1_000_000 + round * 1000 + i
                    };
                    reads += 1;
                    if t.near_epoch_end() {
                        t.set_requests(Some(reads), hits.map(|_| reads * 7 / 10));
                    }
                    t.feed(sample(h(k), i % 2 == 0), 0);
                }
            }
            t.set_requests(Some(reads), hits.map(|_| reads * 7 / 10));
            t.snapshot()
        };
        let (plain, anchored) = (run(None), run(Some(true)));
        assert!(
            (plain.observed_since_start() - 0.5).abs() < 1e-6,
            "{plain:?}"
        );
        assert!(
            (anchored.observed_since_start() - 0.7).abs() < 1e-3,
            "{anchored:?}"
        );
        assert!((anchored.observed() - 0.7).abs() < 1e-3, "{anchored:?}");
        for (p, a) in plain
            .points_since_start()
            .iter()
            .zip(anchored.points_since_start())
        {
            assert!(
                (a.1 - (p.1 + 0.2).min(1.0)).abs() < 1e-3,
                "{plain:?} {anchored:?}"
            );
        }
        let (p1, a1) = (plain.points()[2].1, anchored.points()[2].1);
        assert!(
            ((a1 - anchored.observed()) - (p1 - plain.observed())).abs() < 1e-3,
            "{plain:?} {anchored:?}"
        );
    }

    #[test]
    fn weighted_shadows_insert_on_inserts_only() {
        let mut t = Tracker::new(2000, true, tune_word(1, 0), 1, u64::MAX, false);
        for round in 0..3 {
            for k in 0..100u64 {
                t.feed(sample(h(k), round > 0), 0);
                if round == 0 {
                    // Weight 10: 100 keys need 1000 units: they fit at 1 × and above.
                    t.feed_insert(h(k), 10, 0);
                }
            }
        }
        let s = t.snapshot();
        assert!((s.predicted_at(2000) - 2.0 / 3.0).abs() < 1e-9, "{s:?}");
        assert!(s.predicted_at(500) < 0.5, "{s:?}");
    }

    #[test]
    fn the_weight_table_keeps_two_keys_of_one_set() {
        let mut t = Tracker::new(2000, true, tune_word(1, 0), 1, u64::MAX, false);
        // Three hashes of one set (same bits 40.., low byte): two are kept, the third
        // replaces one of them; every other hash of the table's keys keeps its weight.
        let (a, b, c) = (1u64 << 32, 2u64 << 32, 3u64 << 32);
        assert_eq!(Tracker::weight_set(a), Tracker::weight_set(b));
        assert_eq!(Tracker::weight_set(a), Tracker::weight_set(c));
        t.feed_insert(a, 0, 0);
        t.feed_insert(b, 7, 0);
        assert_eq!((t.weight_of(a), t.weight_of(b)), (0, 7));
        t.feed_insert(b, 9, 0);
        assert_eq!((t.weight_of(a), t.weight_of(b)), (0, 9));
        t.feed_insert(c, 5, 0);
        assert_eq!(t.weight_of(c), 5);
        let kept = [t.weight_slot(a), t.weight_slot(b)];
        assert_eq!(kept.iter().filter(|s| s.is_some()).count(), 1, "{kept:?}");
        // Not in the table: the mean of the inserts seen (0 counted as 1): (1 + 7 + 9 + 5) / 4.
        let gone = if kept[0].is_none() { a } else { b };
        assert_eq!(t.weight_of(gone), 5);
    }
}
