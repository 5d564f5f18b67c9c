//! The optional `connection_logs` sink (`CONNECTION_LOG_TO_DB=true`).
//!
//! Connection events are written to PostgreSQL through the `log_connection_event(...)` function
//! that the `sea-orm-tunnel-migration` crate installs. The database log must never slow a query,
//! so:
//!
//! - [`LogSink::record`] is synchronous and never waits: it puts the event on a bounded queue, and
//!   when the queue is full it drops the event and counts it ([`LogSink::dropped`] and the
//!   [`connection_log_dropped_total`](super::metrics::CONNECTION_LOG_DROPPED_TOTAL) counter).
//! - One background writer batches events into a single round trip per batch:
//!   `SELECT log_connection_event(...) FROM jsonb_array_elements($1)`, with the whole batch bound
//!   as one JSONB parameter (never string-built SQL).
//! - When a write fails with a transient error (the database or the tunnel is down), the writer keeps
//!   the events in an outage buffer (bounded; the oldest are dropped and counted beyond it) and
//!   retries with exponential backoff. The events are written after recovery; each carries the time
//!   it happened in `metadata.occurred_at` (RFC 3339, UTC), while `created_at` is the time of the
//!   insert.
//! - A permanent error (say, the migration was not applied) drops that batch, counts it and logs an
//!   error instead of retrying forever.
//!
//! The writer stops on [`LogSink::close`] or when the last `LogSink` handle is dropped (after one
//! last write attempt).
//!
//! ```no_run
//! use std::time::Duration;
//! use sea_orm_tunnel::observe::log_sink::{ConnectionLogEvent, LogSink, LogSinkOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let db = sea_orm::Database::connect("postgres://app@127.0.0.1/app").await?;
//! let sink = LogSink::spawn(db, LogSinkOptions::new().capacity(4096));
//!
//! sink.record(ConnectionLogEvent::new("app-7", "connected"));
//! sink.record(ConnectionLogEvent::new("app-7", "error").with_error("connection reset by peer"));
//!
//! // At shutdown: write what is queued, then stop the writer.
//! sink.close(Duration::from_secs(2)).await;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, JsonValue, Statement};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result, TimeoutKind, db_err_is_transient};
use crate::observe::events::EventKind;
use crate::observe::metrics::CONNECTION_LOG_DROPPED_TOTAL;
use crate::tunnel::TunnelEvent;

/// Tracing target of the sink's own diagnostics.
const TARGET: &str = "sea_orm_tunnel::log_sink";

/// One batch, one round trip: the batch is a JSONB array bound as `$1`, unpacked server-side.
const INSERT_BATCH: &str = "SELECT log_connection_event(e->>'connection_id', e->>'status', e->>'error_message', \
     e->'metadata') FROM jsonb_array_elements($1::jsonb) AS t(e)";

/// One connection event, as it lands in a `connection_logs` row.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLogEvent {
    /// The connection id (also the connection's `application_name`).
    pub connection_id: String,
    /// What happened, e.g. `connected`, `disconnected`, `error`, `health_check_failed`.
    pub status: String,
    /// The error, for failure events.
    pub error_message: Option<String>,
    /// Free-form details. The writer adds `occurred_at` to it (an object is extended; any other
    /// value is kept under `value`).
    pub metadata: JsonValue,
    /// When it happened; written to `metadata.occurred_at` as RFC 3339 UTC.
    pub occurred_at: SystemTime,
}

impl ConnectionLogEvent {
    /// An event that happened now, with no error and empty metadata.
    pub fn new(connection_id: impl Into<String>, status: impl Into<String>) -> Self {
        Self {
            connection_id: connection_id.into(),
            status: status.into(),
            error_message: None,
            metadata: JsonValue::Object(Default::default()),
            occurred_at: SystemTime::now(),
        }
    }

    /// Sets the error message.
    #[must_use]
    pub fn with_error(mut self, message: impl Into<String>) -> Self {
        self.error_message = Some(message.into());
        self
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: JsonValue) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets when the event happened.
    #[must_use]
    pub fn with_occurred_at(mut self, at: SystemTime) -> Self {
        self.occurred_at = at;
        self
    }

