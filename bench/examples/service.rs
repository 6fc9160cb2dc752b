//! A small HTTP service (axum on tokio) that puts herdcache in front of a slow upstream: the
//! way a service embeds the crate.
//!
//! ```text
//! cargo run -p herdcache-bench --release --example service              # serves 127.0.0.1:3000
//! cargo run -p herdcache-bench --release --example service -- --check   # a self-test, then exit
//! curl 127.0.0.1:3000/user/7
//! curl 127.0.0.1:3000/metrics
//! ```
//!
//! * `GET /user/{id}`: the cached profile. A miss loads it once however many requests miss
//!   together (`load_async` with the builder's async loader); entries live 10 s and are
//!   refreshed in the background after 5 s (`refresh_after`; the refresh is a future handed to
//!   `tokio::spawn`), with jitter, and at most 8 upstream calls run at once.
//! * `GET /metrics`: the cache's statistics in Prometheus text format, through the `metrics`
//!   facade (`Cache::report_metrics`) and a minimal recorder written here (a real service would
//!   install `metrics-exporter-prometheus`).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use herdcache::{BoxError, Cache};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The slow upstream.
async fn upstream(id: u64) -> Result<String, BoxError> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("{{\"id\":{id},\"name\":\"user {id}\"}}"))
}

#[derive(Clone)]
struct App {
    cache: Cache<u64, String>,
    recorder: Arc<TextRecorder>,
}

async fn user(State(app): State<App>, Path(id): Path<u64>) -> String {
    match app.cache.load_async(id).await {
        Ok(profile) => profile,
        Err(e) => format!("{{\"error\":\"{e}\"}}"),
    }
}

async fn metrics_text(State(app): State<App>) -> String {
    app.cache.report_metrics();
    app.recorder.render()
}

fn app() -> App {
    let recorder = Arc::new(TextRecorder::default());
    metrics::set_global_recorder(RecorderHandle(recorder.clone())).expect("one recorder");
    let cache = Cache::builder()
        .name("users")
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(10))
        .refresh_after(Duration::from_secs(5))
        .jitter(0.1)
        .max_concurrent_loads(8)
        .async_loader(|id: &u64| upstream(*id))
        .future_spawner(|refresh| {
            tokio::spawn(refresh);
        })
        .record_stats()
        .track_sizing()
        .build();
    App { cache, recorder }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/user/{id}", get(user))
        .route("/metrics", get(metrics_text))
        .with_state(app)
}

/// A plain HTTP/1.1 GET over TCP, for the self-test.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body.split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[tokio::main]
async fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let app = app();
    let cache = app.cache.clone();
    let addr = if check {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("address");
    println!("serving http://{addr}/user/{{id}} and http://{addr}/metrics");
    let server = tokio::spawn(async move {
        axum::serve(listener, router(app)).await.expect("serve");
    });
    if !check {
        server.await.expect("server");
        return;
    }
    // Self-test: 50 concurrent requests for 5 users, then the metrics.
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..50)
        .map(|i| tokio::spawn(async move { http_get(addr, &format!("/user/{}", i % 5)).await }))
        .collect();
    for r in requests {
        let body = r.await.expect("request");
        assert!(body.contains("\"name\":\"user"), "unexpected body {body:?}");
    }
    println!("50 requests for 5 users in {:?}", started.elapsed());
    let stats = cache.stats();
    assert_eq!(stats.load_successes, 5, "one upstream call per user");
    let text = http_get(addr, "/metrics").await;
    println!("{text}");
    assert!(text.contains("herdcache_load_successes_total{cache=\"users\"} 5"));
    // The sizing curve (`track_sizing`): five predicted hit ratios, 0.25 × to 4 × capacity.
    assert!(text.contains("herdcache_predicted_hit_ratio{cache=\"users\",size=\"2x\"}"));
    server.abort();
}

/// A minimal `metrics` recorder that renders Prometheus text format.
#[derive(Default)]
struct TextRecorder {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl TextRecorder {
    fn series(key: &Key) -> String {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
            .collect();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (series, v) in self.counters.lock().unwrap().iter() {
            out += &format!("{series} {}\n", v.load(Ordering::Relaxed));
        }
        for (series, v) in self.gauges.lock().unwrap().iter() {
            out += &format!("{series} {}\n", f64::from_bits(v.load(Ordering::Relaxed)));
        }
        out
    }
}

struct RecorderHandle(Arc<TextRecorder>);

impl Recorder for RecorderHandle {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut m = self.0.counters.lock().unwrap();
        Counter::from_arc(m.entry(TextRecorder::series(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut m = self.0.gauges.lock().unwrap();
        Gauge::from_arc(m.entry(TextRecorder::series(key)).or_default().clone())
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
