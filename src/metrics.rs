//! Statistics through the [`metrics`](https://docs.rs/metrics) facade (cargo feature `metrics`).

use crate::cache::Cache;
use std::hash::{BuildHasher, Hash};

impl<K, V, S> Cache<K, V, S>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Reports the current [`stats`](Cache::stats) and sizes to the installed `metrics`
    /// recorder, labelled `cache = <name>` (see [`CacheBuilder::name`](crate::CacheBuilder::name)).
    /// Call it periodically, or before each scrape. Counters are set to their absolute values:
    ///
    /// `herdcache_hits_total`, `herdcache_misses_total`, `herdcache_load_successes_total`,
    /// `herdcache_load_failures_total`, `herdcache_loads_abandoned_total`,
    /// `herdcache_removals_total{cause}`, `herdcache_removed_weight_total{cause}`,
    /// `herdcache_coalesced_total`, `herdcache_refreshes_total{result}`,
    /// `herdcache_stale_served_total`, `herdcache_stale_served_after_ttl_total`,
    /// `herdcache_negative_hits_total`,
    /// `herdcache_loads_waited_for_limit_total`, `herdcache_timeouts_total`; gauges
    /// `herdcache_load_seconds_total` (the time spent in loads, in fractional seconds: a gauge
    /// because the facade's counters are integers; like a counter, it only grows),
    /// `herdcache_entries`, `herdcache_weighted_size`, `herdcache_loads_in_flight`,
    /// `herdcache_max_concurrent_loads_seen`, `herdcache_health_warning{kind}` (1 while
    /// [`health`](Cache::health) raises that kind of [`Warning`](crate::Warning), else 0; one
    /// series per kind, so a cleared warning reads 0). With
    /// [`track_sizing`](crate::CacheBuilder::track_sizing), the sizing curve:
    /// `herdcache_predicted_hit_ratio{size}` and `herdcache_predicted_capacity{size}` (`size` =
    /// `0.25x` … `4x`), `herdcache_sizing_observed_hit_ratio`, `herdcache_suggested_capacity` (0: none). With a Redis second tier, also
    /// `herdcache_remote_total{event}`, one series per [`RemoteStats`](crate::RemoteStats) field
    /// (`hits`, `errors`, `skipped`, `leases_acquired`, …).
    ///
    /// ```
    /// let cache = herdcache::Cache::<u32, u32>::builder()
    ///     .max_capacity(10)
    ///     .name("users")
    ///     .record_stats()
    ///     .build();
    /// cache.report_metrics(); // a no-op without an installed recorder
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn report_metrics(&self) {
        let s = self.stats();
        let name = self.name().to_string();
        let counter = |metric: &'static str, v: u64| {
            metrics::counter!(metric, "cache" => name.clone()).absolute(v);
        };
        counter("herdcache_hits_total", s.hits);
        counter("herdcache_misses_total", s.misses);
        counter("herdcache_load_successes_total", s.load_successes);
        counter("herdcache_load_failures_total", s.load_failures);
        counter("herdcache_loads_abandoned_total", s.loads_abandoned);
        counter("herdcache_coalesced_total", s.coalesced);
        counter("herdcache_stale_served_total", s.stale_served);
        counter(
            "herdcache_stale_served_after_ttl_total",
            s.stale_served_after_ttl,
        );
        counter("herdcache_negative_hits_total", s.negative_hits);
        counter(
            "herdcache_loads_waited_for_limit_total",
            s.loads_waited_for_limit,
        );
        counter("herdcache_timeouts_total", s.timeouts);
        metrics::gauge!("herdcache_load_seconds_total", "cache" => name.clone())
            .set(s.total_load_time.as_secs_f64());
        for (cause, r) in [
            ("expired", s.expired),
            ("explicit", s.explicit),
            ("replaced", s.replaced),
            ("size", s.size),
        ] {
            metrics::counter!("herdcache_removals_total", "cache" => name.clone(), "cause" => cause)
                .absolute(r.count);
            metrics::counter!("herdcache_removed_weight_total", "cache" => name.clone(), "cause" => cause)
                .absolute(r.weight);
        }
        for (result, v) in [
            ("started", s.refreshes_started),
            ("succeeded", s.refreshes_succeeded),
            ("failed", s.refreshes_failed),
        ] {
            metrics::counter!("herdcache_refreshes_total", "cache" => name.clone(), "result" => result)
                .absolute(v);
        }
        let gauge = |metric: &'static str, v: u64| {
            metrics::gauge!(metric, "cache" => name.clone()).set(v as f64);
        };
        if self.inner.remote.get().is_some() {
            for (event, v) in s.remote.named() {
                metrics::counter!("herdcache_remote_total", "cache" => name.clone(), "event" => event)
                    .absolute(v);
            }
        }
        let warnings = self.health();
        for kind in crate::Warning::KINDS {
            let on = warnings.warnings().iter().any(|w| w.kind() == kind);
            metrics::gauge!("herdcache_health_warning", "cache" => name.clone(), "kind" => kind)
                .set(if on { 1.0 } else { 0.0 });
        }
        gauge("herdcache_entries", self.entry_count());
        gauge("herdcache_weighted_size", self.weighted_size());
        gauge("herdcache_loads_in_flight", s.loads_in_flight);
        gauge(
            "herdcache_max_concurrent_loads_seen",
            s.max_concurrent_loads_seen,
        );
        self.report_sizing_metrics(&name);
    }
}