    /// The log row for a tunnel event, for the events the log keeps (connected, session lost,
    /// reconnecting, gave up, channel refused); `None` for the others.
    pub(crate) fn from_tunnel_event(event: &TunnelEvent) -> Option<ConnectionLogEvent> {
        fn meta<const N: usize>(pairs: [(&str, JsonValue); N]) -> JsonValue {
            JsonValue::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        }
        let row = |kind: &str| ConnectionLogEvent::new("tunnel", kind);
        Some(match event {
            TunnelEvent::Connected {
                session,
                reconnect,
                bastion,
            } => row(EventKind::TunnelConnected.as_str()).with_metadata(meta([
                ("session", (*session).into()),
                ("reconnect", (*reconnect).into()),
                ("bastion", bastion.clone().into()),
            ])),
            TunnelEvent::Disconnected {
                session,
                reason,
                bastion,
            } => row(EventKind::TunnelDisconnected.as_str())
                .with_error(reason.clone())
                .with_metadata(meta([
                    ("session", (*session).into()),
                    ("bastion", bastion.clone().into()),
                ])),
            TunnelEvent::Reconnecting { attempt, delay, error } => row(EventKind::TunnelReconnecting.as_str())
                .with_error(error.clone())
                .with_metadata(meta([
                    ("attempt", (*attempt).into()),
                    ("delay_ms", (delay.as_millis() as u64).into()),
                ])),
            TunnelEvent::Failed { error } => row("tunnel_failed").with_error(error.to_string()),
            TunnelEvent::ChannelOpenFailed { reason, .. } => row("channel_open_failed").with_error(reason.clone()),
            _ => return None,
        })
    }
}

/// Tuning of a [`LogSink`]. Every value has a default that suits a web service; zero sizes are
/// raised to 1.
#[derive(Debug, Clone)]
#[must_use]
pub struct LogSinkOptions {
    capacity: usize,
    batch_size: usize,
    flush_interval: Duration,
    outage_buffer: usize,
    write_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    pool: String,
}

impl Default for LogSinkOptions {
    fn default() -> Self {
        Self {
            capacity: 1024,
            batch_size: 256,
            flush_interval: Duration::from_millis(500),
            outage_buffer: 10_000,
            write_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            pool: crate::observe::metrics::DEFAULT_POOL.to_owned(),
        }
    }
}

impl LogSinkOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Events the queue between [`LogSink::record`] and the writer holds. When it is full, new
    /// events are dropped and counted. Default 1024: a burst of a thousand connection events is
    /// far beyond a healthy pool, and a full queue must not hold memory without bound.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Most events per round trip. Default 256: one small statement, large enough that a burst is
    /// written in a few round trips.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long an event may wait for its batch to fill before it is written anyway. Default
    /// 500 ms: logs stay near real time without a round trip per event.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Events kept while the database is unreachable; beyond it the oldest are dropped and
    /// counted. Default 10 000 (a few MiB at most). Never less than the batch size.
    pub fn outage_buffer(mut self, events: usize) -> Self {
        self.outage_buffer = events.max(1);
        self
    }

    /// Limit for one batch write; a write that takes longer counts as a transient failure
    /// (a silently dead link must not stall the log). Default 5 s.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// First and largest delay between write attempts during an outage; the delay doubles, with
    /// jitter, from `initial` up to `max`. Default 200 ms and 10 s.
    pub fn retry_delay(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max.max(initial);
        self
    }

    /// The `pool` label on the sink's metrics. Default `default`.
    pub fn pool_label(mut self, pool: impl Into<String>) -> Self {
        self.pool = pool.into();
        self
    }
}

/// Why an event was dropped (the `reason` label of `connection_log_dropped_total`).
#[derive(Debug, Clone, Copy)]
enum DropReason {
    /// The queue between `record` and the writer was full.
    QueueFull,
    /// The outage buffer was full; the oldest event made room.
    OutageBufferFull,
    /// The database rejected the batch with a permanent error.
    Rejected,
    /// Recorded after close, or still unwritten when the writer stopped.
    Closed,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::OutageBufferFull => "outage_buffer_full",
            Self::Rejected => "rejected",
            Self::Closed => "closed",
        }
    }
}

