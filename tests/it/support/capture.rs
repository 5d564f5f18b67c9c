//! Tracing captures: structured events (with the request's correlation id) for assertions, and
//! formatted records at every level (plus the `log` facade) to scan for secrets.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// One captured event: its target, its own fields, and the `correlation_id` of the innermost
/// span that has one.
#[derive(Debug, Clone)]
pub struct Captured {
    pub target: String,
    pub fields: HashMap<String, String>,
    pub span_correlation_id: Option<String>,
}

impl Captured {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// A tracing layer keeping every event. Install it with `tracing::subscriber::set_default`; with a
/// current-thread runtime the tasks the test spawns run on its thread and are captured too.
#[derive(Clone, Default)]
pub struct Capture {
    events: Arc<Mutex<Vec<Captured>>>,
}

impl Capture {
    pub fn events(&self) -> Vec<Captured> {
        self.events.lock().unwrap().clone()
    }

    /// This crate's events whose `event` field is `kind`.
    pub fn named(&self, kind: &str) -> Vec<Captured> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target.starts_with("sea_orm_tunnel") && e.field("event") == Some(kind))
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

struct SpanCorrelation(String);

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(value), Some(span)) = (fields.0.remove("correlation_id"), ctx.span(id)) {
            span.extensions_mut().insert(SpanCorrelation(value));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let span_correlation_id = ctx.event_scope(event).and_then(|scope| {
            scope
                .into_iter()
                .find_map(|span| span.extensions().get::<SpanCorrelation>().map(|c| c.0.clone()))
        });
        self.events.lock().unwrap().push(Captured {
            target: event.metadata().target().to_owned(),
            fields: fields.0,
            span_correlation_id,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Formatted records at every level
// ---------------------------------------------------------------------------------------------

/// Everything a `tracing` subscriber wrote, at every level, for scanning after the run.
#[derive(Clone, Default)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
    lines: Arc<AtomicU64>,
}

impl LogCapture {
    pub fn new() -> Self {
        Self::default()
    }

    /// A TRACE-level fmt subscriber (every target, span open/close with their fields, no ANSI)
    /// writing into this capture.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        use tracing_subscriber::fmt::format::FmtSpan;
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(FmtSpan::FULL)
            .with_ansi(false)
            .with_target(true)
            .with_writer(self.clone())
            .finish()
    }

    /// The captured text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Number of records written.
    pub fn records(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Bytes captured.
    pub fn len(&self) -> usize {
        self.buf.lock().unwrap().len()
    }

    /// Appends text that did not go through tracing (error `Display`/`Debug`), so one scan covers all.
    pub fn push(&self, text: &str) {
        let mut buf = self.buf.lock().unwrap();
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'\n');
    }
}

/// A `log` logger writing every record (at every level) into a [`LogCapture`]: russh and parts of
/// sqlx log through the `log` facade, not `tracing`. `log` has one global logger per process, so
/// install it once, in a test that runs alone in its process ([`run_alone`](super::run_alone)).
pub fn capture_log_records(capture: &LogCapture) {
    struct Bridge(LogCapture);
    impl log::Log for Bridge {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = format!("log {} {}: {}", record.level(), record.target(), record.args());
            self.0.lines.fetch_add(1, Ordering::Relaxed);
            self.0.push(&line);
        }
        fn flush(&self) {}
    }
    log::set_boxed_logger(Box::new(Bridge(capture.clone()))).expect("no other `log` logger in this binary");
    log::set_max_level(log::LevelFilter::Trace);
}

/// One writer per event, appending to the shared buffer.
pub struct CaptureWriter {
    capture: LogCapture,
}

impl Write for CaptureWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.capture.buf.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.lines.fetch_add(1, Ordering::Relaxed);
        CaptureWriter { capture: self.clone() }
    }
}

