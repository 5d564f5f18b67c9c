//! Metrics for assertions: `metrics_util`'s debugging recorder, read by `name{label=value,...}`.

use std::collections::HashMap;
use std::sync::Mutex;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A [`DebuggingRecorder`] to install for one test (`metrics::with_local_recorder`,
/// `metrics::set_default_local_recorder`), with lookups by `name{label=value,...}` (labels
/// sorted by name).
pub struct TestMetrics {
    recorder: DebuggingRecorder,
    snapshotter: Snapshotter,
    /// A snapshot drains histogram samples; they are kept here so that every read sees all of them.
    histograms: Mutex<HashMap<String, Vec<f64>>>,
}

impl TestMetrics {
    /// Runs `fut` to completion on a current-thread runtime with this recorder installed for the
    /// thread, so every task the code under test spawns records here too.
    pub fn run<F: std::future::Future>(&self, fut: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        metrics::with_local_recorder(self, || runtime.block_on(fut))
    }
}

impl Default for TestMetrics {
    fn default() -> Self {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        TestMetrics {
            recorder,
            snapshotter,
            histograms: Mutex::default(),
        }
    }
}

fn key_string(key: &Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram,
}

impl TestMetrics {
    /// Every metric registered so far. A snapshot resets counters and gauges and drains
    /// histograms: counters and gauges are put back at once (the tests record metrics on their
    /// own thread, through a thread-local recorder, so nothing records in between), histogram
    /// samples are kept in `self.histograms`.
    fn read(&self) -> HashMap<String, Value> {
        let metadata = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let mut histograms = self.histograms.lock().unwrap();
        let mut out = HashMap::new();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let (_, key) = key.into_parts();
            let name = key_string(&key);
            let value = match value {
                DebugValue::Counter(n) => {
                    self.recorder.register_counter(&key, &metadata).increment(n);
                    Value::Counter(n)
                }
                DebugValue::Gauge(v) => {
                    self.recorder.register_gauge(&key, &metadata).set(v.into_inner());
                    Value::Gauge(v.into_inner())
                }
                DebugValue::Histogram(samples) => {
                    let kept = histograms.entry(name.clone()).or_default();
                    kept.extend(samples.into_iter().map(|s| s.into_inner()));
                    Value::Histogram
                }
            };
            out.insert(name, value);
        }
        out
    }

    /// A counter's value, 0 when it was never registered.
    pub fn counter(&self, key: &str) -> u64 {
        match self.read().get(key) {
            Some(Value::Counter(n)) => *n,
            _ => 0,
        }
    }

    pub fn gauge(&self, key: &str) -> Option<f64> {
        match self.read().get(key) {
            Some(Value::Gauge(v)) => Some(*v),
            _ => None,
        }
    }

    /// Every sample a histogram has recorded so far.
    pub fn histogram(&self, key: &str) -> Vec<f64> {
        self.read();
        self.histograms.lock().unwrap().get(key).cloned().unwrap_or_default()
    }

    /// A counter's or gauge's value.
    ///
    /// # Panics
    ///
    /// When no such counter or gauge was registered, listing those that were.
    pub fn get(&self, key: &str) -> f64 {
        let all = self.read();
        match all.get(key) {
            Some(Value::Counter(n)) => *n as f64,
            Some(Value::Gauge(v)) => *v,
            _ => panic!("metric {key} not recorded; have {:?}", self.keys()),
        }
    }

    /// The keys of every metric registered so far, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.read().into_keys().collect();
        keys.sort();
        keys
    }
}

impl Recorder for TestMetrics {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.recorder.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.recorder.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.recorder.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.recorder.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.recorder.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.recorder.register_histogram(key, metadata)
    }
}