/// Counters shared by the handles and the writer (not a handle: holding it does not keep the
/// writer alive).
#[derive(Debug)]
struct Counters {
    dropped: AtomicU64,
    written: AtomicU64,
    pool: String,
}

impl Counters {
    fn drop_events(&self, reason: DropReason, n: usize) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!(CONNECTION_LOG_DROPPED_TOTAL, "pool" => self.pool.clone(), "reason" => reason.label())
            .increment(n as u64);
    }
}

/// A request from a handle to the writer.
enum Control {
    Flush {
        deadline: Instant,
        reply: oneshot::Sender<Result<usize>>,
    },
}

/// State shared by the handles only.
struct Shared {
    counters: Arc<Counters>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Handle to the connection-log writer. Cheap to clone; the writer stops when [`close`] is called
/// or the last handle is dropped.
///
/// [`close`]: LogSink::close
#[derive(Clone)]
pub struct LogSink {
    events: mpsc::Sender<ConnectionLogEvent>,
    control: mpsc::Sender<Control>,
    shared: Arc<Shared>,
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSink")
            .field("pool", &self.shared.counters.pool)
            .field("queued", &(self.events.max_capacity() - self.events.capacity()))
            .field("dropped", &self.dropped())
            .field("written", &self.written())
            .field("closed", &self.shared.cancel.is_cancelled())
            .finish()
    }
}

