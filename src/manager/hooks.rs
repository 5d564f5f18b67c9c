//! Per-connection pool hooks: connection ids, session settings, the generation rule, jittered
//! lifetimes, idle-only pings, and checkout tracking for events, metrics and leak detection.
//!
//! sqlx gives its hooks only `&mut PgConnection` and [`PoolConnectionMetadata`] (`age`,
//! `idle_for`); a `PgConnection` exposes no identity (its backend pid is private). So:
//!
//! - `after_connect` assigns the id `<application_name prefix>-<n>`, sends it as the
//!   connection's `application_name` together with every session setting (one round trip), and
//!   records the instant the setup finished. sqlx stamps the connection's creation time right after
//!   the hook returns, so `now - meta.age` seen by a later hook lands within microseconds after
//!   that instant.
//! - Setups are spaced at least [`SPACING`] apart (a new connection waits at most that long, only
//!   when another one finished setting up just before), so at most one recorded instant falls in
//!   any [`TOLERANCE`] window, and the later hooks find their connection with a map lookup and no
//!   round trip.
//! - When the lookup is not unique or finds nothing (the hook thread was descheduled for more
//!   than the tolerance, or the registry lost track), the hook asks the server:
//!   `current_setting('application_name')` is the authoritative id. A connection whose id cannot
//!   be established that way is closed and replaced rather than used anonymously.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sqlx;
use sea_orm::sqlx::pool::PoolConnectionMetadata;
use sea_orm::sqlx::postgres::PgConnection;

use crate::config::{PoolConfig, SessionSettings};
use crate::observe::events::{self, CheckoutOrigin};
use crate::observe::log_sink::{ConnectionLogEvent, LogSink};
use crate::observe::metrics as m;

/// How far `now - meta.age` may lie after the instant recorded at the end of `after_connect`
/// for the lookup to trust it without asking the server.
pub(crate) const TOLERANCE: Duration = Duration::from_millis(2);
/// Minimum distance between two recorded setup instants; larger than [`TOLERANCE`] so a window
/// never holds two of them.
pub(crate) const SPACING: Duration = Duration::from_micros(2500);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Source of the tunnel generation: the instant of the latest SSH reconnect, if any.
pub(crate) type GenerationSource = Arc<dyn Fn() -> Option<Instant> + Send + Sync>;

/// Counters a user can read without a metrics stack (see `PoolStats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) opened: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) acquired: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) rejected_stale: AtomicU64,
    pub(crate) rejected_expired: AtomicU64,
    pub(crate) idle_pings: AtomicU64,
    pub(crate) ping_failures: AtomicU64,
    pub(crate) setup_failures: AtomicU64,
    pub(crate) leaks: AtomicU64,
    pub(crate) server_lookups: AtomicU64,
}

/// A checkout in progress.
#[derive(Debug)]
struct Checkout {
    since: Instant,
    origin: CheckoutOrigin,
    leak_reported: bool,
}

/// One physical connection known to the hooks.
#[derive(Debug)]
struct Entry {
    id: Arc<str>,
    /// The server process serving this connection (to terminate it at a forced shutdown).
    pid: i32,
    /// End of `after_connect`: a lower bound of sqlx's creation instant, and the lookup key.
    created: Instant,
    /// This connection's own lifetime: the configured maximum minus a small random amount.
    lifetime: Duration,
    checkout: Option<Checkout>,
    /// Handed out by `after_connect` and not seen by `before_acquire` since: it may in fact be
    /// idle (sqlx opens `min_connections` without a caller).
    fresh: bool,
    released_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Registry {
    entries: HashMap<u64, Entry>,
    by_created: BTreeMap<(Instant, u64), ()>,
    last_setup: Option<Instant>,
}

impl Registry {
    fn insert(&mut self, n: u64, entry: Entry) {
        self.by_created.insert((entry.created, n), ());
        self.entries.insert(n, entry);
    }

    fn remove(&mut self, n: u64) -> Option<Entry> {
        let entry = self.entries.remove(&n)?;
        self.by_created.remove(&(entry.created, n));
        Some(entry)
    }

    fn checked_out(&self) -> u32 {
        self.entries.values().filter(|e| e.checkout.is_some()).count() as u32
    }