/// Asserts that none of `secrets` occurs in `text`; on failure shows the offending lines.
pub fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(secret.len() >= 6, "secret {secret:?} is too short to search for");
        if text.contains(secret) {
            let hits: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
            let shown: Vec<String> = hits.iter().take(3).map(|l| l.chars().take(400).collect()).collect();
            panic!(
                "a secret appears in {what} ({} lines), e.g.:\n{}",
                hits.len(),
                shown.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scanning capture (for long runs: checks every record, keeps only offenders)
// ---------------------------------------------------------------------------------------------

/// A tracing writer and `log` logger that checks every record for secrets as it is written and
/// keeps only the records holding one, so a long run at TRACE does not fill memory.
#[derive(Clone)]
pub struct SecretScanner {
    inner: Arc<ScannerInner>,
}

struct ScannerInner {
    secrets: std::sync::RwLock<Vec<String>>,
    /// Substrings of records that are a known, separately tested leak (never silently: each is
    /// counted in `known`).
    known: Vec<String>,
    records: AtomicU64,
    bytes: AtomicU64,
    known_hits: AtomicU64,
    offenders: Mutex<Vec<String>>,
}

impl SecretScanner {
    pub fn new(secrets: Vec<String>, known: Vec<String>) -> Self {
        for s in &secrets {
            assert!(s.len() >= 6, "secret {s:?} is too short to search for");
        }
        SecretScanner {
            inner: Arc::new(ScannerInner {
                secrets: std::sync::RwLock::new(secrets),
                known,
                records: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                known_hits: AtomicU64::new(0),
                offenders: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds a secret learned during the run (records from then on are checked for it).
    pub fn add_secret(&self, secret: &str) {
        assert!(secret.len() >= 6, "secret {secret:?} is too short to search for");
        self.inner.secrets.write().unwrap().push(secret.to_owned());
    }

    /// Checks one record (a log line, an error's text).
    pub fn scan(&self, record: &str) {
        let i = &self.inner;
        i.records.fetch_add(1, Ordering::Relaxed);
        i.bytes.fetch_add(record.len() as u64, Ordering::Relaxed);
        if !i.secrets.read().unwrap().iter().any(|s| record.contains(s.as_str())) {
            return;
        }
        if i.known.iter().any(|k| record.contains(k.as_str())) {
            i.known_hits.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut offenders = i.offenders.lock().unwrap();
        if offenders.len() < 10 {
            offenders.push(record.chars().take(600).collect());
        }
    }

    pub fn records(&self) -> u64 {
        self.inner.records.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    pub fn known_hits(&self) -> u64 {
        self.inner.known_hits.load(Ordering::Relaxed)
    }

    pub fn offenders(&self) -> Vec<String> {
        self.inner.offenders.lock().unwrap().clone()
    }

    /// A TRACE fmt subscriber (every target, span events, no ANSI) scanned by this scanner.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        use tracing_subscriber::fmt::format::FmtSpan;
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(FmtSpan::FULL)
            .with_ansi(false)
            .with_writer(self.clone())
            .finish()
    }

    /// Routes the `log` facade (russh logs there) into this scanner; once per process.
    pub fn capture_log_records(&self) {
        struct Bridge(SecretScanner);
        impl log::Log for Bridge {
            fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                true
            }
            fn log(&self, record: &log::Record<'_>) {
                self.0.scan(&format!(
                    "log {} {}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                ));
            }
            fn flush(&self) {}
        }
        log::set_boxed_logger(Box::new(Bridge(self.clone()))).expect("no other `log` logger in this binary");
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// Writer of one tracing event for [`SecretScanner`].
pub struct ScanWriter {
    scanner: SecretScanner,
    buf: Vec<u8>,
}

impl Write for ScanWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ScanWriter {
    fn drop(&mut self) {
        self.scanner.scan(&String::from_utf8_lossy(&self.buf));
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SecretScanner {
    type Writer = ScanWriter;

    fn make_writer(&'a self) -> Self::Writer {
        ScanWriter {
            scanner: self.clone(),
            buf: Vec::new(),
        }
    }
}
