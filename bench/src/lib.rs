//! `herdcache-bench`: the programs that measure herdcache beside its peers, kept out of the
//! library's package so that its `cargo test` and examples never build moka, quick_cache,
//! criterion, axum or a full tokio. Not published.
//!
//! | program | command (from the repository root) |
//! |---|---|
//! | hit ratios on the traces in `../shared/traces/` (or `$HERDCACHE_TRACES`), beside moka and quick_cache (`-- --only moka-sync`: moka keeping to its capacity at each insert) | `cargo run -p herdcache-bench --release --example trace_replay` |
//! | hit ratios on 252 generated workloads (Zipf, loops, drifting loops, phase changes, sliding hot sets …), beside moka, moka with its maintenance at each insert and quick_cache | `cargo run -p herdcache-bench --release --example synth_sweep` |
//! | heap bytes per entry, beside the peers | `cargo run -p herdcache-bench --release --example memory` |
//! | read/write throughput on 1 and 2 threads, beside the peers | `cargo bench -p herdcache-bench --bench read_throughput` |
//! | single-flight herd and the present-key path, beside the peers | `cargo bench -p herdcache-bench --bench get_with` |
//! | an HTTP service (axum) in front of a slow upstream, with `/metrics` | `cargo run -p herdcache-bench --release --example service` (`-- --check`: a self-test) |
//!
//! The figures they produced are in the repository's `BENCHMARKS.md`.

#![forbid(unsafe_code)]