    /// The one connection whose recorded setup instant lies in `[estimate - TOLERANCE, estimate]`.
    fn find_unique(&self, estimate: Instant) -> Option<u64> {
        let low = estimate.checked_sub(TOLERANCE).unwrap_or(estimate);
        let mut hits = self
            .by_created
            .range((low, 0)..=(estimate, u64::MAX))
            .map(|((_, n), _)| *n);
        match (hits.next(), hits.next()) {
            (Some(n), None) => Some(n),
            _ => None,
        }
    }
}

/// A leak found by [`Hooks::scan_leaks`].
#[derive(Debug, Clone)]
pub(crate) struct Leak {
    pub(crate) connection_id: Arc<str>,
    pub(crate) held: Duration,
    pub(crate) origin: CheckoutOrigin,
}

/// What the last failed connection setup said, to explain a failing connect.
#[derive(Debug, Clone)]
pub(crate) struct SetupError {
    pub(crate) message: String,
    pub(crate) code: Option<String>,
}

/// State shared by every hook closure of one pool.
pub(crate) struct Hooks {
    pool_label: &'static str,
    prefix: String,
    /// `SET ...;` statements for the session settings, without `application_name`.
    settings_sql: String,
    max_lifetime: Duration,
    test_if_idle_for: Duration,
    max_connections: u32,
    next_id: Arc<AtomicU64>,
    generation: Option<GenerationSource>,
    /// Connections set up before this instant are stale (the database went away after it).
    invalidated_before: Mutex<Option<Instant>>,
    registry: Mutex<Registry>,
    pub(crate) counters: Counters,
    sink: Mutex<Option<LogSink>>,
    last_setup_error: Mutex<Option<SetupError>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("prefix", &self.prefix)
            .field("max_lifetime", &self.max_lifetime)
            .field("test_if_idle_for", &self.test_if_idle_for)
            .finish_non_exhaustive()
    }
}

impl Hooks {
    pub(crate) fn new(
        pool: &PoolConfig,
        session: &SessionSettings,
        next_id: Arc<AtomicU64>,
        generation: Option<GenerationSource>,
    ) -> Hooks {
        Hooks {
            pool_label: m::DEFAULT_POOL,
            prefix: pool.application_name.clone(),
            settings_sql: session_sql(session),
            max_lifetime: pool.max_lifetime,
            test_if_idle_for: pool.test_if_idle_for,
            max_connections: pool.max_connections,
            next_id,
            generation,
            invalidated_before: Mutex::new(None),
            registry: Mutex::new(Registry::default()),
            counters: Counters::default(),
            sink: Mutex::new(None),
            last_setup_error: Mutex::new(None),
        }
    }

