//! Feature `metrics`: `report_metrics` exports a `herdcache_health_warning{kind}` gauge per
//! kind of warning, 1 while `health` raises it and 0 otherwise.

#![cfg(all(feature = "metrics", not(loom)))]

use herdcache::{BoxError, Cache, Warning};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Gauges = Arc<Mutex<BTreeMap<String, f64>>>;

/// Keeps the last value of each gauge, by its name and labels.
#[derive(Default)]
struct Capture(Gauges);

struct Cell(String, Gauges);

impl GaugeFn for Cell {
    fn increment(&self, v: f64) {
        *self.1.lock().unwrap().entry(self.0.clone()).or_default() += v;
    }
    fn decrement(&self, v: f64) {
        *self.1.lock().unwrap().entry(self.0.clone()).or_default() -= v;
    }
    fn set(&self, v: f64) {
        self.1.lock().unwrap().insert(self.0.clone(), v);
    }
}

struct Ignore;

impl CounterFn for Ignore {
    fn increment(&self, _: u64) {}
    fn absolute(&self, _: u64) {}
}

fn series(key: &Key) -> String {
    let mut s = key.name().to_string();
    for l in key.labels() {
        s += &format!(",{}={}", l.key(), l.value());
    }
    s
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Ignore))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Cell(series(key), Arc::clone(&self.0))))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn a_gauge_per_kind_of_warning() {
    let cache: Cache<u32, u32> = Cache::builder()
        .max_capacity(10)
        .time_to_live(Duration::from_secs(10))
        .refresh_after(Duration::from_secs(10))
        .loader(|k: &u32| Ok::<_, BoxError>(*k))
        .name("users")
        .build();
    let rec = Capture::default();
    metrics::with_local_recorder(&rec, || cache.report_metrics());
    let gauges = rec.0.lock().unwrap();
    for kind in Warning::KINDS {
        let want = if kind == "refresh_never_happens" {
            1.0
        } else {
            0.0
        };
        let name = format!("herdcache_health_warning,cache=users,kind={kind}");
        assert_eq!(gauges.get(&name), Some(&want), "{name} in {gauges:?}");
    }
}
