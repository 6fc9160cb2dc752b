//! Feature `tracing`: `Cache::health` logs a warning once when it starts and once when it
//! clears, as successive calls see it.

#![cfg(all(feature = "tracing", not(loom)))]

use herdcache::{Cache, ManualClock};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

type Log = Arc<Mutex<Vec<(Level, String, String)>>>;

/// Keeps (level, kind, message) of every event with the target `herdcache::health`.
struct Capture(Log);

#[derive(Default)]
struct Fields {
    kind: String,
    message: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "kind" {
            self.kind = value.to_string();
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "kind" => self.kind = format!("{value:?}").trim_matches('"').to_string(),
            _ => {}
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target() != "herdcache::health" {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), f.kind, f.message));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn a_warning_is_logged_when_it_starts_and_when_it_clears() {
    let log: Log = Arc::default();
    let clock = ManualClock::new();
    let c: Cache<u64, u64> = Cache::builder()
        .max_capacity(100)
        .time_to_live(Duration::from_secs(10))
        .jitter(0.1)
        .fail_safe(Duration::from_secs(600))
        .name("users")
        .clock(clock.clone())
        .build();
    let w = Duration::from_secs(10);
    tracing::subscriber::with_default(Capture(Arc::clone(&log)), || {
        c.insert(1, 1);
        clock.advance(Duration::from_secs(12));
        let r: Result<u64, Arc<&str>> = c.try_get_with(1, || Err("down"));
        assert_eq!(r.unwrap(), 1);
        // Raised by three calls in a row: logged once.
        for _ in 0..3 {
            assert!(!c.health_over(w).is_healthy());
        }
        // A window later without stale answers: cleared, logged once.
        for _ in 0..12 {
            clock.advance(Duration::from_secs(2));
            c.health_over(w);
        }
        assert!(c.health_over(w).is_healthy());
    });
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (log[0].0, log[0].1.as_str()),
        (Level::WARN, "serving_stale")
    );
    assert!(log[0].2.contains("check the backend"), "{}", log[0].2);
    assert_eq!(
        (log[1].0, log[1].1.as_str(), log[1].2.as_str()),
        (Level::INFO, "serving_stale", "cleared")
    );
}