    pub(crate) fn pool_label(&self) -> &'static str {
        self.pool_label
    }

    pub(crate) fn set_sink(&self, sink: Option<LogSink>) -> Option<LogSink> {
        std::mem::replace(&mut *self.sink.lock().unwrap_or_else(|e| e.into_inner()), sink)
    }

    fn record(&self, event: ConnectionLogEvent) {
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sink) = sink {
            sink.record(event);
        }
    }

    /// Sends an event to the connection log, if one is attached.
    pub(crate) fn log(&self, event: ConnectionLogEvent) {
        self.record(event);
    }

    /// Every connection set up before now is stale: reject it at its next acquire or release.
    pub(crate) fn invalidate_all(&self) {
        *self.invalidated_before.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn cutoff(&self) -> Option<Instant> {
        let db = *self.invalidated_before.lock().unwrap_or_else(|e| e.into_inner());
        let tunnel = self.generation.as_ref().and_then(|g| g());
        match (db, tunnel) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn last_setup_error(&self) -> Option<SetupError> {
        self.last_setup_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (physical connections known, of which checked out).
    pub(crate) fn sizes(&self) -> (u32, u32) {
        let reg = self.lock();
        (reg.entries.len() as u32, reg.checked_out())
    }

    fn update_gauges(&self, size: u32, active: u32) {
        let pool = self.pool_label;
        metrics::gauge!(m::DB_POOL_CONNECTIONS_ACTIVE, m::POOL_LABEL => pool).set(active as f64);
        metrics::gauge!(m::DB_POOL_CONNECTIONS_IDLE, m::POOL_LABEL => pool).set(size.saturating_sub(active) as f64);
        metrics::gauge!(m::DB_POOL_CONNECTIONS_MAX, m::POOL_LABEL => pool).set(self.max_connections as f64);
    }

    fn parse_id(&self, name: &str) -> Option<u64> {
        let n = name
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('-')?
            .parse::<u64>()
            .ok()?;
        (n > 0 && n <= self.next_id.load(Ordering::SeqCst)).then_some(n)
    }

    /// Finds which registered connection `conn` is (see the module docs).
    async fn identify(&self, conn: &mut PgConnection, age: Duration) -> Result<Option<u64>, sqlx::Error> {
        let now = Instant::now();
        let estimate = now.checked_sub(age).unwrap_or(now);
        if let Some(n) = self.lock().find_unique(estimate) {
            return Ok(Some(n));
        }
        self.counters.server_lookups.fetch_add(1, Ordering::Relaxed);
        let (name, pid): (String, i32) = sqlx::query_as("SELECT current_setting('application_name'), pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await?;
        let Some(n) = self.parse_id(&name) else {
            return Ok(None);
        };
        let mut reg = self.lock();
        if !reg.entries.contains_key(&n) {
            // Known to the server but forgotten here (reconciled away): take it back.
            let entry = Entry {
                id: name.into(),
                pid,
                created: estimate,
                lifetime: self.jittered_lifetime(),
                checkout: None,
                fresh: false,
                released_at: Some(now),
            };
            reg.insert(n, entry);
        }
        Ok(Some(n))
    }

    fn jittered_lifetime(&self) -> Duration {
        // Up to 10 % shorter, so connections opened together do not all expire together.
        self.max_lifetime.mul_f64(1.0 - 0.1 * fastrand::f64())
    }

    /// Removes a connection the hooks are about to close (or found gone) and reports it.
    fn forget(&self, n: u64, reason: &'static str) {
        let (entry, size, active) = {
            let mut reg = self.lock();
            let entry = reg.remove(n);
            (entry, reg.entries.len() as u32, reg.checked_out())
        };
        if let Some(entry) = entry {
            self.report_closed(&entry, reason, size);
        }
        self.update_gauges(size, active);
    }

    fn report_closed(&self, entry: &Entry, reason: &'static str, size: u32) {
        let lifetime = entry.created.elapsed();
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(m::DB_CONNECTION_LIFETIME_SECONDS, m::POOL_LABEL => self.pool_label)
            .record(lifetime.as_secs_f64());
        events::connection_closed(&entry.id, size, reason, Some(lifetime));
        self.record(
            ConnectionLogEvent::new(entry.id.to_string(), "disconnected")
                .with_metadata(meta_json(&[("reason", reason), ("pool", self.pool_label)])),
        );
    }

    fn count_error(&self, kind: &'static str) {
        metrics::counter!(m::DB_CONNECTION_ERRORS_TOTAL, m::POOL_LABEL => self.pool_label, "kind" => kind).increment(1);
    }

    // ---- the three sqlx hooks -------------------------------------------------------------

    async fn after_connect(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        use sqlx::{Executor as _, Row as _};

        let started = Instant::now();
        let n = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let id: Arc<str> = format!("{}-{n}", self.prefix).into();
        // One round trip (simple query protocol): the settings, the id, and the backend pid.
        let sql = format!(
            "{}SET application_name = {}; SELECT pg_backend_pid()",
            self.settings_sql,
            quote_literal(&id)
        );
        let setup = match conn.fetch_one(sqlx::AssertSqlSafe(sql)).await {
            Ok(row) => row.try_get::<i32, _>(0),
            Err(e) => Err(e),
        };
        let pid = match setup {
            Ok(pid) => pid,
            Err(error) => {
                self.counters.setup_failures.fetch_add(1, Ordering::Relaxed);
                self.count_error("setup");
                let code = match &error {
                    sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                    _ => None,
                };
                *self.last_setup_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(SetupError {
                    message: error.to_string(),
                    code,
                });
                let size = self.sizes().0;
                events::connection_error(Some(&id), size, "setup", &error);
                self.record(ConnectionLogEvent::new(id.to_string(), "error").with_error(error.to_string()));
                return Err(error);
            }
        };

        // Space the recorded instants (see the module docs). No `.await` between taking the
        // instant and returning, so sqlx's own stamp follows within microseconds.
        let (size, active) = loop {
            let wait = {
                let mut reg = self.lock();
                let now = Instant::now();
                match reg.last_setup.map(|last| last + SPACING).filter(|next| *next > now) {
                    Some(next) => next - now,
                    None => {
                        reg.last_setup = Some(now);
                        let entry = Entry {
                            id: id.clone(),
                            pid,
                            created: now,
                            lifetime: self.jittered_lifetime(),
                            checkout: Some(Checkout {
                                since: now,
                                origin: CheckoutOrigin::capture(),
                                leak_reported: false,
                            }),
                            fresh: true,
                            released_at: None,
                        };
                        reg.insert(n, entry);
                        break (reg.entries.len() as u32, reg.checked_out());
                    }
                }
            };
            tokio::time::sleep(wait).await;
        };
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.counters.acquired.fetch_add(1, Ordering::Relaxed);
        self.update_gauges(size, active);
        events::connection_opened(&id, size, started.elapsed());
        events::connection_acquired(&id, size, &CheckoutOrigin::capture(), Duration::ZERO);
        self.record(
            ConnectionLogEvent::new(id.to_string(), "connected").with_metadata(meta_json(&[("pool", self.pool_label)])),
        );
        Ok(())
    }

    async fn before_acquire(&self, conn: &mut PgConnection, meta: PoolConnectionMetadata) -> Result<bool, sqlx::Error> {
        let Some(n) = self.identify(conn, meta.age).await? else {
            return Ok(false);
        };
        let cutoff = self.cutoff();
        let (stale, expired) = {
            let reg = self.lock();
            match reg.entries.get(&n) {
                Some(e) => (cutoff.is_some_and(|c| e.created < c), meta.age > e.lifetime),
                None => (false, false),
            }
        };
        if self.rejected(n, stale, expired) {
            return Ok(false);
        }
        if meta.idle_for >= self.test_if_idle_for {
            self.counters.idle_pings.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = sqlx::Connection::ping(&mut *conn).await {
                self.counters.ping_failures.fetch_add(1, Ordering::Relaxed);
                self.count_error("ping");
                let id = self.lock().entries.get(&n).map(|e| e.id.clone());
                let size = self.sizes().0;
                events::connection_error(id.as_deref(), size, "ping", &error);
                if let Some(id) = id {
                    self.record(ConnectionLogEvent::new(id.to_string(), "error").with_error(error.to_string()));
                }
                self.forget(n, "ping failed");
                return Err(error);
            }
        }

        let origin = CheckoutOrigin::capture();
        let (id, size, active) = {
            let mut reg = self.lock();
            let id = match reg.entries.get_mut(&n) {
                Some(e) => {
                    e.fresh = false;
                    e.checkout = Some(Checkout {
                        since: Instant::now(),
                        origin: origin.clone(),
                        leak_reported: false,
                    });
                    e.id.clone()
                }
                None => return Ok(false),
            };
            (id, reg.entries.len() as u32, reg.checked_out())
        };
        self.counters.acquired.fetch_add(1, Ordering::Relaxed);
        self.update_gauges(size, active);
        events::connection_acquired(&id, size, &origin, meta.idle_for);
        Ok(true)
    }

    async fn after_release(&self, conn: &mut PgConnection, meta: PoolConnectionMetadata) -> Result<bool, sqlx::Error> {
        let Some(n) = self.identify(conn, meta.age).await? else {
            return Ok(false);
        };
        let cutoff = self.cutoff();
        let now = Instant::now();
        let (id, checkout, stale, expired, size, active) = {
            let mut reg = self.lock();
            let Some(e) = reg.entries.get_mut(&n) else {
                return Ok(false);
            };
            let checkout = e.checkout.take();
            e.fresh = false;
            e.released_at = Some(now);
            let out = (
                e.id.clone(),
                checkout,
                cutoff.is_some_and(|c| e.created < c),
                meta.age > e.lifetime,
            );
            (out.0, out.1, out.2, out.3, reg.entries.len() as u32, reg.checked_out())
        };
        self.counters.released.fetch_add(1, Ordering::Relaxed);
        let held = checkout.as_ref().map(|c| now.saturating_duration_since(c.since));
        let correlation = checkout.as_ref().and_then(|c| c.origin.correlation_id.clone());
        events::connection_released(&id, size, correlation.as_deref(), held);
        self.update_gauges(size, active);
        Ok(!self.rejected(n, stale, expired))
    }

    /// Counts and forgets connection `n` when it predates the generation cutoff (`stale`) or
    /// outlived its jittered lifetime (`expired`); `true` means the pool must close it.
    fn rejected(&self, n: u64, stale: bool, expired: bool) -> bool {
        let (counter, why) = if stale {
            (&self.counters.rejected_stale, "stale")
        } else if expired {
            (&self.counters.rejected_expired, "expired")
        } else {
            return false;
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.forget(n, why);
        true
    }

    // ---- maintenance ----------------------------------------------------------------------

    /// Drops registry entries of connections the pool closed without a hook seeing it (idle
    /// timeout, a failed ping on release, a dropped connect): when the registry holds more
    /// connections than the pool, the excess is forgotten, least recently used first.
    pub(crate) fn reconcile(&self, pool_size: u32) {
        let gone: Vec<(Entry, u32)> = {
            let mut reg = self.lock();
            let excess = (reg.entries.len() as u32).saturating_sub(pool_size) as usize;
            if excess == 0 {
                return;
            }
            let mut order: Vec<(u8, Instant, u64)> = reg
                .entries
                .iter()
                .map(|(n, e)| match &e.checkout {
                    None => (0, e.released_at.unwrap_or(e.created), *n),
                    Some(c) if e.fresh => (1, c.since, *n),
                    Some(c) => (2, c.since, *n),
                })
                .collect();
            order.sort();
            let victims: Vec<u64> = order.into_iter().take(excess).map(|(_, _, n)| n).collect();
            let mut out = Vec::new();
            for n in victims {
                if let Some(e) = reg.remove(n) {
                    out.push((e, 0));
                }
            }
            let size = reg.entries.len() as u32;
            out.into_iter().map(|(e, _)| (e, size)).collect()
        };
        for (entry, size) in gone {
            self.report_closed(&entry, "gone", size);
        }
    }

    /// Checkouts held longer than `threshold` and not reported yet; each is reported once.
    /// `pool_active` (from the pool) tells whether some "fresh" entries may really be idle.
    pub(crate) fn scan_leaks(&self, threshold: Duration, pool_active: u32) -> Vec<Leak> {
        let mut reg = self.lock();
        let phantoms_possible = reg.checked_out() > pool_active;
        let mut leaks = Vec::new();
        for e in reg.entries.values_mut() {
            let fresh = e.fresh;
            let Some(c) = e.checkout.as_mut() else { continue };
            if c.leak_reported || (fresh && phantoms_possible) {
                continue;
            }
            let held = c.since.elapsed();
            if held > threshold {
                c.leak_reported = true;
                leaks.push(Leak {
                    connection_id: e.id.clone(),
                    held,
                    origin: c.origin.clone(),
                });
            }
        }
        drop(reg);
        for leak in &leaks {
            self.counters.leaks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::DB_CONNECTION_LEAKS_TOTAL, m::POOL_LABEL => self.pool_label).increment(1);
            let size = self.sizes().0;
            events::connection_leaked(&leak.connection_id, size, leak.held, &leak.origin);
            let mut meta = vec![("pool", self.pool_label.to_string())];
            meta.push(("held_ms", leak.held.as_millis().to_string()));
            if let Some(span) = leak.origin.span {
                meta.push(("span", span.to_string()));
            }
            if let Some(c) = &leak.origin.correlation_id {
                meta.push(("correlation_id", c.to_string()));
            }
            self.record(
                ConnectionLogEvent::new(leak.connection_id.to_string(), "leak").with_metadata(
                    sea_orm::JsonValue::Object(meta.into_iter().map(|(k, v)| (k.to_string(), v.into())).collect()),
                ),
            );
        }
        leaks
    }

    /// Server process ids of the connections currently known.
    pub(crate) fn known_pids(&self) -> Vec<i32> {
        self.lock().entries.values().map(|e| e.pid).collect()
    }

    /// Forgets every connection (the pool is closed), reporting each as closed with `reason`.
    pub(crate) fn forget_all(&self, reason: &'static str) {
        let all: Vec<Entry> = {
            let mut reg = self.lock();
            let ns: Vec<u64> = reg.entries.keys().copied().collect();
            ns.into_iter().filter_map(|n| reg.remove(n)).collect()
        };
        for entry in all {
            self.report_closed(&entry, reason, 0);
        }
        self.update_gauges(0, 0);
    }
}

/// Installs the hooks on sqlx pool options: our `after_connect`, `before_acquire` and
/// `after_release` (replacing SeaORM's, whose work ours includes), ping-on-acquire off, and no
/// sqlx max lifetime (ours is per connection and checked in the hooks; sqlx's would close
/// connections on release without calling `after_release`, so a checkout would never end).
pub(crate) fn install(
    hooks: &Arc<Hooks>,
    options: sqlx::pool::PoolOptions<sqlx::Postgres>,
) -> sqlx::pool::PoolOptions<sqlx::Postgres> {
    let on_connect = hooks.clone();
    let on_acquire = hooks.clone();
    let on_release = hooks.clone();
    options
        .test_before_acquire(false)
        .max_lifetime(None)
        .acquire_time_level(log::LevelFilter::Trace)
        .after_connect(move |conn, _meta| -> BoxFuture<'_, Result<(), sqlx::Error>> {
            let hooks = on_connect.clone();
            Box::pin(async move { hooks.after_connect(conn).await })
        })
        .before_acquire(move |conn, meta| -> BoxFuture<'_, Result<bool, sqlx::Error>> {
            let hooks = on_acquire.clone();
            Box::pin(async move { hooks.before_acquire(conn, meta).await })
        })
        .after_release(move |conn, meta| -> BoxFuture<'_, Result<bool, sqlx::Error>> {
            let hooks = on_release.clone();
            Box::pin(async move { hooks.after_release(conn, meta).await })
        })
}