impl LogSink {
    /// Starts the background writer on `db` and returns its handle.
    ///
    /// The database needs the `sea-orm-tunnel-migration` migration applied. Must be called within
    /// a Tokio runtime.
    pub fn spawn(db: DatabaseConnection, options: LogSinkOptions) -> LogSink {
        let (events, events_rx) = mpsc::channel(options.capacity);
        // Flushes are rare (shutdown); a small queue is enough and keeps them bounded too.
        let (control, control_rx) = mpsc::channel(8);
        let counters = Arc::new(Counters {
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            pool: options.pool.clone(),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let writer = Writer {
            db,
            pending: VecDeque::new(),
            outage_cap: options.outage_buffer.max(options.batch_size),
            options,
            counters: counters.clone(),
            cancel: cancel.clone(),
            retry: None,
            first_pending_at: None,
        };
        tracker.spawn(writer.run(events_rx, control_rx));
        tracker.close();
        LogSink {
            events,
            control,
            shared: Arc::new(Shared {
                counters,
                cancel,
                tracker,
            }),
        }
    }

    /// Queues an event for the writer. Never blocks and never waits: when the queue is full (or
    /// the sink is closed) the event is dropped and counted.
    pub fn record(&self, event: ConnectionLogEvent) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.shared.counters.drop_events(DropReason::QueueFull, 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.shared.counters.drop_events(DropReason::Closed, 1),
        }
    }

    /// Events dropped so far, for every reason (full queue, full outage buffer, rejected by the
    /// database, unwritten at close).
    pub fn dropped(&self) -> u64 {
        self.shared.counters.dropped.load(Ordering::Relaxed)
    }

    /// Events written to `connection_logs` so far.
    pub fn written(&self) -> u64 {
        self.shared.counters.written.load(Ordering::Relaxed)
    }

    /// Writes everything queued or buffered now, retrying transient failures until `deadline`
    /// has passed. Returns how many events this flush wrote.
    ///
    /// Errors (the events stay buffered for later attempts): [`Error::Timeout`] (kind
    /// [`TimeoutKind::LogFlush`]) when the deadline passes with events left, or the last transient
    /// write error when the next retry would fall after the deadline; [`Error::ShutDown`] after
    /// close. A batch the database rejects permanently is dropped and counted, not returned.
    pub async fn flush(&self, deadline: Duration) -> Result<usize> {
        let until = Instant::now() + deadline;
        let (reply, answer) = oneshot::channel();
        let request = async {
            self.control
                .send(Control::Flush { deadline: until, reply })
                .await
                .map_err(|_| Error::ShutDown("connection log sink"))?;
            answer.await.map_err(|_| Error::ShutDown("connection log sink"))?
        };
        match tokio::time::timeout_at(until, request).await {
            Ok(result) => result,
            Err(_) => Err(flush_timeout(deadline)),
        }
    }

    /// Flushes (up to `deadline`), then stops the writer and waits for it to end (within the same
    /// deadline). Events still unwritten are dropped and counted. Idempotent.
    pub async fn close(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        if !self.shared.cancel.is_cancelled() {
            if let Err(error) = self.flush(deadline).await {
                tracing::warn!(target: TARGET, %error, "connection log not fully flushed at close");
            }
            self.shared.cancel.cancel();
        }
        let _ = tokio::time::timeout_at(until, self.shared.tracker.wait()).await;
    }
}

fn flush_timeout(after: Duration) -> Error {
    Error::Timeout {
        kind: TimeoutKind::LogFlush,
        after,
        detail: String::new(),
    }
}

/// The background writer. Owns the receivers, the database handle and the outage buffer.
struct Writer {
    db: DatabaseConnection,
    options: LogSinkOptions,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    /// Events received but not yet written (prepared JSON objects), oldest first.
    pending: VecDeque<JsonValue>,
    outage_cap: usize,
    /// During an outage: when to try again and how many attempts failed so far.
    retry: Option<(Instant, u32)>,
    /// When the oldest pending event arrived (to honour `flush_interval`).
    first_pending_at: Option<Instant>,
}

/// Outcome of one write pass.
enum Pass {
    /// Everything pending was written (or permanently rejected).
    Done,
    /// A transient failure; events kept.
    Failed(Error),
    /// Close was requested mid-write.
    Cancelled,
}

impl Writer {
    async fn run(mut self, mut events: mpsc::Receiver<ConnectionLogEvent>, mut control: mpsc::Receiver<Control>) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(request) = control.recv() => {
                    let Control::Flush { deadline, reply } = request;
                    self.drain_queued(&mut events);
                    let result = self.flush_until(deadline).await;
                    let _ = reply.send(result);
                }
                event = events.recv() => match event {
                    Some(event) => {
                        self.push(event);
                        // Take whatever else is already queued, so a burst becomes full batches and,
                        // during an outage, the queue keeps emptying into the outage buffer instead
                        // of dropping new events.
                        self.drain_queued(&mut events);
                        if self.retry.is_none() && self.pending.len() >= self.options.batch_size {
                            self.write_pass(false).await;
                        }
                    }
                    None => {
                        // Every handle is gone: one last attempt, then stop.
                        self.write_pass(true).await;
                        break;
                    }
                },
                _ = sleep_until_opt(wake), if wake.is_some() => {
                    self.write_pass(false).await;
                }
            }
        }
        // Stopping: pick up what is still queued so it is counted, not silently lost.
        events.close();
        while let Ok(event) = events.try_recv() {
            self.push(event);
        }
        let left = self.pending.len();
        if left > 0 {
            tracing::warn!(target: TARGET, events = left, "connection log writer stopped with unwritten events");
        }
        self.counters.drop_events(DropReason::Closed, left);
    }

    /// When the loop should wake without input: the retry time during an outage, else when the
    /// oldest pending event has waited `flush_interval`.
    fn next_wake(&self) -> Option<Instant> {
        match self.retry {
            Some((at, _)) => Some(at),
            None => self.first_pending_at.map(|t| t + self.options.flush_interval),
        }
    }

    /// Moves what is queued now into `pending`; bounded by the queue's size so that busy
    /// producers cannot keep the writer here.
    fn drain_queued(&mut self, events: &mut mpsc::Receiver<ConnectionLogEvent>) {
        for _ in 0..self.options.capacity {
            match events.try_recv() {
                Ok(event) => self.push(event),
                Err(_) => break,
            }
        }
    }

    fn push(&mut self, event: ConnectionLogEvent) {
        if self.pending.is_empty() {
            self.first_pending_at = Some(Instant::now());
        }
        self.pending.push_back(prepare(event));
        let over = self.pending.len().saturating_sub(self.outage_cap);
        if over > 0 {
            self.pending.drain(..over);
            self.counters.drop_events(DropReason::OutageBufferFull, over);
        }
    }

    /// Writes pending batches until none is left or a transient failure stops the pass; on failure
    /// schedules the next attempt with backoff.
    async fn write_pass(&mut self, final_attempt: bool) -> Pass {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(self.options.batch_size);
            let batch = JsonValue::Array(self.pending.iter().take(n).cloned().collect());
            let stmt = Statement::from_sql_and_values(DbBackend::Postgres, INSERT_BATCH, [batch.into()]);
            let write = tokio::time::timeout(self.options.write_timeout, self.db.execute_raw(stmt));
            let outcome = tokio::select! {
                biased;
                _ = self.cancel.cancelled(), if !final_attempt => return Pass::Cancelled,
                outcome = write => outcome,
            };
            match outcome {
                Ok(Ok(_)) => {
                    self.pending.drain(..n);
                    self.counters.written.fetch_add(n as u64, Ordering::Relaxed);
                    if let Some((_, failures)) = self.retry.take() {
                        tracing::info!(target: TARGET, failures, "connection log writes recovered");
                    }
                }
                Ok(Err(error)) if !db_err_is_transient(&error) => {
                    tracing::error!(target: TARGET, %error, events = n, "connection log batch rejected; dropped");
                    self.pending.drain(..n);
                    self.counters.drop_events(DropReason::Rejected, n);
                }
                Ok(Err(error)) => return self.failed(Error::Database(error)),
                Err(_) => {
                    return self.failed(Error::Timeout {
                        kind: TimeoutKind::LogFlush,
                        after: self.options.write_timeout,
                        detail: " (writing one batch)".to_owned(),
                    });
                }
            }
        }
        self.first_pending_at = None;
        self.retry = None;
        Pass::Done
    }

    fn failed(&mut self, error: Error) -> Pass {
        let failures = self.retry.map_or(0, |(_, n)| n) + 1;
        if failures == 1 {
            tracing::warn!(target: TARGET, %error, pending = self.pending.len(),
                "connection log write failed; keeping events and retrying");
        } else {
            tracing::debug!(target: TARGET, %error, failures, "connection log write failed again");
        }
        self.retry = Some((Instant::now() + self.backoff(failures), failures));
        Pass::Failed(error)
    }

    /// Exponential backoff with jitter in [delay/2, delay] so that many services do not retry in
    /// lockstep after a shared outage.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .options
            .retry_initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let delay = exp.min(self.options.retry_max);
        delay.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// A flush: write everything now, retrying transient failures until `deadline`.
    async fn flush_until(&mut self, deadline: Instant) -> Result<usize> {
        let before = self.counters.written.load(Ordering::Relaxed);
        let written = |c: &Counters| (c.written.load(Ordering::Relaxed) - before) as usize;
        loop {
            match self.write_pass(false).await {
                Pass::Done => return Ok(written(&self.counters)),
                Pass::Cancelled => return Err(Error::ShutDown("connection log sink")),
                Pass::Failed(error) => {
                    let retry_at = self.retry.map_or_else(Instant::now, |(at, _)| at);
                    if retry_at >= deadline {
                        return Err(error);
                    }
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => return Err(Error::ShutDown("connection log sink")),
                        _ = tokio::time::sleep_until(retry_at) => {}
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The JSON object one row is made from, with `occurred_at` added to the metadata. NULs are
/// removed because PostgreSQL rejects them in `text` and `jsonb`; one bad event must not make
/// its whole batch fail.
fn prepare(event: ConnectionLogEvent) -> JsonValue {
    let mut metadata = match event.metadata {
        JsonValue::Object(map) => map,
        JsonValue::Null => Default::default(),
        other => {
            let mut map = serde_json::Map::new();
            map.insert("value".to_owned(), other);
            map
        }
    };
    metadata.insert(
        "occurred_at".to_owned(),
        JsonValue::String(rfc3339_utc(event.occurred_at)),
    );
    let mut metadata = JsonValue::Object(metadata);
    strip_nul_in_json(&mut metadata);

    let mut row = serde_json::Map::new();
    row.insert(
        "connection_id".to_owned(),
        JsonValue::String(strip_nul(event.connection_id)),
    );
    row.insert("status".to_owned(), JsonValue::String(strip_nul(event.status)));
    row.insert(
        "error_message".to_owned(),
        event
            .error_message
            .map_or(JsonValue::Null, |e| JsonValue::String(strip_nul(e))),
    );
    row.insert("metadata".to_owned(), metadata);
    JsonValue::Object(row)
}

fn strip_nul(s: String) -> String {
    if s.contains('\0') { s.replace('\0', "") } else { s }
}

fn strip_nul_in_json(value: &mut JsonValue) {
    match value {
        JsonValue::String(s) if s.contains('\0') => *s = s.replace('\0', ""),
        JsonValue::Array(items) => items.iter_mut().for_each(strip_nul_in_json),
        JsonValue::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                map.extend(old.into_iter().map(|(k, v)| (k.replace('\0', ""), v)));
            }
            map.values_mut().for_each(strip_nul_in_json);
        }
        _ => {}
    }
}

/// `SystemTime` as RFC 3339 UTC with microseconds (PostgreSQL's precision), e.g.
/// `2026-11-27T02:07:21.123456Z`. Times before 1970 are clamped to the epoch.
pub(crate) fn rfc3339_utc(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::civil::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into())
    }

    #[test]
    fn tunnel_rows_name_the_bastion() {
        let connected = ConnectionLogEvent::from_tunnel_event(&TunnelEvent::Connected {
            session: 3,
            reconnect: true,
            bastion: "b2.internal:2222".into(),
        })
        .unwrap();
        assert_eq!(connected.metadata["bastion"], "b2.internal:2222");
        let lost = ConnectionLogEvent::from_tunnel_event(&TunnelEvent::Disconnected {
            session: 3,
            reason: "keepalive unanswered".into(),
            bastion: "b2.internal:2222".into(),
        })
        .unwrap();
        assert_eq!(lost.metadata["bastion"], "b2.internal:2222");
        assert_eq!(lost.error_message.as_deref(), Some("keepalive unanswered"));
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_utc(at(951_782_400, 7)), "2000-02-29T00:00:00.000007Z");
        assert_eq!(rfc3339_utc(at(1_795_746_441, 123_456)), "2026-11-27T02:27:21.123456Z");
        assert_eq!(rfc3339_utc(at(4_107_542_399, 999_999)), "2100-02-28T23:59:59.999999Z");
        assert_eq!(rfc3339_utc(at(4_107_542_400, 0)), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn every_day_round_trips() {
        // Walk day by day from 1970 to 2400 and check the calendar advances correctly.
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..157_000u64 {
            assert_eq!(crate::civil::civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn prepare_adds_occurred_at_and_keeps_metadata() {
        let mut meta = serde_json::Map::new();
        meta.insert("pool_size".into(), JsonValue::from(3));
        let ev = ConnectionLogEvent::new("c\0-1", "error")
            .with_error("boom")
            .with_metadata(JsonValue::Object(meta))
            .with_occurred_at(UNIX_EPOCH);
        let row = prepare(ev);
        assert_eq!(row["connection_id"], "c-1");
        assert_eq!(row["error_message"], "boom");
        assert_eq!(row["metadata"]["pool_size"], 3);
        assert_eq!(row["metadata"]["occurred_at"], "1970-01-01T00:00:00.000000Z");

        let row = prepare(ConnectionLogEvent::new("c", "s").with_metadata(JsonValue::from("x")));
        assert_eq!(row["metadata"]["value"], "x");
        assert!(row["error_message"].is_null());
    }
}
