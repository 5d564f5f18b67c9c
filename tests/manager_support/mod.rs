//! Shared helpers of the manager tests: a metrics recorder, an event collector, SQL shortcuts.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement, TryGetable};
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::manager::{HealthEvent, HealthStatus};
use sea_orm_tunnel::testkit::TempPostgres;
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// A liveness bound, not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A plain connection for assertions, outside the manager.
pub async fn checker(url: &str) -> DatabaseConnection {
    Database::connect(url).await.expect("connect the checker")
}

pub async fn scalar<T: TryGetable>(db: &impl ConnectionTrait, sql: &str) -> T {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("one row");
    row.try_get_by_index(0).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Backends whose application_name starts with `prefix-`.
pub async fn backends(checker: &DatabaseConnection, prefix: &str) -> Vec<String> {
    let sql =
        format!("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE '{prefix}-%' ORDER BY 1");
    checker
        .query_all_raw(Statement::from_string(checker.get_database_backend(), sql))
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.try_get_by_index(0).unwrap())
        .collect()
}

/// Waits until the health watch satisfies `pred`.
pub async fn wait_health(
    rx: &mut watch::Receiver<HealthStatus>,
    what: &str,
    pred: impl FnMut(&HealthStatus) -> bool,
) -> HealthStatus {
    let waited = match tokio::time::timeout(PATIENCE, rx.wait_for(pred)).await {
        Ok(Ok(s)) => Some(s.clone()),
        Ok(Err(_)) => panic!("health channel closed while waiting for {what}"),
        Err(_) => None,
    };
    waited.unwrap_or_else(|| panic!("not {what} after {PATIENCE:?}; last: {:?}", *rx.borrow()))
}

/// Receives health events (buffered since the subscription) until one satisfies `pred`; unlike
/// the watch, this cannot miss a short unhealthy spell.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<HealthEvent>,
    what: &str,
    mut pred: impl FnMut(&HealthEvent) -> bool,
) -> HealthEvent {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => panic!("health events closed"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no event: {what} after {PATIENCE:?}"))
}

/// Restarts PostgreSQL and waits for a failed health check, then a healthy one (returned).
pub async fn restart_and_wait_for_health(manager: &ConnectionManager, pg: &TempPostgres) -> HealthEvent {
    let mut events = manager.subscribe_health();
    pg.restart().await.unwrap();
    wait_event(&mut events, "a failed check after the restart", |e| {
        matches!(e, HealthEvent::HealthCheckFailed(_))
    })
    .await;
    wait_event(&mut events, "a healthy check after the restart", |e| e.status().healthy).await
}

/// Polls `f` until it returns true (up to [`PATIENCE`]).
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    sea_orm_tunnel::testkit::eventually(what, PATIENCE, f).await
}

// ---- metrics -------------------------------------------------------------------------------

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// Metrics by `name{label=value,...}` (labels sorted).
#[derive(Default)]
pub struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

fn key_string(key: &Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl TestRecorder {
    pub fn counter(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn gauge(&self, key: &str) -> Option<f64> {
        self.gauges
            .lock()
            .unwrap()
            .get(key)
            .map(|g| f64::from_bits(g.load(Ordering::Relaxed)))
    }

    pub fn histogram(&self, key: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .get(key)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }

    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.counters.lock().unwrap().keys().cloned().collect();
        keys.extend(self.gauges.lock().unwrap().keys().cloned());
        keys.extend(self.histograms.lock().unwrap().keys().cloned());
        keys.sort();
        keys
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(
            self.counters
                .lock()
                .unwrap()
                .entry(key_string(key))
                .or_default()
                .clone(),
        )
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.gauges.lock().unwrap().entry(key_string(key)).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(
            self.histograms
                .lock()
                .unwrap()
                .entry(key_string(key))
                .or_default()
                .clone(),
        )
    }
}

// ---- tracing -------------------------------------------------------------------------------

/// One captured event: target and fields as strings.
#[derive(Debug, Clone)]
pub struct Captured {
    pub target: String,
    pub fields: HashMap<String, String>,
}

impl Captured {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// Collects every event under `sea_orm_tunnel`.
#[derive(Clone, Default)]
pub struct EventLog(Arc<Mutex<Vec<Captured>>>);

impl EventLog {
    pub fn events(&self, kind: &str) -> Vec<Captured> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.get("event") == Some(kind))
            .cloned()
            .collect()
    }
}

struct FieldsVisitor<'a>(&'a mut HashMap<String, String>);

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventLog {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let target = event.metadata().target();
        if !target.starts_with("sea_orm_tunnel") {
            return;
        }
        let mut fields = HashMap::new();
        event.record(&mut FieldsVisitor(&mut fields));
        self.0.lock().unwrap().push(Captured {
            target: target.to_string(),
            fields,
        });
    }
}