/// `SET` statements for the session settings (each ending in `; `).
pub(crate) fn session_sql(session: &SessionSettings) -> String {
    let mut sql = String::new();
    if let Some(role) = &session.role {
        sql.push_str(&format!("SET ROLE {}; ", quote_ident(role)));
    }
    if let Some(t) = session.statement_timeout {
        sql.push_str(&format!("SET statement_timeout = {}; ", t.as_millis()));
    }
    if let Some(t) = session.idle_in_transaction_session_timeout {
        sql.push_str(&format!(
            "SET idle_in_transaction_session_timeout = {}; ",
            t.as_millis()
        ));
    }
    if session.read_only {
        sql.push_str("SET default_transaction_read_only = on; ");
    }
    sql
}

/// A PostgreSQL identifier in double quotes.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A PostgreSQL string literal (standard_conforming_strings is on since 9.1).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn meta_json(pairs: &[(&str, &str)]) -> sea_orm::JsonValue {
    sea_orm::JsonValue::Object(pairs.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_settings_render_as_set_statements() {
        let s = SessionSettings::new()
            .role("app \"ro\"")
            .statement_timeout(Duration::from_secs(5))
            .idle_in_transaction_session_timeout(Duration::from_millis(1500))
            .read_only(true);
        assert_eq!(
            session_sql(&s),
            "SET ROLE \"app \"\"ro\"\"\"; SET statement_timeout = 5000; \
             SET idle_in_transaction_session_timeout = 1500; SET default_transaction_read_only = on; "
        );
        assert_eq!(session_sql(&SessionSettings::new()), "");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn lookup_window_is_unique_or_nothing() {
        let mut reg = Registry::default();
        let t0 = Instant::now();
        let entry = |created| Entry {
            id: "x".into(),
            pid: 0,
            created,
            lifetime: Duration::from_secs(60),
            checkout: None,
            fresh: false,
            released_at: None,
        };
        reg.insert(1, entry(t0));
        reg.insert(2, entry(t0 + SPACING));
        assert_eq!(reg.find_unique(t0 + Duration::from_micros(10)), Some(1));
        assert_eq!(reg.find_unique(t0 + SPACING + Duration::from_micros(10)), Some(2));
        // Too late for either: ask the server.
        assert_eq!(reg.find_unique(t0 + SPACING * 4), None);
        // Two inside one window (spacing violated): ambiguous, ask the server.
        reg.insert(3, entry(t0 + SPACING + Duration::from_micros(100)));
        assert_eq!(reg.find_unique(t0 + SPACING + Duration::from_micros(200)), None);
    }

    #[test]
    fn ids_parse_only_with_our_prefix() {
        let pool = PoolConfig::default().application_name("svc");
        let hooks = Hooks::new(&pool, &SessionSettings::new(), Arc::new(AtomicU64::new(5)), None);
        assert_eq!(hooks.parse_id("svc-3"), Some(3));
        assert_eq!(hooks.parse_id("svc-9"), None, "never issued");
        assert_eq!(hooks.parse_id("other-3"), None);
        assert_eq!(hooks.parse_id("svc-x"), None);
    }
}
